//! Operator tools that rebuild derived state from the event log.
//!
//! - `rebuild`: the read model from the embedded event log, through the same fold the
//!   pipeline uses, in log order; dead-lettered messages are skipped since the store never
//!   applied them. Failures are reported, never swallowed.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use catalog_domain::{CatalogEvent, ParseLimits, ProductId, ProductState};
use catalog_pipeline::SourceError;
use catalog_pipeline::embedded::{EmbeddedLog, LogEntry};
use catalog_readmodel::{ReadModel, ReadModelError};

/// Log entries parsed together (in parallel) before they are folded in order.
const PARSE_CHUNK: usize = 16 * 1024;

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
///
/// Parsing and writing are spread over the machine's cores (the fold itself stays in log
/// order); the model should be empty, as `catalog replay rebuild` makes it, or it is cleared.
pub fn rebuild(
    log: &EmbeddedLog,
    model: &ReadModel,
    limits: ParseLimits,
    mut progress: impl FnMut(u64),
) -> Result<RebuildReport, ReplayError> {
    let started = Instant::now();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let dead: HashSet<u64> = log.dead_letters()?.into_iter().map(|(r, _)| r.sequence).collect();
    let mut report = RebuildReport::default();
    let mut states: HashMap<ProductId, ProductState> = HashMap::new();
    // A reader thread walks the log while the chunk before is parsed and folded.
    let (chunks_tx, chunks_rx) = std::sync::mpsc::sync_channel::<Result<Vec<LogEntry>, SourceError>>(2);
    let reader_log = log.clone();
    let reader = std::thread::spawn(move || {
        let mut entries = reader_log.entries_from(1);
        loop {
            let chunk: Result<Vec<LogEntry>, SourceError> = entries.by_ref().take(PARSE_CHUNK).collect();
            let done = chunk.as_ref().map_or(true, Vec::is_empty);
            if chunks_tx.send(chunk).is_err() || done {
                return;
            }
        }
    });
    for chunk in chunks_rx {
        let mut chunk = chunk?;
        if chunk.is_empty() {
            break;
        }
        report.entries_read += chunk.len() as u64;
        report.last_sequence = chunk.last().map_or(report.last_sequence, |e| e.sequence);
        let before = chunk.len();
        chunk.retain(|e| !dead.contains(&e.sequence));
        report.dead_lettered_skipped += (before - chunk.len()) as u64;
        for (entry, event) in chunk.iter().zip(parse_in_parallel(&chunk, limits, threads)) {
            let Some(event) = event else {
                report.invalid_skipped += 1;
                continue;
            };
            let state = states.entry(event.product_id.clone()).or_insert_with(|| ProductState::new(event.product_id.clone()));
            if state.apply_at(&event, Some(entry.sequence)) == catalog_domain::state::Applied::Changed {
                report.events_applied += 1;
            }
        }
        progress(report.entries_read);
    }
    reader.join().expect("log reader panicked");
    report.fold_elapsed = started.elapsed();
    model.clear()?;
    report.clear_elapsed = started.elapsed() - report.fold_elapsed;
    report.products = states.len() as u64;
    let mut states: Vec<ProductState> = states.into_values().collect();
    states.sort_unstable_by(|a, b| a.id.cmp(&b.id));
    // Contiguous id ranges per thread: each walks its own part of the trees.
    let per_thread = states.len().div_ceil(threads).max(1);
    let written: Result<Vec<usize>, ReadModelError> = std::thread::scope(|scope| {
        let workers: Vec<_> = states.chunks(per_thread).map(|part| scope.spawn(move || model.apply(part))).collect();
        workers.into_iter().map(|w| w.join().expect("rebuild writer panicked")).collect()
    });
    report.views_written = written?.into_iter().sum::<usize>() as u64;
    model.set_checkpoint(report.last_sequence)?;
    report.elapsed = started.elapsed();
    report.write_elapsed = report.elapsed - report.fold_elapsed - report.clear_elapsed;
    Ok(report)
}

/// Parses a chunk of log entries on `threads` threads; `None` for an entry that is invalid.
fn parse_in_parallel(chunk: &[LogEntry], limits: ParseLimits, threads: usize) -> Vec<Option<CatalogEvent>> {
    let parse = |part: &[LogEntry]| -> Vec<Option<CatalogEvent>> {
        part.iter().map(|e| CatalogEvent::parse(&e.body, e.accepted_at, limits).ok()).collect()
    };
    if threads < 2 || chunk.len() < 2 * 1024 {
        return parse(chunk);
    }
    let per_thread = chunk.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let workers: Vec<_> = chunk.chunks(per_thread).map(|part| scope.spawn(move || parse(part))).collect();
        workers.into_iter().flat_map(|w| w.join().expect("parser thread panicked")).collect()
    })
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
