//! Where a child's bytes come from: for each tensor of each unit, the base's bytes, a donor's
//! bytes verbatim, or computed chunks, and how a chunk maps onto the weight's bytes and its
//! block scales. This is the one place that decides it: mount reads, zero-copy replies,
//! prefetch, `aoe write` and `aoe plan` all ask [`Child::tensor_bytes`] (the rules are in
//! `docs/semantics.md`, "Units").

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::kernels::{FP8_BLOCK, MXFP4_BLOCK, MXFP4_BLOCK_BYTES};
use crate::model::checkpoint::{Shard, TensorInfo};
use crate::model::dtype::DType;
use crate::recipe::plan::Source;
use crate::synth::Child;

/// How a unit is cut into chunks.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    /// Rows and columns of the weight's 2-D view.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Elements.
    pub numel: usize,
    /// Elements per chunk (whole 128-row bands when any model stores FP8).
    pub per_chunk: usize,
    /// Number of chunks.
    pub chunks: usize,
    /// Block rows per chunk (FP8 bands), else 0.
    pub block_rows: usize,
    /// The base stores the unit as MXFP4: elements are values (32 per block; a chunk is
    /// whole blocks), the weight holds half a byte per value and the scales one byte per block.
    pub mxfp4: bool,
}

impl Layout {
    /// Element range of chunk `c`.
    pub fn elements(&self, c: usize) -> (usize, usize) {
        let e0 = c.saturating_mul(self.per_chunk).min(self.numel);
        (e0, e0.saturating_add(self.per_chunk).min(self.numel))
    }

    /// Bytes of one chunk's share of a tensor of the unit: `per_chunk` elements of the weight
    /// (of `elem_size` bytes each), or `block_rows` rows of its f32 block scales.
    pub fn bytes_per_chunk(&self, is_scale: bool, elem_size: usize) -> u64 {
        if self.mxfp4 {
            let blocks = (self.per_chunk / MXFP4_BLOCK) as u64;
            return if is_scale {
                blocks
            } else {
                blocks * MXFP4_BLOCK_BYTES as u64
            };
        }
        if is_scale {
            (self.block_rows * self.cols.div_ceil(FP8_BLOCK) * 4) as u64
        } else {
            (self.per_chunk * elem_size) as u64
        }
    }
}

/// Where the child's bytes of one base tensor come from.
pub enum TensorBytes<'a> {
    /// The bytes of a parent's shard from the given offset, as they are.
    Verbatim(&'a Shard, u64),
    /// Computed chunks of `unit` (`bytes_per_chunk` of this tensor in each).
    Mixed {
        /// The unit.
        unit: usize,
        /// Whether this tensor is the unit's block scales (else its weight).
        is_scale: bool,
        /// The mix weights, one per model.
        w: Arc<[f32]>,
        /// Bytes of this tensor in each chunk (the last chunk may hold fewer).
        bytes_per_chunk: u64,
    },
}

impl Child {
    /// Where the child's bytes of base tensor `t` (in base shard `shard`) come from.
    pub fn tensor_bytes<'a>(
        &'a self,
        shard: &'a Shard,
        t: &'a TensorInfo,
    ) -> Result<TensorBytes<'a>> {
        let models = &self.engine.models;
        let (u, is_scale) = match self.plan.unit_of(&t.name) {
            Some(x) => x,
            None => return Ok(TensorBytes::Verbatim(shard, t.start)),
        };
        match self.plan.source(u, models, &self.engine.stats)? {
            Source::Base => Ok(TensorBytes::Verbatim(shard, t.start)),
            Source::Donor(k) => {
                let (ds, dt) = models.donor_copy(k, t)?;
                Ok(TensorBytes::Verbatim(ds, dt.start))
            }
            // A companion that is neither the base's FP8 block scales nor its MXFP4 exponents
            // is not computed: it stays the base's.
            Source::Mix(_)
                if is_scale && {
                    let b = models.source(0, &self.plan.units()[u].weight)?;
                    b.scale.is_none() && b.mx_scales.is_none()
                } =>
            {
                Ok(TensorBytes::Verbatim(shard, t.start))
            }
            Source::Mix(w) => {
                let bytes_per_chunk = self.layout(u)?.bytes_per_chunk(is_scale, t.dtype.size());
                Ok(TensorBytes::Mixed {
                    unit: u,
                    is_scale,
                    w,
                    bytes_per_chunk,
                })
            }
        }
    }

    /// How unit `u` is cut into chunks.
    pub fn layout(&self, u: usize) -> Result<Layout> {
        let models = &self.engine.models;
        let unit = self.plan.units().get(u).ok_or_else(|| Error::Internal {
            what: "no such unit".into(),
        })?;
        let base = models.source(0, &unit.weight)?;
        if base.is_mxfp4() {
            let numel = base.values();
            // About chunk_bytes of output: 17 bytes per block of 32 values.
            let blocks = (self.engine.chunk_bytes / (MXFP4_BLOCK_BYTES + 1)).max(1);
            let per_chunk = blocks * MXFP4_BLOCK;
            return Ok(Layout {
                rows: numel / MXFP4_BLOCK,
                cols: MXFP4_BLOCK,
                numel,
                per_chunk,
                chunks: numel.div_ceil(per_chunk).max(1),
                block_rows: 0,
                mxfp4: true,
            });
        }
        let (rows, cols) = base.info.rows_cols();
        let numel = base.info.numel();
        let banded = base.info.shape.len() == 2
            && (0..models.list.len()).any(|i| {
                models
                    .source(i, &unit.weight)
                    .is_ok_and(|s| s.info.dtype == DType::F8E4M3)
            });
        let out_size = base.info.dtype.size().max(1);
        let target = (self.engine.chunk_bytes / out_size).max(1);
        let (per_chunk, block_rows) = if banded {
            let band = FP8_BLOCK * cols.max(1);
            let bands = (target / band).max(1);
            (bands * band, bands)
        } else {
            (target, 0)
        };
        let chunks = numel.div_ceil(per_chunk).max(1);
        Ok(Layout {
            rows,
            cols,
            numel,
            per_chunk,
            chunks,
            block_rows,
            mxfp4: false,
        })
    }
}
