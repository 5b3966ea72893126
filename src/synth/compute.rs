//! Computing one chunk of a mixed unit from the parents' mappings (docs/semantics.md,
//! "Arithmetic"): dequantize, mix in f32, encode to the base's dtype.

use std::cell::RefCell;

use crate::error::{Error, Result};
use crate::kernels::{self, MxInput, MxSource, FP8_BLOCK, MXFP4_BLOCK, MXFP4_BLOCK_BYTES};
use crate::model::dtype::DType;
use crate::synth::cache::Chunk;
use crate::synth::Child;

thread_local! {
    /// Per-thread f32 accumulator of the scale-less FP8 path, reused across chunks.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

impl Child {
    /// Computes chunk `c` of unit `u` with weights `w` (docs/semantics.md, "Arithmetic").
    pub fn compute_chunk(&self, u: usize, c: usize, w: &[f32]) -> Result<Chunk> {
        let models = &self.engine.models;
        let unit = self.plan.units().get(u).ok_or_else(|| Error::Internal {
            what: "no such unit".into(),
        })?;
        let lay = self.layout(u)?;
        let (e0, e1) = lay.elements(c);
        let cols = lay.cols.max(1);
        let (r0, r1) = (e0 / cols, e1.div_ceil(cols));
        let mut srcs = Vec::with_capacity(w.len());
        for i in 0..w.len() {
            srcs.push(models.source(i, &unit.weight)?);
        }
        if lay.mxfp4 {
            return self.mix_chunk_mxfp4(&srcs, w, e0, e1);
        }
        let result = self.mix_chunk(&srcs, w, e0, e1, r0, r1, cols);
        for src in &srcs {
            src.unmap_elements(e0, e1);
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn mix_chunk(
        &self,
        srcs: &[crate::model::models::TensorSource<'_>],
        w: &[f32],
        e0: usize,
        e1: usize,
        r0: usize,
        r1: usize,
        cols: usize,
    ) -> Result<Chunk> {
        let n = e1 - e0;
        let base = srcs.first().ok_or_else(|| Error::Internal {
            what: "no models".into(),
        })?;
        let out_dtype = base.info.dtype;
        // Each model's bytes and block scales for the band.
        let mut scale_rows: Vec<Vec<f32>> = Vec::with_capacity(w.len());
        let mut bytes = Vec::with_capacity(w.len());
        for src in srcs {
            let mut sc = Vec::new();
            if src.info.dtype == DType::F8E4M3 && src.scale.is_some() {
                src.scale_rows(r0 / FP8_BLOCK, r1.div_ceil(FP8_BLOCK), &mut sc)?;
            }
            scale_rows.push(sc);
            bytes.push(src.mapped_elements(e0, e1)?);
        }
        let inputs: Vec<kernels::MixInput<'_>> = srcs
            .iter()
            .zip(&bytes)
            .zip(&scale_rows)
            .zip(w)
            .map(|(((src, b), sc), &weight)| kernels::MixInput {
                dtype: src.info.dtype,
                bytes: b,
                scales: (src.info.dtype == DType::F8E4M3 && src.scale.is_some())
                    .then_some(sc.as_slice()),
                weight,
            })
            .collect();
        let mut data = self.engine.cache.take_buffer(n * out_dtype.size());
        data.resize(n * out_dtype.size(), 0);
        let mut scales = Vec::new();
        // The inputs are the parents' mappings: a file that shrank after its size was checked
        // reads as zeros where it lost pages, and the chunk is thrown away.
        let ((), fault) =
            crate::model::guard::guarded(|| match (out_dtype, base.scale.is_some()) {
                (DType::F8E4M3, true) => {
                    let nb = (r1 - r0).div_ceil(FP8_BLOCK) * cols.div_ceil(FP8_BLOCK);
                    scales.resize(nb, 0f32);
                    kernels::mix(&inputs, cols, out_dtype, &mut data, Some(&mut scales));
                }
                (DType::F8E4M3, false) => {
                    // An FP8 weight without block scales: the plain cast, scale 1.
                    SCRATCH.with(|s| {
                        let acc = &mut *s.borrow_mut();
                        acc.clear();
                        acc.resize(n, 0.0);
                        for (i, inp) in inputs.iter().enumerate() {
                            let sc = inp.scales.map(|s| (s, cols));
                            kernels::accumulate(inp.dtype, inp.bytes, sc, inp.weight, acc, i == 0);
                        }
                        for (d, &x) in data.iter_mut().zip(acc.iter()) {
                            *d = kernels::f32_to_fp8(x);
                        }
                    });
                }
                (dt, _) => kernels::mix(&inputs, cols, dt, &mut data, None),
            });
        if let Some(addr) = fault {
            let hit = srcs.iter().find(|s| s.shard.maps(addr)).unwrap_or(base);
            hit.shard.retire();
            return Err(Error::ParentChanged {
                path: hit.shard.path.clone(),
                tensor: hit.info.name.clone(),
            });
        }
        let mut scale_bytes = Vec::new();
        if !scales.is_empty() {
            scale_bytes = self.engine.cache.take_buffer(scales.len() * 4);
            scale_bytes.clear();
            scale_bytes.extend(scales.iter().flat_map(|x| x.to_le_bytes()));
        }
        Ok(Chunk {
            data,
            scales: scale_bytes,
        })
    }

    /// Chunk of values `[e0, e1)` (whole blocks) of an MXFP4 base unit: each parent decoded its
    /// own way (MXFP4 blocks and exponents, or a plain float copy), mixed in f32, requantized
    /// to MXFP4 blocks and exponents.
    fn mix_chunk_mxfp4(
        &self,
        srcs: &[crate::model::models::TensorSource<'_>],
        w: &[f32],
        e0: usize,
        e1: usize,
    ) -> Result<Chunk> {
        let (g0, g1) = (e0 / MXFP4_BLOCK, e1.div_ceil(MXFP4_BLOCK));
        let base = srcs.first().ok_or_else(|| Error::Internal {
            what: "no models".into(),
        })?;
        let mut exps: Vec<Vec<u8>> = Vec::with_capacity(srcs.len());
        let mut bytes = Vec::with_capacity(srcs.len());
        for src in srcs {
            let mut e = Vec::new();
            if src.is_mxfp4() {
                src.mx_scale_bytes(g0, g1, &mut e)?;
                bytes.push(src.mapped_elements(g0 * MXFP4_BLOCK_BYTES, g1 * MXFP4_BLOCK_BYTES)?);
            } else {
                bytes.push(src.mapped_elements(e0, e1)?);
            }
            exps.push(e);
        }
        let inputs: Vec<MxInput<'_>> = srcs
            .iter()
            .zip(&bytes)
            .zip(&exps)
            .zip(w)
            .map(|(((src, b), e), &weight)| MxInput {
                source: if src.is_mxfp4() {
                    MxSource::Mxfp4 {
                        blocks: b,
                        scales: e,
                    }
                } else {
                    MxSource::Plain {
                        dtype: src.info.dtype,
                        bytes: b,
                    }
                },
                weight,
            })
            .collect();
        let nb = g1 - g0;
        let mut data = self.engine.cache.take_buffer(nb * MXFP4_BLOCK_BYTES);
        data.resize(nb * MXFP4_BLOCK_BYTES, 0);
        let mut scales = self.engine.cache.take_buffer(nb);
        scales.resize(nb, 0);
        let (mixed, fault) =
            crate::model::guard::guarded(|| kernels::mix_mxfp4(&inputs, &mut data, &mut scales));
        for src in srcs {
            if src.is_mxfp4() {
                src.unmap_elements(g0 * MXFP4_BLOCK_BYTES, g1 * MXFP4_BLOCK_BYTES);
            } else {
                src.unmap_elements(e0, e1);
            }
        }
        if let Some(addr) = fault {
            let hit = srcs.iter().find(|s| s.shard.maps(addr)).unwrap_or(base);
            hit.shard.retire();
            return Err(Error::ParentChanged {
                path: hit.shard.path.clone(),
                tensor: hit.info.name.clone(),
            });
        }
        mixed.map_err(|reason| Error::Internal {
            what: format!("MXFP4 mix of {}: {reason}", base.info.name),
        })?;
        Ok(Chunk { data, scales })
    }
}
