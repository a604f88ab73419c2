//! The stage kinds of `dag`: thin adapters from (params, input artifacts) to output artifacts,
//! calling the model, data, training and metrics libraries. The engine reaches them only through
//! [`register_all`] and the [`dag_api::Stage`] trait.

use dag_api::Registry;

/// Adds every stage kind of this crate to `registry`.
pub fn register_all(registry: &mut Registry) {
    let _ = registry;
}

/// Resolves the pipeline's `device:` (`auto`, `flex`, `wgpu`, `cuda`) to the device kind that
/// will actually run, or explains why the requested one is not available in this build.
pub fn resolve_device(requested: &str) -> Result<String, String> {
    match requested {
        "flex" => Ok("flex".into()),
        "wgpu" if cfg!(feature = "wgpu") => Ok("wgpu".into()),
        "cuda" if cfg!(feature = "cuda") => Ok("cuda".into()),
        "wgpu" | "cuda" => Err(format!(
            "this dag was built without the `{requested}` backend; rebuild with `cargo build --release --features {requested}`"
        )),
        "auto" => Ok(if cfg!(feature = "cuda") {
            "cuda".into()
        } else if cfg!(feature = "wgpu") {
            "wgpu".into()
        } else {
            "flex".into()
        }),
        other => Err(format!("unknown device `{other}`; expected auto, flex, wgpu or cuda")),
    }
}
