//! `aoe plan`: per group, tensors and bytes from the base, from a donor verbatim, or mixed.

mod common;

use aoe::model::checkpoint::Checkpoint;
use aoe::recipe::Group;
use aoe::testkit::FixtureDType;
use common::*;

fn plan_json(args: &[&str]) -> serde_json::Value {
    let mut full = vec!["plan", "--json"];
    full.extend_from_slice(args);
    let out = aoe_ok(&full);
    serde_json::from_slice(&out.stdout).expect("plan --json prints JSON")
}

#[test]
fn chimera_plan_takes_experts_from_the_donor_and_the_rest_from_the_base() {
    let tmp = tempdir();
    let m = family(tmp.path(), FixtureDType::Fp8, 2, 31);
    let cache = tmp.path().join("stats");
    let v = plan_json(&[
        "--base",
        s(&m[0]),
        "--parent",
        s(&m[1]),
        "--subset",
        "experts",
        "--weights",
        "0,1",
        "--cache-dir",
        s(&cache),
    ]);

    // Count independently from the base's tensor list: an expert unit comes from the donor
    // unless its weight is identical in both (difference 0, not above δ = 0).
    let base = Checkpoint::open(&m[0]).unwrap();
    let donor = Checkpoint::open(&m[1]).unwrap();
    let (mut expert_tensors, mut expert_bytes, mut other_tensors, mut other_bytes) =
        (0u64, 0u64, 0u64, 0u64);
    let mut identical = 0;
    for t in base.shards.iter().flat_map(|s| &s.tensors) {
        let weight = t.name.strip_suffix("_scale_inv").unwrap_or(&t.name);
        let same = base.bytes(weight).unwrap().unwrap() == donor.bytes(weight).unwrap().unwrap();
        identical += same as u32;
        if t.name.contains(".mlp.experts.") && !same {
            expert_tensors += 1;
            expert_bytes += t.len;
        } else {
            other_tensors += 1;
            other_bytes += t.len;
        }
    }
    let total = &v["total"];
    assert_eq!(total["donor"]["tensors"], expert_tensors);
    assert_eq!(total["donor"]["bytes"], expert_bytes);
    assert_eq!(total["base"]["tensors"], other_tensors);
    assert_eq!(total["base"]["bytes"], other_bytes);
    assert_eq!(total["mixed"]["tensors"], 0);
    assert!(identical > 0, "the fixture has identical tensors");
    assert_eq!(v["groups"]["attention"]["donor"]["tensors"], 0);
}

#[test]
fn plan_follows_delta_and_names_every_group() {
    let tmp = tempdir();
    let m = family(tmp.path(), FixtureDType::Fp8, 2, 32);
    let cache = tmp.path().join("stats");
    let (b, p, c) = (s(&m[0]), s(&m[1]), s(&cache));
    let all = plan_json(&[
        "--base",
        b,
        "--parent",
        p,
        "--lambda",
        "0.5",
        "--cache-dir",
        c,
    ]);
    let none = plan_json(&[
        "--base",
        b,
        "--parent",
        p,
        "--lambda",
        "0.5",
        "--delta",
        "1e9",
        // δ above every difference selects nothing: refused unless allowed.
        "--allow-empty",
        "--cache-dir",
        c,
    ]);
    assert_eq!(none["total"]["mixed"]["tensors"], 0);
    assert_eq!(
        none["total"]["base"]["bytes"],
        all["total"]["base"]["bytes"].as_u64().unwrap()
            + all["total"]["mixed"]["bytes"].as_u64().unwrap()
    );
    // With δ = 0 only tensors identical in both parents stay the base's.
    assert!(all["total"]["mixed"]["tensors"].as_u64().unwrap() > 0);
    let table = String::from_utf8(
        aoe_ok(&[
            "plan",
            "--base",
            b,
            "--parent",
            p,
            "--lambda",
            "0.5",
            "--cache-dir",
            c,
        ])
        .stdout,
    )
    .unwrap();
    for g in Group::ALL {
        if all["groups"].get(g.name()).is_some() {
            assert!(table.contains(g.name()), "table lacks {g}:\n{table}");
        }
    }
    assert!(table.contains("total"));
}
