//! Prompt templates and rendering (llmrec-seeds.md §1.3). The built-in template files are
//! S-DPO's (`prompt/music.txt`, 10 LastFM templates; `prompt/movie.txt`, 15 MovieLens
//! templates): one line per template with `[HistoryHere]` and `[CansHere]` placeholders,
//! titles joined with `", "`. One template is drawn per example from a seeded stream.
//!
//! The reference appends a trailing space to training prompts and strips it at inference; we
//! strip it always and start the response with the space instead (`" " + title`), which is
//! the tokenization the model sees when it generates, so training, likelihood scoring and
//! generation agree token for token.

use std::path::Path;

use rand::Rng;

use crate::{LlmrecError, Result};

const MUSIC: &str = include_str!("../templates/music.txt");
const MOVIE: &str = include_str!("../templates/movie.txt");

#[derive(Clone, Debug, PartialEq)]
pub struct Templates {
    pub name: String,
    pub lines: Vec<String>,
}

impl Templates {
    /// `music` (LastFM) or `movie` (MovieLens).
    pub fn builtin(name: &str) -> Option<Templates> {
        let text = match name {
            "music" => MUSIC,
            "movie" => MOVIE,
            _ => return None,
        };
        Templates::parse(name, text, Path::new(name)).ok()
    }

    /// A template file: one template per non-empty line, each with both placeholders.
    pub fn from_file(path: &Path) -> Result<Templates> {
        let text = std::fs::read_to_string(path).map_err(|e| LlmrecError::file(path, e))?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Templates::parse(&name, &text, path)
    }

    /// Templates given as text (one per line).
    pub fn from_text(name: &str, text: &str) -> Result<Templates> {
        Templates::parse(name, text, Path::new(name))
    }

    fn parse(name: &str, text: &str, path: &Path) -> Result<Templates> {
        let mut lines = Vec::new();
        for (i, l) in text.lines().enumerate() {
            let l = l.trim();
            if l.is_empty() {
                continue;
            }
            for ph in ["[HistoryHere]", "[CansHere]"] {
                if !l.contains(ph) {
                    return Err(LlmrecError::file(
                        path,
                        format!("line {}: template lacks the {ph} placeholder", i + 1),
                    ));
                }
            }
            lines.push(l.to_string());
        }
        if lines.is_empty() {
            return Err(LlmrecError::file(path, "no templates in the file"));
        }
        Ok(Templates {
            name: name.to_string(),
            lines,
        })
    }

    /// The template of example `index` under `seed`.
    pub fn pick(&self, seed: u64, index: usize) -> usize {
        rudder_data::rng::stream(seed, &[0x7e3a, index as u64]).random_range(0..self.lines.len())
    }

    /// The prompt text (ending without trailing whitespace, e.g. in `Answer:`).
    pub fn render(&self, template: usize, history: &[&str], candidates: &[&str]) -> String {
        self.lines[template]
            .replace("[HistoryHere]", &history.join(", "))
            .replace("[CansHere]", &candidates.join(", "))
            .trim_end()
            .to_string()
    }
}

/// The response text the model is trained on and scored for: a space, then the title.
pub fn response(title: &str) -> String {
    format!(" {title}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_templates_render_and_picks_are_seeded() {
        let t = Templates::builtin("music").unwrap();
        assert_eq!(t.lines.len(), 10);
        assert_eq!(Templates::builtin("movie").unwrap().lines.len(), 15);
        let p = t.render(0, &["A", "B"], &["C", "D"]);
        assert!(
            p.contains("bands A, B recently") && p.contains("names: C, D."),
            "{p}"
        );
        assert!(p.ends_with("Answer:"));
        let picks: Vec<usize> = (0..50).map(|i| t.pick(3, i)).collect();
        assert_eq!(picks, (0..50).map(|i| t.pick(3, i)).collect::<Vec<_>>());
        assert!(picks.iter().any(|&x| x != picks[0]));
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("t.txt");
        std::fs::write(&f, "ok [HistoryHere] [CansHere]\n\nno placeholders\n").unwrap();
        let e = Templates::from_file(&f).unwrap_err().to_string();
        assert!(e.contains("t.txt") && e.contains("line 3"), "{e}");
    }
}
