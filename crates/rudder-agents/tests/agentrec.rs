//! AgentRecBench end to end on a generated release in the reference's record schema (Yelp-style
//! users/items/reviews with dates, plus Amazon-style millisecond timestamps and Goodreads-style
//! dates): the store, the task builders and file format, the visibility the environment
//! enforces, the classical recommenders, a scripted language-model agent with repairs, failures
//! and resume.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use rudder_agents::agent4rec::{Decisions, NoProgress};
use rudder_agents::agentrec::{self, BenchConfig, BenchEnv, Method};
use rudder_agents::journal::Journal;
use rudder_agents::store::{BuildOptions, NoBuildProgress, Store};
use rudder_agents::tasks::{self, BuildConfig, Scenario, TaskSet};
use rudder_agents::tool::{ReviewsOf, Tool};
use rudder_client::openai::{ChatResponse, Usage};
use rudder_client::{BoxFut, ChatMessage, ChatRequest, ClientError, LlmClient, Scores};

const USERS: usize = rudder_agents::fixtures::RELEASE_USERS;
const ITEMS: usize = rudder_agents::fixtures::RELEASE_ITEMS;

fn write_release(dir: &Path, broken_line: bool) {
    rudder_agents::fixtures::write_release(dir, broken_line).unwrap();
}

fn store(dir: &Path) -> Store {
    write_release(&dir.join("data"), false);
    Store::build_release(
        &dir.join("data"),
        &dir.join("store.redb"),
        &BuildOptions::default(),
        &NoBuildProgress,
    )
    .unwrap()
}

#[test]
fn the_store_reads_the_three_schemas_and_reports_bad_lines() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    assert_eq!(s.meta.users, USERS as u64);
    assert_eq!(s.meta.items, ITEMS as u64);
    assert_eq!(s.meta.reviews, (USERS * 12 + 2) as u64);
    assert_eq!(s.meta.undated, 0);
    assert_eq!(s.meta.dangling, 0);
    // the user's reviews come back oldest first, the 2019 ones before the 2020 ones
    let r = s.user_reviews("u0", None).unwrap();
    assert_eq!(r.len(), 14);
    assert_eq!(r[0].time, Some(1_546_300_800));
    assert!(r.windows(2).all(|w| w[0].time <= w[1].time));
    assert_eq!(r[2].review_id, "r0_0");
    // the Amazon review got a stable id, the item's index sees it
    let a = s.review(&r[0].review_id).unwrap().unwrap();
    assert_eq!(a["item_id"], "b59");
    assert_eq!(a["stars"], 4.0);
    assert_eq!(
        s.item_reviews("b59", None).unwrap().len(),
        1 + s
            .item_reviews("b59", None)
            .unwrap()
            .iter()
            .filter(|x| x.other != "u0")
            .count()
    );
    // reopening is instant and sees the same store; a second reader may open it at once
    let again = Store::open(s.path()).unwrap();
    assert_eq!(again.meta, s.meta);
    let ds = s.interactions().unwrap();
    assert_eq!(ds.interactions.len(), USERS * 12 + 2);

    // a broken line: a clear error naming the file and line, or counted when lenient
    let bad = dir.path().join("bad");
    write_release(&bad, true);
    let e = Store::build_release(
        &bad,
        &bad.join("s.redb"),
        &BuildOptions::default(),
        &NoBuildProgress,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("review.json:361"), "{e}");
    assert!(
        !bad.join("s.redb").exists(),
        "no half-built store is left under the name"
    );
    let s = Store::build_release(
        &bad,
        &bad.join("s.redb"),
        &BuildOptions { lenient: true },
        &NoBuildProgress,
    )
    .unwrap();
    assert_eq!(s.meta.skipped_lines, 1);
    assert_eq!(s.meta.reviews, (USERS * 12 + 2) as u64);
}

fn classic(s: &Store) -> Vec<tasks::Loaded> {
    let ds = s.interactions().unwrap();
    let cfg = BuildConfig {
        scenario: Scenario::Classic,
        tasks: 100,
        cutoff_quantile: 0.6,
        user_cold_max: 2,
        ..Default::default()
    };
    let (t, rep) = tasks::build(&ds, &cfg).unwrap();
    assert_eq!(rep.built, t.len());
    assert!(t.len() >= 5, "{rep:?}");
    t
}

#[test]
fn tasks_round_trip_and_the_environment_hides_the_future_and_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let built = classic(&s);
    let out = dir.path().join("tasks");
    TaskSet::write(&out, &built, &serde_json::json!({"store": s.path()})).unwrap();
    let set = TaskSet::read(&out).unwrap();
    assert_eq!(set.tasks, built);
    for t in &set.tasks {
        assert_eq!(t.task.candidate_list.len(), 20);
        assert!(t.task.candidate_list.contains(&t.truth));
        let v = t.task.visibility.clone().unwrap();
        let cut = v.before.unwrap();
        // the truth is a positive the user gave at or after the cut-off
        let all = s.user_reviews(&t.task.user_id, None).unwrap();
        let target = all.iter().find(|r| r.other == t.truth).unwrap();
        assert!(target.time.unwrap() >= cut && target.stars.unwrap() > 3.0);
        // negatives are items the user never reviewed
        for c in &t.task.candidate_list {
            if *c != t.truth {
                assert!(all.iter().all(|r| r.other != *c));
            }
        }
        let tool = Tool::new(&s, &t.task.user_id, v);
        let mine = tool.get_reviews(ReviewsOf::User(&t.task.user_id)).unwrap();
        assert!(!mine.is_empty());
        for r in &mine {
            assert_ne!(r["item_id"], t.truth.as_str());
            assert!(r.get("_time").is_none());
        }
        assert!(mine.len() < all.len());
        // nobody's review at or after the cut-off is visible, through any call
        for c in &t.task.candidate_list {
            for r in tool.get_reviews(ReviewsOf::Item(c)).unwrap() {
                let id = r["review_id"].as_str().unwrap();
                let t_ = s.review(id).unwrap().unwrap()["_time"].as_i64().unwrap();
                assert!(t_ < cut);
            }
        }
        let hidden = all.iter().find(|r| r.time.unwrap() >= cut).unwrap();
        assert!(
            tool.get_reviews(ReviewsOf::Review(&hidden.review_id))
                .unwrap()
                .is_empty()
        );
    }
    // candidate order carries no position information about the truth
    let p = tasks::positions(&set);
    assert_eq!(p.truth_not_candidate, 0);
    assert!(p.histogram.iter().filter(|&&c| c > 0).count() > 1);

    // evolving interest: the user's history before the window is hidden as well
    let ds = s.interactions().unwrap();
    let (long, _) = tasks::build(
        &ds,
        &BuildConfig {
            scenario: Scenario::Short,
            cutoff_quantile: 0.6,
            short_days: 10,
            min_window: 1,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(!long.is_empty());
    for t in &long {
        let v = t.task.visibility.clone().unwrap();
        let since = v.history_since.unwrap();
        let tool = Tool::new(&s, &t.task.user_id, v.clone());
        for r in tool.history(&t.task.user_id).unwrap() {
            assert!(r.time.unwrap() >= since && r.time.unwrap() < v.before.unwrap());
        }
    }
}

#[test]
fn published_task_files_are_read_leniently_and_bad_ones_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("tasks")).unwrap();
    std::fs::create_dir_all(d.join("groundtruth")).unwrap();
    let cands: Vec<String> = (0..20).map(|i| format!("\"b{i}\"")).collect();
    for i in 0..3 {
        std::fs::write(
            d.join(format!("tasks/task_{i}.json")),
            format!(
                "{{\"type\": \"recommendation\", \"user_id\": \"u1\", \"candidate_category\": \"business - Shopping\", \"candidate_list\": [{}], \"loc\": [4621600.79, 5685269.73]}}",
                cands.join(", ")
            ),
        )
        .unwrap();
    }
    // concatenated objects, and task 2 without ground truth
    std::fs::write(
        d.join("groundtruth/groundtruth_0.json"),
        "{\"ground truth\": \"b0\"}{\"ground truth\": \"b9\"}",
    )
    .unwrap();
    std::fs::write(
        d.join("groundtruth/groundtruth_1.json"),
        "{\"ground truth\": \"b3\"}",
    )
    .unwrap();
    let set = TaskSet::read(d).unwrap();
    assert_eq!(set.tasks.len(), 2);
    assert_eq!(set.tasks[0].truth, "b0");
    assert_eq!(set.without_truth, vec![2]);
    assert_eq!(set.concatenated_truth, vec![0]);
    let p = tasks::positions(&set);
    assert_eq!(p.identity_hr, [0.5, 0.5, 1.0]);
    // without visibility fields, the user's reviews of every candidate are hidden
    let v = agentrec::visibility_of(&set.tasks[0], true);
    assert_eq!(v.exclude_items.len(), 20);

    std::fs::write(
        d.join("tasks/task_1.json"),
        "{\"type\": \"recommendation\", \"user_id\": 5}",
    )
    .unwrap();
    let e = TaskSet::read(d).unwrap_err().to_string();
    assert!(e.contains("task_1.json") && e.contains("user_id"), "{e}");
}

#[test]
fn classical_recommenders_train_on_what_the_tasks_see() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let built = classic(&s);
    let out = dir.path().join("tasks");
    TaskSet::write(&out, &built, &serde_json::json!({})).unwrap();
    let set = TaskSet::read(&out).unwrap();
    let data = agentrec::visible_training_data(&s, &set, true).unwrap();
    let cut = set.tasks[0]
        .task
        .visibility
        .as_ref()
        .unwrap()
        .before
        .unwrap();
    assert!(
        data.interactions
            .iter()
            .all(|it| it.timestamp.unwrap() < cut)
    );
    for t in &set.tasks {
        let u = data.users.get(&t.task.user_id).unwrap();
        let i = data.items.get(&t.truth).unwrap();
        assert!(!data.interactions.items(u).contains(&i));
    }
    let cfg = BenchConfig {
        method: Method::Pop,
        ..Default::default()
    };
    let pop = agentrec::run_classical(&s, &set, &cfg, None).unwrap();
    assert_eq!(pop.len(), set.tasks.len());
    for r in &pop {
        let mut sorted = r.ranking.clone();
        sorted.sort();
        let mut c = r.presented.clone();
        c.sort();
        assert_eq!(sorted, c, "a permutation of the candidates");
    }
    let mf = agentrec::train_cf(data, Method::Mf, 5, 7, &mut rudder_cf::trainer::Silent).unwrap();
    let cfg = BenchConfig {
        method: Method::Mf,
        ..Default::default()
    };
    let recs = agentrec::run_classical(&s, &set, &cfg, Some(&mf)).unwrap();
    let m = agentrec::metrics("mf", &recs, 1.0);
    assert_eq!(m.tasks, set.tasks.len());
    assert!(recs.iter().all(|r| r.truth_rank.is_some()));
}

/// Ranks the candidate ids of the prompt with even-numbered shops first; `mode` 1 answers
/// nonsense, 2 fails every call, 3 sleeps past the task timeout.
struct Scripted {
    calls: AtomicUsize,
    mode: usize,
}

fn ranked_reply(prompt: &str) -> String {
    let mut ids: Vec<(u32, String)> = prompt
        .lines()
        .filter_map(|l| l.strip_prefix("- "))
        .filter_map(|l| {
            let (id, rest) = l.split_once(':')?;
            if id.trim().contains(' ') {
                return None;
            }
            let n: u32 = rest
                .split("Shop ")
                .nth(1)?
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()?;
            Some((n, id.trim().to_string()))
        })
        .collect();
    // the baseline's prompt gives the candidates as JSON records
    for part in prompt.split("\"item_id\":\"b").skip(1) {
        let n: String = part.chars().take_while(char::is_ascii_digit).collect();
        if let Ok(n) = n.parse::<u32>()
            && !ids.iter().any(|x| x.0 == n)
        {
            ids.push((n, format!("b{n}")));
        }
    }
    if prompt.contains("You are a planner") {
        return "sub-task 1: {'description': 'find the user reviews'}\nsub-task 2: {'description': 'check items'}".into();
    }
    if prompt.contains("You have access to the following tools") {
        return if prompt.contains("user reviews") {
            "Thought: reviews. Action: get_reviews, user_id=u3 End Action".into()
        } else {
            "Action: get_item, b2 End Action".into()
        };
    }
    ids.sort_by_key(|(n, _)| (n % 2, *n));
    let list: Vec<String> = ids.iter().map(|(_, id)| format!("'{id}'")).collect();
    // a repeat and an unknown id, as small models write
    format!(
        "Thinking… the user likes shops.\n[{}, 'b999', {}]",
        list.join(", "),
        list[0]
    )
}

impl LlmClient for Scripted {
    fn chat<'a>(&'a self, req: ChatRequest) -> BoxFut<'a, rudder_client::Result<ChatResponse>> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let text = match self.mode {
                1 => "I cannot rank these.".to_string(),
                2 => return Err(ClientError::Connect("scripted outage".into())),
                3 => {
                    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                    String::new()
                }
                _ => ranked_reply(&req.messages.last().unwrap().content),
            };
            Ok(ChatResponse::from_text(
                "scripted",
                text,
                Some(Usage {
                    prompt_tokens: 300,
                    completion_tokens: 40,
                    total_tokens: 340,
                }),
            ))
        })
    }
    fn continuation_logprobs<'a>(
        &'a self,
        _model: &'a str,
        _messages: Vec<ChatMessage>,
        continuations: Vec<String>,
    ) -> BoxFut<'a, rudder_client::Result<Scores>> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            // prefers even shop ids as the first answer
            let lp = continuations
                .iter()
                .map(|c| {
                    let n: u32 = c
                        .trim_start_matches("['b")
                        .trim_end_matches('\'')
                        .parse()
                        .unwrap_or(1);
                    if n.is_multiple_of(2) { -1.0 } else { -4.0 }
                })
                .collect();
            Ok(Scores {
                logprobs: lp,
                exact: true,
                usage: None,
            })
        })
    }
    fn describe(&self) -> String {
        "scripted".into()
    }
    fn default_model(&self) -> String {
        "scripted".into()
    }
}

fn run(
    s: &Store,
    set: &TaskSet,
    client: &Scripted,
    cfg: &BenchConfig,
    journal: &Path,
    resume: bool,
) -> Vec<agentrec::TaskRecord> {
    let j = Journal::open(
        journal,
        &agentrec::journal_header(cfg, set, "scripted"),
        resume,
    )
    .unwrap();
    let env = BenchEnv {
        client,
        journal: &j,
        cfg,
        store: s,
        embedder: None,
        progress: &NoProgress,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(agentrec::run_llm(&env, set)).unwrap()
}

fn evens(r: &agentrec::TaskRecord) -> usize {
    r.presented
        .iter()
        .filter(|c| c.trim_start_matches('b').parse::<u32>().unwrap() % 2 == 0)
        .count()
}

#[test]
fn a_language_model_agent_is_repaired_scored_isolated_and_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let built = classic(&s);
    let out = dir.path().join("tasks");
    TaskSet::write(&out, &built, &serde_json::json!({})).unwrap();
    let set = TaskSet::read(&out).unwrap();
    let cfg = BenchConfig {
        method: Method::Selective,
        model: "scripted".into(),
        ..Default::default()
    };
    let client = Scripted {
        calls: AtomicUsize::new(0),
        mode: 0,
    };
    let recs = run(&s, &set, &client, &cfg, &dir.path().join("j1.jsonl"), false);
    assert_eq!(recs.len(), set.tasks.len());
    for r in &recs {
        // every truth is an even shop (5 stars); the agent puts the evens first
        assert!(r.truth_rank.unwrap() <= evens(r), "{r:?}");
        assert_eq!(r.repairs.dropped_unknown, 1);
        assert_eq!(r.repairs.deduped, 1);
        assert_eq!(r.repairs.appended, 0);
        assert_eq!(r.calls, 1);
        assert!(r.error.is_none() && !r.unreadable);
    }
    let m = agentrec::metrics("selective", &recs, 1.0);
    assert_eq!(m.repaired_tasks, recs.len());
    assert_eq!(m.prompt_tokens, 300 * recs.len() as u64);

    // resume: every answer comes from the journal, the records are the same
    let again = Scripted {
        calls: AtomicUsize::new(0),
        mode: 2,
    };
    let resumed = run(&s, &set, &again, &cfg, &dir.path().join("j1.jsonl"), true);
    assert_eq!(again.calls.load(Ordering::SeqCst), 0);
    let strip = |v: &[agentrec::TaskRecord]| -> Vec<(Vec<String>, Option<usize>)> {
        v.iter()
            .map(|r| (r.ranking.clone(), r.truth_rank))
            .collect()
    };
    assert_eq!(strip(&resumed), strip(&recs));

    // an unreadable reply: re-asked once, then every candidate appended in the seeded order
    let bad = Scripted {
        calls: AtomicUsize::new(0),
        mode: 1,
    };
    let recs = run(&s, &set, &bad, &cfg, &dir.path().join("j2.jsonl"), false);
    assert_eq!(bad.calls.load(Ordering::SeqCst), 2 * set.tasks.len());
    assert!(
        recs.iter()
            .all(|r| r.unreadable && r.repairs.appended == 20)
    );

    // a failing backend: every task is a miss with its error, none is dropped
    let down = Scripted {
        calls: AtomicUsize::new(0),
        mode: 2,
    };
    let recs = run(&s, &set, &down, &cfg, &dir.path().join("j3.jsonl"), false);
    assert_eq!(recs.len(), set.tasks.len());
    assert!(recs.iter().all(
        |r| r.error.as_deref().is_some_and(|e| e.contains("outage")) && r.truth_rank.is_none()
    ));
    assert_eq!(agentrec::metrics("x", &recs, 1.0).hr5, 0.0);

    // a task over its time limit is a miss
    let slow = Scripted {
        calls: AtomicUsize::new(0),
        mode: 3,
    };
    let quick = BenchConfig {
        task_timeout_s: 0.05,
        ..cfg.clone()
    };
    let mut one = set.clone();
    one.tasks.truncate(1);
    let recs = run(&s, &one, &slow, &quick, &dir.path().join("j4.jsonl"), false);
    assert!(recs[0].error.as_deref().unwrap().contains("timed out"));

    // log-probability decisions: one scored call per task, evens first
    let lp = BenchConfig {
        decisions: Decisions::Logprob,
        method: Method::Baseline,
        ..cfg.clone()
    };
    let c = Scripted {
        calls: AtomicUsize::new(0),
        mode: 0,
    };
    let recs = run(&s, &set, &c, &lp, &dir.path().join("j5.jsonl"), false);
    for r in &recs {
        assert!(r.truth_rank.unwrap() <= evens(r));
        assert_eq!(r.calls, 1);
    }
    // planning + tool use: the plan's two subtasks each make one tool call on the task's
    // environment, then one ranking call that sees what was gathered
    let plan = BenchConfig {
        method: Method::Planner,
        ..cfg.clone()
    };
    let c = Scripted {
        calls: AtomicUsize::new(0),
        mode: 0,
    };
    let recs = run(&s, &set, &c, &plan, &dir.path().join("j7.jsonl"), false);
    for r in &recs {
        assert_eq!(r.calls, 4, "{r:?}");
        assert!(r.truth_rank.unwrap() <= evens(r), "{r:?}");
    }
    let j = std::fs::read_to_string(dir.path().join("j7.jsonl")).unwrap();
    assert!(j.contains("Information you gathered with the tools") && j.contains("get_reviews"));

    // CoT cannot be read from one scored answer: a clear error per task
    let cot = BenchConfig {
        method: Method::Cot,
        ..lp.clone()
    };
    let recs = run(&s, &one, &c, &cot, &dir.path().join("j6.jsonl"), false);
    assert!(recs[0].error.as_deref().unwrap().contains("logprob"));
}
