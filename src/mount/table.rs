//! The mount table (`/proc/self/mountinfo`), mountpoint checks, unmounting and the kernel
//! knobs of a mount (`read_ahead_kb`, aborting a connection).

use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub(crate) fn mnt_error(path: &Path, msg: impl Into<String>) -> Error {
    Error::io(path, std::io::Error::other(msg.into()))
}

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
pub(crate) fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
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

pub(crate) fn cstring(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| mnt_error(p, "path contains a NUL byte"))
}

pub(crate) fn umount2(p: &Path, flags: i32) -> std::io::Result<()> {
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
pub(crate) fn set_read_ahead(p: &Path, kb: u32) -> Result<PathBuf> {
    let m = mount_at(p).ok_or_else(|| mnt_error(p, "is not a mount point"))?;
    let knob = PathBuf::from(format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        m.major, m.minor
    ));
    std::fs::write(&knob, format!("{kb}\n")).map_err(|e| Error::io(&knob, e))?;
    Ok(knob)
}

/// Aborts a FUSE connection (its pending and future requests fail), given the mount's device.
pub(crate) fn abort_connection(dev: Option<(u32, u32)>) -> Result<()> {
    let (major, minor) =
        dev.ok_or_else(|| mnt_error(Path::new("/sys/fs/fuse/connections"), "unknown connection"))?;
    let knob = PathBuf::from(format!(
        "/sys/fs/fuse/connections/{}/abort",
        (major << 20) | minor
    ));
    std::fs::write(&knob, "1").map_err(|e| Error::io(&knob, e))
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
}
