//! Refresh-ahead: invalidations in, fresh views out, checkpoint last.

use std::sync::Arc;
use std::time::Duration;

use backon::Retryable;
use catalog_domain::ProductId;
use catalog_pipeline::error::chain;
use catalog_pipeline::{Invalidation, ProductStore};
use tokio::sync::mpsc;

use crate::model::{ReadModel, ReadModelError};

/// Invalidations merged into one refresh at most: bounds the latency a burst adds.
const MAX_COALESCED_PRODUCTS: usize = 4096;
const REFRESH_ATTEMPTS: u32 = 5;
const REFRESH_RETRY_BASE: Duration = Duration::from_millis(100);

/// Refreshes views until the invalidation feed closes. Consecutive queued invalidations are
/// merged, so a burst costs one store read and one view write per product, not per event.
pub async fn run_refresher<St: ProductStore>(model: ReadModel, store: Arc<St>, mut feed: mpsc::Receiver<Invalidation>) {
    while let Some(first) = feed.recv().await {
        let mut products = first.products;
        let mut sequence = first.log_sequence;
        while products.len() < MAX_COALESCED_PRODUCTS {
            let Ok(more) = feed.try_recv() else { break };
            products.extend(more.products);
            sequence = sequence.max(more.log_sequence);
        }
        let mut ids = Vec::with_capacity(products.len());
        for changed in products {
            let fresh = model.revision_of(changed.product_id.as_str()).ok().flatten().is_some_and(|r| r >= changed.revision);
            if !fresh {
                ids.push(changed.product_id);
            }
        }
        ids.sort();
        ids.dedup();
        let backoff = catalog_pipeline::config::backoff(REFRESH_RETRY_BASE, REFRESH_ATTEMPTS);
        let attempt = || refresh(&model, &*store, ids.clone(), sequence);
        let result =
            attempt.retry(backoff).notify(|e, _| tracing::warn!(error = %chain(e), "view refresh failed; retrying")).await;
        // The checkpoint stays behind, so the next start catches these products up.
        if let Err(e) = result {
            tracing::error!(error = %chain(&e), products = ids.len(), "view refresh failed; views stay stale until catch-up");
        }
    }
}

/// Re-renders the given products from the store (startup catch-up, cache-aside fills).
pub async fn catch_up<St: ProductStore>(model: &ReadModel, store: &St, ids: Vec<ProductId>) -> Result<usize, ReadModelError> {
    refresh(model, store, ids, None).await
}

async fn refresh<St: ProductStore>(
    model: &ReadModel,
    store: &St,
    ids: Vec<ProductId>,
    sequence: Option<u64>,
) -> Result<usize, ReadModelError> {
    let mut written = 0;
    for chunk in ids.chunks(512) {
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
