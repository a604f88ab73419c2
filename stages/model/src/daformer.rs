//! DAFormer's network: a [`MixTransformer`] encoder and DAFormer's context-aware fusion decoder
//! (`daformer_sepaspp_mitb5`), or the lighter SegFormer-style decoder that fuses with one 1x1
//! conv (`daformer_conv1_mitb5`).
//!
//! The decoder embeds each of the encoder's four levels to `embed_dim` channels with a linear
//! layer, resizes them to stride 4 (bilinear, `align_corners=False`), concatenates them and
//! fuses them; then channel dropout and a 1x1 classifier give logits at stride 4. Module names
//! follow DAFormer's state dicts (`decode_head.embed_layers.{i}`, `fuse_layer.aspp_modules.{j}`,
//! `fuse_layer.bottleneck`, `conv_seg`).

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Initializer, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::{Device, Tensor, TensorData};
use dag_kernels::{conv_batch_norm, resize};
use serde::{Deserialize, Serialize};

use crate::conv::conv_forward;
use crate::mit::{MitConfig, MixTransformer};
use crate::noise::Noise;
use crate::ModelError;

/// The dilations of DAFormer's separable ASPP fusion.
pub const ASPP_DILATIONS: [usize; 4] = [1, 6, 12, 18];

/// How the decoder fuses the concatenated, embedded levels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum Fusion {
    /// DAFormer's context-aware fusion: parallel branches (a 1x1 conv for dilation 1, a
    /// depthwise-separable 3x3 conv for the others, each with BatchNorm and ReLU), concatenated
    /// and reduced by a 3x3 bottleneck conv with BatchNorm and ReLU.
    SepAspp {
        /// Dilation of each branch.
        dilations: Vec<usize>,
    },
    /// SegFormer's MLP decoder as DAFormer builds it (`daformer_conv1_mitb5`): one 1x1 conv
    /// with BatchNorm and ReLU.
    Conv1x1,
}

impl Fusion {
    /// DAFormer's default fusion.
    pub fn daformer() -> Self {
        Self::SepAspp {
            dilations: ASPP_DILATIONS.to_vec(),
        }
    }
}

/// Architecture of a [`DaFormer`]; serialised in `model.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaFormerConfig {
    /// The encoder.
    pub encoder: MitConfig,
    /// Channels each level is embedded to (256 in DAFormer).
    #[serde(default = "default_width")]
    pub embed_dim: usize,
    /// Channels of the fusion's branches and output (256 in DAFormer).
    #[serde(default = "default_width")]
    pub channels: usize,
    /// The fusion of the embedded levels.
    #[serde(default = "Fusion::daformer")]
    pub fusion: Fusion,
    /// Probability of zeroing a channel of the fused map before the classifier (`Dropout2d`).
    #[serde(default = "default_dropout")]
    pub dropout: f64,
    /// Output classes.
    pub classes: usize,
}

fn default_width() -> usize {
    256
}

fn default_dropout() -> f64 {
    0.1
}

impl DaFormerConfig {
    /// DAFormer's network on `encoder` (`mit_b0` ... `mit_b5`; the papers use `mit_b5`) for
    /// `classes` classes.
    pub fn new(encoder: MitConfig, classes: usize) -> Self {
        Self {
            encoder,
            embed_dim: default_width(),
            channels: default_width(),
            fusion: Fusion::daformer(),
            dropout: default_dropout(),
            classes,
        }
    }

    /// The decoder's embedding and fusion widths times `width` (at least one channel); the
    /// encoder is scaled on its own ([`MitConfig::with_width`]).
    pub fn with_width(mut self, width: f64) -> Self {
        let scaled = |c: usize| ((c as f64 * width).round() as usize).max(1);
        self.embed_dim = scaled(self.embed_dim);
        self.channels = scaled(self.channels);
        self
    }

    /// Checks the config before anything is allocated.
    pub fn validate(&self) -> Result<(), ModelError> {
        self.encoder.validate()?;
        if self.embed_dim == 0 || self.channels == 0 || self.classes == 0 {
            return Err(ModelError::InvalidConfig(format!(
                "the decoder needs at least one channel and one class, got embed_dim {}, \
                 channels {}, classes {}",
                self.embed_dim, self.channels, self.classes
            )));
        }
        if let Fusion::SepAspp { dilations } = &self.fusion {
            if dilations.is_empty() || dilations.contains(&0) {
                return Err(ModelError::InvalidConfig(format!(
                    "the ASPP fusion needs at least one branch, each with a dilation of 1 or \
                     more, got {dilations:?}"
                )));
            }
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(ModelError::InvalidConfig(format!(
                "dropout must be in [0, 1), got {}",
                self.dropout
            )));
        }
        Ok(())
    }

    /// Builds the network with random weights as the reference: the encoder as
    /// [`MitConfig::init`], the decoder's linear layers PyTorch's default, its convs mmcv's
    /// `kaiming_init` (normal, fan-out), the classifier N(0, 0.01) as mmseg's `BaseDecodeHead`.
    pub fn init(&self, device: &Device) -> Result<DaFormer, ModelError> {
        self.validate()?;
        Ok(DaFormer {
            arch: self.clone(),
            backbone: self.encoder.init(device)?,
            decode_head: self.init_head(device),
        })
    }

    /// The decoder alone, initialised as [`DaFormerConfig::init`] does (HRDA's scale attention
    /// is a second decoder on the same encoder).
    pub(crate) fn init_head(&self, device: &Device) -> DaFormerHead {
        let levels = 4 * self.embed_dim;
        let fuse_layer = match &self.fusion {
            Fusion::SepAspp { dilations } => {
                let aspp_modules = dilations
                    .iter()
                    .map(|&d| {
                        if d == 1 {
                            AsppBranch::Pointwise(ConvBn::new(
                                [levels, self.channels],
                                1,
                                1,
                                1,
                                device,
                            ))
                        } else {
                            AsppBranch::Separable(SeparableConv {
                                depthwise_conv: ConvBn::new([levels, levels], 3, d, levels, device),
                                pointwise_conv: ConvBn::new(
                                    [levels, self.channels],
                                    1,
                                    1,
                                    1,
                                    device,
                                ),
                            })
                        }
                    })
                    .collect();
                FuseLayer::SepAspp(SepAspp {
                    aspp_modules,
                    bottleneck: ConvBn::new(
                        [dilations.len() * self.channels, self.channels],
                        3,
                        1,
                        1,
                        device,
                    ),
                })
            }
            Fusion::Conv1x1 => {
                FuseLayer::Conv(ConvBn::new([levels, self.channels], 1, 1, 1, device))
            }
        };
        // PyTorch's default `nn.Linear` initialisation (uniform within 1/sqrt(fan_in), weight
        // and bias), which DAFormer's `MLP` keeps; Burn's default is the same.
        let embed_layers = self
            .encoder
            .embed_dims
            .iter()
            .map(|&c| LinearConfig::new(c, self.embed_dim).init(device))
            .collect();
        let mut conv_seg = Conv2dConfig::new([self.channels, self.classes], [1, 1])
            .with_initializer(Initializer::Normal {
                mean: 0.0,
                std: 0.01,
            })
            .init(device);
        conv_seg.bias = Some(Param::from_tensor(Tensor::zeros([self.classes], device)));
        DaFormerHead {
            embed_layers,
            fuse_layer,
            conv_seg,
            dropout: self.dropout,
        }
    }
}

/// A MiT encoder with DAFormer's decoder; logits at stride 4.
#[derive(Module, Debug)]
pub struct DaFormer {
    /// The architecture it was built with (not part of its record).
    #[module(skip)]
    pub arch: DaFormerConfig,
    /// The MiT encoder; the only part ImageNet weights initialise.
    pub backbone: MixTransformer,
    /// The decoder.
    pub decode_head: DaFormerHead,
}

/// DAFormer's decoder.
#[derive(Module, Debug)]
pub struct DaFormerHead {
    /// Per-level linear embeddings (`embed_layers.{i}.proj`).
    pub embed_layers: Vec<Linear>,
    /// The fusion.
    pub fuse_layer: FuseLayer,
    /// The 1x1 classifier.
    pub conv_seg: Conv2d,
    #[module(skip)]
    dropout: f64,
}

/// The decoder's fusion module.
#[derive(Module, Debug)]
pub enum FuseLayer {
    /// [`Fusion::SepAspp`].
    SepAspp(SepAspp),
    /// [`Fusion::Conv1x1`].
    Conv(ConvBn),
}

/// DAFormer's separable ASPP (`ASPPWrapper(sep=True, pool=False)`).
#[derive(Module, Debug)]
pub struct SepAspp {
    /// The parallel branches.
    pub aspp_modules: Vec<AsppBranch>,
    /// 3x3 conv over the concatenated branches.
    pub bottleneck: ConvBn,
}

/// One branch of the separable ASPP.
// A handful of branches per network, built once: the size difference costs nothing, and
// Burn's `Module` derive has no `Box`.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum AsppBranch {
    /// Dilation 1: a 1x1 conv.
    Pointwise(ConvBn),
    /// Dilation > 1: depthwise 3x3 then pointwise 1x1.
    Separable(SeparableConv),
}

/// mmcv's `DepthwiseSeparableConvModule`.
#[derive(Module, Debug)]
pub struct SeparableConv {
    /// Depthwise 3x3 with the branch's dilation.
    pub depthwise_conv: ConvBn,
    /// Pointwise 1x1.
    pub pointwise_conv: ConvBn,
}

/// mmcv's `ConvModule`: a conv without bias, BatchNorm, ReLU.
#[derive(Module, Debug)]
pub struct ConvBn {
    /// The conv.
    pub conv: Conv2d,
    /// Its BatchNorm (trainable, eps 1e-5, momentum 0.1).
    pub bn: BatchNorm,
}

impl ConvBn {
    /// A `kernel` x `kernel` conv with padding `dilation * (kernel / 2)` in `groups` groups.
    fn new(
        [cin, cout]: [usize; 2],
        kernel: usize,
        dilation: usize,
        groups: usize,
        device: &Device,
    ) -> Self {
        let pad = dilation * (kernel / 2);
        // PyTorch's fan-out, which mmcv's `kaiming_init` uses, ignores groups (MiT's own
        // initialisation divides by them).
        let fan_out = kernel * kernel * cout;
        Self {
            conv: Conv2dConfig::new([cin, cout], [kernel, kernel])
                .with_dilation([dilation, dilation])
                .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
                .with_groups(groups)
                .with_bias(false)
                .with_initializer(Initializer::Normal {
                    mean: 0.0,
                    std: (2.0 / fan_out as f64).sqrt(),
                })
                .init(device),
            bn: BatchNormConfig::new(cout).init(device),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        conv_batch_norm(&self.conv, &self.bn, x, true)
    }
}

impl DaFormerHead {
    /// Logits at the size of the first (stride-4) level; channel dropout draws from `noise`
    /// when it has a source.
    pub fn forward(&self, features: &[Tensor<4>], noise: &mut Noise<'_>) -> Tensor<4> {
        self.classify(self.fuse(features), noise)
    }

    /// The fused map before dropout and classifier, `[N, channels, H/4, W/4]`.
    pub fn fuse(&self, features: &[Tensor<4>]) -> Tensor<4> {
        let [_, _, h, w] = features[0].dims();
        let embedded: Vec<Tensor<4>> = self
            .embed_layers
            .iter()
            .zip(features)
            .map(|(embed, f)| {
                let [n, c, fh, fw] = f.dims();
                let tokens = f.clone().reshape([n, c, fh * fw]).swap_dims(1, 2);
                let out = embed.forward(tokens);
                let e = out.dims()[2];
                resize(out.swap_dims(1, 2).reshape([n, e, fh, fw]), [h, w])
            })
            .collect();
        let x = Tensor::cat(embedded, 1);
        match &self.fuse_layer {
            FuseLayer::SepAspp(aspp) => {
                let branches: Vec<Tensor<4>> = aspp
                    .aspp_modules
                    .iter()
                    .map(|branch| match branch {
                        AsppBranch::Pointwise(conv) => conv.forward(x.clone()),
                        AsppBranch::Separable(sep) => sep
                            .pointwise_conv
                            .forward(sep.depthwise_conv.forward(x.clone())),
                    })
                    .collect();
                aspp.bottleneck.forward(Tensor::cat(branches, 1))
            }
            FuseLayer::Conv(conv) => conv.forward(x),
        }
    }

    /// Channel dropout (when `noise` has a source) and the 1x1 classifier.
    pub fn classify(&self, fused: Tensor<4>, noise: &mut Noise<'_>) -> Tensor<4> {
        conv_forward(&self.conv_seg, channel_dropout(fused, self.dropout, noise))
    }
}

/// `Dropout2d`: each channel of each sample is zeroed with probability `p` and the rest scaled
/// by `1 / (1 - p)`, when `noise` has a source.
fn channel_dropout(x: Tensor<4>, p: f64, noise: &mut Noise<'_>) -> Tensor<4> {
    let [n, c, _, _] = x.dims();
    match noise.keep_mask(n * c, p) {
        Some(mask) => {
            let mask = Tensor::<4>::from_data(TensorData::new(mask, [n, c, 1, 1]), &x.device());
            x * mask
        }
        None => x,
    }
}

impl DaFormer {
    /// Logits `[N, classes, H/4, W/4]` (rounded up per stride-2 step) of `images` `[N, 3, H, W]`
    /// normalised as ImageNet RGB, with dropout and stochastic depth off (inference, teachers).
    pub fn forward(&self, images: Tensor<4>) -> Tensor<4> {
        self.forward_with_features(images, &mut Noise::none()).0
    }

    /// The logits plus the encoder's stage-4 map (stride 32, the features of DAFormer's feature
    /// distance); dropout and stochastic depth draw from `noise` when it has a source
    /// (training).
    pub fn forward_with_features(
        &self,
        images: Tensor<4>,
        noise: &mut Noise<'_>,
    ) -> (Tensor<4>, Tensor<4>) {
        let features = self.backbone.forward(images, noise);
        let last = features[3].clone();
        (self.decode_head.forward(&features, noise), last)
    }

    /// The encoder's stage-4 map alone, without stochastic depth.
    pub fn features(&self, images: Tensor<4>) -> Tensor<4> {
        self.backbone
            .forward(images, &mut Noise::none())
            .pop()
            .expect("the encoder has four stages")
    }
}
