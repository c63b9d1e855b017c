//! AgentRecBench tasks: the reference's file format (`tasks/task_{i}.json`,
//! `groundtruth/groundtruth_{i}.json`), a lenient reader, and the scenario builders (classic,
//! evolving interest over a long or short window, user and item cold start) for any
//! timestamped dataset.
//!
//! The builders cut the data at one time `T` (a quantile of the review times): everything
//! before `T` is the visible world, and each task asks for a user's first positive interaction
//! at or after `T`. Every task carries its visibility (`before = T`, the history window of the
//! evolving-interest scenarios, the held-out item), which the environment enforces, and the CF
//! recommenders train on exactly the interactions every task may see.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use rand::Rng;
use rand::seq::{IndexedRandom, SliceRandom};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use rudder_data::Dataset;

use crate::{AgentError, Result, io_err};

/// What a task lets the agent see; the environment enforces it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Visibility {
    /// Reviews at or after this time (seconds) are hidden, and undated reviews with them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<i64>,
    /// The task user's own reviews before this time are hidden (evolving-interest windows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history_since: Option<i64>,
    /// The task user's reviews of these items are hidden (the held-out interaction).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude_items: Vec<String>,
}

/// One recommendation task, in the reference's schema plus rudder's optional fields.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Task {
    #[serde(rename = "type")]
    pub kind: String,
    pub user_id: String,
    #[serde(default)]
    pub candidate_category: String,
    pub candidate_list: Vec<String>,
    #[serde(default = "no_loc")]
    pub loc: Vec<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub visibility: Option<Visibility>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scenario: Option<String>,
}

fn no_loc() -> Vec<f64> {
    vec![-1.0, -1.0]
}

/// A task with its index (the number in its file name) and ground truth.
#[derive(Clone, Debug, PartialEq)]
pub struct Loaded {
    pub index: usize,
    pub task: Task,
    pub truth: String,
}

/// The tasks of a folder.
#[derive(Clone, Debug, Default)]
pub struct TaskSet {
    pub dir: PathBuf,
    pub tasks: Vec<Loaded>,
    /// Task indexes without a ground-truth file (skipped, as the reference does, and reported).
    pub without_truth: Vec<usize>,
    /// Ground-truth files that held more than one JSON object (`}{`); the first was used.
    pub concatenated_truth: Vec<usize>,
}

fn numbered(dir: &Path, prefix: &str) -> Result<Vec<(usize, PathBuf)>> {
    let rd = std::fs::read_dir(dir).map_err(|e| io_err(dir, e))?;
    let mut out = Vec::new();
    for e in rd {
        let e = e.map_err(|e| io_err(dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(n) = name
            .strip_prefix(prefix)
            .and_then(|r| r.strip_suffix(".json"))
            .and_then(|n| n.parse::<usize>().ok())
        {
            out.push((n, e.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// The first JSON object of a file that may hold several concatenated ones; with the count.
fn first_object(path: &Path, text: &str) -> Result<(Value, usize)> {
    let mut it = serde_json::Deserializer::from_str(text).into_iter::<Value>();
    let first = match it.next() {
        Some(Ok(v)) => v,
        Some(Err(e)) => {
            return Err(AgentError::Input(format!(
                "{}:{}:{}: not JSON ({e})",
                path.display(),
                e.line(),
                e.column()
            )));
        }
        None => return Err(AgentError::Input(format!("{}: empty file", path.display()))),
    };
    let rest = it.take_while(|r| r.is_ok()).count();
    Ok((first, 1 + rest))
}

impl TaskSet {
    /// Read `dir/tasks/task_*.json` with `dir/groundtruth/groundtruth_*.json` (or `dir` itself
    /// holding both kinds of file), sorted by index.
    pub fn read(dir: &Path) -> Result<TaskSet> {
        let (td, gd) = if dir.join("tasks").is_dir() {
            (dir.join("tasks"), dir.join("groundtruth"))
        } else {
            (dir.to_path_buf(), dir.to_path_buf())
        };
        let tasks = numbered(&td, "task_")?;
        if tasks.is_empty() {
            return Err(AgentError::Input(format!(
                "{}: no task_<n>.json files (expected {}/tasks/task_0.json …)",
                td.display(),
                dir.display()
            )));
        }
        let truths: HashMap<usize, PathBuf> = if gd.is_dir() {
            numbered(&gd, "groundtruth_")?.into_iter().collect()
        } else {
            HashMap::new()
        };
        let mut set = TaskSet {
            dir: dir.to_path_buf(),
            ..Default::default()
        };
        for (i, p) in tasks {
            let text = std::fs::read_to_string(&p).map_err(|e| io_err(&p, e))?;
            let (v, _) = first_object(&p, &text)?;
            let task: Task = serde_path_to_error::deserialize(&v).map_err(|e| {
                AgentError::Input(format!(
                    "{}: field `{}`: {}",
                    p.display(),
                    e.path(),
                    e.inner()
                ))
            })?;
            if task.kind != "recommendation" {
                return Err(AgentError::Input(format!(
                    "{}: `type` is `{}`; only recommendation tasks are run here",
                    p.display(),
                    task.kind
                )));
            }
            if task.candidate_list.is_empty() {
                return Err(AgentError::Input(format!(
                    "{}: `candidate_list` is empty",
                    p.display()
                )));
            }
            let Some(gp) = truths.get(&i) else {
                set.without_truth.push(i);
                continue;
            };
            let gtext = std::fs::read_to_string(gp).map_err(|e| io_err(gp, e))?;
            let (g, n) = first_object(gp, &gtext)?;
            if n > 1 {
                set.concatenated_truth.push(i);
            }
            let truth = match g.get("ground truth").or_else(|| g.get("ground_truth")) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Number(x)) => x.to_string(),
                _ => {
                    return Err(AgentError::Input(format!(
                        "{}: no string field `ground truth`",
                        gp.display()
                    )));
                }
            };
            set.tasks.push(Loaded {
                index: i,
                task,
                truth,
            });
        }
        if set.tasks.is_empty() {
            return Err(AgentError::Input(format!(
                "{}: none of the tasks has a ground-truth file ({}/groundtruth_<n>.json)",
                dir.display(),
                gd.display()
            )));
        }
        Ok(set)
    }

    /// Write tasks in the reference's layout (each file atomically), with `manifest.json`.
    pub fn write(dir: &Path, tasks: &[Loaded], manifest: &Value) -> Result<()> {
        let td = dir.join("tasks");
        let gd = dir.join("groundtruth");
        for d in [&td, &gd] {
            std::fs::create_dir_all(d).map_err(|e| io_err(d, e))?;
        }
        let put = |p: PathBuf, v: &Value| -> Result<()> {
            let text = serde_json::to_string_pretty(v).unwrap_or_default();
            rudder_data::io::write_bytes_atomic(&p, text.as_bytes()).map_err(AgentError::Data)
        };
        for t in tasks {
            put(
                td.join(format!("task_{}.json", t.index)),
                &serde_json::to_value(&t.task).unwrap_or_default(),
            )?;
            put(
                gd.join(format!("groundtruth_{}.json", t.index)),
                &serde_json::json!({"ground truth": t.truth}),
            )?;
        }
        put(dir.join("manifest.json"), manifest)
    }
}

/// Where the ground truth sits in the candidate lists as given: the identity-order baseline
/// and a histogram over positions (the reference's example tasks put it near the front).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Positions {
    pub tasks: usize,
    /// Tasks whose ground truth is not among the candidates.
    pub truth_not_candidate: usize,
    pub histogram: Vec<usize>,
    pub identity_hr: [f64; 3],
    pub mean_position: f64,
}

pub fn positions(set: &TaskSet) -> Positions {
    let n = set
        .tasks
        .iter()
        .map(|t| t.task.candidate_list.len())
        .max()
        .unwrap_or(0);
    let mut hist = vec![0usize; n];
    let mut miss = 0;
    let mut hits = [0usize; 3];
    let mut sum = 0.0;
    for t in &set.tasks {
        match t.task.candidate_list.iter().position(|c| *c == t.truth) {
            Some(p) => {
                hist[p] += 1;
                sum += (p + 1) as f64;
                for (h, k) in hits.iter_mut().zip([1, 3, 5]) {
                    if p < k {
                        *h += 1;
                    }
                }
            }
            None => miss += 1,
        }
    }
    let m = set.tasks.len().max(1) as f64;
    Positions {
        tasks: set.tasks.len(),
        truth_not_candidate: miss,
        histogram: hist,
        identity_hr: hits.map(|h| h as f64 / m),
        mean_position: sum / (set.tasks.len() - miss).max(1) as f64,
    }
}

/// The five scenarios.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    Classic,
    Long,
    Short,
    UserCold,
    ItemCold,
}

impl Scenario {
    pub const ALL: [Scenario; 5] = [
        Scenario::Classic,
        Scenario::Long,
        Scenario::Short,
        Scenario::UserCold,
        Scenario::ItemCold,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Classic => "classic",
            Scenario::Long => "long",
            Scenario::Short => "short",
            Scenario::UserCold => "user-cold",
            Scenario::ItemCold => "item-cold",
        }
    }
}

impl std::str::FromStr for Scenario {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Scenario::ALL
            .into_iter()
            .find(|x| x.name() == s)
            .ok_or_else(|| {
                format!("unknown scenario `{s}` (classic, long, short, user-cold, item-cold)")
            })
    }
}

/// How the 19 negatives are drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Negatives {
    /// Uniformly among the items the user never interacted with that were seen before `T`.
    Uniform,
    /// Uniformly among the never-interacted items whose visible popularity rank is nearest the
    /// target's (a window of 10× the negatives needed), so popularity alone cannot find it.
    Popularity,
}

impl std::str::FromStr for Negatives {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "uniform" => Ok(Negatives::Uniform),
            "popularity" => Ok(Negatives::Popularity),
            _ => Err(format!("unknown negatives `{s}` (uniform or popularity)")),
        }
    }
}

/// A scenario builder's settings (the defaults are documented in docs/agentrec.md).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BuildConfig {
    pub scenario: Scenario,
    pub tasks: usize,
    pub seed: u64,
    /// `T` is this quantile of the dated review times.
    pub cutoff_quantile: f64,
    /// A target is a review with stars strictly above this.
    pub positive_above: f32,
    pub candidates: usize,
    /// `None`: uniform, except popularity-matched for item cold start.
    pub negatives: Option<Negatives>,
    pub long_days: i64,
    pub short_days: i64,
    /// Reviews the user needs inside the evolving-interest window.
    pub min_window: usize,
    /// Classic and item cold start need more visible reviews than this; user cold start at
    /// most this many.
    pub user_cold_max: usize,
    /// Item cold start: the target has at most this many visible reviews.
    pub item_cold_max: usize,
    /// `candidate_category` written into the tasks.
    pub category: String,
}

impl Default for BuildConfig {
    fn default() -> Self {
        BuildConfig {
            scenario: Scenario::Classic,
            tasks: 500,
            seed: 2025,
            cutoff_quantile: 0.9,
            positive_above: 3.0,
            candidates: 20,
            negatives: None,
            long_days: 90,
            short_days: 7,
            min_window: 3,
            user_cold_max: 5,
            item_cold_max: 10,
            category: "movie".into(),
        }
    }
}

/// What a build did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BuildReport {
    pub config: BuildConfig,
    pub cutoff: i64,
    pub negatives: Negatives,
    /// Users with a positive target after `T` (item cold start: a positive cold item).
    pub users_with_target: usize,
    /// Of those, the ones the scenario admits.
    pub eligible: usize,
    pub built: usize,
    /// Mean visible history (reviews the agent may see) of the tasks' users.
    pub mean_history: f64,
    /// Mean visible reviews of the targets.
    pub mean_target_popularity: f64,
}

/// The `q` quantile of the dated times.
fn quantile_time(ds: &Dataset, q: f64) -> Option<i64> {
    let mut t: Vec<i64> = ds.interactions.all_timestamps()?.to_vec();
    if t.is_empty() {
        return None;
    }
    t.sort_unstable();
    let k = ((t.len() as f64 * q.clamp(0.0, 1.0)) as usize).min(t.len() - 1);
    Some(t[k])
}

/// Build one scenario's tasks from a dataset with timestamps (ids as in the record store).
pub fn build(ds: &Dataset, cfg: &BuildConfig) -> Result<(Vec<Loaded>, BuildReport)> {
    let inter = &ds.interactions;
    let cutoff = quantile_time(ds, cfg.cutoff_quantile).ok_or_else(|| {
        AgentError::Input(format!(
            "{}: no timestamps (the scenarios cut the data by time)",
            ds.name
        ))
    })?;
    if cfg.candidates < 2 {
        return Err(AgentError::Input("--candidates must be at least 2".into()));
    }
    let negatives = cfg
        .negatives
        .unwrap_or(if cfg.scenario == Scenario::ItemCold {
            Negatives::Popularity
        } else {
            Negatives::Uniform
        });
    let n_items = ds.n_items();
    let mut pop = vec![0usize; n_items];
    for it in inter.iter() {
        if it.timestamp.is_some_and(|t| t < cutoff) {
            pop[it.item as usize] += 1;
        }
    }
    // Popularity order (visible count, then a seeded hash) and each item's rank in it.
    let mut by_pop: Vec<u32> = (0..n_items as u32).collect();
    by_pop.sort_by_key(|&i| {
        (
            std::cmp::Reverse(pop[i as usize]),
            rudder_data::rng::hash_keys(cfg.seed, &[i as u64]),
        )
    });
    let mut rank_of = vec![0usize; n_items];
    for (r, &i) in by_pop.iter().enumerate() {
        rank_of[i as usize] = r;
    }
    let seen_before: Vec<u32> = (0..n_items as u32)
        .filter(|&i| pop[i as usize] > 0)
        .collect();

    struct Cand {
        user: u32,
        target: u32,
        history: usize,
        since: Option<i64>,
    }
    let mut with_target = 0;
    let mut eligible = Vec::new();
    for u in 0..ds.n_users() as u32 {
        let items = inter.items(u);
        let ts = inter.timestamps(u).unwrap_or(&[]);
        let rs = inter.ratings(u);
        let mut visible = HashSet::new();
        let mut target: Option<(i64, u32)> = None;
        for (k, &i) in items.iter().enumerate() {
            let Some(&t) = ts.get(k) else { continue };
            if t < cutoff {
                visible.insert(i);
            } else if rs.is_none_or(|r| r[k] > cfg.positive_above)
                // item cold start: the user's first positive among the cold items
                && (cfg.scenario != Scenario::ItemCold || pop[i as usize] <= cfg.item_cold_max)
                && target.is_none_or(|(bt, bi)| (t, i) < (bt, bi))
            {
                target = Some((t, i));
            }
        }
        let Some((_, target)) = target else { continue };
        if visible.contains(&target) {
            continue;
        }
        with_target += 1;
        let hist = visible.len();
        let window = |days: i64| {
            let since = cutoff - days * 86_400;
            let n = ts.iter().filter(|&&t| t >= since && t < cutoff).count();
            (since, n)
        };
        let admit = match cfg.scenario {
            Scenario::Classic => (hist > cfg.user_cold_max).then_some((hist, None)),
            Scenario::UserCold => (hist <= cfg.user_cold_max).then_some((hist, None)),
            Scenario::ItemCold => (hist > cfg.user_cold_max
                && pop[target as usize] <= cfg.item_cold_max)
                .then_some((hist, None)),
            Scenario::Long | Scenario::Short => {
                let days = if cfg.scenario == Scenario::Long {
                    cfg.long_days
                } else {
                    cfg.short_days
                };
                let (since, n) = window(days);
                (n >= cfg.min_window).then_some((n, Some(since)))
            }
        };
        if let Some((history, since)) = admit {
            eligible.push(Cand {
                user: u,
                target,
                history,
                since,
            });
        }
    }
    let n_eligible = eligible.len();
    let mut rng = rudder_data::rng::stream(cfg.seed, &[0xA6E7, cfg.scenario as u64]);
    eligible.shuffle(&mut rng);
    eligible.truncate(cfg.tasks);
    eligible.sort_by_key(|c| c.user);

    let need = cfg.candidates - 1;
    let mut out = Vec::with_capacity(eligible.len());
    let (mut hsum, mut psum) = (0usize, 0usize);
    for (index, c) in eligible.iter().enumerate() {
        let mut rng = rudder_data::rng::stream(cfg.seed, &[0xC4D5, c.user as u64]);
        let touched: HashSet<u32> = inter.items(c.user).iter().copied().collect();
        let ok = |i: u32| i != c.target && !touched.contains(&i);
        let mut negs: Vec<u32> = Vec::with_capacity(need);
        match negatives {
            Negatives::Uniform => {
                let pool_ok = seen_before.iter().filter(|&&i| ok(i)).count();
                if pool_ok < need {
                    return Err(AgentError::Input(format!(
                        "{}: user {} has only {pool_ok} never-interacted items to draw negatives from",
                        ds.name,
                        ds.users.ext(c.user)
                    )));
                }
                let mut chosen = HashSet::new();
                while negs.len() < need {
                    let &i = seen_before.choose(&mut rng).unwrap_or(&0);
                    if ok(i) && chosen.insert(i) {
                        negs.push(i);
                    }
                }
            }
            Negatives::Popularity => {
                let r = rank_of[c.target as usize];
                let mut pool = Vec::new();
                let (mut lo, mut hi) = (r as isize - 1, r + 1);
                while pool.len() < need * 10 && (lo >= 0 || hi < n_items) {
                    if hi < n_items {
                        let i = by_pop[hi];
                        if ok(i) {
                            pool.push(i);
                        }
                        hi += 1;
                    }
                    if lo >= 0 && pool.len() < need * 10 {
                        let i = by_pop[lo as usize];
                        if ok(i) {
                            pool.push(i);
                        }
                        lo -= 1;
                    }
                }
                if pool.len() < need {
                    return Err(AgentError::Input(format!(
                        "{}: too few items to draw {need} negatives",
                        ds.name
                    )));
                }
                pool.sort_unstable();
                pool.shuffle(&mut rng);
                negs.extend_from_slice(&pool[..need]);
            }
        }
        let mut cands: Vec<u32> = negs;
        cands.push(c.target);
        cands.shuffle(&mut rng);
        // A random rotation as well, so the target's position carries no information even if a
        // future change made the shuffle weaker.
        let rot = rng.random_range(0..cands.len());
        cands.rotate_left(rot);
        hsum += c.history;
        psum += pop[c.target as usize];
        let target = ds.items.ext(c.target).to_string();
        out.push(Loaded {
            index,
            task: Task {
                kind: "recommendation".into(),
                user_id: ds.users.ext(c.user).to_string(),
                candidate_category: cfg.category.clone(),
                candidate_list: cands.iter().map(|&i| ds.items.ext(i).to_string()).collect(),
                loc: no_loc(),
                visibility: Some(Visibility {
                    before: Some(cutoff),
                    history_since: c.since,
                    exclude_items: vec![target.clone()],
                }),
                scenario: Some(cfg.scenario.name().into()),
            },
            truth: target,
        });
    }
    let m = out.len().max(1) as f64;
    Ok((
        out,
        BuildReport {
            config: cfg.clone(),
            cutoff,
            negatives,
            users_with_target: with_target,
            eligible: n_eligible,
            built: eligible.len(),
            mean_history: hsum as f64 / m,
            mean_target_popularity: psum as f64 / m,
        },
    ))
}
