//! The mounted filesystem's logic, without FUSE types: inodes, attributes, directory listings,
//! lookups (variant names included), open and read, returning plain results. The FUSE adapter
//! ([`crate::mount::fuse`]) only translates; everything here is testable without a mount.
//!
//! Two layouts:
//! - **single**: the root is one child's directory (the base's files, synthesized shards,
//!   `aoe_recipe.json`);
//! - **variants**: the root holds one directory per variant, named by its recipe
//!   (`lambda=0.6,subset=experts,delta=1.5`). Looking a valid name up creates the variant (a
//!   plan over the shared engine: no work proportional to the model's bytes); an invalid name is
//!   refused with a log line saying why. Variants share the engine: one chunk cache, one store
//!   of δ statistics.
//!
//! Live variants are bounded ([`FsOptions::max_variants`]): making one more forgets the least
//! recently used variant made by lookup that has no open file (its plan and cached chunks go;
//! named again, it is made again, with the same bytes). Sweep variants are never forgotten.
//!
//! Inode numbers: the root is 1; variant `k`'s directory is `(k+1) << 32` and its file `i` is
//! `(k+1) << 32 | (i+1)` (in the single layout, variant 0's directory is the root). `k` counts
//! every variant ever made and is never reused, so an inode always means the same bytes: an
//! inode of a forgotten variant gets ESTALE (the kernel then looks the path up again, which
//! makes the variant again under new inode numbers).
//!
//! The status report (`aoe status`) is the extended attribute [`STATUS_XATTR`] of the root and
//! of every variant directory: nothing is added to the checkpoint's listing.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::error::{Error, Result};

use crate::mount::status::{PrefetchReport, StatusReport, VariantReport};
use crate::recipe::{Recipe, RecipeSpec};
use crate::synth::prefetch::{PrefetchConfig, Prefetcher, SeqState};
use crate::synth::{Child, Engine, EngineOptions, FileKind};

/// Inode of the root directory.
pub const ROOT: u64 = 1;
/// The extended attribute holding the status report (JSON), on the root and variant directories.
pub(crate) const STATUS_XATTR: &str = "user.aoe.status";
/// Largest status report served (the kernel's limit on an attribute value is 64 KiB).
const STATUS_MAX: usize = 60 << 10;
/// Preferred I/O size reported by stat (readers size their buffers from it).
pub(crate) const BLKSIZE: u32 = 1 << 20;

/// Errors of filesystem operations; the adapter turns them into errnos ([`FsError::errno`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsError {
    /// No such file or directory (also: an invalid variant name).
    NotFound,
    /// A directory operation on a file.
    NotDir,
    /// A file operation on a directory.
    IsDir,
    /// Anything that would write.
    ReadOnly,
    /// No such extended attribute.
    NoData,
    /// A read that failed (a parent changed or vanished, an I/O error); logged.
    Io,
    /// An inode of a variant that was forgotten (see [`FsOptions::max_variants`]).
    Stale,
}

impl FsError {
    /// The errno for this error.
    pub fn errno(self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::ReadOnly => libc::EROFS,
            FsError::NoData => libc::ENODATA,
            FsError::Io => libc::EIO,
            FsError::Stale => libc::ESTALE,
        }
    }
}

/// Kind of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A directory.
    Dir,
    /// A regular file.
    File,
}

/// Attributes of a node. Stable for the life of the mount.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr {
    /// Inode number.
    pub ino: u64,
    /// Directory or file.
    pub kind: Kind,
    /// Size in bytes (0 for directories).
    pub size: u64,
    /// Permission bits: 0o444 for files, 0o555 for directories.
    pub perm: u16,
    /// Link count.
    pub nlink: u32,
    /// Modification time (also used as access and change time).
    pub mtime: SystemTime,
    /// Owner: the mounting user.
    pub uid: u32,
    /// Group: the mounting user's.
    pub gid: u32,
    /// Preferred I/O size.
    pub blksize: u32,
}

/// One directory entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    /// Inode number.
    pub ino: u64,
    /// Directory or file.
    pub kind: Kind,
    /// Name.
    pub name: String,
}

/// Filesystem statistics.
#[derive(Clone, Copy, Debug)]
pub struct StatFs {
    /// Total 4 KiB blocks (of one child).
    pub blocks: u64,
    /// Number of nodes.
    pub files: u64,
}

/// How a mount's engine is built.
#[derive(Clone, Debug)]
pub struct MountEngineOptions {
    /// Byte budget of the chunk cache.
    pub cache_bytes: usize,
    /// Chunk size in output bytes (default: [`mount_chunk_bytes`] of the budget).
    pub chunk_bytes: Option<usize>,
    /// Where δ statistics are remembered.
    pub stats_dir: Option<PathBuf>,
}

/// The chunk size a mount uses for a cache of `cache_bytes`: small enough that a small cache
/// holds many chunks and that each worker's scratch (an f32 per element) stays small, large
/// enough that per-chunk overhead vanishes. 1/64 of the budget, between 128 KiB and 1 MiB.
pub(crate) fn mount_chunk_bytes(cache_bytes: usize) -> usize {
    (cache_bytes / 64).clamp(128 << 10, 1 << 20)
}

/// Options of the filesystem.
#[derive(Clone, Debug)]
pub struct FsOptions {
    /// Owner of every node.
    pub uid: u32,
    /// Group of every node.
    pub gid: u32,
    /// Where it is mounted (for the status report).
    pub mountpoint: PathBuf,
    /// The daemon's log file, if any (for the status report).
    pub log_file: Option<PathBuf>,
    /// Sequential-read prefetch tuning.
    pub prefetch: PrefetchConfig,
    /// Variants layout: at most this many variants made by lookup are live (at least 1).
    pub max_variants: usize,
}

/// Default of [`FsOptions::max_variants`] (`aoe-mount --max-variants`).
pub const DEFAULT_MAX_VARIANTS: usize = 64;

impl FsOptions {
    /// Options owned by the calling user, with prefetch tuned for `cache_bytes`.
    pub fn for_current_user(mountpoint: &Path, cache_bytes: usize) -> FsOptions {
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        FsOptions {
            uid,
            gid,
            mountpoint: mountpoint.to_path_buf(),
            log_file: None,
            prefetch: PrefetchConfig::for_budget(cache_bytes),
            max_variants: DEFAULT_MAX_VARIANTS,
        }
    }
}

/// One variant: a name and the child it serves.
pub struct Variant {
    /// Its directory name (in the single layout, the empty string).
    pub name: String,
    /// The child (shared by aliases: names with identical recipes).
    pub child: Arc<Child>,
    /// Bytes served from this variant.
    pub served: AtomicU64,
    mtimes: Arc<[SystemTime]>,
    /// Never forgotten: the single layout's child and sweep variants.
    pinned: bool,
    /// When it was last used (a tick of [`Fs::tick`]), for least-recently-used eviction.
    last_used: AtomicU64,
    /// Open file handles on its files: a variant with any is not forgotten.
    open: AtomicU64,
    /// Its number (inodes `(id+1) << 32 | …`).
    id: usize,
}

/// The live variants and their names.
#[derive(Default)]
struct Table {
    /// Variant number → variant, in creation order.
    live: std::collections::BTreeMap<usize, Arc<Variant>>,
    /// Name → variant number, for the live variants.
    names: HashMap<String, usize>,
    /// The next variant number (numbers are never reused).
    next: usize,
    /// Variants forgotten so far.
    forgotten: u64,
}

#[derive(Default)]
struct Counters {
    bytes_served: AtomicU64,
    reads: AtomicU64,
    read_errors: AtomicU64,
    opens: AtomicU64,
    refused: AtomicU64,
}

struct Handle {
    ino: u64,
    seq: SeqState,
    var: Arc<Variant>,
}

/// The filesystem.
pub struct Fs {
    engine: Arc<Engine>,
    /// `Some` in the variants layout: the defaults every variant name is merged onto.
    template: Option<RecipeSpec>,
    table: RwLock<Table>,
    create: Mutex<()>,
    tick: AtomicU64,
    mtimes: OnceLock<Arc<[SystemTime]>>,
    refused_logged: Mutex<HashSet<String>>,
    opts: FsOptions,
    mtime: SystemTime,
    started: Instant,
    counters: Counters,
    handles: Mutex<HashMap<u64, Handle>>,
    next_fh: AtomicU64,
    prefetcher: OnceLock<Prefetcher>,
    startup: String,
}

/// What an inode number designates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Node {
    Root,
    Dir(usize),
    File(usize, usize),
}

fn dir_ino(v: usize) -> u64 {
    ((v as u64) + 1) << 32
}

fn file_ino(v: usize, i: usize) -> u64 {
    dir_ino(v) | ((i as u64) + 1)
}

/// Opens the engine of a mount: chunks sized for the cache ([`mount_chunk_bytes`] unless
/// given), and a small pool of idle buffers.
fn open_engine(base: &Path, parents: &[PathBuf], eng: &MountEngineOptions) -> Result<Arc<Engine>> {
    let opts = EngineOptions {
        cache_bytes: eng.cache_bytes,
        chunk_bytes: eng
            .chunk_bytes
            .unwrap_or_else(|| mount_chunk_bytes(eng.cache_bytes)),
        stats_dir: eng.stats_dir.clone(),
    };
    let engine = Engine::open(base, parents, &opts)?;
    // Idle buffers count against memory too: a small pool keeps RSS near the budget while
    // still reusing buffers (each eviction hands one to the next computation).
    engine
        .cache
        .set_pool_limit((eng.cache_bytes / 8).clamp(2 << 20, 16 << 20));
    Ok(engine)
}

impl Fs {
    /// The single layout: the root is the child of `recipe`. Opens and validates the parents
    /// and plans the recipe (so a bad recipe fails here, before anything is mounted).
    pub fn single(recipe: Recipe, eng: &MountEngineOptions, opts: FsOptions) -> Result<Fs> {
        let t = Instant::now();
        let engine = open_engine(&recipe.base, &recipe.parents, eng)?;
        let opened = t.elapsed();
        let child = Arc::new(Child::new(engine.clone(), recipe)?);
        let mut fs = Fs::empty(engine, None, opts);
        fs.startup = format!(
            "parents opened in {:.0} ms, recipe planned in {:.0} ms",
            opened.as_secs_f64() * 1e3,
            (t.elapsed() - opened).as_secs_f64() * 1e3
        );
        fs.push_variant(String::new(), child, true)
            .map_err(|reason| Error::BadRecipe { reason })?;
        Ok(fs)
    }

    /// The variants layout: variants are created by looking their names up; `sweep` names
    /// (name → recipe fields) are created now and validated. `template` supplies the base,
    /// the parents and defaults for every variant.
    pub fn variants(
        template: RecipeSpec,
        sweep: Vec<(String, RecipeSpec)>,
        eng: &MountEngineOptions,
        opts: FsOptions,
    ) -> Result<Fs> {
        let bad = |reason: String| Error::BadRecipe { reason };
        let base = template
            .base
            .clone()
            .ok_or_else(|| bad("--variants needs the base model: give --base DIR".into()))?;
        let parents = template.parents.clone().unwrap_or_default();
        if parents.is_empty() {
            return Err(bad(
                "--variants needs at least one parent besides the base: give --parent DIR".into(),
            ));
        }
        let t = Instant::now();
        let engine = open_engine(&base, &parents, eng)?;
        // The unit index is built once, now, so that no lookup pays for it.
        engine.unit_index();
        let mut fs = Fs::empty(engine, Some(template), opts);
        fs.startup = format!(
            "parents opened and indexed in {:.0} ms",
            t.elapsed().as_secs_f64() * 1e3
        );
        for (name, spec) in sweep {
            check_variant_name(&name).map_err(|r| bad(format!("sweep entry {name:?}: {r}")))?;
            fs.check_same_models(&spec)
                .map_err(|r| bad(format!("sweep entry {name:?}: {r}")))?;
            let recipe = fs.template_spec().merge(spec).resolve()?;
            let child = fs.child_for(recipe, false)?;
            if fs.table().names.contains_key(&name) {
                return Err(bad(format!("sweep entry {name:?} appears twice")));
            }
            fs.push_variant(name, child, true).map_err(bad)?;
        }
        Ok(fs)
    }

    fn empty(engine: Arc<Engine>, template: Option<RecipeSpec>, opts: FsOptions) -> Fs {
        let mtime = engine
            .models
            .list
            .iter()
            .flat_map(|c| c.shards.iter().map(|s| s.mtime))
            .max()
            .unwrap_or(UNIX_EPOCH);
        Fs {
            engine,
            template,
            table: RwLock::new(Table::default()),
            create: Mutex::new(()),
            tick: AtomicU64::new(0),
            mtimes: OnceLock::new(),
            refused_logged: Mutex::new(HashSet::new()),
            opts,
            mtime,
            started: Instant::now(),
            counters: Counters::default(),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            prefetcher: OnceLock::new(),
            startup: String::new(),
        }
    }

    /// How long opening the parents (and planning) took, for the log.
    pub fn startup(&self) -> &str {
        &self.startup
    }

    /// The shared engine.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Whether this is the variants layout.
    pub fn is_variants(&self) -> bool {
        self.template.is_some()
    }

    /// Starts the prefetch threads (call after any fork: threads do not survive one).
    pub fn start_prefetch(&self, threads: usize) -> std::io::Result<()> {
        if self.opts.prefetch.max_window == 0 || self.prefetcher.get().is_some() {
            return Ok(());
        }
        let limit = (self.engine.cache.budget() as u64 / 4).max(self.opts.prefetch.max_window);
        let p = Prefetcher::start(threads, limit)?;
        let _ = self.prefetcher.set(p);
        Ok(())
    }

    /// Stops the prefetch threads.
    pub fn stop_prefetch(&self) {
        if let Some(p) = self.prefetcher.get() {
            p.stop();
        }
    }

    /// The live variants, in creation order.
    pub fn variant_list(&self) -> Vec<Arc<Variant>> {
        self.table().live.values().cloned().collect()
    }

    fn table(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        self.table.read().unwrap_or_else(|e| e.into_inner())
    }

    fn touch(&self, var: &Variant) {
        let t = self.tick.fetch_add(1, Ordering::Relaxed);
        var.last_used.store(t, Ordering::Relaxed);
    }

    fn template_spec(&self) -> RecipeSpec {
        self.template.clone().unwrap_or_default()
    }

    fn variant(&self, v: usize) -> Option<Arc<Variant>> {
        let var = self.table().live.get(&v).cloned()?;
        self.touch(&var);
        Some(var)
    }

    /// The modification times of a child's files, the same for every variant: passthrough
    /// files' own, the mount's for the rest.
    fn mtimes(&self, child: &Child) -> Arc<[SystemTime]> {
        self.mtimes
            .get_or_init(|| {
                child
                    .files
                    .iter()
                    .map(|f| match &f.kind {
                        FileKind::Passthrough(p) => std::fs::metadata(p)
                            .and_then(|m| m.modified())
                            .unwrap_or(self.mtime),
                        FileKind::Shard(_) | FileKind::Recipe => self.mtime,
                    })
                    .collect()
            })
            .clone()
    }

    /// Adds a variant; an unpinned one first forgets the least recently used unpinned
    /// variants without open files until fewer than `max_variants` are live (refused when
    /// every one has an open file).
    fn push_variant(
        &self,
        name: String,
        child: Arc<Child>,
        pinned: bool,
    ) -> std::result::Result<usize, String> {
        let mtimes = self.mtimes(&child);
        let mut forgotten = Vec::new();
        let mut t = self.table.write().unwrap_or_else(|e| e.into_inner());
        if !pinned {
            let max = self.opts.max_variants.max(1);
            while t.live.values().filter(|v| !v.pinned).count() >= max {
                let lru = t
                    .live
                    .values()
                    .filter(|v| !v.pinned && v.open.load(Ordering::Acquire) == 0)
                    .min_by_key(|v| v.last_used.load(Ordering::Relaxed))
                    .map(|v| v.id);
                let Some(k) = lru.and_then(|k| t.live.remove(&k).map(|v| (k, v))) else {
                    return Err(format!(
                        "{max} variants are live and each has an open file (--max-variants {max})"
                    ));
                };
                t.names.remove(&k.1.name);
                t.forgotten += 1;
                forgotten.push(k.1);
            }
        }
        let k = t.next;
        if k >= u32::MAX as usize - 1 {
            return Err("no variant numbers left".into());
        }
        t.next += 1;
        let var = Arc::new(Variant {
            name: name.clone(),
            child,
            served: AtomicU64::new(0),
            mtimes,
            pinned,
            last_used: AtomicU64::new(0),
            open: AtomicU64::new(0),
            id: k,
        });
        self.touch(&var);
        t.live.insert(k, var);
        t.names.insert(name, k);
        drop(t);
        for v in &forgotten {
            log(&format!(
                "variant {:?} forgotten (least recently used of --max-variants {})",
                v.name, self.opts.max_variants
            ));
        }
        // Dropped here, outside the table's lock: a child no longer shared gives its chunks
        // back to the cache.
        drop(forgotten);
        Ok(k)
    }

    /// A child for `recipe`, shared with a live variant of identical recipe; `lazy` plans each
    /// unit at its first use (variants made by lookup).
    fn child_for(&self, recipe: Recipe, lazy: bool) -> Result<Arc<Child>> {
        let bytes = recipe.file_bytes();
        let existing = self
            .table()
            .live
            .values()
            .find(|v| v.child.recipe_bytes() == bytes.as_slice())
            .map(|v| v.child.clone());
        match existing {
            Some(c) => Ok(c),
            None if lazy => Ok(Arc::new(Child::lazy(self.engine.clone(), recipe)?)),
            None => Ok(Arc::new(Child::new(self.engine.clone(), recipe)?)),
        }
    }

    /// Refuses a sweep recipe that names other models than the mount's.
    fn check_same_models(&self, spec: &RecipeSpec) -> std::result::Result<(), String> {
        let canon = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
        let dirs: Vec<PathBuf> = self
            .engine
            .models
            .list
            .iter()
            .map(|c| c.dir.clone())
            .collect();
        if let Some(b) = &spec.base {
            if canon(b) != dirs[0] {
                return Err(format!(
                    "names base {}, the mount's base is {}",
                    b.display(),
                    dirs[0].display()
                ));
            }
        }
        if let Some(ps) = &spec.parents {
            let ps: Vec<PathBuf> = ps.iter().map(|p| canon(p)).collect();
            if ps[..] != dirs[1..] {
                return Err("names other parents than the mount's".into());
            }
        }
        Ok(())
    }

    /// Creates (or finds) the variant called `name`.
    fn variant_by_name(&self, name: &str) -> std::result::Result<usize, String> {
        if let Some(k) = self.live_name(name) {
            return Ok(k);
        }
        check_variant_name(name)?;
        let spec = RecipeSpec::from_variant_name(name).map_err(|e| e.to_string())?;
        let recipe = self
            .template_spec()
            .merge(spec)
            .resolve()
            .map_err(|e| e.to_string())?;
        let _g = self.create.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = self.live_name(name) {
            return Ok(k);
        }
        let t = Instant::now();
        let child = self.child_for(recipe, true).map_err(|e| e.to_string())?;
        let k = self.push_variant(name.to_string(), child, false)?;
        log(&format!(
            "variant {name:?} created in {:.1} ms",
            t.elapsed().as_secs_f64() * 1e3
        ));
        Ok(k)
    }

    /// The live variant called `name` (marked used).
    fn live_name(&self, name: &str) -> Option<usize> {
        let t = self.table();
        let k = *t.names.get(name)?;
        if let Some(v) = t.live.get(&k) {
            self.touch(v);
        }
        Some(k)
    }

    fn node(&self, ino: u64) -> std::result::Result<Node, FsError> {
        if ino == ROOT {
            return Ok(Node::Root);
        }
        let hi = ino >> 32;
        let lo = ino & 0xffff_ffff;
        if hi == 0 {
            return Err(FsError::NotFound);
        }
        let v = (hi - 1) as usize;
        let Some(var) = self.variant(v) else {
            // A number once given out is a forgotten variant: never another's bytes.
            return Err(if v < self.table().next {
                FsError::Stale
            } else {
                FsError::NotFound
            });
        };
        if lo == 0 {
            if !self.is_variants() {
                return Err(FsError::NotFound);
            }
            return Ok(Node::Dir(v));
        }
        let i = (lo - 1) as usize;
        if i >= var.child.files.len() {
            return Err(FsError::NotFound);
        }
        Ok(Node::File(v, i))
    }

    fn dir_attr(&self, ino: u64) -> Attr {
        Attr {
            ino,
            kind: Kind::Dir,
            size: 0,
            perm: 0o555,
            nlink: 2,
            mtime: self.mtime,
            uid: self.opts.uid,
            gid: self.opts.gid,
            blksize: BLKSIZE,
        }
    }

    fn file_attr(&self, v: usize, i: usize) -> std::result::Result<Attr, FsError> {
        let var = self.variant(v).ok_or(FsError::NotFound)?;
        let f = var.child.files.get(i).ok_or(FsError::NotFound)?;
        Ok(Attr {
            ino: file_ino(v, i),
            kind: Kind::File,
            size: f.size,
            perm: 0o444,
            nlink: 1,
            mtime: var.mtimes.get(i).copied().unwrap_or(self.mtime),
            uid: self.opts.uid,
            gid: self.opts.gid,
            blksize: BLKSIZE,
        })
    }

    /// Attributes of inode `ino`.
    pub fn getattr(&self, ino: u64) -> std::result::Result<Attr, FsError> {
        match self.node(ino)? {
            Node::Root => Ok(self.dir_attr(ROOT)),
            Node::Dir(v) => Ok(self.dir_attr(dir_ino(v))),
            Node::File(v, i) => self.file_attr(v, i),
        }
    }

    /// Looks `name` up in directory `parent`. In the variants layout, a valid variant name
    /// that does not exist yet is created; an invalid one is refused (ENOENT) with a log line.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> std::result::Result<Attr, FsError> {
        let node = self.node(parent)?;
        let Some(name) = name.to_str() else {
            return Err(FsError::NotFound);
        };
        match node {
            Node::File(..) => Err(FsError::NotDir),
            Node::Root if self.is_variants() => match self.variant_by_name(name) {
                Ok(k) => Ok(self.dir_attr(dir_ino(k))),
                Err(why) => {
                    self.counters.refused.fetch_add(1, Ordering::Relaxed);
                    self.log_refusal(name, &why);
                    Err(FsError::NotFound)
                }
            },
            Node::Root => self.lookup_file(0, name),
            Node::Dir(v) => self.lookup_file(v, name),
        }
    }

    fn lookup_file(&self, v: usize, name: &str) -> std::result::Result<Attr, FsError> {
        let var = self.variant(v).ok_or(FsError::NotFound)?;
        let i = var.child.file(name).ok_or(FsError::NotFound)?;
        self.file_attr(v, i)
    }

    fn log_refusal(&self, name: &str, why: &str) {
        let mut seen = self
            .refused_logged
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if seen.len() < 10_000 && seen.insert(name.to_string()) {
            log(&format!("no variant {name:?}: {why}"));
        }
    }

    /// The entries of directory `ino`, `.` and `..` first.
    pub fn readdir(&self, ino: u64) -> std::result::Result<Vec<DirEntry>, FsError> {
        let node = self.node(ino)?;
        let mut out = vec![
            DirEntry {
                ino,
                kind: Kind::Dir,
                name: ".".into(),
            },
            DirEntry {
                ino: ROOT,
                kind: Kind::Dir,
                name: "..".into(),
            },
        ];
        let files_of = |v: usize, out: &mut Vec<DirEntry>| -> std::result::Result<(), FsError> {
            let var = self.variant(v).ok_or(FsError::NotFound)?;
            out.extend(var.child.files.iter().enumerate().map(|(i, f)| DirEntry {
                ino: file_ino(v, i),
                kind: Kind::File,
                name: f.name.clone(),
            }));
            Ok(())
        };
        match node {
            Node::File(..) => return Err(FsError::NotDir),
            Node::Root if self.is_variants() => {
                let t = self.table();
                out.extend(t.live.iter().map(|(&k, v)| DirEntry {
                    ino: dir_ino(k),
                    kind: Kind::Dir,
                    name: v.name.clone(),
                }));
            }
            Node::Root => files_of(0, &mut out)?,
            Node::Dir(v) => files_of(v, &mut out)?,
        }
        Ok(out)
    }

    /// Opens inode `ino` with open(2) `flags`; returns a file handle. Anything that could
    /// write is refused with EROFS; `O_DIRECT` is served like any other open.
    pub fn open(&self, ino: u64, flags: i32) -> std::result::Result<u64, FsError> {
        if flags & libc::O_ACCMODE != libc::O_RDONLY
            || flags & (libc::O_TRUNC | libc::O_CREAT | libc::O_APPEND) != 0
        {
            return Err(FsError::ReadOnly);
        }
        let Node::File(v, _) = self.node(ino)? else {
            return Err(FsError::IsDir);
        };
        // Counted under the table's lock, so that no eviction picks it meanwhile.
        let var = {
            let t = self.table();
            let var = t.live.get(&v).cloned().ok_or(FsError::Stale)?;
            var.open.fetch_add(1, Ordering::AcqRel);
            var
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.counters.opens.fetch_add(1, Ordering::Relaxed);
        self.handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                fh,
                Handle {
                    ino,
                    seq: SeqState::default(),
                    var,
                },
            );
        Ok(fh)
    }

    /// Forgets a file handle.
    pub fn release(&self, fh: u64) {
        let h = self
            .handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&fh);
        if let Some(h) = h {
            h.var.open.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Opens directory `ino` (checks that it is one).
    pub fn opendir(&self, ino: u64) -> std::result::Result<(), FsError> {
        match self.node(ino)? {
            Node::File(..) => Err(FsError::NotDir),
            _ => Ok(()),
        }
    }

    /// Reads file `ino` at `offset` into `buf` (full unless at the end of the file); returns
    /// the bytes read. Errors are logged and become [`FsError::Io`].
    pub fn read(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> std::result::Result<usize, FsError> {
        let (var, v, i) = self.file(ino)?;
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        match var.child.read(i, offset, buf) {
            Ok(n) => {
                self.served(&var, v, i, fh, offset, n);
                Ok(n)
            }
            Err(e) => Err(self.read_error(&var, i, offset, buf.len(), &e)),
        }
    }

    /// Answers a read of `size` bytes of `ino` at `offset` through `send`, which gets the bytes
    /// (or the error) exactly once. A range that exists as one piece (a parent's file range,
    /// a computed chunk) is passed as it is, without a copy; anything else is read into `buf`.
    pub fn read_reply(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        size: usize,
        buf: &mut Vec<u8>,
        send: impl FnOnce(std::result::Result<&[u8], FsError>),
    ) {
        let (var, v, i) = match self.file(ino) {
            Ok(x) => x,
            Err(e) => return send(Err(e)),
        };
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        let span = match var.child.span(i, offset, size) {
            Ok(Some(span)) => span,
            Ok(None) => {
                if buf.len() < size {
                    buf.resize(size, 0);
                }
                return match var.child.read(i, offset, &mut buf[..size]) {
                    Ok(n) => {
                        send(Ok(&buf[..n]));
                        self.served(&var, v, i, fh, offset, n);
                    }
                    Err(e) => send(Err(self.read_error(&var, i, offset, size, &e))),
                };
            }
            Err(e) => return send(Err(self.read_error(&var, i, offset, size, &e))),
        };
        let sent = match var.child.span_bytes(&span) {
            Ok(bytes) => {
                send(Ok(bytes));
                Some(bytes.len())
            }
            Err(e) => {
                send(Err(self.read_error(&var, i, offset, size, &e)));
                None
            }
        };
        var.child.span_done(span);
        if let Some(n) = sent {
            self.served(&var, v, i, fh, offset, n);
        }
    }

    /// Variant, variant index and file index of file inode `ino`.
    fn file(&self, ino: u64) -> std::result::Result<(Arc<Variant>, usize, usize), FsError> {
        let (v, i) = match self.node(ino)? {
            Node::File(v, i) => (v, i),
            _ => return Err(FsError::IsDir),
        };
        Ok((self.variant(v).ok_or(FsError::NotFound)?, v, i))
    }

    /// Counts `n` bytes served and lets the prefetcher see the read.
    fn served(&self, var: &Arc<Variant>, v: usize, i: usize, fh: u64, offset: u64, n: usize) {
        self.counters
            .bytes_served
            .fetch_add(n as u64, Ordering::Relaxed);
        var.served.fetch_add(n as u64, Ordering::Relaxed);
        self.after_read(var, v, i, fh, offset, n as u64);
    }

    /// Counts and logs a failed read; the error the reader gets.
    fn read_error(&self, var: &Variant, i: usize, offset: u64, len: usize, e: &Error) -> FsError {
        self.counters.read_errors.fetch_add(1, Ordering::Relaxed);
        let file = var.child.files.get(i).map_or("?", |f| f.name.as_str());
        let path = if var.name.is_empty() {
            file.to_string()
        } else {
            format!("{}/{file}", var.name)
        };
        log(&format!(
            "read error (EIO) in {path} at {offset}+{len}: {e}"
        ));
        FsError::Io
    }

    fn after_read(&self, var: &Arc<Variant>, v: usize, i: usize, fh: u64, offset: u64, n: u64) {
        let Some(p) = self.prefetcher.get() else {
            return;
        };
        let Some(f) = var.child.files.get(i) else {
            return;
        };
        if !matches!(f.kind, FileKind::Shard(_)) {
            return;
        }
        let range = {
            let mut hs = self.handles.lock().unwrap_or_else(|e| e.into_inner());
            match hs.get_mut(&fh) {
                Some(h) if h.ino == file_ino(v, i) => {
                    h.seq.observe(offset, n, f.size, &self.opts.prefetch)
                }
                _ => None,
            }
        };
        // Readers go tensor by tensor in name order, not file order: never compute past the
        // tensor being read (the next one in the file is rarely the next one read).
        let range = range.and_then(|(from, len)| {
            let end = var
                .child
                .tensor_end(i, offset.saturating_add(n).saturating_sub(1))?;
            let to = from.saturating_add(len).min(end);
            (to > from).then(|| (from, to - from))
        });
        if let Some((from, len)) = range {
            p.submit(var.child.clone(), i, from, len);
        }
    }

    /// Extended attribute `name` of `ino`: the status report on directories.
    pub fn getxattr(&self, ino: u64, name: &OsStr) -> std::result::Result<Vec<u8>, FsError> {
        match self.node(ino)? {
            Node::Root | Node::Dir(_) if name == STATUS_XATTR => Ok(self.status_bytes()),
            _ => Err(FsError::NoData),
        }
    }

    /// Filesystem statistics.
    pub fn statfs(&self) -> StatFs {
        let t = self.table();
        let bytes: u64 = t
            .live
            .values()
            .next()
            .map_or(0, |v| v.child.files.iter().map(|f| f.size).sum());
        let files: u64 = t
            .live
            .values()
            .map(|v| v.child.files.len() as u64 + 1)
            .sum::<u64>()
            + 1;
        StatFs {
            blocks: bytes.div_ceil(4096),
            files,
        }
    }

    /// The status report as JSON.
    pub fn status_json(&self) -> Value {
        serde_json::to_value(self.status()).unwrap_or(Value::Null)
    }

    /// The status report.
    pub fn status(&self) -> StatusReport {
        let c = &self.engine.cache.counters;
        let computed = c.computed_bytes.load(Ordering::Relaxed);
        let ns = c.compute_ns.load(Ordering::Relaxed);
        let models = &self.engine.models.list;
        let variants = self
            .variant_list()
            .iter()
            .map(|v| {
                let mut r = v.child.recipe.to_json();
                if let Some(o) = r.as_object_mut() {
                    o.remove("base");
                    o.remove("parents");
                    o.remove("aoe_version");
                }
                VariantReport {
                    name: v.name.clone(),
                    recipe: r,
                    bytes_served: v.served.load(Ordering::Relaxed),
                }
            })
            .collect();
        let prefetch = self.prefetcher.get().map(|p| PrefetchReport {
            jobs: p.counters.jobs.load(Ordering::Relaxed),
            dropped: p.counters.dropped.load(Ordering::Relaxed),
            bytes_computed: p.counters.computed.load(Ordering::Relaxed),
            errors: p.counters.errors.load(Ordering::Relaxed),
        });
        StatusReport {
            aoe_version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            mountpoint: self.opts.mountpoint.to_string_lossy().into(),
            log: self
                .opts
                .log_file
                .as_ref()
                .map(|p| p.to_string_lossy().into()),
            uptime_s: self.started.elapsed().as_secs_f64(),
            layout: if self.is_variants() {
                "variants"
            } else {
                "single"
            }
            .into(),
            base: models.first().map(|m| m.dir.to_string_lossy().into()),
            parents: models
                .iter()
                .skip(1)
                .map(|m| m.dir.to_string_lossy().into())
                .collect(),
            variants,
            max_variants: self.opts.max_variants,
            variants_forgotten: self.table().forgotten,
            variants_omitted: None,
            bytes_served: self.counters.bytes_served.load(Ordering::Relaxed),
            reads: self.counters.reads.load(Ordering::Relaxed),
            opens: self.counters.opens.load(Ordering::Relaxed),
            read_errors: self.counters.read_errors.load(Ordering::Relaxed),
            names_refused: self.counters.refused.load(Ordering::Relaxed),
            bytes_computed: computed,
            compute_seconds: ns as f64 / 1e9,
            compute_gbps: if ns > 0 {
                computed as f64 / ns as f64
            } else {
                0.0
            },
            cache_hits: c.hits.load(Ordering::Relaxed),
            cache_misses: c.misses.load(Ordering::Relaxed),
            compute_errors: c.errors.load(Ordering::Relaxed),
            cache_held: self.engine.cache.held(),
            cache_budget: self.engine.cache.budget(),
            chunk_bytes: self.engine.chunk_bytes,
            prefetch,
        }
    }

    /// The status report's bytes, within the size of an extended attribute (variants beyond
    /// what fits are left out and counted).
    pub fn status_bytes(&self) -> Vec<u8> {
        let mut r = self.status();
        let mut bytes = serde_json::to_vec(&r).unwrap_or_default();
        if bytes.len() > STATUS_MAX {
            let total = r.variants.len();
            while serde_json::to_vec(&r.variants).map_or(0, |b| b.len()) > STATUS_MAX - 4096
                && !r.variants.is_empty()
            {
                r.variants.pop();
            }
            r.variants_omitted = Some((total - r.variants.len()) as u64);
            bytes = serde_json::to_vec(&r).unwrap_or_default();
        }
        bytes
    }
}

/// Checks that `name` can be a directory name (the recipe itself is checked by parsing it).
fn check_variant_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err("not a usable directory name".into());
    }
    if name.len() > 255 {
        return Err("longer than 255 bytes".into());
    }
    Ok(())
}

/// Parses a sweep file: a JSON object mapping variant names to recipes (JSON objects with the
/// fields of `aoe_recipe.json`, or strings in variant-name syntax).
pub fn read_sweep(path: &Path) -> Result<Vec<(String, RecipeSpec)>> {
    let text = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_sweep(path, &text)
}

/// Parses the bytes of a sweep file read from `path` (named in errors only); see [`read_sweep`].
pub fn parse_sweep(path: &Path, text: &[u8]) -> Result<Vec<(String, RecipeSpec)>> {
    let bad = |reason: String| Error::BadRecipe {
        reason: format!("sweep file {}: {reason}", path.display()),
    };
    let v: Value = serde_json::from_slice(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| bad("must be a JSON object mapping variant names to recipes".into()))?;
    let mut out = Vec::with_capacity(obj.len());
    for (name, r) in obj {
        let spec = match r {
            Value::String(s) => RecipeSpec::from_variant_name(s),
            other => RecipeSpec::from_json(other),
        }
        .map_err(|e| bad(format!("{name:?}: {e}")))?;
        out.push((name.clone(), spec));
    }
    Ok(out)
}

/// Writes a log line with a UTC timestamp to stderr (the log file when daemonized).
pub fn log(msg: &str) {
    eprintln!(
        "{} aoe-mount[{}]: {msg}",
        timestamp(SystemTime::now()),
        std::process::id()
    );
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub(crate) fn timestamp(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = if month <= 2 { y + 1 } else { y };
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::child::Span;
    use crate::testkit::{write_family, FamilySpec, FixtureDType};

    fn tiny_family(dir: &Path) -> Vec<PathBuf> {
        let mut spec = FamilySpec::tiny(FixtureDType::Fp8);
        spec.siblings = 2;
        write_family(&spec, dir).unwrap()
    }

    /// A recipe of the family's two models, without weights.
    fn template(fam: &[PathBuf]) -> RecipeSpec {
        RecipeSpec {
            base: Some(fam[0].clone()),
            parents: Some(vec![fam[1].clone()]),
            ..Default::default()
        }
    }

    fn eng() -> MountEngineOptions {
        MountEngineOptions {
            cache_bytes: 8 << 20,
            chunk_bytes: Some(64 << 10),
            stats_dir: None,
        }
    }

    fn opts() -> FsOptions {
        FsOptions::for_current_user(Path::new("/mnt/test"), 8 << 20)
    }

    #[test]
    fn single_layout_serves_the_child_without_a_mount() {
        let tmp = tempfile::tempdir().unwrap();
        let fam = tiny_family(tmp.path());
        let spec = RecipeSpec {
            base: Some(fam[0].clone()),
            parents: Some(vec![fam[1].clone()]),
            lambda: Some(0.5),
            ..Default::default()
        };
        let fs = Fs::single(spec.resolve().unwrap(), &eng(), opts()).unwrap();
        let root = fs.getattr(ROOT).unwrap();
        assert_eq!((root.kind, root.perm), (Kind::Dir, 0o555));
        let entries = fs.readdir(ROOT).unwrap();
        assert_eq!(entries[0].name, ".");
        assert!(entries.iter().any(|e| e.name == crate::recipe::RECIPE_FILE));
        let shard = entries
            .iter()
            .find(|e| e.name.ends_with(".safetensors"))
            .unwrap();
        let a = fs.lookup(ROOT, OsStr::new(&shard.name)).unwrap();
        assert_eq!((a.ino, a.kind, a.perm), (shard.ino, Kind::File, 0o444));
        assert_eq!(fs.getattr(a.ino).unwrap(), a, "attributes are stable");
        assert_eq!(fs.lookup(ROOT, OsStr::new("nope")), Err(FsError::NotFound));
        assert_eq!(fs.lookup(a.ino, OsStr::new("x")), Err(FsError::NotDir));
        assert_eq!(fs.open(a.ino, libc::O_WRONLY), Err(FsError::ReadOnly));
        assert_eq!(
            fs.open(a.ino, libc::O_RDONLY | libc::O_TRUNC),
            Err(FsError::ReadOnly)
        );
        assert_eq!(fs.open(ROOT, libc::O_RDONLY), Err(FsError::IsDir));
        let fh = fs.open(a.ino, libc::O_RDONLY | libc::O_DIRECT).unwrap();
        // Reads in 64 KiB pieces equal one whole read, and the header is the base's.
        let mut whole = vec![0u8; a.size as usize];
        assert_eq!(fs.read(a.ino, fh, 0, &mut whole).unwrap(), a.size as usize);
        let mut pieces = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        let mut off = 0;
        loop {
            let n = fs.read(a.ino, fh, off, &mut buf).unwrap();
            if n == 0 {
                break;
            }
            pieces.extend_from_slice(&buf[..n]);
            off += n as u64;
        }
        assert_eq!(pieces, whole);
        let base = std::fs::read(fam[0].join(&shard.name)).unwrap();
        let hl = 8 + u64::from_le_bytes(base[..8].try_into().unwrap()) as usize;
        assert_eq!(whole[..hl], base[..hl]);
        fs.release(fh);
        let st = fs.status_json();
        assert_eq!(st["layout"], "single");
        assert!(st["bytes_served"].as_u64().unwrap() >= 2 * a.size);
        let x: Value =
            serde_json::from_slice(&fs.getxattr(ROOT, OsStr::new(STATUS_XATTR)).unwrap()).unwrap();
        assert_eq!(x["bytes_served"], st["bytes_served"]);
        assert_eq!(
            fs.getxattr(a.ino, OsStr::new(STATUS_XATTR)),
            Err(FsError::NoData)
        );
    }

    /// Replies sent straight from a parent's mapping or a computed chunk carry the same bytes
    /// as reads copied into a buffer, for ranges inside one tensor, across tensors, across
    /// chunks, over the header and past the end.
    #[test]
    fn replies_without_a_copy_equal_copied_reads() {
        let tmp = tempfile::tempdir().unwrap();
        let fam = tiny_family(tmp.path());
        let template = template(&fam);
        let fs = Fs::variants(template, Vec::new(), &eng(), opts()).unwrap();
        let (mut parent_spans, mut chunk_spans, mut copies) = (0, 0, 0);
        for name in [
            "lambda=0.5",
            "subset=experts,weights=0:1",
            "lambda=0.3,delta=0.01",
        ] {
            let d = fs.lookup(ROOT, OsStr::new(name)).unwrap();
            for e in fs.readdir(d.ino).unwrap().into_iter().skip(2) {
                let a = fs.getattr(e.ino).unwrap();
                let Node::File(v, i) = fs.node(e.ino).unwrap() else {
                    panic!("{} is not a file", e.name)
                };
                let child = fs.variant(v).unwrap().child.clone();
                let fh = fs.open(e.ino, libc::O_RDONLY).unwrap();
                let mut whole = vec![0u8; a.size as usize];
                assert_eq!(fs.read(e.ino, fh, 0, &mut whole).unwrap(), whole.len());
                let mut buf = Vec::new();
                for size in [1000usize, 4096, 40_000, 64 << 10, 300_000, 1 << 20] {
                    let mut off = 0u64;
                    while off < a.size + 10 {
                        match child.span(i, off, size).unwrap() {
                            Some(Span::Parent { .. }) => parent_spans += 1,
                            Some(Span::Chunk { .. }) => chunk_spans += 1,
                            None => copies += 1,
                        }
                        let mut got = None;
                        fs.read_reply(e.ino, fh, off, size, &mut buf, |r| {
                            got = Some(r.unwrap().to_vec())
                        });
                        let lo = (off as usize).min(whole.len());
                        let hi = (lo + size).min(whole.len());
                        assert!(
                            got.as_deref() == Some(&whole[lo..hi]),
                            "{name}/{} at {off}+{size}",
                            e.name
                        );
                        off += size as u64 * 3 / 4 + 1;
                    }
                }
                fs.release(fh);
            }
        }
        assert!(parent_spans > 100 && chunk_spans > 100 && copies > 100);
    }

    #[test]
    fn variants_layout_creates_on_lookup_and_refuses_bad_names() {
        let tmp = tempfile::tempdir().unwrap();
        let fam = tiny_family(tmp.path());
        let template = template(&fam);
        let sweep = vec![(
            "chimera".to_string(),
            RecipeSpec::from_variant_name("lambda=1,subset=experts").unwrap(),
        )];
        let fs = Fs::variants(template, sweep, &eng(), opts()).unwrap();
        let names = |fs: &Fs| {
            fs.readdir(ROOT)
                .unwrap()
                .into_iter()
                .skip(2)
                .map(|e| e.name)
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&fs), vec!["chimera"]);
        assert_eq!(
            fs.lookup(ROOT, OsStr::new("lambda=x")),
            Err(FsError::NotFound)
        );
        assert_eq!(fs.lookup(ROOT, OsStr::new("a/b")), Err(FsError::NotFound));
        let d = fs.lookup(ROOT, OsStr::new("lambda=0.25")).unwrap();
        assert_eq!(d.kind, Kind::Dir);
        assert_eq!(
            fs.lookup(ROOT, OsStr::new("lambda=0.25")).unwrap(),
            d,
            "the same name is the same variant"
        );
        assert_eq!(names(&fs), vec!["chimera", "lambda=0.25"]);
        let cfg = fs.lookup(d.ino, OsStr::new("config.json")).unwrap();
        let fh = fs.open(cfg.ino, libc::O_RDONLY).unwrap();
        let mut buf = vec![0u8; cfg.size as usize + 10];
        let n = fs.read(cfg.ino, fh, 0, &mut buf).unwrap();
        assert_eq!(
            buf[..n],
            std::fs::read(fam[0].join("config.json")).unwrap()[..]
        );
        // An alias shares the child (and so its cached chunks).
        let alias = fs.lookup(ROOT, OsStr::new("weights=0.75:0.25")).unwrap();
        assert_ne!(alias.ino, d.ino);
        let vs = fs.variant_list();
        assert!(Arc::ptr_eq(&vs[1].child, &vs[2].child));
        assert_eq!(fs.status_json()["names_refused"], 2);
    }

    /// With `max_variants` 2, a third variant forgets the least recently used one without an
    /// open file; its inodes get ESTALE (never another variant's bytes) and its name makes it
    /// again under new inode numbers. When every live variant has an open file, a new name is
    /// refused.
    #[test]
    fn least_recently_used_variants_are_forgotten() {
        let tmp = tempfile::tempdir().unwrap();
        let fam = tiny_family(tmp.path());
        let mut o = opts();
        o.max_variants = 2;
        let fs = Fs::variants(template(&fam), Vec::new(), &eng(), o).unwrap();
        let a = fs.lookup(ROOT, OsStr::new("lambda=0.1")).unwrap();
        let b = fs.lookup(ROOT, OsStr::new("lambda=0.2")).unwrap();
        let fa = fs.lookup(a.ino, OsStr::new("config.json")).unwrap();
        let fb = fs.lookup(b.ino, OsStr::new("config.json")).unwrap();
        let held = fs.open(fa.ino, libc::O_RDONLY).unwrap();
        // b is more recently used than a, but a has an open file: b goes.
        let c = fs.lookup(ROOT, OsStr::new("lambda=0.3")).unwrap();
        assert_eq!(fs.getattr(b.ino), Err(FsError::Stale));
        assert_eq!(fs.getattr(fb.ino), Err(FsError::Stale));
        assert_eq!(fs.open(fb.ino, libc::O_RDONLY), Err(FsError::Stale));
        assert_eq!(FsError::Stale.errno(), libc::ESTALE);
        assert_eq!(fs.getattr(fa.ino).unwrap(), fa);
        let names: Vec<String> = fs.variant_list().iter().map(|v| v.name.clone()).collect();
        assert_eq!(names, vec!["lambda=0.1", "lambda=0.3"]);
        // Named again: made again, under new inode numbers.
        let b2 = fs.lookup(ROOT, OsStr::new("lambda=0.2")).unwrap();
        assert!(b2.ino > c.ino && b2.ino != b.ino);
        assert_eq!(fs.getattr(c.ino), Err(FsError::Stale));
        // Every live variant with an open file: a new name is refused.
        let fb2 = fs.lookup(b2.ino, OsStr::new("config.json")).unwrap();
        let held2 = fs.open(fb2.ino, libc::O_RDONLY).unwrap();
        assert_eq!(
            fs.lookup(ROOT, OsStr::new("lambda=0.4")),
            Err(FsError::NotFound)
        );
        fs.release(held);
        assert!(fs.lookup(ROOT, OsStr::new("lambda=0.4")).is_ok());
        assert_eq!(fs.getattr(fa.ino), Err(FsError::Stale));
        fs.release(held2);
        let st = fs.status_json();
        assert_eq!(st["variants_forgotten"], 3);
        assert_eq!(st["variants"].as_array().unwrap().len(), 2);
    }

    /// A variant made by lookup plans each unit at its first read: a unit that cannot be built
    /// fails that read (EIO, logged) instead of the lookup, while `Child::new` (aoe write,
    /// aoe plan, a single-recipe mount, sweep entries) still refuses the recipe up front.
    #[test]
    fn lookup_variants_check_units_at_first_read() {
        let tmp = tempfile::tempdir().unwrap();
        let fam = tiny_family(tmp.path());
        let engine = open_engine(&fam[0], &fam[1..], &eng()).unwrap();
        let index = engine.unit_index();
        let recipe = template(&fam).merge(RecipeSpec::from_variant_name("lambda=0.5").unwrap());
        let recipe = recipe.resolve().unwrap();
        let eager = Child::new(engine.clone(), recipe.clone()).unwrap();
        let lazy = Child::lazy(engine.clone(), recipe).unwrap();
        assert_eq!(eager.recipe_bytes(), lazy.recipe_bytes());
        let n = eager.files.len();
        assert_eq!(n, lazy.files.len());
        for (i, f) in eager.files.iter().enumerate() {
            let mut x = vec![0u8; f.size as usize];
            let mut y = vec![0u8; f.size as usize];
            eager.read(i, 0, &mut x).unwrap();
            lazy.read(i, 0, &mut y).unwrap();
            assert!(x == y, "{} differs", f.name);
        }
        // Selecting nothing is still refused at once, with the same error.
        let none = template(&fam)
            .merge(RecipeSpec::from_variant_name("lambda=0.5,subset=re:^nothing$").unwrap())
            .resolve()
            .unwrap();
        let e1 = Child::new(engine.clone(), none.clone())
            .err()
            .unwrap()
            .to_string();
        let e2 = Child::lazy(engine.clone(), none).err().unwrap().to_string();
        assert_eq!(e1, e2);
        assert!(index.units.len() > 1);
    }

    #[test]
    fn timestamps_are_civil_dates() {
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + std::time::Duration::from_millis(1_709_251_199_123); // leap year
        assert_eq!(timestamp(t), "2024-02-29T23:59:59.123Z");
    }

    #[test]
    fn inode_numbers_round_trip() {
        assert_eq!(dir_ino(0), 1 << 32);
        assert_eq!(file_ino(2, 5), (3 << 32) | 6);
        assert_ne!(dir_ino(0), ROOT);
    }

    #[test]
    fn variant_names_must_be_directory_names() {
        assert!(check_variant_name("lambda=0.5").is_ok());
        assert!(check_variant_name("").is_err());
        assert!(check_variant_name("a/b").is_err());
        assert!(check_variant_name("..").is_err());
        assert!(check_variant_name(&"x".repeat(256)).is_err());
    }

    #[test]
    fn errors_map_to_errnos() {
        assert_eq!(FsError::ReadOnly.errno(), libc::EROFS);
        assert_eq!(FsError::Io.errno(), libc::EIO);
        assert_eq!(FsError::NotFound.errno(), libc::ENOENT);
    }
}
