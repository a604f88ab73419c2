//! Device selection: `flex` (pure-Rust CPU), `wgpu`, `cuda`, `tch` (LibTorch on the CPU, in
//! builds with the `tch` feature), or `auto` (first GPU backend compiled into this build that
//! reaches a real card, else flex).

use burn::tensor::Device;

use crate::TrainError;

pub use dag_api::DeviceKind;

/// Resolves a pipeline's `device:` value. `flex`, `wgpu` and `cuda` are taken as asked when
/// compiled in (an absent backend is an error that says how to rebuild); `auto` probes the
/// compiled-in GPU backends, CUDA first, and falls back to flex.
pub fn resolve_device(requested: &str) -> Result<DeviceKind, String> {
    match requested {
        "flex" => Ok(DeviceKind::Flex),
        "wgpu" if cfg!(feature = "wgpu") => Ok(DeviceKind::Wgpu),
        "cuda" if cfg!(feature = "cuda") => Ok(DeviceKind::Cuda),
        "tch" if cfg!(feature = "tch") => Ok(DeviceKind::LibTorch),
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
fn auto() -> DeviceKind {
    static CHOICE: std::sync::OnceLock<DeviceKind> = std::sync::OnceLock::new();
    *CHOICE.get_or_init(|| {
        if cuda_available() {
            DeviceKind::Cuda
        } else if wgpu_available() {
            DeviceKind::Wgpu
        } else {
            DeviceKind::Flex
        }
    })
}

/// The Burn device of a resolved choice (without autodiff). GPU devices are remembered for
/// [`wait_for_device_work`].
pub fn device_for(choice: DeviceKind) -> Device {
    let device = open(choice);
    if choice != DeviceKind::Flex && choice != DeviceKind::LibTorch {
        let mut opened = OPENED_GPUS.lock().unwrap_or_else(|e| e.into_inner());
        if !opened.contains(&device) {
            opened.push(device.clone());
        }
    }
    device
}

/// The GPU devices [`device_for`] has handed out in this process.
static OPENED_GPUS: std::sync::Mutex<Vec<Device>> = std::sync::Mutex::new(Vec::new());

/// Waits until every GPU device opened through [`device_for`] has finished the work queued on
/// it. Call it once the tensors of a unit of work are dropped, and always before the process
/// ends.
///
/// Burn's GPU runtimes keep each device in a process-wide static, execute queued operations
/// (dropping a tensor queues some too) on a runner thread of their own, and are never shut
/// down. A process that exits while that thread still works runs the driver's exit handlers
/// under it: with Mesa's lavapipe, the queue thread was compiling a kernel with LLVM while
/// `exit` tore down lavapipe's threads and LLVM's globals, and the process died with SIGSEGV
/// or "corrupted size vs. prev_size" after every test had passed (RELIABILITY.md, "GPU").
pub fn wait_for_device_work() -> Result<(), TrainError> {
    let opened = OPENED_GPUS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    for device in opened {
        device.sync().map_err(|e| TrainError::Device {
            device: format!("{device:?}"),
            message: e.to_string(),
        })?;
    }
    Ok(())
}

fn open(choice: DeviceKind) -> Device {
    match choice {
        DeviceKind::Flex => Device::flex(),
        #[cfg(feature = "wgpu")]
        DeviceKind::Wgpu => Device::wgpu(Default::default()),
        #[cfg(feature = "cuda")]
        DeviceKind::Cuda => Device::cuda(0),
        // Burn marks burn-tch deprecated in favour of its CubeCL backends, but on a CPU it is
        // the backend with PyTorch's own kernels, which is what `device: tch` is for.
        #[cfg(feature = "tch")]
        #[allow(deprecated)]
        DeviceKind::LibTorch => Device::libtorch(),
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
