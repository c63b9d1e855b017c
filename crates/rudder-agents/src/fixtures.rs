//! A small generated world in Agent4Rec's layout, for tests and examples: 6 users, 40 movies
//! (`Movie i (year)`, four genre patterns), five train / valid / test items per user,
//! traits and personas for every user.

use std::path::Path;

use crate::{Result, io_err};

pub const USERS: u32 = 6;
pub const ITEMS: u32 = 40;

/// Write the world's files into `dir` (created if needed).
pub fn write_world(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let (mut train, mut valid, mut test) = (String::new(), String::new(), String::new());
    for u in 0..USERS {
        let items = |off: u32| -> String {
            (0..5)
                .map(|k| ((u * 7 + off + k * 3) % ITEMS).to_string())
                .collect::<Vec<_>>()
                .join(" ")
        };
        train.push_str(&format!("{u} {}\n", items(0)));
        valid.push_str(&format!("{u} {}\n", items(1)));
        test.push_str(&format!("{u} {}\n", items(2)));
    }
    let mut md = String::from("movie_id,title,genres,rating,summary\n");
    for i in 0..ITEMS {
        let g = ["Drama", "Comedy|Drama", "Action", "Horror|Thriller"][i as usize % 4];
        md.push_str(&format!(
            "{i},Movie {i} ({}),{g},{:.2},A story number {i}.\n",
            1950 + i,
            2.5 + (i % 5) as f64 * 0.5
        ));
    }
    let mut st = String::from("user_id,activity,diversity,conformity\n");
    let mut pe = String::from("taste,reason,high_rating,low_rating\n");
    for u in 0..USERS {
        st.push_str(&format!("{u},{},{},2\n", u % 3 + 1, (u + 1) % 3 + 1));
        pe.push_str(" I enjoy dramas.|  I like comedies.,r,You are generous.,x\n");
    }
    for (name, text) in [
        ("train.txt", train),
        ("valid.txt", valid),
        ("test.txt", test),
        ("movie_detail.csv", md),
        ("user_statistic.csv", st),
        ("personas.csv", pe),
    ] {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(|e| io_err(&p, e))?;
    }
    Ok(())
}
