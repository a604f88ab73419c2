//! Checkpoints of the training loop: model, discriminators, optimizers, iteration, RNG state and
//! the log so far, published atomically inside a directory the caller owns.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::IterationLog;
use crate::TrainError;

/// Name of the published checkpoint directory inside the caller's checkpoint directory.
pub const CHECKPOINT: &str = "checkpoint";
const PARTIAL: &str = "checkpoint.partial";
const PREVIOUS: &str = "checkpoint.previous";
/// Where a checkpoint that failed its checksums is moved, for a person to inspect.
pub const DAMAGED: &str = "checkpoint.damaged";
/// blake3 of every other file of a checkpoint, written last into the staging directory.
pub const CHECKSUMS: &str = "checksums.json";
/// Directory of the network snapshots (`TrainConfig::snapshot_every`) inside the caller's
/// checkpoint directory.
pub const SNAPSHOT_DIR: &str = "snapshots";

/// File name of the snapshot taken after `done` iterations.
pub fn snapshot_name(done: usize) -> String {
    format!("iter_{done:06}.bpk")
}

/// The snapshots under a checkpoint directory, `(iterations done, record file)`, in order.
pub fn snapshots(checkpoint_dir: &Path) -> Vec<(usize, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(checkpoint_dir.join(SNAPSHOT_DIR)) else {
        return Vec::new();
    };
    let mut found: Vec<(usize, PathBuf)> = rd
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let done = name
                .strip_prefix("iter_")?
                .strip_suffix(".bpk")?
                .parse()
                .ok()?;
            Some((done, e.path()))
        })
        .collect();
    found.sort();
    found
}

/// Name of the JSON file with everything that is not a tensor.
pub const STATE_FILE: &str = "state.json";

/// The JSON part of a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct CheckpointState {
    pub format: u32,
    /// The first iteration the resumed run executes.
    pub next_iteration: usize,
    pub config: TrainConfig,
    /// ChaCha8 seed, stream and word position of the loop RNG (word position as a decimal
    /// string: JSON numbers cannot hold a u128).
    pub rng_seed: [u8; 32],
    pub rng_stream: u64,
    pub rng_word_pos: String,
    pub log: Vec<IterationLog>,
    /// TUFL's adaptive thresholds as the bits of their f64 values (JSON numbers would not
    /// round-trip them exactly); empty for the other methods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tufl_thresholds: Vec<u64>,
}

/// Format 2 adds [`CHECKSUMS`]; format 3 names the method and its params in the config and the
/// loss terms in the log.
pub(crate) const FORMAT: u32 = 3;

/// The tensor files of a checkpoint.
pub(crate) mod files {
    pub const MODEL: &str = "model.bpk";
    pub const OPTIM_SEG: &str = "optim_seg.bpk";
    pub const D_MAIN: &str = "d_main.bpk";
    pub const OPTIM_D_MAIN: &str = "optim_d_main.bpk";
    pub const D_AUX: &str = "d_aux.bpk";
    pub const OPTIM_D_AUX: &str = "optim_d_aux.bpk";
    /// The teacher of the self-training methods.
    pub const TEACHER: &str = "teacher.bpk";
    /// The frozen starting network of the feature distance.
    pub const FD_REFERENCE: &str = "fd_reference.bpk";
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The published checkpoints under `dir`, newest first. A crash between the two renames of
/// [`publish`] leaves only the previous one.
pub(crate) fn candidates(dir: &Path) -> Vec<PathBuf> {
    [CHECKPOINT, PREVIOUS]
        .iter()
        .map(|name| dir.join(name))
        .filter(|p| p.join(STATE_FILE).is_file())
        .collect()
}

fn digest(path: &Path) -> Result<String, TrainError> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    Ok(blake3::hash(&bytes).to_hex().to_string())
}

/// Records the digest of every file of the staging directory in [`CHECKSUMS`].
fn write_checksums(partial: &Path) -> Result<(), TrainError> {
    let mut sums = std::collections::BTreeMap::new();
    for e in std::fs::read_dir(partial).map_err(io_err(partial))? {
        let e = e.map_err(io_err(partial))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name != CHECKSUMS {
            sums.insert(name, digest(&e.path())?);
        }
    }
    let path = partial.join(CHECKSUMS);
    let json = serde_json::to_vec(&sums).expect("a map of strings serializes");
    std::fs::write(&path, json).map_err(io_err(&path))
}

/// Checks a checkpoint against its [`CHECKSUMS`]: a flipped byte in a tensor record still loads
/// and would silently resume from wrong weights, so every file must match.
pub(crate) fn verify(ckpt: &Path) -> Result<(), TrainError> {
    let path = ckpt.join(CHECKSUMS);
    let bad = |message: String| TrainError::Checkpoint {
        path: path.clone(),
        message,
    };
    let bytes = std::fs::read(&path).map_err(|e| bad(format!("no checksums: {e}")))?;
    let sums: std::collections::BTreeMap<String, String> =
        serde_json::from_slice(&bytes).map_err(|e| bad(format!("unreadable checksums: {e}")))?;
    if !sums.contains_key(STATE_FILE) {
        return Err(bad(format!("{STATE_FILE} is not covered")));
    }
    for e in std::fs::read_dir(ckpt).map_err(io_err(ckpt))? {
        let e = e.map_err(io_err(ckpt))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name != CHECKSUMS && !sums.contains_key(&name) {
            return Err(bad(format!("{name} is not covered")));
        }
    }
    for (name, want) in &sums {
        let file = ckpt.join(name);
        let got = digest(&file).map_err(|_| bad(format!("{name} is missing")))?;
        if &got != want {
            return Err(bad(format!("{name} does not match its checksum")));
        }
    }
    Ok(())
}

/// Moves a checkpoint that failed [`verify`] out of the way, so that the next attempt neither
/// resumes from it nor trips over it again.
pub(crate) fn set_aside(dir: &Path, ckpt: &Path) -> Result<(), TrainError> {
    let to = dir.join(DAMAGED);
    if to.exists() {
        std::fs::remove_dir_all(&to).map_err(io_err(&to))?;
    }
    std::fs::rename(ckpt, &to).map_err(io_err(ckpt))
}

/// A fresh, empty staging directory for the next checkpoint.
pub(crate) fn staging(dir: &Path) -> Result<PathBuf, TrainError> {
    let partial = dir.join(PARTIAL);
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(io_err(&partial))?;
    }
    std::fs::create_dir_all(&partial).map_err(io_err(&partial))?;
    Ok(partial)
}

/// Writes `state` into the staging directory and swaps it in for the published checkpoint.
pub(crate) fn publish(dir: &Path, state: &CheckpointState) -> Result<(), TrainError> {
    let partial = dir.join(PARTIAL);
    let state_path = partial.join(STATE_FILE);
    let json = serde_json::to_vec(state).map_err(|e| TrainError::Checkpoint {
        path: state_path.clone(),
        message: e.to_string(),
    })?;
    std::fs::write(&state_path, json).map_err(io_err(&state_path))?;
    write_checksums(&partial)?;
    let current = dir.join(CHECKPOINT);
    let previous = dir.join(PREVIOUS);
    if previous.exists() {
        std::fs::remove_dir_all(&previous).map_err(io_err(&previous))?;
    }
    if current.exists() {
        std::fs::rename(&current, &previous).map_err(io_err(&current))?;
    }
    std::fs::rename(&partial, &current).map_err(io_err(&partial))?;
    if previous.exists() {
        std::fs::remove_dir_all(&previous).map_err(io_err(&previous))?;
    }
    Ok(())
}

/// Reads the JSON state of the checkpoint in `ckpt`.
pub(crate) fn read_state(ckpt: &Path) -> Result<CheckpointState, TrainError> {
    let path = ckpt.join(STATE_FILE);
    let bytes = std::fs::read(&path).map_err(io_err(&path))?;
    let state: CheckpointState =
        serde_json::from_slice(&bytes).map_err(|e| TrainError::Checkpoint {
            path: path.clone(),
            message: format!("{e}; delete the checkpoint directory to start over"),
        })?;
    if state.format != FORMAT {
        return Err(TrainError::Checkpoint {
            path,
            message: format!(
                "checkpoint format {} is not the supported {FORMAT}; delete it to start over",
                state.format
            ),
        });
    }
    Ok(state)
}
