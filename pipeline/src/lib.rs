//! The event pipeline: ingest → validate → transform → write → publish → ack, as tokio tasks
//! joined by bounded channels, over ports that the embedded and AWS adapters implement.
//!
//! Layout:
//! - `ports`: the three traits the core talks to (`EventSource`, `ProductStore`,
//!   `InvalidationBus`) and the values that cross them. The core never names a backend.
//! - `stages`: one function per stage and `stages::run`, the one place the topology is wired.
//! - `error`: `BackendError`, every port's error, classified (unavailable, throttled,
//!   rejected, corrupt) so retries and the breaker act on the class, not on text.
//! - `embedded`: sled-backed adapters for a single process with no cloud. Its inbox doubles
//!   as the append-only event log, which keeps the write path at three sled writes per event.
//!   The AWS adapters implement the same ports in the `catalog-aws` crate.
//! - `health`: the readiness lines each backend reports.
//! - `breaker`: the circuit breaker around the store; the write stage asks it, the ingest stage
//!   pauses while it is open, readiness shows it.
//! - `config`: every limit of the pipeline, named, with its default.
//! - `metrics`: counters and histograms that drive `/metrics`, its OTLP twin and the
//!   benchmarks' per-event figures.
//! - `trace`: the W3C trace context that travels with each message, so a stage continues the
//!   trace of the request that sent its events.

pub mod breaker;
pub mod budget;
pub mod config;
pub mod embedded;
pub mod error;
pub mod health;
pub mod metrics;
pub mod ports;
pub mod stages;
pub mod trace;

pub use config::PipelineConfig;
pub use error::{BackendError, BoxError, FailureClass};
pub use metrics::PipelineMetrics;
pub use ports::{
    DeadLetter, EventSource, Invalidation, InvalidationBus, Origin, ProductChanged, ProductStore, PublishError, Received,
    SequencedEvent, SourceError, StoreError, WriteOutcome,
};
