//! `aoe-mount` serving one child: byte-identical to `aoe write` (BF16 and FP8; full, experts,
//! δ, three parents), read by Python's `safe_open`, by 8 concurrent readers within a bounded
//! RSS, the same whatever the threads and cache size; attributes, read-only-ness, page-cache
//! reuse, O_DIRECT, read-ahead, permissions, status and the demo. Every test mounts for real and
//! unmounts in every outcome (MountGuard).

mod common;

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use aoe::testkit::{write_family, FamilySpec, FixtureDType};
use common::mount::*;
use common::*;

/// Mounts the child of `args` at `tmp/LABEL-mnt`.
fn mounted(tmp: &Path, label: &str, args: &[&str]) -> MountGuard {
    MountGuard::mount(&tmp.join(format!("{label}-mnt")), args)
}

/// Mounts and writes the child of `args` and asserts every file is identical.
fn check_equal(tmp: &Path, label: &str, args: &[&str]) -> (MountGuard, PathBuf) {
    let w = written(tmp, label, args);
    let g = mounted(tmp, label, args);
    assert_same_dirs(&g.mnt, &w, &[]);
    (g, w)
}

fn errno_of<T: std::fmt::Debug>(r: std::io::Result<T>) -> i32 {
    r.expect_err("must fail").raw_os_error().unwrap_or(0)
}

#[test]
fn fp8_children_equal_aoe_write() {
    let tmp = tempdir();
    let fam = family(&tmp.path().join("fam"), FixtureDType::Fp8, 3, 11);
    let (m1, m2, m3) = (s(&fam[0]), s(&fam[1]), s(&fam[2]));
    let cases: Vec<(&str, Vec<&str>)> = vec![
        (
            "full",
            vec!["--base", m1, "--parent", m2, "--lambda", "0.5"],
        ),
        (
            "experts",
            vec![
                "--base", m1, "--parent", m2, "--subset", "experts", "--lambda", "0.7",
            ],
        ),
        (
            "chimera",
            vec![
                "--base", m1, "--parent", m2, "--subset", "experts", "--lambda", "1",
            ],
        ),
        (
            "delta",
            vec![
                "--base", m1, "--parent", m2, "--lambda", "0.5", "--delta", "1.5",
            ],
        ),
        (
            "three",
            vec![
                "--base",
                m1,
                "--parent",
                m2,
                "--parent",
                m3,
                "--weights",
                "0.2,0.3,0.5",
            ],
        ),
        (
            "rules",
            vec![
                "--base",
                m1,
                "--parent",
                m2,
                "--lambda",
                "0.4",
                "--rule",
                "layers\\.1\\.=0.1,0.9",
            ],
        ),
    ];
    for (label, args) in &cases {
        let (g, w) = check_equal(tmp.path(), label, args);
        // The recipe file is exactly the child's.
        assert_eq!(
            std::fs::read(g.path("aoe_recipe.json")).unwrap(),
            std::fs::read(w.join("aoe_recipe.json")).unwrap()
        );
    }
}

#[test]
fn bf16_children_equal_aoe_write() {
    let tmp = tempdir();
    let fam = family(&tmp.path().join("fam"), FixtureDType::Bf16, 3, 12);
    let (m1, m2, m3) = (s(&fam[0]), s(&fam[1]), s(&fam[2]));
    let cases: Vec<(&str, Vec<&str>)> = vec![
        (
            "full",
            vec!["--base", m1, "--parent", m2, "--lambda", "0.3"],
        ),
        (
            "experts",
            vec![
                "--base", m1, "--parent", m2, "--subset", "experts", "--lambda", "0.6",
            ],
        ),
        (
            "delta",
            vec![
                "--base", m1, "--parent", m2, "--lambda", "0.5", "--delta", "0.001",
            ],
        ),
        (
            "three",
            vec![
                "--base",
                m1,
                "--parent",
                m2,
                "--parent",
                m3,
                "--weights",
                "0.5,0.25,0.25",
            ],
        ),
    ];
    for (label, args) in &cases {
        check_equal(tmp.path(), label, args);
    }
}

#[test]
fn mixed_dtype_parents_equal_aoe_write() {
    // An FP8 base with a BF16 donor: the donor is dequantized-free, the base requantized.
    let tmp = tempdir();
    let fam = family(&tmp.path().join("fam"), FixtureDType::Fp8, 2, 13);
    let b16 = bf16_copy(&fam[1], &tmp.path().join("m2-bf16"));
    check_equal(
        tmp.path(),
        "mixed",
        &["--base", s(&fam[0]), "--parent", s(&b16), "--lambda", "0.5"],
    );
}

#[test]
fn python_safe_open_reads_the_same_arrays() {
    let tmp = tempdir();
    for (dt, label) in [(FixtureDType::Fp8, "fp8"), (FixtureDType::Bf16, "bf16")] {
        let fam = family(&tmp.path().join(label), dt, 3, 21);
        let args = recipe(
            &fam,
            &["--parent", s(&fam[2]), "--weights", "0.25,0.25,0.5"],
        );
        let w = written(tmp.path(), label, &args);
        let g = mounted(tmp.path(), label, &args);
        let (dm, dw) = (
            tmp.path().join(format!("{label}-mnt.json")),
            tmp.path().join(format!("{label}-w.json")),
        );
        reference(&["dump", s(&g.mnt), s(&dm)]);
        reference(&["dump", s(&w), s(&dw)]);
        let (jm, jw): (serde_json::Value, serde_json::Value) = (
            serde_json::from_slice(&std::fs::read(&dm).unwrap()).unwrap(),
            serde_json::from_slice(&std::fs::read(&dw).unwrap()).unwrap(),
        );
        assert!(
            jm.as_object().is_some_and(|o| o.len() > 100),
            "dump has every tensor"
        );
        assert_eq!(
            jm, jw,
            "{label}: safe_open through the mount differs from the written child"
        );
    }
}

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Drops the page cache of a file so that its next reads reach the daemon.
fn drop_page_cache(f: &File) {
    // SAFETY: an fd we own, whole-file range.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

#[test]
fn eight_concurrent_readers_on_two_variants_within_the_cache_budget() {
    let tmp = tempdir();
    let mut spec = FamilySpec::with_target_bytes(FixtureDType::Fp8, 64 << 20);
    spec.seed = 31;
    let fam = write_family(&spec, &tmp.path().join("fam")).unwrap();
    let (m1, m2) = (s(&fam[0]), s(&fam[1]));
    let variants = [
        ("lambda=0.3", vec!["--lambda", "0.3"]),
        (
            "lambda=0.8,subset=experts",
            vec!["--lambda", "0.8", "--subset", "experts"],
        ),
    ];
    let mut expected: HashMap<(usize, String), Arc<Vec<u8>>> = HashMap::new();
    for (k, (_, extra)) in variants.iter().enumerate() {
        let mut args = vec!["--base", m1, "--parent", m2];
        args.extend_from_slice(extra);
        let w = written(tmp.path(), &format!("v{k}"), &args);
        for f in files(&w) {
            expected.insert((k, f.clone()), Arc::new(std::fs::read(w.join(&f)).unwrap()));
        }
    }
    let cache_mib = 32u64;
    let cache = format!("{cache_mib}M");
    let g = mounted(
        tmp.path(),
        "conc",
        &[
            "--variants",
            "--base",
            m1,
            "--parent",
            m2,
            "--cache-size",
            &cache,
            "--threads",
            "4",
        ],
    );
    let pid = g.pid();
    let roots: Vec<PathBuf> = variants.iter().map(|(n, _)| g.path(n)).collect();
    let names: Vec<String> = files(&roots[0]);
    assert_eq!(names, files(&roots[1]));
    let shards: Vec<String> = names
        .iter()
        .filter(|n| n.ends_with(".safetensors"))
        .cloned()
        .collect();
    let expected = Arc::new(expected);

    let readers: Vec<_> = (0..8u64)
        .map(|t| {
            let (roots, shards, names, expected) = (
                roots.clone(),
                shards.clone(),
                names.clone(),
                expected.clone(),
            );
            std::thread::spawn(move || {
                let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (t + 1));
                let mut checked = 0u64;
                // Two variants at once: readers 0-3 start on one, 4-7 on the other.
                for i in 0..48u64 {
                    let v = ((t / 4 + i) % 2) as usize;
                    let whole = i % 6 == 0;
                    let name = if whole {
                        &names[rng.below(names.len() as u64) as usize]
                    } else {
                        &shards[rng.below(shards.len() as u64) as usize]
                    };
                    let want = &expected[&(v, name.clone())];
                    let path = roots[v].join(name);
                    if whole {
                        let got = std::fs::read(&path).unwrap();
                        assert!(got == **want, "reader {t}: {} differs", path.display());
                        checked += got.len() as u64;
                        continue;
                    }
                    let f = File::open(&path).unwrap();
                    if rng.below(3) == 0 {
                        drop_page_cache(&f);
                    }
                    for _ in 0..4 {
                        let size = want.len() as u64;
                        let off = rng.below(size);
                        let len = (1 + rng.below(3 << 20)).min(size - off) as usize;
                        let mut buf = vec![0u8; len];
                        f.read_exact_at(&mut buf, off).unwrap();
                        assert!(
                            buf[..] == want[off as usize..off as usize + len],
                            "reader {t}: {} at {off}+{len} differs",
                            path.display()
                        );
                        checked += len as u64;
                    }
                }
                checked
            })
        })
        .collect();
    let mut peak_rss = 0;
    while !readers.iter().all(|r| r.is_finished()) {
        peak_rss = peak_rss.max(proc_kib(pid, "VmRSS"));
        std::thread::sleep(Duration::from_millis(10));
    }
    let total: u64 = readers
        .into_iter()
        .map(|r| r.join().expect("reader panicked"))
        .sum();
    assert!(total > 64 << 20, "readers checked {total} bytes");
    // And every byte of both variants, once more.
    for (k, root) in roots.iter().enumerate() {
        for n in &names {
            let f = File::open(root.join(n)).unwrap();
            drop_page_cache(&f);
            let got = std::fs::read(root.join(n)).unwrap();
            assert!(
                got == *expected[&(k, n.clone())],
                "{}/{n} differs",
                root.display()
            );
        }
    }
    let hwm = proc_kib(pid, "VmHWM").max(peak_rss);
    let bound = (cache_mib + 64) << 10;
    assert!(hwm > 0, "no RSS figures for pid {pid}");
    eprintln!(
        "daemon peak RSS {} MiB (bound {} MiB)",
        hwm >> 10,
        bound >> 10
    );
    assert!(
        hwm <= bound,
        "daemon peak RSS {hwm} KiB exceeds --cache-size {cache_mib} MiB + 64 MiB"
    );
    let st = g.status();
    assert_eq!(st["read_errors"], 0);
    assert!(st["cache_held"].as_u64().unwrap() <= cache_mib << 20);
}

#[test]
fn threads_cache_size_chunking_and_read_order_do_not_change_bytes() {
    let tmp = tempdir();
    let mut spec = FamilySpec::with_target_bytes(FixtureDType::Fp8, 32 << 20);
    spec.seed = 41;
    let fam = write_family(&spec, &tmp.path().join("fam")).unwrap();
    let args = recipe(&fam, &["--lambda", "0.45"]);
    let w = written(tmp.path(), "ref", &args);
    let configs: [(&str, &[&str]); 4] = [
        (
            "t1-16m",
            &["--threads", "1", "--cache-size", "16M", "--prefetch"],
        ),
        (
            "t4-2g",
            &["--threads", "4", "--cache-size", "2G", "--prefetch"],
        ),
        (
            "t4-16m-small-chunks",
            &[
                "--threads",
                "4",
                "--cache-size",
                "16M",
                "--chunk-size",
                "16K",
                "--prefetch",
            ],
        ),
        (
            "t1-2g-no-prefetch",
            &["--threads", "1", "--cache-size", "2G", "--no-prefetch"],
        ),
    ];
    let names = files(&w);
    for (i, (label, extra)) in configs.iter().enumerate() {
        let mut a: Vec<&str> = args.to_vec();
        a.extend_from_slice(extra);
        let g = mounted(tmp.path(), label, &a);
        for n in &names {
            let want = std::fs::read(w.join(n)).unwrap();
            let f = File::open(g.path(n)).unwrap();
            let size = want.len() as u64;
            let block = 1u64 << 20;
            let blocks: Vec<u64> = (0..size.div_ceil(block)).collect();
            // A different read order per configuration: forward, backward, strided, whole.
            let order: Vec<u64> = match i {
                0 => blocks.clone(),
                1 => blocks.iter().rev().copied().collect(),
                2 => blocks
                    .iter()
                    .filter(|b| *b % 2 == 1)
                    .chain(blocks.iter().filter(|b| *b % 2 == 0))
                    .copied()
                    .collect(),
                _ => vec![],
            };
            let mut got = vec![0u8; size as usize];
            if order.is_empty() {
                got = std::fs::read(g.path(n)).unwrap();
            }
            for b in order {
                let (lo, hi) = (b * block, ((b + 1) * block).min(size));
                f.read_exact_at(&mut got[lo as usize..hi as usize], lo)
                    .unwrap();
            }
            assert!(got == want, "{label}: {n} differs from the written child");
        }
        // Prefetch ran where it was asked for (bytes alone would not show it), and not where
        // it was turned off.
        let pf = g.status()["prefetch"].clone();
        if extra.contains(&"--prefetch") {
            assert!(
                pf["jobs"].as_u64().unwrap_or(0) > 0,
                "{label}: prefetch asked for but no job ran: {pf}"
            );
            assert_eq!(pf["errors"], 0, "{label}: {pf}");
        } else {
            assert!(
                pf.is_null() || pf["jobs"] == 0,
                "{label}: prefetch turned off but ran: {pf}"
            );
        }
    }
}

#[test]
fn attributes_are_stable_and_everything_that_writes_gets_erofs() {
    let tmp = tempdir();
    let fam = family(&tmp.path().join("fam"), FixtureDType::Fp8, 2, 51);
    let args = recipe(&fam, &["--lambda", "0.5"]);
    let w = written(tmp.path(), "attr", &args);
    let stat_all = |dir: &Path| -> Vec<(String, u64, u32, i64, i64)> {
        files(dir)
            .into_iter()
            .map(|n| {
                let m = std::fs::metadata(dir.join(&n)).unwrap();
                (n, m.len(), m.mode(), m.mtime(), m.mtime_nsec())
            })
            .collect()
    };
    let first = {
        let g = mounted(tmp.path(), "attr", &args);
        assert_eq!(
            files(&g.mnt),
            files(&w),
            "the listing is the written child's"
        );
        let root = std::fs::metadata(&g.mnt).unwrap();
        assert!(root.is_dir());
        assert_eq!(root.mode() & 0o7777, 0o555);
        let a = stat_all(&g.mnt);
        for (n, size, mode, _, _) in &a {
            assert_eq!(
                *size,
                std::fs::metadata(w.join(n)).unwrap().len(),
                "{n} size"
            );
            assert_eq!(mode & 0o170777, 0o100444, "{n} mode");
        }
        std::fs::read(g.path("aoe_recipe.json")).unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(stat_all(&g.mnt), a, "attributes change while mounted");

        // Everything that would write.
        let p = g.path("config.json");
        let erofs = libc::EROFS;
        assert_eq!(errno_of(File::create(g.path("new.txt"))), erofs, "create");
        assert_eq!(
            errno_of(std::fs::OpenOptions::new().write(true).open(&p)),
            erofs,
            "open for write"
        );
        assert_eq!(
            errno_of(std::fs::OpenOptions::new().read(true).write(true).open(&p)),
            erofs,
            "open rw"
        );
        assert_eq!(
            errno_of(std::fs::OpenOptions::new().append(true).open(&p)),
            erofs,
            "append"
        );
        assert_eq!(errno_of(std::fs::remove_file(&p)), erofs, "unlink");
        assert_eq!(errno_of(std::fs::create_dir(g.path("d"))), erofs, "mkdir");
        assert_eq!(
            errno_of(std::fs::rename(&p, g.path("c2.json"))),
            erofs,
            "rename"
        );
        assert_eq!(
            errno_of(std::fs::set_permissions(
                &p,
                std::fs::Permissions::from_mode(0o644)
            )),
            erofs,
            "chmod"
        );
        assert_eq!(
            errno_of(std::os::unix::fs::symlink("x", g.path("l"))),
            erofs,
            "symlink"
        );
        assert_eq!(errno_of(std::fs::hard_link(&p, g.path("h"))), erofs, "link");
        let c = std::ffi::CString::new(s(&p)).unwrap();
        // SAFETY: valid path.
        assert_eq!(unsafe { libc::truncate(c.as_ptr(), 0) }, -1);
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(erofs),
            "truncate"
        );
        let name = std::ffi::CString::new("user.x").unwrap();
        // SAFETY: valid strings and value.
        assert_eq!(
            unsafe {
                libc::setxattr(
                    c.as_ptr(),
                    name.as_ptr(),
                    b"1".as_ptr() as *const libc::c_void,
                    1,
                    0,
                )
            },
            -1
        );
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(erofs),
            "setxattr"
        );
        assert_eq!(stat_all(&g.mnt), a, "refused writes changed nothing");
        a
    };
    // Stable across mounts too.
    let g = mounted(tmp.path(), "attr2", &args);
    assert_eq!(
        stat_all(&g.mnt),
        first,
        "attributes differ between two mounts of one recipe"
    );
}

#[test]
fn page_cache_is_kept_o_direct_is_served_and_read_ahead_is_raised() {
    let tmp = tempdir();
    let mut spec = FamilySpec::with_target_bytes(FixtureDType::Fp8, 24 << 20);
    spec.seed = 61;
    let fam = write_family(&spec, &tmp.path().join("fam")).unwrap();
    let args = recipe(&fam, &["--lambda", "0.5"]);
    let w = written(tmp.path(), "pc", &args);
    let g = mounted(tmp.path(), "pc", &args);
    let shards: Vec<String> = files(&w)
        .into_iter()
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    let shard = &shards[0];

    // FOPEN_KEEP_CACHE: a second open and read of the same file is served from the page
    // cache (as for a second tensor-parallel rank), without reaching the daemon.
    let a = std::fs::read(g.path(shard)).unwrap();
    let served = g.status()["bytes_served"].as_u64().unwrap();
    let b = std::fs::read(g.path(shard)).unwrap();
    assert_eq!(a, b);
    assert_eq!(
        g.status()["bytes_served"].as_u64().unwrap(),
        served,
        "a second open dropped the page cache"
    );

    // O_DIRECT: reads bypass the page cache and still get the right bytes.
    let want = std::fs::read(w.join(&shards[1])).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(g.path(&shards[1]))
        .unwrap();
    let mut raw = vec![0u8; (1 << 20) + 4096];
    let align = raw.as_ptr().align_offset(4096);
    let buf = &mut raw[align..align + (1 << 20)];
    let mut got = Vec::with_capacity(want.len());
    let mut off = 0u64;
    loop {
        let n = f.read_at(buf, off).unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        off += n as u64;
    }
    assert!(got == want, "O_DIRECT read differs");
    let before = g.status()["bytes_served"].as_u64().unwrap();
    f.read_at(&mut buf[..4096], 0).unwrap();
    assert!(
        g.status()["bytes_served"].as_u64().unwrap() > before,
        "O_DIRECT reads reach the daemon"
    );

    // read_ahead_kb of the mount's bdi was raised.
    let m = aoe::mount::table::mount_at(&g.mnt).unwrap();
    let ra = std::fs::read_to_string(format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        m.major, m.minor
    ))
    .unwrap();
    assert_eq!(ra.trim(), "16384");
    assert!(
        g.log_text().contains("read_ahead_kb 16384"),
        "{}",
        g.log_text()
    );
}

#[test]
fn only_the_mounting_user_reads_unless_allow_other() {
    let tmp = tempdir();
    // Let another user reach the mount points.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let fam = family(&tmp.path().join("fam"), FixtureDType::Fp8, 2, 71);
    for p in [&fam[0], &fam[1], &tmp.path().join("fam")] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let args = recipe(&fam, &["--lambda", "0.5"]);
    let nobody_reads = |p: &Path| {
        std::process::Command::new("cat")
            .arg(p)
            .uid(65534)
            .gid(65534)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
            .success()
    };
    {
        let g = mounted(tmp.path(), "own", &args);
        assert!(std::fs::read(g.path("config.json")).is_ok());
        assert!(
            !nobody_reads(&g.path("config.json")),
            "another user read a mount without --allow-other"
        );
    }
    let mut a = args.to_vec();
    a.push("--allow-other");
    let g = mounted(tmp.path(), "other", &a);
    assert!(
        nobody_reads(&g.path("config.json")),
        "--allow-other did not let another user read"
    );
}

#[test]
fn status_reports_without_adding_files() {
    let tmp = tempdir();
    let fam = family(&tmp.path().join("fam"), FixtureDType::Fp8, 2, 81);
    let args = recipe(&fam, &["--lambda", "0.6", "--subset", "experts"]);
    let w = written(tmp.path(), "st", &args);
    let g = mounted(tmp.path(), "st", &args);
    assert_same_dirs(&g.mnt, &w, &[]);
    assert_eq!(files(&g.mnt), files(&w), "no extra file in the listing");
    let names: Vec<String> = std::fs::read_dir(&g.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), files(&w).len(), "no hidden entry either");
    // listxattr lists nothing (copies of the mount carry no status).
    let c = std::ffi::CString::new(s(&g.mnt)).unwrap();
    // SAFETY: valid path, size query.
    assert_eq!(
        unsafe { libc::listxattr(c.as_ptr(), std::ptr::null_mut(), 0) },
        0
    );
    assert_eq!(
        getxattr(&g.path("config.json"), "user.aoe.status"),
        Err(libc::ENODATA)
    );

    let out = aoe_ok(&["status", s(&g.mnt)]);
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "recipe:",
        "weights [0.4, 0.6]",
        "subset experts",
        "served:",
        "computed:",
        "GB/s",
        "hits",
        "misses",
        "errors:",
        "0 read errors",
    ] {
        assert!(text.contains(want), "status lacks {want:?}:\n{text}");
    }
    let out = aoe_ok(&["status", "--json", s(&g.mnt)]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let served = v["bytes_served"].as_u64().unwrap();
    let total: u64 = files(&w)
        .iter()
        .map(|f| std::fs::metadata(w.join(f)).unwrap().len())
        .sum();
    assert!(served >= total, "served {served} < {total}");
    assert!(v["bytes_computed"].as_u64().unwrap() > 0);
    assert!(v["cache_misses"].as_u64().unwrap() > 0);
    assert_eq!(v["read_errors"], 0);
    // Not an aoe mount: a clear error.
    let out = aoe(&["status", s(tmp.path())]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not an aoe mount"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn demo_writes_a_family_and_mounts_its_child() {
    let tmp = tempdir();
    let dir = tmp.path().join("demo");
    let out = aoe(&["demo", s(&dir)]);
    // Whatever happened, unmount at the end.
    let g = MountGuard {
        mnt: dir.join("child"),
        log: dir.join("unused.log"),
        child: None,
    };
    assert!(
        out.status.success(),
        "aoe demo failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("aoe status") && text.contains("--unmount"),
        "{text}"
    );
    assert!(is_mounted(&g.mnt));
    let recipe: serde_json::Value =
        serde_json::from_slice(&std::fs::read(g.path("aoe_recipe.json")).unwrap()).unwrap();
    assert_eq!(recipe["weights"], serde_json::json!([0.5, 0.5]));
    // The child equals the written one.
    let fam = dir.join("family");
    let w = written(
        tmp.path(),
        "demo",
        &[
            "--base",
            s(&fam.join("m1")),
            "--parent",
            s(&fam.join("m2")),
            "--lambda",
            "0.5",
        ],
    );
    assert_same_dirs(&g.mnt, &w, &[]);
    // Running it again finds the mount.
    let again = aoe_ok(&["demo", s(&dir)]);
    assert!(String::from_utf8_lossy(&again.stdout).contains("Already mounted"));
}

#[test]
fn odd_companions_are_served_as_written() {
    // A BF16 weight with an F32 `_scale_inv`, an FP8 weight without scales whose donor has
    // them, and a scale of a scale: the mount must serve exactly what `aoe write` writes.
    let tmp = tempdir();
    odd_family(tmp.path(), 9);
    let (b, p) = (tmp.path().join("m1"), tmp.path().join("m2"));
    for (label, extra) in [
        ("half", ["--lambda", "0.5"]),
        ("donor", ["--weights", "0,1"]),
    ] {
        let mut args = vec!["--base", s(&b), "--parent", s(&p)];
        args.extend(extra);
        let w = written(tmp.path(), label, &args);
        let g = mounted(tmp.path(), label, &args);
        for n in files(&w) {
            assert_eq!(
                std::fs::read(g.path(&n)).unwrap(),
                std::fs::read(w.join(&n)).unwrap(),
                "{label}: {n}"
            );
        }
    }
}
