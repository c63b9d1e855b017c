//! On the real LastFM data (the shared data folder, `RUDDER_SHARED_DATA`, default
//! `../shared/data`) and the fetched SmolLM2 (`rudder assets fetch smollm2-135m-instruct`).
//! Absent inputs skip with a message unless `RUDDER_REQUIRE_ASSETS=1` (CI).

use std::path::{Path, PathBuf};

use rudder_data::formats::llara;
use rudder_llmrec::data::{Catalog, Unknown, from_prompts, from_sequences};
use rudder_llmrec::lmdata::{Tokenize, tokenize};
use rudder_llmrec::lmeval::{candidate_logps, likelihood_report};
use rudder_llmrec::lmtrain::Silent;
use rudder_llmrec::prompts::Templates;
use rudder_llmrec::seqrec::{SeqConfig, SeqKind};
use rudder_llmrec::seqtrain;

fn shared(rel: &str) -> Option<PathBuf> {
    let base = std::env::var_os("RUDDER_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data"));
    let p = base.join(rel);
    if p.exists() {
        return Some(p);
    }
    if std::env::var("RUDDER_REQUIRE_ASSETS").is_ok_and(|v| v == "1") {
        panic!("required test data is absent: {}", p.display());
    }
    eprintln!("skipped: {} is absent", p.display());
    None
}

fn lastfm() -> Option<(PathBuf, PathBuf)> {
    Some((shared("llara/lastfm")?, shared("llara/sdpo-lastfm")?))
}

#[test]
fn lastfm_examples_and_a_sasrec_epoch_beat_chance_on_the_candidate_protocol() {
    let Some((seqs, prompts)) = lastfm() else {
        return;
    };
    let ds = llara::read_dir(&seqs).unwrap();
    let cat = Catalog::new(ds.item_names.clone().unwrap());
    assert_eq!(cat.n_items(), 4606);
    let train = &ds.splits.iter().find(|(k, _)| k == "train").unwrap().1;
    let val = &ds.splits.iter().find(|(k, _)| k == "val").unwrap().1;
    let ex = from_sequences(train, 4606, 3, 20, 1958, &seqs.join("train.jsonl")).unwrap();
    assert_eq!(
        ex.len(),
        47_872,
        "rows with at least 3 history items, as S-DPO keeps"
    );
    assert!(
        ex.iter()
            .all(|e| e.candidates.len() == 20 && !e.history.contains(&e.target))
    );
    let pd = llara::read_prompt_dir(&prompts).unwrap();
    let recs = &pd.splits.iter().find(|(k, _)| k == "test").unwrap().1;
    let (test, skipped, _) =
        from_prompts(recs, &cat, Unknown::Skip, &prompts.join("test.json")).unwrap();
    assert_eq!((test.len(), skipped), (2421, 74));
    // one SASRec epoch on a fifth of the rows already ranks the target first far above 1/20
    let cfg = SeqConfig {
        epochs: 1,
        ..SeqConfig::new(SeqKind::Sasrec)
    };
    let m = seqtrain::build(4606, &cfg).unwrap();
    seqtrain::train(
        m.as_ref(),
        &cfg,
        4606,
        &train[..10_000],
        seqtrain::Validation::Full(val),
        &mut seqtrain::Quiet,
    )
    .unwrap();
    let rep = seqtrain::eval_candidates(m.as_ref(), &test, 4606, 10, &[1]).unwrap();
    assert!(rep.get("hit", 1) > 0.1, "HR@1 {}", rep.get("hit", 1));
}

#[test]
fn smollm2_prompts_fit_and_likelihood_ranking_runs() {
    let Some((seqs, prompts)) = lastfm() else {
        return;
    };
    let Some(model) = rudder_data::assets::for_tests("smollm2-135m-instruct") else {
        return;
    };
    let ds = llara::read_dir(&seqs).unwrap();
    let cat = Catalog::new(ds.item_names.clone().unwrap());
    let pd = llara::read_prompt_dir(&prompts).unwrap();
    let recs = &pd.splits.iter().find(|(k, _)| k == "test").unwrap().1;
    let (test, _, _) =
        from_prompts(&recs[..40], &cat, Unknown::Skip, Path::new("test.json")).unwrap();
    let lm = rudder_lm::loader::load(&model, &Default::default()).unwrap();
    let tpl = Templates::builtin("music").unwrap();
    let exs = tokenize(&test, &cat, &tpl, &lm.tok, 8192, &Tokenize::default()).unwrap();
    assert!(
        exs.iter()
            .all(|e| !e.truncated && e.prompt.len() < 400 && e.responses.len() == 20)
    );
    let few = &exs[..4];
    let s = candidate_logps(&lm, few, 4, None, &mut Silent).unwrap();
    assert!(s.iter().flatten().all(|v| v.is_finite() && *v < 0.0));
    let rep = likelihood_report(&s, &test[..4], cat.n_items(), &[1, 20]).unwrap();
    assert_eq!(rep.get("hit", 20), 1.0, "the target is always among the 20");
}
