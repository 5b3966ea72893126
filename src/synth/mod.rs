//! Synthesis: the bytes of any range of any file of a child checkpoint.
//!
//! A child's shards have the base's headers, so every tensor sits at the base's offset. A read
//! maps its range onto tensors; each tensor piece comes from the base, from a donor verbatim,
//! or from computed chunks (for FP8, whole 128-row bands, since a block scale spans 128 rows).

pub mod cache;
pub mod prefetch;

use std::cell::RefCell;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::kernels::{self, FP8_BLOCK};
use crate::model::checkpoint::{Shard, TensorInfo};
use crate::model::dtype::DType;
use crate::model::models::Models;
use crate::recipe::plan::{Plan, Source};
use crate::recipe::stats::StatsStore;
use crate::recipe::{Recipe, RECIPE_FILE};
use crate::synth::cache::{Chunk, ChunkCache, ChunkKey};

/// Default target size of a computed chunk, in output bytes.
pub const DEFAULT_CHUNK_BYTES: usize = 4 << 20;

/// The parents and everything shared by the children built from them.
pub struct Engine {
    /// Base and parents, opened and validated.
    pub models: Models,
    /// δ statistics, shared by every child.
    pub stats: StatsStore,
    /// Computed chunks, shared by every child.
    pub cache: ChunkCache,
    /// Target chunk size in output bytes.
    pub chunk_bytes: usize,
    next_variant: AtomicU32,
    units: std::sync::OnceLock<Arc<crate::recipe::plan::UnitIndex>>,
}

impl Engine {
    /// Wraps opened models with a statistics store and a chunk cache of `cache_bytes`.
    pub fn new(
        models: Models,
        stats_dir: Option<&std::path::Path>,
        cache_bytes: usize,
        chunk_bytes: usize,
    ) -> Engine {
        let stats = StatsStore::new(&models, stats_dir);
        Engine {
            models,
            stats,
            cache: ChunkCache::new(cache_bytes),
            chunk_bytes: chunk_bytes.max(1),
            next_variant: AtomicU32::new(0),
            units: std::sync::OnceLock::new(),
        }
    }

    /// The base's units, indexed once and shared by every child.
    pub fn unit_index(&self) -> Arc<crate::recipe::plan::UnitIndex> {
        self.units
            .get_or_init(|| Arc::new(crate::recipe::plan::UnitIndex::new(&self.models)))
            .clone()
    }
}

/// What a file of the child is.
#[derive(Clone, Debug)]
pub enum FileKind {
    /// Base shard `i`, synthesized.
    Shard(usize),
    /// A base file passed through.
    Passthrough(PathBuf),
    /// `aoe_recipe.json`.
    Recipe,
}

/// One file of the child directory.
#[derive(Clone, Debug)]
pub struct ChildFile {
    /// File name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Where its bytes come from.
    pub kind: FileKind,
}

/// A child checkpoint: a recipe applied to an engine's models.
pub struct Child {
    /// The engine it reads from.
    pub engine: Arc<Engine>,
    /// Its recipe.
    pub recipe: Recipe,
    /// Its plan.
    pub plan: Plan,
    /// Its files, sorted by name.
    pub files: Vec<ChildFile>,
    recipe_bytes: Vec<u8>,
    variant: u32,
}

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
}

impl Layout {
    /// Element range of chunk `c`.
    pub fn elements(&self, c: usize) -> (usize, usize) {
        let e0 = c.saturating_mul(self.per_chunk).min(self.numel);
        (e0, e0.saturating_add(self.per_chunk).min(self.numel))
    }
}

/// Where the child's bytes of one tensor come from.
enum Stored<'a> {
    /// The bytes of a parent's shard from the given offset, as they are.
    Verbatim(&'a Shard, u64),
    /// Computed chunks of `unit` (`bytes_per_chunk` of this tensor in each).
    Mixed {
        unit: usize,
        is_scale: bool,
        w: Arc<[f32]>,
        bytes_per_chunk: u64,
    },
}

/// A range of a child file that exists as one piece of bytes (see [`Child::span`]).
pub enum Span<'a> {
    /// `len` bytes of a parent's shard file from `offset` (first tensor `tensor`).
    Parent {
        /// The parent's shard.
        shard: &'a Shard,
        /// Offset in that file.
        offset: u64,
        /// Length.
        len: usize,
        /// The tensor at `offset`, for error messages.
        tensor: &'a str,
    },
    /// Bytes `[from, from+len)` of a computed chunk's weight data.
    Chunk {
        /// The chunk, held while its bytes are sent.
        chunk: Arc<Chunk>,
        /// Its cache key.
        key: ChunkKey,
        /// Start in `chunk.data`.
        from: usize,
        /// Length.
        len: usize,
    },
}

thread_local! {
    /// Per-thread f32 accumulator of the scale-less FP8 path, reused across chunks.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

impl Child {
    /// Plans `recipe` over `engine`'s models (which must be the recipe's).
    pub fn new(engine: Arc<Engine>, mut recipe: Recipe) -> Result<Child> {
        if recipe.models() != engine.models.list.len() {
            return Err(Error::WeightCount {
                expected: engine.models.list.len(),
                got: recipe.models(),
                context: "recipe models".into(),
            });
        }
        // Record the opened (canonical) directories, so `aoe_recipe.json` is the same however
        // a path was spelled (trailing slash, symlink, relative) on every node.
        recipe.base = engine.models.base().dir.clone();
        recipe.parents = engine
            .models
            .list
            .iter()
            .skip(1)
            .map(|m| m.dir.clone())
            .collect();
        let plan = Plan::new(&recipe, &engine.models, engine.unit_index())?;
        let recipe_bytes = recipe.file_bytes();
        let base = engine.models.base();
        let mut files: Vec<ChildFile> = base
            .shards
            .iter()
            .enumerate()
            .map(|(i, s)| ChildFile {
                name: s.name.clone(),
                size: s.size,
                kind: FileKind::Shard(i),
            })
            .collect();
        for name in &base.other_files {
            if name == RECIPE_FILE {
                continue;
            }
            let path = base.dir.join(name);
            let size = std::fs::metadata(&path)
                .map_err(|e| Error::io(&path, e))?
                .len();
            files.push(ChildFile {
                name: name.clone(),
                size,
                kind: FileKind::Passthrough(path),
            });
        }
        files.push(ChildFile {
            name: RECIPE_FILE.into(),
            size: recipe_bytes.len() as u64,
            kind: FileKind::Recipe,
        });
        files.sort_by(|a, b| a.name.cmp(&b.name));
        let variant = engine.next_variant.fetch_add(1, Ordering::Relaxed);
        Ok(Child {
            engine,
            recipe,
            plan,
            files,
            recipe_bytes,
            variant,
        })
    }

    /// Opens the recipe's models and plans it: the one-call way to a child.
    pub fn open(
        recipe: Recipe,
        stats_dir: Option<&std::path::Path>,
        cache_bytes: usize,
        chunk_bytes: usize,
    ) -> Result<Child> {
        let models = Models::open(&recipe.base, &recipe.parents)?;
        Child::new(
            Arc::new(Engine::new(models, stats_dir, cache_bytes, chunk_bytes)),
            recipe,
        )
    }

    /// The file called `name`.
    pub fn file(&self, name: &str) -> Option<usize> {
        self.files
            .binary_search_by(|f| f.name.as_str().cmp(name))
            .ok()
    }

    /// The end offset of the tensor holding byte `pos` of shard file `file` (None elsewhere).
    pub fn tensor_end(&self, file: usize, pos: u64) -> Option<u64> {
        let FileKind::Shard(s) = self.files.get(file)?.kind else {
            return None;
        };
        let shard = self.engine.models.base().shards.get(s)?;
        let i = shard.tensors.partition_point(|t| t.start + t.len <= pos);
        shard
            .tensors
            .get(i)
            .filter(|t| t.start <= pos)
            .map(|t| t.start + t.len)
    }

    /// The bytes of `aoe_recipe.json`.
    pub fn recipe_bytes(&self) -> &[u8] {
        &self.recipe_bytes
    }

    /// Reads file `file` at `offset` into `buf`; returns the bytes read (short only at EOF).
    pub fn read(&self, file: usize, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let f = self.files.get(file).ok_or_else(|| Error::NoSuchFile {
            name: format!("#{file}"),
        })?;
        if offset >= f.size {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(f.size - offset) as usize;
        let buf = &mut buf[..n];
        match &f.kind {
            FileKind::Recipe => {
                let src = self
                    .recipe_bytes
                    .get(offset as usize..offset as usize + n)
                    .unwrap_or(&[]);
                buf[..src.len()].copy_from_slice(src);
                Ok(src.len())
            }
            FileKind::Passthrough(path) => {
                let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
                file.read_exact_at(buf, offset)
                    .map_err(|e| Error::io(path, e))?;
                Ok(n)
            }
            FileKind::Shard(s) => {
                self.read_shard(*s, offset, buf)?;
                Ok(n)
            }
        }
    }

    fn read_shard(&self, s: usize, offset: u64, buf: &mut [u8]) -> Result<()> {
        let models = &self.engine.models;
        let shard = models
            .base()
            .shards
            .get(s)
            .ok_or_else(|| Error::NoSuchFile {
                name: format!("shard #{s}"),
            })?;
        let end = offset + buf.len() as u64;
        if offset < shard.header_len {
            let h = shard.header();
            let hi = end.min(shard.header_len) as usize;
            buf[..hi - offset as usize].copy_from_slice(&h[offset as usize..hi]);
        }
        let first = shard.tensors.partition_point(|t| t.start + t.len <= offset);
        for t in shard.tensors.iter().skip(first) {
            if t.start >= end {
                break;
            }
            let lo = offset.max(t.start);
            let hi = end.min(t.start + t.len);
            if hi <= lo {
                continue;
            }
            let out = &mut buf[(lo - offset) as usize..(hi - offset) as usize];
            self.fill_tensor(shard, t, lo - t.start, out)?;
        }
        Ok(())
    }

    /// Where the child's bytes of base tensor `t` (in base shard `shard`) come from.
    fn stored<'a>(&'a self, shard: &'a Shard, t: &'a TensorInfo) -> Result<Stored<'a>> {
        let models = &self.engine.models;
        let (u, is_scale) = match self.plan.unit_of(&t.name) {
            Some(x) => x,
            None => return Ok(Stored::Verbatim(shard, t.start)),
        };
        match self.plan.source(u, models, &self.engine.stats)? {
            Source::Base => Ok(Stored::Verbatim(shard, t.start)),
            Source::Donor(k) => {
                let (ds, dt) = models.donor_copy(k, t)?;
                Ok(Stored::Verbatim(ds, dt.start))
            }
            // A companion that is not the base's FP8 block scales is not computed: it stays the base's.
            Source::Mix(_)
                if is_scale
                    && models
                        .source(0, &self.plan.units()[u].weight)?
                        .scale
                        .is_none() =>
            {
                Ok(Stored::Verbatim(shard, t.start))
            }
            Source::Mix(w) => {
                let lay = self.layout(u)?;
                // Bytes per chunk in this tensor.
                let bytes_per_chunk = if is_scale {
                    (lay.block_rows * lay.cols.div_ceil(FP8_BLOCK) * 4) as u64
                } else {
                    (lay.per_chunk * t.dtype.size()) as u64
                };
                Ok(Stored::Mixed {
                    unit: u,
                    is_scale,
                    w,
                    bytes_per_chunk,
                })
            }
        }
    }

    /// Chunk `c` of unit `u` with its weight bytes present: a chunk retired after being
    /// served once (see `ChunkCache::served`) is computed again.
    fn data_chunk(&self, u: usize, c: usize, w: &[f32]) -> Result<Arc<Chunk>> {
        let chunk = self.chunk(u, c, w)?;
        if !chunk.data.is_empty() {
            return Ok(chunk);
        }
        self.engine.cache.forget(&self.chunk_key(u, c));
        self.chunk(u, c, w)
    }

    fn chunk_key(&self, u: usize, c: usize) -> ChunkKey {
        ChunkKey {
            variant: self.variant,
            unit: u as u32,
            chunk: c as u32,
        }
    }

    /// Fills `out` with the child's bytes of base tensor `t` from byte `at` of the tensor.
    fn fill_tensor(&self, shard: &Shard, t: &TensorInfo, at: u64, out: &mut [u8]) -> Result<()> {
        let (u, is_scale, w, bytes_per_chunk) = match self.stored(shard, t)? {
            Stored::Verbatim(from, start) => return pread(from, start + at, out, &t.name),
            Stored::Mixed {
                unit,
                is_scale,
                w,
                bytes_per_chunk,
            } => (unit, is_scale, w, bytes_per_chunk),
        };
        let mut pos = at;
        let end = at + out.len() as u64;
        while pos < end {
            let c = (pos / bytes_per_chunk) as usize;
            let chunk = if is_scale {
                self.chunk(u, c, &w)?
            } else {
                self.data_chunk(u, c, &w)?
            };
            let part = if is_scale { &chunk.scales } else { &chunk.data };
            let from = (pos - c as u64 * bytes_per_chunk) as usize;
            let take = ((end - pos) as usize).min(part.len().saturating_sub(from));
            if take == 0 {
                return Err(Error::BadTensor {
                    path: shard.path.clone(),
                    tensor: t.name.clone(),
                    reason: "computed chunk shorter than the tensor".into(),
                });
            }
            let o = (pos - at) as usize;
            out[o..o + take].copy_from_slice(&part[from..from + take]);
            let len = part.len();
            // Let go of the chunk first, so that the cache can recycle its buffer.
            drop(chunk);
            if !is_scale {
                self.engine.cache.served(self.chunk_key(u, c), take, len);
            }
            pos += take as u64;
        }
        Ok(())
    }

    /// `len` bytes of file `file` at `offset` as one piece that already exists (a parent's
    /// file range, or a computed chunk's bytes), so a reply can be sent without copying it
    /// into a buffer first. None when the range is not one such piece (it spans the header,
    /// a mixed and a verbatim tensor, two chunks, ...): [`Child::read`] serves those.
    pub fn span(&self, file: usize, offset: u64, len: usize) -> Result<Option<Span<'_>>> {
        let Some(f) = self.files.get(file) else {
            return Ok(None);
        };
        let FileKind::Shard(s) = f.kind else {
            return Ok(None);
        };
        let Some(shard) = self.engine.models.base().shards.get(s) else {
            return Ok(None);
        };
        let end = offset.saturating_add(len as u64).min(f.size);
        if offset < shard.header_len || end <= offset {
            return Ok(None);
        }
        let first = shard.tensors.partition_point(|t| t.start + t.len <= offset);
        // The parent range so far: (shard, its start for `offset`, bytes up to `next`).
        let mut run: Option<(&Shard, u64, &str)> = None;
        let mut next = offset;
        for t in shard.tensors.iter().skip(first) {
            if t.start >= end {
                break;
            }
            // Tensors are contiguous (checked at open); anything else is served by a copy.
            let Some(at) = next.checked_sub(t.start) else {
                return Ok(None);
            };
            let hi = end.min(t.start + t.len);
            match self.stored(shard, t)? {
                Stored::Verbatim(from, start) => match run {
                    None => run = Some((from, start + at, t.name.as_str())),
                    Some((rs, r0, _))
                        if std::ptr::eq(from, rs) && r0 + (next - offset) == start + at => {}
                    Some(_) => return Ok(None),
                },
                Stored::Mixed {
                    unit,
                    is_scale,
                    w,
                    bytes_per_chunk,
                } => {
                    // Computed bytes are a span only when they are the whole range, in one chunk.
                    let n = (end - offset) as usize;
                    if run.is_some() || is_scale || hi < end || bytes_per_chunk == 0 {
                        return Ok(None);
                    }
                    let c = (at / bytes_per_chunk) as usize;
                    if (at + n as u64 - 1) / bytes_per_chunk != c as u64 {
                        return Ok(None);
                    }
                    let from = (at - c as u64 * bytes_per_chunk) as usize;
                    let chunk = self.data_chunk(unit, c, &w)?;
                    if from + n > chunk.data.len() {
                        return Err(Error::BadTensor {
                            path: shard.path.clone(),
                            tensor: t.name.clone(),
                            reason: "computed chunk shorter than the tensor".into(),
                        });
                    }
                    return Ok(Some(Span::Chunk {
                        chunk,
                        key: self.chunk_key(unit, c),
                        from,
                        len: n,
                    }));
                }
            }
            next = hi;
        }
        Ok(run.map(|(shard, start, tensor)| Span::Parent {
            shard,
            offset: start,
            len: (end - offset) as usize,
            tensor,
        }))
    }

    /// The bytes of `span` (a parent's range is checked against the file's current size).
    pub fn span_bytes<'s>(&self, span: &'s Span<'_>) -> Result<&'s [u8]> {
        match span {
            Span::Parent {
                shard,
                offset,
                len,
                tensor,
            } => shard.range(*offset, *len as u64, tensor),
            Span::Chunk {
                chunk, from, len, ..
            } => Ok(&chunk.data[*from..*from + *len]),
        }
    }

    /// Ends the use of `span` once its bytes were sent: unmaps the parent's pages from this
    /// process (the page cache keeps them), or counts the chunk's bytes as served.
    pub fn span_done(&self, span: Span<'_>) {
        match span {
            Span::Parent {
                shard, offset, len, ..
            } => shard.unmap(offset, len),
            Span::Chunk {
                chunk, key, len, ..
            } => {
                let total = chunk.data.len();
                drop(chunk);
                self.engine.cache.served(key, len, total);
            }
        }
    }

    /// How unit `u` is cut into chunks.
    pub fn layout(&self, u: usize) -> Result<Layout> {
        let models = &self.engine.models;
        let unit = self.plan.units().get(u).ok_or_else(|| Error::BadRecipe {
            reason: "no such unit".into(),
        })?;
        let base = models.source(0, &unit.weight)?;
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
        })
    }

    /// Chunk `c` of unit `u`, from the cache or computed.
    pub fn chunk(&self, u: usize, c: usize, w: &[f32]) -> Result<Arc<Chunk>> {
        self.engine
            .cache
            .get_or_compute(self.chunk_key(u, c), || self.compute_chunk(u, c, w))
    }

    /// Whether chunk `c` of unit `u` is cached or being computed.
    pub fn chunk_cached(&self, u: usize, c: usize) -> bool {
        self.engine.cache.contains(&self.chunk_key(u, c))
    }

    /// Computes chunk `c` of unit `u` with weights `w` (DESIGN §4).
    pub fn compute_chunk(&self, u: usize, c: usize, w: &[f32]) -> Result<Chunk> {
        let models = &self.engine.models;
        let unit = self.plan.units().get(u).ok_or_else(|| Error::BadRecipe {
            reason: "no such unit".into(),
        })?;
        let lay = self.layout(u)?;
        let (e0, e1) = lay.elements(c);
        let cols = lay.cols.max(1);
        let (r0, r1) = (e0 / cols, e1.div_ceil(cols));
        let mut srcs = Vec::with_capacity(w.len());
        for i in 0..w.len() {
            srcs.push(models.source(i, &unit.weight)?);
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
        let base = srcs.first().ok_or_else(|| Error::BadRecipe {
            reason: "no models".into(),
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
}

/// Reads `out.len()` bytes of a shard at `pos` with pread: no mapping, so no RSS, and a file
/// that shrank under us gives an error instead of SIGBUS.
fn pread(shard: &Shard, pos: u64, out: &mut [u8], tensor: &str) -> Result<()> {
    shard
        .file
        .read_exact_at(out, pos)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => Error::ParentChanged {
                path: shard.path.clone(),
                tensor: tensor.to_string(),
            },
            _ => Error::io(&shard.path, e),
        })
}
