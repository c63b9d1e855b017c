//! Reasoning spans, answer extraction and grading.
//!
//! - [`split_reasoning`]: the text before the first end-of-reasoning marker (`</think>` for
//!   reasoning models) is the reasoning; without the marker the whole response counts, as the
//!   reference does.
//! - [`extract`]: the last `\boxed{…}` (or `\fbox{…}`) with balanced braces; then the
//!   reference's fallbacks ("correct answer is X", "Answer: X", a lone capital A–E for
//!   multiple choice); then, marked as such, "the answer is X" and the last number in the text
//!   (small models rarely box their answers). The method used is returned with the answer.
//! - [`grade`]: both sides normalised (dollars, `\left`/`\right`, `\!`, `\text{}`, `\dfrac`,
//!   spaces, a trailing period, thousands separators, `^\circ`, a leading `x =`); numbers
//!   (integers, decimals, `a/b`, `\frac{a}{b}`, percentages) compare numerically
//!   (relative 1e-6); otherwise the normalised strings must be equal. When the strings differ
//!   and either side is an expression the grader cannot evaluate, the verdict is
//!   [`Verdict::Undecided`], counted apart rather than silently called wrong.

use serde::{Deserialize, Serialize};

/// Reasoning and answer spans of a response.
pub fn split_reasoning<'a>(text: &'a str, marker: Option<&str>) -> (&'a str, &'a str, bool) {
    match marker.and_then(|m| text.find(m).map(|i| (i, m.len()))) {
        Some((i, l)) => (&text[..i], &text[i + l..], true),
        None => (text, "", false),
    }
}

/// The content of the last `\boxed{…}` / `\fbox{…}` with balanced braces.
pub fn last_boxed(text: &str) -> Option<String> {
    let starts: Vec<usize> = ["\\boxed", "\\fbox"]
        .iter()
        .flat_map(|k| text.match_indices(k).map(|(i, _)| i + k.len()))
        .collect();
    let start = *starts.iter().max()?;
    let rest = &text[start..];
    let rest = rest.trim_start();
    if let Some(body) = rest.strip_prefix('{') {
        let mut depth = 1;
        for (i, c) in body.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        return Some(body[..i].to_string());
                    }
                }
                _ => {}
            }
        }
        None
    } else {
        // `\boxed 5`
        rest.split(|c: char| c.is_whitespace() || c == '$')
            .next()
            .filter(|s| !s.is_empty())
            .map(String::from)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    Boxed,
    CorrectAnswerIs,
    AnswerColon,
    ChoiceLetter,
    /// Not in the reference: "the answer is X".
    AnswerIs,
    /// Not in the reference: the last number in the text.
    LastNumber,
    None,
}

fn after_phrase(text: &str, phrase: &str) -> Option<String> {
    let lower = text.to_lowercase();
    let i = lower.rfind(phrase)?;
    let rest = text[i + phrase.len()..].trim_start_matches([' ', ':', '*']);
    let end = rest.find(['\n']).unwrap_or(rest.len());
    let s = rest[..end].trim().trim_end_matches(['.', '*']).trim();
    (!s.is_empty()).then(|| s.to_string())
}

fn last_number(text: &str) -> Option<String> {
    let b = text.as_bytes();
    let mut best: Option<(usize, usize)> = None;
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_digit() {
            let mut s = i;
            if s > 0 && b[s - 1] == b'-' {
                s -= 1;
            }
            let mut e = i;
            while e < b.len()
                && (b[e].is_ascii_digit() || b[e] == b',' || b[e] == b'.' || b[e] == b'/')
            {
                e += 1;
            }
            while e > i && matches!(b[e - 1], b',' | b'.' | b'/') {
                e -= 1;
            }
            best = Some((s, e));
            i = e.max(i + 1);
        } else {
            i += 1;
        }
    }
    best.map(|(s, e)| text[s..e].to_string())
}

/// The answer a response gives, and how it was found.
pub fn extract(text: &str) -> (Option<String>, Method) {
    if let Some(a) = last_boxed(text) {
        return (Some(a), Method::Boxed);
    }
    if let Some(a) = after_phrase(text, "correct answer is") {
        return (Some(a), Method::CorrectAnswerIs);
    }
    if let Some(a) = after_phrase(text, "answer:") {
        return (Some(a), Method::AnswerColon);
    }
    // a lone capital A–E (multiple choice), the last one
    let letters: Vec<char> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.len() == 1 && ('A'..='E').contains(&w.chars().next().unwrap_or(' ')))
        .filter_map(|w| w.chars().next())
        .collect();
    if let Some(&l) = letters.last()
        && (text.contains('(') || text.contains("option") || text.contains("choice"))
    {
        return (Some(l.to_string()), Method::ChoiceLetter);
    }
    if let Some(a) = after_phrase(text, "the answer is") {
        return (Some(a), Method::AnswerIs);
    }
    match last_number(text) {
        Some(n) => (Some(n), Method::LastNumber),
        None => (None, Method::None),
    }
}

/// Normalise a math answer for comparison.
pub fn normalise(s: &str) -> String {
    let mut t = s.trim().to_string();
    // \text{...} → ...
    while let Some(i) = t.find("\\text{") {
        let body = &t[i + 6..];
        let mut depth = 1;
        let mut end = None;
        for (k, c) in body.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = Some(k);
                        break;
                    }
                }
                _ => {}
            }
        }
        match end {
            Some(k) => t = format!("{}{}{}", &t[..i], &body[..k], &body[k + 1..]),
            None => break,
        }
    }
    for (a, b) in [
        ("\\left", ""),
        ("\\right", ""),
        ("\\!", ""),
        ("\\,", ""),
        ("\\;", ""),
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
        ("^\\circ", ""),
        ("^{\\circ}", ""),
        ("\\%", "%"),
        ("$", ""),
        ("\\$", ""),
        (" ", ""),
        ("\n", ""),
    ] {
        t = t.replace(a, b);
    }
    let t = t.trim_end_matches('.').to_string();
    // "x=5" → "5"
    let t = match t.split_once('=') {
        Some((l, r)) if l.len() <= 2 && l.chars().all(|c| c.is_alphabetic()) => r.to_string(),
        _ => t,
    };
    // thousands separators in a plain number
    if t.chars()
        .all(|c| c.is_ascii_digit() || c == ',' || c == '.' || c == '-')
        && t.contains(',')
    {
        return t.replace(',', "");
    }
    t
}

/// The value of a plain number, fraction, `\frac{a}{b}` or percentage.
pub fn numeric(s: &str) -> Option<f64> {
    let s = s.trim();
    if let Some(p) = s.strip_suffix('%') {
        return numeric(p).map(|v| v / 100.0);
    }
    if let Ok(v) = s.parse::<f64>() {
        return v.is_finite().then_some(v);
    }
    let (neg, body) = match s.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, s),
    };
    let v = if let Some(r) = body.strip_prefix("\\frac") {
        let (a, rest) = brace_arg(r)?;
        let (b, rest) = brace_arg(rest)?;
        if !rest.trim().is_empty() {
            return None;
        }
        numeric(&a)? / numeric(&b)?
    } else if let Some((a, b)) = body.split_once('/') {
        a.trim().parse::<f64>().ok()? / b.trim().parse::<f64>().ok()?
    } else {
        return None;
    };
    let v = if neg { -v } else { v };
    v.is_finite().then_some(v)
}

/// `{a}rest` → (a, rest); a single character argument is allowed (`\frac12`).
fn brace_arg(s: &str) -> Option<(String, &str)> {
    let s = s.trim_start();
    if let Some(body) = s.strip_prefix('{') {
        let mut depth = 1;
        for (i, c) in body.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        return Some((body[..i].to_string(), &body[i + 1..]));
                    }
                }
                _ => {}
            }
        }
        None
    } else {
        let c = s.chars().next()?;
        Some((c.to_string(), &s[c.len_utf8()..]))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Correct,
    Incorrect,
    /// The answers differ as text and at least one is an expression the grader cannot
    /// evaluate (they might still be equal).
    Undecided,
}

/// Grade a predicted answer against the gold one.
pub fn grade(pred: Option<&str>, gold: &str) -> Verdict {
    let Some(pred) = pred else {
        return Verdict::Incorrect;
    };
    let (p, g) = (normalise(pred), normalise(gold));
    if p == g {
        return Verdict::Correct;
    }
    match (numeric(&p), numeric(&g)) {
        (Some(a), Some(b)) => {
            if (a - b).abs() <= 1e-6 * b.abs().max(1.0) {
                Verdict::Correct
            } else {
                Verdict::Incorrect
            }
        }
        (Some(_), None) | (None, Some(_)) if looks_symbolic(&g) || looks_symbolic(&p) => {
            Verdict::Undecided
        }
        (None, None) if looks_symbolic(&g) || looks_symbolic(&p) => Verdict::Undecided,
        _ => Verdict::Incorrect,
    }
}

fn looks_symbolic(s: &str) -> bool {
    s.contains('\\') || s.contains('^') || s.contains('(') || s.contains('[') || s.contains('{')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boxed_with_balanced_braces_and_fallbacks() {
        assert_eq!(
            last_boxed("so \\boxed{1} then \\boxed{\\frac{1}{2}} done"),
            Some("\\frac{1}{2}".into())
        );
        assert_eq!(last_boxed("\\boxed 5$"), Some("5".into()));
        assert_eq!(last_boxed("\\boxed{unclosed"), None);
        assert_eq!(
            extract("The correct answer is (B)."),
            (Some("(B)".into()), Method::CorrectAnswerIs)
        );
        assert_eq!(
            extract("Answer: 42"),
            (Some("42".into()), Method::AnswerColon)
        );
        assert_eq!(
            extract("I pick option C"),
            (Some("C".into()), Method::ChoiceLetter)
        );
        assert_eq!(
            extract("So the answer is 7."),
            (Some("7".into()), Method::AnswerIs)
        );
        assert_eq!(
            extract("we get 3 apples, then 1,250.5 more."),
            (Some("1,250.5".into()), Method::LastNumber)
        );
        assert_eq!(extract("no numbers here"), (None, Method::None));
        let (r, a, found) = split_reasoning("think hard</think>final", Some("</think>"));
        assert_eq!((r, a, found), ("think hard", "final", true));
        assert_eq!(
            split_reasoning("all text", Some("</think>")),
            ("all text", "", false)
        );
        assert_eq!(split_reasoning("all text", None), ("all text", "", false));
    }

    #[test]
    fn grading_normalises_and_compares_numbers() {
        assert_eq!(grade(Some("\\frac12"), "0.5"), Verdict::Correct);
        assert_eq!(
            grade(Some("\\dfrac{3}{4}"), "\\frac{3}{4}"),
            Verdict::Correct
        );
        assert_eq!(grade(Some("$1,000$"), "1000"), Verdict::Correct);
        assert_eq!(grade(Some("x = 5"), "5"), Verdict::Correct);
        assert_eq!(grade(Some("50\\%"), "0.5"), Verdict::Correct);
        assert_eq!(grade(Some("90^\\circ"), "90"), Verdict::Correct);
        assert_eq!(grade(Some("\\text{(A)}"), "(A)"), Verdict::Correct);
        assert_eq!(grade(Some("6"), "7"), Verdict::Incorrect);
        assert_eq!(grade(None, "7"), Verdict::Incorrect);
        assert_eq!(
            grade(Some("\\sqrt{2}/2"), "\\frac{\\sqrt2}{2}"),
            Verdict::Undecided
        );
        assert_eq!(grade(Some("blue"), "red"), Verdict::Incorrect);
        assert_eq!(numeric("-\\frac{1}{4}"), Some(-0.25));
    }
}
