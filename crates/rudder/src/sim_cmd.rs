//! `rudder sim agent4rec`: generative user agents browsing a recommender (docs/sim.md).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};

use rudder_agents::agent4rec::{self, Catalog, Decisions, Env, Recommender, SimConfig};
use rudder_agents::journal::Journal;
use rudder_agents::memory::{Embedder, EncoderEmbedder, HashEmbedder};
use rudder_agents::pages::{self, Baseline};
use rudder_client::LlmClient;
use rudder_data::io::write_bytes_atomic;

#[derive(Subcommand)]
pub enum SimCmd {
    /// Agent4Rec: one LLM agent per MovieLens user browses pages of recommendations (a CF run,
    /// popularity or random), aligns, watches, rates, reflects, leaves, and is interviewed;
    /// `--mode discriminate` runs the 1:m taste-discrimination test; `personas` writes personas.
    Agent4rec(Agent4recArgs),
}

#[derive(Args, Clone, Debug, Serialize, Deserialize)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Agent4recArgs {
    #[command(subcommand)]
    #[serde(skip)]
    pub sub: Option<PersonaCmd>,
    /// Agent4Rec data folder (train/valid/test.txt, movie_detail.csv, user_statistic.csv,
    /// personas.csv), e.g. ../shared/data/agent4rec-ml1m.
    #[arg(long)]
    pub data: Option<String>,
    /// The recommender in the loop: a `rudder cf train` run folder (MF, LightGCN, AlphaRec…)
    /// trained on the same items, `pop` (the reference's 40 random among the 600 most popular),
    /// `pop-plain` (by popularity) or `random`.
    #[arg(long)]
    pub recommender: Option<String>,
    /// Agents (users 0..N, as the reference).
    #[arg(long, default_value_t = 50)]
    pub agents: usize,
    /// Pages at most per agent.
    #[arg(long, default_value_t = 5)]
    pub pages: usize,
    /// Items per page.
    #[arg(long, default_value_t = 4)]
    pub per_page: usize,
    /// The language model: `inproc:MODEL` (an asset name, .gguf or folder) or the base URL of an
    /// OpenAI-compatible server (http://127.0.0.1:8080/v1).
    #[arg(long, default_value = "inproc:smollm2-135m-instruct")]
    pub llm: String,
    /// Model name sent to a server.
    #[arg(long)]
    pub model: Option<String>,
    /// Record/replay file of LLM exchanges (JSON Lines).
    #[arg(long)]
    pub llm_cache: Option<PathBuf>,
    /// off | record | replay | record-missing (default with a cache file: record-missing).
    #[arg(long, default_value = "record-missing")]
    pub llm_cache_mode: String,
    /// Requests in flight at once (also the number of agents working at once).
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Seconds one LLM request may take, waiting in the engine's queue included (an in-process
    /// model serves requests one prefill at a time, so many agents in flight wait long).
    #[arg(long, default_value_t = 900.0)]
    #[serde(default = "default_llm_timeout")]
    pub llm_timeout: f64,
    /// How choices are read: `text` (the replies, as the reference) or `logprob` (the model's
    /// probabilities over the allowed answers; in-process or log-prob-capable servers).
    #[arg(long, default_value = "text")]
    pub decisions: String,
    /// With --decisions logprob: each option's log-probability relative to the same question
    /// with the agent's first message (persona, state, memories) replaced by "N/A" (contextual
    /// calibration), which removes a small model's prior for the answer words.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    #[serde(default = "yes")]
    pub calibrate: bool,
    /// simulate | discriminate (the 1:m taste test of --ratios).
    #[arg(long, default_value = "simulate")]
    pub mode: String,
    /// Ratios m of the discrimination test (1:m positives to negatives).
    #[arg(long, default_value = "1,3,9", value_delimiter = ',')]
    pub ratios: Vec<usize>,
    /// Rounds of simulate → retrain on the agents' feedback → simulate (filter bubble).
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    #[arg(long, default_value_t = 101)]
    pub seed: u64,
    /// Sampling temperature (the reference: 0.2).
    #[arg(long, default_value_t = 0.2)]
    pub temperature: f32,
    /// Longest reply, tokens (the reference: 1000).
    #[arg(long, default_value_t = 512)]
    pub max_tokens: u32,
    /// Extra attempts for a reply that cannot be read.
    #[arg(long, default_value_t = 2)]
    pub retries: u32,
    /// Read replies as the reference does (strict regexes, exact catalogue titles): loses the
    /// rewritten titles, as the paper's numbers did.
    #[arg(long)]
    pub faithful: bool,
    /// Do not ask the exit question on the last allowed page (saves a call; the reference asks).
    #[arg(long)]
    pub skip_last_exit: bool,
    /// Memory embeddings: a sentence encoder (asset name or folder; default MiniLM) or `hash`
    /// (hashed bag of words, no model).
    #[arg(long, default_value = "all-minilm-l6-v2")]
    pub embedder: String,
    /// Price per 1,000 tokens for the cost estimate (the reference's figure: 0.0018).
    #[arg(long, default_value_t = 0.0018)]
    pub price_per_1k: f64,
    /// Output run folder.
    #[arg(long)]
    #[serde(skip)]
    pub out: Option<PathBuf>,
    /// Continue the run in this folder (after a crash or kill) with its recorded settings.
    #[arg(long)]
    #[serde(skip)]
    pub resume: Option<PathBuf>,
    /// With --resume: grow the run to N agents (users 0..N); the agents already simulated are
    /// kept from the journal.
    #[arg(long, requires = "resume")]
    #[serde(skip)]
    pub extend_to: Option<usize>,
}

#[derive(Subcommand, Clone, Debug)]
pub enum PersonaCmd {
    /// Generate personas (P6: taste/reason pairs and rating habits) from each user's rating
    /// history, written as Agent4Rec's personas.csv.
    Personas(PersonaArgs),
}

#[derive(Args, Clone, Debug)]
pub struct PersonaArgs {
    /// A dataset with ratings and titles (ml-100k, ml-1m, a MovieLens folder…).
    #[arg(long)]
    pub data: String,
    /// Users 0..N.
    #[arg(long, default_value_t = 20)]
    pub users: usize,
    /// Titles at most per rating value (the reference: 100).
    #[arg(long, default_value_t = 100)]
    pub per_rating: usize,
    #[arg(long, default_value = "inproc:smollm2-135m-instruct")]
    pub llm: String,
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long)]
    pub llm_cache: Option<PathBuf>,
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    #[arg(long, default_value_t = 101)]
    pub seed: u64,
    #[arg(long, default_value_t = 0.2)]
    pub temperature: f32,
    #[arg(long, default_value_t = 768)]
    pub max_tokens: u32,
    /// Output folder (personas.csv, journal.jsonl, summary.md); an interrupted run resumes.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(c: SimCmd) -> Result<()> {
    match c {
        SimCmd::Agent4rec(a) => match a.sub.clone() {
            Some(PersonaCmd::Personas(p)) => personas(p),
            None => agent4rec_run(a),
        },
    }
}

pub fn client(
    llm: &str,
    model: &Option<String>,
    cache: &Option<PathBuf>,
    mode: &str,
    conc: usize,
    timeout_s: f64,
) -> Result<rudder_client::Client> {
    let mut spec = rudder_client::LlmSpec::new(llm);
    spec.timeout_s = timeout_s;
    spec.model = model.clone();
    spec.cache = cache.clone();
    spec.cache_mode = mode
        .parse()
        .map_err(|e: String| anyhow!("--llm-cache-mode: {e}"))?;
    spec.concurrency = conc.max(1);
    let sp = crate::progress::spinner(&format!("opening {llm}"));
    let c = rudder_client::Client::from_spec(&spec)?;
    sp.finish_and_clear();
    Ok(c)
}

fn default_llm_timeout() -> f64 {
    900.0
}

fn yes() -> bool {
    true
}

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

pub fn embedder(name: &str) -> Result<Arc<dyn Embedder>> {
    if name == "hash" {
        return Ok(Arc::new(HashEmbedder { dim: 384 }));
    }
    let dir = crate::lm_cmd::resolve_model(name)
        .with_context(|| format!("--embedder {name}: not a fetched encoder or folder (try `rudder assets fetch all-minilm-l6-v2`, or --embedder hash)"))?;
    Ok(Arc::new(EncoderEmbedder::load(&dir, name)?))
}

/// Agents done / pages / tokens on one bar with ETA.
struct Bar {
    pb: indicatif::ProgressBar,
    pages: AtomicU64,
    tokens: AtomicU64,
    failed: AtomicU64,
}

impl Bar {
    fn new(n: u64, what: &str) -> Bar {
        let pb = indicatif::ProgressBar::new(n);
        pb.set_style(
            indicatif::ProgressStyle::with_template(&format!(
                "{{bar:30}} {{pos}}/{{len}} {what} {{msg}} [{{elapsed}} < {{eta}}]"
            ))
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Bar {
            pb,
            pages: AtomicU64::new(0),
            tokens: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }
    fn msg(&self) {
        self.pb.set_message(format!(
            "· {} pages · {}k tokens{}",
            self.pages.load(Ordering::Relaxed),
            self.tokens.load(Ordering::Relaxed) / 1000,
            match self.failed.load(Ordering::Relaxed) {
                0 => String::new(),
                f => format!(" · {f} failed"),
            }
        ));
    }
}

impl agent4rec::Progress for Bar {
    fn page(&self, _agent: u32, _page: usize) {
        self.pages.fetch_add(1, Ordering::Relaxed);
        self.msg();
    }
    fn agent_done(&self, _agent: u32, tokens: u64, failed: bool) {
        self.tokens.fetch_add(tokens, Ordering::Relaxed);
        if failed {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        self.pb.inc(1);
        self.msg();
    }
}

/// The settings a journal belongs to (everything that changes an exchange; not the number of
/// agents: an agent's episode does not depend on how many others run, so a run can grow).
fn header(a: &Agent4recArgs, model: &str) -> serde_json::Value {
    serde_json::json!({
        "t": "header",
        "prompts": rudder_agents::prompts::VERSION,
        "data": a.data, "recommender": a.recommender, "pages": a.pages,
        "per_page": a.per_page, "llm": a.llm, "model": model, "decisions": a.decisions,
        "mode": a.mode, "ratios": a.ratios, "rounds": a.rounds, "seed": a.seed,
        "temperature": a.temperature, "max_tokens": a.max_tokens, "retries": a.retries,
        "faithful": a.faithful, "skip_last_exit": a.skip_last_exit, "embedder": a.embedder,
        "calibrate": a.calibrate && a.decisions == "logprob",
    })
}

fn agent4rec_run(mut a: Agent4recArgs) -> Result<()> {
    let resume = a.resume.is_some();
    let out = if let Some(r) = a.resume.clone() {
        let p = r.join("config.toml");
        let text = std::fs::read_to_string(&p).with_context(|| {
            format!(
                "--resume: reading {} (is this a simulation run folder?)",
                p.display()
            )
        })?;
        let mut saved: Agent4recArgs =
            toml::from_str(&text).map_err(|e| anyhow!("{}: {e}", p.display()))?;
        // how to reach the model may change between attempts; what it is asked may not
        saved.llm_cache = a.llm_cache.clone().or(saved.llm_cache);
        saved.llm_cache_mode = a.llm_cache_mode.clone();
        saved.concurrency = a.concurrency;
        saved.llm_timeout = a.llm_timeout;
        if let Some(n) = a.extend_to {
            if saved.rounds > 1 {
                bail!(
                    "--extend-to: a run of several rounds cannot grow (later rounds train on every agent's feedback)"
                );
            }
            if n < saved.agents {
                bail!(
                    "--extend-to {n}: the run already has {} agents (a run can grow, not shrink)",
                    saved.agents
                );
            }
            saved.agents = n;
            write_bytes_atomic(&p, toml::to_string(&saved)?.as_bytes())?;
        }
        a = saved;
        r
    } else {
        a.out
            .clone()
            .ok_or_else(|| anyhow!("--out DIR is required (or --resume RUN)"))?
    };
    let data = a.data.clone().ok_or_else(|| {
        anyhow!("--data is required (an Agent4Rec folder such as ../shared/data/agent4rec-ml1m)")
    })?;
    let rec_arg = a.recommender.clone().ok_or_else(|| {
        anyhow!("--recommender is required (a CF run folder, pop, pop-plain or random)")
    })?;
    let decisions: Decisions = a
        .decisions
        .parse()
        .map_err(|e: String| anyhow!("--decisions: {e}"))?;
    let discriminate = match a.mode.as_str() {
        "simulate" => false,
        "discriminate" => true,
        o => bail!("--mode {o:?}: expected simulate or discriminate"),
    };
    if a.pages == 0 || a.per_page == 0 {
        bail!("--pages and --per-page must be at least 1");
    }
    if discriminate && a.ratios.is_empty() {
        bail!("--ratios: give at least one ratio m (1:m)");
    }
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    if !resume {
        if out.join("journal.jsonl").exists() {
            bail!(
                "{} already holds a simulation: continue it with --resume {}, or choose another --out",
                out.display(),
                out.display()
            );
        }
        write_bytes_atomic(&out.join("config.toml"), toml::to_string(&a)?.as_bytes())?;
    }
    let ds = crate::cf_cmd::load_split(&data, None, None, 2020)?;
    let catalog = Catalog::from_dataset(&ds)?;
    let profiles = agent4rec::profiles(&ds, a.agents)?;
    let recommender = if discriminate {
        None
    } else if let Ok(b) = rec_arg.parse::<Baseline>() {
        Some(Recommender::Baseline(b))
    } else {
        let run = Path::new(&rec_arg);
        if !run.join("config.toml").exists() {
            bail!(
                "--recommender {rec_arg}: not pop, pop-plain, random or a `rudder cf train` run folder (no config.toml there)"
            );
        }
        let (cfg, run_ds, scorer, inputs) = crate::cf_cmd::open_run(run)?;
        pages::check_same_items(&ds.items, &run_ds.items, &rec_arg)?;
        if run_ds.users.len() < a.agents {
            bail!(
                "--recommender {rec_arg}: the run knows {} users, fewer than --agents {}",
                run_ds.users.len(),
                a.agents
            );
        }
        for u in 0..a.agents as u32 {
            if run_ds.users.ext(u) != ds.users.ext(u) {
                bail!(
                    "--recommender {rec_arg}: user {u} is `{}` in the run but `{}` in {data}: the run was trained on other users",
                    run_ds.users.ext(u),
                    ds.users.ext(u)
                );
            }
        }
        Some(Recommender::Cf {
            name: rec_arg.clone(),
            cfg: Box::new(cfg),
            inputs,
            scorer,
        })
    };
    let emb = embedder(&a.embedder)?;
    let mut client = client(
        &a.llm,
        &a.model,
        &a.llm_cache,
        &a.llm_cache_mode,
        a.concurrency,
        a.llm_timeout,
    )?;
    client.price = Some(rudder_client::Price {
        prompt_per_1k: a.price_per_1k,
        completion_per_1k: a.price_per_1k,
    });
    let model = a.model.clone().unwrap_or_else(|| client.default_model());
    let journal = Journal::open(&out.join("journal.jsonl"), &header(&a, &model), resume)?;
    if resume {
        eprintln!(
            "resuming {}: {} journal lines, {} answered calls{}",
            out.display(),
            journal.resumed_lines,
            journal.n_calls(),
            if journal.repaired_bytes > 0 {
                format!(
                    ", a torn last line of {} bytes cut off",
                    journal.repaired_bytes
                )
            } else {
                String::new()
            }
        );
    }
    let cfg = SimConfig {
        agents: a.agents,
        pages: a.pages,
        per_page: a.per_page,
        seed: a.seed,
        temperature: a.temperature,
        max_tokens: a.max_tokens,
        decisions,
        retries: a.retries,
        faithful: a.faithful,
        skip_last_exit: a.skip_last_exit,
        calibrate: a.calibrate,
        concurrency: a.concurrency,
        model: model.clone(),
    };
    let units = if discriminate {
        a.agents * a.ratios.len()
    } else {
        a.agents * a.rounds.max(1)
    };
    let bar = Bar::new(units as u64, "agents");
    let env = Env {
        client: &client,
        journal: &journal,
        cfg: &cfg,
        catalog: &catalog,
        embedder: emb.clone(),
        progress: &bar,
        priors: Default::default(),
    };
    let rt = runtime()?;
    let t0 = std::time::Instant::now();
    let mut summary = format!(
        "# Agent4Rec simulation\n\n{} agents (users 0–{}) of `{data}`, LLM `{}` ({}), decisions from {}, memory embeddings: {}.\n\n",
        a.agents,
        a.agents.saturating_sub(1),
        model,
        client.describe(),
        if decisions == Decisions::Text {
            "the replies' text"
        } else {
            "log-probabilities"
        },
        emb.describe()
    );
    let mut metrics = serde_json::json!({});
    if discriminate {
        let res = rt.block_on(agent4rec::discriminate(&env, &ds, &profiles, &a.ratios))?;
        bar.pb.finish_and_clear();
        summary.push_str(
            "## Taste discrimination\n\nEach agent judges a shuffled list of items it rated in the held-out splits (valid ∪ test) and never-seen ones at 1:m; positive = observed. Per-agent scores averaged over agents.\n\n| ratio | agents | items/agent | accuracy | precision | recall | F1 | said yes | unreadable |\n|---|---|---|---|---|---|---|---|---|\n"
        );
        let mut rows = Vec::new();
        let mut lines = String::new();
        for (m, recs) in &res {
            summary.push_str(&format!(
                "| 1:{} | {} | {:.1} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {} |\n",
                m.ratio,
                m.agents,
                m.items_per_agent,
                m.accuracy,
                m.precision,
                m.recall,
                m.f1,
                m.yes_rate,
                m.unparsed
            ));
            rows.push(serde_json::to_value(m)?);
            for r in recs {
                lines.push_str(&serde_json::json!({"ratio": m.ratio, "record": r}).to_string());
                lines.push('\n');
            }
        }
        summary.push_str(
            "\nThe paper reports about 69 % accuracy at 1:1 with gpt-3.5-turbo (MovieLens).\n",
        );
        write_bytes_atomic(&out.join("discrimination.jsonl"), lines.as_bytes())?;
        metrics["discrimination"] = serde_json::Value::Array(rows);
        let series: Vec<(String, Vec<(f64, f64)>)> = ["accuracy", "precision", "recall", "f1"]
            .iter()
            .map(|k| {
                (
                    k.to_string(),
                    res.iter()
                        .enumerate()
                        .map(|(x, (m, _))| {
                            let v = serde_json::to_value(m).unwrap_or_default();
                            (x as f64 + 1.0, v[*k].as_f64().unwrap_or(0.0))
                        })
                        .collect(),
                )
            })
            .collect();
        let refs: Vec<(&str, Vec<(f64, f64)>)> = series
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        plot(crate::plots::bars(
            &out.join("discrimination.png"),
            &format!("taste discrimination at 1:{:?} (x = ratio index)", a.ratios),
            "ratio (1 = first of --ratios)",
            "score",
            &refs,
        ));
    } else {
        let rec = recommender.expect("simulate has a recommender");
        let rec_name = rec.name();
        let outd = out.clone();
        let dsr = &ds;
        let rounds = rt.block_on(agent4rec::simulate(
            &env,
            &ds,
            &profiles,
            rec,
            a.rounds,
            &mut |r, next_train| {
                let (b, iv, tr) = agent4rec::episode_lines(r);
                let sfx = if a.rounds > 1 {
                    format!("_r{}", r.round)
                } else {
                    String::new()
                };
                write_bytes_atomic(&outd.join(format!("behaviour{sfx}.jsonl")), b.as_bytes())?;
                write_bytes_atomic(&outd.join(format!("interviews{sfx}.jsonl")), iv.as_bytes())?;
                write_bytes_atomic(&outd.join(format!("transcript{sfx}.jsonl")), tr.as_bytes())?;
                write_bytes_atomic(
                    &outd.join(format!("feedback_train{sfx}.txt")),
                    agent4rec::feedback_lines(dsr, next_train).as_bytes(),
                )?;
                Ok(())
            },
        ))?;
        bar.pb.finish_and_clear();
        summary.push_str(&format!(
            "Recommender: `{rec_name}`; {} pages × {} items at most; seed {}.\n\n",
            a.pages, a.per_page, a.seed
        ));
        let last = rounds.last().expect("at least one round");
        summary.push_str(&sim_summary(&rounds));
        let mut lines = String::new();
        for r in &rounds {
            let mut v = serde_json::to_value(&r.metrics)?;
            v["round"] = r.round.into();
            v["train_size"] = r.train_size.into();
            v["failures"] = serde_json::to_value(&r.failures)?;
            lines.push_str(&v.to_string());
            lines.push('\n');
        }
        write_bytes_atomic(&out.join("metrics.jsonl"), lines.as_bytes())?;
        metrics["recommender"] = rec_name.into();
        metrics["rounds"] =
            serde_json::from_str(&format!("[{}]", lines.trim_end().replace('\n', ",")))?;
        metrics["simulation"] = serde_json::to_value(&last.metrics)?;
        sim_plots(&out, &rounds);
    }
    if let Some(p) = env.priors.get() {
        metrics["priors"] = serde_json::to_value(p)?;
        let f = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        summary.push_str(&format!(
            "\nCalibration (content-free log-probabilities subtracted from every decision): ALIGN yes/no [{}], EXIT/NEXT [{}], rating 1–5 [{}], interview 1–10 [{}].\n",
            f(&p.align), f(&p.exit), f(&p.rating), f(&p.interview)
        ));
    }
    let usage = client.report();
    metrics["llm"] = serde_json::to_value(&usage)?;
    metrics["wall_seconds"] = t0.elapsed().as_secs_f64().into();
    summary.push_str(&format!(
        "\n## Cost\n\n{}\nWall time {:.0} s ({} calls answered from the journal of an interrupted run).\n",
        usage.markdown(),
        t0.elapsed().as_secs_f64(),
        journal.n_calls()
    ));
    summary.push_str("\nFiles: `metrics.json` (every number), `metrics.jsonl` (one line per round), `behaviour*.jsonl` (per agent and page), `interviews*.jsonl`, `transcript*.jsonl` (every exchange), `feedback_train*.txt` (train + aligned items, LightGCN lines), `journal.jsonl` (append-only; `--resume` continues from it), plots `*.png`.\n");
    write_bytes_atomic(
        &out.join("metrics.json"),
        serde_json::to_string_pretty(&metrics)?.as_bytes(),
    )?;
    write_bytes_atomic(&out.join("summary.md"), summary.as_bytes())?;
    println!("{summary}");
    println!("wrote {}", out.display());
    Ok(())
}

fn plot(r: std::result::Result<(), String>) {
    if let Err(e) = r {
        tracing::warn!("plot skipped: {e}");
    }
}

fn opt(v: Option<f64>) -> String {
    v.map_or("–".into(), |x| format!("{x:.2}"))
}

fn sim_summary(rounds: &[agent4rec::Round]) -> String {
    let mut s = String::from(
        "## Simulation\n\n| round | agents | failed | exit page | watch rate | click rate (ref.) | likes/page | ALIGN precision (ref. \"recall\") | ALIGN recall (ref. \"precision\") | mean rating | satisfaction (1–10) | genres shown | popularity shown |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rounds {
        let m = &r.metrics;
        s.push_str(&format!(
            "| {} | {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.4} | {:.4} | {} | {} | {:.2} | {:.1} |\n",
            r.round, m.agents, m.failed, m.exit_page, m.watch_rate, m.click_rate, m.likes_per_page,
            m.align_precision, m.align_recall, opt(m.mean_rating), opt(m.satisfaction), m.genre_diversity, m.shown_popularity
        ));
    }
    let m = &rounds.last().expect("a round").metrics;
    s.push_str(&format!(
        "\nRatings given (1–5): {:?}. Interview ratings (1–10): {:?}. Exit after page 1, 2, …: {:?}. Watch rate by page: [{}].\n\n",
        m.rating_counts,
        m.interview_counts,
        m.exit_pages,
        m.watch_rate_by_page.iter().map(|x| format!("{x:.3}")).collect::<Vec<_>>().join(", ")
    ));
    s.push_str(&format!(
        "Reading: {} page reactions, {} exit answers and {} interviews stayed unreadable after the retries ({} retries in all); {} reflections, {} satisfied.\n\n",
        m.unparsed_reactions, m.unparsed_exits, m.unparsed_interviews, m.retries, m.reflections,
        m.reflections_satisfied.map_or("–".into(), |x| format!("{:.0} %", x * 100.0))
    ));
    s.push_str("### By trait (last round)\n\n| trait | level | agents | exit page | watch rate | satisfaction |\n|---|---|---|---|---|---|\n");
    for (name, g) in [
        ("activity", &m.by_activity),
        ("conformity", &m.by_conformity),
        ("diversity", &m.by_diversity),
    ] {
        for t in g.iter() {
            s.push_str(&format!(
                "| {name} | {} | {} | {:.2} | {:.3} | {} |\n",
                t.level,
                t.agents,
                t.exit_page,
                t.watch_rate,
                opt(t.satisfaction)
            ));
        }
    }
    s.push_str(&format!(
        "\nCalls {} ({:.1} per agent), tokens {:.0} per agent, {:.0} s per episode (agents run concurrently).\n",
        m.calls, m.calls_per_agent, m.tokens_per_agent, m.seconds_per_agent
    ));
    s
}

fn sim_plots(out: &Path, rounds: &[agent4rec::Round]) {
    let m = &rounds.last().expect("a round").metrics;
    let idx = |v: &[usize]| -> Vec<(f64, f64)> {
        v.iter()
            .enumerate()
            .map(|(k, &c)| (k as f64 + 1.0, c as f64))
            .collect()
    };
    plot(crate::plots::bars(
        &out.join("ratings.png"),
        "ratings the agents gave",
        "rating",
        "items",
        &[("ratings", idx(&m.rating_counts))],
    ));
    plot(crate::plots::bars(
        &out.join("interviews.png"),
        "interview: satisfaction with the recommender",
        "rating (1–10)",
        "agents",
        &[("agents", idx(&m.interview_counts))],
    ));
    plot(crate::plots::bars(
        &out.join("exit_pages.png"),
        "page on which agents left",
        "page",
        "agents",
        &[("agents", idx(&m.exit_pages))],
    ));
    plot(crate::plots::lines(
        &out.join("watch_by_page.png"),
        "watch rate per page (agents still browsing)",
        "page",
        &[(
            "watch rate",
            m.watch_rate_by_page
                .iter()
                .enumerate()
                .map(|(k, &x)| (k as f64 + 1.0, x))
                .collect(),
        )],
    ));
    let trait_series =
        |f: fn(&agent4rec::TraitGroup) -> f64| -> Vec<(&'static str, Vec<(f64, f64)>)> {
            [
                ("activity", &m.by_activity),
                ("conformity", &m.by_conformity),
                ("diversity", &m.by_diversity),
            ]
            .into_iter()
            .map(|(n, g)| (n, g.iter().map(|t| (t.level as f64, f(t))).collect()))
            .collect()
        };
    plot(crate::plots::bars(
        &out.join("traits_exit_page.png"),
        "exit page by trait level",
        "trait level",
        "mean exit page",
        &trait_series(|t| t.exit_page),
    ));
    plot(crate::plots::bars(
        &out.join("traits_watch_rate.png"),
        "watch rate by trait level",
        "trait level",
        "watch rate",
        &trait_series(|t| t.watch_rate),
    ));
    if rounds.len() > 1 {
        let per = |f: fn(&agent4rec::SimMetrics) -> f64| -> Vec<(f64, f64)> {
            rounds
                .iter()
                .map(|r| (r.round as f64, f(&r.metrics)))
                .collect()
        };
        plot(crate::plots::lines(
            &out.join("rounds_diversity.png"),
            "genres among the items shown, per round (filter bubble)",
            "round",
            &[(
                "distinct genres shown per agent",
                per(|m| m.genre_diversity),
            )],
        ));
        plot(crate::plots::lines(
            &out.join("rounds_popularity.png"),
            "popularity of the items shown, per round",
            "round",
            &[("mean train interactions", per(|m| m.shown_popularity))],
        ));
    }
}

fn personas(p: PersonaArgs) -> Result<()> {
    std::fs::create_dir_all(&p.out)?;
    let ds = crate::cf_cmd::load_split(&p.data, None, None, 2020)?;
    if p.users > ds.n_users() {
        bail!("--users {}: {} has {} users", p.users, p.data, ds.n_users());
    }
    let catalog = Catalog::from_dataset(&ds)?;
    let client = client(
        &p.llm,
        &p.model,
        &p.llm_cache,
        "record-missing",
        p.concurrency,
        900.0,
    )?;
    let model = p.model.clone().unwrap_or_else(|| client.default_model());
    let header = serde_json::json!({"t": "header", "prompts": rudder_agents::prompts::VERSION, "kind": "personas",
        "data": p.data, "users": p.users, "per_rating": p.per_rating, "llm": p.llm, "model": model,
        "seed": p.seed, "temperature": p.temperature, "max_tokens": p.max_tokens});
    let jp = p.out.join("journal.jsonl");
    let journal = Journal::open(&jp, &header, jp.exists())?;
    let cfg = SimConfig {
        seed: p.seed,
        temperature: p.temperature,
        max_tokens: p.max_tokens,
        concurrency: p.concurrency,
        model: model.clone(),
        ..Default::default()
    };
    let bar = Bar::new(p.users as u64, "personas");
    let env = Env {
        client: &client,
        journal: &journal,
        cfg: &cfg,
        catalog: &catalog,
        embedder: Arc::new(HashEmbedder { dim: 8 }),
        progress: &bar,
        priors: Default::default(),
    };
    let users: Vec<u32> = (0..p.users as u32).collect();
    let (rows, failed) =
        runtime()?.block_on(agent4rec::personas(&env, &ds, &users, p.per_rating))?;
    bar.pb.finish_and_clear();
    let unread = rows.iter().filter(|r| !r.read).count();
    if !failed.is_empty() {
        let f: Vec<String> = failed
            .iter()
            .map(|(u, e)| format!("user {u}: {e}"))
            .collect();
        bail!(
            "{} personas failed (the journal keeps the others; run again to resume): {}",
            f.len(),
            f.join("; ")
        );
    }
    write_bytes_atomic(
        &p.out.join("personas.csv"),
        agent4rec::personas_csv(&rows).as_bytes(),
    )?;
    let mean_taste =
        rows.iter().map(|r| r.persona.taste.len()).sum::<usize>() as f64 / rows.len().max(1) as f64;
    let md = format!(
        "# Personas\n\n{} users of `{}` through `{model}` ({}): {:.1} TASTE lines per persona, {} with no readable TASTE after the retries.\n\n{}\n",
        rows.len(),
        p.data,
        client.describe(),
        mean_taste,
        unread,
        client.report().markdown()
    );
    write_bytes_atomic(&p.out.join("summary.md"), md.as_bytes())?;
    println!("{md}wrote {}", p.out.join("personas.csv").display());
    Ok(())
}
