//! The traffic-aware budget: the largest visual-token total a request may
//! keep so that its predicted time-to-first-token, plus the margin learned
//! from how far observed TTFT has run above the prediction, stays within the
//! SLO and the encoders stay stable, split across its images by
//! water-filling.
//!
//! The prediction is a sum of terms, each reported
//! (`x-vlm-ttft-terms`): the time already spent since the request arrived,
//! the filter's own transcode, the wait for the encoder and its work, the
//! wait at prefill/decode and the prefill.

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
    pub pd_replicas: u32,
    pub slo_headroom: f64,
    pub max_utilisation: f64,
    pub min_tokens_per_image: u64,
    pub text_bytes_per_token: f64,
    pub fanout: EncodeFanout,
    /// Whether an encode cluster runs the encoder (EPD); else the
    /// prefill/decode instance encodes the images itself.
    pub epd: bool,
    /// Transcode speed before this Envoy has measured its own, ms per input
    /// megapixel.
    pub transcode_prior_ms_per_mpixel: f64,
    /// A prefill/decode split (1E1P1D): after the prefill, the KV cache's
    /// transfer to decode and decode's first step, ms for a prompt of n
    /// tokens. `None` when one instance prefills and decodes: decode is on
    /// the TTFT path only through that step.
    pub handoff: Option<LatencyModel>,
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
    /// Megapixels of those images as sent (what a transcode decodes).
    pub mpixels: f64,
    /// The TTFT SLO for this request, ms.
    pub slo_ms: f64,
    /// Time since the request arrived, ms (already part of its TTFT).
    pub elapsed_ms: f64,
}

/// The predicted TTFT of one request, term by term (ms).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Terms {
    /// Since the request arrived, until the decision.
    pub elapsed: f64,
    /// The filter's own decode/resize/encode of the images over budget.
    pub transcode: f64,
    /// Waiting for the encoder.
    pub encode_wait: f64,
    /// The encoder's work for this request.
    pub encode: f64,
    /// Waiting at prefill/decode (the part of its backlog not yet drained
    /// when this request gets there).
    pub pd_wait: f64,
    /// Prefill (with the encoder's work for a monolithic backend, and the
    /// KV hand-off to decode of a prefill/decode split).
    pub prefill: f64,
}

impl Terms {
    /// The model's TTFT (before the learned margin).
    pub fn total(&self) -> f64 {
        self.elapsed + self.transcode + self.encode_wait + self.encode + self.pd_wait + self.prefill
    }

    /// The prefill/decode phase: from forwarding to the first token.
    pub fn pd_phase(&self) -> f64 {
        self.pd_wait + self.prefill
    }

    /// `transcode=…,encode_wait=…,…` (the `x-vlm-ttft-terms` header).
    pub fn header(&self, margin_ms: f64) -> String {
        format!(
            "elapsed={:.1},transcode={:.1},encode_wait={:.1},encode={:.1},pd_wait={:.1},prefill={:.1},margin={:.1}",
            self.elapsed, self.transcode, self.encode_wait, self.encode, self.pd_wait, self.prefill, margin_ms
        )
    }
}

/// The solver's answer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    /// Visual tokens the request may keep in total.
    pub total: u64,
    pub reason: Reason,
    /// The prediction with `total` tokens, term by term.
    pub terms: Terms,
    /// The learned margin planned with, ms.
    pub margin_ms: f64,
}

impl DynamicParams {
    fn replicas(&self) -> f64 {
        f64::from(self.encode_replicas.max(1))
    }

    fn pd_replicas(&self) -> f64 {
        f64::from(self.pd_replicas.max(1))
    }

    /// Mean visual tokens of a recent request (or encode call).
    fn mean_tokens(t: &TrafficSnapshot, calls_rate: f64) -> f64 {
        if calls_rate > 1e-9 {
            t.token_rate / calls_rate
        } else {
            0.0
        }
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
            let per_call = t.calibration * self.encode.predict(Self::mean_tokens(t, calls_rate));
            // The reading comes from one replica picked by the load balancer.
            (c.waiting + c.running).max(0.0) * self.replicas() * per_call
        });
        local.max(cluster) / self.replicas()
    }

    /// The prefill/decode backlog now, ms: the larger of this proxy's own
    /// requests there without a first token (their predicted work) and the
    /// cluster's waiting requests (at the mean prefill), over the replicas.
    pub fn pd_backlog_ms(&self, t: &TrafficSnapshot, text_tokens: f64) -> f64 {
        let local = t.pd_outstanding_ms.max(0.0);
        let cluster = t.pd_cluster.map_or(0.0, |c| {
            let mean = Self::mean_tokens(t, t.request_rate) + text_tokens;
            c.waiting.max(0.0) * self.pd_replicas() * self.pd_work_ms(t, mean, 0.0)
        });
        local.max(cluster) / self.pd_replicas()
    }

    /// Prefill/decode work for a prompt of `prompt_tokens` of which
    /// `visual` are visual tokens: the prefill, and for a monolithic backend
    /// the encoder too.
    pub fn pd_work_ms(&self, t: &TrafficSnapshot, prompt_tokens: f64, visual: f64) -> f64 {
        let cal = if t.pd_calibration > 0.0 {
            t.pd_calibration
        } else {
            1.0
        };
        let encode = if self.epd {
            0.0
        } else {
            t.calibration * self.encode.predict(visual)
        };
        cal * self.prefill.predict(prompt_tokens) + encode
    }

    /// The KV hand-off of a prefill/decode split for a prompt of
    /// `prompt_tokens` (transfer and decode's first step), ms; 0 without a
    /// split.
    pub fn handoff_ms(&self, prompt_tokens: f64) -> f64 {
        self.handoff.as_ref().map_or(0.0, |h| h.predict(prompt_tokens))
    }

    /// The transcode of a request's images, ms, when any is shrunk.
    pub fn transcode_ms(&self, t: &TrafficSnapshot, mpixels: f64) -> f64 {
        let speed = if t.transcode_ms_per_mpixel > 0.0 {
            t.transcode_ms_per_mpixel
        } else {
            self.transcode_prior_ms_per_mpixel
        };
        speed * mpixels.max(0.0)
    }

    /// The prediction for a request keeping `n` of its visual tokens.
    pub fn terms(&self, d: &Demand, n: u64, t: &TrafficSnapshot) -> Terms {
        let text_tokens = d.text_bytes as f64 / self.text_bytes_per_token.max(0.1);
        let nf = n as f64;
        let transcode = if n < d.original_tokens {
            self.transcode_ms(t, d.mpixels)
        } else {
            0.0
        };
        let backlog = self.pd_backlog_ms(t, text_tokens);
        let prefill = self.pd_work_ms(t, nf + text_tokens, nf) + self.handoff_ms(nf + text_tokens);
        if !self.epd {
            return Terms {
                elapsed: d.elapsed_ms,
                transcode,
                pd_wait: backlog,
                prefill,
                ..Terms::default()
            };
        }
        let encode_wait = self.queue_wait_ms(t);
        let cal = if t.calibration > 0.0 { t.calibration } else { 1.0 };
        let encode = cal * self.encode.predict(nf);
        Terms {
            elapsed: d.elapsed_ms,
            transcode,
            encode_wait,
            encode,
            // Prefill/decode drains its backlog while this request is
            // transcoded and encoded.
            pd_wait: (backlog - transcode - encode_wait - encode).max(0.0),
            prefill,
        }
    }

    /// Solves for the request's visual-token total: the largest that the
    /// prediction plus the learned margin keeps within the SLO, and the
    /// encoders' utilisation cap allows.
    pub fn solve(&self, d: &Demand, t: &TrafficSnapshot) -> Decision {
        let cal = if t.calibration > 0.0 { t.calibration } else { 1.0 };
        let original = d.original_tokens;
        let floor = (self.min_tokens_per_image.saturating_mul(d.images)).min(original);
        let target = d.slo_ms * self.slo_headroom;
        let fits = |n: u64| self.terms(d, n, t).total() + t.margin.at(n) <= target;
        let slo_n = largest(floor, original, fits);
        let capacity_ms = self.max_utilisation * self.replicas() * 1000.0;
        let stable = |n: u64| {
            t.request_rate <= 1e-9 || t.request_rate * cal * self.encode.predict(n as f64) <= capacity_ms
        };
        let stab_n = largest(floor, original, stable);
        let total = slo_n.min(stab_n);
        let reason = if total >= original {
            Reason::Unconstrained
        } else if total == floor && !(fits(floor) && stable(floor)) {
            Reason::Floor
        } else if slo_n <= stab_n {
            Reason::Slo
        } else {
            Reason::Stability
        };
        Decision {
            total,
            reason,
            terms: self.terms(d, total, t),
            margin_ms: t.margin.at(total),
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
    use super::super::residual::Margin;
    use super::super::traffic::ClusterSignal;
    use super::*;

    fn params() -> DynamicParams {
        DynamicParams {
            encode: H100_ENCODE,
            prefill: H100_PREFILL,
            encode_replicas: 1,
            pd_replicas: 1,
            slo_headroom: 0.9,
            max_utilisation: 0.85,
            min_tokens_per_image: 256,
            text_bytes_per_token: 4.0,
            fanout: EncodeFanout::PerImage,
            epd: true,
            transcode_prior_ms_per_mpixel: 0.0,
            handoff: None,
        }
    }

    fn demand(tokens: u64, images: u64) -> Demand {
        Demand {
            original_tokens: tokens,
            images,
            text_bytes: 400,
            mpixels: tokens as f64 * 784.0 / 1e6,
            slo_ms: 1000.0,
            elapsed_ms: 0.0,
        }
    }

    #[test]
    fn no_traffic_no_resizing() {
        let d = params().solve(&demand(11_782, 1), &TrafficSnapshot::idle());
        assert_eq!((d.total, d.reason), (11_782, Reason::Unconstrained));
        assert!(d.terms.total() <= 900.0, "{}", d.terms.total());
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
                assert!(d.terms.total() <= 900.0 + 1e-9);
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

    #[test]
    fn the_learned_margin_and_the_time_already_spent_shrink_the_budget() {
        let p = params();
        let t = TrafficSnapshot {
            encode_outstanding_ms: 200.0,
            ..TrafficSnapshot::idle()
        };
        let base = p.solve(&demand(11_782, 1), &t);
        let with_margin = p.solve(
            &demand(11_782, 1),
            &TrafficSnapshot {
                margin: Margin::flat(150.0),
                ..t
            },
        );
        assert!(with_margin.total < base.total);
        assert_eq!(with_margin.margin_ms, 150.0);
        assert!(with_margin.terms.total() + 150.0 <= 900.0 + 1e-9);
        let late = p.solve(
            &Demand {
                elapsed_ms: 150.0,
                ..demand(11_782, 1)
            },
            &t,
        );
        assert_eq!(late.total, with_margin.total, "elapsed time counts like margin");
        assert_eq!(late.terms.elapsed, 150.0);
    }

    #[test]
    fn a_margin_that_grows_with_the_tokens_shrinks_large_images_more() {
        let p = params();
        let t = TrafficSnapshot {
            encode_outstanding_ms: 200.0,
            ..TrafficSnapshot::idle()
        };
        let flat = p.solve(
            &demand(11_782, 1),
            &TrafficSnapshot {
                margin: Margin::flat(150.0),
                ..t
            },
        );
        let sloped = Margin {
            base_ms: 50.0,
            per_token_ms: 0.03,
        };
        let d = p.solve(&demand(11_782, 1), &TrafficSnapshot { margin: sloped, ..t });
        assert!(d.total < flat.total, "{} vs {}", d.total, flat.total);
        assert_eq!(d.margin_ms, sloped.at(d.total));
        assert!(d.terms.total() + d.margin_ms <= 900.0 + 1e-9);
        assert!(p.terms(&demand(11_782, 1), d.total + 1, &t).total() + sloped.at(d.total + 1) > 900.0);
        // A small image plans with less margin than the flat one and keeps
        // everything.
        let small = p.solve(&demand(1_000, 1), &TrafficSnapshot { margin: sloped, ..t });
        assert_eq!((small.total, small.reason), (1_000, Reason::Unconstrained));
        assert!(small.margin_ms < 150.0);
    }

    #[test]
    fn the_transcode_counts_only_when_an_image_is_shrunk() {
        let p = DynamicParams {
            transcode_prior_ms_per_mpixel: 30.0,
            ..params()
        };
        let d = demand(11_782, 1);
        let idle = TrafficSnapshot::idle();
        // Idle: kept whole, so no transcode in the prediction.
        let kept = p.solve(&d, &idle);
        assert_eq!(kept.total, 11_782);
        assert_eq!(kept.terms.transcode, 0.0);
        let busy = TrafficSnapshot {
            encode_outstanding_ms: 300.0,
            ..idle
        };
        let shrunk = p.solve(&d, &busy);
        assert!(shrunk.total < 11_782);
        assert!((shrunk.terms.transcode - 30.0 * d.mpixels).abs() < 1e-9);
        // A measured speed replaces the prior, and a slower one costs tokens.
        let slow = p.solve(
            &d,
            &TrafficSnapshot {
                transcode_ms_per_mpixel: 60.0,
                ..busy
            },
        );
        assert!((slow.terms.transcode - 60.0 * d.mpixels).abs() < 1e-9);
        assert!(slow.total < shrunk.total);
    }

    #[test]
    fn prefill_backlog_counts_after_what_drains_during_encoding() {
        let p = params();
        let d = demand(11_782, 1);
        let pd = |ms: f64| TrafficSnapshot {
            pd_outstanding_ms: ms,
            pd_pending: 3,
            ..TrafficSnapshot::idle()
        };
        // A small PD backlog drains while the request is encoded.
        let small = p.terms(&d, 4000, &pd(50.0));
        assert_eq!(small.pd_wait, 0.0);
        // A large one does not.
        let large = p.terms(&d, 4000, &pd(2000.0));
        assert!((large.pd_wait - (2000.0 - large.encode)).abs() < 1e-9);
        assert!(p.solve(&d, &pd(2000.0)).total < p.solve(&d, &pd(0.0)).total);
        // More PD backlog never gives a bigger budget.
        let mut last = u64::MAX;
        for ms in (0..3000).step_by(100) {
            let n = p.solve(&d, &pd(f64::from(ms))).total;
            assert!(n <= last);
            last = n;
        }
        // The PD cluster's own queue counts too, at the mean prefill.
        let cluster = TrafficSnapshot {
            pd_cluster: Some(ClusterSignal {
                waiting: 10.0,
                running: 4.0,
                updated_us: 1,
            }),
            request_rate: 4.0,
            token_rate: 16_000.0,
            ..TrafficSnapshot::idle()
        };
        let b = p.pd_backlog_ms(&cluster, 100.0);
        assert!((b - 10.0 * p.prefill.predict(4100.0)).abs() < 1e-6, "{b}");
    }

    #[test]
    fn a_split_adds_the_kv_handoff_to_the_prefill() {
        let split = DynamicParams {
            handoff: Some(LatencyModel::Quadratic {
                a: 6.0,
                b: 0.01,
                c: 0.0,
            }),
            ..params()
        };
        let d = demand(11_782, 1);
        let t = TrafficSnapshot::idle();
        let (one, two) = (params().terms(&d, 4000, &t), split.terms(&d, 4000, &t));
        let prompt = 4000.0 + d.text_bytes as f64 / 4.0;
        assert!((two.prefill - one.prefill - (6.0 + 0.01 * prompt)).abs() < 1e-9);
        assert_eq!((two.encode, two.pd_wait), (one.encode, one.pd_wait));
        assert_eq!(params().handoff_ms(1e6), 0.0);
        // The hand-off is on the TTFT path: a tight SLO keeps fewer tokens.
        let tight = Demand { slo_ms: 400.0, ..d };
        assert!(split.solve(&tight, &t).total < params().solve(&tight, &t).total);
    }

    #[test]
    fn a_monolithic_backend_encodes_at_prefill() {
        let p = DynamicParams {
            epd: false,
            ..params()
        };
        let t = TrafficSnapshot {
            pd_outstanding_ms: 300.0,
            pd_calibration: 2.0,
            ..TrafficSnapshot::idle()
        };
        let terms = p.terms(&demand(4000, 1), 4000, &t);
        assert_eq!((terms.encode_wait, terms.encode), (0.0, 0.0));
        assert_eq!(terms.pd_wait, 300.0);
        let want = 2.0 * p.prefill.predict(4100.0) + p.encode.predict(4000.0);
        assert!((terms.prefill - want).abs() < 1e-9);
    }
}
