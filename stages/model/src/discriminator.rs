//! ADVENT's fully-convolutional patch discriminator.

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::PaddingConfig2d;
use burn::tensor::{Device, Tensor, TensorData};
use rand_core::RngCore;
use serde::{Deserialize, Serialize};

use crate::ModelError;

/// Slope of the LeakyReLU between the discriminator's convs.
pub const LEAKY_SLOPE: f64 = 0.2;

/// Smallest height and width of a map the discriminator accepts: each of its five 4x4 stride-2
/// convs halves the size (rounding down), and the last needs at least one output pixel.
pub const MIN_INPUT_SIZE: usize = 32;

/// Architecture of a [`Discriminator`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscriminatorConfig {
    /// Input channels: the number of classes of the segmentation model (its input is the
    /// C-channel weighted self-information map).
    pub classes: usize,
    /// Channels of the first conv; the next ones are 2x, 4x, 8x, then 1. ADVENT: 64.
    #[serde(default = "default_ndf")]
    pub ndf: usize,
}

fn default_ndf() -> usize {
    64
}

impl DiscriminatorConfig {
    /// The ADVENT discriminator (`ndf = 64`) for `classes` input channels.
    pub fn new(classes: usize) -> Self {
        Self {
            classes,
            ndf: default_ndf(),
        }
    }

    /// Sets the width of the first conv.
    pub fn with_ndf(mut self, ndf: usize) -> Self {
        self.ndf = ndf;
        self
    }

    /// Builds the discriminator on `device` with weights and biases drawn from `rng` on the
    /// host, as PyTorch initialises a conv (uniform in `±1/sqrt(fan_in)`, which Burn's default
    /// Kaiming-uniform init also gives), first conv first, each conv's weight before its bias.
    ///
    /// Drawn here rather than by the device's random generator, so that one seed gives one
    /// discriminator on every backend and whatever other thread draws at the same time.
    pub fn init(
        &self,
        rng: &mut dyn RngCore,
        device: &Device,
    ) -> Result<Discriminator, ModelError> {
        if self.classes == 0 || self.ndf == 0 {
            return Err(ModelError::InvalidConfig(format!(
                "discriminator needs classes >= 1 and ndf >= 1, got classes {} ndf {}",
                self.classes, self.ndf
            )));
        }
        let n = self.ndf;
        let widths = [self.classes, n, 2 * n, 4 * n, 8 * n, 1];
        let convs = widths
            .windows(2)
            .map(|w| {
                let [cin, cout] = [w[0], w[1]];
                let mut conv = Conv2dConfig::new([cin, cout], [KERNEL, KERNEL])
                    .with_stride([2, 2])
                    .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                    .init(device);
                let bound = 1.0 / ((cin * KERNEL * KERNEL) as f32).sqrt();
                let weight = uniform(rng, cout * cin * KERNEL * KERNEL, bound);
                conv.weight =
                    Param::from_data(TensorData::new(weight, [cout, cin, KERNEL, KERNEL]), device);
                conv.bias = Some(Param::from_data(
                    TensorData::new(uniform(rng, cout, bound), [cout]),
                    device,
                ));
                conv
            })
            .collect();
        Ok(Discriminator { convs })
    }
}

/// Side of every conv kernel of the discriminator.
const KERNEL: usize = 4;

/// `count` values uniform in `[-bound, bound)`, 24 random bits each.
fn uniform(rng: &mut dyn RngCore, count: usize, bound: f32) -> Vec<f32> {
    (0..count)
        .map(|_| {
            let unit = (rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32;
            (2.0 * unit - 1.0) * bound
        })
        .collect()
}

/// Five 4x4 stride-2 convs (ndf, 2ndf, 4ndf, 8ndf, 1 channels) with LeakyReLU(0.2) between
/// them; the output is a patch map of domain logits at 1/32 of the input size.
#[derive(Module, Debug)]
pub struct Discriminator {
    /// The five convs, in order.
    pub convs: Vec<Conv2d>,
}

impl Discriminator {
    /// Domain logits `[N, 1, H/32, W/32]` of a `[N, classes, H, W]` map; `H` and `W` must be at
    /// least [`MIN_INPUT_SIZE`].
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        dag_kernels::discriminator(&self.convs, LEAKY_SLOPE, x)
    }

    /// The logits of `x` twice from one forward pass, for two losses with different learners:
    /// the first passes gradients only to `x` (as if the discriminator were frozen), the second
    /// only to the discriminator (as if `x` were detached). `None` where the backend has no
    /// such kernel (all but flex in training); the caller then runs the two passes itself.
    ///
    /// ADVENT feeds the target prediction to the discriminator twice per iteration with the
    /// same weights: for the adversarial term, which trains the segmentation network, and for
    /// the discriminator's own loss. Both compute the same values.
    pub fn forward_split(&self, x: Tensor<4>) -> Option<(Tensor<4>, Tensor<4>)> {
        dag_kernels::discriminator_split(&self.convs, LEAKY_SLOPE, x)
    }
}
