//! A small persistent worker team for the quantized matmuls of token-by-token decoding.
//!
//! Decoding runs ~120 short matrix-vector products per token with serial work in between;
//! rayon's workers fall asleep in those gaps and every product pays a wake-up (measured: a
//! third of decode time in the scheduler on 2 cores). Team workers instead spin for a short
//! while after each job (then park), and every job is split into tasks grabbed from an atomic
//! counter by the caller and the workers alike. Jobs are scoped: `run` returns only after every
//! worker has left the job, so it may borrow from the caller's stack.
//!
//! Spinning assumes the team has the cores to itself. When another process shares them, a
//! worker can be descheduled in the middle of a task while the caller, done with its own share,
//! spins on the core the worker waits for (measured: decode 2–4× slower with one busy process
//! beside a 2-thread team). So the caller, like an idle worker, spins only for [`SPIN`] and then
//! sleeps until the last worker leaves the job (which wakes it). And the team measures whether
//! it is worth having: now and then (every [`PROBE_FIRST`], doubling up to [`PROBE_MAX`]) it
//! runs [`WINDOW`] worth of jobs on the caller alone and compares the time per task with the
//! team's over the window just before. Solo has to win twice in a row by [`MARGIN`] (a change of
//! phase, say prefill to decode, rarely falls on both) before the team stands down; then it
//! probes the team the same way and comes back when the team wins twice. Alone on idle cores
//! the probes cost a few 20 ms windows at 1-thread speed early on and one every few seconds
//! after; beside a busy process the callers run at 1-thread speed instead of a lock-step team
//! slowed to its descheduled member.

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
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

/// A fresh output of `len` floats that parallel tasks will write in full, handed out as room
/// (`with_capacity`, through a [`SendPtr`]) and counted written with `set_len` once they are
/// done. Not zeroed: a serial memset of a prefill chunk's outputs costs a core's worth of idle
/// time. Under test it starts as NaN instead, so that a value no task wrote fails the tests.
pub(crate) fn unwritten(len: usize) -> Vec<f32> {
    let mut y = Vec::with_capacity(len);
    if cfg!(test) {
        y.resize(len, f32::NAN);
    }
    y
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
    /// The caller sleeps on `done` (under `lock`) once it has spun for [`SPIN`]; the worker
    /// that brings `pending` to zero then wakes it.
    caller_asleep: AtomicBool,
    done: Condvar,
    /// How many times a caller went to sleep (for tests and curiosity).
    caller_sleeps: AtomicUsize,
}

pub struct Team {
    shared: Arc<Shared>,
    workers: usize,
    busy: Mutex<Pace>,
}

/// Time and tasks of a run of jobs in one mode.
#[derive(Default, Clone, Copy)]
struct Window {
    secs: f64,
    tasks: usize,
}

impl Window {
    fn add(&mut self, secs: f64, tasks: usize) {
        self.secs += secs;
        self.tasks += tasks;
    }
    fn full(&self) -> bool {
        self.secs >= WINDOW.as_secs_f64()
    }
    fn per_task(&self) -> f64 {
        self.secs / self.tasks.max(1) as f64
    }
}

/// The caller's measurements of team against solo (held under `busy`).
struct Pace {
    /// Jobs currently run on the caller alone.
    solo: bool,
    /// The jobs since the last full window of the current mode, and that window.
    current: Window,
    last: Option<Window>,
    /// A probe of the other mode in progress.
    probe: Option<Window>,
    /// Probes won in a row (two switch modes).
    wins: u8,
    /// When the next probe is due, and the wait after it if it loses.
    next_probe: Instant,
    interval: Duration,
    /// How many times the mode changed (for tests and curiosity).
    switches: usize,
}

impl Pace {
    fn new() -> Pace {
        Pace {
            solo: false,
            current: Window::default(),
            last: None,
            probe: None,
            wins: 0,
            next_probe: Instant::now() + PROBE_FIRST,
            interval: PROBE_FIRST,
            switches: 0,
        }
    }

    /// Whether the next job runs solo.
    fn solo_now(&mut self, now: Instant) -> bool {
        if self.probe.is_none() && self.last.is_some() && now >= self.next_probe {
            self.probe = Some(Window::default());
        }
        self.solo ^ self.probe.is_some()
    }

    /// Records a job and decides on probes and switches.
    fn record(&mut self, secs: f64, tasks: usize, now: Instant) {
        if let Some(mut p) = self.probe.take() {
            p.add(secs, tasks);
            if !p.full() {
                self.probe = Some(p);
                return;
            }
            let before = self.last.take().unwrap_or_default();
            self.current = Window::default();
            let won = p.per_task() < MARGIN * before.per_task();
            tracing::debug!(
                probe = if self.solo { "team" } else { "solo" },
                probe_us_per_task = p.per_task() * 1e6,
                current_us_per_task = before.per_task() * 1e6,
                won,
                "worker team probe"
            );
            if won {
                self.wins += 1;
                if self.wins >= 2 {
                    self.solo = !self.solo;
                    self.switches += 1;
                    tracing::debug!(solo = self.solo, "worker team switches mode");
                    self.wins = 0;
                    self.interval = PROBE_FIRST;
                    self.next_probe = now + self.interval;
                } else {
                    // Confirm after one more window of the current mode.
                    self.next_probe = now;
                }
            } else {
                self.wins = 0;
                self.interval = (self.interval * 2).min(PROBE_MAX);
                self.next_probe = now + self.interval;
            }
            return;
        }
        self.current.add(secs, tasks);
        if self.current.full() {
            self.last = Some(std::mem::take(&mut self.current));
        }
    }
}

/// Length (summed job time) of a measuring window; the first probe's delay and the longest
/// one; how much faster the other mode must be per task to count as a win.
const WINDOW: Duration = Duration::from_millis(20);
const PROBE_FIRST: Duration = Duration::from_millis(250);
const PROBE_MAX: Duration = Duration::from_secs(4);
const MARGIN: f64 = 0.85;

/// How long an idle worker spins before parking, and a caller waiting for the workers to
/// finish before it sleeps.
const SPIN: Duration = Duration::from_micros(200);

/// A sleeping caller re-checks after this long even without a wake-up (a safety net; the
/// tests make it long so that a missed wake-up shows as a hang).
const WAIT_TIMEOUT: Duration = if cfg!(test) {
    Duration::from_secs(20)
} else {
    Duration::from_millis(10)
};

/// Runs tasks of `job` until none is left.
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

/// Spins until `ready()`; once that has taken longer than [`SPIN`], calls `sleep` (which blocks
/// on a condition variable until ready or a timeout) instead of spinning. Idle workers and a
/// caller waiting for late workers both wait this way.
fn spin_then_sleep(ready: impl Fn() -> bool, mut sleep: impl FnMut()) {
    let start = Instant::now();
    let mut spins = 0u32;
    while !ready() {
        spins += 1;
        if spins.is_multiple_of(64) && start.elapsed() > SPIN {
            sleep();
        } else {
            std::hint::spin_loop();
        }
    }
}

fn worker(s: Arc<Shared>) {
    let mut seen = 0u64;
    loop {
        spin_then_sleep(
            || s.generation.load(Ordering::Acquire) != seen,
            || {
                let guard = s.lock.lock().unwrap_or_else(|e| e.into_inner());
                s.sleepers.fetch_add(1, Ordering::SeqCst);
                let guard = s
                    .wake
                    .wait_while(guard, |_| s.generation.load(Ordering::Acquire) == seen)
                    .unwrap_or_else(|e| e.into_inner());
                s.sleepers.fetch_sub(1, Ordering::SeqCst);
                drop(guard);
            },
        );
        // The next job cannot be published before this worker has left the current one, so
        // this is the generation the wait saw.
        let g = s.generation.load(Ordering::Acquire);
        seen = g;
        let job = s.job.load(Ordering::Acquire);
        // SAFETY: see `work`; the pointer was published before the generation bump.
        let job = unsafe { &*job };
        work(job);
        // After this decrement the job may be gone (the caller returns once `pending` is zero):
        // only `s` is touched below.
        if job.pending.fetch_sub(1, Ordering::SeqCst) == 1 && s.caller_asleep.load(Ordering::SeqCst)
        {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.done.notify_all();
        }
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
            caller_asleep: AtomicBool::new(false),
            done: Condvar::new(),
            caller_sleeps: AtomicUsize::new(0),
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
            busy: Mutex::new(Pace::new()),
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
    /// workers, or there is a single task), so that the caller picks another way. While the
    /// team stands down (see the module notes) the tasks run on the caller and it returns true.
    pub fn try_run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) -> bool {
        let mut pace = match self.busy.try_lock() {
            Ok(g) if self.workers > 0 && tasks > 1 => g,
            _ => return false,
        };
        let t0 = Instant::now();
        if pace.solo_now(t0) {
            (0..tasks).for_each(f);
            let end = Instant::now();
            pace.record((end - t0).as_secs_f64(), tasks, end);
            return true;
        }
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
        spin_then_sleep(
            || job.pending.load(Ordering::Acquire) == 0,
            || {
                // A worker still holds a task: sleep until the last one leaves. The flag is set
                // before `pending` is read under the lock, and a worker decrements before it reads
                // the flag (both SeqCst), so the wake-up cannot be missed; the timeout is a
                // second line of defence only.
                let g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
                s.caller_asleep.store(true, Ordering::SeqCst);
                s.caller_sleeps.fetch_add(1, Ordering::Relaxed);
                let (g, _) = s
                    .done
                    .wait_timeout_while(g, WAIT_TIMEOUT, |_| {
                        job.pending.load(Ordering::SeqCst) != 0
                    })
                    .unwrap_or_else(|e| e.into_inner());
                s.caller_asleep.store(false, Ordering::SeqCst);
                drop(g);
            },
        );
        let end = Instant::now();
        pace.record((end - t0).as_secs_f64(), tasks, end);
        drop(pace);
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

    #[test]
    fn a_caller_waiting_on_a_slow_worker_sleeps_and_is_woken() {
        // Tasks on the worker take 3 ms, the caller's 0.1 ms: the caller ends up waiting on the
        // worker's last task for longer than the spin budget and goes to sleep, and the worker
        // must wake it (in tests the safety-net timeout is 20 s, so a missed wake-up fails the
        // time bound below). Every task still runs exactly once.
        let team = Team::new(1);
        for round in 0..20 {
            let hits: Vec<AtomicUsize> = (0..40).map(|_| AtomicUsize::new(0)).collect();
            let t0 = Instant::now();
            team.run(40, &|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
                let on_worker = std::thread::current()
                    .name()
                    .is_some_and(|n| n.starts_with("rudder-team"));
                std::thread::sleep(Duration::from_micros(if on_worker { 3000 } else { 100 }));
            });
            assert!(
                hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                "round {round}"
            );
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "round {round}: no wake-up"
            );
            assert!(!team.shared.caller_asleep.load(Ordering::SeqCst));
        }
        assert!(team.shared.caller_sleeps.load(Ordering::Relaxed) > 0);
    }

    #[test]
    fn a_team_whose_worker_lags_goes_solo_and_comes_back() {
        // While the worker's tasks take 20 ms and the caller's 1 ms, an 8-task job takes ≥ 20 ms
        // on the team and ~8 ms on the caller alone: the probes find solo faster per task and
        // the team stands down (tasks then run on the caller). Once the worker is as fast as the
        // caller, the team takes ~4 ms a job, the probes find it faster again and it comes back.
        // Tasks sleep rather than compute, and the gaps are wide, so that other tests running
        // beside this one do not change the outcome.
        let team = Team::new(1);
        let slow = AtomicBool::new(true);
        let hits: Vec<AtomicUsize> = (0..8).map(|_| AtomicUsize::new(0)).collect();
        let task = |i: usize| {
            hits[i].fetch_add(1, Ordering::Relaxed);
            let on_worker = std::thread::current()
                .name()
                .is_some_and(|n| n.starts_with("rudder-team"));
            let lag = on_worker && slow.load(Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(if lag { 20 } else { 1 }));
        };
        let mut jobs = 0;
        for (solo, phase) in [(true, "standing down"), (false, "coming back")] {
            let t0 = Instant::now();
            while team.busy.lock().unwrap().solo != solo {
                team.run(8, &task);
                jobs += 1;
                assert!(t0.elapsed() < Duration::from_secs(20), "never {phase}");
            }
            slow.store(false, Ordering::Relaxed);
        }
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == jobs));
        assert_eq!(team.busy.lock().unwrap().switches, 2);
    }
}
