//! `synth`: the procedural street-scene benchmark (a mini SYNTHIA and a mini Cityscapes).

use dag_api::{
    InputSpec, OutputSpec, ParamSet, ParamSpec, Params, Stage, StageContext, StageError,
    StageOutcome,
};
use dag_data::SynthConfig;
use serde::Deserialize;

use dag_artifacts::files::data_error;

/// The `synth` stage kind.
pub struct Synth;

/// The params of `synth`. Counts have an upper bound, so that a typo (`2000000000`) is an error
/// at validation instead of a run that writes until the disk is full.
#[derive(ParamSet, Deserialize)]
struct P {
    /// images in the source (SYNTHIA-format) tree
    #[param(default = 200, min = 1, max = 1_000_000)]
    source_images: usize,
    /// images in the target's train split
    #[param(default = 200, min = 1, max = 1_000_000)]
    target_train: usize,
    /// images in the target's val split
    #[param(default = 60, min = 1, max = 1_000_000)]
    target_val: usize,
    /// [width, height] of every generated image
    #[param(default = [320, 160], min = 16, max = 8192)]
    size: [u32; 2],
    /// the scenes' seed; the pipeline's `seed` (and `seeds:`) is for training, so every training
    /// seed sees the same images
    #[param(default = 0)]
    seed: u64,
}

impl Stage for Synth {
    fn kind(&self) -> &'static str {
        "synth"
    }

    fn code(&self) -> dag_api::Code {
        crate::CODE
    }

    fn doc(&self) -> &'static str {
        "Generates procedural street scenes with a real domain shift: `source` is a clean, \
         flat-shaded mini SYNTHIA-RAND-CITYSCAPES, `target` a mini Cityscapes (train, val) with \
         another palette, textures, blur, lighting and camera height, plus per-image fog, \
         darkness, noise and contrast loss whose difficulty in [0, 1] is written to \
         target/difficulty.parquet. Deterministic in `seed` (its own param, not the pipeline's)."
    }

    fn params(&self) -> Vec<ParamSpec> {
        P::param_specs()
    }

    fn inputs(&self) -> Vec<InputSpec> {
        Vec::new()
    }

    fn outputs(&self, _params: &Params) -> Vec<OutputSpec> {
        vec![
            OutputSpec {
                name: "source".into(),
                ty: "dataset_root",
                doc: "a SYNTHIA-RAND-CITYSCAPES tree: RGB/, GT/LABELS/ (use format: synthia)",
            },
            OutputSpec {
                name: "target".into(),
                ty: "dataset_root",
                doc: "a Cityscapes tree: leftImg8bit/, gtFine/ with train and val, and \
                      difficulty.parquet (use format: cityscapes)",
            },
        ]
    }

    fn run(&self, ctx: &StageContext<'_>) -> Result<StageOutcome, StageError> {
        let p: P = ctx.params.parse()?;
        let cfg = SynthConfig {
            source_images: p.source_images,
            target_train: p.target_train,
            target_val: p.target_val,
            width: p.size[0],
            height: p.size[1],
            seed: p.seed,
        };
        let total = (cfg.source_images + cfg.target_train + cfg.target_val) as u64;
        ctx.progress.start("synth", total);
        let report = dag_data::generate(
            &cfg,
            ctx.output("source")?,
            ctx.output("target")?,
            &|done, _| ctx.progress.set_position(done as u64),
            &|| ctx.cancel.is_cancelled(),
        )
        .map_err(data_error)?;
        let mut outcome = StageOutcome::default();
        let m = &mut outcome.metrics;
        m.insert("source_images".into(), report.source_images.into());
        m.insert("target_train".into(), report.target_train.into());
        m.insert("target_val".into(), report.target_val.into());
        m.insert(
            "mean_difficulty".into(),
            serde_json::Number::from_f64(report.mean_difficulty)
                .map_or(serde_json::Value::Null, serde_json::Value::Number),
        );
        Ok(outcome)
    }
}
