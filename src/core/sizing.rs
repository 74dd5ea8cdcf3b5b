//! Qwen2-VL / Qwen2.5-VL image sizing (`smart_resize`) and visual-token budgets.
//!
//! The backend (vLLM with a Qwen2.5-VL processor) resizes every image with the
//! rule implemented by [`SizingRule::smart_resize`]. The filter predicts the
//! backend's token count with the same rule, and when it shrinks an image it
//! picks a size that is a *fixed point* of the rule, so that the backend does
//! not resize it again and the predicted count is the count the backend uses.

use std::fmt;

/// Largest aspect ratio the Qwen processor accepts.
pub const MAX_ASPECT_RATIO: f64 = 200.0;

/// Parameters of the backend's sizing rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizingRule {
    /// Vision transformer patch side in pixels (14 for Qwen2/2.5-VL).
    pub patch_size: u32,
    /// Spatial merge size (2: a visual token covers 2×2 patches).
    pub merge_size: u32,
    /// Lower bound on resized pixel count.
    pub min_pixels: u64,
    /// Upper bound on resized pixel count.
    pub max_pixels: u64,
}

impl Default for SizingRule {
    fn default() -> Self {
        Self::QWEN2_5_VL
    }
}

/// Why the backend's rule rejects an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizingError {
    /// A side is shorter than one visual token (`factor` pixels).
    TooSmall { width: u32, height: u32, factor: u32 },
    /// The aspect ratio exceeds [`MAX_ASPECT_RATIO`].
    AspectRatio { width: u32, height: u32 },
}

impl fmt::Display for SizingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooSmall {
                width,
                height,
                factor,
            } => {
                write!(f, "image {width}x{height} has a side shorter than {factor} px")
            }
            Self::AspectRatio { width, height } => write!(
                f,
                "image {width}x{height} has an aspect ratio above {MAX_ASPECT_RATIO}"
            ),
        }
    }
}

/// A resized image size, in pixels, as (width, height).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub width: u32,
    pub height: u32,
}

impl Dims {
    pub const fn new(width: u32, height: u32) -> Self {
        Self { width, height }
    }

    pub fn pixels(self) -> u64 {
        u64::from(self.width) * u64::from(self.height)
    }
}

impl SizingRule {
    /// The Qwen2.5-VL checkpoints' preprocessor configuration (also qwen-vl-utils).
    pub const QWEN2_5_VL: Self = Self {
        patch_size: 14,
        merge_size: 2,
        min_pixels: 3_136,
        max_pixels: 12_845_056,
    };

    /// Pixels per visual-token side (`patch_size * merge_size`, 28 for Qwen).
    pub fn factor(&self) -> u32 {
        self.patch_size * self.merge_size
    }

    /// Pixels covered by one visual token (784 for Qwen).
    pub fn pixels_per_token(&self) -> u64 {
        u64::from(self.factor()) * u64::from(self.factor())
    }

    /// Largest number of visual tokens the backend gives one image.
    pub fn max_tokens(&self) -> u64 {
        self.max_pixels / self.pixels_per_token()
    }

    /// Smallest number of visual tokens the backend gives one image.
    pub fn min_tokens(&self) -> u64 {
        self.min_pixels.div_ceil(self.pixels_per_token())
    }

    /// Visual tokens of an image of this resized size.
    pub fn tokens_of(&self, d: Dims) -> u64 {
        let f = u64::from(self.factor());
        (u64::from(d.width) / f) * (u64::from(d.height) / f)
    }

    /// The backend's `smart_resize`: the size an image of `width`×`height`
    /// is resized to. Mirrors transformers' Qwen2-VL image processor,
    /// including Python's round-half-to-even.
    pub fn smart_resize(&self, width: u32, height: u32) -> Result<Dims, SizingError> {
        smart_resize(width, height, self.factor(), self.min_pixels, self.max_pixels)
    }

    /// Visual tokens the backend computes for an image of `width`×`height`.
    pub fn tokens(&self, width: u32, height: u32) -> Result<u64, SizingError> {
        self.smart_resize(width, height).map(|d| self.tokens_of(d))
    }

    /// Whether `d` is a fixed point of the rule (the backend keeps it as is).
    pub fn is_fixed_point(&self, d: Dims) -> bool {
        self.smart_resize(d.width, d.height) == Ok(d)
    }

    /// The size to send so that the backend gives at most `budget` tokens.
    ///
    /// Returns `Ok(None)` when the image already fits the budget (forward it
    /// unchanged). Otherwise the returned size is a fixed point of the rule,
    /// never larger than the original on either side, and has at most
    /// `budget` tokens (at least one token per side).
    pub fn fit_to_budget(&self, width: u32, height: u32, budget: u64) -> Result<Option<Dims>, SizingError> {
        let current = self.smart_resize(width, height)?;
        if self.tokens_of(current) <= budget {
            return Ok(None);
        }
        let f = self.factor();
        let floor_side = |side: u32| (side / f).max(1) * f;
        // Budget in pixels, clamped to the backend's bounds so the result
        // is a fixed point of the backend's own rule.
        let budget_pixels = budget
            .max(1)
            .saturating_mul(self.pixels_per_token())
            .clamp(self.min_pixels, self.max_pixels);
        let mut d = smart_resize(width, height, f, self.min_pixels, budget_pixels)?;
        // Never upscale a side (rounding may have grown one).
        d.width = d.width.min(floor_side(width));
        d.height = d.height.min(floor_side(height));
        // Shrink the longer side until the budget holds (rounding can leave
        // one token too many in rare ties).
        while self.tokens_of(d) > budget.max(1) && (d.width > f || d.height > f) {
            if d.width >= d.height && d.width > f {
                d.width -= f;
            } else {
                d.height -= f;
            }
        }
        // Below the backend's min_pixels the backend would upscale: go to the
        // smallest fixed point instead.
        if d.pixels() < self.min_pixels {
            d = self.grow_to_min_pixels(d, width, height);
        }
        Ok(Some(d))
    }
}

impl SizingRule {
    /// The fewest-pixel size of at least `min_pixels` within the aspect
    /// limit (ties: the aspect nearest the original's): within the
    /// original's sides when one exists, else past them (the original is
    /// then itself below the backend's minimum).
    fn grow_to_min_pixels(&self, mut d: Dims, width: u32, height: u32) -> Dims {
        let f = self.factor();
        let floor_side = |side: u32| (side / f).max(1) * f;
        if let Some(best) = self
            .fewest_pixels(width, height, floor_side(width), floor_side(height))
            .or_else(|| self.fewest_pixels(width, height, u32::MAX, u32::MAX))
        {
            return best;
        }
        while d.pixels() < self.min_pixels {
            if d.width <= d.height {
                d.width += f;
            } else {
                d.height += f;
            }
        }
        d
    }

    fn fewest_pixels(&self, width: u32, height: u32, max_w: u32, max_h: u32) -> Option<Dims> {
        let f = self.factor();
        let aspect = (f64::from(width) / f64::from(height)).ln();
        let off = |d: Dims| ((f64::from(d.width) / f64::from(d.height)).ln() - aspect).abs();
        let ratio_ok =
            |d: Dims| f64::from(d.width.max(d.height)) / f64::from(d.width.min(d.height)) <= MAX_ASPECT_RATIO;
        let mut best: Option<Dims> = None;
        let mut w = f;
        // Bounded: the backend's minimum is a few tokens (4 for Qwen); a
        // configuration with a huge one takes the square-ish fallback.
        for _ in 0..4096 {
            if w > max_w {
                break;
            }
            // The shortest height at this width, a multiple of the factor.
            let need = self.min_pixels.div_ceil(u64::from(w)).div_ceil(u64::from(f)) * u64::from(f);
            let h = u32::try_from(need).unwrap_or(u32::MAX).max(f);
            let c = Dims::new(w, h);
            let better = best.is_none_or(|b| (c.pixels(), off(c)) < (b.pixels(), off(b)));
            if h <= max_h && ratio_ok(c) && better {
                best = Some(c);
            }
            if h == f {
                break; // any wider only adds pixels
            }
            w = w.saturating_add(f);
        }
        best
    }
}

/// `smart_resize` with explicit bounds (see [`SizingRule::smart_resize`]).
pub fn smart_resize(
    width: u32,
    height: u32,
    factor: u32,
    min_pixels: u64,
    max_pixels: u64,
) -> Result<Dims, SizingError> {
    if width < factor || height < factor {
        return Err(SizingError::TooSmall {
            width,
            height,
            factor,
        });
    }
    let (w, h, f) = (f64::from(width), f64::from(height), f64::from(factor));
    if w.max(h) / w.min(h) > MAX_ASPECT_RATIO {
        return Err(SizingError::AspectRatio { width, height });
    }
    let round_to = |x: f64| (x / f).round_ties_even() * f;
    let mut h_bar = round_to(h);
    let mut w_bar = round_to(w);
    if h_bar * w_bar > max_pixels as f64 {
        let beta = (h * w / max_pixels as f64).sqrt();
        h_bar = f.max((h / beta / f).floor() * f);
        w_bar = f.max((w / beta / f).floor() * f);
    } else if h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    // Values are whole multiples of `factor` and bounded by the inputs'
    // magnitude, so the conversions are exact.
    Ok(Dims::new(w_bar as u32, h_bar as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    const Q: SizingRule = SizingRule::QWEN2_5_VL;

    /// (width, height) -> (resized width, resized height), computed with the
    /// reference Python implementation (transformers' `smart_resize`,
    /// min_pixels=3136, max_pixels=12845056).
    type Case = ((u32, u32), (u32, u32));
    const REFERENCE: &[Case] = &[
        ((3840, 2400), (3836, 2408)),
        ((1920, 1080), (1932, 1092)),
        ((70, 70), (56, 56)),
        ((98, 98), (112, 112)),
        ((42, 42), (56, 56)),
        ((126, 126), (112, 112)),
        ((28, 28), (56, 56)),
        ((28, 5600), (28, 5600)),
        ((5600, 28), (5600, 28)),
        ((4000, 4000), (3584, 3584)),
        ((640, 480), (644, 476)),
        ((1000, 1000), (1008, 1008)),
        ((3840, 3840), (3584, 3584)),
        ((100, 30), (112, 28)),
    ];

    #[test]
    fn matches_reference_table() {
        for &((w, h), (ew, eh)) in REFERENCE {
            assert_eq!(Q.smart_resize(w, h), Ok(Dims::new(ew, eh)), "{w}x{h}");
        }
    }

    #[test]
    fn matches_generated_reference() {
        // tests/data/smart_resize_reference.json is written by
        // tools/gen_sizing_reference.py from the Python rule.
        let text = include_str!("../../tests/data/smart_resize_reference.json");
        let v: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
        let cases = v["cases"].as_array().cloned().unwrap_or_default();
        assert!(cases.len() > 5000);
        for c in cases {
            let num = |k: &str| c[k].as_u64().unwrap_or(0);
            let rule = SizingRule {
                min_pixels: num("min_pixels"),
                max_pixels: num("max_pixels"),
                ..Q
            };
            let (w, h) = (num("w") as u32, num("h") as u32);
            let got = rule
                .smart_resize(w, h)
                .ok()
                .map(|d| (u64::from(d.width), u64::from(d.height)));
            let want = c["out"]
                .as_array()
                .map(|a| (a[0].as_u64().unwrap_or(0), a[1].as_u64().unwrap_or(0)));
            assert_eq!(
                got, want,
                "{w}x{h} bounds {}..{}",
                rule.min_pixels, rule.max_pixels
            );
        }
    }

    #[test]
    fn ties_round_half_to_even() {
        // 70/28 = 2.5 -> 2 ; 98/28 = 3.5 -> 4 ; 154/28 = 5.5 -> 6 ; 126/28 = 4.5 -> 4
        assert_eq!(
            Q.smart_resize(70, 154).map(|d| (d.width, d.height)),
            Ok((56, 168))
        );
        assert_eq!(
            Q.smart_resize(126, 98).map(|d| (d.width, d.height)),
            Ok((112, 112))
        );
    }

    #[test]
    fn rejects_what_the_backend_rejects() {
        assert!(matches!(
            Q.smart_resize(27, 500),
            Err(SizingError::TooSmall { .. })
        ));
        assert!(matches!(
            Q.smart_resize(28, 5601),
            Err(SizingError::AspectRatio { .. })
        ));
    }

    #[test]
    fn clamps_to_max_and_min() {
        let d = Q.smart_resize(10_000, 10_000).unwrap_or(Dims::new(0, 0));
        assert!(d.pixels() <= Q.max_pixels);
        assert_eq!(Q.tokens_of(d), 127 * 127);
        let small = SizingRule {
            min_pixels: 100_000,
            ..Q
        };
        let d = small.smart_resize(100, 100).unwrap_or(Dims::new(0, 0));
        assert!(d.pixels() >= 100_000);
        assert_eq!((d.width % 28, d.height % 28), (0, 0));
    }

    #[test]
    fn fit_to_budget_gives_fixed_points_within_budget() {
        let sizes = [
            (3840, 2400),
            (2400, 3840),
            (1920, 1080),
            (5000, 29),
            (29, 5000),
            (99, 98),
            (4096, 4096),
            (12345, 678),
            (640, 480),
            (1000, 1001),
            (3000, 50),
        ];
        for &(w, h) in &sizes {
            for budget in [4, 16, 64, 255, 256, 1024, 1280, 4096, 9999] {
                let before = Q.tokens(w, h).unwrap_or(0);
                match Q.fit_to_budget(w, h, budget) {
                    Ok(None) => assert!(before <= budget, "{w}x{h} b={budget}"),
                    Ok(Some(d)) => {
                        assert!(before > budget);
                        assert!(Q.is_fixed_point(d), "{w}x{h} b={budget} -> {d:?}");
                        assert!(
                            Q.tokens_of(d) <= budget.max(Q.min_tokens()),
                            "{w}x{h} b={budget} -> {d:?}"
                        );
                        assert!(
                            d.width <= w.max(28) && d.height <= h.max(28),
                            "upscaled {w}x{h} -> {d:?}"
                        );
                    }
                    Err(e) => panic!("{w}x{h}: {e}"),
                }
            }
        }
    }

    #[test]
    fn fit_to_budget_small_images_and_budgets() {
        // Found by the pipeline fuzzer: 150x51 at 4 tokens went to 84x56
        // (6 tokens, taller than the original) instead of 112x28.
        assert_eq!(Q.fit_to_budget(150, 51, 4), Ok(Some(Dims::new(112, 28))));
        for w in (28..=400).step_by(7) {
            for h in (28..=400).step_by(11) {
                let before = Q.tokens(w, h).unwrap_or(0);
                for budget in 4..=12 {
                    let Ok(Some(d)) = Q.fit_to_budget(w, h, budget) else {
                        continue;
                    };
                    assert!(Q.is_fixed_point(d), "{w}x{h} b={budget} -> {d:?}");
                    assert!(
                        Q.tokens_of(d) <= budget && Q.tokens_of(d) < before,
                        "{w}x{h} b={budget} -> {d:?}"
                    );
                    if (w / 28 * 28) * (h / 28 * 28) >= 3136 {
                        assert!(
                            d.width <= w && d.height <= h,
                            "upscaled {w}x{h} b={budget} -> {d:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn fit_to_budget_is_tight_for_photos() {
        // A 3840x2400 photo at 4096 tokens keeps most of the budget.
        let d = Q
            .fit_to_budget(3840, 2400, 4096)
            .ok()
            .flatten()
            .unwrap_or(Dims::new(0, 0));
        let t = Q.tokens_of(d);
        assert!((3900..=4096).contains(&t), "{d:?} -> {t}");
        let ratio = f64::from(d.width) / f64::from(d.height);
        assert!((ratio - 1.6).abs() < 0.05, "aspect kept: {ratio}");
    }
}
