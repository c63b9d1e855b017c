//! Every reader, fed malformed files, returns an error naming the file, the line and the reason.

use rudder_data::formats::{self, Format};
use std::path::Path;

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::write(dir.join(name), bytes).unwrap();
}

/// Load `dir` as `format` and return the error text, asserting it names `file:line` and `why`.
fn expect_err(dir: &Path, format: Format, file: &str, line: Option<usize>, why: &str) {
    let e = match formats::load(dir, Some(format)) {
        Ok(_) => panic!("expected an error for {file} ({why})"),
        Err(e) => e.to_string(),
    };
    let loc = match line {
        Some(l) => format!("{file}:{l}:"),
        None => file.to_string(),
    };
    assert!(e.contains(&loc), "error `{e}` should name `{loc}`");
    assert!(
        e.to_lowercase().contains(&why.to_lowercase()),
        "error `{e}` should say `{why}`"
    );
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn lightgcn_lines() {
    let d = tmp();
    let p = d.path();
    write(p, "train.txt", b"0 1 2\n1 x 3\n");
    expect_err(
        p,
        Format::Lightgcn,
        "train.txt",
        Some(2),
        "not a non-negative integer",
    );
    write(p, "train.txt", b"0 1 2\n1 -3\n");
    expect_err(p, Format::Lightgcn, "train.txt", Some(2), "negative");
    write(p, "train.txt", b"0 1 99999999999\n");
    expect_err(
        p,
        Format::Lightgcn,
        "train.txt",
        Some(1),
        "out of the range",
    );
    write(p, "train.txt", b"");
    expect_err(p, Format::Lightgcn, "train.txt", Some(1), "empty file");
    write(p, "train.txt", b"0 1\n2 3\n0 4\n");
    expect_err(
        p,
        Format::Lightgcn,
        "train.txt",
        Some(3),
        "duplicate user id 0",
    );
    write(p, "train.txt", b"0 1\n1 2\xe9\n");
    expect_err(p, Format::Lightgcn, "train.txt", Some(2), "invalid UTF-8");
    // ids out of the range fixed by item_list.txt
    write(p, "train.txt", b"0 1\n1 2\n");
    write(p, "test.txt", b"0 5\n");
    write(p, "item_list.txt", b"org_id remap_id\na 0\nb 1\nc 2\n");
    expect_err(
        p,
        Format::Lightgcn,
        "test.txt",
        Some(1),
        "item id 5 out of range",
    );
    write(p, "item_list.txt", b"org_id remap_id\na 0\nb 1\nb 2\n");
    expect_err(
        p,
        Format::Lightgcn,
        "item_list.txt",
        Some(4),
        "duplicate org_id",
    );
    write(p, "item_list.txt", b"org_id remap_id\na 0\nb 2\n");
    expect_err(
        p,
        Format::Lightgcn,
        "item_list.txt",
        Some(3),
        "without gaps",
    );
    write(p, "item_list.txt", b"org_id remap_id\nonlyone\n");
    expect_err(p, Format::Lightgcn, "item_list.txt", Some(2), "one field");
}

#[test]
fn atomic_files() {
    let d = tmp();
    let p = d.path();
    write(
        p,
        "x.inter",
        b"user_id:token\titem_id:token\trating:float\n1\t2\t5\n1\t3\n",
    );
    expect_err(
        p,
        Format::Atomic,
        "x.inter",
        Some(3),
        "expected 3 tab-separated columns",
    );
    write(p, "x.inter", b"user_id:token\trating:float\n1\t5\n");
    expect_err(
        p,
        Format::Atomic,
        "x.inter",
        Some(1),
        "missing column `item_id`",
    );
    write(
        p,
        "x.inter",
        b"user_id:token\titem_id:token\trating:float\n1\t2\tfive\n",
    );
    expect_err(
        p,
        Format::Atomic,
        "x.inter",
        Some(2),
        "is a float but holds `five`",
    );
    write(p, "x.inter", b"");
    expect_err(p, Format::Atomic, "x.inter", Some(1), "empty file");
    write(p, "x.inter", b"user_id:token\titem_id:token\n");
    expect_err(p, Format::Atomic, "x.inter", Some(2), "no interactions");
    write(p, "x.inter", b"user_id\titem_id:token\n1\t2\n");
    expect_err(p, Format::Atomic, "x.inter", Some(1), "is not `name:type`");
    write(p, "x.inter", b"user_id:token\titem_id:tokn\n1\t2\n");
    expect_err(p, Format::Atomic, "x.inter", Some(1), "unknown type");
    write(
        p,
        "x.inter",
        b"user_id:token\titem_id:token\n1\t2\n\xff\xfe\t3\n",
    );
    expect_err(p, Format::Atomic, "x.inter", Some(3), "invalid UTF-8");
    write(p, "x.inter", b"user_id:token\titem_id:token\n1\t2\n1\t3\n");
    write(
        p,
        "x.item",
        b"item_id:token\ttitle:token_seq\n2\tA\n3\tB\n2\tC\n",
    );
    expect_err(
        p,
        Format::Atomic,
        "x.item",
        Some(4),
        "duplicate id `2` (first seen on line 2)",
    );
    std::fs::remove_file(p.join("x.item")).unwrap();
    write(p, "x.train.inter", b"user_id:token\titem_id:token\n1\t9\n");
    write(p, "x.valid.inter", b"user_id:token\titem_id:token\n");
    write(p, "x.test.inter", b"user_id:token\titem_id:token\n");
    expect_err(
        p,
        Format::Atomic,
        "x.train.inter",
        Some(2),
        "item `9` is not in the full .inter file",
    );
}

#[test]
fn movielens_raw() {
    let d = tmp();
    let p = d.path();
    write(p, "u.data", b"1\t2\t5\t881250949\n1\t3\t4\n");
    expect_err(p, Format::Ml100k, "u.data", Some(2), "expected 4");
    write(p, "u.data", b"1\t2\t5\t881250949\nuser\t3\t4\t881250949\n");
    expect_err(
        p,
        Format::Ml100k,
        "u.data",
        Some(2),
        "user id `user` is not an integer",
    );
    write(p, "u.data", b"");
    expect_err(p, Format::Ml100k, "u.data", Some(1), "empty file");
    write(p, "u.data", b"1\t2\t5\t881250949\n");
    let flags = "|0".repeat(19);
    write(
        p,
        "u.item",
        format!(
            "2|A (1995)|01-Jan-1995||http://x{flags}\n2|B (1995)|01-Jan-1995||http://x{flags}\n"
        )
        .as_bytes(),
    );
    expect_err(p, Format::Ml100k, "u.item", Some(2), "duplicate id `2`");
    let bad_flags = format!("|2{}", "|0".repeat(18));
    write(
        p,
        "u.item",
        format!("2|A (1995)|01-Jan-1995||http://x{bad_flags}\n").as_bytes(),
    );
    expect_err(p, Format::Ml100k, "u.item", Some(1), "expected 0 or 1");
    // Latin-1 is decoded, not rejected
    let mut line = b"2|Am\xe9lie (2001)|01-Jan-2001||http://x".to_vec();
    line.extend(format!("{flags}\n").bytes());
    write(p, "u.item", &line);
    let ds = formats::load_interactions(p, Some(Format::Ml100k)).unwrap();
    assert_eq!(ds.item_table.title(0), Some("Amélie (2001)"));

    let d = tmp();
    let p = d.path();
    write(p, "ratings.dat", b"1::2::5::978300760\n1::3::4\n");
    expect_err(
        p,
        Format::Ml1m,
        "ratings.dat",
        Some(2),
        "expected 4 `::`-separated fields",
    );
    write(p, "ratings.dat", b"1::2::x::978300760\n");
    expect_err(
        p,
        Format::Ml1m,
        "ratings.dat",
        Some(1),
        "rating `x` is not a number",
    );
    write(p, "ratings.dat", b"1::2::5::978300760\n");
    write(
        p,
        "movies.dat",
        b"2::Toy Story (1995)::Animation\n2::Again::Comedy\n",
    );
    expect_err(p, Format::Ml1m, "movies.dat", Some(2), "duplicate id");
    write(p, "movies.dat", b"2::Toy Story (1995)\n");
    expect_err(p, Format::Ml1m, "movies.dat", Some(1), "expected 3");
}

#[test]
fn llara_sequences() {
    let d = tmp();
    let p = d.path();
    write(p, "id2name.txt", b"0::A\n1::B\n2::C\n");
    write(p, "test.jsonl", b"{\"seq\": [0, 3, 3], \"len_seq\": 1, \"next\": 1}\n{\"seq\": [0, 1, 3], \"len_seq\": 2, \"next\"\n");
    expect_err(p, Format::Llara, "test.jsonl", Some(2), "invalid JSON");
    write(
        p,
        "test.jsonl",
        b"{\"seq\": [0, 7, 3], \"len_seq\": 2, \"next\": 1}\n",
    );
    expect_err(
        p,
        Format::Llara,
        "test.jsonl",
        Some(1),
        "item id 7 out of range",
    );
    write(p, "test.jsonl", b"{\"seq\": [0, 3, 3], \"next\": 1}\n");
    expect_err(
        p,
        Format::Llara,
        "test.jsonl",
        Some(1),
        "missing field `len_seq`",
    );
    write(
        p,
        "test.jsonl",
        b"{\"seq\": [\"a\", 3, 3], \"len_seq\": 1, \"next\": 1}\n",
    );
    expect_err(
        p,
        Format::Llara,
        "test.jsonl",
        Some(1),
        "neither an item id",
    );
    write(
        p,
        "test.jsonl",
        b"{\"seq\": [0, 3], \"len_seq\": 5, \"next\": 1}\n",
    );
    expect_err(p, Format::Llara, "test.jsonl", Some(1), "exceeds");
    write(p, "test.jsonl", b"");
    expect_err(p, Format::Llara, "test.jsonl", Some(1), "empty file");
    write(
        p,
        "test.jsonl",
        b"{\"seq\": [0, 3, 3], \"len_seq\": 1, \"next\": 1}\n",
    );
    write(p, "id2name.txt", b"0::A\n2::C\n");
    expect_err(
        p,
        Format::Llara,
        "id2name.txt",
        Some(2),
        "ids must run 0..n-1",
    );
    write(p, "id2name.txt", b"0::A\n1::B\xff\n");
    expect_err(p, Format::Llara, "id2name.txt", Some(2), "invalid UTF-8");
}

#[test]
fn sdpo_prompts() {
    let d = tmp();
    let p = d.path();
    write(
        p,
        "val.json",
        b"[\n {\"historyList\": \"a::b\", \"itemList\": [\"c\", \"d\"]}\n]\n",
    );
    expect_err(
        p,
        Format::Sdpo,
        "val.json",
        Some(2),
        "missing field `trueSelection`",
    );
    write(p, "val.json", b"[\n {\"historyList\": \"a::b\", \"itemList\": [\"c\", \"d\"], \"trueSelection\": \"c\"},\n {\"historyList\": \"a\"");
    expect_err(p, Format::Sdpo, "val.json", Some(3), "EOF");
    write(
        p,
        "val.json",
        b"[{\"historyList\": \"a::b\", \"itemList\": [\"c\", \"d\"], \"trueSelection\": \"e\"}]",
    );
    expect_err(p, Format::Sdpo, "val.json", None, "not in itemList");
    write(p, "val.json", b"  \n");
    expect_err(p, Format::Sdpo, "val.json", Some(1), "empty file");
}

#[test]
fn agent4rec_side_files() {
    let d = tmp();
    let p = d.path();
    write(p, "train.txt", b"0 0 1\n1 1 2\n");
    write(p, "movie_detail.csv", b"movie_id,genres\n0,Comedy\n");
    expect_err(
        p,
        Format::Lightgcn,
        "movie_detail.csv",
        Some(1),
        "missing column `title`",
    );
    write(
        p,
        "movie_detail.csv",
        b"movie_id,title,genres\n0,A,Comedy\nx,B,Drama\n",
    );
    expect_err(
        p,
        Format::Lightgcn,
        "movie_detail.csv",
        Some(3),
        "movie_id `x`",
    );
    write(
        p,
        "movie_detail.csv",
        b"movie_id,title,genres\n0,A,Comedy\n0,B,Drama\n",
    );
    expect_err(
        p,
        Format::Lightgcn,
        "movie_detail.csv",
        Some(3),
        "duplicate movie_id 0",
    );
    write(
        p,
        "movie_detail.csv",
        b"movie_id,title,genres\n0,A,Comedy\n1,B\n",
    );
    expect_err(
        p,
        Format::Lightgcn,
        "movie_detail.csv",
        Some(3),
        "expected 3 fields, found 2",
    );
    write(
        p,
        "movie_detail.csv",
        b"movie_id,title,genres\n0,A,Comedy\n1,B,Drama\n",
    );
    expect_err(
        p,
        Format::Lightgcn,
        "train.txt",
        Some(2),
        "item id 2 out of range: movie_detail.csv lists 2 items",
    );
    write(
        p,
        "movie_detail.csv",
        b"movie_id,title,genres\n0,A,Comedy\n1,B,Drama\n2,C,War\n",
    );
    write(p, "user_statistic.csv", b"user_id,activity\n0,1\n5,2\n");
    expect_err(
        p,
        Format::Lightgcn,
        "user_statistic.csv",
        Some(3),
        "user_id 5 out of range",
    );
    write(p, "user_statistic.csv", b"user_id,activity\n0,1\n1,\xff\n");
    expect_err(
        p,
        Format::Lightgcn,
        "user_statistic.csv",
        Some(3),
        "invalid UTF-8",
    );
    write(p, "user_statistic.csv", b"user_id,activity\n0,1\n1,2\n");
    write(p, "personas.csv", b"taste\na\nb\nc\n");
    expect_err(
        p,
        Format::Lightgcn,
        "personas.csv",
        Some(4),
        "3 persona rows but the dataset has 2 users",
    );
    std::fs::remove_file(p.join("personas.csv")).unwrap();
    let ds = formats::load_interactions(p, None).unwrap();
    assert_eq!(ds.item_table.title(2), Some("C"));
    assert_eq!(ds.user_table.field("activity", 1), Some("2"));
}

#[test]
fn detection_failures_are_clear() {
    let d = tmp();
    let e = formats::load(d.path(), None).unwrap_err().to_string();
    assert!(e.contains("cannot tell the format"), "{e}");
    let e = formats::load(&d.path().join("missing"), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no such file or folder"), "{e}");
}

fn lightgcn(p: &Path) -> rudder_data::Dataset {
    match formats::load(p, Some(Format::Lightgcn)).unwrap() {
        formats::Loaded::Interactions(d) => d,
        _ => unreachable!("LightGCN lines load as interactions"),
    }
}

/// One id of 2,000,000,000 in LightGCN lines is remapped before any per-id allocation (the
/// reader once grew to 8.8 GB and aborted); the original numbers stay the external ids.
#[test]
fn lightgcn_sparse_ids_are_remapped_not_allocated() {
    let d = tmp();
    let p = d.path();
    write(p, "train.txt", b"0 1 2\n2000000000 2 3000000000\n");
    write(p, "test.txt", b"0 3000000000\n");
    let ds = lightgcn(p);
    assert_eq!(ds.users.len(), 2);
    assert_eq!(ds.items.len(), 3);
    assert_eq!(ds.users.ext(1), "2000000000");
    assert_eq!(ds.items.ext(2), "3000000000");
    let s = ds.split.as_ref().unwrap();
    assert_eq!(s.train.items(1), &[1, 2]);
    assert_eq!(s.test.items(0), &[2]);
    // small gaps keep the ids as array positions
    write(p, "train.txt", b"0 1 2\n5 7\n");
    write(p, "test.txt", b"0 9\n");
    let ds = lightgcn(p);
    assert!(ds.users.is_identity() && ds.items.is_identity());
    assert_eq!((ds.users.len(), ds.items.len()), (6, 10));
}

#[test]
fn agent4rec_sparse_movie_ids_are_refused() {
    let d = tmp();
    let p = d.path();
    write(p, "train.txt", b"0 1 2\n");
    write(
        p,
        "movie_detail.csv",
        b"movie_id,title\n0,A\n2000000000,B\n",
    );
    expect_err(
        p,
        Format::Lightgcn,
        "movie_detail.csv",
        Some(3),
        "dense row",
    );
}
