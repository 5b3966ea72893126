//! End to end: the `aoe diff` binary over a generated FP8 family, checked against statistics
//! computed here from the raw safetensors bytes with plain code (own header parser, own FP8 E4M3
//! / BF16 decoders), then the statistics cache it fills.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use aoe::commands::diff::{compute, write_csv};
use aoe::model::models::Models;
use aoe::recipe::stats::StatsStore;
use aoe::recipe::Metric;
use aoe::testkit::{write_family, FamilySpec, FixtureDType};
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// An independent reader.

/// name → (dtype, shape, raw bytes) of every tensor of a checkpoint directory.
type Tensors = BTreeMap<String, (String, Vec<usize>, Vec<u8>)>;

fn read_checkpoint(dir: &Path) -> Tensors {
    let index: Value =
        serde_json::from_slice(&std::fs::read(dir.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    let mut files: Vec<String> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    files.sort();
    files.dedup();
    let mut out = Tensors::new();
    for f in files {
        let buf = std::fs::read(dir.join(&f)).unwrap();
        let n = u64::from_le_bytes(buf[..8].try_into().unwrap()) as usize;
        let header: Value = serde_json::from_slice(&buf[8..8 + n]).unwrap();
        let data = &buf[8 + n..];
        for (name, t) in header.as_object().unwrap() {
            if name == "__metadata__" {
                continue;
            }
            let dtype = t["dtype"].as_str().unwrap().to_string();
            let shape = t["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect();
            let off = t["data_offsets"].as_array().unwrap();
            let (a, b) = (
                off[0].as_u64().unwrap() as usize,
                off[1].as_u64().unwrap() as usize,
            );
            out.insert(name.clone(), (dtype, shape, data[a..b].to_vec()));
        }
    }
    out
}

/// FP8 E4M3 "fn": no infinities, S.1111.111 is NaN, bias 7.
fn e4m3(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = ((b >> 3) & 0x0f) as i32;
    let man = (b & 0x07) as f32;
    if exp == 15 && man == 7.0 {
        return f32::NAN;
    }
    let mag = if exp == 0 {
        man / 8.0 * 2f32.powi(-6)
    } else {
        (1.0 + man / 8.0) * 2f32.powi(exp - 7)
    };
    sign * mag
}

/// Stored values as f32: FP8 codes without scales, BF16 / F32 as they are.
fn values(dtype: &str, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        "F8_E4M3" => bytes.iter().map(|&b| e4m3(b)).collect(),
        "BF16" => bytes
            .chunks_exact(2)
            .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
            .collect(),
        "F32" => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        d => panic!("no float values for {d}"),
    }
}

/// Dequantized values: an FP8 code times the f32 scale of its 128×128 block.
fn dequantized(t: &Tensors, name: &str) -> Vec<f32> {
    let (dtype, shape, bytes) = &t[name];
    let mut v = values(dtype, bytes);
    if let Some((_, sshape, sbytes)) = t.get(&format!("{name}_scale_inv")) {
        let s = values("F32", sbytes);
        let cols = shape[1];
        for (i, x) in v.iter_mut().enumerate() {
            let (r, c) = (i / cols, i % cols);
            *x *= s[(r / 128) * sshape[1] + c / 128];
        }
    }
    v
}

fn stat(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let s: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum();
    s.sqrt() / (a.len() as f64).sqrt()
}

fn close(a: f64, b: f64) -> bool {
    (a.is_nan() && b.is_nan()) || (a - b).abs() <= 1e-12 * a.abs().max(b.abs()) + 1e-300
}

// ---------------------------------------------------------------------------------------------

fn family(dir: &Path) -> Vec<PathBuf> {
    write_family(&FamilySpec::tiny(FixtureDType::Fp8), dir).expect("fixture family")
}

/// Runs `aoe diff --base BASE --parent P... ARGS` with `XDG_CACHE_HOME=xdg`; returns stdout.
fn aoe_diff(base: &Path, parents: &[PathBuf], args: &[&str], xdg: &Path) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_aoe"));
    cmd.arg("diff").arg("--base").arg(base);
    for p in parents {
        cmd.arg("--parent").arg(p);
    }
    let out = cmd
        .args(args)
        .env("XDG_CACHE_HOME", xdg)
        .output()
        .expect("run aoe");
    assert!(
        out.status.success(),
        "aoe diff {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// CSV lines after the header, split (no tensor name of the family needs quoting).
fn csv_rows(csv: &str) -> Vec<Vec<String>> {
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some("name,group,layer,dtype,numel,stored,dequantized")
    );
    lines
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect()
}

fn stats_files(dir: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<String> = rd
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f.starts_with("stats-") && f.ends_with(".json"))
        .collect();
    v.sort();
    v
}

#[test]
fn diff_matches_an_independent_computation_and_caches() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs = family(&tmp.path().join("fam"));
    let (m1, m2) = (&dirs[0], &dirs[1]);
    let parents = std::slice::from_ref(m2);
    let cache = tmp.path().join("cache");
    let xdg = tmp.path().join("xdg");
    let svg = tmp.path().join("x.svg");
    let cache_s = cache.to_str().unwrap();
    let svg_s = svg.to_str().unwrap();
    let args = ["--csv", "--cache-dir", cache_s, "--plot", svg_s];
    let csv = aoe_diff(m1, parents, &args, &xdg);

    // Header and one row per unit weight of a mixable dtype, sorted by name.
    let t1 = read_checkpoint(m1);
    let t2 = read_checkpoint(m2);
    let want: Vec<&str> = t1
        .iter()
        .filter(|(n, (d, _, _))| {
            let companion = n
                .strip_suffix("_scale_inv")
                .is_some_and(|w| t1.contains_key(w));
            !companion && ["F8_E4M3", "BF16", "F16", "F32"].contains(&d.as_str())
        })
        .map(|(n, _)| n.as_str())
        .collect();
    let parsed = csv_rows(&csv);
    let names: Vec<&str> = parsed.iter().map(|c| c[0].as_str()).collect();
    assert_eq!(names, want);
    assert!(parsed.len() > 50, "the tiny family has many weights");
    assert!(!names.iter().any(|n| n.ends_with("_scale_inv")));
    for c in &parsed {
        assert_eq!(c.len(), 7, "{c:?}");
        let (dtype, shape, _) = &t1[&c[0]];
        assert_eq!(&c[3], dtype);
        assert_eq!(
            c[4].parse::<u64>().unwrap(),
            shape.iter().product::<usize>() as u64
        );
        assert_eq!(
            c[2].is_empty(),
            !c[0].contains("layers."),
            "layer column of {}",
            c[0]
        );
    }
    let cell =
        |n: &str, k: usize| -> String { parsed.iter().find(|c| c[0] == n).unwrap()[k].clone() };
    assert_eq!(
        cell("model.layers.2.mlp.experts.1.up_proj.weight", 1),
        "experts"
    );
    assert_eq!(cell("model.layers.2.mlp.experts.1.up_proj.weight", 2), "2");
    assert_eq!(cell("model.layers.2.mlp.gate.weight", 1), "router");
    assert_eq!(cell("model.norm.weight", 1), "norms");
    assert_eq!(cell("model.norm.weight", 2), "");
    assert_eq!(
        cell("model.layers.0.self_attn.o_proj.weight", 1),
        "attention"
    );

    // Values, recomputed from the raw bytes for an FP8 expert, an FP8 attention weight, a BF16
    // norm and the BF16 embeddings: stored, and dequantized.
    let val = |n: &str, k: usize| -> f64 { cell(n, k).parse().unwrap() };
    for n in [
        "model.layers.2.mlp.experts.1.up_proj.weight",
        "model.layers.1.self_attn.q_b_proj.weight",
        "model.layers.3.post_attention_layernorm.weight",
        "model.embed_tokens.weight",
    ] {
        let (d1, _, b1) = &t1[n];
        let (d2, _, b2) = &t2[n];
        let want_stored = stat(&values(d1, b1), &values(d2, b2));
        let want_deq = stat(&dequantized(&t1, n), &dequantized(&t2, n));
        let (got_s, got_d) = (val(n, 5), val(n, 6));
        assert!(
            close(got_s, want_stored),
            "{n}: stored {got_s} vs {want_stored}"
        );
        assert!(
            close(got_d, want_deq),
            "{n}: dequantized {got_d} vs {want_deq}"
        );
        assert!(want_stored > 0.0);
        if d1 == "F8_E4M3" {
            // Codes differ by whole steps while dequantized values differ by ~1e-3.
            assert!(
                got_s > 10.0 * got_d,
                "{n}: stored {got_s}, dequantized {got_d}"
            );
        }
    }
    // A tensor the family keeps identical in every sibling.
    assert_eq!(val("model.layers.0.input_layernorm.weight", 5), 0.0);

    // The plot.
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 "));
    assert!(text.trim_end().ends_with("</svg>"));
    assert!(text.contains(">experts<") && text.contains(">\u{2014}<"));

    // The cache directory holds the pair's statistics; the default one was not touched.
    assert_eq!(stats_files(&cache).len(), 1);
    assert!(!xdg.exists());

    // A fresh store knows every statistic without reading a tensor, with every bit.
    let models = Models::open(m1, parents).unwrap();
    let fresh = StatsStore::new(&models, Some(&cache));
    for c in &parsed {
        for (m, k) in [(Metric::Stored, 5), (Metric::Dequantized, 6)] {
            let v = fresh.cached(1, &c[0], m);
            let want: f64 = c[k].parse().unwrap();
            assert_eq!(
                v.map(f64::to_bits),
                Some(want.to_bits()),
                "{} {m:?}: cached {v:?}, printed {want:?}",
                c[0]
            );
        }
    }
    // ... and a second run prints the same bytes and draws the same plot.
    let svg2 = tmp.path().join("y.svg");
    let args2 = [
        "--csv",
        "--cache-dir",
        cache_s,
        "--plot",
        svg2.to_str().unwrap(),
    ];
    assert_eq!(aoe_diff(m1, parents, &args2, &xdg), csv);
    assert_eq!(std::fs::read(&svg2).unwrap(), std::fs::read(&svg).unwrap());

    // JSON and the table, from the cache.
    let json = aoe_diff(m1, parents, &["--json", "--cache-dir", cache_s], &xdg);
    let j: Value = serde_json::from_str(&json).unwrap();
    let jrows = j["rows"].as_array().unwrap();
    assert_eq!(jrows.len(), parsed.len());
    for (r, c) in jrows.iter().zip(&parsed) {
        assert_eq!(r["name"], c[0].as_str());
        assert_eq!(
            r["stored"].as_f64().unwrap().to_bits(),
            c[5].parse::<f64>().unwrap().to_bits()
        );
    }
    let groups: Vec<&str> = j["summary"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["group"].as_str().unwrap())
        .collect();
    assert!(groups.contains(&"experts") && groups.contains(&"attention"));
    let table = aoe_diff(m1, parents, &["--cache-dir", cache_s], &xdg);
    assert!(table.lines().next().unwrap().starts_with("name"));
    assert!(table.contains("excluded from min/median/max"));
    assert_eq!(
        table
            .lines()
            .filter(|l| l.starts_with("model.") || l.starts_with("lm_head"))
            .count(),
        parsed.len()
    );
}

#[test]
fn diff_takes_the_max_over_parents_and_defaults_to_xdg_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs = family(&tmp.path().join("fam"));
    assert!(dirs.len() >= 3);
    let parents = vec![dirs[1].clone(), dirs[2].clone()];
    let xdg = tmp.path().join("xdg");
    let csv = aoe_diff(&dirs[0], &parents, &["--csv", "--threads", "2"], &xdg);
    let t: Vec<Tensors> = dirs[..3].iter().map(|d| read_checkpoint(d)).collect();
    let mut from_third = 0;
    let rows = csv_rows(&csv);
    for c in rows
        .iter()
        .filter(|c| c[0].contains("experts.") || c[0].contains("self_attn."))
    {
        let v: Vec<Vec<f32>> = t.iter().map(|m| values(&m[&c[0]].0, &m[&c[0]].2)).collect();
        let (s2, s3) = (stat(&v[0], &v[1]), stat(&v[0], &v[2]));
        let got: f64 = c[5].parse().unwrap();
        assert!(close(got, s2.max(s3)), "{}: {got} vs max({s2}, {s3})", c[0]);
        from_third += usize::from(s3 > s2);
    }
    assert!(from_third > 0, "some maxima come from the second donor");
    // One cache file per (base, parent) pair, under $XDG_CACHE_HOME/aoe.
    assert_eq!(stats_files(&xdg.join("aoe")).len(), 2);
}

#[test]
fn diff_compute_reports_progress_and_needs_a_parent() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs = family(&tmp.path().join("fam"));
    let models = Models::open(&dirs[0], &dirs[1..2]).unwrap();
    let stats = StatsStore::new(&models, None);
    let calls = std::sync::atomic::AtomicUsize::new(0);
    let last = std::sync::Mutex::new((0u64, 0u64));
    let rows = compute(&models, &stats, 3, &|done, total| {
        calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut l = last.lock().unwrap();
        assert!(
            done <= total && done >= l.0,
            "progress {done}/{total} after {}",
            l.0
        );
        *l = (done, total);
    })
    .unwrap();
    let (done, total) = *last.lock().unwrap();
    assert!(
        total > 0 && done == total,
        "progress ends at the total: {done}/{total}"
    );
    assert_eq!(
        calls.into_inner(),
        rows.len() + 1,
        "one call per unit, plus the start"
    );
    // Same rows whatever the thread count.
    let one = compute(&models, &StatsStore::new(&models, None), 1, &|_, _| {}).unwrap();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    write_csv(&rows, &mut a).unwrap();
    write_csv(&one, &mut b).unwrap();
    assert_eq!(a, b);

    let alone = Models::open(&dirs[0], &[]).unwrap();
    let stats = StatsStore::new(&alone, None);
    assert!(compute(&alone, &stats, 1, &|_, _| {}).is_err());
}
