//! `rudder sim agent4rec` end to end on a generated Agent4Rec-layout folder and a tiny
//! random-weight model: a run killed with SIGKILL and resumed ends with exactly the numbers of
//! an uninterrupted one (the resumed part replayed from the uninterrupted run's recording), the
//! discrimination mode, and bad input answered by name.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;

use rudder_lm::config::Arch;
use rudder_lm::fixtures::{TinySpec, write_hf_dir};

mod common;
use common::{fails, ok, rudder};

fn world(dir: &std::path::Path) {
    rudder_agents::fixtures::write_world(dir).unwrap();
}

fn model(dir: &Path) -> String {
    let mut spec = TinySpec::new(Arch::Llama);
    spec.context = 4096;
    let m = dir.join("m");
    write_hf_dir(&m, &spec).unwrap();
    format!("inproc:{}", m.display())
}

fn args(data: &Path, llm: &str, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "sim",
        "agent4rec",
        "--data",
        data.to_str().unwrap(),
        "--recommender",
        "pop",
        "--agents",
        "4",
        "--pages",
        "2",
        "--llm",
        llm,
        "--embedder",
        "hash",
        "--max-tokens",
        "12",
        "--retries",
        "1",
        "--concurrency",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn run(a: &[String]) -> std::process::Output {
    rudder(&a.iter().map(String::as_str).collect::<Vec<_>>())
}

/// metrics.jsonl without what depends on wall time or on the resume itself.
fn numbers(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let o = v.as_object_mut().unwrap();
            o.remove("seconds_per_agent");
            o.remove("calls_from_journal");
            v
        })
        .collect()
}

fn behaviour(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("behaviour.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["pages"].clone()
        })
        .collect()
}

#[test]
fn a_killed_simulation_resumes_with_exactly_the_uninterrupted_numbers() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    world(&data);
    let llm = model(d.path());
    let cassette = d.path().join("cassette.jsonl");
    let c = cassette.to_str().unwrap().to_string();

    // uninterrupted, recording every exchange
    let whole = d.path().join("whole");
    let o = run(&args(
        &data,
        &llm,
        &["--llm-cache", &c, "--out", whole.to_str().unwrap()],
    ));
    let out = ok(&o);
    assert!(out.contains("# Agent4Rec simulation"), "{out}");
    for f in [
        "config.toml",
        "metrics.json",
        "metrics.jsonl",
        "summary.md",
        "behaviour.jsonl",
        "interviews.jsonl",
        "transcript.jsonl",
        "feedback_train.txt",
        "journal.jsonl",
    ] {
        assert!(whole.join(f).exists(), "{f}");
    }
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(whole.join("metrics.json")).unwrap())
            .unwrap();
    assert_eq!(m["simulation"]["agents"], 4);
    // a random-weight model writes nothing readable: recorded as such, never dropped
    assert!(m["simulation"]["unparsed_reactions"].as_u64().unwrap() > 0);

    // the same run, killed after a few exchanges
    let cut = d.path().join("cut");
    let a = args(&data, &llm, &["--out", cut.to_str().unwrap()]);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_rudder"))
        .args(&a)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let journal = cut.join("journal.jsonl");
    let t0 = std::time::Instant::now();
    loop {
        let n = std::fs::read_to_string(&journal).map_or(0, |s| s.matches("\"t\":\"llm\"").count());
        if n >= 6 {
            break;
        }
        assert!(t0.elapsed().as_secs() < 120, "no exchange journaled");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    let st = child.wait().unwrap();
    assert_eq!(st.signal(), Some(9), "the run ended before the kill");
    assert!(!cut.join("metrics.json").exists());
    // a fresh run into the interrupted folder is refused
    fails(&run(&a), "--resume");
    // resume: what the journal holds is reused, the rest replayed from the recording
    let o = rudder(&[
        "sim",
        "agent4rec",
        "--resume",
        cut.to_str().unwrap(),
        "--llm-cache",
        &c,
        "--llm-cache-mode",
        "replay",
    ]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    ok(&o);
    assert!(err.contains("resuming"), "{err}");
    assert_eq!(numbers(&whole), numbers(&cut));
    assert_eq!(behaviour(&whole), behaviour(&cut));
    let count = |p: &Path| {
        std::fs::read_to_string(p.join("journal.jsonl"))
            .unwrap()
            .matches("\"t\":\"llm\"")
            .count()
    };
    assert_eq!(count(&whole), count(&cut), "no exchange lost or repeated");
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cut.join("metrics.json")).unwrap()).unwrap();
    assert!(m["simulation"]["calls_from_journal"].as_u64().unwrap() >= 6);

    // the run grows: the four agents come from the journal, the fifth is new
    let calls4 = m["simulation"]["calls"].as_u64().unwrap();
    let o = rudder(&[
        "sim",
        "agent4rec",
        "--resume",
        cut.to_str().unwrap(),
        "--extend-to",
        "5",
        "--llm-cache",
        &c,
    ]);
    ok(&o);
    let m5: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cut.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(m5["simulation"]["agents"], 5);
    assert_eq!(
        m5["simulation"]["calls_from_journal"].as_u64().unwrap(),
        calls4
    );
    assert_eq!(behaviour(&cut)[..4], behaviour(&whole)[..]);
    fails(
        &rudder(&[
            "sim",
            "agent4rec",
            "--resume",
            cut.to_str().unwrap(),
            "--extend-to",
            "3",
        ]),
        "a run can grow, not shrink",
    );

    // a malformed line inside the journal is an error naming it
    let mut text = std::fs::read_to_string(cut.join("journal.jsonl")).unwrap();
    text.insert_str(text.find('\n').unwrap() + 1, "garbage\n");
    std::fs::write(cut.join("journal.jsonl"), text).unwrap();
    std::fs::remove_file(cut.join("metrics.json")).unwrap();
    fails(
        &rudder(&["sim", "agent4rec", "--resume", cut.to_str().unwrap()]),
        "journal.jsonl:2: not a journal record",
    );
}

#[test]
fn discrimination_with_log_probabilities() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    world(&data);
    let llm = model(d.path());
    let out = d.path().join("disc");
    let o = run(&args(
        &data,
        &llm,
        &[
            "--mode",
            "discriminate",
            "--ratios",
            "1,3",
            "--decisions",
            "logprob",
            "--out",
            out.to_str().unwrap(),
        ],
    ));
    let s = ok(&o);
    assert!(
        s.contains("| 1:1 | 4 |") && s.contains("| 1:3 | 4 |"),
        "{s}"
    );
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    let d0 = &m["discrimination"][0];
    assert_eq!(d0["ratio"], 1);
    let acc = d0["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
    assert_eq!(d0["items_per_agent"].as_f64().unwrap(), 20.0);
    assert!(out.join("discrimination.jsonl").exists());
}

#[test]
fn bad_input_is_named() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    world(&data);
    let llm = "inproc:/nonexistent-model";
    // the base arguments with some flags' values replaced or added
    let o = |extra: &[&str]| {
        let mut a = args(&data, llm, &[]);
        for kv in extra.chunks(2) {
            match a.iter().position(|x| x == kv[0]) {
                Some(i) => a[i + 1] = kv[1].to_string(),
                None => a.extend([kv[0].to_string(), kv[1].to_string()]),
            }
        }
        a.extend(["--out".into(), d.path().join("x").to_str().unwrap().into()]);
        run(&a)
    };
    let mut a = args(&data, llm, &["--out", d.path().join("y").to_str().unwrap()]);
    let i = a.iter().position(|x| x == "pop").unwrap();
    a[i] = "popular".into();
    fails(
        &run(&a),
        "not pop, pop-plain, random or a `rudder cf train` run folder",
    );
    fails(&o(&["--agents", "99"]), "--agents 99");
    fails(&o(&["--decisions", "vibes"]), "unknown decisions `vibes`");
    fails(&o(&["--mode", "dream"]), "--mode \"dream\"");
    std::fs::write(
        data.join("personas.csv"),
        "taste,reason,high_rating,low_rating\nI like x.,r,h,l\n",
    )
    .unwrap();
    fails(&o(&[]), "personas.csv: no persona for user 1");
    std::fs::write(
        data.join("user_statistic.csv"),
        "user_id,activity,diversity,conformity\n0,1,1,9\n",
    )
    .unwrap();
    fails(
        &rudder(&[
            "sim",
            "agent4rec",
            "--resume",
            d.path().join("nothing").to_str().unwrap(),
        ]),
        "is this a simulation run folder?",
    );
}

#[test]
fn a_cf_run_in_the_loop_is_retrained_between_rounds() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    world(&data);
    let llm = model(d.path());
    let cf_run = d.path().join("mf");
    ok(&rudder(&[
        "cf",
        "train",
        "--data",
        data.to_str().unwrap(),
        "--model",
        "mf",
        "--dim",
        "8",
        "--epochs",
        "3",
        "--eval-every",
        "1",
        "--out",
        cf_run.to_str().unwrap(),
    ]));
    let out = d.path().join("bubble");
    let mut a = args(
        &data,
        &llm,
        &[
            "--rounds",
            "2",
            "--decisions",
            "logprob",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    let i = a.iter().position(|x| x == "pop").unwrap();
    a[i] = cf_run.to_str().unwrap().to_string();
    let i = a.iter().position(|x| x == "--agents").unwrap();
    a[i + 1] = "2".into();
    let s = ok(&run(&a));
    assert!(s.contains("| 0 |") && s.contains("| 1 |"), "{s}");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    // round 1 trained on train + every item aligned in round 0 that was not in train
    let aligned: usize = std::fs::read_to_string(out.join("behaviour_r0.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["pages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["aligned"].as_array().unwrap().len())
                .sum::<usize>()
        })
        .sum();
    let t0 = lines[0]["train_size"].as_u64().unwrap() as usize;
    let t1 = lines[1]["train_size"].as_u64().unwrap() as usize;
    assert_eq!(
        t1,
        t0 + aligned,
        "aligned items are never in train (train is masked)"
    );
    let fb = std::fs::read_to_string(out.join("feedback_train_r0.txt")).unwrap();
    assert_eq!(
        fb.split_whitespace().count() - fb.lines().count(),
        t1,
        "the feedback file is the next round's train"
    );
    assert!(out.join("rounds_diversity.png").exists() || !out.join("ratings.png").exists());

    // a run trained on another item set is refused by name
    let other = d.path().join("other");
    world(&other);
    let md = std::fs::read_to_string(other.join("movie_detail.csv")).unwrap();
    std::fs::write(
        other.join("movie_detail.csv"),
        format!("{md}40,Extra (2001),Drama,3.0,x\n"),
    )
    .unwrap();
    std::fs::write(
        other.join("train.txt"),
        "0 40 1 2\n1 3 4\n2 5\n3 6\n4 7\n5 8\n",
    )
    .unwrap();
    let run2 = d.path().join("mf2");
    ok(&rudder(&[
        "cf",
        "train",
        "--data",
        other.to_str().unwrap(),
        "--model",
        "mf",
        "--dim",
        "8",
        "--epochs",
        "1",
        "--out",
        run2.to_str().unwrap(),
    ]));
    let mut a = args(
        &data,
        &llm,
        &["--out", d.path().join("z").to_str().unwrap()],
    );
    let i = a.iter().position(|x| x == "pop").unwrap();
    a[i] = run2.to_str().unwrap().to_string();
    fails(&run(&a), "the run was trained on another item set");
}
