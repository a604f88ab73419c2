//! `class_stats`: the pixels of each class in each image of a preprocessed dataset, the
//! statistics of DAFormer's rare class sampling (`sample_class_stats.json` of its
//! `tools/convert_datasets`), as a cached stage of their own.

use dag_api::{
    InputSpec, OutputSpec, ParamSpec, Params, Stage, StageContext, StageError, StageOutcome,
};
use dag_artifacts::class_stats::{column, FILE, TYPE};
use dag_artifacts::files::data_error;
use dag_data::{Column, Dataset, Table};

/// The `class_stats` stage kind.
pub struct ClassStats;

impl Stage for ClassStats {
    fn kind(&self) -> &'static str {
        "class_stats"
    }

    fn code(&self) -> dag_api::Code {
        crate::CODE
    }

    fn doc(&self) -> &'static str {
        "Counts the pixels of each class in each label of a preprocessed dataset and writes \
         class_stats.parquet (path, class, pixels, full_resolution_pixels: exact when the \
         dataset keeps its full-resolution labels, else scaled by the ratio of the areas): the \
         statistics of \
         DAFormer's rare class sampling, which the training kinds read through their \
         `class_stats` input."
    }

    fn params(&self) -> Vec<ParamSpec> {
        Vec::new()
    }

    fn inputs(&self) -> Vec<InputSpec> {
        vec![InputSpec {
            name: "data",
            ty: "dataset",
            required: true,
            doc: "the labelled (source) set, a `preprocess` output",
        }]
    }

    fn outputs(&self, _params: &Params) -> Vec<OutputSpec> {
        vec![OutputSpec {
            name: "class_stats".into(),
            ty: TYPE,
            doc: "class_stats.parquet: one row per image and class present",
        }]
    }

    fn run(&self, ctx: &StageContext<'_>) -> Result<StageOutcome, StageError> {
        let art = ctx.input("data")?;
        let ds = Dataset::open(&art.path).map_err(data_error)?;
        let (w, h) = ds.size();
        let area = f64::from(w) * f64::from(h);
        let (mut paths, mut classes, mut pixels, mut full) = (vec![], vec![], vec![], vec![]);
        ctx.progress.start("count", ds.len() as u64);
        for i in 0..ds.len() {
            let item = ds.get(i).expect("index below len");
            let histogram = |labels: &[u8]| {
                let mut counts = [0u64; 256];
                for &l in labels {
                    counts[usize::from(l)] += 1;
                }
                counts
            };
            let counts = histogram(item.label);
            // Exact with `keep_full_labels`; otherwise the resized label's count scaled by the
            // ratio of the areas.
            let original = ds.full_label(i).map(|l| histogram(l.data));
            let (ow, oh) = ds.original_size(i).unwrap_or((w, h));
            let scale = f64::from(ow) * f64::from(oh) / area;
            for class in 0..256 {
                let n = counts[class];
                let at_full = original.map_or(n as f64 * scale, |o| o[class] as f64);
                if n == 0 && at_full == 0.0 {
                    continue;
                }
                paths.push(item.path.to_string());
                classes.push(class as u32);
                pixels.push(n);
                full.push(at_full);
            }
            ctx.progress.set_position(i as u64 + 1);
        }
        let table = Table::new()
            .with(column::PATH, Column::Str(paths))
            .with(column::CLASS, Column::U32(classes))
            .with(column::PIXELS, Column::U64(pixels))
            .with(column::FULL_RESOLUTION_PIXELS, Column::F64(full));
        let path = ctx.output("class_stats")?.join(FILE);
        table
            .write_parquet(&path)
            .map_err(|e| data_error(e).with_path(path.clone()))?;
        let mut outcome = StageOutcome::default();
        outcome.metrics.insert("images".into(), ds.len().into());
        Ok(outcome)
    }
}
