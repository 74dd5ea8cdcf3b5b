//! Percentiles, distributions, spreads over runs, SLO attainment and token
//! retention.

use serde::Serialize;

/// The p-th percentile (0..=100) of `values` by linear interpolation between
/// order statistics (NumPy's default); None for no values. NaNs are ignored.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() || !(0.0..=100.0).contains(&p) {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let h = (v.len() - 1) as f64 * p / 100.0;
    let lo = h.floor() as usize;
    let hi = h.ceil() as usize;
    let (a, b) = (v[lo], v[hi]);
    if a == b {
        return Some(a);
    }
    Some(a + (h - lo as f64) * (b - a))
}

/// Arithmetic mean; None for no values.
pub fn mean(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        None
    } else {
        Some(values.iter().sum::<f64>() / values.len() as f64)
    }
}

/// Share of requests whose TTFT is at most `slo_ms`. A failed request (no
/// TTFT) counts as a miss. None for no requests.
pub fn slo_attainment(ttfts: &[Option<f64>], slo_ms: f64) -> Option<f64> {
    if ttfts.is_empty() {
        return None;
    }
    let met = ttfts
        .iter()
        .filter(|t| matches!(t, Some(v) if *v <= slo_ms))
        .count();
    Some(met as f64 / ttfts.len() as f64)
}

/// Size, mean and p10/p50/p90/p99 of a sample (non-finite values left out).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Dist {
    pub n: usize,
    pub mean: Option<f64>,
    pub p10: Option<f64>,
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
}

impl Dist {
    pub fn of(values: &[f64]) -> Self {
        let v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        Self {
            n: v.len(),
            mean: mean(&v),
            p10: percentile(&v, 10.0),
            p50: percentile(&v, 50.0),
            p90: percentile(&v, 90.0),
            p99: percentile(&v, 99.0),
        }
    }
}

/// The lowest and the highest of per-run values, and how many runs had one.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spread {
    pub min: f64,
    pub max: f64,
    pub runs: usize,
}

/// The spread of per-run values; runs without a value (None, NaN) are left
/// out. None when no run has a value.
pub fn spread(values: impl IntoIterator<Item = Option<f64>>) -> Option<Spread> {
    values
        .into_iter()
        .flatten()
        .filter(|v| !v.is_nan())
        .fold(None, |acc: Option<Spread>, v| {
            Some(match acc {
                None => Spread {
                    min: v,
                    max: v,
                    runs: 1,
                },
                Some(s) => Spread {
                    min: s.min.min(v),
                    max: s.max.max(v),
                    runs: s.runs + 1,
                },
            })
        })
}

/// Visual tokens of the images sent and of those forwarded.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Retention {
    pub images: u64,
    pub tokens_before: u64,
    pub tokens_after: u64,
}

impl Retention {
    pub fn add(&mut self, images: u64, before: u64, after: u64) {
        self.images += images;
        self.tokens_before += before;
        self.tokens_after += after;
    }

    /// Mean visual tokens kept per image.
    pub fn kept_per_image(&self) -> Option<f64> {
        (self.images > 0).then(|| self.tokens_after as f64 / self.images as f64)
    }

    /// Mean visual tokens of the originals per image.
    pub fn original_per_image(&self) -> Option<f64> {
        (self.images > 0).then(|| self.tokens_before as f64 / self.images as f64)
    }

    /// Kept over original tokens (token retention).
    pub fn ratio(&self) -> Option<f64> {
        (self.tokens_before > 0).then(|| self.tokens_after as f64 / self.tokens_before as f64)
    }
}

/// Points of an empirical CDF over all `n` requests: (value, share ≤ value).
/// Failed requests are absent, so the curve ends at the success share.
pub fn cdf(values: &[f64], n: usize) -> Vec<(f64, f64)> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    let n = n.max(v.len()).max(1) as f64;
    v.iter()
        .enumerate()
        .map(|(i, &x)| (x, (i + 1) as f64 / n))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let v = [15.0, 20.0, 35.0, 40.0, 50.0];
        assert_eq!(percentile(&v, 0.0), Some(15.0));
        assert_eq!(percentile(&v, 100.0), Some(50.0));
        assert_eq!(percentile(&v, 50.0), Some(35.0));
        // numpy.percentile([15, 20, 35, 40, 50], 40) == 29.0
        assert!((percentile(&v, 40.0).unwrap() - 29.0).abs() < 1e-12);
        // Order does not matter.
        assert_eq!(
            percentile(&[50.0, 15.0, 40.0, 20.0, 35.0], 90.0),
            percentile(&v, 90.0)
        );
        // numpy.percentile(range(1, 101), 99) == 99.01
        let r: Vec<f64> = (1..=100).map(f64::from).collect();
        assert!((percentile(&r, 99.0).unwrap() - 99.01).abs() < 1e-9);
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[1.0], 101.0), None);
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[f64::NAN, 3.0], 50.0), Some(3.0));
    }

    #[test]
    fn slo_counts_failures_as_misses() {
        let t = [Some(100.0), Some(1000.0), Some(1000.5), None];
        assert_eq!(slo_attainment(&t, 1000.0), Some(0.5));
        assert_eq!(slo_attainment(&t, 2000.0), Some(0.75));
        assert_eq!(slo_attainment(&[], 1000.0), None);
        assert_eq!(mean(&[1.0, 2.0, 6.0]), Some(3.0));
        assert_eq!(mean(&[]), None);
    }

    #[test]
    fn retention_is_a_ratio_of_sums() {
        let mut r = Retention::default();
        assert_eq!(r.ratio(), None);
        r.add(1, 11_782, 4_000);
        r.add(1, 1_000, 1_000);
        r.add(0, 0, 0);
        assert_eq!(r.images, 2);
        assert_eq!(r.kept_per_image(), Some(2_500.0));
        assert_eq!(r.original_per_image(), Some(6_391.0));
        assert!((r.ratio().unwrap() - 5_000.0 / 12_782.0).abs() < 1e-12);
    }

    #[test]
    fn distributions_and_spreads() {
        let d = Dist::of(&[40.0, 10.0, 20.0, 30.0, f64::NAN, f64::INFINITY]);
        assert_eq!(d.n, 4);
        assert_eq!(d.mean, Some(25.0));
        // numpy.percentile([10, 20, 30, 40], [10, 50, 90, 99]) == [13, 25, 37, 39.7]
        assert!((d.p10.unwrap() - 13.0).abs() < 1e-9);
        assert_eq!(d.p50, Some(25.0));
        assert!((d.p90.unwrap() - 37.0).abs() < 1e-9);
        assert!((d.p99.unwrap() - 39.7).abs() < 1e-9);
        // Negative values (observed faster than predicted) are ordinary values.
        let d = Dist::of(&[-300.0, 100.0]);
        assert_eq!((d.p50, d.mean), (Some(-100.0), Some(-100.0)));
        assert_eq!(Dist::of(&[]), Dist::default());
        assert_eq!(Dist::of(&[]).p50, None);

        let s = spread([Some(0.8), None, Some(0.6), Some(0.95), Some(f64::NAN)]).unwrap();
        assert_eq!((s.min, s.max, s.runs), (0.6, 0.95, 3));
        let one = spread([Some(2.0)]).unwrap();
        assert_eq!((one.min, one.max, one.runs), (2.0, 2.0, 1));
        assert_eq!(spread([None, None]), None);
        assert_eq!(spread(Vec::<Option<f64>>::new()), None);
    }

    #[test]
    fn cdf_ends_at_the_success_share() {
        let c = cdf(&[3.0, 1.0, 2.0], 4);
        assert_eq!(c, vec![(1.0, 0.25), (2.0, 0.5), (3.0, 0.75)]);
        assert!(cdf(&[], 0).is_empty());
    }
}
