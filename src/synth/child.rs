//! A child checkpoint: its files, reads of any range of them, and zero-copy spans.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::model::checkpoint::{Shard, TensorInfo};
use crate::recipe::plan::Plan;
use crate::recipe::{Recipe, RECIPE_FILE};
use crate::synth::cache::{Chunk, ChunkKey};
use crate::synth::{Engine, TensorBytes};

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

impl Child {
    /// Plans `recipe` over `engine`'s models (which must be the recipe's), checking every unit
    /// now ([`Plan::new`]).
    pub fn new(engine: Arc<Engine>, recipe: Recipe) -> Result<Child> {
        Child::build(engine, recipe, false)
    }

    /// Like [`Child::new`], but each unit is planned at its first use ([`Plan::lazy`]): no
    /// work proportional to the model, for variants created by lookup. A unit that cannot be
    /// built fails its reads instead of this call.
    pub fn lazy(engine: Arc<Engine>, recipe: Recipe) -> Result<Child> {
        Child::build(engine, recipe, true)
    }

    fn build(engine: Arc<Engine>, mut recipe: Recipe, lazy: bool) -> Result<Child> {
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
        let plan = if lazy {
            Plan::lazy(&recipe, &engine.models, engine.unit_index())?
        } else {
            Plan::new(&recipe, &engine.models, engine.unit_index())?
        };
        let recipe_bytes = recipe.file_bytes();
        let mut files = engine.base_files()?.to_vec();
        let at = files.partition_point(|f| f.name.as_str() < RECIPE_FILE);
        files.insert(
            at,
            ChildFile {
                name: RECIPE_FILE.into(),
                size: recipe_bytes.len() as u64,
                kind: FileKind::Recipe,
            },
        );
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

    /// The base's files as a child lists them, sorted by name, without `aoe_recipe.json`: the
    /// shards, then every other file passed through (its size from one stat). The same for
    /// every child of an engine ([`Engine::base_files`] keeps them).
    pub(crate) fn base_files(engine: &Engine) -> Result<Vec<ChildFile>> {
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
        files.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(files)
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
        let (u, is_scale, w, bytes_per_chunk) = match self.tensor_bytes(shard, t)? {
            TensorBytes::Verbatim(from, start) => return pread(from, start + at, out, &t.name),
            TensorBytes::Mixed {
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
            match self.tensor_bytes(shard, t)? {
                TensorBytes::Verbatim(from, start) => match run {
                    None => run = Some((from, start + at, t.name.as_str())),
                    Some((rs, r0, _))
                        if std::ptr::eq(from, rs) && r0 + (next - offset) == start + at => {}
                    Some(_) => return Ok(None),
                },
                TensorBytes::Mixed {
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
}

impl Drop for Child {
    /// A child no longer used (a variant forgotten by the mount) gives its chunks back.
    fn drop(&mut self) {
        self.engine.cache.forget_variant(self.variant);
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
