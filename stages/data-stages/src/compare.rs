//! `compare`: several `evaluate` outputs gathered into one table.

use std::fmt::Write as _;

use dag_api::{
    instance, InputArtifact, InputSpec, OutputSpec, ParamSet, ParamSpec, Params, Stage,
    StageContext, StageError, StageOutcome, Value,
};
use dag_data::{Column, Table};
use serde::Deserialize;

use dag_artifacts::compare::{column, COMPARISON_FILE, MARKDOWN_FILE};
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
    /// The input's name without its seed: the method and any other swept setting.
    group: String,
    /// The seed in the input's name, if it has one.
    seed: Option<String>,
    /// How many runs the row stands for: 1, or the seeds a mean is over.
    n: usize,
    /// Standard deviations over the seeds (sample, n - 1) of a mean row: mIoU, mIoU16, mIoU13,
    /// then per class; empty for a run.
    std: Vec<f64>,
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
    let (group, seed) = split_seed(name);
    Ok(Row {
        name: name.to_string(),
        group,
        seed,
        n: 1,
        std: Vec::new(),
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

/// `advent@seed=1,lambda=0.5` -> (`advent@lambda=0.5`, `Some("1")`); names without a seed are
/// their own group.
fn split_seed(name: &str) -> (String, Option<String>) {
    let (base, setting) = instance::parse(name);
    let seed = setting
        .iter()
        .find(|(axis, _)| *axis == instance::SEED_AXIS)
        .map(|(_, v)| v.to_string());
    let rest: Vec<(String, String)> = setting
        .into_iter()
        .filter(|(axis, _)| *axis != instance::SEED_AXIS)
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    (instance::name(base, &rest), seed)
}

/// Mean and sample standard deviation (NaN for fewer than two values).
fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    if values.len() < 2 {
        return (mean, f64::NAN);
    }
    let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// One mean row per group of runs that differ only in their seed, in the order the groups
/// first appear.
fn means(runs: &[Row]) -> Vec<Row> {
    let mut groups: Vec<&str> = Vec::new();
    for r in runs.iter().filter(|r| r.seed.is_some()) {
        if !groups.contains(&r.group.as_str()) {
            groups.push(&r.group);
        }
    }
    groups
        .into_iter()
        .map(|g| {
            let members: Vec<&Row> = runs.iter().filter(|r| r.group == g).collect();
            let stat = |f: &dyn Fn(&Row) -> f64| {
                mean_std(&members.iter().map(|r| f(r)).collect::<Vec<_>>())
            };
            let (miou, miou_std) = stat(&|r| r.miou);
            let (miou16, miou16_std) = stat(&|r| r.miou16);
            let (miou13, miou13_std) = stat(&|r| r.miou13);
            let mut std = vec![miou_std, miou16_std, miou13_std];
            let classes = members[0]
                .classes
                .iter()
                .enumerate()
                .map(|(k, (class, _))| {
                    let (mean, sd) = stat(&|r| r.classes.get(k).map_or(f64::NAN, |c| c.1));
                    std.push(sd);
                    (class.clone(), mean)
                })
                .collect();
            let first = members[0];
            Row {
                name: g.to_string(),
                group: g.to_string(),
                seed: None,
                n: members.len(),
                std,
                stage: instance::parse(&first.stage).0.to_string(),
                model: first.model.clone(),
                method: first.method.clone(),
                miou,
                miou16,
                miou13,
                classes,
            }
        })
        .collect()
}

fn fmt2(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else {
        format!("{v:.2}")
    }
}

/// The terminal table: one line per model, with the gain over the first row.
/// `mean ± std` for a mean row, the value for a run.
fn with_spread(r: &Row, value: f64, k: usize) -> String {
    match r.std.get(k) {
        Some(sd) if !sd.is_nan() => format!("{} ± {}", fmt2(value), fmt2(*sd)),
        _ => fmt2(value),
    }
}

fn render(rows: &[&Row]) -> String {
    let has13 = rows.iter().any(|r| !r.miou13.is_nan());
    let w = rows.iter().map(|r| r.name.len()).max().unwrap_or(5).max(5);
    let mw = rows
        .iter()
        .map(|r| r.method.len())
        .max()
        .unwrap_or(6)
        .max(6);
    let mut s = String::new();
    let _ = write!(s, "{:<w$}  {:<mw$}  {:>13}", "model", "method", "mIoU");
    if has13 {
        let _ = write!(s, "  {:>13}", "mIoU13*");
    }
    let _ = writeln!(s, "  {:>7}  {:>3}", "gain", "n");
    // Gains are over the first row of the same sort: the first run, or the first mean.
    let first_run = rows
        .iter()
        .find(|r| r.std.is_empty())
        .map_or(f64::NAN, |r| r.miou);
    let first_mean = rows
        .iter()
        .find(|r| !r.std.is_empty())
        .map_or(f64::NAN, |r| r.miou);
    for r in rows {
        let base = if r.std.is_empty() {
            first_run
        } else {
            first_mean
        };
        let miou = with_spread(r, r.miou, 0);
        let _ = write!(s, "{:<w$}  {:<mw$}  {miou:>13}", r.name, r.method);
        if has13 {
            let _ = write!(s, "  {:>13}", with_spread(r, r.miou13, 2));
        }
        let gain = r.miou - base;
        let gain = if gain.is_nan() {
            "-".into()
        } else {
            format!("{gain:+.2}")
        };
        let _ = writeln!(s, "  {gain:>7}  {:>3}", r.n);
    }
    s
}

fn markdown(rows: &[&Row]) -> String {
    let classes: Vec<&str> = rows
        .first()
        .map(|r| r.classes.iter().map(|(k, _)| k.as_str()).collect())
        .unwrap_or_default();
    let mut s = String::from("| model | method | n | mIoU | mIoU16 | mIoU13* |");
    for c in &classes {
        let _ = write!(s, " {c} |");
    }
    s.push('\n');
    s.push_str(&"|---".repeat(6 + classes.len()));
    s.push_str("|\n");
    for r in rows {
        let _ = write!(
            s,
            "| {} | {} | {} | {} | {} | {} |",
            r.name,
            r.method,
            r.n,
            with_spread(r, r.miou, 0),
            with_spread(r, r.miou16, 1),
            with_spread(r, r.miou13, 2)
        );
        for (k, c) in classes.iter().enumerate() {
            let v = r
                .classes
                .iter()
                .find(|(name, _)| name == c)
                .map_or(f64::NAN, |x| x.1);
            let _ = write!(s, " {} |", with_spread(r, v, 3 + k));
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
         that `dag run` prints at the end. Inputs take any names; the names label the rows. \
         Under `seeds:` each input has one row per seed (`advent@seed=1`) and one `mean` row \
         per method and swept setting with the standard deviation over the seeds (n - 1) and n."
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
        let base = |name: &str| instance::parse(name).0.to_string();
        for name in &p.order {
            if !ctx.inputs.keys().any(|k| base(k) == *name) {
                return Err(StageError::new(format!(
                    "`order` names `{name}`, which is not an input of this stage"
                ))
                .with_hint("list the names used under `inputs:`"));
            }
        }
        // Inputs in `order` first (each with all its instances), the rest by name.
        let rank = |k: &String| {
            p.order
                .iter()
                .position(|o| *o == base(k))
                .unwrap_or(p.order.len())
        };
        let mut names: Vec<&String> = ctx.inputs.keys().collect();
        names.sort_by_key(|k| rank(k));
        let runs = names
            .iter()
            .map(|n| read_row(n, &ctx.inputs[n.as_str()]))
            .collect::<Result<Vec<_>, _>>()?;
        let means = means(&runs);
        let rows: Vec<&Row> = runs.iter().chain(&means).collect();

        let strs = |f: &dyn Fn(&Row) -> String| Column::Str(rows.iter().map(|r| f(r)).collect());
        let floats = |f: &dyn Fn(&Row) -> f64| Column::F64(rows.iter().map(|r| f(r)).collect());
        let std_at = |r: &Row, k: usize| r.std.get(k).copied().unwrap_or(f64::NAN);
        let mut t = Table::new()
            .with(column::NAME, strs(&|r| r.name.clone()))
            .with(column::GROUP, strs(&|r| r.group.clone()))
            .with(column::SEED, strs(&|r| r.seed.clone().unwrap_or_default()))
            .with(
                column::ROW,
                strs(&|r| if r.std.is_empty() { "run" } else { "mean" }.to_string()),
            )
            .with(
                column::N,
                Column::U64(rows.iter().map(|r| r.n as u64).collect()),
            )
            .with(column::STAGE, strs(&|r| r.stage.clone()))
            .with(column::MODEL, strs(&|r| r.model.clone()))
            .with(column::METHOD, strs(&|r| r.method.clone()))
            .with(column::MIOU, floats(&|r| r.miou))
            .with(column::std(column::MIOU), floats(&|r| std_at(r, 0)))
            .with(column::MIOU16, floats(&|r| r.miou16))
            .with(column::std(column::MIOU16), floats(&|r| std_at(r, 1)))
            .with(column::MIOU13, floats(&|r| r.miou13))
            .with(column::std(column::MIOU13), floats(&|r| std_at(r, 2)));
        if let Some(first) = rows.first() {
            for (k, (class, _)) in first.classes.iter().enumerate() {
                t.push(
                    format!("{}{class}", column::IOU_PREFIX),
                    floats(&|r| r.classes.get(k).map_or(f64::NAN, |x| x.1)),
                );
            }
            for (k, (class, _)) in first.classes.iter().enumerate() {
                t.push(
                    format!("{}{class}", column::STD_IOU_PREFIX),
                    floats(&|r| std_at(r, 3 + k)),
                );
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
        for r in &runs {
            outcome
                .metrics
                .insert(format!("{}_miou", r.name), r.miou.into());
        }
        for m in &means {
            outcome
                .metrics
                .insert(format!("{}_miou_mean", m.name), m.miou.into());
            outcome
                .metrics
                .insert(format!("{}_miou_std", m.name), m.std[0].into());
        }
        Ok(outcome)
    }
}
