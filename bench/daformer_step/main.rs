//! Times DAFormer's network in training on flex: MiT-B0 with DAFormer's decoder (256 channels,
//! separable ASPP), 19 classes, `--batch` images of `--size` (default 2 x 512x512, DAFormer's
//! crops), AdamW with the decoder at 10x and the LayerNorms without weight decay.
//!
//!     cargo run --release -p dag-train --example daformer_step -- [--warmup 2] [--steps 5]
//!         [--size 512x512] [--batch 2] [--encoder mit_b0] [--mode ce|daformer]
//!         [--network daformer|hrda]
//!
//! `--mode ce` (the default) runs the source cross-entropy step that
//! `bench/daformer_step/daformer_step_torch.py` runs in PyTorch. `--mode daformer` runs
//! DAFormer's whole self-training step (`method: dacs` with DAFormer's switches: EMA teacher,
//! per-batch ClassMix, colour jitter and blur, the feature distance to a frozen copy of the
//! starting network, the source CE over all pixels). Both print the median per-iteration wall
//! time after warm-up and the process's peak resident memory (`VmHWM`).
//!
//! `--network hrda` runs HRDA's network instead (`--size` is then the training crop, 1024x1024
//! in HRDA, with the 512x512 detail crop at scale 1 and the context at 0.5): in `daformer` mode
//! the teacher labels each target crop from nine overlapping detail crops.

use std::sync::atomic::AtomicBool;

use dag_model::{Architecture, DaFormerConfig, HrdaConfig, MitConfig};
use dag_train::rand_core::RngCore;
use dag_train::{
    train, BatchError, Batches, ImageBatch, LabelBatch, Schedule, SourceBatch, TrainConfig,
};

const CLASSES: usize = 19;

struct Random {
    batch: usize,
    size: [usize; 2],
}

impl Random {
    fn images(&self, rng: &mut dyn RngCore) -> ImageBatch {
        let [h, w] = self.size;
        ImageBatch {
            data: (0..self.batch * 3 * h * w)
                .map(|_| (rng.next_u32() % 2000) as f32 / 1000.0 - 1.0)
                .collect(),
            shape: [self.batch, 3, h, w],
        }
    }
}

impl Batches for Random {
    fn source(&mut self, _: usize, rng: &mut dyn RngCore) -> Result<SourceBatch, BatchError> {
        let [h, w] = self.size;
        // Labels in blocks of 32 pixels, so that the feature distance finds pure cells.
        let labels = (0..self.batch * h * w)
            .map(|i| {
                let (y, x) = ((i / w) % h / 32, i % w / 32);
                ((y * 7 + x * 3 + i / (h * w)) % CLASSES) as u8
            })
            .collect();
        Ok(SourceBatch {
            images: self.images(rng),
            labels: LabelBatch {
                data: labels,
                shape: [self.batch, h, w],
            },
        })
    }
    fn target(&mut self, _: usize, rng: &mut dyn RngCore) -> Result<ImageBatch, BatchError> {
        Ok(self.images(rng))
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The process's peak resident set, from `/proc/self/status`.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn main() {
    let (mut warmup, mut steps, mut batch) = (2, 5, 2);
    let mut size = [512, 512];
    let mut encoder = "mit_b0".to_string();
    let mut mode = "ce".to_string();
    let mut network_name = "daformer".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        let number = |s: &str| -> usize { s.parse().unwrap_or_else(|_| panic!("{a}: {s}")) };
        match a.as_str() {
            "--warmup" => warmup = number(&v),
            "--steps" => steps = number(&v),
            "--batch" => batch = number(&v),
            "--size" => {
                let (h, w) = v.split_once('x').expect("--size HxW");
                size = [number(h), number(w)];
            }
            "--encoder" => encoder = v.clone(),
            "--mode" => mode = v.clone(),
            "--network" => network_name = v.clone(),
            _ => panic!(
                "unknown option {a}; use --warmup N --steps N --batch N --size HxW \
                 --encoder mit_bN --mode ce|daformer --network daformer|hrda"
            ),
        }
    }
    let daformer = DaFormerConfig::new(MitConfig::from_name(&encoder).expect("encoder"), CLASSES);
    let network = match network_name.as_str() {
        "daformer" => Architecture::DaFormer(daformer),
        "hrda" => Architecture::Hrda(HrdaConfig::new(daformer)),
        other => panic!("unknown --network {other}; use daformer or hrda"),
    };
    let mut config = TrainConfig {
        method: if mode == "ce" { "source_only" } else { "dacs" }.into(),
        schedule: Schedule {
            iters: warmup + steps,
            checkpoint_every: 0,
            optimizer: "adamw".into(),
            lr: 6e-5,
            head_lr_mult: 10.0,
            weight_decay: 0.01,
            ..Schedule::default()
        },
        ..TrainConfig::default()
    };
    match mode.as_str() {
        "ce" => {}
        "daformer" => {
            config.schedule.lambda_fd = 0.005;
            config.schedule.fd_min_ratio = 0.75;
            config = config
                .with_param("class_mix", "per_batch")
                .with_param("ema_timing", "daformer")
                .with_param("ema_alpha", 0.999)
                .with_param("jitter_strength", 0.2)
                // The augmentation runs every step so that each step does the same work.
                .with_param("jitter_p", 1.0)
                .with_param("blur_p", 1.0)
                .with_param("source_ce_over", "all");
        }
        other => panic!("unknown --mode {other}; use ce or daformer"),
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let [h, w] = size;
    println!(
        "dag-flex: {network_name} {encoder}, {CLASSES} classes, {batch} x {h}x{w}, {mode} step, \
         {threads} threads, median of {steps} after {warmup} warm-up"
    );
    let device = burn::tensor::Device::flex();
    let model = network.init(&device).expect("valid config");
    let dir = tempfile::tempdir().expect("temp dir");
    let out = train(
        &config,
        model,
        &device,
        &mut Random { batch, size },
        dir.path(),
        &mut |_| {},
        &AtomicBool::new(false),
    )
    .expect("training runs");
    let step = median(out.log[warmup..].iter().map(|l| l.seconds).collect());
    println!("dag-flex {network_name}_{mode}_step_ms {:.1}", step * 1e3);
    if let Some(peak) = peak_rss_mib() {
        println!("dag-flex {network_name}_{mode}_peak_rss_mib {peak:.0}");
    }
}
