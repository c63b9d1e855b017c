//! One agent's conversation with the language model, shared by every simulator and benchmark
//! of this crate: chat completions and log-probability scoring through the client layer, each
//! journaled (and answered from the journal when an interrupted run resumes, after checking the
//! request is the one recorded), a per-call seed derived from (run seed, scope, agent, call),
//! token accounting, bounded re-asks of unreadable replies, and the transcript of the exchanges.
//! [`run_all`] runs many such agents concurrently with per-agent failure isolation.

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use rudder_client::{ChatMessage, ChatRequest, LlmClient};

use crate::journal::Journal;
use crate::{AgentError, Result};

/// The settings every call of a run uses.
#[derive(Clone, Copy, Debug)]
pub struct CallSettings<'a> {
    /// Model name sent with every request.
    pub model: &'a str,
    pub seed: u64,
    pub temperature: f32,
    pub max_tokens: u32,
    /// Extra attempts for a reply that cannot be read.
    pub retries: u32,
    /// Agents (or tasks) in flight at once.
    pub concurrency: usize,
}

/// What a call context needs from the run it belongs to.
pub trait CallEnv: Sync {
    fn client(&self) -> &dyn LlmClient;
    fn journal(&self) -> &Journal;
    fn settings(&self) -> CallSettings<'_>;
    /// Called when an agent finishes (tokens spent, whether it failed).
    fn agent_done(&self, _agent: u32, _tokens: u64, _failed: bool) {}
}

/// Calls, tokens and reading failures of one agent.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentUsage {
    pub calls: u64,
    /// Calls answered from the journal of an interrupted run.
    pub from_journal: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Extra attempts after unreadable replies.
    pub retries: u64,
    /// Replies still unreadable after the last attempt.
    pub unparsed: u64,
}

/// One exchange, for the transcript.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Exchange {
    pub seq: u32,
    pub kind: String,
    pub messages: Vec<ChatMessage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub continuations: Option<Vec<String>>,
    pub reply: Value,
}

/// One agent's calls within a scope (a round, a task set…).
pub struct Ctx<'e, E: ?Sized> {
    pub env: &'e E,
    pub scope: String,
    pub agent: u32,
    pub seq: u32,
    pub usage: AgentUsage,
    pub exchanges: Vec<Exchange>,
}

/// A short content hash (hex of the first 16 bytes of SHA-256).
pub fn sha(v: &Value) -> String {
    let d = Sha256::digest(v.to_string().as_bytes());
    d.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

impl<'e, E: CallEnv + ?Sized> Ctx<'e, E> {
    pub fn new(env: &'e E, scope: &str, agent: u32) -> Self {
        Ctx {
            env,
            scope: scope.to_string(),
            agent,
            seq: 0,
            usage: AgentUsage::default(),
            exchanges: Vec::new(),
        }
    }

    fn call_seed(&self, seq: u32) -> u64 {
        let scope: Vec<u64> = self.scope.bytes().map(u64::from).collect();
        let h = rudder_data::rng::hash_keys(self.env.settings().seed, &scope);
        rudder_data::rng::hash_keys(h, &[self.agent as u64, seq as u64]) >> 1
    }

    /// The journal's answer for the next call, after checking it was asked the same request.
    fn recorded(&mut self, seq: u32, hash: &str) -> Result<Option<Value>> {
        let key = (self.scope.clone(), self.agent, seq);
        match self.env.journal().call(&key) {
            Some((line, rec)) => {
                if rec["hash"].as_str() != Some(hash) {
                    return Err(AgentError::Journal {
                        path: self.env.journal().path().display().to_string(),
                        line: *line,
                        reason: format!(
                            "agent {} call {seq} ({}): the recorded request differs from this run's (the data, prompts or settings changed since); start a new --out",
                            self.agent, self.scope
                        ),
                    });
                }
                self.usage.from_journal += 1;
                Ok(Some(rec.clone()))
            }
            None => Ok(None),
        }
    }

    fn account(&mut self, rec: &Value) {
        self.usage.calls += 1;
        self.usage.prompt_tokens += rec["usage"]["prompt"].as_u64().unwrap_or(0);
        self.usage.completion_tokens += rec["usage"]["completion"].as_u64().unwrap_or(0);
    }

    /// One chat completion of at most `max_tokens` at the run's temperature.
    pub async fn chat(
        &mut self,
        kind: &str,
        messages: Vec<ChatMessage>,
        max_tokens: u32,
    ) -> Result<String> {
        let t = self.env.settings().temperature;
        self.chat_at(kind, messages, max_tokens, t).await
    }

    /// One chat completion at a given temperature (samples of one question differ through the
    /// per-call seed).
    pub async fn chat_at(
        &mut self,
        kind: &str,
        messages: Vec<ChatMessage>,
        max_tokens: u32,
        temperature: f32,
    ) -> Result<String> {
        let seq = self.seq;
        self.seq += 1;
        let req = ChatRequest {
            model: self.env.settings().model.to_string(),
            messages: messages.clone(),
            max_tokens: Some(max_tokens),
            temperature: Some(temperature),
            seed: Some(self.call_seed(seq)),
            ..Default::default()
        };
        let hash = sha(&serde_json::to_value(&req).unwrap_or_default());
        let rec = match self.recorded(seq, &hash)? {
            Some(r) => r,
            None => {
                let r = self.env.client().chat(req).await?;
                let u = r.usage.unwrap_or_default();
                let rec = json!({
                    "t": "llm", "scope": self.scope, "agent": self.agent, "seq": seq,
                    "kind": kind, "hash": hash, "messages": messages, "reply": r.text(),
                    "usage": {"prompt": u.prompt_tokens, "completion": u.completion_tokens},
                });
                self.env.journal().append(&rec)?;
                rec
            }
        };
        self.account(&rec);
        let text = rec["reply"].as_str().unwrap_or("").to_string();
        self.exchanges.push(Exchange {
            seq,
            kind: kind.into(),
            messages,
            continuations: None,
            reply: text.clone().into(),
        });
        Ok(text)
    }

    /// ln p(continuation | messages) of each continuation (−∞ where the backend gives none),
    /// journaled as one call.
    pub async fn score(
        &mut self,
        kind: &str,
        messages: Vec<ChatMessage>,
        continuations: Vec<String>,
    ) -> Result<Vec<f64>> {
        let seq = self.seq;
        self.seq += 1;
        let key = json!({"model": self.env.settings().model, "messages": messages, "continuations": continuations});
        let hash = sha(&key);
        let rec = match self.recorded(seq, &hash)? {
            Some(r) => r,
            None => {
                let client = self.env.client();
                let s = client
                    .continuation_logprobs(
                        self.env.settings().model,
                        messages.clone(),
                        continuations.clone(),
                    )
                    .await?;
                if !s.exact {
                    return Err(AgentError::Input(format!(
                        "log-probability decisions need exact log-probabilities of whole answers; {} offers only its first token's alternatives (use the in-process model or `rudder serve`, or text decisions)",
                        client.describe()
                    )));
                }
                if s.logprobs.len() != continuations.len() {
                    return Err(AgentError::Client(rudder_client::ClientError::Protocol(
                        format!(
                            "{} log-probabilities for {} continuations",
                            s.logprobs.len(),
                            continuations.len()
                        ),
                    )));
                }
                let lp: Vec<Value> = s
                    .logprobs
                    .iter()
                    .map(|&x| if x.is_finite() { json!(x) } else { Value::Null })
                    .collect();
                let rec = json!({
                    "t": "llm", "scope": self.scope, "agent": self.agent, "seq": seq,
                    "kind": kind, "hash": hash, "messages": messages,
                    "continuations": continuations, "reply": lp,
                    "usage": {
                        "prompt": s.usage.map_or(0, |u| u.prompt_tokens),
                        "completion": s.usage.map_or(0, |u| u.completion_tokens),
                    },
                });
                self.env.journal().append(&rec)?;
                rec
            }
        };
        self.account(&rec);
        let lp: Vec<f64> = rec["reply"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|v| v.as_f64().unwrap_or(f64::NEG_INFINITY))
                    .collect()
            })
            .unwrap_or_default();
        self.exchanges.push(Exchange {
            seq,
            kind: kind.into(),
            messages,
            continuations: Some(continuations),
            reply: rec["reply"].clone(),
        });
        Ok(lp)
    }

    /// Ask until `read` accepts the reply, at most 1 + retries times; the last reading is
    /// returned with whether it was accepted, the reply and the attempts made.
    pub async fn ask<T>(
        &mut self,
        kind: &str,
        messages: Vec<ChatMessage>,
        read: impl Fn(&str) -> (T, bool),
    ) -> Result<(T, bool, String, u32)> {
        let max_tokens = self.env.settings().max_tokens;
        self.ask_with(kind, messages, max_tokens, read).await
    }

    /// [`Ctx::ask`] with a token cap.
    pub async fn ask_with<T>(
        &mut self,
        kind: &str,
        messages: Vec<ChatMessage>,
        max_tokens: u32,
        read: impl Fn(&str) -> (T, bool),
    ) -> Result<(T, bool, String, u32)> {
        let mut attempt = 0;
        loop {
            let text = self.chat(kind, messages.clone(), max_tokens).await?;
            let (v, ok) = read(&text);
            attempt += 1;
            if ok || attempt > self.env.settings().retries {
                if !ok {
                    self.usage.unparsed += 1;
                }
                return Ok((v, ok, text, attempt));
            }
            self.usage.retries += 1;
        }
    }
}

/// Tokens an agent's result spent (for the progress display).
pub trait Spent {
    fn tokens(&self) -> u64;
}

/// Run `f(k)` for the agents `ids[k]` concurrently (at most `env.settings().concurrency` at once);
/// results in id order. A failing agent is isolated: its error is journaled (step `failed`)
/// and returned beside the others. A journal or file error stops the run (resuming cannot be
/// trusted past it).
pub async fn run_all<E, F, Fut, T>(
    env: &E,
    scope: &str,
    ids: &[u32],
    f: F,
) -> Result<(Vec<T>, Vec<(u32, String)>)>
where
    E: CallEnv + ?Sized,
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
    T: Spent,
{
    let conc = env.settings().concurrency.max(1);
    let mut res: Vec<(usize, Result<T>)> = futures_util::stream::iter(0..ids.len())
        .map(|k| {
            let fut = f(k);
            async move {
                let r = fut.await;
                env.agent_done(
                    ids[k],
                    r.as_ref().map(Spent::tokens).unwrap_or(0),
                    r.is_err(),
                );
                (k, r)
            }
        })
        .buffer_unordered(conc)
        .collect()
        .await;
    res.sort_by_key(|x| x.0);
    let mut ok = Vec::with_capacity(res.len());
    let mut failed = Vec::new();
    for (k, r) in res {
        match r {
            Ok(v) => ok.push(v),
            Err(e @ (AgentError::Journal { .. } | AgentError::Io { .. })) => return Err(e),
            Err(e) => {
                let e = e.to_string();
                env.journal()
                    .step(scope, ids[k], "failed", json!({"error": e}))?;
                failed.push((ids[k], e));
            }
        }
    }
    Ok((ok, failed))
}
