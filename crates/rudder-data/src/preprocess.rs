//! Preprocessing: implicit-feedback thresholds and k-core filtering. Both return a compacted
//! dataset (users and items left without interactions are dropped and ids renumbered).

use crate::dataset::Dataset;
use crate::error::{DataError, Result};

/// Keep interactions whose rating is at least `threshold` (e.g. 4 for "liked").
pub fn implicit(ds: &Dataset, threshold: f32) -> Result<Dataset> {
    if !ds.interactions.has_ratings() {
        return Err(DataError::Config(format!(
            "dataset `{}` has no ratings, so a rating threshold cannot be applied",
            ds.name
        )));
    }
    let x = ds
        .interactions
        .filter(|it| it.rating.is_some_and(|r| r >= threshold));
    Ok(ds.with_interactions(x))
}

/// Iteratively drop users with fewer than `user_k` and items with fewer than `item_k`
/// interactions until both conditions hold.
pub fn kcore(ds: &Dataset, user_k: usize, item_k: usize) -> Dataset {
    let mut x = ds.interactions.clone();
    loop {
        let ud = x.user_degrees();
        let id = x.item_degrees();
        let bad_u = ud.iter().any(|&d| d > 0 && d < user_k);
        let bad_i = id.iter().any(|&d| d > 0 && d < item_k);
        if !bad_u && !bad_i {
            break;
        }
        x = x.filter(|it| ud[it.user as usize] >= user_k && id[it.item as usize] >= item_k);
    }
    ds.with_interactions(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::DatasetBuilder;

    #[test]
    fn kcore_reaches_fixed_point() {
        let mut b = DatasetBuilder::new();
        // u1 has two items, i3 only one user: removing i3 leaves u2 with one item, which goes too.
        for (u, i) in [
            ("u1", "i1"),
            ("u1", "i2"),
            ("u2", "i1"),
            ("u2", "i3"),
            ("u3", "i1"),
            ("u3", "i2"),
        ] {
            b.add(u, i, Some(5.0), None);
        }
        let ds = b.finish("t", None, None);
        let k = kcore(&ds, 2, 2);
        assert_eq!(k.n_users(), 2);
        assert_eq!(k.n_items(), 2);
        assert_eq!(k.interactions.len(), 4);
        assert!(k.users.get("u2").is_none());
    }

    #[test]
    fn implicit_threshold() {
        let mut b = DatasetBuilder::new();
        b.add("a", "x", Some(5.0), None);
        b.add("a", "y", Some(2.0), None);
        b.add("b", "y", Some(3.0), None);
        let ds = b.finish("t", None, None);
        let d = implicit(&ds, 4.0).unwrap();
        assert_eq!(d.interactions.len(), 1);
        assert_eq!((d.n_users(), d.n_items()), (1, 1));
        let mut b = DatasetBuilder::new();
        b.add("a", "x", None, None);
        assert!(implicit(&b.finish("t", None, None), 4.0).is_err());
    }
}
