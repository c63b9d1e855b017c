//! Any OpenAI-compatible server over HTTP: `POST {base}/chat/completions` (plain and
//! server-sent events), with a per-attempt timeout and retries (capped exponential backoff with
//! full jitter, `Retry-After` honoured) on 429, 5xx, timeouts and connection errors, bounded by
//! a number of attempts and a total waiting time. 4xx request errors are never retried.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rand::Rng;
use serde_json::Value;
use tokio::sync::OnceCell;

use crate::openai::{ChatChunk, ChatRequest, ChatResponse, ErrorBody, ModelList};
use crate::{BoxFut, ChatMessage, ClientError, LlmClient, OnDelta, Result, Scores, UsageMeter};

#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Attempts per request, the first included.
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// Total time spent waiting between attempts; a retry that would exceed it is not made.
    pub max_total_wait: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 6,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(16),
            max_total_wait: Duration::from_secs(120),
        }
    }
}

impl RetryPolicy {
    /// The wait before attempt `attempt + 1` (full jitter: uniform in [0, min(cap, base·2^k)]),
    /// or at least what the server asked for.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let cap = self
            .base_delay
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max_delay);
        let jitter = Duration::from_secs_f64(rand::rng().random::<f64>() * cap.as_secs_f64());
        match retry_after {
            Some(r) => r.max(jitter),
            None => jitter,
        }
    }
}

pub struct HttpClient {
    base: String,
    model: Option<String>,
    key: Option<String>,
    http: reqwest::Client,
    pub policy: RetryPolicy,
    timeout: Duration,
    usage: Arc<UsageMeter>,
    /// Whether the server is `rudder serve` (exact continuation scores through the extension).
    rudder: OnceCell<(bool, String)>,
}

fn parse_retry_after(h: Option<&reqwest::header::HeaderValue>) -> Option<Duration> {
    let s = h?.to_str().ok()?.trim();
    s.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
        .map(|v| Duration::from_secs_f64(v.min(3600.0)))
}

impl HttpClient {
    pub fn new(
        base: &str,
        model: Option<String>,
        key: Option<String>,
        policy: RetryPolicy,
        timeout: Duration,
        usage: Arc<UsageMeter>,
    ) -> Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .build()
            .map_err(|e| ClientError::Local(format!("HTTP client: {e}")))?;
        Ok(HttpClient {
            base: base.trim_end_matches('/').to_string(),
            model,
            key,
            http,
            policy,
            timeout,
            usage,
            rudder: OnceCell::new(),
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}/{}", self.base, path.trim_start_matches('/'))
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut r = self.http.request(method, self.url(path));
        if let Some(k) = &self.key {
            r = r.bearer_auth(k);
        }
        r
    }

    /// One attempt: send, and turn an error status into [`ClientError::Api`].
    async fn attempt(&self, path: &str, body: &Value) -> Result<reqwest::Response> {
        let send = self.request(reqwest::Method::POST, path).json(body).send();
        let resp = match tokio::time::timeout(self.timeout, send).await {
            Err(_) => return Err(ClientError::Timeout(self.timeout)),
            Ok(Err(e)) if e.is_timeout() => return Err(ClientError::Timeout(self.timeout)),
            Ok(Err(e)) => return Err(ClientError::Connect(error_chain(&e))),
            Ok(Ok(r)) => r,
        };
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let retry_after = parse_retry_after(resp.headers().get(reqwest::header::RETRY_AFTER));
        let text = match tokio::time::timeout(self.timeout, resp.text()).await {
            Ok(Ok(t)) => t,
            _ => String::new(),
        };
        let message = serde_json::from_str::<ErrorBody>(&text)
            .map(|e| e.error.message)
            .unwrap_or_else(|_| text.chars().take(300).collect());
        Err(ClientError::Api {
            status: status.as_u16(),
            message,
            retry_after,
        })
    }

    /// Run `f` with retries under the policy.
    async fn with_retries<T, F, Fut>(&self, mut f: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut waited = Duration::ZERO;
        let mut attempt = 0u32;
        loop {
            let err = match f().await {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            attempt += 1;
            if !err.retryable() {
                return Err(err);
            }
            let retry_after = match &err {
                ClientError::Api { retry_after, .. } => *retry_after,
                _ => None,
            };
            let d = self.policy.delay(attempt - 1, retry_after);
            if attempt >= self.policy.max_attempts || waited + d > self.policy.max_total_wait {
                return Err(ClientError::GaveUp {
                    attempts: attempt,
                    waited,
                    last: Box::new(err),
                });
            }
            self.usage.retries.fetch_add(1, Ordering::Relaxed);
            tracing::debug!("retrying after {err} (attempt {attempt}, waiting {d:?})");
            tokio::time::sleep(d).await;
            waited += d;
        }
    }

    async fn post_json(&self, path: &str, body: &Value) -> Result<Value> {
        self.with_retries(|| async {
            let resp = self.attempt(path, body).await?;
            let text = match tokio::time::timeout(self.timeout, resp.text()).await {
                Err(_) => return Err(ClientError::Timeout(self.timeout)),
                Ok(Err(e)) => return Err(ClientError::Connect(error_chain(&e))),
                Ok(Ok(t)) => t,
            };
            serde_json::from_str(&text).map_err(|e| {
                ClientError::Protocol(format!(
                    "not JSON ({e}): {}",
                    text.chars().take(200).collect::<String>()
                ))
            })
        })
        .await
    }

    /// The server's models: `(is rudder serve, first model id)`.
    async fn server_facts(&self) -> (bool, String) {
        self.rudder
            .get_or_init(|| async {
                let r = self
                    .with_retries(|| async {
                        let send = self.request(reqwest::Method::GET, "models").send();
                        match tokio::time::timeout(self.timeout, send).await {
                            Err(_) => Err(ClientError::Timeout(self.timeout)),
                            Ok(Err(e)) => Err(ClientError::Connect(error_chain(&e))),
                            Ok(Ok(r)) if r.status().is_success() => r
                                .json::<ModelList>()
                                .await
                                .map_err(|e| ClientError::Protocol(e.to_string())),
                            Ok(Ok(r)) => Err(ClientError::Api {
                                status: r.status().as_u16(),
                                message: "GET /models failed".into(),
                                retry_after: None,
                            }),
                        }
                    })
                    .await;
                match r {
                    Ok(l) => (
                        l.data.iter().any(|m| m.owned_by == "rudder"),
                        l.data.first().map(|m| m.id.clone()).unwrap_or_default(),
                    ),
                    Err(_) => (false, String::new()),
                }
            })
            .await
            .clone()
    }

    async fn model_for(&self, req_model: &str) -> String {
        if !req_model.is_empty() {
            return req_model.to_string();
        }
        if let Some(m) = &self.model {
            return m.clone();
        }
        self.server_facts().await.1
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

impl LlmClient for HttpClient {
    fn chat<'a>(&'a self, mut req: ChatRequest) -> BoxFut<'a, Result<ChatResponse>> {
        Box::pin(async move {
            req.model = self.model_for(&req.model).await;
            req.stream = None;
            req.stream_options = None;
            let body = serde_json::to_value(&req).unwrap_or_default();
            let v = self.post_json("chat/completions", &body).await?;
            serde_json::from_value(v)
                .map_err(|e| ClientError::Protocol(format!("not a chat completion: {e}")))
        })
    }

    fn chat_stream<'a>(
        &'a self,
        mut req: ChatRequest,
        mut on_delta: OnDelta<'a>,
    ) -> BoxFut<'a, Result<ChatResponse>> {
        Box::pin(async move {
            req.model = self.model_for(&req.model).await;
            req.stream = Some(true);
            req.stream_options = Some(crate::openai::StreamOptions {
                include_usage: true,
            });
            let body = serde_json::to_value(&req).unwrap_or_default();
            // retried only until the first text arrives
            let mut resp = self
                .with_retries(|| self.attempt("chat/completions", &body))
                .await?;
            let mut buf: Vec<u8> = Vec::new();
            let mut text = String::new();
            let mut last: Option<ChatChunk> = None;
            let mut usage = None;
            let mut finish = None;
            loop {
                let chunk = match tokio::time::timeout(self.timeout, resp.chunk()).await {
                    Err(_) => return Err(ClientError::Timeout(self.timeout)),
                    Ok(Err(e)) => return Err(ClientError::Connect(error_chain(&e))),
                    Ok(Ok(None)) => break,
                    Ok(Ok(Some(c))) => c,
                };
                buf.extend_from_slice(&chunk);
                while let Some(end) = find_event_end(&buf) {
                    let event: Vec<u8> = buf.drain(..end).collect();
                    let event = String::from_utf8_lossy(&event);
                    for line in event.lines() {
                        let Some(data) = line.strip_prefix("data:") else {
                            continue;
                        };
                        let data = data.trim();
                        if data == "[DONE]" {
                            continue;
                        }
                        let c: ChatChunk = serde_json::from_str(data).map_err(|e| {
                            ClientError::Protocol(format!("bad stream event ({e}): {data}"))
                        })?;
                        if let Some(u) = c.usage {
                            usage = Some(u);
                        }
                        for ch in c.choices.iter().filter(|c| c.index == 0) {
                            if let Some(t) = &ch.delta.content
                                && !t.is_empty()
                            {
                                on_delta(t);
                                text.push_str(t);
                            }
                            if ch.finish_reason.is_some() {
                                finish = ch.finish_reason.clone();
                            }
                        }
                        last = Some(c);
                    }
                }
            }
            let last =
                last.ok_or_else(|| ClientError::Protocol("the event stream was empty".into()))?;
            Ok(ChatResponse {
                id: last.id,
                object: "chat.completion".into(),
                created: last.created,
                model: last.model,
                choices: vec![crate::openai::ChatChoice {
                    index: 0,
                    message: crate::openai::AssistantMessage {
                        role: "assistant".into(),
                        content: Some(text),
                    },
                    finish_reason: finish,
                    logprobs: None,
                }],
                usage,
                system_fingerprint: last.system_fingerprint,
                rudder: last.rudder,
            })
        })
    }

    fn continuation_logprobs<'a>(
        &'a self,
        model: &'a str,
        messages: Vec<ChatMessage>,
        continuations: Vec<String>,
    ) -> BoxFut<'a, Result<Scores>> {
        Box::pin(async move {
            let (is_rudder, _) = self.server_facts().await;
            let mut req = ChatRequest::new(model, messages);
            req.max_tokens = Some(1);
            req.temperature = Some(0.0);
            if is_rudder {
                req.rudder = Some(crate::openai::RudderRequest {
                    score_continuations: Some(continuations.clone()),
                    ..Default::default()
                });
                let r = self.chat(req).await?;
                let usage = r.usage;
                let lp = r
                    .rudder
                    .and_then(|x| x.continuation_logprobs)
                    .ok_or_else(|| {
                        ClientError::Protocol(
                            "rudder serve returned no continuation_logprobs".into(),
                        )
                    })?;
                return Ok(Scores {
                    logprobs: lp,
                    exact: true,
                    usage,
                });
            }
            // any other server: the first token's top alternatives
            req.logprobs = Some(true);
            req.top_logprobs = Some(20);
            let r = self.chat(req).await?;
            let top = r
                .choices
                .first()
                .and_then(|c| c.logprobs.as_ref())
                .and_then(|l| l.content.as_ref())
                .and_then(|c| c.first())
                .map(|t| t.top_logprobs.clone())
                .ok_or_else(|| {
                    ClientError::Unsupported(
                        "the server returned no logprobs (it may not support them)".into(),
                    )
                })?;
            Ok(Scores {
                logprobs: first_token_scores(&top, &continuations),
                exact: false,
                usage: r.usage,
            })
        })
    }

    fn describe(&self) -> String {
        format!(
            "{} ({})",
            self.base,
            self.model.as_deref().unwrap_or("server's model")
        )
    }

    fn default_model(&self) -> String {
        self.model.clone().unwrap_or_default()
    }
}

/// Score continuations by the best top-logprob entry that starts them (or that they start,
/// for a one-token answer); −∞ when none does.
pub fn first_token_scores(top: &[crate::openai::TopLogprob], conts: &[String]) -> Vec<f64> {
    conts
        .iter()
        .map(|c| {
            let c = c.trim_start();
            top.iter()
                .filter(|t| {
                    let tok = t.token.trim_start();
                    !tok.is_empty() && (c.starts_with(tok) || tok.starts_with(c))
                })
                .map(|t| t.logprob as f64)
                .fold(f64::NEG_INFINITY, f64::max)
        })
        .collect()
}

/// End (exclusive) of the first complete server-sent event (`\n\n` or `\r\n\r\n`).
fn find_event_end(buf: &[u8]) -> Option<usize> {
    let a = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    let b = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped_and_honours_retry_after() {
        let p = RetryPolicy::default();
        for k in 0..20 {
            let d = p.delay(k, None);
            assert!(d <= p.max_delay);
        }
        assert!(p.delay(0, Some(Duration::from_secs(3))) >= Duration::from_secs(3));
    }

    #[test]
    fn event_boundaries_and_first_token_scores() {
        assert_eq!(find_event_end(b"data: x\n\ndata: y"), Some(9));
        assert_eq!(find_event_end(b"data: x\r\n\r\n"), Some(11));
        assert_eq!(find_event_end(b"data: x\n"), None);
        let top = vec![
            crate::openai::TopLogprob {
                token: "Yes".into(),
                logprob: -0.2,
                bytes: None,
            },
            crate::openai::TopLogprob {
                token: " No".into(),
                logprob: -1.9,
                bytes: None,
            },
        ];
        let s = first_token_scores(&top, &["Yes".into(), "No".into(), "Maybe".into()]);
        assert_eq!(s[0], -0.2f32 as f64);
        assert_eq!(s[1], -1.9f32 as f64);
        assert!(s[2].is_infinite());
    }
}
