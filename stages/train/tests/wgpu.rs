//! A few training steps on WGPU (Mesa's lavapipe in CI). With the `wgpu` feature on, a machine
//! without any adapter fails this test rather than skipping it.
#![cfg(feature = "wgpu")]

use burn::tensor::{Device, DeviceType};
use dag_model::DeepLabV2Config;
use dag_train::{device_for, resolve_device, DeviceChoice};

mod stripes;

#[test]
fn advent_steps_run_on_wgpu() {
    assert!(
        !Device::enumerate(DeviceType::Wgpu).is_empty(),
        "the wgpu feature is on but no adapter was found (install mesa-vulkan-drivers)"
    );
    assert_eq!(resolve_device("wgpu"), Ok(DeviceChoice::Wgpu));
    let device = device_for(DeviceChoice::Wgpu);
    let model = DeepLabV2Config {
        blocks: [1, 1, 1, 1],
        width: 0.0625,
        classes: 3,
    }
    .init(&device)
    .unwrap();
    let out = stripes::train_advent(&device, model, 2, 32);
    assert_eq!(out.log.len(), 2);
    for l in &out.log {
        assert!(l.adv_main.is_some() && l.d_aux.is_some());
        assert!(l.terms().iter().all(|(_, v)| v.is_finite()));
    }
}
