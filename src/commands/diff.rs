//! `aoe diff`: the normalized difference of every weight to the base (docs/semantics.md, "Recipe"), on both
//! metrics, with a per-group summary, as a table, CSV or JSON, and an SVG plot (a layer × group
//! heatmap like the paper's fig. 2 and a histogram per group like its fig. 3).
//!
//! Computing the rows fills the [`StatsStore`] (and through it the on-disk statistics cache),
//! so every later δ decision, plan or plot over the same parents costs nothing.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::model::models::Models;
use crate::recipe::plan::units_of;
use crate::recipe::stats::StatsStore;
use crate::recipe::{Group, Metric};

/// The normalized difference of one weight, max over the parents.
#[derive(Clone, Debug, PartialEq)]
pub struct DiffRow {
    /// The weight's name.
    pub name: String,
    /// Its group (docs/semantics.md, "Groups").
    pub group: Group,
    /// Its decoder layer, if any.
    pub layer: Option<u32>,
    /// The base's dtype, as safetensors spells it (`F8_E4M3`, `BF16`, ...).
    pub dtype: String,
    /// Elements.
    pub numel: u64,
    /// On stored values (FP8 codes without their block scales); NaN if a parent gives NaN.
    pub stored: f64,
    /// On dequantized values (codes × block scales); NaN if a parent gives NaN.
    pub dequantized: f64,
}

impl DiffRow {
    /// The row's value on `metric`.
    pub fn value(&self, metric: Metric) -> f64 {
        match metric {
            Metric::Stored => self.stored,
            Metric::Dequantized => self.dequantized,
        }
    }
}

/// Distribution of one group's values on one metric.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupSummary {
    /// The group.
    pub group: Group,
    /// The metric.
    pub metric: Metric,
    /// Rows of the group (NaN rows included).
    pub count: usize,
    /// Rows whose value is NaN: counted in `count`, left out of min, median and max.
    pub nan: usize,
    /// Smallest non-NaN value (NaN when every row is NaN).
    pub min: f64,
    /// Median of the non-NaN values (mean of the two middle ones for an even count).
    pub median: f64,
    /// Largest non-NaN value.
    pub max: f64,
}

/// Both metrics, in output order.
const METRICS: [Metric; 2] = [Metric::Stored, Metric::Dequantized];

/// How often a long pass saves what it learned, so that an interrupted pass is not lost.
const FLUSH_EVERY: Duration = Duration::from_secs(30);

/// One unit to compute: its index in `units` and the bytes its statistics read.
struct Job {
    unit: usize,
    bytes: u64,
}

/// Computes every row in parallel on `threads` threads (a rayon pool), largest tensors first,
/// calling `progress(bytes_done, bytes_total)` as units complete (bytes of the weight and its
/// scales in every model; never decreasing, the first call is `(0, total)`); rows sorted by
/// name. One row per unit whose base weight has a mixable dtype. Statistics come from and go
/// to `stats`: a second run over a filled cache reads no tensor. The store is flushed to its
/// cache directory every 30 s and at the end (also when a unit fails).
///
/// Both metrics of a unit are computed back to back, so the second pass over a tensor reads
/// it from the page cache. A missing tensor, a shape mismatch or an unmixable dtype in a
/// parent is an error.
pub fn compute(
    models: &Models,
    stats: &StatsStore,
    threads: usize,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<Vec<DiffRow>> {
    if models.list.len() < 2 {
        return Err(Error::BadRecipe {
            reason: "diff needs at least one parent besides the base".into(),
        });
    }
    let base = models.base();
    let units: Vec<_> = units_of(models)
        .into_iter()
        .filter(|u| models.source(0, &u.weight).is_ok_and(|s| s.mixable()))
        .collect();
    let mut jobs: Vec<Job> = units
        .iter()
        .enumerate()
        .map(|(i, u)| {
            let bytes = models
                .list
                .iter()
                .flat_map(|m| {
                    let scale = u
                        .scale
                        .as_deref()
                        .and_then(|s| m.get(s))
                        .map(|(_, t)| t.len);
                    [m.get(&u.weight).map(|(_, t)| t.len), scale]
                })
                .flatten()
                .sum();
            Job { unit: i, bytes }
        })
        .collect();
    // Largest first (ties by name, for a stable order): the last units to finish are small,
    // so the threads finish together.
    jobs.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.unit.cmp(&b.unit)));
    let total: u64 = jobs.iter().map(|j| j.bytes).sum();
    progress(0, total);

    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build()
        .map_err(|e| Error::Threads {
            reason: e.to_string(),
        })?;
    let next = AtomicUsize::new(0);
    let done = Mutex::new(0u64);
    let stop = AtomicBool::new(false);
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    let results: Mutex<Vec<DiffRow>> = Mutex::new(Vec::with_capacity(units.len()));
    let last_flush = Mutex::new(Instant::now());

    let worker = || {
        let mut mine = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let Some(job) = jobs.get(next.fetch_add(1, Ordering::Relaxed)) else {
                break;
            };
            let unit = &units[job.unit];
            let row = (|| -> Result<DiffRow> {
                let stored = stats.max_over_parents(models, &unit.weight, Metric::Stored)?;
                let dequantized =
                    stats.max_over_parents(models, &unit.weight, Metric::Dequantized)?;
                let info =
                    base.get(&unit.weight)
                        .map(|(_, t)| t)
                        .ok_or_else(|| Error::MissingTensor {
                            parent: base.dir.clone(),
                            tensor: unit.weight.clone(),
                        })?;
                Ok(DiffRow {
                    name: unit.weight.clone(),
                    group: unit.group,
                    layer: unit.layer,
                    dtype: info.dtype.to_string(),
                    numel: info.numel() as u64,
                    stored,
                    dequantized,
                })
            })();
            match row {
                Ok(r) => mine.push(r),
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    let mut f = failure.lock().unwrap_or_else(|p| p.into_inner());
                    f.get_or_insert(e);
                    break;
                }
            }
            {
                // Under the lock, so that reports never go backwards.
                let mut d = done.lock().unwrap_or_else(|p| p.into_inner());
                *d += job.bytes;
                progress(*d, total);
            }
            // One thread at a time saves; the others go on computing.
            if let Ok(mut t) = last_flush.try_lock() {
                if t.elapsed() >= FLUSH_EVERY {
                    // A failed intermediate save is retried by the next one and the final one.
                    let _ = stats.flush();
                    *t = Instant::now();
                }
            }
        }
        results
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .append(&mut mine);
    };
    let n = threads.max(1);
    pool.scope(|s| {
        for _ in 0..n {
            s.spawn(|_| worker());
        }
    });
    // Keep what was learned even when a unit failed.
    let flushed = stats.flush();
    if let Some(e) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    if let Err(e) = flushed {
        // The statistics are computed; failing to remember them must not lose them.
        eprintln!("aoe: warning: cannot save δ statistics: {e}");
    }
    let mut rows = results.into_inner().unwrap_or_else(|p| p.into_inner());
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(rows)
}

/// Per group (in group-table order, groups without rows left out) and metric (stored, then
/// dequantized): count, NaN count, and min, median and max of the non-NaN values.
pub fn summarize(rows: &[DiffRow]) -> Vec<GroupSummary> {
    let mut by_group: BTreeMap<Group, Vec<&DiffRow>> = BTreeMap::new();
    for r in rows {
        by_group.entry(r.group).or_default().push(r);
    }
    let mut out = Vec::new();
    for (group, rs) in by_group {
        for metric in METRICS {
            let mut v: Vec<f64> = rs
                .iter()
                .map(|r| r.value(metric))
                .filter(|x| !x.is_nan())
                .collect();
            v.sort_by(f64::total_cmp);
            let (min, median, max) = match v.len() {
                0 => (f64::NAN, f64::NAN, f64::NAN),
                n => {
                    let median = if n % 2 == 1 {
                        v[n / 2]
                    } else {
                        (v[n / 2 - 1] + v[n / 2]) / 2.0
                    };
                    (v[0], median, v[n - 1])
                }
            };
            out.push(GroupSummary {
                group,
                metric,
                count: rs.len(),
                nan: rs.len() - v.len(),
                min,
                median,
                max,
            });
        }
    }
    out
}

/// A value for humans: six significant digits, fixed or scientific by magnitude.
fn fmt_g(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf".into() } else { "-inf".into() };
    }
    if x == 0.0 {
        return "0".into();
    }
    let e = x.abs().log10().floor() as i32;
    if (-4..6).contains(&e) {
        format!("{:.*}", (5 - e).max(0) as usize, x)
    } else {
        format!("{x:.5e}")
    }
}

/// The layer as a table cell: the number, or "-" when there is none.
fn layer_cell(l: Option<u32>) -> String {
    l.map_or_else(|| "-".to_string(), |l| l.to_string())
}

/// Aligned columns (name, group, layer, dtype, numel, stored, dequantized), then the summary.
pub fn write_table(
    rows: &[DiffRow],
    summary: &[GroupSummary],
    w: &mut dyn io::Write,
) -> io::Result<()> {
    const HEAD: [&str; 7] = [
        "name",
        "group",
        "layer",
        "dtype",
        "numel",
        "stored",
        "dequantized",
    ];
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            [
                r.name.clone(),
                r.group.name().to_string(),
                layer_cell(r.layer),
                r.dtype.clone(),
                r.numel.to_string(),
                fmt_g(r.stored),
                fmt_g(r.dequantized),
            ]
        })
        .collect();
    let mut width = HEAD.map(|h| h.chars().count());
    for c in &cells {
        for (k, s) in c.iter().enumerate() {
            width[k] = width[k].max(s.chars().count());
        }
    }
    // name, group and dtype are text (left); the rest are numbers (right).
    let left = [true, true, false, true, false, false, false];
    let line = |w: &mut dyn io::Write, c: &[&str; 7]| -> io::Result<()> {
        let mut s = String::new();
        for k in 0..7 {
            if k > 0 {
                s.push_str("  ");
            }
            let pad = width[k].saturating_sub(c[k].chars().count());
            if left[k] {
                s.push_str(c[k]);
                if k < 6 {
                    s.extend(std::iter::repeat_n(' ', pad));
                }
            } else {
                s.extend(std::iter::repeat_n(' ', pad));
                s.push_str(c[k]);
            }
        }
        writeln!(w, "{}", s.trim_end())
    };
    line(w, &HEAD)?;
    for c in &cells {
        line(w, &[&c[0], &c[1], &c[2], &c[3], &c[4], &c[5], &c[6]])?;
    }

    writeln!(w)?;
    writeln!(
        w,
        "summary: normalized difference to the base, max over parents ({} tensors); NaN values are counted but excluded from min/median/max",
        rows.len()
    )?;
    let sh = ["group", "metric", "count", "NaN", "min", "median", "max"];
    let sc: Vec<[String; 7]> = summary
        .iter()
        .map(|s| {
            [
                s.group.name().to_string(),
                s.metric.name().to_string(),
                s.count.to_string(),
                s.nan.to_string(),
                fmt_g(s.min),
                fmt_g(s.median),
                fmt_g(s.max),
            ]
        })
        .collect();
    let mut sw = sh.map(|h| h.chars().count());
    for c in &sc {
        for (k, s) in c.iter().enumerate() {
            sw[k] = sw[k].max(s.chars().count());
        }
    }
    let sline = |w: &mut dyn io::Write, c: [&str; 7]| -> io::Result<()> {
        writeln!(
            w,
            "{:<a$}  {:<b$}  {:>c$}  {:>d$}  {:>e$}  {:>f$}  {:>g$}",
            c[0],
            c[1],
            c[2],
            c[3],
            c[4],
            c[5],
            c[6],
            a = sw[0],
            b = sw[1],
            c = sw[2],
            d = sw[3],
            e = sw[4],
            f = sw[5],
            g = sw[6]
        )
    };
    sline(w, sh)?;
    for c in &sc {
        sline(w, [&c[0], &c[1], &c[2], &c[3], &c[4], &c[5], &c[6]])?;
    }
    Ok(())
}

/// A CSV field, quoted (RFC 4180) when it holds a comma, quote, line break or edge space.
fn csv_field(s: &str) -> String {
    let needs = s.contains([',', '"', '\n', '\r']) || s.starts_with(' ') || s.ends_with(' ');
    if needs {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// A float for CSV: Rust's shortest round-tripping form; NaN as `NaN`, infinities as `inf`.
fn csv_float(x: f64) -> String {
    if x.is_nan() {
        "NaN".into()
    } else {
        format!("{x}")
    }
}

/// CSV with the header `name,group,layer,dtype,numel,stored,dequantized`; layer empty when
/// there is none; floats at full precision; NaN written as `NaN`.
pub fn write_csv(rows: &[DiffRow], w: &mut dyn io::Write) -> io::Result<()> {
    writeln!(w, "name,group,layer,dtype,numel,stored,dequantized")?;
    for r in rows {
        writeln!(
            w,
            "{},{},{},{},{},{},{}",
            csv_field(&r.name),
            csv_field(r.group.name()),
            r.layer.map(|l| l.to_string()).unwrap_or_default(),
            csv_field(&r.dtype),
            r.numel,
            csv_float(r.stored),
            csv_float(r.dequantized)
        )?;
    }
    Ok(())
}

/// A float for JSON: a number, or null for NaN and infinities.
fn json_float(x: f64) -> Value {
    if x.is_finite() {
        json!(x)
    } else {
        Value::Null
    }
}

/// `{"rows": [...], "summary": [...]}`, one row object per line; NaN as null; layer null when
/// there is none. Summary entries carry group, metric, count, nan, min, median, max.
pub fn write_json(
    rows: &[DiffRow],
    summary: &[GroupSummary],
    w: &mut dyn io::Write,
) -> io::Result<()> {
    let items = |w: &mut dyn io::Write, vals: &mut dyn Iterator<Item = Value>| -> io::Result<()> {
        let mut first = true;
        for v in vals {
            let sep = if first { "\n" } else { ",\n" };
            first = false;
            write!(
                w,
                "{sep}  {}",
                serde_json::to_string(&v).map_err(io::Error::other)?
            )?;
        }
        if !first {
            writeln!(w)?;
        }
        Ok(())
    };
    write!(w, "{{\"rows\": [")?;
    items(
        w,
        &mut rows.iter().map(|r| {
            json!({
                "name": r.name,
                "group": r.group.name(),
                "layer": r.layer,
                "dtype": r.dtype,
                "numel": r.numel,
                "stored": json_float(r.stored),
                "dequantized": json_float(r.dequantized),
            })
        }),
    )?;
    write!(w, "],\n\"summary\": [")?;
    items(
        w,
        &mut summary.iter().map(|s| {
            json!({
                "group": s.group.name(),
                "metric": s.metric.name(),
                "count": s.count,
                "nan": s.nan,
                "min": json_float(s.min),
                "median": json_float(s.median),
                "max": json_float(s.max),
            })
        }),
    )?;
    writeln!(w, "]}}")
}

// ---------------------------------------------------------------------------------------------
// SVG

/// Escapes text for XML character data and attribute values.
fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            // Control characters are not allowed in XML 1.0.
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => o.push('?'),
            c => o.push(c),
        }
    }
    o
}

/// Viridis, sampled at nine points and interpolated linearly: a perceptually ordered
/// sequential scale that survives greyscale printing and colour-vision deficiency.
const VIRIDIS: [(u8, u8, u8); 9] = [
    (0x44, 0x01, 0x54),
    (0x47, 0x2c, 0x7a),
    (0x3b, 0x52, 0x8b),
    (0x2c, 0x72, 0x8e),
    (0x21, 0x91, 0x8c),
    (0x28, 0xae, 0x80),
    (0x5e, 0xc9, 0x62),
    (0xad, 0xdc, 0x30),
    (0xfd, 0xe7, 0x25),
];

/// The colour of `t` in [0, 1] (clamped) as `#rrggbb`.
fn colour(t: f64) -> String {
    let t = if t.is_nan() { 0.0 } else { t.clamp(0.0, 1.0) };
    let x = t * (VIRIDIS.len() - 1) as f64;
    let i = (x.floor() as usize).min(VIRIDIS.len() - 2);
    let f = x - i as f64;
    let (a, b) = (VIRIDIS[i], VIRIDIS[i + 1]);
    let mix = |p: u8, q: u8| (p as f64 + (q as f64 - p as f64) * f).round() as u8;
    format!(
        "#{:02x}{:02x}{:02x}",
        mix(a.0, b.0),
        mix(a.1, b.1),
        mix(a.2, b.2)
    )
}

/// About `n` "nice" tick values (1, 2 or 5 × 10^k apart) covering [lo, hi], and their step.
fn nice_ticks(lo: f64, hi: f64, n: usize) -> (Vec<f64>, f64) {
    if !(lo.is_finite() && hi.is_finite()) || hi <= lo {
        return (vec![lo], 1.0);
    }
    let raw = (hi - lo) / n.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let mut ticks = Vec::new();
    let mut k = (lo / step).ceil();
    // Tolerance: a tick that lands a hair outside the range still belongs to it.
    while k * step <= hi + step * 1e-9 && ticks.len() < 100 {
        let v = k * step;
        ticks.push(if v.abs() < step * 1e-9 { 0.0 } else { v });
        k += 1.0;
    }
    (ticks, step)
}

/// A tick label with as many decimals as the step needs.
fn fmt_tick(v: f64, step: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let step_exp = step.abs().log10().floor();
    let dec = (-step_exp).max(0.0) as usize;
    if dec > 4 || v.abs() >= 1e6 {
        // Enough mantissa digits to tell neighbouring ticks apart, trailing zeros dropped.
        let prec = (v.abs().log10().floor() - step_exp).clamp(0.0, 12.0) as usize;
        let s = format!("{v:.prec$e}");
        match s.split_once('e') {
            Some((m, e)) if m.contains('.') => {
                format!("{}e{e}", m.trim_end_matches('0').trim_end_matches('.'))
            }
            _ => s,
        }
    } else {
        format!("{v:.dec$}")
    }
}

/// Number formatting for coordinates.
fn f(x: f64) -> String {
    format!("{x:.1}")
}

const W: f64 = 960.0;
const FONT: &str = "font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\"";

/// A layer × group heatmap of the mean of `metric` per cell (paper fig. 2) and a histogram of
/// `metric` per group (fig. 3), as a self-contained SVG document. NaN values are left out of
/// means and histograms (and counted in the titles); a cell whose rows are all NaN is grey;
/// cells without rows are blank. Tensors without a layer sit in the row labelled "—".
pub fn plot_svg(rows: &[DiffRow], metric: Metric) -> String {
    let mut s = String::new();
    let groups: Vec<Group> = {
        let mut g: Vec<Group> = rows.iter().map(|r| r.group).collect();
        g.sort();
        g.dedup();
        g
    };
    let title = format!(
        "Normalized difference to the base ({}), max over parents",
        metric.name()
    );
    if rows.is_empty() {
        let h = 120.0;
        let _ = write!(
            s,
            "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {W} {h}\" width=\"{W}\" height=\"{h}\" {FONT}>\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
             <text x=\"{x}\" y=\"36\" font-size=\"18\" text-anchor=\"middle\">{t}</text>\n\
             <text x=\"{x}\" y=\"76\" font-size=\"14\" text-anchor=\"middle\" fill=\"#555\">no tensors to compare</text>\n\
             </svg>\n",
            x = W / 2.0,
            t = esc(&title)
        );
        return s;
    }

    // Heatmap cells: (layer row, group column) → (sum, finite count, NaN count).
    let mut layers: Vec<Option<u32>> = rows.iter().map(|r| r.layer).collect();
    layers.sort_by_key(|l| (l.is_none(), *l));
    layers.dedup();
    let mut cells: BTreeMap<(usize, usize), (f64, usize, usize)> = BTreeMap::new();
    for r in rows {
        let li = layers
            .binary_search_by_key(&(r.layer.is_none(), r.layer), |l| (l.is_none(), *l))
            .unwrap_or(0);
        let gi = groups.binary_search(&r.group).unwrap_or(0);
        let e = cells.entry((li, gi)).or_insert((0.0, 0, 0));
        let v = r.value(metric);
        if v.is_finite() {
            e.0 += v;
            e.1 += 1;
        } else {
            e.2 += 1;
        }
    }
    let means: Vec<f64> = cells
        .values()
        .filter(|c| c.1 > 0)
        .map(|c| c.0 / c.1 as f64)
        .collect();
    let (mut lo, mut hi) = means
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &m| {
            (a.min(m), b.max(m))
        });
    if means.is_empty() {
        (lo, hi) = (0.0, 1.0);
    } else if hi <= lo {
        let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.05 };
        (lo, hi) = (lo - pad, hi + pad);
    }

    let x0 = 80.0;
    let y0 = 96.0;
    let col_w = ((W - x0 - 180.0) / groups.len() as f64).min(100.0);
    let cell_h = (620.0 / layers.len() as f64).clamp(10.0, 24.0);
    let heat_h = cell_h * layers.len() as f64;
    let heat_w = col_w * groups.len() as f64;
    let ng = groups.len();
    let panel_w = (W - 60.0) / 2.0;
    let panel_h = 250.0;
    let hist_y0 = y0 + heat_h + 70.0;
    let height = hist_y0 + (ng.div_ceil(2) as f64) * (panel_h + 24.0) + 10.0;

    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {W} {h}\" width=\"{W}\" height=\"{h}\" {FONT}>",
        h = f(height)
    );
    let _ = writeln!(s, "<title>{}</title>", esc(&title));
    let _ = writeln!(s, "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>");
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"30\" font-size=\"18\" text-anchor=\"middle\">{}</text>",
        f(W / 2.0),
        esc(&title)
    );
    let nan_rows = rows.iter().filter(|r| !r.value(metric).is_finite()).count();
    let grey = cells.values().any(|c| c.1 == 0);
    let sub = format!(
        "{} tensors; cell colour = mean per layer and group{}{}",
        rows.len(),
        if nan_rows > 0 {
            format!(" ({nan_rows} NaN/inf excluded)")
        } else {
            String::new()
        },
        if grey { "; grey: only NaN/inf" } else { "" }
    );
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"52\" font-size=\"12\" text-anchor=\"middle\" fill=\"#444\">{}</text>",
        f(W / 2.0),
        esc(&sub)
    );

    // Column labels and the layer axis title.
    for (gi, g) in groups.iter().enumerate() {
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" font-size=\"12\" text-anchor=\"middle\">{}</text>",
            f(x0 + (gi as f64 + 0.5) * col_w),
            f(y0 - 8.0),
            esc(g.name())
        );
    }
    let _ = writeln!(
        s,
        "<text transform=\"translate({},{}) rotate(-90)\" font-size=\"12\" text-anchor=\"middle\">layer</text>",
        f(x0 - 48.0),
        f(y0 + heat_h / 2.0)
    );
    // Row labels: every row when they fit, else every fifth layer, the last one and "—".
    for (li, l) in layers.iter().enumerate() {
        let show = cell_h >= 12.0 || l.is_none_or(|l| l % 5 == 0) || li + 1 == layers.len();
        if show {
            let text = l.map_or_else(|| "\u{2014}".to_string(), |l| l.to_string());
            let _ = writeln!(
                s,
                "<text x=\"{}\" y=\"{}\" font-size=\"{}\" text-anchor=\"end\" dominant-baseline=\"central\">{}</text>",
                f(x0 - 6.0),
                f(y0 + (li as f64 + 0.5) * cell_h),
                f(cell_h.clamp(9.0, 12.0)),
                esc(&text)
            );
        }
    }
    // Cells.
    let _ = writeln!(s, "<g stroke=\"white\" stroke-width=\"0.5\">");
    for (&(li, gi), &(sum, n, nans)) in &cells {
        let (fill, what) = if n > 0 {
            let m = sum / n as f64;
            (
                colour((m - lo) / (hi - lo)),
                format!("mean {} over {n} tensors", fmt_g(m)),
            )
        } else {
            ("#bbbbbb".to_string(), "all NaN/inf".to_string())
        };
        let nan_note = if nans > 0 && n > 0 {
            format!(", {nans} NaN/inf excluded")
        } else {
            String::new()
        };
        let layer = layers[li].map_or_else(|| "no layer".to_string(), |l| format!("layer {l}"));
        let _ = writeln!(
            s,
            "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"{fill}\"><title>{}</title></rect>",
            f(x0 + gi as f64 * col_w),
            f(y0 + li as f64 * cell_h),
            f(col_w),
            f(cell_h),
            esc(&format!("{}, {layer}: {what}{nan_note}", groups[gi].name()))
        );
    }
    let _ = writeln!(s, "</g>");
    let _ = writeln!(
        s,
        "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#888\" stroke-width=\"0.8\"/>",
        f(x0),
        f(y0),
        f(heat_w),
        f(heat_h)
    );

    // Legend: a vertical gradient, high values on top, with ticks.
    let lx = x0 + heat_w + 40.0;
    let lh = heat_h.clamp(120.0, 320.0);
    let _ = writeln!(
        s,
        "<defs><linearGradient id=\"scale\" x1=\"0\" y1=\"1\" x2=\"0\" y2=\"0\">"
    );
    for k in 0..=16 {
        let t = k as f64 / 16.0;
        let _ = writeln!(s, "<stop offset=\"{t:.4}\" stop-color=\"{}\"/>", colour(t));
    }
    let _ = writeln!(s, "</linearGradient></defs>");
    let _ = writeln!(
        s,
        "<text x=\"{x}\" y=\"{}\" font-size=\"12\">mean</text><text x=\"{x}\" y=\"{}\" font-size=\"12\">{}</text>",
        f(y0 - 24.0),
        f(y0 - 8.0),
        esc(metric.name()),
        x = f(lx)
    );
    let _ = writeln!(
        s,
        "<rect x=\"{}\" y=\"{}\" width=\"18\" height=\"{}\" fill=\"url(#scale)\" stroke=\"#888\" stroke-width=\"0.8\"/>",
        f(lx),
        f(y0),
        f(lh)
    );
    let (ticks, step) = nice_ticks(lo, hi, 5);
    for t in ticks {
        let y = y0 + lh - (t - lo) / (hi - lo) * lh;
        let _ = writeln!(
            s,
            "<line x1=\"{a}\" y1=\"{y}\" x2=\"{b}\" y2=\"{y}\" stroke=\"#333\"/><text x=\"{c}\" y=\"{y}\" font-size=\"11\" dominant-baseline=\"central\">{}</text>",
            esc(&fmt_tick(t, step)),
            a = f(lx + 18.0),
            b = f(lx + 23.0),
            c = f(lx + 26.0),
            y = f(y)
        );
    }
    if grey {
        let _ = writeln!(
            s,
            "<rect x=\"{}\" y=\"{}\" width=\"18\" height=\"12\" fill=\"#bbbbbb\"/><text x=\"{}\" y=\"{}\" font-size=\"11\" dominant-baseline=\"central\">NaN/inf</text>",
            f(lx),
            f(y0 + lh + 14.0),
            f(lx + 26.0),
            f(y0 + lh + 20.0)
        );
    }

    // Histograms, two per row.
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" font-size=\"15\" text-anchor=\"middle\">Distribution per group ({})</text>",
        f(W / 2.0),
        f(hist_y0 - 22.0),
        esc(metric.name())
    );
    for (gi, g) in groups.iter().enumerate() {
        let px = 20.0 + (gi % 2) as f64 * (panel_w + 20.0);
        let py = hist_y0 + (gi / 2) as f64 * (panel_h + 24.0);
        let vals: Vec<f64> = rows
            .iter()
            .filter(|r| r.group == *g)
            .map(|r| r.value(metric))
            .collect();
        histogram(&mut s, *g, metric, &vals, px, py, panel_w, panel_h);
    }
    s.push_str("</svg>\n");
    s
}

/// Bins of a histogram.
const BINS: usize = 30;

/// One histogram panel at (px, py) of size (pw, ph).
#[allow(clippy::too_many_arguments)]
fn histogram(
    s: &mut String,
    g: Group,
    metric: Metric,
    vals: &[f64],
    px: f64,
    py: f64,
    pw: f64,
    ph: f64,
) {
    let finite: Vec<f64> = vals.iter().copied().filter(|v| v.is_finite()).collect();
    let excluded = vals.len() - finite.len();
    let (ml, mr, mt, mb) = (58.0, 14.0, 30.0, 42.0);
    let (ax, ay, aw, ah) = (px + ml, py + mt, pw - ml - mr, ph - mt - mb);
    let head = format!(
        "{} \u{2014} {} tensor{}{}",
        g.name(),
        vals.len(),
        if vals.len() == 1 { "" } else { "s" },
        if excluded > 0 {
            format!(" ({excluded} NaN/inf excluded)")
        } else {
            String::new()
        }
    );
    let _ = writeln!(s, "<g>");
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" font-size=\"13\" text-anchor=\"middle\" font-weight=\"bold\">{}</text>",
        f(px + pw / 2.0),
        f(py + 16.0),
        esc(&head)
    );
    let axis_label = format!("normalized difference ({})", metric.name());
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" font-size=\"11\" text-anchor=\"middle\">{}</text>",
        f(ax + aw / 2.0),
        f(ay + ah + 36.0),
        esc(&axis_label)
    );
    let _ = writeln!(
        s,
        "<text transform=\"translate({},{}) rotate(-90)\" font-size=\"11\" text-anchor=\"middle\">tensors</text>",
        f(px + 12.0),
        f(ay + ah / 2.0)
    );
    if finite.is_empty() {
        let _ = writeln!(
            s,
            "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#888\"/><text x=\"{}\" y=\"{}\" font-size=\"12\" text-anchor=\"middle\" fill=\"#555\">no finite values</text>\n</g>",
            f(ax),
            f(ay),
            f(aw),
            f(ah),
            f(ax + aw / 2.0),
            f(ay + ah / 2.0)
        );
        return;
    }
    let (mut lo, mut hi) = finite
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    if hi <= lo {
        let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.05 };
        (lo, hi) = (lo - pad, hi + pad);
    }
    let width = (hi - lo) / BINS as f64;
    let mut counts = [0usize; BINS];
    for v in &finite {
        let b = (((v - lo) / width).floor() as isize).clamp(0, BINS as isize - 1) as usize;
        counts[b] += 1;
    }
    let cmax = counts.iter().copied().max().unwrap_or(1).max(1);
    // Head room above the tallest bar for its count.
    let (yticks, ystep) = nice_ticks(0.0, cmax as f64, 4);
    let ystep = ystep.max(1.0);
    let ytop = (cmax as f64 * 1.18).max(yticks.last().copied().unwrap_or(1.0));
    let bw = aw / BINS as f64;
    // Grid and y ticks.
    for t in yticks
        .iter()
        .filter(|t| t.fract() == 0.0 && (**t as usize) as f64 == **t)
    {
        let y = ay + ah - t / ytop * ah;
        let _ = writeln!(
            s,
            "<line x1=\"{a}\" y1=\"{y}\" x2=\"{b}\" y2=\"{y}\" stroke=\"#e4e4e4\"/><text x=\"{c}\" y=\"{y}\" font-size=\"10\" text-anchor=\"end\" dominant-baseline=\"central\">{}</text>",
            fmt_tick(*t, ystep),
            a = f(ax),
            b = f(ax + aw),
            c = f(ax - 5.0),
            y = f(y)
        );
    }
    // Bars, each with its count above it (rotated when bars are narrow).
    for (b, &c) in counts.iter().enumerate() {
        if c == 0 {
            continue;
        }
        let h = c as f64 / ytop * ah;
        let x = ax + b as f64 * bw;
        let (b0, b1) = (lo + b as f64 * width, lo + (b + 1) as f64 * width);
        let close = if b + 1 == BINS { "]" } else { ")" };
        let _ = writeln!(
            s,
            "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"#3b528b\" stroke=\"white\" stroke-width=\"0.5\"><title>{}</title></rect>",
            f(x),
            f(ay + ah - h),
            f(bw),
            f(h),
            esc(&format!("[{}, {}{close}: {c} tensors", fmt_g(b0), fmt_g(b1)))
        );
        let _ = writeln!(
            s,
            "<text transform=\"translate({},{}) rotate(-90)\" font-size=\"9\" fill=\"#333\" dominant-baseline=\"central\">{c}</text>",
            f(x + bw / 2.0),
            f(ay + ah - h - 3.0)
        );
    }
    // Axes and x ticks.
    let _ = writeln!(
        s,
        "<path d=\"M{} {}V{}H{}\" fill=\"none\" stroke=\"#333\"/>",
        f(ax),
        f(ay),
        f(ay + ah),
        f(ax + aw)
    );
    let (xticks, xstep) = nice_ticks(lo, hi, 5);
    for t in xticks {
        let x = ax + (t - lo) / (hi - lo) * aw;
        let _ = writeln!(
            s,
            "<line x1=\"{x}\" y1=\"{a}\" x2=\"{x}\" y2=\"{b}\" stroke=\"#333\"/><text x=\"{x}\" y=\"{c}\" font-size=\"10\" text-anchor=\"middle\">{}</text>",
            esc(&fmt_tick(t, xstep)),
            x = f(x),
            a = f(ay + ah),
            b = f(ay + ah + 4.0),
            c = f(ay + ah + 16.0)
        );
    }
    let _ = writeln!(s, "</g>");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, group: Group, layer: Option<u32>, stored: f64, dequantized: f64) -> DiffRow {
        DiffRow {
            name: name.into(),
            group,
            layer,
            dtype: "F8_E4M3".into(),
            numel: 16,
            stored,
            dequantized,
        }
    }

    /// A tiny XML well-formedness check: tags balance, attributes are quoted, entities are
    /// known, and there is one root element.
    fn check_xml(s: &str) {
        let mut stack: Vec<String> = Vec::new();
        let mut roots = 0;
        let mut rest = s;
        while let Some(i) = rest.find(['<', '&']) {
            let text = &rest[..i];
            assert!(!text.contains('>'), "stray '>' in text {text:?}");
            if !text.trim().is_empty() {
                assert!(!stack.is_empty(), "text outside the root: {text:?}");
            }
            rest = &rest[i..];
            if rest.starts_with('&') {
                let end = rest.find(';').expect("unterminated entity");
                let ent = &rest[1..end];
                assert!(
                    ["amp", "lt", "gt", "quot", "apos"].contains(&ent) || ent.starts_with('#'),
                    "unknown entity {ent}"
                );
                rest = &rest[end + 1..];
                continue;
            }
            let end = rest.find('>').expect("unterminated tag");
            let tag = &rest[1..end];
            assert!(!tag.contains('<'), "'<' inside tag {tag:?}");
            assert_eq!(
                tag.matches('"').count() % 2,
                0,
                "unbalanced quotes in {tag:?}"
            );
            rest = &rest[end + 1..];
            if tag.starts_with('?') || tag.starts_with('!') {
                continue;
            }
            if let Some(name) = tag.strip_prefix('/') {
                let open = stack.pop().expect("close without open");
                assert_eq!(open, name.trim(), "mismatched close tag");
                continue;
            }
            let name: String = tag
                .chars()
                .take_while(|c| !c.is_whitespace() && *c != '/')
                .collect();
            assert!(!name.is_empty(), "empty tag name");
            if stack.is_empty() {
                roots += 1;
            }
            if !tag.ends_with('/') {
                stack.push(name);
            }
        }
        assert!(rest.trim().is_empty(), "trailing text {rest:?}");
        assert!(stack.is_empty(), "unclosed tags {stack:?}");
        assert_eq!(roots, 1, "one root element");
    }

    #[test]
    fn summarize_median_odd_even_and_nan() {
        let rows = vec![
            row("a", Group::Experts, Some(3), 3.0, 0.3),
            row("b", Group::Experts, Some(3), 1.0, 0.1),
            row("c", Group::Experts, Some(4), 2.0, f64::NAN),
            row("d", Group::Attention, Some(0), 5.0, 0.5),
            row("e", Group::Attention, Some(1), f64::NAN, f64::NAN),
            row("f", Group::Attention, Some(2), 1.0, 0.25),
            row("g", Group::Attention, Some(3), 4.0, 0.75),
            row("h", Group::Attention, Some(4), 2.0, 0.5),
            row("i", Group::Norms, None, f64::NAN, f64::NAN),
        ];
        let s = summarize(&rows);
        let find = |g: Group, m: Metric| {
            s.iter()
                .find(|x| x.group == g && x.metric == m)
                .unwrap()
                .clone()
        };
        // Groups in table order, stored before dequantized.
        let order: Vec<(Group, Metric)> = s.iter().map(|x| (x.group, x.metric)).collect();
        assert_eq!(
            order,
            vec![
                (Group::Experts, Metric::Stored),
                (Group::Experts, Metric::Dequantized),
                (Group::Norms, Metric::Stored),
                (Group::Norms, Metric::Dequantized),
                (Group::Attention, Metric::Stored),
                (Group::Attention, Metric::Dequantized),
            ]
        );
        // Odd count: the middle value.
        let e = find(Group::Experts, Metric::Stored);
        assert_eq!(
            (e.count, e.nan, e.min, e.median, e.max),
            (3, 0, 1.0, 2.0, 3.0)
        );
        // Even count after excluding a NaN: the mean of the middle two.
        let e = find(Group::Experts, Metric::Dequantized);
        assert_eq!((e.count, e.nan, e.min, e.max), (3, 1, 0.1, 0.3));
        assert!((e.median - 0.2).abs() < 1e-15);
        let a = find(Group::Attention, Metric::Stored);
        assert_eq!(
            (a.count, a.nan, a.min, a.median, a.max),
            (5, 1, 1.0, 3.0, 5.0)
        );
        let a = find(Group::Attention, Metric::Dequantized);
        assert_eq!(
            (a.count, a.nan, a.min, a.median, a.max),
            (5, 1, 0.25, 0.5, 0.75)
        );
        // All NaN: NaN statistics.
        let n = find(Group::Norms, Metric::Stored);
        assert_eq!((n.count, n.nan), (1, 1));
        assert!(n.min.is_nan() && n.median.is_nan() && n.max.is_nan());
        assert!(summarize(&[]).is_empty());
    }

    #[test]
    fn csv_header_quoting_and_floats() {
        let rows = vec![
            row(
                "model.layers.3.mlp.experts.0.up_proj.weight",
                Group::Experts,
                Some(3),
                0.1 + 0.2,
                1e-7,
            ),
            row("odd,\"name\"", Group::Other, None, f64::NAN, 2.5),
            row("line\nbreak", Group::Norms, None, 0.0, f64::INFINITY),
        ];
        let mut out = Vec::new();
        write_csv(&rows, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.split_inclusive('\n').collect();
        assert_eq!(
            lines[0],
            "name,group,layer,dtype,numel,stored,dequantized\n"
        );
        assert_eq!(lines[1], "model.layers.3.mlp.experts.0.up_proj.weight,experts,3,F8_E4M3,16,0.30000000000000004,0.0000001\n");
        assert_eq!(lines[2], "\"odd,\"\"name\"\"\",other,,F8_E4M3,16,NaN,2.5\n");
        assert_eq!(lines[3], "\"line\n");
        assert_eq!(lines[4], "break\",norms,,F8_E4M3,16,0,inf\n");
        // Full precision: values parse back to the same bits.
        let v: f64 = lines[1]
            .trim_end()
            .rsplit(',')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(v.to_bits(), (0.1f64 + 0.2).to_bits());
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field(" lead"), "\" lead\"");
    }

    #[test]
    fn json_nan_is_null_and_parses() {
        let rows = vec![
            row("a", Group::Experts, Some(3), 1.5, f64::NAN),
            row("b", Group::Embeddings, None, 0.25, 0.125),
        ];
        let mut out = Vec::new();
        write_json(&rows, &summarize(&rows), &mut out).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        let r = v["rows"].as_array().unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0]["name"], "a");
        assert_eq!(r[0]["layer"], 3);
        assert_eq!(r[0]["stored"], 1.5);
        assert!(r[0]["dequantized"].is_null());
        assert!(r[1]["layer"].is_null());
        let s = v["summary"].as_array().unwrap();
        assert_eq!(s.len(), 4);
        assert_eq!(s[1]["metric"], "dequantized");
        assert_eq!(s[1]["nan"], 1);
        assert!(s[1]["median"].is_null());
        // Empty input is valid JSON too.
        let mut out = Vec::new();
        write_json(&[], &[], &mut out).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v, json!({"rows": [], "summary": []}));
    }

    #[test]
    fn table_aligns_and_notes_nan() {
        let rows = vec![
            row(
                "model.layers.3.mlp.experts.0.up_proj.weight",
                Group::Experts,
                Some(3),
                1.25,
                0.001,
            ),
            row("lm_head.weight", Group::Embeddings, None, f64::NAN, 0.5),
        ];
        let mut out = Vec::new();
        write_table(&rows, &summarize(&rows), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("name"));
        // Right-aligned numeric columns end at the same column.
        assert_eq!(lines[0].len(), lines[1].len());
        assert_eq!(lines[1].len(), lines[2].len());
        assert!(lines[2].contains("NaN"));
        assert!(text.contains("excluded from min/median/max"));
        assert!(text.contains("embeddings"));
    }

    #[test]
    fn svg_empty_is_well_formed() {
        let s = plot_svg(&[], Metric::Stored);
        check_xml(&s);
        assert!(s.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox="));
        assert!(s.contains("no tensors"));
    }

    #[test]
    fn svg_small_is_well_formed() {
        let mut rows = Vec::new();
        for l in 0..4 {
            for j in 0..3 {
                rows.push(row(
                    &format!("model.layers.{l}.mlp.experts.{j}.up_proj.weight"),
                    Group::Experts,
                    Some(l),
                    l as f64 + j as f64 * 0.1,
                    0.001,
                ));
            }
            rows.push(row(
                &format!("model.layers.{l}.self_attn.o_proj.weight"),
                Group::Attention,
                Some(l),
                0.5,
                0.0,
            ));
        }
        rows.push(row(
            "model.norm.weight",
            Group::Norms,
            None,
            f64::NAN,
            f64::NAN,
        ));
        rows.push(row("lm_head.weight", Group::Embeddings, None, 0.75, 0.1));
        let s = plot_svg(&rows, Metric::Stored);
        check_xml(&s);
        assert!(s.contains("viewBox"));
        // Three columns of cells plus ..., one row per layer plus "—".
        for g in ["experts", "attention", "norms", "embeddings"] {
            assert!(s.contains(&format!(">{g}<")), "column {g}");
        }
        assert!(s.contains(">\u{2014}<"));
        // 4 layers × 2 groups + norms + embeddings cells.
        assert!(s.matches("<rect x=").count() >= 10);
        assert!(s.contains("all NaN"));
        assert!(s.contains("linearGradient"));
        // One histogram per group.
        assert_eq!(
            s.matches("normalized difference (stored)</text>").count(),
            4
        );
        // Constant-valued and single-row groups plot without NaN coordinates.
        assert!(!s.contains("NaN\""));
        assert!(!s.contains("=\"inf"));
        // Dequantized plot too.
        check_xml(&plot_svg(&rows, Metric::Dequantized));
    }

    #[test]
    fn escapes_and_ticks() {
        assert_eq!(esc("a<b&\"c\"'>"), "a&lt;b&amp;&quot;c&quot;&apos;&gt;");
        let (t, step) = nice_ticks(0.0, 1.0, 5);
        assert_eq!(step, 0.2);
        assert_eq!(t.len(), 6);
        assert_eq!(fmt_tick(0.4, 0.2), "0.4");
        assert_eq!(fmt_tick(3.0, 1.0), "3");
        let (t, _) = nice_ticks(0.00123, 0.00456, 5);
        assert!(t.iter().all(|&v| (0.00123..=0.00456).contains(&v)));
        assert_eq!(colour(0.0), "#440154");
        assert_eq!(colour(1.0), "#fde725");
        assert_eq!(fmt_g(1.25), "1.25000");
        assert_eq!(fmt_g(0.000123), "0.000123000");
        assert_eq!(fmt_g(1.5e-7), "1.50000e-7");
        assert_eq!(fmt_tick(1.28e-4, 2e-6), "1.28e-4");
        assert_eq!(fmt_tick(2.5e-4, 5e-5), "2.5e-4");
        assert_eq!(fmt_tick(2e-4, 5e-5), "2e-4");
        assert_eq!(fmt_tick(0.0005, 0.0001), "0.0005");
    }
}
