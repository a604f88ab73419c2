//! The training loop on flex: overfitting, AdvEnt, determinism, checkpoint/resume, aborts.
//!
//! Burn's flex RNG is process-global, so every test that draws from it (model initialisation)
//! holds [`SERIAL`], keeping other tests' draws out of the sequences that are compared.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Device, Tensor, TensorData};
use dag_model::{load_record_into, DeepLabV2Config, DiscriminatorConfig};
use dag_train::rand_core::{RngCore, SeedableRng};
use dag_train::{
    train, BatchError, Batches, ImageBatch, IterationLog, LabelBatch, Schedule, SourceBatch,
    TrainConfig, TrainError,
};
use rand_chacha::ChaCha8Rng;

static SERIAL: Mutex<()> = Mutex::new(());

const CLASSES: usize = 3;

fn model_config() -> DeepLabV2Config {
    DeepLabV2Config {
        blocks: [1, 1, 1, 1],
        width: 0.0625,
        classes: CLASSES,
        classifier_dilations: dag_model::deeplab::CLASSIFIER_DILATIONS.to_vec(),
        input: dag_model::InputConvention::CaffeBgr,
        resnet: dag_model::ResNetStyle::Caffe,
    }
}

/// Two 32x32 source images whose labels (left half 0, right half 1, a band of 2 at the
/// bottom, a few ignored pixels) are visible in the pixel values, and target images of the
/// same kind with the colours shifted (the "domain shift").
struct Toy {
    /// Iteration at which to put a NaN into the source image, to test the abort.
    nan_at: Option<usize>,
    /// Iteration at which to put an out-of-range label.
    bad_label_at: Option<usize>,
    /// Whether it says where its target images came from (whole images, never flipped).
    windows: bool,
}

impl Toy {
    fn new() -> Self {
        Toy {
            nan_at: None,
            bad_label_at: None,
            windows: false,
        }
    }
}

const S: usize = 32;

fn label_at(i: usize, y: usize, x: usize) -> u8 {
    if y >= S - 8 {
        2
    } else if (x < S / 2) ^ (i % 2 == 1) {
        0
    } else {
        1
    }
}

fn image(i: usize, shift: f32, rng: &mut dyn RngCore) -> Vec<f32> {
    let mut data = vec![0.0f32; 3 * S * S];
    for c in 0..3 {
        for y in 0..S {
            for x in 0..S {
                let l = label_at(i, y, x) as usize;
                let noise = (rng.next_u32() % 1000) as f32 / 1000.0 - 0.5;
                let base = if l == c { 2.0 } else { -1.0 };
                data[(c * S + y) * S + x] = base + shift + 0.3 * noise;
            }
        }
    }
    data
}

impl Batches for Toy {
    fn source(
        &mut self,
        iteration: usize,
        rng: &mut dyn RngCore,
    ) -> Result<SourceBatch, BatchError> {
        let i = iteration % 2;
        let mut images = image(i, 0.0, rng);
        if self.nan_at == Some(iteration) {
            images[5] = f32::NAN;
        }
        let mut labels: Vec<u8> = (0..S * S).map(|p| label_at(i, p / S, p % S)).collect();
        labels[0] = 255;
        labels[S * S - 1] = 255;
        if self.bad_label_at == Some(iteration) {
            labels[3] = 9;
        }
        Ok(SourceBatch {
            images: ImageBatch {
                data: images,
                shape: [1, 3, S, S],
            },
            labels: LabelBatch {
                data: labels,
                shape: [1, S, S],
            },
        })
    }

    fn target(
        &mut self,
        iteration: usize,
        rng: &mut dyn RngCore,
    ) -> Result<ImageBatch, BatchError> {
        Ok(ImageBatch {
            data: image(iteration % 2 + 1, 0.7, rng),
            shape: [1, 3, S, S],
        })
    }

    fn target_windows(&self) -> Option<Vec<dag_train::Window>> {
        self.windows.then(|| {
            vec![dag_train::Window {
                size: [S, S],
                offset: [0, 0],
                flipped: false,
            }]
        })
    }
}

/// [`Toy`]'s batches at twice the side, each pixel repeated 2 x 2: HRDA's context view at
/// scale 0.5 needs images of 64 pixels (MiT's first reduction is 8 cells of 4 pixels).
struct Doubled(Toy);

fn doubled<T: Copy>(data: &[T], planes: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(data.len() * 4);
    for plane in data.chunks(data.len() / planes) {
        for y in 0..2 * S {
            for x in 0..2 * S {
                out.push(plane[(y / 2) * S + x / 2]);
            }
        }
    }
    out
}

impl Batches for Doubled {
    fn source(
        &mut self,
        iteration: usize,
        rng: &mut dyn RngCore,
    ) -> Result<SourceBatch, BatchError> {
        let b = self.0.source(iteration, rng)?;
        Ok(SourceBatch {
            images: ImageBatch {
                data: doubled(&b.images.data, 3),
                shape: [1, 3, 2 * S, 2 * S],
            },
            labels: LabelBatch {
                data: doubled(&b.labels.data, 1),
                shape: [1, 2 * S, 2 * S],
            },
        })
    }

    fn target(
        &mut self,
        iteration: usize,
        rng: &mut dyn RngCore,
    ) -> Result<ImageBatch, BatchError> {
        let b = self.0.target(iteration, rng)?;
        Ok(ImageBatch {
            data: doubled(&b.data, 3),
            shape: [1, 3, 2 * S, 2 * S],
        })
    }
}

fn config(method: &str, iters: usize) -> TrainConfig {
    let config = TrainConfig {
        method: method.to_string(),
        schedule: Schedule {
            iters,
            max_iters: 1000,
            lr: 0.01,
            checkpoint_every: 0,
            ..Schedule::default()
        },
        seed: 7,
        ..TrainConfig::default()
    };
    if config.method().unwrap().adversarial {
        config.with_param("lr_d", 1e-3).with_param("disc_ndf", 4)
    } else {
        config
    }
}

struct Run {
    log: Vec<IterationLog>,
    weights: Vec<TensorData>,
    outcome_d_main: Option<dag_model::Discriminator>,
    teacher: Option<Vec<TensorData>>,
}

fn run(
    config: &TrainConfig,
    dir: &std::path::Path,
    cancel_after: Option<usize>,
) -> Result<Run, TrainError> {
    let model = model_config().init(&Device::flex()).unwrap();
    run_with(config, dir, cancel_after, model)
}

/// [`run`] from a given model.
fn run_with(
    config: &TrainConfig,
    dir: &std::path::Path,
    cancel_after: Option<usize>,
    model: impl Into<dag_model::Segmenter>,
) -> Result<Run, TrainError> {
    run_on(config, dir, cancel_after, model, &mut Toy::new())
}

/// [`run_with`] on the given data.
fn run_on(
    config: &TrainConfig,
    dir: &std::path::Path,
    cancel_after: Option<usize>,
    model: impl Into<dag_model::Segmenter>,
    data: &mut dyn Batches,
) -> Result<Run, TrainError> {
    let device = Device::flex();
    let cancel = AtomicBool::new(false);
    let mut progress = |r: &IterationLog| {
        if Some(r.iteration) == cancel_after {
            cancel.store(true, Ordering::SeqCst);
        }
    };
    let out = train(config, model, &device, data, dir, &mut progress, &cancel)?;
    Ok(Run {
        log: out.log,
        weights: weights(&out.model),
        outcome_d_main: out.d_main,
        teacher: out.teacher.as_ref().map(weights),
    })
}

#[derive(Default)]
struct Collect(Vec<TensorData>);

impl ModuleVisitor for Collect {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.0.push(param.val().into_data());
    }
}

fn weights<M: Module>(m: &M) -> Vec<TensorData> {
    let mut c = Collect::default();
    m.visit(&mut c);
    c.0
}

fn assert_bit_identical(a: &[TensorData], b: &[TensorData]) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(x.as_bytes(), y.as_bytes(), "tensor {i} differs");
    }
}

#[test]
fn source_only_overfits_tiny_images() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let cfg = config("source_only", 40);
    let r = run(&cfg, dir.path(), None).unwrap();
    assert_eq!(r.log.len(), 40);
    let first = r.log[0].term("seg_main").unwrap();
    let last: f64 = r.log[36..]
        .iter()
        .map(|l| l.term("seg_main").unwrap())
        .sum::<f64>()
        / 4.0;
    // Chance level is ln 3 = 1.10; the two images are learnt well below that.
    assert!(last < 0.35, "seg_main went from {first} to {last}");
    assert!(r
        .log
        .iter()
        .all(|l| l.term("adv_main").is_none() && l.term("d_main").is_none()));
    assert!(r
        .log
        .iter()
        .all(|l| l.term("seg_aux").is_some() && l.lr_d.is_none()));
    // Poly schedule applied.
    assert!(r.log[39].lr < r.log[0].lr);
    assert!(r.outcome_d_main.is_none());
}

#[test]
fn advent_trains_segmentation_and_both_discriminators() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config("advent", 3);
    cfg.schedule.checkpoint_every = 1;
    let r = run(&cfg, dir.path(), None).unwrap();
    for l in &r.log {
        let names: Vec<&str> = l.terms.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["seg_main", "seg_aux", "adv_main", "adv_aux", "d_main", "d_aux"],
            "at {}",
            l.iteration
        );
        assert!(l.lr_d.is_some());
    }
    // The checkpoint after iteration 1 holds the discriminator after two Adam steps; the final
    // one has taken a third.
    let ad = Device::flex();
    let d = DiscriminatorConfig::new(CLASSES)
        .with_ndf(4)
        .init(&mut ChaCha8Rng::seed_from_u64(3), &ad)
        .unwrap();
    let d_ckpt = load_record_into(d, &dir.path().join("checkpoint/d_main.bpk")).unwrap();
    let d_final = r.outcome_d_main.expect("AdvEnt returns its discriminator");
    let changed = weights(&d_ckpt)
        .iter()
        .zip(weights(&d_final))
        .any(|(a, b)| a.as_bytes() != b.as_bytes());
    assert!(changed, "the discriminator optimiser did not change D");
    assert!(dir.path().join("checkpoint/optim_d_aux.bpk").is_file());
}

#[test]
fn minent_and_combined_methods_log_their_terms() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let r = run(&config("minent", 2), dir.path(), None).unwrap();
    for l in &r.log {
        let names: Vec<&str> = l.terms.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["seg_main", "seg_aux", "ent_main", "ent_aux"]);
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = config("advent+minent", 2).with_param("lambda_adv_aux", 0.0);
    let r = run(&cfg, dir.path(), None).unwrap();
    for l in &r.log {
        let names: Vec<&str> = l.terms.iter().map(|(n, _)| n.as_str()).collect();
        // lambda_adv_aux 0 drops D_aux and its terms.
        assert_eq!(
            names,
            ["seg_main", "seg_aux", "ent_main", "ent_aux", "adv_main", "d_main"]
        );
    }
}

/// A method whose every weight is 0 draws no target batch (which would move the batch order and
/// BatchNorm's statistics): it trains exactly as `source_only`.
#[test]
fn methods_with_zero_weights_train_as_source_only() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let baseline = run(&config("source_only", 3), dir.path(), None).unwrap();
    let silenced = [
        config("minent", 3)
            .with_param("lambda_ent_main", 0.0)
            .with_param("lambda_ent_aux", 0.0),
        config("maxsquare", 3).with_param("lambda_maxsq_main", 0.0),
        config("advent", 3)
            .with_param("lambda_adv_main", 0.0)
            .with_param("lambda_adv_aux", 0.0),
    ];
    for cfg in &silenced {
        let dir = tempfile::tempdir().unwrap();
        let r = run(cfg, dir.path(), None).unwrap();
        assert_bit_identical(&baseline.weights, &r.weights);
    }
}

#[test]
fn a_switched_off_maxsquare_ratio_is_refused() {
    let off = config("maxsquare", 1).with_param("maxsq_iw_ratio", 0.5);
    let err = off.validate().unwrap_err();
    assert!(err.contains("`maxsq_iw_ratio: 0.5` has no effect"), "{err}");
    let on = off.with_param("maxsq_image_weighting", true);
    assert_eq!(on.validate(), Ok(()));
}

/// Every float parameter with its module path (`layer6.conv2d_list.0.weight`).
#[derive(Default)]
struct Named {
    path: Vec<String>,
    params: Vec<(String, Vec<f32>)>,
}

impl ModuleVisitor for Named {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let values = param.val().into_data().try_into_vec_as::<f32>().unwrap();
        self.params.push((self.path.join("."), values));
    }
}

fn named<M: Module>(m: &M) -> Vec<(String, Vec<f32>)> {
    let mut v = Named::default();
    m.visit(&mut v);
    v.params
}

/// One SGD step from the same weights with `head_lr_mult` 10 and 1: the two heads (`layer5`,
/// `layer6`) move exactly ten times as far with 10, the backbone the same distance, and the
/// frozen BatchNorm affine parameters not at all.
#[test]
fn heads_get_ten_times_the_learning_rate() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let device = Device::flex();
    // A step at learning rate 0 gives the start weights (the params are drawn lazily, from the
    // seed, inside `train`).
    let start = |lr: f64, mult: f64| {
        let mut cfg = config("source_only", 1);
        cfg.schedule.lr = lr;
        cfg.schedule.head_lr_mult = mult;
        let model = model_config().init(&device).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let out = train(
            &cfg,
            model,
            &device,
            &mut Toy::new(),
            dir.path(),
            &mut |_| {},
            &AtomicBool::new(false),
        )
        .unwrap();
        named(&out.model)
    };
    let lr = config("source_only", 1).schedule.lr;
    let w0 = start(0.0, 10.0);
    let w10 = start(lr, 10.0);
    let w1 = start(lr, 1.0);
    let (mut heads, mut backbone, mut frozen) = (0, 0, 0);
    for ((name, a0), ((_, a10), (_, a1))) in w0.iter().zip(w10.iter().zip(&w1)) {
        let d10: Vec<f32> = a10.iter().zip(a0).map(|(x, y)| x - y).collect();
        let d1: Vec<f32> = a1.iter().zip(a0).map(|(x, y)| x - y).collect();
        let norm = |d: &[f32]| d.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
        let is_bn_affine =
            name.contains("bn") && (name.ends_with("gamma") || name.ends_with("beta"));
        if name.contains("running") {
            continue;
        }
        if is_bn_affine {
            assert_eq!(norm(&d10), 0.0, "{name} moved but is frozen");
            frozen += 1;
        } else if name.contains(".layer5.") || name.contains(".layer6.") {
            let ratio = norm(&d10) / norm(&d1);
            assert!(
                (ratio - 10.0).abs() < 0.01,
                "{name}: head step ratio {ratio}"
            );
            heads += 1;
        } else {
            let ratio = norm(&d10) / norm(&d1);
            assert!(norm(&d1) > 0.0, "{name} did not move");
            assert!(
                (ratio - 1.0).abs() < 1e-3,
                "{name}: backbone step ratio {ratio}"
            );
            backbone += 1;
        }
    }
    let names: Vec<&str> = w0.iter().map(|(n, _)| n.as_str()).collect();
    assert!(
        heads >= 8 && backbone > 10 && frozen > 4,
        "{heads} heads, {backbone} backbone, {frozen} frozen among {names:?}"
    );
}

#[test]
fn same_seed_same_weights() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cfg = config("advent", 3);
    let a = run(&cfg, tempfile::tempdir().unwrap().path(), None).unwrap();
    let b = run(&cfg, tempfile::tempdir().unwrap().path(), None).unwrap();
    assert_bit_identical(&a.weights, &b.weights);
    assert_eq!(
        a.log.iter().map(|l| l.term("seg_main")).collect::<Vec<_>>(),
        b.log.iter().map(|l| l.term("seg_main")).collect::<Vec<_>>()
    );
}

/// Two trainings at once in one process (as `jobs: 2` runs two seeds' instances) start from the
/// weights each would draw alone: the device RNG is one per process, so seeding and the lazy
/// initialisation's draws must not interleave.
#[test]
fn trainings_at_once_draw_their_weights_as_if_alone() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let configs: Vec<TrainConfig> = [1, 2]
        .map(|seed| TrainConfig {
            seed,
            ..config("source_only", 2)
        })
        .into();
    let alone: Vec<Vec<TensorData>> = configs
        .iter()
        .map(|c| {
            run(c, tempfile::tempdir().unwrap().path(), None)
                .unwrap()
                .weights
        })
        .collect();
    assert_ne!(
        alone[0][0].as_bytes(),
        alone[1][0].as_bytes(),
        "seeds differ"
    );
    for _ in 0..50 {
        let start = std::sync::Barrier::new(2);
        let together: Vec<Vec<TensorData>> = std::thread::scope(|scope| {
            let handles: Vec<_> = configs
                .iter()
                .map(|c| {
                    let start = &start;
                    scope.spawn(move || {
                        let dir = tempfile::tempdir().unwrap();
                        start.wait();
                        run(c, dir.path(), None).unwrap().weights
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (a, b) in alone.iter().zip(&together) {
            assert_bit_identical(a, b);
        }
    }
}

/// `config` cancelled after iteration 2 (the last checkpoint written before it), then run again
/// in the same checkpoint directory: the resumed run.
/// A network whose parameters are all drawn now, from `seed`, rather than lazily inside
/// `train`, with its tensors.
fn drawn_model(seed: u64) -> (dag_model::DeepLabV2, Vec<TensorData>) {
    let device = Device::flex();
    device.seed(seed);
    let model = model_config().init(&device).unwrap();
    // Reading a lazily initialised parameter draws it, in place.
    let tensors = weights(&model);
    (model, tensors)
}

/// A run from `drawn_model(11)` cancelled after iteration 2, resumed from its checkpoint with
/// another starting network (`drawn_model(12)`): what the loop keeps of the start (a frozen
/// teacher, the feature distance's reference) must come from the checkpoint.
fn resumed_with_other_weights(config: &TrainConfig) -> Run {
    let dir = tempfile::tempdir().unwrap();
    match run_with(config, dir.path(), Some(2), drawn_model(11).0) {
        Err(TrainError::Cancelled { iteration: 3 }) => {}
        other => panic!(
            "expected a cancellation, got {:?}",
            other.map(|r| r.log.len())
        ),
    }
    run_with(config, dir.path(), None, drawn_model(12).0).unwrap()
}

fn interrupted_then_resumed(config: &TrainConfig) -> Run {
    let dir = tempfile::tempdir().unwrap();
    match run(config, dir.path(), Some(2)) {
        Err(TrainError::Cancelled { iteration: 3 }) => {}
        other => panic!(
            "expected a cancellation, got {:?}",
            other.map(|r| r.log.len())
        ),
    }
    run(config, dir.path(), None).unwrap()
}

#[test]
fn resume_after_interruption_is_bit_identical() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut cfg = config("advent", 6);
    cfg.schedule.checkpoint_every = 2;
    let full = run(&cfg, tempfile::tempdir().unwrap().path(), None).unwrap();

    let dir = tempfile::tempdir().unwrap();
    // Killed after iteration 2 ran; the last checkpoint was written after iteration 1.
    match run(&cfg, dir.path(), Some(2)) {
        Err(TrainError::Cancelled { iteration: 3 }) => {}
        other => panic!(
            "expected a cancellation, got {:?}",
            other.map(|r| r.log.len())
        ),
    }
    let resumed = run(&cfg, dir.path(), None).unwrap();
    assert_eq!(resumed.log.len(), 6);
    assert_bit_identical(&full.weights, &resumed.weights);
    for (a, b) in full.log.iter().zip(&resumed.log) {
        assert_eq!(
            (a.iteration, a.term("seg_main"), a.term("d_aux")),
            (b.iteration, b.term("seg_main"), b.term("d_aux"))
        );
    }
    // A checkpoint of another configuration is refused rather than silently mixed in.
    let mut other = cfg.clone();
    other.schedule.lr = 0.02;
    let err = run(&other, dir.path(), None)
        .err()
        .expect("config mismatch");
    assert!(matches!(err, TrainError::Checkpoint { .. }), "{err}");
}

/// DACS+MIC logs its two self-training terms every iteration, and a run cancelled after a
/// checkpoint resumes to the uninterrupted run's student and teacher, bit for bit.
#[test]
fn dacs_with_mic_resumes_bit_identically() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut cfg = config("dacs+mic", 6)
        .with_param("mic_block", 8)
        .with_param("pl_crop_bottom", 4);
    cfg.schedule.checkpoint_every = 2;
    let full = run(&cfg, tempfile::tempdir().unwrap().path(), None).unwrap();
    for l in &full.log {
        for term in ["seg_main", "seg_aux", "mix", "mic"] {
            assert!(l.term(term).is_some_and(f64::is_finite), "{term}: {l:?}");
        }
    }
    let teacher = full.teacher.as_ref().expect("a teacher");
    assert_ne!(
        teacher.iter().map(TensorData::as_bytes).collect::<Vec<_>>(),
        full.weights
            .iter()
            .map(TensorData::as_bytes)
            .collect::<Vec<_>>(),
        "the teacher averages over the steps, so it lags the student"
    );

    let resumed = interrupted_then_resumed(&cfg);
    assert_bit_identical(&full.weights, &resumed.weights);
    assert_bit_identical(teacher, resumed.teacher.as_ref().unwrap());
    for (a, b) in full.log.iter().zip(&resumed.log) {
        assert_eq!(a.terms, b.terms);
    }
}

/// The feature distance pulls the student's features toward its frozen starting network: after a
/// few steps they are closer with a large weight than with a negligible one. It resumes
/// bit-identically, the reference taken from the checkpoint even when the resumed run is handed
/// another starting network, and refuses DAFormer's default classes on a network with fewer
/// classes.
#[test]
fn feature_distance_pulls_toward_the_start_and_resumes() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let with_weight = |lambda: f64| {
        let mut cfg = config("source_only", 6);
        cfg.schedule.lambda_fd = lambda;
        cfg.schedule.fd_classes = Some(vec![0, 1]);
        cfg.schedule.checkpoint_every = 2;
        cfg
    };
    let last_fd = |cfg: &TrainConfig| {
        let out = run(cfg, tempfile::tempdir().unwrap().path(), None).unwrap();
        assert!(out
            .log
            .iter()
            .all(|l| l.term("fd").is_some_and(f64::is_finite)));
        out.log[5].term("fd").unwrap()
    };
    let (pulled, free) = (last_fd(&with_weight(1.0)), last_fd(&with_weight(1e-9)));
    assert!(pulled < free, "fd {pulled} with weight 1, {free} with 1e-9");

    let cfg = with_weight(1.0);
    let full = run_with(
        &cfg,
        tempfile::tempdir().unwrap().path(),
        None,
        drawn_model(11).0,
    )
    .unwrap();
    let resumed = resumed_with_other_weights(&cfg);
    assert_bit_identical(&full.weights, &resumed.weights);
    for (a, b) in full.log.iter().zip(&resumed.log) {
        assert_eq!(a.terms, b.terms);
    }
    let mut defaults = cfg.clone();
    defaults.schedule.fd_classes = None;
    let err = run(&defaults, tempfile::tempdir().unwrap().path(), None)
        .err()
        .expect("DAFormer's classes on three classes");
    assert!(err.to_string().contains("fd_classes"), "{err}");
}

/// HRDA's pseudo-label margins are set on the whole target image, so they need a provider that
/// says where its crops came from, and they replace DAFormer's row crop. On whole, unflipped
/// images, top and bottom margins train exactly as the row crop of as many rows.
#[test]
fn pseudo_label_margins_need_the_crop_windows() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let windowed = || Toy {
        windows: true,
        ..Toy::new()
    };
    let margins = config("dacs+mic", 3)
        .with_param("mic_block", 8)
        .with_param("pl_margins", serde_json::json!([3, 9, 0, 0]));
    let rows = config("dacs+mic", 3)
        .with_param("mic_block", 8)
        .with_param("pl_crop_top", 3)
        .with_param("pl_crop_bottom", 9);
    let dir = || tempfile::tempdir().unwrap();
    let model = || model_config().init(&Device::flex()).unwrap();
    let a = run_on(&margins, dir().path(), None, model(), &mut windowed()).unwrap();
    let b = run_on(&rows, dir().path(), None, model(), &mut windowed()).unwrap();
    assert_bit_identical(&a.weights, &b.weights);
    let everything = config("dacs+mic", 1)
        .with_param("mic_block", 8)
        .with_param("pl_margins", serde_json::json!([S, 0, 0, 0]));
    let none_trusted = run_on(&everything, dir().path(), None, model(), &mut windowed()).unwrap();
    assert_eq!(none_trusted.log[0].term("mic"), Some(0.0));

    let cfg = config("dacs", 1).with_param("pl_margins", serde_json::json!([2, 8, 2, 2]));
    let err = run(&cfg, tempfile::tempdir().unwrap().path(), None)
        .err()
        .expect("no windows");
    assert!(err.to_string().contains("target_windows"), "{err}");
    let both = cfg.with_param("pl_crop_top", 3);
    let err = both.validate().expect_err("two pseudo-label crops");
    assert!(err.contains("pl_margins"), "{err}");
}

/// TUFL's stage one logs its focal term on the iterations where some pixel passes its class's
/// threshold, and a run cancelled after a checkpoint resumes, thresholds included, to the
/// uninterrupted run's weights and log, bit for bit.
#[test]
fn tufl_resumes_bit_identically() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut cfg = config("tufl", 6)
        .with_param("tufl_theta0", 0.4)
        .with_param("class_weights", serde_json::json!([1.0, 2.0, 0.5]))
        .with_param("source_ce_over", "all");
    cfg.schedule.checkpoint_every = 2;
    let full = run(&cfg, tempfile::tempdir().unwrap().path(), None).unwrap();
    let with_focal = full
        .log
        .iter()
        .filter(|l| l.term("focal").is_some())
        .count();
    assert!(with_focal >= 3, "{:?}", full.log);
    assert!(full.teacher.is_none(), "stage one has no teacher");
    let resumed = interrupted_then_resumed(&cfg);
    assert_bit_identical(&full.weights, &resumed.weights);
    for (a, b) in full.log.iter().zip(&resumed.log) {
        assert_eq!(a.terms, b.terms);
    }
}

/// TUFL's stage two labels ClassMix with the starting network, frozen: after training, its
/// teacher is the starting network bit for bit, BatchNorm statistics included, while the student
/// moved; it logs the focal and mixed terms; and a resumed run takes the teacher from its
/// checkpoint even when handed another starting network.
#[test]
fn tufl_cim_keeps_the_starting_network_as_its_teacher() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut cfg = config("tufl+cim", 4)
        .with_param("tufl_theta0", 0.4)
        .with_param("lambda_mix", 0.5);
    cfg.schedule.checkpoint_every = 2;
    let (model, initial) = drawn_model(11);
    let full = run_with(&cfg, tempfile::tempdir().unwrap().path(), None, model).unwrap();
    assert_bit_identical(full.teacher.as_ref().unwrap(), &initial);
    assert_ne!(
        full.weights[0].as_bytes(),
        initial[0].as_bytes(),
        "the student trains"
    );
    assert!(full
        .log
        .iter()
        .all(|l| l.term("mix").is_some_and(f64::is_finite)));
    assert!(full.log.iter().any(|l| l.term("focal").is_some()));

    let resumed = resumed_with_other_weights(&cfg);
    assert_bit_identical(&full.weights, &resumed.weights);
    assert_bit_identical(&initial, resumed.teacher.as_ref().unwrap());
}

/// The teacher moves as the references move it: with DACS's timing it is the student itself
/// after the first step (alpha_0 = 0); with DAFormer's the first update averages the initial
/// weights and the student's half and half. BatchNorm statistics are never averaged. The run
/// with DAFormer's timing also takes ClassMix per batch and the source CE over all pixels.
#[test]
fn the_teacher_follows_the_references_ema_timing() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let names: Vec<String> = named(&model_config().init(&Device::flex()).unwrap())
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let is_param = |n: &str| !n.ends_with("running_mean") && !n.ends_with("running_var");
    let dacs = run(
        &config("dacs", 1),
        tempfile::tempdir().unwrap().path(),
        None,
    )
    .unwrap();
    let teacher = dacs.teacher.unwrap();
    assert_eq!(names.len(), teacher.len());
    for ((name, t), s) in names.iter().zip(&teacher).zip(&dacs.weights) {
        if is_param(name) {
            assert_eq!(t.as_bytes(), s.as_bytes(), "{name}");
        }
    }
    let daformer = config("dacs", 1)
        .with_param("ema_timing", "daformer")
        .with_param("class_mix", "per_batch")
        .with_param("source_ce_over", "all");
    let later = run(&daformer, tempfile::tempdir().unwrap().path(), None).unwrap();
    assert!(later.log[0].term("mix").is_some_and(f64::is_finite));
    let teacher = later.teacher.unwrap();
    let moved = names
        .iter()
        .zip(&teacher)
        .zip(&later.weights)
        .filter(|((n, t), s)| is_param(n) && t.as_bytes() != s.as_bytes())
        .count();
    assert!(
        moved > 0,
        "with DAFormer's timing the teacher lags the student"
    );
}

/// The teacher predicts as the references' teacher does: BatchNorm on the batch's statistics
/// (train mode), like its student in training, not on the running statistics that inference
/// uses; and its passes leave the student's statistics alone.
#[test]
fn the_teacher_normalises_with_batch_statistics() {
    use dag_train::selftraining::{new_teacher, Teacher};
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let ad = Device::flex().autodiff();
    ad.seed(3);
    let student = model_config().init(&ad).unwrap().train();
    let x = Tensor::<4>::random([2, 3, 33, 33], burn::tensor::Distribution::Default, &ad)
        .mul_scalar(50.0);
    let (_, trained) = student.forward(x.clone());
    let teacher = new_teacher(Teacher::Ema, &student.clone().into(), &ad, &Device::flex()).unwrap();
    let before = named(&student.valid());
    let taught = teacher
        .forward(x.clone(), &mut dag_model::Noise::none())
        .main;
    assert_eq!(
        named(&student.valid()),
        before,
        "the teacher moved the student's statistics"
    );
    let (_, inferred) = student.valid().forward(x.inner());
    let values = |t: Tensor<4>| t.into_data().try_into_vec_as::<f32>().unwrap();
    let (trained, taught, inferred) = (values(trained), values(taught), values(inferred));
    let max_diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    assert!(
        max_diff(&trained, &taught) < 1e-5,
        "{}",
        max_diff(&trained, &taught)
    );
    assert!(
        max_diff(&inferred, &taught) > 1e-3,
        "{}",
        max_diff(&inferred, &taught)
    );
}

/// AdamW with a warmup (DAFormer's optimiser) trains, logs the warmed-up rate, and resumes bit
/// for bit: its moments are part of the checkpoint.
#[test]
fn adamw_with_warmup_resumes_bit_identically() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut cfg = config("source_only", 6);
    cfg.schedule.optimizer = "adamw".into();
    cfg.schedule.lr = 1e-3;
    cfg.schedule.weight_decay = 0.01;
    cfg.schedule.warmup_iters = 4;
    cfg.schedule.checkpoint_every = 2;
    let full = run(&cfg, tempfile::tempdir().unwrap().path(), None).unwrap();
    assert!(full.log[0].lr < 1e-8, "{}", full.log[0].lr);
    assert!(full.log[1].lr < full.log[2].lr && full.log[2].lr < full.log[4].lr);
    let first = full.log[0].term("seg_main").unwrap();
    let last = full.log[5].term("seg_main").unwrap();
    assert!(last < first, "AdamW does not train: {first} -> {last}");
    let sgd = run(
        &config("source_only", 6),
        tempfile::tempdir().unwrap().path(),
        None,
    )
    .unwrap();
    assert_ne!(sgd.log[5].term("seg_main"), full.log[5].term("seg_main"));

    let resumed = interrupted_then_resumed(&cfg);
    assert_bit_identical(&full.weights, &resumed.weights);
}

/// A narrow DAFormer (MiT-B0 at a quarter width, dropout and stochastic depth on) self-trains
/// with DAFormer's switches: no aux term although `lambda_seg_aux` keeps its default, the
/// feature distance on MiT's stage-4 features, AdamW with the LayerNorms exempt from decay. Its
/// dropout masks come from the run's own generator, so a run cancelled after a checkpoint
/// resumes to the uninterrupted run's student and teacher, bit for bit.
#[test]
fn daformer_self_trains_and_resumes_bit_identically() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let daformer = || {
        let encoder = dag_model::MitConfig::variant(0).unwrap().with_width(0.25);
        dag_model::DaFormerConfig::new(encoder, CLASSES)
            .with_width(0.25)
            .init(&Device::flex())
            .unwrap()
    };
    let mut cfg = config("dacs", 6)
        .with_param("pl_crop_bottom", 4)
        .with_param("source_ce_over", "all");
    cfg.schedule.optimizer = "adamw".into();
    cfg.schedule.lr = 1e-3;
    cfg.schedule.head_lr_mult = 10.0;
    cfg.schedule.weight_decay = 0.01;
    cfg.schedule.lambda_fd = 0.005;
    // MiT's stage 4 is one cell of these 32-pixel images: every class, any purity.
    cfg.schedule.fd_classes = Some(vec![0, 1, 2]);
    cfg.schedule.fd_min_ratio = 0.0;
    cfg.schedule.checkpoint_every = 2;
    let run_daformer =
        |dir: &std::path::Path, cancel: Option<usize>| run_with(&cfg, dir, cancel, daformer());
    let full = run_daformer(tempfile::tempdir().unwrap().path(), None).unwrap();
    for l in &full.log {
        for term in ["seg_main", "mix"] {
            assert!(l.term(term).is_some_and(f64::is_finite), "{term}: {l:?}");
        }
        assert!(
            l.term("seg_aux").is_none(),
            "DAFormer has no aux head: {l:?}"
        );
    }
    assert!(
        full.log.iter().any(|l| l.term("fd").is_some()),
        "the feature distance never applied"
    );
    let dir = tempfile::tempdir().unwrap();
    match run_daformer(dir.path(), Some(2)) {
        Err(TrainError::Cancelled { iteration: 3 }) => {}
        other => panic!(
            "expected a cancellation, got {:?}",
            other.map(|r| r.log.len())
        ),
    }
    let resumed = run_daformer(dir.path(), None).unwrap();
    assert_bit_identical(&full.weights, &resumed.weights);
    assert_bit_identical(
        full.teacher.as_ref().unwrap(),
        resumed.teacher.as_ref().unwrap(),
    );
}

/// HRDA with MIC on a narrow MiT-B0: every supervised term (source, mixed, masked) fuses the
/// context with a detail crop drawn from the run's generator and logs the crop's own loss; the
/// feature distance reads the context's features. A run cancelled after a checkpoint resumes
/// to the uninterrupted run's student and teacher, bit for bit.
#[test]
fn hrda_mic_self_trains_and_resumes_bit_identically() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let hrda = || {
        let encoder = dag_model::MitConfig::variant(0).unwrap().with_width(0.25);
        let network = dag_model::DaFormerConfig::new(encoder, CLASSES).with_width(0.125);
        dag_model::HrdaConfig {
            attention_embed_dim: 16,
            detail_crop: [32, 32],
            test_window: [64, 64],
            test_stride: [32, 32],
            ..dag_model::HrdaConfig::new(network)
        }
        .init(&Device::flex())
        .unwrap()
    };
    let mut cfg = config("dacs+mic", 6)
        .with_param("pl_crop_bottom", 4)
        .with_param("mic_block", 8)
        .with_param("source_ce_over", "all");
    cfg.schedule.optimizer = "adamw".into();
    cfg.schedule.lr = 1e-3;
    cfg.schedule.head_lr_mult = 10.0;
    cfg.schedule.weight_decay = 0.01;
    cfg.schedule.lambda_fd = 0.005;
    cfg.schedule.fd_classes = Some(vec![0, 1, 2]);
    cfg.schedule.fd_min_ratio = 0.0;
    cfg.schedule.checkpoint_every = 2;
    let run_hrda = |dir: &std::path::Path, cancel: Option<usize>| {
        run_on(&cfg, dir, cancel, hrda(), &mut Doubled(Toy::new()))
    };
    let full = run_hrda(tempfile::tempdir().unwrap().path(), None).unwrap();
    for l in &full.log {
        for term in [
            "seg_main",
            "seg_main_detail",
            "mix",
            "mix_detail",
            "mic",
            "mic_detail",
        ] {
            assert!(l.term(term).is_some_and(f64::is_finite), "{term}: {l:?}");
        }
    }
    assert!(
        full.log.iter().any(|l| l.term("fd").is_some()),
        "the feature distance never applied"
    );
    let dir = tempfile::tempdir().unwrap();
    match run_hrda(dir.path(), Some(2)) {
        Err(TrainError::Cancelled { iteration: 3 }) => {}
        other => panic!(
            "expected a cancellation, got {:?}",
            other.map(|r| r.log.len())
        ),
    }
    let resumed = run_hrda(dir.path(), None).unwrap();
    assert_bit_identical(&full.weights, &resumed.weights);
    assert_bit_identical(
        full.teacher.as_ref().unwrap(),
        resumed.teacher.as_ref().unwrap(),
    );

    // Methods that read the student's whole-image target prediction are refused for HRDA.
    for method in ["advent", "minent", "tufl"] {
        let err = run_with(
            &config(method, 1),
            tempfile::tempdir().unwrap().path(),
            None,
            hrda(),
        )
        .map(|_| ())
        .unwrap_err();
        assert!(
            matches!(&err, TrainError::Config(m) if m.contains("HRDA") && m.contains(method)),
            "{method}: {err}"
        );
    }
}

/// The error `train` stops with, for `config` on `data` from a fresh model on flex.
fn train_error(config: &TrainConfig, data: &mut dyn Batches) -> TrainError {
    let device = Device::flex();
    let dir = tempfile::tempdir().unwrap();
    let model = model_config().init(&device).unwrap();
    train(
        config,
        model,
        &device,
        data,
        dir.path(),
        &mut |_| {},
        &AtomicBool::new(false),
    )
    .expect_err("training should fail")
}

#[test]
fn non_finite_loss_aborts_naming_iteration_and_term() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut data = Toy::new();
    data.nan_at = Some(1);
    let err = train_error(&config("source_only", 3), &mut data);
    match &err {
        TrainError::NonFinite {
            iteration: 1, term, ..
        } if term == "seg_main" => {}
        other => panic!("unexpected {other}"),
    }
    assert!(err.to_string().contains("iteration 1"));
}

#[test]
fn bad_labels_are_refused_with_the_iteration() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut data = Toy::new();
    data.bad_label_at = Some(0);
    let err = train_error(&config("source_only", 1), &mut data).to_string();
    assert!(
        err.contains("iteration 0") && err.contains("label 9"),
        "{err}"
    );
}

#[test]
fn config_defaults_are_advent() {
    let c = TrainConfig::default();
    assert_eq!(c.method, "advent");
    let s = &c.schedule;
    assert_eq!((s.lr, s.momentum, s.weight_decay), (2.5e-4, 0.9, 5e-4));
    assert_eq!((s.max_iters, s.iters, s.power), (250_000, 120_000, 0.9));
    let a = c.adversarial().unwrap().expect("advent has discriminators");
    assert_eq!((a.lr_d, a.adam_beta2, a.adam_epsilon), (1e-4, 0.99, 1e-8));
    assert_eq!(
        (a.lambda_adv_main, a.lambda_adv_aux, a.disc_ndf),
        (0.001, 0.0002, 64)
    );
    c.validate().unwrap();
    // A misspelt param, a param of another method, an old spelling of a method and a value out
    // of range are refused with their names.
    let typo = TrainConfig::default().with_param("lamda_adv_main", 1.0);
    let err = typo.validate().unwrap_err();
    assert!(
        err.contains("`lamda_adv_main`") && err.contains("lambda_adv_main"),
        "{err}"
    );
    let other = TrainConfig::default().with_param("lambda_ent_main", 1.0);
    assert!(other.validate().unwrap_err().contains("`lambda_ent_main`"));
    let old = TrainConfig {
        method: "min_ent_adv_ent".into(),
        ..TrainConfig::default()
    };
    assert!(old.validate().unwrap_err().contains("advent+minent"));
    let negative = TrainConfig::default().with_param("lr_d", -1.0);
    assert!(negative.validate().unwrap_err().contains("lr_d"));
    let beta = TrainConfig::default().with_param("adam_beta1", 1.0);
    assert!(beta.validate().unwrap_err().contains("adam_beta1"));
}

#[test]
fn method_params_have_one_name_each() {
    let mut names: Vec<&str> = dag_train::methods::param_specs()
        .iter()
        .chain(&<Schedule as dag_api::ParamSet>::param_specs())
        .map(|s| s.name)
        .collect();
    let count = names.len();
    names.sort_unstable();
    names.dedup();
    assert_eq!(
        names.len(),
        count,
        "a param name is declared twice: {names:?}"
    );
    for m in dag_train::METHODS {
        TrainConfig {
            method: m.name.to_string(),
            ..TrainConfig::default()
        }
        .validate()
        .unwrap_or_else(|e| panic!("{}: {e}", m.name));
        // Every term a method logs has the param that scales it (named in divergence errors).
        let mut terms = vec!["seg_main", "seg_aux"];
        terms.extend(m.target.iter().flat_map(|o| o.term_names()));
        if m.adversarial {
            terms.extend(["adv_main", "adv_aux", "d_main", "d_aux"]);
        }
        let mut params = m.param_names();
        params.extend(
            names
                .iter()
                .filter(|n| n.starts_with("lambda_seg") || **n == "lr"),
        );
        // HRDA logs each term's detail crop beside it.
        let detail: Vec<String> = terms.iter().map(|t| format!("{t}_detail")).collect();
        for term in terms
            .iter()
            .copied()
            .chain(detail.iter().map(String::as_str))
        {
            let knob = dag_train::methods::weight_param_of(term);
            let has_knob = params.iter().any(|p| *p == knob);
            assert!(has_knob, "{}: no `{knob}` for `{term}`", m.name);
        }
    }
}

/// Batches of 40x24 images: large enough for DeepLabV2, too small for the discriminator.
struct TooSmall;

impl Batches for TooSmall {
    fn source(&mut self, _: usize, _: &mut dyn RngCore) -> Result<SourceBatch, BatchError> {
        Ok(SourceBatch {
            images: ImageBatch {
                data: vec![0.5; 3 * 24 * 40],
                shape: [1, 3, 24, 40],
            },
            labels: LabelBatch {
                data: vec![1; 24 * 40],
                shape: [1, 24, 40],
            },
        })
    }

    fn target(&mut self, _: usize, _: &mut dyn RngCore) -> Result<ImageBatch, BatchError> {
        Ok(ImageBatch {
            data: vec![0.5; 3 * 24 * 40],
            shape: [1, 3, 24, 40],
        })
    }
}

#[test]
fn maps_too_small_for_the_discriminator_are_refused_with_the_size() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let err = train_error(&config("advent", 1), &mut TooSmall).to_string();
    assert!(
        err.contains("source batch of iteration 0") && err.contains("40x24"),
        "{err}"
    );
    assert!(err.contains("at least 32x32"), "{err}");
}
