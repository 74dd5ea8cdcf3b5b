//! GPU latency curves built from the H100 measurements.
//!
//! A [`Curve`] maps a token count to milliseconds:
//!
//! - Inside the measured range it interpolates linearly between the
//!   measured medians.
//! - Below the first point it stays at the first point's value (a launch
//!   floor: small inputs do not get cheaper than the smallest measured one).
//! - Beyond the last point it follows the published quadratic fit
//!   `a + b n + c n^2`, anchored at the last measured point so the curve is
//!   continuous there: `t(n) = t(last) + fit(n) - fit(last)`. Without a fit
//!   the last segment's slope is continued.
//!
//! Below about 1000 tokens the measurements are dominated by a flat launch
//! floor with noise (e.g. 256 tokens measured slower than 576). The curve
//! uses the lower monotone envelope of the medians (each point is the
//! smallest median at that size or above), so more tokens never cost less;
//! every point from the floor upwards is kept exactly.

use serde::Deserialize;
use std::fmt;

/// The measurements shipped with the emulator.
pub const BUILTIN_DATA: &str = include_str!("../data/h100-qwen2.5-vl-3b-latency.json");

/// Why latency data cannot be used.
#[derive(Debug, Clone, PartialEq)]
pub enum LatencyError {
    /// Not valid JSON, or a section has the wrong shape.
    Json(String),
    /// A required section is missing.
    Missing(String),
    /// The encoder variant is not in the data.
    UnknownVariant { variant: String, available: Vec<String> },
    /// Points that cannot form a curve.
    Invalid(String),
}

impl fmt::Display for LatencyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Json(e) => write!(f, "latency data is not valid: {e}"),
            Self::Missing(what) => write!(f, "latency data has no `{what}`"),
            Self::UnknownVariant { variant, available } => write!(
                f,
                "encoder variant `{variant}` is not in the latency data (available: {})",
                available.join(", ")
            ),
            Self::Invalid(e) => write!(f, "latency data is not usable: {e}"),
        }
    }
}

impl std::error::Error for LatencyError {}

/// `a + b n + c n^2`, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct Quadratic {
    pub a: f64,
    pub b: f64,
    pub c: f64,
}

impl Quadratic {
    pub fn at(&self, n: f64) -> f64 {
        self.a + self.b * n + self.c * n * n
    }
}

/// A monotone latency curve over token counts.
#[derive(Debug, Clone, PartialEq)]
pub struct Curve {
    /// (tokens, ms), tokens strictly increasing, ms non-decreasing.
    points: Vec<(f64, f64)>,
    fit: Option<Quadratic>,
}

impl Curve {
    /// Builds a curve from measured (tokens, median ms) points, in any order.
    pub fn new(mut points: Vec<(f64, f64)>, fit: Option<Quadratic>) -> Result<Self, LatencyError> {
        if points.len() < 2 {
            return Err(LatencyError::Invalid("a curve needs at least two points".into()));
        }
        if points
            .iter()
            .any(|&(n, ms)| !n.is_finite() || !ms.is_finite() || n <= 0.0 || ms < 0.0)
        {
            return Err(LatencyError::Invalid(
                "token counts must be positive and times non-negative".into(),
            ));
        }
        points.sort_by(|x, y| x.0.total_cmp(&y.0));
        if points.windows(2).any(|w| w[0].0 == w[1].0) {
            return Err(LatencyError::Invalid("a token count is measured twice".into()));
        }
        if let Some(q) = fit {
            if !(q.a.is_finite() && q.b >= 0.0 && q.c >= 0.0 && q.b.is_finite() && q.c.is_finite()) {
                return Err(LatencyError::Invalid(
                    "the quadratic fit must be finite and non-decreasing".into(),
                ));
            }
        }
        // Lower monotone envelope: a point may only be lowered to the
        // smallest value at or after it.
        let mut floor = f64::INFINITY;
        for p in points.iter_mut().rev() {
            floor = floor.min(p.1);
            p.1 = floor;
        }
        Ok(Self { points, fit })
    }

    /// The curve's points (after the monotone envelope).
    /// The fixed per-call part of the curve (the fit's constant term), ms.
    pub fn fixed_ms(&self) -> f64 {
        self.fit.map_or(0.0, |q| q.a.max(0.0))
    }

    pub fn points(&self) -> &[(f64, f64)] {
        &self.points
    }

    /// Milliseconds for `n` tokens (0 for no work).
    pub fn ms(&self, n: f64) -> f64 {
        if n <= 0.0 || !n.is_finite() {
            return 0.0;
        }
        let (Some(&first), Some(&last)) = (self.points.first(), self.points.last()) else {
            return 0.0;
        };
        if n <= first.0 {
            return first.1;
        }
        if n >= last.0 {
            let extra = match self.fit {
                Some(q) => q.at(n) - q.at(last.0),
                None => {
                    let prev = self.points[self.points.len() - 2];
                    (last.1 - prev.1) / (last.0 - prev.0) * (n - last.0)
                }
            };
            return last.1 + extra.max(0.0);
        }
        // First point at or above n; it exists and is not the first point.
        let i = self.points.partition_point(|p| p.0 < n);
        let (x0, y0) = self.points[i - 1];
        let (x1, y1) = self.points[i];
        y0 + (y1 - y0) * (n - x0) / (x1 - x0)
    }
}

/// The two curves the emulator uses.
#[derive(Debug, Clone, PartialEq)]
pub struct LatencyModel {
    /// Vision encoder: visual tokens -> ms.
    pub encoder: Curve,
    /// Language-model prefill: prompt tokens -> ms.
    pub prefill: Curve,
    /// The encoder variant used.
    pub variant: String,
}

#[derive(Deserialize)]
struct EncoderPoint {
    visual_tokens: f64,
    median_ms: f64,
}

#[derive(Deserialize)]
struct PrefillPoint {
    tokens: f64,
    median_ms: f64,
}

const ENCODER_FIT: &str = "fit_ms_a_plus_bn_plus_cn2_for_n_ge_1024";
const PREFILL_FIT: &str = "fit_ms_a_plus_bn_plus_cn2_for_n_ge_2048";

fn typed<T: for<'de> Deserialize<'de>>(v: &serde_json::Value, what: &str) -> Result<T, LatencyError> {
    T::deserialize(v).map_err(|e| LatencyError::Json(format!("{what}: {e}")))
}

impl LatencyModel {
    /// The shipped H100 measurements with the given encoder variant.
    pub fn builtin(variant: &str) -> Result<Self, LatencyError> {
        Self::from_json(BUILTIN_DATA, variant)
    }

    /// Encoder variants with a measured table in `text`.
    pub fn variants(text: &str) -> Result<Vec<String>, LatencyError> {
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| LatencyError::Json(e.to_string()))?;
        let enc = v
            .get("vision_encoder")
            .and_then(|e| e.as_object())
            .ok_or_else(|| LatencyError::Missing("vision_encoder".into()))?;
        Ok(enc
            .iter()
            .filter(|(_, t)| {
                t.as_array()
                    .is_some_and(|a| a.first().is_some_and(|p| p.get("visual_tokens").is_some()))
            })
            .map(|(k, _)| k.clone())
            .collect())
    }

    /// Parses measurements in the format of `data/h100-qwen2.5-vl-3b-latency.json`.
    pub fn from_json(text: &str, variant: &str) -> Result<Self, LatencyError> {
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| LatencyError::Json(e.to_string()))?;
        let enc = v
            .get("vision_encoder")
            .ok_or_else(|| LatencyError::Missing("vision_encoder".into()))?;
        let table = match enc.get(variant) {
            Some(t) if t.is_array() => t,
            _ => {
                return Err(LatencyError::UnknownVariant {
                    variant: variant.into(),
                    available: Self::variants(text)?,
                })
            }
        };
        let table: Vec<EncoderPoint> = typed(table, &format!("vision_encoder.{variant}"))?;
        let fit = match enc.get(ENCODER_FIT).and_then(|f| f.get(variant)) {
            Some(f) => Some(typed::<Quadratic>(
                f,
                &format!("vision_encoder.{ENCODER_FIT}.{variant}"),
            )?),
            None => None,
        };
        let encoder = Curve::new(
            table.iter().map(|p| (p.visual_tokens, p.median_ms)).collect(),
            fit,
        )?;

        let lm = v
            .get("lm_prefill")
            .ok_or_else(|| LatencyError::Missing("lm_prefill".into()))?;
        let timings = lm
            .get("timings")
            .ok_or_else(|| LatencyError::Missing("lm_prefill.timings".into()))?;
        let timings: Vec<PrefillPoint> = typed(timings, "lm_prefill.timings")?;
        let fit = match lm.get(PREFILL_FIT) {
            Some(f) => Some(typed::<Quadratic>(f, &format!("lm_prefill.{PREFILL_FIT}"))?),
            None => None,
        };
        let prefill = Curve::new(timings.iter().map(|p| (p.tokens, p.median_ms)).collect(), fit)?;
        Ok(Self {
            encoder,
            prefill,
            variant: variant.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw_table(variant: &str) -> Vec<(f64, f64)> {
        let v: serde_json::Value = serde_json::from_str(BUILTIN_DATA).unwrap_or_default();
        v["vision_encoder"][variant]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|p| {
                        (
                            p["visual_tokens"].as_f64().unwrap_or(0.0),
                            p["median_ms"].as_f64().unwrap_or(0.0),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn model() -> LatencyModel {
        LatencyModel::builtin("batched_sdpa").expect("builtin data")
    }

    #[test]
    fn exact_at_measured_points_from_the_floor_up() {
        let m = model();
        let raw = raw_table("batched_sdpa");
        assert_eq!(raw.len(), 15);
        for &(n, ms) in &raw {
            if n >= 1024.0 {
                assert_eq!(m.encoder.ms(n), ms, "{n} tokens");
            }
        }
        // The noisy floor: 256 tokens measured 40.70 ms, 576 tokens 35.51 ms.
        assert_eq!(m.encoder.ms(576.0), 35.51);
        assert_eq!(m.encoder.ms(256.0), 35.51);
        assert_eq!(m.encoder.ms(4.0), 35.51);
        assert_eq!(m.prefill.ms(4096.0), 61.1);
        assert_eq!(m.prefill.ms(16384.0), 285.58);
        assert_eq!(m.prefill.ms(1024.0), 32.23);
        assert_eq!(m.encoder.ms(0.0), 0.0);
    }

    #[test]
    fn interpolates_linearly_between_points() {
        let m = model();
        // Halfway between 1024 (47.32) and 1600 (62.02).
        let mid = m.encoder.ms(1312.0);
        assert!((mid - (47.32 + 62.02) / 2.0).abs() < 1e-9, "{mid}");
        // 2048 tokens: 62.02 + (448/704) * (87.23 - 62.02).
        let want = 62.02 + 448.0 / 704.0 * (87.23 - 62.02);
        assert!((m.encoder.ms(2048.0) - want).abs() < 1e-9);
    }

    #[test]
    fn monotone_everywhere_for_every_variant() {
        for variant in LatencyModel::variants(BUILTIN_DATA).expect("variants") {
            let m = LatencyModel::builtin(&variant).expect("variant");
            for curve in [&m.encoder, &m.prefill] {
                let mut prev = 0.0;
                for n in (1..40_000).step_by(7) {
                    let t = curve.ms(f64::from(n));
                    assert!(t >= prev, "{variant}: {n} tokens: {t} < {prev}");
                    prev = t;
                }
            }
        }
    }

    #[test]
    fn extrapolates_with_the_anchored_fit() {
        let m = model();
        let fit = Quadratic {
            a: 14.8,
            b: 0.0299,
            c: 8.93e-7,
        };
        for n in [16_385.0, 20_000.0, 32_768.0, 65_536.0] {
            let got = m.encoder.ms(n);
            let want = 745.63 + fit.at(n) - fit.at(16_384.0);
            assert!((got - want).abs() < 1e-9, "{n}: {got} vs {want}");
            // Close to the raw fit (which is within 4.6% of the data).
            assert!((got / fit.at(n) - 1.0).abs() < 0.01, "{n}");
        }
        // Prefill beyond 16384 tokens: the fit is within 0.6% of the data.
        let pf = Quadratic {
            a: 5.9,
            b: 0.01232,
            c: 2.9e-7,
        };
        let got = m.prefill.ms(32_768.0);
        assert!((got - (285.58 + pf.at(32_768.0) - pf.at(16_384.0))).abs() < 1e-9);
        assert!(got > 600.0 && got < 750.0, "{got}");
    }

    #[test]
    fn variant_without_fit_continues_the_last_slope() {
        let m = LatencyModel::builtin("hf_sdpa").expect("hf_sdpa");
        let pts = m.encoder.points();
        let (a, b) = (pts[pts.len() - 2], pts[pts.len() - 1]);
        let slope = (b.1 - a.1) / (b.0 - a.0);
        let got = m.encoder.ms(b.0 + 1000.0);
        assert!((got - (b.1 + slope * 1000.0)).abs() < 1e-9);
    }

    #[test]
    fn rejects_bad_data() {
        assert!(matches!(
            LatencyModel::builtin("nope"),
            Err(LatencyError::UnknownVariant { .. })
        ));
        assert!(matches!(
            LatencyModel::from_json("{", "x"),
            Err(LatencyError::Json(_))
        ));
        assert!(matches!(
            LatencyModel::from_json(r#"{"lm_prefill":{}}"#, "x"),
            Err(LatencyError::Missing(_))
        ));
        assert!(matches!(
            Curve::new(vec![(1.0, 2.0)], None),
            Err(LatencyError::Invalid(_))
        ));
        assert!(matches!(
            Curve::new(vec![(1.0, 2.0), (1.0, 3.0)], None),
            Err(LatencyError::Invalid(_))
        ));
        let text = r#"{"vision_encoder":{"v":[{"visual_tokens":1,"median_ms":1},{"visual_tokens":2,"median_ms":2}]},
                      "lm_prefill":{"timings":[{"tokens":"x","median_ms":1}]}}"#;
        assert!(matches!(
            LatencyModel::from_json(text, "v"),
            Err(LatencyError::Json(_))
        ));
    }
}
