//! Fault injection for storage (tests and drills only): an object store that fails a chosen
//! share of its operations, deterministically from a seed, so that a run with faults can be
//! repeated exactly. `Location::with_faults` wraps any store in it.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};

/// Which operations fail: after the first `after` operations, each one with probability
/// `rate`, decided by hashing (`seed`, the operation's number).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaultPlan {
    /// Share of operations that fail, in [0, 1].
    pub rate: f64,
    /// Operations that always succeed first (so a run can start before faults begin).
    pub after: u64,
    /// Seed of the decisions.
    pub seed: u64,
}

impl std::str::FromStr for FaultPlan {
    type Err = String;

    /// `RATE[,after=N][,seed=S]`, e.g. `0.2` or `1,after=40`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let mut parts = s.split(',');
        let rate: f64 = parts
            .next()
            .and_then(|r| r.trim().parse().ok())
            .filter(|r: &f64| (0.0..=1.0).contains(r))
            .ok_or_else(|| format!("{s:?}: expected RATE[,after=N][,seed=S], RATE in [0, 1]"))?;
        let mut plan = Self { rate, after: 0, seed: 0 };
        for part in parts {
            let (key, value) = part.split_once('=').ok_or_else(|| format!("{s:?}: {part:?}"))?;
            let value: u64 = value.trim().parse().map_err(|_| format!("{s:?}: {part:?}"))?;
            match key.trim() {
                "after" => plan.after = value,
                "seed" => plan.seed = value,
                other => return Err(format!("{s:?}: unknown key {other:?}")),
            }
        }
        Ok(plan)
    }
}

/// An object store that fails some operations of the one it wraps.
#[derive(Debug)]
pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    plan: FaultPlan,
    operations: AtomicU64,
    injected: Arc<AtomicU64>,
}

impl FaultyStore {
    /// Wraps `inner`; `injected` counts the faults injected.
    pub fn new(inner: Arc<dyn ObjectStore>, plan: FaultPlan, injected: Arc<AtomicU64>) -> Self {
        Self { inner, plan, operations: AtomicU64::new(0), injected }
    }

    fn check(&self, what: &str, location: &str) -> Result<()> {
        let n = self.operations.fetch_add(1, Ordering::Relaxed);
        if n < self.plan.after {
            return Ok(());
        }
        let mut key = [0u8; 16];
        key[..8].copy_from_slice(&self.plan.seed.to_le_bytes());
        key[8..].copy_from_slice(&n.to_le_bytes());
        let hash = blake3::hash(&key);
        let mut first = [0u8; 8];
        first.copy_from_slice(&hash.as_bytes()[..8]);
        let draw = u64::from_le_bytes(first) as f64 / u64::MAX as f64;
        if draw < self.plan.rate {
            self.injected.fetch_add(1, Ordering::Relaxed);
            return Err(object_store::Error::Generic {
                store: "fault injection",
                source: format!("injected fault #{n}: {what} {location}").into(),
            });
        }
        Ok(())
    }
}

impl fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyStore({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.check("put", location.as_ref())?;
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.check("put", location.as_ref())?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.check("get", location.as_ref())?;
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.check("get", location.as_ref())?;
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        if let Err(e) = self.check("delete", "") {
            return futures::stream::once(async move { Err(e) }).boxed();
        }
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        if let Err(e) = self.check("list", prefix.map_or("", |p| p.as_ref())) {
            return futures::stream::once(async move { Err(e) }).boxed();
        }
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.check("list", prefix.map_or("", |p| p.as_ref()))?;
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.check("copy", to.as_ref())?;
        self.inner.copy_opts(from, to, options).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::ObjectStoreExt;

    #[tokio::test]
    async fn the_plan_decides_which_operations_fail() {
        let plan: FaultPlan = "0.5,after=3,seed=7".parse().expect("plan");
        assert_eq!(plan, FaultPlan { rate: 0.5, after: 3, seed: 7 });
        assert!("2".parse::<FaultPlan>().is_err() && "0.1,later=2".parse::<FaultPlan>().is_err());
        let run = || async {
            let injected = Arc::new(AtomicU64::new(0));
            let inner = Arc::new(object_store::memory::InMemory::new());
            let store = FaultyStore::new(inner, plan, injected.clone());
            let mut outcomes = Vec::new();
            for i in 0..200 {
                let path = Path::from(format!("f{i}"));
                outcomes.push(store.put(&path, Bytes::from_static(b"x").into()).await.is_ok());
            }
            (outcomes, injected.load(Ordering::Relaxed))
        };
        let (first, injected) = run().await;
        assert!(first[..3].iter().all(|ok| *ok), "the first `after` operations succeed");
        assert_eq!(first.iter().filter(|ok| !**ok).count() as u64, injected);
        assert!((70..130).contains(&injected), "about half of 197: {injected}");
        assert_eq!(run().await.0, first, "the same seed fails the same operations");
    }
}
