//! Single-thread throughput of the synthesis kernels against memcpy of the same output bytes.
//!
//! `cargo bench --bench kernels` runs at the detected SIMD level, then re-runs itself with
//! `AOE_KERNELS=avx2` and `AOE_KERNELS=portable` (when those are lower than the detected level)
//! to show the fallbacks. Environment: `AOE_BENCH_MIB` (default 64) or `AOE_BENCH_KIB` sets the
//! output size; `AOE_BENCH_ONLY=bf16|fp8|mxfp4` runs one group.
//!
//! Every kernel is timed in `REPS` rounds; each round times a memcpy of the output size and
//! then the kernel (repeated within the round to last ≥ 20 ms when the size is small), so the
//! ratio to memcpy is taken under the same machine load. Printed: medians of the kernel's
//! GB/s, of the paired memcpy GB/s and of the per-round ratio. Buffers are touched and every
//! kernel run twice before timing (fresh memory is slow on this VM).

use aoe::kernels::{self, MixInput, MxInput, MxSource, SimdLevel};
use aoe::model::dtype::DType;
use std::hint::black_box;
use std::time::Instant;

const REPS: usize = 9;
const COLS: usize = 4096;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Roughly bell-shaped value of magnitude ~scale.
    fn value(&mut self, scale: f32) -> f32 {
        let r = self.next();
        let u = (r as u32) as f32 / u32::MAX as f32;
        let v = ((r >> 32) as u32) as f32 / u32::MAX as f32;
        (u + v - 1.0) * scale
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Seconds per run of `f`, running it `inner` times.
fn timed(inner: usize, f: &mut impl FnMut()) -> f64 {
    let s = Instant::now();
    for _ in 0..inner {
        f();
    }
    s.elapsed().as_secs_f64() / inner as f64
}

/// How many runs make a sample of ≥ 20 ms.
fn inner_reps(f: &mut impl FnMut()) -> usize {
    f();
    let once = timed(1, f);
    ((0.02 / once.max(1e-9)) as usize).clamp(1, 100_000)
}

/// The memcpy every kernel is paired with.
struct Memcpy {
    src: Vec<u8>,
    dst: Vec<u8>,
}

impl Memcpy {
    fn run(&mut self) {
        self.dst.copy_from_slice(black_box(&self.src));
        black_box(&mut self.dst);
    }
}

/// Times `f` (moving `bytes` of output) in rounds paired with memcpy; prints the medians.
fn bench(name: &str, bytes: usize, mc: &mut Memcpy, mut f: impl FnMut()) {
    let n_mc = mc.dst.len();
    let mut m = || mc.run();
    let (im, ik) = (inner_reps(&mut m), inner_reps(&mut f));
    let (mut gm, mut gk, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..REPS {
        let a = n_mc as f64 / timed(im, &mut m) / 1e9;
        let b = bytes as f64 / timed(ik, &mut f) / 1e9;
        gm.push(a);
        gk.push(b);
        ratio.push(b / a);
    }
    println!(
        "  {name:<34} {:7.2} GB/s   memcpy {:6.2} GB/s   {:5.2}x memcpy",
        median(gk),
        median(gm),
        median(ratio)
    );
}

fn bf16_bytes(rng: &mut Rng, n: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(n * 2);
    for _ in 0..n {
        v.extend(kernels::f32_to_bf16(rng.value(0.05)).to_le_bytes());
    }
    v
}

/// FP8 codes over the whole range (|x| ≤ 440, no NaN) and small positive block scales.
fn fp8_band(rng: &mut Rng, n: usize) -> (Vec<u8>, Vec<f32>) {
    let codes = (0..n)
        .map(|_| kernels::f32_to_fp8(rng.value(440.0)))
        .collect();
    let nb = (n / COLS).div_ceil(128) * COLS.div_ceil(128);
    let scales = (0..nb).map(|_| 1e-4 + rng.value(1e-4).abs()).collect();
    (codes, scales)
}

fn main() {
    let kib: usize = std::env::var("AOE_BENCH_KIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::env::var("AOE_BENCH_MIB")
                .ok()
                .and_then(|s| s.parse::<usize>().ok())
                .unwrap_or(64)
                * 1024
        });
    let n_out = (kib << 10) / (2 * COLS) * (2 * COLS); // whole rows of both dtypes
    let only = std::env::var("AOE_BENCH_ONLY").unwrap_or_default();
    let level = kernels::simd_level();
    println!(
        "kernels bench: level {level:?}, {:.2} MiB of output per kernel, {REPS} rounds, 1 thread",
        n_out as f64 / (1 << 20) as f64
    );
    let mut rng = Rng(42);
    let mut mc = Memcpy {
        src: vec![1u8; n_out],
        dst: vec![0u8; n_out],
    };
    let mut dst = vec![0u8; n_out];

    if only.is_empty() || only == "bf16" {
        // BF16 two-parent mix: out = bf16(0.4·a + 0.6·b).
        let n = n_out / 2;
        let a = bf16_bytes(&mut rng, n);
        let b = bf16_bytes(&mut rng, n);
        let inputs = [
            MixInput {
                dtype: DType::BF16,
                bytes: &a,
                scales: None,
                weight: 0.4,
            },
            MixInput {
                dtype: DType::BF16,
                bytes: &b,
                scales: None,
                weight: 0.6,
            },
        ];
        bench("bf16 mix (fused `mix`)", n_out, &mut mc, || {
            kernels::mix(black_box(&inputs), COLS, DType::BF16, &mut dst, None)
        });

        // The same, unfused, through 1 MiB f32 chunks: accumulate, accumulate, encode.
        let chunk = 1 << 18;
        let mut acc = vec![0f32; chunk];
        bench(
            "bf16 mix (unfused, 1 MiB f32 tiles)",
            n_out,
            &mut mc,
            || {
                for ((ca, cb), co) in a
                    .chunks(2 * chunk)
                    .zip(b.chunks(2 * chunk))
                    .zip(dst.chunks_mut(2 * chunk))
                {
                    let m = ca.len() / 2;
                    kernels::accumulate(DType::BF16, ca, None, 0.4, &mut acc[..m], true);
                    kernels::accumulate(DType::BF16, cb, None, 0.6, &mut acc[..m], false);
                    kernels::encode(DType::BF16, &acc[..m], co);
                }
            },
        );

        bench(
            "bf16 sum_sq_diff_bytes (bytes of a)",
            a.len(),
            &mut mc,
            || {
                black_box(kernels::sum_sq_diff_bytes(DType::BF16, &a, DType::BF16, &b));
            },
        );
    }

    if only.is_empty() || only == "fp8" {
        // FP8 dequantize-mix-requantize of a band of rows x 4096, two parents.
        let n = n_out;
        let (ca, sa) = fp8_band(&mut rng, n);
        let (cb, sb) = fp8_band(&mut rng, n);
        let mut out_scales = vec![0f32; sa.len()];
        let inputs = [
            MixInput {
                dtype: DType::F8E4M3,
                bytes: &ca,
                scales: Some(&sa),
                weight: 0.4,
            },
            MixInput {
                dtype: DType::F8E4M3,
                bytes: &cb,
                scales: Some(&sb),
                weight: 0.6,
            },
        ];
        bench("fp8 dequant-mix-requant (`mix`)", n_out, &mut mc, || {
            kernels::mix(
                black_box(&inputs),
                COLS,
                DType::F8E4M3,
                &mut dst,
                Some(&mut out_scales),
            )
        });

        let mut facc = vec![0f32; n];
        bench("fp8 (unfused, full f32 buffer)", n_out, &mut mc, || {
            kernels::accumulate(DType::F8E4M3, &ca, Some((&sa, COLS)), 0.4, &mut facc, true);
            kernels::accumulate(DType::F8E4M3, &cb, Some((&sb, COLS)), 0.6, &mut facc, false);
            kernels::quantize_fp8(&facc, COLS, &mut dst, &mut out_scales);
        });
        drop(facc);

        bench(
            "fp8 sum_sq_diff_bytes (bytes of a)",
            ca.len(),
            &mut mc,
            || {
                black_box(kernels::sum_sq_diff_bytes(
                    DType::F8E4M3,
                    &ca,
                    DType::F8E4M3,
                    &cb,
                ));
            },
        );
    }

    if only.is_empty() || only == "mxfp4" {
        // MXFP4 two-parent mix, λ = 0.5: decode both, mix, requantize (GPT-OSS experts).
        // Output bytes: 16 code bytes + 1 scale byte per 32 values.
        let g = n_out / (kernels::MXFP4_BLOCK_BYTES + 1);
        let mx = |rng: &mut Rng| -> (Vec<u8>, Vec<u8>) {
            let b = (0..16 * g).map(|_| rng.next() as u8).collect();
            let s = (0..g).map(|_| 116 + (rng.next() % 8) as u8).collect();
            (b, s)
        };
        let (ba, sa) = mx(&mut rng);
        let (bb, sb) = mx(&mut rng);
        let inputs = [
            MxInput {
                source: MxSource::Mxfp4 {
                    blocks: &ba,
                    scales: &sa,
                },
                weight: 0.5,
            },
            MxInput {
                source: MxSource::Mxfp4 {
                    blocks: &bb,
                    scales: &sb,
                },
                weight: 0.5,
            },
        ];
        let out_bytes = 17 * g;
        let (mut ob, mut os) = (vec![0u8; 16 * g], vec![0u8; g]);
        bench(
            "mxfp4 decode-mix-requant (`mix_mxfp4`)",
            out_bytes,
            &mut mc,
            || kernels::mix_mxfp4(black_box(&inputs), &mut ob, &mut os).unwrap(),
        );

        // The same, unfused, through 1 MiB f32 chunks: decode, scale_add ×2, quantize.
        let chunk = 1 << 13; // blocks per chunk (2^18 values)
        let (mut acc, mut d) = (vec![0f32; 32 * chunk], vec![0f32; 32 * chunk]);
        bench(
            "mxfp4 (unfused, 1 MiB f32 tiles)",
            out_bytes,
            &mut mc,
            || {
                let mut g0 = 0;
                while g0 < g {
                    let n = chunk.min(g - g0);
                    let (bl, sc) = (g0 * 16..(g0 + n) * 16, g0..g0 + n);
                    let (acc, d) = (&mut acc[..32 * n], &mut d[..32 * n]);
                    let _ = kernels::decode_mxfp4(&ba[bl.clone()], &sa[sc.clone()], d);
                    kernels::scale_add(acc, 0.5, d, true);
                    let _ = kernels::decode_mxfp4(&bb[bl.clone()], &sb[sc.clone()], d);
                    kernels::scale_add(acc, 0.5, d, false);
                    let _ = kernels::quantize_mxfp4(acc, &mut ob[bl], &mut os[sc]);
                    g0 += n;
                }
            },
        );
    }

    // Re-run at the lower levels (child processes: the level is fixed per process).
    if std::env::var_os("AOE_KERNELS").is_none() && only.is_empty() {
        let lower: &[&str] = match level {
            SimdLevel::Avx512 => &["avx2", "portable"],
            SimdLevel::Avx2 => &["portable"],
            SimdLevel::Portable => &[],
        };
        if let Ok(exe) = std::env::current_exe() {
            for l in lower {
                let _ = std::process::Command::new(&exe)
                    .env("AOE_KERNELS", l)
                    .status();
            }
        }
    }
}
