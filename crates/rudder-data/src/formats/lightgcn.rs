//! LightGCN adjacency lines, the format of every CF reference repository:
//! one line per user, `user item item …`, space-separated 0-based dense ids, no header.
//! A dataset folder holds `train.txt`, optionally `valid.txt`, and one or more test files
//! (`test.txt`, `test_id.txt`, `test_ood.txt`, `test_ood_1.txt`, …). Optional companions:
//! `user_list.txt` / `item_list.txt` (`org_id remap_id`, LightGCN's own convention) map dense
//! ids back to external ids; `items.item` / `users.user` (RecBole atomic tables keyed by the
//! external id) carry metadata; Agent4Rec's `movie_detail.csv`, `user_statistic.csv`,
//! `personas.csv` are attached when present.

use crate::dataset::{Dataset, Split, Table};
use crate::error::{DataError, Result};
use crate::formats::{agent4rec, atomic};
use crate::ids::{IdMap, dense_limit};
use crate::interactions::Interactions;
use crate::io::{numbered_lines, read_utf8, write_atomic};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

/// One parsed file: (user, items, line number) in file order.
pub type Lines = Vec<(u32, Vec<u32>, usize)>;

fn parse_id(path: &Path, line: usize, col: usize, tok: &str) -> Result<u32> {
    tok.parse::<u32>().map_err(|_| {
        let why = if tok.starts_with('-') && tok[1..].chars().all(|c| c.is_ascii_digit()) {
            "negative; ids must be non-negative integers"
        } else if !tok.is_empty() && tok.chars().all(|c| c.is_ascii_digit()) {
            "out of the range of a 32-bit id"
        } else {
            "not a non-negative integer id"
        };
        DataError::parse(path, line, format!("column {col}: `{tok}` is {why}"))
    })
}

/// Parse one file of adjacency lines. Lines with only a user id are kept with no items;
/// a user on two lines of the same file is an error.
pub fn read_lines(path: &Path) -> Result<Lines> {
    let text = read_utf8(path)?;
    let mut out = Vec::new();
    let mut seen: HashMap<u32, usize> = HashMap::new();
    for (ln, line) in numbered_lines(&text) {
        let mut toks = line.split_ascii_whitespace();
        let Some(first) = toks.next() else { continue };
        let u = parse_id(path, ln, 1, first)?;
        if let Some(prev) = seen.insert(u, ln) {
            return Err(DataError::parse(
                path,
                ln,
                format!("duplicate user id {u} (already on line {prev})"),
            ));
        }
        let items = toks
            .enumerate()
            .map(|(k, t)| parse_id(path, ln, k + 2, t))
            .collect::<Result<Vec<u32>>>()?;
        out.push((u, items, ln));
    }
    Ok(out)
}

fn to_interactions(lines: &Lines, n_users: usize, n_items: usize) -> Interactions {
    let mut lists = vec![Vec::new(); n_users];
    for (u, items, _) in lines {
        lists[*u as usize] = items.clone();
    }
    Interactions::from_lists(n_items, &lists)
}

/// Rank test file names: test, test_id, test_ood, test_ood_1, … then anything else.
fn test_rank(stem: &str) -> (u8, String) {
    let r = match stem {
        "test" => 0,
        "test_id" => 1,
        "test_ood" => 2,
        _ => 3,
    };
    (r, stem.to_string())
}

/// Read `org_id remap_id` id lists. Remap ids must be exactly 0..n-1.
fn read_id_list(path: &Path) -> Result<IdMap> {
    let text = read_utf8(path)?;
    let mut pairs = Vec::new();
    for (ln, line) in numbered_lines(&text) {
        let line = line.trim();
        if line.is_empty() || (ln == 1 && line.split_ascii_whitespace().eq(["org_id", "remap_id"]))
        {
            continue;
        }
        // the org id may itself hold spaces (ML-1M uses titles as ids): the remap id is the
        // last field
        let Some((ext, d)) = line.rsplit_once(|c: char| c.is_ascii_whitespace()) else {
            return Err(DataError::parse(
                path,
                ln,
                "expected `org_id remap_id`, found one field",
            ));
        };
        let d = parse_id(path, ln, 2, d)?;
        pairs.push((d, ext.trim_end().to_string(), ln));
    }
    pairs.sort_by_key(|p| p.0);
    let mut m = IdMap::new();
    for (k, (d, ext, ln)) in pairs.iter().enumerate() {
        if *d as usize != k {
            return Err(DataError::parse(
                path,
                *ln,
                format!(
                    "remap ids must be 0..n-1 without gaps or repeats; {d} found where {k} expected"
                ),
            ));
        }
        if m.insert_new(ext).is_none() {
            return Err(DataError::parse(
                path,
                *ln,
                format!("duplicate org_id `{ext}`"),
            ));
        }
    }
    Ok(m)
}

/// Check every id of `lines` is below the bound given by a companion file.
fn check_bound(
    path: &Path,
    lines: &Lines,
    n_users: Option<(usize, &str)>,
    n_items: Option<(usize, &str)>,
) -> Result<()> {
    for (u, items, ln) in lines {
        if let Some((n, src)) = n_users
            && *u as usize >= n
        {
            return Err(DataError::parse(
                path,
                *ln,
                format!("user id {u} out of range: {src} lists {n} users"),
            ));
        }
        if let Some((n, src)) = n_items
            && let Some(i) = items.iter().find(|&&i| i as usize >= n)
        {
            return Err(DataError::parse(
                path,
                *ln,
                format!("item id {i} out of range: {src} lists {n} items"),
            ));
        }
    }
    Ok(())
}

/// When `ids` are too sparse to index arrays by (see [`dense_limit`]), the dense remapping.
fn sparse_remap(ids: &[u32], what: &str, path: &Path) -> Option<(IdMap, HashMap<u32, u32>)> {
    let max = ids.iter().map(|&i| i as usize + 1).max().unwrap_or(0);
    // cheap first test: fewer ids than the limit for even one distinct id
    if max <= dense_limit(1) {
        return None;
    }
    let (m, lookup) = IdMap::from_sorted_numbers(ids);
    if max <= dense_limit(m.len()) {
        return None;
    }
    tracing::warn!(
        "{}: {what} ids are sparse (largest {}, {} distinct): remapped to dense ids 0..{} in \
         numeric order; the original numbers are kept as external ids",
        path.display(),
        max - 1,
        m.len(),
        m.len()
    );
    Some((m, lookup))
}

/// Read a LightGCN dataset folder.
pub fn read_dir(dir: &Path) -> Result<Dataset> {
    let train_p = dir.join("train.txt");
    if !train_p.exists() {
        return Err(DataError::invalid(
            dir,
            "no `train.txt` in this folder (LightGCN lines format)",
        ));
    }
    let train = read_lines(&train_p)?;
    if train.iter().all(|(_, it, _)| it.is_empty()) {
        return Err(DataError::parse(&train_p, 1, "empty file: no interactions"));
    }
    let valid_p = ["valid.txt", "val.txt"]
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.exists());
    let valid = match &valid_p {
        Some(p) => read_lines(p)?,
        None => Vec::new(),
    };
    let mut tests = Vec::new();
    let rd = std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))?;
    for e in rd {
        let p = e.map_err(|e| DataError::io(dir, e))?.path();
        let stem = p
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        if p.extension().is_some_and(|x| x == "txt")
            && stem.starts_with("test")
            && !stem.ends_with("_neg")
        {
            tests.push((stem, p));
        }
    }
    tests.sort_by_key(|(s, _)| test_rank(s));
    let mut test_lines = Vec::new();
    for (stem, p) in &tests {
        test_lines.push((stem.clone(), read_lines(p)?));
    }

    // companions that fix the id spaces
    let user_list = dir.join("user_list.txt");
    let item_list = dir.join("item_list.txt");
    let users_map = if user_list.exists() {
        Some(read_id_list(&user_list)?)
    } else {
        None
    };
    let items_map = if item_list.exists() {
        Some(read_id_list(&item_list)?)
    } else {
        None
    };
    let movie_detail = dir.join("movie_detail.csv");
    let a4r_items = if movie_detail.exists() {
        Some(agent4rec::read_movie_detail(&movie_detail)?)
    } else {
        None
    };

    let ub = users_map.as_ref().map(|m| (m.len(), "user_list.txt"));
    let ib = items_map
        .as_ref()
        .map(|m| (m.len(), "item_list.txt"))
        .or(a4r_items
            .as_ref()
            .map(|(t, _)| (t.title.as_ref().map_or(0, |v| v.len()), "movie_detail.csv")));
    let mut all_files: Vec<(&Path, &Lines)> = vec![(&train_p, &train)];
    if let Some(p) = &valid_p {
        all_files.push((p, &valid));
    }
    for ((_, p), (_, l)) in tests.iter().zip(&test_lines) {
        all_files.push((p, l));
    }
    for (p, l) in &all_files {
        check_bound(p, l, ub, ib)?;
    }
    // Ids are array positions in this format. Without a companion list that fixes the id
    // space, ids far sparser than their count (one id of 2,000,000,000) are remapped to dense
    // ids before anything is allocated per id; the original numbers stay the external ids.
    let user_ids: Vec<u32> = all_files
        .iter()
        .flat_map(|(_, l)| l.iter().map(|x| x.0))
        .collect();
    let item_ids: Vec<u32> = all_files
        .iter()
        .flat_map(|(_, l)| l.iter().flat_map(|x| x.1.iter().copied()))
        .collect();
    let remap_u = if ub.is_none() {
        sparse_remap(&user_ids, "user", &train_p)
    } else {
        None
    };
    let remap_i = if ib.is_none() {
        sparse_remap(&item_ids, "item", &train_p)
    } else {
        None
    };
    drop((user_ids, item_ids));
    let mut train = train;
    let mut valid = valid;
    let mut test_lines = test_lines;
    if remap_u.is_some() || remap_i.is_some() {
        let apply = |lines: &mut Lines| {
            for (u, items, _) in lines.iter_mut() {
                if let Some((_, m)) = &remap_u {
                    *u = m[u];
                }
                if let Some((_, m)) = &remap_i {
                    for i in items.iter_mut() {
                        *i = m[i];
                    }
                }
            }
        };
        apply(&mut train);
        apply(&mut valid);
        for (_, l) in test_lines.iter_mut() {
            apply(l);
        }
    }
    let all_lines = || {
        std::iter::once(&train)
            .chain(std::iter::once(&valid))
            .chain(test_lines.iter().map(|(_, l)| l))
    };
    let max_u = all_lines()
        .flat_map(|l| l.iter().map(|x| x.0 as usize + 1))
        .max()
        .unwrap_or(0);
    let max_i = all_lines()
        .flat_map(|l| l.iter().flat_map(|x| x.1.iter().map(|&i| i as usize + 1)))
        .max()
        .unwrap_or(0);
    let n_users = ub.map_or(max_u, |b| b.0);
    let n_items = ib.map_or(max_i, |b| b.0);

    let users = match (users_map, remap_u) {
        (Some(m), _) => m,
        (None, Some((m, _))) => m,
        (None, None) => IdMap::identity(n_users),
    };
    let items = match (items_map, remap_i) {
        (Some(m), _) => m,
        (None, Some((m, _))) => m,
        (None, None) => IdMap::identity(n_items),
    };

    let train_x = to_interactions(&train, n_users, n_items);
    let valid_x = to_interactions(&valid, n_users, n_items);
    let mut tests_x: Vec<(String, Interactions)> = test_lines
        .iter()
        .map(|(s, l)| (s.clone(), to_interactions(l, n_users, n_items)))
        .collect();
    let test_x = if tests_x.is_empty() {
        Interactions::empty(n_users, n_items)
    } else {
        tests_x.remove(0).1
    };
    let split = Split {
        train: train_x,
        valid: valid_x,
        test: test_x,
        extra_tests: tests_x,
    };

    let mut item_table = Table::default();
    let mut user_table = Table::default();
    let items_item = dir.join("items.item");
    if items_item.exists() {
        item_table = atomic::read_meta(&items_item, "item_id", &atomic::TITLE_COLUMNS)?
            .join(&items)
            .0;
    }
    let users_user = dir.join("users.user");
    if users_user.exists() {
        user_table = atomic::read_meta(&users_user, "user_id", &[])?
            .join(&users)
            .0;
    }
    if let Some((t, _)) = a4r_items {
        item_table = t;
        item_table.resize(n_items);
    }
    agent4rec::attach_user_files(dir, n_users, &mut user_table)?;

    let name = dir
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "dataset".into());
    Ok(Dataset {
        name,
        interactions: split.all(),
        split: Some(split),
        users,
        items,
        user_table,
        item_table,
    })
}

/// Write one interaction set as adjacency lines (users without items are skipped).
pub fn write_lines(path: &Path, x: &Interactions) -> Result<()> {
    write_atomic(path, |f| {
        for u in 0..x.n_users() as u32 {
            let items = x.items(u);
            if items.is_empty() {
                continue;
            }
            write!(f, "{u}")?;
            for i in items {
                write!(f, " {i}")?;
            }
            writeln!(f)?;
        }
        Ok(())
    })
}

fn write_id_list(path: &Path, m: &IdMap) -> Result<()> {
    write_atomic(path, |f| {
        writeln!(f, "org_id remap_id")?;
        for (d, ext) in m.iter() {
            writeln!(f, "{} {d}", ext.replace(['\t', '\n', '\r'], " ").trim())?;
        }
        Ok(())
    })
}

/// Write a dataset folder. Without a split, every interaction goes to `train.txt`.
/// External ids go to `user_list.txt`/`item_list.txt` (the remap id is the last field, so ids
/// may contain spaces) and metadata to `items.item`/`users.user`.
pub fn write_dir(ds: &Dataset, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    match &ds.split {
        Some(s) => {
            write_lines(&dir.join("train.txt"), &s.train)?;
            write_lines(&dir.join("valid.txt"), &s.valid)?;
            write_lines(&dir.join("test.txt"), &s.test)?;
            for (n, x) in &s.extra_tests {
                write_lines(&dir.join(format!("{n}.txt")), x)?;
            }
        }
        None => write_lines(&dir.join("train.txt"), &ds.interactions)?,
    }
    write_id_list(&dir.join("user_list.txt"), &ds.users)?;
    write_id_list(&dir.join("item_list.txt"), &ds.items)?;
    if !ds.item_table.is_empty() {
        atomic::write_meta(
            &dir.join("items.item"),
            "item_id",
            &ds.items,
            &ds.item_table,
        )?;
    }
    if !ds.user_table.is_empty() {
        atomic::write_meta(
            &dir.join("users.user"),
            "user_id",
            &ds.users,
            &ds.user_table,
        )?;
    }
    Ok(())
}
