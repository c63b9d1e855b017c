//! Record/replay of LLM exchanges, so tests and repeated runs are deterministic and free.
//!
//! A cassette is an append-only JSON Lines file of `{key, endpoint, request, response,
//! latency_ms, recorded_at}`. The key is the SHA-256 of the canonical JSON (keys sorted, no
//! whitespace) of `{endpoint, request}`, plus an occurrence number when the request samples
//! (temperature > 0), so that the k-th identical sampled call of a run maps to the k-th
//! recorded sample. A torn last line (a crash while writing) is cut off on open; any other
//! malformed line is an error naming it.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::{ClientError, Result};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CacheMode {
    /// No cache.
    #[default]
    Off,
    /// Always call the backend and record the answer.
    Record,
    /// Only recorded answers; a request never recorded is an error (what CI needs).
    Replay,
    /// Recorded answers where they exist; call and record the rest.
    RecordMissing,
}

impl std::str::FromStr for CacheMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "off" => CacheMode::Off,
            "record" => CacheMode::Record,
            "replay" => CacheMode::Replay,
            "record-missing" => CacheMode::RecordMissing,
            _ => {
                return Err(format!(
                    "unknown cache mode {s:?} (off, record, replay, record-missing)"
                ));
            }
        })
    }
}

/// Canonical JSON: object keys sorted at every level, no whitespace.
pub fn canonical(v: &Value) -> String {
    fn walk(v: &Value, out: &mut String) {
        match v {
            Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                out.push('{');
                for (i, k) in keys.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&serde_json::to_string(k).unwrap_or_default());
                    out.push(':');
                    walk(&m[*k], out);
                }
                out.push('}');
            }
            Value::Array(a) => {
                out.push('[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    walk(x, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut s = String::new();
    walk(v, &mut s);
    s
}

#[derive(Serialize, Deserialize)]
struct Entry {
    key: String,
    endpoint: String,
    request: Value,
    response: Value,
    latency_ms: f64,
    recorded_at: u64,
}

pub struct Cassette {
    path: PathBuf,
    entries: Mutex<HashMap<String, Value>>,
    seen: Mutex<HashMap<String, u32>>,
    file: Mutex<File>,
}

impl Cassette {
    /// Open (or create) a cassette file.
    pub fn open(path: &Path) -> Result<Self> {
        let err = |m: String| ClientError::Local(format!("{}: {m}", path.display()));
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
        }
        let mut entries = HashMap::new();
        if path.exists() {
            let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
            let mut good = 0usize; // bytes of complete, valid lines
            let mut pos = 0usize;
            let mut line_no = 0usize;
            while pos < bytes.len() {
                line_no += 1;
                let end = bytes[pos..].iter().position(|&b| b == b'\n');
                let (line, next, complete) = match end {
                    Some(e) => (&bytes[pos..pos + e], pos + e + 1, true),
                    None => (&bytes[pos..], bytes.len(), false),
                };
                if line.iter().all(|b| b.is_ascii_whitespace()) {
                    pos = next;
                    good = next;
                    continue;
                }
                match serde_json::from_slice::<Entry>(line) {
                    Ok(e) if complete => {
                        entries.insert(e.key, e.response);
                        good = next;
                    }
                    _ if next == bytes.len() => {
                        // the last line was cut short by a crash: drop it
                        tracing::warn!(
                            "{}: line {line_no} is incomplete (torn write); dropped",
                            path.display()
                        );
                        break;
                    }
                    Ok(_) => unreachable!("only the last line can lack its newline"),
                    Err(e) => {
                        return Err(err(format!("line {line_no}: not a cassette entry ({e})")));
                    }
                }
                pos = next;
            }
            if good < bytes.len() {
                let f = OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(|e| err(e.to_string()))?;
                f.set_len(good as u64).map_err(|e| err(e.to_string()))?;
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| err(e.to_string()))?;
        Ok(Cassette {
            path: path.to_path_buf(),
            entries: Mutex::new(entries),
            seen: Mutex::new(HashMap::new()),
            file: Mutex::new(file),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The key of a request. Sampled requests also count their occurrences in this process.
    pub fn key(&self, endpoint: &str, request: &Value, sampled: bool) -> String {
        let base = canonical(&serde_json::json!({"endpoint": endpoint, "request": request}));
        let mut h = Sha256::new();
        h.update(base.as_bytes());
        if sampled {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            let n = seen.entry(base).or_insert(0);
            h.update(format!("#sample{n}").as_bytes());
            *n += 1;
        }
        let d = h.finalize();
        d.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn get(&self, key: &str) -> Option<Value> {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }

    /// Record an answer (one appended line, flushed).
    pub fn put(
        &self,
        key: &str,
        endpoint: &str,
        request: Value,
        response: Value,
        latency: Duration,
    ) -> Result<()> {
        let e = Entry {
            key: key.to_string(),
            endpoint: endpoint.to_string(),
            request,
            response: response.clone(),
            latency_ms: latency.as_secs_f64() * 1e3,
            recorded_at: crate::openai::now_secs(),
        };
        let mut line = serde_json::to_string(&e)
            .map_err(|e| ClientError::Local(format!("cannot serialise a cassette entry: {e}")))?;
        line.push('\n');
        {
            let mut f = self.file.lock().unwrap_or_else(|e| e.into_inner());
            f.write_all(line.as_bytes())
                .and_then(|_| f.flush())
                .map_err(|e| ClientError::Local(format!("{}: {e}", self.path.display())))?;
        }
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.to_string(), response);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_are_canonical_and_count_samples() {
        let tmp = tempfile::tempdir().unwrap();
        let c = Cassette::open(&tmp.path().join("c.jsonl")).unwrap();
        let a = json!({"b": 1, "a": [1, {"y": 2, "x": 3}]});
        let b: Value = serde_json::from_str(r#"{"a": [1, {"x": 3, "y": 2}], "b": 1}"#).unwrap();
        assert_eq!(canonical(&a), canonical(&b));
        assert_eq!(c.key("chat", &a, false), c.key("chat", &b, false));
        assert_ne!(c.key("chat", &a, false), c.key("score", &a, false));
        let s1 = c.key("chat", &a, true);
        let s2 = c.key("chat", &a, true);
        assert_ne!(
            s1, s2,
            "the second identical sampled call is another sample"
        );
    }

    #[test]
    fn torn_last_line_is_repaired_and_bad_lines_are_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("c.jsonl");
        {
            let c = Cassette::open(&p).unwrap();
            c.put("k1", "chat", json!({}), json!({"x": 1}), Duration::ZERO)
                .unwrap();
            c.put("k2", "chat", json!({}), json!({"x": 2}), Duration::ZERO)
                .unwrap();
        }
        let mut bytes = std::fs::read(&p).unwrap();
        let full = bytes.len();
        bytes.extend_from_slice(b"{\"key\": \"k3\", \"endp");
        std::fs::write(&p, &bytes).unwrap();
        let c = Cassette::open(&p).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c.get("k2").unwrap(), json!({"x": 2}));
        assert_eq!(std::fs::metadata(&p).unwrap().len() as usize, full);
        c.put("k3", "chat", json!({}), json!({"x": 3}), Duration::ZERO)
            .unwrap();
        drop(c);
        assert_eq!(Cassette::open(&p).unwrap().len(), 3);
        // a broken line in the middle is not silently dropped
        let text = std::fs::read_to_string(&p).unwrap();
        let mut lines: Vec<&str> = text.lines().collect();
        lines[1] = "not json";
        std::fs::write(&p, lines.join("\n") + "\n").unwrap();
        let e = Cassette::open(&p).err().unwrap().to_string();
        assert!(e.contains("line 2"), "{e}");
    }
}
