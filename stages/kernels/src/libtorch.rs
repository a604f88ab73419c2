//! Fused operations on LibTorch (`device: tch`) whose gradients come from LibTorch's own autograd.
//!
//! Burn 0.22's autodiff differentiates a network op by op with its own generic formulas, and
//! burn-tch hands each step to LibTorch as a separate call. Where PyTorch runs one fused kernel,
//! Burn runs a chain of element-wise ops and reductions, each with its own allocation, and for a
//! convolution it derives the gradients as a transposed convolution and a convolution whose
//! kernel is the whole output-gradient map, which LibTorch runs on slow paths
//! (`slow_conv_transpose2d`, im2col + GEMM with thousands of taps). That was most of the gap
//! between a `tch` training step and PyTorch's (BENCHMARKS.md, "Training step").
//!
//! [`record`] closes that gap for any piece of a network: it runs a closure of LibTorch ops on
//! the inputs' LibTorch tensors, recorded in a LibTorch autograd graph, and registers one Burn
//! backward step that asks LibTorch's autograd engine for the inputs' gradients. LibTorch then
//! runs the same fused forward and backward kernels as PyTorch (oneDNN's convolution backward,
//! `native_batch_norm_backward`, `log_softmax_backward`, ...). The model records each conv with
//! its BatchNorm, ReLU and (for a bottleneck's last conv) shortcut sum as one operation, and the
//! classifier convs, the discriminator's LeakyReLUs and the logits' upsampling on their own;
//! dag-train records its losses the same way.
//!
//! This goes through Burn's documented extension points (`Tensor::try_into_primitive`,
//! `Backward::prepare`, `Tensor::from_primitive`); burn-tch itself keeps LibTorch's autograd out
//! of its own ops.

// burn-tch is marked deprecated upstream; `device: tch` is an optional, benchmark-driven backend
// (see dag-train's device module), and these ops are part of it.
#![allow(deprecated)]

use std::sync::{Arc, Mutex};

use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::nn::conv::Conv2d;
use burn::nn::BatchNorm;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Int, Tensor};
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::NoCheckpointing;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_autodiff::Autodiff;
use burn_tch::{LibTorch, TchTensor};

use crate::ops::{classifier_of, discriminator_of, Kernels, Lift};
use crate::plain::{self, explicit_options, IGNORE_LABEL};

/// The backend of a tracked (training) tensor on `device: tch`.
type TrackedLibTorch = Autodiff<LibTorch, NoCheckpointing>;

/// A float tensor on the training (autodiff) flavour of `device: tch`.
pub type Tracked = burn_backend::tensor::FloatTensor<TrackedLibTorch>;

/// `t` as a tracked LibTorch tensor, or `None` when it lives on another device or outside
/// autodiff. A clone is a reference count; nothing is copied.
pub fn tracked<const D: usize>(t: &Tensor<D>) -> Option<Tracked> {
    if !t.device().is_autodiff() {
        return None;
    }
    t.clone().try_into_primitive::<TrackedLibTorch>().ok()
}

/// The LibTorch tensor of an integer tensor on the training flavour of `device: tch`, or `None`.
pub fn tracked_int<const D: usize>(t: &Tensor<D, Int>) -> Option<tch::Tensor> {
    if !t.device().is_autodiff() {
        return None;
    }
    let int: TchTensor = t.clone().try_into_primitive::<TrackedLibTorch>().ok()?;
    Some(int.tensor.shallow_clone())
}

/// `op(inputs)` as one Burn operation whose gradients LibTorch's autograd computes.
///
/// `op` receives the inputs' LibTorch tensors in order and returns the output, of rank `D`; it
/// may keep by-products (detached) through its captures. When some input takes part in a
/// backward pass, `op` runs on leaves that require a gradient and its graph is kept until Burn's
/// backward pass reaches the output; otherwise it runs without a graph.
pub fn record<const N: usize, const D: usize>(
    inputs: [Tracked; N],
    op: impl FnOnce(&[tch::Tensor]) -> tch::Tensor,
) -> Tensor<D> {
    let nodes = inputs.each_ref().map(Tracked::node);
    let output = match Recorded::<N>
        .prepare::<NoCheckpointing>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let leaves: Vec<tch::Tensor> = inputs
                .iter()
                .map(|input| input.primitive().tensor.detach().set_requires_grad(true))
                .collect();
            let output = op(&leaves);
            let for_burn = TchTensor::new(output.detach());
            // Holding Burn's handles of the inputs and of the output marks their storage shared,
            // so burn-tch will not overwrite them in place while the graph may still read them
            // (LibTorch saves inputs, and outputs such as softmax's, for the backward pass).
            let held = inputs
                .iter()
                .map(|input| input.primitive().clone())
                .chain([for_burn.clone()])
                .collect();
            let graph = Graph {
                output,
                leaves,
                _held: held,
            };
            prep.finish(RecordedGraph(Arc::new(Mutex::new(Some(graph)))), for_burn)
        }
        OpsKind::UnTracked(prep) => {
            let plain: Vec<tch::Tensor> = inputs
                .iter()
                .map(|input| input.primitive().tensor.shallow_clone())
                .collect();
            prep.finish(TchTensor::new(op(&plain)))
        }
    };
    Tensor::from_primitive::<TrackedLibTorch>(output)
}

/// `conv2d(x, weight, bias, options)` with LibTorch's fused kernels, or `None` when the tensors
/// are not tracked LibTorch tensors or the padding is asymmetric, which LibTorch's convolution
/// cannot express.
pub(crate) fn conv2d(
    x: &Tensor<4>,
    weight: &Tensor<4>,
    bias: Option<&Tensor<1>>,
    options: &ConvOptions<2>,
) -> Option<Tensor<4>> {
    let convolve = convolution(options)?;
    let x = tracked(x)?;
    let weight = tracked(weight)?;
    Some(match bias {
        None => record([x, weight], |t| convolve(&t[0], &t[1], None)),
        Some(bias) => record([x, weight, tracked(bias)?], |t| {
            convolve(&t[0], &t[1], Some(&t[2]))
        }),
    })
}

/// LibTorch's `conv2d(x, weight, bias)` with `options`, or `None` for asymmetric padding, which
/// LibTorch's convolution cannot express.
fn convolution(
    options: &ConvOptions<2>,
) -> Option<impl Fn(&tch::Tensor, &tch::Tensor, Option<&tch::Tensor>) -> tch::Tensor> {
    if options.padding.iter().any(|(begin, end)| begin != end) {
        return None;
    }
    let stride = options.stride.map(|s| s as i64);
    let padding = options.padding.map(|(begin, _)| begin as i64);
    let dilation = options.dilation.map(|d| d as i64);
    let groups = options.groups as i64;
    Some(
        move |x: &tch::Tensor, weight: &tch::Tensor, bias: Option<&tch::Tensor>| {
            tch::Tensor::conv2d(x, weight, bias, stride, padding, dilation, groups)
        },
    )
}

/// A chain of convolutions with biases as one recorded operation: `combine` gets the input and
/// a function that applies conv `i` (weight and bias from `t`) to a tensor. `N` is
/// `1 + 2 * convs.len()`: the input, then each conv's weight and bias. `None` when a conv has no
/// bias or asymmetric padding, or a tensor is not tracked.
fn record_convs<const N: usize>(
    x: &Tensor<4>,
    convs: &[Conv2d],
    combine: impl FnOnce(&tch::Tensor, &dyn Fn(usize, &tch::Tensor) -> tch::Tensor) -> tch::Tensor,
) -> Option<Tensor<4>> {
    let mut inputs = vec![tracked(x)?];
    let mut convolutions = Vec::with_capacity(convs.len());
    for conv in convs {
        let bias = conv.bias.as_ref()?;
        convolutions.push(convolution(&explicit_options(conv)?)?);
        inputs.push(tracked(&conv.weight.val())?);
        inputs.push(tracked(&bias.val())?);
    }
    let inputs: [Tracked; N] = inputs.try_into().ok()?;
    Some(record(inputs, |t| {
        let apply =
            |i: usize, x: &tch::Tensor| convolutions[i](x, &t[1 + 2 * i], Some(&t[2 + 2 * i]));
        combine(&t[0], &apply)
    }))
}

/// DeepLabV2's classifier, the sum of four convs of `x`, as one recorded operation (see
/// [`record_convs`]).
pub(crate) fn classifier(convs: &[Conv2d], x: &Tensor<4>) -> Option<Tensor<4>> {
    if convs.len() != 4 {
        return None;
    }
    record_convs::<9>(x, convs, |x, conv| {
        (1..4).fold(conv(0, x), |sum, i| sum + conv(i, x))
    })
}

/// ADVENT's discriminator, five convs with LeakyReLU(`slope`) between them, as one recorded
/// operation (see [`record_convs`]; tch 0.22's `leaky_relu` has no slope argument, so the
/// activation is LibTorch's one-kernel `prelu` with a constant weight).
pub(crate) fn discriminator(convs: &[Conv2d], slope: f64, x: &Tensor<4>) -> Option<Tensor<4>> {
    if convs.len() != 5 {
        return None;
    }
    let slope = tch::Tensor::from_slice(&[slope as f32]);
    record_convs::<11>(x, convs, |x, conv| {
        (1..5).fold(conv(0, x), |y, i| conv(i, &y.prelu(&slope)))
    })
}

/// Bilinear resize with `align_corners = true` to `[h, w]` as LibTorch's `upsample_bilinear2d`
/// (PyTorch's `F.interpolate`), or `None` when `x` is not a tracked LibTorch tensor.
pub(crate) fn upsample_bilinear(x: &Tensor<4>, [h, w]: [usize; 2]) -> Option<Tensor<4>> {
    let size = [h as i64, w as i64];
    Some(record([tracked(x)?], move |t| {
        t[0].upsample_bilinear2d(size, true, None, None)
    }))
}

/// `bn.forward(x)` in training mode (batch statistics, running statistics updated exactly as
/// Burn's `BatchNorm` does), followed by a ReLU when `relu` is set, as LibTorch's fused
/// `native_batch_norm` and `relu`; `None` when `x` is not a tracked LibTorch tensor, `bn` is not
/// in training mode or its affine parameters are trained (the model freezes them).
pub(crate) fn batch_norm_train(bn: &BatchNorm, x: &Tensor<4>, relu: bool) -> Option<Tensor<4>> {
    batch_norm_after(
        [tracked(x)?],
        bn,
        |t| t[0].shallow_clone(),
        move |y, _| maybe_relu(y, relu),
    )
}

/// `bn.forward(conv.forward(x))` (and a ReLU when `relu` is set) in training mode as one
/// recorded operation: LibTorch's convolution and `native_batch_norm` under one backward step.
/// `None` where [`conv2d`] or [`batch_norm_train`] would decline, or when the conv has a bias.
pub(crate) fn conv_batch_norm_train(
    conv: &Conv2d,
    options: &ConvOptions<2>,
    bn: &BatchNorm,
    x: &Tensor<4>,
    relu: bool,
) -> Option<Tensor<4>> {
    if conv.bias.is_some() {
        return None;
    }
    let convolve = convolution(options)?;
    let inputs = [tracked(x)?, tracked(&conv.weight.val())?];
    let before = move |t: &[tch::Tensor]| convolve(&t[0], &t[1], None);
    batch_norm_after(inputs, bn, before, move |y, _| maybe_relu(y, relu))
}

/// `relu(bn.forward(conv.forward(x)) + residual)` in training mode, a bottleneck's last conv
/// and its shortcut, as one recorded operation; `None` where [`conv_batch_norm_train`] would
/// decline or `residual` is not a tracked LibTorch tensor.
pub(crate) fn conv_batch_norm_add_relu_train(
    conv: &Conv2d,
    options: &ConvOptions<2>,
    bn: &BatchNorm,
    x: &Tensor<4>,
    residual: &Tensor<4>,
) -> Option<Tensor<4>> {
    if conv.bias.is_some() {
        return None;
    }
    let convolve = convolution(options)?;
    let inputs = [
        tracked(x)?,
        tracked(&conv.weight.val())?,
        tracked(residual)?,
    ];
    let before = move |t: &[tch::Tensor]| convolve(&t[0], &t[1], None);
    batch_norm_after(inputs, bn, before, |y, t| (y + &t[2]).relu())
}

fn maybe_relu(y: tch::Tensor, relu: bool) -> tch::Tensor {
    if relu {
        y.relu()
    } else {
        y
    }
}

/// Records `after(bn(before(inputs)), inputs)` with `bn` in training mode, and updates `bn`'s
/// running statistics from the batch statistics LibTorch computed.
fn batch_norm_after<const N: usize>(
    inputs: [Tracked; N],
    bn: &BatchNorm,
    before: impl FnOnce(&[tch::Tensor]) -> tch::Tensor,
    after: impl FnOnce(tch::Tensor, &[tch::Tensor]) -> tch::Tensor,
) -> Option<Tensor<4>> {
    let (gamma, beta) = (bn.gamma.val(), bn.beta.val());
    if !bn.training.is_enabled() || gamma.is_require_grad() || beta.is_require_grad() {
        return None;
    }
    let gamma = tracked(&gamma)?.primitive().tensor.shallow_clone();
    let beta = tracked(&beta)?.primitive().tensor.shallow_clone();
    let epsilon = bn.epsilon;
    let mut statistics = None;
    let output = record(inputs, |t| {
        let (y, mean, inv_std) = before(t).native_batch_norm(
            Some(&gamma),
            Some(&beta),
            None::<&tch::Tensor>,
            None,
            true,
            0.0,
            epsilon,
        );
        // Copies: the graph saves both for the backward pass, and Burn may update a tensor it
        // holds alone in place.
        statistics = Some((mean.detach().copy(), inv_std.detach()));
        after(y, t)
    });
    let (mean, inv_std) = statistics?;
    // The biased batch variance, as Burn's `batch_norm_train` returns it: exact to f32 rounding
    // of `variance + epsilon`.
    let variance = inv_std.pow_tensor_scalar(-2.0) - epsilon;
    let as_burn = |t: tch::Tensor| {
        Tensor::<1>::from_primitive::<TrackedLibTorch>(Tracked::new(TchTensor::new(t)))
    };
    let momentum = bn.momentum;
    let running_mean = bn
        .running_mean
        .value_sync()
        .mul_scalar(1.0 - momentum)
        .add(as_burn(mean).mul_scalar(momentum));
    let running_var = bn
        .running_var
        .value_sync()
        .mul_scalar(1.0 - momentum)
        .add(as_burn(variance).mul_scalar(momentum));
    bn.running_mean.update(running_mean.detach());
    bn.running_var.update(running_var.detach());
    Some(output)
}

/// Burn's backward step for a graph recorded by [`record`] with `N` inputs.
#[derive(Debug)]
struct Recorded<const N: usize>;

/// The LibTorch graph of one recorded operation, taken by its backward step.
#[derive(Clone, Debug)]
struct RecordedGraph(Arc<Mutex<Option<Graph>>>);

struct Graph {
    output: tch::Tensor,
    /// The inputs, as LibTorch leaves that require a gradient.
    leaves: Vec<tch::Tensor>,
    _held: Vec<TchTensor>,
}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inputs: Vec<_> = self.leaves.iter().map(tch::Tensor::size).collect();
        write!(f, "Graph({inputs:?} -> {:?})", self.output.size())
    }
}

impl<const N: usize> Backward<LibTorch, N> for Recorded<N> {
    type State = RecordedGraph;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<LibTorch>(&ops.node);
        let graph = ops
            .state
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
            .expect("a recorded operation is differentiated once");
        let wanted: Vec<_> = ops
            .parents
            .iter()
            .zip(&graph.leaves)
            .filter_map(|(parent, leaf)| parent.as_ref().map(|parent| (parent.id, leaf)))
            .collect();
        if wanted.is_empty() {
            return;
        }
        // LibTorch's engine seeds every root with ones, so the root is the dot product of the
        // output with `grad`: its gradient with respect to the output is `grad`. (A dot product
        // only reads both; an element-wise product would write a third map and need a map of
        // ones as its seed.)
        let root = graph.output.flatten(0, -1).dot(&grad.tensor.flatten(0, -1));
        let leaves: Vec<&tch::Tensor> = wanted.iter().map(|(_, leaf)| *leaf).collect();
        let computed = tch::Tensor::run_backward(&[&root], &leaves, false, false);
        for ((id, leaf), gradient) in wanted.into_iter().zip(computed) {
            // LibTorch leaves the gradient of an input the output does not depend on undefined;
            // Burn's own ops would give zeros.
            let gradient = if gradient.defined() {
                gradient
            } else {
                leaf.zeros_like()
            };
            grads.register::<LibTorch>(id, TchTensor::new(gradient));
        }
    }
}

/// Mean cross-entropy over labelled pixels with LibTorch's `log_softmax` and `nll_loss2d`.
fn masked_cross_entropy(logits: &Tensor<4>, labels: &Tensor<3, Int>) -> Option<Tensor<1>> {
    use tch::{Kind, Reduction};
    let labels = tracked_int(labels)?;
    Some(record([tracked(logits)?], move |t| {
        let sum = t[0].log_softmax(1, None).nll_loss2d(
            &labels,
            None::<tch::Tensor>,
            Reduction::Sum,
            IGNORE_LABEL,
        );
        let count = labels.ne(IGNORE_LABEL).sum(Kind::Float).clamp_min(1.0);
        (sum / count).reshape([1])
    }))
}

fn self_information(logits: &Tensor<4>, norm: f64) -> Option<Tensor<4>> {
    let scale = -1.0 / norm;
    Some(record([tracked(logits)?], move |t| {
        let log_p = t[0].log_softmax(1, None);
        (log_p.exp() * &log_p) * scale
    }))
}

fn bce_with_logits(logits: &Tensor<4>, label: f64) -> Option<Tensor<1>> {
    Some(record([tracked(logits)?], move |t| {
        let target = t[0].full_like(label);
        t[0].binary_cross_entropy_with_logits(
            &target,
            None::<tch::Tensor>,
            None,
            tch::Reduction::Mean,
        )
        .reshape([1])
    }))
}

/// Inference on `device: tch` runs Burn's ops through burn-tch unchanged.
impl Kernels for LibTorch {}

/// Training on `device: tch`: each piece of the network and each loss as one operation in
/// LibTorch's own autograd; the default bodies wherever a piece declines (asymmetric padding,
/// convs without bias in a chain, a BatchNorm that does not train).
macro_rules! training_kernels {
    ($($backend:ty),*) => {$(
impl Kernels for $backend {
    fn conv_layer(x: FloatTensor<Self>, conv: &Conv2d) -> FloatTensor<Self> {
        let x = Self::lift(x);
        let fused = explicit_options(conv).and_then(|options| {
            let bias = conv.bias.as_ref().map(|b| b.val());
            conv2d(&x, &conv.weight.val(), bias.as_ref(), &options)
        });
        Self::lower(fused.unwrap_or_else(|| plain::conv(conv, x)))
    }

    fn batch_norm_layer(x: FloatTensor<Self>, bn: &BatchNorm, relu: bool) -> FloatTensor<Self> {
        let x = Self::lift(x);
        let fused = batch_norm_train(bn, &x, relu);
        Self::lower(fused.unwrap_or_else(|| plain::batch_norm(bn, x, relu)))
    }

    fn conv_batch_norm(
        x: FloatTensor<Self>,
        conv: &Conv2d,
        bn: &BatchNorm,
        relu: bool,
    ) -> FloatTensor<Self> {
        let fused = explicit_options(conv).and_then(|options| {
            conv_batch_norm_train(conv, &options, bn, &Self::lift(x.clone()), relu)
        });
        match fused {
            Some(y) => Self::lower(y),
            None => Self::batch_norm_layer(Self::conv_layer(x, conv), bn, relu),
        }
    }

    fn conv_batch_norm_add_relu(
        x: FloatTensor<Self>,
        residual: FloatTensor<Self>,
        conv: &Conv2d,
        bn: &BatchNorm,
    ) -> FloatTensor<Self> {
        let residual = Self::lift::<4>(residual);
        let fused = explicit_options(conv).and_then(|options| {
            let x = Self::lift(x.clone());
            conv_batch_norm_add_relu_train(conv, &options, bn, &x, &residual)
        });
        let y = fused.unwrap_or_else(|| {
            let y = Self::lift::<4>(Self::conv_batch_norm(x, conv, bn, false));
            burn::tensor::activation::relu(y + residual)
        });
        Self::lower(y)
    }

    fn classifier(x: FloatTensor<Self>, convs: &[Conv2d]) -> FloatTensor<Self> {
        match classifier(convs, &Self::lift(x.clone())) {
            Some(y) => Self::lower(y),
            None => classifier_of::<Self>(x, convs),
        }
    }

    fn discriminator(x: FloatTensor<Self>, convs: &[Conv2d], slope: f64) -> FloatTensor<Self> {
        match discriminator(convs, slope, &Self::lift(x.clone())) {
            Some(y) => Self::lower(y),
            None => discriminator_of::<Self>(x, convs, slope),
        }
    }

    fn upsample_differentiable(x: FloatTensor<Self>, size: [usize; 2]) -> FloatTensor<Self> {
        let x = Self::lift(x);
        let fused = upsample_bilinear(&x, size);
        Self::lower(fused.unwrap_or_else(|| plain::upsample_differentiable(x, size)))
    }

    fn masked_cross_entropy(
        logits: FloatTensor<Self>,
        labels: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        let (logits, labels) = (Self::lift(logits), Self::lift_int(labels));
        let loss = masked_cross_entropy(&logits, &labels)
            .unwrap_or_else(|| plain::masked_cross_entropy(logits, labels));
        Self::lower(loss)
    }

    fn self_information(logits: FloatTensor<Self>, norm: f64) -> FloatTensor<Self> {
        let logits = Self::lift(logits);
        let map = self_information(&logits, norm)
            .unwrap_or_else(|| plain::self_information(logits, norm));
        Self::lower(map)
    }

    fn bce_with_logits(logits: FloatTensor<Self>, label: f64) -> FloatTensor<Self> {
        let logits = Self::lift(logits);
        let loss = bce_with_logits(&logits, label)
            .unwrap_or_else(|| plain::bce_with_logits(logits, label));
        Self::lower(loss)
    }
}
    )*};
}

training_kernels!(
    Autodiff<LibTorch, NoCheckpointing>,
    Autodiff<LibTorch, BalancedCheckpointing>
);

#[cfg(test)]
mod tests {
    use burn::module::Module;
    use burn::nn::conv::Conv2dConfig;
    use burn::nn::{BatchNormConfig, PaddingConfig2d};
    use burn::tensor::{Device, Distribution, TensorData};

    use super::*;

    fn training() -> Device {
        Device::libtorch().autodiff()
    }

    /// `module`, with the same weights, on LibTorch for training.
    fn on_training_tch<M: Module>(module: M) -> M {
        module
            .to_device(&Device::libtorch())
            .fork(&training())
            .train()
    }

    /// `values` as a tensor needing a gradient on `device`.
    fn leaf(values: &TensorData, device: &Device) -> Tensor<4> {
        Tensor::<4>::from_data(values.clone(), device).require_grad()
    }

    fn max_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
        let b = Tensor::<D>::from_data(b.into_data(), &a.device());
        (a - b).abs().max().into_scalar()
    }

    /// Value and input gradient of `fused` on LibTorch against `reference` (Burn's own ops) on
    /// flex, under a non-uniform upstream gradient.
    fn check_against_flex(
        case: &str,
        shape: [usize; 4],
        fused: impl Fn(&Tensor<4>) -> Option<Tensor<4>>,
        reference: impl Fn(Tensor<4>) -> Tensor<4>,
    ) {
        let values =
            Tensor::<4>::random(shape, Distribution::Normal(0.0, 2.0), &Device::flex()).into_data();
        let (tch, flex) = (training(), Device::flex().autodiff());
        let (x_tch, x_flex) = (leaf(&values, &tch), leaf(&values, &flex));
        let ours = fused(&x_tch).unwrap_or_else(|| panic!("{case}: no fused path"));
        let theirs = reference(x_flex.clone());
        let upstream = theirs.clone().detach().cos().into_data();
        let grads_ours = (ours.clone() * Tensor::from_data(upstream.clone(), &tch))
            .sum()
            .backward();
        let grads_theirs = (theirs.clone() * Tensor::from_data(upstream, &flex))
            .sum()
            .backward();
        assert!(max_diff(ours, theirs) < 1e-4, "{case}: values");
        let (g_ours, g_theirs) = (
            x_tch.grad(&grads_ours).expect("gradient on tch"),
            x_flex.grad(&grads_theirs).expect("gradient on flex"),
        );
        assert!(max_diff(g_ours, g_theirs) < 1e-4, "{case}: input gradient");
    }

    #[test]
    fn fused_batch_norm_and_conv_batch_norm_match_burn_in_values_gradients_and_running_statistics()
    {
        for relu in [false, true] {
            let bn_flex = BatchNormConfig::new(6).init(&Device::flex());
            // Non-trivial affine parameters, frozen as the model freezes them.
            let bn_flex = BatchNorm {
                gamma: bn_flex
                    .gamma
                    .map(|g| g.mul_scalar(1.5))
                    .set_require_grad(false),
                beta: bn_flex
                    .beta
                    .map(|b| b.add_scalar(0.25))
                    .set_require_grad(false),
                ..bn_flex
            };
            let bn_tch = on_training_tch(bn_flex.clone());
            let bn_flex = bn_flex.fork(&Device::flex().autodiff()).train();
            check_against_flex(
                &format!("batch norm, relu {relu}"),
                [2, 6, 5, 7],
                |x| batch_norm_train(&bn_tch, x, relu),
                |x| {
                    let y = bn_flex.forward(x);
                    if relu {
                        burn::tensor::activation::relu(y)
                    } else {
                        y
                    }
                },
            );
            let conv = Conv2dConfig::new([6, 6], [3, 3])
                .with_dilation([2, 2])
                .with_padding(PaddingConfig2d::Explicit(2, 2, 2, 2))
                .with_bias(false)
                .init(&Device::flex());
            let options = explicit_options(&conv).expect("explicit padding");
            let conv_tch = on_training_tch(conv.clone());
            let conv_flex = conv.fork(&Device::flex().autodiff()).train();
            check_against_flex(
                &format!("conv + batch norm, relu {relu}"),
                [2, 6, 5, 7],
                |x| conv_batch_norm_train(&conv_tch, &options, &bn_tch, x, relu),
                |x| {
                    let y = bn_flex.forward(conv_flex.forward(x));
                    if relu {
                        burn::tensor::activation::relu(y)
                    } else {
                        y
                    }
                },
            );
            // The shortcut is the block's input itself, as in a bottleneck without projection:
            // its gradient arrives through both the conv and the sum.
            check_against_flex(
                "conv + batch norm + shortcut, relu",
                [2, 6, 5, 7],
                |x| conv_batch_norm_add_relu_train(&conv_tch, &options, &bn_tch, x, x),
                |x| {
                    let y = bn_flex.forward(conv_flex.forward(x.clone()));
                    burn::tensor::activation::relu(y + x)
                },
            );
            for (name, ours, theirs) in [
                ("mean", &bn_tch.running_mean, &bn_flex.running_mean),
                ("var", &bn_tch.running_var, &bn_flex.running_var),
            ] {
                let diff = max_diff(ours.value_sync(), theirs.value_sync());
                assert!(diff < 5e-7, "running {name}, relu {relu}: {diff}");
            }
        }
    }

    #[test]
    fn fused_batch_norm_leaves_evaluation_to_burn() {
        let mut bn = BatchNormConfig::new(3).init(&training()).train();
        bn.gamma = bn.gamma.set_require_grad(false);
        bn.beta = bn.beta.set_require_grad(false);
        let x = Tensor::<4>::zeros([1, 3, 2, 2], &training());
        assert!(batch_norm_train(&bn, &x, false).is_some());
        assert!(batch_norm_train(&bn.valid(), &x, false).is_none());
    }

    #[test]
    fn fused_upsample_matches_burn_bilinear_resize() {
        check_against_flex(
            "upsample",
            [1, 3, 5, 7],
            |x| upsample_bilinear(x, [17, 29]),
            |x| plain::upsample_differentiable(x, [17, 29]),
        );
    }

    /// Values and the gradients of the input and of every conv's weight and bias, for a chain
    /// of convs run by `forward` on LibTorch (one recorded op) and on flex (Burn's ops).
    fn check_convs_against_flex<M: Module>(
        case: &str,
        module: M,
        convs: impl Fn(&M) -> &[Conv2d],
        forward: impl Fn(&M, Tensor<4>) -> Tensor<4>,
        shape: [usize; 4],
    ) {
        let values =
            Tensor::<4>::random(shape, Distribution::Normal(0.0, 2.0), &Device::flex()).into_data();
        let mut runs = Vec::new();
        for (device, module) in [
            (training(), on_training_tch(module.clone())),
            (
                Device::flex().autodiff(),
                module.fork(&Device::flex().autodiff()).train(),
            ),
        ] {
            let x = leaf(&values, &device);
            let y = forward(&module, x.clone());
            let upstream = Tensor::<4>::from_data(y.clone().detach().cos().into_data(), &device);
            let grads = (y.clone() * upstream).sum().backward();
            let mut gradients = vec![x.grad(&grads).expect("input gradient").into_data()];
            for conv in convs(&module) {
                let weight = conv.weight.grad(&grads).expect("weight gradient");
                let bias = conv
                    .bias
                    .as_ref()
                    .unwrap()
                    .grad(&grads)
                    .expect("bias gradient");
                gradients.push(weight.into_data());
                gradients.push(bias.into_data());
            }
            runs.push((y.into_data(), gradients));
        }
        let (flex, tch) = (runs.pop().unwrap(), runs.pop().unwrap());
        let close = |a: &TensorData, b: &TensorData, what: &str| {
            let (a, b) = (a.to_vec::<f32>().unwrap(), b.to_vec::<f32>().unwrap());
            let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
            let diff = a
                .iter()
                .zip(&b)
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                diff <= 1e-5 * scale,
                "{case}, {what}: off by {diff} at scale {scale}"
            );
        };
        close(&tch.0, &flex.0, "values");
        for (i, (a, b)) in tch.1.iter().zip(&flex.1).enumerate() {
            close(
                a,
                b,
                &format!("gradient {i} (0: input, then weight and bias per conv)"),
            );
        }
    }

    /// A list of convs with biases, each `kernel`x`kernel` with the given stride and dilation
    /// (and the padding that keeps a stride-1 conv's size).
    #[derive(Module, Debug)]
    struct Convs {
        convs: Vec<Conv2d>,
    }

    fn convs(channels: &[[usize; 2]], kernel: usize, stride: usize, dilations: &[usize]) -> Convs {
        let convs = channels
            .iter()
            .zip(dilations)
            .map(|(&[cin, cout], &d)| {
                let pad = if stride == 1 { d * (kernel - 1) / 2 } else { 1 };
                Conv2dConfig::new([cin, cout], [kernel, kernel])
                    .with_stride([stride, stride])
                    .with_dilation([d, d])
                    .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
                    .init(&Device::flex())
            })
            .collect();
        Convs { convs }
    }

    #[test]
    fn fused_discriminator_matches_burn() {
        let channels = [[3, 4], [4, 8], [8, 16], [16, 32], [32, 1]];
        check_convs_against_flex(
            "discriminator",
            convs(&channels, 4, 2, &[1; 5]),
            |d| &d.convs,
            |d, x| crate::discriminator(&d.convs, 0.2, x),
            [1, 3, 32, 64],
        );
    }

    #[test]
    fn fused_classifier_matches_burn() {
        // DeepLabV2's classifier: four dilated 3x3 convs summed.
        check_convs_against_flex(
            "classifier",
            convs(&[[8, 3]; 4], 3, 1, &[6, 12, 18, 24]),
            |c| &c.convs,
            |c, x| crate::classifier(&c.convs, x),
            [1, 8, 9, 11],
        );
    }
}
