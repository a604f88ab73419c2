//! The training configuration: the knobs every method shares, declared once with their defaults
//! (ADVENT's, for GTA5 -> Cityscapes), ranges and docs, plus the method and its params.

use dag_api::{Map, ParamSet, ParamSpec, Value};
use serde::{Deserialize, Serialize};

use crate::methods::{self, Method};
use crate::objectives::adversarial::AdversarialParams;
use crate::objectives::{parse_params, TargetLoss};

/// The network's optimisation and the weights of its supervised terms, for every method. Every
/// field is a param of the training kinds.
#[derive(Debug, Clone, PartialEq, ParamSet, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// iterations to run (ADVENT's EARLY_STOP: 120000 for GTA5, 90000 for SYNTHIA)
    #[param(default = 120_000, min = 1)]
    pub iters: usize,
    /// denominator of the poly schedule lr * (1 - it / max_iters)^power
    #[param(default = 250_000, min = 1)]
    pub max_iters: usize,
    /// the network's optimiser: `sgd` (ADVENT, DACS: momentum, L2 weight decay) or `adamw`
    /// (DAFormer and what followed: Adam with decoupled weight decay)
    #[param(default = "sgd", one_of = ["sgd", "adamw"])]
    pub optimizer: String,
    /// learning rate of the network (DAFormer with AdamW: 6e-5)
    #[param(default = 2.5e-4, min = 0.0)]
    pub lr: f64,
    /// SGD momentum (no dampening); unused by `adamw`
    #[param(default = 0.9, min = 0.0)]
    pub momentum: f64,
    /// weight decay: L2 for `sgd`, decoupled for `adamw` (DAFormer: 0.01; with `adamw`,
    /// DAFormer's network exempts its LayerNorms, as DAFormer's `norm: decay_mult 0`)
    #[param(default = 5e-4, min = 0.0)]
    pub weight_decay: f64,
    /// AdamW's beta1, below 1 (`adamw` only)
    #[param(default = 0.9, min = 0.0, max = 1.0)]
    pub adamw_beta1: f64,
    /// AdamW's beta2, below 1 (`adamw` only)
    #[param(default = 0.999, min = 0.0, max = 1.0)]
    pub adamw_beta2: f64,
    /// AdamW's epsilon (PyTorch's default; `adamw` only)
    #[param(default = 1e-8, min = 0.0, min_exclusive)]
    pub adamw_epsilon: f64,
    /// exponent of the poly schedule (DAFormer: 1)
    #[param(default = 0.9, min = 0.0)]
    pub power: f64,
    /// iterations of mmcv's linear warmup at the start: the poly rate times
    /// 1 - (1 - it / warmup_iters) * (1 - warmup_ratio) (DAFormer: 1500; 0: none)
    #[param(default = 0)]
    pub warmup_iters: usize,
    /// the share of the poly rate that the warmup starts from (DAFormer: 1e-6)
    #[param(default = 1e-6, min = 0.0, max = 1.0)]
    pub warmup_ratio: f64,
    /// learning-rate multiplier of the heads: DeepLabV2's two classifiers, DAFormer's decoder
    #[param(default = 10.0, min = 0.0)]
    pub head_lr_mult: f64,
    /// weight of the main head's cross-entropy
    #[param(default = 1.0, min = 0.0)]
    pub lambda_seg_main: f64,
    /// weight of the aux head's cross-entropy (0 disables it; networks without an aux head,
    /// DAFormer's, have no such term)
    #[param(default = 0.1, min = 0.0)]
    pub lambda_seg_aux: f64,
    /// weight of DAFormer's feature distance on the source batch: the L2 distance between the
    /// backbone's last features and those of the starting network, frozen (DAFormer's
    /// ImageNet feature distance when the stage starts from `imagenet` weights), on the
    /// feature cells of `fd_classes` (DAFormer: 0.005; 0 disables it)
    #[param(default = 0.0, min = 0.0)]
    pub lambda_fd: f64,
    /// the classes whose feature cells the feature distance counts; default DAFormer's
    /// Cityscapes things: traffic light, sign, person, rider, car, truck, bus, train,
    /// motorcycle, bicycle ([6, 7, 11, 12, 13, 14, 15, 16, 17, 18])
    #[param(min = 0)]
    pub fd_classes: Option<Vec<usize>>,
    /// a feature cell counts for the feature distance when this share of its pixels holds its
    /// majority label (DAFormer: 0.75)
    #[param(default = 0.75, min = 0.0, max = 1.0)]
    pub fd_min_ratio: f64,
    /// write a resumable checkpoint every this many iterations (0: never)
    #[param(default = 2000)]
    pub checkpoint_every: usize,
    /// keep the network every this many iterations in the model artifact's snapshots/ (for
    /// `evaluate` with `snapshots: all`; 0: keep none)
    #[param(default = 0)]
    pub snapshot_every: usize,
}

/// Everything the training loop needs besides the model, the data and the device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// The method's name ([`methods::METHODS`]).
    pub method: String,
    /// The schedule and supervised weights.
    pub schedule: Schedule,
    /// Values of the method's params by name ([`Method::param_names`]); absent ones take their
    /// declared defaults.
    pub method_params: Map<String, Value>,
    /// Seed of the RNG handed to the batch provider and of the discriminators' initial weights
    /// (the pipeline's seed).
    pub seed: u64,
}

impl Default for TrainConfig {
    /// The default method with every param at its declared default, seed 0.
    fn default() -> Self {
        Self {
            method: methods::DEFAULT_METHOD.to_string(),
            schedule: Schedule::default(),
            method_params: Map::new(),
            seed: 0,
        }
    }
}

impl TrainConfig {
    /// The same config with the method's param `name` set to `value`.
    pub fn with_param(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.method_params.insert(name.to_string(), value.into());
        self
    }

    /// The method.
    pub fn method(&self) -> Result<&'static Method, String> {
        methods::method(&self.method)
    }

    /// The learning rate of `iteration` for a base rate `base`: the poly schedule
    /// `base * (1 - iteration / max_iters)^power` (0 past `max_iters`), scaled by the linear
    /// warmup during the first `warmup_iters` iterations.
    pub fn poly_lr(&self, base: f64, iteration: usize) -> f64 {
        let s = &self.schedule;
        let lr = poly_lr(base, iteration, s.max_iters, s.power);
        if iteration < s.warmup_iters {
            let k = (1.0 - iteration as f64 / s.warmup_iters as f64) * (1.0 - s.warmup_ratio);
            lr * (1.0 - k)
        } else {
            lr
        }
    }

    /// The adversarial alignment's params, for the methods that have one.
    pub fn adversarial(&self) -> Result<Option<AdversarialParams>, String> {
        if self.method()?.adversarial {
            parse_params(&self.method_params).map(Some)
        } else {
            Ok(None)
        }
    }

    /// The self-training method's params, for the methods that have them.
    pub(crate) fn self_training(
        &self,
    ) -> Result<Option<crate::selftraining::SelfTrainingRun>, String> {
        use crate::selftraining::Teacher;
        let Some(st) = self.method()?.self_training else {
            return Ok(None);
        };
        let given = &self.method_params;
        let run = crate::selftraining::SelfTrainingRun {
            teacher: st.teacher,
            ema: match st.teacher {
                Some(Teacher::Ema) => Some(parse_params(given)?),
                _ => None,
            },
            class_mix: match st.teacher {
                Some(_) => Some(parse_params(given)?),
                None => None,
            },
            augment: parse_params(given)?,
            pixels: parse_params(given)?,
            mic: if st.mic {
                Some(parse_params(given)?)
            } else {
                None
            },
            tufl: if st.tufl {
                Some(parse_params(given)?)
            } else {
                None
            },
        };
        run.pixels.check()?;
        if let Some(p) = &run.class_mix {
            p.check()?;
        }
        if let Some(t) = &run.tufl {
            t.check()?;
        }
        Ok(Some(run))
    }

    /// The method's target objectives with their params bound.
    pub fn target_losses(&self) -> Result<Vec<Box<dyn TargetLoss>>, String> {
        self.method()?
            .target
            .iter()
            .map(|o| o.bind(&self.method_params))
            .collect()
    }

    /// Checks the method, the names, types and ranges of every param, and the values that
    /// would otherwise fail deep inside the loop.
    pub fn validate(&self) -> Result<(), String> {
        let method = self.method()?;
        let allowed = method.param_names();
        for name in self.method_params.keys() {
            if !allowed.contains(&name.as_str()) {
                return Err(format!(
                    "`{name}` is not a param of method `{}`; its params are {}",
                    method.name,
                    allowed.join(", ")
                ));
            }
        }
        let schedule = serde_json::to_value(&self.schedule).map_err(|e| e.to_string())?;
        let given = schedule.as_object().into_iter().flatten();
        check(&Schedule::param_specs(), given.chain(&self.method_params))?;
        self.adversarial()?;
        self.target_losses()?;
        self.self_training()?;
        let s = &self.schedule;
        for (name, beta) in [
            ("adamw_beta1", s.adamw_beta1),
            ("adamw_beta2", s.adamw_beta2),
        ] {
            if beta >= 1.0 {
                return Err(format!("{name} must be below 1, got {beta}"));
            }
        }
        if let Some(adv) = self.adversarial()? {
            for (name, beta) in [
                ("adam_beta1", adv.adam_beta1),
                ("adam_beta2", adv.adam_beta2),
            ] {
                if beta >= 1.0 {
                    return Err(format!("{name} must be below 1, got {beta}"));
                }
            }
        }
        Ok(())
    }
}

/// Checks each given value against the spec of its name among `specs` and the method params'.
fn check<'a>(
    specs: &[ParamSpec],
    given: impl Iterator<Item = (&'a String, &'a Value)>,
) -> Result<(), String> {
    let method_specs = methods::param_specs();
    // An unset optional param serialises as null.
    for (name, value) in given.filter(|(_, v)| !v.is_null()) {
        let spec = specs
            .iter()
            .chain(&method_specs)
            .find(|s| s.name == name.as_str());
        if let Some(spec) = spec {
            spec.ty.check(value).map_err(|e| format!("{name}: {e}"))?;
        }
    }
    Ok(())
}

/// `base * (1 - iteration / max_iters)^power`, clamped at 0 once `iteration >= max_iters`.
pub fn poly_lr(base: f64, iteration: usize, max_iters: usize, power: f64) -> f64 {
    let frac = 1.0 - iteration as f64 / max_iters.max(1) as f64;
    base * frac.max(0.0).powf(power)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// mmcv's `poly` with `warmup='linear'`, as DAFormer's `poly10warm` schedule runs it.
    #[test]
    fn warmup_scales_the_poly_rate_linearly_from_the_ratio() {
        let mut c = TrainConfig::default();
        c.schedule.max_iters = 40_000;
        c.schedule.power = 1.0;
        c.schedule.warmup_iters = 1500;
        c.schedule.warmup_ratio = 1e-6;
        let base = 6e-5;
        assert!((c.poly_lr(base, 0) - base * 1e-6).abs() < 1e-18);
        let i = 750;
        let regular = base * (1.0 - i as f64 / 40_000.0);
        let k = (1.0 - i as f64 / 1500.0) * (1.0 - 1e-6);
        assert!((c.poly_lr(base, i) - regular * (1.0 - k)).abs() < 1e-18);
        assert_eq!(c.poly_lr(base, 1500), base * (1.0 - 1500.0 / 40_000.0));
        c.schedule.warmup_iters = 0;
        assert_eq!(c.poly_lr(base, 3), base * (1.0 - 3.0 / 40_000.0));
    }
}
