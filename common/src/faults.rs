//! Fault injection for storage (tests and drills only): an object store that fails a chosen
//! share of its operations, deterministically from a seed, so that a run with faults can be
//! repeated exactly. `Location::with_faults` wraps any store in it.
//!
//! A failed write either never happened or happened with its reply lost (the store wrote
//! it, the caller sees an error), as with a connection that drops after the request went
//! out; the second kind is what makes retried writes prove they are idempotent.

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
    /// Share of failing writes (put, copy) that are done before the error is returned, in
    /// [0, 1].
    pub lost: f64,
    /// The most faults to inject (then the store heals).
    pub max: u64,
}

impl std::str::FromStr for FaultPlan {
    type Err = String;

    /// `RATE[,after=N][,seed=S][,lost=P][,max=K]`, e.g. `0.2` or `1,after=40` or
    /// `0.1,lost=0.5`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let share = |v: &str| v.trim().parse().ok().filter(|r: &f64| (0.0..=1.0).contains(r));
        let mut parts = s.split(',');
        let rate = parts.next().and_then(share).ok_or_else(|| {
            format!("{s:?}: expected RATE[,after=N][,seed=S][,lost=P][,max=K], RATE in [0, 1]")
        })?;
        let mut plan = Self { rate, after: 0, seed: 0, lost: 0.0, max: u64::MAX };
        for part in parts {
            let (key, value) = part.split_once('=').ok_or_else(|| format!("{s:?}: {part:?}"))?;
            let bad = || format!("{s:?}: {part:?}");
            match key.trim() {
                "after" => plan.after = value.trim().parse().map_err(|_| bad())?,
                "seed" => plan.seed = value.trim().parse().map_err(|_| bad())?,
                "lost" => plan.lost = share(value).ok_or_else(bad)?,
                "max" => plan.max = value.trim().parse().map_err(|_| bad())?,
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

    /// Decides the fate of the next operation.
    fn draw(&self) -> Fate {
        let n = self.operations.fetch_add(1, Ordering::Relaxed);
        if n < self.plan.after || self.injected.load(Ordering::Relaxed) >= self.plan.max {
            return Fate::Succeed;
        }
        let mut key = [0u8; 16];
        key[..8].copy_from_slice(&self.plan.seed.to_le_bytes());
        key[8..].copy_from_slice(&n.to_le_bytes());
        let hash = blake3::hash(&key);
        let unit = |bytes: &[u8]| {
            let mut word = [0u8; 8];
            word.copy_from_slice(bytes);
            u64::from_le_bytes(word) as f64 / u64::MAX as f64
        };
        if unit(&hash.as_bytes()[..8]) >= self.plan.rate {
            return Fate::Succeed;
        }
        self.injected.fetch_add(1, Ordering::Relaxed);
        if unit(&hash.as_bytes()[8..16]) < self.plan.lost {
            Fate::LoseReply(n)
        } else {
            Fate::Fail(n)
        }
    }

    /// For reads and other operations whose repetition is harmless: a fault is a failure.
    fn check(&self, what: &str, location: &str) -> Result<()> {
        match self.draw() {
            Fate::Succeed => Ok(()),
            Fate::Fail(n) | Fate::LoseReply(n) => Err(fault(n, what, location)),
        }
    }

    /// For writes: a fault fails before the write, or after it with the reply lost.
    async fn write<T>(
        &self,
        what: &str,
        location: &str,
        op: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        match self.draw() {
            Fate::Succeed => op.await,
            Fate::Fail(n) => Err(fault(n, what, location)),
            Fate::LoseReply(n) => {
                op.await?;
                Err(fault(n, &format!("{what} (done, reply lost)"), location))
            }
        }
    }
}

enum Fate {
    Succeed,
    Fail(u64),
    LoseReply(u64),
}

/// An injected error; the message says so, for the logs of a drill.
fn fault(n: u64, what: &str, location: &str) -> object_store::Error {
    tracing::warn!("storage fault injected: #{n} {what} {location}");
    object_store::Error::Generic {
        store: "fault injection",
        source: format!("injected fault #{n}: {what} {location}").into(),
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
        self.write("put", location.as_ref(), self.inner.put_opts(location, payload, opts)).await
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
        self.write("copy", to.as_ref(), self.inner.copy_opts(from, to, options)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::ObjectStoreExt;

    #[tokio::test]
    async fn the_plan_decides_which_operations_fail() {
        let plan: FaultPlan = "0.5,after=3,seed=7".parse().expect("plan");
        assert_eq!(plan, FaultPlan { rate: 0.5, after: 3, seed: 7, lost: 0.0, max: u64::MAX });
        assert_eq!("1,max=2".parse::<FaultPlan>().map(|p| p.max), Ok(2));
        for bad in ["2", "0.1,later=2", "0.1,lost=1.5", "0.1,after=-1"] {
            assert!(bad.parse::<FaultPlan>().is_err(), "{bad}");
        }
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

    #[tokio::test]
    async fn a_lost_reply_is_a_write_that_happened() {
        let plan: FaultPlan = "1,lost=1".parse().expect("plan");
        let inner = Arc::new(object_store::memory::InMemory::new());
        let store = FaultyStore::new(inner.clone(), plan, Arc::new(AtomicU64::new(0)));
        let path = Path::from("f");
        let err = store.put(&path, Bytes::from_static(b"x").into()).await.expect_err("a fault");
        assert!(err.to_string().contains("reply lost"), "{err}");
        let landed = inner.get(&path).await.expect("the write happened").bytes().await;
        assert_eq!(landed.expect("bytes"), Bytes::from_static(b"x"));
        assert!(store.get(&path).await.is_err(), "reads fail without side effects");
    }
}
