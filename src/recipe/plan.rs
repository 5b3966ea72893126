//! The plan: for every unit of the child (a weight and its companion: FP8 `_scale_inv`, or
//! MXFP4 `_scales` beside `_blocks`), where its bytes come from. Subset, rules and dtypes are
//! decided up front ([`Plan::new`], for `aoe write`, `aoe plan` and a single-recipe mount) or
//! at a unit's first use ([`Plan::lazy`], for variants created by lookup: no pass over the
//! model's units); δ always at first use.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::error::{Error, Result};
use crate::model::dtype::DType;
use crate::model::models::{Models, MX_BLOCKS_SUFFIX, MX_SCALES_SUFFIX, SCALE_SUFFIX};
use crate::recipe::stats::StatsStore;
use crate::recipe::{layer_of, Group, Recipe, Rule, SubsetItem};

/// A weight and its companion, as the base names them.
#[derive(Clone, Debug)]
pub struct Unit {
    /// The weight's name.
    pub weight: String,
    /// The base's companion, if any: `X_scale_inv` of `X`, or `X_scales` of `X_blocks`.
    pub scale: Option<String>,
    /// Its group (docs/semantics.md, "Groups").
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
    /// Per unit: whether the base stores its weight in a mixable dtype (only such units count
    /// as selected).
    mixable: Vec<bool>,
    /// Per group: units whose base weight is mixable (a group subset is checked in O(1)).
    mixable_per_group: BTreeMap<Group, usize>,
    /// Tensors (weights and companions) per group, for [`Error::EmptySelection`].
    group_tensors: Vec<(String, usize)>,
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
        let mixable: Vec<bool> = units
            .iter()
            .map(|u| models.source(0, &u.weight).is_ok_and(|s| s.mixable()))
            .collect();
        let mut mixable_per_group = BTreeMap::new();
        for (u, m) in units.iter().zip(&mixable) {
            *mixable_per_group.entry(u.group).or_insert(0usize) += usize::from(*m);
        }
        let mut index = UnitIndex {
            units,
            lookup,
            mixable,
            mixable_per_group,
            group_tensors: Vec::new(),
        };
        index.group_tensors = group_counts(&index);
        index
    }

    /// Whether the recipe's subset selects at least one unit with a mixable base weight:
    /// O(groups) for `full` and group subsets; a `re:` item scans the unit names until its
    /// first match (a full scan, one regex search per unit, only when it matches nothing).
    fn selects_any(&self, recipe: &Recipe) -> bool {
        recipe.subset.iter().any(|item| match item {
            SubsetItem::Full => self.mixable_per_group.values().any(|&n| n > 0),
            SubsetItem::Group(g) => self.mixable_per_group.get(g).is_some_and(|&n| n > 0),
            SubsetItem::Regex(r) => self
                .units
                .iter()
                .zip(&self.mixable)
                .any(|(u, &m)| m && r.is_match(&u.weight)),
        })
    }

    /// The first rule that meets no selected unit with a mixable base weight, if any: one pass
    /// over the units that stops once every rule has met one (a full scan only when a rule
    /// meets nothing, i.e. when the recipe is refused).
    fn unused_rule<'r>(&self, recipe: &'r Recipe) -> Option<&'r Rule> {
        let mut unused: Vec<&Rule> = recipe.rules.iter().collect();
        for (u, &m) in self.units.iter().zip(&self.mixable) {
            if unused.is_empty() {
                return None;
            }
            if m && recipe.selects(&u.weight, u.group) {
                unused.retain(|r| !r.regex.is_match(&u.weight));
            }
        }
        unused.first().copied()
    }
}

/// The decisions for every unit of one child.
pub struct Plan {
    /// The units (shared by every plan over the same models).
    pub index: Arc<UnitIndex>,
    /// The distinct intents of this recipe (a handful: base, donors, a few weight vectors);
    /// only ever appended to.
    intents: RwLock<Vec<Intent>>,
    /// Per unit, its intent's index plus one (0: not computed yet, in a lazy plan): a few bytes
    /// per unit, so a sweep's many variants of a 92k-tensor model stay small.
    intent_of: Vec<AtomicU16>,
    /// A lazy plan's recipe, from which a unit's intent is computed at its first use.
    lazy: Option<Recipe>,
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
        let mut intent_of: Vec<AtomicU16> = Vec::with_capacity(index.units.len());
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
            intent_of.push(AtomicU16::new(intent_code(k)?));
        }
        if !recipe.allow_empty {
            if selected == 0 {
                return Err(Error::EmptySelection {
                    asked: format!("subset {}", subset_text(recipe)),
                    groups: index.group_tensors.clone(),
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
            intents: RwLock::new(intents),
            intent_of,
            lazy: None,
            decided,
            locks,
            delta: recipe.delta,
            metric: recipe.metric,
        })
    }

    /// A plan whose per-unit decisions wait for each unit's first use, for variants created
    /// by lookup: no work per unit beyond zeroed memory. The checks that need no per-unit
    /// pass stay here (the subset selects something, every rule meets a selected unit: see
    /// [`UnitIndex`]'s counts); a unit that cannot be built (missing in a parent, shape or
    /// dtype mismatch) fails its first read instead of the plan, with the same error.
    pub fn lazy(recipe: &Recipe, models: &Models, index: Arc<UnitIndex>) -> Result<Plan> {
        if models.list.len() != recipe.models() {
            return Err(Error::Internal {
                what: "models do not match the recipe".into(),
            });
        }
        if !recipe.allow_empty {
            if !index.selects_any(recipe) {
                return Err(Error::EmptySelection {
                    asked: format!("subset {}", subset_text(recipe)),
                    groups: index.group_tensors.clone(),
                });
            }
            if let Some(r) = index.unused_rule(recipe) {
                return Err(Error::UnusedRule {
                    pattern: r.regex.as_str().to_string(),
                });
            }
        }
        let n = index.units.len();
        let zeroed = |_| AtomicU16::new(0);
        Ok(Plan {
            intents: RwLock::new(vec![Intent::Base]),
            intent_of: (0..n).map(zeroed).collect(),
            lazy: Some(recipe.clone()),
            decided: (0..n).map(|_| AtomicU8::new(0)).collect(),
            locks: (0..64).map(|_| Mutex::new(())).collect(),
            index,
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
        let want = match self.intent(u, models)? {
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
        let intents = self.intents.read().unwrap_or_else(|e| e.into_inner());
        let mut wanted = false;
        for (k, d) in self.intent_of.iter().zip(&self.decided) {
            let k = k.load(Ordering::Acquire);
            if k == 0 {
                // Not computed yet (a lazy plan): not decided either.
                return false;
            }
            if matches!(intents.get(k as usize - 1), Some(Intent::Selected(_))) {
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
            groups: self.index.group_tensors.clone(),
        }
    }

    /// What the recipe wants of unit `u`, before δ; a lazy plan computes it at the first call
    /// (an error, such as a shape mismatch, is returned again at every call).
    pub fn intent(&self, u: usize, models: &Models) -> Result<Intent> {
        let Some(cell) = self.intent_of.get(u) else {
            return Ok(Intent::Base);
        };
        let k = cell.load(Ordering::Acquire);
        if k > 0 {
            let intents = self.intents.read().unwrap_or_else(|e| e.into_inner());
            return Ok(intents.get(k as usize - 1).cloned().unwrap_or(Intent::Base));
        }
        let (Some(recipe), Some(unit)) = (&self.lazy, self.index.units.get(u)) else {
            return Ok(Intent::Base);
        };
        let i = intent(recipe, models, unit)?;
        let mut intents = self.intents.write().unwrap_or_else(|e| e.into_inner());
        let k = match intents.iter().position(|x| *x == i) {
            Some(k) => k,
            None => {
                intents.push(i.clone());
                intents.len() - 1
            }
        };
        cell.store(intent_code(k)?, Ordering::Release);
        Ok(i)
    }
}

/// The stored code of intent `k` (its index plus one). Rules are few; more distinct intents
/// than u16 holds would be a recipe of tens of thousands of rules.
fn intent_code(k: usize) -> Result<u16> {
    u16::try_from(k + 1)
        .ok()
        .filter(|&c| c < u16::MAX)
        .ok_or_else(|| Error::BadRecipe {
            reason: "too many distinct per-tensor weights".into(),
        })
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
