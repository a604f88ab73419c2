//! Adam on flex as one pass over the values, updating parameters and moments in place where the
//! optimiser holds the only reference, like PyTorch's own Adam; Burn's `Adam` runs a dozen or so
//! separate tensor ops, each with its own buffer (BENCHMARKS.md, "Fused ops on flex"). Same
//! update and the same state record as Burn's `Adam`, so checkpoints stay interchangeable;
//! parameters on other devices go to Burn's `Adam` unchanged.
//!
//! `device: tch` had an in-place LibTorch version (commit 70da5b8) until it turned out to make
//! training there nondeterministic: two identical runs differed by up to 0.3 in the outputs
//! after five AdvEnt iterations (`tests/tch.rs`), as if it sometimes wrote to a storage that
//! LibTorch still held. Burn's `Adam` on tch costs about 10 ms of a 600 ms AdvEnt step.

use burn::optim::{
    Adam, AdamConfig, AdamState, AdaptiveMomentumState, LearningRate, ModuleOptimizer, Optimizer,
};
use burn::tensor::{Device, Tensor};
use dag_model::flex::{host_values, is_plain_f32, WritableTensor};
use rayon::prelude::*;

/// Elements per parallel task of the flex update.
const CHUNK: usize = 1 << 15;

/// Adam without weight decay or AMSGrad (ADVENT's discriminator optimiser).
#[derive(Clone)]
pub(crate) struct FusedAdam {
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
    elsewhere: Adam,
}

impl FusedAdam {
    pub(crate) fn new(beta_1: f32, beta_2: f32, epsilon: f32) -> Self {
        let elsewhere = AdamConfig::new()
            .with_beta_1(beta_1)
            .with_beta_2(beta_2)
            .with_epsilon(epsilon)
            .build();
        Self {
            beta_1,
            beta_2,
            epsilon,
            elsewhere,
        }
    }

    /// The optimiser as a module optimiser.
    pub(crate) fn init(self) -> ModuleOptimizer {
        ModuleOptimizer::from(self)
    }
}

impl FusedAdam {
    /// Burn's `Adam` step, element by element in the same order of operations, on flex.
    fn step_flex<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<AdamState<D>>,
    ) -> (Tensor<D>, Option<AdamState<D>>) {
        let g = host_values(&grad).expect("a plain f32 gradient on flex");
        let dims = tensor.dims();
        let (time, mut moment_1, mut moment_2) = match state {
            Some(s) => (
                s.momentum.time + 1,
                writable(s.momentum.moment_1),
                writable(s.momentum.moment_2),
            ),
            None => (1, WritableTensor::zeros(dims), WritableTensor::zeros(dims)),
        };
        let mut param = writable(tensor);
        let (b1, b2) = (self.beta_1, self.beta_2);
        let t = time as i32;
        let bias_correction_2 = (1.0 - b2.powi(t)).sqrt();
        let factor = bias_correction_2 / (1.0 - b1.powi(t));
        let epsilon = self.epsilon * bias_correction_2;
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
        let momentum =
            AdaptiveMomentumState::new(time, moment_1.into_tensor(), moment_2.into_tensor());
        (param.into_tensor(), Some(AdamState::new(momentum)))
    }
}

fn writable<const D: usize>(t: Tensor<D>) -> WritableTensor<D> {
    WritableTensor::new(t).expect("a plain f32 tensor on flex")
}

impl Optimizer for FusedAdam {
    type State<const D: usize> = AdamState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        let state_on_flex = state.as_ref().is_none_or(|s| {
            is_plain_f32(&s.momentum.moment_1) && is_plain_f32(&s.momentum.moment_2)
        });
        if is_plain_f32(&tensor) && is_plain_f32(&grad) && state_on_flex {
            return self.step_flex(lr, tensor, grad, state);
        }
        self.elsewhere.step(lr, tensor, grad, state)
    }

    fn to_device<const D: usize>(mut state: Self::State<D>, device: &Device) -> Self::State<D> {
        state.momentum = state.momentum.to_device(device);
        state
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::Distribution;

    use super::*;

    type Step = fn(
        &FusedAdam,
        LearningRate,
        Tensor<2>,
        Tensor<2>,
        Option<AdamState<2>>,
    ) -> (Tensor<2>, Option<AdamState<2>>);

    /// `step` (one of the fused paths, called directly) against Burn's `Adam` over four steps,
    /// parameters and both moments, starting from a tensor that is still held elsewhere.
    fn matches_burn_adam(device: Device, step: Step) {
        let (b1, b2, eps) = (0.9, 0.99, 1e-8);
        let fused = FusedAdam::new(b1, b2, eps);
        let burn = AdamConfig::new()
            .with_beta_1(b1)
            .with_beta_2(b2)
            .with_epsilon(eps)
            .build();
        let start = Tensor::<2>::random([7, 5], Distribution::Normal(0.0, 1.0), &device);
        let kept = start.clone().into_data();
        let (mut a, mut b) = (start.clone(), start.clone());
        let (mut state_a, mut state_b) = (None, None);
        for i in 0..4 {
            let grad = Tensor::<2>::random([7, 5], Distribution::Normal(0.0, 1.0), &device);
            (a, state_a) = step(&fused, 1e-2, a, grad.clone(), state_a);
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
    fn flex_matches_burn_adam_without_touching_shared_tensors() {
        matches_burn_adam(Device::flex(), FusedAdam::step_flex::<2>);
    }

    #[test]
    fn flex_updates_an_unshared_parameter_in_place() {
        let fused = FusedAdam::new(0.9, 0.99, 1e-8);
        let device = Device::flex();
        let param = Tensor::<1>::from_floats([1.0, 2.0, 3.0], &device);
        let grad = Tensor::<1>::from_floats([0.5, -0.5, 0.0], &device);
        let address = host_values(&param).unwrap().values().as_ptr();
        let (param, _) = fused.step_flex(0.1, param, grad, None);
        assert_eq!(host_values(&param).unwrap().values().as_ptr(), address);
        // Step 1 of Adam moves each parameter by lr * sign(g) (to within epsilon).
        let values = param.into_data().try_to_vec::<f32>().unwrap();
        for (got, want) in values.iter().zip([0.9, 2.1, 3.0]) {
            assert!((got - want).abs() < 1e-6, "{values:?}");
        }
    }
}
