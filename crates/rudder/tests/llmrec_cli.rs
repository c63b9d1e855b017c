//! `rudder llmrec …` as a person uses it, on a synthetic LLaRA folder and a tiny model the test
//! writes: the sequential baselines, SFT → S-DPO, evaluation, adapters in and out, and bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rudder_lm::config::Arch;
use rudder_lm::fixtures::{TinySpec, write_hf_dir};

fn rudder(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rudder"))
        .args(args)
        .output()
        .expect("rudder runs")
}

fn ok(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "failed: {err}");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn fails(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "should fail");
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// 30 items; the next item follows the last one (mod 30); pad id 30.
fn llara_dir(dir: &Path) -> PathBuf {
    let d = dir.join("seqs");
    std::fs::create_dir_all(&d).unwrap();
    let names: String = (0..30).map(|i| format!("{i}::x{i}\n")).collect();
    std::fs::write(d.join("id2name.txt"), names).unwrap();
    let row = |start: u32, len: usize| {
        let seq: Vec<u32> = (0..10)
            .map(|k| if k < len { (start + k as u32) % 30 } else { 30 })
            .collect();
        format!(
            "{{\"seq\": {:?}, \"len_seq\": {len}, \"next\": {}}}\n",
            seq,
            (start + len as u32) % 30
        )
    };
    let train: String = (0..120)
        .map(|i| row(i % 30, 3 + (i as usize % 5)))
        .collect();
    let val: String = (0..10).map(|i| row(i * 3 % 30, 4)).collect();
    let test: String = (0..10).map(|i| row((i * 7 + 1) % 30, 5)).collect();
    std::fs::write(d.join("train.jsonl"), train).unwrap();
    std::fs::write(d.join("val.jsonl"), val).unwrap();
    std::fs::write(d.join("test.jsonl"), test).unwrap();
    d
}

fn model(dir: &Path, layers: usize) -> PathBuf {
    let m = dir.join(format!("tiny{layers}"));
    write_hf_dir(
        &m,
        &TinySpec {
            context: 512,
            layers,
            ..TinySpec::new(Arch::Llama)
        },
    )
    .unwrap();
    m
}

/// The one-line template file of these tests.
fn template(dir: &Path) -> String {
    let tpl = dir.join("t.txt");
    std::fs::write(&tpl, "h [HistoryHere] c [CansHere] a:\n").unwrap();
    tpl.to_str().unwrap().to_string()
}

/// `rudder llmrec eval` of `adapter` on the test questions of these tests.
fn eval_flags<'a>(s: &'a str, ms: &'a str, tp: &'a str, adapter: &'a str) -> Vec<&'a str> {
    vec![
        "llmrec",
        "eval",
        "--seqs",
        s,
        "--candidates",
        "5",
        "--model",
        ms,
        "--templates",
        tp,
        "--adapter",
        adapter,
    ]
}

/// The LoRA training flags of these tests (5 candidates, 8 examples, batch 4 of micro-batches
/// of 2, one epoch validated twice).
fn lora_flags<'a>(s: &'a str, ms: &'a str, tp: &'a str) -> Vec<&'a str> {
    vec![
        "--seqs",
        s,
        "--candidates",
        "5",
        "--model",
        ms,
        "--templates",
        tp,
        "--batch",
        "4",
        "--micro-batch",
        "2",
        "--epochs",
        "1",
        "--eval-every",
        "0.5",
        "--max-val",
        "4",
        "--max-train",
        "8",
    ]
}

#[test]
fn baselines_sft_sdpo_and_eval_write_run_folders() {
    let t = tempfile::tempdir().unwrap();
    let seqs = llara_dir(t.path());
    let s = seqs.to_str().unwrap();
    let m = model(t.path(), 2);
    let ms = m.to_str().unwrap();
    let tp = &template(t.path());
    let run = |n: &str| t.path().join(n).to_str().unwrap().to_string();

    let out = ok(&rudder(&[
        "llmrec",
        "sasrec",
        "--seqs",
        s,
        "--candidates",
        "5",
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--out",
        &run("sas"),
    ]));
    assert!(
        out.contains("LLM protocol") && out.contains("Full ranking"),
        "{out}"
    );
    for f in [
        "config.toml",
        "metrics.jsonl",
        "summary.md",
        "results.json",
        "model.safetensors",
    ] {
        assert!(t.path().join("sas").join(f).exists(), "{f}");
    }

    let common = [lora_flags(s, ms, tp), vec!["--lr", "1e-3"]].concat();
    let sft = run("sft");
    let out = ok(&rudder(
        &[&["llmrec", "sft"][..], &common, &["--out", &sft]].concat(),
    ));
    assert!(out.contains("Best validation loss"), "{out}");
    let adapter = t.path().join("sft/adapter");
    assert!(
        adapter.join("adapter_config.json").exists()
            && adapter.join("adapter_model.safetensors").exists()
    );
    assert!(!t.path().join("sft/checkpoint.safetensors").exists());
    // a finished run cannot be resumed; an interrupted one cannot be overwritten
    assert!(fails(&rudder(&["llmrec", "sft", "--resume", &sft])).contains("no checkpoint"));
    std::fs::write(t.path().join("sft/checkpoint.safetensors"), b"x").unwrap();
    assert!(
        fails(&rudder(
            &[&["llmrec", "sft"][..], &common, &["--out", &sft]].concat()
        ))
        .contains("--resume")
    );

    let a = adapter.to_str().unwrap();
    let out = ok(&rudder(
        &[
            &["llmrec", "sdpo"][..],
            &common,
            &["--adapter", a, "--negatives", "2", "--out", &run("sdpo")],
        ]
        .concat(),
    ));
    assert!(out.contains("reward accuracy"), "{out}");
    assert!(t.path().join("sdpo/reference_logps.safetensors").exists());

    let out = ok(&rudder(
        &[
            eval_flags(s, ms, tp, a),
            vec!["--max-new-tokens", "4", "--out", &run("ev")],
        ]
        .concat(),
    ));
    assert!(
        out.contains("Likelihood ranking") && out.contains("S-DPO (substring"),
        "{out}"
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.path().join("ev/results.json")).unwrap())
            .unwrap();
    assert_eq!(r["questions"], 10);
    assert!(r["likelihood"]["hit@1"].as_f64().is_some());
    assert_eq!(
        std::fs::read_to_string(t.path().join("ev/generations.jsonl"))
            .unwrap()
            .lines()
            .count(),
        10
    );

    // the adapter works on every lm command and can be merged into an exported folder
    ok(&rudder(&[
        "lm",
        "score",
        "--model",
        ms,
        "--adapter",
        a,
        "--prompt",
        "h x1",
        "--continuation",
        " x2",
    ]));
    ok(&rudder(&[
        "lm",
        "export-hf",
        "--model",
        ms,
        "--adapter",
        a,
        "--merge",
        "--out",
        &run("merged"),
    ]));
    assert!(ok(&rudder(&["lm", "info", "--model", &run("merged")])).contains("llama"));

    // an adapter of another model shape is refused, naming the file
    let m3 = model(t.path(), 3);
    let e = fails(&rudder(&[
        "llmrec",
        "eval",
        "--seqs",
        s,
        "--candidates",
        "5",
        "--model",
        m3.to_str().unwrap(),
        "--templates",
        tp,
        "--adapter",
        a,
        "--out",
        &run("ev3"),
    ]));
    assert!(e.contains("adapter") && e.contains("missing"), "{e}");
}

#[test]
fn bad_sequence_files_are_named_with_the_line() {
    let t = tempfile::tempdir().unwrap();
    let seqs = llara_dir(t.path());
    let mut test = std::fs::read_to_string(seqs.join("test.jsonl")).unwrap();
    test.push_str(
        "{\"seq\": [1, 2, 45, 30, 30, 30, 30, 30, 30, 30], \"len_seq\": 3, \"next\": 4}\n",
    );
    std::fs::write(seqs.join("test.jsonl"), test).unwrap();
    let e = fails(&rudder(&[
        "llmrec",
        "gru4rec",
        "--seqs",
        seqs.to_str().unwrap(),
        "--candidates",
        "5",
        "--epochs",
        "1",
        "--out",
        t.path().join("r").to_str().unwrap(),
    ]));
    assert!(e.contains("test.jsonl") && e.contains("11"), "{e}");
    let e = fails(&rudder(&[
        "llmrec",
        "caser",
        "--candidates",
        "5",
        "--out",
        t.path().join("r2").to_str().unwrap(),
    ]));
    assert!(e.contains("--seqs is required"), "{e}");
    // a template without its placeholders
    let tpl = t.path().join("bad.txt");
    std::fs::write(&tpl, "no placeholders here\n").unwrap();
    let good = llara_dir(&t.path().join("good"));
    let m = model(t.path(), 1);
    let e = fails(&rudder(&[
        "llmrec",
        "eval",
        "--seqs",
        good.to_str().unwrap(),
        "--candidates",
        "5",
        "--model",
        m.to_str().unwrap(),
        "--templates",
        tpl.to_str().unwrap(),
        "--out",
        t.path().join("r3").to_str().unwrap(),
    ]));
    assert!(
        e.contains("bad.txt") && e.contains("line 1") && e.contains("[HistoryHere]"),
        "{e}"
    );
}

#[test]
fn llara_and_ilora_train_resume_and_evaluate_on_hybrid_prompts() {
    let t = tempfile::tempdir().unwrap();
    let seqs = llara_dir(t.path());
    let s = seqs.to_str().unwrap();
    let m = model(t.path(), 2);
    let ms = m.to_str().unwrap();
    let tp = &template(t.path());
    let run = |n: &str| t.path().join(n).to_str().unwrap().to_string();
    ok(&rudder(&[
        "llmrec",
        "sasrec",
        "--seqs",
        s,
        "--candidates",
        "5",
        "--epochs",
        "1",
        "--hidden",
        "16",
        "--batch-size",
        "32",
        "--out",
        &run("sas"),
    ]));
    let sas = run("sas");
    let common = [lora_flags(s, ms, tp), vec!["--sasrec", &sas]].concat();
    let out = ok(&rudder(
        &[&["llmrec", "llara"][..], &common, &["--out", &run("llara")]].concat(),
    ));
    assert!(out.contains("Best validation loss"), "{out}");
    let la = t.path().join("llara/adapter");
    for f in [
        "hybrid.json",
        "conditioner.safetensors",
        "adapter_config.json",
    ] {
        assert!(la.join(f).exists(), "{f}");
    }
    // iLoRA: K must divide r
    let e = fails(&rudder(
        &[
            &["llmrec", "ilora"][..],
            &common,
            &["--experts", "3", "--out", &run("bad")],
        ]
        .concat(),
    ));
    assert!(e.contains("3 experts do not divide the rank 8"), "{e}");
    let il = run("ilora");
    let out = ok(&rudder(
        &[
            &["llmrec", "ilora"][..],
            &common,
            &["--experts", "4", "--out", &il],
        ]
        .concat(),
    ));
    assert!(
        out.contains("iLoRA gates on the validation questions"),
        "{out}"
    );
    assert!(t.path().join("ilora/gates.png").exists());
    let cfg = std::fs::read_to_string(t.path().join("ilora/config.toml")).unwrap();
    assert!(
        cfg.contains("[hybrid]") && cfg.contains("experts = 4"),
        "{cfg}"
    );
    // a finished iLoRA run is not an SFT run to resume
    std::fs::write(t.path().join("ilora/checkpoint.safetensors"), b"x").unwrap();
    let e = fails(&rudder(&["llmrec", "sft", "--resume", &il]));
    assert!(e.contains("is a ilora run, not sft"), "{e}");
    std::fs::remove_file(t.path().join("ilora/checkpoint.safetensors")).unwrap();

    let ia = t.path().join("ilora/adapter");
    let out = ok(&rudder(
        &[
            eval_flags(s, ms, tp, ia.to_str().unwrap()),
            vec!["--max-new-tokens", "3", "--out", &run("ev")],
        ]
        .concat(),
    ));
    assert!(
        out.contains("Hybrid prompts (ilora") && out.contains("## iLoRA gates (4 experts)"),
        "{out}"
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.path().join("ev/results.json")).unwrap())
            .unwrap();
    assert_eq!(r["gates"]["experts"], 4);
    assert!(r["likelihood"]["hit@1"].as_f64().is_some());

    // a SASRec run for another item set is refused, naming the file and the counts
    let other = t.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let names: String = (0..20).map(|i| format!("{i}::x{i}\n")).collect();
    std::fs::write(other.join("id2name.txt"), names).unwrap();
    let row = |a: u32| {
        format!(
            "{{\"seq\": [{a}, {}, 20, 20, 20, 20, 20, 20, 20, 20], \"len_seq\": 2, \"next\": {}}}\n",
            (a + 1) % 20,
            (a + 2) % 20
        )
    };
    let rows: String = (0..20).map(row).collect();
    for f in ["train.jsonl", "val.jsonl", "test.jsonl"] {
        std::fs::write(other.join(f), &rows).unwrap();
    }
    let e = fails(&rudder(&[
        "llmrec",
        "llara",
        "--seqs",
        other.to_str().unwrap(),
        "--candidates",
        "5",
        "--model",
        ms,
        "--templates",
        tp,
        "--max-train",
        "4",
        "--max-val",
        "2",
        "--sasrec",
        &sas,
        "--out",
        &run("wrong"),
    ]));
    assert!(
        e.contains("model.safetensors") && e.contains("trained on 30 items, this data has 20"),
        "{e}"
    );
}

/// `llmrec sequences`: LLaRA training rows from raw ratings (u.data), the held-out rows' users
/// left out, and clear errors for items the names do not cover.
#[test]
fn sequences_are_built_from_ratings_without_the_held_out_users() {
    let t = tempfile::tempdir().unwrap();
    let ratings = t.path().join("ml");
    std::fs::create_dir_all(&ratings).unwrap();
    // 6 users × 14 items each, user u rates items (3u + k) % 20 + 1 at time 1000u + k with
    // 3 + (k + u) % 3, except every fourth rating, a 2 (dropped by the ≥ 3 rule)
    let mut data = String::new();
    for u in 1..=6u32 {
        for k in 0..14u32 {
            let r = if k % 4 == 3 { 2 } else { 3 + (k + u) % 3 };
            data.push_str(&format!(
                "{u}\t{}\t{r}\t{}\n",
                (3 * u + k) % 20 + 1,
                1000 * u + k
            ));
        }
    }
    std::fs::write(ratings.join("u.data"), &data).unwrap();
    let llara = t.path().join("llara");
    std::fs::create_dir_all(&llara).unwrap();
    let uitem: String = (1..=20)
        .map(|i| {
            format!(
                "{i}|Movie {i} (1995)|01-Jan-1995||http://x|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
            )
        })
        .collect();
    std::fs::write(llara.join("u.item"), uitem).unwrap();
    // the kept (item id, rating) history of user u, in time order
    let hist = |u: u32| -> Vec<(u32, u32)> {
        (0..14u32)
            .filter(|k| k % 4 != 3)
            .map(|k| ((3 * u + k) % 20, 3 + (k + u) % 3))
            .collect()
    };
    // a held-out row: the last 9 history entries (two swapped) and the last as target
    let row = |u: u32| {
        let h = hist(u);
        let (w, next) = (&h[h.len() - 10..h.len() - 1], h[h.len() - 1]);
        let mut seq: Vec<String> = w.iter().map(|(i, r)| format!("[{i},{r}]")).collect();
        seq.swap(0, 1);
        seq.push("[20,0]".into());
        format!(
            "{{\"seq\":[{}],\"len_seq\":9,\"next\":[{},{}]}}\n",
            seq.join(","),
            next.0,
            next.1
        )
    };
    std::fs::write(llara.join("val.jsonl"), row(2)).unwrap();
    std::fs::write(llara.join("test.jsonl"), row(5)).unwrap();
    let out = t.path().join("built");
    let build = |out: &std::path::Path| {
        rudder(&[
            "llmrec",
            "sequences",
            "--ratings",
            ratings.to_str().unwrap(),
            "--llara",
            llara.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
    };
    let err = String::from_utf8_lossy(&build(&out).stderr).into_owned();
    assert!(out.join("train.jsonl").exists(), "{err}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("build.json")).unwrap()).unwrap();
    assert_eq!(report["held_out_users"], 2, "{report}");
    assert_eq!(report["train_users"], 4);
    assert_eq!(report["kept_interactions"], 6 * 11);
    let train = std::fs::read_to_string(out.join("train.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = train
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 4 * 11);
    assert_eq!(report["train_rows"], 44);
    // every row of user 1 in order: empty first history, then a growing window
    let h1 = hist(1);
    assert_eq!(rows[0]["len_seq"], 1);
    assert_eq!(rows[0]["seq"][0], serde_json::json!([20, 0]));
    assert_eq!(rows[0]["next"], serde_json::json!([h1[0].0, h1[0].1]));
    assert_eq!(rows[3]["len_seq"], 3);
    assert_eq!(rows[3]["seq"][2], serde_json::json!([h1[2].0, h1[2].1]));
    // no row's target comes from the held-out users' histories at their positions
    let targets: Vec<serde_json::Value> = rows.iter().map(|r| r["next"].clone()).collect();
    let h2_last = hist(2).last().copied().unwrap();
    assert_eq!(
        targets
            .iter()
            .filter(|t| **t == serde_json::json!([h2_last.0, h2_last.1]))
            .count(),
        hist(1)
            .iter()
            .chain(&hist(3))
            .chain(&hist(4))
            .chain(&hist(6))
            .filter(|x| **x == h2_last)
            .count()
    );
    // the output folder is a LLaRA folder the trainers read
    for f in ["val.jsonl", "test.jsonl", "u.item"] {
        assert!(out.join(f).exists(), "{f}");
    }
    // an item beyond the names is named
    data.push_str("1\t25\t5\t99999\n");
    std::fs::write(ratings.join("u.data"), &data).unwrap();
    let e = fails(&build(&t.path().join("b2")));
    assert!(e.contains("\"25\"") && e.contains("1..=20"), "{e}");
    // a LLaRA folder without item names
    std::fs::remove_file(llara.join("u.item")).unwrap();
    let e = fails(&build(&t.path().join("b3")));
    assert!(e.contains("u.item") || e.contains("id2name"), "{e}");
    // with id2name.txt the ids count from 0: 20 names cover ids 0..=19, so item 20 is refused
    let names: String = (0..20).map(|i| format!("{i}::Movie {i}\n")).collect();
    std::fs::write(llara.join("id2name.txt"), names).unwrap();
    let e = fails(&build(&t.path().join("b4")));
    assert!(e.contains("\"20\"") && e.contains("0..=19"), "{e}");
}

/// On the real ML-100K ratings and LLaRA's shipped MovieLens rows: every held-out row finds
/// its user, and the split is LLaRA's 8:1:1 (754 train users).
#[test]
fn ml100k_sequences_fit_llaras_held_out_rows() {
    let Some(ml) = rudder_data::assets::for_tests("ml-100k") else {
        return;
    };
    let shared = std::env::var_os("RUDDER_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data"));
    let llara = shared.join("llara/movielens");
    if !llara.join("test.jsonl").exists() {
        assert!(
            std::env::var("RUDDER_REQUIRE_ASSETS").is_err(),
            "shared data absent at {}",
            llara.display()
        );
        eprintln!("skipped: no {}", llara.display());
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("ml");
    ok(&rudder(&[
        "llmrec",
        "sequences",
        "--ratings",
        ml.to_str().unwrap(),
        "--llara",
        llara.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("build.json")).unwrap()).unwrap();
    assert_eq!(r["held_out_users"], 189, "{r}");
    assert_eq!(r["train_users"], 754);
    assert_eq!(r["kept_interactions"], 82520);
    assert_eq!(r["train_rows"], 68389);
    for s in r["held_out"].as_array().unwrap() {
        assert_eq!(s["matched"], s["rows"], "{s}");
        assert_eq!(s["ambiguous"], 0, "{s}");
    }
    assert_eq!(
        std::fs::read_to_string(out.join("train.jsonl"))
            .unwrap()
            .lines()
            .count(),
        68389
    );
}
