//! A byte-budgeted LRU of computed chunks with single-flight: one computation per chunk
//! however many readers wait, and an error reaches every waiter. Evicted buffers are pooled.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use lru::LruCache;

use crate::error::{Error, Result};

/// Identifies a chunk: which child, which unit, which chunk of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChunkKey {
    /// The child (variant) it belongs to.
    pub variant: u32,
    /// Unit index in the child's plan.
    pub unit: u32,
    /// Chunk index within the unit.
    pub chunk: u32,
}

/// The computed bytes of one chunk: the weight's bytes and, for FP8, its block scales.
#[derive(Debug, Default)]
pub struct Chunk {
    /// Weight bytes of the chunk's element range, in the base's dtype.
    pub data: Vec<u8>,
    /// Little-endian f32 block scales of the chunk's block rows (FP8 only).
    pub scales: Vec<u8>,
}

impl Chunk {
    fn bytes(&self) -> usize {
        self.data.capacity() + self.scales.capacity()
    }
}

type Flight = Arc<(Mutex<Option<Result<Arc<Chunk>, Arc<Error>>>>, Condvar)>;

struct Inner {
    lru: LruCache<ChunkKey, Arc<Chunk>>,
    bytes: usize,
    inflight: HashMap<ChunkKey, Flight>,
    /// Bytes of each cached chunk's weight part served so far.
    served: HashMap<ChunkKey, usize>,
    pool: Vec<Vec<u8>>,
    pool_bytes: usize,
}

/// Counters for status reports.
#[derive(Default, Debug)]
pub struct CacheCounters {
    /// Lookups answered from the cache (or by waiting on another reader's computation).
    pub hits: AtomicU64,
    /// Lookups that computed.
    pub misses: AtomicU64,
    /// Bytes computed.
    pub computed_bytes: AtomicU64,
    /// Nanoseconds spent computing.
    pub compute_ns: AtomicU64,
    /// Computations that failed.
    pub errors: AtomicU64,
}

/// The chunk cache.
pub struct ChunkCache {
    inner: Mutex<Inner>,
    budget: usize,
    /// Upper bound on the pool set by [`ChunkCache::set_pool_limit`] (usize::MAX: none).
    pool_cap: AtomicUsize,
    /// Counters.
    pub counters: CacheCounters,
}

impl ChunkCache {
    /// A cache holding at most `budget` bytes of chunks (a chunk larger than the budget is
    /// handed out but not kept).
    pub fn new(budget: usize) -> ChunkCache {
        ChunkCache {
            inner: Mutex::new(Inner {
                lru: LruCache::unbounded(),
                bytes: 0,
                inflight: HashMap::new(),
                served: HashMap::new(),
                pool: Vec::new(),
                pool_bytes: 0,
            }),
            budget,
            pool_cap: AtomicUsize::new(usize::MAX),
            counters: CacheCounters::default(),
        }
    }

    /// Caps the bytes of idle buffers kept for reuse (a mount keeps its RSS near the budget).
    pub fn set_pool_limit(&self, bytes: usize) {
        self.pool_cap.store(bytes, Ordering::Relaxed);
    }

    /// The byte budget.
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Bytes of idle buffers kept for reuse: fresh memory is slow to touch on these VMs.
    fn pool_limit(&self) -> usize {
        (self.budget / 8 + (64 << 20)).min(self.pool_cap.load(Ordering::Relaxed))
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.lock().bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `key` is cached or being computed.
    pub fn contains(&self, key: &ChunkKey) -> bool {
        let g = self.lock();
        g.lru.contains(key) || g.inflight.contains_key(key)
    }

    /// A buffer of at least `cap` bytes' capacity, from the pool when one fits. A pooled
    /// buffer keeps its old bytes (its length is unchanged): `resize` it to the length needed
    /// and overwrite it, or `clear` it first, which saves zeroing memory about to be written.
    pub fn take_buffer(&self, cap: usize) -> Vec<u8> {
        let mut g = self.lock();
        // Best fit, and never a buffer more than twice the need: small chunks must not pin big
        // buffers (the cache charges capacity).
        let fit = g
            .pool
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= cap && b.capacity() <= cap.saturating_mul(2).max(4096))
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i);
        if let Some(i) = fit {
            let b = g.pool.swap_remove(i);
            g.pool_bytes -= b.capacity();
            return b;
        }
        drop(g);
        Vec::with_capacity(cap)
    }

    /// Returns a buffer to the pool (kept while the pool stays within its limit).
    pub fn give_buffer(&self, b: Vec<u8>) {
        let mut g = self.lock();
        give(&mut g, b, self.pool_limit());
    }

    /// Notes that `n` more bytes of chunk `key`'s weight part (`len` bytes) were served. Once
    /// all were, the kernel's page cache holds them (FOPEN_KEEP_CACHE), so the weight bytes
    /// leave the cache and their buffer is reused, while the small block scales stay for the
    /// later read of the `_scale_inv` tensor. A cold read then recycles warm memory instead of
    /// touching fresh pages (slow on these VMs) until the budget fills. Bytes never change:
    /// a chunk read again is recomputed identically.
    pub fn served(&self, key: ChunkKey, n: usize, len: usize) {
        let mut g = self.lock();
        let done = {
            let s = g.served.entry(key).or_insert(0);
            *s = s.saturating_add(n);
            *s >= len
        };
        if !done {
            return;
        }
        g.served.remove(&key);
        let Some(old) = g.lru.pop(&key) else { return };
        g.bytes -= old.bytes();
        match Arc::try_unwrap(old) {
            Ok(Chunk { data, scales }) => {
                let cap = self.pool_limit();
                give(&mut g, data, cap);
                if !scales.is_empty() {
                    let keep = Chunk {
                        data: Vec::new(),
                        scales,
                    };
                    g.bytes += keep.bytes();
                    g.lru.put(key, Arc::new(keep));
                }
            }
            Err(shared) => {
                // Another reader still holds it: keep it as it is.
                g.bytes += shared.bytes();
                g.lru.put(key, shared);
            }
        }
    }

    /// Drops `key` from the cache (a retired chunk whose weight bytes are needed again).
    pub fn forget(&self, key: &ChunkKey) {
        let mut g = self.lock();
        if let Some(old) = g.lru.pop(key) {
            g.bytes -= old.bytes();
        }
        g.served.remove(key);
    }

    /// Drops every chunk of `variant` (a child that is gone: its chunks can never be read).
    pub fn forget_variant(&self, variant: u32) {
        let mut g = self.lock();
        let keys: Vec<ChunkKey> = g
            .lru
            .iter()
            .map(|(k, _)| *k)
            .filter(|k| k.variant == variant)
            .collect();
        for k in keys {
            if let Some(old) = g.lru.pop(&k) {
                g.bytes -= old.bytes();
            }
        }
        g.served.retain(|k, _| k.variant != variant);
    }

    /// The chunk for `key`: from the cache, by waiting for another reader's computation, or by
    /// running `compute` (once, whoever asks meanwhile).
    pub fn get_or_compute(
        &self,
        key: ChunkKey,
        compute: impl FnOnce() -> Result<Chunk>,
    ) -> Result<Arc<Chunk>> {
        let flight = {
            let mut g = self.lock();
            if let Some(c) = g.lru.get(&key) {
                self.counters.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(c.clone());
            }
            if let Some(f) = g.inflight.get(&key) {
                let f = f.clone();
                drop(g);
                self.counters.hits.fetch_add(1, Ordering::Relaxed);
                return wait(&f);
            }
            let f: Flight = Arc::new((Mutex::new(None), Condvar::new()));
            g.inflight.insert(key, f.clone());
            f
        };
        self.counters.misses.fetch_add(1, Ordering::Relaxed);
        let t = std::time::Instant::now();
        // A panic inside a computation must still resolve the flight, or every later reader
        // of this chunk would wait forever.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(compute))
            .unwrap_or_else(|_| {
                Err(Error::Internal {
                    what: "chunk computation panicked".into(),
                })
            })
            .map(Arc::new)
            .map_err(Arc::new);
        self.counters
            .compute_ns
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        {
            let mut g = self.lock();
            g.inflight.remove(&key);
            match &result {
                Ok(c) => {
                    self.counters
                        .computed_bytes
                        .fetch_add((c.data.len() + c.scales.len()) as u64, Ordering::Relaxed);
                    let n = c.bytes();
                    if n <= self.budget {
                        g.bytes += n;
                        g.lru.put(key, c.clone());
                        while g.bytes > self.budget {
                            let Some((_, old)) = g.lru.pop_lru() else {
                                break;
                            };
                            g.bytes -= old.bytes();
                            if let Ok(old) = Arc::try_unwrap(old) {
                                let cap = self.pool_limit();
                                give(&mut g, old.data, cap);
                                give(&mut g, old.scales, cap);
                            }
                        }
                    }
                }
                Err(_) => {
                    self.counters.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let (m, cv) = &*flight;
        *m.lock().unwrap_or_else(|e| e.into_inner()) = Some(result.clone());
        cv.notify_all();
        result.map_err(Error::Shared)
    }
}

fn give(g: &mut Inner, b: Vec<u8>, cap: usize) {
    if b.capacity() > 0 && g.pool_bytes + b.capacity() <= cap {
        g.pool_bytes += b.capacity();
        g.pool.push(b);
    }
}

fn wait(f: &Flight) -> Result<Arc<Chunk>> {
    let (m, cv) = &**f;
    let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if let Some(r) = g.as_ref() {
            return r.clone().map_err(Error::Shared);
        }
        g = cv.wait(g).unwrap_or_else(|e| e.into_inner());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn key(c: u32) -> ChunkKey {
        ChunkKey {
            variant: 0,
            unit: 0,
            chunk: c,
        }
    }

    #[test]
    fn evicts_least_recently_used_within_budget() {
        let cache = ChunkCache::new(3000);
        for c in 0..5 {
            cache
                .get_or_compute(key(c), || {
                    Ok(Chunk {
                        data: vec![c as u8; 1000],
                        scales: vec![],
                    })
                })
                .unwrap();
            assert!(cache.held() <= 3000);
        }
        assert!(!cache.contains(&key(0)));
        assert!(cache.contains(&key(4)));
        // A chunk bigger than the budget is returned but not kept.
        let big = cache
            .get_or_compute(key(9), || {
                Ok(Chunk {
                    data: vec![1; 5000],
                    scales: vec![],
                })
            })
            .unwrap();
        assert_eq!(big.data.len(), 5000);
        assert!(!cache.contains(&key(9)));
    }

    #[test]
    fn one_computation_per_chunk_and_errors_reach_every_waiter() {
        let cache = Arc::new(ChunkCache::new(1 << 20));
        let runs = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (cache, runs) = (cache.clone(), runs.clone());
                std::thread::spawn(move || {
                    cache.get_or_compute(key(1), || {
                        runs.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(std::time::Duration::from_millis(50));
                        Ok(Chunk {
                            data: vec![7; 10],
                            scales: vec![],
                        })
                    })
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap().unwrap().data, vec![7; 10]);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);

        let threads: Vec<_> = (0..4)
            .map(|_| {
                let cache = cache.clone();
                std::thread::spawn(move || {
                    cache.get_or_compute(key(2), || {
                        std::thread::sleep(std::time::Duration::from_millis(50));
                        Err(Error::BadRecipe {
                            reason: "boom".into(),
                        })
                    })
                })
            })
            .collect();
        for t in threads {
            let e = t.join().unwrap().unwrap_err();
            assert!(e.to_string().contains("boom"), "{e}");
        }
        assert!(!cache.contains(&key(2)), "errors are not cached");
    }

    #[test]
    fn fully_served_chunks_give_back_their_weight_bytes_and_keep_scales() {
        let cache = ChunkCache::new(1 << 20);
        let c = cache
            .get_or_compute(key(3), || {
                Ok(Chunk {
                    data: vec![1; 1000],
                    scales: vec![2; 8],
                })
            })
            .unwrap();
        drop(c);
        cache.served(key(3), 600, 1000);
        assert_eq!(
            cache
                .get_or_compute(key(3), || unreachable!())
                .unwrap()
                .data
                .len(),
            1000
        );
        cache.served(key(3), 400, 1000);
        let kept = cache.get_or_compute(key(3), || unreachable!()).unwrap();
        assert!(kept.data.is_empty(), "served weight bytes leave the cache");
        assert_eq!(
            kept.scales,
            vec![2; 8],
            "scales stay for the _scale_inv read"
        );
        assert!(cache.held() < 1000);
        // The buffer is reused by the next computation.
        assert!(cache.take_buffer(900).capacity() >= 1000);
        cache.forget(&key(3));
        assert!(!cache.contains(&key(3)));
    }
}
