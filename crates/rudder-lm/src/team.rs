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

/// Runs `f(matrix, g0, g1, n0, n1)` over row groups `g0..g1` of several matrices (`groups[i]`
/// groups each) and activation rows `n0..n1` of a product of `n` rows. Tasks hold a multiple
/// of `align` groups, enough of them to balance the workers; with `split_rows` (kernels that
/// take any range of activation rows; the quantized ones read one pre-quantized block), products of
/// more than 64 rows (prefill) are also cut into blocks of activation rows (multiples of 24,
/// so that tiles of 8 and 6 rows divide them), since a few long tasks of unequal size leave a
/// core idle at the end of every product. Everything runs on the team, whose two kinds of
/// work (products, and the attention and row-wise steps between them) then share one set of
/// threads instead of rayon's workers and the team's spinning for the same cores; on rayon
/// only when the team is busy (a call from inside another parallel section).
pub(crate) fn for_group_tasks(
    groups: &[usize],
    n: usize,
    align: usize,
    split_rows: bool,
    f: &(dyn Fn(usize, usize, usize, usize, usize) + Sync),
) {
    use rayon::prelude::*;
    let total: usize = groups.iter().sum();
    let align = align.max(1);
    let threads = rayon::current_num_threads().max(1);
    let blocks = if split_rows && n > 64 {
        (n.div_ceil(24) / 4).clamp(1, 8)
    } else {
        1
    };
    let rb = n.div_ceil(24).div_ceil(blocks) * 24;
    let per = if blocks > 1 { 2 } else { 4 };
    let chunk = (total / (threads * per)).clamp(1, 32).div_ceil(align) * align;
    let mut tasks = Vec::new();
    for (i, &gs) in groups.iter().enumerate() {
        let mut g = 0;
        while g < gs {
            let mut n0 = 0;
            while n0 < n {
                tasks.push((i, g, (g + chunk).min(gs), n0, (n0 + rb).min(n)));
                n0 += rb;
            }
            g += chunk;
        }
    }
    let task = |ti: usize| {
        let (i, g0, g1, n0, n1) = tasks[ti];
        f(i, g0, g1, n0, n1)
    };
    if !Team::global().try_run(tasks.len(), &task) {
        if n <= 64 {
            (0..tasks.len()).for_each(task);
        } else {
            (0..tasks.len()).into_par_iter().for_each(task);
        }
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
        if !self.try_run(tasks, f) {
            (0..tasks).for_each(f);
        }
    }

    /// [`Team::run`], or `false` without running anything when the team is busy (or has no
    /// workers, or there is a single task), so that the caller picks another way.
    pub fn try_run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) -> bool {
        let guard = match self.busy.try_lock() {
            Ok(g) if self.workers > 0 && tasks > 1 => g,
            _ => return false,
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
        true
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
