//! The seam itself: [`Kernels`], its default bodies, and [`Lift`], which they are written with.

// burn-tch is marked deprecated upstream; `device: tch` is an optional, benchmark-driven backend
// and the dispatch generated for it names `LibTorch`.
#![cfg_attr(feature = "tch", allow(deprecated))]

use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{backend_extension, Backend};
use burn::nn::conv::Conv2d;
use burn::nn::BatchNorm;
use burn::tensor::activation::{leaky_relu, relu};
use burn::tensor::{Int, Tensor};

use crate::plain::{self, AdamSettings};

/// Moves tensors between a backend's primitives and Burn's `Tensor`, in which the default
/// bodies of [`Kernels`] are written.
pub trait Lift: Backend {
    /// The primitive as a tensor of rank `D`.
    fn lift<const D: usize>(t: FloatTensor<Self>) -> Tensor<D>;
    /// The integer primitive as a tensor of rank `D`.
    fn lift_int<const D: usize>(t: IntTensor<Self>) -> Tensor<D, Int>;
    /// The tensor's primitive; it must live on this backend.
    fn lower<const D: usize>(t: Tensor<D>) -> FloatTensor<Self>;
}

/// The ops with more than one implementation. Call them through the free functions of this
/// crate ([`conv`], [`batch_norm`], ...), which hand Burn's dispatch the tensors.
#[backend_extension(
    Flex,
    Cube: cfg(any(feature = "wgpu", feature = "cuda")),
    LibTorch: cfg(feature = "tch"),
    Autodiff
)]
pub trait Kernels: Backend + Lift {
    /// `conv.forward(x)`.
    fn conv_layer(x: FloatTensor<Self>, conv: &Conv2d) -> FloatTensor<Self> {
        Self::lower(plain::conv(conv, Self::lift(x)))
    }

    /// `bn.forward(x)`, then a ReLU when `relu` is set.
    fn batch_norm_layer(x: FloatTensor<Self>, bn: &BatchNorm, relu: bool) -> FloatTensor<Self> {
        Self::lower(plain::batch_norm(bn, Self::lift(x), relu))
    }

    /// `bn.forward(conv.forward(x))`, then a ReLU when `relu` is set.
    fn conv_batch_norm(
        x: FloatTensor<Self>,
        conv: &Conv2d,
        bn: &BatchNorm,
        relu: bool,
    ) -> FloatTensor<Self> {
        Self::batch_norm_layer(Self::conv_layer(x, conv), bn, relu)
    }

    /// `relu(bn.forward(conv.forward(x)) + residual)`, a bottleneck's end.
    fn conv_batch_norm_add_relu(
        x: FloatTensor<Self>,
        residual: FloatTensor<Self>,
        conv: &Conv2d,
        bn: &BatchNorm,
    ) -> FloatTensor<Self> {
        let y = Self::lift::<4>(Self::conv_batch_norm(x, conv, bn, false));
        Self::lower(relu(y + Self::lift::<4>(residual)))
    }

    /// The sum of `convs` applied to `x` (DeepLabV2's classifier).
    fn classifier(x: FloatTensor<Self>, convs: &[Conv2d]) -> FloatTensor<Self> {
        classifier_of::<Self>(x, convs)
    }

    /// `convs` in a chain with LeakyReLU(`slope`) between them (ADVENT's discriminator).
    fn discriminator(x: FloatTensor<Self>, convs: &[Conv2d], slope: f64) -> FloatTensor<Self> {
        discriminator_of::<Self>(x, convs, slope)
    }

    /// The discriminator's logits twice from one forward pass: the first passes gradients only
    /// to `x`, the second only to the convs. `None` where the caller must run two passes.
    fn discriminator_split(
        _x: FloatTensor<Self>,
        _convs: &[Conv2d],
        _slope: f64,
    ) -> Option<(FloatTensor<Self>, FloatTensor<Self>)> {
        None
    }

    /// Bilinear resize with aligned corners to `size`, by the fastest form for inference.
    fn upsample(x: FloatTensor<Self>, size: [usize; 2]) -> FloatTensor<Self> {
        Self::lower(plain::upsample(Self::lift(x), size))
    }

    /// Bilinear resize with aligned corners to `size`, differentiable on every backend.
    fn upsample_differentiable(x: FloatTensor<Self>, size: [usize; 2]) -> FloatTensor<Self> {
        Self::lower(plain::upsample_differentiable(Self::lift(x), size))
    }

    /// The class index of the largest score per pixel of `[N, C, H, W]` scores, `N * H * W`
    /// values in row-major order; ties go to the lower class.
    fn class_argmax(scores: FloatTensor<Self>) -> Vec<u8> {
        plain::class_argmax(Self::lift(scores))
    }

    /// Mean cross-entropy over the labelled pixels (see [`masked_cross_entropy`]).
    fn masked_cross_entropy(
        logits: FloatTensor<Self>,
        labels: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        let labels = Self::lift_int(labels);
        Self::lower(plain::masked_cross_entropy(Self::lift(logits), labels))
    }

    /// `-p ln p / norm` per class and pixel, `p = softmax(logits)` over the class axis.
    fn self_information(logits: FloatTensor<Self>, norm: f64) -> FloatTensor<Self> {
        Self::lower(plain::self_information(Self::lift(logits), norm))
    }

    /// Mean binary cross-entropy of `logits` against the constant `label`.
    fn bce_with_logits(logits: FloatTensor<Self>, label: f64) -> FloatTensor<Self> {
        Self::lower(plain::bce_with_logits(Self::lift(logits), label))
    }

    /// One Adam step of `param` with `grad`: the new parameter and moments. `time` counts the
    /// steps taken before; before the first, the moments are zeros.
    #[allow(clippy::too_many_arguments)]
    fn adam_step(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moment_1: FloatTensor<Self>,
        moment_2: FloatTensor<Self>,
        time: usize,
        lr: f64,
        settings: AdamSettings,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let moments = [Self::lift(moment_1), Self::lift(moment_2)];
        let (param, grad) = (Self::lift(param), Self::lift(grad));
        let (param, m1, m2) = plain::adam_step(settings, lr, param, grad, moments, time);
        (Self::lower(param), Self::lower(m1), Self::lower(m2))
    }
}

/// [`Kernels::classifier`] as a sum of [`Kernels::conv_layer`]s.
pub(crate) fn classifier_of<B: Kernels>(x: FloatTensor<B>, convs: &[Conv2d]) -> FloatTensor<B> {
    let sum = convs
        .iter()
        .map(|conv| B::lift::<4>(B::conv_layer(x.clone(), conv)))
        .reduce(|sum, y| sum + y)
        .expect("a classifier has convs");
    B::lower(sum)
}

/// [`Kernels::discriminator`] as a chain of [`Kernels::conv_layer`]s.
pub(crate) fn discriminator_of<B: Kernels>(
    x: FloatTensor<B>,
    convs: &[Conv2d],
    slope: f64,
) -> FloatTensor<B> {
    let last = convs.len() - 1;
    convs.iter().enumerate().fold(x, |x, (i, conv)| {
        let y = B::conv_layer(x, conv);
        if i < last {
            B::lower(leaky_relu(B::lift::<4>(y), slope))
        } else {
            y
        }
    })
}
