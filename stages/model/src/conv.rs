//! The model's convolutions: Burn's `Conv2d` modules, computed by the fastest kernel of each
//! backend (`dag_kernels::conv`: im2col on flex, LibTorch's fused kernels in training on
//! `device: tch`, Burn's own conv on the GPU backends).

use burn::nn::conv::Conv2d;
use burn::tensor::Tensor;

/// `conv.forward(x)` by the fastest kernel of `x`'s backend. Same values and gradients as
/// Burn's conv, up to float rounding.
pub fn conv_forward(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    dag_kernels::conv(conv, x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::conv::Conv2dConfig;
    use burn::nn::PaddingConfig2d;
    use burn::tensor::{Device, Distribution};

    /// Values and all gradients of `conv_forward` against Burn's own conv on `device`, for the
    /// shapes this crate builds: 1x1 (strided or not), 3x3 with and without dilation (some
    /// dilations so large that most kernel positions read only padding), the 7x7
    /// stem, the discriminator's 4x4 stride-2 convs (and one whose padding differs between
    /// sides); with and without bias, and with an input that needs no gradient (an image).
    fn check_against_burn_conv(device: Device) {
        // (kernel, stride, dilation, padding (top, left, bottom, right), in, out, bias, input
        // needs a gradient)
        for (k, s, d, [top, left, bottom, right], cin, cout, with_bias, input_grad, [h, w]) in [
            (1, 1, 1, [0; 4], 8, 32, true, true, [11, 9]),
            (1, 2, 1, [0; 4], 8, 32, true, true, [11, 9]),
            (1, 1, 1, [0; 4], 8, 12, false, true, [11, 9]),
            (3, 1, 1, [1; 4], 8, 12, false, true, [11, 9]),
            (3, 1, 2, [2; 4], 8, 12, true, true, [11, 9]),
            (7, 2, 1, [3; 4], 3, 16, false, false, [11, 9]),
            (3, 1, 6, [6; 4], 8, 24, true, true, [11, 9]),
            // Dilations past the map, as DeepLabV2's classifier on small maps: on the 11x9
            // input, 3 of the 9 kernel positions read pixels at dilation 9, 1 at dilation 12.
            (3, 1, 9, [9; 4], 8, 19, true, true, [11, 9]),
            (3, 1, 12, [12; 4], 8, 19, false, true, [11, 9]),
            (4, 2, 1, [1; 4], 5, 16, true, true, [11, 9]),
            (4, 2, 1, [2, 0, 1, 3], 6, 1, true, true, [11, 9]),
            // Stride 1 and large enough that the shifted path splits its channels across
            // threads (unevenly: 19 outputs, 33 inputs).
            (3, 1, 3, [3; 4], 33, 19, true, true, [40, 36]),
            // Enough output pixels (36x32) for the transposed weight gradient.
            (4, 2, 1, [1; 4], 5, 16, true, true, [72, 64]),
            (7, 2, 1, [3; 4], 3, 16, false, false, [72, 64]),
        ] {
            let conv = Conv2dConfig::new([cin, cout], [k, k])
                .with_stride([s, s])
                .with_dilation([d, d])
                .with_padding(PaddingConfig2d::Explicit(top, left, bottom, right))
                .with_bias(with_bias)
                .init(&device);
            let x = Tensor::<4>::random([2, cin, h, w], Distribution::Normal(0.0, 1.0), &device);
            let x = if input_grad { x.require_grad() } else { x };
            let reference = conv.forward(x.clone());
            let ours = conv_forward(&conv, x.clone());
            let upstream = reference.clone().detach().cos();
            let grads_ref = (reference.clone() * upstream.clone()).sum().backward();
            let grads_ours = (ours.clone() * upstream).sum().backward();
            let max_diff =
                |a: Tensor<4>, b: Tensor<4>| -> f32 { (a - b).abs().max().into_scalar() };
            let case = format!(
                "kernel {k} stride {s} dilation {d} padding {top},{left},{bottom},{right}, {cin}->{cout}, {h}x{w}"
            );
            assert!(max_diff(reference, ours) < 1e-5, "values, {case}");
            let (wr, wo) = (conv.weight.grad(&grads_ref), conv.weight.grad(&grads_ours));
            let (wr, wo) = (wr.unwrap(), wo.unwrap());
            // A weight gradient sums over every output pixel: allow f32 rounding relative to
            // its size (about 100 on the larger maps).
            let size: f32 = wr.clone().abs().max().into_scalar();
            let diff = max_diff(wr, wo);
            assert!(
                diff < 1e-5 * size.max(10.0),
                "weight gradient off by {diff} (largest {size}), {case}"
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
                // Each entry sums the upstream gradient over up to thousands of pixels, in an
                // order that differs between implementations: compare relative to its size.
                let scale: f32 = br.clone().abs().max().into_scalar();
                let bias_diff: f32 = (br - bo).abs().max().into_scalar();
                assert!(
                    bias_diff <= 1e-5 * scale.max(1.0),
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
