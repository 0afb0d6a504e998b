//! Retrying storage work that failed in a way a later try may not (see
//! [`Error::StorageTransient`]): exponential backoff from 250 ms to 30 s, for up to a
//! give-up time. Remote stores already retry each request a few times inside object_store;
//! this is the layer above, for outages that outlast those retries, where a sweep should wait
//! rather than stop. Work passed here must be safe to repeat.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::Error;

/// The first wait after a failure.
pub const FIRST_DELAY: Duration = Duration::from_millis(250);
/// The longest wait between tries.
pub const MAX_DELAY: Duration = Duration::from_secs(30);

/// Whether `e`, or an error it wraps, is a storage failure that a later try may not meet.
pub fn is_transient(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<Error>().is_some_and(Error::is_transient))
}

/// Runs `op` until it succeeds, fails for good, or has failed transiently for `give_up`;
/// `what` names the work in the log and in the final error.
pub async fn retry<T, F, Fut>(what: &str, give_up: Duration, mut op: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let started = Instant::now();
    let mut delay = FIRST_DELAY;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if !is_transient(&e) => return Err(e),
            Err(e) if started.elapsed() >= give_up => {
                return Err(e.context(format!(
                    "{what}: the store has been failing for {:.0} s; giving up",
                    started.elapsed().as_secs_f64()
                )));
            }
            Err(e) => {
                tracing::warn!("{what} failed, retrying in {delay:?}: {e:#}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_DELAY);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[tokio::test(start_paused = true)]
    async fn transient_failures_are_retried_and_others_are_not() {
        let mut tries = 0;
        let got = retry("reading", Duration::from_secs(60), || {
            tries += 1;
            let fail = tries < 4;
            async move {
                if fail {
                    Err(Error::StorageTransient("503".into())).context("wrapped")
                } else {
                    Ok(7)
                }
            }
        })
        .await;
        assert_eq!(got.expect("the fourth try works"), 7);
        assert_eq!(tries, 4);

        let mut tries = 0;
        let missing = retry("reading", Duration::from_secs(60), || {
            tries += 1;
            async { Err::<(), _>(anyhow::Error::new(Error::Storage("not found".into()))) }
        })
        .await;
        assert!(missing.is_err() && tries == 1, "a permanent error is not retried");

        let started = tokio::time::Instant::now();
        let down = retry("reading", Duration::from_secs(10), || async {
            Err::<(), _>(anyhow::Error::new(Error::StorageTransient("down".into())))
        })
        .await
        .expect_err("gives up");
        assert!(format!("{down:#}").contains("giving up"), "{down:#}");
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(10) && waited < Duration::from_secs(40),
            "{waited:?}"
        );
    }
}
