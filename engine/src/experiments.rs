//! Experiments: `seeds:` and per-stage `matrix:` expand a validated pipeline into instances.
//!
//! A stage is swept along an axis when it declares it (a `matrix:` param, or `seed` for a
//! [seeded](dag_api::Stage::seeded) kind under `seeds:`) or when an upstream stage is swept along
//! it; it then runs once per combination of its axes' values, as `name@axis=value,...`. Every
//! other stage stays one instance, which all instances downstream share: its key does not change,
//! so a lambda sweep reuses the stages above the swept one, and adding a seed runs only that
//! seed's instances. A stage with a variadic input slot (`compare`) gathers instead: it is not
//! swept along its inputs' axes but receives every instance of them, each under the input's name
//! with the instance's setting (`advent@seed=1`).

use std::collections::{BTreeMap, HashMap};

use dag_api::instance::{self, SEED_AXIS};
use dag_api::{InputSpec, Value};

use crate::spec::{DatasetRoot, InputRef, Pipeline, StageDef};
use crate::yaml::Span;

/// Why a pipeline cannot be expanded: the stage (index in the unexpanded pipeline) and message.
#[derive(Debug)]
pub struct ExpandError {
    /// Where to point in the pipeline file.
    pub span: Span,
    /// What is wrong.
    pub message: String,
    /// What to do.
    pub hint: Option<String>,
}

/// One axis: who declares it and its values as they appear in instance names.
#[derive(Debug, Clone)]
struct Axis {
    /// The name in instance names (`seed`, or the swept param's).
    name: String,
    /// The stage that sweeps it (`None` for `seed`).
    stage: Option<usize>,
    /// The values, as params (`None` for `seed`, whose values are `seeds`).
    values: Vec<Value>,
    /// The values as written in instance names.
    labels: Vec<String>,
}

/// The pipeline with every swept stage replaced by its instances (unchanged when nothing is
/// swept).
pub fn expand(p: Pipeline) -> Result<Pipeline, ExpandError> {
    let seeded_sweep = p.seeds.is_some();
    if !seeded_sweep && p.stages.iter().all(|s| s.matrix.is_empty()) {
        return Ok(p);
    }
    let axes = all_axes(&p);
    // Axes (indices into `axes`) of every stage, in topological order.
    let mut stage_axes: Vec<Vec<usize>> = vec![Vec::new(); p.stages.len()];
    for &i in &p.order {
        let st = &p.stages[i];
        let mut own: Vec<usize> = axes
            .iter()
            .enumerate()
            .filter(|(_, a)| match a.stage {
                None => seeded_sweep && st.kind.seeded(),
                Some(s) => s == i,
            })
            .map(|(k, _)| k)
            .collect();
        if !gathers(st) {
            for u in p.upstream(i) {
                own.extend(stage_axes[u].iter().copied());
            }
        }
        own.sort_unstable();
        own.dedup();
        let mut names: Vec<&str> = own.iter().map(|&k| axes[k].name.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(ExpandError {
                span: st.span,
                message: format!(
                    "stage `{}` would be swept along two axes named `{}`",
                    st.name, w[0]
                ),
                hint: Some("sweep each param name in one stage only".into()),
            });
        }
        stage_axes[i] = own;
    }
    for d in p.datasets.values() {
        if let DatasetRoot::Stage { stage, output } = &d.root {
            if !stage_axes[*stage].is_empty() {
                let st = &p.stages[*stage];
                return Err(ExpandError {
                    span: st.span,
                    message: format!(
                        "dataset `{}` comes from `{}.{output}`, which is swept",
                        d.name, st.name
                    ),
                    hint: Some(
                        "a dataset root must be one stage shared by every instance; sweep a \
                         stage downstream of it"
                            .into(),
                    ),
                });
            }
        }
    }

    // Every instance of every stage, numbered in file order of their stages.
    let settings: Vec<Vec<Vec<usize>>> = stage_axes
        .iter()
        .map(|own| combinations(own.iter().map(|&k| axes[k].labels.len())))
        .collect();
    let mut first = Vec::with_capacity(p.stages.len());
    let mut count = 0;
    for s in &settings {
        first.push(count);
        count += s.len();
    }
    // The instance of stage `u` whose values on `u`'s axes are those of `chosen` (axis -> value).
    let instance_of = |u: usize, chosen: &HashMap<usize, usize>| -> Option<usize> {
        let own = &stage_axes[u];
        settings[u]
            .iter()
            .position(|values| {
                own.iter()
                    .zip(values)
                    .all(|(k, v)| chosen.get(k) == Some(v))
            })
            .map(|n| first[u] + n)
    };
    // Every instance of `u` that agrees with `chosen` on the axes both have.
    let agreeing = |u: usize, chosen: &HashMap<usize, usize>| -> Vec<usize> {
        let own = &stage_axes[u];
        settings[u]
            .iter()
            .enumerate()
            .filter(|(_, values)| {
                own.iter()
                    .zip(values.iter())
                    .all(|(k, v)| chosen.get(k).is_none_or(|c| c == v))
            })
            .map(|(n, _)| first[u] + n)
            .collect()
    };

    let mut instances: Vec<StageDef> = Vec::with_capacity(count);
    let mut labels_of: Vec<Vec<(String, String)>> = Vec::with_capacity(count);
    for (i, st) in p.stages.iter().enumerate() {
        for values in &settings[i] {
            let chosen: HashMap<usize, usize> = stage_axes[i]
                .iter()
                .copied()
                .zip(values.iter().copied())
                .collect();
            let setting: Vec<(String, String)> = stage_axes[i]
                .iter()
                .zip(values)
                .map(|(&k, &v)| (axes[k].name.clone(), axes[k].labels[v].clone()))
                .collect();
            let mut params = st.params.clone();
            for (&k, &v) in &chosen {
                if axes[k].stage == Some(i) {
                    params
                        .0
                        .insert(axes[k].name.clone(), axes[k].values[v].clone());
                }
            }
            if let Err(msg) = st.kind.check(&params) {
                return Err(ExpandError {
                    span: st.span,
                    message: format!("stage `{}`: {msg}", instance::name(&st.name, &setting)),
                    hint: Some("drop that value from the sweep".into()),
                });
            }
            let mut inputs = BTreeMap::new();
            for (name, r) in &st.inputs {
                if gathers(st) {
                    // Named for real below, once every instance's setting is known.
                    for j in agreeing(r.stage, &chosen) {
                        inputs.insert(
                            format!("{name}@#{j}"),
                            InputRef {
                                stage: j,
                                ..r.clone()
                            },
                        );
                    }
                    continue;
                }
                let j = instance_of(r.stage, &chosen).expect("upstream axes are this stage's");
                inputs.insert(
                    name.clone(),
                    InputRef {
                        stage: j,
                        ..r.clone()
                    },
                );
            }
            let seed = match chosen.iter().find(|(&k, _)| axes[k].stage.is_none()) {
                Some((_, &v)) => p.seeds.as_ref().map(|s| s[v]),
                None => st.seed,
            };
            let name = instance::name(&st.name, &setting);
            labels_of.push(setting.clone());
            instances.push(StageDef {
                name,
                kind: st.kind.clone(),
                outputs: st.kind.outputs(&params),
                params,
                inputs,
                datasets: st.datasets.clone(),
                workspace_paths: st.workspace_paths.clone(),
                span: st.span,
                seed,
                matrix: Vec::new(),
                base: st.base.clone(),
                setting,
            });
        }
    }
    // A gathered input is named after the input and the upstream instance's setting.
    for inst in instances.iter_mut().filter(|inst| gathers(inst)) {
        let renamed: BTreeMap<String, InputRef> = std::mem::take(&mut inst.inputs)
            .into_iter()
            .map(|(name, r)| {
                let (base, _) = instance::parse(&name);
                (instance::name(base, &labels_of[r.stage]), r)
            })
            .collect();
        inst.inputs = renamed;
    }

    let mut datasets = p.datasets;
    for d in datasets.values_mut() {
        if let DatasetRoot::Stage { stage, .. } = &mut d.root {
            *stage = first[*stage];
        }
    }
    let order = p
        .order
        .iter()
        .flat_map(|&i| first[i]..first[i] + settings[i].len())
        .collect();
    let index = instances
        .iter()
        .enumerate()
        .map(|(n, s)| (s.name.clone(), n))
        .collect();
    Ok(Pipeline {
        stages: instances,
        order,
        index,
        datasets,
        ..p
    })
}

/// Whether the stage gathers the instances of its inputs (a variadic input slot) rather than
/// being swept along their axes.
fn gathers(st: &StageDef) -> bool {
    st.kind
        .inputs()
        .iter()
        .any(|s| s.name == InputSpec::ANY_NAME)
}

/// Every axis: `seed` first (under `seeds:`), then each stage's swept params in file order.
fn all_axes(p: &Pipeline) -> Vec<Axis> {
    let mut axes = Vec::new();
    if let Some(seeds) = &p.seeds {
        axes.push(Axis {
            name: SEED_AXIS.to_string(),
            stage: None,
            values: Vec::new(),
            labels: seeds.iter().map(u64::to_string).collect(),
        });
    }
    for (i, st) in p.stages.iter().enumerate() {
        for (param, values) in &st.matrix {
            axes.push(Axis {
                name: param.clone(),
                stage: Some(i),
                values: values.clone(),
                labels: values.iter().map(value_label).collect(),
            });
        }
    }
    axes
}

/// Every combination of one index per axis, the first axis varying slowest.
fn combinations(sizes: impl Iterator<Item = usize>) -> Vec<Vec<usize>> {
    sizes.fold(vec![Vec::new()], |acc, n| {
        acc.iter()
            .flat_map(|prefix| {
                (0..n).map(move |v| {
                    let mut c = prefix.clone();
                    c.push(v);
                    c
                })
            })
            .collect()
    })
}

/// A value as it appears in an instance name: strings bare, everything else as compact JSON.
pub fn value_label(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combinations_vary_the_last_axis_fastest() {
        let c = combinations([2, 3].into_iter());
        assert_eq!(c.len(), 6);
        assert_eq!(c[0], vec![0, 0]);
        assert_eq!(c[1], vec![0, 1]);
        assert_eq!(c[3], vec![1, 0]);
        assert_eq!(combinations(std::iter::empty()), vec![Vec::<usize>::new()]);
    }

    #[test]
    fn labels() {
        assert_eq!(value_label(&serde_json::json!(0.5)), "0.5");
        assert_eq!(value_label(&serde_json::json!("advent")), "advent");
        assert_eq!(value_label(&serde_json::json!([160, 80])), "[160,80]");
        let s = vec![
            ("seed".to_string(), "1".to_string()),
            ("lambda".into(), "0.5".into()),
        ];
        let name = instance::name("split", &s);
        assert_eq!(name, "split@seed=1,lambda=0.5");
        assert_eq!(
            instance::parse(&name),
            ("split", vec![("seed", "1"), ("lambda", "0.5")])
        );
        assert_eq!(instance::parse("split"), ("split", vec![]));
    }
}
