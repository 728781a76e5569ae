//! Operator tools that rebuild and check derived state against the event log.
//!
//! - `project`: the log folded in order under the store's own rule: what every product should be;
//! - `rebuild`: the read model from the embedded log's projection;
//! - `verify`: projection, store and read model compared, every drift listed; `--repair`;
//! - `reproject`: the store put right from the projection.
//!
//! The binary wires each to a backend; failures are reported, never swallowed.

mod project;
mod rebuild;
mod reproject;
mod verify;

pub use project::{FoldReport, Projection, project_tail};
pub use rebuild::{RebuildReport, rebuild, write_views};
pub use reproject::reconcile;
pub use verify::{
    Drift, DriftKind, EitherOrBoth, StoreComparison, ViewReport, compare_store, compare_views, repair_views, side_by_side,
};

use catalog_pipeline::SourceError;
use catalog_readmodel::ReadModelError;

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("reading the event log failed: {0}")]
    Log(#[from] SourceError),
    #[error("the read model failed: {0}")]
    ReadModel(#[from] ReadModelError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use catalog_domain::{ParseLimits, ViewSettings};
    use catalog_pipeline::embedded::EmbeddedLog;
    use catalog_pipeline::{EventSource, ProductStore};
    use catalog_readmodel::{EmbeddedStore, ReadModel};

    const BODIES: [&str; 6] = [
        r#"{"productId":"P1","name":"Old","category":"C","status":"created","version":1}"#,
        r#"{"productId":"P1","name":"New","category":"C","status":"updated","version":2}"#,
        r#"{"productId":"P1","name":"Stale","category":"C","status":"updated","version":1}"#,
        "{not json",
        r#"{"productId":"P2","name":"Gone","category":"C","status":"created"}"#,
        r#"{"productId":"P2","status":"deleted"}"#,
    ];

    fn open() -> (tempfile::TempDir, sled::Db, EmbeddedLog, ReadModel) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let log = EmbeddedLog::open(&db, &dir.path().join("event-log"), Default::default()).unwrap();
        let model = ReadModel::open(&db, ViewSettings::default(), None).unwrap();
        (dir, db, log, model)
    }

    #[tokio::test]
    async fn rebuild_folds_the_log_in_order_and_skips_bad_entries() {
        let (_dir, _db, log, model) = open();
        log.append(&BODIES.map(|b| Bytes::from_static(b.as_bytes()))).await.unwrap();
        let report = rebuild(&log, &model, ParseLimits::default(), |_| {}).unwrap();
        assert_eq!((report.entries_read, report.invalid_skipped, report.products, report.last_sequence), (6, 1, 2, 6));
        let page = model.page("C", None, 10).unwrap();
        assert_eq!(page.items.len(), 1);
        let web: serde_json::Value = serde_json::from_slice(&page.items[0].body(catalog_readmodel::Variant::Web)).unwrap();
        assert_eq!(web["product"]["name"], "New");
        assert_eq!(model.checkpoint().unwrap(), 6);
    }

    #[tokio::test]
    async fn rebuild_from_snapshot_and_tail_writes_what_the_whole_log_folds_to() {
        let (_dir, _db, log, model) = open();
        let (_whole_dir, _whole_db, whole_log, _) = open();
        let round = |r: u32, ids: std::ops::Range<u32>| -> Vec<Bytes> {
            ids.map(|i| {
                Bytes::from(format!(r#"{{"productId":"P{i:04}","name":"N{r}","category":"C{}","status":"created"}}"#, i % 3))
            })
            .collect()
        };
        // More products than a write batch: some only in the snapshot, some only in the tail,
        // some in both.
        for log in [&log, &whole_log] {
            log.append(&round(1, 0..6000)).await.unwrap();
            let received = log.receive(6000).await.unwrap();
            log.ack(received.into_iter().map(|r| r.receipt).collect()).await.unwrap();
        }
        let retention = catalog_pipeline::embedded::Retention { retention: Some(std::time::Duration::ZERO), max_bytes: None };
        catalog_pipeline::embedded::compact(&log, retention, u64::MAX, ParseLimits::default()).unwrap();
        for log in [&log, &whole_log] {
            log.append(&round(2, 3000..9000)).await.unwrap();
        }

        let report = rebuild(&log, &model, ParseLimits::default(), |_| {}).unwrap();
        assert_eq!(
            (report.entries_read, report.products, report.views_written, report.last_sequence),
            (6000, 9000, 9000, 12_000)
        );
        let (whole, _) = project_tail(&whole_log, ParseLimits::default(), |_| {}).unwrap();
        assert_eq!((whole.report.snapshot_sequence, whole.len()), (0, 9000));
        let name = |id: &str| {
            let view = model.get(id).unwrap().expect("every product has its view");
            let web: serde_json::Value = serde_json::from_slice(&view.body(catalog_readmodel::Variant::Web)).unwrap();
            web["product"]["name"].as_str().unwrap().to_owned()
        };
        for state in whole.states() {
            assert_eq!(name(state.id.as_str()), state.info.as_ref().unwrap().name, "{}", state.id);
        }
        assert_eq!([name("P0000"), name("P2999"), name("P3000"), name("P8999")], ["N1", "N1", "N2", "N2"]);
        assert_eq!(model.page("C0", None, 5000).unwrap().items.len(), 3000);
    }

    #[tokio::test]
    async fn a_damaged_snapshot_state_fails_the_rebuild_by_name() {
        // The files check their bytes when they open; a state that no build can decode gets in
        // only as an older build's snapshot in sled, which the log moves into its files as it
        // is.
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let tree = db.open_tree("log_snapshot").unwrap();
        for i in 0..5000 {
            let mut state = catalog_domain::ProductState::new(catalog_domain::ProductId::parse(&format!("P{i:04}")).unwrap());
            state.quantity = Some(i);
            let mut value = Vec::new();
            state.encode_stored(&mut value);
            tree.insert(state.id.as_str(), value).unwrap();
        }
        // Past the first write batch, so the writers are busy when it is reached.
        tree.insert("P4321", &b"\xff\xff"[..]).unwrap();
        tree.insert(b"\0sequence", &5000u64.to_be_bytes()).unwrap();
        let log = EmbeddedLog::open(&db, &dir.path().join("event-log"), Default::default()).unwrap();
        let model = ReadModel::open(&db, ViewSettings::default(), None).unwrap();
        let err = rebuild(&log, &model, ParseLimits::default(), |_| {}).unwrap_err().to_string();
        assert!(err.contains("P4321"), "{err}");
    }

    /// States held in memory, as the comparisons read them (in id order, as given).
    fn in_memory(
        states: &[catalog_domain::ProductState],
    ) -> impl Iterator<Item = Result<&catalog_domain::ProductState, ReplayError>> {
        states.iter().map(Ok)
    }

    /// A store as the pipeline would leave it, each event applied at its log sequence, beside
    /// the model under test (which is then a cache of it, as on AWS).
    async fn store_from_log(dir: &std::path::Path, log: &EmbeddedLog) -> (EmbeddedStore, Vec<catalog_domain::ProductState>) {
        let db = sled::open(dir.join("store")).unwrap();
        let store = EmbeddedStore::new(ReadModel::open_store(&db, ViewSettings::default()).unwrap());
        let events: Vec<catalog_pipeline::SequencedEvent> = log
            .entries_from(1)
            .filter_map(|e| {
                let e = e.unwrap();
                let event = catalog_domain::CatalogEvent::parse(&e.body, e.accepted_at, ParseLimits::default()).ok()?;
                Some(catalog_pipeline::SequencedEvent {
                    sequence: Some(e.sequence),
                    position: Some(e.sequence),
                    event,
                    trace: None,
                    accepted_at: e.accepted_at,
                })
            })
            .collect();
        store.write_batch(&events).await.unwrap();
        let states = store.states().collect::<Result<Vec<_>, _>>().unwrap();
        (store, states)
    }

    #[tokio::test]
    async fn verify_finds_no_drift_when_all_agree_and_names_each_drift_otherwise() {
        let (dir, _db, log, model) = open();
        log.append(&BODIES.map(|b| Bytes::from_static(b.as_bytes()))).await.unwrap();
        let (store, mut states) = store_from_log(dir.path(), &log).await;
        model.apply(&states).unwrap();
        let log_states = project_tail(&log, ParseLimits::default(), |_| {}).unwrap().0.into_sorted();
        assert_eq!(compare_store(in_memory(&log_states), in_memory(&states)).unwrap().drifts, []);
        let (drifts, report) = compare_views(&model, in_memory(&states)).unwrap();
        assert_eq!((drifts, report), (vec![], ViewReport { views: 2, listings: 1 }));

        // The store loses an update; a view goes stale; a listing entry points elsewhere.
        let p1 = states.iter_mut().find(|s| s.id.as_str() == "P1").unwrap();
        let mut behind = p1.clone();
        behind.info.as_mut().unwrap().name = "Old".into();
        behind.revision += 1;
        store.put(std::slice::from_ref(&behind)).unwrap();
        *p1 = behind.clone();
        let drifts = compare_store(in_memory(&log_states), in_memory(&states)).unwrap().drifts;
        assert_eq!(drifts.len(), 1);
        assert_eq!(drifts[0].to_string(), r#"store≠log P1: name: log "New", store "Old""#);

        let (drifts, _) = compare_views(&model, in_memory(&states)).unwrap();
        let text: Vec<String> = drifts.iter().map(ToString::to_string).collect();
        assert!(text.iter().any(|t| t.starts_with("view≠store P1: revision: view 2, store 3")), "{text:?}");
        assert!(text.iter().any(|t| t.starts_with("view≠store P1: web body")), "{text:?}");

        assert_eq!(repair_views(&model, &states, &drifts).unwrap(), 1);
        assert_eq!(compare_views(&model, in_memory(&states)).unwrap().0, [], "repaired from the store");
        let web: serde_json::Value =
            serde_json::from_slice(&model.get("P1").unwrap().unwrap().body(catalog_readmodel::Variant::Web)).unwrap();
        assert_eq!(web["product"]["name"], "Old", "the read model follows the store, not the log");
    }

    #[tokio::test]
    async fn listings_that_disagree_with_the_views_are_found_and_repaired() {
        let (dir, _db, log, model) = open();
        log.append(&BODIES.map(|b| Bytes::from_static(b.as_bytes()))).await.unwrap();
        let (_store, states) = store_from_log(dir.path(), &log).await;
        model.apply(&states).unwrap();
        model.unindex("C", "P1").unwrap();
        let (drifts, _) = compare_views(&model, in_memory(&states)).unwrap();
        assert_eq!(
            drifts.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [r#"listing≠views P1: missing from the listing of category "C""#]
        );
        repair_views(&model, &states, &drifts).unwrap();
        assert_eq!(model.page("C", None, 10).unwrap().items.len(), 1);
        assert_eq!(compare_views(&model, in_memory(&states)).unwrap().0, []);
    }
}
