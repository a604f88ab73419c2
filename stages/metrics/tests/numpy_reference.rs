//! dag-metrics against an independent NumPy implementation of ADVENT's evaluation
//! (`tests/miou_reference.py`). The interpreter comes from `DAG_TEST_PYTHON` (set by
//! `scripts/test.sh`), else `python3`; it must have NumPy.

use std::process::Command;

use dag_metrics::ConfusionMatrix;

/// A small deterministic generator so the test needs no RNG crate.
fn lcg(state: &mut u64) -> u32 {
    *state = state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (*state >> 33) as u32
}

#[test]
fn miou_matches_numpy_reference() {
    let classes = 19usize;
    let mut state = 42u64;
    let pixels = 200_000;
    let mut gt = Vec::with_capacity(pixels);
    let mut pred = Vec::with_capacity(pixels);
    for _ in 0..pixels {
        // ~10% ignore label, classes 17/18 never in gt (undefined or zero IoU), a biased
        // predictor that is right about 60% of the time.
        let g = match lcg(&mut state) % 100 {
            0..=9 => 255u8,
            r => (r % 17) as u8,
        };
        let p = if g != 255 && lcg(&mut state) % 10 < 6 {
            g
        } else {
            (lcg(&mut state) % 18) as u8
        };
        gt.push(g);
        pred.push(p);
    }

    let mut cm = ConfusionMatrix::new(classes);
    // Two halves merged, as the evaluate stage accumulates image by image.
    let half = pixels / 2;
    cm.add(&gt[..half], &pred[..half]).unwrap();
    let mut rest = ConfusionMatrix::new(classes);
    rest.add(&gt[half..], &pred[half..]).unwrap();
    cm.merge(&rest).unwrap();

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("gt.bin"), &gt).unwrap();
    std::fs::write(dir.path().join("pred.bin"), &pred).unwrap();
    let python = std::env::var("DAG_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = std::path::PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo test sets CARGO_MANIFEST_DIR"),
    )
    .join("tests/miou_reference.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg(dir.path().join("gt.bin"))
        .arg(dir.path().join("pred.bin"))
        .arg(classes.to_string())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{python}` (set DAG_TEST_PYTHON): {e}"));
    assert!(
        out.status.success(),
        "the NumPy reference failed (does `{python}` have numpy? scripts/test.sh sets one up): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reference: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();

    for r in 0..classes {
        for c in 0..classes {
            assert_eq!(
                reference["hist"][r][c].as_u64().unwrap(),
                cm.get(r, c),
                "histogram cell ({r}, {c})"
            );
        }
    }
    for (c, ours) in cm.iou().iter().enumerate() {
        let theirs = reference["iou"][c].as_f64();
        match (ours, theirs) {
            (Some(a), Some(b)) => assert!((a - b).abs() < 1e-12, "class {c}: {a} vs {b}"),
            (None, None) => {}
            other => panic!("class {c}: defined-ness differs: {other:?}"),
        }
    }
    let ours = cm.miou().unwrap();
    let theirs = reference["miou"].as_f64().unwrap();
    assert!(
        (ours - theirs).abs() < 1e-6,
        "mIoU {ours} vs NumPy {theirs}"
    );
}
