//! The in-process backend: concurrent callers share decode steps (continuous batching) and get
//! the answers they would get alone; continuation scores are exact; the client's cache and
//! accounting work over it. A tiny random-weight model keeps this fast; the real SmolLM2 is
//! exercised by scripts/serve_conformance.sh and the real-model test below when fetched.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use rudder_client::inproc::{InProcess, InProcessConfig};
use rudder_client::openai::{JsonSchemaFormat, ResponseFormat};
use rudder_client::replay::{CacheMode, Cassette};
use rudder_client::{ChatMessage, ChatRequest, Client, LlmClient, UsageMeter};
use rudder_lm::config::Arch;
use rudder_lm::fixtures::{TinySpec, write_hf_dir};
use rudder_lm::loader::{LoadOptions, load};

fn tiny(dir: &std::path::Path) -> InProcess {
    let mut spec = TinySpec::new(Arch::Qwen2);
    spec.context = 256;
    write_hf_dir(&dir.join("m"), &spec).unwrap();
    let lm = load(&dir.join("m"), &LoadOptions::default()).unwrap();
    InProcess::new(lm, "tiny".into(), InProcessConfig::default())
}

fn greedy(text: &str, max: u32) -> ChatRequest {
    let mut r = ChatRequest::new("", vec![ChatMessage::user(text)]);
    r.temperature = Some(0.0);
    r.max_tokens = Some(max);
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_share_steps_and_get_their_own_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let ip = Arc::new(tiny(tmp.path()));
    let prompts: Vec<String> = (0..8).map(|i| format!("question number {i}")).collect();
    let mut alone = Vec::new();
    for p in &prompts {
        alone.push(ip.chat(greedy(p, 20)).await.unwrap());
    }
    let steps_before = ip.engine.stats.steps.load(Ordering::Relaxed);
    let client = Arc::new(Client::new(ip.clone(), Arc::new(UsageMeter::default())));
    let mut tasks = Vec::new();
    for p in prompts.clone() {
        let c = client.clone();
        tasks.push(tokio::spawn(async move {
            c.chat(greedy(&p, 20)).await.unwrap()
        }));
    }
    let mut tokens = 0;
    for (i, t) in tasks.into_iter().enumerate() {
        let r = t.await.unwrap();
        assert_eq!(r.text(), alone[i].text(), "caller {i}");
        tokens += r.usage.unwrap().completion_tokens;
    }
    let steps = ip.engine.stats.steps.load(Ordering::Relaxed) - steps_before;
    assert!(
        steps * 2 < tokens,
        "{steps} steps for {tokens} tokens: the callers were not batched"
    );
    let rep = client.report();
    assert_eq!(rep.calls, 8);
    assert_eq!(rep.completion_tokens, tokens);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_scores_streaming_json_and_replay() {
    let tmp = tempfile::tempdir().unwrap();
    let ip = Arc::new(tiny(tmp.path()));
    // scores equal rudder-lm's sequence scoring of the rendered conversation
    let msgs = vec![ChatMessage::user("pick one")];
    let s = ip
        .continuation_logprobs("", msgs.clone(), vec!["yes".into(), "no thanks".into()])
        .await
        .unwrap();
    assert!(s.exact);
    let lm = ip.lm();
    let prompt = ip.render_chat(&msgs).unwrap();
    for (k, c) in ["yes", "no thanks"].iter().enumerate() {
        let ids = lm.tok.encode(c, false).unwrap();
        let want = rudder_lm::score::score(
            &lm.decoder,
            &[(prompt.clone(), ids)],
            lm.tok.pad,
            1,
            &mut rudder_lm::hooks::NoHook,
        )
        .unwrap()[0]
            .sum_logprob;
        assert!(
            (s.logprobs[k] - want).abs() < 1e-4,
            "{} vs {want}",
            s.logprobs[k]
        );
    }
    assert_eq!(
        s.best(),
        Some(if s.logprobs[0] >= s.logprobs[1] { 0 } else { 1 })
    );

    // streaming deltas add up to the answer
    let mut got = String::new();
    let r = ip
        .chat_stream(greedy("tell me", 24), Box::new(|d| got.push_str(d)))
        .await
        .unwrap();
    assert_eq!(got, r.text());

    // a schema-constrained answer parses
    let mut req = greedy("as json", 200);
    req.response_format = Some(ResponseFormat::JsonSchema {
        json_schema: JsonSchemaFormat {
            name: "x".into(),
            description: None,
            schema: serde_json::json!({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}),
            strict: None,
        },
    });
    let r = ip.chat(req).await.unwrap();
    let v: serde_json::Value = serde_json::from_str(r.text()).unwrap();
    assert!(v["ok"].is_boolean());

    // record through the in-process backend, replay without it
    let tape = tmp.path().join("tape.jsonl");
    let rec = Client::new(ip.clone(), Arc::new(UsageMeter::default()))
        .with_cache(Arc::new(Cassette::open(&tape).unwrap()), CacheMode::Record);
    let mut sampled = greedy("a story", 12);
    sampled.temperature = Some(1.0);
    sampled.seed = Some(3);
    let a = rec.chat(sampled.clone()).await.unwrap();
    let sc = rec
        .continuation_logprobs("", msgs.clone(), vec!["yes".into()])
        .await
        .unwrap();
    drop(rec);
    // a replay client whose backend would fail if called
    struct Never;
    impl LlmClient for Never {
        fn chat<'a>(
            &'a self,
            _: ChatRequest,
        ) -> rudder_client::BoxFut<'a, rudder_client::Result<rudder_client::ChatResponse>> {
            panic!("replay called the backend")
        }
        fn describe(&self) -> String {
            "never".into()
        }
        fn default_model(&self) -> String {
            String::new()
        }
    }
    let rep = Client::new(Arc::new(Never), Arc::new(UsageMeter::default()))
        .with_cache(Arc::new(Cassette::open(&tape).unwrap()), CacheMode::Replay);
    assert_eq!(rep.chat(sampled).await.unwrap(), a);
    assert_eq!(
        rep.continuation_logprobs("", msgs, vec!["yes".into()])
            .await
            .unwrap(),
        sc
    );
    assert_eq!(rep.report().cached, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_smollm2_answers_and_writes_json() {
    let Some(dir) = rudder_data::assets::for_tests("smollm2-135m-instruct") else {
        return;
    };
    let ip = InProcess::load(dir.to_str().unwrap(), InProcessConfig::default()).unwrap();
    let r = ip
        .chat(greedy(
            "What is the capital of France? Answer in one word.",
            8,
        ))
        .await
        .unwrap();
    assert!(r.text().contains("Paris"), "{:?}", r.text());
    let mut req = greedy("Rate the movie Heat from 1 to 5 as JSON.", 160);
    req.response_format = Some(ResponseFormat::JsonSchema {
        json_schema: JsonSchemaFormat {
            name: "rating".into(),
            description: None,
            schema: serde_json::json!({"type": "object", "properties": {"rating": {"type": "integer"}, "reason": {"type": "string", "maxLength": 80}}, "required": ["rating", "reason"]}),
            strict: None,
        },
    });
    let r = ip.chat(req).await.unwrap();
    let v: serde_json::Value =
        serde_json::from_str(r.text()).unwrap_or_else(|e| panic!("{e}: {:?}", r.text()));
    assert!(v["rating"].is_i64() && v["reason"].is_string(), "{v}");
    // a log-probability decision agrees with the model's own greedy first word
    let q = vec![ChatMessage::user("Is Paris in France? Answer Yes or No.")];
    let s = ip
        .continuation_logprobs("", q.clone(), vec!["Yes".into(), "No".into()])
        .await
        .unwrap();
    let mut g = greedy("", 1);
    g.messages = q;
    let first = ip.chat(g).await.unwrap().text().trim().to_string();
    if first == "Yes" || first == "No" {
        let want = if first == "Yes" { 0 } else { 1 };
        assert_eq!(s.best(), Some(want), "{first}: {:?}", s.logprobs);
    }
    assert!(s.logprobs.iter().all(|l| l.is_finite() && *l < 0.0));
}
