//! The δ statistic: ‖W_base − W_parent‖_F / sqrt(numel), in f64, per weight and metric,
//! remembered in memory and in an on-disk cache keyed by the two checkpoints' identities.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_json::{json, Map, Value};

use crate::error::{Error, Result};
use crate::kernels;
use crate::model::dtype::DType;
use crate::model::models::{Models, TensorSource};
use crate::recipe::Metric;

/// Rows per block of the statistic's fixed summation order (block sums are added in order).
const STAT_ROWS: usize = kernels::FP8_BLOCK;

/// Computes the normalized difference of weight `name` between the base and model `i`.
pub fn normalized_diff(models: &Models, i: usize, name: &str, metric: Metric) -> Result<f64> {
    let a = models.source(0, name)?;
    let b = models.source(i, name)?;
    if a.is_mxfp4() {
        return mxfp4_diff(&a, &b, metric);
    }
    for s in [&a, &b] {
        if !s.info.dtype.is_mixable() {
            return Err(Error::UnsupportedDtype {
                path: s.shard.path.clone(),
                tensor: name.to_string(),
                dtype: s.info.dtype.to_string(),
            });
        }
    }
    let numel = a.info.numel();
    let (rows, cols) = a.info.rows_cols();
    let band = if a.info.shape.len() >= 2 {
        STAT_ROWS * cols
    } else {
        numel.max(1)
    };
    // One accumulator over the whole tensor: the sum does not depend on how it is cut.
    let mut acc = kernels::SqDiffAcc::new();
    let (mut fa, mut fb, mut sa, mut sb) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut bufa, mut bufb) = (Vec::new(), Vec::new());
    let mut e0 = 0;
    while e0 < numel {
        let e1 = (e0 + band).min(numel);
        let (ba, bb) = (
            a.read_elements(e0, e1, &mut bufa)?,
            b.read_elements(e0, e1, &mut bufb)?,
        );
        match metric {
            Metric::Stored => acc.add_bytes(a.info.dtype, ba, b.info.dtype, bb),
            Metric::Dequantized => {
                let r0 = e0 / cols.max(1);
                let r1 = (e1 / cols.max(1)).min(rows);
                dequantize(&a, ba, r0, r1, cols, &mut sa, &mut fa)?;
                dequantize(&b, bb, r0, r1, cols, &mut sb, &mut fb)?;
                acc.add(&fa, &fb);
            }
        }
        e0 = e1;
    }
    Ok(acc.sum().sqrt() / (numel as f64).sqrt())
}

/// The statistic of an MXFP4 base unit against a parent's copy (MXFP4 or plain floats), over
/// values: "stored" takes the E2M1 values without their block exponents (as FP8 codes without
/// their scales), "dequantized" the values times their exponents.
fn mxfp4_diff(a: &TensorSource<'_>, b: &TensorSource<'_>, metric: Metric) -> Result<f64> {
    use kernels::{MXFP4_BLOCK, MXFP4_BLOCK_BYTES};
    let numel = a.values();
    // 4096 blocks (128 Ki values) at a time.
    let band = 4096 * MXFP4_BLOCK;
    let mut acc = kernels::SqDiffAcc::new();
    let (mut fa, mut fb) = (Vec::new(), Vec::new());
    let (mut bufa, mut bufb, mut ea, mut eb) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let values = |s: &TensorSource<'_>,
                  v0: usize,
                  v1: usize,
                  buf: &mut Vec<u8>,
                  e: &mut Vec<u8>,
                  out: &mut Vec<f32>|
     -> Result<()> {
        out.clear();
        out.resize(v1 - v0, 0.0);
        if s.is_mxfp4() {
            let (g0, g1) = (v0 / MXFP4_BLOCK, v1.div_ceil(MXFP4_BLOCK));
            let blocks = s.read_elements(g0 * MXFP4_BLOCK_BYTES, g1 * MXFP4_BLOCK_BYTES, buf)?;
            match metric {
                Metric::Dequantized => s.mx_scale_bytes(g0, g1, e)?,
                // Exponent 127 is 2^0: the E2M1 values as they are.
                Metric::Stored => {
                    e.clear();
                    e.resize(g1 - g0, 127);
                }
            }
            let _ = kernels::decode_mxfp4(blocks, e, out);
        } else {
            let bytes = s.read_elements(v0, v1, buf)?;
            kernels::decode(s.info.dtype, bytes, out);
        }
        Ok(())
    };
    let mut v0 = 0;
    while v0 < numel {
        let v1 = (v0 + band).min(numel);
        values(a, v0, v1, &mut bufa, &mut ea, &mut fa)?;
        values(b, v0, v1, &mut bufb, &mut eb, &mut fb)?;
        acc.add(&fa, &fb);
        v0 = v1;
    }
    Ok(acc.sum().sqrt() / (numel as f64).sqrt())
}

/// Whether the stored-value statistic between the base and model `i` is zero, positive or NaN,
/// without computing it when the dtypes agree (one compare pass instead of f64 squares):
/// all that δ = 0 needs.
pub fn stored_diff_sign(models: &Models, i: usize, name: &str) -> Result<kernels::DiffSign> {
    let a = models.source(0, name)?;
    let b = models.source(i, name)?;
    if a.info.dtype != b.info.dtype || !a.info.dtype.is_mixable() {
        return Ok(kernels::sign_of_sum(normalized_diff(
            models,
            i,
            name,
            Metric::Stored,
        )?));
    }
    let numel = a.info.numel();
    let band = (4 << 20) / a.info.dtype.size();
    let (mut bufa, mut bufb) = (Vec::new(), Vec::new());
    let mut sign = kernels::DiffSign::Zero;
    let mut e0 = 0;
    while e0 < numel {
        let e1 = (e0 + band).min(numel);
        let (ba, bb) = (
            a.read_elements(e0, e1, &mut bufa)?,
            b.read_elements(e0, e1, &mut bufb)?,
        );
        match kernels::diff_sign_bytes(a.info.dtype, ba, b.info.dtype, bb) {
            Some(kernels::DiffSign::NaN) => return Ok(kernels::DiffSign::NaN),
            Some(kernels::DiffSign::Positive) => sign = kernels::DiffSign::Positive,
            Some(kernels::DiffSign::Zero) => {}
            None => {
                return Ok(kernels::sign_of_sum(normalized_diff(
                    models,
                    i,
                    name,
                    Metric::Stored,
                )?))
            }
        }
        e0 = e1;
    }
    if numel == 0 {
        return Ok(kernels::DiffSign::NaN); // 0/0, as the statistic itself
    }
    Ok(sign)
}

/// Values of rows `[r0, r1)` as f32, FP8 times its block scales.
fn dequantize(
    s: &TensorSource<'_>,
    bytes: &[u8],
    r0: usize,
    r1: usize,
    cols: usize,
    scales: &mut Vec<f32>,
    out: &mut Vec<f32>,
) -> Result<()> {
    out.clear();
    out.resize(bytes.len() / s.info.dtype.size(), 0.0);
    if s.info.dtype == DType::F8E4M3 && s.scale.is_some() {
        s.scale_rows(r0 / STAT_ROWS, r1.div_ceil(STAT_ROWS), scales)?;
        kernels::dequant_fp8(bytes, cols, scales, out);
    } else {
        kernels::decode(s.info.dtype, bytes, out);
    }
    Ok(())
}

/// Maximum with NaN propagating (numpy semantics): one NaN donor keeps the base.
pub fn nan_max(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

/// Pair statistics for one (base, parent) pair, as remembered.
#[derive(Default)]
struct PairStats {
    /// File the pair is kept in (None: memory only).
    file: Option<PathBuf>,
    /// weight name → [stored, dequantized, sign of stored (0, 1 or NaN)].
    values: HashMap<String, [Option<f64>; 3]>,
    dirty: bool,
}

/// Memory and disk cache of δ statistics, shared by every variant of a set of models.
pub struct StatsStore {
    pairs: Vec<Mutex<PairStats>>,
}

fn slot(metric: Metric) -> usize {
    match metric {
        Metric::Stored => 0,
        Metric::Dequantized => 1,
    }
}

impl StatsStore {
    /// A store for `models`, loading what `cache_dir` (if any) remembers of each pair.
    pub fn new(models: &Models, cache_dir: Option<&Path>) -> StatsStore {
        let base_id = models.base().identity();
        let pairs = models
            .list
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let mut p = PairStats::default();
                if let (Some(dir), true) = (cache_dir, i > 0) {
                    use sha2::{Digest, Sha256};
                    // The version salt retires statistics computed with another summation order.
                    let h = Sha256::digest(
                        format!("aoe-stats-v2\0{base_id}\0{}", m.identity()).as_bytes(),
                    );
                    let hex: String = h.iter().take(12).map(|b| format!("{b:02x}")).collect();
                    let file = dir.join(format!("stats-{hex}.json"));
                    p.values = load(&file).unwrap_or_default();
                    p.file = Some(file);
                }
                Mutex::new(p)
            })
            .collect();
        StatsStore { pairs }
    }

    /// The remembered statistic, if any.
    pub fn cached(&self, i: usize, name: &str, metric: Metric) -> Option<f64> {
        let p = self.pairs.get(i)?.lock().ok()?;
        p.values.get(name).and_then(|v| v[slot(metric)])
    }

    /// A remembered sign of the stored statistic, as 0, 1 or NaN.
    fn cached_sign(&self, i: usize, name: &str) -> Option<f64> {
        let p = self.pairs.get(i)?.lock().ok()?;
        p.values.get(name).and_then(|v| v[2])
    }

    fn remember_sign(&self, i: usize, name: &str, sign: kernels::DiffSign) {
        let v = match sign {
            kernels::DiffSign::Zero => 0.0,
            kernels::DiffSign::Positive => 1.0,
            kernels::DiffSign::NaN => f64::NAN,
        };
        if let Some(Ok(mut p)) = self.pairs.get(i).map(|m| m.lock()) {
            p.values.entry(name.to_string()).or_default()[2] = Some(v);
            p.dirty = true;
        }
    }

    /// The statistic of weight `name` between the base and model `i`, computed on first use.
    pub fn get(&self, models: &Models, i: usize, name: &str, metric: Metric) -> Result<f64> {
        if let Some(v) = self.cached(i, name, metric) {
            return Ok(v);
        }
        let v = normalized_diff(models, i, name, metric)?;
        if let Some(Ok(mut p)) = self.pairs.get(i).map(|m| m.lock()) {
            p.values.entry(name.to_string()).or_default()[slot(metric)] = Some(v);
            p.dirty = true;
        }
        Ok(v)
    }

    /// max over the parents of the statistic (NaN propagates).
    pub fn max_over_parents(&self, models: &Models, name: &str, metric: Metric) -> Result<f64> {
        let mut m = f64::NEG_INFINITY;
        for i in 1..models.list.len() {
            m = nan_max(m, self.get(models, i, name, metric)?);
        }
        if models.list.len() < 2 {
            m = f64::NAN;
        }
        Ok(m)
    }

    /// Whether max over the parents of the stored statistic exceeds 0 (δ = 0), from remembered
    /// statistics where there are some, else by [`stored_diff_sign`].
    pub fn above_zero(&self, models: &Models, name: &str) -> Result<bool> {
        let mut any_positive = false;
        for i in 1..models.list.len() {
            let sign = match self
                .cached(i, name, Metric::Stored)
                .or_else(|| self.cached_sign(i, name))
            {
                Some(v) => kernels::sign_of_sum(v),
                None => {
                    let sign = stored_diff_sign(models, i, name)?;
                    self.remember_sign(i, name, sign);
                    sign
                }
            };
            match sign {
                kernels::DiffSign::NaN => return Ok(false),
                kernels::DiffSign::Positive => any_positive = true,
                kernels::DiffSign::Zero => {}
            }
        }
        Ok(any_positive)
    }

    /// Writes what was learned to the cache directory (temporary file, then rename).
    pub fn flush(&self) -> Result<()> {
        for pair in &self.pairs {
            let Ok(mut p) = pair.lock() else { continue };
            let (Some(file), true) = (p.file.clone(), p.dirty) else {
                continue;
            };
            if let Some(dir) = file.parent() {
                std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            }
            // Merge with what another process may have written meanwhile.
            let mut values = load(&file).unwrap_or_default();
            for (k, v) in &p.values {
                let e = values.entry(k.clone()).or_default();
                for s in 0..3 {
                    if v[s].is_some() {
                        e[s] = v[s];
                    }
                }
            }
            let mut m = Map::new();
            let mut keys: Vec<&String> = values.keys().collect();
            keys.sort();
            for k in keys {
                let v = values[k];
                m.insert(k.clone(), json!({"stored": enc(v[0]), "dequantized": enc(v[1]), "stored_sign": enc(v[2])}));
            }
            let text = serde_json::to_vec(&Value::Object(m)).unwrap_or_default();
            let tmp = file.with_extension(format!("tmp{}", std::process::id()));
            std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
            std::fs::rename(&tmp, &file).map_err(|e| Error::io(&file, e))?;
            p.values = values;
            p.dirty = false;
        }
        Ok(())
    }
}

/// JSON has no NaN: non-finite values are written as strings.
fn enc(v: Option<f64>) -> Value {
    match v {
        None => Value::Null,
        Some(x) if x.is_finite() => json!(x),
        Some(x) => json!(x.to_string()),
    }
}

fn dec(v: Option<&Value>) -> Option<f64> {
    match v? {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

fn load(file: &Path) -> Option<HashMap<String, [Option<f64>; 3]>> {
    parse_cache(&std::fs::read(file).ok()?)
}

/// Parses the bytes of a statistics cache file: name → [stored, dequantized, stored_sign] δ
/// (`None` where absent or unreadable); `None` for a file that is not a JSON object.
pub fn parse_cache(text: &[u8]) -> Option<HashMap<String, [Option<f64>; 3]>> {
    let v: Value = serde_json::from_slice(text).ok()?;
    Some(
        v.as_object()?
            .iter()
            .map(|(k, e)| {
                (
                    k.clone(),
                    [
                        dec(e.get("stored")),
                        dec(e.get("dequantized")),
                        dec(e.get("stored_sign")),
                    ],
                )
            })
            .collect(),
    )
}

/// The default statistics cache directory: `$XDG_CACHE_HOME/aoe` or `~/.cache/aoe`.
pub fn default_cache_dir() -> Option<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return Some(PathBuf::from(x).join("aoe"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("aoe"))
}
