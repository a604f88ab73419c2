//! For the backend tests (wgpu, tch): batches of `size` x `size` source images of three vertical
//! stripes with their labels and target images of noise, and a short AdvEnt run on them.

use std::path::Path;
use std::sync::atomic::AtomicBool;

use burn::tensor::Device;
use dag_model::DeepLabV2;
use dag_train::rand_core::RngCore;
use dag_train::{
    train, BatchError, Batches, ImageBatch, LabelBatch, Schedule, SourceBatch, TrainConfig,
    TrainOutcome,
};

/// The AdvEnt configuration of the backend tests: `iterations` steps at learning rate 0.01 with
/// narrow discriminators and a checkpoint after each step.
pub fn advent_config(iters: usize) -> TrainConfig {
    TrainConfig {
        method: "advent".into(),
        schedule: Schedule {
            iters,
            lr: 0.01,
            checkpoint_every: 1,
            ..Schedule::default()
        },
        seed: 1234,
        ..TrainConfig::default()
    }
    .with_param("disc_ndf", 4)
}

/// `iterations` AdvEnt steps of `model` on `device` over [`Stripes`] of `size`, with a
/// checkpoint after each but the last; asserts that a checkpoint was written.
pub fn train_advent(
    device: &Device,
    model: DeepLabV2,
    iterations: usize,
    size: usize,
) -> TrainOutcome {
    let dir = tempfile::tempdir().unwrap();
    let out = train_stripes(&advent_config(iterations), device, model, size, dir.path());
    if iterations > 1 {
        assert!(dir.path().join("checkpoint/model.bpk").is_file());
    }
    out
}

/// Trains `model` on `device` with `config` over [`Stripes`] of `size`, checkpoints in `dir`.
pub fn train_stripes(
    config: &TrainConfig,
    device: &Device,
    model: DeepLabV2,
    size: usize,
    dir: &Path,
) -> TrainOutcome {
    train(
        config,
        model,
        device,
        &mut Stripes { size },
        dir,
        &mut |_| {},
        &AtomicBool::new(false),
    )
    .unwrap()
}

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
