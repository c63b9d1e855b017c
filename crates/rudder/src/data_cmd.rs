use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand};
use rudder_data::assets::Store;
use rudder_data::formats::{self, Format, Loaded};
use rudder_data::preprocess;
use rudder_data::resolve;
use rudder_data::split::{SplitMethod, split};
use rudder_data::stats;
use rudder_data::synth::{SynthConfig, SynthWorld};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum DataCmd {
    /// Generate the synthetic world (users with genre tastes, titled items, popularity skew,
    /// ratings, timestamps). Without --out, prints its statistics.
    Synth(SynthArgs),
    /// Print statistics of a dataset (users, items, interactions, density, degree
    /// distributions, ratings, time range, metadata, splits).
    Stats {
        /// Folder/file in any supported format, a fetched asset name, or `synth`.
        data: String,
        #[command(flatten)]
        fmt: FormatArg,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Convert between formats (interactions: lightgcn ↔ atomic, from raw MovieLens too;
    /// sequences: llara; prompts: sdpo).
    Convert {
        data: String,
        #[command(flatten)]
        fmt: FormatArg,
        /// Output format: lightgcn, atomic, llara or sdpo.
        #[arg(long)]
        to: String,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
    },
    /// Preprocess (rating threshold, k-core) and split into train/valid/test, seeded.
    Split(SplitArgs),
}

#[derive(Args)]
pub struct FormatArg {
    /// Input format when detection is not wanted: lightgcn, atomic, ml-100k, ml-1m, llara, sdpo.
    #[arg(long = "format")]
    format: Option<String>,
}

impl FormatArg {
    fn get(&self) -> Result<Option<Format>> {
        self.format.as_deref().map(parse_format).transpose()
    }
}

fn parse_format(s: &str) -> Result<Format> {
    Format::parse(s).ok_or_else(|| {
        anyhow!(
            "unknown format `{s}` (known: {})",
            Format::ALL
                .iter()
                .map(|f| f.name())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

#[derive(Args)]
pub struct SynthArgs {
    /// Write the world here (a folder); otherwise only print statistics.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Output format: atomic (keeps ratings, timestamps, titles) or lightgcn.
    #[arg(long, default_value = "atomic")]
    to: String,
    #[arg(long, default_value_t = SynthConfig::default().n_users)]
    users: usize,
    #[arg(long, default_value_t = SynthConfig::default().n_items)]
    items: usize,
    /// Genres used (1–18).
    #[arg(long, default_value_t = SynthConfig::default().n_genres)]
    genres: usize,
    /// Mean interactions per user.
    #[arg(long, default_value_t = SynthConfig::default().mean_interactions)]
    mean_interactions: f64,
    /// Zipf exponent of item popularity.
    #[arg(long, default_value_t = SynthConfig::default().pop_exponent)]
    pop_exponent: f64,
    #[arg(long, default_value_t = SynthConfig::default().seed)]
    seed: u64,
}

#[derive(Args)]
pub struct SplitArgs {
    data: String,
    #[command(flatten)]
    fmt: FormatArg,
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
    /// Output format: lightgcn (train/valid/test.txt + id lists) or atomic (RecBole benchmark
    /// files .train/.valid/.test.inter).
    #[arg(long, default_value = "lightgcn")]
    to: String,
    /// ratio (per user, random), loo (per user, leave the latest out), temporal (global time cut).
    #[arg(long, default_value = "ratio")]
    method: String,
    /// Train, valid, test fractions for ratio and temporal splits.
    #[arg(long, value_delimiter = ',', num_args = 3, default_values_t = [0.8, 0.1, 0.1])]
    ratios: Vec<f64>,
    #[arg(long, default_value_t = 2020)]
    seed: u64,
    /// Keep only interactions rated at least this (implicit feedback), e.g. 4.
    #[arg(long)]
    min_rating: Option<f32>,
    /// k-core filter: drop users and items with fewer than K interactions (iterated).
    #[arg(long)]
    kcore: Option<usize>,
    /// Also carve out a popularity-shifted OOD test set (`test_ood`) of this fraction of all
    /// interactions, drawn ∝ popularity^(−gamma), before splitting the rest.
    #[arg(long)]
    ood_fraction: Option<f64>,
    /// Strength of the OOD popularity shift.
    #[arg(long, default_value_t = 1.0)]
    ood_gamma: f64,
}

fn store() -> Store {
    Store::from_env()
}

pub fn run(cmd: DataCmd) -> Result<()> {
    match cmd {
        DataCmd::Synth(a) => synth(a),
        DataCmd::Stats { data, fmt, json } => {
            let pb = crate::progress::spinner(&format!("reading {data}"));
            let loaded = resolve::load(&data, fmt.get()?, &store());
            pb.finish_and_clear();
            let loaded = loaded?;
            let (text, js) = stats::describe(&loaded);
            if json {
                println!("{}", serde_json::to_string_pretty(&js)?);
            } else {
                println!("{text}");
            }
            Ok(())
        }
        DataCmd::Convert { data, fmt, to, out } => {
            let to = parse_format(&to)?;
            let loaded = resolve::load(&data, fmt.get()?, &store())?;
            formats::save(&loaded, to, &out)?;
            println!("wrote {} ({to}) to {}", data, out.display());
            Ok(())
        }
        DataCmd::Split(a) => split_cmd(a),
    }
}

fn synth(a: SynthArgs) -> Result<()> {
    if a.users == 0 || a.items < 10 {
        bail!("--users must be positive and --items at least 10");
    }
    let cfg = SynthConfig {
        n_users: a.users,
        n_items: a.items,
        n_genres: a.genres,
        mean_interactions: a.mean_interactions,
        pop_exponent: a.pop_exponent,
        seed: a.seed,
        ..Default::default()
    };
    let world = SynthWorld::generate(&cfg);
    println!("{}", stats::interaction_stats(&world.dataset));
    if let Some(out) = a.out {
        let to = parse_format(&a.to)?;
        formats::save(&Loaded::Interactions(world.dataset), to, &out)?;
        let cfg_text = toml::to_string_pretty(&cfg)?;
        rudder_data::io::write_bytes_atomic(&out.join("synth.toml"), cfg_text.as_bytes())?;
        println!("\nwrote the synthetic world ({to}) to {}", out.display());
    }
    Ok(())
}

fn split_cmd(a: SplitArgs) -> Result<()> {
    let to = parse_format(&a.to)?;
    if !matches!(to, Format::Lightgcn | Format::Atomic) {
        bail!("split output must be lightgcn or atomic, not {to}");
    }
    let ratios: [f64; 3] = a
        .ratios
        .clone()
        .try_into()
        .map_err(|_| anyhow!("--ratios takes three numbers"))?;
    let method = SplitMethod::parse(&a.method, ratios)
        .ok_or_else(|| anyhow!("unknown split method `{}` (ratio, loo, temporal)", a.method))?;
    let loaded = resolve::load(&a.data, a.fmt.get()?, &store())?;
    let Loaded::Interactions(mut ds) = loaded else {
        bail!(
            "`{}` holds sequences or prompts; only interaction data can be split",
            a.data
        );
    };
    let before = ds.interactions.len();
    if let Some(t) = a.min_rating {
        ds = preprocess::implicit(&ds, t)?;
        if ds.interactions.is_empty() {
            bail!(
                "`{}`: no interaction is rated at least {t} (--min-rating); nothing to split",
                a.data
            );
        }
    }
    if let Some(k) = a.kcore {
        let n = ds.interactions.len();
        ds = preprocess::kcore(&ds, k, k);
        if ds.interactions.is_empty() {
            bail!(
                "`{}`: the {k}-core (--kcore {k}) is empty: no set of users and items with at \
                 least {k} interactions each exists among its {n} interactions; use a smaller k",
                a.data
            );
        }
    }
    if ds.interactions.len() < before {
        eprintln!(
            "filters kept {} of {before} interactions ({:.1}%)",
            ds.interactions.len(),
            100.0 * ds.interactions.len() as f64 / before.max(1) as f64
        );
    }
    let ds = match a.ood_fraction {
        Some(f) => rudder_data::split::split_with_ood(&ds, &method, f, a.ood_gamma, a.seed),
        None => split(&ds, &method, a.seed),
    }
    .with_context(|| format!("splitting {}", a.data))?;
    println!("{}", stats::interaction_stats(&ds));
    formats::save(&Loaded::Interactions(ds), to, &a.out)?;
    println!("\nwrote the split ({to}) to {}", a.out.display());
    Ok(())
}
