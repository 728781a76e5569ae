//! Online rebuild: a new generation of the read model built beside the live one from the
//! store's current state, swapped in while reads go on, then caught up with what changed.

use std::future::Future;
use std::time::{Duration, Instant};

use catalog_domain::ProductId;
use catalog_pipeline::ProductStore;

use crate::model::{ReadModel, ReadModelError};
use crate::refresh::catch_up;

/// What an online rebuild did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OnlineRebuild {
    /// Products written into the new generation.
    pub products: u64,
    /// Products the live model took while the new one was built, written again after the swap.
    pub caught_up: u64,
    /// The generation now live.
    pub generation: u64,
    pub elapsed: Duration,
}

/// Rebuilds `model` beside itself: `fill` writes every product into the fresh model it is
/// given and says how many; then the fresh model is swapped in (readers move over at once,
/// and a restart keeps it), and every product written to the old one meanwhile is written
/// again from `store` (or, where the records are the store, carried over by the swap). On
/// failure the live model is left as it was.
pub async fn rebuild_online<St, F, Fut>(model: &ReadModel, store: &St, fill: F) -> Result<OnlineRebuild, ReadModelError>
where
    St: ProductStore,
    F: FnOnce(ReadModel) -> Fut,
    Fut: Future<Output = Result<u64, ReadModelError>>,
{
    let started = Instant::now();
    let fresh = model.begin_rebuild()?;
    let products = match fill(fresh.clone()).await {
        Ok(n) => n,
        Err(e) => {
            model.abandon_rebuild();
            return Err(e);
        }
    };
    let swapped = {
        let (model, fresh) = (model.clone(), fresh.clone());
        tokio::task::spawn_blocking(move || model.swap_in(&fresh)).await?
    };
    let written = match swapped {
        Ok(written) => written,
        Err(e) => {
            model.abandon_rebuild();
            return Err(e);
        }
    };
    let ids: Vec<ProductId> = written.iter().filter_map(|id| ProductId::parse(id).ok()).collect();
    let caught_up = ids.len() as u64;
    // Where the records are the store, the swap carried these over already.
    if !model.holds_state() {
        catch_up(model, store, ids).await?;
    }
    Ok(OnlineRebuild { products, caught_up, generation: model.generation(), elapsed: started.elapsed() })
}
