//! The study end to end on a tiny random-weight model with a generated question set: every
//! artefact is written, a second invocation resumes without recomputing, a run cut off in the
//! middle (journal truncated, later artefacts gone) ends with exactly the numbers of an
//! uninterrupted one, and activation capture resumes from its shards to the same matrices.

use std::sync::Arc;

use rudder_lm::config::Arch;
use rudder_lm::fixtures::{TinySpec, write_hf_dir};
use rudder_lm::hooks::{Positions, Site};
use rudder_lm::loader::{LoadOptions, load};
use rudder_steer::activations::{ActivationSet, CaptureConfig, capture};
use rudder_steer::prompts::Rendering;
use rudder_steer::study::{PlanConfig, plan};
use serde_json::json;

fn setup(dir: &std::path::Path) -> (Arc<rudder_lm::loader::LanguageModel>, std::path::PathBuf) {
    let mut spec = TinySpec::new(Arch::Llama);
    spec.context = 256;
    write_hf_dir(&dir.join("m"), &spec).unwrap();
    let lm = Arc::new(load(&dir.join("m"), &LoadOptions::default()).unwrap());
    let qs: Vec<serde_json::Value> = (0..30)
        .map(|i| {
            json!({
                "problem": format!("what is {} plus {}? {}", i, i % 7, "think ".repeat(i % 5)),
                "level": format!("Level {}", 1 + i % 5),
                "solution": format!("so \\boxed{{{}}}", i + i % 7),
            })
        })
        .collect();
    let q = dir.join("q.json");
    std::fs::write(&q, serde_json::to_string(&qs).unwrap()).unwrap();
    (lm, q)
}

fn config(q: std::path::PathBuf, benign: &std::path::Path) -> PlanConfig {
    let mut c = PlanConfig::new(q);
    c.per_level = 4;
    c.rollouts = 2;
    c.max_tokens = 12;
    c.temperature = 0.8;
    c.probe = rudder_steer::probe::ProbeKind::Ridge { alpha: 1.0 };
    c.alphas = vec![-0.2, 0.0, 0.2];
    c.sweep_per_level = 2;
    c.logit_questions = 6;
    c.benign = Some(benign.to_path_buf());
    c.attack = Some(benign.with_file_name("attack.json"));
    c.batch = 8;
    c
}

#[test]
fn plan_runs_resumes_and_is_reproducible() {
    let tmp = tempfile::tempdir().unwrap();
    let (lm, q) = setup(tmp.path());
    let benign = tmp.path().join("benign.json");
    let prompts = |f: &dyn Fn(usize) -> String| {
        serde_json::to_string(&(0..6).map(|i| json!({"problem": f(i)})).collect::<Vec<_>>())
            .unwrap()
    };
    std::fs::write(&benign, prompts(&|i| format!("hi {i}"))).unwrap();
    std::fs::write(
        tmp.path().join("attack.json"),
        prompts(&|i| format!("{} hi {i}", "decoy task ".repeat(6))),
    )
    .unwrap();
    let cfg = config(q.clone(), &benign);
    let out = tmp.path().join("run");
    let m1 = plan(lm.clone(), &cfg, &out, &mut |_, _, _| {}).unwrap();
    for f in [
        "config.json",
        "rollouts.jsonl",
        "labels.json",
        "acts.safetensors",
        "acts.safetensors.json",
        "probes.json",
        "probes.safetensors",
        "vector.safetensors",
        "vector.json",
        "sweep.json",
        "logits.json",
        "detect.json",
        "metrics.json",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    assert_eq!(m1["questions"], 20);
    let sweep = m1["sweep"].as_array().unwrap();
    assert_eq!(sweep.len(), 3);
    assert!(m1["detect"]["probe_mean_over_layers"]["auroc"].is_number());
    // the sweep's rows say exactly how the model was steered
    assert_eq!(sweep[0]["interventions"]["alpha"], -0.2);
    // resume with nothing to do: same numbers, no new rollouts
    let lines = std::fs::read_to_string(out.join("rollouts.jsonl"))
        .unwrap()
        .lines()
        .count();
    let mut m2 = plan(lm.clone(), &cfg, &out, &mut |_, _, _| {}).unwrap();
    // seconds are read back from timings.json on a resume: equal up to JSON's float
    // round trip, and not a result anyway
    let strip = |m: &mut serde_json::Value| m["seconds_per_step"] = serde_json::Value::Null;
    let mut m1 = m1;
    strip(&mut m1);
    strip(&mut m2);
    assert_eq!(m1, m2);
    assert_eq!(
        std::fs::read_to_string(out.join("rollouts.jsonl"))
            .unwrap()
            .lines()
            .count(),
        lines
    );
    // a run cut off in the middle: half the journal (and a torn line), later artefacts gone
    let text = std::fs::read_to_string(out.join("rollouts.jsonl")).unwrap();
    let keep: Vec<&str> = text.lines().take(lines / 2).collect();
    std::fs::write(
        out.join("rollouts.jsonl"),
        keep.join("\n") + "\n{\"tag\": \"lab",
    )
    .unwrap();
    for f in [
        "acts.safetensors",
        "acts.safetensors.json",
        "probes.json",
        "vector.safetensors",
        "logits.json",
        "detect.json",
        "acts_benign.safetensors",
        "acts_benign.safetensors.json",
        "metrics.json",
    ] {
        let _ = std::fs::remove_file(out.join(f));
    }
    let mut m3 = plan(lm.clone(), &cfg, &out, &mut |_, _, _| {}).unwrap();
    // seconds differ between runs by nature; every other number must not
    strip(&mut m3);
    assert_eq!(
        m1, m3,
        "a resumed run must end with the uninterrupted run's numbers"
    );
    // another configuration in the same folder is refused
    let mut other = cfg.clone();
    other.rollouts = 3;
    let e = plan(lm, &other, &out, &mut |_, _, _| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("other settings"), "{e}");
}

#[test]
fn capture_resumes_from_its_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let (lm, _) = setup(tmp.path());
    let r = Rendering::plain(true);
    let ids: Vec<Vec<u32>> = (0..11)
        .map(|i| {
            r.ids(&lm, &format!("prompt number {i} {}", "x".repeat(i)))
                .unwrap()
        })
        .collect();
    let cfg = CaptureConfig {
        sites: vec![Site::ResidPre(0), Site::ResidPre(1), Site::FinalNorm],
        positions: Positions::LastPrompt,
        batch: 2,
        shard_batches: 2,
    };
    let full = capture(
        &lm,
        &ids,
        None,
        &cfg,
        None,
        &tmp.path().join("a.safetensors"),
        json!({}),
        &mut |_, _| {},
    )
    .unwrap();
    // interrupted after the first shard (4 prompts) was written
    let out = tmp.path().join("b.safetensors");
    let cut = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        capture(&lm, &ids, None, &cfg, None, &out, json!({}), &mut |d, _| {
            if d > 4 {
                panic!("killed");
            }
        })
    }));
    assert!(cut.is_err());
    let parts = tmp.path().join("b.safetensors.parts");
    assert!(parts.join("part-000000.safetensors").exists());
    assert!(!parts.join("part-000001.safetensors").exists());
    // resume: the first shard is not recomputed (its progress arrives in one step)
    let mut seen = Vec::new();
    let resumed = capture(&lm, &ids, None, &cfg, None, &out, json!({}), &mut |d, _| {
        seen.push(d)
    })
    .unwrap();
    assert_eq!(seen[0], 4, "{seen:?}");
    for s in &cfg.sites {
        assert_eq!(full.get(*s).unwrap(), resumed.get(*s).unwrap());
    }
    let loaded = ActivationSet::load(&out).unwrap();
    assert_eq!(loaded.len(), 11);
    assert_eq!(loaded.rows, full.rows);
    assert!(
        !parts.exists(),
        "the parts folder is removed after the merge"
    );
    // a different capture into the same unfinished folder is refused
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        capture(&lm, &ids, None, &cfg, None, &out, json!({}), &mut |d, _| {
            if d > 4 {
                panic!("killed");
            }
        })
    }));
    let mut other = cfg.clone();
    other.sites = vec![Site::ResidPre(0)];
    let e = capture(
        &lm,
        &ids,
        None,
        &other,
        None,
        &out,
        json!({}),
        &mut |_, _| {},
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("other settings"), "{e}");
}
