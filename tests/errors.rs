//! Every bad input ends with one clear message naming the file and tensor, and exit code 1.

mod common;

use std::path::{Path, PathBuf};

use aoe::testkit::FixtureDType;
use common::*;

/// Runs `aoe write` (or the given command) and asserts a clean failure whose message holds
/// every one of `needles`.
fn fails(args: &[&str], needles: &[&str]) {
    let out = aoe(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "aoe {args:?} should fail with 1, stderr:\n{err}"
    );
    assert!(!err.contains("panicked"), "aoe {args:?} panicked:\n{err}");
    assert!(
        err.starts_with("aoe: error: "),
        "aoe {args:?}: unexpected stderr:\n{err}"
    );
    for n in needles {
        assert!(err.contains(n), "aoe {args:?}: message lacks {n:?}:\n{err}");
    }
    assert_eq!(err.lines().count(), 1, "one message, one line:\n{err}");
}

/// `aoe write` of a λ = 0.5 child of `base` and `parent` into `out` fails with `needles`.
fn write_fails(base: &Path, parent: &Path, out: &Path, needles: &[&str]) {
    fails(
        &[
            "write",
            "--base",
            s(base),
            "--parent",
            s(parent),
            "--lambda",
            "0.5",
            s(out),
        ],
        needles,
    )
}

struct Fam {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    m: Vec<PathBuf>,
}

fn fam() -> Fam {
    let tmp = tempdir();
    let root = tmp.path().to_path_buf();
    let m = family(&root, FixtureDType::Fp8, 2, 21);
    Fam { _tmp: tmp, root, m }
}

/// The shard of `dir` holding `tensor`, from its index.
fn shard_of(dir: &Path, tensor: &str) -> PathBuf {
    let idx: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    dir.join(idx["weight_map"][tensor].as_str().unwrap())
}

const T: &str = "model.layers.0.self_attn.q_a_proj.weight";
const N: &str = "model.norm.weight";

#[test]
fn missing_or_wrong_directories() {
    let f = fam();
    let out = f.root.join("out");
    let missing = f.root.join("nope");
    fails(
        &[
            "write",
            "--base",
            s(&missing),
            "--parent",
            s(&f.m[1]),
            "--lambda",
            "0.5",
            s(&out),
        ],
        &[s(&missing), "No such file"],
    );
    let file = f.m[0].join("config.json");
    fails(
        &[
            "write",
            "--base",
            s(&f.m[0]),
            "--parent",
            s(&file),
            "--lambda",
            "0.5",
            s(&out),
        ],
        &["config.json", "not a directory"],
    );
    let empty = f.root.join("empty");
    std::fs::create_dir(&empty).unwrap();
    fails(
        &[
            "write",
            "--base",
            s(&empty),
            "--parent",
            s(&f.m[1]),
            "--lambda",
            "0.5",
            s(&out),
        ],
        &["empty", "not a checkpoint"],
    );
    assert!(!out.exists(), "nothing may be written on error");
}

#[test]
fn malformed_index_and_headers() {
    let f = fam();
    let out = f.root.join("out");
    let run = |p: &Path, needles: &[&str]| write_fails(&f.m[0], p, &out, needles);

    let p = copy_dir(&f.m[1], &f.root.join("bad-index"));
    std::fs::write(
        p.join("model.safetensors.index.json"),
        b"{\"weight_map\": [",
    )
    .unwrap();
    run(&p, &["model.safetensors.index.json", "malformed index"]);

    let p = copy_dir(&f.m[1], &f.root.join("bad-header"));
    let sh = shard_of(&p, T);
    let mut bytes = std::fs::read(&sh).unwrap();
    bytes[8] = b'x';
    std::fs::write(&sh, bytes).unwrap();
    run(
        &p,
        &[
            sh.file_name().unwrap().to_str().unwrap(),
            "malformed safetensors header",
        ],
    );

    let p = copy_dir(&f.m[1], &f.root.join("bad-offsets"));
    let sh = shard_of(&p, T);
    rewrite_header(&sh, |v| {
        let e = &mut v[T]["data_offsets"];
        let end = e[1].as_u64().unwrap();
        *e = serde_json::json!([end * 1000, end * 1000 + (end - e[0].as_u64().unwrap())]);
    });
    run(&p, &[T, "run past the data"]);

    let p = copy_dir(&f.m[1], &f.root.join("overlap"));
    let sh = shard_of(&p, T);
    let mut moved = String::new();
    rewrite_header(&sh, |v| {
        // Shift the last tensor of the shard 4 bytes back, into its predecessor.
        let (name, begin) = v
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| *k != "__metadata__")
            .map(|(k, e)| (k.clone(), e["data_offsets"][0].as_u64().unwrap()))
            .max_by_key(|x| x.1)
            .unwrap();
        let end = v[&name]["data_offsets"][1].as_u64().unwrap();
        v[&name]["data_offsets"] = serde_json::json!([begin - 4, end - 4]);
        moved = name;
    });
    run(&p, &[&moved, "overlaps"]);

    let p = copy_dir(&f.m[1], &f.root.join("dtype"));
    let sh = shard_of(&p, T);
    rewrite_header(&sh, |v| v[T]["dtype"] = serde_json::json!("Q4_K"));
    run(&p, &[T, "unknown dtype"]);
}

#[test]
fn missing_tensor_shape_and_dtype_mismatches() {
    let f = fam();
    let out = f.root.join("out");
    let run = |p: &Path, needles: &[&str]| write_fails(&f.m[0], p, &out, needles);

    let p = copy_dir(&f.m[1], &f.root.join("missing"));
    let sh = shard_of(&p, N);
    rewrite_header(&sh, |v| {
        let e = v.as_object_mut().unwrap().remove(N).unwrap();
        v["model.renamed.weight"] = e;
    });
    let ip = p.join("model.safetensors.index.json");
    let mut idx: serde_json::Value = serde_json::from_slice(&std::fs::read(&ip).unwrap()).unwrap();
    let file = idx["weight_map"]
        .as_object_mut()
        .unwrap()
        .remove(N)
        .unwrap();
    idx["weight_map"]["model.renamed.weight"] = file;
    std::fs::write(&ip, serde_json::to_vec(&idx).unwrap()).unwrap();
    run(&p, &[s(&p), N, "missing"]);

    let p = copy_dir(&f.m[1], &f.root.join("shape"));
    let sh = shard_of(&p, T);
    rewrite_header(&sh, |v| {
        let shape = v[T]["shape"].as_array().unwrap().clone();
        v[T]["shape"] = serde_json::json!([shape[1], shape[0]]);
    });
    run(&p, &[T, "has shape", "the base has"]);

    let p = copy_dir(&f.m[1], &f.root.join("int"));
    let sh = shard_of(&p, N);
    rewrite_header(&sh, |v| v[N]["dtype"] = serde_json::json!("I16"));
    run(&p, &[N, "I16", "cannot be interpolated"]);
}

#[test]
fn bad_weights_subsets_and_regexes() {
    let f = fam();
    let out = f.root.join("out");
    let (b, p) = (s(&f.m[0]), s(&f.m[1]));
    let o = s(&out);
    fails(
        &[
            "write",
            "--base",
            b,
            "--parent",
            p,
            "--weights",
            "0.5,0.3,0.2",
            o,
        ],
        &["3 weights given, 2 needed"],
    );
    fails(
        &[
            "write",
            "--base",
            b,
            "--parent",
            p,
            "--weights",
            "nan,0.5",
            o,
        ],
        &["finite"],
    );
    fails(
        &["write", "--base", b, "--parent", p, "--lambda", "inf", o],
        &["finite"],
    );
    fails(
        &[
            "write",
            "--base",
            b,
            "--parent",
            p,
            "--weights",
            "1.5,-0.5",
            o,
        ],
        &["not convex", "--allow-extrapolation"],
    );
    // One bad flag after a good λ recipe, and the words its message must hold.
    for (flag, value, needle) in [
        ("--subset", "expert", "unknown subset \"expert\""),
        ("--subset", "re:(", "bad regex \"(\""),
        ("--rule", "[=0,1", "bad regex \"[\""),
        ("--rule", "x=1,0,0", "3 weights given, 2 needed"),
        ("--metric", "l2", "unknown metric"),
        ("--delta", "-1", "--delta"),
    ] {
        fails(
            &[
                "write", "--base", b, "--parent", p, "--lambda", "0.5", flag, value, o,
            ],
            &[needle],
        );
    }
    fails(&["write", "--base", b, "--lambda", "0.5", o], &["--parent"]);
    fails(&["write", "--base", b, "--parent", p, o], &["--lambda"]);
    assert!(!out.exists());
    // Extrapolation is allowed when asked for.
    aoe_ok(&[
        "write",
        "--base",
        b,
        "--parent",
        p,
        "--weights",
        "1.5,-0.5",
        "--allow-extrapolation",
        o,
    ]);
}

#[test]
fn output_that_is_a_parent_or_not_empty() {
    let f = fam();
    let (b, p) = (s(&f.m[0]), s(&f.m[1]));
    let before: Vec<Vec<u8>> = files(&f.m[1])
        .iter()
        .map(|x| std::fs::read(f.m[1].join(x)).unwrap())
        .collect();
    fails(
        &[
            "write", "--base", b, "--parent", p, "--lambda", "0.5", "--force", p,
        ],
        &[p, "is a parent"],
    );
    let inside = f.m[1].join("child");
    write_fails(&f.m[0], &f.m[1], &inside, &["inside parent"]);
    let forced = [
        "write", "--base", b, "--parent", p, "--lambda", "0.5", "--force",
    ];
    fails(&[&forced[..], &[s(&f.root)]].concat(), &["contains parent"]);
    let after: Vec<Vec<u8>> = files(&f.m[1])
        .iter()
        .map(|x| std::fs::read(f.m[1].join(x)).unwrap())
        .collect();
    assert_eq!(before, after, "a parent was modified");
    assert!(!inside.exists());

    let busy = f.root.join("busy");
    std::fs::create_dir(&busy).unwrap();
    std::fs::write(busy.join("keep.txt"), b"mine").unwrap();
    fails(
        &[
            "write",
            "--base",
            b,
            "--parent",
            p,
            "--lambda",
            "0.5",
            s(&busy),
        ],
        &["not empty", "--force"],
    );
    aoe_ok(&[
        "write",
        "--base",
        b,
        "--parent",
        p,
        "--lambda",
        "0.5",
        "--force",
        s(&busy),
    ]);
    assert_eq!(
        std::fs::read(busy.join("keep.txt")).unwrap(),
        b"mine",
        "--force keeps unrelated files"
    );
    assert!(busy.join("aoe_recipe.json").is_file());
    assert!(
        !files(&busy).iter().any(|f| f.contains("aoe-tmp")),
        "temporary files left behind"
    );
}

#[test]
fn interrupted_write_leaves_no_file_behind() {
    let tmp = tempdir();
    let mut spec = aoe::testkit::FamilySpec::demo();
    spec.siblings = 2;
    let m = aoe::testkit::write_family(&spec, tmp.path()).unwrap();
    let out = tmp.path().join("out");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_aoe"))
        .args([
            "write",
            "--base",
            s(&m[0]),
            "--parent",
            s(&m[1]),
            "--lambda",
            "0.5",
            "--threads",
            "1",
        ])
        .args(["--cache-dir", s(&tmp.path().join("stats")), s(&out)])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the write has started (temporary files exist), then interrupt it.
    let t = std::time::Instant::now();
    while !out.is_dir() || files(&out).is_empty() {
        assert!(t.elapsed().as_secs() < 20, "write never started");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let res = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    if res.status.success() {
        // The machine was fast enough to finish first: then the child must be complete.
        assert!(out.join("aoe_recipe.json").is_file());
        return;
    }
    assert_eq!(res.status.code(), Some(1), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    assert_eq!(
        files(&out),
        Vec::<String>::new(),
        "files left behind after an interrupted write"
    );
}

/// Unmounts a test tmpfs in every outcome.
struct TmpfsGuard(PathBuf);

impl Drop for TmpfsGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn a_full_disk_names_the_output_not_a_parent() {
    let f = fam();
    let small = f.root.join("small");
    std::fs::create_dir(&small).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=512k", "tmpfs", s(&small)])
        .status()
        .unwrap();
    assert!(ok.success(), "mounting a tmpfs needs root");
    let _guard = TmpfsGuard(small.clone());
    let out = small.join("child");
    let (b, p) = (s(&f.m[0]), s(&f.m[1]));
    let res = aoe(&[
        "write",
        "--base",
        b,
        "--parent",
        p,
        "--lambda",
        "0.5",
        s(&out),
    ]);
    let err = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(1), "{err}");
    assert!(
        err.contains(s(&out)) && err.contains("No space left"),
        "{err}"
    );
    assert!(
        !err.contains(p) && !err.contains(b),
        "a full output disk must not blame a parent: {err}"
    );
    assert_eq!(
        files(&out),
        Vec::<String>::new(),
        "temporary files left behind"
    );
}

#[test]
fn a_selection_of_nothing_is_refused_unless_allowed() {
    let f = fam();
    let (b, p) = (s(&f.m[0]), s(&f.m[1]));
    let out = f.root.join("out");
    let o = s(&out);
    let none = "re:^no such tensor$";
    for cmd in ["write", "plan"] {
        let args = vec![cmd, "--base", b, "--parent", p, "--lambda", "0.5"];
        let tail: &[&str] = if cmd == "write" { &[o] } else { &[] };
        let with = |extra: &[&'static str]| {
            let mut a = args.clone();
            a.extend_from_slice(extra);
            a.extend_from_slice(tail);
            a
        };
        // A subset that names no tensor, with the groups that exist and their counts.
        fails(
            &with(&["--subset", none]),
            &[
                "subset re:^no such tensor$ selects nothing to mix",
                "experts ",
                "attention ",
                "--allow-empty",
            ],
        );
        // A rule that meets no selected weight.
        fails(
            &with(&["--subset", "experts", "--rule", r"self_attn=0.2,0.8"]),
            &["rule \"self_attn\" matches no selected weight"],
        );
        // A δ above every difference: decided on the statistics, refused before any output.
        fails(
            &with(&["--delta", "1e30"]),
            &["delta 1000000000000000000000000000000 over subset full selects nothing"],
        );
        let left = std::fs::read_dir(&out).map_or(0, |d| d.count());
        assert_eq!(left, 0, "{cmd}: a refused write leaves no file behind");
    }
    // --allow-empty gives the base back, byte for byte, and says so in the recipe.
    aoe_ok(&[
        "write",
        "--base",
        b,
        "--parent",
        p,
        "--lambda",
        "0.5",
        "--delta",
        "1e30",
        "--allow-empty",
        o,
    ]);
    for e in std::fs::read_dir(&f.m[0]).unwrap() {
        let name = e.unwrap().file_name();
        if name.to_string_lossy().ends_with(".safetensors") {
            assert_eq!(
                std::fs::read(out.join(&name)).unwrap(),
                std::fs::read(f.m[0].join(&name)).unwrap(),
                "{name:?}"
            );
        }
    }
    let recipe = std::fs::read_to_string(out.join("aoe_recipe.json")).unwrap();
    assert!(recipe.contains("\"allow_empty\": true"), "{recipe}");
    // λ = 0 is the base on purpose, not an empty selection.
    let zero = f.root.join("zero");
    aoe_ok(&[
        "write",
        "--base",
        b,
        "--parent",
        p,
        "--lambda",
        "0",
        s(&zero),
    ]);
}
