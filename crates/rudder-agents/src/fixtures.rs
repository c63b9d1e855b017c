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

/// Users and items of [`write_release`].
pub const RELEASE_USERS: usize = 30;
pub const RELEASE_ITEMS: usize = 60;

fn release_date(day: usize) -> String {
    // 2020-01-01 + day (at most 27 days into each month of 2020)
    format!("2020-{:02}-{:02} 12:00:00", 1 + day / 28, 1 + day % 28)
}

/// An AgentSociety-schema release for tests (JSON Lines `user.json`, `item.json`,
/// `review.json`): user u reviews 12 businesses on consecutive days starting at day u; even
/// businesses get 5 stars, odd ones 2. One Amazon-style review (timestamp in ms, no review id)
/// and one Goodreads-style review (date_added) are added for user 0; `broken_line` adds a
/// truncated record as line 361 of review.json.
pub fn write_release(dir: &Path, broken_line: bool) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut users = String::new();
    for u in 0..RELEASE_USERS {
        users.push_str(&format!(
            "{{\"user_id\":\"u{u}\",\"name\":\"User {u}\",\"review_count\":12,\"source\":\"yelp\"}}\n"
        ));
    }
    let mut items = String::new();
    for i in 0..RELEASE_ITEMS {
        items.push_str(&format!(
            "{{\"business_id\":\"b{i}\",\"name\":\"Shop {i}\",\"stars\":3.5,\"review_count\":10,\"categories\":\"Food\",\"source\":\"yelp\",\"type\":\"business\"}}\n"
        ));
    }
    let mut reviews = String::new();
    for u in 0..RELEASE_USERS {
        for j in 0..12 {
            let i = (u * 7 + j * 5) % RELEASE_ITEMS;
            let stars = if i.is_multiple_of(2) { 5 } else { 2 };
            reviews.push_str(&format!(
                "{{\"review_id\":\"r{u}_{j}\",\"user_id\":\"u{u}\",\"business_id\":\"b{i}\",\"stars\":{stars},\"text\":\"visit {j}\",\"useful\":{j},\"date\":\"{}\"}}\n",
                release_date(u + j * 3)
            ));
        }
    }
    if broken_line {
        reviews.push_str("{\"user_id\": \"u1\", \"item_id\": \n");
    }
    // Amazon: ms timestamp, parent_asin, rating, no review id (2019, before every other one)
    reviews.push_str("{\"user_id\":\"u0\",\"parent_asin\":\"b59\",\"rating\":4.0,\"timestamp\":1546300800000,\"text\":\"ok\"}\n");
    // Goodreads: date_added with offset (2019 too)
    reviews.push_str("{\"user_id\":\"u0\",\"book_id\":\"b58\",\"rating\":3,\"review_id\":\"g1\",\"review_text\":\"fine\",\"date_added\":\"Fri Aug 25 13:55:02 -0700 2019\"}\n");
    std::fs::write(dir.join("user.json"), users)?;
    std::fs::write(dir.join("item.json"), items)?;
    std::fs::write(dir.join("review.json"), reviews)
}
