//! What several stage kinds share: the device, opening dataset and model inputs, parquet
//! column helpers, and turning library errors into stage errors with a hint.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use dag_api::{StageContext, StageError};
use dag_data::{Column, Dataset, Protocol, Table};
use dag_model::{DeepLabV2, ModelDescription};

use crate::preprocess::data_error;

/// The Burn device of the stage's resolved device kind.
pub(crate) fn device(ctx: &StageContext<'_>) -> Result<Device, StageError> {
    let choice = dag_train::resolve_device(ctx.device).map_err(StageError::new)?;
    Ok(dag_train::device_for(choice))
}

/// Opens a preprocessed dataset input.
pub(crate) fn open_dataset(ctx: &StageContext<'_>, input: &str) -> Result<Dataset, StageError> {
    let art = ctx.input(input)?;
    let ds = Dataset::open(&art.path).map_err(data_error)?;
    if ds.is_empty() {
        return Err(StageError::new(format!(
            "input `{input}` ({}) holds no images",
            art.producer
        ))
        .with_hint("check the dataset's root, split and list file"));
    }
    Ok(ds)
}

/// The label protocol of a preprocessed dataset.
pub(crate) fn protocol(ds: &Dataset) -> Result<Protocol, StageError> {
    ds.meta().protocol().map_err(data_error)
}

/// Loads a model input on `device`.
pub(crate) fn load_model_input(
    ctx: &StageContext<'_>,
    input: &str,
    device: &Device,
) -> Result<(DeepLabV2, ModelDescription), StageError> {
    let art = ctx.input(input)?;
    dag_model::load_model(&art.path, device).map_err(|e| {
        StageError::from(e)
            .with_path(art.path.clone())
            .with_hint(format!(
                "input `{input}` comes from `{}`; rerun it with `--force`",
                art.producer
            ))
    })
}

/// Refuses a model whose class count differs from the data's.
pub(crate) fn check_classes(
    desc: &ModelDescription,
    protocol: Protocol,
    what: &str,
) -> Result<(), StageError> {
    let classes = protocol.num_classes();
    if desc.config.classes != classes {
        return Err(StageError::new(format!(
            "the model predicts {} classes but {what} uses the {}-class protocol",
            desc.config.classes, classes
        ))
        .with_hint("give both datasets the same `classes:` in the pipeline's `datasets:`"));
    }
    Ok(())
}

/// Reads a parquet table of an input artifact.
pub(crate) fn read_table(dir: &Path, file: &str) -> Result<Table, StageError> {
    let path = dir.join(file);
    Table::read_parquet(&path).map_err(|e| data_error(e).with_path(path))
}

/// A string column, or an error naming the file.
pub(crate) fn str_column<'a>(
    t: &'a Table,
    name: &str,
    file: &Path,
) -> Result<&'a [String], StageError> {
    match t.column(name) {
        Some(Column::Str(v)) => Ok(v),
        _ => Err(bad_column(name, "text", file)),
    }
}

/// A float column (f64 or f32), or an error naming the file.
pub(crate) fn f64_column(t: &Table, name: &str, file: &Path) -> Result<Vec<f64>, StageError> {
    match t.column(name) {
        Some(Column::F64(v)) => Ok(v.clone()),
        Some(Column::F32(v)) => Ok(v.iter().map(|&x| f64::from(x)).collect()),
        _ => Err(bad_column(name, "float", file)),
    }
}

/// A u32 column, or an error naming the file.
pub(crate) fn u32_column<'a>(
    t: &'a Table,
    name: &str,
    file: &Path,
) -> Result<&'a [u32], StageError> {
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
pub(crate) fn create_parent(path: &Path) -> Result<(), StageError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| StageError::from(e).with_path(dir.to_path_buf()))?;
    }
    Ok(())
}

/// Writes `value` as pretty JSON.
pub(crate) fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), StageError> {
    let bytes = serde_json::to_vec_pretty(value)?;
    std::fs::write(path, bytes).map_err(|e| StageError::from(e).with_path(path.to_path_buf()))
}

/// `dir/<relative>` for an image id that is a relative path (`city/name.png`), refusing ids that
/// would escape `dir`.
pub(crate) fn safe_join(dir: &Path, relative: &str) -> Result<PathBuf, StageError> {
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
pub(crate) fn read_class_png(path: &Path) -> Result<(u32, u32, Vec<u8>), StageError> {
    let identity = dag_data::protocol::LabelLut(std::array::from_fn(|i| i as u8));
    let img = dag_data::pngio::read_label(path, dag_data::pngio::LabelEncoding::Ids, &identity)
        .map_err(|e| data_error(e).with_path(path.to_path_buf()))?;
    Ok((img.width, img.height, img.data))
}
