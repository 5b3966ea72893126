//! Numeric kernels of child synthesis: BF16/F16/F32/FP8-E4M3FN ⇄ f32 codecs, FP8 block
//! (de)quantization, the weighted mix and the difference statistic.
//!
//! Every kernel has a plain scalar reference in [`scalar`] and a fast path at module top level;
//! the two agree to the bit (the tests check it on all 8- and 16-bit codes, edge values and
//! random bit patterns, on every SIMD level the machine has).
//!
//! Layout: `codec` (element codecs), `simd` (level detection, `multiversion!`), `chunk` (the
//! inlined chunk loops the fast paths are made of), `x86` (intrinsics), `convert` (decode,
//! dequantize, encode, FP8 quantize over slices), `mix` (accumulate and the fused mix),
//! `mxfp4` (MXFP4 decode, requantize and fused mix, with its own semantics section),
//! `stats` (difference statistic and sign), [`scalar`] (the reference); everything public is
//! re-exported here.
//!
//! # Exact semantics (`docs/semantics.md`; they match numpy + ml_dtypes)
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

mod chunk;
mod codec;
mod convert;
mod mix;
mod mxfp4;
pub mod scalar;
pub(crate) mod simd;
mod stats;
#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(test)]
mod diff_sign_tests;
#[cfg(test)]
mod mxfp4_tests;
#[cfg(test)]
mod tests;

pub use codec::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16, f32_to_fp8, fp8_to_f32};
pub use convert::{decode, dequant_fp8, encode, quantize_fp8, scale_add};
pub use mix::{accumulate, mix, MixInput};
pub use mxfp4::{
    decode_mxfp4, e2m1_to_f32, e8m0_to_f32, f32_to_e2m1, mix_mxfp4, quantize_mxfp4, MxInput,
    MxSource, E8M0_NAN, MXFP4_BLOCK, MXFP4_BLOCK_BYTES,
};
#[cfg(any(test, feature = "testkit"))]
pub(crate) use simd::multiversion;
pub use simd::{available_levels, simd_level, SimdLevel};
pub use stats::{
    diff_sign_bytes, sign_of_sum, sum_sq_diff, sum_sq_diff_bytes, DiffSign, SqDiffAcc,
};

/// Side of the square FP8 scaling blocks (DeepSeek `weight_block_size: [128, 128]`).
pub const FP8_BLOCK: usize = 128;
/// Largest finite FP8 E4M3FN value.
pub const FP8_MAX: f32 = 448.0;
