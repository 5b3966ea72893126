//! The fused weighted mix: [`accumulate`] (decode + dequantize + `acc = acc + w·d`) and
//! [`mix`], tiled so that no full f32 copy of a band is made.

use super::chunk::{axpy2_fp8, axpy_any, axpy_dispatch, encode_any, Fp8};
use super::convert::{
    band_dims, check_mixable, check_scales, quant_tile_lanes, tile_row_amax, TILE_COLS,
};
use super::simd::{multiversion, simd_level, vbmi_enabled, SimdLevel, LV_AVX512};
#[cfg(target_arch = "x86_64")]
use super::x86;
use super::FP8_BLOCK;
use crate::model::dtype::DType;

/// Hints the CPU to fetch `bytes` into the cache (no effect on results; a no-op off x86).
#[inline(always)]
pub(super) fn prefetch(bytes: &[u8]) {
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
pub(super) const PREFETCH_ROWS: usize = 4;

/// Fused decode (+ FP8 dequantization) and [`scale_add`](super::scale_add): for FP8 with `scales = Some((scales,
/// cols))`, `src` is a band of whole rows as for [`dequant_fp8`](super::dequant_fp8) and `d = f32(code) × scale`;
/// FP8 with `None` uses the stored codes; other dtypes take `None`. Then `acc = w·d` (first) or
/// `acc = acc + w·d`. Bit-identical to decoding then calling [`scale_add`](super::scale_add).
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
pub(super) fn check_accumulate(
    dtype: DType,
    src_len: usize,
    scales: Option<(&[f32], usize)>,
    n: usize,
) {
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

pub(super) fn accumulate_at(
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
pub(super) fn accumulate_range<const LV: u8>(
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
/// order, then `encode(out_dtype)` or, for FP8, [`quantize_fp8`](super::quantize_fp8) (which writes `out_scales`),
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
pub(super) fn check_mix(
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

pub(super) fn mix_at(
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
                        #[cfg(test)]
                        super::tests::VBMI_BANDS.with(|n| n.set(n.get() + 1));
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
