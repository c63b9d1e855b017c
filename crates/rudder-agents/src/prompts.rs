//! The agents' prompts (Agent4Rec's P1–P6, in our own words with the reference's field layout:
//! the line formats `MOVIE: …; ALIGN: …; REASON: …` etc. are what the parsers read), and the
//! trait texts. [`VERSION`] goes into every journal line so that a resumed run refuses a journal
//! written with other prompts.

use crate::profile::Profile;

pub const VERSION: &str = "agent4rec-prompts-2";

/// The memory queries of the reference (retrieval is by similarity to these).
pub const QUERY_PAGE: &str =
    "What movies have you watched on the previous pages of the current recommender system?";
pub const QUERY_EXIT: &str =
    "Do you satisfy with current recommendation system and what's your interaction history?";
pub const QUERY_REFLECT: &str = "what's your interaction history with each page of recommender?";

pub fn activity_text(level: u8) -> &'static str {
    match level {
        1 => {
            "An Incredibly Elusive Occasional Viewer: you seldom use movie recommenders, and the slightest dissatisfaction makes you leave."
        }
        2 => {
            "An Occasional Viewer: you use recommenders now and then, watch only what strictly matches your taste, and tend to leave after a few unsatisfying experiences."
        }
        _ => {
            "A Movie Enthusiast: you use recommenders a lot, will watch almost anything, and are hard to make leave."
        }
    }
}

pub fn conformity_text(level: u8) -> &'static str {
    match level {
        1 => "A Dedicated Follower: your ratings mostly agree with the movies' historical ratings.",
        2 => {
            "A Balanced Evaluator: your ratings weigh the historical ratings against your own taste."
        }
        _ => "A Maverick Critic: you rate by your own taste and ignore historical ratings.",
    }
}

pub fn diversity_text(level: u8) -> &'static str {
    match level {
        1 => {
            "An Exceedingly Selective Viewer: you watch only the kinds of movies you already like, with no variety."
        }
        2 => {
            "A Niche Explorer: you occasionally try other kinds of movies but mostly stay with your preferred types."
        }
        _ => {
            "A Cinematic Trailblazer: you seek out unique, obscure and varied movies beyond the usual."
        }
    }
}

const DEFINITIONS: &str = "Activity is how often you use the recommender and how easily you leave it. Conformity is how closely your ratings follow the movies' historical ratings. Diversity is how willing you are to watch movies outside your usual preferences.";

fn memory_block(memories: &[String]) -> String {
    if memories.is_empty() {
        return String::new();
    }
    let mut s = String::from("\nRelevant context from your memory:\n");
    for m in memories {
        s.push_str("- ");
        s.push_str(m);
        s.push('\n');
    }
    s
}

/// P1, system part: traits, taste, rating tendency, definitions, retrieved memories.
pub fn reaction_system(p: &Profile, memories: &[String]) -> String {
    format!(
        "You excel at role-playing. Picture yourself as a user exploring a movie recommendation system. You have the following social traits:\n\
Your activity trait is: {}\nYour conformity trait is: {}\nYour diversity trait is: {}\n\
Beyond that, your movie tastes are: {}.\nAnd your rating tendency is {}\n{DEFINITIONS}{}",
        activity_text(p.activity),
        conformity_text(p.conformity),
        diversity_text(p.diversity),
        p.taste_text(),
        p.rating_tendency,
        memory_block(memories)
    )
}

/// One recommended item as the page shows it (genres deliberately not shown, as the reference).
pub fn item_line(title: &str, mean_rating: f64, summary: &str) -> String {
    format!("<- {title} -> <- History ratings: {mean_rating:.2} -> <- Summary: {summary} ->")
}

/// P1, user part: the page and the three instructions with their line formats.
pub fn reaction_user(page: usize, lines: &[String]) -> String {
    reaction_user_text(&page.to_string(), lines)
}

/// [`reaction_user`] with any page label (the content-free prompt uses "N/A").
pub fn reaction_user_text(page: &str, lines: &[String]) -> String {
    format!(
        "#### Recommended List ####\nPAGE {page}\n{}\n\
Please respond to all the movies in the ## Recommended List ## and provide explanations.\n\
Firstly, decide for every movie whether it aligns with your taste. Write one line per movie in this format:\n\
MOVIE: [movie name]; ALIGN: [yes or no]; REASON: [brief reason]\n\
Secondly, among the aligned movies, decide how many to watch, guided by your activity and diversity traits. Write:\n\
NUM: [number]; WATCH: [all movie names]; REASON: [brief reason];\n\
Thirdly, assume it is your first time watching each movie you chose, and rate it from 1 to 5 considering your feelings and your conformity trait. Write one line per watched movie:\n\
MOVIE: [movie name]; RATING: [integer between 1-5]; FEELING: [what you feel after watching];\n\
Write nothing else. Stay grounded in the movies listed.",
        lines.join("\n")
    )
}

/// P2, system part: activity only, page fatigue, retrieved memories.
pub fn exit_system(p: &Profile, page: usize, memories: &[String]) -> String {
    format!(
        "You excel at role-playing. Picture yourself as a user exploring a movie recommendation system. Your activity trait is: {}\n\
Now you are on page {page}. You may get tired as you browse more pages (above 2 pages you are a little tired, above 4 pages very tired).{}",
        activity_text(p.activity),
        memory_block(memories)
    )
}

pub const EXIT_USER: &str = "Firstly, give your overall feeling about the recommender from your memories, your activity trait and your satisfaction, in this format:\n\
POSITIVE: [reason] or NEGATIVE: [reason]\n\
Secondly, judge how tired you are; inactive users tire more easily.\n\
Thirdly, decide whether to continue to the next page or to exit. Exit if your feeling is negative or you are tired, especially when your activity is low. Answer in this format:\n\
[EXIT]; Reason: [brief reason] or [NEXT]; Reason: [brief reason]";

/// P3: the interview, with the whole memory stream.
pub fn interview_messages(p: &Profile, memories: &[String]) -> (String, String) {
    let system = format!(
        "Picture yourself as user {} who has just finished exploring a movie recommendation system. You have the following social traits:\n\
Your activity trait is: {}\nYour conformity trait is: {}\nYour diversity trait is: {}\n\
Beyond that, your movie tastes are: {}.\n{DEFINITIONS}",
        p.user,
        activity_text(p.activity),
        conformity_text(p.conformity),
        diversity_text(p.diversity),
        p.taste_text()
    );
    (system, interview_user(&p.user.to_string(), memories))
}

/// P3, user part (the content-free prompt uses "N/A" for the user and the memories).
pub fn interview_user(who: &str, memories: &[String]) -> String {
    let mut mem = String::new();
    for m in memories {
        mem.push_str("- ");
        mem.push_str(m);
        mem.push('\n');
    }
    format!(
        "Relevant context from user {who}'s memory:\n{mem}\
Act as user {who} and assume you are being interviewed. Respond to: Are you satisfied with the recommendation system you just used? Rate it from 1 to 10 and explain why.\n\
Answer in this format:\nRATING: [integer between 1 and 10]; REASON: [explanation];\n\
Put only the number in RATING."
    )
}

/// P4: the satisfaction reflection (one user message).
pub fn reflection(memories: &[String]) -> String {
    let mut s = String::new();
    for m in memories {
        s.push_str(m);
        s.push('\n');
    }
    s.push_str("Given only the information above, describe your feeling about the recommendation result in one sentence. The output format must be:\n[unsatisfied/satisfied] with the recommendation result because [reason].");
    s
}

/// P5: the forced choice of the taste-discrimination test (taste only, no traits).
pub fn forced_messages(p: &Profile, lines: &[String]) -> (String, String) {
    let system = format!(
        "Assume you are a user browsing a movie recommendation system who has the following characteristics: Your movie tastes are: {}.",
        p.taste_text()
    );
    (system, forced_user(lines))
}

/// P5, user part.
pub fn forced_user(lines: &[String]) -> String {
    format!(
        "##recommended list##\n{}\n\
Choose the movies you want to watch from the list and explain why. You only watch movies that align with your taste.\n\
Answer one line per movie in this format:\nMOVIE: [movie name]; WATCH: [yes or no]; REASON: [brief reason]\n\
Judge every movie in the list and write nothing else.",
        lines.join("\n")
    )
}

/// P6: persona generation from a rating history (`by_rating[k]` = titles rated k+1).
pub fn persona_messages(by_rating: &[Vec<String>; 5]) -> (String, String) {
    let system = "You are a movie taste analyst. Role-play the user whose rating history you are given, and write in the first person (\"I\").".to_string();
    let mut user = String::from("Given a user's rating history:\n");
    for (k, titles) in by_rating.iter().enumerate() {
        let list = if titles.is_empty() {
            "None".to_string()
        } else {
            titles.join(", ")
        };
        user.push_str(&format!(
            "user gives a rating of {} for following movies: {list}\n",
            k + 1
        ));
    }
    user.push_str(
        "Request 1: generate as many TASTE-REASON pairs as possible; the taste should focus on the movies' genres. Write strictly in blocks of:\nTASTE: <descriptive taste>\nREASON: <brief reason>\n\
Request 2: conclude the user's rating habits:\nHIGH RATINGS: <conclusion about movies rated above 3>\nLOW RATINGS: <conclusion about movies rated below 2>\n\
Do not name movies, and keep the two requests apart.",
    );
    (system, user)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_carry_the_formats_the_parsers_read() {
        let p = Profile {
            user: 3,
            activity: 1,
            conformity: 2,
            diversity: 3,
            taste: vec!["enjoy dramas.".into()],
            rating_tendency: "kind".into(),
        };
        let s = reaction_system(&p, &["I saw Heat.".into()]);
        assert!(s.contains("Elusive") && s.contains("Balanced") && s.contains("Trailblazer"));
        assert!(s.contains("- I saw Heat."));
        assert!(!reaction_system(&p, &[]).contains("memory"));
        let u = reaction_user(2, &[item_line("Heat (1995)", 4.0, "cops")]);
        assert!(u.contains("PAGE 2") && u.contains("History ratings: 4.00"));
        assert!(u.contains("MOVIE: [movie name]; ALIGN: [yes or no]"));
        assert!(EXIT_USER.contains("[EXIT]") && EXIT_USER.contains("[NEXT]"));
        let (_, iu) = interview_messages(&p, &["m".into()]);
        assert!(iu.contains("RATING: [integer between 1 and 10]"));
        let (_, pu) = persona_messages(&[vec![], vec!["A".into()], vec![], vec![], vec![]]);
        assert!(pu.contains("rating of 1 for following movies: None"));
        assert!(pu.contains("rating of 2 for following movies: A"));
    }
}
