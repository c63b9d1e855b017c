//! `rudder serve`: an OpenAI-compatible HTTP server over rudder-lm.
//!
//! Endpoints: `GET /v1/models`, `POST /v1/chat/completions` (plain and server-sent events),
//! `POST /v1/completions`, `POST /v1/embeddings` (with an encoder model), `GET /health`,
//! `GET /metrics` (Prometheus text). Generation goes through the in-process client's request
//! conversion ([`rudder_client::inproc`]) into the continuous-batching engine, so concurrent
//! requests share every decode step. A full queue answers 429 with `Retry-After`; a client that
//! disconnects cancels its rows; SIGTERM/SIGINT stops accepting, lets running requests finish
//! for a grace period and fails the rest cleanly. rudder's extension field (`"rudder": {...}`)
//! adds per-request steering, activation capture and exact continuation scores; requests
//! without it are standard.

pub mod metrics;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use rudder_client::inproc::{
    ApiError, ChoiceAcc, InProcess, InProcessConfig, Prepared, capture_json, finish_reason,
    rudder_response,
};
use rudder_client::openai::{
    ChatChunk, ChatRequest, ChoiceLogprobs, ChunkChoice, CompletionChoice, CompletionLogprobs,
    CompletionRequest, CompletionResponse, Delta, EmbeddingData, EmbeddingRequest,
    EmbeddingResponse, ErrorBody, ErrorDetail, ModelCard, ModelList, Prompt, Usage, now_secs,
};
use rudder_lm::bert::TextEncoder;
use rudder_lm::engine::Event;
use rudder_lm::hooks::Interventions;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::mpsc;

pub use metrics::Metrics;

#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub host: String,
    pub port: u16,
    /// Bearer key every `/v1` request must carry (none: open).
    pub api_key: Option<String>,
    pub inproc: InProcessConfig,
    /// Named steering files (intervention lists) requests may select.
    pub steer: Vec<(String, PathBuf)>,
    pub max_body_bytes: usize,
    /// How long running requests may take to finish after SIGTERM.
    pub shutdown_grace: Duration,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            host: "127.0.0.1".into(),
            port: 8080,
            api_key: None,
            inproc: InProcessConfig::default(),
            steer: Vec::new(),
            max_body_bytes: 4 << 20,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// What the server holds: the generation backend, an optional encoder, limits and metrics.
pub struct AppState {
    pub lm: Option<Arc<InProcess>>,
    pub encoder: Option<(String, Arc<TextEncoder>)>,
    pub api_key: Option<String>,
    pub metrics: Metrics,
    pub max_body: usize,
    pub closing: AtomicBool,
}

impl AppState {
    pub fn new(
        lm: Option<Arc<InProcess>>,
        encoder: Option<(String, Arc<TextEncoder>)>,
        cfg: &ServeConfig,
    ) -> Self {
        AppState {
            lm,
            encoder,
            api_key: cfg.api_key.clone(),
            metrics: Metrics::default(),
            max_body: cfg.max_body_bytes,
            closing: AtomicBool::new(false),
        }
    }
}

/// Read the named steering files (`NAME=FILE` pairs).
pub fn load_steering(
    pairs: &[(String, PathBuf)],
) -> Result<HashMap<String, Interventions>, String> {
    let mut m = HashMap::new();
    for (name, path) in pairs {
        let iv = Interventions::from_json_file(path).map_err(|e| e.to_string())?;
        m.insert(name.clone(), iv);
    }
    Ok(m)
}

type Shared = Arc<AppState>;

pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .fallback(not_found)
        .with_state(state)
}

/// Serve until `shutdown` resolves, then finish running requests within the grace period.
pub async fn serve(
    state: Shared,
    listener: tokio::net::TcpListener,
    grace: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let sampler = {
        let st = state.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                if let Some(lm) = &st.lm {
                    st.metrics.sample_rate(&lm.engine.stats);
                }
            }
        })
    };
    let st = state.clone();
    let signal = async move {
        shutdown.await;
        st.closing.store(true, Ordering::SeqCst);
        tracing::warn!("shutting down: finishing running requests (grace {grace:?})");
        let st2 = st.clone();
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            if let Some(lm) = &st2.lm {
                tracing::warn!("grace period over: failing the requests still running");
                let e = lm.engine.clone();
                let _ = tokio::task::spawn_blocking(move || e.shutdown(true)).await;
            }
        });
    };
    let r = axum::serve(listener, router(state.clone()))
        .with_graceful_shutdown(signal)
        .await;
    sampler.abort();
    if let Some(lm) = &state.lm {
        let e = lm.engine.clone();
        let _ = tokio::task::spawn_blocking(move || e.shutdown(false)).await;
    }
    r
}

/// SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

// ---------------------------------------------------------------------------------------------
// helpers

fn error_response(e: &ApiError) -> Response {
    let body = ErrorBody {
        error: ErrorDetail {
            message: e.message.clone(),
            kind: e.kind.to_string(),
            param: e.param.clone(),
            code: match e.status {
                401 => Some("invalid_api_key".into()),
                404 => Some("not_found".into()),
                413 => Some("request_too_large".into()),
                429 => Some("rate_limit_exceeded".into()),
                _ => None,
            },
        },
    };
    let mut r = (
        StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        axum::Json(body),
    )
        .into_response();
    if let Some(s) = e.retry_after
        && let Ok(v) = HeaderValue::from_str(&s.to_string())
    {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

fn status_error(status: u16, kind: &'static str, msg: impl Into<String>) -> ApiError {
    ApiError {
        status,
        kind,
        message: msg.into(),
        param: None,
        retry_after: None,
    }
}

fn authorize(st: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    if st.closing.load(Ordering::SeqCst) {
        let mut e = status_error(503, "server_error", "the server is shutting down");
        e.retry_after = Some(5);
        return Err(e);
    }
    let Some(key) = &st.api_key else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    if given == Some(key.as_str()) {
        Ok(())
    } else {
        Err(status_error(
            401,
            "invalid_request_error",
            if given.is_some() {
                "incorrect API key"
            } else {
                "missing API key: send Authorization: Bearer KEY"
            },
        ))
    }
}

async fn read_json<T: DeserializeOwned>(st: &AppState, body: Body) -> Result<T, ApiError> {
    let bytes = axum::body::to_bytes(body, st.max_body).await.map_err(|_| {
        status_error(
            413,
            "invalid_request_error",
            format!("the request body exceeds {} bytes", st.max_body),
        )
    })?;
    parse_json(&bytes)
}

/// Parse a request body; errors name the field (`messages[1].content`) and the reason.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad("", format!("malformed JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad("", "the request body must be a JSON object"));
    }
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.inner().to_string();
        let field = inner
            .strip_prefix("missing field `")
            .and_then(|r| r.split('`').next())
            .map(|f| {
                if path == "." {
                    f.to_string()
                } else {
                    format!("{path}.{f}")
                }
            })
            .unwrap_or(path);
        ApiError::bad(&field, format!("{field}: {inner}"))
    })
}

fn need_lm(st: &AppState) -> Result<Arc<InProcess>, ApiError> {
    st.lm.clone().ok_or_else(|| {
        status_error(
            404,
            "invalid_request_error",
            "this server has no generation model (start it with --model)",
        )
    })
}

fn check_model(lm: &InProcess, model: &str) -> Result<(), ApiError> {
    // an empty model name means "the server's model"; any other name must be this one
    if model.is_empty() || model == lm.name {
        Ok(())
    } else {
        Err(ApiError {
            status: 404,
            kind: "invalid_request_error",
            message: format!(
                "the model {model:?} does not exist on this server (it serves {:?})",
                lm.name
            ),
            param: Some("model".into()),
            retry_after: None,
        })
    }
}

struct InFlight<'a>(&'a Metrics);
impl<'a> InFlight<'a> {
    fn new(m: &'a Metrics) -> Self {
        m.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(m)
    }
}
impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

fn sse_response(rx: mpsc::Receiver<Bytes>) -> Response {
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<Bytes, std::convert::Infallible>(b), rx))
    });
    let mut r = Response::new(Body::from_stream(stream));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

fn sse_data(v: &impl serde::Serialize) -> Bytes {
    Bytes::from(format!(
        "data: {}\n\n",
        serde_json::to_string(v).unwrap_or_default()
    ))
}

// ---------------------------------------------------------------------------------------------
// handlers

async fn not_found() -> Response {
    error_response(&status_error(
        404,
        "invalid_request_error",
        "no such endpoint (see GET /v1/models, POST /v1/chat/completions, /v1/completions, /v1/embeddings)",
    ))
}

async fn health(State(st): State<Shared>) -> Response {
    let closing = st.closing.load(Ordering::SeqCst);
    let mut v = json!({"status": if closing { "shutting_down" } else { "ok" }});
    if let Some(lm) = &st.lm {
        let s = &lm.engine.stats;
        v["model"] = json!(lm.name);
        v["queued"] = json!(s.queued.load(Ordering::Relaxed));
        v["rows"] = json!(s.active.load(Ordering::Relaxed));
    }
    if let Some((name, _)) = &st.encoder {
        v["embedding_model"] = json!(name);
    }
    let code = if closing {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (code, axum::Json(v)).into_response()
}

async fn metrics_text(State(st): State<Shared>) -> Response {
    let text = st
        .metrics
        .render(st.lm.as_ref().map(|l| l.engine.stats.as_ref()));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn models(State(st): State<Shared>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&st, &headers) {
        return error_response(&e);
    }
    let created = now_secs();
    let mut data = Vec::new();
    if let Some(lm) = &st.lm {
        data.push(ModelCard {
            id: lm.name.clone(),
            object: "model".into(),
            created,
            owned_by: "rudder".into(),
        });
    }
    if let Some((name, _)) = &st.encoder {
        data.push(ModelCard {
            id: name.clone(),
            object: "model".into(),
            created,
            owned_by: "rudder".into(),
        });
    }
    axum::Json(ModelList {
        object: "list".into(),
        data,
    })
    .into_response()
}

async fn chat(State(st): State<Shared>, headers: HeaderMap, body: Body) -> Response {
    let t0 = Instant::now();
    let _f = InFlight::new(&st.metrics);
    match chat_inner(&st, &headers, body, t0).await {
        Ok(r) => r,
        Err(e) => {
            st.metrics
                .request("chat", e.status, t0.elapsed().as_secs_f64());
            error_response(&e)
        }
    }
}

async fn chat_inner(
    st: &Shared,
    headers: &HeaderMap,
    body: Body,
    t0: Instant,
) -> Result<Response, ApiError> {
    authorize(st, headers)?;
    let lm = need_lm(st)?;
    let req: ChatRequest = read_json(st, body).await?;
    check_model(&lm, &req.model)?;
    if !req.streaming() {
        let r = lm.chat_response(&req).await?;
        st.metrics.request("chat", 200, t0.elapsed().as_secs_f64());
        return Ok(axum::Json(r).into_response());
    }
    let mut p = lm.prepare_chat(&req)?;
    if p.score.is_some() {
        return Err(ApiError::bad(
            "stream",
            "rudder.score_continuations cannot be streamed",
        ));
    }
    let include_usage = req.stream_options.as_ref().is_some_and(|o| o.include_usage);
    let jobs = std::mem::take(&mut p.jobs);
    let n = jobs.len();
    let run = lm.start(jobs, 0)?;
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let st2 = st.clone();
    tokio::spawn(async move {
        stream_chat(&st2, &lm, p, run, n, include_usage, tx, t0).await;
    });
    Ok(sse_response(rx))
}

#[allow(clippy::too_many_arguments)]
async fn stream_chat(
    st: &AppState,
    lm: &InProcess,
    p: Prepared,
    mut run: rudder_client::inproc::Running,
    n: usize,
    include_usage: bool,
    tx: mpsc::Sender<Bytes>,
    t0: Instant,
) {
    let chunk = |choices: Vec<ChunkChoice>| ChatChunk {
        id: p.id.clone(),
        object: "chat.completion.chunk".into(),
        created: p.created,
        model: p.model.clone(),
        choices,
        usage: None,
        system_fingerprint: Some(rudder_client::inproc::fingerprint(lm.lm())),
        rudder: None,
    };
    for i in 0..n {
        let c = chunk(vec![ChunkChoice {
            index: i as u32,
            delta: Delta {
                role: Some("assistant".into()),
                content: Some(String::new()),
            },
            finish_reason: None,
            logprobs: None,
        }]);
        if tx.send(sse_data(&c)).await.is_err() {
            return;
        }
    }
    let mut left = n;
    let mut completion = 0u64;
    let mut capture = None;
    let mut first = true;
    while left > 0 {
        let Some((i, ev)) = run.next().await else {
            break;
        };
        let msg = match ev {
            Event::Token(t) => {
                if first {
                    st.metrics.first_token(t0.elapsed().as_secs_f64());
                    first = false;
                }
                let lp = match (p.logprobs, t.logprob) {
                    (Some(_), Some(l)) => Some(ChoiceLogprobs {
                        content: Some(vec![lm.token_logprob(t.id, l, &t.top)]),
                    }),
                    _ => None,
                };
                if t.text.is_empty() && lp.is_none() {
                    continue;
                }
                sse_data(&chunk(vec![ChunkChoice {
                    index: i,
                    delta: Delta {
                        role: None,
                        content: Some(t.text),
                    },
                    finish_reason: None,
                    logprobs: lp,
                }]))
            }
            Event::Done(mut o) => {
                left -= 1;
                completion += o.tokens.len() as u64;
                if i == 0 {
                    capture = o.capture.take().map(|c| capture_json(&c));
                }
                let mut b = Vec::new();
                if !o.tail.is_empty() {
                    b.extend_from_slice(&sse_data(&chunk(vec![ChunkChoice {
                        index: i,
                        delta: Delta {
                            role: None,
                            content: Some(o.tail.clone()),
                        },
                        finish_reason: None,
                        logprobs: None,
                    }])));
                }
                b.extend_from_slice(&sse_data(&chunk(vec![ChunkChoice {
                    index: i,
                    delta: Delta::default(),
                    finish_reason: Some(finish_reason(o.finish).into()),
                    logprobs: None,
                }])));
                Bytes::from(b)
            }
            Event::Failed(m) => {
                let e = ErrorBody {
                    error: ErrorDetail {
                        message: m,
                        kind: "server_error".into(),
                        param: None,
                        code: None,
                    },
                };
                let _ = tx.send(sse_data(&e)).await;
                st.metrics.request("chat", 500, t0.elapsed().as_secs_f64());
                return;
            }
        };
        if tx.send(msg).await.is_err() {
            st.metrics.request("chat", 499, t0.elapsed().as_secs_f64());
            return; // client gone: dropping `run` cancels the rows
        }
    }
    let ext = rudder_response(&p, capture, None);
    if include_usage || ext.is_some() {
        let mut c = chunk(Vec::new());
        if include_usage {
            c.usage = Some(Usage::new(p.prompt.len() as u64, completion));
        }
        c.rudder = ext;
        let _ = tx.send(sse_data(&c)).await;
    }
    let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
    st.metrics.request("chat", 200, t0.elapsed().as_secs_f64());
}

async fn completions(State(st): State<Shared>, headers: HeaderMap, body: Body) -> Response {
    let t0 = Instant::now();
    let _f = InFlight::new(&st.metrics);
    match completions_inner(&st, &headers, body, t0).await {
        Ok(r) => r,
        Err(e) => {
            st.metrics
                .request("completions", e.status, t0.elapsed().as_secs_f64());
            error_response(&e)
        }
    }
}

async fn completions_inner(
    st: &Shared,
    headers: &HeaderMap,
    body: Body,
    t0: Instant,
) -> Result<Response, ApiError> {
    authorize(st, headers)?;
    let lm = need_lm(st)?;
    let mut req: CompletionRequest = read_json(st, body).await?;
    check_model(&lm, &req.model)?;
    let echo = req.echo.unwrap_or(false);
    // `max_tokens: 0` with `echo` scores the prompt without generating
    let score_only = echo && req.max_tokens == Some(0);
    if score_only {
        req.max_tokens = Some(1);
    }
    let mut preps = lm.prepare_completion(&req)?;
    let n = req.n.unwrap_or(1) as usize;
    if req.stream.unwrap_or(false) {
        if echo {
            return Err(ApiError::bad("echo", "echo cannot be combined with stream"));
        }
        let include_usage = req.stream_options.as_ref().is_some_and(|o| o.include_usage);
        let mut runs = Vec::new();
        for (k, p) in preps.iter_mut().enumerate() {
            let jobs = std::mem::take(&mut p.jobs);
            runs.push(lm.start(jobs, (k * n) as u32)?);
        }
        let (tx, rx) = mpsc::channel::<Bytes>(64);
        let st2 = st.clone();
        tokio::spawn(async move {
            stream_completions(&st2, preps, runs, n, include_usage, tx, t0).await;
        });
        return Ok(sse_response(rx));
    }
    let mut choices = Vec::new();
    let (mut prompt_tokens, mut completion) = (0u64, 0u64);
    let (id, created, model) = (
        preps[0].id.clone(),
        preps[0].created,
        preps[0].model.clone(),
    );
    let mut ext = None;
    for (k, p) in preps.iter_mut().enumerate() {
        prompt_tokens += p.prompt.len() as u64;
        // the prompt's own log-probabilities (echo + logprobs)
        let prompt_lp = if echo && p.logprobs.is_some() && p.prompt.len() > 1 {
            let s = lm
                .engine
                .clone()
                .score(vec![(p.prompt[..1].to_vec(), p.prompt[1..].to_vec())], None);
            Some(
                s.map_err(|e| ApiError::internal(e.to_string()))?
                    .remove(0)
                    .token_logprobs,
            )
        } else {
            None
        };
        let prompt_text = if echo {
            lm.lm()
                .tok
                .decode(&p.prompt, true)
                .map_err(|e| ApiError::internal(e.to_string()))?
        } else {
            String::new()
        };
        let accs: Vec<ChoiceAcc> = if score_only {
            (0..p.jobs.len()).map(|_| ChoiceAcc::default()).collect()
        } else {
            lm.run_choices(p, &mut |_| {}).await?
        };
        for (j, acc) in accs.into_iter().enumerate() {
            if let Some(m) = acc.failed {
                return Err(ApiError::internal(m));
            }
            let (text, finish, toks) = match &acc.outcome {
                Some(o) => (
                    o.text.clone(),
                    Some(finish_reason(o.finish)),
                    o.tokens.len(),
                ),
                None => (String::new(), Some("length"), 0),
            };
            completion += toks as u64;
            if k == 0 && j == 0 {
                let cap = acc
                    .outcome
                    .as_ref()
                    .and_then(|o| o.capture.as_ref())
                    .map(capture_json);
                ext = rudder_response(p, cap, None);
            }
            let logprobs = p.logprobs.map(|_| {
                let mut l = CompletionLogprobs::default();
                let mut offset = 0usize;
                if echo {
                    for (t, &id) in p.prompt.iter().enumerate() {
                        let (tok, _) = lm.token_text(id);
                        l.tokens.push(tok.clone());
                        l.token_logprobs.push(if t == 0 {
                            None
                        } else {
                            prompt_lp.as_ref().map(|v| v[t - 1])
                        });
                        l.top_logprobs.push(None);
                        l.text_offset.push(offset);
                        offset += tok.len();
                    }
                }
                for tl in &acc.logprobs {
                    l.tokens.push(tl.token.clone());
                    l.token_logprobs.push(Some(tl.logprob));
                    l.top_logprobs.push(Some(
                        tl.top_logprobs
                            .iter()
                            .map(|t| (t.token.clone(), json!(t.logprob)))
                            .collect(),
                    ));
                    l.text_offset.push(offset);
                    offset += tl.token.len();
                }
                l
            });
            choices.push(CompletionChoice {
                index: (k * n + j) as u32,
                text: format!("{prompt_text}{text}"),
                finish_reason: finish.map(String::from),
                logprobs,
            });
        }
    }
    st.metrics
        .request("completions", 200, t0.elapsed().as_secs_f64());
    Ok(axum::Json(CompletionResponse {
        id,
        object: "text_completion".into(),
        created,
        model,
        choices,
        usage: Some(Usage::new(prompt_tokens, completion)),
        rudder: ext,
    })
    .into_response())
}

#[allow(clippy::too_many_arguments)]
async fn stream_completions(
    st: &AppState,
    preps: Vec<Prepared>,
    runs: Vec<rudder_client::inproc::Running>,
    n: usize,
    include_usage: bool,
    tx: mpsc::Sender<Bytes>,
    t0: Instant,
) {
    let (id, created, model) = (
        preps[0].id.clone(),
        preps[0].created,
        preps[0].model.clone(),
    );
    let chunk = |index: u32, text: String, finish: Option<String>| {
        json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "finish_reason": finish, "logprobs": null}]
        })
    };
    let (tx2, mut merged) = mpsc::unbounded_channel::<(u32, Event)>();
    let total = runs.len() * n;
    for mut r in runs {
        let tx2 = tx2.clone();
        tokio::spawn(async move {
            while let Some(e) = r.next().await {
                if tx2.send(e).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx2);
    let mut left = total;
    let mut completion = 0u64;
    let mut first = true;
    while left > 0 {
        let Some((i, ev)) = merged.recv().await else {
            break;
        };
        let msg = match ev {
            Event::Token(t) => {
                if first {
                    st.metrics.first_token(t0.elapsed().as_secs_f64());
                    first = false;
                }
                if t.text.is_empty() {
                    continue;
                }
                sse_data(&chunk(i, t.text, None))
            }
            Event::Done(o) => {
                left -= 1;
                completion += o.tokens.len() as u64;
                let mut b = Vec::new();
                if !o.tail.is_empty() {
                    b.extend_from_slice(&sse_data(&chunk(i, o.tail.clone(), None)));
                }
                b.extend_from_slice(&sse_data(&chunk(
                    i,
                    String::new(),
                    Some(finish_reason(o.finish).into()),
                )));
                Bytes::from(b)
            }
            Event::Failed(m) => {
                let _ = tx
                    .send(sse_data(
                        &json!({"error": {"message": m, "type": "server_error"}}),
                    ))
                    .await;
                return;
            }
        };
        if tx.send(msg).await.is_err() {
            st.metrics
                .request("completions", 499, t0.elapsed().as_secs_f64());
            return;
        }
    }
    if include_usage {
        let prompt: u64 = preps.iter().map(|p| p.prompt.len() as u64).sum();
        let _ = tx
            .send(sse_data(&json!({
                "id": id, "object": "text_completion", "created": created, "model": model,
                "choices": [], "usage": Usage::new(prompt, completion)
            })))
            .await;
    }
    let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
    st.metrics
        .request("completions", 200, t0.elapsed().as_secs_f64());
}

async fn embeddings(State(st): State<Shared>, headers: HeaderMap, body: Body) -> Response {
    let t0 = Instant::now();
    let _f = InFlight::new(&st.metrics);
    let r = async {
        authorize(&st, &headers)?;
        let (name, enc) = st.encoder.clone().ok_or_else(|| {
            status_error(
                404,
                "invalid_request_error",
                "this server has no embedding model (start it with --embedding-model)",
            )
        })?;
        let req: EmbeddingRequest = read_json(&st, body).await?;
        if !req.model.is_empty() && req.model != name {
            return Err(ApiError {
                status: 404,
                kind: "invalid_request_error",
                message: format!(
                    "the model {:?} does not exist on this server (embeddings: {name:?})",
                    req.model
                ),
                param: Some("model".into()),
                retry_after: None,
            });
        }
        let texts = match req.input {
            Prompt::One(s) => vec![s],
            Prompt::Many(v) => v,
        };
        if texts.is_empty() || texts.len() > 2048 {
            return Err(ApiError::bad("input", "give 1 to 2048 texts"));
        }
        let base64 = match req.encoding_format.as_deref() {
            None | Some("float") => false,
            Some("base64") => true,
            Some(o) => {
                return Err(ApiError::bad(
                    "encoding_format",
                    format!("{o:?}: expected float or base64"),
                ));
            }
        };
        let (vecs, tokens) = tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = texts.iter().map(|s| s.as_str()).collect();
            let tokens: usize = enc
                .tokenize(&refs)
                .map(|t| t.iter().map(|x| x.len()).sum())
                .unwrap_or(0);
            enc.embed(&refs, 32, &mut |_| {})
                .and_then(|t| Ok(t.to_vec2::<f32>()?))
                .map(|v| (v, tokens))
        })
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::internal(e.to_string()))?;
        let data = vecs
            .into_iter()
            .enumerate()
            .map(|(i, v)| EmbeddingData {
                object: "embedding".into(),
                index: i as u32,
                embedding: if base64 {
                    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    Value::String(base64_encode(&bytes))
                } else {
                    json!(v)
                },
            })
            .collect();
        Ok(EmbeddingResponse {
            object: "list".into(),
            data,
            model: name,
            usage: Usage::new(tokens as u64, 0),
        })
    }
    .await;
    match r {
        Ok(v) => {
            st.metrics
                .request("embeddings", 200, t0.elapsed().as_secs_f64());
            axum::Json(v).into_response()
        }
        Err(e) => {
            st.metrics
                .request("embeddings", e.status, t0.elapsed().as_secs_f64());
            error_response(&e)
        }
    }
}

/// Standard base64 with padding.
pub fn base64_encode(b: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(b.len().div_ceil(3) * 4);
    for c in b.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        out.push(A[(n >> 18) as usize & 63] as char);
        out.push(A[(n >> 12) as usize & 63] as char);
        out.push(if c.len() > 1 {
            A[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if c.len() > 2 {
            A[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(base64_encode(b""), "");
        assert_eq!(base64_encode(b"f"), "Zg==");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_encode(b"foo"), "Zm9v");
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn parse_errors_name_the_field() {
        let e = parse_json::<ChatRequest>(b"{\"model\": \"m\"").unwrap_err();
        assert!(e.message.contains("malformed JSON"), "{e:?}");
        let e = parse_json::<ChatRequest>(b"{\"model\": \"m\"}").unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"), "{e:?}");
        let e = parse_json::<ChatRequest>(
            br#"{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}"#,
        )
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("temperature"), "{e:?}");
        let e = parse_json::<ChatRequest>(br#"{"messages": [{"role": "user", "content": 3}]}"#)
            .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].content"), "{e:?}");
        let e = parse_json::<ChatRequest>(b"[1]").unwrap_err();
        assert_eq!(e.status, 400);
        // unknown fields are accepted, the extension's are not
        assert!(
            parse_json::<ChatRequest>(
                br#"{"messages": [], "tools": [], "parallel_tool_calls": false}"#
            )
            .is_ok()
        );
        let e = parse_json::<ChatRequest>(br#"{"messages": [], "rudder": {"stear": "x"}}"#)
            .unwrap_err();
        assert!(
            e.param.as_deref().unwrap_or("").starts_with("rudder"),
            "{e:?}"
        );
    }
}
