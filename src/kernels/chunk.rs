//! The inlined building blocks of the fast paths: per-dtype chunk decoders/encoders over
//! fixed-size arrays, the `chunked!` tail macro, the NaN-first add/multiply and the
//! decode/axpy/encode loops every public kernel is made of.

use super::codec::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16, fp8_to_f32};
use super::simd::{LV_AVX512, LV_PORTABLE};
#[cfg(target_arch = "x86_64")]
use super::x86;
use crate::model::dtype::DType;

/// Lanes per chunk of the vectorizable loops.
pub(super) const L: usize = 64;

// Every loop below works on whole chunks of L elements held in fixed-size arrays (`&[u8; 128]`,
// `[f32; 64]`, ...): with the lengths known, LLVM drops the bounds checks and vectorizes each
// chunk's inner loop (one `vpmovzxwd` load per 16 BF16 values with AVX-512). With chunks of 16
// it fully unrolled them first and then vectorized *across* chunks with gathers/scatters.
// A tail shorter than L is padded into a local chunk, run through the same code, copied back.

/// The `&[T; N]` view of a slice of exactly N elements (the callers guarantee the length).
#[inline(always)]
pub(super) fn arr<T, const N: usize>(c: &[T]) -> &[T; N] {
    c.try_into().expect("chunk length")
}

#[inline(always)]
pub(super) fn arr_mut<T, const N: usize>(c: &mut [T]) -> &mut [T; N] {
    c.try_into().expect("chunk length")
}

/// A stored dtype read as f32, a chunk of L elements at a time.
pub(super) trait Dec {
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
pub(super) trait Enc {
    const SIZE: usize;
    /// `o` holds exactly `L * SIZE` bytes.
    fn put_chunk(o: &mut [u8], v: &[f32; L]);
}

pub(super) struct Bf16;
pub(super) struct F16;
pub(super) struct F32;
pub(super) struct Fp8;

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
pub(super) use chunked;

/// `a + b`, except that a NaN `a` is returned as is: when both are NaN the result is `a`'s
/// NaN (what x86 `addps a, b` does; LLVM may swap the operands of a bare `+`).
#[inline(always)]
pub(super) fn add_nan_first(a: f32, b: f32) -> f32 {
    let s = a + b;
    if a.is_nan() {
        a
    } else {
        s
    }
}

/// `a * b` with the same first-operand NaN rule as [`add_nan_first`].
#[inline(always)]
pub(super) fn mul_nan_first(a: f32, b: f32) -> f32 {
    let p = a * b;
    if a.is_nan() {
        a
    } else {
        p
    }
}

/// out[i] = dec(src[i]) (× s if SCALED).
#[inline(always)]
pub(super) fn map_k<D: Dec, const LV: u8, const SCALED: bool>(src: &[u8], s: f32, out: &mut [f32]) {
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
pub(super) fn axpy_k<D: Dec, const LV: u8, const SCALED: bool, const FIRST: bool>(
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
pub(super) fn axpy2_fp8<const LV: u8>(
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
pub(super) fn axpy_dispatch<D: Dec, const LV: u8>(
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
pub(super) fn scale_add_k(acc: &mut [f32], w: f32, d: &[f32], first: bool) {
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
pub(super) fn encode_k<E: Enc>(src: &[f32], out: &mut [u8]) {
    chunked!(src, 1, out, E::SIZE, |s, o| {
        E::put_chunk(o, arr(s));
    })
}

#[inline(always)]
pub(super) fn decode_any<const LV: u8>(dtype: DType, src: &[u8], out: &mut [f32]) {
    match dtype {
        DType::BF16 => map_k::<Bf16, LV, false>(src, 0.0, out),
        DType::F16 => map_k::<F16, LV, false>(src, 0.0, out),
        DType::F32 => map_k::<F32, LV, false>(src, 0.0, out),
        DType::F8E4M3 => map_k::<Fp8, LV, false>(src, 0.0, out),
        DType::Other(_) => unreachable!("checked by the caller"),
    }
}

#[inline(always)]
pub(super) fn encode_any(dtype: DType, src: &[f32], out: &mut [u8]) {
    match dtype {
        DType::BF16 => encode_k::<Bf16>(src, out),
        DType::F16 => encode_k::<F16>(src, out),
        DType::F32 => encode_k::<F32>(src, out),
        _ => unreachable!("checked by the caller"),
    }
}

#[inline(always)]
pub(super) fn axpy_any<const LV: u8>(
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
