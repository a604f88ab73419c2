//! Losses, optimisers, schedules and the one adversarial training loop of `dag` (source-only,
//! MinEnt, AdvEnt, MinEnt+AdvEnt and IntraDA's easy->hard step), with checkpoint/resume, plus
//! device selection.
//!
//! The loop is a library call that knows nothing of the cache or the engine: [`train`] takes a
//! [`TrainConfig`], a device, a [`Batches`] provider, a checkpoint directory, a progress
//! callback and a cancel flag, and returns the trained model with one [`IterationLog`] per
//! iteration.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod device;
mod fused_adam;
mod host_losses;
pub mod losses;
mod trainer;

pub use checkpoint::snapshots;
pub use config::{poly_lr, Method, TrainConfig};
pub use data::{BatchError, Batches, ImageBatch, LabelBatch, SourceBatch};
pub use device::{device_for, resolve_device, wait_for_device_work, DeviceChoice};
pub use rand_core;
pub use trainer::{train, TrainOutcome, SOURCE_LABEL, TARGET_LABEL};

/// One row of the training log (`log.parquet`): the unweighted value of every loss term the
/// method computes (`None` for the others), the learning rates and the wall time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IterationLog {
    /// Iteration index, from 0.
    pub iteration: usize,
    /// CE of the main head on the labelled batch.
    pub seg_main: Option<f64>,
    /// CE of the aux head on the labelled batch.
    pub seg_aux: Option<f64>,
    /// Entropy (MinEnt) of the main head on the target batch.
    pub ent_main: Option<f64>,
    /// Entropy (MinEnt) of the aux head on the target batch.
    pub ent_aux: Option<f64>,
    /// Adversarial (fool-the-discriminator) BCE of the main head on the target batch.
    pub adv_main: Option<f64>,
    /// Adversarial BCE of the aux head on the target batch.
    pub adv_aux: Option<f64>,
    /// Main discriminator loss `(BCE(D(I_s), 0) + BCE(D(I_t), 1)) / 2`.
    pub d_main: Option<f64>,
    /// Aux discriminator loss.
    pub d_aux: Option<f64>,
    /// Learning rate of the segmentation backbone this iteration (heads: times `head_lr_mult`).
    pub lr: f64,
    /// Learning rate of the discriminators this iteration (`None` without discriminators).
    pub lr_d: Option<f64>,
    /// Wall-clock seconds of the iteration (batch loading included).
    pub seconds: f64,
}

impl IterationLog {
    /// The loss terms present this iteration, by name (`seg_main`, ..., `d_aux`).
    pub fn terms(&self) -> Vec<(&'static str, f64)> {
        [
            ("seg_main", self.seg_main),
            ("seg_aux", self.seg_aux),
            ("ent_main", self.ent_main),
            ("ent_aux", self.ent_aux),
            ("adv_main", self.adv_main),
            ("adv_aux", self.adv_aux),
            ("d_main", self.d_main),
            ("d_aux", self.d_aux),
        ]
        .into_iter()
        .filter_map(|(n, v)| v.map(|v| (n, v)))
        .collect()
    }
}

/// Errors of training; each names the iteration or file involved and what to do.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The configuration is inconsistent.
    #[error("invalid training config: {0}")]
    Config(String),
    /// A loss term became NaN or infinite.
    #[error(
        "loss term `{term}` is {value} at iteration {iteration}; lower the learning rate or the \
         term's lambda, or check the input data"
    )]
    NonFinite {
        /// The iteration.
        iteration: usize,
        /// The loss term (`seg_main`, `adv_aux`, `d_main`, ...).
        term: &'static str,
        /// Its value.
        value: f64,
    },
    /// The batch provider failed or returned a malformed batch.
    #[error("{which} batch of iteration {iteration}: {message}")]
    Batch {
        /// The iteration.
        iteration: usize,
        /// `source` or `target`.
        which: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The cancel flag was raised; the last checkpoint stays for a resume.
    #[error(
        "training cancelled before iteration {iteration}; rerun to resume from the last checkpoint"
    )]
    Cancelled {
        /// The first iteration that did not run.
        iteration: usize,
    },
    /// A checkpoint could not be written or read.
    #[error("checkpoint {path}: {message}")]
    Checkpoint {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// File-system error.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Work queued on a GPU device failed.
    #[error("work queued on {device} failed: {message}")]
    Device {
        /// The device.
        device: String,
        /// The backend's error.
        message: String,
    },
    /// Building or restoring a network failed.
    #[error(transparent)]
    Model(#[from] dag_model::ModelError),
}
