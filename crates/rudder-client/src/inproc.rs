//! The in-process backend: OpenAI requests turned into jobs of rudder-lm's continuous-batching
//! [`Engine`], and the engine's events turned back into OpenAI responses. `rudder serve` uses
//! exactly these conversions, so the server and the in-process client answer alike.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use rudder_lm::chat::Message;
use rudder_lm::constrain::{JsonConstraint, JsonGrammar, TokenTrie};
use rudder_lm::engine::{
    CaptureSpec, Engine, EngineConfig, Event, Job, Outcome, SubmitError, Ticket, TokenEvent,
};
use rudder_lm::generate::{Finish, GenConfig};
use rudder_lm::hooks::{Edit, Interventions};
use rudder_lm::loader::{LanguageModel, LoadOptions, load};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::openai::{
    AssistantMessage, ChatChoice, ChatMessage, ChatRequest, ChatResponse, ChoiceLogprobs,
    CompletionRequest, Prompt, ResponseFormat, RudderRequest, RudderResponse, Stop, TokenLogprob,
    TopLogprob, Usage, now_secs,
};
use crate::{BoxFut, ClientError, LlmClient, OnDelta, Result, Scores};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InProcessConfig {
    pub engine: EngineConfig,
    /// New tokens when a request sets no limit (bounded by the context).
    pub default_max_tokens: u32,
    /// The most new tokens a request may ask for.
    pub max_tokens_cap: u32,
    /// The most choices (`n`) per request.
    pub max_n: u32,
}

impl Default for InProcessConfig {
    fn default() -> Self {
        InProcessConfig {
            engine: EngineConfig::default(),
            default_max_tokens: 512,
            max_tokens_cap: 4096,
            max_n: 8,
        }
    }
}

/// An error with the HTTP status and the request field it concerns.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub kind: &'static str,
    pub message: String,
    pub param: Option<String>,
    /// Seconds, for 429.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn bad(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            status: 400,
            kind: "invalid_request_error",
            message: message.into(),
            param: (!param.is_empty()).then(|| param.to_string()),
            retry_after: None,
        }
    }
    pub fn internal(message: impl Into<String>) -> Self {
        ApiError {
            status: 500,
            kind: "server_error",
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }
    fn submit(e: SubmitError) -> Self {
        match e {
            SubmitError::Busy { queued, limit } => ApiError {
                status: 429,
                kind: "rate_limit_error",
                message: format!(
                    "the server is busy: {queued} requests are waiting (limit {limit}); retry later"
                ),
                param: None,
                retry_after: Some(1),
            },
            SubmitError::Invalid(e) => ApiError::bad("messages", e.to_string()),
            SubmitError::Closed => ApiError {
                status: 503,
                kind: "server_error",
                message: "the server is shutting down".into(),
                param: None,
                retry_after: Some(5),
            },
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.param {
            Some(p) => write!(f, "{} (field {p})", self.message),
            None => write!(f, "{}", self.message),
        }
    }
}

impl From<ApiError> for ClientError {
    fn from(e: ApiError) -> Self {
        ClientError::Api {
            status: e.status,
            message: e.to_string(),
            retry_after: e.retry_after.map(std::time::Duration::from_secs),
        }
    }
}

/// A request turned into engine jobs.
pub struct Prepared {
    pub id: String,
    pub model: String,
    pub created: u64,
    pub prompt: Vec<u32>,
    pub jobs: Vec<Job>,
    /// Alternatives per token, when log-probabilities were asked for.
    pub logprobs: Option<usize>,
    /// What rudder's extension applied (for the response).
    pub applied: Option<Value>,
    /// Continuations to score (token ids).
    pub score: Option<Vec<Vec<u32>>>,
    pub wants_capture: bool,
}

/// The events of a request's jobs as they come (tagged with the choice index); dropping it
/// cancels what is still running.
pub struct Running {
    rx: mpsc::UnboundedReceiver<(u32, Event)>,
    _tickets: Vec<Ticket>,
}

impl Running {
    pub async fn next(&mut self) -> Option<(u32, Event)> {
        self.rx.recv().await
    }
}

/// What the events of one choice add up to.
#[derive(Default)]
pub struct ChoiceAcc {
    pub logprobs: Vec<TokenLogprob>,
    pub outcome: Option<Box<Outcome>>,
    pub failed: Option<String>,
}

pub fn finish_reason(f: Finish) -> &'static str {
    match f {
        Finish::Eos | Finish::Stop => "stop",
        Finish::Length => "length",
    }
}

pub struct InProcess {
    pub engine: Arc<Engine>,
    pub name: String,
    pub cfg: InProcessConfig,
    trie: OnceLock<Arc<TokenTrie>>,
    steering: HashMap<String, Interventions>,
    seeds: AtomicU64,
    ids: AtomicU64,
}

fn sampling_checks(
    temperature: Option<f32>,
    top_p: Option<f32>,
) -> std::result::Result<(), ApiError> {
    if let Some(t) = temperature
        && !(0.0..=2.0).contains(&t)
    {
        return Err(ApiError::bad(
            "temperature",
            format!("{t} is not in [0, 2]"),
        ));
    }
    if let Some(p) = top_p
        && !(p > 0.0 && p <= 1.0)
    {
        return Err(ApiError::bad("top_p", format!("{p} is not in (0, 1]")));
    }
    Ok(())
}

impl InProcess {
    /// Load a model (a fetched asset name, a `.gguf` file or a model folder) and start its
    /// engine.
    pub fn load(model: &str, cfg: InProcessConfig) -> Result<Self> {
        let path = rudder_data::assets::resolve_model(model)
            .map_err(|e| ClientError::Local(e.to_string()))?;
        let lm = load(&path, &LoadOptions::default())
            .map_err(|e| ClientError::Local(format!("loading {}: {e}", path.display())))?;
        Ok(Self::new(lm, model_name(model, &path), cfg))
    }

    pub fn new(lm: LanguageModel, name: String, cfg: InProcessConfig) -> Self {
        let engine = Arc::new(Engine::start(Arc::new(lm), cfg.engine.clone()));
        InProcess {
            engine,
            name,
            cfg,
            trie: OnceLock::new(),
            steering: HashMap::new(),
            seeds: AtomicU64::new(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1),
            ),
            ids: AtomicU64::new(0),
        }
    }

    /// Named steering files that requests may select with `"rudder": {"steer": NAME}`.
    pub fn with_steering(mut self, steering: HashMap<String, Interventions>) -> Self {
        self.steering = steering;
        self
    }

    pub fn steering_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.steering.keys().cloned().collect();
        v.sort();
        v
    }

    pub fn lm(&self) -> &LanguageModel {
        &self.engine.lm
    }

    fn trie(&self) -> Arc<TokenTrie> {
        self.trie
            .get_or_init(|| Arc::new(TokenTrie::new(self.lm().tok.token_bytes())))
            .clone()
    }

    fn next_id(&self, prefix: &str) -> String {
        format!(
            "{prefix}-{:x}{:06x}",
            now_secs(),
            self.ids.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Token ids of a conversation through the model's chat template, with the assistant's
    /// turn opened.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> std::result::Result<Vec<u32>, ApiError> {
        if messages.is_empty() {
            return Err(ApiError::bad("messages", "messages is empty"));
        }
        let lm = self.lm();
        let tpl = lm.chat.as_ref().ok_or_else(|| {
            ApiError::bad(
                "messages",
                format!(
                    "model {} has no chat template; use /v1/completions with a raw prompt",
                    self.name
                ),
            )
        })?;
        let msgs: Vec<Message> = messages
            .iter()
            .map(|m| Message::new(&m.role, &m.content))
            .collect();
        let text = tpl
            .render(&msgs, true)
            .map_err(|e| ApiError::bad("messages", e.to_string()))?;
        lm.tok
            .encode(&text, false)
            .map_err(|e| ApiError::internal(e.to_string()))
    }

    #[allow(clippy::too_many_arguments)]
    fn gen_config(
        &self,
        prompt_len: usize,
        max_tokens: Option<u32>,
        param: &str,
        temperature: Option<f32>,
        top_p: Option<f32>,
        top_k: Option<u32>,
        repetition_penalty: Option<f32>,
        seed: Option<u64>,
        stop: Option<&Stop>,
    ) -> std::result::Result<GenConfig, ApiError> {
        sampling_checks(temperature, top_p)?;
        let ctx = self.lm().decoder.cfg.max_position_embeddings;
        if prompt_len >= ctx {
            return Err(ApiError::bad(
                "messages",
                format!(
                    "the prompt is {prompt_len} tokens; the context window is {ctx} tokens, which leaves no room to generate"
                ),
            ));
        }
        let room = ctx - prompt_len;
        let max_new = match max_tokens {
            Some(0) => return Err(ApiError::bad(param, "must be at least 1")),
            Some(m) if m > self.cfg.max_tokens_cap => {
                return Err(ApiError::bad(
                    param,
                    format!(
                        "{m} exceeds this server's limit of {} new tokens",
                        self.cfg.max_tokens_cap
                    ),
                ));
            }
            Some(m) if m as usize > room => {
                return Err(ApiError::bad(
                    param,
                    format!(
                        "the prompt is {prompt_len} tokens and {m} new tokens were asked for, but the context window is {ctx} tokens"
                    ),
                ));
            }
            Some(m) => m as usize,
            None => (self.cfg.default_max_tokens as usize).min(room),
        };
        let stop = stop.map(|s| s.list()).unwrap_or_default();
        if stop.len() > 16 || stop.iter().any(|s| s.is_empty()) {
            return Err(ApiError::bad("stop", "at most 16 non-empty stop strings"));
        }
        if let Some(r) = repetition_penalty
            && !(r > 0.0 && r.is_finite())
        {
            return Err(ApiError::bad("repetition_penalty", "must be positive"));
        }
        Ok(GenConfig {
            max_new_tokens: max_new,
            temperature: temperature.unwrap_or(1.0),
            top_k: top_k.unwrap_or(0) as usize,
            top_p: top_p.unwrap_or(1.0),
            repetition_penalty: repetition_penalty.unwrap_or(1.0),
            seed: seed.unwrap_or_else(|| {
                self.seeds
                    .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            }),
            stop,
            ignore_eos: false,
        })
    }

    /// rudder's extension: the interventions to apply and a summary of them.
    fn resolve_extension(
        &self,
        ext: Option<&RudderRequest>,
    ) -> std::result::Result<(Option<Interventions>, Option<CaptureSpec>, Option<Value>), ApiError>
    {
        let Some(ext) = ext else {
            return Ok((None, None, None));
        };
        let mut list = Vec::new();
        let mut summary = serde_json::Map::new();
        if let Some(name) = &ext.steer {
            let base = self.steering.get(name).ok_or_else(|| {
                ApiError::bad(
                    "rudder.steer",
                    format!(
                        "no steering file named {name:?} was loaded (loaded: {})",
                        if self.steering.is_empty() {
                            "none; start the server with --steer NAME=FILE".to_string()
                        } else {
                            self.steering_names().join(", ")
                        }
                    ),
                )
            })?;
            let s = ext.strength.unwrap_or(1.0);
            if !s.is_finite() {
                return Err(ApiError::bad("rudder.strength", "must be a finite number"));
            }
            for iv in &base.interventions {
                let mut iv = iv.clone();
                iv.alpha *= s;
                list.push(iv);
            }
            summary.insert("steer".into(), json!(name));
            summary.insert("strength".into(), json!(s));
        } else if ext.strength.is_some() {
            return Err(ApiError::bad(
                "rudder.strength",
                "strength needs a named steering file (rudder.steer)",
            ));
        }
        if let Some(v) = &ext.interventions {
            let v = if v.is_array() {
                v.clone()
            } else {
                v.get("interventions").cloned().unwrap_or(v.clone())
            };
            let ivs: Vec<rudder_lm::hooks::Intervention> =
                serde_json::from_value(v).map_err(|e| {
                    ApiError::bad(
                        "rudder.interventions",
                        format!("not an intervention list: {e}"),
                    )
                })?;
            list.extend(ivs);
        }
        let c = &self.lm().decoder.cfg;
        let ivs = Interventions::new(list);
        ivs.validate(c.num_layers, c.hidden_size)
            .map_err(|e| ApiError::bad("rudder.interventions", e.to_string()))?;
        if !ivs.is_empty() {
            summary.insert(
                "interventions".into(),
                Value::Array(
                    ivs.interventions
                        .iter()
                        .map(|iv| {
                            json!({
                                "site": iv.site.to_string(),
                                "kind": match iv.edit {
                                    Edit::AddVector { .. } => "add_vector",
                                    Edit::MatrixAdd { .. } => "matrix_add",
                                    Edit::ProjectOut { .. } => "project_out",
                                    Edit::GatedAdd { .. } => "gated_add",
                                },
                                "alpha": iv.alpha,
                                "positions": iv.positions,
                                "phases": iv.phases,
                            })
                        })
                        .collect(),
                ),
            );
        }
        let capture = match &ext.capture {
            None => None,
            Some(v) => {
                let spec: CaptureSpec = serde_json::from_value(v.clone()).map_err(|e| {
                    ApiError::bad(
                        "rudder.capture",
                        format!("expected {{\"sites\": [...], \"positions\": \"last\"}}: {e}"),
                    )
                })?;
                for s in &spec.sites {
                    s.check(c.num_layers)
                        .map_err(|e| ApiError::bad("rudder.capture", e.to_string()))?;
                }
                summary.insert(
                    "capture".into(),
                    json!(spec.sites.iter().map(|s| s.to_string()).collect::<Vec<_>>()),
                );
                Some(spec)
            }
        };
        let ivs = (!ivs.is_empty()).then_some(ivs);
        let applied = (!summary.is_empty()).then_some(Value::Object(summary));
        Ok((ivs, capture, applied))
    }

    fn constraint(
        &self,
        rf: Option<&ResponseFormat>,
    ) -> std::result::Result<Option<Arc<JsonGrammar>>, ApiError> {
        Ok(match rf {
            None | Some(ResponseFormat::Text) => None,
            Some(ResponseFormat::JsonObject) => Some(Arc::new(JsonGrammar::any_object())),
            Some(ResponseFormat::JsonSchema { json_schema }) => Some(Arc::new(
                JsonGrammar::from_schema(&json_schema.schema).map_err(|e| {
                    ApiError::bad("response_format.json_schema.schema", e.to_string())
                })?,
            )),
        })
    }

    fn make_jobs(
        &self,
        prompt: &[u32],
        n: u32,
        config: GenConfig,
        ivs: Option<Interventions>,
        capture: Option<CaptureSpec>,
        logprobs: Option<usize>,
        grammar: Option<Arc<JsonGrammar>>,
    ) -> Vec<Job> {
        (0..n)
            .map(|i| {
                let mut j = Job::new(prompt.to_vec(), config.clone());
                j.stream_index = i as u64;
                j.interventions = ivs.clone();
                j.capture = if i == 0 { capture.clone() } else { None };
                j.logprobs = logprobs;
                j.constraint = grammar.as_ref().map(|g| {
                    Box::new(JsonConstraint::new(
                        g.clone(),
                        self.trie(),
                        self.lm().tok.eos.clone(),
                    )) as Box<dyn rudder_lm::constrain::TokenConstraint>
                });
                j
            })
            .collect()
    }

    fn check_n(&self, n: Option<u32>) -> std::result::Result<u32, ApiError> {
        let n = n.unwrap_or(1);
        if n == 0 || n > self.cfg.max_n {
            return Err(ApiError::bad(
                "n",
                format!("{n} is not in 1..={}", self.cfg.max_n),
            ));
        }
        Ok(n)
    }

    pub fn prepare_chat(&self, req: &ChatRequest) -> std::result::Result<Prepared, ApiError> {
        let prompt = self.render_chat(&req.messages)?;
        let n = self.check_n(req.n)?;
        if req.frequency_penalty.is_some_and(|v| v != 0.0)
            || req.presence_penalty.is_some_and(|v| v != 0.0)
        {
            return Err(ApiError::bad(
                if req.frequency_penalty.is_some_and(|v| v != 0.0) {
                    "frequency_penalty"
                } else {
                    "presence_penalty"
                },
                "frequency and presence penalties are not supported; use repetition_penalty",
            ));
        }
        let param = if req.max_completion_tokens.is_some() {
            "max_completion_tokens"
        } else {
            "max_tokens"
        };
        let config = self.gen_config(
            prompt.len(),
            req.token_limit(),
            param,
            req.temperature,
            req.top_p,
            req.top_k,
            req.repetition_penalty,
            req.seed,
            req.stop.as_ref(),
        )?;
        let logprobs = match (req.logprobs.unwrap_or(false), req.top_logprobs) {
            (false, Some(k)) if k > 0 => {
                return Err(ApiError::bad("top_logprobs", "needs \"logprobs\": true"));
            }
            (_, Some(k)) if k > 20 => {
                return Err(ApiError::bad(
                    "top_logprobs",
                    format!("{k} is not in 0..=20"),
                ));
            }
            (true, k) => Some(k.unwrap_or(0) as usize),
            (false, _) => None,
        };
        let (ivs, capture, applied) = self.resolve_extension(req.rudder.as_ref())?;
        let grammar = self.constraint(req.response_format.as_ref())?;
        let score = match req
            .rudder
            .as_ref()
            .and_then(|r| r.score_continuations.as_ref())
        {
            None => None,
            Some(conts) => Some(
                conts
                    .iter()
                    .enumerate()
                    .map(|(i, c)| {
                        let ids = self
                            .lm()
                            .tok
                            .encode(c, false)
                            .map_err(|e| ApiError::internal(e.to_string()))?;
                        if ids.is_empty() {
                            return Err(ApiError::bad(
                                "rudder.score_continuations",
                                format!("continuation {i} is empty"),
                            ));
                        }
                        Ok(ids)
                    })
                    .collect::<std::result::Result<Vec<_>, _>>()?,
            ),
        };
        let jobs = self.make_jobs(&prompt, n, config, ivs, capture.clone(), logprobs, grammar);
        Ok(Prepared {
            id: self.next_id("chatcmpl"),
            model: self.name.clone(),
            created: now_secs(),
            prompt,
            jobs,
            logprobs,
            applied,
            score,
            wants_capture: capture.is_some(),
        })
    }

    /// One `Prepared` per prompt of a legacy completion request.
    pub fn prepare_completion(
        &self,
        req: &CompletionRequest,
    ) -> std::result::Result<Vec<Prepared>, ApiError> {
        let texts = match &req.prompt {
            Prompt::One(s) => vec![s.clone()],
            Prompt::Many(v) if !v.is_empty() && v.len() <= 64 => v.clone(),
            Prompt::Many(_) => return Err(ApiError::bad("prompt", "give 1 to 64 prompts")),
        };
        let n = self.check_n(req.n)?;
        if let Some(k) = req.logprobs
            && k > 5
        {
            return Err(ApiError::bad("logprobs", format!("{k} is not in 0..=5")));
        }
        let (ivs, capture, applied) = self.resolve_extension(req.rudder.as_ref())?;
        let mut out = Vec::new();
        let created = now_secs();
        let id = self.next_id("cmpl");
        for (i, t) in texts.iter().enumerate() {
            if t.is_empty() {
                return Err(ApiError::bad("prompt", format!("prompt {i} is empty")));
            }
            let prompt = self
                .lm()
                .tok
                .encode(t, true)
                .map_err(|e| ApiError::internal(e.to_string()))?;
            let config = self.gen_config(
                prompt.len(),
                req.max_tokens.or(Some(16)),
                "max_tokens",
                req.temperature,
                req.top_p,
                req.top_k,
                req.repetition_penalty,
                req.seed,
                req.stop.as_ref(),
            )?;
            let logprobs = req.logprobs.map(|k| k as usize);
            let jobs = self.make_jobs(
                &prompt,
                n,
                config,
                ivs.clone(),
                capture.clone(),
                logprobs,
                None,
            );
            out.push(Prepared {
                id: id.clone(),
                model: self.name.clone(),
                created,
                prompt,
                jobs,
                logprobs,
                applied: applied.clone(),
                score: None,
                wants_capture: capture.is_some(),
            });
        }
        Ok(out)
    }

    /// Submit jobs; their events arrive on the returned [`Running`] tagged with `base + i`.
    pub fn start(&self, jobs: Vec<Job>, base: u32) -> std::result::Result<Running, ApiError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let group = jobs
            .into_iter()
            .enumerate()
            .map(|(i, j)| {
                let tx = tx.clone();
                let idx = base + i as u32;
                let sink: rudder_lm::engine::Sink = Box::new(move |e| tx.send((idx, e)).is_ok());
                (j, sink)
            })
            .collect();
        // one group: a request's choices are admitted (and prefilled) together
        let tickets = self
            .engine
            .submit_all(group)
            .map_err(ApiError::submit)?
            .into_iter()
            .map(|t| t.cancel_on_drop())
            .collect();
        Ok(Running {
            rx,
            _tickets: tickets,
        })
    }

    /// The token and bytes of a token id, for log-probabilities.
    pub fn token_logprob(&self, id: u32, logprob: f32, top: &[(u32, f32)]) -> TokenLogprob {
        let (token, bytes) = self.token_text(id);
        TokenLogprob {
            token,
            logprob,
            bytes,
            top_logprobs: top
                .iter()
                .map(|&(t, lp)| {
                    let (token, bytes) = self.token_text(t);
                    TopLogprob {
                        token,
                        logprob: lp,
                        bytes,
                    }
                })
                .collect(),
        }
    }

    pub fn token_text(&self, id: u32) -> (String, Option<Vec<u8>>) {
        let bytes = self.trie().bytes.get(id as usize).cloned().flatten();
        let token = match &bytes {
            Some(b) => String::from_utf8_lossy(b).into_owned(),
            None => self.lm().tok.decode(&[id], false).unwrap_or_default(),
        };
        (token, bytes)
    }

    /// Fold one event into its choice's accumulator.
    pub fn accumulate(&self, acc: &mut ChoiceAcc, ev: Event, logprobs: bool) {
        match ev {
            Event::Token(t) => {
                if logprobs && let Some(lp) = t.logprob {
                    acc.logprobs.push(self.token_logprob(t.id, lp, &t.top));
                }
            }
            Event::Done(o) => acc.outcome = Some(o),
            Event::Failed(m) => acc.failed = Some(m),
        }
    }

    /// ln p(continuation | prompt) of each continuation (exact; on the engine thread).
    pub async fn score_tokens(
        &self,
        prompt: &[u32],
        conts: &[Vec<u32>],
    ) -> std::result::Result<Vec<f64>, ApiError> {
        let pairs: Vec<(Vec<u32>, Vec<u32>)> =
            conts.iter().map(|c| (prompt.to_vec(), c.clone())).collect();
        let ctx = self.lm().decoder.cfg.max_position_embeddings;
        if let Some((i, _)) = pairs
            .iter()
            .enumerate()
            .find(|(_, (p, c))| p.len() + c.len() > ctx)
        {
            return Err(ApiError::bad(
                "rudder.score_continuations",
                format!("prompt + continuation {i} exceed the context window of {ctx} tokens"),
            ));
        }
        let engine = self.engine.clone();
        let r = tokio::task::spawn_blocking(move || engine.score(pairs, None))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?;
        Ok(r.map_err(ApiError::submit)?
            .into_iter()
            .map(|s| s.sum_logprob)
            .collect())
    }

    /// A whole (non-streaming) chat completion.
    pub async fn chat_response(
        &self,
        req: &ChatRequest,
    ) -> std::result::Result<ChatResponse, ApiError> {
        let mut p = self.prepare_chat(req)?;
        let scores = match &p.score {
            Some(conts) => Some(self.score_tokens(&p.prompt, conts).await?),
            None => None,
        };
        let accs = self.run_choices(&mut p, &mut |_| {}).await?;
        self.chat_from(&p, accs, scores)
    }

    /// Run a prepared request's jobs to their ends; the first choice's text goes to
    /// `on_text` as it is produced.
    pub async fn run_choices(
        &self,
        p: &mut Prepared,
        on_text: &mut (dyn FnMut(&str) + Send),
    ) -> std::result::Result<Vec<ChoiceAcc>, ApiError> {
        let jobs = std::mem::take(&mut p.jobs);
        let n = jobs.len();
        let mut run = self.start(jobs, 0)?;
        let mut accs: Vec<ChoiceAcc> = (0..n).map(|_| ChoiceAcc::default()).collect();
        let mut left = n;
        while left > 0 {
            let Some((i, ev)) = run.next().await else {
                return Err(ApiError::internal("the engine stopped"));
            };
            match &ev {
                Event::Token(TokenEvent { text, .. }) if i == 0 && !text.is_empty() => {
                    on_text(text)
                }
                Event::Done(o) if i == 0 && !o.tail.is_empty() => on_text(&o.tail),
                _ => {}
            }
            let end = !matches!(ev, Event::Token(_));
            self.accumulate(&mut accs[i as usize], ev, p.logprobs.is_some());
            if end {
                left -= 1;
            }
        }
        Ok(accs)
    }

    /// Assemble a chat completion from the choices' accumulators.
    pub fn chat_from(
        &self,
        p: &Prepared,
        accs: Vec<ChoiceAcc>,
        scores: Option<Vec<f64>>,
    ) -> std::result::Result<ChatResponse, ApiError> {
        let mut choices = Vec::new();
        let mut completion = 0u64;
        let mut capture = None;
        for (i, acc) in accs.into_iter().enumerate() {
            if let Some(m) = acc.failed {
                return Err(ApiError::internal(m));
            }
            let mut o = acc
                .outcome
                .ok_or_else(|| ApiError::internal("a choice ended without an outcome"))?;
            completion += o.tokens.len() as u64;
            if i == 0 {
                capture = o.capture.take().map(|c| capture_json(&c));
            }
            choices.push(ChatChoice {
                index: i as u32,
                message: AssistantMessage {
                    role: "assistant".into(),
                    content: Some(o.text.clone()),
                },
                finish_reason: Some(finish_reason(o.finish).into()),
                logprobs: p.logprobs.map(|_| ChoiceLogprobs {
                    content: Some(acc.logprobs),
                }),
            });
        }
        Ok(ChatResponse {
            id: p.id.clone(),
            object: "chat.completion".into(),
            created: p.created,
            model: p.model.clone(),
            choices,
            usage: Some(Usage::new(p.prompt.len() as u64, completion)),
            system_fingerprint: Some(fingerprint(self.lm())),
            rudder: rudder_response(p, capture, scores),
        })
    }
}

/// The response extension, present only when the request used rudder's extension.
pub fn rudder_response(
    p: &Prepared,
    capture: Option<Value>,
    scores: Option<Vec<f64>>,
) -> Option<RudderResponse> {
    if p.applied.is_none() && capture.is_none() && scores.is_none() && !p.wants_capture {
        return None;
    }
    Some(RudderResponse {
        applied: p.applied.clone(),
        capture,
        continuation_logprobs: scores,
    })
}

/// `{"rows": [{prompt, position}], "sites": {name: [[...]]}}`.
pub fn capture_json(c: &rudder_lm::hooks::Capture) -> Value {
    let mut sites = serde_json::Map::new();
    for &s in c.sites() {
        if let Ok(t) = c.get(s)
            && let Ok(v) = t.to_vec2::<f32>()
        {
            sites.insert(s.to_string(), json!(v));
        }
    }
    json!({"rows": c.rows(), "sites": sites})
}

/// Model identity for `system_fingerprint`: architecture, size and template hash.
pub fn fingerprint(lm: &LanguageModel) -> String {
    format!(
        "rudder-{}-{}-{}",
        env!("CARGO_PKG_VERSION"),
        lm.info.arch,
        lm.info
            .chat_template_hash
            .as_deref()
            .unwrap_or("notemplate")
    )
}

/// The model id to report: the asset name, or the file/folder name.
pub fn model_name(arg: &str, path: &Path) -> String {
    if !Path::new(arg).exists() {
        return arg.to_string();
    }
    path.file_stem()
        .or(path.file_name())
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| arg.to_string())
}

impl LlmClient for InProcess {
    fn chat<'a>(&'a self, req: ChatRequest) -> BoxFut<'a, Result<ChatResponse>> {
        Box::pin(async move { Ok(self.chat_response(&req).await?) })
    }

    fn chat_stream<'a>(
        &'a self,
        req: ChatRequest,
        mut on_delta: OnDelta<'a>,
    ) -> BoxFut<'a, Result<ChatResponse>> {
        Box::pin(async move {
            let mut p = self.prepare_chat(&req)?;
            let accs = self.run_choices(&mut p, &mut |t| on_delta(t)).await?;
            Ok(self.chat_from(&p, accs, None)?)
        })
    }

    fn continuation_logprobs<'a>(
        &'a self,
        _model: &'a str,
        messages: Vec<ChatMessage>,
        continuations: Vec<String>,
    ) -> BoxFut<'a, Result<Scores>> {
        Box::pin(async move {
            let prompt = self.render_chat(&messages)?;
            let conts = continuations
                .iter()
                .map(|c| {
                    self.lm()
                        .tok
                        .encode(c, false)
                        .map_err(|e| ClientError::Local(e.to_string()))
                })
                .collect::<Result<Vec<_>>>()?;
            if conts.iter().any(|c| c.is_empty()) {
                return Err(ClientError::Local("an empty continuation".into()));
            }
            let read = (prompt.len() + conts.iter().map(Vec::len).sum::<usize>()) as u64;
            Ok(Scores {
                logprobs: self.score_tokens(&prompt, &conts).await?,
                exact: true,
                usage: Some(crate::openai::Usage {
                    prompt_tokens: read,
                    completion_tokens: 0,
                    total_tokens: read,
                }),
            })
        })
    }

    fn describe(&self) -> String {
        format!("in-process {}", self.name)
    }

    fn default_model(&self) -> String {
        self.name.clone()
    }
}
