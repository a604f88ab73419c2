//! The segmentation networks dag trains, behind one type: what the trainer, the self-training
//! loop and the inference stages ask of a network, whichever it is.

use burn::module::Module;
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::daformer::{DaFormer, DaFormerConfig};
use crate::deeplab::{DeepLabV2, DeepLabV2Config, InputConvention};
use crate::hrda::{Hrda, HrdaConfig, PixelWindow};
use crate::noise::Noise;
use crate::{resize, upsample, upsample_differentiable, ModelError};

/// A network's architecture, as the `architecture` and `config` fields of `model.json` name it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "architecture", content = "config")]
pub enum Architecture {
    /// DeepLabV2 on a dilated ResNet (ADVENT, IntraDA, DACS, the DAFormer family's DLv2).
    #[serde(rename = "deeplabv2")]
    DeepLabV2(DeepLabV2Config),
    /// A MiT encoder with DAFormer's decoder (DAFormer, HRDA, MIC).
    #[serde(rename = "daformer")]
    DaFormer(DaFormerConfig),
    /// DAFormer's network with HRDA's context and detail views and scale attention (HRDA,
    /// MIC on HRDA).
    #[serde(rename = "hrda")]
    Hrda(HrdaConfig),
}

impl Architecture {
    /// The names `model.json` may give.
    pub const NAMES: [&'static str; 3] = ["deeplabv2", "daformer", "hrda"];

    /// Its name in `model.json`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::DeepLabV2(_) => "deeplabv2",
            Self::DaFormer(_) => "daformer",
            Self::Hrda(_) => "hrda",
        }
    }

    /// Output classes.
    pub fn classes(&self) -> usize {
        match self {
            Self::DeepLabV2(c) => c.classes,
            Self::DaFormer(c) => c.classes,
            Self::Hrda(c) => c.network.classes,
        }
    }

    /// How the network's input images are normalised. DAFormer's MiT was trained on ImageNet
    /// RGB; DeepLabV2 records its own.
    pub fn input(&self) -> InputConvention {
        match self {
            Self::DeepLabV2(c) => c.input,
            Self::DaFormer(_) | Self::Hrda(_) => InputConvention::ImagenetRgb,
        }
    }

    /// Builds the network with random weights on `device`.
    pub fn init(&self, device: &Device) -> Result<Segmenter, ModelError> {
        Ok(match self {
            Self::DeepLabV2(c) => Segmenter::DeepLabV2(c.init(device)?),
            Self::DaFormer(c) => Segmenter::DaFormer(c.init(device)?),
            Self::Hrda(c) => Segmenter::Hrda(c.init(device)?),
        })
    }
}

/// Logits of a forward pass: the main head's, the aux head's where the network has one
/// (DeepLabV2's `layer5`), and in HRDA's training pass the detail crop's.
pub struct Logits {
    /// The main head (HRDA: the fused prediction).
    pub main: Tensor<4>,
    /// The aux head, if any.
    pub aux: Option<Tensor<4>>,
    /// HRDA's detail crop, in its training pass.
    pub detail: Option<DetailLogits>,
}

impl Logits {
    fn main(main: Tensor<4>) -> Self {
        Self {
            main,
            aux: None,
            detail: None,
        }
    }
}

/// The logits of HRDA's detail crop and what its loss needs.
pub struct DetailLogits {
    /// Logits of the crop at stride 4.
    pub logits: Tensor<4>,
    /// Where the crop lies, in pixels of the input images (and of labels at their size).
    pub window: PixelWindow,
    /// The share of the loss that goes to the crop's own term; the main term gets the rest.
    pub loss_weight: f64,
}

/// A segmentation network of any [`Architecture`].
// One per training (plus its teacher): the size difference costs nothing, and Burn's `Module`
// derive has no `Box`.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Segmenter {
    /// See [`DeepLabV2`].
    DeepLabV2(DeepLabV2),
    /// See [`DaFormer`].
    DaFormer(DaFormer),
    /// See [`Hrda`].
    Hrda(Hrda),
}

impl From<DeepLabV2> for Segmenter {
    fn from(model: DeepLabV2) -> Self {
        Self::DeepLabV2(model)
    }
}

impl From<DaFormer> for Segmenter {
    fn from(model: DaFormer) -> Self {
        Self::DaFormer(model)
    }
}

impl From<Hrda> for Segmenter {
    fn from(model: Hrda) -> Self {
        Self::Hrda(model)
    }
}

impl Segmenter {
    /// Its architecture.
    pub fn arch(&self) -> Architecture {
        match self {
            Self::DeepLabV2(m) => Architecture::DeepLabV2(m.arch.clone()),
            Self::DaFormer(m) => Architecture::DaFormer(m.arch.clone()),
            Self::Hrda(m) => Architecture::Hrda(m.arch.clone()),
        }
    }

    /// Output classes.
    pub fn classes(&self) -> usize {
        self.arch().classes()
    }

    /// The DeepLabV2 inside, if it is one.
    pub fn deeplab(&self) -> Option<&DeepLabV2> {
        match self {
            Self::DeepLabV2(m) => Some(m),
            Self::DaFormer(_) | Self::Hrda(_) => None,
        }
    }

    /// How its input images are normalised.
    pub fn input(&self) -> InputConvention {
        self.arch().input()
    }

    /// Checks that images of `size` (`[height, width]`) can go through the network, in
    /// training (`training`) or inference ([`HrdaConfig::check_input`]; any size for the
    /// others); the message says what size would do.
    pub fn check_input(&self, size: [usize; 2], training: bool) -> Result<(), String> {
        match self {
            Self::Hrda(m) => m.arch.check_input(size, training),
            Self::DeepLabV2(_) | Self::DaFormer(_) => Ok(()),
        }
    }

    /// Whether its training pass decodes a detail crop beside the whole image (HRDA), so
    /// that its inputs must fit [`Segmenter::check_input`] and its labels the image size.
    pub fn is_multi_resolution(&self) -> bool {
        matches!(self, Self::Hrda(_))
    }

    /// Whether it has an aux head.
    pub fn has_aux(&self) -> bool {
        matches!(self, Self::DeepLabV2(_))
    }

    /// The top-level modules that the references train at the head learning rate: DeepLabV2's
    /// classifiers, DAFormer's decoder (mmcv's `head` key matches `decode_head.*`), and HRDA's
    /// scale attention (`decode_head.scale_attention` in its state dicts).
    pub fn head_modules(&self) -> &'static [&'static str] {
        match self {
            Self::DeepLabV2(_) => &["layer5", "layer6"],
            Self::DaFormer(_) => &["decode_head"],
            Self::Hrda(_) => &["decode_head", "scale_attention"],
        }
    }

    /// The substring of parameter paths that the reference optimiser exempts from weight decay:
    /// DAFormer's `custom_keys` give every MiT LayerNorm (`norm1`, `norm2`, `attn.norm`, the
    /// patch embeddings' and stages' `norm`) `decay_mult=0`; DeepLabV2 decays everything.
    pub fn no_decay_key(&self) -> Option<&'static str> {
        match self {
            Self::DeepLabV2(_) => None,
            Self::DaFormer(_) | Self::Hrda(_) => Some("norm"),
        }
    }

    /// Logits of a whole-image pass over `images` (HRDA: the context with the detail averaged
    /// over overlapping crops, as its teacher labels the target); stochastic layers draw from
    /// `noise` when it has a source.
    pub fn forward(&self, images: Tensor<4>, noise: &mut Noise<'_>) -> Logits {
        match self {
            Self::DeepLabV2(m) => {
                let (aux, main) = m.forward(images);
                Logits {
                    main,
                    aux: Some(aux),
                    detail: None,
                }
            }
            Self::DaFormer(m) => Logits::main(m.forward_with_features(images, noise).0),
            Self::Hrda(m) => Logits::main(m.forward(images, noise)),
        }
    }

    /// The pass of a training loss: [`Segmenter::forward`], except HRDA's, which decodes one
    /// detail crop drawn from `noise` (at the top-left corner without a source) and returns
    /// its logits in [`Logits::detail`].
    pub fn forward_train(&self, images: Tensor<4>, noise: &mut Noise<'_>) -> Logits {
        match self {
            Self::Hrda(_) => self.forward_with_features(images, noise).0,
            Self::DeepLabV2(_) | Self::DaFormer(_) => self.forward(images, noise),
        }
    }

    /// [`Segmenter::forward_train`] plus the encoder's last feature map (the features of
    /// DAFormer's feature distance: DeepLabV2's `layer4`, MiT's stage 4; HRDA's context's stage
    /// 4, its `feature_scale = 0.5`).
    pub fn forward_with_features(
        &self,
        images: Tensor<4>,
        noise: &mut Noise<'_>,
    ) -> (Logits, Tensor<4>) {
        match self {
            Self::DeepLabV2(m) => {
                let (aux, main, features) = m.forward_with_features(images);
                (
                    Logits {
                        main,
                        aux: Some(aux),
                        detail: None,
                    },
                    features,
                )
            }
            Self::DaFormer(m) => {
                let (main, features) = m.forward_with_features(images, noise);
                (Logits::main(main), features)
            }
            Self::Hrda(m) => {
                let [_, _, h, w] = images.dims();
                let window = m.draw_window([h, w], noise);
                let out = m.forward_train(images, window, noise);
                let logits = Logits {
                    main: out.fused,
                    aux: None,
                    detail: Some(DetailLogits {
                        logits: out.detail,
                        window,
                        loss_weight: m.arch.detail_loss_weight,
                    }),
                };
                (logits, out.context_features)
            }
        }
    }

    /// The encoder's last feature map alone, of the view [`Segmenter::forward_with_features`]
    /// returns it for.
    pub fn features(&self, images: Tensor<4>) -> Tensor<4> {
        match self {
            Self::DeepLabV2(m) => m.features(images),
            Self::DaFormer(m) => m.features(images),
            Self::Hrda(m) => m.context_features(images),
        }
    }

    /// Test-time logits of `images` without dropout or stochastic depth, at the resolution
    /// the network gives them (resize them with [`Segmenter::resize_logits`]): the
    /// whole-image pass, or HRDA's sliding windows at the image size.
    pub fn infer(&self, images: Tensor<4>) -> Logits {
        match self {
            Self::Hrda(m) => Logits::main(m.infer(images)),
            Self::DeepLabV2(_) | Self::DaFormer(_) => self.forward(images, &mut Noise::none()),
        }
    }

    /// Logits resized to `size` as the architecture's reference code does before its losses,
    /// differentiably: ADVENT's bilinear with aligned corners for DeepLabV2, mmseg's
    /// `align_corners=False` for DAFormer.
    pub fn resize_logits_differentiable(&self, logits: Tensor<4>, size: [usize; 2]) -> Tensor<4> {
        match self {
            Self::DeepLabV2(_) => upsample_differentiable(logits, size),
            Self::DaFormer(_) | Self::Hrda(_) => resize(logits, size),
        }
    }

    /// [`Segmenter::resize_logits_differentiable`] by the fastest form, for logits no gradient
    /// flows through (teachers, inference).
    pub fn resize_logits(&self, logits: Tensor<4>, size: [usize; 2]) -> Tensor<4> {
        match self {
            Self::DeepLabV2(_) => upsample(logits, size),
            Self::DaFormer(_) | Self::Hrda(_) => resize(logits, size),
        }
    }

    /// A copy with its own storage on `device`: parameters equal to this model's, BatchNorm
    /// running statistics its own (a `clone` shares them, so a teacher network's forward
    /// passes would move its student's statistics).
    pub fn independent_copy(&self, device: &Device) -> Result<Self, ModelError> {
        self.arch()
            .init(device)?
            .try_load_record(self.clone().into_record())
            .map_err(|e| ModelError::InvalidConfig(format!("copying the network: {e}")))
    }

    /// Inference: [`Segmenter::infer`]'s logits of `images` `[N, 3, H, W]` resized to `size`
    /// (`[height, width]`), computed on a validation copy of the model (no autodiff,
    /// BatchNorm on running statistics, every stochastic unit kept).
    pub fn predict_logits(&self, images: Tensor<4>, size: [usize; 2]) -> Logits {
        let model = self.valid();
        let device = images.device().without_autodiff();
        let logits = model.infer(images.to_device(&device));
        Logits {
            main: model.resize_logits(logits.main, size),
            aux: logits.aux.map(|a| model.resize_logits(a, size)),
            detail: None,
        }
    }

    /// Inference: softmax probabilities of the main head at `size`, `[N, classes, H, W]`.
    pub fn predict_probs(&self, images: Tensor<4>, size: [usize; 2]) -> Tensor<4> {
        softmax(self.predict_logits(images, size).main, 1)
    }
}
