//! Tokenizers: Hugging Face `tokenizer.json` folders, or rebuilt from GGUF metadata so that a
//! single `.gguf` file is a complete model.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use crate::{LmError, Result};

pub struct Tok {
    pub inner: Tokenizer,
    pub bos: Option<u32>,
    pub eos: Vec<u32>,
    /// Prepend BOS to raw prompts (GGUF `tokenizer.ggml.add_bos_token`); folders rely on the
    /// tokenizer's own post-processor instead.
    pub add_bos: bool,
    pub pad: u32,
    pub chat_template: Option<String>,
    pub bos_text: String,
    pub eos_text: String,
    from_gguf: bool,
}

fn tk_err(e: impl std::fmt::Display) -> LmError {
    LmError::Tokenizer(e.to_string())
}

/// `"<s>"` or `{"content": "<s>", ...}` in tokenizer_config.json.
fn token_text(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

/// The `tokenizers` library builds BPE merges unchecked: it cuts `continuing_subword_prefix`
/// off each merge's second part (a slice panic, or invalid UTF-8 when the cut splits a
/// character) and copies the merged token into a buffer as long as the longest vocabulary
/// entry (a slice panic when the merge is longer); both found by fuzzing. Every second part
/// must start with the prefix and every merged token must be in the vocabulary.
fn check_bpe_merges(v: &serde_json::Value) -> std::result::Result<(), String> {
    let m = &v["model"];
    let (Some(merges), Some(vocab)) = (m["merges"].as_array(), m["vocab"].as_object()) else {
        return Ok(());
    };
    let prefix = m["continuing_subword_prefix"].as_str().unwrap_or("");
    for (k, mg) in merges.iter().enumerate() {
        let pair = match mg {
            serde_json::Value::String(s) => s.split_once(' '),
            serde_json::Value::Array(a) => a
                .first()
                .and_then(|x| x.as_str())
                .zip(a.get(1).and_then(|x| x.as_str())),
            _ => None,
        };
        let Some((a, b)) = pair else { continue };
        let Some(rest) = b.strip_prefix(prefix) else {
            return Err(format!(
                "model.merges[{k}]: `{b}` does not start with continuing_subword_prefix `{prefix}`"
            ));
        };
        let merged = format!("{a}{rest}");
        if !vocab.contains_key(&merged) {
            return Err(format!(
                "model.merges[{k}]: the merged token `{merged}` is not in the vocabulary"
            ));
        }
    }
    Ok(())
}

/// Read a `tokenizer.json` with the `tokenizers` library. That library panics on some malformed
/// files (an unwrap in its decoder deserialisation, found by fuzzing): JSON syntax is checked
/// first, and any other panic of the library becomes an error naming the file.
pub fn tokenizer_from_file(path: &Path) -> Result<Tokenizer> {
    let bytes = std::fs::read(path).map_err(|e| LmError::file(path, e))?;
    // the library unwraps a syntax error met inside its `decoder` field: check the syntax first
    let v = serde_json::from_slice::<serde_json::Value>(&bytes)
        .map_err(|e| LmError::file(path, format!("invalid JSON: {e}")))?;
    check_bpe_merges(&v).map_err(|why| LmError::file(path, why))?;
    match std::panic::catch_unwind(|| Tokenizer::from_bytes(&bytes)) {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(LmError::file(path, format!("invalid tokenizer: {e}"))),
        Err(p) => {
            let why = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(LmError::file(path, format!("invalid tokenizer: {why}")))
        }
    }
}

impl Tok {
    /// `tokenizer.json` (required) plus `tokenizer_config.json` and `generation_config.json`
    /// (optional) from a model folder.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        if !tj.exists() {
            return Err(LmError::file(
                &tj,
                "tokenizer missing (a model folder needs tokenizer.json)",
            ));
        }
        let inner = tokenizer_from_file(&tj)?;
        let read = |name: &str| -> Result<Option<serde_json::Value>> {
            let p = dir.join(name);
            if !p.exists() {
                return Ok(None);
            }
            let text = std::fs::read_to_string(&p).map_err(|e| LmError::file(&p, e))?;
            serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| LmError::file(&p, format!("invalid JSON: {e}")))
        };
        let cfg = read("tokenizer_config.json")?.unwrap_or_default();
        let gen_cfg = read("generation_config.json")?.unwrap_or_default();
        let model_cfg = read("config.json")?.unwrap_or_default();
        let bos_text = token_text(cfg.get("bos_token")).unwrap_or_default();
        let eos_text = token_text(cfg.get("eos_token")).unwrap_or_default();
        let bos = inner.token_to_id(&bos_text);
        let mut eos: Vec<u32> = inner.token_to_id(&eos_text).into_iter().collect();
        for c in [&gen_cfg, &model_cfg] {
            match c.get("eos_token_id") {
                Some(serde_json::Value::Number(n)) => eos.extend(n.as_u64().map(|x| x as u32)),
                Some(serde_json::Value::Array(a)) => {
                    eos.extend(a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32))
                }
                _ => {}
            }
        }
        eos.sort();
        eos.dedup();
        let chat_template = match cfg.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .or_else(|| a.first())
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(String::from),
            _ => {
                let p = dir.join("chat_template.jinja");
                std::fs::read_to_string(p).ok()
            }
        };
        let pad = cfg
            .get("pad_token")
            .and_then(|v| token_text(Some(v)))
            .and_then(|t| inner.token_to_id(&t))
            .or(eos.first().copied())
            .unwrap_or(0);
        Ok(Tok {
            inner,
            bos,
            eos,
            add_bos: false,
            pad,
            chat_template,
            bos_text,
            eos_text,
            from_gguf: false,
        })
    }

    /// Rebuild a byte-level BPE tokenizer (`tokenizer.ggml.model = "gpt2"`) from GGUF metadata.
    pub fn from_gguf(md: &HashMap<String, Value>, path: &Path) -> Result<Self> {
        let err = |m: String| LmError::file(path, m);
        let model = md
            .get("tokenizer.ggml.model")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        if model != "gpt2" {
            return Err(err(format!(
                "GGUF tokenizer model {model:?} is not supported (only byte-level BPE \"gpt2\"); point --model at a folder with tokenizer.json instead"
            )));
        }
        let tokens: Vec<String> = md
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.to_vec().ok())
            .ok_or_else(|| {
                err("tokenizer missing: no tokenizer.ggml.tokens in the GGUF metadata".into())
            })?
            .iter()
            .map(|v| v.to_string().cloned().unwrap_or_default())
            .collect();
        let merges: Vec<(String, String)> = md
            .get("tokenizer.ggml.merges")
            .and_then(|v| v.to_vec().ok())
            .ok_or_else(|| {
                err("tokenizer missing: no tokenizer.ggml.merges in the GGUF metadata".into())
            })?
            .iter()
            .filter_map(|v| v.to_string().ok())
            .filter_map(|s| {
                s.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
            })
            .collect();
        let types: Vec<i32> = md
            .get("tokenizer.ggml.token_type")
            .and_then(|v| v.to_vec().ok())
            .map(|a| a.iter().map(|x| x.to_i32().unwrap_or(1)).collect())
            .unwrap_or_default();
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(false)
            .build()
            .map_err(|e| err(format!("cannot build the BPE tokenizer: {e}")))?;
        let mut inner = Tokenizer::new(bpe);
        let pre = md
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        let byte_level = ByteLevel::new(false, true, true);
        let split = |re: &str| -> Result<PreTokenizerWrapper> {
            let s = Split::new(
                SplitPattern::Regex(re.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| err(format!("pre-tokenizer regex: {e}")))?;
            Ok(PreTokenizerWrapper::Split(s))
        };
        let qwen_re = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
        let llama3_re = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
        let no_regex = PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false));
        let pre_tok: PreTokenizerWrapper = match pre.as_str() {
            "smollm" => PreTokenizerWrapper::Sequence(Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                PreTokenizerWrapper::ByteLevel(byte_level),
            ])),
            "qwen2" | "deepseek-r1-qwen" => {
                PreTokenizerWrapper::Sequence(Sequence::new(vec![split(qwen_re)?, no_regex]))
            }
            "llama-bpe" | "llama3" => {
                PreTokenizerWrapper::Sequence(Sequence::new(vec![split(llama3_re)?, no_regex]))
            }
            _ => PreTokenizerWrapper::ByteLevel(byte_level),
        };
        inner.with_pre_tokenizer(Some(pre_tok));
        inner.with_decoder(Some(ByteLevel::default()));
        let special: Vec<AddedToken> = tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
            .map(|(_, t)| AddedToken::from(t.clone(), true))
            .collect();
        inner
            .add_special_tokens(special)
            .map_err(|e| err(format!("special tokens: {e}")))?;
        let id = |k: &str| md.get(k).and_then(|v| v.to_u32().ok());
        let bos = id("tokenizer.ggml.bos_token_id");
        let eos: Vec<u32> = id("tokenizer.ggml.eos_token_id")
            .into_iter()
            .chain(id("tokenizer.ggml.eot_token_id"))
            .collect();
        let add_bos = md
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        let pad = id("tokenizer.ggml.padding_token_id")
            .or(eos.first().copied())
            .unwrap_or(0);
        let text = |i: Option<u32>| {
            i.and_then(|i| tokens.get(i as usize).cloned())
                .unwrap_or_default()
        };
        Ok(Tok {
            inner,
            bos,
            bos_text: text(bos),
            eos_text: text(eos.first().copied()),
            eos,
            add_bos,
            pad,
            chat_template: md
                .get("tokenizer.chat_template")
                .and_then(|v| v.to_string().ok())
                .cloned(),
            from_gguf: true,
        })
    }

    /// Token ids of `text`. `add_special` adds BOS (and whatever the tokenizer's post-processor
    /// adds) as for a raw prompt; rendered chat templates are encoded without it.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, add_special && !self.from_gguf)
            .map_err(tk_err)?;
        let mut ids = enc.get_ids().to_vec();
        if add_special
            && self.add_bos
            && let Some(b) = self.bos
            && ids.first() != Some(&b)
        {
            ids.insert(0, b);
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(tk_err)
    }

    /// Incremental detokenization for streaming: each step decodes only a short window of
    /// recent ids (tokenizers' `DecodeStream`), so a long generation costs O(length), not
    /// O(length²). Falls back to re-decoding the whole output if the window decode fails.
    pub fn text_stream(&self) -> TextStream<'_> {
        TextStream {
            tok: self,
            stream: self.inner.decode_stream(true),
            ids: Vec::new(),
            emitted: 0,
            fallback: false,
        }
    }

    /// The raw bytes every token stands for (`None` for special and control tokens):
    /// byte-level BPE symbols mapped back through GPT-2's byte alphabet, or SentencePiece
    /// pieces with `▁` as a space and `<0xNN>` byte tokens. What constrained decoding matches
    /// and what `logprobs` reports as a token's bytes.
    pub fn token_bytes(&self) -> Vec<Option<Vec<u8>>> {
        let n = self.vocab_size();
        let added = self.inner.get_added_vocabulary().get_added_tokens_decoder();
        let vocab = self.inner.get_vocab(true);
        let byte_level = vocab.keys().any(|t| t.contains('\u{120}'));
        let mut inverse = [None::<u8>; 324];
        let mut k = 0u32;
        for b in 0..=255u8 {
            let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
            let c = if printable {
                b as u32
            } else {
                k += 1;
                255 + k
            };
            inverse[c as usize] = Some(b);
        }
        (0..n as u32)
            .map(|id| {
                if added.get(&id).is_some_and(|t| t.special) || self.eos.contains(&id) {
                    return None;
                }
                let t = self.inner.id_to_token(id)?;
                if byte_level {
                    t.chars()
                        .map(|c| inverse.get(c as usize).copied().flatten())
                        .collect::<Option<Vec<u8>>>()
                        .or_else(|| added.contains_key(&id).then(|| t.clone().into_bytes()))
                } else if let Some(hex) = t.strip_prefix("<0x").and_then(|h| h.strip_suffix('>')) {
                    u8::from_str_radix(hex, 16).ok().map(|b| vec![b])
                } else {
                    Some(t.replace('\u{2581}', " ").into_bytes())
                }
            })
            .collect()
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.eos.contains(&id)
    }
}

/// See [`Tok::text_stream`].
pub struct TextStream<'a> {
    tok: &'a Tok,
    stream: tokenizers::DecodeStream<
        'a,
        tokenizers::ModelWrapper,
        tokenizers::NormalizerWrapper,
        tokenizers::PreTokenizerWrapper,
        tokenizers::PostProcessorWrapper,
        tokenizers::DecoderWrapper,
    >,
    ids: Vec<u32>,
    /// Bytes of text returned so far (used by the fallback).
    emitted: usize,
    fallback: bool,
}

impl TextStream<'_> {
    /// The text that `id` completes, or `None` while it ends inside a multi-byte character.
    pub fn step(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        if !self.fallback {
            match self.stream.step(id) {
                Ok(piece) => {
                    if let Some(p) = &piece {
                        self.emitted += p.len();
                    }
                    return Ok(piece);
                }
                Err(_) => self.fallback = true,
            }
        }
        let full = self.tok.decode(&self.ids, true)?;
        if full.ends_with('\u{FFFD}')
            || full.len() <= self.emitted
            || !full.is_char_boundary(self.emitted)
        {
            return Ok(None);
        }
        let piece = full[self.emitted..].to_string();
        self.emitted = full.len();
        Ok(Some(piece))
    }
}
