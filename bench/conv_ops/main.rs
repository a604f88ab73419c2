//! Times each kind of convolution of the benchmark model (BENCHMARKS.md, "Training step") on
//! flex through `dag_model::conv::conv_forward`, the path the model takes: the forward pass,
//! the weight gradient and the input gradient, at batch 1.
//!
//!     cargo run --release -p dag-model --example conv_ops -- [--reps 7]
//!
//! Prints one line per conv, `name fwd_ms wgrad_ms xgrad_ms`, medians of `--reps` runs; the
//! gradients are the extra time of a backward pass that computes them. `bench/conv_ops.sh`
//! runs this and its PyTorch twin (`conv_ops_torch.py`) side by side.

use std::time::Instant;

use burn::nn::conv::Conv2dConfig;
use burn::nn::PaddingConfig2d;
use burn::tensor::{Device, Distribution, Tensor};

/// One timed convolution: name, input and output channels, kernel, stride, padding, dilation,
/// input height and width.
type Case = (
    &'static str,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
);

/// The discriminator's five convs on a 256x128 map, then the segmentation network's stem, a
/// layer1 3x3, a dilated layer4 3x3 and one classifier branch (width 0.25, 19 classes).
const CASES: [Case; 9] = [
    ("disc1_19-64_4x4s2", 19, 64, 4, 2, 1, 1, 128, 256),
    ("disc2_64-128_4x4s2", 64, 128, 4, 2, 1, 1, 64, 128),
    ("disc3_128-256_4x4s2", 128, 256, 4, 2, 1, 1, 32, 64),
    ("disc4_256-512_4x4s2", 256, 512, 4, 2, 1, 1, 16, 32),
    ("disc5_512-1_4x4s2", 512, 1, 4, 2, 1, 1, 8, 16),
    ("stem_3-16_7x7s2", 3, 16, 7, 2, 3, 1, 128, 256),
    ("layer1_16-16_3x3", 16, 16, 3, 1, 1, 1, 33, 65),
    ("layer4_128-128_3x3d4", 128, 128, 3, 1, 4, 4, 17, 33),
    ("classifier_512-19_3x3d12", 512, 19, 3, 1, 12, 12, 17, 33),
];

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let mut reps = 7;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--reps" => {
                reps = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--reps takes a count")
            }
            other => panic!("unknown argument {other} (expected --reps N)"),
        }
    }
    let device = Device::flex().autodiff();
    for (name, cin, cout, k, s, p, d, h, w) in CASES {
        let conv = Conv2dConfig::new([cin, cout], [k, k])
            .with_stride([s, s])
            .with_dilation([d, d])
            .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
            .init(&device);
        let x0 = Tensor::<4>::random([1, cin, h, w], Distribution::Normal(0.0, 1.0), &device);
        let (mut forward, mut weight_only, mut both) = (vec![], vec![], vec![]);
        for _ in 0..reps {
            let x = x0.clone().detach();
            let t = Instant::now();
            let y = dag_model::conv::conv_forward(&conv, x.clone());
            let _: f32 = y.sum().into_scalar();
            forward.push(t.elapsed().as_secs_f64() * 1e3);

            let t = Instant::now();
            let grads = dag_model::conv::conv_forward(&conv, x).sum().backward();
            let _: f32 = conv.weight.grad(&grads).unwrap().sum().into_scalar();
            weight_only.push(t.elapsed().as_secs_f64() * 1e3);

            let x = x0.clone().detach().require_grad();
            let t = Instant::now();
            let grads = dag_model::conv::conv_forward(&conv, x.clone())
                .sum()
                .backward();
            let _: f32 = conv.weight.grad(&grads).unwrap().sum().into_scalar();
            let _: f32 = x.grad(&grads).unwrap().sum().into_scalar();
            both.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let (f, wo, b) = (median(forward), median(weight_only), median(both));
        println!("dag-flex {name} {f:.2} {:.2} {:.2}", wo - f, b - wo);
    }
}
