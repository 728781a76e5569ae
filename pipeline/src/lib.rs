//! The event pipeline: ingest → validate → transform → write → publish → ack, as tokio tasks
//! joined by bounded channels, over ports that the embedded and AWS adapters implement.
//!
//! Layout:
//! - [`ports`]: the three traits the core talks to (`EventSource`, `ProductStore`,
//!   `InvalidationBus`) and the values that cross them. The core never names a backend.
//! - [`stages`]: one function per stage and [`stages::run`], the one place the topology is wired.
//! - [`embedded`]: sled-backed adapters for a single process with no cloud. Its inbox doubles
//!   as the append-only event log, which keeps the write path at three sled writes per event.
//! - [`config`]: every limit of the pipeline, named, with its default.
//! - [`metrics`]: counters that drive `/metrics` and the benchmarks' per-event figures.

pub mod aws;
pub mod config;
pub mod embedded;
pub mod metrics;
pub mod ports;
pub mod stages;

pub use config::PipelineConfig;
pub use metrics::PipelineMetrics;
pub use ports::{
    DeadLetter, EventSource, Invalidation, InvalidationBus, ProductChanged, ProductStore, Received, SequencedEvent, SourceError,
    StoreError, WriteOutcome,
};
