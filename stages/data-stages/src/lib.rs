//! The stage kinds of `dag` that touch no tensor: `synth`, `preprocess`, `split`, `class_stats`
//! and `compare`.
//! They live apart from the network kinds (crate `dag-stages`) so that their keys depend only on
//! the code they are built from: a change to the trainer never reruns a split.

use dag_api::Registry;

pub mod class_stats;
pub mod compare;
pub mod preprocess;
pub mod split;
pub mod synth;

include!(concat!(env!("OUT_DIR"), "/code.rs"));

/// Adds every stage kind of this crate to `registry`.
pub fn register_all(registry: &mut Registry) {
    registry.register(synth::Synth);
    registry.register(preprocess::Preprocess);
    registry.register(split::Split);
    registry.register(class_stats::ClassStats);
    registry.register(compare::Compare);
}
