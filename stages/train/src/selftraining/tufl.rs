//! TUFL's threshold-adaptive unsupervised focal loss (Yan et al., T-ITS 2023; `ywher/TUFL`,
//! `utils/loss.py` `AdaptUnsupFocalLoss` and `UnsupFocalLoss`, `datasets/transform_image.py`).
//!
//! Two views of each target image go through the student: the weak one (the target batch as
//! loaded) and a strong one (the colour transform of the self-training family, then a random
//! rotation, shear, scale and flip). The weak view's logits are warped by the same affine map so
//! that both predictions refer to the same pixels, and the weak prediction teaches the strong one:
//!
//! `l = sum_c w_c [pbar_c (log pbar_c - f log q_c) - p_c log p_c]`
//!
//! with `p` the weak softmax, `pbar` it without gradient, `q` the strong softmax and the focal
//! weight `f = |1 - q_y|^gamma` (`y = argmax pbar`; `|pbar_y - q_y|^gamma` with the fixed
//! threshold), with gradients through `q_y`. A pixel counts when `max pbar` exceeds the threshold of its
//! class, which moves every iteration toward a confidence quantile of the pixels predicted as
//! that class ([`update_thresholds`]); the term is the mean of `max(l, 1e-8)` over the counted
//! pixels, and is left out when none counts (the reference's NaN, which it drops).
//!
//! The pieces that do not touch the network ([`draw_affine`], [`WarpPlan`],
//! [`update_thresholds`], [`kept_pixels`], [`kept_above`]) are host functions checked against NumPy
//! (tests/selftraining_reference.py); [`focal_loss`] is checked against the same formula there.

use burn::tensor::activation::softmax;
use burn::tensor::{Int, Tensor, TensorData};
use dag_api::ParamSet;
use rand_core::RngCore;
use serde::{Deserialize, Serialize};

use super::mixing::{uniform, PseudoLabels};

/// The params of TUFL's focal term and of its geometric view. Defaults are the reference's
/// (`unsup/parse_args.py`, `datasets/crosscity.py`, `train_crosscity.sh`).
#[derive(Debug, Clone, PartialEq, ParamSet, Serialize, Deserialize)]
pub struct TuflParams {
    /// TUFL's pixel selection: `adaptive` (per-class thresholds that follow a confidence
    /// quantile, focal weight |1 - q_y|^gamma: the paper's loss, `AdaptUnsupFocalLoss`) or
    /// `fixed` (one threshold `tufl_theta0`, focal weight |pbar_y - q_y|^gamma: `UnsupFocalLoss`,
    /// what the reference's scripts run)
    #[param(default = "adaptive", one_of = ["adaptive", "fixed"])]
    pub tufl_threshold: String,
    /// TUFL's starting (or fixed) confidence threshold
    #[param(default = 0.8, min = 0.0, max = 1.0)]
    pub tufl_theta0: f64,
    /// exponent gamma of TUFL's focal weight (at least 1: below, |x|^gamma has no derivative
    /// where the two views agree)
    #[param(default = 2.0, min = 1.0)]
    pub tufl_gamma: f64,
    /// EMA factor beta of TUFL's adaptive thresholds: theta <- beta theta + (1 - beta) quantile
    #[param(default = 0.9, min = 0.0, max = 1.0)]
    pub tufl_beta: f64,
    /// b of TUFL's quantile index floor(n b theta^d) into the descending confidences of a class
    #[param(default = 0.8, min = 0.0, max = 1.0)]
    pub tufl_b: f64,
    /// d of TUFL's quantile index floor(n b theta^d)
    #[param(default = 8.0, min = 0.0)]
    pub tufl_d: f64,
    /// weight of TUFL's focal term (the reference's `unsup_coeff`)
    #[param(default = 0.08, min = 0.0)]
    pub lambda_focal: f64,
    /// largest rotation of TUFL's strong view, degrees either way
    #[param(default = 30.0, min = 0.0, max = 180.0)]
    pub warp_rotation: f64,
    /// largest shear of TUFL's strong view, degrees either way
    #[param(default = 5.0, min = 0.0, max = 45.0)]
    pub warp_shear: f64,
    /// scale range of TUFL's strong view
    #[param(default = [0.8, 1.2], min = 0.0, min_exclusive)]
    pub warp_scale: [f64; 2],
    /// probability that TUFL's strong view is also flipped horizontally
    #[param(default = 0.5, min = 0.0, max = 1.0)]
    pub warp_flip_p: f64,
}

impl TuflParams {
    /// Checks across params.
    pub fn check(&self) -> Result<(), String> {
        let [low, high] = self.warp_scale;
        if low > high {
            return Err(format!(
                "warp_scale must be [low, high] with low <= high, got [{low}, {high}]"
            ));
        }
        Ok(())
    }

    /// Whether the thresholds adapt.
    pub fn adaptive(&self) -> bool {
        self.tufl_threshold == "adaptive"
    }
}

/// A 2x3 affine map in PyTorch's `affine_grid` convention, row-major: an output pixel at
/// normalised coordinates `(x, y)` (each in `[-1, 1]`) reads the input at
/// `(a[0] x + a[1] y + a[2], a[3] x + a[4] y + a[5])`.
pub type Affine = [f32; 6];

/// Draws one image's map as the reference's `random_affine`: rotation, shear and scale
/// uniformly in their ranges, no translation, and with probability `warp_flip_p` a horizontal
/// flip (the top row negated).
pub fn draw_affine(p: &TuflParams, rng: &mut dyn RngCore) -> Affine {
    let mut draw = |low: f64, high: f64| low + (high - low) * f64::from(uniform(rng));
    let angle = draw(-p.warp_rotation, p.warp_rotation).to_radians();
    let shear = draw(-p.warp_shear, p.warp_shear).to_radians();
    let scale = draw(p.warp_scale[0], p.warp_scale[1]);
    let flip = if f64::from(uniform(rng)) < p.warp_flip_p {
        -1.0
    } else {
        1.0
    };
    [
        (flip * angle.cos() * scale) as f32,
        (-flip * (angle + shear).sin() * scale) as f32,
        0.0,
        (angle.sin() * scale) as f32,
        ((angle + shear).cos() * scale) as f32,
        0.0,
    ]
}

/// Bilinear resampling of `[N, *, H, W]` maps through one [`Affine`] per image, as PyTorch's
/// `grid_sample(x, affine_grid(A, size), padding_mode="zeros")` with `align_corners=False`:
/// for every output pixel the four input pixels it reads and their weights (0 for a neighbour
/// outside the image). Built once per batch on the host; applied to host images
/// ([`WarpPlan::apply_host`]) and, differentiably, to logits on the device ([`WarpPlan::apply`]).
#[derive(Debug, Clone, PartialEq)]
pub struct WarpPlan {
    shape: [usize; 3],
    /// Per corner, per output pixel of the batch (`n * H * W`), the input pixel in the same
    /// flattening.
    index: [Vec<i64>; 4],
    weight: [Vec<f32>; 4],
}

impl WarpPlan {
    /// The plan of `affines` (one per image) for maps of `h` x `w`.
    pub fn new(affines: &[Affine], [h, w]: [usize; 2]) -> Self {
        let total = affines.len() * h * w;
        let mut index: [Vec<i64>; 4] = Default::default();
        let mut weight: [Vec<f32>; 4] = Default::default();
        for k in 0..4 {
            index[k] = vec![0; total];
            weight[k] = vec![0.0; total];
        }
        let (hf, wf) = (h as f32, w as f32);
        for (img, a) in affines.iter().enumerate() {
            for i in 0..h {
                let y = (2 * i + 1) as f32 / hf - 1.0;
                for j in 0..w {
                    let x = (2 * j + 1) as f32 / wf - 1.0;
                    let gx = a[0] * x + a[1] * y + a[2];
                    let gy = a[3] * x + a[4] * y + a[5];
                    let ix = ((gx + 1.0) * wf - 1.0) / 2.0;
                    let iy = ((gy + 1.0) * hf - 1.0) / 2.0;
                    let (x0, y0) = (ix.floor(), iy.floor());
                    let (tx, ty) = (ix - x0, iy - y0);
                    let out = (img * h + i) * w + j;
                    let corners = [
                        (x0, y0, (1.0 - tx) * (1.0 - ty)),
                        (x0 + 1.0, y0, tx * (1.0 - ty)),
                        (x0, y0 + 1.0, (1.0 - tx) * ty),
                        (x0 + 1.0, y0 + 1.0, tx * ty),
                    ];
                    for (k, (cx, cy, wt)) in corners.into_iter().enumerate() {
                        if cx >= 0.0 && cx < wf && cy >= 0.0 && cy < hf {
                            let at = (img * h + cy as usize) * w + cx as usize;
                            index[k][out] = at as i64;
                            weight[k][out] = wt;
                        }
                    }
                }
            }
        }
        Self {
            shape: [affines.len(), h, w],
            index,
            weight,
        }
    }

    /// Warps row-major `[N, C, H, W]` host maps.
    pub fn apply_host(&self, data: &[f32], channels: usize) -> Vec<f32> {
        let [n, h, w] = self.shape;
        let plane = h * w;
        let mut out = vec![0f32; n * channels * plane];
        for img in 0..n {
            for ch in 0..channels {
                let dst = &mut out[(img * channels + ch) * plane..][..plane];
                for (px, value) in dst.iter_mut().enumerate() {
                    let at = img * plane + px;
                    let mut sum = 0f32;
                    for k in 0..4 {
                        let wt = self.weight[k][at];
                        if wt != 0.0 {
                            let src = self.index[k][at] as usize;
                            let (src_img, src_px) = (src / plane, src % plane);
                            sum += wt * data[(src_img * channels + ch) * plane + src_px];
                        }
                    }
                    *value = sum;
                }
            }
        }
        out
    }

    /// Warps `[N, C, H, W]` maps on their device, with gradients to `x`.
    pub fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        let [n, c, h, w] = x.dims();
        assert_eq!([n, h, w], self.shape, "warp plan and maps differ in size");
        let device = x.device();
        let total = n * h * w;
        // Channels first, so that one index per pixel serves every channel.
        let flat = x.swap_dims(0, 1).reshape([c, total]);
        let mut out: Option<Tensor<2>> = None;
        for k in 0..4 {
            let index: Tensor<1, Int> =
                Tensor::from_data(TensorData::new(self.index[k].clone(), [total]), &device);
            let weight: Tensor<2> =
                Tensor::from_data(TensorData::new(self.weight[k].clone(), [1, total]), &device);
            let corner = flat.clone().select(1, index) * weight;
            out = Some(match out {
                Some(o) => o + corner,
                None => corner,
            });
        }
        out.expect("four corners")
            .reshape([c, n, h, w])
            .swap_dims(0, 1)
    }
}

/// One update of TUFL's per-class thresholds `theta` from a batch's weak pseudo-labels: for each
/// class predicted somewhere, its confidences plus its current threshold sorted in descending
/// order, read at `floor(len b theta_c^d)`; `theta_c <- beta theta_c + (1 - beta) that`, and a
/// threshold that reaches 1 becomes 0.999. A class predicted nowhere keeps its threshold. As the
/// reference, in f64 with the confidences in f32.
pub fn update_thresholds(theta: &mut [f64], weak: &PseudoLabels, b: f64, d: f64, beta: f64) {
    let mut by_class: Vec<Vec<f32>> = vec![Vec::new(); theta.len()];
    for (&label, &conf) in weak.labels.iter().zip(&weak.confidence) {
        if let Some(list) = by_class.get_mut(usize::from(label)) {
            list.push(conf);
        }
    }
    for (c, mut list) in by_class.into_iter().enumerate() {
        let quantile = if list.is_empty() {
            theta[c]
        } else {
            list.push(theta[c] as f32);
            list.sort_by(|a, b| b.total_cmp(a));
            let at = (list.len() as f64 * b * theta[c].powf(d)) as usize;
            f64::from(list[at.min(list.len() - 1)])
        };
        theta[c] = beta * theta[c] + (1.0 - beta) * quantile;
        if theta[c] >= 1.0 {
            theta[c] = 0.999;
        }
    }
}

/// Which pixels the adaptive loss counts: those whose weak confidence exceeds the threshold of
/// their weak class (compared in f64, as the reference's float64 thresholds).
pub fn kept_pixels(weak: &PseudoLabels, thresholds: &[f64]) -> Vec<bool> {
    weak.labels
        .iter()
        .zip(&weak.confidence)
        .map(|(&label, &conf)| f64::from(conf) > thresholds[usize::from(label)])
        .collect()
}

/// Which pixels the fixed-threshold loss counts: those whose weak confidence exceeds `theta`
/// (compared in f32, as the reference's float32 threshold).
pub fn kept_above(weak: &PseudoLabels, theta: f32) -> Vec<bool> {
    weak.confidence.iter().map(|&conf| conf > theta).collect()
}

/// The form of TUFL's focal weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FocalWeight {
    /// `|1 - q_y|^gamma` (the adaptive loss).
    OneMinusStrong,
    /// `|pbar_y - q_y|^gamma` (the fixed-threshold loss).
    WeakMinusStrong,
}

const LOG_EPSILON: f64 = 1e-30;
const MIN_LOSS: f64 = 1e-8;

/// TUFL's term: the mean over the `kept` pixels of the per-pixel loss of the module docs, or
/// `None` when no pixel is kept. `weak` are the weak view's logits already warped into the strong
/// view (`[N, C, H, W]`, with gradients), `strong` the strong view's; `weak_labels` are the
/// pseudo-labels of `weak` (arg-max and confidence, from the host); `class_weights` the `w_c`
/// (all 1 when `None`).
pub fn focal_loss(
    weak: Tensor<4>,
    strong: Tensor<4>,
    weak_labels: &PseudoLabels,
    kept: &[bool],
    class_weights: Option<&[f32]>,
    gamma: f64,
    form: FocalWeight,
) -> Option<Tensor<1>> {
    let count = kept.iter().filter(|&&k| k).count();
    if count == 0 {
        return None;
    }
    let [n, c, h, w] = weak.dims();
    let device = weak.device();
    let p = softmax(weak, 1);
    let q = softmax(strong, 1);
    let p_bar = p.clone().detach();
    let labels: Vec<i64> = weak_labels.labels.iter().map(|&l| i64::from(l)).collect();
    let labels: Tensor<4, Int> = Tensor::from_data(TensorData::new(labels, [n, 1, h, w]), &device);
    let q_y = q.clone().gather(1, labels);
    let difference = match form {
        FocalWeight::OneMinusStrong => q_y.neg().add_scalar(1.0),
        FocalWeight::WeakMinusStrong => {
            let p_y: Tensor<4> = Tensor::from_data(
                TensorData::new(weak_labels.confidence.clone(), [n, 1, h, w]),
                &device,
            );
            p_y - q_y
        }
    };
    let focal = difference.abs().powf_scalar(gamma);
    let log_p_bar = p_bar.clone().add_scalar(LOG_EPSILON).log();
    let log_q = q.add_scalar(LOG_EPSILON).log();
    let consistency = p_bar * (log_p_bar - log_q * focal);
    let entropy = p.clone() * p.add_scalar(LOG_EPSILON).log();
    let mut per_class = consistency - entropy;
    if let Some(weights) = class_weights {
        let weights: Tensor<4> =
            Tensor::from_data(TensorData::new(weights.to_vec(), [1, c, 1, 1]), &device);
        per_class = per_class * weights;
    }
    let per_pixel = per_class.sum_dim(1).clamp_min(MIN_LOSS);
    let mask: Vec<f32> = kept.iter().map(|&k| f32::from(u8::from(k))).collect();
    let mask: Tensor<4> = Tensor::from_data(TensorData::new(mask, [n, 1, h, w]), &device);
    Some((per_pixel * mask).sum().div_scalar(count as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-4, "{a:?} != {b:?}");
        }
    }

    #[test]
    fn the_identity_map_warps_nothing() {
        let plan = WarpPlan::new(&[[1.0, 0.0, 0.0, 0.0, 1.0, 0.0]], [3, 4]);
        let data: Vec<f32> = (0..24).map(|v| v as f32).collect();
        close(&plan.apply_host(&data, 2), &data);
    }

    #[test]
    fn a_flip_mirrors_the_columns() {
        let plan = WarpPlan::new(&[[-1.0, 0.0, 0.0, 0.0, 1.0, 0.0]], [2, 3]);
        let data = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        close(&plan.apply_host(&data, 1), &[3.0, 2.0, 1.0, 6.0, 5.0, 4.0]);
    }

    #[test]
    fn thresholds_move_toward_the_quantile_and_stay_below_one() {
        let weak = PseudoLabels {
            labels: vec![0, 0, 0, 1],
            confidence: vec![0.9, 0.95, 0.99, 0.999],
        };
        let mut theta = vec![0.8, 0.8, 0.8];
        update_thresholds(&mut theta, &weak, 0.8, 8.0, 0.9);
        // Class 0: [0.99, 0.95, 0.9, 0.8] at floor(4 * 0.8 * 0.8^8) = 0 -> 0.99.
        assert!((theta[0] - (0.9 * 0.8 + 0.1 * f64::from(0.99f32))).abs() < 1e-12);
        // Class 2 was predicted nowhere.
        assert_eq!(theta[2], 0.8);
        let mut high = vec![0.5, 0.8, 0.8];
        let sure = PseudoLabels {
            labels: vec![0],
            confidence: vec![1.0],
        };
        update_thresholds(&mut high, &sure, 0.8, 8.0, 0.0);
        assert_eq!(high[0], 0.999);
    }
}
