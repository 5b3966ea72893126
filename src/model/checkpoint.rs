//! Checkpoint directories: the index, validated safetensors headers, and mmaps of the shards.
//!
//! Everything read here is untrusted: arithmetic is checked and every failure names the file
//! and, where there is one, the tensor.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use memmap2::Mmap;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::model::dtype::DType;

/// Name of the sharded checkpoint index.
pub const INDEX_NAME: &str = "model.safetensors.index.json";
/// Name of a single-file checkpoint.
pub const SINGLE_NAME: &str = "model.safetensors";
/// Largest header accepted (the safetensors crate uses the same bound).
const MAX_HEADER: u64 = 100_000_000;

/// One tensor as a shard's header describes it, with absolute file offsets.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape (row-major).
    pub shape: Vec<usize>,
    /// Absolute offset of the first data byte in the shard file.
    pub start: u64,
    /// Data length in bytes.
    pub len: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// (rows, cols) of a 2-D view: the first axis against the product of the rest.
    pub fn rows_cols(&self) -> (usize, usize) {
        match self.shape.split_first() {
            None => (1, 1),
            Some((r, rest)) => (*r, rest.iter().product()),
        }
    }
}

/// One shard file, mapped read-only.
pub struct Shard {
    /// File name within the checkpoint directory.
    pub name: String,
    /// Full path.
    pub path: PathBuf,
    /// The open file (kept to check its size before each access).
    pub file: File,
    /// The mapping of the whole file.
    pub map: Mmap,
    /// Bytes of 8-byte length prefix plus JSON header.
    pub header_len: u64,
    /// A copy of those bytes: served without touching the mapping, so a shard truncated under
    /// a mount gives errors, not SIGBUS.
    header: Vec<u8>,
    /// File size at open.
    pub size: u64,
    /// Modification time at open.
    pub mtime: SystemTime,
    /// Tensors in data order.
    pub tensors: Vec<TensorInfo>,
    /// Set when a read of the mapping fell past the file's end (see [`crate::model::guard`]): the
    /// mapping then holds zeros there, so it is never read again.
    retired: AtomicBool,
}

impl Shard {
    /// The header bytes (length prefix and JSON), byte for byte.
    pub fn header(&self) -> &[u8] {
        &self.header
    }

    /// Bytes `[start, start+len)` of the file, refusing ranges past the file's current end
    /// (a parent that shrank under us would otherwise raise SIGBUS).
    pub fn range(&self, start: u64, len: u64, tensor: &str) -> Result<&[u8]> {
        let changed = || Error::ParentChanged {
            path: self.path.clone(),
            tensor: tensor.to_string(),
        };
        let end = start.checked_add(len).ok_or_else(changed)?;
        let now = self
            .file
            .metadata()
            .map_err(|e| Error::io(&self.path, e))?
            .len();
        if end > now || end > self.map.len() as u64 || self.retired.load(Ordering::Acquire) {
            return Err(changed());
        }
        self.map
            .get(start as usize..end as usize)
            .ok_or_else(changed)
    }

    /// Whether address `addr` lies in this shard's mapping.
    pub fn maps(&self, addr: usize) -> bool {
        let p = self.map.as_ptr() as usize;
        (p..p + self.map.len()).contains(&addr)
    }

    /// Stops all further reads of the mapping: a read of it fell past the file's end.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
    }

    /// Drops this process's page-table entries for bytes `[start, start+len)` of the mapping
    /// (pages the kernel touched while sending them from it), so they stop counting in the
    /// daemon's RSS; the page cache keeps the bytes. Best effort: a failure only costs RSS.
    pub fn unmap(&self, start: u64, len: usize) {
        let (Ok(start), true) = (usize::try_from(start), len > 0) else {
            return;
        };
        let len = len.min(self.map.len().saturating_sub(start));
        if len == 0 {
            return;
        }
        // SAFETY: a read-only shared file mapping: MADV_DONTNEED only removes page-table
        // entries, and a later access maps the same bytes again from the page cache, so no
        // reference into the mapping sees a change.
        let _ = unsafe {
            self.map
                .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len)
        };
    }
}

/// Where a tensor lives: shard index and position in that shard's tensor list.
#[derive(Clone, Copy, Debug)]
struct Loc {
    shard: u32,
    idx: u32,
}

/// An opened, validated checkpoint directory.
pub struct Checkpoint {
    /// Canonical directory path.
    pub dir: PathBuf,
    /// Shards, sorted by file name.
    pub shards: Vec<Shard>,
    /// Regular files of the directory that are not shards, sorted by name.
    pub other_files: Vec<String>,
    names: HashMap<String, Loc>,
}

impl Checkpoint {
    /// Opens and validates a checkpoint directory.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let meta = std::fs::metadata(dir).map_err(|e| Error::io(dir, e))?;
        if !meta.is_dir() {
            return Err(Error::NotADirectory {
                path: dir.to_path_buf(),
            });
        }
        let dir = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
        let index_path = dir.join(INDEX_NAME);
        let (shard_names, weight_map) = if index_path.is_file() {
            let (names, map) = read_index(&index_path)?;
            (names, Some(map))
        } else if dir.join(SINGLE_NAME).is_file() {
            (vec![SINGLE_NAME.to_string()], None)
        } else {
            return Err(Error::NoCheckpoint { path: dir });
        };

        let mut shards = Vec::with_capacity(shard_names.len());
        let mut names = HashMap::new();
        for (si, name) in shard_names.iter().enumerate() {
            let shard = open_shard(&dir, name)?;
            for (ti, t) in shard.tensors.iter().enumerate() {
                let loc = Loc {
                    shard: si as u32,
                    idx: ti as u32,
                };
                if names.insert(t.name.clone(), loc).is_some() {
                    return Err(Error::DuplicateTensor {
                        path: shard.path.clone(),
                        tensor: t.name.clone(),
                    });
                }
            }
            shards.push(shard);
        }
        if let Some(map) = &weight_map {
            for (tensor, file) in map {
                let ok = names
                    .get(tensor)
                    .and_then(|l| shards.get(l.shard as usize))
                    .is_some_and(|s| &s.name == file);
                if !ok {
                    return Err(Error::IndexMismatch {
                        path: index_path.clone(),
                        tensor: tensor.clone(),
                        shard: file.clone(),
                    });
                }
            }
        }

        let mut other_files = Vec::new();
        let entries = std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&dir, e))?;
            let ft = entry.file_type().map_err(|e| Error::io(entry.path(), e))?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            // Symlinks count when they point at regular files (HF caches are symlink farms).
            let is_file = ft.is_file() || (ft.is_symlink() && entry.path().is_file());
            if is_file && !shard_names.contains(&name) {
                other_files.push(name);
            }
        }
        other_files.sort();
        Ok(Checkpoint {
            dir,
            shards,
            other_files,
            names,
        })
    }

    /// Looks a tensor up by name.
    pub fn get(&self, name: &str) -> Option<(&Shard, &TensorInfo)> {
        let loc = self.names.get(name)?;
        let shard = self.shards.get(loc.shard as usize)?;
        Some((shard, shard.tensors.get(loc.idx as usize)?))
    }

    /// The data bytes of a tensor, checked against the file's current size.
    pub fn bytes(&self, name: &str) -> Option<Result<&[u8]>> {
        let (shard, t) = self.get(name)?;
        Some(shard.range(t.start, t.len, &t.name))
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether the checkpoint holds no tensors.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Every shard's (name, size, mtime) and a hash of every header: the checkpoint's identity
    /// for caches of derived data.
    pub fn identity(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(self.dir.to_string_lossy().as_bytes());
        for s in &self.shards {
            let mt = s
                .mtime
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            h.update(format!("\0{}\0{}\0{}\0", s.name, s.size, mt).as_bytes());
            h.update(s.header());
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Reads the index: the sorted unique shard names and the name → shard map.
fn read_index(path: &Path) -> Result<(Vec<String>, BTreeMap<String, String>)> {
    let text = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_index(path, &text)
}

/// Parses the bytes of `model.safetensors.index.json` read from `path` (named in errors only):
/// the sorted unique shard names and the name → shard map.
pub fn parse_index(path: &Path, text: &[u8]) -> Result<(Vec<String>, BTreeMap<String, String>)> {
    let bad = |reason: String| Error::BadIndex {
        path: path.to_path_buf(),
        reason,
    };
    let v: Value = serde_json::from_slice(text).map_err(|e| bad(e.to_string()))?;
    let map = v
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("no \"weight_map\" object".into()))?;
    let mut weight_map = BTreeMap::new();
    for (k, v) in map {
        let file = v
            .as_str()
            .ok_or_else(|| bad(format!("weight_map[{k:?}] is not a string")))?;
        if file.is_empty()
            || file.contains('/')
            || file == "."
            || file == ".."
            || file.contains('\0')
        {
            return Err(Error::BadShardName {
                path: path.to_path_buf(),
                shard: file.to_string(),
            });
        }
        weight_map.insert(k.clone(), file.to_string());
    }
    let mut names: Vec<String> = weight_map.values().cloned().collect();
    names.sort();
    names.dedup();
    if names.is_empty() {
        return Err(bad("weight_map is empty".into()));
    }
    Ok((names, weight_map))
}

/// Opens, maps and validates one shard.
fn open_shard(dir: &Path, name: &str) -> Result<Shard> {
    let path = dir.join(name);
    let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(&path, e))?;
    if !meta.is_file() {
        return Err(Error::BadHeader {
            path,
            reason: "not a regular file".into(),
        });
    }
    let size = meta.len();
    let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
    // SAFETY: the map is read-only; a parent truncated under us is caught by `Shard::range`
    // checking the file size before each access, and reads racing a truncation run inside
    // `guard::guarded` (computation) or in the kernel (replies, which then fail with EFAULT).
    let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
    let (header_len, tensors) = parse_header(&path, &map)?;
    let header = map.get(..header_len as usize).unwrap_or(&[]).to_vec();
    Ok(Shard {
        name: name.to_string(),
        path,
        file,
        map,
        header_len,
        header,
        size,
        mtime,
        tensors,
        retired: AtomicBool::new(false),
    })
}

/// Validates a safetensors buffer as the `safetensors` crate does and returns the header
/// length (prefix included) and the tensors in data order with absolute offsets.
pub fn parse_header(path: &Path, buf: &[u8]) -> Result<(u64, Vec<TensorInfo>)> {
    let bad = |reason: String| Error::BadHeader {
        path: path.to_path_buf(),
        reason,
    };
    let prefix: [u8; 8] = buf
        .get(..8)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| {
            bad(format!(
                "file is {} bytes, shorter than the 8-byte length prefix",
                buf.len()
            ))
        })?;
    let n = u64::from_le_bytes(prefix);
    if n > MAX_HEADER {
        return Err(bad(format!(
            "header length {n} exceeds the limit of {MAX_HEADER}"
        )));
    }
    let header_len = n + 8;
    let json = buf.get(8..header_len as usize).ok_or_else(|| {
        bad(format!(
            "header length {n} runs past the end of the {}-byte file",
            buf.len()
        ))
    })?;
    let text = std::str::from_utf8(json).map_err(|e| bad(format!("header is not UTF-8: {e}")))?;
    if !text.starts_with('{') {
        return Err(bad("header does not start with '{'".into()));
    }
    let v: Value =
        serde_json::from_str(text).map_err(|e| bad(format!("header is not JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| bad("header is not a JSON object".into()))?;

    let data_len = (buf.len() as u64) - header_len;
    let mut tensors = Vec::with_capacity(obj.len());
    let mut ranges = Vec::with_capacity(obj.len());
    for (name, entry) in obj {
        if name == "__metadata__" {
            let ok = entry
                .as_object()
                .is_some_and(|m| m.values().all(Value::is_string));
            if !ok {
                return Err(bad("__metadata__ must map strings to strings".into()));
            }
            continue;
        }
        let bad_t = |reason: String| Error::BadTensor {
            path: path.to_path_buf(),
            tensor: name.clone(),
            reason,
        };
        let e = entry
            .as_object()
            .ok_or_else(|| bad_t("entry is not an object".into()))?;
        let dt = e
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| bad_t("no dtype string".into()))?;
        let dtype = DType::parse(dt).ok_or_else(|| bad_t(format!("unknown dtype {dt:?}")))?;
        let shape_v = e
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| bad_t("no shape array".into()))?;
        let mut shape = Vec::with_capacity(shape_v.len());
        for d in shape_v {
            let d = d
                .as_u64()
                .ok_or_else(|| bad_t(format!("shape entry {d} is not a non-negative integer")))?;
            shape.push(usize::try_from(d).map_err(|_| bad_t(format!("dimension {d} too large")))?);
        }
        let offs = e
            .get("data_offsets")
            .and_then(Value::as_array)
            .filter(|a| a.len() == 2)
            .ok_or_else(|| bad_t("data_offsets must be [begin, end]".into()))?;
        let (Some(begin), Some(end)) = (offs[0].as_u64(), offs[1].as_u64()) else {
            return Err(bad_t("data_offsets must be non-negative integers".into()));
        };
        if end < begin {
            return Err(bad_t(format!(
                "data_offsets [{begin}, {end}] end before they begin"
            )));
        }
        let nbytes = shape
            .iter()
            .try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d as u64))
            .ok_or_else(|| bad_t(format!("shape {shape:?} overflows")))?;
        // Zero-size tensors pass the byte count whatever their other dimensions; refuse shapes
        // whose element count would overflow all the same (it is multiplied elsewhere).
        if shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul((d as u64).max(1)))
            .is_none()
        {
            return Err(bad_t(format!("shape {shape:?} overflows")));
        }
        if nbytes != end - begin {
            return Err(bad_t(format!(
                "shape {shape:?} of {dtype} needs {nbytes} bytes, data_offsets [{begin}, {end}] hold {}",
                end - begin
            )));
        }
        if end > data_len {
            return Err(bad_t(format!(
                "data_offsets [{begin}, {end}] run past the data ({data_len} bytes)"
            )));
        }
        ranges.push((begin, end, tensors.len()));
        tensors.push(TensorInfo {
            name: name.clone(),
            dtype,
            shape,
            start: header_len + begin,
            len: end - begin,
        });
    }
    // Offsets must tile the data region exactly: contiguous, no overlap, no gap, no tail.
    ranges.sort_unstable();
    let mut at = 0u64;
    for &(b, e, i) in &ranges {
        if b != at {
            let name = &tensors[i].name;
            let reason = if b < at {
                "overlaps the previous tensor"
            } else {
                "leaves a gap after the previous tensor"
            };
            return Err(Error::BadTensor {
                path: path.to_path_buf(),
                tensor: name.clone(),
                reason: format!("data_offsets [{b}, {e}] {reason} (expected begin {at})"),
            });
        }
        at = e;
    }
    if at != data_len {
        return Err(bad(format!(
            "tensors cover {at} data bytes but the file holds {data_len}"
        )));
    }
    let order: Vec<usize> = ranges.iter().map(|r| r.2).collect();
    let mut slots: Vec<Option<TensorInfo>> = tensors.into_iter().map(Some).collect();
    let tensors = order
        .into_iter()
        .filter_map(|i| slots.get_mut(i).and_then(Option::take))
        .collect();
    Ok((header_len, tensors))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data: usize) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.resize(v.len() + data, 0);
        v
    }

    fn err(buf: &[u8]) -> String {
        parse_header(Path::new("x.safetensors"), buf)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn valid_header_parses_in_data_order() {
        let h = r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"BF16","shape":[2,3],"data_offsets":[4,16]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
        let (len, ts) = parse_header(Path::new("x"), &file(h, 16)).unwrap();
        assert_eq!(len, 8 + h.len() as u64);
        assert_eq!(
            ts.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(ts[1].start, len + 4);
        assert_eq!(ts[1].rows_cols(), (2, 3));
    }

    #[test]
    fn malformed_headers_are_refused_with_the_reason() {
        assert!(err(&[1, 2, 3]).contains("shorter than the 8-byte length prefix"));
        assert!(err(&u64::MAX.to_le_bytes()).contains("exceeds the limit"));
        assert!(err(&file("{}", 0)[..9]).contains("runs past the end"));
        let mut bad_utf8 = file("{\"a\"}", 0);
        bad_utf8[9] = 0xff;
        assert!(err(&bad_utf8).contains("not UTF-8"));
        assert!(err(&file("{nope", 0)).contains("not JSON"));
        assert!(err(&file("[1]", 0)).contains("start with"));
        let t = |s: &str, d| err(&file(s, d));
        assert!(t(
            r#"{"a":{"dtype":"Q4","shape":[1],"data_offsets":[0,1]}}"#,
            1
        )
        .contains("unknown dtype"));
        assert!(t(
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#,
            4
        )
        .contains("needs 8 bytes"));
        assert!(t(
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            2
        )
        .contains("run past the data"));
        assert!(t(
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}"#,
            4
        )
        .contains("end before"));
        assert!(t(
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            8
        )
        .contains("file holds 8"));
        let overlap = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
        assert!(t(overlap, 8).contains("overlaps"));
        let gap = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#;
        assert!(t(gap, 12).contains("gap"));
        let huge = r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,4]}}"#;
        assert!(t(huge, 4).contains("overflows"));
        assert!(t(
            r#"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#,
            4
        )
        .contains("non-negative"));
        assert!(t(r#"{"__metadata__":{"k":1}}"#, 0).contains("__metadata__"));
    }

    #[test]
    fn directories_without_checkpoints_are_named() {
        let d = std::env::temp_dir().join(format!("aoe-ck-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        assert!(matches!(
            Checkpoint::open(&d),
            Err(Error::NoCheckpoint { .. })
        ));
        assert!(matches!(
            Checkpoint::open(&d.join("missing")),
            Err(Error::Io { .. })
        ));
        std::fs::write(
            d.join(INDEX_NAME),
            r#"{"weight_map":{"a":"../etc/passwd"}}"#,
        )
        .unwrap();
        assert!(matches!(
            Checkpoint::open(&d),
            Err(Error::BadShardName { .. })
        ));
        std::fs::write(
            d.join(INDEX_NAME),
            r#"{"weight_map":{"a":"s.safetensors"}}"#,
        )
        .unwrap();
        std::fs::write(
            d.join("s.safetensors"),
            file(
                r#"{"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
                4,
            ),
        )
        .unwrap();
        assert!(matches!(
            Checkpoint::open(&d),
            Err(Error::IndexMismatch { .. })
        ));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
