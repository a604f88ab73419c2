//! HRDA's multi-resolution network (Hoyer et al., ECCV 2022): DAFormer's encoder and decoder
//! run on a low-resolution *context* view of the whole crop and on a high-resolution *detail*
//! view, and a learned class-wise *scale attention* fuses the two predictions.
//!
//! With `k = 1 / context_scale` (2 in HRDA) and the decoder's output stride 4:
//! - training ([`Hrda::forward_train`]): the context is the whole image resized by
//!   `context_scale`; the detail is a `detail_crop` window of the image at full resolution
//!   whose offsets are multiples of `4k` (HRDA's `crop_coord_divisible = 8`), so that the window
//!   falls on whole cells of the context's logits. The attention `a = sigmoid(attention head)`
//!   is zeroed outside the window, and
//!   `fused = up_k(a) * insert(detail) + up_k((1 - a) * context)`, where `insert` pastes the
//!   detail logits into the window at stride 4 (zero elsewhere) and `up_k` is a bilinear
//!   resize by `k` with `align_corners=False`;
//! - whole-image inference ([`Hrda::forward`], the teacher's pass): the detail logits are
//!   averaged over overlapping `detail_crop` windows at half a crop's stride (HRDA's
//!   `hr_slide_inference`), and the attention is not masked;
//! - test ([`Hrda::infer`]): mmseg's sliding-window inference over `test_window` windows at
//!   `test_stride`, each window decoded as above and resized to its size, averaged where they
//!   overlap.
//!
//! The module names follow HRDA's state dicts (`backbone`, `decode_head.head` as
//! `decode_head`, `decode_head.scale_attention` as `scale_attention`).

use burn::module::Module;
use burn::tensor::activation::sigmoid;
use burn::tensor::{Device, Tensor, TensorData};
use dag_kernels::resize;
use serde::{Deserialize, Serialize};

use crate::daformer::{DaFormerConfig, DaFormerHead, Fusion};
use crate::mit::MixTransformer;
use crate::noise::Noise;
use crate::ModelError;

/// The decoder's output stride.
const OUTPUT_STRIDE: usize = 4;

/// Architecture of an [`Hrda`] network; serialised in `model.json`. Sizes are
/// `[height, width]` in pixels of the images as the network sees them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HrdaConfig {
    /// The shared encoder and decoder.
    pub network: DaFormerConfig,
    /// Embedding and fusion width of the scale-attention head (256 in HRDA).
    #[serde(default = "default_attention_width")]
    pub attention_embed_dim: usize,
    /// Scale of the context view (0.5 in HRDA); `1 / context_scale` must be a whole number.
    #[serde(default = "default_context_scale")]
    pub context_scale: f64,
    /// The detail crop (HRDA: 512 x 512 of the 1024 x 1024 training crop).
    #[serde(default = "default_detail_crop")]
    pub detail_crop: [usize; 2],
    /// Weight of the detail crop's own loss; the fused prediction's gets the rest (HRDA's
    /// `hr_loss_weight`, 0.1).
    #[serde(default = "default_detail_loss_weight")]
    pub detail_loss_weight: f64,
    /// The window of sliding-window inference at test time (HRDA: 1024 x 1024).
    #[serde(default = "default_test_window")]
    pub test_window: [usize; 2],
    /// The stride of sliding-window inference at test time (HRDA: 512 x 512).
    #[serde(default = "default_test_stride")]
    pub test_stride: [usize; 2],
}

fn default_attention_width() -> usize {
    256
}

fn default_context_scale() -> f64 {
    0.5
}

fn default_detail_crop() -> [usize; 2] {
    [512, 512]
}

fn default_detail_loss_weight() -> f64 {
    0.1
}

fn default_test_window() -> [usize; 2] {
    [1024, 1024]
}

fn default_test_stride() -> [usize; 2] {
    [512, 512]
}

/// A window of an image, in its pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PixelWindow {
    /// First row.
    pub top: usize,
    /// First column.
    pub left: usize,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
}

impl PixelWindow {
    /// The same window on a grid `factor` times coarser (`top / factor`, ...).
    fn scaled_down(&self, factor: usize) -> Self {
        Self {
            top: self.top / factor,
            left: self.left / factor,
            height: self.height / factor,
            width: self.width / factor,
        }
    }

    fn rows(&self) -> std::ops::Range<usize> {
        self.top..self.top + self.height
    }

    fn cols(&self) -> std::ops::Range<usize> {
        self.left..self.left + self.width
    }

    /// The window of `[n, c, h, w]` values.
    pub fn slice(&self, x: Tensor<4>) -> Tensor<4> {
        let [n, c, _, _] = x.dims();
        x.slice([0..n, 0..c, self.rows(), self.cols()])
    }

    /// Copies the window out of row-major `[n, h, w]` planes (labels, pixel weights).
    pub fn crop_planes<T: Copy>(&self, data: &[T], [n, h, w]: [usize; 3]) -> Vec<T> {
        debug_assert_eq!(data.len(), n * h * w);
        let mut out = Vec::with_capacity(n * self.height * self.width);
        for plane in data.chunks(h * w) {
            for row in self.rows() {
                out.extend_from_slice(
                    &plane[row * w + self.left..row * w + self.left + self.width],
                );
            }
        }
        out
    }
}

/// mmseg's sliding windows of `crop` over an image of `size` at `stride` (`slide_inference`,
/// HRDA's `extract_slide_feat`): a grid from the top-left corner, the last row and column
/// moved back inside the image; a crop larger than the image becomes the image.
pub fn slide_windows(size: [usize; 2], crop: [usize; 2], stride: [usize; 2]) -> Vec<PixelWindow> {
    let grid = |i: usize| size[i].saturating_sub(crop[i]).div_ceil(stride[i]) + 1;
    let mut windows = Vec::new();
    for row in 0..grid(0) {
        for col in 0..grid(1) {
            let bottom = (row * stride[0] + crop[0]).min(size[0]);
            let right = (col * stride[1] + crop[1]).min(size[1]);
            let top = bottom.saturating_sub(crop[0]);
            let left = right.saturating_sub(crop[1]);
            windows.push(PixelWindow {
                top,
                left,
                height: bottom - top,
                width: right - left,
            });
        }
    }
    windows
}

impl HrdaConfig {
    /// HRDA on `network` with the paper's settings.
    pub fn new(network: DaFormerConfig) -> Self {
        Self {
            network,
            attention_embed_dim: default_attention_width(),
            context_scale: default_context_scale(),
            detail_crop: default_detail_crop(),
            detail_loss_weight: default_detail_loss_weight(),
            test_window: default_test_window(),
            test_stride: default_test_stride(),
        }
    }

    /// `1 / context_scale`.
    pub fn context_factor(&self) -> usize {
        (1.0 / self.context_scale).round() as usize
    }

    /// What window offsets and image sides must be multiples of: one cell of the context's
    /// logits in image pixels (HRDA's `crop_coord_divisible`, 8 at scale 0.5).
    pub fn divisor(&self) -> usize {
        OUTPUT_STRIDE * self.context_factor()
    }

    /// The scale-attention head's config: DAFormer's decoder with `attention_embed_dim`
    /// channels and a 1x1-conv fusion in place of the ASPP (HRDA's `attn_cfg`), one output per
    /// class.
    fn attention_head(&self) -> DaFormerConfig {
        let mut head = self.network.clone();
        head.embed_dim = self.attention_embed_dim;
        head.channels = self.attention_embed_dim;
        if matches!(head.fusion, Fusion::SepAspp { .. }) {
            head.fusion = Fusion::Conv1x1;
        }
        head
    }

    /// Checks the config before anything is allocated.
    pub fn validate(&self) -> Result<(), ModelError> {
        self.network.validate()?;
        let invalid = |m: String| Err(ModelError::InvalidConfig(m));
        if self.attention_embed_dim == 0 {
            return invalid("the scale attention needs at least one channel".into());
        }
        let k = 1.0 / self.context_scale;
        if !(self.context_scale > 0.0 && self.context_scale < 1.0) || (k - k.round()).abs() > 1e-9 {
            return invalid(format!(
                "context_scale must be 1/k for a whole k >= 2 (HRDA: 0.5), got {}",
                self.context_scale
            ));
        }
        if !(0.0..=1.0).contains(&self.detail_loss_weight) {
            return invalid(format!(
                "detail_loss_weight must be in [0, 1], got {}",
                self.detail_loss_weight
            ));
        }
        let d = self.divisor();
        for (name, size) in [
            ("detail_crop", self.detail_crop),
            ("test_window", self.test_window),
            ("test_stride", self.test_stride),
        ] {
            if size.iter().any(|&s| s == 0 || s % d != 0) {
                return invalid(format!(
                    "{name} must be whole multiples of {d} pixels (the context's logit cell at \
                     scale {}), got {}x{} (height x width)",
                    self.context_scale, size[0], size[1]
                ));
            }
        }
        let least = self.network.encoder.min_input();
        if self.detail_crop.iter().any(|&s| s < least) {
            return invalid(format!(
                "detail_crop must be at least {least} pixels a side (the encoder's first \
                 reduction), got {}x{} (height x width)",
                self.detail_crop[0], self.detail_crop[1]
            ));
        }
        if self.detail_crop[0] > self.test_window[0] || self.detail_crop[1] > self.test_window[1] {
            return invalid(format!(
                "the detail crop ({}x{}) must fit in the test window ({}x{})",
                self.detail_crop[0], self.detail_crop[1], self.test_window[0], self.test_window[1]
            ));
        }
        Ok(())
    }

    /// Checks that images of `size` can go through the network: sides that are multiples of
    /// [`HrdaConfig::divisor`], and with `training`, at least the detail crop.
    pub fn check_input(&self, [h, w]: [usize; 2], training: bool) -> Result<(), String> {
        let d = self.divisor();
        if h % d != 0 || w % d != 0 {
            return Err(format!(
                "HRDA needs image sides that are multiples of {d} pixels (its context at scale \
                 {} must fall on whole logit cells), got {w}x{h}; preprocess or crop to such a \
                 size (e.g. {}x{})",
                self.context_scale,
                w.div_ceil(d) * d,
                h.div_ceil(d) * d
            ));
        }
        let least = self.context_factor() * self.network.encoder.min_input();
        if h < least || w < least {
            return Err(format!(
                "HRDA needs image sides of at least {least} pixels (its context view at scale \
                 {} must be {} pixels for the encoder's first reduction), got {w}x{h}",
                self.context_scale,
                self.network.encoder.min_input()
            ));
        }
        let [ch, cw] = self.detail_crop;
        if training && (h < ch || w < cw) {
            return Err(format!(
                "HRDA's detail crop ({cw}x{ch}) is larger than the training images ({w}x{h}); \
                 use a smaller `detail_crop` or larger crops"
            ));
        }
        Ok(())
    }

    /// Builds the network with random weights: encoder and decoder as
    /// [`DaFormerConfig::init`], the attention head as a DAFormer decoder.
    pub fn init(&self, device: &Device) -> Result<Hrda, ModelError> {
        self.validate()?;
        Ok(Hrda {
            arch: self.clone(),
            backbone: self.network.encoder.init(device)?,
            decode_head: self.network.init_head(device),
            scale_attention: self.attention_head().init_head(device),
        })
    }
}

/// HRDA's network: a MiT encoder, DAFormer's decoder and the scale-attention head.
#[derive(Module, Debug)]
pub struct Hrda {
    /// The architecture it was built with (not part of its record).
    #[module(skip)]
    pub arch: HrdaConfig,
    /// The MiT encoder, shared by both views.
    pub backbone: MixTransformer,
    /// The decoder, shared by both views.
    pub decode_head: DaFormerHead,
    /// The scale-attention head, on the context's features.
    pub scale_attention: DaFormerHead,
}

/// The outputs of one training forward pass, at stride 4.
pub struct HrdaTrainOutput {
    /// The fused logits over the whole image, `[N, C, H/4, W/4]`.
    pub fused: Tensor<4>,
    /// The detail crop's logits, `[N, C, h/4, w/4]` for a crop of `h x w`.
    pub detail: Tensor<4>,
    /// Where the detail crop was taken, in image pixels.
    pub window: PixelWindow,
    /// The context's logits before the attention weighs them, `[N, C, H/4k, W/4k]`.
    pub context: Tensor<4>,
    /// The attention, zero outside the window, at the context's resolution.
    pub attention: Tensor<4>,
    /// The encoder's stage-4 map of the context (the features of HRDA's feature distance, its
    /// `feature_scale = 0.5`).
    pub context_features: Tensor<4>,
}

impl Hrda {
    /// The context view of `images`.
    fn context_view(&self, images: Tensor<4>) -> Tensor<4> {
        let [_, _, h, w] = images.dims();
        let k = self.arch.context_factor();
        resize(images, [h / k, w / k])
    }

    /// The encoder's stage-4 map of the context view, without stochastic depth (the frozen
    /// network of the feature distance: HRDA's `extract_feat` at `feature_scale = 0.5`).
    pub fn context_features(&self, images: Tensor<4>) -> Tensor<4> {
        self.backbone
            .forward(self.context_view(images), &mut Noise::none())
            .pop()
            .expect("the encoder has four stages")
    }

    /// A detail window of an image of `size`, offsets drawn from `noise` as HRDA's
    /// `get_crop_bbox` (uniform over the multiples of [`HrdaConfig::divisor`] that keep it
    /// inside; at the top-left corner without a source).
    pub fn draw_window(&self, [h, w]: [usize; 2], noise: &mut Noise<'_>) -> PixelWindow {
        let [ch, cw] = self.arch.detail_crop;
        let d = self.arch.divisor();
        // `randint(0, (margin + 1) // divisible) * divisible`, as the reference: the floor
        // leaves out the last offset when the margin is a multiple of the divisor.
        let top = noise.below(((h.saturating_sub(ch) + 1) / d).max(1)) * d;
        let left = noise.below(((w.saturating_sub(cw) + 1) / d).max(1)) * d;
        PixelWindow {
            top,
            left,
            height: ch,
            width: cw,
        }
    }

    /// The training pass on `images` `[N, 3, H, W]` (sides multiples of
    /// [`HrdaConfig::divisor`], at least the detail crop) with the detail crop at `window`;
    /// dropout and stochastic depth draw from `noise` when it has a source.
    pub fn forward_train(
        &self,
        images: Tensor<4>,
        window: PixelWindow,
        noise: &mut Noise<'_>,
    ) -> HrdaTrainOutput {
        let [n, _, h, w] = images.dims();
        let context_features = self
            .backbone
            .forward(self.context_view(images.clone()), noise);
        let detail_features = self.backbone.forward(window.slice(images), noise);
        let context = self.decode_head.forward(&context_features, noise);
        let detail = self.decode_head.forward(&detail_features, noise);
        let attention = sigmoid(self.scale_attention.forward(&context_features, noise));
        let [_, classes, lh, lw] = attention.dims();
        let mut inside = vec![0.0f32; lh * lw];
        let cell = window.scaled_down(self.arch.divisor());
        for row in cell.rows() {
            inside[row * lw + cell.left..row * lw + cell.left + cell.width].fill(1.0);
        }
        let inside =
            Tensor::<4>::from_data(TensorData::new(inside, [1, 1, lh, lw]), &attention.device());
        let attention = attention * inside;
        let size = [h / OUTPUT_STRIDE, w / OUTPUT_STRIDE];
        let at_stride4 = window.scaled_down(OUTPUT_STRIDE);
        let inserted = Tensor::<4>::zeros([n, classes, size[0], size[1]], &detail.device())
            .slice_assign(
                [0..n, 0..classes, at_stride4.rows(), at_stride4.cols()],
                detail.clone(),
            );
        let fused = self.fuse(context.clone(), attention.clone(), inserted, size);
        HrdaTrainOutput {
            fused,
            detail,
            window,
            context,
            attention,
            context_features: context_features
                .into_iter()
                .last()
                .expect("the encoder has four stages"),
        }
    }

    /// `up(a) * detail + up((1 - a) * context)` at `size`.
    fn fuse(
        &self,
        context: Tensor<4>,
        attention: Tensor<4>,
        detail: Tensor<4>,
        size: [usize; 2],
    ) -> Tensor<4> {
        let weighted_context = (attention.clone().neg().add_scalar(1.0)) * context;
        resize(attention, size) * detail + resize(weighted_context, size)
    }

    /// The whole-image pass (HRDA's `encode_decode`, which also labels the target for the
    /// teacher): the fused logits `[N, C, H/4, W/4]` with the detail logits averaged over
    /// overlapping detail crops at half a crop's stride; dropout and stochastic depth draw
    /// from `noise` when it has a source. Image sides must be multiples of
    /// [`HrdaConfig::divisor`].
    pub fn forward(&self, images: Tensor<4>, noise: &mut Noise<'_>) -> Tensor<4> {
        let [n, _, h, w] = images.dims();
        let context_features = self
            .backbone
            .forward(self.context_view(images.clone()), noise);
        let context = self.decode_head.forward(&context_features, noise);
        let attention = sigmoid(self.scale_attention.forward(&context_features, noise));
        let [ch, cw] = self.arch.detail_crop;
        let windows = slide_windows([h, w], [ch, cw], [ch / 2, cw / 2]);
        // All crops of all images in one batch, crop-major as HRDA's `extract_slide_feat`.
        let crops = Tensor::cat(
            windows
                .iter()
                .map(|win| win.slice(images.clone()))
                .collect(),
            0,
        );
        let crop_logits = self
            .decode_head
            .forward(&self.backbone.forward(crops, noise), noise);
        let classes = crop_logits.dims()[1];
        let size = [h / OUTPUT_STRIDE, w / OUTPUT_STRIDE];
        let detail = average_windows(
            crop_logits,
            &windows
                .iter()
                .map(|win| win.scaled_down(OUTPUT_STRIDE))
                .collect::<Vec<_>>(),
            [n, classes, size[0], size[1]],
        );
        self.fuse(context, attention, detail, size)
    }

    /// The test-time logits `[N, C, H, W]` of `images`: sliding `test_window` windows at
    /// `test_stride` (mmseg's `slide` mode), each window's [`Hrda::forward`] resized to the
    /// window (bilinear, `align_corners=False`), averaged where windows overlap. No dropout or
    /// stochastic depth.
    pub fn infer(&self, images: Tensor<4>) -> Tensor<4> {
        let [n, _, h, w] = images.dims();
        let windows = slide_windows([h, w], self.arch.test_window, self.arch.test_stride);
        let logits: Vec<Tensor<4>> = windows
            .iter()
            .map(|win| {
                let out = self.forward(win.slice(images.clone()), &mut Noise::none());
                resize(out, [win.height, win.width])
            })
            .collect();
        let classes = logits[0].dims()[1];
        average_windows(Tensor::cat(logits, 0), &windows, [n, classes, h, w])
    }
}

/// The mean over overlapping windows of per-window maps: `maps` holds, window-major, `N`
/// maps per window at the window's size; the result is `shape`, each cell averaged over the
/// windows that cover it.
fn average_windows(maps: Tensor<4>, windows: &[PixelWindow], shape: [usize; 4]) -> Tensor<4> {
    let [n, c, h, w] = shape;
    let device = maps.device();
    let mut sum = Tensor::<4>::zeros(shape, &device);
    let mut count = vec![0u32; h * w];
    for (i, win) in windows.iter().enumerate() {
        let piece = maps
            .clone()
            .slice([i * n..(i + 1) * n, 0..c, 0..win.height, 0..win.width]);
        let ranges = [0..n, 0..c, win.rows(), win.cols()];
        sum = sum
            .clone()
            .slice_assign(ranges.clone(), sum.slice(ranges) + piece);
        for row in win.rows() {
            for v in &mut count[row * w + win.left..row * w + win.left + win.width] {
                *v += 1;
            }
        }
    }
    assert!(
        count.iter().all(|&v| v > 0),
        "sliding windows cover the whole image"
    );
    let inverse: Vec<f32> = count.iter().map(|&v| 1.0 / v as f32).collect();
    sum * Tensor::<4>::from_data(TensorData::new(inverse, [1, 1, h, w]), &device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_follow_mmseg() {
        // Cityscapes at 2048x1024 in 1024 windows at stride 512: three windows.
        let w = slide_windows([1024, 2048], [1024, 1024], [512, 512]);
        assert_eq!(
            w.iter().map(|w| (w.top, w.left)).collect::<Vec<_>>(),
            [(0, 0), (0, 512), (0, 1024)]
        );
        // HRDA's detail crops of a 1024 crop: 512 at stride 256, 3 x 3.
        assert_eq!(slide_windows([1024, 1024], [512, 512], [256, 256]).len(), 9);
        // The last window moves back inside the image.
        let w = slide_windows([40, 56], [32, 32], [16, 16]);
        assert_eq!(
            w.iter().map(|w| (w.top, w.left)).collect::<Vec<_>>(),
            [(0, 0), (0, 16), (0, 24), (8, 0), (8, 16), (8, 24)]
        );
        // A window larger than the image is the image.
        let w = slide_windows([24, 40], [32, 32], [16, 16]);
        assert_eq!(
            w,
            [
                PixelWindow {
                    top: 0,
                    left: 0,
                    height: 24,
                    width: 32
                },
                PixelWindow {
                    top: 0,
                    left: 8,
                    height: 24,
                    width: 32
                }
            ]
        );
    }

    #[test]
    fn planes_crop_row_by_row() {
        let data: Vec<u8> = (0..2 * 4 * 5).map(|v| v as u8).collect();
        let win = PixelWindow {
            top: 1,
            left: 2,
            height: 2,
            width: 3,
        };
        assert_eq!(
            win.crop_planes(&data, [2, 4, 5]),
            [7, 8, 9, 12, 13, 14, 27, 28, 29, 32, 33, 34]
        );
    }
}
