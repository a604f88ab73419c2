//! What the training loop needs from the data layer: host-side batches, drawn per iteration.

use burn::tensor::{Device, Int, Tensor, TensorData};
use rand_core::RngCore;

/// Error a batch provider may return; the loop wraps it with the iteration.
pub type BatchError = Box<dyn std::error::Error + Send + Sync>;

/// A batch of images `[N, 3, H, W]` in row-major order, already normalised as the model expects
/// ([`normalisation`]: BGR minus the Caffe mean for ADVENT's network).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageBatch {
    /// `N * 3 * H * W` values.
    pub data: Vec<f32>,
    /// `[N, 3, H, W]`.
    pub shape: [usize; 4],
}

/// Per-pixel class labels `[N, H, W]` (trainIds, 255 = ignore), row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelBatch {
    /// `N * H * W` values.
    pub data: Vec<u8>,
    /// `[N, H, W]`.
    pub shape: [usize; 3],
}

/// A labelled batch: source images (or IntraDA's easy target images) and their labels (or
/// pseudo-labels). Labels may have another size than the images: logits are upsampled to the
/// label size before the loss.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceBatch {
    /// The images.
    pub images: ImageBatch,
    /// Their labels.
    pub labels: LabelBatch,
}

/// The normalisation of images for a network initialised for `input`.
pub fn normalisation(input: dag_model::InputConvention) -> dag_data::Normalisation {
    match input {
        dag_model::InputConvention::CaffeBgr => dag_data::Normalisation::CAFFE_BGR,
        dag_model::InputConvention::ImagenetRgb => dag_data::Normalisation::IMAGENET_RGB,
    }
}

/// Where an image of a batch came from: a window of an image of `size` (`[width, height]`, as
/// stored), its top-left corner at `offset` (`[x, y]`), mirrored left to right after the crop when
/// `flipped`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// `[width, height]` of the image the window was cut from.
    pub size: [usize; 2],
    /// `[x, y]` of the window's top-left corner in that image.
    pub offset: [usize; 2],
    /// Whether the window was mirrored after the crop.
    pub flipped: bool,
}

/// Supplies the batches of each iteration. The loop calls [`Batches::source`] every iteration
/// and [`Batches::target`] every iteration of a method that uses target data, always in that
/// order, with the iteration index and the loop's RNG.
///
/// To resume bit-identically after an interruption, a provider must derive its batches only
/// from the iteration index and the draws it makes from `rng` (whose state is checkpointed),
/// not from hidden state of its own.
pub trait Batches: Send {
    /// The labelled batch of `iteration`.
    fn source(
        &mut self,
        iteration: usize,
        rng: &mut dyn RngCore,
    ) -> Result<SourceBatch, BatchError>;
    /// The unlabelled target images of `iteration`.
    fn target(&mut self, iteration: usize, rng: &mut dyn RngCore)
        -> Result<ImageBatch, BatchError>;
    /// Where each image of the batch that [`Batches::target`] returned last came from, for the
    /// pseudo-label margins (`pl_margins`), which are set on the whole image before the crop
    /// and the flip; `None` when the provider does not say.
    fn target_windows(&self) -> Option<Vec<Window>> {
        None
    }
}

impl ImageBatch {
    /// The batch as a tensor on `device`.
    pub fn tensor(&self, device: &Device) -> Tensor<4> {
        Tensor::from_data(TensorData::new(self.data.clone(), self.shape), device)
    }

    /// Checks that `data` has as many values as `shape` says and that there are 3 channels.
    pub fn check(&self) -> Result<(), String> {
        let n: usize = self.shape.iter().product();
        if self.data.len() != n || n == 0 {
            return Err(format!(
                "image batch has {} values for shape {:?}",
                self.data.len(),
                self.shape
            ));
        }
        if self.shape[1] != 3 {
            return Err(format!(
                "image batch must have 3 channels, shape {:?}",
                self.shape
            ));
        }
        Ok(())
    }
}

impl LabelBatch {
    /// The labels as an integer tensor on `device`.
    pub fn tensor(&self, device: &Device) -> Tensor<3, Int> {
        let data: Vec<i64> = self.data.iter().map(|&l| i64::from(l)).collect();
        Tensor::from_data(TensorData::new(data, self.shape), device)
    }

    /// Checks the length, and that every label is a class below `classes` or 255.
    pub fn check(&self, classes: usize) -> Result<(), String> {
        let n: usize = self.shape.iter().product();
        if self.data.len() != n || n == 0 {
            return Err(format!(
                "label batch has {} values for shape {:?}",
                self.data.len(),
                self.shape
            ));
        }
        if let Some(bad) = self
            .data
            .iter()
            .find(|&&l| l != 255 && usize::from(l) >= classes)
        {
            return Err(format!(
                "label {bad} is neither a class below {classes} nor the ignore label 255"
            ));
        }
        Ok(())
    }
}
