//! The models of a recipe (base first, then the parents), and typed access to one model's
//! copy of a unit: its weight and, when it has one, its FP8 block scales.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::kernels::FP8_BLOCK;
use crate::model::checkpoint::{Checkpoint, Shard, TensorInfo};
use crate::model::dtype::{DType, OtherDType};

/// Suffix of an FP8 weight's block-scale companion.
pub const SCALE_SUFFIX: &str = "_scale_inv";
/// Suffix of an MXFP4 weight's packed E2M1 codes (U8 `[..., G, 16]`, 32 values per block).
pub const MX_BLOCKS_SUFFIX: &str = "_blocks";
/// Suffix of an MXFP4 weight's E8M0 block exponents (U8 `[..., G]`), beside `X_blocks`.
pub const MX_SCALES_SUFFIX: &str = "_scales";

/// The value shape of MXFP4 blocks of shape `[..., G, 16]`: `[..., G * 32]`.
pub fn mx_value_shape(blocks: &[usize]) -> Option<Vec<usize>> {
    let (&last, rest) = blocks.split_last()?;
    let (&g, lead) = rest.split_last()?;
    (last == 16).then_some(())?;
    let mut v = lead.to_vec();
    v.push(g.checked_mul(32)?);
    Some(v)
}

/// The opened checkpoints of a recipe; index 0 is the base.
pub struct Models {
    /// Base first, then the parents in recipe order.
    pub list: Vec<Arc<Checkpoint>>,
}

impl Models {
    /// Opens and validates every checkpoint, in parallel (one short-lived thread each, all
    /// joined before returning, so that the caller may still fork); the first failure in
    /// recipe order is reported, as opening them one by one would.
    pub fn open(base: &Path, parents: &[PathBuf]) -> Result<Models> {
        let dirs: Vec<&Path> = std::iter::once(base)
            .chain(parents.iter().map(PathBuf::as_path))
            .collect();
        let opened: Vec<Result<Checkpoint>> = std::thread::scope(|s| {
            let handles: Vec<_> = dirs
                .iter()
                .map(|d| s.spawn(move || Checkpoint::open(d)))
                .collect();
            handles
                .into_iter()
                .zip(&dirs)
                .map(|(h, d)| {
                    h.join().unwrap_or_else(|_| {
                        Err(Error::BadHeader {
                            path: d.to_path_buf(),
                            reason: "checkpoint reader panicked".into(),
                        })
                    })
                })
                .collect()
        });
        let list = opened
            .into_iter()
            .map(|r| r.map(Arc::new))
            .collect::<Result<Vec<_>>>()?;
        Ok(Models { list })
    }

    /// The base checkpoint.
    pub fn base(&self) -> &Checkpoint {
        &self.list[0]
    }

    /// Model `k`'s copy of base tensor `t` (its shard and entry), which must have `t`'s length:
    /// what a one-hot donor's bytes are read from.
    pub fn donor_copy(&self, k: usize, t: &TensorInfo) -> Result<(&Shard, &TensorInfo)> {
        let ck = self.list.get(k).ok_or_else(|| Error::Internal {
            what: format!("no model {k}"),
        })?;
        let (ds, dt) = ck.get(&t.name).ok_or_else(|| Error::MissingTensor {
            parent: ck.dir.clone(),
            tensor: t.name.clone(),
        })?;
        if dt.len != t.len {
            return Err(Error::ShapeMismatch {
                parent: ck.dir.clone(),
                tensor: t.name.clone(),
                base: t.shape.clone(),
                other: dt.shape.clone(),
            });
        }
        Ok((ds, dt))
    }

    /// Model `i`'s copy of weight `name`, with its scales when model `i` has them.
    /// Checks presence, shape against the base, and the scale companion's dtype and shape.
    pub fn source(&self, i: usize, name: &str) -> Result<TensorSource<'_>> {
        let ck = self.list.get(i).ok_or_else(|| Error::Internal {
            what: format!("no model {i}"),
        })?;
        let missing = || Error::MissingTensor {
            parent: ck.dir.clone(),
            tensor: name.to_string(),
        };
        let Some((shard, info)) = ck.get(name) else {
            // A parent may store an MXFP4 weight of the base (`X_blocks`) as plain `X` of the
            // blocks' value shape: mixed like a BF16 parent of an FP8 base.
            let (stem, base) = match (name.strip_suffix(MX_BLOCKS_SUFFIX), i > 0) {
                (Some(stem), true) => (stem, self.source(0, name)?),
                _ => return Err(missing()),
            };
            let (shard, info) = ck.get(stem).ok_or_else(missing)?;
            let want = mx_value_shape(&base.info.shape).unwrap_or_default();
            if base.mx_scales.is_none() || info.shape != want {
                return Err(Error::ShapeMismatch {
                    parent: ck.dir.clone(),
                    tensor: stem.to_string(),
                    base: want,
                    other: info.shape.clone(),
                });
            }
            return Ok(TensorSource {
                model: i,
                shard,
                info,
                scale: None,
                mx_scales: None,
            });
        };
        if i > 0 {
            if let Some((_, b)) = self.base().get(name) {
                if b.shape != info.shape {
                    return Err(Error::ShapeMismatch {
                        parent: ck.dir.clone(),
                        tensor: name.to_string(),
                        base: b.shape.clone(),
                        other: info.shape.clone(),
                    });
                }
            }
        }
        let scale_name = format!("{name}{SCALE_SUFFIX}");
        let scale = match (info.dtype, ck.get(&scale_name)) {
            (DType::F8E4M3, Some((ss, si))) => {
                let (rows, cols) = info.rows_cols();
                let want = vec![rows.div_ceil(FP8_BLOCK), cols.div_ceil(FP8_BLOCK)];
                if si.dtype != DType::F32 || si.shape != want || info.shape.len() != 2 {
                    return Err(Error::BadTensor {
                        path: ss.path.clone(),
                        tensor: scale_name,
                        reason: format!(
                            "block scales must be F32 of shape {want:?} for a 2-D weight of shape {:?}, found {} {:?}",
                            info.shape, si.dtype, si.shape
                        ),
                    });
                }
                Some((ss, si))
            }
            _ => None,
        };
        let mx_scales = match (info.dtype, name.strip_suffix(MX_BLOCKS_SUFFIX)) {
            (DType::Other(OtherDType::U8), Some(stem)) => {
                let scales_name = format!("{stem}{MX_SCALES_SUFFIX}");
                match ck.get(&scales_name) {
                    None => None,
                    Some((ss, si)) => {
                        let lead = info.shape.split_last().map(|(_, l)| l.to_vec());
                        let ok = mx_value_shape(&info.shape).is_some()
                            && si.dtype == DType::Other(OtherDType::U8)
                            && lead.as_ref() == Some(&si.shape);
                        if !ok {
                            return Err(Error::BadTensor {
                                path: ss.path.clone(),
                                tensor: scales_name,
                                reason: format!(
                                    "MXFP4 scales must be U8 of shape {:?} for blocks of shape {:?} (U8, last dimension 16), found {} {:?}",
                                    lead.unwrap_or_default(), info.shape, si.dtype, si.shape
                                ),
                            });
                        }
                        Some((ss, si))
                    }
                }
            }
            _ => None,
        };
        Ok(TensorSource {
            model: i,
            shard,
            info,
            scale,
            mx_scales,
        })
    }
}

/// One model's copy of a weight and its optional block scales.
pub struct TensorSource<'a> {
    /// Model index (0 = base).
    pub model: usize,
    /// The shard holding the weight.
    pub shard: &'a Shard,
    /// The weight.
    pub info: &'a TensorInfo,
    /// The `_scale_inv` companion (FP8 only).
    pub scale: Option<(&'a Shard, &'a TensorInfo)>,
    /// The `X_scales` companion of MXFP4 blocks `X_blocks`.
    pub mx_scales: Option<(&'a Shard, &'a TensorInfo)>,
}

impl<'a> TensorSource<'a> {
    /// Whether this copy is MXFP4 (`X_blocks` with its `X_scales`).
    pub fn is_mxfp4(&self) -> bool {
        self.mx_scales.is_some()
    }

    /// Whether its values can be mixed: a float dtype, or MXFP4.
    pub fn mixable(&self) -> bool {
        self.info.dtype.is_mixable() || self.is_mxfp4()
    }

    /// Number of values: elements, or 32 per MXFP4 block.
    pub fn values(&self) -> usize {
        if self.is_mxfp4() {
            self.info.numel().saturating_mul(2)
        } else {
            self.info.numel()
        }
    }

    /// The E8M0 exponents of MXFP4 blocks `[g0, g1)`, read with pread (small; no RSS).
    pub fn mx_scale_bytes(&self, g0: usize, g1: usize, buf: &mut Vec<u8>) -> Result<()> {
        let Some((ss, si)) = self.mx_scales else {
            return Err(Error::Internal {
                what: format!("{} has no MXFP4 scales", self.info.name),
            });
        };
        if g1 < g0 || g1 as u64 > si.len {
            return Err(Error::BadTensor {
                path: ss.path.clone(),
                tensor: si.name.clone(),
                reason: format!("blocks {g0}..{g1} out of bounds"),
            });
        }
        buf.clear();
        buf.resize(g1 - g0, 0);
        use std::os::unix::fs::FileExt;
        ss.file
            .read_exact_at(buf, si.start + g0 as u64)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => Error::ParentChanged {
                    path: ss.path.clone(),
                    tensor: si.name.clone(),
                },
                _ => Error::io(&ss.path, e),
            })
    }
    /// Offset in the tensor and length of elements `[e0, e1)`, checked against its size.
    fn byte_range(&self, e0: usize, e1: usize) -> Result<(u64, u64)> {
        let sz = self.info.dtype.size() as u64;
        let (start, len) = ((e0 as u64) * sz, ((e1.saturating_sub(e0)) as u64) * sz);
        if e1 < e0 || start + len > self.info.len {
            return Err(Error::BadTensor {
                path: self.shard.path.clone(),
                tensor: self.info.name.clone(),
                reason: format!("element range {e0}..{e1} out of bounds"),
            });
        }
        Ok((start, len))
    }

    /// Reads the stored bytes of elements `[e0, e1)` into `buf` with pread and returns them.
    /// No mapping is touched, so reading the parents costs no RSS and no TLB shootdowns, and a
    /// file that shrank gives an error instead of SIGBUS. `buf` keeps its capacity for reuse.
    pub fn read_elements<'b>(
        &self,
        e0: usize,
        e1: usize,
        buf: &'b mut Vec<u8>,
    ) -> Result<&'b [u8]> {
        use std::os::unix::fs::FileExt;
        let (start, len) = self.byte_range(e0, e1)?;
        let n = len as usize;
        if buf.len() < n {
            buf.resize(n, 0);
        }
        let out = &mut buf[..n];
        self.shard
            .file
            .read_exact_at(out, self.info.start + start)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => Error::ParentChanged {
                    path: self.shard.path.clone(),
                    tensor: self.info.name.clone(),
                },
                _ => Error::io(&self.shard.path, e),
            })?;
        Ok(out)
    }

    /// The stored bytes of elements `[e0, e1)` in the shard's mapping, after checking that
    /// the file still holds them. Read them inside [`crate::model::guard::guarded`] (the file may
    /// shrink meanwhile) and give them back with [`TensorSource::unmap_elements`].
    pub fn mapped_elements(&self, e0: usize, e1: usize) -> Result<&'a [u8]> {
        let (start, len) = self.byte_range(e0, e1)?;
        self.shard
            .range(self.info.start + start, len, &self.info.name)
    }

    /// Drops the pages of elements `[e0, e1)` from this process's page tables again.
    pub fn unmap_elements(&self, e0: usize, e1: usize) {
        let sz = self.info.dtype.size() as u64;
        let start = self.info.start + e0 as u64 * sz;
        self.shard
            .unmap(start, (e1.saturating_sub(e0) as u64 * sz) as usize);
    }

    /// The f32 block scales of block rows `[b0, b1)`, row-major, into `out`.
    /// Without a companion, `out` is left empty (scale 1).
    pub fn scale_rows(&self, b0: usize, b1: usize, out: &mut Vec<f32>) -> Result<()> {
        out.clear();
        let Some((ss, si)) = self.scale else {
            return Ok(());
        };
        let scols = si.shape.get(1).copied().unwrap_or(1);
        let (start, len) = ((b0 * scols * 4) as u64, ((b1 - b0) * scols * 4) as u64);
        if start + len > si.len {
            return Err(Error::BadTensor {
                path: ss.path.clone(),
                tensor: si.name.clone(),
                reason: format!("block rows {b0}..{b1} out of bounds"),
            });
        }
        // pread, not the mapping: touching the map would fault in (and keep) 64 KiB around
        // every scale row, which adds up to hundreds of MiB of RSS over a model.
        let mut bytes = vec![0u8; len as usize];
        use std::os::unix::fs::FileExt;
        ss.file
            .read_exact_at(&mut bytes, si.start + start)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => Error::ParentChanged {
                    path: ss.path.clone(),
                    tensor: si.name.clone(),
                },
                _ => Error::io(&ss.path, e),
            })?;
        out.extend(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
        Ok(())
    }
}
