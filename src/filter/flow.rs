//! Request state machine: headers → buffer body → process → forward.

use super::host::{Counter, HttpHost, Metrics};
use crate::core::config::Config;
use crate::core::error::FilterError;
use crate::core::pipeline::{process, ImageAction, Outcome};
use crate::core::policy::{self, BudgetPolicy};
use std::rc::Rc;

/// What the host should do after a callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Continue,
    Pause,
}

/// Configuration and policy, built once per VM in `on_configure`.
pub struct Shared {
    pub config: Config,
    pub policy: Box<dyn BudgetPolicy>,
}

impl Shared {
    pub fn new(config: Config) -> Self {
        let policy = policy::from_config(&config);
        Self { config, policy }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Not a request the filter acts on.
    Bypass,
    /// Buffering the body of a request the filter acts on.
    Buffering,
    /// Processed: report to add to the response.
    Done(Report),
    /// A local error reply was sent.
    Replied,
}

/// Response headers for a processed request.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Report {
    headers: Vec<(&'static str, String)>,
}

pub const HEADER_POLICY: &str = "x-vlm-policy";
pub const HEADER_BUDGET: &str = "x-vlm-budget-tokens";
pub const HEADER_BEFORE: &str = "x-vlm-visual-tokens-before";
pub const HEADER_AFTER: &str = "x-vlm-visual-tokens-after";
pub const HEADER_IMAGES: &str = "x-vlm-images";
pub const HEADER_RESIZED: &str = "x-vlm-images-resized";
pub const HEADER_TRANSCODE: &str = "x-vlm-transcode-ms";
pub const HEADER_FAIL_OPEN: &str = "x-vlm-fail-open";

/// One request's filter.
pub struct RequestFilter {
    shared: Rc<Shared>,
    state: State,
}

impl RequestFilter {
    pub fn new(shared: Rc<Shared>) -> Self {
        Self {
            shared,
            state: State::Bypass,
        }
    }

    pub fn on_request_headers(
        &mut self,
        host: &mut dyn HttpHost,
        metrics: &dyn Metrics,
        end_of_stream: bool,
    ) -> Verdict {
        let cfg = &self.shared.config;
        let method = host.request_header(":method");
        let path = host.request_header(":path");
        let acts = method.as_deref() == Some("POST") && path.as_deref().is_some_and(|p| cfg.matches_path(p));
        if !acts || end_of_stream {
            return Verdict::Continue;
        }
        metrics.add(Counter::Requests, 1);
        // The body may change length: let Envoy frame it (chunked / h2 data).
        host.remove_request_header("content-length");
        self.state = State::Buffering;
        Verdict::Continue
    }

    pub fn on_request_body(
        &mut self,
        host: &mut dyn HttpHost,
        metrics: &dyn Metrics,
        body_size: usize,
        end_of_stream: bool,
    ) -> Verdict {
        if self.state != State::Buffering {
            return Verdict::Continue;
        }
        let cfg = &self.shared.config;
        if body_size as u64 > cfg.max_body_bytes {
            return self.fail(
                host,
                metrics,
                FilterError::BodyTooLarge {
                    limit: cfg.max_body_bytes,
                },
            );
        }
        if !end_of_stream {
            return Verdict::Pause;
        }
        let Some(body) = host.request_body(body_size) else {
            return self.fail(host, metrics, FilterError::InvalidJson("empty body".into()));
        };
        let clock = || host.now_micros();
        match process(&body, cfg, self.shared.policy.as_ref(), &clock) {
            Ok(outcome) => {
                drop(body);
                if let Some(new_body) = &outcome.body {
                    host.replace_request_body(body_size, new_body);
                }
                record(metrics, &outcome);
                self.state = State::Done(report_of(&outcome));
                Verdict::Continue
            }
            Err(e) => self.fail(host, metrics, e),
        }
    }

    pub fn on_response_headers(&mut self, host: &mut dyn HttpHost) -> Verdict {
        if let State::Done(report) = &self.state {
            for (name, value) in &report.headers {
                host.add_response_header(name, value);
            }
        }
        Verdict::Continue
    }

    fn fail(&mut self, host: &mut dyn HttpHost, metrics: &dyn Metrics, err: FilterError) -> Verdict {
        metrics.error(err.code());
        let policy = self.shared.config.policy.name();
        if self.shared.config.fail_open {
            log::warn!("vlm-budget: forwarding unchanged (fail_open): {err}");
            metrics.add(Counter::FailOpen, 1);
            self.state = State::Done(Report {
                headers: vec![
                    (HEADER_POLICY, policy.to_string()),
                    (HEADER_FAIL_OPEN, err.code().to_string()),
                ],
            });
            return Verdict::Continue;
        }
        log::info!("vlm-budget: rejecting request: {}", err.code());
        host.send_local_reply(
            err.status(),
            &[("content-type", "application/json"), (HEADER_POLICY, policy)],
            &err.to_json(),
        );
        self.state = State::Replied;
        Verdict::Pause
    }
}

fn record(metrics: &dyn Metrics, o: &Outcome) {
    let resized = o.resized() as u64;
    let passed = o
        .images
        .iter()
        .filter(|i| matches!(i.action, ImageAction::Passed { .. }))
        .count() as u64;
    metrics.add(Counter::ImagesResized, resized);
    metrics.add(Counter::ImagesPassed, passed);
    metrics.add(Counter::VisualTokensBefore, o.tokens_before());
    metrics.add(Counter::VisualTokensAfter, o.tokens_after());
    if resized > 0 {
        metrics.transcode_ms(o.transcode_micros() / 1000);
    }
}

fn report_of(o: &Outcome) -> Report {
    Report {
        headers: vec![
            (HEADER_POLICY, o.policy.name().to_string()),
            (HEADER_BUDGET, o.budget_tokens.to_string()),
            (HEADER_BEFORE, o.tokens_before().to_string()),
            (HEADER_AFTER, o.tokens_after().to_string()),
            (HEADER_IMAGES, o.images.len().to_string()),
            (HEADER_RESIZED, o.resized().to_string()),
            (
                HEADER_TRANSCODE,
                format!("{:.1}", o.transcode_micros() as f64 / 1000.0),
            ),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::policy::PolicyKind;
    use std::cell::RefCell;
    use std::collections::HashMap;

    #[derive(Default)]
    struct FakeHost {
        req_headers: HashMap<String, String>,
        body: Vec<u8>,
        resp_headers: Vec<(String, String)>,
        reply: Option<(u32, Vec<u8>)>,
    }

    impl HttpHost for FakeHost {
        fn request_header(&self, name: &str) -> Option<String> {
            self.req_headers.get(name).cloned()
        }
        fn remove_request_header(&mut self, name: &str) {
            self.req_headers.remove(name);
        }
        fn request_body(&self, size: usize) -> Option<Vec<u8>> {
            self.body.get(..size).map(<[u8]>::to_vec)
        }
        fn replace_request_body(&mut self, size: usize, body: &[u8]) {
            self.body.splice(..size, body.iter().copied());
        }
        fn add_response_header(&mut self, name: &str, value: &str) {
            self.resp_headers.push((name.into(), value.into()));
        }
        fn send_local_reply(&mut self, status: u32, _h: &[(&str, &str)], body: &[u8]) {
            self.reply = Some((status, body.to_vec()));
        }
        fn now_micros(&self) -> u64 {
            0
        }
    }

    #[derive(Default)]
    struct FakeMetrics {
        counts: RefCell<HashMap<String, u64>>,
    }

    impl Metrics for FakeMetrics {
        fn add(&self, c: Counter, n: u64) {
            *self.counts.borrow_mut().entry(c.name().into()).or_default() += n;
        }
        fn error(&self, code: &'static str) {
            *self.counts.borrow_mut().entry(code.into()).or_default() += 1;
        }
        fn transcode_ms(&self, _ms: u64) {}
    }

    fn host(method: &str, path: &str, body: &str) -> FakeHost {
        let mut h = FakeHost::default();
        for (k, v) in [(":method", method), (":path", path), ("content-length", "10")] {
            h.req_headers.insert(k.into(), v.into());
        }
        h.body = body.as_bytes().to_vec();
        h
    }

    fn filter(cfg: Config) -> RequestFilter {
        RequestFilter::new(Rc::new(Shared::new(cfg)))
    }

    #[test]
    fn other_paths_and_methods_bypass() {
        let m = FakeMetrics::default();
        for (method, path) in [("GET", "/v1/chat/completions"), ("POST", "/v1/completions")] {
            let mut h = host(method, path, "garbage");
            let mut f = filter(Config::default());
            assert_eq!(f.on_request_headers(&mut h, &m, false), Verdict::Continue);
            assert_eq!(f.on_request_body(&mut h, &m, 7, true), Verdict::Continue);
            assert!(h.req_headers.contains_key("content-length"));
            assert!(h.reply.is_none());
        }
        assert!(m.counts.borrow().is_empty());
    }

    #[test]
    fn text_only_request_is_reported_and_untouched() {
        let m = FakeMetrics::default();
        let body = r#"{"messages":[{"role":"user","content":"hi"}],"n":1.50}"#;
        let mut h = host("POST", "/v1/chat/completions?x", body);
        let mut f = filter(Config::default());
        assert_eq!(f.on_request_headers(&mut h, &m, false), Verdict::Continue);
        assert!(!h.req_headers.contains_key("content-length"));
        assert_eq!(f.on_request_body(&mut h, &m, 5, false), Verdict::Pause);
        assert_eq!(f.on_request_body(&mut h, &m, body.len(), true), Verdict::Continue);
        assert_eq!(h.body, body.as_bytes());
        f.on_response_headers(&mut h);
        let hv: HashMap<_, _> = h.resp_headers.iter().cloned().collect();
        assert_eq!(hv[HEADER_POLICY], "static");
        assert_eq!(hv[HEADER_BUDGET], "4096");
        assert_eq!(hv[HEADER_BEFORE], "0");
        assert_eq!(m.counts.borrow()[Counter::Requests.name()], 1);
    }

    #[test]
    fn bad_input_fails_closed_or_open() {
        let body = "{not json";
        let m = FakeMetrics::default();
        let mut h = host("POST", "/v1/chat/completions", body);
        let mut f = filter(Config::default());
        f.on_request_headers(&mut h, &m, false);
        assert_eq!(f.on_request_body(&mut h, &m, body.len(), true), Verdict::Pause);
        let (status, json) = h.reply.clone().expect("reply");
        assert_eq!(status, 400);
        let v: serde_json::Value = serde_json::from_slice(&json).expect("json");
        assert_eq!(v["error"]["code"], "invalid_json");
        f.on_response_headers(&mut h);
        assert!(h.resp_headers.is_empty());

        let mut h = host("POST", "/v1/chat/completions", body);
        let mut f = filter(Config {
            fail_open: true,
            policy: PolicyKind::Vanilla,
            ..Config::default()
        });
        f.on_request_headers(&mut h, &m, false);
        assert_eq!(f.on_request_body(&mut h, &m, body.len(), true), Verdict::Continue);
        assert!(h.reply.is_none());
        assert_eq!(h.body, body.as_bytes());
        f.on_response_headers(&mut h);
        assert!(h
            .resp_headers
            .contains(&(HEADER_FAIL_OPEN.into(), "invalid_json".into())));
        assert_eq!(m.counts.borrow()["invalid_json"], 2);
        assert_eq!(m.counts.borrow()[Counter::FailOpen.name()], 1);
    }

    #[test]
    fn oversized_body_is_refused_before_the_end() {
        let m = FakeMetrics::default();
        let mut h = host("POST", "/v1/chat/completions", "");
        let mut f = filter(Config {
            max_body_bytes: 100,
            ..Config::default()
        });
        f.on_request_headers(&mut h, &m, false);
        assert_eq!(f.on_request_body(&mut h, &m, 101, false), Verdict::Pause);
        assert_eq!(h.reply.as_ref().map(|r| r.0), Some(400));
        // Later chunks are ignored once replied.
        assert_eq!(f.on_request_body(&mut h, &m, 200, true), Verdict::Continue);
    }
}
