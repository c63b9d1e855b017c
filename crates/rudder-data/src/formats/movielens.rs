//! MovieLens raw releases (ISO-8859-1 text):
//! ml-100k `u.data` (`user\titem\trating\ttimestamp`), `u.item` (`id|title|release|video|url|`
//! 19 genre flags), `u.user` (`id|age|gender|occupation|zip`);
//! ml-1m `ratings.dat` (`user::item::rating::timestamp`), `movies.dat` (`id::title::genres`),
//! `users.dat` (`id::gender::age::occupation::zip`).

use crate::builder::{DatasetBuilder, MetaRows};
use crate::dataset::Dataset;
use crate::error::{DataError, Result};
use crate::io::{decode_latin1, numbered_lines, read_bytes};
use std::path::Path;

/// The 19 ML-100K genres in `u.item` flag order (also listed in `u.genre`).
pub const ML100K_GENRES: [&str; 19] = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
];

fn read_latin1(path: &Path) -> Result<String> {
    Ok(decode_latin1(&read_bytes(path)?))
}

/// Split a line into exactly `n` fields by `sep`, with a clear error otherwise.
fn fields<'a>(
    path: &Path,
    ln: usize,
    line: &'a str,
    sep: &str,
    n: usize,
    what: &str,
) -> Result<Vec<&'a str>> {
    let f: Vec<&str> = line.split(sep).collect();
    if f.len() != n {
        return Err(DataError::parse(
            path,
            ln,
            format!(
                "expected {n} `{}`-separated fields ({what}), found {} (truncated line?)",
                sep.escape_default(),
                f.len()
            ),
        ));
    }
    Ok(f)
}

fn int(path: &Path, ln: usize, name: &str, v: &str) -> Result<i64> {
    v.trim()
        .parse::<i64>()
        .map_err(|_| DataError::parse(path, ln, format!("{name} `{v}` is not an integer")))
}

fn ratings(path: &Path, sep: &str, b: &mut DatasetBuilder) -> Result<()> {
    let text = read_latin1(path)?;
    for (ln, line) in numbered_lines(&text) {
        if line.trim().is_empty() {
            continue;
        }
        let f = fields(path, ln, line, sep, 4, "user, item, rating, timestamp")?;
        let u = int(path, ln, "user id", f[0])?;
        let i = int(path, ln, "item id", f[1])?;
        let r = f[2].trim().parse::<f32>().map_err(|_| {
            DataError::parse(path, ln, format!("rating `{}` is not a number", f[2]))
        })?;
        let t = int(path, ln, "timestamp", f[3])?;
        b.add(&u.to_string(), &i.to_string(), Some(r), Some(t));
    }
    if b.is_empty() {
        return Err(DataError::parse(path, 1, "empty file: no ratings"));
    }
    Ok(())
}

/// Read a raw ML-100K folder (`u.data`, optional `u.item`, `u.user`).
pub fn read_100k(dir: &Path) -> Result<Dataset> {
    let mut b = DatasetBuilder::new();
    ratings(&dir.join("u.data"), "\t", &mut b)?;
    let item_p = dir.join("u.item");
    let items = if item_p.exists() {
        let text = read_latin1(&item_p)?;
        let mut m = MetaRows {
            title: Some(Vec::new()),
            ..Default::default()
        };
        let mut lines_of = Vec::new();
        let mut genres_col = Vec::new();
        let mut release = Vec::new();
        for (ln, line) in numbered_lines(&text) {
            if line.trim().is_empty() {
                continue;
            }
            let f = fields(
                &item_p,
                ln,
                line,
                "|",
                24,
                "id, title, release date, video date, url, 19 genre flags",
            )?;
            let id = int(&item_p, ln, "movie id", f[0])?;
            let mut g = Vec::new();
            for (k, flag) in f[5..].iter().enumerate() {
                match *flag {
                    "1" => g.push(ML100K_GENRES[k]),
                    "0" => {}
                    other => {
                        return Err(DataError::parse(
                            &item_p,
                            ln,
                            format!("genre flag {} is `{other}`, expected 0 or 1", k + 1),
                        ));
                    }
                }
            }
            m.ids.push(id.to_string());
            m.title.as_mut().unwrap().push(f[1].to_string());
            release.push(f[2].to_string());
            genres_col.push(g.join("|"));
            lines_of.push(ln);
        }
        m.fields.insert("genres".into(), genres_col);
        m.fields.insert("release_date".into(), release);
        m.check_unique(&item_p, |r| lines_of[r])?;
        Some(m)
    } else {
        None
    };
    let user_p = dir.join("u.user");
    let users = if user_p.exists() {
        Some(read_users(
            &user_p,
            "|",
            &["age", "gender", "occupation", "zip_code"],
        )?)
    } else {
        None
    };
    Ok(b.finish("ml-100k", items.as_ref(), users.as_ref()))
}

fn read_users(path: &Path, sep: &str, names: &[&str]) -> Result<MetaRows> {
    let text = read_latin1(path)?;
    let mut m = MetaRows::default();
    let mut cols = vec![Vec::new(); names.len()];
    let mut lines_of = Vec::new();
    for (ln, line) in numbered_lines(&text) {
        if line.trim().is_empty() {
            continue;
        }
        let f = fields(
            path,
            ln,
            line,
            sep,
            names.len() + 1,
            &format!("id, {}", names.join(", ")),
        )?;
        let id = int(path, ln, "user id", f[0])?;
        m.ids.push(id.to_string());
        for (k, v) in f[1..].iter().enumerate() {
            cols[k].push(v.to_string());
        }
        lines_of.push(ln);
    }
    for (n, c) in names.iter().zip(cols) {
        m.fields.insert(n.to_string(), c);
    }
    m.check_unique(path, |r| lines_of[r])?;
    Ok(m)
}

/// Read a raw ML-1M folder (`ratings.dat`, optional `movies.dat`, `users.dat`).
pub fn read_1m(dir: &Path) -> Result<Dataset> {
    let mut b = DatasetBuilder::new();
    ratings(&dir.join("ratings.dat"), "::", &mut b)?;
    let mp = dir.join("movies.dat");
    let items = if mp.exists() {
        let text = read_latin1(&mp)?;
        let mut m = MetaRows {
            title: Some(Vec::new()),
            ..Default::default()
        };
        let mut genres = Vec::new();
        let mut lines_of = Vec::new();
        for (ln, line) in numbered_lines(&text) {
            if line.trim().is_empty() {
                continue;
            }
            let f = fields(&mp, ln, line, "::", 3, "id, title, genres")?;
            let id = int(&mp, ln, "movie id", f[0])?;
            m.ids.push(id.to_string());
            m.title.as_mut().unwrap().push(f[1].to_string());
            genres.push(f[2].to_string());
            lines_of.push(ln);
        }
        m.fields.insert("genres".into(), genres);
        m.check_unique(&mp, |r| lines_of[r])?;
        Some(m)
    } else {
        None
    };
    let up = dir.join("users.dat");
    let users = if up.exists() {
        Some(read_users(
            &up,
            "::",
            &["gender", "age", "occupation", "zip_code"],
        )?)
    } else {
        None
    };
    Ok(b.finish("ml-1m", items.as_ref(), users.as_ref()))
}
