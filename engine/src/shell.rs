//! The built-in `shell` kind: any command joins the same cache.
//!
//! The command runs with `sh -c` in a fresh directory under the stage's scratch that holds its
//! deps at their relative paths (workspace files copied, upstream outs hard-linked read-only), so
//! a shell stage sees only what it declared. Each out becomes one named output of the stage (the
//! output's name is the out path) and is moved from there into the cache.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, BufRead};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use dag_api::{
    InputSpec, OutputSpec, ParamSpec, ParamType, Params, Stage, StageContext, StageError,
    StageOutcome, Value, STAGE_LOG,
};
use serde::Deserialize;

use crate::spec::normalise_rel;

/// The kind name.
pub const KIND: &str = "shell";

/// Artifact type of a shell out.
pub const OUT_TYPE: &str = "files";

/// The `shell` stage kind.
pub struct Shell;

#[derive(Deserialize)]
struct ShellParams {
    cmd: String,
    deps: Vec<String>,
    outs: Vec<String>,
    env: std::collections::BTreeMap<String, String>,
}

fn check_rel(p: &str, what: &str) -> Result<String, String> {
    let n = normalise_rel(p);
    if p.starts_with('/') || n.is_empty() || n.split('/').any(|c| c == "..") {
        return Err(format!(
            "{what} `{p}` must be a relative path inside the pipeline's directory (no `..`)"
        ));
    }
    Ok(n)
}

impl Stage for Shell {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn code(&self) -> dag_api::Code {
        // What a shell stage computes depends on its command and files, which are in its key;
        // dag's own code only runs it, so a new dag never reruns it.
        dag_api::Code::NONE
    }

    fn doc(&self) -> &'static str {
        "Runs `cmd` with `sh -c` in a scratch directory holding its `deps` at their relative paths; \
         each path in `outs` becomes an output taken from there into the cache. A dep that is \
         another shell stage's out (or inside one) is an edge of the pipeline."
    }

    fn params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::required("cmd", ParamType::Str, "the command, run with `sh -c`"),
            ParamSpec::optional(
                "deps",
                ParamType::List(Box::new(ParamType::Path)),
                Value::Array(vec![]),
                "files or directories the command reads: workspace paths (hashed into the key) or other shell stages' outs",
            ),
            ParamSpec::required(
                "outs",
                ParamType::List(Box::new(ParamType::Str)),
                "files or directories the command writes, relative to its working directory",
            ),
            ParamSpec::optional(
                "env",
                ParamType::StrMap,
                Value::Object(Default::default()),
                "extra environment variables",
            ),
        ]
    }

    fn inputs(&self) -> Vec<InputSpec> {
        Vec::new()
    }

    fn outputs(&self, params: &Params) -> Vec<OutputSpec> {
        let outs = params
            .get("outs")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        outs.iter()
            .filter_map(Value::as_str)
            .map(|o| OutputSpec {
                name: normalise_rel(o),
                ty: OUT_TYPE,
                doc: "a file or directory written by the command",
            })
            .collect()
    }

    fn check(&self, params: &Params) -> Result<(), String> {
        let p: ShellParams = params.parse().map_err(|e| e.message)?;
        if p.outs.is_empty() {
            return Err("`outs` is empty; a shell stage must write at least one path".into());
        }
        let mut seen = BTreeSet::new();
        for o in &p.outs {
            let n = check_rel(o, "out")?;
            if !seen.insert(n.clone()) {
                return Err(format!("out `{o}` is listed twice"));
            }
        }
        for a in &seen {
            if let Some(b) = seen.iter().find(|b| b.starts_with(&format!("{a}/"))) {
                return Err(format!("out `{b}` is inside out `{a}`"));
            }
        }
        for d in &p.deps {
            let n = check_rel(d, "dep")?;
            if seen.contains(&n) {
                return Err(format!("`{d}` is both a dep and an out"));
            }
        }
        Ok(())
    }

    /// A command may use `DAG_SEED`; dag cannot tell whether it does.
    fn seeded(&self) -> bool {
        true
    }

    /// dag does not run a command on a device (a command that uses a GPU picks it itself).
    fn device_independent(&self) -> bool {
        true
    }

    fn outputs_are_paths(&self) -> bool {
        true
    }

    fn run(&self, ctx: &StageContext<'_>) -> Result<StageOutcome, StageError> {
        let p: ShellParams = ctx.params.parse()?;
        let work = ctx.scratch.join("work");
        crate::cache::remove_all(&work)?;
        fs::create_dir_all(&work)?;
        for (name, art) in ctx.inputs {
            place_tree(&art.path, &work.join(name), true)?;
        }
        let linked = link_states(&work, ctx.inputs.keys());
        for dep in &p.deps {
            let d = normalise_rel(dep);
            let from_input = ctx
                .inputs
                .keys()
                .any(|n| d == *n || d.starts_with(&format!("{n}/")));
            if !from_input {
                let src = ctx.workdir.join(&d);
                place_tree(&src, &work.join(&d), false).map_err(|e| {
                    StageError::new(format!(
                        "cannot place dep `{dep}` in the work directory: {e}"
                    ))
                    .with_path(&src)
                })?;
            }
        }
        for out in ctx.outputs.keys() {
            if let Some(parent) = work.join(out).parent() {
                fs::create_dir_all(parent)?;
            }
        }
        let log_path = ctx.scratch.join(STAGE_LOG);
        let log = fs::File::create(&log_path)?;
        let mut command = Command::new("sh");
        if std::env::var_os("WAYLAND_DISPLAY").is_some_and(|v| v == NO_WAYLAND_DISPLAY) {
            // The user's own environment, not the one `quiet_headless_wayland` adjusted.
            command.env_remove("WAYLAND_DISPLAY");
        }
        let mut child = command
            .arg("-c")
            .arg(&p.cmd)
            .current_dir(&work)
            .envs(&p.env)
            .env("DAG_STAGE", ctx.stage)
            .env("DAG_PIPELINE", ctx.pipeline)
            .env("DAG_SEED", ctx.seed.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| {
                StageError::new(format!("cannot start `sh`: {e}"))
                    .with_hint("is /bin/sh installed?")
            })?;
        // A helper thread blocks in wait() so that the end of the command is noticed at once;
        // this thread watches for cancellation meanwhile.
        let pid = child.id() as libc::pid_t;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        let status = loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(status) => break status?,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if ctx.cancel.is_cancelled() {
                        // SAFETY: kill(2) on the pid of our own child, which the waiter thread
                        // has not reaped yet (it would have sent its status).
                        unsafe {
                            libc::kill(pid, libc::SIGKILL);
                        }
                        let _ = rx.recv();
                        return Err(StageError::cancelled());
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(StageError::new("lost track of the command's process"));
                }
            }
        };
        // Root ignores the read-only mode of cache objects, so a command can write through the
        // hard links to its inputs and damage the cache; such a run must not be published.
        if let Some(rel) = written_links(&linked) {
            return Err(StageError::new(format!(
                "the command wrote to its input `{rel}`, a hard link to a read-only cache object, \
                 which is now damaged"
            ))
            .with_path(&log_path)
            .with_hint(
                "write to a copy instead (`cp input file`); then run `dag verify`, which \
                 quarantines the damaged object so that its stage is rebuilt",
            ));
        }
        if !status.success() {
            let tail = last_lines(&log_path, 20);
            let code = status
                .code()
                .map(|c| format!("exit status {c}"))
                .unwrap_or_else(|| "a signal".into());
            // A full disk also swallows the command's own complaint (its log cannot grow), so
            // say so rather than show an empty log.
            let full = if disk_full(&work) {
                format!(
                    "; No space left on device: the file system of {} is full",
                    work.display()
                )
            } else {
                String::new()
            };
            return Err(StageError::new(format!(
                "command `{}` failed with {code}{full}; last lines of its output:\n{tail}",
                p.cmd
            ))
            .with_path(&log_path)
            .with_hint(format!(
                "read the log above; the command ran in {} with its deps in place",
                work.display()
            )));
        }
        for (out, staging) in ctx.outputs {
            let src = work.join(out);
            if fs::symlink_metadata(&src).is_err() {
                return Err(
                    StageError::new(format!("the command did not write its out `{out}`"))
                        .with_path(&log_path)
                        .with_hint("write it relative to the working directory, or fix `outs`"),
                );
            }
            if fs::symlink_metadata(&src).is_ok_and(|m| m.file_type().is_symlink()) {
                // Publishing moves an out into the cache; through a link it would move the
                // files the link points at, outside the work directory.
                return Err(StageError::new(format!(
                    "out `{out}` is a symlink; outs must be regular files or directories"
                ))
                .with_path(&src)
                .with_hint("copy the file into place (`cp -L`) instead of linking it"));
            }
            // The engine handed an empty directory; the out may be a file, so it takes its place.
            fs::remove_dir(staging)?;
            fs::rename(&src, staging)?;
        }
        Ok(StageOutcome::default())
    }
}

/// Whether the file system holding `dir` has (almost) no space left for an unprivileged writer.
fn disk_full(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statvfs(3) writes into the zeroed struct we own; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return false;
    }
    (st.f_bavail as u64).saturating_mul(st.f_frsize as u64) < 64 * 1024
}

/// Inode, size and modification time of a file.
type LinkState = (u64, u64, i64, i64);

/// The state of every file placed from the inputs, by path relative to the work directory.
fn link_states<'a>(
    work: &Path,
    inputs: impl Iterator<Item = &'a String>,
) -> Vec<(String, PathBuf, LinkState)> {
    use std::os::unix::fs::MetadataExt;
    let mut v = Vec::new();
    for name in inputs {
        for e in walkdir::WalkDir::new(work.join(name)).into_iter().flatten() {
            if let Ok(m) = e.metadata() {
                // A copy (when linking failed) is the command's own to modify.
                if m.is_file() && m.nlink() > 1 {
                    let rel = e.path().strip_prefix(work).unwrap_or(e.path());
                    v.push((
                        rel.display().to_string(),
                        e.path().to_path_buf(),
                        (m.ino(), m.size(), m.mtime(), m.mtime_nsec()),
                    ));
                }
            }
        }
    }
    v
}

/// The first placed input whose inode was written to (a replaced or removed file is harmless).
fn written_links(before: &[(String, PathBuf, LinkState)]) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    before.iter().find_map(|(rel, path, was)| {
        let m = fs::symlink_metadata(path).ok()?;
        let now = (m.ino(), m.size(), m.mtime(), m.mtime_nsec());
        (now.0 == was.0 && now != *was).then(|| rel.clone())
    })
}

/// Puts a copy of `src` (file or directory) at `dst`. Upstream artifacts are hard-linked (they are
/// read-only objects already); workspace files are copied so that a command cannot edit them.
fn place_tree(src: &Path, dst: &Path, link: bool) -> io::Result<()> {
    if let Some(parent) = dst.parent() {
        fs::create_dir_all(parent)?;
    }
    let meta = fs::metadata(src)?;
    if meta.is_file() {
        return if link {
            fs::hard_link(src, dst).or_else(|_| fs::copy(src, dst).map(|_| ()))
        } else {
            fs::copy(src, dst).map(|_| ())
        };
    }
    for e in walkdir::WalkDir::new(src).follow_links(true) {
        let e = e.map_err(io::Error::other)?;
        let rel = e.path().strip_prefix(src).map_err(io::Error::other)?;
        let to = dst.join(rel);
        if e.file_type().is_dir() {
            fs::create_dir_all(&to)?;
        } else if link {
            fs::hard_link(e.path(), &to).or_else(|_| fs::copy(e.path(), &to).map(|_| ()))?;
        } else {
            fs::copy(e.path(), &to)?;
        }
    }
    Ok(())
}

fn last_lines(path: &Path, n: usize) -> String {
    let Ok(f) = fs::File::open(path) else {
        return String::new();
    };
    let lines: Vec<String> = io::BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The `WAYLAND_DISPLAY` that [`quiet_headless_wayland`] sets: an absolute path that no socket
/// can have, so a Wayland client fails quietly instead of complaining.
const NO_WAYLAND_DISPLAY: &str = "/nonexistent/dag-headless-no-wayland";

/// On a machine without a graphical session (`XDG_RUNTIME_DIR` unset, as on CI runners and
/// most servers), probing GPU adapters through Mesa's Vulkan drivers makes libwayland print
/// "error: XDG_RUNTIME_DIR is invalid or not set" once per probe, although nothing is wrong.
/// An absolute `WAYLAND_DISPLAY` skips that check. Must run before any thread starts (it sets
/// an environment variable); `shell` stages get the user's environment back.
pub fn quiet_headless_wayland() {
    let runtime_dir_ok =
        std::env::var_os("XDG_RUNTIME_DIR").is_some_and(|d| std::path::Path::new(&d).is_absolute());
    if !runtime_dir_ok && std::env::var_os("WAYLAND_DISPLAY").is_none() {
        std::env::set_var("WAYLAND_DISPLAY", NO_WAYLAND_DISPLAY);
    }
}
