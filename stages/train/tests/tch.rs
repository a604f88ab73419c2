//! Training on LibTorch's CPU backend (`device: tch`), in builds with the `tch` feature (not in
//! CI, which has no PyTorch; see bench/libtorch/README.md). The first iteration's segmentation
//! losses must match flex's on the same weights and batch: the two backends compute one model.
#![cfg(feature = "tch")]

use burn::module::Module;
use burn::tensor::Device;
use dag_model::DeepLabV2Config;
use dag_train::{device_for, resolve_device, DeviceChoice};

mod stripes;
use stripes::train_advent;

#[test]
fn advent_steps_on_libtorch_match_flex() {
    assert_eq!(resolve_device("tch"), Ok(DeviceChoice::LibTorch));
    let flex = Device::flex();
    flex.seed(5);
    let model = DeepLabV2Config {
        blocks: [1, 1, 1, 1],
        width: 0.0625,
        classes: 3,
    }
    .init(&flex)
    .unwrap();
    let tch = device_for(DeviceChoice::LibTorch);
    let on_tch = train_advent(&tch, model.clone().to_device(&tch), 3, 64);
    let on_flex = train_advent(&flex, model, 3, 64);
    assert_eq!(on_tch.log.len(), 3);
    for l in &on_tch.log {
        assert!(l.adv_main.is_some() && l.d_aux.is_some());
        assert!(
            l.terms().iter().all(|(_, v)| v.is_finite()),
            "{:?}",
            l.terms()
        );
    }
    let (a, b) = (&on_tch.log[0], &on_flex.log[0]);
    for (name, x, y) in [
        ("seg_main", a.seg_main, b.seg_main),
        ("seg_aux", a.seg_aux, b.seg_aux),
    ] {
        let (x, y) = (x.unwrap(), y.unwrap());
        assert!(
            (x - y).abs() <= 1e-4 * y.abs().max(1.0),
            "{name}: tch {x} vs flex {y}"
        );
    }
}
