//! DAFormer's rare class sampling (Hoyer et al., CVPR 2022, `mmseg/datasets/uda_dataset.py`):
//! source images are drawn so that rare classes come up more often. A class `c` is drawn with
//! `P(c) = softmax((1 - f_c) / T)` over the classes present, `f_c` being its share of all
//! labelled pixels, then an image uniformly among those holding more than `min_pixels` of it.

use rand::RngCore;

/// A rare-class sampler over a dataset's per-image class pixel counts.
#[derive(Debug, Clone, PartialEq)]
pub struct RareClassSampler {
    /// The classes that can be drawn (present in some eligible image), ascending.
    pub classes: Vec<u8>,
    /// Their probabilities, in the order of `classes`.
    pub probabilities: Vec<f64>,
    /// For each class of `classes`, the images (indices into the counts given) that hold more
    /// than `min_pixels` of it.
    pub images: Vec<Vec<usize>>,
}

impl RareClassSampler {
    /// From per-image `(class, pixels)` counts at full resolution (the reference counts the
    /// original labels), the temperature `T` and the least pixels an image must hold of a class
    /// to be drawn for it. The ignore label 255 is never drawn. A class that no image holds
    /// enough of is left out and the others' probabilities renormalised (DAFormer asserts
    /// instead; at its 3000 pixels every GTA5 class has images).
    pub fn new(
        counts: &[Vec<(u8, f64)>],
        temperature: f64,
        min_pixels: f64,
    ) -> Result<Self, String> {
        if temperature <= 0.0 {
            return Err(format!(
                "the temperature must be positive, got {temperature}"
            ));
        }
        let mut totals = [0f64; 255];
        let mut images: Vec<Vec<usize>> = vec![Vec::new(); 255];
        for (i, image) in counts.iter().enumerate() {
            for &(class, pixels) in image {
                if class == 255 {
                    continue;
                }
                totals[usize::from(class)] += pixels;
                if pixels > min_pixels {
                    images[usize::from(class)].push(i);
                }
            }
        }
        let all: f64 = totals.iter().sum();
        let classes: Vec<u8> = (0..255u8)
            .filter(|&c| totals[usize::from(c)] > 0.0 && !images[usize::from(c)].is_empty())
            .collect();
        if all == 0.0 {
            return Err("the class statistics count no labelled pixel".into());
        }
        if classes.is_empty() {
            return Err(format!(
                "no image holds more than {min_pixels} pixels of any class; lower `rcs_min_pixels`"
            ));
        }
        let logits: Vec<f64> = classes
            .iter()
            .map(|&c| (1.0 - totals[usize::from(c)] / all) / temperature)
            .collect();
        let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let exp: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
        let sum: f64 = exp.iter().sum();
        Ok(Self {
            probabilities: exp.iter().map(|e| e / sum).collect(),
            images: classes
                .iter()
                .map(|&c| images[usize::from(c)].clone())
                .collect(),
            classes,
        })
    }

    /// Draws a class, then one of its images: `(class, image index)`.
    pub fn draw(&self, rng: &mut dyn RngCore) -> (u8, usize) {
        let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let mut k = self.probabilities.len() - 1;
        let mut acc = 0.0;
        for (i, p) in self.probabilities.iter().enumerate() {
            acc += p;
            if u < acc {
                k = i;
                break;
            }
        }
        let images = &self.images[k];
        let image = images[(rng.next_u64() % images.len() as u64) as usize];
        (self.classes[k], image)
    }
}

#[cfg(test)]
mod tests {
    use rand_chacha::rand_core::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;

    #[test]
    fn rare_classes_come_up_more_often_than_their_share() {
        // Class 0 fills almost everything, class 1 is rare, class 2 never has enough pixels.
        let counts = vec![
            vec![(0, 9000.0), (1, 200.0), (255, 50.0)],
            vec![(0, 9000.0), (2, 10.0)],
            vec![(0, 8000.0), (1, 1000.0)],
        ];
        let rcs = RareClassSampler::new(&counts, 0.01, 100.0).unwrap();
        assert_eq!(rcs.classes, vec![0, 1]);
        assert_eq!(rcs.images, vec![vec![0, 1, 2], vec![0, 2]]);
        assert!(rcs.probabilities[1] > 0.99, "{:?}", rcs.probabilities);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let rare = (0..1000).filter(|_| rcs.draw(&mut rng).0 == 1).count();
        assert!(rare > 980, "{rare}");
        assert!(RareClassSampler::new(&counts, 0.01, 1e9).is_err());
    }
}
