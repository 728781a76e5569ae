//! Pipeline counters, registered in the process's Prometheus registry.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: String,
}

/// Cheap to clone: every field is an `Arc` inside.
#[derive(Clone, Debug, Default)]
pub struct PipelineMetrics {
    pub received: Counter,
    pub dead_lettered: Family<CodeLabel, Counter>,
    pub applied: Counter,
    pub unchanged: Counter,
    pub write_batches: Counter,
    pub write_failures: Counter,
    pub invalidations: Counter,
    pub publish_failures: Counter,
    pub acked: Counter,
    pub released: Counter,
    pub deferred: Counter,
}

impl PipelineMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("catalog_pipeline");
        r.register("events_received", "Messages taken from the event source", self.received.clone());
        // Every reason exists from the start at zero, so a dashboard's rate() has a series
        // before the first dead letter.
        for code in catalog_domain::event::ValidationError::CODES {
            let _ = self.dead_lettered.get_or_create(&CodeLabel { code: (*code).to_owned() });
        }
        r.register("events_dead_lettered", "Messages moved to the dead-letter queue, by reason", self.dead_lettered.clone());
        r.register("events_applied", "Events that changed a product's state", self.applied.clone());
        r.register("events_unchanged", "Duplicate or stale events that changed nothing", self.unchanged.clone());
        r.register("write_batches", "Batches written to the store", self.write_batches.clone());
        r.register("write_failures", "Events whose store write failed and were released for retry", self.write_failures.clone());
        r.register("invalidations_published", "Product-changed invalidations published", self.invalidations.clone());
        r.register("publish_failures", "Failed attempts to publish invalidations", self.publish_failures.clone());
        r.register("messages_acked", "Messages acknowledged after their effects were durable", self.acked.clone());
        r.register("messages_released", "Messages released back to the source for another attempt", self.released.clone());
        r.register("messages_deferred", "Messages given back untried while the store's breaker was open", self.deferred.clone());
    }
}
