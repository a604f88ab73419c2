//! DeepLabV2 on a dilated ResNet with Caffe-style bottlenecks and two classifier heads.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Initializer, PaddingConfig2d};
use burn::tensor::{Device, Tensor};
use dag_kernels::{conv_batch_norm, conv_batch_norm_add_relu};
use serde::{Deserialize, Serialize};

use crate::ModelError;

/// Bottleneck expansion: the last 1x1 conv of every block has 4x the block's planes.
const EXPANSION: usize = 4;

/// Dilations (and paddings) of the four parallel 3x3 convs in DeepLabV2's classifier, all of
/// which ADVENT sums.
pub const CLASSIFIER_DILATIONS: [usize; 4] = [6, 12, 18, 24];

/// The classifier of DACS and of the DAFormer family's DeepLabV2 (`dlv2red`): their code returns
/// inside the loop over the branches, so only the first two (dilations 6 and 12) are summed.
pub const REDUCED_CLASSIFIER_DILATIONS: [usize; 2] = [6, 12];

/// Architecture of a [`DeepLabV2`]: everything needed to rebuild it from a saved artifact.
///
/// Serialised as the `model.json` of a model artifact, so it must stay readable by later
/// versions: new fields get serde defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeepLabV2Config {
    /// Bottleneck blocks in layer1..layer4. ResNet-101 (the paper) is `[3, 4, 23, 3]`,
    /// ResNet-50 `[3, 4, 6, 3]`; see [`DeepLabV2Config::blocks_for_depth`].
    pub blocks: [usize; 4],
    /// Channel multiplier on every backbone width (1.0 = the paper; 0.25 for CPU tests).
    /// The classifier heads always see `expansion * planes` channels of the scaled backbone.
    #[serde(default = "default_width")]
    pub width: f64,
    /// Number of output classes of both heads (19 for GTA5/Cityscapes, 16 for SYNTHIA).
    pub classes: usize,
    /// Dilations of the parallel 3x3 convs each classifier head sums:
    /// [`CLASSIFIER_DILATIONS`] (ADVENT, IntraDA) or [`REDUCED_CLASSIFIER_DILATIONS`] (DACS,
    /// DAFormer's DeepLabV2).
    #[serde(
        default = "default_dilations",
        skip_serializing_if = "is_default_dilations"
    )]
    pub classifier_dilations: Vec<usize>,
    /// How the network's input images are normalised: a fact of its ImageNet initialisation,
    /// kept with the network so that every stage feeding it images does the same.
    #[serde(default, skip_serializing_if = "InputConvention::is_caffe")]
    pub input: InputConvention,
    /// The ResNet's variant: ADVENT's Caffe ResNet (the default) or mmcv's ResNet-V1c of the
    /// DAFormer family's DeepLabV2.
    #[serde(default, skip_serializing_if = "ResNetStyle::is_caffe")]
    pub resnet: ResNetStyle,
}

/// The ResNet variant of a [`DeepLabV2`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResNetStyle {
    /// ADVENT's (and DACS's) Caffe ResNet: a 7x7 stem, ceil-mode max-pool, the stride on each
    /// stage's first 1x1 conv, dilations 2 and 4 in every block of layer3 and layer4, BatchNorm
    /// affine parameters frozen.
    #[default]
    Caffe,
    /// mmcv's `ResNetV1c` as DAFormer, HRDA and MIC build their DeepLabV2 (`dlv2red`,
    /// `open-mmlab://resnet101_v1c`): a deep stem of three 3x3 convs (half the stem's channels,
    /// half, all), floor-mode max-pool, the stride on the 3x3 conv (`style='pytorch'`), the first
    /// block of layer3 and layer4 at half their dilation (`contract_dilation`), and trainable
    /// BatchNorm.
    V1c,
}

impl ResNetStyle {
    /// Its name in pipeline files and `model.json`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Caffe => "caffe",
            Self::V1c => "v1c",
        }
    }

    /// The style named `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Caffe, Self::V1c]
            .into_iter()
            .find(|s| s.name() == name)
    }

    fn is_caffe(&self) -> bool {
        *self == Self::Caffe
    }
}

/// The input normalisation a network was initialised for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputConvention {
    /// ADVENT's Caffe ResNet: BGR, minus the Caffe mean, no division (the default).
    #[default]
    CaffeBgr,
    /// torchvision's and mmcv's ImageNet ResNets: RGB, minus the ImageNet mean, divided by its
    /// standard deviation.
    ImagenetRgb,
}

impl InputConvention {
    /// Its name in pipeline files and `model.json`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::CaffeBgr => "caffe_bgr",
            Self::ImagenetRgb => "imagenet_rgb",
        }
    }

    /// The convention named `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        [Self::CaffeBgr, Self::ImagenetRgb]
            .into_iter()
            .find(|c| c.name() == name)
    }

    fn is_caffe(&self) -> bool {
        *self == Self::CaffeBgr
    }
}

fn default_width() -> f64 {
    1.0
}

fn default_dilations() -> Vec<usize> {
    CLASSIFIER_DILATIONS.to_vec()
}

/// ADVENT's classifier is left out of `model.json`, which then reads as before the option.
fn is_default_dilations(d: &[usize]) -> bool {
    d == CLASSIFIER_DILATIONS
}

impl DeepLabV2Config {
    /// A config with the block counts of the ResNet of the given `depth` (see
    /// [`Self::blocks_for_depth`]), full width.
    pub fn new(depth: usize, classes: usize) -> Result<Self, ModelError> {
        let blocks = Self::blocks_for_depth(depth).ok_or(ModelError::UnknownDepth(depth))?;
        Ok(Self {
            blocks,
            width: 1.0,
            classes,
            classifier_dilations: default_dilations(),
            input: InputConvention::default(),
            resnet: ResNetStyle::default(),
        })
    }

    /// Sets the width multiplier.
    pub fn with_width(mut self, width: f64) -> Self {
        self.width = width;
        self
    }

    /// Sets the dilations of the classifier's branches.
    pub fn with_classifier_dilations(mut self, dilations: &[usize]) -> Self {
        self.classifier_dilations = dilations.to_vec();
        self
    }

    /// Block counts of the supported depths (all bottleneck ResNets, `depth = 3 * blocks + 2`):
    /// 101 `[3,4,23,3]` (paper), 50 `[3,4,6,3]`, 26 `[2,2,2,2]` (the "ResNet-18-like" small
    /// model: ResNet-18's block counts with bottleneck blocks) and 14 `[1,1,1,1]`.
    pub fn blocks_for_depth(depth: usize) -> Option<[usize; 4]> {
        match depth {
            101 => Some([3, 4, 23, 3]),
            50 => Some([3, 4, 6, 3]),
            26 => Some([2, 2, 2, 2]),
            14 => Some([1, 1, 1, 1]),
            _ => None,
        }
    }

    /// Checks the config before anything is allocated.
    pub fn validate(&self) -> Result<(), ModelError> {
        if self.blocks.contains(&0) {
            return Err(ModelError::InvalidConfig(format!(
                "every stage needs at least one block, got {:?}",
                self.blocks
            )));
        }
        if !(self.width.is_finite() && self.width > 0.0) {
            return Err(ModelError::InvalidConfig(format!(
                "width must be a positive number, got {}",
                self.width
            )));
        }
        if self.classes == 0 {
            return Err(ModelError::InvalidConfig(
                "classes must be at least 1".into(),
            ));
        }
        if self.classifier_dilations.is_empty() || self.classifier_dilations.contains(&0) {
            return Err(ModelError::InvalidConfig(format!(
                "the classifier needs at least one branch, each with a dilation of 1 or more, \
                 got {:?}",
                self.classifier_dilations
            )));
        }
        Ok(())
    }

    /// A backbone width after the multiplier, never below one channel.
    fn scaled(&self, channels: usize) -> usize {
        ((channels as f64 * self.width).round() as usize).max(1)
    }

    /// Channels of the layer3 features (input of the aux head).
    pub fn aux_channels(&self) -> usize {
        self.scaled(256) * EXPANSION
    }

    /// Channels of the layer4 features (input of the main head).
    pub fn main_channels(&self) -> usize {
        self.scaled(512) * EXPANSION
    }

    /// Builds the model on `device` with random weights (Kaiming for the backbone, N(0, 0.01)
    /// for the classifier convs as in DeepLabV2). BatchNorm affine parameters are frozen in the
    /// Caffe ResNet and trained in the V1c one.
    pub fn init(&self, device: &Device) -> Result<DeepLabV2, ModelError> {
        self.validate()?;
        let v1c = self.resnet == ResNetStyle::V1c;
        let bn = |channels: usize| norm(channels, v1c, device);
        let stem = self.scaled(64);
        let mut inplanes = stem;
        let planes = [
            self.scaled(64),
            self.scaled(128),
            self.scaled(256),
            self.scaled(512),
        ];
        // (stride, dilation) of layer1..layer4: output stride 8 through dilation 2 and 4.
        let geometry = [(1, 1), (2, 1), (1, 2), (1, 4)];
        let mut layers: Vec<Vec<Bottleneck>> = Vec::with_capacity(4);
        for stage in 0..4 {
            let (stride, dilation) = geometry[stage];
            let mut blocks = Vec::with_capacity(self.blocks[stage]);
            for i in 0..self.blocks[stage] {
                let s = if i == 0 { stride } else { 1 };
                // mmcv's `contract_dilation`: a dilated stage's first block at half the rate.
                let d = if v1c && i == 0 && dilation > 1 {
                    dilation / 2
                } else {
                    dilation
                };
                blocks.push(Bottleneck::new(
                    inplanes,
                    planes[stage],
                    s,
                    d,
                    self.resnet,
                    device,
                ));
                inplanes = planes[stage] * EXPANSION;
            }
            layers.push(blocks);
        }
        let mut layers = layers.into_iter();
        let mut next = || layers.next().expect("four stages");
        let half = (stem / 2).max(1);
        let conv3x3 = |cin: usize, cout: usize, stride: usize| {
            Conv2dConfig::new([cin, cout], [3, 3])
                .with_stride([stride, stride])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .with_bias(false)
                .init(device)
        };
        let (conv1, bn1, deep_stem) = if v1c {
            let deep = DeepStem {
                conv2: conv3x3(half, half, 1),
                bn2: bn(half),
                conv3: conv3x3(half, stem, 1),
                bn3: bn(stem),
            };
            (conv3x3(3, half, 2), bn(half), Some(deep))
        } else {
            let conv1 = Conv2dConfig::new([3, stem], [7, 7])
                .with_stride([2, 2])
                .with_padding(PaddingConfig2d::Explicit(3, 3, 3, 3))
                .with_bias(false)
                .init(device);
            (conv1, bn(stem), None)
        };
        let backbone = ResNetBackbone {
            conv1,
            bn1,
            deep_stem,
            maxpool: MaxPool2dConfig::new([3, 3])
                .with_strides([2, 2])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .with_ceil_mode(!v1c)
                .init(),
            layer1: next(),
            layer2: next(),
            layer3: next(),
            layer4: next(),
        };
        Ok(DeepLabV2 {
            arch: self.clone(),
            backbone,
            layer5: Classifier::new(
                self.aux_channels(),
                self.classes,
                &self.classifier_dilations,
                device,
            ),
            layer6: Classifier::new(
                self.main_channels(),
                self.classes,
                &self.classifier_dilations,
                device,
            ),
        })
    }
}

/// BatchNorm whose affine parameters never receive gradients (ADVENT freezes them); its running
/// statistics still update whenever it runs on an autodiff device.
fn frozen_bn(channels: usize, device: &Device) -> BatchNorm {
    let mut bn = BatchNormConfig::new(channels).init(device);
    bn.gamma = bn.gamma.set_require_grad(false);
    bn.beta = bn.beta.set_require_grad(false);
    bn
}

/// The BatchNorm of a backbone: trainable in the V1c ResNet (mmcv's `requires_grad=True`),
/// frozen in the Caffe one.
fn norm(channels: usize, trainable: bool, device: &Device) -> BatchNorm {
    if trainable {
        BatchNormConfig::new(channels).init(device)
    } else {
        frozen_bn(channels, device)
    }
}

fn conv1x1(cin: usize, cout: usize, stride: usize, device: &Device) -> Conv2d {
    Conv2dConfig::new([cin, cout], [1, 1])
        .with_stride([stride, stride])
        .with_bias(false)
        .init(device)
}

/// The projection shortcut of the first block of a stage (`downsample.0` conv and
/// `downsample.1` BatchNorm in PyTorch naming).
#[derive(Module, Debug)]
pub struct Downsample {
    /// 1x1 projection conv, carrying the block's stride.
    pub conv: Conv2d,
    /// Frozen-affine BatchNorm after the projection.
    pub bn: BatchNorm,
}

/// A bottleneck: in the Caffe ResNet the stride sits on the first 1x1 conv, in the V1c (and
/// torchvision's) on the 3x3. Shapes are identical either way.
#[derive(Module, Debug)]
pub struct Bottleneck {
    /// 1x1 reduction (strided).
    pub conv1: Conv2d,
    /// BatchNorm after `conv1`.
    pub bn1: BatchNorm,
    /// 3x3 conv, dilated in layer3/layer4.
    pub conv2: Conv2d,
    /// BatchNorm after `conv2`.
    pub bn2: BatchNorm,
    /// 1x1 expansion to `4 * planes`.
    pub conv3: Conv2d,
    /// BatchNorm after `conv3`.
    pub bn3: BatchNorm,
    /// Projection shortcut, present on the first block of each stage.
    pub downsample: Option<Downsample>,
}

impl Bottleneck {
    fn new(
        inplanes: usize,
        planes: usize,
        stride: usize,
        dilation: usize,
        style: ResNetStyle,
        device: &Device,
    ) -> Self {
        let out = planes * EXPANSION;
        let v1c = style == ResNetStyle::V1c;
        let bn = |channels: usize| norm(channels, v1c, device);
        let (stride1, stride2) = if v1c { (1, stride) } else { (stride, 1) };
        // As in ADVENT's `_make_layer`, only a stage's first block projects: the channel change
        // or the stride asks for it there, and the later blocks add their input unchanged (its
        // extra "dilation 2 or 4" clause is decided once per stage, for the first block).
        let downsample = (stride != 1 || inplanes != out).then(|| Downsample {
            conv: conv1x1(inplanes, out, stride, device),
            bn: bn(out),
        });
        Self {
            conv1: conv1x1(inplanes, planes, stride1, device),
            bn1: bn(planes),
            conv2: Conv2dConfig::new([planes, planes], [3, 3])
                .with_stride([stride2, stride2])
                .with_dilation([dilation, dilation])
                .with_padding(PaddingConfig2d::Explicit(
                    dilation, dilation, dilation, dilation,
                ))
                .with_bias(false)
                .init(device),
            bn2: bn(planes),
            conv3: conv1x1(planes, out, 1, device),
            bn3: bn(out),
            downsample,
        }
    }

    /// Applies the block to `[N, inplanes, H, W]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let residual = match &self.downsample {
            Some(d) => conv_batch_norm(&d.conv, &d.bn, x.clone(), false),
            None => x.clone(),
        };
        let out = conv_batch_norm(&self.conv1, &self.bn1, x, true);
        let out = conv_batch_norm(&self.conv2, &self.bn2, out, true);
        conv_batch_norm_add_relu(&self.conv3, &self.bn3, out, residual)
    }
}

/// The second and third convs of the V1c ResNet's deep stem (mmcv's `stem.3` to `stem.7`).
#[derive(Module, Debug)]
pub struct DeepStem {
    /// 3x3 conv, half the stem's channels.
    pub conv2: Conv2d,
    /// BatchNorm after `conv2`.
    pub bn2: BatchNorm,
    /// 3x3 conv to the stem's channels.
    pub conv3: Conv2d,
    /// BatchNorm after `conv3`.
    pub bn3: BatchNorm,
}

/// The ResNet trunk: stem (7x7/2 conv, BN, ReLU, 3x3/2 ceil-mode max-pool; in the V1c ResNet
/// three 3x3 convs and a floor-mode max-pool) and four stages. Parameter paths follow
/// torchvision (`conv1`, `bn1`, `layerN.i.convK`, `layerN.0.downsample`), which is what the
/// ImageNet loader maps onto; the deep stem's later convs are `deep_stem.*`.
#[derive(Module, Debug)]
pub struct ResNetBackbone {
    /// Stem conv: 7x7 stride 2, or the V1c stem's first 3x3 stride 2.
    pub conv1: Conv2d,
    /// Stem BatchNorm.
    pub bn1: BatchNorm,
    /// The V1c stem's second and third convs (absent from the Caffe ResNet and its records).
    pub deep_stem: Option<DeepStem>,
    /// 3x3 stride-2 max-pool, with `ceil_mode` in the Caffe DeepLab.
    pub maxpool: MaxPool2d,
    /// Stage 1 (stride 4 overall).
    pub layer1: Vec<Bottleneck>,
    /// Stage 2 (stride 8).
    pub layer2: Vec<Bottleneck>,
    /// Stage 3 (stride 8, dilation 2).
    pub layer3: Vec<Bottleneck>,
    /// Stage 4 (stride 8, dilation 4).
    pub layer4: Vec<Bottleneck>,
}

impl ResNetBackbone {
    /// Returns the layer3 and layer4 features of `[N, 3, H, W]` images.
    pub fn forward(&self, x: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let mut x = conv_batch_norm(&self.conv1, &self.bn1, x, true);
        if let Some(deep) = &self.deep_stem {
            x = conv_batch_norm(&deep.conv2, &deep.bn2, x, true);
            x = conv_batch_norm(&deep.conv3, &deep.bn3, x, true);
        }
        let mut x = self.maxpool.forward(x);
        for block in self.layer1.iter().chain(&self.layer2).chain(&self.layer3) {
            x = block.forward(x);
        }
        let l3 = x.clone();
        for block in &self.layer4 {
            x = block.forward(x);
        }
        (l3, x)
    }
}

/// DeepLabV2's classifier: the SUM of parallel 3x3 convs with dilation and padding 6, 12, 18, 24
/// (or only 6 and 12, see [`REDUCED_CLASSIFIER_DILATIONS`]).
#[derive(Module, Debug)]
pub struct Classifier {
    /// The dilated convs (with bias), named as in the reference implementation.
    pub conv2d_list: Vec<Conv2d>,
}

impl Classifier {
    fn new(cin: usize, classes: usize, dilations: &[usize], device: &Device) -> Self {
        let conv2d_list = dilations
            .iter()
            .map(|&d| {
                Conv2dConfig::new([cin, classes], [3, 3])
                    .with_dilation([d, d])
                    .with_padding(PaddingConfig2d::Explicit(d, d, d, d))
                    .with_initializer(Initializer::Normal {
                        mean: 0.0,
                        std: 0.01,
                    })
                    .init(device)
            })
            .collect();
        Self { conv2d_list }
    }

    /// Class logits `[N, classes, H, W]` of features `[N, cin, H, W]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        dag_kernels::classifier(&self.conv2d_list, x)
    }
}

/// DeepLabV2 with multi-level outputs: `layer5` (aux) on layer3 features, `layer6` (main) on
/// layer4 features, both at output stride 8.
#[derive(Module, Debug)]
pub struct DeepLabV2 {
    /// The architecture it was built with (not part of its record).
    #[module(skip)]
    pub arch: DeepLabV2Config,
    /// The dilated ResNet trunk; the only part ImageNet weights initialise.
    pub backbone: ResNetBackbone,
    /// Aux classifier on layer3 features.
    pub layer5: Classifier,
    /// Main classifier on layer4 features.
    pub layer6: Classifier,
}

impl DeepLabV2 {
    /// Returns `(aux, main)` logits, each `[N, classes, ceil(H/8), ceil(W/8)]`-ish (the exact
    /// size follows the convolution arithmetic, see [`output_size`]), for images `[N, 3, H, W]`
    /// already mean-subtracted.
    pub fn forward(&self, images: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let (l3, l4) = self.backbone.forward(images);
        (self.layer5.forward(l3), self.layer6.forward(l4))
    }

    /// [`DeepLabV2::forward`] plus the backbone's last feature map (`layer4`, the input of the
    /// main classifier): `(aux, main, features)`.
    pub fn forward_with_features(&self, images: Tensor<4>) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
        let (l3, l4) = self.backbone.forward(images);
        (self.layer5.forward(l3), self.layer6.forward(l4.clone()), l4)
    }

    /// The backbone's last feature map alone (`layer4`).
    pub fn features(&self, images: Tensor<4>) -> Tensor<4> {
        self.backbone.forward(images).1
    }
}

/// Spatial size of both heads' logits for an input of `[h, w]` with the Caffe ResNet: the stem
/// conv (7x7/2, pad 3), the ceil-mode max-pool (3x3/2, pad 1) and layer2's strided 1x1 conv.
pub fn output_size([h, w]: [usize; 2]) -> [usize; 2] {
    let f = |x: usize| {
        let conv1 = (x + 2 * 3 - 7) / 2 + 1;
        let pool = (conv1 + 2 - 3).div_ceil(2) + 1;
        // PyTorch drops a last ceil-mode window that would start in the right padding.
        let pool = if (pool - 1) * 2 > conv1 {
            pool - 1
        } else {
            pool
        };
        (pool - 1) / 2 + 1
    };
    [f(h), f(w)]
}
