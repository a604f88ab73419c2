//! The training configuration, with ADVENT's defaults.

use serde::{Deserialize, Serialize};

/// Which loss terms the loop optimises. IntraDA's easy->hard step is [`Method::AdvEnt`] with the
/// easy split (and its pseudo-labels) as "source" and the hard split as "target".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Supervised segmentation on the source only; no target batches are drawn.
    SourceOnly,
    /// Segmentation + entropy minimisation on the target (`lambda_ent_*`).
    MinEnt,
    /// Segmentation + adversarial entropy alignment with two discriminators (`lambda_adv_*`).
    AdvEnt,
    /// Both MinEnt and AdvEnt terms.
    MinEntAdvEnt,
}

impl Method {
    /// Whether target batches are needed.
    pub fn uses_target(self) -> bool {
        self != Method::SourceOnly
    }
    /// Whether the entropy terms are part of the loss.
    pub fn uses_entropy(self) -> bool {
        matches!(self, Method::MinEnt | Method::MinEntAdvEnt)
    }
    /// Whether discriminators are trained.
    pub fn uses_adversarial(self) -> bool {
        matches!(self, Method::AdvEnt | Method::MinEntAdvEnt)
    }
}

/// Everything the training loop needs besides the model, the data and the device. Every field
/// has a default (ADVENT's, for GTA5 -> Cityscapes), so `{}` deserialises to the paper setup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Loss terms to train with. Default: `advent`.
    pub method: Method,
    /// Iterations to run (ADVENT's EARLY_STOP). Default: 120000.
    pub iterations: usize,
    /// Denominator of the poly schedule (ADVENT's MAX_ITERS). Default: 250000.
    pub max_iters: usize,
    /// Base learning rate of the segmentation network (SGD). Default: 2.5e-4.
    pub lr: f64,
    /// Multiplier of `lr` on the two classifier heads. Default: 10.
    pub head_lr_mult: f64,
    /// SGD momentum (no dampening, as PyTorch). Default: 0.9.
    pub momentum: f64,
    /// SGD L2 weight decay. Default: 5e-4.
    pub weight_decay: f64,
    /// Exponent of the poly schedule `lr * (1 - it / max_iters)^power`. Default: 0.9.
    pub power: f64,
    /// Learning rate of both discriminators (Adam). Default: 1e-4.
    pub lr_d: f64,
    /// Adam beta1 of the discriminators. Default: 0.9.
    pub adam_beta1: f64,
    /// Adam beta2 of the discriminators. Default: 0.99.
    pub adam_beta2: f64,
    /// Adam epsilon of the discriminators (PyTorch's). Default: 1e-8.
    pub adam_epsilon: f64,
    /// Weight of the main-head segmentation loss. Default: 1.
    pub lambda_seg_main: f64,
    /// Weight of the aux-head segmentation loss (0 disables the aux head's CE). Default: 0.1.
    pub lambda_seg_aux: f64,
    /// Weight of the main-head entropy loss (MinEnt). Default: 0.001.
    pub lambda_ent_main: f64,
    /// Weight of the aux-head entropy loss (MinEnt). Default: 0.0002.
    pub lambda_ent_aux: f64,
    /// Weight of the main adversarial term (AdvEnt). Default: 0.001.
    pub lambda_adv_main: f64,
    /// Weight of the aux adversarial term (0 also drops the aux discriminator). Default: 0.0002.
    pub lambda_adv_aux: f64,
    /// Width of the discriminators' first conv. Default: 64.
    pub disc_ndf: usize,
    /// Write a checkpoint every this many iterations (0: never). Default: 2000.
    pub checkpoint_every: usize,
    /// Keep a copy of the network every this many iterations (0: never), as ADVENT's
    /// snapshots, in `<checkpoint_dir>/snapshots/iter_NNNNNN.bpk` (see [`crate::snapshots`]).
    /// Default: 0.
    pub snapshot_every: usize,
    /// Seed of the device RNG (discriminator initialisation) and of the RNG handed to the
    /// batch provider. Default: 1234.
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            method: Method::AdvEnt,
            iterations: 120_000,
            max_iters: 250_000,
            lr: 2.5e-4,
            head_lr_mult: 10.0,
            momentum: 0.9,
            weight_decay: 5e-4,
            power: 0.9,
            lr_d: 1e-4,
            adam_beta1: 0.9,
            adam_beta2: 0.99,
            adam_epsilon: 1e-8,
            lambda_seg_main: 1.0,
            lambda_seg_aux: 0.1,
            lambda_ent_main: 0.001,
            lambda_ent_aux: 0.0002,
            lambda_adv_main: 0.001,
            lambda_adv_aux: 0.0002,
            disc_ndf: 64,
            checkpoint_every: 2000,
            snapshot_every: 0,
            seed: 1234,
        }
    }
}

impl TrainConfig {
    /// The poly learning rate `base * (1 - iteration / max_iters)^power` (0 past `max_iters`).
    pub fn poly_lr(&self, base: f64, iteration: usize) -> f64 {
        poly_lr(base, iteration, self.max_iters, self.power)
    }

    /// Checks ranges that would otherwise fail deep inside the loop.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_iters == 0 {
            return Err("max_iters must be at least 1".into());
        }
        for (name, v) in [
            ("lr", self.lr),
            ("lr_d", self.lr_d),
            ("head_lr_mult", self.head_lr_mult),
            ("momentum", self.momentum),
            ("weight_decay", self.weight_decay),
            ("power", self.power),
            ("adam_epsilon", self.adam_epsilon),
            ("lambda_seg_main", self.lambda_seg_main),
            ("lambda_seg_aux", self.lambda_seg_aux),
            ("lambda_ent_main", self.lambda_ent_main),
            ("lambda_ent_aux", self.lambda_ent_aux),
            ("lambda_adv_main", self.lambda_adv_main),
            ("lambda_adv_aux", self.lambda_adv_aux),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!(
                    "{name} must be a finite non-negative number, got {v}"
                ));
            }
        }
        for (name, v) in [
            ("adam_beta1", self.adam_beta1),
            ("adam_beta2", self.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&v) {
                return Err(format!("{name} must lie in [0, 1), got {v}"));
            }
        }
        if self.method.uses_adversarial() && self.disc_ndf == 0 {
            return Err("disc_ndf must be at least 1".into());
        }
        Ok(())
    }
}

/// `base * (1 - iteration / max_iters)^power`, clamped at 0 once `iteration >= max_iters`.
pub fn poly_lr(base: f64, iteration: usize, max_iters: usize, power: f64) -> f64 {
    let frac = 1.0 - iteration as f64 / max_iters.max(1) as f64;
    base * frac.max(0.0).powf(power)
}
