//! MinEnt (Vu et al., ADVENT, CVPR 2019): the mean per-pixel entropy of the target predictions.

use burn::tensor::Tensor;
use dag_api::ParamSet;
use serde::Deserialize;

use super::{TargetObjective, Term};
use crate::losses::entropy_loss;

/// Entropy minimisation on the target batch.
pub struct MinEnt;

/// The params of [`MinEnt`].
#[derive(Debug, Clone, ParamSet, Deserialize)]
pub struct MinEntParams {
    /// weight of the main head's entropy loss (minent)
    #[param(default = 0.001, min = 0.0)]
    pub lambda_ent_main: f64,
    /// weight of the aux head's entropy loss (minent)
    #[param(default = 0.0002, min = 0.0)]
    pub lambda_ent_aux: f64,
}

impl TargetObjective for MinEnt {
    type Params = MinEntParams;
    const NAME: &'static str = "minent";
    const TERMS: &'static [&'static str] = &["ent_main", "ent_aux"];

    fn terms(p: &MinEntParams, main: &Tensor<4>, aux: Option<&Tensor<4>>) -> Vec<Term> {
        [
            ("ent_main", p.lambda_ent_main, Some(main)),
            ("ent_aux", p.lambda_ent_aux, aux),
        ]
        .into_iter()
        .filter_map(|(name, weight, logits)| Some((name, weight, logits?)))
        .filter(|(_, weight, _)| *weight > 0.0)
        .map(|(name, weight, logits)| Term {
            name,
            weight,
            value: entropy_loss(logits.clone()),
        })
        .collect()
    }

    fn is_active(p: &MinEntParams) -> bool {
        p.lambda_ent_main > 0.0 || p.lambda_ent_aux > 0.0
    }
}
