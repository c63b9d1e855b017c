//! `rudder lm …` and `rudder embed` as a person uses them, on a tiny model the test writes
//! (and on the fetched real assets when present: SmolLM2 chat, MiniLM embeddings).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use candle_core::quantized::GgmlDType;
use rudder_lm::config::Arch;
use rudder_lm::fixtures::{TinySpec, write_gguf, write_hf_dir};

fn rudder(args: &[&str], stdin: Option<&str>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rudder"));
    c.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().expect("rudder runs");
    if let Some(s) = stdin {
        child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    } else {
        drop(child.stdin.take());
    }
    child.wait_with_output().unwrap()
}

fn ok(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "failed: {err}");
    assert!(!err.contains("panicked"), "{err}");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn tiny(dir: &Path) -> (PathBuf, PathBuf) {
    let spec = TinySpec::new(Arch::Qwen2);
    let hf = dir.join("tiny-hf");
    write_hf_dir(&hf, &spec).unwrap();
    let g = dir.join("tiny.gguf");
    write_gguf(&g, &TinySpec::new(Arch::Llama), GgmlDType::Q4_1).unwrap();
    (hf, g)
}

#[test]
fn lm_help_texts() {
    for sub in [
        "generate", "chat", "score", "capture", "dump", "bench", "info",
    ] {
        let out = ok(&rudder(&["lm", sub, "--help"], None));
        assert!(out.contains("--model"), "{sub}: {out}");
    }
    assert!(ok(&rudder(&["embed", "--help"], None)).contains("--column"));
}

#[test]
fn generate_score_capture_and_info_on_a_tiny_model() {
    let d = tempfile::tempdir().unwrap();
    let (hf, g) = tiny(d.path());
    let (hf_s, g_s) = (hf.to_str().unwrap(), g.to_str().unwrap());
    // Single prompt, greedy, deterministic.
    let a = ok(&rudder(
        &[
            "lm",
            "generate",
            "-m",
            g_s,
            "-p",
            "the sea",
            "--max-tokens",
            "8",
        ],
        None,
    ));
    let b = ok(&rudder(
        &[
            "lm",
            "generate",
            "-m",
            g_s,
            "-p",
            "the sea",
            "--max-tokens",
            "8",
        ],
        None,
    ));
    assert_eq!(a, b);
    // A prompt file with interventions, JSONL out recording them.
    let prompts = d.path().join("p.jsonl");
    std::fs::write(
        &prompts,
        "{\"prompt\": \"one\"}\n{\"prompt\": \"and two\"}\n",
    )
    .unwrap();
    let iv = d.path().join("iv.json");
    let v: Vec<f32> = vec![0.0; 64];
    std::fs::write(&iv, serde_json::json!([{"site": "blocks.1.hook_resid_pre", "kind": "add_vector", "vector": v, "alpha": 2.0}]).to_string()).unwrap();
    let out = d.path().join("gen.jsonl");
    ok(&rudder(
        &[
            "lm",
            "generate",
            "-m",
            hf_s,
            "--prompts",
            prompts.to_str().unwrap(),
            "--chat",
            "--max-tokens",
            "5",
            "--temperature",
            "0.8",
            "--top-p",
            "0.9",
            "--seed",
            "3",
            "--interventions",
            iv.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ],
        None,
    ));
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1]["prompt"], "and two");
    assert_eq!(rows[0]["interventions"][0]["kind"], "add_vector");
    assert_eq!(rows[0]["config"]["seed"], 3);
    // Scoring.
    let s = ok(&rudder(
        &[
            "lm",
            "score",
            "-m",
            hf_s,
            "--prompt",
            "the sea",
            "--continuation",
            " is blue",
        ],
        None,
    ));
    let v: serde_json::Value = serde_json::from_str(s.trim()).unwrap();
    assert!(v["sum_logprob"].as_f64().unwrap() < 0.0);
    // Capture.
    let txt = d.path().join("p.txt");
    std::fs::write(&txt, "one\ntwo words\nthree whole words\n").unwrap();
    let acts = d.path().join("acts.safetensors");
    ok(&rudder(
        &[
            "lm",
            "capture",
            "-m",
            g_s,
            "--prompts",
            txt.to_str().unwrap(),
            "--batch-size",
            "2",
            "-o",
            acts.to_str().unwrap(),
        ],
        None,
    ));
    let t = candle_core::safetensors::load(&acts, &candle_core::Device::Cpu).unwrap();
    assert_eq!(t["blocks.0.hook_resid_pre"].dims(), &[3, 64]);
    let idx: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.path().join("acts.safetensors.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(idx["meta"]["model"]["arch"], "llama");
    assert_eq!(idx["rows"][2]["prompt"], 2);
    // Info.
    let info = ok(&rudder(&["lm", "info", "-m", g_s], None));
    assert!(info.contains("\"quantized\": true"), "{info}");
}

#[test]
fn chat_reads_turns_from_stdin() {
    let d = tempfile::tempdir().unwrap();
    let (hf, _) = tiny(d.path());
    let o = ok(&rudder(
        &[
            "lm",
            "chat",
            "-m",
            hf.to_str().unwrap(),
            "--max-tokens",
            "4",
        ],
        Some("hello\n/reset\nagain\n/exit\nnot read\n"),
    ));
    assert!(!o.is_empty());
}

#[test]
fn bad_lm_input_is_an_error_not_a_panic() {
    let d = tempfile::tempdir().unwrap();
    let (hf, g) = tiny(d.path());
    let bad_iv = d.path().join("iv.json");
    std::fs::write(
        &bad_iv,
        r#"[{"site": "blocks.9.hook_resid_pre", "kind": "add_vector", "vector": [1.0]}]"#,
    )
    .unwrap();
    let junk = d.path().join("junk.gguf");
    std::fs::write(&junk, b"not a gguf").unwrap();
    let missing = d.path().join("nope");
    let long = "word ".repeat(200);
    let prompts = d.path().join("p.txt");
    std::fs::write(&prompts, "a prompt\n").unwrap();
    for (args, want) in [
        (
            vec!["lm", "generate", "-m", missing.to_str().unwrap(), "-p", "x"],
            "neither",
        ),
        (
            vec!["lm", "generate", "-m", junk.to_str().unwrap(), "-p", "x"],
            "junk.gguf",
        ),
        (
            vec![
                "lm",
                "generate",
                "-m",
                g.to_str().unwrap(),
                "-p",
                "x",
                "--interventions",
                bad_iv.to_str().unwrap(),
            ],
            "layers",
        ),
        (
            vec![
                "lm",
                "generate",
                "-m",
                hf.to_str().unwrap(),
                "-p",
                long.as_str(),
            ],
            "context window",
        ),
        (
            vec![
                "lm",
                "capture",
                "-m",
                hf.to_str().unwrap(),
                "--prompts",
                missing.to_str().unwrap(),
                "-o",
                "x",
            ],
            "nope",
        ),
        (
            vec![
                "lm",
                "capture",
                "-m",
                hf.to_str().unwrap(),
                "--prompts",
                prompts.to_str().unwrap(),
                "--sites",
                "blocks.x",
                "-o",
                "x",
            ],
            "unknown site",
        ),
    ] {
        let o = rudder(&args, None);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} should fail");
        assert!(
            err.contains(want) && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
}

fn asset(name: &str) -> Option<PathBuf> {
    rudder_data::assets::for_tests(name)
}

#[test]
fn smollm2_chats_and_minilm_embeds_titles() {
    let (Some(smol), Some(mini), Some(ml)) = (
        asset("smollm2-135m-instruct"),
        asset("all-minilm-l6-v2"),
        asset("ml-100k"),
    ) else {
        return;
    };
    let o = ok(&rudder(
        &[
            "lm",
            "chat",
            "-m",
            smol.to_str().unwrap(),
            "--max-tokens",
            "32",
        ],
        // "Answer in one word." gives a clear first token: for the bare question the f32
        // model's top two first tokens ("The", "L") are 0.08 apart, and with 8-bit activations
        // (Q4_1 × Q8 products, as in llama.cpp) a relative change of 1e-7 in one norm's output
        // already swaps them, so the bare question tests rounding, not the engine.
        Some("What is the capital of France? Answer in one word.\n"),
    ));
    assert!(o.contains("Paris"), "{o}");
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("t.safetensors");
    let item = ml.join("ml-100k.item");
    ok(&rudder(
        &[
            "embed",
            "-m",
            mini.to_str().unwrap(),
            "-i",
            item.to_str().unwrap(),
            "-c",
            "movie_title",
            "-o",
            out.to_str().unwrap(),
        ],
        None,
    ));
    let e = &candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap()["embeddings"];
    assert_eq!(e.dims(), &[1682, 384]);
    // sentence-transformers' embedding of "Toy Story" (peer-baselines.md §4).
    let first: Vec<f32> = e.get(0).unwrap().to_vec1().unwrap();
    for (a, b) in first
        .iter()
        .zip([-0.024423f32, 0.046019, 0.057362, 0.048899, -0.046926])
    {
        assert!((a - b).abs() < 1e-5, "{first:?}");
    }
    let idx: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.path().join("t.safetensors.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(idx["ids"][0], "1");
    // a data argument (the asset name, as the README says) embeds the dataset's item titles
    let out2 = d.path().join("t2.safetensors");
    ok(&rudder(
        &[
            "embed",
            "-m",
            mini.to_str().unwrap(),
            "-i",
            "ml-100k",
            "-o",
            out2.to_str().unwrap(),
        ],
        None,
    ));
    let e2 =
        &candle_core::safetensors::load(&out2, &candle_core::Device::Cpu).unwrap()["embeddings"];
    assert_eq!(e2.dims(), &[1682, 384]);
    let idx2: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.path().join("t2.safetensors.json")).unwrap(),
    )
    .unwrap();
    let row = idx2["ids"]
        .as_array()
        .unwrap()
        .iter()
        .position(|v| v == "1")
        .unwrap();
    let toy: Vec<f32> = e2.get(row).unwrap().to_vec1().unwrap();
    assert!(toy.iter().zip(&first).all(|(a, b)| (a - b).abs() < 1e-6));
}

#[test]
fn advdrop_trains_and_writes_its_bias_diagnostic() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("adv");
    let out = ok(&rudder(
        &[
            "cf",
            "train",
            "--data",
            "synth",
            "--model",
            "advdrop",
            "--dim",
            "16",
            "--epochs",
            "4",
            "--eval-every",
            "2",
            "--adv-interval",
            "2",
            "--adv-epochs",
            "1",
            "--batch-size",
            "1024",
            "--out",
            run.to_str().unwrap(),
        ],
        None,
    ));
    assert!(
        out.contains("AdvDrop") && out.contains("Bias diagnostic"),
        "{out}"
    );
    let b: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("bias.json")).unwrap()).unwrap();
    assert!(b["spearman_main"].as_f64().unwrap().abs() <= 1.0);
    ok(&rudder(
        &["cf", "eval", "--run", run.to_str().unwrap()],
        None,
    ));
    // Only AlphaRec transfers to other data.
    let o = rudder(
        &[
            "cf",
            "eval",
            "--run",
            run.to_str().unwrap(),
            "--data",
            "synth:2",
        ],
        None,
    );
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("only AlphaRec"));
}

#[test]
fn alpharec_zero_shot_and_intent_on_the_synthetic_world() {
    let Some(mini) = asset("all-minilm-l6-v2") else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("alpha");
    let r = run.to_str().unwrap();
    let out = ok(&rudder(
        &[
            "cf",
            "train",
            "--data",
            "synth",
            "--model",
            "alpharec",
            "--encoder",
            mini.to_str().unwrap(),
            "--epochs",
            "10",
            "--eval-every",
            "5",
            "--batch-size",
            "1024",
            "--n-neg",
            "64",
            "--lr",
            "1e-3",
            "--out",
            r,
        ],
        None,
    ));
    assert!(out.contains("AlphaRec"), "{out}");
    assert!(run.join("item_features.safetensors").exists());
    let zs = ok(&rudder(
        &["cf", "eval", "--run", r, "--data", "synth:2"],
        None,
    ));
    assert!(zs.contains("Zero-shot") && zs.contains("| test |"), "{zs}");
    // The intent moves the list toward titles close to the query in the encoder's space.
    let enc = rudder_lm::bert::TextEncoder::load(&mini).unwrap();
    let intent = "space adventure among the stars";
    let q = enc
        .embed(&[intent], 1, &mut |_| {})
        .unwrap()
        .squeeze(0)
        .unwrap();
    let feats = candle_core::safetensors::load(
        run.join("item_features.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let f = &feats["embeddings"];
    let sims: Vec<f32> = f
        .matmul(&q.unsqueeze(1).unwrap())
        .unwrap()
        .squeeze(1)
        .unwrap()
        .to_vec1()
        .unwrap();
    let mean_sim = |text: &str| -> f64 {
        let ids: Vec<usize> = text
            .lines()
            .filter_map(|l| {
                l.trim_start()
                    .split_once(". ")
                    .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
            })
            .collect();
        assert_eq!(ids.len(), 10, "{text}");
        ids.iter().map(|&i| sims[i] as f64).sum::<f64>() / 10.0
    };
    let (mut before, mut after) = (0.0, 0.0);
    for user in ["0", "1", "2", "3", "4"] {
        before += mean_sim(&ok(&rudder(
            &["cf", "recommend", "--run", r, "--user", user],
            None,
        )));
        after += mean_sim(&ok(&rudder(
            &[
                "cf",
                "recommend",
                "--run",
                r,
                "--user",
                user,
                "--intent",
                intent,
                "--alpha",
                "0.6",
            ],
            None,
        )));
    }
    assert!(
        after > before + 0.1,
        "mean similarity of the top-10 titles to the intent: {before:.3} → {after:.3}"
    );
}
