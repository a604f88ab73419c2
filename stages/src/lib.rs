//! The stage kinds of `dag`: thin adapters from (params, input artifacts) to output artifacts,
//! calling the model, data, training and metrics libraries. The engine reaches them only through
//! [`register_all`] and the [`dag_api::Stage`] trait.

use dag_api::Registry;

pub mod preprocess;
pub mod synth;

/// Adds every stage kind of this crate to `registry`.
pub fn register_all(registry: &mut Registry) {
    registry.register(preprocess::Preprocess);
    registry.register(synth::Synth);
}

/// Resolves the pipeline's `device:` (`auto`, `flex`, `wgpu`, `cuda`) to the device kind that
/// will actually run, or explains why the requested one is not available in this build.
/// `auto` probes the GPU backends compiled in (CUDA, then wgpu) and falls back to `flex`.
pub fn resolve_device(requested: &str) -> Result<String, String> {
    dag_train::resolve_device(requested).map(|choice| choice.name().to_string())
}
