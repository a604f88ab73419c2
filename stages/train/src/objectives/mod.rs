//! The loss terms a method adds to supervised segmentation, as data.
//!
//! A method ([`crate::methods::METHODS`]) is a list of objectives on the unlabelled (target)
//! batch plus, for the adversarial methods, ADVENT's discriminators. Each objective has a name,
//! its params (declared once, with `#[derive(ParamSet)]`), the terms it logs, and a function from
//! the target batch's predictions to weighted terms. The loop, the log, checkpoints, the progress
//! line and the report loop over the terms; none of them names one.

use burn::tensor::Tensor;
use dag_api::{Map, ParamSet, ParamSpec, Value};
use serde::de::DeserializeOwned;

pub mod adversarial;
pub mod maxsquare;
pub mod minent;

/// One term of a loss: its name in the log, its weight in the loss, and its value.
pub struct Term {
    /// The column of `log.parquet` (`ent_main`, ...).
    pub name: &'static str,
    /// Its weight in the summed loss.
    pub weight: f64,
    /// Its unweighted value, a scalar with gradients.
    pub value: Tensor<1>,
}

/// A loss on the target batch computed from the network's predictions alone.
pub trait TargetObjective: Sync + 'static {
    /// Its params, each a param of every training kind that has a `method`.
    type Params: ParamSet + DeserializeOwned + Send + Sync + 'static;
    /// Its name in docs and errors.
    const NAME: &'static str;
    /// The terms it logs, in order.
    const TERMS: &'static [&'static str];
    /// The terms with a non-zero weight, for the target batch's logits of the main and aux
    /// heads, both upsampled to the batch's size; a network without an aux head (DAFormer) has
    /// no aux terms.
    fn terms(params: &Self::Params, main: &Tensor<4>, aux: Option<&Tensor<4>>) -> Vec<Term>;
    /// Whether any term has a non-zero weight. A run whose objectives are all inactive (and that
    /// has no discriminator) draws no target batch, and so trains exactly as `source_only`.
    fn is_active(params: &Self::Params) -> bool;
    /// Checks across its params beyond their declared ranges, e.g. a value that another param
    /// switches off (it would change the key but not the result).
    fn check(_params: &Self::Params) -> Result<(), String> {
        Ok(())
    }
}

/// A [`TargetObjective`] with its params bound, ready for the loop.
pub trait TargetLoss: Send + Sync {
    /// See [`TargetObjective::terms`].
    fn terms(&self, main: &Tensor<4>, aux: Option<&Tensor<4>>) -> Vec<Term>;
    /// See [`TargetObjective::is_active`].
    fn is_active(&self) -> bool;
}

/// A [`TargetObjective`] as the method table holds it.
pub trait Objective: Sync {
    /// See [`TargetObjective::NAME`].
    fn name(&self) -> &'static str;
    /// The specs of its params.
    fn param_specs(&self) -> Vec<ParamSpec>;
    /// See [`TargetObjective::TERMS`].
    fn term_names(&self) -> &'static [&'static str];
    /// Binds its params, given by name (absent ones take their declared default).
    fn bind(&self, params: &Map<String, Value>) -> Result<Box<dyn TargetLoss>, String>;
}

/// The method table's handle on a [`TargetObjective`].
pub struct Registered<T>(std::marker::PhantomData<fn() -> T>);

impl<T> Registered<T> {
    /// The handle.
    pub const NEW: Self = Self(std::marker::PhantomData);
}

struct Bound<T: TargetObjective>(T::Params);

impl<T: TargetObjective> TargetLoss for Bound<T> {
    fn terms(&self, main: &Tensor<4>, aux: Option<&Tensor<4>>) -> Vec<Term> {
        T::terms(&self.0, main, aux)
    }
    fn is_active(&self) -> bool {
        T::is_active(&self.0)
    }
}

impl<T: TargetObjective> Objective for Registered<T> {
    fn name(&self) -> &'static str {
        T::NAME
    }
    fn param_specs(&self) -> Vec<ParamSpec> {
        T::Params::param_specs()
    }
    fn term_names(&self) -> &'static [&'static str] {
        T::TERMS
    }
    fn bind(&self, params: &Map<String, Value>) -> Result<Box<dyn TargetLoss>, String> {
        let params = parse_params::<T::Params>(params)?;
        T::check(&params)?;
        Ok(Box::new(Bound::<T>(params)))
    }
}

/// A param set from values given by name: the declared defaults, overridden by the given values
/// of its own params (others are ignored).
pub fn parse_params<P: ParamSet + DeserializeOwned>(
    given: &Map<String, Value>,
) -> Result<P, String> {
    let mut values = Map::new();
    for spec in P::param_specs() {
        let value = given.get(spec.name).cloned().or(spec.default);
        if let Some(v) = value {
            values.insert(spec.name.to_string(), v);
        }
    }
    serde_json::from_value(Value::Object(values)).map_err(|e| e.to_string())
}
