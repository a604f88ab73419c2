//! The `synth` and `preprocess` stage kinds, run directly through the `Stage` trait.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dag_api::{
    CancelToken, DatasetRef, Map, NoProgress, Params, Preflight, Registry, Stage, StageContext,
    StageError, StageOutcome, Value,
};
use dag_data::Dataset;
use serde_json::json;

/// The params the engine would pass: the given ones plus every default.
fn params(stage: &dyn Stage, given: Value) -> Params {
    let mut out = BTreeMap::new();
    for spec in stage.params() {
        if let Some(v) = given.get(spec.name) {
            out.insert(spec.name.to_string(), v.clone());
        } else if let Some(d) = spec.default {
            out.insert(spec.name.to_string(), d);
        }
    }
    Params(out)
}

struct Run<'a> {
    stage: &'a dyn Stage,
    params: Params,
    datasets: BTreeMap<String, DatasetRef>,
    dir: &'a Path,
    cancel: CancelToken,
}

impl Run<'_> {
    fn go(&self, name: &str) -> (Result<StageOutcome, StageError>, BTreeMap<String, PathBuf>) {
        assert!(self.stage.check(&self.params).is_ok());
        let outputs: BTreeMap<String, PathBuf> = self
            .stage
            .outputs(&self.params)
            .into_iter()
            .map(|o| {
                let p = self.dir.join(name).join(&o.name);
                std::fs::create_dir_all(&p).unwrap();
                (o.name, p)
            })
            .collect();
        let scratch = self.dir.join(name).join("scratch");
        std::fs::create_dir_all(&scratch).unwrap();
        let inputs = BTreeMap::new();
        let ctx = StageContext {
            stage: name,
            pipeline: "test",
            params: &self.params,
            inputs: &inputs,
            datasets: &self.datasets,
            outputs: &outputs,
            scratch: &scratch,
            device: dag_api::DeviceKind::Flex,
            seed: 1234,
            workdir: self.dir,
            progress: &NoProgress,
            cancel: &self.cancel,
        };
        (self.stage.run(&ctx), outputs)
    }
}

fn dataset(name: &str, format: &str, root: PathBuf, classes: u32) -> (String, DatasetRef) {
    (
        name.to_string(),
        DatasetRef {
            name: name.into(),
            format: format.into(),
            root,
            classes,
            extra: Map::new(),
        },
    )
}

#[test]
fn both_kinds_are_registered() {
    let mut r = Registry::new();
    dag_data_stages::register_all(&mut r);
    assert!(r.get("synth").is_some() && r.get("preprocess").is_some());
}

#[test]
fn synth_then_preprocess_source_and_target() {
    let dir = tempfile::tempdir().unwrap();
    let mut reg = Registry::new();
    dag_data_stages::register_all(&mut reg);
    let synth = reg.get("synth").unwrap().as_ref();
    let prep = reg.get("preprocess").unwrap().as_ref();

    let run = Run {
        stage: synth,
        params: params(
            synth,
            json!({"source_images": 4, "target_train": 5, "target_val": 2, "size": [64, 32]}),
        ),
        datasets: BTreeMap::new(),
        dir: dir.path(),
        cancel: CancelToken::new(),
    };
    let (outcome, outs) = run.go("synth");
    let outcome = outcome.unwrap();
    assert_eq!(outcome.metrics["target_train"], 5);
    assert!(outs["target"].join("difficulty.parquet").is_file());

    let datasets: BTreeMap<String, DatasetRef> = [
        dataset("synthia", "synthia", outs["source"].clone(), 16),
        dataset("cityscapes", "cityscapes", outs["target"].clone(), 16),
    ]
    .into_iter()
    .collect();
    let src = Run {
        stage: prep,
        params: params(prep, json!({"dataset": "synthia", "size": [32, 16]})),
        datasets: datasets.clone(),
        dir: dir.path(),
        cancel: CancelToken::new(),
    };
    let (outcome, outs_src) = src.go("source");
    assert_eq!(outcome.unwrap().metrics["images"], 4);
    let ds = Dataset::open(&outs_src["dataset"]).unwrap();
    assert_eq!((ds.len(), ds.size(), ds.classes()), (4, (32, 16), 16));

    // A list file relative to the pipeline's directory selects val images.
    std::fs::write(
        dir.path().join("val.txt"),
        "dunmore/dunmore_000000_000001_leftImg8bit.png\n",
    )
    .unwrap();
    let val = Run {
        stage: prep,
        params: params(
            prep,
            json!({"dataset": "cityscapes", "split": "val", "size": [32, 16],
                   "keep_full_labels": true, "list": "val.txt"}),
        ),
        datasets,
        dir: dir.path(),
        cancel: CancelToken::new(),
    };
    let (outcome, outs_val) = val.go("val");
    assert_eq!(outcome.unwrap().metrics["images"], 1);
    let ds = Dataset::open(&outs_val["dataset"]).unwrap();
    assert_eq!(ds.full_label(0).unwrap().width, 64);
}

#[test]
fn errors_name_the_folder_and_cancellation_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let prep = dag_data_stages::preprocess::Preprocess;
    let missing = dir.path().join("data/cityscapes");
    let datasets: BTreeMap<String, DatasetRef> = [dataset("cs", "cityscapes", missing.clone(), 19)]
        .into_iter()
        .collect();
    let p = params(&prep, json!({"dataset": "cs", "split": "train"}));
    let pre = Preflight {
        stage: "target",
        params: &p,
        datasets: &datasets,
        workdir: dir.path(),
    };
    let err = prep.preflight(&pre).unwrap_err();
    assert!(err.message.contains("leftImg8bit/<split>"), "{err:?}");
    assert_eq!(err.path.as_deref(), Some(missing.as_path()));
    assert!(err.hint.is_some());

    let synth = dag_data_stages::synth::Synth;
    let run = Run {
        stage: &synth,
        params: params(&synth, json!({"size": [32, 16]})),
        datasets: BTreeMap::new(),
        dir: dir.path(),
        cancel: CancelToken::new(),
    };
    run.cancel.cancel();
    let err = run.go("synth").0.unwrap_err();
    assert!(err.cancelled, "{err:?}");
}
