//! The server over a tiny random-weight model the test writes: every endpoint, streaming,
//! errors, limits, rudder's extension, continuous batching under concurrency, client
//! disconnects and graceful shutdown.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rudder_client::inproc::{InProcess, InProcessConfig};
use rudder_client::openai::ChatResponse;
use rudder_lm::config::Arch;
use rudder_lm::engine::EngineConfig;
use rudder_lm::fixtures::{TinySpec, write_hf_dir};
use rudder_lm::loader::{LoadOptions, load};
use rudder_serve::{AppState, ServeConfig, serve};
use serde_json::{Value, json};

struct Running {
    base: String,
    state: Arc<AppState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<std::io::Result<()>>,
    _tmp: tempfile::TempDir,
}

async fn start(cfg: ServeConfig, steer: Option<Value>) -> Running {
    let tmp = tempfile::tempdir().unwrap();
    let mut spec = TinySpec::new(Arch::Llama);
    spec.context = 256;
    write_hf_dir(&tmp.path().join("m"), &spec).unwrap();
    let lm = load(&tmp.path().join("m"), &LoadOptions::default()).unwrap();
    let mut steering = std::collections::HashMap::new();
    if let Some(s) = steer {
        let p = tmp.path().join("steer.json");
        std::fs::write(&p, s.to_string()).unwrap();
        steering = rudder_serve::load_steering(&[("up".into(), p)]).unwrap();
    }
    let ip =
        Arc::new(InProcess::new(lm, "tiny".into(), cfg.inproc.clone()).with_steering(steering));
    let state = Arc::new(AppState::new(Some(ip), None, &cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let done = tokio::spawn(serve(state.clone(), listener, cfg.shutdown_grace, async {
        let _ = rx.await;
    }));
    Running {
        base,
        state,
        stop: Some(tx),
        done,
        _tmp: tmp,
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn post(base: &str, path: &str, body: Value) -> (u16, Value) {
    let r = client()
        .post(format!("{base}{path}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

fn chat_body(content: &str, extra: Value) -> Value {
    let mut b = json!({
        "model": "tiny",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 12,
        "temperature": 0
    });
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b
}

/// Data lines of an SSE body.
fn sse_events(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(String::from)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_streaming_and_standard_shapes() {
    let s = start(ServeConfig::default(), None).await;
    let m: Value = client()
        .get(format!("{}/v1/models", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(m["data"][0]["id"], "tiny");
    assert_eq!(m["data"][0]["owned_by"], "rudder");
    let h: Value = client()
        .get(format!("{}/health", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(h["status"], "ok");

    let (st, v) = post(
        &s.base,
        "/v1/chat/completions",
        chat_body("hi there", json!({})),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let r: ChatResponse = serde_json::from_value(v.clone()).unwrap();
    assert_eq!(r.object, "chat.completion");
    let u = r.usage.unwrap();
    assert!(u.prompt_tokens > 0 && u.completion_tokens > 0);
    assert_eq!(u.total_tokens, u.prompt_tokens + u.completion_tokens);
    assert!(
        v.get("rudder").is_none(),
        "a standard request got the extension back"
    );
    let text = r.text().to_string();

    // streaming: the deltas add up to the same text, then usage, then [DONE]
    let body = chat_body(
        "hi there",
        json!({"stream": true, "stream_options": {"include_usage": true}}),
    );
    let resp = client()
        .post(format!("{}/v1/chat/completions", s.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let events = sse_events(&resp.text().await.unwrap());
    assert_eq!(events.last().unwrap(), "[DONE]");
    let mut streamed = String::new();
    let mut finish = None;
    let mut usage = None;
    for e in &events[..events.len() - 1] {
        let c: Value = serde_json::from_str(e).unwrap();
        assert_eq!(c["object"], "chat.completion.chunk");
        if let Some(ch) = c["choices"].get(0) {
            if let Some(t) = ch["delta"]["content"].as_str() {
                streamed.push_str(t);
            }
            if !ch["finish_reason"].is_null() {
                finish = Some(ch["finish_reason"].clone());
            }
        }
        if !c["usage"].is_null() {
            usage = Some(c["usage"].clone());
        }
    }
    assert_eq!(streamed, text);
    assert!(finish.is_some());
    assert_eq!(usage.unwrap()["completion_tokens"], u.completion_tokens);

    // n choices with a seed are reproducible; logprobs come with top alternatives
    let body = chat_body(
        "hi there",
        json!({"n": 2, "temperature": 1.0, "seed": 11, "logprobs": true, "top_logprobs": 3}),
    );
    let (_, a) = post(&s.base, "/v1/chat/completions", body.clone()).await;
    let (_, b) = post(&s.base, "/v1/chat/completions", body).await;
    assert_eq!(a["choices"], b["choices"]);
    assert_eq!(a["choices"].as_array().unwrap().len(), 2);
    let lp = &a["choices"][0]["logprobs"]["content"];
    assert!(!lp.as_array().unwrap().is_empty());
    assert_eq!(lp[0]["top_logprobs"].as_array().unwrap().len(), 3);
    assert!(lp[0]["logprob"].as_f64().unwrap() <= 0.0);

    // JSON schema output parses and follows the schema
    let schema = json!({"type": "object", "properties": {"like": {"type": "boolean"}, "score": {"type": "integer"}}, "required": ["like", "score"]});
    let body = chat_body(
        "rate it",
        json!({"max_tokens": 200, "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}}),
    );
    let (st, v) = post(&s.base, "/v1/chat/completions", body).await;
    assert_eq!(st, 200, "{v}");
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    let parsed: Value = serde_json::from_str(content).unwrap_or_else(|e| panic!("{e}: {content}"));
    assert!(
        parsed["like"].is_boolean() && parsed["score"].is_i64(),
        "{parsed}"
    );

    // legacy completions, echo + logprobs scores the prompt
    let (st, v) = post(
        &s.base,
        "/v1/completions",
        json!({"prompt": "the sun is", "max_tokens": 0, "echo": true, "logprobs": 1}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let lp = &v["choices"][0]["logprobs"];
    assert!(lp["token_logprobs"][0].is_null());
    assert!(lp["token_logprobs"][1].as_f64().unwrap() < 0.0);
    assert_eq!(v["choices"][0]["text"], "the sun is");
    let (st, v) = post(
        &s.base,
        "/v1/completions",
        json!({"prompt": ["a", "b"], "max_tokens": 3, "temperature": 0}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);

    // embeddings without an encoder: a clear 404
    let (st, v) = post(&s.base, "/v1/embeddings", json!({"input": "x"})).await;
    assert_eq!(st, 404);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("embedding")
    );

    let metrics = client()
        .get(format!("{}/metrics", s.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("rudder_requests_total{endpoint=\"chat\",status=\"200\"}"));
    assert!(metrics.contains("rudder_request_duration_seconds_bucket"));
    assert!(metrics.contains("rudder_completion_tokens_total"));
    assert!(metrics.contains("rudder_queue_depth"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors_naming_the_field() {
    let cfg = ServeConfig {
        api_key: Some("sekret".into()),
        max_body_bytes: 64 * 1024,
        ..ServeConfig::default()
    };
    let s = start(cfg, None).await;
    let url = format!("{}/v1/chat/completions", s.base);
    let r = client()
        .post(&url)
        .json(&chat_body("x", json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let send = |body: Vec<u8>| {
        client()
            .post(&url)
            .bearer_auth("sekret")
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"{\"messages\": [".to_vec(), 400, ""),
        (b"{\"model\": \"tiny\"}".to_vec(), 400, "messages"),
        (
            chat_body("x", json!({"temperature": "warm"})).to_string().into_bytes(),
            400,
            "temperature",
        ),
        (
            chat_body("x", json!({"max_tokens": 100000})).to_string().into_bytes(),
            400,
            "max_tokens",
        ),
        (
            chat_body(&"word ".repeat(400), json!({})).to_string().into_bytes(),
            400,
            "messages",
        ),
        (
            chat_body("x", json!({"model": "gpt-9"})).to_string().into_bytes(),
            404,
            "model",
        ),
        (
            chat_body("x", json!({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "wat"}}}}))
                .to_string()
                .into_bytes(),
            400,
            "response_format.json_schema.schema",
        ),
        (
            chat_body("x", json!({"rudder": {"steer": "nope"}})).to_string().into_bytes(),
            400,
            "rudder.steer",
        ),
        (
            chat_body("x", json!({"rudder": {"interventions": [{"site": "blocks.9.hook_resid_pre", "kind": "add_vector", "vector": [1.0]}]}}))
                .to_string()
                .into_bytes(),
            400,
            "rudder.interventions",
        ),
        (vec![b' '; 100 * 1024], 413, ""),
    ];
    for (body, status, param) in cases {
        let r = send(body).await.unwrap();
        assert_eq!(r.status().as_u16(), status);
        let v: Value = r.json().await.unwrap();
        let e = &v["error"];
        assert!(e["message"].is_string() && e["type"].is_string(), "{v}");
        if !param.is_empty() {
            assert_eq!(e["param"], param, "{v}");
        }
        if param == "max_tokens" {
            assert!(e["message"].as_str().unwrap().contains("100000"), "{v}");
        }
        if param == "messages"
            && status == 400
            && e["message"].as_str().unwrap().contains("context")
        {
            assert!(e["message"].as_str().unwrap().contains("256"), "{v}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extension_steers_captures_and_scores_per_request() {
    let d = 64;
    let vec: Vec<f32> = (0..d).map(|i| ((i * 5 % 7) as f32 - 3.0) * 4.0).collect();
    let steer = json!([{"site": "blocks.1.hook_resid_pre", "kind": "add_vector", "vector": vec, "alpha": 2.0}]);
    let s = start(ServeConfig::default(), Some(steer.clone())).await;
    let (_, plain) = post(
        &s.base,
        "/v1/chat/completions",
        chat_body("hello", json!({})),
    )
    .await;
    let (_, named) = post(
        &s.base,
        "/v1/chat/completions",
        chat_body("hello", json!({"rudder": {"steer": "up", "strength": 3.0}})),
    )
    .await;
    let (_, inline) = post(
        &s.base,
        "/v1/chat/completions",
        chat_body(
            "hello",
            json!({"rudder": {"interventions": [{"site": "blocks.1.hook_resid_pre", "kind": "add_vector", "vector": vec, "alpha": 6.0}]}}),
        ),
    )
    .await;
    let text = |v: &Value| {
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_ne!(text(&plain), text(&named), "steering changed nothing");
    assert_eq!(text(&named), text(&inline), "strength 3 × α 2 = α 6");
    let applied = &named["rudder"]["applied"];
    assert_eq!(applied["steer"], "up");
    assert_eq!(applied["interventions"][0]["alpha"], 6.0);
    assert_eq!(
        applied["interventions"][0]["site"],
        "blocks.1.hook_resid_pre"
    );

    let (st, v) = post(
        &s.base,
        "/v1/chat/completions",
        chat_body(
            "hello",
            json!({"rudder": {"capture": {"sites": ["blocks.0.hook_resid_pre", "ln_final.hook_normalized"]}, "score_continuations": ["yes", "no"]}}),
        ),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let cap = &v["rudder"]["capture"];
    assert_eq!(
        cap["sites"]["blocks.0.hook_resid_pre"][0]
            .as_array()
            .unwrap()
            .len(),
        d
    );
    let lp = v["rudder"]["continuation_logprobs"].as_array().unwrap();
    assert_eq!(lp.len(), 2);
    // the in-process client gives the same exact scores
    let ip = s.state.lm.clone().unwrap();
    use rudder_client::LlmClient;
    let sc = ip
        .continuation_logprobs(
            "tiny",
            vec![rudder_client::ChatMessage::user("hello")],
            vec!["yes".into(), "no".into()],
        )
        .await
        .unwrap();
    assert!(sc.exact);
    for k in 0..2 {
        assert!((sc.logprobs[k] - lp[k].as_f64().unwrap()).abs() < 1e-4);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_batch_overflow_gets_429_and_disconnect_cancels() {
    let cfg = ServeConfig {
        inproc: InProcessConfig {
            engine: EngineConfig {
                max_rows: 4,
                max_queue: 4,
                prefill_chunk: 256,
                kv: Default::default(),
            },
            ..InProcessConfig::default()
        },
        ..ServeConfig::default()
    };
    let s = start(cfg, None).await;
    // the same greedy request alone and among others gives the same answer
    let (_, alone) = post(
        &s.base,
        "/v1/chat/completions",
        chat_body("tell me", json!({})),
    )
    .await;
    let mut tasks = Vec::new();
    for i in 0..24 {
        let base = s.base.clone();
        tasks.push(tokio::spawn(async move {
            let body = if i % 3 == 0 {
                chat_body("tell me", json!({}))
            } else {
                chat_body(&format!("question {i}"), json!({"max_tokens": 40}))
            };
            let r = client()
                .post(format!("{base}/v1/chat/completions"))
                .json(&body)
                .send()
                .await
                .unwrap();
            let st = r.status().as_u16();
            let retry = r.headers().get("retry-after").is_some();
            (i, st, retry, r.json::<Value>().await.unwrap())
        }));
    }
    let mut ok = 0;
    let mut busy = 0;
    for t in tasks {
        let (i, st, retry, v) = t.await.unwrap();
        match st {
            200 => {
                ok += 1;
                if i % 3 == 0 {
                    assert_eq!(v["choices"], alone["choices"], "batching changed an answer");
                }
            }
            429 => {
                busy += 1;
                assert!(retry, "429 without Retry-After");
                assert_eq!(v["error"]["type"], "rate_limit_error");
            }
            other => panic!("status {other}: {v}"),
        }
    }
    assert!(ok >= 4, "{ok} answered");
    assert!(busy > 0, "a queue of 4 took 24 requests at once");

    // a streaming client that goes away cancels its row
    let stats = s.state.lm.as_ref().unwrap().engine.stats.clone();
    let before = stats.cancelled.load(Ordering::Relaxed);
    let mut resp = client()
        .post(format!("{}/v1/chat/completions", s.base))
        .json(&chat_body(
            "go on",
            json!({"max_tokens": 200, "stream": true}),
        ))
        .send()
        .await
        .unwrap();
    let _ = resp.chunk().await.unwrap();
    drop(resp);
    let t0 = Instant::now();
    while stats.cancelled.load(Ordering::Relaxed) == before {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the row was not cancelled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_running_requests_then_stops() {
    let mut s = start(ServeConfig::default(), None).await;
    let base = s.base.clone();
    let req = tokio::spawn(async move {
        post(
            &base,
            "/v1/chat/completions",
            chat_body("long answer", json!({"max_tokens": 150})),
        )
        .await
    });
    // wait until it is decoding, then ask the server to stop
    let stats = s.state.lm.as_ref().unwrap().engine.stats.clone();
    let t0 = Instant::now();
    while stats.active.load(Ordering::Relaxed) == 0 {
        assert!(t0.elapsed() < Duration::from_secs(20));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    s.stop.take().unwrap().send(()).unwrap();
    let (st, v) = req.await.unwrap();
    assert_eq!(st, 200, "{v}");
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() > 0, "{v}");
    assert!(v["choices"][0]["finish_reason"].is_string());
    tokio::time::timeout(Duration::from_secs(20), &mut s.done)
        .await
        .expect("the server did not stop")
        .unwrap()
        .unwrap();
    assert!(
        client()
            .get(format!("{}/health", s.base))
            .send()
            .await
            .is_err(),
        "still listening after shutdown"
    );
}
