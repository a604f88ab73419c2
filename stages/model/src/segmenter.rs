//! The segmentation networks dag trains, behind one type: what the trainer, the self-training
//! loop and the inference stages ask of a network, whichever it is.

use burn::module::Module;
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::daformer::{DaFormer, DaFormerConfig};
use crate::deeplab::{DeepLabV2, DeepLabV2Config, InputConvention};
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
}

impl Architecture {
    /// The names `model.json` may give.
    pub const NAMES: [&'static str; 2] = ["deeplabv2", "daformer"];

    /// Its name in `model.json`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::DeepLabV2(_) => "deeplabv2",
            Self::DaFormer(_) => "daformer",
        }
    }

    /// Output classes.
    pub fn classes(&self) -> usize {
        match self {
            Self::DeepLabV2(c) => c.classes,
            Self::DaFormer(c) => c.classes,
        }
    }

    /// How the network's input images are normalised. DAFormer's MiT was trained on ImageNet
    /// RGB; DeepLabV2 records its own.
    pub fn input(&self) -> InputConvention {
        match self {
            Self::DeepLabV2(c) => c.input,
            Self::DaFormer(_) => InputConvention::ImagenetRgb,
        }
    }

    /// Builds the network with random weights on `device`.
    pub fn init(&self, device: &Device) -> Result<Segmenter, ModelError> {
        Ok(match self {
            Self::DeepLabV2(c) => Segmenter::DeepLabV2(c.init(device)?),
            Self::DaFormer(c) => Segmenter::DaFormer(c.init(device)?),
        })
    }
}

/// Logits of a forward pass: the main head's, and the aux head's where the network has one
/// (DeepLabV2's `layer5`).
pub struct Logits {
    /// The main head.
    pub main: Tensor<4>,
    /// The aux head, if any.
    pub aux: Option<Tensor<4>>,
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

impl Segmenter {
    /// Its architecture.
    pub fn arch(&self) -> Architecture {
        match self {
            Self::DeepLabV2(m) => Architecture::DeepLabV2(m.arch.clone()),
            Self::DaFormer(m) => Architecture::DaFormer(m.arch.clone()),
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
            Self::DaFormer(_) => None,
        }
    }

    /// How its input images are normalised.
    pub fn input(&self) -> InputConvention {
        self.arch().input()
    }

    /// Whether it has an aux head.
    pub fn has_aux(&self) -> bool {
        matches!(self, Self::DeepLabV2(_))
    }

    /// The top-level modules that the references train at the head learning rate: DeepLabV2's
    /// classifiers, DAFormer's decoder (mmcv's `head` key matches `decode_head.*`).
    pub fn head_modules(&self) -> &'static [&'static str] {
        match self {
            Self::DeepLabV2(_) => &["layer5", "layer6"],
            Self::DaFormer(_) => &["decode_head"],
        }
    }

    /// The substring of parameter paths that the reference optimiser exempts from weight decay:
    /// DAFormer's `custom_keys` give every MiT LayerNorm (`norm1`, `norm2`, `attn.norm`, the
    /// patch embeddings' and stages' `norm`) `decay_mult=0`; DeepLabV2 decays everything.
    pub fn no_decay_key(&self) -> Option<&'static str> {
        match self {
            Self::DeepLabV2(_) => None,
            Self::DaFormer(_) => Some("norm"),
        }
    }

    /// Logits of `images`; stochastic layers draw from `noise` when it has a source.
    pub fn forward(&self, images: Tensor<4>, noise: &mut Noise<'_>) -> Logits {
        match self {
            Self::DeepLabV2(m) => {
                let (aux, main) = m.forward(images);
                Logits {
                    main,
                    aux: Some(aux),
                }
            }
            Self::DaFormer(m) => Logits {
                main: m.forward_with_features(images, noise).0,
                aux: None,
            },
        }
    }

    /// [`Segmenter::forward`] plus the encoder's last feature map (the features of DAFormer's
    /// feature distance: DeepLabV2's `layer4`, MiT's stage 4).
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
                    },
                    features,
                )
            }
            Self::DaFormer(m) => {
                let (main, features) = m.forward_with_features(images, noise);
                (Logits { main, aux: None }, features)
            }
        }
    }

    /// The encoder's last feature map alone.
    pub fn features(&self, images: Tensor<4>) -> Tensor<4> {
        match self {
            Self::DeepLabV2(m) => m.features(images),
            Self::DaFormer(m) => m.features(images),
        }
    }

    /// Logits resized to `size` as the architecture's reference code does before its losses,
    /// differentiably: ADVENT's bilinear with aligned corners for DeepLabV2, mmseg's
    /// `align_corners=False` for DAFormer.
    pub fn resize_logits_differentiable(&self, logits: Tensor<4>, size: [usize; 2]) -> Tensor<4> {
        match self {
            Self::DeepLabV2(_) => upsample_differentiable(logits, size),
            Self::DaFormer(_) => resize(logits, size),
        }
    }

    /// [`Segmenter::resize_logits_differentiable`] by the fastest form, for logits no gradient
    /// flows through (teachers, inference).
    pub fn resize_logits(&self, logits: Tensor<4>, size: [usize; 2]) -> Tensor<4> {
        match self {
            Self::DeepLabV2(_) => upsample(logits, size),
            Self::DaFormer(_) => resize(logits, size),
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

    /// Inference: logits of `images` `[N, 3, H, W]` resized to `size` (`[height, width]`),
    /// computed on a validation copy of the model (no autodiff, BatchNorm on running
    /// statistics, every stochastic unit kept).
    pub fn predict_logits(&self, images: Tensor<4>, size: [usize; 2]) -> Logits {
        let model = self.valid();
        let device = images.device().without_autodiff();
        let logits = model.forward(images.to_device(&device), &mut Noise::none());
        Logits {
            main: model.resize_logits(logits.main, size),
            aux: logits.aux.map(|a| model.resize_logits(a, size)),
        }
    }

    /// Inference: softmax probabilities of the main head at `size`, `[N, classes, H, W]`.
    pub fn predict_probs(&self, images: Tensor<4>, size: [usize; 2]) -> Tensor<4> {
        softmax(self.predict_logits(images, size).main, 1)
    }
}
