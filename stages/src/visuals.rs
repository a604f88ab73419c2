//! The pictures `score_entropy` and `evaluate` write for people (and `dag report`): per image
//! the input, the ground truth, the prediction in the Cityscapes palette, a heat map of the
//! prediction's per-pixel entropy and the prediction laid over the image, listed in
//! `visuals.json`.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::activation::softmax;
use burn::tensor::Tensor;
use dag_api::StageError;
use dag_artifacts::files::{create_parent, data_error};
use dag_data::pngio::{colorize, write_rgb_png};
use dag_data::resize::resize_rgb_bicubic;
use dag_data::viz::{blend, heatmap};
use dag_data::Protocol;

/// Opacity of the prediction laid over the image: enough to read the classes, little enough to
/// still see the scene under them.
const OVERLAY_ALPHA: f32 = 0.55;

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
