//! MaxSquare (Chen, Xue and Cai, "Domain Adaptation for Semantic Segmentation with Maximum
//! Squares Loss", ICCV 2019): maximise the squared target probabilities instead of minimising
//! their entropy, whose gradient is dominated by the pixels that are already confident.
//!
//! The formulas follow the authors' code (ZJULearning/MaxSquareLoss, `utils/loss.py`), which is
//! what their numbers come from:
//! - `MaxSquareloss`: `-mean(p^2) / 2` over every element of the softmax `[B, C, H, W]`, so
//!   besides the paper's `1/(2N)` the code also divides by `C`;
//! - `IW_MaxSquareloss` (the paper's image-wise class-balanced weighting, "+IW"): each pixel's
//!   `p_c^2` (all `c`) is weighted by `1 / max(N_k^a * N^(1-a), 1)`, where `k` is the pixel's
//!   arg-max class, `N_k` the number of the image's pixels predicted as `k`, `N` the image's
//!   pixels and `a` the ratio (0.2); the sum is divided by `B * C`, without the `1/2`. The
//!   weights are constants of the step (no gradient flows through the counts). The authors ran
//!   it with batch 1, where their `[B, H, W]` weights broadcast onto `[B, C, H, W]` as meant;
//!   here each image's weights apply to its own pixels at any batch size.

use burn::tensor::activation::softmax;
use burn::tensor::{Tensor, TensorData};
use dag_api::ParamSet;
use serde::Deserialize;

use super::{TargetObjective, Term};

/// Maximum squares on the target batch.
pub struct MaxSquare;

/// The params of [`MaxSquare`].
#[derive(Debug, Clone, ParamSet, Deserialize)]
pub struct MaxSquareParams {
    /// weight of the main head's maximum squares loss (maxsquare; the paper's lambda_T)
    #[param(default = 0.1, min = 0.0)]
    pub lambda_maxsq_main: f64,
    /// weight of the aux head's maximum squares loss (maxsquare; the paper trains one head)
    #[param(default = 0.0, min = 0.0)]
    pub lambda_maxsq_aux: f64,
    /// weight each pixel by 1 / max(N_k^alpha * N^(1-alpha), 1), N_k the pixels of its image
    /// predicted as its class k, N the image's pixels (maxsquare; the paper's image-wise
    /// weighting, "MaxSquare+IW")
    #[param(default = false)]
    pub maxsq_image_weighting: bool,
    /// the ratio alpha of the image-wise weighting, between 0 (none) and 1 (inverse frequency)
    #[param(default = 0.2, min = 0.0, max = 1.0)]
    pub maxsq_iw_ratio: f64,
}

impl TargetObjective for MaxSquare {
    type Params = MaxSquareParams;
    const NAME: &'static str = "maxsquare";
    const TERMS: &'static [&'static str] = &["maxsq_main", "maxsq_aux"];

    fn terms(p: &MaxSquareParams, main: &Tensor<4>, aux: Option<&Tensor<4>>) -> Vec<Term> {
        [
            ("maxsq_main", p.lambda_maxsq_main, Some(main)),
            ("maxsq_aux", p.lambda_maxsq_aux, aux),
        ]
        .into_iter()
        .filter_map(|(name, weight, logits)| Some((name, weight, logits?)))
        .filter(|(_, weight, _)| *weight > 0.0)
        .map(|(name, weight, logits)| Term {
            name,
            weight,
            value: if p.maxsq_image_weighting {
                image_weighted_max_squares_loss(logits.clone(), p.maxsq_iw_ratio)
            } else {
                max_squares_loss(logits.clone())
            },
        })
        .collect()
    }

    fn is_active(p: &MaxSquareParams) -> bool {
        p.lambda_maxsq_main > 0.0 || p.lambda_maxsq_aux > 0.0
    }

    fn check(p: &MaxSquareParams) -> Result<(), String> {
        let default_ratio = MaxSquareParams::default().maxsq_iw_ratio;
        if !p.maxsq_image_weighting && p.maxsq_iw_ratio != default_ratio {
            return Err(format!(
                "`maxsq_iw_ratio: {}` has no effect without `maxsq_image_weighting: true`; \
                 remove it or turn the weighting on",
                p.maxsq_iw_ratio
            ));
        }
        Ok(())
    }
}

/// `-mean(p^2) / 2` of `p = softmax(logits)` over every element of `[B, C, H, W]`.
pub fn max_squares_loss(logits: Tensor<4>) -> Tensor<1> {
    softmax(logits, 1)
        .powi_scalar(2)
        .mean()
        .div_scalar(2.0)
        .neg()
}

/// `-sum(w * p^2) / (B * C)`, `w` the image-wise class-balance weight of each pixel's arg-max
/// class with ratio `ratio` (see the module docs).
pub fn image_weighted_max_squares_loss(logits: Tensor<4>, ratio: f64) -> Tensor<1> {
    let [b, c, h, w] = logits.dims();
    let p = softmax(logits, 1);
    let predicted = p.clone().argmax(1).into_data().convert::<i64>();
    let predicted = predicted.as_slice::<i64>().expect("converted to i64 above");
    let weights = class_balance_weights(predicted, b, c, ratio);
    let weights = Tensor::<4>::from_data(TensorData::new(weights, [b, 1, h, w]), &p.device());
    (p.powi_scalar(2) * weights)
        .sum()
        .div_scalar((b * c).max(1) as f64)
        .neg()
}

/// Per pixel of `images` images (row-major `predicted` classes), `1 / max(N_k^a * N^(1-a), 1)`.
fn class_balance_weights(predicted: &[i64], images: usize, classes: usize, ratio: f64) -> Vec<f32> {
    let pixels = predicted.len() / images.max(1);
    let mut weights = Vec::with_capacity(predicted.len());
    for image in predicted.chunks(pixels.max(1)) {
        let mut counts = vec![0usize; classes];
        for &k in image {
            counts[k as usize] += 1;
        }
        let total = (pixels as f64).powf(1.0 - ratio);
        let of_class: Vec<f32> = counts
            .iter()
            .map(|&n| (1.0 / ((n as f64).powf(ratio) * total).max(1.0)) as f32)
            .collect();
        weights.extend(image.iter().map(|&k| of_class[k as usize]));
    }
    weights
}
