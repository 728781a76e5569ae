//! Adapters for one process and no cloud: the inbox is the event log, in append-only segment
//! files; dead letters and the cursor's watermark are in one sled database, the log's snapshot
//! in files of its own. (The product store is the read model's records:
//! `catalog_readmodel::EmbeddedStore`.)
//!
//! `POST /events` appends each message once, with a global sequence, and answers once the
//! entries are fsynced (one fsync shared by concurrent requests); the pipeline reads durable
//! entries only, in order, and acks by moving a persisted watermark, not by deleting. Entries
//! past their retention are folded into a snapshot, and whole segments behind it deleted
//! (`snapshot`), so the log and its disk stay bounded.

mod bus;
mod log;
mod pace;
mod runs;
mod segments;
mod snapshot;

pub use bus::{DEFAULT_SUBSCRIBER_CAPACITY, EmbeddedBus};
pub use log::{DEFAULT_MAX_RECEIVE_COUNT, DEFAULT_VISIBILITY_TIMEOUT, DeadLetterRecord, EmbeddedLog, LogConfig, LogEntry};
pub use pace::DEFAULT_YIELD_BACKLOG;
pub use segments::DEFAULT_SEGMENT_BYTES;
pub use snapshot::{
    CompactReport, DEFAULT_COMPACT_INTERVAL, DEFAULT_RETENTION, DEFAULT_RETENTION_BYTES, LogSnapshot, Retention, compact,
    compact_beside,
};
/// Where product states were kept before the read model's records held them; moved out on
/// the first start (`catalog_readmodel::EmbeddedStore::recover`).
pub const LEGACY_STATE_TREE: &str = trees::STATE;

/// Whether the main database still holds [`LEGACY_STATE_TREE`] (without creating it, as
/// opening it would).
pub fn holds_legacy_states(main: &sled::Db) -> bool {
    main.tree_names().iter().any(|name| name.as_ref() == LEGACY_STATE_TREE.as_bytes())
}

/// Trees of the embedded database, named in one place so tools can find them.
pub(crate) mod trees {
    /// Where the log was kept before segment files; moved out on open.
    pub const LOG: &str = "event_log";
    pub const DLQ: &str = "dead_letters";
    /// Dead letters moved back into the log: original sequence → the sequence it came back as.
    pub const REDRIVEN: &str = "redriven";
    pub const META: &str = "pipeline_meta";
    pub const STATE: &str = "product_state";
    /// Where the snapshot was kept before its files; moved out on open.
    pub const SNAPSHOT: &str = "log_snapshot";
}

/// A value or key stored as a big-endian u64 (sequences, counts); `None` if it is not 8 bytes.
pub(crate) fn be_u64(bytes: &[u8]) -> Option<u64> {
    bytes.try_into().ok().map(u64::from_be_bytes)
}

/// A sled failure, classified: a corrupt file is not an outage, anything else (I/O) is.
pub(crate) fn storage_error(operation: &'static str) -> impl Fn(sled::Error) -> crate::BackendError {
    move |e| {
        let class = match e {
            sled::Error::Corruption { .. } => crate::FailureClass::Corrupt,
            sled::Error::Unsupported(_) | sled::Error::ReportableBug(_) => crate::FailureClass::Rejected,
            sled::Error::Io(_) | sled::Error::CollectionNotFound(_) => crate::FailureClass::Unavailable,
        };
        crate::BackendError::new(class, format!("embedded {operation}"), e)
    }
}

/// A file failure, classified as sled's are: damaged bytes are not an outage.
pub(crate) fn file_error(operation: impl Into<String>, e: std::io::Error) -> crate::BackendError {
    let class =
        if e.kind() == std::io::ErrorKind::InvalidData { crate::FailureClass::Corrupt } else { crate::FailureClass::Unavailable };
    crate::BackendError::new(class, operation, e)
}

/// The database again, after a scope dropped it: sled's background writer may hold the file
/// lock for a moment after the last handle went (bounded, 5 s).
#[cfg(test)]
pub(crate) fn reopen(path: &std::path::Path) -> sled::Db {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match sled::open(path) {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock") && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            opened => return opened.unwrap(),
        }
    }
}
