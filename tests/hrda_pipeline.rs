//! `network: hrda` end to end on a tiny synthetic configuration: a narrow MiT-B0 HRDA trains
//! from scratch on its context and detail views, adapts with MIC (every term fused with its
//! detail crop, the pseudo-label margins set on the whole target image), and is evaluated and
//! scored by sliding windows; HRDA's params are checked before anything runs.

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
  synth:  { kind: synth, params: { seed: 7, source_images: 8, target_train: 8, target_val: 4, size: [256, 128] } }
  source: { kind: preprocess, params: { dataset: synthia, split: all, size: [128, 64] } }
  target: { kind: preprocess, params: { dataset: cityscapes, split: train, size: [128, 64] } }
  val:    { kind: preprocess, params: { dataset: cityscapes, split: val, size: [128, 64], keep_full_labels: true } }
  src_only:
    kind: train_source
    inputs: { source: source }
    params: { network: hrda, encoder: mit_b0, width: 0.125, detail_crop: [32, 32], test_window: [64, 64], test_stride: [32, 32], iters: 3, max_iters: 3, optimizer: adamw, lr: 0.0006, head_lr_mult: 10, weight_decay: 0.01 }
  hrda:
    kind: adapt
    inputs: { source: source, target: target, init: src_only.model }
    params: { method: dacs+mic, mic_block: 8, batch_size: 2, crop: [96, 64], iters: 3, max_iters: 3, optimizer: adamw, lr: 0.0006, head_lr_mult: 10, weight_decay: 0.01, class_mix: per_batch, source_ce_over: all, pl_margins: [4, 12, 4, 4], lambda_fd: 0.005, fd_classes: [6, 7, 10, 11, 12, 13, 14, 15], fd_min_ratio: 0.0 }
  eval_src:  { kind: evaluate, inputs: { model: src_only.model, data: val }, params: { full_resolution: true } }
  eval_hrda: { kind: evaluate, inputs: { model: hrda.model, data: val }, params: { full_resolution: true } }
  entropy:   { kind: score_entropy, inputs: { model: hrda.model, target: target } }
  compare:   { kind: compare, inputs: { source_only: eval_src, hrda: eval_hrda }, params: { order: [source_only, hrda] } }
"#;

#[test]
fn hrda_trains_adapts_and_evaluates() {
    let ws = Ws::new(PIPELINE, &[]);
    let out = ws.dag(&["run", "pipeline.yaml"]);
    assert!(out.status.success(), "{}", text(&out));
    let summary = engine_common::summary(&out);
    for stage in ["src_only", "hrda", "eval_hrda", "entropy", "compare"] {
        assert_eq!(
            summary.get(stage).map(String::as_str),
            Some("ran"),
            "{stage}: {}",
            text(&out)
        );
    }
    let model: serde_json::Value =
        serde_json::from_str(&ws.read("out/tiny/hrda/model/model.json")).unwrap();
    assert_eq!(model["architecture"], "hrda", "{model}");
    assert_eq!(model["config"]["detail_crop"], serde_json::json!([32, 32]));
    assert_eq!(model["config"]["test_stride"], serde_json::json!([32, 32]));
    assert_eq!(model["config"]["attention_embed_dim"], 32, "{model}");
    let losses = &model["metadata"]["final_losses"];
    for term in [
        "seg_main",
        "seg_main_detail",
        "mix",
        "mix_detail",
        "mic",
        "mic_detail",
    ] {
        assert!(
            losses[term].as_f64().is_some_and(f64::is_finite),
            "{term}: {model}"
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let table = stdout.split("compare:").nth(1).expect("a printed table");
    assert!(table.contains("hrda"), "{table}");
}

#[test]
fn hrda_params_are_checked_before_running() {
    for (params, expected) in [
        (
            "network: daformer, detail_crop: [32, 32]",
            "detail_crop do(es) not apply to `network: daformer`",
        ),
        (
            "test_stride: [16, 16]",
            "test_stride do(es) not apply to `network: deeplabv2`",
        ),
        (
            "network: hrda, detail_crop: [30, 16]",
            "detail_crop must be whole multiples of 8",
        ),
        (
            "network: hrda, context_scale: 0.4",
            "context_scale must be 1/k",
        ),
        (
            "network: hrda, detail_crop: [128, 128], crop: [96, 64]",
            "larger than the training images",
        ),
        ("network: hrda, crop: [60, 32]", "multiples of 8"),
        ("network: hrda, lambda_seg_aux: 0.4", "no aux head"),
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

/// Methods that read the student's whole-image target prediction are refused for HRDA when
/// the plan is made.
#[test]
fn hrda_refuses_whole_image_target_methods() {
    let pipeline = r#"
name: bad
device: flex
datasets:
  synthia:    { format: synthia,    root: synth.source, classes: 16 }
  cityscapes: { format: cityscapes, root: synth.target, classes: 16 }
stages:
  synth:  { kind: synth, params: { seed: 7, source_images: 4, target_train: 4, target_val: 2, size: [64, 32] } }
  source: { kind: preprocess, params: { dataset: synthia, split: all, size: [64, 32] } }
  target: { kind: preprocess, params: { dataset: cityscapes, split: train, size: [64, 32] } }
  adapt:  { kind: adapt, inputs: { source: source, target: target }, params: { method: minent, network: hrda, detail_crop: [32, 32], iters: 1, max_iters: 1 } }
"#;
    let ws = Ws::new(pipeline, &[]);
    let out = ws.dag(&["plan", "pipeline.yaml"]);
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(
        all.contains("method `minent`") && all.contains("HRDA"),
        "{all}"
    );
}
