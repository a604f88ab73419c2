//! The adversarial training loop.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::lr_scheduler::module_lr_scheduler::{ModuleLearningRate, ModuleLrScheduler};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamGroup};
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams, ModuleOptimizer, SgdConfig};
use burn::tensor::{Device, Tensor};
use dag_model::discriminator::MIN_INPUT_SIZE;
use dag_model::{
    load_record_into, save_record, save_weights, Discriminator, DiscriminatorConfig, Noise,
    Segmenter,
};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::checkpoint::{self, files, CheckpointState};
use crate::config::TrainConfig;
use crate::data::{Batches, LabelBatch};
use crate::losses::{bce_with_logits, masked_cross_entropy, self_information};
use crate::objectives::adversarial::AdversarialParams;
use crate::objectives::TargetLoss;
use crate::selftraining::{self, Networks, SelfTrainingRun, SelfTrainingState, WeightedTerm};
use crate::{IterationLog, TrainError};

/// Domain label of source (and IntraDA easy) predictions for the discriminators.
pub const SOURCE_LABEL: f64 = 0.0;
/// Domain label of target (and IntraDA hard) predictions.
pub const TARGET_LABEL: f64 = 1.0;

/// What [`train`] returns.
#[derive(Debug)]
pub struct TrainOutcome {
    /// The trained segmentation network, as a validation copy (`.train()` resumes training).
    pub model: Segmenter,
    /// One record per iteration, including those before a resume.
    pub log: Vec<IterationLog>,
    /// The iteration the run started at (0, or where a checkpoint left off).
    pub resumed_from: usize,
    /// The main-head discriminator, for methods that train one.
    pub d_main: Option<Discriminator>,
    /// The aux-head discriminator, for methods that train one.
    pub d_aux: Option<Discriminator>,
    /// The mean teacher, for the self-training methods.
    pub teacher: Option<Segmenter>,
}

/// The stream of the run's seed that the discriminators' initial weights come from.
const DISCRIMINATOR_STREAM: u64 = 1;

/// Everything that changes during training.
struct LoopState {
    model: Segmenter,
    d_main: Option<Discriminator>,
    d_aux: Option<Discriminator>,
    /// Created from the student in the first iteration, once its parameters are initialised.
    teacher: Option<Segmenter>,
    /// TUFL's thresholds.
    self_training: SelfTrainingState,
    /// The starting network, frozen, for the feature distance (`lambda_fd`).
    fd_reference: Option<Segmenter>,
    opt_seg: ModuleOptimizer,
    opt_d_main: ModuleOptimizer,
    opt_d_aux: ModuleOptimizer,
    rng: ChaCha8Rng,
    next_iteration: usize,
    log: Vec<IterationLog>,
}

/// Held from seeding the device RNG to the end of a training's first step. Burn keeps one RNG
/// per backend for the whole process (flex: a global seeded generator), and the network's lazily
/// initialised parameters draw from it during the first forward pass: two trainings running at
/// once (`jobs`, or the instances of `seeds:`) would otherwise interleave their seeds and draws
/// and start from weights that depend on the timing.
static DEVICE_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Trains `model` with `config.method` for `config.schedule.iters` iterations on `device` (a plain
/// device; autodiff is added here) and returns the trained model and the log.
///
/// `model` is the starting point (random, ImageNet-initialised or an upstream stage's model)
/// built with the architecture `classes` match. Discriminators are created here, seeded with
/// `config.seed`. Every `config.schedule.checkpoint_every` iterations the whole loop state is written
/// under `checkpoint_dir`; when that directory already holds a checkpoint, training resumes from
/// it (the given `model` is then only the architecture to load into) and ends with the same
/// weights as an uninterrupted run (bit-identical on flex with the same thread count).
///
/// `progress` is called after every iteration; raising `cancel` stops before the next one with
/// [`TrainError::Cancelled`]. A NaN or infinite loss term stops with [`TrainError::NonFinite`].
pub fn train(
    config: &TrainConfig,
    model: impl Into<Segmenter>,
    device: &Device,
    data: &mut dyn Batches,
    checkpoint_dir: &Path,
    progress: &mut dyn FnMut(&IterationLog),
    cancel: &AtomicBool,
) -> Result<TrainOutcome, TrainError> {
    config.validate().map_err(TrainError::Config)?;
    let model = model.into();
    let run = Run::new(config).map_err(TrainError::Config)?;
    config
        .method()
        .and_then(|m| m.check_network(&model.arch()))
        .map_err(TrainError::Config)?;
    let ad = device.clone().autodiff();
    // Seed before anything draws: any lazily-initialised parameter of `model` takes its weights
    // from the device RNG (reading a lazy parameter initialises it, hence `lazy_shape`). The
    // draws happen up to the end of the first step; until then no other training in this
    // process may seed or draw (see `DEVICE_RNG`).
    let mut device_rng = Some(DEVICE_RNG.lock().unwrap_or_else(|e| e.into_inner()));
    ad.seed(config.seed);
    let classes = model.classes();
    let head_group = ParamGroup::from_any_predicates(model.head_modules().to_vec());
    if let Some(st) = &run.self_training {
        st.pixels
            .check_classes(classes)
            .map_err(TrainError::Config)?;
    }
    check_fd_classes(config, classes).map_err(TrainError::Config)?;
    let mut state = init_state(config, &run, model, classes, (&ad, device))?;
    std::fs::create_dir_all(checkpoint_dir).map_err(checkpoint::io_err(checkpoint_dir))?;
    for ckpt in checkpoint::candidates(checkpoint_dir) {
        match checkpoint::verify(&ckpt) {
            Ok(()) => {
                state = restore(config, &run, state, &ckpt, (&ad, device))?;
                break;
            }
            Err(e) => {
                // Resuming from damaged weights would publish a wrong model as if it were right;
                // an older checkpoint, or iteration 0, costs only time.
                tracing::warn!(checkpoint = %ckpt.display(), error = %e,
                    "damaged checkpoint set aside; not resuming from it");
                checkpoint::set_aside(checkpoint_dir, &ckpt)?;
            }
        }
    }
    let resumed_from = state.next_iteration;

    let schedule = &config.schedule;
    for iteration in state.next_iteration..schedule.iters {
        if cancel.load(Ordering::SeqCst) {
            return Err(TrainError::Cancelled { iteration });
        }
        let run_step = || {
            step(
                config,
                &run,
                state,
                data,
                iteration,
                classes,
                (&ad, device),
                &head_group,
            )
        };
        let (next, record) = dag_kernels::run_on_kernel_threads(device, run_step)?;
        drop(device_rng.take());
        state = next;
        state.next_iteration = iteration + 1;
        progress(&record);
        state.log.push(record);
        let done = iteration + 1;
        let snap = schedule.snapshot_every;
        if snap > 0 && done % snap == 0 {
            write_snapshot(&state, checkpoint_dir, done)?;
        }
        let every = schedule.checkpoint_every;
        if every > 0 && done % every == 0 && done < schedule.iters {
            write_checkpoint(config, &state, checkpoint_dir)?;
        }
    }
    Ok(TrainOutcome {
        model: state.model.valid(),
        log: state.log,
        resumed_from,
        d_main: state.d_main.map(|d| d.valid()),
        d_aux: state.d_aux.map(|d| d.valid()),
        teacher: state.teacher.map(|t| t.valid()),
    })
}

/// What a run fixes before its first iteration: the method's bound target losses, the
/// adversarial alignment's params and the self-training's.
struct Run {
    target_losses: Vec<Box<dyn TargetLoss>>,
    adversarial: Option<AdversarialParams>,
    self_training: Option<SelfTrainingRun>,
}

impl Run {
    fn new(config: &TrainConfig) -> Result<Self, String> {
        Ok(Self {
            target_losses: config.target_losses()?,
            adversarial: config.adversarial()?,
            self_training: config.self_training()?,
        })
    }
}

fn init_state(
    config: &TrainConfig,
    run: &Run,
    model: Segmenter,
    classes: usize,
    (ad, device): (&Device, &Device),
) -> Result<LoopState, TrainError> {
    let (lambda_main, lambda_aux, ndf) = match &run.adversarial {
        Some(a) => (a.lambda_adv_main, a.lambda_adv_aux, a.disc_ndf),
        None => (0.0, 0.0, 1),
    };
    let d_config = DiscriminatorConfig::new(classes).with_ndf(ndf);
    // Drawn on the host from the run's seed (stream 1; batches draw from stream 0), so that a
    // seed gives the same discriminators on every device and in every thread.
    let mut init_rng = ChaCha8Rng::seed_from_u64(config.seed);
    init_rng.set_stream(DISCRIMINATOR_STREAM);
    let d_main = if lambda_main > 0.0 {
        Some(d_config.init(&mut init_rng, ad)?)
    } else {
        None
    };
    // Aux terms apply to the aux head, where the network has one.
    let d_aux = if lambda_aux > 0.0 && model.has_aux() {
        Some(d_config.init(&mut init_rng, ad)?)
    } else {
        None
    };
    let schedule = &config.schedule;
    let opt_seg = if schedule.optimizer == "adamw" {
        // With exempt parameters the decay is applied in `step` instead, per parameter.
        let decay = if model.no_decay_key().is_some() {
            0.0
        } else {
            schedule.weight_decay
        };
        AdamWConfig::new()
            .with_beta_1(schedule.adamw_beta1 as f32)
            .with_beta_2(schedule.adamw_beta2 as f32)
            .with_epsilon(schedule.adamw_epsilon as f32)
            .with_weight_decay(decay as f32)
            .init()
    } else {
        SgdConfig::new()
            .with_momentum(Some(
                MomentumConfig::new()
                    .with_momentum(schedule.momentum)
                    .with_dampening(0.0),
            ))
            .with_weight_decay(Some(WeightDecayConfig::new(schedule.weight_decay as f32)))
            .init()
    };
    let model = model.fork(ad).train();
    // A frozen teacher is the starting network, copied before any pass moves its BatchNorm
    // statistics; an EMA teacher follows the student from its first step.
    let teacher = match run.self_training.as_ref().and_then(|st| st.teacher) {
        Some(kind @ selftraining::Teacher::Frozen) => {
            // Lazily initialised parameters take their values here, in the student itself, so
            // that the copy holds the same ones.
            materialize(&model);
            Some(selftraining::new_teacher(kind, &model, ad, device)?)
        }
        _ => None,
    };
    let fd_reference = if schedule.lambda_fd > 0.0 {
        materialize(&model);
        Some(model.valid().independent_copy(device)?)
    } else {
        None
    };
    Ok(LoopState {
        model,
        fd_reference,
        d_main: d_main.map(|d| d.fork(ad).train()),
        d_aux: d_aux.map(|d| d.fork(ad).train()),
        teacher,
        self_training: run
            .self_training
            .as_ref()
            .map(|st| SelfTrainingState::new(st, classes))
            .unwrap_or_default(),
        opt_seg,
        opt_d_main: discriminator_optimizer(run.adversarial.as_ref()),
        opt_d_aux: discriminator_optimizer(run.adversarial.as_ref()),
        rng: ChaCha8Rng::seed_from_u64(config.seed),
        next_iteration: 0,
        log: Vec::new(),
    })
}

/// With the feature distance on, its classes must be classes of the network.
fn check_fd_classes(config: &TrainConfig, classes: usize) -> Result<(), String> {
    let s = &config.schedule;
    if s.lambda_fd == 0.0 {
        return Ok(());
    }
    let given = s.fd_classes.is_some();
    let fd_classes = s
        .fd_classes
        .clone()
        .unwrap_or_else(|| crate::feature_distance::THING_CLASSES.to_vec());
    match fd_classes.iter().find(|&&c| c >= classes) {
        Some(bad) if given => Err(format!(
            "fd_classes holds class {bad} but the network has {classes} classes"
        )),
        Some(_) => Err(format!(
            "the default fd_classes are DAFormer's things of Cityscapes' 19 classes, but the \
             network has {classes}; give `fd_classes` for this label set"
        )),
        None => Ok(()),
    }
}

/// Initialises every lazily initialised parameter of `module` in place.
fn materialize<M: Module>(module: &M) {
    struct Touch;
    impl ModuleVisitor for Touch {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let _ = param.val();
        }
    }
    module.visit(&mut Touch);
}

/// Adam for a discriminator, in place on flex (the same update and state as Burn's `Adam`; see
/// `dag_kernels::Adam`). Methods without discriminators never step it.
fn discriminator_optimizer(params: Option<&AdversarialParams>) -> ModuleOptimizer {
    let p = params.cloned().unwrap_or_default();
    let (beta_1, beta_2, epsilon) = (p.adam_beta1, p.adam_beta2, p.adam_epsilon);
    dag_kernels::Adam(dag_kernels::AdamSettings {
        beta_1: beta_1 as f32,
        beta_2: beta_2 as f32,
        epsilon: epsilon as f32,
    })
    .init()
}

/// Only these may differ between the run that wrote a checkpoint and the one resuming it.
fn same_run(a: &TrainConfig, b: &TrainConfig) -> bool {
    let mut b = b.clone();
    b.schedule.iters = a.schedule.iters;
    b.schedule.checkpoint_every = a.schedule.checkpoint_every;
    b.schedule.snapshot_every = a.schedule.snapshot_every;
    *a == b
}

fn restore(
    config: &TrainConfig,
    run: &Run,
    mut s: LoopState,
    ckpt: &Path,
    (ad, device): (&Device, &Device),
) -> Result<LoopState, TrainError> {
    let saved = checkpoint::read_state(ckpt)?;
    if !same_run(config, &saved.config) {
        return Err(TrainError::Checkpoint {
            path: ckpt.to_path_buf(),
            message: "written with another training config; delete it to start over".into(),
        });
    }
    let word_pos: u128 = saved
        .rng_word_pos
        .parse()
        .map_err(|e| TrainError::Checkpoint {
            path: ckpt.join(checkpoint::STATE_FILE),
            message: format!("bad rng_word_pos: {e}"),
        })?;
    s.model = load_record_into(s.model, &ckpt.join(files::MODEL))?;
    s.opt_seg = load_optim(s.opt_seg, &ckpt.join(files::OPTIM_SEG))?;
    if let Some(d) = s.d_main.take() {
        s.d_main = Some(load_record_into(d, &ckpt.join(files::D_MAIN))?);
        s.opt_d_main = load_optim(s.opt_d_main, &ckpt.join(files::OPTIM_D_MAIN))?;
    }
    if let Some(d) = s.d_aux.take() {
        s.d_aux = Some(load_record_into(d, &ckpt.join(files::D_AUX))?);
        s.opt_d_aux = load_optim(s.opt_d_aux, &ckpt.join(files::OPTIM_D_AUX))?;
    }
    let teacher_kind = run.self_training.as_ref().and_then(|st| st.teacher);
    if let Some(kind) = teacher_kind.filter(|_| saved.next_iteration > 0) {
        // Checksummed with the rest; absent only from a checkpoint of another method, which
        // `same_run` refused above.
        let teacher = selftraining::new_teacher(kind, &s.model, ad, device)?;
        s.teacher = Some(load_record_into(teacher, &ckpt.join(files::TEACHER))?);
    }
    if let Some(reference) = s.fd_reference.take() {
        s.fd_reference = Some(load_record_into(
            reference,
            &ckpt.join(files::FD_REFERENCE),
        )?);
    }
    if !s.self_training.thresholds.is_empty() {
        if saved.tufl_thresholds.len() != s.self_training.thresholds.len() {
            return Err(TrainError::Checkpoint {
                path: ckpt.join(checkpoint::STATE_FILE),
                message: format!(
                    "holds {} TUFL thresholds for {} classes; delete the checkpoint directory \
                     to start over",
                    saved.tufl_thresholds.len(),
                    s.self_training.thresholds.len()
                ),
            });
        }
        s.self_training.thresholds = saved
            .tufl_thresholds
            .iter()
            .map(|&b| f64::from_bits(b))
            .collect();
    }
    let mut rng = ChaCha8Rng::from_seed(saved.rng_seed);
    rng.set_stream(saved.rng_stream);
    rng.set_word_pos(word_pos);
    s.rng = rng;
    s.next_iteration = saved.next_iteration;
    // Loss terms are f32 values; JSON parsing may miss an f64 by one ulp, never an f32.
    s.log = saved
        .log
        .into_iter()
        .take(saved.next_iteration)
        .map(round_terms_to_f32)
        .collect();
    tracing::info!(iteration = s.next_iteration, checkpoint = %ckpt.display(), "resuming training");
    Ok(s)
}

fn round_terms_to_f32(mut l: IterationLog) -> IterationLog {
    for (_, v) in &mut l.terms {
        *v = f64::from(*v as f32);
    }
    l
}

fn load_optim(opt: ModuleOptimizer, path: &Path) -> Result<ModuleOptimizer, TrainError> {
    opt.load(path).map_err(|e| TrainError::Checkpoint {
        path: path.to_path_buf(),
        message: format!("{e}; delete the checkpoint directory to start over"),
    })
}

fn write_checkpoint(config: &TrainConfig, s: &LoopState, dir: &Path) -> Result<(), TrainError> {
    let partial = checkpoint::staging(dir)?;
    // BatchNorm running statistics are merged lazily across threads; `valid()` merges them, so
    // the record holds the current values rather than ones an update behind.
    save_record(s.model.valid(), &partial.join(files::MODEL))?;
    save_optim(&s.opt_seg, &partial.join(files::OPTIM_SEG))?;
    if let Some(d) = &s.d_main {
        save_record(d.clone(), &partial.join(files::D_MAIN))?;
        save_optim(&s.opt_d_main, &partial.join(files::OPTIM_D_MAIN))?;
    }
    if let Some(d) = &s.d_aux {
        save_record(d.clone(), &partial.join(files::D_AUX))?;
        save_optim(&s.opt_d_aux, &partial.join(files::OPTIM_D_AUX))?;
    }
    if let Some(t) = &s.teacher {
        save_record(t.valid(), &partial.join(files::TEACHER))?;
    }
    if let Some(r) = &s.fd_reference {
        save_record(r.clone(), &partial.join(files::FD_REFERENCE))?;
    }
    let state = CheckpointState {
        format: checkpoint::FORMAT,
        next_iteration: s.next_iteration,
        config: config.clone(),
        rng_seed: s.rng.get_seed(),
        rng_stream: s.rng.get_stream(),
        rng_word_pos: s.rng.get_word_pos().to_string(),
        log: s.log.clone(),
        tufl_thresholds: s
            .self_training
            .thresholds
            .iter()
            .map(|t| t.to_bits())
            .collect(),
    };
    checkpoint::publish(dir, &state)
}

/// Writes the network after `done` iterations to the snapshot directory, atomically (a kill
/// leaves either the whole file or none).
fn write_snapshot(s: &LoopState, checkpoint_dir: &Path, done: usize) -> Result<(), TrainError> {
    let dir = checkpoint_dir.join(crate::checkpoint::SNAPSHOT_DIR);
    std::fs::create_dir_all(&dir).map_err(checkpoint::io_err(&dir))?;
    let path = dir.join(crate::checkpoint::snapshot_name(done));
    let partial = path.with_extension("partial");
    save_weights(s.model.valid(), &partial)?;
    std::fs::rename(&partial, &path).map_err(checkpoint::io_err(&path))
}

fn save_optim(opt: &ModuleOptimizer, path: &Path) -> Result<(), TrainError> {
    opt.save(path).map_err(|e| TrainError::Checkpoint {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Appends the host value of a scalar loss to the log's terms, refused when not finite.
fn log_term(log: &mut IterationLog, term: &str, loss: &Tensor<1>) -> Result<(), TrainError> {
    let v = f64::from(loss.clone().into_scalar::<f32>());
    if !v.is_finite() {
        return Err(TrainError::NonFinite {
            iteration: log.iteration,
            term: term.to_string(),
            value: v,
        });
    }
    log.terms.push((term.to_string(), v));
    Ok(())
}

/// Adds `lambda * term` to an optional running sum.
fn add(sum: Option<Tensor<1>>, lambda: f64, term: Tensor<1>) -> Option<Tensor<1>> {
    let weighted = term.mul_scalar(lambda);
    Some(match sum {
        Some(s) => s + weighted,
        None => weighted,
    })
}

/// The target batch as the discriminator's own loss sees it.
enum TargetForDiscriminator {
    /// Its logits, from the pass that also gave the adversarial term (a backend with the
    /// split kernel: flex).
    Logits(Tensor<4>),
    /// Its self-information map, detached, for a pass of its own (every other backend).
    Map(Tensor<4>),
}

impl TargetForDiscriminator {
    fn logits(self, d: &Discriminator) -> Tensor<4> {
        match self {
            Self::Logits(logits) => logits,
            Self::Map(map) => d.forward(map),
        }
    }
}

/// The discriminator's logits for the target prediction `logits`, for the adversarial term
/// (gradients to the network only), and what its own loss reads.
///
/// Where the backend has the kernel (flex), one forward pass serves both
/// (`Discriminator::forward_split`). Elsewhere an
/// untracked copy of the discriminator (the same weights) gives the adversarial term, as
/// ADVENT's `requires_grad = False` does, and the discriminator's loss runs its own pass on a
/// detached map after the network's backward pass.
fn target_pass(d: &Discriminator, logits: &Tensor<4>) -> (Tensor<4>, TargetForDiscriminator) {
    let map = self_information(logits.clone());
    if let Some((for_net, for_d)) = d.forward_split(map.clone()) {
        return (for_net, TargetForDiscriminator::Logits(for_d));
    }
    let for_net = d.clone().no_grad().forward(map);
    let detached = self_information(logits.clone().detach());
    (for_net, TargetForDiscriminator::Map(detached))
}

/// One iteration; takes the state by value because the optimisers consume the modules.
#[allow(clippy::too_many_arguments)]
fn step(
    config: &TrainConfig,
    run: &Run,
    mut s: LoopState,
    data: &mut dyn Batches,
    iteration: usize,
    classes: usize,
    (ad, device): (&Device, &Device),
    head_group: &ParamGroup,
) -> Result<(LoopState, IterationLog), TrainError> {
    let start = Instant::now();
    let schedule = &config.schedule;
    let lr = config.poly_lr(schedule.lr, iteration);
    let adversarial = s.d_main.is_some() || s.d_aux.is_some();
    let lr_d = run
        .adversarial
        .as_ref()
        .filter(|_| adversarial)
        .map(|a| config.poly_lr(a.lr_d, iteration));
    let batch_err = |which: &'static str| {
        move |message: String| TrainError::Batch {
            iteration,
            which,
            message,
        }
    };

    let source = data
        .source(iteration, &mut s.rng)
        .map_err(|e| batch_err("source")(e.to_string()))?;
    source.images.check().map_err(batch_err("source"))?;
    source.labels.check(classes).map_err(batch_err("source"))?;
    if source.images.shape[0] != source.labels.shape[0] {
        return Err(batch_err("source")(format!(
            "{} images but {} label maps",
            source.images.shape[0], source.labels.shape[0]
        )));
    }
    // A target batch only when some target term has a weight: drawing one moves the batch RNG
    // and BatchNorm's statistics, so a method whose weights are all 0 must train as
    // `source_only` does. The self-training methods always draw one: their teacher labels it,
    // or TUFL's two views are made of it.
    let objectives_use_target = adversarial || run.target_losses.iter().any(|l| l.is_active());
    let uses_target = objectives_use_target || run.self_training.is_some();
    let target = if uses_target {
        let t = data
            .target(iteration, &mut s.rng)
            .map_err(|e| batch_err("target")(e.to_string()))?;
        t.check().map_err(batch_err("target"))?;
        Some((t, data.target_windows()))
    } else {
        None
    };
    if adversarial {
        let [_, height, width] = source.labels.shape;
        check_discriminator_input(height, width).map_err(batch_err("source"))?;
        if let Some((t, _)) = &target {
            check_discriminator_input(t.shape[2], t.shape[3]).map_err(batch_err("target"))?;
        }
    }

    let mut log = IterationLog {
        iteration,
        terms: Vec::new(),
        lr,
        lr_d,
        seconds: 0.0,
    };
    let mut accumulator = GradientsAccumulator::<Segmenter>::new();

    // 1. Supervised segmentation on the labelled batch, logits upsampled to the label size.
    let label_size = [source.labels.shape[1], source.labels.shape[2]];
    if let Some(image_size) = s
        .model
        .is_multi_resolution()
        .then_some([source.images.shape[2], source.images.shape[3]])
    {
        s.model
            .check_input(image_size, true)
            .map_err(batch_err("source"))?;
        if label_size != image_size {
            return Err(batch_err("source")(format!(
                "HRDA crops labels with its detail crop, so they must be at the image size                  ({}x{}), got {}x{}",
                image_size[1], image_size[0], label_size[1], label_size[0]
            )));
        }
    }
    let (logits_s, features_s) = if s.fd_reference.is_some() {
        let (logits, features) = s
            .model
            .forward_with_features(source.images.tensor(ad), &mut Noise::from_rng(&mut s.rng));
        (logits, Some(features))
    } else {
        let logits = s
            .model
            .forward_train(source.images.tensor(ad), &mut Noise::from_rng(&mut s.rng));
        (logits, None)
    };
    let main_s = s
        .model
        .resize_logits_differentiable(logits_s.main, label_size);
    let pixels = run.self_training.as_ref().map(|st| &st.pixels);
    let class_weights = pixels.and_then(|p| p.class_weights());
    let over_all = pixels.is_some_and(|p| p.source_ce_over_all_pixels());
    let source_ce = |logits: Tensor<4>, labels: &LabelBatch| match &class_weights {
        // sum_p w_{y_p} CE_p over every pixel (TUFL's `reduction='none'` then mean), or over the
        // labelled pixels' weights (PyTorch's weighted mean).
        Some(cw) => {
            let denominator = if over_all {
                labels.data.len() as f64
            } else {
                labels
                    .data
                    .iter()
                    .filter_map(|&l| cw.get(usize::from(l)))
                    .map(|&w| f64::from(w))
                    .sum()
            };
            crate::losses::class_weighted_cross_entropy(logits, &labels.data, None, cw, denominator)
        }
        // DAFormer's mmseg loss: the mean over every pixel, ignored ones included.
        None if over_all => {
            let labelled = labels.data.iter().filter(|&&l| l != 255).count();
            masked_cross_entropy(logits, labels.tensor(ad))
                .mul_scalar(labelled as f64 / labels.data.len() as f64)
        }
        None => masked_cross_entropy(logits, labels.tensor(ad)),
    };
    let (seg_main, seg_detail) = crate::losses::with_detail(
        &s.model,
        source_ce(main_s.clone(), &source.labels),
        logits_s.detail,
        |logits, window| {
            let labels = LabelBatch {
                data: window.crop_planes(&source.labels.data, source.labels.shape),
                shape: [source.labels.shape[0], window.height, window.width],
            };
            source_ce(logits, &labels)
        },
    );
    if let Some(detail) = &seg_detail {
        let name = format!("seg_main{}", crate::methods::DETAIL_SUFFIX);
        log_term(&mut log, &name, detail)?;
    }
    log_term(&mut log, "seg_main", &seg_main)?;
    let mut loss = add(None, schedule.lambda_seg_main, seg_main);
    let aux_s = logits_s
        .aux
        .filter(|_| schedule.lambda_seg_aux > 0.0 || s.d_aux.is_some())
        .map(|aux| s.model.resize_logits_differentiable(aux, label_size));
    if let Some(aux) = aux_s.clone().filter(|_| schedule.lambda_seg_aux > 0.0) {
        let seg_aux = source_ce(aux, &source.labels);
        log_term(&mut log, "seg_aux", &seg_aux)?;
        loss = add(loss, schedule.lambda_seg_aux, seg_aux);
    }
    // DAFormer's feature distance to the frozen starting network, on the source's thing cells.
    if let (Some(reference), Some(features)) = (&s.fd_reference, features_s) {
        let [n, _, fh, fw] = features.dims();
        let fd_classes = schedule
            .fd_classes
            .clone()
            .unwrap_or_else(|| crate::feature_distance::THING_CLASSES.to_vec());
        let mask = crate::feature_distance::cell_mask(
            &source.labels.data,
            source.labels.shape,
            [fh, fw],
            classes,
            &fd_classes,
            schedule.fd_min_ratio,
        );
        let reference = reference.features(source.images.tensor(device)).autodiff();
        debug_assert_eq!(n, source.labels.shape[0]);
        if let Some(fd) = crate::feature_distance::feature_distance(features, reference, &mask) {
            log_term(&mut log, "fd", &fd)?;
            loss = add(loss, schedule.lambda_fd, fd);
        }
    }
    // The discriminators see the source predictions without a path back into the network.
    let src_maps = adversarial.then(|| {
        (
            self_information(main_s.clone().detach()),
            aux_s.as_ref().map(|a| self_information(a.clone().detach())),
        )
    });
    if let Some(loss) = loss {
        let grads = GradientsParams::from_grads(loss.backward(), &s.model);
        accumulator.accumulate(&s.model, grads);
    }

    // 2a. Self-training: the teacher's pseudo-labels on ClassMix and, with MIC, masked images.
    if let (Some(st), Some((target, windows))) = (&run.self_training, &target) {
        selftraining::check_batches(&source, target).map_err(batch_err("target"))?;
        if let (None, Some(kind)) = (&s.teacher, st.teacher) {
            // The student's parameters exist once the source pass has run.
            s.teacher = Some(selftraining::new_teacher(kind, &s.model, ad, device)?);
        }
        let teacher_device = match st.teacher {
            Some(selftraining::Teacher::Frozen) => device,
            _ => ad,
        };
        let nets = Networks {
            student: &s.model,
            teacher: s.teacher.as_ref().map(|t| (t, teacher_device)),
        };
        let (model, rng) = (&s.model, &mut s.rng);
        let mut emit = |term: WeightedTerm| -> Result<(), TrainError> {
            if let Some(detail) = &term.detail {
                let name = format!("{}{}", term.name, crate::methods::DETAIL_SUFFIX);
                log_term(&mut log, &name, detail)?;
            }
            log_term(&mut log, term.name, &term.value)?;
            let loss = term.value.mul_scalar(term.weight);
            let grads = GradientsParams::from_grads(loss.backward(), model);
            accumulator.accumulate(model, grads);
            Ok(())
        };
        let st_state = &mut s.self_training;
        let target = (target, windows.as_deref());
        selftraining::terms(st, st_state, nets, &source, target, rng, ad, &mut emit)?;
    }

    // 2b. Target: the method's objectives, then fooling the discriminators (label = source).
    let mut target_loss = None;
    // What the discriminators' own loss in step 3 reads for the target batch.
    let (mut trg_main, mut trg_aux) = (None, None);
    // The student sees the plain target batch here only for these objectives: self-training
    // runs it on the batches its terms need (mixed, masked, TUFL's two views), and another pass
    // would move its BatchNorm statistics.
    if let Some((target, _)) = target.as_ref().filter(|_| objectives_use_target) {
        let size = [target.shape[2], target.shape[3]];
        let logits = s
            .model
            .forward(target.tensor(ad), &mut Noise::from_rng(&mut s.rng));
        let main_t = s.model.resize_logits_differentiable(logits.main, size);
        let aux_t = logits
            .aux
            .map(|aux| s.model.resize_logits_differentiable(aux, size));
        for objective in &run.target_losses {
            for term in objective.terms(&main_t, aux_t.as_ref()) {
                log_term(&mut log, term.name, &term.value)?;
                target_loss = add(target_loss, term.weight, term.value);
            }
        }
        // The adversarial term trains only the network (ADVENT freezes the discriminators
        // for it); the discriminators' loss on the same maps, with the same weights, trains
        // only them.
        if let (Some(d), Some(a)) = (&s.d_main, &run.adversarial) {
            let (for_net, for_d) = target_pass(d, &main_t);
            let adv = bce_with_logits(for_net, SOURCE_LABEL);
            log_term(&mut log, "adv_main", &adv)?;
            target_loss = add(target_loss, a.lambda_adv_main, adv);
            trg_main = Some(for_d);
        }
        if let (Some(d), Some(a), Some(aux_t)) = (&s.d_aux, &run.adversarial, &aux_t) {
            let (for_net, for_d) = target_pass(d, aux_t);
            let adv = bce_with_logits(for_net, SOURCE_LABEL);
            log_term(&mut log, "adv_aux", &adv)?;
            target_loss = add(target_loss, a.lambda_adv_aux, adv);
            trg_aux = Some(for_d);
        }
    }
    if let Some(loss) = target_loss {
        let grads = GradientsParams::from_grads(loss.backward(), &s.model);
        accumulator.accumulate(&s.model, grads);
    }

    // 3. Discriminators: source maps -> SOURCE_LABEL, target maps -> TARGET_LABEL.
    let mut d_loss = None;
    if let Some((src_main, src_aux)) = src_maps {
        if let (Some(d), Some(trg)) = (&s.d_main, trg_main) {
            let l = (bce_with_logits(d.forward(src_main), SOURCE_LABEL)
                + bce_with_logits(trg.logits(d), TARGET_LABEL))
            .div_scalar(2.0);
            log_term(&mut log, "d_main", &l)?;
            d_loss = add(d_loss, 1.0, l);
        }
        if let (Some(d), Some(src_aux), Some(trg)) = (&s.d_aux, src_aux, trg_aux) {
            let l = (bce_with_logits(d.forward(src_aux), SOURCE_LABEL)
                + bce_with_logits(trg.logits(d), TARGET_LABEL))
            .div_scalar(2.0);
            log_term(&mut log, "d_aux", &l)?;
            d_loss = add(d_loss, 1.0, l);
        }
    }

    let d_grads = d_loss.map(|l| l.backward());
    if let Some(mut grads) = d_grads {
        let lr_d = lr_d.expect("discriminator lr");
        if let Some(d) = s.d_main.take() {
            let g = contiguous(GradientsParams::from_module(&mut grads, &d), &d);
            s.d_main = Some(s.opt_d_main.step(lr_d, d, g));
        }
        if let Some(d) = s.d_aux.take() {
            let g = contiguous(GradientsParams::from_module(&mut grads, &d), &d);
            s.d_aux = Some(s.opt_d_aux.step(lr_d, d, g));
        }
    }

    // 4. Network update (SGD or AdamW), heads at `head_lr_mult` times the backbone's rate.
    let head_lr = lr * schedule.head_lr_mult;
    if let (Some(exempt), "adamw") = (s.model.no_decay_key(), schedule.optimizer.as_str()) {
        s.model = decoupled_weight_decay(
            s.model,
            exempt,
            [lr, head_lr].map(|l| l * schedule.weight_decay),
        );
    }
    let lrs: ModuleLearningRate = ModuleLrScheduler::new(lr)
        .with_group(head_group.clone(), head_lr)
        .step();
    s.model = s.opt_seg.step(lrs, s.model, accumulator.grads());
    // Only an EMA teacher moves; a frozen one stays as it is.
    if let Some(ema) = run.self_training.as_ref().and_then(|st| st.ema.as_ref()) {
        if let Some(teacher) = s.teacher.take() {
            let alpha = ema.ema_alpha_after(iteration);
            s.teacher = Some(selftraining::ema_update(teacher, &s.model, alpha));
        }
    }

    log.seconds = start.elapsed().as_secs_f64();
    Ok((s, log))
}

/// AdamW's decoupled weight decay, `p <- p (1 - lr wd)`, on every parameter whose path does not
/// contain `exempt` (mmcv's `decay_mult=0` keys), at `[backbone, head]` rates `lr * wd`. Applied
/// before the optimiser's own step, whose update does not depend on the parameter, so the result
/// is PyTorch's AdamW with parameter groups.
fn decoupled_weight_decay(model: Segmenter, exempt: &str, rates: [f64; 2]) -> Segmenter {
    struct Decay<'a> {
        path: Vec<String>,
        exempt: &'a str,
        heads: &'static [&'static str],
        rates: [f64; 2],
    }
    impl ModuleMapper for Decay<'_> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            if selftraining::is_buffer(self.path.last())
                || self.path.iter().any(|p| p.contains(self.exempt))
            {
                return param;
            }
            // Mappers also enter the variant of an enum module (`DaFormer`), so the head's name
            // is looked for along the path rather than at its start.
            let head = self.path.iter().any(|p| self.heads.contains(&p.as_str()));
            let keep = 1.0 - self.rates[usize::from(head)];
            // On the plain tensor, re-wrapped as a leaf: an autodiff op would register the
            // decay in a graph no backward pass frees.
            param.map(|t| {
                let (autodiff, trained) = (t.is_autodiff(), t.is_require_grad());
                let decayed = t.inner().mul_scalar(keep);
                if autodiff {
                    decayed.autodiff().set_require_grad(trained)
                } else {
                    decayed
                }
            })
        }
    }
    let heads = model.head_modules();
    model.map(&mut Decay {
        path: Vec::new(),
        exempt,
        heads,
        rates,
    })
}

/// `grads` of `module`'s parameters, each copied to a plain row-major layout where it has
/// another (a reshape of a plain tensor is free).
///
/// Burn 0.22's fusion on CubeCL misreads some gradients in the optimiser's fused update: the
/// weight gradient of a conv with one output channel and an even kernel (the discriminators'
/// last conv), summed over two passes, came out in a strided layout whose fused reads landed
/// on other taps, so the update moved the weights by their neighbours' gradients
/// (docs/upstream/fusion-strided-gradient.md). The test in tests/wgpu.rs catches it.
fn contiguous<M: Module>(mut grads: GradientsParams, module: &M) -> GradientsParams {
    struct Relayout<'a>(&'a mut GradientsParams);
    impl ModuleVisitor for Relayout<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.0.remove::<D>(param.id) {
                let dims = g.dims();
                let flat = g.reshape([dims.iter().product::<usize>()]);
                self.0.register(param.id, flat.reshape(dims));
            }
        }
    }
    module.visit(&mut Relayout(&mut grads));
    grads
}

/// The discriminators see maps at the batch's size; below [`MIN_INPUT_SIZE`] their last conv
/// would have no output pixel, which Burn reports as a panic deep inside the backend.
fn check_discriminator_input(height: usize, width: usize) -> Result<(), String> {
    if height < MIN_INPUT_SIZE || width < MIN_INPUT_SIZE {
        return Err(format!(
            "maps of {width}x{height} are too small for the discriminator, which needs at \
             least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} (it halves the size five times); \
             preprocess the images to a larger `size`"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use dag_model::{DaFormerConfig, MitConfig};

    fn values<const D: usize>(p: &Param<Tensor<D>>) -> Vec<f32> {
        p.val().into_data().try_to_vec::<f32>().unwrap()
    }

    /// DAFormer's parameter groups: LayerNorms keep their values, the encoder decays at the
    /// backbone rate, the decoder at the head rate, BatchNorm statistics are no parameters.
    #[test]
    fn weight_decay_skips_norms_and_uses_the_head_rate() {
        let device = Device::flex();
        let config = DaFormerConfig::new(MitConfig::variant(0).unwrap().with_width(0.25), 3)
            .with_width(0.25);
        let model = Segmenter::from(config.init(&device).unwrap());
        // Lazy parameters would draw new values in each copy.
        materialize(&model);
        let Segmenter::DaFormer(before) = model.clone() else {
            unreachable!()
        };
        let Segmenter::DaFormer(after) = decoupled_weight_decay(model, "norm", [0.1, 0.5]) else {
            unreachable!()
        };
        let scaled = |v: Vec<f32>, k: f32| v.into_iter().map(|x| x * k).collect::<Vec<_>>();
        let (b, a) = (&before.backbone.stages[1], &after.backbone.stages[1]);
        assert_eq!(values(&a.norm.gamma), values(&b.norm.gamma));
        assert_eq!(
            values(&a.blocks[0].norm1.gamma),
            values(&b.blocks[0].norm1.gamma)
        );
        let (an, bn) = (
            a.blocks[0].attn.norm.as_ref(),
            b.blocks[0].attn.norm.as_ref(),
        );
        assert_eq!(values(&an.unwrap().gamma), values(&bn.unwrap().gamma));
        assert_eq!(
            values(&a.blocks[0].attn.q.weight),
            scaled(values(&b.blocks[0].attn.q.weight), 0.9)
        );
        let (bh, ah) = (&before.decode_head, &after.decode_head);
        assert_eq!(
            values(&ah.conv_seg.weight),
            scaled(values(&bh.conv_seg.weight), 0.5)
        );
        let (dafb, dafa) = match (&bh.fuse_layer, &ah.fuse_layer) {
            (
                dag_model::daformer::FuseLayer::SepAspp(b),
                dag_model::daformer::FuseLayer::SepAspp(a),
            ) => (&b.bottleneck.bn, &a.bottleneck.bn),
            _ => unreachable!("DAFormer's default fusion"),
        };
        assert_eq!(values(&dafa.gamma), scaled(values(&dafb.gamma), 0.5));
        let stats = |bn: &burn::nn::BatchNorm| bn.running_var.value().into_data();
        assert_eq!(stats(dafa), stats(dafb), "statistics are not parameters");
    }
}
