//! The FUSE adapter: a thin layer that turns fuser callbacks into [`crate::fs`] calls and
//! errors into errnos, plus everything about the mount's life: mounting (in a daemon forked
//! before any thread starts, or in the foreground), kernel knobs, signals, unmounting, and the
//! client side of `aoe status` and `aoe demo`.
//!
//! - Reads are answered from a fixed pool of worker threads fed by a channel, so the kernel
//!   keeps many requests in flight; metadata is answered on fuser's own threads.
//! - Every open gets `FOPEN_KEEP_CACHE` (content never changes: tensor-parallel ranks share the
//!   page cache) and never `direct_io` (which would break mmap). `O_DIRECT` opens are served.
//! - Anything that would write gets EROFS (the mount is also read-only for the kernel).
//! - After mounting, the backing device's `read_ahead_kb` is raised so that sequential readers
//!   and mmap faults send many 1 MiB requests at once instead of one 128 KiB one (DESIGN §5).
//! - A read that is one piece of existing bytes (a range of a parent's shard, a computed
//!   chunk) is answered from those bytes: the kernel copies straight from the parent's page
//!   cache (through the shard's mapping) into the child's, with no copy in between.
//! - SIGINT, SIGTERM and SIGHUP unmount and end the daemon with status 0 (a busy mount is
//!   detached lazily; a second signal aborts the connection).
//! - `aoe status MOUNTPOINT` reads the [`STATUS_XATTR`] extended attribute of the root.

use std::ffi::{CString, OsStr};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::FromRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fuser::{
    AccessFlags, Config, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem,
    FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner, MountOption, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, Session, SessionACL, WriteFlags,
};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::fs::{log, Attr, Fs, FsError, Kind, STATUS_XATTR};

/// How long the kernel may cache attributes and names: content never changes.
const TTL: Duration = Duration::from_secs(24 * 3600);

/// How the mount is run.
#[derive(Clone, Debug)]
pub struct MountConfig {
    /// Where to mount (an existing empty directory).
    pub mountpoint: PathBuf,
    /// Worker threads answering reads.
    pub threads: usize,
    /// Threads computing prefetched chunks.
    pub prefetch_threads: usize,
    /// Let other users read the mount.
    pub allow_other: bool,
    /// Value for the mount's `read_ahead_kb` (0: leave the kernel's default).
    pub read_ahead_kb: u32,
}

/// The default number of read workers: the cores, at least 4 (reads wait on parents' pages
/// as well as compute), at most 16.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(4, |n| n.get())
        .clamp(4, 16)
}

fn mnt_error(path: &Path, msg: impl Into<String>) -> Error {
    Error::io(path, std::io::Error::other(msg.into()))
}

// ----------------------------------------------------------------------------------------
// Worker pool

type Job = Box<dyn FnOnce(&mut Vec<u8>) + Send>;

/// A fixed set of threads running jobs from a channel; each keeps one reusable read buffer.
struct Pool {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
}

impl Pool {
    fn start(threads: usize) -> std::io::Result<Pool> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("aoe-read-{i}"))
                .spawn(move || {
                    let mut buf: Vec<u8> = Vec::new();
                    loop {
                        let job = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                        let Ok(job) = job else { return };
                        // A panic drops the reply, which answers EIO; the worker lives on.
                        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            job(&mut buf)
                        }));
                        if r.is_err() {
                            log("a read panicked; it was answered with EIO");
                        }
                    }
                })?;
        }
        Ok(Pool {
            tx: Mutex::new(Some(tx)),
        })
    }

    fn submit(&self, job: Job) -> std::result::Result<(), Job> {
        match self.tx.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            Some(tx) => tx.send(job).map_err(|e| e.0),
            None => Err(job),
        }
    }

    fn stop(&self) {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

// ----------------------------------------------------------------------------------------
// The fuser adapter

struct AoeFuse {
    fs: Arc<Fs>,
    pool: Arc<Pool>,
}

fn errno(e: FsError) -> Errno {
    Errno::from_i32(e.errno())
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.mtime,
        mtime: a.mtime,
        ctime: a.mtime,
        crtime: a.mtime,
        kind: match a.kind {
            Kind::Dir => FileType::Directory,
            Kind::File => FileType::RegularFile,
        },
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: a.blksize,
        flags: 0,
    }
}

impl Filesystem for AoeFuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Many readahead requests in flight (the default is 16).
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        for cap in [InitFlags::FUSE_PARALLEL_DIROPS, InitFlags::FUSE_ASYNC_DIO] {
            let _ = config.add_capabilities(cap);
        }
        Ok(())
    }

    fn destroy(&mut self) {
        self.pool.stop();
        self.fs.stop_prefetch();
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.fs.lookup(parent.0, name) {
            Ok(a) => reply.entry(&TTL, &file_attr(&a), Generation(0)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.fs.getattr(ino.0) {
            Ok(a) => reply.attr(&TTL, &file_attr(&a)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Errno::EROFS);
    }

    fn readlink(&self, _req: &Request, _ino: INodeNo, reply: ReplyData) {
        reply.error(Errno::EINVAL);
    }

    fn mknod(
        &self,
        _req: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _m: u32,
        _u: u32,
        _r: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mkdir(&self, _req: &Request, _p: INodeNo, _n: &OsStr, _m: u32, _u: u32, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn unlink(&self, _req: &Request, _p: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn rmdir(&self, _req: &Request, _p: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn symlink(&self, _req: &Request, _p: INodeNo, _n: &OsStr, _t: &Path, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn rename(
        &self,
        _req: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _np: INodeNo,
        _nn: &OsStr,
        _f: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn link(&self, _req: &Request, _i: INodeNo, _np: INodeNo, _nn: &OsStr, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.fs.open(ino.0, flags.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let fs = self.fs.clone();
        let job: Job = Box::new(move |buf: &mut Vec<u8>| {
            fs.read_reply(ino.0, fh.0, offset, size as usize, buf, |r| match r {
                Ok(bytes) => reply.data(bytes),
                Err(e) => reply.error(errno(e)),
            })
        });
        if let Err(job) = self.pool.submit(job) {
            // The pool is gone (shutting down): answer here.
            let mut buf = Vec::new();
            job(&mut buf);
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.fs.release(fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.fs.opendir(ino.0) {
            Ok(()) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let entries = match self.fs.readdir(ino.0) {
            Ok(e) => e,
            Err(e) => return reply.error(errno(e)),
        };
        for (i, e) in entries.iter().enumerate().skip(offset as usize) {
            let kind = match e.kind {
                Kind::Dir => FileType::Directory,
                Kind::File => FileType::RegularFile,
            };
            if reply.add(INodeNo(e.ino), (i + 1) as u64, kind, &e.name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = self.fs.statfs();
        reply.statfs(s.blocks, 0, 0, s.files, 0, 4096, 255, 4096);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _n: &OsStr,
        _v: &[u8],
        _f: i32,
        _p: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.fs.getxattr(ino.0, name) {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        // The status attribute is deliberately not listed: copies of the mount (cp -a,
        // rsync -X) must not carry it.
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        if mask.contains(AccessFlags::W_OK) {
            reply.error(Errno::EROFS);
        } else {
            reply.ok();
        }
    }

    fn create(
        &self,
        _req: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _m: u32,
        _u: u32,
        _f: i32,
        reply: ReplyCreate,
    ) {
        reply.error(Errno::EROFS);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _i: INodeNo,
        _fh: FileHandle,
        _o: u64,
        _l: u64,
        _m: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }
}

// ----------------------------------------------------------------------------------------
// Mount table, mountpoint checks, unmounting, kernel knobs

/// One line of `/proc/self/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    /// Where it is mounted.
    pub mountpoint: PathBuf,
    /// Device major number.
    pub major: u32,
    /// Device minor number.
    pub minor: u32,
    /// Filesystem type, e.g. `fuse.aoe`.
    pub fstype: String,
    /// Source, e.g. `aoe`.
    pub source: String,
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// Parses mountinfo text.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    let mut out = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if fields.len() < 5 || dash + 2 >= fields.len() {
            continue;
        }
        let Some((maj, min)) = fields[2].split_once(':') else {
            continue;
        };
        let (Ok(major), Ok(minor)) = (maj.parse(), min.parse()) else {
            continue;
        };
        out.push(MountEntry {
            mountpoint: PathBuf::from(OsStr::from_bytes(&unescape(fields[4]))),
            major,
            minor,
            fstype: fields[dash + 1].to_string(),
            source: String::from_utf8_lossy(&unescape(fields[dash + 2])).into_owned(),
        });
    }
    out
}

/// The mounts of this process's namespace.
pub fn mounts() -> Vec<MountEntry> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| parse_mountinfo(&t))
        .unwrap_or_default()
}

/// An absolute form of `p` found without touching `p` itself (which may be a dead mount):
/// its parent directory canonicalized, joined with its last component.
pub fn mount_path(p: &Path) -> PathBuf {
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => parent
            .canonicalize()
            .unwrap_or_else(|_| parent.to_path_buf())
            .join(name),
        _ => abs,
    }
}

/// The topmost mount at `p`, if `p` is a mount point.
pub fn mount_at(p: &Path) -> Option<MountEntry> {
    let want = mount_path(p);
    mounts().into_iter().rev().find(|m| m.mountpoint == want)
}

/// Checks that `p` can be mounted on: an existing directory that is not a mount point yet.
/// Returns its canonical path.
pub fn check_mountpoint(p: &Path) -> Result<PathBuf> {
    // Resolve symlinks when the path answers (a dead mount does not: then take it as written).
    let target = p.canonicalize().unwrap_or_else(|_| mount_path(p));
    if let Some(m) = mount_at(&target) {
        // Listing always reaches the daemon (attributes may be cached by the kernel).
        let dead =
            std::fs::read_dir(p).err().and_then(|e| e.raw_os_error()) == Some(libc::ENOTCONN);
        let msg = if dead {
            format!(
                "is already mounted ({}) and its daemon is gone; clear it with `aoe-mount --unmount {}`",
                m.fstype,
                p.display()
            )
        } else if m.fstype.starts_with("fuse") && m.source == "aoe" {
            format!(
                "is already an aoe mount; unmount it first (`aoe-mount --unmount {}`)",
                p.display()
            )
        } else {
            format!(
                "is already a mount point ({}); unmount it or choose another directory",
                m.fstype
            )
        };
        return Err(mnt_error(p, msg));
    }
    match std::fs::metadata(p) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(mnt_error(
            p,
            "mount point does not exist (create an empty directory first)",
        )),
        Err(e) => Err(Error::io(p, e)),
        Ok(m) if !m.is_dir() => Err(mnt_error(p, "mount point is not a directory")),
        Ok(_) => p.canonicalize().map_err(|e| Error::io(p, e)),
    }
}

fn cstring(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| mnt_error(p, "path contains a NUL byte"))
}

fn umount2(p: &Path, flags: i32) -> std::io::Result<()> {
    let c = CString::new(p.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: a valid NUL-terminated path and plain flags.
    if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Unmounts the mount at `p`, whether its daemon is alive or dead: a clean unmount, else a
/// lazy one when it is busy, else (not root) `fusermount3 -u -z`. Returns what was done.
pub fn unmount(p: &Path) -> Result<String> {
    let at = match mount_at(&mount_path(p)) {
        Some(_) => mount_path(p),
        None => p.canonicalize().unwrap_or_else(|_| mount_path(p)),
    };
    let Some(m) = mount_at(&at) else {
        return Err(mnt_error(p, "is not a mount point"));
    };
    match umount2(&at, 0) {
        Ok(()) => return Ok(format!("unmounted {} ({})", at.display(), m.fstype)),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            if umount2(&at, libc::MNT_DETACH).is_ok() {
                return Ok(format!(
                    "{} was busy: detached (it goes away when the last open file is closed)",
                    at.display()
                ));
            }
        }
        Err(_) => {}
    }
    if umount2(&at, libc::MNT_DETACH).is_ok() {
        return Ok(format!("unmounted {} ({}, lazily)", at.display(), m.fstype));
    }
    for tool in ["fusermount3", "fusermount"] {
        let ok = std::process::Command::new(tool)
            .args(["-u", "-z", "--"])
            .arg(&at)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(format!("unmounted {} with {tool}", at.display()));
        }
    }
    let err = umount2(&at, libc::MNT_DETACH)
        .err()
        .map_or_else(String::new, |e| e.to_string());
    Err(mnt_error(p, format!("cannot unmount: {err}")))
}

/// Sets the `read_ahead_kb` of the mount at `p`'s backing device.
pub fn set_read_ahead(p: &Path, kb: u32) -> Result<PathBuf> {
    let m = mount_at(p).ok_or_else(|| mnt_error(p, "is not a mount point"))?;
    let knob = PathBuf::from(format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        m.major, m.minor
    ));
    std::fs::write(&knob, format!("{kb}\n")).map_err(|e| Error::io(&knob, e))?;
    Ok(knob)
}

/// Aborts a FUSE connection (its pending and future requests fail), given the mount's device.
fn abort_connection(dev: Option<(u32, u32)>) -> Result<()> {
    let (major, minor) =
        dev.ok_or_else(|| mnt_error(Path::new("/sys/fs/fuse/connections"), "unknown connection"))?;
    let knob = PathBuf::from(format!(
        "/sys/fs/fuse/connections/{}/abort",
        (major << 20) | minor
    ));
    std::fs::write(&knob, "1").map_err(|e| Error::io(&knob, e))
}

// ----------------------------------------------------------------------------------------
// Serving: foreground and daemon

/// Reports the mount's outcome once: to the waiting parent through a pipe (daemon) or to
/// stderr (foreground).
pub struct Ready {
    pipe: Option<std::fs::File>,
    sent: bool,
}

impl Ready {
    /// For a foreground mount.
    pub fn foreground() -> Ready {
        Ready {
            pipe: None,
            sent: false,
        }
    }

    fn send(&mut self, outcome: std::result::Result<String, String>) {
        if self.sent {
            return;
        }
        self.sent = true;
        match (&mut self.pipe, &outcome) {
            (Some(p), Ok(_)) => {
                let _ = p.write_all(b"OK\n");
            }
            (Some(p), Err(e)) => {
                let _ = p.write_all(format!("ERR {e}\n").as_bytes());
            }
            (None, _) => {}
        }
        self.pipe = None;
        match outcome {
            Ok(m) => log(&m),
            Err(e) => log(&format!("error: {e}")),
        }
    }
}

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local, zero-initialized set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Mounts `fs` at `cfg.mountpoint` and serves it until it is unmounted (by a signal, by
/// `aoe-mount --unmount` or `umount`). Reports the mount's outcome to `ready` once it serves.
/// Must be called before this process starts any thread.
pub fn serve(fs: Fs, cfg: &MountConfig, ready: &mut Ready) -> Result<()> {
    let r = serve_inner(fs, cfg, ready);
    if let Err(e) = &r {
        ready.send(Err(e.to_string()));
    }
    r
}

fn serve_inner(fs: Fs, cfg: &MountConfig, ready: &mut Ready) -> Result<()> {
    let mnt = &cfg.mountpoint;
    // Every thread started from here on inherits the mask; the signal thread takes them.
    let set = signal_set();
    // SAFETY: blocking signals in the calling thread with a valid set.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };

    let fs = Arc::new(fs);
    fs.start_prefetch(cfg.prefetch_threads)
        .map_err(|e| mnt_error(mnt, format!("starting prefetch threads: {e}")))?;
    let pool = Arc::new(
        Pool::start(cfg.threads)
            .map_err(|e| mnt_error(mnt, format!("starting read threads: {e}")))?,
    );

    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::RO,
        MountOption::FSName("aoe".into()),
        MountOption::Subtype("aoe".into()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::NoAtime,
    ];
    if cfg.allow_other {
        config.acl = SessionACL::All;
    }
    config.n_threads = Some(2);
    config.clone_fd = true;

    let t = Instant::now();
    let mut session = Session::new(
        AoeFuse {
            fs: fs.clone(),
            pool: pool.clone(),
        },
        mnt,
        &config,
    )
    .map_err(|e| mnt_error(mnt, format!("cannot mount: {e}")))?;
    let mut unmounter = session.unmount_callable();
    let session_thread = std::thread::Builder::new()
        .name("aoe-session".into())
        .spawn(move || session.run())
        .map_err(|e| mnt_error(mnt, format!("starting the session: {e}")))?;

    // The mount serves once its root answers.
    if let Err(e) = std::fs::metadata(mnt) {
        let _ = unmounter.unmount();
        return Err(mnt_error(mnt, format!("mounted but not serving: {e}")));
    }
    let ra = if cfg.read_ahead_kb > 0 {
        match set_read_ahead(mnt, cfg.read_ahead_kb) {
            Ok(_) => format!(", read_ahead_kb {}", cfg.read_ahead_kb),
            Err(e) => {
                log(&format!("warning: cannot raise read-ahead ({e}); requests stay at the kernel's default size"));
                String::new()
            }
        }
    } else {
        String::new()
    };
    let what = match fs.variant_list().as_slice() {
        [v] if !fs.is_variants() => {
            let w = &v.child.recipe.weights;
            format!("child with weights {w:?}")
        }
        vs => format!("variants root ({} variants so far)", vs.len()),
    };
    ready.send(Ok(format!(
        "mounted {what} at {} in {:.0} ms ({}; {} read threads, cache {} MiB{ra})",
        mnt.display(),
        t.elapsed().as_secs_f64() * 1e3,
        fs.startup(),
        cfg.threads,
        fs.engine().cache.budget() >> 20
    )));

    let sig_mnt = mnt.clone();
    // The connection's device, found now: after a lazy unmount the mount table no longer has it.
    let dev = mount_at(mnt).map(|m| (m.major, m.minor));
    std::thread::Builder::new()
        .name("aoe-signals".into())
        .spawn(move || {
            let mut count = 0;
            loop {
                let mut sig: libc::c_int = 0;
                // SAFETY: waiting on the blocked set with a valid out pointer.
                if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                    continue;
                }
                count += 1;
                let name = match sig {
                    libc::SIGINT => "SIGINT",
                    libc::SIGTERM => "SIGTERM",
                    _ => "SIGHUP",
                };
                if count == 1 {
                    log(&format!("{name}: unmounting {}", sig_mnt.display()));
                    if let Err(e) = unmounter.unmount() {
                        if umount2(&sig_mnt, libc::MNT_DETACH).is_ok() {
                            log(&format!("mount busy ({e}): detached; exiting when the last open file is closed (signal again to abort)"));
                        } else {
                            log(&format!("cannot unmount: {e}"));
                        }
                    }
                } else if let Err(e) = abort_connection(dev) {
                    log(&format!("{name} again: cannot abort the connection ({e}); exiting"));
                    std::process::exit(0);
                } else {
                    log(&format!("{name} again: connection aborted"));
                }
            }
        })
        .map_err(|e| mnt_error(mnt, format!("starting the signal thread: {e}")))?;

    let result = session_thread.join();
    pool.stop();
    fs.stop_prefetch();
    if let Err(e) = fs.engine().stats.flush() {
        log(&format!("warning: cannot save δ statistics: {e}"));
    }
    match result {
        Ok(Ok(())) => {
            log(&format!("unmounted {}; exiting", mnt.display()));
            Ok(())
        }
        Ok(Err(e)) => Err(mnt_error(mnt, format!("session ended with an error: {e}"))),
        Err(_) => Err(mnt_error(mnt, "session thread panicked")),
    }
}

/// Forks a daemon that mounts `fs` and serves it; returns in the calling process once the
/// mount serves (with the daemon's pid) or with the daemon's error. The daemon's stderr goes
/// to `log_file`. Must be called before this process starts any thread.
pub fn spawn_daemon(fs: Fs, cfg: &MountConfig, log_file: &Path) -> Result<u32> {
    if let Some(dir) = log_file.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_file)
        .map_err(|e| Error::io(log_file, e))?;
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 fills two fds we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(mnt_error(
            &cfg.mountpoint,
            format!("pipe: {}", std::io::Error::last_os_error()),
        ));
    }
    // SAFETY: the fds were just created and are owned here.
    let (mut rd, wr) = unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    // SAFETY: the process is single-threaded here (the caller's contract), so the child may
    // run arbitrary code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(mnt_error(
            &cfg.mountpoint,
            format!("fork: {}", std::io::Error::last_os_error()),
        ));
    }
    if pid == 0 {
        drop(rd);
        // SAFETY: plain syscalls on fds we own; setsid detaches from the terminal's session.
        unsafe {
            libc::setsid();
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
            if null >= 0 {
                libc::dup2(null, 0);
                libc::dup2(null, 1);
                libc::close(null);
            }
            use std::os::unix::io::AsRawFd;
            libc::dup2(log.as_raw_fd(), 2);
        }
        drop(log);
        let _ = std::env::set_current_dir("/");
        let mut ready = Ready {
            pipe: Some(wr),
            sent: false,
        };
        let code = match serve(fs, cfg, &mut ready) {
            Ok(()) => 0,
            Err(_) => 1,
        };
        std::process::exit(code);
    }
    drop(wr);
    drop(log);
    // The daemon has its own copy of everything. Ours is never used again: the process exits
    // right after, so skip freeing it (that alone takes ~0.1 s for a DeepSeek-sized model).
    std::mem::forget(fs);
    let mut msg = String::new();
    let _ = rd.read_to_string(&mut msg);
    if msg.starts_with("OK") {
        return Ok(pid as u32);
    }
    // Reap the daemon if it already exited.
    // SAFETY: waitpid on our own child with a valid status pointer.
    unsafe {
        let mut st = 0;
        libc::waitpid(pid, &mut st, 0);
    }
    let e = msg
        .strip_prefix("ERR ")
        .map(|m| m.trim_end().to_string())
        .unwrap_or_else(|| {
            format!(
                "the mount daemon exited before mounting; see {}",
                log_file.display()
            )
        });
    Err(Error::BadOutput {
        path: cfg.mountpoint.clone(),
        reason: e,
    })
}

// ----------------------------------------------------------------------------------------
// aoe status

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

// ----------------------------------------------------------------------------------------
// aoe demo

/// The directory `aoe demo` uses by default: `$XDG_CACHE_HOME/aoe/demo`.
pub fn default_demo_dir() -> Option<PathBuf> {
    crate::stats::default_cache_dir().map(|d| d.join("demo"))
}

/// The `aoe-mount` executable: beside the running one, else on `PATH`.
pub fn aoe_mount_exe() -> PathBuf {
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        let p = dir.join("aoe-mount");
        if p.is_file() {
            return p;
        }
        // Test binaries live in target/*/deps; the executables one level up.
        if let Some(p) = dir
            .parent()
            .map(|d| d.join("aoe-mount"))
            .filter(|p| p.is_file())
        {
            return p;
        }
    }
    PathBuf::from("aoe-mount")
}

/// `aoe demo [DIR]`: writes the built-in demo family (two FP8 siblings of one ancestor in the
/// DeepSeek-V3 layout) under `DIR/family` unless it is there, mounts the λ = 0.5 child of
/// the first two at `DIR/child`, and returns what to run next.
pub fn demo(dir: Option<PathBuf>) -> Result<String> {
    use crate::fixture::{write_family, FamilySpec};
    let dir = dir
        .or_else(default_demo_dir)
        .ok_or_else(|| Error::BadRecipe {
            reason: "no cache directory: give DIR".into(),
        })?;
    let family = dir.join("family");
    // Two siblings of one ancestor, as the README tells it (the demo preset has a third).
    let mut spec = FamilySpec::demo();
    spec.siblings = 2;
    let done = family.join(".complete");
    if !done.is_file() {
        eprintln!(
            "aoe demo: writing a family of {} FP8 siblings ({} MB each) to {} …",
            spec.siblings,
            spec.parent_bytes() / 1_000_000,
            family.display()
        );
        // Only directories carrying our marker are ever removed: DIR may be a user's own.
        let ours = |d: &Path| d.join(".aoe-demo").is_file();
        let foreign = |d: &Path| d.exists() && !ours(d);
        let tmp = dir.join("family.partial");
        for d in [&tmp, &family] {
            if foreign(d) {
                return Err(Error::BadOutput {
                    path: d.to_path_buf(),
                    reason: "exists and was not written by aoe demo; choose another DIR".into(),
                });
            }
        }
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        std::fs::write(tmp.join(".aoe-demo"), b"").map_err(|e| Error::io(&tmp, e))?;
        write_family(&spec, &tmp).map_err(|e| Error::io(&tmp, e))?;
        let _ = std::fs::remove_dir_all(&family);
        std::fs::rename(&tmp, &family).map_err(|e| Error::io(&family, e))?;
        std::fs::write(&done, b"").map_err(|e| Error::io(&done, e))?;
    }
    let (m1, m2) = (family.join("m1"), family.join("m2"));
    let mnt = dir.join("child");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let mut already = false;
    if mount_at(&mnt).is_some() {
        match status_json(&mnt) {
            Ok(_) => already = true,
            Err(_) => {
                unmount(&mnt)?;
            }
        }
    }
    if !already {
        std::fs::create_dir_all(&mnt).map_err(|e| Error::io(&mnt, e))?;
        let exe = aoe_mount_exe();
        let out = std::process::Command::new(&exe)
            .arg("--base")
            .arg(&m1)
            .arg("--parent")
            .arg(&m2)
            .args(["--lambda", "0.5"])
            .arg(&mnt)
            .output()
            .map_err(|e| Error::io(&exe, e))?;
        if !out.status.success() {
            return Err(mnt_error(
                &mnt,
                format!(
                    "aoe-mount failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            ));
        }
    }
    let shard = std::fs::read_dir(&m1)
        .ok()
        .and_then(|rd| {
            let mut v: Vec<String> = rd
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.ends_with(".safetensors"))
                .collect();
            v.sort();
            v.into_iter().next()
        })
        .unwrap_or_else(|| "model.safetensors".into());
    let (d, c) = (dir.display(), mnt.display());
    Ok(format!(
        "{verb} the λ = 0.5 child of {m1} and {m2} at {c}\n\
         (a demo family: {n} FP8 siblings of one ancestor, DeepSeek-V3 layout, {mb} MB each, in {d}/family)\n\n\
         Try:\n  \
           ls -l {c}\n  \
           cat {c}/aoe_recipe.json\n  \
           python3 -c \"from safetensors import safe_open; f = safe_open('{c}/{shard}', 'np'); print(list(f.keys())[:4])\"\n  \
           aoe status {c}\n\n\
         Swap variants without writing anything:\n  \
           mkdir -p {d}/variants && aoe-mount --variants --base {m1} --parent {m2} {d}/variants\n  \
           ls {d}/variants/lambda=0.7,subset=experts/\n\n\
         Unmount:\n  \
           aoe-mount --unmount {c}\n\n\
         With real parents: aoe-mount --base /models/DeepSeek-V3-0324 --parent /models/DeepSeek-R1 --lambda 0.5 /mnt/child\n\
         then: vllm serve /mnt/child --tensor-parallel-size 8\n",
        verb = if already { "Already mounted:" } else { "Mounted" },
        m1 = m1.display(),
        m2 = m2.display(),
        n = spec.siblings,
        mb = spec.parent_bytes() / 1_000_000,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_parses_escaped_paths_and_optional_fields() {
        let text = "36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    90 36 0:55 / /tmp/a\\040b rw,nosuid,nodev,relatime - fuse.aoe aoe ro,user_id=0,group_id=0\n\
                    garbage line\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mountpoint, PathBuf::from("/mnt/parent"));
        assert_eq!((m[0].major, m[0].minor), (98, 0));
        assert_eq!(m[0].fstype, "ext3");
        assert_eq!(m[1].mountpoint, PathBuf::from("/tmp/a b"));
        assert_eq!(m[1].fstype, "fuse.aoe");
        assert_eq!(m[1].source, "aoe");
        assert_eq!((m[1].major, m[1].minor), (0, 55));
    }

    #[test]
    fn recipes_are_described_in_one_line() {
        let r = serde_json::json!({"weights": [0.5, 0.5], "delta": 1.5, "subset": ["experts", "router"], "metric": "stored", "rules": []});
        assert_eq!(
            describe_recipe(&r),
            "weights [0.5, 0.5], delta 1.5, subset experts+router, metric stored"
        );
    }
}
