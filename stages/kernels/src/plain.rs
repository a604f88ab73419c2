//! The default bodies of the leaf ops of [`crate::Kernels`]: plain compositions of Burn's tensor
//! ops and modules, on `Tensor`s of any backend. (The ops made of other ops, such as a conv with
//! its BatchNorm, compose the backend's own kernels in `ops`.)

use burn::nn::conv::Conv2d;
use burn::nn::{BatchNorm, PaddingConfig2d};
use burn::optim::{AdamConfig, AdamState, AdaptiveMomentumState, Optimizer};
use burn::tensor::activation::{log_softmax, relu, softmax};
use burn::tensor::module::interpolate;
use burn::tensor::ops::{ConvOptions, InterpolateMode, InterpolateOptions};
use burn::tensor::{Device, Int, Tensor, TensorData};

/// Label value that the segmentation loss ignores.
pub const IGNORE_LABEL: i64 = 255;

/// Adam's constants (without weight decay or AMSGrad, ADVENT's discriminator optimiser).
#[derive(Debug, Clone, Copy)]
pub struct AdamSettings {
    /// Decay of the first moment.
    pub beta_1: f32,
    /// Decay of the second moment.
    pub beta_2: f32,
    /// Added to the root of the second moment.
    pub epsilon: f32,
}

/// The conv's options with its padding spelled out, or `None` for `Same` padding, which
/// depends on Burn internals (dag builds only Explicit and Valid).
pub fn explicit_options(conv: &Conv2d) -> Option<ConvOptions<2>> {
    let ((top, bottom), (left, right)) = match conv.padding {
        PaddingConfig2d::Explicit(top, left, bottom, right) => ((top, bottom), (left, right)),
        PaddingConfig2d::Valid => ((0, 0), (0, 0)),
        PaddingConfig2d::Same => return None,
    };
    Some(ConvOptions::new_with_padding(
        conv.stride,
        [(top, bottom), (left, right)],
        conv.dilation,
        conv.groups,
    ))
}

pub(crate) fn conv(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    conv.forward(x)
}

pub(crate) fn batch_norm(bn: &BatchNorm, x: Tensor<4>, then_relu: bool) -> Tensor<4> {
    let updates_statistics = x.device().is_autodiff() && bn.training.is_enabled();
    let y = bn.forward(x);
    // Burn's `RunningState` keeps one pending value per thread and averages them only when a
    // thread holding one reads the value; the trainer runs each step on whichever worker is
    // free. Merged now, on the thread that wrote them, the statistics never depend on which
    // thread ran which step (a resumed run then ends with the uninterrupted one's).
    if updates_statistics {
        let _ = (bn.running_mean.value_sync(), bn.running_var.value_sync());
    }
    if then_relu {
        relu(y)
    } else {
        y
    }
}

pub(crate) fn upsample(x: Tensor<4>, [h, w]: [usize; 2]) -> Tensor<4> {
    interpolate(
        x,
        InterpolateOptions::new(InterpolateMode::Bilinear)
            .with_align_corners(true)
            .with_output_size([h, w]),
    )
}

/// Bilinear resize with aligned corners as two matrix products (`A_h X A_w^T`), which every
/// backend can differentiate.
pub(crate) fn upsample_differentiable(x: Tensor<4>, size: [usize; 2]) -> Tensor<4> {
    resize_by_matrices(x, size, Corners::Aligned)
}

/// How a bilinear resize maps output pixels onto input pixels.
#[derive(Clone, Copy)]
pub(crate) enum Corners {
    /// Corner pixel centres coincide (`align_corners=True`, ADVENT's upsampling).
    Aligned,
    /// Pixel areas coincide (`align_corners=False`, PyTorch's default and mmseg's `resize`).
    HalfPixel,
}

/// Bilinear resize as `A_h X A_w^T`.
pub(crate) fn resize_by_matrices(x: Tensor<4>, [h, w]: [usize; 2], corners: Corners) -> Tensor<4> {
    let [n, c, xh, xw] = x.dims();
    let device = x.device();
    // [N*C*xh, xw] x [xw, W] -> [N, C, xh, W]
    let aw = interpolation_matrix(xw, w, corners, &device).transpose();
    let x = x
        .reshape([n * c * xh, xw])
        .matmul(aw)
        .reshape([n, c, xh, w]);
    // [N*C*W, xh] x [xh, H] -> [N, C, W, H], then back to rows-first.
    let ah = interpolation_matrix(xh, h, corners, &device).transpose();
    x.swap_dims(2, 3)
        .reshape([n * c * w, xh])
        .matmul(ah)
        .reshape([n, c, w, h])
        .swap_dims(2, 3)
}

/// The `[to, from]` matrix of 1-D linear interpolation. The half-pixel source coordinates are
/// computed in f32 as PyTorch's CPU kernel does, so that both pick the same neighbours and
/// weights.
fn interpolation_matrix(from: usize, to: usize, corners: Corners, device: &Device) -> Tensor<2> {
    let mut m = vec![0.0f32; to * from];
    for i in 0..to {
        let src = match corners {
            Corners::Aligned if to > 1 => i as f64 * (from - 1) as f64 / (to - 1) as f64,
            Corners::Aligned => 0.0,
            Corners::HalfPixel => {
                let scale = from as f32 / to as f32;
                f64::from((scale * (i as f32 + 0.5) - 0.5).max(0.0))
            }
        };
        let i0 = (src.floor() as usize).min(from - 1);
        let i1 = (i0 + 1).min(from - 1);
        let frac = (src - i0 as f64) as f32;
        m[i * from + i0] += 1.0 - frac;
        m[i * from + i1] += frac;
    }
    Tensor::from_data(TensorData::new(m, [to, from]), device)
}

/// The device computes the argmax, so that a GPU sends back one index per pixel rather than C
/// scores.
pub(crate) fn class_argmax(scores: Tensor<4>) -> Vec<u8> {
    let indices: Vec<i64> = scores
        .argmax(1)
        .into_data()
        .try_into_vec_as::<i64>()
        .expect("integer argmax");
    indices.into_iter().map(|c| c as u8).collect()
}

pub(crate) fn masked_cross_entropy(logits: Tensor<4>, labels: Tensor<3, Int>) -> Tensor<1> {
    let log_p = log_softmax(logits, 1);
    let ignored = labels.clone().equal_elem(IGNORE_LABEL);
    let valid = ignored.clone().bool_not().float();
    // Ignored pixels gather class 0 and are then zeroed by the mask.
    let safe = labels.mask_fill(ignored, 0);
    let picked: Tensor<3> = log_p.gather(1, safe.unsqueeze_dim(1)).squeeze_dim(1);
    let count = valid.clone().sum().clamp_min(1.0);
    (picked * valid).sum().neg() / count
}

pub(crate) fn self_information(logits: Tensor<4>, norm: f64) -> Tensor<4> {
    let log_p = log_softmax(logits.clone(), 1);
    let p = softmax(logits, 1);
    (p * log_p).neg().div_scalar(norm)
}

/// The stable form `max(x,0) - x*y + ln(1 + exp(-|x|))`.
pub(crate) fn bce_with_logits(logits: Tensor<4>, label: f64) -> Tensor<1> {
    let stable = logits.clone().abs().neg().exp().log1p();
    (relu(logits.clone()) - logits.mul_scalar(label) + stable).mean()
}

/// Burn's own `Adam` step.
pub(crate) fn adam_step(
    settings: AdamSettings,
    lr: f64,
    param: Tensor<1>,
    grad: Tensor<1>,
    [moment_1, moment_2]: [Tensor<1>; 2],
    time: usize,
) -> (Tensor<1>, Tensor<1>, Tensor<1>) {
    let adam = AdamConfig::new()
        .with_beta_1(settings.beta_1)
        .with_beta_2(settings.beta_2)
        .with_epsilon(settings.epsilon)
        .build();
    let state = AdamState::new(AdaptiveMomentumState::new(time, moment_1, moment_2));
    let (param, state) = adam.step(lr, param, grad, Some(state));
    let momentum = state.expect("Adam keeps a state").momentum;
    (param, momentum.moment_1, momentum.moment_2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    /// A trainable BatchNorm (DAFormer's decoder, mmcv's ResNet) is Burn's own layer; its
    /// running statistics must not depend on which thread ran which step either.
    #[test]
    fn trainable_batch_norm_statistics_do_not_depend_on_the_thread() {
        use burn::nn::BatchNormConfig;
        let device = Device::flex().autodiff();
        let (hopping, fixed) = (
            BatchNormConfig::new(3).init(&device),
            BatchNormConfig::new(3).init(&device),
        );
        let inputs: Vec<Tensor<4>> = (0..3)
            .map(|_| Tensor::random([2, 3, 4, 4], Distribution::Normal(0.5, 2.0), &device))
            .collect();
        for x in &inputs {
            std::thread::scope(|s| {
                s.spawn(|| crate::batch_norm(&hopping, x.clone(), false));
            });
            crate::batch_norm(&fixed, x.clone(), false);
        }
        for (a, b) in [
            (&hopping.running_mean, &fixed.running_mean),
            (&hopping.running_var, &fixed.running_var),
        ] {
            assert_eq!(a.value().into_data(), b.value_sync().into_data());
        }
    }

    /// The matrix resize equals Burn's own bilinear interpolation for both corner conventions,
    /// upsampling and downsampling, odd ratios included.
    #[test]
    fn matrix_resize_matches_interpolate() {
        let device = Device::flex();
        let x = Tensor::<4>::random([2, 3, 7, 10], Distribution::Normal(0.0, 1.0), &device);
        for size in [[28, 40], [13, 17], [4, 5], [7, 10], [1, 3]] {
            for (corners, aligned) in [(Corners::Aligned, true), (Corners::HalfPixel, false)] {
                let ours = resize_by_matrices(x.clone(), size, corners);
                let burn = interpolate(
                    x.clone(),
                    InterpolateOptions::new(InterpolateMode::Bilinear)
                        .with_align_corners(aligned)
                        .with_output_size(size),
                );
                let diff: f32 = (ours - burn).abs().max().into_scalar();
                assert!(diff < 1e-5, "{size:?} aligned={aligned}: {diff}");
            }
        }
    }
}
