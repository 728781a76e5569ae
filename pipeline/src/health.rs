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

/// Object-safe, so the HTTP layer holds whichever backend's checks the process assembled.
pub trait Readiness: Send + Sync + 'static {
    fn checks(&self) -> BoxFuture<'_, Vec<Check>>;
}
