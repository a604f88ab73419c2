//! Device selection: `flex` (pure-Rust CPU), `wgpu`, `cuda`, `tch` (LibTorch on the CPU, in
//! builds with the `tch` feature), or `auto` (first GPU backend compiled into this build that
//! reaches a real card, else flex).

use burn::tensor::Device;

/// A resolved device kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// Burn's pure-Rust CPU backend.
    Flex,
    /// WGPU (Vulkan, Metal, DX12, or a software adapter such as lavapipe).
    Wgpu,
    /// CUDA, device 0.
    Cuda,
    /// LibTorch on the CPU, linked against an installed PyTorch (the `tch` feature).
    LibTorch,
}

impl DeviceChoice {
    /// The name used in pipeline files and cache keys.
    pub fn name(self) -> &'static str {
        match self {
            DeviceChoice::Flex => "flex",
            DeviceChoice::Wgpu => "wgpu",
            DeviceChoice::Cuda => "cuda",
            DeviceChoice::LibTorch => "tch",
        }
    }
}

/// Resolves a pipeline's `device:` value. `flex`, `wgpu` and `cuda` are taken as asked when
/// compiled in (an absent backend is an error that says how to rebuild); `auto` probes the
/// compiled-in GPU backends, CUDA first, and falls back to flex.
pub fn resolve_device(requested: &str) -> Result<DeviceChoice, String> {
    match requested {
        "flex" => Ok(DeviceChoice::Flex),
        "wgpu" if cfg!(feature = "wgpu") => Ok(DeviceChoice::Wgpu),
        "cuda" if cfg!(feature = "cuda") => Ok(DeviceChoice::Cuda),
        "tch" if cfg!(feature = "tch") => Ok(DeviceChoice::LibTorch),
        "tch" => Err(
            "this dag was built without the `tch` (LibTorch) backend; see \
             bench/libtorch/README.md for the build, or use `device: flex`"
                .to_string(),
        ),
        "wgpu" | "cuda" => Err(format!(
            "this dag was built without the `{requested}` backend; rebuild with \
             `cargo build --release --features {requested}` or use `device: flex`"
        )),
        "auto" => Ok(auto()),
        other => Err(format!(
            "unknown device `{other}`; expected auto, flex, wgpu, cuda or tch"
        )),
    }
}

/// The first GPU backend with a real card, else flex. Probed once per process: opening the
/// backends is slow and the Vulkan loader may print warnings each time.
fn auto() -> DeviceChoice {
    static CHOICE: std::sync::OnceLock<DeviceChoice> = std::sync::OnceLock::new();
    *CHOICE.get_or_init(|| {
        if cuda_available() {
            DeviceChoice::Cuda
        } else if wgpu_available() {
            DeviceChoice::Wgpu
        } else {
            DeviceChoice::Flex
        }
    })
}

/// The Burn device of a resolved choice (without autodiff).
pub fn device_for(choice: DeviceChoice) -> Device {
    match choice {
        DeviceChoice::Flex => Device::flex(),
        #[cfg(feature = "wgpu")]
        DeviceChoice::Wgpu => Device::wgpu(Default::default()),
        #[cfg(feature = "cuda")]
        DeviceChoice::Cuda => Device::cuda(0),
        // Burn marks burn-tch deprecated in favour of its CubeCL backends, but on a CPU it is
        // the backend with PyTorch's own kernels, which is what `device: tch` is for.
        #[cfg(feature = "tch")]
        #[allow(deprecated)]
        DeviceChoice::LibTorch => Device::libtorch(),
        #[allow(unreachable_patterns)]
        other => panic!(
            "device `{}` is not compiled into this build; resolve_device refuses it",
            other.name()
        ),
    }
}

/// Whether a CUDA device can be opened: enumerating needs the driver, which is the cheap part
/// of the probe. Backend initialisation may panic without a driver; that means "no".
fn cuda_available() -> bool {
    #[cfg(feature = "cuda")]
    {
        use burn::tensor::DeviceType;
        std::panic::catch_unwind(|| !Device::enumerate(DeviceType::Cuda).is_empty())
            .unwrap_or(false)
    }
    #[cfg(not(feature = "cuda"))]
    false
}

/// Whether wgpu finds an adapter on a real card. Software adapters (Mesa's lavapipe, which
/// CI installs for the WGPU test) report no card and are skipped: on a CPU, flex is faster.
/// `device: wgpu` still uses them when asked for explicitly.
fn wgpu_available() -> bool {
    #[cfg(feature = "wgpu")]
    {
        use burn::tensor::DeviceType;
        std::panic::catch_unwind(|| {
            Device::enumerate(DeviceType::Wgpu)
                .into_iter()
                .any(|d| d.identity().is_some_and(|id| id.physical.is_some()))
        })
        .unwrap_or(false)
    }
    #[cfg(not(feature = "wgpu"))]
    false
}
