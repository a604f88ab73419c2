//! The networks of `dag` on Burn 0.22: DeepLabV2 (dilated ResNet with Caffe-style or mmcv V1c
//! bottlenecks, multi-level heads), DAFormer's network (SegFormer's MiT encoder with DAFormer's
//! decoder), HRDA's multi-resolution version of it, one [`Segmenter`] type over them, and
//! ADVENT's patch discriminator; plus what later
//! stages need around them: saving/loading a model artifact (Burn record + `model.json`),
//! ImageNet initialisation from PyTorch `.pth` files, and inference at a given output size.
//!
//! This crate knows nothing of the cache or the engine.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::store::ModuleRecord;
use burn::tensor::Device;
use serde::{Deserialize, Serialize};

pub mod conv;
pub mod daformer;
pub mod deeplab;
pub mod discriminator;
pub mod hrda;
pub mod mit;
pub mod noise;
pub mod segmenter;
pub mod torch;

pub use dag_kernels::{argmax_classes, resize, upsample, upsample_differentiable};

pub use daformer::{DaFormer, DaFormerConfig, Fusion};
pub use deeplab::{
    output_size, DeepLabV2, DeepLabV2Config, InputConvention, ResNetBackbone, ResNetStyle,
};
pub use discriminator::{Discriminator, DiscriminatorConfig};
pub use hrda::{Hrda, HrdaConfig, PixelWindow};
pub use mit::{MitConfig, MixTransformer};
pub use noise::Noise;
pub use segmenter::{Architecture, DetailLogits, Logits, Segmenter};
pub use torch::{load_daformer_weights, load_imagenet_backbone, load_mit_weights, LoadReport};

/// File name of the Burn record inside a model artifact directory.
pub const WEIGHTS_FILE: &str = "model.bpk";
/// File name of the architecture description inside a model artifact directory.
pub const CONFIG_FILE: &str = "model.json";

/// Errors of this crate; each names the file involved and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A depth without a block table.
    #[error("unsupported ResNet depth {0}; use 101, 50, 26 or 14, or give `blocks` explicitly")]
    UnknownDepth(usize),
    /// A config value out of range.
    #[error("invalid model config: {0}")]
    InvalidConfig(String),
    /// The `.pth` file does not exist.
    #[error("ImageNet weights {0} not found; download them or fix the path")]
    WeightsNotFound(PathBuf),
    /// The `.pth` file could not be read or does not fit the backbone.
    #[error("cannot load PyTorch weights from {path}: {message}")]
    Weights {
        /// The `.pth` file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The `.pth` file lacks backbone tensors and partial loads were not allowed.
    #[error(
        "{path} has no value for {} {what} tensor(s) ({}), {applied} applied; refusing a \
         partial load: check that the file is for the configured architecture (ResNet depth, \
         MiT variant), or allow partial loads explicitly",
        missing.len(), torch::display_list(missing, 5)
    )]
    PartialLoad {
        /// The `.pth` file.
        path: PathBuf,
        /// What was loaded: `backbone`, `encoder` or `network`.
        what: &'static str,
        /// Backbone tensors without a value.
        missing: Vec<String>,
        /// How many tensors were applied.
        applied: usize,
    },
    /// Reading or writing an artifact file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// `model.json` is not a valid description.
    #[error("{path} is not a valid model description ({source}); was it written by dag?")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
    /// The Burn record could not be written or does not match the architecture.
    #[error(
        "model weights {path}: {message}; the artifact is damaged or from another architecture"
    )]
    Record {
        /// The record file.
        path: PathBuf,
        /// Burn's message.
        message: String,
    },
}

/// The `model.json` of a model artifact: the architecture, and free-form metadata (training
/// summary, class names, ...) the writing stage wants to keep alongside.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelDescription {
    /// The architecture (`architecture`: its name, `config`: its config).
    #[serde(flatten)]
    pub arch: Architecture,
    /// Anything else the writer wants to record.
    #[serde(default)]
    pub metadata: serde_json::Value,
}

/// Writes `model` into `dir` as `model.bpk` (Burn record) and `model.json` (architecture +
/// `metadata`), creating `dir` if needed.
pub fn save_model(
    model: Segmenter,
    metadata: serde_json::Value,
    dir: &Path,
) -> Result<(), ModelError> {
    std::fs::create_dir_all(dir).map_err(|source| ModelError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let desc = ModelDescription {
        arch: model.arch(),
        metadata,
    };
    let json_path = dir.join(CONFIG_FILE);
    let json = serde_json::to_vec_pretty(&desc).map_err(|source| ModelError::Json {
        path: json_path.clone(),
        source,
    })?;
    std::fs::write(&json_path, json).map_err(|source| ModelError::Io {
        path: json_path,
        source,
    })?;
    save_weights(model, &dir.join(WEIGHTS_FILE))
}

/// Writes `module`'s weights to `path` as a Burn record without Burn's parameter ids.
///
/// Burn draws an id at random for every parameter and running statistic and stores it beside
/// each tensor, so two identical trainings would publish different bytes (and the cache would
/// see different models). A published model must be a function of its training alone. Loading
/// keeps the ids of the module it loads into; checkpoints, whose optimizer state is keyed by
/// the ids, are written with [`save_record`] instead.
pub fn save_weights<M: Module>(module: M, path: &Path) -> Result<(), ModelError> {
    use burn::store::burn_pack::{Reader, Writer};
    let record_error = |message: String| ModelError::Record {
        path: path.to_path_buf(),
        message,
    };
    let bytes = module
        .into_record()
        .into_bytes()
        .map_err(|e| record_error(e.to_string()))?;
    let tensors = Reader::from_bytes(bytes)
        .and_then(Reader::into_tensors)
        .map_err(|e| record_error(e.to_string()))?
        .into_iter()
        .map(|mut tensor| {
            tensor.param_id = None;
            tensor
        })
        .collect();
    Writer::new(tensors)
        .write_to_file(path)
        .map_err(|e| record_error(e.to_string()))
}

/// Reads the `model.json` of an artifact directory.
pub fn read_description(dir: &Path) -> Result<ModelDescription, ModelError> {
    let path = dir.join(CONFIG_FILE);
    let bytes = std::fs::read(&path).map_err(|source| ModelError::Io {
        path: path.clone(),
        source,
    })?;
    let json: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|source| ModelError::Json {
            path: path.clone(),
            source,
        })?;
    let name = json.get("architecture").and_then(serde_json::Value::as_str);
    if !name.is_some_and(|n| Architecture::NAMES.contains(&n)) {
        return Err(ModelError::InvalidConfig(format!(
            "{} describes a `{}` model; this build knows {}",
            path.display(),
            name.unwrap_or("(unnamed)"),
            Architecture::NAMES.join(" and ")
        )));
    }
    serde_json::from_value(json).map_err(|source| ModelError::Json { path, source })
}

/// Rebuilds a model from an artifact directory written by [`save_model`], on `device`.
pub fn load_model(
    dir: &Path,
    device: &Device,
) -> Result<(Segmenter, ModelDescription), ModelError> {
    let desc = read_description(dir)?;
    let model = desc.arch.init(device)?;
    let model = load_record_into(model, &dir.join(WEIGHTS_FILE))?;
    Ok((model, desc))
}

/// Applies the Burn record at `path` to `module` (every tensor must match).
pub fn load_record_into<M: Module>(module: M, path: &Path) -> Result<M, ModelError> {
    let record = ModuleRecord::load(path).map_err(|e| ModelError::Record {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    module
        .try_load_record(record)
        .map_err(|e| ModelError::Record {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

/// Writes any module's Burn record to `path`.
pub fn save_record<M: Module>(module: M, path: &Path) -> Result<(), ModelError> {
    module
        .into_record()
        .save(path)
        .map_err(|e| ModelError::Record {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}
