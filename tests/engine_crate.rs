//! The engine is its own crate and links no tensor crate: `cargo tree` of dag-engine (normal and
//! build dependencies) names no Burn, CubeCL, GEMM or Parquet crate, so its tests build without
//! them.

use std::process::Command;

#[test]
fn the_engine_links_no_tensor_crate() {
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "--manifest-path",
            manifest,
            "-p",
            "dag-engine",
            "-e",
            "normal,build",
            "--prefix",
            "none",
            "--offline",
        ])
        .output()
        .expect("cargo tree runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{}",
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.lines().any(|l| l.starts_with("dag-api ")), "{text}");
    let heavy: Vec<&str> = text
        .lines()
        .filter(|l| {
            [
                "burn",
                "cubecl",
                "gemm",
                "parquet",
                "arrow",
                "dag-stages",
                "dag-report",
            ]
            .iter()
            .any(|p| l.starts_with(p))
        })
        .collect();
    assert!(heavy.is_empty(), "dag-engine depends on {heavy:?}");
}
