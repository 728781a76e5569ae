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
