//! SIMD level detection (`AOE_KERNELS` cap, VBMI switch) and the `multiversion!` dispatch
//! macro that compiles a kernel body once per instruction set.

use std::sync::atomic::{AtomicU8, Ordering};

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
pub(crate) const LV_PORTABLE: u8 = 0;
pub(crate) const LV_AVX2: u8 = 1;
pub(crate) const LV_AVX512: u8 = 2;

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
pub(super) fn vbmi_enabled() -> bool {
    #[cfg(test)]
    if super::tests::NO_VBMI.with(|v| v.get()) {
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

pub(crate) fn best_level() -> SimdLevel {
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
    ($(#[$m:meta])* $vis:vis fn $name:ident<$lv:ident>($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)? $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name(level: $crate::kernels::SimdLevel, $($a: $t),*) $(-> $r)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn imp<const $lv: u8>($($a: $t),*) $(-> $r)? $body

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn v512($($a: $t),*) $(-> $r)? {
                imp::<{ $crate::kernels::simd::LV_AVX512 }>($($a),*)
            }

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,f16c")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn v256($($a: $t),*) $(-> $r)? {
                imp::<{ $crate::kernels::simd::LV_AVX2 }>($($a),*)
            }

            #[cfg(target_arch = "x86_64")]
            {
                match level {
                    $crate::kernels::SimdLevel::Avx512
                        if $crate::kernels::simd::best_level() == $crate::kernels::SimdLevel::Avx512 => {
                        // SAFETY: the CPU has AVX-512 F/BW/VL, AVX2 and F16C (checked just above).
                        return unsafe { v512($($a),*) };
                    }
                    $crate::kernels::SimdLevel::Avx2
                        if $crate::kernels::simd::best_level() != $crate::kernels::SimdLevel::Portable => {
                        // SAFETY: the CPU has AVX2 and F16C (checked just above).
                        return unsafe { v256($($a),*) };
                    }
                    _ => {}
                }
            }
            let _ = level;
            imp::<{ $crate::kernels::simd::LV_PORTABLE }>($($a),*)
        }
    };
}
pub(crate) use multiversion;
