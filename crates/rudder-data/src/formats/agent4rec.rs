//! Agent4Rec's MovieLens-1M side files (dense ids, UTF-8 CSV with a header):
//! `movie_detail.csv` (`movie_id,title,genres,rating,summary`), `user_statistic.csv`
//! (`user_id,activity,diversity,conformity`, levels 1–3) and `personas.csv`
//! (`taste,reason,high_rating,low_rating`, row k = user k).

use crate::dataset::Table;
use crate::error::{DataError, Result};
use std::path::Path;

struct Csv {
    header: Vec<String>,
    rows: Vec<(usize, Vec<String>)>,
}

fn read_csv(path: &Path, required: &[&str]) -> Result<Csv> {
    let bytes = crate::io::read_bytes(path)?;
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(DataError::parse(
            path,
            1,
            "empty file: expected a header line",
        ));
    }
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(false)
        .from_reader(&bytes[..]);
    let header: Vec<String> = rdr
        .headers()
        .map_err(|e| csv_err(path, e))?
        .iter()
        .map(|h| h.trim().to_string())
        .collect();
    for r in required {
        if !header.iter().any(|h| h == r) {
            return Err(DataError::parse(
                path,
                1,
                format!("missing column `{r}` (header has: {})", header.join(", ")),
            ));
        }
    }
    let mut rows = Vec::new();
    for rec in rdr.records() {
        let rec = rec.map_err(|e| csv_err(path, e))?;
        let line = rec.position().map_or(0, |p| p.line() as usize);
        rows.push((line, rec.iter().map(str::to_string).collect()));
    }
    Ok(Csv { header, rows })
}

fn csv_err(path: &Path, e: csv::Error) -> DataError {
    let line = e.position().map_or(0, |p| p.line() as usize);
    let reason = match e.kind() {
        csv::ErrorKind::Utf8 { .. } => "invalid UTF-8; this file must be UTF-8".to_string(),
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => {
            format!("expected {expected_len} fields, found {len} (truncated line?)")
        }
        _ => e.to_string(),
    };
    DataError::parse(path, line, reason)
}

impl Csv {
    fn col(&self, name: &str) -> usize {
        self.header.iter().position(|h| h == name).expect("checked")
    }
}

/// `movie_detail.csv` as an item table indexed by `movie_id` (must be dense: 0..n-1).
/// Returns the table and the number of items.
pub fn read_movie_detail(path: &Path) -> Result<(Table, usize)> {
    let csv = read_csv(path, &["movie_id", "title"])?;
    let idc = csv.col("movie_id");
    let tc = csv.col("title");
    let mut ids = Vec::with_capacity(csv.rows.len());
    for (ln, r) in &csv.rows {
        let id: usize = r[idc].trim().parse().map_err(|_| {
            DataError::parse(
                path,
                *ln,
                format!("movie_id `{}` is not a non-negative integer", r[idc]),
            )
        })?;
        ids.push(id);
    }
    let n = ids.iter().map(|&i| i + 1).max().unwrap_or(0);
    if n > crate::ids::dense_limit(ids.len()) {
        let k = ids.iter().position(|&i| i + 1 == n).unwrap_or(0);
        return Err(DataError::parse(
            path,
            csv.rows[k].0,
            format!(
                "movie_id {} is far above the {} rows of the file: movie ids must be dense row \
                 indices 0..n-1",
                n - 1,
                ids.len()
            ),
        ));
    }
    let mut seen = vec![0usize; n];
    for (k, &id) in ids.iter().enumerate() {
        if seen[id] != 0 {
            return Err(DataError::parse(
                path,
                csv.rows[k].0,
                format!("duplicate movie_id {id} (first on line {})", seen[id]),
            ));
        }
        seen[id] = csv.rows[k].0;
    }
    let mut t = Table {
        title: Some(vec![String::new(); n]),
        ..Default::default()
    };
    for (c, name) in csv.header.iter().enumerate() {
        if c == idc || c == tc {
            continue;
        }
        let mut col = vec![String::new(); n];
        for (k, (_, r)) in csv.rows.iter().enumerate() {
            col[ids[k]] = r[c].clone();
        }
        t.fields.insert(name.clone(), col);
    }
    let title = t.title.as_mut().unwrap();
    for (k, (_, r)) in csv.rows.iter().enumerate() {
        title[ids[k]] = r[tc].clone();
    }
    Ok((t, n))
}

/// Attach `user_statistic.csv` and `personas.csv` from `dir` (when present) to a user table.
pub fn attach_user_files(dir: &Path, n_users: usize, table: &mut Table) -> Result<()> {
    let stat = dir.join("user_statistic.csv");
    if stat.exists() {
        let csv = read_csv(&stat, &["user_id"])?;
        let idc = csv.col("user_id");
        let mut cols: Vec<Vec<String>> = vec![vec![String::new(); n_users]; csv.header.len()];
        let mut seen = vec![false; n_users];
        for (ln, r) in &csv.rows {
            let u: usize = r[idc].trim().parse().map_err(|_| {
                DataError::parse(
                    &stat,
                    *ln,
                    format!("user_id `{}` is not a non-negative integer", r[idc]),
                )
            })?;
            if u >= n_users {
                return Err(DataError::parse(
                    &stat,
                    *ln,
                    format!("user_id {u} out of range: the dataset has {n_users} users"),
                ));
            }
            if std::mem::replace(&mut seen[u], true) {
                return Err(DataError::parse(
                    &stat,
                    *ln,
                    format!("duplicate user_id {u}"),
                ));
            }
            for (c, v) in r.iter().enumerate() {
                cols[c][u] = v.clone();
            }
        }
        for (c, name) in csv.header.iter().enumerate() {
            if c != idc {
                table
                    .fields
                    .insert(name.clone(), std::mem::take(&mut cols[c]));
            }
        }
    }
    let personas = dir.join("personas.csv");
    if personas.exists() {
        let csv = read_csv(&personas, &[])?;
        if csv.rows.len() > n_users {
            return Err(DataError::parse(
                &personas,
                csv.rows[n_users].0,
                format!(
                    "{} persona rows but the dataset has {n_users} users (row k = user k)",
                    csv.rows.len()
                ),
            ));
        }
        for (c, name) in csv.header.iter().enumerate() {
            let mut col = vec![String::new(); n_users];
            for (u, (_, r)) in csv.rows.iter().enumerate() {
                col[u] = r[c].trim().to_string();
            }
            table.fields.insert(format!("persona_{name}"), col);
        }
    }
    Ok(())
}
