//! The log's projection: the state every product reaches when its events are folded in log
//! order under the same rule the store applies (versions, else positions).

use std::collections::{HashMap, HashSet};

use catalog_domain::state::Applied;
use catalog_domain::{CatalogEvent, ParseLimits, ProductId, ProductState};
use catalog_pipeline::SourceError;
use catalog_pipeline::embedded::{EmbeddedLog, LogEntry};

use crate::ReplayError;

/// Log entries parsed together (in parallel) before they are folded in order.
const PARSE_CHUNK: usize = 16 * 1024;

/// What a fold read and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FoldReport {
    pub entries_read: u64,
    pub events_applied: u64,
    pub invalid_skipped: u64,
    pub dead_lettered_skipped: u64,
    pub last_sequence: u64,
    /// Products the fold started from, and the last sequence their snapshot holds (0: none,
    /// the log was whole).
    pub snapshot_products: u64,
    pub snapshot_sequence: u64,
}

#[derive(Debug, Default)]
pub struct Projection {
    pub states: HashMap<ProductId, ProductState>,
    pub report: FoldReport,
}

impl Projection {
    /// Folds one event in; call in log order.
    pub fn apply(&mut self, event: &CatalogEvent, position: Option<u64>) {
        let state = self.states.entry(event.product_id.clone()).or_insert_with(|| ProductState::new(event.product_id.clone()));
        if state.apply_at(event, position) == Applied::Changed {
            self.report.events_applied += 1;
        }
    }

    /// The states in id order.
    pub fn into_sorted(self) -> Vec<ProductState> {
        let mut states: Vec<ProductState> = self.states.into_values().collect();
        states.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        states
    }
}

/// Folds the embedded log: the snapshot compaction left, then the entries after it.
/// Dead-lettered entries are skipped, since the store never applied them (a redriven one
/// applies at the sequence it came back as); `progress` gets the entries read so far.
pub fn project_embedded(
    log: &EmbeddedLog,
    limits: ParseLimits,
    mut progress: impl FnMut(u64),
) -> Result<Projection, ReplayError> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let skipped: HashSet<u64> = log.skipped_sequences()?;
    let mut projection = Projection::default();
    let snapshot = log.snapshot()?;
    let from = snapshot.sequence()? + 1;
    for state in snapshot.states() {
        let state = state?;
        projection.states.insert(state.id.clone(), state);
        projection.report.snapshot_products += 1;
    }
    projection.report.snapshot_sequence = from - 1;
    projection.report.last_sequence = from - 1;
    // A reader thread walks the log while the chunk before is parsed and folded.
    let (chunks_tx, chunks_rx) = std::sync::mpsc::sync_channel::<Result<Vec<LogEntry>, SourceError>>(2);
    let reader_log = log.clone();
    let reader = std::thread::spawn(move || {
        let mut entries = reader_log.entries_from(from);
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
        let report = &mut projection.report;
        report.entries_read += chunk.len() as u64;
        report.last_sequence = chunk.last().map_or(report.last_sequence, |e| e.sequence);
        let before = chunk.len();
        chunk.retain(|e| !skipped.contains(&e.sequence));
        report.dead_lettered_skipped += (before - chunk.len()) as u64;
        for (entry, event) in chunk.iter().zip(parse_in_parallel(&chunk, limits, threads)) {
            match event {
                Some(event) => projection.apply(&event, Some(entry.sequence)),
                None => projection.report.invalid_skipped += 1,
            }
        }
        progress(projection.report.entries_read);
    }
    reader.join().expect("log reader panicked");
    Ok(projection)
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
