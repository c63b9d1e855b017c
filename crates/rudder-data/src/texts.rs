//! One text column (titles, descriptions, artist names) with its row ids, from the files
//! recommender datasets ship: RecBole atomic files (`movie_title:token_seq`), CSV/TSV with a
//! header, MovieLens `::` and `|` files (columns by index), JSON lines, or plain lines.

use std::path::Path;

use crate::error::{DataError, Result};
use crate::io::{decode_latin1, numbered_lines, read_bytes};

#[derive(Clone, Debug, Default, PartialEq)]
pub struct TextColumn {
    /// The id column's value of each row (the 1-based line number when there is none).
    pub ids: Vec<String>,
    pub texts: Vec<String>,
}

/// Where the text and the id are.
#[derive(Clone, Debug, Default)]
pub struct ColumnSpec {
    /// A header name (RecBole `name:type` headers match on `name`), or a 0-based index for
    /// header-less files. JSON lines use it as the field name.
    pub column: String,
    /// Id column (name or index); default: the first column (`id` / `item_id` for JSON).
    pub id_column: Option<String>,
    /// Field separator; default detected from the first line (tab, `::`, `|`, `,`).
    pub sep: Option<String>,
}

fn split_line<'a>(line: &'a str, sep: &str) -> Vec<String> {
    if sep == "," {
        let mut r = csv::ReaderBuilder::new()
            .has_headers(false)
            .from_reader(line.as_bytes());
        if let Some(Ok(rec)) = r.records().next() {
            return rec.iter().map(String::from).collect();
        }
    }
    line.split(sep).map(|s: &'a str| s.to_string()).collect()
}

fn find(header: &[String], name: &str) -> Option<usize> {
    header
        .iter()
        .position(|h| h == name || h.split(':').next() == Some(name))
}

/// Read the column. UTF-8 is expected; files that are not valid UTF-8 are read as Latin-1
/// (the MovieLens raw files).
pub fn read_text_column(path: &Path, spec: &ColumnSpec) -> Result<TextColumn> {
    let bytes = read_bytes(path)?;
    let text = String::from_utf8(bytes).unwrap_or_else(|e| decode_latin1(e.as_bytes()));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let mut out = TextColumn::default();
    if name.ends_with(".jsonl") || name.ends_with(".ndjson") {
        for (ln, line) in numbered_lines(&text) {
            if line.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| DataError::parse(path, ln, format!("invalid JSON: {e}")))?;
            let t = v
                .get(&spec.column)
                .and_then(|t| t.as_str())
                .ok_or_else(|| {
                    DataError::parse(path, ln, format!("no string field \"{}\"", spec.column))
                })?;
            let id = match &spec.id_column {
                Some(k) => v.get(k).cloned(),
                None => v.get("id").or_else(|| v.get("item_id")).cloned(),
            };
            out.ids.push(match id {
                Some(serde_json::Value::String(s)) => s,
                Some(other) => other.to_string(),
                None => ln.to_string(),
            });
            out.texts.push(t.to_string());
        }
        return Ok(out);
    }
    let mut lines = numbered_lines(&text)
        .filter(|(_, l)| !l.trim().is_empty())
        .peekable();
    let Some(&(_, first)) = lines.peek() else {
        return Err(DataError::invalid(path, "empty file"));
    };
    let sep = spec.sep.clone().unwrap_or_else(|| {
        if first.contains('\t') {
            "\t".into()
        } else if first.contains("::") {
            "::".into()
        } else if first.contains('|') {
            "|".into()
        } else if first.contains(',') {
            ",".into()
        } else {
            "\n".into()
        }
    });
    let by_index = spec.column.parse::<usize>().ok();
    let (col, id_col) = match by_index {
        Some(c) => (
            c,
            spec.id_column
                .as_deref()
                .map(|s| s.parse::<usize>())
                .transpose()
                .map_err(|_| {
                    DataError::Config(
                        "--id-column must be an index when --column is an index".into(),
                    )
                })?,
        ),
        None => {
            let (ln, h) = lines.next().unwrap_or((1, ""));
            let header = split_line(h, &sep);
            let c = find(&header, &spec.column).ok_or_else(|| {
                DataError::parse(
                    path,
                    ln,
                    format!(
                        "no column \"{}\" in the header ({})",
                        spec.column,
                        header.join(", ")
                    ),
                )
            })?;
            let id = match &spec.id_column {
                Some(k) => Some(find(&header, k).ok_or_else(|| {
                    DataError::parse(path, ln, format!("no id column \"{k}\" in the header"))
                })?),
                None => (c != 0).then_some(0),
            };
            (c, id)
        }
    };
    let id_col = if by_index.is_some() && spec.id_column.is_none() && col != 0 {
        Some(0)
    } else {
        id_col
    };
    for (ln, line) in lines {
        let f = split_line(line, &sep);
        let t = f.get(col).ok_or_else(|| {
            DataError::parse(path, ln, format!("{} fields, no column {col}", f.len()))
        })?;
        out.texts.push(t.trim().to_string());
        out.ids.push(match id_col {
            Some(i) => f
                .get(i)
                .cloned()
                .ok_or_else(|| DataError::parse(path, ln, format!("no id column {i}")))?,
            None => ln.to_string(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(content: &str, file: &str, column: &str) -> Result<TextColumn> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(file);
        std::fs::write(&p, content).unwrap();
        read_text_column(
            &p,
            &ColumnSpec {
                column: column.into(),
                ..Default::default()
            },
        )
    }

    #[test]
    fn reads_the_usual_layouts() {
        let a = read(
            "item_id:token\tmovie_title:token_seq\n1\tToy Story\n2\tHeat\n",
            "x.item",
            "movie_title",
        )
        .unwrap();
        assert_eq!(a.ids, vec!["1", "2"]);
        assert_eq!(a.texts, vec!["Toy Story", "Heat"]);
        let c = read(
            "id,title\n7,\"Crouching Tiger, Hidden Dragon\"\n",
            "m.csv",
            "title",
        )
        .unwrap();
        assert_eq!(c.texts, vec!["Crouching Tiger, Hidden Dragon"]);
        let m = read(
            "1::Toy Story (1995)::Animation\n2::Jumanji (1995)::Adventure\n",
            "movies.dat",
            "1",
        )
        .unwrap();
        assert_eq!(
            (m.ids[1].as_str(), m.texts[1].as_str()),
            ("2", "Jumanji (1995)")
        );
        let j = read("{\"item_id\": 3, \"title\": \"Up\"}\n", "t.jsonl", "title").unwrap();
        assert_eq!((j.ids[0].as_str(), j.texts[0].as_str()), ("3", "Up"));
    }

    #[test]
    fn errors_name_file_line_and_column() {
        let e = read("id,title\n1,x\n", "m.csv", "name")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("m.csv:1") && e.contains("no column \"name\""),
            "{e}"
        );
        let e = read("{\"title\": 1}\n", "t.jsonl", "title")
            .unwrap_err()
            .to_string();
        assert!(e.contains("t.jsonl:1"), "{e}");
        let e = read("1::a\n2\n", "movies.dat", "1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("movies.dat:2"), "{e}");
    }
}
