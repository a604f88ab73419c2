//! Content hashing: files (memory-mapped, multi-threaded blake3 for large ones), workspace paths
//! (through a stat cache, so that a no-op run never rehashes), and cheap dataset fingerprints.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::key::Encoder;

/// Files at least this large are memory-mapped and hashed on all cores.
const MMAP_THRESHOLD: u64 = 8 << 20;

/// blake3 of one file's bytes, as hex.
pub fn hash_file(path: &Path, size: u64) -> io::Result<String> {
    let mut h = blake3::Hasher::new();
    if size >= MMAP_THRESHOLD {
        h.update_mmap_rayon(path)?;
    } else {
        let mut f = fs::File::open(path)?;
        let mut buf = Vec::with_capacity(size as usize);
        f.read_to_end(&mut buf)?;
        h.update(&buf);
    }
    Ok(h.finalize().to_hex().to_string())
}

/// A regular file under a tree: path relative to the root with `/` separators.
#[derive(Debug, Clone)]
pub struct FileInfo {
    /// Path relative to the root, `/`-separated (`""` for a single-file root).
    pub rel: String,
    /// Absolute path.
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// Whether any execute bit is set.
    pub exec: bool,
}

/// Lists the regular files under `root` (or `root` itself when it is a file, with `rel` empty),
/// sorted by relative path. Symlinks and special files are refused: an artifact must be bytes.
pub fn list_files(root: &Path) -> io::Result<Vec<FileInfo>> {
    let meta = fs::symlink_metadata(root)?;
    if meta.is_file() {
        return Ok(vec![FileInfo {
            rel: String::new(),
            path: root.to_path_buf(),
            size: meta.len(),
            exec: meta.mode() & 0o111 != 0,
        }]);
    }
    let mut out = Vec::new();
    for e in walkdir::WalkDir::new(root).min_depth(1).sort_by_file_name() {
        let e = e.map_err(io::Error::other)?;
        let ft = e.file_type();
        if ft.is_dir() {
            continue;
        }
        let rel = e
            .path()
            .strip_prefix(root)
            .map_err(io::Error::other)?
            .to_str()
            .ok_or_else(|| io::Error::other(format!("{} is not valid UTF-8", e.path().display())))?
            .to_string();
        if !ft.is_file() {
            return Err(io::Error::other(format!(
                "{} is a symlink or special file; artifacts may hold regular files only",
                e.path().display()
            )));
        }
        let m = e.metadata().map_err(io::Error::other)?;
        out.push(FileInfo {
            rel,
            path: e.path().to_path_buf(),
            size: m.len(),
            exec: m.mode() & 0o111 != 0,
        });
    }
    out.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok(out)
}

/// Hashes many files on all cores (large ones are themselves split across cores by blake3).
pub fn hash_files(files: &[FileInfo]) -> io::Result<Vec<String>> {
    files
        .par_iter()
        .map(|f| hash_file(&f.path, f.size))
        .collect()
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct StatEntry {
    size: u64,
    mtime_ns: i128,
    ino: u64,
    digest: String,
}

/// Remembers (path, size, mtime, inode) -> digest for workspace files, so that unchanged files are
/// not read again. Saved next to the cache's manifests.
pub struct StatCache {
    file: PathBuf,
    entries: Mutex<HashMap<PathBuf, StatEntry>>,
    dirty: Mutex<bool>,
}

impl StatCache {
    /// Loads the stat cache kept at `file` (empty when absent or unreadable: it is only a hint).
    pub fn load(file: PathBuf) -> Self {
        let entries = fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        StatCache {
            file,
            entries: Mutex::new(entries),
            dirty: Mutex::new(false),
        }
    }

    /// The digest of a workspace file, from the stat cache when its stat is unchanged.
    pub fn file_digest(&self, path: &Path, meta: &fs::Metadata) -> io::Result<String> {
        let mtime_ns = meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128;
        let probe =
            |e: &StatEntry| e.size == meta.len() && e.mtime_ns == mtime_ns && e.ino == meta.ino();
        if let Some(e) = self.entries.lock().expect("stat cache poisoned").get(path) {
            if probe(e) {
                return Ok(e.digest.clone());
            }
        }
        let digest = hash_file(path, meta.len())?;
        // A file modified within the filesystem's timestamp granularity of now could change again
        // without its mtime moving; such a "racy" entry is not remembered. Filesystems with
        // nanosecond timestamps tick at the kernel's coarse clock (a few ms); a whole-second
        // mtime suggests a coarse filesystem (FAT: 2 s).
        let now_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as i128)
            .unwrap_or(0);
        let window = if meta.mtime_nsec() == 0 {
            2_000_000_000
        } else {
            100_000_000
        };
        if now_ns - mtime_ns > window {
            self.entries.lock().expect("stat cache poisoned").insert(
                path.to_path_buf(),
                StatEntry {
                    size: meta.len(),
                    mtime_ns,
                    ino: meta.ino(),
                    digest: digest.clone(),
                },
            );
            *self.dirty.lock().expect("stat cache poisoned") = true;
        }
        Ok(digest)
    }

    /// Content digest of a workspace path: a file's digest, a directory's tree digest, or a fixed
    /// marker when it does not exist.
    pub fn path_digest(&self, path: &Path) -> io::Result<String> {
        let meta = match fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok("missing".into()),
            Err(e) => return Err(e),
        };
        if meta.is_file() {
            return self.file_digest(path, &meta);
        }
        let files = list_files(path)?;
        let digests: Vec<String> = files
            .par_iter()
            .map(|f| fs::metadata(&f.path).and_then(|m| self.file_digest(&f.path, &m)))
            .collect::<io::Result<_>>()?;
        let mut e = Encoder::new("workspace-dir");
        e.list(files.len());
        for (f, d) in files.iter().zip(&digests) {
            e.str(&f.rel).str(d);
        }
        Ok(e.finish())
    }

    /// Writes the stat cache back if it changed (atomically; failures only cost a rehash later).
    pub fn save(&self) {
        if !*self.dirty.lock().expect("stat cache poisoned") {
            return;
        }
        let entries = self.entries.lock().expect("stat cache poisoned");
        if let Ok(bytes) = serde_json::to_vec(&*entries) {
            let tmp = self
                .file
                .with_extension(format!("tmp{}", std::process::id()));
            if fs::write(&tmp, bytes).is_ok() && fs::rename(&tmp, &self.file).is_err() {
                let _ = fs::remove_file(&tmp);
            }
        }
    }
}

/// A cheap fingerprint of a dataset directory: relative paths, sizes and mtimes of every file.
///
/// Datasets are tens of GB; hashing their content on every run would cost minutes, and datasets
/// are not edited in place in practice. A file replaced with one of equal size and mtime goes
/// unnoticed; touch it (or rename the root) to force a rebuild.
pub fn dataset_fingerprint(root: &Path) -> io::Result<String> {
    let meta = match fs::metadata(root) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok("missing".into()),
        Err(e) => return Err(e),
    };
    let mut e = Encoder::new("dataset-fingerprint");
    if meta.is_file() {
        e.uint(meta.len()).uint(meta.mtime() as u64);
        return Ok(e.finish());
    }
    for entry in walkdir::WalkDir::new(root)
        .min_depth(1)
        .follow_links(true)
        .sort_by_file_name()
    {
        let entry = entry.map_err(io::Error::other)?;
        if entry.file_type().is_dir() {
            continue;
        }
        let m = entry.metadata().map_err(io::Error::other)?;
        let rel = entry.path().strip_prefix(root).map_err(io::Error::other)?;
        e.str(&rel.to_string_lossy())
            .uint(m.len())
            .uint(m.mtime() as u64)
            .uint(m.mtime_nsec() as u64);
    }
    Ok(e.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_and_small_files_hash_like_blake3() {
        let dir = tempfile::tempdir().unwrap();
        let small = dir.path().join("s");
        let big = dir.path().join("b");
        fs::write(&small, b"hello").unwrap();
        let data: Vec<u8> = (0..(MMAP_THRESHOLD as usize + 12345))
            .map(|i| (i % 251) as u8)
            .collect();
        fs::write(&big, &data).unwrap();
        assert_eq!(
            hash_file(&small, 5).unwrap(),
            blake3::hash(b"hello").to_hex().to_string()
        );
        assert_eq!(
            hash_file(&big, data.len() as u64).unwrap(),
            blake3::hash(&data).to_hex().to_string()
        );
    }

    #[test]
    fn stat_cache_notices_edits_and_tree_digest_sees_names() {
        let dir = tempfile::tempdir().unwrap();
        let sc = StatCache::load(dir.path().join("statcache.json"));
        let d = dir.path().join("d");
        fs::create_dir(&d).unwrap();
        fs::write(d.join("a"), b"1").unwrap();
        let before = sc.path_digest(&d).unwrap();
        fs::write(d.join("a"), b"2").unwrap();
        let after = sc.path_digest(&d).unwrap();
        assert_ne!(before, after);
        fs::rename(d.join("a"), d.join("b")).unwrap();
        assert_ne!(sc.path_digest(&d).unwrap(), after);
        assert_eq!(sc.path_digest(&dir.path().join("nope")).unwrap(), "missing");
    }
}
