//! What the network kinds share: the device, and opening dataset and model inputs.

use burn::tensor::Device;
use dag_api::{StageContext, StageError};
use dag_artifacts::files::data_error;
use dag_data::{Dataset, Protocol};
use dag_model::{ModelDescription, Segmenter};

/// The Burn device of the stage's resolved device kind.
pub(crate) fn device(ctx: &StageContext<'_>) -> Result<Device, StageError> {
    // Refuses a kind this build lacks with the message that says how to rebuild.
    let kind = dag_train::resolve_device(ctx.device.name()).map_err(StageError::new)?;
    Ok(dag_train::device_for(kind))
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
) -> Result<(Segmenter, ModelDescription), StageError> {
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

/// Refuses a model that cannot infer on the images of `ds` (HRDA's sides must be multiples of
/// its context's logit cell).
pub(crate) fn check_model_input(
    model: &Segmenter,
    ds: &Dataset,
    what: &str,
) -> Result<(), StageError> {
    let (w, h) = ds.size();
    model
        .check_input([h as usize, w as usize], false)
        .map_err(|e| {
            StageError::new(format!("{what}: {e}"))
                .with_hint("set `size` on the data's preprocess stage")
        })
}

/// Refuses a model whose class count differs from the data's.
pub(crate) fn check_classes(
    desc: &ModelDescription,
    protocol: Protocol,
    what: &str,
) -> Result<(), StageError> {
    let classes = protocol.num_classes();
    if desc.arch.classes() != classes {
        return Err(StageError::new(format!(
            "the model predicts {} classes but {what} uses the {}-class protocol",
            desc.arch.classes(),
            classes
        ))
        .with_hint("give both datasets the same `classes:` in the pipeline's `datasets:`"));
    }
    Ok(())
}
