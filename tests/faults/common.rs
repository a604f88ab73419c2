//! What the fault tests share: the tiny IntraDA pipeline, `dag` runs under a time limit, SIGKILL,
//! output digests read from the manifests, a seeded RNG and the figures the suite measures.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

pub use crate::engine_common::{text, Ws};

/// Every kind of the quickstart on a configuration that runs in well under a minute on two
/// cores. Training stages run long enough to write several checkpoints, so a kill lands after
/// one often enough to check resuming.
pub const TINY: &str = r#"
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
  src_only: { kind: train_source, inputs: { source: source }, params: { iters: 12, max_iters: 12, depth: 14, width: 0.125, lr: 0.01, checkpoint_every: 2, snapshot_every: 4 } }
  advent:   { kind: adapt, inputs: { source: source, target: target, init: src_only.model }, params: { iters: 10, max_iters: 10, lr: 0.01, disc_ndf: 8, checkpoint_every: 2, snapshot_every: 5 } }
  entropy:  { kind: score_entropy, inputs: { model: advent.model, target: target, difficulty: synth.target } }
  split:    { kind: split, inputs: { scores: entropy.scores }, params: { lambda: 0.67 } }
  stats:    { kind: class_stats, inputs: { data: source } }
  dacs_mic: { kind: adapt, inputs: { source: source, target: target, init: src_only.model, class_stats: stats.class_stats }, params: { method: dacs+mic, iters: 8, max_iters: 8, lr: 0.01, batch_size: 2, lambda_seg_aux: 0, mic_block: 8, crop: [48, 24], flip: 0.5, rcs_min_pixels: 20, checkpoint_every: 2 } }
  intrada:  { kind: self_train, inputs: { target: target, easy: split.easy, hard: split.hard, pseudo: entropy.pseudo_labels, init: advent.model }, params: { iters: 10, max_iters: 10, lr: 0.01, disc_ndf: 8, checkpoint_every: 2 } }
  eval_src:     { kind: evaluate, inputs: { model: src_only.model, data: val } }
  eval_advent:  { kind: evaluate, inputs: { model: advent.model, data: val }, params: { snapshots: all } }
  eval_intrada: { kind: evaluate, inputs: { model: intrada.model, data: val } }
  compare:  { kind: compare, inputs: { source_only: eval_src, advent: eval_advent, intrada: eval_intrada }, params: { order: [source_only, advent, intrada] } }
"#;

/// Stages of [`TINY`] in file order, with their kind.
pub const TINY_STAGES: &[(&str, &str)] = &[
    ("synth", "synth"),
    ("source", "preprocess"),
    ("target", "preprocess"),
    ("val", "preprocess"),
    ("src_only", "train_source"),
    ("advent", "adapt"),
    ("stats", "class_stats"),
    ("dacs_mic", "adapt"),
    ("entropy", "score_entropy"),
    ("split", "split"),
    ("intrada", "self_train"),
    ("eval_src", "evaluate"),
    ("eval_advent", "evaluate"),
    ("eval_intrada", "evaluate"),
    ("compare", "compare"),
];

/// Training stages write a `log` output with wall-clock seconds per iteration: the one output
/// that legitimately differs between two runs.
pub fn deterministic(stage: &str, output: &str) -> bool {
    !(output == "log" && matches!(stage, "src_only" | "advent" | "dacs_mic" | "intrada"))
}

/// The `dag` binary under test.
pub fn dag() -> &'static str {
    env!("CARGO_BIN_EXE_dag")
}

/// A `dag` command in `dir` with a clean environment.
pub fn cmd_in(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(dag());
    c.args(args)
        .current_dir(dir)
        .env_remove("DAG_CACHE")
        .env_remove("DAG_LOG")
        .env("NO_COLOR", "1");
    c
}

/// Runs a command to completion, killing it (and failing the test) after `limit`.
pub fn output_within(mut c: Command, limit: Duration) -> Output {
    let child = c
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn dag");
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(o) => o.expect("wait for dag"),
        Err(_) => {
            kill_group(pid);
            let o = rx.recv().expect("reaped").expect("wait for dag");
            panic!("{c:?} hung for more than {limit:?}\n{}", text(&o));
        }
    }
}

/// Spawns `dag` in its own process group (so a kill reaches the whole run), output discarded.
pub fn spawn_quiet(mut c: Command) -> Child {
    c.process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn dag")
}

/// Spawns `dag` in its own process group with the stdout and stderr the command was given.
pub fn spawn_in_group(mut c: Command) -> Child {
    c.process_group(0)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn dag")
}

/// Waits for a child, killing its group (and failing the test) after `limit`.
pub fn wait_within(mut child: Child, limit: Duration) -> ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait for dag") {
            return status;
        }
        if t0.elapsed() > limit {
            kill_group(child.id() as i32);
            let _ = child.wait();
            panic!("dag (pid {}) hung for more than {limit:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// SIGKILL to a process group.
pub fn kill_group(pgid: i32) {
    // SAFETY: kill(2) on a process group this test created; no memory is involved.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}

/// Whether a child ended by SIGKILL (as opposed to finishing before the kill arrived).
pub fn was_killed(s: &ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt;
    s.signal() == Some(libc::SIGKILL)
}

/// Reads a manifest of a cache as JSON.
pub fn manifest(cache: &Path, key: &str) -> Option<serde_json::Value> {
    let bytes = std::fs::read(cache.join("runs").join(format!("{key}.json"))).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The key of the latest run of a stage.
pub fn latest(cache: &Path, pipeline: &str, stage: &str) -> Option<String> {
    std::fs::read_to_string(cache.join("latest").join(pipeline).join(stage))
        .ok()
        .map(|s| s.trim().to_string())
}

/// `(stage, output) -> tree digest` of the latest runs of a pipeline's stages.
pub fn output_digests(
    cache: &Path,
    pipeline: &str,
    stages: &[&str],
) -> BTreeMap<(String, String), String> {
    let mut out = BTreeMap::new();
    for s in stages {
        let key = latest(cache, pipeline, s).unwrap_or_else(|| panic!("{s} has no latest run"));
        let m = manifest(cache, &key).unwrap_or_else(|| panic!("{s}: manifest {key} unreadable"));
        for (name, t) in m["outputs"].as_object().expect("outputs") {
            out.insert(
                (s.to_string(), name.clone()),
                t["digest"].as_str().expect("digest").to_string(),
            );
        }
    }
    out
}

/// Every file under a directory with its bytes (for "nothing changed" checks).
pub fn snapshot_tree(root: &Path) -> BTreeMap<PathBuf, (Vec<u8>, std::time::SystemTime)> {
    let mut m = BTreeMap::new();
    for e in walkdir::WalkDir::new(root).sort_by_file_name() {
        let e = e.expect("walk");
        let meta = std::fs::symlink_metadata(e.path()).expect("stat");
        let bytes = if meta.is_file() {
            std::fs::read(e.path()).expect("read")
        } else {
            Vec::new()
        };
        m.insert(
            e.path().to_path_buf(),
            (bytes, meta.modified().expect("mtime")),
        );
    }
    m
}

/// SplitMix64: a seeded, dependency-free RNG for kill points and byte flips.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in `[0, n)`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Records a figure the suite measured: printed, and written under the target directory so
/// RELIABILITY.md can be checked against the last run.
pub fn figure(name: &str, value: &str) {
    eprintln!("FIGURE {name}: {value}");
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fault-figures");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join(format!("{name}.txt")), format!("{value}\n"));
}

/// Waits until `cond` holds, polling; false after `limit`.
pub fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    cond()
}

/// The stages a `dag run` summary reports with this outcome.
pub fn with_outcome(o: &Output, outcome: &str) -> Vec<String> {
    crate::engine_common::summary(o)
        .into_iter()
        .filter(|(_, s)| s == outcome)
        .map(|(n, _)| n)
        .collect()
}
