//! The randomness of stochastic layers (dropout, stochastic depth) in training.
//!
//! Masks are drawn on the host from the caller's generator rather than from the backend's RNG:
//! Burn keeps one RNG per backend for the whole process, which concurrent trainings would share
//! (their draws interleaving by timing) and which a checkpoint cannot save. Drawn from the
//! training loop's own seeded generator, the masks are a function of the run's seed and
//! iteration, and a resumed run draws what the uninterrupted run drew.

use rand_core::RngCore;

/// Where a forward pass draws its dropout and stochastic-depth masks from: nowhere (inference,
/// teachers: every unit kept) or a generator (training).
pub struct Noise<'a>(Option<&'a mut dyn RngCore>);

impl<'a> Noise<'a> {
    /// No randomness: stochastic layers pass their input through.
    pub fn none() -> Self {
        Self(None)
    }

    /// Masks drawn from `rng`.
    pub fn from_rng(rng: &'a mut dyn RngCore) -> Self {
        Self(Some(rng))
    }

    /// A uniform draw from `0..n` (`n >= 1`); 0 without a generator.
    pub fn below(&mut self, n: usize) -> usize {
        match self.0.as_mut() {
            Some(rng) => {
                let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                ((u * n as f64) as usize).min(n.saturating_sub(1))
            }
            None => 0,
        }
    }

    /// `n` multipliers that keep a unit with probability `1 - p` (as `1 / (1 - p)`) and drop it
    /// otherwise (as 0); `None` without a generator or when `p` is 0.
    pub(crate) fn keep_mask(&mut self, n: usize, p: f64) -> Option<Vec<f32>> {
        let rng = self.0.as_mut()?;
        if p == 0.0 {
            return None;
        }
        let keep = 1.0 - p;
        let scale = (1.0 / keep) as f32;
        Some(
            (0..n)
                .map(|_| {
                    // 53 random bits as a uniform draw in [0, 1).
                    let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                    if u < keep {
                        scale
                    } else {
                        0.0
                    }
                })
                .collect(),
        )
    }
}
