//! The learned TTFT correction: how far the observed time-to-first-token
//! ran above the model's prediction (`observed - predicted`, ms), and the
//! margin the dynamic policy plans with.
//!
//! The margin has three parts, learned apart:
//! - a **slope per visual token**: an online least-squares line of the
//!   residual on the tokens the request kept, over a longer memory (costs
//!   the model leaves out that grow with the image — a server's
//!   preprocessing, its decoding, moving a larger body — show up here, and
//!   the margin of a small image no longer pays for them);
//! - a time-decayed **histogram** of what is left (`residual - slope ×
//!   tokens`), whose value at the configured percentile is the rest of the
//!   margin, so a request keeping `n` tokens plans with
//!   `max(0, quantile + slope × n + correction)`;
//! - an **attainment correction**, which closes the loop on the SLO itself:
//!   every request that missed its SLO raises it by
//!   `ATTAINMENT_STEP_MS × slo_percentile`, every one within lowers it by
//!   `ATTAINMENT_STEP_MS × (1 − slo_percentile)`, so it settles where the
//!   share of misses is the one configured (a stochastic-approximation
//!   quantile, as in adaptive conformal inference). The residual
//!   percentile of the last few seconds cannot see a tail that comes in
//!   bursts, and the share of misses can; the correction fades with the
//!   slope's memory and stays within bounds, so it cannot wind up.
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
pub const HISTOGRAM_BYTES: usize = 32 + 8 * FIT_SUMS + 4 * BUCKETS;
/// Size of the attainment correction's step, ms.
pub const ATTAINMENT_STEP_MS: f64 = 50.0;
/// Lowest attainment correction, ms: with no misses it may take back this
/// much of the learned margin, no more (so a first burst after a calm
/// spell does not meet a margin wound down).
pub const MIN_CORRECTION_MS: f64 = -2.0 * ATTAINMENT_STEP_MS;
/// The slope's memory, in correction windows: what grows with the image is
/// a property of the backend and changes slowly, and a line needs more
/// samples than a level.
pub const SLOPE_WINDOWS: f64 = 6.0;
/// Ridge on the slope, (thousand tokens)²: with little spread in the
/// tokens seen, the slope stays near zero instead of following noise.
const RIDGE_KTOKENS2: f64 = 0.25;
/// Decayed weight needed before the slope counts.
const SLOPE_MIN_WEIGHT: f64 = 8.0;
/// Largest slope trusted, ms per visual token (a 16k-token image: +8 s).
pub const MAX_SLOPE_MS_PER_TOKEN: f64 = 0.5;
/// Weighted sums of the line fit: weight, x, x², y, x·y (x in thousands of
/// tokens, y the residual in ms).
const FIT_SUMS: usize = 5;

/// Decayed weights of residuals per bucket, and the decayed sums of the
/// residual's line on tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct ResidualHistogram {
    /// When the weights were last decayed (µs).
    pub at_us: u64,
    /// Sum of the weights (kept with the buckets).
    pub total: f64,
    /// Residuals recorded since the histogram was created.
    pub samples: u64,
    /// The line fit's sums (see [`FIT_SUMS`]).
    pub fit: [f64; FIT_SUMS],
    /// The attainment correction, ms.
    pub correction_ms: f64,
    /// Residuals less the slope's part, per bucket.
    pub weights: Vec<f32>,
}

impl Default for ResidualHistogram {
    fn default() -> Self {
        Self {
            at_us: 0,
            total: 0.0,
            samples: 0,
            fit: [0.0; FIT_SUMS],
            correction_ms: 0.0,
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
    /// Decays every weight to `now_us`: the histogram's with `window_s`,
    /// the line's with [`SLOPE_WINDOWS`] times that.
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
        let g = super::traffic::decay(self.at_us, now_us, window_s * SLOPE_WINDOWS);
        if self.at_us != 0 && g < 1.0 {
            self.fit.iter_mut().for_each(|s| *s *= g);
            self.correction_ms *= g;
        }
        self.at_us = now_us;
    }

    /// One request's outcome against its SLO moves the attainment
    /// correction (see the module's text): up by `step × percentile` for a
    /// miss, down by `step × (1 − percentile)` for one within, kept within
    /// [`MIN_CORRECTION_MS`, `max_ms`].
    pub fn record_outcome(&mut self, missed: bool, percentile: f64, now_us: u64, window_s: f64, max_ms: f64) {
        self.decay_to(now_us, window_s);
        let p = percentile.clamp(0.0, 1.0);
        let step = if missed { p } else { p - 1.0 } * ATTAINMENT_STEP_MS;
        let next = self.correction_ms + step;
        self.correction_ms = if next.is_finite() {
            next.clamp(MIN_CORRECTION_MS, max_ms.max(0.0))
        } else {
            0.0
        };
    }

    /// The residual's slope on the visual tokens a request kept, ms per
    /// token: the decayed least-squares line (with a small ridge), never
    /// below zero — a model that overestimates large images is left as it
    /// is — nor above [`MAX_SLOPE_MS_PER_TOKEN`]; zero until the line has
    /// [`SLOPE_MIN_WEIGHT`] of decayed weight.
    pub fn slope_ms_per_token(&self) -> f64 {
        let [w, sx, sxx, sy, sxy] = self.fit;
        if w.is_nan() || w < SLOPE_MIN_WEIGHT {
            return 0.0;
        }
        let (mx, my) = (sx / w, sy / w);
        let var = (sxx / w - mx * mx).max(0.0);
        let cov = sxy / w - mx * my;
        let per_ktoken = cov / (var + RIDGE_KTOKENS2);
        if per_ktoken.is_finite() {
            (per_ktoken / 1000.0).clamp(0.0, MAX_SLOPE_MS_PER_TOKEN)
        } else {
            0.0
        }
    }

    /// Adds one observed residual at `now_us`, of a request that kept
    /// `tokens` visual tokens.
    pub fn record(&mut self, residual_ms: f64, tokens: u64, now_us: u64, window_s: f64) {
        if !residual_ms.is_finite() {
            return;
        }
        self.decay_to(now_us, window_s);
        if self.total < 1e-20 {
            // Everything before has faded below what f32 holds: start over.
            self.weights.iter_mut().for_each(|w| *w = 0.0);
        }
        if self.fit[0] < 1e-20 {
            self.fit = [0.0; FIT_SUMS];
        }
        let rest = residual_ms - self.slope_ms_per_token() * tokens as f64;
        self.weights[bucket_of(rest)] += 1.0;
        // Recomputed from the buckets so rounding never drifts.
        self.total = self.weights.iter().map(|&w| f64::from(w)).sum();
        // The line sees the residual within the histogram's range, so one
        // wild sample cannot tilt it far.
        let y = residual_ms.clamp(LOW_MS, LOW_MS + WIDTH_MS * BUCKETS as f64);
        let x = tokens as f64 / 1000.0;
        for (s, v) in self.fit.iter_mut().zip([1.0, x, x * x, y, x * y]) {
            *s += v;
        }
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
        out.extend_from_slice(&self.correction_ms.to_le_bytes());
        for s in &self.fit {
            out.extend_from_slice(&s.to_le_bytes());
        }
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
        w8.copy_from_slice(&bytes[24..32]);
        let correction_ms = f64::from_le_bytes(w8);
        let mut fit = [0.0; FIT_SUMS];
        for (s, c) in fit.iter_mut().zip(bytes[32..32 + 8 * FIT_SUMS].chunks_exact(8)) {
            w8.copy_from_slice(c);
            *s = f64::from_le_bytes(w8);
        }
        let weights: Vec<f32> = bytes[32 + 8 * FIT_SUMS..]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let bad =
            fit.iter().any(|s| !s.is_finite()) || fit[0] < 0.0 || fit[2] < 0.0 || !correction_ms.is_finite();
        if !total.is_finite() || total < 0.0 || bad || weights.iter().any(|w| !w.is_finite() || *w < 0.0) {
            return Self::default();
        }
        Self {
            at_us,
            total,
            samples,
            fit,
            correction_ms,
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

/// The margin a request plans with, as a function of the visual tokens it
/// keeps.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Margin {
    /// The residual left after the slope, at the percentile, ms.
    pub base_ms: f64,
    /// The residual's slope, ms per visual token kept.
    pub per_token_ms: f64,
}

impl Margin {
    /// A margin that does not depend on the tokens.
    pub fn flat(ms: f64) -> Self {
        Self {
            base_ms: ms,
            per_token_ms: 0.0,
        }
    }

    /// The margin for a request keeping `tokens`, never below zero (the
    /// model is never trusted beyond itself); never smaller for more
    /// tokens.
    pub fn at(&self, tokens: u64) -> f64 {
        (self.base_ms + self.per_token_ms.max(0.0) * tokens as f64).max(0.0)
    }
}

impl MarginRule {
    /// The margin: the residual at the percentile plus the slope and the
    /// attainment correction, or the prior until enough samples exist (a
    /// cold start).
    pub fn margin(&self, h: &ResidualHistogram) -> Margin {
        if h.samples < self.min_samples {
            return Margin::flat(self.prior_ms + h.correction_ms.max(0.0));
        }
        h.quantile(self.percentile)
            .map_or(Margin::flat(self.prior_ms), |q| Margin {
                base_ms: q + h.correction_ms,
                per_token_ms: h.slope_ms_per_token(),
            })
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
        assert_eq!(rule().margin(&h).at(1000), 100.0);
        h.record(30.0, 1000, 5 * S, 10.0);
        h.record(35.0, 1000, 5 * S + 1, 10.0);
        assert_eq!(rule().margin(&h).at(1000), 100.0);
        for i in 0..196u64 {
            h.record(-50.0 + (i % 10) as f64, 1000, 5 * S + 2 + i, 10.0);
        }
        // One slow sample in 199 (0.5 %): the 99th percentile is the bulk's
        // largest bucket (30-40 ms, upper edge 40).
        h.record(400.0, 1000, 5 * S + 300, 10.0);
        assert_eq!(rule().margin(&h).at(1000), 40.0);
        // Three in 201 (1.5 %): the slow ones' bucket.
        h.record(400.0, 1000, 5 * S + 302, 10.0);
        h.record(400.0, 1000, 5 * S + 303, 10.0);
        assert_eq!(rule().margin(&h).at(1000), 420.0);
        // The median is the bulk's bucket (upper edge).
        let med = h.quantile(0.5).unwrap_or(f64::NAN);
        assert!((-60.0..=-20.0).contains(&med), "{med}");
    }

    #[test]
    fn negative_percentiles_plan_with_zero() {
        let mut h = ResidualHistogram::default();
        for i in 0..20u64 {
            h.record(-300.0, 1000, S + i, 10.0);
        }
        assert_eq!(rule().margin(&h).at(1000), 0.0);
    }

    #[test]
    fn follows_a_slowdown_at_once_and_forgets_it() {
        let r = rule();
        let mut h = ResidualHistogram::default();
        let mut t = S;
        // 4 per second for 30 s around +20 ms.
        for _ in 0..120 {
            h.record(20.0, 1000, t, r.window_s);
            t += 250_000;
        }
        assert!(r.margin(&h).at(1000) <= 40.0);
        // The backend slows down by 300 ms: one slow sample of ~41
        // effective ones is over 1 %, and moves the margin at once.
        h.record(320.0, 1000, t, r.window_s);
        assert!(r.margin(&h).at(1000) >= 320.0, "{}", r.margin(&h).at(1000));
        for _ in 0..20 {
            t += 250_000;
            h.record(320.0, 1000, t, r.window_s);
        }
        // Recovered: after a few windows of fast answers the margin is back.
        for _ in 0..240 {
            t += 250_000;
            h.record(20.0, 1000, t, r.window_s);
        }
        assert!(r.margin(&h).at(1000) <= 40.0, "{}", r.margin(&h).at(1000));
    }

    #[test]
    fn after_a_quiet_spell_the_next_sample_outweighs_the_past() {
        let r = rule();
        let mut h = ResidualHistogram::default();
        for i in 0..50 {
            h.record(500.0, 1000, S + i, r.window_s);
        }
        assert_eq!(r.margin(&h).at(1000), 520.0);
        // Ten minutes later the old percentile still stands until a new
        // residual comes; that one alone then decides.
        h.record(10.0, 1000, 600 * S, r.window_s);
        assert_eq!(r.margin(&h).at(1000), 20.0);
        assert_eq!(h.samples, 51);
    }

    #[test]
    fn a_residual_that_grows_with_the_image_is_learned_as_a_slope() {
        let r = rule();
        let mut h = ResidualHistogram::default();
        let mut t = S;
        // Residual = 40 ms + 0.05 ms per token, ±20 ms, images of 500 to
        // 10,000 tokens, 5 per second for 30 s.
        for i in 0..150u64 {
            let tokens = 500 + (i * 7919) % 9500;
            let noise = [-20.0, 0.0, 20.0][(i % 3) as usize];
            h.record(40.0 + 0.05 * tokens as f64 + noise, tokens, t, r.window_s);
            t += 200_000;
        }
        let slope = h.slope_ms_per_token();
        assert!((0.045..=0.055).contains(&slope), "{slope}");
        let m = r.margin(&h);
        // The rest is the level, the noise and what the ridge leaves of the
        // slope (under 0.2 s at 10k tokens): a small image plans with about
        // a hundred ms, a large one with its share of the slope on top —
        // at least its residual.
        assert!((40.0..=140.0).contains(&m.at(500)), "{}", m.at(500));
        assert!((560.0..=640.0).contains(&m.at(10_000)), "{}", m.at(10_000));
        // A flat histogram would have planned every request with the
        // large images' residual.
        let mut flat = ResidualHistogram::default();
        let mut t = S;
        for i in 0..150u64 {
            let tokens = 500 + (i * 7919) % 9500;
            flat.record(40.0 + 0.05 * tokens as f64, 1000, t, r.window_s);
            t += 200_000;
        }
        assert!(r.margin(&flat).at(500) >= 480.0);
    }

    #[test]
    fn no_slope_without_spread_or_samples_and_never_negative() {
        let r = rule();
        let mut h = ResidualHistogram::default();
        // Few samples: no slope yet, whatever they say.
        for i in 0..5u64 {
            h.record(100.0 * i as f64, 2000 * i, S + i, r.window_s);
        }
        assert_eq!(h.slope_ms_per_token(), 0.0);
        // A model that overestimates large images: the slope stays at zero.
        let mut h = ResidualHistogram::default();
        for i in 0..60u64 {
            let tokens = 500 + (i * 997) % 8000;
            h.record(-0.05 * tokens as f64, tokens, S + i * 100_000, r.window_s);
        }
        assert_eq!(h.slope_ms_per_token(), 0.0);
        assert!(r.margin(&h).at(0) >= r.margin(&h).at(8000) - 1e-9);
    }

    #[test]
    fn the_attainment_correction_settles_where_the_misses_are_the_target_share() {
        let r = rule();
        let mut h = ResidualHistogram::default();
        let mut t = S;
        for _ in 0..50 {
            h.record(100.0, 1000, t, r.window_s);
            t += 200_000;
        }
        let before = r.margin(&h).at(1000);
        // One miss in 20: the correction climbs (+49.5 per miss, -0.5 per
        // request within).
        for i in 0..200u64 {
            h.record_outcome(i % 20 == 0, r.percentile, t, r.window_s, 500.0);
            t += 200_000;
        }
        let raised = h.correction_ms;
        assert!(raised > 150.0, "{raised}");
        assert_eq!(r.margin(&h).at(1000), before + raised);
        // One in 200, under the 1 % aimed at: it comes down again, and with
        // none at all it stops at its floor.
        for i in 0..400u64 {
            h.record_outcome(i % 200 == 0, r.percentile, t, r.window_s, 500.0);
            t += 200_000;
        }
        assert!(h.correction_ms < raised / 2.0, "{}", h.correction_ms);
        for _ in 0..2000u64 {
            h.record_outcome(false, r.percentile, t, r.window_s, 500.0);
            t += 10_000;
        }
        assert_eq!(h.correction_ms, MIN_CORRECTION_MS);
        // Bounded above, and it fades with the slope's memory.
        for _ in 0..100 {
            h.record_outcome(true, r.percentile, t, r.window_s, 300.0);
        }
        assert_eq!(h.correction_ms, 300.0);
        h.record_outcome(false, r.percentile, t + 120 * S, r.window_s, 300.0);
        assert!(h.correction_ms.abs() < 300.0 * 0.2, "{}", h.correction_ms);
    }

    #[test]
    fn out_of_range_and_bad_values() {
        let mut h = ResidualHistogram::default();
        h.record(f64::NAN, 1000, S, 10.0);
        h.record(f64::INFINITY, 1000, S, 10.0);
        assert_eq!(h.total, 0.0);
        h.record(-1e9, 1000, S, 10.0);
        h.record(1e9, 1000, S, 10.0);
        assert_eq!(h.weights[0], 1.0);
        assert_eq!(h.weights[BUCKETS - 1], 1.0);
        assert_eq!(h.quantile(1.0), Some(LOW_MS + WIDTH_MS * BUCKETS as f64));
    }

    #[test]
    fn roundtrip_and_foreign_bytes() {
        let mut h = ResidualHistogram::default();
        h.record(12.0, 1000, 7 * S, 10.0);
        h.record(250.0, 1000, 8 * S, 10.0);
        h.record_outcome(true, 0.99, 8 * S, 10.0, 500.0);
        assert!(h.correction_ms > 0.0);
        let bytes = h.encode();
        assert_eq!(bytes.len(), HISTOGRAM_BYTES);
        assert_eq!(ResidualHistogram::decode(&bytes), h);
        assert_eq!(ResidualHistogram::decode(b"short"), ResidualHistogram::default());
        let mut bad = bytes.clone();
        let w0 = 32 + 8 * FIT_SUMS;
        bad[w0..w0 + 4].copy_from_slice(&f32::NAN.to_le_bytes());
        assert_eq!(ResidualHistogram::decode(&bad), ResidualHistogram::default());
        let mut bad = bytes.clone();
        bad[32..40].copy_from_slice(&(-1.0f64).to_le_bytes());
        assert_eq!(ResidualHistogram::decode(&bad), ResidualHistogram::default());
    }
}
