//! Plans and runs a pipeline: computes each stage's key from the content of what it reads, reuses
//! cached runs, runs the rest in topological order (independent stages in parallel) and publishes
//! their outputs.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use dag_api::{
    CancelToken, DatasetRef, DeviceKind, InputArtifact, Progress, StageContext, Value, STAGE_LOG,
};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::cache::remote::{PushReport, Remote};
pub use crate::cache::Outcome;
use crate::cache::{self, Cache, CacheError, InputRecord, Manifest, OutputTree, MANIFEST_FORMAT};
use crate::hash::{self, StatCache};
use crate::key::{self, KeyInputs};
use crate::spec::{DatasetRoot, Pipeline};

/// Which stages to consider and which to rerun regardless of the cache.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Run only these stages (their upstream outputs must be in the cache).
    pub only: Vec<String>,
    /// Run these stages and their ancestors.
    pub until: Vec<String>,
    /// Rerun these stages even when cached.
    pub force: Vec<String>,
    /// Rerun every selected stage.
    pub force_all: bool,
}

/// A problem that stops a run before or between stages (not a stage's own failure).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    /// The cache failed.
    Cache(#[from] CacheError),
    #[error("unknown stage `{name}` in {flag}")]
    /// A stage named on the command line does not exist.
    UnknownStage {
        /// The name as given.
        name: String,
        /// The flag that named it.
        flag: &'static str,
        /// A suggestion.
        hint: String,
    },
    #[error("stage `{stage}` needs the output of `{upstream}`, which is not in the cache")]
    /// A selected stage needs an output that no run has produced.
    MissingUpstream {
        /// The selected stage.
        stage: String,
        /// The stage whose output is missing.
        upstream: String,
    },
    #[error("cannot fingerprint {}: {source}", path.display())]
    /// A workspace path could not be hashed.
    Fingerprint {
        /// The path.
        path: PathBuf,
        #[source]
        /// The operating system's error.
        source: std::io::Error,
    },
}

impl EngineError {
    /// What to do about it.
    pub fn hint(&self) -> String {
        match self {
            EngineError::Cache(e) => e.hint(),
            EngineError::UnknownStage { hint, .. } => hint.clone(),
            EngineError::MissingUpstream { upstream, .. } => {
                format!("run `{upstream}` first (drop --only, or use --until)")
            }
            EngineError::Fingerprint { .. } => "check that the path is readable".into(),
        }
    }
}

/// Why a stage will run.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Reason {
    /// `--force` or `--force-all`.
    Forced,
    /// No run of this stage name is in the cache.
    NeverRan,
    /// The run with this key is recorded but its outputs are gone (gc, verify).
    OutputMissing,
    /// A param differs from the last run.
    ParamChanged {
        /// Param name.
        param: String,
        /// Value in the last run (`None`: absent).
        from: Option<Value>,
        /// Value now (`None`: removed).
        to: Option<Value>,
    },
    /// An input's content differs from the last run.
    InputChanged {
        /// Input name.
        input: String,
        /// Tree digest in the last run.
        from: Option<String>,
        /// Tree digest now.
        to: String,
    },
    /// An upstream stage runs first; this one reruns only if its output bytes change.
    UpstreamWillRun {
        /// The upstream stage.
        stage: String,
    },
    /// The stage's kind changed.
    KindChanged {
        /// Kind in the last run.
        from: String,
        /// Kind now.
        to: String,
    },
    /// The code of the kind changed: the crates (or `dependencies`, the locked external
    /// crates) whose digest differs from the last run's.
    CodeChanged {
        /// Crate names, sorted.
        crates: Vec<String>,
    },
    /// The device kind changed.
    DeviceChanged {
        /// Device in the last run (`None`: any device).
        from: Option<DeviceKind>,
        /// Device now.
        to: Option<DeviceKind>,
    },
    /// The stage's seed changed (`None`: a kind that is not seeded).
    SeedChanged {
        /// Seed in the last run.
        from: Option<u64>,
        /// Seed now.
        to: Option<u64>,
    },
    /// A dataset's declaration or files changed.
    DatasetChanged {
        /// Dataset name.
        dataset: String,
    },
    /// A workspace file the stage reads changed.
    WorkspaceChanged {
        /// Path relative to the pipeline file.
        path: String,
    },
    /// The key changed for a reason none of the above explains (a new dag or API version).
    EngineChanged,
}

/// The crates whose digest differs between a manifest's code and `now` (added and removed ones
/// too), sorted. A manifest without code (older than format 3) names every crate of `now`.
fn changed_code(recorded: &BTreeMap<String, String>, now: &dag_api::Code) -> Vec<String> {
    let now: BTreeMap<&str, &str> = now.parts.iter().copied().collect();
    let names: BTreeSet<&str> = recorded
        .keys()
        .map(String::as_str)
        .chain(now.keys().copied())
        .collect();
    names
        .into_iter()
        .filter(|n| recorded.get(*n).map(String::as_str) != now.get(n).copied())
        .map(str::to_string)
        .collect()
}

fn short(v: &Option<Value>) -> String {
    match v {
        None => "(unset)".into(),
        Some(v) => v.to_string(),
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Forced => write!(f, "forced"),
            Reason::NeverRan => write!(f, "never ran"),
            Reason::OutputMissing => write!(f, "output missing from the cache"),
            Reason::ParamChanged { param, from, to } => {
                write!(
                    f,
                    "param `{param}` changed from {} to {}",
                    short(from),
                    short(to)
                )
            }
            Reason::InputChanged { input, from, to } => write!(
                f,
                "input `{input}` changed ({} -> {})",
                from.as_deref()
                    .map(|d| &d[..d.len().min(12)])
                    .unwrap_or("none"),
                &to[..to.len().min(12)]
            ),
            Reason::UpstreamWillRun { stage } => write!(f, "upstream `{stage}` will run"),
            Reason::KindChanged { from, to } => write!(f, "kind changed from {from} to {to}"),
            Reason::CodeChanged { crates } => {
                let named: Vec<String> = crates
                    .iter()
                    .map(|c| {
                        if c == "dependencies" {
                            "the locked dependencies".to_string()
                        } else {
                            format!("code of {c}")
                        }
                    })
                    .collect();
                write!(f, "{} changed", named.join(", "))
            }
            Reason::DeviceChanged { from, to } => write!(
                f,
                "device changed from {} to {}",
                crate::cache::device_name(*from),
                crate::cache::device_name(*to)
            ),
            Reason::SeedChanged { from, to } => {
                let show = |s: &Option<u64>| s.map_or("none".to_string(), |s| s.to_string());
                write!(f, "seed changed from {} to {}", show(from), show(to))
            }
            Reason::DatasetChanged { dataset } => write!(f, "dataset `{dataset}` changed"),
            Reason::WorkspaceChanged { path } => write!(f, "workspace file `{path}` changed"),
            Reason::EngineChanged => write!(f, "the key's encoding changed (another dag version)"),
        }
    }
}

/// Whether a stage will run, in a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PlanStatus {
    /// A run with the same key is reused.
    Cached,
    /// It runs (or may run, see [`PlanEntry::stale_only_upstream`]).
    Run,
    /// Not selected by --only/--until.
    Skip,
}

/// What `dag plan` says about one stage.
#[derive(Debug, Clone, Serialize)]
pub struct PlanEntry {
    /// Stage name.
    pub stage: String,
    /// Stage kind.
    pub kind: String,
    /// Whether it runs.
    pub status: PlanStatus,
    /// Known unless an upstream stage must run first.
    pub key: Option<String>,
    /// Why it runs (empty when cached or skipped).
    pub reasons: Vec<Reason>,
    /// One digest of the kind's code ([`key::code_digest`]); `None` for kinds without code of
    /// dag's own.
    pub code_digest: Option<String>,
    /// The kind's code, crate name -> digest.
    pub code: BTreeMap<String, String>,
}

impl PlanEntry {
    /// Whether the stage runs only because an upstream stage does: early cutoff still keeps
    /// its result when what it reads comes out byte-identical.
    pub fn stale_only_upstream(&self) -> bool {
        self.status == PlanStatus::Run
            && !self.reasons.is_empty()
            && self
                .reasons
                .iter()
                .all(|r| matches!(r, Reason::UpstreamWillRun { .. }))
    }
}

/// One row of the run summary.
#[derive(Debug, Clone, Serialize)]
pub struct StageReport {
    /// Stage name.
    pub stage: String,
    /// How it ended.
    pub outcome: Outcome,
    /// Seconds spent running and publishing it (0 unless it ran).
    pub seconds: f64,
    /// Its key, when known.
    pub key: Option<String>,
    /// The text the stage asked to be printed after the run (from its manifest).
    pub summary: Option<String>,
}

/// Why a stage failed.
#[derive(Debug, Clone)]
pub struct StageFailure {
    /// Stage name (empty for an interruption between stages).
    pub stage: String,
    /// What went wrong.
    pub message: String,
    /// What to do about it.
    pub hint: Option<String>,
    /// The stage's log, if it wrote one.
    pub log: Option<PathBuf>,
    /// Whether the user interrupted the run.
    pub cancelled: bool,
}

/// The result of `run`.
#[derive(Debug)]
pub struct RunReport {
    /// One row per stage, in topological order.
    pub stages: Vec<StageReport>,
    /// The first failure, if any.
    pub failure: Option<StageFailure>,
    /// Wall-clock seconds of the whole run.
    pub seconds: f64,
}

/// A pipeline bound to a cache, a device and an output directory.
pub struct Engine<'a> {
    /// The validated pipeline.
    pub pipeline: &'a Pipeline,
    /// The artifact store.
    pub cache: &'a Cache,
    /// Digests of workspace files.
    pub stat: &'a StatCache,
    /// The resolved device kind (`flex`, `wgpu`, `cuda`).
    pub device: DeviceKind,
    /// Links go to `<out_dir>/<pipeline>/<stage>/<output>`.
    pub out_dir: PathBuf,
    /// Draw progress bars (only when stderr is a terminal).
    pub progress: bool,
    /// Without bars (stderr is a log file or a pipe), report on stderr a line when a stage starts
    /// and ends, and its progress at most every [`PROGRESS_LINE_EVERY`].
    pub progress_lines: bool,
    /// Set on Ctrl-C; stages poll it.
    pub cancel: CancelToken,
    /// A shared cache: stale stages are first looked up there, and what runs is published
    /// to it.
    pub remote: Option<&'a Remote>,
    /// With a remote, only bring what it has (`dag pull`): stages it lacks do not run.
    pub pull_only: bool,
    /// What this run published to the remote.
    pub pushed: Mutex<PushReport>,
    fingerprints: Mutex<HashMap<PathBuf, String>>,
    /// Staging and scratch directories of published runs, removed when the run ends: on a busy
    /// disk every directory removal can wait for a journal commit, which should not delay the next
    /// stage. A run killed before that leaves them to the next run's start-up cleanup.
    leftovers: Mutex<Vec<PathBuf>>,
}

/// What the engine decides for a stage whose inputs are known.
enum Decision {
    Cached(Box<Manifest>),
    Run {
        key: String,
        parts: KeyInputs,
        reasons: Vec<Reason>,
    },
}

/// The walk through the graph that `plan` (as a dry run) and `run` share: which stages are
/// selected and forced, the outputs known so far, and which selected stages are ready (every
/// selected upstream stage finished).
struct Schedule {
    selected: Vec<bool>,
    forced: Vec<bool>,
    /// Each stage's outputs once known: from the cache, or from its run.
    outs: Vec<Option<BTreeMap<String, OutputTree>>>,
    down: Vec<BTreeSet<usize>>,
    /// How many selected upstream stages each stage still waits for.
    waiting_on: Vec<usize>,
    /// Ready stages by topological position, so that a serial run follows the file's order.
    ready: BTreeSet<(usize, usize)>,
    position: Vec<usize>,
}

impl Schedule {
    fn new(engine: &Engine<'_>, sel: &Selection) -> Result<Self, EngineError> {
        let p = engine.pipeline;
        let n = p.stages.len();
        let (selected, forced) = engine.select(sel)?;
        let mut outs = vec![None; n];
        for &i in &p.order {
            if !selected[i] {
                outs[i] = engine.resolve_unselected(i, &outs)?;
            }
        }
        let waiting_on: Vec<usize> = (0..n)
            .map(|i| p.upstream(i).iter().filter(|&&u| selected[u]).count())
            .collect();
        let mut position = vec![0usize; n];
        for (k, &i) in p.order.iter().enumerate() {
            position[i] = k;
        }
        let ready = (0..n)
            .filter(|&i| selected[i] && waiting_on[i] == 0)
            .map(|i| (position[i], i))
            .collect();
        Ok(Schedule {
            selected,
            forced,
            outs,
            down: p.downstream(),
            waiting_on,
            ready,
            position,
        })
    }

    /// The ready stage first in topological order.
    fn next(&mut self) -> Option<usize> {
        self.ready.pop_first().map(|(_, i)| i)
    }

    /// Makes stages ready again (those parked behind a run with the same key).
    fn requeue(&mut self, stages: impl IntoIterator<Item = usize>) {
        for i in stages {
            self.ready.insert((self.position[i], i));
        }
    }

    /// Records that stage `i` finished, with its outputs (`None` in a plan, where a stage that
    /// runs has outputs nobody knows yet), and readies what waited for it last.
    fn finish(&mut self, i: usize, outputs: Option<BTreeMap<String, OutputTree>>) {
        self.outs[i] = outputs;
        for &d in &self.down[i] {
            if self.selected[d] {
                self.waiting_on[d] -= 1;
                if self.waiting_on[d] == 0 {
                    self.ready.insert((self.position[d], d));
                }
            }
        }
    }
}

impl<'a> Engine<'a> {
    /// Binds a pipeline to a cache.
    pub fn new(
        pipeline: &'a Pipeline,
        cache: &'a Cache,
        stat: &'a StatCache,
        device: DeviceKind,
        out_dir: PathBuf,
    ) -> Self {
        Engine {
            pipeline,
            cache,
            stat,
            device,
            out_dir,
            progress: std::io::stderr().is_terminal(),
            progress_lines: !std::io::stderr().is_terminal(),
            cancel: CancelToken::new(),
            remote: None,
            pull_only: false,
            pushed: Mutex::new(PushReport::default()),
            fingerprints: Mutex::new(HashMap::new()),
            leftovers: Mutex::new(Vec::new()),
        }
    }

    /// The stages `name` selects: one instance (`advent@seed=1`), or every instance of a stage
    /// as written in the file (`advent`).
    fn stage_indices(&self, name: &str, flag: &'static str) -> Result<Vec<usize>, EngineError> {
        let p = self.pipeline;
        if let Some(&i) = p.index.get(name) {
            return Ok(vec![i]);
        }
        let all: Vec<usize> = (0..p.stages.len())
            .filter(|&i| p.stages[i].base == name)
            .collect();
        if !all.is_empty() {
            return Ok(all);
        }
        Err(EngineError::UnknownStage {
            name: name.to_string(),
            flag,
            hint: crate::diag::did_you_mean(
                name,
                self.pipeline.stages.iter().map(|s| s.name.as_str()),
            )
            .unwrap_or_else(|| "`dag graph` lists the stages".into()),
        })
    }

    /// Selected stages and forced stages, as flags per stage.
    fn select(&self, sel: &Selection) -> Result<(Vec<bool>, Vec<bool>), EngineError> {
        let n = self.pipeline.stages.len();
        let mut selected = vec![true; n];
        if !sel.until.is_empty() {
            let mut keep = BTreeSet::new();
            for u in &sel.until {
                for i in self.stage_indices(u, "--until")? {
                    keep.extend(self.pipeline.ancestors(i));
                }
            }
            (0..n).for_each(|i| selected[i] = keep.contains(&i));
        }
        if !sel.only.is_empty() {
            let mut keep = BTreeSet::new();
            for o in &sel.only {
                keep.extend(self.stage_indices(o, "--only")?);
            }
            (0..n).for_each(|i| selected[i] &= keep.contains(&i));
        }
        let mut forced = vec![sel.force_all; n];
        for f in &sel.force {
            for i in self.stage_indices(f, "--force")? {
                forced[i] = true;
            }
        }
        Ok((selected, forced))
    }

    fn fingerprint(&self, path: &Path) -> Result<String, EngineError> {
        if let Some(f) = self.fingerprints.lock().expect("poisoned").get(path) {
            return Ok(f.clone());
        }
        let f = hash::dataset_fingerprint(path).map_err(|source| EngineError::Fingerprint {
            path: path.to_path_buf(),
            source,
        })?;
        self.fingerprints
            .lock()
            .expect("poisoned")
            .insert(path.to_path_buf(), f.clone());
        Ok(f)
    }

    /// The key parts of stage `i`, or the first upstream stage whose output is not known yet.
    fn parts(
        &self,
        i: usize,
        outs: &[Option<BTreeMap<String, OutputTree>>],
    ) -> Result<Result<KeyInputs, usize>, EngineError> {
        let p = self.pipeline;
        let st = &p.stages[i];
        let mut parts = KeyInputs::default();
        for (name, r) in &st.inputs {
            match outs[r.stage].as_ref().and_then(|o| o.get(&r.output)) {
                Some(t) => {
                    parts.inputs.insert(name.clone(), t.digest.clone());
                }
                None => return Ok(Err(r.stage)),
            }
        }
        for d in &st.datasets {
            let ds = &p.datasets[d];
            let root = match &ds.root {
                DatasetRoot::Workspace(rel) => self.fingerprint(&p.workdir.join(rel))?,
                DatasetRoot::Stage { stage, output } => {
                    match outs[*stage].as_ref().and_then(|o| o.get(output)) {
                        Some(t) => t.digest.clone(),
                        None => return Ok(Err(*stage)),
                    }
                }
            };
            parts.datasets.insert(
                d.clone(),
                key::dataset_digest(&ds.format, ds.classes, &ds.extra, &root),
            );
        }
        for w in &st.workspace_paths {
            let path = p.workdir.join(w);
            let d = self
                .stat
                .path_digest(&path)
                .map_err(|source| EngineError::Fingerprint { path, source })?;
            parts.workspace.insert(w.clone(), d);
        }
        Ok(Ok(parts))
    }

    fn device_for(&self, i: usize) -> Option<DeviceKind> {
        (!self.pipeline.stages[i].kind.device_independent()).then_some(self.device)
    }

    fn key(&self, i: usize, parts: &KeyInputs) -> String {
        let st = &self.pipeline.stages[i];
        key::stage_key(
            st.kind.kind(),
            &st.kind.code(),
            &st.params,
            self.device_for(i).map(DeviceKind::name),
            st.seed,
            parts,
        )
    }

    fn decide(&self, i: usize, parts: KeyInputs, forced: bool) -> Decision {
        let key = self.key(i, &parts);
        let manifest = self.cache.read_manifest(&key);
        if !forced {
            if let Some(m) = &manifest {
                if m.outputs.values().all(|t| self.cache.tree_available(t)) {
                    return Decision::Cached(Box::new(m.clone()));
                }
            }
        }
        let reasons = if forced {
            vec![Reason::Forced]
        } else if manifest.is_some() {
            vec![Reason::OutputMissing]
        } else {
            self.why(i, Some(&parts))
        };
        Decision::Run {
            key,
            parts,
            reasons,
        }
    }

    /// Differences from the last run of this stage name.
    fn why(&self, i: usize, parts: Option<&KeyInputs>) -> Vec<Reason> {
        let st = &self.pipeline.stages[i];
        let last = self
            .cache
            .latest(&self.pipeline.name, &st.name)
            .and_then(|k| self.cache.read_manifest(&k));
        let Some(m) = last else {
            return vec![Reason::NeverRan];
        };
        let mut r = Vec::new();
        if m.kind != st.kind.kind() {
            r.push(Reason::KindChanged {
                from: m.kind.clone(),
                to: st.kind.kind().to_string(),
            });
        } else {
            let changed = changed_code(&m.code, &st.kind.code());
            if !changed.is_empty() {
                r.push(Reason::CodeChanged { crates: changed });
            }
        }
        let names: BTreeSet<&String> = m.params.keys().chain(st.params.0.keys()).collect();
        for n in names {
            let (a, b) = (m.params.get(n), st.params.0.get(n));
            if a != b {
                r.push(Reason::ParamChanged {
                    param: n.clone(),
                    from: a.cloned(),
                    to: b.cloned(),
                });
            }
        }
        let dev = self.device_for(i);
        if m.device != dev {
            r.push(Reason::DeviceChanged {
                from: m.device,
                to: dev,
            });
        }
        let seed = self.pipeline.stages[i].seed;
        if m.seed != seed {
            r.push(Reason::SeedChanged {
                from: m.seed,
                to: seed,
            });
        }
        if let Some(parts) = parts {
            for (name, d) in &parts.inputs {
                let old = m.inputs.get(name).map(|x| x.digest.clone());
                if old.as_ref() != Some(d) {
                    r.push(Reason::InputChanged {
                        input: name.clone(),
                        from: old,
                        to: d.clone(),
                    });
                }
            }
            for (name, d) in &parts.datasets {
                if m.datasets.get(name) != Some(d) {
                    r.push(Reason::DatasetChanged {
                        dataset: name.clone(),
                    });
                }
            }
            for (path, d) in &parts.workspace {
                if m.workspace.get(path) != Some(d) {
                    r.push(Reason::WorkspaceChanged { path: path.clone() });
                }
            }
            if r.is_empty() {
                r.push(Reason::EngineChanged);
            }
        }
        r
    }

    /// Outputs of stages that will not run in this invocation, from the cache: the run with the
    /// current key when its inputs are known, else the last run of that stage name.
    fn resolve_unselected(
        &self,
        i: usize,
        outs: &[Option<BTreeMap<String, OutputTree>>],
    ) -> Result<Option<BTreeMap<String, OutputTree>>, EngineError> {
        if let Ok(parts) = self.parts(i, outs)? {
            if let Some(m) = self.cache.read_manifest(&self.key(i, &parts)) {
                return Ok(Some(m.outputs));
            }
        }
        let st = &self.pipeline.stages[i];
        Ok(self
            .cache
            .latest(&self.pipeline.name, &st.name)
            .and_then(|k| self.cache.read_manifest(&k))
            .map(|m| {
                tracing::warn!(stage = %st.name, "using the last cached output of a stage that is not selected; it may be stale");
                m.outputs
            }))
    }

    /// What a run would do, stage by stage, without running anything.
    pub fn plan(&self, sel: &Selection) -> Result<Vec<PlanEntry>, EngineError> {
        let p = self.pipeline;
        let mut schedule = Schedule::new(self, sel)?;
        let mut entries: Vec<PlanEntry> = p
            .stages
            .iter()
            .map(|st| {
                let code = st.kind.code();
                PlanEntry {
                    stage: st.name.clone(),
                    kind: st.kind.kind().to_string(),
                    status: PlanStatus::Skip,
                    key: None,
                    reasons: Vec::new(),
                    code_digest: (!code.parts.is_empty()).then(|| key::code_digest(&code)),
                    code: code
                        .parts
                        .iter()
                        .map(|(name, digest)| (name.to_string(), digest.to_string()))
                        .collect(),
                }
            })
            .collect();
        while let Some(i) = schedule.next() {
            let st = &p.stages[i];
            let e = &mut entries[i];
            let outputs = match self.parts(i, &schedule.outs)? {
                Err(up) => {
                    e.status = PlanStatus::Run;
                    e.reasons = self.why(i, None);
                    if e.reasons == [Reason::NeverRan] {
                        e.reasons.clear();
                    }
                    if schedule.forced[i] {
                        e.reasons.insert(0, Reason::Forced);
                    }
                    let upstream = &p.stages[up].name;
                    if !schedule.selected[up] {
                        return Err(EngineError::MissingUpstream {
                            stage: st.name.clone(),
                            upstream: upstream.clone(),
                        });
                    }
                    e.reasons.push(Reason::UpstreamWillRun {
                        stage: upstream.clone(),
                    });
                    None
                }
                Ok(parts) => match self.decide(i, parts, schedule.forced[i]) {
                    Decision::Cached(m) => {
                        e.status = PlanStatus::Cached;
                        e.key = Some(m.key.clone());
                        Some(m.outputs)
                    }
                    Decision::Run { key, reasons, .. } => {
                        e.status = PlanStatus::Run;
                        e.key = Some(key);
                        e.reasons = reasons;
                        None
                    }
                },
            };
            schedule.finish(i, outputs);
        }
        Ok(p.order.iter().map(|&i| entries[i].clone()).collect())
    }

    /// Runs what is stale. `jobs` bounds the stages running at once.
    pub fn run(&self, sel: &Selection, jobs: usize) -> Result<RunReport, EngineError> {
        let t0 = Instant::now();
        let p = self.pipeline;
        let mut schedule = Schedule::new(self, sel)?;
        let mut reports: Vec<StageReport> = p
            .stages
            .iter()
            .map(|s| StageReport {
                stage: s.name.clone(),
                outcome: Outcome::Skipped,
                seconds: 0.0,
                key: None,
                summary: None,
            })
            .collect();
        let bars = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let mut failure: Option<StageFailure> = None;
        let jobs = jobs.max(1);

        std::thread::scope(|scope| -> Result<(), EngineError> {
            let (tx, rx) = mpsc::channel::<(usize, Result<Manifest, StageFailure>)>();
            let mut running = 0usize;
            // Stages with identical definitions share a key (and a scratch directory): the second
            // waits for the first and then finds itself cached.
            let mut running_keys: HashMap<String, Vec<usize>> = HashMap::new();
            let mut key_of: HashMap<usize, String> = HashMap::new();
            loop {
                while failure.is_none() && !self.cancel.is_cancelled() && running < jobs {
                    let Some(i) = schedule.next() else {
                        break;
                    };
                    let st = &p.stages[i];
                    let parts = match self.parts(i, &schedule.outs)? {
                        Ok(parts) => parts,
                        // `dag pull`: what an unpulled stage feeds cannot be looked up.
                        Err(_) if self.pull_only => {
                            reports[i].outcome = Outcome::NotRun;
                            schedule.finish(i, None);
                            continue;
                        }
                        Err(up) => {
                            return Err(EngineError::MissingUpstream {
                                stage: st.name.clone(),
                                upstream: p.stages[up].name.clone(),
                            })
                        }
                    };
                    let mut decision = self.decide(i, parts, schedule.forced[i]);
                    if let Decision::Run { key, .. } = &decision {
                        if !schedule.forced[i] {
                            if let Some(m) = self.pull(key) {
                                decision = Decision::Cached(Box::new(m));
                            } else if self.pull_only {
                                reports[i].outcome = Outcome::NotRun;
                                schedule.finish(i, None);
                                continue;
                            }
                        }
                    }
                    match decision {
                        Decision::Cached(m) => {
                            tracing::debug!(stage = %st.name, key = %m.key, "cached");
                            self.publish_links(i, &m)?;
                            reports[i].outcome = Outcome::Cached;
                            reports[i].key = Some(m.key.clone());
                            reports[i].summary = m.summary.clone();
                            schedule.finish(i, Some(m.outputs));
                        }
                        Decision::Run { key, .. } if running_keys.contains_key(&key) => {
                            running_keys.get_mut(&key).expect("checked").push(i);
                        }
                        Decision::Run {
                            key,
                            parts,
                            reasons,
                        } => {
                            running_keys.insert(key.clone(), Vec::new());
                            key_of.insert(i, key.clone());
                            let why: Vec<String> =
                                reasons.iter().map(ToString::to_string).collect();
                            tracing::info!(stage = %st.name, key = %&key[..12], why = %why.join("; "), "running");
                            if self.progress_lines && !self.progress {
                                eprintln!("{}: running ({})", st.name, why.join("; "));
                            }
                            let inputs = self.input_artifacts(i, &schedule.outs)?;
                            let datasets = self.dataset_refs(i, &schedule.outs)?;
                            let bar = self.progress_bar(&bars, &st.name);
                            let tx = tx.clone();
                            running += 1;
                            scope.spawn(move || {
                                let r =
                                    self.execute(i, &key, parts, &inputs, &datasets, bar.as_ref());
                                if let Ok(m) = &r {
                                    self.push(m);
                                }
                                if let Some(b) = bar {
                                    b.finish_and_clear();
                                }
                                let _ = tx.send((i, r));
                            });
                        }
                    }
                }
                if running == 0 {
                    break;
                }
                let (i, r) = rx.recv().expect("a worker always reports");
                running -= 1;
                if let Some(parked) = key_of.remove(&i).and_then(|k| running_keys.remove(&k)) {
                    schedule.requeue(parked);
                }
                match r {
                    Ok(m) => {
                        if self.progress_lines && !self.progress {
                            eprintln!(
                                "{}: done in {:.1} s",
                                self.pipeline.stages[i].name,
                                m.seconds + m.publish_seconds
                            );
                        }
                        self.publish_links(i, &m)?;
                        reports[i].outcome = Outcome::Ran;
                        reports[i].seconds = m.seconds + m.publish_seconds;
                        reports[i].key = Some(m.key.clone());
                        reports[i].summary = m.summary.clone();
                        schedule.finish(i, Some(m.outputs));
                    }
                    Err(f) => {
                        reports[i].outcome = Outcome::Failed;
                        if failure.is_none() {
                            failure = Some(f);
                        }
                    }
                }
            }
            Ok(())
        })?;
        for dir in self.leftovers.lock().expect("poisoned").drain(..) {
            if let Err(e) = cache::remove_all(&dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a finished run's scratch");
            }
        }
        for (i, r) in reports.iter_mut().enumerate() {
            if schedule.selected[i] && r.outcome == Outcome::Skipped {
                r.outcome = Outcome::NotRun;
            }
        }
        if failure.is_none()
            && self.cancel.is_cancelled()
            && reports.iter().any(|r| r.outcome == Outcome::NotRun)
        {
            failure = Some(StageFailure {
                stage: String::new(),
                message: "interrupted".into(),
                hint: None,
                log: None,
                cancelled: true,
            });
        }
        let order_reports = p.order.iter().map(|&i| reports[i].clone()).collect();
        Ok(RunReport {
            stages: order_reports,
            failure,
            seconds: t0.elapsed().as_secs_f64(),
        })
    }

    /// The run of `key` from the remote, when it has one that can be used.
    fn pull(&self, key: &str) -> Option<Manifest> {
        let remote = self.remote?;
        match remote.pull(self.cache, key) {
            Ok(Some(m)) if m.outputs.values().all(|t| self.cache.tree_available(t)) => {
                tracing::info!(key = %&key[..12], remote = remote.url(), "pulled");
                Some(m)
            }
            Ok(_) => None,
            Err(e) => {
                tracing::warn!("{e}; the stage runs here instead");
                None
            }
        }
    }

    /// Publishes a finished run to the remote, if any; a failure is reported and the local
    /// result kept.
    fn push(&self, m: &Manifest) {
        let Some(remote) = self.remote.filter(|_| !self.pull_only) else {
            return;
        };
        match remote.push(self.cache, m) {
            Ok(r) => {
                let mut total = self.pushed.lock().expect("poisoned");
                total.published += r.published;
                total.present += r.present;
                total.blobs += r.blobs;
                total.bytes += r.bytes;
            }
            Err(e) => tracing::warn!(stage = %m.stage, "not published: {e}"),
        }
    }

    /// A progress bar for a running stage when bars are drawn (bars and their ticker threads
    /// only exist then).
    fn progress_bar(&self, bars: &MultiProgress, stage: &str) -> Option<ProgressBar> {
        self.progress.then(|| {
            let bar = bars.add(ProgressBar::new_spinner());
            bar.set_style(
                // The stage's message (its phase, or while training every loss term and the lr)
                // comes last, where the terminal's width cuts it rather than the numbers before
                // it.
                ProgressStyle::with_template(
                    "{spinner} {prefix:.bold} {bar:24} {pos}/{len} {per_sec} ETA {eta} {wide_msg}",
                )
                .expect("valid template"),
            );
            bar.set_prefix(stage.to_string());
            bar.enable_steady_tick(std::time::Duration::from_millis(200));
            bar
        })
    }

    fn input_artifacts(
        &self,
        i: usize,
        outs: &[Option<BTreeMap<String, OutputTree>>],
    ) -> Result<BTreeMap<String, InputArtifact>, EngineError> {
        let p = self.pipeline;
        let mut m = BTreeMap::new();
        for (name, r) in &p.stages[i].inputs {
            let t = &outs[r.stage].as_ref().expect("resolved before")[&r.output];
            m.insert(
                name.clone(),
                InputArtifact {
                    path: self.cache.ensure_tree(t)?,
                    ty: r.ty,
                    digest: t.digest.clone(),
                    producer: format!("{}.{}", p.stages[r.stage].name, r.output),
                },
            );
        }
        Ok(m)
    }

    fn dataset_refs(
        &self,
        i: usize,
        outs: &[Option<BTreeMap<String, OutputTree>>],
    ) -> Result<BTreeMap<String, DatasetRef>, EngineError> {
        let p = self.pipeline;
        let mut m = BTreeMap::new();
        for d in &p.stages[i].datasets {
            let ds = &p.datasets[d];
            let root = match &ds.root {
                DatasetRoot::Workspace(rel) => p.workdir.join(rel),
                DatasetRoot::Stage { stage, output } => self
                    .cache
                    .ensure_tree(&outs[*stage].as_ref().expect("resolved before")[output])?,
            };
            m.insert(d.clone(), ds.to_ref(root));
        }
        Ok(m)
    }

    /// Runs one stage in a worker thread and publishes its outputs into the cache.
    fn execute(
        &self,
        i: usize,
        key: &str,
        parts: KeyInputs,
        inputs: &BTreeMap<String, InputArtifact>,
        datasets: &BTreeMap<String, DatasetRef>,
        bar: Option<&ProgressBar>,
    ) -> Result<Manifest, StageFailure> {
        let p = self.pipeline;
        let st = &p.stages[i];
        let fail = |message: String, hint: Option<String>, log: Option<PathBuf>| StageFailure {
            stage: st.name.clone(),
            message,
            hint,
            log,
            cancelled: false,
        };
        let cache_fail = |e: CacheError| fail(e.to_string(), Some(e.hint()), None);
        let staging = self.cache.tmp_path(&st.name);
        let outputs: BTreeMap<String, PathBuf> = st
            .outputs
            .iter()
            .enumerate()
            .map(|(j, o)| (o.name.clone(), staging.join(j.to_string())))
            .collect();
        for d in outputs.values() {
            std::fs::create_dir_all(d)
                .map_err(|e| fail(format!("cannot create {}: {e}", d.display()), None, None))?;
        }
        let scratch = self.cache.scratch(key).map_err(cache_fail)?;
        let bar_progress = bar.map(|b| BarProgress(b.clone()));
        let line_progress =
            (bar.is_none() && self.progress_lines).then(|| LineProgress::new(&st.name));
        let progress: &dyn Progress = match (&bar_progress, &line_progress) {
            (Some(b), _) => b,
            (None, Some(l)) => l,
            (None, None) => &dag_api::NoProgress,
        };
        let ctx = StageContext {
            stage: &st.name,
            pipeline: &p.name,
            params: &st.params,
            inputs,
            datasets,
            outputs: &outputs,
            scratch: &scratch,
            device: self.device,
            seed: st.seed.unwrap_or(0),
            workdir: &p.workdir,
            progress,
            cancel: &self.cancel,
        };
        let t_run = Instant::now();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| st.kind.run(&ctx)));
        let seconds = t_run.elapsed().as_secs_f64();
        let log_path = scratch.join(STAGE_LOG);
        let log = log_path.exists().then(|| log_path.clone());
        let outcome = match result {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => {
                let _ = cache::remove_all(&staging);
                return Err(StageFailure {
                    stage: st.name.clone(),
                    message: e.to_string(),
                    hint: e.hint.clone(),
                    log: e.path.clone().filter(|p| p.exists()).or(log),
                    // Ctrl-C reaches the stage's child processes too; their death is the
                    // interruption, not a failure of the stage.
                    cancelled: e.cancelled || self.cancel.is_cancelled(),
                });
            }
            Err(panic) => {
                let _ = cache::remove_all(&staging);
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                return Err(fail(
                    format!("the stage panicked: {msg}"),
                    Some("this is a bug in the stage kind; please report it".into()),
                    log,
                ));
            }
        };
        let t_pub = Instant::now();
        let mut trees = BTreeMap::new();
        for o in &st.outputs {
            let t = self
                .cache
                .ingest(&outputs[&o.name], o.ty)
                .map_err(cache_fail)?;
            self.cache.ensure_tree(&t).map_err(cache_fail)?;
            trees.insert(o.name.clone(), t);
        }
        let log_digest = match &log {
            Some(l) => Some(self.cache.store_file(l).map_err(cache_fail)?),
            None => None,
        };
        let producer = |name: &str| {
            let r = &st.inputs[name];
            format!("{}.{}", p.stages[r.stage].name, r.output)
        };
        let m = Manifest {
            format: MANIFEST_FORMAT,
            dag_version: env!("CARGO_PKG_VERSION").to_string(),
            key: key.to_string(),
            pipeline: p.name.clone(),
            stage: st.name.clone(),
            kind: st.kind.kind().to_string(),
            code: st
                .kind
                .code()
                .parts
                .iter()
                .map(|(name, digest)| (name.to_string(), digest.to_string()))
                .collect(),
            device: self.device_for(i),
            seed: st.seed,
            params: st.params.0.clone(),
            inputs: parts
                .inputs
                .iter()
                .map(|(n, d)| {
                    (
                        n.clone(),
                        InputRecord {
                            producer: producer(n),
                            digest: d.clone(),
                        },
                    )
                })
                .collect(),
            datasets: parts.datasets,
            workspace: parts.workspace,
            outputs: trees,
            metrics: outcome.metrics,
            log: log_digest,
            summary: outcome.summary,
            finished_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
            seconds,
            publish_seconds: 0.0,
            checksum: None,
        };
        let mut m = m;
        m.publish_seconds = t_pub.elapsed().as_secs_f64();
        self.cache.write_manifest(&m).map_err(cache_fail)?;
        self.leftovers
            .lock()
            .expect("poisoned")
            .extend([staging, scratch]);
        Ok(m)
    }

    /// Points `out/<pipeline>/<stage>/<output>` at the current outputs and records the run as the
    /// stage's latest.
    fn publish_links(&self, i: usize, m: &Manifest) -> Result<(), EngineError> {
        let st = &self.pipeline.stages[i];
        let base = self.out_dir.join(&self.pipeline.name).join(&st.name);
        for (name, t) in &m.outputs {
            let target = self.cache.ensure_tree(t)?;
            cache::update_link(&base.join(name), &target)?;
        }
        self.cache
            .set_latest(&self.pipeline.name, &st.name, &m.key)?;
        Ok(())
    }
}

/// How often a stage's progress is written as a line when stderr is not a terminal.
pub const PROGRESS_LINE_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// Writes a stage's [`Progress`] as lines on stderr (for logs and CI, where bars would be
/// noise): the start of each phase, then the position and status at most every
/// [`PROGRESS_LINE_EVERY`], and the phase's last step.
struct LineProgress {
    stage: String,
    state: Mutex<LineState>,
}

struct LineState {
    phase: String,
    total: u64,
    message: String,
    last_line: Instant,
}

impl LineProgress {
    fn new(stage: &str) -> Self {
        LineProgress {
            stage: stage.to_string(),
            state: Mutex::new(LineState {
                phase: String::new(),
                total: 0,
                message: String::new(),
                last_line: Instant::now(),
            }),
        }
    }
}

impl Progress for LineProgress {
    fn start(&self, phase: &str, total: u64) {
        let mut s = self.state.lock().expect("poisoned");
        s.phase = phase.to_string();
        s.total = total;
        s.message.clear();
        s.last_line = Instant::now();
        if total > 0 {
            eprintln!("{}: {phase} 0/{total}", self.stage);
        } else {
            eprintln!("{}: {phase}", self.stage);
        }
    }
    fn set_position(&self, pos: u64) {
        let mut s = self.state.lock().expect("poisoned");
        let last = s.total > 0 && pos == s.total;
        if last || s.last_line.elapsed() >= PROGRESS_LINE_EVERY {
            s.last_line = Instant::now();
            let sep = if s.message.is_empty() { "" } else { " " };
            eprintln!(
                "{}: {} {pos}/{}{sep}{}",
                self.stage, s.phase, s.total, s.message
            );
        }
    }
    fn message(&self, msg: &str) {
        self.state.lock().expect("poisoned").message = msg.to_string();
    }
}

/// Draws a stage's [`Progress`] on its bar.
struct BarProgress(ProgressBar);

impl Progress for BarProgress {
    fn start(&self, phase: &str, total: u64) {
        self.0.set_length(total);
        self.0.set_position(0);
        self.0.set_message(phase.to_string());
    }
    fn set_position(&self, pos: u64) {
        self.0.set_position(pos);
    }
    fn message(&self, msg: &str) {
        self.0.set_message(msg.to_string());
    }
}
