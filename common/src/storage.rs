//! Where sweeps read and write: a local path, or an object-store URL.
//!
//! `file://` or a plain path (the embedded default), `memory://` (this process only: tests),
//! `s3://`, `gs://`, `az://`/`abfs://` with the usual environment credentials
//! (`AWS_*`, `GOOGLE_*`, `AZURE_*`), and `http(s)://` for reading.

use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt};
use url::Url;

use crate::error::{Error, Result};

/// A prefix inside an object store.
#[derive(Clone, Debug)]
pub struct Location {
    /// The store.
    pub store: Arc<dyn ObjectStore>,
    /// The prefix inside it ("" for the root).
    pub prefix: StorePath,
    /// How the user wrote it, for messages.
    pub display: String,
}

fn storage_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Storage(format!("{what}: {e}"))
}

/// Whether another try may succeed: not when the object is missing or already there, or
/// the request is refused or unsupported; otherwise (the store was unreachable or failing)
/// it may.
fn transient(e: &object_store::Error) -> bool {
    use object_store::Error as E;
    !matches!(
        e,
        E::NotFound { .. }
            | E::AlreadyExists { .. }
            | E::Precondition { .. }
            | E::NotModified { .. }
            | E::NotSupported { .. }
            | E::NotImplemented { .. }
            | E::PermissionDenied { .. }
            | E::Unauthenticated { .. }
            | E::InvalidPath { .. }
            | E::UnknownConfigurationKey { .. }
    )
}

/// A failed operation, transient or not (see [`transient`]).
fn op_error(what: &str, e: object_store::Error) -> Error {
    let message = format!("{what}: {e}");
    if transient(&e) { Error::StorageTransient(message) } else { Error::Storage(message) }
}

/// Tries of one operation that fails transiently, 250 ms, 500 ms and 1 s apart. Remote
/// stores retry each request inside object_store already; this covers the local filesystem
/// (a network mount's hiccup) and what escapes those retries. Longer outages are for the
/// callers to wait out ([`crate::retry`]), where waiting is the right thing to do.
const TRIES: u32 = 4;

/// Runs `op` up to [`TRIES`] times while it fails transiently. Every operation passed here
/// is safe to repeat: reads, whole-object puts, deletes, and exclusive creates (a retried
/// create that finds the object the first try wrote reports it as existing; the caller
/// decides whether it is its own).
async fn tries<T, Fut>(
    what: impl Fn() -> String,
    mut op: impl FnMut() -> Fut,
) -> std::result::Result<T, object_store::Error>
where
    Fut: std::future::Future<Output = std::result::Result<T, object_store::Error>>,
{
    let mut delay = std::time::Duration::from_millis(250);
    let mut tried = 1;
    loop {
        match op().await {
            Err(e) if tried < TRIES && transient(&e) => {
                tracing::warn!("{} failed, retrying in {delay:?}: {e}", what());
                tokio::time::sleep(delay).await;
                delay *= 2;
                tried += 1;
            }
            outcome => return outcome,
        }
    }
}

/// Whether `s` is a URL (`scheme://...`) rather than a local path. Any scheme counts, so
/// that one this module does not open (`ftp://`) is refused by [`Location::open`] instead
/// of becoming a local folder named `ftp:`; one letter before `:` is a Windows drive.
pub fn is_url(s: &str) -> bool {
    s.split_once("://").is_some_and(|(scheme, _)| {
        scheme.len() > 1
            && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c))
    })
}

/// Retries for remote stores: transient failures (connection errors, timeouts, 5xx, 429)
/// are retried with exponential backoff from 100 ms to 15 s, up to 10 times within 5
/// minutes, so a store's brief outage costs a sweep time, not a job. Errors that retrying
/// cannot fix (403, 404, a refused conditional write) come back at once.
fn retry() -> object_store::RetryConfig {
    object_store::RetryConfig {
        backoff: object_store::BackoffConfig {
            init_backoff: std::time::Duration::from_millis(100),
            max_backoff: std::time::Duration::from_secs(15),
            base: 2.0,
        },
        max_retries: 10,
        retry_timeout: std::time::Duration::from_secs(300),
    }
}

impl Location {
    /// Opens a path or URL. Local folders are created when `create` is set.
    pub fn open(s: &str, create: bool) -> Result<Self> {
        if !is_url(s) || s.to_ascii_lowercase().starts_with("file://") {
            let path = match s.get(..7).filter(|p| p.eq_ignore_ascii_case("file://")) {
                Some(_) => std::path::PathBuf::from(&s[7..]),
                None => std::path::PathBuf::from(s),
            };
            return Self::local(&path, create, s);
        }
        let url = Url::parse(s).map_err(|e| storage_error(&format!("bad URL {s:?}"), e))?;
        let prefix = StorePath::from_url_path(url.path())
            .map_err(|e| storage_error(&format!("bad path in {s:?}"), e))?;
        let store: Arc<dyn ObjectStore> = match url.scheme() {
            "memory" => Arc::new(object_store::memory::InMemory::new()),
            "s3" | "s3a" => Arc::new(
                object_store::aws::AmazonS3Builder::from_env()
                    .with_url(s)
                    .with_retry(retry())
                    .build()
                    .map_err(|e| storage_error(s, e))?,
            ),
            "gs" => Arc::new(
                object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_url(s)
                    .with_retry(retry())
                    .build()
                    .map_err(|e| storage_error(s, e))?,
            ),
            "az" | "abfs" | "abfss" => Arc::new(
                object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_url(s)
                    .with_retry(retry())
                    .build()
                    .map_err(|e| storage_error(s, e))?,
            ),
            "http" | "https" => {
                let origin = url.origin().ascii_serialization();
                Arc::new(
                    object_store::http::HttpBuilder::new()
                        .with_url(origin)
                        .with_retry(retry())
                        // object_store refuses plain http unless told: an http:// URL is
                        // the user telling it.
                        .with_client_options(
                            object_store::ClientOptions::new()
                                .with_allow_http(url.scheme() == "http"),
                        )
                        .build()
                        .map_err(|e| storage_error(s, e))?,
                )
            }
            other => return Err(Error::Storage(format!("{s:?}: unsupported scheme {other}"))),
        };
        Ok(Self { store, prefix, display: s.to_string() })
    }

    fn local(path: &std::path::Path, create: bool, display: &str) -> Result<Self> {
        if create {
            std::fs::create_dir_all(path)
                .map_err(|e| Error::Io { path: path.display().to_string(), source: e })?;
        }
        let canonical = std::fs::canonicalize(path)
            .map_err(|e| Error::Io { path: path.display().to_string(), source: e })?;
        if canonical.is_file() {
            // A single file: its folder is the store, its name the prefix.
            let parent = canonical.parent().unwrap_or(std::path::Path::new("/"));
            let name = canonical.file_name().map(|n| n.to_string_lossy().into_owned());
            let store = object_store::local::LocalFileSystem::new_with_prefix(parent)
                .map_err(|e| storage_error(display, e))?;
            return Ok(Self {
                store: Arc::new(store),
                prefix: StorePath::from(name.unwrap_or_default()),
                display: display.to_string(),
            });
        }
        let store = object_store::local::LocalFileSystem::new_with_prefix(&canonical)
            .map_err(|e| storage_error(display, e))?;
        Ok(Self {
            store: Arc::new(store),
            prefix: StorePath::default(),
            display: display.to_string(),
        })
    }

    /// The same location, with `plan`'s faults injected into its operations (drills and
    /// tests); `injected` counts them.
    pub fn with_faults(
        self,
        plan: crate::faults::FaultPlan,
        injected: Arc<std::sync::atomic::AtomicU64>,
    ) -> Self {
        let store = crate::faults::FaultyStore::new(self.store, plan, injected);
        Self { store: Arc::new(store), ..self }
    }

    /// The location `name` below this one.
    pub fn child(&self, name: &str) -> Self {
        Self {
            store: self.store.clone(),
            prefix: self.path(name),
            display: format!("{}/{name}", self.display.trim_end_matches('/')),
        }
    }

    /// The store path of `name` below this prefix.
    pub fn path(&self, name: &str) -> StorePath {
        let mut path = self.prefix.clone();
        for part in name.split('/').filter(|p| !p.is_empty()) {
            path = path.join(part);
        }
        path
    }

    /// The whole object at this location.
    pub async fn read(&self) -> Result<Bytes> {
        self.read_path(&self.prefix).await
    }

    /// The whole object `name` below this prefix.
    pub async fn read_child(&self, name: &str) -> Result<Bytes> {
        self.read_path(&self.path(name)).await
    }

    async fn read_path(&self, path: &StorePath) -> Result<Bytes> {
        let what = format!("reading {} ({path})", self.display);
        tries(|| what.clone(), || async { self.store.get(path).await?.bytes().await })
            .await
            .map_err(|e| op_error(&what, e))
    }

    /// Whether the object `name` exists.
    pub async fn exists(&self, name: &str) -> Result<bool> {
        let path = self.path(name);
        match tries(|| format!("checking {name} in {}", self.display), || self.store.head(&path))
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(op_error(&format!("checking {name} in {}", self.display), e)),
        }
    }

    /// Writes `name` (replacing it).
    pub async fn write(&self, name: &str, bytes: Bytes) -> Result<()> {
        let path = self.path(name);
        let what = || format!("writing {name} in {}", self.display);
        tries(what, || self.store.put(&path, bytes.clone().into()))
            .await
            .map(|_| ())
            .map_err(|e| op_error(&format!("writing {name} in {}", self.display), e))
    }

    /// Writes `name` only if it does not exist yet; `Ok(false)` if it did.
    pub async fn create(&self, name: &str, bytes: Bytes) -> Result<bool> {
        let path = self.path(name);
        let create = || {
            let opts = object_store::PutOptions::from(object_store::PutMode::Create);
            self.store.put_opts(&path, bytes.clone().into(), opts)
        };
        match tries(|| format!("creating {name} in {}", self.display), create).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(op_error(&format!("creating {name} in {}", self.display), e)),
        }
    }

    /// Deletes `name`; a missing object is not an error.
    pub async fn delete(&self, name: &str) -> Result<()> {
        let path = self.path(name);
        match tries(|| format!("deleting {name} in {}", self.display), || self.store.delete(&path))
            .await
        {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(op_error(&format!("deleting {name} in {}", self.display), e)),
        }
    }

    /// Every object below `name`, as (path relative to this prefix, size), sorted by path.
    pub async fn list(&self, name: &str) -> Result<Vec<(String, u64)>> {
        let base = self.path(name);
        let what = || format!("listing {name} in {}", self.display);
        let objects: Vec<object_store::ObjectMeta> =
            tries(what, || self.store.list(Some(&base)).try_collect())
                .await
                .map_err(|e| op_error(&format!("listing {name} in {}", self.display), e))?;
        let mut out: Vec<(String, u64)> = objects
            .into_iter()
            .filter_map(|meta| {
                let rel: Vec<String> = meta
                    .location
                    .prefix_match(&self.prefix)?
                    .map(|p| p.as_ref().to_string())
                    .collect();
                Some((rel.join("/"), meta.size))
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// Streams the object at `path` into `sink`, chunk by chunk (no whole-file buffer).
    pub async fn stream_into(&self, path: &StorePath, mut sink: impl FnMut(&[u8])) -> Result<()> {
        let what = format!("reading {} ({path})", self.display);
        // Only the request is retried: a stream that breaks midway has fed `sink` already.
        let got = tries(|| what.clone(), || self.store.get(path))
            .await
            .map_err(|e| op_error(&what, e))?;
        let mut stream = got.into_stream();
        while let Some(chunk) = stream.try_next().await.map_err(|e| op_error(&what, e))? {
            sink(&chunk);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_create_is_exclusive_and_lists_relative_paths() {
        let dir = tempfile::tempdir().expect("tempdir");
        let loc =
            Location::open(&dir.path().join("out").display().to_string(), true).expect("open");
        assert!(loc.create("a/1.json", Bytes::from_static(b"x")).await.expect("create"));
        assert!(!loc.create("a/1.json", Bytes::from_static(b"y")).await.expect("create again"));
        loc.write("b.txt", Bytes::from_static(b"zz")).await.expect("write");
        let listed = loc.list("").await.expect("list");
        assert_eq!(listed, vec![("a/1.json".to_string(), 1), ("b.txt".to_string(), 2)]);
        assert_eq!(loc.read_child("a/1.json").await.expect("read"), Bytes::from_static(b"x"));
        loc.delete("b.txt").await.expect("delete");
        loc.delete("b.txt").await.expect("delete twice");
        assert!(!loc.exists("b.txt").await.expect("exists"));
    }

    #[test]
    fn unknown_schemes_and_malformed_urls_are_refused_not_made_folders() {
        let cwd = std::env::current_dir().expect("cwd");
        for (url, expected) in [
            ("ftp://example.com/out", "unsupported scheme ftp"),
            ("s4://bucket/out", "unsupported scheme s4"),
            ("http://[::1/x", "bad URL"),
        ] {
            let err = Location::open(url, true).expect_err(url).to_string();
            assert!(err.contains(url) && err.contains(expected), "{url}: {err}");
        }
        assert!(!cwd.join("ftp:").exists() && !cwd.join("s4:").exists(), "no folder was made");
        assert!(is_url("S3://bucket/x") && is_url("file:///tmp") && !is_url("C://x"));
        assert!(!is_url("out/run") && !is_url("/tmp/a://b"));
    }
}
