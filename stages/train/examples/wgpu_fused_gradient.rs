//! Minimal reproduction of a wrong update on WGPU (reported upstream from
//! docs/upstream/fusion-strided-gradient.md): `w - dL/dw` for the weight of a conv with one
//! output channel and an even kernel, used in two passes, reads the gradient at wrong offsets
//! when the fused kernel computes it. Prints the largest error for that case and for controls;
//! exits with 1 when a case is wrong.
//!
//!     cargo run --release --workspace --features wgpu --example wgpu_fused_gradient
//!
//! Only Burn's public API: no dag code is involved.

use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Device, Tensor, TensorData};

/// Largest error of `w - dL/dw` computed on `device` against the same subtraction of the
/// gradient read back to the host, for a `[cout, cin, k, k]` weight applied with stride 2 and
/// padding 1 to `passes` different 4x4 inputs, `L` the sum of all outputs.
fn update_error(device: &Device, [cout, cin, k]: [usize; 3], passes: usize, relayout: bool) -> f32 {
    let ad = device.clone().autodiff();
    let n = cout * cin * k * k;
    let w0: Vec<f32> = (0..n).map(|i| (i % 13) as f32 * 0.01).collect();
    let w =
        Tensor::<4>::from_data(TensorData::new(w0.clone(), [cout, cin, k, k]), &ad).require_grad();
    let mut loss: Option<Tensor<1>> = None;
    for pass in 0..passes {
        let x: Vec<f32> = (0..cin * 16)
            .map(|i| ((i + pass) % 7) as f32 * 0.1 - 0.3)
            .collect();
        let x = Tensor::<4>::from_data(TensorData::new(x, [1, cin, 4, 4]), &ad);
        let y = conv2d(
            x,
            w.clone(),
            None,
            ConvOptions::new([2, 2], [1, 1], [1, 1], 1),
        )
        .sum();
        loss = Some(match loss {
            Some(l) => l + y,
            None => y,
        });
    }
    let grads = loss.expect("at least one pass").backward();
    let mut g = w.grad(&grads).expect("w takes part in the loss");
    if relayout {
        g = g.reshape([n]).reshape([cout, cin, k, k]);
    }
    let updated = (w.inner() - g.clone())
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    let g = g.into_data().try_to_vec::<f32>().unwrap();
    w0.iter()
        .zip(&g)
        .zip(&updated)
        .map(|((w, g), u)| (w - g - u).abs())
        .fold(0.0, f32::max)
}

fn main() -> std::process::ExitCode {
    let device = Device::wgpu(Default::default());
    let mut wrong = false;
    for (shape, passes, relayout) in [
        ([1, 8, 4], 2, false),
        ([1, 8, 2], 2, false),
        ([1, 8, 4], 1, false),
        ([2, 8, 4], 2, false),
        ([1, 8, 3], 2, false),
        ([1, 8, 4], 2, true),
    ] {
        let err = update_error(&device, shape, passes, relayout);
        let [cout, cin, k] = shape;
        println!(
            "weight [{cout}, {cin}, {k}, {k}], {passes} pass(es){}: largest error {err:e}",
            if relayout {
                ", gradient reshaped to 1-D and back"
            } else {
                ""
            }
        );
        wrong |= err > 1e-6;
    }
    device.sync().expect("queued work failed");
    if wrong {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}
