//! The pictures `score_entropy` and `evaluate` write for people (and `dag report`): per image
//! the input, the ground truth, the prediction in the Cityscapes palette, a heat map of the
//! prediction's per-pixel entropy and the prediction laid over the image, listed in
//! `visuals.json`.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::activation::softmax;
use burn::tensor::Tensor;
use dag_api::StageError;
use dag_data::pngio::{colorize, write_rgb_png};
use dag_data::resize::resize_rgb_bicubic;
use dag_data::viz::{blend, heatmap};
use dag_data::Protocol;
use serde::{Deserialize, Serialize};

use crate::common::{create_parent, write_json};
use crate::preprocess::data_error;

/// The index of the pictures of one output directory.
pub const VISUALS_FILE: &str = "visuals.json";

/// Opacity of the prediction laid over the image: enough to read the classes, little enough to
/// still see the scene under them.
const OVERLAY_ALPHA: f32 = 0.55;

/// One pictured image, as listed in `visuals.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Visual {
    /// Which set it belongs to: `easiest`, `hardest` (score_entropy) or `samples` (evaluate).
    pub group: String,
    /// The image's id in its dataset.
    pub path: String,
    /// Its position in the entropy ranking (0 = most confident), when ranked.
    #[serde(default)]
    pub rank: Option<u32>,
    /// Its entropy score, when scored.
    #[serde(default)]
    pub score: Option<f64>,
    /// Picture name (`image`, `ground_truth`, `prediction`, `entropy`, `overlay`) -> file,
    /// relative to the directory holding `visuals.json`.
    pub files: BTreeMap<String, String>,
}

/// The pictures of one image, all `width x height` except `image`, which is resized to that size
/// when it differs (a prediction at full label resolution of a preprocessed image).
pub struct Pictures<'a> {
    pub width: u32,
    pub height: u32,
    /// RGB HWC of `image_size`.
    pub image: &'a [u8],
    pub image_size: (u32, u32),
    /// Class ids, 255 = ignore; `None` when the set has no labels.
    pub truth: Option<&'a [u8]>,
    pub prediction: &'a [u8],
    /// Normalised entropy in [0, 1] per pixel.
    pub entropy: &'a [f32],
}

/// Per-pixel entropy of softmax(`logits`) over classes, divided by ln(C) so that 0 is certain
/// and 1 is uniform, for each image of `[N, C, H, W]` logits.
pub fn pixel_entropy(logits: Tensor<4>) -> Vec<Vec<f32>> {
    let [n, classes, h, w] = logits.dims();
    let p = softmax(logits, 1);
    let values: Vec<f32> = p
        .clone()
        .mul(p.add_scalar(1e-30).log())
        .sum_dim(1)
        .neg()
        .div_scalar((classes as f64).ln())
        .into_data()
        .try_into_vec_as::<f32>()
        .expect("float entropy");
    values.chunks(h * w).take(n).map(<[f32]>::to_vec).collect()
}

/// Writes the pictures of one image as `<dir>/<prefix>_<name>.png` and returns their names for
/// [`Visual::files`].
pub fn write_pictures(
    dir: &Path,
    prefix: &str,
    pics: &Pictures<'_>,
    protocol: Protocol,
) -> Result<BTreeMap<String, String>, StageError> {
    let (w, h) = (pics.width, pics.height);
    let image = if pics.image_size == (w, h) {
        pics.image.to_vec()
    } else {
        let (iw, ih) = pics.image_size;
        resize_rgb_bicubic(pics.image, iw, ih, w, h).map_err(data_error)?
    };
    let prediction = colorize(pics.prediction, protocol);
    let overlay = blend(&image, &prediction, OVERLAY_ALPHA, None);
    let mut pictures: Vec<(&str, Vec<u8>)> = vec![("image", image)];
    // A set without labels stores 255 everywhere; a black picture would only mislead.
    if let Some(truth) = pics.truth.filter(|t| t.iter().any(|&c| c != 255)) {
        pictures.push(("ground_truth", colorize(truth, protocol)));
    }
    pictures.push(("prediction", prediction));
    pictures.push(("entropy", heatmap(pics.entropy)));
    pictures.push(("overlay", overlay));
    let mut files = BTreeMap::new();
    for (name, rgb) in pictures {
        let rel = format!("{prefix}_{name}.png");
        let path = dir.join(&rel);
        create_parent(&path)?;
        write_rgb_png(&path, w, h, &rgb).map_err(|e| data_error(e).with_path(path.clone()))?;
        files.insert(name.to_string(), rel);
    }
    Ok(files)
}

/// Writes `visuals.json` into `dir`.
pub fn write_index(dir: &Path, visuals: &[Visual]) -> Result<(), StageError> {
    write_json(
        &dir.join(VISUALS_FILE),
        &serde_json::json!({ "visuals": visuals }),
    )
}

/// Reads the `visuals.json` of `dir` (none: an empty list, for outputs of older versions).
pub fn read_index(dir: &Path) -> Result<Vec<Visual>, StageError> {
    let path = dir.join(VISUALS_FILE);
    if !path.is_file() {
        return Ok(Vec::new());
    }
    let bytes = std::fs::read(&path).map_err(|e| StageError::from(e).with_path(path.clone()))?;
    #[derive(Deserialize)]
    struct Index {
        visuals: Vec<Visual>,
    }
    let index: Index =
        serde_json::from_slice(&bytes).map_err(|e| StageError::from(e).with_path(path))?;
    Ok(index.visuals)
}
