//! The append-only journal of a simulation: every LLM exchange and every agent step, one JSON
//! object per line, flushed as it is written.
//!
//! Resume re-runs each unfinished episode from its start, answering every call that the journal
//! already holds from the journal (after checking that the request is the one recorded), so a
//! finished step is neither repeated nor lost and the resumed run follows exactly the path of an
//! uninterrupted one. A torn last line (a kill in the middle of a write) is cut off and reported;
//! any other line that does not parse is an error naming it.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_json::Value;

use crate::{AgentError, Result, io_err};

/// Where a call sits: (scope, agent, sequence number within the agent's episode).
pub type CallKey = (String, u32, u32);

pub struct Journal {
    path: PathBuf,
    file: Mutex<std::fs::File>,
    calls: HashMap<CallKey, (usize, Value)>,
    steps: Mutex<HashSet<(String, u32, String)>>,
    /// Lines read back on open.
    pub resumed_lines: usize,
    /// Bytes cut off a torn last line on open.
    pub repaired_bytes: usize,
}

impl Journal {
    /// Create a new journal (an existing one is refused unless `resume`), or open one to resume:
    /// its header must equal `header` (the run's settings), else the run is refused.
    pub fn open(path: &Path, header: &Value, resume: bool) -> Result<Journal> {
        let exists = path.exists();
        if exists && !resume {
            return Err(AgentError::Input(format!(
                "{} exists: resume that run with --resume, or choose another --out",
                path.display()
            )));
        }
        let mut calls = HashMap::new();
        let mut steps = HashSet::new();
        let mut resumed_lines = 0;
        let mut repaired_bytes = 0;
        if exists {
            let bytes = std::fs::read(path).map_err(|e| io_err(path, e))?;
            let mut good_end = 0usize;
            let mut line_no = 0usize;
            let mut start = 0usize;
            while start < bytes.len() {
                line_no += 1;
                let end = bytes[start..]
                    .iter()
                    .position(|&b| b == b'\n')
                    .map(|p| start + p);
                let (line, next, terminated) = match end {
                    Some(e) => (&bytes[start..e], e + 1, true),
                    None => (&bytes[start..], bytes.len(), false),
                };
                let parsed: std::result::Result<Value, _> = serde_json::from_slice(line);
                match parsed {
                    Ok(v) if terminated => {
                        if line_no == 1 {
                            check_header(path, &v, header)?;
                        } else {
                            index(path, line_no, v, &mut calls, &mut steps)?;
                        }
                        good_end = next;
                        resumed_lines += 1;
                    }
                    _ if !terminated => {
                        // the last line was being written when the run died
                        repaired_bytes = bytes.len() - start;
                        break;
                    }
                    Ok(_) => unreachable!(),
                    Err(e) => {
                        return Err(AgentError::Journal {
                            path: path.display().to_string(),
                            line: line_no,
                            reason: format!(
                                "not a journal record ({e}); only a torn last line is repaired"
                            ),
                        });
                    }
                }
                start = next;
            }
            if repaired_bytes > 0 {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(|e| io_err(path, e))?;
                f.set_len(good_end as u64).map_err(|e| io_err(path, e))?;
                tracing::warn!(
                    "{}: cut off a torn last line ({repaired_bytes} bytes) left by an interrupted run",
                    path.display()
                );
            }
            if resumed_lines == 0 {
                // only a torn header: start afresh
                std::fs::remove_file(path).map_err(|e| io_err(path, e))?;
            }
        }
        let fresh = !path.exists();
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| io_err(path, e))?;
        if fresh {
            writeln!(file, "{header}").map_err(|e| io_err(path, e))?;
            file.flush().map_err(|e| io_err(path, e))?;
        }
        Ok(Journal {
            path: path.to_path_buf(),
            file: Mutex::new(file),
            calls,
            steps: Mutex::new(steps),
            resumed_lines,
            repaired_bytes,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The recorded exchange of a call (its line number and record).
    pub fn call(&self, key: &CallKey) -> Option<&(usize, Value)> {
        self.calls.get(key)
    }

    /// Calls recorded on open.
    pub fn n_calls(&self) -> usize {
        self.calls.len()
    }

    /// Append one record (a line, flushed).
    pub fn append(&self, v: &Value) -> Result<()> {
        let mut line = v.to_string();
        line.push('\n');
        let mut f = self.file.lock().unwrap_or_else(|e| e.into_inner());
        f.write_all(line.as_bytes())
            .and_then(|_| f.flush())
            .map_err(|e| io_err(&self.path, e))
    }

    /// Append a step record unless one with the same (scope, agent, id) was written before
    /// (by this run or the one resumed).
    pub fn step(&self, scope: &str, agent: u32, id: &str, mut v: Value) -> Result<()> {
        let key = (scope.to_string(), agent, id.to_string());
        {
            let mut s = self.steps.lock().unwrap_or_else(|e| e.into_inner());
            if !s.insert(key) {
                return Ok(());
            }
        }
        v["t"] = "step".into();
        v["scope"] = scope.into();
        v["agent"] = agent.into();
        v["id"] = id.into();
        self.append(&v)
    }
}

/// Every setting of `want` must be in the journal's header with the same value (settings a
/// later version no longer records are ignored).
fn check_header(path: &Path, got: &Value, want: &Value) -> Result<()> {
    let differs = match want.as_object() {
        Some(o) => o.iter().any(|(k, v)| got.get(k.as_str()) != Some(v)),
        None => got != want,
    };
    if differs {
        let diff: Vec<String> = want
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, v)| got.get(k.as_str()) != Some(v))
            .map(|(k, v)| {
                format!(
                    "`{k}`: journal {} vs now {v}",
                    got.get(k.as_str()).unwrap_or(&Value::Null)
                )
            })
            .collect();
        return Err(AgentError::Journal {
            path: path.display().to_string(),
            line: 1,
            reason: format!(
                "the journal was written with other settings ({}); resume with the same settings or start a new --out",
                if diff.is_empty() {
                    "header differs".to_string()
                } else {
                    diff.join("; ")
                }
            ),
        });
    }
    Ok(())
}

fn index(
    path: &Path,
    line: usize,
    v: Value,
    calls: &mut HashMap<CallKey, (usize, Value)>,
    steps: &mut HashSet<(String, u32, String)>,
) -> Result<()> {
    let bad = |reason: &str| AgentError::Journal {
        path: path.display().to_string(),
        line,
        reason: reason.to_string(),
    };
    let scope = v
        .get("scope")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("no `scope`"))?
        .to_string();
    let agent = v
        .get("agent")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad("no `agent`"))? as u32;
    match v.get("t").and_then(Value::as_str) {
        Some("llm") => {
            let seq = v
                .get("seq")
                .and_then(Value::as_u64)
                .ok_or_else(|| bad("an LLM record without `seq`"))? as u32;
            if v.get("hash").and_then(Value::as_str).is_none() || v.get("reply").is_none() {
                return Err(bad("an LLM record without `hash` or `reply`"));
            }
            calls.insert((scope, agent, seq), (line, v));
        }
        Some("step") => {
            let id = v
                .get("id")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("a step record without `id`"))?;
            steps.insert((scope, agent, id.to_string()));
        }
        Some(other) => return Err(bad(&format!("unknown record type `{other}`"))),
        None => return Err(bad("no record type `t`")),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn header() -> Value {
        json!({"t": "header", "seed": 1})
    }

    #[test]
    fn appends_indexes_and_refuses_to_overwrite() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("j.jsonl");
        let j = Journal::open(&p, &header(), false).unwrap();
        j.append(
            &json!({"t": "llm", "scope": "s", "agent": 3, "seq": 0, "hash": "h", "reply": "hi"}),
        )
        .unwrap();
        j.step("s", 3, "page1", json!({"x": 1})).unwrap();
        j.step("s", 3, "page1", json!({"x": 2})).unwrap();
        drop(j);
        assert!(Journal::open(&p, &header(), false).is_err());
        let j = Journal::open(&p, &header(), true).unwrap();
        assert_eq!(j.resumed_lines, 3, "the duplicate step was not written");
        assert_eq!(j.call(&("s".into(), 3, 0)).unwrap().1["reply"], "hi");
        j.step("s", 3, "page1", json!({})).unwrap();
        drop(j);
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(
            text.lines().count(),
            3,
            "a resumed step is not written twice"
        );
    }

    #[test]
    fn torn_last_line_is_repaired_anything_else_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("j.jsonl");
        let good = format!(
            "{}\n{}\n",
            header(),
            json!({"t": "step", "scope": "s", "agent": 0, "id": "a"})
        );
        std::fs::write(&p, format!("{good}{{\"t\": \"llm\", \"sco")).unwrap();
        let j = Journal::open(&p, &header(), true).unwrap();
        assert!(j.repaired_bytes > 0);
        drop(j);
        assert_eq!(std::fs::read_to_string(&p).unwrap(), good);

        std::fs::write(&p, format!("{}\nnot json\n{}\n", header(), header())).unwrap();
        let e = Journal::open(&p, &header(), true)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("j.jsonl:2: not a journal record"), "{e}");

        std::fs::write(&p, format!("{}\n", json!({"t": "header", "seed": 2}))).unwrap();
        let e = Journal::open(&p, &header(), true)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains(":1: the journal was written with other settings"),
            "{e}"
        );
        assert!(e.contains("`seed`"), "{e}");

        std::fs::write(
            &p,
            format!(
                "{}\n{}\n",
                header(),
                json!({"t": "llm", "scope": "s", "agent": 0})
            ),
        )
        .unwrap();
        let e = Journal::open(&p, &header(), true)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(":2: an LLM record without `seq`"), "{e}");
    }
}
