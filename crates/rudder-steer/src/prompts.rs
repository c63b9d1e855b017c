//! Prompt sets: JSON arrays (of objects or strings), JSON Lines, or plain text (one prompt per
//! line), with a named text field and an optional label field, rendered to token ids through a
//! user-message template and the model's own chat template.
//!
//! MATH difficulty labels are normalised as the reference does: an integer level k becomes
//! "Level k", and "Level ?" counts as "Level 3".

use std::path::{Path, PathBuf};

use rudder_lm::chat::Message;
use rudder_lm::loader::LanguageModel;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Result, SteerError};

/// Fields tried, in order, when no text field is named.
pub const TEXT_FIELDS: [&str; 6] = [
    "problem",
    "query",
    "prompt",
    "question",
    "instruction",
    "text",
];

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Prompt {
    pub text: String,
    pub label: Option<String>,
    /// The whole record (gold answers and other fields for evaluation).
    pub record: Value,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PromptSet {
    pub path: PathBuf,
    pub field: String,
    pub label_field: Option<String>,
    pub items: Vec<Prompt>,
}

/// The records of a JSON array (or an object with a "data"/"prompts"/"questions" array), JSON
/// Lines (`.jsonl`, or any file starting with `{`) or plain text (one string per line), each
/// with where it stood ("record 3", "line 4") for error messages. Python's NaN/Infinity
/// literals are accepted.
pub fn read_records(path: &Path) -> Result<Vec<(Value, String)>> {
    let text = std::fs::read_to_string(path).map_err(|e| SteerError::file(path, e))?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let start = text.trim_start().chars().next();
    let lines = || -> Result<Vec<(Value, String)>> {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                parse_lenient(l)
                    .map(|v| (v, format!("line {}", i + 1)))
                    .map_err(|e| {
                        SteerError::file(path, format!("line {}: invalid JSON: {e}", i + 1))
                    })
            })
            .collect()
    };
    if ext == "jsonl" {
        return lines();
    }
    if ext != "json" && !matches!(start, Some('[') | Some('{')) {
        return Ok(text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| (Value::String(l.to_string()), format!("line {}", i + 1)))
            .collect());
    }
    let v: Value = match parse_lenient(&text) {
        Ok(v) => v,
        // several objects, one per line
        Err(_) if start == Some('{') => return lines(),
        Err(e) => return Err(SteerError::file(path, format!("invalid JSON: {e}"))),
    };
    let arr = match v {
        Value::Array(a) => a,
        Value::Object(mut o) => match ["data", "prompts", "questions"]
            .iter()
            .find_map(|k| o.remove(*k))
        {
            Some(Value::Array(a)) => a,
            _ => {
                return Err(SteerError::file(
                    path,
                    "expected a JSON array of records (or an object with a \"data\" array)",
                ));
            }
        },
        _ => return Err(SteerError::file(path, "expected a JSON array of records")),
    };
    Ok(arr
        .into_iter()
        .enumerate()
        .map(|(i, v)| (v, format!("record {i}")))
        .collect())
}

/// JSON as Python writes it too: `NaN`, `Infinity` and `-Infinity` outside strings (pandas
/// exports, e.g. XSTest's `"note": NaN`) are read as `null` when strict parsing fails.
pub fn parse_lenient(text: &str) -> std::result::Result<Value, serde_json::Error> {
    match serde_json::from_str(text) {
        Ok(v) => Ok(v),
        Err(e) => {
            let fixed = python_literals_to_null(text);
            if fixed.len() == text.len() && fixed == text {
                return Err(e);
            }
            serde_json::from_str(&fixed).map_err(|_| e)
        }
    }
}

fn python_literals_to_null(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let (mut i, mut in_str, mut start) = (0, false, 0);
    while i < b.len() {
        let c = b[i];
        if in_str {
            if c == b'\\' {
                i += 2;
                continue;
            }
            if c == b'"' {
                in_str = false;
            }
            i += 1;
            continue;
        }
        if c == b'"' {
            in_str = true;
            i += 1;
            continue;
        }
        let rest = &text[i..];
        let tok = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|t| rest.starts_with(t));
        if let Some(t) = tok {
            out.push_str(&text[start..i]);
            out.push_str("null");
            i += t.len();
            start = i;
            continue;
        }
        i += 1;
    }
    out.push_str(&text[start..]);
    out
}

fn label_of(v: &Value, field: &str) -> Option<String> {
    let l = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => {
            if field == "level" {
                format!("Level {n}")
            } else {
                n.to_string()
            }
        }
        Value::Bool(b) => b.to_string(),
        _ => return None,
    };
    Some(if field == "level" && l == "Level ?" {
        "Level 3".into()
    } else {
        l
    })
}

impl PromptSet {
    /// Read a prompt file. `field`: the text field (default: the first of [`TEXT_FIELDS`] the
    /// first record has); `label`: a label field every record must have.
    pub fn load(path: &Path, field: Option<&str>, label: Option<&str>) -> Result<Self> {
        let records = read_records(path)?;
        if records.is_empty() {
            return Err(SteerError::file(path, "no prompts in the file"));
        }
        let field = match field {
            Some(f) => f.to_string(),
            None => match &records[0].0 {
                Value::String(_) => "text".to_string(),
                Value::Object(o) => TEXT_FIELDS
                    .iter()
                    .find(|f| o.get(**f).is_some_and(|v| v.is_string()))
                    .map(|f| f.to_string())
                    .ok_or_else(|| {
                        SteerError::file(
                            path,
                            format!(
                                "record 0 has none of the text fields {} (fields: {}); name one with --field",
                                TEXT_FIELDS.join(", "),
                                o.keys().cloned().collect::<Vec<_>>().join(", ")
                            ),
                        )
                    })?,
                _ => return Err(SteerError::file(path, "record 0 is neither an object nor a string")),
            },
        };
        let mut items = Vec::with_capacity(records.len());
        for (v, at) in records {
            let t = match &v {
                Value::String(s) => s.clone(),
                Value::Object(o) => match o.get(&field) {
                    Some(Value::String(s)) => s.clone(),
                    Some(_) => {
                        return Err(SteerError::file(
                            path,
                            format!("{at}: field {field:?} is not a string"),
                        ));
                    }
                    None => {
                        return Err(SteerError::file(
                            path,
                            format!("{at}: missing field {field:?}"),
                        ));
                    }
                },
                _ => return Err(SteerError::file(path, format!("{at}: not an object"))),
            };
            if t.trim().is_empty() {
                return Err(SteerError::file(
                    path,
                    format!("{at}: field {field:?} is empty"),
                ));
            }
            let label = match label {
                None => None,
                Some(lf) => Some(v.get(lf).and_then(|x| label_of(x, lf)).ok_or_else(|| {
                    SteerError::file(path, format!("{at}: missing label field {lf:?}"))
                })?),
            };
            items.push(Prompt {
                text: t,
                label,
                record: v,
            });
        }
        Ok(PromptSet {
            path: path.to_path_buf(),
            field,
            label_field: label.map(String::from),
            items,
        })
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The first `n` prompts (all when `n` is 0 or larger than the set).
    pub fn truncate(mut self, n: usize) -> Self {
        if n > 0 && n < self.items.len() {
            self.items.truncate(n);
        }
        self
    }

    pub fn labels(&self) -> Option<Vec<String>> {
        self.items.iter().map(|p| p.label.clone()).collect()
    }
}

/// How a prompt's text becomes the model's input.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rendering {
    /// User-message template; `{problem}` is replaced by the prompt's text.
    pub template: String,
    /// Through the model's chat template (with the assistant turn opened), or raw.
    pub chat: bool,
    pub system: Option<String>,
}

impl Rendering {
    pub fn plain(chat: bool) -> Self {
        Rendering {
            template: "{problem}".into(),
            chat,
            system: None,
        }
    }

    /// The reasoning-strength paper's user message (its `\b` quirk fixed: the model sees
    /// `\boxed{}`, not a backspace).
    pub fn reasoning() -> Self {
        Rendering {
            template: "Please reason step by step, and put your final answer within \\boxed{}.\nThis is the problem:\n{problem}".into(),
            chat: true,
            system: None,
        }
    }

    pub fn text(&self, problem: &str) -> String {
        self.template.replace("{problem}", problem)
    }

    /// Token ids of one prompt.
    pub fn ids(&self, lm: &LanguageModel, problem: &str) -> Result<Vec<u32>> {
        let user = self.text(problem);
        if !self.chat {
            return Ok(lm.tok.encode(&user, true)?);
        }
        let tpl = lm.chat.as_ref().ok_or_else(|| {
            SteerError::Invalid("the model has no chat template; use --raw".into())
        })?;
        let mut msgs = Vec::new();
        if let Some(s) = &self.system {
            msgs.push(Message::new("system", s));
        }
        msgs.push(Message::new("user", &user));
        Ok(lm.tok.encode(&tpl.render(&msgs, true)?, false)?)
    }

    /// The chat template's hash (recorded with every artefact), or "raw".
    pub fn template_hash(&self, lm: &LanguageModel) -> String {
        if self.chat {
            lm.chat
                .as_ref()
                .map(|t| t.hash())
                .unwrap_or_else(|| "none".into())
        } else {
            "raw".into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_nan_literals_read_as_null_but_not_inside_strings() {
        let v = parse_lenient(
            r#"[{"prompt": "say NaN \" Infinity", "note": NaN, "x": -Infinity, "y": Infinity}]"#,
        )
        .unwrap();
        assert_eq!(v[0]["prompt"], "say NaN \" Infinity");
        assert!(v[0]["note"].is_null() && v[0]["x"].is_null() && v[0]["y"].is_null());
        assert!(parse_lenient("[1, 2").is_err());
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("x.json");
        std::fs::write(&p, r#"[{"prompt": "a", "note": NaN}]"#).unwrap();
        assert_eq!(PromptSet::load(&p, None, None).unwrap().items[0].text, "a");
    }

    #[test]
    fn formats_fields_labels_and_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("m.json");
        std::fs::write(
            &p,
            r#"[{"problem": "1+1?", "level": "Level 1"}, {"problem": "2+2?", "level": "Level ?"}, {"problem": "x", "level": 5}]"#,
        )
        .unwrap();
        let s = PromptSet::load(&p, None, Some("level")).unwrap();
        assert_eq!(s.field, "problem");
        assert_eq!(
            s.labels().unwrap(),
            vec!["Level 1".to_string(), "Level 3".into(), "Level 5".into()]
        );
        let j = tmp.path().join("q.jsonl");
        std::fs::write(&j, "{\"query\": \"a\"}\n\n{\"query\": \"b\"}\n").unwrap();
        assert_eq!(PromptSet::load(&j, None, None).unwrap().len(), 2);
        let t = tmp.path().join("p.txt");
        std::fs::write(&t, "one\ntwo\n").unwrap();
        assert_eq!(
            PromptSet::load(&t, None, None).unwrap().items[1].text,
            "two"
        );
        for (body, want) in [
            ("[]", "no prompts"),
            (r#"[{"other": 1}]"#, "none of the text fields"),
            (
                r#"[{"problem": "a"}, {"nope": "b"}]"#,
                "record 1: missing field \"problem\"",
            ),
            (
                r#"[{"problem": "a"}, {"problem": 3}]"#,
                "record 1: field \"problem\" is not a string",
            ),
            ("[{", "invalid JSON"),
        ] {
            std::fs::write(&p, body).unwrap();
            let e = PromptSet::load(&p, None, None).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("m.json"), "{body}: {e}");
        }
        std::fs::write(&p, r#"[{"problem": "a"}]"#).unwrap();
        let e = PromptSet::load(&p, None, Some("level"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing label field \"level\""), "{e}");
        std::fs::write(&j, "{\"query\": \"a\"}\nnot json\n").unwrap();
        let e = PromptSet::load(&j, None, None).unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
    }
}
