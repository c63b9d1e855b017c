//! rudder's LLM client layer: the one path every feature that asks a language model goes
//! through (simulated users, agentic recommenders, judges).
//!
//! - [`LlmClient`]: chat completion (OpenAI fields, [`openai::ChatRequest`]), streaming, and the
//!   log-probabilities of given continuations where the backend can provide them.
//! - Backends: [`http::HttpClient`] (any OpenAI-compatible server: `rudder serve`, llama.cpp's
//!   llama-server, vLLM, Ollama, a hosted API; retries with backoff and jitter, per-request
//!   timeout), [`inproc::InProcess`] (rudder-lm's continuous-batching engine in this process:
//!   concurrent callers share decode steps, exactly as in the server).
//! - [`Client`] wraps a backend with a record/replay cache ([`replay::Cassette`]), bounded
//!   concurrency, a per-request deadline and token accounting ([`UsageMeter`]); build one from
//!   a spec string with [`Client::from_spec`] (`inproc:MODEL` or a base URL).

pub mod http;
pub mod inproc;
pub mod openai;
pub mod replay;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use openai::{ChatMessage, ChatRequest, ChatResponse};
use replay::{CacheMode, Cassette};

pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error status.
    #[error("HTTP {status}: {message}")]
    Api {
        status: u16,
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The answer is not what the API promises (not JSON, a broken event stream…).
    #[error("unexpected answer: {0}")]
    Protocol(String),
    #[error("not supported by this backend: {0}")]
    Unsupported(String),
    /// Replay mode and the request was never recorded.
    #[error(
        "replay: no recorded answer for this request (key {key}); record it first with --llm-cache-mode record-missing"
    )]
    ReplayMiss { key: String },
    #[error("{0}")]
    Local(String),
    #[error("gave up after {attempts} attempts over {waited:?}: {last}")]
    GaveUp {
        attempts: u32,
        waited: Duration,
        last: Box<ClientError>,
    },
}

impl ClientError {
    /// Worth another attempt: 429, 5xx, connection failures and timeouts (never a 4xx request
    /// error, which would fail the same way again).
    pub fn retryable(&self) -> bool {
        match self {
            ClientError::Api { status, .. } => *status == 429 || *status >= 500,
            ClientError::Connect(_) | ClientError::Timeout(_) => true,
            _ => false,
        }
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;

/// Log-probabilities of continuations; `exact` is false when the backend could only offer its
/// first token's top alternatives (a continuation whose first token is not among them gets
/// −∞).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    pub logprobs: Vec<f64>,
    pub exact: bool,
    /// Tokens read: the prompt (once) plus every continuation, as prompt tokens; none generated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<openai::Usage>,
}

impl Scores {
    /// Index of the most likely continuation (the first on ties).
    pub fn best(&self) -> Option<usize> {
        let mut best: Option<usize> = None;
        for (i, &v) in self.logprobs.iter().enumerate() {
            if v.is_finite() && best.is_none_or(|b| v > self.logprobs[b]) {
                best = Some(i);
            }
        }
        best
    }
}

/// Receives streamed text as it is produced.
pub type OnDelta<'a> = Box<dyn FnMut(&str) + Send + 'a>;

/// A language model behind the OpenAI chat API.
pub trait LlmClient: Send + Sync {
    /// One chat completion (`stream` is ignored: see [`LlmClient::chat_stream`]).
    fn chat<'a>(&'a self, req: ChatRequest) -> BoxFut<'a, Result<ChatResponse>>;

    /// A chat completion whose first choice's text is handed to `on_delta` as it arrives; the
    /// full response is returned at the end.
    fn chat_stream<'a>(
        &'a self,
        req: ChatRequest,
        mut on_delta: OnDelta<'a>,
    ) -> BoxFut<'a, Result<ChatResponse>> {
        Box::pin(async move {
            let r = self.chat(req).await?;
            on_delta(r.text());
            Ok(r)
        })
    }

    /// ln p(continuation | conversation) for each continuation, read as the assistant's reply
    /// to `messages`.
    fn continuation_logprobs<'a>(
        &'a self,
        _model: &'a str,
        _messages: Vec<ChatMessage>,
        _continuations: Vec<String>,
    ) -> BoxFut<'a, Result<Scores>> {
        Box::pin(async {
            Err(ClientError::Unsupported(
                "log-probabilities of continuations".into(),
            ))
        })
    }

    /// What this backend is, for logs and run summaries.
    fn describe(&self) -> String;

    /// The model name requests should carry by default.
    fn default_model(&self) -> String;
}

// ---------------------------------------------------------------------------------------------
// Accounting

/// Token and call counters of one client (shared by every caller).
#[derive(Debug, Default)]
pub struct UsageMeter {
    pub calls: AtomicU64,
    pub cached: AtomicU64,
    pub failures: AtomicU64,
    pub retries: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    pub latency_us: AtomicU64,
}

/// Prices in dollars per 1,000 tokens, for the cost estimate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Price {
    pub prompt_per_1k: f64,
    pub completion_per_1k: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct UsageReport {
    pub backend: String,
    /// Calls answered by the backend.
    pub calls: u64,
    /// Calls answered from the record/replay cache.
    pub cached: u64,
    pub failures: u64,
    pub retries: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub mean_latency_ms: f64,
    /// Dollars, when a price was given.
    pub cost_usd: Option<f64>,
}

impl UsageMeter {
    pub fn report(&self, backend: &str, price: Option<Price>) -> UsageReport {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (calls, p, c) = (
            g(&self.calls),
            g(&self.prompt_tokens),
            g(&self.completion_tokens),
        );
        UsageReport {
            backend: backend.to_string(),
            calls,
            cached: g(&self.cached),
            failures: g(&self.failures),
            retries: g(&self.retries),
            prompt_tokens: p,
            completion_tokens: c,
            mean_latency_ms: if calls > 0 {
                g(&self.latency_us) as f64 / calls as f64 / 1e3
            } else {
                0.0
            },
            cost_usd: price.map(|pr| {
                p as f64 / 1e3 * pr.prompt_per_1k + c as f64 / 1e3 * pr.completion_per_1k
            }),
        }
    }
}

impl UsageReport {
    /// A Markdown paragraph for run summaries.
    pub fn markdown(&self) -> String {
        let mut s = format!(
            "LLM: {} — {} calls ({} from the cache, {} failed, {} retries), {} prompt + {} completion tokens, mean latency {:.0} ms",
            self.backend,
            self.calls,
            self.cached,
            self.failures,
            self.retries,
            self.prompt_tokens,
            self.completion_tokens,
            self.mean_latency_ms
        );
        if let Some(c) = self.cost_usd {
            s.push_str(&format!(", estimated cost ${c:.4}"));
        }
        s.push('.');
        s
    }
}

// ---------------------------------------------------------------------------------------------
// The client every feature holds

/// How to reach a model; what `--llm …` flags build.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LlmSpec {
    /// `inproc:MODEL` (a fetched asset name, a `.gguf` file or a model folder) or the base URL
    /// of an OpenAI-compatible server (`http://127.0.0.1:8080/v1`).
    pub backend: String,
    /// Model name sent to a server (default: the server's first model).
    #[serde(default)]
    pub model: Option<String>,
    /// Environment variable holding the API key (default `OPENAI_API_KEY`; none is fine).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Record/replay file (JSON Lines).
    #[serde(default)]
    pub cache: Option<std::path::PathBuf>,
    #[serde(default)]
    pub cache_mode: CacheMode,
    /// Requests in flight at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Per-request deadline, seconds.
    #[serde(default = "default_timeout")]
    pub timeout_s: f64,
    /// Attempts per request (HTTP), including the first.
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// Longest total time spent waiting between attempts, seconds.
    #[serde(default = "default_max_wait")]
    pub max_wait_s: f64,
    #[serde(default)]
    pub price: Option<Price>,
}

fn default_concurrency() -> usize {
    32
}
fn default_timeout() -> f64 {
    120.0
}
fn default_attempts() -> u32 {
    6
}
fn default_max_wait() -> f64 {
    120.0
}

impl LlmSpec {
    pub fn new(backend: &str) -> Self {
        LlmSpec {
            backend: backend.to_string(),
            model: None,
            api_key_env: None,
            cache: None,
            cache_mode: CacheMode::default(),
            concurrency: default_concurrency(),
            timeout_s: default_timeout(),
            max_attempts: default_attempts(),
            max_wait_s: default_max_wait(),
            price: None,
        }
    }
}

/// A backend with record/replay, bounded concurrency, a per-request deadline and accounting.
pub struct Client {
    backend: Arc<dyn LlmClient>,
    cassette: Option<Arc<Cassette>>,
    mode: CacheMode,
    permits: Arc<tokio::sync::Semaphore>,
    timeout: Duration,
    pub usage: Arc<UsageMeter>,
    pub price: Option<Price>,
}

impl Client {
    pub fn new(backend: Arc<dyn LlmClient>, usage: Arc<UsageMeter>) -> Self {
        Client {
            backend,
            cassette: None,
            mode: CacheMode::Off,
            permits: Arc::new(tokio::sync::Semaphore::new(default_concurrency())),
            timeout: Duration::from_secs_f64(default_timeout()),
            usage,
            price: None,
        }
    }

    pub fn with_cache(mut self, cassette: Arc<Cassette>, mode: CacheMode) -> Self {
        self.cassette = Some(cassette);
        self.mode = mode;
        self
    }

    pub fn with_limits(mut self, concurrency: usize, timeout: Duration) -> Self {
        self.permits = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
        self.timeout = timeout;
        self
    }

    /// Build from a spec. In-process models are loaded here (this takes a few seconds).
    pub fn from_spec(spec: &LlmSpec) -> Result<Self> {
        let usage = Arc::new(UsageMeter::default());
        let backend: Arc<dyn LlmClient> = if let Some(m) = spec.backend.strip_prefix("inproc:") {
            Arc::new(inproc::InProcess::load(m, Default::default())?)
        } else if spec.backend.starts_with("http://") || spec.backend.starts_with("https://") {
            let key_var = spec.api_key_env.as_deref().unwrap_or("OPENAI_API_KEY");
            let key = std::env::var(key_var).ok().filter(|k| !k.is_empty());
            Arc::new(http::HttpClient::new(
                &spec.backend,
                spec.model.clone(),
                key,
                http::RetryPolicy {
                    max_attempts: spec.max_attempts.max(1),
                    max_total_wait: Duration::from_secs_f64(spec.max_wait_s.max(0.0)),
                    ..Default::default()
                },
                Duration::from_secs_f64(spec.timeout_s.max(0.001)),
                usage.clone(),
            )?)
        } else {
            return Err(ClientError::Local(format!(
                "--llm {:?}: expected inproc:MODEL or an http(s):// base URL",
                spec.backend
            )));
        };
        let mut c = Client::new(backend, usage).with_limits(
            spec.concurrency,
            Duration::from_secs_f64(spec.timeout_s.max(0.001)),
        );
        c.price = spec.price;
        if let Some(p) = &spec.cache {
            let mode = if spec.cache_mode == CacheMode::Off {
                CacheMode::RecordMissing
            } else {
                spec.cache_mode
            };
            c = c.with_cache(Arc::new(Cassette::open(p)?), mode);
        } else if spec.cache_mode == CacheMode::Replay {
            return Err(ClientError::Local(
                "replay mode needs a cache file (--llm-cache FILE)".into(),
            ));
        }
        Ok(c)
    }

    pub fn report(&self) -> UsageReport {
        self.usage.report(&self.backend.describe(), self.price)
    }

    async fn guarded<T, F>(&self, fut: F) -> Result<T>
    where
        F: Future<Output = Result<T>>,
    {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| ClientError::Local("client closed".into()))?;
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Timeout(self.timeout)),
        }
    }

    fn record_usage(&self, u: Option<openai::Usage>, t0: Instant) {
        self.usage.calls.fetch_add(1, Ordering::Relaxed);
        self.usage
            .latency_us
            .fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
        if let Some(u) = u {
            self.usage
                .prompt_tokens
                .fetch_add(u.prompt_tokens, Ordering::Relaxed);
            self.usage
                .completion_tokens
                .fetch_add(u.completion_tokens, Ordering::Relaxed);
        }
    }

    /// The cached answer of `(endpoint, request)`, or the error replay mode gives on a miss.
    fn lookup(&self, endpoint: &str, req: &serde_json::Value, sampled: bool) -> Result<Lookup> {
        let Some(c) = &self.cassette else {
            return Ok(Lookup::Call(None));
        };
        if self.mode == CacheMode::Off {
            return Ok(Lookup::Call(None));
        }
        let key = c.key(endpoint, req, sampled);
        if self.mode != CacheMode::Record {
            if let Some(v) = c.get(&key) {
                return Ok(Lookup::Hit(v));
            }
            if self.mode == CacheMode::Replay {
                return Err(ClientError::ReplayMiss { key });
            }
        }
        Ok(Lookup::Call(Some(key)))
    }

    fn store(
        &self,
        key: Option<String>,
        endpoint: &str,
        req: serde_json::Value,
        resp: &impl Serialize,
        t0: Instant,
    ) {
        if let (Some(c), Some(key)) = (&self.cassette, key) {
            let v = serde_json::to_value(resp).unwrap_or_default();
            if let Err(e) = c.put(&key, endpoint, req, v, t0.elapsed()) {
                tracing::warn!("record/replay cache: {e}");
            }
        }
    }
}

impl Client {
    /// One call through the cache, the concurrency bound, the deadline and the accounting.
    /// `on_hit` sees an answer served from the cache.
    async fn cached<T, F>(
        &self,
        endpoint: &str,
        key_req: serde_json::Value,
        sampled: bool,
        usage: impl Fn(&T) -> Option<openai::Usage>,
        on_hit: impl FnOnce(&T),
        call: impl FnOnce() -> F,
    ) -> Result<T>
    where
        T: Serialize + serde::de::DeserializeOwned,
        F: Future<Output = Result<T>>,
    {
        let key = match self.lookup(endpoint, &key_req, sampled)? {
            Lookup::Hit(v) => {
                self.usage.cached.fetch_add(1, Ordering::Relaxed);
                let r: T = serde_json::from_value(v)
                    .map_err(|e| ClientError::Protocol(format!("cached answer: {e}")))?;
                on_hit(&r);
                return Ok(r);
            }
            Lookup::Call(k) => k,
        };
        let t0 = Instant::now();
        let r = self.guarded(call()).await;
        match &r {
            Ok(v) => {
                self.record_usage(usage(v), t0);
                self.store(key, endpoint, key_req, v, t0);
            }
            Err(_) => {
                self.usage.failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        r
    }
}

enum Lookup {
    Hit(serde_json::Value),
    Call(Option<String>),
}

/// A chat request as cached: streaming fields dropped (a streamed and a plain answer are the
/// same answer).
fn normalise(mut req: ChatRequest) -> (ChatRequest, serde_json::Value) {
    req.stream = None;
    req.stream_options = None;
    let v = serde_json::to_value(&req).unwrap_or_default();
    (req, v)
}

fn sampled(req: &ChatRequest) -> bool {
    req.temperature.unwrap_or(1.0) > 0.0
}

impl LlmClient for Client {
    fn chat<'a>(&'a self, req: ChatRequest) -> BoxFut<'a, Result<ChatResponse>> {
        Box::pin(async move {
            let (req, key_req) = normalise(req);
            self.cached(
                "chat",
                key_req,
                sampled(&req),
                |r: &ChatResponse| r.usage,
                |_| {},
                || self.backend.chat(req),
            )
            .await
        })
    }

    fn chat_stream<'a>(
        &'a self,
        req: ChatRequest,
        on_delta: OnDelta<'a>,
    ) -> BoxFut<'a, Result<ChatResponse>> {
        Box::pin(async move {
            let (req, key_req) = normalise(req);
            let is_sampled = sampled(&req);
            // a cached answer is streamed as one piece; the delta callback is shared by both paths
            let on_delta = std::sync::Arc::new(std::sync::Mutex::new(on_delta));
            let od = on_delta.clone();
            let fwd: OnDelta<'a> =
                Box::new(move |d| (od.lock().unwrap_or_else(|e| e.into_inner()))(d));
            self.cached(
                "chat",
                key_req,
                is_sampled,
                |r: &ChatResponse| r.usage,
                |r: &ChatResponse| (on_delta.lock().unwrap_or_else(|e| e.into_inner()))(r.text()),
                || self.backend.chat_stream(req, fwd),
            )
            .await
        })
    }

    fn continuation_logprobs<'a>(
        &'a self,
        model: &'a str,
        messages: Vec<ChatMessage>,
        continuations: Vec<String>,
    ) -> BoxFut<'a, Result<Scores>> {
        Box::pin(async move {
            let key_req = serde_json::json!({
                "model": model, "messages": messages, "continuations": continuations
            });
            let call = || {
                self.backend
                    .continuation_logprobs(model, messages, continuations)
            };
            self.cached("score", key_req, false, |s: &Scores| s.usage, |_| {}, call)
                .await
        })
    }

    fn describe(&self) -> String {
        match (&self.cassette, self.mode) {
            (Some(c), m) if m != CacheMode::Off => format!(
                "{} (cache {} in {:?} mode)",
                self.backend.describe(),
                c.path().display(),
                m
            ),
            _ => self.backend.describe(),
        }
    }

    fn default_model(&self) -> String {
        self.backend.default_model()
    }
}
