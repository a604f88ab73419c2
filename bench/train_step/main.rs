//! Times one training step of the DeepLabV2-small benchmark configuration on flex (or, with
//! `--device tch` in a build with the `tch` feature, on LibTorch's CPU backend):
//! ResNet-18-like depth (`[2,2,2,2]` bottlenecks, depth 26), width 0.25, 19 classes, batch
//! 1 source + 1 target at 256x128 (W x H), ADVENT's optimisers and lambdas.
//!
//!     cargo run --release -p dag-train --example train_step -- [--warmup 3] [--steps 10]
//!         [--device flex|tch]
//!
//! Runs the real training loop (`dag_train::train`) for source-only (the CE step), AdvEnt and
//! DACS (mean teacher, ClassMix, colour jitter and blur on every step, no aux head), and prints
//! the median per-iteration wall time of the steps after warm-up, plus a forward-only time. `bench/train_step.sh` runs this and the PyTorch twin side by side.

use std::sync::atomic::AtomicBool;
use std::time::Instant;

use burn::module::Module;
use burn::tensor::{Device, Distribution, Tensor};
use dag_model::DeepLabV2Config;
use dag_train::rand_core::RngCore;
use dag_train::{
    device_for, resolve_device, train, BatchError, Batches, ImageBatch, LabelBatch, Schedule,
    SourceBatch, TrainConfig,
};

const W: usize = 256;
const H: usize = 128;
const CLASSES: usize = 19;

struct Random;

fn image(rng: &mut dyn RngCore) -> Vec<f32> {
    (0..3 * H * W)
        .map(|_| (rng.next_u32() % 2000) as f32 / 20.0 - 50.0)
        .collect()
}

impl Batches for Random {
    fn source(&mut self, _: usize, rng: &mut dyn RngCore) -> Result<SourceBatch, BatchError> {
        let labels = (0..H * W)
            .map(|_| match rng.next_u32() % 21 {
                20 => 255,
                c => c.min(18) as u8,
            })
            .collect();
        Ok(SourceBatch {
            images: ImageBatch {
                data: image(rng),
                shape: [1, 3, H, W],
            },
            labels: LabelBatch {
                data: labels,
                shape: [1, H, W],
            },
        })
    }
    fn target(&mut self, _: usize, rng: &mut dyn RngCore) -> Result<ImageBatch, BatchError> {
        Ok(ImageBatch {
            data: image(rng),
            shape: [1, 3, H, W],
        })
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

fn model_config() -> DeepLabV2Config {
    DeepLabV2Config::new(26, CLASSES)
        .expect("depth 26 exists")
        .with_width(0.25)
}

fn time_loop(device: &Device, method: &str, warmup: usize, steps: usize) -> f64 {
    let device = device.clone();
    let model = model_config().init(&device).expect("valid config");
    let mut config = TrainConfig {
        method: method.to_string(),
        schedule: Schedule {
            iters: warmup + steps,
            checkpoint_every: 0,
            ..Schedule::default()
        },
        ..TrainConfig::default()
    };
    if method == "dacs" {
        // DACS has no aux head; the augmentation runs every step so that each step does the
        // same work (the reference draws it with p 0.8 and 0.5).
        config.schedule.lambda_seg_aux = 0.0;
        config = config.with_param("jitter_p", 1.0).with_param("blur_p", 1.0);
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let out = train(
        &config,
        model,
        &device,
        &mut Random,
        dir.path(),
        &mut |_| {},
        &AtomicBool::new(false),
    )
    .expect("training runs");
    median(out.log[warmup..].iter().map(|l| l.seconds).collect())
}

fn time_forward(device: &Device, warmup: usize, steps: usize) -> f64 {
    let device = device.clone();
    let model = model_config().init(&device).expect("valid config").valid();
    let x = Tensor::<4>::random([1, 3, H, W], Distribution::Normal(0.0, 50.0), &device);
    let mut times = Vec::new();
    for i in 0..warmup + steps {
        let t = Instant::now();
        let (aux, main) = model.forward(x.clone());
        let _: f32 = (aux.sum() + main.sum()).into_scalar();
        if i >= warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    median(times)
}

fn main() {
    let mut warmup = 3;
    let mut steps = 10;
    let mut device_name = "flex".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        let number = || -> usize { v.parse().unwrap_or_else(|_| panic!("{a} needs a number")) };
        match a.as_str() {
            "--warmup" => warmup = number(),
            "--steps" => steps = number(),
            "--device" => device_name = v.clone(),
            _ => panic!("unknown option {a}; use --warmup N --steps N --device flex|tch"),
        }
    }
    let choice = resolve_device(&device_name).unwrap_or_else(|e| panic!("{e}"));
    let device = device_for(choice);
    let tag = choice.name();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "dag-{tag}: DeepLabV2 depth 26 width 0.25, {CLASSES} classes, 1+1 x {W}x{H}, \
         {threads} threads, median of {steps} after {warmup} warm-up"
    );
    let fwd = time_forward(&device, warmup, steps);
    println!("dag-{tag} forward_ms {:.1}", fwd * 1e3);
    let ce = time_loop(&device, "source_only", warmup, steps);
    println!("dag-{tag} ce_step_ms {:.1}", ce * 1e3);
    let adv = time_loop(&device, "advent", warmup, steps);
    println!("dag-{tag} advent_step_ms {:.1}", adv * 1e3);
    let dacs = time_loop(&device, "dacs", warmup, steps);
    println!("dag-{tag} dacs_step_ms {:.1}", dacs * 1e3);
}
