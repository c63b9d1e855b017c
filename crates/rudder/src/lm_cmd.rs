//! `rudder lm …`: run a language model (Hugging Face folder, .gguf file or fetched asset):
//! generate, chat, score continuations, capture activations, show model facts.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use rudder_lm::chat::Message;
use rudder_lm::generate::{GenConfig, generate};
use rudder_lm::hooks::{Capture, Interventions, NoHook, Phase, Positions, Site};
use rudder_lm::loader::{LanguageModel, LoadOptions, load};

#[derive(Subcommand)]
pub enum LmCmd {
    /// Generate text from one prompt (streamed) or a file of prompts (JSONL out).
    Generate(GenerateArgs),
    /// Talk to a chat model on the terminal (/reset clears the history, /exit or EOF quits).
    Chat(ChatArgs),
    /// Log-probabilities of continuations given prompts (the quantity DPO-family losses use).
    Score(ScoreArgs),
    /// Capture residual-stream activations at chosen sites and positions to safetensors.
    Capture(CaptureArgs),
    /// Print what a model is: architecture, sizes, format, template hash.
    Info(ModelArgs),
    /// Teacher-forced logits (and optionally every HF hidden state) of one token sequence, to
    /// safetensors: tensors "ids" [T], "logits" [T, vocab], site names [T, d]. For parity checks.
    Dump(DumpArgs),
    /// Write the model as a Hugging Face folder (GGUF weights dequantized, Q/K rows in
    /// Hugging Face order), optionally with a LoRA adapter merged in.
    ExportHf(ExportArgs),
    /// Prefill and greedy-decode speed on a fixed 256-token prompt (the peer-baseline protocol).
    Bench(BenchArgs),
}

#[derive(Args)]
pub struct DumpArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text to tokenize (no BOS added).
    #[arg(long, conflicts_with = "ids")]
    pub text: Option<String>,
    /// A JSON array of token ids.
    #[arg(long)]
    pub ids: Option<PathBuf>,
    /// Also write the HF hidden states (block inputs + final norm) at every position.
    #[arg(long)]
    pub hidden: bool,
    /// JSON intervention list applied (e.g. from `rudder steer import` of a control vector).
    #[arg(long)]
    pub interventions: Option<PathBuf>,
    #[arg(long, short)]
    pub out: PathBuf,
}

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, default_value_t = 256)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 128)]
    pub decode_tokens: usize,
    /// Measured repetitions (after one warm-up); the median is reported.
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Also measure batched decoding through the continuous-batching engine at these batch
    /// sizes (each row: a rotation of the bench prompt, greedy, `--decode-tokens` tokens):
    /// aggregate decode tokens/s per batch size, the curve the rollout and serving throughput
    /// rests on.
    #[arg(long, value_delimiter = ',')]
    pub batch: Vec<usize>,
    /// Rows per prompt in the batched runs: 1 = every row its own prompt; K = groups of K rows
    /// with one prompt (K rollouts of one question), which the engine reads once per group.
    #[arg(long, default_value_t = 1)]
    pub rollouts: usize,
    /// Number format of the engine's key/value cache in the batched runs (f32 or f16).
    #[arg(long, default_value = "f32")]
    pub kv: rudder_lm::ragged::KvPrecision,
    /// A steering file (as for `lm generate --steer`) applied in every measured run, to measure
    /// what steering costs: compare with a run without it.
    #[arg(long)]
    pub steer: Option<PathBuf>,
    /// Strength λ of --steer.
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    pub strength: f32,
}

/// The benchmark paragraph of peer-baselines.md §6 (repeated, tokenized without BOS).
pub const BENCH_PARAGRAPH: &str = "Collaborative filtering predicts what a user will like from the preferences of many users. Graph neural networks propagate embeddings over the user-item bipartite graph, and models such as LightGCN drop feature transforms and nonlinearities to keep only neighborhood aggregation. ";

#[derive(Args, Clone)]
pub struct ModelArgs {
    /// A model folder (config.json + safetensors + tokenizer.json), a .gguf file, or the name
    /// of a fetched asset (e.g. smollm2-135m-instruct).
    #[arg(long, short)]
    pub model: String,
    /// Dequantize GGUF weights to f32 (exact parity with f32 tools; slower decoding).
    #[arg(long)]
    pub dequantize: bool,
    /// A LoRA adapter folder in PEFT's layout (adapter_config.json +
    /// adapter_model.safetensors), from `rudder llmrec` or Python peft, applied unmerged.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
}

#[derive(Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Fold --adapter into the weights before writing.
    #[arg(long)]
    pub merge: bool,
    /// Output folder (config.json, model.safetensors in f32, tokenizer.json,
    /// tokenizer_config.json): loads in transformers and in rudder.
    #[arg(long, short)]
    pub out: PathBuf,
}

#[derive(Args, Clone)]
pub struct SamplingArgs {
    /// Maximum number of new tokens.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling mass (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Penalty on tokens already seen (1 = off; 1.1–1.3 typical).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when the output contains this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// JSON intervention list applied while generating (see docs/lm.md).
    #[arg(long)]
    pub interventions: Option<PathBuf>,
    /// A steering file applied while generating: an AlphaSteer file (`rudder steer alphasteer
    /// fit`: gated, prefill only), a steering-vector file (`rudder steer vector`) or a llama.cpp
    /// control-vector GGUF, or an intervention list; scaled by --strength.
    #[arg(long)]
    pub steer: Option<PathBuf>,
    /// Strength λ of --steer (AlphaSteer: positive steers towards refusal).
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    pub strength: f32,
}

impl SamplingArgs {
    fn config(&self) -> GenConfig {
        GenConfig {
            max_new_tokens: self.max_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            stop: self.stop.clone(),
            ignore_eos: false,
        }
    }
}

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt.
    #[arg(long, short, conflicts_with = "prompts")]
    pub prompt: Option<String>,
    /// A file of prompts: JSON lines with a "prompt" field, or one prompt per line.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Wrap each prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// System message (with --chat).
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Prompts per batch (left-padded).
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Output JSONL (one object per prompt); default: stdout.
    #[arg(long, short)]
    pub out: Option<PathBuf>,
}

#[derive(Args)]
pub struct ChatArgs {
    /// A model folder, a .gguf file or a fetched asset (in process); with --server, the model
    /// name to ask the server for (default: its first model).
    #[arg(long, short, required_unless_present = "server")]
    pub model: Option<String>,
    /// Dequantize GGUF weights to f32 (in process).
    #[arg(long)]
    pub dequantize: bool,
    /// Talk to an OpenAI-compatible server instead (rudder serve, llama-server, vLLM, Ollama,
    /// a hosted API): its base URL, e.g. http://127.0.0.1:8080/v1. The key is read from
    /// $OPENAI_API_KEY (or --api-key-env).
    #[arg(long)]
    pub server: Option<String>,
    /// Environment variable holding the server's API key.
    #[arg(long, default_value = "OPENAI_API_KEY")]
    pub api_key_env: String,
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

#[derive(Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// JSON lines with "prompt" and "continuation" fields.
    #[arg(long, conflicts_with_all = ["prompt", "continuation"])]
    pub input: Option<PathBuf>,
    #[arg(long, requires = "continuation")]
    pub prompt: Option<String>,
    #[arg(long, requires = "prompt")]
    pub continuation: Option<String>,
    /// Render prompts as user messages in the chat template (continuation = assistant text).
    #[arg(long)]
    pub chat: bool,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Output JSONL; default: stdout.
    #[arg(long, short)]
    pub out: Option<PathBuf>,
}

#[derive(Args)]
pub struct CaptureArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompts: JSON lines with a "prompt" field, or one prompt per line.
    #[arg(long)]
    pub prompts: PathBuf,
    /// Sites: `hf` (embeddings + every block input + final norm, like Hugging Face
    /// output_hidden_states), `resid_pre`, `resid_post`, or comma-separated names such as
    /// blocks.5.hook_resid_pre,ln_final.hook_normalized.
    #[arg(long, default_value = "hf")]
    pub sites: String,
    /// Positions: last (last prompt token), prompt, all, from:K.
    #[arg(long, default_value = "last")]
    pub positions: String,
    #[arg(long)]
    pub chat: bool,
    #[arg(long, default_value_t = 20)]
    pub batch_size: usize,
    /// Interventions applied before capturing.
    #[arg(long)]
    pub interventions: Option<PathBuf>,
    /// Output safetensors (an index `<out>.json` is written next to it).
    #[arg(long, short)]
    pub out: PathBuf,
}

/// A path, or the name of a fetched asset.
pub fn resolve_model(arg: &str) -> Result<PathBuf> {
    Ok(rudder_data::assets::resolve_model(arg)?)
}

pub(crate) fn open(m: &ModelArgs) -> Result<LanguageModel> {
    let path = resolve_model(&m.model)?;
    let sp = crate::progress::spinner(&format!("loading {}", path.display()));
    let mut lm = load(
        &path,
        &LoadOptions {
            dequantize: m.dequantize,
        },
    )?;
    if let Some(a) = &m.adapter {
        lm.decoder
            .load_peft(a, 0)
            .with_context(|| format!("--adapter {}", a.display()))?;
    }
    sp.finish_and_clear();
    Ok(lm)
}

fn run_export(a: ExportArgs) -> Result<()> {
    let mut m = a.model.clone();
    if a.merge {
        anyhow::ensure!(m.adapter.is_some(), "--merge needs --adapter");
        m.dequantize = true;
    }
    let mut lm = open(&m)?;
    if a.merge {
        lm.decoder.merge_lora()?;
    } else if m.adapter.is_some() {
        bail!("--adapter without --merge would be dropped from the export; add --merge");
    }
    rudder_lm::lora::export_hf(&lm, &a.out)?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

fn read_prompts(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let jsonl = path
        .extension()
        .is_some_and(|e| e == "jsonl" || e == "json");
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        if jsonl {
            let v: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: invalid JSON", path.display(), i + 1))?;
            let p = v.get("prompt").and_then(|p| p.as_str());
            let Some(p) = p else {
                bail!("{}:{}: no string field \"prompt\"", path.display(), i + 1)
            };
            out.push(p.to_string());
        } else {
            out.push(line.to_string());
        }
    }
    if out.is_empty() {
        bail!("{}: no prompts", path.display());
    }
    Ok(out)
}

/// Token ids of a prompt, through the chat template when asked.
fn encode(lm: &LanguageModel, text: &str, chat: bool, system: Option<&str>) -> Result<Vec<u32>> {
    if chat {
        let t = lm
            .chat
            .as_ref()
            .context("this model has no chat template; drop --chat")?;
        let mut msgs = Vec::new();
        if let Some(s) = system {
            msgs.push(Message::new("system", s));
        }
        msgs.push(Message::new("user", text));
        Ok(lm.tok.encode(&t.render(&msgs, true)?, false)?)
    } else {
        Ok(lm.tok.encode(text, true)?)
    }
}

/// --interventions, then --steer at --strength.
fn sampling_interventions(lm: &LanguageModel, s: &SamplingArgs) -> Result<Interventions> {
    let mut iv = interventions(lm, &s.interventions)?;
    if let Some(p) = &s.steer {
        let st = crate::steer_cmd::steering_file(p, s.strength, Some(lm))?;
        iv = Interventions::new(
            iv.interventions
                .into_iter()
                .chain(st.interventions)
                .collect(),
        );
    }
    Ok(iv)
}

fn interventions(lm: &LanguageModel, path: &Option<PathBuf>) -> Result<Interventions> {
    let Some(p) = path else {
        return Ok(Interventions::default());
    };
    let iv = Interventions::from_json_file(p)?;
    iv.validate(lm.decoder.cfg.num_layers, lm.decoder.cfg.hidden_size)
        .with_context(|| format!("{}", p.display()))?;
    Ok(iv)
}

/// JSONL output: a file that appears only when complete (atomic rename), or stdout.
enum Sink {
    File(rudder_data::io::AtomicFile),
    Stdout(std::io::Stdout),
}

impl Sink {
    fn open(out: &Option<PathBuf>) -> Result<Self> {
        Ok(match out {
            Some(p) => Sink::File(rudder_data::io::AtomicFile::create(p)?),
            None => Sink::Stdout(std::io::stdout()),
        })
    }
    fn line(&mut self, v: &serde_json::Value) -> Result<()> {
        match self {
            Sink::File(f) => writeln!(f, "{v}")?,
            Sink::Stdout(s) => writeln!(s, "{v}")?,
        }
        Ok(())
    }
    fn finish(self) -> Result<()> {
        if let Sink::File(f) = self {
            f.commit()?;
        }
        Ok(())
    }
}

pub fn run(cmd: LmCmd) -> Result<()> {
    match cmd {
        LmCmd::Generate(a) => run_generate(a),
        LmCmd::Chat(a) => run_chat(a),
        LmCmd::Score(a) => run_score(a),
        LmCmd::Capture(a) => run_capture(a),
        LmCmd::Bench(a) => run_bench(a),
        LmCmd::Dump(a) => run_dump(a),
        LmCmd::ExportHf(a) => run_export(a),
        LmCmd::Info(m) => {
            let lm = open(&m)?;
            println!("{}", serde_json::to_string_pretty(&lm.info)?);
            println!(
                "weights: {:.1} MB in memory",
                lm.decoder.weight_bytes() as f64 / 1e6
            );
            Ok(())
        }
    }
}

fn run_generate(a: GenerateArgs) -> Result<()> {
    let lm = open(&a.model)?;
    let cfg = a.sampling.config();
    let mut iv = sampling_interventions(&lm, &a.sampling)?;
    if let Some(p) = &a.prompt {
        let ids = encode(&lm, p, a.chat, a.system.as_deref())?;
        let mut stdout = std::io::stdout();
        let t0 = std::time::Instant::now();
        let g = generate(&lm, &[ids], &cfg, &mut iv, &mut |_, s| {
            let _ = write!(stdout, "{s}");
            let _ = stdout.flush();
        })?;
        println!();
        let dt = t0.elapsed().as_secs_f64();
        eprintln!(
            "[{} prompt + {} new tokens in {:.2} s, {:.1} tok/s, finish: {:?}]",
            g[0].prompt_tokens,
            g[0].tokens.len(),
            dt,
            g[0].tokens.len() as f64 / dt,
            g[0].finish
        );
        return Ok(());
    }
    let Some(file) = &a.prompts else {
        bail!("give --prompt TEXT or --prompts FILE")
    };
    let prompts = read_prompts(file)?;
    let pb = indicatif::ProgressBar::new(prompts.len() as u64);
    pb.set_style(indicatif::ProgressStyle::with_template(
        "{bar:30} {pos}/{len} prompts [{elapsed} < {eta}]",
    )?);
    let mut w = Sink::open(&a.out)?;
    let record = serde_json::to_value(&iv.interventions)?;
    for (bi, chunk) in prompts.chunks(a.batch_size.max(1)).enumerate() {
        let ids: Vec<Vec<u32>> = chunk
            .iter()
            .map(|p| encode(&lm, p, a.chat, a.system.as_deref()))
            .collect::<Result<_>>()?;
        let gens = generate(&lm, &ids, &cfg, &mut iv, &mut |_, _| {})?;
        for (k, g) in gens.iter().enumerate() {
            let row = serde_json::json!({
                "index": bi * a.batch_size.max(1) + k,
                "prompt": chunk[k],
                "text": g.text,
                "prompt_tokens": g.prompt_tokens,
                "new_tokens": g.tokens.len(),
                "finish": g.finish,
                "config": cfg,
                "interventions": record,
            });
            w.line(&row)?;
        }
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    w.finish()
}

/// One line of the terminal conversation: `None` at EOF or /exit, `Some(None)` for a line
/// that was handled (empty, /reset), `Some(Some(text))` for a message.
fn read_turn(history_reset: &mut dyn FnMut(), tty: bool) -> Result<Option<Option<String>>> {
    if tty {
        eprint!("you> ");
    }
    let mut line = String::new();
    if std::io::stdin().lock().read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let line = line.trim();
    Ok(match line {
        "" => Some(None),
        "/exit" | "/quit" => None,
        "/reset" => {
            history_reset();
            Some(None)
        }
        _ => Some(Some(line.to_string())),
    })
}

/// `lm chat --server URL`: the same conversation through the LLM client layer.
fn run_chat_server(a: ChatArgs, url: &str) -> Result<()> {
    use rudder_client::{ChatMessage, ChatRequest, Client, LlmClient, LlmSpec};
    let mut spec = LlmSpec::new(url);
    spec.model = a.model.clone();
    spec.api_key_env = Some(a.api_key_env.clone());
    let client = Client::from_spec(&spec)?;
    let s = &a.sampling;
    let mut interventions = match &s.interventions {
        Some(p) => Some(
            serde_json::from_str::<serde_json::Value>(
                &std::fs::read_to_string(p).with_context(|| format!("{}", p.display()))?,
            )
            .with_context(|| format!("{}: invalid JSON", p.display()))?,
        ),
        None => None,
    };
    if let Some(p) = &s.steer {
        // the steering file travels as an explicit intervention list
        let st = crate::steer_cmd::steering_file(p, s.strength, None)?;
        let mut list: Vec<serde_json::Value> = match interventions.take() {
            Some(serde_json::Value::Array(v)) => v,
            Some(v) => v
                .get("interventions")
                .and_then(|x| x.as_array())
                .cloned()
                .unwrap_or_default(),
            None => Vec::new(),
        };
        list.extend(
            st.interventions
                .iter()
                .map(|i| serde_json::to_value(i).unwrap_or_default()),
        );
        interventions = Some(serde_json::Value::Array(list));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let tty = std::io::stdin().is_terminal();
    let system: Vec<ChatMessage> = a.system.iter().map(|s| ChatMessage::system(s)).collect();
    let history = std::cell::RefCell::new(system.clone());
    if tty {
        eprintln!(
            "chatting with {} ; /reset clears, /exit quits",
            client.describe()
        );
    }
    loop {
        let Some(turn) = read_turn(&mut || *history.borrow_mut() = system.clone(), tty)? else {
            break;
        };
        let Some(text) = turn else { continue };
        history.borrow_mut().push(ChatMessage::user(&text));
        let mut req = ChatRequest::new(a.model.as_deref().unwrap_or(""), history.borrow().clone());
        req.max_tokens = Some(s.max_tokens as u32);
        req.temperature = Some(s.temperature);
        req.top_p = (s.top_p < 1.0).then_some(s.top_p);
        req.seed = Some(s.seed);
        req.stop = (!s.stop.is_empty()).then(|| rudder_client::openai::Stop::Many(s.stop.clone()));
        req.top_k = (s.top_k > 0).then_some(s.top_k as u32);
        req.repetition_penalty = (s.repetition_penalty != 1.0).then_some(s.repetition_penalty);
        if let Some(iv) = &interventions {
            req.rudder = Some(rudder_client::openai::RudderRequest {
                interventions: Some(iv.clone()),
                ..Default::default()
            });
        }
        if tty {
            print!("assistant> ");
            let _ = std::io::stdout().flush();
        }
        let r = rt.block_on(client.chat_stream(
            req,
            Box::new(|d| {
                let mut o = std::io::stdout();
                let _ = write!(o, "{d}");
                let _ = o.flush();
            }),
        ));
        println!();
        match r {
            Ok(r) => history
                .borrow_mut()
                .push(ChatMessage::assistant(r.text().trim())),
            Err(e) => {
                eprintln!("[error: {e}]");
                history.borrow_mut().pop();
            }
        }
    }
    Ok(())
}

fn run_chat(a: ChatArgs) -> Result<()> {
    if let Some(url) = a.server.clone() {
        return run_chat_server(a, &url);
    }
    let lm = open(&ModelArgs {
        model: a.model.clone().unwrap_or_default(),
        dequantize: a.dequantize,
        adapter: None,
    })?;
    let t = lm
        .chat
        .as_ref()
        .context("this model has no chat template")?;
    let cfg = a.sampling.config();
    let mut iv = sampling_interventions(&lm, &a.sampling)?;
    let tty = std::io::stdin().is_terminal();
    let mut history: Vec<Message> = a.system.iter().map(|s| Message::new("system", s)).collect();
    if tty {
        eprintln!(
            "chatting with {} ({} layers); /reset clears, /exit quits",
            lm.info.path.display(),
            lm.info.layers
        );
    }
    let mut stdout = std::io::stdout();
    loop {
        let mut reset = false;
        let Some(turn) = read_turn(&mut || reset = true, tty)? else {
            break;
        };
        if reset {
            history.retain(|m| m.role == "system");
        }
        let Some(line) = turn else { continue };
        history.push(Message::new("user", &line));
        let ids = lm.tok.encode(&t.render(&history, true)?, false)?;
        let ctx = lm.decoder.cfg.max_position_embeddings;
        if ids.len() + 1 >= ctx {
            eprintln!(
                "[the conversation ({} tokens) fills the context window of {ctx}; /reset to start over]",
                ids.len()
            );
            history.pop();
            continue;
        }
        if tty {
            print!("assistant> ");
        }
        let g = generate(&lm, &[ids], &cfg, &mut iv, &mut |_, s| {
            let _ = write!(stdout, "{s}");
            let _ = stdout.flush();
        })?;
        println!();
        history.push(Message::new("assistant", g[0].text.trim()));
    }
    Ok(())
}

fn run_score(a: ScoreArgs) -> Result<()> {
    let lm = open(&a.model)?;
    let mut items: Vec<(String, String)> = Vec::new();
    if let (Some(p), Some(c)) = (&a.prompt, &a.continuation) {
        items.push((p.clone(), c.clone()));
    } else if let Some(f) = &a.input {
        let text = std::fs::read_to_string(f).with_context(|| format!("{}", f.display()))?;
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let v: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: invalid JSON", f.display(), i + 1))?;
            let get = |k: &str| v.get(k).and_then(|x| x.as_str()).map(String::from);
            match (get("prompt"), get("continuation")) {
                (Some(p), Some(c)) => items.push((p, c)),
                _ => bail!(
                    "{}:{}: needs string fields \"prompt\" and \"continuation\"",
                    f.display(),
                    i + 1
                ),
            }
        }
    } else {
        bail!("give --prompt and --continuation, or --input FILE");
    }
    let mut pairs = Vec::with_capacity(items.len());
    for (p, c) in &items {
        let pi = encode(&lm, p, a.chat, None)?;
        let ci = lm.tok.encode(c, false)?;
        if ci.is_empty() {
            bail!("continuation {c:?} has no tokens");
        }
        pairs.push((pi, ci));
    }
    let scores =
        rudder_lm::score::score(&lm.decoder, &pairs, lm.tok.pad, a.batch_size, &mut NoHook)?;
    let mut w = Sink::open(&a.out)?;
    for ((p, c), s) in items.iter().zip(&scores) {
        let n = s.token_logprobs.len();
        w.line(&serde_json::json!({"prompt": p, "continuation": c, "sum_logprob": s.sum_logprob,
            "mean_logprob": s.sum_logprob / n as f64, "tokens": n, "token_logprobs": s.token_logprobs}))?;
    }
    w.finish()
}

pub fn parse_sites(spec: &str, layers: usize) -> Result<Vec<Site>> {
    Ok(match spec {
        "hf" => Site::hf_hidden_states(layers),
        "resid_pre" => (0..layers).map(Site::ResidPre).collect(),
        "resid_post" => (0..layers).map(Site::ResidPost).collect(),
        _ => {
            let v: Vec<Site> = spec
                .split(',')
                .map(|s| s.trim().parse())
                .collect::<std::result::Result<_, _>>()?;
            for s in &v {
                s.check(layers)?;
            }
            v
        }
    })
}

fn run_capture(a: CaptureArgs) -> Result<()> {
    let lm = open(&a.model)?;
    let prompts = read_prompts(&a.prompts)?;
    let sites = parse_sites(&a.sites, lm.decoder.cfg.num_layers)?;
    let positions: Positions = a.positions.parse()?;
    let mut iv = interventions(&lm, &a.interventions)?;
    let mut cap = Capture::new(sites, positions);
    let pb = indicatif::ProgressBar::new(prompts.len() as u64);
    pb.set_style(indicatif::ProgressStyle::with_template(
        "{bar:30} {pos}/{len} prompts [{elapsed} < {eta}]",
    )?);
    let t0 = std::time::Instant::now();
    for (bi, chunk) in prompts.chunks(a.batch_size.max(1)).enumerate() {
        let ids: Vec<Vec<u32>> = chunk
            .iter()
            .map(|p| encode(&lm, p, a.chat, None))
            .collect::<Result<_>>()?;
        let (t, pads) = rudder_lm::generate::left_pad(&ids, lm.tok.pad)?;
        let mut cache = lm.decoder.new_cache(pads);
        cap.set_prompt_offset(bi * a.batch_size.max(1));
        let mut hook = rudder_lm::hooks::Chain(&mut iv, &mut cap);
        lm.decoder
            .forward(&t, &mut cache, Phase::Prefill, &mut hook)?;
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    let dt = t0.elapsed().as_secs_f64();
    let meta = serde_json::json!({
        "model": lm.info,
        "chat": a.chat,
        "padding_side": "left",
        "dtype": "f32",
        "layer_convention": "resid_pre(l) = input of block l = HF hidden_states[l]",
        "interventions": iv.interventions,
        "prompts_file": a.prompts,
    });
    cap.save(&a.out, meta)?;
    eprintln!(
        "captured {} rows × {} sites from {} prompts in {:.2} s ({:.1} prompts/s) → {}",
        cap.rows().len(),
        cap.sites().len(),
        prompts.len(),
        dt,
        prompts.len() as f64 / dt,
        a.out.display()
    );
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn run_bench(a: BenchArgs) -> Result<()> {
    use candle_core::{Device, IndexOp, Tensor};
    let lm = open(&a.model)?;
    let mut ids = lm.tok.encode(&BENCH_PARAGRAPH.repeat(12), false)?;
    while ids.len() < a.prompt_tokens {
        ids.extend(ids.clone());
    }
    ids.truncate(a.prompt_tokens);
    let argmax = |v: &[f32]| {
        (0..v.len())
            .max_by(|&x, &y| v[x].total_cmp(&v[y]))
            .unwrap_or(0) as u32
    };
    let steer = a
        .steer
        .as_ref()
        .map(|p| crate::steer_cmd::steering_file(p, a.strength, Some(&lm)).map(|s| s.interventions))
        .transpose()?;
    let mut hook: Box<dyn rudder_lm::hooks::Hook> = match &steer {
        Some(iv) => Box::new(Interventions::new(iv.clone())),
        None => Box::new(NoHook),
    };
    let (mut pre, mut dec) = (Vec::new(), Vec::new());
    // With --steer, an unsteered prefill of the same prompt runs beside every steered one
    // (order alternating), so the overhead is a paired ratio inside one process.
    let mut paired = Vec::new();
    let mut first = Vec::new();
    for rep in 0..=a.reps {
        let t = Tensor::from_slice(&ids, (1, ids.len()), &Device::Cpu)?;
        let prefill = |hook: &mut dyn rudder_lm::hooks::Hook| -> Result<(f64, Vec<f32>, _)> {
            let mut cache = lm.decoder.new_cache(vec![0]);
            let t0 = std::time::Instant::now();
            let h = lm.decoder.forward(&t, &mut cache, Phase::Prefill, hook)?;
            let logits = lm
                .decoder
                .logits(&h.i((.., ids.len() - 1.., ..))?)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            Ok((t0.elapsed().as_secs_f64(), logits, cache))
        };
        let plain_first = steer.is_some() && rep % 2 == 0;
        let mut plain = if plain_first {
            Some(prefill(&mut NoHook)?.0)
        } else {
            None
        };
        let (t_pre, logits, mut cache) = prefill(hook.as_mut())?;
        if steer.is_some() && !plain_first {
            plain = Some(prefill(&mut NoHook)?.0);
        }
        if let (Some(p), true) = (plain, rep > 0) {
            paired.push(t_pre / p);
        }
        let mut tok = argmax(&logits);
        let mut out = vec![tok];
        let t1 = std::time::Instant::now();
        for _ in 1..a.decode_tokens {
            let x = Tensor::from_slice(&[tok], (1, 1), &Device::Cpu)?;
            let h = lm
                .decoder
                .forward(&x, &mut cache, Phase::Decode, hook.as_mut())?;
            tok = argmax(&lm.decoder.logits(&h)?.flatten_all()?.to_vec1::<f32>()?);
            out.push(tok);
        }
        let t_dec = t1.elapsed().as_secs_f64();
        if rep > 0 {
            pre.push(ids.len() as f64 / t_pre);
            dec.push((a.decode_tokens - 1) as f64 / t_dec);
        }
        first = out;
    }
    let lm = std::sync::Arc::new(lm);
    let mut batched = Vec::new();
    for &b in &a.batch {
        let eng = rudder_lm::engine::Engine::start(
            lm.clone(),
            rudder_lm::engine::EngineConfig {
                max_rows: b.max(1),
                max_queue: b.max(1),
                prefill_chunk: 512,
                kv: a.kv,
            },
        );
        let (tx, rx) = std::sync::mpsc::channel();
        let t0 = std::time::Instant::now();
        for r in 0..b.max(1) {
            let tx = tx.clone();
            // one prompt per group of `--rollouts` rows (a rotation of the bench prompt)
            let mut prompt = ids.clone();
            prompt.rotate_left((r / a.rollouts.max(1)) * 7 % ids.len().max(1));
            let mut j = rudder_lm::engine::Job::new(
                prompt,
                GenConfig {
                    max_new_tokens: a.decode_tokens,
                    ignore_eos: true,
                    ..GenConfig::default()
                },
            );
            j.stream_index = r as u64;
            j.interventions = steer.clone().map(Interventions::new);
            eng.submit(
                j,
                Box::new(move |e| match e {
                    rudder_lm::engine::Event::Token(_) => {
                        tx.send((r, true, std::time::Instant::now())).is_ok()
                    }
                    _ => tx.send((r, false, std::time::Instant::now())).is_ok(),
                }),
            )?;
        }
        drop(tx);
        let mut events = Vec::new();
        while let Ok(e) = rx.recv() {
            events.push(e);
        }
        // all rows decode from the moment the last row produced its first token
        let mut firsts = vec![None; b.max(1)];
        for &(r, tok, t) in &events {
            if tok && firsts[r].is_none() {
                firsts[r] = Some(t);
            }
        }
        let last_first = firsts.iter().flatten().max().copied().unwrap_or(t0);
        let end = events.iter().map(|e| e.2).max().unwrap_or(t0);
        let after = events.iter().filter(|e| e.1 && e.2 > last_first).count();
        let total = end.duration_since(t0).as_secs_f64();
        let decode = end.duration_since(last_first).as_secs_f64();
        let shared = eng
            .stats
            .shared_prompt_tokens
            .load(std::sync::atomic::Ordering::Relaxed);
        batched.push(serde_json::json!({
            "batch": b, "wall_s": total, "rollouts": a.rollouts.max(1),
            "shared_prompt_tokens": shared,
            "aggregate_tok_s": (b * a.decode_tokens) as f64 / total,
            "decode_tok_s": after as f64 / decode.max(1e-9),
        }));
    }
    let report = serde_json::json!({
        "model": lm.info.path, "quantized": lm.info.quantized,
        "threads": rayon::current_num_threads(),
        "prompt_tokens": ids.len(), "decode_tokens": a.decode_tokens,
        "steer": a.steer, "strength": a.steer.as_ref().map(|_| a.strength),
        "steered_prefill_time_ratio": (!paired.is_empty()).then(|| median(paired.clone())),
        "steered_prefill_time_ratios": paired,
        "prefill_tok_s": median(pre.clone()), "decode_tok_s": median(dec.clone()),
        "prefill_all": pre, "decode_all": dec,
        "greedy_first16": &first[..first.len().min(16)],
        "batched": batched,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

fn run_dump(a: DumpArgs) -> Result<()> {
    use candle_core::{Device, Tensor};
    let lm = open(&a.model)?;
    let ids: Vec<u32> = match (&a.text, &a.ids) {
        (Some(t), _) => lm.tok.encode(t, false)?,
        (None, Some(p)) => serde_json::from_str(
            &std::fs::read_to_string(p).with_context(|| format!("{}", p.display()))?,
        )
        .with_context(|| format!("{}: expected a JSON array of token ids", p.display()))?,
        _ => bail!("give --text or --ids"),
    };
    if let Some(bad) = ids
        .iter()
        .find(|&&i| i as usize >= lm.decoder.cfg.vocab_size)
    {
        bail!(
            "token id {bad} is outside the vocabulary of {}",
            lm.decoder.cfg.vocab_size
        );
    }
    let n = ids.len();
    let t = Tensor::from_slice(&ids, (1, n), &Device::Cpu)?;
    let sites = if a.hidden {
        Site::hf_hidden_states(lm.decoder.cfg.num_layers)
    } else {
        Vec::new()
    };
    let mut cap = Capture::new(sites.clone(), Positions::All);
    let mut iv = interventions(&lm, &a.interventions)?;
    let mut cache = lm.decoder.new_cache(vec![0]);
    let h = lm.decoder.forward(
        &t,
        &mut cache,
        Phase::Prefill,
        &mut rudder_lm::hooks::Chain(&mut iv, &mut cap),
    )?;
    let logits = lm.decoder.logits(&h)?.squeeze(0)?;
    let mut tensors = vec![
        (
            "ids".to_string(),
            Tensor::from_vec(
                ids.iter().map(|&i| i as i64).collect::<Vec<_>>(),
                n,
                &Device::Cpu,
            )?,
        ),
        ("logits".to_string(), logits),
    ];
    for s in sites {
        tensors.push((s.to_string(), cap.get(s)?));
    }
    rudder_nn::checkpoint::save(&tensors, &a.out)?;
    eprintln!("{} positions → {}", n, a.out.display());
    Ok(())
}
