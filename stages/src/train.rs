//! `train_source`, `adapt` and `self_train`: three stage kinds over the one training loop of
//! `dag-train`, differing only in where the labelled and unlabelled batches come from.
//!
//! - `train_source`: labelled source images, no target (ADVENT's source-only baseline).
//! - `adapt`: labelled source + unlabelled target, with any method of `dag_train::METHODS`.
//! - `self_train`: IntraDA's intra-domain step. The EASY target images with their pseudo-labels
//!   are the labelled set, the HARD target images the unlabelled one.

use std::path::{Path, PathBuf};

use dag_api::{
    InputSpec, OutputSpec, ParamSet, ParamSpec, Params, Preflight, Stage, StageContext, StageError,
    StageOutcome, Value,
};
use dag_data::{Column, Dataset, Normalisation, RareClassSampler, Sampler, Table};
use dag_model::{
    Architecture, DaFormerConfig, DeepLabV2Config, Fusion, HrdaConfig, MitConfig, Segmenter,
};
use dag_train::rand_core::RngCore;
use dag_train::{
    BatchError, Batches, ImageBatch, IterationLog, LabelBatch, Method, Schedule, SourceBatch,
    TrainConfig, TrainError, Window,
};
use serde::Deserialize;
use serde_json::json;

use dag_artifacts::files::{
    create_parent, data_error, f64_column, read_class_png, read_table, safe_join, str_column,
    u32_column,
};
use dag_artifacts::score::LABELS_DIR;
use dag_artifacts::split::table_file;
use dag_artifacts::train::{log_column, LOG_FILE};

use crate::common::{check_classes, device, load_model_input, open_dataset, protocol};

/// Which of the three kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `train_source`.
    Source,
    /// `adapt`.
    Adapt,
    /// `self_train`.
    SelfTrain,
}

/// A training stage kind.
pub struct TrainStage(pub Role);

/// Folder of the kept snapshots inside a model artifact.
pub const SNAPSHOTS: &str = dag_train::checkpoint::SNAPSHOT_DIR;

/// The params of the training kinds besides the library's ([`Schedule`] and, for the kinds
/// with a `method`, the methods'): what the stage reads and builds.
#[derive(ParamSet, Deserialize)]
struct P {
    /// images per batch, for the labelled and (if used) the unlabelled batch
    #[param(default = 1, min = 1)]
    batch_size: usize,
    /// the network of a new model: `deeplabv2` (DeepLabV2 on a dilated ResNet, the default),
    /// `daformer` (a MiT encoder with DAFormer's decoder, as DAFormer and MIC) or `hrda`
    /// (DAFormer's network on HRDA's context and detail views with its scale attention); taken
    /// from the `init` model when given
    #[param(one_of = ["deeplabv2", "daformer", "hrda"])]
    network: Option<String>,
    /// with `network: daformer` or `hrda`, SegFormer's MiT variant of the encoder: `mit_b0` ...
    /// `mit_b5` (the papers: mit_b5, the default)
    #[param(one_of = ["mit_b0", "mit_b1", "mit_b2", "mit_b3", "mit_b4", "mit_b5"])]
    encoder: Option<String>,
    /// with `network: daformer` or `hrda`, how the decoder fuses the encoder's levels:
    /// `sep_aspp` (DAFormer's context-aware fusion, the default) or `conv1x1` (SegFormer's
    /// lighter MLP decoder)
    #[param(one_of = ["sep_aspp", "conv1x1"])]
    decoder: Option<String>,
    /// with `network: hrda`, [width, height] of the detail crop decoded at full resolution
    /// in training, and of the overlapping crops of its whole-image pass (HRDA: [512, 512],
    /// the default); multiples of 8 at `context_scale` 0.5
    #[param(min = 1)]
    detail_crop: Option<[usize; 2]>,
    /// with `network: hrda`, the scale of the context view of the whole image (HRDA: 0.5, the
    /// default); 1/k for a whole k
    #[param(min = 0.0, max = 1.0, min_exclusive)]
    context_scale: Option<f64>,
    /// with `network: hrda`, the share of each segmentation loss that goes to the detail
    /// crop's own cross-entropy; the fused prediction's gets the rest (HRDA: 0.1, the default)
    #[param(min = 0.0, max = 1.0)]
    detail_loss_weight: Option<f64>,
    /// with `network: hrda`, [width, height] of the windows of test-time sliding-window
    /// inference, used by `evaluate` and `score_entropy` (HRDA: [1024, 1024], the default)
    #[param(min = 1)]
    test_window: Option<[usize; 2]>,
    /// with `network: hrda`, [width, height] stride of the test-time windows (HRDA: [512,
    /// 512], the default)
    #[param(min = 1)]
    test_stride: Option<[usize; 2]>,
    /// ResNet depth of a new DeepLabV2: 101 (paper), 50, 26 or 14; default 101 (taken from the
    /// `init` model when given)
    #[param(min = 1)]
    depth: Option<usize>,
    /// channel multiplier of a new network (1.0 = paper): the ResNet's widths, or the MiT's
    /// stage widths (kept multiples of their heads) and the decoder's 256 channels; default 1.0
    /// (taken from the `init` model when given)
    #[param(min = 0.0, max = 4.0, min_exclusive)]
    width: Option<f64>,
    /// ImageNet weights for the backbone of a new network: ADVENT's
    /// DeepLab_resnet_pretrained_imagenet.pth (or a torchvision or mmcv ResNet state dict) for
    /// DeepLabV2, SegFormer's mit_bN.pth for DAFormer
    #[param(path)]
    imagenet: Option<String>,
    /// dilations of the classifier branches of a new network: [6, 12, 18, 24] (ADVENT, the
    /// default) or [6, 12] (DACS and DAFormer's DeepLabV2, whose code sums only the first two)
    #[param(min = 1)]
    classifier_dilations: Option<Vec<usize>>,
    /// how a new network's input images are normalised, as its ImageNet weights were trained:
    /// `caffe_bgr` (ADVENT's ResNet: BGR minus the Caffe mean, the default) or `imagenet_rgb`
    /// (torchvision's and mmcv's: RGB minus the ImageNet mean, divided by its std); taken from
    /// the `init` model when given, and by every stage that feeds the model images
    #[param(one_of = ["caffe_bgr", "imagenet_rgb"])]
    input_normalisation: Option<String>,
    /// the ResNet of a new network: `caffe` (ADVENT's, the default: 7x7 stem, frozen
    /// BatchNorm) or `v1c` (mmcv's ResNet-V1c of DAFormer's, HRDA's and MIC's DeepLabV2: deep
    /// stem, trainable BatchNorm; its ImageNet weights are `open-mmlab://resnet101_v1c` and
    /// expect `input_normalisation: imagenet_rgb`); taken from the `init` model when given
    #[param(one_of = ["caffe", "v1c"])]
    resnet: Option<String>,
    /// [width, height] of a random crop taken from every training image (and its label) each
    /// iteration, at a position drawn from the run's seed; default: the whole image
    #[param(min = 1)]
    crop: Option<[usize; 2]>,
    /// with a `crop`, mmseg's `cat_max_ratio`: a labelled image's crop is redrawn (up to 10
    /// times, the last draw kept) while one class covers this share or more of its labelled
    /// pixels or it holds a single class (DAFormer: 0.75 on GTA5 and SYNTHIA; 1: off)
    #[param(default = 1.0, min = 0.0, max = 1.0, min_exclusive)]
    crop_cat_max_ratio: f64,
    /// probability that a training image (and its label) is mirrored left to right, drawn per
    /// image after the crop (DAFormer: 0.5; ADVENT and DACS: 0)
    #[param(default = 0.0, min = 0.0, max = 1.0)]
    flip: f64,
    /// temperature T of rare class sampling (with a `class_stats` input): class c is drawn with
    /// P(c) = softmax((1 - f_c) / T), f_c its share of the labelled pixels (DAFormer: 0.01)
    #[param(default = 0.01, min = 0.0, min_exclusive)]
    rcs_temperature: f64,
    /// rare class sampling draws an image for class c among those with more than this many
    /// pixels of c at the original resolution (`class_stats`' full_resolution_pixels; DAFormer:
    /// 3000)
    #[param(default = 3000.0, min = 0.0)]
    rcs_min_pixels: f64,
    /// with a `crop`, rare class sampling redraws the crop (up to 10 times after the first)
    /// until it holds more than rcs_min_pixels * rcs_min_crop_ratio pixels of the class, in
    /// the crop's own pixels (DAFormer: 0.5 at 512 crops, HRDA: 2.0 at 1024; 0: no redraws)
    #[param(default = 0.5, min = 0.0)]
    rcs_min_crop_ratio: f64,
}

impl TrainStage {
    /// Refuses aux-head weights set to something other than their default or 0 for a network
    /// without an aux head (`network`): they were meant to do something and would do nothing.
    fn refuse_aux_weights(&self, params: &Params, network: &str) -> Result<(), String> {
        let aux: Vec<&str> = self
            .params()
            .into_iter()
            .filter(|spec| spec.name.starts_with("lambda_") && spec.name.ends_with("_aux"))
            .filter(|spec| {
                params
                    .get(spec.name)
                    .is_some_and(|v| Some(v) != spec.default.as_ref() && v.as_f64() != Some(0.0))
            })
            .map(|spec| spec.name)
            .collect();
        if aux.is_empty() {
            return Ok(());
        }
        Err(format!(
            "the `{network}` network has no aux head, so {} would have no effect; remove {} \
             (or set {} to 0)",
            aux.join(", "),
            if aux.len() == 1 { "it" } else { "them" },
            if aux.len() == 1 { "it" } else { "them" }
        ))
    }

    /// Whether the kind takes a `method` (and the methods' params).
    fn has_method(&self) -> bool {
        self.0 != Role::Source
    }

    /// The library's training config from the stage's params.
    fn config(&self, params: &Params, seed: u64) -> Result<TrainConfig, StageError> {
        let schedule: Schedule = params.parse_set()?;
        let method = if self.has_method() {
            let name = params
                .get("method")
                .and_then(Value::as_str)
                .unwrap_or(dag_train::methods::DEFAULT_METHOD);
            dag_train::methods::method(name).map_err(StageError::new)?
        } else {
            dag_train::methods::method("source_only").map_err(StageError::new)?
        };
        let all: dag_api::Map<String, Value> = params.0.clone().into_iter().collect();
        Ok(TrainConfig {
            method: method.name.to_string(),
            schedule,
            method_params: method.params_from(&all),
            seed,
        })
    }
}

/// A param of another method than the chosen one, set away from its default, would be ignored:
/// refuse it, so that a typo in `method` or a leftover weight cannot pass for an experiment.
fn refuse_unused_method_params(params: &Params, method: &Method) -> Result<(), String> {
    let used = method.param_names();
    let same = |a: &Value, b: &Value| match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    };
    for spec in dag_train::methods::param_specs() {
        let (Some(value), Some(default)) = (params.get(spec.name), &spec.default) else {
            continue;
        };
        if !used.contains(&spec.name) && !same(value, default) {
            return Err(format!(
                "`{}: {value}` has no effect with method `{}`, which does not use it; \
                 remove it or choose a method that does",
                spec.name, method.name
            ));
        }
    }
    Ok(())
}

impl Stage for TrainStage {
    fn kind(&self) -> &'static str {
        match self.0 {
            Role::Source => "train_source",
            Role::Adapt => "adapt",
            Role::SelfTrain => "self_train",
        }
    }

    fn code(&self) -> dag_api::Code {
        crate::CODE
    }

    fn doc(&self) -> &'static str {
        match self.0 {
            Role::Source => {
                "Trains DeepLabV2 on the labelled source set only (ADVENT's source-only \
                 baseline): SGD, 10x lr on the heads, poly schedule, CE on the main head plus \
                 0.1 x CE on the aux head, batches drawn in a seeded order. Checkpoints every \
                 `checkpoint_every` iterations and resumes from them after an interruption. \
                 Outputs the model and log.parquet."
            }
            Role::Adapt => {
                "Inter-domain adaptation: segmentation loss on labelled source batches plus the \
                 loss terms of `method` on unlabelled target batches (ADVENT's adversarial \
                 alignment by default; see `method`). Starts from the `init` model input, else \
                 from ImageNet weights (`imagenet`), else from scratch. Outputs the model and \
                 log.parquet."
            }
            Role::SelfTrain => {
                "IntraDA's intra-domain adaptation: `method` (AdvEnt by default, as the paper) \
                 with the EASY target images and their pseudo-labels as the labelled set and the \
                 HARD target images as the unlabelled one (inputs from `split` and \
                 `score_entropy`). Starts from the `init` model \
                 input, else from ImageNet weights (`imagenet`, as the paper), else from \
                 scratch. Outputs the model and log.parquet."
            }
        }
    }

    fn params(&self) -> Vec<ParamSpec> {
        let mut specs = Schedule::param_specs();
        specs.extend(P::param_specs());
        if self.has_method() {
            specs.push(dag_train::methods::method_param());
            specs.extend(dag_train::methods::param_specs());
        }
        specs
    }

    fn inputs(&self) -> Vec<InputSpec> {
        let init = InputSpec {
            name: "init",
            ty: "model",
            required: false,
            doc: "a model to start from (its architecture is kept)",
        };
        match self.0 {
            Role::Source => vec![
                InputSpec {
                    name: "source",
                    ty: "dataset",
                    required: true,
                    doc: "the labelled source set (a `preprocess` output)",
                },
                init,
            ],
            Role::Adapt => vec![
                InputSpec {
                    name: "source",
                    ty: "dataset",
                    required: true,
                    doc: "the labelled source set (a `preprocess` output)",
                },
                InputSpec {
                    name: "target",
                    ty: "dataset",
                    required: true,
                    doc: "the unlabelled target set (a `preprocess` output; labels unused)",
                },
                init,
                InputSpec {
                    name: "class_stats",
                    ty: dag_artifacts::class_stats::TYPE,
                    required: false,
                    doc: "the source set's class statistics (`class_stats`): draw the source \
                          images by DAFormer's rare class sampling",
                },
            ],
            Role::SelfTrain => vec![
                InputSpec {
                    name: "target",
                    ty: "dataset",
                    required: true,
                    doc: "the target training set the split was made on",
                },
                InputSpec {
                    name: "easy",
                    ty: "split",
                    required: true,
                    doc: "the easy images (`split.easy`): the labelled set, with pseudo-labels",
                },
                InputSpec {
                    name: "hard",
                    ty: "split",
                    required: true,
                    doc: "the hard images (`split.hard`): the unlabelled set",
                },
                InputSpec {
                    name: "pseudo",
                    ty: "pseudo_labels",
                    required: true,
                    doc: "pseudo-labels of the target images (`score_entropy.pseudo_labels`)",
                },
                init,
            ],
        }
    }

    fn outputs(&self, _params: &Params) -> Vec<OutputSpec> {
        vec![
            OutputSpec {
                name: "model".into(),
                ty: "model",
                doc: "model.bpk (Burn record), model.json (architecture, method, summary), \
                      snapshots/ when `snapshot_every` > 0",
            },
            OutputSpec {
                name: "log".into(),
                ty: dag_artifacts::train::LOG_TYPE,
                doc: "log.parquet: iteration, every loss term, lr, lr_d, seconds",
            },
        ]
    }

    fn check(&self, params: &Params) -> Result<(), String> {
        let p: P = params.parse_set().map_err(|e| e.message)?;
        if let Some(d) = p.depth {
            DeepLabV2Config::blocks_for_depth(d)
                .ok_or_else(|| format!("depth {d} is not one of 101, 50, 26, 14"))?;
        }
        // The network params must agree with each other (the class count comes from the data).
        let arch = new_architecture(&p, 1).map_err(|e| e.message)?;
        if let Some(network) = p.network.as_deref().filter(|&n| n != "deeplabv2") {
            self.refuse_aux_weights(params, network)?;
        }
        let cfg = self.config(params, 0).map_err(|e| e.message)?;
        cfg.validate()?;
        if p.network.is_some() {
            cfg.method()?.check_network(&arch)?;
        }
        if let (Architecture::Hrda(hrda), Some([w, h])) = (&arch, p.crop) {
            hrda.check_input([h, w], true)
                .map_err(|e| format!("`crop` {w}x{h}: {e}"))?;
        }
        if self.has_method() {
            let method = cfg.method()?;
            if !method.uses_target() {
                return Err(format!(
                    "method `{}` uses no target batches; use kind `train_source` for it",
                    method.name
                ));
            }
            refuse_unused_method_params(params, method)?;
        }
        if p.crop.is_none() && p.crop_cat_max_ratio < 1.0 {
            return Err(
                "`crop_cat_max_ratio` redraws crops, but the stage has no `crop`; set `crop` \
                 or remove `crop_cat_max_ratio`"
                    .into(),
            );
        }
        let s = &cfg.schedule;
        let unset = Schedule::default();
        if s.lambda_fd == 0.0 && (s.fd_classes.is_some() || s.fd_min_ratio != unset.fd_min_ratio) {
            return Err(
                "`fd_classes` and `fd_min_ratio` shape the feature distance, which is off \
                 (`lambda_fd: 0`); set `lambda_fd` (DAFormer: 0.005) or remove them"
                    .into(),
            );
        }
        if s.iters > s.max_iters {
            return Err(format!(
                "iters ({}) is larger than max_iters ({}): the poly schedule would reach 0",
                s.iters, s.max_iters
            ));
        }
        Ok(())
    }

    fn preflight(&self, pre: &Preflight<'_>) -> Result<(), StageError> {
        let p: P = pre.params.parse_set()?;
        if let Some(w) = &p.imagenet {
            let path = pre.workdir.join(w);
            if !path.is_file() {
                return Err(StageError::new(format!(
                    "ImageNet weights {} not found",
                    path.display()
                ))
                .with_hint(match p.network.as_deref() {
                    Some("daformer" | "hrda") => {
                        "download SegFormer's ImageNet-1k encoder (mit_b0.pth ... mit_b5.pth, \
                         from the SegFormer README's links) to that path, or remove \
                         `imagenet:` to train from scratch"
                    }
                    _ => {
                        "download ADVENT's DeepLab_resnet_pretrained_imagenet.pth (see README, \
                         \"Real datasets\") to that path, or remove `imagenet:` to train from \
                         scratch"
                    }
                }));
            }
        }
        Ok(())
    }

    /// The network's initial weights where not loaded, the discriminators, the batch order and
    /// the augmentation come from the seed.
    fn seeded(&self) -> bool {
        true
    }

    fn run(&self, ctx: &StageContext<'_>) -> Result<StageOutcome, StageError> {
        let p: P = ctx.params.parse_set()?;
        let config = self.config(ctx.params, ctx.seed)?;
        let device = device(ctx)?;

        let (labelled, unlabelled) = match self.0 {
            Role::Source => (open_dataset(ctx, "source")?, None),
            Role::Adapt => (
                open_dataset(ctx, "source")?,
                Some(open_dataset(ctx, "target")?),
            ),
            Role::SelfTrain => (open_dataset(ctx, "target")?, None),
        };
        let proto = protocol(&labelled)?;
        let mut batches = match self.0 {
            Role::Source => ShardBatches::new(&labelled, all(&labelled), None, p.batch_size),
            Role::Adapt => {
                let target = unlabelled.as_ref().expect("adapt has a target");
                ShardBatches::new(&labelled, all(&labelled), None, p.batch_size)
                    .with_target(target, all(target))
            }
            Role::SelfTrain => {
                let easy = split_indices(ctx, "easy", &labelled)?;
                let hard = split_indices(ctx, "hard", &labelled)?;
                let pseudo = ctx.input("pseudo")?.path.join(LABELS_DIR);
                ShardBatches::new(&labelled, easy, Some(pseudo), p.batch_size)
                    .with_target(&labelled, hard)
            }
        }
        .seeded(ctx.seed)
        .cropped(p.crop, p.crop_cat_max_ratio);
        batches.flip = p.flip;
        if ctx.inputs.contains_key("class_stats") {
            batches.rcs = Some(rare_class_sampler(ctx, &p, &labelled)?);
            if p.crop.is_none() {
                tracing::warn!(
                    stage = ctx.stage,
                    "rare class sampling without a `crop` draws the images but cannot redraw \
                     crops toward the class, as DAFormer's does"
                );
            }
        }

        let (model, init) = initial_model(ctx, &p, proto, &device)?;
        if !model.has_aux() {
            // The network may come from `init`, which `check` cannot see.
            self.refuse_aux_weights(ctx.params, model.arch().name())
                .map_err(StageError::new)?;
        }
        batches.input = dag_train::normalisation(model.input());
        if config.schedule.lambda_fd > 0.0 && p.imagenet.is_none() {
            tracing::warn!(
                stage = ctx.stage,
                "the feature distance pulls toward the starting network's features, which are \
                 ImageNet's only when the stage starts from `imagenet` weights (as DAFormer); \
                 here it starts from {}",
                if ctx.inputs.contains_key("init") {
                    "its `init` model"
                } else {
                    "scratch"
                }
            );
        }
        let ckpt_dir = ctx.scratch.join("checkpoints");
        ctx.progress.start("train", config.schedule.iters as u64);
        let mut report = |log: &IterationLog| {
            ctx.progress.set_position(log.iteration as u64 + 1);
            let mut msg: Vec<String> = log
                .terms
                .iter()
                .map(|(n, v)| format!("{n}={v:.4}"))
                .collect();
            msg.push(format!("lr={:.2e}", log.lr));
            ctx.progress.message(&msg.join(" "));
        };
        let outcome = dag_train::train(
            &config,
            model,
            &device,
            &mut batches,
            &ckpt_dir,
            &mut report,
            ctx.cancel.flag(),
        )
        .map_err(train_error)?;

        let summary = final_losses(&outcome.log);
        let metadata = json!({
            "kind": self.kind(),
            "method": match self.0 {
                // The comparison table should tell the intra-domain step from step 1.
                Role::SelfTrain => format!("intrada ({})", config.method),
                _ => config.method.clone(),
            },
            "stage": ctx.stage,
            "iterations": config.schedule.iters,
            "init": init,
            "protocol": proto.name(),
            "class_names": proto.class_names(),
            "final_losses": summary,
        });
        let model_dir = ctx.output("model")?;
        dag_model::save_model(outcome.model, metadata, model_dir)?;
        keep_snapshots(&ckpt_dir, model_dir)?;
        write_log(&outcome.log, &ctx.output("log")?.join(LOG_FILE))?;

        let mut out = StageOutcome::default();
        let m = &mut out.metrics;
        m.insert("iterations".into(), config.schedule.iters.into());
        m.insert("resumed_from".into(), outcome.resumed_from.into());
        let new: Vec<f64> = outcome.log[outcome.resumed_from..]
            .iter()
            .map(|l| l.seconds)
            .collect();
        if !new.is_empty() {
            m.insert(
                "seconds_per_iteration".into(),
                (new.iter().sum::<f64>() / new.len() as f64).into(),
            );
        }
        for (k, v) in summary.as_object().into_iter().flatten() {
            m.insert(k.clone(), v.clone());
        }
        Ok(out)
    }
}

fn train_error(e: TrainError) -> StageError {
    match e {
        TrainError::Cancelled { .. } => StageError::cancelled(),
        TrainError::NonFinite { ref term, .. } => {
            let hint = format!(
                "the last good checkpoint is kept; lower `lr` or `{}` and rerun",
                dag_train::methods::weight_param_of(term)
            );
            StageError::from(e).with_hint(hint)
        }
        TrainError::Checkpoint { ref path, .. } => {
            let path = path.clone();
            StageError::from(e)
                .with_path(path)
                .with_hint("`dag run --force <stage>` starts the stage over without it")
        }
        other => StageError::from(other),
    }
}

/// Builds the network to train: the `init` input, or a new one (ImageNet backbone when
/// `imagenet` is set, random otherwise). Returns it with its config and a description of the
/// initialisation for `model.json`.
fn initial_model(
    ctx: &StageContext<'_>,
    p: &P,
    proto: dag_data::Protocol,
    device: &burn::tensor::Device,
) -> Result<(Segmenter, Value), StageError> {
    if ctx.inputs.contains_key("init") {
        if p.imagenet.is_some()
            || p.network.is_some()
            || p.encoder.is_some()
            || p.decoder.is_some()
            || p.depth.is_some()
            || p.width.is_some()
            || p.classifier_dilations.is_some()
            || p.input_normalisation.is_some()
            || p.resnet.is_some()
            || p.detail_crop.is_some()
            || p.context_scale.is_some()
            || p.detail_loss_weight.is_some()
            || p.test_window.is_some()
            || p.test_stride.is_some()
        {
            return Err(StageError::new(
                "`init` gives the starting model, so `imagenet`, `network`, `encoder`, \
                 `decoder`, `depth`, `width`, `classifier_dilations`, `input_normalisation`, \
                 `resnet` and HRDA's `detail_crop`, `context_scale`, `detail_loss_weight`, \
                 `test_window` and `test_stride` must not be set as well",
            )
            .with_hint("remove either the `init` input or those params"));
        }
        let (model, desc) = load_model_input(ctx, "init", device)?;
        check_classes(&desc, proto, "the training data")?;
        let producer = &ctx.input("init")?.producer;
        return Ok((model, json!({ "model": producer })));
    }
    let model = new_architecture(p, proto.num_classes())?.init(device)?;
    let init = match &p.imagenet {
        Some(w) => {
            let path = ctx.path(w);
            let (model, report) = match model {
                Segmenter::DeepLabV2(mut m) => {
                    let (backbone, report) =
                        dag_model::load_imagenet_backbone(m.backbone, &path, false)?;
                    m.backbone = backbone;
                    (Segmenter::DeepLabV2(m), report)
                }
                Segmenter::DaFormer(mut m) => {
                    let (encoder, report) = dag_model::load_mit_weights(m.backbone, &path, false)?;
                    m.backbone = encoder;
                    (Segmenter::DaFormer(m), report)
                }
                Segmenter::Hrda(mut m) => {
                    let (encoder, report) = dag_model::load_mit_weights(m.backbone, &path, false)?;
                    m.backbone = encoder;
                    (Segmenter::Hrda(m), report)
                }
            };
            tracing::info!(stage = ctx.stage, file = %path.display(), "ImageNet weights: {}", report.summary());
            return Ok((
                model,
                json!({ "imagenet": w, "applied": report.applied.len() }),
            ));
        }
        None => {
            tracing::warn!(
                stage = ctx.stage,
                "no `init` input and no `imagenet` weights: training from a random initialisation"
            );
            json!("scratch")
        }
    };
    Ok((model, init))
}

/// The architecture of a new network from the stage's params; params of the other network are
/// refused.
fn new_architecture(p: &P, classes: usize) -> Result<Architecture, StageError> {
    let network = p.network.as_deref().unwrap_or("deeplabv2");
    let daformer = network != "deeplabv2";
    let hrda_params = [
        ("detail_crop", p.detail_crop.is_some()),
        ("context_scale", p.context_scale.is_some()),
        ("detail_loss_weight", p.detail_loss_weight.is_some()),
        ("test_window", p.test_window.is_some()),
        ("test_stride", p.test_stride.is_some()),
    ];
    let misplaced: Vec<&str> = if daformer {
        [
            ("depth", p.depth.is_some()),
            ("classifier_dilations", p.classifier_dilations.is_some()),
            ("resnet", p.resnet.is_some()),
            (
                "input_normalisation",
                p.input_normalisation
                    .as_deref()
                    .is_some_and(|n| n != "imagenet_rgb"),
            ),
        ]
        .into_iter()
        .chain(hrda_params.into_iter().filter(|_| network != "hrda"))
        .filter_map(|(name, set)| set.then_some(name))
        .collect()
    } else {
        [
            ("encoder", p.encoder.is_some()),
            ("decoder", p.decoder.is_some()),
        ]
        .into_iter()
        .chain(hrda_params)
        .filter_map(|(name, set)| set.then_some(name))
        .collect()
    };
    if !misplaced.is_empty() {
        return Err(StageError::new(format!(
            "{} do(es) not apply to `network: {network}`",
            misplaced.join(", ")
        ))
        .with_hint(match network {
            "daformer" => {
                "DAFormer's network takes `encoder`, `decoder` and `width`, its input is always \
                 `imagenet_rgb`; `detail_crop`, `context_scale`, `detail_loss_weight`, \
                 `test_window` and `test_stride` are HRDA's (`network: hrda`)"
            }
            "hrda" => {
                "HRDA's network takes `encoder`, `decoder`, `width` and its own `detail_crop`, \
                 `context_scale`, `detail_loss_weight`, `test_window` and `test_stride`; its \
                 input is always `imagenet_rgb`"
            }
            _ => {
                "`encoder` and `decoder` are DAFormer's and HRDA's, `detail_crop` and the \
                 other multi-resolution params HRDA's: set `network: daformer` or `hrda`, or \
                 remove them (with an `init` input the network is that model's)"
            }
        }));
    }
    if daformer {
        let encoder = MitConfig::from_name(p.encoder.as_deref().unwrap_or("mit_b5"))?
            .with_width(p.width.unwrap_or(1.0));
        let mut config = DaFormerConfig::new(encoder, classes).with_width(p.width.unwrap_or(1.0));
        if p.decoder.as_deref() == Some("conv1x1") {
            config.fusion = Fusion::Conv1x1;
        }
        if network != "hrda" {
            return Ok(Architecture::DaFormer(config));
        }
        let mut hrda = HrdaConfig::new(config);
        let width = p.width.unwrap_or(1.0);
        hrda.attention_embed_dim =
            ((hrda.attention_embed_dim as f64 * width).round() as usize).max(1);
        if let Some([w, h]) = p.detail_crop {
            hrda.detail_crop = [h, w];
        }
        if let Some(scale) = p.context_scale {
            hrda.context_scale = scale;
        }
        if let Some(weight) = p.detail_loss_weight {
            hrda.detail_loss_weight = weight;
        }
        if let Some([w, h]) = p.test_window {
            hrda.test_window = [h, w];
        }
        if let Some([w, h]) = p.test_stride {
            hrda.test_stride = [h, w];
        }
        hrda.validate()?;
        return Ok(Architecture::Hrda(hrda));
    }
    let mut config =
        DeepLabV2Config::new(p.depth.unwrap_or(101), classes)?.with_width(p.width.unwrap_or(1.0));
    if let Some(d) = &p.classifier_dilations {
        config = config.with_classifier_dilations(d);
    }
    if let Some(name) = &p.input_normalisation {
        config.input = dag_model::InputConvention::from_name(name)
            .ok_or_else(|| StageError::new(format!("unknown input_normalisation `{name}`")))?;
    }
    if let Some(name) = &p.resnet {
        config.resnet = dag_model::ResNetStyle::from_name(name)
            .ok_or_else(|| StageError::new(format!("unknown resnet `{name}`")))?;
    }
    Ok(Architecture::DeepLabV2(config))
}

fn all(ds: &Dataset) -> Vec<usize> {
    (0..ds.len()).collect()
}

/// Dataset indices of the images listed by a `split` input, matched by path.
fn split_indices(
    ctx: &StageContext<'_>,
    input: &str,
    ds: &Dataset,
) -> Result<Vec<usize>, StageError> {
    let art = ctx.input(input)?;
    let file = table_file(input);
    let table = read_table(&art.path, file)?;
    let paths = str_column(&table, "path", &art.path.join(file))?;
    let by_path: std::collections::HashMap<&str, usize> = (0..ds.len())
        .filter_map(|i| ds.get(i).map(|it| (it.path, i)))
        .collect();
    let indices = paths
        .iter()
        .map(|p| {
            by_path.get(p.as_str()).copied().ok_or_else(|| {
                StageError::new(format!(
                    "`{p}` of the {input} split is not an image of the `target` input"
                ))
                .with_path(art.path.join(file))
                .with_hint("give `self_train` the same target set that `score_entropy` scored")
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if indices.is_empty() {
        return Err(StageError::new(format!("the {input} split is empty"))
            .with_hint("choose a `lambda` of `split` that leaves images on both sides"));
    }
    Ok(indices)
}

/// Batches from preprocessed shards, in a seeded order that depends only on the iteration (so
/// a resumed run draws exactly what the uninterrupted one would have).
struct ShardBatches<'a> {
    labelled: &'a Dataset,
    labelled_indices: Vec<usize>,
    /// Directory of pseudo-label PNGs (`<path>` of each image) replacing the dataset's labels.
    pseudo: Option<PathBuf>,
    unlabelled: Option<(&'a Dataset, Vec<usize>)>,
    batch: usize,
    seed: u64,
    /// `[width, height]` of the random crop, if any.
    crop: Option<[usize; 2]>,
    /// mmseg's `cat_max_ratio` of the labelled crops (1: off).
    cat_max_ratio: f64,
    /// Probability of a horizontal flip per image.
    flip: f64,
    /// Rare class sampling of the labelled images, and the pixels of the drawn class a crop
    /// must hold (`None`: no redraws).
    rcs: Option<(RareClassSampler, Option<f64>)>,
    /// Where the images of the last target batch came from.
    target_windows: Vec<Window>,
    /// How the model expects its images.
    input: Normalisation,
    samplers: [Option<(Sampler, usize)>; 2],
}

impl<'a> ShardBatches<'a> {
    fn new(
        labelled: &'a Dataset,
        labelled_indices: Vec<usize>,
        pseudo: Option<PathBuf>,
        batch: usize,
    ) -> Self {
        Self {
            labelled,
            labelled_indices,
            pseudo,
            unlabelled: None,
            batch,
            seed: 0,
            crop: None,
            cat_max_ratio: 1.0,
            flip: 0.0,
            rcs: None,
            target_windows: Vec::new(),
            input: Normalisation::CAFFE_BGR,
            samplers: [None, None],
        }
    }

    fn with_target(mut self, ds: &'a Dataset, indices: Vec<usize>) -> Self {
        self.unlabelled = Some((ds, indices));
        self
    }

    fn seeded(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    fn cropped(mut self, crop: Option<[usize; 2]>, cat_max_ratio: f64) -> Self {
        self.crop = crop;
        self.cat_max_ratio = cat_max_ratio;
        self
    }

    /// The dataset positions of `iteration`'s batch from stream `which` (0 labelled, 1 not).
    fn draw(&mut self, which: usize, len: usize, iteration: usize) -> Vec<usize> {
        let b = self.batch;
        let slot = &mut self.samplers[which];
        let fresh = !matches!(slot, Some((_, next)) if *next == iteration);
        if fresh {
            // Distinct streams for the two sets, so that equal sizes do not mean equal orders.
            let seed = self.seed ^ (0x9e37_79b9_7f4a_7c15u64.wrapping_mul(which as u64 + 1));
            *slot = Some((Sampler::at(len, seed, (iteration * b) as u64), iteration));
        }
        let (sampler, next) = slot.as_mut().expect("set above");
        *next = iteration + 1;
        sampler.next_batch(b)
    }
}

impl Batches for ShardBatches<'_> {
    fn source(
        &mut self,
        iteration: usize,
        rng: &mut dyn RngCore,
    ) -> Result<SourceBatch, BatchError> {
        let mut classes = Vec::new();
        let idx: Vec<usize> = match &self.rcs {
            Some((rcs, _)) => (0..self.batch)
                .map(|_| {
                    // The sampler's counts are indexed by dataset position.
                    let (class, i) = rcs.draw(rng);
                    classes.push(class);
                    i
                })
                .collect(),
            None => {
                let picks = self.draw(0, self.labelled_indices.len(), iteration);
                picks.iter().map(|&k| self.labelled_indices[k]).collect()
            }
        };
        let mut b = self.labelled.batch_as(&idx, &self.input);
        if let Some(dir) = &self.pseudo {
            let (w, h) = self.labelled.size();
            let px = (w * h) as usize;
            for (k, &i) in idx.iter().enumerate() {
                let item = self.labelled.get(i).expect("index from the dataset");
                let path = safe_join(dir, item.path).map_err(|e| e.message)?;
                let (pw, ph, data) = read_class_png(&path)
                    .map_err(|e| format!("pseudo-label {}: {}", path.display(), e.message))?;
                if (pw, ph) != (w, h) {
                    return Err(format!(
                        "pseudo-label {} is {pw}x{ph}, the images are {w}x{h}",
                        path.display()
                    )
                    .into());
                }
                b.labels[k * px..(k + 1) * px].copy_from_slice(&data);
            }
        }
        let mut images = ImageBatch {
            data: b.images,
            shape: b.shape,
        };
        let mut labels = LabelBatch {
            data: b.labels,
            shape: [b.shape[0], b.shape[2], b.shape[3]],
        };
        if let Some(crop) = self.crop {
            let least = self.rcs.as_ref().and_then(|(_, least)| *least);
            let wanted: Vec<Option<ClassInCrop>> = classes
                .iter()
                .map(|&class| least.map(|least| ClassInCrop { class, least }))
                .collect();
            let cat_max_ratio = self.cat_max_ratio;
            (images, labels, _) =
                random_crop(images, Some(labels), crop, &wanted, cat_max_ratio, rng)?;
        }
        if self.flip > 0.0 {
            random_flip(&mut images, Some(&mut labels), self.flip, rng);
        }
        Ok(SourceBatch { images, labels })
    }

    fn target(
        &mut self,
        iteration: usize,
        rng: &mut dyn RngCore,
    ) -> Result<ImageBatch, BatchError> {
        let len = match &self.unlabelled {
            Some((_, idx)) => idx.len(),
            None => return Err("this stage has no unlabelled set".into()),
        };
        let picks = self.draw(1, len, iteration);
        let (ds, indices) = self.unlabelled.as_ref().expect("checked");
        let idx: Vec<usize> = picks.iter().map(|&k| indices[k]).collect();
        let b = ds.batch_as(&idx, &self.input);
        let images = ImageBatch {
            data: b.images,
            shape: b.shape,
        };
        let [n, _, h, w] = images.shape;
        let (mut images, offsets) = match self.crop {
            Some(crop) => {
                let (images, _, offsets) = random_crop(images, None, crop, &[], 1.0, rng)?;
                (images, offsets)
            }
            None => (images, vec![[0, 0]; n]),
        };
        let flipped = if self.flip > 0.0 {
            random_flip(&mut images, None, self.flip, rng)
        } else {
            vec![false; n]
        };
        self.target_windows = offsets
            .into_iter()
            .zip(flipped)
            .map(|(offset, flipped)| Window {
                size: [w, h],
                offset,
                flipped,
            })
            .collect();
        Ok(images)
    }

    fn target_windows(&self) -> Option<Vec<Window>> {
        Some(self.target_windows.clone())
    }
}

/// Mirrors each image of the batch (and its label map) left to right with probability `p`, one
/// uniform draw per image from `rng`; returns which were mirrored.
fn random_flip(
    images: &mut ImageBatch,
    mut labels: Option<&mut LabelBatch>,
    p: f64,
    rng: &mut dyn RngCore,
) -> Vec<bool> {
    let [n, c, h, w] = images.shape;
    let mut flipped = vec![false; n];
    for (img, flipped) in flipped.iter_mut().enumerate() {
        let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        if u >= p {
            continue;
        }
        *flipped = true;
        for row in images.data[img * c * h * w..(img + 1) * c * h * w].chunks_mut(w) {
            row.reverse();
        }
        if let Some(l) = labels.as_deref_mut() {
            for row in l.data[img * h * w..(img + 1) * h * w].chunks_mut(w) {
                row.reverse();
            }
        }
    }
    flipped
}

/// Rare class sampling over the `class_stats` input, whose rows are matched to `labelled`'s
/// images by path.
fn rare_class_sampler(
    ctx: &StageContext<'_>,
    p: &P,
    labelled: &Dataset,
) -> Result<(RareClassSampler, Option<f64>), StageError> {
    use dag_artifacts::class_stats::{column, FILE};
    let art = ctx.input("class_stats")?;
    let file = art.path.join(FILE);
    let table = read_table(&art.path, FILE)?;
    let paths = str_column(&table, column::PATH, &file)?;
    let classes = u32_column(&table, column::CLASS, &file)?;
    let pixels = f64_column(&table, column::FULL_RESOLUTION_PIXELS, &file)?;
    let by_path: std::collections::HashMap<&str, usize> = (0..labelled.len())
        .filter_map(|i| labelled.get(i).map(|it| (it.path, i)))
        .collect();
    let protocol_classes = labelled.classes();
    let mut counts: Vec<Vec<(u8, f64)>> = vec![Vec::new(); labelled.len()];
    let bad = |message: String| {
        StageError::new(message)
            .with_path(file.clone())
            .with_hint("give `class_stats` the same `preprocess` output as `source`")
    };
    for ((path, &class), &n) in paths.iter().zip(classes).zip(&pixels) {
        let i = *by_path.get(path.as_str()).ok_or_else(|| {
            bad(format!(
                "`{path}` of the class statistics is not an image of the `source` input"
            ))
        })?;
        if class != 255 && class >= protocol_classes {
            return Err(bad(format!(
                "`{path}` has pixels of class {class}, but the `source` input has \
                 {protocol_classes} classes"
            )));
        }
        if !(n.is_finite() && n >= 0.0) || counts[i].iter().any(|&(c, _)| u32::from(c) == class) {
            return Err(bad(format!(
                "`{path}`, class {class}: a duplicate row or a pixel count that is not a \
                 non-negative number ({n})"
            )));
        }
        counts[i].push((class as u8, n));
    }
    let rcs = RareClassSampler::new(&counts, p.rcs_temperature, p.rcs_min_pixels)
        .map_err(|e| StageError::new(e).with_path(file))?;
    let least = (p.rcs_min_crop_ratio > 0.0).then_some(p.rcs_min_pixels * p.rcs_min_crop_ratio);
    Ok((rcs, least))
}

/// What a crop of an image drawn by rare class sampling must hold: more than `least` pixels of
/// `class`, else its window is drawn again, up to ten times after the first (DAFormer's
/// `get_rare_class_sample`).
#[derive(Clone, Copy)]
struct ClassInCrop {
    class: u8,
    least: f64,
}

/// A `[width, height]` window of every image (and label map) of a batch, each at its own
/// position drawn from `rng`: the offset of the window's left and top edge, uniform over the
/// positions that fit, redrawn as mmseg's `cat_max_ratio` asks ([`draw_window`]). With
/// `wanted[i]`, image `i`'s window is redrawn until it holds enough of the class
/// ([`ClassInCrop`]). Returns the crops and each window's `[x, y]` offset.
fn random_crop(
    images: ImageBatch,
    labels: Option<LabelBatch>,
    [cw, ch]: [usize; 2],
    wanted: &[Option<ClassInCrop>],
    cat_max_ratio: f64,
    rng: &mut dyn RngCore,
) -> Result<(ImageBatch, LabelBatch, Vec<[usize; 2]>), BatchError> {
    let [n, c, h, w] = images.shape;
    if cw > w || ch > h {
        return Err(format!(
            "crop [{cw}, {ch}] is larger than the {w}x{h} images; lower `crop` or preprocess \
             to a larger `size`"
        )
        .into());
    }
    if let Some(l) = &labels {
        if l.shape != [n, h, w] {
            return Err(format!(
                "cropping needs labels at the image size ({w}x{h}), got {:?}",
                l.shape
            )
            .into());
        }
    }
    let mut out = Vec::with_capacity(n * c * ch * cw);
    let mut out_labels = Vec::with_capacity(n * ch * cw);
    let mut offsets = Vec::with_capacity(n);
    for img in 0..n {
        let label_map = labels.as_ref().map(|l| &l.data[img * h * w..][..h * w]);
        let mut draw = || draw_window(rng, [w, h], [cw, ch], label_map, cat_max_ratio);
        let (mut x0, mut y0) = draw();
        if let (Some(want), Some(l)) = (wanted.get(img).copied().flatten(), &labels) {
            let map = &l.data[img * h * w..][..h * w];
            let held = |x0: usize, y0: usize| {
                (y0..y0 + ch)
                    .map(|y| {
                        let row = &map[y * w + x0..y * w + x0 + cw];
                        row.iter().filter(|&&v| v == want.class).count()
                    })
                    .sum::<usize>()
            };
            for _ in 0..10 {
                if held(x0, y0) as f64 > want.least {
                    break;
                }
                (x0, y0) = draw();
            }
        }
        offsets.push([x0, y0]);
        for channel in 0..c {
            let plane = &images.data[(img * c + channel) * h * w..][..h * w];
            for y in y0..y0 + ch {
                out.extend_from_slice(&plane[y * w + x0..y * w + x0 + cw]);
            }
        }
        if let Some(l) = &labels {
            let map = &l.data[img * h * w..][..h * w];
            for y in y0..y0 + ch {
                out_labels.extend_from_slice(&map[y * w + x0..y * w + x0 + cw]);
            }
        }
    }
    Ok((
        ImageBatch {
            data: out,
            shape: [n, c, ch, cw],
        },
        LabelBatch {
            data: out_labels,
            shape: [n, ch, cw],
        },
        offsets,
    ))
}

/// The top-left corner of a `[cw, ch]` window of a `[w, h]` image, uniform over the positions
/// that fit; with a label map and `cat_max_ratio < 1`, mmseg's `RandomCrop`: redrawn up to ten
/// times while the window holds fewer than two labelled classes or its most frequent one covers
/// `cat_max_ratio` or more of its labelled pixels, the last draw kept unchecked.
fn draw_window(
    rng: &mut dyn RngCore,
    [w, h]: [usize; 2],
    [cw, ch]: [usize; 2],
    labels: Option<&[u8]>,
    cat_max_ratio: f64,
) -> (usize, usize) {
    let mut draw = || {
        let x0 = (rng.next_u64() % (w - cw + 1) as u64) as usize;
        let y0 = (rng.next_u64() % (h - ch + 1) as u64) as usize;
        (x0, y0)
    };
    let mut window = draw();
    let Some(map) = labels.filter(|_| cat_max_ratio < 1.0) else {
        return window;
    };
    let mut counts = [0usize; 256];
    for _ in 0..10 {
        counts.fill(0);
        let (x0, y0) = window;
        for y in y0..y0 + ch {
            for &l in &map[y * w + x0..y * w + x0 + cw] {
                counts[usize::from(l)] += 1;
            }
        }
        let labelled = &counts[..255];
        let total: usize = labelled.iter().sum();
        let present = labelled.iter().filter(|&&c| c > 0).count();
        let largest = labelled.iter().copied().max().unwrap_or(0);
        if present > 1 && (largest as f64 / total as f64) < cat_max_ratio {
            break;
        }
        window = draw();
    }
    window
}

/// Mean of each loss term over the last 50 iterations (or fewer), for `model.json` and metrics.
fn final_losses(log: &[IterationLog]) -> Value {
    let tail = &log[log.len().saturating_sub(50)..];
    let mut sums: Vec<(&str, f64, usize)> = Vec::new();
    for l in tail {
        for (name, v) in &l.terms {
            match sums.iter_mut().find(|s| s.0 == name) {
                Some(s) => {
                    s.1 += v;
                    s.2 += 1;
                }
                None => sums.push((name, *v, 1)),
            }
        }
    }
    let map: serde_json::Map<String, Value> = sums
        .into_iter()
        .map(|(n, s, c)| (n.to_string(), json!(s / c as f64)))
        .collect();
    Value::Object(map)
}

/// Writes `log.parquet`: iteration, the loss terms the method computed (in the order the method
/// computes them; NaN in an iteration that did not), lr, lr_d, seconds.
fn write_log(log: &[IterationLog], path: &Path) -> Result<(), StageError> {
    create_parent(path)?;
    let mut t = Table::new().with(
        log_column::ITERATION,
        Column::U64(log.iter().map(|l| l.iteration as u64).collect()),
    );
    let mut names: Vec<&str> = Vec::new();
    for (name, _) in log.iter().flat_map(|l| &l.terms) {
        if !names.contains(&name.as_str()) {
            names.push(name);
        }
    }
    for name in names {
        t.push(
            name,
            Column::F64(
                log.iter()
                    .map(|l| l.term(name).unwrap_or(f64::NAN))
                    .collect(),
            ),
        );
    }
    t.push(
        log_column::LR,
        Column::F64(log.iter().map(|l| l.lr).collect()),
    );
    if log.iter().any(|l| l.lr_d.is_some()) {
        t.push(
            log_column::LR_D,
            Column::F64(log.iter().map(|l| l.lr_d.unwrap_or(f64::NAN)).collect()),
        );
    }
    t.push(
        log_column::SECONDS,
        Column::F64(log.iter().map(|l| l.seconds).collect()),
    );
    t.write_parquet(path)
        .map_err(|e| data_error(e).with_path(path.to_path_buf()))
}

/// Copies the snapshots the loop kept in the scratch directory into the model artifact.
fn keep_snapshots(ckpt_dir: &Path, model_dir: &Path) -> Result<(), StageError> {
    let found = dag_train::snapshots(ckpt_dir);
    if found.is_empty() {
        return Ok(());
    }
    let dir = model_dir.join(SNAPSHOTS);
    std::fs::create_dir_all(&dir).map_err(|e| StageError::from(e).with_path(dir.clone()))?;
    for (_, path) in found {
        let to = dir.join(path.file_name().expect("a snapshot file"));
        // A link keeps the scratch copy intact should publishing fail and the stage rerun.
        if std::fs::hard_link(&path, &to).is_err() {
            std::fs::copy(&path, &to).map_err(|e| StageError::from(e).with_path(path.clone()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flip mirrors every row of the image's channels and of its label, and p = 1 flips all.
    #[test]
    fn flips_mirror_images_and_labels_together() {
        use rand_chacha::rand_core::SeedableRng;
        let mut images = ImageBatch {
            data: (0..2 * 3 * 2 * 3).map(|v| v as f32).collect(),
            shape: [2, 3, 2, 3],
        };
        let mut labels = LabelBatch {
            data: (0..2 * 2 * 3).map(|v| v as u8).collect(),
            shape: [2, 2, 3],
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        random_flip(&mut images, Some(&mut labels), 1.0, &mut rng);
        assert_eq!(&images.data[..6], &[2.0, 1.0, 0.0, 5.0, 4.0, 3.0]);
        assert_eq!(&labels.data[..6], &[2, 1, 0, 5, 4, 3]);
        assert_eq!(&labels.data[6..], &[8, 7, 6, 11, 10, 9]);
        random_flip(&mut images, Some(&mut labels), 0.0, &mut rng);
        assert_eq!(&labels.data[..3], &[2, 1, 0]);
    }

    /// mmseg's cat_max_ratio: a window where one class covers 75% or more of the labelled
    /// pixels is redrawn, checked at most ten times, the eleventh draw kept unchecked.
    #[test]
    fn crops_redraw_windows_of_one_class_as_mmseg() {
        use rand_chacha::rand_core::SeedableRng;
        // 100x4 labels: class 0 left of column 60, class 1 from there; ignored pixels in row 0.
        let mut map: Vec<u8> = (0..4 * 100).map(|i| u8::from(i % 100 >= 60)).collect();
        map[..100].fill(255);
        let passes = |x0: usize| {
            let ones = (x0..x0 + 50).filter(|&x| x >= 60).count();
            (ones.max(50 - ones) as f64 / 50.0) < 0.75
        };
        let plain =
            |rng: &mut rand_chacha::ChaCha8Rng| draw_window(rng, [100, 4], [50, 4], None, 0.75);
        let mut redrawn = 0;
        for seed in 0..40 {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let mut replay = rng.clone();
            let got = draw_window(&mut rng, [100, 4], [50, 4], Some(&map), 0.75);
            let mut want = plain(&mut replay);
            redrawn += usize::from(!passes(want.0));
            for _ in 0..10 {
                if passes(want.0) {
                    break;
                }
                want = plain(&mut replay);
            }
            assert_eq!(got, want, "seed {seed}");
        }
        assert!(redrawn > 0, "no window needed a redraw");
        // A map of one class never passes: the eleventh draw.
        let single = vec![3u8; 400];
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut replay = rng.clone();
        let got = draw_window(&mut rng, [100, 4], [50, 4], Some(&single), 0.75);
        let want = (0..11).map(|_| plain(&mut replay)).last().unwrap();
        assert_eq!(got, want);
    }

    /// The offsets `random_crop` reports are those of the windows it cut, and `random_flip`
    /// reports the images it mirrored: what the pseudo-label margins are placed by.
    #[test]
    fn crops_and_flips_report_their_windows() {
        use rand_chacha::rand_core::SeedableRng;
        let (n, h, w) = (3, 5, 7);
        let images = ImageBatch {
            data: (0..n * 3 * h * w).map(|v| v as f32).collect(),
            shape: [n, 3, h, w],
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let (mut crops, _, offsets) =
            random_crop(images, None, [4, 2], &[], 1.0, &mut rng).unwrap();
        for (img, [x0, y0]) in offsets.iter().enumerate() {
            let first = crops.data[img * 3 * 2 * 4];
            assert_eq!(first as usize, img * 3 * h * w + y0 * w + x0);
        }
        let before = crops.data.clone();
        assert_eq!(random_flip(&mut crops, None, 0.0, &mut rng), vec![false; n]);
        assert_eq!(crops.data, before);
        assert_eq!(random_flip(&mut crops, None, 1.0, &mut rng), vec![true; n]);
        for img in 0..n {
            let at = img * 3 * 2 * 4;
            assert_eq!(crops.data[at], before[at + 3]);
        }
    }

    fn adapt_params(given: &[(&str, Value)]) -> Params {
        let mut params: Params = Params(
            TrainStage(Role::Adapt)
                .params()
                .into_iter()
                .filter_map(|s| Some((s.name.to_string(), s.default?)))
                .collect(),
        );
        for (name, value) in given {
            params.0.insert(name.to_string(), value.clone());
        }
        params
    }

    /// A method param named like a stage param would be shadowed by it.
    #[test]
    fn every_training_kind_has_each_param_name_once() {
        for role in [Role::Source, Role::Adapt, Role::SelfTrain] {
            let mut names: Vec<&str> = TrainStage(role).params().iter().map(|s| s.name).collect();
            let count = names.len();
            names.sort_unstable();
            names.dedup();
            assert_eq!(names.len(), count, "{names:?}");
        }
    }

    #[test]
    fn params_of_other_methods_are_refused_unless_at_their_default() {
        let stage = TrainStage(Role::Adapt);
        let minent = ("method", Value::from("minent"));
        assert_eq!(
            stage.check(&adapt_params(std::slice::from_ref(&minent))),
            Ok(())
        );
        // Its own params, and another method's at the default.
        let own = ("lambda_ent_main", Value::from(0.01));
        let default = ("lambda_adv_main", Value::from(0.001));
        let fine = adapt_params(&[minent.clone(), own, default]);
        assert_eq!(stage.check(&fine), Ok(()));

        let stray = ("lambda_adv_main", Value::from(0.01));
        let err = stage.check(&adapt_params(&[minent, stray])).unwrap_err();
        assert!(
            err.contains("`lambda_adv_main: 0.01` has no effect with method `minent`"),
            "{err}"
        );
    }
}
