//! The HTTP servers: one per role, each an OpenAI-compatible vLLM instance.

use crate::analyse::{analyse, Analysis, Limits};
use crate::cache::{CacheError, EcCache};
use crate::cli::{Config, DecodeModel};
use crate::debug::{DebugLog, FaultState, Faults, LogEntry, LogImage};
use crate::error::ApiError;
use crate::latency::{LatencyError, LatencyModel, BUILTIN_DATA};
use crate::metrics::{FinishReason, Finished, Gauge, Metrics};
use crate::openai::{self, Meta, Usage};
use crate::pd::{Decoder, Pace, PrefillJob, PrefillPool};
use crate::rng;
pub use crate::sched::RoleKind;
use crate::sched::{after, EncodeJob, EncodePool, TimeModel};
use bytes::Bytes;
use http_body_util::channel::Channel;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use vlm_budget::core::sizing::SizingRule;

/// Response body type.
pub type Body = BoxBody<Bytes, Infallible>;

/// Context length reported by `/v1/models` (Qwen2.5-VL-3B's).
const MAX_MODEL_LEN: u64 = 32_768;

/// Why the emulator could not start.
#[derive(Debug)]
pub enum StartError {
    LatencyFile { path: PathBuf, source: std::io::Error },
    Latency(LatencyError),
    Cache(CacheError),
    Bind { addr: String, source: std::io::Error },
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::LatencyFile { path, source } => {
                write!(f, "cannot read latency data {}: {source}", path.display())
            }
            Self::Latency(e) => e.fmt(f),
            Self::Cache(e) => e.fmt(f),
            Self::Bind { addr, source } => write!(f, "cannot listen on {addr}: {source}"),
        }
    }
}

impl std::error::Error for StartError {}

/// State shared by the instances of one process.
struct Shared {
    config: Config,
    time: Arc<TimeModel>,
    limits: Limits,
    cache: Arc<EcCache>,
    /// KV transfers a split's prefill instance has opened (transfer ids).
    transfers: Arc<EcCache>,
    log: DebugLog,
    started: Instant,
    started_unix: u64,
    requests: AtomicU64,
}

enum Engine {
    Encode(EncodePool),
    Pd(PrefillPool),
}

/// One role's server.
struct Instance {
    role: RoleKind,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    faults: FaultState,
    engine: Engine,
}

/// The running emulator. Dropping it stops accepting connections.
#[derive(Debug)]
pub struct Running {
    pub encode_addr: Option<SocketAddr>,
    pub pd_addr: Option<SocketAddr>,
    /// The prefill instance of a split.
    pub prefill_addr: Option<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Stops the listeners and GPU tasks.
    pub fn shutdown(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Loads the time model the configuration asks for.
pub fn time_model(config: &Config) -> Result<TimeModel, StartError> {
    let latency = match &config.latency_data {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| StartError::LatencyFile {
                path: path.clone(),
                source,
            })?;
            LatencyModel::from_json(&text, &config.encoder_variant)
        }
        None => LatencyModel::from_json(BUILTIN_DATA, &config.encoder_variant),
    }
    .map_err(StartError::Latency)?;
    let (encode_preprocess, pd_preprocess) = config.preprocess_rates();
    Ok(TimeModel {
        latency,
        speed_factor: config.speed_factor,
        encode_preprocess_ms_per_mpixel: encode_preprocess,
        pd_preprocess_ms_per_mpixel: pd_preprocess,
        jitter_sigma: config.jitter_sigma,
        seed: config.seed,
        time_scale: config.time_scale,
        decode_model: config.decode_model,
        decode_step_ms: config.decode_step_ms,
        decode_step_ms_per_request: config.decode_step_ms_per_request,
        decode_ms_per_token: config.decode_ms_per_token,
    })
}

/// Binds the listeners of the configured role(s) and starts serving.
/// Must be called within a Tokio runtime.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let time = Arc::new(time_model(&config)?);
    let cache = Arc::new(match &config.ec_cache_dir {
        Some(dir) => EcCache::dir(dir).map_err(StartError::Cache)?,
        None => EcCache::memory(),
    });
    let transfers = Arc::new(match &config.kv_transfer_dir {
        Some(dir) => EcCache::dir(dir).map_err(StartError::Cache)?,
        None => EcCache::memory(),
    });
    let rule = SizingRule {
        min_pixels: config.min_pixels,
        max_pixels: config.max_pixels,
        ..SizingRule::QWEN2_5_VL
    };
    let limits = Limits {
        rule,
        max_image_pixels: config.max_image_pixels,
    };
    let bind = |port: u16| {
        let addr = format!("{}:{port}", config.host);
        async move {
            TcpListener::bind(addr.as_str())
                .await
                .map_err(|source| StartError::Bind { addr, source })
        }
    };
    // Bind first so that a port conflict fails before anything starts.
    let encode_listener = match config.role.has_encode() {
        true => Some(bind(config.encode_port).await?),
        false => None,
    };
    let pd_listener = match config.role.has_pd() {
        true => Some(bind(config.pd_port).await?),
        false => None,
    };
    let prefill_listener = match config.role.has_prefill() {
        true => Some(bind(config.prefill_port).await?),
        false => None,
    };
    let pd_kind = match config.role.pd_is_decode() {
        true => RoleKind::Decode,
        false => RoleKind::Pd,
    };
    let shared = Arc::new(Shared {
        log: DebugLog::new(config.debug_log_capacity),
        time: time.clone(),
        limits,
        cache: cache.clone(),
        transfers,
        started: Instant::now(),
        started_unix: unix_now(),
        requests: AtomicU64::new(0),
        config,
    });
    let mut running = Running {
        encode_addr: None,
        pd_addr: None,
        prefill_addr: None,
        tasks: Vec::new(),
    };
    if let Some(listener) = encode_listener {
        let (pool, tasks) = EncodePool::spawn(
            shared.config.encode_gpus,
            shared.config.max_num_batched_tokens,
            time.clone(),
        );
        running.tasks.extend(tasks);
        running.encode_addr = listener.local_addr().ok();
        let inst = Arc::new(Instance::new(
            RoleKind::Encode,
            shared.clone(),
            Engine::Encode(pool),
        ));
        running.tasks.push(tokio::spawn(accept_loop(listener, inst)));
    }
    if let Some(listener) = pd_listener {
        let (pool, tasks) = PrefillPool::spawn(shared.config.pd_gpus, time.clone(), cache.clone());
        running.tasks.extend(tasks);
        running.pd_addr = listener.local_addr().ok();
        let inst = Arc::new(Instance::new(pd_kind, shared.clone(), Engine::Pd(pool)));
        running.tasks.push(tokio::spawn(accept_loop(listener, inst)));
    }
    if let Some(listener) = prefill_listener {
        let (pool, tasks) = PrefillPool::spawn(shared.config.pd_gpus, time.clone(), cache.clone());
        running.tasks.extend(tasks);
        running.prefill_addr = listener.local_addr().ok();
        let inst = Arc::new(Instance::new(RoleKind::Prefill, shared.clone(), Engine::Pd(pool)));
        running.tasks.push(tokio::spawn(accept_loop(listener, inst)));
    }
    Ok(running)
}

async fn accept_loop(listener: TcpListener, inst: Arc<Instance>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: back off, keep serving.
                eprintln!("vlm-emulator: {} accept failed: {e}", inst.role.as_str());
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let inst = inst.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| route(inst.clone(), req));
            // Connection errors (client gone, malformed HTTP) end that
            // connection only.
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

fn json_response(status: u16, body: Vec<u8>) -> Response<Body> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn error_response(e: &ApiError) -> Response<Body> {
    json_response(e.status, e.to_json())
}

fn set_header(resp: &mut Response<Body>, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        resp.headers_mut().insert(name, v);
    }
}

const ROUTES: &[&str] = &[
    "/health",
    "/v1/models",
    "/metrics",
    "/v1/chat/completions",
    "/debug/requests",
    "/debug/faults",
    "/debug/ec-cache",
];

async fn route(inst: Arc<Instance>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let mut resp = match (&method, path.as_str()) {
        (&Method::GET, "/health") => Response::new(full(Bytes::new())),
        (&Method::GET, "/v1/models") => json_response(
            200,
            openai::models(&inst.shared.config.model, inst.shared.started_unix, MAX_MODEL_LEN)
                .to_string()
                .into_bytes(),
        ),
        (&Method::GET, "/metrics") => {
            let mut r = Response::new(full(inst.metrics.render()));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        (&Method::POST, "/v1/chat/completions") => inst.clone().chat(req).await,
        (&Method::GET, "/debug/requests") => json_response(200, inst.shared.log.to_json()),
        (&Method::DELETE, "/debug/requests") => {
            let n = inst.shared.log.clear();
            json_response(200, format!("{{\"cleared\":{n}}}").into_bytes())
        }
        (&Method::GET, "/debug/faults") => json_response(200, faults_json(inst.faults.get())),
        (&Method::POST, "/debug/faults") => match read_body(req.into_body(), 1 << 16).await {
            Ok(body) => match Faults::parse(&body) {
                Ok(f) => {
                    inst.faults.set(f);
                    json_response(200, faults_json(f))
                }
                Err(msg) => error_response(&ApiError::bad_request("invalid_faults", msg)),
            },
            Err(e) => error_response(&e),
        },
        (&Method::DELETE, "/debug/ec-cache") => match inst.shared.cache.clear() {
            Ok(n) => json_response(200, format!("{{\"cleared\":{n}}}").into_bytes()),
            Err(e) => error_response(&ApiError::with_status(500, "cache_error", e.to_string())),
        },
        (_, p) if ROUTES.contains(&p) => error_response(&ApiError::with_status(
            405,
            "method_not_allowed",
            format!("{method} is not allowed on {p}"),
        )),
        (_, p) => error_response(&ApiError::with_status(
            404,
            "not_found",
            format!("no route for {p}"),
        )),
    };
    set_header(&mut resp, "x-emulator-role", inst.role.as_str());
    Ok(resp)
}

fn faults_json(f: Faults) -> Vec<u8> {
    serde_json::to_vec(&f).unwrap_or_else(|_| b"{}".to_vec())
}

async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, ApiError> {
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(ApiError::with_status(
            413,
            "body_too_large",
            format!("request body is larger than the {limit}-byte limit"),
        )),
        Err(e) => Err(ApiError::bad_request(
            "invalid_body",
            format!("cannot read the request body: {e}"),
        )),
    }
}

/// Moves a gauge by +1 now and -1 when dropped.
struct GaugeGuard {
    metrics: Arc<Metrics>,
    gauge: Gauge,
}

impl GaugeGuard {
    fn new(metrics: &Arc<Metrics>, gauge: Gauge) -> Self {
        metrics.add_gauge(gauge, 1);
        Self {
            metrics: metrics.clone(),
            gauge,
        }
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.metrics.add_gauge(self.gauge, -1);
    }
}

/// Timings and cache results of a request, for headers and the log.
#[derive(Debug, Default)]
struct Stats {
    /// Per image: found in the encoder cache.
    hits: Vec<bool>,
    preprocess_ms: f64,
    queue_ms: f64,
    encode_ms: f64,
    prefill_ms: f64,
    /// Decode of a split: the prefilled KV cache's transfer.
    kv_transfer_ms: f64,
    ttft_ms: f64,
}

impl Stats {
    fn cache(&self) -> &'static str {
        let hits = self.hits.iter().filter(|&&h| h).count();
        match (self.hits.len(), hits) {
            (0, _) => "none",
            (n, h) if h == n => "hit",
            (_, 0) => "miss",
            _ => "partial",
        }
    }
}

/// Why a request stopped before its last token.
#[derive(Debug, Clone, Copy)]
struct EarlyEnd {
    status: u16,
    code: &'static str,
}

/// The client went away: vLLM aborts the request.
const CLIENT_GONE: EarlyEnd = EarlyEnd {
    status: 499,
    code: "client_disconnected",
};

/// The GPU task stopped (the emulator is shutting down).
const DECODE_STOPPED: EarlyEnd = EarlyEnd {
    status: 500,
    code: "internal_error",
};

/// A request that reached its first token.
struct Served {
    analysis: Analysis,
    stats: Stats,
    first_token_at: Instant,
    output_tokens: u64,
    finish: FinishReason,
    pace: Pace,
    /// Held until the last token.
    running: Option<GaugeGuard>,
    /// The KV transfer this request took (a split's decode).
    kv_transfer: Option<String>,
}

fn fmt_ms(ms: f64) -> String {
    format!("{ms:.3}")
}

impl Instance {
    fn new(role: RoleKind, shared: Arc<Shared>, engine: Engine) -> Self {
        Self {
            role,
            metrics: Arc::new(Metrics::new(&shared.config.model)),
            shared,
            faults: FaultState::default(),
            engine,
        }
    }

    fn emulated_ms(&self, d: Duration) -> f64 {
        self.shared.time.emulated_ms(d)
    }

    fn stats_headers(&self, resp: &mut Response<Body>, analysis: Option<&Analysis>, stats: &Stats) {
        let (visual, images) = analysis.map_or((0, 0), |a| (a.visual_tokens(), a.images.len()));
        set_header(resp, "x-emulator-visual-tokens", &visual.to_string());
        set_header(resp, "x-emulator-images", &images.to_string());
        set_header(resp, "x-emulator-ec-cache", stats.cache());
        set_header(resp, "x-emulator-preprocess-ms", &fmt_ms(stats.preprocess_ms));
        set_header(resp, "x-emulator-queue-ms", &fmt_ms(stats.queue_ms));
        set_header(resp, "x-emulator-encode-ms", &fmt_ms(stats.encode_ms));
        set_header(resp, "x-emulator-prefill-ms", &fmt_ms(stats.prefill_ms));
        set_header(resp, "x-emulator-ttft-ms", &fmt_ms(stats.ttft_ms));
        if self.role == RoleKind::Decode {
            set_header(resp, "x-emulator-kv-transfer-ms", &fmt_ms(stats.kv_transfer_ms));
        }
    }

    fn log_entry(&self, request_id: Option<String>, arrival: Instant, status: u16) -> LogEntry {
        LogEntry {
            role: self.role.as_str(),
            request_id,
            arrival_ms: arrival
                .saturating_duration_since(self.shared.started)
                .as_secs_f64()
                * 1000.0,
            images: Vec::new(),
            max_tokens: None,
            stream: false,
            status,
            error: None,
            prompt_tokens: 0,
            completion_tokens: 0,
            ttft_ms: None,
            e2e_ms: None,
            kv_transfer: None,
        }
    }

    /// `POST /v1/chat/completions`.
    async fn chat(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let arrival = Instant::now();
        let request_id = req
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let (delay_ms, fail) = self.faults.take();
        let outcome = match (
            read_body(req.into_body(), self.shared.config.max_body_bytes).await,
            fail,
        ) {
            (Err(e), _) => Err((e, None)),
            (Ok(_), Some(status)) => Err((
                ApiError::with_status(
                    status,
                    "injected_fault",
                    format!("injected fault: status {status}"),
                ),
                None,
            )),
            (Ok(body), None) => self.clone().serve(body, arrival).await,
        };
        let mut resp = match outcome {
            Ok(served) => self.clone().respond(served, arrival, request_id.clone()).await,
            Err((e, analysis)) => {
                let mut entry = self.log_entry(request_id.clone(), arrival, e.status);
                entry.error = Some(e.code);
                if let Some(a) = &analysis {
                    entry.max_tokens = a.params.requested_max_tokens();
                    entry.stream = a.params.stream();
                }
                self.shared.log.push(entry);
                let mut resp = error_response(&e);
                self.stats_headers(&mut resp, analysis.as_ref(), &Stats::default());
                resp
            }
        };
        if delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        }
        if let Some(id) = &request_id {
            set_header(&mut resp, "x-request-id", id);
        }
        resp
    }

    /// Decodes, preprocesses, queues and prefills: up to the first token.
    async fn serve(
        self: Arc<Self>,
        body: Bytes,
        arrival: Instant,
    ) -> Result<Served, (ApiError, Option<Analysis>)> {
        let body_at = Instant::now();
        let limits = self.shared.limits;
        let analysis = match tokio::task::spawn_blocking(move || analyse(&body, &limits)).await {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => return Err((e, None)),
            Err(e) => {
                return Err((
                    ApiError::with_status(500, "internal_error", format!("image decoding failed: {e}")),
                    None,
                ))
            }
        };
        // A split's decode takes only a KV cache it knows of: a transfer id
        // the prefill instance never opened is refused before any work.
        let transfer = match (self.role, analysis.params.remote_prefill()) {
            (RoleKind::Decode, Some(id)) => match self.known_transfer(id) {
                Some(id) => Some(id),
                None => {
                    let e = ApiError::bad_request(
                        "unknown_kv_transfer",
                        format!(
                            "no KV transfer {:?} was prefilled for this instance",
                            id.unwrap_or("")
                        ),
                    );
                    return Err((e, Some(analysis)));
                }
            },
            _ => None,
        };
        let time = &self.shared.time;
        // Preprocessing: the modelled CPU time from the moment the whole body
        // is here (a server cannot preprocess images it has not received,
        // even when a proxy sent the headers early), or the real decoding
        // time if that was longer.
        let preprocess_model = time.preprocess_ms(self.role, analysis.pixels());
        tokio::time::sleep_until(after(body_at, time.wall(preprocess_model))).await;
        let mut stats = Stats {
            preprocess_ms: self.emulated_ms(arrival.elapsed()),
            ..Stats::default()
        };
        self.metrics
            .images(analysis.images.len() as u64, analysis.visual_tokens());
        let config = &self.shared.config;
        let (output_tokens, finish) = match self.role {
            RoleKind::Encode => (1, FinishReason::Length),
            RoleKind::Pd | RoleKind::Prefill | RoleKind::Decode => {
                match analysis.params.requested_max_tokens() {
                    Some(n) => (n.min(config.max_output_tokens), FinishReason::Length),
                    None => (
                        config.default_output_tokens.min(config.max_output_tokens),
                        FinishReason::Stop,
                    ),
                }
            }
        };
        let outcome = match &self.engine {
            Engine::Encode(pool) => self.encode(pool, &analysis, &mut stats).await,
            Engine::Pd(pool) => {
                self.prefill(pool, &analysis, output_tokens, transfer.is_some(), &mut stats)
                    .await
            }
        };
        let (running, pace) = match outcome {
            Ok(r) => r,
            Err(e) => return Err((e, Some(analysis))),
        };
        let first_token_at = Instant::now();
        stats.ttft_ms = self.emulated_ms(first_token_at - arrival);
        Ok(Served {
            analysis,
            stats,
            first_token_at,
            output_tokens,
            finish,
            pace,
            running,
            kv_transfer: transfer,
        })
    }

    /// The transfer named, if the prefill instance opened it.
    fn known_transfer(&self, id: Option<&str>) -> Option<String> {
        let key = u128::from_str_radix(id?, 16).ok()?;
        self.shared.transfers.contains(key).then(|| format!("{key:032x}"))
    }

    /// The encode role: encoder-cache lookups, then the images the cache
    /// lacks through the encode GPUs; their keys are stored when done.
    async fn encode(
        &self,
        pool: &EncodePool,
        analysis: &Analysis,
        stats: &mut Stats,
    ) -> Result<(Option<GaugeGuard>, Pace), ApiError> {
        let cache = &self.shared.cache;
        stats.hits = analysis
            .images
            .iter()
            .map(|i| cache.contains(i.pixel_hash))
            .collect();
        let misses: Vec<_> = analysis
            .images
            .iter()
            .zip(&stats.hits)
            .filter(|(_, &hit)| !hit)
            .map(|(i, _)| i)
            .collect();
        self.metrics
            .ec_lookups((stats.hits.len() - misses.len()) as u64, misses.len() as u64);
        if misses.is_empty() {
            return Ok((None, Pace::Done));
        }
        let enqueued = Instant::now();
        let waiting = GaugeGuard::new(&self.metrics, Gauge::Waiting);
        let (started_tx, started_rx) = oneshot::channel();
        let mut started_tx = Some(started_tx);
        let mut receivers = Vec::with_capacity(misses.len());
        let jobs = misses
            .iter()
            .map(|img| {
                let (tx, rx) = oneshot::channel();
                receivers.push(rx);
                EncodeJob {
                    tokens: img.visual_tokens,
                    started: started_tx.take(),
                    done: tx,
                }
            })
            .collect();
        pool.submit(jobs);
        // An error means the GPU task is gone; the waits below report it.
        let _ = started_rx.await;
        drop(waiting);
        let running = GaugeGuard::new(&self.metrics, Gauge::Running);
        let mut batches = BTreeMap::new();
        for rx in receivers {
            let done = rx
                .await
                .map_err(|_| ApiError::with_status(500, "internal_error", "the encoder stopped"))?;
            batches.insert(done.batch, done.service_ms);
        }
        drop(running);
        for img in &misses {
            if let Err(e) = cache.insert(img.pixel_hash) {
                eprintln!("vlm-emulator: {e}");
            }
        }
        stats.encode_ms = batches.values().sum();
        stats.queue_ms = (self.emulated_ms(enqueued.elapsed()) - stats.encode_ms).max(0.0);
        Ok((None, Pace::Done))
    }

    /// The prefill/decode role: one prefill at a time per GPU, running the
    /// encoder first for images the cache lacks; with the queued decode
    /// model that GPU's decode steps make the `output_tokens - 1` others.
    async fn prefill(
        &self,
        pool: &PrefillPool,
        analysis: &Analysis,
        output_tokens: u64,
        remote_kv: bool,
        stats: &mut Stats,
    ) -> Result<(Option<GaugeGuard>, Pace), ApiError> {
        let time = &self.shared.time;
        if remote_kv {
            // The prefilled KV cache comes over the network first (not GPU
            // work): its size grows with the prompt.
            let ms = self.shared.config.kv_transfer_ms_per_ktoken * analysis.prompt_tokens() as f64 / 1000.0;
            tokio::time::sleep(time.wall(ms)).await;
            stats.kv_transfer_ms = ms;
        }
        let (decoder, pace) = match (time.decode_model, output_tokens > 1) {
            (DecodeModel::Queued, true) => {
                let (d, rx) = Decoder::new(output_tokens - 1);
                (Some(d), Pace::Steps(rx, 0))
            }
            (DecodeModel::Queued, false) => (None, Pace::Done),
            (DecodeModel::Free, _) => (None, Pace::Free(time.decode_ms_per_token)),
        };
        let enqueued = Instant::now();
        let waiting = GaugeGuard::new(&self.metrics, Gauge::Waiting);
        let (started_tx, started_rx) = oneshot::channel();
        let (done_tx, done_rx) = oneshot::channel();
        pool.submit(PrefillJob {
            images: analysis
                .images
                .iter()
                .map(|i| (i.pixel_hash, i.visual_tokens))
                .collect(),
            prompt_tokens: analysis.prompt_tokens(),
            remote_kv,
            decoder,
            started: Some(started_tx),
            done: done_tx,
        });
        let _ = started_rx.await;
        drop(waiting);
        let running = GaugeGuard::new(&self.metrics, Gauge::Running);
        let done = done_rx
            .await
            .map_err(|_| ApiError::with_status(500, "internal_error", "the prefill GPU stopped"))?;
        let hits = done.hits.iter().filter(|&&h| h).count() as u64;
        self.metrics.ec_lookups(hits, done.hits.len() as u64 - hits);
        stats.hits = done.hits;
        stats.encode_ms = done.encode_ms;
        stats.prefill_ms = done.prefill_ms;
        stats.queue_ms =
            (self.emulated_ms(enqueued.elapsed()) - done.encode_ms - done.prefill_ms - stats.kv_transfer_ms)
                .max(0.0);
        Ok((Some(running), pace))
    }

    fn meta(&self, analysis: &Analysis) -> Meta {
        let n = self.shared.requests.fetch_add(1, Ordering::Relaxed);
        let seed = self.shared.config.seed;
        Meta {
            id: format!(
                "chatcmpl-{:016x}{:016x}",
                rng::draw(seed, 11, n),
                rng::draw(seed, 12, n)
            ),
            created: unix_now(),
            model: analysis
                .params
                .model
                .clone()
                .unwrap_or_else(|| self.shared.config.model.clone()),
        }
    }

    /// Emits the tokens: one JSON body after the last, or an SSE stream.
    async fn respond(
        self: Arc<Self>,
        served: Served,
        arrival: Instant,
        request_id: Option<String>,
    ) -> Response<Body> {
        let meta = self.meta(&served.analysis);
        let usage = Usage {
            prompt_tokens: served.analysis.prompt_tokens(),
            completion_tokens: served.output_tokens,
        };
        let mut entry = self.log_entry(request_id, arrival, 200);
        entry.images = served
            .analysis
            .images
            .iter()
            .zip(&served.stats.hits)
            .map(|(i, &hit)| LogImage {
                sha256: i.sha256.clone(),
                width: i.width,
                height: i.height,
                visual_tokens: i.visual_tokens,
                cache: if hit { "hit" } else { "miss" },
            })
            .collect();
        entry.max_tokens = served.analysis.params.requested_max_tokens();
        entry.stream = served.analysis.params.stream();
        entry.prompt_tokens = usage.prompt_tokens;
        entry.completion_tokens = usage.completion_tokens;
        entry.ttft_ms = Some(served.stats.ttft_ms);
        entry.kv_transfer.clone_from(&served.kv_transfer);
        // A split's prefill opens the transfer its decode will take.
        let opened = (self.role == RoleKind::Prefill && served.analysis.params.remote_decode())
            .then(|| self.open_transfer(&meta, usage.prompt_tokens));
        if let Some((id, _)) = &opened {
            entry.kv_transfer = Some(id.clone());
        }
        let (seed, key) = (self.shared.config.seed, served.analysis.body_hash);
        let time = self.shared.time.clone();
        let first = served.first_token_at;
        let mut served = served;

        if !served.analysis.params.stream() {
            let last = served.output_tokens.saturating_sub(1);
            if !served.pace.until(&time, first, last).await {
                entry.status = 500;
                entry.error = Some(DECODE_STOPPED.code);
                self.shared.log.push(entry);
                let e = ApiError::with_status(
                    DECODE_STOPPED.status,
                    DECODE_STOPPED.code,
                    "the decode GPU stopped",
                );
                let mut resp = error_response(&e);
                self.stats_headers(&mut resp, Some(&served.analysis), &served.stats);
                return resp;
            }
            let content = openai::text(seed, key, served.output_tokens);
            let mut body = openai::completion(&meta, &content, served.finish, usage);
            if let (Some((_, params)), Some(obj)) = (opened, body.as_object_mut()) {
                obj.insert("kv_transfer_params".into(), params);
            }
            self.finish(&served, arrival, entry);
            let mut resp = json_response(200, body.to_string().into_bytes());
            self.stats_headers(&mut resp, Some(&served.analysis), &served.stats);
            return resp;
        }

        let include_usage = served.analysis.params.include_usage();
        let (mut tx, body) = Channel::<Bytes, Infallible>::new(16);
        let mut resp = Response::new(body.boxed());
        resp.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream; charset=utf-8"),
        );
        resp.headers_mut()
            .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        self.stats_headers(&mut resp, Some(&served.analysis), &served.stats);
        let inst = self.clone();
        tokio::spawn(async move {
            let n = served.output_tokens;
            let mut ended = None;
            let role = openai::sse(&openai::role_chunk(&meta, include_usage));
            if tx.send_data(role.into()).await.is_err() {
                ended = Some(CLIENT_GONE);
            }
            for i in 0..n {
                if ended.is_some() {
                    break;
                }
                if !served.pace.until(&time, first, i).await {
                    ended = Some(DECODE_STOPPED);
                    break;
                }
                let finish = (i + 1 == n).then_some(served.finish);
                let chunk = openai::token_chunk(&meta, &openai::token(seed, key, i), finish, include_usage);
                if tx.send_data(openai::sse(&chunk).into()).await.is_err() {
                    ended = Some(CLIENT_GONE);
                }
            }
            if ended.is_none() && include_usage {
                let chunk = openai::sse(&openai::usage_chunk(&meta, usage));
                if tx.send_data(chunk.into()).await.is_err() {
                    ended = Some(CLIENT_GONE);
                }
            }
            if ended.is_none() && tx.send_data(Bytes::from_static(openai::SSE_DONE)).await.is_err() {
                ended = Some(CLIENT_GONE);
            }
            match ended {
                None => inst.finish(&served, arrival, entry),
                Some(end) => {
                    entry.status = end.status;
                    entry.error = Some(end.code);
                    inst.shared.log.push(entry);
                }
            }
            drop(served.running);
        });
        resp
    }

    /// Opens a KV transfer for a prefilled request: its id (the response
    /// id's 32 hex digits) and the `kv_transfer_params` decode needs, in
    /// the shape vLLM's NIXL connector answers with.
    fn open_transfer(&self, meta: &Meta, prompt_tokens: u64) -> (String, serde_json::Value) {
        let hex = meta.id.trim_start_matches("chatcmpl-");
        let key = u128::from_str_radix(hex, 16).unwrap_or_default();
        if let Err(e) = self.shared.transfers.insert(key) {
            eprintln!("vlm-emulator: {e}");
        }
        let id = format!("{key:032x}");
        let blocks: Vec<u64> = (0..prompt_tokens.div_ceil(16)).collect();
        let port = self.shared.config.prefill_port;
        let params = serde_json::json!({
            "do_remote_prefill": true,
            "do_remote_decode": false,
            "remote_engine_id": format!("emulator-prefill-{:x}", self.shared.config.seed),
            "remote_block_ids": blocks,
            "remote_host": self.shared.config.host,
            "remote_port": port,
            "tp_size": 1,
            "transfer_id": id,
        });
        (id, params)
    }

    /// Records a request that produced all its tokens.
    fn finish(&self, served: &Served, arrival: Instant, mut entry: LogEntry) {
        let e2e_ms = self.emulated_ms(arrival.elapsed());
        entry.e2e_ms = Some(e2e_ms);
        self.metrics.finished(Finished {
            prompt_tokens: served.analysis.prompt_tokens(),
            generation_tokens: served.output_tokens,
            reason: served.finish,
            ttft_s: served.stats.ttft_ms / 1000.0,
            e2e_s: e2e_ms / 1000.0,
        });
        self.shared.log.push(entry);
    }
}
