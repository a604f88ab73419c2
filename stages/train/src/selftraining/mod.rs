//! Self-training on the target batch as switches of one loop: DACS's mean teacher with ClassMix
//! (Tranheden et al., WACV 2021), MIC's masked image consistency on top of it (Hoyer et al.,
//! CVPR 2023), and TUFL's two-view focal loss with its cross-domain mixing (Yan et al., T-ITS
//! 2023).
//!
//! Each iteration, after the supervised term on the source batch:
//! 0. with TUFL, the student's prediction of the target batch teaches its prediction of a
//!    strongly augmented and warped copy, on the pixels above their class's adaptive threshold:
//!    the `focal` term ([`tufl`]);
//! 1. the teacher labels the un-augmented target batch: an exponential moving average of the
//!    student's parameters, BatchNorm on batch statistics as the references run it (DACS, MIC),
//!    or the starting network frozen (TUFL's CIM); the target pixels' weight is the share of
//!    pixels whose confidence reaches `pseudo_threshold`;
//! 2. ClassMix pastes half of the classes of each source image (or of the source batch) onto a
//!    target image, with their labels; colour jitter and Gaussian blur follow the mixing; the
//!    student's cross-entropy on the mixed batch, weighted per pixel, is the `mix` term;
//! 3. with MIC, the colour-augmented target batch with random blocks masked must give the
//!    teacher's pseudo-labels of the unmasked images: the `mic` term;
//! 4. after the optimiser step an EMA teacher moves toward the student (`ema_update`).
//!
//! Without TUFL the student never runs on the plain target batch (it would move its BatchNorm
//! statistics); TUFL's weak view is that batch, as in its reference.
//!
//! The pieces that do not touch the network are host functions in [`mixing`], [`augment`] and
//! [`tufl`].

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Device, Tensor};
use dag_api::ParamSet;
use dag_model::{Noise, Segmenter};
use rand_core::RngCore;
use serde::{Deserialize, Serialize};

use crate::data::{ImageBatch, LabelBatch, SourceBatch, Window};
use crate::losses::masked_cross_entropy;

pub mod augment;
pub mod mixing;
pub mod tufl;

use augment::StrongAugment;
use mixing::{ClassChoice, PseudoLabels};
use tufl::TuflParams;

/// The switches of a self-training method row (`crate::methods::METHODS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SelfTraining {
    /// Where ClassMix's pseudo-labels come from; `None`: no ClassMix (and no MIC).
    pub teacher: Option<Teacher>,
    /// Whether MIC's masked-image term is added (needs a teacher).
    pub mic: bool,
    /// Whether TUFL's two-view focal term is added.
    pub tufl: bool,
}

/// The network that labels the target batch for ClassMix and MIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Teacher {
    /// An exponential moving average of the student's parameters, normalising with batch
    /// statistics (DACS, DAFormer, MIC).
    Ema,
    /// The starting network, frozen and normalising with its running statistics (TUFL's CIM:
    /// the stage-one model as `pseudo_net`, in eval mode).
    Frozen,
}

/// The params of the mean teacher. Defaults are DACS's (`configs/configUDA.json`).
#[derive(Debug, Clone, PartialEq, ParamSet, Serialize, Deserialize)]
pub struct TeacherParams {
    /// largest EMA decay of the teacher: alpha_t = min(1 - 1/(t+1), ema_alpha) (DACS 0.99,
    /// DAFormer and MIC 0.999)
    #[param(default = 0.99, min = 0.0, max = 1.0)]
    pub ema_alpha: f64,
    /// when the teacher moves: `dacs` after step t with alpha_t (the teacher copies the student
    /// after the first step), or `daformer` before step t >= 1 with alpha_t (DAFormer, HRDA and
    /// MIC: the same update one step later, so the first average has alpha 0.5)
    #[param(default = "dacs", one_of = ["dacs", "daformer"])]
    pub ema_timing: String,
}

/// The params of ClassMix on the teacher's pseudo-labels. Defaults are DACS's.
#[derive(Debug, Clone, PartialEq, ParamSet, Serialize, Deserialize)]
pub struct ClassMixParams {
    /// teacher confidence at or above which a pixel counts as sure; every target pixel is
    /// weighted by the share of sure pixels in the batch
    #[param(default = 0.968, min = 0.0, max = 1.0)]
    pub pseudo_threshold: f64,
    /// where ClassMix draws the pasted classes from: each source image's own (`per_image`, DACS
    /// and TUFL) or the whole source batch's (`per_batch`, DAFormer, HRDA and MIC)
    #[param(default = "per_image", one_of = ["per_image", "per_batch"])]
    pub class_mix: String,
    /// weight of the cross-entropy on the mixed batch (TUFL's `mixed_weight`: 0.5)
    #[param(default = 1.0, min = 0.0)]
    pub lambda_mix: f64,
    /// pseudo-label rows never trusted at the top of each target image (DAFormer at 512x512
    /// crops: 15)
    #[param(default = 0)]
    pub pl_crop_top: usize,
    /// pseudo-label rows never trusted at the bottom of each target image (DAFormer at 512x512
    /// crops: 120, the ego vehicle)
    #[param(default = 0)]
    pub pl_crop_bottom: usize,
    /// [top, bottom, left, right] margins of the whole target image whose pseudo-labels are
    /// never trusted, set before the crop and the flip, in pixels of the images as preprocessed
    /// (HRDA and MIC at 2048x1024: [30, 240, 30, 30]; scale them with the size, e.g. [15, 120,
    /// 15, 15] at 1024x512); instead of `pl_crop_top` and `pl_crop_bottom`
    pub pl_margins: Option<[usize; 4]>,
}

/// The strong augmentation of mixed images, MIC's target images and TUFL's strong view.
/// Defaults are DACS's.
#[derive(Debug, Clone, PartialEq, ParamSet, Serialize, Deserialize)]
pub struct StrongAugmentParams {
    /// strength s of the colour jitter of the strong augmentation: brightness, contrast and
    /// saturation factors in [1-s, 1+s], hue shift in [-s, s] (DACS 0.25, DAFormer 0.2)
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
}

/// How the self-training methods weigh the pixels of their cross-entropies.
#[derive(Debug, Clone, PartialEq, ParamSet, Serialize, Deserialize)]
pub struct PixelLossParams {
    /// denominator of the source cross-entropy: the labelled pixels (`valid`, DACS; with
    /// `class_weights`, their summed weights, PyTorch's weighted mean) or every pixel, ignored
    /// ones included (`all`, DAFormer's mmseg loss and TUFL's)
    #[param(default = "valid", one_of = ["valid", "all"])]
    pub source_ce_over: String,
    /// one weight per class on every pixel of the source, mixed and masked cross-entropies and
    /// on each class's channel of TUFL's loss (TUFL's `class_weight`, always on in its code);
    /// unset: all 1
    pub class_weights: Option<Vec<f64>>,
}

impl TeacherParams {
    /// The EMA decay of the update that follows step `iteration` (from 0).
    pub fn ema_alpha_after(&self, iteration: usize) -> f64 {
        let t = if self.ema_timing == "daformer" {
            iteration + 1
        } else {
            iteration
        };
        ema_alpha(t, self.ema_alpha)
    }
}

impl ClassMixParams {
    /// Checks across params.
    pub fn check(&self) -> Result<(), String> {
        if self.pl_margins.is_some() && (self.pl_crop_top > 0 || self.pl_crop_bottom > 0) {
            return Err(
                "`pl_margins` (set on the whole image) and `pl_crop_top` / `pl_crop_bottom` (on \
                 the crop) are two versions of the pseudo-label crop; give one"
                    .into(),
            );
        }
        Ok(())
    }

    /// The ClassMix variant.
    pub fn class_choice(&self) -> ClassChoice {
        match self.class_mix.as_str() {
            "per_batch" => ClassChoice::PerBatch,
            _ => ClassChoice::PerImage,
        }
    }
}

impl StrongAugmentParams {
    fn augment(&self, input: dag_model::InputConvention) -> StrongAugment {
        StrongAugment {
            jitter_strength: self.jitter_strength as f32,
            jitter_p: self.jitter_p as f32,
            blur_p: self.blur_p as f32,
            input: crate::data::normalisation(input),
        }
    }
}

impl PixelLossParams {
    /// Whether the source cross-entropy averages over every pixel.
    pub fn source_ce_over_all_pixels(&self) -> bool {
        self.source_ce_over == "all"
    }

    /// The class weights as the losses read them.
    pub fn class_weights(&self) -> Option<Vec<f32>> {
        self.class_weights
            .as_ref()
            .map(|w| w.iter().map(|&v| v as f32).collect())
    }

    /// Checks the weights: finite and not negative (their number is checked against the
    /// network's classes by [`PixelLossParams::check_classes`]).
    pub fn check(&self) -> Result<(), String> {
        if let Some(bad) = self
            .class_weights
            .iter()
            .flatten()
            .find(|v| !v.is_finite() || **v < 0.0)
        {
            return Err(format!(
                "class_weights must be finite and not negative, got {bad}"
            ));
        }
        Ok(())
    }

    /// Checks that there is one weight per class of the network.
    pub fn check_classes(&self, classes: usize) -> Result<(), String> {
        match &self.class_weights {
            Some(w) if w.len() != classes => Err(format!(
                "class_weights has {} values but the network has {classes} classes; give one \
                 weight per class, in class order",
                w.len()
            )),
            _ => Ok(()),
        }
    }
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

/// A self-training method with its params bound.
#[derive(Debug, Clone)]
pub(crate) struct SelfTrainingRun {
    pub teacher: Option<Teacher>,
    /// With an EMA teacher.
    pub ema: Option<TeacherParams>,
    /// With any teacher.
    pub class_mix: Option<ClassMixParams>,
    pub augment: StrongAugmentParams,
    pub pixels: PixelLossParams,
    pub mic: Option<MicParams>,
    pub tufl: Option<TuflParams>,
}

/// One weighted loss term, handed to the loop as soon as it is computed so that its graph can
/// be freed before the next forward pass.
pub(crate) struct WeightedTerm {
    pub name: &'static str,
    pub weight: f64,
    pub value: Tensor<1>,
    /// With HRDA, the detail crop's own loss (part of `value`), logged as `{name}_detail`.
    pub detail: Option<Tensor<1>>,
}

/// The EMA decay of iteration `iteration` (from 0): `min(1 - 1/(t+1), alpha)`, so the teacher
/// copies the student after the first step and averages over more steps as training goes on.
pub fn ema_alpha(iteration: usize, alpha: f64) -> f64 {
    (1.0 - 1.0 / (iteration as f64 + 1.0)).min(alpha)
}

/// BatchNorm's running statistics: buffers, never averaged into the teacher.
pub(crate) fn is_buffer(field: Option<&String>) -> bool {
    matches!(
        field.map(String::as_str),
        Some("running_mean" | "running_var")
    )
}

/// `teacher <- alpha * teacher + (1 - alpha) * student` over the parameters (BatchNorm's running
/// statistics are left as they are, as the references average `parameters()` only).
pub fn ema_update(teacher: Segmenter, student: &Segmenter, alpha: f64) -> Segmenter {
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

/// The teacher of a student: its parameters, its own BatchNorm statistics, no gradients.
/// An EMA teacher stays on the training (autodiff) device so that its BatchNorm layers
/// normalise with batch statistics, as the references run it; a frozen one goes to the plain
/// `device` and normalises with its running statistics, as TUFL's `pseudo_net.eval()`.
pub fn new_teacher(
    kind: Teacher,
    student: &Segmenter,
    training_device: &Device,
    device: &Device,
) -> Result<Segmenter, dag_model::ModelError> {
    Ok(match kind {
        Teacher::Ema => student.independent_copy(training_device)?.no_grad(),
        Teacher::Frozen => student.valid().independent_copy(device)?,
    })
}

/// The per-pixel weighted cross-entropy of the mixed and masked batches, averaged over every
/// pixel: [`weighted_cross_entropy`], or with class weights
/// [`crate::losses::class_weighted_cross_entropy`].
fn pixel_cross_entropy(
    logits: Tensor<4>,
    labels: &[u8],
    weights: &[f32],
    class_weights: Option<&[f32]>,
) -> Tensor<1> {
    match class_weights {
        Some(cw) => {
            let total = labels.len() as f64;
            crate::losses::class_weighted_cross_entropy(logits, labels, Some(weights), cw, total)
        }
        None => weighted_cross_entropy(logits, labels, weights),
    }
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

/// The student's training-pass loss on `images` against per-pixel `labels` and `weights`
/// ([`pixel_cross_entropy`] of the main logits upsampled to the image size; with HRDA, fused
/// with the detail crop's on the crop's labels and weights), and the detail's own loss; its
/// stochastic layers and HRDA's crop draw from `rng`.
fn student_term(
    student: &Segmenter,
    images: ImageBatch,
    (labels, weights): (&[u8], &[f32]),
    class_weights: Option<&[f32]>,
    rng: &mut dyn RngCore,
    device: &Device,
) -> (Tensor<1>, Option<Tensor<1>>) {
    let [n, _, h, w] = images.shape;
    let logits = student.forward_train(images.tensor(device), &mut Noise::from_rng(rng));
    let main = pixel_cross_entropy(
        student.resize_logits_differentiable(logits.main, [h, w]),
        labels,
        weights,
        class_weights,
    );
    crate::losses::with_detail(student, main, logits.detail, |logits, window| {
        pixel_cross_entropy(
            logits,
            &window.crop_planes(labels, [n, h, w]),
            &window.crop_planes(weights, [n, h, w]),
            class_weights,
        )
    })
}

/// The student's main logits of `images`, upsampled to their size; its stochastic layers
/// draw from `rng`.
fn student_logits(student: &Segmenter, images: Tensor<4>, rng: &mut dyn RngCore) -> Tensor<4> {
    let [_, _, h, w] = images.dims();
    let logits = student.forward(images, &mut Noise::from_rng(rng));
    student.resize_logits_differentiable(logits.main, [h, w])
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

/// The state of a self-training run that is not a network: TUFL's per-class thresholds.
/// Checkpointed with the run.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct SelfTrainingState {
    /// TUFL's adaptive thresholds, one per class (empty without them).
    pub thresholds: Vec<f64>,
}

impl SelfTrainingState {
    /// The state at iteration 0.
    pub fn new(run: &SelfTrainingRun, classes: usize) -> Self {
        let thresholds = match &run.tufl {
            Some(t) if t.adaptive() => vec![t.tufl_theta0; classes],
            _ => Vec::new(),
        };
        Self { thresholds }
    }
}

/// The networks a self-training iteration runs.
pub(crate) struct Networks<'a> {
    /// The student, on the training device.
    pub student: &'a Segmenter,
    /// The teacher, for the methods with one, and the device its inputs go to.
    pub teacher: Option<(&'a Segmenter, &'a Device)>,
}

/// The self-training terms of one iteration (`focal`, `mix`, then `mic`), each handed to `emit`
/// as soon as it is computed. Random draws come from `rng` in a fixed order: TUFL's strong view
/// (its colour transform, then one affine map per image), the ClassMix classes, the mixed
/// batch's augmentation, then MIC's augmentation and block masks.
#[allow(clippy::too_many_arguments)]
pub(crate) fn terms(
    run: &SelfTrainingRun,
    state: &mut SelfTrainingState,
    nets: Networks<'_>,
    source: &SourceBatch,
    (target, windows): (&ImageBatch, Option<&[Window]>),
    rng: &mut dyn RngCore,
    device: &Device,
    emit: &mut dyn FnMut(WeightedTerm) -> Result<(), crate::TrainError>,
) -> Result<(), crate::TrainError> {
    let student = nets.student;
    let input = student.input();
    let class_weights = run.pixels.class_weights();
    let class_weights = class_weights.as_deref();
    let [n, c, h, w] = target.shape;
    let plane = h * w;

    // 0. TUFL: the weak view teaches the strong one, pixels selected by their class threshold.
    if let Some(tufl) = &run.tufl {
        let mut strong = target.data.clone();
        run.augment
            .augment(input)
            .apply(&mut strong, [n, c, h, w], rng);
        let affines: Vec<tufl::Affine> = (0..n).map(|_| tufl::draw_affine(tufl, rng)).collect();
        let plan = tufl::WarpPlan::new(&affines, [h, w]);
        let strong = plan.apply_host(&strong, c);
        // Both views in one pass, as the reference's single forward: they share BatchNorm's
        // batch statistics.
        let mut views = target.data.clone();
        views.extend(strong);
        let logits = student_logits(student, batch(views, [2 * n, c, h, w]).tensor(device), rng);
        let classes = logits.dims()[1];
        let weak_logits = plan.apply(logits.clone().slice([0..n, 0..classes, 0..h, 0..w]));
        let strong_logits = logits.slice([n..2 * n, 0..classes, 0..h, 0..w]);
        let weak_labels =
            mixing::pseudo_labels(&host_values(weak_logits.clone()), [n, classes, h, w]);
        let (kept, form) = if tufl.adaptive() {
            tufl::update_thresholds(
                &mut state.thresholds,
                &weak_labels,
                tufl.tufl_b,
                tufl.tufl_d,
                tufl.tufl_beta,
            );
            let kept = tufl::kept_pixels(&weak_labels, &state.thresholds);
            (kept, tufl::FocalWeight::OneMinusStrong)
        } else {
            let kept = tufl::kept_above(&weak_labels, tufl.tufl_theta0 as f32);
            (kept, tufl::FocalWeight::WeakMinusStrong)
        };
        let value = tufl::focal_loss(
            weak_logits,
            strong_logits,
            &weak_labels,
            &kept,
            class_weights,
            tufl.tufl_gamma,
            form,
        );
        // No pixel above its threshold: the reference's loss is NaN and it drops the term.
        if let Some(value) = value {
            emit(WeightedTerm {
                name: "focal",
                weight: tufl.lambda_focal,
                value,
                detail: None,
            })?;
        }
    }

    let (Some((teacher, teacher_device)), Some(p)) = (nets.teacher, &run.class_mix) else {
        return Ok(());
    };

    // 1. Pseudo-labels of the un-augmented target batch.
    // Dropout and stochastic depth off, BatchNorm as the teacher's device has it (DAFormer's
    // teacher: batch statistics, as its `train()` mode).
    let teacher_main = teacher
        .forward(target.tensor(teacher_device), &mut Noise::none())
        .main;
    let teacher_logits = teacher.resize_logits(teacher_main, [h, w]);
    let classes = teacher_logits.dims()[1];
    let PseudoLabels {
        labels: pseudo,
        confidence,
    } = mixing::pseudo_labels(&host_values(teacher_logits), [n, classes, h, w]);
    let quality = mixing::confidence_weight(&confidence, p.pseudo_threshold as f32);
    let mut target_weight = vec![quality; n * plane];
    mixing::crop_weight_rows(&mut target_weight, [h, w], p.pl_crop_top, p.pl_crop_bottom);
    if let Some(margins) = p.pl_margins {
        let windows = windows.ok_or_else(|| {
            crate::TrainError::Config(
                "`pl_margins` needs to know where each target crop came from, and this data \
                 provider does not say (`Batches::target_windows`)"
                    .into(),
            )
        })?;
        let fits =
            |win: &Window| win.offset[0] + w <= win.size[0] && win.offset[1] + h <= win.size[1];
        if windows.len() != n || !windows.iter().all(fits) {
            return Err(crate::TrainError::Config(format!(
                "the data provider reported {} target windows for {n} images of {w}x{h}, or a \
                 window that does not fit its image: {windows:?}",
                windows.len()
            )));
        }
        let trusted = mixing::margin_mask(windows, [h, w], margins);
        for (weight, ok) in target_weight.iter_mut().zip(trusted) {
            if !ok {
                *weight = 0.0;
            }
        }
    }

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
    run.augment
        .augment(input)
        .apply(&mut mixed, [n, c, h, w], rng);
    let (value, detail) = student_term(
        student,
        batch(mixed, [n, c, h, w]),
        (&mixed_labels, &mixed_weight),
        class_weights,
        rng,
        device,
    );
    emit(WeightedTerm {
        name: "mix",
        weight: p.lambda_mix,
        value,
        detail,
    })?;

    // 3. MIC: the augmented target with blocks masked, against the unmasked pseudo-labels.
    if let Some(mic) = &run.mic {
        let mut masked = target.data.clone();
        // MIC transforms the target batch in one call: one jitter order and one sigma for the
        // batch (ClassMix's transform runs once per mixed image).
        run.augment
            .augment(input)
            .apply_to_batch(&mut masked, [n, c, h, w], rng);
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
        let (value, detail) = student_term(
            student,
            batch(masked, [n, c, h, w]),
            (&pseudo, &target_weight),
            class_weights,
            rng,
            device,
        );
        emit(WeightedTerm {
            name: "mic",
            weight: mic.lambda_mic,
            value,
            detail,
        })?;
    }
    Ok(())
}

/// The values of `logits` on the host, without gradients.
fn host_values(logits: Tensor<4>) -> Vec<f32> {
    logits
        .detach()
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("f32 logits")
}
