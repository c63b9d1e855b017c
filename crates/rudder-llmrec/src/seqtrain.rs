//! The one training loop of the sequential recommenders and their two evaluations.
//!
//! Training follows DROS's `SASRec_bce.py` (llmrec-seeds.md §3.1): each step draws
//! `batch_size` rows at random (with replacement) from the training rows, one negative per row
//! uniform over the catalogue and different from the target, and minimises
//! `BCEWithLogits([s_target, s_neg], [1, 0])` with Adam (L2 added to the gradient). An epoch
//! is `rows / batch_size` steps. After every epoch the model is ranked on the validation rows
//! (full catalogue, NDCG@10 through the one evaluator; or, with [`Validation::Candidates`],
//! NDCG@10 over each validation question's candidates); the best epoch's weights are kept.
//!
//! Evaluation: [`eval_full`] ranks the whole catalogue for each row; [`eval_candidates`] ranks
//! only the row's 20 candidates (the LLM protocol: HR@1 is the share of rows whose target
//! scores highest; every answer is valid).

use std::time::Instant;

use candle_core::{Device, Tensor};
use rand::Rng;
use rudder_data::Interactions;
use rudder_data::eval::{DenseScores, EvalConfig, EvalReport, Evaluator};
use rudder_data::sequences::SeqSample;
use rudder_nn::optim::{Adam, AdamConfig};
use serde::{Deserialize, Serialize};

use crate::caser::Caser;
use crate::data::RecExample;
use crate::gru4rec::Gru4Rec;
use crate::sasrec::SasRec;
use crate::seqrec::{SeqConfig, SeqKind, SeqModel, batch};
use crate::{LlmrecError, Result};

pub fn build(n_items: usize, cfg: &SeqConfig) -> Result<Box<dyn SeqModel + Send + Sync>> {
    if cfg.hidden == 0 || cfg.window == 0 || cfg.batch_size == 0 {
        return Err(LlmrecError::Config(
            "hidden size, window and batch size must be positive".into(),
        ));
    }
    Ok(match cfg.model {
        SeqKind::Sasrec => Box::new(SasRec::new(n_items, cfg)?),
        SeqKind::Gru4rec => Box::new(Gru4Rec::new(n_items, cfg)?),
        SeqKind::Caser => Box::new(Caser::new(n_items, cfg)?),
    })
}

/// Set `model`'s parameters from a saved run (`model.safetensors`, names as
/// [`SeqModel::params`]); a run for another item set or architecture is refused naming the file.
pub fn load_params(
    model: &dyn SeqModel,
    map: &std::collections::HashMap<String, Tensor>,
    source: &std::path::Path,
) -> Result<()> {
    for (n, v) in model.params() {
        let t = map.get(&n).ok_or_else(|| {
            LlmrecError::file(
                source,
                format!("tensor {n} is missing (another model kind?)"),
            )
        })?;
        if t.dims() != v.dims() {
            let what = if v.dims()[0] != t.dims()[0] && (n == "item_emb" || n.starts_with("out.")) {
                format!(
                    "it was trained on {} items, this data has {}",
                    t.dims()[0] - (n == "item_emb") as usize,
                    v.dims()[0] - (n == "item_emb") as usize
                )
            } else {
                "another hidden size or window".to_string()
            };
            return Err(LlmrecError::file(
                source,
                format!(
                    "tensor {n} has shape {:?}, the model expects {:?}: {what}",
                    t.dims(),
                    v.dims()
                ),
            ));
        }
        v.set(t)?;
    }
    Ok(())
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SeqEpoch {
    pub epoch: usize,
    pub loss: f64,
    pub seconds: f64,
    /// The selection metric: NDCG@10 of the full ranking, or over the candidates (see
    /// [`Validation`]).
    pub valid_ndcg10: f64,
    /// Full ranking: HR@20.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_hit20: Option<f64>,
    /// Candidates: HR@1 (the LLM protocol's headline metric).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_hit1: Option<f64>,
}

/// What the epoch whose weights are kept is chosen on.
#[derive(Clone, Copy)]
pub enum Validation<'a> {
    /// NDCG@10 of the next item ranked against the whole catalogue (the reference's rule). On
    /// LLaRA's LastFM split that is 122 rows, and a model rarely ranks their target in its top
    /// 10 early on, so the signal is mostly zeros.
    Full(&'a [SeqSample]),
    /// NDCG@10 of the target among each question's candidates (the LLM protocol): every
    /// question contributes, e.g. all 2,767 of S-DPO's LastFM validation prompts.
    Candidates(&'a [RecExample]),
}

impl Validation<'_> {
    /// Refuse an empty set and ids outside the catalogue, naming the set.
    fn check(&self, n_items: usize) -> Result<()> {
        let (empty, what) = match self {
            Validation::Full(r) => (r.is_empty(), "validation rows"),
            Validation::Candidates(e) => (e.is_empty(), "validation questions"),
        };
        if empty {
            return Err(LlmrecError::Input(format!("no {what}")));
        }
        match self {
            Validation::Full(rows) => check_rows(rows, n_items, what),
            Validation::Candidates(ex) => check_examples(ex, n_items, what),
        }
    }

    /// `(NDCG@10, HR@20 for full ranking, HR@1 for candidates)`.
    fn measure(
        &self,
        model: &dyn SeqModel,
        n_items: usize,
        window: usize,
    ) -> Result<(f64, Option<f64>, Option<f64>)> {
        Ok(match self {
            Validation::Full(rows) => {
                let rep = eval_full(model, rows, n_items, window, &[10, 20])?;
                (rep.get("ndcg", 10), Some(rep.get("hit", 20)), None)
            }
            Validation::Candidates(ex) => {
                let rep = eval_candidates(model, ex, n_items, window, &[1, 10])?;
                (rep.get("ndcg", 10), None, Some(rep.get("hit", 1)))
            }
        })
    }
}

pub trait SeqObserver {
    fn epoch_start(&mut self, _epoch: usize, _steps: usize) {}
    fn step_done(&mut self) {}
    fn epoch_done(&mut self, _rec: &SeqEpoch) {}
}

pub struct Quiet;
impl SeqObserver for Quiet {}

pub struct SeqTrainReport {
    pub epochs: Vec<SeqEpoch>,
    pub best_epoch: usize,
}

/// Check that every id of `rows` is an item (or the pad id `n_items`); `source` names the
/// file in the error.
pub fn check_rows(rows: &[SeqSample], n_items: usize, source: &str) -> Result<()> {
    for (r, s) in rows.iter().enumerate() {
        if let Some(&bad) = s.seq.iter().find(|&&i| i as usize > n_items) {
            return Err(LlmrecError::Input(format!(
                "{source}: line {}: item id {bad} is beyond the {n_items} items of the name map",
                r + 1
            )));
        }
        if s.next as usize >= n_items {
            return Err(LlmrecError::Input(format!(
                "{source}: line {}: target {} is not an item (the name map has {n_items})",
                r + 1,
                s.next
            )));
        }
    }
    Ok(())
}

/// Check that every history, candidate and target id of `ex` is an item; `source` names the
/// questions in the error.
pub fn check_examples(ex: &[RecExample], n_items: usize, source: &str) -> Result<()> {
    for (q, e) in ex.iter().enumerate() {
        if let Some(&bad) = e
            .history
            .iter()
            .chain(&e.candidates)
            .chain([&e.target])
            .find(|&&i| i as usize >= n_items)
        {
            return Err(LlmrecError::Input(format!(
                "{source}: question {}: item id {bad} is beyond the {n_items} items of the name map",
                q + 1
            )));
        }
    }
    Ok(())
}

fn histories(rows: &[SeqSample], pad: u32) -> Vec<Vec<u32>> {
    rows.iter().map(|s| s.history(Some(pad))).collect()
}

/// Scores of every item for every history `[N × n_items]`, row-major.
pub fn score_all(
    model: &dyn SeqModel,
    hist: &[Vec<u32>],
    n_items: usize,
    window: usize,
) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(hist.len() * n_items);
    for chunk in hist.chunks(512) {
        let refs: Vec<&[u32]> = chunk.iter().map(|h| h.as_slice()).collect();
        let (ids, lens) = batch(&refs, window, n_items as u32)?;
        out.extend(model.scores(&ids, &lens)?.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(out)
}

/// Full-catalogue ranking of the next item of each row.
pub fn eval_full(
    model: &dyn SeqModel,
    rows: &[SeqSample],
    n_items: usize,
    window: usize,
    ks: &[usize],
) -> Result<EvalReport> {
    let hist = histories(rows, n_items as u32);
    let scores = score_all(model, &hist, n_items, window)?;
    let truth = Interactions::from_lists(
        n_items,
        &rows.iter().map(|s| vec![s.next]).collect::<Vec<_>>(),
    );
    Ok(Evaluator::new(&truth).run(
        &DenseScores {
            scores: &scores,
            n_items,
        },
        &EvalConfig {
            ks: ks.to_vec(),
            ..Default::default()
        },
    )?)
}

/// Ranking of each example's candidates only (the LLM protocol).
pub fn eval_candidates(
    model: &dyn SeqModel,
    ex: &[RecExample],
    n_items: usize,
    window: usize,
    ks: &[usize],
) -> Result<EvalReport> {
    let hist: Vec<Vec<u32>> = ex.iter().map(|e| e.history.clone()).collect();
    let scores = score_all(model, &hist, n_items, window)?;
    candidate_report(&scores, ex, n_items, ks)
}

/// The evaluator's candidate mode over precomputed `[N × n_items]` scores (only the
/// candidates' entries are read).
pub fn candidate_report(
    scores: &[f32],
    ex: &[RecExample],
    n_items: usize,
    ks: &[usize],
) -> Result<EvalReport> {
    let truth = Interactions::from_lists(
        n_items,
        &ex.iter().map(|e| vec![e.target]).collect::<Vec<_>>(),
    );
    let cands: Vec<Vec<u32>> = ex.iter().map(|e| e.candidates.clone()).collect();
    Ok(Evaluator::new(&truth).candidates(&cands).run(
        &DenseScores { scores, n_items },
        &EvalConfig {
            ks: ks.to_vec(),
            ..Default::default()
        },
    )?)
}

/// Train `model` on `train` rows, keeping the weights of the epoch with the best validation
/// NDCG@10 (restored into the model at the end).
pub fn train(
    model: &dyn SeqModel,
    cfg: &SeqConfig,
    n_items: usize,
    train: &[SeqSample],
    valid: Validation,
    obs: &mut dyn SeqObserver,
) -> Result<SeqTrainReport> {
    if train.is_empty() {
        return Err(LlmrecError::Input("no training rows".into()));
    }
    check_rows(train, n_items, "training rows")?;
    valid.check(n_items)?;
    let pad = n_items as u32;
    let hist = histories(train, pad);
    let params = model.params();
    let mut opt = Adam::new(
        params.iter().map(|(_, v)| v.clone()).collect(),
        AdamConfig {
            weight_decay: cfg.l2,
            ..AdamConfig::adam(cfg.lr)
        },
    )?;
    let (w, b) = model.head();
    let steps = (train.len() / cfg.batch_size).max(1);
    let mut epochs = Vec::new();
    let mut best: Option<(f64, usize, Vec<Tensor>)> = None;
    let mut since = 0;
    for epoch in 0..cfg.epochs {
        obs.epoch_start(epoch, steps);
        let t0 = Instant::now();
        let mut total = 0f64;
        for step in 0..steps {
            let mut rng = rudder_data::rng::stream(cfg.seed, &[epoch as u64, step as u64]);
            let rows: Vec<usize> = (0..cfg.batch_size)
                .map(|_| rng.random_range(0..train.len()))
                .collect();
            let refs: Vec<&[u32]> = rows.iter().map(|&r| hist[r].as_slice()).collect();
            let (ids, lens) = batch(&refs, cfg.window, pad)?;
            let pos: Vec<u32> = rows.iter().map(|&r| train[r].next).collect();
            let neg: Vec<u32> = pos
                .iter()
                .map(|&p| {
                    loop {
                        let n = rng.random_range(0..n_items as u32);
                        if n != p {
                            break n;
                        }
                    }
                })
                .collect();
            let h = model.encode(&ids, &lens, Some(&mut rng))?; // [B, d]
            let bsz = rows.len();
            let score = |items: &[u32]| -> Result<Tensor> {
                let idx = Tensor::from_slice(items, bsz, &Device::Cpu)?;
                let wi = w.as_tensor().index_select(&idx, 0)?;
                let bi = b.as_tensor().index_select(&idx, 0)?;
                Ok(((&h * wi)?.sum(1)? + bi)?)
            };
            let (sp, sn) = (score(&pos)?, score(&neg)?);
            // BCE with logits: −log σ(s⁺) − log σ(−s⁻), averaged over the 2B logits
            let loss = ((rudder_nn::ops::softplus(&sp.neg()?)? + rudder_nn::ops::softplus(&sn)?)?
                .sum_all()?
                / (2 * bsz) as f64)?;
            total += loss.to_scalar::<f32>()? as f64;
            opt.step(&loss.backward()?)?;
            obs.step_done();
        }
        let (ndcg10, hit20, hit1) = valid.measure(model, n_items, cfg.window)?;
        let rec = SeqEpoch {
            epoch,
            loss: total / steps as f64,
            seconds: t0.elapsed().as_secs_f64(),
            valid_ndcg10: ndcg10,
            valid_hit20: hit20,
            valid_hit1: hit1,
        };
        obs.epoch_done(&rec);
        let better = best.as_ref().is_none_or(|(s, _, _)| rec.valid_ndcg10 > *s);
        epochs.push(rec.clone());
        if better {
            let snap = params
                .iter()
                .map(|(_, v)| v.as_tensor().copy())
                .collect::<candle_core::Result<Vec<_>>>()?;
            best = Some((rec.valid_ndcg10, epoch, snap));
            since = 0;
        } else {
            since += 1;
            if cfg.patience > 0 && since >= cfg.patience {
                break;
            }
        }
    }
    let (_, best_epoch, snap) = best.expect("at least one epoch");
    for ((_, v), t) in params.iter().zip(snap) {
        v.set(&t)?;
    }
    Ok(SeqTrainReport { epochs, best_epoch })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Synthetic sequences where the next item is the last item + 1 (mod n): learnable.
    fn rows(n_items: u32, count: usize, seed: u64) -> Vec<SeqSample> {
        let mut rng = rudder_data::rng::stream(seed, &[]);
        (0..count)
            .map(|_| {
                let len = rng.random_range(1..=10usize);
                let start = rng.random_range(0..n_items);
                let seq: Vec<u32> = (0..10)
                    .map(|k| {
                        if k < len {
                            (start + k as u32) % n_items
                        } else {
                            n_items
                        }
                    })
                    .collect();
                SeqSample {
                    seq,
                    seq_ratings: None,
                    len_seq: len,
                    next: (start + len as u32) % n_items,
                    next_rating: None,
                }
            })
            .collect()
    }

    #[test]
    fn every_parameter_gets_a_gradient() {
        for kind in [SeqKind::Sasrec, SeqKind::Gru4rec, SeqKind::Caser] {
            let cfg = SeqConfig {
                hidden: 16,
                ..SeqConfig::new(kind)
            };
            let m = build(30, &cfg).unwrap();
            let r = rows(30, 8, 1);
            let hist: Vec<Vec<u32>> = r.iter().map(|s| s.history(Some(30))).collect();
            let refs: Vec<&[u32]> = hist.iter().map(|h| h.as_slice()).collect();
            let (ids, lens) = batch(&refs, 10, 30).unwrap();
            let mut rng = rudder_data::rng::stream(0, &[]);
            let h = m.encode(&ids, &lens, Some(&mut rng)).unwrap();
            let (w, b) = m.head();
            let s = h
                .matmul(&w.as_tensor().t().unwrap())
                .unwrap()
                .broadcast_add(b.as_tensor())
                .unwrap();
            let g = s.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let mut params = m.params();
            // the padding row of the item table is never read with a non-zero multiplier
            params.retain(|(n, _)| n != "item_emb");
            rudder_nn::grad::assert_all_receive_gradient(&g, &params);
            assert!(
                g.get(m.item_embeddings().as_tensor()).is_some(),
                "{kind:?} item_emb"
            );
        }
    }

    #[test]
    fn each_model_learns_a_successor_rule_and_ranks_candidates() {
        let n = 40u32;
        let (tr, va) = (rows(n, 2000, 1), rows(n, 200, 2));
        for kind in [SeqKind::Sasrec, SeqKind::Gru4rec, SeqKind::Caser] {
            let cfg = SeqConfig {
                epochs: 8,
                batch_size: 128,
                hidden: 32,
                lr: 5e-3,
                l2: 0.0,
                patience: 0,
                ..SeqConfig::new(kind)
            };
            let m = build(n as usize, &cfg).unwrap();
            let before = eval_full(m.as_ref(), &va, n as usize, 10, &[10])
                .unwrap()
                .get("hit", 10);
            let rep = train(
                m.as_ref(),
                &cfg,
                n as usize,
                &tr,
                Validation::Full(&va),
                &mut Quiet,
            )
            .unwrap();
            let after = eval_full(m.as_ref(), &va, n as usize, 10, &[10])
                .unwrap()
                .get("hit", 10);
            assert!(
                after > 0.6 && after > before + 0.3,
                "{kind:?}: hit@10 {before} → {after}"
            );
            assert_eq!(rep.epochs.len(), 8);
            let best = rep
                .epochs
                .iter()
                .map(|e| e.valid_ndcg10)
                .fold(0.0, f64::max);
            assert_eq!(rep.epochs[rep.best_epoch].valid_ndcg10, best);
            // candidate protocol: the target among 5 candidates
            let ex = questions(&va, n, 5);
            let hr1 = eval_candidates(m.as_ref(), &ex, n as usize, 10, &[1])
                .unwrap()
                .get("hit", 1);
            assert!(hr1 > 0.5, "{kind:?}: candidate HR@1 {hr1}");
        }
        // bad ids are refused with the row
        let mut bad = rows(n, 3, 5);
        bad[1].next = 99;
        let m = build(n as usize, &SeqConfig::new(SeqKind::Sasrec)).unwrap();
        let cfg = SeqConfig::new(SeqKind::Sasrec);
        let e = train_error(m.as_ref(), &cfg, n, &bad, Validation::Full(&va));
        assert!(e.contains("line 2") && e.contains("99"), "{e}");
    }

    /// The error message of a training run that must fail.
    fn train_error(
        m: &dyn SeqModel,
        cfg: &SeqConfig,
        n: u32,
        tr: &[SeqSample],
        valid: Validation,
    ) -> String {
        match train(m, cfg, n as usize, tr, valid, &mut Quiet) {
            Ok(_) => panic!("training should have been refused"),
            Err(e) => e.to_string(),
        }
    }

    /// Questions over `rows` with `c` candidates each (the target among them).
    fn questions(rows: &[SeqSample], n: u32, c: usize) -> Vec<RecExample> {
        rows.iter()
            .map(|s| {
                let h = s.history(Some(n));
                let cands = crate::data::candidates_for(&h, s.next, n as usize, c, 3).unwrap();
                RecExample {
                    history: h,
                    candidates: cands,
                    target: s.next,
                }
            })
            .collect()
    }

    #[test]
    fn candidate_validation_selects_on_the_candidates_and_checks_their_ids() {
        let n = 40u32;
        let (tr, va) = (rows(n, 1000, 1), rows(n, 100, 2));
        let ex = questions(&va, n, 5);
        let cfg = SeqConfig {
            epochs: 4,
            batch_size: 128,
            hidden: 16,
            lr: 5e-3,
            l2: 0.0,
            patience: 0,
            ..SeqConfig::new(SeqKind::Gru4rec)
        };
        let m = build(n as usize, &cfg).unwrap();
        let rep = train(
            m.as_ref(),
            &cfg,
            n as usize,
            &tr,
            Validation::Candidates(&ex),
            &mut Quiet,
        )
        .unwrap();
        assert!(
            rep.epochs
                .iter()
                .all(|e| e.valid_hit1.is_some() && e.valid_hit20.is_none())
        );
        // the kept weights are the best epoch's, and score the candidates as recorded
        let best = &rep.epochs[rep.best_epoch];
        assert!(
            rep.epochs
                .iter()
                .all(|e| e.valid_ndcg10 <= best.valid_ndcg10)
        );
        let now = eval_candidates(m.as_ref(), &ex, n as usize, 10, &[1, 10]).unwrap();
        assert!((now.get("ndcg", 10) - best.valid_ndcg10).abs() < 1e-9);
        assert_eq!(Some(now.get("hit", 1)), best.valid_hit1);
        // a candidate beyond the catalogue is refused with the question
        let mut bad = ex.clone();
        bad[3].candidates[0] = 77;
        let e = train_error(m.as_ref(), &cfg, n, &tr, Validation::Candidates(&bad));
        assert!(e.contains("question 4") && e.contains("77"), "{e}");
    }
}
