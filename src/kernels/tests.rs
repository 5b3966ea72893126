use super::codec::*;
use super::convert::*;
use super::mix::*;
use super::simd::*;
use super::stats::*;
use super::*;
use crate::model::dtype::DType;

thread_local! {
    /// Set while a test runs the AVX-512 level without its VBMI paths ([`vbmi_enabled`]).
    pub(super) static NO_VBMI: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Block rows this thread ran through the fused VBMI kernel (`x86::mix2_fp8_band_vbmi`).
    pub(super) static VBMI_BANDS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Every level this machine can run, the AVX-512 one both with and without VBMI:
/// (level, VBMI allowed, label).
fn level_configs() -> Vec<(SimdLevel, bool, String)> {
    let mut v = Vec::new();
    for lv in available_levels() {
        v.push((lv, true, format!("{lv:?}")));
        if lv == SimdLevel::Avx512 {
            v.push((lv, false, format!("{lv:?} without VBMI")));
        }
    }
    v
}

/// Runs `f` on this thread with the VBMI paths allowed or not.
fn with_vbmi<R>(vbmi: bool, f: impl FnOnce() -> R) -> R {
    NO_VBMI.with(|v| v.set(!vbmi));
    let r = f();
    NO_VBMI.with(|v| v.set(false));
    r
}

/// splitmix64: a tiny deterministic RNG.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn u32(&mut self) -> u32 {
        (self.next() >> 32) as u32
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// Roughly normal-looking weights of magnitude ~scale (no NaN/inf).
    fn value(&mut self, scale: f32) -> f32 {
        let u = (self.u32() as f32 / u32::MAX as f32) - 0.5;
        let v = (self.u32() as f32 / u32::MAX as f32) - 0.5;
        (u + v) * scale
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// dtype, bytes, FP8 scales, weight.
type OwnedInput = (DType, Vec<u8>, Option<Vec<f32>>, f32);

const LENGTHS: &[usize] = &[
    0, 1, 7, 15, 16, 17, 31, 33, 63, 65, 127, 128, 129, 255, 257, 1000,
];
const SHAPES: &[(usize, usize)] = &[
    (1, 1),
    (130, 7),
    (129, 300),
    (256, 257),
    (3, 128),
    (128, 128),
    (2, 1000),
    (129, 2500), // wider than one 2048-column tile
];
const DTYPES: &[DType] = &[DType::BF16, DType::F16, DType::F32, DType::F8E4M3];
const OUT_DTYPES: &[DType] = &[DType::BF16, DType::F16, DType::F32];

pub(super) fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Asserts equality, reporting only the first differing element.
#[track_caller]
pub(super) fn same<T: PartialEq + std::fmt::Debug>(got: &[T], want: &[T], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
        panic!(
            "{what}: first difference at {i}: got {:?}, want {:?}",
            got[i], want[i]
        );
    }
}

fn pow2(k: i32) -> f32 {
    2f32.powi(k)
}

/// f32 inputs that stress the encoders.
fn edge_f32() -> Vec<f32> {
    let mut v: Vec<f32> = [
        0u32,
        0x8000_0000,
        0x7f80_0000,
        0xff80_0000, // ±0, ±inf
        0x7fc0_0000,
        0xffc0_0000,
        0x7f80_0001,
        0xff80_0001,
        0x7fa0_0001,
        0xffa0_0001,
        0x7fff_ffff,
        0xffff_ffff,
        0x7fc0_0001,
        0x7fbf_ffff,
        0x7f80_2000,
        0x7f80_1fff,
        0x7fc0_1000,
        0xff80_e000, // NaNs with payloads
        1,
        2,
        3,
        0x007f_ffff,
        0x0040_0000,
        0x8000_0001,
        0x807f_ffff, // f32 subnormals
        0x0080_0000,
        0x7f7f_ffff,
        0xff7f_ffff,
        0x7f7f_8000,
        0x7f7f_7fff,
        0x7f7f_0000,
    ]
    .iter()
    .map(|&b| f32::from_bits(b))
    .collect();
    v.extend([
        448.0,
        464.0,
        465.0,
        456.0,
        447.0,
        449.0,
        480.0,
        500.0,
        1e6,
        240.0,
        248.0,
        232.0,
        65504.0,
        65519.0,
        65520.0,
        65535.0,
        65536.0,
        65520f32.next_down(),
        65520f32.next_up(),
        1.0,
        -1.0,
        0.1,
    ]);
    for k in -30..20 {
        let p = pow2(k);
        v.extend([
            p,
            1.5 * p,
            1.25 * p,
            1.0625 * p,
            1.03125 * p,
            1.0078125 * p,
            (1.0 + 1.0 / 256.0) * p,
        ]);
    }
    v.extend([
        464f32.next_down(),
        464f32.next_up(),
        448f32.next_up(),
        448f32.next_down(),
    ]);
    v.extend([
        pow2(-10),
        pow2(-10).next_up(),
        pow2(-10).next_down(),
        1.5 * pow2(-9),
    ]);
    // Every FP8, BF16 and F16 value, the midpoints to their neighbours and one ulp around.
    let grids: [Vec<f32>; 3] = [
        (0..0x7fu8).map(scalar::fp8_to_f32).collect(),
        (0..0x7c00u16).map(scalar::f16_to_f32).collect(),
        (0..0x7f80u16).step_by(3).map(scalar::bf16_to_f32).collect(),
    ];
    for g in grids {
        for w in g.windows(2) {
            let mid = ((w[0] as f64 + w[1] as f64) / 2.0) as f32;
            v.extend([w[0], mid, mid.next_up(), mid.next_down()]);
        }
    }
    let neg: Vec<f32> = v.iter().map(|x| -*x).collect();
    v.extend(neg);
    v
}

fn random_f32(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| f32::from_bits(rng.u32())).collect()
}

/// Independent oracle: round |x| to the nearest of `grid` (sorted finite magnitudes with
/// their codes, plus one overflow sentinel at the end), ties to the even code.
fn nearest(grid: &[(f64, u32)], a: f64) -> u32 {
    let i = grid.partition_point(|g| g.0 < a);
    if i < grid.len() && grid[i].0 == a {
        return grid[i].1;
    }
    assert!(i > 0 && i < grid.len(), "value outside grid: {a}");
    let (lo, hi) = (grid[i - 1], grid[i]);
    let (dl, dh) = (a - lo.0, hi.0 - a);
    if dl < dh || (dl == dh && lo.1 & 1 == 0) {
        lo.1
    } else {
        hi.1
    }
}

// ---- known values: pin the scalar reference (and the fast element functions) ----

#[test]
fn known_values() {
    type Enc8 = fn(f32) -> u8;
    type Enc16 = fn(f32) -> u16;
    let fp8s: [Enc8; 2] = [scalar::f32_to_fp8, f32_to_fp8];
    for f in fp8s {
        assert_eq!(f(464.0), 0x7e);
        assert_eq!(f(465.0), 0x7f);
        assert_eq!(f(448.0), 0x7e);
        assert_eq!(f(460.0), 0x7e);
        assert_eq!(f(-500.0), 0xff);
        assert_eq!(f(f32::INFINITY), 0x7f);
        assert_eq!(f(f32::NEG_INFINITY), 0xff);
        assert_eq!(f(f32::NAN), 0x7f);
        assert_eq!(f(-f32::NAN), 0xff);
        assert_eq!(f(-0.0), 0x80);
        assert_eq!(f(0.0), 0x00);
        assert_eq!(f(pow2(-10)), 0x00);
        assert_eq!(f(pow2(-10).next_up()), 0x01);
        assert_eq!(f(pow2(-9)), 0x01);
        assert_eq!(f(1.5 * pow2(-9)), 0x02);
        assert_eq!(f(2.5 * pow2(-9)), 0x02);
        assert_eq!(f(7.5 * pow2(-9)), 0x08);
        assert_eq!(f(pow2(-6)), 0x08);
        assert_eq!(f(1.0), 0x38);
        assert_eq!(f(-2.0), 0xc0);
        assert_eq!(f(1.0625), 0x38); // tie 1 / 1.125 → even
        assert_eq!(f(1.1875), 0x3a); // tie 1.125 / 1.25 → even (1.25)
        assert_eq!(f(f32::from_bits(1)), 0x00);
    }
    let d8: [fn(u8) -> f32; 2] = [scalar::fp8_to_f32, fp8_to_f32];
    for f in d8 {
        assert_eq!(f(0x7e).to_bits(), 448f32.to_bits());
        assert_eq!(f(0x01).to_bits(), pow2(-9).to_bits());
        assert_eq!(f(0x07).to_bits(), (7.0 * pow2(-9)).to_bits());
        assert_eq!(f(0x08).to_bits(), pow2(-6).to_bits());
        assert_eq!(f(0x38).to_bits(), 1f32.to_bits());
        assert_eq!(f(0x80).to_bits(), 0x8000_0000);
        assert_eq!(f(0x7f).to_bits(), 0x7fc0_0000);
        assert_eq!(f(0xff).to_bits(), 0xffc0_0000);
    }
    let bf: [Enc16; 2] = [scalar::f32_to_bf16, f32_to_bf16];
    for f in bf {
        assert_eq!(f(f32::from_bits(0x7f80_0001)), 0x7fc0);
        assert_eq!(f(f32::from_bits(0x7fc1_2345)), 0x7fc0);
        assert_eq!(f(f32::from_bits(0xffa0_0000)), 0xffc0);
        assert_eq!(f(f32::INFINITY), 0x7f80);
        assert_eq!(f(f32::MAX), 0x7f80);
        assert_eq!(f(f32::from_bits(0x7f7f_7fff)), 0x7f7f);
        assert_eq!(f(f32::from_bits(0x3f80_8000)), 0x3f80); // tie → even
        assert_eq!(f(f32::from_bits(0x3f81_8000)), 0x3f82); // tie → even
        assert_eq!(f(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert_eq!(f(f32::from_bits(0x0000_8001)), 0x0001); // subnormal kept
        assert_eq!(f(-0.0), 0x8000);
    }
    let hf: [Enc16; 2] = [scalar::f32_to_f16, f32_to_f16];
    for f in hf {
        assert_eq!(f(f32::from_bits(0x7f80_0001)), 0x7c01);
        assert_eq!(f(f32::from_bits(0x7fa0_0001)), 0x7d00);
        assert_eq!(f(f32::from_bits(0xffc0_0000)), 0xfe00);
        assert_eq!(f(65520.0), 0x7c00);
        assert_eq!(f(65519.0), 0x7bff);
        assert_eq!(f(-1e9), 0xfc00);
        assert_eq!(f(f32::NEG_INFINITY), 0xfc00);
        assert_eq!(f(pow2(-24)), 0x0001);
        assert_eq!(f(pow2(-25)), 0x0000); // tie → even (0)
        assert_eq!(f(1.5 * pow2(-24)), 0x0002); // tie → even
        assert_eq!(f(pow2(-25).next_up()), 0x0001);
        assert_eq!(f(1.0), 0x3c00);
        assert_eq!(f(-0.0), 0x8000);
    }
    let d16: [fn(u16) -> f32; 2] = [scalar::f16_to_f32, f16_to_f32];
    for f in d16 {
        assert_eq!(f(0x7c01).to_bits(), 0x7f80_2000);
        assert_eq!(f(0xfe00).to_bits(), 0xffc0_0000);
        assert_eq!(f(0x0001).to_bits(), pow2(-24).to_bits());
        assert_eq!(f(0x7bff).to_bits(), 65504f32.to_bits());
        assert_eq!(f(0x7c00).to_bits(), f32::INFINITY.to_bits());
    }
    assert_eq!(bf16_to_f32(0x3f80), 1.0);
}

// ---- exhaustive code tables ----

#[test]
fn fp8_all_codes() {
    let codes: Vec<u8> = (0..=255u8).collect();
    for c in 0..=255u8 {
        let r = scalar::fp8_to_f32(c);
        assert_eq!(fp8_to_f32(c).to_bits(), r.to_bits(), "decode {c:#x}");
        assert_eq!(scalar::f32_to_fp8(r), c, "scalar round trip {c:#x}");
        assert_eq!(f32_to_fp8(r), c, "fast round trip {c:#x}");
    }
    let mut want = vec![0f32; 256];
    scalar::decode(DType::F8E4M3, &codes, &mut want);
    for lv in available_levels() {
        let mut got = vec![0f32; 256];
        decode_at(lv, DType::F8E4M3, &codes, &mut got);
        same(&bits(&got), &bits(&want), &format!("{lv:?}"));
        // Quantizing the decoded codes: both 128-column blocks hold a NaN code (0x7f, 0xff),
        // so the scales are (positive) NaN and every code becomes NaN: x / NaN is the scale's
        // positive NaN, except for the NaN value 0xff itself, whose NaN (first operand) wins.
        let (mut gc, mut gs) = (vec![0u8; 256], vec![0f32; 2]);
        quantize_fp8_at(lv, &got, 256, &mut gc, &mut gs);
        let (mut wc, mut ws) = (vec![0u8; 256], vec![0f32; 2]);
        scalar::quantize_fp8(&want, 256, &mut wc, &mut ws);
        same(&gc, &wc, "quantize codes");
        same(&bits(&gs), &bits(&ws), "quantize scales");
        assert!(ws[0].is_nan() && ws[1].is_nan());
        for (c, q) in wc.iter().enumerate() {
            assert_eq!(*q, if c == 0xff { 0xff } else { 0x7f }, "{c:#x}");
        }
    }
}

#[test]
fn bf16_all_codes() {
    let mut bytes = Vec::new();
    for b in 0..=u16::MAX {
        let r = scalar::bf16_to_f32(b);
        assert_eq!(bf16_to_f32(b).to_bits(), r.to_bits());
        let want = if r.is_nan() { (b & 0x8000) | 0x7fc0 } else { b };
        assert_eq!(scalar::f32_to_bf16(r), want, "scalar {b:#x}");
        assert_eq!(f32_to_bf16(r), want, "fast {b:#x}");
        bytes.extend(b.to_le_bytes());
    }
    check_codec_slices(DType::BF16, &bytes);
}

#[test]
fn f16_all_codes() {
    let mut bytes = Vec::new();
    for b in 0..=u16::MAX {
        let r = scalar::f16_to_f32(b);
        assert_eq!(f16_to_f32(b).to_bits(), r.to_bits(), "decode {b:#x}");
        assert_eq!(scalar::f32_to_f16(r), b, "scalar round trip {b:#x}");
        assert_eq!(f32_to_f16(r), b, "fast round trip {b:#x}");
        bytes.extend(b.to_le_bytes());
    }
    check_codec_slices(DType::F16, &bytes);
}

/// decode + encode slices of every code at every level against the scalar reference.
fn check_codec_slices(dtype: DType, bytes: &[u8]) {
    let n = bytes.len() / dtype.size();
    let mut want = vec![0f32; n];
    scalar::decode(dtype, bytes, &mut want);
    let mut want_enc = vec![0u8; bytes.len()];
    scalar::encode(dtype, &want, &mut want_enc);
    for lv in available_levels() {
        let mut got = vec![0f32; n];
        decode_at(lv, dtype, bytes, &mut got);
        same(&bits(&got), &bits(&want), &format!("{dtype} {lv:?}"));
        let mut enc = vec![0u8; bytes.len()];
        encode_at(lv, dtype, &got, &mut enc);
        same(&enc, &want_enc, &format!("{dtype} {lv:?}"));
    }
}

// ---- element encoders: edge values, random bits, independent oracle ----

fn check_encoders(xs: &[f32]) {
    for &x in xs {
        assert_eq!(
            f32_to_fp8(x),
            scalar::f32_to_fp8(x),
            "fp8 {:#x}",
            x.to_bits()
        );
        assert_eq!(
            f32_to_bf16(x),
            scalar::f32_to_bf16(x),
            "bf16 {:#x}",
            x.to_bits()
        );
        assert_eq!(
            f32_to_f16(x),
            scalar::f32_to_f16(x),
            "f16 {:#x}",
            x.to_bits()
        );
    }
    for lv in available_levels() {
        for dt in OUT_DTYPES {
            let mut want = vec![0u8; xs.len() * dt.size()];
            scalar::encode(*dt, xs, &mut want);
            let mut got = vec![0u8; xs.len() * dt.size()];
            encode_at(lv, *dt, xs, &mut got);
            same(&got, &want, &format!("{dt} {lv:?}"));
        }
        // FP8 element encoding through the quantizer with scale 1 (amax = 0 is impossible
        // here, so use a column of 448 to pin the scale to 1 where possible).
    }
}

#[test]
fn encoders_edge_values() {
    check_encoders(&edge_f32());
}

/// Quotients near FP8 rounding midpoints (where a multiply by 1/scale would differ).
#[test]
fn quantize_near_midpoints() {
    let mut rng = Rng(29);
    let mids: Vec<f64> = (0..0x7eu8)
        .map(|c| (scalar::fp8_to_f32(c) as f64 + scalar::fp8_to_f32(c + 1) as f64) / 2.0)
        .chain([464.0, 472.0, 3.0 * 2f64.powi(-10), 2f64.powi(-6)])
        .collect();
    let mut differ = 0;
    for _ in 0..300 {
        let scale = f32::from_bits(rng.u32() % 0x4000_0000 + 0x2000_0000).abs();
        let mut acc = Vec::with_capacity(4096);
        while acc.len() < 4096 {
            let m = mids[rng.below(mids.len())];
            let x = (m * scale as f64) as f32;
            let k = rng.below(41) as i32 - 20;
            let x = f32::from_bits((x.to_bits() as i32 + k) as u32);
            acc.push(if rng.below(2) == 0 { x } else { -x });
        }
        // Pin the block scale to `scale` with one element of |x| = 448·scale per block.
        let cols = 4096;
        let mut want = vec![0u8; cols];
        for (w, x) in want.iter_mut().zip(&acc) {
            *w = scalar::f32_to_fp8(*x / scale);
        }
        let r = 1.0 / scale;
        differ += want
            .iter()
            .zip(&acc)
            .filter(|(w, x)| **w != scalar::f32_to_fp8(**x * r))
            .count();
        for lv in available_levels() {
            let mut got = vec![0u8; cols];
            quant_mv_probe(lv, &acc, scale, &mut got);
            same(&got, &want, &format!("scale {scale:e} {lv:?}"));
        }
    }
    // The data does hit quotients where x × (1/scale) rounds differently.
    assert!(differ > 0);
}

#[test]
fn encoders_random_bits() {
    let mut rng = Rng(1);
    check_encoders(&random_f32(&mut rng, 200_000));
}

#[test]
fn scalar_matches_nearest_oracle() {
    let mut fp8: Vec<(f64, u32)> = (0..0x7fu32)
        .map(|c| (scalar::fp8_to_f32(c as u8) as f64, c))
        .collect();
    fp8.push((480.0, 0x7f));
    let mut bf: Vec<(f64, u32)> = (0..0x7f80u32)
        .map(|c| (scalar::bf16_to_f32(c as u16) as f64, c))
        .collect();
    bf.push((2f64.powi(128), 0x7f80));
    let mut hf: Vec<(f64, u32)> = (0..0x7c00u32)
        .map(|c| (scalar::f16_to_f32(c as u16) as f64, c))
        .collect();
    hf.push((65536.0, 0x7c00));
    let mut rng = Rng(7);
    let mut xs = edge_f32();
    xs.extend(random_f32(&mut rng, 100_000));
    // Random values in the FP8 and F16 ranges too (random bits are mostly huge or tiny).
    xs.extend((0..100_000).map(|_| rng.value(1000.0) * pow2(rng.below(40) as i32 - 30)));
    for x in xs.into_iter().filter(|x| x.is_finite()) {
        let a = (x as f64).abs();
        let s8 = if x.is_sign_negative() { 0x80 } else { 0 };
        let s16 = if x.is_sign_negative() { 0x8000 } else { 0 };
        if a < 480.0 {
            assert_eq!(
                scalar::f32_to_fp8(x) as u32,
                s8 | nearest(&fp8, a),
                "fp8 {x:e}"
            );
        }
        assert_eq!(
            scalar::f32_to_bf16(x) as u32,
            s16 | nearest(&bf, a),
            "bf16 {x:e}"
        );
        if a < 65536.0 {
            assert_eq!(
                scalar::f32_to_f16(x) as u32,
                s16 | nearest(&hf, a),
                "f16 {x:e}"
            );
        } else {
            assert_eq!(scalar::f32_to_f16(x), s16 as u16 | 0x7c00);
        }
    }
}

/// Every f32 bit pattern through the fast encoders at every level against the scalar
/// reference (about a minute in release: run with `--ignored`).
#[test]
#[ignore]
fn encoders_all_f32() {
    std::thread::scope(|s| {
        for t in 0..4u64 {
            s.spawn(move || {
                let lo = t << 30;
                let mut buf = vec![0f32; 1 << 16];
                let mut want8 = vec![0u8; 1 << 16];
                let mut got8 = vec![0u8; 1 << 16];
                let mut want16 = vec![0u8; 2 << 16];
                let mut got16 = vec![0u8; 2 << 16];
                for base in (lo..lo + (1 << 30)).step_by(1 << 16) {
                    for (i, v) in buf.iter_mut().enumerate() {
                        *v = f32::from_bits((base + i as u64) as u32);
                    }
                    for (w, x) in want8.iter_mut().zip(&buf) {
                        *w = scalar::f32_to_fp8(*x);
                    }
                    for lv in available_levels() {
                        // x / 1.0 == x (NaNs only get quieted, which FP8 ignores).
                        quant_mv_probe(lv, &buf, 1.0, &mut got8);
                        assert_eq!(got8, want8, "fp8 at {base:#x} {lv:?}");
                    }
                    for dt in [DType::BF16, DType::F16] {
                        scalar::encode(dt, &buf, &mut want16);
                        for lv in available_levels() {
                            encode_at(lv, dt, &buf, &mut got16);
                            assert_eq!(got16, want16, "{dt} at {base:#x} {lv:?}");
                        }
                    }
                }
            });
        }
    });
}

// ---- slice kernels at every level ----

/// A copy of `b` starting at an odd address (the kernels must not assume alignment).
fn unaligned(b: &[u8]) -> (Vec<u8>, usize) {
    let mut v = vec![0u8; b.len() + 1];
    v[1..].copy_from_slice(b);
    (v, 1)
}

fn random_bytes_for(rng: &mut Rng, dt: DType, n: usize, special: bool) -> Vec<u8> {
    if special {
        return rng.bytes(n * dt.size());
    }
    // Mostly realistic values, encoded in the dtype.
    let vals: Vec<f32> = (0..n).map(|_| rng.value(0.2)).collect();
    let mut out = vec![0u8; n * dt.size()];
    match dt {
        DType::F8E4M3 => {
            for (o, v) in out.iter_mut().zip(&vals) {
                *o = scalar::f32_to_fp8(v * 2000.0);
            }
        }
        _ => scalar::encode(dt, &vals, &mut out),
    }
    out
}

#[test]
fn decode_encode_scale_add_lengths() {
    let mut rng = Rng(3);
    for &n in LENGTHS {
        for &dt in DTYPES {
            for special in [false, true] {
                let src = random_bytes_for(&mut rng, dt, n, special);
                let (buf, off) = unaligned(&src);
                let src_u = &buf[off..];
                let mut want = vec![0f32; n];
                scalar::decode(dt, &src, &mut want);
                for lv in available_levels() {
                    let mut got = vec![0f32; n];
                    decode_at(lv, dt, src_u, &mut got);
                    same(
                        &bits(&got),
                        &bits(&want),
                        &format!("decode {dt} n={n} {lv:?}"),
                    );
                }
            }
        }
        let xs = random_f32(&mut rng, n);
        let ys: Vec<f32> = (0..n).map(|_| rng.value(3.0)).collect();
        for &dt in OUT_DTYPES {
            let mut want = vec![0u8; n * dt.size()];
            scalar::encode(dt, &xs, &mut want);
            for lv in available_levels() {
                let mut buf = vec![0u8; n * dt.size() + 1];
                encode_at(lv, dt, &xs, &mut buf[1..]);
                assert_eq!(&buf[1..], &want[..], "encode {dt} n={n} {lv:?}");
            }
        }
        for first in [true, false] {
            for w in [0.3f32, -1.7, 0.0, 1.0] {
                let mut want = ys.clone();
                scalar::scale_add(&mut want, w, &xs, first);
                for lv in available_levels() {
                    let mut got = ys.clone();
                    scale_add_at(lv, &mut got, w, &xs, first);
                    same(
                        &bits(&got),
                        &bits(&want),
                        &format!("scale_add n={n} {lv:?}"),
                    );
                }
            }
        }
    }
}

#[test]
fn sum_sq_diff_lengths_and_chunks() {
    let mut rng = Rng(5);
    for &n in LENGTHS.iter().chain(&[5000usize]) {
        let a: Vec<f32> = (0..n).map(|_| rng.value(2.0)).collect();
        let b: Vec<f32> = (0..n).map(|_| rng.value(2.0)).collect();
        let want = scalar::sum_sq_diff(&a, &b);
        for lv in available_levels() {
            let mut s = SqDiffAcc::new();
            s.add_at(lv, &a, &b);
            assert_eq!(s.sum().to_bits(), want.to_bits(), "n={n} {lv:?}");
            // Arbitrary chunking gives the same bits.
            let mut s = SqDiffAcc::new();
            let mut k = 0;
            while k < n {
                let m = (1 + rng.below(40)).min(n - k);
                s.add_at(lv, &a[k..k + m], &b[k..k + m]);
                k += m;
            }
            assert_eq!(s.count(), n as u64);
            assert_eq!(s.sum().to_bits(), want.to_bits(), "chunked n={n} {lv:?}");
        }
        assert_eq!(sum_sq_diff(&a, &b).to_bits(), want.to_bits());
    }
    // NaN propagates; inf − inf is NaN; equal infinities of opposite sign give inf.
    let a = [1.0, f32::NAN, 2.0];
    let b = [1.0, 0.0, 2.0];
    assert!(sum_sq_diff(&a, &b).is_nan());
    assert!(sum_sq_diff(&[f32::INFINITY], &[f32::INFINITY]).is_nan());
    assert_eq!(sum_sq_diff(&[f32::INFINITY], &[0.0]), f64::INFINITY);
    assert_eq!(sum_sq_diff(&[], &[]).to_bits(), 0f64.to_bits());
    assert_eq!(sum_sq_diff(&[3.0], &[1.0]), 4.0);
}

#[test]
fn sum_sq_diff_bytes_all_dtype_pairs() {
    let mut rng = Rng(11);
    for &n in LENGTHS.iter().chain(&[3000usize]) {
        for &da in DTYPES {
            for &db in DTYPES {
                let special = rng.below(4) == 0;
                let a = random_bytes_for(&mut rng, da, n, special);
                let b = random_bytes_for(&mut rng, db, n, false);
                let want = scalar::sum_sq_diff_bytes(da, &a, db, &b);
                let (ua, oa) = unaligned(&a);
                for lv in available_levels() {
                    let mut s = SqDiffAcc::new();
                    s.add_bytes_at(lv, da, &ua[oa..], db, &b);
                    assert_eq!(s.sum().to_bits(), want.to_bits(), "{da}/{db} n={n} {lv:?}");
                    let mut s = SqDiffAcc::new();
                    let mut k = 0;
                    while k < n {
                        let m = (1 + rng.below(1500)).min(n - k);
                        s.add_bytes_at(
                            lv,
                            da,
                            &a[k * da.size()..(k + m) * da.size()],
                            db,
                            &b[k * db.size()..(k + m) * db.size()],
                        );
                        k += m;
                    }
                    assert_eq!(
                        s.sum().to_bits(),
                        want.to_bits(),
                        "chunked {da}/{db} n={n} {lv:?}"
                    );
                }
                // The fused path equals the unfused composition of the public fast paths.
                let (mut x, mut y) = (vec![0f32; n], vec![0f32; n]);
                decode(da, &a, &mut x);
                decode(db, &b, &mut y);
                assert_eq!(
                    sum_sq_diff_bytes(da, &a, db, &b).to_bits(),
                    sum_sq_diff(&x, &y).to_bits()
                );
            }
        }
    }
}

#[test]
fn accumulate_lengths() {
    let mut rng = Rng(13);
    for &n in LENGTHS {
        for &dt in DTYPES {
            let special = rng.below(3) == 0;
            let src = random_bytes_for(&mut rng, dt, n, special);
            let (u, off) = unaligned(&src);
            let init: Vec<f32> = (0..n).map(|_| rng.value(1.0)).collect();
            for first in [true, false] {
                let w = rng.value(2.0);
                let mut want = init.clone();
                scalar::accumulate(dt, &src, None, w, &mut want, first);
                for lv in available_levels() {
                    let mut got = init.clone();
                    accumulate_at(lv, dt, &u[off..], None, w, &mut got, first);
                    same(
                        &bits(&got),
                        &bits(&want),
                        &format!("{dt} n={n} first={first} {lv:?}"),
                    );
                }
                // Unfused composition of the public fast paths.
                let mut d = vec![0f32; n];
                decode(dt, &src, &mut d);
                let mut comp = init.clone();
                scale_add(&mut comp, w, &d, first);
                same(&bits(&comp), &bits(&want), "");
            }
        }
    }
}

/// FP8 band data: codes and scales, with some special blocks.
fn fp8_band(rng: &mut Rng, rows: usize, cols: usize) -> (Vec<u8>, Vec<f32>) {
    // Any code (NaN included) only in every third block: a NaN makes its whole block NaN,
    // and the other blocks must stay finite for comparisons to see every difference.
    let codes: Vec<u8> = (0..rows * cols)
        .map(|i| {
            let any = ((i / cols) / 128 + (i % cols) / 128).is_multiple_of(3);
            match rng.below(50) {
                0 if any => rng.next() as u8,
                _ => scalar::f32_to_fp8(rng.value(600.0)),
            }
        })
        .collect();
    let nb = rows.div_ceil(128) * cols.div_ceil(128);
    let scales = (0..nb)
        .map(|i| match i % 7 {
            3 => pow2(-14),
            5 => f32::from_bits(rng.u32() & 0x3fff_ffff),
            _ => rng.value(1e-3).abs() + 1e-6,
        })
        .collect();
    (codes, scales)
}

/// An f32 band with special blocks: all zeros, a NaN, an inf, -0.0s, tiny values.
fn f32_band(rng: &mut Rng, rows: usize, cols: usize) -> Vec<f32> {
    let nbc = cols.div_ceil(128);
    let mut v: Vec<f32> = (0..rows * cols).map(|_| rng.value(0.05)).collect();
    for r in 0..rows {
        for c in 0..cols {
            let blk = (r / 128) * nbc + c / 128;
            let x = &mut v[r * cols + c];
            match blk % 6 {
                1 => *x = 0.0,
                2 if (r + c) % 97 == 5 => *x = -f32::NAN,
                2 if (r + c) % 89 == 3 => *x = f32::NAN,
                3 if (r * 7 + c) % 131 == 0 => *x = f32::NEG_INFINITY,
                4 => *x = if c % 2 == 0 { -0.0 } else { *x * 1e-38 },
                _ => {}
            }
        }
    }
    v
}

#[test]
fn fp8_bands() {
    let mut rng = Rng(17);
    for &(rows, cols) in SHAPES {
        let (codes, scales) = fp8_band(&mut rng, rows, cols);
        let n = rows * cols;
        let nb = scales.len();
        // dequant
        let mut want = vec![0f32; n];
        scalar::dequant_fp8(&codes, cols, &scales, &mut want);
        for lv in available_levels() {
            let mut got = vec![0f32; n];
            dequant_fp8_at(lv, &codes, cols, &scales, &mut got);
            same(
                &bits(&got),
                &bits(&want),
                &format!("dequant {rows}x{cols} {lv:?}"),
            );
        }
        // accumulate with scales
        let init: Vec<f32> = (0..n).map(|_| rng.value(1.0)).collect();
        for first in [true, false] {
            let mut want = init.clone();
            scalar::accumulate(
                DType::F8E4M3,
                &codes,
                Some((&scales, cols)),
                0.7,
                &mut want,
                first,
            );
            for lv in available_levels() {
                let mut got = init.clone();
                accumulate_at(
                    lv,
                    DType::F8E4M3,
                    &codes,
                    Some((&scales, cols)),
                    0.7,
                    &mut got,
                    first,
                );
                same(
                    &bits(&got),
                    &bits(&want),
                    &format!("accumulate {rows}x{cols} {lv:?}"),
                );
            }
            let mut d = vec![0f32; n];
            dequant_fp8(&codes, cols, &scales, &mut d);
            let mut comp = init.clone();
            scale_add(&mut comp, 0.7, &d, first);
            same(&bits(&comp), &bits(&want), "");
        }
        // quantize: special blocks, and realistic values
        for acc in [f32_band(&mut rng, rows, cols), want.clone()] {
            let mut wc = vec![0u8; n];
            let mut ws = vec![0f32; nb];
            scalar::quantize_fp8(&acc, cols, &mut wc, &mut ws);
            for lv in available_levels() {
                let mut gc = vec![0u8; n];
                let mut gs = vec![0f32; nb];
                quantize_fp8_at(lv, &acc, cols, &mut gc, &mut gs);
                same(&gc, &wc, &format!("quantize codes {rows}x{cols} {lv:?}"));
                same(
                    &bits(&gs),
                    &bits(&ws),
                    &format!("quantize scales {rows}x{cols} {lv:?}"),
                );
            }
        }
    }
}

#[test]
fn quantize_special_blocks() {
    // 130x300: blocks (0,0) all zero, (0,1) NaN, (0,2) inf, (1,0) normal, (1,1) -0.0 only,
    // (1,2) tiny f32 subnormals.
    let (rows, cols) = (130, 300);
    let mut acc = vec![0f32; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            let x = &mut acc[r * cols + c];
            *x = match (r / 128, c / 128) {
                (0, 0) => 0.0,
                (0, 1) if r == 5 && c == 200 => f32::NAN,
                (0, 1) => (c as f32 - 180.0) * 0.01,
                (0, 2) if r == 1 && c == 260 => f32::NEG_INFINITY,
                (0, 2) => 1.5,
                (1, 0) => (r * cols + c) as f32 * 1e-3 - 20.0,
                (1, 1) => -0.0,
                _ => f32::from_bits(((r + c) % 5) as u32) * if c % 2 == 0 { 1.0 } else { -1.0 },
            };
        }
    }
    let mut codes = vec![0u8; rows * cols];
    let mut scales = vec![0f32; 6];
    scalar::quantize_fp8(&acc, cols, &mut codes, &mut scales);
    assert_eq!(scales[0], 1.0);
    assert!(scales[1].is_nan() && scales[1].is_sign_positive());
    assert_eq!(codes[5 * cols + 200], 0x7f);
    assert_eq!(codes[5 * cols + 130], 0x7f); // x / NaN
    assert_eq!(scales[2], f32::INFINITY);
    assert_eq!(codes[cols + 260], 0xff); // -inf / inf = NaN (x86 default NaN is negative)
    assert_eq!(codes[0], 0);
    assert_eq!(scales[4], 1.0);
    assert_eq!(codes[128 * cols + 128], 0x80);
    // amax = 4 × 2^-149 is not 0, but amax / 448 underflows to 0: x / 0 → ±inf / NaN → NaN.
    assert_eq!(scales[5].to_bits(), 0);
    assert_eq!(codes[129 * cols + 257] & 0x7f, 0x7f);
    for lv in available_levels() {
        let mut gc = vec![0u8; rows * cols];
        let mut gs = vec![0f32; 6];
        quantize_fp8_at(lv, &acc, cols, &mut gc, &mut gs);
        same(&gc, &codes, &format!("{lv:?}"));
        same(&bits(&gs), &bits(&scales), &format!("{lv:?}"));
    }
    // amax == 448 → scale 1 → FP8 values re-encode to themselves.
    let vals: Vec<f32> = (0..=255u8)
        .map(fp8_to_f32)
        .filter(|x| !x.is_nan())
        .collect();
    let mut c = vec![0u8; vals.len()];
    let mut s = [0f32; 2];
    quantize_fp8(&vals, vals.len(), &mut c, &mut s);
    assert_eq!(s, [1.0, 1.0]);
    for (x, c) in vals.iter().zip(&c) {
        assert_eq!(x.to_bits(), fp8_to_f32(*c).to_bits());
    }
}

#[test]
fn mix_matches_reference_and_composition() {
    let mut rng = Rng(19);
    // Non-FP8 outputs over flat lengths (no FP8-scaled inputs: cols irrelevant) and over
    // bands (FP8 inputs with scales).
    let mut cases: Vec<(usize, usize)> = LENGTHS.iter().map(|&n| (1, n)).collect();
    cases.extend_from_slice(SHAPES);
    cases.push((1, 5000));
    cases.push((20, 4099));
    for &(rows, cols) in &cases {
        let n = rows * cols;
        for k in 1..=3usize {
            // Inputs of random dtypes.
            let mut owned: Vec<OwnedInput> = Vec::new();
            for _ in 0..k {
                let dt = DTYPES[rng.below(4)];
                let w = if rng.below(5) == 0 {
                    1.0
                } else {
                    rng.value(1.5)
                };
                if dt == DType::F8E4M3 && rng.below(4) != 0 {
                    let (c, s) = fp8_band(&mut rng, rows, cols);
                    owned.push((dt, c, Some(s), w));
                } else {
                    let special = rng.below(5) == 0;
                    owned.push((dt, random_bytes_for(&mut rng, dt, n, special), None, w));
                }
            }
            let inputs: Vec<MixInput> = owned
                .iter()
                .map(|(dt, b, s, w)| MixInput {
                    dtype: *dt,
                    bytes: b,
                    scales: s.as_deref(),
                    weight: *w,
                })
                .collect();
            for out_dt in [DType::BF16, DType::F16, DType::F32, DType::F8E4M3] {
                let size = out_dt.size();
                let nb = rows.div_ceil(128) * cols.div_ceil(128);
                let fp8 = out_dt == DType::F8E4M3;
                let mut want = vec![0u8; n * size];
                let mut want_s = vec![0f32; nb];
                scalar::mix(
                    &inputs,
                    cols,
                    out_dt,
                    &mut want,
                    fp8.then_some(&mut want_s[..]),
                );
                for (lv, vbmi, lvs) in level_configs() {
                    let mut got = vec![0u8; n * size + 1];
                    let mut got_s = vec![0f32; nb];
                    with_vbmi(vbmi, || {
                        mix_at(
                            lv,
                            &inputs,
                            cols,
                            out_dt,
                            &mut got[1..],
                            fp8.then_some(&mut got_s[..]),
                        )
                    });
                    same(
                        &got[1..],
                        &want[..],
                        &format!("mix {rows}x{cols} k={k} -> {out_dt} {lvs}"),
                    );
                    if fp8 {
                        same(
                            &bits(&got_s),
                            &bits(&want_s),
                            &format!("mix scales {rows}x{cols} {lvs}"),
                        );
                    }
                }
                // Composition of the unfused public fast paths.
                let mut acc = vec![0f32; n];
                for (i, p) in inputs.iter().enumerate() {
                    accumulate(
                        p.dtype,
                        p.bytes,
                        p.scales.map(|s| (s, cols)),
                        p.weight,
                        &mut acc,
                        i == 0,
                    );
                }
                let mut comp = vec![0u8; n * size];
                let mut comp_s = vec![0f32; nb];
                if fp8 {
                    quantize_fp8(&acc, cols, &mut comp, &mut comp_s);
                    same(&bits(&comp_s), &bits(&want_s), "");
                } else {
                    encode(out_dt, &acc, &mut comp);
                }
                same(
                    &comp,
                    &want,
                    &format!("composition {rows}x{cols} -> {out_dt}"),
                );
            }
        }
    }
}

/// `mix` with FP8 parents (with scales, some NaN/inf/0/huge) → FP8 child.
#[test]
fn mix_all_fp8() {
    let mut rng = Rng(31);
    let mut shapes = SHAPES.to_vec();
    shapes.push((300, 2100));
    for &(rows, cols) in &shapes {
        for k in 1..=3usize {
            let owned: Vec<(Vec<u8>, Vec<f32>, f32)> = (0..k)
                .map(|_| {
                    let (c, mut s) = fp8_band(&mut rng, rows, cols);
                    if rng.below(4) == 0 {
                        let i = rng.below(s.len());
                        s[i] = [f32::NAN, f32::INFINITY, 0.0, 2f32.powi(121)][rng.below(4)];
                    }
                    (c, s, rng.value(1.5))
                })
                .collect();
            let inputs: Vec<MixInput> = owned
                .iter()
                .map(|(c, s, w)| MixInput {
                    dtype: DType::F8E4M3,
                    bytes: c,
                    scales: Some(s),
                    weight: *w,
                })
                .collect();
            let nb = rows.div_ceil(128) * cols.div_ceil(128);
            let mut want = vec![0u8; rows * cols];
            let mut want_s = vec![0f32; nb];
            scalar::mix(&inputs, cols, DType::F8E4M3, &mut want, Some(&mut want_s));
            for (lv, vbmi, lvs) in level_configs() {
                let mut got = vec![0u8; rows * cols];
                let mut got_s = vec![0f32; nb];
                with_vbmi(vbmi, || {
                    mix_at(lv, &inputs, cols, DType::F8E4M3, &mut got, Some(&mut got_s))
                });
                same(&got, &want, &format!("{rows}x{cols} k={k} {lvs}"));
                same(
                    &bits(&got_s),
                    &bits(&want_s),
                    &format!("scales {rows}x{cols} k={k} {lvs}"),
                );
            }
        }
    }
}

#[test]
fn mix_two_fp8_parents_takes_the_fused_path_exactly() {
    // A machine with VBMI must take the fused kernel (unless told not to): fail, not skip.
    #[cfg(target_arch = "x86_64")]
    if available_levels().contains(&SimdLevel::Avx512)
        && is_x86_feature_detected!("avx512vbmi")
        && std::env::var("AOE_KERNELS").ok().as_deref().map(str::trim) != Some("avx512-novbmi")
    {
        assert!(
            vbmi_enabled(),
            "this CPU has AVX-512 VBMI but the fused path is off"
        );
    }
    let mut fused_runs = 0usize;
    // Finite codes and normal scales, so that every block's result is finite and any
    // difference in the fused two-parent pass shows in codes or scales.
    let mut rng = Rng(77);
    for &(rows, cols) in &[
        (128usize, 128usize),
        (256, 300),
        (130, 1000),
        (1, 7),
        (130, 4500),
    ] {
        let nb = rows.div_ceil(128) * cols.div_ceil(128);
        let owned: Vec<(Vec<u8>, Vec<f32>)> = (0..2)
            .map(|_| {
                let c = (0..rows * cols)
                    .map(|_| scalar::f32_to_fp8(rng.value(400.0)))
                    .collect();
                let s = (0..nb).map(|_| rng.value(1e-2).abs() + 1e-4).collect();
                (c, s)
            })
            .collect();
        let inputs: Vec<MixInput> = owned
            .iter()
            .zip([0.3f32, 0.7])
            .map(|((c, s), w)| MixInput {
                dtype: DType::F8E4M3,
                bytes: c,
                scales: Some(s),
                weight: w,
            })
            .collect();
        let mut want = vec![0u8; rows * cols];
        let mut want_s = vec![0f32; nb];
        scalar::mix(&inputs, cols, DType::F8E4M3, &mut want, Some(&mut want_s));
        for (lv, vbmi, lvs) in level_configs() {
            let mut got = vec![0u8; rows * cols];
            let mut got_s = vec![0f32; nb];
            VBMI_BANDS.with(|n| n.set(0));
            with_vbmi(vbmi, || {
                mix_at(lv, &inputs, cols, DType::F8E4M3, &mut got, Some(&mut got_s))
            });
            let bands = VBMI_BANDS.with(|n| n.get());
            same(&got, &want, &format!("{rows}x{cols} {lvs}"));
            same(
                &bits(&got_s),
                &bits(&want_s),
                &format!("scales {rows}x{cols} {lvs}"),
            );
            // Every block row goes through the fused kernel where it runs, and none elsewhere.
            let fused = lv == SimdLevel::Avx512 && vbmi && vbmi_enabled();
            let want_bands = if fused { rows.div_ceil(128) } else { 0 };
            assert_eq!(
                bands, want_bands,
                "fused VBMI block rows, {rows}x{cols} {lvs}"
            );
            fused_runs += fused as usize;
        }
    }
    if fused_runs == 0 {
        // Not a pass: the fused kernel was not exercised at all.
        eprintln!(
            "skipped: no AVX-512 VBMI on this machine (or AOE_KERNELS disables it): \
             mix_two_fp8_parents_takes_the_fused_path_exactly only checked the other paths"
        );
    }
}

/// The fused two-FP8-parent pass (VBMI table decode on AVX-512) on every pair of codes,
/// NaN codes included, under special scales and weights: NaN × NaN pairs of opposite
/// signs pin the first-operand rule (the sign of a NaN shows in its FP8 code), and a
/// second run without NaN codes keeps every block finite so that any value differs.
#[test]
fn mix_two_fp8_parents_all_code_pairs() {
    let (rows, cols) = (256usize, 640usize); // 2 block rows × 5 column blocks, 2 tiles
    let n = rows * cols;
    let nb = 2 * 5;
    let specials = [
        1.0f32,
        -2.5e-3,
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NAN,
        f32::MIN_POSITIVE,
        1e-42,
        2f32.powi(121),
        f32::MAX,
    ];
    let mut rng = Rng(91);
    for nan_codes in [true, false] {
        // Row r, column c: a = (r·cols + c) mod 256, b = its index / 256 mod 256, so
        // every block row holds every (a, b) pair.
        let fix = |c: u8| {
            if nan_codes || c & 0x7f != 0x7f {
                c
            } else {
                c ^ 1
            }
        };
        let a: Vec<u8> = (0..n).map(|i| fix(i as u8)).collect();
        let b: Vec<u8> = (0..n).map(|i| fix((i / 256) as u8)).collect();
        for round in 0..6 {
            let mut scales = |k: usize| -> Vec<f32> {
                (0..nb)
                    .map(|i| match (i + k + round) % 4 {
                        0 => specials[rng.below(specials.len())],
                        _ => rng.value(1e-2).abs() + 1e-5,
                    })
                    .collect()
            };
            let (sa, sb) = (scales(0), scales(1));
            // (Weights are never NaN: the callers' contract.)
            let weights = [
                (0.4f32, 0.6f32),
                (-1.5, 0.0),
                (1.0, 1.0),
                (0.0, -0.0),
                (-0.0, 3.0),
            ];
            let (wa, wb) = weights[round % weights.len()];
            let inputs = [
                MixInput {
                    dtype: DType::F8E4M3,
                    bytes: &a,
                    scales: Some(&sa),
                    weight: wa,
                },
                MixInput {
                    dtype: DType::F8E4M3,
                    bytes: &b,
                    scales: Some(&sb),
                    weight: wb,
                },
            ];
            let mut want = vec![0u8; n];
            let mut want_s = vec![0f32; nb];
            scalar::mix(&inputs, cols, DType::F8E4M3, &mut want, Some(&mut want_s));
            for (lv, vbmi, lvs) in level_configs() {
                let mut got = vec![0u8; n];
                let mut got_s = vec![0f32; nb];
                with_vbmi(vbmi, || {
                    mix_at(lv, &inputs, cols, DType::F8E4M3, &mut got, Some(&mut got_s))
                });
                let what = format!("nan codes {nan_codes} round {round} {lvs}");
                same(&got, &want, &what);
                same(&bits(&got_s), &bits(&want_s), &what);
            }
        }
    }
}

#[test]
fn mix_bf16_two_parents_known() {
    // 0.4·1 + 0.6·2 = 1.6 → BF16 RNE.
    let a = [0x80u8, 0x3f]; // 1.0
    let b = [0x00u8, 0x40]; // 2.0
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
    let mut out = [0u8; 2];
    mix(&inputs, 1, DType::BF16, &mut out, None);
    let v = 0.4f32 * 1.0 + 0.6f32 * 2.0;
    assert_eq!(u16::from_le_bytes(out), scalar::f32_to_bf16(v));
}

/// Every FP8 code times awkward scales (the x86 paths decode through the F16 converter
/// with 256·s, and fall back when 256·s overflows).
#[test]
fn fp8_dequant_all_codes_all_scales() {
    let mut codes = Vec::new();
    for _ in 0..3 {
        codes.extend(0..=255u8); // 768 codes = 6 column blocks of one row
    }
    let scales_list: Vec<f32> = [
        1.0,
        -1.0,
        0.0,
        -0.0,
        1e-3,
        3.0e-4,
        f32::MIN_POSITIVE,
        1e-40,
        1e-45,
        2f32.powi(119),
        2f32.powi(120),
        2f32.powi(121),
        f32::MAX,
        -f32::MAX,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::from_bits(0xffc0_0123),
        f32::from_bits(0x7f80_0001),
        1.7e38,
        0.5,
        448.0,
    ]
    .to_vec();
    for sc in scales_list.chunks(6) {
        let mut sc = sc.to_vec();
        sc.resize(6, 0.25);
        let mut want = vec![0f32; codes.len()];
        scalar::dequant_fp8(&codes, codes.len(), &sc, &mut want);
        for lv in available_levels() {
            let mut got = vec![0f32; codes.len()];
            dequant_fp8_at(lv, &codes, codes.len(), &sc, &mut got);
            same(&bits(&got), &bits(&want), &format!("{sc:?} {lv:?}"));
            for w in [0.3f32, -1.0] {
                let init: Vec<f32> = (0..codes.len()).map(|i| i as f32 * 0.01).collect();
                let mut acc_want = init.clone();
                scalar::accumulate(
                    DType::F8E4M3,
                    &codes,
                    Some((&sc, codes.len())),
                    w,
                    &mut acc_want,
                    false,
                );
                let mut acc = init.clone();
                accumulate_at(
                    lv,
                    DType::F8E4M3,
                    &codes,
                    Some((&sc, codes.len())),
                    w,
                    &mut acc,
                    false,
                );
                same(
                    &bits(&acc),
                    &bits(&acc_want),
                    &format!("accumulate {sc:?} {lv:?}"),
                );
            }
        }
    }
}

#[test]
fn nan_first_operand_wins() {
    let neg = f32::from_bits(0xffc0_0001);
    let pos = f32::from_bits(0x7fc0_0002);
    let (a, b) = (neg.to_le_bytes(), pos.to_le_bytes());
    for lv in available_levels() {
        for (x, y, want) in [(&a, &b, 0xffc0u16), (&b, &a, 0x7fc0)] {
            let inputs = [
                MixInput {
                    dtype: DType::F32,
                    bytes: x,
                    scales: None,
                    weight: 0.5,
                },
                MixInput {
                    dtype: DType::F32,
                    bytes: y,
                    scales: None,
                    weight: 0.5,
                },
            ];
            let mut out = [0u8; 2];
            mix_at(lv, &inputs, 1, DType::BF16, &mut out, None);
            assert_eq!(u16::from_le_bytes(out), want, "{lv:?}");
            let mut out4 = [0u8; 4];
            mix_at(lv, &inputs, 1, DType::F32, &mut out4, None);
            let acc = f32::from_le_bytes(out4).to_bits();
            assert_eq!(acc >> 31, (want >> 15) as u32, "{lv:?}");
        }
        // NaN code × NaN scale keeps the code's NaN.
        let mut out = [0f32; 2];
        dequant_fp8_at(
            lv,
            &[0xff, 0x38],
            2,
            &[f32::from_bits(0x7fc0_0123)],
            &mut out,
        );
        assert_eq!(out[0].to_bits(), 0xffc0_0000, "{lv:?}");
        assert_eq!(out[1].to_bits(), 0x7fc0_0123, "{lv:?}");
    }
    let mut out = [0f32; 2];
    scalar::dequant_fp8(&[0xff, 0x38], 2, &[f32::from_bits(0x7fc0_0123)], &mut out);
    assert_eq!(out[0].to_bits(), 0xffc0_0000);
}

#[test]
#[should_panic(expected = "length mismatch")]
fn decode_length_mismatch_panics() {
    let mut out = [0f32; 2];
    decode(DType::BF16, &[0u8; 3], &mut out);
}

#[test]
#[should_panic(expected = "block scales")]
fn dequant_wrong_scales_panics() {
    let mut out = [0f32; 256];
    dequant_fp8(&[0u8; 256], 256, &[1.0], &mut out); // 1 row, 2 column blocks
}
