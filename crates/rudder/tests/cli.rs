//! The binary as a person uses it: help texts, clear errors without panics, run folders.

use std::path::Path;
use std::process::{Command, Output};

fn rudder(args: &[&str], home: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rudder"))
        .args(args)
        .env("RUDDER_HOME", home)
        .output()
        .expect("rudder runs")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn every_subcommand_has_help() {
    let home = tempfile::tempdir().unwrap();
    for args in [
        vec!["--help"],
        vec!["data", "--help"],
        vec!["data", "synth", "--help"],
        vec!["data", "stats", "--help"],
        vec!["data", "convert", "--help"],
        vec!["data", "split", "--help"],
        vec!["assets", "--help"],
        vec!["assets", "list", "--help"],
        vec!["assets", "fetch", "--help"],
        vec!["assets", "path", "--help"],
        vec!["demo", "--help"],
    ] {
        let o = rudder(&args, home.path());
        let (out, _) = text(&o);
        assert!(o.status.success(), "{args:?}");
        assert!(out.contains("Usage:"), "{args:?}: {out}");
    }
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let home = tempfile::tempdir().unwrap();
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("train.txt"), "0 1 2\n1 two\n").unwrap();
    let dp = d.path().to_str().unwrap();
    for args in [
        vec!["data", "stats", dp],
        vec!["data", "stats", "no-such-dataset"],
        vec!["data", "stats", "ml-1m"], // not fetched in this empty home
        vec!["data", "convert", dp, "--to", "parquet", "--out", "/tmp/x"],
        vec![
            "data", "split", "synth", "--out", "/tmp/x", "--method", "sideways",
        ],
        vec!["assets", "fetch", "nonexistent"],
        vec!["assets", "path", "ml-1m"],
        vec!["demo", "--data", dp],
    ] {
        let o = rudder(&args, home.path());
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.starts_with("error: "), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    let o = rudder(&["data", "stats", dp], home.path());
    assert!(
        text(&o)
            .1
            .contains("train.txt:2: column 2: `two` is not a non-negative integer id")
    );
    let o = rudder(&["data", "stats", "ml-1m"], home.path());
    assert!(text(&o).1.contains("rudder assets fetch ml-1m"));
    // a library error that quotes its io source is not repeated by a `caused by` line
    let o = rudder(
        &[
            "embed",
            "-i",
            "/no/such/file.item",
            "-m",
            dp,
            "-o",
            "/tmp/x.st",
        ],
        home.path(),
    );
    let err = text(&o).1;
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(!err.contains("caused by"), "{err}");
}

/// Filters that leave nothing are an error naming the filter, not an empty dataset and exit 0.
#[test]
fn split_that_leaves_nothing_is_an_error() {
    let home = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let o = rudder(
        &[
            "data",
            "split",
            "synth",
            "--kcore",
            "100000",
            "--out",
            out.path().join("s").to_str().unwrap(),
        ],
        home.path(),
    );
    let err = text(&o).1;
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--kcore 100000") && err.contains("is empty"),
        "{err}"
    );
    assert!(!out.path().join("s").exists());
}

/// One id of 2,000,000,000 in LightGCN lines is remapped (with a warning) instead of making
/// `data stats` allocate per id; sparse ids stay the external ids.
#[test]
fn sparse_lightgcn_ids_do_not_allocate_per_id() {
    let home = tempfile::tempdir().unwrap();
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("train.txt"), "0 1 2\n2000000000 2 5\n").unwrap();
    let o = rudder(&["data", "stats", d.path().to_str().unwrap()], home.path());
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("user ids are sparse"), "{err}");
    assert!(out.contains("users") && out.contains("2"), "{out}");
}

/// `assets path` names the model file of a single-file model, the folder otherwise.
#[test]
fn assets_path_names_the_model_file() {
    let home = tempfile::tempdir().unwrap();
    let a = home.path().join("assets/smollm2-135m-instruct");
    std::fs::create_dir_all(&a).unwrap();
    std::fs::write(a.join("m.Q4_1.gguf"), b"").unwrap();
    std::fs::write(
        a.join(".rudder-asset.json"),
        r#"{"name":"smollm2-135m-instruct","source":"test","format":"gguf","files":[],"fetched_unix":0}"#,
    )
    .unwrap();
    let o = rudder(&["assets", "path", "smollm2-135m-instruct"], home.path());
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert_eq!(out.trim(), a.join("m.Q4_1.gguf").to_str().unwrap());
}

#[test]
fn synth_split_convert_and_stats_chain() {
    let home = tempfile::tempdir().unwrap();
    let t = tempfile::tempdir().unwrap();
    let world = t.path().join("world");
    let split = t.path().join("split");
    let back = t.path().join("back");
    let w = world.to_str().unwrap();
    let o = rudder(
        &[
            "data", "synth", "--users", "200", "--items", "300", "--out", w,
        ],
        home.path(),
    );
    assert!(o.status.success(), "{}", text(&o).1);
    assert!(world.join("synth.inter").exists() && world.join("synth.item").exists());
    let o = rudder(
        &[
            "data",
            "split",
            w,
            "--min-rating",
            "3",
            "--kcore",
            "3",
            "--out",
            split.to_str().unwrap(),
        ],
        home.path(),
    );
    assert!(o.status.success(), "{}", text(&o).1);
    for f in [
        "train.txt",
        "valid.txt",
        "test.txt",
        "user_list.txt",
        "item_list.txt",
        "items.item",
    ] {
        assert!(split.join(f).exists(), "{f}");
    }
    let o = rudder(
        &[
            "data",
            "convert",
            split.to_str().unwrap(),
            "--to",
            "atomic",
            "--out",
            back.to_str().unwrap(),
        ],
        home.path(),
    );
    assert!(o.status.success(), "{}", text(&o).1);
    let o = rudder(
        &["data", "stats", back.to_str().unwrap(), "--json"],
        home.path(),
    );
    let js: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let o2 = rudder(
        &["data", "stats", split.to_str().unwrap(), "--json"],
        home.path(),
    );
    let js2: serde_json::Value = serde_json::from_slice(&o2.stdout).unwrap();
    assert_eq!(js["interactions"], js2["interactions"]);
    assert_eq!(
        js["splits"][0]["interactions"],
        js2["splits"][0]["interactions"]
    );
}

#[test]
fn demo_writes_a_run_folder() {
    let home = tempfile::tempdir().unwrap();
    let t = tempfile::tempdir().unwrap();
    let run = t.path().join("run");
    let o = rudder(
        &["demo", "--epochs", "5", "--out", run.to_str().unwrap()],
        home.path(),
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("| most-popular |"), "{out}");
    let cfg = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(cfg.contains("data = \"synth\""));
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 9, "3 baselines + MF/LightGCN × 3 losses");
    for sub in ["mf-bpr", "lightgcn-infonce", "lightgcn-advinfonce"] {
        for f in [
            "config.toml",
            "metrics.jsonl",
            "summary.md",
            "best.safetensors",
        ] {
            assert!(run.join(sub).join(f).exists(), "{sub}/{f}");
        }
    }
    assert!(lines.iter().all(|l| l["recall@20"].as_f64().unwrap() > 0.0));
    let recall = |m: &str| {
        lines.iter().find(|l| l["model"] == m).unwrap()["recall@20"]
            .as_f64()
            .unwrap()
    };
    assert!(recall("oracle (true tastes)") > recall("most-popular"));
    assert!(recall("most-popular") > recall("random"));
    assert!(
        std::fs::read_to_string(run.join("summary.md"))
            .unwrap()
            .contains("Recall@20")
    );
}

#[test]
fn cf_train_eval_recommend_on_synth() {
    let home = tempfile::tempdir().unwrap();
    let t = tempfile::tempdir().unwrap();
    let run = t.path().join("run");
    let r = run.to_str().unwrap();
    let o = rudder(
        &[
            "cf",
            "train",
            "--data",
            "synth",
            "--model",
            "lightgcn",
            "--loss",
            "infonce",
            "--epochs",
            "4",
            "--eval-every",
            "2",
            "--out",
            r,
        ],
        home.path(),
    );
    assert!(o.status.success(), "{}", text(&o).1);
    assert!(text(&o).0.contains("| test |"), "{}", text(&o).0);
    let cfg = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(
        cfg.contains("loss = \"infonce\"") && cfg.contains("tau = 0.2"),
        "{cfg}"
    );
    // the saved config repeats the run exactly
    let run2 = t.path().join("run2");
    let o = rudder(
        &[
            "cf",
            "train",
            "--config",
            run.join("config.toml").to_str().unwrap(),
            "--out",
            run2.to_str().unwrap(),
        ],
        home.path(),
    );
    assert!(o.status.success(), "{}", text(&o).1);
    let m1 = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let m2 = std::fs::read_to_string(run2.join("metrics.jsonl")).unwrap();
    let strip = |s: &str| {
        s.lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                v.as_object_mut()
                    .unwrap()
                    .retain(|k, _| !k.contains("seconds"));
                v
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(&m1), strip(&m2));
    let o = rudder(&["cf", "eval", "--run", r], home.path());
    assert!(o.status.success(), "{}", text(&o).1);
    assert!(text(&o).0.contains("| valid |") && run.join("eval.jsonl").exists());
    let o = rudder(
        &["cf", "recommend", "--run", r, "--user", "7", "-k", "5"],
        home.path(),
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert_eq!(out.lines().filter(|l| l.contains(". ")).count(), 5, "{out}");
    assert!(
        out.contains("(19") || out.contains("(20"),
        "titles with years: {out}"
    );
    let o = rudder(
        &["cf", "recommend", "--run", r, "--user", "nobody"],
        home.path(),
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("user `nobody` is not in"));
}

#[test]
fn cf_rejects_inconsistent_options() {
    let home = tempfile::tempdir().unwrap();
    for args in [
        vec![
            "cf",
            "train",
            "--data",
            "synth",
            "--loss",
            "bpr",
            "--tau",
            "0.1",
            "--out",
            "/tmp/never",
        ],
        vec![
            "cf",
            "train",
            "--data",
            "synth",
            "--model",
            "gru",
            "--out",
            "/tmp/never",
        ],
        vec![
            "cf",
            "train",
            "--data",
            "synth",
            "--preset",
            "nope",
            "--out",
            "/tmp/never",
        ],
        vec![
            "cf",
            "train",
            "--data",
            "synth",
            "--lr",
            "0",
            "--out",
            "/tmp/never",
        ],
        vec!["cf", "eval", "--run", "/tmp/definitely-not-a-run"],
    ] {
        let o = rudder(&args, home.path());
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.starts_with("error: ") && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
}

/// `cf train` killed with SIGKILL mid-run and continued with `--resume` ends with exactly the
/// metrics and weights of an uninterrupted run (same seed, same threads), and its metrics.jsonl
/// has every epoch once: AdvInfoNCE (the adversary's hardness tables and their optimizer) and
/// AdvDrop (the mask network's own optimizer), both with adversarial phases before and after
/// the kill.
#[cfg(unix)]
#[test]
fn cf_train_survives_sigkill_and_resumes_exactly() {
    use std::os::unix::process::ExitStatusExt;
    let home = tempfile::tempdir().unwrap();
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("syn");
    let o = rudder(
        &[
            "data",
            "synth",
            "--users",
            "400",
            "--items",
            "300",
            "--out",
            data.to_str().unwrap(),
        ],
        home.path(),
    );
    assert!(o.status.success());
    let strip = |p: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                for k in ["seconds", "adv_seconds", "eval_seconds"] {
                    v.as_object_mut().unwrap().remove(k);
                }
                v
            })
            .collect()
    };
    let cases: [(&str, &[&str], usize); 2] = [
        (
            "advinfonce",
            &[
                "--loss",
                "advinfonce",
                "--epochs",
                "24",
                "--adv-interval",
                "2",
                "--eta-epochs",
                "12",
                "--patience",
                "0",
            ],
            5,
        ),
        (
            "advdrop",
            &["--model", "advdrop", "--epochs", "30", "--patience", "0"],
            9,
        ),
    ];
    for (name, extra, kill_after) in cases {
        let args = |out: &Path| -> Vec<String> {
            let mut v: Vec<String> = [
                "--threads",
                "2",
                "cf",
                "train",
                "--data",
                data.to_str().unwrap(),
                "--eval-every",
                "2",
                "--out",
                out.to_str().unwrap(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            v.extend(extra.iter().map(|s| s.to_string()));
            v
        };
        let whole = d.path().join(format!("{name}-whole"));
        let a = args(&whole);
        let o = rudder(
            &a.iter().map(String::as_str).collect::<Vec<_>>(),
            home.path(),
        );
        assert!(o.status.success(), "{}", text(&o).1);

        let cut = d.path().join(format!("{name}-cut"));
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_rudder"))
            .args(args(&cut))
            .env("RUDDER_HOME", home.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let metrics = cut.join("metrics.jsonl");
        let t0 = std::time::Instant::now();
        loop {
            let n = std::fs::read_to_string(&metrics).map_or(0, |s| s.lines().count());
            if n >= kill_after {
                break;
            }
            assert!(
                t0.elapsed().as_secs() < 120,
                "{name}: no checkpoint appeared"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        child.kill().unwrap(); // SIGKILL
        let st = child.wait().unwrap();
        assert_eq!(
            st.signal(),
            Some(9),
            "{name}: the run ended before the kill"
        );
        assert!(cut.join("checkpoint.safetensors").exists());
        assert!(!cut.join("summary.md").exists());
        // a fresh run into the interrupted folder is refused, not silently restarted
        let o = rudder(
            &args(&cut).iter().map(String::as_str).collect::<Vec<_>>(),
            home.path(),
        );
        assert!(text(&o).1.contains("--resume"), "{}", text(&o).1);

        let o = rudder(
            &[
                "--threads",
                "2",
                "cf",
                "train",
                "--resume",
                cut.to_str().unwrap(),
            ],
            home.path(),
        );
        assert!(o.status.success(), "{name}: {}", text(&o).1);
        let (w, c) = (strip(&whole.join("metrics.jsonl")), strip(&metrics));
        assert_eq!(w.len(), c.len(), "{name}: lines lost or duplicated");
        assert_eq!(w, c, "{name}: resumed metrics differ");
        assert_eq!(
            std::fs::read(whole.join("best.safetensors")).unwrap(),
            std::fs::read(cut.join("best.safetensors")).unwrap(),
            "{name}: resumed weights differ"
        );
        assert!(!cut.join("checkpoint.safetensors").exists());
        let o = rudder(
            &["cf", "train", "--resume", cut.to_str().unwrap()],
            home.path(),
        );
        assert!(text(&o).1.contains("complete"), "{}", text(&o).1);
    }
}
