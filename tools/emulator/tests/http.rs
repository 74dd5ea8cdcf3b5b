//! The emulator through its real HTTP servers on ephemeral ports.

#[path = "support/exposition.rs"]
mod exposition;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vlm_budget::core::base64buf::encode_into;
use vlm_budget::core::probe::ImageFormat;
use vlm_budget::core::transcode::{encode, Layout, Pixels};
use vlm_emulator::cli::{self, Command as Cli, Config, DecodeModel};
use vlm_emulator::sched::{RoleKind, TimeModel};
use vlm_emulator::server::{self, Running};

/// An emulator on its own runtime, driven by blocking clients.
struct Emu {
    running: Running,
    _rt: tokio::runtime::Runtime,
}

/// The configuration the flags give, with ephemeral ports and no jitter.
fn config(args: &[&str]) -> Config {
    let mut all = vec!["--encode-port", "0", "--pd-port", "0", "--jitter-sigma", "0"];
    all.extend_from_slice(args);
    let Ok(Cli::Run(config)) = cli::parse(all.iter().copied()) else {
        panic!("bad flags {all:?}");
    };
    *config
}

impl Emu {
    fn start(args: &[&str]) -> Self {
        let config = config(args);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let running = rt.block_on(server::start(config)).expect("start");
        Self { running, _rt: rt }
    }

    fn encode(&self) -> SocketAddr {
        self.running.encode_addr.expect("encode role")
    }

    fn pd(&self) -> SocketAddr {
        self.running.pd_addr.expect("pd role")
    }
}

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// When the last byte arrived.
    done: Instant,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn ms(&self, name: &str) -> f64 {
        self.header(name)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no numeric {name}: {:?}", self.headers))
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = raw
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size line");
        let size_text = std::str::from_utf8(&raw[..line_end]).expect("ascii");
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16).expect("size");
        raw = &raw[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[..size]);
        assert_eq!(&raw[size..size + 2], b"\r\n", "chunk terminator");
        raw = &raw[size + 2..];
    }
}

/// Sends one HTTP/1.1 request over a fresh connection; the reply is left
/// to read.
fn send(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nhost: emulator\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).expect("write head");
    s.write_all(body).expect("write body");
    s
}

/// One HTTP/1.1 exchange over a fresh connection.
fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    let mut s = send(addr, method, path, headers, body);
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read");
    let done = Instant::now();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of head");
    let head = String::from_utf8(raw[..split].to_vec()).expect("head utf8");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let rest = &raw[split + 4..];
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked { dechunk(rest) } else { rest.to_vec() };
    Reply {
        status,
        headers,
        body,
        done,
    }
}

fn get(addr: SocketAddr, path: &str) -> Reply {
    http(addr, "GET", path, &[], b"")
}

fn post_json(addr: SocketAddr, path: &str, v: &Value, headers: &[(&str, &str)]) -> Reply {
    let body = serde_json::to_vec(v).expect("json");
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    http(addr, "POST", path, &all, &body)
}

fn chat(addr: SocketAddr, v: &Value, request_id: &str) -> Reply {
    post_json(addr, "/v1/chat/completions", v, &[("x-request-id", request_id)])
}

/// A PNG whose pixels depend on `salt`.
fn png(w: u32, h: u32, salt: u8) -> Vec<u8> {
    let data = (0..w * h)
        .flat_map(|i| {
            let v = ((i % w) / 16) as u8;
            [v ^ salt, salt, v]
        })
        .collect();
    let px = Pixels {
        width: w,
        height: h,
        layout: Layout::Rgb8,
        data,
    };
    encode(&px, ImageFormat::Png, 90).expect("png")
}

fn data_url(bytes: &[u8]) -> String {
    let mut out = b"data:image/png;base64,".to_vec();
    encode_into(bytes, &mut out);
    String::from_utf8(out).expect("ascii")
}

fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// A chat request with a 40-byte text (10 text tokens) and `images`.
fn request(images: &[&[u8]], extra: Value) -> Value {
    let mut content = vec![json!({"type": "text", "text": "Describe the image in one short sentence."})];
    content.extend(
        images
            .iter()
            .map(|b| json!({"type": "image_url", "image_url": {"url": data_url(b)}})),
    );
    let mut v = json!({"model": "qwen", "messages": [{"role": "user", "content": content}]});
    if let (Some(obj), Value::Object(extra)) = (v.as_object_mut(), extra) {
        obj.extend(extra);
    }
    v
}

fn metric(text: &str, name: &str) -> f64 {
    let (_, samples) = exposition::parse(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    samples.iter().filter(|s| s.name == name).map(|s| s.value).sum()
}

/// A streamed chat request, left open once its first token arrived.
struct OpenStream {
    _conn: TcpStream,
    /// When the first bytes of the response (its head) arrived.
    first_byte: Instant,
    /// When the chunk of the first token arrived.
    first_token: Instant,
}

/// Sends a streamed chat request and reads until the first token's chunk
/// (the second `data:` event, after the role chunk).
fn stream_to_first_token(addr: SocketAddr, body: &Value, request_id: &str) -> OpenStream {
    let bytes = serde_json::to_vec(body).expect("json");
    let headers = [("content-type", "application/json"), ("x-request-id", request_id)];
    let mut conn = send(addr, "POST", "/v1/chat/completions", &headers, &bytes);
    let mut raw = Vec::new();
    let mut first_byte = None;
    let mut buf = [0u8; 4096];
    loop {
        let n = conn.read(&mut buf).expect("read");
        assert!(
            n > 0,
            "closed before the first token: {}",
            String::from_utf8_lossy(&raw)
        );
        first_byte.get_or_insert_with(Instant::now);
        raw.extend_from_slice(&buf[..n]);
        if raw.windows(7).filter(|w| w == b"data: {").count() >= 2 {
            break;
        }
    }
    OpenStream {
        _conn: conn,
        first_byte: first_byte.unwrap_or_else(Instant::now),
        first_token: Instant::now(),
    }
}

/// Polls the metrics until `done` holds for them (or fails after 20 s).
fn wait_for_metrics(addr: SocketAddr, what: &str, done: impl Fn(&str) -> bool) -> String {
    let give_up = Instant::now() + Duration::from_secs(20);
    loop {
        let m = get(addr, "/metrics").text();
        if done(&m) {
            return m;
        }
        assert!(Instant::now() < give_up, "never {what}:\n{m}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn debug_log(addr: SocketAddr) -> Vec<Value> {
    get(addr, "/debug/requests")
        .json()
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn encode_queue_serves_images_over_the_batch_budget_one_after_the_other() {
    // Each 896x896 image is 1024 visual tokens; the budget fits one. The
    // encoder time of 1024 tokens is 47.32 ms, x8 speed factor = 378.56 ms
    // emulated, x0.25 time scale = 94.6 ms of wall time per batch. Two
    // images in one batch would cost 8 x (2 x 47.32 - 14.8) = 638.7 ms.
    //
    // Every bound below is a lower bound that CPU load cannot break: an
    // emulated sleep never ends early, and load only makes things later.
    let emu = Emu::start(&[
        "--role",
        "encode",
        "--encode-gpus",
        "1",
        "--max-num-batched-tokens",
        "1500",
        "--speed-factor",
        "8",
        "--time-scale",
        "0.25",
        "--preprocess-ms-per-mpixel",
        "0",
    ]);
    let addr = emu.encode();
    let service_ms = 8.0 * 47.32;
    let wall_service = Duration::from_secs_f64(service_ms * 0.25 / 1000.0);
    let bodies = [
        request(&[&png(896, 896, 1)], json!({})),
        request(&[&png(896, 896, 2)], json!({})),
    ];
    let sent = Instant::now();
    let mut replies: Vec<Reply> = std::thread::scope(|s| {
        let handles: Vec<_> = bodies
            .iter()
            .enumerate()
            .map(|(i, b)| s.spawn(move || chat(addr, b, &format!("q{i}"))))
            .collect();
        handles.into_iter().map(|h| h.join().expect("client")).collect()
    });
    replies.sort_by_key(|r| r.done);
    for r in &replies {
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-emulator-visual-tokens"), Some("1024"));
        assert_eq!(r.header("x-emulator-ec-cache"), Some("miss"));
        // Each image was a batch of its own (the emulated service time is
        // the model's, whatever the load).
        assert!((r.ms("x-emulator-encode-ms") - service_ms).abs() < 1e-6);
        assert_eq!(r.json()["usage"]["completion_tokens"], 1);
        // Its TTFT covers its batch, and its queue wait and batch fit in it.
        let ttft = r.ms("x-emulator-ttft-ms");
        assert!(ttft >= service_ms, "ttft {ttft}");
        assert!(r.ms("x-emulator-queue-ms") + service_ms <= ttft + 2e-3);
    }
    // One GPU: the two batches ran one after the other, so the later reply
    // came at least two service times after both were sent.
    let last = &replies[1];
    assert!(last.done - sent >= wall_service * 2, "{:?}", last.done - sent);

    // Two images of one request over the budget: two batches, one after
    // the other, both in its encoder time and its TTFT.
    let both = chat(
        addr,
        &request(&[&png(896, 896, 3), &png(896, 896, 4)], json!({})),
        "q2",
    );
    assert_eq!(both.status, 200, "{}", both.text());
    assert!((both.ms("x-emulator-encode-ms") - 2.0 * service_ms).abs() < 1e-6);
    assert!(both.ms("x-emulator-ttft-ms") >= 2.0 * service_ms);
    let m = get(addr, "/metrics").text();
    assert_eq!(metric(&m, "ec_cache_misses_total"), 4.0);
}

#[test]
fn both_roles_share_the_encoder_cache_and_count_misses() {
    let emu = Emu::start(&["--role", "both", "--time-scale", "0.05"]);
    let (enc, pd) = (emu.encode(), emu.pd());
    let x = png(448, 448, 7);
    let y = png(448, 448, 8);

    // Encode X, then prefill X: the PD instance finds X's encoder output.
    let r = chat(enc, &request(&[&x], json!({"max_tokens": 1})), "e1");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-emulator-role"), Some("encode"));
    assert_eq!(r.header("x-emulator-ec-cache"), Some("miss"));
    assert!(r.ms("x-emulator-encode-ms") > 0.0);
    let r = chat(pd, &request(&[&x], json!({"max_tokens": 3})), "p1");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-emulator-role"), Some("pd"));
    assert_eq!(r.header("x-emulator-ec-cache"), Some("hit"));
    assert_eq!(r.ms("x-emulator-encode-ms"), 0.0);
    assert!(r.ms("x-emulator-prefill-ms") > 0.0);
    // 448x448 = 16x16 = 256 visual tokens; 40 text bytes = 10 tokens; +2 per image.
    assert_eq!(r.header("x-emulator-visual-tokens"), Some("256"));
    assert_eq!(r.header("x-emulator-images"), Some("1"));
    assert_eq!(r.header("x-request-id"), Some("p1"));
    let usage = &r.json()["usage"];
    assert_eq!(usage["prompt_tokens"], 10 + 256 + 2);
    assert_eq!(usage["completion_tokens"], 3);
    assert_eq!(usage["total_tokens"], 10 + 256 + 2 + 3);

    // Y straight to PD: a miss, encoded by the PD instance itself, in its TTFT.
    let r = chat(pd, &request(&[&y, &x], json!({"max_completion_tokens": 2})), "p2");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-emulator-ec-cache"), Some("partial"));
    let (encode_ms, prefill_ms) = (r.ms("x-emulator-encode-ms"), r.ms("x-emulator-prefill-ms"));
    assert!(
        (encode_ms - 35.51).abs() < 1e-6,
        "encoder floor for 256 tokens: {encode_ms}"
    );
    assert!(r.ms("x-emulator-ttft-ms") >= encode_ms + prefill_ms);
    let r = chat(pd, &request(&[&y], json!({})), "p3");
    assert_eq!(r.header("x-emulator-ec-cache"), Some("miss"));
    // No max_tokens: the default output length, finished by "stop".
    assert_eq!(r.json()["usage"]["completion_tokens"], 64);
    assert_eq!(r.json()["choices"][0]["finish_reason"], "stop");
    let r = chat(pd, &request(&[], json!({"max_tokens": 1})), "p4");
    assert_eq!(r.header("x-emulator-ec-cache"), Some("none"));
    assert_eq!(r.json()["usage"]["prompt_tokens"], 10);

    // The log shows the same decoded bytes on both roles.
    let log = debug_log(pd);
    assert_eq!(log, debug_log(enc), "one log per process");
    let ids: Vec<&str> = log.iter().filter_map(|e| e["request_id"].as_str()).collect();
    assert_eq!(ids, ["e1", "p1", "p2", "p3", "p4"]);
    let image = |i: usize, j: usize| &log[i]["images"][j];
    assert_eq!(image(0, 0)["sha256"], hex_sha256(&x));
    assert_eq!(image(1, 0)["sha256"], hex_sha256(&x));
    assert_eq!(image(0, 0)["cache"], "miss");
    assert_eq!(image(1, 0)["cache"], "hit");
    assert_eq!(image(2, 0)["sha256"], hex_sha256(&y));
    assert_eq!(image(2, 0)["cache"], "miss");
    assert_eq!(image(2, 1)["cache"], "hit");
    assert_eq!(
        (
            image(1, 0)["width"].as_u64(),
            image(1, 0)["visual_tokens"].as_u64()
        ),
        (Some(448), Some(256))
    );
    assert_eq!(log[0]["role"], "encode");
    assert_eq!(log[1]["role"], "pd");
    assert_eq!(log[1]["max_tokens"], 3);
    assert_eq!(log[2]["max_tokens"], 2);
    assert!(log[3]["max_tokens"].is_null());
    assert!(log.iter().all(|e| e["status"] == 200 && e["stream"] == false));
    let arrivals: Vec<f64> = log.iter().filter_map(|e| e["arrival_ms"].as_f64()).collect();
    assert!(arrivals.windows(2).all(|w| w[0] <= w[1]));

    // Metrics: every line valid exposition; counters per instance.
    let pd_metrics = get(pd, "/metrics");
    assert_eq!(pd_metrics.status, 200);
    assert!(pd_metrics
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/plain; version=0.0.4")));
    let m = pd_metrics.text();
    assert_eq!(metric(&m, "ec_cache_hits_total"), 2.0);
    assert_eq!(metric(&m, "ec_cache_misses_total"), 2.0);
    assert_eq!(metric(&m, "emulator_images_total"), 4.0);
    assert_eq!(metric(&m, "emulator_visual_tokens_total"), 4.0 * 256.0);
    assert_eq!(metric(&m, "vllm:request_success_total"), 4.0);
    assert_eq!(
        metric(&m, "vllm:generation_tokens_total"),
        (3 + 2 + 64 + 1) as f64
    );
    assert_eq!(metric(&m, "vllm:time_to_first_token_seconds_count"), 4.0);
    assert_eq!(metric(&m, "vllm:e2e_request_latency_seconds_count"), 4.0);
    assert_eq!(metric(&m, "vllm:num_requests_running"), 0.0);
    assert_eq!(metric(&m, "vllm:num_requests_waiting"), 0.0);
    let e = get(enc, "/metrics").text();
    assert_eq!(metric(&e, "ec_cache_misses_total"), 1.0);
    assert_eq!(metric(&e, "ec_cache_hits_total"), 0.0);
    assert_eq!(metric(&e, "vllm:prompt_tokens_total"), (10 + 256 + 2) as f64);
}

#[test]
fn separate_processes_share_a_cache_directory() {
    let dir = std::env::temp_dir().join(format!("vlm-emulator-ec-{}", std::process::id()));
    let dir_arg = dir.to_str().expect("utf8 path").to_string();
    let common = ["--time-scale", "0.02", "--ec-cache-dir", dir_arg.as_str()];
    let encode = Emu::start(&[&["--role", "encode"][..], &common].concat());
    let pd = Emu::start(&[&["--role", "pd"][..], &common].concat());
    assert!(encode.running.pd_addr.is_none() && pd.running.encode_addr.is_none());
    let x = request(&[&png(280, 280, 3)], json!({"max_tokens": 1}));
    assert_eq!(
        chat(encode.encode(), &x, "a").header("x-emulator-ec-cache"),
        Some("miss")
    );
    let entries: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    assert_eq!(entries.len(), 1, "one empty file per image");
    assert_eq!(std::fs::metadata(&entries[0]).map(|m| m.len()).ok(), Some(0));
    assert_eq!(chat(pd.pd(), &x, "b").header("x-emulator-ec-cache"), Some("hit"));
    // The encode role skips images already in the cache too.
    let again = chat(encode.encode(), &x, "c");
    assert_eq!(again.header("x-emulator-ec-cache"), Some("hit"));
    assert_eq!(again.ms("x-emulator-encode-ms"), 0.0);
    let cleared = http(pd.pd(), "DELETE", "/debug/ec-cache", &[], b"");
    assert_eq!(cleared.json()["cleared"], 1);
    assert_eq!(chat(pd.pd(), &x, "d").header("x-emulator-ec-cache"), Some("miss"));
    let m = get(pd.pd(), "/metrics").text();
    assert_eq!(metric(&m, "ec_cache_misses_total"), 1.0);
    assert_eq!(metric(&m, "ec_cache_hits_total"), 1.0);
    drop((encode, pd));
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

/// The `data:` payloads of an SSE body, in order.
fn sse_events(body: &str) -> Vec<String> {
    assert!(body.ends_with("\n\n"), "events end with a blank line");
    body.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data event: {e:?}"))
                .to_string()
        })
        .collect()
}

#[test]
fn streams_sse_chunks_in_order_with_usage_when_asked() {
    let emu = Emu::start(&["--role", "pd", "--time-scale", "0.1", "--decode-step-ms", "20"]);
    let pd = emu.pd();
    let img = png(308, 308, 9);
    let body = request(
        &[&img],
        json!({"max_tokens": 5, "stream": true, "stream_options": {"include_usage": true}}),
    );
    let r = chat(pd, &body, "s1");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/event-stream")));
    assert_eq!(r.header("x-emulator-visual-tokens"), Some("121"));
    let events = sse_events(&r.text());
    assert_eq!(events.len(), 1 + 5 + 1 + 1, "{events:?}");
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("chunk json"))
        .collect();
    let id = chunks[0]["id"].clone();
    assert!(id.as_str().is_some_and(|s| s.starts_with("chatcmpl-")));
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], id);
        assert_eq!(c["model"], "qwen");
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let mut content = String::new();
    for (i, c) in chunks[1..6].iter().enumerate() {
        assert!(c["usage"].is_null() && c.get("usage").is_some());
        let finish = &c["choices"][0]["finish_reason"];
        if i == 4 {
            assert_eq!(finish, "length");
        } else {
            assert!(finish.is_null());
        }
        content.push_str(c["choices"][0]["delta"]["content"].as_str().expect("content"));
    }
    assert_eq!(content.split(' ').count(), 5, "{content:?}");
    let usage = &chunks[6];
    assert_eq!(usage["choices"].as_array().map(Vec::len), Some(0));
    assert_eq!(usage["usage"]["prompt_tokens"], 10 + 121 + 2);
    assert_eq!(usage["usage"]["completion_tokens"], 5);

    // Deterministic: the same request streams the same text.
    let again = sse_events(&chat(pd, &body, "s2").text());
    let text_of = |events: &[String]| -> String {
        events
            .iter()
            .filter_map(|e| serde_json::from_str::<Value>(e).ok())
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str().map(str::to_owned))
            .collect()
    };
    assert_eq!(text_of(&again), content);

    // Without include_usage: no usage anywhere.
    let plain = request(&[&img], json!({"max_tokens": 2, "stream": true}));
    let events = sse_events(&chat(pd, &plain, "s3").text());
    assert_eq!(events.len(), 1 + 2 + 1);
    assert!(events[..3].iter().all(|e| !e.contains("\"usage\"")));

    // Tokens come from decode steps of at least 20 + 0.37 ms (one running
    // request), after the prefill: a lower bound that load cannot break.
    let log = debug_log(pd);
    let first = &log[0];
    assert_eq!(first["stream"], true);
    let e2e_ms = first["e2e_ms"].as_f64().unwrap_or(0.0);
    assert!(e2e_ms >= 4.0 * 20.37 + r.ms("x-emulator-prefill-ms"), "{e2e_ms}");
}

#[test]
fn decode_steps_are_pd_gpu_work_that_prefills_queue_behind() {
    // One PD GPU whose decode steps never end (10^9 emulated ms).
    let emu = Emu::start(&["--role", "pd", "--time-scale", "0.01", "--decode-step-ms", "1e9"]);
    let pd = emu.pd();
    // The first token comes at the end of the prefill; the next would need a step.
    let stream = request(&[], json!({"max_tokens": 5, "stream": true}));
    let _decoding = stream_to_first_token(pd, &stream, "decoding");
    // The GPU is now in a step with one running request: a new prefill
    // waits behind it. (Should a probe reach the GPU before the step began,
    // it is served with its one token, and the next probe waits.)
    let probe = request(&[], json!({"max_tokens": 1}));
    let mut probes = Vec::new();
    let m = loop {
        assert!(
            probes.len() < 3,
            "every probe was served: decoding does not hold the GPU"
        );
        let id = format!("probe{}", probes.len());
        let body = serde_json::to_vec(&probe).expect("json");
        probes.push(send(
            pd,
            "POST",
            "/v1/chat/completions",
            &[("x-request-id", &id)],
            &body,
        ));
        let served = || debug_log(pd).iter().any(|e| e["request_id"] == id.as_str());
        let m = wait_for_metrics(pd, "a waiting prefill or a served probe", |m| {
            metric(m, "vllm:num_requests_waiting") == 1.0 || served()
        });
        if metric(&m, "vllm:num_requests_waiting") == 1.0 {
            break m;
        }
    };
    // Running: the request in decode; waiting: the queued prefill.
    assert_eq!(metric(&m, "vllm:num_requests_running"), 1.0, "{m}");
    assert_eq!(
        metric(&m, "vllm:request_success_total"),
        (probes.len() - 1) as f64
    );
}

#[test]
fn the_old_time_model_stays_available_by_flags() {
    // The defaults: per-role preprocessing measured on the GPUs, decode
    // steps as PD GPU work.
    let new = server::time_model(&config(&[])).expect("model");
    assert_eq!(new.preprocess_ms(RoleKind::Encode, 1_000_000), 28.0);
    assert_eq!(new.preprocess_ms(RoleKind::Pd, 1_000_000), 18.0);
    assert_eq!(new.decode_model, DecodeModel::Queued);
    assert!((new.decode_step_ms(10, 0) - (6.0 + 10.0 * 0.37)).abs() < 1e-9);
    // `--decode-model free --preprocess-ms-per-mpixel 4`: the model before
    // both, nothing else changed.
    let old = server::time_model(&config(&[
        "--decode-model",
        "free",
        "--preprocess-ms-per-mpixel",
        "4",
    ]))
    .expect("model");
    assert_eq!(old.preprocess_ms(RoleKind::Encode, 1_000_000), 4.0);
    assert_eq!(old.preprocess_ms(RoleKind::Pd, 1_000_000), 4.0);
    assert_eq!(
        (old.decode_model, old.decode_ms_per_token),
        (DecodeModel::Free, 8.0)
    );
    assert_eq!(
        old,
        TimeModel {
            encode_preprocess_ms_per_mpixel: 4.0,
            pd_preprocess_ms_per_mpixel: 4.0,
            decode_model: DecodeModel::Free,
            ..new
        }
    );

    // Served: decode steps never hold the GPU (even endless ones, which the
    // free model ignores), and tokens come --decode-ms-per-token apart.
    let emu = Emu::start(&[
        "--role",
        "pd",
        "--time-scale",
        "0.05",
        "--decode-model",
        "free",
        "--preprocess-ms-per-mpixel",
        "4",
        "--decode-step-ms",
        "1e9",
    ]);
    let pd = emu.pd();
    let img = png(1000, 1000, 5);
    let r = chat(pd, &request(&[&img], json!({"max_tokens": 6})), "free");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.ms("x-emulator-preprocess-ms") >= 4.0);
    let entry = &debug_log(pd)[0];
    let decode_ms = entry["e2e_ms"].as_f64().unwrap_or(0.0) - entry["ttft_ms"].as_f64().unwrap_or(0.0);
    assert!(decode_ms >= 5.0 * 8.0, "{decode_ms}");
    let again = chat(pd, &request(&[], json!({"max_tokens": 3})), "next");
    assert_eq!(again.status, 200, "{}", again.text());
}

#[test]
fn preprocessing_is_charged_per_role() {
    // A 1000x1000 image is one megapixel: at least 28 ms on the encode
    // instance and 18 ms on PD (the real decoding counts if longer).
    let emu = Emu::start(&["--role", "both", "--time-scale", "0.05"]);
    let img = png(1000, 1000, 6);
    let body = request(&[&img], json!({"max_tokens": 1}));
    let e = chat(emu.encode(), &body, "e");
    let p = chat(emu.pd(), &body, "p");
    assert_eq!((e.status, p.status), (200, 200));
    assert!(e.ms("x-emulator-preprocess-ms") >= 28.0, "{:?}", e.headers);
    assert!(p.ms("x-emulator-preprocess-ms") >= 18.0, "{:?}", p.headers);
    assert!(p.ms("x-emulator-ttft-ms") >= p.ms("x-emulator-preprocess-ms"));
}

#[test]
fn refuses_bad_input_with_openai_errors() {
    let emu = Emu::start(&["--role", "pd", "--time-scale", "0.01"]);
    let pd = emu.pd();
    let good = png(56, 56, 1);
    let mut remote = request(&[], json!({}));
    remote["messages"][0]["content"]
        .as_array_mut()
        .expect("content")
        .push(json!({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}));
    let with_url = |url: &str| {
        let mut v = request(&[], json!({}));
        v["messages"][0]["content"]
            .as_array_mut()
            .expect("content")
            .push(json!({"type": "image_url", "image_url": {"url": url}}));
        v
    };
    let truncated = data_url(&good[..good.len() / 2]);
    for (body, code) in [
        (remote, "invalid_image_url"),
        (with_url("data:image/png;base64,%%%%"), "invalid_base64"),
        (with_url(&truncated), "corrupt_image"),
        (
            with_url("data:image/gif;base64,R0lGODlh"),
            "unsupported_image_type",
        ),
        (json!({"model": "qwen"}), "invalid_request"),
    ] {
        let r = chat(pd, &body, "bad");
        assert_eq!(r.status, 400, "{code}: {}", r.text());
        let e = r.json();
        assert_eq!(e["error"]["code"], code, "{e}");
        assert_eq!(e["error"]["type"], "invalid_request_error");
        assert!(e["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert_eq!(r.header("x-emulator-role"), Some("pd"));
    }
    let r = http(pd, "POST", "/v1/chat/completions", &[], b"{not json");
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (400, Some("invalid_json"))
    );
    let log = debug_log(pd);
    assert_eq!(log.len(), 6);
    assert!(log.iter().all(|e| e["status"] == 400 && e["error"].is_string()));
    let m = get(pd, "/metrics").text();
    assert_eq!(metric(&m, "vllm:request_success_total"), 0.0);
}

#[test]
fn endpoints_faults_and_the_debug_log() {
    let emu = Emu::start(&["--role", "both", "--time-scale", "0.01", "--model", "served-name"]);
    let (enc, pd) = (emu.encode(), emu.pd());
    let h = get(pd, "/health");
    assert_eq!((h.status, h.body.len()), (200, 0));
    let models = get(enc, "/v1/models").json();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "served-name");
    assert_eq!(get(pd, "/nope").status, 404);
    assert_eq!(http(pd, "PUT", "/v1/chat/completions", &[], b"").status, 405);

    // Fail the next two PD requests with 503 after a delay; the encode
    // instance is unaffected.
    let f = post_json(
        pd,
        "/debug/faults",
        &json!({"extra_delay_ms": 80, "fail_status": 503, "fail_count": 2}),
        &[],
    );
    assert_eq!(f.status, 200, "{}", f.text());
    let body = request(&[], json!({"max_tokens": 1}));
    for _ in 0..2 {
        let t = Instant::now();
        let r = chat(pd, &body, "f");
        assert_eq!(r.status, 503);
        assert_eq!(r.json()["error"]["type"], "server_error");
        assert!(t.elapsed() >= Duration::from_millis(80));
    }
    assert_eq!(chat(enc, &body, "e").status, 200);
    let t = Instant::now();
    let r = chat(pd, &body, "ok");
    assert_eq!(r.status, 200);
    assert!(t.elapsed() >= Duration::from_millis(80), "the delay stays");
    let state = get(pd, "/debug/faults").json();
    assert_eq!(
        state,
        json!({"extra_delay_ms": 80, "fail_status": 503, "fail_count": 0})
    );
    let bad = post_json(pd, "/debug/faults", &json!({"fail_status": 42}), &[]);
    assert_eq!(bad.status, 400);
    assert_eq!(post_json(pd, "/debug/faults", &json!({}), &[]).status, 200);

    let statuses: Vec<u64> = debug_log(pd)
        .iter()
        .filter_map(|e| e["status"].as_u64())
        .collect();
    assert_eq!(statuses, [503, 503, 200, 200]);
    let cleared = http(pd, "DELETE", "/debug/requests", &[], b"");
    assert_eq!(cleared.json()["cleared"], 4);
    assert!(debug_log(enc).is_empty());
}

#[test]
fn a_fault_delay_comes_before_the_first_streamed_token() {
    let emu = Emu::start(&["--role", "pd", "--time-scale", "0.01"]);
    let pd = emu.pd();
    let f = post_json(pd, "/debug/faults", &json!({"extra_delay_ms": 300}), &[]);
    assert_eq!(f.status, 200, "{}", f.text());
    let sent = Instant::now();
    let s = stream_to_first_token(
        pd,
        &request(&[], json!({"max_tokens": 3, "stream": true})),
        "slow",
    );
    // The delay is added before the response starts: its head and its first
    // token come at least 300 ms of wall time after the request was sent.
    let delay = Duration::from_millis(300);
    assert!(s.first_byte - sent >= delay, "{:?}", s.first_byte - sent);
    assert!(s.first_token - sent >= delay, "{:?}", s.first_token - sent);
}

#[test]
fn binary_logs_its_ports_and_serves() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vlm-emulator"))
        .args(["--role", "both", "--encode-port", "0", "--pd-port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        BufReader::new(out).read_line(&mut line).expect("log line");
    }
    let url = |role: &str| -> SocketAddr {
        line.split_once(&format!("{role} http://"))
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no {role} address in {line:?}"))
    };
    let health = (
        get(url("encode"), "/health").status,
        get(url("pd"), "/health").status,
    );
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(health, (200, 200));
    assert!(line.starts_with("vlm-emulator listening: "), "{line}");
    // It reports its start-up time (how long is up to the machine's load).
    let ready_ms = line
        .split_once("ready in ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|ms| ms.parse::<f64>().ok());
    assert!(ready_ms.is_some_and(|ms| ms >= 0.0), "{line}");
}

/// The prefill/decode split: prefill answers with the params of a KV
/// transfer, decode takes only transfers prefill opened and charges their
/// transfer time instead of a prefill.
#[test]
fn a_split_hands_the_kv_cache_from_prefill_to_decode() {
    let emu = Emu::start(&[
        "--role",
        "split",
        "--prefill-port",
        "0",
        "--time-scale",
        "0.05",
        "--kv-transfer-ms-per-ktoken",
        "100",
    ]);
    let (enc, dec) = (emu.encode(), emu.pd());
    let pre = emu.running.prefill_addr.expect("prefill role");
    let x = png(448, 448, 9);
    let r = chat(enc, &request(&[&x], json!({"max_tokens": 1})), "s1");
    assert_eq!(r.header("x-emulator-ec-cache"), Some("miss"));
    let open = json!({"do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id": null,
        "remote_block_ids": null, "remote_host": null, "remote_port": null});
    let r = chat(
        pre,
        &request(
            &[&x],
            json!({"max_tokens": 1, "stream": false, "kv_transfer_params": open}),
        ),
        "s1",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-emulator-role"), Some("prefill"));
    assert_eq!(r.header("x-emulator-ec-cache"), Some("hit"));
    let kv = r.json()["kv_transfer_params"].clone();
    assert_eq!(
        (&kv["do_remote_prefill"], &kv["do_remote_decode"]),
        (&json!(true), &json!(false))
    );
    // 268 prompt tokens in blocks of 16.
    assert_eq!(kv["remote_block_ids"].as_array().map(Vec::len), Some(17));
    let id = kv["transfer_id"].as_str().expect("transfer id").to_string();

    // Decode with the params: no encoder, no prefill, the transfer charged.
    let body = request(&[&x], json!({"max_tokens": 3, "kv_transfer_params": kv}));
    let r = chat(dec, &body, "s1");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-emulator-role"), Some("decode"));
    assert_eq!(r.header("x-emulator-ec-cache"), Some("none"));
    assert_eq!(r.ms("x-emulator-encode-ms"), 0.0);
    let transfer = r.ms("x-emulator-kv-transfer-ms");
    assert!((transfer - 26.8).abs() < 1e-9, "{transfer}");
    assert!(r.ms("x-emulator-ttft-ms") >= transfer);
    assert_eq!(r.json()["usage"]["completion_tokens"], 3);

    // A transfer prefill never opened is refused.
    let mut forged = kv.clone();
    forged["transfer_id"] = json!("0123456789abcdef0123456789abcdef");
    let r = chat(dec, &request(&[&x], json!({"kv_transfer_params": forged})), "s2");
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "unknown_kv_transfer");
    let mut none = kv.clone();
    none.as_object_mut().map(|o| o.remove("transfer_id"));
    let r = chat(dec, &request(&[&x], json!({"kv_transfer_params": none})), "s3");
    assert_eq!(r.status, 400);
    // Without the handshake decode prefills the request itself (a proxy's
    // fallback), and so does prefill serve a plain request.
    let r = chat(dec, &request(&[&x], json!({"max_tokens": 2})), "s4");
    assert_eq!(r.status, 200);
    assert!(r.ms("x-emulator-prefill-ms") > 0.0);
    assert_eq!(r.header("x-emulator-ec-cache"), Some("hit"));
    let r = chat(pre, &request(&[], json!({"max_tokens": 1})), "s5");
    assert!(r.json().get("kv_transfer_params").is_none());

    let log = debug_log(dec);
    let by_id = |rid: &str, role: &str| {
        log.iter()
            .find(|e| e["request_id"] == rid && e["role"] == role)
            .cloned()
            .unwrap_or(Value::Null)
    };
    assert_eq!(by_id("s1", "prefill")["kv_transfer"], json!(id));
    assert_eq!(by_id("s1", "decode")["kv_transfer"], json!(id));
    assert_eq!(by_id("s2", "decode")["error"], "unknown_kv_transfer");
}
