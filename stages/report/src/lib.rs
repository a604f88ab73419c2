//! What `dag report` and `dag metrics` show: a pipeline's results read back from its artifacts.
//!
//! The engine describes each stage ([`StageInfo`]: kind, state, timings, the directories of its
//! current outputs); this crate knows what the stage kinds write (comparison tables, training
//! logs, entropy scores, pictures) and turns it into a self-contained HTML page with SVG charts
//! ([`write_report`]) or a table ([`comparison::comparison`]). It never runs a stage and never
//! writes outside the report directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

pub mod comparison;
mod page;
pub mod svg;

pub use comparison::{comparison, Comparison, Format};

/// Where a stage stands, for the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Up to date, and it ran in the last `dag run`.
    Ran,
    /// Up to date, reused from the cache.
    Cached,
    /// The last `dag run` failed in it; no current result.
    Failed,
    /// It has a result, but for other inputs or params: `dag run` would rerun it.
    Stale,
    /// No result at all.
    NotRun,
}

impl State {
    /// The word shown for the state.
    pub fn word(self) -> &'static str {
        match self {
            State::Ran => "ran",
            State::Cached => "cached",
            State::Failed => "failed",
            State::Stale => "stale",
            State::NotRun => "not run",
        }
    }
}

/// One stage as the engine sees it.
#[derive(Debug, Clone)]
pub struct StageInfo {
    pub name: String,
    pub kind: String,
    pub state: State,
    /// Indices (into [`ReportInput::stages`]) of the stages it reads from.
    pub upstream: Vec<usize>,
    /// Its params, every default filled in.
    pub params: Map<String, Value>,
    /// Seconds its shown run took (when it has one).
    pub seconds: Option<f64>,
    /// When its shown run finished, Unix seconds.
    pub finished_unix: Option<f64>,
    /// The metrics its shown run reported.
    pub metrics: Map<String, Value>,
    /// Output name -> readable directory of its shown run (the current one, or the stale one).
    pub outputs: BTreeMap<String, PathBuf>,
    /// Output name -> artifact type, as its kind declares them (whether or not it has run).
    pub output_types: BTreeMap<String, String>,
    /// Why it failed, or why it is stale.
    pub note: Option<String>,
}

/// Everything the report shows.
#[derive(Debug, Clone)]
pub struct ReportInput {
    pub pipeline: String,
    /// The pipeline file.
    pub file: PathBuf,
    /// The cache the results come from.
    pub cache: PathBuf,
    /// The device the keys were computed for.
    pub device: String,
    /// Stages in topological order.
    pub stages: Vec<StageInfo>,
}

/// Why a report could not be written, or a part of it not read.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {}: {reason}", path.display())]
    Read { path: PathBuf, reason: String },
}

impl ReportError {
    pub(crate) fn read(path: &Path, e: impl std::fmt::Display) -> Self {
        ReportError::Read {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }
    }

    pub(crate) fn column(path: &Path, name: &str, ty: &str) -> Self {
        ReportError::Read {
            path: path.to_path_buf(),
            reason: format!("column `{name}` is missing or not {ty}"),
        }
    }

    pub(crate) fn write(path: &Path, source: std::io::Error) -> Self {
        ReportError::Write {
            path: path.to_path_buf(),
            source,
        }
    }

    /// What to do about it.
    pub fn hint(&self) -> String {
        match self {
            ReportError::Write { .. } => {
                "choose another directory with -o, or check its permissions".into()
            }
            ReportError::Read { .. } => "the artifact was written by another version of dag or \
                 is damaged: `dag verify` checks the cache, `dag run --force <stage>` rewrites it"
                .into(),
        }
    }
}

/// What [`write_report`] produced.
#[derive(Debug)]
pub struct Written {
    /// The page.
    pub index: PathBuf,
    /// Charts and pictures referenced by the page.
    pub images: usize,
    /// Parts that could not be read; the page shows them in place of the missing part.
    pub problems: Vec<ReportError>,
}

/// Writes `index.html` with its charts (`charts/`) and pictures (`img/`) into `dir`, replacing an
/// earlier report there. Unreadable artifacts do not stop it: the page says what is missing and
/// why, and [`Written::problems`] lists them.
pub fn write_report(input: &ReportInput, dir: &Path) -> Result<Written, ReportError> {
    std::fs::create_dir_all(dir).map_err(|e| ReportError::write(dir, e))?;
    // Only the folders this function owns are cleared, so pictures of stages that no longer
    // exist do not linger, and nothing else in `dir` is touched.
    for sub in [page::CHARTS, page::IMAGES] {
        let p = dir.join(sub);
        if p.exists() {
            std::fs::remove_dir_all(&p).map_err(|e| ReportError::write(&p, e))?;
        }
        std::fs::create_dir_all(&p).map_err(|e| ReportError::write(&p, e))?;
    }
    let mut page = page::Page::new(dir);
    let html = page.render(input)?;
    let index = dir.join("index.html");
    std::fs::write(&index, html).map_err(|e| ReportError::write(&index, e))?;
    Ok(Written {
        index,
        images: page.images,
        problems: page.problems,
    })
}
