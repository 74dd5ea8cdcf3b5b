//! The learned TTFT correction: a time-decayed histogram of how far the
//! observed time-to-first-token ran above the model's prediction
//! (`observed - predicted`, ms), and the margin the dynamic policy plans
//! with — the residual at the configured percentile.
//!
//! Bounded memory (a fixed number of buckets), shared by every worker (the
//! host keeps the encoded histogram in proxy-wasm shared data and updates it
//! with compare-and-swap), and quick to follow the backend both ways: every
//! bucket's weight decays with time constant `window_s`, so a new residual
//! counts at once and an old one fades within a few windows. Decay scales
//! every weight alike, so after a quiet spell the percentile is still the
//! one last learned — and the next residual outweighs all of it.

/// Lowest residual a bucket holds, ms (smaller ones count in the first).
pub const LOW_MS: f64 = -1000.0;
/// Bucket width, ms.
pub const WIDTH_MS: f64 = 20.0;
/// Number of buckets: residuals from -1 s to +5 s (larger count in the last).
pub const BUCKETS: usize = 300;
/// Serialised size of a [`ResidualHistogram`].
pub const HISTOGRAM_BYTES: usize = 24 + 4 * BUCKETS;

/// Decayed weights of residuals per bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct ResidualHistogram {
    /// When the weights were last decayed (µs).
    pub at_us: u64,
    /// Sum of the weights (kept with the buckets).
    pub total: f64,
    /// Residuals recorded since the histogram was created.
    pub samples: u64,
    pub weights: Vec<f32>,
}

impl Default for ResidualHistogram {
    fn default() -> Self {
        Self {
            at_us: 0,
            total: 0.0,
            samples: 0,
            weights: vec![0.0; BUCKETS],
        }
    }
}

fn bucket_of(residual_ms: f64) -> usize {
    let i = ((residual_ms - LOW_MS) / WIDTH_MS).floor();
    if i.is_nan() || i < 0.0 {
        0
    } else {
        (i as usize).min(BUCKETS - 1)
    }
}

impl ResidualHistogram {
    /// Decays every weight to `now_us`.
    fn decay_to(&mut self, now_us: u64, window_s: f64) {
        if now_us <= self.at_us {
            return;
        }
        let f = super::traffic::decay(self.at_us, now_us, window_s);
        if self.at_us != 0 && f < 1.0 {
            let f32f = f as f32;
            for w in &mut self.weights {
                *w *= f32f;
            }
            self.total *= f;
        }
        self.at_us = now_us;
    }

    /// Adds one observed residual at `now_us`.
    pub fn record(&mut self, residual_ms: f64, now_us: u64, window_s: f64) {
        if !residual_ms.is_finite() {
            return;
        }
        self.decay_to(now_us, window_s);
        if self.total < 1e-20 {
            // Everything before has faded below what f32 holds: start over.
            self.weights.iter_mut().for_each(|w| *w = 0.0);
        }
        self.weights[bucket_of(residual_ms)] += 1.0;
        // Recomputed from the buckets so rounding never drifts.
        self.total = self.weights.iter().map(|&w| f64::from(w)).sum();
        self.samples = self.samples.saturating_add(1);
    }

    /// The residual at quantile `q` (0..1): the upper edge of the bucket
    /// where the cumulative weight reaches `q` of the total, so the margin
    /// errs on the safe side by at most one bucket. `None` without samples.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.total <= 0.0 {
            return None;
        }
        let want = q.clamp(0.0, 1.0) * self.total;
        let mut acc = 0.0;
        let mut last = None;
        for (i, &w) in self.weights.iter().enumerate() {
            if w <= 0.0 {
                continue;
            }
            acc += f64::from(w);
            last = Some(i);
            if acc >= want - 1e-9 {
                break;
            }
        }
        last.map(|i| LOW_MS + WIDTH_MS * (i as f64 + 1.0))
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HISTOGRAM_BYTES);
        out.extend_from_slice(&self.at_us.to_le_bytes());
        out.extend_from_slice(&self.total.to_le_bytes());
        out.extend_from_slice(&self.samples.to_le_bytes());
        for w in &self.weights {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out
    }

    /// Decodes; anything of the wrong size or with bad values is empty.
    pub fn decode(bytes: &[u8]) -> Self {
        if bytes.len() != HISTOGRAM_BYTES {
            return Self::default();
        }
        let mut w8 = [0u8; 8];
        w8.copy_from_slice(&bytes[..8]);
        let at_us = u64::from_le_bytes(w8);
        w8.copy_from_slice(&bytes[8..16]);
        let total = f64::from_le_bytes(w8);
        w8.copy_from_slice(&bytes[16..24]);
        let samples = u64::from_le_bytes(w8);
        let weights: Vec<f32> = bytes[24..]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if !total.is_finite() || total < 0.0 || weights.iter().any(|w| !w.is_finite() || *w < 0.0) {
            return Self::default();
        }
        Self {
            at_us,
            total,
            samples,
            weights,
        }
    }
}

/// How the dynamic policy turns the histogram into the margin it plans with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MarginRule {
    /// Share of requests meant to be within the SLO (`slo_percentile`).
    pub percentile: f64,
    /// Time constant of the residuals' decay, s (`correction_window_s`).
    pub window_s: f64,
    /// Samples needed before the histogram replaces the prior.
    pub min_samples: u64,
    /// The margin before that (`overhead_ms`).
    pub prior_ms: f64,
}

impl MarginRule {
    /// The margin: the residual at the percentile, never below zero (the
    /// model is never trusted beyond itself), or the prior until enough
    /// samples exist (a cold start).
    pub fn margin_ms(&self, h: &ResidualHistogram) -> f64 {
        if h.samples < self.min_samples {
            return self.prior_ms;
        }
        h.quantile(self.percentile).map_or(self.prior_ms, |q| q.max(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000;

    fn rule() -> MarginRule {
        MarginRule {
            percentile: 0.99,
            window_s: 10.0,
            min_samples: 3,
            prior_ms: 100.0,
        }
    }

    #[test]
    fn prior_until_enough_samples_then_the_percentile() {
        let mut h = ResidualHistogram::default();
        assert_eq!(rule().margin_ms(&h), 100.0);
        h.record(30.0, 5 * S, 10.0);
        h.record(35.0, 5 * S + 1, 10.0);
        assert_eq!(rule().margin_ms(&h), 100.0);
        for i in 0..196u64 {
            h.record(-50.0 + (i % 10) as f64, 5 * S + 2 + i, 10.0);
        }
        // One slow sample in 199 (0.5 %): the 99th percentile is the bulk's
        // largest bucket (30-40 ms, upper edge 40).
        h.record(400.0, 5 * S + 300, 10.0);
        assert_eq!(rule().margin_ms(&h), 40.0);
        // Three in 201 (1.5 %): the slow ones' bucket.
        h.record(400.0, 5 * S + 302, 10.0);
        h.record(400.0, 5 * S + 303, 10.0);
        assert_eq!(rule().margin_ms(&h), 420.0);
        // The median is the bulk's bucket (upper edge).
        let med = h.quantile(0.5).unwrap_or(f64::NAN);
        assert!((-60.0..=-20.0).contains(&med), "{med}");
    }

    #[test]
    fn negative_percentiles_plan_with_zero() {
        let mut h = ResidualHistogram::default();
        for i in 0..20u64 {
            h.record(-300.0, S + i, 10.0);
        }
        assert_eq!(rule().margin_ms(&h), 0.0);
    }

    #[test]
    fn follows_a_slowdown_at_once_and_forgets_it() {
        let r = rule();
        let mut h = ResidualHistogram::default();
        let mut t = S;
        // 4 per second for 30 s around +20 ms.
        for _ in 0..120 {
            h.record(20.0, t, r.window_s);
            t += 250_000;
        }
        assert!(r.margin_ms(&h) <= 40.0);
        // The backend slows down by 300 ms: one slow sample of ~41
        // effective ones is over 1 %, and moves the margin at once.
        h.record(320.0, t, r.window_s);
        assert!(r.margin_ms(&h) >= 320.0, "{}", r.margin_ms(&h));
        for _ in 0..20 {
            t += 250_000;
            h.record(320.0, t, r.window_s);
        }
        // Recovered: after a few windows of fast answers the margin is back.
        for _ in 0..240 {
            t += 250_000;
            h.record(20.0, t, r.window_s);
        }
        assert!(r.margin_ms(&h) <= 40.0, "{}", r.margin_ms(&h));
    }

    #[test]
    fn after_a_quiet_spell_the_next_sample_outweighs_the_past() {
        let r = rule();
        let mut h = ResidualHistogram::default();
        for i in 0..50 {
            h.record(500.0, S + i, r.window_s);
        }
        assert_eq!(r.margin_ms(&h), 520.0);
        // Ten minutes later the old percentile still stands until a new
        // residual comes; that one alone then decides.
        h.record(10.0, 600 * S, r.window_s);
        assert_eq!(r.margin_ms(&h), 20.0);
        assert_eq!(h.samples, 51);
    }

    #[test]
    fn out_of_range_and_bad_values() {
        let mut h = ResidualHistogram::default();
        h.record(f64::NAN, S, 10.0);
        h.record(f64::INFINITY, S, 10.0);
        assert_eq!(h.total, 0.0);
        h.record(-1e9, S, 10.0);
        h.record(1e9, S, 10.0);
        assert_eq!(h.weights[0], 1.0);
        assert_eq!(h.weights[BUCKETS - 1], 1.0);
        assert_eq!(h.quantile(1.0), Some(LOW_MS + WIDTH_MS * BUCKETS as f64));
    }

    #[test]
    fn roundtrip_and_foreign_bytes() {
        let mut h = ResidualHistogram::default();
        h.record(12.0, 7 * S, 10.0);
        h.record(250.0, 8 * S, 10.0);
        let bytes = h.encode();
        assert_eq!(bytes.len(), HISTOGRAM_BYTES);
        assert_eq!(ResidualHistogram::decode(&bytes), h);
        assert_eq!(ResidualHistogram::decode(b"short"), ResidualHistogram::default());
        let mut bad = bytes.clone();
        bad[24..28].copy_from_slice(&f32::NAN.to_le_bytes());
        assert_eq!(ResidualHistogram::decode(&bad), ResidualHistogram::default());
    }
}
