//! Agent4Rec: one language-model agent per user browses pages of recommendations, decides what
//! fits its taste, watches, rates, reflects, tires and leaves, and is interviewed afterwards.
//!
//! The episode follows the reference step by step (pages of k items from a static ranking with
//! train and test masked, P1 page reaction, factual memory, P2 exit decision with its memory,
//! a satisfaction reflection every fourth memory, forced exit after the last page, P3 interview
//! with the whole memory stream), with the reference's pitfalls fixed: replies are read by page
//! position with a tolerant parser, a reply that stays unreadable after a bounded number of
//! retries is recorded as such, the memory clock is logical, ties are seeded. Every exchange goes
//! through the client layer and the [`Journal`].

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use serde_json::json;

use rudder_client::{ChatMessage, LlmClient};
use rudder_data::{Dataset, Interactions};

pub use crate::calls::{AgentUsage, Exchange};
use crate::calls::{CallEnv, CallSettings, Ctx, Spent, run_all};
use crate::journal::Journal;
use crate::memory::{Embedder, Memory, MemoryKind};
use crate::pages::{self, Baseline, Source};
use crate::parse;
use crate::profile::{self, Profile};
use crate::prompts;
use crate::{AgentError, Result};

/// Longest satisfaction reflection (one sentence is asked for).
pub const REFLECTION_MAX_TOKENS: u32 = 128;

/// How the agent's choices are read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Decisions {
    /// From the generated text (the reference).
    #[default]
    Text,
    /// From the model's log-probabilities over the allowed answers (ALIGN yes/no per item,
    /// rating 1–5 per aligned item, [EXIT]/[NEXT], interview 1–10, WATCH yes/no): no parsing,
    /// which small models need. Every aligned item is watched.
    Logprob,
}

impl std::str::FromStr for Decisions {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "text" => Ok(Decisions::Text),
            "logprob" => Ok(Decisions::Logprob),
            _ => Err(format!("unknown decisions `{s}` (text or logprob)")),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SimConfig {
    /// Users 0..agents are simulated (as the reference).
    pub agents: usize,
    pub pages: usize,
    pub per_page: usize,
    pub seed: u64,
    pub temperature: f32,
    pub max_tokens: u32,
    pub decisions: Decisions,
    /// Extra attempts for a reply that cannot be read.
    pub retries: u32,
    /// The reference's reading of replies (strict regexes, exact titles over the catalogue).
    pub faithful: bool,
    /// Skip the exit question on the last allowed page (its answer cannot matter; the reference
    /// asks it, so cost comparisons keep it by default).
    pub skip_last_exit: bool,
    /// Log-probability decisions relative to a content-free version of the same question
    /// (contextual calibration): removes the model's prior for the answer words.
    pub calibrate: bool,
    /// Agents in flight at once.
    pub concurrency: usize,
    /// Model name sent with every request.
    pub model: String,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            agents: 50,
            pages: 5,
            per_page: 4,
            seed: 101,
            temperature: 0.2,
            max_tokens: 512,
            decisions: Decisions::Text,
            retries: 2,
            faithful: false,
            skip_last_exit: false,
            calibrate: true,
            concurrency: 16,
            model: String::new(),
        }
    }
}

/// The items as the agents see them.
pub struct Catalog {
    pub titles: Vec<String>,
    pub mean_rating: Vec<f64>,
    pub summary: Vec<String>,
    pub genres: Vec<Vec<String>>,
    by_title: std::collections::HashMap<String, u32>,
}

impl Catalog {
    /// From the dataset's item table (`title`; `rating`, `summary`, `genres` when present, as
    /// in Agent4Rec's `movie_detail.csv`). Without a `rating` column the mean rating shown is
    /// the mean of the data's ratings, or 0.
    pub fn from_dataset(ds: &Dataset) -> Result<Catalog> {
        let n = ds.n_items();
        let titles = ds.item_table.title.clone().ok_or_else(|| {
            AgentError::Input(format!(
                "{}: the items have no titles (the agents read titles; Agent4Rec data has movie_detail.csv)",
                ds.name
            ))
        })?;
        let field = |name: &str| ds.item_table.fields.get(name);
        let mean_rating = match field("rating") {
            Some(c) => c
                .iter()
                .map(|v| v.trim().parse::<f64>().unwrap_or(0.0))
                .collect(),
            None => {
                let mut sum = vec![0.0; n];
                let mut cnt = vec![0usize; n];
                for it in ds.interactions.iter() {
                    if let Some(r) = it.rating {
                        sum[it.item as usize] += r as f64;
                        cnt[it.item as usize] += 1;
                    }
                }
                (0..n).map(|i| sum[i] / cnt[i].max(1) as f64).collect()
            }
        };
        let summary = field("summary")
            .cloned()
            .unwrap_or_else(|| vec![String::new(); n]);
        let genres = field("genres")
            .map(|c| {
                c.iter()
                    .map(|g| {
                        g.split('|')
                            .map(|s| s.trim().to_string())
                            .filter(|s| !s.is_empty())
                            .collect()
                    })
                    .collect()
            })
            .unwrap_or_else(|| vec![Vec::new(); n]);
        let mut by_title = std::collections::HashMap::new();
        for (i, t) in titles.iter().enumerate() {
            by_title.entry(t.clone()).or_insert(i as u32);
        }
        Ok(Catalog {
            titles,
            mean_rating,
            summary,
            genres,
            by_title,
        })
    }

    pub fn line(&self, i: u32) -> String {
        let i = i as usize;
        prompts::item_line(&self.titles[i], self.mean_rating[i], &self.summary[i])
    }

    /// Exact title → item over the whole catalogue (the reference's mapping).
    pub fn exact(&self, title: &str) -> Option<u32> {
        self.by_title.get(title).copied()
    }
}

/// Receives progress as agents work.
pub trait Progress: Send + Sync {
    fn page(&self, _agent: u32, _page: usize) {}
    fn agent_done(&self, _agent: u32, _tokens: u64, _failed: bool) {}
}

pub struct NoProgress;
impl Progress for NoProgress {}

/// What every agent shares.
pub struct Env<'a> {
    pub client: &'a dyn LlmClient,
    pub journal: &'a Journal,
    pub cfg: &'a SimConfig,
    pub catalog: &'a Catalog,
    pub embedder: Arc<dyn Embedder>,
    pub progress: &'a dyn Progress,
    /// Content-free answer priors, measured once per run when log-probability decisions are
    /// calibrated (see [`Priors`]).
    pub priors: std::sync::OnceLock<Priors>,
}

impl CallEnv for Env<'_> {
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

/// The answers each kind of log-probability decision chooses among.
pub mod options {
    pub fn align(t: &str) -> Vec<String> {
        vec![
            format!("MOVIE: {t}; ALIGN: yes"),
            format!("MOVIE: {t}; ALIGN: no"),
        ]
    }
    pub fn rating(t: &str) -> Vec<String> {
        (1..=5)
            .map(|x| format!("MOVIE: {t}; RATING: {x}; FEELING:"))
            .collect()
    }
    pub fn exit() -> Vec<String> {
        vec!["[EXIT]; Reason:".into(), "[NEXT]; Reason:".into()]
    }
    pub fn interview() -> Vec<String> {
        (1..=10).map(|x| format!("RATING: {x};")).collect()
    }
    pub fn reflection() -> Vec<String> {
        vec![
            "satisfied with the recommendation result because".into(),
            "unsatisfied with the recommendation result because".into(),
        ]
    }
    pub fn forced(t: &str) -> Vec<String> {
        vec![
            format!("MOVIE: {t}; WATCH: yes"),
            format!("MOVIE: {t}; WATCH: no"),
        ]
    }
}

/// Contextual calibration (Zhao et al., 2021): the log-probability of every answer of every
/// kind of decision given a content-free version of its prompt (persona, state, memories, page
/// and titles replaced by "N/A"), measured once per run. A calibrated decision takes the answer
/// with the highest log-probability minus its prior, which removes a small model's preference
/// for some answer words whatever the question (SmolLM2-135M prefers `[EXIT]` to `[NEXT]` by
/// about 3 nats for every agent).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Priors {
    pub align: Vec<f64>,
    pub rating: Vec<f64>,
    pub exit: Vec<f64>,
    pub interview: Vec<f64>,
    pub reflection: Vec<f64>,
    pub forced: Vec<f64>,
}

/// Which prior a group of answers is calibrated by.
type PriorOf = fn(&Priors) -> &[f64];

/// Measure the priors (journaled under the scope `calibration`).
pub async fn measure_priors(env: &Env<'_>) -> Result<Priors> {
    let mut ctx = Ctx::new(env, "calibration", 0);
    let na = || "N/A".to_string();
    let page = vec![
        ChatMessage::system("N/A"),
        ChatMessage::user(&prompts::reaction_user_text("N/A", &[na()])),
    ];
    let mut both = options::align("N/A");
    both.extend(options::rating("N/A"));
    let lp = ctx.score("prior-reaction", page, both).await?;
    let exit = ctx
        .score(
            "prior-exit",
            vec![
                ChatMessage::system("N/A"),
                ChatMessage::user(prompts::EXIT_USER),
            ],
            options::exit(),
        )
        .await?;
    let interview = ctx
        .score(
            "prior-interview",
            vec![
                ChatMessage::system("N/A"),
                ChatMessage::user(&prompts::interview_user("N/A", &[na()])),
            ],
            options::interview(),
        )
        .await?;
    let reflection = ctx
        .score(
            "prior-reflection",
            vec![ChatMessage::user(&prompts::reflection(&[na()]))],
            options::reflection(),
        )
        .await?;
    let forced = ctx
        .score(
            "prior-forced",
            vec![
                ChatMessage::system("N/A"),
                ChatMessage::user(&prompts::forced_user(&[na()])),
            ],
            options::forced("N/A"),
        )
        .await?;
    let finite = |v: Vec<f64>| -> Vec<f64> {
        v.into_iter()
            .map(|x| if x.is_finite() { x } else { 0.0 })
            .collect()
    };
    let lp = finite(lp);
    Ok(Priors {
        align: lp[..2].to_vec(),
        rating: lp[2..].to_vec(),
        exit: finite(exit),
        interview: finite(interview),
        reflection: finite(reflection),
        forced: finite(forced),
    })
}

/// Measure the priors once, when the run calibrates log-probability decisions.
async fn ensure_priors(env: &Env<'_>) -> Result<()> {
    if env.cfg.decisions == Decisions::Logprob && env.cfg.calibrate && env.priors.get().is_none() {
        let p = measure_priors(env).await?;
        let _ = env.priors.set(p);
    }
    Ok(())
}

impl Ctx<'_, Env<'_>> {
    /// The most likely of `continuations` as the assistant's reply (the first on ties),
    /// calibrated by `prior` when the run calibrates.
    async fn choose(
        &mut self,
        kind: &str,
        messages: Vec<ChatMessage>,
        continuations: Vec<String>,
        prior: PriorOf,
    ) -> Result<usize> {
        Ok(self
            .choose_groups(kind, messages, vec![(continuations, prior)])
            .await?[0])
    }

    /// Several choices about one conversation in one call (the backend computes the prompt
    /// once): the most likely continuation of each group, the first on ties; with calibration,
    /// each option's log-probability minus its content-free prior ([`Priors`]).
    async fn choose_groups(
        &mut self,
        kind: &str,
        messages: Vec<ChatMessage>,
        groups: Vec<(Vec<String>, PriorOf)>,
    ) -> Result<Vec<usize>> {
        let continuations: Vec<String> = groups.iter().flat_map(|g| g.0.clone()).collect();
        let lp = self.score(kind, messages, continuations).await?;
        let priors = if self.env.cfg.calibrate {
            self.env.priors.get()
        } else {
            None
        };
        let mut best = Vec::with_capacity(groups.len());
        let mut o = 0;
        for (g, prior) in &groups {
            let mut part = lp
                .get(o..o + g.len())
                .map(<[f64]>::to_vec)
                .unwrap_or_default();
            o += g.len();
            if let Some(p) = priors {
                for (x, b) in part.iter_mut().zip(prior(p)) {
                    *x -= b;
                }
            }
            best.push(
                rudder_client::Scores {
                    logprobs: part,
                    exact: true,
                    usage: None,
                }
                .best()
                .unwrap_or(0),
            );
        }
        Ok(best)
    }
}

/// What an agent did on one page.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PageRecord {
    pub page: usize,
    pub items: Vec<u32>,
    /// The page's items in the user's held-out (valid) split.
    pub ground_truth: Vec<u32>,
    /// ALIGN per position (`None`: unreadable).
    pub align: Vec<Option<bool>>,
    pub aligned: Vec<u32>,
    pub watched: Vec<u32>,
    pub ratings: Vec<u8>,
    pub feelings: Vec<String>,
    /// The reaction was read completely.
    pub reaction_read: bool,
    pub attempts: u32,
    pub exit: bool,
    /// The exit answer was readable (else: continue, as the reference).
    pub exit_read: bool,
    pub positive: Option<bool>,
    /// The satisfaction reflection made after this page, if one was due.
    pub reflection: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InterviewRecord {
    pub rating: Option<u8>,
    pub reason: String,
    pub reply: String,
}

/// One agent's whole episode.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Episode {
    pub user: u32,
    pub activity: u8,
    pub conformity: u8,
    pub diversity: u8,
    pub pages: Vec<PageRecord>,
    pub interview: InterviewRecord,
    pub usage: AgentUsage,
    pub seconds: f64,
    #[serde(skip)]
    pub exchanges: Vec<Exchange>,
}

impl Episode {
    pub fn exit_page(&self) -> usize {
        self.pages.len()
    }
}

fn titles_of(cat: &Catalog, items: &[u32]) -> Vec<String> {
    items
        .iter()
        .map(|&i| cat.titles[i as usize].clone())
        .collect()
}

fn factual_memory(page: usize, cat: &Catalog, r: &PageRecord) -> String {
    let t = |v: &[u32]| titles_of(cat, v).join(", ");
    let disliked: Vec<u32> = r
        .items
        .iter()
        .enumerate()
        .filter(|(p, i)| {
            r.align[*p] != Some(true)
                || r.watched
                    .iter()
                    .position(|w| w == *i)
                    .is_some_and(|k| r.ratings[k] < 4)
        })
        .map(|(_, &i)| i)
        .collect();
    format!(
        "The recommender recommended the following movies to me on page {page}: {}, among them, I watched {} and rate them {} respectively. I dislike the rest movies: {}.",
        t(&r.aligned),
        if r.watched.is_empty() {
            "none".to_string()
        } else {
            t(&r.watched)
        },
        if r.ratings.is_empty() {
            "-".to_string()
        } else {
            r.ratings
                .iter()
                .map(u8::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        },
        if disliked.is_empty() {
            "none".to_string()
        } else {
            t(&disliked)
        }
    )
}

/// Store a memory and run the satisfaction reflection when one is due.
async fn remember(
    ctx: &mut Ctx<'_, Env<'_>>,
    mem: &mut Memory,
    text: &str,
    kind: MemoryKind,
) -> Result<Option<String>> {
    if !mem.add(text, kind)? {
        return Ok(None);
    }
    let context = mem.retrieve(prompts::QUERY_REFLECT)?;
    let messages = vec![ChatMessage::user(&prompts::reflection(&context))];
    let reflection = match ctx.env.cfg.decisions {
        // the reflection asks for one sentence
        Decisions::Text => ctx
            .chat(
                "reflection",
                messages,
                ctx.env.cfg.max_tokens.min(REFLECTION_MAX_TOKENS),
            )
            .await?
            .trim()
            .to_string(),
        Decisions::Logprob => {
            let c = ctx
                .choose("reflection", messages, options::reflection(), |p| {
                    &p.reflection
                })
                .await?;
            format!(
                "{} with the recommendation result.",
                if c == 0 { "satisfied" } else { "unsatisfied" }
            )
        }
    };
    mem.add_reflection(&reflection)?;
    Ok(Some(reflection))
}

/// The page reaction (P1) read by text or by log-probabilities.
async fn react(
    ctx: &mut Ctx<'_, Env<'_>>,
    profile: &Profile,
    mem: &mut Memory,
    page: usize,
    items: &[u32],
) -> Result<(parse::PageReaction, bool, u32)> {
    let cat = ctx.env.catalog;
    let context = if mem.is_empty() {
        Vec::new()
    } else {
        mem.retrieve(prompts::QUERY_PAGE)?
    };
    let lines: Vec<String> = items.iter().map(|&i| cat.line(i)).collect();
    let titles = titles_of(cat, items);
    let messages = vec![
        ChatMessage::system(&prompts::reaction_system(profile, &context)),
        ChatMessage::user(&prompts::reaction_user(page, &lines)),
    ];
    match ctx.env.cfg.decisions {
        Decisions::Text => {
            let faithful = ctx.env.cfg.faithful;
            let (r, ok, _, attempts) = ctx
                .ask("reaction", messages, |text| {
                    let r = if faithful {
                        parse::strict::page_reaction(text, items, &|t| cat.exact(t))
                    } else {
                        parse::page_reaction(text, &titles)
                    };
                    // the faithful reading never retries: the reference accepts any non-empty reply
                    let ok = if faithful {
                        !text.trim().is_empty()
                    } else {
                        r.complete()
                    };
                    (r, ok)
                })
                .await?;
            Ok((r, ok, attempts))
        }
        Decisions::Logprob => {
            let mut r = parse::PageReaction {
                align: vec![None; items.len()],
                align_reason: vec![String::new(); items.len()],
                ..Default::default()
            };
            // one call: ALIGN yes/no for every item and a rating 1–5 for every item (used for
            // the aligned ones), so the page is read once
            let mut groups: Vec<(Vec<String>, PriorOf)> = titles
                .iter()
                .map(|t| {
                    (
                        options::align(t),
                        (|p: &Priors| p.align.as_slice()) as PriorOf,
                    )
                })
                .collect();
            groups.extend(titles.iter().map(|t| {
                (
                    options::rating(t),
                    (|p: &Priors| p.rating.as_slice()) as PriorOf,
                )
            }));
            let picks = ctx.choose_groups("reaction", messages, groups).await?;
            let n = items.len();
            for p in 0..n {
                r.align[p] = Some(picks[p] == 0);
                if picks[p] == 0 {
                    r.ratings.push((p, picks[n + p] as u8 + 1, String::new()));
                }
            }
            Ok((r, true, 1))
        }
    }
}

/// Run one agent's episode over its ranking.
pub async fn episode(
    env: &Env<'_>,
    scope: &str,
    profile: &Profile,
    ranking: &[u32],
    held_out: &HashSet<u32>,
) -> Result<Episode> {
    let t0 = Instant::now();
    let cfg = env.cfg;
    let mut ctx = Ctx::new(env, scope, profile.user);
    let mut mem = Memory::new(env.embedder.clone());
    let mut records = Vec::new();
    let k = cfg.per_page.max(1);
    for page in 1..=cfg.pages {
        let lo = (page - 1) * k;
        if lo >= ranking.len() {
            break;
        }
        let items: Vec<u32> = ranking[lo..(lo + k).min(ranking.len())].to_vec();
        let (reaction, read, attempts) = react(&mut ctx, profile, &mut mem, page, &items).await?;
        let mut rec = PageRecord {
            page,
            ground_truth: items
                .iter()
                .copied()
                .filter(|i| held_out.contains(i))
                .collect(),
            align: reaction.align.clone(),
            aligned: (0..items.len())
                .filter(|&p| reaction.align[p] == Some(true))
                .map(|p| items[p])
                .collect(),
            watched: reaction.ratings.iter().map(|r| items[r.0]).collect(),
            ratings: reaction.ratings.iter().map(|r| r.1).collect(),
            feelings: reaction.ratings.iter().map(|r| r.2.clone()).collect(),
            items,
            reaction_read: read,
            attempts,
            exit: false,
            exit_read: true,
            positive: None,
            reflection: None,
        };
        let fact = factual_memory(page, env.catalog, &rec);
        let mut reflection = remember(&mut ctx, &mut mem, &fact, MemoryKind::Factual).await?;
        let last = page >= cfg.pages;
        if !(last && cfg.skip_last_exit) {
            let context = mem.retrieve(prompts::QUERY_EXIT)?;
            let messages = vec![
                ChatMessage::system(&prompts::exit_system(profile, page, &context)),
                ChatMessage::user(prompts::EXIT_USER),
            ];
            match cfg.decisions {
                Decisions::Text => {
                    let faithful = cfg.faithful;
                    let (d, ok, _, _) = ctx
                        .ask("exit", messages, |text| {
                            let d = parse::decision(text);
                            if faithful {
                                let exit = text.contains("[EXIT]") || text.contains("[exit]");
                                let ok = !text.trim().is_empty();
                                (
                                    parse::Decision {
                                        exit: Some(exit),
                                        ..d
                                    },
                                    ok,
                                )
                            } else {
                                let ok = d.exit.is_some();
                                (d, ok)
                            }
                        })
                        .await?;
                    rec.exit = d.exit.unwrap_or(false);
                    rec.exit_read = ok;
                    rec.positive = d.positive;
                }
                Decisions::Logprob => {
                    let c = ctx
                        .choose("exit", messages, options::exit(), |p| &p.exit)
                        .await?;
                    rec.exit = c == 0;
                }
            }
            let note = if rec.exit && !last {
                format!(
                    "After browsing {page} pages, I decided to leave the recommendation system."
                )
            } else {
                format!("Turn to page {} of the recommendation.", page + 1)
            };
            if let Some(r) = remember(&mut ctx, &mut mem, &note, MemoryKind::Decision).await? {
                reflection = Some(r);
            }
        }
        rec.reflection = reflection;
        env.journal
            .step(scope, profile.user, &format!("page{page}"), json!(rec))?;
        env.progress.page(profile.user, page);
        let stop = rec.exit || last;
        records.push(rec);
        if stop {
            break;
        }
    }
    let (system, user) = prompts::interview_messages(profile, &mem.all());
    let messages = vec![ChatMessage::system(&system), ChatMessage::user(&user)];
    let interview = match cfg.decisions {
        Decisions::Text => {
            let (iv, _, text, _) = ctx
                .ask("interview", messages, |text| {
                    let iv = parse::interview(text);
                    let ok = iv.rating.is_some();
                    (iv, ok)
                })
                .await?;
            InterviewRecord {
                rating: iv.rating,
                reason: iv.reason,
                reply: text,
            }
        }
        Decisions::Logprob => {
            let c = ctx
                .choose("interview", messages, options::interview(), |p| {
                    &p.interview
                })
                .await?;
            InterviewRecord {
                rating: Some(c as u8 + 1),
                reason: String::new(),
                reply: String::new(),
            }
        }
    };
    env.journal
        .step(scope, profile.user, "interview", json!(interview))?;
    let ep = Episode {
        user: profile.user,
        activity: profile.activity,
        conformity: profile.conformity,
        diversity: profile.diversity,
        pages: records,
        interview,
        usage: ctx.usage,
        seconds: t0.elapsed().as_secs_f64(),
        exchanges: ctx.exchanges,
    };
    env.journal.step(
        scope,
        profile.user,
        "done",
        json!({"exit_page": ep.exit_page(), "usage": ep.usage}),
    )?;
    Ok(ep)
}

/// The agents' users with their profiles (users 0..n, as the reference).
pub fn profiles(ds: &Dataset, n: usize) -> Result<Vec<Profile>> {
    if n > ds.n_users() {
        return Err(AgentError::Input(format!(
            "--agents {n}: {} has only {} users",
            ds.name,
            ds.n_users()
        )));
    }
    (0..n as u32)
        .map(|u| profile::profile(&ds.user_table, u, ds.n_users(), &ds.name))
        .collect()
}

/// What one agent's work reports to the progress bar.
impl Spent for Episode {
    fn tokens(&self) -> u64 {
        self.usage.prompt_tokens + self.usage.completion_tokens
    }
}
impl Spent for ForcedRecord {
    fn tokens(&self) -> u64 {
        self.usage.prompt_tokens + self.usage.completion_tokens
    }
}
impl Spent for PersonaRecord {
    fn tokens(&self) -> u64 {
        self.tokens
    }
}

/// The recommender in the loop.
pub enum Recommender {
    Baseline(Baseline),
    /// A trained CF model: its configuration (for retraining between rounds), inputs, and the
    /// scorer of its current weights.
    Cf {
        name: String,
        cfg: Box<rudder_cf::CfConfig>,
        inputs: rudder_cf::model::ModelInputs,
        scorer: rudder_cf::scorer::EmbeddingScorer,
    },
}

impl Recommender {
    pub fn name(&self) -> String {
        match self {
            Recommender::Baseline(b) => match b {
                Baseline::PopSample => "pop".into(),
                Baseline::Pop => "pop-plain".into(),
                Baseline::Random => "random".into(),
            },
            Recommender::Cf { name, .. } => name.clone(),
        }
    }
}

/// One round of the interactive simulation.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Round {
    pub round: usize,
    pub metrics: SimMetrics,
    pub episodes: Vec<Episode>,
    pub failures: Vec<(u32, String)>,
    /// Train interactions the recommender of this round was trained on.
    pub train_size: usize,
}

/// Interactive simulation over `rounds` rounds; between rounds the recommender is retrained on
/// train + the items the agents aligned with (the filter-bubble protocol).
#[allow(clippy::too_many_arguments)]
pub async fn simulate(
    env: &Env<'_>,
    ds: &Dataset,
    profiles: &[Profile],
    mut rec: Recommender,
    rounds: usize,
    on_round: &mut dyn FnMut(&Round, &Interactions) -> Result<()>,
) -> Result<Vec<Round>> {
    let split = ds.split.as_ref().ok_or_else(|| {
        AgentError::Input(format!(
            "{}: the simulation needs train/valid/test",
            ds.name
        ))
    })?;
    let n_items = ds.n_items();
    ensure_priors(env).await?;
    let users: Vec<u32> = profiles.iter().map(|p| p.user).collect();
    let mut train = split.train.clone();
    let mut out = Vec::new();
    let depth = env.cfg.pages * env.cfg.per_page;
    for round in 0..rounds.max(1) {
        if round > 0
            && let Recommender::Cf {
                cfg,
                inputs,
                scorer,
                ..
            } = &mut rec
        {
            let s = rudder_data::Split {
                train: train.clone(),
                valid: split.valid.clone(),
                test: split.test.clone(),
                extra_tests: Vec::new(),
            };
            let report =
                rudder_cf::trainer::train_with(cfg, &s, inputs, &mut rudder_cf::trainer::Silent)?;
            *scorer = report.scorer()?;
        }
        let source = match &rec {
            Recommender::Baseline(b) => Source::Baseline(*b),
            Recommender::Cf { scorer, .. } => Source::Scores(scorer),
        };
        let ranks = pages::rankings(
            &source,
            &users,
            n_items,
            &train,
            &split.test,
            env.cfg.seed ^ round as u64,
            depth,
        );
        let scope = format!("sim/r{round}");
        let held: Vec<HashSet<u32>> = users
            .iter()
            .map(|&u| split.valid.items(u).iter().copied().collect())
            .collect();
        let (episodes, failures) = run_all(env, &scope, &users, |k| {
            let scope = scope.clone();
            let (p, r, h) = (&profiles[k], &ranks[k], &held[k]);
            async move { episode(env, &scope, p, r, h).await }
        })
        .await?;
        let train_size = train.len();
        let metrics = SimMetrics::compute(
            &episodes,
            failures.len(),
            env.cfg,
            env.catalog,
            &split.train,
        );
        // feedback: train + aligned items
        let mut lists: Vec<Vec<u32>> = (0..train.n_users() as u32)
            .map(|u| train.items(u).to_vec())
            .collect();
        for e in &episodes {
            let l = &mut lists[e.user as usize];
            for p in &e.pages {
                for &i in &p.aligned {
                    if !l.contains(&i) {
                        l.push(i);
                    }
                }
            }
        }
        let next_train = Interactions::from_lists(n_items, &lists);
        let r = Round {
            round,
            metrics,
            episodes,
            failures,
            train_size,
        };
        on_round(&r, &next_train)?;
        out.push(r);
        train = next_train;
    }
    Ok(out)
}

/// Per trait level: agents, mean exit page, watch rate and interview rating.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TraitGroup {
    pub level: u8,
    pub agents: usize,
    pub exit_page: f64,
    pub watch_rate: f64,
    pub satisfaction: Option<f64>,
}

/// The run's numbers. Names of the reference's `metrics.txt` are kept where the quantity is
/// the same; each field says what it is.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SimMetrics {
    pub agents: usize,
    pub failed: usize,
    pub pages: usize,
    /// Σ|ALIGN=yes ∩ held-out| / max(Σ|ALIGN=yes|, 1) per agent, averaged over agents: the
    /// share of items the agent liked that the real user also interacted with. The reference's
    /// `metrics.txt` prints this as "Average recall".
    pub align_precision: f64,
    /// Σ|ALIGN=yes ∩ held-out| / max(Σ|held-out on pages|, 1) per agent, averaged: the share of
    /// the real user's items shown that the agent liked. Printed by the reference as "Average
    /// precision".
    pub align_recall: f64,
    /// The reference's "Overall click rate": watched / (max pages × items per page) per agent
    /// (the *maximum* number of pages, even for agents that left early), averaged.
    pub click_rate: f64,
    /// Watched / items actually shown, per agent, averaged.
    pub watch_rate: f64,
    /// The reference's "Average number of likes": ALIGN=yes items per page, averaged per agent
    /// then over agents.
    pub likes_per_page: f64,
    /// Mean pages browsed (the reference's "Average exit page").
    pub exit_page: f64,
    /// Agents leaving after page 1, 2, … (index 0 = page 1).
    pub exit_pages: Vec<usize>,
    /// Mean of all ratings given (1–5).
    pub mean_rating: Option<f64>,
    /// Ratings given, counts of 1..5.
    pub rating_counts: [usize; 5],
    /// Mean interview rating (1–10) over readable interviews.
    pub satisfaction: Option<f64>,
    pub satisfaction_n: usize,
    pub interview_counts: [usize; 10],
    /// Watch rate on page i among agents who reached it (index 0 = page 1).
    pub watch_rate_by_page: Vec<f64>,
    /// Share of reflections that start "satisfied".
    pub reflections_satisfied: Option<f64>,
    pub reflections: usize,
    /// Mean number of distinct genres among the items shown to an agent.
    pub genre_diversity: f64,
    /// Mean train popularity (interactions in the original train split) of the items shown.
    pub shown_popularity: f64,
    pub unparsed_reactions: usize,
    pub unparsed_exits: usize,
    pub unparsed_interviews: usize,
    pub retries: u64,
    pub calls: u64,
    pub calls_from_journal: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub tokens_per_agent: f64,
    pub calls_per_agent: f64,
    /// Mean wall time of an episode (agents run concurrently).
    pub seconds_per_agent: f64,
    pub by_activity: Vec<TraitGroup>,
    pub by_conformity: Vec<TraitGroup>,
    pub by_diversity: Vec<TraitGroup>,
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

impl SimMetrics {
    pub fn compute(
        eps: &[Episode],
        failed: usize,
        cfg: &SimConfig,
        cat: &Catalog,
        train0: &Interactions,
    ) -> SimMetrics {
        let mut m = SimMetrics {
            agents: eps.len(),
            failed,
            ..Default::default()
        };
        let counts = train0.item_degrees();
        let (mut prec, mut rec, mut click, mut watch, mut likes, mut exitp) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        let mut ratings = Vec::new();
        let mut by_page: Vec<(usize, usize)> = vec![(0, 0); cfg.pages];
        let mut sats = Vec::new();
        let (mut refl_n, mut refl_sat) = (0usize, 0usize);
        let (mut genre_div, mut pop) = (vec![], vec![]);
        m.exit_pages = vec![0; cfg.pages];
        for e in eps {
            let (mut hits, mut al, mut gt, mut w, mut shown) = (0, 0, 0, 0, 0);
            let mut genres = HashSet::new();
            for p in &e.pages {
                let g: HashSet<u32> = p.ground_truth.iter().copied().collect();
                hits += p.aligned.iter().filter(|i| g.contains(i)).count();
                al += p.aligned.len();
                gt += p.ground_truth.len();
                w += p.watched.len();
                shown += p.items.len();
                ratings.extend(p.ratings.iter().copied());
                if let Some(b) = by_page.get_mut(p.page - 1) {
                    b.0 += p.watched.len();
                    b.1 += p.items.len();
                }
                m.unparsed_reactions += usize::from(!p.reaction_read);
                m.unparsed_exits += usize::from(!p.exit_read);
                if let Some(r) = &p.reflection {
                    refl_n += 1;
                    refl_sat += usize::from(parse::satisfaction(r) == Some(true));
                }
                for &i in &p.items {
                    for gname in &cat.genres[i as usize] {
                        genres.insert(gname.clone());
                    }
                    pop.push(counts.get(i as usize).copied().unwrap_or(0) as f64);
                }
            }
            // per-agent likes mean (the reference averages per agent first)
            let n_pages = e.pages.len().max(1);
            let agent_likes: f64 =
                e.pages.iter().map(|p| p.aligned.len() as f64).sum::<f64>() / n_pages as f64;
            likes.push(agent_likes);
            prec.push(hits as f64 / al.max(1) as f64);
            rec.push(hits as f64 / gt.max(1) as f64);
            click.push(w as f64 / (cfg.pages * cfg.per_page).max(1) as f64);
            watch.push(w as f64 / shown.max(1) as f64);
            exitp.push(e.exit_page() as f64);
            if let Some(b) = m.exit_pages.get_mut(e.exit_page().saturating_sub(1)) {
                *b += 1;
            }
            genre_div.push(genres.len() as f64);
            if let Some(r) = e.interview.rating {
                sats.push(r as f64);
                m.interview_counts[(r - 1) as usize] += 1;
            } else {
                m.unparsed_interviews += 1;
            }
            m.retries += e.usage.retries;
            m.calls += e.usage.calls;
            m.calls_from_journal += e.usage.from_journal;
            m.prompt_tokens += e.usage.prompt_tokens;
            m.completion_tokens += e.usage.completion_tokens;
            m.pages += e.pages.len();
        }
        m.align_precision = mean(&prec);
        m.align_recall = mean(&rec);
        m.click_rate = mean(&click);
        m.watch_rate = mean(&watch);
        m.likes_per_page = mean(&likes);
        m.exit_page = mean(&exitp);
        for &r in &ratings {
            if (1..=5).contains(&r) {
                m.rating_counts[(r - 1) as usize] += 1;
            }
        }
        m.mean_rating = (!ratings.is_empty())
            .then(|| ratings.iter().map(|&r| r as f64).sum::<f64>() / ratings.len() as f64);
        m.satisfaction_n = sats.len();
        m.satisfaction = (!sats.is_empty()).then(|| mean(&sats));
        m.watch_rate_by_page = by_page
            .iter()
            .take_while(|b| b.1 > 0)
            .map(|b| b.0 as f64 / b.1 as f64)
            .collect();
        m.reflections = refl_n;
        m.reflections_satisfied = (refl_n > 0).then(|| refl_sat as f64 / refl_n as f64);
        m.genre_diversity = mean(&genre_div);
        m.shown_popularity = mean(&pop);
        let n = eps.len().max(1) as f64;
        m.tokens_per_agent = (m.prompt_tokens + m.completion_tokens) as f64 / n;
        m.calls_per_agent = m.calls as f64 / n;
        m.seconds_per_agent = eps.iter().map(|e| e.seconds).sum::<f64>() / n;
        let group = |f: fn(&Episode) -> u8| -> Vec<TraitGroup> {
            (1..=3u8)
                .map(|lvl| {
                    let g: Vec<&Episode> = eps.iter().filter(|e| f(e) == lvl).collect();
                    let s: Vec<f64> = g
                        .iter()
                        .filter_map(|e| e.interview.rating.map(f64::from))
                        .collect();
                    TraitGroup {
                        level: lvl,
                        agents: g.len(),
                        exit_page: mean(
                            &g.iter().map(|e| e.exit_page() as f64).collect::<Vec<_>>(),
                        ),
                        watch_rate: mean(
                            &g.iter()
                                .map(|e| {
                                    let w: usize = e.pages.iter().map(|p| p.watched.len()).sum();
                                    let s: usize = e.pages.iter().map(|p| p.items.len()).sum();
                                    w as f64 / s.max(1) as f64
                                })
                                .collect::<Vec<_>>(),
                        ),
                        satisfaction: (!s.is_empty()).then(|| mean(&s)),
                    }
                })
                .collect()
        };
        m.by_activity = group(|e| e.activity);
        m.by_conformity = group(|e| e.conformity);
        m.by_diversity = group(|e| e.diversity);
        m
    }
}

// ---------------------------------------------------------------------------------------------
// The taste-discrimination test

/// One agent's forced choice at one ratio.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ForcedRecord {
    pub user: u32,
    pub items: Vec<u32>,
    pub truth: Vec<bool>,
    /// WATCH per item (`None`: unreadable, counted as no).
    pub said: Vec<Option<bool>>,
    pub read: bool,
    pub usage: AgentUsage,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DiscMetrics {
    pub ratio: usize,
    pub agents: usize,
    pub failed: usize,
    pub items_per_agent: f64,
    pub accuracy: f64,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Share of items the agents said yes to.
    pub yes_rate: f64,
    pub unparsed: usize,
    pub calls: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl DiscMetrics {
    /// Per-agent accuracy / precision / recall / F1 (0 where undefined), averaged over agents.
    pub fn compute(ratio: usize, recs: &[ForcedRecord], failed: usize) -> DiscMetrics {
        let mut m = DiscMetrics {
            ratio,
            agents: recs.len(),
            failed,
            ..Default::default()
        };
        let (mut acc, mut pr, mut rc, mut f1, mut yes, mut n_items) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        for r in recs {
            let (mut tp, mut fp, mut fneg, mut tn) = (0f64, 0f64, 0f64, 0f64);
            for (t, s) in r.truth.iter().zip(&r.said) {
                let s = s.unwrap_or(false);
                match (t, s) {
                    (true, true) => tp += 1.0,
                    (false, true) => fp += 1.0,
                    (true, false) => fneg += 1.0,
                    (false, false) => tn += 1.0,
                }
            }
            let n = (tp + fp + fneg + tn).max(1.0);
            let p = if tp + fp > 0.0 { tp / (tp + fp) } else { 0.0 };
            let rcl = if tp + fneg > 0.0 {
                tp / (tp + fneg)
            } else {
                0.0
            };
            acc.push((tp + tn) / n);
            pr.push(p);
            rc.push(rcl);
            f1.push(if p + rcl > 0.0 {
                2.0 * p * rcl / (p + rcl)
            } else {
                0.0
            });
            yes.push((tp + fp) / n);
            n_items.push(n);
            m.unparsed += usize::from(!r.read);
            m.calls += r.usage.calls;
            m.prompt_tokens += r.usage.prompt_tokens;
            m.completion_tokens += r.usage.completion_tokens;
        }
        m.accuracy = mean(&acc);
        m.precision = mean(&pr);
        m.recall = mean(&rc);
        m.f1 = mean(&f1);
        m.yes_rate = mean(&yes);
        m.items_per_agent = mean(&n_items);
        m
    }
}

/// Candidates of the 1:m test for user `u`: c = min(|valid ∪ test|, 20 / (m+1)) observed items
/// and c·m never-interacted ones, shuffled (seeded).
pub fn forced_candidates(
    ds: &Dataset,
    u: u32,
    m: usize,
    seed: u64,
) -> Result<(Vec<u32>, Vec<bool>)> {
    let s = ds
        .split
        .as_ref()
        .ok_or_else(|| AgentError::Input(format!("{}: needs train/valid/test", ds.name)))?;
    let mut rng = rudder_data::rng::stream(seed, &[0x6469_7363, m as u64, u as u64]);
    let mut observed: Vec<u32> = s.valid.items(u).to_vec();
    observed.extend_from_slice(s.test.items(u));
    observed.sort_unstable();
    observed.dedup();
    let seen: HashSet<u32> = observed
        .iter()
        .copied()
        .chain(s.train.items(u).iter().copied())
        .collect();
    let c = observed.len().min(20 / (m + 1));
    observed.shuffle(&mut rng);
    observed.truncate(c);
    let mut unobserved: Vec<u32> = (0..ds.n_items() as u32)
        .filter(|i| !seen.contains(i))
        .collect();
    if unobserved.len() < c * m {
        return Err(AgentError::Input(format!(
            "user {u}: only {} never-interacted items for a 1:{m} test with {c} positives",
            unobserved.len()
        )));
    }
    unobserved.shuffle(&mut rng);
    unobserved.truncate(c * m);
    let mut items: Vec<(u32, bool)> = observed
        .into_iter()
        .map(|i| (i, true))
        .chain(unobserved.into_iter().map(|i| (i, false)))
        .collect();
    items.shuffle(&mut rng);
    Ok(items.into_iter().unzip())
}

/// P5 for one agent.
pub async fn forced_choice(
    env: &Env<'_>,
    scope: &str,
    profile: &Profile,
    items: Vec<u32>,
    truth: Vec<bool>,
) -> Result<ForcedRecord> {
    let mut ctx = Ctx::new(env, scope, profile.user);
    let cat = env.catalog;
    let lines: Vec<String> = items.iter().map(|&i| cat.line(i)).collect();
    let titles = titles_of(cat, &items);
    let (system, user) = prompts::forced_messages(profile, &lines);
    let messages = vec![ChatMessage::system(&system), ChatMessage::user(&user)];
    let (said, read) = match env.cfg.decisions {
        Decisions::Text => {
            let (v, ok, _, _) = ctx
                .ask("forced", messages, |text| {
                    let v = parse::forced_choice(text, &titles);
                    let ok = v.iter().all(Option::is_some);
                    (v, ok)
                })
                .await?;
            (v, ok)
        }
        Decisions::Logprob => {
            let groups = titles
                .iter()
                .map(|t| {
                    (
                        options::forced(t),
                        (|p: &Priors| p.forced.as_slice()) as PriorOf,
                    )
                })
                .collect();
            let v: Vec<Option<bool>> = ctx
                .choose_groups("forced", messages, groups)
                .await?
                .into_iter()
                .map(|c| Some(c == 0))
                .collect();
            (v, true)
        }
    };
    let r = ForcedRecord {
        user: profile.user,
        items,
        truth,
        said,
        read,
        usage: ctx.usage,
    };
    env.journal.step(scope, profile.user, "forced", json!(r))?;
    Ok(r)
}

/// The discrimination test at each ratio 1:m.
pub async fn discriminate(
    env: &Env<'_>,
    ds: &Dataset,
    profiles: &[Profile],
    ratios: &[usize],
) -> Result<Vec<(DiscMetrics, Vec<ForcedRecord>)>> {
    ensure_priors(env).await?;
    let mut out = Vec::new();
    for &m in ratios {
        let scope = format!("disc/1:{m}");
        let mut cands = Vec::new();
        for p in profiles {
            cands.push(forced_candidates(ds, p.user, m, env.cfg.seed)?);
        }
        let users: Vec<u32> = profiles.iter().map(|p| p.user).collect();
        let (recs, failures) = run_all(env, &scope, &users, |k| {
            let scope = scope.clone();
            let (items, truth) = cands[k].clone();
            let p = &profiles[k];
            async move { forced_choice(env, &scope, p, items, truth).await }
        })
        .await?;
        let failed = failures.len();
        out.push((DiscMetrics::compute(m, &recs, failed), recs));
    }
    Ok(out)
}

/// The LightGCN-format train file of a round's feedback (`user item item …`, the data's own
/// ids).
pub fn feedback_lines(ds: &Dataset, train: &Interactions) -> String {
    let mut s = String::new();
    for u in 0..train.n_users() as u32 {
        s.push_str(ds.users.ext(u));
        for &i in train.items(u) {
            s.push(' ');
            s.push_str(ds.items.ext(i));
        }
        s.push('\n');
    }
    s
}

/// Episodes as JSON lines (behaviour), interviews as JSON lines, and the transcript.
pub fn episode_lines(round: &Round) -> (String, String, String) {
    let (mut b, mut iv, mut tr) = (String::new(), String::new(), String::new());
    for e in &round.episodes {
        b.push_str(
            &json!({"round": round.round, "user": e.user, "activity": e.activity,
                "conformity": e.conformity, "diversity": e.diversity, "exit_page": e.exit_page(),
                "pages": e.pages, "usage": e.usage, "seconds": e.seconds})
            .to_string(),
        );
        b.push('\n');
        iv.push_str(
            &json!({"round": round.round, "user": e.user, "rating": e.interview.rating,
                "reason": e.interview.reason, "reply": e.interview.reply})
            .to_string(),
        );
        iv.push('\n');
        for x in &e.exchanges {
            tr.push_str(&json!({"round": round.round, "user": e.user, "exchange": x}).to_string());
            tr.push('\n');
        }
    }
    (b, iv, tr)
}

// ---------------------------------------------------------------------------------------------
// Persona generation (P6)

/// A user's rating history grouped by rating value 1..5 (titles, shuffled with the seed, at most
/// `per_rating` each), from the train split when there is one.
pub fn rating_history(
    ds: &Dataset,
    u: u32,
    per_rating: usize,
    seed: u64,
) -> Result<[Vec<String>; 5]> {
    let inter = ds
        .split
        .as_ref()
        .map(|s| &s.train)
        .unwrap_or(&ds.interactions);
    let ratings = inter.ratings(u).ok_or_else(|| {
        AgentError::Input(format!(
            "{}: no ratings: persona generation needs a dataset with ratings and titles (e.g. ml-100k, ml-1m)",
            ds.name
        ))
    })?;
    let titles = ds
        .item_table
        .title
        .as_ref()
        .ok_or_else(|| AgentError::Input(format!("{}: the items have no titles", ds.name)))?;
    let mut rows: Vec<(u32, f32)> = inter
        .items(u)
        .iter()
        .copied()
        .zip(ratings.iter().copied())
        .collect();
    let mut rng = rudder_data::rng::stream(seed, &[0x7065_7273, u as u64]);
    rows.shuffle(&mut rng);
    let mut out: [Vec<String>; 5] = Default::default();
    for (i, r) in rows {
        let k = (r.round() as i64).clamp(1, 5) as usize - 1;
        if out[k].len() < per_rating {
            out[k].push(titles[i as usize].clone());
        }
    }
    Ok(out)
}

/// Generate personas (P6) for `users`; each reply is read as TASTE/REASON pairs and HIGH/LOW
/// RATINGS (retried when no TASTE line can be read).
pub async fn personas(
    env: &Env<'_>,
    ds: &Dataset,
    users: &[u32],
    per_rating: usize,
) -> Result<(Vec<PersonaRecord>, Vec<(u32, String)>)> {
    let mut hist = Vec::with_capacity(users.len());
    for &u in users {
        hist.push(rating_history(ds, u, per_rating, env.cfg.seed)?);
    }
    run_all(env, "persona", users, |k| {
        let h = &hist[k];
        let u = users[k];
        async move {
            let mut ctx = Ctx::new(env, "persona", u);
            let (system, user) = prompts::persona_messages(h);
            // the reference sends the user message first
            let messages = vec![ChatMessage::user(&user), ChatMessage::system(&system)];
            let (persona, read, _, _) = ctx
                .ask("persona", messages, |text| {
                    let p = parse::persona(text);
                    let ok = !p.taste.is_empty();
                    (p, ok)
                })
                .await?;
            env.journal.step(
                "persona",
                u,
                "done",
                json!({"persona": persona, "read": read}),
            )?;
            Ok(PersonaRecord {
                user: u,
                persona,
                read,
                tokens: ctx.usage.prompt_tokens + ctx.usage.completion_tokens,
            })
        }
    })
    .await
}

/// One generated persona.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PersonaRecord {
    pub user: u32,
    pub persona: parse::Persona,
    /// A TASTE line was readable (after the retries).
    pub read: bool,
    pub tokens: u64,
}

/// `personas.csv` in Agent4Rec's layout (`taste,reason,high_rating,low_rating`, lists joined
/// with `"| "`, row k = the k-th user given).
pub fn personas_csv(rows: &[PersonaRecord]) -> String {
    let q = |v: &[String]| format!("\"{}\"", v.join("| ").replace('"', "\"\""));
    let mut s = String::from("taste,reason,high_rating,low_rating\n");
    for p in rows.iter().map(|r| &r.persona) {
        s.push_str(&format!(
            "{},{},{},{}\n",
            q(&p.taste),
            q(&p.reason),
            q(&p.high_rating),
            q(&p.low_rating)
        ));
    }
    s
}
