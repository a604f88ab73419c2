//! A convolution forward pass that steers clear of a slow path of Burn 0.22's flex backend.
//!
//! Autodiff computes a conv's weight gradient as another convolution whose input channels are
//! the batch size and whose kernel is the whole output-gradient map. Burn-flex 0.22 sends convs
//! with at most 4 input and 16 output channels to a direct "small channel" kernel, so at batch
//! 1 every conv with <= 16 output channels (the narrow models' stem and layer1, 16-class heads,
//! a 16-wide discriminator) gets its weight gradient from a direct convolution with a kernel of
//! thousands of taps: about 40% of a narrow model's training step in a profile. Padding such a
//! conv's output channels past 16 with zero filters routes the weight gradient through
//! im2col + GEMM instead, at the cost of one extra filter.

use burn::nn::conv::Conv2d;
use burn::nn::PaddingConfig2d;
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::Tensor;

/// Largest output-channel count burn-flex 0.22 treats as "small".
const FLEX_SMALL_CHANNELS_OUT: usize = 16;

/// `conv.forward(x)`, computed with zero-padded output channels when the conv is trained and
/// has at most [`FLEX_SMALL_CHANNELS_OUT`] of them (see the module docs). Same values, same
/// gradients for the real filters.
pub fn conv_forward(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    let weight = conv.weight.val();
    let [cout, cin, kh, kw] = weight.dims();
    if cout > FLEX_SMALL_CHANNELS_OUT || conv.groups != 1 || !weight.is_require_grad() {
        return conv.forward(x);
    }
    // `Same` padding depends on Burn internals; this crate builds only Explicit and Valid.
    let ((top, bottom), (left, right)) = match conv.padding {
        PaddingConfig2d::Explicit(top, left, bottom, right) => ((top, bottom), (left, right)),
        PaddingConfig2d::Valid => ((0, 0), (0, 0)),
        PaddingConfig2d::Same => return conv.forward(x),
    };
    let options = ConvOptions::new_with_padding(
        conv.stride,
        [(top, bottom), (left, right)],
        conv.dilation,
        conv.groups,
    );
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
