//! The contract between the `dag` engine and its stage kinds.
//!
//! The engine knows a stage kind only through [`Stage`]: what it is called, which params it takes
//! (with types, defaults and docs), which typed inputs it consumes and which typed outputs it
//! writes, and a `run` that turns a [`StageContext`] into files under the output directories.
//! Nothing here knows about tensors, caches or keys; stage kinds know nothing about the cache.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub use serde_json::{Map, Value};

/// The names of the instances that `seeds:` and `matrix:` give a stage: `base@axis=value,...`.
/// The engine writes them; kinds that gather instances (`compare`) read them back.
pub mod instance {
    /// The axis that `seeds:` sweeps.
    pub const SEED_AXIS: &str = "seed";

    /// `base@a=1,b=x`, or `base` for an empty setting.
    pub fn name(base: &str, setting: &[(String, String)]) -> String {
        if setting.is_empty() {
            return base.to_string();
        }
        let pairs: Vec<String> = setting.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("{base}@{}", pairs.join(","))
    }

    /// The base name and the setting of an instance name (an empty setting for a plain name).
    pub fn parse(name: &str) -> (&str, Vec<(&str, &str)>) {
        match name.split_once('@') {
            None => (name, Vec::new()),
            Some((base, setting)) => (
                base,
                setting
                    .split(',')
                    .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
                    .collect(),
            ),
        }
    }
}

/// The kinds of device a stage computes on: the names of `device:` in a pipeline file, of cache
/// keys and manifests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// Burn's pure-Rust CPU backend.
    Flex,
    /// WGPU (Vulkan, Metal, DX12, or a software adapter such as lavapipe).
    Wgpu,
    /// CUDA, device 0.
    Cuda,
    /// LibTorch on the CPU, linked against an installed PyTorch (the `tch` feature).
    #[serde(rename = "tch")]
    LibTorch,
}

impl DeviceKind {
    /// Every kind, in the order `auto` prefers GPUs (CUDA, then WGPU) before the CPUs.
    pub const ALL: [DeviceKind; 4] = [
        DeviceKind::Flex,
        DeviceKind::Wgpu,
        DeviceKind::Cuda,
        DeviceKind::LibTorch,
    ];

    /// The name used in pipeline files, cache keys and manifests.
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Flex => "flex",
            DeviceKind::Wgpu => "wgpu",
            DeviceKind::Cuda => "cuda",
            DeviceKind::LibTorch => "tch",
        }
    }

    /// The kind named `name`, if any.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// File name under [`StageContext::scratch`] where a stage may write its log. The engine keeps
/// it in the cache with the run's manifest (`dag show` names it) and points to it when the stage
/// fails.
pub const STAGE_LOG: &str = "stage.log";

/// The declared type of a stage parameter. The engine checks every value against it before
/// anything runs and reports the file, line and column of a mismatch.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamType {
    Bool,
    /// A signed integer within the inclusive bounds.
    Int {
        min: Option<i64>,
        max: Option<i64>,
    },
    /// A float within the bounds; `min_exclusive` makes the lower bound open (e.g. `(0, 1]`).
    Float {
        min: Option<f64>,
        max: Option<f64>,
        min_exclusive: bool,
    },
    Str,
    /// One of the listed strings.
    Enum(Vec<&'static str>),
    /// A filesystem path, relative to the pipeline file's directory.
    Path,
    /// The name of an entry of the pipeline's `datasets:` section. The engine resolves it to a
    /// [`DatasetRef`] (and, when the dataset's root is a stage output, adds that edge).
    Dataset,
    /// A list whose items all have the inner type.
    List(Box<ParamType>),
    /// A fixed-length list (e.g. `[width, height]`).
    Tuple(Vec<ParamType>),
    /// A string-to-string map (e.g. environment variables).
    StrMap,
}

impl ParamType {
    /// Any non-negative integer.
    pub const fn count() -> Self {
        ParamType::Int {
            min: Some(0),
            max: None,
        }
    }
    /// Any integer >= 1.
    pub const fn positive() -> Self {
        ParamType::Int {
            min: Some(1),
            max: None,
        }
    }
    /// Any float (no bounds).
    pub const fn float() -> Self {
        ParamType::Float {
            min: None,
            max: None,
            min_exclusive: false,
        }
    }
}

impl ParamType {
    /// Checks a JSON value against the type and its bounds (what the engine checks in pipeline
    /// files, for values that come from code).
    pub fn check(&self, value: &Value) -> Result<(), String> {
        let fail = || Err(format!("{value} is not {}", self.describe()));
        match (self, value) {
            (ParamType::Bool, Value::Bool(_)) => Ok(()),
            (ParamType::Int { min, max }, Value::Number(n)) => match n.as_i64() {
                Some(i) if min.is_none_or(|m| i >= m) && max.is_none_or(|m| i <= m) => Ok(()),
                _ => fail(),
            },
            (
                ParamType::Float {
                    min,
                    max,
                    min_exclusive,
                },
                Value::Number(n),
            ) => {
                let x = n.as_f64().unwrap_or(f64::NAN);
                let above = min.is_none_or(|m| if *min_exclusive { x > m } else { x >= m });
                if x.is_finite() && above && max.is_none_or(|m| x <= m) {
                    Ok(())
                } else {
                    fail()
                }
            }
            (ParamType::Str | ParamType::Path | ParamType::Dataset, Value::String(_)) => Ok(()),
            (ParamType::Enum(options), Value::String(s)) if options.contains(&s.as_str()) => Ok(()),
            (ParamType::List(inner), Value::Array(items)) => {
                items.iter().try_for_each(|v| inner.check(v))
            }
            (ParamType::Tuple(types), Value::Array(items)) if types.len() == items.len() => {
                types.iter().zip(items).try_for_each(|(t, v)| t.check(v))
            }
            (ParamType::StrMap, Value::Object(m)) if m.values().all(Value::is_string) => Ok(()),
            _ => fail(),
        }
    }

    /// What a value of this type is, for messages (`an integer >= 1`, `one of a, b`).
    pub fn describe(&self) -> String {
        let bounds = |lower: Option<String>, upper: Option<String>| {
            [lower, upper.map(|u| format!("<= {u}"))]
                .into_iter()
                .flatten()
                .map(|b| format!(" {b}"))
                .collect::<Vec<_>>()
                .join(" and")
        };
        match self {
            ParamType::Bool => "true or false".into(),
            ParamType::Int { min, max } => format!(
                "an integer{}",
                bounds(min.map(|m| format!(">= {m}")), max.map(|m| m.to_string()))
            ),
            ParamType::Float {
                min,
                max,
                min_exclusive,
            } => {
                let op = if *min_exclusive { ">" } else { ">=" };
                format!(
                    "a number{}",
                    bounds(min.map(|m| format!("{op} {m}")), max.map(|m| m.to_string()))
                )
            }
            ParamType::Str => "a string".into(),
            ParamType::Enum(options) => format!("one of {}", options.join(", ")),
            ParamType::Path => "a path".into(),
            ParamType::Dataset => "a dataset name".into(),
            ParamType::List(inner) => format!("a list of {}", inner.describe()),
            ParamType::Tuple(types) => format!("a list of {} values", types.len()),
            ParamType::StrMap => "a map of strings".into(),
        }
    }
}

/// A struct of params declared once: `#[derive(ParamSet)]` writes this and `Default` from the
/// fields' `#[param(...)]` attributes and doc comments (see the `dag-api-derive` crate).
pub trait ParamSet {
    /// One spec per param, in declaration order (a flattened set in its place).
    fn param_specs() -> Vec<ParamSpec>;
}

pub use dag_api_derive::ParamSet;

/// One parameter a stage kind accepts.
#[derive(Debug, Clone)]
pub struct ParamSpec {
    pub name: &'static str,
    pub ty: ParamType,
    /// `None` means the param is required.
    pub default: Option<Value>,
    pub doc: &'static str,
}

impl ParamSpec {
    pub fn required(name: &'static str, ty: ParamType, doc: &'static str) -> Self {
        Self {
            name,
            ty,
            default: None,
            doc,
        }
    }
    pub fn optional(
        name: &'static str,
        ty: ParamType,
        default: impl Into<Value>,
        doc: &'static str,
    ) -> Self {
        Self {
            name,
            ty,
            default: Some(default.into()),
            doc,
        }
    }
}

/// The type of an artifact that flows along an edge ("dataset", "model", "scores", "files", ...).
/// An input accepts an upstream output only when the types are equal, or either side is "any".
pub type ArtifactType = &'static str;

/// A named input slot of a stage kind.
#[derive(Debug, Clone)]
pub struct InputSpec {
    /// The slot's name; [`InputSpec::ANY_NAME`] makes a variadic slot that accepts any number of
    /// inputs under names the pipeline chooses (e.g. `compare`'s evaluations).
    pub name: &'static str,
    pub ty: ArtifactType,
    pub required: bool,
    pub doc: &'static str,
}

impl InputSpec {
    /// The name of a variadic slot.
    pub const ANY_NAME: &'static str = "*";
}

/// A named output of a stage kind. The first output is the stage's default: `inputs: {x: st}`
/// means `st.<first output>`.
#[derive(Debug, Clone)]
pub struct OutputSpec {
    pub name: String,
    pub ty: ArtifactType,
    pub doc: &'static str,
}

/// The parameters of one stage, every default filled in, already type-checked.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Params(pub BTreeMap<String, Value>);

impl Params {
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name)
    }

    /// Deserialize the params of the set `T` (a stage's params may hold several sets).
    pub fn parse_set<T: ParamSet + serde::de::DeserializeOwned>(&self) -> Result<T, StageError> {
        let map: Map<String, Value> = T::param_specs()
            .into_iter()
            .filter_map(|s| self.0.get(s.name).map(|v| (s.name.to_string(), v.clone())))
            .collect();
        serde_json::from_value(Value::Object(map))
            .map_err(|e| StageError::new(format!("invalid params: {e}")))
    }

    /// Deserialize all params into a stage's own struct.
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, StageError> {
        let map: Map<String, Value> = self.0.clone().into_iter().collect();
        serde_json::from_value(Value::Object(map))
            .map_err(|e| StageError::new(format!("invalid params: {e}")))
    }
}

/// A dataset entry of the pipeline file, resolved by the engine.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetRef {
    /// The key in the `datasets:` section.
    pub name: String,
    /// `cityscapes`, `gta5`, `synthia`, ...
    pub format: String,
    /// Absolute path of the root: a directory in the workspace, or an upstream artifact.
    pub root: PathBuf,
    /// Number of classes of the label protocol (19, 16 or 13).
    pub classes: u32,
    /// Every other key of the entry, as written.
    pub extra: Map<String, Value>,
}

/// An upstream artifact handed to a stage: a read-only directory tree.
#[derive(Debug, Clone)]
pub struct InputArtifact {
    pub path: PathBuf,
    pub ty: ArtifactType,
    /// blake3 digest of the tree, hex.
    pub digest: String,
    /// `stage.output` that produced it.
    pub producer: String,
}

/// Reports progress of a running stage (the engine draws it as a progress bar).
pub trait Progress: Send + Sync {
    /// Starts (or restarts) a phase of `total` steps, e.g. `("train", 2000)`.
    fn start(&self, phase: &str, total: u64);
    /// Sets the absolute position in the current phase.
    fn set_position(&self, pos: u64);
    /// A short status line, e.g. `loss_seg=0.812 lr=2.5e-4`.
    fn message(&self, msg: &str);
}

/// A [`Progress`] that discards everything.
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _phase: &str, _total: u64) {}
    fn set_position(&self, _pos: u64) {}
    fn message(&self, _msg: &str) {}
}

/// Set when the user interrupts the run; long stages poll it and return
/// [`StageError::cancelled`] after saving a checkpoint.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
    /// The underlying flag, for libraries that poll an `AtomicBool`.
    pub fn flag(&self) -> &AtomicBool {
        &self.0
    }
}

/// Everything a stage's `run` may read and write.
pub struct StageContext<'a> {
    /// The stage's name in the pipeline file.
    pub stage: &'a str,
    pub pipeline: &'a str,
    pub params: &'a Params,
    pub inputs: &'a BTreeMap<String, InputArtifact>,
    pub datasets: &'a BTreeMap<String, DatasetRef>,
    /// One empty staging directory per declared output; the engine publishes them after `run`
    /// returns `Ok`, and throws them away otherwise.
    pub outputs: &'a BTreeMap<String, PathBuf>,
    /// A directory that survives an interrupted attempt with the same key (checkpoints go here)
    /// and is deleted once the stage's outputs are published.
    pub scratch: &'a Path,
    /// Resolved device kind: `flex`, `wgpu` or `cuda`.
    pub device: DeviceKind,
    /// The stage's seed: the pipeline's `seed`, or this instance's entry of `seeds:`, for kinds
    /// that are [`Stage::seeded`]; 0 for every other kind (their outputs must not depend on it).
    pub seed: u64,
    /// Directory of the pipeline file; relative paths in params are relative to it.
    pub workdir: &'a Path,
    pub progress: &'a dyn Progress,
    pub cancel: &'a CancelToken,
}

impl StageContext<'_> {
    pub fn input(&self, name: &str) -> Result<&InputArtifact, StageError> {
        self.inputs.get(name).ok_or_else(|| {
            StageError::new(format!("stage `{}` has no input `{name}`", self.stage))
                .with_hint(format!("add `inputs: {{ {name}: <stage> }}` to the stage"))
        })
    }
    pub fn output(&self, name: &str) -> Result<&Path, StageError> {
        self.outputs.get(name).map(PathBuf::as_path).ok_or_else(|| {
            StageError::new(format!("stage `{}` has no output `{name}`", self.stage))
        })
    }
    /// The dataset named by a param of type [`ParamType::Dataset`].
    pub fn dataset(&self, param: &str) -> Result<&DatasetRef, StageError> {
        let name = self
            .params
            .get(param)
            .and_then(Value::as_str)
            .ok_or_else(|| StageError::new(format!("param `{param}` names no dataset")))?;
        self.datasets
            .get(name)
            .ok_or_else(|| StageError::new(format!("dataset `{name}` is not defined")))
    }
    /// Resolves a path param against the pipeline file's directory.
    pub fn path(&self, p: impl AsRef<Path>) -> PathBuf {
        self.workdir.join(p)
    }
    pub fn check_cancelled(&self) -> Result<(), StageError> {
        if self.cancel.is_cancelled() {
            Err(StageError::cancelled())
        } else {
            Ok(())
        }
    }
}

/// What a successful run reports besides its files: small metrics for the manifest and
/// `dag show` (e.g. `{"miou": 41.2}`).
#[derive(Debug, Clone, Default)]
pub struct StageOutcome {
    pub metrics: Map<String, Value>,
    /// A short text (a few lines, e.g. a comparison table) that `dag run` prints after its
    /// summary, also when the stage is later found cached.
    pub summary: Option<String>,
}

/// What the engine can tell a stage before anything runs, for [`Stage::preflight`].
pub struct Preflight<'a> {
    pub stage: &'a str,
    pub params: &'a Params,
    /// Datasets whose root is a workspace path (stage-output roots do not exist yet).
    pub datasets: &'a BTreeMap<String, DatasetRef>,
    pub workdir: &'a Path,
}

/// The code a stage kind computes with, as digests taken when `dag` was built: one per crate of
/// the workspace the kind is built from (its sources and dependency tables) and one, named
/// `dependencies`, of the locked versions of every external crate among them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Code {
    /// `(crate name, hex digest)`, sorted by name, `dependencies` last.
    pub parts: &'static [(&'static str, &'static str)],
}

impl Code {
    /// No code of dag's own: the kind's output depends only on its inputs and params (a shell
    /// command), so no change to dag reruns it.
    pub const NONE: Code = Code { parts: &[] };
}

/// A stage kind.
pub trait Stage: Send + Sync {
    /// The name used in `kind:`.
    fn kind(&self) -> &'static str;
    /// The code the kind computes its outputs with; part of every key of its stages. Kinds in a
    /// crate built with `dag-code`'s build script return that crate's `CODE`, which changes
    /// whenever a source file or a locked dependency of the crate changes.
    fn code(&self) -> Code;
    /// One paragraph for `dag kinds` and the docs.
    fn doc(&self) -> &'static str;
    fn params(&self) -> Vec<ParamSpec>;
    fn inputs(&self) -> Vec<InputSpec>;
    /// Outputs may depend on params (a shell stage's `outs`).
    fn outputs(&self, params: &Params) -> Vec<OutputSpec>;
    /// Cross-param checks beyond types (e.g. `crop <= size`); the message is attributed to the
    /// stage's `params:` in the pipeline file.
    fn check(&self, _params: &Params) -> Result<(), String> {
        Ok(())
    }
    /// Whether the kind's outputs are the same on every device (it runs no device code of its
    /// own, like `shell`): then the device is not part of its key, and a pipeline of such
    /// stages alone never probes the GPU backends.
    fn device_independent(&self) -> bool {
        false
    }
    /// Whether the kind's outputs are workspace paths (`shell`'s `outs`): a workspace path that
    /// another stage's params name as a dependency, equal to or inside such an output, becomes an
    /// edge from this stage instead of a file read before the run.
    fn outputs_are_paths(&self) -> bool {
        false
    }
    /// Whether the kind's outputs depend on the pipeline seed (it draws random numbers from it).
    /// Only then is the seed part of its key and does `seeds:` give it one instance per seed;
    /// every other kind stays one instance shared by all seeds.
    fn seeded(&self) -> bool {
        false
    }
    /// Cheap checks before any stage of the pipeline runs (e.g. a dataset root exists).
    fn preflight(&self, _pre: &Preflight<'_>) -> Result<(), StageError> {
        Ok(())
    }
    fn run(&self, ctx: &StageContext<'_>) -> Result<StageOutcome, StageError>;
}

/// All known stage kinds, by name.
#[derive(Default, Clone)]
pub struct Registry {
    kinds: BTreeMap<&'static str, Arc<dyn Stage>>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }
    /// Adds a kind; a later registration of the same name replaces the earlier one.
    pub fn register(&mut self, stage: impl Stage + 'static) {
        self.kinds.insert(stage.kind(), Arc::new(stage));
    }
    pub fn get(&self, kind: &str) -> Option<&Arc<dyn Stage>> {
        self.kinds.get(kind)
    }
    pub fn kinds(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.kinds.keys().copied()
    }
}

/// Why a stage failed. Carries a message, an optional hint (what to do) and optional file.
/// Not a `std::error::Error` itself so that any error converts into it with `?`.
pub struct StageError {
    pub message: String,
    pub hint: Option<String>,
    pub path: Option<PathBuf>,
    pub cancelled: bool,
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl StageError {
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            hint: None,
            path: None,
            cancelled: false,
            source: None,
        }
    }
    pub fn cancelled() -> Self {
        Self {
            cancelled: true,
            ..Self::new("cancelled")
        }
    }
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
    pub fn with_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.path = Some(path.into());
        self
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for StageError {
    fn from(e: E) -> Self {
        let mut message = e.to_string();
        let mut cur = e.source();
        while let Some(s) = cur {
            message.push_str(": ");
            message.push_str(&s.to_string());
            cur = s.source();
        }
        Self {
            source: Some(Box::new(e)),
            ..Self::new(message)
        }
    }
}

impl fmt::Display for StageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(p) = &self.path {
            write!(f, " ({})", p.display())?;
        }
        Ok(())
    }
}

impl fmt::Debug for StageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StageError({self}")?;
        if let Some(h) = &self.hint {
            write!(f, "; hint: {h}")?;
        }
        f.write_str(")")
    }
}
