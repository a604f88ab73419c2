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
}

pub(crate) const FORMAT: u32 = 1;

/// The tensor files of a checkpoint.
pub(crate) mod files {
    pub const MODEL: &str = "model.bpk";
    pub const OPTIM_SEG: &str = "optim_seg.bpk";
    pub const D_MAIN: &str = "d_main.bpk";
    pub const OPTIM_D_MAIN: &str = "optim_d_main.bpk";
    pub const D_AUX: &str = "d_aux.bpk";
    pub const OPTIM_D_AUX: &str = "optim_d_aux.bpk";
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The directory of the newest complete checkpoint under `dir`, if any. A crash between the two
/// renames of [`publish`] leaves only the previous one, which is then used.
pub(crate) fn find(dir: &Path) -> Option<PathBuf> {
    [CHECKPOINT, PREVIOUS]
        .iter()
        .map(|name| dir.join(name))
        .find(|p| p.join(STATE_FILE).is_file())
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
