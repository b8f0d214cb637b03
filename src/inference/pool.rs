//! A small fork-join pool for the decode step: the caller and `n - 1` persistent
//! workers run one closure each, then the caller waits for all of them.
//!
//! A decode step of SmolLM2-135M makes ~150 parallel calls of 20–100 µs each, so
//! the cost of waking threads decides the speed. Workers spin on an epoch counter
//! for a short while after each job (the next one comes within microseconds during
//! a step) and only then sleep on a condition variable; the caller spins while the
//! workers finish. Rayon's injection from a non-pool thread, by comparison, puts
//! the caller to sleep on every call.

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

type Job = dyn Fn(usize) + Sync;

struct Shared {
    epoch: AtomicUsize,
    /// The current job, a `*const &Job` valid until `remaining` reaches zero.
    job: AtomicPtr<()>,
    remaining: AtomicUsize,
    sleeping: AtomicUsize,
    stop: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
}

pub struct Pool {
    threads: usize,
    shared: Arc<Shared>,
    handles: Vec<std::thread::JoinHandle<()>>,
    /// One job at a time: `run` takes `&self`, so callers on several threads are
    /// serialised here.
    busy: Mutex<()>,
}

/// How long an idle worker spins before sleeping.
const SPIN: Duration = Duration::from_micros(200);

impl Pool {
    /// `threads` in all, the caller included (at least 1).
    pub fn new(threads: usize) -> Self {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            epoch: AtomicUsize::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            remaining: AtomicUsize::new(0),
            sleeping: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let handles = (1..threads)
            .filter_map(|idx| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name(format!("ragchat-decode-{idx}"))
                    .spawn(move || worker(&s, idx))
                    .ok()
            })
            .collect::<Vec<_>>();
        Pool {
            threads: handles.len() + 1,
            shared,
            handles,
            busy: Mutex::new(()),
        }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f(i)` for every i in 0..threads(), i = 0 on the calling thread, and
    /// returns when all have finished. A panic in a worker aborts the process
    /// (the job borrows the caller's stack); a panic in `f(0)` unwinds after the
    /// workers are done.
    pub fn run(&self, f: &(dyn Fn(usize) + Sync)) {
        if self.threads == 1 {
            f(0);
            return;
        }
        let _one = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        let s = &*self.shared;
        let ptr: *const &(dyn Fn(usize) + Sync) = &f;
        s.job.store(ptr as *mut (), Ordering::SeqCst);
        s.remaining.store(self.threads - 1, Ordering::SeqCst);
        s.epoch.fetch_add(1, Ordering::SeqCst);
        if s.sleeping.load(Ordering::SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|p| p.into_inner());
            s.wake.notify_all();
        }
        struct WaitAll<'a>(&'a Shared);
        impl Drop for WaitAll<'_> {
            fn drop(&mut self) {
                while self.0.remaining.load(Ordering::Acquire) != 0 {
                    std::hint::spin_loop();
                }
            }
        }
        let _wait = WaitAll(s);
        f(0);
    }
}

fn worker(s: &Shared, idx: usize) {
    let mut seen = 0usize;
    loop {
        let started = Instant::now();
        let mut spins = 0u32;
        loop {
            let e = s.epoch.load(Ordering::SeqCst);
            if e != seen {
                seen = e;
                break;
            }
            if s.stop.load(Ordering::SeqCst) {
                return;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(256) || started.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            let g = s.lock.lock().unwrap_or_else(|p| p.into_inner());
            s.sleeping.fetch_add(1, Ordering::SeqCst);
            let g = if s.epoch.load(Ordering::SeqCst) == seen && !s.stop.load(Ordering::SeqCst) {
                s.wake.wait(g).unwrap_or_else(|p| p.into_inner())
            } else {
                g
            };
            s.sleeping.fetch_sub(1, Ordering::SeqCst);
            drop(g);
        }
        let ptr = s.job.load(Ordering::SeqCst) as *const &Job;
        // SAFETY: `run` stored a pointer to a `&Job` on its stack and does not return
        // (nor unwind past it) before `remaining` is zero, which happens only after this call.
        let job: &Job = unsafe { *ptr };
        let abort_on_panic = AbortOnPanic;
        job(idx);
        std::mem::forget(abort_on_panic);
        s.remaining.fetch_sub(1, Ordering::Release);
    }
}

/// A panic inside a job would leave the caller waiting forever on a borrowed
/// closure; the only sound answer is to stop the process.
struct AbortOnPanic;
impl Drop for AbortOnPanic {
    fn drop(&mut self) {
        eprintln!("ragchat: a decode pool worker panicked; aborting");
        std::process::abort();
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        {
            let _g = self.shared.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.shared.wake.notify_all();
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// Splits `0..n` into `parts` contiguous ranges aligned to `align`; returns part `i`.
pub fn share(n: usize, parts: usize, i: usize, align: usize) -> std::ops::Range<usize> {
    let align = align.max(1);
    let units = n.div_ceil(align);
    let per = units.div_ceil(parts.max(1));
    let start = (i * per * align).min(n);
    let end = ((i + 1) * per * align).min(n);
    start..end
}

/// A raw pointer to an output buffer that pool jobs write in disjoint places.
#[derive(Clone, Copy)]
pub struct SyncPtr(pub *mut f32);

impl SyncPtr {
    /// # Safety
    /// `i` must be inside the buffer.
    pub unsafe fn add(self, i: usize) -> *mut f32 {
        self.0.add(i)
    }
}
// SAFETY: used only for writes to disjoint indices, joined by `Pool::run`.
unsafe impl Sync for SyncPtr {}
unsafe impl Send for SyncPtr {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_part_runs_once_per_call_and_the_pool_survives_idle_sleep() {
        let pool = Pool::new(3);
        let hits = [AtomicUsize::new(0), AtomicUsize::new(0), AtomicUsize::new(0)];
        for round in 0..200 {
            pool.run(&|i| {
                hits[i].fetch_add(1, Ordering::SeqCst);
            });
            if round == 100 {
                std::thread::sleep(Duration::from_millis(5)); // workers go to sleep
            }
        }
        for h in &hits[..pool.threads()] {
            assert_eq!(h.load(Ordering::SeqCst), 200);
        }
    }

    #[test]
    fn shares_cover_the_range_without_overlap() {
        for n in [0, 1, 7, 64, 100, 960] {
            for parts in 1..5 {
                let mut covered = vec![0; n];
                for i in 0..parts {
                    for j in share(n, parts, i, 16) {
                        covered[j] += 1;
                    }
                }
                assert!(covered.iter().all(|c| *c == 1), "n={n} parts={parts}");
            }
        }
    }
}
