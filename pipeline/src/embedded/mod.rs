//! Adapters for one process and no cloud, all on one sled database so that one fsync covers
//! the queue, the log and the state.
//!
//! The inbox is the event log: `POST /events` appends each message once, with a global
//! sequence; the pipeline reads it in order and acks by moving a persisted watermark, not by
//! deleting. Per event that leaves three sled writes on the whole path (log, state, view).
//! Entries past their retention are folded into a snapshot and removed (`snapshot`), so the log
//! stays bounded.

mod bus;
mod log;
mod snapshot;
mod store;

pub use bus::{DEFAULT_SUBSCRIBER_CAPACITY, EmbeddedBus};
pub use log::{DEFAULT_MAX_RECEIVE_COUNT, DEFAULT_VISIBILITY_TIMEOUT, DeadLetterRecord, EmbeddedLog, LogConfig, LogEntry};
pub use snapshot::{
    CompactReport, DEFAULT_COMPACT_INTERVAL, DEFAULT_RETENTION, DEFAULT_RETENTION_BYTES, LogSnapshot, Retention, compact,
};
pub use store::EmbeddedStore;

/// Trees of the embedded database, named in one place so tools can find them.
pub(crate) mod trees {
    pub const LOG: &str = "event_log";
    pub const DLQ: &str = "dead_letters";
    /// Dead letters moved back into the log: original sequence → the sequence it came back as.
    pub const REDRIVEN: &str = "redriven";
    pub const META: &str = "pipeline_meta";
    pub const STATE: &str = "product_state";
    /// Every product's state at the last compacted log sequence.
    pub const SNAPSHOT: &str = "log_snapshot";
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
