//! `evaluate`: a model on a labelled set at full label resolution, ADVENT's protocol.

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use dag_api::{
    InputSpec, OutputSpec, ParamSet, ParamSpec, Params, Stage, StageContext, StageError,
    StageOutcome,
};
use dag_data::pngio::write_label_png;
use dag_data::{Column, Dataset, Protocol, Table};
use dag_metrics::{round2, ConfusionMatrix, SYNTHIA_13_OF_16};
use dag_model::{load_record_into, Segmenter};
use serde::Deserialize;
use serde_json::json;

use dag_artifacts::evaluate::{
    snapshot_column, CONFUSION_FILE, METRICS_FILE, SAMPLES_DIR, SNAPSHOTS_FILE, SUMMARY_FILE,
};
use dag_artifacts::files::{create_parent, data_error, safe_join, write_json};
use dag_artifacts::visuals::{write_index, Visual};

use crate::common::{
    check_classes, check_model_input, device, load_model_input, open_dataset, protocol,
};

/// The `evaluate` stage kind.
pub struct Evaluate;

/// The 16 classes of the SYNTHIA protocol inside the 19-class one (terrain, truck and train
/// dropped), for the mIoU16 of a 19-class evaluation.
const SIXTEEN_OF_19: [usize; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18];

/// The params of `evaluate`.
#[derive(ParamSet, Deserialize)]
struct P {
    /// images per forward pass (memory only; results do not depend on it)
    #[param(default = 1, min = 1)]
    batch_size: usize,
    /// evaluate the final model, or every snapshot the training stage kept (`snapshot_every`)
    /// plus the final model and report the best
    #[param(default = "final", one_of = ["final", "all"])]
    snapshots: String,
    /// compare at the original label size (needs `keep_full_labels: true` on the set's
    /// preprocess stage); false compares at the preprocessed size
    #[param(default = true)]
    full_resolution: bool,
    /// picture this many images in samples/: image, ground truth, colour prediction, per-pixel
    /// entropy heat map and the prediction over the image
    #[param(default = 4)]
    samples: usize,
    /// also write every prediction as an 8-bit class-id PNG (predictions/<path>)
    #[param(default = false)]
    save_predictions: bool,
}

impl Stage for Evaluate {
    fn kind(&self) -> &'static str {
        "evaluate"
    }

    fn code(&self) -> dag_api::Code {
        crate::CODE
    }

    fn doc(&self) -> &'static str {
        "Evaluates a model on a labelled set as ADVENT does: the model sees the preprocessed \
         image, its main output is upsampled bilinearly to the full label size, the argmax is \
         compared with the label in a confusion histogram over valid pixels, IoU = tp / (tp + \
         fp + fn), mIoU = mean over defined classes. Writes metrics.parquet (class, iou, tp, fp, \
         fn), confusion.parquet, summary.json (miou, miou16, miou13 for the 16-class protocol) \
         and pictures of the first `samples` images (image, ground truth, colour prediction, \
         entropy heat map, overlay). With `snapshots: all` every kept \
         snapshot is evaluated and the best one reported, as the papers do."
    }

    fn params(&self) -> Vec<ParamSpec> {
        P::param_specs()
    }

    fn inputs(&self) -> Vec<InputSpec> {
        vec![
            InputSpec {
                name: "model",
                ty: "model",
                required: true,
                doc: "the model to evaluate",
            },
            InputSpec {
                name: "data",
                ty: "dataset",
                required: true,
                doc: "a labelled set (a `preprocess` output, ideally with keep_full_labels)",
            },
        ]
    }

    fn outputs(&self, params: &Params) -> Vec<OutputSpec> {
        let mut v = vec![OutputSpec {
            name: "evaluation".into(),
            ty: "evaluation",
            doc: "metrics.parquet, confusion.parquet, summary.json, samples/, \
                  snapshots.parquet (with snapshots: all), predictions/ (with save_predictions)",
        }];
        if params.get("snapshots").and_then(|v| v.as_str()) == Some("all") {
            v.push(OutputSpec {
                name: "best".into(),
                ty: "model",
                doc: "the best snapshot as a model artifact (IntraDA ranks with the best \
                      AdvEnt snapshot)",
            });
        }
        v
    }

    fn run(&self, ctx: &StageContext<'_>) -> Result<StageOutcome, StageError> {
        let p: P = ctx.params.parse()?;
        let device = device(ctx)?;
        let ds = open_dataset(ctx, "data")?;
        let proto = protocol(&ds)?;
        if p.full_resolution && !ds.meta().full_labels {
            return Err(
                StageError::new("the `data` set has no full-resolution labels").with_hint(
                    "set `keep_full_labels: true` on its preprocess stage, or `full_resolution: \
                 false` here to compare at the preprocessed size",
                ),
            );
        }
        let (model, desc) = load_model_input(ctx, "model", &device)?;
        check_classes(&desc, proto, "the `data` set")?;
        check_model_input(&model, &ds, "the `data` set")?;
        let out = ctx.output("evaluation")?;
        let model_dir = &ctx.input("model")?.path;

        // Every candidate: the kept snapshots (with `all`), then the final model.
        let iterations = desc.metadata.get("iterations").and_then(|v| v.as_u64());
        let mut candidates: Vec<(Option<usize>, std::path::PathBuf)> = Vec::new();
        if p.snapshots == "all" {
            candidates.extend(
                dag_train::snapshots(model_dir)
                    .into_iter()
                    // The last snapshot is the final model, evaluated below anyway.
                    .filter(|(it, _)| Some(*it as u64) != iterations)
                    .map(|(it, path)| (Some(it), path)),
            );
        }
        let mut results = Vec::new();
        ctx.progress
            .start("evaluate", (candidates.len() + 1) as u64 * ds.len() as u64);
        let mut done = 0u64;
        for (it, path) in &candidates {
            let snap = load_record_into(model.clone(), path)?;
            let cm = confusion(ctx, &snap, &ds, &p, &device, &mut done, None, proto)?;
            results.push((*it, cm));
        }
        let cm = confusion(ctx, &model, &ds, &p, &device, &mut done, Some(out), proto)?;
        results.push((iterations.map(|i| i as usize), cm));

        let best = results
            .iter()
            .enumerate()
            .max_by(|a, b| {
                let ma = a.1 .1.miou().unwrap_or(f64::NEG_INFINITY);
                let mb = b.1 .1.miou().unwrap_or(f64::NEG_INFINITY);
                // Ties go to the later snapshot.
                ma.total_cmp(&mb).then(a.0.cmp(&b.0))
            })
            .map(|(i, _)| i)
            .expect("at least the final model");
        if results.len() > 1 {
            let t = Table::new()
                .with(
                    snapshot_column::ITERATION,
                    Column::I64(
                        results
                            .iter()
                            .map(|(it, _)| it.map_or(-1, |i| i as i64))
                            .collect(),
                    ),
                )
                .with(
                    snapshot_column::MIOU,
                    Column::F64(
                        results
                            .iter()
                            .map(|(_, cm)| cm.miou().unwrap_or(f64::NAN))
                            .collect(),
                    ),
                )
                .with(
                    "final",
                    Column::Bool((0..results.len()).map(|i| i + 1 == results.len()).collect()),
                );
            let path = out.join(SNAPSHOTS_FILE);
            t.write_parquet(&path)
                .map_err(|e| data_error(e).with_path(path.clone()))?;
        }
        let (best_iteration, cm) = &results[best];
        if p.snapshots == "all" {
            let record = if best + 1 == results.len() {
                model_dir.join(dag_model::WEIGHTS_FILE)
            } else {
                candidates[best].1.clone()
            };
            let mut best_desc = desc.clone();
            if let Some(m) = best_desc.metadata.as_object_mut() {
                m.insert("iterations".into(), json!(best_iteration));
                m.insert("selected_by".into(), json!(ctx.stage));
            }
            write_model_copy(&best_desc, &record, ctx.output("best")?)?;
        }
        write_tables(cm, proto, out)?;
        let summary = summary(
            cm,
            proto,
            *best_iteration,
            best + 1 == results.len(),
            &desc,
            ctx,
        );
        write_json(&out.join(SUMMARY_FILE), &summary)?;

        let mut outcome = StageOutcome::default();
        for key in ["miou", "miou16", "miou13", "pixel_accuracy"] {
            if let Some(v) = summary.get(key).filter(|v| !v.is_null()) {
                outcome.metrics.insert(key.into(), v.clone());
            }
        }
        outcome.metrics.insert("images".into(), ds.len().into());
        Ok(outcome)
    }
}

/// Runs `model` over the set and accumulates the confusion matrix; writes the sample and
/// (optionally) all predictions under `out` when given.
#[allow(clippy::too_many_arguments)]
fn confusion(
    ctx: &StageContext<'_>,
    model: &Segmenter,
    ds: &Dataset,
    p: &P,
    device: &Device,
    done: &mut u64,
    out: Option<&std::path::Path>,
    proto: Protocol,
) -> Result<ConfusionMatrix, StageError> {
    let classes = proto.num_classes();
    let mut cm = ConfusionMatrix::new(classes);
    let all: Vec<usize> = (0..ds.len()).collect();
    let (w, h) = ds.size();
    let mut visuals = Vec::new();
    // One inference copy for the whole set: no autodiff, BatchNorm on running statistics.
    let net = model.valid();
    let plain = device.clone().without_autodiff();
    for chunk in all.chunks(p.batch_size) {
        ctx.check_cancelled()?;
        // Images of one batch may have different original sizes: group only for the forward.
        let batch = ds.batch_as(chunk, &dag_train::normalisation(model.input()));
        let x = Tensor::<4>::from_data(TensorData::new(batch.images, batch.shape), &plain);
        let main = net.infer(x).main;
        for (k, &i) in chunk.iter().enumerate() {
            let item = ds.get(i).expect("index");
            let (gw, gh, gt) = if p.full_resolution {
                let f = ds.full_label(i).expect("full labels checked");
                (f.width, f.height, f.data)
            } else {
                (w, h, item.label)
            };
            let logits = main.clone().narrow(0, k, 1);
            let logits = net.resize_logits(logits, [gh as usize, gw as usize]);
            let pictured = out.is_some() && i < p.samples;
            let entropy = pictured.then(|| crate::visuals::pixel_entropy(logits.clone()).remove(0));
            let pred = dag_model::argmax_classes(logits).remove(0);
            cm.add(gt, &pred)?;
            if let Some(out) = out {
                if let Some(entropy) = &entropy {
                    let pics = crate::visuals::Pictures {
                        width: gw,
                        height: gh,
                        image: item.image,
                        image_size: (w, h),
                        truth: Some(gt),
                        prediction: &pred,
                        entropy,
                    };
                    let dir = out.join(SAMPLES_DIR);
                    let files =
                        crate::visuals::write_pictures(&dir, &format!("{i:02}"), &pics, proto)?;
                    visuals.push(Visual {
                        group: SAMPLES_DIR.into(),
                        path: item.path.to_string(),
                        rank: None,
                        score: None,
                        files,
                    });
                }
                if p.save_predictions {
                    let path = safe_join(&out.join("predictions"), item.path)?;
                    create_parent(&path)?;
                    write_label_png(&path, gw, gh, &pred).map_err(data_error)?;
                }
            }
            *done += 1;
        }
        ctx.progress.set_position(*done);
    }
    if let Some(out) = out.filter(|_| !visuals.is_empty()) {
        write_index(&out.join(SAMPLES_DIR), &visuals)?;
    }
    Ok(cm)
}

fn write_tables(
    cm: &ConfusionMatrix,
    proto: Protocol,
    out: &std::path::Path,
) -> Result<(), StageError> {
    let names = proto.class_names();
    let counts = cm.per_class();
    let iou = cm.iou();
    let t = Table::new()
        .with("class_id", Column::U32((0..names.len() as u32).collect()))
        .with(
            "class",
            Column::Str(names.iter().map(|s| s.to_string()).collect()),
        )
        .with(
            "iou",
            Column::F64(
                iou.iter()
                    .map(|v| v.map_or(f64::NAN, |v| v * 100.0))
                    .collect(),
            ),
        )
        .with("tp", Column::U64(counts.iter().map(|c| c.tp).collect()))
        .with("fp", Column::U64(counts.iter().map(|c| c.fp).collect()))
        .with("fn", Column::U64(counts.iter().map(|c| c.fn_).collect()))
        .with(
            "pixels",
            Column::U64((0..names.len()).map(|c| cm.gt_pixels(c)).collect()),
        );
    let path = out.join(METRICS_FILE);
    t.write_parquet(&path)
        .map_err(|e| data_error(e).with_path(path.clone()))?;
    let n = cm.classes();
    let mut gt = Vec::with_capacity(n * n);
    let mut pred = Vec::with_capacity(n * n);
    let mut pixels = Vec::with_capacity(n * n);
    for r in 0..n {
        for c in 0..n {
            gt.push(names[r].to_string());
            pred.push(names[c].to_string());
            pixels.push(cm.get(r, c));
        }
    }
    let t = Table::new()
        .with("gt", Column::Str(gt))
        .with("pred", Column::Str(pred))
        .with("pixels", Column::U64(pixels));
    let path = out.join(CONFUSION_FILE);
    t.write_parquet(&path)
        .map_err(|e| data_error(e).with_path(path.clone()))
}

fn summary(
    cm: &ConfusionMatrix,
    proto: Protocol,
    iteration: Option<usize>,
    is_final: bool,
    desc: &dag_model::ModelDescription,
    ctx: &StageContext<'_>,
) -> serde_json::Value {
    let (miou16, miou13) = match proto.num_classes() {
        19 => (cm.miou_of(&SIXTEEN_OF_19).ok().flatten(), None),
        16 => (cm.miou(), cm.miou_of(&SYNTHIA_13_OF_16).ok().flatten()),
        _ => (None, None),
    };
    let model = ctx.inputs.get("model").map(|a| a.producer.clone());
    let names = proto.class_names();
    // An array, so that the class order survives JSON readers that sort object keys.
    let per_class: Vec<serde_json::Value> = names
        .iter()
        .zip(cm.iou())
        .map(|(n, v)| json!({ "class": n, "iou": v.map(|v| round2(v * 100.0)) }))
        .collect();
    json!({
        "protocol": proto.name(),
        "classes": proto.num_classes(),
        "miou": cm.miou(),
        "miou16": miou16,
        "miou13": miou13,
        "pixel_accuracy": cm.pixel_accuracy(),
        "per_class_iou": per_class,
        "model": model,
        "method": desc.metadata.get("method"),
        "trained_by": desc.metadata.get("kind"),
        "iteration": iteration,
        "best_is_final": is_final,
        "stage": ctx.stage,
    })
}

/// Writes a model artifact made of `desc` and an existing Burn record file.
fn write_model_copy(
    desc: &dag_model::ModelDescription,
    record: &std::path::Path,
    dir: &std::path::Path,
) -> Result<(), StageError> {
    let json = serde_json::to_value(desc)?;
    write_json(&dir.join(dag_model::CONFIG_FILE), &json)?;
    let to = dir.join(dag_model::WEIGHTS_FILE);
    std::fs::copy(record, &to).map_err(|e| StageError::from(e).with_path(record.to_path_buf()))?;
    Ok(())
}
