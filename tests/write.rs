//! `aoe write` against the independent numpy + ml_dtypes implementation, byte for byte, and
//! read back with the `safetensors` crate and Python's `safe_open`.

mod common;

use std::path::{Path, PathBuf};

use aoe::testkit::FixtureDType;
use common::*;

/// Writes the child with `aoe write ARGS`, then with the reference from a recipe built from
/// the same ARGS by the test (never from the child's own `aoe_recipe.json`, which could carry
/// a bug of aoe's into the reference), and compares every file. Returns the Rust child's
/// directory.
fn write_and_compare(tmp: &Path, label: &str, args: &[&str]) -> PathBuf {
    let out = tmp.join(format!("{label}-rust"));
    let mut full: Vec<&str> = vec!["write"];
    full.extend_from_slice(args);
    let cache = tmp.join("stats");
    full.extend_from_slice(&[
        "--cache-dir",
        cache.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    aoe_ok(&full);
    let recipe = tmp.join(format!("{label}-recipe.json"));
    std::fs::write(&recipe, recipe_of_flags(args).to_string()).unwrap();
    let refout = tmp.join(format!("{label}-ref"));
    reference(&["write", recipe.to_str().unwrap(), refout.to_str().unwrap()]);
    assert_same_dirs(&out, &refout, &["aoe_recipe.json"]);
    out
}

/// The reference's recipe JSON for `aoe write` recipe flags, as the docs define them.
fn recipe_of_flags(args: &[&str]) -> serde_json::Value {
    let nums = |v: &str| -> Vec<f64> { v.split(',').map(|x| x.parse().unwrap()).collect() };
    let (mut base, mut parents, mut weights) = (None, Vec::new(), None);
    let (mut delta, mut subset, mut rules, mut metric) = (0.0, Vec::new(), Vec::new(), "stored");
    let mut it = args.iter();
    while let Some(&flag) = it.next() {
        let mut val = || *it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag {
            "--base" => base = Some(val()),
            "--parent" => parents.push(val()),
            "--lambda" => {
                let l: f64 = val().parse().unwrap();
                weights = Some(vec![1.0 - l, l]);
            }
            "--weights" => weights = Some(nums(val())),
            "--delta" => delta = val().parse().unwrap(),
            "--subset" => subset.push(val()),
            "--rule" => {
                let (pat, w) = val().rsplit_once('=').unwrap();
                rules.push(serde_json::json!({"pattern": pat, "weights": nums(w)}));
            }
            "--metric" => metric = val(),
            other => panic!("recipe_of_flags: no reference form for {other}"),
        }
    }
    if subset.is_empty() {
        subset.push("full");
    }
    serde_json::json!({
        "base": base.expect("--base"),
        "parents": parents,
        "weights": weights.expect("--lambda or --weights"),
        "delta": delta,
        "subset": subset,
        "rules": rules,
        "metric": metric,
    })
}

/// Headers of every child shard are the base's, byte for byte, and parse with the
/// `safetensors` crate; every tensor's bytes are the ones Python `safe_open` returns.
fn check_read_back(base: &Path, child: &Path, tmp: &Path) {
    for f in files(base).iter().filter(|f| f.ends_with(".safetensors")) {
        let (b, c) = (
            std::fs::read(base.join(f)).unwrap(),
            std::fs::read(child.join(f)).unwrap(),
        );
        let n = 8 + u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
        assert_eq!(&b[..n], &c[..n], "{f}: header differs from the base's");
        let st = safetensors::SafeTensors::deserialize(&c).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert!(!st.names().is_empty());
    }
    let dump = tmp.join(format!(
        "dump-{}.json",
        child.file_name().unwrap().to_str().unwrap()
    ));
    reference(&["dump", s(child), s(&dump)]);
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&dump).unwrap()).unwrap();
    let ck = aoe::model::checkpoint::Checkpoint::open(child).unwrap();
    let obj = v.as_object().unwrap();
    assert_eq!(
        obj.len(),
        ck.len(),
        "safe_open saw a different number of tensors"
    );
    use sha2::Digest;
    for (name, e) in obj {
        let bytes = ck.bytes(name).unwrap().unwrap();
        let hex: String = sha2::Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            e["sha256"].as_str().unwrap(),
            hex,
            "{name}: safe_open bytes differ"
        );
    }
}

#[test]
fn fp8_full_mix_and_chimera_match_the_reference() {
    let tmp = tempdir();
    let m = family(tmp.path(), FixtureDType::Fp8, 2, 11);
    let (b, p) = (s(&m[0]), s(&m[1]));
    let child = write_and_compare(
        tmp.path(),
        "half",
        &["--base", b, "--parent", p, "--lambda", "0.5"],
    );
    check_read_back(&m[0], &child, tmp.path());

    // The Chimera: routed experts are R1's bytes (scales included), everything else V3's.
    let chimera = write_and_compare(
        tmp.path(),
        "chimera",
        &[
            "--base",
            b,
            "--parent",
            p,
            "--subset",
            "experts",
            "--weights",
            "0,1",
        ],
    );
    let (base, donor) = (
        aoe::model::checkpoint::Checkpoint::open(&m[0]).unwrap(),
        aoe::model::checkpoint::Checkpoint::open(&m[1]).unwrap(),
    );
    let child = aoe::model::checkpoint::Checkpoint::open(&chimera).unwrap();
    let (mut experts, mut others) = (0, 0);
    for sh in &base.shards {
        for t in &sh.tensors {
            let got = child.bytes(&t.name).unwrap().unwrap();
            if t.name.contains(".mlp.experts.") {
                experts += 1;
                assert_eq!(
                    got,
                    donor.bytes(&t.name).unwrap().unwrap(),
                    "{}: not the donor's bytes",
                    t.name
                );
            } else {
                others += 1;
                assert_eq!(
                    got,
                    base.bytes(&t.name).unwrap().unwrap(),
                    "{}: not the base's bytes",
                    t.name
                );
            }
        }
    }
    assert!(experts > 0 && others > 0);
    check_read_back(&m[0], &chimera, tmp.path());
}

#[test]
fn delta_includes_and_excludes_with_both_metrics() {
    let tmp = tempdir();
    let m = family(tmp.path(), FixtureDType::Fp8, 2, 12);
    let (b, p) = (s(&m[0]), s(&m[1]));
    // Take δ at the median of the reference's statistics, so that some units fall each side.
    let probe = tmp.path().join("probe.json");
    std::fs::write(
        &probe,
        format!(r#"{{"base":"{b}","parents":["{p}"],"weights":[0.5,0.5]}}"#),
    )
    .unwrap();
    let out = reference(&["stats", s(&probe)]);
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for metric in ["stored", "dequantized"] {
        let mut vals: Vec<f64> = stats
            .as_object()
            .unwrap()
            .values()
            .filter_map(|v| v[metric].as_f64())
            .collect();
        vals.sort_by(f64::total_cmp);
        let (lo, hi) = (vals.iter().filter(|&&v| v > 0.0).count(), vals.len());
        assert!(lo > 4 && hi > lo, "fixture needs spread statistics");
        let delta = (vals[hi / 2] + vals[hi / 2 + 1]) / 2.0;
        let d = format!("{delta}");
        let label = format!("delta-{metric}");
        let child = write_and_compare(
            tmp.path(),
            &label,
            &[
                "--base", b, "--parent", p, "--lambda", "0.7", "--delta", &d, "--metric", metric,
            ],
        );
        // Some tensors mixed, some kept: the child differs from the base, yet shares tensors with it.
        let (cb, cc) = (
            aoe::model::checkpoint::Checkpoint::open(&m[0]).unwrap(),
            aoe::model::checkpoint::Checkpoint::open(&child).unwrap(),
        );
        let same = cb
            .shards
            .iter()
            .flat_map(|s| &s.tensors)
            .filter(|t| cb.bytes(&t.name).unwrap().unwrap() == cc.bytes(&t.name).unwrap().unwrap())
            .count();
        assert!(
            same > 0 && same < cb.len(),
            "{metric}: δ {d} should keep some tensors and mix others ({same}/{})",
            cb.len()
        );
    }
}

#[test]
fn three_parents_and_rules_match_the_reference() {
    let tmp = tempdir();
    let m = family(tmp.path(), FixtureDType::Fp8, 3, 13);
    let (b, p, q) = (s(&m[0]), s(&m[1]), s(&m[2]));
    write_and_compare(
        tmp.path(),
        "three",
        &[
            "--base",
            b,
            "--parent",
            p,
            "--parent",
            q,
            "--weights",
            "0.2,0.3,0.5",
        ],
    );
    write_and_compare(
        tmp.path(),
        "rules",
        &[
            "--base",
            b,
            "--parent",
            p,
            "--parent",
            q,
            "--weights",
            "0.5,0.25,0.25",
            "--rule",
            r"\.experts\.[0-9]*[02468]\.=0,0,1",
            "--rule",
            r"self_attn=0.1,0.6,0.3",
            "--subset",
            "experts",
            "--subset",
            "attention",
            "--subset",
            "re:norm",
        ],
    );
}

#[test]
fn bf16_family_and_bf16_parent_with_fp8_base_match_the_reference() {
    let tmp = tempdir();
    let m = family(&tmp.path().join("bf16"), FixtureDType::Bf16, 2, 14);
    let child = write_and_compare(
        tmp.path(),
        "bf16",
        &["--base", s(&m[0]), "--parent", s(&m[1]), "--lambda", "0.3"],
    );
    check_read_back(&m[0], &child, tmp.path());

    let f = family(&tmp.path().join("fp8"), FixtureDType::Fp8, 2, 15);
    let donor = bf16_copy(&f[1], &tmp.path().join("m2-bf16"));
    write_and_compare(
        tmp.path(),
        "mixed-dtypes",
        &["--base", s(&f[0]), "--parent", s(&donor), "--lambda", "0.5"],
    );
    // One-hot on a donor of another dtype is computed (requantized), not copied.
    write_and_compare(
        tmp.path(),
        "mixed-onehot",
        &[
            "--base",
            s(&f[0]),
            "--parent",
            s(&donor),
            "--weights",
            "0,1",
            "--subset",
            "experts",
        ],
    );
}

#[test]
fn bytes_do_not_depend_on_threads_or_chunk_size() {
    let tmp = tempdir();
    let m = family(tmp.path(), FixtureDType::Fp8, 2, 16);
    let (b, p) = (s(&m[0]), s(&m[1]));
    let mut outs = Vec::new();
    for (i, (threads, chunk)) in [("1", "64K"), ("2", "1M"), ("2", "1"), ("1", "16M")]
        .iter()
        .enumerate()
    {
        let out = tmp.path().join(format!("det{i}"));
        let cache = tmp.path().join(format!("stats{i}"));
        aoe_ok(&[
            "write",
            "--base",
            b,
            "--parent",
            p,
            "--lambda",
            "0.35",
            "--threads",
            threads,
            "--chunk-size",
            chunk,
            "--cache-dir",
            s(&cache),
            s(&out),
        ]);
        outs.push(out);
    }
    for o in &outs[1..] {
        assert_same_dirs(&outs[0], o, &[]);
    }
}

#[test]
fn recipe_file_reproduces_the_child_and_holds_no_output_path() {
    let tmp = tempdir();
    let m = family(tmp.path(), FixtureDType::Fp8, 2, 17);
    let a = tmp.path().join("a");
    aoe_ok(&[
        "write",
        "--base",
        s(&m[0]),
        "--parent",
        s(&m[1]),
        "--lambda",
        "0.25",
        "--subset",
        "experts",
        "--delta",
        "0.5",
        s(&a),
    ]);
    let recipe = std::fs::read_to_string(a.join("aoe_recipe.json")).unwrap();
    assert!(
        !recipe.contains(s(&a)),
        "the recipe must not name the output"
    );
    let v: serde_json::Value = serde_json::from_str(&recipe).unwrap();
    assert_eq!(v["weights"], serde_json::json!([0.75, 0.25]));
    assert_eq!(v["subset"], serde_json::json!(["experts"]));
    assert_eq!(v["delta"], serde_json::json!(0.5));
    let bdir = tmp.path().join("b");
    aoe_ok(&["write", "--recipe", s(&a.join("aoe_recipe.json")), s(&bdir)]);
    assert_same_dirs(&a, &bdir, &[]);
    // Every other base file is passed through.
    for f in ["config.json", "model.safetensors.index.json"] {
        assert_eq!(
            std::fs::read(m[0].join(f)).unwrap(),
            std::fs::read(a.join(f)).unwrap(),
            "{f}"
        );
    }
}

#[test]
fn unaligned_data_matches_the_reference() {
    // Headers not padded to 8 bytes: every tensor's data starts at an odd offset.
    let tmp = tempdir();
    let mut spec = aoe::testkit::FamilySpec::tiny(FixtureDType::Fp8);
    spec.siblings = 2;
    spec.seed = 18;
    spec.align_header = false;
    let m = aoe::testkit::write_family(&spec, tmp.path()).unwrap();
    let first = aoe::model::checkpoint::Checkpoint::open(&m[0]).unwrap();
    assert!(
        first.shards.iter().all(|s| s.header_len % 8 != 0),
        "fixture should be unaligned"
    );
    write_and_compare(
        tmp.path(),
        "unaligned",
        &["--base", s(&m[0]), "--parent", s(&m[1]), "--lambda", "0.6"],
    );
}

/// Odd layouts written by numpy: a BF16 weight with an F32 `_scale_inv` companion, an FP8
/// weight without block scales in the base whose donor has them, an orphan scale of a scale.
#[test]
fn odd_companions_match_the_reference() {
    let tmp = tempdir();
    odd_family(tmp.path(), 7);
    let (b, p) = (tmp.path().join("m1"), tmp.path().join("m2"));
    for (label, args) in [
        ("odd-half", vec!["--lambda", "0.5"]),
        ("odd-donor", vec!["--weights", "0,1"]),
        (
            "odd-v-only",
            vec!["--weights", "0,1", "--subset", "re:^v\\."],
        ),
    ] {
        let mut full = vec!["--base", s(&b), "--parent", s(&p)];
        full.extend(args);
        write_and_compare(tmp.path(), label, &full);
    }
}
