//! `rudder bench agentrec`: the AgentRecBench environment, scenario builders, recommenders
//! under test and the comparison report (docs/agentrec.md).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand};
use serde::Serialize;

use rudder_agents::agent4rec::Decisions;
use rudder_agents::agentrec::{self, BenchConfig, BenchEnv, BenchMetrics, Method, TaskRecord};
use rudder_agents::journal::Journal;
use rudder_agents::store::{BuildOptions, Store};
use rudder_agents::tasks::{self, BuildConfig, Scenario, TaskSet};
use rudder_client::LlmClient;
use rudder_data::io::write_bytes_atomic;

#[derive(Subcommand)]
pub enum BenchCmd {
    /// AgentRecBench: recommenders (classical or language-model agents) rank the 20 candidates
    /// of each task through a visibility-enforcing tool API; HR@1/3/5 and NDCG@5.
    #[command(subcommand)]
    Agentrec(AgentrecCmd),
}

#[derive(Subcommand)]
pub enum AgentrecCmd {
    /// Build the on-disk record store (users, items, reviews) once from an AgentSociety /
    /// AgentRecBench data folder (user.json, item.json, review.json; JSON Lines) or a
    /// timestamped dataset such as ml-1m / ml-100k.
    Store(StoreArgs),
    /// Write one scenario's tasks (classic, long, short, user-cold, item-cold) in the
    /// reference's layout: OUT/tasks/task_i.json, OUT/groundtruth/groundtruth_i.json.
    Build(BuildArgs),
    /// Run a recommender over a task folder and write a run folder.
    Run(RunArgs),
    /// Compare run folders: a table (HR@1/3/5, mean, NDCG@5, repairs, tokens, time) and a plot.
    Report(ReportArgs),
    /// Where the ground truth sits in a task folder's candidate lists (identity-order bias).
    Inspect(InspectArgs),
}

#[derive(Args)]
pub struct StoreArgs {
    /// ml-1m, ml-100k, a dataset path, or a folder with user.json, item.json, review.json.
    #[arg(long)]
    pub data: String,
    /// Where to write the store (default: beside the data, `agentrec.redb`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Skip and count unreadable record lines instead of stopping at the first.
    #[arg(long)]
    pub lenient: bool,
    /// Rebuild even if the store exists.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args, Serialize)]
pub struct BuildArgs {
    /// The data (as for `store`; the store is built first when missing) or a `.redb` store.
    #[arg(long)]
    pub data: String,
    /// classic | long | short | user-cold | item-cold.
    #[arg(long)]
    pub scenario: String,
    #[arg(long, default_value_t = 500)]
    pub tasks: usize,
    #[arg(long, default_value_t = 2025)]
    pub seed: u64,
    /// The cut-off T is this quantile of the review times.
    #[arg(long, default_value_t = 0.9)]
    pub cutoff_quantile: f64,
    /// Targets are reviews with stars above this.
    #[arg(long, default_value_t = 3.0)]
    pub positive_above: f32,
    /// uniform | popularity (default: uniform; popularity-matched for item-cold).
    #[arg(long)]
    pub negatives: Option<String>,
    /// Evolving-interest windows (days before T).
    #[arg(long, default_value_t = 90)]
    pub long_days: i64,
    #[arg(long, default_value_t = 7)]
    pub short_days: i64,
    /// Reviews a user needs inside the window (long, short).
    #[arg(long, default_value_t = 3)]
    pub min_window: usize,
    /// User cold start: at most this many visible reviews (classic and item-cold need more).
    #[arg(long, default_value_t = 5)]
    pub user_cold_max: usize,
    /// Item cold start: the target has at most this many visible reviews.
    #[arg(long, default_value_t = 10)]
    pub item_cold_max: usize,
    /// `candidate_category` of the tasks.
    #[arg(long, default_value = "movie")]
    pub category: String,
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args, Clone, Serialize)]
pub struct RunArgs {
    /// A task folder (from `build`, or the reference's tasks/ + groundtruth/).
    #[arg(long)]
    pub tasks: PathBuf,
    /// The record store or data (default: the one the task folder's manifest names).
    #[arg(long)]
    pub data: Option<String>,
    /// identity, random, pop, mf, lightgcn, alpharec (classical); baseline, cot, cot-sc, self-refine,
    /// step-back, memory, cot-memory, agent4rec, selective, planner (language-model agents).
    #[arg(long)]
    pub agent: String,
    /// Run only the first N tasks.
    #[arg(long)]
    pub limit: Option<usize>,
    /// `inproc:MODEL` or the base URL of an OpenAI-compatible server.
    #[arg(long, default_value = "inproc:smollm2-135m-instruct")]
    pub llm: String,
    #[arg(long)]
    pub model: Option<String>,
    /// Record/replay file of LLM exchanges (JSON Lines).
    #[arg(long)]
    pub llm_cache: Option<PathBuf>,
    /// off | record | replay | record-missing.
    #[arg(long, default_value = "record-missing")]
    pub llm_cache_mode: String,
    /// Seconds one LLM request may take (queueing included).
    #[arg(long, default_value_t = 900.0)]
    pub llm_timeout: f64,
    /// Tasks in flight at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// A task that runs longer is scored as a miss (the reference: 300 s).
    #[arg(long, default_value_t = 300.0)]
    pub task_timeout: f64,
    /// text (read the reply) | logprob (rank by the log-probability of each candidate as the
    /// answer: baseline, memory, selective, agent4rec).
    #[arg(long, default_value = "text")]
    pub decisions: String,
    #[arg(long, default_value_t = 0.1)]
    pub temperature: f32,
    #[arg(long, default_value_t = 400)]
    pub max_tokens: u32,
    #[arg(long, default_value_t = 1)]
    pub retries: u32,
    #[arg(long, default_value_t = 2025)]
    pub seed: u64,
    /// The reference's behaviour: the baseline describes only the last candidate; CoT-SC votes
    /// by exact reply.
    #[arg(long)]
    pub faithful: bool,
    /// History cap in the prompt (tokens ≈ characters / 4; the reference: 12000).
    #[arg(long, default_value_t = 1500)]
    pub history_tokens: usize,
    /// Whole-prompt cap (same estimate).
    #[arg(long, default_value_t = 6000)]
    pub prompt_tokens: usize,
    /// Show candidates in the task file's order instead of a seeded shuffle.
    #[arg(long)]
    pub no_shuffle: bool,
    /// CoT-SC samples and their temperature.
    #[arg(long, default_value_t = 5)]
    pub sc_samples: usize,
    #[arg(long, default_value_t = 0.7)]
    pub sc_temperature: f32,
    /// Memory embeddings: all-minilm-l6-v2 (fetched asset) or `hash`.
    #[arg(long, default_value = "all-minilm-l6-v2")]
    pub embedder: String,
    /// For tasks without visibility fields: do not hide the user's reviews of the candidates.
    #[arg(long)]
    pub show_candidate_reviews: bool,
    /// MF / LightGCN epochs at most (early stopping on each user's latest visible interaction).
    #[arg(long, default_value_t = 60)]
    pub cf_epochs: usize,
    /// AlphaRec's title encoder (an asset name or folder).
    #[arg(long, default_value = "all-minilm-l6-v2")]
    pub encoder: String,
    /// Output run folder (an interrupted language-model run resumes with --resume).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub resume: bool,
}

#[derive(Args)]
pub struct ReportArgs {
    /// Run folders.
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    /// Write report.md and report.png here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Args)]
pub struct InspectArgs {
    #[arg(long)]
    pub tasks: PathBuf,
}

pub fn run(c: BenchCmd) -> Result<()> {
    match c {
        BenchCmd::Agentrec(a) => match a {
            AgentrecCmd::Store(a) => store_cmd(a).map(|_| ()),
            AgentrecCmd::Build(a) => build_cmd(a),
            AgentrecCmd::Run(a) => run_cmd(a),
            AgentrecCmd::Report(a) => report_cmd(a),
            AgentrecCmd::Inspect(a) => inspect_cmd(a),
        },
    }
}

struct BuildBar(indicatif::ProgressBar);
impl rudder_agents::store::BuildProgress for BuildBar {
    fn bytes(&self, done: u64, total: u64) {
        self.0.set_length(total);
        self.0.set_position(done);
    }
}

/// Where the store of `data` lives, and whether `data` is a release folder.
fn store_path(data: &str) -> Result<(PathBuf, bool)> {
    let p = Path::new(data);
    if p.extension().is_some_and(|e| e == "redb") {
        return Ok((p.to_path_buf(), false));
    }
    if p.is_dir() && rudder_agents::store::release_files(p).is_ok() {
        return Ok((p.join("agentrec.redb"), true));
    }
    if p.is_dir() {
        return Ok((p.join("agentrec.redb"), false));
    }
    if p.exists() {
        return Ok((PathBuf::from(format!("{data}.agentrec.redb")), false));
    }
    let store = rudder_data::assets::Store::from_env();
    match rudder_data::resolve::resolve(data, &store)? {
        rudder_data::resolve::DataRef::Asset { dir, .. } => Ok((dir.join("agentrec.redb"), false)),
        _ => bail!("--data {data}: not a record store, data folder, dataset path or fetched asset"),
    }
}

/// Open the store of `data`, building it first when missing (or when forced).
fn open_store(data: &str, out: Option<PathBuf>, lenient: bool, force: bool) -> Result<Store> {
    let (default, release) = store_path(data)?;
    let path = out.unwrap_or(default);
    if path.exists() && !force {
        return Store::open(&path).map_err(Into::into);
    }
    if Path::new(data).extension().is_some_and(|e| e == "redb") {
        bail!("{data}: no such record store");
    }
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    eprintln!(
        "building the record store {} from {data} (once)",
        path.display()
    );
    let store = if release {
        let pb = indicatif::ProgressBar::new(0);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {bytes}/{total_bytes} [{elapsed} < {eta}] {bytes_per_sec}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        let s = Store::build_release(
            Path::new(data),
            &path,
            &BuildOptions { lenient },
            &BuildBar(pb.clone()),
        )?;
        pb.finish_and_clear();
        s
    } else {
        let ds = crate::cf_cmd::load_split(data, None, None, 2020).or_else(
            |_| -> Result<rudder_data::Dataset> {
                let rudder_data::formats::Loaded::Interactions(ds) = rudder_data::resolve::load(
                    data,
                    None,
                    &rudder_data::assets::Store::from_env(),
                )?
                else {
                    bail!("`{data}` holds no user–item interactions");
                };
                Ok(ds)
            },
        )?;
        // The split is irrelevant here: every interaction goes in.
        let ds = match &ds.split {
            Some(s) => ds.with_interactions(s.all()),
            None => ds,
        };
        let sp = crate::progress::spinner("writing records");
        let s = Store::build_dataset(&ds, &path)?;
        sp.finish_and_clear();
        s
    };
    Ok(store)
}

fn describe_store(s: &Store) -> String {
    let m = &s.meta;
    let range = m
        .time_range
        .map(|(a, b)| format!("{} to {}", date(a), date(b)))
        .unwrap_or_else(|| "no dates".into());
    format!(
        "{}: {} users, {} items, {} reviews ({} undated; {}), {} reviews without a user or item record, {} lines skipped; built in {:.1} s",
        s.path().display(),
        m.users,
        m.items,
        m.reviews,
        m.undated,
        range,
        m.dangling,
        m.skipped_lines,
        m.build_seconds
    )
}

/// `YYYY-MM-DD` of a time in seconds.
fn date(t: i64) -> String {
    let days = t.div_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

fn store_cmd(a: StoreArgs) -> Result<Store> {
    let s = open_store(&a.data, a.out, a.lenient, a.force)?;
    println!("{}", describe_store(&s));
    for e in &s.meta.skipped_examples {
        println!("  skipped: {e}");
    }
    Ok(s)
}

fn build_cmd(a: BuildArgs) -> Result<()> {
    let scenario: Scenario = a
        .scenario
        .parse()
        .map_err(|e: String| anyhow!("--scenario: {e}"))?;
    let negatives = a
        .negatives
        .as_deref()
        .map(str::parse)
        .transpose()
        .map_err(|e: String| anyhow!("--negatives: {e}"))?;
    if !(0.0..1.0).contains(&a.cutoff_quantile) {
        bail!("--cutoff-quantile must be in [0, 1)");
    }
    let store = open_store(&a.data, None, false, false)?;
    let ds = store.interactions()?;
    let cfg = BuildConfig {
        scenario,
        tasks: a.tasks,
        seed: a.seed,
        cutoff_quantile: a.cutoff_quantile,
        positive_above: a.positive_above,
        candidates: 20,
        negatives,
        long_days: a.long_days,
        short_days: a.short_days,
        min_window: a.min_window,
        user_cold_max: a.user_cold_max,
        item_cold_max: a.item_cold_max,
        category: a.category.clone(),
    };
    let (built, report) = tasks::build(&ds, &cfg)?;
    if built.is_empty() {
        bail!(
            "no user qualifies for {} ({} users have a positive after the cut-off {}): loosen the thresholds",
            scenario.name(),
            report.users_with_target,
            date(report.cutoff)
        );
    }
    let manifest = serde_json::json!({
        "store": std::fs::canonicalize(store.path()).unwrap_or(store.path().to_path_buf()),
        "data": a.data, "report": report, "cutoff_date": date(report.cutoff),
    });
    TaskSet::write(&a.out, &built, &manifest)?;
    println!(
        "{}: {} tasks ({} eligible of {} users with a positive after {}; negatives {:?}); mean visible history {:.1}, mean target popularity {:.1} → {}",
        scenario.name(),
        report.built,
        report.eligible,
        report.users_with_target,
        date(report.cutoff),
        report.negatives,
        report.mean_history,
        report.mean_target_popularity,
        a.out.display()
    );
    let set = TaskSet {
        dir: a.out.clone(),
        tasks: built,
        ..Default::default()
    };
    let id = tasks::positions(&set).identity_hr;
    let pop = agentrec::popularity_order(&store, &set, true)?;
    println!(
        "  baselines HR@1/3/5: identity order {:.3}/{:.3}/{:.3}, popularity order {:.3}/{:.3}/{:.3} (random 0.05/0.15/0.25)",
        id[0], id[1], id[2], pop[0], pop[1], pop[2]
    );
    if report.built < a.tasks {
        println!(
            "  (asked for {}; only {} qualify)",
            a.tasks, report.eligible
        );
    }
    Ok(())
}

fn inspect_cmd(a: InspectArgs) -> Result<()> {
    let set = TaskSet::read(&a.tasks)?;
    let p = tasks::positions(&set);
    println!(
        "{}: {} tasks{}{}",
        a.tasks.display(),
        p.tasks,
        if set.without_truth.is_empty() {
            String::new()
        } else {
            format!(
                ", {} without ground truth (skipped)",
                set.without_truth.len()
            )
        },
        if set.concatenated_truth.is_empty() {
            String::new()
        } else {
            format!(
                ", {} ground-truth files with concatenated objects (first used)",
                set.concatenated_truth.len()
            )
        }
    );
    println!(
        "identity order: HR@1 {:.4}  HR@3 {:.4}  HR@5 {:.4}   (random: 0.05 / 0.15 / 0.25); mean position {:.2}; truth not a candidate: {}",
        p.identity_hr[0],
        p.identity_hr[1],
        p.identity_hr[2],
        p.mean_position,
        p.truth_not_candidate
    );
    let max = p.histogram.iter().copied().max().unwrap_or(1).max(1);
    for (k, &c) in p.histogram.iter().enumerate() {
        println!("  {:>2} {:>5} {}", k + 1, c, "#".repeat(c * 50 / max));
    }
    Ok(())
}

/// Tasks done / tokens / failures on one bar with ETA.
struct Bar {
    pb: indicatif::ProgressBar,
    tokens: AtomicU64,
    failed: AtomicU64,
}

impl rudder_agents::agent4rec::Progress for Bar {
    fn agent_done(&self, _agent: u32, tokens: u64, failed: bool) {
        self.tokens.fetch_add(tokens, Ordering::Relaxed);
        if failed {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        self.pb.inc(1);
        self.pb.set_message(format!(
            "· {}k tokens{}",
            self.tokens.load(Ordering::Relaxed) / 1000,
            match self.failed.load(Ordering::Relaxed) {
                0 => String::new(),
                f => format!(" · {f} failed"),
            }
        ));
    }
}

fn run_cmd(a: RunArgs) -> Result<()> {
    let method: Method = a
        .agent
        .parse()
        .map_err(|e: String| anyhow!("--agent: {e}"))?;
    let decisions: Decisions = a
        .decisions
        .parse()
        .map_err(|e: String| anyhow!("--decisions: {e}"))?;
    let mut set = TaskSet::read(&a.tasks)?;
    if let Some(n) = a.limit {
        set.tasks.truncate(n);
    }
    let data = match &a.data {
        Some(d) => d.clone(),
        None => {
            let m = a.tasks.join("manifest.json");
            let text = std::fs::read_to_string(&m).with_context(|| {
                format!(
                    "{}: no manifest (tasks not built by rudder): name the data with --data",
                    m.display()
                )
            })?;
            let v: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("{}", m.display()))?;
            v["store"]
                .as_str()
                .ok_or_else(|| anyhow!("{}: no `store` field", m.display()))?
                .to_string()
        }
    };
    let store = open_store(&data, None, false, false)?;
    if a.out.join("metrics.json").exists() && !a.resume {
        bail!(
            "{} holds a finished run; choose another --out",
            a.out.display()
        );
    }
    let run = crate::runs::RunDir::create(&a.out)?;
    let cfg = BenchConfig {
        method,
        seed: a.seed,
        model: String::new(),
        temperature: a.temperature,
        max_tokens: a.max_tokens,
        retries: a.retries,
        concurrency: a.concurrency,
        task_timeout_s: a.task_timeout,
        decisions,
        faithful: a.faithful,
        history_tokens: a.history_tokens,
        prompt_tokens: a.prompt_tokens,
        shuffle: !a.no_shuffle,
        sc_samples: a.sc_samples,
        sc_temperature: a.sc_temperature,
        selective_reviews: 15,
        hide_candidates: !a.show_candidate_reviews,
    };
    let t0 = std::time::Instant::now();
    let mut notes = Vec::new();
    let (records, cfg, client_desc) = if method.is_llm() {
        if decisions == Decisions::Logprob && !method.supports_logprob() {
            bail!(
                "--decisions logprob: {} reasons over generated replies; use text, or one of baseline, memory, selective, agent4rec",
                method.name()
            );
        }
        let client = crate::sim_cmd::client(
            &a.llm,
            &a.model,
            &a.llm_cache,
            &a.llm_cache_mode,
            a.concurrency,
            a.llm_timeout,
        )?;
        let mut cfg = cfg;
        cfg.model = a.model.clone().unwrap_or_else(|| client.default_model());
        let journal = Journal::open(
            &a.out.join("journal.jsonl"),
            &agentrec::journal_header(&cfg, &set, &a.llm),
            a.resume,
        )?;
        if a.resume {
            eprintln!(
                "resuming {}: {} answered calls in the journal",
                a.out.display(),
                journal.n_calls()
            );
        }
        let embedder = if matches!(method, Method::Memory | Method::CotMemory) {
            Some(crate::sim_cmd::embedder(&a.embedder)?)
        } else {
            None
        };
        let pb = indicatif::ProgressBar::new(set.tasks.len() as u64);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} tasks {msg} [{elapsed} < {eta}]",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        let bar = Bar {
            pb,
            tokens: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        };
        let env = BenchEnv {
            client: &client,
            journal: &journal,
            cfg: &cfg,
            store: &store,
            embedder,
            progress: &bar,
        };
        let rt = crate::sim_cmd::runtime()?;
        let recs = rt.block_on(agentrec::run_llm(&env, &set))?;
        bar.pb.finish_and_clear();
        notes.push(format!(
            "language model: `{}` ({})",
            cfg.model,
            client.describe()
        ));
        (recs, cfg, client.describe())
    } else {
        let cf = if matches!(method, Method::Mf | Method::Lightgcn | Method::Alpharec) {
            let mut data = agentrec::visible_training_data(&store, &set, cfg.hide_candidates)?;
            let n = data.interactions.len();
            let inputs = if method == Method::Alpharec {
                let enc = crate::lm_cmd::resolve_model(&a.encoder).with_context(|| {
                    format!(
                        "--encoder {}: not a fetched encoder or folder (try `rudder assets fetch all-minilm-l6-v2`)",
                        a.encoder
                    )
                })?;
                data = agentrec::with_titles(&store, data)?;
                let sp = crate::progress::spinner("encoding item titles");
                let t = rudder_cf::features::encode_titles(
                    &data,
                    &enc,
                    rudder_cf::features::Pooling::Mean,
                    &mut |_, _| {},
                )?;
                sp.finish_and_clear();
                rudder_cf::model::ModelInputs {
                    item_features: Some(t),
                }
            } else {
                rudder_cf::model::ModelInputs::default()
            };
            let mut obs = crate::cf_cmd::progress_bar(a.cf_epochs, 20);
            let m = agentrec::train_cf_with(data, method, a.cf_epochs, a.seed, &inputs, &mut obs)?;
            obs.pb.finish_and_clear();
            notes.push(format!(
                "{} trained ({}) on the {n} interactions every task may see: {} epochs, best validation NDCG@20 {}",
                method.name(),
                m.loss,
                m.report_epochs,
                m.best_valid.map_or("–".into(), |x| format!("{x:.4}"))
            ));
            Some(m)
        } else {
            None
        };
        let recs = agentrec::run_classical(&store, &set, &cfg, cf.as_ref())?;
        (recs, cfg, String::new())
    };
    let wall = t0.elapsed().as_secs_f64();
    let m = agentrec::metrics(method.name(), &records, wall);
    let pop = if method == Method::Pop {
        [m.hr1, m.hr3, m.hr5]
    } else {
        agentrec::popularity_order(&store, &set, cfg.hide_candidates)?
    };
    notes.push(format!(
        "popularity order (visible reviews) on these tasks: HR@1/3/5 {:.3}/{:.3}/{:.3}",
        pop[0], pop[1], pop[2]
    ));
    write_run(&run, &a, &cfg, &set, &m, &records, &notes, &client_desc)?;
    println!("{}", table(&[(a.out.display().to_string(), m.clone())]));
    if m.failed > 0 {
        println!(
            "{} task(s) failed or timed out (scored as misses; errors in {}/tasks.jsonl)",
            m.failed,
            a.out.display()
        );
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn write_run(
    run: &crate::runs::RunDir,
    a: &RunArgs,
    cfg: &BenchConfig,
    set: &TaskSet,
    m: &BenchMetrics,
    records: &[TaskRecord],
    notes: &[String],
    client: &str,
) -> Result<()> {
    run.write_config(&serde_json::json!({"args": a, "config": cfg}))?;
    let mut lines = String::new();
    for r in records {
        lines.push_str(&serde_json::to_string(r)?);
        lines.push('\n');
    }
    write_bytes_atomic(&run.path.join("tasks.jsonl"), lines.as_bytes())?;
    run.write_metrics(&[serde_json::to_value(m)?])?;
    write_bytes_atomic(
        &run.path.join("metrics.json"),
        serde_json::to_string_pretty(m)?.as_bytes(),
    )?;
    let mut hist = [0f64; 20];
    for r in records {
        if let Some(k) = r.truth_rank.filter(|&k| k <= 20) {
            hist[k - 1] += 1.0;
        }
    }
    if let Err(e) = crate::plots::bars(
        &run.path.join("truth_rank.png"),
        &format!("{}: rank of the held-out item", m.method),
        "rank",
        "tasks",
        &[(
            m.method.as_str(),
            hist.iter()
                .enumerate()
                .map(|(k, &c)| ((k + 1) as f64, c))
                .collect(),
        )],
    ) {
        eprintln!("plot: {e}");
    }
    let pos = tasks::positions(set);
    let mut s = format!(
        "# AgentRecBench run: {}\n\n{} tasks from `{}`{}.\n\n{}\n",
        m.method,
        m.tasks,
        a.tasks.display(),
        if client.is_empty() {
            String::new()
        } else {
            format!(", {client}")
        },
        table(&[(m.method.clone(), m.clone())])
    );
    for n in notes {
        s.push_str(&format!("- {n}\n"));
    }
    s.push_str(&format!(
        "- candidates shown {}; the task files' own order would score HR@1/3/5 {:.3}/{:.3}/{:.3} (identity order)\n",
        if cfg.shuffle { "in a seeded shuffle" } else { "in the task files' order" },
        pos.identity_hr[0],
        pos.identity_hr[1],
        pos.identity_hr[2]
    ));
    s.push_str(&format!(
        "- repairs: {} tasks ({} unknown ids dropped, {} repeats dropped, {} missing appended); {} replies named no candidate\n- {} failed or timed out (scored as misses)\n- time: {:.1} s, {:.2} tasks/min; of the tasks' time {:.0} % waiting for the LLM, {:.0} % reading the environment\n",
        m.repaired_tasks,
        m.repairs.dropped_unknown,
        m.repairs.deduped,
        m.repairs.appended,
        m.unreadable,
        m.failed,
        m.wall_seconds,
        m.tasks_per_minute,
        100.0 * m.llm_share,
        100.0 * m.env_share
    ));
    if m.unknown_users > 0 || m.unknown_candidates > 0 {
        s.push_str(&format!(
            "- {} task users and {} candidates have no record in the store (ranked without information)\n",
            m.unknown_users, m.unknown_candidates
        ));
    }
    s.push_str("\nRandom ranking of 20 candidates: HR@1/3/5 = 0.05/0.15/0.25 (mean 0.15).\n");
    run.write_summary(&s)
}

fn table(rows: &[(String, BenchMetrics)]) -> String {
    let mut s = String::from(
        "| run | agent | tasks | HR@1 | HR@3 | HR@5 | mean | NDCG@5 | repaired | failed | tokens/task | s/task |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for (name, m) in rows {
        let n = m.tasks.max(1) as f64;
        s.push_str(&format!(
            "| {} | {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {} | {:.0} | {:.2} |\n",
            name,
            m.method,
            m.tasks,
            m.hr1,
            m.hr3,
            m.hr5,
            m.mean_hr,
            m.ndcg5,
            m.repaired_tasks,
            m.failed,
            (m.prompt_tokens + m.completion_tokens) as f64 / n,
            m.wall_seconds / n
        ));
    }
    s
}

fn report_cmd(a: ReportArgs) -> Result<()> {
    let mut rows = Vec::new();
    for r in &a.runs {
        let p = r.join("metrics.json");
        let text = std::fs::read_to_string(&p).with_context(|| {
            format!(
                "{}: not a finished `bench agentrec run` folder",
                p.display()
            )
        })?;
        let m: BenchMetrics =
            serde_json::from_str(&text).with_context(|| format!("{}", p.display()))?;
        let name = r
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| r.display().to_string());
        rows.push((name, m));
    }
    let t = table(&rows);
    println!("{t}");
    if let Some(out) = &a.out {
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        write_bytes_atomic(
            &out.join("report.md"),
            format!("# AgentRecBench comparison\n\n{t}\nRandom: 0.05/0.15/0.25.\n").as_bytes(),
        )?;
        let series: Vec<(&str, Vec<(f64, f64)>)> = vec![
            (
                "HR@1",
                rows.iter()
                    .enumerate()
                    .map(|(k, r)| ((k + 1) as f64, r.1.hr1))
                    .collect(),
            ),
            (
                "HR@3",
                rows.iter()
                    .enumerate()
                    .map(|(k, r)| ((k + 1) as f64, r.1.hr3))
                    .collect(),
            ),
            (
                "HR@5",
                rows.iter()
                    .enumerate()
                    .map(|(k, r)| ((k + 1) as f64, r.1.hr5))
                    .collect(),
            ),
        ];
        let names: Vec<String> = rows
            .iter()
            .enumerate()
            .map(|(k, r)| format!("{}={}", k + 1, r.0))
            .collect();
        if let Err(e) = crate::plots::bars(
            &out.join("report.png"),
            &format!("AgentRecBench: {}", names.join(" ")),
            "run",
            "hit rate",
            &series,
        ) {
            eprintln!("plot: {e}");
        }
        println!("wrote {}/report.md and report.png", out.display());
    }
    Ok(())
}
