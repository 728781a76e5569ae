//! What the routes need from the rest of the process, behind small object-safe ports.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use catalog_domain::ProductId;
use catalog_pipeline::ProductStore;
use catalog_pipeline::embedded::EmbeddedLog;
use catalog_readmodel::{ReadModel, StoredView, catch_up};
use prometheus_client::registry::Registry;

use crate::config::ApiConfig;
use crate::metrics::ApiMetrics;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Accepts raw event messages durably (`POST /events`).
pub trait Ingest: Send + Sync + 'static {
    /// Resolves once every message is durable.
    fn accept(&self, messages: Vec<Bytes>) -> BoxFuture<'_, Result<(), String>>;
}

impl Ingest for EmbeddedLog {
    fn accept(&self, messages: Vec<Bytes>) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move { self.append(&messages).await.map(|_| ()).map_err(|e| e.to_string()) })
    }
}

/// Cache-aside: on a read-model miss, fetch the product from the store and keep its view.
pub trait ViewFill: Send + Sync + 'static {
    fn fill(&self, id: ProductId) -> BoxFuture<'_, Result<Option<StoredView>, String>>;

    /// Re-reads an expired view in the background while the stale one is served.
    fn refresh_later(self: Arc<Self>, id: ProductId);
}

pub struct StoreFill<St> {
    pub store: Arc<St>,
    pub model: ReadModel,
    /// Products being refreshed now: a burst of GETs on one expired view costs one store read.
    pub refreshing: Mutex<HashSet<ProductId>>,
}

impl<St> StoreFill<St> {
    pub fn new(store: Arc<St>, model: ReadModel) -> Self {
        Self { store, model, refreshing: Mutex::new(HashSet::new()) }
    }
}

impl<St: ProductStore> ViewFill for StoreFill<St> {
    fn fill(&self, id: ProductId) -> BoxFuture<'_, Result<Option<StoredView>, String>> {
        Box::pin(async move {
            let key = id.as_str().to_owned();
            catch_up(&self.model, &*self.store, vec![id]).await.map_err(|e| e.to_string())?;
            self.model.get(&key).map_err(|e| e.to_string())
        })
    }

    fn refresh_later(self: Arc<Self>, id: ProductId) {
        if !self.refreshing.lock().unwrap_or_else(|p| p.into_inner()).insert(id.clone()) {
            return;
        }
        tokio::spawn(async move {
            if let Err(e) = catch_up(&self.model, &*self.store, vec![id.clone()]).await {
                tracing::warn!(product = %id, error = %e, "refreshing an expired view failed; serving it stale");
            }
            self.refreshing.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        });
    }
}

/// One line of `/readyz`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

pub trait Readiness: Send + Sync + 'static {
    fn checks(&self) -> BoxFuture<'_, Vec<Check>>;
}

pub struct AppState {
    pub readmodel: ReadModel,
    /// `None` where this process does not ingest (an API-only instance).
    pub ingest: Option<Arc<dyn Ingest>>,
    pub fill: Option<Arc<dyn ViewFill>>,
    pub readiness: Arc<dyn Readiness>,
    pub registry: Arc<Registry>,
    pub metrics: ApiMetrics,
    pub config: ApiConfig,
    /// Set on shutdown: `/readyz` turns 503 so load balancers stop sending traffic.
    pub draining: Arc<AtomicBool>,
}
