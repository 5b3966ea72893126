//! Shared fixtures for the end-to-end tests: generated model families, the binaries, and the
//! independent Python reference.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use aoe::testkit::{write_bf16_copy, write_family, FamilySpec, FixtureDType};

pub mod mount;

/// A path as &str (test paths are UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// Recipe flags with `fam[0]` as the base and `fam[1]` as the parent, then `rest`.
pub fn recipe<'a>(fam: &'a [PathBuf], rest: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["--base", s(&fam[0]), "--parent", s(&fam[1])];
    v.extend_from_slice(rest);
    v
}

/// Writes the child of `args` with `aoe write` to `tmp/LABEL-written`.
pub fn written(tmp: &Path, label: &str, args: &[&str]) -> PathBuf {
    let out = tmp.join(format!("{label}-written"));
    let mut full = vec!["write"];
    full.extend_from_slice(args);
    full.push(s(&out));
    aoe_ok(&full);
    out
}

/// A temporary directory removed on drop.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("aoe-test-")
        .tempdir()
        .expect("temp dir")
}

/// Writes a tiny family of `siblings` models into `dir` (dir/m1, dir/m2, ...).
pub fn family(dir: &Path, dtype: FixtureDType, siblings: usize, seed: u64) -> Vec<PathBuf> {
    let mut spec = FamilySpec::tiny(dtype);
    spec.siblings = siblings;
    spec.seed = seed;
    write_family(&spec, dir).expect("write family")
}

/// Writes a BF16 copy of an FP8 model.
pub fn bf16_copy(src: &Path, dst: &Path) -> PathBuf {
    write_bf16_copy(src, dst).expect("bf16 copy");
    dst.to_path_buf()
}

/// Runs the `aoe` binary with `args`.
pub fn aoe(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_aoe"))
        .args(args)
        .env(
            "XDG_CACHE_HOME",
            std::env::temp_dir().join("aoe-test-cache"),
        )
        .env_remove("AOE_BASE")
        .env_remove("AOE_PARENTS")
        .output()
        .expect("run aoe")
}

/// Runs `aoe` and panics with its stderr unless it succeeds.
pub fn aoe_ok(args: &[&str]) -> Output {
    let out = aoe(args);
    assert!(
        out.status.success(),
        "aoe {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The Python interpreter with numpy, ml_dtypes and safetensors: `$AOE_PYTHON`, else the
/// repository's `.venv`, else `/work/venv`. Panics (never skips) when none works.
pub fn python() -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let candidates: Vec<PathBuf> = std::env::var_os("AOE_PYTHON")
        .map(PathBuf::from)
        .into_iter()
        .chain([
            repo.join(".venv/bin/python"),
            PathBuf::from("/work/venv/bin/python"),
        ])
        .collect();
    for c in &candidates {
        let ok = Command::new(c)
            .args(["-c", "import numpy, ml_dtypes, safetensors"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return c.clone();
        }
    }
    panic!("no Python with numpy, ml_dtypes and safetensors (tried {candidates:?}); run `bash .ci/run` or set AOE_PYTHON");
}

/// Runs the independent reference `tests/reference/aoe_ref.py` with `args`.
pub fn reference(args: &[&str]) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/aoe_ref.py");
    let out = Command::new(python())
        .arg(script)
        .args(args)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "aoe_ref.py {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Writes the odd-layout models of `tests/reference/odd_family.py` to dir/m1 and dir/m2.
pub fn odd_family(dir: &Path, seed: u64) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/odd_family.py");
    let out = Command::new(python())
        .arg(script)
        .arg(dir)
        .arg(seed.to_string())
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "odd_family.py failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every regular file of a directory, sorted by name.
pub fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    v.sort();
    v
}

/// Asserts two directories hold the same files (except those in `skip`) with the same bytes.
pub fn assert_same_dirs(a: &Path, b: &Path, skip: &[&str]) {
    let fa: Vec<String> = files(a)
        .into_iter()
        .filter(|f| !skip.contains(&f.as_str()))
        .collect();
    let fb: Vec<String> = files(b)
        .into_iter()
        .filter(|f| !skip.contains(&f.as_str()))
        .collect();
    assert_eq!(
        fa,
        fb,
        "file lists differ: {} vs {}",
        a.display(),
        b.display()
    );
    for f in &fa {
        let (x, y) = (
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap(),
        );
        if x != y {
            let first = x.iter().zip(&y).position(|(p, q)| p != q);
            panic!(
                "{f} differs between {} and {} (sizes {} / {}, first difference at byte {first:?})",
                a.display(),
                b.display(),
                x.len(),
                y.len()
            );
        }
    }
}

/// Rewrites the JSON header of a safetensors file in place, keeping its data bytes.
pub fn rewrite_header(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut v: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut v);
    let h = serde_json::to_vec(&v).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(path, out).unwrap();
}

/// Copies a directory's regular files (a parent we may corrupt).
pub fn copy_dir(src: &Path, dst: &Path) -> PathBuf {
    std::fs::create_dir_all(dst).unwrap();
    for f in files(src) {
        std::fs::copy(src.join(&f), dst.join(&f)).unwrap();
    }
    dst.to_path_buf()
}
