//! LLaRA/iLoRA sequence JSONL (`{"seq": [...10 ids...], "len_seq": n, "next": id}` per line;
//! MovieLens: `seq` holds `[item, rating]` pairs and `next` is `[item, rating]`), with
//! `id2name.txt` (`id::name`) or ML-100K `u.item` for item names; and S-DPO prompt JSON
//! (an array of `{historyList: "a::b", itemList: [...], trueSelection}`).

use crate::error::{DataError, Result};
use crate::io::{decode_latin1, numbered_lines, read_bytes, read_utf8, write_atomic};
use crate::sequences::{PromptDataset, PromptSample, SeqDataset, SeqSample};
use serde_json::Value;
use std::io::Write;
use std::path::Path;

fn as_id(v: &Value) -> Option<(u32, Option<i64>)> {
    match v {
        Value::Number(n) => n
            .as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .map(|x| (x, None)),
        Value::Array(a) if a.len() == 2 => {
            let i = a[0].as_u64().and_then(|x| u32::try_from(x).ok())?;
            let r = a[1].as_i64()?;
            Some((i, Some(r)))
        }
        _ => None,
    }
}

/// Parse one JSONL file of LLaRA samples. `n_items` (pad id) bounds the ids when known.
pub fn read_jsonl(path: &Path, n_items: Option<u32>) -> Result<Vec<SeqSample>> {
    let text = read_utf8(path)?;
    let mut out = Vec::new();
    for (ln, line) in numbered_lines(&text) {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line).map_err(|e| {
            DataError::parse(path, ln, format!("invalid JSON: {e} (truncated line?)"))
        })?;
        let obj = v
            .as_object()
            .ok_or_else(|| DataError::parse(path, ln, "expected a JSON object"))?;
        let get = |k: &str| {
            obj.get(k)
                .ok_or_else(|| DataError::parse(path, ln, format!("missing field `{k}`")))
        };
        let seq_v = get("seq")?
            .as_array()
            .ok_or_else(|| DataError::parse(path, ln, "`seq` is not an array"))?;
        let mut seq = Vec::with_capacity(seq_v.len());
        let mut rs = Vec::new();
        for (k, e) in seq_v.iter().enumerate() {
            let (i, r) = as_id(e).ok_or_else(|| {
                DataError::parse(
                    path,
                    ln,
                    format!("`seq[{k}]` = {e} is neither an item id nor an [item, rating] pair"),
                )
            })?;
            seq.push(i);
            if let Some(r) = r {
                rs.push(r);
            }
        }
        if !rs.is_empty() && rs.len() != seq.len() {
            return Err(DataError::parse(
                path,
                ln,
                "`seq` mixes plain ids and [item, rating] pairs",
            ));
        }
        let len_seq = get("len_seq")?
            .as_u64()
            .ok_or_else(|| DataError::parse(path, ln, "`len_seq` is not a non-negative integer"))?
            as usize;
        if len_seq > seq.len() {
            return Err(DataError::parse(
                path,
                ln,
                format!(
                    "`len_seq` = {len_seq} exceeds the length of `seq` ({})",
                    seq.len()
                ),
            ));
        }
        let nv = get("next")?;
        let (next, next_rating) = as_id(nv).ok_or_else(|| {
            DataError::parse(path, ln, format!("`next` = {nv} is not an item id"))
        })?;
        if let Some(n) = n_items {
            if let Some(bad) = seq.iter().chain(std::iter::once(&next)).find(|&&i| i > n) {
                return Err(DataError::parse(
                    path,
                    ln,
                    format!("item id {bad} out of range: {n} items (pad id {n})"),
                ));
            }
            if next == n {
                return Err(DataError::parse(
                    path,
                    ln,
                    format!("`next` is the pad id {n}"),
                ));
            }
        }
        out.push(SeqSample {
            seq,
            seq_ratings: (!rs.is_empty()).then_some(rs),
            len_seq,
            next,
            next_rating,
        });
    }
    if out.is_empty() {
        return Err(DataError::parse(path, 1, "empty file: no samples"));
    }
    Ok(out)
}

/// `id::name` lines; ids must be 0..n-1 in order.
pub fn read_id2name(path: &Path) -> Result<Vec<String>> {
    let text = read_utf8(path)?;
    let mut names = Vec::new();
    for (ln, line) in numbered_lines(&text) {
        if line.is_empty() {
            continue;
        }
        let (id, name) = line
            .split_once("::")
            .ok_or_else(|| DataError::parse(path, ln, "expected `id::name`"))?;
        let id: usize = id
            .trim()
            .parse()
            .map_err(|_| DataError::parse(path, ln, format!("id `{id}` is not an integer")))?;
        if id != names.len() {
            return Err(DataError::parse(
                path,
                ln,
                format!(
                    "ids must run 0..n-1 in order; found {id} where {} expected",
                    names.len()
                ),
            ));
        }
        names.push(name.to_string());
    }
    if names.is_empty() {
        return Err(DataError::parse(path, 1, "empty file: no items"));
    }
    Ok(names)
}

/// An ML-100K title as LLaRA's MovieLens loader shows it: the trailing ` (YYYY)` dropped, then a
/// trailing `, The` / `, A` / `, An` moved to the front ("Usual Suspects, The (1995)" → "The
/// Usual Suspects"). Other parentheses stay.
pub fn llara_movie_title(raw: &str) -> String {
    let t = raw.trim();
    let t = match t.strip_suffix(')').and_then(|x| x.rsplit_once(" (")) {
        Some((head, year)) if year.len() == 4 && year.bytes().all(|b| b.is_ascii_digit()) => head,
        _ => t,
    };
    for art in ["The", "A", "An"] {
        if let Some(head) = t.strip_suffix(&format!(", {art}")) {
            return format!("{art} {head}");
        }
    }
    t.to_string()
}

/// ML-100K `u.item` titles as LLaRA uses them: row id-1, cleaned by [`llara_movie_title`].
fn read_uitem_names(path: &Path) -> Result<Vec<String>> {
    let text = decode_latin1(&read_bytes(path)?);
    let mut names = Vec::new();
    for (ln, line) in numbered_lines(&text) {
        if line.is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split('|').collect();
        if f.len() < 2 {
            return Err(DataError::parse(path, ln, "expected `id|title|…`"));
        }
        let id: usize = f[0]
            .parse()
            .map_err(|_| DataError::parse(path, ln, format!("id `{}` is not an integer", f[0])))?;
        if id != names.len() + 1 {
            return Err(DataError::parse(
                path,
                ln,
                format!("ids must run 1..n in order; found {id}"),
            ));
        }
        names.push(llara_movie_title(f[1]));
    }
    Ok(names)
}

const SEQ_SPLITS: [&str; 3] = ["train", "val", "test"];

/// Read a LLaRA folder: `train/val/test.jsonl` (any present) and `id2name.txt` or `u.item`.
pub fn read_dir(dir: &Path) -> Result<SeqDataset> {
    let id2name = dir.join("id2name.txt");
    let uitem = dir.join("u.item");
    let item_names = if id2name.exists() {
        Some(read_id2name(&id2name)?)
    } else if uitem.exists() {
        Some(read_uitem_names(&uitem)?)
    } else {
        None
    };
    let n = item_names.as_ref().map(|v| v.len() as u32);
    let mut splits = Vec::new();
    for s in SEQ_SPLITS {
        let p = dir.join(format!("{s}.jsonl"));
        if p.exists() {
            splits.push((s.to_string(), read_jsonl(&p, n)?));
        }
    }
    if splits.is_empty() {
        return Err(DataError::invalid(
            dir,
            "no train.jsonl, val.jsonl or test.jsonl in this folder",
        ));
    }
    let name = dir
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(SeqDataset {
        name,
        splits,
        item_names,
    })
}

fn sample_json(s: &SeqSample) -> Value {
    let id = |i: u32, r: Option<i64>| match r {
        Some(r) => Value::from(vec![Value::from(i), Value::from(r)]),
        None => Value::from(i),
    };
    let seq: Vec<Value> = s
        .seq
        .iter()
        .enumerate()
        .map(|(k, &i)| id(i, s.seq_ratings.as_ref().map(|r| r[k])))
        .collect();
    let mut m = serde_json::Map::new();
    m.insert("seq".into(), Value::from(seq));
    m.insert("len_seq".into(), Value::from(s.len_seq));
    m.insert("next".into(), id(s.next, s.next_rating));
    Value::Object(m)
}

pub fn write_jsonl(path: &Path, samples: &[SeqSample]) -> Result<()> {
    write_atomic(path, |f| {
        for s in samples {
            writeln!(f, "{}", sample_json(s))?;
        }
        Ok(())
    })
}

/// Write a LLaRA folder (`<split>.jsonl` + `id2name.txt`).
pub fn write_dir(ds: &SeqDataset, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    for (name, samples) in &ds.splits {
        write_jsonl(&dir.join(format!("{name}.jsonl")), samples)?;
    }
    if let Some(names) = &ds.item_names {
        write_atomic(&dir.join("id2name.txt"), |f| {
            for (i, n) in names.iter().enumerate() {
                writeln!(f, "{i}::{}", n.replace('\n', " "))?;
            }
            Ok(())
        })?;
    }
    Ok(())
}

/// Read one S-DPO prompt JSON file.
pub fn read_prompts(path: &Path) -> Result<Vec<PromptSample>> {
    let text = read_utf8(path)?;
    if text.trim().is_empty() {
        return Err(DataError::parse(
            path,
            1,
            "empty file: expected a JSON array of prompt records",
        ));
    }
    let recs: Vec<PromptSample> = serde_json::from_str(&text)
        .map_err(|e| DataError::parse(path, e.line(), format!("{e}")))?;
    for (k, r) in recs.iter().enumerate() {
        if !r.candidates.contains(&r.target) {
            return Err(DataError::invalid(
                path,
                format!(
                    "record {k}: trueSelection `{}` is not in itemList",
                    r.target
                ),
            ));
        }
    }
    Ok(recs)
}

pub fn write_prompts(path: &Path, recs: &[PromptSample]) -> Result<()> {
    write_atomic(path, |f| {
        let mut ser = serde_json::Serializer::with_formatter(
            &mut *f,
            serde_json::ser::PrettyFormatter::with_indent(b"    "),
        );
        serde::Serialize::serialize(recs, &mut ser).map_err(std::io::Error::other)?;
        writeln!(f)
    })
}

/// Read an S-DPO folder (`train/val/test.json`, any present) or a single file.
pub fn read_prompt_dir(path: &Path) -> Result<PromptDataset> {
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    if path.is_file() {
        return Ok(PromptDataset {
            name,
            splits: vec![("test".into(), read_prompts(path)?)],
        });
    }
    let mut splits = Vec::new();
    for s in SEQ_SPLITS {
        let p = path.join(format!("{s}.json"));
        if p.exists() {
            splits.push((s.to_string(), read_prompts(&p)?));
        }
    }
    if splits.is_empty() {
        return Err(DataError::invalid(
            path,
            "no train.json, val.json or test.json in this folder",
        ));
    }
    Ok(PromptDataset { name, splits })
}

pub fn write_prompt_dir(ds: &PromptDataset, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    for (n, recs) in &ds.splits {
        write_prompts(&dir.join(format!("{n}.json")), recs)?;
    }
    Ok(())
}
