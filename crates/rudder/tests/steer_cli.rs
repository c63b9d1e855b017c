//! `rudder steer …` as a person uses it, on a tiny model and a generated question set:
//! capture → probe → vector → export → import → lm dump with the interventions, sweep, logits,
//! detect; and bad input answered with an error naming the file, never a panic.

use std::path::Path;

use rudder_lm::config::Arch;
use rudder_lm::fixtures::{TinySpec, write_hf_dir};
use serde_json::json;

mod common;
use common::{fails, ok, rudder};

fn setup(d: &Path) -> (String, String) {
    let mut spec = TinySpec::new(Arch::Llama);
    spec.context = 256;
    spec.layers = 4;
    let m = d.join("m");
    write_hf_dir(&m, &spec).unwrap();
    let qs: Vec<serde_json::Value> = (0..25)
        .map(|i| json!({"problem": format!("what is {i} and {}", "more ".repeat(i % 5)), "level": format!("Level {}", 1 + i % 5), "answer": format!("{i}")}))
        .collect();
    let q = d.join("q.json");
    std::fs::write(&q, serde_json::to_string(&qs).unwrap()).unwrap();
    (m.to_str().unwrap().into(), q.to_str().unwrap().into())
}

#[test]
fn the_pieces_work_on_their_own() {
    let d = tempfile::tempdir().unwrap();
    let (m, q) = setup(d.path());
    let p = |f: &str| d.path().join(f).to_str().unwrap().to_string();
    ok(&rudder(&[
        "steer",
        "capture",
        "-m",
        &m,
        "--prompts",
        &q,
        "--label",
        "level",
        "--batch",
        "4",
        "--out",
        &p("acts.safetensors"),
    ]));
    let idx: serde_json::Value =
        serde_json::from_slice(&std::fs::read(p("acts.safetensors.json")).unwrap()).unwrap();
    assert_eq!(idx["rows"].as_array().unwrap().len(), 25);
    assert_eq!(
        idx["sites"].as_array().unwrap().len(),
        5,
        "hf sites of a 4-layer model"
    );
    let out = ok(&rudder(&[
        "steer",
        "probe",
        "--acts",
        &p("acts.safetensors"),
        "--from-labels",
        "--probe",
        "ridge",
        "--alpha",
        "1",
        "--folds",
        "3",
        "--out",
        &p("probes"),
    ]));
    assert!(out.contains("blocks.1.hook_resid_pre"), "{out}");
    let pj: serde_json::Value =
        serde_json::from_slice(&std::fs::read(p("probes/probes.json")).unwrap()).unwrap();
    assert_eq!(pj["cv"].as_array().unwrap().len(), 3);
    ok(&rudder(&[
        "steer",
        "vector",
        "--acts",
        &p("acts.safetensors"),
        "--out",
        &p("vec.safetensors"),
    ]));
    ok(&rudder(&[
        "steer",
        "export",
        "--vector",
        &p("vec.safetensors"),
        "--out",
        &p("vec.gguf"),
    ]));
    ok(&rudder(&[
        "steer",
        "import",
        "--vector",
        &p("vec.gguf"),
        "--strength",
        "-2",
        "--out",
        &p("steer.json"),
    ]));
    let iv: serde_json::Value =
        serde_json::from_slice(&std::fs::read(p("steer.json")).unwrap()).unwrap();
    // ResidPre(2) = block 1's output: llama.cpp's direction.1, back as ResidPost(1)
    assert_eq!(iv[0]["site"], "blocks.1.hook_resid_post");
    assert_eq!(iv.as_array().unwrap().len(), 2);
    assert_eq!(iv[0]["alpha"], -2.0);
    ok(&rudder(&[
        "lm",
        "dump",
        "-m",
        &m,
        "--text",
        "the sun",
        "--interventions",
        &p("steer.json"),
        "--out",
        &p("d.safetensors"),
    ]));
    let out = ok(&rudder(&[
        "steer",
        "sweep",
        "-m",
        &m,
        "--vector",
        &p("vec.safetensors"),
        "--prompts",
        &q,
        "--label",
        "level",
        "--limit",
        "5",
        "--alphas",
        "-1,0,1",
        "--max-tokens",
        "6",
        "--out",
        &p("sweep"),
    ]));
    assert_eq!(
        out.lines().filter(|l| l.starts_with("α")).count(),
        3,
        "{out}"
    );
    let out = ok(&rudder(&[
        "steer",
        "logits",
        "-m",
        &m,
        "--vector",
        &p("vec.safetensors"),
        "--prompts",
        &q,
        "--limit",
        "5",
        "--out",
        &p("logits"),
    ]));
    assert_eq!(out.lines().count(), 5, "{out}");
    // a detector over the captured set against itself: AUROC 0.5 exactly
    let out = ok(&rudder(&[
        "steer",
        "detect",
        "--probes",
        &p("probes/probes.safetensors"),
        "--benign",
        &p("acts.safetensors"),
        "--attack",
        &p("acts.safetensors"),
        "--out",
        &p("det"),
    ]));
    assert!(out.starts_with("AUROC 0.500"), "{out}");
}

#[test]
fn bad_input_is_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    let (m, q) = setup(d.path());
    let p = |f: &str| d.path().join(f).to_str().unwrap().to_string();
    std::fs::write(p("bad.json"), r#"[{"problem": "a"}, {"nope": 1}]"#).unwrap();
    fails(
        &rudder(&[
            "steer",
            "capture",
            "-m",
            &m,
            "--prompts",
            &p("bad.json"),
            "--out",
            &p("a.safetensors"),
        ]),
        "record 1: missing field \"problem\"",
    );
    std::fs::write(p("empty.json"), "[]").unwrap();
    fails(
        &rudder(&[
            "steer",
            "capture",
            "-m",
            &m,
            "--prompts",
            &p("empty.json"),
            "--out",
            &p("a.safetensors"),
        ]),
        "no prompts",
    );
    // a label group with no members
    ok(&rudder(&[
        "steer",
        "capture",
        "-m",
        &m,
        "--prompts",
        &q,
        "--label",
        "level",
        "--out",
        &p("acts.safetensors"),
    ]));
    fails(
        &rudder(&[
            "steer",
            "vector",
            "--acts",
            &p("acts.safetensors"),
            "--reference",
            "Level 9",
            "--out",
            &p("v.safetensors"),
        ]),
        "Level 9",
    );
    // a vector for another model (other width)
    let mut spec = TinySpec::new(Arch::Llama);
    spec.hidden = 32;
    spec.intermediate = 64;
    write_hf_dir(&d.path().join("m2"), &spec).unwrap();
    ok(&rudder(&[
        "steer",
        "vector",
        "--acts",
        &p("acts.safetensors"),
        "--out",
        &p("v.safetensors"),
    ]));
    fails(
        &rudder(&[
            "steer",
            "sweep",
            "-m",
            &p("m2"),
            "--vector",
            &p("v.safetensors"),
            "--prompts",
            &q,
            "--out",
            &p("s"),
        ]),
        "width 64",
    );
    // a corrupted control vector
    ok(&rudder(&[
        "steer",
        "export",
        "--vector",
        &p("v.safetensors"),
        "--out",
        &p("v.gguf"),
    ]));
    let b = std::fs::read(p("v.gguf")).unwrap();
    std::fs::write(p("v.gguf"), &b[..b.len() / 2]).unwrap();
    fails(
        &rudder(&[
            "steer",
            "import",
            "--vector",
            &p("v.gguf"),
            "--out",
            &p("x.json"),
        ]),
        "v.gguf",
    );
}
