//! `compare`: several `evaluate` outputs gathered into one table.

use std::fmt::Write as _;

use dag_api::{
    InputArtifact, InputSpec, OutputSpec, ParamSet, ParamSpec, Params, Stage, StageContext,
    StageError, StageOutcome, Value,
};
use dag_data::{Column, Table};
use serde::Deserialize;

use dag_artifacts::compare::{COMPARISON_FILE, MARKDOWN_FILE};
use dag_artifacts::evaluate::SUMMARY_FILE;
use dag_artifacts::files::data_error;

/// The `compare` stage kind.
pub struct Compare;

/// The params of `compare`.
#[derive(ParamSet, Deserialize)]
struct P {
    /// row order by input name; inputs not listed follow in alphabetical order
    #[param(default = [])]
    order: Vec<String>,
}

/// One evaluated model.
struct Row {
    name: String,
    stage: String,
    model: String,
    method: String,
    miou: f64,
    miou16: f64,
    miou13: f64,
    classes: Vec<(String, f64)>,
}

fn num(v: &Value, key: &str) -> f64 {
    v.get(key).and_then(Value::as_f64).unwrap_or(f64::NAN)
}

fn text(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

fn read_row(name: &str, art: &InputArtifact) -> Result<Row, StageError> {
    let path = art.path.join(SUMMARY_FILE);
    let bytes = std::fs::read(&path).map_err(|e| StageError::from(e).with_path(path.clone()))?;
    let v: Value =
        serde_json::from_slice(&bytes).map_err(|e| StageError::from(e).with_path(path.clone()))?;
    let classes = v
        .get("per_class_iou")
        .and_then(Value::as_array)
        .ok_or_else(|| {
            StageError::new("summary.json has no per_class_iou")
                .with_path(path.clone())
                .with_hint(format!("rerun `{}` with this version of dag", art.producer))
        })?
        .iter()
        .map(|c| (text(c, "class"), num(c, "iou")))
        .collect();
    Ok(Row {
        name: name.to_string(),
        stage: art
            .producer
            .split('.')
            .next()
            .unwrap_or_default()
            .to_string(),
        model: text(&v, "model"),
        method: text(&v, "method"),
        miou: num(&v, "miou"),
        miou16: num(&v, "miou16"),
        miou13: num(&v, "miou13"),
        classes,
    })
}

fn fmt2(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else {
        format!("{v:.2}")
    }
}

/// The terminal table: one line per model, with the gain over the first row.
fn render(rows: &[Row]) -> String {
    let has13 = rows.iter().any(|r| !r.miou13.is_nan());
    let w = rows.iter().map(|r| r.name.len()).max().unwrap_or(5).max(5);
    let mw = rows
        .iter()
        .map(|r| r.method.len())
        .max()
        .unwrap_or(6)
        .max(6);
    let mut s = String::new();
    let _ = write!(s, "{:<w$}  {:<mw$}  {:>6}", "model", "method", "mIoU");
    if has13 {
        let _ = write!(s, "  {:>7}", "mIoU13*");
    }
    let _ = writeln!(s, "  {:>7}", "gain");
    let base = rows.first().map_or(f64::NAN, |r| r.miou);
    for r in rows {
        let _ = write!(s, "{:<w$}  {:<mw$}  {:>6}", r.name, r.method, fmt2(r.miou));
        if has13 {
            let _ = write!(s, "  {:>7}", fmt2(r.miou13));
        }
        let gain = r.miou - base;
        let gain = if gain.is_nan() {
            "-".into()
        } else {
            format!("{gain:+.2}")
        };
        let _ = writeln!(s, "  {gain:>7}");
    }
    s
}

fn markdown(rows: &[Row]) -> String {
    let classes: Vec<&str> = rows
        .first()
        .map(|r| r.classes.iter().map(|(k, _)| k.as_str()).collect())
        .unwrap_or_default();
    let mut s = String::from("| model | method | mIoU | mIoU16 | mIoU13* |");
    for c in &classes {
        let _ = write!(s, " {c} |");
    }
    s.push('\n');
    s.push_str(&"|---".repeat(5 + classes.len()));
    s.push_str("|\n");
    for r in rows {
        let _ = write!(
            s,
            "| {} | {} | {} | {} | {} |",
            r.name,
            r.method,
            fmt2(r.miou),
            fmt2(r.miou16),
            fmt2(r.miou13)
        );
        for c in &classes {
            let v = r
                .classes
                .iter()
                .find(|(k, _)| k == c)
                .map_or(f64::NAN, |x| x.1);
            let _ = write!(s, " {} |", fmt2(v));
        }
        s.push('\n');
    }
    s
}

impl Stage for Compare {
    fn kind(&self) -> &'static str {
        "compare"
    }

    fn code(&self) -> dag_api::Code {
        crate::CODE
    }

    fn doc(&self) -> &'static str {
        "Gathers the summary of several `evaluate` outputs into one table (model, method, mIoU, \
         mIoU16, mIoU13*, per-class IoU): comparison.parquet, comparison.md, and a short table \
         that `dag run` prints at the end. Inputs take any names; the names label the rows."
    }

    fn params(&self) -> Vec<ParamSpec> {
        P::param_specs()
    }

    fn inputs(&self) -> Vec<InputSpec> {
        vec![InputSpec {
            name: InputSpec::ANY_NAME,
            ty: "evaluation",
            required: true,
            doc: "any number of evaluate outputs, e.g. `{ source_only: eval_src, advent: \
                  eval_advent }`",
        }]
    }

    fn outputs(&self, _params: &Params) -> Vec<OutputSpec> {
        vec![OutputSpec {
            name: "comparison".into(),
            ty: "table",
            doc: "comparison.parquet and comparison.md",
        }]
    }

    fn run(&self, ctx: &StageContext<'_>) -> Result<StageOutcome, StageError> {
        let p: P = ctx.params.parse()?;
        for name in &p.order {
            if !ctx.inputs.contains_key(name) {
                return Err(StageError::new(format!(
                    "`order` names `{name}`, which is not an input of this stage"
                ))
                .with_hint("list the names used under `inputs:`"));
            }
        }
        let mut names: Vec<&String> = p.order.iter().collect();
        names.extend(ctx.inputs.keys().filter(|k| !p.order.contains(k)));
        let rows = names
            .iter()
            .map(|n| read_row(n, &ctx.inputs[n.as_str()]))
            .collect::<Result<Vec<_>, _>>()?;

        let mut t = Table::new()
            .with(
                "name",
                Column::Str(rows.iter().map(|r| r.name.clone()).collect()),
            )
            .with(
                "stage",
                Column::Str(rows.iter().map(|r| r.stage.clone()).collect()),
            )
            .with(
                "model",
                Column::Str(rows.iter().map(|r| r.model.clone()).collect()),
            )
            .with(
                "method",
                Column::Str(rows.iter().map(|r| r.method.clone()).collect()),
            )
            .with("miou", Column::F64(rows.iter().map(|r| r.miou).collect()))
            .with(
                "miou16",
                Column::F64(rows.iter().map(|r| r.miou16).collect()),
            )
            .with(
                "miou13",
                Column::F64(rows.iter().map(|r| r.miou13).collect()),
            );
        if let Some(first) = rows.first() {
            for (k, (class, _)) in first.classes.iter().enumerate() {
                let col = rows
                    .iter()
                    .map(|r| r.classes.get(k).map_or(f64::NAN, |x| x.1))
                    .collect();
                t.push(format!("iou_{class}"), Column::F64(col));
            }
        }
        let out = ctx.output("comparison")?;
        let path = out.join(COMPARISON_FILE);
        t.write_parquet(&path)
            .map_err(|e| data_error(e).with_path(path.clone()))?;
        let path = out.join(MARKDOWN_FILE);
        std::fs::write(&path, markdown(&rows)).map_err(|e| StageError::from(e).with_path(path))?;

        let mut outcome = StageOutcome {
            summary: Some(render(&rows)),
            ..Default::default()
        };
        for r in &rows {
            outcome
                .metrics
                .insert(format!("{}_miou", r.name), r.miou.into());
        }
        Ok(outcome)
    }
}
