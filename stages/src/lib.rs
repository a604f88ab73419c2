//! The stage kinds of `dag`: thin adapters from (params, input artifacts) to output artifacts,
//! calling the model, data, training and metrics libraries. The engine reaches them only through
//! [`register_all`] and the [`dag_api::Stage`] trait.

use dag_api::Registry;
/// The GPU devices that stages of this process used may still run queued work; the `dag` binary
/// waits for it before it exits.
pub use dag_train::wait_for_device_work;

mod common;
pub mod compare;
pub mod evaluate;
pub mod preprocess;
pub mod score;
pub mod split;
pub mod synth;
pub mod train;
pub mod visuals;

/// Adds every stage kind of this crate to `registry`.
pub fn register_all(registry: &mut Registry) {
    registry.register(preprocess::Preprocess);
    registry.register(synth::Synth);
    registry.register(train::TrainStage(train::Role::Source));
    registry.register(train::TrainStage(train::Role::Adapt));
    registry.register(score::ScoreEntropy);
    registry.register(split::Split);
    registry.register(train::TrainStage(train::Role::SelfTrain));
    registry.register(evaluate::Evaluate);
    registry.register(compare::Compare);
}

/// Resolves the pipeline's `device:` (`auto`, `flex`, `wgpu`, `cuda`) to the device kind that
/// will actually run, or explains why the requested one is not available in this build.
/// `auto` probes the GPU backends compiled in (CUDA, then wgpu) and falls back to `flex`.
pub fn resolve_device(requested: &str) -> Result<String, String> {
    dag_train::resolve_device(requested).map(|choice| choice.name().to_string())
}
