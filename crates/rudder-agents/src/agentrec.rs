//! AgentRecBench: recommenders rank the 20 candidates of each task, scored by HR@1/3/5 and
//! NDCG@5. Classical recommenders (identity order, random, popularity, MF, LightGCN trained by
//! rudder-cf on exactly what every task may see) and language-model agents built from the
//! framework's modules (reasoning: IO, CoT, CoT-SC, self-refine, step-back; memory; the
//! baseline's fixed plan user → items → reviews; the Agent4Rec page reaction as a ranker; the
//! challenge winners' selective design). Every agent reads the world only through the task's
//! [`Tool`] (visibility enforced there), every exchange goes through the client layer and the
//! journal (resume replays it), and every ranking is validated and repaired into a permutation
//! of the candidates, the repairs counted. A task that fails or exceeds its time limit is scored
//! as a miss and reported.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use rudder_client::{ChatMessage, LlmClient};
use rudder_data::Dataset;

use crate::agent4rec::{Decisions, Progress};
use crate::calls::{CallEnv, CallSettings, Ctx, Spent, run_all};
use crate::journal::Journal;
use crate::memory::Embedder;
use crate::parse::{self, Repairs};
use crate::store::{ReviewRef, Store};
use crate::tasks::{Loaded, TaskSet, Visibility};
use crate::tool::{ReviewsOf, Tool, as_text};
use crate::{AgentError, Result};

/// Goes into every journal header: a resumed run refuses a journal written with other prompts.
pub const PROMPTS_VERSION: &str = "agentrec-prompts-1";

/// The recommenders under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// The candidates in the order the task file gives them.
    Identity,
    /// A seeded shuffle.
    Random,
    /// Most visible reviews first.
    Pop,
    Mf,
    Lightgcn,
    /// AlphaRec (rudder-cf): LightGCN over a projection of the items' language embeddings (the
    /// titles encoded by a sentence encoder, MiniLM by default), InfoNCE.
    Alpharec,
    /// The reference baseline agent (user → items → reviews, one ranking call), its
    /// one-candidate bug fixed (`faithful` keeps it).
    Baseline,
    /// Baseline + chain-of-thought reasoning.
    Cot,
    /// CoT sampled several times, rankings combined by Borda count (`faithful`: majority of the
    /// exact replies, as the reference module votes).
    CotSc,
    /// CoT, then one self-refinement call.
    SelfRefine,
    /// A step-back principle first, then the task with it.
    StepBack,
    /// Baseline + memory: for each candidate the most similar of the user's visible reviews.
    Memory,
    CotMemory,
    /// Agent4Rec's page reaction over the 20 candidates (ALIGN yes first; with log-probability
    /// decisions, by p(yes) − p(no)).
    Agent4rec,
    /// The challenge winners' design: selected item and review fields per platform, the last
    /// 15 reviews with names, candidates removed from the history, token caps, "think step by
    /// step but output only the list", one repaired ranking call.
    Selective,
    /// The planning and tool-use modules: an LLM planner splits the task into subtasks (the
    /// reference's `{'description': …}` format), each subtask is carried out by an LLM-chosen
    /// tool call (`Action: tool, args End Action`) on the task's environment, and the ranking
    /// call reads what was gathered. Falls back to the baseline's fixed plan when no subtask
    /// can be read.
    Planner,
}

impl Method {
    pub const ALL: [Method; 16] = [
        Method::Identity,
        Method::Random,
        Method::Pop,
        Method::Mf,
        Method::Lightgcn,
        Method::Alpharec,
        Method::Baseline,
        Method::Cot,
        Method::CotSc,
        Method::SelfRefine,
        Method::StepBack,
        Method::Memory,
        Method::CotMemory,
        Method::Agent4rec,
        Method::Selective,
        Method::Planner,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Method::Identity => "identity",
            Method::Random => "random",
            Method::Pop => "pop",
            Method::Mf => "mf",
            Method::Lightgcn => "lightgcn",
            Method::Alpharec => "alpharec",
            Method::Baseline => "baseline",
            Method::Cot => "cot",
            Method::CotSc => "cot-sc",
            Method::SelfRefine => "self-refine",
            Method::StepBack => "step-back",
            Method::Memory => "memory",
            Method::CotMemory => "cot-memory",
            Method::Agent4rec => "agent4rec",
            Method::Selective => "selective",
            Method::Planner => "planner",
        }
    }

    /// Asks a language model.
    pub fn is_llm(self) -> bool {
        !matches!(
            self,
            Method::Identity
                | Method::Random
                | Method::Pop
                | Method::Mf
                | Method::Lightgcn
                | Method::Alpharec
        )
    }

    fn cot(self) -> bool {
        matches!(
            self,
            Method::Cot | Method::CotSc | Method::SelfRefine | Method::CotMemory
        )
    }

    fn memory(self) -> bool {
        matches!(self, Method::Memory | Method::CotMemory)
    }

    /// Reads its final answer from one scored call under `--decisions logprob`.
    pub fn supports_logprob(self) -> bool {
        matches!(
            self,
            Method::Baseline | Method::Memory | Method::Selective | Method::Agent4rec
        )
    }
}

impl std::str::FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Method::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown agent `{s}` ({})",
                    Method::ALL.map(Method::name).join(", ")
                )
            })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BenchConfig {
    pub method: Method,
    pub seed: u64,
    pub model: String,
    /// The reference's agents ask at 0.1.
    pub temperature: f32,
    pub max_tokens: u32,
    /// Extra attempts when a reply names no candidate at all.
    pub retries: u32,
    pub concurrency: usize,
    /// A task that runs longer is scored as a miss (the reference: 300 s).
    pub task_timeout_s: f64,
    pub decisions: Decisions,
    /// The reference's behaviour: the baseline's one-candidate bug, CoT-SC's exact-string vote.
    pub faithful: bool,
    /// Cap of the user's history in the prompt (tokens, estimated as characters / 4; the
    /// reference caps at 12,000, which exceeds small models' context).
    pub history_tokens: usize,
    /// Cap of the whole prompt (same estimate).
    pub prompt_tokens: usize,
    /// Show the candidates in a seeded shuffle (the reference's example tasks put the answer
    /// near the front of the list).
    pub shuffle: bool,
    pub sc_samples: usize,
    pub sc_temperature: f32,
    /// Reviews the selective design keeps.
    pub selective_reviews: usize,
    /// For tasks without visibility (the published ones): hide the user's reviews of every
    /// candidate, as third-party agents do against the released data's leakage.
    pub hide_candidates: bool,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            method: Method::Baseline,
            seed: 2025,
            model: String::new(),
            temperature: 0.1,
            max_tokens: 400,
            retries: 1,
            concurrency: 4,
            task_timeout_s: 300.0,
            decisions: Decisions::Text,
            faithful: false,
            history_tokens: 1500,
            prompt_tokens: 6000,
            shuffle: true,
            sc_samples: 5,
            sc_temperature: 0.7,
            selective_reviews: 15,
            hide_candidates: true,
        }
    }
}

/// One task's outcome.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub index: usize,
    pub user: String,
    pub truth: String,
    /// The candidates in the order the agent saw them.
    pub presented: Vec<String>,
    pub ranking: Vec<String>,
    /// 1-based rank of the ground truth (`None`: not ranked, a failed task).
    pub truth_rank: Option<usize>,
    pub repairs: Repairs,
    /// The final reply named no candidate at all (after retries).
    pub unreadable: bool,
    pub calls: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub llm_seconds: f64,
    pub env_seconds: f64,
    pub env_calls: u64,
    pub wall_seconds: f64,
    pub unknown_user: bool,
    pub unknown_candidates: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Spent for TaskRecord {
    fn tokens(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }
}

impl TaskRecord {
    pub fn hit(&self, k: usize) -> bool {
        self.truth_rank.is_some_and(|r| r <= k)
    }
    pub fn ndcg5(&self) -> f64 {
        match self.truth_rank {
            Some(r) if r <= 5 => 1.0 / ((r + 1) as f64).log2(),
            _ => 0.0,
        }
    }
}

/// A run's numbers.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BenchMetrics {
    pub method: String,
    pub tasks: usize,
    pub hr1: f64,
    pub hr3: f64,
    pub hr5: f64,
    /// (HR@1 + HR@3 + HR@5) / 3, the challenge's `average_hit_rate`.
    pub mean_hr: f64,
    pub ndcg5: f64,
    /// Tasks scored as misses because they failed or timed out.
    pub failed: usize,
    pub repaired_tasks: usize,
    pub repairs: Repairs,
    pub unreadable: usize,
    pub calls: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub wall_seconds: f64,
    pub tasks_per_minute: f64,
    /// Of the tasks' own time: waiting for the language model, and reading the environment.
    pub llm_share: f64,
    pub env_share: f64,
    pub unknown_users: usize,
    pub unknown_candidates: u64,
    /// Mean 1-based position of the ground truth in the presented order.
    pub mean_presented_position: f64,
}

pub fn metrics(method: &str, recs: &[TaskRecord], wall_seconds: f64) -> BenchMetrics {
    let n = recs.len().max(1) as f64;
    let frac = |k| recs.iter().filter(|r| r.hit(k)).count() as f64 / n;
    let mut m = BenchMetrics {
        method: method.into(),
        tasks: recs.len(),
        hr1: frac(1),
        hr3: frac(3),
        hr5: frac(5),
        ndcg5: recs.iter().map(TaskRecord::ndcg5).sum::<f64>() / n,
        failed: recs.iter().filter(|r| r.error.is_some()).count(),
        repaired_tasks: recs.iter().filter(|r| r.repairs.any()).count(),
        unreadable: recs.iter().filter(|r| r.unreadable).count(),
        calls: recs.iter().map(|r| r.calls).sum(),
        prompt_tokens: recs.iter().map(|r| r.prompt_tokens).sum(),
        completion_tokens: recs.iter().map(|r| r.completion_tokens).sum(),
        wall_seconds,
        tasks_per_minute: recs.len() as f64 / (wall_seconds / 60.0).max(1e-9),
        unknown_users: recs.iter().filter(|r| r.unknown_user).count(),
        unknown_candidates: recs.iter().map(|r| r.unknown_candidates as u64).sum(),
        ..Default::default()
    };
    m.mean_hr = (m.hr1 + m.hr3 + m.hr5) / 3.0;
    for r in recs {
        m.repairs.add(&r.repairs);
    }
    let own: f64 = recs.iter().map(|r| r.wall_seconds).sum::<f64>().max(1e-9);
    m.llm_share = recs.iter().map(|r| r.llm_seconds).sum::<f64>() / own;
    m.env_share = recs.iter().map(|r| r.env_seconds).sum::<f64>() / own;
    let pos: Vec<f64> = recs
        .iter()
        .filter_map(|r| r.presented.iter().position(|c| *c == r.truth))
        .map(|p| (p + 1) as f64)
        .collect();
    m.mean_presented_position = pos.iter().sum::<f64>() / pos.len().max(1) as f64;
    m
}

/// The visibility a task runs under: its own, or for a published task without one, the user's
/// reviews of the candidates hidden (when `hide_candidates`).
pub fn visibility_of(t: &Loaded, hide_candidates: bool) -> Visibility {
    match &t.task.visibility {
        Some(v) => v.clone(),
        None if hide_candidates => Visibility {
            exclude_items: t.task.candidate_list.clone(),
            ..Default::default()
        },
        None => Visibility::default(),
    }
}

/// The order the agent sees the candidates in (positions into `candidate_list`).
fn presented_order(t: &Loaded, cfg: &BenchConfig) -> Vec<usize> {
    let n = t.task.candidate_list.len();
    let mut order: Vec<usize> = (0..n).collect();
    if cfg.shuffle {
        let mut rng = rudder_data::rng::stream(cfg.seed, &[0x5A0F, t.index as u64]);
        order.shuffle(&mut rng);
    }
    order
}

/// A seeded order for appending what a reply left out.
fn fill_order(n: usize, seed: u64, index: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    let mut rng = rudder_data::rng::stream(seed, &[0xF111, index as u64]);
    v.shuffle(&mut rng);
    v
}

/// Rank by descending score, ties in the seeded fill order.
fn rank_by_scores(scores: &[f64], fill: &[usize]) -> Vec<usize> {
    let mut tie = vec![0usize; scores.len()];
    for (r, &k) in fill.iter().enumerate() {
        if k < tie.len() {
            tie[k] = r;
        }
    }
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| {
        let (x, y) = (scores[a], scores[b]);
        let x = if x.is_nan() { f64::NEG_INFINITY } else { x };
        let y = if y.is_nan() { f64::NEG_INFINITY } else { y };
        y.total_cmp(&x).then(tie[a].cmp(&tie[b]))
    });
    idx
}

fn finish_record(t: &Loaded, presented: &[usize], ranking: &[usize]) -> TaskRecord {
    let c = &t.task.candidate_list;
    let ranking: Vec<String> = ranking.iter().map(|&k| c[k].clone()).collect();
    TaskRecord {
        index: t.index,
        user: t.task.user_id.clone(),
        truth: t.truth.clone(),
        presented: presented.iter().map(|&k| c[k].clone()).collect(),
        truth_rank: ranking.iter().position(|x| *x == t.truth).map(|p| p + 1),
        ranking,
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Classical recommenders

/// A CF model trained on what the tasks may see, with its id maps.
pub struct CfModel {
    pub name: String,
    pub data: Dataset,
    pub scorer: rudder_cf::scorer::EmbeddingScorer,
    pub report_epochs: usize,
    pub best_valid: Option<f64>,
    /// The training loss (`bpr`, or `infonce` for AlphaRec).
    pub loss: &'static str,
}

/// The interactions every task may see: reviews before the earliest cut-off, and for each
/// task's user only what the task shows (its window, without its hidden items). Items and
/// users keep the store's ids.
pub fn visible_training_data(
    store: &Store,
    set: &TaskSet,
    hide_candidates: bool,
) -> Result<Dataset> {
    let all = store.interactions()?;
    let before = set
        .tasks
        .iter()
        .filter_map(|t| t.task.visibility.as_ref().and_then(|v| v.before))
        .min();
    let mut per_user: HashMap<&str, Vec<Visibility>> = HashMap::new();
    for t in &set.tasks {
        per_user
            .entry(t.task.user_id.as_str())
            .or_default()
            .push(visibility_of(t, hide_candidates));
    }
    let kept = all.interactions.filter(|it| {
        if let Some(b) = before
            && it.timestamp.is_none_or(|t| t >= b)
        {
            return false;
        }
        let u = all.users.ext(it.user);
        match per_user.get(u) {
            None => true,
            Some(vs) => vs.iter().all(|v| {
                let item = all.items.ext(it.item);
                !v.exclude_items.iter().any(|x| x == item)
                    && v.history_since
                        .is_none_or(|s| it.timestamp.is_some_and(|t| t >= s))
            }),
        }
    });
    Ok(all.with_interactions(kept))
}

/// Train MF or LightGCN (BPR) on the visible data: each user's latest visible interaction is
/// the validation set that picks the epoch, the rest is the training set.
pub fn train_cf(
    data: Dataset,
    method: Method,
    epochs: usize,
    seed: u64,
    obs: &mut dyn rudder_cf::trainer::TrainObserver,
) -> Result<CfModel> {
    train_cf_with(
        data,
        method,
        epochs,
        seed,
        &rudder_cf::model::ModelInputs::default(),
        obs,
    )
}

/// The items' titles from the store (title, name, else the id) on the dataset's item table,
/// for encoders.
pub fn with_titles(store: &Store, mut data: Dataset) -> Result<Dataset> {
    let titles = (0..data.n_items() as u32)
        .map(|i| store.item_name(data.items.ext(i)))
        .collect::<Result<Vec<String>>>()?;
    data.item_table.title = Some(titles);
    Ok(data)
}

/// [`train_cf`] with model inputs (AlphaRec's item language features, one row per item of
/// `data`).
pub fn train_cf_with(
    data: Dataset,
    method: Method,
    epochs: usize,
    seed: u64,
    inputs: &rudder_cf::model::ModelInputs,
    obs: &mut dyn rudder_cf::trainer::TrainObserver,
) -> Result<CfModel> {
    use rudder_cf::{CfConfig, LossConfig, ModelKind};
    let kind = match method {
        Method::Mf => ModelKind::Mf,
        Method::Lightgcn => ModelKind::Lightgcn,
        Method::Alpharec => ModelKind::Alpharec,
        _ => {
            return Err(AgentError::Input(format!(
                "{} is not a CF model",
                method.name()
            )));
        }
    };
    let inter = &data.interactions;
    let mut valid_list = Vec::new();
    let mut train_list = Vec::new();
    for u in 0..inter.n_users() as u32 {
        let its: Vec<_> = inter.iter_user(u).collect();
        let last = its
            .iter()
            .enumerate()
            .max_by_key(|(_, it)| (it.timestamp.unwrap_or(i64::MIN), it.item))
            .map(|(k, _)| k);
        for (k, it) in its.iter().enumerate() {
            if its.len() >= 3 && Some(k) == last {
                valid_list.push(*it);
            } else {
                train_list.push(*it);
            }
        }
    }
    let (nu, ni) = (inter.n_users(), inter.n_items());
    let split = rudder_data::Split {
        train: rudder_data::Interactions::from_interactions(nu, ni, &train_list),
        valid: rudder_data::Interactions::from_interactions(nu, ni, &valid_list),
        test: rudder_data::Interactions::empty(nu, ni),
        extra_tests: Vec::new(),
    };
    let mut cfg = match kind {
        // the paper's settings (InfoNCE, τ = 0.15, 256 negatives, two layers)
        ModelKind::Alpharec => rudder_cf::presets::preset("alpharec")
            .ok_or_else(|| AgentError::Input("no alpharec preset".into()))?,
        _ => CfConfig::new(kind, LossConfig::Bpr { reg: 1e-4 }),
    };
    cfg.epochs = epochs.max(1);
    cfg.eval_every = 5.min(cfg.epochs);
    cfg.patience = 4;
    cfg.ks = vec![20];
    cfg.seed = seed;
    cfg.batch_size = 4096;
    let report = rudder_cf::trainer::train_with(&cfg, &split, inputs, obs)?;
    let best_valid = report.best_valid.as_ref().map(|r| r.get("ndcg", 20));
    Ok(CfModel {
        name: method.name().into(),
        scorer: report.scorer()?,
        report_epochs: report.history.len(),
        best_valid,
        loss: cfg.loss.name(),
        data,
    })
}

/// Rank every task with a classical recommender (no language model).
pub fn run_classical(
    store: &Store,
    set: &TaskSet,
    cfg: &BenchConfig,
    cf: Option<&CfModel>,
) -> Result<Vec<TaskRecord>> {
    use rudder_data::eval::Scorer;
    let mut out = Vec::with_capacity(set.tasks.len());
    for t in &set.tasks {
        let start = Instant::now();
        let vis = visibility_of(t, cfg.hide_candidates);
        let tool = Tool::new(store, &t.task.user_id, vis);
        let c = &t.task.candidate_list;
        let n = c.len();
        let presented: Vec<usize> = (0..n).collect();
        let fill = fill_order(n, cfg.seed, t.index);
        let ranking = match cfg.method {
            Method::Identity => presented.clone(),
            Method::Random => fill.clone(),
            Method::Pop => {
                let mut s = Vec::with_capacity(n);
                for id in c {
                    s.push(tool.item_popularity(id)? as f64);
                }
                rank_by_scores(&s, &fill)
            }
            Method::Mf | Method::Lightgcn | Method::Alpharec => {
                let m = cf.ok_or_else(|| AgentError::Input("no CF model given".into()))?;
                let ni = m.data.n_items();
                let mut s = vec![f64::NEG_INFINITY; n];
                if let Some(u) = m.data.users.get(&t.task.user_id) {
                    let mut row = vec![0f32; ni];
                    m.scorer.score_users(&[u], ni, &mut row);
                    for (k, id) in c.iter().enumerate() {
                        if let Some(i) = m.data.items.get(id) {
                            s[k] = row[i as usize] as f64;
                        }
                    }
                }
                rank_by_scores(&s, &fill)
            }
            other => {
                return Err(AgentError::Input(format!(
                    "{} asks a language model",
                    other.name()
                )));
            }
        };
        let mut rec = finish_record(t, &presented, &ranking);
        rec.unknown_user = store.user(&t.task.user_id)?.is_none();
        rec.unknown_candidates = c
            .iter()
            .map(|id| store.item(id).map(|r| r.is_none() as u32))
            .sum::<Result<u32>>()?;
        rec.env_calls = tool.calls.load(std::sync::atomic::Ordering::Relaxed);
        rec.wall_seconds = start.elapsed().as_secs_f64();
        rec.env_seconds = rec.wall_seconds;
        out.push(rec);
    }
    Ok(out)
}

/// HR@1/3/5 of ranking every task's candidates by visible popularity (the baseline reported
/// beside every run and every task set).
pub fn popularity_order(store: &Store, set: &TaskSet, hide_candidates: bool) -> Result<[f64; 3]> {
    let cfg = BenchConfig {
        method: Method::Pop,
        hide_candidates,
        ..Default::default()
    };
    let m = metrics("pop", &run_classical(store, set, &cfg, None)?, 0.0);
    Ok([m.hr1, m.hr3, m.hr5])
}

// ---------------------------------------------------------------------------------------------
// Language-model agents

/// What every agent of a run shares.
pub struct BenchEnv<'a> {
    pub client: &'a dyn LlmClient,
    pub journal: &'a Journal,
    pub cfg: &'a BenchConfig,
    pub store: &'a Store,
    /// For the memory module (MiniLM or hashed words).
    pub embedder: Option<Arc<dyn Embedder>>,
    pub progress: &'a dyn Progress,
}

impl CallEnv for BenchEnv<'_> {
    fn client(&self) -> &dyn LlmClient {
        self.client
    }
    fn journal(&self) -> &Journal {
        self.journal
    }
    fn settings(&self) -> CallSettings<'_> {
        let c = self.cfg;
        CallSettings {
            model: &c.model,
            seed: c.seed,
            temperature: c.temperature,
            max_tokens: c.max_tokens,
            retries: c.retries,
            concurrency: c.concurrency,
        }
    }
    fn agent_done(&self, agent: u32, tokens: u64, failed: bool) {
        self.progress.agent_done(agent, tokens, failed)
    }
}

/// The journal header of a run (a resumed run must match it).
pub fn journal_header(cfg: &BenchConfig, tasks: &TaskSet, client: &str) -> Value {
    let ids: Vec<Value> = tasks
        .tasks
        .iter()
        .map(|t| json!([t.index, t.task.user_id, t.truth]))
        .collect();
    json!({
        "t": "header", "bench": "agentrec", "prompts": PROMPTS_VERSION,
        "config": cfg, "client": client,
        "tasks": crate::calls::sha(&Value::Array(ids)),
    })
}

fn cap(s: &str, tokens: usize) -> String {
    let max = tokens.saturating_mul(4);
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// The item keys the reference baseline keeps.
const BASELINE_KEYS: [&str; 11] = [
    "item_id",
    "name",
    "stars",
    "review_count",
    "attributes",
    "title",
    "average_rating",
    "rating_number",
    "description",
    "ratings_count",
    "title_without_series",
];

/// The winners' per-platform item fields (MovieLens: title, genres, year).
fn selected_item_keys(source: &str) -> &'static [&'static str] {
    match source {
        "yelp" => &["name", "stars", "review_count", "attributes", "categories"],
        "amazon" => &["title", "average_rating", "rating_number", "description"],
        "goodreads" => &[
            "title",
            "authors",
            "publication_year",
            "average_rating",
            "description",
            "similar_books",
        ],
        _ => &[
            "title",
            "name",
            "genres",
            "year",
            "description",
            "categories",
        ],
    }
}

fn pick(rec: &Value, keys: &[&str]) -> Value {
    let mut m = serde_json::Map::new();
    for k in keys {
        if let Some(v) = rec.get(*k)
            && !v.is_null()
        {
            let v = match v {
                Value::String(s) => Value::String(cap(s, 60)),
                Value::Array(a) if a.len() > 8 => Value::Array(a[..8].to_vec()),
                other => other.clone(),
            };
            m.insert((*k).to_string(), v);
        }
    }
    Value::Object(m)
}

fn item_display(rec: Option<&Value>, id: &str) -> String {
    rec.and_then(|r| {
        ["title", "name"]
            .iter()
            .find_map(|k| r.get(*k).and_then(Value::as_str).map(str::to_string))
    })
    .unwrap_or_else(|| id.to_string())
}

/// Everything an agent read about its task.
struct View {
    /// Candidates in presented order: (position in candidate_list, id, record).
    cands: Vec<(usize, String, Option<Value>)>,
    /// The user's visible reviews, oldest first.
    reviews: Vec<Value>,
    /// Visible history as (item, stars, time).
    history: Vec<ReviewRef>,
    user: Option<Value>,
    source: String,
}

impl View {
    fn ids(&self) -> Vec<String> {
        self.cands.iter().map(|c| c.1.clone()).collect()
    }
    fn names(&self) -> Vec<String> {
        self.cands
            .iter()
            .map(|c| item_display(c.2.as_ref(), &c.1))
            .collect()
    }
}

fn read_view(tool: &Tool<'_>, t: &Loaded, presented: &[usize]) -> Result<View> {
    let user = tool.get_user(&t.task.user_id)?;
    let mut cands = Vec::with_capacity(presented.len());
    let mut source = String::new();
    for &k in presented {
        let id = &t.task.candidate_list[k];
        let rec = tool.get_item(id)?;
        if source.is_empty()
            && let Some(s) = rec
                .as_ref()
                .and_then(|r| r.get("source"))
                .and_then(Value::as_str)
        {
            source = s.to_string();
        }
        cands.push((k, id.clone(), rec));
    }
    let reviews = tool.get_reviews(ReviewsOf::User(&t.task.user_id))?;
    let history = tool.history(&t.task.user_id)?;
    Ok(View {
        cands,
        reviews,
        history,
        user,
        source,
    })
}

fn list_format(ids: &[String]) -> String {
    let ex: Vec<String> = ids.iter().take(3).map(|s| format!("'{s}'")).collect();
    format!("[{}, ...]", ex.join(", "))
}

/// The baseline's prompt (the reference's wording, paraphrased; its fields and format kept).
fn baseline_prompt(v: &View, cfg: &BenchConfig, extra: &str, reasoning: &str) -> String {
    let ids = v.ids();
    let items: Vec<Value> = if cfg.faithful {
        // The reference appends after its loop: only the last candidate is described.
        v.cands
            .last()
            .and_then(|c| c.2.as_ref())
            .map(|r| vec![pick(r, &BASELINE_KEYS)])
            .unwrap_or_default()
    } else {
        v.cands
            .iter()
            .filter_map(|c| c.2.as_ref().map(|r| pick(r, &BASELINE_KEYS)))
            .collect()
    };
    let history = cap(
        &Value::Array(v.reviews.clone()).to_string(),
        cfg.history_tokens,
    );
    let p = format!(
        "You are a real user on an online platform. Your historical item reviews and stars are: {history}\n\n\
Now rank these {n} items by how well they match your preference, the most interesting first: {ids:?}\n\n\
The information of the {n} candidate items: {items}\n{extra}\n\
{reasoning}Output ONLY a ranked list of those item ids in the format {fmt}. DO NOT introduce any other item id.",
        n = ids.len(),
        items = Value::Array(items),
        fmt = list_format(&ids),
    );
    cap(&p, cfg.prompt_tokens)
}

/// One of the user's visible reviews with its item's display line (name and genres).
struct Past<'v> {
    item: &'v str,
    line: String,
    stars: f32,
}

/// The user's last `last` visible reviews outside `exclude`, oldest first.
fn named_history<'v>(
    v: &'v View,
    tool: &Tool<'_>,
    exclude: &[String],
    last: usize,
) -> Result<Vec<Past<'v>>> {
    let mut out = Vec::new();
    for r in v
        .history
        .iter()
        .rev()
        .filter(|r| !exclude.contains(&r.other))
        .take(last)
    {
        let rec = tool.get_item(&r.other)?;
        let mut line = item_display(rec.as_ref(), &r.other);
        if let Some(g) = rec
            .as_ref()
            .and_then(|x| x.get("genres"))
            .and_then(Value::as_array)
        {
            let g: Vec<&str> = g.iter().filter_map(Value::as_str).collect();
            if !g.is_empty() {
                line.push_str(&format!(" [{}]", g.join(", ")));
            }
        }
        out.push(Past {
            item: &r.other,
            line,
            stars: r.stars.unwrap_or(0.0),
        });
    }
    out.reverse();
    Ok(out)
}

/// The winners' selective prompt.
fn selective_prompt(v: &View, tool: &Tool<'_>, cfg: &BenchConfig) -> Result<String> {
    let ids = v.ids();
    let keys = selected_item_keys(&v.source);
    let hist = named_history(v, tool, &ids, cfg.selective_reviews)?;
    let text_of: HashMap<&str, String> = v
        .reviews
        .iter()
        .filter_map(|r| {
            let t = r.get("text").and_then(Value::as_str)?;
            (!t.trim().is_empty()).then(|| (r["item_id"].as_str().unwrap_or(""), cap(t.trim(), 50)))
        })
        .collect();
    let hist_lines: Vec<String> = hist
        .iter()
        .map(|h| match text_of.get(h.item) {
            Some(t) => format!("- {}: {} stars, \"{t}\"", h.line, h.stars),
            None => format!("- {}: {} stars", h.line, h.stars),
        })
        .collect();
    let profile = v
        .user
        .as_ref()
        .map(|u| {
            let mut u = u.clone();
            if let Some(o) = u.as_object_mut() {
                for k in ["user_id", "source", "friends", "_time"] {
                    o.remove(k);
                }
            }
            cap(&as_text(&u), 150)
        })
        .filter(|s| !s.is_empty())
        .map(|s| format!("User profile: {s}\n"))
        .unwrap_or_default();
    let cand_lines: Vec<String> = v
        .cands
        .iter()
        .map(|c| {
            let f =
                c.2.as_ref()
                    .map(|r| as_text(&pick(r, keys)))
                    .unwrap_or_default();
            format!(
                "- {}: {}",
                c.1,
                if f.is_empty() {
                    "(no information)".into()
                } else {
                    f
                }
            )
        })
        .collect();
    let p = format!(
        "You are a recommendation assistant. {profile}The user's most recent ratings (1-5 stars):\n{}\n\n\
Candidates (id: information):\n{}\n\n\
Think step by step about what the user likes, but output only the list: all {} candidate ids ranked from best to worst match, in the format {}.",
        cap(&hist_lines.join("\n"), cfg.history_tokens),
        cand_lines.join("\n"),
        ids.len(),
        list_format(&ids)
    );
    Ok(cap(&p, cfg.prompt_tokens))
}

/// For each candidate, the most similar of the user's visible reviews (the memory module).
fn memory_block(v: &View, tool: &Tool<'_>, emb: &dyn Embedder) -> Result<String> {
    let hist = named_history(v, tool, &v.ids(), 200)?;
    if hist.is_empty() {
        return Ok(String::new());
    }
    let htexts: Vec<&str> = hist.iter().map(|h| h.line.as_str()).collect();
    let hv = emb.embed(&htexts)?;
    let names = v.names();
    let cv = emb.embed(&names.iter().map(String::as_str).collect::<Vec<_>>())?;
    let mut lines = Vec::new();
    for (k, c) in cv.iter().enumerate() {
        let best = hv
            .iter()
            .enumerate()
            .map(|(j, h)| (j, h.iter().zip(c).map(|(a, b)| a * b).sum::<f32>()))
            .max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)));
        if let Some((j, _)) = best {
            lines.push(format!(
                "- for {} ({}): you rated {} {} stars",
                v.cands[k].1, names[k], hist[j].line, hist[j].stars
            ));
        }
    }
    Ok(format!(
        "Your most similar past experiences for each candidate:\n{}\n",
        lines.join("\n")
    ))
}

/// The Agent4Rec role-play messages over the candidates as one page.
fn agent4rec_messages(v: &View, tool: &Tool<'_>, cfg: &BenchConfig) -> Result<Vec<ChatMessage>> {
    let hist = named_history(v, tool, &v.ids(), 200)?;
    let mut liked: Vec<&str> = hist
        .iter()
        .filter(|h| h.stars >= 4.0)
        .map(|h| h.line.as_str())
        .collect();
    let mut disliked: Vec<&str> = hist
        .iter()
        .filter(|h| h.stars > 0.0 && h.stars <= 2.0)
        .map(|h| h.line.as_str())
        .collect();
    liked.reverse();
    disliked.reverse();
    liked.truncate(15);
    disliked.truncate(8);
    let mean = if hist.is_empty() {
        0.0
    } else {
        hist.iter().map(|h| h.stars as f64).sum::<f64>() / hist.len() as f64
    };
    let system = cap(
        &format!(
            "You excel at role-playing. Picture yourself as a user exploring a recommendation system. Your taste: you enjoyed {}; you disliked {}. On average you rate {:.1} out of 5.",
            if liked.is_empty() {
                "nothing recorded".into()
            } else {
                liked.join("; ")
            },
            if disliked.is_empty() {
                "nothing recorded".into()
            } else {
                disliked.join("; ")
            },
            mean
        ),
        cfg.history_tokens,
    );
    let names = v.names();
    let lines: Vec<String> = v
        .cands
        .iter()
        .zip(&names)
        .map(|(c, n)| {
            let r = c.2.as_ref();
            let g = r
                .and_then(|x| x.get("genres"))
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default();
            let pop = tool.item_popularity(&c.1).unwrap_or(0);
            crate::prompts::item_line(n, 0.0, &format!("{g}; {pop} ratings"))
        })
        .collect();
    Ok(vec![
        ChatMessage::system(&system),
        ChatMessage::user(&crate::prompts::reaction_user_text("1", &lines)),
    ])
}

/// Borda count over several rankings (positions into the candidates), ties in fill order.
pub fn borda(rankings: &[Vec<usize>], n: usize, fill: &[usize]) -> Vec<usize> {
    let mut score = vec![0f64; n];
    for r in rankings {
        for (pos, &k) in r.iter().enumerate() {
            if k < n {
                score[k] += (n - pos) as f64;
            }
        }
    }
    rank_by_scores(&score, fill)
}

/// Ask for a ranking; read it leniently (re-asking when it names no candidate); return the
/// read list and whether it was readable.
async fn ask_ranking(
    ctx: &mut Ctx<'_, BenchEnv<'_>>,
    kind: &str,
    messages: Vec<ChatMessage>,
    ids: &[String],
    names: &[String],
) -> Result<(Vec<Option<usize>>, bool, String)> {
    let (read, ok, text, _) = ctx
        .ask(kind, messages, |reply| {
            let r = parse::ranked_list(reply, ids, names);
            let ok = r.iter().any(Option::is_some);
            (r, ok)
        })
        .await?;
    Ok((read, ok, text))
}

/// One task of a language-model agent.
pub async fn run_task(env: &BenchEnv<'_>, t: &Loaded) -> Result<TaskRecord> {
    let start = Instant::now();
    let cfg = env.cfg;
    let vis = visibility_of(t, cfg.hide_candidates);
    let tool = Tool::new(env.store, &t.task.user_id, vis);
    let presented = presented_order(t, cfg);
    let n = presented.len();
    let fill = fill_order(n, cfg.seed, t.index);
    let mut ctx = Ctx::new(env, "task", t.index as u32);
    let mut llm = 0.0f64;
    let v = read_view(&tool, t, &presented)?;
    let ids = v.ids();
    let names = v.names();
    let mut env_s = start.elapsed().as_secs_f64();
    let mut unreadable = false;
    // `order` is in presented positions until mapped back at the end.
    let mut reads: Vec<Vec<Option<usize>>> = Vec::new();
    let mut direct: Option<Vec<usize>> = None;
    let mut repairs = Repairs::default();
    let m = cfg.method;
    let logprob = cfg.decisions == Decisions::Logprob;
    if logprob && !m.supports_logprob() {
        return Err(AgentError::Input(format!(
            "--decisions logprob reads one scored answer; {} reasons over several generated replies (use text decisions, or baseline, memory, selective, agent4rec)",
            m.name()
        )));
    }
    macro_rules! timed {
        ($e:expr) => {{
            let s = Instant::now();
            let r = $e;
            llm += s.elapsed().as_secs_f64();
            r
        }};
    }
    match m {
        Method::Agent4rec => {
            let s = Instant::now();
            let msgs = agent4rec_messages(&v, &tool, cfg)?;
            env_s += s.elapsed().as_secs_f64();
            if logprob {
                let mut conts = Vec::with_capacity(2 * n);
                for name in &names {
                    conts.extend(crate::agent4rec::options::align(name));
                }
                let lp = timed!(ctx.score("a4r-align", msgs, conts).await?);
                let s: Vec<f64> = (0..n).map(|k| lp[2 * k] - lp[2 * k + 1]).collect();
                let fill_p: Vec<usize> = (0..n).collect();
                direct = Some(rank_by_scores(&s, &fill_p));
            } else {
                let (r, ok, _, _) = timed!(
                    ctx.ask("a4r-reaction", msgs, |reply| {
                        let r = parse::page_reaction(reply, &names);
                        let ok = r.align.iter().any(Option::is_some);
                        (r, ok)
                    })
                    .await?
                );
                unreadable = !ok;
                let mut order: Vec<Option<usize>> = (0..n)
                    .filter(|&k| r.align[k] == Some(true))
                    .map(Some)
                    .collect();
                order.extend((0..n).filter(|&k| r.align[k].is_none()).map(Some));
                order.extend((0..n).filter(|&k| r.align[k] == Some(false)).map(Some));
                reads.push(order);
            }
        }
        Method::Planner => {
            let obs = timed!(plan_and_gather(&mut ctx, &tool, t, &ids).await?);
            let extra = format!(
                "Information you gathered with the tools:\n{}\n",
                cap(&obs, cfg.history_tokens)
            );
            let p = baseline_prompt(&v, cfg, &extra, "");
            let (r, ok, _) = timed!(
                ask_ranking(&mut ctx, "rank", vec![ChatMessage::user(&p)], &ids, &names).await?
            );
            unreadable = !ok;
            reads.push(r);
        }
        Method::Selective => {
            let s = Instant::now();
            let p = selective_prompt(&v, &tool, cfg)?;
            env_s += s.elapsed().as_secs_f64();
            let msgs = vec![ChatMessage::user(&p)];
            if logprob {
                direct = Some(timed!(first_item_scores(&mut ctx, msgs, &ids).await?));
            } else {
                let (r, ok, _) = timed!(ask_ranking(&mut ctx, "rank", msgs, &ids, &names).await?);
                unreadable = !ok;
                reads.push(r);
            }
        }
        _ => {
            let s = Instant::now();
            let mem = match (m.memory(), &env.embedder) {
                (true, Some(e)) => memory_block(&v, &tool, e.as_ref())?,
                (true, None) => {
                    return Err(AgentError::Input(
                        "the memory agents need an embedder".into(),
                    ));
                }
                _ => String::new(),
            };
            env_s += s.elapsed().as_secs_f64();
            let reasoning = if m.cot() {
                "Solve the task step by step: first say briefly what the user likes, then give the final list on the last line. "
            } else {
                ""
            };
            match m {
                Method::StepBack => {
                    let task = baseline_prompt(&v, cfg, &mem, "");
                    let principle = timed!(
                        ctx.chat(
                            "step-back",
                            vec![ChatMessage::user(&format!(
                                "{task}\n\nBefore solving: what common sense and what structure of the instruction are involved in solving this task? Answer in at most three sentences and do not solve it yet."
                            ))],
                            cfg.max_tokens.min(160),
                        )
                        .await?
                    );
                    let p = baseline_prompt(
                        &v,
                        cfg,
                        &format!("{mem}Principle to apply: {}\n", principle.trim()),
                        "",
                    );
                    let (r, ok, _) = timed!(
                        ask_ranking(&mut ctx, "rank", vec![ChatMessage::user(&p)], &ids, &names)
                            .await?
                    );
                    unreadable = !ok;
                    reads.push(r);
                }
                Method::CotSc => {
                    let p = baseline_prompt(&v, cfg, &mem, reasoning);
                    let mut replies = Vec::new();
                    for k in 0..cfg.sc_samples.max(1) {
                        let text = timed!(
                            ctx.chat_at(
                                &format!("cot-sc-{k}"),
                                vec![ChatMessage::user(&p)],
                                cfg.max_tokens,
                                cfg.sc_temperature,
                            )
                            .await?
                        );
                        replies.push(text);
                    }
                    if cfg.faithful {
                        // The reference's vote: the most frequent exact reply (first on ties).
                        let mut best = 0;
                        let mut best_n = 0;
                        for (k, r) in replies.iter().enumerate() {
                            let c = replies.iter().filter(|x| *x == r).count();
                            if c > best_n {
                                best = k;
                                best_n = c;
                            }
                        }
                        let r = parse::ranked_list(&replies[best], &ids, &names);
                        unreadable = !r.iter().any(Option::is_some);
                        reads.push(r);
                    } else {
                        let mut perms = Vec::new();
                        let mut any = false;
                        let mut rep = Repairs::default();
                        for r in &replies {
                            let read = parse::ranked_list(r, &ids, &names);
                            if read.iter().any(Option::is_some) {
                                any = true;
                                let (p, rr) =
                                    parse::repair(&read, n, &fill_presented(&fill, &presented));
                                rep.add(&rr);
                                perms.push(p);
                            }
                        }
                        unreadable = !any;
                        if any {
                            direct = Some(borda(&perms, n, &fill_presented(&fill, &presented)));
                            repairs = rep;
                        }
                    }
                }
                Method::SelfRefine => {
                    let p = baseline_prompt(&v, cfg, &mem, reasoning);
                    let first = timed!(
                        ctx.chat("cot", vec![ChatMessage::user(&p)], cfg.max_tokens)
                            .await?
                    );
                    let msgs = vec![
                        ChatMessage::user(&p),
                        ChatMessage::assistant(&first),
                        ChatMessage::user(&format!(
                            "Reflect on the reasoning and the list above, correct any mistake, and output the revised list of all {} ids in the format {}.",
                            ids.len(),
                            list_format(&ids)
                        )),
                    ];
                    let second = timed!(ctx.chat("refine", msgs, cfg.max_tokens).await?);
                    let mut r = parse::ranked_list(&second, &ids, &names);
                    if !r.iter().any(Option::is_some) {
                        // the refinement lost the list: keep the first answer's
                        r = parse::ranked_list(&first, &ids, &names);
                    }
                    unreadable = !r.iter().any(Option::is_some);
                    reads.push(r);
                }
                _ => {
                    let p = baseline_prompt(&v, cfg, &mem, reasoning);
                    let msgs = vec![ChatMessage::user(&p)];
                    if logprob {
                        direct = Some(timed!(first_item_scores(&mut ctx, msgs, &ids).await?));
                    } else {
                        let (r, ok, _) =
                            timed!(ask_ranking(&mut ctx, "rank", msgs, &ids, &names).await?);
                        unreadable = !ok;
                        reads.push(r);
                    }
                }
            }
        }
    }
    let (order, repairs) = match direct {
        Some(order) => (order, repairs),
        None => parse::repair(
            &reads.pop().unwrap_or_default(),
            n,
            &fill_presented(&fill, &presented),
        ),
    };
    let ranking: Vec<usize> = order.iter().map(|&p| presented[p]).collect();
    let mut rec = finish_record(t, &presented, &ranking);
    rec.repairs = repairs;
    rec.unreadable = unreadable;
    rec.calls = ctx.usage.calls;
    rec.prompt_tokens = ctx.usage.prompt_tokens;
    rec.completion_tokens = ctx.usage.completion_tokens;
    rec.llm_seconds = llm;
    rec.env_seconds = env_s;
    rec.env_calls = tool.calls.load(std::sync::atomic::Ordering::Relaxed);
    rec.wall_seconds = start.elapsed().as_secs_f64();
    // what the agent read already says which records exist
    rec.unknown_user = v.user.is_none();
    rec.unknown_candidates = v.cands.iter().filter(|c| c.2.is_none()).count() as u32;
    Ok(rec)
}

/// The seeded fill order expressed in presented positions.
fn fill_presented(fill: &[usize], presented: &[usize]) -> Vec<usize> {
    let mut pos_of = vec![0usize; presented.len()];
    for (p, &k) in presented.iter().enumerate() {
        pos_of[k] = p;
    }
    fill.iter().map(|&k| pos_of[k]).collect()
}

/// Rank by the log-probability that the answer list starts with each candidate (one prompt
/// computed once, 20 short continuations), in presented positions.
async fn first_item_scores(
    ctx: &mut Ctx<'_, BenchEnv<'_>>,
    messages: Vec<ChatMessage>,
    ids: &[String],
) -> Result<Vec<usize>> {
    let conts: Vec<String> = ids.iter().map(|id| format!("['{id}'")).collect();
    let lp = ctx.score("rank-first", messages, conts).await?;
    let fill: Vec<usize> = (0..ids.len()).collect();
    Ok(rank_by_scores(&lp, &fill))
}

/// Run every task with a language-model agent; a task that fails or exceeds the time limit
/// is scored as a miss with its error.
pub async fn run_llm(env: &BenchEnv<'_>, set: &TaskSet) -> Result<Vec<TaskRecord>> {
    let ids: Vec<u32> = set.tasks.iter().map(|t| t.index as u32).collect();
    let limit = std::time::Duration::from_secs_f64(env.cfg.task_timeout_s.max(0.001));
    let (ok, failed) = run_all(env, "task", &ids, |k| {
        let t = &set.tasks[k];
        async move {
            match tokio::time::timeout(limit, run_task(env, t)).await {
                Ok(r) => r,
                Err(_) => Err(AgentError::Input(format!(
                    "timed out after {:.0} s",
                    env.cfg.task_timeout_s
                ))),
            }
        }
    })
    .await?;
    let failed: HashMap<u32, String> = failed.into_iter().collect();
    let mut by_index: HashMap<usize, TaskRecord> = ok.into_iter().map(|r| (r.index, r)).collect();
    let mut out = Vec::with_capacity(set.tasks.len());
    for t in &set.tasks {
        match by_index.remove(&t.index) {
            Some(r) => out.push(r),
            None => {
                let presented = presented_order(t, env.cfg);
                let mut r = TaskRecord {
                    index: t.index,
                    user: t.task.user_id.clone(),
                    truth: t.truth.clone(),
                    presented: presented
                        .iter()
                        .map(|&k| t.task.candidate_list[k].clone())
                        .collect(),
                    ..Default::default()
                };
                r.error = Some(
                    failed
                        .get(&(t.index as u32))
                        .cloned()
                        .unwrap_or_else(|| "no result".into()),
                );
                out.push(r);
            }
        }
    }
    Ok(out)
}

/// The tools a planner's subtasks may call (the reference's three, and the paper's query).
const TOOLS: &str = "[1] get_user: the user's profile. Args: user_id\n\
[2] get_item: an item's information. Args: item_id\n\
[3] get_reviews: reviews. Args: user_id=… or item_id=…\n\
[4] query_reviews: reviews sorted. Args: user_id=… or item_id=…, sort=date|relevance|popularity, limit=N";

/// The planning module's few-shot example: the baseline's fixed plan.
const PLAN_EXAMPLE: &str = "sub-task 1: {'description': 'First I need to find user information', 'reasoning instruction': 'None', 'tool use instruction': 'get_user'}\n\
sub-task 2: {'description': 'Next, I need to find item information', 'reasoning instruction': 'None', 'tool use instruction': 'get_item'}\n\
sub-task 3: {'description': 'Next, I need to find review information', 'reasoning instruction': 'None', 'tool use instruction': 'get_reviews'}";

/// `{…}` substrings of a reply with a `description` (quoted either way), in order.
pub fn read_plan(reply: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = reply;
    while let Some(a) = rest.find('{') {
        let Some(b) = rest[a..].find('}') else { break };
        let body = &rest[a + 1..a + b];
        if let Some(p) = body.find("description") {
            let after = body[p + "description".len()..].trim_start_matches(|c: char| {
                c == '\'' || c == '"' || c == ':' || c.is_whitespace()
            });
            let end = after.find(['\'', '"']).unwrap_or(after.len());
            let d = after[..end].trim();
            if !d.is_empty() {
                out.push(d.to_string());
            }
        }
        rest = &rest[a + b + 1..];
    }
    out
}

/// One tool call read from `Action: name, args End Action` (lenient: the first known tool
/// name after `Action`, `key=value` or bare arguments).
#[derive(Clone, Debug, PartialEq)]
pub struct Action {
    pub tool: String,
    pub args: Vec<(String, String)>,
}

pub fn read_action(reply: &str) -> Option<Action> {
    let start = reply.find("Action").map_or(0, |p| p + "Action".len());
    let text = &reply[start..];
    let text = text.split("End Action").next().unwrap_or(text);
    let tools = ["query_reviews", "get_reviews", "get_user", "get_item"];
    let (pos, tool) = tools
        .iter()
        .filter_map(|t| text.find(t).map(|p| (p, *t)))
        .min()?;
    let args_text = &text[pos + tool.len()..];
    let mut args = Vec::new();
    for part in args_text.split([',', '(', ')', '\n', ';']) {
        let part = part.trim().trim_matches(|c: char| "'\"`:[] ".contains(c));
        if part.is_empty() {
            continue;
        }
        match part.split_once('=') {
            Some((k, v)) => args.push((
                k.trim().to_string(),
                v.trim()
                    .trim_matches(|c: char| "'\"` ".contains(c))
                    .to_string(),
            )),
            None => args.push((String::new(), part.to_string())),
        }
        if args.len() >= 4 {
            break;
        }
    }
    Some(Action {
        tool: tool.to_string(),
        args,
    })
}

/// Carry out one action on the task's environment; the observation as text (capped).
fn act(
    tool: &Tool<'_>,
    a: &Action,
    user: &str,
    ids: &[String],
    fetched: &mut usize,
) -> Result<String> {
    let get = |k: &str| a.args.iter().find(|(x, _)| x == k).map(|(_, v)| v.clone());
    let bare = a
        .args
        .iter()
        .find(|(k, _)| k.is_empty())
        .map(|(_, v)| v.clone());
    let obs = match a.tool.as_str() {
        "get_user" => tool
            .get_user(&get("user_id").or(bare).unwrap_or_else(|| user.to_string()))?
            .map_or("no such user".into(), |v| as_text(&v)),
        "get_item" => {
            let id = get("item_id")
                .or(bare)
                .filter(|x| ids.contains(x))
                .unwrap_or_else(|| {
                    let id = ids[*fetched % ids.len()].clone();
                    *fetched += 1;
                    id
                });
            tool.get_item(&id)?
                .map_or("no such item".into(), |v| format!("{id}: {}", as_text(&v)))
        }
        "get_reviews" | "query_reviews" => {
            let of_item = get("item_id");
            let who = get("user_id")
                .or(bare.clone())
                .unwrap_or_else(|| user.to_string());
            let sort = match get("sort").as_deref() {
                Some("relevance") => crate::tool::Sort::Relevance,
                Some("popularity") => crate::tool::Sort::Popularity,
                _ => crate::tool::Sort::Date,
            };
            let limit = get("limit")
                .and_then(|x| x.parse().ok())
                .unwrap_or(15usize)
                .min(50);
            let of = match &of_item {
                Some(i) => ReviewsOf::Item(i),
                None => ReviewsOf::User(&who),
            };
            let v = tool.query_reviews(of, sort, crate::tool::Form::Text, "", limit)?;
            let text = v.as_str().unwrap_or("").to_string();
            if text.is_empty() {
                "no visible reviews".into()
            } else {
                text
            }
        }
        _ => "unknown tool".into(),
    };
    Ok(cap(&obs, 400))
}

/// The planning module, then one tool-use call per subtask (at most 4); returns what was
/// observed.
async fn plan_and_gather(
    ctx: &mut Ctx<'_, BenchEnv<'_>>,
    tool: &Tool<'_>,
    t: &Loaded,
    ids: &[String],
) -> Result<String> {
    let task = format!(
        "Rank {} candidate items for user {} by how well they match the user's preference, using the user, item and review information of the platform.",
        ids.len(),
        t.task.user_id
    );
    let prompt = format!(
        "You are a planner who divides a recommendation task into several subtasks. You also need to give the reasoning instructions for each subtask and the instructions for calling the tool. Your output format should follow the example below.\nThe following are some examples:\nTask: {PLAN_EXAMPLE}\n\nTask: {task}\n"
    );
    let reply = ctx
        .chat(
            "plan",
            vec![ChatMessage::user(&prompt)],
            ctx.env.cfg.max_tokens,
        )
        .await?;
    let mut plan = read_plan(&reply);
    if plan.is_empty() {
        plan = vec![
            "First I need to find user information".into(),
            "Next, I need to find item information".into(),
            "Next, I need to find review information".into(),
        ];
    }
    plan.truncate(4);
    let mut obs = Vec::new();
    let mut fetched = 0usize;
    for (k, sub) in plan.iter().enumerate() {
        let p = format!(
            "You have access to the following tools:\n{TOOLS}\nYou need to select the appropriate tool from the list of available tools according to the task description to complete the task:\n{sub}\nThe user is {}; the candidate items are {ids:?}.\nYou must use the tools by outputting the tool name followed by its arguments, delimited by commas. You can only invoke one tool at a time. You must begin your tool invocation with 'Action:' and end it with 'End Action'.",
            t.task.user_id
        );
        let r = ctx
            .chat(&format!("tool-{k}"), vec![ChatMessage::user(&p)], 60)
            .await?;
        match read_action(&r) {
            Some(a) => {
                let o = act(tool, &a, &t.task.user_id, ids, &mut fetched)?;
                obs.push(format!("- {} → {o}", a.tool));
            }
            None => obs.push(format!("- ({sub}): no tool call could be read")),
        }
    }
    Ok(obs.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_and_actions_are_read_leniently() {
        let p = read_plan(
            "sub-task 1: {'description': 'Look up the user', 'x': 1}\nsub-task 2: {\"description\": \"Read reviews\"}\n{no}",
        );
        assert_eq!(p, vec!["Look up the user", "Read reviews"]);
        assert_eq!(
            read_action("Thought: hm. Action: get_reviews, user_id=u1 End Action"),
            Some(Action {
                tool: "get_reviews".into(),
                args: vec![("user_id".into(), "u1".into())]
            })
        );
        assert_eq!(
            read_action("get_item('b3')").unwrap().args,
            vec![(String::new(), "b3".into())]
        );
        assert_eq!(read_action("I will think."), None);
    }

    #[test]
    fn borda_and_ties() {
        let r = borda(
            &[vec![0, 1, 2], vec![1, 0, 2], vec![1, 2, 0]],
            3,
            &[2, 1, 0],
        );
        assert_eq!(r, vec![1, 0, 2]);
        assert_eq!(rank_by_scores(&[1.0, 1.0, 2.0], &[1, 0, 2]), vec![2, 1, 0]);
        assert_eq!(
            rank_by_scores(&[f64::NEG_INFINITY, f64::NAN, 0.5], &[0, 1, 2]),
            vec![2, 0, 1]
        );
    }

    #[test]
    fn metrics_count_hits_and_misses() {
        let mk = |rank: Option<usize>| TaskRecord {
            truth_rank: rank,
            wall_seconds: 1.0,
            llm_seconds: 0.5,
            ..Default::default()
        };
        let recs = vec![mk(Some(1)), mk(Some(4)), mk(None), mk(Some(20))];
        let m = metrics("x", &recs, 60.0);
        assert_eq!((m.hr1, m.hr3, m.hr5), (0.25, 0.25, 0.5));
        assert!((m.mean_hr - (0.25 + 0.25 + 0.5) / 3.0).abs() < 1e-12);
        assert!((m.ndcg5 - (1.0 + 1.0 / 5f64.log2()) / 4.0).abs() < 1e-12);
        assert!((m.llm_share - 0.5).abs() < 1e-12);
        assert_eq!(m.tasks_per_minute, 4.0);
    }
}
