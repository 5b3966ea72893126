//! Numeric kernels of child synthesis: BF16/F16/F32/FP8-E4M3FN ⇄ f32 codecs, FP8 block
//! (de)quantization, the weighted mix and the difference statistic.
//!
//! Every kernel has a plain scalar reference in [`scalar`] and a fast path at module top level;
//! the two agree to the bit (the tests check it on all 8- and 16-bit codes, edge values and
//! random bit patterns, on every SIMD level the machine has).
//!
//! # Exact semantics (DESIGN.md §4; they match numpy + ml_dtypes)
//!
//! * FP8 E4M3FN decode is exact (subnormals `m × 2^-9`, `0x7f`/`0xff` → quiet NaN with the code's
//!   sign, `0x80` → −0.0). Encode rounds to nearest even on the exact f32 value (into subnormals
//!   too); magnitudes that round above 448 (everything above 464; 464 itself ties to 448), ±inf
//!   and NaN become NaN keeping the sign: `0x7f` / `0xff`.
//! * BF16: decode `bits << 16`; encode round-to-nearest-even, overflow rounds to ±inf, subnormals
//!   kept, NaN → `0x7fc0` / `0xffc0` (sign kept, payload dropped).
//! * F16 (numpy): decode exact, NaN payload kept; encode round-to-nearest-even, subnormals kept,
//!   overflow → ±inf, NaN → `sign | 0x7c00 | (mantissa >> 13)`, or `| 1` if that is zero.
//! * F32: little-endian bytes as they are.
//! * Arithmetic: one f32 multiply per product, one f32 add per sum, in the documented operand
//!   order, never a fused multiply-add (Rust does not contract `a * b + c`; no kernel uses
//!   `mul_add` or FMA intrinsics).
//!
//! All byte slices are read and written as little-endian, element by element: they may be
//! unaligned (mmaps of untrusted files), nothing is ever cast to `&[f32]`/`&[u16]`.
//!
//! # NaN and order
//!
//! * FP8 block `amax` is the largest `|x|` bit pattern of the block (`bits & 0x7fff_ffff`), so any
//!   NaN makes the amax NaN (np.max semantics); if a block holds several NaNs the amax is the one
//!   with the largest payload. `scale = amax / 448` (then NaN too), `scale = 1` where amax == 0.
//! * NaN signs and payloads are pinned wherever they can reach the output bytes: an operation
//!   with one NaN operand returns it (quieted, as all IEEE hardware does); where both operands
//!   may be NaN the FIRST operand's NaN wins, which is what x86 `addps/mulps/divps a, b` (and so
//!   numpy) do. `acc + w·d` and `code × scale` select it explicitly (LLVM may swap the operands
//!   of a commutative `+`/`*`, so this is not left to the instruction); `acc / scale` is not
//!   commutative and keeps `acc`'s NaN on x86. Weights are assumed not NaN. A NaN made from
//!   non-NaN operands (inf − inf, 0 × inf, inf / inf) is the hardware's default NaN (x86:
//!   negative, `0xffc0_0000`; numpy on x86 gets the same). The encoders then apply the rules
//!   above (BF16 keeps only the sign, FP8 the sign, F16 sign and payload).
//! * A block whose amax is not 0 but so small that `amax / 448` underflows to 0 (|x| ≤ ~6e-43)
//!   gets scale 0 and NaN codes, exactly as the formula (and numpy) gives.
//! * [`sum_sq_diff`] sums `d*d` (d = a−b in f64) into 8 f64 lanes by *global* element index mod
//!   8, combined as `((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7))`, on every machine and SIMD level;
//!   [`SqDiffAcc`] keeps that order across chunks of any size. A NaN sum is returned as the
//!   canonical `f64::NAN` (its payload would otherwise depend on operand order).
//!
//! # Dispatch and speed
//!
//! The fast paths are safe portable Rust written for LLVM's auto-vectorizer (fixed-size
//! 64-element chunk arrays, branchless selects). On x86_64 the same code is also compiled with
//! AVX2+F16C and with AVX-512 (F+BW+VL) enabled, chosen once at run time with
//! `is_x86_feature_detected!`; there, FP8 codes are decoded through the F16 converter
//! (`vcvtph2ps`, see `x86`). The environment variable `AOE_KERNELS=portable|avx2` caps the
//! level (to exercise the fallbacks); results are identical on every level.
//!
//! [`mix`] is the fused hot path: it decodes, (de)quantizes, mixes and encodes in L1/L2-sized
//! tiles (512 elements; FP8 output: 128 rows × 512 columns in a reused 256 KiB thread-local
//! scratch, rows read as runs with software prefetch) and never materializes a full f32 copy.
//! Its common case, two FP8 parents with block scales into FP8, has one fused kernel on
//! AVX-512 with VBMI (`x86::mix2_fp8_band_vbmi`: table decode, two passes over each block
//! row, no f32 scratch; `AOE_KERNELS=avx512-novbmi` turns it off).
//! `benches/kernels.rs` measures it against memcpy.

#![allow(clippy::needless_range_loop)]

use crate::dtype::DType;
use std::sync::atomic::{AtomicU8, Ordering};

/// Side of the square FP8 scaling blocks (DeepSeek `weight_block_size: [128, 128]`).
pub const FP8_BLOCK: usize = 128;
/// Largest finite FP8 E4M3FN value.
pub const FP8_MAX: f32 = 448.0;

// ---------------------------------------------------------------------------------------------
// Element conversions (branchless: the same code runs in every SIMD lane)
// ---------------------------------------------------------------------------------------------

/// FP8 E4M3FN code → f32 (exact; `0x7f`/`0xff` → quiet NaN with sign).
#[inline(always)]
pub const fn fp8_to_f32(code: u8) -> f32 {
    let c = code as u32;
    let mag = c & 0x7f;
    // Normal codes: move exponent+mantissa into place and rebias (7 → 127).
    let normal = (mag << 20) + 0x3c00_0000;
    // Subnormal codes (mag < 8): m × 2^-9, an exact int→float conversion and power-of-two scale.
    let sub = ((mag as i32) as f32 * (1.0 / 512.0)).to_bits();
    let v = if mag == 0x7f {
        0x7fc0_0000
    } else if mag < 8 {
        sub
    } else {
        normal
    };
    f32::from_bits(v | ((c & 0x80) << 24))
}

/// f32 → FP8 E4M3FN, round-to-nearest-even; |x| > 464, ±inf, NaN → NaN (`0x7f`/`0xff`).
#[inline(always)]
pub fn f32_to_fp8(x: f32) -> u8 {
    let b = x.to_bits();
    let a = b & 0x7fff_ffff;
    // Normal results (|x| >= 2^-6): round the mantissa to 3 bits, nearest even, then rebias.
    let normal = (a.wrapping_add(0x7_ffff + ((a >> 20) & 1)) >> 20).wrapping_sub(0x3c0);
    // Subnormal results: adding 2^14 makes the FPU round |x| to a multiple of 2^-9 (RNE);
    // the low mantissa bits are then the count of 2^-9 (8 = the smallest normal, correct).
    let sub = (f32::from_bits(a) + 16384.0)
        .to_bits()
        .wrapping_sub(0x4680_0000);
    let v = if a > 0x43e8_0000 {
        0x7f // above 464 (incl. inf and NaN)
    } else if a >= 0x3c80_0000 {
        normal
    } else {
        sub
    };
    (v | ((b >> 24) & 0x80)) as u8
}

/// BF16 bits → f32 (exact).
#[inline(always)]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// f32 → BF16 bits, round-to-nearest-even; NaN → `0x7fc0`/`0xffc0`.
#[inline(always)]
pub fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    let r = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    let v = if (b & 0x7fff_ffff) > 0x7f80_0000 {
        ((b >> 16) & 0x8000) | 0x7fc0
    } else {
        r
    };
    v as u16
}

/// IEEE half bits → f32 (exact; NaN payload kept as numpy does).
#[inline(always)]
pub fn f16_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let mag = h & 0x7fff;
    let normal = (mag << 13) + 0x3800_0000;
    let sub = ((mag as i32) as f32 * (1.0 / 16_777_216.0)).to_bits();
    let infnan = (mag << 13) | 0x7f80_0000;
    let v = if mag >= 0x7c00 {
        infnan
    } else if mag < 0x400 {
        sub
    } else {
        normal
    };
    f32::from_bits(v | ((h & 0x8000) << 16))
}

/// f32 → IEEE half bits as numpy's `astype(float16)`: RNE, subnormals kept, overflow → ±inf,
/// NaN → `sign | 0x7c00 | (mantissa >> 13)` (`| 1` if that would be inf).
#[inline(always)]
pub fn f32_to_f16(x: f32) -> u16 {
    let b = x.to_bits();
    let a = b & 0x7fff_ffff;
    let normal = (a.wrapping_add(0xfff + ((a >> 13) & 1)) >> 13).wrapping_sub(0x1_c000);
    // |x| < 2^-14: adding 0.5 rounds |x| to a multiple of 2^-24 (RNE).
    let sub = (f32::from_bits(a) + 0.5)
        .to_bits()
        .wrapping_sub(0x3f00_0000);
    let p = (a >> 13) & 0x3ff;
    let nan = 0x7c00 | p | (p == 0) as u32;
    let v = if a > 0x7f80_0000 {
        nan
    } else if a >= 0x4780_0000 {
        0x7c00
    } else if a >= 0x3880_0000 {
        normal
    } else {
        sub
    };
    (v | ((b >> 16) & 0x8000)) as u16
}

// ---------------------------------------------------------------------------------------------
// SIMD level and dispatch
// ---------------------------------------------------------------------------------------------

/// Instruction set level the fast paths run at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimdLevel {
    /// Baseline of the target (SSE2 on x86_64), auto-vectorized.
    Portable,
    /// x86_64 AVX2 (+ F16C).
    Avx2,
    /// x86_64 AVX-512 F+BW+VL (+ AVX2, F16C).
    Avx512,
}

static LEVEL: AtomicU8 = AtomicU8::new(0);

/// Compile-time level of a kernel instance (the `const LV: u8` of the generic kernels).
const LV_PORTABLE: u8 = 0;
const LV_AVX2: u8 = 1;
const LV_AVX512: u8 = 2;

/// The level the fast paths use on this machine (detected once; capped by `AOE_KERNELS`).
pub fn simd_level() -> SimdLevel {
    match LEVEL.load(Ordering::Relaxed) {
        1 => SimdLevel::Portable,
        2 => SimdLevel::Avx2,
        3 => SimdLevel::Avx512,
        _ => {
            let cap = std::env::var("AOE_KERNELS").ok();
            let mut l = best_level();
            match cap.as_deref().map(str::trim) {
                Some("portable") | Some("scalar") => l = SimdLevel::Portable,
                Some("avx2") if l == SimdLevel::Avx512 => l = SimdLevel::Avx2,
                _ => {}
            }
            let v = match l {
                SimdLevel::Portable => 1,
                SimdLevel::Avx2 => 2,
                SimdLevel::Avx512 => 3,
            };
            LEVEL.store(v, Ordering::Relaxed);
            l
        }
    }
}

/// Whether the AVX-512 level may also use VBMI (`vpermi2b`, see [`x86::mix2_fp8_vbmi`]);
/// `AOE_KERNELS=avx512-novbmi` (or, in tests, [`tests::without_vbmi`]) turns it off.
fn vbmi_enabled() -> bool {
    #[cfg(test)]
    if tests::NO_VBMI.with(|v| v.get()) {
        return false;
    }
    static VBMI: AtomicU8 = AtomicU8::new(0);
    match VBMI.load(Ordering::Relaxed) {
        1 => false,
        2 => true,
        _ => {
            #[cfg(target_arch = "x86_64")]
            let v = best_level() == SimdLevel::Avx512
                && is_x86_feature_detected!("avx512vbmi")
                && std::env::var("AOE_KERNELS").ok().as_deref().map(str::trim)
                    != Some("avx512-novbmi");
            #[cfg(not(target_arch = "x86_64"))]
            let v = false;
            VBMI.store(1 + v as u8, Ordering::Relaxed);
            v
        }
    }
}

fn best_level() -> SimdLevel {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("f16c")
        {
            return SimdLevel::Avx512;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c") {
            return SimdLevel::Avx2;
        }
    }
    SimdLevel::Portable
}

/// Every level this machine can run (for tests and benchmarks).
pub fn available_levels() -> Vec<SimdLevel> {
    let mut v = vec![SimdLevel::Portable];
    let best = best_level();
    if best != SimdLevel::Portable {
        v.push(SimdLevel::Avx2);
    }
    if best == SimdLevel::Avx512 {
        v.push(SimdLevel::Avx512);
    }
    v
}

/// Defines `fn $name(level: SimdLevel, args..)` that runs `$body` compiled for that level: the
/// body is an `#[inline(always)]` function (generic over `const $lv: u8`, one of the `LV_*`
/// constants, so that it can pick intrinsics at compile time) called from two
/// `#[target_feature]` wrappers (AVX-512, AVX2+F16C) and directly (portable), so LLVM
/// vectorizes one copy per instruction set. A level the CPU lacks falls back to portable.
macro_rules! multiversion {
    ($(#[$m:meta])* fn $name:ident<$lv:ident>($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)? $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        fn $name(level: SimdLevel, $($a: $t),*) $(-> $r)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn imp<const $lv: u8>($($a: $t),*) $(-> $r)? $body

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn v512($($a: $t),*) $(-> $r)? {
                imp::<LV_AVX512>($($a),*)
            }

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,f16c")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn v256($($a: $t),*) $(-> $r)? {
                imp::<LV_AVX2>($($a),*)
            }

            #[cfg(target_arch = "x86_64")]
            {
                match level {
                    SimdLevel::Avx512 if best_level() == SimdLevel::Avx512 => {
                        // SAFETY: the CPU has AVX-512 F/BW/VL, AVX2 and F16C (checked just above).
                        return unsafe { v512($($a),*) };
                    }
                    SimdLevel::Avx2 if best_level() != SimdLevel::Portable => {
                        // SAFETY: the CPU has AVX2 and F16C (checked just above).
                        return unsafe { v256($($a),*) };
                    }
                    _ => {}
                }
            }
            let _ = level;
            imp::<LV_PORTABLE>($($a),*)
        }
    };
}

// ---------------------------------------------------------------------------------------------
// Generic per-dtype element access
// ---------------------------------------------------------------------------------------------

/// Lanes per chunk of the vectorizable loops.
const L: usize = 64;

// Every loop below works on whole chunks of L elements held in fixed-size arrays (`&[u8; 128]`,
// `[f32; 64]`, ...): with the lengths known, LLVM drops the bounds checks and vectorizes each
// chunk's inner loop (one `vpmovzxwd` load per 16 BF16 values with AVX-512). With chunks of 16
// it fully unrolled them first and then vectorized *across* chunks with gathers/scatters.
// A tail shorter than L is padded into a local chunk, run through the same code, copied back.

/// The `&[T; N]` view of a slice of exactly N elements (the callers guarantee the length).
#[inline(always)]
fn arr<T, const N: usize>(c: &[T]) -> &[T; N] {
    c.try_into().expect("chunk length")
}

#[inline(always)]
fn arr_mut<T, const N: usize>(c: &mut [T]) -> &mut [T; N] {
    c.try_into().expect("chunk length")
}

/// A stored dtype read as f32, a chunk of L elements at a time.
trait Dec {
    const SIZE: usize;
    /// `c` holds exactly `L * SIZE` bytes.
    fn chunk(c: &[u8]) -> [f32; L];
    /// [`Dec::chunk`], possibly with intrinsics of level `LV`.
    #[inline(always)]
    fn chunk_lv<const LV: u8>(c: &[u8]) -> [f32; L] {
        Self::chunk(c)
    }
    /// `mul_nan_first(value, s)` of every element (`LV`: the `LV_*` level compiled for).
    #[inline(always)]
    fn chunk_scaled<const LV: u8>(c: &[u8], s: f32) -> [f32; L] {
        let mut d = Self::chunk(c);
        for v in d.iter_mut() {
            *v = mul_nan_first(*v, s);
        }
        d
    }
}

/// f32 written as a stored dtype, a chunk of L elements at a time.
trait Enc {
    const SIZE: usize;
    /// `o` holds exactly `L * SIZE` bytes.
    fn put_chunk(o: &mut [u8], v: &[f32; L]);
}

struct Bf16;
struct F16;
struct F32;
struct Fp8;

impl Dec for Bf16 {
    const SIZE: usize = 2;
    #[inline(always)]
    fn chunk(c: &[u8]) -> [f32; L] {
        let c: &[u8; 2 * L] = arr(c);
        let mut o = [0f32; L];
        for j in 0..L {
            o[j] = bf16_to_f32(u16::from_le_bytes([c[2 * j], c[2 * j + 1]]));
        }
        o
    }
}
impl Dec for F16 {
    const SIZE: usize = 2;
    #[inline(always)]
    fn chunk(c: &[u8]) -> [f32; L] {
        let c: &[u8; 2 * L] = arr(c);
        let mut o = [0f32; L];
        for j in 0..L {
            o[j] = f16_to_f32(u16::from_le_bytes([c[2 * j], c[2 * j + 1]]));
        }
        o
    }
}
impl Dec for F32 {
    const SIZE: usize = 4;
    #[inline(always)]
    fn chunk(c: &[u8]) -> [f32; L] {
        let c: &[u8; 4 * L] = arr(c);
        let mut o = [0f32; L];
        for j in 0..L {
            o[j] = f32::from_le_bytes([c[4 * j], c[4 * j + 1], c[4 * j + 2], c[4 * j + 3]]);
        }
        o
    }
}
impl Dec for Fp8 {
    const SIZE: usize = 1;
    #[inline(always)]
    fn chunk(c: &[u8]) -> [f32; L] {
        let c: &[u8; L] = arr(c);
        let mut o = [0f32; L];
        for j in 0..L {
            o[j] = fp8_to_f32(c[j]);
        }
        o
    }
    /// `value × 1` is `value` for every code (the NaN codes' NaN is kept), so the x86 paths
    /// decode through [`Fp8::chunk_scaled`] too.
    #[inline(always)]
    fn chunk_lv<const LV: u8>(c: &[u8]) -> [f32; L] {
        if LV == LV_PORTABLE {
            Self::chunk(c)
        } else {
            Self::chunk_scaled::<LV>(c, 1.0)
        }
    }
    /// One NaN select instead of two: decode NaN codes as 480 (no select), scale, then put
    /// the code's NaN in those lanes (what `mul_nan_first(fp8_to_f32(c), s)` gives). On x86
    /// the F16 converter does the decoding (see [`x86::fp8_scaled_avx512`]).
    #[inline(always)]
    fn chunk_scaled<const LV: u8>(c: &[u8], s: f32) -> [f32; L] {
        let c: &[u8; L] = arr(c);
        #[cfg(target_arch = "x86_64")]
        {
            let s256 = s * 256.0;
            // 256·s must be exact: not when it overflows (|s| ≥ 2^120).
            if LV != LV_PORTABLE && !(s256.is_infinite() && s.is_finite()) {
                // SAFETY: instances with LV_AVX512 / LV_AVX2 are only compiled into the
                // `multiversion!` wrappers with those target features, which run only on CPUs
                // that have them.
                return unsafe {
                    if LV == LV_AVX512 {
                        x86::fp8_scaled_avx512(c, s256)
                    } else {
                        x86::fp8_scaled_avx2(c, s256)
                    }
                };
            }
        }
        let mut o = [0f32; L];
        for j in 0..L {
            let c = c[j] as u32;
            let mag = c & 0x7f;
            let sign = (c & 0x80) << 24;
            let normal = (mag << 20) + 0x3c00_0000;
            let sub = ((mag as i32) as f32 * (1.0 / 512.0)).to_bits();
            let v = f32::from_bits(if mag < 8 { sub } else { normal } | sign) * s;
            o[j] = if mag == 0x7f {
                f32::from_bits(0x7fc0_0000 | sign)
            } else {
                v
            };
        }
        o
    }
}
impl Enc for Bf16 {
    const SIZE: usize = 2;
    #[inline(always)]
    fn put_chunk(o: &mut [u8], v: &[f32; L]) {
        let o: &mut [u8; 2 * L] = arr_mut(o);
        for j in 0..L {
            let b = f32_to_bf16(v[j]).to_le_bytes();
            o[2 * j] = b[0];
            o[2 * j + 1] = b[1];
        }
    }
}
impl Enc for F16 {
    const SIZE: usize = 2;
    #[inline(always)]
    fn put_chunk(o: &mut [u8], v: &[f32; L]) {
        let o: &mut [u8; 2 * L] = arr_mut(o);
        for j in 0..L {
            let b = f32_to_f16(v[j]).to_le_bytes();
            o[2 * j] = b[0];
            o[2 * j + 1] = b[1];
        }
    }
}
impl Enc for F32 {
    const SIZE: usize = 4;
    #[inline(always)]
    fn put_chunk(o: &mut [u8], v: &[f32; L]) {
        let o: &mut [u8; 4 * L] = arr_mut(o);
        for j in 0..L {
            let b = v[j].to_le_bytes();
            o[4 * j..4 * j + 4].copy_from_slice(&b);
        }
    }
}

/// Runs `$body` with `$s` bound to each source chunk of `L * $sp` elements and `$d` to the
/// matching destination chunk of `L * $dp` elements, then once over the tail padded with
/// zeros (the padding lanes' results are discarded). `$sp`, `$dp` ≤ 4. A macro, not a function
/// taking a closure: closures are not reliably inlined into the `#[target_feature]` copies.
macro_rules! chunked {
    ($src:expr, $sp:expr, $dst:expr, $dp:expr, |$s:ident, $d:ident| $body:block) => {{
        let (src, sp, dst, dp) = ($src, $sp, $dst, $dp);
        let mut sc = src.chunks_exact(L * sp);
        let mut dc = dst.chunks_exact_mut(L * dp);
        for ($s, $d) in (&mut sc).zip(&mut dc) {
            $body
        }
        let (ts, td) = (sc.remainder(), dc.into_remainder());
        if !td.is_empty() {
            let mut sb = [Default::default(); 4 * L];
            let mut db = [Default::default(); 4 * L];
            sb[..ts.len()].copy_from_slice(ts);
            db[..td.len()].copy_from_slice(td);
            {
                let $s = &sb[..L * sp];
                let $d = &mut db[..L * dp];
                $body
            }
            td.copy_from_slice(&db[..td.len()]);
        }
    }};
}

/// `a + b`, except that a NaN `a` is returned as is: when both are NaN the result is `a`'s
/// NaN (what x86 `addps a, b` does; LLVM may swap the operands of a bare `+`).
#[inline(always)]
fn add_nan_first(a: f32, b: f32) -> f32 {
    let s = a + b;
    if a.is_nan() {
        a
    } else {
        s
    }
}

/// `a * b` with the same first-operand NaN rule as [`add_nan_first`].
#[inline(always)]
fn mul_nan_first(a: f32, b: f32) -> f32 {
    let p = a * b;
    if a.is_nan() {
        a
    } else {
        p
    }
}

/// out[i] = dec(src[i]) (× s if SCALED).
#[inline(always)]
fn map_k<D: Dec, const LV: u8, const SCALED: bool>(src: &[u8], s: f32, out: &mut [f32]) {
    chunked!(src, D::SIZE, out, 1, |c, o| {
        let d = if SCALED {
            D::chunk_scaled::<LV>(c, s)
        } else {
            D::chunk_lv::<LV>(c)
        };
        *arr_mut::<f32, L>(o) = d;
    })
}

/// acc[i] = w·d (FIRST) or acc[i] + w·d, with d = dec(src[i]) (× s if SCALED).
#[inline(always)]
fn axpy_k<D: Dec, const LV: u8, const SCALED: bool, const FIRST: bool>(
    src: &[u8],
    s: f32,
    w: f32,
    acc: &mut [f32],
) {
    chunked!(src, D::SIZE, acc, 1, |c, a| {
        let d = if SCALED {
            D::chunk_scaled::<LV>(c, s)
        } else {
            D::chunk_lv::<LV>(c)
        };
        let a: &mut [f32; L] = arr_mut(a);
        for j in 0..L {
            a[j] = if FIRST {
                w * d[j]
            } else {
                add_nan_first(a[j], w * d[j])
            };
        }
    })
}

/// `acc = wa·(a·sa)`, then `acc = acc + wb·(b·sb)`, in one pass over two FP8 inputs: the same
/// operations in the same order as two [`axpy_k`] passes (first, then not first), without
/// storing and reloading `acc` in between.
#[inline(always)]
fn axpy2_fp8<const LV: u8>(
    a: &[u8],
    sa: f32,
    wa: f32,
    b: &[u8],
    sb: f32,
    wb: f32,
    acc: &mut [f32],
) {
    let full = acc.len() / L * L;
    for ((ca, cb), o) in a[..full]
        .chunks_exact(L)
        .zip(b[..full].chunks_exact(L))
        .zip(acc[..full].chunks_exact_mut(L))
    {
        let da = Fp8::chunk_scaled::<LV>(ca, sa);
        let db = Fp8::chunk_scaled::<LV>(cb, sb);
        let o: &mut [f32; L] = arr_mut(o);
        for j in 0..L {
            o[j] = add_nan_first(wa * da[j], wb * db[j]);
        }
    }
    if full < acc.len() {
        axpy_k::<Fp8, LV, true, true>(&a[full..], sa, wa, &mut acc[full..]);
        axpy_k::<Fp8, LV, true, false>(&b[full..], sb, wb, &mut acc[full..]);
    }
}

#[inline(always)]
fn axpy_dispatch<D: Dec, const LV: u8>(
    src: &[u8],
    s: Option<f32>,
    w: f32,
    acc: &mut [f32],
    first: bool,
) {
    match (s, first) {
        (Some(s), true) => axpy_k::<D, LV, true, true>(src, s, w, acc),
        (Some(s), false) => axpy_k::<D, LV, true, false>(src, s, w, acc),
        (None, true) => axpy_k::<D, LV, false, true>(src, 0.0, w, acc),
        (None, false) => axpy_k::<D, LV, false, false>(src, 0.0, w, acc),
    }
}

/// acc = w·d or acc + w·d over f32 slices.
#[inline(always)]
fn scale_add_k(acc: &mut [f32], w: f32, d: &[f32], first: bool) {
    let mut ac = acc.chunks_exact_mut(L);
    let mut dc = d.chunks_exact(L);
    for (a, x) in (&mut ac).zip(&mut dc) {
        let a: &mut [f32; L] = arr_mut(a);
        let x: &[f32; L] = arr(x);
        for j in 0..L {
            a[j] = if first {
                w * x[j]
            } else {
                add_nan_first(a[j], w * x[j])
            };
        }
    }
    for (a, x) in ac.into_remainder().iter_mut().zip(dc.remainder()) {
        *a = if first {
            w * *x
        } else {
            add_nan_first(*a, w * *x)
        };
    }
}

#[inline(always)]
fn encode_k<E: Enc>(src: &[f32], out: &mut [u8]) {
    chunked!(src, 1, out, E::SIZE, |s, o| {
        E::put_chunk(o, arr(s));
    })
}

#[inline(always)]
fn decode_any<const LV: u8>(dtype: DType, src: &[u8], out: &mut [f32]) {
    match dtype {
        DType::BF16 => map_k::<Bf16, LV, false>(src, 0.0, out),
        DType::F16 => map_k::<F16, LV, false>(src, 0.0, out),
        DType::F32 => map_k::<F32, LV, false>(src, 0.0, out),
        DType::F8E4M3 => map_k::<Fp8, LV, false>(src, 0.0, out),
        DType::Other(_) => unreachable!("checked by the caller"),
    }
}

#[inline(always)]
fn encode_any(dtype: DType, src: &[f32], out: &mut [u8]) {
    match dtype {
        DType::BF16 => encode_k::<Bf16>(src, out),
        DType::F16 => encode_k::<F16>(src, out),
        DType::F32 => encode_k::<F32>(src, out),
        _ => unreachable!("checked by the caller"),
    }
}

#[inline(always)]
fn axpy_any<const LV: u8>(
    dtype: DType,
    src: &[u8],
    s: Option<f32>,
    w: f32,
    acc: &mut [f32],
    first: bool,
) {
    match dtype {
        DType::BF16 => axpy_dispatch::<Bf16, LV>(src, s, w, acc, first),
        DType::F16 => axpy_dispatch::<F16, LV>(src, s, w, acc, first),
        DType::F32 => axpy_dispatch::<F32, LV>(src, s, w, acc, first),
        DType::F8E4M3 => axpy_dispatch::<Fp8, LV>(src, s, w, acc, first),
        DType::Other(_) => unreachable!("checked by the caller"),
    }
}

/// Largest of 128 amax lanes.
#[inline(always)]
fn amax_k(x: &[u32; FP8_BLOCK]) -> u32 {
    let mut r = 0u32;
    for v in x {
        r = r.max(*v);
    }
    r
}

/// codes[i] = fp8(x[i] / scale), a true f32 division per element. (Multiplying by 1/scale
/// and falling back to division only near FP8 rounding midpoints gives the same bits, but
/// measured no faster here: the divider runs beside the integer encoding, which dominates.)
#[inline(always)]
fn quant_k<const LV: u8>(x: &[f32], scale: f32, out: &mut [u8]) {
    chunked!(x, 1, out, 1, |c, o| {
        let c: &[f32; L] = arr(c);
        let o: &mut [u8; L] = arr_mut(o);
        #[cfg(target_arch = "x86_64")]
        if LV == LV_AVX512 {
            // SAFETY: LV_AVX512 instances only run inside the AVX-512 `multiversion!` wrapper,
            // which runs only on CPUs with AVX-512 F/BW.
            unsafe { x86::quant_avx512(c, scale, o) };
        } else {
            quant_chunk(c, scale, o);
        }
        #[cfg(not(target_arch = "x86_64"))]
        quant_chunk(c, scale, o);
    })
}

#[inline(always)]
fn quant_chunk(c: &[f32; L], scale: f32, o: &mut [u8; L]) {
    for j in 0..L {
        o[j] = f32_to_fp8(c[j] / scale);
    }
}

/// `lanes[j] = max(lanes[j], |x[j]| bits)`: block amaxes are kept as 128 lanes across the rows
/// of a block and reduced once (integer max: order-free, NaN largest).
#[inline(always)]
fn amax_lanes(lanes: &mut [u32; FP8_BLOCK], x: &[f32]) {
    if let Ok(x) = <&[f32; FP8_BLOCK]>::try_from(x) {
        for j in 0..FP8_BLOCK {
            lanes[j] = lanes[j].max(x[j].to_bits() & 0x7fff_ffff);
        }
    } else {
        for (l, v) in lanes.iter_mut().zip(x) {
            *l = (*l).max(v.to_bits() & 0x7fff_ffff);
        }
    }
}

#[inline(always)]
fn block_scale(amax_bits: u32) -> f32 {
    if amax_bits == 0 {
        1.0
    } else {
        f32::from_bits(amax_bits) / FP8_MAX
    }
}

/// 8-lane f64 sum of squared differences; `lanes[j]` takes elements with index ≡ j (mod 8),
/// counting from the start of `a` (the caller keeps the global alignment).
#[inline(always)]
fn sq_k(lanes: &mut [f64; 8], a: &[f32], b: &[f32]) {
    let mut l = *lanes;
    let mut ac = a.chunks_exact(8);
    let mut bc = b.chunks_exact(8);
    for (x, y) in (&mut ac).zip(&mut bc) {
        let x: &[f32; 8] = arr(x);
        let y: &[f32; 8] = arr(y);
        for j in 0..8 {
            let d = x[j] as f64 - y[j] as f64;
            l[j] += d * d;
        }
    }
    for (j, (x, y)) in ac.remainder().iter().zip(bc.remainder()).enumerate() {
        let d = *x as f64 - *y as f64;
        l[j] += d * d;
    }
    *lanes = l;
}

/// The few kernels where explicit x86 intrinsics pay.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{FP8_BLOCK, L};
    use std::arch::x86_64::*;

    // FP8 E4M3FN → f32 through the F16 converter: for a code c, the 16-bit pattern
    // `(c & 0x80) << 8 | (c & 0x7f) << 7` (= `(c + (c & 0x80)) << 7`) is an IEEE half whose
    // value is exactly the code's value × 2^-8: same mantissa bits, exponent bias 15 instead
    // of 7, and E4M3 subnormals (m × 2^-9) land on F16 subnormals (m × 2^-17). vcvtph2ps
    // converts exactly; `× (256·s)` then equals `(value × 256) × s` bit for bit, because
    // 256·s is exact (the caller checks it did not overflow) and so both round the same real
    // number. The NaN codes (0x7f/0xff, 1.875 × 2^0 as halves) are replaced afterwards by the
    // quiet NaN with the code's sign, which is what `mul_nan_first(fp8_to_f32(c), s)` gives.

    /// `mul_nan_first(fp8_to_f32(c[i]), s)` for 64 codes, with `s256 = 256·s` exact.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
    pub(super) unsafe fn fp8_scaled_avx512(c: &[u8; L], s256: f32) -> [f32; L] {
        let mut out = [0f32; L];
        let sv = _mm512_set1_ps(s256);
        let sign = _mm512_set1_epi32(i32::MIN);
        let qnan = _mm512_set1_epi32(0x7fc0_0000);
        for k in 0..L / 32 {
            // SAFETY: 32 bytes at 32·k < L are in `c`; unaligned loads.
            let bytes = unsafe { _mm256_loadu_si256(c.as_ptr().add(32 * k).cast()) };
            let w = _mm512_cvtepu8_epi16(bytes);
            let h = _mm512_slli_epi16::<7>(_mm512_add_epi16(
                w,
                _mm512_and_si512(w, _mm512_set1_epi16(0x80)),
            ));
            let nan = _mm256_cmpeq_epi8_mask(
                _mm256_and_si256(bytes, _mm256_set1_epi8(0x7f)),
                _mm256_set1_epi8(0x7f),
            );
            let halves = [_mm512_castsi512_si256(h), _mm512_extracti64x4_epi64::<1>(h)];
            for (i, hh) in halves.into_iter().enumerate() {
                let f = _mm512_cvtph_ps(hh);
                let v = _mm512_mul_ps(f, sv);
                // (f & sign) | qnan: the quiet NaN with the code's sign.
                let nv = _mm512_ternarylogic_epi32::<0xf8>(qnan, _mm512_castps_si512(f), sign);
                let m = (nan >> (16 * i)) as __mmask16;
                let r = _mm512_mask_mov_ps(v, m, _mm512_castsi512_ps(nv));
                // SAFETY: 16 floats at 32·k + 16·i < L are in `out`.
                unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(32 * k + 16 * i), r) };
            }
        }
        out
    }

    /// `f32_to_fp8(q)` of 16 floats, as dwords 0..=255.
    ///
    /// [`super::f32_to_fp8`] rearranged to fewer instructions, the same function of the bits:
    /// the rebias is folded into the rounding constant; values above 464 (and inf, NaN) come
    /// out of the normal formula as ≥ 0x7f (the rounding is monotonic and 464 + ulp already
    /// gives 0x7f), so an unsigned min replaces that compare and select; the subnormal result
    /// (`|q| + 2^14` bits, 0x4680_0000 + m, m ≤ 8) and the sign are merged by one bit select
    /// that keeps only the low 7 bits of the former.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
    fn enc16(q: __m512) -> __m512i {
        let q = _mm512_castps_si512(q);
        let a = _mm512_and_si512(q, _mm512_set1_epi32(0x7fff_ffff));
        let odd = _mm512_test_epi32_mask(a, _mm512_set1_epi32(1 << 20));
        // (a + 0x7ffff + odd) >> 20 − 0x3c0 == (a + 0x7ffff + odd − 0x3c00_0000) >> 20 when
        // a ≥ 0x3c80_0000 (and no wrap: a ≤ 0x7fff_ffff).
        let t = _mm512_mask_add_epi32(
            _mm512_add_epi32(a, _mm512_set1_epi32(0x7_ffff - 0x3c00_0000)),
            odd,
            a,
            _mm512_set1_epi32(0x8_0000 - 0x3c00_0000),
        );
        let normal = _mm512_srli_epi32::<20>(t);
        let sub = _mm512_castps_si512(_mm512_add_ps(
            _mm512_castsi512_ps(a),
            _mm512_set1_ps(16384.0),
        ));
        let is_normal = _mm512_cmpge_epu32_mask(a, _mm512_set1_epi32(0x3c80_0000));
        let low7 = _mm512_set1_epi32(0x7f);
        let m = _mm512_mask_min_epu32(sub, is_normal, normal, low7);
        // (m & 0x7f) | ((q >> 24) & 0x80): bit select by 0x7f (imm 0xe4 = C ? A : B).
        _mm512_ternarylogic_epi32::<0xe4>(m, _mm512_srli_epi32::<24>(q), low7)
    }

    /// The bytes of 4 × 16 dwords 0..=255, in order.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
    fn pack64(v: [__m512i; 4]) -> __m512i {
        // The saturating packs are exact on 0..=255. They work within 128-bit lanes, leaving
        // dword 4·lane + j = elements 16·j + 4·lane..+4; the permute puts them in order.
        let p = _mm512_packus_epi16(
            _mm512_packus_epi32(v[0], v[1]),
            _mm512_packus_epi32(v[2], v[3]),
        );
        let idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        _mm512_permutexvar_epi32(idx, p)
    }

    /// `f32_to_fp8(x[i] / scale)` for 64 values (a true division, as [`super::quant_k`]).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
    pub(super) unsafe fn quant_avx512(x: &[f32; L], scale: f32, out: &mut [u8; L]) {
        let sv = _mm512_set1_ps(scale);
        let mut v = [_mm512_setzero_si512(); 4];
        for (k, v) in v.iter_mut().enumerate() {
            // SAFETY: 16 floats at 16·k < L are in `x`; unaligned load.
            let xv = unsafe { _mm512_loadu_ps(x.as_ptr().add(16 * k)) };
            *v = enc16(_mm512_div_ps(xv, sv));
        }
        // SAFETY: `out` holds 64 bytes; unaligned store.
        unsafe { _mm512_storeu_si512(out.as_mut_ptr().cast(), pack64(v)) };
    }

    /// The table of [`Mix2`]: byte 2 (`[0]`) and byte 3 (`[1]`) of the f32 bits of
    /// [`super::fp8_to_f32`] of the codes 0..=127. Bytes 0 and 1 are 0 for every code (3
    /// mantissa bits at most); the sign is bit 7 of byte 3, the code's bit 7.
    static FP8_PLANES: [[u8; 128]; 2] = {
        let mut t = [[0u8; 128]; 2];
        let mut c = 0;
        while c < 128 {
            let b = super::fp8_to_f32(c as u8).to_bits();
            assert!(b & 0xffff == 0);
            t[0][c] = (b >> 16) as u8;
            t[1][c] = (b >> 24) as u8;
            c += 1;
        }
        t
    };

    /// `add_nan_first(wa·(fp8(a)·sa), wb·(fp8(b)·sb))` of 64 code pairs with AVX-512 VBMI.
    ///
    /// Decoding: two 128-entry byte-table lookups per 64 codes (`vpermi2b` ignores index
    /// bit 7, the sign), the sign merged into the top byte, then byte and word unpacks with
    /// zeros build the f32 bits: exact by construction. The unpacks work within 128-bit lanes,
    /// so the 4 × 16 results come in *lane order*: vector j, dword 4·l + i holds element
    /// 16·l + 4·j + i. Both parents share it (the mix is elementwise, the amax order-free),
    /// and [`pack64_lanes`] undoes it.
    ///
    /// The scales and weights are not NaN ([`band_ok`]), so only the add needs the explicit
    /// NaN select (`SAFE`), and only in blocks where some NaN occurs.
    struct Mix2 {
        lo: [__m512i; 2],
        hi: [__m512i; 2],
        w: [__m512; 2],
    }

    impl Mix2 {
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx2")]
        fn new(wa: f32, wb: f32) -> Mix2 {
            let ld = |p: &[u8]| {
                // SAFETY: 64 bytes of the table; unaligned load.
                unsafe { _mm512_loadu_si512(p.as_ptr().cast()) }
            };
            let [lo, hi] = &FP8_PLANES;
            Mix2 {
                lo: [ld(&lo[..64]), ld(&lo[64..])],
                hi: [ld(&hi[..64]), ld(&hi[64..])],
                w: [_mm512_set1_ps(wa), _mm512_set1_ps(wb)],
            }
        }

        /// The 64 codes' values times `s`, in lane order.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx2")]
        fn dec(&self, c: __m512i, s: __m512) -> [__m512; 4] {
            let lo = _mm512_permutex2var_epi8(self.lo[0], c, self.lo[1]);
            // hi | (code & 0x80)
            let hi = _mm512_ternarylogic_epi32::<0xf8>(
                _mm512_permutex2var_epi8(self.hi[0], c, self.hi[1]),
                c,
                _mm512_set1_epi8(0x80u8 as i8),
            );
            let z = _mm512_setzero_si512();
            let (w0, w1) = (_mm512_unpacklo_epi8(lo, hi), _mm512_unpackhi_epi8(lo, hi));
            [
                _mm512_unpacklo_epi16(z, w0),
                _mm512_unpackhi_epi16(z, w0),
                _mm512_unpacklo_epi16(z, w1),
                _mm512_unpackhi_epi16(z, w1),
            ]
            .map(|v| _mm512_mul_ps(_mm512_castsi512_ps(v), s))
        }

        /// The mix of 64 code pairs, in lane order. Without `SAFE` the add is a plain one:
        /// exact where no operand is NaN.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx2")]
        fn mix<const SAFE: bool>(
            &self,
            ca: __m512i,
            sa: __m512,
            cb: __m512i,
            sb: __m512,
        ) -> [__m512; 4] {
            let da = self.dec(ca, sa);
            let db = self.dec(cb, sb);
            let mut r = [_mm512_setzero_ps(); 4];
            for j in 0..4 {
                let pa = _mm512_mul_ps(self.w[0], da[j]);
                let pb = _mm512_mul_ps(self.w[1], db[j]);
                r[j] = if SAFE {
                    // add_nan_first: a NaN `pa` is kept as is (LLVM may swap the add's
                    // operands).
                    let ord = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(pa, pa);
                    _mm512_mask_add_ps(pa, ord, pa, pb)
                } else {
                    _mm512_add_ps(pa, pb)
                };
            }
            r
        }
    }

    /// [`pack64`] of 4 × 16 dwords in lane order (see [`Mix2`]): the in-lane packs alone
    /// restore the element order.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
    fn pack64_lanes(v: [__m512i; 4]) -> __m512i {
        _mm512_packus_epi16(
            _mm512_packus_epi32(v[0], v[1]),
            _mm512_packus_epi32(v[2], v[3]),
        )
    }

    /// Up to 64 bytes at `p` (`n` ≤ 64 of them readable), zeros past `n`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
    unsafe fn load_codes(p: *const u8, n: usize) -> __m512i {
        if n == L {
            // SAFETY: the caller's `n` bytes; unaligned.
            unsafe { _mm512_loadu_si512(p.cast()) }
        } else {
            // SAFETY: masked-off bytes are not accessed (no fault).
            unsafe { _mm512_maskz_loadu_epi8(u64::MAX >> (64 - n), p.cast()) }
        }
    }

    /// Columns per pass of [`mix2_fp8_band_vbmi`] (32 blocks): the 128 rows of both parents,
    /// 1 MiB, stay in L2 for the second pass.
    const BAND_COLS: usize = 32 * FP8_BLOCK;

    /// Whether [`mix2_fp8_band_vbmi`] takes a block row with these scales and weights: none
    /// NaN. Then every NaN the mix can make is a NaN code's (`0x7fc0_0000` with a sign) or the
    /// default NaN (`0xffc0_0000`, from 0·inf or inf − inf), and `value·s`, `w·d` return the
    /// same NaN whatever their operand order.
    pub(super) fn band_ok(sa: &[f32], sb: &[f32], wa: f32, wb: f32) -> bool {
        !sa.iter().chain(sb).chain([&wa, &wb]).any(|x| x.is_nan())
    }

    /// [`super::mix`] of one block row of two FP8 parents with block scales into FP8: rows
    /// `r0..r0 + rows` of the `cols`-wide inputs `a`, `b` (whole tensors: the prefetch
    /// looks one row ahead, into the next band too), their block row's scales `sa`, `sb`
    /// (with the weights: [`band_ok`]); writes the band's codes `out` and scales `out_scales`.
    ///
    /// Two passes per 4096 columns instead of a stored f32 tile: the first streams the rows
    /// (sequential runs, so the hardware prefetchers help) and folds the block amaxes, the
    /// second recomputes the same mix from L2 and quantizes it. Recomputing is exact (the
    /// same operations on the same inputs) and cheaper than the tile's memory traffic.
    ///
    /// NaN: with [`band_ok`] scales and weights all NaNs here have `|bits| = 0x7fc0_0000`,
    /// so the amax is the same whichever operand's NaN the add returns, and a plain add is
    /// exact where neither operand is NaN. The first pass therefore adds plainly; in a block
    /// whose amax is NaN the second pass adds with the NaN select.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx2")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn mix2_fp8_band_vbmi(
        a: &[u8],
        sa: &[f32],
        wa: f32,
        b: &[u8],
        sb: &[f32],
        wb: f32,
        cols: usize,
        r0: usize,
        rows: usize,
        out: &mut [u8],
        out_scales: &mut [f32],
    ) {
        let nbc = cols.div_ceil(FP8_BLOCK);
        assert!(
            a.len() == b.len()
                && a.len() >= (r0 + rows) * cols
                && out.len() == rows * cols
                && sa.len() == nbc
                && sb.len() == nbc
                && out_scales.len() == nbc
                && band_ok(sa, sb, wa, wb)
        );
        let m = Mix2::new(wa, wb);
        let (pa, pb, po) = (a.as_ptr(), b.as_ptr(), out.as_mut_ptr());
        let abs = _mm512_set1_epi32(0x7fff_ffff);
        let mut c0 = 0;
        while c0 < cols {
            let c1 = (c0 + BAND_COLS).min(cols);
            let (b0, nb) = (c0 / FP8_BLOCK, (c1 - c0).div_ceil(FP8_BLOCK));
            let mut amax = [_mm512_setzero_si512(); BAND_COLS / FP8_BLOCK];
            for r in r0..r0 + rows {
                // The next row's runs (in the next band after the last row), if any.
                let ahead = (r + 1 < a.len() / cols).then_some((r + 1) * cols);
                for (bi, amax) in amax[..nb].iter_mut().enumerate() {
                    let (s_a, s_b) = (_mm512_set1_ps(sa[b0 + bi]), _mm512_set1_ps(sb[b0 + bi]));
                    let cb = c0 + bi * FP8_BLOCK;
                    let mut c = cb;
                    while c < (cb + FP8_BLOCK).min(c1) {
                        let n = L.min(c1 - c);
                        let k = r * cols + c;
                        if let Some(k) = ahead {
                            // SAFETY: inside the inputs (row r + 1 exists); prefetches never
                            // fault.
                            unsafe {
                                _mm_prefetch::<_MM_HINT_T0>(pa.add(k + c).cast());
                                _mm_prefetch::<_MM_HINT_T0>(pb.add(k + c).cast());
                            }
                        }
                        // SAFETY: `n` bytes at `k` are inside both inputs (asserted shape).
                        let (ca, cb) =
                            unsafe { (load_codes(pa.add(k), n), load_codes(pb.add(k), n)) };
                        // Padding codes are 0: value 0, no effect on the amax.
                        for v in m.mix::<false>(ca, s_a, cb, s_b) {
                            *amax = _mm512_max_epu32(
                                *amax,
                                _mm512_and_si512(_mm512_castps_si512(v), abs),
                            );
                        }
                        c += n;
                    }
                }
            }
            let mut amax_bits = [0u32; BAND_COLS / FP8_BLOCK];
            for bi in 0..nb {
                amax_bits[bi] = _mm512_reduce_max_epu32(amax[bi]);
                out_scales[b0 + bi] = super::block_scale(amax_bits[bi]);
            }
            for r in r0..r0 + rows {
                for bi in 0..nb {
                    let args = (
                        &m,
                        _mm512_set1_ps(sa[b0 + bi]),
                        _mm512_set1_ps(sb[b0 + bi]),
                        _mm512_set1_ps(out_scales[b0 + bi]),
                    );
                    let cb = c0 + bi * FP8_BLOCK;
                    let (cs, ce) = (cb, (cb + FP8_BLOCK).min(c1));
                    // SAFETY: row r, columns cs..ce are inside the inputs and (row r − r0)
                    // inside `out` (asserted shape).
                    unsafe {
                        if amax_bits[bi] > 0x7f80_0000 {
                            quant_run::<true>(args, pa, pb, po, cols, r, r0, cs, ce)
                        } else {
                            quant_run::<false>(args, pa, pb, po, cols, r, r0, cs, ce)
                        }
                    }
                }
            }
            c0 = c1;
        }
    }

    /// The second pass of [`mix2_fp8_band_vbmi`] over row `r`, columns `cs..ce` of one block.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx2")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn quant_run<const SAFE: bool>(
        (m, s_a, s_b, s): (&Mix2, __m512, __m512, __m512),
        pa: *const u8,
        pb: *const u8,
        po: *mut u8,
        cols: usize,
        r: usize,
        r0: usize,
        cs: usize,
        ce: usize,
    ) {
        let mut c = cs;
        while c < ce {
            let n = L.min(ce - c);
            let k = r * cols + c;
            // SAFETY: the caller's ranges.
            let (ca, cb) = unsafe { (load_codes(pa.add(k), n), load_codes(pb.add(k), n)) };
            let v = m
                .mix::<SAFE>(ca, s_a, cb, s_b)
                .map(|x| enc16(_mm512_div_ps(x, s)));
            let o = (r - r0) * cols + c;
            // SAFETY: the caller's ranges.
            unsafe {
                if n == L {
                    _mm512_storeu_si512(po.add(o).cast(), pack64_lanes(v));
                } else {
                    _mm512_mask_storeu_epi8(
                        po.add(o).cast(),
                        u64::MAX >> (64 - n),
                        pack64_lanes(v),
                    );
                }
            }
            c += n;
        }
    }

    /// The AVX2 + F16C version of [`fp8_scaled_avx512`].
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn fp8_scaled_avx2(c: &[u8; L], s256: f32) -> [f32; L] {
        let mut out = [0f32; L];
        let sv = _mm256_set1_ps(s256);
        let sign = _mm256_set1_ps(f32::from_bits(0x8000_0000));
        let qnan = _mm256_set1_ps(f32::from_bits(0x7fc0_0000));
        for k in 0..L / 16 {
            // SAFETY: 16 bytes at 16·k < L are in `c`; unaligned load.
            let bytes = unsafe { _mm_loadu_si128(c.as_ptr().add(16 * k).cast()) };
            let w = _mm256_cvtepu8_epi16(bytes);
            let h = _mm256_slli_epi16::<7>(_mm256_add_epi16(
                w,
                _mm256_and_si256(w, _mm256_set1_epi16(0x80)),
            ));
            let nan16 = _mm256_cmpeq_epi16(
                _mm256_and_si256(w, _mm256_set1_epi16(0x7f)),
                _mm256_set1_epi16(0x7f),
            );
            let halves = [
                (_mm256_castsi256_si128(h), _mm256_castsi256_si128(nan16)),
                (
                    _mm256_extracti128_si256::<1>(h),
                    _mm256_extracti128_si256::<1>(nan16),
                ),
            ];
            for (i, (hh, nn)) in halves.into_iter().enumerate() {
                let f = _mm256_cvtph_ps(hh);
                let v = _mm256_mul_ps(f, sv);
                let nv = _mm256_or_ps(_mm256_and_ps(f, sign), qnan);
                let m = _mm256_castsi256_ps(_mm256_cvtepi16_epi32(nn));
                let r = _mm256_blendv_ps(v, nv, m);
                // SAFETY: 8 floats at 16·k + 8·i < L are in `out`.
                unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(16 * k + 8 * i), r) };
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Shape checks (shared by the fast and scalar paths)
// ---------------------------------------------------------------------------------------------

#[track_caller]
fn check_mixable(dtype: DType) {
    assert!(dtype.is_mixable(), "kernels: dtype {dtype} cannot be mixed");
}

/// (nrows, block rows, block cols) of a band of `n` elements with `cols` columns.
#[track_caller]
fn band_dims(n: usize, cols: usize) -> (usize, usize, usize) {
    if n == 0 {
        return (0, 0, cols.div_ceil(FP8_BLOCK));
    }
    assert!(cols > 0, "kernels: cols == 0 for a non-empty FP8 band");
    assert!(
        n.is_multiple_of(cols),
        "kernels: FP8 band of {n} elements is not whole rows of {cols}"
    );
    let nrows = n / cols;
    (nrows, nrows.div_ceil(FP8_BLOCK), cols.div_ceil(FP8_BLOCK))
}

#[track_caller]
fn check_scales(n: usize, cols: usize, scales_len: usize) -> (usize, usize, usize) {
    let (nrows, nbr, nbc) = band_dims(n, cols);
    assert_eq!(
        scales_len,
        nbr * nbc,
        "kernels: FP8 band of {nrows}x{cols} needs {nbr}x{nbc} block scales"
    );
    (nrows, nbr, nbc)
}

// ---------------------------------------------------------------------------------------------
// Public fast paths
// ---------------------------------------------------------------------------------------------

/// Decodes stored values to f32: FP8 codes as floats WITHOUT their block scales (the "stored"
/// metric), BF16/F16/F32 values.
///
/// # Panics
/// If `dtype` is not mixable or `src.len() != out.len() * dtype.size()` (caller bugs).
pub fn decode(dtype: DType, src: &[u8], out: &mut [f32]) {
    decode_at(simd_level(), dtype, src, out)
}

fn decode_at(level: SimdLevel, dtype: DType, src: &[u8], out: &mut [f32]) {
    check_mixable(dtype);
    assert_eq!(
        src.len(),
        out.len() * dtype.size(),
        "kernels::decode: length mismatch"
    );
    decode_mv(level, dtype, src, out)
}

multiversion! {
    fn decode_mv<LV>(dtype: DType, src: &[u8], out: &mut [f32]) {
        decode_any::<LV>(dtype, src, out)
    }
}

/// Dequantizes an FP8 band of whole rows (the band starts at a row that is a multiple of 128):
/// `out = f32(code) × scale` of the code's 128×128 block (one f32 multiply). `scales` are the
/// band's block rows, row-major, `ceil(cols/128)` per block row.
///
/// # Panics
/// If `src.len() != out.len()`, the band is not whole rows of `cols`, or `scales.len()` is not
/// `ceil(nrows/128) × ceil(cols/128)`.
pub fn dequant_fp8(src: &[u8], cols: usize, scales: &[f32], out: &mut [f32]) {
    dequant_fp8_at(simd_level(), src, cols, scales, out)
}

fn dequant_fp8_at(level: SimdLevel, src: &[u8], cols: usize, scales: &[f32], out: &mut [f32]) {
    assert_eq!(
        src.len(),
        out.len(),
        "kernels::dequant_fp8: length mismatch"
    );
    let (nrows, _, nbc) = check_scales(src.len(), cols, scales.len());
    dequant_mv(level, src, cols, scales, out, nrows, nbc)
}

multiversion! {
    fn dequant_mv<LV>(src: &[u8], cols: usize, scales: &[f32], out: &mut [f32], nrows: usize, nbc: usize) {
        for r in 0..nrows {
            let row = r * cols;
            let srow = &scales[(r / FP8_BLOCK) * nbc..];
            for bc in 0..nbc {
                let c0 = bc * FP8_BLOCK;
                let c1 = (c0 + FP8_BLOCK).min(cols);
                map_k::<Fp8, LV, true>(&src[row + c0..row + c1], srow[bc], &mut out[row + c0..row + c1]);
            }
        }
    }
}

/// `acc = w·d` (first) or `acc = acc + w·d`: every product and sum rounded to f32, no FMA.
///
/// # Panics
/// If `acc.len() != d.len()`.
pub fn scale_add(acc: &mut [f32], w: f32, d: &[f32], first: bool) {
    scale_add_at(simd_level(), acc, w, d, first)
}

fn scale_add_at(level: SimdLevel, acc: &mut [f32], w: f32, d: &[f32], first: bool) {
    assert_eq!(acc.len(), d.len(), "kernels::scale_add: length mismatch");
    scale_add_mv(level, acc, w, d, first)
}

multiversion! {
    fn scale_add_mv<LV>(acc: &mut [f32], w: f32, d: &[f32], first: bool) {
        scale_add_k(acc, w, d, first)
    }
}

/// Encodes f32 to BF16/F16/F32 little-endian bytes (for FP8 use [`quantize_fp8`]).
///
/// # Panics
/// If `dtype` is not BF16/F16/F32 or `out.len() != src.len() * dtype.size()`.
pub fn encode(dtype: DType, src: &[f32], out: &mut [u8]) {
    encode_at(simd_level(), dtype, src, out)
}

#[track_caller]
fn check_encodable(dtype: DType) {
    assert!(
        matches!(dtype, DType::BF16 | DType::F16 | DType::F32),
        "kernels::encode: {dtype} is not BF16/F16/F32 (FP8 goes through quantize_fp8)"
    );
}

fn encode_at(level: SimdLevel, dtype: DType, src: &[f32], out: &mut [u8]) {
    check_encodable(dtype);
    assert_eq!(
        out.len(),
        src.len() * dtype.size(),
        "kernels::encode: length mismatch"
    );
    encode_mv(level, dtype, src, out)
}

multiversion! {
    fn encode_mv<LV>(dtype: DType, src: &[f32], out: &mut [u8]) {
        encode_any(dtype, src, out)
    }
}

/// Requantizes a band of whole rows to FP8 (band starts at a multiple of 128 rows; nrows =
/// `acc.len() / cols`): per 128×128 block (edge blocks smaller) `amax` = max |acc| (NaN
/// propagating, see the module doc), `scale = amax / 448` (f32 division; 1 where amax == 0),
/// `code = fp8(acc / scale)` (a true division per element). Writes `codes` (len `acc.len()`)
/// and `scales` (`ceil(nrows/128) × ceil(cols/128)`, row-major).
///
/// # Panics
/// If the lengths do not fit that shape.
pub fn quantize_fp8(acc: &[f32], cols: usize, codes: &mut [u8], scales: &mut [f32]) {
    quantize_fp8_at(simd_level(), acc, cols, codes, scales)
}

fn quantize_fp8_at(
    level: SimdLevel,
    acc: &[f32],
    cols: usize,
    codes: &mut [u8],
    scales: &mut [f32],
) {
    assert_eq!(
        acc.len(),
        codes.len(),
        "kernels::quantize_fp8: length mismatch"
    );
    let (nrows, nbr, nbc) = check_scales(acc.len(), cols, scales.len());
    quantize_mv(level, acc, cols, codes, scales, nrows, nbr, nbc)
}

multiversion! {
    fn quantize_mv<LV>(
        acc: &[f32],
        cols: usize,
        codes: &mut [u8],
        scales: &mut [f32],
        nrows: usize,
        nbr: usize,
        nbc: usize,
    ) {
        let _ = nbc;
        for br in 0..nbr {
            let r0 = br * FP8_BLOCK;
            let rows = FP8_BLOCK.min(nrows - r0);
            let band = &acc[r0 * cols..(r0 + rows) * cols];
            let codes = &mut codes[r0 * cols..(r0 + rows) * cols];
            let mut c0 = 0;
            while c0 < cols {
                let c1 = (c0 + TILE_COLS).min(cols);
                quant_tile::<LV>(&band[c0..], cols, rows, c0, c1, cols, codes, &mut scales[br * nbc..]);
                c0 = c1;
            }
        }
    }
}

#[cfg(test)]
multiversion! {
    /// Test probe: `quant_k` with a given scale over a whole slice.
    fn quant_mv_probe<LV>(x: &[f32], scale: f32, out: &mut [u8]) {
        for (seg, o) in x.chunks(FP8_BLOCK).zip(out.chunks_mut(FP8_BLOCK)) {
            quant_k::<LV>(seg, scale, o);
        }
    }
}

/// Hints the CPU to fetch `bytes` into the cache (no effect on results; a no-op off x86).
#[inline(always)]
fn prefetch(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    for off in (0..bytes.len()).step_by(64) {
        // SAFETY: `off` is inside `bytes`; a prefetch never faults and changes no state
        // visible to the program.
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            _mm_prefetch::<_MM_HINT_T0>(bytes.as_ptr().add(off).cast());
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bytes;
}

/// How many rows ahead [`mix`] with FP8 output prefetches its inputs.
const PREFETCH_ROWS: usize = 4;

/// Columns per tile of the row-major FP8 passes (a multiple of 128): 128 rows × 512 f32 =
/// 256 KiB stays in L2 (measured: 512 to 4096 columns perform alike here; with prefetch the
/// short row runs cost little).
const TILE_COLS: usize = 4 * FP8_BLOCK;

/// Quantizes one block row, columns `c0..c1` (`c0` a multiple of 128, at most `TILE_COLS`
/// wide): `t` holds the `rows` rows with stride `ts` (column `c0` at offset 0). Pass 1 takes
/// the block amaxes row by row, pass 2 quantizes row by row (sequential runs, no 128-row
/// strided walks). `codes` is the block row of the band
/// (stride `cols`), `scales` the block row's scales.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn quant_tile<const LV: u8>(
    t: &[f32],
    ts: usize,
    rows: usize,
    c0: usize,
    c1: usize,
    cols: usize,
    codes: &mut [u8],
    scales: &mut [f32],
) {
    let w = c1 - c0;
    let mut lanes = [[0u32; FP8_BLOCK]; TILE_COLS / FP8_BLOCK];
    for r in 0..rows {
        let row = &t[r * ts..r * ts + w];
        tile_row_amax(&mut lanes, row);
    }
    quant_tile_lanes::<LV>(t, ts, rows, c0, c1, cols, codes, scales, &lanes)
}

/// Folds one row of a tile into its per-block amax lanes.
#[inline(always)]
fn tile_row_amax(lanes: &mut [[u32; FP8_BLOCK]; TILE_COLS / FP8_BLOCK], row: &[f32]) {
    for (l, seg) in lanes.iter_mut().zip(row.chunks(FP8_BLOCK)) {
        amax_lanes(l, seg);
    }
}

/// [`quant_tile`] with the amax lanes already folded (integer max: the order of folding does
/// not matter, so folding each row while it is hot in L1 gives the same scales).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn quant_tile_lanes<const LV: u8>(
    t: &[f32],
    ts: usize,
    rows: usize,
    c0: usize,
    c1: usize,
    cols: usize,
    codes: &mut [u8],
    scales: &mut [f32],
    lanes: &[[u32; FP8_BLOCK]; TILE_COLS / FP8_BLOCK],
) {
    let w = c1 - c0;
    let nb = w.div_ceil(FP8_BLOCK);
    let mut sc = [0f32; TILE_COLS / FP8_BLOCK];
    for b in 0..nb {
        sc[b] = block_scale(amax_k(&lanes[b]));
        scales[c0 / FP8_BLOCK + b] = sc[b];
    }
    for r in 0..rows {
        let row = &t[r * ts..r * ts + w];
        let out = &mut codes[r * cols + c0..r * cols + c1];
        for ((seg, o), s) in row
            .chunks(FP8_BLOCK)
            .zip(out.chunks_mut(FP8_BLOCK))
            .zip(&sc)
        {
            quant_k::<LV>(seg, *s, o);
        }
    }
}

/// Sum over i of `(a[i] − b[i])²` with `d = a as f64 − b as f64`, `d*d` added in f64 into 8
/// lanes by index mod 8, combined as `((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7))`: the same bits on
/// every machine. NaN propagates.
///
/// # Panics
/// If `a.len() != b.len()`.
pub fn sum_sq_diff(a: &[f32], b: &[f32]) -> f64 {
    let mut s = SqDiffAcc::new();
    s.add(a, b);
    s.sum()
}

/// Running [`sum_sq_diff`] over consecutive chunks of a tensor: feeding a tensor in chunks of
/// any sizes gives exactly the bits of one call over the whole tensor (element i always goes to
/// lane i mod 8, counting across chunks).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SqDiffAcc {
    lanes: [f64; 8],
    n: u64,
}

impl SqDiffAcc {
    /// An empty accumulator (sum 0).
    pub fn new() -> SqDiffAcc {
        SqDiffAcc::default()
    }

    /// Number of elements added so far.
    pub fn count(&self) -> u64 {
        self.n
    }

    /// The sum so far, lanes combined in the fixed order.
    pub fn sum(&self) -> f64 {
        let l = &self.lanes;
        let s = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
        // NaN payloads depend on operand order chosen by the compiler: return one NaN.
        if s.is_nan() {
            f64::NAN
        } else {
            s
        }
    }

    /// Adds the next `a.len()` elements (f32 values).
    ///
    /// # Panics
    /// If `a.len() != b.len()`.
    pub fn add(&mut self, a: &[f32], b: &[f32]) {
        self.add_at(simd_level(), a, b)
    }

    fn add_at(&mut self, level: SimdLevel, a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len(), "kernels::sum_sq_diff: length mismatch");
        let (a, b) = self.head(a, b);
        let lanes = &mut self.lanes;
        sq_mv(level, lanes, a, b);
        self.n += a.len() as u64;
    }

    /// Feeds elements one by one until the running index is a multiple of 8; returns the rest.
    fn head<'x>(&mut self, a: &'x [f32], b: &'x [f32]) -> (&'x [f32], &'x [f32]) {
        let k = ((8 - (self.n % 8) as usize) % 8).min(a.len());
        for i in 0..k {
            let d = a[i] as f64 - b[i] as f64;
            self.lanes[(self.n % 8) as usize] += d * d;
            self.n += 1;
        }
        (&a[k..], &b[k..])
    }

    /// Adds the next elements given as stored bytes (FP8 codes without scales, BF16, F16, F32);
    /// the same bits as decoding both and calling [`SqDiffAcc::add`].
    ///
    /// # Panics
    /// If a dtype is not mixable or the element counts differ.
    pub fn add_bytes(&mut self, dtype_a: DType, a: &[u8], dtype_b: DType, b: &[u8]) {
        self.add_bytes_at(simd_level(), dtype_a, a, dtype_b, b)
    }

    fn add_bytes_at(&mut self, level: SimdLevel, dta: DType, a: &[u8], dtb: DType, b: &[u8]) {
        check_mixable(dta);
        check_mixable(dtb);
        let (sa, sb) = (dta.size(), dtb.size());
        assert!(
            a.len().is_multiple_of(sa)
                && b.len().is_multiple_of(sb)
                && a.len() / sa == b.len() / sb,
            "kernels::sum_sq_diff_bytes: length mismatch"
        );
        let n = a.len() / sa;
        // Head elements (to reach lane alignment) one by one, then whole tiles.
        let mut i = 0;
        while !self.n.is_multiple_of(8) && i < n {
            let x = decode_one(dta, &a[i * sa..]);
            let y = decode_one(dtb, &b[i * sb..]);
            self.head(&[x], &[y]);
            i += 1;
        }
        let (a, b) = (&a[i * sa..], &b[i * sb..]);
        let rest = n - i;
        sq_bytes_mv(level, &mut self.lanes, dta, a, dtb, b, rest);
        self.n += rest as u64;
    }
}

multiversion! {
    fn sq_mv<LV>(lanes: &mut [f64; 8], a: &[f32], b: &[f32]) {
        sq_k(lanes, a, b)
    }
}

multiversion! {
    fn sq_bytes_mv<LV>(lanes: &mut [f64; 8], dta: DType, a: &[u8], dtb: DType, b: &[u8], n: usize) {
        // Decode tiles of both into L1, then the f64 lanes (tiles are multiples of 8 long, so
        // the lane of every element is its index mod 8).
        const T: usize = 1024;
        let (sa, sb) = (dta.size(), dtb.size());
        let mut ta = [0f32; T];
        let mut tb = [0f32; T];
        let mut k = 0;
        while k < n {
            let m = T.min(n - k);
            decode_any::<LV>(dta, &a[k * sa..(k + m) * sa], &mut ta[..m]);
            decode_any::<LV>(dtb, &b[k * sb..(k + m) * sb], &mut tb[..m]);
            sq_k(lanes, &ta[..m], &tb[..m]);
            k += m;
        }
    }
}

fn decode_one(dtype: DType, b: &[u8]) -> f32 {
    match dtype {
        DType::BF16 => bf16_to_f32(u16::from_le_bytes([b[0], b[1]])),
        DType::F16 => f16_to_f32(u16::from_le_bytes([b[0], b[1]])),
        DType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        DType::F8E4M3 => fp8_to_f32(b[0]),
        DType::Other(_) => unreachable!("checked by the caller"),
    }
}

/// The stored-values metric straight from bytes: the same bits as `decode` of both then
/// [`sum_sq_diff`] (same f64 accumulation order).
///
/// # Panics
/// If a dtype is not mixable or the element counts differ.
pub fn sum_sq_diff_bytes(dtype_a: DType, a: &[u8], dtype_b: DType, b: &[u8]) -> f64 {
    let mut s = SqDiffAcc::new();
    s.add_bytes(dtype_a, a, dtype_b, b);
    s.sum()
}

/// Fused decode (+ FP8 dequantization) and [`scale_add`]: for FP8 with `scales = Some((scales,
/// cols))`, `src` is a band of whole rows as for [`dequant_fp8`] and `d = f32(code) × scale`;
/// FP8 with `None` uses the stored codes; other dtypes take `None`. Then `acc = w·d` (first) or
/// `acc = acc + w·d`. Bit-identical to decoding then calling [`scale_add`].
///
/// # Panics
/// If the dtype is not mixable, lengths mismatch, or scales are given for a non-FP8 dtype or do
/// not fit the band.
pub fn accumulate(
    dtype: DType,
    src: &[u8],
    scales: Option<(&[f32], usize)>,
    w: f32,
    acc: &mut [f32],
    first: bool,
) {
    accumulate_at(simd_level(), dtype, src, scales, w, acc, first)
}

#[track_caller]
fn check_accumulate(dtype: DType, src_len: usize, scales: Option<(&[f32], usize)>, n: usize) {
    check_mixable(dtype);
    assert_eq!(
        src_len,
        n * dtype.size(),
        "kernels::accumulate: length mismatch"
    );
    if let Some((s, cols)) = scales {
        assert!(
            dtype == DType::F8E4M3,
            "kernels::accumulate: block scales given for {dtype}"
        );
        check_scales(n, cols, s.len());
    }
}

fn accumulate_at(
    level: SimdLevel,
    dtype: DType,
    src: &[u8],
    scales: Option<(&[f32], usize)>,
    w: f32,
    acc: &mut [f32],
    first: bool,
) {
    check_accumulate(dtype, src.len(), scales, acc.len());
    accumulate_mv(level, dtype, src, scales, w, acc, first)
}

multiversion! {
    fn accumulate_mv<LV>(
        dtype: DType,
        src: &[u8],
        scales: Option<(&[f32], usize)>,
        w: f32,
        acc: &mut [f32],
        first: bool,
    ) {
        accumulate_range::<LV>(dtype, src, scales, 0, w, acc, first)
    }
}

/// Accumulates elements `start .. start + acc.len()` of a band (`src` is the whole band).
#[inline(always)]
fn accumulate_range<const LV: u8>(
    dtype: DType,
    src: &[u8],
    scales: Option<(&[f32], usize)>,
    start: usize,
    w: f32,
    acc: &mut [f32],
    first: bool,
) {
    let sz = dtype.size();
    match scales {
        None => axpy_any::<LV>(
            dtype,
            &src[start * sz..(start + acc.len()) * sz],
            None,
            w,
            acc,
            first,
        ),
        Some((sc, cols)) => {
            // Segments of constant scale: within one row and one 128-column block.
            let nbc = cols.div_ceil(FP8_BLOCK);
            let end = start + acc.len();
            let mut k = start;
            while k < end {
                let row = k / cols;
                let col = k - row * cols;
                let bc = col / FP8_BLOCK;
                let seg_end = end.min(row * cols + cols.min((bc + 1) * FP8_BLOCK));
                let s = sc[(row / FP8_BLOCK) * nbc + bc];
                axpy_dispatch::<Fp8, LV>(
                    &src[k..seg_end],
                    Some(s),
                    w,
                    &mut acc[k - start..seg_end - start],
                    first,
                );
                k = seg_end;
            }
        }
    }
}

/// One parent's contribution to [`mix`].
#[derive(Clone, Copy, Debug)]
pub struct MixInput<'a> {
    /// The parent's dtype for this tensor (mixable).
    pub dtype: DType,
    /// The parent's bytes of the band (same element count as the output).
    pub bytes: &'a [u8],
    /// FP8 only: the band's block scales (`ceil(nrows/128) × ceil(cols/128)`); `None` uses the
    /// stored codes as values.
    pub scales: Option<&'a [f32]>,
    /// λ of this parent, already converted to f32.
    pub weight: f32,
}

/// Fused mix of a band: exactly `accumulate(input_i, first = i == 0)` for every input in
/// order, then `encode(out_dtype)` or, for FP8, [`quantize_fp8`] (which writes `out_scales`),
/// computed in cache-sized tiles (FP8 output: one 128×128 block at a time) without a
/// full-size f32 buffer. For FP8 inputs or output `cols` is the row length and the band starts
/// at a multiple of 128 rows; otherwise `cols` is ignored.
///
/// # Panics
/// If `inputs` is empty, a dtype is not mixable, lengths do not fit, `out_scales` is missing
/// (or given) for an FP8 (non-FP8) output, or scales do not fit the band.
pub fn mix(
    inputs: &[MixInput<'_>],
    cols: usize,
    out_dtype: DType,
    out: &mut [u8],
    out_scales: Option<&mut [f32]>,
) {
    mix_at(simd_level(), inputs, cols, out_dtype, out, out_scales)
}

#[track_caller]
fn check_mix(
    inputs: &[MixInput<'_>],
    cols: usize,
    out_dtype: DType,
    out_len: usize,
    out_scales: Option<usize>,
) -> usize {
    assert!(!inputs.is_empty(), "kernels::mix: no inputs");
    check_mixable(out_dtype);
    assert!(
        out_len.is_multiple_of(out_dtype.size()),
        "kernels::mix: output length not whole elements"
    );
    let n = out_len / out_dtype.size();
    for p in inputs {
        check_accumulate(p.dtype, p.bytes.len(), p.scales.map(|s| (s, cols)), n);
    }
    match (out_dtype, out_scales) {
        (DType::F8E4M3, Some(len)) => {
            check_scales(n, cols, len);
        }
        (DType::F8E4M3, None) => panic!("kernels::mix: FP8 output needs out_scales"),
        (_, Some(_)) => panic!("kernels::mix: out_scales given for {out_dtype} output"),
        (_, None) => {}
    }
    n
}

fn mix_at(
    level: SimdLevel,
    inputs: &[MixInput<'_>],
    cols: usize,
    out_dtype: DType,
    out: &mut [u8],
    out_scales: Option<&mut [f32]>,
) {
    let n = check_mix(
        inputs,
        cols,
        out_dtype,
        out.len(),
        out_scales.as_ref().map(|s| s.len()),
    );
    match out_scales {
        None => mix_tiles_mv(level, inputs, cols, out_dtype, out, n),
        Some(out_scales) => {
            let mut tile = FP8_TILE.take();
            tile.resize(FP8_BLOCK * TILE_COLS, 0.0);
            mix_fp8_mv(level, inputs, cols, out, out_scales, n, &mut tile);
            FP8_TILE.set(tile);
        }
    }
}

multiversion! {
    /// Non-FP8 output: L1-sized tiles of the flat element range.
    fn mix_tiles_mv<LV>(inputs: &[MixInput<'_>], cols: usize, out_dtype: DType, out: &mut [u8], n: usize) {
        const T: usize = 512;
        let mut tile = [0f32; T];
        let sz = out_dtype.size();
        let mut k = 0;
        while k < n {
            let m = T.min(n - k);
            let t = &mut tile[..m];
            for (i, p) in inputs.iter().enumerate() {
                accumulate_range::<LV>(p.dtype, p.bytes, p.scales.map(|s| (s, cols)), k, p.weight, t, i == 0);
            }
            encode_any(out_dtype, t, &mut out[k * sz..(k + m) * sz]);
            k += m;
        }
    }
}

multiversion! {
    /// FP8 output: per block row, tiles of 128 rows × `TILE_COLS` columns (mix row by row,
    /// block amaxes, quantize), in the caller's scratch of `128 * TILE_COLS` floats.
    fn mix_fp8_mv<LV>(
        inputs: &[MixInput<'_>],
        cols: usize,
        out: &mut [u8],
        out_scales: &mut [f32],
        n: usize,
        tile: &mut [f32],
    ) {
        let (nrows, nbr, nbc) = band_dims(n, cols);
        let vbmi = LV == LV_AVX512 && vbmi_enabled();
        for br in 0..nbr {
            let r0 = br * FP8_BLOCK;
            let rows = FP8_BLOCK.min(nrows - r0);
            // Two FP8 parents with block scales (the common case): one fused kernel per block
            // row on AVX-512 VBMI, unless a scale or weight is NaN (then which NaN wins in
            // `value × scale` needs the selects of the generic path).
            #[cfg(target_arch = "x86_64")]
            if let (true, [p, q]) = (vbmi, inputs) {
                if let (DType::F8E4M3, DType::F8E4M3, Some(ps), Some(qs)) = (p.dtype, q.dtype, p.scales, q.scales) {
                    let blk = br * nbc..(br + 1) * nbc;
                    let (ps, qs) = (&ps[blk.clone()], &qs[blk.clone()]);
                    if x86::band_ok(ps, qs, p.weight, q.weight) {
                        // SAFETY: the CPU has AVX-512 F/BW/VL and VBMI (`vbmi`).
                        unsafe {
                            x86::mix2_fp8_band_vbmi(
                                p.bytes, ps, p.weight, q.bytes, qs, q.weight, cols, r0, rows,
                                &mut out[r0 * cols..(r0 + rows) * cols],
                                &mut out_scales[blk],
                            )
                        };
                        continue;
                    }
                }
            }
            let mut c0 = 0;
            while c0 < cols {
                let c1 = (c0 + TILE_COLS).min(cols);
                let w = c1 - c0;
                let mut lanes = [[0u32; FP8_BLOCK]; TILE_COLS / FP8_BLOCK];
                for r in 0..rows {
                    let t = &mut tile[r * w..(r + 1) * w];
                    let k = (r0 + r) * cols + c0;
                    // The rows of a tile are `cols` apart, each a short run the hardware
                    // prefetchers barely see: fetch a later row's runs while this one computes.
                    if r0 + r + PREFETCH_ROWS < nrows {
                        let k = k + PREFETCH_ROWS * cols;
                        for p in inputs {
                            let sz = p.dtype.size();
                            prefetch(&p.bytes[k * sz..(k + w) * sz]);
                        }
                    }
                    // The common case, two FP8 parents with block scales: one fused pass.
                    if let [p, q] = inputs {
                        if let (DType::F8E4M3, DType::F8E4M3, Some(ps), Some(qs)) = (p.dtype, q.dtype, p.scales, q.scales) {
                            let (ps, qs) = (&ps[br * nbc + c0 / FP8_BLOCK..], &qs[br * nbc + c0 / FP8_BLOCK..]);
                            let (pa, qa) = (&p.bytes[k..k + w], &q.bytes[k..k + w]);
                            for (((a, b), o), (sa, sb)) in pa
                                .chunks(FP8_BLOCK)
                                .zip(qa.chunks(FP8_BLOCK))
                                .zip(t.chunks_mut(FP8_BLOCK))
                                .zip(ps.iter().zip(qs))
                            {
                                axpy2_fp8::<LV>(a, *sa, p.weight, b, *sb, q.weight, o);
                            }
                            tile_row_amax(&mut lanes, &tile[r * w..(r + 1) * w]);
                            continue;
                        }
                    }
                    for (i, p) in inputs.iter().enumerate() {
                        let sz = p.dtype.size();
                        let src = &p.bytes[k * sz..(k + w) * sz];
                        match p.scales {
                            None => axpy_any::<LV>(p.dtype, src, None, p.weight, t, i == 0),
                            Some(sc) => {
                                // One 128-column block (one scale) at a time.
                                let sc = &sc[br * nbc + c0 / FP8_BLOCK..];
                                for ((seg, a), s) in src.chunks(FP8_BLOCK).zip(t.chunks_mut(FP8_BLOCK)).zip(sc) {
                                    axpy_dispatch::<Fp8, LV>(seg, Some(*s), p.weight, a, i == 0);
                                }
                            }
                        }
                    }
                    // The row is final and hot in L1: fold it into the block amaxes now
                    // rather than rereading the whole tile from L2 later.
                    tile_row_amax(&mut lanes, &tile[r * w..(r + 1) * w]);
                }
                let codes = &mut out[r0 * cols..(r0 + rows) * cols];
                quant_tile_lanes::<LV>(tile, w, rows, c0, c1, cols, codes, &mut out_scales[br * nbc..], &lanes);
                c0 = c1;
            }
        }
    }
}

thread_local! {
    /// Reused scratch of [`mix`] with FP8 output (256 KiB per thread; fresh memory is slow).
    static FP8_TILE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The sign of the δ statistic sqrt(Σ (a−b)²)/sqrt(n) between two tensors of one dtype,
/// decided without computing it: what δ = 0 needs ("is the statistic above 0?").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiffSign {
    /// Every element pair is numerically equal (±0 count as equal): the statistic is 0.
    Zero,
    /// Some pair differs and no NaN arises: the statistic is positive.
    Positive,
    /// A NaN operand, or an infinity minus itself: the statistic is NaN.
    NaN,
}

/// Per element: 0 equal, 1 differ, 2 NaN (as (a−b)² in f64 would be), from raw bits.
#[inline(always)]
fn sign_bits(a: u32, b: u32, mag: u32, inf: u32) -> u8 {
    let (ma, mb) = (a & mag, b & mag);
    let nan = (ma > inf) | (mb > inf) | ((a == b) & (ma == inf));
    let equal = (a == b) | ((ma == 0) & (mb == 0));
    if nan {
        2
    } else {
        (!equal) as u8
    }
}

/// [`DiffSign`] of two tensors of the same dtype's stored values (FP8 codes without scales),
/// in one pass over the bytes. Exactly the sign of [`sum_sq_diff_bytes`] (tests check this);
/// `None` when the dtypes differ or are not mixable (compute the statistic instead).
pub fn diff_sign_bytes(dtype_a: DType, a: &[u8], dtype_b: DType, b: &[u8]) -> Option<DiffSign> {
    if dtype_a != dtype_b || a.len() != b.len() {
        return None;
    }
    let mut worst = 0u8;
    match dtype_a {
        DType::F8E4M3 => {
            // No infinities in e4m3fn; NaN is S.1111.111.
            for (ca, cb) in a.chunks(4096).zip(b.chunks(4096)) {
                let mut m = 0u8;
                for (&x, &y) in ca.iter().zip(cb) {
                    let nan = ((x & 0x7f) == 0x7f) | ((y & 0x7f) == 0x7f);
                    let differ = (x != y) & !(((x & 0x7f) == 0) & ((y & 0x7f) == 0));
                    m |= ((nan as u8) << 1) | differ as u8;
                }
                worst |= m;
                if worst & 2 != 0 {
                    return Some(DiffSign::NaN);
                }
            }
        }
        DType::BF16 | DType::F16 => {
            let (mag, inf) = if dtype_a == DType::BF16 {
                (0x7fff, 0x7f80)
            } else {
                (0x7fff, 0x7c00)
            };
            for (ca, cb) in a.chunks(8192).zip(b.chunks(8192)) {
                let mut m = 0u8;
                for (x, y) in ca.chunks_exact(2).zip(cb.chunks_exact(2)) {
                    let x = u16::from_le_bytes([x[0], x[1]]) as u32;
                    let y = u16::from_le_bytes([y[0], y[1]]) as u32;
                    m = m.max(sign_bits(x, y, mag, inf));
                }
                worst = worst.max(m);
                if worst == 2 {
                    return Some(DiffSign::NaN);
                }
            }
        }
        DType::F32 => {
            for (ca, cb) in a.chunks(16384).zip(b.chunks(16384)) {
                let mut m = 0u8;
                for (x, y) in ca.chunks_exact(4).zip(cb.chunks_exact(4)) {
                    let x = u32::from_le_bytes([x[0], x[1], x[2], x[3]]);
                    let y = u32::from_le_bytes([y[0], y[1], y[2], y[3]]);
                    m = m.max(sign_bits(x, y, 0x7fff_ffff, 0x7f80_0000));
                }
                worst = worst.max(m);
                if worst == 2 {
                    return Some(DiffSign::NaN);
                }
            }
        }
        DType::Other(_) => return None,
    }
    Some(if worst & 2 != 0 {
        DiffSign::NaN
    } else if worst & 1 != 0 {
        DiffSign::Positive
    } else {
        DiffSign::Zero
    })
}

/// The sign of a computed statistic sum (the reference [`diff_sign_bytes`] is tested against).
pub fn sign_of_sum(sum: f64) -> DiffSign {
    if sum.is_nan() {
        DiffSign::NaN
    } else if sum > 0.0 {
        DiffSign::Positive
    } else {
        DiffSign::Zero
    }
}

// ---------------------------------------------------------------------------------------------
// Scalar reference
// ---------------------------------------------------------------------------------------------

/// Plain scalar reference of every kernel, written from the definitions (numpy's half-float
/// algorithm for F16, exact rounding arithmetic for FP8 and BF16), element by element. Slow;
/// for tests and as the specification of the fast paths.
pub mod scalar {
    use super::{
        check_accumulate, check_encodable, check_mix, check_mixable, check_scales, MixInput,
    };
    use super::{DType, FP8_BLOCK, FP8_MAX};

    fn pow2_f64(k: i32) -> f64 {
        let mut v = 1.0f64;
        if k >= 0 {
            for _ in 0..k {
                v *= 2.0;
            }
        } else {
            for _ in 0..-k {
                v *= 0.5;
            }
        }
        v
    }

    /// FP8 E4M3FN code → f32: `(-1)^s × m × 2^-9` (e = 0), `(-1)^s × (8+m) × 2^(e-10)`, NaN for
    /// e = 15, m = 7.
    pub fn fp8_to_f32(code: u8) -> f32 {
        let neg = code & 0x80 != 0;
        let e = ((code >> 3) & 0xf) as i32;
        let m = (code & 7) as i32;
        if e == 15 && m == 7 {
            return f32::from_bits(if neg { 0xffc0_0000 } else { 0x7fc0_0000 });
        }
        let mag = if e == 0 {
            m as f64 * pow2_f64(-9)
        } else {
            (8 + m) as f64 * pow2_f64(e - 10)
        } as f32;
        if neg {
            -mag
        } else {
            mag
        }
    }

    /// f32 → FP8 E4M3FN: the nearest multiple of the grid spacing at |x|'s binade (2^-9 below
    /// 2^-6), ties to even; results above 448, ±inf and NaN → NaN with the sign.
    pub fn f32_to_fp8(x: f32) -> u8 {
        let sign: u8 = if x.is_sign_negative() { 0x80 } else { 0 };
        if !x.is_finite() {
            return sign | 0x7f;
        }
        let a = (x as f64).abs();
        if a >= 480.0 {
            return sign | 0x7f;
        }
        let binade = |v: f64| {
            let mut e = -6i32;
            while v >= pow2_f64(e + 1) {
                e += 1;
            }
            e
        };
        let q = pow2_f64(binade(a) - 3);
        let r = (a / q).round_ties_even() * q;
        if r > FP8_MAX as f64 {
            return sign | 0x7f;
        }
        let code = if r < pow2_f64(-6) {
            (r / pow2_f64(-9)) as u8
        } else {
            let e = binade(r);
            let m = (r / pow2_f64(e - 3)) as u8 - 8;
            (((e + 7) as u8) << 3) | m
        };
        sign | code
    }

    /// BF16 bits → f32.
    pub fn bf16_to_f32(b: u16) -> f32 {
        f32::from_bits((b as u32) << 16)
    }

    /// f32 → BF16: the nearer of the two neighbouring BF16 values (ties to even mantissa; the
    /// neighbour past the largest finite value counts as 2^128 and encodes as inf); NaN →
    /// `0x7fc0` | sign.
    pub fn f32_to_bf16(x: f32) -> u16 {
        let b = x.to_bits();
        let sign = ((b >> 16) as u16) & 0x8000;
        if x.is_nan() {
            return sign | 0x7fc0;
        }
        if x.is_infinite() {
            return sign | 0x7f80;
        }
        let lo = ((b >> 16) as u16) & 0x7fff; // truncation toward zero
        let hi = lo + 1;
        let v = (x as f64).abs();
        let vlo = bf16_to_f32(lo) as f64;
        let vhi = if hi == 0x7f80 {
            pow2_f64(128)
        } else {
            bf16_to_f32(hi) as f64
        };
        let (dlo, dhi) = (v - vlo, vhi - v);
        sign | if dlo < dhi || (dlo == dhi && lo & 1 == 0) {
            lo
        } else {
            hi
        }
    }

    /// IEEE half → f32, numpy's `npy_halfbits_to_floatbits`.
    pub fn f16_to_f32(h: u16) -> f32 {
        let h_exp = h & 0x7c00;
        let f_sgn = ((h as u32) & 0x8000) << 16;
        let bits = match h_exp {
            0 => {
                let mut h_sig = h & 0x03ff;
                if h_sig == 0 {
                    f_sgn
                } else {
                    let mut e: u32 = 0;
                    h_sig <<= 1;
                    while h_sig & 0x0400 == 0 {
                        h_sig <<= 1;
                        e += 1;
                    }
                    let f_exp = (127 - 15 - e) << 23;
                    let f_sig = ((h_sig & 0x03ff) as u32) << 13;
                    f_sgn + f_exp + f_sig
                }
            }
            0x7c00 => f_sgn + 0x7f80_0000 + (((h & 0x03ff) as u32) << 13),
            _ => f_sgn + ((((h & 0x7fff) as u32) + 0x1_c000) << 13),
        };
        f32::from_bits(bits)
    }

    /// f32 → IEEE half, numpy's `npy_floatbits_to_halfbits`.
    pub fn f32_to_f16(x: f32) -> u16 {
        let f = x.to_bits();
        let h_sgn = ((f & 0x8000_0000) >> 16) as u16;
        let f_exp = f & 0x7f80_0000;
        if f_exp >= 0x4780_0000 {
            if f_exp == 0x7f80_0000 {
                let f_sig = f & 0x007f_ffff;
                if f_sig != 0 {
                    let mut ret = (0x7c00 + (f_sig >> 13)) as u16;
                    if ret == 0x7c00 {
                        ret += 1;
                    }
                    return h_sgn + ret;
                }
                return h_sgn + 0x7c00;
            }
            return h_sgn + 0x7c00;
        }
        if f_exp <= 0x3800_0000 {
            if f_exp < 0x3300_0000 {
                return h_sgn;
            }
            let e = f_exp >> 23;
            let mut f_sig = 0x0080_0000 + (f & 0x007f_ffff);
            f_sig >>= 113 - e;
            if (f_sig & 0x3fff) != 0x1000 || (f & 0x7ff) != 0 {
                f_sig += 0x1000;
            }
            return h_sgn + (f_sig >> 13) as u16;
        }
        let h_exp = ((f_exp - 0x3800_0000) >> 13) as u16;
        let mut f_sig = f & 0x007f_ffff;
        if (f_sig & 0x3fff) != 0x1000 {
            f_sig += 0x1000;
        }
        let h_sig = (f_sig >> 13) as u16;
        // A carry out of the mantissa increments the exponent (up to inf): correct.
        h_sgn + h_exp + h_sig
    }

    fn decode_one(dtype: DType, b: &[u8]) -> f32 {
        match dtype {
            DType::BF16 => bf16_to_f32(u16::from_le_bytes([b[0], b[1]])),
            DType::F16 => f16_to_f32(u16::from_le_bytes([b[0], b[1]])),
            DType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            DType::F8E4M3 => fp8_to_f32(b[0]),
            DType::Other(_) => unreachable!(),
        }
    }

    /// Reference of [`super::decode`].
    pub fn decode(dtype: DType, src: &[u8], out: &mut [f32]) {
        check_mixable(dtype);
        assert_eq!(
            src.len(),
            out.len() * dtype.size(),
            "kernels::decode: length mismatch"
        );
        let sz = dtype.size();
        for (i, o) in out.iter_mut().enumerate() {
            *o = decode_one(dtype, &src[i * sz..]);
        }
    }

    /// Reference of [`super::dequant_fp8`].
    pub fn dequant_fp8(src: &[u8], cols: usize, scales: &[f32], out: &mut [f32]) {
        assert_eq!(
            src.len(),
            out.len(),
            "kernels::dequant_fp8: length mismatch"
        );
        let (nrows, _, nbc) = check_scales(src.len(), cols, scales.len());
        for r in 0..nrows {
            for c in 0..cols {
                let s = scales[(r / FP8_BLOCK) * nbc + c / FP8_BLOCK];
                let d = fp8_to_f32(src[r * cols + c]);
                // A NaN code stays the code's NaN even if the scale is NaN too.
                out[r * cols + c] = if d.is_nan() { d } else { d * s };
            }
        }
    }

    /// Reference of [`super::scale_add`].
    pub fn scale_add(acc: &mut [f32], w: f32, d: &[f32], first: bool) {
        assert_eq!(acc.len(), d.len(), "kernels::scale_add: length mismatch");
        for (a, x) in acc.iter_mut().zip(d) {
            let p = w * *x;
            // When both are NaN the result is the accumulator's NaN.
            *a = if first {
                p
            } else if a.is_nan() {
                *a
            } else {
                *a + p
            };
        }
    }

    /// Reference of [`super::encode`].
    pub fn encode(dtype: DType, src: &[f32], out: &mut [u8]) {
        check_encodable(dtype);
        assert_eq!(
            out.len(),
            src.len() * dtype.size(),
            "kernels::encode: length mismatch"
        );
        for (i, x) in src.iter().enumerate() {
            match dtype {
                DType::BF16 => {
                    out[2 * i..2 * i + 2].copy_from_slice(&f32_to_bf16(*x).to_le_bytes())
                }
                DType::F16 => out[2 * i..2 * i + 2].copy_from_slice(&f32_to_f16(*x).to_le_bytes()),
                _ => out[4 * i..4 * i + 4].copy_from_slice(&x.to_le_bytes()),
            }
        }
    }

    /// Reference of [`super::quantize_fp8`].
    pub fn quantize_fp8(acc: &[f32], cols: usize, codes: &mut [u8], scales: &mut [f32]) {
        assert_eq!(
            acc.len(),
            codes.len(),
            "kernels::quantize_fp8: length mismatch"
        );
        let (nrows, nbr, nbc) = check_scales(acc.len(), cols, scales.len());
        for br in 0..nbr {
            for bc in 0..nbc {
                let rows = br * FP8_BLOCK..(br * FP8_BLOCK + FP8_BLOCK).min(nrows);
                let cs = bc * FP8_BLOCK..(bc * FP8_BLOCK + FP8_BLOCK).min(cols);
                let mut amax_bits = 0u32;
                for r in rows.clone() {
                    for c in cs.clone() {
                        amax_bits = amax_bits.max(acc[r * cols + c].to_bits() & 0x7fff_ffff);
                    }
                }
                let amax = f32::from_bits(amax_bits);
                let scale = if amax == 0.0 { 1.0 } else { amax / FP8_MAX };
                scales[br * nbc + bc] = scale;
                for r in rows.clone() {
                    for c in cs.clone() {
                        codes[r * cols + c] = f32_to_fp8(acc[r * cols + c] / scale);
                    }
                }
            }
        }
    }

    /// Reference of [`super::sum_sq_diff`].
    pub fn sum_sq_diff(a: &[f32], b: &[f32]) -> f64 {
        assert_eq!(a.len(), b.len(), "kernels::sum_sq_diff: length mismatch");
        let mut l = [0f64; 8];
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            let d = *x as f64 - *y as f64;
            l[i % 8] += d * d;
        }
        let s = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
        if s.is_nan() {
            f64::NAN
        } else {
            s
        }
    }

    /// Reference of [`super::sum_sq_diff_bytes`]: decode both, then [`sum_sq_diff`].
    pub fn sum_sq_diff_bytes(dtype_a: DType, a: &[u8], dtype_b: DType, b: &[u8]) -> f64 {
        check_mixable(dtype_a);
        check_mixable(dtype_b);
        let n = a.len() / dtype_a.size();
        assert!(
            a.len().is_multiple_of(dtype_a.size()) && b.len() == n * dtype_b.size(),
            "kernels::sum_sq_diff_bytes: length mismatch"
        );
        let mut x = vec![0f32; n];
        let mut y = vec![0f32; n];
        decode(dtype_a, a, &mut x);
        decode(dtype_b, b, &mut y);
        sum_sq_diff(&x, &y)
    }

    /// Reference of [`super::accumulate`]: decode (or dequantize), then [`scale_add`].
    pub fn accumulate(
        dtype: DType,
        src: &[u8],
        scales: Option<(&[f32], usize)>,
        w: f32,
        acc: &mut [f32],
        first: bool,
    ) {
        check_accumulate(dtype, src.len(), scales, acc.len());
        let mut d = vec![0f32; acc.len()];
        match scales {
            Some((s, cols)) => dequant_fp8(src, cols, s, &mut d),
            None => decode(dtype, src, &mut d),
        }
        scale_add(acc, w, &d, first);
    }

    /// Reference of [`super::mix`]: [`accumulate`] every input in order into a full-size f32
    /// buffer, then [`encode`] or [`quantize_fp8`].
    pub fn mix(
        inputs: &[MixInput<'_>],
        cols: usize,
        out_dtype: DType,
        out: &mut [u8],
        out_scales: Option<&mut [f32]>,
    ) {
        let n = check_mix(
            inputs,
            cols,
            out_dtype,
            out.len(),
            out_scales.as_ref().map(|s| s.len()),
        );
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
        match out_scales {
            Some(s) => quantize_fp8(&acc, cols, out, s),
            None => encode(out_dtype, &acc, out),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        /// Set while a test runs the AVX-512 level without its VBMI paths ([`vbmi_enabled`]).
        pub(super) static NO_VBMI: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
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

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Asserts equality, reporting only the first differing element.
    #[track_caller]
    fn same<T: PartialEq + std::fmt::Debug>(got: &[T], want: &[T], what: &str) {
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
                with_vbmi(vbmi, || {
                    mix_at(lv, &inputs, cols, DType::F8E4M3, &mut got, Some(&mut got_s))
                });
                same(&got, &want, &format!("{rows}x{cols} {lvs}"));
                same(
                    &bits(&got_s),
                    &bits(&want_s),
                    &format!("scales {rows}x{cols} {lvs}"),
                );
            }
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
}

#[cfg(test)]
mod diff_sign_tests {
    use super::*;

    fn rng(seed: &mut u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    }

    /// Specials of each dtype (bit patterns): ±0, ±inf, NaNs, subnormals, max, ones.
    fn specials(dt: DType) -> Vec<u32> {
        match dt {
            DType::F8E4M3 => vec![0x00, 0x80, 0x7f, 0xff, 0x01, 0x81, 0x7e, 0xfe, 0x38, 0xb8],
            DType::BF16 => vec![
                0x0000, 0x8000, 0x7f80, 0xff80, 0x7fc0, 0xffc1, 0x7f81, 0x0001, 0x8001, 0x7f7f,
                0x3f80, 0xbf80,
            ],
            DType::F16 => vec![
                0x0000, 0x8000, 0x7c00, 0xfc00, 0x7e00, 0xfc01, 0x0001, 0x8001, 0x7bff, 0x3c00,
                0xbc00,
            ],
            _ => vec![
                0,
                0x8000_0000,
                0x7f80_0000,
                0xff80_0000,
                0x7fc0_0000,
                0xff80_0001,
                1,
                0x8000_0001,
                0x7f7f_ffff,
                0x3f80_0000,
            ],
        }
    }

    fn to_bytes(dt: DType, v: &[u32]) -> Vec<u8> {
        v.iter()
            .flat_map(|&x| match dt.size() {
                1 => vec![x as u8],
                2 => (x as u16).to_le_bytes().to_vec(),
                _ => x.to_le_bytes().to_vec(),
            })
            .collect()
    }

    #[test]
    fn sign_equals_the_sign_of_the_statistic() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for dt in [DType::F8E4M3, DType::BF16, DType::F16, DType::F32] {
            let sp = specials(dt);
            let mask = if dt.size() == 4 {
                u32::MAX
            } else {
                (1u32 << (8 * dt.size())) - 1
            };
            // Every pair of specials, alone and inside longer random-equal tensors.
            for &x in &sp {
                for &y in &sp {
                    for len in [1usize, 3, 4097, 9000] {
                        let mut a: Vec<u32> =
                            (0..len).map(|_| rng(&mut seed) as u32 & mask).collect();
                        // Keep the filler free of NaN so the special decides.
                        for v in a.iter_mut() {
                            *v &= mask >> 2;
                        }
                        let mut b = a.clone();
                        let at = (rng(&mut seed) as usize) % len;
                        a[at] = x;
                        b[at] = y;
                        let (ab, bb) = (to_bytes(dt, &a), to_bytes(dt, &b));
                        let want = sign_of_sum(scalar::sum_sq_diff_bytes(dt, &ab, dt, &bb));
                        assert_eq!(
                            diff_sign_bytes(dt, &ab, dt, &bb),
                            Some(want),
                            "{dt} {x:#x} vs {y:#x} len {len}"
                        );
                    }
                }
            }
            // Random tensors with a few random differences.
            for len in [0usize, 1, 7, 64, 1000, 20000] {
                let a: Vec<u32> = (0..len).map(|_| rng(&mut seed) as u32 & mask).collect();
                let mut b = a.clone();
                for _ in 0..(rng(&mut seed) % 3) {
                    if len > 0 {
                        let i = rng(&mut seed) as usize % len;
                        b[i] = rng(&mut seed) as u32 & mask;
                    }
                }
                let (ab, bb) = (to_bytes(dt, &a), to_bytes(dt, &b));
                let want = sign_of_sum(scalar::sum_sq_diff_bytes(dt, &ab, dt, &bb));
                assert_eq!(
                    diff_sign_bytes(dt, &ab, dt, &bb),
                    Some(want),
                    "{dt} random len {len}"
                );
            }
        }
        assert_eq!(
            diff_sign_bytes(DType::F8E4M3, &[1], DType::BF16, &[1, 0]),
            None
        );
    }
}
