//! Fixture trees in each real format, written here, read back pixel for pixel.

use std::fs;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use dag_data::formats::{discover, Format};
use dag_data::pngio::{read_label, write_label_png, write_png, write_rgb_png, LabelEncoding};
use dag_data::protocol::{IdSpace, IGNORE};
use dag_data::shards::{Normalisation, MEAN_BGR};
use dag_data::{preprocess, Column, DataError, Dataset, PreprocessConfig, Protocol, Table};
use png::{BitDepth, ColorType};

const W: u32 = 6;
const H: u32 = 4;

/// Cityscapes label ids of the fixture: every class of interest plus void (0), ego vehicle (1),
/// terrain (22), truck (27), train (31), and license plate (-1 stored as 255).
const CS_IDS: [u8; 24] = [
    7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33, 0, 1, 4, 255, 30,
];
/// The 19-class mapping from methods.md, written out independently of the library.
fn cs19(id: u8) -> u8 {
    match id {
        7 => 0,
        8 => 1,
        11 => 2,
        12 => 3,
        13 => 4,
        17 => 5,
        19 => 6,
        20 => 7,
        21 => 8,
        22 => 9,
        23 => 10,
        24 => 11,
        25 => 12,
        26 => 13,
        27 => 14,
        28 => 15,
        31 => 16,
        32 => 17,
        33 => 18,
        _ => 255,
    }
}
/// The Cityscapes 16-class mapping from methods.md.
fn cs16(id: u8) -> u8 {
    match id {
        7 => 0,
        8 => 1,
        11 => 2,
        12 => 3,
        13 => 4,
        17 => 5,
        19 => 6,
        20 => 7,
        21 => 8,
        23 => 9,
        24 => 10,
        25 => 11,
        26 => 12,
        28 => 13,
        32 => 14,
        33 => 15,
        _ => 255,
    }
}
/// The SYNTHIA 16-class mapping from methods.md.
fn syn16(id: u16) -> u8 {
    match id {
        3 => 0,
        4 => 1,
        2 => 2,
        21 => 3,
        5 => 4,
        7 => 5,
        15 => 6,
        9 => 7,
        6 => 8,
        1 => 9,
        10 => 10,
        17 => 11,
        8 => 12,
        19 => 13,
        12 => 14,
        11 => 15,
        _ => 255,
    }
}
/// The SYNTHIA 19-class mapping from methods.md.
fn syn19(id: u16) -> u8 {
    match id {
        3 => 0,
        4 => 1,
        2 => 2,
        21 => 3,
        5 => 4,
        7 => 5,
        15 => 6,
        9 => 7,
        6 => 8,
        16 => 9,
        1 => 10,
        10 => 11,
        17 => 12,
        8 => 13,
        18 => 14,
        19 => 15,
        20 => 16,
        12 => 17,
        11 => 18,
        _ => 255,
    }
}

fn rgb_pattern(seed: u8) -> Vec<u8> {
    (0..W * H * 3)
        .map(|i| (i as u8).wrapping_mul(37).wrapping_add(seed))
        .collect()
}

fn cs_label(seed: usize) -> Vec<u8> {
    (0..(W * H) as usize)
        .map(|i| CS_IDS[(i + seed) % CS_IDS.len()])
        .collect()
}

fn mkdirs(p: &Path) {
    fs::create_dir_all(p).unwrap();
}

/// A Cityscapes tree with `n` train images in two cities.
fn cityscapes(root: &Path, n: usize) -> Vec<(String, Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    for i in 0..n {
        let city = if i % 2 == 0 { "aachen" } else { "bremen" };
        let stem = format!("{city}_000000_{i:06}");
        let img_dir = root.join("leftImg8bit/train").join(city);
        let lab_dir = root.join("gtFine/train").join(city);
        mkdirs(&img_dir);
        mkdirs(&lab_dir);
        let rgb = rgb_pattern(i as u8);
        let ids = cs_label(i);
        write_rgb_png(&img_dir.join(format!("{stem}_leftImg8bit.png")), W, H, &rgb).unwrap();
        write_label_png(
            &lab_dir.join(format!("{stem}_gtFine_labelIds.png")),
            W,
            H,
            &ids,
        )
        .unwrap();
        // Other label kinds of gtFine must be ignored.
        write_rgb_png(
            &lab_dir.join(format!("{stem}_gtFine_color.png")),
            W,
            H,
            &rgb,
        )
        .unwrap();
        out.push((format!("{city}/{stem}_leftImg8bit.png"), rgb, ids));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn config(format: Format, root: &Path, split: &str, classes: u32) -> PreprocessConfig {
    PreprocessConfig {
        format,
        root: root.to_path_buf(),
        split: split.into(),
        list: None,
        protocol: Protocol::from_classes(classes).unwrap(),
        width: W,
        height: H,
        keep_full_labels: false,
        allow_skip: false,
        shard_images: 256,
    }
}

fn run(cfg: &PreprocessConfig, out: &Path) -> Result<dag_data::PreprocessReport, DataError> {
    preprocess(cfg, out, &|_, _| {}, &|| false)
}

#[test]
fn cityscapes_maps_every_id_to_19_and_16_classes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cs");
    let samples = cityscapes(&root, 3);
    for (classes, map) in [(19, cs19 as fn(u8) -> u8), (16, cs16)] {
        let out = dir.path().join(format!("out{classes}"));
        let report = run(&config(Format::Cityscapes, &root, "train", classes), &out).unwrap();
        assert_eq!(report.images, 3);
        assert!(report.skipped.is_empty());
        let ds = Dataset::open(&out).unwrap();
        assert_eq!(ds.len(), 3);
        assert_eq!(ds.classes(), classes);
        for (i, (id, rgb, ids)) in samples.iter().enumerate() {
            let item = ds.get(i).unwrap();
            assert_eq!(item.path, id);
            assert_eq!(
                item.image,
                &rgb[..],
                "same size: pixels are stored unchanged"
            );
            let want: Vec<u8> = ids.iter().map(|&v| map(v)).collect();
            assert_eq!(item.label, &want[..], "{classes} classes, {id}");
        }
    }
}

#[test]
fn the_13_class_protocol_drops_wall_fence_and_pole() {
    let lut = Protocol::C13.lut(IdSpace::Cityscapes);
    let keep16 = [0u8, 1, 2, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];
    for id in 0..=255u8 {
        let c16 = cs16(id);
        let want = keep16
            .iter()
            .position(|&k| k == c16)
            .map_or(IGNORE, |p| p as u8);
        assert_eq!(lut.map(id as u16), want, "id {id}");
    }
    let lut = Protocol::C13.lut(IdSpace::Synthia);
    for id in 0..=300u16 {
        let c16 = syn16(id);
        let want = keep16
            .iter()
            .position(|&k| k == c16)
            .map_or(IGNORE, |p| p as u8);
        assert_eq!(lut.map(id), want, "synthia id {id}");
    }
}

#[test]
fn protocol_tables_match_methods_md_for_every_id() {
    for id in 0..=255u8 {
        assert_eq!(
            Protocol::C19.lut(IdSpace::Cityscapes).map(id as u16),
            cs19(id)
        );
        assert_eq!(
            Protocol::C16.lut(IdSpace::Cityscapes).map(id as u16),
            cs16(id)
        );
    }
    for id in 0..=1000u16 {
        assert_eq!(Protocol::C19.lut(IdSpace::Synthia).map(id), syn19(id));
        assert_eq!(Protocol::C16.lut(IdSpace::Synthia).map(id), syn16(id));
    }
}

/// Writes a palette PNG whose palette colours have nothing to do with the indices.
fn write_palette_png(path: &Path, w: u32, h: u32, depth: BitDepth, packed: &[u8]) {
    let file = fs::File::create(path).unwrap();
    let mut enc = png::Encoder::new(BufWriter::new(file), w, h);
    enc.set_color(ColorType::Indexed);
    enc.set_depth(depth);
    let palette: Vec<u8> = (0..256u32)
        .flat_map(|i| [(255 - i) as u8, (i * 7) as u8, (i * 13) as u8])
        .collect();
    let entries = 1usize << (depth as u8);
    enc.set_palette(palette[..entries * 3].to_vec());
    let mut wr = enc.write_header().unwrap();
    wr.write_image_data(packed).unwrap();
    wr.finish().unwrap();
}

#[test]
fn gta5_palette_labels_keep_their_indices() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("gta");
    mkdirs(&root.join("images"));
    mkdirs(&root.join("labels"));
    let ids = cs_label(5);
    write_rgb_png(&root.join("images/00001.png"), W, H, &rgb_pattern(1)).unwrap();
    write_palette_png(&root.join("labels/00001.png"), W, H, BitDepth::Eight, &ids);
    // A 4-bit palette PNG: two pixels per byte, only ids < 16.
    let small: Vec<u8> = (0..W * H)
        .map(|i| [7u8, 8, 11, 12, 13, 0, 1, 4][i as usize % 8])
        .collect();
    let packed: Vec<u8> = small
        .chunks(W as usize)
        .flat_map(|row| {
            row.chunks(2)
                .map(|p| p[0] << 4 | p.get(1).copied().unwrap_or(0))
                .collect::<Vec<_>>()
        })
        .collect();
    write_rgb_png(&root.join("images/00002.png"), W, H, &rgb_pattern(2)).unwrap();
    write_palette_png(
        &root.join("labels/00002.png"),
        W,
        H,
        BitDepth::Four,
        &packed,
    );

    let out = dir.path().join("out");
    run(&config(Format::Gta5, &root, "all", 19), &out).unwrap();
    let ds = Dataset::open(&out).unwrap();
    assert_eq!(ds.get(0).unwrap().path, "00001.png");
    let want: Vec<u8> = ids.iter().map(|&v| cs19(v)).collect();
    assert_eq!(ds.get(0).unwrap().label, &want[..]);
    let want: Vec<u8> = small.iter().map(|&v| cs19(v)).collect();
    assert_eq!(ds.get(1).unwrap().label, &want[..]);
}

#[test]
fn synthia_labels_use_the_first_channel_of_16_bit_pngs() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("synthia");
    mkdirs(&root.join("RGB"));
    mkdirs(&root.join("GT/LABELS"));
    // Class ids, including ids above 255 and unmapped ones; the other channels hold values
    // that would map to other classes if read by mistake.
    let classes: Vec<u16> = (0..W * H)
        .map(|i| {
            [
                3u16, 4, 2, 21, 5, 7, 15, 9, 6, 16, 1, 10, 17, 8, 18, 19, 20, 12, 11, 0, 22, 259,
                13, 14,
            ][i as usize % 24]
        })
        .collect();
    let mut raw = Vec::new();
    for (i, &c) in classes.iter().enumerate() {
        for v in [c, 1000 + i as u16, 3] {
            raw.extend_from_slice(&v.to_be_bytes());
        }
    }
    write_rgb_png(&root.join("RGB/0000000.png"), W, H, &rgb_pattern(9)).unwrap();
    let label = root.join("GT/LABELS/0000000.png");
    write_png(&label, W, H, ColorType::Rgb, BitDepth::Sixteen, &raw).unwrap();
    // RGBA 16-bit as well: SYNTHIA ships both.
    let mut rgba = Vec::new();
    for &c in &classes {
        for v in [c, 7, 8, 65535] {
            rgba.extend_from_slice(&v.to_be_bytes());
        }
    }
    write_rgb_png(&root.join("RGB/0000001.png"), W, H, &rgb_pattern(3)).unwrap();
    write_png(
        &root.join("GT/LABELS/0000001.png"),
        W,
        H,
        ColorType::Rgba,
        BitDepth::Sixteen,
        &rgba,
    )
    .unwrap();

    for (n, map) in [(16, syn16 as fn(u16) -> u8), (19, syn19)] {
        let out = dir.path().join(format!("out{n}"));
        run(&config(Format::Synthia, &root, "all", n), &out).unwrap();
        let ds = Dataset::open(&out).unwrap();
        let want: Vec<u8> = classes.iter().map(|&c| map(c)).collect();
        for i in 0..2 {
            assert_eq!(
                ds.get(i).unwrap().label,
                &want[..],
                "{n} classes, image {i}"
            );
        }
    }
    // The image crate would reduce this to 8 bits of colour; the raw reader keeps the ids.
    let direct = read_label(
        &label,
        LabelEncoding::FirstChannel,
        &Protocol::C16.lut(IdSpace::Synthia),
    )
    .unwrap();
    assert_eq!(direct.data[0], 0);
}

#[test]
fn truncated_png_is_named_and_can_be_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cs");
    let samples = cityscapes(&root, 3);
    let bad = root.join("leftImg8bit/train").join(&samples[1].0);
    let bytes = fs::read(&bad).unwrap();
    fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();

    let err = run(
        &config(Format::Cityscapes, &root, "train", 19),
        &dir.path().join("a"),
    )
    .unwrap_err();
    assert!(matches!(err, DataError::Decode { .. }), "{err}");
    assert!(
        err.to_string().contains(&bad.display().to_string()),
        "{err}"
    );
    assert!(err.to_string().contains("allow_skip"), "{err}");

    let mut cfg = config(Format::Cityscapes, &root, "train", 19);
    cfg.allow_skip = true;
    let out = dir.path().join("b");
    let report = run(&cfg, &out).unwrap();
    assert_eq!(report.images, 2);
    assert_eq!(report.skipped.len(), 1);
    assert_eq!(report.skipped[0].file, samples[1].0);
    let ds = Dataset::open(&out).unwrap();
    assert_eq!(ds.meta().skipped.len(), 1);
    assert_eq!(ds.get(1).unwrap().path, samples[2].0);
}

#[test]
fn missing_label_and_orphan_label_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cs");
    let samples = cityscapes(&root, 3);
    let stem = samples[0].0.trim_end_matches("_leftImg8bit.png");
    let label = root.join(format!("gtFine/train/{stem}_gtFine_labelIds.png"));
    fs::remove_file(&label).unwrap();
    let err = run(
        &config(Format::Cityscapes, &root, "train", 19),
        &dir.path().join("a"),
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(msg.starts_with("image "), "{msg}");
    assert!(
        msg.contains(&samples[0].0.replace('/', std::path::MAIN_SEPARATOR_STR)),
        "{msg}"
    );
    assert!(msg.contains(&label.display().to_string()), "{msg}");

    // Put the label back, remove an image instead.
    write_label_png(&label, W, H, &samples[0].2).unwrap();
    let image = root.join("leftImg8bit/train").join(&samples[2].0);
    fs::remove_file(&image).unwrap();
    let err = run(
        &config(Format::Cityscapes, &root, "train", 19),
        &dir.path().join("b"),
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(msg.starts_with("label "), "{msg}");
    assert!(msg.contains(&image.display().to_string()), "{msg}");

    let mut cfg = config(Format::Cityscapes, &root, "train", 19);
    cfg.allow_skip = true;
    let report = run(&cfg, &dir.path().join("c")).unwrap();
    assert_eq!((report.images, report.skipped.len()), (2, 1));
}

#[test]
fn missing_root_and_wrong_split_explain_the_layout() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("nowhere");
    let err = run(
        &config(Format::Synthia, &root, "all", 16),
        &dir.path().join("o"),
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("GT/LABELS/NNNNNNN.png") && msg.contains("nowhere"),
        "{msg}"
    );

    let root = dir.path().join("cs");
    cityscapes(&root, 1);
    let err = run(
        &config(Format::Cityscapes, &root, "val", 19),
        &dir.path().join("o"),
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&root.join("leftImg8bit/val").display().to_string()),
        "{msg}"
    );
    assert!(msg.contains("gtFine/<split>/<city>"), "{msg}");
    let err = run(
        &config(Format::Cityscapes, &root, "all", 19),
        &dir.path().join("o"),
    )
    .unwrap_err();
    assert!(err.to_string().contains("train, val or test"), "{err}");
    let err = run(
        &config(Format::Gta5, &root, "train", 19),
        &dir.path().join("o"),
    )
    .unwrap_err();
    assert!(err.to_string().contains("split: all"), "{err}");
}

#[test]
fn size_mismatch_and_colour_labels_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("gta");
    mkdirs(&root.join("images"));
    mkdirs(&root.join("labels"));
    write_rgb_png(&root.join("images/00001.png"), W, H, &rgb_pattern(1)).unwrap();
    write_label_png(
        &root.join("labels/00001.png"),
        W,
        H - 1,
        &cs_label(0)[..(W * (H - 1)) as usize],
    )
    .unwrap();
    let err = run(
        &config(Format::Gta5, &root, "all", 19),
        &dir.path().join("o"),
    )
    .unwrap_err();
    assert!(matches!(err, DataError::SizeMismatch { .. }), "{err}");
    assert!(
        err.to_string().contains("00001.png is 6x4") && err.to_string().contains("6x3"),
        "{err}"
    );

    write_rgb_png(&root.join("labels/00001.png"), W, H, &rgb_pattern(0)).unwrap();
    let err = run(
        &config(Format::Gta5, &root, "all", 19),
        &dir.path().join("o"),
    )
    .unwrap_err();
    assert!(matches!(err, DataError::LabelFormat { .. }), "{err}");
}

#[test]
fn list_files_select_a_subset_and_name_bad_lines() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cs");
    let samples = cityscapes(&root, 4);
    let list = dir.path().join("easy_split.txt");
    fs::write(
        &list,
        format!("{}\n\n# comment\n{}\n", samples[3].0, samples[1].0),
    )
    .unwrap();
    let mut cfg = config(Format::Cityscapes, &root, "train", 19);
    cfg.list = Some(list.clone());
    let out = dir.path().join("o");
    assert_eq!(run(&cfg, &out).unwrap().images, 2);
    let ds = Dataset::open(&out).unwrap();
    let ids: Vec<&str> = (0..2).map(|i| ds.get(i).unwrap().path).collect();
    assert_eq!(ids, [samples[1].0.as_str(), samples[3].0.as_str()]);

    fs::write(
        &list,
        format!("{}\naachen/nope_leftImg8bit.png\n", samples[0].0),
    )
    .unwrap();
    let err = run(&cfg, &dir.path().join("o2")).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("line 2") && msg.contains("nope_leftImg8bit.png"),
        "{msg}"
    );
}

#[test]
fn resized_shards_full_labels_batches_and_tables() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cs");
    let samples = cityscapes(&root, 5);
    let mut cfg = config(Format::Cityscapes, &root, "train", 19);
    cfg.width = 3;
    cfg.height = 2;
    cfg.keep_full_labels = true;
    cfg.shard_images = 2;
    let out = dir.path().join("o");
    let report = run(&cfg, &out).unwrap();
    assert_eq!(report.shards, 3);
    let ds = Dataset::open(&out).unwrap();
    assert_eq!(ds.size(), (3, 2));
    for (i, (_, _, ids)) in samples.iter().enumerate() {
        let item = ds.get(i).unwrap();
        // Nearest neighbour at pixel centres: (2x+1)*6/6 -> source x = 1, 3, 5; y = 1, 3.
        let want: Vec<u8> = [1usize, 3]
            .iter()
            .flat_map(|&y| [1usize, 3, 5].map(|x| cs19(ids[y * W as usize + x])))
            .collect();
        assert_eq!(item.label, &want[..], "image {i}");
        assert_eq!(item.image.len(), 3 * 2 * 3);
        let full = ds.full_label(i).unwrap();
        assert_eq!((full.width, full.height), (W, H));
        let want: Vec<u8> = ids.iter().map(|&v| cs19(v)).collect();
        assert_eq!(full.data, &want[..]);
        assert_eq!(ds.original_size(i), Some((W, H)));
    }
    assert!(ds.get(5).is_none());

    let batch = ds.batch(&[4, 0]);
    assert_eq!(batch.shape, [2, 3, 2, 3]);
    let mut one = vec![0f32; 18];
    Normalisation::CAFFE_BGR.apply(ds.get(4).unwrap().image, &mut one);
    assert_eq!(&batch.images[..18], &one[..]);
    assert_eq!(
        batch.images[0],
        ds.get(4).unwrap().image[2] as f32 - MEAN_BGR[0]
    );
    assert_eq!(&batch.labels[..6], ds.get(4).unwrap().label);

    let index = Table::read_parquet(&out.join("index.parquet")).unwrap();
    assert_eq!(
        index.column("shard"),
        Some(&Column::U32(vec![0, 0, 1, 1, 2]))
    );
    assert_eq!(
        index.column("offset"),
        Some(&Column::U64(vec![0, 18, 0, 18, 0]))
    );
    let pixels = Table::read_parquet(&out.join("class_pixels.parquet")).unwrap();
    let (Some(Column::U32(img)), Some(Column::U32(cls)), Some(Column::U64(n))) = (
        pixels.column("image_id"),
        pixels.column("class_id"),
        pixels.column("pixels"),
    ) else {
        panic!("class_pixels columns");
    };
    for i in 0..5u32 {
        let label = ds.get(i as usize).unwrap().label;
        for c in 0..19u32 {
            let count = label.iter().filter(|&&v| v as u32 == c).count() as u64;
            let row = (0..img.len()).find(|&r| img[r] == i && cls[r] == c);
            assert_eq!(row.map_or(0, |r| n[r]), count, "image {i} class {c}");
        }
    }
    let meta: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(out.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["class_names"][6], "traffic light");
    assert_eq!(meta["protocol"], "cityscapes19");
}

#[test]
fn corrupt_shards_are_detected_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cs");
    cityscapes(&root, 2);
    let out = dir.path().join("o");
    run(&config(Format::Cityscapes, &root, "train", 19), &out).unwrap();
    let shard: PathBuf = out.join("shards/labels-00000.u8");
    let bytes = fs::read(&shard).unwrap();
    fs::write(&shard, &bytes[..bytes.len() - 1]).unwrap();
    let err = Dataset::open(&out)
        .err()
        .expect("truncated shard must fail");
    assert!(err.to_string().contains("labels-00000.u8"), "{err}");
}

#[test]
fn discovery_is_sorted_and_pairs_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cs");
    let samples = cityscapes(&root, 4);
    let found = discover(Format::Cityscapes, &root, "train", None).unwrap();
    assert!(found.problems.is_empty());
    let ids: Vec<&str> = found.samples.iter().map(|s| s.id.as_str()).collect();
    let want: Vec<&str> = samples.iter().map(|s| s.0.as_str()).collect();
    assert_eq!(ids, want);
    assert!(found.samples[0]
        .label
        .ends_with("aachen/aachen_000000_000000_gtFine_labelIds.png"));
}

/// The tables are read by pyarrow and DuckDB. The interpreter is `$DAG_TEST_PYTHON` (set by
/// `scripts/test.sh`, which installs both), else `python3`; missing modules fail the test.
#[test]
fn parquet_tables_are_readable_by_pyarrow_and_duckdb() {
    let python = std::env::var("DAG_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cs");
    cityscapes(&root, 3);
    let out = dir.path().join("o");
    run(&config(Format::Cityscapes, &root, "train", 19), &out).unwrap();
    let script = format!(
        "import pyarrow.parquet as pq\n\
         t = pq.read_table('{}').to_pydict()\n\
         assert t['path'][0] == 'aachen/aachen_000000_000000_leftImg8bit.png', t\n\
         assert t['width'] == [6, 6, 6] and t['offset'] == [0, 72, 144], t\n\
         p = pq.read_table('{}').to_pydict()\n\
         assert sum(p['pixels']) > 0 and 'road' in p['class_name'], p\n\
         import duckdb\n\
         n = duckdb.sql(\"select sum(pixels) from '{}'\").fetchall()[0][0]\n\
         assert n == 3 * 24 - 3 * 5, n\n",
        out.join("index.parquet").display(),
        out.join("class_pixels.parquet").display(),
        out.join("class_pixels.parquet").display()
    );
    let status = std::process::Command::new(&python)
        .args(["-c", &script])
        .status()
        .unwrap_or_else(|e| panic!("cannot run `{python}` (set DAG_TEST_PYTHON): {e}"));
    assert!(
        status.success(),
        "pyarrow/DuckDB could not read the tables (does `{python}` have pyarrow and duckdb? \
         scripts/test.sh sets one up)"
    );
}
