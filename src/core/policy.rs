//! Budget policies: how many visual tokens each image of a request may keep.
//!
//! A policy sees the request's per-image token counts (by the backend's rule)
//! and returns a budget per image. New policies implement [`BudgetPolicy`];
//! nothing else in the filter changes.

use super::config::Config;
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
}

/// A policy's decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budgets {
    /// Token cap per image, parallel to `image_tokens`; `None`: no cap.
    pub per_image: Vec<Option<u64>>,
    /// The per-image budget reported in `x-vlm-budget-tokens`.
    pub reported: u64,
}

/// A budget policy.
pub trait BudgetPolicy {
    fn kind(&self) -> PolicyKind;
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
        Budgets {
            per_image: vec![None; input.image_tokens.len()],
            reported: self.backend_max_tokens,
        }
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
        Budgets {
            per_image: vec![Some(self.tokens_per_image); input.image_tokens.len()],
            reported: self.tokens_per_image,
        }
    }
}

/// Builds the configured policy.
pub fn from_config(cfg: &Config) -> Box<dyn BudgetPolicy> {
    match cfg.policy {
        PolicyKind::Vanilla => Box::new(Vanilla {
            backend_max_tokens: cfg.sizing_rule().max_tokens(),
        }),
        // `dynamic` is refused by validation until it is implemented; static
        // is the safe stand-in should an unvalidated config reach here.
        PolicyKind::Static | PolicyKind::Dynamic => Box::new(Static {
            tokens_per_image: cfg.static_budget_tokens,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_and_vanilla() {
        let tokens = [Some(10_000), None, Some(100)];
        let input = PolicyInput {
            image_tokens: &tokens,
            text_bytes: 0,
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
}
