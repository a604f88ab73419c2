//! The comparison table (mIoU and per-class IoU of every evaluated model), read from a
//! `compare` stage's comparison.parquet or, without one, from the `evaluate` summaries, and
//! written as a terminal table, CSV, JSON or Markdown.

use std::fmt::Write as _;
use std::path::Path;

use dag_artifacts::compare::{column, COMPARISON_FILE};
use dag_artifacts::evaluate::SUMMARY_FILE;
use dag_data::{Column, Table};
use serde_json::{json, Value};

use crate::{ReportError, ReportInput, State};

/// One evaluated model.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The row's label (the compare input's name, or the evaluate stage's name).
    pub name: String,
    /// The evaluate stage.
    pub stage: String,
    pub method: String,
    pub miou: f64,
    pub miou16: f64,
    pub miou13: f64,
    /// IoU in percent per class of [`Comparison::classes`]; NaN where undefined.
    pub iou: Vec<f64>,
    /// How many runs the row stands for: 1, or the seeds a `compare` mean row is over.
    pub n: usize,
    /// A mean row's standard deviation of the mIoU over the seeds; NaN for a run.
    pub miou_std: f64,
    /// A mean row's standard deviation of each class's IoU; NaN for a run.
    pub iou_std: Vec<f64>,
    /// The method and swept setting without the seed: a mean row's name, and the name of the
    /// mean row a run belongs to.
    pub group: String,
}

/// mIoU and per-class IoU of several models.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    /// Where the numbers come from, e.g. `compare (comparison.parquet)`.
    pub source: String,
    pub classes: Vec<String>,
    pub rows: Vec<Row>,
}

/// A mean over seeds and what it is made of: index 0 of each list is the mIoU, then one entry
/// per class of [`Comparison::classes`].
#[derive(Debug, Clone, PartialEq)]
pub struct Spread {
    /// The mean row's name (method and swept setting).
    pub name: String,
    pub mean: Vec<f64>,
    /// Sample standard deviations over the seeds.
    pub std: Vec<f64>,
    /// Each seed's values.
    pub runs: Vec<Vec<f64>>,
}

/// The output formats of `dag metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Csv,
    Json,
    Markdown,
}

fn f64s(t: &Table, name: &str, file: &Path) -> Result<Vec<f64>, ReportError> {
    match t.column(name) {
        Some(Column::F64(v)) => Ok(v.clone()),
        Some(Column::F32(v)) => Ok(v.iter().map(|&x| f64::from(x)).collect()),
        _ => Err(ReportError::column(file, name, "float")),
    }
}

fn strs(t: &Table, name: &str, file: &Path) -> Result<Vec<String>, ReportError> {
    match t.column(name) {
        Some(Column::Str(v)) => Ok(v.clone()),
        _ => Err(ReportError::column(file, name, "text")),
    }
}

/// The comparison of the pipeline's results: the first `compare` stage with a result, else the
/// summaries of the `evaluate` stages that have one; `None` when nothing was evaluated yet.
pub fn comparison(input: &ReportInput) -> Result<Option<Comparison>, ReportError> {
    let has_result = |s: &&crate::StageInfo| !matches!(s.state, State::NotRun | State::Failed);
    if let Some((st, dir)) = input
        .stages
        .iter()
        .filter(has_result)
        .filter(|s| s.kind == "compare")
        .find_map(|s| s.outputs.get("comparison").map(|d| (s, d)))
    {
        let file = dir.join(COMPARISON_FILE);
        let t = Table::read_parquet(&file).map_err(|e| ReportError::read(&file, e))?;
        let classes: Vec<String> = t
            .names()
            .filter_map(|n| n.strip_prefix(column::IOU_PREFIX))
            .map(str::to_string)
            .collect();
        let iou = classes
            .iter()
            .map(|c| f64s(&t, &format!("{}{c}", column::IOU_PREFIX), &file))
            .collect::<Result<Vec<_>, _>>()?;
        let (names, stages, methods) = (
            strs(&t, column::NAME, &file)?,
            strs(&t, column::STAGE, &file)?,
            strs(&t, column::METHOD, &file)?,
        );
        let (miou, miou16, miou13) = (
            f64s(&t, column::MIOU, &file)?,
            f64s(&t, column::MIOU16, &file)?,
            f64s(&t, column::MIOU13, &file)?,
        );
        // Tables written before `seeds:` have neither column: every row is one run.
        let n: Vec<usize> = match t.column(column::N) {
            Some(Column::U64(v)) => v.iter().map(|&n| n as usize).collect(),
            _ => vec![1; t.num_rows()],
        };
        let optional = |name: &str| match t.column(name) {
            Some(_) => f64s(&t, name, &file),
            None => Ok(vec![f64::NAN; t.num_rows()]),
        };
        let miou_std = optional(&column::std(column::MIOU))?;
        let iou_std = classes
            .iter()
            .map(|c| optional(&format!("{}{c}", column::STD_IOU_PREFIX)))
            .collect::<Result<Vec<_>, _>>()?;
        let groups = match t.column(column::GROUP) {
            Some(_) => strs(&t, column::GROUP, &file)?,
            None => names.clone(),
        };
        let rows = (0..t.num_rows())
            .map(|r| Row {
                name: names[r].clone(),
                stage: stages[r].clone(),
                method: methods[r].clone(),
                miou: miou[r],
                miou16: miou16[r],
                miou13: miou13[r],
                iou: iou.iter().map(|col| col[r]).collect(),
                n: n[r],
                miou_std: miou_std[r],
                iou_std: iou_std.iter().map(|col| col[r]).collect(),
                group: groups[r].clone(),
            })
            .collect();
        return Ok(Some(Comparison {
            source: format!("{} ({COMPARISON_FILE})", st.name),
            classes,
            rows,
        }));
    }
    let mut classes: Vec<String> = Vec::new();
    let mut rows = Vec::new();
    for st in input
        .stages
        .iter()
        .filter(has_result)
        .filter(|s| s.kind == "evaluate")
    {
        let Some(dir) = st.outputs.get("evaluation") else {
            continue;
        };
        let file = dir.join(SUMMARY_FILE);
        let bytes = std::fs::read(&file).map_err(|e| ReportError::read(&file, e))?;
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| ReportError::read(&file, e))?;
        let num = |k: &str| v.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
        let per_class: Vec<(String, f64)> = v
            .get("per_class_iou")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .map(|c| {
                        (
                            c.get("class")
                                .and_then(Value::as_str)
                                .unwrap_or_default()
                                .to_string(),
                            c.get("iou").and_then(Value::as_f64).unwrap_or(f64::NAN),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        if classes.is_empty() {
            classes = per_class.iter().map(|(c, _)| c.clone()).collect();
        }
        rows.push(Row {
            name: st.name.clone(),
            stage: st.name.clone(),
            method: v
                .get("method")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            miou: num("miou"),
            miou16: num("miou16"),
            miou13: num("miou13"),
            iou: classes
                .iter()
                .map(|c| {
                    per_class
                        .iter()
                        .find(|(k, _)| k == c)
                        .map_or(f64::NAN, |x| x.1)
                })
                .collect(),
            n: 1,
            miou_std: f64::NAN,
            iou_std: vec![f64::NAN; classes.len()],
            group: st.name.clone(),
        });
    }
    if rows.is_empty() {
        return Ok(None);
    }
    Ok(Some(Comparison {
        source: "evaluate summaries (summary.json)".into(),
        classes,
        rows,
    }))
}

fn fmt2(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.2}")
    } else {
        "-".into()
    }
}

impl Comparison {
    /// The headline columns: (header, value per row).
    pub fn columns(&self) -> Vec<(String, Vec<f64>)> {
        let mut cols = vec![(
            "mIoU".to_string(),
            self.rows.iter().map(|r| r.miou).collect(),
        )];
        for (name, get) in [
            ("mIoU16", (|r: &Row| r.miou16) as fn(&Row) -> f64),
            ("mIoU13*", |r: &Row| r.miou13),
        ] {
            let v: Vec<f64> = self.rows.iter().map(get).collect();
            // A 16-class run's mIoU16 equals its mIoU; show it only when it adds something.
            let same = v
                .iter()
                .zip(&cols[0].1)
                .all(|(a, b)| a == b || !a.is_finite());
            if v.iter().any(|x| x.is_finite()) && !(name == "mIoU16" && same) {
                cols.push((name.to_string(), v));
            }
        }
        for (k, c) in self.classes.iter().enumerate() {
            cols.push((c.clone(), self.rows.iter().map(|r| r.iou[k]).collect()));
        }
        cols
    }

    /// The mean rows with their spread, for charts: per mean row its name, its values (mIoU,
    /// then per class), their standard deviations and the values of each of its runs. `None`
    /// without mean rows.
    pub fn spread(&self) -> Option<Vec<Spread>> {
        if !self.has_means() {
            return None;
        }
        let values = |r: &Row| {
            std::iter::once(r.miou)
                .chain(r.iou.iter().copied())
                .collect()
        };
        Some(
            self.rows
                .iter()
                .filter(|r| r.miou_std.is_finite() || r.n > 1)
                .map(|m| Spread {
                    name: m.name.clone(),
                    mean: values(m),
                    std: std::iter::once(m.miou_std)
                        .chain(m.iou_std.iter().copied())
                        .collect(),
                    runs: self
                        .rows
                        .iter()
                        .filter(|r| r.n == 1 && !r.miou_std.is_finite() && r.group == m.name)
                        .map(values)
                        .collect(),
                })
                .collect(),
        )
    }

    /// Whether some row is a mean over seeds (a `compare` under `seeds:`).
    pub fn has_means(&self) -> bool {
        self.rows.iter().any(|r| r.n > 1 || r.miou_std.is_finite())
    }

    /// The index of the best (highest) finite value of a column, if any.
    pub fn best(values: &[f64]) -> Option<usize> {
        values
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
    }

    /// The table in `format`.
    pub fn render(&self, format: Format) -> String {
        match format {
            Format::Table => self.terminal(),
            Format::Csv => self.csv(),
            Format::Json => serde_json::to_string_pretty(&self.json()).expect("serializes") + "\n",
            Format::Markdown => self.markdown(),
        }
    }

    /// For a terminal: the headline numbers, then per-class IoU with one column per model (19
    /// classes do not fit a terminal as columns); `*` marks the best value of each line.
    fn terminal(&self) -> String {
        let cols = self.columns();
        let head = cols
            .iter()
            .take_while(|(n, _)| n.starts_with("mIoU"))
            .count();
        let nw = self
            .rows
            .iter()
            .map(|r| r.name.len())
            .max()
            .unwrap_or(5)
            .max(5);
        let mw = self
            .rows
            .iter()
            .map(|r| r.method.len())
            .max()
            .unwrap_or(6)
            .max(6);
        let cell = |v: f64, best: bool| format!("{}{}", fmt2(v), if best { "*" } else { " " });
        let spread = self.has_means();
        let mut s = String::new();
        let _ = write!(s, "{:<nw$}  {:<mw$}", "model", "method");
        for (n, _) in &cols[..head] {
            let _ = write!(s, "  {n:>8}");
        }
        if spread {
            let _ = write!(s, "  {:>6}  {:>3}", "± std", "n");
        }
        s.push('\n');
        for (r, row) in self.rows.iter().enumerate() {
            let _ = write!(s, "{:<nw$}  {:<mw$}", row.name, row.method);
            for (_, v) in &cols[..head] {
                let _ = write!(s, "  {:>8}", cell(v[r], Self::best(v) == Some(r)));
            }
            if spread {
                let std = if row.miou_std.is_finite() {
                    fmt2(row.miou_std)
                } else {
                    String::new()
                };
                let _ = write!(s, "  {std:>6}  {:>3}", row.n);
            }
            s.push('\n');
        }
        if !self.classes.is_empty() {
            let cw = self
                .classes
                .iter()
                .map(String::len)
                .max()
                .unwrap_or(5)
                .max(5);
            let vw = nw.max(8);
            let _ = write!(s, "\nIoU per class\n{:<cw$}", "class");
            for row in &self.rows {
                let _ = write!(s, "  {:>vw$}", row.name);
            }
            s.push('\n');
            for (name, v) in &cols[head..] {
                let _ = write!(s, "{name:<cw$}");
                for (r, x) in v.iter().enumerate() {
                    let _ = write!(s, "  {:>vw$}", cell(*x, Self::best(v) == Some(r)));
                }
                s.push('\n');
            }
        }
        let _ = writeln!(s, "\n* best of its line; from {}", self.source);
        s
    }

    fn csv(&self) -> String {
        let quote = |f: &str| {
            if f.contains([',', '"', '\n']) {
                format!("\"{}\"", f.replace('"', "\"\""))
            } else {
                f.to_string()
            }
        };
        let num = |v: f64| {
            if v.is_finite() {
                format!("{v}")
            } else {
                String::new()
            }
        };
        let mut s = String::from("name,stage,method,miou,miou16,miou13");
        for c in &self.classes {
            let _ = write!(s, ",{}", quote(&format!("iou_{c}")));
        }
        s.push('\n');
        for r in &self.rows {
            let _ = write!(
                s,
                "{},{},{},{},{},{}",
                quote(&r.name),
                quote(&r.stage),
                quote(&r.method),
                num(r.miou),
                num(r.miou16),
                num(r.miou13)
            );
            for v in &r.iou {
                let _ = write!(s, ",{}", num(*v));
            }
            s.push('\n');
        }
        s
    }

    /// JSON, with `null` for undefined numbers and per-class IoU as an ordered list.
    pub fn json(&self) -> Value {
        let num = |v: f64| if v.is_finite() { json!(v) } else { Value::Null };
        json!({
            "source": self.source,
            "classes": self.classes,
            "models": self.rows.iter().map(|r| json!({
                "name": r.name,
                "stage": r.stage,
                "method": r.method,
                "miou": num(r.miou),
                "miou16": num(r.miou16),
                "miou13": num(r.miou13),
                "n": r.n,
                "miou_std": num(r.miou_std),
                "per_class_iou": self.classes.iter().zip(&r.iou)
                    .map(|(c, v)| json!({ "class": c, "iou": num(*v) }))
                    .collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })
    }

    /// Markdown; the best value of each column in bold.
    fn markdown(&self) -> String {
        let cols = self.columns();
        let mut s = String::from("| model | method |");
        for (n, _) in &cols {
            let _ = write!(s, " {n} |");
        }
        s.push('\n');
        s.push_str(&"|---".repeat(2));
        s.push_str(&"|---:".repeat(cols.len()));
        s.push_str("|\n");
        for (r, row) in self.rows.iter().enumerate() {
            let _ = write!(s, "| {} | {} |", row.name, row.method);
            for (_, v) in &cols {
                if Self::best(v) == Some(r) {
                    let _ = write!(s, " **{}** |", fmt2(v[r]));
                } else {
                    let _ = write!(s, " {} |", fmt2(v[r]));
                }
            }
            s.push('\n');
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Comparison {
        Comparison {
            source: "test".into(),
            classes: vec!["road".into(), "sky, high".into()],
            rows: vec![
                Row {
                    name: "a".into(),
                    stage: "eval_a".into(),
                    method: "source_only".into(),
                    miou: 10.0,
                    miou16: 10.0,
                    miou13: 12.0,
                    iou: vec![50.0, f64::NAN],
                    n: 1,
                    miou_std: f64::NAN,
                    iou_std: vec![f64::NAN; 2],
                    group: "a".into(),
                },
                Row {
                    name: "b".into(),
                    stage: "eval_b".into(),
                    method: "advent".into(),
                    miou: 20.5,
                    miou16: 20.5,
                    miou13: 11.0,
                    iou: vec![40.0, 3.0],
                    n: 1,
                    miou_std: f64::NAN,
                    iou_std: vec![f64::NAN; 2],
                    group: "b".into(),
                },
            ],
        }
    }

    #[test]
    fn formats() {
        let c = sample();
        let csv = c.render(Format::Csv);
        assert_eq!(
            csv,
            "name,stage,method,miou,miou16,miou13,iou_road,\"iou_sky, high\"\n\
             a,eval_a,source_only,10,10,12,50,\n\
             b,eval_b,advent,20.5,20.5,11,40,3\n"
        );
        let j: Value = serde_json::from_str(&c.render(Format::Json)).unwrap();
        assert_eq!(j["models"][1]["miou"], 20.5);
        assert_eq!(j["models"][0]["per_class_iou"][1]["iou"], Value::Null);
        let md = c.render(Format::Markdown);
        // mIoU16 equals mIoU for every row, so it is left out.
        assert!(md.starts_with("| model | method | mIoU | mIoU13* | road | sky, high |\n"));
        assert!(
            md.contains("| b | advent | **20.50** | 11.00 | 40.00 | **3.00** |"),
            "{md}"
        );
        assert!(
            md.contains("| a | source_only | 10.00 | **12.00** | **50.00** | - |"),
            "{md}"
        );
        let t = c.render(Format::Table);
        assert!(t.contains("20.50*"), "{t}");
        assert!(t.contains("IoU per class"), "{t}");
    }
}
