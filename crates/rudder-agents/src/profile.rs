//! An agent's profile: the three social traits (levels 1–3 from `user_statistic.csv`), its taste
//! and rating tendency (from `personas.csv`), read from a dataset's user table.

use serde::{Deserialize, Serialize};

use crate::{AgentError, Result};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// Dense user id in the dataset.
    pub user: u32,
    /// 1 = rare viewer, 2 = occasional, 3 = enthusiast.
    pub activity: u8,
    /// 1 = dedicated follower (rates like the crowd), 2 = balanced, 3 = maverick.
    pub conformity: u8,
    /// 1 = selective, 2 = niche explorer, 3 = trailblazer.
    pub diversity: u8,
    /// Taste statements (the persona's `taste` split on `|`, with the reference's removal of
    /// `"I "`).
    pub taste: Vec<String>,
    /// The persona's `high_rating` text without "You are".
    pub rating_tendency: String,
}

impl Profile {
    /// The taste as the prompts show it (`"; "`-joined).
    pub fn taste_text(&self) -> String {
        self.taste.join("; ")
    }
}

/// Read the profile of dense user `u` from the user table (`activity`, `conformity`,
/// `diversity`, `persona_taste`, `persona_high_rating`). `source` names the data for errors.
pub fn profile(
    table: &rudder_data::Table,
    u: u32,
    n_users: usize,
    source: &str,
) -> Result<Profile> {
    if u as usize >= n_users {
        return Err(AgentError::Input(format!(
            "user {u} is not in {source} ({n_users} users)"
        )));
    }
    let field = |name: &str, file: &str| -> Result<&str> {
        let col = table.fields.get(name).ok_or_else(|| {
            AgentError::Input(format!(
                "{source}: no `{name}` column for the agents' profiles (expected in {file})"
            ))
        })?;
        Ok(col.get(u as usize).map(String::as_str).unwrap_or(""))
    };
    let level = |name: &str| -> Result<u8> {
        let v = field(name, "user_statistic.csv")?.trim();
        match v.parse::<u8>() {
            Ok(x @ 1..=3) => Ok(x),
            _ if v.is_empty() => Err(AgentError::Input(format!(
                "{source}/user_statistic.csv: no row for user {u} (its `{name}` is missing)"
            ))),
            _ => Err(AgentError::Input(format!(
                "{source}/user_statistic.csv: user {u}: `{name}` is `{v}`, expected 1, 2 or 3"
            ))),
        }
    };
    let taste_raw = field("persona_taste", "personas.csv")?;
    if taste_raw.trim().is_empty() {
        return Err(AgentError::Input(format!(
            "{source}/personas.csv: no persona for user {u} (row {} is missing or its `taste` is empty; generate personas with `rudder sim agent4rec personas`)",
            u + 2
        )));
    }
    let taste = taste_raw
        .split('|')
        .map(|s| s.replace("I ", "").trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    let tendency = field("persona_high_rating", "personas.csv")?
        .replace('|', " ")
        .replace("You are", "")
        .trim()
        .to_string();
    Ok(Profile {
        user: u,
        activity: level("activity")?,
        conformity: level("conformity")?,
        diversity: level("diversity")?,
        taste,
        rating_tendency: tendency,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> rudder_data::Table {
        let mut t = rudder_data::Table::default();
        let col = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        t.fields.insert("activity".into(), col(&["1", "3", ""]));
        t.fields.insert("conformity".into(), col(&["2", "7", ""]));
        t.fields.insert("diversity".into(), col(&["3", "1", ""]));
        t.fields.insert(
            "persona_taste".into(),
            col(&[" I enjoy dramas.|  I like jazz films.", "x", ""]),
        );
        t.fields.insert(
            "persona_high_rating".into(),
            col(&["You are generous with dramas.", "", ""]),
        );
        t
    }

    #[test]
    fn reads_traits_taste_and_tendency() {
        let p = profile(&table(), 0, 3, "d").unwrap();
        assert_eq!((p.activity, p.conformity, p.diversity), (1, 2, 3));
        assert_eq!(p.taste_text(), "enjoy dramas.; like jazz films.");
        assert_eq!(p.rating_tendency, "generous with dramas.");
    }

    #[test]
    fn bad_rows_are_named() {
        let e = profile(&table(), 1, 3, "d").unwrap_err().to_string();
        assert!(e.contains("`conformity` is `7`"), "{e}");
        let e = profile(&table(), 2, 3, "d").unwrap_err().to_string();
        assert!(e.contains("personas.csv: no persona for user 2"), "{e}");
        let e = profile(&table(), 9, 3, "d").unwrap_err().to_string();
        assert!(e.contains("user 9 is not in d"), "{e}");
        let e = profile(&rudder_data::Table::default(), 0, 3, "d")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no `persona_taste` column"), "{e}");
    }
}
