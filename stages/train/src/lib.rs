//! Losses, optimisers, schedules and the one training loop of `dag` (the methods of [`METHODS`]:
//! source-only, MinEnt, AdvEnt, MinEnt+AdvEnt, MaxSquare, IntraDA's easy->hard step with any of
//! them, and the mean-teacher self-training of DACS and MIC), with checkpoint/resume, plus device
//! selection.
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
pub mod feature_distance;
pub mod losses;
pub mod methods;
pub mod objectives;
pub mod selftraining;
mod trainer;

pub use checkpoint::snapshots;
pub use config::{poly_lr, Schedule, TrainConfig};
pub use data::{normalisation, BatchError, Batches, ImageBatch, LabelBatch, SourceBatch, Window};
pub use device::{device_for, resolve_device, wait_for_device_work, DeviceKind};
pub use methods::{Method, METHODS};
pub use rand_core;
pub use trainer::{train, TrainOutcome, SOURCE_LABEL, TARGET_LABEL};

/// One row of the training log (`log.parquet`): the unweighted value of every loss term the
/// method computed, the learning rates and the wall time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IterationLog {
    /// Iteration index, from 0.
    pub iteration: usize,
    /// Every term computed this iteration, by name, in the method's order: `seg_main`,
    /// `seg_aux`, its target objectives' terms, then `adv_main`, `adv_aux`, `d_main`, `d_aux`
    /// for the adversarial methods. A term with a zero weight is not computed.
    pub terms: Vec<(String, f64)>,
    /// Learning rate of the segmentation backbone this iteration (heads: times `head_lr_mult`).
    pub lr: f64,
    /// Learning rate of the discriminators this iteration (`None` without discriminators).
    pub lr_d: Option<f64>,
    /// Wall-clock seconds of the iteration (batch loading included).
    pub seconds: f64,
}

impl IterationLog {
    /// The value of term `name`, when computed this iteration.
    pub fn term(&self, name: &str) -> Option<f64> {
        self.terms.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
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
        "loss term `{term}` is {value} at iteration {iteration}; lower `lr` or `{knob}`, or check \
         the input data",
        knob = crate::methods::weight_param_of(term)
    )]
    NonFinite {
        /// The iteration.
        iteration: usize,
        /// The loss term (`seg_main`, `adv_aux`, `d_main`, ...).
        term: String,
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
