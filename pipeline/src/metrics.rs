//! Pipeline counters and histograms, registered in the process's Prometheus registry (which
//! `/metrics` serves and the OTLP exporter sends).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabel {
    pub stage: &'static str,
}

/// The stages whose time per batch is measured.
pub const STAGES: [&str; 4] = ["validate", "write", "publish", "ack"];

/// From 50 µs (an embedded validate) to 30 s (a write held through throttling).
const STAGE_BUCKETS: [f64; 14] = [5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.5, 2.0, 30.0];
/// Events per write batch, up to the largest batch any store takes.
const BATCH_BUCKETS: [f64; 10] = [1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0];

fn stage_histogram() -> Histogram {
    Histogram::new(STAGE_BUCKETS)
}

/// Cheap to clone: every field is an `Arc` inside.
#[derive(Clone, Debug)]
pub struct PipelineMetrics {
    pub received: Counter,
    pub validated: Counter,
    pub dead_lettered: Family<CodeLabel, Counter>,
    pub applied: Counter,
    pub unchanged: Counter,
    pub write_batches: Counter,
    pub write_failures: Counter,
    /// Store writes made again after an unavailable or throttled one.
    pub write_retries: Counter,
    pub invalidations: Counter,
    pub publish_failures: Counter,
    pub acked: Counter,
    pub released: Counter,
    pub deferred: Counter,
    /// Messages received and not yet acked, released, deferred or dead-lettered.
    pub in_flight: Gauge,
    pub batch_size: Histogram,
    pub stage_seconds: Family<StageLabel, Histogram, fn() -> Histogram>,
}

impl Default for PipelineMetrics {
    fn default() -> Self {
        Self {
            received: Counter::default(),
            validated: Counter::default(),
            dead_lettered: Family::default(),
            applied: Counter::default(),
            unchanged: Counter::default(),
            write_batches: Counter::default(),
            write_failures: Counter::default(),
            write_retries: Counter::default(),
            invalidations: Counter::default(),
            publish_failures: Counter::default(),
            acked: Counter::default(),
            released: Counter::default(),
            deferred: Counter::default(),
            in_flight: Gauge::default(),
            batch_size: Histogram::new(BATCH_BUCKETS),
            stage_seconds: Family::new_with_constructor(stage_histogram),
        }
    }
}

impl PipelineMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("catalog_pipeline");
        r.register("events_received", "Messages taken from the event source", self.received.clone());
        r.register("events_validated", "Messages that parsed as valid events", self.validated.clone());
        // Every reason and stage exists from the start at zero, so a dashboard's rate() has a
        // series before the first dead letter or batch.
        for code in catalog_domain::event::ValidationError::CODES {
            let _ = self.dead_lettered.get_or_create(&CodeLabel { code: (*code).to_owned() });
        }
        for stage in STAGES {
            let _ = self.stage_seconds.get_or_create(&StageLabel { stage });
        }
        r.register("events_dead_lettered", "Messages moved to the dead-letter queue, by reason", self.dead_lettered.clone());
        r.register("events_applied", "Events that changed a product's state", self.applied.clone());
        r.register("events_unchanged", "Duplicate or stale events that changed nothing", self.unchanged.clone());
        r.register("write_batches", "Batches written to the store", self.write_batches.clone());
        r.register("write_failures", "Events whose store write failed and were released for retry", self.write_failures.clone());
        r.register(
            "write_retries",
            "Store writes made again after the store was unavailable or throttling",
            self.write_retries.clone(),
        );
        r.register("invalidations_published", "Product-changed invalidations published", self.invalidations.clone());
        r.register("publish_failures", "Failed attempts to publish invalidations", self.publish_failures.clone());
        r.register("messages_acked", "Messages acknowledged after their effects were durable", self.acked.clone());
        r.register("messages_released", "Messages released back to the source for another attempt", self.released.clone());
        r.register("messages_deferred", "Messages given back untried while the store's breaker was open", self.deferred.clone());
        r.register("messages_in_flight", "Messages received and not yet acknowledged or given back", self.in_flight.clone());
        r.register("batch_size", "Events per store write batch", self.batch_size.clone());
        r.register("stage_duration_seconds", "Time a stage spent on one batch, by stage", self.stage_seconds.clone());
    }

    /// The time histogram of one stage.
    pub fn stage(&self, stage: &'static str) -> Histogram {
        self.stage_seconds.get_or_create(&StageLabel { stage }).clone()
    }
}
