use super::*;
use crate::model::dtype::DType;

fn rng(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// Specials of each dtype (bit patterns): ±0, ±inf, NaNs, subnormals, max, ones.
fn specials(dt: DType) -> Vec<u32> {
    match dt {
        DType::F8E4M3 => vec![0x00, 0x80, 0x7f, 0xff, 0x01, 0x81, 0x7e, 0xfe, 0x38, 0xb8],
        DType::BF16 => vec![
            0x0000, 0x8000, 0x7f80, 0xff80, 0x7fc0, 0xffc1, 0x7f81, 0x0001, 0x8001, 0x7f7f, 0x3f80,
            0xbf80,
        ],
        DType::F16 => vec![
            0x0000, 0x8000, 0x7c00, 0xfc00, 0x7e00, 0xfc01, 0x0001, 0x8001, 0x7bff, 0x3c00, 0xbc00,
        ],
        _ => vec![
            0,
            0x8000_0000,
            0x7f80_0000,
            0xff80_0000,
            0x7fc0_0000,
            0xff80_0001,
            1,
            0x8000_0001,
            0x7f7f_ffff,
            0x3f80_0000,
        ],
    }
}

fn to_bytes(dt: DType, v: &[u32]) -> Vec<u8> {
    v.iter()
        .flat_map(|&x| match dt.size() {
            1 => vec![x as u8],
            2 => (x as u16).to_le_bytes().to_vec(),
            _ => x.to_le_bytes().to_vec(),
        })
        .collect()
}

#[test]
fn sign_equals_the_sign_of_the_statistic() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for dt in [DType::F8E4M3, DType::BF16, DType::F16, DType::F32] {
        let sp = specials(dt);
        let mask = if dt.size() == 4 {
            u32::MAX
        } else {
            (1u32 << (8 * dt.size())) - 1
        };
        // Every pair of specials, alone and inside longer random-equal tensors.
        for &x in &sp {
            for &y in &sp {
                for len in [1usize, 3, 4097, 9000] {
                    let mut a: Vec<u32> = (0..len).map(|_| rng(&mut seed) as u32 & mask).collect();
                    // Keep the filler free of NaN so the special decides.
                    for v in a.iter_mut() {
                        *v &= mask >> 2;
                    }
                    let mut b = a.clone();
                    let at = (rng(&mut seed) as usize) % len;
                    a[at] = x;
                    b[at] = y;
                    let (ab, bb) = (to_bytes(dt, &a), to_bytes(dt, &b));
                    let want = sign_of_sum(scalar::sum_sq_diff_bytes(dt, &ab, dt, &bb));
                    assert_eq!(
                        diff_sign_bytes(dt, &ab, dt, &bb),
                        Some(want),
                        "{dt} {x:#x} vs {y:#x} len {len}"
                    );
                }
            }
        }
        // Random tensors with a few random differences.
        for len in [0usize, 1, 7, 64, 1000, 20000] {
            let a: Vec<u32> = (0..len).map(|_| rng(&mut seed) as u32 & mask).collect();
            let mut b = a.clone();
            for _ in 0..(rng(&mut seed) % 3) {
                if len > 0 {
                    let i = rng(&mut seed) as usize % len;
                    b[i] = rng(&mut seed) as u32 & mask;
                }
            }
            let (ab, bb) = (to_bytes(dt, &a), to_bytes(dt, &b));
            let want = sign_of_sum(scalar::sum_sq_diff_bytes(dt, &ab, dt, &bb));
            assert_eq!(
                diff_sign_bytes(dt, &ab, dt, &bb),
                Some(want),
                "{dt} random len {len}"
            );
        }
    }
    assert_eq!(
        diff_sign_bytes(DType::F8E4M3, &[1], DType::BF16, &[1, 0]),
        None
    );
}
