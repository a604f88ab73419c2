//! The ops of dag's networks, losses and optimisers, each declared once in [`Kernels`], a Burn
//! backend extension (`#[backend_extension]`).
//!
//! The trait's default bodies are plain Burn compositions (the `plain` module); they are what
//! the CubeCL backends (WGPU, CUDA) run, and what every other backend falls back to. flex and
//! LibTorch override the ops they have faster kernels for: im2col convolutions, one-pass
//! BatchNorm, fused losses, the discriminator as one operation and an in-place Adam on flex
//! (`flex`), LibTorch's own fused forward and backward kernels on `device: tch` (`libtorch`).
//! Which kernel runs follows from the backend of the tensor: Burn's dispatch picks the
//! implementation, so the networks, the losses and the trainer call the free functions of this
//! crate once each and never ask which device they are on.
//!
//! Every override computes the same values and gradients as the default body up to float
//! rounding; the tests of each kernel check that against Burn's own ops.

use burn::backend::Dispatch;
use burn::nn::conv::Conv2d;
use burn::nn::BatchNorm;
use burn::optim::{AdamState, AdaptiveMomentumState, LearningRate, ModuleOptimizer, Optimizer};
use burn::tensor::{Device, Int, Tensor};

mod flex;
mod impls;
#[cfg(feature = "tch")]
mod libtorch;
mod ops;
mod plain;

pub use ops::{Kernels, Lift};
pub use plain::{explicit_options, AdamSettings, IGNORE_LABEL};

/// `conv.forward(x)` by the fastest kernel of `x`'s backend.
pub fn conv(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as Kernels>::conv_layer(x.into_dispatch(), conv))
}

/// `bn.forward(x)`, then a ReLU when `relu` is set, with Burn's `BatchNorm` semantics (batch
/// statistics and a running-statistics update when the layer trains on an autodiff device).
pub fn batch_norm(bn: &BatchNorm, x: Tensor<4>, relu: bool) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as Kernels>::batch_norm_layer(
        x.into_dispatch(),
        bn,
        relu,
    ))
}

/// `bn(conv(x))`, then a ReLU when `relu` is set.
pub fn conv_batch_norm(conv: &Conv2d, bn: &BatchNorm, x: Tensor<4>, relu: bool) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as Kernels>::conv_batch_norm(
        x.into_dispatch(),
        conv,
        bn,
        relu,
    ))
}

/// `relu(bn(conv(x)) + residual)`.
pub fn conv_batch_norm_add_relu(
    conv: &Conv2d,
    bn: &BatchNorm,
    x: Tensor<4>,
    residual: Tensor<4>,
) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as Kernels>::conv_batch_norm_add_relu(
        x.into_dispatch(),
        residual.into_dispatch(),
        conv,
        bn,
    ))
}

/// The sum of `convs` applied to `x`.
pub fn classifier(convs: &[Conv2d], x: Tensor<4>) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as Kernels>::classifier(x.into_dispatch(), convs))
}

/// `convs` in a chain with LeakyReLU(`slope`) between them.
pub fn discriminator(convs: &[Conv2d], slope: f64, x: Tensor<4>) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as Kernels>::discriminator(
        x.into_dispatch(),
        convs,
        slope,
    ))
}

/// The discriminator's logits of `x` twice from one forward pass, for two losses with different
/// learners: the first passes gradients only to `x` (as if the discriminator were frozen), the
/// second only to the convs (as if `x` were detached). `None` where the backend has no such
/// kernel; the caller then runs the two passes itself.
pub fn discriminator_split(
    convs: &[Conv2d],
    slope: f64,
    x: Tensor<4>,
) -> Option<(Tensor<4>, Tensor<4>)> {
    <Dispatch as Kernels>::discriminator_split(x.into_dispatch(), convs, slope)
        .map(|(a, b)| (Tensor::from_dispatch(a), Tensor::from_dispatch(b)))
}

/// Bilinear resize with `align_corners = true` (as ADVENT) of `[N, C, h, w]` to `[N, C, H, W]`,
/// by the fastest form for inference; a no-op when the size already matches.
pub fn upsample(x: Tensor<4>, [h, w]: [usize; 2]) -> Tensor<4> {
    let [_, _, xh, xw] = x.dims();
    if xh == h && xw == w {
        return x;
    }
    Tensor::from_dispatch(<Dispatch as Kernels>::upsample(x.into_dispatch(), [h, w]))
}

/// Bilinear resize with `align_corners = true` of `[N, C, h, w]` to `[N, C, H, W]`,
/// differentiable on every backend (Burn's CubeCL backends have no backward for
/// `interpolate`'s bilinear mode); the same map as [`upsample`] up to float rounding.
pub fn upsample_differentiable(x: Tensor<4>, [h, w]: [usize; 2]) -> Tensor<4> {
    let [_, _, xh, xw] = x.dims();
    if xh == h && xw == w {
        return x;
    }
    Tensor::from_dispatch(<Dispatch as Kernels>::upsample_differentiable(
        x.into_dispatch(),
        [h, w],
    ))
}

/// Bilinear resize with `align_corners = false` (PyTorch's default, mmseg's `resize`, the
/// DAFormer family's decoder and loss upsampling) of `[N, C, h, w]` to `[N, C, H, W]`,
/// differentiable on every backend; a no-op when the size already matches. Downsampling reads
/// two neighbours per pixel, without antialiasing, as PyTorch does.
pub fn resize(x: Tensor<4>, [h, w]: [usize; 2]) -> Tensor<4> {
    let [_, _, xh, xw] = x.dims();
    if xh == h && xw == w {
        return x;
    }
    plain::resize_by_matrices(x, [h, w], plain::Corners::HalfPixel)
}

/// The per-pixel argmax of `[N, C, H, W]` scores as class indices, one `H x W` map per image;
/// ties go to the lower class.
///
/// # Panics
/// If `C` exceeds 256.
pub fn argmax_classes(scores: Tensor<4>) -> Vec<Vec<u8>> {
    let [n, classes, h, w] = scores.dims();
    assert!(
        classes <= 256,
        "{classes} classes do not fit u8 class indices"
    );
    let indices = <Dispatch as Kernels>::class_argmax(scores.into_dispatch());
    if h * w == 0 {
        return vec![Vec::new(); n];
    }
    indices.chunks_exact(h * w).map(<[u8]>::to_vec).collect()
}

/// Cross-entropy of `logits` `[N, C, H, W]` against `labels` `[N, H, W]`, averaged over the
/// pixels whose label is not [`IGNORE_LABEL`] (PyTorch's `CrossEntropyLoss(ignore_index=255)`).
/// A batch without any labelled pixel gives 0 rather than NaN, as ADVENT's `cross_entropy_2d`.
/// Labels other than 255 must lie in `0..C`.
pub fn masked_cross_entropy(logits: Tensor<4>, labels: Tensor<3, Int>) -> Tensor<1> {
    Tensor::from_dispatch(<Dispatch as Kernels>::masked_cross_entropy(
        logits.into_dispatch(),
        labels.into_dispatch(),
    ))
}

/// `-p ln p / norm` per class and pixel of `logits` `[N, C, H, W]`, `p = softmax(logits)`
/// over the class axis; computed from log-softmax, so it stays finite where a probability
/// underflows.
pub fn self_information(logits: Tensor<4>, norm: f64) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as Kernels>::self_information(
        logits.into_dispatch(),
        norm,
    ))
}

/// Binary cross-entropy with logits against a constant `label`, averaged over every element.
pub fn bce_with_logits(logits: Tensor<4>, label: f64) -> Tensor<1> {
    Tensor::from_dispatch(<Dispatch as Kernels>::bce_with_logits(
        logits.into_dispatch(),
        label,
    ))
}

/// Runs `work` (a training step or any other long chain of ops on `device`) where the kernels
/// of `device` run fastest: on flex inside rayon's pool.
///
/// On flex, a training step makes hundreds of parallel calls (convs, BatchNorms, elementwise
/// ops). Made from a rayon worker they fork in place; made from another thread each is injected
/// into the pool and waited for, which cost about 10% of a step (BENCHMARKS.md, "Each flex
/// training step runs on a rayon worker"). The results do not depend on which worker runs it.
pub fn run_on_kernel_threads<R: Send>(device: &Device, work: impl FnOnce() -> R + Send) -> R {
    if device.clone().inner() == Device::flex() {
        rayon::scope(|_| work())
    } else {
        work()
    }
}

/// Adam without weight decay or AMSGrad as a Burn optimiser whose step is
/// [`Kernels::adam_step`]: Burn's own `Adam` update on every backend, in place on flex where
/// the optimiser holds the only reference (like PyTorch's Adam). The same state record as
/// Burn's `Adam`, so checkpoints stay interchangeable.
#[derive(Debug, Clone, Copy)]
pub struct Adam(pub AdamSettings);

impl Adam {
    /// The optimiser as a module optimiser.
    pub fn init(self) -> ModuleOptimizer {
        ModuleOptimizer::from(self)
    }
}

impl Optimizer for Adam {
    type State<const D: usize> = AdamState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        let dims = tensor.dims();
        let count = dims.iter().product::<usize>();
        // Zero moments at time 0 give Burn's first step exactly (0 * beta + x == x).
        let (time, moment_1, moment_2) = match state {
            Some(s) => (
                s.momentum.time,
                s.momentum.moment_1.reshape([count]),
                s.momentum.moment_2.reshape([count]),
            ),
            None => {
                let zeros = || Tensor::<1>::zeros([count], &tensor.device());
                (0, zeros(), zeros())
            }
        };
        let (param, moment_1, moment_2) = <Dispatch as Kernels>::adam_step(
            tensor.reshape([count]).into_dispatch(),
            grad.reshape([count]).into_dispatch(),
            moment_1.into_dispatch(),
            moment_2.into_dispatch(),
            time,
            lr,
            self.0,
        );
        let restore = |t| Tensor::<1>::from_dispatch(t).reshape(dims);
        let momentum = AdaptiveMomentumState::new(time + 1, restore(moment_1), restore(moment_2));
        (restore(param), Some(AdamState::new(momentum)))
    }

    fn to_device<const D: usize>(mut state: Self::State<D>, device: &Device) -> Self::State<D> {
        state.momentum = state.momentum.to_device(device);
        state
    }
}
