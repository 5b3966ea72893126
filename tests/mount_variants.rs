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
