//! ADVENT's discriminator on flex: its five convs (through `super::im2col`) with the
//! LeakyReLUs between them as one recorded operation, and one forward pass that can serve two
//! losses.
//!
//! ADVENT runs the discriminator three times per iteration: on the target prediction for the
//! adversarial term (gradients to the network only), then on the source and again on the same
//! target prediction for the discriminator's own loss (gradients to the discriminator only).
//! The weights do not change in between, so the two target passes compute the same values;
//! [`forward_split`] computes them once and records two operations over the saved activations,
//! one whose backward step reaches only the input and one that reaches only the parameters.

use std::sync::Arc;

use burn::nn::conv::Conv2d;
use burn::tensor::{DType, Tensor};
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::NoCheckpointing;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_backend::TensorMetadata;
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;

use super::conv::{contiguous_f32, from_vec, shape_for, tracked, Tracked, TrackedFlex};
use super::im2col::{self, ConvShape};
use crate::plain::explicit_options;

/// The discriminator's convs: this many layers, each with a weight and a bias.
const LAYERS: usize = 5;

/// Elements per parallel task of the LeakyReLU and its derivative.
const CHUNK: usize = 16 * 1024;

/// Each conv's weight and bias gradients, first conv first.
type ParameterGradients = Vec<(Vec<f32>, Vec<f32>)>;

/// The input, the weights and the biases as tracked flex tensors.
type TrackedParts = (Tracked, Vec<Tracked>, Vec<Tracked>);

/// One conv's shape and parameters.
#[derive(Debug)]
struct Layer {
    shape: ConvShape,
    weight: FlexTensor,
    bias: FlexTensor,
}

/// A forward pass: each conv's input (the previous conv's output after the LeakyReLU), kept
/// for the backward steps.
#[derive(Debug)]
struct Pass {
    layers: Vec<Layer>,
    input: FlexTensor,
    hidden: Vec<Vec<f32>>,
    slope: f32,
}

impl Pass {
    /// Runs the convs on `input`; returns the pass and the logits.
    fn run(layers: Vec<Layer>, input: FlexTensor, slope: f32) -> (Self, FlexTensor) {
        let mut hidden: Vec<Vec<f32>> = Vec::with_capacity(LAYERS - 1);
        let mut logits = None;
        for (i, layer) in layers.iter().enumerate() {
            let x = match hidden.last() {
                Some(h) => h.as_slice(),
                None => input.storage(),
            };
            let mut y = im2col::forward(
                &layer.shape,
                x,
                layer.weight.storage(),
                Some(layer.bias.storage()),
            );
            if i + 1 < layers.len() {
                y.par_chunks_mut(CHUNK).for_each(|chunk| {
                    for v in chunk {
                        if *v <= 0.0 {
                            *v *= slope;
                        }
                    }
                });
                hidden.push(y);
            } else {
                let [ho, wo] = layer.shape.output;
                logits = Some(from_vec(y, [layer.shape.batch, 1, ho, wo]));
            }
        }
        let pass = Self {
            layers,
            input,
            hidden,
            slope,
        };
        (pass, logits.expect("the discriminator has convs"))
    }

    /// The gradients for the logits' gradient `dy`: the input's when `want_input`, and each
    /// conv's weight and bias when `want_parameters`.
    fn backward(
        &self,
        dy: &[f32],
        want_input: bool,
        want_parameters: bool,
    ) -> (Option<Vec<f32>>, ParameterGradients) {
        let mut parameters = Vec::new();
        let mut gradient = dy.to_vec();
        let mut input_gradient = None;
        for (i, layer) in self.layers.iter().enumerate().rev() {
            let x = match i {
                0 => self.input.storage(),
                _ => self.hidden[i - 1].as_slice(),
            };
            let need_input = i > 0 || want_input;
            if !need_input && !want_parameters {
                break;
            }
            if want_parameters {
                let db = im2col::bias_gradient(&layer.shape, &gradient);
                let (dx, dw) = im2col::backward(
                    &layer.shape,
                    x,
                    layer.weight.storage(),
                    &gradient,
                    need_input,
                    true,
                );
                parameters.push((dw.expect("asked for"), db));
                if let Some(dx) = dx {
                    gradient = dx;
                }
            } else {
                let (dx, _) = im2col::backward(
                    &layer.shape,
                    x,
                    layer.weight.storage(),
                    &gradient,
                    true,
                    false,
                );
                gradient = dx.expect("asked for");
            }
            if i == 0 {
                input_gradient = want_input.then_some(gradient);
                break;
            }
            // The previous LeakyReLU: its output is positive exactly where its input was.
            let slope = self.slope;
            gradient
                .par_chunks_mut(CHUNK)
                .zip(self.hidden[i - 1].par_chunks(CHUNK))
                .for_each(|(g, a)| {
                    for (g, &a) in g.iter_mut().zip(a) {
                        if a <= 0.0 {
                            *g *= slope;
                        }
                    }
                });
        }
        parameters.reverse();
        (input_gradient, parameters)
    }

    fn input_dims(&self) -> [usize; 4] {
        self.input.shape().dims()
    }
}

/// The weights then the biases of the five convs, or `None` for another architecture (the
/// trainer's discriminator always has five biased convs).
fn parameters(convs: &[Conv2d]) -> Option<(Vec<Tensor<4>>, Vec<Tensor<1>>)> {
    if convs.len() != LAYERS {
        return None;
    }
    let weights = convs.iter().map(|c| c.weight.val()).collect();
    let biases = convs
        .iter()
        .map(|c| c.bias.as_ref().map(|b| b.val()))
        .collect::<Option<_>>()?;
    Some((weights, biases))
}

/// Runs the convs of `convs` with these parameter values on `input`, or `None` when a conv is
/// grouped, pads `Same` or a tensor is not `f32`.
fn run(
    convs: &[Conv2d],
    slope: f64,
    input: &FlexTensor,
    weights: &[&FlexTensor],
    biases: &[&FlexTensor],
) -> Option<(Pass, FlexTensor)> {
    let is_f32 = |t: &FlexTensor| t.dtype() == DType::F32;
    if !is_f32(input) || !weights.iter().chain(biases).all(|t| is_f32(t)) {
        return None;
    }
    let mut dims: [usize; 4] = input.shape().dims();
    let mut layers = Vec::with_capacity(LAYERS);
    for ((conv, weight), bias) in convs.iter().zip(weights).zip(biases) {
        let options = explicit_options(conv)?;
        if options.groups != 1 || bias.shape().dims::<1>() != [weight.shape().dims::<4>()[0]] {
            return None;
        }
        let shape = shape_for(dims, weight.shape().dims(), &options)?;
        dims = [
            shape.batch,
            shape.channels_out,
            shape.output[0],
            shape.output[1],
        ];
        layers.push(Layer {
            shape,
            weight: contiguous_f32(weight),
            bias: contiguous_f32(bias),
        });
    }
    Some(Pass::run(layers, contiguous_f32(input), slope as f32))
}

/// The discriminator's logits for `x` on flex, as one recorded operation whose backward step
/// computes only the gradients the graph asks for; `None` for another
/// architecture.
pub(crate) fn forward(convs: &[Conv2d], slope: f64, x: &Tensor<4>) -> Option<Tensor<4>> {
    if x.device().is_autodiff() {
        let ((input, weights, biases), pass, logits) = run_tracked(convs, slope, x)?;
        let parents: [&Tracked; 1 + 2 * LAYERS] = std::array::from_fn(|i| match i {
            0 => &input,
            i if i <= LAYERS => &weights[i - 1],
            i => &biases[i - 1 - LAYERS],
        });
        return Some(record(Parents::All, parents, &pass, logits));
    }
    let (weights, biases) = parameters(convs)?;
    let input = x.clone().try_into_primitive::<Flex>().ok()?;
    let weights: Vec<FlexTensor> = weights
        .into_iter()
        .map(|w| w.try_into_primitive::<Flex>().ok())
        .collect::<Option<_>>()?;
    let biases: Vec<FlexTensor> = biases
        .into_iter()
        .map(|b| b.try_into_primitive::<Flex>().ok())
        .collect::<Option<_>>()?;
    let (_, logits) = run(
        convs,
        slope,
        &input,
        &weights.iter().collect::<Vec<_>>(),
        &biases.iter().collect::<Vec<_>>(),
    )?;
    Some(Tensor::from_primitive::<Flex>(logits))
}

/// The logits of `x` twice from one forward pass on flex: the first's backward step reaches
/// only `x`, the second's only the parameters (see the module docs); `None` where [`forward`]
/// would decline or `x` is not on an autodiff device.
pub(crate) fn forward_split(
    convs: &[Conv2d],
    slope: f64,
    x: &Tensor<4>,
) -> Option<(Tensor<4>, Tensor<4>)> {
    if !x.device().is_autodiff() {
        return None;
    }
    let ((input, weights, biases), pass, logits) = run_tracked(convs, slope, x)?;
    let parameters: [&Tracked; 2 * LAYERS] = std::array::from_fn(|i| match i {
        i if i < LAYERS => &weights[i],
        i => &biases[i - LAYERS],
    });
    let for_input = record(Parents::Input, [&input], &pass, logits.clone());
    let for_parameters = record(Parents::Parameters, parameters, &pass, logits);
    Some((for_input, for_parameters))
}

/// The forward pass of `x` (on flex with autodiff) with the tracked input and parameters it
/// read, which become the parents of the operations recorded over it.
fn run_tracked(
    convs: &[Conv2d],
    slope: f64,
    x: &Tensor<4>,
) -> Option<(TrackedParts, Arc<Pass>, FlexTensor)> {
    let (weights, biases) = parameters(convs)?;
    let input = tracked(x)?;
    let weights: Vec<Tracked> = weights.iter().map(tracked).collect::<Option<_>>()?;
    let biases: Vec<Tracked> = biases.iter().map(tracked).collect::<Option<_>>()?;
    let (pass, logits) = run(
        convs,
        slope,
        input.primitive(),
        &weights.iter().map(Tracked::primitive).collect::<Vec<_>>(),
        &biases.iter().map(Tracked::primitive).collect::<Vec<_>>(),
    )?;
    Some(((input, weights, biases), Arc::new(pass), logits))
}

/// Which parents an operation over a [`Pass`] has.
#[derive(Debug, Clone, Copy)]
enum Parents {
    /// The input, then the five weights, then the five biases.
    All,
    /// The input only.
    Input,
    /// The five weights, then the five biases.
    Parameters,
}

#[derive(Debug)]
struct DiscriminatorBackward<const N: usize>(Parents);

impl<const N: usize> Backward<Flex, N> for DiscriminatorBackward<N> {
    type State = Arc<Pass>;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = contiguous_f32(&grads.consume::<Flex>(&ops.node));
        let pass = ops.state;
        let (input_parent, parameter_parents) = match self.0 {
            Parents::All => (ops.parents[0].clone(), &ops.parents[1..]),
            Parents::Input => (ops.parents[0].clone(), &ops.parents[..0]),
            Parents::Parameters => (None, &ops.parents[..]),
        };
        let want_parameters = parameter_parents.iter().any(Option::is_some);
        let (dx, parameters) = pass.backward(dy.storage(), input_parent.is_some(), want_parameters);
        if let (Some(parent), Some(dx)) = (input_parent, dx) {
            grads.register::<Flex>(parent.id, from_vec(dx, pass.input_dims()));
        }
        if !want_parameters {
            return;
        }
        let (weight_parents, bias_parents) = parameter_parents.split_at(LAYERS);
        for (((layer, (dw, db)), weight_parent), bias_parent) in pass
            .layers
            .iter()
            .zip(parameters)
            .zip(weight_parents)
            .zip(bias_parents)
        {
            let shape = &layer.shape;
            if let Some(parent) = weight_parent {
                let [kh, kw] = shape.kernel;
                let dims = [shape.channels_out, shape.channels_in, kh, kw];
                grads.register::<Flex>(parent.id, from_vec(dw, dims));
            }
            if let Some(parent) = bias_parent {
                grads.register::<Flex>(parent.id, from_vec(db, [shape.channels_out]));
            }
        }
    }
}

/// Records an operation over `pass` with `parents` (laid out as `kind` says) and `output`.
fn record<const N: usize>(
    kind: Parents,
    parents: [&Tracked; N],
    pass: &Arc<Pass>,
    output: FlexTensor,
) -> Tensor<4> {
    let nodes = parents.map(Tracked::node);
    let output = match DiscriminatorBackward::<N>(kind)
        .prepare::<NoCheckpointing>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(Arc::clone(pass), output),
        OpsKind::UnTracked(prep) => prep.finish(output),
    };
    Tensor::from_primitive::<TrackedFlex>(output)
}

#[cfg(test)]
mod tests {
    use burn::module::Module;
    use burn::tensor::activation::leaky_relu;
    use burn::tensor::{Device, Distribution, Gradients};

    use burn::nn::conv::Conv2dConfig;
    use burn::nn::PaddingConfig2d;

    use super::*;

    const LEAKY_SLOPE: f64 = 0.2;

    /// ADVENT's discriminator at width 4: five 4x4 stride-2 convs with biases.
    #[derive(Module, Debug)]
    struct Discriminator {
        convs: Vec<Conv2d>,
    }

    impl Discriminator {
        fn forward(&self, x: Tensor<4>) -> Tensor<4> {
            crate::discriminator(&self.convs, LEAKY_SLOPE, x)
        }

        fn forward_split(&self, x: Tensor<4>) -> Option<(Tensor<4>, Tensor<4>)> {
            crate::discriminator_split(&self.convs, LEAKY_SLOPE, x)
        }
    }

    /// Burn's own convs and LeakyReLUs, the reference.
    fn burn_forward(d: &Discriminator, x: Tensor<4>) -> Tensor<4> {
        let last = d.convs.len() - 1;
        d.convs.iter().enumerate().fold(x, |x, (i, conv)| {
            let y = conv.forward(x);
            if i < last {
                leaky_relu(y, LEAKY_SLOPE)
            } else {
                y
            }
        })
    }

    fn assert_close<const D: usize>(got: Tensor<D>, want: Tensor<D>, what: &str) {
        let scale: f32 = want.clone().abs().max().into_scalar();
        let diff: f32 = (got - want).abs().max().into_scalar();
        assert!(
            diff <= 1e-4 * scale.max(1.0),
            "{what}: off by {diff} (scale {scale})"
        );
    }

    /// Each conv's weight and bias gradient, or `None` where there is none.
    fn parameter_grads(d: &Discriminator, grads: &Gradients) -> Vec<Option<Tensor<4>>> {
        d.convs
            .iter()
            .flat_map(|c| {
                let bias = c.bias.as_ref().expect("biased");
                [
                    c.weight.grad(grads),
                    bias.grad(grads).map(|g| g.unsqueeze::<4>()),
                ]
            })
            .collect()
    }

    fn setup(device: &Device) -> (Discriminator, Tensor<4>, Tensor<4>) {
        let channels = [5, 4, 8, 16, 32, 1];
        let convs = channels
            .windows(2)
            .map(|pair| {
                Conv2dConfig::new([pair[0], pair[1]], [4, 4])
                    .with_stride([2, 2])
                    .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                    .init(device)
            })
            .collect();
        let d = Discriminator { convs };
        // 70x38: every conv's output size rounds down, the last has 2x1 pixels.
        let x = Tensor::<4>::random([2, 5, 38, 70], Distribution::Normal(0.0, 1.0), device);
        let upstream = Tensor::<4>::random([2, 1, 1, 2], Distribution::Normal(0.0, 1.0), device);
        (d, x, upstream)
    }

    #[test]
    fn one_operation_matches_burn_in_values_and_all_gradients() {
        let device = Device::flex().autodiff();
        let (d, x, upstream) = setup(&device);
        let x = x.require_grad();
        let ours = forward(&d.convs, LEAKY_SLOPE, &x).expect("runs on flex");
        let reference = burn_forward(&d, x.clone());
        assert_close(ours.clone(), reference.clone(), "logits");
        let grads_ours = (ours * upstream.clone()).sum().backward();
        let grads_ref = (reference * upstream).sum().backward();
        assert_close(
            x.grad(&grads_ours).unwrap(),
            x.grad(&grads_ref).unwrap(),
            "input gradient",
        );
        let (ours, reference) = (
            parameter_grads(&d, &grads_ours),
            parameter_grads(&d, &grads_ref),
        );
        for (i, (got, want)) in ours.into_iter().zip(reference).enumerate() {
            assert_close(got.unwrap(), want.unwrap(), &format!("parameter {i}"));
        }

        // Untracked flex: the same logits.
        let plain = Device::flex();
        let (d_plain, x_plain) = (d.valid(), x.inner());
        let ours = forward(&d_plain.convs, LEAKY_SLOPE, &x_plain).expect("runs on flex");
        assert_close(
            ours,
            burn_forward(&d_plain, x_plain.clone()),
            "untracked logits",
        );
        assert_eq!(x_plain.device(), plain);
    }

    #[test]
    fn split_views_send_each_gradient_to_one_side() {
        let device = Device::flex().autodiff();
        let (d, x, upstream) = setup(&device);
        let x = x.require_grad();
        let (for_input, for_parameters) =
            forward_split(&d.convs, LEAKY_SLOPE, &x).expect("runs on flex");
        let reference = burn_forward(&d, x.clone());
        assert_close(for_input.clone(), reference.clone(), "logits for the input");
        assert_close(
            for_parameters.clone(),
            reference.clone(),
            "logits for the parameters",
        );

        // Different upstream gradients on the two views, in one backward pass, as the trainer
        // combines the adversarial term and the discriminator's loss.
        let other = upstream.clone().cos();
        let grads = (for_input * upstream.clone() + for_parameters * other.clone())
            .sum()
            .backward();
        let grads_input = (burn_forward(&d, x.clone()) * upstream).sum().backward();
        let grads_parameters = (burn_forward(&d, x.clone().detach()) * other)
            .sum()
            .backward();
        assert_close(
            x.grad(&grads).unwrap(),
            x.grad(&grads_input).unwrap(),
            "input gradient from the first view only",
        );
        for (i, (got, want)) in parameter_grads(&d, &grads)
            .into_iter()
            .zip(parameter_grads(&d, &grads_parameters))
            .enumerate()
        {
            assert_close(
                got.unwrap(),
                want.unwrap(),
                &format!("parameter {i} from the second view only"),
            );
        }
    }

    #[test]
    fn the_split_is_declined_where_there_is_nothing_to_split() {
        // Untracked flex: no gradients, so no views; the trainer then runs its own passes.
        let (d, x, _) = setup(&Device::flex());
        assert!(d.forward_split(x.clone()).is_none());
        assert_close(
            d.forward(x.clone()),
            burn_forward(&d, x),
            "the plain forward pass",
        );
    }
}
