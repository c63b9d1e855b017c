//! Continuous batching: one decode loop on its own thread that requests join and leave between
//! steps. `rudder serve` and the in-process LLM client both submit here, so concurrent callers
//! share every weight pass.
//!
//! Each step gathers the active rows: a row still reading its prompt adds a chunk of it (the
//! chunks of all such rows share a per-step token budget, so a long prompt never stalls the
//! others for long), every other row adds its last sampled token. One ragged forward pass runs
//! them all ([`crate::ragged`]); rows whose prompt is done sample a token, stream it to their
//! sink, and leave the batch when they finish (EOS, stop string, length, cancellation). Waiting
//! requests are admitted as rows free up; the waiting queue is bounded and a full queue is
//! refused at submission, so the caller can answer "busy".
//!
//! A request's output is the same whatever else runs beside it: rows never see each other's
//! tokens, and each samples from its own seeded stream (seed and choice index mixed as
//! [`crate::generate::generate`] mixes seed and row).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::Instant;

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::constrain::TokenConstraint;
use crate::generate::{
    Finish, GenConfig, OutputText, apply_repetition_penalty, argmax, log_normaliser,
    sample_tempered, top_logprobs,
};
use crate::hooks::{Capture, Hook, HookCtx, Interventions, Phase, Phases, Positions, Site};
use crate::loader::LanguageModel;
use crate::ragged::{KvPrecision, RaggedRow, RowCache};
use crate::score::SeqScore;
use crate::{LmError, Result};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EngineConfig {
    /// Rows decoded together.
    pub max_rows: usize,
    /// Requests waiting for a row; more are refused.
    pub max_queue: usize,
    /// Prompt tokens read per step, over all rows still reading their prompts.
    pub prefill_chunk: usize,
    /// Number format of the rows' cached keys and values (f32: exactly the padded decoder's
    /// numbers; f16: half the bytes for attention to read, faster long batched decoding).
    #[serde(default)]
    pub kv: KvPrecision,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_rows: 32,
            max_queue: 256,
            prefill_chunk: 512,
            kv: KvPrecision::F32,
        }
    }
}

impl EngineConfig {
    /// Offline batch work (rollouts, evaluations): `rows` decoded together and a queue that
    /// takes every job at once.
    pub fn offline(rows: usize) -> Self {
        EngineConfig {
            max_rows: rows.max(1),
            max_queue: 1 << 20,
            ..EngineConfig::default()
        }
    }
}

/// Activations a request asks for.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CaptureSpec {
    pub sites: Vec<Site>,
    #[serde(default = "last_prompt")]
    pub positions: Positions,
    #[serde(default = "prefill_only")]
    pub phases: Phases,
}

fn last_prompt() -> Positions {
    Positions::LastPrompt
}
fn prefill_only() -> Phases {
    Phases::Prefill
}

/// One generation.
pub struct Job {
    pub prompt: Vec<u32>,
    pub config: GenConfig,
    /// Mixed into the seed (the choice index when a request asks for several).
    pub stream_index: u64,
    pub interventions: Option<Interventions>,
    pub capture: Option<CaptureSpec>,
    /// Report the chosen token's log-probability and this many alternatives.
    pub logprobs: Option<usize>,
    pub constraint: Option<Box<dyn TokenConstraint>>,
}

impl Job {
    pub fn new(prompt: Vec<u32>, config: GenConfig) -> Self {
        Job {
            prompt,
            config,
            stream_index: 0,
            interventions: None,
            capture: None,
            logprobs: None,
            constraint: None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct TokenEvent {
    pub id: u32,
    /// Text that may be streamed now (empty while a character or a possible stop string is
    /// incomplete).
    pub text: String,
    /// `ln p(token)` under the model (raw logits, before penalties, temperature or grammar).
    pub logprob: Option<f32>,
    pub top: Vec<(u32, f32)>,
}

pub struct Outcome {
    pub finish: Finish,
    pub prompt_tokens: usize,
    pub tokens: Vec<u32>,
    pub text: String,
    /// Text not streamed by the token events (a flushed last character).
    pub tail: String,
    pub capture: Option<Capture>,
    pub queued_ms: f64,
    pub first_token_ms: Option<f64>,
    pub total_ms: f64,
}

pub enum Event {
    Token(TokenEvent),
    Done(Box<Outcome>),
    Failed(String),
}

/// Receives a request's events on the engine thread; returning `false` cancels the request
/// (the receiver is gone).
pub type Sink = Box<dyn FnMut(Event) -> bool + Send>;

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the engine is busy: {queued} requests are waiting (limit {limit})")]
    Busy { queued: usize, limit: usize },
    #[error(transparent)]
    Invalid(#[from] LmError),
    #[error("the engine has shut down")]
    Closed,
}

/// Cancels its request when asked (or when dropped, if armed with [`Ticket::cancel_on_drop`]).
pub struct Ticket {
    cancel: Arc<AtomicBool>,
    counted: Arc<AtomicBool>,
    stats: Arc<Stats>,
    on_drop: bool,
}

impl Ticket {
    /// Cancel the request; one still waiting stops counting against the queue limit at once.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
        uncount(&self.counted, &self.stats);
    }
    pub fn cancel_on_drop(mut self) -> Self {
        self.on_drop = true;
        self
    }
    /// Let the request run to its end even if this ticket is dropped.
    pub fn disarm(&mut self) {
        self.on_drop = false;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.on_drop {
            self.cancel();
        }
    }
}

/// Counters the engine keeps (read by `/metrics`).
#[derive(Debug, Default)]
pub struct Stats {
    pub queued: AtomicUsize,
    pub active: AtomicUsize,
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens not computed because a row with the same prompt had read them
    /// (their keys and values were copied; see [`share_prompts`]).
    pub shared_prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    pub steps: AtomicU64,
    pub busy_ns: AtomicU64,
    pub finished: AtomicU64,
    pub cancelled: AtomicU64,
    pub failed: AtomicU64,
    pub kv_bytes: AtomicU64,
}

enum Msg {
    /// Jobs admitted together (the `n` choices of one request share their first step, so
    /// their numbers do not depend on when the engine thread wakes between them).
    Jobs(Vec<Pending>),
    Score {
        pairs: Vec<(Vec<u32>, Vec<u32>)>,
        interventions: Option<Interventions>,
        reply: mpsc::Sender<Result<Vec<SeqScore>>>,
    },
    Shutdown {
        abort: bool,
    },
}

struct Pending {
    job: Job,
    sink: Sink,
    cancel: Arc<AtomicBool>,
    /// Still counted in `Stats::queued`: whoever clears it (admission, or a cancel while
    /// waiting) takes it off the count, exactly once.
    counted: Arc<AtomicBool>,
    submitted: Instant,
}

/// Take a waiting job off the queue count once (whoever gets there first).
fn uncount(counted: &AtomicBool, stats: &Stats) {
    if counted.swap(false, Ordering::SeqCst) {
        stats.queued.fetch_sub(1, Ordering::SeqCst);
    }
}

pub struct Engine {
    pub lm: Arc<LanguageModel>,
    pub cfg: EngineConfig,
    pub stats: Arc<Stats>,
    tx: Mutex<Option<mpsc::Sender<Msg>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Engine {
    pub fn start(lm: Arc<LanguageModel>, cfg: EngineConfig) -> Self {
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(Stats::default());
        let (lm2, cfg2, stats2) = (lm.clone(), cfg.clone(), stats.clone());
        let thread = std::thread::Builder::new()
            .name("rudder-engine".into())
            .spawn(move || run(&lm2, &cfg2, rx, &stats2))
            .expect("spawn the engine thread");
        Engine {
            lm,
            cfg,
            stats,
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        }
    }

    fn send(&self, m: Msg) -> std::result::Result<(), SubmitError> {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        tx.as_ref()
            .ok_or(SubmitError::Closed)?
            .send(m)
            .map_err(|_| SubmitError::Closed)
    }

    /// Check a prompt against the context window; the most new tokens it leaves room for.
    pub fn check_prompt(&self, prompt: &[u32]) -> std::result::Result<usize, LmError> {
        let ctx = self.lm.decoder.cfg.max_position_embeddings;
        if prompt.is_empty() {
            return Err(LmError::Config("the prompt is empty".into()));
        }
        if prompt.len() >= ctx {
            return Err(LmError::TooLong {
                len: prompt.len(),
                ctx,
                detail: "no room left to generate".into(),
            });
        }
        Ok(ctx - prompt.len())
    }

    /// Queue a generation; its events go to `sink` on the engine thread.
    pub fn submit(&self, job: Job, sink: Sink) -> std::result::Result<Ticket, SubmitError> {
        Ok(self
            .submit_all(vec![(job, sink)])?
            .pop()
            .expect("one ticket per job"))
    }

    /// Queue several generations as one group: they are admitted in the same step while rows
    /// are free, so a request's choices are computed in the same batch whatever the timing.
    /// Every job is checked before any is queued; on an error nothing is queued.
    pub fn submit_all(
        &self,
        jobs: Vec<(Job, Sink)>,
    ) -> std::result::Result<Vec<Ticket>, SubmitError> {
        for (job, _) in &jobs {
            self.check_prompt(&job.prompt)?;
            if let Some(iv) = &job.interventions {
                let c = &self.lm.decoder.cfg;
                iv.validate(c.num_layers, c.hidden_size)?;
            }
            if let Some(cap) = &job.capture {
                for s in &cap.sites {
                    s.check(self.lm.decoder.cfg.num_layers)?;
                }
            }
        }
        let n = jobs.len();
        let queued = self.stats.queued.fetch_add(n, Ordering::SeqCst);
        if queued + n > self.cfg.max_queue {
            self.stats.queued.fetch_sub(n, Ordering::SeqCst);
            return Err(SubmitError::Busy {
                queued,
                limit: self.cfg.max_queue,
            });
        }
        let mut tickets = Vec::with_capacity(n);
        let mut group = Vec::with_capacity(n);
        let mut counts = Vec::with_capacity(n);
        for (job, sink) in jobs {
            let cancel = Arc::new(AtomicBool::new(false));
            let counted = Arc::new(AtomicBool::new(true));
            group.push(Pending {
                job,
                sink,
                cancel: cancel.clone(),
                counted: counted.clone(),
                submitted: Instant::now(),
            });
            counts.push(counted.clone());
            tickets.push(Ticket {
                cancel,
                counted,
                stats: self.stats.clone(),
                on_drop: false,
            });
        }
        if let Err(e) = self.send(Msg::Jobs(group)) {
            for c in &counts {
                uncount(c, &self.stats);
            }
            return Err(e);
        }
        Ok(tickets)
    }

    /// Generate and wait (a blocking convenience over [`Engine::submit`]).
    pub fn generate_blocking(&self, job: Job) -> std::result::Result<Outcome, SubmitError> {
        let (tx, rx) = mpsc::channel();
        let _t = self.submit(
            job,
            Box::new(move |e| match e {
                Event::Token(_) => true,
                other => tx.send(other).is_ok(),
            }),
        )?;
        match rx.recv() {
            Ok(Event::Done(o)) => Ok(*o),
            Ok(Event::Failed(m)) => Err(SubmitError::Invalid(LmError::Config(m))),
            _ => Err(SubmitError::Closed),
        }
    }

    /// Log-probabilities of continuations (run between decode steps, on the engine thread).
    pub fn score(
        &self,
        pairs: Vec<(Vec<u32>, Vec<u32>)>,
        interventions: Option<Interventions>,
    ) -> std::result::Result<Vec<SeqScore>, SubmitError> {
        let (tx, rx) = mpsc::channel();
        self.send(Msg::Score {
            pairs,
            interventions,
            reply: tx,
        })?;
        rx.recv()
            .map_err(|_| SubmitError::Closed)?
            .map_err(SubmitError::Invalid)
    }

    /// Stop the loop: with `abort`, running and waiting requests fail at once; otherwise they
    /// finish first. Returns when the engine thread has ended.
    pub fn shutdown(&self, abort: bool) {
        let _ = self.send(Msg::Shutdown { abort });
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown(true);
    }
}

/// A request's interventions and capture as one per-row hook.
struct RowHook {
    iv: Option<Interventions>,
    cap: Option<Capture>,
}

impl Hook for RowHook {
    fn touches(&self, site: Site) -> bool {
        self.iv.as_ref().is_some_and(|i| i.touches(site))
            || self.cap.as_ref().is_some_and(|c| c.touches(site))
    }

    fn at(&mut self, site: Site, ctx: &HookCtx, x: &mut Tensor) -> Result<()> {
        if let Some(iv) = &mut self.iv {
            iv.at(site, ctx, x)?;
        }
        if let Some(c) = &mut self.cap {
            c.at(site, ctx, x)?;
        }
        Ok(())
    }
}

struct Row<'m> {
    prompt: Vec<u32>,
    config: GenConfig,
    max_new: usize,
    logprobs: Option<usize>,
    constraint: Option<Box<dyn TokenConstraint>>,
    hook: RowHook,
    cache: RowCache,
    fed: usize,
    next: u32,
    out: Vec<u32>,
    history: Vec<u32>,
    stream: crate::tokenizer::TextStream<'m>,
    text: OutputText,
    rng: ChaCha8Rng,
    sink: Sink,
    cancel: Arc<AtomicBool>,
    submitted: Instant,
    admitted: Instant,
    first_token: Option<Instant>,
    finish: Option<Finish>,
    failed: Option<String>,
    gone: bool,
}

fn ms(a: Instant, b: Instant) -> f64 {
    b.duration_since(a).as_secs_f64() * 1e3
}

impl<'m> Row<'m> {
    fn new(lm: &'m LanguageModel, p: Pending, kv: KvPrecision) -> Self {
        let Pending {
            job,
            sink,
            cancel,
            submitted,
            ..
        } = p;
        let ctx = lm.decoder.cfg.max_position_embeddings;
        let max_new = job
            .config
            .max_new_tokens
            .min(ctx.saturating_sub(job.prompt.len()));
        let cap = job.capture.map(|c| {
            let mut cap = Capture::new(c.sites, c.positions);
            cap.phases = c.phases;
            cap
        });
        let rng = ChaCha8Rng::seed_from_u64(
            job.config
                .seed
                .wrapping_mul(0x9E3779B97F4A7C15)
                .wrapping_add(job.stream_index),
        );
        Row {
            cache: RowCache::with_room_for(
                &lm.decoder.cfg,
                job.prompt.len(),
                job.prompt.len() + max_new.min(CACHE_AHEAD),
                kv,
            ),
            history: job.prompt.clone(),
            prompt: job.prompt,
            config: job.config,
            max_new,
            logprobs: job.logprobs,
            constraint: job.constraint,
            hook: RowHook {
                iv: job.interventions.filter(|i| !i.is_empty()),
                cap,
            },
            fed: 0,
            next: 0,
            out: Vec::new(),
            stream: lm.tok.text_stream(),
            text: OutputText::default(),
            rng,
            sink,
            cancel,
            submitted,
            admitted: Instant::now(),
            first_token: None,
            finish: if max_new == 0 {
                Some(Finish::Length)
            } else {
                None
            },
            failed: None,
            gone: false,
        }
    }

    fn over(&self) -> bool {
        self.finish.is_some() || self.failed.is_some() || self.gone
    }

    /// Pick, record and stream the next token from this row's logits.
    fn on_logits(&mut self, lm: &LanguageModel, logits: &mut [f32]) {
        let (lp, top) = match self.logprobs {
            Some(n) => {
                let lse = log_normaliser(logits);
                (Some((lse, logits.to_vec())), top_logprobs(logits, lse, n))
            }
            None => (None, Vec::new()),
        };
        apply_repetition_penalty(logits, &self.history, self.config.repetition_penalty);
        let tok = match self.pick(logits) {
            Ok(t) => t,
            Err(e) => {
                self.failed = Some(e);
                return;
            }
        };
        if self.first_token.is_none() {
            self.first_token = Some(Instant::now());
        }
        if lm.tok.is_eos(tok) && !self.config.ignore_eos {
            self.finish = Some(Finish::Eos);
            return;
        }
        if let Some(c) = &mut self.constraint
            && let Err(e) = c.advance(tok)
        {
            self.failed = Some(e.to_string());
            return;
        }
        self.out.push(tok);
        self.history.push(tok);
        let mut emit = String::new();
        match self.stream.step(tok) {
            Ok(Some(piece)) => {
                let (e, stopped) = self.text.push(&piece, &self.config.stop);
                emit = e;
                if stopped {
                    self.finish = Some(Finish::Stop);
                }
            }
            Ok(None) => {}
            Err(e) => {
                self.failed = Some(e.to_string());
                return;
            }
        }
        let ev = TokenEvent {
            id: tok,
            text: emit,
            logprob: lp.map(|(lse, raw)| raw[tok as usize] - lse),
            top,
        };
        if !(self.sink)(Event::Token(ev)) {
            self.gone = true;
            return;
        }
        if self.finish.is_none() && self.out.len() >= self.max_new {
            self.finish = Some(Finish::Length);
        }
        self.next = tok;
    }

    fn pick(&mut self, logits: &mut [f32]) -> std::result::Result<u32, String> {
        let greedy = self.config.temperature <= 0.0;
        if let Some(c) = &mut self.constraint {
            if greedy {
                // most likely first: usually the first candidate is allowed
                for _ in 0..32 {
                    let t = argmax(logits);
                    if !logits[t as usize].is_finite() {
                        break;
                    }
                    if c.allows(t) {
                        return Ok(t);
                    }
                    logits[t as usize] = f32::NEG_INFINITY;
                }
            }
            c.mask(logits);
            if logits.iter().all(|l| !l.is_finite()) {
                return Err("no token can continue the constrained output".into());
            }
        }
        Ok(if greedy {
            argmax(logits)
        } else {
            sample_tempered(
                logits,
                self.config.temperature,
                self.config.top_k,
                self.config.top_p,
                &mut self.rng,
            )
        })
    }

    fn close(mut self, lm: &LanguageModel, stats: &Stats) {
        let now = Instant::now();
        if self.gone || self.cancel.load(Ordering::Relaxed) {
            stats.cancelled.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if let Some(e) = self.failed.take() {
            stats.failed.fetch_add(1, Ordering::Relaxed);
            (self.sink)(Event::Failed(e));
            return;
        }
        let finish = self.finish.unwrap_or(Finish::Length);
        let stopped = finish == Finish::Stop;
        let full = if stopped {
            None
        } else {
            lm.tok.decode(&self.out, true).ok()
        };
        let tail = self.text.finish(full, stopped);
        stats.finished.fetch_add(1, Ordering::Relaxed);
        let o = Outcome {
            finish,
            prompt_tokens: self.prompt.len(),
            tokens: std::mem::take(&mut self.out),
            text: std::mem::take(&mut self.text.text),
            tail,
            capture: self.hook.cap.take(),
            queued_ms: ms(self.submitted, self.admitted),
            first_token_ms: self.first_token.map(|t| ms(self.submitted, t)),
            total_ms: ms(self.submitted, now),
        };
        (self.sink)(Event::Done(Box::new(o)));
    }
}

fn run(lm: &LanguageModel, cfg: &EngineConfig, rx: mpsc::Receiver<Msg>, stats: &Stats) {
    let mut waiting: VecDeque<Pending> = VecDeque::new();
    let mut rows: Vec<Row> = Vec::new();
    let mut draining = false;
    let max_rows = cfg.max_rows.max(1);
    loop {
        // take in messages: block only when there is nothing to do
        let mut msgs = Vec::new();
        if rows.is_empty() && waiting.is_empty() {
            if draining {
                return;
            }
            match rx.recv() {
                Ok(m) => msgs.push(m),
                Err(_) => return,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(m) => msgs.push(m),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    draining = true;
                    break;
                }
            }
        }
        for m in msgs {
            match m {
                Msg::Jobs(ps) => waiting.extend(ps),
                Msg::Score {
                    pairs,
                    interventions,
                    reply,
                } => {
                    let r = match interventions {
                        Some(mut iv) => {
                            crate::score::score(&lm.decoder, &pairs, lm.tok.pad, 8, &mut iv)
                        }
                        None => crate::score::score_shared(
                            &lm.decoder,
                            &pairs,
                            lm.tok.pad,
                            8,
                            &mut crate::hooks::NoHook,
                        ),
                    };
                    let _ = reply.send(r);
                }
                Msg::Shutdown { abort } => {
                    draining = true;
                    if abort {
                        for p in waiting.drain(..) {
                            uncount(&p.counted, stats);
                            let mut sink = p.sink;
                            sink(Event::Failed("the server is shutting down".into()));
                        }
                        for mut r in rows.drain(..) {
                            r.failed = Some("the server is shutting down".into());
                            r.close(lm, stats);
                        }
                        stats.active.store(0, Ordering::SeqCst);
                        return;
                    }
                }
            }
        }
        // admit waiting requests into free rows
        while rows.len() < max_rows {
            let Some(p) = waiting.pop_front() else { break };
            uncount(&p.counted, stats);
            if p.cancel.load(Ordering::Relaxed) {
                stats.cancelled.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            stats
                .prompt_tokens
                .fetch_add(p.job.prompt.len() as u64, Ordering::Relaxed);
            rows.push(Row::new(lm, p, cfg.kv));
        }
        // drop what is over (cancelled, finished before starting)
        let mut i = 0;
        while i < rows.len() {
            if rows[i].cancel.load(Ordering::Relaxed) {
                rows[i].gone = true;
            }
            if rows[i].over() {
                rows.swap_remove(i).close(lm, stats);
            } else {
                i += 1;
            }
        }
        stats.active.store(rows.len(), Ordering::SeqCst);
        if rows.is_empty() {
            continue;
        }
        let t0 = Instant::now();
        if let Err(e) = step(lm, cfg, &mut rows, stats) {
            let msg = format!("decode step failed: {e}");
            for r in rows.iter_mut() {
                r.failed = Some(msg.clone());
            }
        }
        stats.steps.fetch_add(1, Ordering::Relaxed);
        stats
            .busy_ns
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        stats.kv_bytes.store(
            rows.iter().map(|r| r.cache.bytes() as u64).sum(),
            Ordering::Relaxed,
        );
        let mut i = 0;
        while i < rows.len() {
            if rows[i].over() {
                rows.swap_remove(i).close(lm, stats);
            } else {
                i += 1;
            }
        }
        stats.active.store(rows.len(), Ordering::SeqCst);
    }
}

/// Whether rows `a` and `b` compute the same keys and values over their prompts: the same
/// tokens, no capture on either (a capture records what the row itself computes), and equal
/// interventions without a gate (a gate reads the last prompt token, so such a prompt is read
/// in one piece).
fn same_prompt_state(a: &Row, b: &Row) -> bool {
    a.prompt == b.prompt
        && a.hook.cap.is_none()
        && b.hook.cap.is_none()
        && match (&a.hook.iv, &b.hook.iv) {
            (None, None) => true,
            (Some(x), Some(y)) => !x.needs_whole_prompt() && x.interventions == y.interventions,
            _ => false,
        }
}

/// Positions of generation a row's cache has room for from admission (reserved memory, touched
/// only as the row reaches it), so that appending never copies the cache; past them it grows
/// by doubling.
const CACHE_AHEAD: usize = 4096;

/// Rows with the same prompt read it once (rollouts of one question, the `n` choices of one
/// request). A row that has not started its prompt takes the keys and values of all but the
/// last prompt token from a row that has read the whole prompt — shared, not copied: one copy
/// in memory that every such row's attention reads ([`RowCache::prefix`]) — then reads the
/// last token itself (for its own first logits); while that row is still reading, it waits.
/// Every position's keys and values are computed per token, so the shared prefix equals what
/// the row would have computed. Returns, per row, whether it waits this step.
fn share_prompts(rows: &mut [Row], stats: &Stats) -> Vec<bool> {
    let mut wait = vec![false; rows.len()];
    for i in 0..rows.len() {
        let len = rows[i].prompt.len();
        if rows[i].fed != 0 || len < 2 {
            continue;
        }
        let alike = |j: usize| j != i && same_prompt_state(&rows[i], &rows[j]);
        let Some(j) = (0..rows.len()).find(|&j| rows[j].fed >= len && alike(j)) else {
            // a row reading the same prompt now (or about to, earlier in this step)
            wait[i] = (0..rows.len()).any(|j| (rows[j].fed > 0 || (j < i && !wait[j])) && alike(j));
            continue;
        };
        let mut cache = rows[j].cache.prefix(len - 1);
        // the last prompt token and the generation (as at admission)
        cache.reserve(1 + rows[i].max_new.min(CACHE_AHEAD));
        rows[i].cache = cache;
        rows[i].fed = len - 1;
        stats
            .shared_prompt_tokens
            .fetch_add((len - 1) as u64, Ordering::Relaxed);
    }
    wait
}

/// One ragged forward pass over every row that has something to read, then sampling.
fn step(lm: &LanguageModel, cfg: &EngineConfig, rows: &mut [Row], stats: &Stats) -> Result<()> {
    let wait = share_prompts(rows, stats);
    let mut budget = cfg.prefill_chunk.max(1);
    let mut parts: Vec<RaggedRow> = Vec::new();
    let mut who: Vec<(usize, bool)> = Vec::new(); // (row, needs logits)
    let mut one = Vec::with_capacity(rows.len());
    for r in rows.iter() {
        one.push([r.next]);
    }
    for (i, (row, single)) in rows.iter_mut().zip(one.iter()).enumerate() {
        if wait[i] {
            continue;
        }
        let Row {
            prompt,
            cache,
            hook,
            fed,
            ..
        } = row;
        let whole = hook.iv.as_ref().is_some_and(|iv| iv.needs_whole_prompt());
        let hook: Option<&mut dyn Hook> = if hook.iv.is_some() || hook.cap.is_some() {
            Some(hook)
        } else {
            None
        };
        if *fed < prompt.len() {
            if budget == 0 {
                continue;
            }
            // a gated edit reads the last prompt token: such a prompt goes in one piece
            let take = if whole {
                prompt.len() - *fed
            } else {
                (prompt.len() - *fed).min(budget)
            };
            budget = budget.saturating_sub(take);
            let tokens = &prompt[*fed..*fed + take];
            *fed += take;
            who.push((i, *fed == prompt.len()));
            parts.push(RaggedRow {
                tokens,
                cache,
                phase: Phase::Prefill,
                hook,
            });
        } else {
            who.push((i, true));
            parts.push(RaggedRow {
                tokens: single,
                cache,
                phase: Phase::Decode,
                hook,
            });
        }
    }
    if parts.is_empty() {
        return Ok(());
    }
    let decode_tokens = who.iter().filter(|w| w.1).count() as u64;
    let h = lm.decoder.forward_ragged(&mut parts)?;
    drop(parts);
    let need: Vec<u32> = who
        .iter()
        .enumerate()
        .filter(|(_, w)| w.1)
        .map(|(k, _)| k as u32)
        .collect();
    if need.is_empty() {
        return Ok(());
    }
    let n = need.len();
    let h = if n == who.len() {
        h
    } else {
        h.index_select(&Tensor::from_vec(need.clone(), n, &Device::Cpu)?, 0)?
    };
    let mut logits = lm.decoder.logits_vec(&h)?;
    let vocab = logits.len() / n;
    for (k, &w) in need.iter().enumerate() {
        let row = who[w as usize].0;
        rows[row].on_logits(lm, &mut logits[k * vocab..(k + 1) * vocab]);
    }
    stats
        .completion_tokens
        .fetch_add(decode_tokens, Ordering::Relaxed);
    Ok(())
}
