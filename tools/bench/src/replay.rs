//! The open-loop load generator: each request is sent at its arrival time
//! whatever happened to the earlier ones, its response streamed to time the
//! first content token (TTFT), the tokens after it (TPOT) and the end (e2e).

use crate::error::{BenchError, Result};
use crate::http::{self, Url};
use crate::images;
use crate::results::RequestRecord;
use crate::sse::{SseParser, StreamTiming};
use crate::trace::TraceRequest;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::Method;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How to replay.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    pub url: Url,
    pub path: String,
    pub model: String,
    pub request_timeout: Duration,
    /// Prefix of request ids and of the progress line.
    pub label: String,
    pub headers: Vec<(String, String)>,
    /// Adds vLLM's `ignore_eos: true` so every answer has max_tokens tokens.
    pub ignore_eos: bool,
    pub progress: bool,
}

/// A request body and what it carries.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub body: Bytes,
    pub images: Vec<String>,
    pub image_tokens: u64,
}

/// The chat request for `r`: the prompt, then its images as data URLs,
/// streamed with usage.
pub fn prepare(r: &TraceRequest, model: &str, ignore_eos: bool) -> Result<Prepared> {
    let json = |v: &str| serde_json::to_string(v).map_err(|e| BenchError::json("request", e));
    let mut body = String::new();
    body.push_str("{\"model\":");
    body.push_str(&json(model)?);
    body.push_str(",\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":");
    body.push_str(&json(&r.prompt)?);
    body.push('}');
    let mut names = Vec::new();
    let mut tokens = 0;
    for p in &r.images {
        let (url, meta, _) = images::data_url(p)?;
        body.push_str(",{\"type\":\"image_url\",\"image_url\":{\"url\":\"");
        body.push_str(&url);
        body.push_str("\"}}");
        tokens += meta.tokens;
        names.push(file_name(p));
    }
    body.push_str("]}],\"max_tokens\":");
    body.push_str(&r.max_tokens.to_string());
    body.push_str(",\"temperature\":0,\"stream\":true,\"stream_options\":{\"include_usage\":true}");
    if ignore_eos {
        body.push_str(",\"ignore_eos\":true");
    }
    body.push('}');
    Ok(Prepared {
        body: Bytes::from(body),
        images: names,
        image_tokens: tokens,
    })
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into_owned())
}

#[derive(Default)]
struct Counters {
    sent: AtomicUsize,
    done: AtomicUsize,
    errors: AtomicUsize,
}

/// Sends one request and streams its answer into `rec`.
async fn exchange(opts: &ReplayOptions, body: Bytes, rec: &mut RequestRecord, t0: Instant) -> Result<()> {
    let mut headers: Vec<(&str, String)> = vec![("x-request-id", rec.request_id.clone())];
    headers.extend(opts.headers.iter().map(|(k, v)| (k.as_str(), v.clone())));
    let resp = http::send(&opts.url, Method::POST, &opts.path, body, &headers).await?;
    rec.status = Some(resp.status().as_u16());
    rec.headers = http::headers_with_prefix(resp.headers(), &["x-vlm-", "x-emulator-"]);
    let mut body = resp.into_body();
    if rec.status != Some(200) {
        let text = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let snippet: String = String::from_utf8_lossy(&text).chars().take(300).collect();
        return Err(BenchError::Http(format!(
            "status {}: {snippet}",
            rec.status.unwrap_or(0)
        )));
    }
    let mut parser = SseParser::new();
    let mut timing = StreamTiming::default();
    let ms = |t: Instant| t.duration_since(t0).as_secs_f64() * 1000.0;
    let result = loop {
        match body.frame().await {
            None => break Ok(()),
            Some(Err(e)) => break Err(BenchError::Http(format!("stream: {e}"))),
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let at = ms(Instant::now());
                    for ev in parser.push(data) {
                        timing.observe(&ev, at);
                    }
                    // Keep what is known so far in case of a timeout.
                    rec.ttft_ms = timing.first_content_ms;
                }
            }
        }
    };
    let at = ms(Instant::now());
    for ev in parser.finish() {
        timing.observe(&ev, at);
    }
    rec.ttft_ms = timing.first_content_ms;
    rec.tpot_ms = timing.tpot_ms();
    rec.output_tokens = timing.output_tokens();
    rec.e2e_ms = Some(ms(Instant::now()));
    result?;
    if let Some(e) = timing.error {
        return Err(BenchError::Http(format!("error in stream: {e}")));
    }
    if !timing.done {
        return Err(BenchError::Http("stream ended without [DONE]".into()));
    }
    if timing.first_content_ms.is_none() {
        return Err(BenchError::Http("no content token".into()));
    }
    Ok(())
}

fn progress_line(label: &str, c: &Counters, total: usize, elapsed: f64, span: f64) -> String {
    let sent = c.sent.load(Ordering::Relaxed);
    let done = c.done.load(Ordering::Relaxed);
    format!(
        "[{label}] {elapsed:5.0}/{span:.0} s  sent {sent}/{total}  in flight {}  done {done}  errors {}",
        sent.saturating_sub(done),
        c.errors.load(Ordering::Relaxed)
    )
}

/// Replays `requests` open-loop; returns one record per request, in order.
pub async fn replay(requests: &[TraceRequest], opts: &ReplayOptions) -> Result<(Vec<RequestRecord>, f64)> {
    for r in requests {
        for p in &r.images {
            if !p.is_file() {
                return Err(BenchError::Image {
                    path: p.clone(),
                    message: "not a readable file".into(),
                });
            }
        }
    }
    let counters = Arc::new(Counters::default());
    let span = requests.last().map_or(0.0, |r| r.arrival_s);
    let total = requests.len();
    let start = Instant::now();
    let ticker = if opts.progress {
        let (c, label) = (counters.clone(), opts.label.clone());
        Some(tokio::spawn(async move {
            let tty = std::io::stderr().is_terminal();
            let every = if tty {
                Duration::from_millis(500)
            } else {
                Duration::from_secs(10)
            };
            loop {
                tokio::time::sleep(every).await;
                let line = progress_line(&label, &c, total, start.elapsed().as_secs_f64(), span);
                let mut err = std::io::stderr().lock();
                let _ = if tty {
                    write!(err, "\r{line}\x1b[K")
                } else {
                    writeln!(err, "{line}")
                };
                let _ = err.flush();
            }
        }))
    } else {
        None
    };
    let mut tasks = tokio::task::JoinSet::new();
    let opts = Arc::new(opts.clone());
    for (index, r) in requests.iter().enumerate() {
        // Build the body ahead of the arrival (file read and base64 off the runtime).
        let (req, model, eos) = (r.clone(), opts.model.clone(), opts.ignore_eos);
        let prepared = tokio::task::spawn_blocking(move || prepare(&req, &model, eos))
            .await
            .map_err(|e| BenchError::Process(format!("body preparation: {e}")))?;
        tokio::time::sleep_until(tokio::time::Instant::from_std(
            start + Duration::from_secs_f64(r.arrival_s),
        ))
        .await;
        let sent_s = start.elapsed().as_secs_f64();
        let mut rec = RequestRecord {
            index,
            request_id: format!("{}-{index}", opts.label),
            arrival_s: r.arrival_s,
            sent_s,
            images: Vec::new(),
            image_tokens: 0,
            body_bytes: 0,
            status: None,
            error: None,
            ttft_ms: None,
            tpot_ms: None,
            e2e_ms: None,
            output_tokens: 0,
            headers: Default::default(),
        };
        counters.sent.fetch_add(1, Ordering::Relaxed);
        let (opts, counters) = (opts.clone(), counters.clone());
        tasks.spawn(async move {
            match prepared {
                Err(e) => rec.error = Some(format!("client: {e}")),
                Ok(p) => {
                    rec.images = p.images;
                    rec.image_tokens = p.image_tokens;
                    rec.body_bytes = p.body.len();
                    let t0 = Instant::now();
                    match tokio::time::timeout(opts.request_timeout, exchange(&opts, p.body, &mut rec, t0))
                        .await
                    {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => rec.error = Some(e.to_string()),
                        Err(_) => {
                            rec.error = Some(format!("timeout after {:?}", opts.request_timeout));
                            rec.e2e_ms = None;
                        }
                    }
                }
            }
            counters.done.fetch_add(1, Ordering::Relaxed);
            if rec.error.is_some() {
                counters.errors.fetch_add(1, Ordering::Relaxed);
            }
            rec
        });
    }
    let mut records = Vec::with_capacity(total);
    while let Some(r) = tasks.join_next().await {
        records.push(r.map_err(|e| BenchError::Process(format!("request task: {e}")))?);
    }
    let wall = start.elapsed().as_secs_f64();
    if let Some(t) = ticker {
        t.abort();
        let line = progress_line(&opts.label, &counters, total, wall, span);
        let tty = std::io::stderr().is_terminal();
        eprintln!("{}{line}", if tty { "\r" } else { "" });
    }
    records.sort_by_key(|r| r.index);
    Ok((records, wall))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_openai_chat_requests() {
        let r = TraceRequest {
            id: None,
            arrival_s: 0.0,
            images: vec![],
            prompt: "Say \"hi\"".into(),
            max_tokens: 7,
        };
        let p = prepare(&r, "m/x", true).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&p.body).unwrap();
        assert_eq!(v["model"], "m/x");
        assert_eq!(v["messages"][0]["content"][0]["text"], "Say \"hi\"");
        assert_eq!(v["max_tokens"], 7);
        assert_eq!(v["stream"], true);
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["ignore_eos"], true);
        let missing = TraceRequest {
            images: vec!["/no/such.jpg".into()],
            ..r
        };
        assert!(prepare(&missing, "m", false).is_err());
    }
}
