//! Readiness: each backend says whether its parts answer, in lines `/readyz` shows as they are.

use std::future::Future;
use std::pin::Pin;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One line of `/readyz`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

/// The breaker's line: ready only while it is closed. `None` where this process writes
/// nothing (an API-only instance).
pub fn breaker_check(breaker: Option<&crate::breaker::Breaker>) -> Check {
    use crate::breaker::BreakerState;
    match breaker.map(crate::breaker::Breaker::state) {
        None => Check { name: "breaker", ok: true, detail: "closed (this instance writes nothing)".into() },
        Some(BreakerState::Closed) => Check { name: "breaker", ok: true, detail: "closed".into() },
        Some(BreakerState::Open) => {
            Check { name: "breaker", ok: false, detail: "open: the store is failing; writes and receives pause".into() }
        }
        Some(BreakerState::HalfOpen) => {
            Check { name: "breaker", ok: false, detail: "half-open: trial batches are testing the store".into() }
        }
    }
}

/// Object-safe, so the HTTP layer holds whichever backend's checks the process assembled.
pub trait Readiness: Send + Sync + 'static {
    fn checks(&self) -> BoxFuture<'_, Vec<Check>>;
}
