//! MXFP4 (OCP Microscaling FP4, GPT-OSS MoE experts): decode, requantize and the fused mix.
//!
//! A tensor `X` is stored as the pair `X_blocks` (U8, `[..., G, 16]`: 16 bytes = 32 E2M1 codes
//! per block) and `X_scales` (U8, `[..., G]`: one E8M0 exponent per block).
//!
//! # Exact semantics (binding; `docs/semantics.md`)
//!
//! * Value `j` (0..32) of block `g` is in byte `16g + j/2`: the LOW nibble for even `j`, the
//!   HIGH nibble for odd `j`.
//! * E2M1 code `c`: sign = bit 3, magnitude `c & 7` → {0, 0.5, 1, 1.5, 2, 3, 4, 6}; code 8 is
//!   −0.0.
//! * E8M0 byte `s`: scale = 2^(s−127) as an f32 (`s = 0`: 2^−127, subnormal, exact); `s = 255`
//!   is NaN: every value of the block decodes to `0x7fc0_0000`.
//! * Value = E2M1(c) × scale, one f32 multiply (6 × 2^127 overflows to +inf).
//! * Encode of a block of 32 f32 `x`: if some `x` is NaN or max |x| is +inf → scale 255 and 16
//!   zero code bytes. Else `e = floor(log2(amax)) − 2` (exact, from the bits; subnormal amax
//!   and amax = 0 clamp), clamped to `e ≥ −127`; scale byte `e + 127`; code of each element =
//!   E2M1 of `q = x / 2^e` (one f32 division): nearest of the magnitudes, ties to an even `m`
//!   (0.25→0, 0.75→1, 1.25→1, 1.75→2, 2.5→2, 3.5→4, 5→4), |q| > 6 → 6, sign bit of `x` in
//!   bit 3 (a negative value that rounds to 0 gives code 8).
//!
//! From the bits: with `E` the biased exponent of amax (0 for zero and subnormals), the scale
//! byte is `max(E − 2, 0)` (subnormal amax has floor(log2) ≤ −127, so `e` clamps) and 255 when
//! `E = 255` (inf/NaN). The byte of an encoded block is therefore never 253 or 254.
//!
//! The fast path multiplies by `2^−e` instead of dividing by `2^e`: `2^−e` (2^−125..2^127) is an
//! exact f32, so `x × 2^−e` and `x / 2^e` are the same real number, and IEEE multiplication and
//! division both return it correctly rounded: the same bits for every `x` (including the
//! subnormal quotients of tiny elements in a block with a large amax). The scalar reference
//! ([`super::scalar::quantize_mxfp4`]) divides; the tests compare the two.
//!
//! # Lengths
//!
//! Sizes come from untrusted headers, so [`decode_mxfp4`] and [`quantize_mxfp4`] never panic on
//! them: they process the `G = min(scales.len(), blocks.len() / 16, values.len() / 32)` whole
//! blocks present, leave the rest of the outputs untouched and return `G` (the caller compares
//! it with the count it expects). [`mix_mxfp4`] checks every length first and returns an error
//! without writing anything when one does not fit.

use super::chunk::{add_nan_first, decode_any};
use super::simd::{multiversion, simd_level, SimdLevel, LV_AVX512};
use crate::model::dtype::DType;

/// Values per MXFP4 block.
pub(crate) const MXFP4_BLOCK: usize = 32;
/// Bytes of one block of `X_blocks` (two codes per byte).
pub const MXFP4_BLOCK_BYTES: usize = 16;
/// The E8M0 scale byte meaning NaN.
pub(crate) const E8M0_NAN: u8 = 255;

const QNAN: u32 = 0x7fc0_0000;

/// E2M1 code (low 4 bits of `code`) → f32, exact.
#[inline(always)]
pub(crate) fn e2m1_to_f32(code: u8) -> f32 {
    let c = (code & 15) as u32;
    let m = c & 7;
    // m = 1 is the subnormal 0.5; m ≥ 2 is (1 + (m & 1)/2) × 2^((m >> 1) − 1).
    let mag = if m < 2 {
        m * 0x3f00_0000
    } else {
        (((m >> 1) + 126) << 23) | ((m & 1) << 22)
    };
    f32::from_bits(mag | ((c & 8) << 28))
}

/// E8M0 scale byte → 2^(s−127) as an f32 (`s = 0`: the subnormal 2^−127); 255 → NaN
/// (`0x7fc0_0000`).
#[inline(always)]
pub(crate) const fn e8m0_to_f32(s: u8) -> f32 {
    let s = s as u32;
    let v = if s == 255 { QNAN } else { s << 23 };
    f32::from_bits(if s == 0 { 0x0040_0000 } else { v })
}

/// The E2M1 code of `q` (not NaN): |q| rounded to the nearest magnitude, ties to an even code,
/// saturating at 6, with `q`'s sign bit.
#[inline(always)]
pub(crate) fn f32_to_e2m1(q: f32) -> u8 {
    let a = q.abs();
    // Each threshold passed adds one code step; `>` where the tie goes down (to an even m),
    // `>=` where it goes up.
    let m = (a > 0.25) as u32
        + (a >= 0.75) as u32
        + (a > 1.25) as u32
        + (a >= 1.75) as u32
        + (a > 2.5) as u32
        + (a >= 3.5) as u32
        + (a > 5.0) as u32;
    (m | ((q.to_bits() >> 28) & 8)) as u8
}

/// The scale byte of a block whose largest `|x|` bit pattern (`bits & 0x7fff_ffff`, integer
/// max, so NaN is largest) is `amax`.
#[inline(always)]
fn scale_byte(amax: u32) -> u8 {
    let e = amax >> 23;
    if e >= 255 {
        E8M0_NAN
    } else {
        e.saturating_sub(2) as u8
    }
}

/// `2^−e` for the scale byte `s = e + 127` ≤ 252 (the encoder's bytes): an exact normal f32.
#[inline(always)]
fn recip_scale(s: u8) -> f32 {
    f32::from_bits(254u32.saturating_sub(s as u32) << 23)
}

/// Encodes one block given as its even (`lo`) and odd (`hi`) elements; returns the scale byte.
#[inline(always)]
fn enc_block<const LV: u8>(lo: &[f32; 16], hi: &[f32; 16], out: &mut [u8; 16]) -> u8 {
    #[cfg(target_arch = "x86_64")]
    if LV == LV_AVX512 {
        // SAFETY: LV_AVX512 instances only run inside the AVX-512 `multiversion!` wrapper, on
        // CPUs with AVX-512 F/BW/VL.
        return unsafe { avx512::enc_arrays(lo, hi, out) };
    }
    let mut amax = 0u32;
    for k in 0..16 {
        amax = amax.max(lo[k].to_bits() & 0x7fff_ffff);
        amax = amax.max(hi[k].to_bits() & 0x7fff_ffff);
    }
    let s = scale_byte(amax);
    let r = recip_scale(s);
    let keep = if s == E8M0_NAN { 0 } else { 0xff };
    for k in 0..16 {
        out[k] = (f32_to_e2m1(lo[k] * r) | (f32_to_e2m1(hi[k] * r) << 4)) & keep;
    }
    s
}

/// `d = E2M1 × scale` of one block, then `acc = w·d` (FIRST) or `acc = acc + w·d`, on the even
/// (`lo`) and odd (`hi`) elements.
#[inline(always)]
fn axpy_block<const LV: u8, const FIRST: bool>(
    b: &[u8; 16],
    s: u8,
    w: f32,
    lo: &mut [f32; 16],
    hi: &mut [f32; 16],
) {
    let mut dl = [0f32; 16];
    let mut dh = [0f32; 16];
    dec_block::<LV>(b, s, &mut dl, &mut dh);
    for k in 0..16 {
        if FIRST {
            lo[k] = w * dl[k];
            hi[k] = w * dh[k];
        } else {
            lo[k] = add_nan_first(lo[k], w * dl[k]);
            hi[k] = add_nan_first(hi[k], w * dh[k]);
        }
    }
}

/// Decodes one block into its even (`lo`) and odd (`hi`) elements.
#[inline(always)]
fn dec_block<const LV: u8>(b: &[u8; 16], s: u8, lo: &mut [f32; 16], hi: &mut [f32; 16]) {
    #[cfg(target_arch = "x86_64")]
    if LV == LV_AVX512 {
        // SAFETY: as in `enc_block`.
        unsafe { avx512::dec_arrays(b, s, lo, hi) };
        return;
    }
    if s == E8M0_NAN {
        *lo = [f32::from_bits(QNAN); 16];
        *hi = [f32::from_bits(QNAN); 16];
        return;
    }
    let sc = e8m0_to_f32(s);
    for k in 0..16 {
        lo[k] = e2m1_to_f32(b[k] & 15) * sc;
        hi[k] = e2m1_to_f32(b[k] >> 4) * sc;
    }
}

/// The `&[T; N]` view of the `N` elements at `i·N`.
#[inline(always)]
fn at<T, const N: usize>(s: &[T], i: usize) -> &[T; N] {
    s[i * N..(i + 1) * N].try_into().expect("block length")
}

#[inline(always)]
fn at_mut<T, const N: usize>(s: &mut [T], i: usize) -> &mut [T; N] {
    (&mut s[i * N..(i + 1) * N])
        .try_into()
        .expect("block length")
}

/// Whole blocks present in blocks/scales/values of these lengths.
#[inline]
pub(super) fn whole_blocks(blocks: usize, scales: usize, values: usize) -> usize {
    scales
        .min(blocks / MXFP4_BLOCK_BYTES)
        .min(values / MXFP4_BLOCK)
}

/// Decodes MXFP4 to f32 (natural element order): `out[32g + j]` = value `j` of block `g`.
/// Processes the `G` whole blocks present (see the module doc) and returns `G`.
#[must_use = "the number of blocks decoded may be fewer than expected"]
pub fn decode_mxfp4(blocks: &[u8], scales: &[u8], out: &mut [f32]) -> usize {
    decode_mxfp4_at(simd_level(), blocks, scales, out)
}

pub(super) fn decode_mxfp4_at(
    level: SimdLevel,
    blocks: &[u8],
    scales: &[u8],
    out: &mut [f32],
) -> usize {
    let g = whole_blocks(blocks.len(), scales.len(), out.len());
    decode_mv(level, blocks, scales, out, g);
    g
}

multiversion! {
    fn decode_mv<LV>(blocks: &[u8], scales: &[u8], out: &mut [f32], g: usize) {
        for i in 0..g {
            let (mut lo, mut hi) = ([0f32; 16], [0f32; 16]);
            dec_block::<LV>(at(blocks, i), scales[i], &mut lo, &mut hi);
            let o: &mut [f32; 32] = at_mut(out, i);
            for k in 0..16 {
                o[2 * k] = lo[k];
                o[2 * k + 1] = hi[k];
            }
        }
    }
}

/// Requantizes f32 values (natural element order) to MXFP4 blocks and scales, per the module
/// doc. Processes the `G` whole blocks present and returns `G`.
#[must_use = "the number of blocks encoded may be fewer than expected"]
pub fn quantize_mxfp4(acc: &[f32], blocks: &mut [u8], scales: &mut [u8]) -> usize {
    quantize_mxfp4_at(simd_level(), acc, blocks, scales)
}

pub(super) fn quantize_mxfp4_at(
    level: SimdLevel,
    acc: &[f32],
    blocks: &mut [u8],
    scales: &mut [u8],
) -> usize {
    let g = whole_blocks(blocks.len(), scales.len(), acc.len());
    quantize_mv(level, acc, blocks, scales, g);
    g
}

multiversion! {
    fn quantize_mv<LV>(acc: &[f32], blocks: &mut [u8], scales: &mut [u8], g: usize) {
        for i in 0..g {
            let x: &[f32; 32] = at(acc, i);
            let (mut lo, mut hi) = ([0f32; 16], [0f32; 16]);
            for k in 0..16 {
                lo[k] = x[2 * k];
                hi[k] = x[2 * k + 1];
            }
            scales[i] = enc_block::<LV>(&lo, &hi, at_mut(blocks, i));
        }
    }
}

/// Where one parent of [`mix_mxfp4`] takes its values from.
#[derive(Clone, Copy, Debug)]
#[allow(missing_docs)] // the fields are the input bytes as named
pub enum MxSource<'a> {
    /// MXFP4: `16·G` code bytes and `G` E8M0 scale bytes.
    Mxfp4 { blocks: &'a [u8], scales: &'a [u8] },
    /// BF16, F16 or F32 little-endian values, `32·G` of them in the same element order.
    Plain { dtype: DType, bytes: &'a [u8] },
}

/// One parent's contribution to [`mix_mxfp4`].
#[derive(Clone, Copy, Debug)]
pub struct MxInput<'a> {
    /// The parent's values for this tensor.
    pub source: MxSource<'a>,
    /// λ of this parent, already converted to f32 (not NaN).
    pub weight: f32,
}

/// Checks the shapes of a [`mix_mxfp4`] call; returns `G`.
pub(super) fn check_mix_mxfp4(
    inputs: &[MxInput<'_>],
    blocks_out: usize,
    scales_out: usize,
) -> Result<usize, String> {
    let g = scales_out;
    if inputs.is_empty() {
        return Err("kernels::mix_mxfp4: no inputs".into());
    }
    if Some(blocks_out) != g.checked_mul(MXFP4_BLOCK_BYTES) {
        return Err(format!(
            "kernels::mix_mxfp4: {blocks_out} output block bytes for {g} scales"
        ));
    }
    for (i, p) in inputs.iter().enumerate() {
        match p.source {
            MxSource::Mxfp4 { blocks, scales } => {
                if blocks.len() != blocks_out || scales.len() != g {
                    return Err(format!(
                        "kernels::mix_mxfp4: input {i} has {} block bytes and {} scales, \
                         the output {blocks_out} and {g}",
                        blocks.len(),
                        scales.len()
                    ));
                }
            }
            MxSource::Plain { dtype, bytes } => {
                if !matches!(dtype, DType::BF16 | DType::F16 | DType::F32) {
                    return Err(format!(
                        "kernels::mix_mxfp4: input {i} is {dtype}, not BF16/F16/F32/MXFP4"
                    ));
                }
                let want = g.checked_mul(MXFP4_BLOCK * dtype.size());
                if Some(bytes.len()) != want {
                    return Err(format!(
                        "kernels::mix_mxfp4: input {i} has {} bytes, {g} blocks of {dtype} \
                         need {}",
                        bytes.len(),
                        g.saturating_mul(MXFP4_BLOCK * dtype.size())
                    ));
                }
            }
        }
    }
    Ok(g)
}

/// Fused mix into MXFP4: exactly decoding each parent to f32 (MXFP4 as
/// [`decode_mxfp4`], BF16/F16/F32 as [`super::decode`]), `acc = w1·D1; acc = acc + w2·D2; …`
/// in input order (each product and sum rounded to f32, no FMA), then [`quantize_mxfp4`] into
/// `blocks_out` (`16·G` bytes) and `scales_out` (`G` bytes, which sets `G`). Works in tiles of
/// 16 blocks: no f32 copy of the tensor is made.
///
/// # Errors
/// Before writing anything, when `inputs` is empty, a plain input is not BF16/F16/F32, or a
/// length does not fit `G` (see [`MxSource`]).
pub fn mix_mxfp4(
    inputs: &[MxInput<'_>],
    blocks_out: &mut [u8],
    scales_out: &mut [u8],
) -> Result<(), String> {
    mix_mxfp4_at(simd_level(), inputs, blocks_out, scales_out)
}

pub(super) fn mix_mxfp4_at(
    level: SimdLevel,
    inputs: &[MxInput<'_>],
    blocks_out: &mut [u8],
    scales_out: &mut [u8],
) -> Result<(), String> {
    let g = check_mix_mxfp4(inputs, blocks_out.len(), scales_out.len())?;
    mix_mv(level, inputs, blocks_out, scales_out, g);
    Ok(())
}

/// Blocks per tile of [`mix_mxfp4`] (512 values: 4 KiB of f32, in L1).
const TB: usize = 16;

multiversion! {
    fn mix_mv<LV>(inputs: &[MxInput<'_>], blocks_out: &mut [u8], scales_out: &mut [u8], g: usize) {
        // Two MXFP4 parents (GPT-OSS experts): one pass per block in registers on AVX-512.
        #[cfg(target_arch = "x86_64")]
        if LV == LV_AVX512 {
            if let [MxInput { source: MxSource::Mxfp4 { blocks: a, scales: sa }, weight: wa },
                    MxInput { source: MxSource::Mxfp4 { blocks: b, scales: sb }, weight: wb }] = inputs {
                // SAFETY: as in `enc_block`.
                unsafe { avx512::mix2(a, sa, *wa, b, sb, *wb, blocks_out, scales_out, g) };
                return;
            }
        }
        let mut lo = [[0f32; 16]; TB];
        let mut hi = [[0f32; 16]; TB];
        let mut plain = [0f32; TB * MXFP4_BLOCK];
        let mut g0 = 0;
        while g0 < g {
            let nb = TB.min(g - g0);
            for (i, p) in inputs.iter().enumerate() {
                let (w, first) = (p.weight, i == 0);
                match p.source {
                    MxSource::Mxfp4 { blocks, scales } => {
                        for b in 0..nb {
                            let (bb, s) = (at(blocks, g0 + b), scales[g0 + b]);
                            if first {
                                axpy_block::<LV, true>(bb, s, w, &mut lo[b], &mut hi[b]);
                            } else {
                                axpy_block::<LV, false>(bb, s, w, &mut lo[b], &mut hi[b]);
                            }
                        }
                    }
                    MxSource::Plain { dtype, bytes } => {
                        let sz = dtype.size() * MXFP4_BLOCK;
                        let d = &mut plain[..nb * MXFP4_BLOCK];
                        decode_any::<LV>(dtype, &bytes[g0 * sz..(g0 + nb) * sz], d);
                        for b in 0..nb {
                            let x: &[f32; 32] = at(d, b);
                            let (l, h) = (&mut lo[b], &mut hi[b]);
                            for k in 0..16 {
                                let (pl, ph) = (w * x[2 * k], w * x[2 * k + 1]);
                                if first {
                                    l[k] = pl;
                                    h[k] = ph;
                                } else {
                                    l[k] = add_nan_first(l[k], pl);
                                    h[k] = add_nan_first(h[k], ph);
                                }
                            }
                        }
                    }
                }
            }
            for b in 0..nb {
                scales_out[g0 + b] = enc_block::<LV>(&lo[b], &hi[b], at_mut(blocks_out, g0 + b));
            }
            g0 += nb;
        }
    }
}

/// AVX-512 versions of the block decoder and encoder (the same functions of the bits).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{e8m0_to_f32, recip_scale, scale_byte, E8M0_NAN};

    /// [`e8m0_to_f32`] of every byte (one broadcast load per block instead of the selects).
    static E8M0: [f32; 256] = {
        let mut t = [0f32; 256];
        let mut s = 0;
        while s < 256 {
            t[s] = e8m0_to_f32(s as u8);
            s += 1;
        }
        t
    };
    use std::arch::x86_64::*;

    /// The 16 E2M1 values by code (`vpermps` uses the low 4 index bits: no masking).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
    fn table() -> __m512 {
        _mm512_setr_ps(
            0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
        )
    }

    /// The even and odd values of one block: `E2M1 × scale`, one multiply; for scale 255 the
    /// scale is the quiet NaN and the product is that NaN (the only NaN operand), as
    /// [`super::dec_block`] gives.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
    fn dec(b: &[u8; 16], s: u8) -> [__m512; 2] {
        // SAFETY: 16 bytes; unaligned load.
        let w = _mm512_cvtepu8_epi32(unsafe { _mm_loadu_si128(b.as_ptr().cast()) });
        let (t, sc) = (table(), _mm512_set1_ps(E8M0[s as usize]));
        [
            _mm512_mul_ps(_mm512_permutexvar_ps(w, t), sc),
            _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32::<4>(w), t), sc),
        ]
    }

    /// E2M1 codes of `x · r` (r = 2^−e exact, see the module doc), as dwords.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
    fn codes(x: __m512, r: __m512) -> __m512i {
        // The hardware's round-to-nearest-even does the E2M1 rounding: with E the biased
        // exponent of a = |q| and M = max(E, 127), C = 2^(M − 105) has ulp 0.5, 1, 2 for
        // a < 2, a in [2, 4), a in [4, 8) (|q| < 8 always, see the module doc): exactly the
        // E2M1 spacing there. `a + C` rounds a to a multiple of that ulp, ties to an even
        // multiple, and its bits minus C's count the multiples: n = 0..4 below 2 (m = n), 2..4
        // in [2, 4) (m = n + 2), 2..4 in [4, 8) (m = n + 4; n = 4 is 8 > 6 → m = 7). An even
        // n is an even m in each range, so ties go to the even code, as the spec says. So
        // m = min(n + 2(M − 127), 7).
        let q = _mm512_mul_ps(x, r);
        let a = _mm512_and_si512(_mm512_castps_si512(q), _mm512_set1_epi32(0x7fff_ffff));
        let e = _mm512_max_epu32(_mm512_srli_epi32::<23>(a), _mm512_set1_epi32(127));
        let c = _mm512_slli_epi32::<23>(_mm512_add_epi32(e, _mm512_set1_epi32(22)));
        let sum = _mm512_add_ps(_mm512_castsi512_ps(a), _mm512_castsi512_ps(c));
        // `a + C` stays in C's binade (a + C ≤ C + 2 ulps < 2C), so n is its mantissa field.
        let n = _mm512_and_si512(_mm512_castps_si512(sum), _mm512_set1_epi32(0x7f_ffff));
        let m = _mm512_add_epi32(
            n,
            _mm512_sub_epi32(_mm512_add_epi32(e, e), _mm512_set1_epi32(254)),
        );
        let m = _mm512_min_epi32(m, _mm512_set1_epi32(7));
        let sign = _mm512_srli_epi32::<28>(_mm512_castps_si512(q));
        // m | (sign & 8): bit select by 8 (imm 0xe4 = C ? A : B).
        _mm512_ternarylogic_epi32::<0xe4>(sign, m, _mm512_set1_epi32(8))
    }

    /// Encodes one block from its even and odd values; returns the scale byte.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
    fn enc(lo: __m512, hi: __m512, out: &mut [u8; 16]) -> u8 {
        let abs = _mm512_set1_epi32(0x7fff_ffff);
        let amax = _mm512_reduce_max_epu32(_mm512_max_epu32(
            _mm512_and_si512(_mm512_castps_si512(lo), abs),
            _mm512_and_si512(_mm512_castps_si512(hi), abs),
        ));
        enc_amax(lo, hi, amax, out)
    }

    /// [`enc`] with the block's amax bits already known.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
    fn enc_amax(lo: __m512, hi: __m512, amax: u32, out: &mut [u8; 16]) -> u8 {
        let s = scale_byte(amax);
        if s == E8M0_NAN {
            *out = [0; 16];
            return s;
        }
        let r = _mm512_set1_ps(recip_scale(s));
        let c = _mm512_or_si512(codes(lo, r), _mm512_slli_epi32::<4>(codes(hi, r)));
        // SAFETY: 16 bytes; unaligned store.
        unsafe { _mm_storeu_si128(out.as_mut_ptr().cast(), _mm512_cvtepi32_epi8(c)) };
        s
    }

    /// The amax bits of two blocks given as their even/odd values: one shared reduction tree
    /// (integer max, order-free, so the same value as [`enc`]'s).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
    fn amax2(b0: [__m512; 2], b1: [__m512; 2]) -> (u32, u32) {
        let abs = _mm512_set1_epi32(0x7fff_ffff);
        let m = |b: [__m512; 2]| {
            _mm512_max_epu32(
                _mm512_and_si512(_mm512_castps_si512(b[0]), abs),
                _mm512_and_si512(_mm512_castps_si512(b[1]), abs),
            )
        };
        let (v0, v1) = (m(b0), m(b1));
        // 128-bit lanes: [v0.0, v0.1, v1.0, v1.1] max [v0.2, v0.3, v1.2, v1.3].
        let t = _mm512_max_epu32(
            _mm512_shuffle_i64x2::<0b01_00_01_00>(v0, v1),
            _mm512_shuffle_i64x2::<0b11_10_11_10>(v0, v1),
        );
        // Then lane pairs: [0 max 1, 0 max 1, 2 max 3, 2 max 3].
        let t = _mm512_max_epu32(t, _mm512_shuffle_i64x2::<0b10_11_00_01>(t, t));
        let t = _mm512_max_epu32(t, _mm512_shuffle_epi32::<0b01_00_11_10>(t));
        let t = _mm512_max_epu32(t, _mm512_shuffle_epi32::<0b10_11_00_01>(t));
        let lo = _mm512_castsi512_si128(t);
        let hi = _mm512_extracti32x4_epi32::<2>(t);
        (_mm_cvtsi128_si32(lo) as u32, _mm_cvtsi128_si32(hi) as u32)
    }

    /// [`super::dec_block`] through [`dec`].
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
    pub(super) unsafe fn dec_arrays(b: &[u8; 16], s: u8, lo: &mut [f32; 16], hi: &mut [f32; 16]) {
        let [l, h] = dec(b, s);
        // SAFETY: 16 floats each; unaligned stores.
        unsafe {
            _mm512_storeu_ps(lo.as_mut_ptr(), l);
            _mm512_storeu_ps(hi.as_mut_ptr(), h);
        }
    }

    /// [`super::enc_block`] through [`enc`].
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
    pub(super) unsafe fn enc_arrays(lo: &[f32; 16], hi: &[f32; 16], out: &mut [u8; 16]) -> u8 {
        // SAFETY: 16 floats each; unaligned loads.
        let (l, h) = unsafe { (_mm512_loadu_ps(lo.as_ptr()), _mm512_loadu_ps(hi.as_ptr())) };
        enc(l, h, out)
    }

    /// The two-MXFP4-parent mix of the first `g` blocks (the caller checked the lengths):
    /// per block `wa·da + wb·db`, encoded. The add is a plain one: where an operand is NaN the
    /// block encodes as 255 + zero codes whichever NaN the add returns, so the first-operand
    /// NaN rule cannot show in the output bytes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn mix2(
        a: &[u8],
        sa: &[u8],
        wa: f32,
        b: &[u8],
        sb: &[u8],
        wb: f32,
        out: &mut [u8],
        out_s: &mut [u8],
        g: usize,
    ) {
        let (wa, wb) = (_mm512_set1_ps(wa), _mm512_set1_ps(wb));
        let mix = |a: &[u8], sa: u8, b: &[u8], sb: u8| {
            let (da, db) = (
                dec(a.try_into().unwrap(), sa),
                dec(b.try_into().unwrap(), sb),
            );
            let m = |j: usize| _mm512_add_ps(_mm512_mul_ps(wa, da[j]), _mm512_mul_ps(wb, db[j]));
            [m(0), m(1)]
        };
        // Pairs of blocks share the amax reduction.
        let g2 = g / 2 * 2;
        for i in (0..g2).step_by(2) {
            let k = 16 * i;
            let v0 = mix(&a[k..k + 16], sa[i], &b[k..k + 16], sb[i]);
            let v1 = mix(&a[k + 16..k + 32], sa[i + 1], &b[k + 16..k + 32], sb[i + 1]);
            let (m0, m1) = amax2(v0, v1);
            let (o0, o1) = out[k..k + 32].split_at_mut(16);
            out_s[i] = enc_amax(v0[0], v0[1], m0, o0.try_into().unwrap());
            out_s[i + 1] = enc_amax(v1[0], v1[1], m1, o1.try_into().unwrap());
        }
        let (a, b, out, sa, sb, out_s) = (
            &a[16 * g2..],
            &b[16 * g2..],
            &mut out[16 * g2..],
            &sa[g2..],
            &sb[g2..],
            &mut out_s[g2..],
        );
        let g = g - g2;
        let blocks = a[..16 * g]
            .chunks_exact(16)
            .zip(b[..16 * g].chunks_exact(16))
            .zip(out[..16 * g].chunks_exact_mut(16));
        for (((a, b), o), (sa, (sb, so))) in
            blocks.zip(sa[..g].iter().zip(sb[..g].iter().zip(&mut out_s[..g])))
        {
            let (da, db) = (
                dec(a.try_into().unwrap(), *sa),
                dec(b.try_into().unwrap(), *sb),
            );
            let m = |j: usize| _mm512_add_ps(_mm512_mul_ps(wa, da[j]), _mm512_mul_ps(wb, db[j]));
            *so = enc(m(0), m(1), o.try_into().unwrap());
        }
    }
}
