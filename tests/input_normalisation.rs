//! `input_normalisation` of a new network travels with it: `model.json` records it, a stage
//! starting from that model (`init`) keeps it and may not set another, and the stages that feed
//! the model images (evaluate, score_entropy) run on it.

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
  src_only: { kind: train_source, inputs: { source: source }, params: { iters: 3, max_iters: 3, depth: 14, width: 0.125, lr: 0.01, input_normalisation: imagenet_rgb } }
  dacs:
    kind: adapt
    inputs: { source: source, target: target, init: src_only.model }
    params: { method: dacs, iters: 2, max_iters: 2, lr: 0.01, lambda_seg_aux: 0 }
  eval_dacs: { kind: evaluate, inputs: { model: dacs.model, data: val } }
  entropy:   { kind: score_entropy, inputs: { model: dacs.model, target: target } }
"#;

fn input_of(ws: &Ws, stage: &str) -> serde_json::Value {
    let model: serde_json::Value =
        serde_json::from_str(&ws.read(&format!("out/tiny/{stage}/model/model.json"))).unwrap();
    model["config"]["input"].clone()
}

#[test]
fn the_input_normalisation_travels_with_the_model() {
    let ws = Ws::new(PIPELINE, &[]);
    let out = ws.dag(&["run", "pipeline.yaml"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(input_of(&ws, "src_only"), "imagenet_rgb");
    assert_eq!(input_of(&ws, "dacs"), "imagenet_rgb");

    // A stage from `init` takes the model's convention and may not name one.
    let again = ws.dag(&[
        "run",
        "pipeline.yaml",
        "-S",
        "dacs.input_normalisation=caffe_bgr",
    ]);
    assert!(!again.status.success(), "{}", text(&again));
    assert!(
        text(&again).contains("input_normalisation"),
        "{}",
        text(&again)
    );
}
