//! `rudder embed`: sentence embeddings of a text column with a BERT-family encoder.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;
use rudder_data::texts::{ColumnSpec, read_text_column};
use rudder_lm::bert::TextEncoder;

#[derive(Args)]
pub struct EmbedArgs {
    /// Encoder folder (sentence-transformers layout) or asset name.
    #[arg(long, short, default_value = "all-minilm-l6-v2")]
    pub model: String,
    /// Input file: RecBole .item, CSV/TSV with a header, MovieLens ::/| files, JSON lines.
    #[arg(long, short)]
    pub input: PathBuf,
    /// Text column: a header name (e.g. movie_title, title) or a 0-based index.
    #[arg(long, short, default_value = "title")]
    pub column: String,
    /// Id column (name or index); default: the first column.
    #[arg(long)]
    pub id_column: Option<String>,
    /// Field separator (default: detected).
    #[arg(long)]
    pub sep: Option<String>,
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Output: .safetensors (tensor "embeddings" [n, d]) or .npy; ids and settings go to
    /// `<out>.json`.
    #[arg(long, short)]
    pub out: PathBuf,
}

pub fn run(a: EmbedArgs) -> Result<()> {
    let dir = crate::lm_cmd::resolve_model(&a.model)?;
    let enc = TextEncoder::load(&dir)?;
    let col = read_text_column(
        &a.input,
        &ColumnSpec {
            column: a.column.clone(),
            id_column: a.id_column.clone(),
            sep: a.sep.clone(),
        },
    )?;
    if col.texts.is_empty() {
        bail!("{}: no rows", a.input.display());
    }
    let pb = indicatif::ProgressBar::new(col.texts.len() as u64);
    pb.set_style(indicatif::ProgressStyle::with_template(
        "{bar:30} {pos}/{len} texts [{elapsed} < {eta}]",
    )?);
    let refs: Vec<&str> = col.texts.iter().map(String::as_str).collect();
    let t0 = std::time::Instant::now();
    let emb = enc.embed(&refs, a.batch_size, &mut |n| pb.set_position(n as u64))?;
    pb.finish_and_clear();
    let dt = t0.elapsed().as_secs_f64();
    let is_npy = a.out.extension().is_some_and(|e| e == "npy");
    if is_npy {
        let tmp = a.out.with_extension("npy.partial");
        emb.write_npy(&tmp)?;
        std::fs::rename(&tmp, &a.out)?;
    } else {
        rudder_nn::checkpoint::save(&[("embeddings".to_string(), emb.clone())], &a.out)?;
    }
    let mut side = a.out.as_os_str().to_owned();
    side.push(".json");
    let index = serde_json::json!({
        "model": dir, "input": a.input, "column": a.column, "rows": col.texts.len(),
        "dim": enc.dim(), "normalized": enc.normalize, "max_tokens": enc.max_len, "ids": col.ids,
    });
    rudder_data::io::write_bytes_atomic(
        &PathBuf::from(side),
        serde_json::to_string_pretty(&index)?.as_bytes(),
    )?;
    eprintln!(
        "embedded {} texts ({}-d) in {:.2} s ({:.0} texts/s) → {}",
        col.texts.len(),
        enc.dim(),
        dt,
        col.texts.len() as f64 / dt,
        a.out.display()
    );
    Ok(())
}
