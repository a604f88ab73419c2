//! Training on WGPU (Mesa's lavapipe in CI) against flex. With the `wgpu` feature on, a machine
//! without any adapter fails this test rather than skipping it.
#![cfg(feature = "wgpu")]

use burn::tensor::{Device, DeviceType, Tensor};
use dag_model::{load_record_into, save_record, DeepLabV2, DeepLabV2Config, Discriminator};
use dag_train::{
    device_for, resolve_device, wait_for_device_work, DeviceKind, TrainConfig, TrainOutcome,
};

mod stripes;
use stripes::{advent_config, train_advent, train_stripes};

/// Largest relative difference allowed between a loss term on WGPU and on flex.
///
/// Both compute in f32 (unit roundoff 6e-8) but sum in other orders: flex through im2col GEMMs
/// and fused kernels, WGPU through CubeCL's tiled matmuls and fused reductions. A sum of n terms
/// moves by about sqrt(n) roundoffs when its order changes; the longest reductions here are the
/// mean over the 1,024 pixels of a 32x32 map and convs of up to 288 products, chained through
/// about a dozen layers. Measured on lavapipe: at most 2.1e-7 (RELIABILITY.md, "GPU"), so the
/// margin is fifty, for other CPUs' vector widths.
const LOSS_TOLERANCE: f64 = 1e-5;

/// Largest relative L2 distance between a parameter's gradient on WGPU and on flex.
///
/// A gradient sums over every pixel of every later layer, and the discriminators' sum the
/// source and target passes, which nearly cancel at initialisation (both see logits near 0):
/// measured at most 4.5e-6 for the network's and 9.1e-5 for the discriminators', so the margin
/// is eleven. Kernels that go wrong are far above it: the fused update that misread the last
/// discriminator conv's gradient put it 87 norms away, and a LeakyReLU slope of 0.19 instead of
/// 0.2 in the discriminator's WGPU path 1.3e-2.
const GRADIENT_TOLERANCE: f64 = 1e-3;

#[test]
fn advent_on_wgpu_matches_flex() {
    compare_with_flex();
    // Every tensor of the test is gone; the process may end only once WGPU has run what their
    // drops queued (see `wait_for_device_work`).
    wait_for_device_work().unwrap();
}

/// The first AdvEnt step on WGPU and on flex from the same weights and batch: the same losses
/// and gradients. Then two steps on WGPU with a checkpoint between them.
fn compare_with_flex() {
    assert!(
        !Device::enumerate(DeviceType::Wgpu).is_empty(),
        "the wgpu feature is on but no adapter was found (install mesa-vulkan-drivers)"
    );
    assert_eq!(resolve_device("wgpu"), Ok(DeviceKind::Wgpu));
    let wgpu = device_for(DeviceKind::Wgpu);
    let flex = Device::flex();
    let arch = DeepLabV2Config {
        blocks: [1, 1, 1, 1],
        width: 0.0625,
        classes: 3,
        classifier_dilations: dag_model::deeplab::CLASSIFIER_DILATIONS.to_vec(),
        input: dag_model::InputConvention::CaffeBgr,
        resnet: dag_model::ResNetStyle::Caffe,
    };
    // One set of starting weights for both devices: drawn on flex, written once, read onto each.
    let dir = tempfile::tempdir().unwrap();
    let start_path = dir.path().join("start.bpk");
    flex.seed(5);
    save_record(arch.init(&flex).unwrap(), &start_path).unwrap();
    let start_on = |device: &Device| -> DeepLabV2 {
        load_record_into(arch.init(device).unwrap(), &start_path).unwrap()
    };

    // One step, with rates large enough that each update stands far above the f32 rounding of
    // the weights it is read from. Adam's first step is `lr_d * g / (|g| + epsilon)` whatever
    // the betas; an epsilon of 1 keeps it proportional enough to `g` that it can be inverted.
    let mut config = advent_config(1)
        .with_param("lr_d", 1000.0)
        .with_param("adam_epsilon", 1.0);
    config.schedule.lr = 0.5;
    let run = |config: &TrainConfig, device: &Device, name: &str| {
        train_stripes(config, device, start_on(device), 32, &dir.path().join(name))
    };
    // Rates of zero leave every weight where it started.
    let mut frozen = config.clone().with_param("lr_d", 0.0);
    frozen.schedule.lr = 0.0;
    let start = run(&frozen, &flex, "start");
    let on_flex = run(&config, &flex, "flex");
    let on_wgpu = run(&config, &wgpu, "wgpu");

    let (w, f) = (&on_wgpu.log[0], &on_flex.log[0]);
    let names: Vec<&str> = f.terms.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["seg_main", "seg_aux", "adv_main", "adv_aux", "d_main", "d_aux"]
    );
    assert_eq!(w.terms.len(), names.len());
    for ((name, x), (_, y)) in w.terms.iter().zip(&f.terms) {
        let (x, y) = (*x, *y);
        let rel = (x - y).abs() / y.abs().max(1.0);
        eprintln!("{name}: wgpu {x} flex {y} relative difference {rel:.1e}");
        assert!(rel <= LOSS_TOLERANCE, "{name}: wgpu {x} vs flex {y}");
    }

    let sgd = |lr: f64| Step::Sgd {
        lr,
        weight_decay: config.schedule.weight_decay,
    };
    let adversarial = config.adversarial().unwrap().unwrap();
    let adam = Step::Adam {
        lr: adversarial.lr_d,
        epsilon: adversarial.adam_epsilon,
    };
    let head_lr = config.schedule.lr * config.schedule.head_lr_mult;
    type Weight = fn(&TrainOutcome) -> Tensor<4>;
    let params: [(&str, Step, Weight); 8] = [
        ("backbone.conv1", sgd(config.schedule.lr), |o| {
            o.model.deeplab().unwrap().backbone.conv1.weight.val()
        }),
        ("backbone.layer4.0.conv2", sgd(config.schedule.lr), |o| {
            o.model.deeplab().unwrap().backbone.layer4[0]
                .conv2
                .weight
                .val()
        }),
        ("layer5 (aux head)", sgd(head_lr), |o| {
            o.model.deeplab().unwrap().layer5.conv2d_list[0]
                .weight
                .val()
        }),
        ("layer6 (main head)", sgd(head_lr), |o| {
            o.model.deeplab().unwrap().layer6.conv2d_list[0]
                .weight
                .val()
        }),
        ("d_main.0", adam, |o| discriminator(&o.d_main, 0)),
        ("d_main.4", adam, |o| discriminator(&o.d_main, 4)),
        ("d_aux.0", adam, |o| discriminator(&o.d_aux, 0)),
        ("d_aux.4", adam, |o| discriminator(&o.d_aux, 4)),
    ];
    for (name, step, weight) in params {
        let w0 = values(weight(&start));
        let g_flex = step.gradient(&w0, &values(weight(&on_flex)));
        let g_wgpu = step.gradient(&w0, &values(weight(&on_wgpu)));
        let norm = g_flex.iter().map(|g| g * g).sum::<f64>().sqrt();
        assert!(norm > 0.0, "{name}: no gradient on flex");
        let dist = g_flex
            .iter()
            .zip(&g_wgpu)
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f64>()
            .sqrt();
        let rel = dist / norm;
        eprintln!("{name}: gradient norm {norm:.3e}, relative distance {rel:.1e}");
        assert!(
            rel <= GRADIENT_TOLERANCE,
            "{name}: gradient on wgpu is {rel:.1e} (relative L2) from flex's"
        );
    }

    let out = train_advent(&wgpu, start_on(&wgpu), 2, 32);
    assert_eq!(out.log.len(), 2);
    assert!(out.log[1].terms.iter().all(|(_, v)| v.is_finite()));
}

/// A weight tensor's values, in f64.
fn values(t: Tensor<4>) -> Vec<f64> {
    t.into_data()
        .try_to_vec::<f32>()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect()
}

/// The weight of conv `i` of a discriminator.
fn discriminator(d: &Option<Discriminator>, i: usize) -> Tensor<4> {
    d.as_ref().expect("AdvEnt trains both discriminators").convs[i]
        .weight
        .val()
}

/// An optimiser's first step, which moved `w0` to `w1`.
#[derive(Clone, Copy)]
enum Step {
    /// `w1 = w0 - lr * (g + weight_decay * w0)` (momentum has no history yet).
    Sgd { lr: f64, weight_decay: f64 },
    /// `w1 = w0 - lr * g / (|g| + epsilon)` (Adam's bias-corrected moments are `g` and `g^2`).
    Adam { lr: f64, epsilon: f64 },
}

impl Step {
    /// The gradient `g` of each weight.
    fn gradient(self, w0: &[f64], w1: &[f64]) -> Vec<f64> {
        w0.iter()
            .zip(w1)
            .map(|(a, b)| match self {
                Step::Sgd { lr, weight_decay } => (a - b) / lr - weight_decay * a,
                Step::Adam { lr, epsilon } => {
                    let r = (a - b) / lr;
                    r * epsilon / (1.0 - r.abs())
                }
            })
            .collect()
    }
}
