//! Configuration of a CF run; serialised into every run folder.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    Mf,
    Lightgcn,
    /// Language-feature CF (no ID embeddings); trains with (Adv)InfoNCE.
    Alpharec,
    /// LightGCN with adversarial edge dropout (two views, invariance loss); trains with BPR.
    Advdrop,
}

/// The training loss.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum LossConfig {
    /// Bayesian personalised ranking with one negative; `reg` is the L2 weight on the batch's
    /// layer-0 embeddings (`reg · ½(‖e_u‖² + ‖e_i‖² + ‖e_j‖²) / B`).
    Bpr { reg: f64 },
    /// Sampled InfoNCE over `n_neg` negatives, temperature `tau`, positive in the denominator.
    Infonce { tau: f64, n_neg: usize, reg: f64 },
    /// AdvInfoNCE (cf-seeds.md §2.2–2.3): negatives weighted by adversarially learned hardness.
    Advinfonce(AdvConfig),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdvConfig {
    pub tau: f64,
    pub n_neg: usize,
    pub reg: f64,
    /// Width of the hardness embeddings.
    pub w_dim: usize,
    /// Multiplier of the negative term (`k_neg · N · Σ p_j e^{s_j}`).
    pub k_neg: f64,
    pub adv_lr: f64,
    /// Maximum number of adversarial passes (the KL budget in practice).
    pub eta_epochs: usize,
    /// Adversarial pass at epochs where `(epoch + 3) % adv_interval == 0`.
    pub adv_interval: usize,
    pub adv_epochs: usize,
    pub warm_up_epochs: usize,
    /// Reproduce the reference's `0.5 ** ‖E_neg‖_F` regulariser typo.
    pub faithful_reg_typo: bool,
    /// L2 weight on the batch's hardness rows in the adversarial step (the reference computes
    /// such a term but, by a bug, regularises with the main model's loss, which has no gradient
    /// for the adversary).
    pub adv_reg: f64,
    /// Reproduce that bug: no regulariser on the adversary (plain gradient ascent).
    pub faithful_adv_reg: bool,
    /// Reproduce the reference's repeating negatives (see `SamplerConfig::repeat_negatives`).
    #[serde(default)]
    pub faithful_negatives: bool,
}

impl Default for AdvConfig {
    fn default() -> Self {
        AdvConfig {
            tau: 0.75,
            n_neg: 64,
            reg: 1e-5,
            w_dim: 64,
            k_neg: 64.0,
            adv_lr: 1e-2,
            eta_epochs: 20,
            adv_interval: 15,
            adv_epochs: 1,
            warm_up_epochs: 0,
            faithful_reg_typo: false,
            adv_reg: 1e-5,
            faithful_adv_reg: false,
            faithful_negatives: false,
        }
    }
}

impl LossConfig {
    pub fn n_neg(&self) -> usize {
        match self {
            LossConfig::Bpr { .. } => 1,
            LossConfig::Infonce { n_neg, .. } => *n_neg,
            LossConfig::Advinfonce(a) => a.n_neg,
        }
    }
    pub fn name(&self) -> &'static str {
        match self {
            LossConfig::Bpr { .. } => "bpr",
            LossConfig::Infonce { .. } => "infonce",
            LossConfig::Advinfonce(_) => "advinfonce",
        }
    }
    /// InfoNCE-family losses train and score with cosine similarity.
    pub fn cosine(&self) -> bool {
        !matches!(self, LossConfig::Bpr { .. })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CfConfig {
    pub model: ModelKind,
    /// Graph layers (LightGCN); ignored by MF.
    pub n_layers: usize,
    pub dim: usize,
    pub loss: LossConfig,
    pub lr: f64,
    pub batch_size: usize,
    pub epochs: usize,
    /// Evaluate on validation every this many epochs.
    pub eval_every: usize,
    /// Stop after this many evaluations without a better validation Recall@K.
    pub patience: usize,
    /// Cut-offs; the last one selects the model.
    pub ks: Vec<usize>,
    pub seed: u64,
    /// How an epoch draws its positives: `user` (the CF reference repositories) or
    /// `interaction` (RecBole).
    #[serde(default)]
    pub sampler: rudder_data::sampler::SampleMode,
    /// AlphaRec's projector and feature source.
    #[serde(default)]
    pub alpharec: crate::alpharec::AlphaRecConfig,
    /// Select the model and stop early on the (first) test set instead of validation, as
    /// AlphaRec's reference code does (faithful mode; leaks test information).
    #[serde(default)]
    pub select_on_test: bool,
    /// AdvDrop's mask network and schedule.
    #[serde(default)]
    pub advdrop: crate::advdrop::AdvDropConfig,
}

impl CfConfig {
    pub fn new(model: ModelKind, loss: LossConfig) -> CfConfig {
        CfConfig {
            model,
            n_layers: match model {
                ModelKind::Mf => 0,
                ModelKind::Lightgcn => 3,
                ModelKind::Alpharec | ModelKind::Advdrop => 2,
            },
            dim: 64,
            loss,
            lr: 1e-3,
            batch_size: 2048,
            epochs: 100,
            eval_every: 5,
            patience: 10,
            ks: vec![10, 20],
            seed: 101,
            sampler: rudder_data::sampler::SampleMode::User,
            alpharec: Default::default(),
            select_on_test: false,
            advdrop: Default::default(),
        }
    }

    pub fn selection_k(&self) -> usize {
        *self.ks.last().unwrap_or(&20)
    }

    pub fn validate(&self) -> crate::Result<()> {
        let bad = |m: &str| Err(crate::CfError::Config(m.to_string()));
        if self.dim == 0 {
            return bad("dim must be positive");
        }
        if self.batch_size == 0 || self.epochs == 0 || self.eval_every == 0 {
            return bad("batch size, epochs and eval interval must be positive");
        }
        if self.ks.is_empty() || self.ks.contains(&0) {
            return bad("cut-offs K must be positive");
        }
        if !(self.lr > 0.0) {
            return bad("learning rate must be positive");
        }
        if self.model == ModelKind::Advdrop && !matches!(self.loss, LossConfig::Bpr { .. }) {
            return bad("AdvDrop trains with BPR on both views");
        }
        if self.model == ModelKind::Alpharec && !self.loss.cosine() {
            return bad("AlphaRec trains with cosine InfoNCE (or AdvInfoNCE), not BPR");
        }
        match &self.loss {
            LossConfig::Infonce { tau, n_neg, .. } if *tau <= 0.0 || *n_neg == 0 => {
                bad("InfoNCE needs tau > 0 and n_neg ≥ 1")
            }
            LossConfig::Advinfonce(a) if a.tau <= 0.0 || a.n_neg == 0 || a.adv_interval == 0 => {
                bad("AdvInfoNCE needs tau > 0, n_neg ≥ 1 and adv_interval ≥ 1")
            }
            _ => Ok(()),
        }
    }
}
