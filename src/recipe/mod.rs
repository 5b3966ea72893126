//! Recipes: which parents, with which weights, over which tensors, above which δ.
//!
//! A [`RecipeSpec`] is what a user wrote (flags, a JSON file, a variant name), every field
//! optional so that flags can override a file. [`Recipe`] is the validated, resolved form.

mod groups;
pub mod plan;
pub mod stats;

pub(crate) use groups::layer_of;
pub use groups::Group;

use std::path::{Path, PathBuf};

use regex::Regex;
use serde_json::{json, Map, Value};

use crate::error::{Error, Result};

/// The file a child carries its recipe in.
pub const RECIPE_FILE: &str = "aoe_recipe.json";

/// The statistic δ is compared against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Metric {
    /// Stored values: FP8 codes as floats without their block scales.
    Stored,
    /// Dequantized values: codes times block scales.
    Dequantized,
}

impl Metric {
    /// The name used in flags and files.
    pub fn name(self) -> &'static str {
        match self {
            Metric::Stored => "stored",
            Metric::Dequantized => "dequantized",
        }
    }

    /// Parses a metric name.
    pub fn parse(s: &str) -> Result<Metric> {
        match s {
            "stored" => Ok(Metric::Stored),
            "dequantized" => Ok(Metric::Dequantized),
            _ => Err(Error::BadRecipe {
                reason: format!("unknown metric {s:?}: use stored or dequantized"),
            }),
        }
    }
}

/// One member of the subset union.
#[derive(Clone, Debug)]
pub enum SubsetItem {
    /// Every tensor.
    Full,
    /// One group.
    Group(Group),
    /// Weights whose name matches (search semantics).
    Regex(Regex),
}

impl SubsetItem {
    /// Parses `full`, a group name or `re:REGEX`.
    pub fn parse(s: &str) -> Result<SubsetItem> {
        if s == "full" {
            return Ok(SubsetItem::Full);
        }
        if let Some(pat) = s.strip_prefix("re:") {
            return Ok(SubsetItem::Regex(compile(pat)?));
        }
        Group::parse(s)
            .map(SubsetItem::Group)
            .ok_or_else(|| Error::UnknownSubset {
                name: s.to_string(),
            })
    }

    /// The textual form, as parsed.
    pub fn text(&self) -> String {
        match self {
            SubsetItem::Full => "full".into(),
            SubsetItem::Group(g) => g.name().into(),
            SubsetItem::Regex(r) => format!("re:{}", r.as_str()),
        }
    }

    fn contains(&self, name: &str, group: Group) -> bool {
        match self {
            SubsetItem::Full => true,
            SubsetItem::Group(g) => *g == group,
            SubsetItem::Regex(r) => r.is_match(name),
        }
    }
}

fn compile(pat: &str) -> Result<Regex> {
    Regex::new(pat).map_err(|e| {
        // regex's messages draw a caret diagram over several lines; keep the last, the reason.
        let text = e.to_string();
        let reason = text
            .lines()
            .last()
            .unwrap_or_default()
            .trim_start_matches("error: ")
            .to_string();
        Error::BadRegex {
            pattern: pat.to_string(),
            reason,
        }
    })
}

/// Per-tensor weights: the first rule whose pattern matches a selected weight's name wins.
#[derive(Clone, Debug)]
pub struct Rule {
    /// The compiled pattern (search semantics).
    pub regex: Regex,
    /// One weight per model, base first.
    pub weights: Vec<f64>,
}

impl Rule {
    /// Parses `REGEX=W1,W2,...` (the last `=` separates, so patterns may contain `=`).
    pub fn parse(s: &str) -> Result<Rule> {
        let (pat, ws) = s.rsplit_once('=').ok_or_else(|| Error::BadRecipe {
            reason: format!("rule {s:?} is not of the form REGEX=W1,W2,..."),
        })?;
        Ok(Rule {
            regex: compile(pat)?,
            weights: parse_weights(ws, &format!("rule {s:?}"))?,
        })
    }
}

/// Parses `W1,W2,...` (or `W1:W2:...`, as in variant names).
pub fn parse_weights(s: &str, context: &str) -> Result<Vec<f64>> {
    s.split([',', ':'])
        .map(|w| {
            w.trim().parse::<f64>().map_err(|_| Error::BadRecipe {
                reason: format!("{context}: {w:?} is not a number"),
            })
        })
        .collect()
}

/// A recipe as written: every field optional, so that a later source can override an earlier.
#[derive(Clone, Debug, Default)]
pub struct RecipeSpec {
    /// M1: unselected tensors and the child's layout come from it.
    pub base: Option<PathBuf>,
    /// M2, M3, ...
    pub parents: Option<Vec<PathBuf>>,
    /// Two models: weights (1−λ, λ).
    pub lambda: Option<f64>,
    /// One weight per model, base first.
    pub weights: Option<Vec<f64>>,
    /// Threshold on the normalized difference.
    pub delta: Option<f64>,
    /// Subset union, as text.
    pub subset: Option<Vec<String>>,
    /// Rules as `REGEX=W1,...` text.
    pub rules: Option<Vec<String>>,
    /// Metric name.
    pub metric: Option<String>,
    /// Permit weights outside the simplex.
    pub allow_extrapolation: Option<bool>,
    /// Permit a subset, rule or δ that selects nothing (the child is then the base).
    pub allow_empty: Option<bool>,
}

impl RecipeSpec {
    /// Reads a recipe JSON file (the format of `aoe_recipe.json`).
    pub fn from_file(path: &Path) -> Result<RecipeSpec> {
        let text = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let v: Value = serde_json::from_slice(&text).map_err(|e| Error::BadRecipe {
            reason: format!("{}: not valid JSON: {e}", path.display()),
        })?;
        RecipeSpec::from_json(&v).map_err(|e| match e {
            Error::BadRecipe { reason } => Error::BadRecipe {
                reason: format!("{}: {reason}", path.display()),
            },
            other => other,
        })
    }

    /// Reads a recipe from JSON; unknown keys are refused so typos do not pass silently.
    pub fn from_json(v: &Value) -> Result<RecipeSpec> {
        let bad = |reason: String| Error::BadRecipe { reason };
        let obj = v
            .as_object()
            .ok_or_else(|| bad("a recipe is a JSON object".into()))?;
        let mut spec = RecipeSpec::default();
        let num = |k: &str, v: &Value| {
            v.as_f64()
                .ok_or_else(|| bad(format!("{k:?} must be a number")))
        };
        let nums = |k: &str, v: &Value| -> Result<Vec<f64>> {
            v.as_array()
                .ok_or_else(|| bad(format!("{k:?} must be an array of numbers")))?
                .iter()
                .map(|x| {
                    x.as_f64()
                        .ok_or_else(|| bad(format!("{k:?} must be an array of numbers")))
                })
                .collect()
        };
        let strs = |k: &str, v: &Value| -> Result<Vec<String>> {
            if let Some(s) = v.as_str() {
                return Ok(vec![s.to_string()]);
            }
            v.as_array()
                .ok_or_else(|| bad(format!("{k:?} must be a string or an array of strings")))?
                .iter()
                .map(|x| {
                    x.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| bad(format!("{k:?} must hold strings")))
                })
                .collect()
        };
        for (k, val) in obj {
            match k.as_str() {
                "aoe_version" => {}
                "base" => spec.base = Some(strs(k, val)?.concat().into()),
                "parents" => {
                    spec.parents = Some(strs(k, val)?.into_iter().map(PathBuf::from).collect())
                }
                "lambda" => spec.lambda = Some(num(k, val)?),
                "weights" => spec.weights = Some(nums(k, val)?),
                "delta" => spec.delta = Some(num(k, val)?),
                "subset" => spec.subset = Some(strs(k, val)?),
                "metric" => spec.metric = Some(strs(k, val)?.concat()),
                "allow_extrapolation" => {
                    spec.allow_extrapolation = Some(val.as_bool().ok_or_else(|| {
                        bad("\"allow_extrapolation\" must be true or false".into())
                    })?)
                }
                "allow_empty" => {
                    spec.allow_empty = Some(
                        val.as_bool()
                            .ok_or_else(|| bad("\"allow_empty\" must be true or false".into()))?,
                    )
                }
                "rules" => {
                    let arr = val
                        .as_array()
                        .ok_or_else(|| bad("\"rules\" must be an array".into()))?;
                    let mut rules = Vec::new();
                    for r in arr {
                        if let Some(s) = r.as_str() {
                            rules.push(s.to_string());
                            continue;
                        }
                        let pat = r.get("pattern").and_then(Value::as_str);
                        let ws = r.get("weights").map(|w| nums("rules[].weights", w));
                        match (pat, ws) {
                            (Some(p), Some(ws)) => {
                                let ws: Vec<String> = ws?.iter().map(|w| w.to_string()).collect();
                                rules.push(format!("{p}={}", ws.join(",")));
                            }
                            _ => {
                                return Err(bad(
                                    "each rule needs \"pattern\" and \"weights\"".into()
                                ))
                            }
                        }
                    }
                    spec.rules = Some(rules);
                }
                other => return Err(bad(format!("unknown key {other:?}"))),
            }
        }
        Ok(spec)
    }

    /// Parses a variant name such as `lambda=0.6,subset=experts,delta=1.5` (keys as the flags,
    /// weights as `weights=0.2:0.3:0.5`, subsets joined with `+`).
    pub fn from_variant_name(name: &str) -> Result<RecipeSpec> {
        let bad = |reason: String| Error::BadRecipe {
            reason: format!("variant {name:?}: {reason}"),
        };
        let mut spec = RecipeSpec::default();
        for part in name.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("{part:?} is not key=value")))?;
            let num = || {
                v.parse::<f64>()
                    .map_err(|_| bad(format!("{k}: {v:?} is not a number")))
            };
            let flag = |k: &str| match v {
                "true" | "1" | "yes" => Ok(true),
                "false" | "0" | "no" => Ok(false),
                _ => Err(bad(format!("{k}: {v:?} is not true or false"))),
            };
            match k {
                "lambda" => spec.lambda = Some(num()?),
                "weights" => spec.weights = Some(parse_weights(v, name)?),
                "delta" => spec.delta = Some(num()?),
                "subset" => spec
                    .subset
                    .get_or_insert_with(Vec::new)
                    .extend(v.split('+').map(str::to_string)),
                "metric" => spec.metric = Some(v.to_string()),
                "allow-extrapolation" => spec.allow_extrapolation = Some(flag(k)?),
                "allow-empty" => spec.allow_empty = Some(flag(k)?),
                _ => {
                    return Err(bad(format!(
                        "unknown key {k:?} (use lambda, weights, delta, subset, metric)"
                    )))
                }
            }
        }
        Ok(spec)
    }

    /// Fields set in `over` replace those of `self`.
    pub fn merge(self, over: RecipeSpec) -> RecipeSpec {
        let weights_given = over.lambda.is_some() || over.weights.is_some();
        RecipeSpec {
            base: over.base.or(self.base),
            parents: over.parents.or(self.parents),
            lambda: if weights_given {
                over.lambda
            } else {
                self.lambda
            },
            weights: if weights_given {
                over.weights
            } else {
                self.weights
            },
            delta: over.delta.or(self.delta),
            subset: over.subset.or(self.subset),
            rules: over.rules.or(self.rules),
            metric: over.metric.or(self.metric),
            allow_extrapolation: over.allow_extrapolation.or(self.allow_extrapolation),
            allow_empty: over.allow_empty.or(self.allow_empty),
        }
    }

    /// Validates and resolves into a [`Recipe`]. Paths are made absolute but not opened.
    pub fn resolve(self) -> Result<Recipe> {
        let bad = |reason: &str| Error::BadRecipe {
            reason: reason.to_string(),
        };
        let base = self
            .base
            .ok_or_else(|| bad("no base model: give --base DIR"))?;
        let parents = self.parents.unwrap_or_default();
        if parents.is_empty() {
            return Err(bad("no parent to mix with: give --parent DIR (repeatable)"));
        }
        let n = parents.len() + 1;
        let allow = self.allow_extrapolation.unwrap_or(false);
        let weights = match (self.lambda, self.weights) {
            (Some(_), Some(_)) => return Err(bad("give either --lambda or --weights, not both")),
            (None, None) => {
                return Err(bad(
                    "no weights: give --lambda X (two models) or --weights W1,W2,...",
                ))
            }
            (Some(l), None) => {
                if n != 2 {
                    return Err(Error::BadRecipe {
                        reason: format!("--lambda needs exactly one parent besides the base, there are {}; use --weights", n - 1),
                    });
                }
                // λ as given; the base's share 1 − λ computed exactly in decimal from λ's
                // shortest round-trip form, so that `lambda=0.8` records (0.2, 0.8).
                let w = vec![one_minus(l), l];
                check_weights(&w, n, allow, "--lambda")?;
                w
            }
            (None, Some(w)) => {
                check_weights(&w, n, allow, "--weights")?;
                w
            }
        };
        let delta = self.delta.unwrap_or(0.0);
        if !delta.is_finite() || delta < 0.0 {
            return Err(bad("--delta must be a finite number ≥ 0"));
        }
        let subset_text = self
            .subset
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| vec!["full".into()]);
        let subset = subset_text
            .iter()
            .map(|s| SubsetItem::parse(s))
            .collect::<Result<Vec<_>>>()?;
        let mut rules = Vec::new();
        for r in self.rules.unwrap_or_default() {
            let rule = Rule::parse(&r)?;
            check_weights(&rule.weights, n, allow, &format!("rule {r:?}"))?;
            rules.push(rule);
        }
        let metric = Metric::parse(self.metric.as_deref().unwrap_or("stored"))?;
        let abs = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
        Ok(Recipe {
            base: abs(base),
            parents: parents.into_iter().map(abs).collect(),
            weights,
            delta,
            subset,
            rules,
            metric,
            allow_extrapolation: allow,
            allow_empty: self.allow_empty.unwrap_or(false),
        })
    }
}

/// `1 − x` computed exactly on the shortest decimal that round-trips to `x` (what Rust and
/// JSON print for it), then rounded once to f64: `one_minus(0.8)` is `0.2`, where `1.0 - 0.8`
/// is `0.19999999999999996`. Non-finite `x` gives `1.0 - x`.
pub fn one_minus(x: f64) -> f64 {
    if !x.is_finite() {
        return 1.0 - x;
    }
    // Display prints the shortest round-trip digits, never in exponent form.
    let text = format!("{}", x.abs());
    let (int, frac) = text.split_once('.').unwrap_or((&text, ""));
    // |x| = digits × 10^-scale, as a decimal digit string; 1 = 10^scale × 10^-scale.
    let digits: Vec<u8> = int.bytes().chain(frac.bytes()).map(|b| b - b'0').collect();
    let mut one = vec![0u8; digits.len().max(frac.len() + 1)];
    let at = one.len() - frac.len() - 1;
    one[at] = 1;
    let mut x_digits = vec![0u8; one.len() - digits.len()];
    x_digits.extend_from_slice(&digits);
    // 1 − x = 1 + |x| for negative x; otherwise the difference of the larger and the smaller.
    let (negative, mag) = if x.is_sign_negative() {
        (false, add_digits(&one, &x_digits))
    } else if x_digits <= one {
        (false, sub_digits(&one, &x_digits))
    } else {
        (true, sub_digits(&x_digits, &one))
    };
    let split = mag.len() - frac.len();
    let mut out = String::with_capacity(mag.len() + 2);
    if negative {
        out.push('-');
    }
    out.extend(mag[..split].iter().map(|d| char::from(b'0' + d)));
    out.push('.');
    out.extend(mag[split..].iter().map(|d| char::from(b'0' + d)));
    out.push('0');
    out.parse().unwrap_or(1.0 - x)
}

/// `a + b` for equally long big-endian decimal digit strings (one digit longer).
fn add_digits(a: &[u8], b: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; a.len() + 1];
    let mut carry = 0;
    for i in (0..a.len()).rev() {
        let d = a[i] + b[i] + carry;
        out[i + 1] = d % 10;
        carry = d / 10;
    }
    out[0] = carry;
    out
}

/// `a − b` for equally long big-endian decimal digit strings, `a ≥ b`.
fn sub_digits(a: &[u8], b: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; a.len()];
    let mut borrow = 0;
    for i in (0..a.len()).rev() {
        let (d, nb) = if a[i] >= b[i] + borrow {
            (a[i] - b[i] - borrow, 0)
        } else {
            (a[i] + 10 - b[i] - borrow, 1)
        };
        out[i] = d;
        borrow = nb;
    }
    out
}

fn check_weights(w: &[f64], n: usize, allow: bool, context: &str) -> Result<()> {
    if w.len() != n {
        return Err(Error::WeightCount {
            expected: n,
            got: w.len(),
            context: context.to_string(),
        });
    }
    if w.iter().any(|x| !x.is_finite()) {
        return Err(Error::NonFiniteWeight {
            context: context.to_string(),
        });
    }
    let sum: f64 = w.iter().sum();
    let convex = w.iter().all(|x| (0.0..=1.0).contains(x)) && (sum - 1.0).abs() <= 1e-6;
    if !convex && !allow {
        return Err(Error::NonConvexWeights {
            weights: w.to_vec(),
            context: context.to_string(),
        });
    }
    Ok(())
}

/// A validated recipe.
#[derive(Clone, Debug)]
pub struct Recipe {
    /// M1.
    pub base: PathBuf,
    /// M2, M3, ...
    pub parents: Vec<PathBuf>,
    /// One weight per model, base first.
    pub weights: Vec<f64>,
    /// Threshold on the normalized difference.
    pub delta: f64,
    /// Union of subset items.
    pub subset: Vec<SubsetItem>,
    /// Per-tensor weights.
    pub rules: Vec<Rule>,
    /// The statistic δ applies to.
    pub metric: Metric,
    /// Weights outside the simplex were permitted.
    pub allow_extrapolation: bool,
    /// A selection of nothing was permitted.
    pub allow_empty: bool,
}

impl Recipe {
    /// Number of models, base included.
    pub fn models(&self) -> usize {
        self.parents.len() + 1
    }

    /// Whether a weight (by name and group) is in the subset.
    pub fn selects(&self, name: &str, group: Group) -> bool {
        self.subset.iter().any(|s| s.contains(name, group))
    }

    /// The weights for a selected weight name: the first matching rule's, else the global ones.
    pub fn weights_for(&self, name: &str) -> &[f64] {
        self.rules
            .iter()
            .find(|r| r.regex.is_match(name))
            .map_or(&self.weights, |r| &r.weights)
    }

    /// The recipe as JSON: canonical key order, no timestamp, no output path, so that a mount
    /// and a written child of one recipe carry identical files. It is itself a valid recipe.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("aoe_version".into(), json!(env!("CARGO_PKG_VERSION")));
        m.insert("base".into(), json!(self.base.to_string_lossy()));
        m.insert(
            "parents".into(),
            json!(self
                .parents
                .iter()
                .map(|p| p.to_string_lossy())
                .collect::<Vec<_>>()),
        );
        m.insert("weights".into(), json!(self.weights));
        m.insert("delta".into(), json!(self.delta));
        m.insert(
            "subset".into(),
            json!(self.subset.iter().map(SubsetItem::text).collect::<Vec<_>>()),
        );
        let rules: Vec<Value> = self
            .rules
            .iter()
            .map(|r| json!({"pattern": r.regex.as_str(), "weights": r.weights}))
            .collect();
        m.insert("rules".into(), Value::Array(rules));
        m.insert("metric".into(), json!(self.metric.name()));
        m.insert(
            "allow_extrapolation".into(),
            json!(self.allow_extrapolation),
        );
        // Recorded only when set, so recipes that never used it keep their bytes.
        if self.allow_empty {
            m.insert("allow_empty".into(), json!(true));
        }
        Value::Object(m)
    }

    /// The bytes of `aoe_recipe.json`.
    pub fn file_bytes(&self) -> Vec<u8> {
        let mut s = serde_json::to_string_pretty(&self.to_json()).unwrap_or_default();
        s.push('\n');
        s.into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(base: &str, parents: &[&str]) -> RecipeSpec {
        RecipeSpec {
            base: Some(base.into()),
            parents: Some(parents.iter().map(PathBuf::from).collect()),
            ..Default::default()
        }
    }

    #[test]
    fn groups_follow_the_design_table() {
        let cases = [
            (
                "model.layers.3.mlp.experts.17.up_proj.weight",
                Group::Experts,
            ),
            (
                "model.layers.3.mlp.experts.17.up_proj.weight_scale_inv",
                Group::Experts,
            ),
            (
                "model.layers.1.block_sparse_moe.experts.0.w1.weight",
                Group::Experts,
            ),
            (
                "model.layers.3.mlp.shared_experts.down_proj.weight",
                Group::SharedExperts,
            ),
            ("model.layers.3.mlp.gate.weight", Group::Router),
            (
                "model.layers.3.mlp.gate.e_score_correction_bias",
                Group::Router,
            ),
            ("model.layers.0.input_layernorm.weight", Group::Norms),
            (
                "model.layers.0.self_attn.kv_a_layernorm.weight",
                Group::Norms,
            ),
            ("model.norm.weight", Group::Norms),
            ("model.layers.0.self_attn.q_b_proj.weight", Group::Attention),
            ("model.layers.0.mlp.gate_proj.weight", Group::DenseMlp),
            ("model.embed_tokens.weight", Group::Embeddings),
            ("lm_head.weight", Group::Embeddings),
            ("model.layers.61.shared_head.head.weight", Group::Embeddings),
            ("model.layers.61.eh_proj.weight", Group::Other),
        ];
        for (name, g) in cases {
            assert_eq!(Group::of(name), g, "{name}");
        }
        assert_eq!(layer_of("model.layers.61.eh_proj.weight"), Some(61));
        assert_eq!(layer_of("lm_head.weight"), None);
    }

    #[test]
    fn lambda_resolves_to_two_weights() {
        let mut s = spec("/b", &["/p"]);
        s.lambda = Some(0.6);
        let r = s.resolve().unwrap();
        assert_eq!(r.weights, vec![0.4, 0.6]);
        assert_eq!(r.delta, 0.0);
        assert_eq!(r.metric, Metric::Stored);
        assert!(r.selects("anything", Group::Other));
    }

    #[test]
    fn one_minus_is_exact_in_decimal() {
        for (x, want) in [
            (0.8, 0.2),
            (0.6, 0.4),
            (0.7, 0.3),
            (0.9, 0.1),
            (0.1, 0.9),
            (0.001, 0.999),
            (0.123, 0.877),
            (0.0, 1.0),
            (1.0, 0.0),
            (0.5, 0.5),
            (1.5, -0.5),
            (-0.25, 1.25),
            (12.75, -11.75),
            (1e-20, 1.0),
            (5e-324, 1.0),
        ] {
            assert_eq!(one_minus(x), want, "1 - {x}");
            assert_eq!(format!("{}", one_minus(x)), format!("{want}"), "1 - {x}");
        }
        assert!(one_minus(f64::NAN).is_nan());
        // Always within rounding of the binary difference.
        for i in 0..=1000 {
            let x = i as f64 / 1000.0;
            assert!(
                (one_minus(x) - (1.0 - x)).abs() <= 2.0 * f64::EPSILON,
                "{x}"
            );
        }
    }

    /// `lambda=0.8` records and prints the weights as the user wrote them: (0.2, 0.8), not
    /// (0.19999999999999996, 0.8), in `aoe_recipe.json` and everywhere it is shown.
    #[test]
    fn lambda_weights_print_as_given() {
        for (l, text) in [
            (0.8, "[0.2, 0.8]"),
            (0.6, "[0.4, 0.6]"),
            (0.13, "[0.87, 0.13]"),
        ] {
            let mut s = spec("/b", &["/p"]);
            s.lambda = Some(l);
            let r = s.resolve().unwrap();
            assert_eq!(format!("{:?}", r.weights), text);
            let file = String::from_utf8(r.file_bytes()).unwrap();
            let v: Value = serde_json::from_str(&file).unwrap();
            assert_eq!(v["weights"].to_string().replace(',', ", "), text);
            assert!(!file.contains("9999"), "{file}");
        }
        let v = RecipeSpec::from_variant_name("lambda=0.8").unwrap();
        let mut s = spec("/b", &["/p"]).merge(v);
        s.allow_empty = None;
        assert_eq!(s.resolve().unwrap().weights, vec![0.2, 0.8]);
    }

    #[test]
    fn bad_weights_are_refused() {
        let mut s = spec("/b", &["/p", "/q"]);
        s.weights = Some(vec![0.5, 0.5]);
        assert!(matches!(
            s.clone().resolve(),
            Err(Error::WeightCount {
                expected: 3,
                got: 2,
                ..
            })
        ));
        s.weights = Some(vec![0.5, f64::NAN, 0.5]);
        assert!(matches!(
            s.clone().resolve(),
            Err(Error::NonFiniteWeight { .. })
        ));
        s.weights = Some(vec![1.5, -0.5, 0.0]);
        assert!(matches!(
            s.clone().resolve(),
            Err(Error::NonConvexWeights { .. })
        ));
        s.allow_extrapolation = Some(true);
        assert!(s.resolve().is_ok());
        let mut s = spec("/b", &["/p", "/q"]);
        s.lambda = Some(0.5);
        assert!(matches!(s.resolve(), Err(Error::BadRecipe { .. })));
    }

    #[test]
    fn subsets_and_rules_parse() {
        let mut s = spec("/b", &["/p"]);
        s.weights = Some(vec![0.0, 1.0]);
        s.subset = Some(vec!["experts".into(), "re:\\.norm".into()]);
        s.rules = Some(vec!["layers\\.3\\.=0.25,0.75".into()]);
        let r = s.clone().resolve().unwrap();
        assert!(r.selects("x.mlp.experts.1.up_proj.weight", Group::Experts));
        assert!(r.selects("model.norm.weight", Group::Norms));
        assert!(!r.selects("model.layers.0.self_attn.o_proj.weight", Group::Attention));
        assert_eq!(
            r.weights_for("model.layers.3.mlp.experts.0.up_proj.weight"),
            &[0.25, 0.75]
        );
        assert_eq!(
            r.weights_for("model.layers.4.mlp.experts.0.up_proj.weight"),
            &[0.0, 1.0]
        );
        s.subset = Some(vec!["expert".into()]);
        assert!(matches!(
            s.clone().resolve(),
            Err(Error::UnknownSubset { .. })
        ));
        s.subset = Some(vec!["re:(".into()]);
        assert!(matches!(s.clone().resolve(), Err(Error::BadRegex { .. })));
        s.subset = None;
        s.rules = Some(vec!["[=1,0".into()]);
        assert!(matches!(s.resolve(), Err(Error::BadRegex { .. })));
    }

    #[test]
    fn recipe_file_round_trips() {
        let mut s = spec("/b", &["/p"]);
        s.weights = Some(vec![0.3, 0.7]);
        s.delta = Some(1.5);
        s.subset = Some(vec!["experts".into(), "router".into()]);
        s.rules = Some(vec!["gate=0.1,0.9".into()]);
        s.metric = Some("dequantized".into());
        let r = s.resolve().unwrap();
        let v: Value = serde_json::from_slice(&r.file_bytes()).unwrap();
        let r2 = RecipeSpec::from_json(&v).unwrap().resolve().unwrap();
        assert_eq!(r.file_bytes(), r2.file_bytes());
    }

    #[test]
    fn variant_names_parse_and_flags_override_files() {
        let v =
            RecipeSpec::from_variant_name("lambda=0.6,subset=experts+router,delta=1.5").unwrap();
        assert_eq!(v.lambda, Some(0.6));
        assert_eq!(v.subset, Some(vec!["experts".into(), "router".into()]));
        let w = RecipeSpec::from_variant_name("weights=0.2:0.3:0.5").unwrap();
        assert_eq!(w.weights, Some(vec![0.2, 0.3, 0.5]));
        assert!(RecipeSpec::from_variant_name("lambda=x").is_err());
        assert!(RecipeSpec::from_variant_name("colour=red").is_err());
        let merged = w.merge(v);
        assert_eq!(merged.weights, None);
        assert_eq!(merged.lambda, Some(0.6));
    }
}
