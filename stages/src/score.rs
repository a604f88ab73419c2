//! `score_entropy`: IntraDA's entropy ranking of the target images and their pseudo-labels.

use std::collections::HashMap;

use burn::tensor::activation::softmax;
use burn::tensor::{Tensor, TensorData};
use dag_api::{
    InputSpec, OutputSpec, ParamSet, ParamSpec, Params, Stage, StageContext, StageError,
    StageOutcome,
};
use dag_data::pngio::{write_color_png, write_label_png};
use dag_data::{Column, Dataset, Table};
use dag_metrics::ranking::{
    count_rare_present, normalized_score, rank_and_split, rare_classes, spearman,
};
use dag_model::Segmenter;
use serde::Deserialize;

use dag_artifacts::files::{
    create_parent, data_error, f64_column, read_class_png, read_table, safe_join, str_column,
};
use dag_artifacts::score::{column, COLOR_DIR, DIFFICULTY_FILE, LABELS_DIR, SCORES_FILE};
use dag_artifacts::visuals::{write_index, Visual};

use crate::common::{
    check_classes, check_model_input, device, load_model_input, open_dataset, protocol,
};

/// The `score_entropy` stage kind.
pub struct ScoreEntropy;

/// The params of `score_entropy`.
#[derive(ParamSet, Deserialize)]
struct P {
    /// rank by the rare-class normalised score R * ((11 - k) / 11 + 0.5) instead of the raw
    /// score (both columns are always written)
    #[param(default = false)]
    normalize: bool,
    /// images per forward pass (memory only; results do not depend on it)
    #[param(default = 1, min = 1)]
    batch_size: usize,
    /// also write Cityscapes-coloured pseudo-labels under color/
    #[param(default = true)]
    color: bool,
    /// picture this many of the easiest and of the hardest images in `visuals` (fewer when the
    /// set is small; 0: none)
    #[param(default = 8)]
    gallery: usize,
}

/// Per-image results of one forward pass.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    /// `R(x)`: mean of the weighted self-information over classes and pixels.
    pub score: f64,
    /// Argmax of the main head, `H x W`.
    pub prediction: Vec<u8>,
}

/// Runs `model` on dataset images `indices` (main head upsampled to the dataset size, softmax)
/// and scores each image with [`score_probabilities`].
pub(crate) fn score_batch(
    model: &Segmenter,
    ds: &Dataset,
    indices: &[usize],
    device: &burn::tensor::Device,
) -> Vec<Scored> {
    let batch = ds.batch_as(indices, &dag_train::normalisation(model.input()));
    let [_, _, h, w] = batch.shape;
    let x = Tensor::<4>::from_data(TensorData::new(batch.images, batch.shape), device);
    let main = model.predict_logits(x, [h, w]).main;
    score_probabilities(softmax(main, 1))
}

/// IntraDA's entropy score of each image of softmax probabilities `[N, C, H, W]`: the mean over
/// C x H x W of the weighted self-information `-p log2(p + 1e-30) / log2(C)`, with the argmax map.
pub fn score_probabilities(p: Tensor<4>) -> Vec<Scored> {
    let [n, classes, h, w] = p.dims();
    // log2(p) / log2(C) = ln(p) / ln(C).
    let info = p
        .clone()
        .mul(p.clone().add_scalar(1e-30).log())
        .neg()
        .div_scalar((classes as f64).ln());
    let scores: Vec<f32> = info
        .reshape([n, classes * h * w])
        .mean_dim(1)
        .into_data()
        .try_into_vec_as::<f32>()
        .expect("float scores");
    scores
        .into_iter()
        .zip(dag_model::argmax_classes(p))
        .map(|(s, prediction)| Scored {
            score: f64::from(s),
            prediction,
        })
        .collect()
}

impl Stage for ScoreEntropy {
    fn kind(&self) -> &'static str {
        "score_entropy"
    }

    fn code(&self) -> dag_api::Code {
        crate::CODE
    }

    fn doc(&self) -> &'static str {
        "IntraDA's entropy ranking: runs a model over a preprocessed target set, scores every \
         image by the mean weighted self-information of its main-head prediction (upsampled to \
         the image size), optionally normalised by the number of rare classes present, ranks \
         them (ascending: most confident first) and writes scores.parquet plus an argmax \
         pseudo-label (8-bit trainId PNG and a colour PNG) for every image, plus pictures of \
         the `gallery` easiest and hardest images (image, ground truth, pseudo-label, entropy \
         heat map, overlay) for `dag report`."
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
                doc: "the adapted model (e.g. `adapt`'s output)",
            },
            InputSpec {
                name: "target",
                ty: "dataset",
                required: true,
                doc: "the target training set to rank (a `preprocess` output)",
            },
            InputSpec {
                name: "difficulty",
                ty: "any",
                required: false,
                doc: "a directory with difficulty.parquet (image, difficulty), e.g. \
                      `synth.target`: adds a difficulty column and the Spearman correlation of \
                      score and difficulty",
            },
        ]
    }

    fn outputs(&self, _params: &Params) -> Vec<OutputSpec> {
        vec![
            OutputSpec {
                name: "scores".into(),
                ty: "scores",
                doc: "scores.parquet: image_id, path, score, normalized_score, \
                      rare_classes_present, rank, pixels_<class>...",
            },
            OutputSpec {
                name: "pseudo_labels".into(),
                ty: "pseudo_labels",
                doc: "labels/<path> (8-bit trainIds) and color/<path> for every image",
            },
            OutputSpec {
                name: "visuals".into(),
                ty: "visuals",
                doc: "visuals.json and easiest/, hardest/: per pictured image its input, ground \
                      truth, pseudo-label, per-pixel entropy heat map (0 certain .. 1 uniform) \
                      and the pseudo-label over the image",
            },
        ]
    }

    fn run(&self, ctx: &StageContext<'_>) -> Result<StageOutcome, StageError> {
        let p: P = ctx.params.parse()?;
        let device = device(ctx)?;
        let ds = open_dataset(ctx, "target")?;
        let proto = protocol(&ds)?;
        let (model, desc) = load_model_input(ctx, "model", &device)?;
        check_classes(&desc, proto, "the `target` set")?;
        check_model_input(&model, &ds, "the `target` set")?;
        let rare = rare_classes(proto.num_classes());
        if p.normalize && rare.is_none() {
            return Err(StageError::new(format!(
                "`normalize: true` needs the rare classes of the 19- or 16-class protocol; this \
                 set uses {}",
                proto.name()
            )));
        }
        let (w, h) = ds.size();
        let pseudo = ctx.output("pseudo_labels")?;
        let n = ds.len();
        let classes = proto.num_classes();
        let mut scores = Vec::with_capacity(n);
        let mut rare_present = Vec::with_capacity(n);
        let mut pixels = vec![Vec::with_capacity(n); classes];
        ctx.progress.start("score", n as u64);
        let all: Vec<usize> = (0..n).collect();
        for chunk in all.chunks(p.batch_size) {
            ctx.check_cancelled()?;
            for (&i, s) in chunk.iter().zip(score_batch(&model, &ds, chunk, &device)) {
                if !s.score.is_finite() {
                    return Err(StageError::new(format!(
                        "the entropy score of `{}` is {}",
                        ds.get(i).expect("index").path,
                        s.score
                    ))
                    .with_hint("the model produces non-finite outputs; check its training log"));
                }
                let path = ds.get(i).expect("index").path;
                let label = safe_join(&pseudo.join(LABELS_DIR), path)?;
                create_parent(&label)?;
                write_label_png(&label, w, h, &s.prediction).map_err(data_error)?;
                if p.color {
                    let color = safe_join(&pseudo.join(COLOR_DIR), path)?;
                    create_parent(&color)?;
                    write_color_png(&color, w, h, &s.prediction, proto).map_err(data_error)?;
                }
                let mut counts = vec![0u64; classes];
                for &c in &s.prediction {
                    counts[c as usize] += 1;
                }
                for (col, c) in pixels.iter_mut().zip(counts) {
                    col.push(c);
                }
                rare_present.push(rare.map_or(0, |r| count_rare_present(&s.prediction, r)));
                scores.push(s.score);
            }
            ctx.progress.set_position(scores.len() as u64);
        }

        let normalized: Vec<f64> = scores
            .iter()
            .zip(&rare_present)
            .map(|(&s, &k)| normalized_score(s, k))
            .collect();
        let by = if p.normalize { &normalized } else { &scores };
        let (ranked, _) = rank_and_split(by, 1.0);
        let mut rank = vec![0u32; n];
        for (r, &i) in ranked.iter().enumerate() {
            rank[i] = r as u32;
        }
        let pictured = gallery(ctx, &model, &ds, &ranked, by, p.gallery, &device, proto)?;
        let paths: Vec<String> = (0..n)
            .map(|i| ds.get(i).expect("index").path.to_string())
            .collect();
        let mut table = Table::new()
            .with(
                "image_id",
                Column::U32((0..n).map(|i| ds.get(i).expect("index").image_id).collect()),
            )
            .with("path", Column::Str(paths.clone()))
            .with(column::SCORE, Column::F64(scores.clone()))
            .with(column::NORMALIZED_SCORE, Column::F64(normalized.clone()))
            .with(
                "rare_classes_present",
                Column::U32(rare_present.iter().map(|&k| k as u32).collect()),
            )
            .with("rank", Column::U32(rank));
        let mut outcome = StageOutcome::default();
        if ctx.inputs.contains_key("difficulty") {
            let difficulty = difficulties(ctx, &paths)?;
            if let Some(rho) = spearman(by, &difficulty) {
                outcome
                    .metrics
                    .insert("spearman_difficulty".into(), rho.into());
            }
            table.push("difficulty", Column::F64(difficulty));
        }
        for (name, col) in proto.class_names().iter().zip(pixels) {
            table.push(format!("pixels_{name}"), Column::U64(col));
        }
        let file = ctx.output("scores")?.join(SCORES_FILE);
        table
            .write_parquet(&file)
            .map_err(|e| data_error(e).with_path(file.clone()))?;

        let m = &mut outcome.metrics;
        m.insert("images".into(), n.into());
        m.insert(
            "mean_score".into(),
            (scores.iter().sum::<f64>() / n as f64).into(),
        );
        m.insert("normalize".into(), p.normalize.into());
        m.insert("pictured".into(), pictured.into());
        Ok(outcome)
    }
}

/// Pictures the `count` easiest and hardest images of the ranking (`ranked`: dataset indices,
/// most confident first) in the `visuals` output; returns how many images it pictured.
/// The entropy maps need a second forward pass: keeping every image's map until the ranking
/// is known would cost gigabytes on Cityscapes, rerunning 2 x `count` images costs seconds.
#[allow(clippy::too_many_arguments)]
fn gallery(
    ctx: &StageContext<'_>,
    model: &Segmenter,
    ds: &Dataset,
    ranked: &[usize],
    by: &[f64],
    count: usize,
    device: &burn::tensor::Device,
    proto: dag_data::Protocol,
) -> Result<usize, StageError> {
    let out = ctx.output("visuals")?;
    let n = ranked.len();
    // Each image is pictured once: on a small set the two groups split it.
    let easy = count.min(n.div_ceil(2));
    let hard = count.min(n - easy);
    let groups = [
        ("easiest", ranked[..easy].to_vec()),
        (
            "hardest",
            ranked[n - hard..].iter().rev().copied().collect(),
        ),
    ];
    let pseudo = ctx.output("pseudo_labels")?.join(LABELS_DIR);
    let (w, h) = ds.size();
    let mut visuals = Vec::new();
    for (group, indices) in groups {
        for (k, &i) in indices.iter().enumerate() {
            ctx.check_cancelled()?;
            let item = ds.get(i).expect("index");
            let batch = ds.batch_as(&[i], &dag_train::normalisation(model.input()));
            let x = Tensor::<4>::from_data(TensorData::new(batch.images, batch.shape), device);
            let main = model.predict_logits(x, [h as usize, w as usize]).main;
            let entropy = crate::visuals::pixel_entropy(main).remove(0);
            // The pseudo-label exactly as written, not a recomputation that a different batch
            // size could flip at a tie.
            let (_, _, prediction) = read_class_png(&safe_join(&pseudo, item.path)?)?;
            let pics = crate::visuals::Pictures {
                width: w,
                height: h,
                image: item.image,
                image_size: (w, h),
                truth: Some(item.label),
                prediction: &prediction,
                entropy: &entropy,
            };
            let files =
                crate::visuals::write_pictures(&out.join(group), &format!("{k:02}"), &pics, proto)?;
            visuals.push(Visual {
                group: group.to_string(),
                path: item.path.to_string(),
                rank: Some(ranked.iter().position(|&r| r == i).expect("ranked") as u32),
                score: Some(by[i]),
                files: files
                    .into_iter()
                    .map(|(name, f)| (name, format!("{group}/{f}")))
                    .collect(),
            });
        }
    }
    write_index(out, &visuals)?;
    Ok(visuals.len())
}

/// The generator's difficulty of every path, from the `difficulty` input.
fn difficulties(ctx: &StageContext<'_>, paths: &[String]) -> Result<Vec<f64>, StageError> {
    let dir = &ctx.input("difficulty")?.path;
    let table = read_table(dir, DIFFICULTY_FILE)?;
    let file = dir.join(DIFFICULTY_FILE);
    let images = str_column(&table, "image", &file)?;
    let values = f64_column(&table, "difficulty", &file)?;
    let by_image: HashMap<&str, f64> = images
        .iter()
        .map(String::as_str)
        .zip(values.iter().copied())
        .collect();
    paths
        .iter()
        .map(|p| {
            by_image.get(p.as_str()).copied().ok_or_else(|| {
                StageError::new(format!("{DIFFICULTY_FILE} has no row for `{p}`"))
                    .with_path(file.clone())
                    .with_hint("the `difficulty` input must describe the scored target set")
            })
        })
        .collect()
}
