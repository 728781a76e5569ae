//! `rebuild`: every view from the embedded log's projection, written on all cores.

use std::time::{Duration, Instant};

use catalog_domain::{ParseLimits, ProductState};
use catalog_pipeline::SourceError;
use catalog_pipeline::embedded::EmbeddedLog;
use catalog_readmodel::{ReadModel, ReadModelError};

use crate::{ReplayError, project_tail};

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RebuildReport {
    pub entries_read: u64,
    pub events_applied: u64,
    pub invalid_skipped: u64,
    pub dead_lettered_skipped: u64,
    pub products: u64,
    pub views_written: u64,
    pub last_sequence: u64,
    /// The last sequence the log's snapshot holds; the entries read are the ones after it.
    pub snapshot_sequence: u64,
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
    let (projection, snapshot) = project_tail(log, limits, progress)?;
    let fold = projection.report.clone();
    let mut report = RebuildReport {
        entries_read: fold.entries_read,
        events_applied: fold.events_applied,
        invalid_skipped: fold.invalid_skipped,
        dead_lettered_skipped: fold.dead_lettered_skipped,
        last_sequence: fold.last_sequence,
        snapshot_sequence: fold.snapshot_sequence,
        fold_elapsed: started.elapsed(),
        ..RebuildReport::default()
    };
    model.clear()?;
    report.clear_elapsed = started.elapsed() - report.fold_elapsed;
    (report.products, report.views_written) = write_views(model, snapshot.merged_with(projection.into_sorted()))?;
    model.set_checkpoint(report.last_sequence)?;
    report.elapsed = started.elapsed();
    report.write_elapsed = report.elapsed - report.fold_elapsed - report.clear_elapsed;
    Ok(report)
}

/// States handed to a writer at once: contiguous in id order, so that two writers seldom
/// share a leaf of the trees, and few enough that those in flight are a few MB.
const WRITE_BATCH: usize = 4096;

/// Writes the views of `states` (in id order) on every core: this thread reads them and the
/// writers take batches in turn. Returns the states read and the views written.
///
/// Each writer given a contiguous half of the ids, reading its half of the snapshot itself,
/// wrote no faster at 1M products and needed a walk of the snapshot first to find the
/// halves (1.4 s).
pub fn write_views(
    model: &ReadModel,
    states: impl Iterator<Item = Result<ProductState, SourceError>>,
) -> Result<(u64, u64), ReplayError> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|scope| {
        let (writers, workers): (Vec<_>, Vec<_>) = (0..threads)
            .map(|_| {
                let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<ProductState>>(1);
                let worker =
                    scope.spawn(move || rx.into_iter().try_fold(0, |n, batch| Ok::<_, ReadModelError>(n + model.apply(&batch)?)));
                (tx, worker)
            })
            .collect();
        let mut read = 0u64;
        let mut failed = None;
        let mut states = states.fuse();
        for turn in 0.. {
            let mut batch = Vec::with_capacity(WRITE_BATCH);
            for state in states.by_ref() {
                match state {
                    Ok(state) => batch.push(state),
                    Err(e) => failed = Some(e),
                }
                if batch.len() == WRITE_BATCH || failed.is_some() {
                    break;
                }
            }
            if batch.is_empty() || failed.is_some() {
                break;
            }
            read += batch.len() as u64;
            // A writer gone has failed: its error is the one returned below.
            if writers[turn % threads].send(batch).is_err() {
                break;
            }
        }
        drop(writers);
        let written: Result<Vec<usize>, ReadModelError> =
            workers.into_iter().map(|w| w.join().expect("rebuild writer panicked")).collect();
        if let Some(e) = failed {
            return Err(e.into());
        }
        Ok((read, written?.into_iter().sum::<usize>() as u64))
    })
}
