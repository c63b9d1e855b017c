//! RecBole atomic files: tab-separated `.inter`, `.item`, `.user` with a typed header
//! (`user_id:token␉item_id:token␉rating:float␉timestamp:float`, ␉ standing for a tab).
//! Types: `token`, `token_seq`, `float`, `float_seq`. UTF-8, LF or CRLF.

use crate::builder::{DatasetBuilder, MetaRows};
use crate::dataset::{Dataset, Table};
use crate::error::{DataError, Result};
use crate::ids::IdMap;
use crate::io::{numbered_lines, read_utf8, write_atomic};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// A parsed atomic file: column names, types and rows (with their line numbers).
pub struct AtomicTable {
    pub path: PathBuf,
    pub names: Vec<String>,
    pub types: Vec<String>,
    pub rows: Vec<(usize, Vec<String>)>,
}

const TYPES: [&str; 4] = ["token", "token_seq", "float", "float_seq"];

impl AtomicTable {
    pub fn read(path: &Path) -> Result<AtomicTable> {
        let text = read_utf8(path)?;
        let mut lines = numbered_lines(&text);
        let (hl, header) = lines
            .next()
            .ok_or_else(|| DataError::parse(path, 1, "empty file: expected a header line"))?;
        let mut names = Vec::new();
        let mut types = Vec::new();
        for (k, col) in header.split('\t').enumerate() {
            let (n, t) = col.split_once(':').ok_or_else(|| {
                DataError::parse(
                    path,
                    hl,
                    format!("header column {} `{col}` is not `name:type`", k + 1),
                )
            })?;
            if !TYPES.contains(&t) {
                return Err(DataError::parse(
                    path,
                    hl,
                    format!(
                        "header column `{col}`: unknown type `{t}` (expected one of {TYPES:?})"
                    ),
                ));
            }
            if names.iter().any(|x| x == n) {
                return Err(DataError::parse(
                    path,
                    hl,
                    format!("duplicate column `{n}`"),
                ));
            }
            names.push(n.to_string());
            types.push(t.to_string());
        }
        let mut rows = Vec::new();
        for (ln, line) in lines {
            if line.is_empty() {
                continue;
            }
            let cells: Vec<String> = line.split('\t').map(str::to_string).collect();
            if cells.len() != names.len() {
                return Err(DataError::parse(
                    path,
                    ln,
                    format!(
                        "expected {} tab-separated columns ({}), found {} (truncated line?)",
                        names.len(),
                        names.join(", "),
                        cells.len()
                    ),
                ));
            }
            for (k, c) in cells.iter().enumerate() {
                if types[k] == "float" && !c.is_empty() && c.trim().parse::<f64>().is_err() {
                    return Err(DataError::parse(
                        path,
                        ln,
                        format!("column `{}` is a float but holds `{c}`", names[k]),
                    ));
                }
            }
            rows.push((ln, cells));
        }
        Ok(AtomicTable {
            path: path.to_path_buf(),
            names,
            types,
            rows,
        })
    }

    pub fn column(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    fn require(&self, name: &str) -> Result<usize> {
        self.column(name).ok_or_else(|| {
            DataError::parse(
                &self.path,
                1,
                format!(
                    "missing column `{name}` (header has: {})",
                    self.names.join(", ")
                ),
            )
        })
    }

    /// Metadata rows keyed by `id_col`; the first of `title_cols` present becomes the title.
    fn meta(&self, id_col: &str, title_cols: &[&str]) -> Result<MetaRows> {
        let idc = self.require(id_col)?;
        let tc = title_cols.iter().find_map(|c| self.column(c));
        let mut m = MetaRows {
            ids: self.rows.iter().map(|(_, r)| r[idc].clone()).collect(),
            title: tc.map(|c| self.rows.iter().map(|(_, r)| r[c].clone()).collect()),
            fields: BTreeMap::new(),
        };
        for (k, n) in self.names.iter().enumerate() {
            if k != idc && Some(k) != tc {
                m.fields.insert(
                    n.clone(),
                    self.rows.iter().map(|(_, r)| r[k].clone()).collect(),
                );
            }
        }
        if let Some((ln, _)) = self.rows.iter().find(|(_, r)| r[idc].is_empty()) {
            return Err(DataError::parse(
                &self.path,
                *ln,
                format!("empty `{id_col}`"),
            ));
        }
        m.check_unique(&self.path, |row| self.rows[row].0)?;
        Ok(m)
    }
}

/// Read a metadata table (`.item`/`.user`) keyed by `id_col`.
pub fn read_meta(path: &Path, id_col: &str, title_cols: &[&str]) -> Result<MetaRows> {
    AtomicTable::read(path)?.meta(id_col, title_cols)
}

/// Title columns recognised in `.item` files.
pub const TITLE_COLUMNS: [&str; 4] = ["title", "movie_title", "name", "item_name"];

/// RecBole benchmark split files: `<stem>.train.inter`, `<stem>.valid.inter`, `<stem>.test.inter`.
pub const SPLIT_PARTS: [&str; 3] = ["train", "valid", "test"];

/// Find `<stem>.inter` in a folder (benchmark split files `<stem>.train.inter` are skipped).
pub fn find_inter(dir: &Path) -> Result<PathBuf> {
    let mut found = Vec::new();
    let rd = std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))?;
    for e in rd {
        let p = e.map_err(|e| DataError::io(dir, e))?.path();
        let stem = p
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let is_part = SPLIT_PARTS
            .iter()
            .any(|part| stem.ends_with(&format!(".{part}")));
        if p.extension().is_some_and(|x| x == "inter") && !is_part {
            found.push(p);
        }
    }
    found.sort();
    match found.len() {
        0 => Err(DataError::invalid(dir, "no `.inter` file in this folder")),
        1 => Ok(found.pop().unwrap()),
        _ => Err(DataError::invalid(
            dir,
            format!(
                "several `.inter` files ({}); point at one of them",
                found
                    .iter()
                    .map(|p| p.file_name().unwrap().to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

/// Read `<stem>.inter` (+ `.item`, `.user` next to it when present).
pub fn read(path: &Path) -> Result<Dataset> {
    let inter = if path.is_dir() {
        find_inter(path)?
    } else {
        path.to_path_buf()
    };
    let stem = inter
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let t = AtomicTable::read(&inter)?;
    let uc = t.require("user_id")?;
    let ic = t.require("item_id")?;
    let rc = t.column("rating");
    let tc = t.column("timestamp");
    if t.rows.is_empty() {
        return Err(DataError::parse(
            &inter,
            2,
            "no interactions after the header",
        ));
    }
    let mut b = DatasetBuilder::new();
    for (ln, r) in &t.rows {
        if r[uc].is_empty() || r[ic].is_empty() {
            return Err(DataError::parse(&inter, *ln, "empty user_id or item_id"));
        }
        let rating = match rc {
            Some(c) if !r[c].is_empty() => Some(r[c].trim().parse::<f32>().map_err(|_| {
                DataError::parse(&inter, *ln, format!("rating `{}` is not a number", r[c]))
            })?),
            _ => None,
        };
        let ts = match tc {
            Some(c) if !r[c].is_empty() => Some(r[c].trim().parse::<f64>().map_err(|_| {
                DataError::parse(&inter, *ln, format!("timestamp `{}` is not a number", r[c]))
            })? as i64),
            _ => None,
        };
        b.add(&r[uc], &r[ic], rating, ts);
    }
    let dir = inter.parent().unwrap_or(Path::new("."));
    let item_path = dir.join(format!("{stem}.item"));
    let user_path = dir.join(format!("{stem}.user"));
    let items = if item_path.exists() {
        Some(AtomicTable::read(&item_path)?.meta("item_id", &TITLE_COLUMNS)?)
    } else {
        None
    };
    let users = if user_path.exists() {
        Some(AtomicTable::read(&user_path)?.meta("user_id", &[])?)
    } else {
        None
    };
    let mut ds = b.finish(&stem, items.as_ref(), users.as_ref());
    let part_paths: Vec<PathBuf> = SPLIT_PARTS
        .iter()
        .map(|p| dir.join(format!("{stem}.{p}.inter")))
        .collect();
    if part_paths.iter().all(|p| p.exists()) {
        let mut parts = Vec::new();
        for p in &part_paths {
            parts.push(read_part(p, &ds)?);
        }
        let test = parts.pop().unwrap();
        let valid = parts.pop().unwrap();
        let train = parts.pop().unwrap();
        ds.split = Some(crate::dataset::Split {
            train,
            valid,
            test,
            extra_tests: Vec::new(),
        });
    } else if let Some(p) = part_paths.iter().find(|p| p.exists()) {
        return Err(DataError::invalid(
            p,
            "a benchmark split needs all of .train.inter, .valid.inter and .test.inter",
        ));
    }
    Ok(ds)
}

/// One benchmark split file, in the id space of the full dataset.
fn read_part(path: &Path, ds: &Dataset) -> Result<crate::interactions::Interactions> {
    let t = AtomicTable::read(path)?;
    let uc = t.require("user_id")?;
    let ic = t.require("item_id")?;
    let rc = t.column("rating");
    let tc = t.column("timestamp");
    let mut list = Vec::with_capacity(t.rows.len());
    for (ln, r) in &t.rows {
        let user = ds.users.get(&r[uc]).ok_or_else(|| {
            DataError::parse(
                path,
                *ln,
                format!("user `{}` is not in the full .inter file", r[uc]),
            )
        })?;
        let item = ds.items.get(&r[ic]).ok_or_else(|| {
            DataError::parse(
                path,
                *ln,
                format!("item `{}` is not in the full .inter file", r[ic]),
            )
        })?;
        let rating = rc.and_then(|c| r[c].trim().parse::<f32>().ok());
        let timestamp = tc
            .and_then(|c| r[c].trim().parse::<f64>().ok())
            .map(|x| x as i64);
        list.push(crate::interactions::Interaction {
            user,
            item,
            rating,
            timestamp,
        });
    }
    Ok(crate::interactions::Interactions::from_interactions(
        ds.n_users(),
        ds.n_items(),
        &list,
    ))
}

fn field_type(values: &[String]) -> &'static str {
    if values.iter().any(|v| v.contains(' ')) {
        "token_seq"
    } else {
        "token"
    }
}

fn clean(s: &str) -> String {
    s.replace(['\t', '\n', '\r'], " ")
}

pub fn write_meta(path: &Path, id_col: &str, ids: &IdMap, table: &Table) -> Result<()> {
    write_atomic(path, |f| {
        let mut header = vec![format!("{id_col}:token")];
        if let Some(t) = &table.title {
            header.push(format!("title:{}", field_type(t)));
        }
        for (n, v) in &table.fields {
            header.push(format!("{n}:{}", field_type(v)));
        }
        writeln!(f, "{}", header.join("\t"))?;
        for (d, ext) in ids.iter() {
            let mut row = vec![clean(ext)];
            if let Some(t) = &table.title {
                row.push(clean(&t[d as usize]));
            }
            for v in table.fields.values() {
                row.push(clean(&v[d as usize]));
            }
            writeln!(f, "{}", row.join("\t"))?;
        }
        Ok(())
    })
}

/// Write `<dir>/<name>.inter` (+ `.item`/`.user` when the tables hold anything). Interactions
/// are written from `ds.interactions` in external ids.
pub fn write(ds: &Dataset, dir: &Path, name: &str) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    write_inter(ds, &ds.interactions, &dir.join(format!("{name}.inter")))?;
    if let Some(s) = &ds.split {
        write_inter(ds, &s.train, &dir.join(format!("{name}.train.inter")))?;
        write_inter(ds, &s.valid, &dir.join(format!("{name}.valid.inter")))?;
        write_inter(ds, &s.test, &dir.join(format!("{name}.test.inter")))?;
    }
    if !ds.item_table.is_empty() {
        write_meta(
            &dir.join(format!("{name}.item")),
            "item_id",
            &ds.items,
            &ds.item_table,
        )?;
    }
    if !ds.user_table.is_empty() {
        write_meta(
            &dir.join(format!("{name}.user")),
            "user_id",
            &ds.users,
            &ds.user_table,
        )?;
    }
    Ok(())
}

fn write_inter(ds: &Dataset, x: &crate::interactions::Interactions, path: &Path) -> Result<()> {
    write_atomic(path, |f| {
        let mut header = vec!["user_id:token", "item_id:token"];
        if x.has_ratings() {
            header.push("rating:float");
        }
        if x.has_timestamps() {
            header.push("timestamp:float");
        }
        writeln!(f, "{}", header.join("\t"))?;
        for it in x.iter() {
            write!(
                f,
                "{}\t{}",
                clean(ds.users.ext(it.user)),
                clean(ds.items.ext(it.item))
            )?;
            if let Some(r) = it.rating {
                write!(f, "\t{r}")?;
            }
            if let Some(t) = it.timestamp {
                write!(f, "\t{t}")?;
            }
            writeln!(f)?;
        }
        Ok(())
    })
}
