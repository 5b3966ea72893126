//! Decode, dequantize, encode and FP8-quantize whole slices (the public fast paths other than
//! the mix and the statistic), with the FP8 block pieces the mix reuses and the shape checks
//! shared with [`super::scalar`].

use super::chunk::{arr, arr_mut, chunked, decode_any, encode_any, map_k, scale_add_k, Fp8, L};
use super::codec::f32_to_fp8;
use super::simd::{multiversion, simd_level, SimdLevel, LV_AVX512};
#[cfg(target_arch = "x86_64")]
use super::x86;
use super::{FP8_BLOCK, FP8_MAX};
use crate::model::dtype::DType;

/// Largest of 128 amax lanes.
#[inline(always)]
pub(super) fn amax_k(x: &[u32; FP8_BLOCK]) -> u32 {
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
pub(super) fn quant_k<const LV: u8>(x: &[f32], scale: f32, out: &mut [u8]) {
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
pub(super) fn quant_chunk(c: &[f32; L], scale: f32, o: &mut [u8; L]) {
    for j in 0..L {
        o[j] = f32_to_fp8(c[j] / scale);
    }
}

/// `lanes[j] = max(lanes[j], |x[j]| bits)`: block amaxes are kept as 128 lanes across the rows
/// of a block and reduced once (integer max: order-free, NaN largest).
#[inline(always)]
pub(super) fn amax_lanes(lanes: &mut [u32; FP8_BLOCK], x: &[f32]) {
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
pub(super) fn block_scale(amax_bits: u32) -> f32 {
    if amax_bits == 0 {
        1.0
    } else {
        f32::from_bits(amax_bits) / FP8_MAX
    }
}

// ---------------------------------------------------------------------------------------------
// Shape checks (shared by the fast and scalar paths)
// ---------------------------------------------------------------------------------------------

#[track_caller]
pub(super) fn check_mixable(dtype: DType) {
    assert!(dtype.is_mixable(), "kernels: dtype {dtype} cannot be mixed");
}

/// (nrows, block rows, block cols) of a band of `n` elements with `cols` columns.
#[track_caller]
pub(super) fn band_dims(n: usize, cols: usize) -> (usize, usize, usize) {
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
pub(super) fn check_scales(n: usize, cols: usize, scales_len: usize) -> (usize, usize, usize) {
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

pub(super) fn decode_at(level: SimdLevel, dtype: DType, src: &[u8], out: &mut [f32]) {
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
pub(crate) fn dequant_fp8(src: &[u8], cols: usize, scales: &[f32], out: &mut [f32]) {
    dequant_fp8_at(simd_level(), src, cols, scales, out)
}

pub(super) fn dequant_fp8_at(
    level: SimdLevel,
    src: &[u8],
    cols: usize,
    scales: &[f32],
    out: &mut [f32],
) {
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

pub(super) fn scale_add_at(level: SimdLevel, acc: &mut [f32], w: f32, d: &[f32], first: bool) {
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
pub(super) fn check_encodable(dtype: DType) {
    assert!(
        matches!(dtype, DType::BF16 | DType::F16 | DType::F32),
        "kernels::encode: {dtype} is not BF16/F16/F32 (FP8 goes through quantize_fp8)"
    );
}

pub(super) fn encode_at(level: SimdLevel, dtype: DType, src: &[f32], out: &mut [u8]) {
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

pub(super) fn quantize_fp8_at(
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
    pub(super) fn quant_mv_probe<LV>(x: &[f32], scale: f32, out: &mut [u8]) {
        for (seg, o) in x.chunks(FP8_BLOCK).zip(out.chunks_mut(FP8_BLOCK)) {
            quant_k::<LV>(seg, scale, o);
        }
    }
}

/// Columns per tile of the row-major FP8 passes (a multiple of 128): 128 rows × 512 f32 =
/// 256 KiB stays in L2 (measured: 512 to 4096 columns perform alike here; with prefetch the
/// short row runs cost little).
pub(super) const TILE_COLS: usize = 4 * FP8_BLOCK;

/// Quantizes one block row, columns `c0..c1` (`c0` a multiple of 128, at most `TILE_COLS`
/// wide): `t` holds the `rows` rows with stride `ts` (column `c0` at offset 0). Pass 1 takes
/// the block amaxes row by row, pass 2 quantizes row by row (sequential runs, no 128-row
/// strided walks). `codes` is the block row of the band
/// (stride `cols`), `scales` the block row's scales.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn quant_tile<const LV: u8>(
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
pub(super) fn tile_row_amax(lanes: &mut [[u32; FP8_BLOCK]; TILE_COLS / FP8_BLOCK], row: &[f32]) {
    for (l, seg) in lanes.iter_mut().zip(row.chunks(FP8_BLOCK)) {
        amax_lanes(l, seg);
    }
}

/// [`quant_tile`] with the amax lanes already folded (integer max: the order of folding does
/// not matter, so folding each row while it is hot in L1 gives the same scales).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(super) fn quant_tile_lanes<const LV: u8>(
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
