//! `input_normalisation` and `resnet` of a new network travel with it: `model.json` records
//! them, a stage starting from that model (`init`) keeps them and may not set others, and the
//! stages that feed the model images (evaluate, score_entropy) run on it. The network here is
//! DAFormer's kind: mmcv's ResNet-V1c on RGB mean/std inputs.

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
  src_only: { kind: train_source, inputs: { source: source }, params: { iters: 3, max_iters: 3, depth: 14, width: 0.125, lr: 0.01, input_normalisation: imagenet_rgb, resnet: v1c } }
  dacs:
    kind: adapt
    inputs: { source: source, target: target, init: src_only.model }
    params: { method: dacs, iters: 2, max_iters: 2, lr: 0.01, lambda_seg_aux: 0 }
  eval_dacs: { kind: evaluate, inputs: { model: dacs.model, data: val } }
  entropy:   { kind: score_entropy, inputs: { model: dacs.model, target: target } }
"#;

fn config_of(ws: &Ws, stage: &str, field: &str) -> serde_json::Value {
    let model: serde_json::Value =
        serde_json::from_str(&ws.read(&format!("out/tiny/{stage}/model/model.json"))).unwrap();
    model["config"][field].clone()
}

#[test]
fn the_input_normalisation_travels_with_the_model() {
    let ws = Ws::new(PIPELINE, &[]);
    let out = ws.dag(&["run", "pipeline.yaml"]);
    assert!(out.status.success(), "{}", text(&out));
    for stage in ["src_only", "dacs"] {
        assert_eq!(config_of(&ws, stage, "input"), "imagenet_rgb");
        assert_eq!(config_of(&ws, stage, "resnet"), "v1c");
    }

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
