//! The embedded store: the read model's own records, which hold their products' states, so a
//! product costs one read and one write of one record per batch (`ReadModel::fold`).
//!
//! The views database is flushed apart from the main one, where the log's watermark lives, so
//! a crash can lose records whose events the log counts as processed. `recover` folds the
//! log's entries after the read model's checkpoint in again on start: a fold is idempotent
//! (versions, else log positions, make a replayed event stale), so whatever did reach disk is
//! left as it is and whatever did not is redone.

use catalog_domain::{CatalogEvent, ParseLimits, ProductId, ProductState};
use catalog_pipeline::embedded::{EmbeddedLog, LEGACY_STATE_TREE, holds_legacy_states};
use catalog_pipeline::{BackendError, FailureClass, ProductStore, SequencedEvent, StoreError, WriteOutcome};

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, OnceLock, mpsc};

use tokio::sync::oneshot;

use crate::model::{ReadModel, ReadModelError};

/// Log entries folded per step when a start folds the log's tail in again.
const STEP: usize = 1024;

#[derive(Clone)]
pub struct EmbeddedStore {
    model: ReadModel,
    folds: Arc<FoldThread>,
}

/// A batch for the fold thread, with the model to fold it into (the thread holds none between
/// batches, so dropping the last store closes the database at once) and where the outcome goes.
type FoldJob = (ReadModel, Vec<SequencedEvent>, oneshot::Sender<Result<WriteOutcome, ReadModelError>>);

/// The one thread batches are folded on, started by the first write.
///
/// sled's calls block, so a fold must not hold a runtime worker that serves GETs. It ran under
/// `block_in_place`, which on every batch hands the worker's other tasks to a thread of the
/// blocking pool, and the fold went on whichever thread that left it on. Under a steady load of
/// 100-event requests at 1M products, one long-lived thread took 9% less CPU per event and kept
/// the process 10–40 MB smaller (BENCHMARKS.md, round sixteen). The write stage sends one batch
/// at a time, so one thread keeps their order as well.
#[derive(Default)]
struct FoldThread {
    jobs: OnceLock<Result<mpsc::Sender<FoldJob>, String>>,
}

impl FoldThread {
    async fn fold(&self, model: &ReadModel, events: &[SequencedEvent]) -> Result<WriteOutcome, StoreError> {
        let jobs = self.jobs.get_or_init(|| Self::start().map_err(|e| e.to_string()));
        let jobs = jobs.as_ref().map_err(|e| StoreError::unavailable("starting the fold thread", e.clone()))?;
        let (reply, outcome) = oneshot::channel();
        // The batch is copied: the caller keeps its own to retry with, and a cancelled write
        // must not leave the thread reading a slice that is gone.
        let job = (model.clone(), events.to_vec(), reply);
        jobs.send(job).map_err(|_| fold_thread_gone())?;
        outcome.await.map_err(|_| fold_thread_gone())?.map_err(store_error)
    }

    fn start() -> std::io::Result<mpsc::Sender<FoldJob>> {
        let (jobs, queue) = mpsc::channel::<FoldJob>();
        std::thread::Builder::new().name("catalog-fold".into()).spawn(move || {
            for (model, events, reply) in queue {
                // A panic fails this batch (the reply is dropped), not every batch after it.
                if let Ok(outcome) = std::panic::catch_unwind(AssertUnwindSafe(|| model.fold(&events))) {
                    let _ = reply.send(outcome);
                }
            }
        })?;
        Ok(jobs)
    }
}

fn fold_thread_gone() -> StoreError {
    StoreError::unavailable("embedded store write", "the fold thread dropped the batch (it panicked folding it)")
}

/// What a start did to bring the records up to the log.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// States moved in from the main database's old state tree (a data dir from before).
    pub moved: u64,
    /// Products taken from the log's snapshot: the records were behind it (a `views.sled`
    /// deleted, or restored from an old copy), and the entries it holds are gone from the log.
    pub from_snapshot: u64,
    /// Log entries after the checkpoint folded in again.
    pub refolded: u64,
    /// Of those, the ones that changed a record: writes a crash had lost.
    pub redone: u64,
}

impl EmbeddedStore {
    /// The store over a read model opened with [`ReadModel::open_store`].
    pub fn new(model: ReadModel) -> Self {
        assert!(model.holds_state(), "the embedded store needs a read model whose records hold states");
        Self { model, folds: Arc::default() }
    }

    pub fn model(&self) -> &ReadModel {
        &self.model
    }

    pub fn get(&self, id: &ProductId) -> Result<Option<ProductState>, StoreError> {
        self.model.state(id.as_str()).map_err(store_error)
    }

    /// Every product's state in id order: the replay tools' view of the store.
    pub fn states(&self) -> impl Iterator<Item = Result<ProductState, StoreError>> + use<> {
        self.model.states().map(|s| s.map_err(store_error))
    }

    /// Overwrites these states as they are (`replay reproject`, which has decided they are right).
    pub fn put(&self, states: &[ProductState]) -> Result<(), StoreError> {
        states.iter().try_for_each(|s| self.model.overwrite(s)).map_err(store_error)
    }

    /// Brings the records up to the log on start: states a data dir from before kept in the
    /// main database are moved in first (resumable: the old tree goes only once all are in);
    /// where the records are behind the log's snapshot, its states are taken (a newer record
    /// stays); then the log's entries from there up to its watermark are folded in again.
    pub fn recover(&self, main: &sled::Db, log: &EmbeddedLog, limits: ParseLimits) -> Result<Recovery, StoreError> {
        let mut report = Recovery { moved: self.adopt_legacy(main)?, ..Recovery::default() };
        // A record without a state now is an AWS instance's read model (a cache of the
        // products table), not a store: refused, since folding onto it would start products
        // over. The first record tells: a store's records all hold states.
        if let Some(first) = self.model.views().next() {
            let (id, view) = first.map_err(store_error)?;
            if view.is_some_and(|v| !v.has_state()) {
                return Err(StoreError::rejected(
                    "opening the embedded store",
                    format!(
                        "the read model's record of product {id} holds no state: this data dir belongs to an AWS instance (--backend aws); the embedded backend needs a --data-dir of its own"
                    ),
                ));
            }
        }
        self.model.mark_as_store().map_err(store_error)?;
        let watermark = log.consumed_watermark();
        let mut checkpoint = self.model.checkpoint().map_err(store_error)?;
        let snapshot = log.snapshot();
        let snapshot_sequence = snapshot.sequence();
        if checkpoint < snapshot_sequence {
            report.from_snapshot = self.model.apply_all(snapshot.states())?;
            checkpoint = snapshot_sequence;
            self.model.set_checkpoint(checkpoint).map_err(store_error)?;
        }
        let from = checkpoint.saturating_add(1).min(watermark);
        // As the pipeline did: dead letters never reached the store.
        let skipped = log.skipped_sequences()?;
        let mut batch = Vec::with_capacity(STEP);
        let fold = |batch: &mut Vec<SequencedEvent>, report: &mut Recovery| -> Result<(), StoreError> {
            report.refolded += batch.len() as u64;
            report.redone += self.model.fold(batch).map_err(store_error)?.changed.len() as u64;
            batch.clear();
            Ok(())
        };
        for entry in log.entries_from(from) {
            let entry = entry?;
            if entry.sequence >= watermark {
                break;
            }
            if skipped.contains(&entry.sequence) {
                continue;
            }
            if let Ok(event) = CatalogEvent::parse(&entry.body, entry.accepted_at, limits) {
                let sequence = Some(entry.sequence);
                batch.push(SequencedEvent { sequence, position: sequence, event, trace: None, accepted_at: entry.accepted_at });
            }
            if batch.len() == STEP {
                fold(&mut batch, &mut report)?;
            }
        }
        fold(&mut batch, &mut report)?;
        let covered = watermark.saturating_sub(1);
        if covered > self.model.checkpoint().map_err(store_error)? {
            self.model.set_checkpoint(covered).map_err(store_error)?;
        }
        Ok(report)
    }

    /// Moves the states of a data dir from before records held them into the records.
    fn adopt_legacy(&self, main: &sled::Db) -> Result<u64, StoreError> {
        if !holds_legacy_states(main) {
            return Ok(0);
        }
        let legacy = main.open_tree(LEGACY_STATE_TREE).map_err(sled_error("open the old state tree"))?;
        let states = legacy.iter().map(|item| {
            let (key, value) = item.map_err(sled_error("read the old state tree"))?;
            serde_json::from_slice::<ProductState>(&value).map_err(|e| {
                StoreError::corrupt(format!("decoding the old state of product {}", String::from_utf8_lossy(&key)), e)
            })
        });
        // A record with the state's revision and no state takes it; newer ones stay.
        let moved = self.model.apply_all(states)?;
        self.model.flush().map_err(store_error)?;
        main.drop_tree(LEGACY_STATE_TREE).map_err(sled_error("drop the old state tree"))?;
        main.flush().map_err(sled_error("flush"))?;
        tracing::info!(products = moved, "product states moved into the read model's records");
        Ok(moved)
    }
}

fn sled_error(operation: &'static str) -> impl Fn(sled::Error) -> StoreError {
    move |e| store_error(ReadModelError::Storage { operation, source: e })
}

impl From<ReadModelError> for StoreError {
    fn from(e: ReadModelError) -> Self {
        store_error(e)
    }
}

/// A read-model failure as the pipeline classifies store failures: damage is not an outage.
fn store_error(e: ReadModelError) -> StoreError {
    let class = match &e {
        ReadModelError::Storage { source: sled::Error::Corruption { .. }, .. } | ReadModelError::Corrupt { .. } => {
            FailureClass::Corrupt
        }
        ReadModelError::Storage { source: sled::Error::Unsupported(_) | sled::Error::ReportableBug(_), .. } => {
            FailureClass::Rejected
        }
        ReadModelError::Store(inner) => inner.class(),
        _ => FailureClass::Unavailable,
    };
    BackendError::new(class, "embedded store", e)
}

impl ProductStore for EmbeddedStore {
    async fn write_batch(&self, events: &[SequencedEvent]) -> Result<WriteOutcome, StoreError> {
        self.folds.fold(&self.model, events).await
    }

    async fn get_states(&self, ids: &[ProductId]) -> Result<Vec<ProductState>, StoreError> {
        ids.iter().filter_map(|id| self.get(id).transpose()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use catalog_domain::ViewSettings;
    use catalog_pipeline::EventSource;
    use std::time::SystemTime;

    fn open(dir: &std::path::Path) -> (sled::Db, sled::Db, EmbeddedLog, EmbeddedStore) {
        let main = sled::open(dir.join("main")).unwrap();
        let log = EmbeddedLog::open(&main, &dir.join("event-log"), Default::default()).unwrap();
        let views = sled::open(dir.join("views")).unwrap();
        // Hot views kept, as `serve` keeps them: every read below must still see every write.
        let store = EmbeddedStore::new(ReadModel::open_store(&views, ViewSettings::default()).unwrap().keep_hot(1 << 20));
        (main, views, log, store)
    }

    fn events(bodies: &[(u64, serde_json::Value)]) -> Vec<SequencedEvent> {
        bodies
            .iter()
            .map(|(seq, body)| SequencedEvent {
                sequence: Some(*seq),
                position: Some(*seq),
                event: CatalogEvent::from_value(body, SystemTime::UNIX_EPOCH).unwrap(),
                trace: None,
                accepted_at: SystemTime::UNIX_EPOCH,
            })
            .collect()
    }

    fn product(id: &str, name: &str, category: &str) -> serde_json::Value {
        serde_json::json!({"productId": id, "name": name, "category": category, "status": "updated"})
    }

    /// Appends these events and acks them all, as a pipeline that processed them would.
    async fn processed(log: &EmbeddedLog, bodies: &[serde_json::Value]) {
        log.append(&bodies.iter().map(|b| Bytes::from(serde_json::to_vec(b).unwrap())).collect::<Vec<_>>()).await.unwrap();
        let received = log.receive(bodies.len()).await.unwrap();
        log.ack(received.iter().map(|r| r.receipt).collect()).await.unwrap();
        assert_eq!(log.consumed_watermark(), bodies.len() as u64 + 1);
    }

    fn listed(model: &ReadModel, category: &str) -> Vec<String> {
        model.listings().unwrap().into_iter().filter(|(c, _)| c == category).map(|(_, id)| id).collect()
    }

    #[test]
    fn a_fold_writes_each_record_once_moves_listings_and_ignores_replays() {
        let dir = tempfile::tempdir().unwrap();
        let (_main, _views, _log, store) = open(dir.path());
        let model = store.model();
        let batch = events(&[
            (1, product("P1", "One", "A")),
            (2, serde_json::json!({"productId": "P1", "quantity": 4})),
            (3, product("P2", "Two", "A")),
        ]);
        let outcome = model.fold(&batch).unwrap();
        assert_eq!(outcome.changed.len(), 2, "one record per product");
        assert_eq!(model.get("P1").unwrap().unwrap().revision, 2);
        assert_eq!(store.get(&ProductId::parse("P1").unwrap()).unwrap().unwrap().quantity, Some(4));
        assert_eq!(listed(model, "A"), ["P1", "P2"]);

        // The same entries again (a redelivery, or a start folding its tail in): nothing moves.
        let again = model.fold(&batch).unwrap();
        assert_eq!((again.changed.len(), again.unchanged), (0, 3));
        assert_eq!(model.get("P1").unwrap().unwrap().revision, 2);

        // Moved to another category, then deleted: the listings follow.
        model.fold(&events(&[(4, product("P1", "One", "B"))])).unwrap();
        assert_eq!((listed(model, "A"), listed(model, "B")), (vec!["P2".to_owned()], vec!["P1".to_owned()]));
        model.fold(&events(&[(5, serde_json::json!({"productId": "P1", "status": "deleted"}))])).unwrap();
        assert!(listed(model, "B").is_empty());
        let tombstone = model.get("P1").unwrap().unwrap();
        assert!(!tombstone.listed);
        assert_eq!(model.state("P1").unwrap().unwrap().quantity, Some(4), "a tombstone keeps the state");
        assert_eq!(store.states().count(), 2);
    }

    #[tokio::test]
    async fn a_batch_split_across_threads_folds_as_its_events_one_at_a_time_do() {
        // Large enough that the fold splits it, with products whose events are far apart in it.
        let products = crate::model::PARALLEL_FOLD_MIN_PRODUCTS * 2;
        let bodies: Vec<(u64, serde_json::Value)> = (0..products * 3)
            .map(|i| {
                let (p, round) = (i % products, i / products);
                let body = match round {
                    0 => product(&format!("P{p:05}"), "One", if p % 2 == 0 { "A" } else { "B" }),
                    1 => serde_json::json!({"productId": format!("P{p:05}"), "quantity": p}),
                    _ if p % 3 == 0 => serde_json::json!({"productId": format!("P{p:05}"), "status": "deleted"}),
                    _ => product(&format!("P{p:05}"), "Renamed", "C"),
                };
                (i as u64 + 1, body)
            })
            .collect();
        let (split, single) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (_main, _views, _log, store) = open(split.path());
        let outcome = store.write_batch(&events(&bodies)).await.unwrap();
        assert_eq!((outcome.changed.len(), outcome.unchanged), (products, 0));
        let (_main1, _views1, _log1, one_by_one) = open(single.path());
        for body in &bodies {
            one_by_one.write_batch(&events(std::slice::from_ref(body))).await.unwrap();
        }
        let states = |s: &EmbeddedStore| s.states().map(Result::unwrap).collect::<Vec<_>>();
        assert_eq!(states(&store), states(&one_by_one));
        assert_eq!(store.model().listings().unwrap(), one_by_one.model().listings().unwrap());
        assert_eq!(listed(store.model(), "C").len(), products - products.div_ceil(3));
    }

    #[test]
    fn a_rebuild_of_the_store_carries_over_what_was_written_while_it_ran() {
        let dir = tempfile::tempdir().unwrap();
        let (_main, _views, _log, store) = open(dir.path());
        let model = store.model();
        model.fold(&events(&[(1, product("P1", "One", "A")), (2, product("P2", "Two", "A"))])).unwrap();
        let fresh = model.begin_rebuild().unwrap();
        assert!(fresh.holds_state());
        let states: Vec<ProductState> = model.states().map(Result::unwrap).collect();
        fresh.apply(&states).unwrap();
        // Written to the live generation after the rebuild read it: only the old trees have it.
        model.fold(&events(&[(3, product("P1", "One, renamed", "B")), (4, product("P3", "Three", "A"))])).unwrap();
        let mut carried = model.swap_in(&fresh).unwrap();
        carried.sort();
        assert_eq!(carried, ["P1", "P3"], "carried over by the swap");
        assert_eq!(model.generation(), 1);
        let p1 = model.state("P1").unwrap().unwrap();
        assert_eq!(p1.info.unwrap().name, "One, renamed");
        assert!(model.state("P3").unwrap().is_some());
        assert_eq!((listed(model, "A"), listed(model, "B")), (vec!["P2".to_owned(), "P3".to_owned()], vec!["P1".to_owned()]));
    }

    #[tokio::test]
    async fn a_start_moves_old_states_in_and_folds_the_tail_a_crash_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let (main, views, log, store) = open(dir.path());
        let bodies =
            [product("P1", "One", "A"), product("P2", "Two", "A"), serde_json::json!({"productId": "P1", "quantity": 7})];
        processed(&log, &bodies).await;
        // A data dir from before: P1's state in the main database's tree, its view without it.
        let old = {
            let mut s = ProductState::new(ProductId::parse("P1").unwrap());
            s.apply_at(&events(&[(1, bodies[0].clone())])[0].event, Some(1));
            s
        };
        main.open_tree(LEGACY_STATE_TREE).unwrap().insert("P1", serde_json::to_vec(&old).unwrap()).unwrap();
        views
            .open_tree("views")
            .unwrap()
            .insert("P1", crate::StoredView::encode(&old, ViewSettings::default(), 0, false))
            .unwrap();
        assert!(store.get(&ProductId::parse("P1").unwrap()).unwrap().is_none(), "a view alone is no state");
        // The pipeline had processed all three (the watermark moved), and then the views
        // database lost everything after entry 1.
        store.model().set_checkpoint(1).unwrap();

        let report = store.recover(&main, &log, ParseLimits::default()).unwrap();
        assert_eq!(report, Recovery { moved: 1, from_snapshot: 0, refolded: 2, redone: 2 });
        assert!(!holds_legacy_states(&main), "the old tree is gone");
        let p1 = store.get(&ProductId::parse("P1").unwrap()).unwrap().unwrap();
        assert_eq!((p1.quantity, p1.revision), (Some(7), 2));
        assert!(store.get(&ProductId::parse("P2").unwrap()).unwrap().is_some());
        assert_eq!(store.model().checkpoint().unwrap(), 3);
        assert_eq!(
            store.recover(&main, &log, ParseLimits::default()).unwrap(),
            Recovery::default(),
            "a second start finds nothing to do"
        );
    }

    #[tokio::test]
    async fn a_lost_views_database_is_rebuilt_from_the_snapshot_and_the_tail_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let (main, _views, log, store) = open(dir.path());
        let bodies =
            [product("P1", "One", "A"), product("P2", "Two", "B"), serde_json::json!({"productId": "P1", "quantity": 3})];
        processed(&log, &bodies).await;
        // The first two entries are folded into the snapshot and gone from the log.
        let retention = catalog_pipeline::embedded::Retention { retention: Some(std::time::Duration::ZERO), max_bytes: None };
        let report = catalog_pipeline::embedded::compact(&log, retention, 3, ParseLimits::default()).unwrap();
        assert_eq!(report.snapshot_sequence, 2);
        drop(store);

        // A fresh views database, as after `rm -r views.sled`.
        let views = sled::open(dir.path().join("views-new")).unwrap();
        let store = EmbeddedStore::new(ReadModel::open_store(&views, ViewSettings::default()).unwrap());
        let recovery = store.recover(&main, &log, ParseLimits::default()).unwrap();
        assert_eq!((recovery.from_snapshot, recovery.refolded, recovery.redone), (2, 1, 1));
        let p1 = store.get(&ProductId::parse("P1").unwrap()).unwrap().unwrap();
        assert_eq!(p1.quantity, Some(3));
        assert_eq!((listed(store.model(), "A"), listed(store.model(), "B")), (vec!["P1".to_owned()], vec!["P2".to_owned()]));
        assert_eq!(store.model().checkpoint().unwrap(), 3);
    }

    #[tokio::test]
    async fn the_read_model_of_an_aws_instance_is_refused_as_a_store() {
        let dir = tempfile::tempdir().unwrap();
        let main = sled::open(dir.path().join("main")).unwrap();
        let log = EmbeddedLog::open(&main, &dir.path().join("event-log"), Default::default()).unwrap();
        let views = sled::open(dir.path().join("views")).unwrap();
        // What an AWS instance leaves: views without states.
        let cache = ReadModel::open(&views, ViewSettings::default(), None).unwrap();
        let mut state = ProductState::new(ProductId::parse("P1").unwrap());
        state.apply_at(&events(&[(1, product("P1", "One", "A"))])[0].event, Some(1));
        cache.apply([&state]).unwrap();
        let store = EmbeddedStore::new(ReadModel::open_store(&views, ViewSettings::default()).unwrap());
        let message = catalog_pipeline::error::chain(&store.recover(&main, &log, ParseLimits::default()).unwrap_err());
        assert!(message.contains("belongs to an AWS instance"), "{message}");
        drop(store);
        let reopened = ReadModel::open(&views, ViewSettings::default(), None).unwrap();
        assert!(!reopened.holds_state(), "a refused data dir is left as the AWS instance had it");
    }
}
