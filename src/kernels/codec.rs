//! Element codecs: FP8 E4M3FN, BF16 and F16 ⇄ f32, one value at a time (branchless: the
//! same code runs in every SIMD lane). Semantics in the [module doc](super).

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
pub(crate) fn bf16_to_f32(b: u16) -> f32 {
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
pub(crate) fn f16_to_f32(h: u16) -> f32 {
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
pub(crate) fn f32_to_f16(x: f32) -> u16 {
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
