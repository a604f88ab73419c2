//! The fault suite: kills, corruption, concurrency, full disks and read-only mounts, malformed
//! pipelines and datasets, generated parser input, paths, and diverging training. RELIABILITY.md
//! lists what each test proves and the figures it measured.

#[path = "../engine_common/mod.rs"]
mod engine_common;

mod common;
mod concurrency;
mod corpus;
mod corruption;
mod datasets;
mod disk;
mod kills;
mod nan;
mod parser;
mod paths;
