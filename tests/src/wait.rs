//! Waiting with deadlines. Every wait in the tests goes through here, so that a failure always
//! says what was awaited, for how long, and the last state seen.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// How often [`wait_until`] probes. Small: a probe is a cheap RPC on loopback.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Probes until `probe` returns `Ok`, and returns its value. `Err(state)` means "not yet", with
/// a description of what was seen. Panics after `timeout` with `what` and the last state.
///
/// A probe that itself does not return before the deadline is cut off (and reported), so a hung
/// RPC cannot make the wait exceed its deadline.
pub async fn wait_until<T, F, Fut>(timeout: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    let mut last = String::from("(no probe finished)");
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            panic!("timed out after {timeout:?} waiting for {what}; last state: {last}");
        }
        match tokio::time::timeout(remaining, probe()).await {
            Ok(Ok(value)) => return value,
            Ok(Err(state)) => last = state,
            Err(_) => last = format!("a probe was still running at the deadline; before: {last}"),
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(POLL_INTERVAL.min(remaining)).await;
    }
}

/// Runs `fut`, panicking if it does not finish within `timeout`: for calls that must never hang.
pub async fn within<T>(timeout: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(timeout, fut).await {
        Ok(value) => value,
        Err(_) => panic!("{what} did not return within {timeout:?}"),
    }
}
