//! `aoe swap`: load another checkpoint directory into a running vLLM server in place, over its
//! development endpoints (`VLLM_SERVER_DEV_MODE=1`):
//!
//! 1. check the directory (an aoe-readable checkpoint with `config.json`) and that it has the
//!    served architecture, before anything on the server changes;
//! 2. `POST /pause?mode=wait`, `POST /collective_rpc` (`aoe_reload` of the worker extension
//!    `aoe_vllm.SwapExtension`, or vLLM's own `reload_weights` when the extension is not
//!    loaded), `POST /reset_prefix_cache`, `POST /resume`.
//!
//! A failed reload reloads the previous weights path (the served model's path, or the last one
//! swapped to) and the server is always resumed: a guard resumes it on every early return.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::commands::vllm::{LiveError, LiveResult, Served, Vllm, CONTROL_TIMEOUT};
use crate::live_err;
use crate::model::checkpoint::Checkpoint;

/// How the weights are reloaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// `aoe_vllm.SwapExtension.aoe_reload`: vLLM's reload plus the post-load processing vLLM
    /// skips (exact: tokens equal a fresh start).
    Extension,
    /// vLLM's `reload_weights` (on vLLM 0.32's CPU build wrong for BF16 MoE models).
    ReloadWeights,
}

impl Method {
    /// The `collective_rpc` method name.
    pub fn rpc_name(self) -> &'static str {
        match self {
            Method::Extension => "aoe_reload",
            Method::ReloadWeights => "reload_weights",
        }
    }
}

/// What a candidate directory is, in the terms the architecture check compares.
#[derive(Debug)]
pub(crate) struct Description {
    /// The directory.
    pub path: PathBuf,
    /// config.json `architectures`.
    pub architectures: Value,
    /// config.json `model_type`.
    pub model_type: Value,
    /// config.json `quantization_config.quant_method`.
    pub quantization: Value,
    /// The whole config.json.
    pub config: Value,
    /// Tensor name → (dtype, shape).
    pub tensors: BTreeMap<String, (String, Vec<u64>)>,
    /// Bytes of all shards.
    pub bytes: u64,
}

/// Reads `dir` with the project's checkpoint reader and its config.json.
pub(crate) fn describe_dir(dir: &Path) -> LiveResult<Description> {
    let ck = Checkpoint::open(dir).map_err(|e| {
        let e = e.to_string();
        if e.contains("not a checkpoint") {
            LiveError(e)
        } else {
            live_err!("{}: not a checkpoint: {e}", dir.display())
        }
    })?;
    // vLLM loads every *.safetensors file of the directory, index or not.
    if let Some(stray) = ck.other_files.iter().find(|f| f.ends_with(".safetensors")) {
        return Err(live_err!(
            "{}: {stray} is not a shard of the checkpoint's index, but vLLM would load it too",
            dir.display()
        ));
    }
    let cfg_path = ck.dir.join("config.json");
    let text = std::fs::read(&cfg_path).map_err(|e| {
        live_err!(
            "{}: not a checkpoint vLLM can load: config.json: {e}",
            dir.display()
        )
    })?;
    let config: Value = serde_json::from_slice(&text)
        .map_err(|e| live_err!("{}: config.json is not valid JSON: {e}", dir.display()))?;
    let mut tensors = BTreeMap::new();
    let mut bytes = 0;
    for s in &ck.shards {
        bytes += s.size;
        for t in &s.tensors {
            tensors.insert(
                t.name.clone(),
                (
                    t.dtype.as_str().to_string(),
                    t.shape.iter().map(|&d| d as u64).collect(),
                ),
            );
        }
    }
    Ok(Description {
        path: ck.dir.clone(),
        architectures: config.get("architectures").cloned().unwrap_or(Value::Null),
        model_type: config.get("model_type").cloned().unwrap_or(Value::Null),
        quantization: config
            .pointer("/quantization_config/quant_method")
            .cloned()
            .unwrap_or(Value::Null),
        config,
        tensors,
        bytes,
    })
}

/// Config fields compared when only the served model's config.json is at hand.
const CONFIG_KEYS: &[&str] = &[
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "moe_intermediate_size",
    "n_routed_experts",
    "vocab_size",
];

/// Why `new` cannot replace the model `served` describes (an `aoe_describe()` answer), or the
/// list of what was compared.
fn compare_with_extension(served: &Value, new: &Description) -> Result<Vec<String>, String> {
    for (key, ours) in [
        ("architectures", &new.architectures),
        ("model_type", &new.model_type),
        ("quantization", &new.quantization),
    ] {
        let theirs = served.get(key).unwrap_or(&Value::Null);
        if theirs != ours {
            return Err(format!(
                "{key} {ours} differs from the served model's {theirs}"
            ));
        }
    }
    let st = served
        .get("tensors")
        .and_then(Value::as_object)
        .ok_or("aoe_describe() gave no tensor list")?;
    let missing: Vec<&String> = st
        .keys()
        .filter(|k| !new.tensors.contains_key(*k))
        .collect();
    let extra: Vec<&String> = new
        .tensors
        .keys()
        .filter(|k| !st.contains_key(*k))
        .collect();
    if !missing.is_empty() || !extra.is_empty() {
        return Err(format!(
            "tensor names differ: {} of the served model's missing (first: {:?}), {} not in it \
             (first: {:?})",
            missing.len(),
            missing.iter().take(3).collect::<Vec<_>>(),
            extra.len(),
            extra.iter().take(3).collect::<Vec<_>>()
        ));
    }
    for (name, (dtype, shape)) in &new.tensors {
        let t = &st[name];
        let sd = t.get("dtype").and_then(Value::as_str).unwrap_or("?");
        let ss: Vec<u64> = t
            .get("shape")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default();
        if sd != dtype || &ss != shape {
            return Err(format!(
                "tensor {name}: {dtype} {shape:?} differs from the served {sd} {ss:?}"
            ));
        }
    }
    Ok(vec![
        "architectures, model_type, quantization method".into(),
        format!(
            "{} tensor names, dtypes and shapes (against aoe_describe())",
            new.tensors.len()
        ),
    ])
}

/// The check without the extension: config.json fields of the served model's directory (and
/// its tensors when aoe can read it), or nothing when that directory is not readable here.
fn compare_with_served_dir(served_dir: &Path, new: &Description) -> Result<Vec<String>, String> {
    let old = match describe_dir(served_dir) {
        Ok(d) => d,
        Err(e) => {
            let cfg = std::fs::read(served_dir.join("config.json"))
                .ok()
                .and_then(|t| serde_json::from_slice::<Value>(&t).ok());
            let Some(config) = cfg else {
                return Ok(vec![format!(
                    "nothing: the served model's directory {} is not readable here ({e})",
                    served_dir.display()
                )]);
            };
            let mut checked = compare_config(&config, new)?;
            checked.push(format!("no tensors: {e}"));
            return Ok(checked);
        }
    };
    let mut checked = compare_config(&old.config, new)?;
    if old.tensors != new.tensors {
        let diff = new
            .tensors
            .iter()
            .find(|(k, v)| old.tensors.get(*k) != Some(v))
            .map(|(k, v)| format!("{k}: {v:?} vs served {:?}", old.tensors.get(k)))
            .or_else(|| {
                old.tensors
                    .keys()
                    .find(|k| !new.tensors.contains_key(*k))
                    .map(|k| format!("{k} missing"))
            })
            .unwrap_or_default();
        return Err(format!(
            "tensors differ from the served directory's: {diff}"
        ));
    }
    checked.push(format!(
        "{} tensor names, dtypes and shapes (against the served directory {})",
        new.tensors.len(),
        served_dir.display()
    ));
    Ok(checked)
}

fn compare_config(old: &Value, new: &Description) -> Result<Vec<String>, String> {
    let mut keys = vec!["architectures", "model_type"];
    keys.extend_from_slice(CONFIG_KEYS);
    for k in &keys {
        let (a, b) = (
            old.get(k).unwrap_or(&Value::Null),
            new.config.get(k).unwrap_or(&Value::Null),
        );
        if a != b {
            return Err(format!(
                "config.json {k} {b} differs from the served model's {a}"
            ));
        }
    }
    let (a, b) = (
        old.pointer("/quantization_config/quant_method")
            .unwrap_or(&Value::Null),
        &new.quantization,
    );
    if a != b {
        return Err(format!(
            "quantization {b} differs from the served model's {a}"
        ));
    }
    Ok(vec![format!(
        "config.json {} and quantization method (against the served directory's config.json)",
        keys.join(", ")
    )])
}

/// Options of a swap.
#[derive(Clone, Debug)]
pub struct SwapOptions {
    /// Timeout of the pause and reload requests.
    pub reload_timeout: Duration,
    /// The weights path to go back to if the reload fails (the served model's path is used
    /// when this is `None`).
    pub previous: Option<PathBuf>,
}

impl Default for SwapOptions {
    fn default() -> SwapOptions {
        SwapOptions {
            reload_timeout: Duration::from_secs(600),
            previous: None,
        }
    }
}

/// What the server is and how a swap will reload it, found out before anything changes.
#[derive(Clone, Debug)]
pub struct Probe {
    /// The served model.
    pub served: Served,
    /// The reload method.
    pub method: Method,
    /// Why the extension is not used, when it is not.
    pub no_extension: Option<String>,
    /// The served weights path (the extension's, or `root` of `/v1/models`).
    pub served_path: Option<String>,
    /// `aoe_describe()`, with the extension.
    pub describe: Option<Value>,
}

fn dev_mode_error(url: &str, path: &str) -> LiveError {
    live_err!(
        "POST {url}{path}: 404 Not Found: the server's development endpoints are disabled; \
         restart vLLM with VLLM_SERVER_DEV_MODE=1 (and --worker-extension-cls \
         aoe_vllm.SwapExtension for exact swaps); nothing was changed"
    )
}

/// Asks the server what it serves and whether the extension is loaded (`aoe_describe`).
pub fn probe(v: &Vllm) -> LiveResult<Probe> {
    let served = v.served();
    let a = v.rpc("aoe_describe", json!({}), CONTROL_TIMEOUT)?;
    if a.status == 404 {
        return Err(dev_mode_error(&v.url, "/collective_rpc"));
    }
    let served = served?;
    if a.ok() {
        let d = a
            .json()
            .get("results")
            .and_then(Value::as_array)
            .and_then(|r| r.first())
            .cloned()
            .filter(Value::is_object)
            .ok_or_else(|| {
                live_err!(
                    "POST {}/collective_rpc aoe_describe: unexpected answer {}",
                    v.url,
                    a.body.chars().take(200).collect::<String>()
                )
            })?;
        let path = d.get("path").and_then(Value::as_str).map(str::to_string);
        return Ok(Probe {
            served_path: path.or(served.root.clone()),
            served,
            method: Method::Extension,
            no_extension: None,
            describe: Some(d),
        });
    }
    Ok(Probe {
        served_path: served.root.clone(),
        served,
        method: Method::ReloadWeights,
        no_extension: Some(format!("aoe_describe failed: {}", a.brief())),
        describe: None,
    })
}

/// What a swap did.
#[derive(Debug)]
pub struct SwapReport {
    /// The directory loaded (canonical).
    pub dir: PathBuf,
    /// Tensors and shard bytes of it.
    pub tensors: usize,
    /// Shard bytes.
    pub bytes: u64,
    /// The reload method used.
    pub method: Method,
    /// Why the extension was not used.
    pub no_extension: Option<String>,
    /// The weights path served before.
    pub previous: Option<String>,
    /// What the architecture check compared.
    pub checked: Vec<String>,
    /// Seconds of the checks (directory, server probe, comparison).
    pub check_seconds: f64,
    /// Each server step with its seconds.
    pub steps: Vec<(&'static str, f64)>,
    /// The reload's answer (`aoe_reload` returns its own timing and counts).
    pub reload_answer: Value,
    /// Seconds from start to resumed.
    pub total_seconds: f64,
}

impl SwapReport {
    /// The lines `aoe swap` prints.
    pub fn text(&self) -> String {
        let mut s = format!(
            "aoe swap: loaded {} ({} tensors, {:.1} MB)\n",
            self.dir.display(),
            self.tensors,
            self.bytes as f64 / 1e6
        );
        s += &format!(
            "  previous weights: {}\n",
            self.previous.as_deref().unwrap_or("(unknown)")
        );
        match &self.no_extension {
            None => s += "  method: aoe_reload (worker extension aoe_vllm.SwapExtension)\n",
            Some(why) => {
                s += &format!(
                    "  method: vLLM reload_weights (extension not loaded: {why}); note: on \
                     vLLM 0.32's CPU build this gives wrong tokens for BF16 MoE models, start \
                     vLLM with --worker-extension-cls aoe_vllm.SwapExtension\n"
                )
            }
        }
        for c in &self.checked {
            s += &format!("  checked: {c}\n");
        }
        let steps: Vec<String> = self
            .steps
            .iter()
            .map(|(n, t)| format!("{n} {t:.3} s"))
            .collect();
        s += &format!(
            "  time: checks {:.3} s, {}; total {:.3} s\n",
            self.check_seconds,
            steps.join(", "),
            self.total_seconds
        );
        s
    }
}

/// Resumes the server when dropped unless [`Paused::resume`] succeeded: the server is never
/// left paused, also on an early return or a panic.
struct Paused<'a> {
    v: &'a Vllm,
    done: bool,
}

impl Paused<'_> {
    fn resume(&mut self) -> LiveResult<f64> {
        let t = Instant::now();
        let mut last = None;
        for _ in 0..3 {
            match self.v.post_ok("/resume", CONTROL_TIMEOUT) {
                Ok(_) => {
                    self.done = true;
                    return Ok(t.elapsed().as_secs_f64());
                }
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        self.done = true;
        Err(live_err!(
            "{}; THE SERVER MAY BE LEFT PAUSED: POST {}/resume",
            last.map(|e| e.0).unwrap_or_default(),
            self.v.url
        ))
    }
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        if !self.done {
            if let Err(e) = self.resume() {
                eprintln!("aoe: error: {e}");
            }
        }
    }
}

fn reload(v: &Vllm, method: Method, dir: &str, timeout: Duration) -> LiveResult<Value> {
    let a = v.rpc(method.rpc_name(), json!({ "weights_path": dir }), timeout)?;
    if !a.ok() {
        return Err(live_err!(
            "POST {}/collective_rpc {}({dir}): {}",
            v.url,
            method.rpc_name(),
            a.brief()
        ));
    }
    Ok(a.json())
}

/// Swaps the server at `v` to the checkpoint directory `dir`; see the module documentation.
/// `probe` (from [`probe`]) may be reused across swaps to the same server.
pub fn swap(
    v: &Vllm,
    dir: &Path,
    probe_: Option<&Probe>,
    opts: &SwapOptions,
) -> LiveResult<SwapReport> {
    let t0 = Instant::now();
    let new = describe_dir(dir)?;
    let owned;
    let p = match probe_ {
        Some(p) => p,
        None => {
            owned = probe(v)?;
            &owned
        }
    };
    let refuse = |why: String| {
        live_err!(
            "refusing {}: not the served architecture: {why}; nothing was changed",
            new.path.display()
        )
    };
    let checked = match (&p.describe, &p.served_path) {
        (Some(d), sp) => {
            // The served config.json, when readable here, first: it names the dims that differ.
            let served_cfg = sp
                .as_ref()
                .and_then(|sp| std::fs::read(Path::new(sp).join("config.json")).ok())
                .and_then(|t| serde_json::from_slice::<Value>(&t).ok());
            let mut c = match served_cfg {
                Some(cfg) => compare_config(&cfg, &new).map_err(refuse)?,
                None => Vec::new(),
            };
            c.extend(compare_with_extension(d, &new).map_err(refuse)?);
            c
        }
        (None, Some(sp)) => compare_with_served_dir(Path::new(sp), &new).map_err(refuse)?,
        (None, None) => vec!["nothing: the server names no model path".into()],
    };
    let previous = opts
        .previous
        .as_ref()
        .map(|p| p.display().to_string())
        .or_else(|| p.served_path.clone());
    let check_seconds = t0.elapsed().as_secs_f64();
    let target = new
        .path
        .to_str()
        .ok_or_else(|| live_err!("{}: path is not UTF-8", new.path.display()))?;

    let mut steps = Vec::new();
    let t = Instant::now();
    let pa = v.request("POST", "/pause?mode=wait", None, opts.reload_timeout)?;
    if pa.status == 404 {
        return Err(dev_mode_error(&v.url, "/pause"));
    }
    let mut paused = Paused { v, done: false };
    if !pa.ok() {
        let e = live_err!("POST {}/pause?mode=wait: {}", v.url, pa.brief());
        paused.resume()?;
        return Err(e);
    }
    steps.push(("pause", t.elapsed().as_secs_f64()));

    let t = Instant::now();
    let answer = match reload(v, p.method, target, opts.reload_timeout) {
        Ok(a) => a,
        Err(e) => {
            let back = match &previous {
                None => "the previous weights path is unknown: not reloaded".to_string(),
                Some(prev) => match reload(v, p.method, prev, opts.reload_timeout) {
                    Ok(_) => format!("reloaded the previous weights {prev}"),
                    Err(e2) => format!("reloading the previous weights {prev} failed too: {e2}"),
                },
            };
            let reset = v.post_ok("/reset_prefix_cache", CONTROL_TIMEOUT).err();
            let resumed = paused.resume();
            let mut msg = format!("reload of {} failed: {e}; {back}", new.path.display());
            if let Some(r) = reset {
                msg += &format!("; {r}");
            }
            match resumed {
                Ok(_) => msg += "; server resumed",
                Err(r) => msg += &format!("; {r}"),
            }
            return Err(LiveError(msg));
        }
    };
    steps.push(("reload", t.elapsed().as_secs_f64()));

    let t = Instant::now();
    if let Err(e) = v.post_ok("/reset_prefix_cache", CONTROL_TIMEOUT) {
        let r = paused.resume();
        return Err(live_err!(
            "loaded {} but {e} (cached prompts may reuse KV of the old weights){}",
            new.path.display(),
            r.err()
                .map(|r| format!("; {r}"))
                .unwrap_or_else(|| "; server resumed".into())
        ));
    }
    steps.push(("reset_prefix_cache", t.elapsed().as_secs_f64()));
    let r = paused.resume()?;
    steps.push(("resume", r));
    Ok(SwapReport {
        tensors: new.tensors.len(),
        bytes: new.bytes,
        dir: new.path,
        method: p.method,
        no_extension: p.no_extension.clone(),
        previous,
        checked,
        check_seconds,
        steps,
        reload_answer: answer,
        total_seconds: t0.elapsed().as_secs_f64(),
    })
}
