//! The Agent4Rec episode end to end on a small generated world, with a scripted model (replies
//! chosen from the prompt, as a recorded exchange would be): the page protocol, memory and
//! reflections, metrics, the discrimination test, and resume from the journal after a failure.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use rudder_agents::agent4rec::{self, Catalog, Decisions, Env, NoProgress, Recommender, SimConfig};
use rudder_agents::journal::Journal;
use rudder_agents::memory::HashEmbedder;
use rudder_agents::pages::Baseline;
use rudder_client::openai::{ChatResponse, Usage};
use rudder_client::{BoxFut, ChatMessage, ChatRequest, ClientError, LlmClient, Scores};

/// Writes an Agent4Rec-layout folder: 6 users, 40 movies.
fn world(dir: &std::path::Path) {
    rudder_agents::fixtures::write_world(dir).unwrap();
}

/// Replies from the prompt: likes even-numbered movies (rating 5 for those divisible by 4,
/// else 3), leaves on page 2, rates the recommender 7; fails every call after `fail_after`.
struct Scripted {
    calls: AtomicUsize,
    fail_after: usize,
}

fn reply_for(req: &ChatRequest) -> String {
    let user = req
        .messages
        .iter()
        .find(|m| m.role == "user")
        .map(|m| m.content.as_str())
        .unwrap_or("");
    let movies: Vec<u32> = user
        .lines()
        .filter_map(|l| l.strip_prefix("<- Movie "))
        .filter_map(|l| l.split(' ').next()?.parse().ok())
        .collect();
    if user.contains("#### Recommended List ####") {
        let mut s = String::new();
        for &m in &movies {
            let yes = if m % 2 == 0 { "yes" } else { "no" };
            // markdown and lower case, as small models write
            s.push_str(&format!(
                "- **Movie:** movie {m}; align: {yes}; reason: r\n"
            ));
        }
        s.push_str("NUM: 2; WATCH: …; REASON: r;\n");
        for &m in movies.iter().filter(|m| *m % 2 == 0) {
            let r = if m % 4 == 0 { 5 } else { 3 };
            s.push_str(&format!("MOVIE: Movie {m}; RATING: {r}; FEELING: fine\n"));
        }
        s
    } else if user.contains("[EXIT]") {
        let sys = req.messages[0].content.as_str();
        if sys.contains("page 2.") {
            "NEGATIVE: tired\n[EXIT]; Reason: tired".into()
        } else {
            "POSITIVE: ok\n[NEXT]; Reason: more".into()
        }
    } else if user.contains("interview") {
        "RATING: 7; REASON: decent".into()
    } else if user.contains("##recommended list##") {
        user.lines()
            .filter_map(|l| l.strip_prefix("<- Movie "))
            .map(|l| {
                let m: u32 = l.split(' ').next().unwrap().parse().unwrap();
                format!(
                    "MOVIE: Movie {m}; WATCH: {}; REASON: r",
                    if m.is_multiple_of(2) { "yes" } else { "no" }
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    } else if user.contains("Given a user's rating history") {
        "TASTE: I enjoy dramas.\nREASON: many fives\n**TASTE:** I like comedies\nREASON: r\nHIGH RATINGS: dramas\nLOW RATINGS: horror".into()
    } else if user.contains("satisfied") {
        "satisfied with the recommendation result because it fits".into()
    } else {
        "?".into()
    }
}

impl LlmClient for Scripted {
    fn chat<'a>(&'a self, req: ChatRequest) -> BoxFut<'a, rudder_client::Result<ChatResponse>> {
        Box::pin(async move {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            if n >= self.fail_after {
                return Err(ClientError::Connect("scripted outage".into()));
            }
            let text = reply_for(&req);
            Ok(ChatResponse::from_text(
                "scripted",
                text,
                Some(Usage {
                    prompt_tokens: 100,
                    completion_tokens: 10,
                    total_tokens: 110,
                }),
            ))
        })
    }
    fn continuation_logprobs<'a>(
        &'a self,
        _model: &'a str,
        messages: Vec<ChatMessage>,
        continuations: Vec<String>,
    ) -> BoxFut<'a, rudder_client::Result<Scores>> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let neutral = messages[0].content == "N/A";
            // the model's prior: [EXIT] over [NEXT] by 2 nats whatever the agent; the agent's
            // state adds 1.5 for [NEXT]; otherwise it prefers "yes", rating 5 and 8/10
            let lp = continuations
                .iter()
                .map(|c| {
                    if c.starts_with("[EXIT]") {
                        -1.0
                    } else if c.starts_with("[NEXT]") {
                        if neutral { -3.0 } else { -1.5 }
                    } else if neutral {
                        0.0
                    } else if c.contains("yes")
                        || c.contains("RATING: 5; FEELING")
                        || c.contains("RATING: 8;")
                    {
                        -0.1
                    } else {
                        -3.0
                    }
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

fn load(dir: &std::path::Path) -> rudder_data::Dataset {
    rudder_data::formats::lightgcn::read_dir(dir).unwrap()
}

async fn run(
    ds: &rudder_data::Dataset,
    client: &dyn LlmClient,
    journal: &Journal,
    cfg: &SimConfig,
) -> rudder_agents::Result<Vec<agent4rec::Round>> {
    let cat = Catalog::from_dataset(ds).unwrap();
    let env = Env {
        client,
        journal,
        cfg,
        catalog: &cat,
        embedder: Arc::new(HashEmbedder { dim: 512 }),
        progress: &NoProgress,
        priors: Default::default(),
    };
    let profiles = agent4rec::profiles(ds, cfg.agents)?;
    agent4rec::simulate(
        &env,
        ds,
        &profiles,
        Recommender::Baseline(Baseline::Pop),
        1,
        &mut |_, _| Ok(()),
    )
    .await
}

fn cfg() -> SimConfig {
    SimConfig {
        agents: 6,
        pages: 5,
        per_page: 4,
        concurrency: 3,
        retries: 1,
        ..Default::default()
    }
}

#[tokio::test]
async fn an_episode_follows_the_page_protocol() {
    let tmp = tempfile::tempdir().unwrap();
    world(tmp.path());
    let ds = load(tmp.path());
    let j = Journal::open(
        &tmp.path().join("j.jsonl"),
        &serde_json::json!({"t": "header"}),
        false,
    )
    .unwrap();
    let client = Scripted {
        calls: AtomicUsize::new(0),
        fail_after: usize::MAX,
    };
    let rounds = run(&ds, &client, &j, &cfg()).await.unwrap();
    let r = &rounds[0];
    assert!(r.failures.is_empty());
    assert_eq!(r.episodes.len(), 6);
    let m = &r.metrics;
    for e in &r.episodes {
        assert_eq!(e.exit_page(), 2, "leaves on page 2");
        // 2 pages × (reaction + exit) + 1 reflection (after page 2) + interview
        assert_eq!(e.usage.calls, 6, "user {}", e.user);
        assert!(
            e.pages[1]
                .reflection
                .as_deref()
                .unwrap()
                .starts_with("satisfied")
        );
        assert!(e.pages[0].reflection.is_none());
        for p in &e.pages {
            assert!(p.reaction_read);
            assert_eq!(p.items.len(), 4);
            for (k, &i) in p.items.iter().enumerate() {
                assert_eq!(p.align[k], Some(i % 2 == 0), "positional ALIGN");
            }
            assert_eq!(p.watched, p.aligned, "every aligned movie was rated");
            for (w, r) in p.watched.iter().zip(&p.ratings) {
                assert_eq!(*r, if w % 4 == 0 { 5 } else { 3 });
            }
            // train and test are masked
            let s = ds.split.as_ref().unwrap();
            for &i in &p.items {
                assert!(!s.train.items(e.user).contains(&i) && !s.test.items(e.user).contains(&i));
            }
        }
        assert_eq!(e.interview.rating, Some(7));
    }
    assert_eq!(m.exit_page, 2.0);
    assert_eq!(m.exit_pages[1], 6);
    assert_eq!(m.satisfaction, Some(7.0));
    assert_eq!(m.reflections_satisfied, Some(1.0));
    let aligned: usize = r
        .episodes
        .iter()
        .flat_map(|e| &e.pages)
        .map(|p| p.aligned.len())
        .sum();
    assert!((m.likes_per_page - aligned as f64 / 12.0).abs() < 1e-9);
    assert!(
        (m.click_rate - m.watch_rate * 8.0 / 20.0).abs() < 1e-9,
        "click rate divides by max pages"
    );
    assert_eq!(m.calls, 36);
    assert_eq!(m.prompt_tokens, 3600);
    assert_eq!(m.unparsed_reactions, 0);
    // precision / recall of ALIGN against the valid split, per agent then averaged
    let s = ds.split.as_ref().unwrap();
    let (mut prec, mut rec) = (0.0, 0.0);
    for e in &r.episodes {
        let held: std::collections::HashSet<u32> = s.valid.items(e.user).iter().copied().collect();
        let hits = e
            .pages
            .iter()
            .flat_map(|p| &p.aligned)
            .filter(|i| held.contains(i))
            .count() as f64;
        let al: usize = e.pages.iter().map(|p| p.aligned.len()).sum();
        let gt: usize = e.pages.iter().map(|p| p.ground_truth.len()).sum();
        assert_eq!(
            gt,
            e.pages
                .iter()
                .flat_map(|p| &p.items)
                .filter(|i| held.contains(i))
                .count()
        );
        prec += hits / al.max(1) as f64;
        rec += hits / gt.max(1) as f64;
    }
    assert!((m.align_precision - prec / 6.0).abs() < 1e-12);
    assert!((m.align_recall - rec / 6.0).abs() < 1e-12);
}

#[tokio::test]
async fn a_run_resumes_from_its_journal_with_the_same_numbers() {
    let tmp = tempfile::tempdir().unwrap();
    world(tmp.path());
    let ds = load(tmp.path());
    let header = serde_json::json!({"t": "header", "v": 1});
    // uninterrupted
    let j = Journal::open(&tmp.path().join("a.jsonl"), &header, false).unwrap();
    let full = Scripted {
        calls: AtomicUsize::new(0),
        fail_after: usize::MAX,
    };
    let a = run(&ds, &full, &j, &cfg()).await.unwrap();
    // interrupted: the model goes away after 10 calls; agents fail, the run records them
    let path = tmp.path().join("b.jsonl");
    let j = Journal::open(&path, &header, false).unwrap();
    let broken = Scripted {
        calls: AtomicUsize::new(0),
        fail_after: 10,
    };
    let b1 = run(&ds, &broken, &j, &cfg()).await.unwrap();
    assert!(!b1[0].failures.is_empty(), "some agents failed");
    drop(j);
    // a torn line at the end, as a kill leaves it
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend_from_slice(b"{\"t\": \"llm\", \"scope\": \"sim/r0\", \"ag");
    std::fs::write(&path, bytes).unwrap();
    let j = Journal::open(&path, &header, true).unwrap();
    assert!(j.repaired_bytes > 0);
    assert_eq!(j.n_calls(), 10, "the 10 answered calls are in the journal");
    let resumed = Scripted {
        calls: AtomicUsize::new(0),
        fail_after: usize::MAX,
    };
    let b = run(&ds, &resumed, &j, &cfg()).await.unwrap();
    assert!(b[0].failures.is_empty());
    assert_eq!(
        resumed.calls.load(Ordering::SeqCst),
        36 - 10,
        "finished calls are not repeated"
    );
    let strip = |m: &agent4rec::SimMetrics| {
        let mut m = m.clone();
        m.calls_from_journal = 0;
        m.seconds_per_agent = 0.0;
        m
    };
    assert_eq!(strip(&a[0].metrics), strip(&b[0].metrics));
    assert_eq!(b[0].metrics.calls_from_journal, 10);
    for (x, y) in a[0].episodes.iter().zip(&b[0].episodes) {
        assert_eq!(x.pages, y.pages);
    }
    // every LLM exchange is in the journal exactly once
    let text = std::fs::read_to_string(&path).unwrap();
    let llm = text.lines().filter(|l| l.contains("\"t\":\"llm\"")).count();
    assert_eq!(llm, 36);
    // a journal from other settings is refused
    drop(j);
    let e = Journal::open(&path, &serde_json::json!({"t": "header", "v": 2}), true)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("other settings"), "{e}");
}

#[tokio::test]
async fn log_probability_decisions_and_discrimination() {
    let tmp = tempfile::tempdir().unwrap();
    world(tmp.path());
    let ds = load(tmp.path());
    let j = Journal::open(
        &tmp.path().join("j.jsonl"),
        &serde_json::json!({"t": "h"}),
        false,
    )
    .unwrap();
    let client = Scripted {
        calls: AtomicUsize::new(0),
        fail_after: usize::MAX,
    };
    let mut c = cfg();
    c.decisions = Decisions::Logprob;
    c.pages = 3;
    let r = run(&ds, &client, &j, &c).await.unwrap();
    for e in &r[0].episodes {
        assert_eq!(
            e.exit_page(),
            3,
            "always [NEXT]: forced exit after the last page"
        );
        for p in &e.pages {
            assert!(p.align.iter().all(|a| *a == Some(true)));
            assert!(p.ratings.iter().all(|&x| x == 5));
        }
        assert_eq!(e.interview.rating, Some(8));
    }
    // discrimination at 1:1 and 1:3 with text decisions
    let cat = Catalog::from_dataset(&ds).unwrap();
    let c = cfg();
    let env = Env {
        client: &client,
        journal: &j,
        cfg: &c,
        catalog: &cat,
        embedder: Arc::new(HashEmbedder { dim: 64 }),
        progress: &NoProgress,
        priors: Default::default(),
    };
    let profiles = agent4rec::profiles(&ds, 6).unwrap();
    let d = agent4rec::discriminate(&env, &ds, &profiles, &[1, 3])
        .await
        .unwrap();
    for (m, recs) in &d {
        assert_eq!(m.agents, 6);
        for r in recs {
            let pos = r.truth.iter().filter(|&&t| t).count();
            assert_eq!(r.truth.len(), pos * (m.ratio + 1));
            assert!(r.read);
            for (i, s) in r.items.iter().zip(&r.said) {
                assert_eq!(*s, Some(i % 2 == 0));
            }
        }
        assert!(m.accuracy > 0.0 && m.accuracy <= 1.0);
    }
    assert_eq!(
        d[0].1[0].truth.len(),
        20,
        "1:1: 10 observed (valid ∪ test) + 10 unobserved"
    );
}

#[test]
fn bad_profiles_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    world(tmp.path());
    std::fs::write(
        tmp.path().join("personas.csv"),
        "taste,reason,high_rating,low_rating\n I like x.,r,h,l\n",
    )
    .unwrap();
    let ds = load(tmp.path());
    let e = agent4rec::profiles(&ds, 3).unwrap_err().to_string();
    assert!(e.contains("no persona for user 1"), "{e}");
    let e = agent4rec::profiles(&ds, 99).unwrap_err().to_string();
    assert!(e.contains("--agents 99"), "{e}");
}

#[tokio::test]
async fn personas_from_rating_histories() {
    use rudder_data::{Dataset, IdMap, Interaction, Interactions, Table};
    let mut users = IdMap::new();
    let mut items = IdMap::new();
    for u in 0..2 {
        users.insert(&format!("u{u}"));
    }
    let mut titles = Vec::new();
    for i in 0..12 {
        items.insert(&format!("i{i}"));
        titles.push(format!("Title {i}"));
    }
    let list: Vec<Interaction> = (0..12u32)
        .map(|i| Interaction {
            user: i % 2,
            item: i,
            rating: Some((i % 5 + 1) as f32),
            timestamp: None,
        })
        .collect();
    let inter = Interactions::from_interactions(2, 12, &list);
    let ds = Dataset {
        name: "tiny".into(),
        users,
        items,
        user_table: Table::default(),
        item_table: Table {
            title: Some(titles),
            ..Default::default()
        },
        interactions: inter,
        split: None,
    };
    let h = agent4rec::rating_history(&ds, 0, 1, 5).unwrap();
    // user 0 rated items 0,2,4,6,8,10 with 1,3,5,2,4,1: at most one title per value
    assert_eq!(
        h.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![1, 1, 1, 1, 1]
    );
    let h = agent4rec::rating_history(&ds, 0, 100, 5).unwrap();
    assert_eq!(h[0].len(), 2, "two 1-star titles");
    let tmp = tempfile::tempdir().unwrap();
    let j = Journal::open(
        &tmp.path().join("p.jsonl"),
        &serde_json::json!({"t": "p"}),
        false,
    )
    .unwrap();
    let client = Scripted {
        calls: AtomicUsize::new(0),
        fail_after: usize::MAX,
    };
    let cat = Catalog::from_dataset(&ds).unwrap();
    let c = cfg();
    let env = Env {
        client: &client,
        journal: &j,
        cfg: &c,
        catalog: &cat,
        embedder: Arc::new(HashEmbedder { dim: 8 }),
        progress: &NoProgress,
        priors: Default::default(),
    };
    let (rows, failed) = agent4rec::personas(&env, &ds, &[0, 1], 100).await.unwrap();
    assert!(failed.is_empty());
    assert!(rows.iter().all(|r| r.read));
    assert_eq!(
        rows[0].persona.taste,
        vec!["I enjoy dramas.".to_string(), "I like comedies".to_string()]
    );
    let csv = agent4rec::personas_csv(&rows);
    assert!(
        csv.starts_with(
            "taste,reason,high_rating,low_rating\n\"I enjoy dramas.| I like comedies\""
        ),
        "{csv}"
    );
    // a dataset without ratings is refused by name
    let mut no = ds.clone();
    no.interactions = Interactions::from_lists(12, &[vec![0], vec![1]]);
    let e = agent4rec::rating_history(&no, 0, 5, 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no ratings"), "{e}");
}
