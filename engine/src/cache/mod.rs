//! The content-addressed artifact store.
//!
//! ```text
//! cache/objects/ab/cdef…      immutable, read-only files by blake3 digest of their bytes
//! cache/trees/<tree digest>   an artifact materialised as hard links to objects (read-only)
//! cache/runs/<key>.json       one manifest per stage run
//! cache/latest/<p>/<stage>    the key of the last run of that stage name (for `dag plan`'s why)
//! cache/last-run/<p>.json     how each stage ended in the pipeline's last `dag run` (for `dag report`)
//! cache/tmp/                  staging; cleared under the lock at the start of every run
//! cache/scratch/<key>/        per-key scratch that survives a killed attempt (checkpoints)
//! cache/quarantine/           corrupt objects found by `dag verify`
//! cache/lock                  held by the one process that may write
//! ```
//!
//! [`remote`] shares runs across machines through an object store.
//!
//! Nothing becomes visible before it is complete: files are written under tmp/, fsynced, renamed
//! into place; a manifest is the last thing written for a run, and its rename is made durable
//! with a directory fsync. Object renames are not followed by their own directory fsync (it
//! costs a journal commit per object): their bytes are durable before the manifest is written,
//! and a manifest whose object did not survive a crash is noticed by [`Cache::tree_available`]
//! and its stage simply reruns. The `latest/` pointers are hints for `dag plan` and are not
//! fsynced at all.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use dag_api::{DeviceKind, Map, Value};
use serde::{Deserialize, Serialize};

use crate::hash;
use crate::key::Encoder;

/// Version of the manifest format. Format 2 adds [`Manifest::checksum`]; format 3 replaces the
/// kind's version number with its [`Manifest::code`].
pub const MANIFEST_FORMAT: u32 = 3;

/// How a stage ended in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// A run with the same key was reused.
    Cached,
    /// The stage ran.
    Ran,
    /// The stage failed.
    #[serde(alias = "FAILED")]
    Failed,
    /// Not selected by --only/--until.
    Skipped,
    /// Not reached because another stage failed or the run was interrupted.
    #[serde(alias = "not run")]
    NotRun,
}

impl Outcome {
    /// The word in the summary table.
    pub fn word(self) -> &'static str {
        match self {
            Outcome::Cached => "cached",
            Outcome::Ran => "ran",
            Outcome::Failed => "FAILED",
            Outcome::Skipped => "skipped",
            Outcome::NotRun => "not run",
        }
    }
}

/// How the stages of a pipeline ended in its last `dag run`; a hint for `dag report`, which
/// tells what ran from what was reused and shows why a stage failed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LastRun {
    /// When the run ended, Unix seconds.
    pub finished_unix: f64,
    /// One entry per stage, in topological order.
    pub stages: Vec<LastRunStage>,
}

/// One stage of a [`LastRun`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LastRunStage {
    /// Stage name.
    pub stage: String,
    /// How it ended (older records hold the summary's words, which read back the same).
    pub outcome: Outcome,
    /// Its key, when known.
    pub key: Option<String>,
    /// Why it failed.
    pub message: Option<String>,
}

mod maintenance;
pub mod remote;

/// A manifest's device: a [`DeviceKind`]'s name, or `any-device` for a device-independent kind.
mod any_device {
    use dag_api::DeviceKind;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<DeviceKind>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(super::device_name(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DeviceKind>, D::Error> {
        let name = String::deserialize(d)?;
        if name == super::ANY_DEVICE {
            return Ok(None);
        }
        DeviceKind::from_name(&name)
            .map(Some)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown device `{name}`")))
    }
}

/// How a device-independent stage's device is written.
pub const ANY_DEVICE: &str = "any-device";

/// A device's name, or [`ANY_DEVICE`].
pub fn device_name(device: Option<DeviceKind>) -> &'static str {
    device.map_or(ANY_DEVICE, DeviceKind::name)
}

pub use maintenance::{GcReport, VerifyFinding, VerifyReport};

/// A failure of the cache, naming the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot {op} {}: {source}", path.display())]
    /// A filesystem operation failed.
    Io {
        /// What was being done (`create`, `fsync`, ...).
        op: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        #[source]
        /// The operating system's error.
        source: io::Error,
    },
    #[error("the cache {} is locked by another dag process{holder}; not waiting (--no-wait)", path.display())]
    /// Another process holds the lock and `--no-wait` was given.
    Locked {
        /// The lock file.
        path: PathBuf,
        /// ` (pid N)` of the holder when known, else empty.
        holder: String,
    },
}

impl CacheError {
    /// What the user can do about it.
    pub fn hint(&self) -> String {
        match self {
            CacheError::Io { .. } => {
                "check permissions and free space; `dag verify` checks the cache's integrity".into()
            }
            CacheError::Locked { .. } => {
                "wait for the other run, or use another cache with --cache DIR".into()
            }
        }
    }
}

trait Ctx<T> {
    fn ctx(self, op: &'static str, path: &Path) -> Result<T, CacheError>;
}

impl<T> Ctx<T> for io::Result<T> {
    fn ctx(self, op: &'static str, path: &Path) -> Result<T, CacheError> {
        self.map_err(|source| CacheError::Io {
            op,
            path: path.to_path_buf(),
            source,
        })
    }
}

/// One file of an artifact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TreeEntry {
    /// Path relative to the artifact root (`""` when the artifact is a single file).
    pub path: String,
    /// blake3 of the file's bytes, hex.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    /// Whether the file is executable.
    pub exec: bool,
}

/// An artifact: a directory tree (or one file) of content-addressed files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputTree {
    /// blake3 over the sorted (path, exec, digest, size) entries.
    pub digest: String,
    /// Artifact type (`model`, `files`, ...).
    pub ty: String,
    /// True when the artifact is a single file rather than a directory.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub file: bool,
    /// The files, sorted by path.
    pub entries: Vec<TreeEntry>,
}

impl OutputTree {
    /// Builds a tree and computes its digest.
    pub fn new(ty: &str, file: bool, entries: Vec<TreeEntry>) -> Self {
        let mut e = Encoder::new("tree");
        e.bool(file).list(entries.len());
        for x in &entries {
            e.str(&x.path).bool(x.exec).str(&x.digest).uint(x.size);
        }
        OutputTree {
            digest: e.finish(),
            ty: ty.to_string(),
            file,
            entries,
        }
    }

    /// Total bytes.
    pub fn size(&self) -> u64 {
        self.entries.iter().map(|e| e.size).sum()
    }
}

/// Where an input came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputRecord {
    /// `stage.output`.
    pub producer: String,
    /// Tree digest.
    pub digest: String,
}

/// Everything about one stage run; written last, so its presence means the run completed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`] of the writer.
    pub format: u32,
    /// Version of the `dag` that wrote it.
    pub dag_version: String,
    /// The stage key (also the file name).
    pub key: String,
    /// Pipeline name.
    pub pipeline: String,
    /// Stage name.
    pub stage: String,
    /// Stage kind.
    pub kind: String,
    /// The kind's [`dag_api::Code`]: crate name -> digest (empty for kinds without code of
    /// dag's own, and in manifests older than format 3).
    #[serde(default)]
    pub code: BTreeMap<String, String>,
    /// Resolved device kind, or `None` for device-independent kinds (`any-device` on disk).
    #[serde(with = "any_device")]
    pub device: Option<DeviceKind>,
    /// The stage's seed; `None` for kinds that are not seeded (older manifests hold the
    /// pipeline seed for every stage).
    pub seed: Option<u64>,
    /// Params with defaults filled in.
    pub params: BTreeMap<String, Value>,
    /// Input name -> where it came from and its tree digest.
    pub inputs: BTreeMap<String, InputRecord>,
    /// Dataset name -> fingerprint or upstream digest.
    #[serde(default)]
    pub datasets: BTreeMap<String, String>,
    /// Workspace path -> content digest.
    #[serde(default)]
    pub workspace: BTreeMap<String, String>,
    /// Output name -> its tree.
    pub outputs: BTreeMap<String, OutputTree>,
    #[serde(default)]
    /// Metrics the stage reported.
    pub metrics: Map<String, Value>,
    /// Object digest of the stage's log, when it wrote one.
    #[serde(default)]
    pub log: Option<String>,
    /// The short text the stage asked `dag run` to print (see `StageOutcome::summary`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    /// Unix time in seconds (with fraction) when the run finished.
    pub finished_unix: f64,
    /// Seconds in the stage's `run`.
    pub seconds: f64,
    /// Seconds the engine spent publishing (hashing, moving, manifest).
    pub publish_seconds: f64,
    /// blake3 of the file's bytes without this field (see [`Cache::write_manifest`]). A bit
    /// flip that still parses as JSON (a digit of a metric, a hex digit of a digest) would
    /// otherwise be served as a valid result. Must stay the last field: it is checked by
    /// cutting its line off the pretty-printed file, which avoids re-serialising floats.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
}

/// Why a manifest file cannot be trusted.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file is not a manifest (truncated, not JSON, wrong fields).
    #[error("{}: not a readable manifest: {message}", path.display())]
    Unreadable {
        /// The manifest file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// The file parses but its bytes do not match its checksum.
    #[error("{}: checksum mismatch (the file was modified or damaged)", path.display())]
    Checksum {
        /// The manifest file.
        path: PathBuf,
    },
    /// The file cannot be read at all.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The manifest file.
        path: PathBuf,
        #[source]
        /// The operating system's error.
        source: io::Error,
    },
}

fn manifest_checksum(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// Parses manifest bytes and checks their checksum. Format 1 manifests (written before the
/// checksum existed) are accepted without one; from format 2 on it is required.
pub fn parse_manifest(path: &Path, bytes: &[u8]) -> Result<Manifest, ManifestError> {
    let m: Manifest = serde_json::from_slice(bytes).map_err(|e| ManifestError::Unreadable {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    match &m.checksum {
        Some(c) => {
            let line = format!(",\n  \"checksum\": \"{c}\"");
            let text = std::str::from_utf8(bytes).map_err(|e| ManifestError::Unreadable {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
            let Some(at) = text.rfind(&line) else {
                return Err(ManifestError::Checksum {
                    path: path.to_path_buf(),
                });
            };
            let mut body = String::with_capacity(text.len());
            body.push_str(&text[..at]);
            body.push_str(&text[at + line.len()..]);
            if manifest_checksum(body.as_bytes()) != *c {
                return Err(ManifestError::Checksum {
                    path: path.to_path_buf(),
                });
            }
        }
        None if m.format >= 2 => {
            return Err(ManifestError::Checksum {
                path: path.to_path_buf(),
            })
        }
        None => {}
    }
    Ok(m)
}

/// The store at one root directory.
#[derive(Debug, Clone)]
pub struct Cache {
    /// Absolute path of the store.
    pub root: PathBuf,
}

/// Held while a process may write to the cache; released when dropped or when the process dies.
pub struct CacheLock {
    _file: File,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

const SUBDIRS: &[&str] = &[
    "objects",
    "trees",
    "runs",
    "latest",
    "tmp",
    "scratch",
    "quarantine",
];

impl Cache {
    /// Opens (creating if needed) the store at `root`.
    pub fn open(root: &Path) -> Result<Self, CacheError> {
        let root = std::path::absolute(root).ctx("resolve", root)?;
        for d in SUBDIRS {
            let p = root.join(d);
            fs::create_dir_all(&p).ctx("create", &p)?;
        }
        Ok(Cache { root })
    }

    /// Opens the store only if it exists (read-only commands must not create one).
    pub fn open_existing(root: &Path) -> Option<Self> {
        let root = std::path::absolute(root).ok()?;
        root.join("runs").is_dir().then_some(Cache { root })
    }

    /// Takes the writer lock. When another process holds it, waits (saying so on stderr) unless
    /// `wait` is false.
    pub fn lock(&self, wait: bool) -> Result<CacheLock, CacheError> {
        use fs4::fs_std::FileExt;
        let path = self.root.join("lock");
        let mut file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .ctx("open", &path)?;
        if !FileExt::try_lock_exclusive(&file).ctx("lock", &path)? {
            // The holder writes its pid just after taking the lock; give it a moment to do so.
            let read_holder = || {
                fs::read_to_string(&path)
                    .ok()
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
            };
            let mut holder = read_holder();
            for _ in 0..20 {
                if holder.is_some() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
                holder = read_holder();
            }
            let holder = holder.map(|s| format!(" ({s})")).unwrap_or_default();
            if !wait {
                return Err(CacheError::Locked { path, holder });
            }
            eprintln!(
                "waiting for another dag process{holder} to release {} ...",
                path.display()
            );
            FileExt::lock_exclusive(&file).ctx("lock", &path)?;
        }
        // The holder's pid only feeds the waiting message; the lock itself dies with the process.
        let _ = file.set_len(0);
        let _ = write!(file, "pid {}", std::process::id());
        Ok(CacheLock { _file: file })
    }

    /// Removes leftovers of killed runs (call with the lock held): everything in tmp/, and the
    /// scratch of runs that were published (a scratch without a manifest holds a checkpoint and
    /// is kept for the next attempt).
    pub fn clean_tmp(&self) -> Result<(), CacheError> {
        let tmp = self.root.join("tmp");
        for e in fs::read_dir(&tmp).ctx("list", &tmp)? {
            let e = e.ctx("list", &tmp)?;
            remove_all(&e.path()).ctx("remove", &e.path())?;
        }
        let scratch = self.root.join("scratch");
        for e in fs::read_dir(&scratch).ctx("list", &scratch)? {
            let e = e.ctx("list", &scratch)?;
            if let Some(key) = e.file_name().to_str() {
                if self.manifest_path(key).exists() {
                    remove_all(&e.path()).ctx("remove", &e.path())?;
                }
            }
        }
        Ok(())
    }

    /// A fresh path under tmp/ (not created).
    pub fn tmp_path(&self, label: &str) -> PathBuf {
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        self.root
            .join("tmp")
            .join(format!("{label}.{}.{n}", std::process::id()))
    }

    /// Where the object with this digest lives.
    pub fn object_path(&self, digest: &str) -> PathBuf {
        self.objects_dir().join(&digest[..2]).join(&digest[2..])
    }

    /// Where the materialised tree with this digest lives.
    pub fn tree_path(&self, digest: &str) -> PathBuf {
        self.trees_dir().join(digest)
    }

    /// Where the manifest of the run with this key lives.
    pub fn manifest_path(&self, key: &str) -> PathBuf {
        self.runs_dir().join(format!("{key}.json"))
    }

    /// The per-key scratch directory (created).
    pub fn scratch(&self, key: &str) -> Result<PathBuf, CacheError> {
        let p = self.root.join("scratch").join(key);
        fs::create_dir_all(&p).ctx("create", &p)?;
        Ok(p)
    }

    /// The manifest of a completed run with this key, if any. A damaged manifest counts as
    /// absent (the stage reruns and rewrites it); `dag verify` reports and quarantines it.
    pub fn read_manifest(&self, key: &str) -> Option<Manifest> {
        match self.check_manifest(key) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(key, error = %e, "ignoring a damaged manifest; its stage reruns");
                None
            }
        }
    }

    /// The manifest with this key: `Ok(None)` when there is none, an error when it is damaged.
    pub fn check_manifest(&self, key: &str) -> Result<Option<Manifest>, ManifestError> {
        let path = self.manifest_path(key);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(ManifestError::Io { path, source }),
        };
        let m = parse_manifest(&path, &bytes)?;
        if m.key != key {
            // A manifest copied or renamed onto another key would hand out another run's outputs.
            return Err(ManifestError::Unreadable {
                path,
                message: format!("it records key {} instead", m.key),
            });
        }
        Ok(Some(m))
    }

    /// Publishes a manifest atomically (write, fsync, rename, fsync dir), with its checksum.
    pub fn write_manifest(&self, m: &Manifest) -> Result<(), CacheError> {
        let mut m = m.clone();
        m.checksum = None;
        let body = serde_json::to_vec_pretty(&m).expect("manifests serialize");
        m.checksum = Some(manifest_checksum(&body));
        let bytes = serde_json::to_vec_pretty(&m).expect("manifests serialize");
        let dst = self.manifest_path(&m.key);
        write_atomic(&self.tmp_path("manifest"), &dst, &bytes)
    }

    /// Every manifest in the store.
    pub fn manifests(&self) -> Result<Vec<Manifest>, CacheError> {
        let runs = self.root.join("runs");
        let mut out = Vec::new();
        for e in fs::read_dir(&runs).ctx("list", &runs)? {
            let e = e.ctx("list", &runs)?;
            let name = e.file_name();
            let Some(key) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            if let Some(m) = self.read_manifest(key) {
                out.push(m);
            }
        }
        Ok(out)
    }

    fn latest_path(&self, pipeline: &str, stage: &str) -> PathBuf {
        self.latest_dir().join(pipeline).join(stage)
    }

    /// `objects/`: immutable files by digest, under a two-character prefix directory.
    fn objects_dir(&self) -> PathBuf {
        self.root.join("objects")
    }

    /// `trees/`: each output tree materialised from its objects.
    fn trees_dir(&self) -> PathBuf {
        self.root.join("trees")
    }

    /// `runs/`: one manifest per stage run.
    fn runs_dir(&self) -> PathBuf {
        self.root.join("runs")
    }

    /// `latest/<pipeline>/<stage>`: the key of each stage's last completed run.
    fn latest_dir(&self) -> PathBuf {
        self.root.join("latest")
    }

    /// `statcache.json`: the file stats and digests of workspace files hashed before.
    pub fn stat_cache_path(&self) -> PathBuf {
        self.root.join("statcache.json")
    }

    /// `quarantine/`: what `verify` found corrupt, kept for inspection.
    fn quarantine_dir(&self) -> PathBuf {
        self.root.join("quarantine")
    }

    /// The key of the last completed run of a stage name.
    pub fn latest(&self, pipeline: &str, stage: &str) -> Option<String> {
        fs::read_to_string(self.latest_path(pipeline, stage))
            .ok()
            .map(|s| s.trim().to_string())
    }

    /// Records `key` as the last run of a stage name (no write when unchanged).
    pub fn set_latest(&self, pipeline: &str, stage: &str, key: &str) -> Result<(), CacheError> {
        if self.latest(pipeline, stage).as_deref() == Some(key) {
            return Ok(());
        }
        let dst = self.latest_path(pipeline, stage);
        let dir = dst.parent().expect("has a parent");
        fs::create_dir_all(dir).ctx("create", dir)?;
        let tmp = self.tmp_path("latest");
        fs::write(&tmp, key).ctx("write", &tmp)?;
        fs::rename(&tmp, &dst).ctx("publish", &dst)
    }

    fn last_run_path(&self, pipeline: &str) -> PathBuf {
        self.root.join("last-run").join(format!("{pipeline}.json"))
    }

    /// Records how the stages of `pipeline` ended in the run that just finished.
    pub fn write_last_run(&self, pipeline: &str, run: &LastRun) -> Result<(), CacheError> {
        let dst = self.last_run_path(pipeline);
        let dir = dst.parent().expect("has a parent");
        fs::create_dir_all(dir).ctx("create", dir)?;
        let tmp = self.tmp_path("last-run");
        let bytes = serde_json::to_vec_pretty(run).expect("serializes");
        fs::write(&tmp, bytes).ctx("write", &tmp)?;
        fs::rename(&tmp, &dst).ctx("publish", &dst)
    }

    /// How the stages of `pipeline` ended in its last `dag run`, if one was recorded.
    pub fn last_run(&self, pipeline: &str) -> Option<LastRun> {
        let bytes = fs::read(self.last_run_path(pipeline)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Moves a finished output (a directory, or a single file) into the object store and returns
    /// its tree. The source is consumed.
    pub fn ingest(&self, src: &Path, ty: &str) -> Result<OutputTree, CacheError> {
        let meta = fs::symlink_metadata(src).ctx("read", src)?;
        if meta.file_type().is_symlink() {
            // Ingesting moves files: following a link would move the files it points at (a
            // user's data, anywhere on the disk) into the cache.
            return Err(CacheError::Io {
                op: "ingest",
                path: src.to_path_buf(),
                source: io::Error::other(
                    "an output is a symlink; artifacts may hold regular files only (copy the \
                     target instead of linking it)",
                ),
            });
        }
        let is_file = meta.is_file();
        let files = hash::list_files(src).ctx("list", src)?;
        let digests = hash::hash_files(&files).ctx("hash", src)?;
        use rayon::prelude::*;
        files
            .par_iter()
            .zip(&digests)
            .try_for_each(|(f, d)| self.put_object(&f.path, d))?;
        let entries = files
            .iter()
            .zip(digests)
            .map(|(f, digest)| TreeEntry {
                path: f.rel.clone(),
                digest,
                size: f.size,
                exec: f.exec,
            })
            .collect();
        Ok(OutputTree::new(ty, is_file, entries))
    }

    /// Moves one file into objects/ under its digest (or drops it when the object exists).
    pub fn put_object(&self, src: &Path, digest: &str) -> Result<(), CacheError> {
        let dst = self.object_path(digest);
        if dst.exists() {
            return fs::remove_file(src).ctx("remove", src);
        }
        let dir = dst.parent().expect("has a parent");
        fs::create_dir_all(dir).ctx("create", dir)?;
        let f = File::open(src).ctx("open", src)?;
        f.sync_all().ctx("fsync", src)?;
        fs::set_permissions(src, fs::Permissions::from_mode(0o444)).ctx("chmod", src)?;
        fs::rename(src, &dst).ctx("publish", &dst)
    }

    /// Whether a tree can be handed out without running its producer again.
    pub fn tree_available(&self, t: &OutputTree) -> bool {
        self.tree_path(&t.digest).exists()
            || t.entries
                .iter()
                .all(|e| self.object_path(&e.digest).exists())
    }

    /// The read-only materialisation of a tree under trees/, created from objects when missing.
    pub fn ensure_tree(&self, t: &OutputTree) -> Result<PathBuf, CacheError> {
        let dst = self.tree_path(&t.digest);
        if fs::symlink_metadata(&dst).is_ok() {
            return Ok(dst);
        }
        let tmp = self.tmp_path("tree");
        if t.file {
            let e = &t.entries[0];
            link_or_copy(&self.object_path(&e.digest), &tmp, e.exec)?;
        } else {
            fs::create_dir_all(&tmp).ctx("create", &tmp)?;
            for e in &t.entries {
                let p = tmp.join(&e.path);
                let dir = p.parent().expect("has a parent");
                fs::create_dir_all(dir).ctx("create", dir)?;
                link_or_copy(&self.object_path(&e.digest), &p, e.exec)?;
            }
        }
        match fs::rename(&tmp, &dst) {
            Ok(()) => {}
            // Another thread materialised the same tree first; both are identical.
            Err(_) if dst.exists() => {
                remove_all(&tmp).ctx("remove", &tmp)?;
                return Ok(dst);
            }
            Err(e) => return Err(e).ctx("publish", &dst),
        }
        if !t.file {
            make_dirs_read_only(&dst).ctx("chmod", &dst)?;
        }
        Ok(dst)
    }

    /// Stores a loose file (a stage log) as an object and returns its digest.
    pub fn store_file(&self, src: &Path) -> Result<String, CacheError> {
        let size = fs::metadata(src).ctx("read", src)?.len();
        let digest = hash::hash_file(src, size).ctx("hash", src)?;
        let tmp = self.tmp_path("log");
        fs::copy(src, &tmp).ctx("copy", src)?;
        self.put_object(&tmp, &digest)?;
        Ok(digest)
    }
}

/// Points `link` at `target` with a symlink, replacing an older one atomically; no write when it
/// already points there.
pub fn update_link(link: &Path, target: &Path) -> Result<(), CacheError> {
    if fs::read_link(link).is_ok_and(|t| t == target) {
        return Ok(());
    }
    let dir = link.parent().expect("has a parent");
    fs::create_dir_all(dir).ctx("create", dir)?;
    if fs::symlink_metadata(link).is_ok_and(|m| m.is_dir()) {
        // Not ours to replace atomically: a real directory someone created by hand.
        return Err(CacheError::Io {
            op: "replace",
            path: link.to_path_buf(),
            source: io::Error::other("a directory is in the way of an output link; move it away"),
        });
    }
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        link.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).ctx("link", &tmp)?;
    fs::rename(&tmp, link).ctx("publish", link)
}

fn link_or_copy(obj: &Path, dst: &Path, exec: bool) -> Result<(), CacheError> {
    // Executables are copied: a hard link shares the object's read-only, non-executable mode.
    if !exec && fs::hard_link(obj, dst).is_ok() {
        return Ok(());
    }
    fs::copy(obj, dst).ctx("copy", obj)?;
    let mode = if exec { 0o555 } else { 0o444 };
    fs::set_permissions(dst, fs::Permissions::from_mode(mode)).ctx("chmod", dst)
}

fn make_dirs_read_only(root: &Path) -> io::Result<()> {
    for e in walkdir::WalkDir::new(root).contents_first(true) {
        let e = e.map_err(io::Error::other)?;
        if e.file_type().is_dir() {
            fs::set_permissions(e.path(), fs::Permissions::from_mode(0o555))?;
        }
    }
    Ok(())
}

/// Removes a file or a tree, first making read-only directories writable.
pub fn remove_all(p: &Path) -> io::Result<()> {
    let meta = match fs::symlink_metadata(p) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.is_dir() {
        return fs::remove_file(p);
    }
    for e in walkdir::WalkDir::new(p) {
        let e = e.map_err(io::Error::other)?;
        if e.file_type().is_dir() {
            let _ = fs::set_permissions(e.path(), fs::Permissions::from_mode(0o755));
        }
    }
    fs::remove_dir_all(p)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `bytes` to `tmp`, fsyncs, renames over `dst` and fsyncs the directory.
pub fn write_atomic(tmp: &Path, dst: &Path, bytes: &[u8]) -> Result<(), CacheError> {
    let mut f = File::create(tmp).ctx("create", tmp)?;
    f.write_all(bytes).ctx("write", tmp)?;
    f.sync_all().ctx("fsync", tmp)?;
    fs::rename(tmp, dst).ctx("publish", dst)?;
    let dir = dst.parent().expect("has a parent");
    sync_dir(dir).ctx("fsync", dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ingest_dedups_and_materialises_read_only() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::open(&tmp.path().join("c")).unwrap();
        let out = tmp.path().join("out");
        fs::create_dir_all(out.join("sub")).unwrap();
        fs::write(out.join("a.txt"), b"same").unwrap();
        fs::write(out.join("sub/b.txt"), b"same").unwrap();
        let t = cache.ingest(&out, "files").unwrap();
        assert_eq!(t.entries.len(), 2);
        assert_eq!(t.entries[0].digest, t.entries[1].digest);
        let p = cache.ensure_tree(&t).unwrap();
        assert_eq!(fs::read(p.join("sub/b.txt")).unwrap(), b"same");
        let mode = fs::metadata(p.join("a.txt")).unwrap().permissions().mode();
        assert_eq!(mode & 0o222, 0, "tree files are read-only");
        // The same content under other names is another tree.
        fs::create_dir_all(&out).unwrap();
        fs::write(out.join("c.txt"), b"same").unwrap();
        fs::write(out.join("sub2"), b"same").unwrap();
        let t2 = cache.ingest(&out, "files").unwrap();
        assert_ne!(t.digest, t2.digest);
        remove_all(&cache.root).unwrap();
    }

    #[test]
    fn second_writer_is_refused_without_wait() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::open(tmp.path()).unwrap();
        let _held = cache.lock(false).unwrap();
        // fs4 locks are per open file description, so a second open in-process conflicts too.
        match cache.lock(false) {
            Err(CacheError::Locked { holder, .. }) => assert!(holder.contains("pid")),
            other => panic!("expected Locked, got {:?}", other.err()),
        }
    }

    /// Outcomes are stored as enum tags; the summary's words that older records hold read back
    /// as the same outcomes.
    #[test]
    fn outcomes_round_trip_and_read_the_old_words() {
        for o in [
            Outcome::Cached,
            Outcome::Ran,
            Outcome::Failed,
            Outcome::Skipped,
            Outcome::NotRun,
        ] {
            let text = serde_json::to_string(&o).unwrap();
            assert_eq!(serde_json::from_str::<Outcome>(&text).unwrap(), o);
            assert!(!text.contains(' ') && text == text.to_lowercase(), "{text}");
        }
        for (word, o) in [
            ("\"ran\"", Outcome::Ran),
            ("\"cached\"", Outcome::Cached),
            ("\"FAILED\"", Outcome::Failed),
            ("\"skipped\"", Outcome::Skipped),
            ("\"not run\"", Outcome::NotRun),
        ] {
            assert_eq!(serde_json::from_str::<Outcome>(word).unwrap(), o);
        }
    }

    /// A manifest's device reads and writes the names it always had: a kind's name, or
    /// `any-device`.
    #[test]
    fn manifest_devices_keep_their_names() {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct D {
            #[serde(with = "any_device")]
            device: Option<DeviceKind>,
        }
        for (text, device) in [
            (r#"{"device":"any-device"}"#, None),
            (r#"{"device":"flex"}"#, Some(DeviceKind::Flex)),
            (r#"{"device":"tch"}"#, Some(DeviceKind::LibTorch)),
        ] {
            let d: D = serde_json::from_str(text).unwrap();
            assert_eq!(d, D { device });
            assert_eq!(serde_json::to_string(&d).unwrap(), text);
        }
        assert!(serde_json::from_str::<D>(r#"{"device":"tpu"}"#).is_err());
    }
}
