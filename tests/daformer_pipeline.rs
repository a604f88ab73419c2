//! `network: daformer` end to end on a tiny synthetic configuration: a narrow MiT-B0 DAFormer
//! trains from scratch, self-trains with DAFormer's switches (AdamW, decoder at 10x, the
//! feature distance), and its model is evaluated at full resolution, scored and compared; the
//! network's params are checked against each other before anything runs.

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
  src_only:
    kind: train_source
    inputs: { source: source }
    params: { network: daformer, encoder: mit_b0, width: 0.125, iters: 4, max_iters: 4, optimizer: adamw, lr: 0.0006, head_lr_mult: 10, weight_decay: 0.01 }
  daformer:
    kind: adapt
    inputs: { source: source, target: target, init: src_only.model }
    params: { method: dacs, batch_size: 2, iters: 3, max_iters: 3, optimizer: adamw, lr: 0.0006, head_lr_mult: 10, weight_decay: 0.01, class_mix: per_batch, source_ce_over: all, lambda_fd: 0.005, fd_classes: [6, 7, 10, 11, 12, 13, 14, 15], fd_min_ratio: 0.0 }
  eval_src:      { kind: evaluate, inputs: { model: src_only.model, data: val }, params: { full_resolution: true } }
  eval_daformer: { kind: evaluate, inputs: { model: daformer.model, data: val }, params: { full_resolution: true } }
  entropy: { kind: score_entropy, inputs: { model: daformer.model, target: target } }
  compare: { kind: compare, inputs: { source_only: eval_src, daformer: eval_daformer }, params: { order: [source_only, daformer] } }
"#;

#[test]
fn daformer_trains_adapts_and_evaluates() {
    let ws = Ws::new(PIPELINE, &[]);
    let out = ws.dag(&["run", "pipeline.yaml"]);
    assert!(out.status.success(), "{}", text(&out));
    let summary = engine_common::summary(&out);
    for stage in [
        "src_only",
        "daformer",
        "eval_daformer",
        "entropy",
        "compare",
    ] {
        assert_eq!(
            summary.get(stage).map(String::as_str),
            Some("ran"),
            "{stage}: {}",
            text(&out)
        );
    }
    let model: serde_json::Value =
        serde_json::from_str(&ws.read("out/tiny/daformer/model/model.json")).unwrap();
    assert_eq!(model["architecture"], "daformer", "{model}");
    assert_eq!(
        model["config"]["encoder"]["embed_dims"],
        serde_json::json!([4, 8, 20, 32]),
        "{model}"
    );
    let losses = &model["metadata"]["final_losses"];
    for term in ["seg_main", "mix"] {
        assert!(
            losses[term].as_f64().is_some_and(f64::is_finite),
            "{term}: {model}"
        );
    }
    // No aux head: the default `lambda_seg_aux` adds no term.
    assert!(losses.get("seg_aux").is_none(), "{model}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let table = stdout.split("compare:").nth(1).expect("a printed table");
    assert!(table.contains("daformer"), "{table}");
}

#[test]
fn daformer_params_are_checked_before_running() {
    for (params, expected) in [
        (
            "network: daformer, depth: 50",
            "depth do(es) not apply to `network: daformer`",
        ),
        (
            "encoder: mit_b2",
            "encoder do(es) not apply to `network: deeplabv2`",
        ),
        ("network: daformer, lambda_seg_aux: 0.4", "no aux head"),
        ("network: daformer, encoder: mit_b7", "mit_b7"),
    ] {
        let pipeline = format!(
            r#"
name: bad
device: flex
datasets:
  synthia: {{ format: synthia, root: synth.source, classes: 16 }}
stages:
  synth:  {{ kind: synth, params: {{ seed: 7, source_images: 4, target_train: 4, target_val: 2, size: [64, 32] }} }}
  source: {{ kind: preprocess, params: {{ dataset: synthia, split: all, size: [64, 32] }} }}
  src:    {{ kind: train_source, inputs: {{ source: source }}, params: {{ iters: 1, max_iters: 1, {params} }} }}
"#
        );
        let ws = Ws::new(&pipeline, &[]);
        let out = ws.dag(&["plan", "pipeline.yaml"]);
        let all = text(&out);
        assert!(!out.status.success(), "{params}: {all}");
        assert!(
            all.contains(expected),
            "{params}: expected `{expected}` in {all}"
        );
    }
}

/// A DAFormer that arrives through `init` has no aux head either: an aux weight set for it is
/// refused when the stage starts, naming the param.
#[test]
fn aux_weights_for_an_init_daformer_are_refused() {
    let pipeline = PIPELINE.replace(
        "params: { method: dacs, batch_size: 2,",
        "params: { method: dacs, lambda_seg_aux: 0.5, batch_size: 2,",
    );
    assert_ne!(pipeline, PIPELINE);
    let ws = Ws::new(&pipeline, &[]);
    let out = ws.dag(&["run", "pipeline.yaml"]);
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(
        all.contains("`daformer` network has no aux head") && all.contains("lambda_seg_aux"),
        "{all}"
    );
}
