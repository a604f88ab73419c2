//! A command-line front to the data library, for benchmarks and for looking at data by hand:
//!
//! ```text
//! datatool synth <out_dir> <width> <height> <source_images> <target_train> <target_val> [seed]
//! datatool prep <format> <root> <split> <classes> <width> <height> <out_dir>
//! ```
//!
//! `synth` writes `<out_dir>/source` and `<out_dir>/target`; `prep` prints one JSON line with the
//! number of images, the seconds and the images per second.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use dag_data::{generate, preprocess, PreprocessConfig, Protocol, SynthConfig};

fn arg<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> Result<T, String> {
    args.get(i)
        .ok_or_else(|| format!("missing <{what}>"))?
        .parse()
        .map_err(|_| format!("invalid <{what}>: {}", args[i]))
}

fn run(args: &[String]) -> Result<(), String> {
    match args.first().map(String::as_str) {
        Some("synth") => {
            let out = PathBuf::from(arg::<String>(args, 1, "out_dir")?);
            let cfg = SynthConfig {
                width: arg(args, 2, "width")?,
                height: arg(args, 3, "height")?,
                source_images: arg(args, 4, "source_images")?,
                target_train: arg(args, 5, "target_train")?,
                target_val: arg(args, 6, "target_val")?,
                seed: if args.len() > 7 {
                    arg(args, 7, "seed")?
                } else {
                    0
                },
            };
            let start = Instant::now();
            let report = generate(
                &cfg,
                &out.join("source"),
                &out.join("target"),
                &|_, _| {},
                &|| false,
            )
            .map_err(|e| e.to_string())?;
            println!(
                "{{\"images\": {}, \"seconds\": {:.3}, \"mean_difficulty\": {:.4}}}",
                report.source_images + report.target_train + report.target_val,
                start.elapsed().as_secs_f64(),
                report.mean_difficulty
            );
            Ok(())
        }
        Some("prep") => {
            let classes: u32 = arg(args, 4, "classes")?;
            let cfg = PreprocessConfig {
                format: arg::<String>(args, 1, "format")?
                    .parse()
                    .map_err(|e| format!("{e}"))?,
                root: PathBuf::from(arg::<String>(args, 2, "root")?),
                split: arg(args, 3, "split")?,
                list: None,
                protocol: Protocol::from_classes(classes).map_err(|e| e.to_string())?,
                width: arg(args, 5, "width")?,
                height: arg(args, 6, "height")?,
                keep_full_labels: false,
                allow_skip: false,
                shard_images: 256,
            };
            let out = PathBuf::from(arg::<String>(args, 7, "out_dir")?);
            let start = Instant::now();
            let report =
                preprocess(&cfg, &out, &|_, _| {}, &|| false).map_err(|e| e.to_string())?;
            let secs = start.elapsed().as_secs_f64();
            println!(
                "{{\"images\": {}, \"seconds\": {secs:.3}, \"images_per_s\": {:.2}, \"threads\": {}}}",
                report.images,
                report.images as f64 / secs,
                rayon::current_num_threads()
            );
            Ok(())
        }
        _ => Err(
            "usage: datatool synth <out_dir> <width> <height> <source_images> <target_train> \
                  <target_val> [seed] | datatool prep <format> <root> <split> <classes> <width> \
                  <height> <out_dir>"
                .into(),
        ),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("datatool: {e}");
            ExitCode::FAILURE
        }
    }
}
