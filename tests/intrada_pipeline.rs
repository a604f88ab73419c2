//! The IntraDA pipeline end to end on a tiny synthetic configuration: every stage kind runs,
//! the comparison table is printed, a second run is fully cached, changing `split.lambda`
//! reruns only the split and what depends on it, and the tables are read by pyarrow/DuckDB
//! with evaluate's mIoU recomputed in NumPy (tests/intrada_reference.py).

mod engine_common;

use std::collections::BTreeSet;
use std::process::Command;

use engine_common::{text, Ws};

const PIPELINE: &str = r#"
name: tiny
device: flex
seed: 7
datasets:
  synthia:    { format: synthia,    root: synth.source, classes: 16 }
  cityscapes: { format: cityscapes, root: synth.target, classes: 16 }
stages:
  synth:  { kind: synth, params: { seed: 7, source_images: 12, target_train: 12, target_val: 5, size: [128, 64] } }
  source: { kind: preprocess, params: { dataset: synthia, split: all, size: [64, 32] } }
  target: { kind: preprocess, params: { dataset: cityscapes, split: train, size: [64, 32] } }
  val:    { kind: preprocess, params: { dataset: cityscapes, split: val, size: [64, 32], keep_full_labels: true } }
  src_only: { kind: train_source, inputs: { source: source }, params: { iters: 6, max_iters: 6, depth: 14, width: 0.125, lr: 0.01, checkpoint_every: 2 } }
  advent:   { kind: adapt, inputs: { source: source, target: target, init: src_only.model }, params: { iters: 4, max_iters: 4, lr: 0.01, disc_ndf: 8, snapshot_every: 2 } }
  entropy:  { kind: score_entropy, inputs: { model: advent.model, target: target, difficulty: synth.target } }
  split:    { kind: split, inputs: { scores: entropy.scores }, params: { lambda: 0.67 } }
  intrada:  { kind: self_train, inputs: { target: target, easy: split.easy, hard: split.hard, pseudo: entropy.pseudo_labels, init: advent.model }, params: { iters: 4, max_iters: 4, lr: 0.01, disc_ndf: 8 } }
  eval_src:     { kind: evaluate, inputs: { model: src_only.model, data: val } }
  eval_advent:  { kind: evaluate, inputs: { model: advent.model, data: val }, params: { snapshots: all } }
  eval_intrada: { kind: evaluate, inputs: { model: intrada.model, data: val }, params: { save_predictions: true } }
  compare:  { kind: compare, inputs: { source_only: eval_src, advent: eval_advent, intrada: eval_intrada }, params: { order: [source_only, advent, intrada] } }
"#;

fn set(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn lines(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn intrada_end_to_end_and_lambda_change_reruns_only_the_split_side() {
    let ws = Ws::new(PIPELINE, &[]);
    let all = [
        "synth",
        "source",
        "target",
        "val",
        "src_only",
        "advent",
        "entropy",
        "split",
        "intrada",
        "eval_src",
        "eval_advent",
        "eval_intrada",
        "compare",
    ];

    // 1. Everything runs, and the run ends with the comparison table.
    let out = ws.dag(&["run", "pipeline.yaml"]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let ran: BTreeSet<String> = engine_common::summary(&out)
        .into_iter()
        .filter(|(_, s)| s == "ran")
        .map(|(n, _)| n)
        .collect();
    assert_eq!(ran, set(&all), "{}", text(&out));
    let table = stdout.split("compare:").nth(1).expect("a printed table");
    for row in ["source_only", "advent", "intrada", "mIoU"] {
        assert!(table.contains(row), "no `{row}` in:\n{table}");
    }

    // The split is int(N * lambda) = int(12 * 0.67) = 8 easy images, in ascending score order.
    let split_dir = ws.path("out/tiny/split");
    let easy = lines(&split_dir.join("easy/easy_split.txt"));
    let hard = lines(&split_dir.join("hard/hard_split.txt"));
    assert_eq!((easy.len(), hard.len()), (8, 4));
    assert!(easy[0].ends_with("_leftImg8bit.png"), "{easy:?}");

    // A snapshot evaluation covers the kept snapshot and the final model.
    assert!(ws
        .path("out/tiny/eval_advent/evaluation/snapshots.parquet")
        .is_file());

    // 2. A second run is all cached and still prints the table.
    let out = ws.dag(&["run", "pipeline.yaml"]);
    assert!(out.status.success(), "{}", text(&out));
    let cached = engine_common::summary(&out)
        .into_iter()
        .filter(|(_, s)| s == "cached")
        .count();
    assert_eq!(cached, all.len(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("compare:"));

    // 3. External readers and an independent mIoU, before the lambda change replaces outputs.
    let python = std::env::var("DAG_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = engine_common::manifest_dir().join("tests/intrada_reference.py");
    let target_root = ws.path("out/tiny/synth/target");
    let check = Command::new(&python)
        .arg(script)
        .arg(ws.path("out/tiny"))
        .arg(&target_root)
        .args(["12", "5"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{python}` (set DAG_TEST_PYTHON): {e}"));
    assert!(check.status.success(), "{}", text(&check));

    // The README's DuckDB / pandas / polars commands, pointed at this pipeline's outputs.
    let readme = std::fs::read_to_string(engine_common::manifest_dir().join("README.md"))
        .expect("README.md");
    let block = readme
        .split("<!-- readme-test:begin -->")
        .nth(1)
        .and_then(|b| b.split("<!-- readme-test:end -->").next())
        .expect("README has a readme-test block");
    let commands: Vec<&str> = block
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(commands.len(), 3, "{commands:?}");
    for cmd in commands {
        let cmd = cmd
            .strip_prefix("python ")
            .unwrap_or_else(|| panic!("README command does not start with `python`: {cmd}"))
            .replace("out/quickstart/", "out/tiny/");
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("\"$PY\" {cmd}"))
            .env("PY", &python)
            .current_dir(ws.path("."))
            .output()
            .expect("sh");
        assert!(
            out.status.success(),
            "README command failed: {cmd}\n{}",
            text(&out)
        );
    }

    // 4. Changing lambda reruns the split and its dependents, nothing upstream.
    ws.edit("lambda: 0.67", "lambda: 0.5");
    let out = ws.dag(&["run", "pipeline.yaml"]);
    assert!(out.status.success(), "{}", text(&out));
    let ran: BTreeSet<String> = engine_common::summary(&out)
        .into_iter()
        .filter(|(_, s)| s == "ran")
        .map(|(n, _)| n)
        .collect();
    let downstream = set(&["split", "intrada", "eval_intrada", "compare"]);
    assert!(
        ran.is_subset(&downstream),
        "stages outside split's descendants reran: {ran:?}\n{}",
        text(&out)
    );
    for must in ["split", "intrada", "eval_intrada"] {
        assert!(ran.contains(must), "`{must}` did not rerun: {ran:?}");
    }
    let easy = lines(&split_dir.join("easy/easy_split.txt"));
    assert_eq!(easy.len(), 6, "int(12 * 0.5)");
}
