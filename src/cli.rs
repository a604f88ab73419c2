//! The `dag` command line.

use std::fs;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use dag_api::{DeviceKind, ParamType, Params, Registry};

use crate::cache::remote::{PushReport, Remote, RemoteError};
use crate::cache::{self, Cache};
use crate::executor::{Engine, EngineError, Outcome, PlanStatus, RunReport, Selection};
use crate::hash::StatCache;
use crate::spec::{self, Override, Pipeline};

/// Reproducible, cached pipelines: runs only what is stale, reuses the rest.
#[derive(Debug, Parser)]
#[command(name = "dag", version, about, max_term_width = 100)]
pub struct Cli {
    #[command(subcommand)]
    /// What to do.
    pub command: Command,
    #[command(flatten)]
    /// Options of every command.
    pub global: Global,
}

/// Options every command accepts.
#[derive(Debug, Args)]
pub struct Global {
    /// Override a param: `-S stage.param=value` (the value is YAML; repeatable). Changes the
    /// stage's key exactly as editing the file would. A list sweeps the param instead, as
    /// `matrix:` does (`-S split.lambda=[0.5,0.67]`; a list of lists for a list-valued param);
    /// `-S seeds=[0,1,2]` and `-S seed=3` replace the file's seeds.
    #[arg(
        short = 'S',
        long = "set",
        value_name = "STAGE.PARAM=VALUE",
        global = true
    )]
    pub set: Vec<String>,
    /// Device for stages that compute: auto, flex, wgpu, cuda or tch (overrides the file's `device:`).
    #[arg(long, global = true)]
    pub device: Option<String>,
    /// The artifact cache directory.
    #[arg(long, env = "DAG_CACHE", default_value = "cache", global = true)]
    pub cache: PathBuf,
    /// Where `<pipeline>/<stage>/<output>` links to the current outputs are kept.
    #[arg(long, default_value = "out", global = true)]
    pub out: PathBuf,
    /// More log output (-v: info, -vv: debug, -vvv: trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Only errors.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Log line format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

/// Log line formats.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Which stages a command considers.
#[derive(Debug, Args, Clone, Default)]
pub struct SelectArgs {
    /// Run only this stage (repeatable); its inputs must already be in the cache. A swept
    /// stage's name selects all its instances; `'advent@seed=1'` selects one.
    #[arg(long, value_name = "STAGE")]
    pub only: Vec<String>,
    /// Run this stage (or all its instances, or one instance) and everything it depends on
    /// (repeatable).
    #[arg(long, value_name = "STAGE")]
    pub until: Vec<String>,
    /// Rerun this stage even when cached (repeatable); its dependents rerun only if its output
    /// bytes change.
    #[arg(long, value_name = "STAGE")]
    pub force: Vec<String>,
    /// Rerun every selected stage.
    #[arg(long)]
    pub force_all: bool,
}

impl SelectArgs {
    fn selection(&self) -> Selection {
        Selection {
            only: self.only.clone(),
            until: self.until.clone(),
            force: self.force.clone(),
            force_all: self.force_all,
        }
    }
}

/// Output formats of `dag metrics`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum MetricsFormat {
    /// Aligned columns for a terminal; per-class IoU as a second table, `*` marks the best.
    Table,
    /// Comma-separated values with a header: name, stage, method, miou, miou16, miou13,
    /// iou_<class>...; undefined values are empty.
    Csv,
    /// One object: source, classes, and per model its mIoUs and per-class IoU (null when
    /// undefined).
    Json,
    /// A Markdown table with the best value of each column in bold.
    Markdown,
}

impl From<MetricsFormat> for dag_report::Format {
    fn from(f: MetricsFormat) -> Self {
        match f {
            MetricsFormat::Table => dag_report::Format::Table,
            MetricsFormat::Csv => dag_report::Format::Csv,
            MetricsFormat::Json => dag_report::Format::Json,
            MetricsFormat::Markdown => dag_report::Format::Markdown,
        }
    }
}

/// Graph output formats.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum GraphFormat {
    /// Graphviz.
    Dot,
    /// Mermaid flowchart.
    Mermaid,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run what is stale and reuse the rest; print a summary table.
    Run {
        /// The pipeline file.
        pipeline: PathBuf,
        #[command(flatten)]
        /// Which stages to run.
        select: SelectArgs,
        /// Stages to run at once (independent stages run in parallel) [default: the pipeline
        /// file's `jobs:`, else 1]
        #[arg(short, long, value_parser = clap::value_parser!(u32).range(1..))]
        jobs: Option<u32>,
        /// Exit instead of waiting when another dag holds the cache.
        #[arg(long)]
        no_wait: bool,
        /// A cache shared across machines (`s3://bucket/prefix`, `file:///shared/dir`): stale
        /// stages it has a result for are pulled instead of run, and what runs is pushed to it
        #[arg(long, env = "DAG_REMOTE", value_name = "URL")]
        remote: Option<String>,
    },
    /// Publish runs to a shared cache: those of a pipeline's current stages, or with no
    /// pipeline every run in the local cache. Each run's files go up before its index entry,
    /// so an interrupted push publishes nothing half-way.
    Push {
        /// The pipeline whose current runs to publish (default: every run in the cache).
        pipeline: Option<PathBuf>,
        /// The shared cache (`s3://bucket/prefix`, `file:///shared/dir`).
        #[arg(long, env = "DAG_REMOTE", value_name = "URL")]
        remote: String,
    },
    /// Bring a pipeline's results from a shared cache without running anything: each stage
    /// whose key the remote has is pulled (files checked against their digests); the others,
    /// and what depends on them, are left for `dag run`.
    Pull {
        /// The pipeline file.
        pipeline: PathBuf,
        #[command(flatten)]
        /// Which stages to consider.
        select: SelectArgs,
        /// The shared cache (`s3://bucket/prefix`, `file:///shared/dir`).
        #[arg(long, env = "DAG_REMOTE", value_name = "URL")]
        remote: String,
    },
    /// Show what `run` would do, and why each stale stage would run.
    Plan {
        /// The pipeline file.
        pipeline: PathBuf,
        #[command(flatten)]
        /// Which stages to consider.
        select: SelectArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One line per stage: up to date or stale, and the cache's size.
    Status {
        /// The pipeline file.
        pipeline: PathBuf,
    },
    /// Print the pipeline's graph.
    Graph {
        /// The pipeline file.
        pipeline: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = GraphFormat::Dot)]
        format: GraphFormat,
    },
    /// Show a stage's last run: outputs, metrics, timings, log.
    Show {
        /// The pipeline file.
        pipeline: PathBuf,
        /// The stage name.
        stage: String,
        /// Print the manifest as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write a static HTML report of the pipeline's results from the cache: the graph with each
    /// stage's state and time, the comparison table, per-class IoU, training curves, the entropy
    /// histogram with the split threshold, and pictures of the easiest and hardest target images.
    /// Runs nothing; stages without a result are shown as such.
    Report {
        /// The pipeline file.
        pipeline: PathBuf,
        /// Directory to write index.html, charts/ and img/ into (created; an earlier report
        /// there is replaced). Open index.html in any browser; it needs no network.
        #[arg(short, long, value_name = "DIR", default_value = "report")]
        output: PathBuf,
    },
    /// Print the comparison table (mIoU and per-class IoU of every evaluated model) from the
    /// cache: a `compare` stage's table, or else every `evaluate` stage's summary.
    Metrics {
        /// The pipeline file.
        pipeline: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = MetricsFormat::Table)]
        format: MetricsFormat,
    },
    /// Delete objects and trees that no kept manifest reaches.
    Gc {
        /// Keep only the N most recent runs of each stage (the latest run is always kept).
        #[arg(long, value_name = "N")]
        keep_last: Option<usize>,
        /// Report what would be deleted without deleting.
        #[arg(long)]
        dry_run: bool,
    },
    /// Re-hash every object (or those a pipeline's current outputs use); quarantine corrupt ones
    /// and drop the runs that used them, so the next run rebuilds exactly those stages.
    Verify {
        /// Only check the objects of this pipeline's latest runs.
        pipeline: Option<PathBuf>,
    },
    /// List the stage kinds with their params, defaults and docs.
    Kinds,
    /// Print the digest the cache would give a file or directory, and the hashing throughput.
    Hash {
        /// Files or directories.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
}

/// The registry of the `dag` binary: every kind of `dag-stages`, plus `shell`.
pub fn registry() -> Registry {
    let mut r = Registry::new();
    dag_data_stages::register_all(&mut r);
    dag_stages::register_all(&mut r);
    r.register(crate::shell::Shell);
    r
}

/// Exit status for a usage or spec error.
const EXIT_USAGE: u8 = 2;

/// Parses the command line and runs; returns the process exit status.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.global);
    // Lines are wrapped for people at a terminal only; logs and tests get each message whole.
    let tty = std::io::stderr().is_terminal();
    let _ = miette::set_hook(Box::new(move |_| {
        Box::new(miette::MietteHandlerOpts::new().wrap_lines(tty).build())
    }));
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            e.print();
            ExitCode::from(e.code)
        }
    }
}

fn init_logging(g: &Global) {
    let level = if g.quiet {
        "error"
    } else {
        match g.verbose {
            0 => "warn",
            1 => "info",
            2 => "debug",
            _ => "trace",
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("DAG_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match g.log_format {
        LogFormat::Json => b.json().try_init(),
        LogFormat::Text => b.with_ansi(std::io::stderr().is_terminal()).try_init(),
    };
}

/// An error on its way to the user.
struct Failure {
    code: u8,
    kind: FailureKind,
}

enum FailureKind {
    Spec(crate::diag::SpecErrors),
    Message {
        message: String,
        hint: Option<String>,
    },
}

impl Failure {
    fn msg(code: u8, message: impl Into<String>, hint: Option<String>) -> Self {
        Failure {
            code,
            kind: FailureKind::Message {
                message: message.into(),
                hint,
            },
        }
    }

    fn print(&self) {
        match &self.kind {
            FailureKind::Spec(errs) => {
                for e in &errs.0 {
                    eprintln!("{:?}", e.report());
                }
                eprintln!(
                    "error: {} problem{} in the pipeline; nothing was run",
                    errs.0.len(),
                    if errs.0.len() == 1 { "" } else { "s" }
                );
            }
            FailureKind::Message { message, hint } => {
                eprintln!("error: {message}");
                if let Some(h) = hint {
                    eprintln!("  hint: {h}");
                }
            }
        }
    }
}

impl From<EngineError> for Failure {
    fn from(e: EngineError) -> Self {
        Failure::msg(1, e.to_string(), Some(e.hint()))
    }
}

impl From<RemoteError> for Failure {
    fn from(e: RemoteError) -> Self {
        let hint = match &e {
            RemoteError::Url { .. } => "give s3://bucket[/prefix] or file:///absolute/dir",
            RemoteError::Store { .. } => {
                "check the URL, the network and the credentials (AWS_ACCESS_KEY_ID and \
                 AWS_SECRET_ACCESS_KEY or ~/.aws/credentials; AWS_ENDPOINT and \
                 AWS_ALLOW_HTTP=true for a server of your own)"
            }
            RemoteError::Damaged { .. } => {
                "the remote's copy is damaged; `dag run` recomputes the stage and `dag push` \
                 publishes a good copy under a new index entry only once the bad one is removed"
            }
            RemoteError::Cache(c) => return Failure::msg(1, e.to_string(), Some(c.hint())),
        };
        Failure::msg(1, e.to_string(), Some(hint.into()))
    }
}

impl From<cache::CacheError> for Failure {
    fn from(e: cache::CacheError) -> Self {
        Failure::msg(1, e.to_string(), Some(e.hint()))
    }
}

/// One line on what a run or `dag push` published.
fn print_pushed(remote: &Remote, r: &PushReport) {
    if r.published + r.present == 0 {
        return;
    }
    println!(
        "{}: published {} run{} ({} file{}, {:.1} MB); {} already there",
        remote.url(),
        r.published,
        if r.published == 1 { "" } else { "s" },
        r.blobs,
        if r.blobs == 1 { "" } else { "s" },
        r.bytes as f64 / 1e6,
        r.present
    );
}

fn cmd_push(pipeline: Option<&Path>, url: &str, g: &Global) -> Result<ExitCode, Failure> {
    let remote = Remote::open(url)?;
    let Some(cache) = Cache::open_existing(&g.cache) else {
        return Err(Failure::msg(
            1,
            format!("no cache at {}", g.cache.display()),
            Some("run the pipeline first, or point --cache at the cache to publish".into()),
        ));
    };
    let manifests: Vec<cache::Manifest> = match pipeline {
        Some(path) => {
            let p = load(path, g)?;
            p.stages
                .iter()
                .filter_map(|s| cache.latest(&p.name, &s.name))
                .filter_map(|key| cache.read_manifest(&key))
                .collect()
        }
        None => cache.manifests()?,
    };
    let mut total = PushReport::default();
    for m in &manifests {
        let r = remote.push(&cache, m)?;
        if !g.quiet && r.published > 0 {
            println!("{}: {} ({})", m.stage, &m.key[..12], m.pipeline);
        }
        total.published += r.published;
        total.present += r.present;
        total.blobs += r.blobs;
        total.bytes += r.bytes;
    }
    if manifests.is_empty() {
        println!("nothing to publish");
    } else {
        print_pushed(&remote, &total);
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_pull(path: &Path, select: &SelectArgs, url: &str, g: &Global) -> Result<ExitCode, Failure> {
    let p = load(path, g)?;
    let device = device(&p, g)?;
    let remote = Remote::open(url)?;
    let cache = Cache::open(&g.cache)?;
    let _lock = cache.lock(true)?;
    cache.clean_tmp()?;
    let stat = StatCache::load(cache.stat_cache_path());
    let out = std::path::absolute(&g.out).unwrap_or_else(|_| g.out.clone());
    let mut engine = Engine::new(&p, &cache, &stat, device, out);
    engine.remote = Some(&remote);
    engine.pull_only = true;
    engine.progress = false;
    engine.progress_lines = false;
    let report = engine.run(&select.selection(), 1);
    stat.save();
    let report = report?;
    if !g.quiet {
        print_summary(&report);
    }
    let missing = report
        .stages
        .iter()
        .filter(|s| s.outcome == Outcome::NotRun)
        .count();
    if missing > 0 && !g.quiet {
        println!(
            "{missing} stage{} not in {url}; `dag run` computes {}",
            if missing == 1 { "" } else { "s" },
            if missing == 1 { "it" } else { "them" }
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn load(path: &Path, g: &Global) -> Result<Pipeline, Failure> {
    if let Err(e) = fs::metadata(path) {
        return Err(Failure::msg(
            EXIT_USAGE,
            format!("cannot read the pipeline file {}: {e}", path.display()),
            Some("check the path; it is relative to the current directory".into()),
        ));
    }
    let mut overrides = Vec::new();
    let mut errs = Vec::new();
    for s in &g.set {
        match Override::parse(s) {
            Ok(o) => overrides.push(o),
            Err(e) => errs.push(e),
        }
    }
    if !errs.is_empty() {
        return Err(Failure {
            code: EXIT_USAGE,
            kind: FailureKind::Spec(crate::diag::SpecErrors(errs)),
        });
    }
    spec::load(path, &registry(), &overrides).map_err(|e| Failure {
        code: EXIT_USAGE,
        kind: FailureKind::Spec(e),
    })
}

fn device(p: &Pipeline, g: &Global) -> Result<DeviceKind, Failure> {
    let requested = g.device.as_deref().unwrap_or(&p.device);
    // Resolving may probe GPU backends: skip it when no stage would use the answer (the kind
    // then only fills a field that no stage reads).
    if p.stages.iter().all(|s| s.kind.device_independent()) {
        return Ok(DeviceKind::from_name(requested).unwrap_or(DeviceKind::Flex));
    }
    dag_stages::resolve_device(requested).map_err(|e| {
        Failure::msg(
            EXIT_USAGE,
            format!("device `{requested}`: {e}"),
            Some("pass --device flex to run on the CPU".into()),
        )
    })
}

/// The cache for reading: the real one when it exists, else an empty view of its path.
fn cache_view(g: &Global) -> Cache {
    Cache::open_existing(&g.cache).unwrap_or_else(|| Cache {
        root: std::path::absolute(&g.cache).unwrap_or_else(|_| g.cache.clone()),
    })
}

fn dispatch(cli: Cli) -> Result<ExitCode, Failure> {
    let g = &cli.global;
    match &cli.command {
        Command::Run {
            pipeline,
            select,
            jobs,
            no_wait,
            remote,
        } => cmd_run(pipeline, select, *jobs, *no_wait, remote.as_deref(), g),
        Command::Push { pipeline, remote } => cmd_push(pipeline.as_deref(), remote, g),
        Command::Pull {
            pipeline,
            select,
            remote,
        } => cmd_pull(pipeline, select, remote, g),
        Command::Plan {
            pipeline,
            select,
            json,
        } => cmd_plan(pipeline, select, *json, g),
        Command::Status { pipeline } => cmd_status(pipeline, g),
        Command::Graph { pipeline, format } => cmd_graph(pipeline, *format, g),
        Command::Show {
            pipeline,
            stage,
            json,
        } => cmd_show(pipeline, stage, *json, g),
        Command::Gc { keep_last, dry_run } => cmd_gc(*keep_last, *dry_run, g),
        Command::Verify { pipeline } => cmd_verify(pipeline.as_deref(), g),
        Command::Report { pipeline, output } => cmd_report(pipeline, output, g),
        Command::Metrics { pipeline, format } => cmd_metrics(pipeline, *format, g),
        Command::Kinds => cmd_kinds(),
        Command::Hash { paths } => cmd_hash(paths),
    }
}

fn cmd_run(
    path: &Path,
    select: &SelectArgs,
    jobs: Option<u32>,
    no_wait: bool,
    remote: Option<&str>,
    g: &Global,
) -> Result<ExitCode, Failure> {
    let p = load(path, g)?;
    let jobs = jobs.map_or(p.jobs, |j| j as usize);
    let device = device(&p, g)?;
    let remote = remote.map(Remote::open).transpose()?;
    let cache = Cache::open(&g.cache)?;
    let _lock = cache.lock(!no_wait)?;
    cache.clean_tmp()?;
    let stat = StatCache::load(cache.stat_cache_path());
    let out = std::path::absolute(&g.out).unwrap_or_else(|_| g.out.clone());
    let mut engine = Engine::new(&p, &cache, &stat, device, out);
    engine.remote = remote.as_ref();
    engine.progress &= !g.quiet;
    engine.progress_lines &= !g.quiet;
    let token = engine.cancel.clone();
    let _ = ctrlc::set_handler(move || token.cancel());
    let report = engine.run(&select.selection(), jobs);
    stat.save();
    // The stages' tensors are gone but a GPU may still run what their drops queued; a process
    // that exits meanwhile can crash in the driver's exit handlers.
    if let Err(e) = dag_stages::wait_for_device_work() {
        tracing::warn!("{e}");
    }
    let report = report?;
    record_last_run(&cache, &p.name, &report);
    if !g.quiet {
        print_summary(&report);
        if let Some(remote) = &remote {
            print_pushed(remote, &engine.pushed.lock().expect("poisoned"));
        }
    }
    Ok(match &report.failure {
        None => ExitCode::SUCCESS,
        Some(f) if f.cancelled => {
            eprintln!(
                "error: interrupted{}; completed stages are cached, rerun to continue",
                if f.stage.is_empty() {
                    String::new()
                } else {
                    format!(" while running `{}`", f.stage)
                }
            );
            ExitCode::from(130)
        }
        Some(f) => {
            eprintln!("error: stage `{}` failed: {}", f.stage, f.message);
            if let Some(l) = &f.log {
                eprintln!("  log: {}", l.display());
            }
            if let Some(h) = &f.hint {
                eprintln!("  hint: {h}");
            }
            ExitCode::from(1)
        }
    })
}

/// Keeps how each stage ended for `dag report`. Losing it only costs the report the difference
/// between "ran" and "cached", so a failure to write it is a warning, not an error.
fn record_last_run(cache: &Cache, pipeline: &str, r: &RunReport) {
    let finished_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let stages = r
        .stages
        .iter()
        .map(|s| cache::LastRunStage {
            stage: s.stage.clone(),
            outcome: s.outcome,
            key: s.key.clone(),
            message: r
                .failure
                .as_ref()
                .filter(|f| f.stage == s.stage && s.outcome == Outcome::Failed)
                .map(|f| f.message.clone()),
        })
        .collect();
    let run = cache::LastRun {
        finished_unix,
        stages,
    };
    if let Err(e) = cache.write_last_run(pipeline, &run) {
        tracing::warn!("cannot record the run for `dag report`: {e}");
    }
}

fn print_summary(r: &RunReport) {
    let width = r
        .stages
        .iter()
        .map(|s| s.stage.len())
        .max()
        .unwrap_or(5)
        .max(5);
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{:<width$}  {:<8}  {:>9}",
        "stage", "status", "seconds"
    );
    for s in &r.stages {
        let secs = match s.outcome {
            Outcome::Ran => format!("{:.3}", s.seconds),
            _ => "-".into(),
        };
        let _ = writeln!(
            out,
            "{:<width$}  {:<8}  {:>9}",
            s.stage,
            s.outcome.word(),
            secs
        );
    }
    let count = |o: Outcome| r.stages.iter().filter(|s| s.outcome == o).count();
    let _ = writeln!(
        out,
        "{} ran, {} cached, {} failed in {:.3} s",
        count(Outcome::Ran),
        count(Outcome::Cached),
        count(Outcome::Failed),
        r.seconds
    );
    for s in &r.stages {
        if let Some(text) = &s.summary {
            let _ = writeln!(out, "\n{}:\n{}", s.stage, text.trim_end());
        }
    }
}

fn cmd_plan(path: &Path, select: &SelectArgs, json: bool, g: &Global) -> Result<ExitCode, Failure> {
    let p = load(path, g)?;
    let device = device(&p, g)?;
    let cache = cache_view(g);
    let stat = StatCache::load(cache.stat_cache_path());
    let engine = Engine::new(&p, &cache, &stat, device, g.out.clone());
    let plan = engine.plan(&select.selection())?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&plan).expect("plan serializes")
        );
        return Ok(ExitCode::SUCCESS);
    }
    let width = plan.iter().map(|e| e.stage.len()).max().unwrap_or(5).max(5);
    for e in &plan {
        let status = match e.status {
            PlanStatus::Cached => "cached",
            PlanStatus::Run if e.stale_only_upstream() => "may run",
            PlanStatus::Run => "will run",
            PlanStatus::Skip => "skipped",
        };
        let why = e
            .reasons
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        println!("{:<width$}  {:<8}  {why}", e.stage, status);
    }
    let maybe = plan.iter().filter(|e| e.stale_only_upstream()).count();
    let runs = plan.iter().filter(|e| e.status == PlanStatus::Run).count() - maybe;
    if maybe == 0 {
        println!("{runs} of {} stages will run", plan.len());
    } else {
        println!(
            "{runs} of {} stages will run; {maybe} more may run (each is kept if the upstream \
             outputs it reads come out unchanged)",
            plan.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_status(path: &Path, g: &Global) -> Result<ExitCode, Failure> {
    let p = load(path, g)?;
    let device = device(&p, g)?;
    let cache = cache_view(g);
    let stat = StatCache::load(cache.stat_cache_path());
    let engine = Engine::new(&p, &cache, &stat, device, g.out.clone());
    let plan = engine.plan(&Selection::default())?;
    for e in &plan {
        let state = if e.status == PlanStatus::Cached {
            "up to date"
        } else {
            "stale"
        };
        let first = e
            .reasons
            .first()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default();
        println!("{}: {state}{first}", e.stage);
    }
    let (n, bytes) = cache.object_totals();
    println!(
        "cache {}: {n} objects, {:.1} MiB",
        cache.root.display(),
        bytes as f64 / 1048576.0
    );
    Ok(ExitCode::SUCCESS)
}

fn cmd_graph(path: &Path, format: GraphFormat, g: &Global) -> Result<ExitCode, Failure> {
    let p = load(path, g)?;
    let mut edges: Vec<(usize, usize, String)> = Vec::new();
    for (i, st) in p.stages.iter().enumerate() {
        for (name, r) in &st.inputs {
            edges.push((r.stage, i, name.clone()));
        }
        for d in &st.datasets {
            if let spec::DatasetRoot::Stage { stage, .. } = &p.datasets[d].root {
                edges.push((*stage, i, format!("dataset {d}")));
            }
        }
    }
    let esc = |s: &str| s.replace('"', "'");
    match format {
        GraphFormat::Dot => {
            println!(
                "digraph \"{}\" {{\n  rankdir=LR;\n  node [shape=box];",
                esc(&p.name)
            );
            for &i in &p.order {
                let st = &p.stages[i];
                println!(
                    "  \"{}\" [label=\"{}\\n({})\"];",
                    esc(&st.name),
                    esc(&st.name),
                    st.kind.kind()
                );
            }
            for (a, b, l) in &edges {
                println!(
                    "  \"{}\" -> \"{}\" [label=\"{}\"];",
                    esc(&p.stages[*a].name),
                    esc(&p.stages[*b].name),
                    esc(l)
                );
            }
            println!("}}");
        }
        GraphFormat::Mermaid => {
            println!("flowchart LR");
            for &i in &p.order {
                let st = &p.stages[i];
                println!("  s{i}[\"{}<br/>({})\"]", esc(&st.name), st.kind.kind());
            }
            for (a, b, l) in &edges {
                println!("  s{a} -->|\"{}\"| s{b}", esc(l));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_show(path: &Path, stage: &str, json: bool, g: &Global) -> Result<ExitCode, Failure> {
    let p = load(path, g)?;
    let instances: Vec<&str> = p
        .stages
        .iter()
        .filter(|s| s.base == stage && s.name != stage)
        .map(|s| s.name.as_str())
        .collect();
    if !instances.is_empty() {
        return Err(Failure::msg(
            EXIT_USAGE,
            format!(
                "stage `{stage}` runs as {} instances; show one of them",
                instances.len()
            ),
            Some(format!(
                "e.g. `dag show {} '{}'`",
                path.display(),
                instances[0]
            )),
        ));
    }
    if !p.index.contains_key(stage) {
        return Err(Failure::msg(
            EXIT_USAGE,
            format!("pipeline `{}` has no stage `{stage}`", p.name),
            crate::diag::did_you_mean(stage, p.stages.iter().map(|s| s.name.as_str())),
        ));
    }
    let cache = cache_view(g);
    let Some(m) = cache
        .latest(&p.name, stage)
        .and_then(|k| cache.read_manifest(&k))
    else {
        return Err(Failure::msg(
            1,
            format!("stage `{stage}` has no run in {}", cache.root.display()),
            Some(format!("run `dag run {}` first", path.display())),
        ));
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&m).expect("manifest serializes")
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!("stage    {} ({})", m.stage, m.kind);
    println!("key      {}", m.key);
    if m.code.is_empty() {
        println!("code     none of dag's own (a change to dag never reruns it)");
    }
    for (name, digest) in &m.code {
        println!("code     {name} {}", &digest[..digest.len().min(12)]);
    }
    let seed = m
        .seed
        .map_or("none (not seeded)".to_string(), |s| s.to_string());
    println!("device   {}   seed {}", cache::device_name(m.device), seed);
    println!(
        "ran      {:.3} s (+{:.3} s publishing), finished at unix {:.0}",
        m.seconds, m.publish_seconds, m.finished_unix
    );
    println!(
        "params   {}",
        serde_json::to_string(&m.params).unwrap_or_default()
    );
    for (name, i) in &m.inputs {
        println!("input    {name} <- {} ({})", i.producer, &i.digest[..12]);
    }
    let out = std::path::absolute(&g.out).unwrap_or_else(|_| g.out.clone());
    for (name, t) in &m.outputs {
        println!(
            "output   {name}: {} ({} files, {} bytes)",
            out.join(&m.pipeline).join(&m.stage).join(name).display(),
            t.entries.len(),
            t.size()
        );
        println!("         cache: {}", cache.tree_path(&t.digest).display());
    }
    for (k, v) in &m.metrics {
        println!("metric   {k} = {v}");
    }
    if let Some(l) = &m.log {
        println!("log      {}", cache.object_path(l).display());
    }
    Ok(ExitCode::SUCCESS)
}

/// The report's view of a pipeline: its stages' states and outputs, from the cache only.
fn report_input(path: &Path, g: &Global) -> Result<dag_report::ReportInput, Failure> {
    let p = load(path, g)?;
    let device = device(&p, g)?;
    let cache = cache_view(g);
    let stat = StatCache::load(cache.stat_cache_path());
    let engine = Engine::new(&p, &cache, &stat, device, g.out.clone());
    Ok(crate::report::gather(&p, &engine, &cache)?)
}

fn report_failure(e: dag_report::ReportError) -> Failure {
    let hint = e.hint();
    Failure::msg(1, e.to_string(), Some(hint))
}

fn cmd_report(path: &Path, output: &Path, g: &Global) -> Result<ExitCode, Failure> {
    let input = report_input(path, g)?;
    let written = dag_report::write_report(&input, output).map_err(report_failure)?;
    for e in &written.problems {
        eprintln!(
            "warning: {e}
  hint: {}",
            e.hint()
        );
    }
    let not_run: Vec<&str> = input
        .stages
        .iter()
        .filter(|s| {
            matches!(
                s.state,
                dag_report::State::NotRun | dag_report::State::Failed
            )
        })
        .map(|s| s.name.as_str())
        .collect();
    if !g.quiet {
        println!(
            "wrote {} ({} charts and pictures)",
            written.index.display(),
            written.images
        );
        if !not_run.is_empty() {
            println!(
                "without a result: {} (run `dag run {}` to fill them in)",
                not_run.join(", "),
                path.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_metrics(path: &Path, format: MetricsFormat, g: &Global) -> Result<ExitCode, Failure> {
    let input = report_input(path, g)?;
    match dag_report::comparison(&input).map_err(report_failure)? {
        Some(c) => {
            print!("{}", c.render(format.into()));
            Ok(ExitCode::SUCCESS)
        }
        None => Err(Failure::msg(
            1,
            format!(
                "no model of pipeline `{}` is evaluated in {}",
                input.pipeline,
                input.cache.display()
            ),
            Some(format!(
                "run `dag run {}` first; `dag metrics` reads the results of its `compare` or                  `evaluate` stages",
                path.display()
            )),
        )),
    }
}

fn cmd_gc(keep_last: Option<usize>, dry_run: bool, g: &Global) -> Result<ExitCode, Failure> {
    let Some(cache) = Cache::open_existing(&g.cache) else {
        println!("no cache at {}", g.cache.display());
        return Ok(ExitCode::SUCCESS);
    };
    println!("{}", cache.gc(keep_last, dry_run)?);
    Ok(ExitCode::SUCCESS)
}

fn cmd_verify(pipeline: Option<&Path>, g: &Global) -> Result<ExitCode, Failure> {
    let Some(cache) = Cache::open_existing(&g.cache) else {
        println!("no cache at {}", g.cache.display());
        return Ok(ExitCode::SUCCESS);
    };
    // With a pipeline, only what the latest runs of its stages read and wrote.
    let scope: Option<Vec<String>> = match pipeline {
        None => None,
        Some(path) => {
            let p = load(path, g)?;
            Some(
                p.stages
                    .iter()
                    .filter_map(|s| cache.latest(&p.name, &s.name))
                    .collect(),
            )
        }
    };
    let report = cache.verify(scope.as_deref())?;
    for finding in &report.findings {
        println!("{finding}");
    }
    println!("{report}");
    if report.is_clean() {
        return Ok(ExitCode::SUCCESS);
    }
    if !report.dropped.is_empty() {
        println!("dropped the runs of: {}", report.dropped.join(", "));
    }
    println!("the next `dag run` rebuilds what is affected");
    Ok(ExitCode::from(1))
}

fn type_name(t: &ParamType) -> String {
    match t {
        ParamType::Bool => "bool".into(),
        ParamType::Int { min, max } => match (min, max) {
            (None, None) => "int".into(),
            _ => format!(
                "int in [{}, {}]",
                min.map(|m| m.to_string()).unwrap_or_else(|| "-inf".into()),
                max.map(|m| m.to_string()).unwrap_or_else(|| "inf".into())
            ),
        },
        ParamType::Float {
            min,
            max,
            min_exclusive,
        } => match (min, max) {
            (None, None) => "float".into(),
            _ => format!(
                "float in {}{}, {}]",
                if *min_exclusive { "(" } else { "[" },
                min.map(|m| m.to_string()).unwrap_or_else(|| "-inf".into()),
                max.map(|m| m.to_string()).unwrap_or_else(|| "inf".into())
            ),
        },
        ParamType::Str => "string".into(),
        ParamType::Enum(v) => v.join("|"),
        ParamType::Path => "path".into(),
        ParamType::Dataset => "dataset".into(),
        ParamType::List(i) => format!("list of {}", type_name(i)),
        ParamType::Tuple(ts) => format!(
            "[{}]",
            ts.iter().map(type_name).collect::<Vec<_>>().join(", ")
        ),
        ParamType::StrMap => "map of strings".into(),
    }
}

fn cmd_kinds() -> Result<ExitCode, Failure> {
    let r = registry();
    let mut out = std::io::stdout().lock();
    for name in r.kinds() {
        let k = r.get(name).expect("listed");
        let code = k.code();
        let built_from = if code.parts.is_empty() {
            "no code of dag's own".to_string()
        } else {
            let crates: Vec<&str> = code.parts.iter().map(|(n, _)| *n).collect();
            format!(
                "code {} of {}",
                &crate::key::code_digest(&code)[..12],
                crates.join(", ")
            )
        };
        let _ = writeln!(out, "{name} ({built_from})\n  {}", k.doc());
        for p in k.params() {
            let default = p
                .default
                .as_ref()
                .map(|d| format!(" = {d}"))
                .unwrap_or_else(|| " (required)".into());
            let _ = writeln!(
                out,
                "  param  {}: {}{default}\n         {}",
                p.name,
                type_name(&p.ty),
                p.doc
            );
        }
        for i in k.inputs() {
            let req = if i.required { "" } else { " (optional)" };
            let _ = writeln!(
                out,
                "  input  {}: {}{req}\n         {}",
                i.name, i.ty, i.doc
            );
        }
        let defaults: Params = Params(
            k.params()
                .into_iter()
                .filter_map(|p| p.default.map(|d| (p.name.to_string(), d)))
                .collect(),
        );
        if k.params().iter().all(|p| p.default.is_some()) {
            for o in k.outputs(&defaults) {
                let _ = writeln!(out, "  output {}: {}\n         {}", o.name, o.ty, o.doc);
            }
        }
        let _ = writeln!(out);
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_hash(paths: &[PathBuf]) -> Result<ExitCode, Failure> {
    for path in paths {
        let io = |e: std::io::Error| {
            Failure::msg(1, format!("cannot hash {}: {e}", path.display()), None)
        };
        let t0 = std::time::Instant::now();
        let is_file = fs::metadata(path).map_err(io)?.is_file();
        let files = crate::hash::list_files(path).map_err(io)?;
        let digests = crate::hash::hash_files(&files).map_err(io)?;
        let entries = files
            .iter()
            .zip(digests)
            .map(|(f, digest)| cache::TreeEntry {
                path: f.rel.clone(),
                digest,
                size: f.size,
                exec: f.exec,
            })
            .collect();
        let tree = cache::OutputTree::new("files", is_file, entries);
        let secs = t0.elapsed().as_secs_f64();
        println!(
            "{}  {}  {} bytes in {:.3} s ({:.2} GB/s)",
            tree.digest,
            path.display(),
            tree.size(),
            secs,
            tree.size() as f64 / secs.max(1e-9) / 1e9
        );
    }
    Ok(ExitCode::SUCCESS)
}
