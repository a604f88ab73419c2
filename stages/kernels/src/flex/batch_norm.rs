//! Frozen-affine BatchNorm (+ ReLU) on flex as one pass per channel, forward and backward
//! (`super::host::unary`).
//!
//! Burn 0.22's flex backend computes BatchNorm from generic tensor ops: in training a swap of
//! the batch and channel axes, two means, a subtraction, a product and the normalisation's
//! broadcasts, and about ten more passes in the backward step; the ReLU after it is another
//! pass each way. Here the statistics take one pass over the input, the normalisation (and
//! ReLU) another, and the input gradient two. Every value is computed in the same order
//! whatever the thread count.

use burn::nn::BatchNorm;
use burn::tensor::{Tensor, TensorData};
use rayon::prelude::*;

use super::host::{host_values, unary, HostBackward, HostOutput, HostTensor};

/// `bn(x)` then, if `then_relu`, a ReLU, with Burn's `BatchNorm::forward` semantics: batch
/// statistics and a running-statistics update on an autodiff device when the layer trains,
/// else the running statistics (forward only). `None` (leave it to Burn) when gamma
/// or beta would need a gradient, or for a layer that does not train on an autodiff device.
pub(crate) fn batch_norm(bn: &BatchNorm, x: &Tensor<4>, then_relu: bool) -> Option<Tensor<4>> {
    if bn.gamma.is_require_grad() || bn.beta.is_require_grad() {
        return None;
    }
    let gamma = plain_values(bn.gamma.val())?;
    let beta = plain_values(bn.beta.val())?;
    let epsilon = bn.epsilon;
    if x.device().is_autodiff() && bn.training.is_enabled() {
        let mut stats = None;
        let y = unary(x, |x, wants_backward| {
            let (mean, variance) = channel_statistics(x);
            let inv_std = inverse_std(&variance, epsilon);
            let values = normalise(x, &mean, &inv_std, &gamma, &beta, then_relu);
            let backward = wants_backward.then(|| {
                let (x, mean, inv_std) = (x.clone(), mean.clone(), inv_std.clone());
                Box::new(move |dy: &[f32]| {
                    input_gradient(&x, &mean, &inv_std, &gamma, &beta, then_relu, dy)
                }) as HostBackward
            });
            stats = Some((mean, variance));
            HostOutput {
                values,
                dims: dims4(x),
                backward,
            }
        })?;
        let (mean, variance) = stats.expect("the forward pass ran");
        update_running(bn, mean, variance, &x.device());
        return Some(y);
    }
    if x.device().is_autodiff() {
        // A layer that does not train, inside a backward pass: rare enough to leave to Burn.
        return None;
    }
    let mean = plain_values(bn.running_mean.value())?;
    let variance = plain_values(bn.running_var.value())?;
    let inv_std = inverse_std(&variance, epsilon);
    unary(x, |x, _| HostOutput {
        values: normalise(x, &mean, &inv_std, &gamma, &beta, then_relu),
        dims: dims4(x),
        backward: None,
    })
}

fn inverse_std(variance: &[f32], epsilon: f64) -> Vec<f32> {
    variance
        .iter()
        .map(|v| 1.0 / (f64::from(*v) + epsilon).sqrt() as f32)
        .collect()
}

/// The values of a (possibly tracked) parameter or state tensor on flex.
fn plain_values(t: Tensor<1>) -> Option<Vec<f32>> {
    let plain = if t.device().is_autodiff() {
        t.inner()
    } else {
        t
    };
    Some(host_values(&plain)?.values().to_vec())
}

/// `running <- running * (1 - momentum) + batch * momentum`, as Burn's `BatchNorm`.
fn update_running(
    bn: &BatchNorm,
    mean: Vec<f32>,
    variance: Vec<f32>,
    device: &burn::tensor::Device,
) {
    let channels = mean.len();
    let momentum = bn.momentum;
    for (state, batch) in [(&bn.running_mean, mean), (&bn.running_var, variance)] {
        let batch = Tensor::<1>::from_data(TensorData::new(batch, [channels]), device);
        let running = state.value_sync().to_device(device);
        let updated = running
            .mul_scalar(1.0 - momentum)
            .add(batch.mul_scalar(momentum));
        state.update(updated.detach());
        // Burn's `RunningState` keeps one pending value per thread and merges (averages) them
        // only when a thread that has one asks for the value. A training step may run on a
        // different rayon worker each iteration, so merge now, on the thread that wrote it:
        // the state then never depends on which thread ran which step.
        let _ = state.value_sync();
    }
}

fn dims4(x: &HostTensor) -> [usize; 4] {
    let d = x.dims();
    [d[0], d[1], d[2], d[3]]
}

/// `[N, C, P]` of an `[N, C, H, W]` map.
fn image_dims(x: &HostTensor) -> [usize; 3] {
    let [n, c, h, w] = dims4(x);
    [n, c, h * w]
}

/// The `P` values of channel `c` of image `n`.
fn plane(values: &[f32], [_, channels, p]: [usize; 3], n: usize, c: usize) -> &[f32] {
    &values[(n * channels + c) * p..][..p]
}

/// Per-channel mean and biased variance over batch and pixels, accumulated in `f64`.
fn channel_statistics(x: &HostTensor) -> (Vec<f32>, Vec<f32>) {
    let shape @ [n, c, p] = image_dims(x);
    let values = x.values();
    let count = (n * p).max(1) as f64;
    (0..c)
        .into_par_iter()
        .map(|channel| {
            let planes = || (0..n).map(|image| plane(values, shape, image, channel));
            let sum: f64 = planes()
                .map(|row| row.iter().map(|&v| f64::from(v)).sum::<f64>())
                .sum();
            let mean = sum / count;
            let squares: f64 = planes()
                .map(|row| {
                    row.iter()
                        .map(|&v| (f64::from(v) - mean).powi(2))
                        .sum::<f64>()
                })
                .sum();
            (mean as f32, (squares / count) as f32)
        })
        .unzip()
}

/// `(x - mean) * inv_std * gamma + beta` per channel, then ReLU if asked.
fn normalise(
    x: &HostTensor,
    mean: &[f32],
    inv_std: &[f32],
    gamma: &[f32],
    beta: &[f32],
    then_relu: bool,
) -> Vec<f32> {
    let [_, c, p] = image_dims(x);
    let mut out = vec![0.0f32; x.values().len()];
    if p == 0 || c == 0 {
        return out;
    }
    out.par_chunks_mut(p)
        .zip(x.values().par_chunks(p))
        .enumerate()
        .for_each(|(row, (out, x))| {
            let channel = row % c;
            let scale = inv_std[channel] * gamma[channel];
            let shift = beta[channel] - mean[channel] * scale;
            for (o, &v) in out.iter_mut().zip(x) {
                let y = v * scale + shift;
                // Not `f32::max`, which would turn a NaN into 0: NaNs must reach the loss,
                // where the training loop reports them.
                *o = if then_relu && y < 0.0 { 0.0 } else { y };
            }
        });
    out
}

/// The upstream gradient where the output was not clamped by the ReLU, else 0.
fn passed(y: f32, dy: f32, then_relu: bool) -> f32 {
    if then_relu && y <= 0.0 {
        0.0
    } else {
        dy
    }
}

/// The input gradient with batch statistics: per channel, with `g` the upstream gradient past
/// the ReLU and `xhat = (x - mean) * inv_std`,
/// `dx = gamma * inv_std * (g - mean(g) - xhat * mean(g * xhat))`.
fn input_gradient(
    x: &HostTensor,
    mean: &[f32],
    inv_std: &[f32],
    gamma: &[f32],
    beta: &[f32],
    then_relu: bool,
    dy: &[f32],
) -> Vec<f32> {
    let shape @ [n, c, p] = image_dims(x);
    let values = x.values();
    let count = (n * p).max(1) as f64;
    // Per channel: mean(g) and mean(g * xhat).
    let sums: Vec<(f32, f32)> = (0..c)
        .into_par_iter()
        .map(|channel| {
            let (m, s) = (mean[channel], inv_std[channel]);
            let scale = s * gamma[channel];
            let shift = beta[channel] - m * scale;
            let (mut g_sum, mut gx_sum) = (0.0f64, 0.0f64);
            for image in 0..n {
                let x = plane(values, shape, image, channel);
                let dy = plane(dy, shape, image, channel);
                for (&v, &d) in x.iter().zip(dy) {
                    let g = passed(v * scale + shift, d, then_relu);
                    g_sum += f64::from(g);
                    gx_sum += f64::from(g * ((v - m) * s));
                }
            }
            ((g_sum / count) as f32, (gx_sum / count) as f32)
        })
        .collect();
    let mut dx = vec![0.0f32; values.len()];
    if p == 0 || c == 0 {
        return dx;
    }
    dx.par_chunks_mut(p)
        .zip(values.par_chunks(p))
        .zip(dy.par_chunks(p))
        .enumerate()
        .for_each(|(row, ((dx, x), dy))| {
            let channel = row % c;
            let (m, s) = (mean[channel], inv_std[channel]);
            let scale = s * gamma[channel];
            let shift = beta[channel] - m * scale;
            let (g_mean, gx_mean) = sums[channel];
            for ((o, &v), &d) in dx.iter_mut().zip(x).zip(dy) {
                let g = passed(v * scale + shift, d, then_relu);
                *o = scale * (g - g_mean - (v - m) * s * gx_mean);
            }
        });
    dx
}

#[cfg(test)]
mod tests {
    use burn::nn::BatchNormConfig;
    use burn::tensor::activation::relu;
    use burn::tensor::{Device, Distribution, Tolerance};

    use super::*;

    /// A frozen-affine BatchNorm with distinct gammas and betas (each call a separate layer
    /// with its own running statistics).
    fn frozen(channels: usize, device: &Device) -> BatchNorm {
        let mut bn = BatchNormConfig::new(channels).init(device);
        let ramp = |start: f32, step: f32| {
            let values: Vec<f32> = (0..channels).map(|i| start + step * i as f32).collect();
            Tensor::<1>::from_data(TensorData::new(values, [channels]), device)
        };
        bn.gamma = burn::module::Param::from_tensor(ramp(0.5, 0.2)).set_require_grad(false);
        bn.beta = burn::module::Param::from_tensor(ramp(-0.4, 0.15)).set_require_grad(false);
        bn
    }

    fn burn_reference(bn: &BatchNorm, x: Tensor<4>, then_relu: bool) -> Tensor<4> {
        let y = bn.forward(x);
        if then_relu {
            relu(y)
        } else {
            y
        }
    }

    /// Output, input gradient and running statistics after two steps against Burn's
    /// `BatchNorm` (+ `relu`) in training, for batch 1 and 2, with and without ReLU.
    #[test]
    fn training_matches_burn_batch_norm() {
        let device = Device::flex().autodiff();
        for (batch, then_relu) in [(1, true), (2, false), (2, true)] {
            let (fused, reference) = (frozen(6, &device), frozen(6, &device));
            let dims = [batch, 6, 5, 7];
            for _ in 0..2 {
                let x0 = Tensor::<4>::random(dims, Distribution::Normal(0.3, 2.0), &device);
                let upstream = Tensor::<4>::random(dims, Distribution::Normal(0.0, 1.0), &device);
                let run = |y: Tensor<4>, x: Tensor<4>| {
                    let grads = (y.clone() * upstream.clone()).sum().backward();
                    (
                        y.into_data(),
                        x.grad(&grads).expect("a gradient").into_data(),
                    )
                };
                let x = x0.clone().detach().require_grad();
                let y = batch_norm(&fused, &x, then_relu).expect("the fused op runs on flex");
                let (got, got_grad) = run(y, x);
                let x = x0.detach().require_grad();
                let (want, want_grad) = run(burn_reference(&reference, x.clone(), then_relu), x);
                let tolerance = Tolerance::absolute(2e-5);
                got.assert_approx_eq::<f32>(&want, tolerance);
                got_grad.assert_approx_eq::<f32>(&want_grad, tolerance);
                for (a, b) in [
                    (&fused.running_mean, &reference.running_mean),
                    (&fused.running_var, &reference.running_var),
                ] {
                    // `value()` of Burn's own layer lags one update behind until synced.
                    a.value_sync()
                        .into_data()
                        .assert_approx_eq::<f32>(&b.value_sync().into_data(), tolerance);
                }
            }
            let moved: f32 = (fused.running_var.value() - 1.0).abs().sum().into_scalar();
            assert!(moved > 0.0, "the running variance was updated");
        }
    }

    /// The trainer runs each step on whichever rayon worker is free; the running statistics
    /// must come out the same as when one thread runs every step.
    #[test]
    fn running_statistics_do_not_depend_on_the_thread() {
        let device = Device::flex().autodiff();
        let (hopping, fixed) = (frozen(3, &device), frozen(3, &device));
        let inputs: Vec<Tensor<4>> = (0..3)
            .map(|_| Tensor::random([2, 3, 4, 4], Distribution::Normal(0.5, 2.0), &device))
            .collect();
        for x in &inputs {
            std::thread::scope(|s| {
                s.spawn(|| batch_norm(&hopping, x, false).expect("the fused op runs on flex"));
            });
            batch_norm(&fixed, x, false).expect("the fused op runs on flex");
        }
        for (a, b) in [
            (&hopping.running_mean, &fixed.running_mean),
            (&hopping.running_var, &fixed.running_var),
        ] {
            assert_eq!(a.value().into_data(), b.value_sync().into_data());
        }
    }

    #[test]
    fn nan_inputs_stay_nan_through_the_relu() {
        // The training loop aborts on a NaN loss; a ReLU that mapped NaN to 0 would hide it.
        let device = Device::flex().autodiff();
        let bn = frozen(2, &device);
        let mut values = vec![0.5f32; 2 * 3 * 3];
        values[4] = f32::NAN;
        let x = Tensor::<4>::from_data(TensorData::new(values, [1, 2, 3, 3]), &device);
        let y = batch_norm(&bn, &x, true).expect("the fused op runs on flex");
        let nans: Vec<bool> = y.is_nan().into_data().iter::<bool>().step_by(9).collect();
        assert_eq!(
            nans,
            [true, false],
            "the NaN's channel is NaN, the other is not"
        );
    }

    #[test]
    fn plain_flex_uses_running_statistics() {
        let device = Device::flex();
        let bn = frozen(3, &device);
        bn.running_mean
            .update(Tensor::<1>::from_floats([0.5, -1.0, 2.0], &device));
        bn.running_var
            .update(Tensor::<1>::from_floats([0.25, 4.0, 1.5], &device));
        let x = Tensor::<4>::random([2, 3, 4, 4], Distribution::Normal(0.0, 1.0), &device);
        for then_relu in [false, true] {
            let got = batch_norm(&bn, &x, then_relu).expect("the fused op runs on flex");
            got.into_data().assert_approx_eq::<f32>(
                &burn_reference(&bn, x.clone(), then_relu).into_data(),
                Tolerance::absolute(1e-6),
            );
        }
    }
}
