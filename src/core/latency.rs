//! GPU latency model: milliseconds as a function of token count, from a
//! fitted quadratic or a table of measured points.

use serde::Deserialize;
use std::fmt;

/// `a + b·n + c·n²` milliseconds, or a measured table interpolated
/// linearly (and extrapolated from its last two points).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum LatencyModel {
    Quadratic { a: f64, b: f64, c: f64 },
    Table { table: Vec<[f64; 2]> },
}

/// Why a latency model is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatencyModelError(pub String);

impl fmt::Display for LatencyModelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl LatencyModel {
    /// Predicted milliseconds for `n` tokens (never negative, never
    /// decreasing in `n` for a validated model).
    pub fn predict(&self, n: f64) -> f64 {
        let n = n.max(0.0);
        match self {
            Self::Quadratic { a, b, c } => (a + b * n + c * n * n).max(0.0),
            Self::Table { table } => interpolate(table, n).max(0.0),
        }
    }

    /// Checks coefficients and table shape (monotone, so budgets are
    /// monotone in the backlog).
    pub fn validate(&self) -> Result<(), LatencyModelError> {
        match self {
            Self::Quadratic { a, b, c } => {
                if [a, b, c].iter().any(|v| !v.is_finite() || **v < 0.0) {
                    return Err(LatencyModelError(
                        "coefficients a, b, c must be finite and >= 0".into(),
                    ));
                }
                if *b == 0.0 && *c == 0.0 {
                    return Err(LatencyModelError(
                        "b or c must be positive (latency must grow with tokens)".into(),
                    ));
                }
            }
            Self::Table { table } => {
                if table.len() < 2 {
                    return Err(LatencyModelError(
                        "table needs at least two [tokens, ms] points".into(),
                    ));
                }
                if table.iter().flatten().any(|v| !v.is_finite() || *v < 0.0) {
                    return Err(LatencyModelError("table values must be finite and >= 0".into()));
                }
                if table.windows(2).any(|w| w[1][0] <= w[0][0] || w[1][1] < w[0][1]) {
                    return Err(LatencyModelError(
                        "table must be sorted by tokens with non-decreasing milliseconds".into(),
                    ));
                }
                let n = table.len();
                if table[n - 1][1] <= table[0][1] {
                    return Err(LatencyModelError("table latency must grow with tokens".into()));
                }
            }
        }
        Ok(())
    }
}

fn interpolate(table: &[[f64; 2]], n: f64) -> f64 {
    let last = table.len().saturating_sub(1);
    if last == 0 {
        return table.first().map_or(0.0, |p| p[1]);
    }
    // Segment containing n (or the first/last one, extrapolating).
    let i = table.partition_point(|p| p[0] <= n).clamp(1, last);
    let ([x0, y0], [x1, y1]) = (table[i - 1], table[i]);
    let slope = if x1 > x0 { (y1 - y0) / (x1 - x0) } else { 0.0 };
    if n < x0 {
        // Below the table: hold the first value (a fixed launch floor).
        return y0;
    }
    y0 + slope * (n - x0)
}

/// Fitted on an H100 80GB (batched SDPA vision encoder of a
/// Qwen2.5-VL-3B-shaped model, bf16; n >= 1024 tokens): see README.
pub const H100_ENCODE: LatencyModel = LatencyModel::Quadratic {
    a: 14.8,
    b: 0.0299,
    c: 8.93e-7,
};
/// Fitted on an H100 80GB (Qwen2.5-3B-shaped LM prefill; n >= 2048).
pub const H100_PREFILL: LatencyModel = LatencyModel::Quadratic {
    a: 5.9,
    b: 0.01232,
    c: 2.9e-7,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quadratic_matches_the_h100_fit() {
        // 4096 tokens: 14.8 + 0.0299*4096 + 8.93e-7*4096^2 = 152.25 ms (measured 150.8).
        assert!((H100_ENCODE.predict(4096.0) - 152.25).abs() < 0.01);
        assert!(H100_ENCODE.validate().is_ok() && H100_PREFILL.validate().is_ok());
    }

    #[test]
    fn table_interpolates_and_extrapolates() {
        let t = LatencyModel::Table {
            table: vec![[1000.0, 50.0], [2000.0, 80.0], [4000.0, 160.0]],
        };
        assert!(t.validate().is_ok());
        assert_eq!(t.predict(1000.0), 50.0);
        assert_eq!(t.predict(1500.0), 65.0);
        assert_eq!(t.predict(4000.0), 160.0);
        assert_eq!(t.predict(5000.0), 200.0);
        assert_eq!(t.predict(10.0), 50.0);
        let mut prev = 0.0;
        for n in (0..6000).step_by(37) {
            let v = t.predict(f64::from(n));
            assert!(v >= prev);
            prev = v;
        }
    }

    #[test]
    fn bad_models_are_refused() {
        let bad = [
            LatencyModel::Quadratic {
                a: -1.0,
                b: 0.1,
                c: 0.0,
            },
            LatencyModel::Quadratic {
                a: 1.0,
                b: 0.0,
                c: 0.0,
            },
            LatencyModel::Quadratic {
                a: f64::NAN,
                b: 0.1,
                c: 0.0,
            },
            LatencyModel::Table {
                table: vec![[1.0, 2.0]],
            },
            LatencyModel::Table {
                table: vec![[2.0, 2.0], [1.0, 3.0]],
            },
            LatencyModel::Table {
                table: vec![[1.0, 3.0], [2.0, 2.0]],
            },
        ];
        for m in bad {
            assert!(m.validate().is_err(), "{m:?}");
        }
    }

    #[test]
    fn parses_both_forms() {
        let q: LatencyModel = serde_json::from_str(r#"{"a":1,"b":0.5,"c":0}"#).expect("quadratic");
        assert_eq!(q.predict(2.0), 2.0);
        let t: LatencyModel = serde_json::from_str(r#"{"table":[[0,1],[10,11]]}"#).expect("table");
        assert_eq!(t.predict(5.0), 6.0);
        assert!(serde_json::from_str::<LatencyModel>(r#"{"a":1,"b":2}"#).is_err());
    }
}
