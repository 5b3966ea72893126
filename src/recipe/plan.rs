//! The plan: for every unit of the child (a weight and its companion: FP8 `_scale_inv`, or
//! MXFP4 `_scales` beside `_blocks`), where its
//! bytes come from. Subset, rules and dtypes are decided up front; δ lazily, at first use.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::model::dtype::DType;
use crate::model::models::{Models, MX_BLOCKS_SUFFIX, MX_SCALES_SUFFIX, SCALE_SUFFIX};
use crate::recipe::stats::StatsStore;
use crate::recipe::{layer_of, Group, Recipe};

/// A weight and its companion, as the base names them.
#[derive(Clone, Debug)]
pub struct Unit {
    /// The weight's name.
    pub weight: String,
    /// The base's companion, if any: `X_scale_inv` of `X`, or `X_scales` of `X_blocks`.
    pub scale: Option<String>,
    /// Its group (DESIGN §2).
    pub group: Group,
    /// Its decoder layer, if any.
    pub layer: Option<u32>,
}

/// Where a unit's bytes come from.
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    /// The base's bytes.
    Base,
    /// Model k's bytes, verbatim (one-hot weights, same dtype as the base).
    Donor(usize),
    /// Computed: Σ w_i · dequantized W_i in f32, requantized to the base's dtype.
    Mix(Arc<[f32]>),
}

/// What the recipe wants of a unit, before δ.
#[derive(Clone, Debug, PartialEq)]
pub enum Intent {
    /// Not selected, not mixable, or weight 1 on the base: the base's bytes, no statistic needed.
    Base,
    /// Selected: this source if the δ statistic exceeds δ, else the base.
    Selected(Source),
}

/// The units of a base checkpoint and a name index over them: the same for every recipe over
/// one set of models, so an engine builds it once and every variant shares it.
pub struct UnitIndex {
    /// Units sorted by weight name.
    pub units: Vec<Unit>,
    /// tensor name → (unit, is the companion).
    lookup: HashMap<String, (u32, bool)>,
}

impl UnitIndex {
    /// Indexes the units of `models`' base.
    pub fn new(models: &Models) -> UnitIndex {
        let units = units_of(models);
        let mut lookup = HashMap::with_capacity(units.len() * 2);
        for (i, u) in units.iter().enumerate() {
            lookup.insert(u.weight.clone(), (i as u32, false));
            if let Some(s) = &u.scale {
                lookup.insert(s.clone(), (i as u32, true));
            }
        }
        UnitIndex { units, lookup }
    }
}

/// The decisions for every unit of one child.
pub struct Plan {
    /// The units (shared by every plan over the same models).
    pub index: Arc<UnitIndex>,
    /// The distinct intents of this recipe (a handful: base, donors, a few weight vectors).
    intents: Vec<Intent>,
    /// Per unit, its intent's index: a few bytes per unit, so a sweep's many variants of a
    /// 92k-tensor model stay small.
    intent_of: Vec<u16>,
    /// Per unit: 0 undecided, 1 the base, 2 its intent.
    decided: Vec<AtomicU8>,
    /// Striped locks making each unit's δ decision single-flight.
    locks: Vec<Mutex<()>>,
    delta: f64,
    metric: crate::recipe::Metric,
}

/// The units of a checkpoint: each `X_scale_inv` whose `X` exists joins `X`, and each
/// `X_scales` whose `X_blocks` exists joins `X_blocks`.
pub(crate) fn units_of(models: &Models) -> Vec<Unit> {
    let base = models.base();
    let mut names: Vec<&str> = base
        .shards
        .iter()
        .flat_map(|s| s.tensors.iter().map(|t| t.name.as_str()))
        .collect();
    names.sort_unstable();
    let mut units = Vec::new();
    for name in &names {
        if let Some(w) = name.strip_suffix(SCALE_SUFFIX) {
            if base.get(w).is_some() {
                continue;
            }
        }
        // MXFP4: `X_scales` joins `X_blocks`.
        if let Some(stem) = name.strip_suffix(MX_SCALES_SUFFIX) {
            if base.get(&format!("{stem}{MX_BLOCKS_SUFFIX}")).is_some() {
                continue;
            }
        }
        let scale = match name.strip_suffix(MX_BLOCKS_SUFFIX) {
            Some(stem) => format!("{stem}{MX_SCALES_SUFFIX}"),
            None => format!("{name}{SCALE_SUFFIX}"),
        };
        let scale = base.get(&scale).map(|_| scale);
        units.push(Unit {
            weight: name.to_string(),
            scale,
            group: Group::of(name),
            layer: layer_of(name),
        });
    }
    units
}

impl Plan {
    /// Decides subset, rules and dtypes for every unit and checks that every selected unit can
    /// be built: present in every model, same shape, mixable dtypes, consistent block scales.
    pub fn new(recipe: &Recipe, models: &Models, index: Arc<UnitIndex>) -> Result<Plan> {
        if models.list.len() != recipe.models() {
            return Err(Error::Internal {
                what: "models do not match the recipe".into(),
            });
        }
        let mut intents: Vec<Intent> = vec![Intent::Base];
        let mut intent_of = Vec::with_capacity(index.units.len());
        // Units the subset selects that can be mixed, and the rules that meet one of them.
        let mut selected = 0usize;
        let mut rule_used = vec![false; recipe.rules.len()];
        for u in &index.units {
            if recipe.selects(&u.weight, u.group) && models.source(0, &u.weight)?.mixable() {
                selected += 1;
                for (used, r) in rule_used.iter_mut().zip(&recipe.rules) {
                    *used |= r.regex.is_match(&u.weight);
                }
            }
            let i = intent(recipe, models, u)?;
            let k = match intents.iter().position(|x| *x == i) {
                Some(k) => k,
                None => {
                    intents.push(i);
                    intents.len() - 1
                }
            };
            // Rules are few; more distinct intents than u16 holds would be a recipe of
            // tens of thousands of rules.
            intent_of.push(u16::try_from(k).map_err(|_| Error::BadRecipe {
                reason: "too many distinct per-tensor weights".into(),
            })?);
        }
        if !recipe.allow_empty {
            if selected == 0 {
                return Err(Error::EmptySelection {
                    asked: format!("subset {}", subset_text(recipe)),
                    groups: group_counts(&index),
                });
            }
            if let Some(r) = rule_used
                .iter()
                .zip(&recipe.rules)
                .find_map(|(used, r)| (!used).then_some(r))
            {
                return Err(Error::UnusedRule {
                    pattern: r.regex.as_str().to_string(),
                });
            }
        }
        let decided = index.units.iter().map(|_| AtomicU8::new(0)).collect();
        let locks = (0..64).map(|_| Mutex::new(())).collect();
        Ok(Plan {
            index,
            intents,
            intent_of,
            decided,
            locks,
            delta: recipe.delta,
            metric: recipe.metric,
        })
    }

    /// The units, sorted by weight name.
    pub fn units(&self) -> &[Unit] {
        &self.index.units
    }

    /// The unit a tensor belongs to, and whether it is the companion.
    pub fn unit_of(&self, tensor: &str) -> Option<(usize, bool)> {
        self.index.lookup.get(tensor).map(|&(u, s)| (u as usize, s))
    }

    /// Where unit `u`'s bytes come from; the first call for a selected unit computes (or looks
    /// up) its δ statistic. Concurrent callers for one unit wait for a single computation.
    pub fn source(&self, u: usize, models: &Models, stats: &StatsStore) -> Result<Source> {
        let want = match self.intent(u) {
            Intent::Base => return Ok(Source::Base),
            Intent::Selected(s) => s,
        };
        let (Some(cell), Some(lock)) = (
            self.decided.get(u),
            self.locks.get(u % self.locks.len().max(1)),
        ) else {
            return Ok(Source::Base);
        };
        let known = |d: u8| match d {
            1 => Some(Source::Base),
            2 => Some(want.clone()),
            _ => None,
        };
        if let Some(s) = known(cell.load(Ordering::Acquire)) {
            return Ok(s);
        }
        let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = known(cell.load(Ordering::Acquire)) {
            return Ok(s);
        }
        let name = &self.index.units[u].weight;
        let above = if self.delta == 0.0 && self.metric == crate::recipe::Metric::Stored {
            // δ = 0 needs only the statistic's sign: one compare pass, no f64 squares.
            stats.above_zero(models, name)?
        } else {
            // NaN is never above δ: such units keep the base.
            stats.max_over_parents(models, name, self.metric)? > self.delta
        };
        cell.store(if above { 2 } else { 1 }, Ordering::Release);
        Ok(if above { want.clone() } else { Source::Base })
    }

    /// Whether δ kept the base's bytes for every unit the recipe wanted changed (there is at
    /// least one; all decided): the child would silently be the base. Decides nothing itself.
    pub fn nothing_above_delta(&self) -> bool {
        let mut wanted = false;
        for (k, d) in self.intent_of.iter().zip(&self.decided) {
            if matches!(self.intents.get(*k as usize), Some(Intent::Selected(_))) {
                match d.load(Ordering::Acquire) {
                    1 => wanted = true,
                    _ => return false,
                }
            }
        }
        wanted
    }

    /// The error for a recipe whose δ selected nothing (see [`Plan::nothing_above_delta`]).
    pub fn empty_by_delta(&self, recipe: &Recipe) -> Error {
        Error::EmptySelection {
            asked: format!("delta {} over subset {}", recipe.delta, subset_text(recipe)),
            groups: group_counts(&self.index),
        }
    }

    /// What the recipe wants of unit `u`, before δ.
    pub fn intent(&self, u: usize) -> &Intent {
        let k = self.intent_of.get(u).copied().unwrap_or(0) as usize;
        self.intents.get(k).unwrap_or(&Intent::Base)
    }
}

/// The subset as the user would write it (`experts+router`).
fn subset_text(recipe: &Recipe) -> String {
    let items: Vec<String> = recipe.subset.iter().map(|s| s.text()).collect();
    items.join("+")
}

/// Tensors (weights and companions) per group of the base, in group order.
fn group_counts(index: &UnitIndex) -> Vec<(String, usize)> {
    let mut counts = std::collections::BTreeMap::new();
    for u in &index.units {
        *counts.entry(u.group).or_insert(0usize) += 1 + usize::from(u.scale.is_some());
    }
    counts
        .into_iter()
        .map(|(g, n)| (g.name().to_string(), n))
        .collect()
}

fn intent(recipe: &Recipe, models: &Models, u: &Unit) -> Result<Intent> {
    if !recipe.selects(&u.weight, u.group) {
        return Ok(Intent::Base);
    }
    let base = models.source(0, &u.weight)?;
    if !base.mixable() {
        return Ok(Intent::Base);
    }
    let w64 = recipe.weights_for(&u.weight);
    let w: Vec<f32> = w64.iter().map(|&x| x as f32).collect();
    if w.first() == Some(&1.0) && w.iter().skip(1).all(|&x| x == 0.0) {
        return Ok(Intent::Base);
    }
    let mut srcs = Vec::with_capacity(w.len());
    for i in 0..w.len() {
        let s = models.source(i, &u.weight)?;
        if !s.mixable() {
            return Err(Error::UnsupportedDtype {
                path: s.shard.path.clone(),
                tensor: u.weight.clone(),
                dtype: s.info.dtype.to_string(),
            });
        }
        if s.info.dtype == DType::F8E4M3 && s.info.shape.len() != 2 && s.scale.is_some() {
            return Err(Error::BadTensor {
                path: s.shard.path.clone(),
                tensor: u.weight.clone(),
                reason: "FP8 weights with block scales must be 2-D".into(),
            });
        }
        srcs.push(s);
    }
    let hot: Vec<usize> = (0..w.len()).filter(|&i| w[i] != 0.0).collect();
    if let [k] = hot[..] {
        let s = &srcs[k];
        // The donor's bytes verbatim, companion included: it must store the weight in the
        // base's dtype and, when the base has a companion, one of the same dtype and shape.
        let companion_ok = match &u.scale {
            None => true,
            Some(c) => match (
                models.base().get(c),
                models.list.get(k).and_then(|m| m.get(c)),
            ) {
                (Some((_, bt)), Some((_, dt))) => bt.dtype == dt.dtype && bt.shape == dt.shape,
                _ => false,
            },
        };
        if w[k] == 1.0 && s.info.dtype == base.info.dtype && companion_ok {
            return Ok(Intent::Selected(Source::Donor(k)));
        }
    }
    Ok(Intent::Selected(Source::Mix(w.into())))
}
