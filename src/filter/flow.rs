//! Request state machine: headers → buffer body → process → (encode) →
//! (prefill) → forward → response headers → (first streamed token), with every traffic
//! counter the request raises released on every path (answer, error,
//! timeout, client reset) by `on_done`.
//!
//! A request with images is timed from its arrival to the first token
//! prefill/decode sends back; that time, against the dynamic policy's
//! prediction, is what the policy learns its margin from.

use super::host::{Counter, EncodeCall, GaugeSet, HttpHost, Services, TranscodeCall};
use crate::core::config::Config;
use crate::core::dynamic::DynamicParams;
use crate::core::encode::{encode_requests, EncodeFailure};
use crate::core::error::FilterError;
use crate::core::offload::{self, check_answer, AnswerError, Target, TranscodeMode};
use crate::core::pipeline::{plan, process, ImageAction, Outcome, Plan, RequestContext};
use crate::core::policy::{self, BudgetPolicy, PolicyKind, Prediction};
use crate::core::prefill::{answer_kv_params, decode_request, prefill_request, PrefillFailure};
use crate::core::request::RequestError;
use crate::core::residual::MarginRule;
use crate::core::sse::FirstToken;
use crate::core::traffic::{ClusterSignal, TrafficSnapshot, TrafficState};
use std::cell::Cell;
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
    /// Latency predictions for the traffic counters (any policy).
    pub params: DynamicParams,
    /// How the learned TTFT margin is read.
    pub margin: MarginRule,
}

impl Shared {
    pub fn new(config: Config) -> Self {
        let policy = policy::from_config(&config);
        let params = config.dynamic_params();
        let margin = config.margin_rule();
        Self {
            config,
            policy,
            params,
            margin,
        }
    }

    /// The traffic as a request arriving now sees it.
    pub fn snapshot(&self, svc: &dyn Services, now_us: u64) -> TrafficSnapshot {
        let cfg = &self.config;
        let fresh = |c: Option<ClusterSignal>| c.filter(|c| c.fresh(now_us, cfg.metrics_stale_ms));
        let pd = cfg
            .pd_metrics_cluster
            .as_ref()
            .and_then(|_| fresh(svc.pd_cluster()));
        let margin = self.margin.margin(&svc.residuals());
        TrafficSnapshot::of(
            &svc.state(),
            (fresh(svc.cluster()), pd),
            margin,
            now_us,
            cfg.rate_window_s,
        )
    }
}

#[derive(Debug, Clone, PartialEq)]
enum State {
    /// Not a request the filter acts on.
    Bypass,
    /// Buffering the body of a request the filter acts on.
    Buffering,
    /// Images at the transcode service (`transcode: "offload"`); the
    /// worker serves other streams meanwhile.
    Transcoding(Box<Transcoding>),
    /// Waiting for the encode cluster before forwarding to PD.
    Encoding(Encoding),
    /// Waiting for the prefill cluster before forwarding to decode.
    Prefilling(Prefilling),
    /// Forwarded to prefill/decode: the report goes on the response.
    Forwarded(Report),
    /// A streamed answer: waiting for its first token.
    Streaming(FirstToken),
    /// Answered; nothing more to do.
    Answered,
    /// A local error reply was sent.
    Replied,
}

/// What is known, when a request with images goes on to prefill/decode,
/// to time it against.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Timed {
    /// Visual tokens forwarded.
    tokens: u64,
    /// The dynamic policy's prediction.
    prediction: Option<Prediction>,
    /// Predicted prefill/decode work of the request (µs).
    pd_work_us: i64,
    /// Predicted KV hand-off to decode of a prefill/decode split (ms; 0
    /// without one): on the way to the first token, not prefill work.
    handoff_ms: f64,
    /// The encode calls failed and PD encodes itself: not what was
    /// predicted, so no sample.
    fallback: bool,
}

/// A request with images at prefill/decode, waiting for its first token.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Watch {
    timed: Timed,
    forwarded_us: u64,
    /// Predicted forward-to-first-token time, ms (the PD backlog it found
    /// plus its own work).
    pd_predicted_ms: f64,
}

/// Response headers for a processed request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Report {
    headers: Vec<(&'static str, String)>,
}

/// Encode calls of one request.
#[derive(Debug, Clone, PartialEq)]
struct Encoding {
    report: Report,
    bodies: Vec<Vec<u8>>,
    /// In-flight calls: (token, body index, attempt).
    pending: Vec<(u32, usize, u64)>,
    /// Bodies that failed after every retry, with the last reason.
    failed: Vec<(usize, String)>,
    calls: u64,
    started_us: u64,
    /// Predicted duration of the encode phase (queue wait + service), ms.
    predicted_ms: f64,
    /// What to time the request against once forwarded (none without
    /// images).
    timed: Option<Timed>,
    /// The prefill call that follows (prefill/decode split).
    prefill: Option<PrefillPlan>,
}

/// A prefill call to make once the encoder is done.
#[derive(Debug, Clone, PartialEq)]
struct PrefillPlan {
    /// The prefill request.
    request: Vec<u8>,
    /// Size of the buffered request body (what decode gets, and what the
    /// prefill's `kv_transfer_params` is spliced into).
    body_len: usize,
}

/// The prefill call of one request (prefill/decode split).
#[derive(Debug, Clone, PartialEq)]
struct Prefilling {
    report: Report,
    plan: PrefillPlan,
    /// The call in flight: (token, attempt).
    pending: Option<(u32, u64)>,
    calls: u64,
    started_us: u64,
}

/// How a request's images were decided, for the rest of its way.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Processed {
    /// When the body was decided (µs).
    decided_us: u64,
    /// The traffic the policy read, if it did.
    seen: Option<TrafficSnapshot>,
    /// Time spent shrinking the images: in the filter, or (offload) from
    /// the calls' dispatch to the last image in hand.
    transcode_us: u64,
    /// `transcode: "offload"`: `offload`, or `fallback` when the filter
    /// shrank any image itself.
    offload: Option<&'static str>,
}

/// Images at the transcode service, one call each.
#[derive(Debug, Clone, PartialEq)]
struct Transcoding {
    body: Vec<u8>,
    body_size: usize,
    plan: Plan<Vec<u8>>,
    /// Each job's new URL and its time, once in hand.
    done: Vec<Option<(Vec<u8>, u64)>>,
    /// In-flight calls: (token, job).
    pending: Vec<(u32, usize)>,
    /// Why the service did not shrink a job (logged at the fallback).
    failed: Vec<(usize, String)>,
    started_us: u64,
    decided_us: u64,
    seen: Option<TrafficSnapshot>,
}

impl Transcoding {
    fn new(
        body: Vec<u8>,
        body_size: usize,
        plan: Plan<Vec<u8>>,
        decided_us: u64,
        seen: Option<TrafficSnapshot>,
        now_us: u64,
    ) -> Self {
        Self {
            body,
            body_size,
            done: vec![None; plan.jobs.len()],
            plan,
            pending: Vec::new(),
            failed: Vec::new(),
            started_us: now_us,
            decided_us,
            seen,
        }
    }
}

/// Traffic counters this request holds, released exactly once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Held {
    encode_calls: i64,
    encode_work_us: i64,
    pd: bool,
    /// At prefill/decode without a first token yet, with this much
    /// predicted work.
    pd_pending: bool,
    pd_work_us: i64,
}

pub const HEADER_POLICY: &str = "x-vlm-policy";
pub const HEADER_BUDGET: &str = "x-vlm-budget-tokens";
pub const HEADER_BEFORE: &str = "x-vlm-visual-tokens-before";
pub const HEADER_AFTER: &str = "x-vlm-visual-tokens-after";
pub const HEADER_IMAGES: &str = "x-vlm-images";
pub const HEADER_RESIZED: &str = "x-vlm-images-resized";
pub const HEADER_TRANSCODE: &str = "x-vlm-transcode-ms";
pub const HEADER_FAIL_OPEN: &str = "x-vlm-fail-open";
pub const HEADER_OFFLOAD: &str = "x-vlm-transcode";
pub const HEADER_ENCODE: &str = "x-vlm-encode";
pub const HEADER_ENCODE_MS: &str = "x-vlm-encode-ms";
pub const HEADER_ENCODE_CALLS: &str = "x-vlm-encode-calls";
pub const HEADER_PREFILL: &str = "x-vlm-prefill";
pub const HEADER_PREFILL_MS: &str = "x-vlm-prefill-ms";
pub const HEADER_PREFILL_CALLS: &str = "x-vlm-prefill-calls";
pub const HEADER_KV_TRANSFER: &str = "x-vlm-kv-transfer";
pub const HEADER_AUDIO: &str = "x-vlm-audio-parts";
pub const HEADER_VIDEO: &str = "x-vlm-video-parts";
pub const HEADER_PREDICTED_TTFT: &str = "x-vlm-predicted-ttft-ms";
pub const HEADER_MARGIN: &str = "x-vlm-ttft-margin-ms";
pub const HEADER_TERMS: &str = "x-vlm-ttft-terms";
pub const HEADER_REASON: &str = "x-vlm-budget-reason";
pub const HEADER_SLO: &str = "x-slo-ttft-ms";
pub const REQUEST_ID: &str = "x-request-id";

/// One request's filter.
pub struct RequestFilter {
    shared: Rc<Shared>,
    state: State,
    request_id: Option<String>,
    slo_ms: Option<f64>,
    /// When the request's headers arrived (µs).
    arrived_us: u64,
    held: Held,
    watch: Option<Watch>,
    /// Bytes of body buffered so far.
    buffered: usize,
}

impl RequestFilter {
    pub fn new(shared: Rc<Shared>) -> Self {
        Self {
            shared,
            state: State::Bypass,
            request_id: None,
            slo_ms: None,
            arrived_us: 0,
            held: Held::default(),
            watch: None,
            buffered: 0,
        }
    }

    pub fn on_request_headers(
        &mut self,
        host: &mut dyn HttpHost,
        svc: &dyn Services,
        end_of_stream: bool,
    ) -> Verdict {
        let cfg = &self.shared.config;
        let headers = host.request_headers();
        let acts = headers.get(":method") == Some("POST")
            && headers.get(":path").is_some_and(|p| cfg.matches_path(p));
        if !acts || end_of_stream {
            return Verdict::Continue;
        }
        svc.add(Counter::Requests, 1);
        self.arrived_us = host.now_micros();
        if let Some(coding) = headers.content_encoding() {
            // Refused (or, fail_open, forwarded as sent) before any buffering.
            return self.fail(host, svc, FilterError::UnsupportedEncoding(coding));
        }
        // A declared length over the limit is refused before Envoy buffers it.
        let declared = headers
            .get("content-length")
            .and_then(|v| v.trim().parse::<u64>().ok());
        if declared.is_some_and(|n| n > cfg.max_body_bytes) {
            let limit = cfg.max_body_bytes;
            if cfg.fail_open {
                // Forwarded as sent, content-length included: nothing is rewritten.
                return self.fail(host, svc, FilterError::BodyTooLarge { limit });
            }
            return self.reply_error(host, svc, FilterError::BodyTooLarge { limit });
        }
        // The body may change length: let Envoy frame it (chunked / h2 data).
        host.remove_request_header("content-length");
        if cfg.policy == PolicyKind::Dynamic {
            self.slo_ms = headers.get(HEADER_SLO).map(|h| cfg.slo_for(Some(h)));
        }
        if cfg.encode_cluster.is_some() || cfg.prefill_cluster.is_some() {
            // Encode, prefill and decode calls share the id; headers can only change now.
            // An id that is not UTF-8 is replaced: the encode call could
            // not carry the same bytes.
            let id = match headers.get(REQUEST_ID) {
                Some(id) if !id.is_empty() => id.to_string(),
                _ => {
                    let id = host.new_request_id();
                    host.set_request_header(REQUEST_ID, &id);
                    id
                }
            };
            self.request_id = Some(id);
        }
        self.state = State::Buffering;
        if cfg.hold_headers && svc.may_hold_headers() {
            // Held until the body is decided: upstream sees only the final
            // request, never one the filter answers itself.
            return Verdict::Pause;
        }
        Verdict::Continue
    }

    /// Whether the request waits for its body (headers seen, body not yet
    /// decided).
    pub fn awaiting_body(&self) -> bool {
        self.state == State::Buffering
    }

    pub fn on_request_body(
        &mut self,
        host: &mut dyn HttpHost,
        svc: &dyn Services,
        body_size: usize,
        end_of_stream: bool,
    ) -> Verdict {
        if self.state != State::Buffering {
            return Verdict::Continue;
        }
        self.buffered = body_size;
        let shared = Rc::clone(&self.shared);
        let cfg = &shared.config;
        if body_size as u64 > cfg.max_body_bytes {
            return self.fail(
                host,
                svc,
                FilterError::BodyTooLarge {
                    limit: cfg.max_body_bytes,
                },
            );
        }
        if !end_of_stream {
            return Verdict::Pause;
        }
        let Some(body) = host.request_body(body_size) else {
            return self.fail(host, svc, FilterError::InvalidJson("empty body".into()));
        };
        // The shared traffic state is read (host calls) only if the policy
        // asks for it, and then once.
        let seen = Cell::new(None);
        let traffic = || {
            let t = shared.snapshot(svc, host.now_micros());
            seen.set(Some(t));
            t
        };
        let decided_us = host.now_micros();
        // A dynamic budget's encoder work joins the backlog as soon as it is
        // decided (held, so every path releases it).
        let reserved = Cell::new(0i64);
        let reserve = |work_ms: f64| {
            if cfg.encode_cluster.is_some() {
                let us = (work_ms.max(0.0) * 1000.0) as i64;
                let state = svc.update(&mut |s| s.encode_outstanding_us += us);
                svc.publish(&state, GaugeSet::ENCODE);
                reserved.set(us);
            }
        };
        let ctx = RequestContext {
            traffic: &traffic,
            slo_ms: self.slo_ms,
            elapsed_ms: decided_us.saturating_sub(self.arrived_us) as f64 / 1000.0,
            decided: &reserve,
        };
        let clock = || host.now_micros();
        let outcome = if cfg.transcode == TranscodeMode::Offload {
            let planned = plan(&body, cfg, shared.policy.as_ref(), &ctx);
            self.held.encode_work_us = reserved.get();
            match planned {
                Ok(p) if !p.jobs.is_empty() => {
                    let req = Transcoding::new(body, body_size, p, decided_us, seen.get(), host.now_micros());
                    return self.start_transcoding(host, svc, req);
                }
                Ok(p) => p.finish(&body, Vec::new()),
                Err(e) => return self.fail(host, svc, e),
            }
        } else {
            let processed = process(&body, cfg, shared.policy.as_ref(), &ctx, &clock);
            self.held.encode_work_us = reserved.get();
            match processed {
                Ok(outcome) => outcome,
                Err(e) => return self.fail(host, svc, e),
            }
        };
        let processed = Processed {
            decided_us,
            seen: seen.get(),
            transcode_us: outcome.transcode_micros(),
            offload: None,
        };
        self.after_process(host, svc, body, body_size, outcome, processed)
    }

    /// The images are decided (and shrunk): the body is replaced, the
    /// request counted in the traffic state, and sent on to the encoders or
    /// prefill/decode.
    fn after_process(
        &mut self,
        host: &mut dyn HttpHost,
        svc: &dyn Services,
        body: Vec<u8>,
        body_size: usize,
        outcome: Outcome,
        done: Processed,
    ) -> Verdict {
        let shared = Rc::clone(&self.shared);
        let cfg = &shared.config;
        let decided_us = done.decided_us;
        if outcome.images.is_empty() {
            // No image: nothing to report to the traffic state. Audio and
            // video parts still go to the encoder first.
            record_media(svc, &outcome);
            if outcome.media.any() && cfg.encode_cluster.is_some() {
                let idle = TrafficSnapshot::idle();
                return self.start_encoding(host, svc, &body, report_of(&outcome, 0), &idle, None);
            }
            let plan = match self.prefill_plan(&body) {
                Ok(plan) => plan,
                Err(e) => return self.fail(host, svc, e),
            };
            self.release_encode_work(svc);
            return self.proceed(host, svc, report_of(&outcome, 0), None, plan, false);
        }
        if let Some(new_body) = &outcome.body {
            host.replace_request_body(body_size, new_body);
        }
        record(svc, &outcome, done.transcode_us);
        let mut report = report_of(&outcome, done.transcode_us);
        if let Some(how) = done.offload {
            report.headers.push((HEADER_OFFLOAD, how.to_string()));
        }
        let images = outcome.images.len() as u64;
        let tokens = outcome.tokens_after();
        let window = cfg.rate_window_s;
        // In offload mode this is the round trip to the service (and any
        // fallback): what the dynamic policy's transcode term should predict.
        let (transcode_ms, resized_mpixels) = (done.transcode_us as f64 / 1000.0, outcome.resized_mpixels());
        let state = svc.update(&mut |s| {
            s.record_arrival(decided_us, images, tokens, window);
            s.record_transcode(transcode_ms, resized_mpixels);
        });
        svc.publish(&state, GaugeSet::RATES.with(GaugeSet::CALIBRATION));
        // The prefill/decode work this request brings, by the factors now.
        let factors = TrafficSnapshot {
            calibration: state.calibration,
            pd_calibration: state.pd_calibration,
            ..TrafficSnapshot::idle()
        };
        let text_tokens = outcome.text_bytes as f64 / cfg.text_bytes_per_token;
        let pd_work_ms = shared
            .params
            .pd_work_ms(&factors, tokens as f64 + text_tokens, tokens as f64);
        let timed = Timed {
            tokens,
            prediction: outcome.prediction,
            pd_work_us: (pd_work_ms * 1000.0) as i64,
            handoff_ms: shared.params.handoff_ms(tokens as f64 + text_tokens),
            fallback: false,
        };
        let final_body = outcome.body.unwrap_or(body);
        if cfg.encode_cluster.is_none() {
            // The body was parsed, so its prefill request cannot fail.
            let plan = self.prefill_plan(&final_body).unwrap_or_default();
            return self.proceed(host, svc, report, Some(timed), plan, false);
        }
        let traffic = done.seen.unwrap_or_else(|| shared.snapshot(svc, decided_us));
        self.start_encoding(host, svc, &final_body, report, &traffic, Some(timed))
    }

    /// The prefill call for `body` (the body decode gets), when prefill
    /// and decode are split.
    fn prefill_plan(&self, body: &[u8]) -> Result<Option<PrefillPlan>, FilterError> {
        if self.shared.config.prefill_cluster.is_none() {
            return Ok(None);
        }
        let request = prefill_request(body).map_err(|e| match e {
            RequestError::Json(e) => FilterError::InvalidJson(e),
            RequestError::Schema(e) => FilterError::InvalidRequest(e),
        })?;
        Ok(Some(PrefillPlan {
            request,
            body_len: body.len(),
        }))
    }

    /// Request trailers end the body (Envoy's decompressor adds some): the
    /// buffered body is decided now.
    pub fn on_request_trailers(&mut self, host: &mut dyn HttpHost, svc: &dyn Services) -> Verdict {
        let size = self.buffered;
        self.on_request_body(host, svc, size, true)
    }

    /// The request continues to prefill/decode. A request with images
    /// (`timed`) counts as in flight there until it is done, and as pending
    /// (with its predicted work) until its first token.
    fn forward(
        &mut self,
        host: &mut dyn HttpHost,
        svc: &dyn Services,
        report: Report,
        timed: Option<Timed>,
    ) -> Verdict {
        self.state = State::Forwarded(report);
        if let Some(timed) = timed {
            self.hold_pd(host, svc, timed);
        }
        Verdict::Continue
    }

    /// The request's prefill work is now the prefill side's (the route's
    /// cluster, or the prefill cluster of a split): counted in flight there
    /// until done, and pending until its first token.
    fn hold_pd(&mut self, host: &mut dyn HttpHost, svc: &dyn Services, timed: Timed) {
        if self.held.pd {
            return;
        }
        let work = timed.pd_work_us.max(0);
        self.held.pd = true;
        self.held.pd_pending = true;
        self.held.pd_work_us = work;
        let state = svc.update(&mut |s| {
            s.pd_inflight += 1;
            s.pd_pending += 1;
            s.pd_outstanding_us += work;
        });
        svc.publish(&state, GaugeSet::PD);
        let backlog_ms = (state.pd_outstanding_us - work).max(0) as f64 / 1000.0;
        self.watch = Some(Watch {
            timed,
            forwarded_us: host.now_micros(),
            pd_predicted_ms: backlog_ms / f64::from(self.shared.params.pd_replicas.max(1))
                + work as f64 / 1000.0
                + timed.handoff_ms,
        });
    }

    /// After the encoder (or without one): to decode through the prefill
    /// call when there is one, else straight on. `resume`: the request is
    /// paused and must be resumed to go on.
    fn proceed(
        &mut self,
        host: &mut dyn HttpHost,
        svc: &dyn Services,
        report: Report,
        timed: Option<Timed>,
        plan: Option<PrefillPlan>,
        resume: bool,
    ) -> Verdict {
        let Some(plan) = plan else {
            let verdict = self.forward(host, svc, report, timed);
            if resume {
                host.resume_request();
            }
            return verdict;
        };
        if let Some(timed) = timed {
            self.hold_pd(host, svc, timed);
        }
        let mut pre = Prefilling {
            report,
            plan,
            pending: None,
            calls: 0,
            started_us: host.now_micros(),
        };
        match self.send_prefill(host, svc, &mut pre, 0) {
            Ok(()) => {
                self.state = State::Prefilling(pre);
                Verdict::Pause
            }
            Err(why) => self.prefill_failed(host, svc, pre, &why, resume),
        }
    }

    /// Dispatches the prefill call (attempt `attempt`).
    fn send_prefill(
        &mut self,
        host: &mut dyn HttpHost,
        svc: &dyn Services,
        pre: &mut Prefilling,
        attempt: u64,
    ) -> Result<(), String> {
        let cfg = &self.shared.config;
        let Some(cluster) = cfg.prefill_cluster.as_deref() else {
            return Err("no prefill cluster".into());
        };
        let call = EncodeCall {
            cluster,
            authority: &cfg.prefill_authority,
            path: &cfg.prefill_path,
            request_id: self.request_id.as_deref().unwrap_or_default(),
            body: &pre.plan.request,
            timeout_ms: cfg.prefill_timeout_ms,
        };
        svc.add(Counter::PrefillCalls, 1);
        pre.calls += 1;
        match host.dispatch(&call) {
            Ok(token) => {
                pre.pending = Some((token, attempt));
                Ok(())
            }
            Err(e) => {
                log::warn!("vlm-budget: prefill dispatch to {cluster} refused: {e}");
                Err(format!("dispatch refused: {e}"))
            }
        }
    }

    /// A dispatched call answered: a transcode call, the prefill call or an
    /// encode call, by the state the request is in (`status`: the HTTP
    /// status, `None` when the call itself failed; `body_size`: the size of
    /// the answer's body).
    pub fn on_call_response(
        &mut self,
        host: &mut dyn HttpHost,
        svc: &dyn Services,
        token: u32,
        status: Option<u32>,
        body_size: usize,
    ) -> Verdict {
        match self.state {
            State::Transcoding(_) => self.on_transcode_response(host, svc, token, status, body_size),
            State::Prefilling(_) => self.on_prefill_response(host, svc, token, status, body_size),
            _ => self.on_encode_response(host, svc, token, status),
        }
    }

    /// The prefill call answered: its `kv_transfer_params` go into the
    /// decode request; a failure is retried, then fails the request or
    /// falls back to decode alone.
    fn on_prefill_response(
        &mut self,
        host: &mut dyn HttpHost,
        svc: &dyn Services,
        token: u32,
        status: Option<u32>,
        body_size: usize,
    ) -> Verdict {
        let State::Prefilling(mut pre) = std::mem::replace(&mut self.state, State::Bypass) else {
            return Verdict::Continue;
        };
        let Some((_, attempt)) = pre.pending.filter(|p| p.0 == token) else {
            self.state = State::Prefilling(pre);
            return Verdict::Continue;
        };
        pre.pending = None;
        let answer = match status {
            Some(s) if (200..300).contains(&s) => {
                let body = host.call_response_body(body_size).unwrap_or_default();
                answer_kv_params(&body)
                    .map(|kv| kv.map(<[u8]>::to_vec))
                    .map_err(|e| e.to_string())
            }
            Some(s) => Err(format!("HTTP {s}")),
            None => Err("call failed".to_string()),
        };
        let why = match answer {
            Ok(kv) => return self.prefilled(host, svc, pre, kv),
            Err(why) => why,
        };
        // A 4xx is the request's fault and would fail again; an unreadable
        // 2xx answer is the server's.
        let again = status.is_some_and(|s| (200..300).contains(&s)) || retriable(status);
        if again && attempt < self.shared.config.prefill_retries {
            log::debug!("vlm-budget: prefill call failed ({why}); retrying");
            svc.add(Counter::PrefillRetries, 1);
            match self.send_prefill(host, svc, &mut pre, attempt + 1) {
                Ok(()) => {
                    self.state = State::Prefilling(pre);
                    return Verdict::Pause;
                }
                Err(e) => return self.prefill_failed(host, svc, pre, &e, true),
            }
        }
        self.prefill_failed(host, svc, pre, &why, true)
    }

    /// The prefill answered: decode gets the body with its
    /// `kv_transfer_params` (the body as it is when it has none).
    fn prefilled(
        &mut self,
        host: &mut dyn HttpHost,
        svc: &dyn Services,
        pre: Prefilling,
        kv: Option<Vec<u8>>,
    ) -> Verdict {
        let mut report = pre.report.clone();
        let transfer = match &kv {
            Some(kv) => {
                let len = pre.plan.body_len;
                let spliced = host
                    .request_body(len)
                    .ok_or_else(|| "request body unavailable".to_string())
                    .and_then(|b| decode_request(&b, kv).map_err(|e| e.to_string()));
                match spliced {
                    Ok(body) => host.replace_request_body(len, &body),
                    Err(why) => return self.prefill_failed(host, svc, pre, &why, true),
                }
                "spliced"
            }
            None => "absent",
        };
        let elapsed_ms = host.now_micros().saturating_sub(pre.started_us) / 1000;
        report.headers.push((HEADER_PREFILL, "ok".to_string()));
        report.headers.push((HEADER_PREFILL_MS, elapsed_ms.to_string()));
        report.headers.push((HEADER_PREFILL_CALLS, pre.calls.to_string()));
        report.headers.push((HEADER_KV_TRANSFER, transfer.to_string()));
        let verdict = self.forward(host, svc, report, None);
        host.resume_request();
        verdict
    }

    /// The prefill failed after the retries: 502, or (`fallback`) decode
    /// gets the body as it is and prefills itself.
    fn prefill_failed(
        &mut self,
        host: &mut dyn HttpHost,
        svc: &dyn Services,
        pre: Prefilling,
        why: &str,
        resume: bool,
    ) -> Verdict {
        svc.add(Counter::PrefillFailures, 1);
        if self.shared.config.prefill_failure == PrefillFailure::Fail {
            let detail = format!("prefill failed after {} calls: {why}", pre.calls);
            return self.reply_error(host, svc, FilterError::PrefillUnavailable(detail));
        }
        svc.add(Counter::PrefillFallbacks, 1);
        log::warn!("vlm-budget: prefill failed ({why}); decode will prefill the request itself");
        // Not the path that was predicted: no sample.
        if let Some(w) = &mut self.watch {
            w.timed.fallback = true;
        }
        let mut report = pre.report;
        let elapsed_ms = host.now_micros().saturating_sub(pre.started_us) / 1000;
        report.headers.push((HEADER_PREFILL, "fallback".to_string()));
        report.headers.push((HEADER_PREFILL_MS, elapsed_ms.to_string()));
        report.headers.push((HEADER_PREFILL_CALLS, pre.calls.to_string()));
        let verdict = self.forward(host, svc, report, None);
        if resume {
            host.resume_request();
        }
        verdict
    }

    /// Sends the encode calls; the request waits for their answers.
    fn start_encoding(
        &mut self,
        host: &mut dyn HttpHost,
        svc: &dyn Services,
        body: &[u8],
        report: Report,
        traffic: &TrafficSnapshot,
        timed: Option<Timed>,
    ) -> Verdict {
        // The body was parsed, so its prefill request cannot fail.
        let prefill = self.prefill_plan(body).unwrap_or_default();
        let bodies = match encode_requests(body, self.shared.config.encode_fanout) {
            Ok(b) if !b.is_empty() => b,
            // The body was just parsed, so this cannot fail; go on as is.
            _ => {
                self.release_encode_work(svc);
                return self.proceed(host, svc, report, timed, prefill, false);
            }
        };
        let params = &self.shared.params;
        // Only images are predicted (audio and video only: no work counted,
        // nothing to calibrate).
        let work_ms = timed.map_or(0.0, |t| {
            traffic.calibration * params.encode.predict(t.tokens as f64)
        });
        let work_us = (work_ms * 1000.0) as i64;
        // What the decision reserved becomes the work of the tokens kept.
        let delta = work_us - std::mem::replace(&mut self.held.encode_work_us, work_us);
        let state = svc.update(&mut |s| s.encode_outstanding_us += delta);
        svc.publish(&state, GaugeSet::ENCODE);
        let mut enc = Encoding {
            report,
            bodies,
            pending: Vec::new(),
            failed: Vec::new(),
            calls: 0,
            started_us: host.now_micros(),
            predicted_ms: params.queue_wait_ms(traffic) + work_ms,
            timed,
            prefill,
        };
        for index in 0..enc.bodies.len() {
            self.send(host, svc, &mut enc, index, 0);
        }
        self.state = State::Encoding(enc);
        self.after_encode_event(host, svc, false)
    }

    /// Gives back the encoder work this request holds in the backlog.
    fn release_encode_work(&mut self, svc: &dyn Services) {
        let work = std::mem::take(&mut self.held.encode_work_us);
        if work != 0 {
            let state = svc.update(&mut |s| s.encode_outstanding_us -= work);
            svc.publish(&state, GaugeSet::ENCODE);
        }
    }

    /// Dispatches body `index` (attempt `attempt`); a dispatch the host
    /// refuses outright (unknown cluster) fails that body at once.
    fn send(
        &mut self,
        host: &mut dyn HttpHost,
        svc: &dyn Services,
        enc: &mut Encoding,
        index: usize,
        attempt: u64,
    ) {
        let cfg = &self.shared.config;
        let Some(cluster) = cfg.encode_cluster.as_deref() else {
            return;
        };
        let call = EncodeCall {
            cluster,
            authority: &cfg.encode_authority,
            path: &cfg.encode_path,
            request_id: self.request_id.as_deref().unwrap_or_default(),
            body: &enc.bodies[index],
            timeout_ms: cfg.encode_timeout_ms,
        };
        svc.add(Counter::EncodeCalls, 1);
        enc.calls += 1;
        match host.dispatch(&call) {
            Ok(token) => {
                enc.pending.push((token, index, attempt));
                self.held.encode_calls += 1;
                let state = svc.update(&mut |s| s.encode_inflight += 1);
                svc.publish(&state, GaugeSet::ENCODE);
            }
            Err(e) => {
                log::warn!("vlm-budget: encode dispatch to {cluster} refused: {e}");
                enc.failed.push((index, format!("dispatch refused: {e}")));
            }
        }
    }

    /// An encode call answered (`status`: the HTTP status, `None` when the
    /// call itself failed).
    pub fn on_encode_response(
        &mut self,
        host: &mut dyn HttpHost,
        svc: &dyn Services,
        token: u32,
        status: Option<u32>,
    ) -> Verdict {
        let State::Encoding(mut enc) = std::mem::replace(&mut self.state, State::Bypass) else {
            return Verdict::Continue;
        };
        let Some(pos) = enc.pending.iter().position(|p| p.0 == token) else {
            self.state = State::Encoding(enc);
            return Verdict::Continue;
        };
        let (_, index, attempt) = enc.pending.swap_remove(pos);
        self.held.encode_calls -= 1;
        let state = svc.update(&mut |s| s.encode_inflight -= 1);
        svc.publish(&state, GaugeSet::ENCODE);
        if !status.is_some_and(|s| (200..300).contains(&s)) {
            let why = status.map_or_else(|| "call failed".to_string(), |s| format!("HTTP {s}"));
            // A 4xx is the request's fault and would fail again: only
            // server errors, timeouts (504) and failed calls are retried.
            if retriable(status) && attempt < self.shared.config.encode_retries {
                log::debug!("vlm-budget: encode call failed ({why}); retrying");
                svc.add(Counter::EncodeRetries, 1);
                self.send(host, svc, &mut enc, index, attempt + 1);
            } else {
                enc.failed.push((index, why));
            }
        }
        self.state = State::Encoding(enc);
        self.after_encode_event(host, svc, true)
    }

    /// Resumes, fails or keeps waiting, once the calls' state has changed.
    fn after_encode_event(&mut self, host: &mut dyn HttpHost, svc: &dyn Services, resume: bool) -> Verdict {
        let State::Encoding(enc) = &self.state else {
            return Verdict::Continue;
        };
        let fail_fast = self.shared.config.encode_failure == EncodeFailure::Fail && !enc.failed.is_empty();
        if !enc.pending.is_empty() && !fail_fast {
            return Verdict::Pause;
        }
        let State::Encoding(enc) = std::mem::replace(&mut self.state, State::Bypass) else {
            return Verdict::Continue;
        };
        let elapsed_us = host.now_micros().saturating_sub(enc.started_us);
        let elapsed_ms = elapsed_us / 1000;
        svc.encode_ms(elapsed_ms);
        // The encoder has this request's work behind it now.
        let work = std::mem::take(&mut self.held.encode_work_us);
        let cal = &self.shared.config.calibration;
        let calibrate = cal.enabled && enc.failed.is_empty() && enc.timed.is_some();
        let (alpha, min, max) = (cal.alpha, cal.min_factor, cal.max_factor);
        let observed = elapsed_us as f64 / 1000.0;
        let state = svc.update(&mut |s| {
            s.encode_outstanding_us -= work;
            if calibrate {
                s.calibrate(observed, enc.predicted_ms, alpha, min, max);
            }
        });
        svc.publish(&state, GaugeSet::ENCODE.with(GaugeSet::CALIBRATION));
        let mut report = enc.report;
        let outcome = if enc.failed.is_empty() {
            "ok"
        } else {
            svc.add(Counter::EncodeFailures, 1);
            if self.shared.config.encode_failure == EncodeFailure::Fail {
                let (index, why) = &enc.failed[0];
                let detail = format!("encode request {index} failed after retries: {why}");
                return self.reply_error(host, svc, FilterError::EncoderUnavailable(detail));
            }
            svc.add(Counter::EncodeFallbacks, 1);
            log::warn!("vlm-budget: encoder failed; prefill/decode will encode the images itself");
            "fallback"
        };
        report.headers.push((HEADER_ENCODE, outcome.to_string()));
        report.headers.push((HEADER_ENCODE_MS, elapsed_ms.to_string()));
        report.headers.push((HEADER_ENCODE_CALLS, enc.calls.to_string()));
        let timed = enc.timed.map(|t| Timed {
            fallback: !enc.failed.is_empty(),
            ..t
        });
        self.proceed(host, svc, report, timed, enc.prefill, resume)
    }

    /// Sends each image of the plan to the transcode service; the request
    /// waits for the answers. A dispatch the host refuses leaves its image
    /// to the filter.
    fn start_transcoding(
        &mut self,
        host: &mut dyn HttpHost,
        svc: &dyn Services,
        mut req: Transcoding,
    ) -> Verdict {
        let shared = Rc::clone(&self.shared);
        let cfg = &shared.config;
        let opts = cfg.transcode_options();
        for (i, job) in req.plan.jobs.iter().enumerate() {
            let Some(cluster) = cfg.transcode_cluster.as_deref() else {
                req.failed.push((i, "no transcode_cluster".into()));
                continue;
            };
            let target = Target {
                to: job.to,
                jpeg_quality: opts.jpeg_quality,
                filter: opts.filter,
            };
            let headers = target.headers();
            let call = TranscodeCall {
                cluster,
                authority: &cfg.transcode_authority,
                path: offload::PATH,
                content_type: job.header.format.mime(),
                headers: &headers,
                body: &job.payload,
                timeout_ms: cfg.transcode_timeout_ms,
            };
            match host.dispatch_transcode(&call) {
                Ok(token) => req.pending.push((token, i)),
                Err(e) => req
                    .failed
                    .push((i, format!("dispatch to {cluster} refused: {e}"))),
            }
        }
        self.state = State::Transcoding(Box::new(req));
        self.after_transcode_event(host, svc, false)
    }

    /// A transcode call answered (`status`: the HTTP status, `None` when the
    /// call itself failed; `body_size`: bytes of its body).
    fn on_transcode_response(
        &mut self,
        host: &mut dyn HttpHost,
        svc: &dyn Services,
        token: u32,
        status: Option<u32>,
        body_size: usize,
    ) -> Verdict {
        let limit = usize::try_from(self.shared.config.max_body_bytes).unwrap_or(usize::MAX);
        let State::Transcoding(req) = &mut self.state else {
            return Verdict::Continue;
        };
        let Some(pos) = req.pending.iter().position(|p| p.0 == token) else {
            return Verdict::Continue;
        };
        let (_, i) = req.pending.swap_remove(pos);
        let Some(job) = req.plan.jobs.get(i) else {
            return self.after_transcode_event(host, svc, true);
        };
        let answer = if body_size > limit {
            Err(AnswerError::TooLarge {
                len: body_size,
                limit,
            })
        } else {
            let body = status
                .is_some_and(|s| s == 200)
                .then(|| host.call_response_body(body_size));
            check_answer(status, body.flatten(), job.header.format, job.to, limit)
        };
        match answer {
            Ok(bytes) => {
                let took = host.now_micros().saturating_sub(req.started_us);
                if let Some(slot) = req.done.get_mut(i) {
                    *slot = Some((job.url(&bytes), took));
                }
            }
            Err(e) => req.failed.push((i, e.to_string())),
        }
        self.after_transcode_event(host, svc, true)
    }

    /// Once no call is out: every image the service did not shrink is
    /// shrunk here, then the request goes on as an in-filter one would.
    fn after_transcode_event(
        &mut self,
        host: &mut dyn HttpHost,
        svc: &dyn Services,
        resume: bool,
    ) -> Verdict {
        match &self.state {
            State::Transcoding(req) if req.pending.is_empty() => {}
            State::Transcoding(_) => return Verdict::Pause,
            _ => return Verdict::Continue,
        }
        let State::Transcoding(req) = std::mem::replace(&mut self.state, State::Bypass) else {
            return Verdict::Continue;
        };
        let mut req = *req;
        let opts = self.shared.config.transcode_options();
        let mut fallbacks = 0;
        for (i, job) in req.plan.jobs.iter().enumerate() {
            let Some(slot) = req.done.get_mut(i) else {
                continue;
            };
            if slot.is_some() {
                continue;
            }
            let why = req
                .failed
                .iter()
                .find(|f| f.0 == i)
                .map_or("no answer", |f| f.1.as_str());
            log::warn!(
                "vlm-budget: offload of image {} failed ({why}); shrinking it here",
                job.index
            );
            let started = host.now_micros();
            match job.transcode(&job.payload, &opts) {
                Ok(out) => *slot = Some((job.url(&out), host.now_micros().saturating_sub(started))),
                Err(e) => {
                    let verdict = self.fail(host, svc, e);
                    if resume && verdict == Verdict::Continue {
                        host.resume_request();
                    }
                    return verdict;
                }
            }
            fallbacks += 1;
        }
        let offloaded = req.plan.jobs.len() as u64 - fallbacks;
        svc.add(Counter::TranscodeOffloads, offloaded);
        if fallbacks > 0 {
            svc.add(Counter::TranscodeFallbacks, fallbacks);
        }
        let done = req.done.into_iter().flatten().collect();
        let processed = Processed {
            decided_us: req.decided_us,
            seen: req.seen,
            transcode_us: host.now_micros().saturating_sub(req.started_us),
            offload: Some(if fallbacks == 0 { "offload" } else { "fallback" }),
        };
        let outcome = req.plan.finish(&req.body, done);
        let verdict = self.after_process(host, svc, req.body, req.body_size, outcome, processed);
        if resume && verdict == Verdict::Continue {
            host.resume_request();
        }
        verdict
    }

    /// The answer's headers: the report goes on them; a request with images
    /// is timed to here (non-streamed answer) or to its first streamed
    /// token. An answer that is not 2xx gives no sample.
    pub fn on_response_headers(&mut self, host: &mut dyn HttpHost, svc: &dyn Services) -> Verdict {
        let State::Forwarded(report) = std::mem::replace(&mut self.state, State::Answered) else {
            return Verdict::Continue;
        };
        for (name, value) in &report.headers {
            host.add_response_header(name, value);
        }
        if self.watch.is_none() {
            return Verdict::Continue;
        }
        let headers = host.response_headers();
        let ok = headers.get(":status").is_some_and(|s| s.starts_with('2'));
        let streamed = headers
            .get("content-type")
            .is_some_and(|c| c.trim_start().starts_with("text/event-stream"));
        if !ok {
            self.watch = None;
            self.release_pending(svc, None);
        } else if streamed {
            self.state = State::Streaming(FirstToken::default());
        } else {
            // A plain answer comes whole: its headers time the answer, not
            // the first token, so it is measured but teaches the model
            // nothing.
            if let Some(w) = &mut self.watch {
                w.timed.prediction = None;
            }
            self.first_token(host, svc);
        }
        Verdict::Continue
    }

    /// A piece of a streamed answer: looks for its first token. A stream
    /// that ends without one gives no sample.
    pub fn on_response_body(
        &mut self,
        host: &mut dyn HttpHost,
        svc: &dyn Services,
        body_size: usize,
        end_of_stream: bool,
    ) -> Verdict {
        let State::Streaming(scan) = &mut self.state else {
            return Verdict::Continue;
        };
        let found = host.response_body(body_size).is_some_and(|b| scan.feed(&b));
        if found {
            self.state = State::Answered;
            self.first_token(host, svc);
        } else if end_of_stream {
            self.state = State::Answered;
            self.watch = None;
            self.release_pending(svc, None);
        }
        Verdict::Continue
    }

    /// The first token is here: the request's TTFT is measured, its
    /// prefill/decode work leaves the pending backlog, and the dynamic
    /// policy learns from how far the prediction was off.
    fn first_token(&mut self, host: &mut dyn HttpHost, svc: &dyn Services) {
        let Some(watch) = self.watch.take() else {
            return;
        };
        if watch.timed.fallback {
            self.release_pending(svc, None);
            return;
        }
        let now = host.now_micros();
        let cfg = &self.shared.config;
        let observed = now.saturating_sub(self.arrived_us) as f64 / 1000.0;
        let pd_phase = now.saturating_sub(watch.forwarded_us) as f64 / 1000.0;
        let error = watch.timed.prediction.map(|p| observed - p.terms.total());
        svc.ttft_ms(observed, error);
        svc.add(Counter::TtftSamples, 1);
        let slo = self.slo_ms.unwrap_or(cfg.ttft_slo_ms as f64);
        if observed > slo {
            svc.add(Counter::SloMisses, 1);
        }
        let learn = (cfg.calibration.enabled && watch.timed.prediction.is_some())
            .then_some((pd_phase, watch.pd_predicted_ms));
        self.release_pending(svc, learn);
        if let Some(e) = error {
            let window = self.shared.margin.window_s;
            let tokens = watch.timed.tokens;
            let (missed, percentile) = (observed > slo, self.shared.margin.percentile);
            let h = svc.update_residuals(&mut |h| {
                h.record(e, tokens, now, window);
                h.record_outcome(missed, percentile, now, window, slo / 4.0);
            });
            svc.margin(self.shared.margin.margin(&h));
        }
    }

    /// The request leaves the pending backlog at prefill/decode; `learn`
    /// (observed, predicted forward-to-first-token ms) calibrates the
    /// prefill side's factor in the same update.
    fn release_pending(&mut self, svc: &dyn Services, learn: Option<(f64, f64)>) {
        if !self.held.pd_pending {
            return;
        }
        self.held.pd_pending = false;
        let work = std::mem::take(&mut self.held.pd_work_us);
        let cal = &self.shared.config.calibration;
        let (alpha, min, max) = (cal.alpha, cal.min_factor, cal.max_factor);
        let state = svc.update(&mut |s| {
            s.pd_pending -= 1;
            s.pd_outstanding_us -= work;
            if let Some((observed, predicted)) = learn {
                s.calibrate_pd(observed, predicted, alpha, min, max);
            }
        });
        let changed = if learn.is_some() {
            GaugeSet::PD.with(GaugeSet::CALIBRATION)
        } else {
            GaugeSet::PD
        };
        svc.publish(&state, changed);
    }

    /// The stream is over (answered, failed, or reset by either side):
    /// release whatever this request still holds.
    pub fn on_done(&mut self, svc: &dyn Services) {
        self.watch = None;
        let held = std::mem::take(&mut self.held);
        if held == Held::default() {
            return;
        }
        let state = svc.update(&mut |s: &mut TrafficState| {
            s.encode_inflight -= held.encode_calls;
            s.encode_outstanding_us -= held.encode_work_us;
            s.pd_inflight -= i64::from(held.pd);
            s.pd_pending -= i64::from(held.pd_pending);
            s.pd_outstanding_us -= held.pd_work_us;
        });
        svc.publish(&state, GaugeSet::PD.with(GaugeSet::ENCODE));
    }

    fn fail(&mut self, host: &mut dyn HttpHost, svc: &dyn Services, err: FilterError) -> Verdict {
        if self.shared.config.fail_open {
            svc.error(err.code());
            log::warn!("vlm-budget: forwarding unchanged (fail_open): {err}");
            svc.add(Counter::FailOpen, 1);
            let policy = self.shared.config.policy.name();
            let report = Report {
                headers: vec![
                    (HEADER_POLICY, policy.to_string()),
                    (HEADER_FAIL_OPEN, err.code().to_string()),
                ],
            };
            return self.forward(host, svc, report, None);
        }
        self.reply_error(host, svc, err)
    }

    fn reply_error(&mut self, host: &mut dyn HttpHost, svc: &dyn Services, err: FilterError) -> Verdict {
        svc.error(err.code());
        log::info!("vlm-budget: rejecting request: {}", err.code());
        let policy = self.shared.config.policy.name();
        host.send_local_reply(
            err.status(),
            &[("content-type", "application/json"), (HEADER_POLICY, policy)],
            &err.to_json(),
        );
        self.state = State::Replied;
        Verdict::Pause
    }
}

/// Whether a failed encode call is worth another attempt: a server error
/// or a call that got no answer (reset, refused connection), as vLLM's
/// disaggregation proxy retries.
fn retriable(status: Option<u32>) -> bool {
    status.is_none_or(|s| s >= 500)
}

fn record(svc: &dyn Services, o: &Outcome, transcode_us: u64) {
    record_media(svc, o);
    let resized = o.resized() as u64;
    let passed = o
        .images
        .iter()
        .filter(|i| matches!(i.action, ImageAction::Passed { .. }))
        .count() as u64;
    svc.add(Counter::ImagesResized, resized);
    svc.add(Counter::ImagesPassed, passed);
    svc.add(Counter::VisualTokensBefore, o.tokens_before());
    svc.add(Counter::VisualTokensAfter, o.tokens_after());
    if resized > 0 {
        svc.transcode_ms(transcode_us / 1000);
    }
}

/// Counts the audio and video parts of a request.
fn record_media(svc: &dyn Services, o: &Outcome) {
    if o.media.audio > 0 {
        svc.add(Counter::AudioParts, o.media.audio as u64);
    }
    if o.media.video > 0 {
        svc.add(Counter::VideoParts, o.media.video as u64);
    }
}

fn media_headers(o: &Outcome, headers: &mut Vec<(&'static str, String)>) {
    if o.media.audio > 0 {
        headers.push((HEADER_AUDIO, o.media.audio.to_string()));
    }
    if o.media.video > 0 {
        headers.push((HEADER_VIDEO, o.media.video.to_string()));
    }
}

fn report_of(o: &Outcome, transcode_us: u64) -> Report {
    if o.images.is_empty() {
        let mut headers = vec![
            (HEADER_POLICY, o.policy.name().to_string()),
            (HEADER_IMAGES, "0".to_string()),
        ];
        media_headers(o, &mut headers);
        return Report { headers };
    }
    let mut headers = vec![
        (HEADER_POLICY, o.policy.name().to_string()),
        (HEADER_BUDGET, o.budget_tokens.to_string()),
        (HEADER_BEFORE, o.tokens_before().to_string()),
        (HEADER_AFTER, o.tokens_after().to_string()),
        (HEADER_IMAGES, o.images.len().to_string()),
        (HEADER_RESIZED, o.resized().to_string()),
        (HEADER_TRANSCODE, format!("{:.1}", transcode_us as f64 / 1000.0)),
    ];
    media_headers(o, &mut headers);
    if let Some(reason) = o.reason {
        headers.push((HEADER_REASON, reason.to_string()));
    }
    if let Some(p) = o.prediction {
        headers.push((HEADER_PREDICTED_TTFT, format!("{:.0}", p.terms.total())));
        headers.push((HEADER_MARGIN, format!("{:.0}", p.margin_ms)));
        headers.push((HEADER_TERMS, p.terms.header(p.margin_ms)));
    }
    Report { headers }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::residual::{Margin, ResidualHistogram};
    use crate::filter::host::{Metrics, RequestHeaders, Traffic};
    use std::cell::RefCell;
    use std::collections::HashMap;

    /// A transcode call as sent: (token, headers, body).
    type TranscodeSent = (u32, Vec<(String, String)>, Vec<u8>);

    #[derive(Default)]
    struct FakeHost {
        req_headers: HashMap<String, String>,
        body: Vec<u8>,
        resp_headers: Vec<(String, String)>,
        reply: Option<(u32, Vec<u8>)>,
        /// (token, cluster, request id, body) of each dispatch.
        calls: Vec<(u32, String, String, Vec<u8>)>,
        refuse_dispatch: bool,
        resumed: u32,
        /// The answer's headers and the current piece of its body.
        answer_headers: Vec<(String, String)>,
        answer_piece: Vec<u8>,
        /// The clock, µs (advanced by the tests).
        now: Cell<u64>,
        /// (token, headers, body) of each transcode call.
        transcodes: Vec<TranscodeSent>,
        refuse_transcode: bool,
        /// The body of the call answer being delivered.
        call_answer: Vec<u8>,
    }

    impl HttpHost for FakeHost {
        fn request_headers(&self) -> RequestHeaders {
            RequestHeaders::new(
                self.req_headers
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
                    .collect(),
            )
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
            self.now.get()
        }
        fn response_headers(&self) -> RequestHeaders {
            RequestHeaders::new(
                self.answer_headers
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
                    .collect(),
            )
        }
        fn response_body(&self, size: usize) -> Option<Vec<u8>> {
            self.answer_piece.get(..size).map(<[u8]>::to_vec)
        }
        fn set_request_header(&mut self, name: &str, value: &str) {
            self.req_headers.insert(name.into(), value.into());
        }
        fn new_request_id(&mut self) -> String {
            "generated-id".into()
        }
        fn dispatch(&mut self, call: &EncodeCall<'_>) -> Result<u32, String> {
            if self.refuse_dispatch {
                return Err("BadArgument".into());
            }
            let token = 100 + self.calls.len() as u32;
            self.calls.push((
                token,
                call.cluster.into(),
                call.request_id.into(),
                call.body.to_vec(),
            ));
            Ok(token)
        }
        fn resume_request(&mut self) {
            self.resumed += 1;
        }
        fn dispatch_transcode(&mut self, call: &TranscodeCall<'_>) -> Result<u32, String> {
            if self.refuse_transcode {
                return Err("BadArgument".into());
            }
            let token = 500 + self.transcodes.len() as u32;
            let mut headers: Vec<(String, String)> = call
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect();
            headers.push(("content-type".into(), call.content_type.into()));
            headers.push((":authority".into(), call.authority.into()));
            headers.push((":path".into(), call.path.into()));
            self.transcodes.push((token, headers, call.body.to_vec()));
            Ok(token)
        }
        fn call_response_body(&self, size: usize) -> Option<Vec<u8>> {
            self.call_answer.get(..size).map(<[u8]>::to_vec)
        }
    }

    #[derive(Default)]
    struct FakeMetrics {
        counts: RefCell<HashMap<String, u64>>,
        traffic: RefCell<TrafficState>,
        /// Reads and updates of the shared traffic state by the filter.
        traffic_calls: Cell<u32>,
        residuals: RefCell<ResidualHistogram>,
        /// Measured TTFTs: (observed, observed - predicted).
        ttfts: RefCell<Vec<(f64, Option<f64>)>>,
    }

    impl FakeMetrics {
        /// The shared state, as a test reads it (not counted).
        fn state(&self) -> TrafficState {
            *self.traffic.borrow()
        }
    }

    impl Traffic for FakeMetrics {
        fn state(&self) -> TrafficState {
            self.traffic_calls.set(self.traffic_calls.get() + 1);
            *self.traffic.borrow()
        }
        fn cluster(&self) -> Option<crate::core::traffic::ClusterSignal> {
            self.traffic_calls.set(self.traffic_calls.get() + 1);
            None
        }
        fn pd_cluster(&self) -> Option<crate::core::traffic::ClusterSignal> {
            self.traffic_calls.set(self.traffic_calls.get() + 1);
            None
        }
        fn residuals(&self) -> ResidualHistogram {
            self.traffic_calls.set(self.traffic_calls.get() + 1);
            self.residuals.borrow().clone()
        }
        fn update_residuals(&self, op: &mut dyn FnMut(&mut ResidualHistogram)) -> ResidualHistogram {
            self.traffic_calls.set(self.traffic_calls.get() + 1);
            op(&mut self.residuals.borrow_mut());
            self.residuals.borrow().clone()
        }
        fn update(&self, op: &mut dyn FnMut(&mut TrafficState)) -> TrafficState {
            self.traffic_calls.set(self.traffic_calls.get() + 1);
            op(&mut self.traffic.borrow_mut());
            *self.traffic.borrow()
        }
    }

    impl Services for FakeMetrics {
        fn publish(&self, _state: &TrafficState, _changed: GaugeSet) {}
    }

    impl Metrics for FakeMetrics {
        fn add(&self, c: Counter, n: u64) {
            *self.counts.borrow_mut().entry(c.name().into()).or_default() += n;
        }
        fn error(&self, code: &'static str) {
            *self.counts.borrow_mut().entry(code.into()).or_default() += 1;
        }
        fn transcode_ms(&self, _ms: u64) {}
        fn encode_ms(&self, _ms: u64) {}
        fn ttft_ms(&self, observed_ms: f64, error_ms: Option<f64>) {
            self.ttfts.borrow_mut().push((observed_ms, error_ms));
        }
        fn margin(&self, _m: Margin) {}
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
        f.on_response_headers(&mut h, &m);
        let hv: HashMap<_, _> = h.resp_headers.iter().cloned().collect();
        assert_eq!(hv[HEADER_POLICY], "static");
        assert_eq!(hv[HEADER_IMAGES], "0");
        assert_eq!(hv.len(), 2, "{hv:?}");
        assert_eq!(m.counts.borrow()[Counter::Requests.name()], 1);
        // Nothing read from or written to the shared traffic state.
        f.on_done(&m);
        assert_eq!(m.traffic_calls.get(), 0);
    }

    #[test]
    fn bad_input_fails_closed_or_open() {
        let body = r#"{"messages":[{"content":[{"type":"image_url"#;
        let m = FakeMetrics::default();
        let mut h = host("POST", "/v1/chat/completions", body);
        let mut f = filter(Config::default());
        f.on_request_headers(&mut h, &m, false);
        assert_eq!(f.on_request_body(&mut h, &m, body.len(), true), Verdict::Pause);
        let (status, json) = h.reply.clone().expect("reply");
        assert_eq!(status, 400);
        let v: serde_json::Value = serde_json::from_slice(&json).expect("json");
        assert_eq!(v["error"]["code"], "invalid_json");
        f.on_response_headers(&mut h, &m);
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
        f.on_response_headers(&mut h, &m);
        assert!(h
            .resp_headers
            .contains(&(HEADER_FAIL_OPEN.into(), "invalid_json".into())));
        assert_eq!(m.counts.borrow()["invalid_json"], 2);
        assert_eq!(m.counts.borrow()[Counter::FailOpen.name()], 1);
    }

    #[test]
    fn declared_oversized_body_is_refused_at_the_headers() {
        let m = FakeMetrics::default();
        let mut h = host("POST", "/v1/chat/completions", "");
        h.req_headers.insert("content-length".into(), "101".into());
        let mut f = filter(Config {
            max_body_bytes: 100,
            ..Config::default()
        });
        f.on_request_headers(&mut h, &m, false);
        assert_eq!(h.reply.as_ref().map(|r| r.0), Some(400));
        assert_eq!(f.on_request_body(&mut h, &m, 101, true), Verdict::Continue);
        assert_eq!(m.counts.borrow()["body_too_large"], 1);
        // fail_open: forwarded as sent, length and all, and reported.
        let mut h = host("POST", "/v1/chat/completions", "");
        h.req_headers.insert("content-length".into(), "101".into());
        let mut f = filter(Config {
            max_body_bytes: 100,
            fail_open: true,
            ..Config::default()
        });
        assert_eq!(f.on_request_headers(&mut h, &m, false), Verdict::Continue);
        assert!(h.reply.is_none() && h.req_headers.contains_key("content-length"));
        assert_eq!(f.on_request_body(&mut h, &m, 101, true), Verdict::Continue);
        f.on_response_headers(&mut h, &m);
        assert!(h
            .resp_headers
            .contains(&(HEADER_FAIL_OPEN.into(), "body_too_large".into())));
        f.on_done(&m);
        assert_eq!(m.state().pd_inflight, 0);
    }

    #[test]
    fn encoded_bodies_are_refused_at_the_headers() {
        let m = FakeMetrics::default();
        let mut h = host("POST", "/v1/chat/completions", "\x1f\u{8b}");
        h.req_headers.insert("content-encoding".into(), "gzip".into());
        let mut f = filter(Config::default());
        assert_eq!(f.on_request_headers(&mut h, &m, false), Verdict::Pause);
        let (status, json) = h.reply.clone().expect("reply");
        assert_eq!(status, 415);
        let v: serde_json::Value = serde_json::from_slice(&json).expect("json");
        assert_eq!(v["error"]["code"], "unsupported_content_encoding");
        assert_eq!(f.on_request_body(&mut h, &m, 2, true), Verdict::Continue);
        // fail_open: forwarded as sent (length and all) and reported.
        let mut h = host("POST", "/v1/chat/completions", "\x1f\u{8b}");
        h.req_headers.insert("content-encoding".into(), "br".into());
        let mut f = filter(Config {
            fail_open: true,
            ..Config::default()
        });
        assert_eq!(f.on_request_headers(&mut h, &m, false), Verdict::Continue);
        assert!(h.reply.is_none() && h.req_headers.contains_key("content-length"));
        f.on_response_headers(&mut h, &m);
        assert!(h
            .resp_headers
            .contains(&(HEADER_FAIL_OPEN.into(), "unsupported_content_encoding".into())));
        // identity is no encoding.
        let mut h = host("POST", "/v1/chat/completions", "");
        h.req_headers.insert("content-encoding".into(), "identity".into());
        let mut f = filter(Config::default());
        f.on_request_headers(&mut h, &m, false);
        assert!(h.reply.is_none() && f.state == State::Buffering);
    }

    #[test]
    fn hold_headers_pauses_only_requests_the_filter_acts_on() {
        let m = FakeMetrics::default();
        let cfg = Config {
            hold_headers: true,
            ..Config::default()
        };
        let body = r#"{"messages":[{"role":"user","content":"hi"}]}"#;
        let mut h = host("POST", "/v1/chat/completions", body);
        let mut f = filter(cfg.clone());
        assert_eq!(f.on_request_headers(&mut h, &m, false), Verdict::Pause);
        assert!(f.awaiting_body());
        assert_eq!(f.on_request_body(&mut h, &m, body.len(), true), Verdict::Continue);
        assert!(!f.awaiting_body());
        for (method, path, eos) in [
            ("GET", "/v1/chat/completions", false),
            ("POST", "/v1/chat/completions", true),
        ] {
            let mut h = host(method, path, "");
            let mut f = filter(cfg.clone());
            assert_eq!(f.on_request_headers(&mut h, &m, eos), Verdict::Continue);
            assert!(!f.awaiting_body());
        }
    }

    #[test]
    fn trailers_end_the_body() {
        let body = r#"{"messages":[{"content":[{"type":"image_url"#;
        let m = FakeMetrics::default();
        let mut h = host("POST", "/v1/chat/completions", body);
        let mut f = filter(Config::default());
        f.on_request_headers(&mut h, &m, false);
        assert_eq!(f.on_request_body(&mut h, &m, body.len(), false), Verdict::Pause);
        assert_eq!(f.on_request_trailers(&mut h, &m), Verdict::Pause);
        assert_eq!(h.reply.as_ref().map(|r| r.0), Some(400));
        // Without a body, or once decided, trailers change nothing.
        assert_eq!(f.on_request_trailers(&mut h, &m), Verdict::Continue);
        let mut f = filter(Config::default());
        let mut h = host("GET", "/v1/chat/completions", "");
        f.on_request_headers(&mut h, &m, false);
        assert_eq!(f.on_request_trailers(&mut h, &m), Verdict::Continue);
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

    fn epd(failure: EncodeFailure, fanout: crate::core::encode::EncodeFanout) -> Config {
        Config {
            encode_cluster: Some("encode_cluster".into()),
            encode_failure: failure,
            encode_fanout: fanout,
            ..Config::default()
        }
    }

    const TWO_IMAGES: &str = r#"{"model":"m","stream":true,"messages":[{"role":"user","content":[
        {"type":"text","text":"compare"},
        {"type":"image_url","image_url":{"url":"https://x/a.png"}},
        {"type":"image_url","image_url":"https://x/b.png"}]}]}"#;

    fn start(cfg: Config, body: &str, with_id: bool) -> (RequestFilter, FakeHost, FakeMetrics, Verdict) {
        let m = FakeMetrics::default();
        let mut h = host("POST", "/v1/chat/completions", body);
        if with_id {
            h.req_headers.insert(REQUEST_ID.into(), "client-id".into());
        }
        let mut f = filter(cfg);
        assert_eq!(f.on_request_headers(&mut h, &m, false), Verdict::Continue);
        let v = f.on_request_body(&mut h, &m, body.len(), true);
        (f, h, m, v)
    }

    #[test]
    fn encoder_first_then_pd_per_image() {
        use crate::core::encode::EncodeFanout;
        let (mut f, mut h, m, v) = start(
            epd(EncodeFailure::Fallback, EncodeFanout::PerImage),
            TWO_IMAGES,
            false,
        );
        assert_eq!(v, Verdict::Pause);
        assert_eq!(h.req_headers[REQUEST_ID], "generated-id");
        assert_eq!(h.calls.len(), 2);
        for ((_, cluster, id, body), url) in h.calls.iter().zip(["https://x/a.png", "https://x/b.png"]) {
            assert_eq!(
                (cluster.as_str(), id.as_str()),
                ("encode_cluster", "generated-id")
            );
            let v: serde_json::Value = serde_json::from_slice(body).expect("json");
            assert_eq!(v["messages"][0]["content"][0]["image_url"]["url"], url);
            assert_eq!(
                (v["max_tokens"].as_u64(), v["stream"].as_bool()),
                (Some(1), Some(false))
            );
        }
        // Unknown tokens are ignored; the request waits for both answers.
        assert_eq!(
            f.on_encode_response(&mut h, &m, 999, Some(200)),
            Verdict::Continue
        );
        assert_eq!(f.on_encode_response(&mut h, &m, 101, Some(200)), Verdict::Pause);
        assert_eq!(h.resumed, 0);
        f.on_encode_response(&mut h, &m, 100, Some(200));
        assert_eq!(h.resumed, 1);
        f.on_response_headers(&mut h, &m);
        assert!(h.resp_headers.contains(&(HEADER_ENCODE.into(), "ok".into())));
        assert!(h.resp_headers.contains(&(HEADER_ENCODE_CALLS.into(), "2".into())));
        assert_eq!(m.counts.borrow()[Counter::EncodeCalls.name()], 2);
    }

    #[test]
    fn per_request_keeps_the_client_id() {
        use crate::core::encode::EncodeFanout;
        let (_, h, _, v) = start(
            epd(EncodeFailure::Fallback, EncodeFanout::PerRequest),
            TWO_IMAGES,
            true,
        );
        assert_eq!(v, Verdict::Pause);
        assert_eq!(h.req_headers[REQUEST_ID], "client-id");
        assert_eq!(h.calls.len(), 1);
        assert_eq!(h.calls[0].2, "client-id");
        let v: serde_json::Value = serde_json::from_slice(&h.calls[0].3).expect("json");
        assert_eq!(v["messages"][0]["content"][0]["text"], "compare");
        assert_eq!(v["stream"], false);
    }

    #[test]
    fn retry_then_fallback() {
        use crate::core::encode::EncodeFanout;
        let (mut f, mut h, m, _) = start(
            epd(EncodeFailure::Fallback, EncodeFanout::PerRequest),
            TWO_IMAGES,
            true,
        );
        assert_eq!(f.on_encode_response(&mut h, &m, 100, Some(503)), Verdict::Pause);
        assert_eq!(h.calls.len(), 2, "retried");
        assert_eq!(f.on_encode_response(&mut h, &m, 101, None), Verdict::Continue);
        assert_eq!(h.resumed, 1);
        assert!(h.reply.is_none());
        f.on_response_headers(&mut h, &m);
        assert!(h
            .resp_headers
            .contains(&(HEADER_ENCODE.into(), "fallback".into())));
        let c = m.counts.borrow();
        assert_eq!(
            (
                c[Counter::EncodeRetries.name()],
                c[Counter::EncodeFallbacks.name()]
            ),
            (1, 1)
        );
    }

    #[test]
    fn client_errors_are_not_retried() {
        use crate::core::encode::EncodeFanout;
        let (mut f, mut h, m, _) = start(
            epd(EncodeFailure::Fallback, EncodeFanout::PerRequest),
            TWO_IMAGES,
            true,
        );
        assert_eq!(
            f.on_encode_response(&mut h, &m, 100, Some(400)),
            Verdict::Continue
        );
        assert_eq!((h.calls.len(), h.resumed), (1, 1), "one call, then PD");
        assert!(!m.counts.borrow().contains_key(Counter::EncodeRetries.name()));
        assert!(retriable(None) && retriable(Some(503)) && retriable(Some(504)));
        assert!(!retriable(Some(400)) && !retriable(Some(429)) && !retriable(Some(302)));
    }

    #[test]
    fn fail_mode_answers_502() {
        use crate::core::encode::EncodeFanout;
        let cfg = Config {
            encode_retries: 0,
            ..epd(EncodeFailure::Fail, EncodeFanout::PerImage)
        };
        let (mut f, mut h, m, _) = start(cfg, TWO_IMAGES, true);
        f.on_encode_response(&mut h, &m, 100, Some(504));
        let (status, body) = h.reply.clone().expect("reply");
        assert_eq!(status, 502);
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["error"]["code"], "encoder_unavailable");
        assert_eq!(h.resumed, 0);
        // The other call's late answer changes nothing.
        assert_eq!(
            f.on_encode_response(&mut h, &m, 101, Some(200)),
            Verdict::Continue
        );
        assert_eq!(h.resumed, 0);
    }

    #[test]
    fn refused_dispatch_falls_back_at_once_and_text_skips_the_encoder() {
        use crate::core::encode::EncodeFanout;
        let m = FakeMetrics::default();
        let mut h = host("POST", "/v1/chat/completions", TWO_IMAGES);
        h.refuse_dispatch = true;
        let mut f = filter(epd(EncodeFailure::Fallback, EncodeFanout::PerImage));
        f.on_request_headers(&mut h, &m, false);
        assert_eq!(
            f.on_request_body(&mut h, &m, TWO_IMAGES.len(), true),
            Verdict::Continue
        );
        assert_eq!(h.resumed, 0, "never paused, so nothing to resume");
        let text = r#"{"messages":[{"role":"user","content":"hi"}]}"#;
        let (_, h, _, v) = start(epd(EncodeFailure::Fail, EncodeFanout::PerImage), text, true);
        assert_eq!(v, Verdict::Continue);
        assert!(h.calls.is_empty());
    }

    #[test]
    fn counters_return_to_zero_on_every_path() {
        use crate::core::encode::EncodeFanout;
        let m = FakeMetrics::default();
        let bad = "{oops";
        for scenario in 0..40u32 {
            let fanout = if scenario % 2 == 0 {
                EncodeFanout::PerImage
            } else {
                EncodeFanout::PerRequest
            };
            let failure = if scenario % 3 == 0 {
                EncodeFailure::Fail
            } else {
                EncodeFailure::Fallback
            };
            let body = match scenario % 5 {
                0 => bad,
                1 => r#"{"messages":[{"role":"user","content":"text only"}]}"#,
                _ => TWO_IMAGES,
            };
            let cfg = Config {
                fail_open: scenario % 4 == 0,
                // The dynamic policy also holds encoder work from its decision on.
                policy: if scenario % 8 < 4 {
                    PolicyKind::Dynamic
                } else {
                    PolicyKind::Static
                },
                ..epd(failure, fanout)
            };
            let mut h = host("POST", "/v1/chat/completions", body);
            let mut f = filter(cfg);
            f.on_request_headers(&mut h, &m, false);
            let abort_at = scenario % 7;
            if abort_at != 0 {
                f.on_request_body(&mut h, &m, body.len(), true);
                // Answer some calls (success, failure, retry), then maybe abort.
                for (step, status) in [(2, Some(200)), (3, Some(503)), (4, None), (5, Some(200))] {
                    if abort_at < step {
                        break;
                    }
                    let tokens: Vec<u32> = h.calls.iter().map(|c| c.0).collect();
                    for t in tokens {
                        f.on_encode_response(&mut h, &m, t, status);
                    }
                }
            }
            assert!(m.state().encode_inflight >= 0 && m.state().pd_inflight >= 0);
            f.on_done(&m);
            f.on_done(&m); // idempotent
            let s = m.state();
            assert_eq!(
                (s.encode_inflight, s.pd_inflight, s.encode_outstanding_us),
                (0, 0, 0),
                "scenario {scenario}"
            );
        }
        assert!(m.state().request_rate > 0.0, "image arrivals were recorded");
    }

    #[test]
    fn dynamic_policy_reports_reason_and_prediction() {
        let cfg = Config {
            policy: PolicyKind::Dynamic,
            ..Config::default()
        };
        let m = FakeMetrics::default();
        let mut h = host("POST", "/v1/chat/completions", TWO_IMAGES);
        h.req_headers.insert(HEADER_SLO.into(), "700".into());
        let mut f = filter(cfg.clone());
        f.on_request_headers(&mut h, &m, false);
        assert_eq!(f.slo_ms, Some(700.0));
        f.on_request_body(&mut h, &m, TWO_IMAGES.len(), true);
        assert!(m.traffic_calls.get() > 0, "the dynamic policy reads the traffic");
        f.on_response_headers(&mut h, &m);
        let hv: HashMap<_, _> = h.resp_headers.iter().cloned().collect();
        assert_eq!(hv[HEADER_POLICY], "dynamic");
        assert_eq!(hv[HEADER_REASON], "unconstrained");
        assert!(hv.contains_key(HEADER_PREDICTED_TTFT));
        // A text-only request does not consult the policy or the traffic.
        let text = r#"{"messages":[{"role":"user","content":"hi"}]}"#;
        let m = FakeMetrics::default();
        let mut h = host("POST", "/v1/chat/completions", text);
        let mut f = filter(cfg);
        f.on_request_headers(&mut h, &m, false);
        f.on_request_body(&mut h, &m, text.len(), true);
        f.on_response_headers(&mut h, &m);
        f.on_done(&m);
        assert_eq!(m.traffic_calls.get(), 0);
        assert!(!h.resp_headers.iter().any(|(k, _)| k == HEADER_REASON));
    }

    const ROLE_CHUNK: &str =
        "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n";
    const TOKEN_CHUNK: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n";

    fn jpeg_data_url(w: u32, h: u32) -> String {
        use crate::core::probe::ImageFormat;
        use crate::core::transcode::{encode, Layout, Pixels};
        use base64::Engine;
        let data = (0..w * h * 3).map(|i| (i % 251) as u8).collect();
        let px = Pixels {
            width: w,
            height: h,
            layout: Layout::Rgb8,
            data,
        };
        let bytes = encode(&px, ImageFormat::Jpeg, 80).expect("encode");
        format!(
            "data:image/jpeg;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        )
    }

    fn dynamic_epd() -> Config {
        Config {
            policy: PolicyKind::Dynamic,
            ..epd(
                EncodeFailure::Fallback,
                crate::core::encode::EncodeFanout::PerRequest,
            )
        }
    }

    /// A dynamic EPD request at t = 1 s, its encode call answered at
    /// t = 1.2 s (or failed), forwarded to PD.
    fn forwarded(encode_status: Option<u32>) -> (RequestFilter, FakeHost, FakeMetrics) {
        let m = FakeMetrics::default();
        let mut h = host("POST", "/v1/chat/completions", TWO_IMAGES);
        h.now.set(1_000_000);
        let mut f = filter(Config {
            encode_retries: 0,
            ..dynamic_epd()
        });
        f.on_request_headers(&mut h, &m, false);
        assert_eq!(
            f.on_request_body(&mut h, &m, TWO_IMAGES.len(), true),
            Verdict::Pause
        );
        h.now.set(1_200_000);
        f.on_encode_response(&mut h, &m, 100, encode_status);
        assert_eq!(h.resumed, 1);
        (f, h, m)
    }

    fn answer(h: &mut FakeHost, status: &str, content_type: &str) {
        h.answer_headers = vec![
            (":status".into(), status.into()),
            ("content-type".into(), content_type.into()),
        ];
    }

    fn feed(f: &mut RequestFilter, h: &mut FakeHost, m: &FakeMetrics, piece: &str, end: bool) {
        h.answer_piece = piece.as_bytes().to_vec();
        assert_eq!(f.on_response_body(h, m, piece.len(), end), Verdict::Continue);
    }

    #[test]
    fn the_decided_encoder_work_is_held_once_and_given_back_with_the_answer() {
        let m = FakeMetrics::default();
        *m.traffic.borrow_mut() = TrafficState::initial();
        let body = format!(
            r#"{{"stream":true,"messages":[{{"role":"user","content":[{{"type":"image_url","image_url":{{"url":"{}"}}}}]}}]}}"#,
            jpeg_data_url(640, 480)
        );
        let mut h = host("POST", "/v1/chat/completions", &body);
        let mut f = filter(dynamic_epd());
        f.on_request_headers(&mut h, &m, false);
        f.on_request_body(&mut h, &m, body.len(), true);
        // Held once: the work of the tokens kept, at the factor of a fresh
        // state (the decision's reservation became it, not added to it).
        let held = m.state().encode_outstanding_us;
        f.on_encode_response(&mut h, &m, 100, Some(200));
        assert_eq!(m.state().encode_outstanding_us, 0);
        answer(&mut h, "200", "text/event-stream");
        f.on_response_headers(&mut h, &m);
        let hv: HashMap<_, _> = h.resp_headers.iter().cloned().collect();
        let kept: u64 = hv[HEADER_AFTER].parse().unwrap_or(0);
        let work_us = (f.shared.params.encode.predict(kept as f64) * 1000.0) as i64;
        assert!(kept > 0 && held > 0, "{kept} {held} {hv:?}");
        assert_eq!(held, work_us);
        f.on_done(&m);
        assert_eq!(m.state().encode_outstanding_us, 0);
    }

    #[test]
    fn a_streamed_answer_is_timed_to_its_first_token_and_teaches_the_margin() {
        let (mut f, mut h, m) = forwarded(Some(200));
        let s = m.state();
        assert_eq!(s.pd_pending, 1);
        assert!(s.pd_outstanding_us > 0);
        answer(&mut h, "200", "text/event-stream");
        h.now.set(1_300_000);
        f.on_response_headers(&mut h, &m);
        let hv: HashMap<_, _> = h.resp_headers.iter().cloned().collect();
        let predicted: f64 = hv[HEADER_PREDICTED_TTFT].parse().unwrap_or(f64::NAN);
        assert_eq!(hv[HEADER_MARGIN], "100", "the prior before any sample");
        assert!(
            hv[HEADER_TERMS].starts_with("elapsed=0.0,transcode=0.0,encode_wait="),
            "{}",
            hv[HEADER_TERMS]
        );
        // The role chunk is not a token; the next chunk is.
        feed(&mut f, &mut h, &m, ROLE_CHUNK, false);
        assert!(m.ttfts.borrow().is_empty());
        assert_eq!(m.state().pd_pending, 1);
        h.now.set(1_450_000);
        feed(&mut f, &mut h, &m, TOKEN_CHUNK, false);
        let ttfts = m.ttfts.borrow().clone();
        assert_eq!(ttfts.len(), 1);
        let (observed, error) = ttfts[0];
        assert_eq!(observed, 450.0);
        let error = error.unwrap_or(f64::NAN);
        assert!(
            (error - (450.0 - predicted)).abs() < 1.0,
            "{error} vs {predicted}"
        );
        let s = m.state();
        assert_eq!((s.pd_pending, s.pd_outstanding_us), (0, 0));
        assert_eq!(s.pd_calibration_samples, 1);
        assert_eq!(m.residuals.borrow().total, 1.0);
        assert_eq!(m.counts.borrow()[Counter::TtftSamples.name()], 1);
        assert!(!m.counts.borrow().contains_key(Counter::SloMisses.name()));
        // Later pieces and the end change nothing.
        feed(&mut f, &mut h, &m, TOKEN_CHUNK, true);
        f.on_done(&m);
        assert_eq!(m.ttfts.borrow().len(), 1);
        assert_eq!((m.state().pd_inflight, m.state().pd_pending), (0, 0));
    }

    #[test]
    fn a_plain_answer_is_timed_at_its_headers_but_teaches_nothing() {
        let (mut f, mut h, m) = forwarded(Some(200));
        answer(&mut h, "200", "application/json");
        h.now.set(2_500_000);
        f.on_response_headers(&mut h, &m);
        // Measured (a late one is a miss)...
        assert_eq!(m.ttfts.borrow().clone(), vec![(1500.0, None)]);
        assert_eq!(m.counts.borrow()[Counter::SloMisses.name()], 1);
        // ...but its time includes the whole answer: no residual, no calibration.
        assert_eq!(m.residuals.borrow().total, 0.0);
        let s = m.state();
        assert_eq!((s.pd_pending, s.pd_calibration_samples), (0, 0));
    }

    #[test]
    fn errors_fallbacks_empty_streams_and_aborts_give_no_sample_and_leak_nothing() {
        // An error answer.
        let (mut f, mut h, m) = forwarded(Some(200));
        answer(&mut h, "503", "application/json");
        f.on_response_headers(&mut h, &m);
        assert_eq!(m.state().pd_pending, 0);
        f.on_done(&m);
        // A fallback (the encoder failed): PD encodes itself, not predicted.
        let (mut f2, mut h2, m2) = forwarded(Some(500));
        answer(&mut h2, "200", "text/event-stream");
        f2.on_response_headers(&mut h2, &m2);
        feed(&mut f2, &mut h2, &m2, TOKEN_CHUNK, false);
        f2.on_done(&m2);
        // A stream that ends without a token.
        let (mut f3, mut h3, m3) = forwarded(Some(200));
        answer(&mut h3, "200", "text/event-stream");
        f3.on_response_headers(&mut h3, &m3);
        feed(&mut f3, &mut h3, &m3, "data: [DONE]\n\n", true);
        assert_eq!(m3.state().pd_pending, 0);
        f3.on_done(&m3);
        // The client goes away before the first token.
        let (mut f4, mut h4, m4) = forwarded(Some(200));
        answer(&mut h4, "200", "text/event-stream");
        f4.on_response_headers(&mut h4, &m4);
        feed(&mut f4, &mut h4, &m4, ROLE_CHUNK, false);
        f4.on_done(&m4);
        f4.on_done(&m4);
        for m in [&m, &m2, &m3, &m4] {
            assert!(m.ttfts.borrow().is_empty());
            assert_eq!(m.residuals.borrow().total, 0.0);
            let s = m.state();
            assert_eq!(
                (
                    s.pd_inflight,
                    s.pd_pending,
                    s.pd_outstanding_us,
                    s.encode_inflight,
                    s.encode_outstanding_us
                ),
                (0, 0, 0, 0, 0)
            );
        }
    }

    #[test]
    fn the_learned_margin_shrinks_the_next_budget() {
        let cfg = dynamic_epd();
        let big = format!(
            r#"{{"messages":[{{"role":"user","content":[{{"type":"image_url","image_url":{{"url":"{}"}}}}]}}]}}"#,
            jpeg_data_url(2240, 1400)
        );
        let run = |m: &FakeMetrics| {
            let mut h = host("POST", "/v1/chat/completions", &big);
            h.now.set(5_000_000);
            let mut f = filter(cfg.clone());
            f.on_request_headers(&mut h, m, false);
            f.on_request_body(&mut h, m, big.len(), true);
            f.on_encode_response(&mut h, m, 100, Some(200));
            answer(&mut h, "200", "application/json");
            f.on_response_headers(&mut h, m);
            f.on_done(m);
            let hv: HashMap<_, _> = h.resp_headers.iter().cloned().collect();
            hv[HEADER_AFTER].parse::<u64>().unwrap_or(0)
        };
        let m = FakeMetrics::default();
        let idle = run(&m);
        assert_eq!(idle, 4000, "idle and the prior margin: kept whole");
        // Observed TTFT has run ~900 ms above the prediction lately.
        for i in 0..20 {
            m.residuals
                .borrow_mut()
                .record(900.0, 4000, 5_000_000 - 20 + i, cfg.correction_window_s);
        }
        let after = run(&m);
        assert!(after < idle, "{after}");
    }

    // ------------------------------------------------ transcode: "offload"

    fn offload(cfg: Config) -> Config {
        Config {
            transcode: TranscodeMode::Offload,
            transcode_cluster: Some("transcode_cluster".into()),
            static_budget_tokens: 256,
            ..cfg
        }
    }

    /// A PNG (1120x700) and a JPEG (840x560), both over 256 tokens, and a
    /// remote URL.
    fn photos_body() -> String {
        use crate::core::probe::ImageFormat;
        use crate::core::transcode::{encode, Layout, Pixels};
        use base64::Engine;
        let png = encode(
            &Pixels {
                width: 1120,
                height: 700,
                layout: Layout::Rgb8,
                data: (0..1120 * 700 * 3).map(|i| (i % 253) as u8).collect(),
            },
            ImageFormat::Png,
            90,
        )
        .unwrap_or_default();
        format!(
            r#"{{"messages":[{{"role":"user","content":[{{"type":"image_url","image_url":{{"url":"data:image/png;base64,{}"}}}},{{"type":"text","text":"and"}},{{"type":"image_url","image_url":"{}"}},{{"type":"image_url","image_url":"https://x/c.png"}}]}}],"n":1.50}}"#,
            base64::engine::general_purpose::STANDARD.encode(png),
            jpeg_data_url(840, 560)
        )
    }

    /// The body the in-filter path sends for `body` under `cfg`.
    fn in_filter_body(cfg: &Config, body: &str) -> Vec<u8> {
        let cfg = Config {
            transcode: TranscodeMode::InFilter,
            encode_cluster: None,
            ..cfg.clone()
        };
        let (_, h, _, v) = start(cfg, body, false);
        assert_eq!(v, Verdict::Continue);
        h.body
    }

    /// What the service answers for transcode call `n`: the filter's own
    /// transcode of the bytes it was sent, to the size it asked for.
    fn service_answer(h: &FakeHost, n: usize) -> Vec<u8> {
        use crate::core::offload::{Target, TARGET_HEIGHT};
        use crate::core::probe::probe;
        let (_, headers, bytes) = &h.transcodes[n];
        let get = |k: &str| headers.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let target = Target::from_headers(get).expect("target headers");
        assert!(get(TARGET_HEIGHT).is_some());
        let header = probe(bytes.as_slice()).expect("an image was sent");
        assert_eq!(get("content-type"), Some(header.format.mime()));
        assert_eq!(get(":path"), Some(offload::PATH));
        let opts = crate::core::transcode::TranscodeOptions {
            jpeg_quality: target.jpeg_quality,
            filter: target.filter,
            max_pixels: 40_000_000,
        };
        crate::core::transcode::transcode(bytes, &header, target.to, &opts).expect("transcode")
    }

    fn answer_call(
        f: &mut RequestFilter,
        h: &mut FakeHost,
        m: &FakeMetrics,
        n: usize,
        status: Option<u32>,
        body: Vec<u8>,
    ) -> Verdict {
        let token = h.transcodes[n].0;
        h.call_answer = body;
        let size = h.call_answer.len();
        f.on_transcode_response(h, m, token, status, size)
    }

    #[test]
    fn offloaded_images_are_spliced_exactly_as_in_filter_ones() {
        let cfg = offload(Config::default());
        let body = photos_body();
        let (mut f, mut h, m, v) = start(cfg.clone(), &body, false);
        assert_eq!(v, Verdict::Pause, "waits for the service");
        assert!(matches!(f.state, State::Transcoding(_)));
        assert_eq!(h.transcodes.len(), 2, "one call per image over budget");
        assert!(h.body == body.as_bytes(), "nothing replaced yet");
        let answers: Vec<Vec<u8>> = (0..2).map(|n| service_answer(&h, n)).collect();
        // Answers in any order; the one left keeps the request waiting.
        h.now.set(250_000);
        assert_eq!(
            answer_call(&mut f, &mut h, &m, 1, Some(200), answers[1].clone()),
            Verdict::Pause
        );
        assert_eq!(h.resumed, 0);
        // A stray token changes nothing.
        f.on_transcode_response(&mut h, &m, 9, Some(200), 0);
        assert!(matches!(f.state, State::Transcoding(_)) && h.resumed == 0);
        assert_eq!(
            answer_call(&mut f, &mut h, &m, 0, Some(200), answers[0].clone()),
            Verdict::Continue
        );
        assert_eq!(h.resumed, 1);
        assert!(!matches!(f.state, State::Transcoding(_)));
        assert_eq!(
            h.body,
            in_filter_body(&cfg, &body),
            "the same bytes as in the filter"
        );
        f.on_response_headers(&mut h, &m);
        let hv: HashMap<_, _> = h.resp_headers.iter().cloned().collect();
        assert_eq!(hv[HEADER_OFFLOAD], "offload");
        assert_eq!(hv[HEADER_RESIZED], "2");
        assert_eq!(hv[HEADER_TRANSCODE], "250.0", "the round trip");
        let c = m.counts.borrow();
        assert_eq!(c[Counter::TranscodeOffloads.name()], 2);
        assert!(!c.contains_key(Counter::TranscodeFallbacks.name()));
        // The dynamic model's speed is the round trip's: 250 ms over the
        // images' input megapixels.
        let mpixels = (1120.0 * 700.0 + 840.0 * 560.0) / 1e6;
        let s = m.state();
        assert_eq!(s.transcode_samples, 1);
        assert!((s.transcode_ms_per_mpixel - 250.0 / mpixels).abs() < 1e-9);
    }

    #[test]
    fn failed_or_wrong_answers_fall_back_to_the_filter() {
        let cfg = offload(Config::default());
        let body = photos_body();
        let expected = in_filter_body(&cfg, &body);
        let png_answer = |h: &FakeHost| service_answer(h, 0);
        type Answer = Box<dyn Fn(&FakeHost) -> (Option<u32>, Vec<u8>)>;
        let cases: Vec<(&str, Answer)> = vec![
            (
                "down",
                Box::new(|_| (Some(503), b"upstream connect error".to_vec())),
            ),
            ("timeout", Box::new(|_| (Some(504), Vec::new()))),
            ("no answer", Box::new(|_| (None, Vec::new()))),
            ("refused", Box::new(|_| (Some(400), b"{\"error\":{}}".to_vec()))),
            (
                "not an image",
                Box::new(|_| (Some(200), b"{\"error\":{}}".to_vec())),
            ),
            ("the other image", Box::new(|h| (Some(200), service_answer(h, 1)))),
            (
                "truncated",
                Box::new(move |h| (Some(200), png_answer(h)[..20].to_vec())),
            ),
        ];
        for (name, answer) in cases {
            let (mut f, mut h, m, _) = start(cfg.clone(), &body, false);
            let good = service_answer(&h, 1);
            assert_eq!(
                answer_call(&mut f, &mut h, &m, 1, Some(200), good),
                Verdict::Pause
            );
            let (status, bytes) = answer(&h);
            assert_eq!(
                answer_call(&mut f, &mut h, &m, 0, status, bytes),
                Verdict::Continue,
                "{name}"
            );
            assert_eq!(h.resumed, 1, "{name}");
            assert!(h.body == expected, "{name}");
            f.on_response_headers(&mut h, &m);
            assert!(
                h.resp_headers
                    .contains(&(HEADER_OFFLOAD.into(), "fallback".into())),
                "{name}"
            );
            let c = m.counts.borrow();
            assert_eq!(
                (
                    c[Counter::TranscodeOffloads.name()],
                    c[Counter::TranscodeFallbacks.name()]
                ),
                (1, 1),
                "{name}"
            );
        }
        // An answer over the body limit is not read.
        let small = Config {
            max_body_bytes: body.len() as u64 + 10,
            ..cfg.clone()
        };
        let (mut f, mut h, m, _) = start(small.clone(), &body, false);
        let token = h.transcodes[0].0;
        f.on_transcode_response(&mut h, &m, token, Some(200), body.len() + 11);
        let good = service_answer(&h, 1);
        assert_eq!(
            answer_call(&mut f, &mut h, &m, 1, Some(200), good),
            Verdict::Continue
        );
        assert!(h.body == in_filter_body(&small, &body));
    }

    #[test]
    fn a_refused_dispatch_is_shrunk_here_at_once() {
        let cfg = offload(Config::default());
        let body = photos_body();
        let m = FakeMetrics::default();
        let mut h = host("POST", "/v1/chat/completions", &body);
        h.refuse_transcode = true;
        let mut f = filter(cfg.clone());
        f.on_request_headers(&mut h, &m, false);
        assert_eq!(f.on_request_body(&mut h, &m, body.len(), true), Verdict::Continue);
        assert_eq!(h.resumed, 0, "never paused, so nothing to resume");
        assert!(h.body == in_filter_body(&cfg, &body));
        assert_eq!(m.counts.borrow()[Counter::TranscodeFallbacks.name()], 2);
        // Within budget or text only: no call at all, no header.
        for text in [
            r#"{"messages":[{"role":"user","content":"hi"}]}"#,
            r#"{"messages":[{"role":"user","content":[{"type":"image_url","image_url":"https://x/y.png"}]}]}"#,
        ] {
            let (mut f, mut h, m, v) = start(cfg.clone(), text, false);
            assert_eq!((v, h.transcodes.len()), (Verdict::Continue, 0));
            assert_eq!(h.body, text.as_bytes());
            f.on_response_headers(&mut h, &m);
            assert!(!h.resp_headers.iter().any(|(k, _)| k == HEADER_OFFLOAD));
        }
    }

    #[test]
    fn a_corrupt_image_gets_the_filters_error_after_the_service_refuses_it() {
        let body = photos_body();
        // The PNG cut short past its header: the service says 400 and the
        // filter, trying itself, finds it corrupt.
        let start_png = body.find("base64,").unwrap_or(0) + 7;
        let cut = format!("{}\"}}}}]}}]}}", &body[..start_png + 4000]);
        for fail_open in [false, true] {
            let cfg = offload(Config {
                fail_open,
                ..Config::default()
            });
            let (mut f, mut h, m, v) = start(cfg, &cut, false);
            assert_eq!((v, h.transcodes.len()), (Verdict::Pause, 1));
            let v = answer_call(&mut f, &mut h, &m, 0, Some(400), b"{}".to_vec());
            if fail_open {
                assert_eq!((v, h.resumed), (Verdict::Continue, 1));
                assert!(h.reply.is_none());
                assert!(h.body == cut.as_bytes(), "forwarded unchanged");
            } else {
                assert_eq!((v, h.resumed), (Verdict::Pause, 0));
                let (status, json) = h.reply.clone().expect("reply");
                let e: serde_json::Value = serde_json::from_slice(&json).expect("json");
                assert_eq!(
                    (status, e["error"]["code"].as_str()),
                    (400, Some("corrupt_image"))
                );
            }
            f.on_done(&m);
            assert_eq!(m.state().pd_inflight, 0);
        }
    }

    #[test]
    fn offload_then_encode_then_pd_and_an_abort_leaks_nothing() {
        use crate::core::encode::EncodeFanout;
        let cfg = offload(epd(EncodeFailure::Fallback, EncodeFanout::PerRequest));
        let body = photos_body();
        let (mut f, mut h, m, _) = start(cfg.clone(), &body, true);
        assert!(h.calls.is_empty(), "no encode call before the images are shrunk");
        for n in 0..2 {
            let a = service_answer(&h, n);
            answer_call(&mut f, &mut h, &m, n, Some(200), a);
        }
        // The encode call carries the images PD gets: the shrunk ones.
        assert_eq!(h.calls.len(), 1);
        assert!(h.body == in_filter_body(&cfg, &body));
        let sent = String::from_utf8_lossy(&h.body).to_string();
        let encoded = String::from_utf8_lossy(&h.calls[0].3).to_string();
        let urls = |b: &str| -> Vec<String> {
            b.split("\"data:")
                .skip(1)
                .map(|u| u.split('"').next().unwrap_or_default().to_string())
                .collect()
        };
        assert_eq!(urls(&sent).len(), 2);
        assert!(urls(&sent) == urls(&encoded), "the same images at encode and PD");
        assert_eq!(h.resumed, 0, "still waiting for the encoder");
        assert_eq!(m.state().encode_inflight, 1);
        assert_eq!(
            f.on_encode_response(&mut h, &m, 100, Some(200)),
            Verdict::Continue
        );
        assert_eq!(h.resumed, 1);
        f.on_done(&m);
        // A client gone while the images are at the service: what the
        // dynamic decision reserved is given back, and a late answer does
        // nothing.
        let dynamic = Config {
            policy: PolicyKind::Dynamic,
            ..cfg
        };
        // A backlog at the encoder makes the policy shrink the images.
        let m = FakeMetrics::default();
        let backlog = 900_000;
        m.traffic.borrow_mut().encode_outstanding_us = backlog;
        let mut h = host("POST", "/v1/chat/completions", &body);
        let mut f = filter(dynamic);
        f.on_request_headers(&mut h, &m, false);
        assert_eq!(f.on_request_body(&mut h, &m, body.len(), true), Verdict::Pause);
        assert!(matches!(f.state, State::Transcoding(_)) && !h.transcodes.is_empty());
        assert!(
            m.state().encode_outstanding_us > backlog,
            "reserved at the decision"
        );
        f.on_done(&m);
        assert_eq!(m.state().encode_outstanding_us, backlog);
        let a = service_answer(&h, 0);
        answer_call(&mut f, &mut h, &m, 0, Some(200), a);
        let s = m.state();
        assert_eq!((s.encode_inflight, s.pd_inflight, s.pd_pending), (0, 0, 0));
    }

    fn split(failure: PrefillFailure) -> Config {
        Config {
            prefill_cluster: Some("prefill_cluster".into()),
            prefill_failure: failure,
            ..Config::default()
        }
    }

    const KV_ANSWER: &str = r#"{"id":"p1","choices":[{"text":"x"}],"kv_transfer_params":{"remote_engine_id":"e1","remote_block_ids":[3,4],"remote_host":"10.0.0.2","remote_port":5600,"transfer_id":"t-1"}}"#;

    /// Answers the call with `token`: `status` and `body`.
    fn answer_token(
        f: &mut RequestFilter,
        h: &mut FakeHost,
        m: &FakeMetrics,
        token: u32,
        status: Option<u32>,
        body: &str,
    ) -> Verdict {
        h.call_answer = body.as_bytes().to_vec();
        f.on_call_response(h, m, token, status, body.len())
    }

    fn headers_of(h: &FakeHost) -> HashMap<String, String> {
        h.resp_headers.iter().cloned().collect()
    }

    fn assert_released(m: &FakeMetrics) {
        let s = m.state();
        assert_eq!(
            (
                s.pd_inflight,
                s.pd_pending,
                s.pd_outstanding_us,
                s.encode_inflight,
                s.encode_outstanding_us
            ),
            (0, 0, 0, 0, 0)
        );
    }

    #[test]
    fn split_prefills_first_then_decode_gets_the_params() {
        let body = r#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"max_tokens":50,
            "temperature":0.70,"messages":[{"role":"user","content":"hi"}]}"#;
        let (mut f, mut h, m, v) = start(split(PrefillFailure::Fail), body, false);
        assert_eq!(v, Verdict::Pause, "held for the prefill");
        assert_eq!(h.req_headers[REQUEST_ID], "generated-id");
        assert_eq!(h.calls.len(), 1);
        let (token, cluster, id, prefill) = h.calls[0].clone();
        assert_eq!(
            (cluster.as_str(), id.as_str()),
            ("prefill_cluster", "generated-id")
        );
        let p: serde_json::Value = serde_json::from_slice(&prefill).expect("json");
        assert_eq!(
            (&p["max_tokens"], &p["stream"]),
            (&serde_json::json!(1), &serde_json::json!(false))
        );
        assert!(p.get("stream_options").is_none());
        assert_eq!(p["kv_transfer_params"]["do_remote_decode"], true);
        assert_eq!(p["kv_transfer_params"]["do_remote_prefill"], false);
        assert_eq!(p["messages"][0]["content"], "hi");
        assert_eq!(h.body, body.as_bytes(), "nothing changed before the answer");
        assert_eq!(
            answer_token(&mut f, &mut h, &m, token, Some(200), KV_ANSWER),
            Verdict::Continue
        );
        assert_eq!(h.resumed, 1);
        // Decode gets the body as sent plus the prefill's params, nothing else.
        let kv = r#"{"remote_engine_id":"e1","remote_block_ids":[3,4],"remote_host":"10.0.0.2","remote_port":5600,"transfer_id":"t-1"}"#;
        let expected = format!("{},\"kv_transfer_params\":{kv}}}", &body[..body.len() - 1]);
        assert_eq!(String::from_utf8_lossy(&h.body), expected);
        f.on_response_headers(&mut h, &m);
        let hv = headers_of(&h);
        assert_eq!(
            (hv[HEADER_PREFILL].as_str(), hv[HEADER_KV_TRANSFER].as_str()),
            ("ok", "spliced")
        );
        assert_eq!(hv[HEADER_PREFILL_CALLS], "1");
        assert_eq!(m.counts.borrow()[Counter::PrefillCalls.name()], 1);
        f.on_done(&m);
        assert_released(&m);
    }

    #[test]
    fn split_after_the_encoder_sends_the_same_images() {
        use crate::core::encode::EncodeFanout;
        let cfg = Config {
            prefill_cluster: Some("prefill_cluster".into()),
            ..epd(EncodeFailure::Fallback, EncodeFanout::PerImage)
        };
        let (mut f, mut h, m, v) = start(cfg, TWO_IMAGES, true);
        assert_eq!(v, Verdict::Pause);
        assert_eq!(h.calls.len(), 2, "encode calls first, prefill after");
        assert!(h.calls.iter().all(|c| c.1 == "encode_cluster"));
        assert_eq!(
            answer_token(&mut f, &mut h, &m, 100, Some(200), "{}"),
            Verdict::Pause
        );
        assert_eq!(
            answer_token(&mut f, &mut h, &m, 101, Some(200), "{}"),
            Verdict::Pause
        );
        assert_eq!(h.resumed, 0, "still waiting for the prefill");
        assert_eq!(h.calls.len(), 3);
        let (token, cluster, id, prefill) = h.calls[2].clone();
        assert_eq!((cluster.as_str(), id.as_str()), ("prefill_cluster", "client-id"));
        let p: serde_json::Value = serde_json::from_slice(&prefill).expect("json");
        for (i, call) in h.calls[..2].iter().enumerate() {
            let e: serde_json::Value = serde_json::from_slice(&call.3).expect("json");
            let url = &e["messages"][0]["content"][0]["image_url"]["url"];
            let in_prefill = &p["messages"][0]["content"][i + 1]["image_url"];
            assert!(in_prefill == url || &in_prefill["url"] == url, "{i}");
        }
        // In flight at the prefill side while it prefills.
        assert_eq!(m.state().pd_inflight, 1);
        assert_eq!(
            answer_token(&mut f, &mut h, &m, token, Some(200), r#"{"id":"x"}"#),
            Verdict::Continue
        );
        assert_eq!(h.resumed, 1);
        assert_eq!(h.body, TWO_IMAGES.as_bytes(), "no params: the body as it was");
        f.on_response_headers(&mut h, &m);
        let hv = headers_of(&h);
        assert_eq!(
            (hv[HEADER_ENCODE].as_str(), hv[HEADER_PREFILL].as_str()),
            ("ok", "ok")
        );
        assert_eq!(hv[HEADER_KV_TRANSFER], "absent");
        f.on_done(&m);
        assert_released(&m);
    }

    #[test]
    fn prefill_failures_are_retried_then_answered_502() {
        let body = r#"{"messages":[{"role":"user","content":"hi"}]}"#;
        let (mut f, mut h, m, _) = start(split(PrefillFailure::Fail), body, true);
        assert_eq!(
            answer_token(&mut f, &mut h, &m, 100, Some(503), "busy"),
            Verdict::Pause
        );
        assert_eq!(h.calls.len(), 2, "retried");
        answer_token(&mut f, &mut h, &m, 101, None, "");
        let (status, reply) = h.reply.clone().expect("reply");
        assert_eq!(status, 502);
        let v: serde_json::Value = serde_json::from_slice(&reply).expect("json");
        assert_eq!(v["error"]["code"], "prefill_unavailable");
        assert_eq!(v["error"]["type"], "server_error");
        assert_eq!((h.resumed, h.body.as_slice()), (0, body.as_bytes()));
        let c = m.counts.borrow().clone();
        assert_eq!(
            (
                c[Counter::PrefillCalls.name()],
                c[Counter::PrefillRetries.name()],
                c[Counter::PrefillFailures.name()],
                c["prefill_unavailable"]
            ),
            (2, 1, 1, 1)
        );
        // A late answer changes nothing.
        assert_eq!(
            answer_token(&mut f, &mut h, &m, 101, Some(200), KV_ANSWER),
            Verdict::Continue
        );
        assert_eq!(h.resumed, 0);
    }

    #[test]
    fn client_errors_and_unreadable_answers() {
        let body = r#"{"messages":[{"role":"user","content":"hi"}]}"#;
        // A 4xx is not retried.
        let (mut f, mut h, m, _) = start(split(PrefillFailure::Fail), body, true);
        answer_token(&mut f, &mut h, &m, 100, Some(400), "{}");
        assert_eq!((h.calls.len(), h.reply.as_ref().map(|r| r.0)), (1, Some(502)));
        // A 2xx that is not a JSON object, or whose params are not an
        // object, is retried, then fails.
        for bad in ["not json", r#"{"kv_transfer_params":[1]}"#] {
            let (mut f, mut h, m, _) = start(split(PrefillFailure::Fail), body, true);
            assert_eq!(
                answer_token(&mut f, &mut h, &m, 100, Some(200), bad),
                Verdict::Pause
            );
            answer_token(&mut f, &mut h, &m, 101, Some(200), bad);
            assert_eq!(
                (h.calls.len(), h.reply.as_ref().map(|r| r.0)),
                (2, Some(502)),
                "{bad}"
            );
            assert_eq!(h.body, body.as_bytes());
        }
        // A body that is not JSON is refused before any call.
        let (_, h, _, v) = start(split(PrefillFailure::Fail), "{oops", true);
        assert_eq!((v, h.calls.len()), (Verdict::Pause, 0));
        assert_eq!(h.reply.as_ref().map(|r| r.0), Some(400));
    }

    #[test]
    fn prefill_fallback_sends_the_plain_request_to_decode() {
        let body = r#"{"stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
        let (mut f, mut h, m, _) = start(split(PrefillFailure::Fallback), body, true);
        answer_token(&mut f, &mut h, &m, 100, Some(500), "");
        assert_eq!(
            answer_token(&mut f, &mut h, &m, 101, Some(504), ""),
            Verdict::Continue
        );
        assert_eq!((h.resumed, h.body.as_slice()), (1, body.as_bytes()));
        assert!(h.reply.is_none());
        f.on_response_headers(&mut h, &m);
        assert_eq!(headers_of(&h)[HEADER_PREFILL], "fallback");
        assert_eq!(m.counts.borrow()[Counter::PrefillFallbacks.name()], 1);
        // A refused dispatch falls back at once, never paused.
        let mut h = host("POST", "/v1/chat/completions", body);
        h.refuse_dispatch = true;
        let mut f = filter(split(PrefillFailure::Fallback));
        f.on_request_headers(&mut h, &m, false);
        assert_eq!(f.on_request_body(&mut h, &m, body.len(), true), Verdict::Continue);
        assert_eq!((h.resumed, h.reply.is_none()), (0, true));
        // ... or fails at once.
        let mut h = host("POST", "/v1/chat/completions", body);
        h.refuse_dispatch = true;
        let mut f = filter(split(PrefillFailure::Fail));
        f.on_request_headers(&mut h, &m, false);
        assert_eq!(f.on_request_body(&mut h, &m, body.len(), true), Verdict::Pause);
        assert_eq!(h.reply.as_ref().map(|r| r.0), Some(502));
    }

    #[test]
    fn split_counters_return_to_zero_on_every_path() {
        use crate::core::encode::EncodeFanout;
        let m = FakeMetrics::default();
        for scenario in 0..48u32 {
            let cfg = Config {
                prefill_cluster: Some("prefill_cluster".into()),
                prefill_failure: if scenario % 2 == 0 {
                    PrefillFailure::Fail
                } else {
                    PrefillFailure::Fallback
                },
                policy: if scenario % 3 == 0 {
                    PolicyKind::Dynamic
                } else {
                    PolicyKind::Static
                },
                ..epd(EncodeFailure::Fallback, EncodeFanout::PerRequest)
            };
            let mut h = host("POST", "/v1/chat/completions", TWO_IMAGES);
            let mut f = filter(cfg);
            f.on_request_headers(&mut h, &m, false);
            f.on_request_body(&mut h, &m, TWO_IMAGES.len(), true);
            // Answer every call in turn (encode, then prefill) with a
            // scenario's status, and stop (client abort) after `abort_at`.
            let abort_at = (scenario / 2) % 6;
            let statuses = [Some(200), Some(503), None, Some(200), Some(200), Some(500)];
            for (step, status) in statuses.into_iter().enumerate() {
                if step as u32 >= abort_at {
                    break;
                }
                let Some(token) = h.calls.last().map(|c| c.0) else {
                    break;
                };
                answer_token(&mut f, &mut h, &m, token, status, KV_ANSWER);
            }
            f.on_done(&m);
            f.on_done(&m);
            assert_released(&m);
        }
    }

    const MEDIA: &str = r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"listen"},
        {"type":"input_audio","input_audio":{"data":"UklGRg==","format":"wav"}},
        {"type":"video_url","video_url":{"url":"data:video/mp4;base64,AAAA"}}]}]}"#;

    #[test]
    fn audio_and_video_parts_go_to_the_encoder_and_pass_through() {
        use crate::core::encode::EncodeFanout;
        let cfg = Config {
            prefill_cluster: Some("prefill_cluster".into()),
            ..epd(EncodeFailure::Fallback, EncodeFanout::PerImage)
        };
        let (mut f, mut h, m, v) = start(cfg, MEDIA, true);
        assert_eq!(v, Verdict::Pause, "no image, still the encode path");
        assert_eq!(h.calls.len(), 2);
        let parts: Vec<serde_json::Value> = h
            .calls
            .iter()
            .map(|c| {
                serde_json::from_slice::<serde_json::Value>(&c.3).expect("json")["messages"][0]["content"][0]
                    .clone()
            })
            .collect();
        assert_eq!(parts[0]["input_audio"]["data"], "UklGRg==");
        assert_eq!(parts[1]["video_url"]["url"], "data:video/mp4;base64,AAAA");
        answer_token(&mut f, &mut h, &m, 100, Some(200), "{}");
        answer_token(&mut f, &mut h, &m, 101, Some(200), "{}");
        assert_eq!(h.calls.len(), 3, "then the prefill");
        assert_eq!(h.calls[2].1, "prefill_cluster");
        answer_token(&mut f, &mut h, &m, 102, Some(200), "{}");
        assert_eq!((h.resumed, h.body.as_slice()), (1, MEDIA.as_bytes()));
        f.on_response_headers(&mut h, &m);
        let hv = headers_of(&h);
        assert_eq!((hv[HEADER_AUDIO].as_str(), hv[HEADER_VIDEO].as_str()), ("1", "1"));
        assert_eq!(
            (hv[HEADER_IMAGES].as_str(), hv[HEADER_ENCODE].as_str()),
            ("0", "ok")
        );
        let c = m.counts.borrow().clone();
        assert_eq!(
            (c[Counter::AudioParts.name()], c[Counter::VideoParts.name()]),
            (1, 1)
        );
        f.on_done(&m);
        assert_released(&m);
        // Nothing predicted, nothing calibrated.
        assert_eq!(m.state().calibration_samples, 0);
        // Without an encoder they are only counted.
        let (_, h, m, v) = start(Config::default(), MEDIA, true);
        assert_eq!((v, h.calls.len()), (Verdict::Continue, 0));
        assert_eq!(m.counts.borrow()[Counter::AudioParts.name()], 1);
    }
}
