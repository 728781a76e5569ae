//! Refresh-ahead: invalidations in, fresh views out, checkpoint last.

use std::sync::Arc;
use std::time::Duration;

use backon::Retryable;
use catalog_domain::{ProductId, ProductState};
use catalog_pipeline::error::chain;
use catalog_pipeline::trace::SPAN_TARGET;
use catalog_pipeline::{Invalidation, Origin, ProductStore};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::time::SystemTime;
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::model::{ReadModel, ReadModelError};

/// Invalidations merged into one refresh at most: bounds the latency a burst adds.
const MAX_COALESCED_PRODUCTS: usize = 4096;
const REFRESH_ATTEMPTS: u32 = 5;
const REFRESH_RETRY_BASE: Duration = Duration::from_millis(100);

/// Event → visible lag buckets: from a millisecond (embedded, idle) to a minute (a backlog).
const LAG_BUCKETS: [f64; 13] = [1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 5.0, 15.0, 60.0];

/// What the refresher measures: how long after its event was accepted a change is served.
#[derive(Debug, Clone)]
pub struct RefreshMetrics {
    pub lag: Histogram,
    pub views_refreshed: Counter,
    /// Time one refresh (a merged burst of invalidations) took: the read model's share of the
    /// write path, beside the pipeline's stages.
    pub refresh_seconds: Histogram,
}

/// Refresh duration buckets, as the pipeline's stage buckets: 0.1 ms to 10 s.
const REFRESH_BUCKETS: [f64; 12] = [1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 1.0, 10.0];

impl Default for RefreshMetrics {
    fn default() -> Self {
        Self {
            lag: Histogram::new(LAG_BUCKETS),
            views_refreshed: Counter::default(),
            refresh_seconds: Histogram::new(REFRESH_BUCKETS),
        }
    }
}

impl RefreshMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("catalog_readmodel");
        r.register(
            "event_visible_lag_seconds",
            "From an event's acceptance to its product's view being served",
            self.lag.clone(),
        );
        r.register("views_refreshed", "Views rewritten from invalidations", self.views_refreshed.clone());
        r.register("refresh_duration_seconds", "Time one refresh of views took", self.refresh_seconds.clone());
    }
}

/// Refreshes views until the invalidation feed closes. Consecutive queued invalidations are
/// merged, so a burst costs one store read and one view write per product, not per event.
pub async fn run_refresher<St: ProductStore>(
    model: ReadModel,
    store: Arc<St>,
    mut feed: mpsc::Receiver<Invalidation>,
    metrics: RefreshMetrics,
) {
    while let Some(first) = feed.recv().await {
        let mut products = first.products;
        let mut sequence = first.log_sequence;
        let mut origins = first.origins;
        while products.len() < MAX_COALESCED_PRODUCTS {
            let Ok(more) = feed.try_recv() else { break };
            products.extend(more.products);
            origins.extend(more.origins);
            sequence = sequence.max(more.log_sequence);
        }
        let span = tracing::info_span!(
            target: SPAN_TARGET,
            "refresh views",
            otel.name = "readmodel refresh",
            otel.kind = "consumer",
            messaging.batch.message_count = products.len(),
        );
        catalog_pipeline::trace::follow(&span, origins.iter().filter_map(|o| o.trace.as_ref()));
        let mut ids = Vec::with_capacity(products.len());
        // States written in this process come with their invalidation: rendered as they are,
        // with no read of the store (a view write is forward-only, so that is always safe).
        // Where the records are the store, the write was the view: nothing is left to render.
        let mut carried = Vec::new();
        for changed in products {
            if let Some(state) = changed.state {
                if !model.holds_state() {
                    carried.push(state);
                }
                continue;
            }
            let fresh = model.revision_of(changed.product_id.as_str()).ok().flatten().is_some_and(|r| r >= changed.revision);
            if !fresh {
                ids.push(changed.product_id);
            }
        }
        ids.sort();
        ids.dedup();
        // The newest state of each product only.
        carried.sort_by(|a, b| a.id.cmp(&b.id).then(b.revision.cmp(&a.revision)));
        carried.dedup_by(|later, kept| later.id == kept.id);
        let backoff = catalog_pipeline::config::backoff(REFRESH_RETRY_BASE, REFRESH_ATTEMPTS);
        let started = std::time::Instant::now();
        let attempt = || refresh(&model, &*store, ids.clone(), carried.clone(), sequence);
        let result = attempt
            .retry(backoff)
            .notify(|e, _| tracing::warn!(error = %chain(e), "view refresh failed; retrying"))
            .instrument(span.clone())
            .await;
        metrics.refresh_seconds.observe(started.elapsed().as_secs_f64());
        match result {
            Ok(written) => {
                metrics.views_refreshed.inc_by(written as u64);
                visible(&origins, &metrics, &span);
            }
            // The checkpoint stays behind, so the next start catches these products up.
            Err(e) => {
                tracing::error!(error = %chain(&e), products = ids.len(), "view refresh failed; views stay stale until catch-up")
            }
        }
    }
}

/// The changes are served now: their lag is measured, and each traced event's trace ends with
/// a span saying its product's view is visible.
fn visible(origins: &[Origin], metrics: &RefreshMetrics, refresh: &tracing::Span) {
    let now = SystemTime::now();
    for origin in origins {
        let lag = now.duration_since(origin.accepted_at).unwrap_or_default();
        metrics.lag.observe(lag.as_secs_f64());
        if let Some(trace) = &origin.trace
            && !refresh.is_disabled()
        {
            let span = tracing::info_span!(
                target: SPAN_TARGET,
                "view visible",
                otel.name = "readmodel view visible",
                otel.kind = "internal",
                catalog.product_id = origin.product_id.as_str(),
                catalog.lag_ms = lag.as_millis() as u64,
            );
            catalog_pipeline::trace::follow(&span, [trace]);
            span.follows_from(refresh);
            drop(span);
        }
    }
}

/// Re-renders the given products from the store (startup catch-up, cache-aside fills).
pub async fn catch_up<St: ProductStore>(model: &ReadModel, store: &St, ids: Vec<ProductId>) -> Result<usize, ReadModelError> {
    refresh(model, store, ids, Vec::new(), None).await
}

/// Views per blocking step: bounds how long one step holds a thread.
const STEP: usize = 512;

async fn refresh<St: ProductStore>(
    model: &ReadModel,
    store: &St,
    ids: Vec<ProductId>,
    carried: Vec<Arc<ProductState>>,
    sequence: Option<u64>,
) -> Result<usize, ReadModelError> {
    let mut written = 0;
    for chunk in carried.chunks(STEP) {
        let (m, chunk) = (model.clone(), chunk.to_vec());
        written += tokio::task::spawn_blocking(move || m.apply(chunk.iter().map(|s| &**s))).await??;
    }
    for chunk in ids.chunks(STEP) {
        let states = store.get_states(chunk).await?;
        let m = model.clone();
        // sled writes block; keep them off the threads that serve GETs.
        written += tokio::task::spawn_blocking(move || m.apply(&states)).await??;
    }
    if let Some(sequence) = sequence
        && sequence > model.checkpoint()?
    {
        model.set_checkpoint(sequence)?;
    }
    Ok(written)
}
