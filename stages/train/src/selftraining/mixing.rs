//! The host-side pieces of mean-teacher self-training: pseudo-labels and their confidence
//! weight, ClassMix, MIC's block masks and the pseudo-label crop. Plain functions on row-major
//! slices, so that each can be checked against an independent NumPy computation on the same
//! inputs and draws (tests/selftraining_reference.py).

use rand_core::RngCore;

use crate::data::Window;
use crate::losses::IGNORE_LABEL;

const IGNORE: u8 = IGNORE_LABEL as u8;

/// A uniform draw in `[0, 1)` with 24 random bits, as an `f32` holds them.
pub fn uniform(rng: &mut dyn RngCore) -> f32 {
    (rng.next_u32() >> 8) as f32 * (1.0 / (1u32 << 24) as f32)
}

/// A uniform draw in `[low, high)`.
pub fn uniform_in(rng: &mut dyn RngCore, low: f32, high: f32) -> f32 {
    low + (high - low) * uniform(rng)
}

/// `k` distinct indices below `n`, uniformly (a partial Fisher-Yates shuffle).
pub fn choose_distinct(rng: &mut dyn RngCore, n: usize, k: usize) -> Vec<usize> {
    let mut pool: Vec<usize> = (0..n).collect();
    for i in 0..k.min(n) {
        let j = i + (rng.next_u64() % (n - i) as u64) as usize;
        pool.swap(i, j);
    }
    pool.truncate(k.min(n));
    pool
}

/// The teacher's pseudo-labels of a batch: per pixel the arg-max class and its softmax
/// probability, `[N, H, W]` row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct PseudoLabels {
    /// Arg-max class per pixel (ties go to the lower class).
    pub labels: Vec<u8>,
    /// The largest softmax probability per pixel.
    pub confidence: Vec<f32>,
}

/// Pseudo-labels of logits `[N, C, H, W]` (row-major `logits`).
pub fn pseudo_labels(logits: &[f32], [n, c, h, w]: [usize; 4]) -> PseudoLabels {
    let plane = h * w;
    let mut labels = vec![0u8; n * plane];
    let mut confidence = vec![0f32; n * plane];
    for img in 0..n {
        let base = img * c * plane;
        for px in 0..plane {
            let at = |k: usize| logits[base + k * plane + px];
            let mut best = 0;
            for k in 1..c {
                if at(k) > at(best) {
                    best = k;
                }
            }
            let max = at(best);
            let sum: f32 = (0..c).map(|k| (at(k) - max).exp()).sum();
            labels[img * plane + px] = best as u8;
            confidence[img * plane + px] = 1.0 / sum;
        }
    }
    PseudoLabels { labels, confidence }
}

/// DACS's pseudo-label weight: the share of the batch's pixels whose confidence is at least
/// `threshold`, one scalar for every target pixel of the batch.
pub fn confidence_weight(confidence: &[f32], threshold: f32) -> f32 {
    if confidence.is_empty() {
        return 0.0;
    }
    let sure = confidence.iter().filter(|&&p| p >= threshold).count();
    sure as f32 / confidence.len() as f32
}

/// Where ClassMix draws the pasted classes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClassChoice {
    /// From the classes of each source image itself (DACS).
    PerImage,
    /// From the classes of the whole source batch, drawn again for each image (DAFormer, HRDA
    /// and MIC; fewer than half of an image's own classes may end up pasted).
    PerBatch,
}

/// The sorted distinct values of `labels`; the ignore label 255 counts as a class, as in both
/// reference implementations.
pub fn distinct_classes(labels: &[u8]) -> Vec<u8> {
    let mut seen = [false; 256];
    for &l in labels {
        seen[usize::from(l)] = true;
    }
    (0..=255u8).filter(|&l| seen[usize::from(l)]).collect()
}

/// The classes ClassMix pastes from each source image of `labels` `[N, H, W]`: half of the
/// candidates (rounded up), chosen without replacement.
pub fn draw_mix_classes(
    labels: &[u8],
    [n, h, w]: [usize; 3],
    choice: ClassChoice,
    rng: &mut dyn RngCore,
) -> Vec<Vec<u8>> {
    let plane = h * w;
    let batch = distinct_classes(&labels[..n * plane]);
    (0..n)
        .map(|img| {
            let candidates = match choice {
                ClassChoice::PerImage => distinct_classes(&labels[img * plane..(img + 1) * plane]),
                ClassChoice::PerBatch => batch.clone(),
            };
            let k = candidates.len().div_ceil(2);
            let mut picked: Vec<u8> = choose_distinct(rng, candidates.len(), k)
                .into_iter()
                .map(|i| candidates[i])
                .collect();
            picked.sort_unstable();
            picked
        })
        .collect()
}

/// The ClassMix mask of one label map: true where the label is one of `classes` (the pixel
/// comes from the source image).
pub fn class_mask(label: &[u8], classes: &[u8]) -> Vec<bool> {
    let mut pick = [false; 256];
    for &c in classes {
        pick[usize::from(c)] = true;
    }
    label.iter().map(|&l| pick[usize::from(l)]).collect()
}

/// `mask * a + (1 - mask) * b` for images `[C, H, W]` and a mask `[H, W]`.
pub fn mix_image(mask: &[bool], a: &[f32], b: &[f32]) -> Vec<f32> {
    let plane = mask.len();
    a.iter()
        .zip(b)
        .enumerate()
        .map(|(i, (&x, &y))| if mask[i % plane] { x } else { y })
        .collect()
}

/// The same mix for label maps (or any per-pixel values).
pub fn mix_pixels<T: Copy>(mask: &[bool], a: &[T], b: &[T]) -> Vec<T> {
    mask.iter()
        .zip(a.iter().zip(b))
        .map(|(&m, (&x, &y))| if m { x } else { y })
        .collect()
}

/// MIC's block mask of one `[h, w]` image: a grid of `round(h / block) x round(w / block)`
/// (halves to even)
/// cells, each kept when its uniform draw exceeds `ratio` (so about `ratio` of the cells are
/// masked), upsampled to `h x w` by nearest neighbour. True = kept.
pub fn block_mask(
    h: usize,
    w: usize,
    block: usize,
    ratio: f32,
    rng: &mut dyn RngCore,
) -> Vec<bool> {
    let [gh, gw] = block_grid(h, w, block);
    let draws: Vec<f32> = (0..gh * gw).map(|_| uniform(rng)).collect();
    block_mask_of(h, w, [gh, gw], &draws, ratio)
}

/// The grid of [`block_mask`]: `[round(h / block), round(w / block)]`, at least one cell.
pub fn block_grid(h: usize, w: usize, block: usize) -> [usize; 2] {
    // Python's `round`, which MIC's code calls: halves go to the even neighbour.
    let round = |x: usize| ((x as f64 / block as f64).round_ties_even() as usize).max(1);
    [round(h), round(w)]
}

/// [`block_mask`] from its uniform draws, one per cell in row-major order.
pub fn block_mask_of(
    h: usize,
    w: usize,
    [gh, gw]: [usize; 2],
    draws: &[f32],
    ratio: f32,
) -> Vec<bool> {
    let cells: Vec<bool> = draws.iter().map(|&u| u > ratio).collect();
    let mut mask = Vec::with_capacity(h * w);
    for y in 0..h {
        // PyTorch's `nearest`: source index floor(dst * in / out).
        let gy = (y * gh / h).min(gh - 1);
        for x in 0..w {
            let gx = (x * gw / w).min(gw - 1);
            mask.push(cells[gy * gw + gx]);
        }
    }
    mask
}

/// Zeroes the weights of the `top` first and `bottom` last rows of each `[h, w]` map of
/// `weights` (DAFormer's pseudo-label crop: the ego car's bonnet and the image's upper border
/// are never trusted).
pub fn crop_weight_rows(weights: &mut [f32], [h, w]: [usize; 2], top: usize, bottom: usize) {
    for map in weights.chunks_mut(h * w) {
        for (y, row) in map.chunks_mut(w).enumerate() {
            if y < top || y + bottom >= h {
                row.fill(0.0);
            }
        }
    }
}

/// Which pixels of cropped (and maybe flipped) target images lie inside HRDA's pseudo-label
/// margins `[top, bottom, left, right]` of the images they came from (`crop_pseudo_margins`:
/// the mask is set on the whole image and then cropped and flipped with it), `[N, h, w]`
/// row-major for crops of `h` x `w`.
pub fn margin_mask(windows: &[Window], [h, w]: [usize; 2], margins: [usize; 4]) -> Vec<bool> {
    let [top, bottom, left, right] = margins;
    let mut mask = Vec::with_capacity(windows.len() * h * w);
    for win in windows {
        let [full_w, full_h] = win.size;
        let [x0, y0] = win.offset;
        for y in 0..h {
            let fy = y0 + y;
            let row_ok = fy >= top && fy + bottom < full_h;
            for x in 0..w {
                let cx = if win.flipped { w - 1 - x } else { x };
                let fx = x0 + cx;
                mask.push(row_ok && fx >= left && fx + right < full_w);
            }
        }
    }
    mask
}

/// Splits a weighted cross-entropy into two masked ones: labels of the pixels whose weight is
/// `weight` (others set to ignore), for the loss `sum_p w_p CE_p / (N H W)` computed as
/// `sum over distinct weights w of w * n_w * mean CE over those pixels / (N H W)`.
pub fn labels_with_weight(labels: &[u8], weights: &[f32], weight: f32) -> (Vec<u8>, usize) {
    let mut count = 0;
    let out = labels
        .iter()
        .zip(weights)
        .map(|(&l, &w)| {
            if w == weight && l != IGNORE {
                count += 1;
                l
            } else {
                IGNORE
            }
        })
        .collect();
    (out, count)
}

#[cfg(test)]
mod tests {
    use rand_chacha::rand_core::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;

    #[test]
    fn pseudo_labels_take_the_argmax_and_its_softmax_probability() {
        // One image, 2 classes, 2 pixels: logits (0, ln 3) and (2, 2).
        let logits = [0.0, 2.0, 3f32.ln(), 2.0];
        let p = pseudo_labels(&logits, [1, 2, 1, 2]);
        assert_eq!(p.labels, vec![1, 0]);
        assert!((p.confidence[0] - 0.75).abs() < 1e-6);
        assert!((p.confidence[1] - 0.5).abs() < 1e-6);
        assert_eq!(confidence_weight(&p.confidence, 0.7), 0.5);
    }

    #[test]
    fn classmix_pastes_half_of_the_classes_rounded_up() {
        let labels = [0u8, 1, 2, 255, 3, 3, 3, 3];
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let per_image = draw_mix_classes(&labels, [2, 2, 2], ClassChoice::PerImage, &mut rng);
        assert_eq!(per_image[0].len(), 2, "4 candidates, 255 among them");
        assert_eq!(per_image[1], vec![3]);
        let per_batch = draw_mix_classes(&labels, [2, 2, 2], ClassChoice::PerBatch, &mut rng);
        assert!(per_batch.iter().all(|c| c.len() == 3), "5 candidates");
    }

    #[test]
    fn block_masks_keep_about_the_share_asked_for() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let m = block_mask(256, 512, 8, 0.7, &mut rng);
        let kept = m.iter().filter(|&&k| k).count() as f64 / m.len() as f64;
        assert!((kept - 0.3).abs() < 0.03, "{kept}");
    }

    #[test]
    fn margins_follow_the_window_and_the_flip() {
        // A 6x4 image with margins top 1, bottom 1, left 2, right 0; a 3x2 window at (3, 2).
        let win = Window {
            size: [6, 4],
            offset: [3, 2],
            flipped: false,
        };
        let mask = margin_mask(&[win], [2, 3], [1, 1, 2, 0]);
        assert_eq!(mask, vec![true, true, true, false, false, false]);
        let at_left = Window {
            offset: [1, 0],
            flipped: true,
            ..win
        };
        // Rows 0 (top margin) and 1; columns 3, 2, 1 of the image after the flip.
        let mask = margin_mask(&[at_left], [2, 3], [1, 1, 2, 0]);
        assert_eq!(mask, vec![false, false, false, true, true, false]);
        // Two windows, a right margin: a flipped window sees the margins mirrored.
        let plain = Window {
            size: [6, 4],
            offset: [2, 1],
            flipped: false,
        };
        let mirrored = Window {
            offset: [6 - 3 - 2, 1],
            flipped: true,
            ..plain
        };
        let both = margin_mask(&[plain, mirrored], [2, 3], [0, 1, 1, 3]);
        assert_eq!(&both[..6], &[true, false, false, true, false, false]);
        let swapped = margin_mask(&[plain], [2, 3], [0, 1, 3, 1]);
        assert_eq!(&swapped[..3], &[false, true, true]);
        assert_eq!(&both[6..], &swapped[..]);
    }

    #[test]
    fn the_crop_zeroes_the_first_and_last_rows() {
        let mut w = vec![1.0; 2 * 4 * 2];
        crop_weight_rows(&mut w, [4, 2], 1, 2);
        assert_eq!(&w[..8], &[0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
    }
}
