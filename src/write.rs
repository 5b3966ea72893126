//! `aoe write`: materialize a child directory on disk.
//!
//! Every file is written under a temporary name beside its target and renamed once complete,
//! so no file a parent has mapped is ever truncated or written, and an interrupted write leaves
//! no half file under a real name.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::model::checkpoint::{Shard, TensorInfo};
use crate::synth::{Child, FileKind, TensorBytes};

/// Options of a write.
#[derive(Clone, Debug)]
pub struct WriteOptions {
    /// Worker threads.
    pub threads: usize,
    /// Replace files in a non-empty OUT.
    pub force: bool,
    /// Called with (bytes done, bytes total) as work completes.
    pub progress: Option<fn(u64, u64)>,
    /// Set (e.g. by a signal handler) to stop early; temporary files are removed.
    pub cancel: Option<&'static std::sync::atomic::AtomicBool>,
}

/// What a write did.
#[derive(Clone, Debug, Default)]
pub struct WriteReport {
    /// Bytes written in all files.
    pub bytes: u64,
    /// Bytes computed (mixed units).
    pub computed: u64,
    /// Files written.
    pub files: usize,
}

/// Refuses an OUT that is a parent, inside a parent, contains a parent, or is non-empty
/// (unless `force`). Runs before anything is written.
pub fn check_output(out: &Path, models: &[PathBuf], force: bool) -> Result<()> {
    let bad = |reason: String| Error::BadOutput {
        path: out.to_path_buf(),
        reason,
    };
    let canon = canonical_target(out)?;
    for m in models {
        let m = m.canonicalize().unwrap_or_else(|_| m.clone());
        if canon == m {
            return Err(bad(format!(
                "is a parent ({}); refusing to overwrite it",
                m.display()
            )));
        }
        if canon.starts_with(&m) {
            return Err(bad(format!(
                "lies inside parent {}; choose a directory outside the parents",
                m.display()
            )));
        }
        if m.starts_with(&canon) {
            return Err(bad(format!(
                "contains parent {}; choose a directory of its own",
                m.display()
            )));
        }
    }
    match std::fs::metadata(out) {
        Ok(md) if !md.is_dir() => Err(bad("exists and is not a directory".into())),
        Ok(_) => {
            let mut entries = std::fs::read_dir(out).map_err(|e| Error::io(out, e))?;
            if entries.next().is_some() && !force {
                Err(bad(
                    "is not empty (pass --force to replace the child's files in it)".into(),
                ))
            } else {
                Ok(())
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(out, e)),
    }
}

/// The canonical path `out` names, whether or not it exists yet.
fn canonical_target(out: &Path) -> Result<PathBuf> {
    if let Ok(c) = out.canonicalize() {
        return Ok(c);
    }
    let abs = std::path::absolute(out).map_err(|e| Error::io(out, e))?;
    let mut existing = abs.as_path();
    let mut rest = Vec::new();
    while !existing.exists() {
        match (existing.parent(), existing.file_name()) {
            (Some(p), Some(n)) => {
                rest.push(n.to_os_string());
                existing = p;
            }
            _ => break,
        }
    }
    let mut c = existing
        .canonicalize()
        .map_err(|e| Error::io(existing, e))?;
    for n in rest.into_iter().rev() {
        c.push(n);
    }
    Ok(c)
}

/// One piece of work.
enum Job {
    /// Write bytes at an offset of a file.
    Bytes {
        file: usize,
        at: u64,
        bytes: Vec<u8>,
    },
    /// Copy a file range.
    Copy {
        file: usize,
        at: u64,
        src: PathBuf,
        from: u64,
        len: u64,
    },
    /// A unit: decide its source, then copy or compute it.
    Unit(usize),
}

/// Writes `child` into `out` (created if needed); `check_output` must have passed.
pub fn write_child(child: &Child, out: &Path, opts: &WriteOptions) -> Result<WriteReport> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads.max(1))
        .build()
        .map_err(|e| Error::Threads {
            reason: e.to_string(),
        })?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let tmp_of = |name: &str| out.join(format!(".{name}.aoe-tmp-{}", std::process::id()));
    let mut outs = Vec::with_capacity(child.files.len());
    let mut jobs = Vec::new();
    let guard = TempFiles(child.files.iter().map(|f| tmp_of(&f.name)).collect());
    let base = child.engine.models.base();
    for (i, f) in child.files.iter().enumerate() {
        let path = &guard.0[i];
        // create_new: never follow a symlink planted at the temporary name, never truncate.
        let _ = std::fs::remove_file(path);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        file.set_len(f.size).map_err(|e| Error::io(path, e))?;
        outs.push(file);
        match &f.kind {
            FileKind::Recipe => jobs.push(Job::Bytes {
                file: i,
                at: 0,
                bytes: child.recipe_bytes().to_vec(),
            }),
            FileKind::Passthrough(src) => jobs.push(Job::Copy {
                file: i,
                at: 0,
                src: src.clone(),
                from: 0,
                len: f.size,
            }),
            FileKind::Shard(s) => {
                if let Some(sh) = base.shards.get(*s) {
                    jobs.push(Job::Bytes {
                        file: i,
                        at: 0,
                        bytes: sh.header().to_vec(),
                    });
                }
            }
        }
    }
    // Largest units first, so the pool drains evenly.
    let mut units: Vec<(u64, usize)> = (0..child.plan.units().len())
        .map(|u| {
            (
                base.get(&child.plan.units()[u].weight)
                    .map_or(0, |(_, t)| t.len),
                u,
            )
        })
        .collect();
    units.sort_unstable_by(|a, b| b.cmp(a));
    jobs.extend(units.into_iter().map(|(_, u)| Job::Unit(u)));

    let file_of_shard: Vec<usize> = base
        .shards
        .iter()
        .map(|s| child.file(&s.name).unwrap_or(usize::MAX))
        .collect();
    // Tensors outside every unit (e.g. a scale of a scale) are the base's bytes.
    for (si, sh) in base.shards.iter().enumerate() {
        for t in sh
            .tensors
            .iter()
            .filter(|t| child.plan.unit_of(&t.name).is_none())
        {
            let file = file_of_shard.get(si).copied().filter(|&f| f != usize::MAX);
            let file = file.ok_or_else(|| Error::NoSuchFile {
                name: sh.name.clone(),
            })?;
            jobs.push(Job::Copy {
                file,
                at: t.start,
                src: sh.path.clone(),
                from: t.start,
                len: t.len,
            });
        }
    }
    let total: u64 = child.files.iter().map(|f| f.size).sum();
    let done = AtomicU64::new(0);
    let computed = AtomicU64::new(0);
    let ctx = Ctx {
        child,
        outs: &outs,
        out_paths: &guard.0,
        file_of_shard: &file_of_shard,
        done: &done,
        total,
        computed: &computed,
        progress: opts.progress,
        cancel: opts.cancel,
    };
    pool.install(|| jobs.into_par_iter().try_for_each(|job| ctx.run(job)))?;
    // A δ that kept every wanted unit the base's: refuse before anything appears at `out`
    // (the temporary files go with `guard`).
    if !child.recipe.allow_empty && child.plan.nothing_above_delta() {
        return Err(child.plan.empty_by_delta(&child.recipe));
    }

    for (i, f) in child.files.iter().enumerate() {
        let to = out.join(&f.name);
        std::fs::rename(&guard.0[i], &to).map_err(|e| Error::io(&to, e))?;
    }
    std::mem::forget(guard);
    if let Err(e) = child.engine.stats.flush() {
        // The child is complete; only the memo of statistics is lost.
        eprintln!("aoe: warning: cannot save δ statistics: {e}");
    }
    Ok(WriteReport {
        bytes: total,
        computed: computed.load(Ordering::Relaxed),
        files: child.files.len(),
    })
}

/// Removes temporary files if the write fails midway.
struct TempFiles(Vec<PathBuf>);

impl Drop for TempFiles {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

struct Ctx<'a> {
    child: &'a Child,
    outs: &'a [File],
    /// The temporary path of each output file, for error messages.
    out_paths: &'a [PathBuf],
    file_of_shard: &'a [usize],
    done: &'a AtomicU64,
    total: u64,
    computed: &'a AtomicU64,
    progress: Option<fn(u64, u64)>,
    cancel: Option<&'static std::sync::atomic::AtomicBool>,
}

impl Ctx<'_> {
    /// An error writing output file `file`, named by its temporary path.
    fn write_error(&self, file: usize, e: std::io::Error) -> Error {
        match self.out_paths.get(file) {
            Some(p) => Error::io(p, e),
            None => Error::io(format!("output #{file}"), e),
        }
    }

    /// An error of a copy: errors that can only come from the destination (a full or
    /// read-only disk, a file too large) name the output, the rest the source.
    fn copy_error(&self, src: &std::path::Path, file: usize, e: std::io::Error) -> Error {
        match e.raw_os_error() {
            Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG | libc::EROFS) => {
                self.write_error(file, e)
            }
            _ => Error::io(src, e),
        }
    }

    fn advance(&self, n: u64) {
        let d = self.done.fetch_add(n, Ordering::Relaxed) + n;
        if let Some(p) = self.progress {
            p(d, self.total);
        }
    }

    fn out(&self, file: usize) -> Result<&File> {
        self.outs.get(file).ok_or_else(|| Error::NoSuchFile {
            name: format!("#{file}"),
        })
    }

    fn run(&self, job: Job) -> Result<()> {
        if self.cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err(Error::Interrupted);
        }
        match job {
            Job::Bytes { file, at, bytes } => {
                self.out(file)?
                    .write_all_at(&bytes, at)
                    .map_err(|e| self.write_error(file, e))?;
                self.advance(bytes.len() as u64);
            }
            Job::Copy {
                file,
                at,
                src,
                from,
                len,
            } => {
                let s = File::open(&src).map_err(|e| Error::io(&src, e))?;
                copy_range(&s, from, self.out(file)?, at, len)
                    .map_err(|e| self.copy_error(&src, file, e))?;
                self.advance(len);
            }
            Job::Unit(u) => self.unit(u)?,
        }
        Ok(())
    }

    fn unit(&self, u: usize) -> Result<()> {
        let child = self.child;
        let models = &child.engine.models;
        let base = models.base();
        let unit = &child.plan.units()[u];
        let mut tensors: Vec<(&Shard, &TensorInfo)> = Vec::with_capacity(2);
        for name in std::iter::once(&unit.weight).chain(unit.scale.iter()) {
            tensors.push(base.get(name).ok_or_else(|| Error::MissingTensor {
                parent: base.dir.clone(),
                tensor: name.clone(),
            })?);
        }
        let dst = |shard: &Shard| -> Result<usize> {
            let i = base
                .shards
                .iter()
                .position(|s| std::ptr::eq(s, shard))
                .unwrap_or(usize::MAX);
            self.file_of_shard
                .get(i)
                .copied()
                .filter(|&f| f != usize::MAX)
                .ok_or_else(|| Error::NoSuchFile {
                    name: shard.name.clone(),
                })
        };
        // Each tensor's bytes as the layout says; mixed ones are written chunk by chunk below,
        // weight and block scales of a chunk together.
        let mut mixed: Vec<(usize, &TensorInfo, u64)> = Vec::with_capacity(2);
        let mut weights = None;
        for &(sh, t) in &tensors {
            match child.tensor_bytes(sh, t)? {
                TensorBytes::Verbatim(from, start) => {
                    self.copy_range_of(from, start, t.len, dst(sh)?, t.start)?
                }
                TensorBytes::Mixed {
                    unit,
                    w,
                    bytes_per_chunk,
                    ..
                } => {
                    if unit != u {
                        return Err(Error::Internal {
                            what: format!("tensor {} planned as part of another unit", t.name),
                        });
                    }
                    mixed.push((dst(sh)?, t, bytes_per_chunk));
                    weights = Some(w);
                }
            }
        }
        let Some(w) = weights else { return Ok(()) };
        for c in 0..child.layout(u)?.chunks {
            if self.cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                return Err(Error::Interrupted);
            }
            let chunk = child.compute_chunk(u, c, &w)?;
            let mut n = 0u64;
            for &(file, t, bytes_per_chunk) in &mixed {
                let part = if t.name == unit.weight {
                    &chunk.data
                } else {
                    &chunk.scales
                };
                let at = t.start + c as u64 * bytes_per_chunk;
                self.out(file)?
                    .write_all_at(part, at)
                    .map_err(|e| self.write_error(file, e))?;
                n += part.len() as u64;
            }
            self.computed.fetch_add(n, Ordering::Relaxed);
            self.advance(n);
            let crate::synth::cache::Chunk { data, scales } = chunk;
            child.engine.cache.give_buffer(data);
            child.engine.cache.give_buffer(scales);
        }
        Ok(())
    }

    /// Copies `len` bytes of `src` at `from` to output file `file` at `at`.
    fn copy_range_of(&self, src: &Shard, from: u64, len: u64, file: usize, at: u64) -> Result<()> {
        copy_range(&src.file, from, self.out(file)?, at, len)
            .map_err(|e| self.copy_error(&src.path, file, e))?;
        self.advance(len);
        Ok(())
    }
}

/// Copies `len` bytes with copy_file_range (in the kernel, no user-space buffer), falling back
/// to pread/pwrite where the kernel refuses.
fn copy_range(src: &File, from: u64, dst: &File, at: u64, len: u64) -> std::io::Result<()> {
    let (mut off_in, mut off_out, mut left) = (from as i64, at as i64, len);
    while left > 0 {
        let want = left.min(1 << 30) as usize;
        // SAFETY: valid fds and offset pointers for the duration of the call.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                want,
                0,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if matches!(e.raw_os_error(), Some(libc::EINTR)) {
                continue;
            }
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOSYS | libc::EXDEV | libc::EINVAL | libc::EOPNOTSUPP)
            ) {
                return copy_buffered(src, off_in as u64, dst, off_out as u64, left);
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "source file is shorter than its header says",
            ));
        }
        left -= n as u64;
    }
    Ok(())
}

fn copy_buffered(
    src: &File,
    mut from: u64,
    dst: &File,
    mut at: u64,
    mut left: u64,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; (left.min(8 << 20)) as usize];
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        src.read_exact_at(&mut buf[..n], from)?;
        dst.write_all_at(&buf[..n], at)?;
        from += n as u64;
        at += n as u64;
        left -= n as u64;
    }
    Ok(())
}
