use crate::runs::RunDir;
use anyhow::{Result, bail};
use clap::Args;
use rudder_cf::trainer::{metrics_json, metrics_row};
use rudder_data::assets::Store;
use rudder_data::eval::{EvalConfig, Evaluator, Popularity, RandomScorer, Scorer};
use rudder_data::formats::Loaded;
use rudder_data::resolve::{self, DataRef};
use rudder_data::split::{SplitMethod, split};
use rudder_data::synth::SynthWorld;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args, Serialize)]
pub struct DemoArgs {
    /// Dataset: `synth` (embedded world), a fetched asset such as ml-100k, or a folder.
    #[arg(long, default_value = "synth")]
    data: String,
    /// Run folder.
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    /// Split seed.
    #[arg(long, default_value_t = 2020)]
    seed: u64,
    /// Cut-offs.
    #[arg(long, value_delimiter = ',', default_values_t = [10, 20])]
    ks: Vec<usize>,
    /// Split the table reports: test (train+valid masked) or valid (train masked).
    #[arg(long, default_value = "test")]
    eval_split: String,
    /// Training epochs of each model (0: baselines only).
    #[arg(long, default_value_t = 60)]
    epochs: usize,
    /// Learning rate of each model.
    #[arg(long, default_value_t = 5e-3)]
    lr: f64,
}

pub fn run(a: DemoArgs) -> Result<()> {
    let store = Store::from_env();
    let started = Instant::now();
    let (ds, world) = match resolve::resolve(&a.data, &store)? {
        DataRef::Synth(cfg) => {
            let w = SynthWorld::generate(&cfg);
            (w.dataset.clone(), Some(w))
        }
        _ => match resolve::load(&a.data, None, &store)? {
            Loaded::Interactions(d) => (d, None),
            _ => bail!("`{}` does not hold user–item interactions", a.data),
        },
    };
    let ds = if ds.split.is_some() {
        ds
    } else {
        split(
            &ds,
            &SplitMethod::Ratio {
                ratios: [0.8, 0.1, 0.1],
            },
            a.seed,
        )?
    };
    let s = ds.split.as_ref().unwrap();
    let ev = match a.eval_split.as_str() {
        "test" => Evaluator::new(&s.test).mask(&s.train).mask(&s.valid),
        "valid" => Evaluator::new(&s.valid).mask(&s.train),
        other => bail!("--eval-split must be test or valid, not `{other}`"),
    };
    let cfg = EvalConfig {
        ks: a.ks.clone(),
        ..Default::default()
    };
    let pop = Popularity::new(&s.train);
    let rnd = RandomScorer { seed: a.seed };
    let mut scorers: Vec<(&str, Box<dyn Scorer + '_>)> =
        vec![("random", Box::new(rnd)), ("most-popular", Box::new(pop))];
    if let Some(w) = &world {
        scorers.push(("oracle (true tastes)", Box::new(w.oracle())));
    }
    let run = RunDir::create(&a.out)?;
    run.write_config(&a)?;
    let mut lines = Vec::new();
    let kmax = *a.ks.iter().max().unwrap_or(&20);
    // trained models: MF and LightGCN × BPR, InfoNCE, AdvInfoNCE
    let mut trained = Vec::new();
    if a.epochs > 0 {
        use rudder_cf::config::AdvConfig;
        use rudder_cf::{CfConfig, LossConfig, ModelKind};
        let losses = [
            LossConfig::Bpr { reg: 1e-5 },
            LossConfig::Infonce {
                tau: 0.2,
                n_neg: 64,
                reg: 1e-5,
            },
            LossConfig::Advinfonce(AdvConfig {
                tau: 0.2,
                n_neg: 64,
                adv_lr: 1e-3,
                eta_epochs: 6,
                adv_interval: 5,
                ..AdvConfig::default()
            }),
        ];
        let runs: Vec<(ModelKind, LossConfig)> = [ModelKind::Mf, ModelKind::Lightgcn]
            .into_iter()
            .flat_map(|m| losses.iter().cloned().map(move |l| (m, l)))
            .collect();
        let pb = crate::progress::epochs((runs.len() * a.epochs) as u64);
        struct Tick<'p>(&'p indicatif::ProgressBar);
        impl rudder_cf::TrainObserver for Tick<'_> {
            fn epoch_done(&mut self, _r: &rudder_cf::trainer::EpochRecord) {
                self.0.inc(1);
            }
        }
        for (m, l) in runs {
            let mut cfg = CfConfig::new(m, l);
            cfg.n_layers = if m == ModelKind::Lightgcn { 2 } else { 0 };
            cfg.epochs = a.epochs;
            cfg.lr = a.lr;
            cfg.batch_size = 2048;
            cfg.eval_every = 5;
            cfg.patience = 4;
            cfg.ks = a.ks.clone();
            cfg.seed = a.seed;
            let name = format!(
                "{} + {}",
                if m == ModelKind::Mf { "MF" } else { "LightGCN" },
                cfg.loss.name()
            );
            pb.set_message(name.clone());
            let t = Instant::now();
            let report = rudder_cf::train(&cfg, s, &mut Tick(&pb))?;
            pb.inc((a.epochs - report.history.len()) as u64);
            let folder = a.out.join(name.replace(" + ", "-").to_lowercase());
            rudder_cf::trainer::write_run(&folder, &a.data, None, &report)?;
            crate::plots::training_curves(&folder, &report);
            trained.push((name, report, t.elapsed().as_secs_f64()));
        }
        pb.finish_and_clear();
    }
    let mut table = format!(
        "| model | Recall@{kmax} | NDCG@{kmax} | HR@{kmax} | Precision@{kmax} | MRR@{kmax} | eval s |\n|---|---|---|---|---|---|---|\n"
    );
    for (name, sc) in &scorers {
        let t = Instant::now();
        let r = ev.run(sc.as_ref(), &cfg)?;
        let secs = t.elapsed().as_secs_f64();
        table.push_str(&format!("{} {secs:.2} |\n", metrics_row(name, &r, kmax)));
        let mut m = metrics_json(&r);
        m["model"] = (*name).into();
        m["split"] = a.eval_split.clone().into();
        m["eval_seconds"] = secs.into();
        lines.push(m);
    }
    for (name, report, secs) in &trained {
        let r = if a.eval_split == "valid" {
            report.best_valid.as_ref().unwrap_or(&report.tests[0].1)
        } else {
            &report.tests[0].1
        };
        table.push_str(&format!(
            "{} {:.2} |\n",
            metrics_row(name, r, kmax),
            report.mean_eval_seconds().unwrap_or(0.0)
        ));
        let mut m = metrics_json(r);
        m["model"] = name.clone().into();
        m["split"] = a.eval_split.clone().into();
        m["train_seconds"] = (*secs).into();
        m["epochs"] = report.history.len().into();
        m["best_epoch"] = report.best_epoch.into();
        lines.push(m);
    }
    run.write_metrics(&lines)?;
    let st = rudder_data::stats::interaction_stats(&ds);
    let summary = format!(
        "# rudder demo on `{}`\n\n{} users × {} items, {} interactions; split: {} train / {} valid / {} test.\n\n\
         Full ranking over all items on the {} split (other splits masked), {} users.\n\n{table}\n\
         Trained models select their epoch on validation Recall@{kmax} (evaluated every 5 epochs) and \
         are tested once; each has its own run folder here.\n\n\
         Finished in {:.1} s.\n",
        ds.name,
        st.users,
        st.items,
        st.interactions,
        s.train.len(),
        s.valid.len(),
        s.test.len(),
        a.eval_split,
        lines.first().and_then(|l| l["users"].as_u64()).unwrap_or(0),
        started.elapsed().as_secs_f64()
    );
    run.write_summary(&summary)?;
    println!("{summary}");
    println!("run folder: {}", a.out.display());
    Ok(())
}
