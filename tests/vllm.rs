//! vLLM end to end: the tokens vLLM (CPU build) generates from a mounted child equal the tokens
//! from the child `aoe write` puts on disk, for three recipes, with vLLM's lazy (mmap) and eager
//! (read) safetensors loaders.
//!
//! Needs the vLLM venv (`scripts/vllm-venv` creates `.venv-vllm`): set `AOE_VLLM_PYTHON` to its
//! python. Drives the real binaries and the Python pieces in `tests/vllm/` and `python/`; uses
//! neither the library nor `tests/common`.
//!
//! vLLM starts are the cost (~25 s each on 2 cores), so each strategy runs one in-process engine
//! that starts fresh on a mounted child and then swaps in place (`aoe_vllm.SwapExtension.aoe_reload`,
//! exact: tests/vllm/generate.py and server_swap.py check swapped == fresh) through the others.
//!
//! FP8: vLLM 0.32's CPU FP8 block kernels need AMX tiles; on a CPU without them the FP8 case
//! loads through the test-only reference kernels of `tests/vllm/fp8_reference.py` (vLLM's FP8
//! config, loader and reload, with dequantize-then-BF16 GEMMs).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::Instant;

use serde_json::Value;

/// One vLLM at a time: the machine has 2 cores and vLLM binds threads to them.
static VLLM: Mutex<()> = Mutex::new(());

fn python() -> String {
    std::env::var("AOE_VLLM_PYTHON").unwrap_or_else(|_| {
        panic!(
            "AOE_VLLM_PYTHON is unset: set it to the python of the vLLM venv \
             (scripts/vllm-venv creates .venv-vllm; run `scripts/vllm-venv` and then \
             `AOE_VLLM_PYTHON=$PWD/.venv-vllm/bin/python scripts/test`)"
        )
    })
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `cmd`; panics with its output unless it succeeds; returns stdout.
fn run(cmd: &mut Command, what: &str) -> String {
    let out: Output = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: String = err
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        panic!("{what} failed ({}):\n{tail}", out.status);
    }
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// `aoe` or `aoe-mount` with no configured parents and caches under `scratch`.
fn aoe_cmd(bin: &str, scratch: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(bin);
    c.args(args)
        .env("XDG_CACHE_HOME", scratch.join("cache"))
        .env("XDG_CONFIG_HOME", scratch.join("no-config"))
        .env_remove("AOE_BASE")
        .env_remove("AOE_PARENTS");
    c
}

const AOE: &str = env!("CARGO_BIN_EXE_aoe");
const AOE_MOUNT: &str = env!("CARGO_BIN_EXE_aoe-mount");

/// Whether `p` is a mount point (the project's mount table reader).
fn is_mounted(p: &Path) -> bool {
    aoe::mount::table::mount_at(&aoe::mount::table::mount_path(p)).is_some()
}

/// A live `aoe-mount`; `Drop` always unmounts (`aoe-mount --unmount`, then `umount -l`).
struct Mount {
    mnt: PathBuf,
    scratch: PathBuf,
}

impl Mount {
    fn new(scratch: &Path, mnt: &Path, recipe: &[&str]) -> Mount {
        std::fs::create_dir_all(mnt).expect("mount point");
        let log = mnt.with_extension("log");
        let mut args: Vec<&str> = recipe.to_vec();
        args.extend_from_slice(&["--log", log.to_str().unwrap(), mnt.to_str().unwrap()]);
        // The guard exists before the mount, so a half-done mount is cleaned up too.
        let m = Mount {
            mnt: mnt.to_path_buf(),
            scratch: scratch.to_path_buf(),
        };
        run(&mut aoe_cmd(AOE_MOUNT, scratch, &args), "aoe-mount");
        assert!(
            is_mounted(mnt),
            "aoe-mount succeeded but {} is not mounted",
            mnt.display()
        );
        m
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let m = self.mnt.to_str().unwrap();
        let _ = aoe_cmd(AOE_MOUNT, &self.scratch, &["--unmount", m])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if is_mounted(&self.mnt) {
            let _ = Command::new("umount")
                .args(["-l", m])
                .stderr(Stdio::null())
                .status();
        }
        if is_mounted(&self.mnt) {
            eprintln!("warning: {m} is still mounted");
        }
    }
}

/// Tokens per prompt, as generate.py prints them.
type Tokens = Vec<Vec<u64>>;

fn tokens(v: &Value) -> Tokens {
    v.as_array()
        .expect("token lists")
        .iter()
        .map(|p| {
            p.as_array()
                .expect("tokens")
                .iter()
                .map(|t| t.as_u64().expect("token id"))
                .collect()
        })
        .collect()
}

/// Starts vLLM in-process on `model` with `strategy` (lazy or eager), generates, then swaps in
/// place to each of `reloads` and generates again: the tokens of `model`, then of each reload.
fn generate(model: &Path, strategy: &str, fp8_reference: bool, reloads: &[&Path]) -> Vec<Tokens> {
    let mut cmd = Command::new(python());
    cmd.arg(repo().join("tests/vllm/generate.py"))
        .arg(model)
        .args(["--strategy", strategy, "--max-tokens", "16"]);
    if fp8_reference {
        cmd.arg("--fp8-reference");
    }
    cmd.arg("--reload").args(reloads);
    let t = Instant::now();
    let out = run(
        &mut cmd,
        &format!("generate.py {} --strategy {strategy}", model.display()),
    );
    let v: Value = serde_json::from_str(out.lines().last().expect("a JSON line")).expect("JSON");
    eprintln!(
        "vLLM {strategy}: start {} s, {} reloads, {:.1} s in all",
        v["start_seconds"],
        reloads.len(),
        t.elapsed().as_secs_f64()
    );
    let mut all = vec![tokens(&v["tokens"])];
    for r in v["reloads"].as_array().expect("reloads") {
        all.push(tokens(&r["tokens"]));
    }
    assert_eq!(all.len(), reloads.len() + 1);
    for t in &all {
        assert!(
            t.len() >= 4 && t.iter().all(|p| p.len() == 16),
            "4 prompts × 16 tokens: {t:?}"
        );
    }
    all
}

/// (mixed, from the base) tensor counts of `aoe plan`'s total line.
fn plan_counts(scratch: &Path, recipe: &[&str]) -> (u64, u64) {
    let mut args = vec!["plan"];
    args.extend_from_slice(recipe);
    let out = run(&mut aoe_cmd(AOE, scratch, &args), "aoe plan");
    let total = out
        .lines()
        .find(|l| l.starts_with("total"))
        .unwrap_or_else(|| panic!("no total line in aoe plan's output:\n{out}"));
    // total  BASE n unit  DONOR n unit  MIXED n unit
    let f: Vec<&str> = total.split_whitespace().collect();
    (
        f[7].parse().expect("mixed count"),
        f[1].parse().expect("base count"),
    )
}

/// `fp8_reference`: load FP8 through tests/vllm/fp8_reference.py's reference kernels (CPUs
/// without AMX, where vLLM 0.32 has no CPU FP8 kernel).
fn family_test(dtype: &str, delta: &str, fp8_reference: bool) {
    let _one = VLLM.lock().unwrap_or_else(|e| e.into_inner());
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().expect("tempdir");
    let scratch = tmp.path();
    let fam = scratch.join("family");
    run(
        Command::new(python())
            .arg(repo().join("tests/vllm/make_family.py"))
            .arg(&fam)
            .args(["--dtype", dtype, "--seed", "7"]),
        "make_family.py",
    );
    let (base, parent) = (fam.join("base"), fam.join("parent"));
    let (b, p) = (base.to_str().unwrap(), parent.to_str().unwrap());

    let recipes: [(&str, Vec<&str>); 3] = [
        ("full", vec!["--lambda", "0.5"]),
        ("chimera", vec!["--subset", "experts", "--weights", "0,1"]),
        ("delta", vec!["--lambda", "0.5", "--delta", delta]),
    ];
    let mut written = Vec::new();
    let mut mounts = Vec::new();
    for (name, flags) in &recipes {
        let mut recipe = vec!["--base", b, "--parent", p];
        recipe.extend_from_slice(flags);
        if *name == "delta" {
            let (mixed, kept) = plan_counts(scratch, &recipe);
            assert!(
                mixed > 0 && kept > 0,
                "δ = {delta} must mix some tensors and keep others: {mixed} mixed, {kept} kept"
            );
        }
        let out = scratch.join(format!("written-{name}"));
        let mut args = vec!["write"];
        args.extend_from_slice(&recipe);
        args.push(out.to_str().unwrap());
        run(&mut aoe_cmd(AOE, scratch, &args), "aoe write");
        written.push(out);
        mounts.push(Mount::new(
            scratch,
            &scratch.join(format!("mnt-{name}")),
            &recipe,
        ));
    }
    let m: Vec<&Path> = mounts.iter().map(|g| g.mnt.as_path()).collect();
    let w: Vec<&Path> = written.iter().map(|p| p.as_path()).collect();

    // Lazy: a fresh start on the mounted full mix, then swaps.
    let lazy = generate(
        m[0],
        "lazy",
        fp8_reference,
        &[w[0], m[1], w[1], m[2], w[2], &base, &parent],
    );
    // Eager: a fresh start on the mounted Chimera, then swaps.
    let eager = generate(
        m[1],
        "eager",
        fp8_reference,
        &[w[1], m[0], w[0], m[2], w[2]],
    );

    // lazy: [m0, w0, m1, w1, m2, w2, base, parent]; eager: [m1, w1, m0, w0, m2, w2].
    let (lazy_base, lazy_parent) = (&lazy[6], &lazy[7]);
    assert_ne!(
        lazy_base, lazy_parent,
        "{dtype}: base and parent must generate different tokens"
    );
    for (i, (name, _)) in recipes.iter().enumerate() {
        let (lm, lw) = (&lazy[2 * i], &lazy[2 * i + 1]);
        assert_eq!(
            lm, lw,
            "{dtype} {name}, lazy: mounted child != written child"
        );
        let e = [2, 0, 4][i];
        let (em, ew) = (&eager[e], &eager[e + 1]);
        assert_eq!(
            em, ew,
            "{dtype} {name}, eager: mounted child != written child"
        );
        assert_eq!(lm, em, "{dtype} {name}: lazy and eager loads differ");
    }
    let differing = |a: &Tokens, b: &Tokens| -> usize {
        a.iter()
            .zip(b)
            .map(|(x, y)| x.iter().zip(y).filter(|(s, t)| s != t).count())
            .sum()
    };
    for (i, (name, _)) in recipes.iter().enumerate() {
        eprintln!(
            "{dtype} {name}: {} of 64 tokens differ from the base's, {} from the parent's",
            differing(&lazy[2 * i], lazy_base),
            differing(&lazy[2 * i], lazy_parent)
        );
    }
    // The children are not the base (so the swaps and the mixes did something).
    assert_ne!(
        &lazy[0], lazy_base,
        "{dtype}: the full mix generates the base's tokens"
    );
    drop(mounts);
    eprintln!("{dtype}: {:.1} s", t0.elapsed().as_secs_f64());
}

#[test]
fn vllm_bf16_mounted_children_generate_the_written_childrens_tokens() {
    family_test("bf16", "0.05", false);
}

/// Whether vLLM's CPU FP8 block kernels can run here: vLLM 0.32's only CPU FP8 linear kernels
/// (CPUFp8BlockScaledMMKernel, CPUFp8W8A8BlockScaledMMKernel) require AMX tiles.
fn cpu_has_amx() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .split_whitespace()
        .any(|f| f == "amx_tile")
}

#[test]
fn vllm_fp8_mounted_children_generate_the_written_childrens_tokens() {
    let reference = !cpu_has_amx();
    if reference {
        eprintln!(
            "note: this CPU has no AMX, which vLLM 0.32's CPU FP8 kernels need: FP8 runs through \
             the reference kernels of tests/vllm/fp8_reference.py"
        );
    }
    family_test("fp8", "60", reference);
}
