//! Sequence data for language-model recommenders: LLaRA/iLoRA next-item samples and S-DPO
//! candidate-list prompts.

/// One LLaRA sample: the history window (right-padded with `pad`), its real length and the
/// target. MovieLens variants also carry a rating per position and for the target.
#[derive(Debug, Clone, PartialEq)]
pub struct SeqSample {
    pub seq: Vec<u32>,
    pub seq_ratings: Option<Vec<i64>>,
    pub len_seq: usize,
    pub next: u32,
    pub next_rating: Option<i64>,
}

impl SeqSample {
    /// The real (unpadded) history: the first `len_seq` entries that are not the pad id.
    pub fn history(&self, pad: Option<u32>) -> Vec<u32> {
        self.seq
            .iter()
            .take(self.len_seq)
            .copied()
            .filter(|&i| Some(i) != pad)
            .collect()
    }
}

/// Named splits of sequence samples plus the item names (`id2name.txt`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SeqDataset {
    pub name: String,
    pub splits: Vec<(String, Vec<SeqSample>)>,
    /// `item_names[id]`; its length is the number of items, and the pad id equals it.
    pub item_names: Option<Vec<String>>,
}

impl SeqDataset {
    pub fn pad_id(&self) -> Option<u32> {
        self.item_names.as_ref().map(|n| n.len() as u32)
    }
}

/// One S-DPO prompt record: history titles, the candidate titles and the true selection.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PromptSample {
    #[serde(rename = "historyList", with = "double_colon")]
    pub history: Vec<String>,
    #[serde(rename = "itemList")]
    pub candidates: Vec<String>,
    #[serde(rename = "trueSelection")]
    pub target: String,
}

/// Named splits of S-DPO prompt records.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PromptDataset {
    pub name: String,
    pub splits: Vec<(String, Vec<PromptSample>)>,
}

mod double_colon {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[String], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.join("::"))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        let s = String::deserialize(d)?;
        Ok(if s.is_empty() {
            Vec::new()
        } else {
            s.split("::").map(str::to_string).collect()
        })
    }
}
