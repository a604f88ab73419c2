//! The synthetic benchmark: deterministic, in the real formats, with a domain shift.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use dag_data::formats::Format;
use dag_data::{
    generate, preprocess, Column, Dataset, PreprocessConfig, Protocol, SynthConfig, Table,
};

fn small(seed: u64) -> SynthConfig {
    SynthConfig {
        source_images: 4,
        target_train: 5,
        target_val: 2,
        width: 96,
        height: 48,
        seed,
    }
}

fn gen(cfg: &SynthConfig, dir: &Path) {
    generate(
        cfg,
        &dir.join("source"),
        &dir.join("target"),
        &|_, _| {},
        &|| false,
    )
    .unwrap();
}

/// Relative path -> bytes of every file under `dir`.
fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().display().to_string();
                out.insert(rel, fs::read(&p).unwrap());
            }
        }
    }
    out
}

#[test]
fn same_seed_same_bytes_other_seed_other_bytes() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let c = tempfile::tempdir().unwrap();
    gen(&small(11), a.path());
    // Another thread count must not change a byte.
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap()
        .install(|| gen(&small(11), b.path()));
    gen(&small(12), c.path());
    let (ta, tb, tc) = (tree(a.path()), tree(b.path()), tree(c.path()));
    assert_eq!(
        ta.len(),
        4 * 2 + 7 * 2 + 1,
        "{:?}",
        ta.keys().collect::<Vec<_>>()
    );
    assert!(ta.contains_key("source/RGB/0000003.png"));
    assert!(ta.contains_key("source/GT/LABELS/0000000.png"));
    assert!(ta.contains_key("target/leftImg8bit/train/arden/arden_000000_000000_leftImg8bit.png"));
    assert!(ta.contains_key("target/gtFine/val/dunmore/dunmore_000000_000001_gtFine_labelIds.png"));
    assert!(ta.contains_key("target/difficulty.parquet"));
    assert!(ta == tb, "same seed must give byte-identical trees");
    assert_eq!(ta.keys().collect::<Vec<_>>(), tc.keys().collect::<Vec<_>>());
    let differing = ta
        .iter()
        .filter(|(k, v)| k.ends_with(".png") && tc[*k] != **v)
        .count();
    assert_eq!(differing, 22, "every image differs with another seed");
}

fn prep(format: Format, root: &Path, split: &str, classes: u32, out: &Path) -> Dataset {
    let cfg = PreprocessConfig {
        format,
        root: root.to_path_buf(),
        split: split.into(),
        list: None,
        protocol: Protocol::from_classes(classes).unwrap(),
        width: 48,
        height: 24,
        keep_full_labels: true,
        allow_skip: false,
        shard_images: 3,
    };
    preprocess(&cfg, out, &|_, _| {}, &|| false).unwrap();
    Dataset::open(out).unwrap()
}

#[test]
fn the_real_readers_read_the_synthetic_trees() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = small(5);
    cfg.source_images = 12;
    cfg.target_train = 12;
    gen(&cfg, dir.path());
    let src = prep(
        Format::Synthia,
        &dir.path().join("source"),
        "all",
        16,
        &dir.path().join("s"),
    );
    let tgt = prep(
        Format::Cityscapes,
        &dir.path().join("target"),
        "train",
        16,
        &dir.path().join("t"),
    );
    let val = prep(
        Format::Cityscapes,
        &dir.path().join("target"),
        "val",
        19,
        &dir.path().join("v"),
    );
    assert_eq!((src.len(), tgt.len(), val.len()), (12, 12, 2));

    // Classes drawn, in 16-class ids: road 0, sidewalk 1, building 2, pole 5, light 6, sign 7,
    // vegetation 8, sky 9, person 10, car 12.
    let drawn = [0u8, 1, 2, 5, 6, 7, 8, 9, 10, 12];
    for (name, ds) in [("source", &src), ("target", &tgt)] {
        let mut hist = [0usize; 256];
        for i in 0..ds.len() {
            for &c in ds.full_label(i).unwrap().data {
                hist[c as usize] += 1;
            }
        }
        for (c, &n) in hist.iter().enumerate() {
            let expected = drawn.contains(&(c as u8)) || (name == "target" && c == 255);
            assert_eq!(n > 0, expected, "{name}: class {c} count {n}");
        }
    }
    // The target's ego vehicle is ignored: bottom-centre pixels are 255.
    let full = tgt.full_label(0).unwrap();
    let w = full.width as usize;
    assert_eq!(full.data[(full.height as usize - 1) * w + w / 2], 255);

    // A real shift: the mean colour of road pixels differs between the domains.
    let road_mean = |ds: &Dataset| {
        let (mut sum, mut n) = ([0f64; 3], 0f64);
        for i in 0..ds.len() {
            let item = ds.get(i).unwrap();
            for (p, &l) in item.image.chunks(3).zip(item.label) {
                if l == 0 {
                    for k in 0..3 {
                        sum[k] += p[k] as f64;
                    }
                    n += 1.0;
                }
            }
        }
        sum.map(|s| s / n)
    };
    let (a, b) = (road_mean(&src), road_mean(&tgt));
    let dist: f64 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!(dist > 15.0, "road colours too close: {a:?} vs {b:?}");

    let t = Table::read_parquet(&dir.path().join("target/difficulty.parquet")).unwrap();
    assert_eq!(t.num_rows(), 14);
    let Some(Column::F32(d)) = t.column("difficulty") else {
        panic!("difficulty column");
    };
    assert!(d.iter().all(|v| (0.0..=1.0).contains(v)));
    let spread =
        d.iter().cloned().fold(f32::MIN, f32::max) - d.iter().cloned().fold(f32::MAX, f32::min);
    assert!(
        spread > 0.3,
        "difficulties should spread over [0, 1]: {d:?}"
    );
    let Some(Column::Str(images)) = t.column("image") else {
        panic!("image column");
    };
    // The ids join with the preprocessed index.
    assert!(images.iter().any(|p| p == tgt.get(0).unwrap().path));
}
