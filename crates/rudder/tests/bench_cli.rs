//! `rudder bench agentrec` end to end from the CLI on a generated release in the reference's
//! record schema and a tiny random-weight model: store, the five scenario builders, classical
//! and language-model recommenders, a resumed run, the report, the position diagnostic, and bad
//! input answered by name.

use std::path::Path;

use rudder_lm::config::Arch;
use rudder_lm::fixtures::{TinySpec, write_hf_dir};

mod common;
use common::{fails, ok, rudder};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `rudder bench agentrec run --tasks TASKS --agent AGENT EXTRA… --out OUT`
fn run_args<'a>(tasks: &'a Path, agent: &'a str, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "bench",
        "agentrec",
        "run",
        "--tasks",
        s(tasks),
        "--agent",
        agent,
    ];
    a.extend_from_slice(extra);
    a.extend_from_slice(&["--out", s(out)]);
    a
}

#[test]
fn agentrec_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = d.join("data");
    rudder_agents::fixtures::write_release(&data, false).unwrap();
    let out = ok(&rudder(&["bench", "agentrec", "store", "--data", s(&data)]));
    assert!(out.contains("30 users, 60 items, 362 reviews"), "{out}");
    assert!(data.join("agentrec.redb").exists());

    // every scenario builds (thresholds loosened for the small world)
    for (sc, extra) in [
        ("classic", vec!["--user-cold-max", "2"]),
        ("long", vec!["--long-days", "40", "--min-window", "1"]),
        ("short", vec!["--short-days", "10", "--min-window", "1"]),
        ("user-cold", vec!["--user-cold-max", "12"]),
        (
            "item-cold",
            vec!["--item-cold-max", "8", "--user-cold-max", "2"],
        ),
    ] {
        let t = d.join(sc);
        let mut a = vec![
            "bench",
            "agentrec",
            "build",
            "--data",
            s(&data),
            "--scenario",
            sc,
            "--tasks",
            "8",
            "--cutoff-quantile",
            "0.6",
            "--out",
            s(&t),
        ];
        a.extend(extra);
        let o = ok(&rudder(&a));
        assert!(o.contains(&format!("{sc}: ")), "{o}");
        assert!(
            t.join("tasks/task_0.json").exists()
                && t.join("groundtruth/groundtruth_0.json").exists()
        );
    }
    let tasks = d.join("classic");
    let o = ok(&rudder(&[
        "bench",
        "agentrec",
        "inspect",
        "--tasks",
        s(&tasks),
    ]));
    assert!(o.contains("identity order: HR@1"), "{o}");

    // classical recommenders (the store comes from the task folder's manifest)
    for agent in ["identity", "pop", "mf"] {
        let run = d.join(format!("run-{agent}"));
        let o = ok(&rudder(&run_args(
            &tasks,
            agent,
            &run,
            &["--cf-epochs", "3"],
        )));
        assert!(o.contains(&format!("| {agent} |")), "{o}");
        for f in [
            "config.toml",
            "metrics.json",
            "metrics.jsonl",
            "summary.md",
            "tasks.jsonl",
            "truth_rank.png",
        ] {
            assert!(run.join(f).exists(), "{agent}: {f}");
        }
    }

    // a language-model agent on a tiny random model: every reply repaired, nothing dropped;
    // the same run resumed answers every call from its journal
    let m = d.join("m");
    let mut spec = TinySpec::new(Arch::Llama);
    spec.context = 4096;
    write_hf_dir(&m, &spec).unwrap();
    let llm = format!("inproc:{}", m.display());
    let run = d.join("run-selective");
    let args = run_args(
        &tasks,
        "selective",
        &run,
        &[
            "--llm",
            &llm,
            "--max-tokens",
            "8",
            "--limit",
            "3",
            "--concurrency",
            "1",
        ],
    );
    ok(&rudder(&args));
    let m1: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(m1["tasks"], 3);
    assert_eq!(m1["repaired_tasks"], 3, "{m1}");
    fails(&rudder(&args), "finished run");
    std::fs::remove_file(run.join("metrics.json")).unwrap();
    let mut resumed = args.clone();
    resumed.push("--resume");
    ok(&rudder(&resumed));
    let m2: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(m1["hr5"], m2["hr5"]);
    assert_eq!(m1["prompt_tokens"], m2["prompt_tokens"]);
    // AlphaRec over the titles encoded by a language model (here the tiny decoder)
    let ar = d.join("run-alpharec");
    let o = ok(&rudder(&run_args(
        &tasks,
        "alpharec",
        &ar,
        &["--encoder", s(&m), "--cf-epochs", "2"],
    )));
    assert!(o.contains("| alpharec |"), "{o}");
    let summary = std::fs::read_to_string(ar.join("summary.md")).unwrap();
    assert!(summary.contains("popularity order"), "{summary}");
    assert!(summary.contains("alpharec trained (infonce)"), "{summary}");
    let lp = d.join("run-a4r");
    ok(&rudder(&run_args(
        &tasks,
        "agent4rec",
        &lp,
        &["--llm", &llm, "--decisions", "logprob", "--limit", "2"],
    )));

    let rep = d.join("report");
    let o = ok(&rudder(&[
        "bench",
        "agentrec",
        "report",
        s(&d.join("run-identity")),
        s(&d.join("run-pop")),
        s(&d.join("run-mf")),
        s(&run),
        s(&lp),
        "--out",
        s(&rep),
    ]));
    assert!(
        o.contains("| run-pop | pop |") && o.contains("| run-selective | selective |"),
        "{o}"
    );
    assert!(rep.join("report.md").exists() && rep.join("report.png").exists());

    // bad input, by name
    fails(
        &rudder(&[
            "bench",
            "agentrec",
            "run",
            "--tasks",
            s(&tasks),
            "--agent",
            "nope",
            "--out",
            s(&d.join("x")),
        ]),
        "unknown agent `nope`",
    );
    fails(
        &rudder(&[
            "bench",
            "agentrec",
            "build",
            "--data",
            s(&data),
            "--scenario",
            "warm",
            "--out",
            s(&d.join("y")),
        ]),
        "unknown scenario",
    );
    fails(
        &rudder(&[
            "bench",
            "agentrec",
            "run",
            "--tasks",
            s(&tasks),
            "--agent",
            "cot",
            "--decisions",
            "logprob",
            "--out",
            s(&d.join("z")),
        ]),
        "--decisions logprob",
    );
    std::fs::write(
        tasks.join("groundtruth/groundtruth_1.json"),
        "{\"truth\": 1}",
    )
    .unwrap();
    fails(
        &rudder(&["bench", "agentrec", "inspect", "--tasks", s(&tasks)]),
        "groundtruth_1.json: no string field `ground truth`",
    );
    let bad = d.join("bad");
    rudder_agents::fixtures::write_release(&bad, true).unwrap();
    fails(
        &rudder(&["bench", "agentrec", "store", "--data", s(&bad)]),
        "review.json:361",
    );
}
