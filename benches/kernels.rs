//! Single-thread throughput of the synthesis kernels against memcpy of the same output bytes.
//!
//! `cargo bench --bench kernels` runs at the detected SIMD level, then re-runs itself with
//! `AOE_KERNELS=avx2` and `AOE_KERNELS=portable` (when those are lower than the detected level)
//! to show the fallbacks. `AOE_BENCH_MIB` sets the output size (default 64 MiB).
//! Every figure is the median of 9 timed repetitions after a warm-up (fresh memory is slow on
//! this VM, so all buffers are touched and every kernel run twice before timing).

use aoe::dtype::DType;
use aoe::kernels::{self, MixInput, SimdLevel};
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

/// Median seconds of `REPS` runs of `f` (after two warm-up runs).
fn time(mut f: impl FnMut()) -> f64 {
    f();
    f();
    let mut t: Vec<f64> = (0..REPS)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    t[REPS / 2]
}

fn gbs(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

fn bf16_bytes(rng: &mut Rng, n: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(n * 2);
    for _ in 0..n {
        v.extend(kernels::f32_to_bf16(rng.value(0.05)).to_le_bytes());
    }
    v
}

fn fp8_band(rng: &mut Rng, n: usize) -> (Vec<u8>, Vec<f32>) {
    let codes = (0..n).map(|_| kernels::f32_to_fp8(rng.value(700.0))).collect();
    let nb = (n / COLS).div_ceil(128) * COLS.div_ceil(128);
    let scales = (0..nb).map(|_| 1e-4 + rng.value(1e-4).abs()).collect();
    (codes, scales)
}

fn main() {
    let mib: usize = std::env::var("AOE_BENCH_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    let n_out = mib << 20; // output bytes
    let level = kernels::simd_level();
    println!(
        "kernels bench: level {level:?}, {mib} MiB of output per kernel, median of {REPS}, 1 thread"
    );
    let mut rng = Rng(42);

    // memcpy of the output size.
    let src = vec![1u8; n_out];
    let mut dst = vec![0u8; n_out];
    let t_memcpy = time(|| {
        dst.copy_from_slice(black_box(&src));
        black_box(&mut dst);
    });
    let memcpy = gbs(n_out, t_memcpy);
    println!("  memcpy                          {memcpy:7.2} GB/s");
    drop(src);

    let report = |name: &str, bytes: usize, secs: f64| {
        let g = gbs(bytes, secs);
        println!(
            "  {name:<31} {g:7.2} GB/s   {:5.2}x memcpy",
            g / memcpy
        );
    };

    // BF16 two-parent mix, fused: out = bf16(0.4·a + 0.6·b).
    let n = n_out / 2;
    let a = bf16_bytes(&mut rng, n);
    let b = bf16_bytes(&mut rng, n);
    let inputs = [
        MixInput { dtype: DType::BF16, bytes: &a, scales: None, weight: 0.4 },
        MixInput { dtype: DType::BF16, bytes: &b, scales: None, weight: 0.6 },
    ];
    let t = time(|| kernels::mix(black_box(&inputs), COLS, DType::BF16, &mut dst, None));
    report("bf16 mix (fused)", n_out, t);

    // The same, unfused, through 1 MiB f32 chunks: accumulate, accumulate, encode.
    let chunk = 1 << 18;
    let mut acc = vec![0f32; chunk];
    let t = time(|| {
        for ((ca, cb), co) in a.chunks(2 * chunk).zip(b.chunks(2 * chunk)).zip(dst.chunks_mut(2 * chunk)) {
            let m = ca.len() / 2;
            kernels::accumulate(DType::BF16, ca, None, 0.4, &mut acc[..m], true);
            kernels::accumulate(DType::BF16, cb, None, 0.6, &mut acc[..m], false);
            kernels::encode(DType::BF16, &acc[..m], co);
        }
    });
    report("bf16 mix (unfused, 1 MiB tiles)", n_out, t);

    let t = time(|| {
        black_box(kernels::sum_sq_diff_bytes(DType::BF16, &a, DType::BF16, &b));
    });
    report("bf16 sum_sq_diff_bytes (per a)", a.len(), t);
    drop((a, b));

    // FP8 dequantize-mix-requantize: 16384 x 4096 band, two parents.
    let n = n_out;
    let (ca, sa) = fp8_band(&mut rng, n);
    let (cb, sb) = fp8_band(&mut rng, n);
    let mut out_scales = vec![0f32; sa.len()];
    let inputs = [
        MixInput { dtype: DType::F8E4M3, bytes: &ca, scales: Some(&sa), weight: 0.4 },
        MixInput { dtype: DType::F8E4M3, bytes: &cb, scales: Some(&sb), weight: 0.6 },
    ];
    let t = time(|| {
        kernels::mix(black_box(&inputs), COLS, DType::F8E4M3, &mut dst, Some(&mut out_scales))
    });
    report("fp8 dequant-mix-requant (fused)", n_out, t);

    let mut facc = vec![0f32; n];
    let t = time(|| {
        kernels::accumulate(DType::F8E4M3, &ca, Some((&sa, COLS)), 0.4, &mut facc, true);
        kernels::accumulate(DType::F8E4M3, &cb, Some((&sb, COLS)), 0.6, &mut facc, false);
        kernels::quantize_fp8(&facc, COLS, &mut dst, &mut out_scales);
    });
    report("fp8 (unfused, full f32 buffer)", n_out, t);
    drop(facc);

    let t = time(|| {
        black_box(kernels::sum_sq_diff_bytes(DType::F8E4M3, &ca, DType::F8E4M3, &cb));
    });
    report("fp8 sum_sq_diff_bytes (per a)", ca.len(), t);

    // Re-run at the lower levels (child processes: the level is fixed per process).
    if std::env::var_os("AOE_KERNELS").is_none() {
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
