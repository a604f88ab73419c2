//! Convolutions on flex through `super::im2col`, as one Burn operation with its own backward
//! step.
//!
//! Burn 0.22's flex backend runs a conv's forward pass as tiled im2col + GEMM after copying the
//! input to NHWC, and autodiff derives the gradients generically: the input gradient as a
//! transposed convolution and the weight gradient as a convolution whose kernel is the whole
//! output-gradient map, one tiny matrix product per input channel. Here all three are single
//! matrix products per image (BENCHMARKS.md, "im2col convolutions on flex"). This goes through
//! Burn's extension points (`Tensor::try_into_primitive`, `Backward::prepare`), as the LibTorch
//! ops in `libtorch` do.

use burn::nn::conv::Conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{DType, Tensor};
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::NoCheckpointing;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_autodiff::Autodiff;
use burn_backend::TensorMetadata;
use burn_flex::{Flex, FlexTensor, Layout};

use super::im2col::{self, ConvShape};

/// The backend of a tracked (training) tensor on flex.
pub(crate) type TrackedFlex = Autodiff<Flex, NoCheckpointing>;

pub(crate) type Tracked = burn_backend::tensor::FloatTensor<TrackedFlex>;

/// `conv.forward(x)` through im2col (see [`conv2d`]); `None` where that declines or the conv
/// has `Same` padding.
pub(crate) fn conv_layer(conv: &Conv2d, x: &Tensor<4>) -> Option<Tensor<4>> {
    let options = crate::plain::explicit_options(conv)?;
    let bias = conv.bias.as_ref().map(|b| b.val());
    conv2d(x, &conv.weight.val(), bias.as_ref(), &options)
}

/// `conv2d(x, weight, bias, options)` through im2col on flex, tracked or not; `None` for
/// grouped convs or tensors that are not `f32`.
pub(crate) fn conv2d(
    x: &Tensor<4>,
    weight: &Tensor<4>,
    bias: Option<&Tensor<1>>,
    options: &ConvOptions<2>,
) -> Option<Tensor<4>> {
    if options.groups != 1 {
        return None;
    }
    if x.device().is_autodiff() {
        let x = tracked(x)?;
        let weight = tracked(weight)?;
        let bias = match bias {
            Some(bias) => Some(tracked(bias)?),
            None => None,
        };
        let shape = conv_shape(
            x.primitive(),
            weight.primitive(),
            bias.as_ref().map(Tracked::primitive),
            options,
        )?;
        return Some(match bias {
            None => record(shape, [x, weight]),
            Some(bias) => record(shape, [x, weight, bias]),
        });
    }
    let x: FlexTensor = x.clone().try_into_primitive::<Flex>().ok()?;
    let weight: FlexTensor = weight.clone().try_into_primitive::<Flex>().ok()?;
    let bias: Option<FlexTensor> = match bias {
        Some(bias) => Some(bias.clone().try_into_primitive::<Flex>().ok()?),
        None => None,
    };
    let shape = conv_shape(&x, &weight, bias.as_ref(), options)?;
    Some(Tensor::from_primitive::<Flex>(forward(
        &shape,
        &x,
        &weight,
        bias.as_ref(),
    )))
}

pub(crate) fn tracked<const D: usize>(t: &Tensor<D>) -> Option<Tracked> {
    t.clone().try_into_primitive::<TrackedFlex>().ok()
}

/// The conv's shapes, or `None` when a tensor is not `f32`.
fn conv_shape(
    x: &FlexTensor,
    weight: &FlexTensor,
    bias: Option<&FlexTensor>,
    options: &ConvOptions<2>,
) -> Option<ConvShape> {
    let f32 = |t: &FlexTensor| t.dtype() == DType::F32;
    if !f32(x) || !f32(weight) || !bias.is_none_or(f32) {
        return None;
    }
    shape_for(x.shape().dims(), weight.shape().dims(), options)
}

/// The shapes of a conv of a `[N, Cin, H, W]` input with a `[Cout, Cin, kh, kw]` weight, or
/// `None` when the channels disagree or the kernel does not fit.
pub(crate) fn shape_for(
    [batch, channels_in, h, w]: [usize; 4],
    [channels_out, weight_in, kh, kw]: [usize; 4],
    options: &ConvOptions<2>,
) -> Option<ConvShape> {
    if weight_in != channels_in {
        return None;
    }
    let [(top, bottom), (left, right)] = options.padding;
    let out = |len: usize, before: usize, after: usize, kernel: usize, axis: usize| {
        let span = options.dilation[axis] * (kernel - 1) + 1;
        (len + before + after)
            .checked_sub(span)
            .map(|free| free / options.stride[axis] + 1)
    };
    Some(ConvShape {
        batch,
        channels_in,
        input: [h, w],
        channels_out,
        kernel: [kh, kw],
        stride: options.stride,
        padding: [top, left],
        dilation: options.dilation,
        output: [out(h, top, bottom, kh, 0)?, out(w, left, right, kw, 1)?],
    })
}

/// `t` with its own dense storage (a reference count when it already has it), as the
/// `im2col` kernels read `storage()` from its start.
pub(crate) fn contiguous_f32(t: &FlexTensor) -> FlexTensor {
    t.to_contiguous()
}

fn forward(
    shape: &ConvShape,
    x: &FlexTensor,
    weight: &FlexTensor,
    bias: Option<&FlexTensor>,
) -> FlexTensor {
    let (x, weight) = (contiguous_f32(x), contiguous_f32(weight));
    let bias = bias.map(contiguous_f32);
    let y = im2col::forward(
        shape,
        x.storage(),
        weight.storage(),
        bias.as_ref().map(|b| b.storage()),
    );
    let [ho, wo] = shape.output;
    from_vec(y, [shape.batch, shape.channels_out, ho, wo])
}

pub(crate) fn from_vec<const D: usize>(values: Vec<f32>, dims: [usize; D]) -> FlexTensor {
    FlexTensor::new(
        burn_backend::Bytes::from_elems(values),
        Layout::contiguous(dims.into()),
        DType::F32,
    )
}

/// Records the conv of `inputs` (input, weight and, when `N` is 3, bias) as one operation.
fn record<const N: usize>(shape: ConvShape, inputs: [Tracked; N]) -> Tensor<4> {
    let nodes = inputs.each_ref().map(Tracked::node);
    let primitives = inputs.map(|t| t.into_primitive());
    let output = forward(&shape, &primitives[0], &primitives[1], primitives.get(2));
    let output = match ConvBackward::<N>
        .prepare::<NoCheckpointing>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let mut primitives = primitives.into_iter();
            let (x, weight) = (primitives.next(), primitives.next());
            let state = ConvState {
                shape,
                x: x.expect("an input"),
                weight: weight.expect("a weight"),
            };
            prep.finish(state, output)
        }
        OpsKind::UnTracked(prep) => prep.finish(output),
    };
    Tensor::from_primitive::<TrackedFlex>(output)
}

#[derive(Debug)]
struct ConvBackward<const N: usize>;

/// What the backward step reads: the input (for the weight gradient) and the weight (for the
/// input gradient).
#[derive(Clone, Debug)]
struct ConvState {
    shape: ConvShape,
    x: FlexTensor,
    weight: FlexTensor,
}

impl<const N: usize> Backward<Flex, N> for ConvBackward<N> {
    type State = ConvState;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = contiguous_f32(&grads.consume::<Flex>(&ops.node));
        let ConvState { shape, x, weight } = ops.state;
        let (x, weight) = (contiguous_f32(&x), contiguous_f32(&weight));
        let (x_parent, weight_parent) = (&ops.parents[0], &ops.parents[1]);
        let (dx, dw) = im2col::backward(
            &shape,
            x.storage(),
            weight.storage(),
            dy.storage(),
            x_parent.is_some(),
            weight_parent.is_some(),
        );
        let [h, w] = shape.input;
        let [kh, kw] = shape.kernel;
        if let (Some(parent), Some(dx)) = (x_parent, dx) {
            let dims = [shape.batch, shape.channels_in, h, w];
            grads.register::<Flex>(parent.id, from_vec(dx, dims));
        }
        if let (Some(parent), Some(dw)) = (weight_parent, dw) {
            let dims = [shape.channels_out, shape.channels_in, kh, kw];
            grads.register::<Flex>(parent.id, from_vec(dw, dims));
        }
        if let Some(Some(parent)) = ops.parents.get(2) {
            let db = im2col::bias_gradient(&shape, dy.storage());
            grads.register::<Flex>(parent.id, from_vec(db, [shape.channels_out]));
        }
    }
}
