//! End to end: `aoe diff` over a generated FP8 family, checked against statistics computed here
//! from the raw safetensors bytes with plain code (own header parser, own FP8 E4M3 / BF16
//! decoders).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use aoe::diff::{compute, plot_svg, summarize, write_csv, write_json, DiffRow};
use aoe::fixture::{write_family, FamilySpec, FixtureDType};
use aoe::models::Models;
use aoe::recipe::Metric;
use aoe::stats::StatsStore;
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

/// One `aoe diff` run through the library, as the CLI does it: rows, CSV, JSON and the SVG.
fn run(
    base: &Path,
    parents: &[PathBuf],
    cache: &Path,
    svg: &Path,
) -> (Vec<DiffRow>, String, String) {
    let models = Models::open(base, parents).unwrap();
    let stats = StatsStore::new(&models, Some(cache));
    let calls = std::sync::atomic::AtomicU64::new(0);
    let last = std::sync::Mutex::new((0u64, 0u64));
    let rows = compute(&models, &stats, 3, &|done, total| {
        calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut l = last.lock().unwrap();
        assert!(done <= total);
        *l = (l.0.max(done), total);
    })
    .unwrap();
    let (done, total) = *last.lock().unwrap();
    assert!(
        total > 0 && done == total,
        "progress ends at the total: {done}/{total}"
    );
    assert_eq!(
        calls.into_inner() as usize,
        rows.len() + 1,
        "one progress call per unit, plus the start"
    );
    stats.flush().unwrap();
    let mut csv = Vec::new();
    write_csv(&rows, &mut csv).unwrap();
    let mut json = Vec::new();
    write_json(&rows, &summarize(&rows), &mut json).unwrap();
    std::fs::write(svg, plot_svg(&rows, Metric::Stored)).unwrap();
    (
        rows,
        String::from_utf8(csv).unwrap(),
        String::from_utf8(json).unwrap(),
    )
}

#[test]
fn diff_matches_an_independent_computation_and_caches() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs = family(&tmp.path().join("fam"));
    let (m1, m2) = (&dirs[0], &dirs[1]);
    let cache = tmp.path().join("cache");
    let svg = tmp.path().join("x.svg");
    let (rows, csv, json) = run(m1, std::slice::from_ref(m2), &cache, &svg);

    // Header and one row per unit weight of a mixable dtype, sorted by name.
    let t1 = read_checkpoint(m1);
    let t2 = read_checkpoint(m2);
    let want: Vec<&String> = t1
        .iter()
        .filter(|(n, (d, _, _))| {
            let companion = n
                .strip_suffix("_scale_inv")
                .is_some_and(|w| t1.contains_key(w));
            !companion && ["F8_E4M3", "BF16", "F16", "F32"].contains(&d.as_str())
        })
        .map(|(n, _)| n)
        .collect();
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some("name,group,layer,dtype,numel,stored,dequantized")
    );
    let parsed: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    let names: Vec<&str> = parsed.iter().map(|c| c[0]).collect();
    assert_eq!(names, want.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    assert_eq!(rows.len(), want.len());
    assert!(rows.len() > 50, "the tiny family has many weights");
    for c in &parsed {
        assert_eq!(c.len(), 7, "{c:?}");
        let (dtype, shape, _) = &t1[c[0]];
        assert_eq!(c[3], dtype);
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
    // Groups.
    let group_of = |n: &str| parsed.iter().find(|c| c[0] == n).unwrap()[1];
    assert_eq!(
        group_of("model.layers.2.mlp.experts.1.up_proj.weight"),
        "experts"
    );
    assert_eq!(group_of("model.layers.2.mlp.gate.weight"), "router");
    assert_eq!(group_of("model.norm.weight"), "norms");
    assert_eq!(
        group_of("model.layers.0.self_attn.o_proj.weight"),
        "attention"
    );

    // Values, recomputed from the raw bytes for an FP8 expert, an FP8 attention weight, a BF16
    // norm and the BF16 embeddings: stored, and dequantized for the FP8 ones.
    let csv_val = |n: &str, k: usize| -> f64 {
        parsed.iter().find(|c| c[0] == n).unwrap()[k]
            .parse()
            .unwrap()
    };
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
        let (got_s, got_d) = (csv_val(n, 5), csv_val(n, 6));
        assert!(
            close(got_s, want_stored),
            "{n}: stored {got_s} vs {want_stored}"
        );
        assert!(
            close(got_d, want_deq),
            "{n}: dequantized {got_d} vs {want_deq}"
        );
        assert!(want_stored > 0.0);
        // The CSV carries every bit of the row's value.
        let r = rows.iter().find(|r| r.name == n).unwrap();
        assert_eq!(got_s.to_bits(), r.stored.to_bits());
        assert_eq!(got_d.to_bits(), r.dequantized.to_bits());
        if d1 == "F8_E4M3" {
            // Codes differ by whole steps while dequantized values differ by ~1e-3.
            assert!(
                got_s > 10.0 * got_d,
                "{n}: stored {got_s}, dequantized {got_d}"
            );
        }
    }
    // A tensor the family keeps identical in every sibling.
    assert_eq!(csv_val("model.layers.0.input_layernorm.weight", 5), 0.0);

    // JSON carries the same rows and a summary.
    let j: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(j["rows"].as_array().unwrap().len(), rows.len());
    let groups: Vec<&str> = j["summary"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["group"].as_str().unwrap())
        .collect();
    assert!(groups.contains(&"experts") && groups.contains(&"attention"));

    // The plot.
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 "));
    assert!(text.trim_end().ends_with("</svg>"));
    assert!(text.contains(">experts<") && text.contains(">\u{2014}<"));

    // The cache directory holds the pair's statistics.
    let files: Vec<String> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        files
            .iter()
            .any(|f| f.starts_with("stats-") && f.ends_with(".json")),
        "{files:?}"
    );

    // A fresh store knows every statistic without reading a tensor, and a second run gives
    // identical output.
    let models = Models::open(m1, std::slice::from_ref(m2)).unwrap();
    let fresh = StatsStore::new(&models, Some(&cache));
    for r in &rows {
        for m in [Metric::Stored, Metric::Dequantized] {
            assert!(
                fresh.cached(1, &r.name, m).is_some(),
                "{} {m:?} not cached",
                r.name
            );
        }
    }
    let (rows2, csv2, json2) = run(
        m1,
        std::slice::from_ref(m2),
        &cache,
        &tmp.path().join("y.svg"),
    );
    assert_eq!(rows2, rows);
    assert_eq!(csv2, csv);
    assert_eq!(json2, json);
    assert_eq!(
        std::fs::read(tmp.path().join("y.svg")).unwrap(),
        std::fs::read(&svg).unwrap()
    );
}

#[test]
fn diff_takes_the_max_over_parents() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs = family(&tmp.path().join("fam"));
    assert!(dirs.len() >= 3);
    let parents = vec![dirs[1].clone(), dirs[2].clone()];
    let (rows, _, _) = run(
        &dirs[0],
        &parents,
        &tmp.path().join("cache"),
        &tmp.path().join("x.svg"),
    );
    let t: Vec<Tensors> = dirs[..3].iter().map(|d| read_checkpoint(d)).collect();
    let mut from_third = 0;
    for r in rows
        .iter()
        .filter(|r| r.name.contains("experts.") || r.name.contains("self_attn."))
    {
        let v: Vec<Vec<f32>> = t
            .iter()
            .map(|m| values(&m[&r.name].0, &m[&r.name].2))
            .collect();
        let (s2, s3) = (stat(&v[0], &v[1]), stat(&v[0], &v[2]));
        assert!(
            close(r.stored, s2.max(s3)),
            "{}: {} vs max({s2}, {s3})",
            r.name,
            r.stored
        );
        from_third += usize::from(s3 > s2);
    }
    assert!(from_third > 0, "some maxima come from the second donor");
    // Two cache files: one per (base, parent) pair.
    let n = std::fs::read_dir(tmp.path().join("cache")).unwrap().count();
    assert_eq!(n, 2);
}

#[test]
fn diff_needs_a_parent() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs = family(&tmp.path().join("fam"));
    let models = Models::open(&dirs[0], &[]).unwrap();
    let stats = StatsStore::new(&models, None);
    assert!(compute(&models, &stats, 1, &|_, _| {}).is_err());
}
