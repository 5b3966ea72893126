//! The squared-difference statistic ([`sum_sq_diff`], [`SqDiffAcc`]) and the sign of the
//! difference straight from bytes ([`diff_sign_bytes`]).

use super::chunk::{arr, decode_any};
use super::codec::{bf16_to_f32, f16_to_f32, fp8_to_f32};
use super::convert::check_mixable;
use super::simd::{multiversion, simd_level, SimdLevel};
use crate::model::dtype::DType;

/// 8-lane f64 sum of squared differences; `lanes[j]` takes elements with index ≡ j (mod 8),
/// counting from the start of `a` (the caller keeps the global alignment).
#[inline(always)]
pub(super) fn sq_k(lanes: &mut [f64; 8], a: &[f32], b: &[f32]) {
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

/// Sum over i of `(a[i] − b[i])²` with `d = a as f64 − b as f64`, `d*d` added in f64 into 8
/// lanes by index mod 8, combined as `((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7))`: the same bits on
/// every machine. NaN propagates.
///
/// # Panics
/// If `a.len() != b.len()`.
#[cfg(test)]
pub(crate) fn sum_sq_diff(a: &[f32], b: &[f32]) -> f64 {
    let mut s = SqDiffAcc::new();
    s.add(a, b);
    s.sum()
}

/// Running [`sum_sq_diff`] over consecutive chunks of a tensor: feeding a tensor in chunks of
/// any sizes gives exactly the bits of one call over the whole tensor (element i always goes to
/// lane i mod 8, counting across chunks).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct SqDiffAcc {
    lanes: [f64; 8],
    n: u64,
}

impl SqDiffAcc {
    /// An empty accumulator (sum 0).
    pub fn new() -> SqDiffAcc {
        SqDiffAcc::default()
    }

    /// Number of elements added so far.
    #[cfg(test)]
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

    pub(super) fn add_at(&mut self, level: SimdLevel, a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len(), "kernels::sum_sq_diff: length mismatch");
        let (a, b) = self.head(a, b);
        let lanes = &mut self.lanes;
        sq_mv(level, lanes, a, b);
        self.n += a.len() as u64;
    }

    /// Feeds elements one by one until the running index is a multiple of 8; returns the rest.
    pub(super) fn head<'x>(&mut self, a: &'x [f32], b: &'x [f32]) -> (&'x [f32], &'x [f32]) {
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

    pub(super) fn add_bytes_at(
        &mut self,
        level: SimdLevel,
        dta: DType,
        a: &[u8],
        dtb: DType,
        b: &[u8],
    ) {
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

pub(super) fn decode_one(dtype: DType, b: &[u8]) -> f32 {
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

/// The sign of the δ statistic sqrt(Σ (a−b)²)/sqrt(n) between two tensors of one dtype,
/// decided without computing it: what δ = 0 needs ("is the statistic above 0?").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DiffSign {
    /// Every element pair is numerically equal (±0 count as equal): the statistic is 0.
    Zero,
    /// Some pair differs and no NaN arises: the statistic is positive.
    Positive,
    /// A NaN operand, or an infinity minus itself: the statistic is NaN.
    NaN,
}

/// Per element: 0 equal, 1 differ, 2 NaN (as (a−b)² in f64 would be), from raw bits.
#[inline(always)]
pub(super) fn sign_bits(a: u32, b: u32, mag: u32, inf: u32) -> u8 {
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
pub(crate) fn diff_sign_bytes(
    dtype_a: DType,
    a: &[u8],
    dtype_b: DType,
    b: &[u8],
) -> Option<DiffSign> {
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
pub(crate) fn sign_of_sum(sum: f64) -> DiffSign {
    if sum.is_nan() {
        DiffSign::NaN
    } else if sum > 0.0 {
        DiffSign::Positive
    } else {
        DiffSign::Zero
    }
}
