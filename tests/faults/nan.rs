//! A diverging learning rate: the stage stops naming the iteration and the loss term, and the
//! checkpoint written before the divergence stays intact and resumable.

use std::time::Duration;

use crate::common::*;

#[test]
fn divergence_names_iteration_and_term_and_keeps_the_checkpoint() {
    let ws = Ws::new(TINY, &[]);
    let limit = Duration::from_secs(240);
    let args = [
        "run",
        "pipeline.yaml",
        "--until",
        "src_only",
        "-S",
        "src_only.lr=1e6",
        "-v",
    ];
    let out = output_within(ws.cmd(&args), limit);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        err.contains("stage `src_only` failed: loss term `"),
        "{err}"
    );
    let at = err
        .split(" at iteration ")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no iteration in: {err}"));
    assert!(
        err.contains("hint: the last good checkpoint is kept"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    // The checkpoint before the divergence.
    let scratch = ws.path("cache/scratch");
    let key_dir = std::fs::read_dir(&scratch)
        .unwrap()
        .next()
        .expect("a scratch dir")
        .unwrap()
        .path();
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(key_dir.join("checkpoints/checkpoint/state.json")).expect("a checkpoint"),
    )
    .unwrap();
    let saved = state["next_iteration"].as_u64().unwrap();
    assert!(
        saved > 0 && saved <= at,
        "checkpoint at {saved}, divergence at {at}"
    );
    // Usable: the rerun resumes from it (no damage warning) and diverges at the same iteration.
    let out = output_within(ws.cmd(&args), limit);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err2 = String::from_utf8_lossy(&out.stderr);
    assert!(err2.contains("resuming training"), "{err2}");
    assert!(err2.contains(&format!("iteration={saved}")), "{err2}");
    assert!(!err2.contains("damaged checkpoint"), "{err2}");
    assert!(err2.contains(&format!(" at iteration {at}")), "{err2}");
    assert_eq!(ws.manifests(), 2, "only synth and source are published");
    figure(
        "nan_divergence",
        &format!("iteration {at}, checkpoint {saved}"),
    );
}
