//! The AgentRecBench record store: users, items and reviews as JSON records in one on-disk
//! key-value file (redb), built once from the JSON Lines release (or from any timestamped
//! rudder dataset such as MovieLens) and opened in milliseconds afterwards with bounded memory.
//!
//! The key scheme mirrors the reference's LMDB cache (`users`, `items`, `reviews` by id, and
//! review-id lists per user and per item), except that the per-user and per-item indexes are
//! ordered keys `owner \0 time review_id` so that reviews come back in time order and a time
//! cut-off is a range bound, not a filter over everything.
//!
//! Review ids are kept when the record has one; otherwise they are a hash of (source, user,
//! item, time), stable across rebuilds (the reference's Amazon pipeline draws a random uuid4).
//! Times are seconds since the epoch, read from `timestamp` (seconds or milliseconds), `date`
//! (`YYYY-MM-DD[ HH:MM:SS]`, Yelp) or `date_added` (`Fri Aug 25 13:55:02 -0700 2017`,
//! Goodreads); a review without a readable time is *undated*, and undated reviews are hidden
//! whenever a task sets a time cut-off.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use redb::{Database, ReadOnlyDatabase, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use rudder_data::Dataset;

use crate::{AgentError, Result};

const USERS: TableDefinition<&str, &[u8]> = TableDefinition::new("users");
const ITEMS: TableDefinition<&str, &[u8]> = TableDefinition::new("items");
const REVIEWS: TableDefinition<&str, &[u8]> = TableDefinition::new("reviews");
/// `user \0 time(8, order-preserving) review_id` → `item \t stars`.
const BY_USER: TableDefinition<&[u8], &str> = TableDefinition::new("by_user");
/// `item \0 time review_id` → `user \t stars`.
const BY_ITEM: TableDefinition<&[u8], &str> = TableDefinition::new("by_item");
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");

/// Version of the key scheme; a store of another version is refused.
pub const STORE_VERSION: &str = "rudder-agentrec-store-1";

/// Records written per transaction while building (bounds the builder's memory).
const BATCH: usize = 100_000;
/// Page cache of a build and of a reader (redb's default is 1 GiB): what bounds memory.
const BUILD_CACHE: usize = 256 << 20;
const READ_CACHE: usize = 128 << 20;

fn db_err(path: &Path, e: impl std::fmt::Display) -> AgentError {
    AgentError::Input(format!("{}: record store: {e}", path.display()))
}

/// What a store holds and where it came from.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StoreMeta {
    pub version: String,
    /// Where the records came from (a folder of JSON Lines files, or a dataset name).
    pub source: String,
    pub users: u64,
    pub items: u64,
    pub reviews: u64,
    /// Reviews without a readable time.
    pub undated: u64,
    /// Lines skipped as unreadable (lenient builds only), with the first few places.
    pub skipped_lines: u64,
    pub skipped_examples: Vec<String>,
    /// Reviews whose user or item has no record (kept; the tool returns them).
    pub dangling: u64,
    /// (smallest, largest) review time.
    pub time_range: Option<(i64, i64)>,
    pub build_seconds: f64,
}

/// One review as the indexes know it.
#[derive(Clone, Debug, PartialEq)]
pub struct ReviewRef {
    pub review_id: String,
    /// The other side: the item for a user's review, the user for an item's review.
    pub other: String,
    pub time: Option<i64>,
    pub stars: Option<f32>,
}

/// Options of a build.
#[derive(Clone, Debug, Default)]
pub struct BuildOptions {
    /// Skip (and count) lines that are not JSON objects with the needed ids instead of failing.
    pub lenient: bool,
}

/// Receives build progress (bytes read of the total).
pub trait BuildProgress {
    fn bytes(&self, _done: u64, _total: u64) {}
}
pub struct NoBuildProgress;
impl BuildProgress for NoBuildProgress {}

/// A built store, opened read-only (any number of processes may read it at once).
pub struct Store {
    db: ReadOnlyDatabase,
    path: PathBuf,
    pub meta: StoreMeta,
}

/// Order-preserving 8 bytes of an optional time (undated first).
fn time_key(t: Option<i64>) -> [u8; 8] {
    match t {
        Some(t) => ((t as u64) ^ (1 << 63)).max(1).to_be_bytes(),
        None => 0u64.to_be_bytes(),
    }
}

fn time_of_key(b: &[u8]) -> Option<i64> {
    let v = u64::from_be_bytes(b.try_into().ok()?);
    if v == 0 {
        None
    } else {
        Some((v ^ (1 << 63)) as i64)
    }
}

fn index_key(owner: &str, t: Option<i64>, review_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(owner.len() + 9 + review_id.len());
    k.extend_from_slice(owner.as_bytes());
    k.push(0);
    k.extend_from_slice(&time_key(t));
    k.extend_from_slice(review_id.as_bytes());
    k
}

/// A review's time in seconds from its record (see the module documentation).
pub fn review_time(r: &Map<String, Value>) -> Option<i64> {
    if let Some(v) = r.get("timestamp") {
        let t = match v {
            Value::Number(n) => n.as_f64(),
            Value::String(s) => s.trim().parse::<f64>().ok(),
            _ => None,
        };
        if let Some(t) = t.filter(|t| t.is_finite()) {
            // Amazon 2023 timestamps are milliseconds.
            return Some(if t.abs() > 1e11 { t / 1000.0 } else { t } as i64);
        }
    }
    for key in ["date", "date_added", "date_updated", "time"] {
        if let Some(s) = r.get(key).and_then(Value::as_str)
            && let Some(t) = parse_date(s)
        {
            return Some(t);
        }
    }
    None
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

fn hms(s: &str) -> Option<i64> {
    let mut it = s.split(':').map(|x| x.trim().parse::<i64>().ok());
    let h = it.next()??;
    let m = it.next().flatten().unwrap_or(0);
    let sec = it.next().flatten().unwrap_or(0);
    Some(h * 3600 + m * 60 + sec)
}

/// `YYYY-MM-DD[ HH:MM:SS]` or Goodreads' `Fri Aug 25 13:55:02 -0700 2017`, as UTC seconds.
pub fn parse_date(s: &str) -> Option<i64> {
    let s = s.trim();
    if s.len() >= 10 && s.as_bytes()[4] == b'-' {
        let y = s[0..4].parse::<i64>().ok()?;
        let m = s[5..7].parse::<i64>().ok()?;
        let d = s[8..10].parse::<i64>().ok()?;
        if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
            return None;
        }
        let rest = s[10..].trim_start_matches(['T', ' ']);
        let secs = if rest.is_empty() {
            0
        } else {
            hms(&rest[..rest.len().min(8)])?
        };
        return Some(days_from_civil(y, m, d) * 86400 + secs);
    }
    let f: Vec<&str> = s.split_whitespace().collect();
    if f.len() == 6 {
        const MONTHS: [&str; 12] = [
            "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
        ];
        let m = MONTHS.iter().position(|&x| x == f[1])? as i64 + 1;
        let d = f[2].parse::<i64>().ok()?;
        let secs = hms(f[3])?;
        let off = f[4];
        let sign = if off.starts_with('-') { -1 } else { 1 };
        let o = off.trim_start_matches(['+', '-']);
        let off_s = if o.len() == 4 {
            sign * (o[0..2].parse::<i64>().ok()? * 3600 + o[2..4].parse::<i64>().ok()? * 60)
        } else {
            0
        };
        let y = f[5].parse::<i64>().ok()?;
        return Some(days_from_civil(y, m, d) * 86400 + secs - off_s);
    }
    None
}

fn str_field(r: &Map<String, Value>, keys: &[&str]) -> Option<String> {
    keys.iter().find_map(|k| match r.get(*k) {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    })
}

fn stars_of(r: &Map<String, Value>) -> Option<f32> {
    ["stars", "rating"].iter().find_map(|k| match r.get(*k) {
        Some(Value::Number(n)) => n.as_f64().map(|x| x as f32),
        Some(Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    })
}

/// A stable review id from (source, user, item, time).
pub fn review_id_of(source: &str, user: &str, item: &str, t: Option<i64>) -> String {
    let mut h = Sha256::new();
    for part in [
        source,
        user,
        item,
        &t.map(|t| t.to_string()).unwrap_or_default(),
    ] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    h.finalize()
        .iter()
        .take(12)
        .map(|b| format!("{b:02x}"))
        .collect()
}

struct Builder {
    db: Database,
    path: PathBuf,
    meta: StoreMeta,
    pending: Vec<Pending>,
    tmin: i64,
    tmax: i64,
}

/// An item's id under each source's name (Yelp, Amazon, Goodreads; Amazon reviews without a
/// parent fall back to `asin`).
const ITEM_ID_KEYS: [&str; 5] = ["item_id", "business_id", "parent_asin", "book_id", "asin"];

const K_USER: u8 = 0;
const K_ITEM: u8 = 1;

/// Insert a record; whether its id was new.
fn put(
    t: &mut redb::Table<&str, &[u8]>,
    id: &str,
    bytes: &[u8],
) -> std::result::Result<bool, redb::StorageError> {
    Ok(t.insert(id, bytes)?.is_none())
}

/// A record waiting for the next write transaction.
enum Pending {
    User(String, Vec<u8>),
    Item(String, Vec<u8>),
    Review {
        id: String,
        user: String,
        item: String,
        time: Option<i64>,
        stars: Option<f32>,
        bytes: Vec<u8>,
    },
}

impl Builder {
    fn new(tmp: &Path, source: &str) -> Result<Builder> {
        let _ = std::fs::remove_file(tmp);
        let db = Database::builder()
            .set_cache_size(BUILD_CACHE)
            .create(tmp)
            .map_err(|e| db_err(tmp, e))?;
        Ok(Builder {
            db,
            path: tmp.to_path_buf(),
            meta: StoreMeta {
                version: STORE_VERSION.into(),
                source: source.into(),
                ..Default::default()
            },
            pending: Vec::new(),
            tmin: i64::MAX,
            tmax: i64::MIN,
        })
    }

    fn push(&mut self, kind: u8, id: String, rec: Value) -> Result<()> {
        let bytes = serde_json::to_vec(&rec).unwrap_or_default();
        let pending = match kind {
            K_USER => Pending::User(id, bytes),
            _ => Pending::Item(id, bytes),
        };
        self.push_pending(pending)
    }

    fn push_pending(&mut self, p: Pending) -> Result<()> {
        self.pending.push(p);
        if self.pending.len() >= BATCH {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let p = self.path.clone();
        let e = |x: redb::StorageError| db_err(&p, x);
        let mut tx = self.db.begin_write().map_err(|x| db_err(&p, x))?;
        tx.set_durability(redb::Durability::None)
            .map_err(|x| db_err(&p, x))?;
        {
            let mut users = tx.open_table(USERS).map_err(|x| db_err(&p, x))?;
            let mut items = tx.open_table(ITEMS).map_err(|x| db_err(&p, x))?;
            let mut reviews = tx.open_table(REVIEWS).map_err(|x| db_err(&p, x))?;
            let mut by_user = tx.open_table(BY_USER).map_err(|x| db_err(&p, x))?;
            let mut by_item = tx.open_table(BY_ITEM).map_err(|x| db_err(&p, x))?;
            for rec in self.pending.drain(..) {
                match rec {
                    Pending::User(id, bytes) => {
                        self.meta.users += u64::from(put(&mut users, &id, &bytes).map_err(e)?)
                    }
                    Pending::Item(id, bytes) => {
                        self.meta.items += u64::from(put(&mut items, &id, &bytes).map_err(e)?)
                    }
                    Pending::Review {
                        id,
                        user,
                        item,
                        time,
                        stars,
                        bytes,
                    } => {
                        if reviews
                            .insert(id.as_str(), bytes.as_slice())
                            .map_err(|x| db_err(&p, x))?
                            .is_none()
                        {
                            self.meta.reviews += 1;
                            match time {
                                Some(t) => {
                                    self.tmin = self.tmin.min(t);
                                    self.tmax = self.tmax.max(t);
                                }
                                None => self.meta.undated += 1,
                            }
                        }
                        let stars = stars.map(|x| x.to_string()).unwrap_or_default();
                        by_user
                            .insert(
                                index_key(&user, time, &id).as_slice(),
                                format!("{item}\t{stars}").as_str(),
                            )
                            .map_err(|x| db_err(&p, x))?;
                        by_item
                            .insert(
                                index_key(&item, time, &id).as_slice(),
                                format!("{user}\t{stars}").as_str(),
                            )
                            .map_err(|x| db_err(&p, x))?;
                    }
                }
            }
        }
        tx.commit().map_err(|x| db_err(&p, x))?;
        Ok(())
    }

    fn review(
        &mut self,
        mut r: Map<String, Value>,
        source: &str,
    ) -> std::result::Result<(), String> {
        let user = str_field(&r, &["user_id"]).ok_or("no `user_id`")?;
        let item = str_field(&r, &ITEM_ID_KEYS).ok_or("no `item_id`")?;
        let t = review_time(&r);
        let src = str_field(&r, &["source"]).unwrap_or_else(|| source.to_string());
        let id =
            str_field(&r, &["review_id"]).unwrap_or_else(|| review_id_of(&src, &user, &item, t));
        r.insert("review_id".into(), id.clone().into());
        r.insert("user_id".into(), user.clone().into());
        r.insert("item_id".into(), item.clone().into());
        if let Some(s) = stars_of(&r) {
            r.insert("stars".into(), json!(s));
        }
        r.insert("_time".into(), t.map_or(Value::Null, Value::from));
        let stars = r.get("stars").and_then(Value::as_f64).map(|x| x as f32);
        let bytes = serde_json::to_vec(&r).unwrap_or_default();
        self.push_pending(Pending::Review {
            id,
            user,
            item,
            time: t,
            stars,
            bytes,
        })
        .map_err(|e| e.to_string())
    }

    fn finish(mut self, dest: &Path, started: std::time::Instant) -> Result<Store> {
        self.flush()?;
        if self.tmin <= self.tmax {
            self.meta.time_range = Some((self.tmin, self.tmax));
        }
        self.meta.dangling = self.count_dangling()?;
        self.meta.build_seconds = started.elapsed().as_secs_f64();
        let p = self.path.clone();
        let mut tx = self.db.begin_write().map_err(|e| db_err(&p, e))?;
        tx.set_durability(redb::Durability::Immediate)
            .map_err(|e| db_err(&p, e))?;
        {
            let mut m = tx.open_table(META).map_err(|e| db_err(&p, e))?;
            let v = serde_json::to_string(&self.meta).unwrap_or_default();
            m.insert("meta", v.as_str()).map_err(|e| db_err(&p, e))?;
        }
        tx.commit().map_err(|e| db_err(&p, e))?;
        drop(self.db);
        std::fs::rename(&p, dest).map_err(|e| crate::io_err(dest, e))?;
        Store::open(dest)
    }

    fn count_dangling(&self) -> Result<u64> {
        let p = &self.path;
        let tx = self.db.begin_read().map_err(|e| db_err(p, e))?;
        let users = tx.open_table(USERS).map_err(|e| db_err(p, e))?;
        let items = tx.open_table(ITEMS).map_err(|e| db_err(p, e))?;
        let by_user = tx.open_table(BY_USER).map_err(|e| db_err(p, e))?;
        let mut n = 0u64;
        let mut last_user: Option<(String, bool)> = None;
        for kv in by_user.iter().map_err(|e| db_err(p, e))? {
            let (k, v) = kv.map_err(|e| db_err(p, e))?;
            let k = k.value();
            let user = std::str::from_utf8(&k[..k.iter().position(|&b| b == 0).unwrap_or(0)])
                .unwrap_or_default()
                .to_string();
            let known_user = match &last_user {
                Some((u, known)) if *u == user => *known,
                _ => {
                    let known = users
                        .get(user.as_str())
                        .map_err(|e| db_err(p, e))?
                        .is_some();
                    last_user = Some((user, known));
                    known
                }
            };
            let item = v.value().split('\t').next().unwrap_or_default().to_string();
            let known_item = items
                .get(item.as_str())
                .map_err(|e| db_err(p, e))?
                .is_some();
            if !known_user || !known_item {
                n += 1;
            }
        }
        Ok(n)
    }
}

/// The three files of an AgentSociety-style release in `dir`: `user.json`, `item.json`,
/// `review.json` (JSON Lines; the `.jsonl` names are accepted too).
pub fn release_files(dir: &Path) -> Result<[PathBuf; 3]> {
    let find = |stem: &str| -> Result<PathBuf> {
        for ext in ["json", "jsonl"] {
            let p = dir.join(format!("{stem}.{ext}"));
            if p.exists() {
                return Ok(p);
            }
        }
        Err(AgentError::Input(format!(
            "{}: no {stem}.json (an AgentSociety/AgentRecBench data folder holds user.json, item.json and review.json, JSON Lines)",
            dir.display()
        )))
    };
    Ok([find("user")?, find("item")?, find("review")?])
}

/// Stream one JSON Lines file, calling `f` with each object and its line number.
fn stream_lines(
    path: &Path,
    opts: &BuildOptions,
    meta_skipped: &mut (u64, Vec<String>),
    done: &mut u64,
    total: u64,
    progress: &dyn BuildProgress,
    mut f: impl FnMut(Map<String, Value>) -> std::result::Result<(), String>,
) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| crate::io_err(path, e))?;
    let mut rd = std::io::BufReader::with_capacity(1 << 20, file);
    let mut line = Vec::new();
    let mut ln = 0usize;
    loop {
        line.clear();
        let n = rd
            .read_until(b'\n', &mut line)
            .map_err(|e| crate::io_err(path, e))?;
        if n == 0 {
            break;
        }
        ln += 1;
        *done += n as u64;
        if ln.is_multiple_of(20_000) {
            progress.bytes(*done, total);
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        let res = match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(m)) => f(m),
            Ok(_) => Err("not a JSON object".to_string()),
            Err(e) => Err(format!("not JSON ({e})")),
        };
        if let Err(reason) = res {
            if reason.starts_with("store:") {
                return Err(AgentError::Input(reason));
            }
            if !opts.lenient {
                return Err(AgentError::Input(format!(
                    "{}:{ln}: {reason} (fix the line, or build with --lenient to skip and count bad lines)",
                    path.display()
                )));
            }
            meta_skipped.0 += 1;
            if meta_skipped.1.len() < 5 {
                meta_skipped
                    .1
                    .push(format!("{}:{ln}: {reason}", path.display()));
            }
        }
    }
    progress.bytes(*done, total);
    Ok(())
}

impl Store {
    /// Open a built store.
    pub fn open(path: &Path) -> Result<Store> {
        if !path.exists() {
            return Err(AgentError::Input(format!(
                "{}: no record store (build it with `rudder bench agentrec store`)",
                path.display()
            )));
        }
        let db = match Database::builder()
            .set_cache_size(READ_CACHE)
            .open_read_only(path)
        {
            Ok(db) => db,
            Err(first) => {
                // A file left open for writing by a killed process needs a repair, which only
                // a writable open does; repair once, then read.
                drop(
                    Database::builder()
                        .open(path)
                        .map_err(|_| db_err(path, &first))?,
                );
                Database::builder()
                    .set_cache_size(READ_CACHE)
                    .open_read_only(path)
                    .map_err(|e| db_err(path, e))?
            }
        };
        let meta = {
            let tx = db.begin_read().map_err(|e| db_err(path, e))?;
            let t = tx.open_table(META).map_err(|e| db_err(path, e))?;
            let v = t
                .get("meta")
                .map_err(|e| db_err(path, e))?
                .ok_or_else(|| db_err(path, "no meta record (an unfinished build?)"))?;
            serde_json::from_str::<StoreMeta>(v.value())
                .map_err(|e| db_err(path, format!("meta record: {e}")))?
        };
        if meta.version != STORE_VERSION {
            return Err(db_err(
                path,
                format!(
                    "built by another version ({}; this is {STORE_VERSION}): rebuild it",
                    meta.version
                ),
            ));
        }
        Ok(Store {
            db,
            path: path.to_path_buf(),
            meta,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Build a store at `dest` from an AgentSociety/AgentRecBench data folder (streamed; the
    /// store is written beside `dest` and renamed into place when complete).
    pub fn build_release(
        dir: &Path,
        dest: &Path,
        opts: &BuildOptions,
        progress: &dyn BuildProgress,
    ) -> Result<Store> {
        let started = std::time::Instant::now();
        let files = release_files(dir)?;
        let total: u64 = files
            .iter()
            .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
            .sum();
        let tmp = dest.with_extension("redb.partial");
        let mut b = Builder::new(&tmp, &dir.display().to_string())?;
        let mut skipped = (0u64, Vec::new());
        let mut done = 0u64;
        let store_err = |e: AgentError| format!("store: {e}");
        // users, then items: records keyed by their id under the release's field names
        for (file, kind, keys, name) in [
            (&files[0], K_USER, &["user_id"][..], "user_id"),
            (&files[1], K_ITEM, &ITEM_ID_KEYS[..], "item_id"),
        ] {
            stream_lines(
                file,
                opts,
                &mut skipped,
                &mut done,
                total,
                progress,
                |mut r| {
                    let id = str_field(&r, keys).ok_or_else(|| format!("no `{name}`"))?;
                    r.insert(name.into(), id.clone().into());
                    b.push(kind, id, Value::Object(r)).map_err(store_err)
                },
            )?;
        }
        stream_lines(
            &files[2],
            opts,
            &mut skipped,
            &mut done,
            total,
            progress,
            |r| b.review(r, ""),
        )?;
        b.meta.skipped_lines = skipped.0;
        b.meta.skipped_examples = skipped.1;
        b.finish(dest, started)
    }

    /// Build a store from a rudder dataset with ratings and timestamps (MovieLens: users with
    /// their table's fields, movies with title, genres and year, ratings as reviews without
    /// text).
    pub fn build_dataset(ds: &Dataset, dest: &Path) -> Result<Store> {
        let started = std::time::Instant::now();
        if !ds.interactions.has_timestamps() {
            return Err(AgentError::Input(format!(
                "{}: the interactions have no timestamps (the benchmark's scenarios cut by time)",
                ds.name
            )));
        }
        let tmp = dest.with_extension("redb.partial");
        let mut b = Builder::new(&tmp, &ds.name)?;
        let src = ds.name.clone();
        for u in 0..ds.n_users() as u32 {
            let id = ds.users.ext(u).to_string();
            let mut r = Map::new();
            r.insert("user_id".into(), id.clone().into());
            r.insert("source".into(), src.clone().into());
            for (k, col) in &ds.user_table.fields {
                if let Some(v) = col.get(u as usize) {
                    r.insert(k.clone(), v.clone().into());
                }
            }
            b.push(K_USER, id, Value::Object(r))?;
        }
        for i in 0..ds.n_items() as u32 {
            let id = ds.items.ext(i).to_string();
            let mut r = Map::new();
            r.insert("item_id".into(), id.clone().into());
            r.insert("source".into(), src.clone().into());
            if let Some(t) = ds.item_table.title(i) {
                r.insert("title".into(), t.into());
                if let Some(y) = year_of_title(t) {
                    r.insert("year".into(), y.into());
                }
            }
            for (k, col) in &ds.item_table.fields {
                if let Some(v) = col.get(i as usize) {
                    if k == "genres" {
                        let g: Vec<Value> = v
                            .split('|')
                            .map(str::trim)
                            .filter(|s| !s.is_empty())
                            .map(Value::from)
                            .collect();
                        r.insert(k.clone(), Value::Array(g));
                    } else {
                        r.insert(k.clone(), v.clone().into());
                    }
                }
            }
            b.push(K_ITEM, id, Value::Object(r))?;
        }
        for it in ds.interactions.iter() {
            let user = ds.users.ext(it.user);
            let item = ds.items.ext(it.item);
            let mut r = Map::new();
            r.insert("user_id".into(), user.into());
            r.insert("item_id".into(), item.into());
            if let Some(s) = it.rating {
                r.insert("stars".into(), json!(s));
            }
            r.insert(
                "timestamp".into(),
                it.timestamp.map_or(Value::Null, Value::from),
            );
            r.insert("text".into(), "".into());
            r.insert("source".into(), src.clone().into());
            b.review(r, &src).map_err(AgentError::Input)?;
        }
        b.finish(dest, started)
    }

    fn read_json(&self, table: TableDefinition<&str, &[u8]>, id: &str) -> Result<Option<Value>> {
        let p = &self.path;
        let tx = self.db.begin_read().map_err(|e| db_err(p, e))?;
        let t = tx.open_table(table).map_err(|e| db_err(p, e))?;
        match t.get(id).map_err(|e| db_err(p, e))? {
            Some(v) => Ok(Some(
                serde_json::from_slice(v.value()).map_err(|e| db_err(p, e))?,
            )),
            None => Ok(None),
        }
    }

    pub fn user(&self, id: &str) -> Result<Option<Value>> {
        self.read_json(USERS, id)
    }

    pub fn item(&self, id: &str) -> Result<Option<Value>> {
        self.read_json(ITEMS, id)
    }

    /// A review record (with its `_time`).
    pub fn review(&self, id: &str) -> Result<Option<Value>> {
        self.read_json(REVIEWS, id)
    }

    fn index(
        &self,
        table: TableDefinition<&[u8], &str>,
        owner: &str,
        before: Option<i64>,
    ) -> Result<Vec<ReviewRef>> {
        let p = &self.path;
        let tx = self.db.begin_read().map_err(|e| db_err(p, e))?;
        let t = tx.open_table(table).map_err(|e| db_err(p, e))?;
        let mut lo = owner.as_bytes().to_vec();
        lo.push(0);
        let mut hi = owner.as_bytes().to_vec();
        match before {
            // Dated reviews strictly before the cut-off (undated ones sort first and are
            // excluded by starting after them).
            Some(b) => {
                hi.push(0);
                hi.extend_from_slice(&time_key(Some(b)));
                lo.extend_from_slice(&1u64.to_be_bytes());
            }
            None => hi.push(1),
        }
        let mut out = Vec::new();
        for kv in t
            .range::<&[u8]>(lo.as_slice()..hi.as_slice())
            .map_err(|e| db_err(p, e))?
        {
            let (k, v) = kv.map_err(|e| db_err(p, e))?;
            let k = k.value();
            let rest = &k[owner.len() + 1..];
            let time = time_of_key(&rest[..8]);
            let review_id = String::from_utf8_lossy(&rest[8..]).into_owned();
            let mut f = v.value().split('\t');
            let other = f.next().unwrap_or_default().to_string();
            let stars = f.next().and_then(|s| s.parse().ok());
            out.push(ReviewRef {
                review_id,
                other,
                time,
                stars,
            });
        }
        Ok(out)
    }

    /// A user's reviews in time order (dated before `before` only, when given).
    pub fn user_reviews(&self, user: &str, before: Option<i64>) -> Result<Vec<ReviewRef>> {
        self.index(BY_USER, user, before)
    }

    /// An item's reviews in time order (dated before `before` only, when given).
    pub fn item_reviews(&self, item: &str, before: Option<i64>) -> Result<Vec<ReviewRef>> {
        self.index(BY_ITEM, item, before)
    }

    /// Every (user, item, stars, time) of the store, as a rudder dataset (users and items in
    /// key order, the items' titles from `title`/`name`); what the task builders and the CF
    /// recommenders read.
    pub fn interactions(&self) -> Result<Dataset> {
        let p = &self.path;
        let tx = self.db.begin_read().map_err(|e| db_err(p, e))?;
        let t = tx.open_table(BY_USER).map_err(|e| db_err(p, e))?;
        let mut b = rudder_data::builder::DatasetBuilder::new();
        for kv in t.iter().map_err(|e| db_err(p, e))? {
            let (k, v) = kv.map_err(|e| db_err(p, e))?;
            let k = k.value();
            let z = k.iter().position(|&b| b == 0).unwrap_or(0);
            let user = std::str::from_utf8(&k[..z]).unwrap_or_default();
            let time = time_of_key(&k[z + 1..z + 9]);
            let mut f = v.value().split('\t');
            let item = f.next().unwrap_or_default();
            let stars = f.next().and_then(|s| s.parse::<f32>().ok());
            b.add(user, item, stars, time);
        }
        if b.is_empty() {
            return Err(AgentError::Input(format!(
                "{}: the store holds no reviews",
                p.display()
            )));
        }
        Ok(b.finish(&self.meta.source, None, None))
    }

    /// A short display name of an item (title, name, else its id).
    pub fn item_name(&self, id: &str) -> Result<String> {
        Ok(self
            .item(id)?
            .and_then(|r| {
                ["title", "name"]
                    .iter()
                    .find_map(|k| r.get(*k).and_then(Value::as_str).map(str::to_string))
            })
            .unwrap_or_else(|| id.to_string()))
    }
}

/// The year in a MovieLens title such as `Heat (1995)`.
pub fn year_of_title(t: &str) -> Option<i64> {
    let t = t.trim_end();
    let open = t.rfind('(')?;
    let inner = t[open + 1..].strip_suffix(')')?;
    (inner.len() == 4).then(|| inner.parse().ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_of_the_three_sources() {
        assert_eq!(parse_date("1970-01-02"), Some(86400));
        assert_eq!(parse_date("2018-07-07 22:09:11"), Some(1_531_001_351));
        // Goodreads: local time with offset.
        assert_eq!(
            parse_date("Fri Aug 25 13:55:02 -0700 2017"),
            Some(1_503_694_502)
        );
        assert_eq!(parse_date("yesterday"), None);
        let mut m = Map::new();
        m.insert("timestamp".into(), json!(1_588_615_855_070i64));
        assert_eq!(review_time(&m), Some(1_588_615_855));
        m.insert("timestamp".into(), json!(978_300_760));
        assert_eq!(review_time(&m), Some(978_300_760));
    }

    #[test]
    fn time_keys_order_and_round_trip() {
        let ts = [None, Some(-5), Some(0), Some(3), Some(1_700_000_000)];
        for w in ts.windows(2) {
            assert!(time_key(w[0]) < time_key(w[1]));
        }
        for t in ts {
            assert_eq!(time_of_key(&time_key(t)), t);
        }
    }

    #[test]
    fn review_ids_are_stable() {
        let a = review_id_of("amazon", "u1", "i1", Some(5));
        assert_eq!(a, review_id_of("amazon", "u1", "i1", Some(5)));
        assert_ne!(a, review_id_of("amazon", "u1", "i1", Some(6)));
        assert_eq!(year_of_title("Heat (1995)"), Some(1995));
        assert_eq!(year_of_title("Heat"), None);
    }
}
