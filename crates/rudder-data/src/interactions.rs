//! User→item interactions in compressed sparse row form, with optional rating and timestamp
//! per interaction. The item→user view is the same type, obtained with [`Interactions::transpose`].

/// One interaction (an edge of the user–item graph).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interaction {
    pub user: u32,
    pub item: u32,
    pub rating: Option<f32>,
    pub timestamp: Option<i64>,
}

impl Interaction {
    pub fn new(user: u32, item: u32) -> Self {
        Interaction {
            user,
            item,
            rating: None,
            timestamp: None,
        }
    }
}

/// CSR matrix of interactions: row = user, entries = items in the order they were given.
/// Duplicate (user, item) pairs are kept (the reference repositories keep them too).
#[derive(Debug, Clone, PartialEq)]
pub struct Interactions {
    n_users: usize,
    n_items: usize,
    indptr: Vec<usize>,
    items: Vec<u32>,
    ratings: Option<Vec<f32>>,
    timestamps: Option<Vec<i64>>,
}

impl Interactions {
    /// No interactions over an `n_users × n_items` space.
    pub fn empty(n_users: usize, n_items: usize) -> Self {
        Interactions {
            n_users,
            n_items,
            indptr: vec![0; n_users + 1],
            items: Vec::new(),
            ratings: None,
            timestamps: None,
        }
    }

    /// Build from a list of interactions. Within a user the given order is kept. Ratings
    /// (timestamps) are stored when every interaction has one.
    ///
    /// Panics if an id is out of range: readers validate ids before calling this.
    pub fn from_interactions(n_users: usize, n_items: usize, list: &[Interaction]) -> Self {
        let mut counts = vec![0usize; n_users + 1];
        for x in list {
            assert!(
                (x.user as usize) < n_users && (x.item as usize) < n_items,
                "id out of range"
            );
            counts[x.user as usize + 1] += 1;
        }
        for u in 0..n_users {
            counts[u + 1] += counts[u];
        }
        let indptr = counts.clone();
        let mut next = counts;
        let mut items = vec![0u32; list.len()];
        let has_r = !list.is_empty() && list.iter().all(|x| x.rating.is_some());
        let has_t = !list.is_empty() && list.iter().all(|x| x.timestamp.is_some());
        let mut ratings = if has_r {
            vec![0f32; list.len()]
        } else {
            Vec::new()
        };
        let mut ts = if has_t {
            vec![0i64; list.len()]
        } else {
            Vec::new()
        };
        for x in list {
            let p = next[x.user as usize];
            next[x.user as usize] += 1;
            items[p] = x.item;
            if has_r {
                ratings[p] = x.rating.unwrap();
            }
            if has_t {
                ts[p] = x.timestamp.unwrap();
            }
        }
        Interactions {
            n_users,
            n_items,
            indptr,
            items,
            ratings: has_r.then_some(ratings),
            timestamps: has_t.then_some(ts),
        }
    }

    /// Build from per-user item lists (row u = `lists[u]`).
    pub fn from_lists(n_items: usize, lists: &[Vec<u32>]) -> Self {
        let mut indptr = Vec::with_capacity(lists.len() + 1);
        indptr.push(0);
        let mut items = Vec::new();
        for l in lists {
            assert!(
                l.iter().all(|&i| (i as usize) < n_items),
                "item id out of range"
            );
            items.extend_from_slice(l);
            indptr.push(items.len());
        }
        Interactions {
            n_users: lists.len(),
            n_items,
            indptr,
            items,
            ratings: None,
            timestamps: None,
        }
    }

    pub fn n_users(&self) -> usize {
        self.n_users
    }
    pub fn n_items(&self) -> usize {
        self.n_items
    }
    /// Number of interactions (non-zeros).
    pub fn len(&self) -> usize {
        self.items.len()
    }
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
    pub fn indptr(&self) -> &[usize] {
        &self.indptr
    }
    pub fn indices(&self) -> &[u32] {
        &self.items
    }
    pub fn has_ratings(&self) -> bool {
        self.ratings.is_some()
    }
    pub fn has_timestamps(&self) -> bool {
        self.timestamps.is_some()
    }
    pub fn all_ratings(&self) -> Option<&[f32]> {
        self.ratings.as_deref()
    }
    pub fn all_timestamps(&self) -> Option<&[i64]> {
        self.timestamps.as_deref()
    }

    /// Items of user `u` (row `u`).
    pub fn items(&self, u: u32) -> &[u32] {
        let u = u as usize;
        &self.items[self.indptr[u]..self.indptr[u + 1]]
    }
    pub fn ratings(&self, u: u32) -> Option<&[f32]> {
        let u = u as usize;
        self.ratings
            .as_ref()
            .map(|r| &r[self.indptr[u]..self.indptr[u + 1]])
    }
    pub fn timestamps(&self, u: u32) -> Option<&[i64]> {
        let u = u as usize;
        self.timestamps
            .as_ref()
            .map(|r| &r[self.indptr[u]..self.indptr[u + 1]])
    }
    pub fn degree(&self, u: u32) -> usize {
        self.indptr[u as usize + 1] - self.indptr[u as usize]
    }

    /// Every interaction in row order.
    pub fn iter(&self) -> impl Iterator<Item = Interaction> + '_ {
        (0..self.n_users as u32).flat_map(move |u| self.iter_user(u))
    }

    /// Interactions of one user, in row order.
    pub fn iter_user(&self, u: u32) -> impl Iterator<Item = Interaction> + '_ {
        let u = u as usize;
        (self.indptr[u]..self.indptr[u + 1]).map(move |p| Interaction {
            user: u as u32,
            item: self.items[p],
            rating: self.ratings.as_ref().map(|r| r[p]),
            timestamp: self.timestamps.as_ref().map(|t| t[p]),
        })
    }

    pub fn to_vec(&self) -> Vec<Interaction> {
        self.iter().collect()
    }

    /// Users with at least one interaction, ascending.
    pub fn active_users(&self) -> Vec<u32> {
        (0..self.n_users as u32)
            .filter(|&u| self.degree(u) > 0)
            .collect()
    }

    /// Number of interactions of each item.
    pub fn item_degrees(&self) -> Vec<usize> {
        let mut d = vec![0usize; self.n_items];
        for &i in &self.items {
            d[i as usize] += 1;
        }
        d
    }

    pub fn user_degrees(&self) -> Vec<usize> {
        (0..self.n_users as u32).map(|u| self.degree(u)).collect()
    }

    /// The item→user view (rows = items), ratings and timestamps carried along.
    pub fn transpose(&self) -> Interactions {
        let list: Vec<Interaction> = self
            .iter()
            .map(|x| Interaction {
                user: x.item,
                item: x.user,
                ..x
            })
            .collect();
        Interactions::from_interactions(self.n_items, self.n_users, &list)
    }

    /// Keep the interactions for which `keep` is true.
    pub fn filter(&self, mut keep: impl FnMut(&Interaction) -> bool) -> Interactions {
        let list: Vec<Interaction> = self.iter().filter(|x| keep(x)).collect();
        Interactions::from_interactions(self.n_users, self.n_items, &list)
    }

    /// Renumber users and items (`None` drops them) into a new `n_users × n_items` space.
    pub fn remap(
        &self,
        users: &[Option<u32>],
        items: &[Option<u32>],
        n_users: usize,
        n_items: usize,
    ) -> Interactions {
        let list: Vec<Interaction> = self
            .iter()
            .filter_map(|x| {
                Some(Interaction {
                    user: users[x.user as usize]?,
                    item: items[x.item as usize]?,
                    ..x
                })
            })
            .collect();
        Interactions::from_interactions(n_users, n_items, &list)
    }

    /// Same interactions over a larger id space.
    pub fn with_shape(&self, n_users: usize, n_items: usize) -> Interactions {
        assert!(n_users >= self.n_users && n_items >= self.n_items);
        let mut out = self.clone();
        out.n_items = n_items;
        let last = *out.indptr.last().unwrap();
        out.indptr.resize(n_users + 1, last);
        out.n_users = n_users;
        out
    }

    /// Concatenate several interaction sets over the same space (row order: part by part).
    pub fn union(parts: &[&Interactions]) -> Interactions {
        let n_users = parts.iter().map(|p| p.n_users).max().unwrap_or(0);
        let n_items = parts.iter().map(|p| p.n_items).max().unwrap_or(0);
        let mut list = Vec::new();
        for u in 0..n_users as u32 {
            for p in parts {
                if (u as usize) < p.n_users {
                    list.extend(p.iter_user(u));
                }
            }
        }
        Interactions::from_interactions(n_users, n_items, &list)
    }

    /// Number of repeated (user, item) pairs beyond the first.
    pub fn duplicate_pairs(&self) -> usize {
        let mut dup = 0;
        let mut buf = Vec::new();
        for u in 0..self.n_users as u32 {
            buf.clear();
            buf.extend_from_slice(self.items(u));
            buf.sort_unstable();
            dup += buf.windows(2).filter(|w| w[0] == w[1]).count();
        }
        dup
    }

    /// Sorted, de-duplicated item list of every user (for membership tests).
    pub fn sorted_sets(&self) -> Vec<Vec<u32>> {
        (0..self.n_users as u32)
            .map(|u| {
                let mut v = self.items(u).to_vec();
                v.sort_unstable();
                v.dedup();
                v
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_roundtrip_and_transpose() {
        let list = vec![
            Interaction {
                user: 1,
                item: 2,
                rating: Some(5.0),
                timestamp: Some(10),
            },
            Interaction {
                user: 0,
                item: 1,
                rating: Some(3.0),
                timestamp: Some(5),
            },
            Interaction {
                user: 1,
                item: 0,
                rating: Some(4.0),
                timestamp: Some(7),
            },
        ];
        let x = Interactions::from_interactions(3, 3, &list);
        assert_eq!(x.len(), 3);
        assert_eq!(x.items(0), &[1]);
        assert_eq!(x.items(1), &[2, 0]);
        assert_eq!(x.items(2), &[] as &[u32]);
        assert_eq!(x.ratings(1).unwrap(), &[5.0, 4.0]);
        let t = x.transpose();
        assert_eq!(t.n_users(), 3);
        assert_eq!(t.items(0), &[1]);
        assert_eq!(t.items(2), &[1]);
        assert_eq!(t.timestamps(1).unwrap(), &[5]);
        assert_eq!(t.transpose().sorted_sets(), x.sorted_sets());
        assert_eq!(x.active_users(), vec![0, 1]);
        assert_eq!(x.item_degrees(), vec![1, 1, 1]);
    }

    #[test]
    fn optional_fields_only_when_complete() {
        let list = vec![
            Interaction {
                user: 0,
                item: 0,
                rating: Some(1.0),
                timestamp: None,
            },
            Interaction {
                user: 0,
                item: 1,
                rating: None,
                timestamp: None,
            },
        ];
        let x = Interactions::from_interactions(1, 2, &list);
        assert!(!x.has_ratings());
        assert!(!x.has_timestamps());
    }

    #[test]
    fn duplicates_and_union() {
        let a = Interactions::from_lists(4, &[vec![0, 1, 1], vec![3]]);
        let b = Interactions::from_lists(4, &[vec![2], vec![], vec![0]]);
        assert_eq!(a.duplicate_pairs(), 1);
        let u = Interactions::union(&[&a, &b]);
        assert_eq!(u.n_users(), 3);
        assert_eq!(u.items(0), &[0, 1, 1, 2]);
        assert_eq!(u.items(2), &[0]);
    }
}
