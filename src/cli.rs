//! Command-line pieces shared by `aoe` and `aoe-mount`: the recipe flags and progress bars.
//! Only this module and the binaries know clap and indicatif.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::error::Result;
use crate::recipe::{Recipe, RecipeSpec};

/// The recipe flags, the same for every command that takes a recipe.
#[derive(Args, Clone, Debug, Default)]
pub struct RecipeArgs {
    /// Base model M1: unselected tensors and the child's file layout come from it.
    #[arg(long, value_name = "DIR")]
    pub base: Option<PathBuf>,
    /// Another parent (M2, M3, …); repeat for more.
    #[arg(long = "parent", value_name = "DIR")]
    pub parents: Vec<PathBuf>,
    /// Two models: weights (1−X, X); X is the donor's share (the paper's λ2).
    #[arg(long, value_name = "X", allow_negative_numbers = true)]
    pub lambda: Option<f64>,
    /// One weight per model, base first, e.g. 0.2,0.3,0.5.
    #[arg(
        long,
        value_name = "W1,W2,...",
        value_delimiter = ',',
        allow_negative_numbers = true
    )]
    pub weights: Option<Vec<f64>>,
    /// Mix a selected tensor only if its normalized difference to the base exceeds D [default: 0].
    #[arg(long, value_name = "D", allow_negative_numbers = true)]
    pub delta: Option<f64>,
    /// Tensors to mix: full, experts, shared-experts, router, norms, attention, dense-mlp,
    /// embeddings, other, or re:REGEX; repeat for a union [default: full].
    #[arg(long, value_name = "NAME")]
    pub subset: Vec<String>,
    /// Per-tensor weights 'REGEX=W1,W2,...' for selected tensors; first match wins; repeatable.
    #[arg(long = "rule", value_name = "REGEX=W1,...")]
    pub rules: Vec<String>,
    /// Values δ is measured on: stored (FP8 codes without scales) or dequantized [default: stored].
    #[arg(long, value_name = "METRIC")]
    pub metric: Option<String>,
    /// Permit weights outside [0, 1] or not summing to 1 (task arithmetic).
    #[arg(long)]
    pub allow_extrapolation: bool,
    /// Accept a subset, rule or δ that selects nothing (the child is then the base's copy).
    #[arg(long)]
    pub allow_empty: bool,
    /// A recipe JSON file (an aoe_recipe.json works); flags override its fields.
    #[arg(long, value_name = "FILE")]
    pub recipe: Option<PathBuf>,
}

impl RecipeArgs {
    /// The spec these flags describe, layered: configured defaults (the config file, then
    /// `AOE_BASE` / `AOE_PARENTS`), then the `--recipe` file, then the flags.
    pub fn spec(&self) -> Result<RecipeSpec> {
        let mut file = configured_defaults()?;
        if let Some(p) = &self.recipe {
            file = file.merge(RecipeSpec::from_file(p)?);
        }
        let flags = RecipeSpec {
            base: self.base.clone(),
            parents: (!self.parents.is_empty()).then(|| self.parents.clone()),
            lambda: self.lambda,
            weights: self.weights.clone(),
            delta: self.delta,
            subset: (!self.subset.is_empty()).then(|| self.subset.clone()),
            rules: (!self.rules.is_empty()).then(|| self.rules.clone()),
            metric: self.metric.clone(),
            allow_extrapolation: self.allow_extrapolation.then_some(true),
            allow_empty: self.allow_empty.then_some(true),
        };
        Ok(file.merge(flags))
    }

    /// The validated recipe.
    pub fn resolve(&self) -> Result<Recipe> {
        self.spec()?.resolve()
    }
}

/// The configuration file: `$XDG_CONFIG_HOME/aoe/config.json` or `~/.config/aoe/config.json`,
/// a recipe JSON whose fields (typically `base` and `parents`) act as defaults.
pub fn config_path() -> Option<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_CONFIG_HOME").filter(|x| !x.is_empty()) {
        return Some(PathBuf::from(x).join("aoe").join("config.json"));
    }
    std::env::var_os("HOME").map(|h| {
        PathBuf::from(h)
            .join(".config")
            .join("aoe")
            .join("config.json")
    })
}

/// Defaults from the config file, overridden by `AOE_BASE` and `AOE_PARENTS` (colon-separated).
fn configured_defaults() -> Result<RecipeSpec> {
    let mut spec = match config_path() {
        Some(p) if p.is_file() => RecipeSpec::from_file(&p)?,
        _ => RecipeSpec::default(),
    };
    if let Some(b) = std::env::var_os("AOE_BASE").filter(|x| !x.is_empty()) {
        spec.base = Some(PathBuf::from(b));
    }
    if let Some(p) = std::env::var_os("AOE_PARENTS").filter(|x| !x.is_empty()) {
        spec.parents = Some(std::env::split_paths(&p).collect());
    }
    Ok(spec)
}

/// A byte progress bar on stderr, drawn only when stderr is a terminal.
pub fn byte_progress(total: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if !std::io::stderr().is_terminal() {
        pb.set_draw_target(ProgressDrawTarget::hidden());
    }
    pb.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// Parses a byte size such as 512M, 2G, 2GiB, 1048576.
pub fn parse_size(s: &str) -> std::result::Result<usize, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 512M, 2G)"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tb" | "tib" => 1024.0f64.powi(4),
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use K, M, G, T)")),
    };
    let v = n * mult;
    if !v.is_finite() || v < 0.0 || v > usize::MAX as f64 {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(v as usize)
}
