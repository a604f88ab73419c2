//! Reading and writing artifact files, with errors that name the file and say what to do.

use std::path::{Path, PathBuf};

use dag_api::StageError;
use dag_data::{Column, DataError, Table};

/// Turns a data-library error into a stage error that keeps its file and a hint.
pub fn data_error(e: DataError) -> StageError {
    if matches!(e, DataError::Cancelled) {
        return StageError::cancelled();
    }
    let hint = match &e {
        DataError::MissingRoot { .. } => {
            Some("fix `root:` of the dataset in the pipeline's `datasets:` section")
        }
        DataError::Decode { .. } | DataError::Unpaired { .. } | DataError::SizeMismatch { .. } => {
            Some("fix or remove the file, or set `allow_skip: true` to skip such samples")
        }
        DataError::ListEntry { .. } => Some("fix the list file named by `list:`"),
        DataError::UnknownProtocol(_) => Some("set `classes:` of the dataset to 19, 16 or 13"),
        DataError::UnknownFormat(_) => {
            Some("set `format:` of the dataset to cityscapes, gta5 or synthia")
        }
        _ => None,
    };
    let path = e.path().map(|p| p.to_path_buf());
    let mut err = StageError::from(e);
    if let Some(h) = hint {
        err = err.with_hint(h);
    }
    if let Some(p) = path {
        err = err.with_path(p);
    }
    err
}

/// Reads a parquet table of an input artifact.
pub fn read_table(dir: &Path, file: &str) -> Result<Table, StageError> {
    let path = dir.join(file);
    Table::read_parquet(&path).map_err(|e| data_error(e).with_path(path))
}

/// A string column, or an error naming the file.
pub fn str_column<'a>(t: &'a Table, name: &str, file: &Path) -> Result<&'a [String], StageError> {
    match t.column(name) {
        Some(Column::Str(v)) => Ok(v),
        _ => Err(bad_column(name, "text", file)),
    }
}

/// A float column (f64 or f32), or an error naming the file.
pub fn f64_column(t: &Table, name: &str, file: &Path) -> Result<Vec<f64>, StageError> {
    match t.column(name) {
        Some(Column::F64(v)) => Ok(v.clone()),
        Some(Column::F32(v)) => Ok(v.iter().map(|&x| f64::from(x)).collect()),
        _ => Err(bad_column(name, "float", file)),
    }
}

/// A u32 column, or an error naming the file.
pub fn u32_column<'a>(t: &'a Table, name: &str, file: &Path) -> Result<&'a [u32], StageError> {
    match t.column(name) {
        Some(Column::U32(v)) => Ok(v),
        _ => Err(bad_column(name, "u32", file)),
    }
}

fn bad_column(name: &str, ty: &str, file: &Path) -> StageError {
    StageError::new(format!("column `{name}` is missing or not {ty}"))
        .with_path(file.to_path_buf())
        .with_hint("the table was not written by this version of dag; rerun its producer")
}

/// Creates the parent directories of `path`.
pub fn create_parent(path: &Path) -> Result<(), StageError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| StageError::from(e).with_path(dir.to_path_buf()))?;
    }
    Ok(())
}

/// Writes `value` as pretty JSON.
pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), StageError> {
    let bytes = serde_json::to_vec_pretty(value)?;
    std::fs::write(path, bytes).map_err(|e| StageError::from(e).with_path(path.to_path_buf()))
}

/// `dir/<relative>` for an image id that is a relative path (`city/name.png`), refusing ids that
/// would escape `dir`.
pub fn safe_join(dir: &Path, relative: &str) -> Result<PathBuf, StageError> {
    let rel = Path::new(relative);
    let ok = rel
        .components()
        .all(|c| matches!(c, std::path::Component::Normal(_)));
    if !ok || relative.is_empty() {
        return Err(StageError::new(format!(
            "image id `{relative}` is not a plain relative path"
        )));
    }
    Ok(dir.join(rel))
}

/// Reads an 8-bit class-id PNG (pseudo-labels) as is.
pub fn read_class_png(path: &Path) -> Result<(u32, u32, Vec<u8>), StageError> {
    let identity = dag_data::protocol::LabelLut(std::array::from_fn(|i| i as u8));
    let img = dag_data::pngio::read_label(path, dag_data::pngio::LabelEncoding::Ids, &identity)
        .map_err(|e| data_error(e).with_path(path.to_path_buf()))?;
    Ok((img.width, img.height, img.data))
}
