//! The `dag` binary's library: the command line ([`cli`]) and the HTML report's inputs
//! ([`report`]), wiring the engine (crate `dag-engine`, re-exported here) to the stage kinds
//! (`dag-stages`, `dag-data-stages`) and the report (`dag-report`).

#![warn(missing_docs)]

pub use dag_engine::{cache, diag, executor, experiments, hash, key, shell, spec, yaml};

pub mod cli;
pub mod report;
