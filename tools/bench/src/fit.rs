//! Least-squares fit of `a + b·n + c·n²` with non-negative coefficients (the
//! filter's latency model requires a, b, c ≥ 0).
//!
//! With three coefficients the non-negative least-squares problem is solved
//! exactly by trying every subset of free coefficients (the others held at
//! zero) and keeping the feasible solution with the smallest squared error.
//! Token counts are scaled by the largest one for a well-conditioned system.

use crate::error::{BenchError, Result};
use serde::{Deserialize, Serialize};

/// `a + b·n + c·n²` milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
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

/// Solves the k×k system `m x = r` by Gaussian elimination with partial
/// pivoting; None when singular.
fn solve(mut m: Vec<Vec<f64>>, mut r: Vec<f64>) -> Option<Vec<f64>> {
    let k = r.len();
    let scale = m
        .iter()
        .flatten()
        .fold(0.0f64, |s, v| s.max(v.abs()))
        .max(f64::MIN_POSITIVE);
    for col in 0..k {
        let pivot = (col..k).max_by(|&i, &j| m[i][col].abs().total_cmp(&m[j][col].abs()))?;
        if m[pivot][col].abs() <= scale * 1e-12 {
            return None;
        }
        m.swap(col, pivot);
        r.swap(col, pivot);
        for row in col + 1..k {
            let f = m[row][col] / m[col][col];
            let (top, bottom) = m.split_at_mut(row);
            for (t, p) in bottom[0][col..].iter_mut().zip(&top[col][col..]) {
                *t -= f * p;
            }
            r[row] -= f * r[col];
        }
    }
    let mut x = vec![0.0; k];
    for row in (0..k).rev() {
        let s: f64 = (row + 1..k).map(|c| m[row][c] * x[c]).sum();
        x[row] = (r[row] - s) / m[row][row];
    }
    Some(x)
}

/// Fits (n, ms) points. Needs at least three distinct token counts.
pub fn fit_quadratic(points: &[(f64, f64)]) -> Result<Quadratic> {
    if points
        .iter()
        .any(|(n, y)| !n.is_finite() || !y.is_finite() || *n < 0.0)
    {
        return Err(BenchError::Numeric(
            "fit: points must be finite, token counts >= 0".into(),
        ));
    }
    let mut distinct: Vec<f64> = points.iter().map(|p| p.0).collect();
    distinct.sort_by(f64::total_cmp);
    distinct.dedup();
    if distinct.len() < 3 {
        return Err(BenchError::Numeric(format!(
            "fit: need at least 3 distinct token counts, got {}",
            distinct.len()
        )));
    }
    let s = distinct.last().copied().unwrap_or(1.0).max(1.0);
    let basis = |x: f64| [1.0, x, x * x];
    let sse = |coef: &[f64; 3]| -> f64 {
        points
            .iter()
            .map(|&(n, y)| {
                let x = n / s;
                let f: f64 = basis(x).iter().zip(coef).map(|(b, c)| b * c).sum();
                (y - f) * (y - f)
            })
            .sum()
    };
    let mut best: Option<([f64; 3], f64)> = None;
    for mask in 1u8..8 {
        let free: Vec<usize> = (0..3).filter(|i| mask & (1 << i) != 0).collect();
        let k = free.len();
        let mut m = vec![vec![0.0; k]; k];
        let mut r = vec![0.0; k];
        for &(n, y) in points {
            let b = basis(n / s);
            for (i, &fi) in free.iter().enumerate() {
                r[i] += b[fi] * y;
                for (j, &fj) in free.iter().enumerate() {
                    m[i][j] += b[fi] * b[fj];
                }
            }
        }
        let Some(x) = solve(m, r) else { continue };
        if x.iter().any(|v| *v < 0.0 || !v.is_finite()) {
            continue;
        }
        let mut coef = [0.0; 3];
        for (i, &fi) in free.iter().enumerate() {
            coef[fi] = x[i];
        }
        let e = sse(&coef);
        if best.is_none_or(|(_, b)| e < b) {
            best = Some((coef, e));
        }
    }
    let (coef, _) = best.ok_or_else(|| BenchError::Numeric("fit: no non-negative solution".into()))?;
    Ok(Quadratic {
        a: coef[0],
        b: coef[1] / s,
        c: coef[2] / (s * s),
    })
}

/// Largest |fit(n) − ms| / ms over the points.
pub fn max_relative_error(q: &Quadratic, points: &[(f64, f64)]) -> f64 {
    points
        .iter()
        .filter(|(_, y)| *y > 0.0)
        .map(|&(n, y)| ((q.at(n) - y) / y).abs())
        .fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn recovers_known_coefficients_exactly() {
        let q = Quadratic {
            a: 14.8,
            b: 0.0299,
            c: 8.93e-7,
        };
        let pts: Vec<(f64, f64)> = [1024.0, 2304.0, 4096.0, 6400.0, 9216.0, 12544.0, 16384.0]
            .iter()
            .map(|&n| (n, q.at(n)))
            .collect();
        let f = fit_quadratic(&pts).unwrap();
        assert!((f.a - q.a).abs() < 1e-6, "{f:?}");
        assert!((f.b - q.b).abs() < 1e-9, "{f:?}");
        assert!((f.c - q.c).abs() < 1e-13, "{f:?}");
    }

    #[test]
    fn recovers_coefficients_under_noise() {
        let q = Quadratic {
            a: 5.9,
            b: 0.01232,
            c: 2.9e-7,
        };
        let mut rng = Rng::new(5);
        let mut pts = Vec::new();
        for k in 1..=16 {
            let n = 1024.0 * k as f64;
            for _ in 0..20 {
                // ±1% multiplicative noise.
                pts.push((n, q.at(n) * rng.range(0.99, 1.01)));
            }
        }
        let f = fit_quadratic(&pts).unwrap();
        for k in 1..=16 {
            let n = 1024.0 * k as f64;
            assert!(((f.at(n) - q.at(n)) / q.at(n)).abs() < 0.005, "{n}: {f:?}");
        }
        assert!(max_relative_error(&f, &pts) < 0.02);
    }

    #[test]
    fn negative_coefficients_are_clamped() {
        // Concave data: the unconstrained fit has c < 0.
        let pts: Vec<(f64, f64)> = [1.0, 2.0, 3.0, 4.0, 5.0]
            .iter()
            .map(|&n| (n, 10.0 * f64::sqrt(n)))
            .collect();
        let f = fit_quadratic(&pts).unwrap();
        assert!(f.a >= 0.0 && f.b >= 0.0 && f.c >= 0.0, "{f:?}");
        assert_eq!(f.c, 0.0);
        // A pure line through the origin keeps a = 0 rather than going negative.
        let pts: Vec<(f64, f64)> = [1.0, 2.0, 3.0].iter().map(|&n| (n, 2.0 * n - 0.5)).collect();
        let f = fit_quadratic(&pts).unwrap();
        assert!(f.a >= 0.0 && f.b > 0.0, "{f:?}");
    }

    #[test]
    fn too_few_points_are_refused() {
        assert!(fit_quadratic(&[(1.0, 1.0), (2.0, 2.0), (2.0, 2.1)]).is_err());
        assert!(fit_quadratic(&[(1.0, f64::NAN), (2.0, 2.0), (3.0, 2.1)]).is_err());
    }
}
