//! `aoe sweep`: for every variant of a sweep file, swap a running vLLM server to the variant's
//! directory under an `aoe-mount --variants` root, run every prompt greedily and record the
//! outputs and metrics: `OUT/results.jsonl` (appended, one line per variant: the resume log),
//! `OUT/results.csv` and `OUT/sweep.svg` (rewritten whole from results.jsonl through a temporary
//! file and a rename).

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::commands::swap::{probe, swap, SwapOptions};
use crate::commands::vllm::{LiveResult, Vllm};
use crate::live_err;
use crate::mount::fs::read_sweep;
use crate::recipe::RecipeSpec;

/// What counts as a marker in an output.
#[derive(Clone, Debug)]
pub enum Marker {
    /// The output text contains this string.
    Text(String),
    /// The output token ids contain this id.
    Token(u64),
}

/// One prompt of the prompts file.
#[derive(Clone, Debug)]
pub(crate) struct Prompt {
    /// Text or a list of token ids, as sent.
    pub prompt: Value,
    /// Expected output: text or token ids.
    pub expect: Option<Value>,
    /// Per-prompt token budget.
    pub max_tokens: Option<u64>,
}

/// Reads a JSONL prompts file: `{"prompt": TEXT | [IDS], "expect"?: TEXT | [IDS],
/// "max_tokens"?: N}` per line (blank lines skipped).
pub(crate) fn read_prompts(path: &Path) -> LiveResult<Vec<Prompt>> {
    let text = std::fs::read_to_string(path).map_err(|e| live_err!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |why: String| live_err!("{} line {}: {why}", path.display(), i + 1);
        let v: Value = serde_json::from_str(line).map_err(|e| bad(format!("not JSON: {e}")))?;
        let text_or_ids =
            |v: &Value| v.is_string() || v.as_array().is_some_and(|a| a.iter().all(Value::is_u64));
        let prompt = v
            .get("prompt")
            .filter(|p| text_or_ids(p))
            .ok_or_else(|| bad("needs \"prompt\": a string or a list of token ids".into()))?
            .clone();
        let expect = match v.get("expect") {
            None | Some(Value::Null) => None,
            Some(e) if text_or_ids(e) => Some(e.clone()),
            Some(_) => {
                return Err(bad(
                    "\"expect\" must be a string or a list of token ids".into()
                ))
            }
        };
        let max_tokens = match v.get("max_tokens") {
            None | Some(Value::Null) => None,
            Some(m) => Some(
                m.as_u64()
                    .filter(|&m| m > 0)
                    .ok_or_else(|| bad("\"max_tokens\" must be a positive integer".into()))?,
            ),
        };
        out.push(Prompt {
            prompt,
            expect,
            max_tokens,
        });
    }
    if out.is_empty() {
        return Err(live_err!("{}: no prompt", path.display()));
    }
    Ok(out)
}

/// Options of a sweep.
#[derive(Clone, Debug)]
pub struct SweepOptions {
    /// The vLLM server.
    pub url: String,
    /// The `aoe-mount --variants` root.
    pub root: PathBuf,
    /// The sweep file (the format `aoe-mount --sweep` reads).
    pub sweep: PathBuf,
    /// The prompts file (JSONL).
    pub prompts: PathBuf,
    /// Output directory.
    pub out: PathBuf,
    /// Marker to count in outputs.
    pub marker: Option<Marker>,
    /// Tokens per prompt unless the prompt says.
    pub max_tokens: u64,
    /// Generate `max_tokens` tokens whatever the model emits.
    pub ignore_eos: bool,
    /// Timeout of each reload.
    pub reload_timeout: Duration,
    /// Timeout of each completion.
    pub completion_timeout: Duration,
}

/// Progress of a sweep, for the caller to show.
#[derive(Debug)]
pub enum Event<'a> {
    /// Variants already in results.jsonl, skipped.
    Skipped(&'a [String]),
    /// The variants to run and the prompts per variant.
    Begin {
        /// Variants to run.
        variants: usize,
        /// Prompts per variant.
        prompts: usize,
    },
    /// Swapping to a variant.
    Swapping(&'a str),
    /// One prompt of the current variant done.
    PromptDone,
    /// A variant done (its error, if it failed).
    VariantDone(&'a str, Option<&'a str>),
}

/// The results of one variant.
#[derive(Clone, Debug)]
pub struct Row {
    /// Variant name.
    pub name: String,
    /// Metric name → value (`null` when not defined: no `expect`, no marker).
    pub metrics: Map<String, Value>,
    /// Seconds of the swap and of the generation.
    pub swap_seconds: f64,
    /// Seconds of all completions.
    pub generation_seconds: f64,
    /// The error, for a failed variant.
    pub error: Option<String>,
}

/// What a sweep did.
#[derive(Debug)]
pub struct SweepReport {
    /// Every variant of the sweep file with a result, in sweep order (last result per name).
    pub rows: Vec<Row>,
    /// The varying recipe key the plot uses (`None`: variant order).
    pub key: Option<String>,
    /// Variants skipped because results.jsonl had them.
    pub skipped: Vec<String>,
    /// Variants that failed in this run.
    pub failed: Vec<String>,
}

impl SweepReport {
    /// A summary table.
    pub fn table(&self) -> String {
        let key = self.key.clone().unwrap_or_else(|| "#".into());
        let w = self
            .rows
            .iter()
            .map(|r| r.name.len())
            .max()
            .unwrap_or(4)
            .max(7);
        let mut s = format!(
            "{:<w$}  {:>10}  {:>11}  {:>11}  {:>12}  {:>8}  {:>8}\n",
            "variant", key, "mean tokens", "exact match", "marker share", "swap s", "gen s"
        );
        let f = |v: Option<&Value>| match v.and_then(Value::as_f64) {
            Some(x) => format!("{x:.3}"),
            None => "-".into(),
        };
        for r in &self.rows {
            if let Some(e) = &r.error {
                s += &format!("{:<w$}  FAILED: {e}\n", r.name);
                continue;
            }
            let x = r
                .metrics
                .get("x")
                .map(|v| match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .unwrap_or_default();
            s += &format!(
                "{:<w$}  {:>10}  {:>11}  {:>11}  {:>12}  {:>8.3}  {:>8.3}\n",
                r.name,
                x,
                f(r.metrics.get("mean_output_tokens")),
                f(r.metrics.get("exact_match")),
                f(r.metrics.get("marker_share")),
                r.swap_seconds,
                r.generation_seconds
            );
        }
        s
    }
}

/// The recipe fields of `spec` that are set, as text (for finding the varying key).
fn recipe_fields(spec: &RecipeSpec) -> BTreeMap<&'static str, String> {
    let mut m = BTreeMap::new();
    let join = |v: &[f64]| {
        v.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(":")
    };
    if let Some(b) = &spec.base {
        m.insert("base", b.display().to_string());
    }
    if let Some(p) = &spec.parents {
        m.insert(
            "parents",
            p.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(":"),
        );
    }
    if let Some(l) = spec.lambda {
        m.insert("lambda", l.to_string());
    }
    if let Some(w) = &spec.weights {
        m.insert("weights", join(w));
    }
    if let Some(d) = spec.delta {
        m.insert("delta", d.to_string());
    }
    if let Some(s) = &spec.subset {
        m.insert("subset", s.join("+"));
    }
    if let Some(r) = &spec.rules {
        m.insert("rules", r.join(";"));
    }
    if let Some(x) = &spec.metric {
        m.insert("metric", x.clone());
    }
    if let Some(a) = spec.allow_extrapolation {
        m.insert("allow_extrapolation", a.to_string());
    }
    m
}

/// The one recipe key whose value differs across `specs`, with each variant's value; `None`
/// when none or several vary.
pub(crate) fn varying_key(specs: &[RecipeSpec]) -> Option<(String, Vec<String>)> {
    let fields: Vec<_> = specs.iter().map(recipe_fields).collect();
    let keys: HashSet<&str> = fields.iter().flat_map(|f| f.keys().copied()).collect();
    let mut varying: Vec<&str> = keys
        .into_iter()
        .filter(|k| {
            let first = fields.first().and_then(|f| f.get(k));
            fields.iter().any(|f| f.get(k) != first)
        })
        .collect();
    varying.sort();
    if varying.len() != 1 {
        return None;
    }
    let k = varying[0];
    let vals = fields
        .iter()
        .map(|f| f.get(k).cloned().unwrap_or_default())
        .collect();
    Some((k.to_string(), vals))
}

fn contains_marker(m: &Marker, text: &str, ids: &[u64]) -> bool {
    match m {
        Marker::Text(s) => text.contains(s.as_str()),
        Marker::Token(t) => ids.contains(t),
    }
}

fn exact(expect: &Value, text: &str, ids: &[u64]) -> bool {
    match expect {
        Value::String(s) => s.trim() == text.trim(),
        Value::Array(a) => {
            a.iter()
                .map(Value::as_u64)
                .collect::<Option<Vec<u64>>>()
                .as_deref()
                == Some(ids)
        }
        _ => false,
    }
}

/// Reads results.jsonl: every record, in file order (unparsable lines are an error).
pub(crate) fn read_results(path: &Path) -> LiveResult<Vec<Value>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(live_err!("{}: {e}", path.display())),
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| {
                live_err!(
                    "{} line {}: not JSON ({e}); fix or move the file",
                    path.display(),
                    i + 1
                )
            })
        })
        .collect()
}

fn write_atomic(path: &Path, bytes: &[u8]) -> LiveResult<()> {
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or("")
    ));
    std::fs::write(&tmp, bytes).map_err(|e| live_err!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| live_err!("{}: {e}", path.display()))
}

fn row_of(rec: &Value) -> Row {
    let f = |k: &str| rec.get(k).and_then(Value::as_f64).unwrap_or(0.0);
    Row {
        name: rec
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        metrics: rec
            .get("metrics")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default(),
        swap_seconds: f("swap_seconds"),
        generation_seconds: f("generation_seconds"),
        error: rec.get("error").and_then(Value::as_str).map(str::to_string),
    }
}

/// The top-level keys of the JSON object in `text`, in the order the file writes them
/// (serde_json's own map sorts them). Only the keys: the recipes are `read_sweep`'s.
fn key_order(text: &[u8]) -> Vec<String> {
    struct Keys;
    impl<'de> serde::de::Visitor<'de> for Keys {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut m: A,
        ) -> Result<Vec<String>, A::Error> {
            let mut keys = Vec::new();
            while let Some((k, _)) = m.next_entry::<String, serde::de::IgnoredAny>()? {
                keys.push(k);
            }
            Ok(keys)
        }
    }
    use serde::Deserializer;
    serde_json::Deserializer::from_slice(text)
        .deserialize_map(Keys)
        .unwrap_or_default()
}

/// Runs the sweep; `on` hears the progress.
pub fn sweep(o: &SweepOptions, on: &mut dyn FnMut(Event)) -> LiveResult<SweepReport> {
    let mut variants = read_sweep(&o.sweep)?;
    let text = std::fs::read(&o.sweep).unwrap_or_default();
    let order = key_order(&text);
    variants.sort_by_key(|(n, _)| order.iter().position(|k| k == n).unwrap_or(usize::MAX));
    if variants.is_empty() {
        return Err(live_err!("{}: no variant", o.sweep.display()));
    }
    // The recipes exactly as the sweep file writes them (read_sweep has validated them).
    let raw: Map<String, Value> = serde_json::from_slice(&text).unwrap_or_default();
    let prompts = read_prompts(&o.prompts)?;
    if !o.root.is_dir() {
        return Err(live_err!(
            "{}: not a directory (mount it with aoe-mount --variants)",
            o.root.display()
        ));
    }
    std::fs::create_dir_all(&o.out).map_err(|e| live_err!("{}: {e}", o.out.display()))?;
    let jsonl = o.out.join("results.jsonl");
    let done: HashSet<String> = read_results(&jsonl)?
        .iter()
        .filter(|r| r.get("error").is_none_or(Value::is_null))
        .filter_map(|r| r.get("name").and_then(Value::as_str).map(str::to_string))
        .collect();
    let specs: Vec<RecipeSpec> = variants.iter().map(|(_, s)| s.clone()).collect();
    let key = varying_key(&specs);
    let x_of = |i: usize| -> Value {
        match &key {
            Some((_, vals)) => match vals[i].parse::<f64>() {
                Ok(x) => json!(x),
                Err(_) => json!(vals[i]),
            },
            None => json!(i),
        }
    };
    let skipped: Vec<String> = variants
        .iter()
        .map(|(n, _)| n.clone())
        .filter(|n| done.contains(n))
        .collect();
    if !skipped.is_empty() {
        on(Event::Skipped(&skipped));
    }
    let todo: Vec<usize> = (0..variants.len())
        .filter(|&i| !done.contains(&variants[i].0))
        .collect();
    on(Event::Begin {
        variants: todo.len(),
        prompts: prompts.len(),
    });

    let mut failed = Vec::new();
    if !todo.is_empty() {
        let v = Vllm::new(&o.url);
        let p = probe(&v)?;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&jsonl)
            .map_err(|e| live_err!("{}: {e}", jsonl.display()))?;
        let mut previous: Option<PathBuf> = None;
        for &i in &todo {
            let (name, _) = &variants[i];
            on(Event::Swapping(name));
            let mut rec = json!({
                "name": name,
                "recipe": raw.get(name).cloned().unwrap_or(Value::Null),
            });
            let dir = o.root.join(name);
            let result = (|| -> LiveResult<()> {
                let t = Instant::now();
                let opts = SwapOptions {
                    reload_timeout: o.reload_timeout,
                    previous: previous.clone(),
                };
                let r = swap(&v, &dir, Some(&p), &opts)?;
                previous = Some(r.dir.clone());
                rec["swap_seconds"] = json!(t.elapsed().as_secs_f64());
                rec["method"] = json!(r.method.rpc_name());
                let t = Instant::now();
                let mut outputs = Vec::new();
                let (mut tokens, mut matched, mut expected, mut marked) = (0usize, 0, 0, 0);
                for (pi, pr) in prompts.iter().enumerate() {
                    let c = v.complete(
                        &p.served.id,
                        &pr.prompt,
                        pr.max_tokens.unwrap_or(o.max_tokens),
                        o.ignore_eos,
                        o.completion_timeout,
                    )?;
                    tokens += c.token_ids.len();
                    if let Some(e) = &pr.expect {
                        expected += 1;
                        matched += exact(e, &c.text, &c.token_ids) as usize;
                    }
                    if let Some(m) = &o.marker {
                        marked += contains_marker(m, &c.text, &c.token_ids) as usize;
                    }
                    outputs.push(json!({
                        "prompt": pi,
                        "token_ids": c.token_ids,
                        "text": c.text,
                        "finish_reason": c.finish_reason,
                    }));
                    on(Event::PromptDone);
                }
                let n = prompts.len() as f64;
                rec["generation_seconds"] = json!(t.elapsed().as_secs_f64());
                rec["metrics"] = json!({
                    "x": x_of(i),
                    "prompts": prompts.len(),
                    "mean_output_tokens": tokens as f64 / n,
                    "exact_match": if expected > 0 { json!(matched as f64 / expected as f64) } else { Value::Null },
                    "marker_share": if o.marker.is_some() { json!(marked as f64 / n) } else { Value::Null },
                });
                rec["outputs"] = Value::Array(outputs);
                Ok(())
            })();
            let err = result.err().map(|e| e.0);
            if let Some(e) = &err {
                rec["error"] = json!(e);
                failed.push(name.clone());
            }
            let mut line = rec.to_string();
            line.push('\n');
            file.write_all(line.as_bytes())
                .and_then(|_| file.sync_data())
                .map_err(|e| live_err!("{}: {e}", jsonl.display()))?;
            on(Event::VariantDone(name, err.as_deref()));
        }
    }

    // The tables and the plot: the last record of every variant of this sweep, in sweep order.
    let mut last: BTreeMap<String, Value> = BTreeMap::new();
    for r in read_results(&jsonl)? {
        if let Some(n) = r.get("name").and_then(Value::as_str) {
            last.insert(n.to_string(), r.clone());
        }
    }
    let rows: Vec<Row> = variants
        .iter()
        .filter_map(|(n, _)| last.get(n).map(row_of))
        .collect();
    let key_name = key.as_ref().map(|(k, _)| k.clone());
    write_atomic(
        &o.out.join("results.csv"),
        csv(&rows, key_name.as_deref()).as_bytes(),
    )?;
    write_atomic(
        &o.out.join("sweep.svg"),
        svg(&rows, key_name.as_deref()).as_bytes(),
    )?;
    Ok(SweepReport {
        rows,
        key: key_name,
        skipped,
        failed,
    })
}

const METRICS: [(&str, &str); 3] = [
    ("mean_output_tokens", "mean output tokens"),
    ("exact_match", "exact-match rate"),
    ("marker_share", "marker share"),
];

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// results.csv: one line per variant.
pub fn csv(rows: &[Row], key: Option<&str>) -> String {
    let mut s = format!(
        "name,{},prompts,mean_output_tokens,exact_match,marker_share,swap_seconds,generation_seconds,error\n",
        key.unwrap_or("index")
    );
    for r in rows {
        let g = |k: &str| match r.metrics.get(k) {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => csv_field(s),
            Some(v) => v.to_string(),
        };
        s += &format!(
            "{},{},{},{},{},{},{:.4},{:.4},{}\n",
            csv_field(&r.name),
            g("x"),
            g("prompts"),
            g("mean_output_tokens"),
            g("exact_match"),
            g("marker_share"),
            r.swap_seconds,
            r.generation_seconds,
            csv_field(r.error.as_deref().unwrap_or(""))
        );
    }
    s
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// sweep.svg: one panel per metric with values, against the varying key (numeric: to scale;
/// otherwise in sweep order).
pub fn svg(rows: &[Row], key: Option<&str>) -> String {
    let ok: Vec<&Row> = rows.iter().filter(|r| r.error.is_none()).collect();
    let metrics: Vec<(&str, &str)> = METRICS
        .iter()
        .copied()
        .filter(|(k, _)| {
            ok.iter()
                .any(|r| r.metrics.get(*k).is_some_and(Value::is_number))
        })
        .collect();
    let (pw, ph, m) = (360.0, 240.0, 50.0);
    let width = pw * metrics.len().max(1) as f64;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{}\" \
         font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
        ph + 30.0
    );
    let numeric = ok
        .iter()
        .all(|r| r.metrics.get("x").is_some_and(Value::is_number));
    let xs: Vec<f64> = ok
        .iter()
        .enumerate()
        .map(|(i, r)| {
            if numeric {
                r.metrics["x"].as_f64().unwrap_or(i as f64)
            } else {
                i as f64
            }
        })
        .collect();
    let xlabel = if numeric {
        key.unwrap_or("variant")
    } else {
        "variant"
    };
    let (xmin, xmax) = xs
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
            (a.min(x), b.max(x))
        });
    let xspan = if xmax > xmin { xmax - xmin } else { 1.0 };
    if metrics.is_empty() {
        s += "<text x=\"20\" y=\"40\">no successful variant</text>\n";
    }
    for (pi, (mk, title)) in metrics.iter().enumerate() {
        let ox = pi as f64 * pw;
        let vals: Vec<Option<f64>> = ok
            .iter()
            .map(|r| r.metrics.get(*mk).and_then(Value::as_f64))
            .collect();
        let (mut lo, mut hi) = vals
            .iter()
            .flatten()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
                (a.min(x), b.max(x))
            });
        if *mk != "mean_output_tokens" {
            (lo, hi) = (0.0, 1.0);
        } else if hi <= lo {
            (lo, hi) = (lo - 1.0, hi + 1.0);
        }
        let px = |x: f64| ox + m + (x - xmin) / xspan * (pw - 2.0 * m);
        let py = |y: f64| 20.0 + (ph - m) - (y - lo) / (hi - lo) * (ph - m - 10.0);
        s += &format!(
            "<text x=\"{}\" y=\"14\" text-anchor=\"middle\" font-weight=\"bold\">{}</text>\n",
            ox + pw / 2.0,
            esc(title)
        );
        s += &format!(
            "<line x1=\"{0}\" y1=\"{1}\" x2=\"{2}\" y2=\"{1}\" stroke=\"black\"/>\n\
             <line x1=\"{0}\" y1=\"30\" x2=\"{0}\" y2=\"{1}\" stroke=\"black\"/>\n",
            ox + m,
            py(lo),
            ox + pw - m
        );
        for y in [lo, hi] {
            s += &format!(
                "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\n",
                ox + m - 4.0,
                py(y) + 4.0,
                (y * 1000.0).round() / 1000.0
            );
        }
        let mut pts = Vec::new();
        for (i, v) in vals.iter().enumerate() {
            let label = if numeric {
                format!("{}", xs[i])
            } else {
                ok[i].name.clone()
            };
            s += &format!(
                "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"9\">{}</text>\n",
                px(xs[i]),
                py(lo) + 14.0,
                esc(&label)
            );
            if let Some(v) = v {
                pts.push(format!("{:.1},{:.1}", px(xs[i]), py(*v)));
                s += &format!(
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"steelblue\"><title>{}: {v}</title></circle>\n",
                    px(xs[i]),
                    py(*v),
                    esc(&ok[i].name)
                );
            }
        }
        s += &format!(
            "<polyline points=\"{}\" fill=\"none\" stroke=\"steelblue\"/>\n",
            pts.join(" ")
        );
        s += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
            ox + pw / 2.0,
            ph + 22.0,
            esc(xlabel)
        );
    }
    s += "</svg>\n";
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_keys_in_file_order() {
        let k = key_order(br#"{"z": {"lambda": 1}, "a": "lambda=0", "m": {}}"#);
        assert_eq!(k, ["z", "a", "m"]);
    }

    #[test]
    fn one_varying_key() {
        let a = RecipeSpec::from_variant_name("lambda=0.2,subset=experts").unwrap();
        let b = RecipeSpec::from_variant_name("lambda=0.8,subset=experts").unwrap();
        let (k, v) = varying_key(&[a.clone(), b.clone()]).unwrap();
        assert_eq!(k, "lambda");
        assert_eq!(v, ["0.2", "0.8"]);
        let c = RecipeSpec::from_variant_name("lambda=0.8,delta=1").unwrap();
        assert!(varying_key(&[a, c]).is_none());
    }

    #[test]
    fn csv_and_svg_from_rows() {
        let row = |n: &str, x: f64, t: f64| Row {
            name: n.into(),
            metrics: json!({"x": x, "prompts": 2, "mean_output_tokens": t, "exact_match": null,
                            "marker_share": 0.5})
            .as_object()
            .unwrap()
            .clone(),
            swap_seconds: 0.1,
            generation_seconds: 1.0,
            error: None,
        };
        let rows = [row("lambda=0", 0.0, 4.0), row("lambda=1", 1.0, 6.0)];
        let c = csv(&rows, Some("lambda"));
        assert!(c.starts_with("name,lambda,prompts,mean_output_tokens"));
        assert!(c.contains("lambda=0,0.0,2,4.0,,0.5,"));
        let s = svg(&rows, Some("lambda"));
        assert!(s.contains("mean output tokens") && s.contains("marker share"));
        assert!(!s.contains("exact-match rate"));
    }
}
