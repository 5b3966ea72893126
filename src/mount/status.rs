//! The status report of a mount: one serde type, [`StatusReport`], that the daemon serializes
//! into the [`STATUS_XATTR`] extended attribute of the mount root and `aoe status MOUNTPOINT`
//! reads back (a renamed or missing field is an error, never a silent 0).

use std::ffi::CString;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Everything `aoe status` reports. Fields are in alphabetical order, the order the JSON had
/// when it was built as a map, so the report's bytes stay as they were.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusReport {
    /// The tool's version.
    pub aoe_version: String,
    /// The base checkpoint.
    pub base: Option<String>,
    /// Bytes computed by chunk computations.
    pub bytes_computed: u64,
    /// Bytes served to readers.
    pub bytes_served: u64,
    /// Bytes held by computed chunks.
    pub cache_budget: usize,
    /// Bytes the chunk cache holds.
    pub cache_held: usize,
    /// Chunk lookups served from the cache.
    pub cache_hits: u64,
    /// Chunk lookups that computed.
    pub cache_misses: u64,
    /// Target chunk size in output bytes.
    pub chunk_bytes: usize,
    /// Chunk computations that failed.
    pub compute_errors: u64,
    /// Computed bytes per nanosecond of computation (GB/s).
    pub compute_gbps: f64,
    /// Seconds spent computing chunks.
    pub compute_seconds: f64,
    /// `single` (one recipe) or `variants`.
    pub layout: String,
    /// The daemon's log file.
    pub log: Option<String>,
    /// Bound on live variants made by lookup.
    pub max_variants: usize,
    /// Where it is mounted.
    pub mountpoint: String,
    /// Variant names refused.
    pub names_refused: u64,
    /// Files opened.
    pub opens: u64,
    /// The parents, base excluded.
    pub parents: Vec<String>,
    /// The daemon's process id.
    pub pid: u32,
    /// Sequential-read prefetch, when it runs.
    pub prefetch: Option<PrefetchReport>,
    /// Reads answered with EIO.
    pub read_errors: u64,
    /// Reads answered.
    pub reads: u64,
    /// Seconds since the mount started.
    pub uptime_s: f64,
    /// The live variants (in the single layout, one with the empty name).
    pub variants: Vec<VariantReport>,
    /// Variants forgotten to stay within `max_variants`.
    pub variants_forgotten: u64,
    /// Variants left out of the report to fit an extended attribute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variants_omitted: Option<u64>,
}

/// One variant in the status report.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VariantReport {
    /// Bytes served from it.
    pub bytes_served: u64,
    /// Its directory name.
    pub name: String,
    /// Its recipe, without base, parents and version.
    pub recipe: Value,
}

/// Prefetch counters in the status report.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PrefetchReport {
    /// Bytes of chunks prefetch computed.
    pub bytes_computed: u64,
    /// Jobs dropped because the queue was full.
    pub dropped: u64,
    /// Jobs that met an error.
    pub errors: u64,
    /// Jobs accepted.
    pub jobs: u64,
}

use crate::error::Result;
use crate::mount::fs::STATUS_XATTR;
use crate::mount::table::{cstring, mnt_error};

/// The status report of the mount at `mountpoint` (the root's [`STATUS_XATTR`]).
pub fn status_json(mountpoint: &Path) -> Result<Value> {
    let c = cstring(mountpoint)?;
    let name =
        CString::new(STATUS_XATTR).map_err(|_| mnt_error(mountpoint, "bad attribute name"))?;
    let mut buf = vec![0u8; 64 << 10];
    // SAFETY: valid C strings and a buffer of the given length.
    let n = unsafe {
        libc::getxattr(
            c.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
        )
    };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        let msg = match e.raw_os_error() {
            Some(libc::ENODATA) | Some(libc::EOPNOTSUPP) => "is not an aoe mount".to_string(),
            Some(libc::ENOTCONN) => {
                format!(
                    "is an aoe mount whose daemon is gone; clear it with `aoe-mount --unmount {}`",
                    mountpoint.display()
                )
            }
            _ => e.to_string(),
        };
        return Err(mnt_error(mountpoint, msg));
    }
    buf.truncate(n as usize);
    serde_json::from_slice(&buf)
        .map_err(|e| mnt_error(mountpoint, format!("unreadable status report: {e}")))
}

fn gb(x: u64) -> String {
    if x >= 1 << 30 {
        format!("{:.2} GB", x as f64 / 1e9)
    } else {
        format!("{:.1} MB", x as f64 / 1e6)
    }
}

fn describe_recipe(r: &Value) -> String {
    let mut parts = Vec::new();
    if let Some(w) = r.get("weights").and_then(Value::as_array) {
        let w: Vec<String> = w
            .iter()
            .map(|x| x.as_f64().map_or("?".into(), |f| format!("{f}")))
            .collect();
        parts.push(format!("weights [{}]", w.join(", ")));
    }
    if let Some(d) = r.get("delta").and_then(Value::as_f64) {
        parts.push(format!("delta {d}"));
    }
    if let Some(s) = r.get("subset").and_then(Value::as_array) {
        let s: Vec<&str> = s.iter().filter_map(Value::as_str).collect();
        parts.push(format!("subset {}", s.join("+")));
    }
    if let Some(m) = r.get("metric").and_then(Value::as_str) {
        parts.push(format!("metric {m}"));
    }
    if let Some(rules) = r
        .get("rules")
        .and_then(Value::as_array)
        .filter(|a| !a.is_empty())
    {
        let rs: Vec<String> = rules
            .iter()
            .map(|x| {
                format!(
                    "{}={}",
                    x.get("pattern").and_then(Value::as_str).unwrap_or("?"),
                    x.get("weights").map_or(String::new(), |w| w.to_string())
                )
            })
            .collect();
        parts.push(format!("rules {}", rs.join(" ")));
    }
    if r.get("allow_extrapolation").and_then(Value::as_bool) == Some(true) {
        parts.push("extrapolation allowed".into());
    }
    parts.join(", ")
}

/// `aoe status`: the recipe(s), bytes served and computed, cache hits and misses, computation
/// speed and errors of the mount at `mountpoint`, as text.
pub fn status_text(mountpoint: &Path) -> Result<String> {
    let v = status_json(mountpoint)?;
    let r: StatusReport = serde_json::from_value(v).map_err(|e| {
        mnt_error(
            mountpoint,
            format!("status report of another aoe version or malformed: {e}"),
        )
    })?;
    let mut out = String::new();
    let up = r.uptime_s;
    out += &format!(
        "aoe mount at {} (pid {}, up {}h{:02}m{:02}s, aoe {})\n",
        r.mountpoint,
        r.pid,
        (up / 3600.0) as u64,
        ((up / 60.0) as u64) % 60,
        (up as u64) % 60,
        r.aoe_version
    );
    out += &format!("base:      {}\n", r.base.as_deref().unwrap_or(""));
    out += &format!("parents:   {}\n", r.parents.join(", "));
    let omitted = r.variants_omitted.unwrap_or(0);
    if r.layout == "single" {
        if let Some(v) = r.variants.first() {
            out += &format!("recipe:    {}\n", describe_recipe(&v.recipe));
        }
    } else {
        out += &format!("variants:  {}\n", r.variants.len() as u64 + omitted);
        let width = r.variants.iter().map(|x| x.name.len()).max().unwrap_or(0);
        for x in &r.variants {
            let name = &x.name;
            let desc = describe_recipe(&x.recipe);
            out += &format!("  {name:<width$}  {desc}; served {}\n", gb(x.bytes_served));
        }
        if omitted > 0 {
            out += &format!("  … {omitted} more\n");
        }
    }
    out += &format!(
        "served:    {} in {} reads ({} opens)\n",
        gb(r.bytes_served),
        r.reads,
        r.opens
    );
    out += &format!(
        "computed:  {} in {:.2} s of computation ({:.2} GB/s)\n",
        gb(r.bytes_computed),
        r.compute_seconds,
        r.compute_gbps
    );
    let (h, m) = (r.cache_hits, r.cache_misses);
    out +=
        &format!(
        "cache:     {h} hits, {m} misses ({:.1} % hits), holding {} of {} in chunks of {} KiB\n",
        if h + m > 0 { 100.0 * h as f64 / (h + m) as f64 } else { 0.0 },
        gb(r.cache_held as u64),
        gb(r.cache_budget as u64),
        r.chunk_bytes >> 10
    );
    if let Some(p) = &r.prefetch {
        out += &format!(
            "prefetch:  {} jobs, {} computed, {} dropped\n",
            p.jobs,
            gb(p.bytes_computed),
            p.dropped
        );
    }
    out += &format!(
        "errors:    {} read errors (EIO), {} computation errors, {} variant names refused\n",
        r.read_errors, r.compute_errors, r.names_refused
    );
    if let Some(log) = r.log.as_deref().filter(|l| !l.is_empty()) {
        out += &format!("log:       {log}\n");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipes_are_described_in_one_line() {
        let r = serde_json::json!({"weights": [0.5, 0.5], "delta": 1.5, "subset": ["experts", "router"], "metric": "stored", "rules": []});
        assert_eq!(
            describe_recipe(&r),
            "weights [0.5, 0.5], delta 1.5, subset experts+router, metric stored"
        );
    }

    #[test]
    fn the_report_round_trips_and_a_renamed_field_is_an_error() {
        let r = StatusReport {
            aoe_version: "0".into(),
            base: Some("/b".into()),
            bytes_computed: 1,
            bytes_served: 2,
            cache_budget: 3,
            cache_held: 4,
            cache_hits: 5,
            cache_misses: 6,
            chunk_bytes: 7,
            compute_errors: 8,
            compute_gbps: 9.5,
            compute_seconds: 10.5,
            layout: "single".into(),
            log: None,
            max_variants: 11,
            mountpoint: "/m".into(),
            names_refused: 12,
            opens: 13,
            parents: vec!["/p".into()],
            pid: 14,
            prefetch: None,
            read_errors: 15,
            reads: 16,
            uptime_s: 17.0,
            variants: vec![],
            variants_forgotten: 18,
            variants_omitted: None,
        };
        let mut v = serde_json::to_value(&r).unwrap();
        let back: StatusReport = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(serde_json::to_value(&back).unwrap(), v);
        // The struct serializes with its keys sorted, as the report (once a map) always had them.
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            serde_json::to_string(&v).unwrap()
        );
        let o = v.as_object_mut().unwrap();
        let x = o.remove("bytes_served").unwrap();
        o.insert("served_bytes".into(), x);
        let e = serde_json::from_value::<StatusReport>(v).unwrap_err();
        assert!(e.to_string().contains("bytes_served"), "{e}");
    }
}
