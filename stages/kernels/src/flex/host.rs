//! Element-wise and per-pixel ops on flex written as plain loops over host memory, each one Burn
//! operation with its own backward step.
//!
//! Burn composes a softmax over the class axis of an `[N, C, H, W]` map from a max, a
//! subtraction, an exponential, a sum and a division, each its own pass with its own buffer
//! (and autodiff node) and most of them strided along `C`. ADVENT's losses run several of those
//! per training step on full-resolution logit maps; one fused pass per pixel is an order of
//! magnitude faster (BENCHMARKS.md, "Fused losses on flex"). This goes through Burn's extension
//! points (`Tensor::try_into_primitive`, `Backward::prepare`), as `libtorch` does for LibTorch.

use std::sync::{Arc, Mutex};

use burn::tensor::{DType, Int, Tensor};
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::NoCheckpointing;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_autodiff::Autodiff;
use burn_backend::TensorMetadata;
use burn_flex::{Flex, FlexTensor, Layout};

/// The backend of a tracked (training) tensor on flex.
type TrackedFlex = Autodiff<Flex, NoCheckpointing>;

type Tracked = burn_backend::tensor::FloatTensor<TrackedFlex>;

/// A dense, row-major `f32` array on the host, shared without copying.
#[derive(Clone, Debug)]
pub struct HostTensor(FlexTensor);

impl HostTensor {
    /// The values, row-major.
    pub fn values(&self) -> &[f32] {
        self.0.storage()
    }

    /// The dimensions.
    pub fn dims(&self) -> Vec<usize> {
        self.0.shape().to_vec()
    }

    fn dense(t: &FlexTensor) -> Option<Self> {
        (t.dtype() == DType::F32).then(|| Self(t.to_contiguous()))
    }
}

/// The backward step of an op recorded by [`unary`]: from the gradient of the output (dense,
/// the output's dimensions) to the gradient of the input (dense, the input's dimensions).
pub type HostBackward = Box<dyn FnOnce(&[f32]) -> Vec<f32> + Send>;

/// What an op's forward pass returns: its output and, when asked for, its backward step.
pub struct HostOutput<const E: usize> {
    /// The output values, row-major.
    pub values: Vec<f32>,
    /// The output dimensions.
    pub dims: [usize; E],
    /// The backward step; `None` when the op was not asked for one.
    pub backward: Option<HostBackward>,
}

/// Runs `op` on `x`'s values when `x` is an `f32` tensor on flex (tracked or not), as one Burn
/// operation; `None` for another dtype.
///
/// `op` receives the input and whether a backward pass may need this op's gradient; when it
/// does, `op` must return a backward step, which Burn's backward pass calls at most once.
pub fn unary<const D: usize, const E: usize>(
    x: &Tensor<D>,
    op: impl FnOnce(&HostTensor, bool) -> HostOutput<E>,
) -> Option<Tensor<E>> {
    if !x.device().is_autodiff() {
        let plain: FlexTensor = x.clone().try_into_primitive::<Flex>().ok()?;
        let out = op(&HostTensor::dense(&plain)?, false);
        return Some(Tensor::from_primitive::<Flex>(from_vec(
            out.values, out.dims,
        )));
    }
    let tracked: Tracked = x.clone().try_into_primitive::<TrackedFlex>().ok()?;
    let input = HostTensor::dense(tracked.primitive())?;
    let output = match HostOp
        .prepare::<NoCheckpointing>([tracked.node()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let out = op(&input, true);
            let backward = out
                .backward
                .expect("a tracked host op returns its backward step");
            let state = HostOpState {
                input_dims: input.dims(),
                backward: Arc::new(Mutex::new(Some(backward))),
            };
            prep.finish(state, from_vec(out.values, out.dims))
        }
        OpsKind::UnTracked(prep) => {
            let out = op(&input, false);
            prep.finish(from_vec(out.values, out.dims))
        }
    };
    Some(Tensor::from_primitive::<TrackedFlex>(output))
}

/// The values of an integer tensor on flex (tracked or not) as `i64`; `None` on any other
/// device or for an integer type flex does not use for indices.
pub fn int_values<const D: usize>(t: &Tensor<D, Int>) -> Option<Vec<i64>> {
    let primitive: FlexTensor = if t.device().is_autodiff() {
        t.clone().try_into_primitive::<TrackedFlex>().ok()?
    } else {
        t.clone().try_into_primitive::<Flex>().ok()?
    };
    let dense = primitive.to_contiguous();
    Some(match dense.dtype() {
        DType::I64 => dense.storage::<i64>().to_vec(),
        DType::I32 => dense.storage::<i32>().iter().map(|&v| v as i64).collect(),
        DType::I16 => dense.storage::<i16>().iter().map(|&v| v as i64).collect(),
        DType::I8 => dense.storage::<i8>().iter().map(|&v| v as i64).collect(),
        DType::U8 => dense.storage::<u8>().iter().map(|&v| v as i64).collect(),
        _ => return None,
    })
}

fn from_vec<const D: usize>(values: Vec<f32>, dims: [usize; D]) -> FlexTensor {
    assert_eq!(
        values.len(),
        dims.iter().product::<usize>(),
        "a host op's output matches its dimensions"
    );
    FlexTensor::new(
        burn_backend::Bytes::from_elems(values),
        Layout::contiguous(dims.into()),
        DType::F32,
    )
}

#[derive(Debug)]
struct HostOp;

/// The recorded backward step. Burn clones an op's state when it is shared; the step itself
/// runs once, when the backward pass reaches the op.
#[derive(Clone)]
struct HostOpState {
    input_dims: Vec<usize>,
    backward: Arc<Mutex<Option<HostBackward>>>,
}

impl std::fmt::Debug for HostOpState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostOpState")
            .field("input_dims", &self.input_dims)
            .finish_non_exhaustive()
    }
}

impl Backward<Flex, 1> for HostOp {
    type State = HostOpState;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let upstream = grads.consume::<Flex>(&ops.node).to_contiguous();
        let Some(parent) = &ops.parents[0] else {
            return;
        };
        let backward = ops
            .state
            .backward
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
            .expect("a host op's backward step runs once");
        let gradient = backward(upstream.storage());
        let dims = ops.state.input_dims;
        assert_eq!(
            gradient.len(),
            dims.iter().product::<usize>(),
            "a host op's gradient matches its input"
        );
        let tensor = FlexTensor::new(
            burn_backend::Bytes::from_elems(gradient),
            Layout::contiguous(dims.into()),
            DType::F32,
        );
        grads.register::<Flex>(parent.id, tensor);
    }
}

/// Whether `t` is a plain (untracked) `f32` tensor on flex: what an optimiser sees of a
/// parameter, its gradient and its state there.
pub fn is_plain_f32<const D: usize>(t: &Tensor<D>) -> bool {
    !t.device().is_autodiff() && t.dtype() == DType::F32
}

/// The values of a plain `f32` tensor on flex (see [`is_plain_f32`]); `None` for any other.
pub fn host_values<const D: usize>(t: &Tensor<D>) -> Option<HostTensor> {
    if !is_plain_f32(t) {
        return None;
    }
    HostTensor::dense(&t.clone().try_into_primitive::<Flex>().ok()?)
}

/// A plain `f32` tensor on flex that this handle alone holds, for updating in place.
#[derive(Debug)]
pub struct WritableTensor<const D: usize>(FlexTensor);

impl<const D: usize> WritableTensor<D> {
    /// `t`'s own dense storage when nothing else holds it, else a dense copy (so a tensor still
    /// held elsewhere is never written to); `None` unless `t` is a plain `f32` tensor on flex.
    pub fn new(t: Tensor<D>) -> Option<Self> {
        if !is_plain_f32(&t) {
            return None;
        }
        let primitive: FlexTensor = t.try_into_primitive::<Flex>().ok()?;
        let mut dense = primitive.to_contiguous();
        // A dense tensor's `to_contiguous` is the same storage: let go of the second handle.
        drop(primitive);
        if dense.try_storage_mut::<f32>().is_none() {
            let dims = dense.shape().to_vec();
            dense = from_vec_dims(dense.storage::<f32>().to_vec(), dims);
        }
        Some(Self(dense))
    }

    /// The values, row-major, for writing.
    pub fn values_mut(&mut self) -> &mut [f32] {
        self.0
            .try_storage_mut::<f32>()
            .expect("a writable tensor holds its storage alone")
    }

    /// The tensor, on flex.
    pub fn into_tensor(self) -> Tensor<D> {
        Tensor::from_primitive::<Flex>(self.0)
    }
}

fn from_vec_dims(values: Vec<f32>, dims: Vec<usize>) -> FlexTensor {
    FlexTensor::new(
        burn_backend::Bytes::from_elems(values),
        Layout::contiguous(dims.into()),
        DType::F32,
    )
}

/// The per-pixel argmax of `[N, C, H, W]` scores (see [`crate::argmax_classes`]) as a scan on
/// the host of one copy of the scores: on flex `argmax(1)` and its `i64` result took 6 ms for a
/// 16-class 320x160 map, the scan under 1 ms.
pub(crate) fn class_argmax(scores: Tensor<4>) -> Vec<u8> {
    let [n, classes, h, w] = scores.dims();
    let pixels = h * w;
    let values: Vec<f32> = scores
        .into_data()
        .try_into_vec_as::<f32>()
        .expect("float scores");
    if pixels == 0 || classes == 0 {
        return vec![0; n * pixels];
    }
    values
        .chunks_exact(classes * pixels)
        .take(n)
        .flat_map(|image| {
            let mut best: Vec<f32> = image[..pixels].to_vec();
            let mut class = vec![0u8; pixels];
            // Class-major rows keep the scan sequential in memory.
            for (c, row) in image.chunks_exact(pixels).enumerate().skip(1) {
                for ((b, k), &v) in best.iter_mut().zip(class.iter_mut()).zip(row) {
                    if v > *b {
                        *b = v;
                        *k = c as u8;
                    }
                }
            }
            class
        })
        .collect()
}
