//! What the routes need from the rest of the process, behind small object-safe ports.

use std::collections::HashSet;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use catalog_domain::ProductId;
use catalog_pipeline::embedded::EmbeddedLog;
use catalog_pipeline::error::chain;
pub use catalog_pipeline::health::{BoxFuture, Check, Readiness};
use catalog_pipeline::{ProductStore, SourceError};
use catalog_readmodel::{ReadModel, ReadModelError, StoredView, catch_up};
use prometheus_client::registry::Registry;

use crate::config::ApiConfig;
use crate::metrics::ApiMetrics;

/// Accepts raw event messages durably (`POST /events`).
pub trait Ingest: Send + Sync + 'static {
    /// Resolves once every message is durable.
    fn accept(&self, messages: Vec<Bytes>) -> BoxFuture<'_, Result<(), SourceError>>;
}

impl Ingest for EmbeddedLog {
    fn accept(&self, messages: Vec<Bytes>) -> BoxFuture<'_, Result<(), SourceError>> {
        Box::pin(async move { self.append(&messages).await.map(|_| ()) })
    }
}

/// Cache-aside: on a read-model miss, fetch the product from the store and keep its view.
pub trait ViewFill: Send + Sync + 'static {
    fn fill(&self, id: ProductId) -> BoxFuture<'_, Result<Option<StoredView>, ReadModelError>>;

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
    fn fill(&self, id: ProductId) -> BoxFuture<'_, Result<Option<StoredView>, ReadModelError>> {
        Box::pin(async move {
            let key = id.as_str().to_owned();
            catch_up(&self.model, &*self.store, vec![id]).await?;
            self.model.get(&key)
        })
    }

    fn refresh_later(self: Arc<Self>, id: ProductId) {
        if !self.refreshing.lock().unwrap_or_else(|p| p.into_inner()).insert(id.clone()) {
            return;
        }
        tokio::spawn(async move {
            if let Err(e) = catch_up(&self.model, &*self.store, vec![id.clone()]).await {
                tracing::warn!(product = %id, error = %chain(&e), "refreshing an expired view failed; serving it stale");
            }
            self.refreshing.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        });
    }
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
