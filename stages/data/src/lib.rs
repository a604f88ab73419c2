//! Datasets for domain-adaptive semantic segmentation, without any tensor library.
//!
//! - [`formats`]: the on-disk layouts of Cityscapes, GTA5 and SYNTHIA-RAND-CITYSCAPES, list
//!   files in IntraDA's line format, and pairing of images with labels.
//! - [`protocol`]: the 19/16/13-class label protocols, class names and the Cityscapes palette.
//! - [`rcs`]: DAFormer's rare class sampling over per-image class pixel counts.
//! - [`pngio`]: PNG decoding that keeps palette indices and 16-bit channels, and label writers.
//! - [`preprocess`]: decode, resize and map a dataset into memory-mapped shards.
//! - [`shards`]: the reader of those shards for training ([`Dataset`], [`Sampler`], batches).
//! - [`synth`]: the procedural street-scene generator with a real domain shift.
//! - [`tables`]: a small Parquet table writer/reader shared by every stage that writes tables.
//! - [`viz`]: a perceptual colormap for heat maps and label overlays, for the report.
//!
//! The crate knows nothing about the cache or the engine: callers pass directories in and get
//! files out.

pub mod error;
mod fastpng;
pub mod formats;
pub mod pngio;
pub mod preprocess;
pub mod protocol;
pub mod rcs;
pub mod resize;
pub mod shards;
pub mod synth;
pub mod tables;
pub mod viz;

pub use error::DataError;
pub use formats::{Format, SampleRef};
pub use preprocess::{preprocess, PreprocessConfig, PreprocessReport};
pub use protocol::Protocol;
pub use rcs::RareClassSampler;
pub use shards::{Batch, Dataset, Item, Normalisation, Sampler, MEAN_BGR};
pub use synth::{generate, SynthConfig, SynthReport};
pub use tables::{Column, Table};
