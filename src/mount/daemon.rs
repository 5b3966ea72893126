//! The mount's life: mounting (in a daemon forked before any thread starts, or in the
//! foreground), raising the backing device's `read_ahead_kb` so that sequential readers and
//! mmap faults send many 1 MiB requests at once instead of one 128 KiB one, signals, and
//! unmounting. SIGINT, SIGTERM and SIGHUP unmount and end the daemon with status 0 (a busy
//! mount is detached lazily; a second signal aborts the connection).

use std::io::{Read, Write};
use std::os::unix::io::FromRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use fuser::{Config, MountOption, Session, SessionACL};

use crate::error::{Error, Result};
use crate::mount::fs::{log, Fs};
use crate::mount::fuse::{AoeFuse, Pool};
use crate::mount::table::{abort_connection, mnt_error, mount_at, set_read_ahead, umount2};

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
    Err(Error::Daemon {
        mountpoint: cfg.mountpoint.clone(),
        reason: e,
    })
}
