//! The root context: configuration, and the poll of the encode and
//! prefill/decode clusters' Prometheus metrics (one VM polls, elected by a
//! lease in shared data).

use super::http::{Http, VmServices};
use super::metrics::{
    HostMetrics, COUNTER_POLLS, COUNTER_POLL_FAILURES, GAUGE_CLUSTER_FRESH, GAUGE_CLUSTER_RUNNING,
    GAUGE_CLUSTER_WAITING, GAUGE_PD_CLUSTER_RUNNING, GAUGE_PD_CLUSTER_WAITING,
};
use super::{hold, now_micros, shared, warn_err};
use crate::core::config::Config;
use crate::core::prometheus::sum_of;
use crate::core::residual::ResidualHistogram;
use crate::core::traffic::{ClusterSignal, TrafficState};
use crate::filter::{GaugeSet, Shared};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType, MapType};
use std::rc::Rc;
use std::time::Duration;

#[derive(Default)]
pub struct Root {
    shared: Option<Rc<Shared>>,
    services: Option<Rc<VmServices>>,
    metrics: Option<Rc<HostMetrics>>,
    /// This VM's identity for the poll lease.
    owner: u64,
    /// Tokens of the metrics polls in flight, by target.
    polls: Vec<(u32, Target)>,
    /// When the next metrics poll is due, µs.
    next_poll_us: u64,
    /// The metrics poll period (0: no poll).
    poll_ms: u64,
    /// The tick runs faster than the poll for the hold watchdog.
    fast_tick: bool,
}

/// A cluster whose `/metrics` the root context polls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Encode,
    PrefillDecode,
}

impl Target {
    /// Cluster and `:authority` of the poll, if configured.
    fn cluster(self, cfg: &Config) -> Option<(&str, &str)> {
        match self {
            Self::Encode => cfg
                .encode_cluster
                .as_deref()
                .map(|c| (c, cfg.encode_authority.as_str())),
            Self::PrefillDecode => cfg
                .pd_metrics_cluster
                .as_deref()
                .map(|c| (c, cfg.pd_metrics_authority.as_str())),
        }
    }

    fn key(self) -> &'static str {
        match self {
            Self::Encode => shared::CLUSTER_KEY,
            Self::PrefillDecode => shared::PD_CLUSTER_KEY,
        }
    }

    fn gauges(self) -> (&'static str, &'static str) {
        match self {
            Self::Encode => (GAUGE_CLUSTER_WAITING, GAUGE_CLUSTER_RUNNING),
            Self::PrefillDecode => (GAUGE_PD_CLUSTER_WAITING, GAUGE_PD_CLUSTER_RUNNING),
        }
    }
}

impl Root {
    fn configure(&mut self, config: Config) {
        log::info!(
            "vlm-budget: configured: policy={} static_budget_tokens={} ttft_slo_ms={} paths={:?} \
             encode_cluster={:?} fail_open={}",
            config.policy.name(),
            config.static_budget_tokens,
            config.ttft_slo_ms,
            config.paths,
            config.encode_cluster,
            config.fail_open
        );
        let metrics = Rc::clone(
            self.metrics
                .get_or_insert_with(|| Rc::new(HostMetrics::define_all())),
        );
        if self.owner == 0 {
            // Time of configuration and this VM's heap address: distinct per VM.
            self.owner = now_micros().rotate_left(17) ^ (Rc::as_ptr(&metrics) as u64) | 1;
        }
        shared::init(shared::TRAFFIC_KEY, &TrafficState::initial().encode());
        shared::init(shared::RESIDUALS_KEY, &ResidualHistogram::default().encode());
        let any_cluster = config.encode_cluster.is_some() || config.pd_metrics_cluster.is_some();
        let poll = if any_cluster { config.metrics_poll_ms } else { 0 };
        // The hold watchdog ticks faster until it has decided.
        let tick = match (config.hold_headers && hold::undecided(), poll) {
            (true, 0) => hold::TICK_MS,
            (true, ms) => ms.min(hold::TICK_MS),
            (false, ms) => ms,
        };
        self.poll_ms = poll;
        // The first poll one period after configuration, as with a tick of
        // the poll's period.
        self.next_poll_us = now_micros() + poll * 1000;
        self.fast_tick = tick != poll;
        if let Err(e) = hostcalls::set_tick_period(Duration::from_millis(tick)) {
            log::warn!("vlm-budget: cannot set the poll period: {e:?}");
        }
        self.services = Some(Rc::new(VmServices {
            metrics,
            window_s: config.rate_window_s,
        }));
        self.shared = Some(Rc::new(Shared::new(config)));
    }

    fn poll_metrics(&mut self, cfg: &Config, now: u64) {
        let targets = [Target::Encode, Target::PrefillDecode];
        if targets.iter().all(|t| t.cluster(cfg).is_none()) || !self.polls.is_empty() {
            return;
        }
        if cfg.metrics_poll_ms == 0 || now < self.next_poll_us {
            return;
        }
        let lease_until = now + 3 * cfg.metrics_poll_ms * 1000;
        if !shared::acquire_lease(self.owner, now, lease_until) {
            return;
        }
        self.next_poll_us = now + cfg.metrics_poll_ms * 1000;
        for target in targets {
            let Some((cluster, authority)) = target.cluster(cfg) else {
                continue;
            };
            let headers = vec![
                (":method", "GET"),
                (":path", cfg.metrics_path.as_str()),
                (":authority", authority),
                ("accept", "text/plain"),
            ];
            let timeout = Duration::from_millis(cfg.metrics_poll_ms.max(100));
            match hostcalls::dispatch_http_call(cluster, headers, None, vec![], timeout) {
                Ok(token) => self.polls.push((token, target)),
                Err(e) => {
                    log::warn!("vlm-budget: metrics poll of {cluster} refused: {e:?}");
                    self.bump(COUNTER_POLL_FAILURES);
                }
            }
        }
    }

    fn bump(&self, name: &str) {
        if let Some(m) = &self.metrics {
            m.bump(name);
        }
    }
}

impl Context for Root {
    fn on_http_call_response(&mut self, token: u32, _headers: usize, body_size: usize, _trailers: usize) {
        let Some(pos) = self.polls.iter().position(|p| p.0 == token) else {
            return;
        };
        let (_, target) = self.polls.swap_remove(pos);
        self.bump(COUNTER_POLLS);
        let status = hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, ":status")
            .ok()
            .flatten()
            .map(|s| String::from_utf8_lossy(&s).into_owned());
        let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
            .ok()
            .flatten();
        let text = body.as_deref().map(String::from_utf8_lossy);
        let reading = match (status.as_deref(), text) {
            (Some("200"), Some(text)) => {
                match (
                    sum_of(&text, "vllm:num_requests_waiting"),
                    sum_of(&text, "vllm:num_requests_running"),
                ) {
                    (Some(waiting), Some(running)) => Some((waiting, running)),
                    _ => None,
                }
            }
            _ => None,
        };
        match reading {
            Some((waiting, running)) => {
                let signal = ClusterSignal {
                    waiting,
                    running,
                    updated_us: now_micros(),
                };
                shared::set_cluster(target.key(), &signal);
                if let Some(m) = &self.metrics {
                    let (g_waiting, g_running) = target.gauges();
                    m.set(g_waiting, waiting);
                    m.set(g_running, running);
                    if target == Target::Encode {
                        m.set(GAUGE_CLUSTER_FRESH, 1.0);
                    }
                }
            }
            None => {
                log::debug!("vlm-budget: metrics poll failed (status {status:?})");
                self.bump(COUNTER_POLL_FAILURES);
            }
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX) {
            Ok(b) => b.unwrap_or_default(),
            Err(e) => {
                log::error!("vlm-budget: cannot read plugin configuration: {e:?}");
                return false;
            }
        };
        match Config::from_json(&bytes) {
            Ok(config) => {
                self.configure(config);
                true
            }
            Err(e) => {
                log::error!("vlm-budget: {e}");
                false
            }
        }
    }

    fn on_tick(&mut self) {
        let Some(shared) = self.shared.clone() else { return };
        let cfg = &shared.config;
        let now = now_micros();
        let fresh = shared::cluster(shared::CLUSTER_KEY).is_some_and(|c| c.fresh(now, cfg.metrics_stale_ms));
        if let Some(m) = &self.metrics {
            m.set(GAUGE_CLUSTER_FRESH, if fresh { 1.0 } else { 0.0 });
            m.publish(&shared::traffic(), GaugeSet::ALL, now, cfg.rate_window_s);
        }
        self.poll_metrics(cfg, now);
        let resume = hold::expired(now);
        if self.fast_tick && !hold::undecided() {
            self.fast_tick = false;
            warn_err(
                "tick period",
                hostcalls::set_tick_period(Duration::from_millis(self.poll_ms)),
            );
        }
        // Last: each resume makes that request the effective context.
        for context in resume {
            // The stream is alive: its entry is removed in on_done / on_log.
            if warn_err("held request", hostcalls::set_effective_context(context)).is_some() {
                warn_err("resume held request", hostcalls::resume_http_request());
            }
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let shared = self.shared.clone()?;
        let services = self.services.clone()?;
        Some(Box::new(Http::new(shared, services, context_id)))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
