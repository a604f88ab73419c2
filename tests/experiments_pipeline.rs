//! Experiments on the tiny IntraDA pipeline: three seeds times two lambdas run every shared stage
//! once and every swept instance once; a fourth seed runs only its own instances; `-S` sweeps a
//! param from the command line; the compare stage's means and standard deviations over the seeds
//! equal NumPy's (tests/experiments_reference.py).

mod engine_common;

use std::collections::BTreeSet;
use std::process::Command;

use engine_common::{text, Ws};

const PIPELINE: &str = r#"
name: tiny
device: flex
seeds: [1, 2, 3]
datasets:
  synthia:    { format: synthia,    root: synth.source, classes: 16 }
  cityscapes: { format: cityscapes, root: synth.target, classes: 16 }
stages:
  synth:  { kind: synth, params: { seed: 7, source_images: 12, target_train: 12, target_val: 5, size: [128, 64] } }
  source: { kind: preprocess, params: { dataset: synthia, split: all, size: [64, 32] } }
  target: { kind: preprocess, params: { dataset: cityscapes, split: train, size: [64, 32] } }
  val:    { kind: preprocess, params: { dataset: cityscapes, split: val, size: [64, 32], keep_full_labels: true } }
  src_only: { kind: train_source, inputs: { source: source }, params: { iters: 4, max_iters: 4, depth: 14, width: 0.125, lr: 0.01 } }
  advent:   { kind: adapt, inputs: { source: source, target: target, init: src_only.model }, params: { iters: 2, max_iters: 2, lr: 0.01, disc_ndf: 8 } }
  entropy:  { kind: score_entropy, inputs: { model: advent.model, target: target } }
  split:    { kind: split, inputs: { scores: entropy.scores }, matrix: { lambda: [0.5, 0.67] } }
  intrada:  { kind: self_train, inputs: { target: target, easy: split.easy, hard: split.hard, pseudo: entropy.pseudo_labels, init: advent.model }, params: { iters: 2, max_iters: 2, lr: 0.01, disc_ndf: 8 } }
  eval_src:     { kind: evaluate, inputs: { model: src_only.model, data: val } }
  eval_advent:  { kind: evaluate, inputs: { model: advent.model, data: val } }
  eval_intrada: { kind: evaluate, inputs: { model: intrada.model, data: val } }
  compare:  { kind: compare, inputs: { source_only: eval_src, advent: eval_advent, intrada: eval_intrada }, params: { order: [source_only, advent, intrada] } }
"#;

const SHARED: [&str; 5] = ["synth", "source", "target", "val", "compare"];
const PER_SEED: [&str; 5] = ["src_only", "advent", "entropy", "eval_src", "eval_advent"];
const PER_SEED_AND_LAMBDA: [&str; 3] = ["split", "intrada", "eval_intrada"];

/// The instances a run over `seeds` has, besides the shared stages.
fn instances(seeds: &[u64]) -> BTreeSet<String> {
    let mut all = BTreeSet::new();
    for s in seeds {
        for st in PER_SEED {
            all.insert(format!("{st}@seed={s}"));
        }
        for lambda in ["0.5", "0.67"] {
            for st in PER_SEED_AND_LAMBDA {
                all.insert(format!("{st}@seed={s},lambda={lambda}"));
            }
        }
    }
    all
}

fn with_status(out: &std::process::Output, status: &str) -> BTreeSet<String> {
    engine_common::summary(out)
        .into_iter()
        .filter(|(_, s)| s == status)
        .map(|(n, _)| n)
        .collect()
}

#[test]
fn seeds_and_a_lambda_sweep_share_what_they_can() {
    let ws = Ws::new(PIPELINE, &[]);

    // 1. 3 seeds x 2 lambdas: each shared stage and each instance runs once.
    let out = ws.dag(&["run", "pipeline.yaml"]);
    assert!(out.status.success(), "{}", text(&out));
    let mut want: BTreeSet<String> = SHARED.iter().map(|s| s.to_string()).collect();
    want.extend(instances(&[1, 2, 3]));
    assert_eq!(want.len(), 5 + 3 * 5 + 3 * 2 * 3);
    let summary = engine_common::summary(&out);
    assert_eq!(summary.len(), want.len(), "{}", text(&out));
    assert_eq!(with_status(&out, "ran"), want, "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let table = stdout.split("compare:").nth(1).expect("a printed table");
    for row in ["advent@seed=2", "intrada@lambda=0.5", "±"] {
        assert!(table.contains(row), "no `{row}` in:\n{table}");
    }
    // lambda reaches the split: int(12 * 0.5) = 6 easy images.
    let easy = ws.read("out/tiny/split@seed=1,lambda=0.5/easy/easy_split.txt");
    assert_eq!(easy.lines().count(), 6);

    // 2. The means and standard deviations over the seeds, against NumPy.
    let python = std::env::var("DAG_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = engine_common::manifest_dir().join("tests/experiments_reference.py");
    let parquet = ws.path("out/tiny/compare/comparison/comparison.parquet");
    let check = Command::new(&python)
        .arg(script)
        .arg(&parquet)
        .arg("3")
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{python}` (set DAG_TEST_PYTHON): {e}"));
    assert!(check.status.success(), "{}", text(&check));

    // The report draws one bar per method and setting: the mean, an error bar of one standard
    // deviation, and a point per seed.
    let out = ws.dag(&["report", "pipeline.yaml", "-o", "report"]);
    assert!(out.status.success(), "{}", text(&out));
    let chart = ws.read("report/charts/miou_over_seeds.svg");
    assert_eq!(
        chart.matches("<rect x=").count(),
        4 + 4,
        "4 bars and 4 legend keys"
    );
    assert_eq!(chart.matches("<circle").count(), 4 * 3, "{chart}");
    assert_eq!(chart.matches("stroke=\"#222\"").count(), 4, "{chart}");

    // 3. A fourth seed runs that seed's instances and the comparison, nothing else.
    let out = ws.dag(&["run", "pipeline.yaml", "-S", "seeds=[1,2,3,4]"]);
    assert!(out.status.success(), "{}", text(&out));
    let mut new: BTreeSet<String> = instances(&[4]);
    new.insert("compare".into());
    assert_eq!(with_status(&out, "ran"), new, "{}", text(&out));
    let check = Command::new(&python)
        .arg(engine_common::manifest_dir().join("tests/experiments_reference.py"))
        .arg(&parquet)
        .arg("4")
        .output()
        .expect("python");
    assert!(check.status.success(), "{}", text(&check));

    // 4. `-S` sweeps a param from the command line; a stage name selects all its instances.
    let out = ws.dag(&[
        "plan",
        "pipeline.yaml",
        "-S",
        "split.lambda=[0.4,0.6]",
        "--only",
        "split",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let planned: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.contains("skipped"))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| name.contains('@'))
        .map(str::to_string)
        .collect();
    let want: BTreeSet<String> = [1, 2, 3]
        .iter()
        .flat_map(|s| ["0.4", "0.6"].map(|l| format!("split@seed={s},lambda={l}")))
        .collect();
    assert_eq!(planned, want, "{}", text(&out));
}

#[test]
fn sweep_errors_name_the_problem() {
    for (edit, message) in [
        (("seeds: [1, 2, 3]", "seeds: []"), "`seeds` is empty"),
        (
            ("seeds: [1, 2, 3]", "seeds: [1, 1]"),
            "seed 1 is listed twice",
        ),
        (
            (
                "matrix: { lambda: [0.5, 0.67] }",
                "matrix: { lamda: [0.5] }",
            ),
            "not a param of kind `split`",
        ),
        (
            ("matrix: { lambda: [0.5, 0.67] }", "matrix: { lambda: 0.5 }"),
            "must be a list",
        ),
        (
            (
                "matrix: { lambda: [0.5, 0.67] }",
                "matrix: { lambda: [0.5, 2.0] }",
            ),
            "lambda",
        ),
        (
            (
                "matrix: { lambda: [0.5, 0.67] }",
                "params: { lambda: 0.5 }, matrix: { lambda: [0.5, 0.67] }",
            ),
            "both set under `params` and swept",
        ),
        (
            (
                "params: { seed: 7, source_images: 12, target_train: 12, target_val: 5,",
                "matrix: { target_val: [4, 5] }, params: { seed: 7, source_images: 12, target_train: 12,",
            ),
            "is swept",
        ),
    ] {
        let ws = Ws::new(PIPELINE, &[]);
        ws.edit(edit.0, edit.1);
        let out = ws.dag(&["plan", "pipeline.yaml"]);
        assert!(!out.status.success(), "{edit:?} was accepted");
        assert!(text(&out).contains(message), "{edit:?}: {}", text(&out));
    }
}
