//! `rudder embed`: sentence embeddings of a text column with a BERT-family encoder.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;
use rudder_data::assets::Store;
use rudder_data::formats::Loaded;
use rudder_data::resolve;
use rudder_data::texts::{ColumnSpec, TextColumn, read_text_column};
use rudder_lm::bert::TextEncoder;

#[derive(Args)]
pub struct EmbedArgs {
    /// Encoder folder (sentence-transformers layout) or asset name.
    #[arg(long, short, default_value = "all-minilm-l6-v2")]
    pub model: String,
    /// Input: a file (RecBole .item, CSV/TSV with a header, MovieLens ::/| files, JSON lines),
    /// or any data argument (`ml-100k`, a dataset folder), whose item table is read: titles by
    /// default, or the field named by --column.
    #[arg(long, short)]
    pub input: String,
    /// Text column: a header name (e.g. movie_title, title) or a 0-based index. For a data
    /// argument, `title`/`movie_title` mean the item titles, anything else an item field.
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

/// The item texts of a dataset named by a data argument, in dense id order, with external ids.
fn item_texts(arg: &str, column: &str) -> Result<TextColumn> {
    let loaded = resolve::load(arg, None, &Store::from_env())?;
    let Loaded::Interactions(ds) = loaded else {
        bail!("`{arg}` holds sequences or prompts, not a dataset with an item table");
    };
    let t = &ds.item_table;
    let texts: Vec<String> = if matches!(column, "title" | "movie_title") {
        match &t.title {
            Some(v) => v.clone(),
            None => bail!("`{arg}`: the dataset has no item titles"),
        }
    } else {
        match t.fields.get(column) {
            Some(v) => v.clone(),
            None => bail!(
                "`{arg}`: no item field `{column}` (fields: title{})",
                t.fields
                    .keys()
                    .map(|k| format!(", {k}"))
                    .collect::<String>()
            ),
        }
    };
    let ids = (0..texts.len() as u32)
        .map(|i| ds.items.ext(i).to_string())
        .collect();
    Ok(TextColumn { ids, texts })
}

pub fn run(a: EmbedArgs) -> Result<()> {
    let input = PathBuf::from(&a.input);
    let col = if input.is_file() {
        read_text_column(
            &input,
            &ColumnSpec {
                column: a.column.clone(),
                id_column: a.id_column.clone(),
                sep: a.sep.clone(),
            },
        )?
    } else {
        item_texts(&a.input, &a.column)?
    };
    if col.texts.is_empty() {
        bail!("{}: no rows", a.input);
    }
    let dir = crate::lm_cmd::resolve_model(&a.model)?;
    let enc = TextEncoder::load(&dir)?;
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
