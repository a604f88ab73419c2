//! Paths: a shell out that is a symlink never drags the files it points at into the cache,
//! a workspace dataset is only read, and shell commands run in a scratch directory.

use std::path::Path;
use std::time::Duration;

use crate::common::*;

const LIMIT: Duration = Duration::from_secs(180);

#[test]
fn a_symlinked_out_is_refused_and_its_target_untouched() {
    let ws = Ws::new(
        r#"
name: links
stages:
  dir:  { kind: shell, params: { cmd: "ln -s \"$OUTSIDE\" link", outs: [link], env: { OUTSIDE: OUTSIDE_DIR } } }
  file: { kind: shell, params: { cmd: "ln -s \"$OUTSIDE/keep.txt\" f.txt", outs: [f.txt], env: { OUTSIDE: OUTSIDE_DIR } } }
  inner: { kind: shell, params: { cmd: "mkdir d; echo x > d/a.txt; ln -s \"$OUTSIDE/keep.txt\" d/b.txt", outs: [d], env: { OUTSIDE: OUTSIDE_DIR } } }
"#,
        &[
            ("outside/keep.txt", "precious\n"),
            ("outside/sub/more.txt", "also\n"),
        ],
    );
    let outside = ws.path("outside");
    let s = ws
        .read("pipeline.yaml")
        .replace("OUTSIDE_DIR", &outside.display().to_string());
    ws.write("pipeline.yaml", &s);
    let before = snapshot_tree(&outside);
    for stage in ["dir", "file", "inner"] {
        let out = output_within(ws.cmd(&["run", "pipeline.yaml", "--only", stage]), LIMIT);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("symlink"), "{stage}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    assert_eq!(
        snapshot_tree(&outside),
        before,
        "files outside the cache changed"
    );
    assert_eq!(ws.manifests(), 0);
}

fn copy_dir(from: &Path, to: &Path) {
    for e in walkdir::WalkDir::new(from).follow_links(true) {
        let e = e.unwrap();
        let rel = e.path().strip_prefix(from).unwrap();
        let dst = to.join(rel);
        if e.file_type().is_dir() {
            std::fs::create_dir_all(&dst).unwrap();
        } else {
            std::fs::copy(e.path(), &dst).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
}

/// Makes a small Cityscapes-format dataset in the workspace (from the `synth` stage).
pub fn workspace_dataset(ws: &Ws, dir: &str) {
    let gen = Ws::new(TINY, &[]);
    let out = output_within(
        gen.cmd(&["run", "pipeline.yaml", "--until", "synth"]),
        LIMIT,
    );
    assert!(out.status.success(), "{}", text(&out));
    copy_dir(&gen.path("out/tiny/synth/target"), &ws.path(dir));
}

#[test]
fn a_dataset_directory_is_only_read_and_shell_runs_in_scratch() {
    let ws = Ws::new(
        r#"
name: ro
device: flex
datasets:
  cs: { format: cityscapes, root: data/cs, classes: 16 }
stages:
  val:   { kind: preprocess, params: { dataset: cs, split: val, size: [48, 24], keep_full_labels: true } }
  train: { kind: preprocess, params: { dataset: cs, split: train, size: [48, 24] } }
  model: { kind: train_source, inputs: { source: train }, params: { iters: 2, max_iters: 2, depth: 14, width: 0.125, lr: 0.01 } }
  eval:  { kind: evaluate, inputs: { model: model.model, data: val } }
  poke:  { kind: shell, params: { cmd: "pwd > where.txt; for f in $(find data -name '*.png' | head -3); do echo junk >> $f; done", deps: [data/cs], outs: [where.txt] } }
"#,
        &[],
    );
    workspace_dataset(&ws, "data/cs");
    let before = snapshot_tree(&ws.path("data"));
    let out = output_within(ws.cmd(&["run", "pipeline.yaml"]), LIMIT);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        snapshot_tree(&ws.path("data")),
        before,
        "the dataset directory changed (contents or mtimes)"
    );
    let cwd = ws.read("out/ro/poke/where.txt");
    let scratch = std::fs::canonicalize(ws.path("cache/scratch")).unwrap();
    assert!(
        Path::new(cwd.trim()).starts_with(&scratch),
        "the shell stage ran in {cwd}, not under {}",
        scratch.display()
    );
}

/// Root ignores the read-only mode of cache objects: a command writing through the hard link
/// to its input is caught, not published, and `dag verify` repairs the damage it did.
#[test]
fn a_command_writing_to_its_input_is_caught() {
    let ws = Ws::new(
        r#"
name: poke
stages:
  a: { kind: shell, params: { cmd: "echo original > a.txt", outs: [a.txt] } }
  b: { kind: shell, params: { cmd: "echo more >> a.txt; cp a.txt b.txt", deps: [a.txt], outs: [b.txt] } }
"#,
        &[],
    );
    let out = output_within(ws.cmd(&["run", "pipeline.yaml"]), LIMIT);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    // Without root the read-only mode refuses the write and the command itself fails.
    assert_eq!(ws.manifests(), 1, "only `a` is published");
    // SAFETY: geteuid(2) has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        assert!(
            err.contains("the command wrote to its input `a.txt`"),
            "{err}"
        );
        let v = output_within(ws.cmd(&["verify"]), LIMIT);
        assert_eq!(v.status.code(), Some(1), "{}", text(&v));
        assert!(String::from_utf8_lossy(&v.stdout).contains("corrupt object"));
    }
    ws.edit(
        "echo more >> a.txt; cp a.txt b.txt",
        "cp a.txt b.txt; echo more >> b.txt",
    );
    let out = output_within(ws.cmd(&["run", "pipeline.yaml"]), LIMIT);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(ws.read("out/poke/b/b.txt"), "original\nmore\n");
}
