//! The preprocessed dataset artifact and its reader.
//!
//! Layout of an artifact directory:
//!
//! ```text
//! meta.json                     Meta: size, classes, protocol, class names, colours, mean, ...
//! index.parquet                 image_id, path, height, width, shard, offset, label_offset
//!                               (+ full_offset with keep_full_labels)
//! class_pixels.parquet          image_id, class_id, class_name, pixels (non-zero counts)
//! shards/images-SSSSS.u8        fixed-size records: u8 RGB, HWC (row-major, R,G,B per pixel)
//! shards/labels-SSSSS.u8        fixed-size records: u8 class ids (255 = ignore), H x W
//! shards/full-labels-SSSSS.u8   optional: u8 class ids at the original label size
//! ```
//!
//! `height`/`width` in the index are the ORIGINAL image size; every record in the image and
//! label shards has the artifact's size (`meta.json`). `offset` and `label_offset` are byte
//! offsets into the shard files of number `shard`. Shards are memory-mapped, so opening a
//! dataset costs nothing and the OS page cache bounds memory.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::protocol::Protocol;
use crate::tables::{Column, Table};
use crate::DataError;

/// ADVENT's image mean, in BGR order (subtracted from 0..255 values, no division by a std).
pub const MEAN_BGR: [f32; 3] = [104.006_99, 116.668_77, 122.678_91];

/// How 0..255 RGB images become a network's input: the channel order and, per channel in that
/// order, the mean subtracted and the standard deviation divided by.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalisation {
    /// Channels in B, G, R order (else R, G, B).
    pub bgr: bool,
    /// Subtracted from each channel, in the output order.
    pub mean: [f32; 3],
    /// Each channel is divided by this after the subtraction, in the output order.
    pub std: [f32; 3],
}

impl Normalisation {
    /// ADVENT's Caffe convention: BGR minus [`MEAN_BGR`], no division.
    pub const CAFFE_BGR: Self = Self {
        bgr: true,
        mean: MEAN_BGR,
        std: [1.0; 3],
    };
    /// torchvision's and mmseg's ImageNet convention (DAFormer's `img_norm_cfg`): RGB minus
    /// [123.675, 116.28, 103.53], divided by [58.395, 57.12, 57.375].
    pub const IMAGENET_RGB: Self = Self {
        bgr: false,
        mean: [123.675, 116.28, 103.53],
        std: [58.395, 57.12, 57.375],
    };

    /// Converts one u8 RGB HWC image into `out` (CHW, `3 x H x W` values).
    pub fn apply(&self, rgb: &[u8], out: &mut [f32]) {
        let plane = rgb.len() / 3;
        assert_eq!(out.len(), rgb.len(), "output must hold 3 x H x W values");
        let (c0, rest) = out.split_at_mut(plane);
        let (c1, c2) = rest.split_at_mut(plane);
        let (m, s) = (self.mean, self.std);
        for (i, px) in rgb.chunks_exact(3).enumerate() {
            let (first, last) = if self.bgr {
                (px[2], px[0])
            } else {
                (px[0], px[2])
            };
            c0[i] = (f32::from(first) - m[0]) / s[0];
            c1[i] = (f32::from(px[1]) - m[1]) / s[1];
            c2[i] = (f32::from(last) - m[2]) / s[2];
        }
    }

    /// Channel `channel`'s input value `v` back on the 0..1 scale.
    pub fn to_unit(&self, channel: usize, v: f32) -> f32 {
        (v * self.std[channel] + self.mean[channel]) / 255.0
    }

    /// The input value of channel `channel` at `u` on the 0..1 scale.
    pub fn from_unit(&self, channel: usize, u: f32) -> f32 {
        (u * 255.0 - self.mean[channel]) / self.std[channel]
    }
}

/// Version of the artifact layout written by [`crate::preprocess()`].
pub const FORMAT_VERSION: u32 = 1;

/// A sample that was skipped (only with `allow_skip`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Skipped {
    /// The sample id, or the file name when there is no sample (a label without an image).
    pub file: String,
    /// The error that made it skip.
    pub reason: String,
}

/// `meta.json` of a preprocessed dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    /// [`FORMAT_VERSION`] of the writer.
    pub format_version: u32,
    /// `cityscapes`, `gta5`, `synthia`.
    pub format: String,
    /// The split read (`all` for GTA5 and SYNTHIA).
    pub split: String,
    /// e.g. `cityscapes16`.
    pub protocol: String,
    /// Number of classes.
    pub classes: u32,
    /// Name of each class, in class-id order.
    pub class_names: Vec<String>,
    /// Cityscapes colour of each class (RGB).
    pub colors: Vec<[u8; 3]>,
    /// Width of every record.
    pub width: u32,
    /// Height of every record.
    pub height: u32,
    /// How records are laid out (human-readable).
    pub layout: String,
    /// The mean the batch helpers subtract, BGR.
    pub mean_bgr: [f32; 3],
    /// Number of samples.
    pub images: usize,
    /// Samples per shard file (the last one may hold fewer).
    pub shard_images: usize,
    /// Number of shard files of each kind.
    pub shards: usize,
    /// Whether `full-labels-*.u8` shards exist.
    pub full_labels: bool,
    /// Samples left out with `allow_skip`.
    pub skipped: Vec<Skipped>,
}

impl Meta {
    /// The protocol the labels were mapped with.
    pub fn protocol(&self) -> Result<Protocol, DataError> {
        Protocol::from_classes(self.classes)
    }
}

/// Paths of shard files, shared by the writer and the reader.
pub(crate) fn shard_path(dir: &Path, kind: &str, shard: usize) -> PathBuf {
    dir.join("shards").join(format!("{kind}-{shard:05}.u8"))
}

#[derive(Debug, Clone)]
struct Entry {
    image_id: u32,
    path: String,
    height: u32,
    width: u32,
    shard: usize,
    offset: usize,
    label_offset: usize,
    full_offset: Option<usize>,
}

/// One sample, borrowed from the memory-mapped shards.
#[derive(Debug, Clone, Copy)]
pub struct Item<'a> {
    /// Position in the index (0-based, contiguous).
    pub image_id: u32,
    /// The image's id in its dataset (path relative to the split's image folder).
    pub path: &'a str,
    /// u8 RGB, HWC, `meta.height x meta.width`.
    pub image: &'a [u8],
    /// u8 class ids, `meta.height x meta.width`, 255 = ignore.
    pub label: &'a [u8],
}

/// A full-resolution label (only with `keep_full_labels`).
#[derive(Debug, Clone, Copy)]
pub struct FullLabel<'a> {
    /// Original width.
    pub width: u32,
    /// Original height.
    pub height: u32,
    /// `height * width` class ids, 255 = ignore.
    pub data: &'a [u8],
}

/// A batch ready for a tensor library.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// `[N, 3, H, W]`, channels B, G, R, each minus [`MEAN_BGR`].
    pub images: Vec<f32>,
    /// `[N, H, W]` class ids, 255 = ignore.
    pub labels: Vec<u8>,
    /// `[N, 3, H, W]`.
    pub shape: [usize; 4],
    /// The dataset indices in the batch, in order.
    pub indices: Vec<usize>,
}

/// A preprocessed dataset, opened for reading.
pub struct Dataset {
    dir: PathBuf,
    meta: Meta,
    entries: Vec<Entry>,
    images: Vec<Mmap>,
    labels: Vec<Mmap>,
    full: Vec<Mmap>,
}

fn map_file(path: &Path) -> Result<Mmap, DataError> {
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    // SAFETY: artifacts are immutable once published (the cache never rewrites a file in
    // place), so the mapping cannot change under us.
    unsafe { Mmap::map(&file) }.map_err(|e| DataError::io(path, e))
}

fn col_u32<'a>(t: &'a Table, name: &str, path: &Path) -> Result<&'a [u32], DataError> {
    match t.column(name) {
        Some(Column::U32(v)) => Ok(v),
        _ => Err(corrupt(path, format!("column `{name}` missing or not u32"))),
    }
}

fn col_u64<'a>(t: &'a Table, name: &str, path: &Path) -> Result<&'a [u64], DataError> {
    match t.column(name) {
        Some(Column::U64(v)) => Ok(v),
        _ => Err(corrupt(path, format!("column `{name}` missing or not u64"))),
    }
}

fn corrupt(path: &Path, reason: impl Into<String>) -> DataError {
    DataError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

impl Dataset {
    /// Opens the artifact written by [`crate::preprocess()`] and checks that every shard holds
    /// what the index says.
    pub fn open(dir: &Path) -> Result<Self, DataError> {
        let meta_path = dir.join("meta.json");
        let text = std::fs::read_to_string(&meta_path).map_err(|e| DataError::io(&meta_path, e))?;
        let meta: Meta =
            serde_json::from_str(&text).map_err(|e| corrupt(&meta_path, e.to_string()))?;
        if meta.format_version != FORMAT_VERSION {
            return Err(corrupt(
                &meta_path,
                format!(
                    "layout version {} but this build reads {FORMAT_VERSION}",
                    meta.format_version
                ),
            ));
        }
        let index_path = dir.join("index.parquet");
        let t = Table::read_parquet(&index_path)?;
        let ids = col_u32(&t, "image_id", &index_path)?;
        let heights = col_u32(&t, "height", &index_path)?;
        let widths = col_u32(&t, "width", &index_path)?;
        let shards = col_u32(&t, "shard", &index_path)?;
        let offsets = col_u64(&t, "offset", &index_path)?;
        let label_offsets = col_u64(&t, "label_offset", &index_path)?;
        let full_offsets = if meta.full_labels {
            Some(col_u64(&t, "full_offset", &index_path)?)
        } else {
            None
        };
        let paths = match t.column("path") {
            Some(Column::Str(v)) => v,
            _ => return Err(corrupt(&index_path, "column `path` missing")),
        };
        if ids.len() != meta.images {
            return Err(corrupt(
                &index_path,
                format!(
                    "{} rows but meta.json says {} images",
                    ids.len(),
                    meta.images
                ),
            ));
        }
        let entries: Vec<Entry> = (0..ids.len())
            .map(|i| Entry {
                image_id: ids[i],
                path: paths[i].clone(),
                height: heights[i],
                width: widths[i],
                shard: shards[i] as usize,
                offset: offsets[i] as usize,
                label_offset: label_offsets[i] as usize,
                full_offset: full_offsets.map(|f| f[i] as usize),
            })
            .collect();
        let map_all = |kind: &str| -> Result<Vec<Mmap>, DataError> {
            (0..meta.shards)
                .map(|s| map_file(&shard_path(dir, kind, s)))
                .collect()
        };
        let images = map_all("images")?;
        let labels = map_all("labels")?;
        let full = if meta.full_labels {
            map_all("full-labels")?
        } else {
            Vec::new()
        };
        let ds = Dataset {
            dir: dir.to_path_buf(),
            meta,
            entries,
            images,
            labels,
            full,
        };
        ds.validate()?;
        Ok(ds)
    }

    fn validate(&self) -> Result<(), DataError> {
        let px = self.pixels();
        for e in &self.entries {
            let check = |maps: &[Mmap], kind: &str, start: usize, len: usize| {
                let ok = maps.get(e.shard).is_some_and(|m| start + len <= m.len());
                if ok {
                    Ok(())
                } else {
                    Err(corrupt(
                        &shard_path(&self.dir, kind, e.shard),
                        format!("record of `{}` is past the end of the shard", e.path),
                    ))
                }
            };
            check(&self.images, "images", e.offset, px * 3)?;
            check(&self.labels, "labels", e.label_offset, px)?;
            if let Some(f) = e.full_offset {
                let len = e.width as usize * e.height as usize;
                check(&self.full, "full-labels", f, len)?;
            }
        }
        Ok(())
    }

    fn pixels(&self) -> usize {
        self.meta.width as usize * self.meta.height as usize
    }

    /// The artifact's `meta.json`.
    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the dataset has no samples.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Record size as (width, height).
    pub fn size(&self) -> (u32, u32) {
        (self.meta.width, self.meta.height)
    }

    /// Number of classes.
    pub fn classes(&self) -> u32 {
        self.meta.classes
    }

    /// Original (width, height) of sample `i`.
    pub fn original_size(&self, i: usize) -> Option<(u32, u32)> {
        self.entries.get(i).map(|e| (e.width, e.height))
    }

    /// Sample `i`, or `None` past the end.
    pub fn get(&self, i: usize) -> Option<Item<'_>> {
        let e = self.entries.get(i)?;
        let px = self.pixels();
        Some(Item {
            image_id: e.image_id,
            path: &e.path,
            image: &self.images[e.shard][e.offset..e.offset + 3 * px],
            label: &self.labels[e.shard][e.label_offset..e.label_offset + px],
        })
    }

    /// The full-resolution label of sample `i` (only with `keep_full_labels`).
    pub fn full_label(&self, i: usize) -> Option<FullLabel<'_>> {
        let e = self.entries.get(i)?;
        let start = e.full_offset?;
        let len = e.width as usize * e.height as usize;
        Some(FullLabel {
            width: e.width,
            height: e.height,
            data: &self.full[e.shard][start..start + len],
        })
    }

    /// Builds a batch of the given samples in ADVENT's input convention (see [`Batch`] for the
    /// layout). Panics on an index past the end, like slice indexing.
    pub fn batch(&self, indices: &[usize]) -> Batch {
        self.batch_as(indices, &Normalisation::CAFFE_BGR)
    }

    /// [`Dataset::batch`] with the images normalised as `norm` says.
    pub fn batch_as(&self, indices: &[usize], norm: &Normalisation) -> Batch {
        let px = self.pixels();
        let mut images = vec![0f32; indices.len() * 3 * px];
        let mut labels = Vec::with_capacity(indices.len() * px);
        for (k, &i) in indices.iter().enumerate() {
            let item = self
                .get(i)
                .unwrap_or_else(|| panic!("index {i} out of range (len {})", self.len()));
            norm.apply(item.image, &mut images[k * 3 * px..(k + 1) * 3 * px]);
            labels.extend_from_slice(item.label);
        }
        Batch {
            images,
            labels,
            shape: [
                indices.len(),
                3,
                self.meta.height as usize,
                self.meta.width as usize,
            ],
            indices: indices.to_vec(),
        }
    }
}

/// Draws dataset indices in a seeded random order: every epoch is a fresh permutation of all
/// samples, so each sample is seen once per epoch. The state is just the number of indices
/// drawn, so a resumed training run continues exactly where it stopped ([`Sampler::at`]).
#[derive(Debug, Clone)]
pub struct Sampler {
    len: usize,
    seed: u64,
    epoch: u64,
    perm: Vec<usize>,
    pos: usize,
}

impl Sampler {
    /// A sampler over `len` samples (`len` > 0).
    pub fn new(len: usize, seed: u64) -> Self {
        Self::at(len, seed, 0)
    }

    /// The sampler that has already drawn `drawn` indices.
    pub fn at(len: usize, seed: u64, drawn: u64) -> Self {
        assert!(len > 0, "cannot sample from an empty dataset");
        let epoch = drawn / len as u64;
        let mut s = Sampler {
            len,
            seed,
            epoch,
            perm: Vec::new(),
            pos: (drawn % len as u64) as usize,
        };
        s.shuffle();
        s
    }

    fn shuffle(&mut self) {
        // One independent stream per epoch, so that jumping to any epoch is O(len).
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(self.epoch);
        self.perm = (0..self.len).collect();
        self.perm.shuffle(&mut rng);
    }

    /// Total number of indices drawn so far.
    pub fn drawn(&self) -> u64 {
        self.epoch * self.len as u64 + self.pos as u64
    }

    /// The next `n` indices.
    pub fn next_batch(&mut self, n: usize) -> Vec<usize> {
        (0..n).map(|_| self.next_index()).collect()
    }

    /// The next index.
    pub fn next_index(&mut self) -> usize {
        if self.pos == self.len {
            self.epoch += 1;
            self.pos = 0;
            self.shuffle();
        }
        self.pos += 1;
        self.perm[self.pos - 1]
    }
}

impl Iterator for Sampler {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        Some(self.next_index())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampler_covers_each_epoch_and_resumes() {
        let mut s = Sampler::new(7, 42);
        let first: Vec<usize> = s.next_batch(7);
        let mut sorted = first.clone();
        sorted.sort();
        assert_eq!(sorted, (0..7).collect::<Vec<_>>());
        let second = s.next_batch(7);
        assert_ne!(first, second, "each epoch is reshuffled");
        let mut resumed = Sampler::at(7, 42, 10);
        let mut cont = Sampler::new(7, 42);
        cont.next_batch(10);
        assert_eq!(resumed.next_batch(9), cont.next_batch(9));
        assert_eq!(resumed.drawn(), 19);
        assert_ne!(
            Sampler::new(50, 1).next_batch(50),
            Sampler::new(50, 2).next_batch(50)
        );
    }

    #[test]
    fn imagenet_normalisation_keeps_rgb_and_divides_by_the_std() {
        let n = Normalisation::IMAGENET_RGB;
        let mut out = [0f32; 3];
        n.apply(&[124, 116, 104], &mut out);
        let expect = [
            (124.0 - 123.675) / 58.395,
            (116.0 - 116.28) / 57.12,
            (104.0 - 103.53) / 57.375,
        ];
        assert_eq!(out, expect);
        for (c, v) in out.iter().enumerate() {
            let back = n.from_unit(c, n.to_unit(c, *v));
            assert!((back - v).abs() < 1e-5);
        }
    }

    #[test]
    fn bgr_conversion_subtracts_the_mean_per_channel() {
        let rgb = [10u8, 20, 30, 40, 50, 60];
        let mut out = [0f32; 6];
        Normalisation::CAFFE_BGR.apply(&rgb, &mut out);
        let expect = [
            30.0 - MEAN_BGR[0],
            60.0 - MEAN_BGR[0],
            20.0 - MEAN_BGR[1],
            50.0 - MEAN_BGR[1],
            10.0 - MEAN_BGR[2],
            40.0 - MEAN_BGR[2],
        ];
        assert_eq!(out, expect);
    }
}
