//! Mean-teacher self-training with ClassMix: DACS (Tranheden et al., WACV 2021) and MIC's masked
//! image consistency on top of it (Hoyer et al., CVPR 2023), as switches of one loop.
//!
//! Each iteration, after the supervised term on the source batch:
//! 1. the teacher (an exponential moving average of the student's parameters, BatchNorm on batch
//!    statistics as the references run it) labels the un-augmented target batch; the target
//!    pixels' weight is the share of pixels whose confidence reaches `pseudo_threshold`;
//! 2. ClassMix pastes half of the classes of each source image (or of the source batch) onto a
//!    target image, with their labels; colour jitter and Gaussian blur follow the mixing; the
//!    student's cross-entropy on the mixed batch, weighted per pixel, is the `mix` term;
//! 3. with MIC, the colour-augmented target batch with random blocks masked must give the
//!    teacher's pseudo-labels of the unmasked images: the `mic` term;
//! 4. after the optimiser step the teacher moves toward the student (`ema_update`).
//!
//! The student never runs on the plain target batch (it would move its BatchNorm statistics).
//!
//! The pieces that do not touch the network are host functions in [`mixing`] and [`augment`].

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Device, Tensor};
use dag_api::ParamSet;
use dag_model::{upsample, upsample_differentiable, DeepLabV2};
use rand_core::RngCore;
use serde::{Deserialize, Serialize};

use crate::data::{ImageBatch, LabelBatch, SourceBatch};
use crate::losses::masked_cross_entropy;

pub mod augment;
pub mod mixing;

use augment::StrongAugment;
use mixing::{ClassChoice, PseudoLabels};

/// The switches of a self-training method row (`crate::methods::METHODS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SelfTraining {
    /// Whether MIC's masked-image term is added.
    pub mic: bool,
}

/// The params of the mean teacher and ClassMix, shared by every self-training method. Defaults
/// are DACS's (`configs/configUDA.json`).
#[derive(Debug, Clone, PartialEq, ParamSet, Serialize, Deserialize)]
pub struct SelfTrainingParams {
    /// largest EMA decay of the teacher: alpha_t = min(1 - 1/(t+1), ema_alpha) (DACS 0.99,
    /// DAFormer and MIC 0.999)
    #[param(default = 0.99, min = 0.0, max = 1.0)]
    pub ema_alpha: f64,
    /// when the teacher moves: `dacs` after step t with alpha_t (the teacher copies the student
    /// after the first step), or `daformer` before step t >= 1 with alpha_t (DAFormer, HRDA and
    /// MIC: the same update one step later, so the first average has alpha 0.5)
    #[param(default = "dacs", one_of = ["dacs", "daformer"])]
    pub ema_timing: String,
    /// teacher confidence at or above which a pixel counts as sure; every target pixel is
    /// weighted by the share of sure pixels in the batch
    #[param(default = 0.968, min = 0.0, max = 1.0)]
    pub pseudo_threshold: f64,
    /// where ClassMix draws the pasted classes from: each source image's own (`per_image`, DACS)
    /// or the whole source batch's (`per_batch`, DAFormer, HRDA and MIC)
    #[param(default = "per_image", one_of = ["per_image", "per_batch"])]
    pub class_mix: String,
    /// weight of the cross-entropy on the mixed batch
    #[param(default = 1.0, min = 0.0)]
    pub lambda_mix: f64,
    /// strength s of the colour jitter after mixing: brightness, contrast and saturation factors
    /// in [1-s, 1+s], hue shift in [-s, s] (DACS 0.25, DAFormer 0.2)
    #[param(default = 0.25, min = 0.0, max = 0.5)]
    pub jitter_strength: f64,
    /// probability that a batch is colour-jittered (0.8 in DACS and DAFormer; DAFormer's
    /// `color_jitter_probability: 0.2` is the probability of skipping it)
    #[param(default = 0.8, min = 0.0, max = 1.0)]
    pub jitter_p: f64,
    /// probability that a batch is blurred (Gaussian, sigma in [0.15, 1.15], kernel about a
    /// tenth of the image side; 0.5 in DACS and DAFormer)
    #[param(default = 0.5, min = 0.0, max = 1.0)]
    pub blur_p: f64,
    /// pseudo-label rows never trusted at the top of each target image (DAFormer at 512x512
    /// crops: 15)
    #[param(default = 0)]
    pub pl_crop_top: usize,
    /// pseudo-label rows never trusted at the bottom of each target image (DAFormer at 512x512
    /// crops: 120, the ego vehicle)
    #[param(default = 0)]
    pub pl_crop_bottom: usize,
    /// denominator of the source cross-entropy: the labelled pixels (`valid`, DACS) or every
    /// pixel, ignored ones included (`all`, DAFormer's mmseg loss)
    #[param(default = "valid", one_of = ["valid", "all"])]
    pub source_ce_over: String,
}

/// MIC's masked-image consistency. Defaults are MIC's at 512x512 crops (`experiments.py`; 64 at
/// 1024x1024).
#[derive(Debug, Clone, PartialEq, ParamSet, Serialize, Deserialize)]
pub struct MicParams {
    /// side in pixels of the square blocks that MIC masks
    #[param(default = 32, min = 1)]
    pub mic_block: usize,
    /// share of the blocks masked
    #[param(default = 0.7, min = 0.0, max = 1.0)]
    pub mic_ratio: f64,
    /// weight of the masked-image term
    #[param(default = 1.0, min = 0.0)]
    pub lambda_mic: f64,
}

impl SelfTrainingParams {
    /// The ClassMix variant.
    pub fn class_choice(&self) -> ClassChoice {
        match self.class_mix.as_str() {
            "per_batch" => ClassChoice::PerBatch,
            _ => ClassChoice::PerImage,
        }
    }

    /// The EMA decay of the update that follows step `iteration` (from 0).
    pub fn ema_alpha_after(&self, iteration: usize) -> f64 {
        let t = if self.ema_timing == "daformer" {
            iteration + 1
        } else {
            iteration
        };
        ema_alpha(t, self.ema_alpha)
    }

    /// Whether the source cross-entropy averages over every pixel.
    pub fn source_ce_over_all_pixels(&self) -> bool {
        self.source_ce_over == "all"
    }

    fn augment(&self) -> StrongAugment {
        StrongAugment {
            jitter_strength: self.jitter_strength as f32,
            jitter_p: self.jitter_p as f32,
            blur_p: self.blur_p as f32,
        }
    }
}

/// A self-training method with its params bound.
#[derive(Debug, Clone)]
pub(crate) struct SelfTrainingRun {
    pub params: SelfTrainingParams,
    pub mic: Option<MicParams>,
}

/// One weighted loss term, handed to the loop as soon as it is computed so that its graph can
/// be freed before the next forward pass.
pub(crate) struct WeightedTerm {
    pub name: &'static str,
    pub weight: f64,
    pub value: Tensor<1>,
}

/// The EMA decay of iteration `iteration` (from 0): `min(1 - 1/(t+1), alpha)`, so the teacher
/// copies the student after the first step and averages over more steps as training goes on.
pub fn ema_alpha(iteration: usize, alpha: f64) -> f64 {
    (1.0 - 1.0 / (iteration as f64 + 1.0)).min(alpha)
}

/// BatchNorm's running statistics: buffers, never averaged into the teacher.
fn is_buffer(field: Option<&String>) -> bool {
    matches!(
        field.map(String::as_str),
        Some("running_mean" | "running_var")
    )
}

/// `teacher <- alpha * teacher + (1 - alpha) * student` over the parameters (BatchNorm's running
/// statistics are left as they are, as the references average `parameters()` only).
pub fn ema_update(teacher: DeepLabV2, student: &DeepLabV2, alpha: f64) -> DeepLabV2 {
    struct Collect {
        path: Vec<String>,
        values: Vec<Tensor<1>>,
    }
    impl ModuleVisitor for Collect {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if !is_buffer(self.path.last()) {
                let t = param.val().inner();
                let n = t.dims().iter().product::<usize>();
                self.values.push(t.reshape([n]));
            }
        }
    }
    struct Average {
        path: Vec<String>,
        student: std::vec::IntoIter<Tensor<1>>,
        alpha: f64,
    }
    impl ModuleMapper for Average {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            if is_buffer(self.path.last()) {
                return param;
            }
            let s = self
                .student
                .next()
                .expect("teacher and student have the same parameters");
            let alpha = self.alpha;
            // On the plain tensors, re-wrapped as fresh leaves: results of autodiff ops would stay
            // registered in the autodiff graph, which no backward pass ever frees for the teacher.
            param.map(|t| {
                let autodiff = t.is_autodiff();
                let t = t.inner();
                let dims = t.dims();
                let averaged = t.mul_scalar(alpha) + s.reshape(dims).mul_scalar(1.0 - alpha);
                if autodiff {
                    averaged.autodiff()
                } else {
                    averaged
                }
            })
        }
    }
    let mut collect = Collect {
        path: Vec::new(),
        values: Vec::new(),
    };
    student.visit(&mut collect);
    teacher.map(&mut Average {
        path: Vec::new(),
        student: collect.values.into_iter(),
        alpha,
    })
}

/// The teacher of a student: its parameters, its own BatchNorm statistics, no gradients. It
/// stays on the training device so that its BatchNorm layers normalise with batch statistics.
pub fn new_teacher(
    student: &DeepLabV2,
    device: &Device,
) -> Result<DeepLabV2, dag_model::ModelError> {
    Ok(student.independent_copy(device)?.no_grad())
}

/// `sum_p weight_p CE_p / (N H W)` of `logits` `[N, C, H, W]` against `labels` `[N, H, W]`
/// (row-major, 255 ignored) with per-pixel `weights`: the references' per-pixel
/// weighted cross-entropy averaged over every pixel, ignored ones included. Computed as one
/// masked mean per distinct weight (a batch has at most three: 1 on pasted source pixels, the
/// confidence weight on target pixels, 0 on cropped ones), which reuses the backend's fused
/// cross-entropy.
pub fn weighted_cross_entropy(logits: Tensor<4>, labels: &[u8], weights: &[f32]) -> Tensor<1> {
    let [n, _, h, w] = logits.dims();
    let device = logits.device();
    let device = &device;
    let total = (n * h * w) as f64;
    let mut distinct: Vec<f32> = Vec::new();
    for &wt in weights {
        if wt != 0.0 && !distinct.contains(&wt) {
            distinct.push(wt);
        }
    }
    let mut sum: Option<Tensor<1>> = None;
    for wt in distinct {
        let (group, count) = mixing::labels_with_weight(labels, weights, wt);
        if count == 0 {
            continue;
        }
        let group = LabelBatch {
            data: group,
            shape: [n, h, w],
        };
        let ce = masked_cross_entropy(logits.clone(), group.tensor(device))
            .mul_scalar(f64::from(wt) * count as f64 / total);
        sum = Some(match sum {
            Some(s) => s + ce,
            None => ce,
        });
    }
    // No pixel with a weight: a zero that still belongs to the graph.
    sum.unwrap_or_else(|| logits.sum().mul_scalar(0.0))
}

fn batch(data: Vec<f32>, shape: [usize; 4]) -> ImageBatch {
    ImageBatch { data, shape }
}

/// The student's main logits of `images`, upsampled to their size.
fn student_logits(student: &DeepLabV2, images: Tensor<4>) -> Tensor<4> {
    let [_, _, h, w] = images.dims();
    let (_, main) = student.forward(images);
    upsample_differentiable(main, [h, w])
}

/// Checks that the source and target batches can be mixed: the same image size, labels at the
/// image size.
pub(crate) fn check_batches(source: &SourceBatch, target: &ImageBatch) -> Result<(), String> {
    let [ns, _, hs, ws] = source.images.shape;
    let [nt, _, ht, wt] = target.shape;
    if [hs, ws] != [ht, wt] || ns != nt {
        return Err(format!(
            "ClassMix pastes source pixels onto target images of the same size, but the source \
             batch is {ns}x{ws}x{hs} and the target batch {nt}x{wt}x{ht}; preprocess both to one \
             `size` or give the stage a `crop`"
        ));
    }
    if source.labels.shape != [ns, hs, ws] {
        return Err(format!(
            "self-training needs source labels at the image size ({ws}x{hs}), got {:?}",
            source.labels.shape
        ));
    }
    Ok(())
}

/// The self-training terms of one iteration (`mix`, then `mic`), each handed to `emit` as soon
/// as it is computed. Random draws come from `rng` in a fixed order: the ClassMix classes, the
/// mixed batch's augmentation, then MIC's augmentation and block masks.
pub(crate) fn terms(
    run: &SelfTrainingRun,
    (teacher, student): (&DeepLabV2, &DeepLabV2),
    source: &SourceBatch,
    target: &ImageBatch,
    rng: &mut dyn RngCore,
    device: &Device,
    emit: &mut dyn FnMut(WeightedTerm) -> Result<(), crate::TrainError>,
) -> Result<(), crate::TrainError> {
    let p = &run.params;
    let [n, c, h, w] = target.shape;
    let plane = h * w;

    // 1. Pseudo-labels of the un-augmented target batch.
    let (_, teacher_main) = teacher.forward(target.tensor(device));
    let teacher_logits = upsample(teacher_main, [h, w]);
    let classes = teacher_logits.dims()[1];
    let logits: Vec<f32> = teacher_logits
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("f32 logits");
    let PseudoLabels {
        labels: pseudo,
        confidence,
    } = mixing::pseudo_labels(&logits, [n, classes, h, w]);
    let quality = mixing::confidence_weight(&confidence, p.pseudo_threshold as f32);
    let mut target_weight = vec![quality; n * plane];
    mixing::crop_weight_rows(&mut target_weight, [h, w], p.pl_crop_top, p.pl_crop_bottom);

    // 2. ClassMix, then the strong augmentation of the mixed batch.
    let picks = mixing::draw_mix_classes(&source.labels.data, [n, h, w], p.class_choice(), rng);
    let mut mixed = Vec::with_capacity(n * c * plane);
    let mut mixed_labels = Vec::with_capacity(n * plane);
    let mut mixed_weight = Vec::with_capacity(n * plane);
    for (img, classes) in picks.iter().enumerate() {
        let px = img * plane..(img + 1) * plane;
        let values = img * c * plane..(img + 1) * c * plane;
        let mask = mixing::class_mask(&source.labels.data[px.clone()], classes);
        mixed.extend(mixing::mix_image(
            &mask,
            &source.images.data[values.clone()],
            &target.data[values],
        ));
        mixed_labels.extend(mixing::mix_pixels(
            &mask,
            &source.labels.data[px.clone()],
            &pseudo[px.clone()],
        ));
        let ones = vec![1.0f32; plane];
        mixed_weight.extend(mixing::mix_pixels(&mask, &ones, &target_weight[px]));
    }
    p.augment().apply(&mut mixed, [n, c, h, w], rng);
    let value = weighted_cross_entropy(
        student_logits(student, batch(mixed, [n, c, h, w]).tensor(device)),
        &mixed_labels,
        &mixed_weight,
    );
    emit(WeightedTerm {
        name: "mix",
        weight: p.lambda_mix,
        value,
    })?;

    // 3. MIC: the augmented target with blocks masked, against the unmasked pseudo-labels.
    if let Some(mic) = &run.mic {
        let mut masked = target.data.clone();
        // MIC transforms the target batch in one call: one jitter order and one sigma for the
        // batch (ClassMix's transform runs once per mixed image).
        p.augment().apply_to_batch(&mut masked, [n, c, h, w], rng);
        for img in 0..n {
            let keep = mixing::block_mask(h, w, mic.mic_block, mic.mic_ratio as f32, rng);
            let values = &mut masked[img * c * plane..(img + 1) * c * plane];
            for channel in values.chunks_mut(plane) {
                for (v, &k) in channel.iter_mut().zip(&keep) {
                    if !k {
                        // Zero in the normalised image: the dataset's mean colour.
                        *v = 0.0;
                    }
                }
            }
        }
        let value = weighted_cross_entropy(
            student_logits(student, batch(masked, [n, c, h, w]).tensor(device)),
            &pseudo,
            &target_weight,
        );
        emit(WeightedTerm {
            name: "mic",
            weight: mic.lambda_mic,
            value,
        })?;
    }
    Ok(())
}
