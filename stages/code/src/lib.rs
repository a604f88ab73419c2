//! Digests of the code that a crate of stage kinds is built from, for the kinds' cache keys.
//!
//! A crate with stage kinds calls [`write_build_constants`] from its build script. The script
//! reads the workspace's `Cargo.lock` and manifests, follows the crate's normal dependencies
//! (not dev- or build-dependencies), and writes one digest per workspace crate it reaches (every
//! file under `src/`, and the manifest's dependency and feature tables) plus one of the locked
//! name, version, source and checksum of every external crate it reaches. Tests, benches and
//! examples are not under `src/`, so changing them changes nothing. The engine puts the digests
//! into every key of the crate's kinds and names the crates whose digest changed when it explains
//! a rerun.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The part name of the external crates' digest.
pub const DEPENDENCIES: &str = "dependencies";

/// Why the code digests could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum CodeError {
    /// A file or directory could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A manifest or the lock file is not what Cargo writes.
    #[error("{path}: {message}")]
    Manifest {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The package is not a member of the workspace.
    #[error("`{package}` is not a member of the workspace at {root}")]
    NotAMember {
        /// The package asked for.
        package: String,
        /// The workspace root.
        root: PathBuf,
    },
    /// A build-script variable is missing (the function ran outside a build script).
    #[error("`{0}` is not set; call this from a build script")]
    NotInBuildScript(&'static str),
}

/// The code of a package, as [`code_parts`] finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeParts {
    /// `(crate name, hex digest)` for every workspace crate in the package's normal-dependency
    /// closure, the package itself included, sorted by name, then `(DEPENDENCIES, hex digest)`
    /// of the external crates in that closure.
    pub parts: Vec<(String, String)>,
    /// The files and directories read, for a build script's `rerun-if-changed`.
    pub read: Vec<PathBuf>,
}

/// The digests of `package`'s code (see [`CodeParts`]).
pub fn code_parts(workspace_root: &Path, package: &str) -> Result<CodeParts, CodeError> {
    let ws = Workspace::read(workspace_root)?;
    let (members, externals) = ws.closure(package)?;
    let mut parts = Vec::new();
    let mut read = vec![ws.lock_path.clone(), workspace_root.join("Cargo.toml")];
    for name in &members {
        let dir = &ws.members[name];
        parts.push((name.clone(), crate_digest(dir)?));
        read.push(dir.join("Cargo.toml"));
        read.push(dir.join("src"));
    }
    let mut hasher = blake3::Hasher::new();
    for id in &externals {
        let p = &ws.lock[id];
        for field in [&p.name, &p.version, &p.source, &p.checksum] {
            hash_field(&mut hasher, field.as_bytes());
        }
    }
    parts.push((
        DEPENDENCIES.to_string(),
        hasher.finalize().to_hex().to_string(),
    ));
    Ok(CodeParts { parts, read })
}

/// The digest of one crate's code: its manifest's `dependencies`, `target` and `features`
/// tables (so that comments and dev-dependencies do not count) and every file under `src/`, by
/// relative path and content.
pub fn crate_digest(crate_dir: &Path) -> Result<String, CodeError> {
    let manifest_path = crate_dir.join("Cargo.toml");
    let manifest = read_toml(&manifest_path)?;
    let mut hasher = blake3::Hasher::new();
    for table in ["dependencies", "target", "features"] {
        let text = manifest
            .get(table)
            .map(|v| v.to_string())
            .unwrap_or_default();
        hash_field(&mut hasher, table.as_bytes());
        hash_field(&mut hasher, text.as_bytes());
    }
    let src = crate_dir.join("src");
    let mut files = Vec::new();
    list_files(&src, &src, &mut files)?;
    files.sort();
    for relative in files {
        let path = src.join(&relative);
        let bytes = std::fs::read(&path).map_err(|source| CodeError::Io { path, source })?;
        hash_field(&mut hasher, relative.as_bytes());
        hash_field(&mut hasher, &bytes);
    }
    Ok(hasher.finalize().to_hex().to_string())
}

/// For a build script: writes `$OUT_DIR/code.rs`, which defines
/// `pub const CODE: dag_api::Code` for the package being built, and tells Cargo to run the
/// script again when any of the files it read changes. The package's `lib.rs` includes it with
/// `include!(concat!(env!("OUT_DIR"), "/code.rs"));`.
pub fn write_build_constants() -> Result<(), CodeError> {
    let var = |name: &'static str| std::env::var_os(name).ok_or(CodeError::NotInBuildScript(name));
    let manifest_dir = PathBuf::from(var("CARGO_MANIFEST_DIR")?);
    let package = var("CARGO_PKG_NAME")?.to_string_lossy().into_owned();
    let out = PathBuf::from(var("OUT_DIR")?).join("code.rs");
    let root = workspace_root(&manifest_dir).ok_or_else(|| CodeError::Manifest {
        path: manifest_dir.join("Cargo.toml"),
        message: "no Cargo.lock in this directory or above it: build inside the workspace"
            .to_string(),
    })?;
    let CodeParts { parts, read } = code_parts(&root, &package)?;
    let mut text = String::from(
        "/// The code this crate's stage kinds compute with (written by its build script through\n\
         /// `dag_code::write_build_constants`): a digest per workspace crate it is built from and\n\
         /// one of the locked external crates.\n\
         pub const CODE: dag_api::Code = dag_api::Code {\n    parts: &[\n",
    );
    for (name, digest) in &parts {
        let _ = writeln!(text, "        ({name:?}, {digest:?}),");
    }
    text.push_str("    ],\n};\n");
    std::fs::write(&out, text).map_err(|source| CodeError::Io { path: out, source })?;
    for path in read {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    Ok(())
}

/// The nearest directory at or above `dir` that holds a `Cargo.lock`.
fn workspace_root(dir: &Path) -> Option<PathBuf> {
    dir.ancestors()
        .find(|d| d.join("Cargo.lock").is_file())
        .map(Path::to_path_buf)
}

/// A length-prefixed field, so that no two sequences of fields hash alike.
fn hash_field(hasher: &mut blake3::Hasher, bytes: &[u8]) {
    hasher.update(&(bytes.len() as u64).to_le_bytes());
    hasher.update(bytes);
}

/// Files under `dir`, as paths relative to `base` with `/` separators.
fn list_files(base: &Path, dir: &Path, out: &mut Vec<String>) -> Result<(), CodeError> {
    let entries = std::fs::read_dir(dir).map_err(|source| CodeError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    for entry in entries {
        let entry = entry.map_err(|source| CodeError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = entry.path();
        if path.is_dir() {
            list_files(base, &path, out)?;
        } else {
            let relative = path.strip_prefix(base).unwrap_or(&path);
            let parts: Vec<String> = relative
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            out.push(parts.join("/"));
        }
    }
    Ok(())
}

fn read_toml(path: &Path) -> Result<toml::Table, CodeError> {
    let text = std::fs::read_to_string(path).map_err(|source| CodeError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    text.parse::<toml::Table>()
        .map_err(|e| CodeError::Manifest {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

/// One `[[package]]` of `Cargo.lock`.
struct Locked {
    name: String,
    version: String,
    /// Empty for workspace members and other path crates.
    source: String,
    checksum: String,
    /// As written: `name`, `name version` or `name version (source)`.
    dependencies: Vec<String>,
}

/// The workspace's members and lock file.
struct Workspace {
    lock_path: PathBuf,
    /// `name version` -> package.
    lock: BTreeMap<String, Locked>,
    /// Member name -> its directory.
    members: BTreeMap<String, PathBuf>,
}

impl Workspace {
    fn read(root: &Path) -> Result<Self, CodeError> {
        let manifest_path = root.join("Cargo.toml");
        let manifest = read_toml(&manifest_path)?;
        let mut dirs = Vec::new();
        if manifest.contains_key("package") {
            dirs.push(root.to_path_buf());
        }
        let listed = manifest
            .get("workspace")
            .and_then(|w| w.get("members"))
            .and_then(|m| m.as_array())
            .cloned()
            .unwrap_or_default();
        for m in listed {
            let m = m.as_str().ok_or_else(|| CodeError::Manifest {
                path: manifest_path.clone(),
                message: "a workspace member is not a string".into(),
            })?;
            dirs.push(root.join(m));
        }
        let mut members = BTreeMap::new();
        for dir in dirs {
            let path = dir.join("Cargo.toml");
            let name = read_toml(&path)?
                .get("package")
                .and_then(|p| p.get("name"))
                .and_then(|n| n.as_str())
                .map(str::to_string)
                .ok_or_else(|| CodeError::Manifest {
                    path: path.clone(),
                    message: "no [package] name".into(),
                })?;
            members.insert(name, dir);
        }
        let lock_path = root.join("Cargo.lock");
        let lock_toml = read_toml(&lock_path)?;
        let mut lock = BTreeMap::new();
        for p in lock_toml
            .get("package")
            .and_then(|p| p.as_array())
            .into_iter()
            .flatten()
        {
            let field = |k: &str| p.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
            let locked = Locked {
                name: field("name"),
                version: field("version"),
                source: field("source"),
                checksum: field("checksum"),
                dependencies: p
                    .get("dependencies")
                    .and_then(|d| d.as_array())
                    .into_iter()
                    .flatten()
                    .filter_map(|d| d.as_str().map(str::to_string))
                    .collect(),
            };
            lock.insert(format!("{} {}", locked.name, locked.version), locked);
        }
        Ok(Self {
            lock_path,
            lock,
            members,
        })
    }

    /// The lock id (`name version`) a dependency string of `from`'s lock entry names.
    fn resolve(&self, dependency: &str) -> Option<String> {
        let mut words = dependency.split_whitespace();
        let name = words.next()?;
        match words.next() {
            Some(version) => Some(format!("{name} {version}")),
            None => self
                .lock
                .keys()
                .find(|id| id.split_once(' ').is_some_and(|(n, _)| n == name))
                .cloned(),
        }
    }

    /// The members (by name) and external packages (by lock id) that `package` is built from
    /// through normal dependencies, `package` itself among the members.
    fn closure(&self, package: &str) -> Result<(BTreeSet<String>, BTreeSet<String>), CodeError> {
        if !self.members.contains_key(package) {
            return Err(CodeError::NotAMember {
                package: package.to_string(),
                root: self
                    .lock_path
                    .parent()
                    .unwrap_or(Path::new("."))
                    .to_path_buf(),
            });
        }
        let mut members = BTreeSet::new();
        let mut externals = BTreeSet::new();
        let mut queue = VecDeque::from([package.to_string()]);
        while let Some(name) = queue.pop_front() {
            if !members.insert(name.clone()) {
                continue;
            }
            let normal = self.normal_dependencies(&name)?;
            let entry = self
                .lock
                .values()
                .find(|p| p.name == name && p.source.is_empty());
            for dep in entry.map(|e| e.dependencies.as_slice()).unwrap_or(&[]) {
                let dep_name = dep.split_whitespace().next().unwrap_or("");
                if !normal.contains(dep_name) {
                    continue;
                }
                if self.members.contains_key(dep_name) {
                    queue.push_back(dep_name.to_string());
                } else if let Some(id) = self.resolve(dep) {
                    self.add_external(&id, &mut externals);
                }
            }
        }
        Ok((members, externals))
    }

    fn add_external(&self, id: &str, externals: &mut BTreeSet<String>) {
        let mut stack = vec![id.to_string()];
        while let Some(id) = stack.pop() {
            let Some(p) = self.lock.get(&id) else {
                continue;
            };
            if !externals.insert(id) {
                continue;
            }
            stack.extend(p.dependencies.iter().filter_map(|d| self.resolve(d)));
        }
    }

    /// The package names of a member's normal dependencies (all targets, optional ones too).
    fn normal_dependencies(&self, member: &str) -> Result<BTreeSet<String>, CodeError> {
        let path = self.members[member].join("Cargo.toml");
        let manifest = read_toml(&path)?;
        let mut tables = vec![manifest.get("dependencies").cloned()];
        if let Some(targets) = manifest.get("target").and_then(|t| t.as_table()) {
            tables.extend(targets.values().map(|t| t.get("dependencies").cloned()));
        }
        let mut names = BTreeSet::new();
        for table in tables.into_iter().flatten() {
            for (key, spec) in table.as_table().into_iter().flatten() {
                let renamed = spec.get("package").and_then(|p| p.as_str());
                names.insert(renamed.unwrap_or(key).to_string());
            }
        }
        Ok(names)
    }
}
