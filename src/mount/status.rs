//! The client side of `aoe status MOUNTPOINT`: reads the [`STATUS_XATTR`] extended attribute
//! of the mount root and prints it.

use std::ffi::CString;
use std::path::Path;

use serde_json::Value;

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
    let u = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    let f = |k: &str| v.get(k).and_then(Value::as_f64).unwrap_or(0.0);
    let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let mut out = String::new();
    let up = f("uptime_s");
    out += &format!(
        "aoe mount at {} (pid {}, up {}h{:02}m{:02}s, aoe {})\n",
        s("mountpoint"),
        u("pid"),
        (up / 3600.0) as u64,
        ((up / 60.0) as u64) % 60,
        (up as u64) % 60,
        s("aoe_version")
    );
    out += &format!("base:      {}\n", s("base"));
    let parents: Vec<String> = v
        .get("parents")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    out += &format!("parents:   {}\n", parents.join(", "));
    let variants = v
        .get("variants")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if s("layout") == "single" {
        if let Some(r) = variants.first().and_then(|x| x.get("recipe")) {
            out += &format!("recipe:    {}\n", describe_recipe(r));
        }
    } else {
        out += &format!(
            "variants:  {}\n",
            variants.len() as u64 + u("variants_omitted")
        );
        let width = variants
            .iter()
            .filter_map(|x| x.get("name").and_then(Value::as_str))
            .map(str::len)
            .max()
            .unwrap_or(0);
        for x in &variants {
            let name = x.get("name").and_then(Value::as_str).unwrap_or("?");
            let r = x.get("recipe").map(describe_recipe).unwrap_or_default();
            let served = x.get("bytes_served").and_then(Value::as_u64).unwrap_or(0);
            out += &format!("  {name:<width$}  {r}; served {}\n", gb(served));
        }
        if u("variants_omitted") > 0 {
            out += &format!("  … {} more\n", u("variants_omitted"));
        }
    }
    out += &format!(
        "served:    {} in {} reads ({} opens)\n",
        gb(u("bytes_served")),
        u("reads"),
        u("opens")
    );
    out += &format!(
        "computed:  {} in {:.2} s of computation ({:.2} GB/s)\n",
        gb(u("bytes_computed")),
        f("compute_seconds"),
        f("compute_gbps")
    );
    let (h, m) = (u("cache_hits"), u("cache_misses"));
    out +=
        &format!(
        "cache:     {h} hits, {m} misses ({:.1} % hits), holding {} of {} in chunks of {} KiB\n",
        if h + m > 0 { 100.0 * h as f64 / (h + m) as f64 } else { 0.0 },
        gb(u("cache_held")),
        gb(u("cache_budget")),
        u("chunk_bytes") >> 10
    );
    if let Some(p) = v.get("prefetch").filter(|p| !p.is_null()) {
        let pu = |k: &str| p.get(k).and_then(Value::as_u64).unwrap_or(0);
        out += &format!(
            "prefetch:  {} jobs, {} computed, {} dropped\n",
            pu("jobs"),
            gb(pu("bytes_computed")),
            pu("dropped")
        );
    }
    out += &format!(
        "errors:    {} read errors (EIO), {} computation errors, {} variant names refused\n",
        u("read_errors"),
        u("compute_errors"),
        u("names_refused")
    );
    if !s("log").is_empty() {
        out += &format!("log:       {}\n", s("log"));
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
}
