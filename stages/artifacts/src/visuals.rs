//! The index of the pictures that `score_entropy` and `evaluate` write for people and for
//! `dag report`.

use std::collections::BTreeMap;
use std::path::Path;

use dag_api::StageError;
use serde::{Deserialize, Serialize};

use crate::files::write_json;

/// The index of the pictures of one output directory.
pub const VISUALS_FILE: &str = "visuals.json";

/// One pictured image, as listed in `visuals.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Visual {
    /// Which set it belongs to: `easiest`, `hardest` (score_entropy) or `samples` (evaluate).
    pub group: String,
    /// The image's id in its dataset.
    pub path: String,
    /// Its position in the entropy ranking (0 = most confident), when ranked.
    #[serde(default)]
    pub rank: Option<u32>,
    /// Its entropy score, when scored.
    #[serde(default)]
    pub score: Option<f64>,
    /// Picture name (`image`, `ground_truth`, `prediction`, `entropy`, `overlay`) -> file,
    /// relative to the directory holding `visuals.json`.
    pub files: BTreeMap<String, String>,
}

/// Writes `visuals.json` into `dir`.
pub fn write_index(dir: &Path, visuals: &[Visual]) -> Result<(), StageError> {
    write_json(
        &dir.join(VISUALS_FILE),
        &serde_json::json!({ "visuals": visuals }),
    )
}

/// Reads the `visuals.json` of `dir` (none: an empty list, for outputs of older versions).
pub fn read_index(dir: &Path) -> Result<Vec<Visual>, StageError> {
    let path = dir.join(VISUALS_FILE);
    if !path.is_file() {
        return Ok(Vec::new());
    }
    let bytes = std::fs::read(&path).map_err(|e| StageError::from(e).with_path(path.clone()))?;
    #[derive(Deserialize)]
    struct Index {
        visuals: Vec<Visual>,
    }
    let index: Index =
        serde_json::from_slice(&bytes).map_err(|e| StageError::from(e).with_path(path))?;
    Ok(index.visuals)
}
