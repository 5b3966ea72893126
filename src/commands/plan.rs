//! `aoe plan`: what a recipe does, per tensor group, in tensors and bytes.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use rayon::prelude::*;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::recipe::Group;
use crate::synth::{Child, TensorBytes};

/// Where a unit's bytes come from, as counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Origin {
    /// Base bytes.
    Base,
    /// A donor's bytes, verbatim.
    Donor,
    /// Computed.
    Mixed,
}

/// Tensors and bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Tensors (weights and their scale companions).
    pub tensors: u64,
    /// Bytes.
    pub bytes: u64,
}

/// Per group, per origin.
#[derive(Clone, Debug, Default)]
pub struct PlanReport {
    /// group → [base, donor, mixed].
    pub groups: BTreeMap<Group, [Tally; 3]>,
}

/// Decides every unit of `child` (computing missing δ statistics on `threads` threads) and
/// tallies the result.
pub fn plan_report(child: &Child, threads: usize) -> Result<PlanReport> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build()
        .map_err(|e| Error::Threads {
            reason: e.to_string(),
        })?;
    let base = child.engine.models.base();
    // Per tensor, as the layout serves it: a companion that stays the base's under a mix
    // counts as the base's.
    let decided: Vec<Vec<(Group, Origin, Tally)>> = pool.install(|| {
        (0..child.plan.units().len())
            .into_par_iter()
            .map(|u| {
                let unit = &child.plan.units()[u];
                let mut out = Vec::with_capacity(2);
                for name in std::iter::once(&unit.weight).chain(unit.scale.iter()) {
                    let Some((shard, info)) = base.get(name) else {
                        continue;
                    };
                    let origin = match child.tensor_bytes(shard, info)? {
                        TensorBytes::Verbatim(from, _) if std::ptr::eq(from, shard) => Origin::Base,
                        TensorBytes::Verbatim(..) => Origin::Donor,
                        TensorBytes::Mixed { .. } => Origin::Mixed,
                    };
                    let t = Tally {
                        tensors: 1,
                        bytes: info.len,
                    };
                    out.push((unit.group, origin, t));
                }
                Ok(out)
            })
            .collect::<Result<Vec<_>>>()
    })?;
    if !child.recipe.allow_empty && child.plan.nothing_above_delta() {
        return Err(child.plan.empty_by_delta(&child.recipe));
    }
    let mut report = PlanReport::default();
    for (g, o, t) in decided.into_iter().flatten() {
        let e = &mut report.groups.entry(g).or_default()[o as usize];
        e.tensors += t.tensors;
        e.bytes += t.bytes;
    }
    Ok(report)
}

fn gb(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
    } else if b >= 1 << 20 {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", b as f64 / 1024.0)
    }
}

impl PlanReport {
    fn total(&self) -> [Tally; 3] {
        let mut t = [Tally::default(); 3];
        for v in self.groups.values() {
            for i in 0..3 {
                t[i].tensors += v[i].tensors;
                t[i].bytes += v[i].bytes;
            }
        }
        t
    }

    /// A human-readable table.
    pub fn to_table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<16} {:>8} {:>12} {:>8} {:>12} {:>8} {:>12}",
            "group", "base", "bytes", "donor", "bytes", "mixed", "bytes"
        );
        let mut rows: Vec<(String, [Tally; 3])> = self
            .groups
            .iter()
            .map(|(g, v)| (g.name().to_string(), *v))
            .collect();
        rows.push(("total".into(), self.total()));
        for (name, v) in rows {
            let _ = writeln!(
                s,
                "{:<16} {:>8} {:>12} {:>8} {:>12} {:>8} {:>12}",
                name,
                v[0].tensors,
                gb(v[0].bytes),
                v[1].tensors,
                gb(v[1].bytes),
                v[2].tensors,
                gb(v[2].bytes)
            );
        }
        s
    }

    /// JSON for scripts: {"groups": {group: {base|donor|mixed: {tensors, bytes}}}, "total": ...}.
    pub fn to_json(&self) -> String {
        let one = |v: &[Tally; 3]| {
            json!({
                "base": {"tensors": v[0].tensors, "bytes": v[0].bytes},
                "donor": {"tensors": v[1].tensors, "bytes": v[1].bytes},
                "mixed": {"tensors": v[2].tensors, "bytes": v[2].bytes},
            })
        };
        let groups: serde_json::Map<String, Value> = self
            .groups
            .iter()
            .map(|(g, v)| (g.name().to_string(), one(v)))
            .collect();
        let v = json!({"groups": groups, "total": one(&self.total())});
        let mut s = serde_json::to_string_pretty(&v).unwrap_or_default();
        s.push('\n');
        s
    }
}
