//! Tests of the MXFP4 kernels: fast paths against [`super::scalar`] on every SIMD level,
//! hand-computed values, encoder edge cases, the exact round-trip set, the fused mix.

use super::codec::f32_to_f16;
use super::mxfp4::{
    decode_mxfp4_at, e2m1_to_f32, e8m0_to_f32, f32_to_e2m1, mix_mxfp4_at, quantize_mxfp4_at,
};
use super::simd::available_levels;
use super::tests::{bits, same};
use super::*;
use crate::model::dtype::DType;

/// splitmix64.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

const EDGE_SCALES: [u8; 8] = [0, 1, 126, 127, 128, 253, 254, 255];
/// Group counts: none, one, around the 16-block tile and SIMD widths.
const GROUPS: &[usize] = &[0, 1, 2, 3, 5, 7, 15, 16, 17, 31, 33, 100];

/// Decode on every level and the reference; asserts they agree and returns the values.
fn decode_all(blocks: &[u8], scales: &[u8]) -> Vec<f32> {
    let g = scales.len();
    let mut want = vec![0f32; 32 * g];
    assert_eq!(scalar::decode_mxfp4(blocks, scales, &mut want), g);
    for lv in available_levels() {
        let mut got = vec![0f32; 32 * g];
        assert_eq!(decode_mxfp4_at(lv, blocks, scales, &mut got), g);
        same(&bits(&got), &bits(&want), &format!("decode {lv:?}"));
    }
    want
}

/// Quantize on every level and the reference; asserts they agree and returns (blocks, scales).
fn quantize_all(x: &[f32]) -> (Vec<u8>, Vec<u8>) {
    let g = x.len() / 32;
    let (mut wb, mut ws) = (vec![0u8; 16 * g], vec![0u8; g]);
    assert_eq!(scalar::quantize_mxfp4(x, &mut wb, &mut ws), g);
    for lv in available_levels() {
        let (mut gb, mut gs) = (vec![0xa5u8; 16 * g], vec![0xa5u8; g]);
        assert_eq!(quantize_mxfp4_at(lv, x, &mut gb, &mut gs), g);
        same(&gs, &ws, &format!("scales {lv:?}"));
        same(&gb, &wb, &format!("codes {lv:?}"));
    }
    (wb, ws)
}

#[test]
fn element_codecs_known_values() {
    let want = [
        0.0f32, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
    ];
    for c in 0..16u8 {
        assert_eq!(
            e2m1_to_f32(c).to_bits(),
            want[c as usize].to_bits(),
            "code {c}"
        );
        assert_eq!(scalar::e2m1_to_f32(c).to_bits(), want[c as usize].to_bits());
    }
    assert_eq!(e8m0_to_f32(127), 1.0);
    assert_eq!(e8m0_to_f32(128), 2.0);
    assert_eq!(e8m0_to_f32(126), 0.5);
    assert_eq!(e8m0_to_f32(1).to_bits(), 0x0080_0000); // 2^-126
    assert_eq!(e8m0_to_f32(0).to_bits(), 0x0040_0000); // 2^-127, subnormal
    assert_eq!(e8m0_to_f32(254).to_bits(), 0x7f00_0000); // 2^127
    assert_eq!(e8m0_to_f32(255).to_bits(), 0x7fc0_0000);
    for s in 0..=255u8 {
        assert_eq!(
            e8m0_to_f32(s).to_bits(),
            scalar::e8m0_to_f32(s).to_bits(),
            "scale {s}"
        );
    }
    // Rounding ties and saturation (the spec's list), both signs.
    let cases = [
        (0.0f32, 0u8),
        (0.25, 0),
        (0.2500001, 1),
        (0.24999999, 0),
        (0.5, 1),
        (0.75, 2),
        (0.74999994, 1),
        (1.25, 2),
        (1.2500001, 3),
        (1.75, 4),
        (1.7499999, 3),
        (2.5, 4),
        (2.5000002, 5),
        (3.5, 6),
        (3.4999998, 5),
        (5.0, 6),
        (5.0000005, 7),
        (6.0, 7),
        (7.99, 7),
        (1e30, 7),
        (f32::INFINITY, 7),
        (1e-40, 0),
    ];
    for (q, m) in cases {
        assert_eq!(f32_to_e2m1(q), m, "{q}");
        assert_eq!(f32_to_e2m1(-q), m | 8, "-{q}");
        assert_eq!(scalar::f32_to_e2m1(q), m, "ref {q}");
        assert_eq!(scalar::f32_to_e2m1(-q), m | 8, "ref -{q}");
    }
}

/// Every code byte under the edge scale bytes (and every scale byte), all levels.
#[test]
fn decode_all_codes_all_scales() {
    // 16 blocks per scale hold the 256 code bytes.
    let codes: Vec<u8> = (0..=255u8).collect();
    for s in 0..=255u8 {
        let scales = [s; 16];
        let v = decode_all(&codes, &scales);
        for (j, x) in v.iter().enumerate() {
            let byte = codes[j / 2];
            let c = if j % 2 == 0 { byte & 15 } else { byte >> 4 };
            let want = if s == 255 {
                0x7fc0_0000
            } else {
                (e2m1_to_f32(c) * e8m0_to_f32(s)).to_bits()
            };
            assert_eq!(x.to_bits(), want, "byte {byte:#x} j {j} scale {s}");
        }
    }
    // Hand-computed: byte 0x7f = codes 15 (low, −6) then 7 (high, 6).
    let v = decode_all(&[0x7f; 16], &[127]);
    assert_eq!((v[0], v[1]), (-6.0, 6.0));
    let v = decode_all(&[0x21; 16], &[128]);
    assert_eq!((v[0], v[1]), (1.0, 2.0)); // 0.5·2, 1·2
    let v = decode_all(&[0x81; 16], &[0]);
    assert_eq!((v[0].to_bits(), v[1].to_bits()), (0x0020_0000, 0x8000_0000)); // 2^-128, −0
    let v = decode_all(&[0x37; 16], &[254]);
    assert_eq!((v[0], v[1]), (f32::INFINITY, 1.5 * 2f32.powi(127))); // 6·2^127 overflows
    let v = decode_all(&[0x5e; 16], &[253]);
    assert_eq!((v[0], v[1]), (f32::NEG_INFINITY, 1.5 * 2f32.powi(127))); // −4·2^126, 3·2^126
    let v = decode_all(&[0x00; 16], &[255]);
    assert!(v.iter().all(|x| x.to_bits() == 0x7fc0_0000));
    for &s in &EDGE_SCALES {
        let _ = decode_all(&codes, &[s; 16]);
    }
}

#[test]
fn decode_random_blocks_and_lengths() {
    let mut rng = Rng(5);
    for &g in GROUPS {
        let b = rng.bytes(16 * g);
        let s: Vec<u8> = (0..g)
            .map(|_| match rng.below(4) {
                0 => EDGE_SCALES[rng.below(8) as usize],
                _ => rng.next() as u8,
            })
            .collect();
        let _ = decode_all(&b, &s);
    }
    // Mismatched lengths: only the whole blocks present, the rest untouched, no panic.
    let b = rng.bytes(16 * 5 + 7);
    let s = [127u8; 9];
    for lv in available_levels() {
        let mut out = vec![f32::from_bits(0xdead_beef); 32 * 3 + 5];
        assert_eq!(decode_mxfp4_at(lv, &b, &s, &mut out), 3);
        assert!(out[96..].iter().all(|x| x.to_bits() == 0xdead_beef));
        let mut out = vec![0f32; 32 * 9];
        assert_eq!(decode_mxfp4_at(lv, &b, &s, &mut out), 5);
        assert_eq!(decode_mxfp4_at(lv, &b, &[], &mut out), 0);
    }
    let mut out = vec![0f32; 32 * 9];
    assert_eq!(scalar::decode_mxfp4(&b, &s, &mut out), 5);
}

/// A block of 32 values with `vals` at the start and zeros after.
fn block(vals: &[f32]) -> Vec<f32> {
    let mut v = vec![0f32; 32];
    v[..vals.len()].copy_from_slice(vals);
    v
}

#[test]
fn quantize_hand_computed() {
    // amax 1 → floor(log2) 0, e = −2, byte 125; q = 4x.
    let (b, s) = quantize_all(&block(&[1.0, -0.25, 0.1, 0.0]));
    assert_eq!(s, [125]);
    // 1·4 = 4 → m 6; −0.25·4 = −1 → 10; 0.1·4 = 0.4 → m 1; 0.
    assert_eq!(&b[..2], &[0xa6, 0x01]);
    assert!(b[2..].iter().all(|&c| c == 0));
    // amax 6 → byte 127 (e = 0): the ties of the spec, both signs.
    let ties = [0.25f32, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0];
    let want = [0u8, 2, 2, 4, 4, 6, 6, 7];
    let mut v: Vec<f32> = ties.to_vec();
    v.extend(ties.iter().map(|x| -x));
    v.extend(ties.iter().map(|x| f32::from_bits(x.to_bits() + 1)));
    v.extend(ties.iter().map(|x| f32::from_bits(x.to_bits() - 1)));
    let (b, s) = quantize_all(&v);
    assert_eq!(s, [127]);
    let code = |j: usize| (b[j / 2] >> (4 * (j % 2))) & 15;
    for i in 0..8 {
        assert_eq!(code(i), want[i], "tie {}", ties[i]);
        assert_eq!(code(8 + i), want[i] | 8, "tie -{}", ties[i]);
        // One ulp above / below each tie (6 + ulp is the block's amax: still byte 127).
        let up = [1u8, 2, 3, 4, 5, 6, 7, 7][i];
        assert_eq!(code(16 + i), up, "above {}", ties[i]);
        let down = [0u8, 1, 2, 3, 4, 5, 6, 7][i];
        assert_eq!(code(24 + i), down, "below {}", ties[i]);
    }
    // amax 7.9 (still e = 0): saturates to code 7.
    let (b, s) = quantize_all(&block(&[7.9, -7.9]));
    assert_eq!((s[0], b[0]), (127, 0xf7));
    // amax 8 → e = 1, byte 128, q = 4 → 6.
    let (b, s) = quantize_all(&block(&[8.0, 3.0]));
    assert_eq!((s[0], b[0]), (128, 0x36)); // 3/2 = 1.5 → m 3
}

#[test]
fn quantize_edge_blocks() {
    let nan = f32::NAN;
    let inf = f32::INFINITY;
    // NaN anywhere (either sign, any payload), ±inf: byte 255, zero codes.
    for bad in [nan, -nan, f32::from_bits(0x7f80_0001), inf, -inf] {
        for pos in [0usize, 1, 17, 31] {
            let mut v = vec![1.0f32; 32];
            v[pos] = bad;
            let (b, s) = quantize_all(&v);
            assert_eq!(s, [255], "{bad} at {pos}");
            assert!(b.iter().all(|&c| c == 0));
        }
    }
    // All +0: byte 0, codes 0; all −0: byte 0, codes 8; mixed.
    let (b, s) = quantize_all(&[0.0; 32]);
    assert_eq!((s[0], b[0]), (0, 0));
    let (b, s) = quantize_all(&[-0.0; 32]);
    assert_eq!(s, [0]);
    assert!(b.iter().all(|&c| c == 0x88));
    // A negative value that rounds to zero keeps code 8.
    let (b, s) = quantize_all(&block(&[6.0, -0.1]));
    assert_eq!((s[0], b[0]), (127, 0x87));
    // Subnormal amax: byte 0 (e clamps to −127), q = x·2^127.
    let sub = |k: u32| f32::from_bits(k);
    let (b, s) = quantize_all(&block(&[
        sub(0x0020_0000),
        sub(0x0060_0000),
        sub(1),
        -sub(1),
    ]));
    assert_eq!(s, [0]);
    assert_eq!(&b[..2], &[0x31, 0x80]); // 2^-128 → 0.5 (m 1), 3·2^-128 → 1.5 (m 3), 2^-149 → 0
                                        // Smallest normal amax 2^-126: e = −128 clamps to −127, q = 2 → m 4.
    let (b, s) = quantize_all(&block(&[f32::MIN_POSITIVE, -f32::MIN_POSITIVE * 1.9]));
    assert_eq!((s[0], b[0]), (0, 0xe4)); // 1.9·2 = 3.8 → 4.0 (m 6), sign
                                         // amax 2^-124 → floor −124, e = −126, byte 1.
    let (_, s) = quantize_all(&block(&[2f32.powi(-124)]));
    assert_eq!(s, [1]);
    // Huge: f32::MAX → byte 252 (e = 125), q = 7.99 → 6; 2^127 → q = 4.
    let (b, s) = quantize_all(&block(&[f32::MAX, -2f32.powi(127), 1e-30]));
    assert_eq!(s, [252]);
    assert_eq!(&b[..2], &[0xe7, 0x00]); // 1e-30 / 2^125 is a subnormal quotient → 0
}

#[test]
fn quantize_random_and_lengths() {
    let mut rng = Rng(9);
    for &g in GROUPS {
        for kind in 0..4 {
            let x: Vec<f32> = (0..32 * g)
                .map(|_| match kind {
                    // Any bit pattern (NaN, inf, subnormals included).
                    0 => f32::from_bits(rng.next() as u32),
                    // Typical weights, one exponent range per block.
                    1 => (rng.below(2001) as f32 - 1000.0) * 1e-5,
                    // Exactly on E2M1 grid points and ties times a power of two.
                    2 => {
                        let t = [
                            0.25f32, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0,
                            6.0,
                        ];
                        let v = t[rng.below(14) as usize] * 2f32.powi(rng.below(40) as i32 - 20);
                        if rng.below(2) == 0 {
                            -v
                        } else {
                            v
                        }
                    }
                    // Tiny and huge magnitudes.
                    _ => f32::from_bits(
                        (rng.next() as u32 & 0x80ff_ffff)
                            | [0, 0x7e80_0000, 0x7f00_0000][rng.below(3) as usize],
                    ),
                })
                .collect();
            let _ = quantize_all(&x);
        }
    }
    // Mismatched lengths: whole blocks only, no panic.
    let x = vec![1.0f32; 32 * 4 + 3];
    for lv in available_levels() {
        let (mut b, mut s) = (vec![0xeeu8; 16 * 3 + 1], vec![0xeeu8; 9]);
        assert_eq!(quantize_mxfp4_at(lv, &x, &mut b, &mut s), 3);
        assert_eq!((b[48], s[3]), (0xee, 0xee));
        assert_eq!(quantize_mxfp4_at(lv, &x[..31], &mut b, &mut s), 0);
    }
    let (mut b, mut s) = (vec![0u8; 16 * 3 + 1], vec![0u8; 9]);
    assert_eq!(scalar::quantize_mxfp4(&x, &mut b, &mut s), 3);
}

/// decode → encode gives the block back exactly when:
/// * the largest magnitude code of the block is 6 or 7 (value 4 or 6) and the scale byte is at
///   most 252 (at 253 and 254 such values overflow to inf), or
/// * the scale byte is 0 (every amax then clamps to e = −127), or
/// * the scale byte is 255 and every code byte is 0 (NaN blocks encode as 255 + zeros).
///
/// Otherwise (largest magnitude ≤ 3 at byte 1..=252, or 4/6 at 253/254) it does not: the tests
/// check both directions.
#[test]
fn round_trip_exact_set() {
    let mut rng = Rng(13);
    let mut cases: Vec<[u8; 16]> = (0..=255u8).map(|b| [b; 16]).collect();
    for mmax in 0..8u8 {
        for _ in 0..24 {
            let mut blk = [0u8; 16];
            for c in blk.iter_mut() {
                let lo = rng.below(mmax as u64 + 1) as u8 | (rng.below(2) as u8) << 3;
                let hi = rng.below(mmax as u64 + 1) as u8 | (rng.below(2) as u8) << 3;
                *c = lo | hi << 4;
            }
            let j = rng.below(32) as usize;
            let sign = (rng.below(2) as u8) << 3;
            let nib = mmax | sign;
            blk[j / 2] = if j.is_multiple_of(2) {
                (blk[j / 2] & 0xf0) | nib
            } else {
                (blk[j / 2] & 0x0f) | nib << 4
            };
            cases.push(blk);
        }
    }
    let (mut n_yes, mut n_no) = (0, 0);
    for s in 0..=255u8 {
        let blocks: Vec<u8> = cases.iter().flatten().copied().collect();
        let scales = vec![s; cases.len()];
        let v = decode_all(&blocks, &scales);
        let (b2, s2) = quantize_all(&v);
        for (i, blk) in cases.iter().enumerate() {
            let mmax = blk
                .iter()
                .map(|&c| (c & 7).max((c >> 4) & 7))
                .max()
                .unwrap();
            let expect = match s {
                0 => true,
                255 => blk.iter().all(|&c| c == 0),
                _ => mmax >= 6 && s <= 252,
            };
            let got = s2[i] == s && b2[16 * i..16 * i + 16] == blk[..];
            assert_eq!(
                got, expect,
                "block {blk:02x?} scale {s}: round trip {got}, want {expect}"
            );
            if got {
                n_yes += 1
            } else {
                n_no += 1
            }
        }
    }
    assert!(n_yes > 10_000 && n_no > 10_000, "{n_yes} {n_no}");
}

fn mx_blocks(rng: &mut Rng, g: usize, special: bool) -> (Vec<u8>, Vec<u8>) {
    let b = rng.bytes(16 * g);
    let s = (0..g)
        .map(|_| {
            if special && rng.below(5) == 0 {
                EDGE_SCALES[rng.below(8) as usize]
            } else {
                115 + rng.below(12) as u8
            }
        })
        .collect();
    (b, s)
}

fn plain_bytes(rng: &mut Rng, dt: DType, n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * dt.size());
    for _ in 0..n {
        let x = (rng.below(2001) as f32 - 1000.0) * 3e-4;
        match dt {
            DType::BF16 => out.extend(f32_to_bf16(x).to_le_bytes()),
            DType::F16 => out.extend(f32_to_f16(x).to_le_bytes()),
            _ => out.extend(x.to_le_bytes()),
        }
    }
    out
}

#[test]
fn mix_matches_reference_and_composition() {
    let mut rng = Rng(21);
    for &g in GROUPS {
        for case in 0..6 {
            let mx: Vec<(Vec<u8>, Vec<u8>)> = (0..3)
                .map(|_| mx_blocks(&mut rng, g, case % 2 == 1))
                .collect();
            let pl: Vec<(DType, Vec<u8>)> = [DType::BF16, DType::F16, DType::F32]
                .iter()
                .map(|&dt| (dt, plain_bytes(&mut rng, dt, 32 * g)))
                .collect();
            let src = |k: usize| -> MxSource<'_> {
                if k < 3 {
                    MxSource::Mxfp4 {
                        blocks: &mx[k].0,
                        scales: &mx[k].1,
                    }
                } else {
                    MxSource::Plain {
                        dtype: pl[k - 3].0,
                        bytes: &pl[k - 3].1,
                    }
                }
            };
            let picks: &[&[(usize, f32)]] = &[
                &[(0, 0.5), (1, 0.5)],
                &[(0, 1.0), (1, 0.0)],
                &[(0, -0.3), (3, 1.3)],
                &[(4, 0.25), (0, 0.75), (5, -2.0)],
                &[(2, 0.7), (1, 0.2), (0, 0.1)],
                &[(1, 1.0)],
            ];
            let inputs: Vec<MxInput> = picks[case]
                .iter()
                .map(|&(k, w)| MxInput {
                    source: src(k),
                    weight: w,
                })
                .collect();
            let (mut wb, mut ws) = (vec![0u8; 16 * g], vec![0u8; g]);
            scalar::mix_mxfp4(&inputs, &mut wb, &mut ws).unwrap();
            // The unfused public fast paths compose to the same bytes.
            let mut acc = vec![0f32; 32 * g];
            let mut d = vec![0f32; 32 * g];
            for (i, p) in inputs.iter().enumerate() {
                match p.source {
                    MxSource::Mxfp4 { blocks, scales } => {
                        assert_eq!(decode_mxfp4(blocks, scales, &mut d), g)
                    }
                    MxSource::Plain { dtype, bytes } => decode(dtype, bytes, &mut d),
                }
                scale_add(&mut acc, p.weight, &d, i == 0);
            }
            let (mut cb, mut cs) = (vec![0u8; 16 * g], vec![0u8; g]);
            assert_eq!(quantize_mxfp4(&acc, &mut cb, &mut cs), g);
            same(&cs, &ws, &format!("composed scales g={g} case {case}"));
            same(&cb, &wb, &format!("composed codes g={g} case {case}"));
            for lv in available_levels() {
                let (mut gb, mut gs) = (vec![0u8; 16 * g], vec![0u8; g]);
                mix_mxfp4_at(lv, &inputs, &mut gb, &mut gs).unwrap();
                same(&gs, &ws, &format!("scales g={g} case {case} {lv:?}"));
                same(&gb, &wb, &format!("codes g={g} case {case} {lv:?}"));
            }
        }
    }
}

#[test]
fn mix_hand_computed() {
    // 0.5·6 + 0.5·1 = 3.5 in every element: amax 3.5 → floor 1, e = −1, byte 126, q = 7 → 6
    // (code 7).
    let a = [0x77u8; 16];
    let b = [0x22u8; 16];
    let inputs = [
        MxInput {
            source: MxSource::Mxfp4 {
                blocks: &a,
                scales: &[127],
            },
            weight: 0.5,
        },
        MxInput {
            source: MxSource::Mxfp4 {
                blocks: &b,
                scales: &[127],
            },
            weight: 0.5,
        },
    ];
    let (mut ob, mut os) = ([0u8; 16], [0u8; 1]);
    mix_mxfp4(&inputs, &mut ob, &mut os).unwrap();
    assert_eq!((os[0], ob), (126, [0x77; 16]));
    // λ = 1 on a parent alone, scale 0 block: the block comes back (the round-trip set).
    let c = [0x3au8; 16];
    let one = [MxInput {
        source: MxSource::Mxfp4 {
            blocks: &c,
            scales: &[0],
        },
        weight: 1.0,
    }];
    mix_mxfp4(&one, &mut ob, &mut os).unwrap();
    assert_eq!((os[0], ob), (0, c));
    // A NaN parent block (scale 255) poisons the block whatever the weight.
    let bad = [
        MxInput {
            source: MxSource::Mxfp4 {
                blocks: &a,
                scales: &[127],
            },
            weight: 1.0,
        },
        MxInput {
            source: MxSource::Mxfp4 {
                blocks: &b,
                scales: &[255],
            },
            weight: 0.0,
        },
    ];
    mix_mxfp4(&bad, &mut ob, &mut os).unwrap();
    assert_eq!((os[0], ob), (255, [0; 16]));
    // −0 (code 8) · 0.5 + 0 · 0.5 = +0: codes 0; the scalar reference agrees.
    let z = [0x88u8; 16];
    let zero = [0u8; 16];
    let zs = [
        MxInput {
            source: MxSource::Mxfp4 {
                blocks: &z,
                scales: &[127],
            },
            weight: 0.5,
        },
        MxInput {
            source: MxSource::Mxfp4 {
                blocks: &zero,
                scales: &[127],
            },
            weight: 0.5,
        },
    ];
    mix_mxfp4(&zs, &mut ob, &mut os).unwrap();
    assert_eq!((os[0], ob), (0, [0; 16]));
    // BF16 parent first: 0.5·2.0 + 0.5·6 = 4: amax 4 → floor 2, e = 0, byte 127, q = 4 → m 6.
    let bf: Vec<u8> = (0..32)
        .flat_map(|_| f32_to_bf16(2.0).to_le_bytes())
        .collect();
    let mixed = [
        MxInput {
            source: MxSource::Plain {
                dtype: DType::BF16,
                bytes: &bf,
            },
            weight: 0.5,
        },
        MxInput {
            source: MxSource::Mxfp4 {
                blocks: &a,
                scales: &[127],
            },
            weight: 0.5,
        },
    ];
    mix_mxfp4(&mixed, &mut ob, &mut os).unwrap();
    assert_eq!((os[0], ob), (127, [0x66; 16]));
}

#[test]
fn mix_rejects_bad_shapes_without_writing() {
    let a = [0x11u8; 32];
    let s2 = [127u8; 2];
    let bf = [0u8; 64 * 2];
    let cases: Vec<Vec<MxInput>> = vec![
        vec![],
        vec![MxInput {
            source: MxSource::Mxfp4 {
                blocks: &a[..31],
                scales: &s2,
            },
            weight: 1.0,
        }],
        vec![MxInput {
            source: MxSource::Mxfp4 {
                blocks: &a,
                scales: &s2[..1],
            },
            weight: 1.0,
        }],
        vec![MxInput {
            source: MxSource::Plain {
                dtype: DType::BF16,
                bytes: &bf[..127],
            },
            weight: 1.0,
        }],
        vec![MxInput {
            source: MxSource::Plain {
                dtype: DType::F8E4M3,
                bytes: &bf[..64],
            },
            weight: 1.0,
        }],
    ];
    for (i, inputs) in cases.iter().enumerate() {
        let (mut ob, mut os) = ([0xeeu8; 32], [0xeeu8; 2]);
        assert!(mix_mxfp4(inputs, &mut ob, &mut os).is_err(), "case {i}");
        assert!(
            scalar::mix_mxfp4(inputs, &mut ob, &mut os).is_err(),
            "case {i}"
        );
        assert!(ob.iter().chain(&os).all(|&b| b == 0xee), "case {i} wrote");
    }
    // Output blocks that do not match the scales.
    let ok = [MxInput {
        source: MxSource::Mxfp4 {
            blocks: &a,
            scales: &s2,
        },
        weight: 1.0,
    }];
    let (mut ob, mut os) = ([0u8; 31], [0u8; 2]);
    assert!(mix_mxfp4(&ok, &mut ob, &mut os).is_err());
}

/// The element rounding of every level against the reference on a sweep of |q| in [0, 8)
/// (every 61st f32 bit pattern, both signs, plus ±64 ulps around each tie and grid point):
/// blocks whose amax is 7.5 have e = 0, so q = x exactly.
#[test]
fn quantize_element_rounding_sweep() {
    let mut xs: Vec<f32> = (0..0x4100_0000u32)
        .step_by(61)
        .map(f32::from_bits)
        .flat_map(|x| [x, -x])
        .collect();
    for t in [
        0.25f32, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0,
    ] {
        for d in -64i32..=64 {
            let x = f32::from_bits((t.to_bits() as i32 + d) as u32);
            xs.extend([x, -x]);
        }
    }
    let mut v = Vec::with_capacity(xs.len() / 31 * 32 + 32);
    for c in xs.chunks(31) {
        v.push(7.5);
        v.extend_from_slice(c);
        v.resize(v.len().next_multiple_of(32), 0.0);
    }
    let (b, s) = quantize_all(&v);
    assert!(s.iter().all(|&s| s == 127));
    // And the element function itself, on the same values.
    for &x in &xs {
        assert_eq!(f32_to_e2m1(x), scalar::f32_to_e2m1(x), "{x:e}");
    }
    assert!(!b.is_empty());
}
