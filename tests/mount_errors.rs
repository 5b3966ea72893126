//! `aoe-mount` when things go wrong: bad inputs give a clear error and leave no mount;
//! SIGTERM/SIGINT unmount and exit 0; `--unmount` clears a mount whose daemon was killed; a
//! parent that shrinks or vanishes turns into EIO and a log line, never a crash; configured
//! parents make `aoe-mount --lambda 0.5 MNT` work.

mod common;

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::Duration;

use aoe::testkit::FixtureDType;
use common::mount::*;
use common::*;

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// How many mounts are stacked at `p`.
fn mounts_at(p: &Path) -> usize {
    let want = aoe::mount::table::mount_path(p);
    aoe::mount::table::mounts()
        .iter()
        .filter(|m| m.mountpoint == want)
        .count()
}

/// Runs `aoe-mount ARGS… MNT`, expects failure mentioning `why`, and no new mount at `mnt`.
fn refused(mnt: &Path, args: &[&str], why: &str) {
    let before = mounts_at(mnt);
    let log = mnt.with_extension("log");
    let mut full = args.to_vec();
    full.extend_from_slice(&["--log", s(&log), s(mnt)]);
    let out = aoe_mount(&full);
    if out.status.success() {
        if before == 0 {
            force_unmount(mnt);
        }
        panic!("aoe-mount {args:?} {} succeeded", mnt.display());
    }
    let e = stderr(&out);
    assert!(
        e.contains(why),
        "aoe-mount {args:?}: expected {why:?} in:\n{e}"
    );
    assert!(
        e.starts_with("aoe-mount: error:") || e.starts_with("error:"),
        "{e}"
    );
    assert_eq!(
        mounts_at(mnt),
        before,
        "a mount was left at {}",
        mnt.display()
    );
}

#[test]
fn bad_inputs_give_a_clear_error_and_leave_no_mount() {
    let tmp = tempdir();
    let fam = family(&tmp.path().join("fam"), FixtureDType::Fp8, 2, 201);
    let (m1, m2) = (s(&fam[0]), s(&fam[1]));
    let ok = ["--base", m1, "--parent", m2, "--lambda", "0.5"];

    // Mount point missing, or a file.
    let missing = tmp.path().join("missing");
    refused(&missing, &ok, "does not exist");
    assert!(!missing.exists(), "the mount point was created");
    let file = tmp.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    refused(&file, &ok, "not a directory");
    // No mount point at all: clap's usage error.
    let out = aoe_mount(&["--base", m1, "--parent", m2, "--lambda", "0.5"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("MOUNTPOINT"), "{}", stderr(&out));

    // Bad recipes: nothing is mounted.
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    refused(
        &mnt,
        &["--base", m1, "--parent", m2, "--lambda", "1.5"],
        "not convex",
    );
    refused(&mnt, &["--base", m1, "--parent", m2], "no weights");
    refused(&mnt, &["--base", m1, "--lambda", "0.5"], "no parent");
    refused(
        &mnt,
        &[
            "--base", m1, "--parent", m2, "--lambda", "0.5", "--subset", "expert",
        ],
        "unknown subset",
    );
    refused(
        &mnt,
        &[
            "--base",
            m1,
            "--parent",
            "/nonexistent/model",
            "--lambda",
            "0.5",
        ],
        "/nonexistent/model",
    );
    refused(
        &mnt,
        &["--base", s(tmp.path()), "--parent", m2, "--lambda", "0.5"],
        "not a checkpoint",
    );
    refused(
        &mnt,
        &["--base", m1, "--parent", m2, "--weights", "0.2,0.3,0.5"],
        "3 weights given, 2 needed",
    );
    refused(&mnt, &["--variants", "--parent", m2], "--base");
    // A parent with a corrupt header.
    let bad = copy_dir(&fam[1], &tmp.path().join("bad"));
    let shard = files(&bad)
        .into_iter()
        .find(|f| f.ends_with(".safetensors"))
        .unwrap();
    rewrite_header(&bad.join(&shard), |v| {
        let (_, t) = v
            .as_object_mut()
            .unwrap()
            .iter_mut()
            .find(|(k, _)| *k != "__metadata__")
            .unwrap();
        t["shape"] = serde_json::json!([1, 2, 3]);
    });
    refused(
        &mnt,
        &["--base", m1, "--parent", s(&bad), "--lambda", "0.5"],
        &shard,
    );

    // Already mounted: refused, and the first mount still serves.
    let g = MountGuard::mount(&mnt, &ok);
    refused(&mnt, &ok, "already an aoe mount");
    assert!(is_mounted(&mnt));
    assert!(std::fs::read(g.path("config.json")).is_ok());
    // Another kind of mount point is refused too.
    let tmpfs = tmp.path().join("tmpfs");
    std::fs::create_dir(&tmpfs).unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "tmpfs"])
        .arg(&tmpfs)
        .status()
        .unwrap();
    assert!(st.success());
    refused(&tmpfs, &ok, "already a mount point");
    assert!(std::process::Command::new("umount")
        .arg(&tmpfs)
        .status()
        .unwrap()
        .success());
}

#[test]
fn sigterm_and_sigint_unmount_and_exit_zero() {
    let tmp = tempdir();
    let fam = family(&tmp.path().join("fam"), FixtureDType::Fp8, 2, 202);
    let args = recipe(&fam, &["--lambda", "0.5"]);

    // Foreground: SIGTERM, exit status 0, mount gone.
    let mut g = MountGuard::foreground(&tmp.path().join("fg"), &args);
    assert!(std::fs::read(g.path("config.json")).is_ok());
    let mut child = g.child.take().unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = child.wait().unwrap();
    assert!(
        st.success(),
        "aoe-mount --foreground exited with {st} after SIGTERM:\n{}",
        g.log_text()
    );
    assert!(!is_mounted(&g.mnt), "SIGTERM left the mount");
    assert!(
        g.log_text().contains("SIGTERM: unmounting"),
        "{}",
        g.log_text()
    );

    // Daemon: SIGINT, mount and process gone.
    let g = MountGuard::mount(&tmp.path().join("bg"), &args);
    let pid = g.pid();
    assert!(alive(pid));
    // SAFETY: signalling the daemon we started.
    unsafe { libc::kill(pid as i32, libc::SIGINT) };
    assert!(
        wait_until(Duration::from_secs(10), || !is_mounted(&g.mnt)),
        "SIGINT left the mount"
    );
    assert!(
        wait_until(Duration::from_secs(10), || !alive(pid)),
        "the daemon outlived its mount"
    );
    assert!(g.log_text().contains("unmounted"), "{}", g.log_text());

    // Busy: a file stays open across SIGTERM. The mount leaves the namespace at once, the open
    // file keeps reading right, and the daemon exits when it is closed.
    let mut g = MountGuard::foreground(&tmp.path().join("busy"), &args);
    let shard = files(&g.mnt)
        .into_iter()
        .find(|f| f.ends_with(".safetensors"))
        .unwrap();
    let want = std::fs::read(fam[0].join(&shard)).unwrap();
    let f = std::fs::File::open(g.path(&shard)).unwrap();
    let mut child = g.child.take().unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(
        wait_until(Duration::from_secs(10), || !is_mounted(&g.mnt)),
        "a busy mount was not detached"
    );
    let mut head = vec![0u8; 8];
    f.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(head, want[..8], "the header is the base's");
    drop(f);
    let st = child.wait().unwrap();
    assert!(st.success(), "exit status {st}:\n{}", g.log_text());
}

#[test]
fn unmount_clears_a_mount_whose_daemon_was_killed() {
    let tmp = tempdir();
    let fam = family(&tmp.path().join("fam"), FixtureDType::Fp8, 2, 203);
    let args = recipe(&fam, &["--lambda", "0.5"]);
    let mnt = tmp.path().join("mnt");
    let mut g = MountGuard::foreground(&mnt, &args);
    let mut child = g.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(is_mounted(&mnt), "the dead mount is still there");
    assert_eq!(
        std::fs::read_dir(&mnt).unwrap_err().raw_os_error(),
        Some(libc::ENOTCONN)
    );
    // Status and a new mount say what happened and what to do.
    let out = aoe(&["status", s(&mnt)]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("daemon is gone"), "{}", stderr(&out));
    refused(
        &mnt,
        &args,
        "daemon is gone; clear it with `aoe-mount --unmount",
    );
    assert!(is_mounted(&mnt));
    // --unmount clears it.
    let out = aoe_mount(&["--unmount", s(&mnt)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!is_mounted(&mnt));
    assert!(std::fs::metadata(&mnt).unwrap().is_dir());
    // Unmounting what is not mounted is an error.
    let out = aoe_mount(&["--unmount", s(&mnt)]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not a mount point"),
        "{}",
        stderr(&out)
    );
    // The directory mounts again.
    let g2 = MountGuard::mount(&mnt, &args);
    assert!(std::fs::read(g2.path("config.json")).is_ok());
    drop(g2);
    drop(g);
}

#[test]
fn a_parent_that_shrinks_or_vanishes_gives_eio_not_a_crash() {
    let tmp = tempdir();
    let fam = family(&tmp.path().join("fam"), FixtureDType::Fp8, 2, 204);
    let args = recipe(&fam, &["--lambda", "0.5", "--no-prefetch"]);
    let w = written(tmp.path(), "ref", &args[..6]);
    let g = MountGuard::mount(&tmp.path().join("mnt"), &args);
    let shards: Vec<String> = files(&w)
        .into_iter()
        .filter(|f| f.ends_with(".safetensors"))
        .collect();

    // Shrink every donor shard to half: mixed tensors beyond the cut can no longer be computed.
    for f in files(&fam[1])
        .into_iter()
        .filter(|f| f.ends_with(".safetensors"))
    {
        let p = fam[1].join(f);
        let len = std::fs::metadata(&p).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
    }
    // The base's tokenizer vanishes: passing it through fails.
    std::fs::remove_file(fam[0].join("tokenizer.json")).unwrap();

    let mut eio = 0;
    for n in &shards {
        match std::fs::read(g.path(n)) {
            Ok(b) => assert!(
                b == std::fs::read(w.join(n)).unwrap(),
                "{n}: wrong bytes instead of an error"
            ),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EIO), "{n}: {e}");
                eio += 1;
            }
        }
    }
    assert!(eio > 0, "no read met the shrunk donor");
    assert_eq!(
        std::fs::read(g.path("tokenizer.json"))
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EIO)
    );
    // The headers are still served (they are the base's), and so is the recipe.
    // (O_DIRECT: a buffered read asks the daemon for a whole readahead window, which fails.)
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(g.path(&shards[0]))
        .unwrap();
    let mut head = [0u8; 8];
    f.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(head[..], std::fs::read(w.join(&shards[0])).unwrap()[..8]);
    assert!(std::fs::read(g.path("aoe_recipe.json")).is_ok());
    // The daemon lives, counted the errors and logged them.
    let st = g.status();
    assert!(st["read_errors"].as_u64().unwrap() >= 2, "{st}");
    let log = g.log_text();
    assert!(
        log.contains("read error (EIO)") && log.contains("changed while in use"),
        "{log}"
    );
    assert!(log.contains("tokenizer.json"), "{log}");
    assert!(alive(g.pid()));
}

#[test]
fn configured_parents_let_lambda_alone_mount() {
    let tmp = tempdir();
    let fam = family(&tmp.path().join("fam"), FixtureDType::Fp8, 2, 205);
    let w = written(
        tmp.path(),
        "ref",
        &[
            "--base",
            s(&fam[0]),
            "--parent",
            s(&fam[1]),
            "--lambda",
            "0.5",
        ],
    );
    let cfg = tmp.path().join("config");
    std::fs::create_dir_all(cfg.join("aoe")).unwrap();
    std::fs::write(
        cfg.join("aoe/config.json"),
        serde_json::json!({"base": fam[0], "parents": [fam[1]]}).to_string(),
    )
    .unwrap();
    let mount_with = |label: &str, envs: &[(&str, &str)]| -> MountGuard {
        let mnt = tmp.path().join(label);
        std::fs::create_dir_all(&mnt).unwrap();
        let log = mnt.with_extension("log");
        let mut c = aoe_mount_cmd(&["--lambda", "0.5", "--log", s(&log), s(&mnt)]);
        for (k, v) in envs {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        let g = MountGuard {
            mnt,
            log,
            child: None,
        };
        assert!(out.status.success(), "{label}: {}", stderr(&out));
        g
    };
    let g = mount_with("cfg", &[("XDG_CONFIG_HOME", s(&cfg))]);
    assert_same_dirs(&g.mnt, &w, &[]);
    let parents = std::env::join_paths([&fam[1]]).unwrap();
    let g2 = mount_with(
        "env",
        &[
            ("AOE_BASE", s(&fam[0])),
            ("AOE_PARENTS", parents.to_str().unwrap()),
        ],
    );
    assert_same_dirs(&g2.mnt, &w, &[]);
    // --help says how.
    let help = String::from_utf8_lossy(&aoe_mount(&["--help"]).stdout).to_string();
    for want in [
        "config.json",
        "AOE_BASE",
        "AOE_PARENTS",
        "aoe-mount --lambda 0.5 /mnt/child",
        "--cache-size",
        "--variants",
    ] {
        assert!(help.contains(want), "--help lacks {want:?}");
    }
}
