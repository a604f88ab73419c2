//! The pipeline file: YAML -> a validated, typed [`Pipeline`] whose every problem is reported
//! with the file, line and column before anything runs.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dag_api::{
    ArtifactType, DatasetRef, InputSpec, OutputSpec, ParamSpec, ParamType, Params, Preflight,
    Registry, Stage, Value,
};
use petgraph::graph::{DiGraph, NodeIndex};

use crate::diag::{did_you_mean, Source, SpecError, SpecErrors};
use crate::yaml::{self, Key, Node, Span, Yaml};

const TOP_KEYS: &[&str] = &[
    "name", "device", "seed", "seeds", "jobs", "datasets", "stages",
];
const STAGE_KEYS: &[&str] = &["kind", "inputs", "params", "matrix"];
const DATASET_KEYS: &[&str] = &["format", "root", "classes"];
/// Pipeline-level keys `-S` may set (`-S seeds=[0,1,2]`); every other override names a stage.
const TOP_OVERRIDES: &[&str] = &["seed", "seeds"];
const DEVICES: &[&str] = &["auto", "flex", "wgpu", "cuda", "tch"];

/// A validated pipeline.
pub struct Pipeline {
    /// The pipeline's name (`name:`, else the file's stem).
    pub name: String,
    /// Absolute path of the pipeline file.
    pub file: PathBuf,
    /// Absolute directory of the pipeline file; relative paths in it are relative to this.
    pub workdir: PathBuf,
    /// `device:` as written (`auto` when absent); the CLI resolves it.
    pub device: String,
    /// `seed:` (0 when absent; the first of `seeds:` when that is given).
    pub seed: u64,
    /// `seeds:`, when given: every seeded stage and its dependents run once per seed.
    pub seeds: Option<Vec<u64>>,
    /// `jobs:`, how many independent stages `dag run` runs at once unless `--jobs` says
    /// otherwise (1 when absent). Scheduling only: it is not part of any stage's key.
    pub jobs: usize,
    /// `datasets:` by name.
    pub datasets: BTreeMap<String, Dataset>,
    /// Stages in file order.
    pub stages: Vec<StageDef>,
    /// Stage indices in a topological order (file order among independent stages).
    pub order: Vec<usize>,
    /// Stage name -> index.
    pub index: HashMap<String, usize>,
}

/// An entry of `datasets:`.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Its key under `datasets:`.
    pub name: String,
    /// `format:` (`cityscapes`, `synthia`, ...).
    pub format: String,
    /// `classes:`.
    pub classes: u32,
    /// Every other key, as written.
    pub extra: dag_api::Map<String, Value>,
    /// `root:`.
    pub root: DatasetRoot,
}

/// Where a dataset lives.
#[derive(Debug, Clone, PartialEq)]
pub enum DatasetRoot {
    /// A path relative to the pipeline file.
    Workspace(String),
    /// The output of a stage of this pipeline.
    /// The output `output` of stage index `stage`.
    Stage {
        /// Index of the producing stage.
        stage: usize,
        /// Name of its output.
        output: String,
    },
}

/// An input edge: `stage.output`.
#[derive(Debug, Clone, PartialEq)]
pub struct InputRef {
    /// Index of the producing stage.
    pub stage: usize,
    /// Name of its output.
    pub output: String,
    /// The type the input slot declares.
    pub ty: ArtifactType,
}

/// One validated stage.
pub struct StageDef {
    /// Its key under `stages:`.
    pub name: String,
    /// The kind that runs it.
    pub kind: Arc<dyn Stage>,
    /// Every default filled in, every value type-checked.
    pub params: Params,
    /// Declared outputs for these params.
    pub outputs: Vec<OutputSpec>,
    /// Input name -> producer (including path edges: a dep inside another stage's path output).
    pub inputs: BTreeMap<String, InputRef>,
    /// Names of the datasets its params refer to.
    pub datasets: Vec<String>,
    /// Workspace paths its params name (hashed into the key), relative to the pipeline file.
    pub workspace_paths: Vec<String>,
    /// Where its name is in the file.
    pub span: Span,
    /// Its seed when its kind is [`Stage::seeded`] (then part of its key), else `None`.
    pub seed: Option<u64>,
    /// `matrix:`, the values each swept param takes (empty once expanded into instances).
    pub matrix: Vec<(String, Vec<Value>)>,
    /// The stage's name in the file; an instance's [`StageDef::name`] adds its setting.
    pub base: String,
    /// An instance's setting, `(axis, value)` in axis order (`seed`, then swept params); empty
    /// for a stage that is not swept.
    pub setting: Vec<(String, String)>,
}

impl Pipeline {
    /// Distinct upstream stages of `i`: producers of its inputs and of its datasets' roots.
    pub fn upstream(&self, i: usize) -> BTreeSet<usize> {
        let st = &self.stages[i];
        let mut up: BTreeSet<usize> = st.inputs.values().map(|r| r.stage).collect();
        for d in &st.datasets {
            if let Some(DatasetRoot::Stage { stage, .. }) = self.datasets.get(d).map(|d| &d.root) {
                up.insert(*stage);
            }
        }
        up
    }

    /// Direct downstream stages of every stage.
    pub fn downstream(&self) -> Vec<BTreeSet<usize>> {
        let mut down = vec![BTreeSet::new(); self.stages.len()];
        for i in 0..self.stages.len() {
            for u in self.upstream(i) {
                down[u].insert(i);
            }
        }
        down
    }

    /// `i` and everything it depends on, transitively.
    pub fn ancestors(&self, i: usize) -> BTreeSet<usize> {
        let mut seen = BTreeSet::from([i]);
        let mut todo = vec![i];
        while let Some(s) = todo.pop() {
            for u in self.upstream(s) {
                if seen.insert(u) {
                    todo.push(u);
                }
            }
        }
        seen
    }

    /// The [`DatasetRef`]s with workspace roots (those that exist before anything runs).
    pub fn workspace_datasets(&self) -> BTreeMap<String, DatasetRef> {
        self.datasets
            .values()
            .filter_map(|d| match &d.root {
                DatasetRoot::Workspace(p) => Some((d.name.clone(), d.to_ref(self.workdir.join(p)))),
                DatasetRoot::Stage { .. } => None,
            })
            .collect()
    }
}

impl Dataset {
    /// The handle a stage receives, with the root resolved to `root`.
    pub fn to_ref(&self, root: PathBuf) -> DatasetRef {
        DatasetRef {
            name: self.name.clone(),
            format: self.format.clone(),
            root,
            classes: self.classes,
            extra: self.extra.clone(),
        }
    }
}

/// A `-S stage.param=value` from the command line.
#[derive(Debug, Clone)]
pub struct Override {
    /// Stage name.
    pub stage: String,
    /// Param name.
    pub param: String,
    /// The value, parsed as YAML.
    pub value: Yaml,
    /// Where the stage name is in the argument.
    pub stage_span: Span,
    /// Where the param name is in the argument.
    pub param_span: Span,
    /// The argument itself, for error messages.
    pub source: Source,
}

impl Override {
    /// Parses `stage.param=value`; the value is YAML (`3`, `0.5`, `[1, 2]`, `abc`).
    pub fn parse(arg: &str) -> Result<Self, SpecError> {
        let source = Source::new(format!("-S {arg}"), arg);
        let whole = Span {
            index: 0,
            len: arg.chars().count(),
            line: 1,
            col: 1,
        };
        let Some(eq) = arg.find('=') else {
            return Err(SpecError::new(
                &source,
                whole,
                "an override needs the form `stage.param=value`",
            )
            .hint("e.g. `-S train.iters=100`"));
        };
        let lhs = &arg[..eq];
        let top_level = TOP_OVERRIDES.contains(&lhs);
        let Some(dot) = lhs.find('.').or(top_level.then_some(0)) else {
            return Err(SpecError::new(
                &source,
                whole,
                "an override needs the form `stage.param=value`",
            )
            .hint("name the stage before the param, e.g. `-S train.iters=100`"));
        };
        let (stage, param) = if top_level {
            ("", lhs)
        } else {
            (&lhs[..dot], &lhs[dot + 1..])
        };
        let shift = arg[..=eq].chars().count();
        let mut value = yaml::parse(&arg[eq + 1..]).map_err(|e| {
            let mut sp = e.span;
            sp.index += shift;
            sp.col += shift;
            SpecError::new(&source, sp, e.message).maybe_hint(e.hint)
        })?;
        shift_spans(&mut value, shift);
        Ok(Override {
            stage: stage.to_string(),
            param: param.to_string(),
            value,
            stage_span: Span {
                index: 0,
                len: stage.chars().count(),
                line: 1,
                col: 1,
            },
            param_span: Span {
                index: if top_level { 0 } else { dot + 1 },
                len: param.chars().count(),
                line: 1,
                col: if top_level { 1 } else { dot + 2 },
            },
            source,
        })
    }
}

/// Whether an override's value sweeps the param (a list of its values) rather than sets it: a
/// list for a param that is not itself a list, a list of lists for one that is.
fn is_sweep(ty: &ParamType, value: &Yaml) -> bool {
    let Node::Seq(items) = &value.node else {
        return false;
    };
    match ty {
        ParamType::List(_) | ParamType::Tuple(_) => items
            .first()
            .is_some_and(|first| matches!(first.node, Node::Seq(_))),
        _ => true,
    }
}

fn shift_spans(y: &mut Yaml, shift: usize) {
    y.span.index += shift;
    y.span.col += shift;
    match &mut y.node {
        Node::Scalar { .. } => {}
        Node::Seq(items) => items.iter_mut().for_each(|i| shift_spans(i, shift)),
        Node::Map(entries) => entries.iter_mut().for_each(|(k, v)| {
            k.span.index += shift;
            k.span.col += shift;
            shift_spans(v, shift);
        }),
    }
}

/// Reads and validates a pipeline file.
pub fn load(
    path: &Path,
    registry: &Registry,
    overrides: &[Override],
) -> Result<Pipeline, SpecErrors> {
    let bytes = std::fs::read(path).map_err(|e| {
        let src = Source::new(path.display().to_string(), "");
        SpecErrors(vec![SpecError::new(
            &src,
            Span {
                index: 0,
                len: 1,
                line: 1,
                col: 1,
            },
            format!("cannot read the pipeline file: {e}"),
        )
        .hint("check the path; run `dag` from the directory you expect")])
    })?;
    let text = match String::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            // Point at the first bad byte, showing the valid text before it.
            let good = &e.as_bytes()[..e.utf8_error().valid_up_to()];
            let good = std::str::from_utf8(good).expect("valid up to here");
            let line = good.matches('\n').count() + 1;
            let col = good.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            let src = Source::new(path.display().to_string(), good);
            return Err(SpecErrors(vec![SpecError::new(
                &src,
                Span {
                    index: good.chars().count(),
                    len: 1,
                    line,
                    col,
                },
                format!(
                    "the file is not valid UTF-8 (byte {} is not part of a character)",
                    e.utf8_error().valid_up_to()
                ),
            )
            .hint("save the pipeline file as UTF-8 text")]));
        }
    };
    let file = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let workdir = file.parent().map(Path::to_path_buf).unwrap_or_default();
    let source = Source::new(path.display().to_string(), text);
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "pipeline".into());
    load_str(&source, &stem, file, workdir, registry, overrides)
}

/// Validates a pipeline held in memory (the file's path only names it and anchors relative paths).
pub fn load_str(
    source: &Source,
    default_name: &str,
    file: PathBuf,
    workdir: PathBuf,
    registry: &Registry,
    overrides: &[Override],
) -> Result<Pipeline, SpecErrors> {
    let doc = yaml::parse(&source.text).map_err(|e| {
        SpecErrors(vec![
            SpecError::new(source, e.span, e.message).maybe_hint(e.hint)
        ])
    })?;
    let mut v = Validator {
        src: source,
        errors: Vec::new(),
        registry,
        declared_datasets: BTreeSet::new(),
    };
    let p = v.pipeline(&doc, default_name, file, workdir, overrides);
    match p {
        Some(p) if v.errors.is_empty() => Ok(p),
        _ => Err(SpecErrors(v.errors)),
    }
}

struct Validator<'a> {
    src: &'a Source,
    errors: Vec<SpecError>,
    registry: &'a Registry,
    /// Every name under `datasets:`, valid or not (an invalid one is reported once, where it is).
    declared_datasets: BTreeSet<String>,
}

/// A stage as written, before its references are resolved.
struct RawStage<'y> {
    key: &'y Key,
    node: &'y Yaml,
    kind: Option<Arc<dyn Stage>>,
    params: Option<Params>,
    params_span: Span,
    inputs: Vec<(&'y Key, &'y Yaml)>,
    inputs_span: Span,
    matrix: Vec<(String, Vec<Value>)>,
}

impl<'a> Validator<'a> {
    /// A validator whose errors point into a `-S` argument instead of the file; the caller
    /// moves its errors over.
    fn for_override<'o>(&self, o: &'o Override) -> Validator<'o>
    where
        'a: 'o,
    {
        Validator {
            src: &o.source,
            errors: Vec::new(),
            registry: self.registry,
            declared_datasets: BTreeSet::new(),
        }
    }

    fn err(&mut self, span: Span, msg: impl Into<String>) -> &mut SpecError {
        self.errors.push(SpecError::new(self.src, span, msg));
        self.errors.last_mut().expect("just pushed")
    }

    fn map<'y>(&mut self, y: &'y Yaml, what: &str) -> Option<&'y [(Key, Yaml)]> {
        match &y.node {
            Node::Map(m) => Some(m),
            _ => {
                let t = y.type_name();
                self.err(y.span, format!("{what} must be a mapping, found {t}"));
                None
            }
        }
    }

    fn string(&mut self, y: &Yaml, what: &str) -> Option<String> {
        match (&y.node, y.to_json()) {
            (Node::Scalar { value, .. }, v) if !v.is_null() => Some(value.clone()),
            _ => {
                let t = y.type_name();
                self.err(y.span, format!("{what} must be a string, found {t}"));
                None
            }
        }
    }

    fn check_keys(&mut self, entries: &[(Key, Yaml)], allowed: &[&str], what: &str) {
        for (k, _) in entries {
            if !allowed.contains(&k.name.as_str()) {
                let hint = did_you_mean(&k.name, allowed.iter().copied())
                    .unwrap_or_else(|| format!("allowed keys: {}", allowed.join(", ")));
                self.err(k.span, format!("unknown key `{}` in {what}", k.name))
                    .hint = Some(hint);
            }
        }
    }

    fn name_ok(&mut self, k: &Key, what: &str) -> bool {
        let ok = !k.name.is_empty()
            && !k.name.starts_with('.')
            && k.name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !ok {
            self.err(k.span, format!("invalid {what} name `{}`", k.name))
                .hint =
                Some("use letters, digits, `_` and `-` only (it becomes a directory name)".into());
        }
        ok
    }

    fn pipeline(
        &mut self,
        doc: &Yaml,
        default_name: &str,
        file: PathBuf,
        workdir: PathBuf,
        overrides: &[Override],
    ) -> Option<Pipeline> {
        let top = self.map(doc, "a pipeline file")?;
        self.check_keys(top, TOP_KEYS, "the pipeline");
        let get = |name: &str| top.iter().find(|(k, _)| k.name == name);

        let mut name = default_name.to_string();
        if let Some((k, v)) = get("name") {
            if let Some(n) = self.string(v, "`name`") {
                let key = Key {
                    name: n.clone(),
                    span: v.span,
                };
                let _ = k;
                if self.name_ok(&key, "pipeline") {
                    name = n;
                }
            }
        }
        let mut device = "auto".to_string();
        if let Some((_, v)) = get("device") {
            if let Some(d) = self.string(v, "`device`") {
                if DEVICES.contains(&d.as_str()) {
                    device = d;
                } else {
                    let hint = did_you_mean(&d, DEVICES.iter().copied())
                        .unwrap_or_else(|| format!("expected one of {}", DEVICES.join(", ")));
                    self.err(v.span, format!("unknown device `{d}`")).hint = Some(hint);
                }
            }
        }
        let mut seed = 0u64;
        if let Some((_, v)) = get("seed") {
            seed = self.seed_value(v, "`seed`").unwrap_or(0);
        }
        let mut seeds = None;
        if let Some((k, v)) = get("seeds") {
            if get("seed").is_some() {
                self.err(k.span, "both `seed` and `seeds` are given").hint =
                    Some("keep `seeds` to sweep the seeds, or `seed` for one".into());
            }
            seeds = self.seed_list(v);
        }
        for o in overrides.iter().filter(|o| o.stage.is_empty()) {
            let mut sub = self.for_override(o);
            if o.param == "seeds" {
                seeds = sub.seed_list(&o.value);
            } else if let Some(s) = sub.seed_value(&o.value, "`seed`") {
                (seed, seeds) = (s, None);
            }
            self.errors.extend(sub.errors);
        }
        if let Some(first) = seeds.as_ref().and_then(|s| s.first()) {
            seed = *first;
        }

        let mut jobs = 1usize;
        if let Some((_, v)) = get("jobs") {
            match v.to_json().as_u64() {
                Some(j) if j >= 1 && v.as_scalar().is_some() => jobs = j as usize,
                found => {
                    let t = match found {
                        Some(0) => "0",
                        _ => v.type_name(),
                    };
                    self.err(
                        v.span,
                        format!("`jobs` must be a positive integer, found {t}"),
                    )
                    .hint = Some("`jobs: 1` runs one stage at a time".into());
                }
            }
        }

        // Stages first: dataset roots may name them.
        let Some((stages_key, stages_node)) = get("stages") else {
            self.err(doc.span, "the pipeline has no `stages:`").hint =
                Some("add `stages:` with at least one stage".into());
            return None;
        };
        let stage_entries = self.map(stages_node, "`stages`")?;
        if stage_entries.is_empty() {
            self.err(stages_key.span, "`stages` is empty");
        }
        let mut raws: Vec<RawStage> = Vec::new();
        for (k, v) in stage_entries {
            self.name_ok(k, "stage");
            raws.push(self.raw_stage(k, v));
        }
        let index: HashMap<String, usize> = raws
            .iter()
            .enumerate()
            .map(|(i, r)| (r.key.name.clone(), i))
            .collect();

        self.apply_overrides(&mut raws, &index, overrides);

        // Outputs may depend on params (path outputs listed in a param).
        let outputs: Vec<Vec<OutputSpec>> = raws
            .iter()
            .map(|r| match (&r.kind, &r.params) {
                (Some(k), Some(p)) => k.outputs(p),
                _ => Vec::new(),
            })
            .collect();

        let datasets = match get("datasets") {
            Some((_, v)) => self.datasets(v, &index, &raws, &outputs),
            None => BTreeMap::new(),
        };

        // Out path -> the first stage writing it (a later one is reported as a duplicate).
        let mut path_outs: HashMap<&str, (usize, dag_api::ArtifactType)> = HashMap::new();
        for (j, r) in raws.iter().enumerate() {
            if r.kind.as_ref().is_some_and(|k| k.outputs_are_paths()) {
                for o in &outputs[j] {
                    path_outs.entry(o.name.as_str()).or_insert((j, o.ty));
                }
            }
        }
        let mut stages = Vec::new();
        for (i, r) in raws.iter().enumerate() {
            if let Some(st) = self.stage(
                i, r, &raws, &index, &outputs, &datasets, &workdir, &path_outs,
            ) {
                stages.push(st);
            }
        }
        if !self.errors.is_empty() || stages.len() != raws.len() {
            return None;
        }
        for st in &mut stages {
            st.seed = st.kind.seeded().then_some(seed);
        }
        let mut p = Pipeline {
            name,
            file,
            workdir,
            device,
            seed,
            seeds,
            jobs,
            datasets,
            stages,
            order: Vec::new(),
            index,
        };
        p.order = self.order(&p)?;
        self.preflight(&p);
        match crate::experiments::expand(p) {
            Ok(p) => Some(p),
            Err(e) => {
                self.err(e.span, e.message).hint = e.hint;
                None
            }
        }
    }

    fn raw_stage<'y>(&mut self, key: &'y Key, node: &'y Yaml) -> RawStage<'y> {
        let mut raw = RawStage {
            key,
            node,
            kind: None,
            params: None,
            params_span: key.span,
            inputs: Vec::new(),
            inputs_span: key.span,
            matrix: Vec::new(),
        };
        let Some(entries) = self.map(node, &format!("stage `{}`", key.name)) else {
            return raw;
        };
        self.check_keys(entries, STAGE_KEYS, &format!("stage `{}`", key.name));
        let get = |n: &str| entries.iter().find(|(k, _)| k.name == n);
        match get("kind") {
            None => {
                self.err(key.span, format!("stage `{}` has no `kind`", key.name))
                    .hint = Some(format!("known kinds: {}", self.kinds_list()));
            }
            Some((_, v)) => {
                if let Some(kind) = self.string(v, "`kind`") {
                    match self.registry.get(&kind) {
                        Some(k) => raw.kind = Some(k.clone()),
                        None => {
                            let hint = did_you_mean(&kind, self.registry.kinds())
                                .unwrap_or_else(|| format!("known kinds: {}", self.kinds_list()));
                            self.err(v.span, format!("unknown stage kind `{kind}`"))
                                .hint = Some(hint);
                        }
                    }
                }
            }
        }
        if let Some((k, v)) = get("inputs") {
            raw.inputs_span = k.span;
            if let Some(m) = self.map(v, "`inputs`") {
                raw.inputs = m.iter().map(|(k, v)| (k, v)).collect();
            }
        }
        let given: Vec<(&Key, &Yaml)> = match get("params") {
            Some((k, v)) => {
                raw.params_span = k.span;
                self.map(v, "`params`")
                    .map(|m| m.iter().map(|(k, v)| (k, v)).collect())
                    .unwrap_or_default()
            }
            None => Vec::new(),
        };
        if let Some(kind) = raw.kind.clone() {
            raw.params = self.params(&key.name, &*kind, &given, raw.params_span);
            if let Some((_, v)) = get("matrix") {
                raw.matrix = self.matrix(&key.name, &*kind, v, &given);
            }
        }
        raw
    }

    /// `matrix:`: each param with the list of values to sweep, type-checked.
    fn matrix(
        &mut self,
        stage: &str,
        kind: &dyn Stage,
        node: &Yaml,
        given: &[(&Key, &Yaml)],
    ) -> Vec<(String, Vec<Value>)> {
        let Some(entries) = self.map(node, "`matrix`") else {
            return Vec::new();
        };
        let specs = kind.params();
        let mut out = Vec::new();
        for (k, v) in entries {
            let Some(spec) = specs.iter().find(|s| s.name == k.name) else {
                let hint = did_you_mean(&k.name, specs.iter().map(|s| s.name));
                self.err(
                    k.span,
                    format!(
                        "`matrix` sweeps `{}`, not a param of kind `{}`",
                        k.name,
                        kind.kind()
                    ),
                )
                .hint = hint;
                continue;
            };
            if given.iter().any(|(g, _)| g.name == k.name) {
                self.err(
                    k.span,
                    format!(
                        "`{}` is both set under `params` and swept by `matrix`",
                        k.name
                    ),
                )
                .hint = Some(format!("remove `{}` from the stage's `params`", k.name));
                continue;
            }
            if let Some(values) = self.sweep_values(stage, spec, v) {
                out.push((k.name.clone(), values));
            }
        }
        out
    }

    /// The values of one swept param: a non-empty list of distinct values of its type.
    fn sweep_values(&mut self, stage: &str, spec: &ParamSpec, v: &Yaml) -> Option<Vec<Value>> {
        let Node::Seq(items) = &v.node else {
            let t = v.type_name();
            self.err(
                v.span,
                format!(
                    "the values swept for `{}` must be a list, found {t}",
                    spec.name
                ),
            )
            .hint = Some(format!("e.g. `{}: [a, b]`", spec.name));
            return None;
        };
        if items.is_empty() {
            self.err(v.span, format!("no values to sweep for `{}`", spec.name));
            return None;
        }
        let mut values: Vec<Value> = Vec::new();
        for item in items {
            match check_value(&spec.ty, item) {
                Ok(val) if values.contains(&val) => {
                    self.err(item.span, format!("`{}` sweeps {val} twice", spec.name));
                }
                Ok(val) => values.push(val),
                Err((sp, msg)) => {
                    self.err(
                        sp,
                        format!("param `{}` of stage `{stage}`: {msg}", spec.name),
                    )
                    .hint = Some(format!("`{}`: {}", spec.name, spec.doc));
                }
            }
        }
        (values.len() == items.len()).then_some(values)
    }

    fn seed_value(&mut self, v: &Yaml, what: &str) -> Option<u64> {
        match v.to_json().as_u64() {
            Some(s) if v.as_scalar().is_some() => Some(s),
            _ => {
                let t = v.type_name();
                self.err(
                    v.span,
                    format!("{what} must be a non-negative integer, found {t}"),
                );
                None
            }
        }
    }

    /// `seeds:`, a non-empty list of distinct seeds.
    fn seed_list(&mut self, v: &Yaml) -> Option<Vec<u64>> {
        let Node::Seq(items) = &v.node else {
            let t = v.type_name();
            self.err(
                v.span,
                format!("`seeds` must be a list of seeds, found {t}"),
            )
            .hint = Some("e.g. `seeds: [0, 1, 2]`".into());
            return None;
        };
        if items.is_empty() {
            self.err(v.span, "`seeds` is empty").hint =
                Some("list at least one seed, e.g. `seeds: [0, 1, 2]`".into());
            return None;
        }
        let mut seeds = Vec::new();
        for item in items {
            let s = self.seed_value(item, "a seed")?;
            if seeds.contains(&s) {
                self.err(item.span, format!("seed {s} is listed twice"));
                return None;
            }
            seeds.push(s);
        }
        Some(seeds)
    }

    fn kinds_list(&self) -> String {
        self.registry.kinds().collect::<Vec<_>>().join(", ")
    }

    /// Type-checks given params, fills defaults and reports missing required ones.
    fn params(
        &mut self,
        stage: &str,
        kind: &dyn Stage,
        given: &[(&Key, &Yaml)],
        span: Span,
    ) -> Option<Params> {
        let specs = kind.params();
        let mut out = BTreeMap::new();
        let mut ok = true;
        for (k, v) in given {
            match specs.iter().find(|s| s.name == k.name) {
                None => {
                    ok = false;
                    let hint =
                        did_you_mean(&k.name, specs.iter().map(|s| s.name)).unwrap_or_else(|| {
                            format!(
                                "kind `{}` takes: {}",
                                kind.kind(),
                                specs.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
                            )
                        });
                    self.err(
                        k.span,
                        format!("unknown param `{}` for kind `{}`", k.name, kind.kind()),
                    )
                    .hint = Some(hint);
                }
                Some(spec) => match check_value(&spec.ty, v) {
                    Ok(val) => {
                        out.insert(k.name.clone(), val);
                    }
                    Err((sp, msg)) => {
                        ok = false;
                        self.err(sp, format!("param `{}` of stage `{stage}`: {msg}", k.name))
                            .hint = Some(format!("`{}`: {}", spec.name, spec.doc));
                    }
                },
            }
        }
        for spec in &specs {
            if out.contains_key(spec.name) {
                continue;
            }
            match &spec.default {
                Some(d) => {
                    out.insert(spec.name.to_string(), d.clone());
                }
                None => {
                    ok = false;
                    self.err(
                        span,
                        format!(
                            "stage `{stage}` is missing the required param `{}`",
                            spec.name
                        ),
                    )
                    .hint = Some(format!("`{}`: {}", spec.name, spec.doc));
                }
            }
        }
        ok.then_some(Params(out))
    }

    fn apply_overrides(
        &mut self,
        raws: &mut [RawStage],
        index: &HashMap<String, usize>,
        overrides: &[Override],
    ) {
        for o in overrides.iter().filter(|o| !o.stage.is_empty()) {
            let Some(&i) = index.get(&o.stage) else {
                let hint = did_you_mean(&o.stage, index.keys().map(String::as_str));
                self.errors.push(
                    SpecError::new(
                        &o.source,
                        o.stage_span,
                        format!("unknown stage `{}`", o.stage),
                    )
                    .maybe_hint(hint),
                );
                continue;
            };
            let raw = &mut raws[i];
            let (Some(kind), Some(params)) = (raw.kind.clone(), raw.params.as_mut()) else {
                continue;
            };
            let specs = kind.params();
            match specs.iter().find(|s| s.name == o.param) {
                None => {
                    let hint = did_you_mean(&o.param, specs.iter().map(|s| s.name));
                    self.errors.push(
                        SpecError::new(
                            &o.source,
                            o.param_span,
                            format!("unknown param `{}` for kind `{}`", o.param, kind.kind()),
                        )
                        .maybe_hint(hint),
                    );
                }
                Some(spec) if is_sweep(&spec.ty, &o.value) => {
                    let stage = o.stage.clone();
                    let mut sub = self.for_override(o);
                    let values = sub.sweep_values(&stage, spec, &o.value);
                    self.errors.extend(sub.errors);
                    if let Some(values) = values {
                        let matrix = &mut raw.matrix;
                        matrix.retain(|(p, _)| *p != o.param);
                        matrix.push((o.param.clone(), values));
                    }
                }
                Some(spec) => match check_value(&spec.ty, &o.value) {
                    Ok(v) => {
                        raw.matrix.retain(|(p, _)| *p != o.param);
                        params.0.insert(o.param.clone(), v);
                    }
                    Err((sp, msg)) => self.errors.push(
                        SpecError::new(
                            &o.source,
                            sp,
                            format!("param `{}` of stage `{}`: {msg}", o.param, o.stage),
                        )
                        .hint(format!("`{}`: {}", spec.name, spec.doc)),
                    ),
                },
            }
        }
        for r in raws.iter_mut() {
            if let (Some(kind), Some(params)) = (&r.kind, &r.params) {
                if let Err(msg) = kind.check(params) {
                    let span = r.params_span;
                    self.err(span, format!("stage `{}`: {msg}", r.key.name));
                    r.params = None;
                }
            }
        }
    }

    fn datasets(
        &mut self,
        node: &Yaml,
        index: &HashMap<String, usize>,
        raws: &[RawStage],
        outputs: &[Vec<OutputSpec>],
    ) -> BTreeMap<String, Dataset> {
        let mut out = BTreeMap::new();
        let Some(entries) = self.map(node, "`datasets`") else {
            return out;
        };
        for (k, v) in entries {
            self.declared_datasets.insert(k.name.clone());
            self.name_ok(k, "dataset");
            let Some(fields) = self.map(v, &format!("dataset `{}`", k.name)) else {
                continue;
            };
            let get = |n: &str| fields.iter().find(|(f, _)| f.name == n);
            let missing = |me: &mut Self, f: &str, what: &str| {
                me.err(k.span, format!("dataset `{}` has no `{f}`", k.name))
                    .hint = Some(what.into());
            };
            let format = match get("format") {
                Some((_, v)) => self.string(v, "`format`"),
                None => {
                    missing(self, "format", "e.g. `format: cityscapes`");
                    None
                }
            };
            let classes = match get("classes") {
                Some((_, v)) => match v
                    .to_json()
                    .as_u64()
                    .filter(|c| *c > 0 && *c <= u32::MAX as u64)
                {
                    Some(c) => Some(c as u32),
                    None => {
                        let t = v.type_name();
                        self.err(
                            v.span,
                            format!("`classes` must be a positive integer, found {t}"),
                        );
                        None
                    }
                },
                None => {
                    missing(self, "classes", "e.g. `classes: 19`");
                    None
                }
            };
            let root = match get("root") {
                Some((_, v)) => self
                    .string(v, "`root`")
                    .and_then(|r| self.root(&r, v.span, index, raws, outputs)),
                None => {
                    missing(
                        self,
                        "root",
                        "a directory relative to the pipeline file, or `stage.output`",
                    );
                    None
                }
            };
            let extra = fields
                .iter()
                .filter(|(f, _)| !DATASET_KEYS.contains(&f.name.as_str()))
                .map(|(f, v)| (f.name.clone(), v.to_json()))
                .collect();
            if let (Some(format), Some(classes), Some(root)) = (format, classes, root) {
                out.insert(
                    k.name.clone(),
                    Dataset {
                        name: k.name.clone(),
                        format,
                        classes,
                        extra,
                        root,
                    },
                );
            }
        }
        out
    }

    fn root(
        &mut self,
        root: &str,
        span: Span,
        index: &HashMap<String, usize>,
        raws: &[RawStage],
        outputs: &[Vec<OutputSpec>],
    ) -> Option<DatasetRoot> {
        let (stage, output) = match root.split_once('.') {
            Some((s, o)) => (s, Some(o)),
            None => (root, None),
        };
        match index.get(stage) {
            Some(&i) if !root.contains('/') || output.is_some() => {
                let r = self.reference(root, span, i, output, raws, outputs)?;
                Some(DatasetRoot::Stage {
                    stage: r.0,
                    output: r.1,
                })
            }
            _ => Some(DatasetRoot::Workspace(root.to_string())),
        }
    }

    /// Resolves `stage` / `stage.output` to (stage index, output name).
    fn reference(
        &mut self,
        text: &str,
        span: Span,
        i: usize,
        output: Option<&str>,
        raws: &[RawStage],
        outputs: &[Vec<OutputSpec>],
    ) -> Option<(usize, String)> {
        let outs = &outputs[i];
        if raws[i].kind.is_none() || raws[i].params.is_none() {
            return None; // already reported
        }
        match output {
            None => match outs.first() {
                Some(o) => Some((i, o.name.clone())),
                None => {
                    self.err(span, format!("stage `{text}` has no outputs"));
                    None
                }
            },
            Some(o) => match outs.iter().find(|x| x.name == o) {
                Some(x) => Some((i, x.name.clone())),
                None => {
                    let hint = did_you_mean(o, outs.iter().map(|x| x.name.as_str()))
                        .unwrap_or_else(|| {
                            format!(
                                "stage `{}` writes: {}",
                                raws[i].key.name,
                                outs.iter()
                                    .map(|x| x.name.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            )
                        });
                    self.err(
                        span,
                        format!("stage `{}` has no output `{o}`", raws[i].key.name),
                    )
                    .hint = Some(hint);
                    None
                }
            },
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn stage(
        &mut self,
        i: usize,
        r: &RawStage,
        raws: &[RawStage],
        index: &HashMap<String, usize>,
        outputs: &[Vec<OutputSpec>],
        datasets: &BTreeMap<String, Dataset>,
        workdir: &Path,
        path_outs: &HashMap<&str, (usize, ArtifactType)>,
    ) -> Option<StageDef> {
        let kind = r.kind.clone()?;
        let params = r.params.clone()?;
        let name = &r.key.name;
        let specs = kind.inputs();
        let mut inputs = BTreeMap::new();
        for (k, v) in &r.inputs {
            let exact = specs.iter().find(|s| s.name == k.name);
            let variadic = || specs.iter().find(|s| s.name == InputSpec::ANY_NAME);
            let Some(spec) = exact.or_else(variadic) else {
                let hint =
                    did_you_mean(&k.name, specs.iter().map(|s| s.name)).unwrap_or_else(|| {
                        if specs.is_empty() {
                            format!("kind `{}` takes no inputs", kind.kind())
                        } else {
                            format!(
                                "kind `{}` takes: {}",
                                kind.kind(),
                                specs.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
                            )
                        }
                    });
                self.err(
                    k.span,
                    format!("unknown input `{}` for kind `{}`", k.name, kind.kind()),
                )
                .hint = Some(hint);
                continue;
            };
            let Some(text) = self.string(v, "an input reference") else {
                continue;
            };
            let (up, out) = match text.split_once('.') {
                Some((s, o)) => (s, Some(o)),
                None => (text.as_str(), None),
            };
            let Some(&j) = index.get(up) else {
                let hint =
                    did_you_mean(up, index.keys().map(String::as_str)).unwrap_or_else(|| {
                        "inputs name a stage of this pipeline: `stage` or `stage.output`".into()
                    });
                self.err(
                    v.span,
                    format!("input `{}` refers to an unknown stage `{up}`", k.name),
                )
                .hint = Some(hint);
                continue;
            };
            if j == i {
                self.err(
                    v.span,
                    format!("stage `{name}` uses its own output (a self-loop)"),
                )
                .hint = Some("an input must come from another stage".into());
                continue;
            }
            let Some((j, out)) = self.reference(&text, v.span, j, out, raws, outputs) else {
                continue;
            };
            let ty = outputs[j]
                .iter()
                .find(|o| o.name == out)
                .map(|o| o.ty)
                .unwrap_or("any");
            if spec.ty != ty && spec.ty != "any" && ty != "any" {
                self.err(
                    v.span,
                    format!(
                        "input `{}` of stage `{name}` expects {}, but `{text}` is {ty}",
                        k.name, spec.ty
                    ),
                )
                .hint = Some(format!("`{}`: {}", spec.name, spec.doc));
                continue;
            }
            inputs.insert(
                k.name.clone(),
                InputRef {
                    stage: j,
                    output: out,
                    ty: spec.ty,
                },
            );
        }
        for spec in specs.iter().filter(|s| s.required) {
            let given = if spec.name == InputSpec::ANY_NAME {
                // A variadic slot is satisfied by any input no other slot claims.
                r.inputs
                    .iter()
                    .any(|(k, _)| !specs.iter().any(|s| s.name == k.name))
            } else {
                r.inputs.iter().any(|(k, _)| k.name == spec.name)
            };
            if !given {
                let message = if spec.name == InputSpec::ANY_NAME {
                    format!("stage `{name}` needs at least one input")
                } else {
                    format!(
                        "stage `{name}` is missing the required input `{}`",
                        spec.name
                    )
                };
                self.err(r.inputs_span, message).hint =
                    Some(format!("`{}`: {}", spec.name, spec.doc));
            }
        }

        // Params that name datasets or workspace paths.
        let mut ds = Vec::new();
        let mut paths = Vec::new();
        let pspecs = kind.params();
        for spec in &pspecs {
            if let Some(v) = params.get(spec.name) {
                collect(&spec.ty, v, &mut ds, &mut paths);
            }
        }
        for d in &ds {
            if !self.declared_datasets.contains(d) {
                let span = param_span(r, &pspecs, d).unwrap_or(r.params_span);
                let hint = did_you_mean(d, datasets.keys().map(String::as_str))
                    .unwrap_or_else(|| "define it under `datasets:`".into());
                self.err(
                    span,
                    format!("stage `{name}` names an undefined dataset `{d}`"),
                )
                .hint = Some(hint);
            }
            if let Some(Dataset {
                root: DatasetRoot::Stage { stage, .. },
                ..
            }) = datasets.get(d)
            {
                if *stage == i {
                    self.err(
                        r.key.span,
                        format!("stage `{name}` reads dataset `{d}`, whose root is its own output"),
                    );
                }
            }
        }
        ds.sort();
        ds.dedup();

        if kind.outputs_are_paths() {
            // A dep equal to or inside another such stage's out is an edge, as in DVC.
            let mut ws = Vec::new();
            for dep in paths {
                // The dep itself or one of its parent directories may be an out.
                let producer = std::iter::successors(Some(dep.as_str()), |d| {
                    d.rsplit_once('/').map(|(a, _)| a)
                })
                .find_map(|d| path_outs.get(d).map(|&(j, ty)| (j, d.to_string(), ty)));
                match producer {
                    Some((j, _, _)) if j == i => {
                        let span = dep_span(r, &dep).unwrap_or(r.params_span);
                        self.err(
                            span,
                            format!("stage `{name}` depends on its own out `{dep}` (a self-loop)"),
                        );
                    }
                    Some((j, out, ty)) => {
                        inputs.insert(
                            out.clone(),
                            InputRef {
                                stage: j,
                                output: out,
                                ty,
                            },
                        );
                    }
                    None => {
                        if !workdir.join(&dep).exists() {
                            let span = dep_span(r, &dep).unwrap_or(r.params_span);
                            self.err(span, format!("dep `{dep}` of stage `{name}` does not exist and no stage writes it"))
                                .hint = Some(format!(
                                "create it under {} or add a stage whose `outs` lists it",
                                workdir.display()
                            ));
                        }
                        ws.push(dep);
                    }
                }
            }
            paths = ws;
            // Two stages writing the same path would make the edge ambiguous.
            for o in &outputs[i] {
                if let Some(&(j, _)) = path_outs.get(o.name.as_str()).filter(|(j, _)| *j != i) {
                    self.err(
                        r.params_span,
                        format!(
                            "out `{}` is also written by stage `{}`",
                            o.name, raws[j].key.name
                        ),
                    );
                }
            }
        }
        paths.sort();
        paths.dedup();
        Some(StageDef {
            name: name.clone(),
            kind,
            params,
            outputs: outputs[i].clone(),
            inputs,
            datasets: ds,
            workspace_paths: paths,
            span: r.key.span,
            seed: None,
            matrix: r.matrix.clone(),
            base: name.clone(),
            setting: Vec::new(),
        })
    }

    /// A topological order, or an error naming every stage on a cycle.
    fn order(&mut self, p: &Pipeline) -> Option<Vec<usize>> {
        let n = p.stages.len();
        let mut g: DiGraph<usize, ()> = DiGraph::with_capacity(n, n);
        for i in 0..n {
            g.add_node(i);
        }
        for i in 0..n {
            for u in p.upstream(i) {
                g.add_edge(NodeIndex::new(u), NodeIndex::new(i), ());
            }
        }
        let mut cyclic = false;
        for scc in petgraph::algo::tarjan_scc(&g) {
            if scc.len() < 2 {
                continue;
            }
            cyclic = true;
            let cycle = cycle_through(&g, &scc);
            let names: Vec<&str> = cycle.iter().map(|&i| p.stages[i].name.as_str()).collect();
            let first = cycle[0];
            self.err(
                p.stages[first].span,
                format!(
                    "the stages form a cycle: {} -> {}",
                    names.join(" -> "),
                    names[0]
                ),
            )
            .hint = Some("a pipeline must be acyclic; remove one of these inputs".into());
        }
        if cyclic {
            return None;
        }
        // Kahn's algorithm, smallest file index first, so the order is stable and readable.
        let mut indeg: Vec<usize> = (0..n).map(|i| p.upstream(i).len()).collect();
        let down = p.downstream();
        let mut ready: BTreeSet<usize> = (0..n).filter(|&i| indeg[i] == 0).collect();
        let mut order = Vec::with_capacity(n);
        while let Some(i) = ready.pop_first() {
            order.push(i);
            for &d in &down[i] {
                indeg[d] -= 1;
                if indeg[d] == 0 {
                    ready.insert(d);
                }
            }
        }
        Some(order)
    }

    fn preflight(&mut self, p: &Pipeline) {
        let datasets = p.workspace_datasets();
        for st in &p.stages {
            let pre = Preflight {
                stage: &st.name,
                params: &st.params,
                datasets: &datasets,
                workdir: &p.workdir,
            };
            if let Err(e) = st.kind.preflight(&pre) {
                let msg = format!("stage `{}`: {e}", st.name);
                self.err(st.span, msg).hint = e.hint.clone();
            }
        }
    }
}

/// The shortest cycle through the first node of a strongly connected component.
fn cycle_through(g: &DiGraph<usize, ()>, scc: &[NodeIndex]) -> Vec<usize> {
    let members: BTreeSet<NodeIndex> = scc.iter().copied().collect();
    let start = *members
        .iter()
        .min_by_key(|n| g[**n])
        .expect("non-empty scc");
    let mut parent: HashMap<NodeIndex, NodeIndex> = HashMap::new();
    let mut q = VecDeque::from([start]);
    while let Some(n) = q.pop_front() {
        for m in g.neighbors(n) {
            if !members.contains(&m) {
                continue;
            }
            if m == start {
                let mut path = vec![g[n]];
                let mut cur = n;
                while cur != start {
                    cur = parent[&cur];
                    path.push(g[cur]);
                }
                path.reverse();
                return path;
            }
            if let std::collections::hash_map::Entry::Vacant(e) = parent.entry(m) {
                e.insert(n);
                q.push_back(m);
            }
        }
    }
    scc.iter().map(|n| g[*n]).collect()
}

fn param_span(r: &RawStage, _specs: &[dag_api::ParamSpec], value: &str) -> Option<Span> {
    find_scalar(r.node, value)
}

fn dep_span(r: &RawStage, dep: &str) -> Option<Span> {
    find_scalar(r.node, dep).or_else(|| find_scalar(r.node, &format!("./{dep}")))
}

fn find_scalar(y: &Yaml, text: &str) -> Option<Span> {
    match &y.node {
        Node::Scalar { value, .. } => {
            (value == text || value.trim_end_matches('/') == text).then_some(y.span)
        }
        Node::Seq(items) => items.iter().find_map(|i| find_scalar(i, text)),
        Node::Map(entries) => entries.iter().find_map(|(_, v)| find_scalar(v, text)),
    }
}

/// Collects dataset names and workspace paths named by a param value of type `ty`.
fn collect(ty: &ParamType, v: &Value, ds: &mut Vec<String>, paths: &mut Vec<String>) {
    match (ty, v) {
        (ParamType::Dataset, Value::String(s)) => ds.push(s.clone()),
        (ParamType::Path, Value::String(s)) => paths.push(normalise_rel(s)),
        (ParamType::List(inner), Value::Array(items)) => {
            items.iter().for_each(|i| collect(inner, i, ds, paths))
        }
        (ParamType::Tuple(types), Value::Array(items)) => types
            .iter()
            .zip(items)
            .for_each(|(t, i)| collect(t, i, ds, paths)),
        _ => {}
    }
}

/// `./a//b/` -> `a/b`.
pub fn normalise_rel(s: &str) -> String {
    s.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect::<Vec<_>>()
        .join("/")
}

/// Checks one value against a param type; on error returns the offending node's span.
pub fn check_value(ty: &ParamType, y: &Yaml) -> Result<Value, (Span, String)> {
    let v = y.to_json();
    let bad = |what: &str| Err((y.span, format!("expected {what}, found {}", y.type_name())));
    match ty {
        ParamType::Bool => match v {
            Value::Bool(_) => Ok(v),
            _ => bad("a boolean (true or false)"),
        },
        ParamType::Int { min, max } => {
            let Some(i) = v.as_i64().filter(|_| y.as_scalar().is_some()) else {
                return bad("an integer");
            };
            if min.is_some_and(|m| i < m) || max.is_some_and(|m| i > m) {
                return Err((
                    y.span,
                    format!("{i} is out of range {}", range(min, max, false)),
                ));
            }
            Ok(v)
        }
        ParamType::Float {
            min,
            max,
            min_exclusive,
        } => {
            // Integers are accepted and stored as floats, so `1` and `1.0` give one key.
            let Some(f) = v.as_f64().filter(|_| y.as_scalar().is_some()) else {
                return bad("a number");
            };
            let low = match min {
                Some(m) if *min_exclusive => f <= *m,
                Some(m) => f < *m,
                None => false,
            };
            if low || max.is_some_and(|m| f > m) {
                return Err((
                    y.span,
                    format!("{f} is out of range {}", range(min, max, *min_exclusive)),
                ));
            }
            serde_json::Number::from_f64(f)
                .map(Value::Number)
                .ok_or_else(|| (y.span, "expected a finite number".into()))
        }
        ParamType::Str | ParamType::Path | ParamType::Dataset => match (&y.node, &v) {
            (Node::Scalar { value, .. }, v) if !v.is_null() => {
                if matches!(ty, ParamType::Path) && value.is_empty() {
                    return Err((y.span, "expected a path, found an empty string".into()));
                }
                Ok(Value::String(value.clone()))
            }
            _ => bad(match ty {
                ParamType::Path => "a path",
                ParamType::Dataset => "a dataset name",
                _ => "a string",
            }),
        },
        ParamType::Enum(options) => match y.as_scalar() {
            Some(s) if options.contains(&s) => Ok(Value::String(s.to_string())),
            Some(s) => Err((
                y.span,
                format!(
                    "`{s}` is not one of {}{}",
                    options.join(", "),
                    did_you_mean(s, options.iter().copied())
                        .map(|d| format!(" ({d})"))
                        .unwrap_or_default()
                ),
            )),
            None => bad(&format!("one of {}", options.join(", "))),
        },
        ParamType::List(inner) => match &y.node {
            Node::Seq(items) => items
                .iter()
                .map(|i| check_value(inner, i))
                .collect::<Result<Vec<_>, _>>()
                .map(Value::Array),
            _ => bad("a list"),
        },
        ParamType::Tuple(types) => match &y.node {
            Node::Seq(items) if items.len() == types.len() => types
                .iter()
                .zip(items)
                .map(|(t, i)| check_value(t, i))
                .collect::<Result<Vec<_>, _>>()
                .map(Value::Array),
            Node::Seq(items) => Err((
                y.span,
                format!(
                    "expected a list of {} items, found {}",
                    types.len(),
                    items.len()
                ),
            )),
            _ => bad(&format!("a list of {} items", types.len())),
        },
        ParamType::StrMap => match &y.node {
            Node::Map(entries) => {
                let mut m = dag_api::Map::new();
                for (k, val) in entries {
                    match val.as_scalar() {
                        Some(s) => {
                            m.insert(k.name.clone(), Value::String(s.to_string()));
                        }
                        None => {
                            return Err((
                                val.span,
                                format!(
                                    "expected a string for `{}`, found {}",
                                    k.name,
                                    val.type_name()
                                ),
                            ))
                        }
                    }
                }
                Ok(Value::Object(m))
            }
            _ => bad("a mapping of strings"),
        },
    }
}

fn range<T: std::fmt::Display>(min: &Option<T>, max: &Option<T>, min_exclusive: bool) -> String {
    let lo = min
        .as_ref()
        .map(|m| m.to_string())
        .unwrap_or_else(|| "-inf".into());
    let hi = max
        .as_ref()
        .map(|m| m.to_string())
        .unwrap_or_else(|| "inf".into());
    format!("{}{lo}, {hi}]", if min_exclusive { "(" } else { "[" })
}
