//! Metric definitions (one set per VM; VMs share metrics of the same name).

use crate::core::error::FilterError;
use crate::core::residual::Margin;
use crate::core::traffic::TrafficState;
use crate::filter::host::{
    error_metric_name, ENCODE_HISTOGRAM, TRANSCODE_HISTOGRAM, TTFT_ERROR_HISTOGRAM, TTFT_HISTOGRAM,
    TTFT_OVERESTIMATE_HISTOGRAM, VM_MEMORY_GAUGE,
};
use crate::filter::{Counter, GaugeSet, Metrics};
use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;
use std::collections::HashMap;

/// Gauges of the shared traffic state and of the cluster signal.
pub const GAUGE_ENCODE_INFLIGHT: &str = "vlm_budget_encode_inflight";
pub const GAUGE_PD_INFLIGHT: &str = "vlm_budget_pd_inflight";
pub const GAUGE_OUTSTANDING_MS: &str = "vlm_budget_encode_outstanding_ms";
pub const GAUGE_CALIBRATION: &str = "vlm_budget_calibration_factor_milli";
pub const GAUGE_REQUEST_RATE: &str = "vlm_budget_image_request_rate_milli";
pub const GAUGE_TOKEN_RATE: &str = "vlm_budget_visual_token_rate";
pub const GAUGE_CLUSTER_FRESH: &str = "vlm_budget_cluster_signal_fresh";
pub const GAUGE_CLUSTER_WAITING: &str = "vlm_budget_cluster_waiting";
pub const GAUGE_CLUSTER_RUNNING: &str = "vlm_budget_cluster_running";
pub const GAUGE_PD_CLUSTER_WAITING: &str = "vlm_budget_pd_cluster_waiting";
pub const GAUGE_PD_CLUSTER_RUNNING: &str = "vlm_budget_pd_cluster_running";
pub const GAUGE_PD_PENDING: &str = "vlm_budget_pd_pending";
pub const GAUGE_PD_OUTSTANDING_MS: &str = "vlm_budget_pd_outstanding_ms";
pub const GAUGE_PD_CALIBRATION: &str = "vlm_budget_pd_calibration_factor_milli";
pub const GAUGE_TRANSCODE_SPEED: &str = "vlm_budget_transcode_ms_per_mpixel";
pub const GAUGE_MARGIN: &str = "vlm_budget_ttft_margin_ms";
pub const GAUGE_MARGIN_SLOPE: &str = "vlm_budget_ttft_margin_us_per_token";
pub const COUNTER_POLLS: &str = "vlm_budget_metrics_polls_total";
pub const COUNTER_POLL_FAILURES: &str = "vlm_budget_metrics_poll_failures_total";

/// Metric ids of this VM.
#[derive(Default)]
pub struct HostMetrics {
    /// Indexed by `Counter as usize` (a lookup on every request).
    counters: [Option<u32>; Counter::ALL.len()],
    errors: HashMap<&'static str, u32>,
    named: HashMap<&'static str, u32>,
    transcode: Option<u32>,
    encode: Option<u32>,
    ttft: Option<u32>,
    ttft_error: Option<u32>,
    ttft_overestimate: Option<u32>,
    /// This VM's linear memory in bytes (it never shrinks).
    pub memory: Option<u32>,
}

fn define(kind: MetricType, name: &str) -> Option<u32> {
    match hostcalls::define_metric(kind, name) {
        Ok(id) => Some(id),
        Err(e) => {
            log::warn!("vlm-budget: cannot define metric {name}: {e:?}");
            None
        }
    }
}

const GAUGES: [&str; 17] = [
    GAUGE_ENCODE_INFLIGHT,
    GAUGE_PD_INFLIGHT,
    GAUGE_OUTSTANDING_MS,
    GAUGE_CALIBRATION,
    GAUGE_REQUEST_RATE,
    GAUGE_TOKEN_RATE,
    GAUGE_CLUSTER_FRESH,
    GAUGE_CLUSTER_WAITING,
    GAUGE_CLUSTER_RUNNING,
    GAUGE_PD_CLUSTER_WAITING,
    GAUGE_PD_CLUSTER_RUNNING,
    GAUGE_PD_PENDING,
    GAUGE_PD_OUTSTANDING_MS,
    GAUGE_PD_CALIBRATION,
    GAUGE_TRANSCODE_SPEED,
    GAUGE_MARGIN,
    GAUGE_MARGIN_SLOPE,
];

impl HostMetrics {
    pub fn define_all() -> Self {
        let counters = Counter::ALL.map(|c| define(MetricType::Counter, c.name()));
        let errors = FilterError::CODES
            .iter()
            .filter_map(|&code| define(MetricType::Counter, &error_metric_name(code)).map(|id| (code, id)))
            .collect();
        let mut named: HashMap<&'static str, u32> = GAUGES
            .iter()
            .filter_map(|&g| define(MetricType::Gauge, g).map(|id| (g, id)))
            .collect();
        for c in [COUNTER_POLLS, COUNTER_POLL_FAILURES] {
            if let Some(id) = define(MetricType::Counter, c) {
                named.insert(c, id);
            }
        }
        Self {
            counters,
            errors,
            named,
            transcode: define(MetricType::Histogram, TRANSCODE_HISTOGRAM),
            encode: define(MetricType::Histogram, ENCODE_HISTOGRAM),
            ttft: define(MetricType::Histogram, TTFT_HISTOGRAM),
            ttft_error: define(MetricType::Histogram, TTFT_ERROR_HISTOGRAM),
            ttft_overestimate: define(MetricType::Histogram, TTFT_OVERESTIMATE_HISTOGRAM),
            memory: define(MetricType::Gauge, VM_MEMORY_GAUGE),
        }
    }

    fn increment(id: Option<&u32>, n: u64) {
        if let Some(&id) = id {
            if n > 0 {
                let _ = hostcalls::increment_metric(id, i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
    }

    /// Sets a named gauge (negative values clamp to 0).
    pub fn set(&self, name: &str, value: f64) {
        if let Some(&id) = self.named.get(name) {
            let v = if value.is_finite() && value > 0.0 {
                value.round() as u64
            } else {
                0
            };
            let _ = hostcalls::record_metric(id, v);
        }
    }

    /// Increments a named counter.
    pub fn bump(&self, name: &str) {
        Self::increment(self.named.get(name), 1);
    }

    /// Publishes the `changed` gauges of the shared traffic state.
    pub fn publish(&self, s: &TrafficState, changed: GaugeSet, now_us: u64, window_s: f64) {
        if changed.contains(GaugeSet::PD) {
            self.set(GAUGE_PD_INFLIGHT, s.pd_inflight as f64);
            self.set(GAUGE_PD_PENDING, s.pd_pending as f64);
            self.set(GAUGE_PD_OUTSTANDING_MS, s.pd_outstanding_us as f64 / 1000.0);
        }
        if changed.contains(GaugeSet::ENCODE) {
            self.set(GAUGE_ENCODE_INFLIGHT, s.encode_inflight as f64);
            self.set(GAUGE_OUTSTANDING_MS, s.encode_outstanding_us as f64 / 1000.0);
        }
        if changed.contains(GaugeSet::CALIBRATION) {
            self.set(GAUGE_CALIBRATION, s.calibration * 1000.0);
            self.set(GAUGE_PD_CALIBRATION, s.pd_calibration * 1000.0);
            self.set(GAUGE_TRANSCODE_SPEED, s.transcode_ms_per_mpixel);
        }
        if changed.contains(GaugeSet::RATES) {
            let (requests, _, tokens) = s.rates_at(now_us, window_s);
            self.set(GAUGE_REQUEST_RATE, requests * 1000.0);
            self.set(GAUGE_TOKEN_RATE, tokens);
        }
    }
}

impl Metrics for HostMetrics {
    fn add(&self, counter: Counter, n: u64) {
        Self::increment(self.counters.get(counter as usize).and_then(Option::as_ref), n);
    }
    fn error(&self, code: &'static str) {
        Self::increment(self.errors.get(code), 1);
    }
    fn transcode_ms(&self, ms: u64) {
        if let Some(id) = self.transcode {
            let _ = hostcalls::record_metric(id, ms);
        }
    }
    fn encode_ms(&self, ms: u64) {
        if let Some(id) = self.encode {
            let _ = hostcalls::record_metric(id, ms);
        }
    }
    fn ttft_ms(&self, observed_ms: f64, error_ms: Option<f64>) {
        let record = |id: Option<u32>, v: f64| {
            if let Some(id) = id {
                let _ = hostcalls::record_metric(id, v.max(0.0).round() as u64);
            }
        };
        record(self.ttft, observed_ms);
        match error_ms {
            Some(e) if e >= 0.0 => record(self.ttft_error, e),
            Some(e) => record(self.ttft_overestimate, -e),
            None => {}
        }
    }
    fn margin(&self, margin: Margin) {
        self.set(GAUGE_MARGIN, margin.base_ms);
        self.set(GAUGE_MARGIN_SLOPE, margin.per_token_ms * 1000.0);
    }
}
