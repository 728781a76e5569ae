//! The embedded store: current product state in sled, written once per product per batch.
//! Its event log is the embedded inbox, already durable before a batch reaches the store.

use std::collections::HashMap;

use catalog_domain::state::Applied;
use catalog_domain::{ProductId, ProductState};

use super::{storage_error, trees};
use crate::ports::{ProductChanged, ProductStore, SequencedEvent, StoreError, WriteOutcome};

#[derive(Clone)]
pub struct EmbeddedStore {
    state: sled::Tree,
}

impl EmbeddedStore {
    pub fn open(db: &sled::Db) -> Result<Self, StoreError> {
        Ok(Self { state: db.open_tree(trees::STATE).map_err(storage_error("store open"))? })
    }

    pub fn get(&self, id: &ProductId) -> Result<Option<ProductState>, StoreError> {
        let value = self.state.get(id.as_str()).map_err(storage_error("store get"))?;
        value.map(|v| decode(id.as_str(), &v)).transpose()
    }

    /// Every product's state in id order: the replay tools' view of the store.
    pub fn states(&self) -> impl Iterator<Item = Result<ProductState, StoreError>> + use<> {
        self.state.iter().map(|item| {
            let (key, value) = item.map_err(storage_error("store read"))?;
            decode(&String::from_utf8_lossy(&key), &value)
        })
    }

    /// Overwrites these states as they are (`replay reproject`, which has decided they are right).
    pub fn put(&self, states: &[ProductState]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for state in states {
            batch.insert(state.id.as_str(), encode(state));
        }
        self.state.apply_batch(batch).map_err(storage_error("store write"))
    }

    fn write_blocking(&self, events: &[SequencedEvent]) -> Result<WriteOutcome, StoreError> {
        let mut touched: HashMap<&ProductId, (ProductState, bool)> = HashMap::with_capacity(events.len());
        let mut order = Vec::with_capacity(events.len());
        let mut unchanged = 0;
        for sequenced in events {
            let id = &sequenced.event.product_id;
            if !touched.contains_key(id) {
                let state = self.get(id)?.unwrap_or_else(|| ProductState::new(id.clone()));
                touched.insert(id, (state, false));
                order.push(id);
            }
            let (state, changed) = touched.get_mut(id).expect("inserted above");
            match state.apply_at(&sequenced.event, sequenced.position) {
                Applied::Changed => *changed = true,
                Applied::Stale | Applied::Unchanged => unchanged += 1,
            }
        }
        let mut batch = sled::Batch::default();
        let mut outcome = WriteOutcome { unchanged, ..WriteOutcome::default() };
        for id in order {
            let (state, changed) = touched.remove(id).expect("every id in order was touched");
            if changed {
                batch.insert(id.as_str(), encode(&state));
            }
            let announced = ProductChanged {
                product_id: state.id.clone(),
                revision: state.revision,
                versions: state.versions.clone(),
                state: Some(std::sync::Arc::new(state)),
            };
            if changed { outcome.changed.push(announced) } else { outcome.unchanged_products.push(announced) }
        }
        self.state.apply_batch(batch).map_err(storage_error("store write"))?;
        Ok(outcome)
    }
}

pub(crate) fn encode(state: &ProductState) -> Vec<u8> {
    serde_json::to_vec(state).expect("state serializes")
}

pub(crate) fn decode(id: &str, bytes: &[u8]) -> Result<ProductState, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::corrupt(format!("embedded state of product {id}"), e))
}

impl ProductStore for EmbeddedStore {
    async fn write_batch(&self, events: &[SequencedEvent]) -> Result<WriteOutcome, StoreError> {
        // sled calls block; a batch of hundreds must not stall the runtime thread serving GETs.
        // On a multi-threaded runtime this worker hands its other tasks to the rest while it
        // writes, which spares copying the whole batch into a blocking task.
        if tokio::runtime::Handle::current().runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread {
            return tokio::task::block_in_place(|| self.write_blocking(events));
        }
        let store = self.clone();
        let events = events.to_vec();
        tokio::task::spawn_blocking(move || store.write_blocking(&events))
            .await
            .map_err(|e| StoreError::unavailable("embedded store write", e))?
    }

    async fn get_states(&self, ids: &[ProductId]) -> Result<Vec<ProductState>, StoreError> {
        ids.iter().filter_map(|id| self.get(id).transpose()).collect()
    }
}
