//! The self-training pieces against an independent NumPy implementation
//! (`tests/selftraining_reference.py`) on the same inputs and the same random draws: the
//! pseudo-labels and their confidence weight, ClassMix for both class-choice variants, the colour
//! jitter and the blur, MIC's block mask, the weighted cross-entropy, the EMA update and rare
//! class sampling's class probabilities. The
//! interpreter comes from `DAG_TEST_PYTHON` (set by `scripts/test.sh`), else `python3`; it must
//! have NumPy.

use std::process::Command;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Device, Tensor, TensorData};
use dag_model::deeplab::CLASSIFIER_DILATIONS;
use dag_model::DeepLabV2Config;
use dag_train::losses::class_weighted_cross_entropy;
use dag_train::selftraining::augment::{self, StrongAugment};
use dag_train::selftraining::mixing::{self, ClassChoice};
use dag_train::selftraining::tufl::{self, TuflParams};
use dag_train::selftraining::{
    ema_alpha, ema_update, new_teacher, weighted_cross_entropy, Teacher,
};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

fn uniforms(rng: &mut ChaCha8Rng, n: usize, low: f32, high: f32) -> Vec<f32> {
    (0..n).map(|_| mixing::uniform_in(rng, low, high)).collect()
}

/// Label maps made of a few rectangles of classes 0..6 and some ignored pixels.
fn blob_labels(rng: &mut ChaCha8Rng, n: usize, h: usize, w: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * h * w);
    for _ in 0..n {
        let mut map = vec![(rng.next_u32() % 7) as u8; h * w];
        for _ in 0..4 {
            let class = match rng.next_u32() % 8 {
                7 => 255,
                c => c as u8,
            };
            let (y0, x0) = ((rng.next_u32() as usize) % h, (rng.next_u32() as usize) % w);
            for y in y0..h.min(y0 + 3) {
                for x in x0..w.min(x0 + 4) {
                    map[y * w + x] = class;
                }
            }
        }
        out.extend(map);
    }
    out
}

/// A normalised BGR image batch from random 8-bit colours.
fn images(rng: &mut ChaCha8Rng, n: usize, h: usize, w: usize) -> Vec<f32> {
    let mean = dag_data::MEAN_BGR;
    let mut out = Vec::with_capacity(n * 3 * h * w);
    for _ in 0..n {
        for m in mean {
            for _ in 0..h * w {
                out.push((rng.next_u32() % 256) as f32 - m);
            }
        }
    }
    out
}

fn pseudo_case(rng: &mut ChaCha8Rng) -> Value {
    let shape = [2, 5, 6, 7];
    let logits = uniforms(rng, shape.iter().product(), -3.0, 3.0);
    let p = mixing::pseudo_labels(&logits, shape);
    let weight = mixing::confidence_weight(&p.confidence, 0.4);
    json!({ "logits": logits, "shape": shape, "threshold": 0.4, "labels": p.labels,
            "confidence": p.confidence, "weight": weight })
}

fn classmix_case(rng: &mut ChaCha8Rng, choice: ClassChoice) -> Value {
    let (n, h, w) = (2, 8, 9);
    let source_labels = blob_labels(rng, n, h, w);
    let pseudo = blob_labels(rng, n, h, w);
    let xs = images(rng, n, h, w);
    let xt = images(rng, n, h, w);
    let classes = mixing::draw_mix_classes(&source_labels, [n, h, w], choice, rng);
    let mut target_weight = vec![0.4f32; n * h * w];
    mixing::crop_weight_rows(&mut target_weight, [h, w], 1, 2);
    let plane = h * w;
    let (mut masks, mut mixed, mut labels, mut weights) = (vec![], vec![], vec![], vec![]);
    for (i, picked) in classes.iter().enumerate() {
        let px = i * plane..(i + 1) * plane;
        let values = i * 3 * plane..(i + 1) * 3 * plane;
        let m = mixing::class_mask(&source_labels[px.clone()], picked);
        mixed.extend(mixing::mix_image(&m, &xs[values.clone()], &xt[values]));
        labels.extend(mixing::mix_pixels(
            &m,
            &source_labels[px.clone()],
            &pseudo[px.clone()],
        ));
        weights.extend(mixing::mix_pixels(
            &m,
            &vec![1.0f32; plane],
            &target_weight[px],
        ));
        masks.extend(m);
    }
    json!({ "per_batch": choice == ClassChoice::PerBatch, "shape": [n, h, w],
            "source_labels": source_labels, "pseudo": pseudo, "xs": xs, "xt": xt,
            "classes": classes, "crop": [1, 2], "target_weight": 0.4,
            "mask": masks, "mixed": mixed, "labels": labels, "weights": weights })
}

fn augment_case(rng: &mut ChaCha8Rng) -> Value {
    let (h, w) = (40, 52);
    let image = images(rng, 1, h, w);
    let draw = augment::draw_jitter(0.25, rng);
    let sigma = mixing::uniform_in(rng, augment::BLUR_SIGMA.0, augment::BLUR_SIGMA.1);
    let caffe = dag_data::Normalisation::CAFFE_BGR;
    let mut jittered = image.clone();
    augment::transform_image(&mut jittered, [h, w], &caffe, Some(&draw), None);
    let mut blurred = image.clone();
    augment::transform_image(&mut blurred, [h, w], &caffe, None, Some(sigma));
    let mut both = image.clone();
    augment::transform_image(&mut both, [h, w], &caffe, Some(&draw), Some(sigma));
    // The batch transform draws its switches, then per image the jitter and the sigma: replay
    // them from a copy of the generator.
    let mut batch = images(rng, 2, h, w);
    let before = batch.clone();
    let mut replay = rng.clone();
    // Both switches on (probability 1), so that every draw is exercised.
    let aug = StrongAugment {
        jitter_strength: 0.2,
        jitter_p: 1.0,
        blur_p: 1.0,
        input: dag_data::Normalisation::CAFFE_BGR,
    };
    aug.apply(&mut batch, [2, 3, h, w], rng);
    assert!(mixing::uniform(&mut replay) < 1.0 && mixing::uniform(&mut replay) < 1.0);
    let mut per_image = vec![];
    for _ in 0..2 {
        let d = augment::draw_jitter(0.2, &mut replay);
        let s = mixing::uniform_in(&mut replay, 0.15, 1.15);
        per_image.push(json!({ "jitter": jitter_json(&d), "sigma": s }));
    }
    // MIC's single call on the batch: factors per image, one order and one sigma.
    let mut mic_batch = before.clone();
    let mut replay = rng.clone();
    aug.apply_to_batch(&mut mic_batch, [2, 3, h, w], rng);
    let _switches = (mixing::uniform(&mut replay), mixing::uniform(&mut replay));
    let mut factors: Vec<_> = (0..2)
        .map(|_| augment::draw_jitter_factors(0.2, &mut replay))
        .collect();
    let order = augment::draw_jitter_order(&mut replay);
    let sigma_batch = mixing::uniform_in(&mut replay, 0.15, 1.15);
    for f in &mut factors {
        f.order = order;
    }
    let mic_draws: Vec<Value> = factors
        .iter()
        .map(|d| json!({ "jitter": jitter_json(d), "sigma": sigma_batch }))
        .collect();
    json!({ "shape": [h, w], "mean_bgr": dag_data::MEAN_BGR, "image": image,
            "jitter": jitter_json(&draw), "sigma": sigma,
            "jittered": jittered, "blurred": blurred, "both": both,
            "batch_before": before, "batch_after": batch, "batch_draws": per_image,
            "mic_batch_after": mic_batch, "mic_batch_draws": mic_draws })
}

fn jitter_json(d: &augment::JitterDraw) -> Value {
    json!({ "brightness": d.brightness, "contrast": d.contrast, "saturation": d.saturation,
            "hue": d.hue, "order": d.order })
}

fn mic_case(rng: &mut ChaCha8Rng) -> Value {
    let (h, w, block, ratio) = (40, 52, 8, 0.7f32);
    let grid = mixing::block_grid(h, w, block);
    let mut replay = rng.clone();
    let mask = mixing::block_mask(h, w, block, ratio, rng);
    let draws = uniforms(&mut replay, grid[0] * grid[1], 0.0, 1.0);
    json!({ "shape": [h, w], "block": block, "ratio": ratio, "draws": draws, "mask": mask })
}

fn cross_entropy_case(rng: &mut ChaCha8Rng) -> Value {
    let shape = [2, 4, 5, 6];
    let logits = uniforms(rng, shape.iter().product(), -2.0, 2.0);
    let labels: Vec<u8> = (0..60)
        .map(|_| match rng.next_u32() % 5 {
            4 => 255,
            c => c as u8,
        })
        .collect();
    let weights: Vec<f32> = (0..60)
        .map(|_| [1.0, 0.3, 0.0][(rng.next_u32() % 3) as usize])
        .collect();
    let device = Device::flex();
    let t = Tensor::<4>::from_data(TensorData::new(logits.clone(), shape), &device);
    let value: f32 = weighted_cross_entropy(t, &labels, &weights).into_scalar();
    json!({ "logits": logits, "shape": shape, "labels": labels, "weights": weights,
            "value": value })
}

fn host(t: Tensor<4>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

/// TUFL: the affine draws and the warp of images and logits, the threshold update, the kept
/// pixels, and the focal loss with both focal weights, its value and its gradients with respect
/// to both views' logits; plus the class-weighted cross-entropy.
fn tufl_case(rng: &mut ChaCha8Rng) -> Value {
    let params = TuflParams::default();
    let (n, c, h, w) = (2, 4, 6, 7);
    let affines: Vec<tufl::Affine> = (0..n).map(|_| tufl::draw_affine(&params, rng)).collect();
    let plan = tufl::WarpPlan::new(&affines, [h, w]);
    let image = uniforms(rng, n * 3 * h * w, -100.0, 100.0);
    let warped_image = plan.apply_host(&image, 3);
    let weak = uniforms(rng, n * c * h * w, -4.0, 4.0);
    let strong = uniforms(rng, n * c * h * w, -4.0, 4.0);
    let class_weights = [1.0f32, 2.5, 0.5, 3.0];
    let thresholds_before = vec![0.5, 0.8, 0.95, 0.3];
    let ad = Device::flex().autodiff();
    let mut focal = serde_json::Map::new();
    let mut thresholds_after = thresholds_before.clone();
    let mut weak_labels_out = None;
    let mut warped_out = None;
    for form in ["adaptive", "fixed"] {
        let weak_t =
            Tensor::<4>::from_data(TensorData::new(weak.clone(), [n, c, h, w]), &ad).require_grad();
        let strong_t = Tensor::<4>::from_data(TensorData::new(strong.clone(), [n, c, h, w]), &ad)
            .require_grad();
        let warped = plan.apply(weak_t.clone());
        let warped_host = host(warped.clone().detach());
        let labels = mixing::pseudo_labels(&warped_host, [n, c, h, w]);
        let (kept, weight) = if form == "adaptive" {
            tufl::update_thresholds(&mut thresholds_after, &labels, 0.8, 8.0, 0.9);
            let kept = tufl::kept_pixels(&labels, &thresholds_after);
            (kept, tufl::FocalWeight::OneMinusStrong)
        } else {
            (
                tufl::kept_above(&labels, 0.5),
                tufl::FocalWeight::WeakMinusStrong,
            )
        };
        let value = tufl::focal_loss(
            warped,
            strong_t.clone(),
            &labels,
            &kept,
            Some(&class_weights),
            2.0,
            weight,
        )
        .expect("some pixels are kept");
        let grads = value.backward();
        let grad_weak = host(weak_t.grad(&grads).unwrap());
        let grad_strong = host(strong_t.grad(&grads).unwrap());
        let value: f32 = value.into_scalar();
        focal.insert(
            form.into(),
            json!({ "kept": kept, "value": value, "grad_weak": grad_weak,
                    "grad_strong": grad_strong }),
        );
        weak_labels_out = Some(labels);
        warped_out = Some(warped_host);
    }
    let labels = weak_labels_out.unwrap();
    let ce_labels: Vec<u8> = (0..n * h * w)
        .map(|_| match rng.next_u32() % 5 {
            4 => 255,
            c => c as u8,
        })
        .collect();
    let pixel_weights: Vec<f32> = (0..n * h * w)
        .map(|_| [1.0, 0.3, 0.0][(rng.next_u32() % 3) as usize])
        .collect();
    let t = Tensor::<4>::from_data(
        TensorData::new(strong.clone(), [n, c, h, w]),
        &Device::flex(),
    );
    let ce: f32 = class_weighted_cross_entropy(
        t,
        &ce_labels,
        Some(&pixel_weights),
        &class_weights,
        (n * h * w) as f64,
    )
    .into_scalar();
    json!({
        "shape": [n, c, h, w], "affines": affines, "image": image, "warped_image": warped_image,
        "weak": weak, "strong": strong, "warped": warped_out.unwrap(),
        "labels": labels.labels, "confidence": labels.confidence,
        "thresholds_before": thresholds_before, "thresholds_after": thresholds_after,
        "class_weights": class_weights, "focal": focal,
        "ce_labels": ce_labels, "ce_weights": pixel_weights, "ce_value": ce,
    })
}

/// DAFormer's feature distance: the cell mask from the labels (feature sizes that divide the
/// label size, and ADVENT's ceil-mode size that does not), the loss and its gradient.
fn fd_case(rng: &mut ChaCha8Rng) -> Value {
    let mut out = Vec::new();
    for (n, h, w, fh, fw) in [(2, 16, 24, 2, 3), (1, 20, 20, 3, 3)] {
        let labels = blob_labels(rng, n, h, w);
        let channels = 5;
        let fd_classes = [1usize, 3, 5];
        let mask = dag_train::feature_distance::cell_mask(
            &labels,
            [n, h, w],
            [fh, fw],
            7,
            &fd_classes,
            0.5,
        );
        let features = uniforms(rng, n * channels * fh * fw, -1.0, 1.0);
        let reference = uniforms(rng, n * channels * fh * fw, -1.0, 1.0);
        let ad = Device::flex().autodiff();
        let shape = [n, channels, fh, fw];
        let f =
            Tensor::<4>::from_data(TensorData::new(features.clone(), shape), &ad).require_grad();
        let r = Tensor::<4>::from_data(TensorData::new(reference.clone(), shape), &ad);
        let (value, grad) = match dag_train::feature_distance::feature_distance(f.clone(), r, &mask)
        {
            Some(v) => {
                let grads = v.backward();
                let grad = host(f.grad(&grads).unwrap());
                (Some(v.into_scalar::<f32>()), grad)
            }
            None => (None, Vec::new()),
        };
        out.push(
            json!({ "labels": labels, "label_shape": [n, h, w], "shape": shape,
            "classes": 7, "fd_classes": fd_classes, "min_ratio": 0.5, "mask": mask,
            "features": features, "reference": reference, "value": value, "grad": grad }),
        );
    }
    Value::Array(out)
}

/// Every float tensor of a module with its path, as flat lists.
fn tensors(module: &impl Module) -> Value {
    struct Collect {
        path: Vec<String>,
        out: serde_json::Map<String, Value>,
    }
    impl ModuleVisitor for Collect {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let values: Vec<f32> = param
                .val()
                .into_data()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .unwrap();
            self.out.insert(self.path.join("."), json!(values));
        }
    }
    let mut c = Collect {
        path: vec![],
        out: Default::default(),
    };
    module.visit(&mut c);
    Value::Object(c.out)
}

fn ema_case() -> Value {
    let ad = Device::flex().autodiff();
    ad.seed(5);
    let config = DeepLabV2Config {
        blocks: [1, 1, 1, 1],
        width: 0.0625,
        classes: 3,
        classifier_dilations: CLASSIFIER_DILATIONS.to_vec(),
        input: dag_model::InputConvention::CaffeBgr,
        resnet: dag_model::ResNetStyle::Caffe,
    };
    let student = dag_model::Segmenter::from(config.init(&ad).unwrap().train());
    let x = Tensor::<4>::random([2, 3, 33, 33], burn::tensor::Distribution::Default, &ad);
    let _ = student.forward(x.clone(), &mut dag_model::Noise::none());
    let teacher = new_teacher(Teacher::Ema, &student, &ad, &Device::flex()).unwrap();
    // The student moves on: its parameters change and a forward pass moves its BatchNorm
    // statistics, which the teacher must not share.
    struct Nudge(u64);
    impl ModuleMapper for Nudge {
        fn map_float<const D: usize>(&mut self, p: Param<Tensor<D>>) -> Param<Tensor<D>> {
            self.0 += 1;
            let k = self.0 as f64;
            p.map(|t| t.clone().add_scalar(0.01 * k) + t.mul_scalar(0.1))
        }
    }
    let student = student.map(&mut Nudge(0));
    let _ = student.forward(x.mul_scalar(2.0), &mut dag_model::Noise::none());
    let teacher_before = tensors(&teacher.valid());
    let alpha = ema_alpha(9, 0.7);
    let after = ema_update(teacher, &student, alpha);
    json!({ "alpha": alpha, "alpha_0": ema_alpha(0, 0.99), "alpha_1": ema_alpha(1, 0.99),
            "alpha_1000": ema_alpha(1000, 0.99), "teacher": teacher_before,
            "student": tensors(&student.valid()), "after": tensors(&after.valid()) })
}

fn rcs_case(rng: &mut ChaCha8Rng) -> Value {
    let mut counts: Vec<Vec<(u8, f64)>> = Vec::new();
    for _ in 0..12 {
        let mut image = vec![(255u8, 100.0)];
        for c in 0..6u8 {
            if !rng.next_u32().is_multiple_of(3) {
                image.push((c, f64::from(rng.next_u32() % 5000) * f64::from(c + 1)));
            }
        }
        counts.push(image);
    }
    let rcs = dag_data::RareClassSampler::new(&counts, 0.5, 3000.0).unwrap();
    json!({ "counts": counts, "temperature": 0.5, "min_pixels": 3000.0,
            "classes": rcs.classes, "probabilities": rcs.probabilities, "images": rcs.images })
}

#[test]
fn self_training_pieces_match_numpy() {
    let mut rng = ChaCha8Rng::seed_from_u64(2026);
    let cases = json!({
        "pseudo": pseudo_case(&mut rng),
        "classmix_per_image": classmix_case(&mut rng, ClassChoice::PerImage),
        "classmix_per_batch": classmix_case(&mut rng, ClassChoice::PerBatch),
        "augment": augment_case(&mut rng),
        "mic": mic_case(&mut rng),
        "cross_entropy": cross_entropy_case(&mut rng),
        "ema": ema_case(),
        "rcs": rcs_case(&mut rng),
        "tufl": tufl_case(&mut rng),
        "fd": fd_case(&mut rng),
    });
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cases.json");
    std::fs::write(&file, serde_json::to_vec(&cases).unwrap()).unwrap();
    let python = std::env::var("DAG_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/selftraining_reference.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg(&file)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{python}` (set DAG_TEST_PYTHON): {e}"));
    assert!(
        out.status.success(),
        "the NumPy reference disagrees (or `{python}` lacks numpy; scripts/test.sh sets one \
         up):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report = String::from_utf8_lossy(&out.stdout);
    for case in [
        "pseudo",
        "classmix",
        "jitter",
        "blur",
        "batch",
        "mic",
        "cross_entropy",
        "ema",
        "rcs",
        "warp",
        "thresholds",
        "focal adaptive",
        "focal fixed",
        "class_weighted_cross_entropy",
        "feature_distance",
    ] {
        assert!(report.contains(&format!("ok {case}")), "{report}");
    }
}
