//! LLaRA-style sequence rows built from rated, timestamped interactions.
//!
//! LLaRA ships MovieLens-100K validation and test rows but no training rows, and no script that
//! made them. The rules recovered from the shipped files (llmrec-seeds.md §2.2, checked against
//! the ML-100K ratings):
//! - only ratings ≥ 3 are kept (no rating below 3 occurs among the 2,060 rated entries of the
//!   189 shipped rows);
//! - a user's kept interactions in time order (ties keep the file order: LLaRA's own order within
//!   one timestamp cannot be recovered, see [`match_held_out`]);
//! - users are split 8:1:1 — a user is wholly train, validation or test; validation and test hold
//!   one row per user (the last window);
//! - a train user gives one row per interaction `k`: `seq` = the ≤ `window` interactions before
//!   `k`, right-padded with the pad id (= the number of items), `len_seq` = their count (at least
//!   1), `next` = interaction `k` — the first row has an empty history, as LLaRA's LastFM train
//!   file does.

use crate::interactions::Interactions;
use crate::sequences::SeqSample;

/// One user's kept interactions in time order: `(item id, rating)`.
pub type History = Vec<(u32, i64)>;

/// Every user's interactions rated at least `min_rating`, in time order (ties keep the stored
/// order), as `(item_id[item], rating)`. `None` when the interactions carry no ratings.
pub fn histories(x: &Interactions, item_id: &[u32], min_rating: f32) -> Option<Vec<History>> {
    x.all_ratings()?;
    Some(
        (0..x.n_users() as u32)
            .map(|u| {
                let (items, ratings) = (x.items(u), x.ratings(u).unwrap_or_default());
                crate::split::time_order(x, u)
                    .into_iter()
                    .filter(|&k| ratings[k] >= min_rating)
                    .map(|k| (item_id[items[k] as usize], ratings[k].round() as i64))
                    .collect()
            })
            .collect(),
    )
}

/// Every train row of one user (see the module docs). `with_ratings` writes MovieLens'
/// `[item, rating]` pairs (pad `[pad, 0]`).
pub fn sliding_rows(
    h: &[(u32, i64)],
    window: usize,
    pad: u32,
    with_ratings: bool,
) -> Vec<SeqSample> {
    (0..h.len())
        .map(|k| {
            let prev = &h[k.saturating_sub(window)..k];
            let mut seq: Vec<u32> = prev.iter().map(|p| p.0).collect();
            seq.resize(window, pad);
            let ratings = with_ratings.then(|| {
                let mut r: Vec<i64> = prev.iter().map(|p| p.1).collect();
                r.resize(window, 0);
                r
            });
            SeqSample {
                seq,
                seq_ratings: ratings,
                len_seq: prev.len().max(1),
                next: h[k].0,
                next_rating: with_ratings.then_some(h[k].1),
            }
        })
        .collect()
}

/// The user a held-out row was cut from, and how far from the end of the history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldOutMatch {
    /// Index into the histories.
    pub user: usize,
    /// Extra interactions of the user's tail needed to hold every entry of the row: 0 = the row
    /// is exactly the user's last `len + 1` interactions, up to order within the row.
    pub slack: usize,
    /// Other users that match with the same slack (0 = unambiguous).
    pub ties: usize,
}

/// For every held-out row, the user whose history holds all of the row's entries (history and
/// target; `[item, rating]` pairs when the row has ratings) within its last `len + 1 + slack`
/// interactions, for the smallest slack up to `max_slack`. Entries are compared as a set, since
/// the order inside one timestamp differs between LLaRA's files and any re-sort of the ratings.
/// `None` where no user matches.
pub fn match_held_out(
    rows: &[SeqSample],
    histories: &[History],
    pad: u32,
    max_slack: usize,
) -> Vec<Option<HeldOutMatch>> {
    rows.iter()
        .map(|row| {
            let mut want: Vec<(u32, Option<i64>)> = (0..row.seq.len())
                .filter(|&k| row.seq[k] != pad)
                .map(|k| (row.seq[k], row.seq_ratings.as_ref().map(|r| r[k])))
                .collect();
            want.push((row.next, row.next_rating));
            let mut best: Option<HeldOutMatch> = None;
            for (user, h) in histories.iter().enumerate() {
                let Some(slack) = slack_of(&want, h, max_slack) else {
                    continue;
                };
                best = match best {
                    Some(b) if b.slack < slack => Some(b),
                    Some(b) if b.slack == slack => Some(HeldOutMatch {
                        ties: b.ties + 1,
                        ..b
                    }),
                    _ => Some(HeldOutMatch {
                        user,
                        slack,
                        ties: 0,
                    }),
                };
            }
            best
        })
        .collect()
}

/// The smallest slack at which the tail of `h` holds every wanted entry (a rating of `None`
/// matches any): each entry's latest occurrence, counted from the end, must lie within the last
/// `want.len() + slack` interactions. `None` beyond `max_slack` or for a shorter history.
fn slack_of(want: &[(u32, Option<i64>)], h: &[(u32, i64)], max_slack: usize) -> Option<usize> {
    let n = want.len();
    if h.len() < n {
        return None;
    }
    let tail = &h[h.len().saturating_sub(n + max_slack)..];
    let mut deepest = 0;
    for &(item, rating) in want {
        let back = tail
            .iter()
            .rev()
            .position(|&(i, r)| i == item && rating.is_none_or(|x| x == r))?;
        deepest = deepest.max(back + 1);
    }
    Some(deepest.saturating_sub(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_slide_a_window_over_each_interaction() {
        let h: History = (0..13).map(|i| (i as u32, 3 + i % 3)).collect();
        let rows = sliding_rows(&h, 10, 99, true);
        assert_eq!(rows.len(), 13);
        // the first row has an empty history (len_seq clamped to 1), as LLaRA's LastFM train file
        assert_eq!(rows[0].seq, vec![99; 10]);
        assert_eq!((rows[0].len_seq, rows[0].next), (1, 0));
        assert_eq!(rows[0].seq_ratings.as_deref(), Some(&[0i64; 10][..]));
        assert_eq!(rows[2].seq[..3], [0, 1, 99]);
        assert_eq!(
            (rows[2].len_seq, rows[2].next, rows[2].next_rating),
            (2, 2, Some(5))
        );
        // past the window only the last 10 remain
        assert_eq!(rows[12].seq, (2..12).collect::<Vec<u32>>());
        assert_eq!(rows[12].len_seq, 10);
        assert_eq!(rows[12].seq_ratings.as_ref().unwrap()[0], 3 + 2);
        let plain = sliding_rows(&h, 10, 99, false);
        assert!(plain[5].seq_ratings.is_none() && plain[5].next_rating.is_none());
        assert_eq!(plain[5].seq, rows[5].seq);
    }

    #[test]
    fn movie_titles_are_cleaned_as_llara_does() {
        use crate::formats::llara::llara_movie_title as t;
        assert_eq!(t("Toy Story (1995)"), "Toy Story");
        assert_eq!(t("Usual Suspects, The (1995)"), "The Usual Suspects");
        assert_eq!(t("Time to Kill, A (1996)"), "A Time to Kill");
        assert_eq!(t("American in Paris, An (1951)"), "An American in Paris");
        assert_eq!(
            t("Shanghai Triad (Yao a yao yao dao waipo qiao) (1995)"),
            "Shanghai Triad (Yao a yao yao dao waipo qiao)"
        );
        // only a four-digit year is dropped; an article inside parentheses stays
        assert_eq!(t("Brazil (film)"), "Brazil (film)");
        assert_eq!(
            t("City of Lost Children, The (Cité des enfants perdus, La) (1995)"),
            "City of Lost Children, The (Cité des enfants perdus, La)"
        );
        assert_eq!(t("unknown"), "unknown");
    }

    #[test]
    fn held_out_rows_find_their_user_despite_order_within_the_row() {
        let hs: Vec<History> = vec![
            (0..20).map(|i| (i, 4)).collect(),
            (100..130).map(|i| (i, 5)).collect(),
            (50..60).map(|i| (i, 3)).collect(),
        ];
        let row = |items: &[u32], next: u32, r: i64| {
            let mut seq = items.to_vec();
            let len = seq.len();
            seq.resize(10, 999);
            SeqSample {
                seq,
                seq_ratings: Some(vec![r; 10]),
                len_seq: len,
                next,
                next_rating: Some(r),
            }
        };
        // user 1's last 10, two swapped, target = its last: slack 0
        let a = row(&[120, 121, 123, 122, 124, 125, 126, 127, 128], 129, 5);
        // user 0's window one step from its end: slack 1
        let b = row(&[9, 10, 11, 12, 13, 14, 15, 16, 17], 18, 4);
        // the right items with the wrong rating, and items nobody has
        let c = row(&[9, 10, 11], 12, 5);
        let d = row(&[500, 501], 502, 4);
        let m = match_held_out(&[a, b, c, d], &hs, 999, 3);
        assert_eq!(
            m[0],
            Some(HeldOutMatch {
                user: 1,
                slack: 0,
                ties: 0
            })
        );
        assert_eq!(
            m[1],
            Some(HeldOutMatch {
                user: 0,
                slack: 1,
                ties: 0
            })
        );
        assert_eq!(m[2], None);
        assert_eq!(m[3], None);
        // too far from the end for the slack allowed
        let e = row(&[2, 3], 4, 4);
        assert_eq!(match_held_out(&[e], &hs, 999, 3)[0], None);
    }
}
