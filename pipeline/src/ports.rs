//! The ports between the pipeline core and its adapters. An adapter promises what each
//! method's doc says; the stages rely on exactly that and nothing more.

use std::fmt::Debug;
use std::future::Future;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use catalog_domain::{CatalogEvent, FacetVersions, ProductId, ProductState};
use opentelemetry::trace::SpanContext;

use crate::error::BackendError;

/// A message as the source handed it out; `receipt` is what acks, releases or dead-letters it.
#[derive(Debug, Clone)]
pub struct Received<R> {
    pub receipt: R,
    pub message_id: String,
    pub body: Bytes,
    /// When the source accepted the message; the event time of bodies that carry none.
    pub accepted_at: SystemTime,
    pub receive_count: u32,
    /// The position in a global event log, when the source is one (the embedded inbox).
    pub sequence: Option<u64>,
    /// Where the message stands in the order the log and the store agree on: the implicit
    /// version of an unversioned event (see `ProductState::apply_at`).
    pub position: Option<u64>,
    /// The trace of the request or producer that sent it (`traceparent`), when it had one.
    pub trace: Option<SpanContext>,
}

/// A message that must not be retried, with the reason operators will read.
#[derive(Debug, Clone)]
pub struct DeadLetter<R> {
    pub receipt: R,
    pub message_id: String,
    pub body: Bytes,
    pub code: String,
    pub message: String,
    pub stage: &'static str,
}

/// A failed event-source call ([`BackendError`], classified).
pub type SourceError = BackendError;

/// Where messages come from. At-least-once: a message not acked within its visibility
/// window comes back, and after the source's maximum receive count it is dead-lettered.
pub trait EventSource: Send + Sync + 'static {
    type Receipt: Clone + Debug + Send + Sync + 'static;

    /// Up to `max` messages; waits (long-polls) a bounded time when there are none.
    fn receive(&self, max: usize) -> impl Future<Output = Result<Vec<Received<Self::Receipt>>, SourceError>> + Send;

    /// Deletes messages whose effects are durable.
    fn ack(&self, receipts: Vec<Self::Receipt>) -> impl Future<Output = Result<(), SourceError>> + Send;

    /// Gives messages back for another attempt after a transient failure.
    fn release(&self, receipts: Vec<Self::Receipt>, reason: &str) -> impl Future<Output = Result<(), SourceError>> + Send;

    /// Gives messages back untried, to come back after `delay`: they did not fail, they were not
    /// attempted (the store's breaker is open). Where the source can, this delivery does not
    /// count towards the dead-letter queue.
    fn defer(&self, receipts: Vec<Self::Receipt>, delay: Duration) -> impl Future<Output = Result<(), SourceError>> + Send;

    /// Moves messages to the dead-letter queue with their reason and removes them from the source.
    fn dead_letter(&self, letters: Vec<DeadLetter<Self::Receipt>>) -> impl Future<Output = Result<(), SourceError>> + Send;
}

/// A validated event with its log position, if the source has one.
#[derive(Debug, Clone)]
pub struct SequencedEvent {
    pub sequence: Option<u64>,
    /// The event's place in the order the log and the store agree on ([`Received::position`]).
    pub position: Option<u64>,
    pub event: CatalogEvent,
    /// The trace the message carried ([`Received::trace`]).
    pub trace: Option<SpanContext>,
    /// When the source accepted it: where the event → visible lag starts.
    pub accepted_at: SystemTime,
}

/// One product's new state, as invalidations announce it. `revision` lets every reader
/// keep only the newest, whatever order announcements arrive in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProductChanged {
    pub product_id: ProductId,
    pub revision: u64,
    pub versions: FacetVersions,
    /// The state written, when it is at hand in this process (embedded): a read model beside
    /// the store renders it as it is instead of reading it back. Never sent over a wire.
    pub state: Option<std::sync::Arc<ProductState>>,
}

/// What a write batch did: the products that changed, how many events changed nothing, and
/// the indexes (into the batch) of events that could not be written and must be retried.
#[derive(Debug, Default)]
pub struct WriteOutcome {
    pub changed: Vec<ProductChanged>,
    /// Products the batch touched without changing, with their current revision: announced
    /// again when a redelivery may mean an earlier announcement was lost.
    pub unchanged_products: Vec<ProductChanged>,
    pub unchanged: usize,
    pub failed: Vec<usize>,
    /// Why the `failed` events failed (the last cause seen), for logs and the breaker.
    pub failure: Option<BackendError>,
}

/// A failed store call ([`BackendError`], classified).
pub type StoreError = BackendError;

/// The system of record: the append-only event log and current product state.
pub trait ProductStore: Send + Sync + 'static {
    /// Durably records the events and applies them in order to current state, versions
    /// guarding every facet. When this returns, everything not listed in `failed` is durable.
    fn write_batch(&self, events: &[SequencedEvent]) -> impl Future<Output = Result<WriteOutcome, StoreError>> + Send;

    /// Current state of the given products; unknown ids are simply absent.
    fn get_states(&self, ids: &[ProductId]) -> impl Future<Output = Result<Vec<ProductState>, StoreError>> + Send;
}

/// "These products changed" for every read model that caches them.
#[derive(Debug, Clone, Default)]
pub struct Invalidation {
    pub products: Vec<ProductChanged>,
    /// The highest log sequence whose effects this announcement covers, when known.
    pub log_sequence: Option<u64>,
    /// Where each changed product's newest event came from, for the read model's lag figure
    /// and to end that event's trace at its view.
    pub origins: Vec<Origin>,
}

/// The newest event behind one product's change.
#[derive(Debug, Clone)]
pub struct Origin {
    pub product_id: ProductId,
    pub accepted_at: SystemTime,
    pub trace: Option<SpanContext>,
}

/// A failed publish ([`BackendError`], classified).
pub type PublishError = BackendError;

pub trait InvalidationBus: Send + Sync + 'static {
    fn publish(&self, invalidation: Invalidation) -> impl Future<Output = Result<(), PublishError>> + Send;
}
