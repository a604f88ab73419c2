//! Convolutions on LibTorch (`device: tch`) whose gradients come from LibTorch's own autograd.
//!
//! Burn 0.22's autodiff derives a conv's gradients with its generic `conv2d_x_backward` (a
//! transposed convolution) and `conv2d_weight_backward` (a convolution whose kernel is the whole
//! output-gradient map). burn-tch hands both to LibTorch as ordinary convolutions, which LibTorch
//! runs on slow paths (`slow_conv_transpose2d`, and im2col + GEMM with a kernel of thousands of
//! taps): most of the gap between a `tch` training step and PyTorch's (BENCHMARKS.md). PyTorch's
//! autograd calls oneDNN's fused backward kernels instead, through `convolution_backward`, which
//! tch 0.22 does not expose. So this op records the convolution in a LibTorch autograd graph
//! during the forward pass and, in Burn's backward pass, asks LibTorch's autograd engine for the
//! gradients: the same kernels PyTorch uses.
//!
//! This goes through Burn's documented extension points (`Tensor::try_into_primitive`,
//! `Backward::prepare`); burn-tch itself keeps LibTorch's autograd out of its own ops.

// burn-tch is marked deprecated upstream; `device: tch` is an optional, benchmark-driven backend
// (see the device module), and this op is part of it.
#![allow(deprecated)]

use std::sync::{Arc, Mutex};

use burn::tensor::ops::ConvOptions;
use burn::tensor::Tensor;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::NoCheckpointing;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_autodiff::Autodiff;
use burn_tch::{LibTorch, TchTensor};

/// The backend of a tracked (training) tensor on `device: tch`.
type TrackedLibTorch = Autodiff<LibTorch, NoCheckpointing>;

/// `conv2d(x, weight, bias, options)` with LibTorch's fused backward kernels, or `None` (and
/// nothing consumed) when the tensors are not tracked LibTorch tensors or the padding is
/// asymmetric, which LibTorch's convolution cannot express.
pub(crate) fn conv2d(
    x: &Tensor<4>,
    weight: &Tensor<4>,
    bias: Option<&Tensor<1>>,
    options: &ConvOptions<2>,
) -> Option<Tensor<4>> {
    if options.padding.iter().any(|(begin, end)| begin != end) {
        return None;
    }
    // Clones are reference counts; a failed downcast drops only the clone.
    let x = x.clone().try_into_primitive::<TrackedLibTorch>().ok()?;
    let weight = weight
        .clone()
        .try_into_primitive::<TrackedLibTorch>()
        .ok()?;
    let geometry = Geometry::from(options);
    let output = match bias {
        None => match LibTorchConv2d::<2>
            .prepare::<NoCheckpointing>([x.node(), weight.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (output, recorded) = geometry.record([x.primitive(), weight.primitive()]);
                prep.finish(recorded, output)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(geometry.run(x.primitive(), weight.primitive(), None))
            }
        },
        Some(bias) => {
            let bias = bias.clone().try_into_primitive::<TrackedLibTorch>().ok()?;
            match LibTorchConv2d::<3>
                .prepare::<NoCheckpointing>([x.node(), weight.node(), bias.node()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    let (output, recorded) =
                        geometry.record([x.primitive(), weight.primitive(), bias.primitive()]);
                    prep.finish(recorded, output)
                }
                OpsKind::UnTracked(prep) => prep.finish(geometry.run(
                    x.primitive(),
                    weight.primitive(),
                    Some(bias.primitive()),
                )),
            }
        }
    };
    Some(Tensor::from_primitive::<TrackedLibTorch>(output))
}

/// A convolution's stride, symmetric padding, dilation and groups, as LibTorch takes them.
#[derive(Clone, Copy)]
struct Geometry {
    stride: [i64; 2],
    padding: [i64; 2],
    dilation: [i64; 2],
    groups: i64,
}

impl From<&ConvOptions<2>> for Geometry {
    fn from(options: &ConvOptions<2>) -> Self {
        Self {
            stride: options.stride.map(|s| s as i64),
            padding: options.padding.map(|(begin, _)| begin as i64),
            dilation: options.dilation.map(|d| d as i64),
            groups: options.groups as i64,
        }
    }
}

impl Geometry {
    fn conv(
        &self,
        x: &tch::Tensor,
        weight: &tch::Tensor,
        bias: Option<&tch::Tensor>,
    ) -> tch::Tensor {
        tch::Tensor::conv2d(
            x,
            weight,
            bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )
    }

    /// The convolution without a graph (no input needs a gradient).
    fn run(&self, x: &TchTensor, weight: &TchTensor, bias: Option<&TchTensor>) -> TchTensor {
        TchTensor::new(self.conv(&x.tensor, &weight.tensor, bias.map(|b| &b.tensor)))
    }

    /// The convolution of `inputs` (x, weight and maybe bias), recorded in a LibTorch graph for
    /// [`LibTorchConv2d::backward`]; returns the output, detached from that graph, for Burn.
    fn record<const N: usize>(&self, inputs: [&TchTensor; N]) -> (TchTensor, RecordedConv) {
        let leaves: Vec<tch::Tensor> = inputs
            .iter()
            .map(|input| input.tensor.detach().set_requires_grad(true))
            .collect();
        let output = self.conv(&leaves[0], &leaves[1], leaves.get(2));
        let detached = TchTensor::new(output.detach());
        let recorded = RecordedConv(Arc::new(Mutex::new(Some(Graph {
            output,
            leaves,
            // Holding Burn's handles marks their storage shared, so burn-tch will not reuse it
            // in place while the graph still reads it.
            _inputs: inputs.map(TchTensor::clone).to_vec(),
        }))));
        (detached, recorded)
    }
}

/// Burn's backward step for a convolution recorded by [`Geometry::record`]; `N` is 2 without
/// bias and 3 with one.
#[derive(Debug)]
struct LibTorchConv2d<const N: usize>;

/// The LibTorch graph of one convolution, taken by its backward step.
#[derive(Clone, Debug)]
struct RecordedConv(Arc<Mutex<Option<Graph>>>);

struct Graph {
    output: tch::Tensor,
    /// x, weight and maybe bias, as LibTorch leaves that require a gradient.
    leaves: Vec<tch::Tensor>,
    _inputs: Vec<TchTensor>,
}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Graph({:?} -> {:?})",
            self.leaves[0].size(),
            self.output.size()
        )
    }
}

impl<const N: usize> Backward<LibTorch, N> for LibTorchConv2d<N> {
    type State = RecordedConv;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<LibTorch>(&ops.node);
        let graph = ops
            .state
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
            .expect("a recorded convolution is differentiated once");
        let wanted: Vec<_> = ops
            .parents
            .iter()
            .zip(&graph.leaves)
            .filter_map(|(parent, leaf)| parent.as_ref().map(|parent| (parent.id, leaf)))
            .collect();
        if wanted.is_empty() {
            return;
        }
        // LibTorch's engine seeds every root with ones, so the root is output * grad: its
        // gradient with respect to the output is `grad`.
        let root = &graph.output * &grad.tensor;
        let leaves: Vec<&tch::Tensor> = wanted.iter().map(|(_, leaf)| *leaf).collect();
        let computed = tch::Tensor::run_backward(&[&root], &leaves, false, false);
        for ((id, _), gradient) in wanted.into_iter().zip(computed) {
            grads.register::<LibTorch>(id, TchTensor::new(gradient));
        }
    }
}
