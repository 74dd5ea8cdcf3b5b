//! Budget policies: how many visual tokens each image of a request may keep.
//!
//! A policy sees the request's per-image token counts (by the backend's rule)
//! and returns a budget per image. New policies implement [`BudgetPolicy`];
//! nothing else in the filter changes.

use super::config::Config;
use super::dynamic::{water_fill, Demand, DynamicParams, Terms};
use super::traffic::TrafficSnapshot;
use serde::Deserialize;

/// The configured policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PolicyKind {
    /// No resizing.
    Vanilla,
    /// A fixed per-image budget.
    #[default]
    Static,
    /// Traffic-aware budgets.
    Dynamic,
}

impl PolicyKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Vanilla => "vanilla",
            Self::Static => "static",
            Self::Dynamic => "dynamic",
        }
    }
}

/// What a policy knows of one request.
#[derive(Debug, Clone, Copy)]
pub struct PolicyInput<'a> {
    /// Visual tokens of each image as sent (backend rule); `None` for images
    /// the filter cannot size (remote URLs).
    pub image_tokens: &'a [Option<u64>],
    /// Bytes of text in the request.
    pub text_bytes: usize,
    /// Megapixels of the sizable images as sent.
    pub mpixels: f64,
    /// Time since the request arrived, ms.
    pub elapsed_ms: f64,
    /// Live traffic (idle for policies that ignore it).
    pub traffic: &'a TrafficSnapshot,
    /// This request's TTFT SLO in ms (already bounded), if it set one.
    pub slo_ms: Option<f64>,
}

/// A policy's decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Budgets {
    /// Token cap per image, parallel to `image_tokens`; `None`: no cap.
    pub per_image: Vec<Option<u64>>,
    /// The per-image budget reported in `x-vlm-budget-tokens`.
    pub reported: u64,
    /// Why (dynamic policy only).
    pub reason: Option<&'static str>,
    /// The predicted TTFT (dynamic policy only).
    pub prediction: Option<Prediction>,
}

/// The dynamic policy's TTFT prediction for the forwarded request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prediction {
    /// The model's terms (their sum is the prediction before correction).
    pub terms: Terms,
    /// The learned margin it planned with, ms.
    pub margin_ms: f64,
}

impl Budgets {
    fn fixed(per_image: Vec<Option<u64>>, reported: u64) -> Self {
        Self {
            per_image,
            reported,
            reason: None,
            prediction: None,
        }
    }
}

/// A budget policy.
pub trait BudgetPolicy {
    fn kind(&self) -> PolicyKind;
    /// Whether the budgets depend on the traffic (else the caller need not
    /// read it).
    fn uses_traffic(&self) -> bool {
        false
    }
    fn budgets(&self, input: &PolicyInput<'_>) -> Budgets;
}

/// No resizing: the budget reported is the backend's own per-image ceiling.
#[derive(Debug, Clone)]
pub struct Vanilla {
    pub backend_max_tokens: u64,
}

impl BudgetPolicy for Vanilla {
    fn kind(&self) -> PolicyKind {
        PolicyKind::Vanilla
    }
    fn budgets(&self, input: &PolicyInput<'_>) -> Budgets {
        Budgets::fixed(vec![None; input.image_tokens.len()], self.backend_max_tokens)
    }
}

/// The same budget for every image.
#[derive(Debug, Clone)]
pub struct Static {
    pub tokens_per_image: u64,
}

impl BudgetPolicy for Static {
    fn kind(&self) -> PolicyKind {
        PolicyKind::Static
    }
    fn budgets(&self, input: &PolicyInput<'_>) -> Budgets {
        Budgets::fixed(
            vec![Some(self.tokens_per_image); input.image_tokens.len()],
            self.tokens_per_image,
        )
    }
}

/// Traffic-aware budgets from the TTFT SLO, the latency profile and live
/// traffic (see [`DynamicParams::solve`]), water-filled across images.
#[derive(Debug, Clone)]
pub struct Dynamic {
    pub params: DynamicParams,
    /// Default TTFT SLO, ms.
    pub slo_ms: f64,
}

impl BudgetPolicy for Dynamic {
    fn kind(&self) -> PolicyKind {
        PolicyKind::Dynamic
    }
    fn uses_traffic(&self) -> bool {
        true
    }
    fn budgets(&self, input: &PolicyInput<'_>) -> Budgets {
        let sizable: Vec<u64> = input.image_tokens.iter().flatten().copied().collect();
        let demand = Demand {
            original_tokens: sizable.iter().sum(),
            images: sizable.len() as u64,
            text_bytes: input.text_bytes,
            mpixels: input.mpixels,
            slo_ms: input.slo_ms.unwrap_or(self.slo_ms),
            elapsed_ms: input.elapsed_ms,
        };
        let decision = self.params.solve(&demand, input.traffic);
        let mut shares = water_fill(&sizable, decision.total).into_iter();
        let per_image: Vec<Option<u64>> = input
            .image_tokens
            .iter()
            .map(|t| t.and_then(|_| shares.next()))
            .collect();
        let reported = per_image.iter().flatten().copied().max().unwrap_or(0);
        Budgets {
            per_image,
            reported,
            reason: Some(decision.reason.name()),
            prediction: Some(Prediction {
                terms: decision.terms,
                margin_ms: decision.margin_ms,
            }),
        }
    }
}

/// Builds the configured policy.
pub fn from_config(cfg: &Config) -> Box<dyn BudgetPolicy> {
    match cfg.policy {
        PolicyKind::Vanilla => Box::new(Vanilla {
            backend_max_tokens: cfg.sizing_rule().max_tokens(),
        }),
        PolicyKind::Static => Box::new(Static {
            tokens_per_image: cfg.static_budget_tokens,
        }),
        PolicyKind::Dynamic => Box::new(Dynamic {
            params: cfg.dynamic_params(),
            slo_ms: cfg.ttft_slo_ms as f64,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_and_vanilla() {
        let tokens = [Some(10_000), None, Some(100)];
        let idle = TrafficSnapshot::idle();
        let input = PolicyInput {
            image_tokens: &tokens,
            traffic: &idle,
            slo_ms: None,
            text_bytes: 0,
            mpixels: 9.0,
            elapsed_ms: 0.0,
        };
        let s = Static {
            tokens_per_image: 4096,
        }
        .budgets(&input);
        assert_eq!(s.per_image, vec![Some(4096); 3]);
        assert_eq!(s.reported, 4096);
        let v = Vanilla {
            backend_max_tokens: 16_384,
        }
        .budgets(&input);
        assert_eq!(v.per_image, vec![None; 3]);
        assert_eq!(v.reported, 16_384);
    }

    #[test]
    fn dynamic_water_fills_sizable_images_only() {
        let cfg = Config {
            policy: PolicyKind::Dynamic,
            encode_cluster: Some("encode".into()),
            ..Config::default()
        };
        let policy = from_config(&cfg);
        let tokens = [Some(11_782), None, Some(300)];
        let busy = TrafficSnapshot {
            encode_outstanding_ms: 400.0,
            ..TrafficSnapshot::idle()
        };
        let b = policy.budgets(&PolicyInput {
            image_tokens: &tokens,
            text_bytes: 100,
            mpixels: 9.0,
            elapsed_ms: 0.0,
            traffic: &busy,
            slo_ms: None,
        });
        assert_eq!(b.per_image[1], None);
        assert_eq!(b.per_image[2], Some(300));
        let big = b.per_image[0].unwrap_or(0);
        assert!(big > 256 && big < 11_782, "{big}");
        assert_eq!(b.reason, Some("slo"));
        assert_eq!(b.reported, big);
        // A tighter per-request SLO gives less.
        let tight = policy.budgets(&PolicyInput {
            image_tokens: &tokens,
            text_bytes: 100,
            mpixels: 9.0,
            elapsed_ms: 0.0,
            traffic: &busy,
            slo_ms: Some(700.0),
        });
        assert!(tight.per_image[0].unwrap_or(0) < big);
        // Idle: everything kept.
        let idle = TrafficSnapshot::idle();
        let b = policy.budgets(&PolicyInput {
            image_tokens: &tokens,
            text_bytes: 100,
            mpixels: 9.0,
            elapsed_ms: 0.0,
            traffic: &idle,
            slo_ms: None,
        });
        assert_eq!((b.per_image[0], b.reason), (Some(11_782), Some("unconstrained")));
    }
}
