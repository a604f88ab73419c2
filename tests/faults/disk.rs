//! A full disk (a size-limited tmpfs) and a read-only cache or output directory (a read-only
//! bind mount: root ignores permission bits): a clear error naming the path, nothing partial
//! published, no damaged manifest, and a clean run once the space is back.
//!
//! Mounting needs root (CI runs as root); elsewhere these tests say SKIPPED and pass.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::*;

const LIMIT: Duration = Duration::from_secs(120);

/// A mount that is undone when dropped, even when the test fails.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn mount(args: &[&str], dir: &Path) -> Option<Mount> {
    std::fs::create_dir_all(dir).unwrap();
    let out = Command::new("mount").args(args).arg(dir).output().ok()?;
    if out.status.success() {
        Some(Mount(dir.to_path_buf()))
    } else {
        eprintln!(
            "SKIPPED: cannot mount ({}); run as root to test full disks and read-only mounts",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        None
    }
}

fn tmpfs(dir: &Path, size: &str) -> Option<Mount> {
    mount(
        &["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"],
        dir,
    )
}

fn read_only_bind(dir: &Path) -> Option<Mount> {
    let m = mount(&["--bind", &dir.display().to_string()], dir)?;
    let out = Command::new("mount")
        .args(["-o", "remount,bind,ro"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    Some(m)
}

const FILL: &str = r#"
name: fill
stages:
  small: { kind: shell, params: { cmd: "echo ok > s.txt", outs: [s.txt] } }
  big:   { kind: shell, params: { cmd: "head -c 3000000 /dev/zero > big.bin", deps: [s.txt], outs: [big.bin] } }
"#;

fn assert_nothing_partial(ws: &Ws, pipeline: &str, stage: &str) {
    assert!(
        !ws.path(&format!("out/{pipeline}/{stage}")).exists(),
        "{stage} was published"
    );
    assert!(!ws
        .path(&format!("cache/latest/{pipeline}/{stage}"))
        .exists());
    let out = output_within(ws.cmd(&["verify"]), LIMIT);
    assert!(
        out.status.success(),
        "the cache is damaged:\n{}",
        text(&out)
    );
}

#[test]
fn a_full_disk_fails_the_stage_cleanly_and_the_run_recovers() {
    let ws = Ws::new(FILL, &[]);
    let Some(_m) = tmpfs(&ws.path("cache"), "1m") else {
        return;
    };
    let out = output_within(ws.cmd(&["run", "pipeline.yaml"]), LIMIT);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("stage `big` failed"), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert_eq!(with_outcome(&out, "ran"), ["small"]);
    assert_eq!(ws.manifests(), 1);
    assert_nothing_partial(&ws, "fill", "big");
    // Space back: the failed stage runs, the other stays cached.
    let out = Command::new("mount")
        .args(["-o", "remount,size=16m"])
        .arg(ws.path("cache"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let out = output_within(ws.cmd(&["run", "pipeline.yaml"]), LIMIT);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(with_outcome(&out, "ran"), ["big"]);
}

/// A real stage kind running out of space names the file it could not write.
#[test]
fn a_full_disk_in_a_real_stage_names_the_file() {
    let ws = Ws::new(TINY, &[]);
    let Some(_m) = tmpfs(&ws.path("cache"), "300k") else {
        return;
    };
    let out = output_within(ws.cmd(&["run", "pipeline.yaml", "--until", "synth"]), LIMIT);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("stage `synth` failed"), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert!(
        err.contains(&ws.path("cache").display().to_string()),
        "no path named: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(ws.manifests(), 0);
    assert_nothing_partial(&ws, "tiny", "synth");
}

#[test]
fn a_read_only_cache_or_output_directory_is_a_clear_error() {
    let ws = Ws::new(FILL, &[]);
    // The cache exists (as after an earlier run) but may not be written.
    let out = output_within(ws.cmd(&["run", "pipeline.yaml", "--until", "small"]), LIMIT);
    assert!(out.status.success(), "{}", text(&out));
    let before = snapshot_tree(&ws.path("cache"));
    {
        let Some(_m) = read_only_bind(&ws.path("cache")) else {
            return;
        };
        let out = output_within(ws.cmd(&["run", "pipeline.yaml"]), LIMIT);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("Read-only file system"), "{err}");
        assert!(
            err.contains(&ws.path("cache").display().to_string()),
            "{err}"
        );
        assert!(err.contains("hint: "), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    assert_eq!(
        snapshot_tree(&ws.path("cache")),
        before,
        "a read-only cache was changed"
    );

    // A read-only output directory: the run fails naming it; the cache stays consistent.
    let ws = Ws::new(FILL, &[]);
    std::fs::create_dir_all(ws.path("out")).unwrap();
    let Some(_m) = read_only_bind(&ws.path("out")) else {
        return;
    };
    let out = output_within(ws.cmd(&["run", "pipeline.yaml"]), LIMIT);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Read-only file system"), "{err}");
    assert!(err.contains(&ws.path("out").display().to_string()), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let v = output_within(ws.cmd(&["verify"]), LIMIT);
    assert!(v.status.success(), "{}", text(&v));
}
