//! Hyper-parameter presets matching the reference repositories' tables (cf-seeds.md §2.4) and
//! the RecBole comparison configuration.

use crate::config::{AdvConfig, CfConfig, LossConfig, ModelKind};

/// (name, description) of every preset.
pub const PRESETS: [(&str, &str); 18] = [
    (
        "recbole-lightgcn",
        "RecBole-comparable LightGCN: d=64, 3 layers, BPR, batch 2048, lr 1e-3, reg 1e-5, interaction-uniform epochs, eval every epoch",
    ),
    (
        "recbole-bpr",
        "RecBole-comparable BPR-MF: d=64, batch 2048, lr 1e-3, reg 1e-5, interaction-uniform epochs, eval every epoch",
    ),
    (
        "advinfonce-coat-lightgcn",
        "AdvInfoNCE README, Coat, LightGCN L=2: lr 1e-3, B 1024, N 64, τ 0.75, adv_lr 1e-2, 20 passes every 15 epochs",
    ),
    (
        "advinfonce-coat-mf",
        "AdvInfoNCE README, Coat, MF: as above with 18 adversarial passes",
    ),
    (
        "infonce-coat-lightgcn",
        "InfoNCE baseline on Coat, LightGCN L=2: lr 1e-3, B 1024, N 64, τ 0.75",
    ),
    (
        "infonce-coat-mf",
        "InfoNCE baseline on Coat, MF: lr 1e-3, B 1024, N 64, τ 0.75",
    ),
    (
        "advinfonce-yahoo-lightgcn",
        "AdvInfoNCE README, Yahoo!R3, LightGCN L=2: lr 5e-4, B 1024, N 64, τ 0.28, adv_lr 1e-4, 13 passes every 5 epochs",
    ),
    (
        "advinfonce-yahoo-mf",
        "AdvInfoNCE README, Yahoo!R3, MF: lr 5e-4, B 1024, N 64, τ 0.28, adv_lr 1e-4, 12 passes",
    ),
    (
        "advinfonce-tencent-lightgcn",
        "AdvInfoNCE README, Tencent, LightGCN L=2: lr 1e-3, B 2048, N 128, τ 0.09, adv_lr 5e-5, 7 passes, patience 20",
    ),
    (
        "advinfonce-tencent-mf",
        "AdvInfoNCE README, Tencent, MF: lr 1e-3, B 2048, N 128, τ 0.09, adv_lr 5e-5, 8 passes, patience 20",
    ),
    (
        "advinfonce-kuairec-lightgcn",
        "AdvInfoNCE README, KuaiRec, LightGCN L=2: lr 3e-5, B 2048, N 128, τ 2.0, adv_lr 5e-5, 12 passes",
    ),
    (
        "alpharec",
        "AlphaRec README (Books, Movies & TV): MLP projector, d=64, L=2, InfoNCE τ 0.15, N 256, lr 5e-4, B 4096, eval every 5, patience 20, K 20",
    ),
    (
        "alpharec-games",
        "AlphaRec README (Games): as alpharec with τ 0.2",
    ),
    (
        "advdrop-coat",
        "AdvDrop README, Coat: LightGCN L=2, d 30, BPR, lr 1e-3, B 128, reg 1e-5, ARM phase every 7 epochs × 10 passes, adv_lr 1e-2, eval every epoch",
    ),
    (
        "advdrop-yelp",
        "AdvDrop README, Yelp2018: d 64, lr 5e-4, B 1024, every 7 epochs × 15 passes, adv_lr 1e-2",
    ),
    (
        "advdrop-yahoo",
        "AdvDrop README, Yahoo: d 30, lr 3e-3, B 128, every 15 epochs × 5 passes, adv_lr 1e-3",
    ),
    (
        "advdrop-kuairec",
        "AdvDrop README, KuaiRec: d 30, lr 5e-4, B 512, every 3 epochs × 5 passes, adv_lr 1e-3",
    ),
    (
        "infonce-kuairec-lightgcn",
        "InfoNCE baseline on KuaiRec, LightGCN L=2: lr 3e-5, B 2048, N 128, τ 2.0",
    ),
];

fn adv(tau: f64, n_neg: usize, adv_lr: f64, eta_epochs: usize, adv_interval: usize) -> LossConfig {
    LossConfig::Advinfonce(AdvConfig {
        tau,
        n_neg,
        adv_lr,
        eta_epochs,
        adv_interval,
        ..AdvConfig::default()
    })
}

fn base(model: ModelKind, loss: LossConfig, lr: f64, batch: usize, patience: usize) -> CfConfig {
    let mut c = CfConfig::new(model, loss);
    c.n_layers = if model == ModelKind::Mf { 0 } else { 2 };
    c.lr = lr;
    c.batch_size = batch;
    c.patience = patience;
    c.epochs = 2000;
    c.eval_every = 5;
    c.ks = vec![20];
    c.seed = 101;
    c
}

pub fn preset(name: &str) -> Option<CfConfig> {
    use ModelKind::{Lightgcn as L, Mf as M};
    let infonce = |tau, n_neg| LossConfig::Infonce {
        tau,
        n_neg,
        reg: 1e-5,
    };
    Some(match name {
        "recbole-lightgcn" | "recbole-bpr" => {
            let model = if name == "recbole-lightgcn" { L } else { M };
            let mut c = CfConfig::new(model, LossConfig::Bpr { reg: 1e-5 });
            c.n_layers = if model == L { 3 } else { 0 };
            c.eval_every = 1;
            c.patience = 10;
            c.epochs = 300;
            c.ks = vec![10, 20];
            c.seed = 2020;
            c.sampler = rudder_data::sampler::SampleMode::Interaction;
            c
        }
        "advinfonce-coat-lightgcn" => base(L, adv(0.75, 64, 1e-2, 20, 15), 1e-3, 1024, 10),
        "advinfonce-coat-mf" => base(M, adv(0.75, 64, 1e-2, 18, 15), 1e-3, 1024, 10),
        "infonce-coat-lightgcn" => base(L, infonce(0.75, 64), 1e-3, 1024, 10),
        "infonce-coat-mf" => base(M, infonce(0.75, 64), 1e-3, 1024, 10),
        "advinfonce-yahoo-lightgcn" => base(L, adv(0.28, 64, 1e-4, 13, 5), 5e-4, 1024, 10),
        "advinfonce-yahoo-mf" => base(M, adv(0.28, 64, 1e-4, 12, 5), 5e-4, 1024, 10),
        "advinfonce-tencent-lightgcn" => base(L, adv(0.09, 128, 5e-5, 7, 5), 1e-3, 2048, 20),
        "advinfonce-tencent-mf" => base(M, adv(0.09, 128, 5e-5, 8, 5), 1e-3, 2048, 20),
        "advinfonce-kuairec-lightgcn" => base(L, adv(2.0, 128, 5e-5, 12, 5), 3e-5, 2048, 10),
        "infonce-kuairec-lightgcn" => base(L, infonce(2.0, 128), 3e-5, 2048, 10),
        "advdrop-coat" | "advdrop-yelp" | "advdrop-yahoo" | "advdrop-kuairec" => {
            let (lr, b, d, interval, adv_epochs, adv_lr) = match name {
                "advdrop-coat" => (1e-3, 128, 30, 7, 10, 1e-2),
                "advdrop-yelp" => (5e-4, 1024, 64, 7, 15, 1e-2),
                "advdrop-yahoo" => (3e-3, 128, 30, 15, 5, 1e-3),
                _ => (5e-4, 512, 30, 3, 5, 1e-3),
            };
            let mut c = base(ModelKind::Advdrop, LossConfig::Bpr { reg: 1e-5 }, lr, b, 20);
            c.dim = d;
            c.epochs = 1600;
            c.eval_every = 1;
            c.advdrop = crate::advdrop::AdvDropConfig {
                interval,
                adv_epochs,
                adv_lr,
                ..Default::default()
            };
            c
        }
        "alpharec" | "alpharec-games" => {
            let tau = if name == "alpharec" { 0.15 } else { 0.2 };
            let mut c = base(
                ModelKind::Alpharec,
                LossConfig::Infonce {
                    tau,
                    n_neg: 256,
                    reg: 0.0,
                },
                5e-4,
                4096,
                20,
            );
            c.n_layers = 2;
            c.epochs = 500;
            c
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_listed_preset_builds_and_validates() {
        for (n, _) in super::PRESETS {
            super::preset(n).unwrap().validate().unwrap();
        }
        assert!(super::preset("nope").is_none());
    }
}
