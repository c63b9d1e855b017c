use crate::runs::RunDir;
use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand};
use indicatif::ProgressBar;
use rudder_cf::config::AdvConfig;
use rudder_cf::model::ModelInputs;
use rudder_cf::presets::{PRESETS, preset};
use rudder_cf::trainer::{
    EpochRecord, TrainObserver, evaluate_tests, evaluate_valid, metrics_row, train_checkpointed,
    write_run,
};
use rudder_cf::{CfConfig, LossConfig, ModelKind};
use rudder_data::assets::Store;
use rudder_data::eval::{Scorer, top_k_row};
use rudder_data::formats::{Format, Loaded};
use rudder_data::split::{SplitMethod, split};
use rudder_data::{Dataset, preprocess, resolve};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum CfCmd {
    /// Train MF or LightGCN with BPR, InfoNCE or AdvInfoNCE; writes a run folder
    /// (config.toml, metrics.jsonl, summary.md, best.safetensors).
    Train(Box<TrainArgs>),
    /// Re-evaluate a run folder's best weights on validation and every test set. With --data
    /// (AlphaRec only) the trained projector recommends zero-shot on another dataset from its
    /// item titles alone.
    Eval {
        /// Run folder written by `rudder cf train`.
        #[arg(long)]
        run: PathBuf,
        /// Zero-shot target dataset (folder, asset name or synth); default: the run's own data.
        #[arg(long)]
        data: Option<String>,
        /// Item features of the target dataset (default: encode its titles with the run's encoder).
        #[arg(long)]
        features: Option<String>,
    },
    /// Top-K recommendations for one user of a trained run, in the user's original ids, with
    /// item titles when known (items the user trained on are excluded).
    Recommend {
        #[arg(long)]
        run: PathBuf,
        /// The user's original id (as in the data files).
        #[arg(long)]
        user: String,
        #[arg(short, long, default_value_t = 10)]
        k: usize,
        /// AlphaRec: a text query that moves the user's vector toward it ("space adventure").
        #[arg(long)]
        intent: Option<String>,
        /// Weight of the intent in the user's vector (0..1).
        #[arg(long, default_value_t = 0.5)]
        alpha: f64,
    },
    /// List the hyper-parameter presets.
    Presets,
}

/// Every training option. Flags override a `--config` file, which overrides a `--preset`,
/// which overrides the defaults. The resolved options are saved as the run's config.toml, so
/// `rudder cf train --config RUN/config.toml` repeats a run.
#[derive(Args, Serialize, Deserialize, Default, Clone, Debug)]
#[serde(default, deny_unknown_fields)]
pub struct TrainArgs {
    /// TOML file with any of these options (snake_case keys).
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Run folder to write.
    #[arg(long)]
    #[serde(skip)]
    out: Option<PathBuf>,
    /// Continue an interrupted run from its last checkpoint (written at every evaluation),
    /// with the options of its config.toml: the result equals an uninterrupted run with the
    /// same seed and thread count.
    #[arg(long, value_name = "RUN", conflicts_with_all = ["out", "config"])]
    #[serde(skip)]
    resume: Option<PathBuf>,
    /// Dataset: folder/file in any supported format, a fetched asset name, or `synth`.
    #[arg(long)]
    data: Option<String>,
    /// Input format when detection is not wanted.
    #[arg(long)]
    format: Option<String>,
    /// Start from a preset (see `rudder cf presets`).
    #[arg(long)]
    preset: Option<String>,
    /// mf, lightgcn or alpharec.
    #[arg(long)]
    model: Option<String>,
    /// AlphaRec: item features file (safetensors from `rudder embed`, aligned by its ids, or
    /// .npy rows in item order). Default: encode item titles with --encoder.
    #[arg(long)]
    features: Option<String>,
    /// AlphaRec: sentence encoder for item titles (folder or asset; default all-minilm-l6-v2).
    #[arg(long)]
    encoder: Option<String>,
    /// AlphaRec with a decoder-LM encoder: `mean` (default) or `last` token hidden state.
    #[arg(long)]
    pooling: Option<String>,
    /// AlphaRec: projector `mlp` (default) or `linear`.
    #[arg(long)]
    projector: Option<String>,
    /// AlphaRec: MLP hidden width as a multiple of the feature size.
    #[arg(long)]
    hidden_mult: Option<f64>,
    /// bpr, infonce or advinfonce.
    #[arg(long)]
    loss: Option<String>,
    /// LightGCN layers.
    #[arg(long)]
    layers: Option<usize>,
    /// Embedding size.
    #[arg(long)]
    dim: Option<usize>,
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    epochs: Option<usize>,
    /// Evaluate on validation every N epochs.
    #[arg(long)]
    eval_every: Option<usize>,
    /// Stop after N evaluations without improvement (0 = never).
    #[arg(long)]
    patience: Option<usize>,
    /// Cut-offs; the last selects the model.
    #[arg(long, value_delimiter = ',')]
    ks: Option<Vec<usize>>,
    #[arg(long)]
    seed: Option<u64>,
    /// Temperature (InfoNCE, AdvInfoNCE).
    #[arg(long)]
    tau: Option<f64>,
    /// Negatives per positive (InfoNCE, AdvInfoNCE).
    #[arg(long)]
    n_neg: Option<usize>,
    /// L2 weight on the batch's layer-0 embeddings.
    #[arg(long)]
    reg: Option<f64>,
    /// AdvInfoNCE: adversary learning rate.
    #[arg(long)]
    adv_lr: Option<f64>,
    /// AdvInfoNCE: maximum adversarial passes.
    #[arg(long)]
    eta_epochs: Option<usize>,
    /// AdvInfoNCE: adversarial pass when (epoch + 3) % adv_interval == 0.
    #[arg(long)]
    adv_interval: Option<usize>,
    /// AdvDrop: passes over the batches in each adversarial phase.
    #[arg(long)]
    adv_epochs: Option<usize>,
    /// AdvDrop: keep probability used to rescale kept edges.
    #[arg(long)]
    keep_prob: Option<f64>,
    /// AdvDrop: weight of the cross-view invariance loss.
    #[arg(long)]
    inv_tau: Option<f64>,
    /// AdvInfoNCE: negative-term multiplier.
    #[arg(long)]
    k_neg: Option<f64>,
    /// Reproduce the reference code: AdvInfoNCE's three bugs (the 0.5 ** ‖E_neg‖ regulariser
    /// typo, the adversary step without its own regulariser, and negatives that repeat every
    /// epoch because reckit's generator is copied into fresh DataLoader workers); AlphaRec's model selection and early
    /// stopping on the test set.
    #[arg(long)]
    faithful: Option<bool>,
    /// AdvInfoNCE: L2 weight on the hardness embeddings in the adversarial step.
    #[arg(long)]
    adv_reg: Option<f64>,
    /// Epoch draws: `user` (uniform users, the CF reference repositories) or `interaction`
    /// (every train interaction once, RecBole).
    #[arg(long)]
    sampler: Option<String>,
    /// Seed of the train/valid/test split when the data is not split already (RecBole ratio 8:1:1).
    #[arg(long)]
    split_seed: Option<u64>,
    /// Keep only interactions rated at least this before splitting.
    #[arg(long)]
    min_rating: Option<f32>,
}

macro_rules! merge {
    ($dst:ident, $src:ident, $($f:ident),*) => { $( if $src.$f.is_some() { $dst.$f = $src.$f.clone(); } )* };
}

impl TrainArgs {
    fn merged(flags: &TrainArgs) -> Result<TrainArgs> {
        let mut a = match &flags.config {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?;
                toml::from_str::<TrainArgs>(&text).map_err(|e| anyhow!("{}: {e}", p.display()))?
            }
            None => TrainArgs::default(),
        };
        merge!(
            a,
            flags,
            data,
            format,
            preset,
            sampler,
            model,
            features,
            encoder,
            pooling,
            projector,
            hidden_mult,
            loss,
            layers,
            dim,
            lr,
            batch_size,
            epochs,
            eval_every,
            patience,
            ks,
            seed,
            tau,
            n_neg,
            reg,
            adv_lr,
            adv_reg,
            eta_epochs,
            adv_interval,
            k_neg,
            adv_epochs,
            keep_prob,
            inv_tau,
            faithful,
            split_seed,
            min_rating
        );
        Ok(a)
    }

    /// The model configuration these options describe.
    fn resolve(&self) -> Result<CfConfig> {
        let mut c = match &self.preset {
            Some(p) => preset(p)
                .ok_or_else(|| anyhow!("unknown preset `{p}` (see `rudder cf presets`)"))?,
            None => CfConfig::new(ModelKind::Lightgcn, LossConfig::Bpr { reg: 1e-5 }),
        };
        if let Some(m) = &self.model {
            let kind = match m.as_str() {
                "mf" => ModelKind::Mf,
                "lightgcn" => ModelKind::Lightgcn,
                "alpharec" => ModelKind::Alpharec,
                "advdrop" => ModelKind::Advdrop,
                _ => bail!("unknown model `{m}` (mf, lightgcn, alpharec, advdrop)"),
            };
            if kind != c.model {
                c.n_layers = match kind {
                    ModelKind::Mf => 0,
                    ModelKind::Lightgcn => 3,
                    ModelKind::Alpharec | ModelKind::Advdrop => 2,
                };
                if kind == ModelKind::Advdrop && self.loss.is_none() {
                    c.loss = LossConfig::Bpr { reg: 1e-5 };
                }
                if kind == ModelKind::Alpharec && !c.loss.cosine() && self.loss.is_none() {
                    // AlphaRec trains with cosine InfoNCE (the reference's τ and N).
                    c.loss = LossConfig::Infonce {
                        tau: 0.15,
                        n_neg: 256,
                        reg: 0.0,
                    };
                }
            }
            c.model = kind;
        }
        if let Some(l) = &self.loss
            && l != c.loss.name()
        {
            c.loss = match l.as_str() {
                "bpr" => LossConfig::Bpr { reg: 1e-5 },
                "infonce" => LossConfig::Infonce {
                    tau: 0.2,
                    n_neg: 64,
                    reg: 1e-5,
                },
                "advinfonce" => LossConfig::Advinfonce(AdvConfig::default()),
                _ => bail!("unknown loss `{l}` (bpr, infonce, advinfonce)"),
            };
        }
        if let Some(v) = self.layers {
            if c.model == ModelKind::Mf && v > 0 {
                bail!("--layers applies to lightgcn; MF has no graph layers");
            }
            c.n_layers = v;
        }
        macro_rules! set { ($($f:ident => $g:ident),*) => { $( if let Some(v) = self.$f.clone() { c.$g = v; } )* } }
        if let Some(sm) = &self.sampler {
            c.sampler = match sm.as_str() {
                "user" => rudder_data::sampler::SampleMode::User,
                "interaction" => rudder_data::sampler::SampleMode::Interaction,
                _ => bail!("unknown sampler `{sm}` (user, interaction)"),
            };
        }
        set!(dim => dim, lr => lr, batch_size => batch_size, epochs => epochs, eval_every => eval_every, patience => patience, ks => ks, seed => seed);
        match &mut c.loss {
            LossConfig::Bpr { reg } => {
                if self.tau.is_some() || self.n_neg.is_some() {
                    bail!("--tau and --n-neg apply to infonce/advinfonce, not bpr");
                }
                if let Some(v) = self.reg {
                    *reg = v;
                }
            }
            LossConfig::Infonce { tau, n_neg, reg } => {
                if let Some(v) = self.tau {
                    *tau = v;
                }
                if let Some(v) = self.n_neg {
                    *n_neg = v;
                }
                if let Some(v) = self.reg {
                    *reg = v;
                }
            }
            LossConfig::Advinfonce(a) => {
                if let Some(v) = self.tau {
                    a.tau = v;
                }
                if let Some(v) = self.n_neg {
                    a.n_neg = v;
                }
                if let Some(v) = self.reg {
                    a.reg = v;
                }
                if let Some(v) = self.adv_lr {
                    a.adv_lr = v;
                }
                if let Some(v) = self.eta_epochs {
                    a.eta_epochs = v;
                }
                if let Some(v) = self.adv_interval {
                    a.adv_interval = v;
                }
                if let Some(v) = self.k_neg {
                    a.k_neg = v;
                }
                if let Some(v) = self.faithful {
                    a.faithful_reg_typo = v;
                    a.faithful_adv_reg = v;
                    a.faithful_negatives = v;
                }
                if let Some(v) = self.adv_reg {
                    a.adv_reg = v;
                }
            }
        }
        if let Some(f) = &self.features {
            c.alpharec.features = f.clone();
        }
        if let Some(e) = &self.encoder {
            c.alpharec.encoder = e.clone();
        }
        if let Some(p) = &self.projector {
            c.alpharec.projector = match p.as_str() {
                "mlp" => rudder_cf::alpharec::Projector::Mlp,
                "linear" => rudder_cf::alpharec::Projector::Linear,
                _ => bail!("unknown projector `{p}` (mlp, linear)"),
            };
        }
        if let Some(h) = self.hidden_mult {
            c.alpharec.hidden_mult = h;
        }
        if let Some(p) = &self.pooling {
            c.alpharec.pooling = match p.as_str() {
                "mean" => rudder_cf::features::Pooling::Mean,
                "last" => rudder_cf::features::Pooling::Last,
                _ => bail!("unknown pooling `{p}` (mean, last)"),
            };
        }
        if c.model == ModelKind::Alpharec {
            c.select_on_test = self.faithful.unwrap_or(false);
        } else if self.features.is_some()
            || self.encoder.is_some()
            || self.projector.is_some()
            || self.hidden_mult.is_some()
        {
            bail!("--features, --encoder, --projector and --hidden-mult apply to --model alpharec");
        }
        if c.model == ModelKind::Advdrop {
            let a = &mut c.advdrop;
            if let Some(v) = self.adv_lr {
                a.adv_lr = v;
            }
            if let Some(v) = self.adv_interval {
                a.interval = v;
            }
            if let Some(v) = self.adv_epochs {
                a.adv_epochs = v;
            }
            if let Some(v) = self.keep_prob {
                a.keep_prob = v;
            }
            if let Some(v) = self.inv_tau {
                a.inv_tau = v;
            }
            c.validate()?;
            return Ok(c);
        } else if self.adv_epochs.is_some() || self.keep_prob.is_some() || self.inv_tau.is_some() {
            bail!("--adv-epochs, --keep-prob and --inv-tau apply to --model advdrop");
        }
        if !matches!(c.loss, LossConfig::Advinfonce(_))
            && (self.adv_lr.is_some()
                || self.adv_reg.is_some()
                || self.eta_epochs.is_some()
                || self.adv_interval.is_some()
                || self.k_neg.is_some())
        {
            bail!("adversarial options apply to --loss advinfonce only");
        }
        c.validate()?;
        Ok(c)
    }

    /// Fully resolved, flat options (what the run folder records).
    fn resolved(&self, c: &CfConfig) -> TrainArgs {
        let mut r = TrainArgs {
            data: self.data.clone(),
            format: self.format.clone(),
            preset: None,
            model: Some(
                match c.model {
                    ModelKind::Mf => "mf",
                    ModelKind::Lightgcn => "lightgcn",
                    ModelKind::Alpharec => "alpharec",
                    ModelKind::Advdrop => "advdrop",
                }
                .into(),
            ),
            loss: Some(c.loss.name().into()),
            layers: Some(c.n_layers),
            dim: Some(c.dim),
            lr: Some(c.lr),
            batch_size: Some(c.batch_size),
            epochs: Some(c.epochs),
            eval_every: Some(c.eval_every),
            patience: Some(c.patience),
            ks: Some(c.ks.clone()),
            seed: Some(c.seed),
            sampler: Some(
                match c.sampler {
                    rudder_data::sampler::SampleMode::User => "user",
                    rudder_data::sampler::SampleMode::Interaction => "interaction",
                }
                .into(),
            ),
            split_seed: Some(self.split_seed.unwrap_or(2020)),
            min_rating: self.min_rating,
            ..Default::default()
        };
        if c.model == ModelKind::Alpharec {
            r.features = (!c.alpharec.features.is_empty()).then(|| c.alpharec.features.clone());
            r.encoder = Some(c.alpharec.encoder.clone());
            r.projector = Some(
                match c.alpharec.projector {
                    rudder_cf::alpharec::Projector::Mlp => "mlp",
                    rudder_cf::alpharec::Projector::Linear => "linear",
                }
                .into(),
            );
            r.hidden_mult = Some(c.alpharec.hidden_mult);
            r.pooling = Some(
                match c.alpharec.pooling {
                    rudder_cf::features::Pooling::Mean => "mean",
                    rudder_cf::features::Pooling::Last => "last",
                }
                .into(),
            );
            r.faithful = Some(c.select_on_test);
        }
        if c.model == ModelKind::Advdrop {
            r.adv_lr = Some(c.advdrop.adv_lr);
            r.adv_interval = Some(c.advdrop.interval);
            r.adv_epochs = Some(c.advdrop.adv_epochs);
            r.keep_prob = Some(c.advdrop.keep_prob);
            r.inv_tau = Some(c.advdrop.inv_tau);
        }
        match &c.loss {
            LossConfig::Bpr { reg } => r.reg = Some(*reg),
            LossConfig::Infonce { tau, n_neg, reg } => {
                r.tau = Some(*tau);
                r.n_neg = Some(*n_neg);
                r.reg = Some(*reg);
            }
            LossConfig::Advinfonce(a) => {
                r.tau = Some(a.tau);
                r.n_neg = Some(a.n_neg);
                r.reg = Some(a.reg);
                r.adv_lr = Some(a.adv_lr);
                r.eta_epochs = Some(a.eta_epochs);
                r.adv_interval = Some(a.adv_interval);
                r.k_neg = Some(a.k_neg);
                r.faithful =
                    Some(a.faithful_reg_typo && a.faithful_adv_reg && a.faithful_negatives);
                r.adv_reg = Some(a.adv_reg);
            }
        }
        r
    }
}

/// Load the data an options set names and make sure it is split.
pub fn load_split(
    data: &str,
    format: Option<&str>,
    min_rating: Option<f32>,
    split_seed: u64,
) -> Result<Dataset> {
    let fmt = format
        .map(|f| Format::parse(f).ok_or_else(|| anyhow!("unknown format `{f}`")))
        .transpose()?;
    let Loaded::Interactions(mut ds) = resolve::load(data, fmt, &Store::from_env())? else {
        bail!("`{data}` holds sequences or prompts, not user–item interactions");
    };
    if let Some(t) = min_rating {
        if ds.split.is_some() {
            bail!("--min-rating applies to unsplit data; `{data}` is already split");
        }
        ds = preprocess::implicit(&ds, t)?;
    }
    if ds.split.is_none() {
        ds = split(
            &ds,
            &SplitMethod::Ratio {
                ratios: [0.8, 0.1, 0.1],
            },
            split_seed,
        )?;
    }
    Ok(ds)
}

pub struct Bar {
    pub pb: ProgressBar,
    loss_sum: f64,
    n: usize,
    k: usize,
}

impl TrainObserver for Bar {
    fn resumed(&mut self, epochs_done: usize) {
        self.pb.set_position(epochs_done as u64);
        self.pb.reset_eta();
        self.pb.println(format!(
            "resuming from the checkpoint after epoch {epochs_done}"
        ));
    }
    fn epoch_start(&mut self, epoch: usize, _n_batches: usize) {
        self.loss_sum = 0.0;
        self.n = 0;
        self.pb.set_message(format!("epoch {}", epoch + 1));
    }
    fn batch_done(&mut self, loss: f64) {
        self.loss_sum += loss;
        self.n += 1;
        if self.n.is_multiple_of(8) {
            self.pb
                .set_message(format!("loss {:.4}", self.loss_sum / self.n as f64));
        }
    }
    fn epoch_done(&mut self, rec: &EpochRecord) {
        self.pb.inc(1);
        if let Some(v) = &rec.valid {
            let k = self.k;
            self.pb.println(format!(
                "epoch {:>4}  loss {:.4}  valid Recall@{k} {:.4}  NDCG@{k} {:.4}  ({:.2} s/epoch)",
                rec.epoch + 1,
                rec.loss,
                v.get(&format!("recall@{k}")).copied().unwrap_or(f64::NAN),
                v.get(&format!("ndcg@{k}")).copied().unwrap_or(f64::NAN),
                rec.seconds
            ));
        }
    }
}

pub fn progress_bar(epochs: usize, k: usize) -> Bar {
    Bar {
        pb: crate::progress::epochs(epochs as u64),
        loss_sum: 0.0,
        n: 0,
        k,
    }
}

pub fn run(cmd: CfCmd) -> Result<()> {
    match cmd {
        CfCmd::Train(mut flags) => {
            if let Some(run) = flags.resume.clone() {
                let cfg = run.join("config.toml");
                if !cfg.exists() {
                    bail!(
                        "{}: no config.toml, so not a run folder `rudder cf train` started",
                        run.display()
                    );
                }
                if !run.join(rudder_cf::trainer::CHECKPOINT).exists()
                    && run.join("summary.md").exists()
                {
                    bail!("{}: the run is complete; nothing to resume", run.display());
                }
                flags.config = Some(cfg);
                flags.out = Some(run);
            }
            let a = TrainArgs::merged(&flags)?;
            let out = flags
                .out
                .clone()
                .ok_or_else(|| anyhow!("--out RUN_DIR is required"))?;
            let data = a
                .data
                .clone()
                .ok_or_else(|| anyhow!("--data is required (a folder, an asset name, or synth)"))?;
            let cfg = a.resolve()?;
            let resolved = a.resolved(&cfg);
            let ds = load_split(
                &data,
                a.format.as_deref(),
                a.min_rating,
                resolved.split_seed.unwrap(),
            )?;
            let s = ds.split.as_ref().unwrap();
            println!(
                "{} × {} · train {} / valid {} / test {} · {} + {}",
                ds.n_users(),
                ds.n_items(),
                s.train.len(),
                s.valid.len(),
                s.test.len(),
                resolved.model.as_deref().unwrap(),
                cfg.loss.name()
            );
            let run = RunDir::create(&out)?;
            let cfg_text = toml::to_string_pretty(&resolved)?;
            let resuming = flags.resume.is_some();
            if !resuming {
                if run.path.join(rudder_cf::trainer::CHECKPOINT).exists() {
                    bail!(
                        "{} holds an interrupted run: continue it with `rudder cf train --resume \
                         {0}`, or choose another --out",
                        run.path.display()
                    );
                }
                // written first, so that an interrupted run can be resumed from its folder
                rudder_data::io::write_bytes_atomic(
                    &run.path.join("config.toml"),
                    cfg_text.as_bytes(),
                )?;
            }
            let inputs = model_inputs(&cfg, &ds, None)?;
            if let Some(f) = &inputs.item_features {
                save_features(&run.path, f, &ds)?;
            }
            let mut bar = progress_bar(cfg.epochs, cfg.selection_k());
            let ck = rudder_cf::Checkpointing {
                dir: Some(run.path.clone()),
                resume: resuming,
            };
            let report = train_checkpointed(&cfg, s, &inputs, &mut bar, &ck)?;
            bar.pb.finish_and_clear();
            write_run(&run.path, &data, Some(&cfg_text), &report)?;
            let _ = std::fs::remove_file(run.path.join(rudder_cf::trainer::CHECKPOINT));
            crate::plots::training_curves(&run.path, &report);
            if cfg.model == ModelKind::Advdrop {
                bias_diagnostic(&run.path, &cfg, s, &inputs, &report)?;
            }
            let summary = std::fs::read_to_string(run.path.join("summary.md"))?;
            println!("\n{summary}\nrun folder: {}", run.path.display());
            Ok(())
        }
        CfCmd::Eval {
            run,
            data,
            features,
        } => match data {
            Some(d) => zero_shot(&run, &d, features.as_deref()),
            None => eval(&run),
        },
        CfCmd::Recommend {
            run,
            user,
            k,
            intent,
            alpha,
        } => recommend(&run, &user, k, intent.as_deref(), alpha),
        CfCmd::Presets => {
            for (n, d) in PRESETS {
                println!("{n:<30} {d}");
            }
            Ok(())
        }
    }
}

/// AdvDrop: how the learned keep probabilities relate to item popularity (`bias.json` with the
/// Spearman correlations and per-item means, `bias.png`).
fn bias_diagnostic(
    dir: &Path,
    cfg: &CfConfig,
    s: &rudder_data::Split,
    inputs: &ModelInputs,
    report: &rudder_cf::TrainReport,
) -> Result<()> {
    let tensors: std::collections::HashMap<String, candle_core::Tensor> =
        report.params.iter().cloned().collect();
    let m = rudder_cf::model::restore(cfg, &s.train, inputs, &tensors, &candle_core::Device::Cpu)?;
    let Some(a) = m
        .as_any()
        .and_then(|x| x.downcast_ref::<rudder_cf::advdrop::AdvDrop>())
    else {
        return Ok(());
    };
    let b = a.bias_report()?;
    rudder_data::io::write_bytes_atomic(
        &dir.join("bias.json"),
        serde_json::to_string_pretty(&b)?.as_bytes(),
    )?;
    let pts = |f: fn(&(u32, usize, f64, f64)) -> f64| -> Vec<(f64, f64)> {
        b.items.iter().map(|r| ((r.1 as f64).ln(), f(r))).collect()
    };
    if let Err(e) = crate::plots::scatter(
        &dir.join("bias.png"),
        &format!(
            "edge keep probability vs item popularity (Spearman main {:.3}, dual {:.3})",
            b.spearman_main, b.spearman_dual
        ),
        "ln(train interactions of the item)",
        "mean keep probability of its edges",
        &[
            ("main view (1 - M)", pts(|r| r.2)),
            ("dual view (M)", pts(|r| r.3)),
        ],
    ) {
        tracing::warn!("bias plot skipped: {e}");
    }
    let mut md = std::fs::read_to_string(dir.join("summary.md")).unwrap_or_default();
    md.push_str(&format!(
        "\n## Bias diagnostic\n\nSpearman ρ between item popularity and the mean keep probability of its edges: main view {:.3}, dual view {:.3} ({} items; `bias.json`, `bias.png`).\n",
        b.spearman_main,
        b.spearman_dual,
        b.items.len()
    ));
    rudder_data::io::write_bytes_atomic(&dir.join("summary.md"), md.as_bytes())?;
    Ok(())
}

/// Item language features for AlphaRec (none for ID models): a features file (`--features`,
/// or the config's), else the dataset's titles through the configured encoder.
fn model_inputs(cfg: &CfConfig, ds: &Dataset, features: Option<&str>) -> Result<ModelInputs> {
    if cfg.model != ModelKind::Alpharec {
        return Ok(ModelInputs::default());
    }
    let file = features.unwrap_or(&cfg.alpharec.features);
    let t = if !file.is_empty() {
        rudder_cf::features::load_features(Path::new(file), ds)?
    } else {
        let enc = crate::lm_cmd::resolve_model(&cfg.alpharec.encoder)?;
        let pb = indicatif::ProgressBar::new(ds.n_items() as u64);
        pb.set_style(indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} item titles encoded [{elapsed} < {eta}]",
        )?);
        let t = rudder_cf::features::encode_titles(ds, &enc, cfg.alpharec.pooling, &mut |d, _| {
            pb.set_position(d as u64)
        })?;
        pb.finish_and_clear();
        t
    };
    Ok(ModelInputs {
        item_features: Some(t),
    })
}

/// The run's item features with their ids, so that eval and recommend need no re-encoding.
fn save_features(dir: &Path, t: &candle_core::Tensor, ds: &Dataset) -> Result<()> {
    let p = dir.join("item_features.safetensors");
    rudder_nn::checkpoint::save(&[("embeddings".to_string(), t.clone())], &p)?;
    let ids: Vec<&str> = (0..ds.n_items() as u32).map(|i| ds.items.ext(i)).collect();
    rudder_data::io::write_bytes_atomic(
        &dir.join("item_features.safetensors.json"),
        serde_json::json!({"ids": ids, "rows": ds.n_items(), "dim": t.dim(1)?})
            .to_string()
            .as_bytes(),
    )?;
    Ok(())
}

/// A trained run: its options, data and model.
struct TrainedRun {
    args: TrainArgs,
    cfg: CfConfig,
    ds: Dataset,
    model: Box<dyn rudder_cf::model::Backbone>,
    users: candle_core::Tensor,
    items: candle_core::Tensor,
}

/// A run folder's recorded options and the model configuration they resolve to.
fn read_run(run: &Path) -> Result<(TrainArgs, CfConfig)> {
    let cfg_path = run.join("config.toml");
    let text = std::fs::read_to_string(&cfg_path)
        .with_context(|| format!("reading {} (is this a run folder?)", cfg_path.display()))?;
    let args: TrainArgs =
        toml::from_str(&text).map_err(|e| anyhow!("{}: {e}", cfg_path.display()))?;
    let cfg = args.resolve()?;
    Ok((args, cfg))
}

/// A trained run for other commands (the Agent4Rec simulator): its configuration, data, a
/// scorer of its final embeddings, and the model inputs (for retraining on new data).
pub(crate) fn open_run(
    run: &Path,
) -> Result<(
    CfConfig,
    Dataset,
    rudder_cf::scorer::EmbeddingScorer,
    ModelInputs,
)> {
    let l = load_run(run)?;
    let sc = rudder_cf::scorer::EmbeddingScorer::new(&l.users, &l.items, l.cfg.loss.cosine())?;
    let saved = run.join("item_features.safetensors");
    let features = saved.exists().then(|| saved.to_string_lossy().into_owned());
    let inputs = model_inputs(&l.cfg, &l.ds, features.as_deref())?;
    Ok((l.cfg, l.ds, sc, inputs))
}

fn load_run(run: &Path) -> Result<TrainedRun> {
    let (args, cfg) = read_run(run)?;
    let data = args
        .data
        .clone()
        .ok_or_else(|| anyhow!("{}: no `data`", run.join("config.toml").display()))?;
    let ds = load_split(
        &data,
        args.format.as_deref(),
        args.min_rating,
        args.split_seed.unwrap_or(2020),
    )?;
    let saved = run.join("item_features.safetensors");
    let features = saved.exists().then(|| saved.to_string_lossy().into_owned());
    let (m, ds) = restore_on(run, &cfg, ds, features.as_deref())?;
    let (users, items) = m.forward()?;
    Ok(TrainedRun {
        args,
        cfg,
        ds,
        model: m,
        users,
        items,
    })
}

/// The run's trained weights on a dataset (its own, or another one for AlphaRec zero-shot).
fn restore_on(
    run: &Path,
    cfg: &CfConfig,
    ds: Dataset,
    features: Option<&str>,
) -> Result<(Box<dyn rudder_cf::model::Backbone>, Dataset)> {
    let ck = run.join("best.safetensors");
    let tensors = rudder_nn::checkpoint::load(&ck, &candle_core::Device::Cpu)
        .with_context(|| format!("reading {}", ck.display()))?;
    let inputs = model_inputs(cfg, &ds, features)?;
    let m = rudder_cf::model::restore(
        cfg,
        &ds.split.as_ref().unwrap().train,
        &inputs,
        &tensors,
        &candle_core::Device::Cpu,
    )?;
    Ok((m, ds))
}

/// Rank validation and every test set, print the table and write `<stem>.md` and
/// `<stem>.jsonl` in the run folder (`extra` fields go into every JSON line).
fn report(
    run: &Path,
    stem: &str,
    heading: &str,
    sc: &rudder_cf::scorer::EmbeddingScorer,
    s: &rudder_data::Split,
    cfg: &CfConfig,
    extra: &serde_json::Value,
) -> Result<()> {
    let k = cfg.selection_k();
    let mut md = format!(
        "# {heading}\n\n| split | Recall@{k} | NDCG@{k} | HR@{k} | Precision@{k} | MRR@{k} |\n|---|---|---|---|---|---|\n"
    );
    let mut results = Vec::new();
    if !s.valid.is_empty() {
        results.push(("valid".to_string(), evaluate_valid(sc, s, &cfg.ks)?));
    }
    results.extend(evaluate_tests(sc, s, &cfg.ks)?);
    let mut lines = String::new();
    for (name, r) in &results {
        md.push_str(&metrics_row(name, r, k));
        md.push('\n');
        let mut j = rudder_cf::trainer::metrics_json(r);
        j["split"] = name.clone().into();
        if let Some(o) = extra.as_object() {
            for (key, v) in o {
                j[key] = v.clone();
            }
        }
        lines.push_str(&j.to_string());
        lines.push('\n');
    }
    rudder_data::io::write_bytes_atomic(&run.join(format!("{stem}.jsonl")), lines.as_bytes())?;
    rudder_data::io::write_bytes_atomic(&run.join(format!("{stem}.md")), md.as_bytes())?;
    println!("{md}");
    Ok(())
}

/// AlphaRec zero-shot: the run's projector on another dataset's graph and item texts.
fn zero_shot(run: &Path, data: &str, features: Option<&str>) -> Result<()> {
    let (args, cfg) = read_run(run)?;
    if cfg.model != ModelKind::Alpharec {
        bail!(
            "only AlphaRec runs transfer to other datasets (this run is {:?}: its embeddings belong to its own ids)",
            cfg.model
        );
    }
    let ds = load_split(data, None, None, args.split_seed.unwrap_or(2020))?;
    let (m, ds) = restore_on(run, &cfg, ds, features)?;
    let (u, i) = m.forward()?;
    let sc = rudder_cf::scorer::EmbeddingScorer::new(&u, &i, true)?;
    let tag: String = data
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let heading = format!(
        "Zero-shot: {} on `{data}` ({} users × {} items)",
        run.display(),
        ds.n_users(),
        ds.n_items()
    );
    report(
        run,
        &format!("zero_shot_{tag}"),
        &heading,
        &sc,
        ds.split.as_ref().unwrap(),
        &cfg,
        &serde_json::json!({ "data": data }),
    )
}

fn eval(run: &Path) -> Result<()> {
    let l = load_run(run)?;
    let sc = rudder_cf::scorer::EmbeddingScorer::new(&l.users, &l.items, l.cfg.loss.cosine())?;
    let heading = format!("Evaluation of {}", run.display());
    report(
        run,
        "eval",
        &heading,
        &sc,
        l.ds.split.as_ref().unwrap(),
        &l.cfg,
        &serde_json::Value::Null,
    )
}

fn recommend(run: &Path, user: &str, k: usize, intent: Option<&str>, alpha: f64) -> Result<()> {
    let mut l = load_run(run)?;
    let u = l.ds.users.get(user).ok_or_else(|| {
        anyhow!(
            "user `{user}` is not in {} (ids are the data's own, e.g. `{}`)",
            l.args.data.as_deref().unwrap_or("?"),
            l.ds.users.ext(0)
        )
    })?;
    if let Some(text) = intent {
        let Some(a) = l
            .model
            .as_any()
            .and_then(|m| m.downcast_ref::<rudder_cf::alpharec::AlphaRec>())
        else {
            bail!("--intent needs an AlphaRec run (its projector reads text)");
        };
        if !(0.0..=1.0).contains(&alpha) {
            bail!("--alpha must lie in [0, 1]");
        }
        let enc = crate::lm_cmd::resolve_model(&l.cfg.alpharec.encoder)?;
        let q = rudder_cf::features::encode_text(&enc, text, l.cfg.alpharec.pooling)?;
        let shifted =
            rudder_cf::alpharec::shift_toward_intent(a, &l.users.get(u as usize)?, &q, alpha)?;
        l.users = l.users.slice_assign(
            &[u as usize..u as usize + 1, 0..shifted.dim(0)?],
            &shifted.unsqueeze(0)?,
        )?;
        println!("intent: \"{text}\" (weight {alpha})");
    }
    let s = l.ds.split.as_ref().unwrap();
    let sc = rudder_cf::scorer::EmbeddingScorer::new(&l.users, &l.items, l.cfg.loss.cosine())?;
    let n = l.ds.n_items();
    let mut row = vec![0f32; n];
    sc.score_users(&[u], n, &mut row);
    let mut seen = vec![false; n];
    for &i in s.train.items(u) {
        seen[i as usize] = true;
    }
    let top = top_k_row(&row, k, &seen);
    println!(
        "top {k} for user {user} ({} items seen in training):",
        seen.iter().filter(|&&x| x).count()
    );
    for (rank, i) in top.iter().enumerate() {
        let title =
            l.ds.item_table
                .title(*i)
                .map(|t| format!("  {t}"))
                .unwrap_or_default();
        let genres =
            l.ds.item_table
                .field("genres", *i)
                .filter(|g| !g.is_empty())
                .map(|g| format!("  [{g}]"))
                .unwrap_or_default();
        println!(
            "{:>3}. {:<12} {:>8.4}{title}{genres}",
            rank + 1,
            l.ds.items.ext(*i),
            row[*i as usize]
        );
    }
    Ok(())
}
