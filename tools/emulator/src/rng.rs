//! Deterministic pseudo-random numbers: every draw is a pure function of
//! (seed, stream, index), so a run is reproducible under a seed without any
//! shared generator state.

/// SplitMix64 finaliser: a bijective 64-bit mixer.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A 64-bit draw for (seed, stream, index).
pub fn draw(seed: u64, stream: u64, index: u64) -> u64 {
    mix(mix(seed ^ mix(stream)) ^ index.wrapping_mul(0xD6E8_FEB8_6659_FD93))
}

/// A uniform draw in the open interval (0, 1).
pub fn unit(bits: u64) -> f64 {
    // 53 random bits, offset by half a step so neither end is reached.
    ((bits >> 11) as f64 + 0.5) / (1u64 << 53) as f64
}

/// A standard normal draw (Box-Muller) for (seed, stream, index).
pub fn normal(seed: u64, stream: u64, index: u64) -> f64 {
    let u1 = unit(draw(seed, stream, index.wrapping_mul(2)));
    let u2 = unit(draw(seed, stream, index.wrapping_mul(2).wrapping_add(1)));
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// A log-normal factor with median 1: `exp(sigma * z)`.
pub fn lognormal_factor(seed: u64, stream: u64, index: u64, sigma: f64) -> f64 {
    if sigma <= 0.0 {
        return 1.0;
    }
    (sigma * normal(seed, stream, index)).exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_seed_dependent() {
        assert_eq!(draw(1, 2, 3), draw(1, 2, 3));
        assert_ne!(draw(1, 2, 3), draw(2, 2, 3));
        assert_ne!(draw(1, 2, 3), draw(1, 3, 3));
        assert_eq!(lognormal_factor(7, 0, 0, 0.0), 1.0);
    }

    #[test]
    fn lognormal_has_median_one_and_the_right_spread() {
        let sigma = 0.05;
        let n = 20_000u64;
        let mut logs: Vec<f64> = (0..n).map(|i| lognormal_factor(42, 1, i, sigma).ln()).collect();
        logs.sort_by(f64::total_cmp);
        let median = logs[logs.len() / 2];
        let mean = logs.iter().sum::<f64>() / n as f64;
        let var = logs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(median.abs() < 0.002, "median log {median}");
        assert!((var.sqrt() - sigma).abs() < 0.002, "sd {}", var.sqrt());
        let u: Vec<f64> = (0..1000).map(|i| unit(draw(0, 0, i))).collect();
        assert!(u.iter().all(|&x| x > 0.0 && x < 1.0));
    }
}
