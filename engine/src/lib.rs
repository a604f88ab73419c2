//! The `dag` engine: a YAML pipeline -> a validated DAG -> content-hashed keys -> a cache of
//! immutable artifacts -> an executor that runs only what is stale.
//!
//! The engine knows stage kinds only through [`dag_api::Stage`] and a [`dag_api::Registry`]; it
//! never touches a tensor and links no tensor crate (a test checks `cargo tree`). Its one
//! built-in kind is [`shell::Shell`]. The `dag` binary wires it to the stage kinds and the
//! report.

#![warn(missing_docs)]

pub mod cache;
pub mod diag;
pub mod executor;
pub mod experiments;
pub mod hash;
pub mod key;
pub mod shell;
pub mod spec;
pub mod yaml;
