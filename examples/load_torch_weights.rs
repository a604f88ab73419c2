//! Loads ImageNet weights from a PyTorch `.pth` into the DeepLabV2 backbone or a MiT encoder
//! and reports what was applied:
//!
//!     cargo run --release --example load_torch_weights -- FILE.pth --depth 101 [--width 1.0] \
//!         [--resnet caffe|v1c]
//!     cargo run --release --example load_torch_weights -- mit_b5.pth --arch mit_b5
//!
//! `--resnet v1c` checks mmcv's ResNet-V1c weights (`open-mmlab://resnet101_v1c`) for DAFormer's
//! DeepLabV2; the default checks ADVENT's (or torchvision's) against the Caffe ResNet.
//! `--arch mit_b0` ... `mit_b5` checks SegFormer's ImageNet weights for the DAFormer family's
//! encoder (`--depth`, `--width` and `--resnet` do not apply).
//!
//! Prints `applied N, missing M, unused U` (then the missing and unused tensor names) and exits
//! with status 1 if any backbone tensor is missing, 2 on any other error.

use std::path::PathBuf;
use std::process::ExitCode;

use burn::tensor::Device;
use dag_model::{
    load_imagenet_backbone, load_mit_weights, DeepLabV2Config, LoadReport, MitConfig, ModelError,
    ResNetStyle,
};

struct Args {
    file: PathBuf,
    depth: usize,
    width: f64,
    resnet: ResNetStyle,
    /// A MiT variant (`mit_b0` ... `mit_b5`) instead of the ResNet.
    mit: Option<MitConfig>,
}

fn parse() -> Result<Args, String> {
    let mut file = None;
    let mut depth = 101;
    let mut width = 1.0;
    let mut resnet = ResNetStyle::Caffe;
    let mut mit = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--depth" => {
                depth = value("--depth")?
                    .parse()
                    .map_err(|e| format!("--depth: {e}"))?
            }
            "--width" => {
                width = value("--width")?
                    .parse()
                    .map_err(|e| format!("--width: {e}"))?
            }
            "--resnet" => {
                let name = value("--resnet")?;
                resnet = ResNetStyle::from_name(&name)
                    .ok_or(format!("--resnet: `{name}` is not caffe or v1c"))?
            }
            "--arch" => {
                let name = value("--arch")?;
                mit = Some(MitConfig::from_name(&name).map_err(|e| format!("--arch: {e}"))?)
            }
            "-h" | "--help" => return Err(String::new()),
            _ if arg.starts_with('-') => return Err(format!("unknown option {arg}")),
            _ if file.is_none() => file = Some(PathBuf::from(arg)),
            _ => return Err(format!("unexpected argument {arg}")),
        }
    }
    Ok(Args {
        file: file.ok_or("missing FILE.pth")?,
        depth,
        width,
        resnet,
        mit,
    })
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("error: {e}");
            }
            eprintln!(
                "usage: load_torch_weights FILE.pth [--depth 101|50|26|14] [--width 1.0] \
                 [--resnet caffe|v1c] | --arch mit_b0..mit_b5"
            );
            return ExitCode::from(2);
        }
    };
    let device = Device::flex();
    let loaded = match &args.mit {
        Some(mit) => mit
            .init(&device)
            .and_then(|encoder| load_mit_weights(encoder, &args.file, true))
            .map(|(_, report)| report),
        None => load_resnet(&args, &device),
    };
    match loaded {
        Ok(report) => {
            println!("{}", report.summary());
            for m in &report.missing {
                println!("missing: {m}");
            }
            for u in &report.unused {
                println!("unused: {u}");
            }
            if report.missing.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

// Partial loads are allowed here only to be able to report them; a missing tensor still makes
// the exit status non-zero.
fn load_resnet(args: &Args, device: &Device) -> Result<LoadReport, ModelError> {
    let config = DeepLabV2Config::new(args.depth, 19)?;
    let config = DeepLabV2Config {
        resnet: args.resnet,
        ..config
    }
    .with_width(args.width);
    let model = config.init(device)?;
    load_imagenet_backbone(model.backbone, &args.file, true).map(|(_, report)| report)
}
