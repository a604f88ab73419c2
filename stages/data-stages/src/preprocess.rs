//! `preprocess`: a dataset in its on-disk format -> a `dataset` artifact of memory-mapped shards.

use dag_api::{
    InputSpec, OutputSpec, ParamSet, ParamSpec, Params, Preflight, Stage, StageContext, StageError,
    StageOutcome,
};
use dag_artifacts::files::data_error;
use dag_data::{Format, PreprocessConfig, Protocol};
use serde::Deserialize;

/// The `preprocess` stage kind.
pub struct Preprocess;

/// The params of `preprocess`.
#[derive(ParamSet, Deserialize)]
struct P {
    /// the entry of `datasets:` to read (its format, root and classes)
    #[param(dataset)]
    dataset: String,
    /// Cityscapes split folder (train, val, test); GTA5 and SYNTHIA take `all`
    #[param(default = "all")]
    split: String,
    /// output [width, height] of every image and label
    // Bounded so that a typo is refused at validation rather than failing to allocate the
    // resize buffers (which aborts the process).
    #[param(default = [1024, 512], min = 1, max = 16384)]
    size: [u32; 2],
    /// a file of image ids, one per line (IntraDA's split format), selecting a subset
    #[param(path)]
    list: Option<String>,
    /// also keep labels at their original size, for evaluation at label resolution
    #[param(default = false)]
    keep_full_labels: bool,
    /// skip unreadable or unpaired samples (counted in the metrics and meta.json) instead of
    /// failing
    #[param(default = false)]
    allow_skip: bool,
    /// samples per shard file
    #[param(default = 256, min = 1)]
    shard_images: usize,
}

impl Stage for Preprocess {
    fn kind(&self) -> &'static str {
        "preprocess"
    }

    fn code(&self) -> dag_api::Code {
        crate::CODE
    }

    fn doc(&self) -> &'static str {
        "Decodes a dataset (cityscapes, gta5 or synthia layout), resizes images (bicubic) and \
         labels (nearest) to `size`, maps labels to the dataset's 19/16/13-class protocol \
         (unknown ids -> 255) and writes memory-mapped u8 shards with index.parquet, \
         class_pixels.parquet and meta.json."
    }

    fn params(&self) -> Vec<ParamSpec> {
        P::param_specs()
    }

    fn inputs(&self) -> Vec<InputSpec> {
        Vec::new()
    }

    fn outputs(&self, _params: &Params) -> Vec<OutputSpec> {
        vec![OutputSpec {
            name: "dataset".into(),
            ty: "dataset",
            doc: "shards/, index.parquet, class_pixels.parquet, meta.json",
        }]
    }

    fn check(&self, params: &Params) -> Result<(), String> {
        let p: P = params.parse().map_err(|e| e.message)?;
        let [w, h] = p.size;
        if w > 16384 || h > 16384 {
            return Err(format!(
                "size [{w}, {h}] is larger than 16384 pixels on a side"
            ));
        }
        Ok(())
    }

    fn preflight(&self, pre: &Preflight<'_>) -> Result<(), StageError> {
        let p: P = pre.params.parse()?;
        // Datasets rooted in a stage output are absent here; they are checked when run.
        if let Some(ds) = pre.datasets.get(&p.dataset) {
            let format: Format = ds.format.parse().map_err(data_error)?;
            Protocol::from_classes(ds.classes).map_err(data_error)?;
            format.check_root(&ds.root, &p.split).map_err(data_error)?;
        }
        if let Some(list) = &p.list {
            let path = pre.workdir.join(list);
            if !path.is_file() {
                return Err(StageError::new(format!(
                    "list file {} does not exist",
                    path.display()
                ))
                .with_path(path)
                .with_hint("fix `list:` (relative to the pipeline file)"));
            }
        }
        Ok(())
    }

    fn run(&self, ctx: &StageContext<'_>) -> Result<StageOutcome, StageError> {
        let p: P = ctx.params.parse()?;
        let ds = ctx.dataset("dataset")?;
        let cfg = PreprocessConfig {
            format: ds.format.parse().map_err(data_error)?,
            root: ds.root.clone(),
            split: p.split,
            list: p.list.map(|l| ctx.path(l)),
            protocol: Protocol::from_classes(ds.classes).map_err(data_error)?,
            width: p.size[0],
            height: p.size[1],
            keep_full_labels: p.keep_full_labels,
            allow_skip: p.allow_skip,
            shard_images: p.shard_images,
        };
        let out = ctx.output("dataset")?;
        let started = std::time::Instant::now();
        let report = dag_data::preprocess(
            &cfg,
            out,
            &|done, total| {
                if done == 0 {
                    ctx.progress.start("preprocess", total as u64);
                } else {
                    ctx.progress.set_position(done as u64);
                }
            },
            &|| ctx.cancel.is_cancelled(),
        )
        .map_err(data_error)?;
        let seconds = started.elapsed().as_secs_f64();
        for s in &report.skipped {
            tracing::warn!(stage = ctx.stage, file = %s.file, "skipped: {}", s.reason);
        }
        let mut outcome = StageOutcome::default();
        let m = &mut outcome.metrics;
        m.insert("images".into(), report.images.into());
        m.insert("skipped".into(), report.skipped.len().into());
        m.insert("shards".into(), report.shards.into());
        m.insert(
            "images_per_s".into(),
            (report.images as f64 / seconds.max(1e-9)).into(),
        );
        Ok(outcome)
    }
}
