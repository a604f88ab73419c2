//! A convolution forward pass that steers clear of slow paths of Burn 0.22's flex backend.
//!
//! Autodiff computes a conv's weight gradient as another convolution whose input channels are
//! the batch size and whose kernel is the whole output-gradient map. Burn-flex 0.22 sends convs
//! with at most 4 input and 16 output channels to a direct "small channel" kernel, so at batch
//! 1 every conv with <= 16 output channels (the narrow models' stem and layer1, 16-class heads,
//! a 16-wide discriminator) gets its weight gradient from a direct convolution with a kernel of
//! thousands of taps: about 40% of a narrow model's training step in a profile. Padding such a
//! conv's output channels past 16 with zero filters routes the weight gradient through
//! im2col + GEMM instead, at the cost of one extra filter.
//!
//! Trained 1x1 convs on flex (most of a Bottleneck's convs) skip the convolution
//! altogether and run as one matmul, whose gradients autodiff derives as two more.
//!
//! Trained convs on LibTorch (`device: tch`, the `tch` feature) take their gradients from
//! LibTorch's fused backward kernels instead of Burn's generic ones (`libtorch`).

use burn::nn::conv::Conv2d;
use burn::nn::PaddingConfig2d;
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Device, Slice, Tensor};

/// Largest output-channel count burn-flex 0.22 treats as "small".
const FLEX_SMALL_CHANNELS_OUT: usize = 16;

/// `conv.forward(x)`, computed as a matmul for a trained 1x1 conv on flex, and with
/// zero-padded output channels when the conv is trained and has at most
/// [`FLEX_SMALL_CHANNELS_OUT`] of them (see the module docs). Same values and gradients, up to
/// float rounding.
pub fn conv_forward(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    let Some(options) = explicit_options(conv) else {
        return conv.forward(x);
    };
    #[cfg(feature = "tch")]
    if let Some(y) = crate::libtorch::conv2d(
        &x,
        &conv.weight.val(),
        conv.bias.as_ref().map(|b| b.val()).as_ref(),
        &options,
    ) {
        return y;
    }
    if let Some(y) = pointwise_as_matmul(conv, &x) {
        return y;
    }
    let weight = conv.weight.val();
    let [cout, cin, kh, kw] = weight.dims();
    if cout > FLEX_SMALL_CHANNELS_OUT || conv.groups != 1 || !weight.is_require_grad() {
        return conv.forward(x);
    }
    let extra = FLEX_SMALL_CHANNELS_OUT + 1 - cout;
    let device = weight.device();
    let weight = Tensor::cat(
        vec![weight, Tensor::zeros([extra, cin, kh, kw], &device)],
        0,
    );
    let bias = conv
        .bias
        .as_ref()
        .map(|b| Tensor::cat(vec![b.val(), Tensor::zeros([extra], &device)], 0));
    conv2d(x, weight, bias, options).narrow(1, 0, cout)
}

/// The conv's options with its padding spelled out, or `None` for `Same` padding, which
/// depends on Burn internals (this crate builds only Explicit and Valid).
pub(crate) fn explicit_options(conv: &Conv2d) -> Option<ConvOptions<2>> {
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

/// A trained 1x1 convolution on flex, computed as one matmul of the weight with the
/// (strided) input, or `None` where this does not apply.
///
/// Burn derives a conv's weight gradient as another convolution whose kernel is the whole
/// output-gradient map, which flex and LibTorch run as one tiny matrix product per input
/// channel. As a matmul, autodiff derives both gradients as single large matrix products
/// instead: about 16% off a CE training step of the benchmark model on flex (BENCHMARKS.md).
/// LibTorch measured no faster this way, and GPU backends have their own conv kernels, so
/// they keep the convolution.
fn pointwise_as_matmul(conv: &Conv2d, x: &Tensor<4>) -> Option<Tensor<4>> {
    let weight = conv.weight.val();
    let [cout, cin, kh, kw] = weight.dims();
    let unpadded = matches!(
        conv.padding,
        PaddingConfig2d::Valid | PaddingConfig2d::Explicit(0, 0, 0, 0)
    );
    if (kh, kw) != (1, 1)
        || conv.groups != 1
        || !unpadded
        || !weight.is_require_grad()
        || !on_flex(&x.device())
    {
        return None;
    }
    let [sh, sw] = conv.stride;
    let x = if (sh, sw) == (1, 1) {
        x.clone()
    } else {
        let [_, _, h, w] = x.dims();
        x.clone().slice([
            Slice::new(0, None, 1),
            Slice::new(0, None, 1),
            Slice::new(0, Some(h as isize), sh as isize),
            Slice::new(0, Some(w as isize), sw as isize),
        ])
    };
    let [n, _, ho, wo] = x.dims();
    let y = weight
        .reshape([1, cout, cin])
        .matmul(x.reshape([n, cin, ho * wo]));
    let y = match &conv.bias {
        Some(bias) => y + bias.val().reshape([1, cout, 1]),
        None => y,
    };
    Some(y.reshape([n, cout, ho, wo]))
}

/// Whether `device` is flex (with or without autodiff).
pub(crate) fn on_flex(device: &Device) -> bool {
    device.clone().inner() == Device::flex()
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::conv::Conv2dConfig;
    use burn::tensor::Distribution;

    /// Values and all gradients of `conv_forward` against Burn's own conv on `device`, for the
    /// shapes this crate builds: 1x1 (strided or not), the padded small-channel path, and a
    /// conv that takes neither detour; with and without bias, and with an input that needs no
    /// gradient (an image).
    fn check_against_burn_conv(device: Device) {
        // (kernel, stride, dilation, padding, in, out, bias, input needs a gradient)
        for (k, s, d, p, cin, cout, with_bias, input_grad) in [
            (1, 1, 1, 0, 8, 32, true, true),
            (1, 2, 1, 0, 8, 32, true, true),
            (1, 1, 1, 0, 8, 12, false, true),
            (3, 1, 2, 2, 8, 12, true, true),
            (7, 2, 1, 3, 3, 16, false, false),
            (3, 1, 6, 6, 8, 24, true, true),
        ] {
            let conv = Conv2dConfig::new([cin, cout], [k, k])
                .with_stride([s, s])
                .with_dilation([d, d])
                .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
                .with_bias(with_bias)
                .init(&device);
            let x = Tensor::<4>::random([2, cin, 11, 9], Distribution::Normal(0.0, 1.0), &device);
            let x = if input_grad { x.require_grad() } else { x };
            let reference = conv.forward(x.clone());
            let ours = conv_forward(&conv, x.clone());
            let upstream = reference.clone().detach().cos();
            let grads_ref = (reference.clone() * upstream.clone()).sum().backward();
            let grads_ours = (ours.clone() * upstream).sum().backward();
            let max_diff =
                |a: Tensor<4>, b: Tensor<4>| -> f32 { (a - b).abs().max().into_scalar() };
            let case = format!("kernel {k} stride {s} dilation {d}, {cin}->{cout}");
            assert!(max_diff(reference, ours) < 1e-5, "values, {case}");
            let (wr, wo) = (conv.weight.grad(&grads_ref), conv.weight.grad(&grads_ours));
            assert!(
                max_diff(wr.unwrap(), wo.unwrap()) < 1e-4,
                "weight gradient, {case}"
            );
            match (x.grad(&grads_ref), x.grad(&grads_ours)) {
                (Some(xr), Some(xo)) => {
                    assert!(max_diff(xr, xo) < 1e-5, "input gradient, {case}")
                }
                (None, None) => assert!(!input_grad, "no input gradient, {case}"),
                _ => panic!("input gradient present in one run only, {case}"),
            }
            if let Some(bias) = &conv.bias {
                let (br, bo) = (
                    bias.grad(&grads_ref).unwrap(),
                    bias.grad(&grads_ours).unwrap(),
                );
                // Each entry sums the upstream gradient over hundreds of pixels, in an order
                // that differs between implementations: compare relative to its size.
                let scale: f32 = br.clone().abs().max().into_scalar();
                let bias_diff: f32 = (br - bo).abs().max().into_scalar();
                assert!(
                    bias_diff <= 1e-6 * scale.max(1.0),
                    "bias gradient, {case}: off by {bias_diff} at scale {scale}"
                );
            }
        }
    }

    #[test]
    fn conv_forward_matches_burn_conv_in_values_and_gradients() {
        check_against_burn_conv(Device::flex().autodiff());
    }

    /// The `tch` path records the conv in a LibTorch graph and takes its gradients from
    /// LibTorch's autograd.
    #[cfg(feature = "tch")]
    #[test]
    #[allow(deprecated)]
    fn libtorch_conv_matches_burn_conv_in_values_and_gradients() {
        check_against_burn_conv(Device::libtorch().autodiff());
    }
}
