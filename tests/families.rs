//! Real model families: tiny sibling checkpoints written by transformers (Mixtral, Qwen2-MoE,
//! Qwen3-MoE, OLMoE, GPT-OSS in BF16 and in the Hub's MXFP4 layout, DeepSeek-V3, GLM-4.5),
//! driven through the real `aoe` binary and checked against the parents, the independent
//! reference (tests/reference/aoe_ref.py) and transformers' `from_pretrained`.
//!
//! Needs `AOE_VLLM_PYTHON`: a Python with torch + transformers + numpy + ml_dtypes + safetensors
//! (the vLLM venv of scripts/vllm-venv; loading the MXFP4 family also needs accelerate).
//! Self-contained on purpose: local helpers only (no tests/common, no library internals).

use regex::Regex;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

const AOE: &str = env!("CARGO_BIN_EXE_aoe");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The group table of the family rules, in order; first match wins (re.search on the weight's
/// name; a companion follows its weight). Anything else is "other".
const GROUPS: &[(&str, &str)] = &[
    ("experts", r"\.(mlp|block_sparse_moe)\.experts\."),
    (
        "shared-experts",
        r"\.mlp\.shared_experts?\.|\.mlp\.shared_expert_gate\.",
    ),
    (
        "router",
        r"\.(mlp|block_sparse_moe)\.(gate|router)\.(weight|bias|e_score_correction_bias)$",
    ),
    ("norms", r"norm\.(weight|bias)$"),
    ("attention", r"\.self_attn\."),
    ("dense-mlp", r"\.mlp\.(gate|up|down|gate_up)_proj\."),
    (
        "embeddings",
        r"(embed_tokens|lm_head|shared_head\.head)\.weight$",
    ),
];

fn group_of(weight: &str) -> &'static str {
    static RX: OnceLock<Vec<(&'static str, Regex)>> = OnceLock::new();
    let rx = RX.get_or_init(|| {
        GROUPS
            .iter()
            .map(|(g, p)| (*g, Regex::new(p).unwrap()))
            .collect()
    });
    rx.iter()
        .find(|(_, r)| r.is_match(weight))
        .map(|(g, _)| *g)
        .unwrap_or("other")
}

fn python() -> PathBuf {
    match std::env::var_os("AOE_VLLM_PYTHON") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => panic!(
            "AOE_VLLM_PYTHON is not set: the family tests need a Python with torch + transformers \
             (the vLLM venv made by scripts/vllm-venv); run them through scripts/test, which sets it, \
             or export AOE_VLLM_PYTHON=$PWD/.venv-vllm/bin/python"
        ),
    }
}

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// Every family, written by tests/families/make_families.py into a directory named by a hash of
/// the generator, the reference it imports and the Python (deterministic output, so a later run
/// reuses it); written beside it first and renamed into place.
fn families() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let mut h: u64 = 0xcbf29ce484222325; // FNV-1a
        let gen = Path::new(ROOT).join("tests/families/make_families.py");
        let refpy = Path::new(ROOT).join("tests/reference/aoe_ref.py");
        let mut input = std::fs::read(&gen).unwrap();
        input.extend(std::fs::read(&refpy).unwrap());
        input.extend(python().to_string_lossy().as_bytes());
        for b in input {
            h = (h ^ b as u64).wrapping_mul(0x100000001b3);
        }
        let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let dir = tmp.join(format!("families-{h:016x}"));
        if dir.join("done").is_file() {
            return dir;
        }
        let work = tmp.join(format!("families-{h:016x}.{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&work);
        run(Command::new(python())
            .arg(&gen)
            .arg(&work)
            .arg("--no-load-check"));
        std::fs::write(work.join("done"), b"").unwrap();
        if std::fs::rename(&work, &dir).is_err() {
            let _ = std::fs::remove_dir_all(&work); // another process got there first
        }
        assert!(dir.join("done").is_file(), "{dir:?} not written");
        dir
    })
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

// ---- checkpoints, read with our own header parsing ------------------------------------------

struct Tensor {
    dtype: String,
    bytes: Vec<u8>,
}

/// Every tensor of every shard of DIR (the shards named by its index), by name.
fn tensors(dir: &Path) -> BTreeMap<String, Tensor> {
    let mut out = BTreeMap::new();
    for shard in shard_files(dir) {
        let data = std::fs::read(dir.join(&shard)).unwrap();
        let n = u64::from_le_bytes(data[..8].try_into().unwrap()) as usize;
        let hdr: BTreeMap<String, Value> = serde_json::from_slice(&data[8..8 + n]).unwrap();
        for (name, info) in hdr {
            if name == "__metadata__" {
                continue;
            }
            let off = info["data_offsets"].as_array().unwrap();
            let (a, b) = (
                off[0].as_u64().unwrap() as usize,
                off[1].as_u64().unwrap() as usize,
            );
            let t = Tensor {
                dtype: info["dtype"].as_str().unwrap().to_string(),
                bytes: data[8 + n + a..8 + n + b].to_vec(),
            };
            assert!(
                out.insert(name.clone(), t).is_none(),
                "{name} in two shards of {dir:?}"
            );
        }
    }
    out
}

fn shard_files(dir: &Path) -> Vec<String> {
    let idx: Value =
        serde_json::from_slice(&std::fs::read(dir.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    let mut v: Vec<String> = idx["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|x| x.as_str().unwrap().to_string())
        .collect();
    v.sort();
    v.dedup();
    v
}

/// The unit's weight of a tensor: X_scales -> X_blocks, W_scale_inv -> W (when both exist).
fn weight_of(name: &str, all: &BTreeMap<String, Tensor>) -> String {
    if let Some(x) = name.strip_suffix("_scales") {
        if all.contains_key(&format!("{x}_blocks")) {
            return format!("{x}_blocks");
        }
    }
    if let Some(w) = name.strip_suffix("_scale_inv") {
        if all.contains_key(w) {
            return w.to_string();
        }
    }
    name.to_string()
}

fn is_mxfp4_unit(weight: &str, all: &BTreeMap<String, Tensor>) -> bool {
    weight
        .strip_suffix("_blocks")
        .is_some_and(|x| all.contains_key(&format!("{x}_scales")))
}

fn interpolable(weight: &str, all: &BTreeMap<String, Tensor>) -> bool {
    is_mxfp4_unit(weight, all)
        || ["BF16", "F16", "F32", "F8_E4M3"].contains(&all[weight].dtype.as_str())
}

fn aoe(args: &[&str]) -> std::process::Output {
    run(Command::new(AOE).args(args))
}

/// `aoe write` of BASE + PARENT with the given recipe flags into a fresh directory.
fn write_child(tmp: &Path, name: &str, base: &Path, parent: &Path, flags: &[&str]) -> PathBuf {
    let out = tmp.join(name);
    let cache = tmp.join("stats");
    let mut args = vec![
        "write",
        "--base",
        s(base),
        "--parent",
        s(parent),
        "--cache-dir",
        s(&cache),
    ];
    args.extend_from_slice(flags);
    args.push(s(&out));
    aoe(&args);
    out
}

fn fam(name: &str) -> (PathBuf, PathBuf) {
    let d = families().join(name);
    (d.join("base"), d.join("parent"))
}

fn tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("aoe-families-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap()
}

// ---- the checks ------------------------------------------------------------------------------

/// `--subset GROUP --weights 0,1`: the group's tensors (companions included) are the parent's
/// bytes, every other tensor the base's; headers, file set and other files as the base's.
fn check_one_hot_group(family: &str, group: &str) {
    let (base, parent) = fam(family);
    let tmp = tmpdir();
    let child = write_child(
        tmp.path(),
        "child",
        &base,
        &parent,
        &["--subset", group, "--weights", "0,1"],
    );
    let (b, p, c) = (tensors(&base), tensors(&parent), tensors(&child));
    assert_eq!(
        b.keys().collect::<Vec<_>>(),
        c.keys().collect::<Vec<_>>(),
        "{family}: tensor names"
    );
    let mut wrong = Vec::new();
    let mut taken = 0;
    for (n, t) in &b {
        let w = weight_of(n, &b);
        let want = if group_of(&w) == group && interpolable(&w, &b) {
            &p[n]
        } else {
            t
        };
        if group_of(&w) == group && want.bytes != t.bytes {
            taken += 1;
        }
        if c[n].bytes != want.bytes {
            wrong.push(format!(
                "{n} [{}] should be the {}'s bytes",
                group_of(&w),
                if std::ptr::eq(want, t) {
                    "base"
                } else {
                    "parent"
                }
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{family} --subset {group} --weights 0,1:\n  {}",
        wrong.join("\n  ")
    );
    assert!(
        taken > 0,
        "{family}: no {group} tensor differs between the siblings: the test proves nothing"
    );
    for f in shard_files(&base) {
        let (x, y) = (
            std::fs::read(base.join(&f)).unwrap(),
            std::fs::read(child.join(&f)).unwrap(),
        );
        let n = 8 + u64::from_le_bytes(x[..8].try_into().unwrap()) as usize;
        assert!(
            x.len() == y.len() && x[..n] == y[..n],
            "{family}: {f}: header or size differs from the base's"
        );
    }
    for e in std::fs::read_dir(&base).unwrap() {
        let f = e.unwrap().file_name().into_string().unwrap();
        if !f.ends_with(".safetensors") {
            assert_eq!(
                std::fs::read(base.join(&f)).unwrap(),
                std::fs::read(child.join(&f)).unwrap(),
                "{family}: {f} passed through"
            );
        }
    }
}

/// `--lambda 0.3` (subset full) byte for byte against `aoe_ref.py write` of the recipe written here.
fn check_lambda_matches_reference(family: &str) {
    let (base, parent) = fam(family);
    check_mix_matches_reference(family, &base, &parent, [0.7, 0.3]);
}

/// `aoe write --weights W` of BASE + PARENT equals the reference's child, tensor by tensor.
fn check_mix_matches_reference(family: &str, base: &Path, parent: &Path, w: [f64; 2]) {
    let (base, parent) = (base.to_path_buf(), parent.to_path_buf());
    let tmp = tmpdir();
    let weights = format!("{},{}", w[0], w[1]);
    let child = write_child(
        tmp.path(),
        "child",
        &base,
        &parent,
        &["--weights", &weights],
    );
    let recipe = json!({
        "base": s(&base), "parents": [s(&parent)], "weights": w, "delta": 0.0,
        "subset": ["full"], "rules": [], "metric": "stored",
    });
    let rp = tmp.path().join("recipe.json");
    std::fs::write(&rp, serde_json::to_vec_pretty(&recipe).unwrap()).unwrap();
    let refd = tmp.path().join("ref");
    run(Command::new(python())
        .arg(Path::new(ROOT).join("tests/reference/aoe_ref.py"))
        .arg("write")
        .arg(&rp)
        .arg(&refd));
    let (b, c, r) = (tensors(&base), tensors(&child), tensors(&refd));
    let wrong: Vec<String> = r
        .iter()
        .filter(|(n, t)| c.get(*n).map(|x| &x.bytes) != Some(&t.bytes))
        .map(|(n, t)| {
            let w = weight_of(n, &b);
            let base_too = b[n].bytes == c[n].bytes;
            format!(
                "{n} [{}] {}{}",
                group_of(&w),
                t.dtype,
                if base_too {
                    " (aoe kept the base's bytes)"
                } else {
                    ""
                }
            )
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "{family} --weights {weights}: {} of {} tensors differ from the reference:\n  {}",
        wrong.len(),
        r.len(),
        wrong.join("\n  ")
    );
    for f in shard_files(&base) {
        assert!(
            std::fs::read(child.join(&f)).unwrap() == std::fs::read(refd.join(&f)).unwrap(),
            "{family}: {f} differs from the reference's file"
        );
    }
}

/// Every child (Chimera and λ mix) loads with transformers without missing, unexpected or
/// mismatched keys.
fn check_children_load(family: &str) {
    let (base, parent) = fam(family);
    let tmp = tmpdir();
    let chimera = write_child(
        tmp.path(),
        "chimera",
        &base,
        &parent,
        &["--subset", "experts", "--weights", "0,1"],
    );
    let mix = write_child(tmp.path(), "mix", &base, &parent, &["--lambda", "0.3"]);
    let out = run(Command::new(python())
        .arg(Path::new(ROOT).join("tests/families/load_check.py"))
        .arg(&chimera)
        .arg(&mix));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let rows: Vec<Value> = text
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2, "{family}: load_check.py printed {text}");
    for row in rows {
        assert!(
            row.get("error").is_none(),
            "{family}: from_pretrained({}) failed: {}",
            row["dir"],
            row["error"]
        );
        for k in ["missing", "unexpected", "mismatched"] {
            assert_eq!(
                row[k],
                json!([]),
                "{family}: {} keys loading {}",
                k,
                row["dir"]
            );
        }
    }
}

/// `aoe plan --json` per group, against counts made here from the base's names with the table.
fn check_plan_counts(family: &str) {
    let (base, parent) = fam(family);
    let tmp = tmpdir();
    let b = tensors(&base);
    let cache = tmp.path().join("stats");
    for (label, flags, decide) in [
        (
            "chimera",
            vec!["--subset", "experts", "--weights", "0,1"],
            (|g: &str, _interp: bool| if g == "experts" { "donor" } else { "base" })
                as fn(&str, bool) -> &'static str,
        ),
        (
            "lambda 0.3",
            vec!["--lambda", "0.3"],
            |_g: &str, interp: bool| if interp { "mixed" } else { "base" },
        ),
    ] {
        let mut want: BTreeMap<String, BTreeMap<&str, (u64, u64)>> = BTreeMap::new();
        for (n, t) in &b {
            let w = weight_of(n, &b);
            let g = group_of(&w);
            let e = want
                .entry(g.to_string())
                .or_default()
                .entry(decide(g, interpolable(&w, &b)))
                .or_default();
            e.0 += 1;
            e.1 += t.bytes.len() as u64;
        }
        let mut args = vec![
            "plan",
            "--json",
            "--base",
            s(&base),
            "--parent",
            s(&parent),
            "--cache-dir",
            s(&cache),
        ];
        args.extend_from_slice(&flags);
        let v: Value = serde_json::from_slice(&aoe(&args).stdout).expect("plan --json prints JSON");
        let mut got: BTreeMap<String, BTreeMap<&str, (u64, u64)>> = BTreeMap::new();
        for (g, row) in v["groups"].as_object().expect("plan JSON has groups") {
            for k in ["base", "donor", "mixed"] {
                let (t, by) = (
                    row[k]["tensors"].as_u64().unwrap_or(0),
                    row[k]["bytes"].as_u64().unwrap_or(0),
                );
                if t > 0 || by > 0 {
                    got.entry(g.clone()).or_default().insert(k, (t, by));
                }
            }
        }
        assert_eq!(
            got, want,
            "{family} plan ({label}): per group {{decision: (tensors, bytes)}}, aoe vs the table"
        );
    }
}

macro_rules! family_tests {
    ($($m:ident => $name:literal),* $(,)?) => {$(
        mod $m {
            #[test]
            fn chimera_takes_the_parents_experts() { super::check_one_hot_group($name, "experts") }
            #[test]
            fn lambda_mix_matches_the_reference() { super::check_lambda_matches_reference($name) }
            #[test]
            fn children_load_in_transformers() { super::check_children_load($name) }
            #[test]
            fn plan_group_counts_follow_the_table() { super::check_plan_counts($name) }
        }
    )*};
}

family_tests! {
    mixtral => "mixtral",
    qwen2_moe => "qwen2-moe",
    qwen3_moe => "qwen3-moe",
    olmoe => "olmoe",
    gpt_oss => "gpt-oss",
    gpt_oss_mxfp4 => "gpt-oss-mxfp4",
    deepseek_v3 => "deepseek-v3",
    glm4_moe => "glm4-moe",
}

/// A BF16 parent mixed with an MXFP4 base, as a BF16 parent mixes with an FP8 base: λ mixes
/// and a one-hot weight on the BF16 parent (computed and requantized, not copied).
#[test]
fn gpt_oss_mxfp4_base_with_a_bf16_parent_matches_the_reference() {
    let d = families().join("gpt-oss-mxfp4");
    let (base, parent) = (d.join("base"), d.join("parent-bf16"));
    for w in [[0.7, 0.3], [0.0, 1.0]] {
        check_mix_matches_reference("gpt-oss-mxfp4 + bf16", &base, &parent, w);
    }
}

#[test]
fn qwen2_moe_shared_experts_subset_selects_shared_expert_and_its_gate() {
    let b = tensors(&fam("qwen2-moe").0);
    let shared: Vec<&String> = b
        .keys()
        .filter(|n| group_of(n) == "shared-experts")
        .collect();
    assert!(
        shared
            .iter()
            .any(|n| n.contains(".mlp.shared_expert_gate.")),
        "fixture has shared_expert_gate: {shared:?}"
    );
    assert!(
        shared.iter().any(|n| n.contains(".mlp.shared_expert.")),
        "fixture has shared_expert: {shared:?}"
    );
    check_one_hot_group("qwen2-moe", "shared-experts");
}

#[test]
fn the_table_puts_every_family_name_where_expected() {
    // the local table itself, on names seen in the real checkpoints
    for (n, g) in [
        (
            "model.layers.1.block_sparse_moe.experts.3.w2.weight",
            "experts",
        ),
        ("model.layers.0.mlp.experts.gate_up_proj_blocks", "experts"),
        ("model.layers.0.mlp.experts.down_proj_bias", "experts"),
        (
            "model.layers.1.mlp.shared_expert_gate.weight",
            "shared-experts",
        ),
        (
            "model.layers.1.mlp.shared_experts.up_proj.weight",
            "shared-experts",
        ),
        ("model.layers.0.mlp.router.bias", "router"),
        ("model.layers.1.mlp.gate.e_score_correction_bias", "router"),
        ("model.layers.0.self_attn.k_norm.weight", "norms"),
        ("model.layers.0.self_attn.sinks", "attention"),
        ("model.layers.0.mlp.up_proj.weight", "dense-mlp"),
        ("lm_head.weight", "embeddings"),
    ] {
        assert_eq!(group_of(n), g, "{n}");
    }
}

// One-hot copies of other groups whose names are new to the table (or family-specific).
#[test]
fn deepseek_v3_shared_experts_subset() {
    check_one_hot_group("deepseek-v3", "shared-experts");
}

#[test]
fn gpt_oss_router_subset_selects_mlp_router_weight_and_bias() {
    check_one_hot_group("gpt-oss", "router");
}

#[test]
fn gpt_oss_attention_subset_selects_sinks_and_biases() {
    check_one_hot_group("gpt-oss", "attention");
}

#[test]
fn glm4_moe_norms_subset_selects_q_norm_and_k_norm() {
    check_one_hot_group("glm4-moe", "norms");
}
