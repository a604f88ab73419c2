//! [`Lift`] for every backend dag runs on, and [`Kernels`] for flex and the CubeCL backends
//! (LibTorch's live in `libtorch`).

use burn::backend::autodiff::checkpoint::strategy::{BalancedCheckpointing, NoCheckpointing};
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Autodiff, Dispatch, Flex};
use burn::nn::conv::Conv2d;
use burn::nn::BatchNorm;
use burn::tensor::{Int, Tensor};

use crate::flex;
use crate::ops::{discriminator_of, Kernels, Lift};
use crate::plain::{self, AdamSettings};

impl Lift for Dispatch {
    fn lift<const D: usize>(t: FloatTensor<Self>) -> Tensor<D> {
        Tensor::from_dispatch(t)
    }

    fn lift_int<const D: usize>(t: IntTensor<Self>) -> Tensor<D, Int> {
        Tensor::from_dispatch(t)
    }

    fn lower<const D: usize>(t: Tensor<D>) -> FloatTensor<Self> {
        t.into_dispatch()
    }
}

/// `Lift` for a backend and its autodiff flavours (one per checkpointing strategy: Burn's
/// conversions exist for each, not for a generic one).
macro_rules! lift {
    ($backend:ty) => {
        lift!(@impl $backend);
        lift!(@impl Autodiff<$backend, NoCheckpointing>);
        lift!(@impl Autodiff<$backend, BalancedCheckpointing>);
    };
    (@impl $backend:ty) => {
        impl Lift for $backend {
            fn lift<const D: usize>(t: FloatTensor<Self>) -> Tensor<D> {
                Tensor::from_primitive::<Self>(t)
            }

            fn lift_int<const D: usize>(t: IntTensor<Self>) -> Tensor<D, Int> {
                Tensor::from_primitive::<Self>(t)
            }

            fn lower<const D: usize>(t: Tensor<D>) -> FloatTensor<Self> {
                t.try_into_primitive::<Self>()
                    .expect("an op's output lives on the backend of its input")
            }
        }
    };
}

lift!(Flex);
#[cfg(any(feature = "wgpu", feature = "cuda"))]
lift!(burn::backend::Cube);
/// burn-tch is marked deprecated upstream; `device: tch` is optional (see `libtorch`).
#[cfg(feature = "tch")]
#[allow(deprecated)]
mod libtorch_lift {
    use super::*;

    lift!(burn::backend::LibTorch);
}

/// The CubeCL backends (WGPU, CUDA) run the plain compositions, which Burn fuses on its own.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
impl Kernels for burn::backend::Cube {}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
impl Kernels for Autodiff<burn::backend::Cube, NoCheckpointing> {}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
impl Kernels for Autodiff<burn::backend::Cube, BalancedCheckpointing> {}

/// The flex kernels shared by plain and tracked flex tensors (each decides inside which of
/// the two it got), then the ops of one flavour only.
macro_rules! flex_kernels {
    ($backend:ty { $($only:item)* }) => {
        impl Kernels for $backend {
            fn conv_layer(x: FloatTensor<Self>, conv: &Conv2d) -> FloatTensor<Self> {
                let x = Self::lift(x);
                let y = flex::conv::conv_layer(conv, &x).unwrap_or_else(|| plain::conv(conv, x));
                Self::lower(y)
            }

            fn batch_norm_layer(
                x: FloatTensor<Self>,
                bn: &BatchNorm,
                relu: bool,
            ) -> FloatTensor<Self> {
                let x = Self::lift(x);
                let y = flex::batch_norm::batch_norm(bn, &x, relu)
                    .unwrap_or_else(|| plain::batch_norm(bn, x, relu));
                Self::lower(y)
            }

            fn discriminator(
                x: FloatTensor<Self>,
                convs: &[Conv2d],
                slope: f64,
            ) -> FloatTensor<Self> {
                match flex::discriminator::forward(convs, slope, &Self::lift(x.clone())) {
                    Some(y) => Self::lower(y),
                    None => discriminator_of::<Self>(x, convs, slope),
                }
            }

            /// flex's bilinear `interpolate` took 15 ms for one 16-class 20x10 -> 320x160
            /// map, the two matrix products 4 ms (BENCHMARKS.md).
            fn upsample(x: FloatTensor<Self>, size: [usize; 2]) -> FloatTensor<Self> {
                Self::lower(plain::upsample_differentiable(Self::lift(x), size))
            }

            fn class_argmax(scores: FloatTensor<Self>) -> Vec<u8> {
                flex::host::class_argmax(Self::lift(scores))
            }

            fn masked_cross_entropy(
                logits: FloatTensor<Self>,
                labels: IntTensor<Self>,
            ) -> FloatTensor<Self> {
                let (logits, labels) = (Self::lift(logits), Self::lift_int(labels));
                let loss = flex::losses::masked_cross_entropy(&logits, &labels)
                    .unwrap_or_else(|| plain::masked_cross_entropy(logits, labels));
                Self::lower(loss)
            }

            fn self_information(logits: FloatTensor<Self>, norm: f64) -> FloatTensor<Self> {
                let logits = Self::lift(logits);
                let map = flex::losses::self_information(&logits, norm)
                    .unwrap_or_else(|| plain::self_information(logits, norm));
                Self::lower(map)
            }

            $($only)*
        }
    };
}

flex_kernels!(Flex {
    /// An optimiser sees parameters, gradients and moments outside autodiff: only plain flex
    /// tensors have the in-place kernel.
    fn adam_step(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moment_1: FloatTensor<Self>,
        moment_2: FloatTensor<Self>,
        time: usize,
        lr: f64,
        settings: AdamSettings,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let moments = [Self::lift(moment_1), Self::lift(moment_2)];
        let (param, grad) = (Self::lift(param), Self::lift(grad));
        let (param, m1, m2) = if flex::adam::takes(&param, &grad, &moments) {
            flex::adam::step(settings, lr, param, grad, moments, time)
        } else {
            plain::adam_step(settings, lr, param, grad, moments, time)
        };
        (Self::lower(param), Self::lower(m1), Self::lower(m2))
    }
});

/// The tracked flavours' own op.
macro_rules! tracked_flex_kernels {
    ($($backend:ty),*) => {$(
        flex_kernels!($backend {
            fn discriminator_split(
                x: FloatTensor<Self>,
                convs: &[Conv2d],
                slope: f64,
            ) -> Option<(FloatTensor<Self>, FloatTensor<Self>)> {
                let (for_input, for_parameters) =
                    flex::discriminator::forward_split(convs, slope, &Self::lift(x))?;
                Some((Self::lower(for_input), Self::lower(for_parameters)))
            }
        });
    )*};
}

tracked_flex_kernels!(
    Autodiff<Flex, NoCheckpointing>,
    Autodiff<Flex, BalancedCheckpointing>
);
