//! Loads ImageNet weights from a PyTorch `.pth` into the DeepLabV2 backbone and reports what
//! was applied:
//!
//!     cargo run --release --example load_torch_weights -- FILE.pth --depth 101 [--width 1.0] \
//!         [--resnet caffe|v1c]
//!
//! `--resnet v1c` checks mmcv's ResNet-V1c weights (`open-mmlab://resnet101_v1c`) for DAFormer's
//! DeepLabV2; the default checks ADVENT's (or torchvision's) against the Caffe ResNet.
//!
//! Prints `applied N, missing M, unused U` (then the missing and unused tensor names) and exits
//! with status 1 if any backbone tensor is missing, 2 on any other error.

use std::path::PathBuf;
use std::process::ExitCode;

use burn::tensor::Device;
use dag_model::{load_imagenet_backbone, DeepLabV2Config, ResNetStyle};

struct Args {
    file: PathBuf,
    depth: usize,
    width: f64,
    resnet: ResNetStyle,
}

fn parse() -> Result<Args, String> {
    let mut file = None;
    let mut depth = 101;
    let mut width = 1.0;
    let mut resnet = ResNetStyle::Caffe;
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
                 [--resnet caffe|v1c]"
            );
            return ExitCode::from(2);
        }
    };
    let config = match DeepLabV2Config::new(args.depth, 19) {
        Ok(mut c) => {
            c.resnet = args.resnet;
            c.with_width(args.width)
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let device = Device::flex();
    let model = match config.init(&device) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    // Partial loads are allowed here only to be able to report them; a missing tensor still
    // makes the exit status non-zero.
    match load_imagenet_backbone(model.backbone, &args.file, true) {
        Ok((_, report)) => {
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
