//! The few kernels where explicit x86 intrinsics pay.

use super::chunk::L;
use super::FP8_BLOCK;
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

/// `f32_to_fp8(x[i] / scale)` for 64 values (a true division, as [`super::convert::quant_k`]).
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
                    let (ca, cb) = unsafe { (load_codes(pa.add(k), n), load_codes(pb.add(k), n)) };
                    // Padding codes are 0: value 0, no effect on the amax.
                    for v in m.mix::<false>(ca, s_a, cb, s_b) {
                        *amax =
                            _mm512_max_epu32(*amax, _mm512_and_si512(_mm512_castps_si512(v), abs));
                    }
                    c += n;
                }
            }
        }
        let mut amax_bits = [0u32; BAND_COLS / FP8_BLOCK];
        for bi in 0..nb {
            amax_bits[bi] = _mm512_reduce_max_epu32(amax[bi]);
            out_scales[b0 + bi] = super::convert::block_scale(amax_bits[bi]);
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
                _mm512_mask_storeu_epi8(po.add(o).cast(), u64::MAX >> (64 - n), pack64_lanes(v));
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
