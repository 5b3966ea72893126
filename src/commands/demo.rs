//! `aoe demo`: a generated FP8 family, its λ = 0.5 child mounted, and what to run next.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::mount::status::status_json;
use crate::mount::table::{mnt_error, mount_at, unmount};

/// The directory `aoe demo` uses by default: `$XDG_CACHE_HOME/aoe/demo`.
pub(crate) fn default_demo_dir() -> Option<PathBuf> {
    crate::recipe::stats::default_cache_dir().map(|d| d.join("demo"))
}

/// The `aoe-mount` executable: beside the running one, else on `PATH`.
pub(crate) fn aoe_mount_exe() -> PathBuf {
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        let p = dir.join("aoe-mount");
        if p.is_file() {
            return p;
        }
        // Test binaries live in target/*/deps; the executables one level up.
        if let Some(p) = dir
            .parent()
            .map(|d| d.join("aoe-mount"))
            .filter(|p| p.is_file())
        {
            return p;
        }
    }
    PathBuf::from("aoe-mount")
}

/// `aoe demo [DIR]`: writes the built-in demo family (two FP8 siblings of one ancestor in the
/// DeepSeek-V3 layout) under `DIR/family` unless it is there, mounts the λ = 0.5 child of
/// the first two at `DIR/child`, and returns what to run next.
pub fn demo(dir: Option<PathBuf>) -> Result<String> {
    use crate::testkit::{write_family, FamilySpec};
    let dir = dir
        .or_else(default_demo_dir)
        .ok_or_else(|| Error::BadRecipe {
            reason: "no cache directory: give DIR".into(),
        })?;
    let family = dir.join("family");
    // Two siblings of one ancestor, as the README tells it (the demo preset has a third).
    let mut spec = FamilySpec::demo();
    spec.siblings = 2;
    let done = family.join(".complete");
    if !done.is_file() {
        eprintln!(
            "aoe demo: writing a family of {} FP8 siblings ({} MB each) to {} …",
            spec.siblings,
            spec.parent_bytes() / 1_000_000,
            family.display()
        );
        // Only directories carrying our marker are ever removed: DIR may be a user's own.
        let ours = |d: &Path| d.join(".aoe-demo").is_file();
        let foreign = |d: &Path| d.exists() && !ours(d);
        let tmp = dir.join("family.partial");
        for d in [&tmp, &family] {
            if foreign(d) {
                return Err(Error::BadOutput {
                    path: d.to_path_buf(),
                    reason: "exists and was not written by aoe demo; choose another DIR".into(),
                });
            }
        }
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        std::fs::write(tmp.join(".aoe-demo"), b"").map_err(|e| Error::io(&tmp, e))?;
        write_family(&spec, &tmp).map_err(|e| Error::io(&tmp, e))?;
        let _ = std::fs::remove_dir_all(&family);
        std::fs::rename(&tmp, &family).map_err(|e| Error::io(&family, e))?;
        std::fs::write(&done, b"").map_err(|e| Error::io(&done, e))?;
    }
    let (m1, m2) = (family.join("m1"), family.join("m2"));
    let mnt = dir.join("child");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let mut already = false;
    if mount_at(&mnt).is_some() {
        match status_json(&mnt) {
            Ok(_) => already = true,
            Err(_) => {
                unmount(&mnt)?;
            }
        }
    }
    if !already {
        std::fs::create_dir_all(&mnt).map_err(|e| Error::io(&mnt, e))?;
        let exe = aoe_mount_exe();
        let out = std::process::Command::new(&exe)
            .arg("--base")
            .arg(&m1)
            .arg("--parent")
            .arg(&m2)
            .args(["--lambda", "0.5"])
            .arg(&mnt)
            .output()
            .map_err(|e| Error::io(&exe, e))?;
        if !out.status.success() {
            return Err(mnt_error(
                &mnt,
                format!(
                    "aoe-mount failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            ));
        }
    }
    let shard = std::fs::read_dir(&m1)
        .ok()
        .and_then(|rd| {
            let mut v: Vec<String> = rd
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.ends_with(".safetensors"))
                .collect();
            v.sort();
            v.into_iter().next()
        })
        .unwrap_or_else(|| "model.safetensors".into());
    let (d, c) = (dir.display(), mnt.display());
    Ok(format!(
        "{verb} the λ = 0.5 child of {m1} and {m2} at {c}\n\
         (a demo family: {n} FP8 siblings of one ancestor, DeepSeek-V3 layout, {mb} MB each, in {d}/family)\n\n\
         Try:\n  \
           ls -l {c}\n  \
           cat {c}/aoe_recipe.json\n  \
           python3 -c \"from safetensors import safe_open; f = safe_open('{c}/{shard}', 'np'); print(list(f.keys())[:4])\"\n  \
           aoe status {c}\n\n\
         Swap variants without writing anything:\n  \
           mkdir -p {d}/variants && aoe-mount --variants --base {m1} --parent {m2} {d}/variants\n  \
           ls {d}/variants/lambda=0.7,subset=experts/\n\n\
         Unmount:\n  \
           aoe-mount --unmount {c}\n\n\
         With real parents: aoe-mount --base /models/DeepSeek-V3-0324 --parent /models/DeepSeek-R1 --lambda 0.5 /mnt/child\n\
         then: vllm serve /mnt/child --tensor-parallel-size 8\n",
        verb = if already { "Already mounted:" } else { "Mounted" },
        m1 = m1.display(),
        m2 = m2.display(),
        n = spec.siblings,
        mb = spec.parent_bytes() / 1_000_000,
    ))
}
