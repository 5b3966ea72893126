//! Mount helpers for the FUSE tests: [`MountGuard`] runs `aoe-mount` and unmounts in `Drop`,
//! whatever the test's outcome (also when the daemon died), so no test leaves a mount behind.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The `aoe-mount` binary.
pub fn aoe_mount_bin() -> &'static str {
    env!("CARGO_BIN_EXE_aoe-mount")
}

/// A command running `aoe-mount` with a clean environment: no configured parents, statistics
/// and logs in a shared temporary cache.
pub fn aoe_mount_cmd(args: &[&str]) -> Command {
    let mut c = Command::new(aoe_mount_bin());
    c.args(args)
        .env(
            "XDG_CACHE_HOME",
            std::env::temp_dir().join("aoe-test-cache"),
        )
        .env(
            "XDG_CONFIG_HOME",
            std::env::temp_dir().join("aoe-test-no-config"),
        )
        .env_remove("AOE_BASE")
        .env_remove("AOE_PARENTS");
    c
}

/// Runs `aoe-mount` to completion.
pub fn aoe_mount(args: &[&str]) -> Output {
    aoe_mount_cmd(args).output().expect("run aoe-mount")
}

/// Whether `p` is a mount point (from /proc/self/mountinfo, without touching `p`).
pub fn is_mounted(p: &Path) -> bool {
    aoe::mount::table::mount_at(p).is_some()
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// Whether process `pid` exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// A field of /proc/PID/status in KiB (VmRSS, VmHWM, ...).
pub fn proc_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Unmounts `p` with everything available: `aoe-mount --unmount`, then `umount -l`, then
/// `fusermount3 -u -z`. Quiet; returns whether `p` is no longer a mount point.
pub fn force_unmount(p: &Path) -> bool {
    for _ in 0..3 {
        if !is_mounted(p) {
            return true;
        }
        let _ = aoe_mount_cmd(&["--unmount", p.to_str().unwrap()])
            .stderr(Stdio::null())
            .status();
        if !is_mounted(p) {
            return true;
        }
        let _ = Command::new("umount")
            .arg("-l")
            .arg(p)
            .stderr(Stdio::null())
            .status();
        if !is_mounted(p) {
            return true;
        }
        let _ = Command::new("fusermount3")
            .args(["-u", "-z"])
            .arg(p)
            .stderr(Stdio::null())
            .status();
    }
    !is_mounted(p)
}

/// A live `aoe-mount`; unmounts (and kills a foreground daemon) when dropped.
pub struct MountGuard {
    /// The mount point.
    pub mnt: PathBuf,
    /// The daemon's log file.
    pub log: PathBuf,
    /// The foreground daemon, if mounted with `--foreground`.
    pub child: Option<Child>,
}

impl MountGuard {
    /// Mounts with `aoe-mount ARGS… MNT` (daemonized); panics with its stderr if it fails.
    pub fn mount(mnt: &Path, args: &[&str]) -> MountGuard {
        match MountGuard::try_mount(mnt, args) {
            Ok(g) => g,
            Err(out) => {
                panic!(
                    "aoe-mount {args:?} {} failed:\n{}",
                    mnt.display(),
                    String::from_utf8_lossy(&out.stderr)
                )
            }
        }
    }

    /// Mounts with `aoe-mount ARGS… MNT` (daemonized), returning its output on failure.
    pub fn try_mount(mnt: &Path, args: &[&str]) -> Result<MountGuard, Output> {
        std::fs::create_dir_all(mnt).expect("create mount point");
        let log = mnt.with_extension("log");
        let mut full: Vec<&str> = args.to_vec();
        full.extend_from_slice(&["--log", log.to_str().unwrap(), mnt.to_str().unwrap()]);
        let out = aoe_mount(&full);
        // Whatever happened, a guard now owns the mount point.
        let g = MountGuard {
            mnt: mnt.to_path_buf(),
            log,
            child: None,
        };
        if out.status.success() {
            assert!(
                is_mounted(mnt),
                "aoe-mount exited 0 but {} is not mounted",
                mnt.display()
            );
            Ok(g)
        } else {
            Err(out)
        }
    }

    /// Mounts with `aoe-mount --foreground ARGS… MNT` as a child process and waits until the
    /// mount serves its status report.
    pub fn foreground(mnt: &Path, args: &[&str]) -> MountGuard {
        std::fs::create_dir_all(mnt).expect("create mount point");
        let log = mnt.with_extension("log");
        let file = std::fs::File::create(&log).expect("log file");
        let mut full: Vec<&str> = vec!["--foreground"];
        full.extend_from_slice(args);
        full.push(mnt.to_str().unwrap());
        let child = aoe_mount_cmd(&full)
            .stderr(file)
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn aoe-mount");
        let mut g = MountGuard {
            mnt: mnt.to_path_buf(),
            log,
            child: Some(child),
        };
        let ok = wait_until(Duration::from_secs(30), || {
            if let Some(c) = g.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("aoe-mount --foreground exited with {st}:\n{}", g.log_text());
                }
            }
            is_mounted(&g.mnt) && aoe::mount::status::status_json(&g.mnt).is_ok()
        });
        assert!(ok, "foreground mount did not come up:\n{}", g.log_text());
        g
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The status report.
    pub fn status(&self) -> serde_json::Value {
        aoe::mount::status::status_json(&self.mnt).expect("status report")
    }

    /// The daemon's pid (from its status report).
    pub fn pid(&self) -> u32 {
        if let Some(c) = &self.child {
            return c.id();
        }
        self.status()["pid"].as_u64().expect("pid in status") as u32
    }

    /// Path of `rel` inside the mount.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        let pid = if self.child.is_none() && is_mounted(&self.mnt) {
            aoe::mount::status::status_json(&self.mnt)
                .ok()
                .and_then(|v| v["pid"].as_u64())
                .map(|p| p as u32)
        } else {
            None
        };
        let gone = force_unmount(&self.mnt);
        if let Some(mut c) = self.child.take() {
            if !wait_until(Duration::from_secs(5), || {
                matches!(c.try_wait(), Ok(Some(_)))
            }) {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
        if let Some(pid) = pid {
            // The daemon exits once unmounted; make sure it does not outlive the test.
            if !wait_until(Duration::from_secs(5), || !alive(pid)) {
                // SAFETY: signalling a process we started.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
        if !gone && !std::thread::panicking() {
            panic!("could not unmount {}", self.mnt.display());
        }
    }
}

/// The errno of `getxattr(path, name)`, or the value.
pub fn getxattr(path: &Path, name: &str) -> Result<Vec<u8>, i32> {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 1 << 16];
    // SAFETY: valid C strings and buffer.
    let r = unsafe {
        libc::getxattr(
            p.as_ptr(),
            n.as_ptr(),
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        buf.truncate(r as usize);
        Ok(buf)
    }
}
