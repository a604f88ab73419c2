//! ImageNet initialisation of the backbone from a PyTorch `.pth` state dict.

use std::path::Path;

use burn::store::{ModuleSnapshot, PytorchStore};

use crate::deeplab::ResNetBackbone;
use crate::ModelError;

/// What loading a `.pth` into the backbone did, tensor by tensor (paths in Burn naming).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Backbone tensors that received a value from the file.
    pub applied: Vec<String>,
    /// Backbone tensors the file has no value for (they keep their random initialisation).
    pub missing: Vec<String>,
    /// Tensors of the file that belong to no backbone tensor: the classifier (`Scale.layer5.*`,
    /// `fc.*`), BatchNorm's `num_batches_tracked`, anything foreign.
    pub unused: Vec<String>,
}

impl LoadReport {
    /// The one-line summary the `load_torch_weights` example prints.
    pub fn summary(&self) -> String {
        format!(
            "applied {}, missing {}, unused {}",
            self.applied.len(),
            self.missing.len(),
            self.unused.len()
        )
    }
}

/// Loads ImageNet weights into `backbone` from a PyTorch state dict in either naming:
///
/// - ADVENT's `DeepLab_resnet_pretrained_imagenet.pth`: `Scale.conv1.*`, `Scale.bn1.*`,
///   `Scale.layerN.i.{conv,bn}K.*`, `Scale.layerN.0.downsample.{0,1}.*`; its `Scale.layer5.*`
///   (an old classifier) is never applied and shows up as unused;
/// - torchvision's ResNet: `conv1.*`, `bn1.*`, `layerN.i.*`, `fc.*` (unused);
/// - mmcv's ResNet-V1c (`open-mmlab://resnet101_v1c`, for [`crate::ResNetStyle::V1c`]):
///   `stem.{0,1,3,4,6,7}.*`, `layerN.i.*`, inside a `state_dict` or not, with or without a
///   `backbone.` prefix.
///
/// A file that leaves any backbone tensor without a value is refused with
/// [`ModelError::PartialLoad`] unless `allow_partial` is set, in which case the missing tensors
/// keep their initialisation and are listed in the report. Shape or dtype mismatches are always
/// refused: they mean the file is for another depth or width.
pub fn load_imagenet_backbone(
    backbone: ResNetBackbone,
    path: &Path,
    allow_partial: bool,
) -> Result<(ResNetBackbone, LoadReport), ModelError> {
    let mut backbone = backbone;
    if !path.is_file() {
        return Err(ModelError::WeightsNotFound(path.to_path_buf()));
    }
    let store = |top_level: Option<&str>| {
        let store = PytorchStore::from_file(path);
        let store = match top_level {
            Some(key) => store.with_top_level_key(key),
            None => store,
        };
        store
            // The ResNet's indices are already contiguous; renumbering would only hide gaps.
            .map_indices_contiguous(false)
            .with_key_remapping(r"^Scale\.", "")
            .with_key_remapping(r"^backbone\.", "")
            // mmcv's deep stem: `stem.{0,1}` is the first conv and its BatchNorm, `stem.{3,4}`
            // and `stem.{6,7}` the other two (ReLUs in between).
            .with_key_remapping(r"^stem\.0\.", "conv1.")
            .with_key_remapping(r"^stem\.1\.", "bn1.")
            .with_key_remapping(r"^stem\.3\.", "deep_stem.conv2.")
            .with_key_remapping(r"^stem\.4\.", "deep_stem.bn2.")
            .with_key_remapping(r"^stem\.6\.", "deep_stem.conv3.")
            .with_key_remapping(r"^stem\.7\.", "deep_stem.bn3.")
            .with_key_remapping(r"\.downsample\.0\.", ".downsample.conv.")
            .with_key_remapping(r"\.downsample\.1\.", ".downsample.bn.")
            // Validation and partial-load checks are done below, with a report that names the
            // file.
            .validate(false)
            .allow_partial(true)
    };
    let weights_error = |e: String| ModelError::Weights {
        path: path.to_path_buf(),
        message: e,
    };
    let mut result = backbone
        .load_from(&mut store(None))
        .map_err(|e| weights_error(e.to_string()))?;
    if result.applied.is_empty() {
        // mmcv's checkpoints wrap the weights in `state_dict`.
        if let Ok(wrapped) = backbone.load_from(&mut store(Some("state_dict"))) {
            result = wrapped;
        }
    }
    if !result.errors.is_empty() {
        let errors: Vec<String> = result.errors.iter().map(|e| e.to_string()).collect();
        return Err(ModelError::Weights {
            path: path.to_path_buf(),
            message: format!(
                "{} tensor(s) do not fit this backbone (is the file for another depth or \
                 width?):\n  {}",
                errors.len(),
                errors.join("\n  ")
            ),
        });
    }
    let report = LoadReport {
        applied: result.applied.clone(),
        missing: result.missing.iter().map(|(p, _)| p.clone()).collect(),
        unused: result.unused.clone(),
    };
    if !report.missing.is_empty() && !allow_partial {
        return Err(ModelError::PartialLoad {
            path: path.to_path_buf(),
            missing: report.missing.clone(),
            applied: report.applied.len(),
        });
    }
    Ok((backbone, report))
}

/// At most `max` items of a list, for error messages about long lists of tensors.
pub(crate) fn display_list(items: &[String], max: usize) -> String {
    let s: Vec<&str> = items.iter().take(max).map(String::as_str).collect();
    let more = items.len().saturating_sub(max);
    let tail = if more > 0 {
        format!(" (and {more} more)")
    } else {
        String::new()
    };
    format!("{}{}", s.join(", "), tail)
}
