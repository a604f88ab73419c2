//! Adam on `device: tch` as seven LibTorch kernels per parameter, updating in place where Burn
//! holds the only reference, like PyTorch's own Adam; Burn's `Adam` runs a dozen or so separate
//! tensor ops (BENCHMARKS.md, "Training step"). Same update and the same state record as
//! Burn's `Adam`, so checkpoints stay interchangeable; parameters on other devices go to Burn's
//! `Adam` unchanged.

use burn::optim::{
    Adam, AdamConfig, AdamState, AdaptiveMomentumState, LearningRate, ModuleOptimizer, Optimizer,
};
use burn::tensor::{Device, Tensor};
use dag_model::libtorch::{from_plain_tch, into_writable_tch, is_plain_tch};

/// Adam without weight decay or AMSGrad (ADVENT's discriminator optimiser).
#[derive(Clone)]
pub(crate) struct LibTorchAdam {
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
    elsewhere: Adam,
}

impl LibTorchAdam {
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

impl Optimizer for LibTorchAdam {
    type State<const D: usize> = AdamState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        let state_on_tch = state.as_ref().is_none_or(|s| {
            is_plain_tch(&s.momentum.moment_1) && is_plain_tch(&s.momentum.moment_2)
        });
        if !(is_plain_tch(&tensor) && is_plain_tch(&grad) && state_on_tch) {
            return self.elsewhere.step(lr, tensor, grad, state);
        }
        let g = into_writable_tch(grad);
        let (time, mut moment_1, mut moment_2) = match state {
            Some(s) => (
                s.momentum.time + 1,
                into_writable_tch(s.momentum.moment_1),
                into_writable_tch(s.momentum.moment_2),
            ),
            None => (1, g.zeros_like(), g.zeros_like()),
        };
        // m <- b1 m + (1 - b1) g and v <- b2 v + (1 - b2) g^2, as Burn's `AdaptiveMomentum`.
        let _ = moment_1.lerp_(&g, f64::from(1.0 - self.beta_1));
        let _ = moment_2.lerp_(&(&g * &g), f64::from(1.0 - self.beta_2));
        // Burn's step: lr * m * sqrt(bc2) / bc1 / (sqrt(v) + eps * sqrt(bc2)).
        let t = time as i32;
        let bias_correction_2 = (1.0 - self.beta_2.powi(t)).sqrt();
        let factor = bias_correction_2 / (1.0 - self.beta_1.powi(t));
        let mut denominator = moment_2.sqrt();
        let _ = denominator.g_add_scalar_(f64::from(self.epsilon * bias_correction_2));
        // param - step * m / d == param + m / (d / -step)
        let _ = denominator.g_mul_scalar_(-1.0 / (lr * f64::from(factor)));
        let mut param = into_writable_tch(tensor);
        let _ = param.addcdiv_(&moment_1, &denominator);
        let momentum =
            AdaptiveMomentumState::new(time, from_plain_tch(moment_1), from_plain_tch(moment_2));
        (from_plain_tch(param), Some(AdamState::new(momentum)))
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

    #[test]
    #[allow(deprecated)]
    fn matches_burn_adam_over_several_steps_without_touching_shared_tensors() {
        let device = Device::libtorch();
        let (b1, b2, eps) = (0.9, 0.99, 1e-8);
        let fused = LibTorchAdam::new(b1, b2, eps);
        let burn = AdamConfig::new()
            .with_beta_1(b1)
            .with_beta_2(b2)
            .with_epsilon(eps)
            .build();
        let start = Tensor::<2>::random([7, 5], Distribution::Normal(0.0, 1.0), &device);
        let kept = start.clone().into_data();
        let (mut a, mut b) = (start.clone(), start.clone());
        let (mut state_a, mut state_b) = (None, None);
        for step in 0..4 {
            let grad = Tensor::<2>::random([7, 5], Distribution::Normal(0.0, 1.0), &device);
            (a, state_a) = fused.step(1e-2, a, grad.clone(), state_a);
            (b, state_b) = burn.step(1e-2, b, grad, state_b);
            let diff: f32 = (a.clone() - b.clone()).abs().max().into_scalar();
            assert!(diff < 1e-6, "parameters after step {step} differ by {diff}");
            let (sa, sb) = (
                &state_a.as_ref().unwrap().momentum,
                &state_b.as_ref().unwrap().momentum,
            );
            assert_eq!(sa.time, sb.time);
            for (x, y) in [(&sa.moment_1, &sb.moment_1), (&sa.moment_2, &sb.moment_2)] {
                let diff: f32 = (x.clone() - y.clone()).abs().max().into_scalar();
                assert!(diff < 1e-6, "moments after step {step} differ by {diff}");
            }
        }
        // `start` was still held while the first step ran: it must not have been updated.
        assert_eq!(start.into_data(), kept);
    }
}
