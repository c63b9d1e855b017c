//! Continuous batching on tiny random-weight models: the ragged forward pass equals the padded
//! one, the engine's output for a request does not depend on what runs beside it, and
//! per-request interventions, captures, log-probabilities and JSON constraints work.

use std::path::Path;
use std::sync::{Arc, Mutex, mpsc};

use candle_core::Tensor;
use rudder_lm::config::Arch;
use rudder_lm::constrain::{JsonConstraint, JsonGrammar, TokenTrie};
use rudder_lm::engine::{CaptureSpec, Engine, EngineConfig, Event, Job, SubmitError};
use rudder_lm::fixtures::{TinySpec, write_hf_dir};
use rudder_lm::generate::{Finish, GenConfig, generate};
use rudder_lm::hooks::{Edit, Intervention, Interventions, NoHook, Phase, Phases, Positions, Site};
use rudder_lm::loader::{LanguageModel, LoadOptions, load};
use rudder_lm::ragged::{KvPrecision, RaggedRow, RowCache};

fn model(dir: &Path, arch: Arch) -> LanguageModel {
    let mut spec = TinySpec::new(arch);
    spec.context = 256;
    let p = dir.join(arch.name());
    write_hf_dir(&p, &spec).unwrap();
    load(&p, &LoadOptions::default()).unwrap()
}

fn prompts(lm: &LanguageModel) -> Vec<Vec<u32>> {
    [
        "the sun is in the sky",
        "a",
        "there are seven hills and one river in the town",
        "she said: the answer is",
    ]
    .iter()
    .map(|t| lm.tok.encode(t, false).unwrap())
    .collect()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn ragged_steps_equal_the_padded_forward_pass() {
    let tmp = tempfile::tempdir().unwrap();
    for arch in [Arch::Llama, Arch::Qwen2] {
        let lm = model(tmp.path(), arch);
        let ps = prompts(&lm);
        // reference: each prompt alone through the padded path, last position
        let mut want = Vec::new();
        for p in &ps {
            let (ids, pads) = rudder_lm::generate::left_pad(&[p.clone()], lm.tok.pad).unwrap();
            let mut c = lm.decoder.new_cache(pads);
            let h = lm
                .decoder
                .forward(&ids, &mut c, Phase::Prefill, &mut NoHook)
                .unwrap();
            want.push(h.narrow(1, p.len() - 1, 1).unwrap().squeeze(1).unwrap());
        }
        // ragged: rows read their prompts in uneven chunks, side by side
        let mut caches: Vec<RowCache> = ps
            .iter()
            .map(|p| RowCache::new(&lm.decoder.cfg, p.len()))
            .collect();
        let mut fed = vec![0usize; ps.len()];
        let mut last = vec![None; ps.len()];
        let chunk = [3usize, 1, 5, 2];
        while fed.iter().zip(&ps).any(|(f, p)| *f < p.len()) {
            let mut parts = Vec::new();
            let mut who = Vec::new();
            for (i, cache) in caches.iter_mut().enumerate() {
                if fed[i] == ps[i].len() {
                    continue;
                }
                let take = chunk[i].min(ps[i].len() - fed[i]);
                parts.push(RaggedRow {
                    tokens: &ps[i][fed[i]..fed[i] + take],
                    cache,
                    phase: Phase::Prefill,
                    hook: None,
                });
                who.push(i);
                fed[i] += take;
            }
            let h = lm.decoder.forward_ragged(&mut parts).unwrap();
            for (k, &i) in who.iter().enumerate() {
                last[i] = Some(h.narrow(0, k, 1).unwrap());
            }
        }
        for (i, w) in want.iter().enumerate() {
            let d = max_abs(w, last[i].as_ref().unwrap());
            assert!(d < 1e-4, "{arch:?} prompt {i}: {d}");
        }
    }
}

fn engine(lm: LanguageModel, rows: usize) -> Engine {
    Engine::start(
        Arc::new(lm),
        EngineConfig {
            max_rows: rows,
            max_queue: 64,
            prefill_chunk: 7,
            kv: Default::default(),
        },
    )
}

#[test]
fn engine_output_is_independent_of_the_batch_and_equals_generate() {
    let tmp = tempfile::tempdir().unwrap();
    let lm = model(tmp.path(), Arch::Llama);
    let ps = prompts(&lm);
    let config = GenConfig {
        max_new_tokens: 12,
        ignore_eos: true,
        ..GenConfig::default()
    };
    let want = generate(&lm, &ps, &config, &mut NoHook, &mut |_, _| {}).unwrap();
    let sampled = GenConfig {
        temperature: 0.9,
        top_p: 0.9,
        seed: 5,
        ..config.clone()
    };
    let eng = engine(lm, 3);
    // all at once (more requests than rows: some wait for a free row)
    let (tx, rx) = mpsc::channel();
    for (i, p) in ps.iter().enumerate() {
        for (g, tag) in [(&config, "greedy"), (&sampled, "sampled")] {
            let tx = tx.clone();
            eng.submit(
                Job::new(p.clone(), g.clone()),
                Box::new(move |e| {
                    if let Event::Done(o) = e {
                        tx.send((i, tag, o.tokens, o.text)).unwrap();
                    }
                    true
                }),
            )
            .unwrap();
        }
    }
    let mut got = Vec::new();
    for _ in 0..ps.len() * 2 {
        got.push(rx.recv().unwrap());
    }
    for (i, tag, tokens, text) in &got {
        if *tag == "greedy" {
            assert_eq!(tokens, &want[*i].tokens, "prompt {i}");
            assert_eq!(text, &want[*i].text);
        }
        // the same request alone gives the same tokens
        let g = if *tag == "greedy" { &config } else { &sampled };
        let alone = eng
            .generate_blocking(Job::new(ps[*i].clone(), g.clone()))
            .unwrap();
        assert_eq!(&alone.tokens, tokens, "{tag} prompt {i} alone vs batched");
        assert_eq!(alone.finish, Finish::Length);
        assert_eq!(alone.prompt_tokens, ps[*i].len());
    }
    // the sampled generations differ from greedy somewhere
    assert!(
        got.iter()
            .any(|(i, tag, t, _)| *tag == "sampled" && t != &want[*i].tokens)
    );
}

#[test]
fn streamed_pieces_make_the_final_text_and_stop_strings_cut() {
    let tmp = tempfile::tempdir().unwrap();
    let lm = model(tmp.path(), Arch::Qwen2);
    let p = lm.tok.encode("the sun is in the sky", false).unwrap();
    let eng = engine(lm, 4);
    let config = GenConfig {
        max_new_tokens: 30,
        ignore_eos: true,
        ..GenConfig::default()
    };
    let full = eng
        .generate_blocking(Job::new(p.clone(), config.clone()))
        .unwrap();
    assert!(full.text.len() > 4, "{:?}", full.text);
    // stop at a piece of text that the greedy output contains
    let stop: String = full.text.chars().skip(3).take(2).collect();
    let g = GenConfig {
        stop: vec![stop.clone()],
        ..config
    };
    let streamed = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = mpsc::channel();
    let s2 = streamed.clone();
    eng.submit(
        Job::new(p, g),
        Box::new(move |e| {
            match e {
                Event::Token(t) => s2.lock().unwrap().push_str(&t.text),
                Event::Done(o) => {
                    s2.lock().unwrap().push_str(&o.tail);
                    tx.send(*o).unwrap();
                }
                Event::Failed(m) => panic!("{m}"),
            }
            true
        }),
    )
    .unwrap();
    let o = rx.recv().unwrap();
    assert_eq!(o.finish, Finish::Stop);
    assert!(!o.text.contains(&stop));
    assert!(full.text.starts_with(&o.text));
    assert_eq!(*streamed.lock().unwrap(), o.text);
}

#[test]
fn per_request_interventions_captures_and_logprobs() {
    let tmp = tempfile::tempdir().unwrap();
    let lm = model(tmp.path(), Arch::Llama);
    let d = lm.decoder.cfg.hidden_size;
    let p = lm.tok.encode("the sun is in the sky", false).unwrap();
    let eng = engine(lm, 4);
    let config = GenConfig {
        max_new_tokens: 8,
        ignore_eos: true,
        ..GenConfig::default()
    };
    let steer = Interventions::new(vec![Intervention {
        site: Site::ResidPre(1),
        edit: Edit::AddVector {
            vector: (0..d).map(|i| ((i * 7 % 11) as f32 - 5.0) * 3.0).collect(),
        },
        alpha: 4.0,
        positions: Positions::All,
        phases: Phases::Both,
    }]);
    let plain = eng
        .generate_blocking(Job::new(p.clone(), config.clone()))
        .unwrap();
    let mut j = Job::new(p.clone(), config.clone());
    j.interventions = Some(steer.clone());
    j.capture = Some(CaptureSpec {
        sites: vec![Site::ResidPre(1), Site::FinalNorm],
        positions: Positions::LastPrompt,
        phases: Phases::Prefill,
    });
    // a steered request and a plain one side by side: only the steered one changes
    let (tx, rx) = mpsc::channel();
    for (k, job) in [j, Job::new(p.clone(), config.clone())]
        .into_iter()
        .enumerate()
    {
        let tx = tx.clone();
        eng.submit(
            job,
            Box::new(move |e| {
                if let Event::Done(o) = e {
                    tx.send((k, *o)).unwrap();
                }
                true
            }),
        )
        .unwrap();
    }
    let mut outs: Vec<_> = (0..2).map(|_| rx.recv().unwrap()).collect();
    outs.sort_by_key(|o| o.0);
    assert_ne!(outs[0].1.tokens, plain.tokens, "steering changed nothing");
    assert_eq!(
        outs[1].1.tokens, plain.tokens,
        "steering leaked into another row"
    );
    let cap = outs[0].1.capture.as_ref().unwrap();
    assert_eq!(cap.get(Site::ResidPre(1)).unwrap().dims2().unwrap(), (1, d));
    assert_eq!(cap.rows()[0].position, p.len() - 1);
    // capture equals the padded path's capture under the same intervention
    let mut c2 = rudder_lm::hooks::Capture::new(vec![Site::ResidPre(1)], Positions::LastPrompt);
    let mut iv = steer.clone();
    let mut chain = rudder_lm::hooks::Chain(&mut iv, &mut c2);
    let lm2 = &eng.lm;
    let (ids, pads) = rudder_lm::generate::left_pad(&[p.clone()], lm2.tok.pad).unwrap();
    let mut kc = lm2.decoder.new_cache(pads);
    lm2.decoder
        .forward(&ids, &mut kc, Phase::Prefill, &mut chain)
        .unwrap();
    let diff = max_abs(
        &c2.get(Site::ResidPre(1)).unwrap(),
        &cap.get(Site::ResidPre(1)).unwrap(),
    );
    assert!(diff < 1e-4, "{diff}");

    // log-probabilities: the greedy token is the top alternative and they are normalised
    let mut j = Job::new(p.clone(), config.clone());
    j.logprobs = Some(5);
    let (tx, rx) = mpsc::channel();
    eng.submit(
        j,
        Box::new(move |e| {
            if let Event::Token(t) = e {
                tx.send(t).unwrap();
            }
            true
        }),
    )
    .unwrap();
    for _ in 0..8 {
        let t = rx.recv().unwrap();
        let lp = t.logprob.unwrap();
        assert_eq!(t.top.len(), 5);
        assert_eq!(t.top[0].0, t.id);
        assert!((t.top[0].1 - lp).abs() < 1e-6);
        assert!(lp <= 0.0 && t.top.windows(2).all(|w| w[0].1 >= w[1].1));
    }
    // and they match sequence scoring of the same continuation
    let s = eng
        .score(vec![(p.clone(), plain.tokens.clone())], None)
        .unwrap();
    assert_eq!(s[0].token_logprobs.len(), plain.tokens.len());
}

#[test]
fn json_constraint_makes_a_random_model_write_valid_json() {
    let tmp = tempfile::tempdir().unwrap();
    let lm = model(tmp.path(), Arch::Qwen2);
    let trie = Arc::new(TokenTrie::new(lm.tok.token_bytes()));
    let eos = lm.tok.eos.clone();
    let p = lm.tok.encode("the sun is in the sky", false).unwrap();
    let eng = engine(lm, 4);
    let schema = serde_json::json!({
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}, "s": {"type": "string", "maxLength": 6}},
        "required": ["ok", "n", "s"]
    });
    for (grammar, temp, bounded) in [
        (JsonGrammar::from_schema(&schema).unwrap(), 0.0, true),
        (JsonGrammar::from_schema(&schema).unwrap(), 1.0, true),
        (JsonGrammar::any_object(), 0.0, false),
    ] {
        let g = Arc::new(grammar);
        let mut j = Job::new(
            p.clone(),
            GenConfig {
                max_new_tokens: 200,
                temperature: temp,
                seed: 3,
                ..GenConfig::default()
            },
        );
        j.constraint = Some(Box::new(JsonConstraint::new(
            g.clone(),
            trie.clone(),
            eos.clone(),
        )));
        let o = eng.generate_blocking(j).unwrap();
        if bounded || o.finish == Finish::Eos {
            let v: serde_json::Value = serde_json::from_str(&o.text)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {:?} ({:?})", o.text, o.finish));
            assert!(v.is_object());
            assert_eq!(o.finish, Finish::Eos, "{:?}", o.text);
        } else {
            // a random model may ramble inside a free string: still a valid prefix
            let mut st = g.start();
            assert!(o.text.bytes().all(|b| g.step(&mut st, b)), "{:?}", o.text);
        }
    }
}

#[test]
fn full_queue_refuses_and_cancel_frees_the_row() {
    let tmp = tempfile::tempdir().unwrap();
    let lm = model(tmp.path(), Arch::Llama);
    let p = lm.tok.encode("the sun", false).unwrap();
    let eng = Engine::start(
        Arc::new(lm),
        EngineConfig {
            max_rows: 1,
            max_queue: 2,
            prefill_chunk: 64,
            kv: Default::default(),
        },
    );
    let long = GenConfig {
        max_new_tokens: 100_000,
        ignore_eos: true,
        ..GenConfig::default()
    };
    let (tx, rx) = mpsc::channel();
    let mut tickets = Vec::new();
    let mut busy = 0;
    for _ in 0..6 {
        let tx = tx.clone();
        match eng.submit(
            Job::new(p.clone(), long.clone()),
            Box::new(move |e| {
                if let Event::Token(_) = e {
                    let _ = tx.send(());
                }
                true
            }),
        ) {
            Ok(t) => tickets.push(t),
            Err(SubmitError::Busy { .. }) => busy += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(busy >= 3, "{busy} refused");
    rx.recv().unwrap(); // the first row is decoding
    for t in &tickets {
        t.cancel();
    }
    // cancelled requests stop counting against the queue at once, before the engine sees them
    assert_eq!(
        eng.stats.queued.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    // everything cancelled: a new request runs to its end
    let o = eng
        .generate_blocking(Job::new(
            p.clone(),
            GenConfig {
                max_new_tokens: 3,
                ignore_eos: true,
                ..GenConfig::default()
            },
        ))
        .unwrap();
    assert_eq!(o.tokens.len(), 3);
    // a prompt longer than the context is refused at submission with the numbers
    let too_long = vec![1u32; 400];
    match eng.submit(Job::new(too_long, long), Box::new(|_| true)) {
        Err(SubmitError::Invalid(e)) => assert!(e.to_string().contains("400"), "{e}"),
        _ => panic!("accepted a prompt longer than the context"),
    }
}

#[test]
fn gated_edits_keep_the_prompt_whole_and_equal_the_padded_path() {
    // prefill_chunk is 7 tokens; the prompt is longer, yet its gate must come from its own last
    // token, so the engine prefills it in one piece and matches `generate`.
    let tmp = tempfile::tempdir().unwrap();
    let lm = model(tmp.path(), Arch::Llama);
    let d = lm.decoder.cfg.hidden_size;
    let p = lm
        .tok
        .encode(
            "there are seven hills and one river in the town of many names",
            false,
        )
        .unwrap();
    assert!(p.len() > 7);
    let iv = Interventions::new(vec![Intervention {
        site: Site::ResidPre(1),
        edit: Edit::GatedAdd {
            gate: (0..d).map(|i| ((i * 3 % 5) as f32 - 2.0) * 0.2).collect(),
            vector: (0..d).map(|i| ((i * 7 % 11) as f32 - 5.0) * 2.0).collect(),
        },
        alpha: 3.0,
        positions: Positions::Prompt,
        phases: Phases::Prefill,
    }]);
    let config = GenConfig {
        max_new_tokens: 8,
        ignore_eos: true,
        ..GenConfig::default()
    };
    let mut hook = iv.clone();
    let want = generate(&lm, &[p.clone()], &config, &mut hook, &mut |_, _| {}).unwrap();
    let plain = generate(&lm, &[p.clone()], &config, &mut NoHook, &mut |_, _| {}).unwrap();
    assert_ne!(
        want[0].tokens, plain[0].tokens,
        "the gated edit changed nothing"
    );
    let eng = engine(lm, 4);
    let mut j = Job::new(p.clone(), config.clone());
    j.interventions = Some(iv);
    let got = eng.generate_blocking(j).unwrap();
    assert_eq!(got.tokens, want[0].tokens);
}

#[test]
fn a_group_is_admitted_together_or_refused_whole() {
    // A request's choices go in as one group: they share their steps (and their prompt), so the
    // same group gives bit-identical log-probabilities run after run however the engine thread
    // is scheduled
    // (rows at different batch positions may differ in the last float bits, never more). A
    // group larger than the queue's room is refused whole, leaving nothing queued.
    let tmp = tempfile::tempdir().unwrap();
    let lm = Arc::new(model(tmp.path(), Arch::Llama));
    let p = prompts(&lm)[2].clone();
    let eng = Engine::start(
        lm.clone(),
        EngineConfig {
            max_rows: 4,
            max_queue: 3,
            prefill_chunk: 256, // room for the whole group's prompts in one step
            kv: Default::default(),
        },
    );
    let cfg = GenConfig {
        max_new_tokens: 6,
        ignore_eos: true,
        ..GenConfig::default()
    };
    let mut first: Option<Vec<Vec<(f32, Vec<(u32, f32)>)>>> = None;
    for _ in 0..8 {
        let (tx, rx) = mpsc::channel();
        let group = (0..3)
            .map(|i| {
                let mut j = Job::new(p.clone(), cfg.clone());
                j.logprobs = Some(3);
                let tx = tx.clone();
                let sink: rudder_lm::engine::Sink = Box::new(move |e| {
                    if let Event::Token(t) = e {
                        let _ = tx.send((i, t.logprob.unwrap(), t.top));
                    }
                    true
                });
                (j, sink)
            })
            .collect();
        let tickets = eng.submit_all(group).unwrap();
        drop(tx);
        let mut per: Vec<Vec<(f32, Vec<(u32, f32)>)>> = vec![Vec::new(); 3];
        for (i, lp, top) in rx.iter() {
            // sinks run on the engine thread in step order: rows admitted together advance
            // together; the rows that copy the first row's prompt read its last token one
            // step after it, so they trail it by at most one token
            let low = per.iter().map(|r| r.len()).min().unwrap();
            assert!(per[i].len() <= low + 1, "row {i} ran ahead of its group");
            per[i].push((lp, top));
        }
        drop(tickets);
        assert_eq!(per[0].len(), 6);
        for row in &per[1..] {
            for (a, b) in per[0].iter().zip(row) {
                assert!((a.0 - b.0).abs() < 1e-4, "{a:?} vs {b:?}");
                assert_eq!(a.1[0].0, b.1[0].0);
            }
        }
        match &first {
            None => first = Some(per),
            Some(f) => assert_eq!(f, &per, "the same group gave different numbers"),
        }
    }
    let four = (0..4)
        .map(|_| {
            let sink: rudder_lm::engine::Sink = Box::new(|_| true);
            (Job::new(p.clone(), cfg.clone()), sink)
        })
        .collect();
    match eng.submit_all(four) {
        Err(SubmitError::Busy { limit: 3, .. }) => {}
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a group over the queue limit was accepted"),
    }
    assert_eq!(
        eng.stats.queued.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    let o = eng.generate_blocking(Job::new(p, cfg)).unwrap();
    assert_eq!(o.tokens.len(), 6);
}

#[test]
fn rows_with_one_prompt_read_it_once_and_generate_what_they_would_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let lm = model(tmp.path(), Arch::Llama);
    let d = lm.decoder.cfg.hidden_size;
    let p = lm
        .tok
        .encode("there are seven hills and one river in the town", false)
        .unwrap();
    assert!(
        p.len() > 8,
        "the prompt spans several 7-token prefill chunks"
    );
    let other = lm.tok.encode("she said: the answer is", false).unwrap();
    let sampled = GenConfig {
        max_new_tokens: 10,
        ignore_eos: true,
        temperature: 0.9,
        top_p: 0.9,
        seed: 3,
        ..GenConfig::default()
    };
    let steer = Interventions::new(vec![Intervention {
        site: Site::ResidPre(1),
        edit: Edit::AddVector {
            vector: (0..d).map(|i| ((i * 5 % 7) as f32 - 3.0) * 2.0).collect(),
        },
        alpha: 3.0,
        positions: Positions::All,
        phases: Phases::Both,
    }]);
    // five plain rollouts, two steered ones, one capturing, one other prompt
    let make = |r: u64| {
        let mut j = Job::new(
            if r == 8 { other.clone() } else { p.clone() },
            sampled.clone(),
        );
        j.stream_index = r;
        if r == 5 || r == 6 {
            j.interventions = Some(steer.clone());
        }
        if r == 7 {
            j.capture = Some(CaptureSpec {
                sites: vec![Site::FinalNorm],
                positions: Positions::LastPrompt,
                phases: Phases::Prefill,
            });
        }
        j
    };
    let n = 9;
    let lm = Arc::new(lm);
    let batched = Engine::start(
        lm.clone(),
        EngineConfig {
            max_rows: 9,
            max_queue: 64,
            prefill_chunk: 7,
            kv: Default::default(),
        },
    );
    let (tx, rx) = mpsc::channel();
    let group = (0..n)
        .map(|i| {
            let tx = tx.clone();
            let sink: rudder_lm::engine::Sink = Box::new(move |e| {
                if let Event::Done(o) = e {
                    tx.send((i, o.tokens)).unwrap();
                }
                true
            });
            (make(i as u64), sink)
        })
        .collect();
    batched.submit_all(group).unwrap();
    let mut got = vec![Vec::new(); n];
    for _ in 0..n {
        let (i, t) = rx.recv().unwrap();
        got[i] = t;
    }
    // four plain rows and one steered row copied all but the last prompt token
    let shared = batched
        .stats
        .shared_prompt_tokens
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(shared, 5 * (p.len() as u64 - 1));
    // each row alone (one row: nothing to share) generates the same tokens
    let alone = Engine::start(
        lm.clone(),
        EngineConfig {
            max_rows: 1,
            max_queue: 64,
            prefill_chunk: 7,
            kv: Default::default(),
        },
    );
    for (i, want) in got.iter().enumerate() {
        let o = alone.generate_blocking(make(i as u64)).unwrap();
        assert_eq!(&o.tokens, want, "row {i}");
    }
    assert_eq!(
        alone
            .stats
            .shared_prompt_tokens
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    // distinct sampling streams: the plain rollouts do not all agree
    assert!(got[..5].iter().any(|t| t != &got[0]));
}

#[test]
fn a_half_precision_cache_is_deterministic_close_to_f32_and_shares_prompts_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let lm = Arc::new(model(tmp.path(), Arch::Llama));
    let p = lm
        .tok
        .encode("there are seven hills and one river in the town", false)
        .unwrap();
    let sampled = GenConfig {
        max_new_tokens: 8,
        ignore_eos: true,
        temperature: 0.9,
        seed: 5,
        ..GenConfig::default()
    };
    let job = |r: u64| {
        let mut j = Job::new(p.clone(), sampled.clone());
        j.stream_index = r;
        j.logprobs = Some(0);
        j
    };
    // (tokens, log-probabilities of the chosen tokens) of `n` rollouts of one prompt
    let run = |kv: KvPrecision, rows: usize, n: usize| {
        let eng = Engine::start(
            lm.clone(),
            EngineConfig {
                kv,
                ..EngineConfig::offline(rows)
            },
        );
        let (tx, rx) = mpsc::channel();
        let jobs = (0..n)
            .map(|i| {
                let tx = tx.clone();
                let mut seen = (Vec::new(), Vec::new());
                let sink: rudder_lm::engine::Sink = Box::new(move |e| {
                    match e {
                        Event::Token(t) => {
                            seen.0.push(t.id);
                            seen.1.push(t.logprob.unwrap());
                        }
                        Event::Done(_) => tx.send((i, std::mem::take(&mut seen))).unwrap(),
                        _ => {}
                    }
                    true
                });
                (job(i as u64), sink)
            })
            .collect();
        eng.submit_all(jobs).unwrap();
        let mut got = vec![(Vec::new(), Vec::new()); n];
        for _ in 0..n {
            let (i, s) = rx.recv().unwrap();
            got[i] = s;
        }
        let shared = eng
            .stats
            .shared_prompt_tokens
            .load(std::sync::atomic::Ordering::Relaxed);
        (got, shared)
    };
    let (half, shared) = run(KvPrecision::F16, 4, 4);
    assert!(shared > 0, "the rollouts shared their prompt");
    // the same seed gives the same numbers, and a row alone (its own copy of the prompt)
    // generates what it generated reading the shared prefix (log-probabilities up to what the
    // weight products' row tiling moves in f32, which can flip a value's f16 rounding)
    assert_eq!(run(KvPrecision::F16, 4, 4).0, half);
    let (alone, none) = run(KvPrecision::F16, 1, 4);
    assert_eq!(none, 0);
    for (a, h) in alone.iter().zip(&half) {
        assert_eq!(a.0, h.0);
        assert!(a.1.iter().zip(&h.1).all(|(x, y)| (x - y).abs() < 2e-3));
    }
    // against f32: the first token's log-probability (same prompt, same sampling stream) moves
    // by the rounding of the cached keys and values — a little, and not zero
    let (full, _) = run(KvPrecision::F32, 4, 4);
    let d: Vec<f32> = half
        .iter()
        .zip(&full)
        .map(|(h, f)| (h.1[0] - f.1[0]).abs())
        .collect();
    assert!(d.iter().all(|&x| x < 0.05), "{d:?}");
    assert!(d.iter().any(|&x| x > 0.0), "{d:?}");
}
