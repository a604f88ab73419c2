//! ImageNet initialisation of the encoders (and whole DAFormer networks) from PyTorch `.pth`
//! state dicts.

use std::path::Path;

use burn::store::{ModuleSnapshot, PytorchStore};

use crate::daformer::DaFormer;
use crate::deeplab::ResNetBackbone;
use crate::mit::MixTransformer;
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
    let remaps = [
        (r"^Scale\.", ""),
        (r"^backbone\.", ""),
        // mmcv's deep stem: `stem.{0,1}` is the first conv and its BatchNorm, `stem.{3,4}`
        // and `stem.{6,7}` the other two (ReLUs in between).
        (r"^stem\.0\.", "conv1."),
        (r"^stem\.1\.", "bn1."),
        (r"^stem\.3\.", "deep_stem.conv2."),
        (r"^stem\.4\.", "deep_stem.bn2."),
        (r"^stem\.6\.", "deep_stem.conv3."),
        (r"^stem\.7\.", "deep_stem.bn3."),
        (r"\.downsample\.0\.", ".downsample.conv."),
        (r"\.downsample\.1\.", ".downsample.bn."),
    ];
    let mut backbone = backbone;
    let report = load_state_dict(&mut backbone, path, &remaps)?;
    refuse_partial(path, report, allow_partial, "backbone").map(|r| (backbone, r))
}

/// SegFormer's encoder naming (`patch_embed{s}`, `block{s}.{j}`, `norm{s}`,
/// `mlp.dwconv.dwconv`) in dag's [`MixTransformer`] paths.
const MIT_REMAPS: [(&str, &str); 13] = [
    (r"^patch_embed1\.", "stages.0.patch_embed."),
    (r"^patch_embed2\.", "stages.1.patch_embed."),
    (r"^patch_embed3\.", "stages.2.patch_embed."),
    (r"^patch_embed4\.", "stages.3.patch_embed."),
    (r"^block1\.", "stages.0.blocks."),
    (r"^block2\.", "stages.1.blocks."),
    (r"^block3\.", "stages.2.blocks."),
    (r"^block4\.", "stages.3.blocks."),
    (r"^norm1\.", "stages.0.norm."),
    (r"^norm2\.", "stages.1.norm."),
    (r"^norm3\.", "stages.2.norm."),
    (r"^norm4\.", "stages.3.norm."),
    (r"\.mlp\.dwconv\.dwconv\.", ".mlp.dwconv."),
];

/// Loads SegFormer's ImageNet weights (`mit_b0.pth` ... `mit_b5.pth`) into a MiT encoder: keys
/// `patch_embed{s}.*`, `block{s}.{j}.*`, `norm{s}.*`, inside a `state_dict` or not, with or
/// without a `backbone.` prefix. The ImageNet classifier (`head.*`) is reported as unused.
///
/// Missing encoder tensors are refused with [`ModelError::PartialLoad`] unless `allow_partial`
/// is set; shape mismatches (another variant) are always refused.
pub fn load_mit_weights(
    encoder: MixTransformer,
    path: &Path,
    allow_partial: bool,
) -> Result<(MixTransformer, LoadReport), ModelError> {
    let mut remaps = vec![(r"^backbone\.", "")];
    remaps.extend(MIT_REMAPS);
    let mut encoder = encoder;
    let report = load_state_dict(&mut encoder, path, &remaps)?;
    refuse_partial(path, report, allow_partial, "encoder").map(|r| (encoder, r))
}

/// Loads a whole DAFormer network from a state dict in DAFormer's (mmseg's) naming:
/// `backbone.*` in SegFormer's naming and `decode_head.*`, inside a `state_dict` or not, with or
/// without the `model.` prefix of DAFormer's UDA checkpoints (whose `ema_model.*` and
/// `imnet_model.*` copies are then reported as unused). Every tensor of the network must get a
/// value.
pub fn load_daformer_weights(
    model: DaFormer,
    path: &Path,
) -> Result<(DaFormer, LoadReport), ModelError> {
    let remaps: Vec<(String, String)> = std::iter::once((r"^model\.".into(), String::new()))
        .chain(MIT_REMAPS.map(|(from, to)| {
            (
                from.replacen('^', r"^backbone\.", 1),
                to.replacen("stages.", "backbone.stages.", 1),
            )
        }))
        // DAFormer's `MLP` embedding wraps its linear layer in `proj`. (Burn's paths do not name
        // enum variants, so the fusion's modules need no renaming.)
        .chain([(
            r"\.embed_layers\.(\d+)\.proj\.".into(),
            ".embed_layers.$1.".into(),
        )])
        .collect();
    let remaps: Vec<(&str, &str)> = remaps
        .iter()
        .map(|(from, to)| (from.as_str(), to.as_str()))
        .collect();
    let mut model = model;
    let report = load_state_dict(&mut model, path, &remaps)?;
    refuse_partial(path, report, false, "network").map(|r| (model, r))
}

/// Applies the tensors of the `.pth` at `path`, renamed by `remaps` (regex, replacement; applied
/// in order), to `module`; tries the file's top level, then a `state_dict` wrapper (mmcv's
/// checkpoints). Shape and dtype mismatches are errors; missing and unused tensors go to the
/// report.
fn load_state_dict<M: ModuleSnapshot>(
    module: &mut M,
    path: &Path,
    remaps: &[(&str, &str)],
) -> Result<LoadReport, ModelError> {
    if !path.is_file() {
        return Err(ModelError::WeightsNotFound(path.to_path_buf()));
    }
    let store = |top_level: Option<&str>| {
        let store = PytorchStore::from_file(path);
        let mut store = match top_level {
            Some(key) => store.with_top_level_key(key),
            None => store,
        }
        // The indices are already contiguous; renumbering would only hide gaps.
        .map_indices_contiguous(false);
        for (from, to) in remaps {
            store = store.with_key_remapping(from, *to);
        }
        // Validation and partial-load checks are done by the callers, with a report that names
        // the file.
        store.validate(false).allow_partial(true)
    };
    let weights_error = |e: String| ModelError::Weights {
        path: path.to_path_buf(),
        message: e,
    };
    let mut result = module
        .load_from(&mut store(None))
        .map_err(|e| weights_error(e.to_string()))?;
    if result.applied.is_empty() {
        if let Ok(wrapped) = module.load_from(&mut store(Some("state_dict"))) {
            result = wrapped;
        }
    }
    if !result.errors.is_empty() {
        let errors: Vec<String> = result.errors.iter().map(|e| e.to_string()).collect();
        return Err(ModelError::Weights {
            path: path.to_path_buf(),
            message: format!(
                "{} tensor(s) do not fit this network (is the file for another variant, depth \
                 or width?):\n  {}{}",
                errors.len(),
                errors[..errors.len().min(5)].join("\n  "),
                match errors.len().saturating_sub(5) {
                    0 => String::new(),
                    more => format!("\n  (and {more} more)"),
                }
            ),
        });
    }
    Ok(LoadReport {
        applied: result.applied.clone(),
        missing: result.missing.iter().map(|(p, _)| p.clone()).collect(),
        unused: result.unused.clone(),
    })
}

fn refuse_partial(
    path: &Path,
    report: LoadReport,
    allow_partial: bool,
    what: &'static str,
) -> Result<LoadReport, ModelError> {
    if !report.missing.is_empty() && !allow_partial {
        return Err(ModelError::PartialLoad {
            path: path.to_path_buf(),
            what,
            missing: report.missing.clone(),
            applied: report.applied.len(),
        });
    }
    Ok(report)
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
