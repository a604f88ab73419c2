//! The stage kinds of `dag` that run a network: `train_source`, `adapt`, `self_train`,
//! `score_entropy` and `evaluate`. Thin adapters from (params, input artifacts) to output
//! artifacts, calling the model, data, training and metrics libraries; the engine reaches them
//! only through [`register_all`] and the [`dag_api::Stage`] trait. The kinds that touch no tensor
//! are in `dag-data-stages`.

use dag_api::Registry;
/// The GPU devices that stages of this process used may still run queued work; the `dag` binary
/// waits for it before it exits.
pub use dag_train::wait_for_device_work;

mod common;
pub mod evaluate;
pub mod score;
pub mod train;
pub mod visuals;

include!(concat!(env!("OUT_DIR"), "/code.rs"));

/// Adds every stage kind of this crate to `registry`.
pub fn register_all(registry: &mut Registry) {
    registry.register(train::TrainStage(train::Role::Source));
    registry.register(train::TrainStage(train::Role::Adapt));
    registry.register(score::ScoreEntropy);
    registry.register(train::TrainStage(train::Role::SelfTrain));
    registry.register(evaluate::Evaluate);
}

/// Resolves the pipeline's `device:` (`auto`, `flex`, `wgpu`, `cuda`) to the device kind that
/// will actually run, or explains why the requested one is not available in this build.
/// `auto` probes the GPU backends compiled in (CUDA, then wgpu) and falls back to `flex`.
pub fn resolve_device(requested: &str) -> Result<dag_api::DeviceKind, String> {
    dag_train::resolve_device(requested)
}
