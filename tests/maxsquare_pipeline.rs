//! `method: maxsquare` of `adapt` end to end on a tiny synthetic configuration, with the
//! image-wise weighting and both heads: the stage runs, logs both heads' terms, names its method
//! in `model.json`, and its model is evaluated and compared.

mod engine_common;

use engine_common::{text, Ws};

const PIPELINE: &str = r#"
name: tiny
device: flex
seed: 7
datasets:
  synthia:    { format: synthia,    root: synth.source, classes: 16 }
  cityscapes: { format: cityscapes, root: synth.target, classes: 16 }
stages:
  synth:  { kind: synth, params: { seed: 7, source_images: 8, target_train: 8, target_val: 4, size: [128, 64] } }
  source: { kind: preprocess, params: { dataset: synthia, split: all, size: [64, 32] } }
  target: { kind: preprocess, params: { dataset: cityscapes, split: train, size: [64, 32] } }
  val:    { kind: preprocess, params: { dataset: cityscapes, split: val, size: [64, 32], keep_full_labels: true } }
  src_only: { kind: train_source, inputs: { source: source }, params: { iters: 4, max_iters: 4, depth: 14, width: 0.125, lr: 0.01 } }
  maxsq:
    kind: adapt
    inputs: { source: source, target: target, init: src_only.model }
    params: { method: maxsquare, iters: 3, max_iters: 3, lr: 0.01, lambda_maxsq_aux: 0.02, maxsq_image_weighting: true }
  eval_src:   { kind: evaluate, inputs: { model: src_only.model, data: val } }
  eval_maxsq: { kind: evaluate, inputs: { model: maxsq.model, data: val } }
  compare:  { kind: compare, inputs: { source_only: eval_src, maxsquare: eval_maxsq }, params: { order: [source_only, maxsquare] } }
"#;

#[test]
fn maxsquare_adapts_end_to_end() {
    let ws = Ws::new(PIPELINE, &[]);
    let out = ws.dag(&["run", "pipeline.yaml"]);
    assert!(out.status.success(), "{}", text(&out));
    let summary = engine_common::summary(&out);
    assert_eq!(
        summary.get("maxsq").map(String::as_str),
        Some("ran"),
        "{}",
        text(&out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let table = stdout.split("compare:").nth(1).expect("a printed table");
    assert!(table.contains("maxsquare"), "{table}");

    let model: serde_json::Value =
        serde_json::from_str(&ws.read("out/tiny/maxsq/model/model.json")).unwrap();
    let metadata = &model["metadata"];
    assert_eq!(metadata["method"], "maxsquare", "{model}");
    // Both heads' terms are logged; a (weighted) maximum squares loss is negative.
    for term in ["maxsq_main", "maxsq_aux"] {
        let value = metadata["final_losses"][term].as_f64();
        assert!(value.is_some_and(|v| v < 0.0), "{term}: {model}");
    }
}
