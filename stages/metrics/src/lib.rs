//! Confusion matrices, per-class IoU and the mIoU protocols of the UDA segmentation papers.
//!
//! The conventions are ADVENT's evaluation: a histogram over pixels whose ground truth is a valid
//! class (`0 <= gt < n`; 255 and anything else outside is ignored), `IoU_c = tp / (tp + fp + fn)`
//! which is `diag / (row + col - diag)`, and mIoU as the mean over classes that are defined
//! (a class with no ground truth and no prediction has an undefined IoU and is left out, as
//! NumPy's `nanmean` does), times 100.

pub mod ranking;

use thiserror::Error;

/// Errors of metric computation.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum MetricsError {
    #[error(
        "prediction has {pred} pixels but the ground truth has {gt}; they must be the same size"
    )]
    SizeMismatch { gt: usize, pred: usize },
    #[error("confusion matrices of {left} and {right} classes cannot be merged")]
    ClassMismatch { left: usize, right: usize },
    #[error("class index {index} is outside the {classes}-class protocol")]
    ClassOutOfRange { index: usize, classes: usize },
}

/// Indices (in the 16-class SYNTHIA protocol) of the 13 classes of the `mIoU*` protocol:
/// wall, fence and pole are dropped.
pub const SYNTHIA_13_OF_16: [usize; 13] = [0, 1, 2, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];

/// A `classes x classes` confusion matrix: `count(gt = r, pred = c)` at row `r`, column `c`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfusionMatrix {
    classes: usize,
    counts: Vec<u64>,
}

impl ConfusionMatrix {
    pub fn new(classes: usize) -> Self {
        Self {
            classes,
            counts: vec![0; classes * classes],
        }
    }

    pub fn classes(&self) -> usize {
        self.classes
    }

    /// Adds one image. Pixels whose ground truth is not a class (e.g. 255) are ignored; a
    /// prediction outside the classes is an error, since no argmax over `classes` outputs can
    /// produce one.
    pub fn add(&mut self, gt: &[u8], pred: &[u8]) -> Result<(), MetricsError> {
        if gt.len() != pred.len() {
            return Err(MetricsError::SizeMismatch {
                gt: gt.len(),
                pred: pred.len(),
            });
        }
        let n = self.classes;
        for (&g, &p) in gt.iter().zip(pred) {
            let (g, p) = (g as usize, p as usize);
            if g >= n {
                continue;
            }
            if p >= n {
                return Err(MetricsError::ClassOutOfRange {
                    index: p,
                    classes: n,
                });
            }
            self.counts[g * n + p] += 1;
        }
        Ok(())
    }

    /// Adds every count of `other`.
    pub fn merge(&mut self, other: &ConfusionMatrix) -> Result<(), MetricsError> {
        if other.classes != self.classes {
            return Err(MetricsError::ClassMismatch {
                left: self.classes,
                right: other.classes,
            });
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        Ok(())
    }

    /// `count(gt = row, pred = col)`.
    pub fn get(&self, row: usize, col: usize) -> u64 {
        self.counts[row * self.classes + col]
    }

    /// Pixels whose ground truth is `class`.
    pub fn gt_pixels(&self, class: usize) -> u64 {
        self.counts[class * self.classes..(class + 1) * self.classes]
            .iter()
            .sum()
    }

    /// Pixels predicted as `class` (among valid ground-truth pixels).
    pub fn pred_pixels(&self, class: usize) -> u64 {
        (0..self.classes).map(|r| self.get(r, class)).sum()
    }

    /// True positives, false positives and false negatives of each class.
    pub fn per_class(&self) -> Vec<ClassCounts> {
        (0..self.classes)
            .map(|c| {
                let tp = self.get(c, c);
                ClassCounts {
                    tp,
                    fp: self.pred_pixels(c) - tp,
                    fn_: self.gt_pixels(c) - tp,
                }
            })
            .collect()
    }

    /// IoU of each class in [0, 1]; `None` where the class has neither ground truth nor
    /// predictions.
    pub fn iou(&self) -> Vec<Option<f64>> {
        self.per_class().iter().map(ClassCounts::iou).collect()
    }

    /// Mean IoU in percent over the defined classes (NumPy's `nanmean(iou) * 100`); `None` when
    /// no class is defined.
    pub fn miou(&self) -> Option<f64> {
        mean_defined(self.iou().iter().copied())
    }

    /// Mean IoU in percent over a subset of classes (e.g. [`SYNTHIA_13_OF_16`]).
    pub fn miou_of(&self, classes: &[usize]) -> Result<Option<f64>, MetricsError> {
        let iou = self.iou();
        let mut picked = Vec::with_capacity(classes.len());
        for &c in classes {
            let v = iou.get(c).ok_or(MetricsError::ClassOutOfRange {
                index: c,
                classes: self.classes,
            })?;
            picked.push(*v);
        }
        Ok(mean_defined(picked))
    }

    /// Pixel accuracy in percent over valid ground-truth pixels.
    pub fn pixel_accuracy(&self) -> Option<f64> {
        let total: u64 = self.counts.iter().sum();
        let diag: u64 = (0..self.classes).map(|c| self.get(c, c)).sum();
        (total > 0).then(|| diag as f64 / total as f64 * 100.0)
    }
}

/// Counts of one class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClassCounts {
    pub tp: u64,
    pub fp: u64,
    /// False negatives (`fn` is a keyword).
    pub fn_: u64,
}

impl ClassCounts {
    /// `tp / (tp + fp + fn)`, `None` when the denominator is zero.
    pub fn iou(&self) -> Option<f64> {
        let denom = self.tp + self.fp + self.fn_;
        (denom > 0).then(|| self.tp as f64 / denom as f64)
    }
}

fn mean_defined(values: impl IntoIterator<Item = Option<f64>>) -> Option<f64> {
    let (sum, n) = values
        .into_iter()
        .flatten()
        .fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64 * 100.0)
}

/// The papers' conversion of a 19-output mIoU to the 16-class protocol when the three classes
/// absent from SYNTHIA score 0: `mIoU16 = mIoU19 * 19 / 16`.
pub fn miou16_from_miou19(miou19: f64) -> f64 {
    miou19 * 19.0 / 16.0
}

/// Rounds to the two decimals the papers report.
pub fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iou_by_hand() {
        // gt:   0 0 1 1 255
        // pred: 0 1 1 1 0
        let mut cm = ConfusionMatrix::new(3);
        cm.add(&[0, 0, 1, 1, 255], &[0, 1, 1, 1, 0]).unwrap();
        assert_eq!(cm.get(0, 0), 1);
        assert_eq!(cm.get(0, 1), 1);
        assert_eq!(cm.get(1, 1), 2);
        let iou = cm.iou();
        assert_eq!(iou[0], Some(0.5)); // tp 1, fn 1
        assert_eq!(iou[1], Some(2.0 / 3.0)); // tp 2, fp 1
        assert_eq!(iou[2], None); // never present, never predicted
        let expected = (0.5 + 2.0 / 3.0) / 2.0 * 100.0;
        assert!((cm.miou().unwrap() - expected).abs() < 1e-12);
        assert_eq!(cm.pixel_accuracy(), Some(75.0));
    }

    #[test]
    fn absent_but_predicted_class_scores_zero() {
        let mut cm = ConfusionMatrix::new(2);
        cm.add(&[0, 0], &[0, 1]).unwrap();
        assert_eq!(cm.iou(), vec![Some(0.5), Some(0.0)]);
        assert_eq!(cm.miou(), Some(25.0));
    }

    #[test]
    fn errors_name_the_problem() {
        let mut cm = ConfusionMatrix::new(2);
        assert_eq!(
            cm.add(&[0], &[0, 1]),
            Err(MetricsError::SizeMismatch { gt: 1, pred: 2 })
        );
        assert_eq!(
            cm.add(&[0], &[7]),
            Err(MetricsError::ClassOutOfRange {
                index: 7,
                classes: 2
            })
        );
        assert!(cm.merge(&ConfusionMatrix::new(3)).is_err());
    }

    #[test]
    fn subset_protocol_and_merge() {
        let mut a = ConfusionMatrix::new(16);
        let gt: Vec<u8> = (0..16).collect();
        a.add(&gt, &gt).unwrap();
        let mut b = ConfusionMatrix::new(16);
        // wall (3) predicted as road: hurts the 16-class score, not the 13-class one.
        b.add(&[3], &[0]).unwrap();
        a.merge(&b).unwrap();
        let m13 = a.miou_of(&SYNTHIA_13_OF_16).unwrap().unwrap();
        let m16 = a.miou().unwrap();
        assert!(m13 < 100.0 && m13 > m16, "m13 {m13} m16 {m16}");
        assert!((round2(miou16_from_miou19(16.0)) - 19.0).abs() < 1e-12);
    }
}
