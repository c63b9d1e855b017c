//! Rollouts: many generations per prompt under an optional intervention, batched through
//! rudder-lm's continuous-batching engine, each scored (reasoning length before the
//! end-of-reasoning marker, extracted answer, grade) and appended to a journal as it finishes.
//! A journal is append-only JSON Lines; a run that is killed resumes without redoing or losing
//! a finished rollout (a torn last line is cut off on open; any other bad line is an error
//! naming it).

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use rudder_lm::engine::{Engine, Event, Job, SubmitError};
use rudder_lm::generate::{Finish, GenConfig};
use rudder_lm::hooks::Interventions;
use serde::{Deserialize, Serialize};

use crate::grade::{Method, Verdict, extract, grade, split_reasoning};
use crate::{Result, SteerError};

/// One finished generation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// Which experiment (e.g. "labels", "sweep").
    pub tag: String,
    pub question: usize,
    pub rollout: usize,
    pub alpha: f64,
    pub generated_tokens: usize,
    /// Tokens of the reasoning span (before the marker; the whole response without one).
    pub reasoning_tokens: usize,
    pub answer_tokens: usize,
    pub marker_found: bool,
    pub finish: Finish,
    pub answer: Option<String>,
    pub method: Method,
    pub verdict: Option<Verdict>,
    pub text: String,
}

impl Rollout {
    pub fn key(&self) -> (String, usize, usize, u64) {
        (
            self.tag.clone(),
            self.question,
            self.rollout,
            self.alpha.to_bits(),
        )
    }
}

pub struct Journal {
    path: PathBuf,
    file: File,
    pub rows: Vec<Rollout>,
    done: HashSet<(String, usize, usize, u64)>,
}

impl Journal {
    pub fn open(path: &Path) -> Result<Self> {
        let mut rows = Vec::new();
        if path.exists() {
            let bytes = std::fs::read(path).map_err(|e| SteerError::file(path, e))?;
            let mut good = 0;
            let mut pos = 0;
            let mut line_no = 0;
            while pos < bytes.len() {
                line_no += 1;
                let (line, next, complete) = match bytes[pos..].iter().position(|&b| b == b'\n') {
                    Some(e) => (&bytes[pos..pos + e], pos + e + 1, true),
                    None => (&bytes[pos..], bytes.len(), false),
                };
                if line.iter().all(|b| b.is_ascii_whitespace()) {
                    good = next;
                    pos = next;
                    continue;
                }
                match serde_json::from_slice::<Rollout>(line) {
                    Ok(r) if complete => {
                        rows.push(r);
                        good = next;
                    }
                    _ if next == bytes.len() => {
                        tracing::warn!("{}: line {line_no} was cut short; dropped", path.display());
                        break;
                    }
                    Err(e) => {
                        return Err(SteerError::file(
                            path,
                            format!("line {line_no}: not a rollout record ({e})"),
                        ));
                    }
                    Ok(_) => unreachable!(),
                }
                pos = next;
            }
            if good < bytes.len() {
                let f = OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(|e| SteerError::file(path, e))?;
                f.set_len(good as u64)
                    .map_err(|e| SteerError::file(path, e))?;
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| SteerError::file(path, e))?;
        let done = rows.iter().map(|r| r.key()).collect();
        Ok(Journal {
            path: path.to_path_buf(),
            file,
            rows,
            done,
        })
    }

    pub fn has(&self, tag: &str, q: usize, r: usize, alpha: f64) -> bool {
        self.done
            .contains(&(tag.to_string(), q, r, alpha.to_bits()))
    }

    pub fn append(&mut self, r: Rollout) -> Result<()> {
        let mut line = serde_json::to_string(&r)
            .map_err(|e| SteerError::Invalid(format!("cannot serialise a rollout: {e}")))?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.flush())
            .map_err(|e| SteerError::file(&self.path, e))?;
        self.done.insert(r.key());
        self.rows.push(r);
        Ok(())
    }

    /// The rows of one experiment.
    pub fn tagged<'a>(&'a self, tag: &'a str) -> impl Iterator<Item = &'a Rollout> + 'a {
        self.rows.iter().filter(move |r| r.tag == tag)
    }
}

/// How rollouts are sampled and scored.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RolloutConfig {
    pub per_prompt: usize,
    pub sampling: GenConfig,
    /// End-of-reasoning marker (`</think>`); none: the whole response is the reasoning.
    pub marker: Option<String>,
}

/// One batch of rollouts of one experiment: every (prompt, rollout) pair not yet in the
/// journal is generated (all submitted to the engine at once, which batches them), scored and
/// appended. `progress(done, total)` after each. Returns how many were generated now.
#[allow(clippy::too_many_arguments)]
pub fn run(
    engine: &Engine,
    tag: &str,
    prompts: &[Vec<u32>],
    gold: &[Option<String>],
    cfg: &RolloutConfig,
    alpha: f64,
    interventions: Option<&Interventions>,
    journal: &mut Journal,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<usize> {
    let lm = &engine.lm;
    let mut todo = Vec::new();
    for (q, _) in prompts.iter().enumerate() {
        for r in 0..cfg.per_prompt.max(1) {
            if !journal.has(tag, q, r, alpha) {
                todo.push((q, r));
            }
        }
    }
    let total = prompts.len() * cfg.per_prompt.max(1);
    let mut done = total - todo.len();
    progress(done, total);
    if todo.is_empty() {
        return Ok(0);
    }
    let fresh = todo.len();
    let (tx, rx) = mpsc::channel::<(
        usize,
        usize,
        std::result::Result<Box<rudder_lm::engine::Outcome>, String>,
    )>();
    let mut pending = todo.into_iter();
    let mut in_flight = 0usize;
    let cap = engine.cfg.max_queue.max(1) + engine.cfg.max_rows;
    let mut submit_more = |in_flight: &mut usize| -> Result<()> {
        while *in_flight < cap {
            let Some((q, r)) = pending.next() else { break };
            let mut j = Job::new(prompts[q].clone(), cfg.sampling.clone());
            // a distinct, reproducible stream per (question, rollout)
            j.stream_index = (q as u64) << 20 | r as u64;
            j.interventions = interventions.cloned();
            let tx = tx.clone();
            match engine.submit(
                j,
                Box::new(move |e| match e {
                    Event::Token(_) => true,
                    Event::Done(o) => tx.send((q, r, Ok(o))).is_ok(),
                    Event::Failed(m) => tx.send((q, r, Err(m))).is_ok(),
                }),
            ) {
                Ok(_) => *in_flight += 1,
                Err(SubmitError::Busy { .. }) => {
                    // the queue filled up (another user of the engine): retry later
                    return Ok(());
                }
                Err(e) => return Err(SteerError::Invalid(e.to_string())),
            }
        }
        Ok(())
    };
    submit_more(&mut in_flight)?;
    while in_flight > 0 {
        let (q, r, res) = rx
            .recv()
            .map_err(|_| SteerError::Invalid("the engine stopped".into()))?;
        in_flight -= 1;
        let o = res.map_err(|m| SteerError::Invalid(format!("question {q}, rollout {r}: {m}")))?;
        let (reasoning, answer_span, found) = split_reasoning(&o.text, cfg.marker.as_deref());
        let reasoning_tokens = if found {
            lm.tok.encode(reasoning, false)?.len()
        } else {
            o.tokens.len()
        };
        let answer_tokens = if found {
            lm.tok.encode(answer_span, false)?.len()
        } else {
            0
        };
        let (ans, method) = extract(if found { answer_span } else { &o.text });
        let verdict = gold
            .get(q)
            .and_then(|g| g.as_deref())
            .map(|g| grade(ans.as_deref(), g));
        journal.append(Rollout {
            tag: tag.to_string(),
            question: q,
            rollout: r,
            alpha,
            generated_tokens: o.tokens.len(),
            reasoning_tokens,
            answer_tokens,
            marker_found: found,
            finish: o.finish,
            answer: ans,
            method,
            verdict,
            text: o.text.clone(),
        })?;
        done += 1;
        progress(done, total);
        submit_more(&mut in_flight)?;
    }
    Ok(fresh)
}

/// What a group of rollouts amounts to.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    pub rollouts: usize,
    pub mean_reasoning_tokens: f64,
    /// Correct over graded (NaN when nothing had a gold answer).
    pub accuracy: f64,
    pub graded: usize,
    pub undecided: usize,
    pub finished_by_length: usize,
}

pub fn summarise<'a>(rows: impl IntoIterator<Item = &'a Rollout>) -> Summary {
    let (mut s, mut tokens, mut correct) = (Summary::default(), 0f64, 0usize);
    for r in rows {
        s.rollouts += 1;
        tokens += r.reasoning_tokens as f64;
        if let Some(v) = r.verdict {
            s.graded += 1;
            correct += (v == Verdict::Correct) as usize;
            s.undecided += (v == Verdict::Undecided) as usize;
        }
        s.finished_by_length += (r.finish == Finish::Length) as usize;
    }
    s.mean_reasoning_tokens = tokens / s.rollouts.max(1) as f64;
    s.accuracy = if s.graded > 0 {
        correct as f64 / s.graded as f64
    } else {
        f64::NAN
    };
    s
}

/// Per-question means over rollouts: (mean reasoning tokens, accuracy or NaN without gold).
pub fn per_question(rows: &[&Rollout], n: usize) -> Vec<(f64, f64)> {
    let mut sum = vec![(0f64, 0f64, 0usize, 0usize); n];
    for r in rows {
        if r.question >= n {
            continue;
        }
        let s = &mut sum[r.question];
        s.0 += r.reasoning_tokens as f64;
        s.2 += 1;
        if let Some(v) = r.verdict {
            s.3 += 1;
            if v == Verdict::Correct {
                s.1 += 1.0;
            }
        }
    }
    sum.into_iter()
        .map(|(l, c, k, g)| {
            (
                if k > 0 { l / k as f64 } else { f64::NAN },
                if g > 0 { c / g as f64 } else { f64::NAN },
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(q: usize, r: usize, alpha: f64) -> Rollout {
        Rollout {
            tag: "t".into(),
            question: q,
            rollout: r,
            alpha,
            generated_tokens: 10 + q,
            reasoning_tokens: 10 + q,
            answer_tokens: 0,
            marker_found: false,
            finish: Finish::Eos,
            answer: Some("1".into()),
            method: Method::LastNumber,
            verdict: Some(if r == 0 {
                Verdict::Correct
            } else {
                Verdict::Incorrect
            }),
            text: "1".into(),
        }
    }

    #[test]
    fn journal_resumes_repairs_and_rejects_bad_lines() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("j.jsonl");
        {
            let mut j = Journal::open(&p).unwrap();
            j.append(row(0, 0, 0.0)).unwrap();
            j.append(row(0, 1, 0.0)).unwrap();
        }
        let mut b = std::fs::read(&p).unwrap();
        let full = b.len();
        b.extend_from_slice(b"{\"tag\": \"t\", \"quest");
        std::fs::write(&p, &b).unwrap();
        let j = Journal::open(&p).unwrap();
        assert_eq!(j.rows.len(), 2);
        assert!(j.has("t", 0, 1, 0.0) && !j.has("t", 0, 1, 0.1));
        assert_eq!(std::fs::metadata(&p).unwrap().len() as usize, full);
        let pq = per_question(&j.tagged("t").collect::<Vec<_>>(), 1);
        assert_eq!(pq, vec![(10.0, 0.5)]);
        drop(j);
        let text = std::fs::read_to_string(&p).unwrap();
        std::fs::write(&p, format!("garbage\n{text}")).unwrap();
        let e = Journal::open(&p).err().unwrap().to_string();
        assert!(e.contains("line 1"), "{e}");
    }
}
