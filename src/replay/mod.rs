//! `catalog replay …`: the operator tools. Embedded, they open a stopped instance's data dir
//! (sled allows one process); on AWS they work beside running workers.

mod dlq;
mod progress;
mod rebuild;
mod reproject;
mod verify;

pub use dlq::dlq;
pub use rebuild::rebuild;
pub use reproject::reproject;
pub use verify::verify;

use anyhow::Context;
use catalog_pipeline::embedded::EmbeddedLog;
use catalog_readmodel::{EmbeddedStore, ReadModel};

use crate::cli::DataArgs;
use crate::datadir::DataDir;

/// The embedded store of a stopped instance, brought up to its log as `serve` would on start
/// (states of an older data dir moved in, a tail a crash cut off folded in again), so a tool
/// sees what the next `serve` would serve. Returns the views database with it.
fn open_embedded_store(
    dir: &DataDir,
    main: &sled::Db,
    log: &EmbeddedLog,
    data: &DataArgs,
) -> anyhow::Result<(sled::Db, EmbeddedStore)> {
    let views = dir.open_views()?;
    let store = EmbeddedStore::new(ReadModel::open_store(&views, data.view_settings()).context("opening the store")?);
    let recovery = store.recover(main, log, data.parse_limits()).context("bringing the store up to the event log")?;
    if recovery.moved > 0 || recovery.redone > 0 || recovery.from_snapshot > 0 {
        eprintln!(
            "brought the store up to the event log first, as `serve` would: {} states moved into the read model, {} taken from the log's snapshot, {} of {} log entries after its checkpoint applied again",
            recovery.moved, recovery.from_snapshot, recovery.redone, recovery.refolded
        );
    }
    Ok((views, store))
}

/// How a replay command ended, when it did not fail outright.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Everything asked for was done, and found consistent.
    Clean,
    /// The command ran, but found drift or could not do all it was asked; it said what.
    Unfinished,
}

/// The AWS-side tools run their calls on one small runtime.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().context("starting the async runtime")
}
