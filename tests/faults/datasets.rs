//! Malformed datasets: each `dag run` ends within a time limit with an error (exit 1 or 2, never
//! a panic or a signal) that names the offending file or directory.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::*;

const PIPELINE: &str = r#"
name: ds
device: flex
datasets:
  cs: { format: cityscapes, root: data/cs, classes: 16 }
stages:
  val: { kind: preprocess, params: { dataset: cs, split: val, size: [48, 24], keep_full_labels: true } }
"#;

fn pngs(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = walkdir::WalkDir::new(dir)
        .into_iter()
        .flatten()
        .map(|e| e.path().to_path_buf())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    v.sort();
    v
}

fn write_png(
    path: &Path,
    w: u32,
    h: u32,
    color: png::ColorType,
    depth: png::BitDepth,
    data: &[u8],
) {
    let f = fs::File::create(path).unwrap();
    let mut e = png::Encoder::new(std::io::BufWriter::new(f), w, h);
    e.set_color(color);
    e.set_depth(depth);
    e.write_header().unwrap().write_image_data(data).unwrap();
}

fn size_of(path: &Path) -> (u32, u32) {
    let d = png::Decoder::new(std::io::BufReader::new(fs::File::open(path).unwrap()));
    let r = d.read_info().unwrap();
    (r.info().width, r.info().height)
}

type Break = fn(&Path) -> String;

/// Each breaks the dataset under `root` and returns the text the error must contain.
const BREAKS: &[(&str, Break)] = &[
    ("truncated image", |root| {
        let f = &pngs(&root.join("leftImg8bit/val"), "_leftImg8bit.png")[0];
        let len = fs::metadata(f).unwrap().len();
        fs::OpenOptions::new()
            .write(true)
            .open(f)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
        f.file_name().unwrap().to_string_lossy().into_owned()
    }),
    ("truncated label", |root| {
        let f = &pngs(&root.join("gtFine/val"), "_labelIds.png")[0];
        fs::OpenOptions::new()
            .write(true)
            .open(f)
            .unwrap()
            .set_len(40)
            .unwrap();
        f.file_name().unwrap().to_string_lossy().into_owned()
    }),
    ("not a png", |root| {
        let f = &pngs(&root.join("leftImg8bit/val"), "_leftImg8bit.png")[0];
        fs::write(f, "this is not an image\n").unwrap();
        f.file_name().unwrap().to_string_lossy().into_owned()
    }),
    ("16-bit label", |root| {
        let f = &pngs(&root.join("gtFine/val"), "_labelIds.png")[0];
        let (w, h) = size_of(f);
        write_png(
            f,
            w,
            h,
            png::ColorType::Grayscale,
            png::BitDepth::Sixteen,
            &vec![0u8; (w * h * 2) as usize],
        );
        f.file_name().unwrap().to_string_lossy().into_owned()
    }),
    ("colour label", |root| {
        let f = &pngs(&root.join("gtFine/val"), "_labelIds.png")[0];
        let (w, h) = size_of(f);
        write_png(
            f,
            w,
            h,
            png::ColorType::Rgb,
            png::BitDepth::Eight,
            &vec![7u8; (w * h * 3) as usize],
        );
        f.file_name().unwrap().to_string_lossy().into_owned()
    }),
    ("label of another size", |root| {
        let f = &pngs(&root.join("gtFine/val"), "_labelIds.png")[0];
        let (w, h) = size_of(f);
        write_png(
            f,
            w / 2,
            h / 2,
            png::ColorType::Grayscale,
            png::BitDepth::Eight,
            &vec![7u8; (w / 2 * h / 2) as usize],
        );
        f.file_name().unwrap().to_string_lossy().into_owned()
    }),
    ("label ids out of range", |root| {
        let f = &pngs(&root.join("gtFine/val"), "_labelIds.png")[0];
        let (w, h) = size_of(f);
        write_png(
            f,
            w,
            h,
            png::ColorType::Grayscale,
            png::BitDepth::Eight,
            &vec![200u8; (w * h) as usize],
        );
        f.file_name().unwrap().to_string_lossy().into_owned()
    }),
    ("image without label", |root| {
        let f = &pngs(&root.join("gtFine/val"), "_labelIds.png")[0];
        fs::remove_file(f).unwrap();
        let name = f.file_name().unwrap().to_string_lossy();
        name.replace("_gtFine_labelIds.png", "_leftImg8bit.png")
    }),
    ("empty split", |root| {
        for f in pngs(&root.join("leftImg8bit/val"), ".png") {
            fs::remove_file(f).unwrap();
        }
        "leftImg8bit/val".into()
    }),
    ("symlink loop", |root| {
        let city = pngs(&root.join("leftImg8bit/val"), ".png")[0]
            .parent()
            .unwrap()
            .to_path_buf();
        std::os::unix::fs::symlink(&city, city.join("loop")).unwrap();
        "loop".into()
    }),
    ("root is a file", |root| {
        fs::remove_dir_all(root).unwrap();
        fs::write(root, "not a directory").unwrap();
        "data/cs".into()
    }),
];

#[test]
fn malformed_datasets_are_errors_naming_the_file() {
    let base = Ws::new(PIPELINE, &[]);
    crate::paths::workspace_dataset(&base, "data/cs");
    let out = output_within(
        base.cmd(&["run", "pipeline.yaml"]),
        Duration::from_secs(120),
    );
    assert!(
        out.status.success(),
        "the intact dataset must work:\n{}",
        text(&out)
    );
    let mut problems = Vec::new();
    for (what, brk) in BREAKS {
        let ws = Ws::new(PIPELINE, &[]);
        copy(&base.path("data"), &ws.path("data"));
        let needle = brk(&ws.path("data/cs"));
        let out = output_within(ws.cmd(&["run", "pipeline.yaml"]), Duration::from_secs(60));
        let err = String::from_utf8_lossy(&out.stderr);
        let code = out.status.code();
        if !matches!(code, Some(1) | Some(2)) {
            problems.push(format!("{what}: exit {:?}\n{err}", out.status));
        } else if err.contains("panicked") {
            problems.push(format!("{what}: panicked\n{err}"));
        } else if !err.contains(&needle) {
            problems.push(format!("{what}: `{needle}` not named in\n{err}"));
        }
        if ws.manifests() > 0 {
            problems.push(format!("{what}: a manifest was written"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
    figure("corpus_datasets", &BREAKS.len().to_string());
}

fn copy(from: &Path, to: &Path) {
    for e in walkdir::WalkDir::new(from) {
        let e = e.unwrap();
        let dst = to.join(e.path().strip_prefix(from).unwrap());
        if e.file_type().is_dir() {
            fs::create_dir_all(&dst).unwrap();
        } else {
            fs::copy(e.path(), &dst).unwrap();
        }
    }
}
