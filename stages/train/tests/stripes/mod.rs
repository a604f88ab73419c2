//! Batches for the backend tests (wgpu, tch): source images of three vertical stripes with their
//! labels, and target images of noise, `size` x `size`.

use dag_train::rand_core::RngCore;
use dag_train::{BatchError, Batches, ImageBatch, LabelBatch, SourceBatch};

pub struct Stripes {
    pub size: usize,
}

impl Batches for Stripes {
    fn source(&mut self, _: usize, rng: &mut dyn RngCore) -> Result<SourceBatch, BatchError> {
        let s = self.size;
        let labels: Vec<u8> = (0..s * s).map(|p| ((p % s) * 3 / s) as u8).collect();
        let data = (0..3 * s * s)
            .map(|i| labels[i % (s * s)] as f32 + (rng.next_u32() % 7) as f32 * 0.1)
            .collect();
        Ok(SourceBatch {
            images: ImageBatch {
                data,
                shape: [1, 3, s, s],
            },
            labels: LabelBatch {
                data: labels,
                shape: [1, s, s],
            },
        })
    }
    fn target(&mut self, _: usize, rng: &mut dyn RngCore) -> Result<ImageBatch, BatchError> {
        let s = self.size;
        let data = (0..3 * s * s)
            .map(|_| (rng.next_u32() % 100) as f32 / 50.0)
            .collect();
        Ok(ImageBatch {
            data,
            shape: [1, 3, s, s],
        })
    }
}
