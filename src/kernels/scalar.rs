//! Plain scalar reference of every kernel, written from the definitions (numpy's half-float
//! algorithm for F16, exact rounding arithmetic for FP8 and BF16), element by element. Slow;
//! for tests and as the specification of the fast paths.

use super::convert::{check_encodable, check_mixable, check_scales};
use super::mix::{check_accumulate, check_mix};
use super::mxfp4::{check_mix_mxfp4, MxInput, MxSource};
use super::{MixInput, FP8_BLOCK, FP8_MAX};
use crate::model::dtype::DType;

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
pub(crate) fn fp8_to_f32(code: u8) -> f32 {
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
pub(crate) fn bf16_to_f32(b: u16) -> f32 {
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
pub(crate) fn f16_to_f32(h: u16) -> f32 {
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
pub(crate) fn f32_to_f16(x: f32) -> u16 {
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
pub(crate) fn dequant_fp8(src: &[u8], cols: usize, scales: &[f32], out: &mut [f32]) {
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
            DType::BF16 => out[2 * i..2 * i + 2].copy_from_slice(&f32_to_bf16(*x).to_le_bytes()),
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
pub(crate) fn sum_sq_diff(a: &[f32], b: &[f32]) -> f64 {
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

/// E2M1 magnitudes by `code & 7`.
const E2M1_MAG: [f64; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];

/// E2M1 code (low 4 bits) → f32: `(-1)^bit3 × E2M1_MAG[code & 7]`.
pub(crate) fn e2m1_to_f32(code: u8) -> f32 {
    let v = E2M1_MAG[(code & 7) as usize] as f32;
    if code & 8 != 0 {
        -v
    } else {
        v
    }
}

/// E8M0 byte → `2^(s−127)` (f64 power of two, exactly an f32); 255 → `0x7fc0_0000`.
pub(crate) fn e8m0_to_f32(s: u8) -> f32 {
    if s == 255 {
        f32::from_bits(0x7fc0_0000)
    } else {
        2f64.powi(s as i32 - 127) as f32
    }
}

/// E2M1 code of `q` (not NaN): above 6 saturated to 6, else the magnitude nearest to |q| by
/// distance (exact in f64 wherever two can tie), an even code on a tie; with `q`'s sign.
pub(crate) fn f32_to_e2m1(q: f32) -> u8 {
    let a = (q as f64).abs();
    let sign = if q.is_sign_negative() { 8 } else { 0 };
    if a > 6.0 {
        return 7 | sign; // saturate (far above 6 the f64 distances would tie)
    }
    let mut best = 0usize;
    for m in 1..8 {
        let (d, db) = ((E2M1_MAG[m] - a).abs(), (E2M1_MAG[best] - a).abs());
        if d < db || (d == db && m % 2 == 0) {
            best = m;
        }
    }
    best as u8 | sign
}

/// Reference of [`super::decode_mxfp4`]: value `j` of block `g` from byte `16g + j/2` (low
/// nibble for even `j`), `E2M1 × scale` (NaN for scale 255). Processes the whole blocks present
/// and returns their count.
pub fn decode_mxfp4(blocks: &[u8], scales: &[u8], out: &mut [f32]) -> usize {
    let g = scales.len().min(blocks.len() / 16).min(out.len() / 32);
    for i in 0..g {
        for j in 0..32 {
            let byte = blocks[16 * i + j / 2];
            let code = if j % 2 == 0 { byte & 15 } else { byte >> 4 };
            out[32 * i + j] = if scales[i] == 255 {
                f32::from_bits(0x7fc0_0000)
            } else {
                e2m1_to_f32(code) * e8m0_to_f32(scales[i])
            };
        }
    }
    g
}

/// Reference of [`super::quantize_mxfp4`], from the definition: amax by float comparison,
/// `floor(log2(amax))` by search over powers of two, a true f32 division per element.
pub fn quantize_mxfp4(acc: &[f32], blocks: &mut [u8], scales: &mut [u8]) -> usize {
    let g = scales.len().min(blocks.len() / 16).min(acc.len() / 32);
    for i in 0..g {
        let x = &acc[32 * i..32 * i + 32];
        let amax = x
            .iter()
            .fold(0f32, |m, v| if v.abs() > m { v.abs() } else { m });
        if x.iter().any(|v| v.is_nan()) || amax == f32::INFINITY {
            scales[i] = 255;
            blocks[16 * i..16 * i + 16].fill(0);
            continue;
        }
        let mut e = -127i32;
        if amax > 0.0 {
            // floor(log2(amax)): the k with 2^k <= amax < 2^(k+1), k in -149..=127.
            let mut k = 127;
            while 2f64.powi(k) > amax as f64 {
                k -= 1;
            }
            e = (k - 2).max(-127);
        }
        scales[i] = (e + 127) as u8;
        let d = 2f64.powi(e) as f32;
        for k in 0..16 {
            let c0 =
                f32_to_e2m1(x[2 * k] / d) & 7 | if x[2 * k].is_sign_negative() { 8 } else { 0 };
            let c1 = f32_to_e2m1(x[2 * k + 1] / d) & 7
                | if x[2 * k + 1].is_sign_negative() {
                    8
                } else {
                    0
                };
            blocks[16 * i + k] = c0 | (c1 << 4);
        }
    }
    g
}

/// Reference of [`super::mix_mxfp4`]: decode every input into a full-size f32 buffer
/// ([`decode_mxfp4`] or [`decode`]), [`scale_add`] them in order, then [`quantize_mxfp4`].
pub fn mix_mxfp4(
    inputs: &[MxInput<'_>],
    blocks_out: &mut [u8],
    scales_out: &mut [u8],
) -> Result<(), String> {
    let g = check_mix_mxfp4(inputs, blocks_out.len(), scales_out.len())?;
    let mut acc = vec![0f32; 32 * g];
    let mut d = vec![0f32; 32 * g];
    for (i, p) in inputs.iter().enumerate() {
        match p.source {
            MxSource::Mxfp4 { blocks, scales } => {
                let _ = decode_mxfp4(blocks, scales, &mut d);
            }
            MxSource::Plain { dtype, bytes } => decode(dtype, bytes, &mut d),
        }
        scale_add(&mut acc, p.weight, &d, i == 0);
    }
    let _ = quantize_mxfp4(&acc, blocks_out, scales_out);
    Ok(())
}
