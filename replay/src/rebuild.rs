//! `rebuild`: every view from the embedded log's projection, written on all cores.

use std::time::{Duration, Instant};

use catalog_domain::ParseLimits;
use catalog_pipeline::embedded::EmbeddedLog;
use catalog_readmodel::{ReadModel, ReadModelError};

use crate::{ReplayError, project_embedded};

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
/// The model should be empty, as `catalog replay rebuild` makes it, or it is cleared.
pub fn rebuild(
    log: &EmbeddedLog,
    model: &ReadModel,
    limits: ParseLimits,
    progress: impl FnMut(u64),
) -> Result<RebuildReport, ReplayError> {
    let started = Instant::now();
    let projection = project_embedded(log, limits, progress)?;
    let fold = projection.report.clone();
    let mut report = RebuildReport {
        entries_read: fold.entries_read,
        events_applied: fold.events_applied,
        invalid_skipped: fold.invalid_skipped,
        dead_lettered_skipped: fold.dead_lettered_skipped,
        last_sequence: fold.last_sequence,
        products: projection.len() as u64,
        fold_elapsed: started.elapsed(),
        ..RebuildReport::default()
    };
    model.clear()?;
    report.clear_elapsed = started.elapsed() - report.fold_elapsed;
    report.views_written = write_views(model, &projection.into_sorted())?;
    model.set_checkpoint(report.last_sequence)?;
    report.elapsed = started.elapsed();
    report.write_elapsed = report.elapsed - report.fold_elapsed - report.clear_elapsed;
    Ok(report)
}

/// Writes views on every core, each thread a contiguous id range (its own part of the trees).
pub fn write_views(model: &ReadModel, states: &[catalog_domain::ProductState]) -> Result<u64, ReplayError> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_thread = states.len().div_ceil(threads).max(1);
    let written: Result<Vec<usize>, ReadModelError> = std::thread::scope(|scope| {
        let workers: Vec<_> = states.chunks(per_thread).map(|part| scope.spawn(move || model.apply(part))).collect();
        workers.into_iter().map(|w| w.join().expect("rebuild writer panicked")).collect()
    });
    Ok(written?.into_iter().sum::<usize>() as u64)
}
