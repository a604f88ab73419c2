//! The params of ADVENT's adversarial alignment: two discriminators on the weighted
//! self-information maps of the main and aux heads, trained with Adam. The alignment itself is
//! part of the loop (`crate::trainer`), which keeps the discriminators and their optimisers.

use dag_api::ParamSet;
use serde::{Deserialize, Serialize};

/// The adversarial terms' weights and the discriminators' architecture and optimiser.
#[derive(Debug, Clone, PartialEq, ParamSet, Serialize, Deserialize)]
pub struct AdversarialParams {
    /// weight of the main adversarial term (advent)
    #[param(default = 0.001, min = 0.0)]
    pub lambda_adv_main: f64,
    /// weight of the aux adversarial term (advent; 0 drops the aux discriminator)
    #[param(default = 0.0002, min = 0.0)]
    pub lambda_adv_aux: f64,
    /// Adam learning rate of the discriminators (same poly schedule)
    #[param(default = 1e-4, min = 0.0)]
    pub lr_d: f64,
    /// Adam beta1 of the discriminators (ADVENT: 0.9), below 1
    #[param(default = 0.9, min = 0.0, max = 1.0)]
    pub adam_beta1: f64,
    /// Adam beta2 of the discriminators (ADVENT: 0.99), below 1
    #[param(default = 0.99, min = 0.0, max = 1.0)]
    pub adam_beta2: f64,
    /// Adam epsilon of the discriminators (PyTorch's default, which ADVENT keeps)
    #[param(default = 1e-8, min = 0.0, min_exclusive)]
    pub adam_epsilon: f64,
    /// channels of the discriminators' first conv (64-128-256-512 in the paper)
    #[param(default = 64, min = 1)]
    pub disc_ndf: usize,
}
