//! The traffic-aware budget: the largest visual-token total a request may
//! keep so that its predicted time-to-first-token stays within the SLO and
//! the encoders stay stable, split across its images by water-filling.

use super::encode::EncodeFanout;
use super::latency::LatencyModel;
use super::traffic::TrafficSnapshot;

/// Why the budget is what it is (the `x-vlm-budget-reason` header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The request keeps every token.
    Unconstrained,
    /// Limited by the TTFT SLO.
    Slo,
    /// Limited by encoder utilisation (queue stability).
    Stability,
    /// Held at `min_tokens_per_image` although the SLO asks for less.
    Floor,
}

impl Reason {
    pub fn name(self) -> &'static str {
        match self {
            Self::Unconstrained => "unconstrained",
            Self::Slo => "slo",
            Self::Stability => "stability",
            Self::Floor => "floor",
        }
    }
}

/// The dynamic policy's parameters (validated by the configuration).
#[derive(Debug, Clone, PartialEq)]
pub struct DynamicParams {
    pub encode: LatencyModel,
    pub prefill: LatencyModel,
    pub encode_replicas: u32,
    pub slo_headroom: f64,
    pub overhead_ms: f64,
    pub max_utilisation: f64,
    pub min_tokens_per_image: u64,
    pub text_bytes_per_token: f64,
    pub fanout: EncodeFanout,
}

/// One request, as the solver sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Demand {
    /// Visual tokens of the request's sizable images, as sent.
    pub original_tokens: u64,
    /// Number of those images.
    pub images: u64,
    /// Text bytes of the request.
    pub text_bytes: usize,
    /// The TTFT SLO for this request, ms.
    pub slo_ms: f64,
}

/// The solver's answer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    /// Visual tokens the request may keep in total.
    pub total: u64,
    pub reason: Reason,
    /// Predicted TTFT with `total` tokens, ms.
    pub predicted_ttft_ms: f64,
    /// Predicted encoder queue wait, ms.
    pub queue_wait_ms: f64,
}

impl DynamicParams {
    fn replicas(&self) -> f64 {
        f64::from(self.encode_replicas.max(1))
    }

    /// Encoder queue wait: the larger of this proxy's own outstanding work
    /// and the cluster-wide queue (requests waiting or running at the
    /// encoder, at the mean work of an encode call), over the replicas.
    pub fn queue_wait_ms(&self, t: &TrafficSnapshot) -> f64 {
        let local = t.encode_outstanding_ms.max(0.0);
        let cluster = t.cluster.map_or(0.0, |c| {
            let calls_rate = match self.fanout {
                EncodeFanout::PerImage => t.image_rate,
                EncodeFanout::PerRequest => t.request_rate,
            };
            let mean_tokens = if calls_rate > 1e-9 {
                t.token_rate / calls_rate
            } else {
                0.0
            };
            let per_call = t.calibration * self.encode.predict(mean_tokens);
            // The reading comes from one replica picked by the load balancer.
            (c.waiting + c.running).max(0.0) * self.replicas() * per_call
        });
        local.max(cluster) / self.replicas()
    }

    /// Predicted TTFT of a request keeping `n` visual tokens.
    pub fn ttft_ms(&self, n: u64, text_tokens: f64, wait_ms: f64, calibration: f64) -> f64 {
        let n = n as f64;
        wait_ms
            + calibration * self.encode.predict(n)
            + self.prefill.predict(n + text_tokens)
            + self.overhead_ms
    }

    /// Solves for the request's visual-token total.
    pub fn solve(&self, d: &Demand, t: &TrafficSnapshot) -> Decision {
        let text_tokens = d.text_bytes as f64 / self.text_bytes_per_token.max(0.1);
        let wait = self.queue_wait_ms(t);
        let cal = if t.calibration > 0.0 { t.calibration } else { 1.0 };
        let original = d.original_tokens;
        let floor = (self.min_tokens_per_image.saturating_mul(d.images)).min(original);
        let target = d.slo_ms * self.slo_headroom;
        let slo_n = largest(floor, original, |n| {
            self.ttft_ms(n, text_tokens, wait, cal) <= target
        });
        let capacity_ms = self.max_utilisation * self.replicas() * 1000.0;
        let stab_n = if t.request_rate > 1e-9 {
            largest(floor, original, |n| {
                t.request_rate * cal * self.encode.predict(n as f64) <= capacity_ms
            })
        } else {
            original
        };
        let total = slo_n.min(stab_n);
        let binding_fails = |n: u64| {
            self.ttft_ms(n, text_tokens, wait, cal) > target
                || (t.request_rate > 1e-9
                    && t.request_rate * cal * self.encode.predict(n as f64) > capacity_ms)
        };
        let reason = if total >= original {
            Reason::Unconstrained
        } else if total == floor && binding_fails(floor) {
            Reason::Floor
        } else if slo_n <= stab_n {
            Reason::Slo
        } else {
            Reason::Stability
        };
        Decision {
            total,
            reason,
            predicted_ttft_ms: self.ttft_ms(total, text_tokens, wait, cal),
            queue_wait_ms: wait,
        }
    }
}

/// Largest `n` in `[lo, hi]` with `ok(n)`, for `ok` true up to some point
/// and false after it; `lo` when none is.
fn largest(lo: u64, hi: u64, ok: impl Fn(u64) -> bool) -> u64 {
    if hi <= lo || ok(hi) {
        return hi.max(lo);
    }
    if !ok(lo) {
        return lo;
    }
    let (mut good, mut bad) = (lo, hi);
    while bad - good > 1 {
        let mid = good + (bad - good) / 2;
        if ok(mid) {
            good = mid;
        } else {
            bad = mid;
        }
    }
    good
}

/// Splits `total` tokens across images holding `tokens` each: the smallest
/// images are served first and keep everything they have if the level
/// allows; what they leave is shared among the rest. No image gets more
/// than it has; the shares sum to `min(total, sum(tokens))`.
pub fn water_fill(tokens: &[u64], total: u64) -> Vec<u64> {
    let mut order: Vec<usize> = (0..tokens.len()).collect();
    order.sort_by_key(|&i| tokens[i]);
    let mut out = vec![0; tokens.len()];
    let mut remaining = total;
    for (k, &i) in order.iter().enumerate() {
        let left = (order.len() - k) as u64;
        let share = remaining / left + u64::from(remaining % left != 0);
        let give = tokens[i].min(share).min(remaining);
        out[i] = give;
        remaining -= give;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::latency::{H100_ENCODE, H100_PREFILL};
    use super::super::traffic::ClusterSignal;
    use super::*;

    fn params() -> DynamicParams {
        DynamicParams {
            encode: H100_ENCODE,
            prefill: H100_PREFILL,
            encode_replicas: 1,
            slo_headroom: 0.9,
            overhead_ms: 30.0,
            max_utilisation: 0.85,
            min_tokens_per_image: 256,
            text_bytes_per_token: 4.0,
            fanout: EncodeFanout::PerImage,
        }
    }

    fn demand(tokens: u64, images: u64) -> Demand {
        Demand {
            original_tokens: tokens,
            images,
            text_bytes: 400,
            slo_ms: 1000.0,
        }
    }

    #[test]
    fn no_traffic_no_resizing() {
        let d = params().solve(&demand(11_782, 1), &TrafficSnapshot::idle());
        assert_eq!((d.total, d.reason), (11_782, Reason::Unconstrained));
        assert!(d.predicted_ttft_ms <= 900.0, "{}", d.predicted_ttft_ms);
    }

    #[test]
    fn more_backlog_never_gives_a_bigger_budget() {
        let p = params();
        let mut last = u64::MAX;
        for backlog in (0..4000).step_by(50) {
            let t = TrafficSnapshot {
                encode_outstanding_ms: f64::from(backlog),
                ..TrafficSnapshot::idle()
            };
            let d = p.solve(&demand(11_782, 1), &t);
            assert!(d.total <= last, "backlog {backlog}: {} > {last}", d.total);
            assert!(d.total >= 256);
            if d.reason == Reason::Slo {
                assert!(d.predicted_ttft_ms <= 900.0 + 1e-9);
            }
            last = d.total;
        }
        assert!(last == 256, "a huge backlog ends at the floor");
    }

    #[test]
    fn the_floor_holds_and_is_reported() {
        let t = TrafficSnapshot {
            encode_outstanding_ms: 5000.0,
            ..TrafficSnapshot::idle()
        };
        let d = params().solve(&demand(20_000, 4), &t);
        assert_eq!((d.total, d.reason), (1024, Reason::Floor));
        // Images smaller than the floor keep what they have.
        let d = params().solve(&demand(100, 1), &t);
        assert_eq!(d.total, 100);
    }

    #[test]
    fn utilisation_caps_at_high_arrival_rates() {
        let t = TrafficSnapshot {
            request_rate: 10.0,
            ..TrafficSnapshot::idle()
        };
        let p = params();
        let d = p.solve(&demand(11_782, 1), &t);
        assert_eq!(d.reason, Reason::Stability);
        assert!(10.0 * p.encode.predict(d.total as f64) <= 850.0);
        assert!(10.0 * p.encode.predict(d.total as f64 + 1.0) > 850.0);
    }

    #[test]
    fn cluster_backlog_counts_when_larger_than_local() {
        let p = params();
        let local = TrafficSnapshot {
            encode_outstanding_ms: 100.0,
            ..TrafficSnapshot::idle()
        };
        let cluster = TrafficSnapshot {
            cluster: Some(ClusterSignal {
                waiting: 6.0,
                running: 1.0,
                updated_us: 1,
            }),
            image_rate: 2.0,
            request_rate: 2.0,
            token_rate: 8000.0,
            ..local
        };
        let w = p.queue_wait_ms(&cluster);
        assert!((w - 7.0 * p.encode.predict(4000.0)).abs() < 1e-6, "{w}");
        assert!(p.solve(&demand(11_782, 1), &cluster).total < p.solve(&demand(11_782, 1), &local).total);
    }

    #[test]
    fn calibration_shrinks_budgets_when_gpus_are_slower() {
        let p = params();
        let t = TrafficSnapshot {
            encode_outstanding_ms: 300.0,
            ..TrafficSnapshot::idle()
        };
        let slow = TrafficSnapshot {
            calibration: 1.5,
            ..t
        };
        assert!(p.solve(&demand(11_782, 1), &slow).total < p.solve(&demand(11_782, 1), &t).total);
    }

    #[test]
    fn water_filling() {
        let cases: [(&[u64], u64); 6] = [
            (&[100, 5000, 5000], 3000),
            (&[100, 5000, 5000], 20_000),
            (&[1000, 1000, 1000], 1500),
            (&[7, 3, 11, 2], 10),
            (&[4096], 1000),
            (&[], 10),
        ];
        for (tokens, total) in cases {
            let got = water_fill(tokens, total);
            let sum: u64 = tokens.iter().sum();
            assert_eq!(got.iter().sum::<u64>(), total.min(sum), "{tokens:?} {total}");
            assert!(got.iter().zip(tokens).all(|(g, t)| g <= t));
        }
        assert_eq!(water_fill(&[100, 5000, 5000], 3000), vec![100, 1450, 1450]);
        assert_eq!(water_fill(&[1000, 1000, 1000], 1500), vec![500, 500, 500]);
    }
}
