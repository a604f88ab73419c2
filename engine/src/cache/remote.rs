//! A cache shared across machines: the results of stage runs in an object store (`s3://` for
//! AWS S3 and S3-compatible servers such as MinIO, Garage or Ceph; `file://` for a shared
//! directory), through the `object_store` crate.
//!
//! ```text
//! <url>/blobs/<digest>        an object's bytes, named by their blake3 digest
//! <url>/index/<key>.json      a run's manifest, written after every blob it names
//! ```
//!
//! Blobs are content-addressed, so uploading one twice is harmless and two machines uploading
//! the same one write the same bytes. A manifest goes up last and names only blobs already
//! there: a push killed half-way leaves blobs that nothing names, never an index entry that a
//! pull would take for a result. Index entries are created, not overwritten, where the store
//! can refuse an existing object (`file://`, S3 with conditional puts); elsewhere two pushes of
//! one key race to write two complete manifests of the same result, and one of them stays.
//! Everything pulled is checked before use: the manifest against its checksum and its key,
//! every blob against its digest.
//!
//! Credentials are never written by dag: S3's come from the usual environment variables
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`,
//! `AWS_ENDPOINT`, `AWS_ALLOW_HTTP`, ...) or, for the keys and the region, the shared files
//! `~/.aws/credentials` and `~/.aws/config` (profile `AWS_PROFILE`, else `default`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use super::{parse_manifest, Cache, CacheError, Manifest};

/// A failure of the remote cache, naming the remote and what to do.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The URL names no store dag can open.
    #[error("cannot use `{url}` as a remote cache: {message}")]
    Url {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        message: String,
    },
    /// The store refused or failed an operation.
    #[error("remote cache {url}: cannot {op} {path}: {source}")]
    Store {
        /// The remote's URL.
        url: String,
        /// What was being done.
        op: &'static str,
        /// The object concerned.
        path: String,
        /// The store's error.
        #[source]
        source: Box<object_store::Error>,
    },
    /// Something pulled does not match what names it.
    #[error("remote cache {url}: {what} is damaged ({message}); it was not used")]
    Damaged {
        /// The remote's URL.
        url: String,
        /// The object concerned.
        what: String,
        /// How it differs.
        message: String,
    },
    /// The local cache failed.
    #[error(transparent)]
    Cache(#[from] CacheError),
}

/// What a push did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PushReport {
    /// Runs whose index entry this push wrote.
    pub published: usize,
    /// Runs the remote already had.
    pub present: usize,
    /// Blobs uploaded.
    pub blobs: usize,
    /// Bytes uploaded.
    pub bytes: u64,
}

/// An object store holding stage results.
pub struct Remote {
    url: String,
    store: Arc<dyn ObjectStore>,
    prefix: StorePath,
    runtime: tokio::runtime::Runtime,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").field("url", &self.url).finish()
    }
}

impl Remote {
    /// Opens the store at `url`: `s3://bucket[/prefix]` or `file:///absolute/dir` (created
    /// if missing).
    pub fn open(url: &str) -> Result<Self, RemoteError> {
        let bad = |message: String| RemoteError::Url {
            url: url.to_string(),
            message,
        };
        // HTTPS to S3 goes through rustls on ring (see Cargo.toml), installed before the S3
        // client is built; a provider installed by someone else first is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("expected s3://bucket[/prefix] or file:///absolute/path".into()))?;
        let (store, prefix): (Arc<dyn ObjectStore>, String) = match scheme {
            "file" => {
                let dir = PathBuf::from(rest);
                if !dir.is_absolute() {
                    return Err(bad(format!(
                        "a file:// remote needs an absolute path (file:///shared/cache), got \
                         `{rest}`"
                    )));
                }
                std::fs::create_dir_all(&dir).map_err(|e| bad(format!("cannot create it: {e}")))?;
                let store = LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|e| bad(e.to_string()))?
                    .with_automatic_cleanup(true);
                (Arc::new(store), String::new())
            }
            "s3" => {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    return Err(bad("no bucket in the URL".into()));
                }
                let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
                for (key, value) in aws_shared_files() {
                    builder = builder.with_config(key, value);
                }
                let store = builder.build().map_err(|e| bad(e.to_string()))?;
                (Arc::new(store), prefix.trim_matches('/').to_string())
            }
            other => {
                return Err(bad(format!(
                    "unknown scheme `{other}://`; use s3:// or file://"
                )))
            }
        };
        // Stages finishing at once push from their own threads.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| bad(format!("cannot start the I/O runtime: {e}")))?;
        Ok(Self {
            url: url.to_string(),
            store,
            prefix: StorePath::from(prefix),
            runtime,
        })
    }

    /// The URL it was opened with.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn blob_path(&self, digest: &str) -> StorePath {
        self.prefix.clone().join("blobs").join(digest)
    }

    fn index_path(&self, key: &str) -> StorePath {
        self.prefix
            .clone()
            .join("index")
            .join(format!("{key}.json"))
    }

    fn store_err(
        &self,
        op: &'static str,
        path: &StorePath,
    ) -> impl FnOnce(object_store::Error) -> RemoteError + '_ {
        let path = path.to_string();
        move |source| RemoteError::Store {
            url: self.url.clone(),
            op,
            path,
            source: Box::new(source),
        }
    }

    fn exists(&self, path: &StorePath) -> Result<bool, RemoteError> {
        match self.runtime.block_on(self.store.head(path)) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.store_err("look up", path)(e)),
        }
    }

    /// Whether the remote has a result for `key`.
    pub fn has(&self, key: &str) -> Result<bool, RemoteError> {
        self.exists(&self.index_path(key))
    }

    /// Publishes the run `m` of `cache`: its blobs (outputs and log) that the remote lacks,
    /// then its index entry.
    pub fn push(&self, cache: &Cache, m: &Manifest) -> Result<PushReport, RemoteError> {
        let mut report = PushReport::default();
        let index = self.index_path(&m.key);
        if self.exists(&index)? {
            report.present = 1;
            return Ok(report);
        }
        for digest in blob_digests(m) {
            let path = self.blob_path(digest);
            if self.exists(&path)? {
                continue;
            }
            let local = cache.object_path(digest);
            let bytes = std::fs::read(&local).map_err(|e| CacheError::Io {
                op: "read",
                path: local.clone(),
                source: e,
            })?;
            report.bytes += bytes.len() as u64;
            report.blobs += 1;
            self.runtime
                .block_on(self.store.put(&path, PutPayload::from(bytes)))
                .map_err(self.store_err("upload", &path))?;
        }
        let bytes = std::fs::read(cache.manifest_path(&m.key)).map_err(|e| CacheError::Io {
            op: "read",
            path: cache.manifest_path(&m.key),
            source: e,
        })?;
        let create = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        let put = self.runtime.block_on(self.store.put_opts(
            &index,
            PutPayload::from(bytes.clone()),
            create,
        ));
        match put {
            Ok(_) => report.published = 1,
            // Another machine published the same key first: its manifest names the same
            // result.
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => report.present = 1,
            // A store without create-only puts: the blobs are all there, so a plain put
            // leaves a complete manifest whichever writer wins.
            Err(object_store::Error::NotImplemented { .. }) => {
                self.runtime
                    .block_on(self.store.put(&index, PutPayload::from(bytes)))
                    .map_err(self.store_err("publish", &index))?;
                report.published = 1;
            }
            Err(e) => return Err(self.store_err("publish", &index)(e)),
        }
        Ok(report)
    }

    /// Brings the run of `key` into `cache` when the remote has it: the manifest (checked
    /// against its checksum and key), then every blob it names that the cache lacks (checked
    /// against its digest), then the local manifest. `None` when the remote has no such run.
    pub fn pull(&self, cache: &Cache, key: &str) -> Result<Option<Manifest>, RemoteError> {
        let index = self.index_path(key);
        let bytes = match self.runtime.block_on(self.store.get(&index)) {
            Ok(got) => self
                .runtime
                .block_on(got.bytes())
                .map_err(self.store_err("download", &index))?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.store_err("download", &index)(e)),
        };
        let damaged = |what: String, message: String| RemoteError::Damaged {
            url: self.url.clone(),
            what,
            message,
        };
        let m = parse_manifest(Path::new(index.as_ref()), &bytes)
            .map_err(|e| damaged(format!("index entry {index}"), e.to_string()))?;
        if m.key != key {
            return Err(damaged(
                format!("index entry {index}"),
                format!("it holds the run of key {}", m.key),
            ));
        }
        for digest in blob_digests(&m) {
            if cache.object_path(digest).exists() {
                continue;
            }
            let path = self.blob_path(digest);
            let got = self
                .runtime
                .block_on(async { self.store.get(&path).await?.bytes().await })
                .map_err(self.store_err("download", &path))?;
            let actual = blake3::hash(&got).to_hex().to_string();
            if actual != digest {
                return Err(damaged(
                    format!("blob {path}"),
                    format!("its bytes hash to {actual}"),
                ));
            }
            let tmp = cache.tmp_path("pull");
            std::fs::write(&tmp, &got).map_err(|e| CacheError::Io {
                op: "write",
                path: tmp.clone(),
                source: e,
            })?;
            cache.put_object(&tmp, digest)?;
        }
        cache.write_manifest(&m)?;
        Ok(Some(m))
    }
}

/// The objects a run names (its outputs' files and its log), each once.
fn blob_digests(m: &Manifest) -> Vec<&str> {
    let mut digests: Vec<&str> = m
        .outputs
        .values()
        .flat_map(|t| t.entries.iter().map(|e| e.digest.as_str()))
        .chain(m.log.as_deref())
        .collect();
    digests.sort_unstable();
    digests.dedup();
    digests
}

/// The S3 settings of the shared AWS files that the environment does not set: the keys from
/// `~/.aws/credentials`, the region from `~/.aws/config`, for profile `AWS_PROFILE` (else
/// `default`). `AWS_SHARED_CREDENTIALS_FILE` and `AWS_CONFIG_FILE` move the files.
fn aws_shared_files() -> Vec<(object_store::aws::AmazonS3ConfigKey, String)> {
    use object_store::aws::AmazonS3ConfigKey as K;
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let file = |var: &str, name: &str| {
        std::env::var_os(var)
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(".aws").join(name)))
    };
    let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into());
    let mut out = Vec::new();
    let set = |var: &str| std::env::var_os(var).is_some();
    if !set("AWS_ACCESS_KEY_ID") {
        if let Some(values) = file("AWS_SHARED_CREDENTIALS_FILE", "credentials")
            .and_then(|p| ini_section(&p, &profile))
        {
            for (name, key) in [
                ("aws_access_key_id", K::AccessKeyId),
                ("aws_secret_access_key", K::SecretAccessKey),
                ("aws_session_token", K::Token),
            ] {
                if let Some(v) = values.iter().find(|(k, _)| k == name) {
                    out.push((key, v.1.clone()));
                }
            }
        }
    }
    if !set("AWS_REGION") && !set("AWS_DEFAULT_REGION") {
        // The config file names profiles `[profile x]`, except `[default]`.
        let section = if profile == "default" {
            profile.clone()
        } else {
            format!("profile {profile}")
        };
        if let Some(values) =
            file("AWS_CONFIG_FILE", "config").and_then(|p| ini_section(&p, &section))
        {
            if let Some(v) = values.iter().find(|(k, _)| k == "region") {
                out.push((K::Region, v.1.clone()));
            }
        }
    }
    out
}

/// The `key = value` lines of section `[name]` of an INI file.
fn ini_section(path: &Path, name: &str) -> Option<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut inside = false;
    let mut values = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') && line.ends_with(']') {
            inside = line[1..line.len() - 1].trim() == name;
        } else if inside {
            if let Some((k, v)) = line.split_once('=') {
                values.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
    }
    (!values.is_empty()).then_some(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ini_sections_are_read_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("credentials");
        std::fs::write(
            &p,
            "[default]\naws_access_key_id = A\n[lab]\naws_access_key_id=B\naws_secret_access_key = S\n",
        )
        .unwrap();
        assert_eq!(
            ini_section(&p, "lab").unwrap(),
            [
                ("aws_access_key_id".to_string(), "B".to_string()),
                ("aws_secret_access_key".to_string(), "S".to_string())
            ]
        );
        assert!(ini_section(&p, "other").is_none());
    }
}
