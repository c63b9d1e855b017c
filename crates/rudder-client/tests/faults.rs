//! The HTTP client against a fault-injecting server (dropped connections, 500, 429 with
//! Retry-After, stalls past the timeout, 4xx): every request ends in a result or a clear error
//! within the configured limits, one caller's failure never touches another's, and the
//! record/replay cache answers without the server.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rudder_client::http::{HttpClient, RetryPolicy};
use rudder_client::replay::{CacheMode, Cassette};
use rudder_client::{ChatMessage, ChatRequest, Client, ClientError, LlmClient, UsageMeter};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Clone, Debug)]
enum Act {
    /// Close the connection without answering.
    Drop,
    Status(u16, Option<u32>),
    /// Answer after this long.
    Stall(Duration),
    /// A normal chat completion echoing the last user message.
    Ok,
    /// The same as an event stream, one word per event.
    Stream,
}

struct Fake {
    base: String,
    hits: Arc<AtomicUsize>,
}

/// Serve `plan[i]` to the i-th request, then `rest` forever; `rule` may override per request
/// body (for isolation tests).
async fn fake(plan: Vec<Act>, rest: Act, rule: Option<fn(&str) -> Option<Act>>) -> Fake {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/v1", l.local_addr().unwrap());
    let hits = Arc::new(AtomicUsize::new(0));
    let plan = Arc::new(Mutex::new(plan.into_iter()));
    let h2 = hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = l.accept().await else {
                return;
            };
            let (plan, rest, hits) = (plan.clone(), rest.clone(), h2.clone());
            tokio::spawn(async move {
                let _ = handle(sock, plan, rest, hits, rule).await;
            });
        }
    });
    Fake { base, hits }
}

async fn read_request(sock: &mut TcpStream) -> Option<(String, String)> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    loop {
        let n = sock.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..p]).to_string();
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                })
                .unwrap_or(0);
            while buf.len() < p + 4 + len {
                let n = sock.read(&mut tmp).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&tmp[..n]);
            }
            let body = String::from_utf8_lossy(&buf[p + 4..p + 4 + len]).to_string();
            return Some((head, body));
        }
    }
}

async fn handle(
    mut sock: TcpStream,
    plan: Arc<Mutex<std::vec::IntoIter<Act>>>,
    rest: Act,
    hits: Arc<AtomicUsize>,
    rule: Option<fn(&str) -> Option<Act>>,
) -> std::io::Result<()> {
    while let Some((head, body)) = read_request(&mut sock).await {
        hits.fetch_add(1, Ordering::SeqCst);
        if head.starts_with("GET /v1/models") {
            let b = r#"{"object":"list","data":[{"id":"fake","object":"model","created":0,"owned_by":"someone"}]}"#;
            write(&mut sock, 200, None, "application/json", b).await?;
            continue;
        }
        let act = rule
            .and_then(|r| r(&body))
            .unwrap_or_else(|| plan.lock().unwrap().next().unwrap_or(rest.clone()));
        let last = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| {
                v["messages"]
                    .as_array()
                    .and_then(|m| m.last().cloned())
                    .and_then(|m| m["content"].as_str().map(String::from))
            })
            .unwrap_or_default();
        match act {
            Act::Drop => return Ok(()),
            Act::Status(code, retry) => {
                let b = format!(r#"{{"error":{{"message":"injected {code}","type":"x"}}}}"#);
                write(&mut sock, code, retry, "application/json", &b).await?;
            }
            Act::Stall(d) => {
                tokio::time::sleep(d).await;
                write(&mut sock, 200, None, "application/json", &ok_body(&last)).await?;
            }
            Act::Ok => write(&mut sock, 200, None, "application/json", &ok_body(&last)).await?,
            Act::Stream => {
                let mut b = String::new();
                for w in last.split(' ') {
                    let c = serde_json::json!({"id":"x","object":"chat.completion.chunk","created":0,"model":"fake",
                        "choices":[{"index":0,"delta":{"content": format!("{w} ")},"finish_reason":null}]});
                    b.push_str(&format!("data: {c}\n\n"));
                }
                let c = serde_json::json!({"id":"x","object":"chat.completion.chunk","created":0,"model":"fake",
                    "choices":[{"index":0,"delta":{},"finish_reason":"stop"}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}});
                b.push_str(&format!("data: {c}\n\ndata: [DONE]\n\n"));
                write(&mut sock, 200, None, "text/event-stream", &b).await?;
            }
        }
    }
    Ok(())
}

fn ok_body(echo: &str) -> String {
    serde_json::json!({
        "id": "x", "object": "chat.completion", "created": 0, "model": "fake",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": format!("echo: {echo}")}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    })
    .to_string()
}

async fn write(
    sock: &mut TcpStream,
    code: u16,
    retry: Option<u32>,
    ctype: &str,
    body: &str,
) -> std::io::Result<()> {
    let mut h = format!(
        "HTTP/1.1 {code} X\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\n",
        body.len()
    );
    if let Some(r) = retry {
        h.push_str(&format!("retry-after: {r}\r\n"));
    }
    h.push_str("\r\n");
    sock.write_all(h.as_bytes()).await?;
    sock.write_all(body.as_bytes()).await
}

fn policy(attempts: u32, max_wait: Duration) -> RetryPolicy {
    RetryPolicy {
        max_attempts: attempts,
        base_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(200),
        max_total_wait: max_wait,
    }
}

fn http(f: &Fake, p: RetryPolicy, timeout: Duration) -> (HttpClient, Arc<UsageMeter>) {
    let u = Arc::new(UsageMeter::default());
    (
        HttpClient::new(&f.base, Some("fake".into()), None, p, timeout, u.clone()).unwrap(),
        u,
    )
}

/// A greedy request (temperature 0: one recorded answer however often it is asked).
fn req(text: &str) -> ChatRequest {
    let mut r = ChatRequest::new("fake", vec![ChatMessage::user(text)]);
    r.temperature = Some(0.0);
    r
}

#[tokio::test]
async fn transient_faults_are_retried_until_an_answer() {
    let f = fake(
        vec![
            Act::Drop,
            Act::Status(500, None),
            Act::Status(429, Some(0)),
            Act::Status(503, None),
        ],
        Act::Ok,
        None,
    )
    .await;
    let (c, u) = http(
        &f,
        policy(6, Duration::from_secs(5)),
        Duration::from_secs(5),
    );
    let r = c.chat(req("hello")).await.unwrap();
    assert_eq!(r.text(), "echo: hello");
    assert_eq!(u.retries.load(Ordering::Relaxed), 4);
}

#[tokio::test]
async fn limits_bound_attempts_waiting_and_stalls() {
    // always 500: gives up after the attempts allowed
    let f = fake(vec![], Act::Status(500, None), None).await;
    let (c, _) = http(
        &f,
        policy(3, Duration::from_secs(5)),
        Duration::from_secs(5),
    );
    match c.chat(req("x")).await {
        Err(ClientError::GaveUp { attempts, last, .. }) => {
            assert_eq!(attempts, 3);
            assert!(matches!(*last, ClientError::Api { status: 500, .. }));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(f.hits.load(Ordering::SeqCst), 3);

    // a server asking to wait longer than the total budget: no waiting at all
    let f = fake(vec![], Act::Status(429, Some(30)), None).await;
    let (c, _) = http(
        &f,
        policy(6, Duration::from_secs(1)),
        Duration::from_secs(5),
    );
    let t0 = Instant::now();
    assert!(matches!(
        c.chat(req("x")).await,
        Err(ClientError::GaveUp { .. })
    ));
    assert!(t0.elapsed() < Duration::from_secs(2));

    // a stalled server: every attempt times out, the whole call ends within its limits
    let f = fake(vec![], Act::Stall(Duration::from_secs(30)), None).await;
    let (c, _) = http(
        &f,
        policy(2, Duration::from_secs(1)),
        Duration::from_millis(300),
    );
    let t0 = Instant::now();
    match c.chat(req("x")).await {
        Err(ClientError::GaveUp { last, .. }) => {
            assert!(matches!(*last, ClientError::Timeout(_)), "{last:?}")
        }
        other => panic!("{other:?}"),
    }
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());

    // request errors are not retried
    let f = fake(vec![], Act::Status(400, None), None).await;
    let (c, u) = http(
        &f,
        policy(6, Duration::from_secs(5)),
        Duration::from_secs(5),
    );
    match c.chat(req("x")).await {
        Err(ClientError::Api {
            status, message, ..
        }) => {
            assert_eq!(status, 400);
            assert!(message.contains("injected 400"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(u.retries.load(Ordering::Relaxed), 0);

    // nobody listening: a connection error, retried, then a clear failure
    let (c, _) = http(
        &Fake {
            base: "http://127.0.0.1:9/v1".into(),
            hits: Arc::default(),
        },
        policy(2, Duration::from_secs(1)),
        Duration::from_secs(2),
    );
    let e = c.chat(req("x")).await.unwrap_err();
    assert!(e.to_string().contains("connect"), "{e}");
}

#[tokio::test]
async fn failing_callers_do_not_stop_the_others() {
    fn rule(body: &str) -> Option<Act> {
        body.contains("bad").then_some(Act::Status(400, None))
    }
    let f = fake(vec![], Act::Ok, Some(rule)).await;
    let (c, _) = http(
        &f,
        policy(3, Duration::from_secs(2)),
        Duration::from_secs(5),
    );
    let client = Arc::new(
        Client::new(Arc::new(c), Arc::new(UsageMeter::default()))
            .with_limits(4, Duration::from_secs(10)),
    );
    let mut tasks = Vec::new();
    for i in 0..30 {
        let c = client.clone();
        tasks.push(tokio::spawn(async move {
            let text = if i % 5 == 0 {
                format!("bad {i}")
            } else {
                format!("good {i}")
            };
            (i, c.chat(req(&text)).await)
        }));
    }
    let mut failed = 0;
    for t in tasks {
        let (i, r) = t.await.unwrap();
        match r {
            Ok(r) => assert_eq!(r.text(), format!("echo: good {i}")),
            Err(e) => {
                assert_eq!(i % 5, 0, "{e}");
                failed += 1;
            }
        }
    }
    assert_eq!(failed, 6);
    let rep = client.report();
    assert_eq!((rep.calls, rep.failures), (24, 6));
    assert_eq!(rep.prompt_tokens, 24 * 5);
    assert!(rep.markdown().contains("24 calls"));
}

#[tokio::test]
async fn streaming_and_record_replay() {
    let f = fake(vec![], Act::Stream, None).await;
    let (c, _) = http(
        &f,
        policy(3, Duration::from_secs(2)),
        Duration::from_secs(5),
    );
    let mut got = String::new();
    let r = c
        .chat_stream(req("one two three"), Box::new(|d| got.push_str(d)))
        .await
        .unwrap();
    assert_eq!(got, "one two three ");
    assert_eq!(r.text(), "one two three ");
    assert_eq!(r.usage.unwrap().completion_tokens, 4);
    assert_eq!(r.choices[0].finish_reason.as_deref(), Some("stop"));

    // record against a live server, then replay with the server gone
    let tmp = tempfile::tempdir().unwrap();
    let tape = tmp.path().join("tape.jsonl");
    let f = fake(vec![], Act::Ok, None).await;
    let (c, _) = http(
        &f,
        policy(3, Duration::from_secs(2)),
        Duration::from_secs(5),
    );
    let rec = Client::new(Arc::new(c), Arc::new(UsageMeter::default())).with_cache(
        Arc::new(Cassette::open(&tape).unwrap()),
        CacheMode::RecordMissing,
    );
    let mut sampled = req("again");
    sampled.temperature = Some(0.7);
    let a = rec.chat(req("hello")).await.unwrap();
    let s1 = rec.chat(sampled.clone()).await.unwrap();
    let s2 = rec.chat(sampled.clone()).await.unwrap();
    assert_eq!(f.hits.load(Ordering::SeqCst), 3);
    let again = rec.chat(req("hello")).await.unwrap();
    assert_eq!(again, a);
    assert_eq!(rec.report().cached, 1);
    drop(rec);
    let dead = Fake {
        base: "http://127.0.0.1:9/v1".into(),
        hits: Arc::default(),
    };
    let (c, _) = http(&dead, policy(1, Duration::ZERO), Duration::from_secs(1));
    let rep = Client::new(Arc::new(c), Arc::new(UsageMeter::default()))
        .with_cache(Arc::new(Cassette::open(&tape).unwrap()), CacheMode::Replay);
    assert_eq!(rep.chat(req("hello")).await.unwrap(), a);
    assert_eq!(rep.chat(sampled.clone()).await.unwrap(), s1);
    assert_eq!(rep.chat(sampled.clone()).await.unwrap(), s2);
    match rep.chat(req("never asked")).await {
        Err(ClientError::ReplayMiss { .. }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(rep.report().calls, 0);
}
