//! A small persistent worker team for the quantized matmuls of token-by-token decoding.
//!
//! Decoding runs ~120 short matrix-vector products per token with serial work in between;
//! rayon's workers fall asleep in those gaps and every product pays a wake-up (measured: a
//! third of decode time in the scheduler on 2 cores). Team workers instead spin for a short
//! while after each job (then park), and every job is split into tasks grabbed from an atomic
//! counter by the caller and the workers alike. Jobs are scoped: `run` returns only after every
//! worker has left the job, so it may borrow from the caller's stack.

use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// An output buffer shared with the team's tasks, each of which writes a disjoint part.
pub(crate) struct SendPtr(pub *mut f32);
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

impl SendPtr {
    /// # Safety
    /// `i` is inside the buffer, and no other task writes what the caller writes through it.
    pub(crate) unsafe fn at(&self, i: usize) -> *mut f32 {
        unsafe { self.0.add(i) }
    }
}

/// Runs `f(matrix, g0, g1)` over row groups `g0..g1` of several matrices (`groups[i]` groups
/// each) for a product of `n` activation rows: tasks of up to 32 groups, enough to balance the
/// pool, each a multiple of `align` groups; on the team for up to 64 rows (decode steps, batched
/// or not: many short products with serial work between them), on rayon for longer ones.
pub(crate) fn for_group_tasks(
    groups: &[usize],
    n: usize,
    align: usize,
    f: &(dyn Fn(usize, usize, usize) + Sync),
) {
    use rayon::prelude::*;
    let total: usize = groups.iter().sum();
    let align = align.max(1);
    let chunk = (total / (rayon::current_num_threads() * 4))
        .clamp(1, 32)
        .div_ceil(align)
        * align;
    let mut tasks = Vec::new();
    for (i, &gs) in groups.iter().enumerate() {
        let mut g = 0;
        while g < gs {
            tasks.push((i, g, (g + chunk).min(gs)));
            g += chunk;
        }
    }
    let task = |ti: usize| {
        let (i, g0, g1) = tasks[ti];
        f(i, g0, g1)
    };
    if n <= 64 {
        Team::global().run(tasks.len(), &task);
    } else {
        (0..tasks.len()).into_par_iter().for_each(task);
    }
}

struct Job {
    f: *const (dyn Fn(usize) + Sync),
    tasks: usize,
    next: AtomicUsize,
    pending: AtomicUsize,
}

struct Shared {
    generation: AtomicU64,
    job: AtomicPtr<Job>,
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

pub struct Team {
    shared: Arc<Shared>,
    workers: usize,
    busy: Mutex<()>,
}

/// How long an idle worker spins before parking.
const SPIN: Duration = Duration::from_micros(200);

fn work(job: &Job) {
    // SAFETY: the job (and the closure it points to) outlives every worker's participation:
    // `run` waits for `pending` to reach zero before returning.
    let f = unsafe { &*job.f };
    loop {
        let i = job.next.fetch_add(1, Ordering::Relaxed);
        if i >= job.tasks {
            break;
        }
        f(i);
    }
}

fn worker(s: Arc<Shared>) {
    let mut seen = 0u64;
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        let g = loop {
            let g = s.generation.load(Ordering::Acquire);
            if g != seen {
                break g;
            }
            spins += 1;
            if spins % 64 == 0 && start.elapsed() > SPIN {
                let guard = s.lock.lock().unwrap_or_else(|e| e.into_inner());
                s.sleepers.fetch_add(1, Ordering::SeqCst);
                let guard = s
                    .wake
                    .wait_while(guard, |_| s.generation.load(Ordering::Acquire) == seen)
                    .unwrap_or_else(|e| e.into_inner());
                s.sleepers.fetch_sub(1, Ordering::SeqCst);
                drop(guard);
            } else {
                std::hint::spin_loop();
            }
        };
        seen = g;
        let job = s.job.load(Ordering::Acquire);
        // SAFETY: see `work`; the pointer was published before the generation bump.
        let job = unsafe { &*job };
        work(job);
        job.pending.fetch_sub(1, Ordering::Release);
    }
}

impl Team {
    fn new(workers: usize) -> Self {
        let shared = Arc::new(Shared {
            generation: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        for i in 0..workers {
            let s = shared.clone();
            let _ = std::thread::Builder::new()
                .name(format!("rudder-team-{i}"))
                .spawn(move || worker(s));
        }
        Team {
            shared,
            workers,
            busy: Mutex::new(()),
        }
    }

    /// The process-wide team: as many threads as rayon's pool, the caller being one of them.
    pub fn global() -> &'static Team {
        static T: OnceLock<Team> = OnceLock::new();
        T.get_or_init(|| Team::new(rayon::current_num_threads().saturating_sub(1)))
    }

    /// Run `f(0..tasks)` across the caller and the workers. When the team is already busy
    /// (a call from inside another parallel section) the tasks run on the caller alone.
    pub fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        let guard = match self.busy.try_lock() {
            Ok(g) if self.workers > 0 && tasks > 1 => g,
            _ => {
                (0..tasks).for_each(f);
                return;
            }
        };
        // SAFETY (lifetime erasure): the job is only reachable by workers until `pending`
        // drops to zero, which this function waits for before returning.
        let f_static: *const (dyn Fn(usize) + Sync) =
            unsafe { std::mem::transmute(f as *const (dyn Fn(usize) + Sync)) };
        let job = Job {
            f: f_static,
            tasks,
            next: AtomicUsize::new(0),
            pending: AtomicUsize::new(self.workers),
        };
        let s = &self.shared;
        s.job
            .store(&job as *const Job as *mut Job, Ordering::Release);
        s.generation.fetch_add(1, Ordering::AcqRel);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        work(&job);
        while job.pending.load(Ordering::Acquire) != 0 {
            std::hint::spin_loop();
        }
        drop(guard);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_including_nested_calls() {
        let team = Team::new(2);
        for round in 0..200 {
            let hits: Vec<AtomicUsize> = (0..37).map(|_| AtomicUsize::new(0)).collect();
            team.run(37, &|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
                if i == 3 {
                    // Nested use falls back to the caller.
                    let inner = AtomicUsize::new(0);
                    team.run(5, &|_| {
                        inner.fetch_add(1, Ordering::Relaxed);
                    });
                    assert_eq!(inner.load(Ordering::Relaxed), 5);
                }
            });
            assert!(
                hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                "round {round}"
            );
            if round % 50 == 0 {
                std::thread::sleep(Duration::from_millis(2)); // workers park and wake again
            }
        }
    }
}
