//! Adam on flex as one pass over the values, updating parameters and moments in place where the
//! optimiser holds the only reference, like PyTorch's own Adam; Burn's `Adam` runs a dozen or so
//! separate tensor ops, each with its own buffer (BENCHMARKS.md, "Fused ops on flex"). The same
//! update, element by element in the same order of operations, as Burn's `Adam`.
//!
//! `device: tch` had an in-place LibTorch version (commit 70da5b8) until it turned out to make
//! training there nondeterministic: two identical runs differed by up to 0.3 in the outputs
//! after five AdvEnt iterations (`tests/tch.rs`), as if it sometimes wrote to a storage that
//! LibTorch still held. Burn's `Adam` on tch costs about 10 ms of a 600 ms AdvEnt step.

use burn::tensor::Tensor;
use rayon::prelude::*;

use super::host::{host_values, is_plain_f32, WritableTensor};
use crate::plain::AdamSettings;

/// Elements per parallel task.
const CHUNK: usize = 1 << 15;

/// Whether [`step`] takes these tensors: plain `f32` tensors, all of them.
pub(crate) fn takes(param: &Tensor<1>, grad: &Tensor<1>, moments: &[Tensor<1>; 2]) -> bool {
    [param, grad].into_iter().chain(moments).all(is_plain_f32)
}

/// One Adam step (see [`crate::Kernels::adam_step`]) of tensors that [`takes`] takes.
pub(crate) fn step(
    settings: AdamSettings,
    lr: f64,
    param: Tensor<1>,
    grad: Tensor<1>,
    moments: [Tensor<1>; 2],
    time: usize,
) -> (Tensor<1>, Tensor<1>, Tensor<1>) {
    let g = host_values(&grad).expect("a plain f32 gradient");
    let [moment_1, moment_2] = moments;
    let (mut moment_1, mut moment_2) = (writable(moment_1), writable(moment_2));
    let mut param = writable(param);
    let AdamSettings {
        beta_1: b1,
        beta_2: b2,
        epsilon,
    } = settings;
    let t = (time + 1) as i32;
    let bias_correction_2 = (1.0 - b2.powi(t)).sqrt();
    let factor = bias_correction_2 / (1.0 - b1.powi(t));
    let epsilon = epsilon * bias_correction_2;
    let lr = lr as f32;
    param
        .values_mut()
        .par_chunks_mut(CHUNK)
        .zip(moment_1.values_mut().par_chunks_mut(CHUNK))
        .zip(moment_2.values_mut().par_chunks_mut(CHUNK))
        .zip(g.values().par_chunks(CHUNK))
        .for_each(|(((p, m), v), g)| {
            for (((p, m), v), &g) in p.iter_mut().zip(m).zip(v).zip(g) {
                *m = *m * b1 + g * (1.0 - b1);
                *v = *v * b2 + g * g * (1.0 - b2);
                let update = *m * factor / (v.sqrt() + epsilon);
                *p -= update * lr;
            }
        });
    (
        param.into_tensor(),
        moment_1.into_tensor(),
        moment_2.into_tensor(),
    )
}

fn writable(t: Tensor<1>) -> WritableTensor<1> {
    WritableTensor::new(t).expect("a plain f32 tensor on flex")
}

#[cfg(test)]
mod tests {
    use burn::optim::{AdamConfig, Optimizer};
    use burn::tensor::{Device, Distribution};

    use super::*;
    use crate::Adam;

    const SETTINGS: AdamSettings = AdamSettings {
        beta_1: 0.9,
        beta_2: 0.99,
        epsilon: 1e-8,
    };

    /// dag's `Adam` on flex against Burn's `Adam` over four steps, parameters and both
    /// moments, starting from a tensor that is still held elsewhere.
    #[test]
    fn flex_matches_burn_adam_without_touching_shared_tensors() {
        let device = Device::flex();
        let ours = Adam(SETTINGS);
        let burn = AdamConfig::new()
            .with_beta_1(SETTINGS.beta_1)
            .with_beta_2(SETTINGS.beta_2)
            .with_epsilon(SETTINGS.epsilon)
            .build();
        let start = Tensor::<2>::random([7, 5], Distribution::Normal(0.0, 1.0), &device);
        let kept = start.clone().into_data();
        let (mut a, mut b) = (start.clone(), start.clone());
        let (mut state_a, mut state_b) = (None, None);
        for i in 0..4 {
            let grad = Tensor::<2>::random([7, 5], Distribution::Normal(0.0, 1.0), &device);
            (a, state_a) = ours.step(1e-2, a, grad.clone(), state_a);
            (b, state_b) = burn.step(1e-2, b, grad, state_b);
            let diff: f32 = (a.clone() - b.clone()).abs().max().into_scalar();
            assert!(diff < 1e-6, "parameters after step {i} differ by {diff}");
            let (sa, sb) = (
                &state_a.as_ref().unwrap().momentum,
                &state_b.as_ref().unwrap().momentum,
            );
            assert_eq!(sa.time, sb.time);
            for (x, y) in [(&sa.moment_1, &sb.moment_1), (&sa.moment_2, &sb.moment_2)] {
                let diff: f32 = (x.clone() - y.clone()).abs().max().into_scalar();
                assert!(diff < 1e-6, "moments after step {i} differ by {diff}");
            }
        }
        // `start` was still held while the first step ran: it must not have been updated.
        assert_eq!(start.into_data(), kept);
    }

    #[test]
    fn flex_updates_an_unshared_parameter_in_place() {
        let device = Device::flex();
        let param = Tensor::<1>::from_floats([1.0, 2.0, 3.0], &device);
        let grad = Tensor::<1>::from_floats([0.5, -0.5, 0.0], &device);
        let address = host_values(&param).unwrap().values().as_ptr();
        let (param, _) = Adam(SETTINGS).step(0.1, param, grad, None);
        assert_eq!(host_values(&param).unwrap().values().as_ptr(), address);
        // Step 1 of Adam moves each parameter by lr * sign(g) (to within epsilon).
        let values = param.into_data().try_to_vec::<f32>().unwrap();
        for (got, want) in values.iter().zip([0.9, 2.1, 3.0]) {
            assert!((got - want).abs() < 1e-6, "{values:?}");
        }
    }
}
