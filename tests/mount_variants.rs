//! `aoe-mount --variants`: a root whose directories are variants named by their recipes,
//! created on lookup, each serving exactly what `aoe write` writes for its recipe; invalid
//! names get ENOENT and a log line; `ls` lists the variants made and those of `--sweep`.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aoe::testkit::FixtureDType;
use common::mount::*;
use common::*;

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

#[test]
fn variants_read_in_parallel_each_get_their_own_bytes() {
    let tmp = tempdir();
    let fam = family(&tmp.path().join("fam"), FixtureDType::Fp8, 3, 101);
    let (m1, m2, m3) = (s(&fam[0]), s(&fam[1]), s(&fam[2]));
    let g = MountGuard::mount(
        &tmp.path().join("mnt"),
        &["--variants", "--base", m1, "--parent", m2, "--parent", m3],
    );
    assert!(listing(&g.mnt).is_empty(), "a fresh variants root is empty");
    let cases: Vec<(&str, Vec<&str>)> = vec![
        ("weights=0.2:0.3:0.5", vec!["--weights", "0.2,0.3,0.5"]),
        (
            "weights=0:1:0,subset=experts",
            vec!["--weights", "0,1,0", "--subset", "experts"],
        ),
        (
            "weights=0.5:0.5:0,delta=1.5",
            vec!["--weights", "0.5,0.5,0", "--delta", "1.5"],
        ),
        (
            "weights=0.1:0.1:0.8,subset=experts+router,metric=dequantized",
            vec![
                "--weights",
                "0.1,0.1,0.8",
                "--subset",
                "experts",
                "--subset",
                "router",
                "--metric",
                "dequantized",
            ],
        ),
    ];
    let refs: Vec<PathBuf> = cases
        .iter()
        .enumerate()
        .map(|(i, (_, extra))| {
            let mut a = vec!["--base", m1, "--parent", m2, "--parent", m3];
            a.extend_from_slice(extra);
            written(tmp.path(), &format!("v{i}"), &a)
        })
        .collect();
    // All variants at once, from parallel threads, each reading every file.
    let threads: Vec<_> = cases
        .iter()
        .zip(&refs)
        .map(|((name, _), r)| {
            let (dir, r) = (g.path(name), r.clone());
            std::thread::spawn(move || assert_same_dirs(&dir, &r, &[]))
        })
        .collect();
    for t in threads {
        t.join().expect("a variant differs from its written child");
    }
    // The variants made so far are listed.
    let mut names: Vec<String> = cases.iter().map(|(n, _)| n.to_string()).collect();
    names.sort();
    assert_eq!(listing(&g.mnt), names);
    // The bytes under a path never change: read again after other variants were made.
    assert_same_dirs(&g.path(cases[0].0), &refs[0], &[]);
    let st = g.status();
    assert_eq!(st["layout"], "variants");
    assert_eq!(st["variants"].as_array().unwrap().len(), cases.len());
    let text = String::from_utf8_lossy(&aoe_ok(&["status", s(&g.mnt)]).stdout).to_string();
    for (n, _) in &cases {
        assert!(text.contains(n), "status lacks variant {n}:\n{text}");
    }
}

#[test]
fn invalid_names_get_enoent_and_a_log_line() {
    let tmp = tempdir();
    let fam = family(&tmp.path().join("fam"), FixtureDType::Fp8, 2, 102);
    let g = MountGuard::mount(
        &tmp.path().join("mnt"),
        &["--variants", "--base", s(&fam[0]), "--parent", s(&fam[1])],
    );
    for (name, why) in [
        ("lambda=abc", "is not a number"),
        ("colour=red", "unknown key"),
        ("lambda=1.5", "not convex"),
        ("lambda=0.5,subset=expert", "unknown subset"),
        ("weights=0.2:0.3:0.5", "3 weights given, 2 needed"),
        ("lambda", "not key=value"),
        (
            "lambda=0.5,subset=re:^none$",
            "subset re:^none$ selects nothing to mix",
        ),
    ] {
        let e = std::fs::metadata(g.path(name)).expect_err(name);
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{name}: {e}");
        let e = std::fs::read(g.path(&format!("{name}/config.json"))).expect_err(name);
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{name}: {e}");
        let log = g.log_text();
        assert!(
            log.contains(&format!("no variant {name:?}")) && log.contains(why),
            "log lacks {name:?} / {why:?}:\n{log}"
        );
    }
    assert!(listing(&g.mnt).is_empty(), "refused names are not listed");
    assert!(g.status()["names_refused"].as_u64().unwrap() >= 7);
    // Unless the name allows it.
    assert!(std::fs::metadata(g.path("lambda=0.5,subset=re:^none$,allow-empty=true")).is_ok());
    // A valid name still works afterwards, and its files are there.
    assert!(std::fs::metadata(g.path("lambda=0.5/config.json")).is_ok());
    assert_eq!(
        std::fs::metadata(g.path("lambda=0.5/nope.json"))
            .unwrap_err()
            .raw_os_error(),
        Some(libc::ENOENT)
    );
}

#[test]
fn sweep_variants_are_listed_and_flags_are_defaults() {
    let tmp = tempdir();
    let fam = family(&tmp.path().join("fam"), FixtureDType::Bf16, 2, 103);
    let (m1, m2) = (s(&fam[0]), s(&fam[1]));
    let sweep = tmp.path().join("sweep.json");
    std::fs::write(
        &sweep,
        serde_json::json!({
            "chimera": {"weights": [0, 1], "subset": ["experts"]},
            "half": "lambda=0.5",
            "lambda=0.25": {"lambda": 0.25},
        })
        .to_string(),
    )
    .unwrap();
    // --subset router is every variant's default unless its recipe says otherwise.
    let g = MountGuard::mount(
        &tmp.path().join("mnt"),
        &[
            "--variants",
            "--base",
            m1,
            "--parent",
            m2,
            "--subset",
            "router",
            "--sweep",
            s(&sweep),
        ],
    );
    assert_eq!(listing(&g.mnt), vec!["chimera", "half", "lambda=0.25"]);
    let chimera = written(
        tmp.path(),
        "chimera",
        &[
            "--base",
            m1,
            "--parent",
            m2,
            "--weights",
            "0,1",
            "--subset",
            "experts",
        ],
    );
    let half = written(
        tmp.path(),
        "half",
        &[
            "--base", m1, "--parent", m2, "--lambda", "0.5", "--subset", "router",
        ],
    );
    assert_same_dirs(&g.path("chimera"), &chimera, &[]);
    assert_same_dirs(&g.path("half"), &half, &[]);
    // An alias (same recipe, another name) serves the same bytes.
    assert_same_dirs(&g.path("lambda=0.5"), &half, &[]);
    assert_eq!(
        listing(&g.mnt),
        vec!["chimera", "half", "lambda=0.25", "lambda=0.5"]
    );
    // The template's subset applies to names too; the name overrides it.
    let full = written(
        tmp.path(),
        "full",
        &[
            "--base", m1, "--parent", m2, "--lambda", "0.7", "--subset", "full",
        ],
    );
    assert_same_dirs(&g.path("lambda=0.7,subset=full"), &full, &[]);
}

#[test]
fn bad_sweep_files_never_mount() {
    let tmp = tempdir();
    let fam = family(&tmp.path().join("fam"), FixtureDType::Bf16, 2, 104);
    let (m1, m2) = (s(&fam[0]), s(&fam[1]));
    for (label, content, why) in [
        ("notjson", "{", "not valid JSON"),
        ("badrecipe", r#"{"x": {"lambda": 2}}"#, "not convex"),
        (
            "badname",
            r#"{"a/b": {"lambda": 0.5}}"#,
            "not a usable directory name",
        ),
        (
            "otherbase",
            r#"{"x": {"lambda": 0.5, "base": "/nonexistent"}}"#,
            "base",
        ),
    ] {
        let sweep = tmp.path().join(format!("{label}.json"));
        std::fs::write(&sweep, content).unwrap();
        let mnt = tmp.path().join(format!("{label}-mnt"));
        let r = MountGuard::try_mount(
            &mnt,
            &[
                "--variants",
                "--base",
                m1,
                "--parent",
                m2,
                "--sweep",
                s(&sweep),
            ],
        );
        let out = r.err().unwrap_or_else(|| panic!("{label}: mounted"));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "{label}: {err}");
        assert!(!is_mounted(&mnt), "{label}: a mount was left behind");
    }
}

#[test]
fn a_new_variant_costs_no_work_proportional_to_the_model() {
    let tmp = tempdir();
    let fam = family(&tmp.path().join("fam"), FixtureDType::Fp8, 2, 105);
    let g = MountGuard::mount(
        &tmp.path().join("mnt"),
        &[
            "--variants",
            "--base",
            s(&fam[0]),
            "--parent",
            s(&fam[1]),
            "--delta",
            "1",
        ],
    );
    let before = g.status();
    let mut times = Vec::new();
    for i in 0..10 {
        let name = format!("lambda=0.{i}5");
        let t = Instant::now();
        let md = std::fs::metadata(g.path(&name)).unwrap();
        times.push(t.elapsed());
        assert!(md.is_dir());
    }
    let after = g.status();
    // Creating variants computed nothing and read nothing.
    assert_eq!(before["bytes_computed"], after["bytes_computed"]);
    assert_eq!(before["cache_misses"], after["cache_misses"]);
    assert_eq!(after["variants"].as_array().unwrap().len(), 10);
    times.sort();
    assert!(
        times[5] < Duration::from_millis(500),
        "median variant creation took {:?}",
        times[5]
    );
    assert!(g.log_text().contains("variant \"lambda=0.05\" created in"));
}

/// `--max-variants 2`: naming 5 variants in turn keeps at most 2 made by lookup live (the
/// least recently used one without an open file is forgotten, its chunks leave the cache); a
/// variant with an open file survives and still reads its bytes; a forgotten name works
/// again, with identical bytes.
#[test]
fn live_variants_are_bounded_and_forgotten_ones_come_back() {
    let tmp = tempdir();
    let fam = family(&tmp.path().join("fam"), FixtureDType::Fp8, 2, 106);
    let (m1, m2) = (s(&fam[0]), s(&fam[1]));
    let r1 = written(
        tmp.path(),
        "l1",
        &["--base", m1, "--parent", m2, "--lambda", "0.1"],
    );
    let r2 = written(
        tmp.path(),
        "l2",
        &["--base", m1, "--parent", m2, "--lambda", "0.2"],
    );
    let g = MountGuard::mount(
        &tmp.path().join("mnt"),
        &[
            "--variants",
            "--max-variants",
            "2",
            "--base",
            m1,
            "--parent",
            m2,
        ],
    );
    let shard = files(&r1)
        .into_iter()
        .find(|f| f.ends_with(".safetensors"))
        .unwrap();
    // lambda=0.1 stays open the whole time.
    let mut held = std::fs::File::open(g.path("lambda=0.1").join(&shard)).unwrap();
    assert_same_dirs(&g.path("lambda=0.2"), &r2, &[]);
    let rss0 = proc_kib(g.pid(), "VmRSS");
    for l in ["0.3", "0.4", "0.5", "0.6", "0.7"] {
        let d = g.path(&format!("lambda={l}"));
        for f in files(&d) {
            std::fs::read(d.join(f)).unwrap();
        }
        let st = g.status();
        let live = st["variants"].as_array().unwrap();
        assert!(live.len() <= 2, "{} variants live: {st}", live.len());
        assert!(live.iter().any(|v| v["name"] == "lambda=0.1"), "{st}");
        assert!(
            st["cache_held"].as_u64() <= st["cache_budget"].as_u64(),
            "{st}"
        );
    }
    let st = g.status();
    assert!(st["variants_forgotten"].as_u64().unwrap() >= 5, "{st}");
    assert_eq!(st["max_variants"], 2);
    // Five more variants made and read did not grow the daemon (slack for allocator noise).
    let rss1 = proc_kib(g.pid(), "VmRSS");
    assert!(rss1 < rss0 + 64 * 1024, "RSS {rss0} KiB -> {rss1} KiB");
    // The open file still reads its own bytes.
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut held, &mut got).unwrap();
    assert!(
        got == std::fs::read(r1.join(&shard)).unwrap(),
        "held file changed"
    );
    drop(held);
    // Forgotten names are made again, with the same bytes (the kernel's cached inodes of the
    // forgotten variant get ESTALE and are looked up again).
    assert_same_dirs(&g.path("lambda=0.2"), &r2, &[]);
    assert_same_dirs(&g.path("lambda=0.1"), &r1, &[]);
    let log = g.log_text();
    assert!(log.contains("variant \"lambda=0.2\" forgotten"), "{log}");
}

/// A variant made by lookup plans each unit at its first read: a parent whose tensor has
/// another shape than the base's is refused by a single-recipe mount (and `aoe write`) up
/// front, but under --variants only the reads needing that tensor fail (EIO, and a log line
/// naming the file and the tensor).
#[test]
fn a_unit_that_cannot_be_built_fails_its_reads_in_a_lookup_variant() {
    let tmp = tempdir();
    let fam = family(&tmp.path().join("fam"), FixtureDType::Fp8, 2, 107);
    let bad = copy_dir(&fam[1], &tmp.path().join("bad"));
    let mut swapped = None;
    for shard in files(&bad)
        .into_iter()
        .filter(|f| f.ends_with(".safetensors"))
    {
        if swapped.is_some() {
            break;
        }
        rewrite_header(&bad.join(&shard), |v| {
            for (k, t) in v.as_object_mut().unwrap().iter_mut() {
                let shape: Vec<u64> = match t.get("shape").and_then(|s| s.as_array()) {
                    Some(s) => s.iter().map(|x| x.as_u64().unwrap()).collect(),
                    None => continue,
                };
                if k.ends_with("_scale_inv") || shape.len() != 2 || shape[0] == shape[1] {
                    continue;
                }
                if t["dtype"] == "F8_E4M3" {
                    continue;
                }
                t["shape"] = serde_json::json!([shape[1], shape[0]]);
                swapped = Some((shard.clone(), k.clone()));
                break;
            }
        });
    }
    let (_, tensor) = swapped.expect("a 2-D tensor to reshape");
    let (m1, b) = (s(&fam[0]), s(&bad));
    std::fs::create_dir_all(tmp.path().join("x")).unwrap();
    let single = aoe_mount(&[
        "--base",
        m1,
        "--parent",
        b,
        "--lambda",
        "0.5",
        s(&tmp.path().join("x")),
    ]);
    let err = String::from_utf8_lossy(&single.stderr);
    assert!(!single.status.success() && err.contains(&tensor), "{err}");
    let g = MountGuard::mount(
        &tmp.path().join("mnt"),
        &["--variants", "--base", m1, "--parent", b],
    );
    let d = g.path("lambda=0.5");
    assert!(d.is_dir(), "the lookup itself succeeds");
    // The base's shard holding the tensor fails with EIO, the others read.
    let mut failed = Vec::new();
    for f in files(&d)
        .into_iter()
        .filter(|f| f.ends_with(".safetensors"))
    {
        if let Err(e) = std::fs::read(d.join(&f)) {
            assert_eq!(e.raw_os_error(), Some(libc::EIO), "{f}: {e}");
            failed.push(f);
        }
    }
    assert_eq!(failed.len(), 1, "{failed:?}");
    let shard = &failed[0];
    assert!(std::fs::read(d.join("config.json")).is_ok());
    let log = g.log_text();
    assert!(
        log.contains("read error (EIO)") && log.contains(shard.as_str()) && log.contains(&tensor),
        "{log}"
    );
}
