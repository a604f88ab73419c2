//! Decode, resize and map a dataset into the shard artifact described in [`crate::shards`].
//!
//! Samples are decoded by one worker thread per core (as many as rayon's pool has, so
//! `RAYON_NUM_THREADS` applies), each reusing its decode buffers from one sample to the next,
//! while the calling thread writes the finished samples in order. Workers run at most a few
//! samples ahead of the writer, so memory does not grow with the dataset, and the output is
//! byte-identical whatever the number of threads.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Condvar, Mutex};

use fast_image_resize::Resizer;

use crate::fastpng::{self, PngBuffers};
use crate::formats::{discover, Format, SampleRef};
use crate::pngio::{read_label, read_rgb, LabelEncoding};
use crate::protocol::{LabelLut, Protocol, IGNORE};
use crate::resize::{nearest_source, resize_nearest, resize_rgb_bicubic_with};
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

/// What a worker reuses from one sample to the next, so that the large decode buffers are
/// neither allocated nor zeroed per image.
#[derive(Default)]
struct Scratch {
    png: PngBuffers,
    rgb: Vec<u8>,
    resizer: Resizer,
}

/// A label, mapped to classes and resized.
struct Label {
    width: u32,
    height: u32,
    resized: Vec<u8>,
    full: Option<Vec<u8>>,
}

/// Reads a label, maps it through `lut` and resizes it by nearest neighbour to the output size.
/// For 8-bit id PNGs this happens row by row while decoding, and only the sampled pixels are
/// mapped; everything else goes through [`read_label`] and [`resize_nearest`] (same result).
fn read_label_resized(
    path: &Path,
    cfg: &PreprocessConfig,
    lut: &LabelLut,
    png: &mut PngBuffers,
) -> Result<Label, DataError> {
    let encoding = cfg.format.label_encoding();
    let (dw, dh) = (cfg.width as usize, cfg.height as usize);
    if encoding == LabelEncoding::Ids {
        let (mut resized, mut full, mut cols, mut next) = (Vec::new(), Vec::new(), Vec::new(), 0);
        let table = &lut.0;
        let header = fastpng::decode_ids(path, png, |h, y, ids| {
            if y == 0 {
                cols = (0..cfg.width)
                    .map(|x| nearest_source(x, h.width as u32, cfg.width))
                    .collect::<Vec<_>>();
                resized.resize(dw * dh, 0);
                if cfg.keep_full_labels {
                    full.resize(h.width * h.height, 0);
                }
            }
            if cfg.keep_full_labels {
                let out = &mut full[y * h.width..][..h.width];
                for (o, &v) in out.iter_mut().zip(ids) {
                    *o = table[v as usize];
                }
            }
            while next < dh && nearest_source(next as u32, h.height as u32, cfg.height) == y {
                for (o, &x) in resized[next * dw..][..dw].iter_mut().zip(&cols) {
                    *o = table[ids[x] as usize];
                }
                next += 1;
            }
        });
        if let Some(h) = header {
            return Ok(Label {
                width: h.width as u32,
                height: h.height as u32,
                resized,
                full: cfg.keep_full_labels.then_some(full),
            });
        }
    }
    let lab = read_label(path, encoding, lut)?;
    Ok(Label {
        width: lab.width,
        height: lab.height,
        resized: resize_nearest(&lab.data, lab.width, lab.height, cfg.width, cfg.height),
        full: cfg.keep_full_labels.then_some(lab.data),
    })
}

/// Pixels per class id (255 = ignore is left out), counted in four interleaved histograms so
/// that runs of one class do not serialise on the same counter.
fn class_counts(label: &[u8], classes: usize) -> Vec<u64> {
    let mut hist = [[0u64; 256]; 4];
    let mut quads = label.chunks_exact(4);
    for q in &mut quads {
        for k in 0..4 {
            hist[k][q[k] as usize] += 1;
        }
    }
    for &c in quads.remainder() {
        hist[0][c as usize] += 1;
    }
    (0..classes)
        .map(|c| {
            if c == IGNORE as usize {
                0
            } else {
                hist.iter().map(|h| h[c]).sum()
            }
        })
        .collect()
}

fn process(
    s: &SampleRef,
    cfg: &PreprocessConfig,
    lut: &LabelLut,
    classes: usize,
    scratch: &mut Scratch,
) -> Result<Processed, DataError> {
    let (width, height) = match fastpng::decode_rgb(&s.image, &mut scratch.png, &mut scratch.rgb) {
        Some(h) => (h.width as u32, h.height as u32),
        None => {
            let img = read_rgb(&s.image)?;
            scratch.rgb = img.data;
            (img.width, img.height)
        }
    };
    let lab = read_label_resized(&s.label, cfg, lut, &mut scratch.png)?;
    if (width, height) != (lab.width, lab.height) {
        return Err(DataError::SizeMismatch {
            image: s.image.clone(),
            image_size: (width, height),
            label: s.label.clone(),
            label_size: (lab.width, lab.height),
        });
    }
    // A label without one pixel of a kept class is almost always the wrong file (a trainId or
    // instance PNG, another dataset's ids): every id outside the format's table maps to ignore,
    // so it would train on nothing and evaluate as empty without a word.
    let mapped = lab.full.as_deref().unwrap_or(&lab.resized);
    if !mapped.is_empty() && mapped.iter().all(|&c| c == IGNORE) {
        return Err(DataError::LabelFormat {
            path: s.label.clone(),
            reason: format!(
                "no pixel holds a label id of a kept class of the {} format (ids outside its \
                 table count as ignore); is it the right label file?",
                cfg.format.name()
            ),
        });
    }
    let rgb = resize_rgb_bicubic_with(
        &mut scratch.resizer,
        &scratch.rgb,
        width,
        height,
        cfg.width,
        cfg.height,
    )?;
    Ok(Processed {
        id: s.id.clone(),
        orig: (width, height),
        rgb,
        counts: class_counts(&lab.resized, classes),
        label: lab.resized,
        full: lab.full,
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

/// How often [`preprocess`] reports progress, in samples.
const PROGRESS_EVERY: usize = 8;

/// Samples a worker may run ahead of the writer, per worker: this bounds the memory held by
/// processed samples that wait to be written, whatever the dataset size.
const AHEAD_PER_WORKER: usize = 2;

/// Runs `work` on every item with `threads` workers (each with its own `S`) and hands the results
/// to `sink` on the calling thread in item order, while the workers go on with the next items.
/// Workers stay at most `threads * AHEAD_PER_WORKER` items ahead of `sink`. Stops at the first
/// error of `sink` (or when `cancelled()`), and returns it.
fn in_order<T: Sync, R: Send, S: Default>(
    items: &[T],
    threads: usize,
    work: impl Fn(&T, &mut S) -> R + Sync,
    mut sink: impl FnMut(usize, R) -> Result<(), DataError>,
    cancelled: &(dyn Fn() -> bool + Sync),
) -> Result<(), DataError> {
    let total = items.len();
    let window = threads * AHEAD_PER_WORKER;
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    // The number of items taken by `sink` so far, and its change signal.
    let written = (Mutex::new(0usize), Condvar::new());
    let halt = || {
        stop.store(true, Ordering::SeqCst);
        let _guard = written.0.lock().unwrap_or_else(|e| e.into_inner());
        written.1.notify_all();
    };
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel::<(usize, R)>();
        for _ in 0..threads.min(total) {
            let tx = tx.clone();
            let (next, stop, written, work, halt) = (&next, &stop, &written, &work, &halt);
            scope.spawn(move || {
                // A panicking worker stops the others, so that the writer is not left waiting.
                struct OnPanic<F: Fn()>(F);
                impl<F: Fn()> Drop for OnPanic<F> {
                    fn drop(&mut self) {
                        if std::thread::panicking() {
                            (self.0)();
                        }
                    }
                }
                let _on_panic = OnPanic(halt);
                let mut state = S::default();
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= total {
                        break;
                    }
                    let mut done = written.0.lock().unwrap_or_else(|e| e.into_inner());
                    while i >= *done + window && !stop.load(Ordering::SeqCst) {
                        done = written.1.wait(done).unwrap_or_else(|e| e.into_inner());
                    }
                    drop(done);
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let r = work(&items[i], &mut state);
                    if tx.send((i, r)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        let mut pending: BTreeMap<usize, R> = BTreeMap::new();
        let mut expected = 0;
        let result = loop {
            if expected == total {
                break Ok(());
            }
            if cancelled() {
                break Err(DataError::Cancelled);
            }
            // Fails only when every worker has gone, i.e. one panicked (re-raised by the scope).
            let Ok((i, r)) = rx.recv() else {
                break Err(DataError::Cancelled);
            };
            pending.insert(i, r);
            let mut failed = None;
            while let Some(r) = pending.remove(&expected) {
                if let Err(e) = sink(expected, r) {
                    failed = Some(e);
                    break;
                }
                expected += 1;
                *written.0.lock().unwrap_or_else(|e| e.into_inner()) = expected;
                written.1.notify_all();
            }
            if let Some(e) = failed {
                break Err(e);
            }
        };
        if result.is_err() {
            halt();
        }
        result
    })
}

/// Preprocesses the dataset described by `cfg` into `out` (an empty directory).
///
/// `progress(done, total)` is called once with `done == 0` when the samples are known, then
/// every few samples and at the end; `cancelled()` is polled between samples.
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
    let total = samples.len();
    progress(0, total);
    let mut write = |s: &SampleRef, r: Result<Processed, DataError>| -> Result<(), DataError> {
        let p = match r {
            Ok(p) => p,
            Err(e) if cfg.allow_skip && e.is_skippable() => {
                skipped.push(Skipped {
                    file: s.id.clone(),
                    reason: e.to_string(),
                });
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let image_id = index.image_id.len() as u32;
        let (shard, offset, label_offset, full_offset) = writer.write(&p)?;
        index.push(image_id, &p, shard, offset, label_offset, full_offset);
        pixels.push(image_id, &p.counts, cfg.protocol);
        Ok(())
    };
    let threads = rayon::current_num_threads().max(1);
    in_order(
        &samples,
        threads,
        |s, scratch: &mut Scratch| process(s, cfg, &lut, classes, scratch),
        |i, r| {
            write(&samples[i], r)?;
            let done = i + 1;
            if done % PROGRESS_EVERY == 0 || done == total {
                progress(done, total);
            }
            Ok(())
        },
        cancelled,
    )?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_hands_results_over_in_order_and_stops_at_the_first_error() {
        let items: Vec<usize> = (0..100).collect();
        // Uneven work, so that workers finish out of order.
        let work = |&i: &usize, calls: &mut usize| {
            *calls += 1;
            std::thread::sleep(std::time::Duration::from_micros((i * 37 % 11) as u64 * 50));
            i * 2
        };
        let mut seen = Vec::new();
        in_order(
            &items,
            3,
            work,
            |i, r| {
                seen.push((i, r));
                Ok(())
            },
            &|| false,
        )
        .unwrap();
        assert_eq!(seen, (0..100).map(|i| (i, i * 2)).collect::<Vec<_>>());

        let mut seen = Vec::new();
        let err = in_order(
            &items,
            3,
            work,
            |i, _| {
                seen.push(i);
                if i == 40 {
                    Err(DataError::Config("stop".into()))
                } else {
                    Ok(())
                }
            },
            &|| false,
        )
        .unwrap_err();
        assert!(matches!(err, DataError::Config(_)));
        assert_eq!(seen, (0..=40).collect::<Vec<_>>());

        let err = in_order(&items, 2, work, |_, _| Ok(()), &|| true).unwrap_err();
        assert!(matches!(err, DataError::Cancelled));
        assert!(in_order(&[] as &[usize], 2, work, |_, _| Ok(()), &|| false).is_ok());
    }
}
