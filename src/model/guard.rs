//! Reads of a parent's mapping that survive the file shrinking underneath them.
//!
//! Computing from a parent's mapping saves copying its bytes with pread first (a third of the
//! daemon's time in a mix), but a page past the file's current end raises SIGBUS. Sizes are
//! checked before each read; for a file that shrinks in between, [`guarded`] installs (once per
//! process) a SIGBUS handler that maps a zero page over the faulting page and lets the read go
//! on, then reports where the fault was. The caller throws its result away and retires the
//! shard, whose mapping now holds zeros there.
//!
//! A SIGBUS the handler does not own goes to the handler that was installed before it, as if
//! ours did not exist (see [`on_sigbus`]). In a Rust program that is usually std's stack-overflow
//! handler, which for any fault outside a guard page resets SIGBUS to its default action and
//! returns, so the fault repeats and kills the process as it would have without us.

use std::cell::{Cell, UnsafeCell};
use std::mem::MaybeUninit;
use std::sync::atomic::{compiler_fence, AtomicBool, AtomicUsize, Ordering};
use std::sync::Once;

thread_local! {
    /// Whether this thread is inside [`guarded`].
    static ACTIVE: Cell<bool> = const { Cell::new(false) };
    /// The first faulting address seen inside it (0: none).
    static FAULT: Cell<usize> = const { Cell::new(0) };
}

static INSTALL: Once = Once::new();
static PAGE: AtomicUsize = AtomicUsize::new(4096);

/// The SIGBUS action that was in force when ours was installed, written by that `sigaction`
/// call and read only by the handler once [`PREV_SET`] says it is complete.
struct Prev(UnsafeCell<MaybeUninit<libc::sigaction>>);
// SAFETY: written only in `install` while `PREV_SET` is false, read only after it is true.
unsafe impl Sync for Prev {}
static PREV: Prev = Prev(UnsafeCell::new(MaybeUninit::zeroed()));
static PREV_SET: AtomicBool = AtomicBool::new(false);

/// Linux `si_code`s of a SIGBUS raised by the faulting access itself (BUS_ADRALN, BUS_ADRERR,
/// BUS_OBJERR, BUS_MCEERR_AR): returning from the handler retries the access, which faults
/// again. Codes ≤ 0 are signals sent by a process; BUS_MCEERR_AO (5) is asynchronous.
fn repeats_on_return(code: libc::c_int) -> bool {
    (1..=4).contains(&code)
}

/// The SIGBUS handler.
///
/// What it relies on:
/// - It calls only async-signal-safe functions: `mmap`, `sigaction`, `pthread_sigmask`,
///   `raise` (and whatever the previous handler calls, which is that handler's business). It
///   does not allocate, lock or print.
/// - The state it reads: the thread-locals `ACTIVE` and `FAULT` of the faulting thread (const
///   initialised, so reading them never allocates or registers a destructor; `guarded` sets them
///   on the same thread, with compiler fences so the mapped reads stay inside the window), the
///   page size in `PAGE`, and the previous action in `PREV` once `PREV_SET` is true (Acquire,
///   paired with the Release store after the installing `sigaction` returned). A foreign fault in
///   the instant between that `sigaction` and the store gets the default action.
/// - A fault it owns is synchronous (BUS_ADRERR at a non-null address, on the thread that is
///   inside `guarded`): `mmap(MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, PROT_READ)` replaces the
///   one faulting page of the read-only file mapping with a zero page (never any other mapping:
///   the address is the one that just faulted, rounded down to its page), and the faulting load
///   is retried by the CPU when the handler returns, now reading zeros. Only loads run in the
///   window, so a read-only page suffices. If that mmap fails, the fault is treated as foreign.
/// - A fault it does not own goes to the previous action: a `SA_SIGINFO` handler is called with
///   the same three arguments, a plain handler with the signal number, each with the previous
///   action's `sa_mask` blocked (SIGBUS itself stays blocked, as it is in this handler) and
///   `SA_RESETHAND` honoured. `SIG_DFL` resets the action to the default and lets the fault
///   repeat on return (so the process dies of the original fault, core dump and all), or
///   re-raises a SIGBUS that would not repeat (one sent by `kill`, or BUS_MCEERR_AO), which is
///   delivered when the handler returns and unblocks it. `SIG_IGN` drops a sent SIGBUS; one
///   raised by a fault cannot be ignored (the kernel would force the default action), so it
///   gets `SIG_DFL` treatment.
/// - It is installed with `SA_ONSTACK`, so on a thread with an alternate signal stack (std gives
///   its threads one) it and the previous handler run there, as std's handler expects.
extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
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
    // SAFETY: `PREV` is complete once `PREV_SET` is true; see `chain`.
    unsafe { chain(sig, info, ctx, code) }
}

/// Hands a SIGBUS that is not ours to the previous action (see [`on_sigbus`]).
///
/// # Safety
/// Only from the SIGBUS handler, with the arguments the kernel passed it.
unsafe fn chain(
    sig: libc::c_int,
    info: *mut libc::siginfo_t,
    ctx: *mut libc::c_void,
    code: libc::c_int,
) {
    let prev = if PREV_SET.load(Ordering::Acquire) {
        // SAFETY: complete and no longer written (see `Prev`).
        Some(unsafe { (*PREV.0.get()).assume_init_ref() })
    } else {
        None
    };
    let handler = prev.map_or(libc::SIG_DFL, |p| p.sa_sigaction);
    if handler == libc::SIG_IGN && !repeats_on_return(code) {
        return;
    }
    let Some(prev) = prev.filter(|_| handler != libc::SIG_DFL && handler != libc::SIG_IGN) else {
        // The default action, as if this handler did not exist.
        // SAFETY: sigaction and raise are async-signal-safe; `dfl` is a zeroed, filled-in action.
        unsafe {
            let mut dfl: libc::sigaction = std::mem::zeroed();
            dfl.sa_sigaction = libc::SIG_DFL;
            libc::sigemptyset(&mut dfl.sa_mask);
            libc::sigaction(sig, &dfl, std::ptr::null_mut());
            if !repeats_on_return(code) {
                libc::raise(sig);
            }
        }
        return;
    };
    // SAFETY: async-signal-safe calls on valid sets; the previous handler was installed for
    // this signal with these flags, so it expects exactly these arguments.
    unsafe {
        if prev.sa_flags & libc::SA_RESETHAND != 0 {
            let mut dfl: libc::sigaction = std::mem::zeroed();
            dfl.sa_sigaction = libc::SIG_DFL;
            libc::sigemptyset(&mut dfl.sa_mask);
            libc::sigaction(sig, &dfl, std::ptr::null_mut());
        }
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, &prev.sa_mask, &mut old);
        if prev.sa_flags & libc::SA_SIGINFO != 0 {
            let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                std::mem::transmute(handler);
            f(sig, info, ctx);
        } else {
            let f: extern "C" fn(libc::c_int) = std::mem::transmute(handler);
            f(sig);
        }
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
    }
}

fn install() {
    // SAFETY: sysconf has no preconditions; sigaction gets a zeroed, filled-in action and writes
    // the previous one into `PREV`, which the handler does not read until `PREV_SET` is true.
    unsafe {
        let ps = libc::sysconf(libc::_SC_PAGESIZE);
        if ps > 0 {
            PAGE.store(ps as usize, Ordering::Relaxed);
        }
        PREV_SET.store(false, Ordering::Release);
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigbus as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigemptyset(&mut sa.sa_mask);
        let prev = (*PREV.0.get()).as_mut_ptr();
        if libc::sigaction(libc::SIGBUS, &sa, prev) == 0 {
            PREV_SET.store(true, Ordering::Release);
        }
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
    /// What the child reports through its exit status.
    const RAN_WITH_INFO: i32 = 42;
    const RAN_PLAIN: i32 = 43;
    const WRONG_ARGS: i32 = 44;
    const NO_FAULT: i32 = 45;
    static EXPECT: AtomicUsize = AtomicUsize::new(0);

    extern "C" fn prev_siginfo(sig: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
        // SAFETY: called by `chain` with the kernel's siginfo.
        let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
        let ok = sig == libc::SIGBUS
            && code == libc::BUS_ADRERR
            && addr == EXPECT.load(Ordering::Relaxed);
        // SAFETY: _exit is async-signal-safe; the fault would repeat if this returned.
        unsafe { libc::_exit(if ok { RAN_WITH_INFO } else { WRONG_ARGS }) }
    }

    extern "C" fn prev_plain(sig: libc::c_int) {
        // SAFETY: as above.
        unsafe {
            libc::_exit(if sig == libc::SIGBUS {
                RAN_PLAIN
            } else {
                WRONG_ARGS
            })
        }
    }

    /// Forks a child that installs `prev` (a handler, or SIG_DFL/SIG_IGN) for SIGBUS, then ours
    /// over it, then reads `addr` outside a guarded call; returns the child's wait status.
    /// The child calls only async-signal-safe functions (the parent may have other threads).
    fn child_faulting_at(addr: *const u8, prev: usize, flags: libc::c_int) -> libc::c_int {
        EXPECT.store(addr as usize, Ordering::Relaxed);
        // SAFETY: the child does nothing but sigaction, a volatile read and _exit.
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0, "fork failed");
            if pid == 0 {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = prev;
                sa.sa_flags = flags;
                libc::sigemptyset(&mut sa.sa_mask);
                libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
                install();
                std::ptr::read_volatile(addr);
                libc::_exit(NO_FAULT);
            }
            let mut status = 0;
            assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
            status
        }
    }

    #[test]
    fn a_fault_outside_a_guarded_read_goes_to_the_previous_handler() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(2 * 4096).unwrap();
        // SAFETY: a private test file, truncated so that only the children read past its end.
        let map = unsafe { memmap2::Mmap::map(&f) }.unwrap();
        f.set_len(0).unwrap();
        let at = map.as_ptr().wrapping_add(4096 + 5);
        let exited = |s: libc::c_int| libc::WIFEXITED(s).then(|| libc::WEXITSTATUS(s));
        let killed = |s: libc::c_int| libc::WIFSIGNALED(s).then(|| libc::WTERMSIG(s));

        let s = child_faulting_at(at, prev_siginfo as *const () as usize, libc::SA_SIGINFO);
        assert_eq!(exited(s), Some(RAN_WITH_INFO), "status {s:#x}");
        let s = child_faulting_at(at, prev_plain as *const () as usize, 0);
        assert_eq!(exited(s), Some(RAN_PLAIN), "status {s:#x}");
        // With no previous handler the fault kills the child as it would without ours, and so
        // it does when the previous action ignores SIGBUS (a fault cannot be ignored).
        let s = child_faulting_at(at, libc::SIG_DFL, 0);
        assert_eq!(killed(s), Some(libc::SIGBUS), "status {s:#x}");
        let s = child_faulting_at(at, libc::SIG_IGN, 0);
        assert_eq!(killed(s), Some(libc::SIGBUS), "status {s:#x}");
        drop(map);
    }
}
