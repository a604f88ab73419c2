//! Decode, resize and map a dataset into the shard artifact described in [`crate::shards`].
//!
//! Samples are processed in chunks: each chunk is decoded on all cores (rayon), then written in
//! order, so memory holds one chunk at a time whatever the dataset size, and the output is
//! byte-identical whatever the number of threads.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::formats::{discover, Format, SampleRef};
use crate::pngio::{read_label, read_rgb};
use crate::protocol::{LabelLut, Protocol, IGNORE};
use crate::resize::{resize_nearest, resize_rgb_bicubic};
use crate::shards::{shard_path, Meta, Skipped, FORMAT_VERSION, MEAN_BGR};
use crate::tables::{Column, Table};
use crate::DataError;

/// What to preprocess and how.
#[derive(Debug, Clone)]
pub struct PreprocessConfig {
    /// The on-disk layout of the dataset.
    pub format: Format,
    /// The dataset's root folder.
    pub root: PathBuf,
    /// A split folder (Cityscapes) or `all` (GTA5, SYNTHIA).
    pub split: String,
    /// A list file of image ids selecting a subset.
    pub list: Option<PathBuf>,
    /// The label protocol to map to.
    pub protocol: Protocol,
    /// Output width of every image and label.
    pub width: u32,
    /// Output height of every image and label.
    pub height: u32,
    /// Also store the labels at their original size (for evaluation at label resolution).
    pub keep_full_labels: bool,
    /// Skip unreadable or unpaired samples (and report them) instead of failing.
    pub allow_skip: bool,
    /// Samples per shard file.
    pub shard_images: usize,
}

/// What [`preprocess`] did.
#[derive(Debug, Clone)]
pub struct PreprocessReport {
    /// Samples written.
    pub images: usize,
    /// Samples skipped (only with `allow_skip`), with the reason.
    pub skipped: Vec<Skipped>,
    /// Shard files written (per kind).
    pub shards: usize,
}

struct Processed {
    id: String,
    orig: (u32, u32),
    rgb: Vec<u8>,
    label: Vec<u8>,
    full: Option<Vec<u8>>,
    counts: Vec<u64>,
}

fn process(
    s: &SampleRef,
    cfg: &PreprocessConfig,
    lut: &LabelLut,
    classes: usize,
) -> Result<Processed, DataError> {
    let (img, lab) = rayon::join(
        || read_rgb(&s.image),
        || read_label(&s.label, cfg.format.label_encoding(), lut),
    );
    let (img, lab) = (img?, lab?);
    if (img.width, img.height) != (lab.width, lab.height) {
        return Err(DataError::SizeMismatch {
            image: s.image.clone(),
            image_size: (img.width, img.height),
            label: s.label.clone(),
            label_size: (lab.width, lab.height),
        });
    }
    let rgb = resize_rgb_bicubic(&img.data, img.width, img.height, cfg.width, cfg.height)?;
    let label = resize_nearest(&lab.data, lab.width, lab.height, cfg.width, cfg.height);
    let mut counts = vec![0u64; classes];
    for &c in &label {
        if c != IGNORE {
            counts[c as usize] += 1;
        }
    }
    Ok(Processed {
        id: s.id.clone(),
        orig: (img.width, img.height),
        rgb,
        label,
        full: cfg.keep_full_labels.then_some(lab.data),
        counts,
    })
}

/// A shard file being written.
type OpenShard = (PathBuf, BufWriter<File>);

/// Appends records to the current shard files and rolls over to the next shard when full.
struct ShardWriter<'a> {
    dir: &'a Path,
    per_shard: usize,
    full: bool,
    shard: usize,
    in_shard: usize,
    full_offset: usize,
    files: Option<[Option<OpenShard>; 3]>,
}

impl ShardWriter<'_> {
    fn open(&self, kind: &str) -> Result<OpenShard, DataError> {
        let path = shard_path(self.dir, kind, self.shard);
        let f = File::create(&path).map_err(|e| DataError::io(&path, e))?;
        Ok((path, BufWriter::with_capacity(1 << 20, f)))
    }

    fn close(&mut self) -> Result<(), DataError> {
        for (path, mut w) in self.files.take().into_iter().flatten().flatten() {
            w.flush().map_err(|e| DataError::io(&path, e))?;
        }
        Ok(())
    }

    /// Writes one record; returns (shard, image offset, label offset, full-label offset).
    fn write(&mut self, p: &Processed) -> Result<(usize, usize, usize, usize), DataError> {
        if self.in_shard == self.per_shard {
            self.close()?;
            self.shard += 1;
            self.in_shard = 0;
            self.full_offset = 0;
        }
        if self.files.is_none() {
            let full = if self.full {
                Some(self.open("full-labels")?)
            } else {
                None
            };
            self.files = Some([Some(self.open("images")?), Some(self.open("labels")?), full]);
        }
        let files = self.files.as_mut().expect("opened above");
        let slot = self.in_shard;
        let records: [Option<&[u8]>; 3] = [Some(&p.rgb), Some(&p.label), p.full.as_deref()];
        for (file, data) in files.iter_mut().zip(records) {
            if let (Some((path, w)), Some(data)) = (file, data) {
                w.write_all(data)
                    .map_err(|e| DataError::io(path.as_path(), e))?;
            }
        }
        let full_offset = self.full_offset;
        self.full_offset += p.full.as_ref().map_or(0, Vec::len);
        self.in_shard += 1;
        Ok((
            self.shard,
            slot * p.rgb.len(),
            slot * p.label.len(),
            full_offset,
        ))
    }
}

/// Preprocesses the dataset described by `cfg` into `out` (an empty directory).
///
/// `progress(done, total)` is called once with `done == 0` when the samples are known, then
/// after every chunk; `cancelled()` is polled between chunks.
pub fn preprocess(
    cfg: &PreprocessConfig,
    out: &Path,
    progress: &(dyn Fn(usize, usize) + Sync),
    cancelled: &(dyn Fn() -> bool + Sync),
) -> Result<PreprocessReport, DataError> {
    if cfg.width == 0 || cfg.height == 0 || cfg.shard_images == 0 {
        return Err(DataError::Config(
            "size and shard_images must be positive".into(),
        ));
    }
    let found = discover(cfg.format, &cfg.root, &cfg.split, cfg.list.as_deref())?;
    let mut skipped = Vec::new();
    for problem in found.problems {
        if !cfg.allow_skip {
            return Err(problem);
        }
        // Relative to the root, so that the artifact does not depend on where the data lives.
        let file = problem
            .path()
            .map(|p| p.strip_prefix(&cfg.root).unwrap_or(p).display().to_string())
            .unwrap_or_default();
        skipped.push(Skipped {
            file,
            reason: problem.to_string(),
        });
    }
    let samples = found.samples;
    let classes = cfg.protocol.num_classes();
    let lut = cfg.protocol.lut(cfg.format.id_space());
    let shard_dir = out.join("shards");
    std::fs::create_dir_all(&shard_dir).map_err(|e| DataError::io(&shard_dir, e))?;

    let mut writer = ShardWriter {
        dir: out,
        per_shard: cfg.shard_images,
        full: cfg.keep_full_labels,
        shard: 0,
        in_shard: 0,
        full_offset: 0,
        files: None,
    };
    let mut index = IndexColumns::default();
    let mut pixels = PixelColumns::default();
    let chunk = (rayon::current_num_threads() * 4).max(8);
    let total = samples.len();
    let mut done = 0;
    progress(0, total);
    for part in samples.chunks(chunk) {
        if cancelled() {
            return Err(DataError::Cancelled);
        }
        let results: Vec<Result<Processed, DataError>> = part
            .par_iter()
            .map(|s| process(s, cfg, &lut, classes))
            .collect();
        for (s, r) in part.iter().zip(results) {
            let p = match r {
                Ok(p) => p,
                Err(e) if cfg.allow_skip && e.is_skippable() => {
                    skipped.push(Skipped {
                        file: s.id.clone(),
                        reason: e.to_string(),
                    });
                    continue;
                }
                Err(e) => return Err(e),
            };
            let image_id = index.image_id.len() as u32;
            let (shard, offset, label_offset, full_offset) = writer.write(&p)?;
            index.push(image_id, &p, shard, offset, label_offset, full_offset);
            pixels.push(image_id, &p.counts, cfg.protocol);
        }
        done += part.len();
        progress(done, total);
    }
    writer.close()?;
    let images = index.image_id.len();
    if images == 0 {
        return Err(DataError::Empty {
            dir: cfg.root.clone(),
        });
    }
    let shards = images.div_ceil(cfg.shard_images);
    index.write(&out.join("index.parquet"), cfg.keep_full_labels)?;
    pixels.write(&out.join("class_pixels.parquet"))?;

    let meta = Meta {
        format_version: FORMAT_VERSION,
        format: cfg.format.name().into(),
        split: cfg.split.clone(),
        protocol: cfg.protocol.name().into(),
        classes: classes as u32,
        class_names: cfg
            .protocol
            .class_names()
            .into_iter()
            .map(String::from)
            .collect(),
        colors: cfg.protocol.colors(),
        width: cfg.width,
        height: cfg.height,
        layout: "images: u8 RGB HWC; labels: u8 class ids HW, 255 = ignore".into(),
        mean_bgr: MEAN_BGR,
        images,
        shard_images: cfg.shard_images,
        shards,
        full_labels: cfg.keep_full_labels,
        skipped: skipped.clone(),
    };
    let meta_path = out.join("meta.json");
    let text = serde_json::to_string_pretty(&meta).expect("meta serializes");
    std::fs::write(&meta_path, text + "\n").map_err(|e| DataError::io(&meta_path, e))?;
    Ok(PreprocessReport {
        images,
        skipped,
        shards,
    })
}

#[derive(Default)]
struct IndexColumns {
    image_id: Vec<u32>,
    path: Vec<String>,
    height: Vec<u32>,
    width: Vec<u32>,
    shard: Vec<u32>,
    offset: Vec<u64>,
    label_offset: Vec<u64>,
    full_offset: Vec<u64>,
}

impl IndexColumns {
    fn push(&mut self, id: u32, p: &Processed, shard: usize, off: usize, loff: usize, foff: usize) {
        self.image_id.push(id);
        self.path.push(p.id.clone());
        self.width.push(p.orig.0);
        self.height.push(p.orig.1);
        self.shard.push(shard as u32);
        self.offset.push(off as u64);
        self.label_offset.push(loff as u64);
        self.full_offset.push(foff as u64);
    }

    fn write(self, path: &Path, full: bool) -> Result<(), DataError> {
        let mut t = Table::new()
            .with("image_id", Column::U32(self.image_id))
            .with("path", Column::Str(self.path))
            .with("height", Column::U32(self.height))
            .with("width", Column::U32(self.width))
            .with("shard", Column::U32(self.shard))
            .with("offset", Column::U64(self.offset))
            .with("label_offset", Column::U64(self.label_offset));
        if full {
            t.push("full_offset", Column::U64(self.full_offset));
        }
        t.write_parquet(path)
    }
}

#[derive(Default)]
struct PixelColumns {
    image_id: Vec<u32>,
    class_id: Vec<u32>,
    class_name: Vec<String>,
    pixels: Vec<u64>,
}

impl PixelColumns {
    fn push(&mut self, id: u32, counts: &[u64], protocol: Protocol) {
        let names = protocol.class_names();
        for (c, &n) in counts.iter().enumerate().filter(|&(_, &n)| n > 0) {
            self.image_id.push(id);
            self.class_id.push(c as u32);
            self.class_name.push(names[c].to_string());
            self.pixels.push(n);
        }
    }

    fn write(self, path: &Path) -> Result<(), DataError> {
        Table::new()
            .with("image_id", Column::U32(self.image_id))
            .with("class_id", Column::U32(self.class_id))
            .with("class_name", Column::Str(self.class_name))
            .with("pixels", Column::U64(self.pixels))
            .write_parquet(path)
    }
}
