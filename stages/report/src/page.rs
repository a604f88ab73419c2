//! The HTML page: sections for the pipeline graph, the comparison, per-class IoU, training
//! curves, the entropy ranking and the picture galleries.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use dag_artifacts::evaluate::{snapshot_column, SAMPLES_DIR, SNAPSHOTS_FILE};
use dag_artifacts::score::SCORES_FILE;
use dag_artifacts::train::log_column;
use dag_artifacts::train::{LOG_FILE, LOG_TYPE};
use dag_artifacts::visuals::{read_index, Visual};
use dag_data::{Column, Table};
use serde_json::Value;

use crate::svg::{self, esc, Series, PALETTE};
use crate::{comparison, ReportError, ReportInput, StageInfo, State};

/// Folder of the chart files.
pub const CHARTS: &str = "charts";
/// Folder of the copied pictures.
pub const IMAGES: &str = "img";

const STYLE: &str = r#"
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #222;
       background: #fafafa; }
header { background: #263238; color: #fff; padding: 14px 28px; }
header h1 { margin: 0; font-size: 22px; }
header p { margin: 4px 0 0; color: #cfd8dc; font-size: 13px; }
main { padding: 8px 28px 40px; max-width: 1500px; }
section { background: #fff; border: 1px solid #e0e0e0; border-radius: 6px; padding: 6px 18px 16px;
          margin: 16px 0; }
h2 { font-size: 18px; margin: 12px 0 8px; }
h3 { font-size: 15px; margin: 14px 0 6px; }
table { border-collapse: collapse; font-size: 13px; margin: 6px 0; }
th, td { border-bottom: 1px solid #eee; padding: 4px 8px; text-align: right; white-space: nowrap; }
th { background: #f5f5f5; }
td.l, th.l { text-align: left; }
td.best { background: #c8e6c9; font-weight: 700; }
.scroll { overflow-x: auto; }
img.fit { max-width: 100%; height: auto; display: block; }
.charts { display: flex; flex-wrap: wrap; gap: 10px; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 9px; font-size: 12px;
         border: 1px solid; }
.ran { background: #c8e6c9; border-color: #2e7d32; }
.cached { background: #bbdefb; border-color: #1565c0; }
.failed { background: #ffcdd2; border-color: #c62828; }
.stale { background: #ffe0b2; border-color: #ef6c00; }
.notrun { background: #eeeeee; border-color: #9e9e9e; }
.note { color: #666; font-size: 12px; white-space: normal; text-align: left; max-width: 520px; }
.problem { background: #fff3e0; border-left: 4px solid #ef6c00; padding: 6px 10px; margin: 6px 0;
           font-size: 13px; }
.empty { color: #777; font-style: italic; }
.gallery td { vertical-align: top; text-align: center; padding: 4px; }
.gallery img { width: 100%; max-width: 256px; image-rendering: pixelated; display: block;
               border: 1px solid #ddd; }
.gallery td.cap { text-align: left; font-size: 12px; color: #444; white-space: normal;
                  max-width: 200px; }
#dag-verdict { background: #ffcdd2; border-bottom: 2px solid #c62828; padding: 8px 28px; }
"#;

/// Checks in the browser that every picture loaded and no script failed, and says so on the
/// page (a report copied without its folders shows which pictures are missing). The verdict
/// stays in `#dag-verdict`'s data attributes, where the browser test reads it.
const CHECK: &str = r#"
(function () {
  var errors = [];
  window.addEventListener('error', function (e) {
    var t = e.target;
    if (t && t.tagName === 'IMG') { errors.push('cannot load ' + t.getAttribute('src')); }
    else { errors.push('script error: ' + (e.message || String(e))); }
  }, true);
  var consoleError = console.error;
  console.error = function () {
    errors.push('console: ' + Array.prototype.join.call(arguments, ' '));
    return consoleError.apply(console, arguments);
  };
  window.addEventListener('load', function () {
    var imgs = document.images, broken = [];
    for (var i = 0; i < imgs.length; i++) {
      if (!imgs[i].complete || imgs[i].naturalWidth === 0) { broken.push(imgs[i].getAttribute('src')); }
    }
    var v = document.getElementById('dag-verdict');
    v.setAttribute('data-images', String(imgs.length));
    v.setAttribute('data-broken', broken.join(' '));
    v.setAttribute('data-errors', errors.join(' | '));
    v.setAttribute('data-state', broken.length || errors.length ? 'broken' : 'ok');
    if (broken.length || errors.length) {
      v.textContent = broken.length + ' of ' + imgs.length + ' pictures did not load' +
        (broken.length ? ': ' + broken.join(', ') : '') +
        (errors.length ? '; ' + errors.join('; ') : '') +
        '. Keep index.html next to its charts/ and img/ folders.';
      v.hidden = false;
    }
  });
})();
"#;

pub(crate) struct Page<'a> {
    dir: &'a Path,
    pub images: usize,
    pub problems: Vec<ReportError>,
    body: String,
}

fn class_of(state: State) -> &'static str {
    match state {
        State::Ran => "ran",
        State::Cached => "cached",
        State::Failed => "failed",
        State::Stale => "stale",
        State::NotRun => "notrun",
    }
}

fn badge(state: State) -> String {
    format!(
        "<span class=\"badge {}\">{}</span>",
        class_of(state),
        state.word()
    )
}

fn seconds(s: f64) -> String {
    if s >= 3600.0 {
        format!(
            "{:.0} h {:02.0} min",
            (s / 3600.0).floor(),
            (s % 3600.0) / 60.0
        )
    } else if s >= 60.0 {
        format!("{:.0} min {:02.0} s", (s / 60.0).floor(), s % 60.0)
    } else {
        format!("{s:.1} s")
    }
}

/// `YYYY-MM-DD HH:MM UTC` of Unix seconds (the civil calendar from a day count).
fn utc(unix: f64) -> String {
    let secs = unix.max(0.0) as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        (rem % 3600) / 60
    )
}

/// File-name-safe form of a stage or series name.
fn slug(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

fn float_column(t: &Table, name: &str) -> Option<Vec<f64>> {
    match t.column(name)? {
        Column::F64(v) => Some(v.clone()),
        Column::F32(v) => Some(v.iter().map(|&x| f64::from(x)).collect()),
        Column::U64(v) => Some(v.iter().map(|&x| x as f64).collect()),
        Column::U32(v) => Some(v.iter().map(|&x| f64::from(x)).collect()),
        Column::I64(v) => Some(v.iter().map(|&x| x as f64).collect()),
        Column::I32(v) => Some(v.iter().map(|&x| f64::from(x)).collect()),
        _ => None,
    }
}

/// Exponential moving average with a window of about 2% of the run, to see a trend through
/// per-iteration noise.
fn smooth(v: &[f64]) -> Vec<f64> {
    let window = (v.len() as f64 / 50.0).max(1.0);
    let a = 2.0 / (window + 1.0);
    let mut acc = f64::NAN;
    v.iter()
        .map(|&x| {
            if x.is_finite() {
                acc = if acc.is_finite() {
                    a * x + (1.0 - a) * acc
                } else {
                    x
                };
            }
            if x.is_finite() {
                acc
            } else {
                f64::NAN
            }
        })
        .collect()
}

impl<'a> Page<'a> {
    pub fn new(dir: &'a Path) -> Self {
        Page {
            dir,
            images: 0,
            problems: Vec::new(),
            body: String::new(),
        }
    }

    /// Writes a chart file and returns its `<img>`.
    fn chart(&mut self, name: &str, svg: String, alt: &str) -> Result<String, ReportError> {
        let rel = self.chart_file(name, svg)?;
        Ok(format!("<img src=\"{rel}\" alt=\"{}\">", esc(alt)))
    }

    /// Writes a chart into `charts/` and returns its relative path.
    fn chart_file(&mut self, name: &str, svg: String) -> Result<String, ReportError> {
        let rel = format!("{CHARTS}/{}.svg", slug(name));
        let path = self.dir.join(&rel);
        std::fs::write(&path, svg).map_err(|e| ReportError::write(&path, e))?;
        self.images += 1;
        Ok(rel)
    }

    /// Copies a picture into `img/` and returns its `<img>`, or a note when it cannot be read.
    fn picture(&mut self, src: &Path, rel: &str, alt: &str) -> Result<String, ReportError> {
        let to = self.dir.join(IMAGES).join(rel);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(|e| ReportError::write(parent, e))?;
        }
        if let Err(e) = std::fs::copy(src, &to) {
            let err = ReportError::read(src, e);
            let html = format!("<div class=\"problem\">{}</div>", esc(&err.to_string()));
            self.problems.push(err);
            return Ok(html);
        }
        self.images += 1;
        Ok(format!(
            "<img src=\"{IMAGES}/{rel}\" alt=\"{}\" loading=\"eager\">",
            esc(alt)
        ))
    }

    fn problem(&mut self, e: ReportError) {
        let _ = writeln!(
            self.body,
            "<div class=\"problem\">{}<br>{}</div>",
            esc(&e.to_string()),
            esc(&e.hint())
        );
        self.problems.push(e);
    }

    pub fn render(&mut self, input: &ReportInput) -> Result<String, ReportError> {
        self.graph(input)?;
        self.results(input)?;
        self.training(input)?;
        self.entropy(input)?;
        self.samples(input)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let mut html = String::new();
        let _ = write!(
            html,
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
             <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
             <title>dag report: {name}</title>\n<style>{STYLE}</style>\n\
             <script>{CHECK}</script>\n</head>\n<body>\n\
             <div id=\"dag-verdict\" hidden data-state=\"pending\"></div>\n\
             <header><h1>{name}</h1><p>{file} &middot; cache {cache} &middot; device {device} \
             &middot; report of {now}</p></header>\n<main>\n{body}</main>\n</body>\n</html>\n",
            name = esc(&input.pipeline),
            file = esc(&input.file.display().to_string()),
            cache = esc(&input.cache.display().to_string()),
            device = esc(&input.device),
            now = utc(now),
            body = self.body,
        );
        Ok(html)
    }

    fn graph(&mut self, input: &ReportInput) -> Result<(), ReportError> {
        let nodes: Vec<svg::Node> = input
            .stages
            .iter()
            .map(|s| {
                let (fill, stroke) = match s.state {
                    State::Ran => ("#c8e6c9", "#2e7d32"),
                    State::Cached => ("#bbdefb", "#1565c0"),
                    State::Failed => ("#ffcdd2", "#c62828"),
                    State::Stale => ("#ffe0b2", "#ef6c00"),
                    State::NotRun => ("#eeeeee", "#9e9e9e"),
                };
                let detail = match (s.state, s.seconds) {
                    (State::Ran | State::Cached | State::Stale, Some(t)) => {
                        format!("{} · {}", s.kind, seconds(t))
                    }
                    _ => format!("{} · {}", s.kind, s.state.word()),
                };
                svg::Node {
                    name: s.name.clone(),
                    detail,
                    fill,
                    stroke,
                    upstream: s.upstream.clone(),
                }
            })
            .collect();
        // Scaled down to the section's width rather than cut off at its edge (the quickstart's
        // graph is 1742 px wide, 1.5x a 1280-px window's section); the link opens it at full
        // size.
        let rel = self.chart_file("pipeline", svg::dag_diagram(&nodes))?;
        let img = format!(
            "<a href=\"{rel}\" title=\"open the graph at full size\">\
             <img class=\"fit\" src=\"{rel}\" alt=\"the pipeline graph\"></a>"
        );
        let _ = writeln!(
            self.body,
            "<section><h2>Pipeline</h2><p>{} {} {} {} {} &nbsp; boxes show the kind and the \
             time the stage's result took to compute.</p>{img}",
            badge(State::Ran),
            badge(State::Cached),
            badge(State::Failed),
            badge(State::Stale),
            badge(State::NotRun),
        );
        self.body.push_str(
            "<div class=\"scroll\"><table><tr><th class=\"l\">stage</th><th class=\"l\">kind</th>\
             <th class=\"l\">state</th><th>seconds</th><th class=\"l\">finished</th>\
             <th class=\"l\">note</th></tr>\n",
        );
        for s in &input.stages {
            let _ = writeln!(
                self.body,
                "<tr><td class=\"l\">{}</td><td class=\"l\">{}</td><td class=\"l\">{}</td>\
                 <td>{}</td><td class=\"l\">{}</td><td class=\"note\">{}</td></tr>",
                esc(&s.name),
                esc(&s.kind),
                badge(s.state),
                s.seconds.map(|t| format!("{t:.1}")).unwrap_or_default(),
                s.finished_unix.map(utc).unwrap_or_default(),
                esc(s.note.as_deref().unwrap_or_default()),
            );
        }
        self.body.push_str("</table></div></section>\n");
        Ok(())
    }

    fn results(&mut self, input: &ReportInput) -> Result<(), ReportError> {
        self.body.push_str("<section><h2>Results</h2>\n");
        match comparison::comparison(input) {
            Err(e) => self.problem(e),
            Ok(None) => self.body.push_str(
                "<p class=\"empty\">No model is evaluated yet: the `evaluate` and `compare` \
                 stages have not run.</p>\n",
            ),
            Ok(Some(c)) => {
                let cols = c.columns();
                let _ = writeln!(
                    self.body,
                    "<p>IoU in percent from {}; the best value of each column is highlighted.\
                     </p><div class=\"scroll\"><table><tr><th class=\"l\">model</th>\
                     <th class=\"l\">method</th>{}</tr>",
                    esc(&c.source),
                    cols.iter()
                        .map(|(n, _)| format!("<th>{}</th>", esc(n)))
                        .collect::<String>()
                );
                for (r, row) in c.rows.iter().enumerate() {
                    let _ = write!(
                        self.body,
                        "<tr><td class=\"l\">{}</td><td class=\"l\">{}</td>",
                        esc(&row.name),
                        esc(&row.method)
                    );
                    for (_, v) in &cols {
                        let best = comparison::Comparison::best(v) == Some(r);
                        let text = if v[r].is_finite() {
                            format!("{:.2}", v[r])
                        } else {
                            "-".into()
                        };
                        let _ = write!(
                            self.body,
                            "<td{}>{text}</td>",
                            if best { " class=\"best\"" } else { "" }
                        );
                    }
                    self.body.push_str("</tr>\n");
                }
                self.body.push_str("</table></div>\n");
                if let Some(spread) = c.spread() {
                    // Under `seeds:`: one bar per method and setting, the mean over the seeds,
                    // with ± one standard deviation and a point per seed.
                    let names: Vec<String> = spread.iter().map(|m| m.name.clone()).collect();
                    let bar = |k: usize| -> (Vec<Vec<f64>>, Vec<svg::BarSpread>) {
                        let pick = |v: &Vec<f64>| vec![v.get(k).copied().unwrap_or(f64::NAN)];
                        spread
                            .iter()
                            .map(|m| {
                                let sp = svg::BarSpread {
                                    std: pick(&m.std),
                                    points: m.runs.iter().map(pick).collect(),
                                };
                                (pick(&m.mean), sp)
                            })
                            .unzip()
                    };
                    let (values, spreads) = bar(0);
                    let bars = svg::grouped_bars(
                        "mIoU, mean over seeds (± std, one point per seed)",
                        "mIoU (%)",
                        &["mIoU".to_string()],
                        &names,
                        &values,
                        &spreads,
                    );
                    let img = self.chart("miou_over_seeds", bars, "mIoU over seeds")?;
                    let _ = writeln!(self.body, "<div class=\"scroll\">{img}</div>");
                    if !c.classes.is_empty() {
                        let values: Vec<Vec<f64>> =
                            spread.iter().map(|m| m.mean[1..].to_vec()).collect();
                        let spreads: Vec<svg::BarSpread> = spread
                            .iter()
                            .map(|m| svg::BarSpread {
                                std: m.std[1..].to_vec(),
                                points: m.runs.iter().map(|r| r[1..].to_vec()).collect(),
                            })
                            .collect();
                        let bars = svg::grouped_bars(
                            "IoU per class, mean over seeds (± std, one point per seed)",
                            "IoU (%)",
                            &c.classes,
                            &names,
                            &values,
                            &spreads,
                        );
                        let img = self.chart("iou_per_class", bars, "IoU per class and model")?;
                        let _ = writeln!(self.body, "<div class=\"scroll\">{img}</div>");
                    }
                } else if !c.classes.is_empty() {
                    let names: Vec<String> = c.rows.iter().map(|r| r.name.clone()).collect();
                    let values: Vec<Vec<f64>> = c.rows.iter().map(|r| r.iou.clone()).collect();
                    let bars = svg::grouped_bars(
                        "IoU per class",
                        "IoU (%)",
                        &c.classes,
                        &names,
                        &values,
                        &[],
                    );
                    let img = self.chart("iou_per_class", bars, "IoU per class and model")?;
                    let _ = writeln!(self.body, "<div class=\"scroll\">{img}</div>");
                }
            }
        }
        // mIoU of every snapshot, where an evaluation kept them.
        let mut charts = Vec::new();
        for st in input.stages.iter().filter(|s| s.kind == "evaluate") {
            let Some(dir) = st.outputs.get("evaluation") else {
                continue;
            };
            let file = dir.join(SNAPSHOTS_FILE);
            if !file.is_file() {
                continue;
            }
            let t = match Table::read_parquet(&file) {
                Ok(t) => t,
                Err(e) => {
                    self.problem(ReportError::read(&file, e));
                    continue;
                }
            };
            let (Some(it), Some(miou)) = (
                float_column(&t, snapshot_column::ITERATION),
                float_column(&t, snapshot_column::MIOU),
            ) else {
                self.problem(ReportError::column(&file, "iteration/miou", "numeric"));
                continue;
            };
            let points: Vec<(f64, f64)> = it
                .into_iter()
                .zip(miou)
                .filter(|(i, _)| *i >= 0.0)
                .collect();
            let chart = svg::line_chart(&svg::LineChart {
                title: &format!("{}: mIoU of each snapshot", st.name),
                x_label: "iteration",
                y_label: "mIoU (%)",
                series: vec![Series {
                    name: "mIoU".into(),
                    points,
                    color: PALETTE[0].into(),
                    faint: false,
                    dots: true,
                }],
                width: 420.0,
                height: 240.0,
            });
            let alt = format!("mIoU of the snapshots evaluated by {}", st.name);
            charts.push(self.chart(&format!("snapshots_{}", st.name), chart, &alt)?);
        }
        if !charts.is_empty() {
            let _ = writeln!(
                self.body,
                "<h3>Snapshots</h3><div class=\"charts\">{}</div>",
                charts.join("")
            );
        }
        self.body.push_str("</section>\n");
        Ok(())
    }

    fn training(&mut self, input: &ReportInput) -> Result<(), ReportError> {
        self.body.push_str("<section><h2>Training</h2>\n");
        let mut any = false;
        let training_logs = input.stages.iter().filter_map(|s| {
            let (name, _) = s.output_types.iter().find(|(_, ty)| *ty == LOG_TYPE)?;
            Some((s, name))
        });
        for (st, log_output) in training_logs {
            any = true;
            let _ = writeln!(
                self.body,
                "<h3>{} <small>({})</small> {}</h3>",
                esc(&st.name),
                esc(&st.kind),
                badge(st.state)
            );
            let Some(dir) = st.outputs.get(log_output) else {
                self.body
                    .push_str("<p class=\"empty\">No training log: the stage has not run.</p>\n");
                continue;
            };
            let file = dir.join(LOG_FILE);
            let t = match Table::read_parquet(&file) {
                Ok(t) => t,
                Err(e) => {
                    self.problem(ReportError::read(&file, e));
                    continue;
                }
            };
            let Some(iteration) = float_column(&t, log_column::ITERATION) else {
                self.problem(ReportError::column(&file, log_column::ITERATION, "integer"));
                continue;
            };
            let mut charts = Vec::new();
            let terms: Vec<String> = t
                .names()
                .filter(|n| !log_column::FIXED.contains(n))
                .map(str::to_string)
                .collect();
            for (k, term) in terms.iter().enumerate() {
                let Some(v) = float_column(&t, term) else {
                    continue;
                };
                let color = PALETTE[k % PALETTE.len()].to_string();
                let raw: Vec<(f64, f64)> = iteration.iter().copied().zip(v.clone()).collect();
                let mut series = Vec::new();
                if v.len() > 30 {
                    series.push(Series {
                        name: format!("{term} (raw)"),
                        points: raw,
                        color: color.clone(),
                        faint: true,
                        dots: false,
                    });
                    let sm = smooth(&v);
                    series.push(Series {
                        name: term.clone(),
                        points: iteration.iter().copied().zip(sm).collect(),
                        color,
                        faint: false,
                        dots: false,
                    });
                } else {
                    series.push(Series {
                        name: term.clone(),
                        points: raw,
                        color,
                        faint: false,
                        dots: true,
                    });
                }
                let chart = svg::line_chart(&svg::LineChart {
                    title: term,
                    x_label: "iteration",
                    y_label: "loss",
                    series,
                    width: 340.0,
                    height: 220.0,
                });
                let alt = format!("{} {term}", st.name);
                charts.push(self.chart(&format!("{}_{term}", st.name), chart, &alt)?);
            }
            let lrs: Vec<Series> = [log_column::LR, log_column::LR_D]
                .iter()
                .enumerate()
                .filter_map(|(k, n)| {
                    float_column(&t, n).map(|v| Series {
                        name: (*n).to_string(),
                        points: iteration.iter().copied().zip(v).collect(),
                        color: PALETTE[(k + 4) % PALETTE.len()].into(),
                        faint: false,
                        dots: false,
                    })
                })
                .collect();
            if !lrs.is_empty() {
                let chart = svg::line_chart(&svg::LineChart {
                    title: "learning rate",
                    x_label: "iteration",
                    y_label: "lr",
                    series: lrs,
                    width: 340.0,
                    height: 220.0,
                });
                let alt = format!("{} learning rate", st.name);
                charts.push(self.chart(&format!("{}_lr", st.name), chart, &alt)?);
            }
            let _ = writeln!(
                self.body,
                "<p>{} iterations{}; losses are unweighted, smoothed over about 2% of the run \
                 (raw values faint).</p><div class=\"charts\">{}</div>",
                iteration.len(),
                st.metrics
                    .get("seconds_per_iteration")
                    .and_then(Value::as_f64)
                    .map(|s| format!(", {:.2} it/s", 1.0 / s.max(1e-9)))
                    .unwrap_or_default(),
                charts.join("")
            );
        }
        if !any {
            self.body
                .push_str("<p class=\"empty\">The pipeline has no training stage.</p>\n");
        }
        self.body.push_str("</section>\n");
        Ok(())
    }

    /// The split threshold between the easy and hard images of `split` (midway between the
    /// last easy and the first hard score), with a label.
    fn threshold(&mut self, split: &StageInfo) -> Option<(f64, String, String)> {
        let by = split
            .params
            .get("by")
            .and_then(Value::as_str)
            .unwrap_or(dag_artifacts::score::column::SCORE)
            .to_string();
        let mut parts = Vec::new();
        for which in ["easy", "hard"] {
            let dir = split.outputs.get(which)?;
            let file = dir.join(dag_artifacts::split::table_file(which));
            match Table::read_parquet(&file) {
                Ok(t) => parts.push(float_column(&t, &by).unwrap_or_default()),
                Err(e) => {
                    self.problem(ReportError::read(&file, e));
                    return None;
                }
            }
        }
        let easy_max = parts[0].iter().copied().fold(f64::NAN, f64::max);
        let hard_min = parts[1].iter().copied().fold(f64::NAN, f64::min);
        let t = match (easy_max.is_finite(), hard_min.is_finite()) {
            (true, true) => (easy_max + hard_min) / 2.0,
            (true, false) => easy_max,
            (false, true) => hard_min,
            _ => return None,
        };
        let lambda = split
            .params
            .get("lambda")
            .and_then(Value::as_f64)
            .map(|l| format!("λ = {l}: "))
            .unwrap_or_default();
        Some((
            t,
            format!(
                "{}: {lambda}{} easy | {} hard",
                split.name,
                parts[0].len(),
                parts[1].len()
            ),
            by,
        ))
    }

    fn entropy(&mut self, input: &ReportInput) -> Result<(), ReportError> {
        let scorers: Vec<(usize, &StageInfo)> = input
            .stages
            .iter()
            .enumerate()
            .filter(|(_, s)| s.kind == "score_entropy")
            .collect();
        if scorers.is_empty() {
            return Ok(());
        }
        self.body.push_str("<section><h2>Entropy ranking</h2>\n");
        for (i, st) in scorers {
            let _ = writeln!(self.body, "<h3>{} {}</h3>", esc(&st.name), badge(st.state));
            let Some(dir) = st.outputs.get("scores") else {
                self.body
                    .push_str("<p class=\"empty\">No scores: the stage has not run.</p>\n");
                continue;
            };
            let split = input
                .stages
                .iter()
                .find(|s| s.kind == "split" && s.upstream.contains(&i));
            let threshold = split.and_then(|s| self.threshold(s));
            let by = threshold
                .as_ref()
                .map_or("score".to_string(), |t| t.2.clone());
            let file = dir.join(SCORES_FILE);
            match Table::read_parquet(&file) {
                Err(e) => self.problem(ReportError::read(&file, e)),
                Ok(t) => {
                    let values = float_column(&t, &by).unwrap_or_default();
                    let chart = svg::histogram(
                        &format!("{}: {by} of {} target images", st.name, values.len()),
                        &format!("{by} (mean normalised entropy; lower = more confident)"),
                        &values,
                        threshold.as_ref().map(|(t, label, _)| (*t, label.clone())),
                    );
                    let alt = format!("histogram of the entropy scores of {}", st.name);
                    let img = self.chart(&format!("{}_histogram", st.name), chart, &alt)?;
                    let rho = st
                        .metrics
                        .get("spearman_difficulty")
                        .and_then(Value::as_f64)
                        .map(|r| {
                            format!(
                                "<p>Spearman's rho between the score and the generator's hidden \
                                 difficulty: {r:.2}.</p>"
                            )
                        })
                        .unwrap_or_default();
                    let _ = writeln!(self.body, "{rho}{img}");
                }
            }
            let Some(vis) = st.outputs.get("visuals") else {
                continue;
            };
            let visuals = match read_index(vis) {
                Ok(v) => v,
                Err(e) => {
                    let path = vis.join(dag_artifacts::visuals::VISUALS_FILE);
                    self.problem(ReportError::read(&path, e));
                    continue;
                }
            };
            for (group, title) in [
                ("easiest", "Easiest images (most confident)"),
                ("hardest", "Hardest images (least confident)"),
            ] {
                let items: Vec<&Visual> = visuals.iter().filter(|v| v.group == group).collect();
                self.gallery(&st.name, title, vis, &items, "pseudo-label")?;
            }
        }
        self.body.push_str("</section>\n");
        Ok(())
    }

    fn samples(&mut self, input: &ReportInput) -> Result<(), ReportError> {
        let evals: Vec<&StageInfo> = input
            .stages
            .iter()
            .filter(|s| s.kind == "evaluate" && s.outputs.contains_key("evaluation"))
            .collect();
        if evals.is_empty() {
            return Ok(());
        }
        self.body
            .push_str("<section><h2>Predictions on the evaluation set</h2>\n");
        for st in evals {
            let dir = st.outputs["evaluation"].join(SAMPLES_DIR);
            let visuals = match read_index(&dir) {
                Ok(v) => v,
                Err(e) => {
                    let path = dir.join(dag_artifacts::visuals::VISUALS_FILE);
                    self.problem(ReportError::read(&path, e));
                    continue;
                }
            };
            let items: Vec<&Visual> = visuals.iter().collect();
            let title = format!("{} {}", esc(&st.name), badge(st.state));
            self.gallery(&st.name, &title, &dir, &items, "prediction")?;
        }
        self.body.push_str("</section>\n");
        Ok(())
    }

    /// A table of pictures: one row per image, one column per picture kind.
    fn gallery(
        &mut self,
        stage: &str,
        title_html: &str,
        dir: &Path,
        items: &[&Visual],
        prediction: &str,
    ) -> Result<(), ReportError> {
        if items.is_empty() {
            return Ok(());
        }
        let columns: [(&str, &str); 5] = [
            ("image", "image"),
            ("ground_truth", "ground truth"),
            ("prediction", prediction),
            ("entropy", "entropy (0 dark .. 1 bright)"),
            ("overlay", "overlay"),
        ];
        let shown: Vec<(&str, &str)> = columns
            .into_iter()
            .filter(|(k, _)| items.iter().any(|v| v.files.contains_key(*k)))
            .collect();
        let _ = writeln!(
            self.body,
            "<h3>{title_html}</h3><div class=\"scroll\"><table class=\"gallery\"><tr><th></th>{}\
             </tr>",
            shown
                .iter()
                .map(|(_, t)| format!("<th>{}</th>", esc(t)))
                .collect::<String>()
        );
        for v in items {
            let mut cap = format!("<b>{}</b>", esc(&v.path));
            if let Some(r) = v.rank {
                let _ = write!(cap, "<br>rank {r}");
            }
            if let Some(s) = v.score {
                let _ = write!(cap, "<br>score {s:.4}");
            }
            let _ = write!(self.body, "<tr><td class=\"cap\">{cap}</td>");
            for (key, label) in &shown {
                let cell = match v.files.get(*key) {
                    Some(f) => {
                        let rel = format!("{}/{}", slug(stage), f);
                        let src: PathBuf = dir.join(f);
                        self.picture(&src, &rel, &format!("{label} of {}", v.path))?
                    }
                    None => String::new(),
                };
                let _ = write!(self.body, "<td>{cell}</td>");
            }
            self.body.push_str("</tr>\n");
        }
        self.body.push_str("</table></div>\n");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_durations() {
        assert_eq!(utc(0.0), "1970-01-01 00:00 UTC");
        assert_eq!(utc(1_700_000_000.0), "2023-11-14 22:13 UTC");
        assert_eq!(utc(951_782_400.0), "2000-02-29 00:00 UTC");
        assert_eq!(seconds(12.34), "12.3 s");
        assert_eq!(seconds(164.0), "2 min 44 s");
        assert_eq!(slug("eval a/b"), "eval_a_b");
    }

    #[test]
    fn smoothing_follows_the_trend_and_keeps_gaps() {
        let v: Vec<f64> = (0..100)
            .map(|i| if i == 50 { f64::NAN } else { 1.0 })
            .collect();
        let s = smooth(&v);
        assert!(s[50].is_nan());
        assert!((s[99] - 1.0).abs() < 1e-12);
    }
}
