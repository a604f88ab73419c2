//! `dag gc` and `dag verify`: walking the cache layout to drop what no run needs and to find,
//! quarantine and repair what was damaged. Both return a report; the CLI prints it.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::{remove_all, Cache, CacheError, Ctx, Manifest, OutputTree};

/// What [`Cache::gc`] deleted (or, on a dry run, would delete).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GcReport {
    /// Whether nothing was deleted.
    pub dry_run: bool,
    /// Manifests of old runs dropped by `keep_last`.
    pub runs: usize,
    /// Objects no remaining manifest names.
    pub objects: usize,
    /// Their bytes.
    pub bytes: u64,
    /// Materialised trees no remaining manifest names.
    pub trees: usize,
}

impl fmt::Display for GcReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}{} old runs, {} objects ({:.1} MiB) and {} trees",
            if self.dry_run {
                "would delete "
            } else {
                "deleted "
            },
            self.runs,
            self.objects,
            self.bytes as f64 / 1048576.0,
            self.trees
        )
    }
}

/// One problem [`Cache::verify`] found, and what it did about it.
#[derive(Debug, Clone, PartialEq)]
pub enum VerifyFinding {
    /// A manifest that does not parse or fails its checksum, moved aside.
    CorruptManifest {
        /// What is wrong with it.
        problem: String,
        /// Where it went.
        moved_to: PathBuf,
    },
    /// A stage's latest pointer names a manifest that is gone.
    MissingManifest {
        /// The run's key.
        key: String,
        /// `<pipeline>/<stage>`.
        stage: String,
    },
    /// An object whose bytes no longer hash to its name, moved aside.
    CorruptObject {
        /// Its digest.
        digest: String,
        /// Where it went.
        moved_to: PathBuf,
    },
    /// An object a manifest names that is gone.
    MissingObject {
        /// Its digest.
        digest: String,
        /// The manifest's key.
        key: String,
        /// `<pipeline>/<stage>` of that run.
        stage: String,
    },
    /// A materialised tree with a file removed or replaced, rebuilt from its objects.
    DamagedTree {
        /// The tree's digest.
        digest: String,
        /// `<pipeline>/<stage>` of the run that wrote it.
        stage: String,
    },
}

impl fmt::Display for VerifyFinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::CorruptManifest { problem, moved_to } => {
                write!(
                    f,
                    "corrupt manifest {problem}; moved to {}",
                    moved_to.display()
                )
            }
            Self::MissingManifest { key, stage } => {
                write!(
                    f,
                    "missing manifest runs/{key}.json (the latest run of {stage})"
                )
            }
            Self::CorruptObject { digest, moved_to } => {
                write!(f, "corrupt object {digest} moved to {}", moved_to.display())
            }
            Self::MissingObject { digest, key, stage } => {
                write!(
                    f,
                    "missing object {digest} (named by runs/{key}.json, {stage})"
                )
            }
            Self::DamagedTree { digest, stage } => {
                write!(
                    f,
                    "damaged tree {digest} of {stage} rebuilt from its objects"
                )
            }
        }
    }
}

/// What [`Cache::verify`] checked and found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VerifyReport {
    /// Manifests read.
    pub manifests: usize,
    /// Objects hashed.
    pub objects: usize,
    /// Every problem, in the order found.
    pub findings: Vec<VerifyFinding>,
    /// `<pipeline>/<stage>` of the runs dropped because they lost an object.
    pub dropped: Vec<String>,
}

impl VerifyReport {
    /// Whether the cache is intact.
    pub fn is_clean(&self) -> bool {
        self.findings.is_empty()
    }

    fn count(&self, kind: fn(&VerifyFinding) -> bool) -> usize {
        self.findings.iter().filter(|f| kind(f)).count()
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use VerifyFinding as F;
        write!(
            f,
            "verified {} manifests, {} objects: {} corrupt manifests, {} missing manifests, {} \
             corrupt objects, {} missing objects, {} damaged trees",
            self.manifests,
            self.objects,
            self.count(|x| matches!(x, F::CorruptManifest { .. })),
            self.count(|x| matches!(x, F::MissingManifest { .. })),
            self.count(|x| matches!(x, F::CorruptObject { .. })),
            self.count(|x| matches!(x, F::MissingObject { .. })),
            self.count(|x| matches!(x, F::DamagedTree { .. })),
        )
    }
}

/// The objects and trees `manifests` name.
fn reachable(manifests: &[Manifest]) -> (HashSet<String>, HashSet<String>) {
    let mut objects = HashSet::new();
    let mut trees = HashSet::new();
    for m in manifests {
        for t in m.outputs.values() {
            trees.insert(t.digest.clone());
            objects.extend(t.entries.iter().map(|e| e.digest.clone()));
        }
        if let Some(l) = &m.log {
            objects.insert(l.clone());
        }
    }
    (objects, trees)
}

impl Cache {
    /// How many objects the cache holds and their bytes.
    pub fn object_totals(&self) -> (u64, u64) {
        self.list_objects()
            .iter()
            .fold((0, 0), |(n, bytes), (_, path)| {
                (
                    n + 1,
                    bytes + fs::metadata(path).map(|m| m.len()).unwrap_or(0),
                )
            })
    }

    /// Every object: (digest, path).
    fn list_objects(&self) -> Vec<(String, PathBuf)> {
        walkdir::WalkDir::new(self.objects_dir())
            .min_depth(2)
            .max_depth(2)
            .into_iter()
            .flatten()
            .map(|e| {
                let prefix = e
                    .path()
                    .parent()
                    .and_then(|p| p.file_name())
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                (
                    format!("{prefix}{}", e.file_name().to_string_lossy()),
                    e.path().to_path_buf(),
                )
            })
            .collect()
    }

    /// Drops the manifests of all but the `keep_last` newest runs of each stage (never a
    /// stage's latest run), then every object and tree no remaining manifest names. Takes the
    /// cache's lock, waiting for it.
    pub fn gc(&self, keep_last: Option<usize>, dry_run: bool) -> Result<GcReport, CacheError> {
        let _lock = self.lock(true)?;
        let mut report = GcReport {
            dry_run,
            ..GcReport::default()
        };
        let mut manifests = self.manifests()?;
        if let Some(n) = keep_last {
            let mut by_stage: BTreeMap<(String, String), Vec<Manifest>> = BTreeMap::new();
            for m in manifests.drain(..) {
                by_stage
                    .entry((m.pipeline.clone(), m.stage.clone()))
                    .or_default()
                    .push(m);
            }
            for ((pipeline, stage), mut runs) in by_stage {
                runs.sort_by(|a, b| {
                    b.finished_unix
                        .total_cmp(&a.finished_unix)
                        .then(a.key.cmp(&b.key))
                });
                let latest = self.latest(&pipeline, &stage);
                for (k, m) in runs.into_iter().enumerate() {
                    if k < n || latest.as_deref() == Some(m.key.as_str()) {
                        manifests.push(m);
                    } else {
                        report.runs += 1;
                        if !dry_run {
                            let path = self.manifest_path(&m.key);
                            fs::remove_file(&path).ctx("remove", &path)?;
                        }
                    }
                }
            }
        }
        let (objects, trees) = reachable(&manifests);
        for (digest, path) in self.list_objects() {
            if !objects.contains(&digest) {
                report.objects += 1;
                report.bytes += fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                if !dry_run {
                    let _ = fs::remove_file(&path);
                }
            }
        }
        if let Ok(rd) = fs::read_dir(self.trees_dir()) {
            for e in rd.flatten() {
                if !trees.contains(e.file_name().to_string_lossy().as_ref()) {
                    report.trees += 1;
                    if !dry_run {
                        let _ = remove_all(&e.path());
                    }
                }
            }
        }
        Ok(report)
    }

    /// Re-hashes the objects (all, or only those the runs `scope` names and their outputs),
    /// checks every manifest and every latest pointer, and repairs what it can: corrupt
    /// manifests and objects go to `quarantine/`, runs that lost an object are dropped (the next
    /// `dag run` recomputes them), and damaged trees are rebuilt from their objects. Takes the
    /// cache's lock, waiting for it.
    pub fn verify(&self, scope: Option<&[String]>) -> Result<VerifyReport, CacheError> {
        let _lock = self.lock(true)?;
        let quarantine = self.quarantine_dir();
        fs::create_dir_all(&quarantine).ctx("create", &quarantine)?;
        let move_aside = |from: &Path, name: &str| -> Result<PathBuf, CacheError> {
            let to = quarantine.join(name);
            fs::rename(from, &to).ctx("quarantine", from)?;
            Ok(to)
        };
        let mut report = VerifyReport::default();
        // Manifests first: a damaged one must neither be trusted nor hide the objects it names.
        let runs = self.runs_dir();
        let mut keys: Vec<String> = fs::read_dir(&runs)
            .ctx("list", &runs)?
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".json"))
                    .map(str::to_string)
            })
            .collect();
        keys.sort();
        report.manifests = keys.len();
        let mut manifests = Vec::new();
        let mut quarantined_keys = HashSet::new();
        for key in &keys {
            match self.check_manifest(key) {
                Ok(Some(m)) => manifests.push(m),
                Ok(None) => {}
                Err(e) => {
                    quarantined_keys.insert(key.clone());
                    let moved_to =
                        move_aside(&self.manifest_path(key), &format!("run-{key}.json"))?;
                    report.findings.push(VerifyFinding::CorruptManifest {
                        problem: e.to_string(),
                        moved_to,
                    });
                }
            }
        }
        // A manifest deleted by hand leaves its stage's latest pointer behind; that is the only
        // trace.
        let latest_dir = self.latest_dir();
        for e in walkdir::WalkDir::new(&latest_dir)
            .min_depth(2)
            .max_depth(2)
            .sort_by_file_name()
            .into_iter()
            .flatten()
        {
            let Ok(key) = fs::read_to_string(e.path()) else {
                continue;
            };
            let key = key.trim();
            if !self.manifest_path(key).exists() && !quarantined_keys.contains(key) {
                let stage = e.path().strip_prefix(&latest_dir).unwrap_or(e.path());
                report.findings.push(VerifyFinding::MissingManifest {
                    key: key.to_string(),
                    stage: stage.display().to_string(),
                });
            }
        }
        let scope: Option<HashSet<String>> = scope.map(|keys| {
            let runs: Vec<Manifest> = manifests
                .iter()
                .filter(|m| keys.contains(&m.key))
                .cloned()
                .collect();
            reachable(&runs).0
        });
        let in_scope = |d: &String| scope.as_ref().is_none_or(|s| s.contains(d));
        let objects: Vec<(String, PathBuf)> = self
            .list_objects()
            .into_iter()
            .filter(|(d, _)| in_scope(d))
            .collect();
        report.objects = objects.len();
        let corrupt: BTreeSet<String> = objects
            .par_iter()
            .filter_map(|(digest, path)| {
                let size = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
                match crate::hash::hash_file(path, size) {
                    Ok(d) if &d == digest => None,
                    _ => Some(digest.clone()),
                }
            })
            .collect();
        for d in &corrupt {
            let moved_to = move_aside(&self.object_path(d), d)?;
            report.findings.push(VerifyFinding::CorruptObject {
                digest: d.clone(),
                moved_to,
            });
        }
        // Objects a manifest names but that are gone (deleted by hand, lost in a crash).
        let mut missing: BTreeSet<String> = BTreeSet::new();
        for m in &manifests {
            for d in m
                .outputs
                .values()
                .flat_map(|t| t.entries.iter().map(|e| &e.digest))
                .chain(m.log.iter())
            {
                if in_scope(d)
                    && !corrupt.contains(d)
                    && !self.object_path(d).exists()
                    && missing.insert(d.clone())
                {
                    report.findings.push(VerifyFinding::MissingObject {
                        digest: d.clone(),
                        key: m.key.clone(),
                        stage: format!("{}/{}", m.pipeline, m.stage),
                    });
                }
            }
        }
        let lost: BTreeSet<&String> = corrupt.iter().chain(&missing).collect();
        for m in &manifests {
            let uses = |t: &OutputTree| t.entries.iter().any(|e| lost.contains(&e.digest));
            if m.outputs.values().any(uses) || m.log.as_ref().is_some_and(|l| lost.contains(l)) {
                let _ = fs::remove_file(self.manifest_path(&m.key));
                // Tree files are hard links to the objects, so the trees are corrupt too.
                for t in m.outputs.values().filter(|t| uses(t)) {
                    let _ = remove_all(&self.tree_path(&t.digest));
                }
                report.dropped.push(format!("{}/{}", m.pipeline, m.stage));
                continue;
            }
            // A materialised tree with a file removed or replaced is rebuilt from the objects,
            // which are intact: no stage has to run again.
            for t in m.outputs.values() {
                if scope.is_some() && !t.entries.iter().all(|e| in_scope(&e.digest)) {
                    continue;
                }
                let dir = self.tree_path(&t.digest);
                if fs::symlink_metadata(&dir).is_err() || self.tree_matches(t) {
                    continue;
                }
                remove_all(&dir).ctx("remove", &dir)?;
                self.ensure_tree(t)?;
                report.findings.push(VerifyFinding::DamagedTree {
                    digest: t.digest.clone(),
                    stage: format!("{}/{}", m.pipeline, m.stage),
                });
            }
        }
        report.dropped.sort();
        report.dropped.dedup();
        Ok(report)
    }

    /// Whether a materialised tree still holds exactly its entries: each file present, the same
    /// inode as its object when hard-linked, else the same size and bytes.
    fn tree_matches(&self, t: &OutputTree) -> bool {
        use std::os::unix::fs::MetadataExt;
        let root = self.tree_path(&t.digest);
        let files = match crate::hash::list_files(&root) {
            Ok(f) => f,
            Err(_) => return false,
        };
        if files.len() != t.entries.len() {
            return false;
        }
        files.iter().zip(&t.entries).all(|(f, e)| {
            if f.rel != e.path || f.size != e.size {
                return false;
            }
            let same_inode = match (
                fs::metadata(&f.path),
                fs::metadata(self.object_path(&e.digest)),
            ) {
                (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
                _ => false,
            };
            same_inode || crate::hash::hash_file(&f.path, f.size).is_ok_and(|d| d == e.digest)
        })
    }
}
