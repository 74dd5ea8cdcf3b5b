//! Traffic state shared by every worker of an Envoy: requests in flight,
//! predicted encode and prefill work outstanding, arrival-rate estimates,
//! the latency calibration factors and the filter's own transcode speed. The host keeps it in proxy-wasm shared data
//! (one key, updated with compare-and-swap); this module is its pure
//! state and arithmetic.

use super::residual::Margin;

/// Counters and estimates, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct TrafficState {
    /// Encode calls in flight.
    pub encode_inflight: i64,
    /// Requests forwarded to prefill/decode and not yet finished.
    pub pd_inflight: i64,
    /// Predicted encode work in flight, microseconds of GPU time.
    pub encode_outstanding_us: i64,
    /// Exponentially decaying arrival rates (per second) at `rates_at_us`.
    pub request_rate: f64,
    pub image_rate: f64,
    pub token_rate: f64,
    pub rates_at_us: u64,
    /// Multiplicative correction of the latency profile (1 = as profiled).
    pub calibration: f64,
    /// Encode observations folded into `calibration`.
    pub calibration_samples: u64,
    /// Requests with images forwarded to prefill/decode whose first token
    /// has not come back yet (queued or in prefill there).
    pub pd_pending: i64,
    /// Their predicted prefill work, microseconds of GPU time.
    pub pd_outstanding_us: i64,
    /// Multiplicative correction of the prefill side (1 = as profiled):
    /// forward-to-first-token observed against predicted.
    pub pd_calibration: f64,
    pub pd_calibration_samples: u64,
    /// This Envoy's measured transcode speed, ms per input megapixel
    /// (0 = not measured yet: the prior is used).
    pub transcode_ms_per_mpixel: f64,
    pub transcode_samples: u64,
}

/// Serialised size of [`TrafficState`].
pub const STATE_BYTES: usize = 128;

/// Weight of one transcode observation in the speed estimate.
const TRANSCODE_ALPHA: f64 = 0.2;

impl TrafficState {
    pub fn initial() -> Self {
        Self {
            calibration: 1.0,
            pd_calibration: 1.0,
            ..Self::default()
        }
    }

    pub fn encode(&self) -> [u8; STATE_BYTES] {
        let mut out = [0u8; STATE_BYTES];
        let fields: [[u8; 8]; 16] = [
            self.encode_inflight.to_le_bytes(),
            self.pd_inflight.to_le_bytes(),
            self.encode_outstanding_us.to_le_bytes(),
            self.request_rate.to_le_bytes(),
            self.image_rate.to_le_bytes(),
            self.token_rate.to_le_bytes(),
            self.rates_at_us.to_le_bytes(),
            self.calibration.to_le_bytes(),
            self.calibration_samples.to_le_bytes(),
            self.pd_pending.to_le_bytes(),
            self.pd_outstanding_us.to_le_bytes(),
            self.pd_calibration.to_le_bytes(),
            self.pd_calibration_samples.to_le_bytes(),
            self.transcode_ms_per_mpixel.to_le_bytes(),
            self.transcode_samples.to_le_bytes(),
            [0u8; 8],
        ];
        for (chunk, f) in out.chunks_exact_mut(8).zip(fields) {
            chunk.copy_from_slice(&f);
        }
        out
    }

    /// Decodes; anything of the wrong size (a missing or foreign key) is
    /// the initial state.
    pub fn decode(bytes: &[u8]) -> Self {
        if bytes.len() != STATE_BYTES {
            return Self::initial();
        }
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
            w
        };
        let f = |i: usize| {
            let v = f64::from_le_bytes(word(i));
            if v.is_finite() {
                v
            } else {
                0.0
            }
        };
        let factor = |i: usize| {
            let v = f(i);
            if v > 0.0 {
                v
            } else {
                1.0
            }
        };
        Self {
            encode_inflight: i64::from_le_bytes(word(0)),
            pd_inflight: i64::from_le_bytes(word(1)),
            encode_outstanding_us: i64::from_le_bytes(word(2)),
            request_rate: f(3),
            image_rate: f(4),
            token_rate: f(5),
            rates_at_us: u64::from_le_bytes(word(6)),
            calibration: factor(7),
            calibration_samples: u64::from_le_bytes(word(8)),
            pd_pending: i64::from_le_bytes(word(9)),
            pd_outstanding_us: i64::from_le_bytes(word(10)),
            pd_calibration: factor(11),
            pd_calibration_samples: u64::from_le_bytes(word(12)),
            transcode_ms_per_mpixel: f(13).max(0.0),
            transcode_samples: u64::from_le_bytes(word(14)),
        }
    }

    /// Rates decayed to `now_us` with time constant `window_s`.
    pub fn rates_at(&self, now_us: u64, window_s: f64) -> (f64, f64, f64) {
        let decay = decay(self.rates_at_us, now_us, window_s);
        (
            self.request_rate * decay,
            self.image_rate * decay,
            self.token_rate * decay,
        )
    }

    /// Folds one image request (`images` images, `tokens` visual tokens
    /// sent to the encoder) into the rate estimates.
    pub fn record_arrival(&mut self, now_us: u64, images: u64, tokens: u64, window_s: f64) {
        let (r, i, t) = self.rates_at(now_us, window_s);
        let w = window_s.max(1e-3);
        self.request_rate = r + 1.0 / w;
        self.image_rate = i + images as f64 / w;
        self.token_rate = t + tokens as f64 / w;
        self.rates_at_us = self.rates_at_us.max(now_us);
    }

    /// Moves the calibration factor towards `observed / predicted`
    /// (predicted with the current factor applied): a multiplicative step
    /// of weight `alpha`, each observation clipped to [1/4, 4], the factor
    /// bounded to `[min, max]`.
    pub fn calibrate(&mut self, observed_ms: f64, predicted_ms: f64, alpha: f64, min: f64, max: f64) {
        let (f, n) = (&mut self.calibration, &mut self.calibration_samples);
        step_factor(f, n, observed_ms, predicted_ms, alpha, (min, max));
    }

    /// The same for the prefill side's factor.
    pub fn calibrate_pd(&mut self, observed_ms: f64, predicted_ms: f64, alpha: f64, min: f64, max: f64) {
        let (f, n) = (&mut self.pd_calibration, &mut self.pd_calibration_samples);
        step_factor(f, n, observed_ms, predicted_ms, alpha, (min, max));
    }

    /// Folds one measured transcode (`ms` for `mpixels` input megapixels)
    /// into the speed estimate; the first one replaces the prior.
    pub fn record_transcode(&mut self, ms: f64, mpixels: f64) {
        if !(ms >= 0.0 && mpixels > 0.01 && ms.is_finite()) {
            return;
        }
        let speed = ms / mpixels;
        self.transcode_ms_per_mpixel = if self.transcode_samples == 0 || self.transcode_ms_per_mpixel <= 0.0 {
            speed
        } else {
            self.transcode_ms_per_mpixel + TRANSCODE_ALPHA * (speed - self.transcode_ms_per_mpixel)
        };
        self.transcode_samples += 1;
    }
}

/// One calibration step of `factor` (see [`TrafficState::calibrate`]);
/// an observation or prediction that is not positive is ignored.
fn step_factor(
    factor: &mut f64,
    samples: &mut u64,
    observed_ms: f64,
    predicted_ms: f64,
    alpha: f64,
    (min, max): (f64, f64),
) {
    if !(observed_ms > 0.0 && predicted_ms > 0.0) {
        return;
    }
    let ratio = (observed_ms / predicted_ms).clamp(0.25, 4.0);
    *factor = (*factor * ratio.powf(alpha)).clamp(min, max);
    *samples += 1;
}

/// Factor by which an exponentially decaying rate falls from `then_us` to
/// `now_us` with time constant `window_s`.
pub fn decay(then_us: u64, now_us: u64, window_s: f64) -> f64 {
    let dt = now_us.saturating_sub(then_us) as f64 / 1e6;
    (-dt / window_s.max(1e-3)).exp()
}

/// The cluster-wide backlog read from the encoders' `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ClusterSignal {
    pub waiting: f64,
    pub running: f64,
    pub updated_us: u64,
}

/// Serialised size of [`ClusterSignal`].
pub const CLUSTER_BYTES: usize = 24;

impl ClusterSignal {
    pub fn encode(&self) -> [u8; CLUSTER_BYTES] {
        let mut out = [0u8; CLUSTER_BYTES];
        out[..8].copy_from_slice(&self.waiting.to_le_bytes());
        out[8..16].copy_from_slice(&self.running.to_le_bytes());
        out[16..].copy_from_slice(&self.updated_us.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != CLUSTER_BYTES {
            return None;
        }
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
            w
        };
        Some(Self {
            waiting: f64::from_le_bytes(word(0)),
            running: f64::from_le_bytes(word(1)),
            updated_us: u64::from_le_bytes(word(2)),
        })
    }

    /// Whether this reading is recent enough to trust.
    pub fn fresh(&self, now_us: u64, stale_after_ms: u64) -> bool {
        self.updated_us > 0 && now_us.saturating_sub(self.updated_us) <= stale_after_ms * 1000
    }
}

/// What the policy sees of the traffic when a request arrives.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct TrafficSnapshot {
    pub encode_inflight: u64,
    pub pd_inflight: u64,
    /// Predicted encode work in flight (ms of GPU time, calibrated).
    pub encode_outstanding_ms: f64,
    /// Requests at prefill/decode still waiting for their first token, and
    /// their predicted prefill work (ms).
    pub pd_pending: u64,
    pub pd_outstanding_ms: f64,
    /// Arrivals per second.
    pub request_rate: f64,
    pub image_rate: f64,
    pub token_rate: f64,
    /// The encode cluster's queue, when a fresh reading exists.
    pub cluster: Option<ClusterSignal>,
    /// The prefill/decode cluster's queue, when a fresh reading exists.
    pub pd_cluster: Option<ClusterSignal>,
    pub calibration: f64,
    pub pd_calibration: f64,
    /// Measured transcode speed, ms per input megapixel (0: none yet).
    pub transcode_ms_per_mpixel: f64,
    /// The learned TTFT margin (observed above predicted at the target
    /// percentile), by the visual tokens a request keeps.
    pub margin: Margin,
}

impl TrafficSnapshot {
    /// No traffic at all.
    pub fn idle() -> Self {
        Self {
            calibration: 1.0,
            pd_calibration: 1.0,
            ..Self::default()
        }
    }

    /// The state at `now_us`, with the fresh cluster readings (encode, PD)
    /// and the learned margin.
    pub fn of(
        state: &TrafficState,
        clusters: (Option<ClusterSignal>, Option<ClusterSignal>),
        margin: Margin,
        now_us: u64,
        window_s: f64,
    ) -> Self {
        let (request_rate, image_rate, token_rate) = state.rates_at(now_us, window_s);
        Self {
            encode_inflight: state.encode_inflight.max(0) as u64,
            pd_inflight: state.pd_inflight.max(0) as u64,
            encode_outstanding_ms: state.encode_outstanding_us.max(0) as f64 / 1000.0,
            pd_pending: state.pd_pending.max(0) as u64,
            pd_outstanding_ms: state.pd_outstanding_us.max(0) as f64 / 1000.0,
            request_rate,
            image_rate,
            token_rate,
            cluster: clusters.0,
            pd_cluster: clusters.1,
            calibration: state.calibration,
            pd_calibration: state.pd_calibration,
            transcode_ms_per_mpixel: state.transcode_ms_per_mpixel,
            margin,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_foreign_bytes() {
        let mut s = TrafficState::initial();
        s.encode_inflight = 3;
        s.pd_inflight = -1;
        s.encode_outstanding_us = 123_456;
        s.record_arrival(5_000_000, 2, 8000, 10.0);
        s.calibrate(150.0, 100.0, 0.5, 0.25, 4.0);
        s.calibrate_pd(80.0, 100.0, 0.5, 0.25, 4.0);
        s.pd_pending = 2;
        s.pd_outstanding_us = 90_000;
        s.record_transcode(60.0, 2.0);
        assert_eq!(TrafficState::decode(&s.encode()), s);
        assert_eq!(TrafficState::decode(&[0u8; STATE_BYTES]).pd_calibration, 1.0);
        assert_eq!(TrafficState::decode(b"short"), TrafficState::initial());
        let c = ClusterSignal {
            waiting: 4.0,
            running: 2.0,
            updated_us: 77,
        };
        assert_eq!(ClusterSignal::decode(&c.encode()), Some(c));
        assert!(c.fresh(77 + 1_000_000, 1000) && !c.fresh(77 + 1_000_001, 1000));
    }

    #[test]
    fn rates_rise_with_arrivals_and_decay_after() {
        let mut s = TrafficState::initial();
        // 5 requests per second for 60 s with a 10 s window: rate -> ~5/s.
        for i in 0..300u64 {
            s.record_arrival(i * 200_000, 1, 1000, 10.0);
        }
        let (r, i, t) = s.rates_at(60_000_000, 10.0);
        assert!((r - 5.0).abs() < 0.3, "{r}");
        assert!((i - r).abs() < 1e-9 && (t - 1000.0 * r).abs() < 1e-6);
        let (later, _, _) = s.rates_at(90_000_000, 10.0);
        assert!(later < r * 0.06, "{later}");
    }

    #[test]
    fn calibration_converges_and_stays_bounded() {
        let mut s = TrafficState::initial();
        let truth = 1.5;
        for _ in 0..60 {
            let predicted = 100.0 * s.calibration;
            s.calibrate(100.0 * truth, predicted, 0.2, 0.5, 3.0);
        }
        assert!((s.calibration - truth).abs() < 0.01, "{}", s.calibration);
        for _ in 0..100 {
            s.calibrate(1e9, 1.0, 0.5, 0.5, 3.0);
        }
        assert_eq!(s.calibration, 3.0);
        s.calibrate(0.0, 1.0, 0.5, 0.5, 3.0); // ignored
        assert_eq!(s.calibration, 3.0);
    }

    #[test]
    fn transcode_speed_starts_from_the_first_sample_and_follows() {
        let mut s = TrafficState::initial();
        s.record_transcode(10.0, 0.0); // no pixels: ignored
        s.record_transcode(f64::NAN, 1.0);
        assert_eq!(s.transcode_samples, 0);
        s.record_transcode(60.0, 2.0);
        assert_eq!(s.transcode_ms_per_mpixel, 30.0);
        for _ in 0..40 {
            s.record_transcode(20.0, 2.0);
        }
        assert!(
            (s.transcode_ms_per_mpixel - 10.0).abs() < 0.1,
            "{}",
            s.transcode_ms_per_mpixel
        );
        let mut p = TrafficState::initial();
        for _ in 0..60 {
            let predicted = 100.0 * p.pd_calibration;
            p.calibrate_pd(200.0, predicted, 0.2, 0.5, 4.0);
        }
        assert!((p.pd_calibration - 2.0).abs() < 0.02, "{}", p.pd_calibration);
        assert_eq!(p.calibration, 1.0, "the encode factor is separate");
    }
}
