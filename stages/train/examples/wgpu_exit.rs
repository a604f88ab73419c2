//! Minimal reproduction of a crash at process exit on WGPU (reported upstream from
//! docs/upstream/wgpu-exit-race.md): a program that returns from `main` while the device's
//! runner thread still executes queued work dies in the Vulkan driver's exit handlers. With
//! Mesa's lavapipe and a cold shader cache the queue thread is compiling kernels with LLVM when
//! `exit` destroys lavapipe's threads and LLVM's globals.
//!
//!     cargo build --release --workspace --features wgpu --example wgpu_exit
//!     XDG_CACHE_HOME=$(mktemp -d) target/release/examples/wgpu_exit --no-wait   # crashes often
//!     XDG_CACHE_HOME=$(mktemp -d) target/release/examples/wgpu_exit              # never
//!
//! Only Burn's public API: no dag code is involved.

use burn::tensor::{Device, Distribution, Tensor};

fn main() {
    let wait = !std::env::args().any(|a| a == "--no-wait");
    let device = Device::wgpu(Default::default());
    let x = Tensor::<2>::random([96, 96], Distribution::Default, &device);
    // One read back, so that the device is up before the work that is left queued.
    let first: f32 = x.clone().sum().into_scalar();
    assert!(first.is_finite());
    // Work with kernels this process has not compiled yet, handed to the runner and never read.
    for n in 40..72 {
        let a = Tensor::<2>::random([n, n], Distribution::Default, &device);
        let b = a.clone().matmul(a.clone()).tanh() + a.clone().exp().clamp(0.0, 3.0);
        let c = b.clone().sum_dim(n % 2).expand([n, n]) * b.abs().sqrt();
        drop(c);
    }
    device.flush().expect("queued work failed");
    if wait {
        // What `dag` does before it exits: wait until the runner thread is idle.
        device.sync().expect("queued work failed");
    }
}
