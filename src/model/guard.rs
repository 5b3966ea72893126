//! Reads of a parent's mapping that survive the file shrinking underneath them.
//!
//! Computing from a parent's mapping saves copying its bytes with pread first (a third of the
//! daemon's time in a mix), but a page past the file's current end raises SIGBUS. Sizes are
//! checked before each read; for a file that shrinks in between, [`guarded`] installs a
//! SIGBUS handler that maps a zero page over the faulting page and lets the read go on, then
//! reports where the fault was. The caller throws its result away and retires the shard,
//! whose mapping now holds zeros there. A SIGBUS anywhere else keeps its default action.

use std::cell::Cell;
use std::sync::atomic::{compiler_fence, AtomicUsize, Ordering};
use std::sync::Once;

thread_local! {
    /// Whether this thread is inside [`guarded`].
    static ACTIVE: Cell<bool> = const { Cell::new(false) };
    /// The first faulting address seen inside it (0: none).
    static FAULT: Cell<usize> = const { Cell::new(0) };
}

static INSTALL: Once = Once::new();
static PAGE: AtomicUsize = AtomicUsize::new(4096);

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    if ACTIVE.get() && code == libc::BUS_ADRERR && addr != 0 {
        let page = PAGE.load(Ordering::Relaxed);
        let at = addr & !(page - 1);
        // SAFETY: replaces one page of a read-only file mapping (the one that just faulted)
        // with zeros; mmap is async-signal-safe.
        let p = unsafe {
            libc::mmap(
                at as *mut libc::c_void,
                page,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            if FAULT.get() == 0 {
                FAULT.set(addr);
            }
            return;
        }
    }
    // Not a guarded read: the default action, as if this handler did not exist.
    // SAFETY: signal and raise are async-signal-safe.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

fn install() {
    // SAFETY: sysconf has no preconditions; sigaction gets a zeroed, filled-in action.
    unsafe {
        let ps = libc::sysconf(libc::_SC_PAGESIZE);
        if ps > 0 {
            PAGE.store(ps as usize, Ordering::Relaxed);
        }
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigbus as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
    }
}

/// Runs `f`, which reads file mappings; returns its result and the address of the first read
/// that fell past a file's end (its page read as zeros), if any.
pub fn guarded<R>(f: impl FnOnce() -> R) -> (R, Option<usize>) {
    INSTALL.call_once(install);
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            compiler_fence(Ordering::SeqCst);
            ACTIVE.set(false);
        }
    }
    FAULT.set(0);
    ACTIVE.set(true);
    let reset = Reset;
    // Keep the mapped reads inside the window where the handler is armed.
    compiler_fence(Ordering::SeqCst);
    let r = f();
    drop(reset);
    let at = FAULT.get();
    (r, (at != 0).then_some(at))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_read_past_a_shrunken_file_reads_zeros_and_is_reported() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[7u8; 3 * 4096]).unwrap();
        // SAFETY: a private test file; the truncation below is the point of the test.
        let map = unsafe { memmap2::Mmap::map(&f) }.unwrap();
        let (sum, fault) = guarded(|| map.iter().map(|&b| b as u64).sum::<u64>());
        assert_eq!((sum, fault), (7 * 3 * 4096, None));
        f.set_len(4096).unwrap();
        let (sum, fault) = guarded(|| {
            map.iter()
                .map(|&b| std::hint::black_box(b) as u64)
                .sum::<u64>()
        });
        assert_eq!(sum, 7 * 4096, "the lost pages read as zeros");
        let at = fault.expect("the fault is reported");
        let base = map.as_ptr() as usize;
        assert!((base + 4096..base + 3 * 4096).contains(&at));
        // Outside a guarded call the handler is disarmed again.
        assert!(!ACTIVE.get());
    }
}
