//! Operator tools that rebuild derived state from the event log.
//!
//! - [`rebuild`]: the read model from the embedded event log, through the same fold the
//!   pipeline uses, in log order; dead-lettered messages are skipped since the store never
//!   applied them. Failures are reported, never swallowed.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use catalog_domain::{CatalogEvent, ParseLimits, ProductId, ProductState};
use catalog_pipeline::SourceError;
use catalog_pipeline::embedded::EmbeddedLog;
use catalog_readmodel::{ReadModel, ReadModelError};

/// Views written per batch while rebuilding.
const WRITE_CHUNK: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("reading the event log failed: {0}")]
    Log(#[from] SourceError),
    #[error("writing the read model failed: {0}")]
    ReadModel(#[from] ReadModelError),
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RebuildReport {
    pub entries_read: u64,
    pub events_applied: u64,
    pub invalid_skipped: u64,
    pub dead_lettered_skipped: u64,
    pub products: u64,
    pub views_written: u64,
    pub last_sequence: u64,
    /// Reading and folding the log.
    pub fold_elapsed: Duration,
    /// Dropping the old views.
    pub clear_elapsed: Duration,
    /// Rendering and writing the new ones.
    pub write_elapsed: Duration,
    pub elapsed: Duration,
}

/// Rebuilds every view from the log. `progress` is called with the entries read so far.
pub fn rebuild(
    log: &EmbeddedLog,
    model: &ReadModel,
    limits: ParseLimits,
    mut progress: impl FnMut(u64),
) -> Result<RebuildReport, ReplayError> {
    let started = Instant::now();
    let dead: HashSet<u64> = log.dead_letters()?.into_iter().map(|(r, _)| r.sequence).collect();
    let mut report = RebuildReport::default();
    let mut states: HashMap<ProductId, ProductState> = HashMap::new();
    for entry in log.entries_from(1) {
        let entry = entry?;
        report.entries_read += 1;
        report.last_sequence = entry.sequence;
        if report.entries_read % 65_536 == 0 {
            progress(report.entries_read);
        }
        if dead.contains(&entry.sequence) {
            report.dead_lettered_skipped += 1;
            continue;
        }
        let Ok(event) = CatalogEvent::parse(&entry.body, entry.accepted_at, limits) else {
            report.invalid_skipped += 1;
            continue;
        };
        let state = states.entry(event.product_id.clone()).or_insert_with(|| ProductState::new(event.product_id.clone()));
        if state.apply(&event) == catalog_domain::state::Applied::Changed {
            report.events_applied += 1;
        }
    }
    progress(report.entries_read);
    report.fold_elapsed = started.elapsed();
    model.clear()?;
    report.clear_elapsed = started.elapsed() - report.fold_elapsed;
    report.products = states.len() as u64;
    let mut states: Vec<ProductState> = states.into_values().collect();
    states.sort_by(|a, b| a.id.cmp(&b.id));
    for chunk in states.chunks(WRITE_CHUNK) {
        report.views_written += model.apply(chunk)? as u64;
    }
    model.set_checkpoint(report.last_sequence)?;
    report.elapsed = started.elapsed();
    report.write_elapsed = report.elapsed - report.fold_elapsed - report.clear_elapsed;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use catalog_domain::ViewSettings;

    #[tokio::test]
    async fn rebuild_folds_the_log_in_order_and_skips_bad_entries() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let log = EmbeddedLog::open(&db, Default::default()).unwrap();
        let model = ReadModel::open(&db, ViewSettings::default(), None).unwrap();
        let bodies = [
            r#"{"productId":"P1","name":"Old","category":"C","status":"created","version":1}"#,
            r#"{"productId":"P1","name":"New","category":"C","status":"updated","version":2}"#,
            r#"{"productId":"P1","name":"Stale","category":"C","status":"updated","version":1}"#,
            "{not json",
            r#"{"productId":"P2","name":"Gone","category":"C","status":"created"}"#,
            r#"{"productId":"P2","status":"deleted"}"#,
        ];
        log.append(&bodies.map(|b| Bytes::from_static(b.as_bytes()))).await.unwrap();
        let report = rebuild(&log, &model, ParseLimits::default(), |_| {}).unwrap();
        assert_eq!((report.entries_read, report.invalid_skipped, report.products, report.last_sequence), (6, 1, 2, 6));
        let page = model.page("C", None, 10).unwrap();
        assert_eq!(page.items.len(), 1);
        let web: serde_json::Value = serde_json::from_slice(&page.items[0].body(catalog_readmodel::Variant::Web)).unwrap();
        assert_eq!(web["product"]["name"], "New");
        assert_eq!(model.checkpoint().unwrap(), 6);
    }
}
