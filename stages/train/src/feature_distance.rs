//! DAFormer's ImageNet feature distance (Hoyer et al., CVPR 2022; `mmseg/models/uda/dacs.py`
//! `calc_feat_dist`, `mmseg/utils/utils.py` `downscale_label_ratio`).
//!
//! On the source batch, the student's last backbone features are pulled toward those of a frozen
//! copy of the starting network (in eval mode): `lambda_fd * mean ||F - F_ref||_2` over the feature
//! cells whose source labels are mostly (at least `fd_min_ratio` of their pixels) one of the
//! `fd_classes`. DAFormer starts from ImageNet weights, so its reference is the ImageNet network.
//!
//! A cell covers `s x s` label pixels with `s = ceil(label width / feature width)`: DAFormer's
//! `width // feature width` where the two divide (64 features for a 512 crop), and for
//! ADVENT's DeepLabV2, whose ceil-mode pooling gives 65 features for 512 pixels, the window
//! that keeps cell `i` on pixels `s i ..`; the cells past the label map are not counted.

use burn::tensor::{Tensor, TensorData};

use crate::losses::IGNORE_LABEL;

/// DAFormer's `imnet_feature_dist_classes`: Cityscapes' traffic light, traffic sign, person,
/// rider, car, truck, bus, train, motorcycle and bicycle.
pub const THING_CLASSES: [usize; 10] = [6, 7, 11, 12, 13, 14, 15, 16, 17, 18];

/// Side in label pixels of one feature cell.
pub fn cell_side(label_width: usize, feature_width: usize) -> usize {
    label_width.div_ceil(feature_width.max(1)).max(1)
}

/// Which feature cells (`[N, fh, fw]`, row-major) the distance counts, from labels `[N, h, w]`:
/// the cell's majority label (255 counting as a label of its own, ties to the lower class) is
/// one of `fd_classes` and covers at least `min_ratio` of the cell.
pub fn cell_mask(
    labels: &[u8],
    [n, h, w]: [usize; 3],
    [fh, fw]: [usize; 2],
    classes: usize,
    fd_classes: &[usize],
    min_ratio: f64,
) -> Vec<bool> {
    let side = cell_side(w, fw);
    let (rows, cols) = ((h / side).min(fh), (w / side).min(fw));
    let area = (side * side) as f32;
    let ignore_bin = classes;
    let mut mask = vec![false; n * fh * fw];
    let mut counts = vec![0usize; classes + 1];
    for img in 0..n {
        let map = &labels[img * h * w..(img + 1) * h * w];
        for i in 0..rows {
            for j in 0..cols {
                counts.iter_mut().for_each(|c| *c = 0);
                for y in i * side..(i + 1) * side {
                    for &l in &map[y * w + j * side..y * w + (j + 1) * side] {
                        let bin = if l == IGNORE_LABEL as u8 {
                            ignore_bin
                        } else {
                            usize::from(l).min(ignore_bin)
                        };
                        counts[bin] += 1;
                    }
                }
                let mut best = 0;
                for (bin, &c) in counts.iter().enumerate() {
                    if c > counts[best] {
                        best = bin;
                    }
                }
                let sure = counts[best] as f32 / area >= min_ratio as f32;
                mask[(img * fh + i) * fw + j] =
                    sure && best != ignore_bin && fd_classes.contains(&best);
            }
        }
    }
    mask
}

/// `mean over the cells of mask of ||features - reference||_2` (over channels), or `None` when
/// no cell counts (DAFormer's mean of nothing is NaN, which it leaves out). `reference` carries no
/// gradient. The squared norm is kept above 1e-30 before its root, so that a cell where the two
/// agree exactly (the first iteration from the reference's weights) has gradient 0 as in
/// PyTorch's norm rather than NaN.
pub fn feature_distance(
    features: Tensor<4>,
    reference: Tensor<4>,
    mask: &[bool],
) -> Option<Tensor<1>> {
    let count = mask.iter().filter(|&&m| m).count();
    if count == 0 {
        return None;
    }
    let [n, _, fh, fw] = features.dims();
    let device = features.device();
    let diff = features - reference;
    let norm = (diff.clone() * diff).sum_dim(1).clamp_min(1e-30).sqrt();
    let mask: Vec<f32> = mask.iter().map(|&m| f32::from(u8::from(m))).collect();
    let mask: Tensor<4> = Tensor::from_data(TensorData::new(mask, [n, 1, fh, fw]), &device);
    Some((norm * mask).sum().div_scalar(count as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_follow_the_majority_label() {
        // One 4x4 image, 2x2 features of 2x2 pixels: things (class 1) in the top-left cell, a
        // 3:1 split in the top-right, ignored pixels in the bottom-left, stuff bottom-right.
        let labels = [
            1, 1, 1, 0, //
            1, 1, 1, 1, //
            255, 255, 0, 0, //
            255, 1, 0, 0,
        ];
        let mask = cell_mask(&labels, [1, 4, 4], [2, 2], 2, &[1], 0.75);
        assert_eq!(mask, vec![true, true, false, false]);
        let strict = cell_mask(&labels, [1, 4, 4], [2, 2], 2, &[1], 0.8);
        assert_eq!(strict, vec![true, false, false, false]);
    }

    #[test]
    fn ceil_mode_features_keep_their_pixels() {
        assert_eq!(cell_side(512, 64), 8);
        assert_eq!(cell_side(512, 65), 8);
        assert_eq!(cell_side(160, 21), 8);
    }
}
