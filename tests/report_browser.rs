//! `dag report` and `dag metrics` on the tiny synthetic IntraDA pipeline.
//!
//! The report is opened in headless Chromium, which loads the page from disk (no server, no
//! network) and runs the page's own check of every picture; the test reads that verdict from
//! the dumped DOM, takes a screenshot, then breaks a picture and a chart and checks that the
//! verdict turns. Without Chromium the browser part is skipped with a loud message, unless
//! DAG_REQUIRE_BROWSER is set (CI sets it), where a missing browser fails the test.

mod engine_common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use engine_common::text;

const PIPELINE: &str = r#"
name: tiny
device: flex
seed: 7
datasets:
  synthia:    { format: synthia,    root: synth.source, classes: 16 }
  cityscapes: { format: cityscapes, root: synth.target, classes: 16 }
stages:
  synth:  { kind: synth, params: { seed: 7, source_images: 12, target_train: 12, target_val: 5, size: [128, 64] } }
  source: { kind: preprocess, params: { dataset: synthia, split: all, size: [64, 32] } }
  target: { kind: preprocess, params: { dataset: cityscapes, split: train, size: [64, 32] } }
  val:    { kind: preprocess, params: { dataset: cityscapes, split: val, size: [64, 32], keep_full_labels: true } }
  src_only: { kind: train_source, inputs: { source: source }, params: { iters: 6, max_iters: 6, depth: 14, width: 0.125, lr: 0.01, checkpoint_every: 2 } }
  advent:   { kind: adapt, inputs: { source: source, target: target, init: src_only.model }, params: { iters: 4, max_iters: 4, lr: 0.01, disc_ndf: 8, snapshot_every: 2 } }
  entropy:  { kind: score_entropy, inputs: { model: advent.model, target: target, difficulty: synth.target }, params: { gallery: 3 } }
  split:    { kind: split, inputs: { scores: entropy.scores }, params: { lambda: 0.67 } }
  intrada:  { kind: self_train, inputs: { target: target, easy: split.easy, hard: split.hard, pseudo: entropy.pseudo_labels, init: advent.model }, params: { iters: 4, max_iters: 4, lr: 0.01, disc_ndf: 8 } }
  eval_src:     { kind: evaluate, inputs: { model: src_only.model, data: val }, params: { samples: 2 } }
  eval_advent:  { kind: evaluate, inputs: { model: advent.model, data: val }, params: { snapshots: all, samples: 2 } }
  eval_intrada: { kind: evaluate, inputs: { model: intrada.model, data: val }, params: { samples: 2 } }
  compare:  { kind: compare, inputs: { source_only: eval_src, advent: eval_advent, intrada: eval_intrada }, params: { order: [source_only, advent, intrada] } }
"#;

fn dag(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dag"))
        .args(args)
        .current_dir(dir)
        .env_remove("DAG_CACHE")
        .env_remove("DAG_LOG")
        .env("NO_COLOR", "1")
        .output()
        .expect("run dag")
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = dag(dir, args);
    assert!(out.status.success(), "dag {args:?}:\n{}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The stage rows of a report's stage table: (stage, state word).
fn states(html: &str) -> Vec<(String, String)> {
    let table = html
        .split("<th class=\"l\">note</th></tr>")
        .nth(1)
        .and_then(|t| t.split("</table>").next())
        .expect("a stage table");
    table
        .split("<tr><td class=\"l\">")
        .skip(1)
        .filter_map(|row| {
            let name = row.split('<').next()?.to_string();
            let state = row.split("<span class=\"badge ").nth(1)?;
            let word = state.split('>').nth(1)?.split('<').next()?.to_string();
            Some((name, word))
        })
        .collect()
}

/// The tiny pipeline, run once for every test of this file, in a directory under Cargo's
/// per-target temporary directory (replaced on every test run). Before the full run it checks
/// the report and `dag metrics` on an empty and on a half-run cache.
fn tiny() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("report_tiny");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("pipeline.yaml"), PIPELINE).unwrap();

        // Nothing has run: the report is still written, every stage says so.
        let stdout = ok(&dir, &["report", "pipeline.yaml", "-o", "empty"]);
        assert!(
            stdout.contains("without a result: synth, source"),
            "{stdout}"
        );
        let html = std::fs::read_to_string(dir.join("empty/index.html")).unwrap();
        let s = states(&html);
        assert_eq!(s.len(), 13, "{s:?}");
        assert!(s.iter().all(|(_, w)| w == "not run"), "{s:?}");
        assert!(html.contains("No model is evaluated yet"));
        let out = dag(&dir, &["metrics", "pipeline.yaml"]);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("no model of pipeline `tiny` is evaluated"),
            "{err}"
        );
        assert!(
            err.contains("hint: run `dag run pipeline.yaml` first"),
            "{err}"
        );

        // Half the pipeline: what ran is green, the rest is shown as not run.
        ok(&dir, &["run", "pipeline.yaml", "--until", "split"]);
        ok(&dir, &["report", "pipeline.yaml", "-o", "half"]);
        let html = std::fs::read_to_string(dir.join("half/index.html")).unwrap();
        let s = states(&html);
        let word = |n: &str| s.iter().find(|(k, _)| k == n).map(|x| x.1.clone());
        assert_eq!(word("split").as_deref(), Some("ran"), "{s:?}");
        assert_eq!(word("intrada").as_deref(), Some("not run"), "{s:?}");
        assert_eq!(word("compare").as_deref(), Some("not run"), "{s:?}");
        assert!(html.contains("Easiest images"));

        // The rest: the stages of the first run are now cached, the others ran.
        ok(&dir, &["run", "pipeline.yaml"]);
        dir
    })
}

/// Chromium, if installed (DAG_CHROMIUM names another binary).
fn chromium() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("DAG_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    [
        "chromium",
        "chromium-browser",
        "google-chrome",
        "google-chrome-stable",
    ]
    .iter()
    .flat_map(|n| std::env::split_paths(&path).map(move |d| d.join(n)))
    .find(|p| p.is_file())
}

fn headless(browser: &Path, profile: &Path, extra: &[&str], page: &Path) -> Output {
    let url = format!("file://{}", page.canonicalize().unwrap().display());
    Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--no-first-run",
            "--hide-scrollbars",
            // Lets the page load every picture and run its load handler before the dump.
            "--virtual-time-budget=15000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .output()
        .expect("run chromium")
}

/// The page's verdict: the data attributes of `#dag-verdict` in the DOM Chromium dumped.
fn verdict(dom: &str) -> std::collections::BTreeMap<String, String> {
    let start = dom
        .find("id=\"dag-verdict\"")
        .unwrap_or_else(|| panic!("no #dag-verdict in the dumped DOM:\n{dom}"));
    let tag_start = dom[..start].rfind('<').unwrap();
    let tag = &dom[tag_start..tag_start + dom[tag_start..].find('>').unwrap()];
    let mut attrs = std::collections::BTreeMap::new();
    for part in tag.split("\" ") {
        if let Some((k, v)) = part.split_once("=\"") {
            let k = k.rsplit(' ').next().unwrap().to_string();
            attrs.insert(k, v.trim_end_matches('"').to_string());
        }
    }
    attrs
}

#[test]
fn report_loads_every_chart_and_picture_in_a_browser() {
    let dir = tiny();
    let stdout = ok(dir, &["report", "pipeline.yaml", "-o", "report"]);
    assert!(stdout.contains("wrote "), "{stdout}");
    assert!(!stdout.contains("without a result"), "{stdout}");
    let report = dir.join("report");
    let index = report.join("index.html");
    let html = std::fs::read_to_string(&index).unwrap();

    // Every stage has a result; the ones of the `--until split` run were reused.
    let s = states(&html);
    assert_eq!(s.len(), 13, "{s:?}");
    for (stage, word) in &s {
        // `val` is not upstream of `split`, so the first run left it out.
        let first_run = [
            "synth", "source", "target", "src_only", "advent", "entropy", "split",
        ];
        let want = if first_run.contains(&stage.as_str()) {
            "cached"
        } else {
            "ran"
        };
        assert_eq!(word, want, "{stage}: {s:?}");
    }
    // The comparison, highlighted, with every class; the charts and galleries.
    for needle in [
        "<td class=\"l\">source_only</td>",
        "<td class=\"l\">intrada</td>",
        "class=\"best\"",
        "<th>road</th>",
        "charts/pipeline.svg",
        "charts/iou_per_class.svg",
        "charts/src_only_seg_main.svg",
        "charts/advent_adv_main.svg",
        "charts/advent_lr.svg",
        "charts/entropy_histogram.svg",
        "charts/snapshots_eval_advent.svg",
        "Easiest images (most confident)",
        "Hardest images (least confident)",
        "Spearman",
    ] {
        assert!(
            html.contains(needle),
            "no `{needle}` in {}",
            index.display()
        );
    }
    let imgs = html.matches("<img ").count();
    // 3 easiest + 3 hardest images x 5 pictures, 3 evaluations x 2 samples x 5 pictures.
    let pictures = html.matches("src=\"img/").count();
    assert_eq!(pictures, 6 * 5 + 3 * 2 * 5, "{}", index.display());
    let charts = html.matches("src=\"charts/").count();
    assert_eq!(imgs, pictures + charts);
    // Everything the page needs is in the report folder: nothing is fetched from elsewhere.
    assert!(!html.contains("http://") && !html.contains("https://"));
    assert!(!html.contains("src=\"/"));
    let histogram = std::fs::read_to_string(report.join("charts/entropy_histogram.svg")).unwrap();
    assert!(
        histogram.contains("split: λ = 0.67: 8 easy | 4 hard"),
        "{histogram}"
    );

    let Some(browser) = chromium() else {
        let msg = "no Chromium found (install the `chromium` package, or set DAG_CHROMIUM)";
        if std::env::var_os("DAG_REQUIRE_BROWSER").is_some() {
            panic!("DAG_REQUIRE_BROWSER is set but there is {msg}");
        }
        eprintln!("\n!!!!!!!! SKIPPED the browser check of the report: {msg} !!!!!!!!\n");
        return;
    };
    let profile = tempfile::tempdir().unwrap();

    let out = headless(&browser, profile.path(), &["--dump-dom"], &index);
    let dom = String::from_utf8_lossy(&out.stdout);
    let v = verdict(&dom);
    assert_eq!(
        v.get("data-state").map(String::as_str),
        Some("ok"),
        "{v:?}\n{}",
        text(&out)
    );
    assert_eq!(v.get("data-images"), Some(&imgs.to_string()), "{v:?}");
    assert_eq!(v.get("data-errors").map(String::as_str), Some(""), "{v:?}");

    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("report.png");
    let _ = std::fs::remove_file(&shot);
    let arg = format!("--screenshot={}", shot.display());
    let out = headless(
        &browser,
        profile.path(),
        &[&arg, "--window-size=1280,2200"],
        &index,
    );
    let png = std::fs::read(&shot).unwrap_or_else(|e| panic!("no screenshot: {e}\n{}", text(&out)));
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "{}",
        png.len()
    );
    eprintln!("screenshot of the report: {}", shot.display());

    // A truncated picture and a malformed chart must turn the verdict.
    let picture = html
        .split("src=\"img/")
        .nth(3)
        .and_then(|s| s.split('"').next())
        .unwrap();
    std::fs::write(
        report.join("img").join(picture),
        b"\x89PNG\r\n\x1a\n broken",
    )
    .unwrap();
    std::fs::write(report.join("charts/entropy_histogram.svg"), "<svg").unwrap();
    let out = headless(&browser, profile.path(), &["--dump-dom"], &index);
    let v = verdict(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(
        v.get("data-state").map(String::as_str),
        Some("broken"),
        "{v:?}"
    );
    let broken = v.get("data-broken").cloned().unwrap_or_default();
    assert!(broken.contains(&format!("img/{picture}")), "{v:?}");
    assert!(broken.contains("charts/entropy_histogram.svg"), "{v:?}");
}

#[test]
fn metrics_prints_the_comparison_as_table_csv_json_and_markdown() {
    let dir = tiny();
    let summary = |stage: &str| -> serde_json::Value {
        let p = dir.join(format!("out/tiny/{stage}/evaluation/summary.json"));
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let expected: Vec<(&str, serde_json::Value)> = vec![
        ("source_only", summary("eval_src")),
        ("advent", summary("eval_advent")),
        ("intrada", summary("eval_intrada")),
    ];

    let csv = ok(dir, &["metrics", "pipeline.yaml", "--format", "csv"]);
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    assert_eq!(
        header[..7],
        ["name", "stage", "method", "miou", "miou16", "miou13", "iou_road"]
    );
    assert_eq!(header.len(), 6 + 16, "{csv}");
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 3, "{csv}");
    for (row, (name, s)) in rows.iter().zip(&expected) {
        assert_eq!(row.len(), header.len(), "{csv}");
        assert_eq!(row[0], *name);
        assert_eq!(row[1], s["stage"].as_str().unwrap());
        let miou: f64 = row[3].parse().unwrap();
        assert!((miou - s["miou"].as_f64().unwrap()).abs() < 1e-9, "{csv}");
        let road = s["per_class_iou"][0]["iou"].as_f64();
        assert_eq!(row[6].parse::<f64>().ok(), road, "{csv}");
    }

    let json: serde_json::Value =
        serde_json::from_str(&ok(dir, &["metrics", "pipeline.yaml", "--format", "json"])).unwrap();
    let models = json["models"].as_array().unwrap();
    assert_eq!(models.len(), 3, "{json}");
    assert_eq!(json["classes"].as_array().unwrap().len(), 16);
    for (m, (name, s)) in models.iter().zip(&expected) {
        assert_eq!(m["name"], *name);
        assert_eq!(m["miou"], s["miou"], "{json}");
        assert_eq!(m["miou13"], s["miou13"], "{json}");
        assert_eq!(m["per_class_iou"], s["per_class_iou"], "{json}");
    }

    let md = ok(dir, &["metrics", "pipeline.yaml", "--format", "markdown"]);
    let md_lines: Vec<&str> = md.lines().collect();
    assert!(
        md_lines[0].starts_with("| model | method | mIoU | mIoU13* | road |"),
        "{md}"
    );
    assert!(md_lines[1].starts_with("|---|---|---:|"), "{md}");
    assert_eq!(md_lines.len(), 2 + 3, "{md}");
    assert!(
        md_lines[2].starts_with("| source_only | source_only |"),
        "{md}"
    );
    assert!(md.contains("**"), "the best values are bold: {md}");

    let table = ok(dir, &["metrics", "pipeline.yaml"]);
    assert!(table.starts_with("model"), "{table}");
    for needle in [
        "intrada",
        "mIoU13*",
        "IoU per class",
        "road",
        "from compare",
    ] {
        assert!(table.contains(needle), "no `{needle}` in:\n{table}");
    }
    let out = dag(dir, &["metrics", "pipeline.yaml", "--format", "xml"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}
