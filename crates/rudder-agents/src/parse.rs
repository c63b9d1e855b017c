//! Tolerant readers of the agents' replies.
//!
//! The reference reads replies with case-sensitive regexes that need a literal `"; "` between
//! fields, and maps the titles the model writes back to items through an exact-title dictionary
//! over the whole catalogue: about 40 % of watched items are lost that way (models rewrite
//! "Graduate, The (1967)" as "The Graduate"). Here a reply is split into `KEY: value` fields
//! whatever the case, separators, bullets or markdown, and every decision is tied to an item
//! **by its position on the page**; titles are only a fallback, and only against the page's own
//! titles. [`strict`] keeps the reference's reading for the faithful switch.

use serde::{Deserialize, Serialize};

/// The field names the prompts ask for.
const KEYS: &[&str] = &[
    "MOVIE",
    "ALIGN",
    "REASON",
    "NUM",
    "WATCH",
    "RATING",
    "FEELING",
    "TASTE",
    "HIGH RATINGS",
    "LOW RATINGS",
    "POSITIVE",
    "NEGATIVE",
];

/// One reply line read as `(KEY, value)` pairs in order (keys upper-cased).
pub fn fields(line: &str) -> Vec<(String, String)> {
    let clean = clean_line(line);
    let upper = clean.to_ascii_uppercase();
    // every position where a key followed by optional spaces and ':' starts a field
    let mut starts: Vec<(usize, usize, &str)> = Vec::new(); // (key start, value start, key)
    let bytes = upper.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let boundary = i == 0 || !bytes[i - 1].is_ascii_alphanumeric();
        let mut matched = None;
        if boundary {
            for k in KEYS {
                if upper[i..].starts_with(k) {
                    let mut j = i + k.len();
                    while j < bytes.len() && bytes[j] == b' ' {
                        j += 1;
                    }
                    if j < bytes.len() && bytes[j] == b':' {
                        // prefer the longest key ("HIGH RATINGS" over nothing, "RATING" vs "RATINGS")
                        if matched.is_none_or(|(_, kl, _): (usize, usize, &str)| k.len() > kl) {
                            matched = Some((j + 1, k.len(), *k));
                        }
                    }
                }
            }
        }
        if let Some((v, _, k)) = matched {
            starts.push((i, v, k));
            i = v;
        } else {
            i += clean[i..].chars().next().map_or(1, char::len_utf8);
        }
    }
    let mut out = Vec::with_capacity(starts.len());
    for (n, &(_, v, k)) in starts.iter().enumerate() {
        let end = starts.get(n + 1).map_or(clean.len(), |s| s.0);
        out.push((k.to_string(), clean_value(&clean[v..end])));
    }
    out
}

/// Strip bullets, numbering and markdown emphasis from a line.
fn clean_line(line: &str) -> String {
    let s = line.replace("**", "").replace("__", "").replace('`', "");
    let mut t = s.trim();
    loop {
        let before = t;
        t = t.trim_start_matches(['-', '*', '•', '#', '>', ' ', '\t']);
        // "1." / "2)" numbering
        let digits = t.bytes().take_while(u8::is_ascii_digit).count();
        if digits > 0 && digits < 3 && matches!(t.as_bytes().get(digits), Some(b'.') | Some(b')')) {
            t = &t[digits + 1..];
        }
        if t == before {
            break;
        }
    }
    t.to_string()
}

/// A field's value without separators, brackets or quotes around it.
fn clean_value(v: &str) -> String {
    let t = v
        .trim()
        .trim_end_matches([';', ',', ' ', '\t'])
        .trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .trim()
        .trim_matches('"')
        .trim();
    t.to_string()
}

/// yes / no at the start of a value (`[yes]`, `Yes.`, `no -`), else `None`.
pub fn yes_no(v: &str) -> Option<bool> {
    let l = v
        .trim_start_matches(['[', '(', '"', '\'', ' ', '*'])
        .to_ascii_lowercase();
    if l.starts_with("yes") || l.starts_with("true") || l.starts_with("y ") || l == "y" {
        Some(true)
    } else if l.starts_with("no") || l.starts_with("false") || l == "n" {
        Some(false)
    } else {
        None
    }
}

/// The first integer in a value.
pub fn first_int(v: &str) -> Option<i64> {
    let start = v.find(|c: char| c.is_ascii_digit())?;
    let digits: String = v[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .take(6)
        .collect();
    digits.parse().ok()
}

/// A title reduced for matching: lower case, the year dropped, a trailing article ("X, The")
/// moved to the front, punctuation removed.
pub fn norm_title(t: &str) -> String {
    let mut s = t.trim().trim_matches(['"', '\'', '*']).to_string();
    // drop a trailing "(1999)" and any other parenthesised tail
    while let Some(p) = s.rfind('(') {
        if s.trim_end().ends_with(')') {
            s.truncate(p);
            s = s.trim_end().to_string();
        } else {
            break;
        }
    }
    for art in [
        ", The", ", A", ", An", ", Les", ", La", ", Le", ", Il", ", Das", ", Der",
    ] {
        if s.len() > art.len() && s.to_ascii_lowercase().ends_with(&art.to_ascii_lowercase()) {
            let head = s[..s.len() - art.len()].to_string();
            s = format!("{} {head}", &art[2..]);
            break;
        }
    }
    let mut out = String::with_capacity(s.len());
    let mut space = false;
    for c in s.chars() {
        if c.is_alphanumeric() {
            out.extend(c.to_lowercase());
            space = false;
        } else if !space && !out.is_empty() {
            out.push(' ');
            space = true;
        }
    }
    out.trim_end().to_string()
}

/// The page position a written title refers to, among the page's own titles: equal after
/// normalisation, then containment, then the best word overlap (Jaccard ≥ 0.5). `None` when
/// nothing on the page is close or two positions tie.
pub fn match_on_page(written: &str, page_titles: &[String]) -> Option<usize> {
    let w = norm_title(written);
    if w.is_empty() {
        return None;
    }
    let norms: Vec<String> = page_titles.iter().map(|t| norm_title(t)).collect();
    let unique = |hits: Vec<usize>| (hits.len() == 1).then(|| hits[0]);
    if let Some(p) = unique((0..norms.len()).filter(|&k| norms[k] == w).collect()) {
        return Some(p);
    }
    if let Some(p) = unique(
        (0..norms.len())
            .filter(|&k| !norms[k].is_empty() && (norms[k].contains(&w) || w.contains(&norms[k])))
            .collect(),
    ) {
        return Some(p);
    }
    let words = |s: &str| -> std::collections::BTreeSet<String> {
        s.split(' ')
            .filter(|x| !x.is_empty())
            .map(str::to_string)
            .collect()
    };
    let ww = words(&w);
    let mut best: Option<(f64, usize)> = None;
    let mut tie = false;
    for (k, n) in norms.iter().enumerate() {
        let nw = words(n);
        let inter = ww.intersection(&nw).count() as f64;
        let uni = ww.union(&nw).count().max(1) as f64;
        let j = inter / uni;
        match best {
            Some((b, _)) if (j - b).abs() < 1e-12 => tie = true,
            Some((b, _)) if j < b => {}
            _ => {
                best = Some((j, k));
                tie = false;
            }
        }
    }
    match best {
        Some((j, k)) if j >= 0.5 && !tie => Some(k),
        _ => None,
    }
}

/// P1, the page reaction, keyed by page position.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PageReaction {
    /// ALIGN per page position (`None`: the reply said nothing readable about that item).
    pub align: Vec<Option<bool>>,
    /// The reason given with each ALIGN.
    pub align_reason: Vec<String>,
    /// Watched page positions with their rating (1–5) and feeling, in reply order.
    pub ratings: Vec<(usize, u8, String)>,
    /// RATING lines that named no item on the page (or gave no rating in 1–5).
    pub unmatched: Vec<String>,
    /// The NUM/WATCH line as written (not used for metrics, as in the reference).
    pub watch_line: Option<String>,
}

impl PageReaction {
    /// Every item on the page has a readable ALIGN.
    pub fn complete(&self) -> bool {
        !self.align.is_empty() && self.align.iter().all(Option::is_some)
    }

    pub fn watched(&self) -> Vec<usize> {
        self.ratings.iter().map(|r| r.0).collect()
    }
}

/// Read a page reaction. ALIGN lines map to page positions in order (a line whose title names
/// another position of the page exactly goes there instead); RATING lines map by title on the
/// page, else in order among the aligned items when their counts agree.
pub fn page_reaction(reply: &str, page_titles: &[String]) -> PageReaction {
    let k = page_titles.len();
    let mut r = PageReaction {
        align: vec![None; k],
        align_reason: vec![String::new(); k],
        ..Default::default()
    };
    let mut next_pos = 0usize;
    let mut rating_lines: Vec<(String, Option<u8>, String)> = Vec::new();
    for line in reply.lines() {
        let f = fields(line);
        let get = |key: &str| f.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
        if let Some(a) = get("ALIGN") {
            let title = get("MOVIE").unwrap_or("");
            let exact = page_titles
                .iter()
                .position(|t| norm_title(t) == norm_title(title) && !title.is_empty());
            let pos = match exact {
                Some(p) if r.align[p].is_none() => Some(p),
                _ => {
                    while next_pos < k && r.align[next_pos].is_some() {
                        next_pos += 1;
                    }
                    (next_pos < k).then_some(next_pos)
                }
            };
            if let Some(p) = pos {
                r.align[p] = yes_no(a);
                r.align_reason[p] = get("REASON").unwrap_or("").to_string();
            }
        } else if let Some(v) = get("RATING") {
            let rating = first_int(v)
                .filter(|x| (1..=5).contains(x))
                .map(|x| x as u8);
            rating_lines.push((
                get("MOVIE").unwrap_or("").to_string(),
                rating,
                get("FEELING").unwrap_or("").to_string(),
            ));
        } else if get("WATCH").is_some() || get("NUM").is_some() {
            r.watch_line = Some(clean_line(line));
        }
    }
    let aligned: Vec<usize> = (0..k).filter(|&p| r.align[p] == Some(true)).collect();
    let positional = rating_lines.len() == aligned.len();
    let mut used = vec![false; k];
    for (n, (title, rating, feeling)) in rating_lines.into_iter().enumerate() {
        let pos = match_on_page(&title, page_titles)
            .or_else(|| positional.then(|| aligned[n]))
            .filter(|&p| !used[p]);
        match (pos, rating) {
            (Some(p), Some(x)) => {
                used[p] = true;
                r.ratings.push((p, x, feeling));
            }
            _ => r.unmatched.push(title),
        }
    }
    r
}

/// The reference's reading (`--faithful`): case-sensitive `MOVIE: (.+?); ALIGN: (.+?); REASON:`
/// and `MOVIE: (.+?); RATING: (\d+); FEELING:` with the literal `"; "`, the first k ALIGN lines
/// in order, only `yes`/`Yes` counting; watched items mapped by **exact title over the whole
/// catalogue** (`catalogue(title)`), so rewritten titles are lost.
pub mod strict {
    use super::PageReaction;

    fn after<'a>(s: &'a str, key: &str) -> Option<&'a str> {
        s.find(key).map(|p| &s[p + key.len()..])
    }

    pub fn page_reaction(
        reply: &str,
        page_items: &[u32],
        catalogue: &dyn Fn(&str) -> Option<u32>,
    ) -> PageReaction {
        let k = page_items.len();
        let mut r = PageReaction {
            align: vec![Some(false); k],
            align_reason: vec![String::new(); k],
            ..Default::default()
        };
        let mut n = 0;
        for line in reply.lines() {
            if let Some(rest) = after(line, "MOVIE: ") {
                if let Some(p) = rest.find("; ALIGN: ") {
                    let v = &rest[p + 9..];
                    if let Some(q) = v.find("; REASON: ") {
                        if n < k {
                            let a = &v[..q];
                            r.align[n] = Some(a.starts_with("yes") || a.starts_with("Yes"));
                            r.align_reason[n] = v[q + 10..].to_string();
                            n += 1;
                        }
                        continue;
                    }
                }
                if let Some(p) = rest.find("; RATING: ") {
                    let title = &rest[..p];
                    let v = &rest[p + 10..];
                    let digits: String = v.chars().take_while(char::is_ascii_digit).collect();
                    if let (Some(q), Ok(x)) = (v.find("; FEELING: "), digits.parse::<u8>())
                        && q == digits.len()
                    {
                        let feeling = v[q + 11..].to_string();
                        match catalogue(title)
                            .and_then(|id| page_items.iter().position(|&i| i == id))
                        {
                            Some(pos) => r.ratings.push((pos, x, feeling)),
                            None => r.unmatched.push(title.to_string()),
                        }
                    }
                }
            }
        }
        r
    }
}

/// P2, the exit decision.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// `None` when the reply names neither.
    pub exit: Option<bool>,
    /// POSITIVE / NEGATIVE feeling, when stated.
    pub positive: Option<bool>,
    pub reason: String,
}

pub fn decision(reply: &str) -> Decision {
    let up = reply.to_ascii_uppercase();
    let find_last = |needle: &str| up.rfind(needle);
    // the bracketed tokens the prompt asks for; then bare words as the fallback
    let mut exit = match (find_last("[EXIT]"), find_last("[NEXT]")) {
        (Some(_), None) => Some(true),
        (None, Some(_)) => Some(false),
        (Some(a), Some(b)) => Some(a > b),
        (None, None) => None,
    };
    if exit.is_none() {
        let word = |w: &str| {
            up.match_indices(w)
                .filter(|(i, _)| {
                    let b = up.as_bytes();
                    let before = *i == 0 || !b[i - 1].is_ascii_alphabetic();
                    let after = b.get(i + w.len()).is_none_or(|c| !c.is_ascii_alphabetic());
                    before && after
                })
                .map(|(i, _)| i)
                .last()
        };
        exit = match (word("EXIT"), word("NEXT")) {
            (Some(_), None) => Some(true),
            (None, Some(_)) => Some(false),
            (Some(a), Some(b)) => Some(a > b),
            (None, None) => None,
        };
    }
    let positive = match (up.find("POSITIVE"), up.find("NEGATIVE")) {
        (Some(_), None) => Some(true),
        (None, Some(_)) => Some(false),
        (Some(a), Some(b)) => Some(a < b),
        (None, None) => None,
    };
    let reason = reply
        .lines()
        .rev()
        .find_map(|l| {
            let lo = l.to_ascii_lowercase();
            lo.find("reason:").map(|p| l[p + 7..].trim().to_string())
        })
        .unwrap_or_default();
    Decision {
        exit,
        positive,
        reason,
    }
}

/// P3, the interview.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Interview {
    /// 1–10, when readable.
    pub rating: Option<u8>,
    pub reason: String,
}

pub fn interview(reply: &str) -> Interview {
    let mut rating = None;
    let mut reason = String::new();
    for line in reply.lines() {
        for (k, v) in fields(line) {
            if k == "RATING" && rating.is_none() {
                rating = first_int(&v)
                    .filter(|x| (1..=10).contains(x))
                    .map(|x| x as u8);
            } else if k == "REASON" && reason.is_empty() {
                reason = v;
            }
        }
    }
    if rating.is_none() {
        // "I would rate it 7/10" and similar
        let lo = reply.to_ascii_lowercase();
        if let Some(p) = lo.find("/10").or_else(|| lo.find("out of 10")) {
            let head = &lo[..p];
            let digits: String = head
                .chars()
                .rev()
                .skip_while(|c| *c == ' ')
                .take_while(char::is_ascii_digit)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            rating = digits.parse::<u8>().ok().filter(|x| (1..=10).contains(x));
        }
    }
    Interview { rating, reason }
}

/// P4: `satisfied` / `unsatisfied` at the start of the reflection.
pub fn satisfaction(reply: &str) -> Option<bool> {
    let l = reply
        .trim_start_matches(['[', ' ', '*', '"'])
        .to_ascii_lowercase();
    if l.starts_with("unsatisfied")
        || l.starts_with("dissatisfied")
        || l.starts_with("not satisfied")
    {
        Some(false)
    } else if l.starts_with("satisfied") {
        Some(true)
    } else {
        None
    }
}

/// P5, the forced choice: WATCH per position (the k-th `MOVIE … WATCH` line is the k-th item,
/// as the reference reads it; an exact title on the page wins over the order).
pub fn forced_choice(reply: &str, titles: &[String]) -> Vec<Option<bool>> {
    let k = titles.len();
    let mut out = vec![None; k];
    let mut next = 0usize;
    for line in reply.lines() {
        let f = fields(line);
        let Some(w) = f.iter().find(|(k, _)| k == "WATCH").map(|(_, v)| v) else {
            continue;
        };
        let title = f
            .iter()
            .find(|(k, _)| k == "MOVIE")
            .map_or("", |(_, v)| v.as_str());
        let exact = (!title.is_empty())
            .then(|| {
                titles
                    .iter()
                    .position(|t| norm_title(t) == norm_title(title))
            })
            .flatten()
            .filter(|&p| out[p].is_none());
        let pos = exact.or_else(|| {
            while next < k && out[next].is_some() {
                next += 1;
            }
            (next < k).then_some(next)
        });
        if let Some(p) = pos {
            out[p] = yes_no(w);
        }
    }
    out
}

/// P6: the persona's TASTE/REASON pairs and HIGH/LOW RATINGS conclusions.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Persona {
    pub taste: Vec<String>,
    pub reason: Vec<String>,
    pub high_rating: Vec<String>,
    pub low_rating: Vec<String>,
}

pub fn persona(reply: &str) -> Persona {
    let mut p = Persona::default();
    for line in reply.lines() {
        for (k, v) in fields(line) {
            if v.is_empty() {
                continue;
            }
            match k.as_str() {
                "TASTE" => p.taste.push(v),
                "REASON" => p.reason.push(v),
                "HIGH RATINGS" => p.high_rating.push(v),
                "LOW RATINGS" => p.low_rating.push(v),
                _ => {}
            }
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn titles() -> Vec<String> {
        [
            "Graduate, The (1967)",
            "Toy Story (1995)",
            "Heat (1995)",
            "Sabrina (1995)",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    #[test]
    fn fields_tolerate_case_bullets_markdown_and_missing_separators() {
        let f = fields("- **Movie:** Heat (1995) align: Yes reason: great cast;");
        assert_eq!(
            f,
            vec![
                ("MOVIE".into(), "Heat (1995)".into()),
                ("ALIGN".into(), "Yes".into()),
                ("REASON".into(), "great cast".into())
            ]
        );
        let f = fields("2. MOVIE:[Toy Story]; RATING: [4]; FEELING: fun");
        assert_eq!(f[1], ("RATING".into(), "4".into()));
        assert_eq!(f[2], ("FEELING".into(), "fun".into()));
        assert_eq!(
            fields("HIGH RATINGS: likes drama")[0].0,
            "HIGH RATINGS",
            "the longest key wins"
        );
        assert!(fields("no keys here").is_empty());
        // a key glued to a word is not a key
        assert!(fields("REMOVIE: x").is_empty());
    }

    #[test]
    fn titles_normalise_and_match_only_on_the_page() {
        assert_eq!(norm_title("Graduate, The (1967)"), "the graduate");
        assert_eq!(norm_title("The Graduate"), "the graduate");
        let t = titles();
        assert_eq!(match_on_page("The Graduate", &t), Some(0));
        assert_eq!(match_on_page("toy story", &t), Some(1));
        assert_eq!(match_on_page("Heat", &t), Some(2));
        assert_eq!(match_on_page("Casablanca", &t), None);
        assert_eq!(match_on_page("", &t), None);
    }

    #[test]
    fn page_reaction_is_positional_and_tolerant() {
        let reply = "\
**MOVIE:** The Graduate; ALIGN: yes; REASON: classic
movie: Toy Story align: No reason: not for me
- MOVIE: Heat (1995); ALIGN: [Yes]; REASON: crime
MOVIE: Sabrina ALIGN: no. REASON: meh
NUM: 2; WATCH: The Graduate, Heat; REASON: fits
MOVIE: The Graduate; RATING: 5; FEELING: moved
MOVIE: Heat; RATING: 4; FEELING: tense";
        let r = page_reaction(reply, &titles());
        assert_eq!(
            r.align,
            vec![Some(true), Some(false), Some(true), Some(false)]
        );
        assert!(r.complete());
        assert_eq!(r.watched(), vec![0, 2]);
        assert_eq!(r.ratings[0].1, 5);
        assert_eq!(r.ratings[1].2, "tense");
        assert!(r.watch_line.unwrap().starts_with("NUM"));
        assert!(r.unmatched.is_empty());
    }

    #[test]
    fn rating_lines_fall_back_to_the_aligned_order_when_titles_are_unreadable() {
        let reply = "MOVIE: a; ALIGN: no; REASON: x\nMOVIE: b; ALIGN: yes; REASON: x\n\
MOVIE: c; ALIGN: no; REASON: x\nMOVIE: d; ALIGN: yes; REASON: x\n\
MOVIE: zzz; RATING: 3; FEELING: ok\nMOVIE: qqq; RATING: 9; FEELING: bad scale";
        let r = page_reaction(reply, &titles());
        assert_eq!(
            r.align,
            vec![Some(false), Some(true), Some(false), Some(true)]
        );
        assert_eq!(r.watched(), vec![1], "9 is outside 1–5 and is not a rating");
        assert_eq!(r.unmatched, vec!["qqq".to_string()]);
    }

    #[test]
    fn incomplete_replies_say_so() {
        let r = page_reaction("I like movies.", &titles());
        assert!(!r.complete());
        assert_eq!(r.align, vec![None; 4]);
        let r = page_reaction("MOVIE: x; ALIGN: maybe; REASON: ?", &titles());
        assert_eq!(r.align[0], None);
    }

    #[test]
    fn strict_reading_loses_rewritten_titles() {
        let reply = "MOVIE: The Graduate; ALIGN: yes; REASON: r\nMOVIE: Toy Story (1995); ALIGN: YES; REASON: r\n\
MOVIE: The Graduate; RATING: 5; FEELING: f\nMOVIE: Toy Story (1995); RATING: 4; FEELING: f";
        let cat = |t: &str| match t {
            "Graduate, The (1967)" => Some(10),
            "Toy Story (1995)" => Some(11),
            _ => None,
        };
        let r = strict::page_reaction(reply, &[10, 11, 12, 13], &cat);
        assert_eq!(r.align[0], Some(true));
        assert_eq!(r.align[1], Some(false), "only yes/Yes count");
        assert_eq!(r.watched(), vec![1], "the rewritten title is lost");
        // the tolerant reader keeps both
        let t = titles();
        assert_eq!(page_reaction(reply, &t).watched(), vec![0, 1]);
    }

    #[test]
    fn decisions_interviews_reflections() {
        assert_eq!(
            decision("POSITIVE: good\n[NEXT]; Reason: more").exit,
            Some(false)
        );
        let d = decision("NEGATIVE: bored. I am tired.\n[EXIT]; Reason: tired");
        assert_eq!((d.exit, d.positive), (Some(true), Some(false)));
        assert_eq!(d.reason, "tired");
        assert_eq!(decision("[exit]").exit, Some(true));
        assert_eq!(decision("I will exit now").exit, Some(true));
        assert_eq!(decision("Next page please").exit, Some(false));
        assert_eq!(decision("hmm").exit, None);
        assert_eq!(decision("nextexit").exit, None);

        assert_eq!(interview("RATING: 7; REASON: fine").rating, Some(7));
        assert_eq!(interview("rating:[8] reason: good").reason, "good");
        assert_eq!(interview("I'd give it 6/10.").rating, Some(6));
        assert_eq!(interview("RATING: 11").rating, None);
        assert_eq!(interview("no idea").rating, None);

        assert_eq!(
            satisfaction("Satisfied with the result because"),
            Some(true)
        );
        assert_eq!(satisfaction("[unsatisfied] because"), Some(false));
        assert_eq!(satisfaction("well"), None);
    }

    #[test]
    fn forced_choice_and_persona() {
        let t = titles();
        let v = forced_choice(
            "MOVIE: Heat; WATCH: yes; REASON: a\nMOVIE: x; WATCH: no; REASON: b\nWATCH: yes",
            &t,
        );
        assert_eq!(v, vec![Some(false), Some(true), Some(true), None]);
        let p = persona(
            "TASTE: I enjoy dramas.\nREASON: many 5s\nTASTE: action\nREASON: r2\nHIGH RATINGS: dramas\nLOW RATINGS: horror",
        );
        assert_eq!(p.taste.len(), 2);
        assert_eq!(p.high_rating, vec!["dramas".to_string()]);
        assert_eq!(p.low_rating, vec!["horror".to_string()]);
    }
}

/// An AgentRecBench ranking reply read leniently: the last bracketed list that names a
/// candidate (Python or JSON quoting, or none), else every line or comma-separated token that
/// names one (numbered lines, bullets); a token names a candidate by its id, or by its display
/// name (`names[k]`, normalised as titles are). Returns candidate positions in reply order,
/// repeats and unknown tokens included as `None` so that the repair can count them.
pub fn ranked_list(reply: &str, ids: &[String], names: &[String]) -> Vec<Option<usize>> {
    let by_id: std::collections::HashMap<&str, usize> = ids
        .iter()
        .enumerate()
        .map(|(k, s)| (s.as_str(), k))
        .collect();
    let by_name: std::collections::HashMap<String, usize> = names
        .iter()
        .enumerate()
        .map(|(k, s)| (norm_title(s), k))
        .filter(|(s, _)| !s.is_empty())
        .collect();
    let token = |t: &str| -> Option<Option<usize>> {
        let t = t
            .trim()
            // parentheses stay: "Heat (1995)" is a title
            .trim_matches(|c: char| c.is_whitespace() || "'\"`*[]{}<>.,;:-".contains(c));
        if t.is_empty() {
            return None;
        }
        if let Some(&k) = by_id.get(t) {
            return Some(Some(k));
        }
        // "3. Heat (1995)", "- 1193: Heat", "item 1193"
        let stripped = t
            .trim_start_matches(|c: char| c.is_ascii_digit())
            .trim_start_matches(['.', ')', ':'])
            .trim();
        for cand in [t, stripped] {
            if let Some(&k) = by_id.get(cand) {
                return Some(Some(k));
            }
            let first = cand.split([':', ' ', '|']).next().unwrap_or("");
            if let Some(&k) = by_id.get(first.trim_matches(|c: char| "'\"`*".contains(c))) {
                return Some(Some(k));
            }
            if let Some(&k) = by_name.get(&norm_title(cand)) {
                return Some(Some(k));
            }
        }
        Some(None)
    };
    // Bracketed lists, last first.
    let mut lists = Vec::new();
    let mut depth = 0usize;
    let mut start = 0usize;
    for (i, c) in reply.char_indices() {
        match c {
            '[' => {
                if depth == 0 {
                    start = i + 1;
                }
                depth += 1;
            }
            ']' if depth > 0 => {
                depth -= 1;
                if depth == 0 {
                    lists.push(&reply[start..i]);
                }
            }
            _ => {}
        }
    }
    for l in lists.iter().rev() {
        let got: Vec<Option<usize>> = split_list(l).iter().filter_map(|x| token(x)).collect();
        if got.iter().any(Option::is_some) {
            return got;
        }
    }
    let mut got = Vec::new();
    for line in reply.lines() {
        // the whole line first (titles hold commas), else its comma-separated parts
        let parts: Vec<&str> = if line.contains(',') && token(line) == Some(None) {
            line.split(',').collect()
        } else {
            vec![line]
        };
        for p in parts {
            if let Some(Some(k)) = token(p) {
                got.push(Some(k));
            }
        }
    }
    got
}

/// The elements of a list body: quoted strings (a quote closes only before a comma, a line end
/// or the end, so ids such as `'Wizard of Oz, The (1939)'` and apostrophes inside single quotes
/// survive), else comma- or line-separated tokens.
fn split_list(body: &str) -> Vec<String> {
    let c: Vec<char> = body.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < c.len() {
        if c[i].is_whitespace() || c[i] == ',' {
            i += 1;
            continue;
        }
        if c[i] == '\'' || c[i] == '"' {
            let q = c[i];
            let mut j = i + 1;
            let close = loop {
                if j >= c.len() {
                    break None;
                }
                if c[j] == q {
                    let mut k = j + 1;
                    while k < c.len() && c[k] == ' ' {
                        k += 1;
                    }
                    if k >= c.len() || c[k] == ',' || c[k] == '\n' {
                        break Some(j);
                    }
                }
                j += 1;
            };
            if let Some(j) = close {
                out.push(c[i + 1..j].iter().collect());
                i = j + 1;
                continue;
            }
        }
        let mut j = i;
        while j < c.len() && c[j] != ',' && c[j] != '\n' {
            j += 1;
        }
        out.push(c[i..j].iter().collect());
        i = j;
    }
    out
}

/// How a ranking was repaired into a permutation of the candidates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Repairs {
    /// Tokens that named no candidate (dropped).
    pub dropped_unknown: u32,
    /// Candidates named again (dropped).
    pub deduped: u32,
    /// Candidates the reply left out (appended in a seeded order).
    pub appended: u32,
}

impl Repairs {
    pub fn any(&self) -> bool {
        self.dropped_unknown + self.deduped + self.appended > 0
    }
    pub fn add(&mut self, o: &Repairs) {
        self.dropped_unknown += o.dropped_unknown;
        self.deduped += o.deduped;
        self.appended += o.appended;
    }
}

/// A permutation of `0..n` from a read ranking: unknown tokens and repeats dropped, missing
/// candidates appended in the order `fill` gives (a seeded shuffle).
pub fn repair(read: &[Option<usize>], n: usize, fill: &[usize]) -> (Vec<usize>, Repairs) {
    let mut seen = vec![false; n];
    let mut out = Vec::with_capacity(n);
    let mut r = Repairs::default();
    for x in read {
        match x {
            Some(k) if *k < n => {
                if seen[*k] {
                    r.deduped += 1;
                } else {
                    seen[*k] = true;
                    out.push(*k);
                }
            }
            _ => r.dropped_unknown += 1,
        }
    }
    for &k in fill {
        if k < n && !seen[k] {
            seen[k] = true;
            out.push(k);
            r.appended += 1;
        }
    }
    (out, r)
}

#[cfg(test)]
mod ranking_tests {
    use super::*;

    fn ids() -> Vec<String> {
        ["1193", "661", "914", "3408"].map(String::from).to_vec()
    }
    fn names() -> Vec<String> {
        [
            "One Flew (1975)",
            "James and the Giant Peach (1996)",
            "My Fair Lady (1964)",
            "Erin Brockovich (2000)",
        ]
        .map(String::from)
        .to_vec()
    }

    #[test]
    fn lists_in_many_shapes() {
        let (i, n) = (ids(), names());
        assert_eq!(
            ranked_list("['914', '1193', '661', '3408']", &i, &n),
            vec![Some(2), Some(0), Some(1), Some(3)]
        );
        // reasoning first, the answer list last; JSON quotes; an unknown id
        assert_eq!(
            ranked_list(
                "Step 1: I like [drama]. Answer: [\"3408\", \"999\", \"914\"]",
                &i,
                &n
            ),
            vec![Some(3), None, Some(2)]
        );
        // numbered lines with titles, no brackets
        assert_eq!(
            ranked_list(
                "1. Erin Brockovich\n2. 661: James and the Giant Peach\n3) My Fair Lady (1964)",
                &i,
                &n
            ),
            vec![Some(3), Some(1), Some(2)]
        );
        assert!(ranked_list("I cannot help with that.", &i, &n).is_empty());
        // ids with commas and apostrophes (the MovieLens asset's ids are titles)
        let i2: Vec<String> = [
            "Wizard of Oz, The (1939)",
            "Schindler's List (1993)",
            "Heat (1995)",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            ranked_list(
                "['Heat (1995)', 'Schindler's List (1993)', \"Wizard of Oz, The (1939)\"]",
                &i2,
                &i2
            ),
            vec![Some(2), Some(1), Some(0)]
        );
    }

    #[test]
    fn repair_makes_a_permutation_and_counts() {
        let (p, r) = repair(&[Some(2), None, Some(2), Some(0)], 4, &[3, 1, 0, 2]);
        assert_eq!(p, vec![2, 0, 3, 1]);
        assert_eq!(
            r,
            Repairs {
                dropped_unknown: 1,
                deduped: 1,
                appended: 2
            }
        );
        let (p, r) = repair(&[Some(1), Some(0)], 2, &[0, 1]);
        assert_eq!(p, vec![1, 0]);
        assert!(!r.any());
    }
}
