//! Prefetch: a pure sequential-read planner and a bounded executor that computes the chunks a
//! sequential reader is about to ask for.
//!
//! The planner ([`SeqState::observe`]) sees the reads of one open file and answers with a byte
//! range to warm, or nothing. A read that starts near where the previous one ended continues a
//! streak; after [`PrefetchConfig::min_streak`] such reads the planner asks for the range up to
//! `window` bytes past the reader, and the window doubles with every sequential read up to
//! [`PrefetchConfig::max_window`] (bounded by the cache budget, so that what is prefetched is
//! still cached when it is read). A jump resets the streak and the window.
//!
//! The executor ([`Prefetcher`]) runs warm-up jobs on its own few threads from a bounded queue;
//! jobs that do not fit are dropped (prefetch is only ever a hint: the reader computes whatever
//! is missing itself, and single-flight makes a reader wait for a computation already running).
//! Warming a range computes its mixed chunks into the shared cache and asks the kernel to read
//! ahead the parents' bytes that are served verbatim (`POSIX_FADV_WILLNEED`).

use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use crate::error::Result;
use crate::synth::{Child, FileKind, TensorBytes};

/// Tuning of the sequential-read planner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefetchConfig {
    /// Window after the first sequential reads, in bytes.
    pub initial_window: u64,
    /// Largest window, in bytes (0 disables prefetch).
    pub max_window: u64,
    /// Sequential reads needed before prefetching starts.
    pub min_streak: u32,
    /// How far (bytes) a read may start from the end of the previous one and still count as
    /// sequential: the kernel's asynchronous readahead delivers requests slightly out of order.
    pub slack: u64,
}

impl PrefetchConfig {
    /// The configuration for a cache of `budget` bytes: the window grows from 2 MiB (or less
    /// for tiny caches) to an eighth of the budget, at most 64 MiB.
    pub fn for_budget(budget: usize) -> PrefetchConfig {
        let max_window = ((budget / 8) as u64).min(64 << 20);
        PrefetchConfig {
            initial_window: max_window.min(2 << 20),
            max_window,
            min_streak: 2,
            slack: 4 << 20,
        }
    }

    /// A configuration that never prefetches.
    pub fn disabled() -> PrefetchConfig {
        PrefetchConfig {
            initial_window: 0,
            max_window: 0,
            min_streak: u32::MAX,
            slack: 0,
        }
    }
}

/// What the planner knows about one open file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct SeqState {
    /// Where the reader is expected to read next (the furthest end seen in this streak).
    pub next: u64,
    /// Sequential reads in a row (0 before the first read).
    pub streak: u32,
    /// Current window, in bytes.
    pub window: u64,
    /// Everything below this offset has been asked for already.
    pub ahead: u64,
}

impl SeqState {
    /// Records a read of `len` bytes at `offset` of a file of `size` bytes and returns the range
    /// `(offset, len)` to prefetch, if any. Pure: no I/O, no clock.
    pub fn observe(
        &mut self,
        offset: u64,
        len: u64,
        size: u64,
        cfg: &PrefetchConfig,
    ) -> Option<(u64, u64)> {
        let end = offset.saturating_add(len).min(size);
        let sequential = self.streak > 0
            && offset >= self.next.saturating_sub(cfg.slack)
            && offset <= self.next.saturating_add(cfg.slack);
        if sequential {
            self.streak = self.streak.saturating_add(1);
            self.window = self
                .window
                .saturating_mul(2)
                .clamp(cfg.initial_window, cfg.max_window);
            self.next = self.next.max(end);
        } else {
            self.streak = 1;
            self.window = cfg.initial_window;
            self.next = end;
            self.ahead = end;
        }
        if cfg.max_window == 0 || self.streak < cfg.min_streak {
            return None;
        }
        let target = self.next.saturating_add(self.window).min(size);
        let from = self.ahead.max(self.next);
        if target <= from {
            return None;
        }
        self.ahead = target;
        Some((from, target - from))
    }
}

/// Counters of the executor.
#[derive(Debug, Default)]
pub(crate) struct PrefetchCounters {
    /// Jobs accepted.
    pub jobs: AtomicU64,
    /// Jobs dropped because the queue or the byte bound was full.
    pub dropped: AtomicU64,
    /// Bytes of chunks computed by prefetch jobs.
    pub computed: AtomicU64,
    /// Jobs that met an error (the reader meets it again and reports it).
    pub errors: AtomicU64,
}

/// Largest range one prefetch job warms.
pub(crate) const JOB_BYTES: u64 = 4 << 20;

struct Job {
    child: Arc<Child>,
    file: usize,
    offset: u64,
    len: u64,
}

/// A bounded pool of prefetch threads.
pub(crate) struct Prefetcher {
    tx: Mutex<Option<SyncSender<Job>>>,
    pending: Arc<AtomicU64>,
    limit: u64,
    /// Counters for status reports.
    pub counters: Arc<PrefetchCounters>,
}

impl Prefetcher {
    /// Starts `threads` prefetch threads; at most `limit` bytes of ranges are queued or being
    /// warmed at once, and at most 64 jobs wait.
    pub fn start(threads: usize, limit: u64) -> std::io::Result<Prefetcher> {
        let (tx, rx) = sync_channel::<Job>(64);
        let rx = Arc::new(Mutex::new(rx));
        let pending = Arc::new(AtomicU64::new(0));
        let counters = Arc::new(PrefetchCounters::default());
        for i in 0..threads.max(1) {
            let (rx, pending, counters) = (rx.clone(), pending.clone(), counters.clone());
            std::thread::Builder::new()
                .name(format!("aoe-prefetch-{i}"))
                .spawn(move || worker(&rx, &pending, &counters))?;
        }
        Ok(Prefetcher {
            tx: Mutex::new(Some(tx)),
            pending,
            limit,
            counters,
        })
    }

    /// Queues the warm-up of `len` bytes at `offset` of file `file` of `child`, cut into jobs
    /// of at most [`JOB_BYTES`] so that several threads warm one reader's window at once;
    /// returns the bytes accepted (a prefix of the range).
    pub fn submit(&self, child: Arc<Child>, file: usize, offset: u64, len: u64) -> u64 {
        let end = offset.saturating_add(len);
        let mut at = offset;
        while at < end {
            let n = (end - at).min(JOB_BYTES);
            if !self.submit_one(child.clone(), file, at, n) {
                break;
            }
            at += n;
        }
        at - offset
    }

    fn submit_one(&self, child: Arc<Child>, file: usize, offset: u64, len: u64) -> bool {
        if len == 0 {
            return false;
        }
        let before = self.pending.fetch_add(len, Ordering::AcqRel);
        if before.saturating_add(len) > self.limit && before > 0 {
            self.pending.fetch_sub(len, Ordering::AcqRel);
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let guard = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        let sent = match guard.as_ref() {
            Some(tx) => match tx.try_send(Job {
                child,
                file,
                offset,
                len,
            }) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => false,
            },
            None => false,
        };
        drop(guard);
        if sent {
            self.counters.jobs.fetch_add(1, Ordering::Relaxed);
        } else {
            self.pending.fetch_sub(len, Ordering::AcqRel);
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
        sent
    }

    /// Stops accepting jobs; the threads end once the queue is drained.
    pub fn stop(&self) {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

fn worker(rx: &Mutex<Receiver<Job>>, pending: &AtomicU64, counters: &PrefetchCounters) {
    loop {
        let job = {
            let g = rx.lock().unwrap_or_else(|e| e.into_inner());
            g.recv()
        };
        let Ok(job) = job else { return };
        // A panic must not kill the worker and leave `pending` counted forever.
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            warm(&job.child, job.file, job.offset, job.len)
        }));
        match res {
            Ok(Ok(n)) => {
                counters.computed.fetch_add(n, Ordering::Relaxed);
            }
            _ => {
                counters.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        pending.fetch_sub(job.len, Ordering::AcqRel);
    }
}

/// Warms `len` bytes at `offset` of file `file` of `child`: computes the mixed chunks the range
/// needs that are neither cached nor being computed, and asks the kernel to read ahead the
/// parents' bytes served verbatim. Returns the bytes computed. Reads nothing into memory
/// otherwise, and never changes what a read returns (chunks are a pure function of the recipe).
pub(crate) fn warm(child: &Child, file: usize, offset: u64, len: u64) -> Result<u64> {
    let Some(f) = child.files.get(file) else {
        return Ok(0);
    };
    let FileKind::Shard(s) = f.kind else {
        return Ok(0);
    };
    let models = &child.engine.models;
    let Some(shard) = models.base().shards.get(s) else {
        return Ok(0);
    };
    let end = offset.saturating_add(len).min(shard.size);
    let first = shard.tensors.partition_point(|t| t.start + t.len <= offset);
    let mut computed = 0u64;
    for t in shard.tensors.iter().skip(first) {
        if t.start >= end {
            break;
        }
        let lo = offset.max(t.start) - t.start;
        let hi = end.min(t.start + t.len) - t.start;
        if hi <= lo {
            continue;
        }
        match child.tensor_bytes(shard, t)? {
            TensorBytes::Verbatim(from, start) => will_need(&from.file, start + lo, hi - lo),
            TensorBytes::Mixed {
                unit,
                w,
                bytes_per_chunk,
                ..
            } => {
                if bytes_per_chunk == 0 {
                    continue;
                }
                for c in (lo / bytes_per_chunk)..=((hi - 1) / bytes_per_chunk) {
                    if !child.chunk_cached(unit, c as usize) {
                        let ch = child.chunk(unit, c as usize, &w)?;
                        computed += (ch.data.len() + ch.scales.len()) as u64;
                    }
                }
            }
        }
    }
    Ok(computed)
}

/// Asks the kernel to read a file range ahead into the page cache (asynchronous; errors ignored).
fn will_need(file: &std::fs::File, offset: u64, len: u64) {
    // SAFETY: posix_fadvise only takes a file descriptor we own and two integers.
    unsafe {
        libc::posix_fadvise(
            file.as_raw_fd(),
            offset as libc::off_t,
            len as libc::off_t,
            libc::POSIX_FADV_WILLNEED,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    fn cfg() -> PrefetchConfig {
        PrefetchConfig {
            initial_window: 2 * MB,
            max_window: 16 * MB,
            min_streak: 2,
            slack: 4 * MB,
        }
    }

    #[test]
    fn sequential_reads_grow_the_window_up_to_the_bound() {
        let c = cfg();
        let mut s = SeqState::default();
        let size = 1 << 30;
        assert_eq!(s.observe(0, MB, size, &c), None, "one read is not a streak");
        let mut windows = Vec::new();
        let mut ahead = 0;
        for i in 1..12u64 {
            let r = s.observe(i * MB, MB, size, &c);
            if let Some((from, len)) = r {
                assert!(from >= ahead, "ranges never overlap what was asked before");
                assert!(from >= (i + 1) * MB, "prefetch starts past the reader");
                ahead = from + len;
            }
            windows.push(s.window);
        }
        assert_eq!(
            windows[0],
            4 * MB,
            "the first sequential read doubles the initial window"
        );
        assert!(windows.windows(2).all(|w| w[1] >= w[0]), "{windows:?}");
        assert_eq!(*windows.last().unwrap(), 16 * MB);
        assert_eq!(s.ahead, 12 * MB + 16 * MB);
    }

    #[test]
    fn a_jump_resets_and_the_end_of_file_bounds() {
        let c = cfg();
        let mut s = SeqState::default();
        let size = 10 * MB;
        s.observe(0, MB, size, &c);
        assert!(s.observe(MB, MB, size, &c).is_some());
        s.observe(2 * MB, MB, size, &c);
        // Jump far away: streak and window reset, nothing prefetched yet.
        assert_eq!(s.observe(8 * MB + 100, 4096, size, &c), None);
        assert_eq!(s.streak, 1);
        assert_eq!(s.window, 2 * MB);
        // Continue: the range stops at the end of the file.
        let (from, len) = s.observe(8 * MB + 100 + 4096, MB, size, &c).unwrap();
        assert_eq!(from + len, size);
        assert_eq!(
            s.observe(9 * MB + 100 + 4096, MB, size, &c),
            None,
            "nothing left to prefetch"
        );
    }

    #[test]
    fn reordered_readahead_still_counts_as_sequential() {
        let c = cfg();
        let mut s = SeqState::default();
        s.observe(0, MB, 1 << 30, &c);
        s.observe(2 * MB, MB, 1 << 30, &c);
        s.observe(MB, MB, 1 << 30, &c);
        assert_eq!(s.streak, 3);
        assert_eq!(s.next, 3 * MB);
    }

    #[test]
    fn disabled_never_prefetches() {
        let c = PrefetchConfig::disabled();
        let mut s = SeqState::default();
        for i in 0..100 {
            assert_eq!(s.observe(i * MB, MB, 1 << 30, &c), None);
        }
        let tiny = PrefetchConfig::for_budget(0);
        assert_eq!(tiny.max_window, 0);
        let mut s = SeqState::default();
        for i in 0..10 {
            assert_eq!(s.observe(i * MB, MB, 1 << 30, &tiny), None);
        }
    }

    #[test]
    fn budget_bounds_the_window() {
        assert_eq!(PrefetchConfig::for_budget(16 << 20).max_window, 2 * MB);
        assert_eq!(PrefetchConfig::for_budget(2 << 30).max_window, 64 * MB);
        assert_eq!(PrefetchConfig::for_budget(8 << 20).initial_window, MB);
    }
}
