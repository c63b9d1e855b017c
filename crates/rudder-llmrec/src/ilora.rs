//! LLaRA and iLoRA (llmrec-seeds.md §2): a language model conditioned on a frozen sequential
//! recommender.
//!
//! - **LLaRA**: hybrid prompts (item embeddings of the frozen SASRec, projected into the
//!   model's input space by a trainable [`Projector`], spliced at marker tokens) and one LoRA;
//!   training mixes text-only and hybrid batches by a curriculum; evaluation is hybrid.
//! - **iLoRA**: LLaRA with MoE-LoRA (`rudder_lm::lora`, K experts splitting the rank) whose
//!   per-sequence gate comes from a [`Router`] over the frozen SASRec user vector (the encoder
//!   state at the last real position, evaluation mode).
//!
//! Both plug into the one LM training loop as a [`Conditioner`] with the reference's parameter
//! groups: projector (lr, weight decay 1e-5), router (0.3·lr, 1e-5), adapter (lr, 0).
//!
//! Curriculum: a training batch is hybrid with probability `p`. [`Curriculum::Linear`] ramps
//! `p` from 0 to 1 over the run (what LLaRA describes); [`Curriculum::Faithful`] reproduces the
//! reference as coded with 8 data-loader workers re-created each epoch: `p` ramps from 0 to
//! `1/epochs` within every epoch and resets (§2.3), so most training batches are text-only.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use rudder_lm::hooks::NoHook;
use rudder_lm::lora::Adapter;
use serde::{Deserialize, Serialize};

use crate::hybrid::{Projector, Splice};
use crate::lmdata::LmExample;
use crate::lmtrain::{Conditioner, ParamGroup, Prepared};
use crate::router::{Router, RouterKind};
use crate::seqrec::{SeqModel, batch};
use crate::{LlmrecError, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Curriculum {
    /// `p = step / total`.
    Linear,
    /// The reference as coded (per-worker counters): `p = (fraction of the epoch) / epochs`.
    Faithful,
    /// Always hybrid.
    Hybrid,
    /// Always text-only in training (evaluation stays hybrid).
    Text,
}

impl Curriculum {
    pub fn probability(self, step: u64, total: u64, steps_per_epoch: f64) -> f64 {
        let total = total.max(1) as f64;
        match self {
            Curriculum::Linear => step as f64 / total,
            Curriculum::Faithful => {
                let spe = steps_per_epoch.max(1e-9);
                let epochs = (total / spe).max(1e-9);
                ((step as f64 % spe) / spe) / epochs
            }
            Curriculum::Hybrid => 1.0,
            Curriculum::Text => 0.0,
        }
    }
}

/// The frozen sequential model, the projector and (iLoRA) the router.
pub struct SeqConditioner {
    seq: Box<dyn SeqModel + Send + Sync>,
    window: usize,
    n_items: usize,
    pub projector: Projector,
    pub router: Option<Router>,
    pub curriculum: Curriculum,
}

impl SeqConditioner {
    /// `seq` is the trained sequential model (frozen here); `d_model` the language model's
    /// width and `layers` its depth; `router` for iLoRA (its expert count must be the
    /// adapter's).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        seq: Box<dyn SeqModel + Send + Sync>,
        window: usize,
        n_items: usize,
        d_model: usize,
        layers: usize,
        router: Option<(RouterKind, usize)>,
        curriculum: Curriculum,
        seed: u64,
    ) -> Result<SeqConditioner> {
        let d_rec = seq.item_embeddings().dims()[1];
        let rows = seq.item_embeddings().dims()[0];
        if rows != n_items + 1 {
            return Err(LlmrecError::Config(format!(
                "the sequential model has {} item rows, the data {n_items} items (+1 pad): it was trained on another item set",
                rows
            )));
        }
        // the user vector is what the output layer reads: [n_items, d']
        let user_dim = seq.head().0.dims()[1];
        let router = router
            .map(|(kind, k)| Router::new(kind, user_dim, k, layers, seed))
            .transpose()?;
        Ok(SeqConditioner {
            seq,
            window,
            n_items,
            projector: Projector::new(d_rec, d_model, seed)?,
            router,
            curriculum,
        })
    }

    fn check_items(&self, ids: &[u32], what: &str) -> Result<()> {
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.n_items) {
            return Err(LlmrecError::Input(format!(
                "{what}: item {bad} is outside the sequential model's {} items",
                self.n_items
            )));
        }
        Ok(())
    }

    /// Refuse histories the sequential model cannot read whole: longer than its window (LLaRA's
    /// rows hold at most 10 items; S-DPO's prompt files list up to 215) or naming unknown items.
    pub fn check_histories<'a>(
        &self,
        histories: impl IntoIterator<Item = &'a [u32]>,
        what: &str,
    ) -> Result<()> {
        for (i, h) in histories.into_iter().enumerate() {
            if h.len() > self.window {
                return Err(LlmrecError::Input(format!(
                    "{what} {i}: a history of {} items, longer than the sequential model's window of {}; build the questions from the LLaRA sequence files (no --prompts) or train the SASRec with a longer window",
                    h.len(),
                    self.window
                )));
            }
            self.check_items(h, &format!("{what} {i}"))?;
        }
        Ok(())
    }

    /// Frozen user vectors `[B, d]` of the histories.
    pub fn users(&self, histories: &[&[u32]]) -> Result<Tensor> {
        self.check_histories(histories.iter().copied(), "history")?;
        let (ids, lens) = batch(histories, self.window, self.n_items as u32)?;
        Ok(self.seq.encode(&ids, &lens, None)?.detach())
    }

    /// Expert weights `[B, K]` of the histories (evaluation mode), for diagnostics.
    pub fn gates(&self, histories: &[&[u32]]) -> Result<Option<Tensor>> {
        match &self.router {
            None => Ok(None),
            Some(r) => Ok(Some(r.forward(&self.users(histories)?, false)?)),
        }
    }
}

impl Conditioner for SeqConditioner {
    fn groups(&self) -> Vec<ParamGroup> {
        let mut g = vec![ParamGroup {
            name: "projector".into(),
            params: self.projector.params(),
            lr_mult: 1.0,
            weight_decay: 1e-5,
        }];
        if let Some(r) = &self.router {
            g.push(ParamGroup {
                name: "router".into(),
                params: r.params(),
                lr_mult: 0.3,
                weight_decay: 1e-5,
            });
        }
        g
    }

    fn hybrid_probability(&self, step: u64, total: u64, steps_per_epoch: f64) -> f64 {
        self.curriculum.probability(step, total, steps_per_epoch)
    }

    fn prepare(
        &self,
        exs: &[&LmExample],
        hybrid: bool,
        training: bool,
        adapter: &Adapter,
    ) -> Result<Prepared> {
        let hy: Vec<&crate::hybrid::Hybrid> = exs
            .iter()
            .enumerate()
            .map(|(i, e)| {
                e.hybrid
                    .as_ref()
                    .ok_or_else(|| LlmrecError::Config(format!("example {i} has no hybrid prompt")))
            })
            .collect::<Result<_>>()?;
        if let Some(r) = &self.router {
            if adapter.cfg.experts != r.experts {
                return Err(LlmrecError::Config(format!(
                    "the router has {} experts, the adapter {}",
                    r.experts, adapter.cfg.experts
                )));
            }
            let hist: Vec<&[u32]> = hy.iter().map(|h| h.history.as_slice()).collect();
            let g = r.gates(&self.users(&hist)?, training)?;
            let set = if g.len() == 1 {
                adapter.set_gate(Some(&g[0]))
            } else {
                adapter.set_layer_gates(&g)
            };
            set.map_err(|e| LlmrecError::Config(e.to_string()))?;
        }
        if !hybrid {
            return Ok(Prepared {
                prompts: exs.iter().map(|e| e.prompt.clone()).collect(),
                hook: Box::new(NoHook),
            });
        }
        let mut ids = Vec::new();
        let mut rows = Vec::with_capacity(hy.len());
        for h in &hy {
            let mut r = Vec::with_capacity(h.slots.len());
            for &(p, item) in &h.slots {
                r.push((p, ids.len()));
                ids.push(item);
            }
            rows.push(r);
        }
        self.check_items(&ids, "prompt item")?;
        let n = ids.len();
        let emb = self
            .seq
            .item_embeddings()
            .as_tensor()
            .detach()
            .index_select(&Tensor::from_vec(ids, n, &Device::Cpu)?, 0)?;
        let vectors = self.projector.forward(&emb)?;
        let vectors = if training { vectors } else { vectors.detach() };
        Ok(Prepared {
            prompts: hy.iter().map(|h| h.prompt.clone()).collect(),
            hook: Box::new(Splice { rows, vectors }),
        })
    }

    fn tensors(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self
            .projector
            .params()
            .into_iter()
            .map(|(n, p)| (n, p.as_tensor().clone()))
            .collect();
        if let Some(r) = &self.router {
            v.extend(
                r.tensors()
                    .into_iter()
                    .map(|(n, t)| (format!("router.{n}"), t)),
            );
        }
        v
    }

    fn load(&self, map: &HashMap<String, Tensor>, prefix: &str, source: &Path) -> Result<()> {
        for (n, v) in self.projector.params() {
            v.set(&crate::error::named_tensor(
                map,
                &format!("{prefix}{n}"),
                v.dims(),
                source,
            )?)?;
        }
        if let Some(r) = &self.router {
            r.load(map, &format!("{prefix}router."), source)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curricula_as_specified() {
        let c = Curriculum::Linear;
        assert_eq!(c.probability(0, 100, 20.0), 0.0);
        assert_eq!(c.probability(50, 100, 20.0), 0.5);
        // faithful: 5 epochs of 20 steps, ramps to 0.2 within each epoch and resets
        let f = Curriculum::Faithful;
        assert!((f.probability(10, 100, 20.0) - 0.1).abs() < 1e-12);
        assert!((f.probability(19, 100, 20.0) - 0.19).abs() < 1e-12);
        assert_eq!(f.probability(20, 100, 20.0), 0.0);
        assert_eq!(Curriculum::Hybrid.probability(0, 9, 3.0), 1.0);
    }
}
