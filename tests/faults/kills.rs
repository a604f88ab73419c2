//! SIGKILL at seeded random points of every stage kind, then rerun: the rerun completes, training
//! resumes from the checkpoint the killed run left, and the outputs are byte-identical to the
//! uninterrupted run's (the killed stage reruns and its dependents stay cached because its
//! output digests are unchanged).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::common::*;

const SEED: u64 = 0x6b11_1e55;

/// Kills per stage: three for training stages (the last just after a new checkpoint), two for
/// the others.
fn kills_for(kind: &str) -> usize {
    match kind {
        "train_source" | "adapt" | "self_train" => 3,
        _ => 2,
    }
}

fn checkpoint_iteration(cache: &std::path::Path, key: &str) -> Option<u64> {
    let state = cache
        .join("scratch")
        .join(key)
        .join("checkpoints/checkpoint/state.json");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(state).ok()?).ok()?;
    v["next_iteration"].as_u64()
}

/// Whether process `pid` has created the staging directory of `stage` (a killed run's staging
/// stays until the next run clears it, hence the pid).
fn staging_exists(cache: &std::path::Path, stage: &str, pid: i32) -> bool {
    let prefix = format!("{stage}.{pid}.");
    std::fs::read_dir(cache.join("tmp")).is_ok_and(|rd| {
        rd.flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(&prefix))
    })
}

#[test]
fn sigkill_at_random_points_of_every_stage_kind() {
    let ws = Ws::new(TINY, &[]);
    let cache = ws.path("cache");
    let limit = Duration::from_secs(300);
    let t0 = Instant::now();
    let out = output_within(ws.cmd(&["run", "pipeline.yaml"]), limit);
    assert!(out.status.success(), "{}", text(&out));
    let reference_seconds = t0.elapsed().as_secs_f64();
    let names: Vec<&str> = TINY_STAGES.iter().map(|(s, _)| *s).collect();
    let reference = output_digests(&cache, "tiny", &names);

    let mut rng = Rng::new(SEED);
    let (mut tried, mut survived, mut missed) = (0usize, 0usize, 0usize);
    let mut resumed: BTreeMap<&str, Vec<(u64, u64)>> = BTreeMap::new();
    let mut per_kind: BTreeMap<&str, usize> = BTreeMap::new();
    for &(stage, kind) in TINY_STAGES {
        let key = latest(&cache, "tiny", stage).expect("reference run");
        let m = manifest(&cache, &key).expect("reference manifest");
        let stage_secs = m["seconds"].as_f64().unwrap() + m["publish_seconds"].as_f64().unwrap();
        let training = matches!(kind, "train_source" | "adapt" | "self_train");
        // Forget this one run: the next `dag run` must redo exactly this stage.
        std::fs::remove_file(cache.join("runs").join(format!("{key}.json"))).unwrap();
        let mut last_checkpoint = 0u64;
        let mut k = 0usize;
        let mut attempts = 0usize;
        // Misses since the last kill that landed: each halves the next delay, so that a stage
        // of a few milliseconds (a preprocess of five images on a busy machine) is still hit.
        let mut misses_in_a_row = 0i32;
        while k < kills_for(kind) {
            attempts += 1;
            assert!(
                attempts <= 40,
                "{stage}: could not land a kill in 40 attempts"
            );
            let spawned = std::time::SystemTime::now();
            let mut child = spawn_quiet(ws.cmd(&["run", "pipeline.yaml"]));
            let pid = child.id() as i32;
            let started = wait_for(Duration::from_secs(120), || {
                staging_exists(&cache, stage, pid) || child.try_wait().ok().flatten().is_some()
            });
            assert!(started, "{stage} never started");
            let last = training && k + 1 == kills_for(kind);
            if last {
                // The last kill of a training stage comes just after a new checkpoint, so that
                // the completing rerun must resume from it.
                let state = cache
                    .join("scratch")
                    .join(&key)
                    .join("checkpoints/checkpoint/state.json");
                wait_for(Duration::from_secs(120), || {
                    std::fs::metadata(&state)
                        .and_then(|m| m.modified())
                        .is_ok_and(|t| t > spawned)
                        || child.try_wait().ok().flatten().is_some()
                });
            }
            let delay = rng.unit()
                * stage_secs
                * if last {
                    0.05
                } else if training {
                    0.6
                } else {
                    1.0
                }
                * 0.5f64.powi(misses_in_a_row);
            std::thread::sleep(Duration::from_secs_f64(delay));
            kill_group(pid);
            let status = child.wait().unwrap();
            if !was_killed(&status) {
                // The run finished first: no kill point; forget the run again and retry.
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                assert!(
                    status.success(),
                    "a run failed while killing {stage}: {err}"
                );
                missed += 1;
                misses_in_a_row += 1;
                if let Some(k2) = latest(&cache, "tiny", stage) {
                    let _ = std::fs::remove_file(cache.join("runs").join(format!("{k2}.json")));
                }
                continue;
            }
            tried += 1;
            k += 1;
            misses_in_a_row = 0;
            *per_kind.entry(kind).or_default() += 1;
            if training {
                last_checkpoint = checkpoint_iteration(&cache, &key).unwrap_or(0);
            }
        }
        // The rerun: it completes, reruns only this stage, and reproduces its bytes.
        let out = output_within(ws.cmd(&["run", "pipeline.yaml"]), limit);
        assert!(
            out.status.success(),
            "rerun after killing {stage}:\n{}",
            text(&out)
        );
        let ran = with_outcome(&out, "ran");
        let now = output_digests(&cache, "tiny", &names);
        // Training stages too: a resumed run publishes the same model and snapshots as the
        // uninterrupted one (only `log`, which holds wall times, may differ), so nothing
        // downstream reruns.
        assert!(
            ran.is_empty() || ran == [stage.to_string()],
            "after killing {stage}, other stages reran (its output bytes changed): {ran:?}"
        );
        for ((s, o), d) in &reference {
            if deterministic(s, o) {
                assert_eq!(
                    &now[&(s.clone(), o.clone())],
                    d,
                    "{s}.{o} differs after killing {stage}"
                );
            }
        }
        if training && ran.iter().any(|r| r == stage) {
            let m = manifest(&cache, &key).expect("manifest of the rerun");
            let from = m["metrics"]["resumed_from"].as_u64().unwrap();
            assert_eq!(
                from, last_checkpoint,
                "{stage} did not resume from the checkpoint the killed run left"
            );
            resumed
                .entry(stage)
                .or_default()
                .push((last_checkpoint, from));
        }
        survived += k;
    }
    for s in ["src_only", "advent", "intrada"] {
        assert!(
            resumed
                .get(s)
                .is_some_and(|v| v.iter().any(|&(_, f)| f > 0)),
            "{s} never resumed from a checkpoint: {resumed:?}"
        );
    }
    // Nothing a killed run left is mistaken for a result.
    let out = output_within(ws.cmd(&["verify"]), limit);
    assert!(out.status.success(), "{}", text(&out));
    assert!(tried >= 20, "only {tried} kills landed");
    figure("kills", &format!("{survived}/{tried}"));
    figure("kills_per_kind", &format!("{per_kind:?}"));
    figure("kills_missed", &missed.to_string());
    figure("kills_resumed", &format!("{resumed:?}"));
    figure(
        "kills_reference_seconds",
        &format!("{reference_seconds:.1}"),
    );
}
