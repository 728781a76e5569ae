//! Invalidations over EventBridge: the pipeline publishes `Product Changed`; each API instance
//! receives them through its own SQS queue and rule, created at start, removed at shutdown.

use std::time::Duration;

use aws_sdk_eventbridge::types::{PutEventsRequestEntry, Target};
use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, QueueAttributeName};
use catalog_domain::{FacetVersions, ProductId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use catalog_domain::event::{millis_since_epoch, time_from_millis};
use catalog_pipeline::{BackendError, Invalidation, InvalidationBus, Origin, ProductChanged, PublishError};

use crate::retry::until_processed;
use crate::{AwsMetrics, AwsNames, AwsSettings, INVALIDATION_DETAIL_TYPE, INVALIDATION_SOURCE, ServiceFault, classify};

/// `PutEvents` takes at most 10 entries.
const PUT_EVENTS_MAX: usize = 10;
/// Products announced per entry. EventBridge bills each 64 KiB of an entry as one event and an
/// announcement is under 200 bytes, so one entry per batch instead of one per product cuts
/// the bus's bill, and every API instance's queue deliveries, about tenfold.
const PRODUCTS_PER_ENTRY: usize = 250;
/// Invalidations older than this are useless: the view's TTL has caught up by then.
const SUBSCRIPTION_RETENTION_SECS: &str = "300";

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct ChangedProduct {
    product_id: String,
    revision: u64,
    #[serde(default)]
    versions: FacetVersions,
    /// When the newest event behind this change was accepted (ms since 1970): the API
    /// instances measure event → visible lag from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    accepted_at_ms: Option<u64>,
    /// That event's trace, so the API instance's view update joins it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    traceparent: Option<String>,
}

/// The detail of a `Product Changed` event: the products one write batch changed.
#[derive(serde::Serialize, serde::Deserialize)]
struct ChangedDetail {
    products: Vec<ChangedProduct>,
}

#[derive(Clone)]
pub struct EventBridgeBus {
    client: aws_sdk_eventbridge::Client,
    settings: AwsSettings,
    metrics: AwsMetrics,
}

impl EventBridgeBus {
    pub fn new(client: aws_sdk_eventbridge::Client, settings: AwsSettings, metrics: AwsMetrics) -> Self {
        Self { client, settings, metrics }
    }

    async fn put_once(&self, entries: Vec<PutEventsRequestEntry>) -> Result<Vec<PutEventsRequestEntry>, BackendError> {
        self.metrics.call("eventbridge", "PutEvents");
        self.metrics.eventbridge_entries.inc_by(entries.len() as u64);
        let out = self
            .client
            .put_events()
            .set_entries(Some(entries.clone()))
            .send()
            .await
            .map_err(|e| classify("EventBridge PutEvents", e))?;
        if out.failed_entry_count() == 0 {
            return Ok(Vec::new());
        }
        // Results line up with the request's entries; failed ones carry an error code.
        Ok(out
            .entries()
            .iter()
            .zip(entries)
            .filter(|(result, _)| result.error_code().is_some())
            .map(|(_, entry)| entry)
            .collect())
    }
}

impl InvalidationBus for EventBridgeBus {
    async fn publish(&self, invalidation: Invalidation) -> Result<(), PublishError> {
        let origins: std::collections::HashMap<&str, &Origin> =
            invalidation.origins.iter().map(|o| (o.product_id.as_str(), o)).collect();
        let entries: Vec<PutEventsRequestEntry> = invalidation
            .products
            .chunks(PRODUCTS_PER_ENTRY)
            .map(|chunk| {
                let products = chunk
                    .iter()
                    .map(|p| {
                        let origin = origins.get(p.product_id.as_str());
                        ChangedProduct {
                            product_id: p.product_id.to_string(),
                            revision: p.revision,
                            versions: p.versions.clone(),
                            accepted_at_ms: origin.map(|o| millis_since_epoch(o.accepted_at)),
                            traceparent: origin.and_then(|o| o.trace.as_ref()).map(catalog_pipeline::trace::to_traceparent),
                        }
                    })
                    .collect();
                let detail = ChangedDetail { products };
                PutEventsRequestEntry::builder()
                    .event_bus_name(&self.settings.names.bus)
                    .source(INVALIDATION_SOURCE)
                    .detail_type(INVALIDATION_DETAIL_TYPE)
                    .detail(serde_json::to_string(&detail).expect("json serializes"))
                    .build()
            })
            .collect();
        for chunk in entries.chunks(PUT_EVENTS_MAX) {
            let (attempts, base) = (self.settings.batch_attempts, self.settings.retry_base);
            let left = until_processed(chunk.to_vec(), attempts, base, |e| self.put_once(e)).await?;
            if !left.is_empty() {
                let detail = format!("{} entries still failing after {attempts} attempts", left.len());
                return Err(PublishError::unavailable("EventBridge PutEvents", detail));
            }
        }
        Ok(())
    }
}

/// One API instance's feed of invalidations: a queue subscribed to the bus by a rule.
pub struct InvalidationSubscription {
    sqs: aws_sdk_sqs::Client,
    eventbridge: aws_sdk_eventbridge::Client,
    names: AwsNames,
    name: String,
    queue_url: String,
    metrics: AwsMetrics,
}

impl InvalidationSubscription {
    /// Creates the instance's queue (allowing EventBridge to send to it) and its rule.
    pub async fn create(
        sqs: aws_sdk_sqs::Client,
        eventbridge: aws_sdk_eventbridge::Client,
        names: AwsNames,
        instance_id: &str,
        metrics: AwsMetrics,
    ) -> Result<Self, BackendError> {
        let name = format!("{}-{instance_id}", names.invalidation_prefix);
        metrics.sqs_call("CreateQueue", 0);
        let queue_url = sqs
            .create_queue()
            .queue_name(&name)
            .attributes(QueueAttributeName::MessageRetentionPeriod, SUBSCRIPTION_RETENTION_SECS)
            .send()
            .await
            .map_err(|e| classify(format!("creating invalidation queue {name}"), e))?
            .queue_url()
            .ok_or_else(|| BackendError::rejected("SQS CreateQueue", "the answer holds no queue URL"))?
            .to_owned();
        let queue_arn = crate::infra::queue_arn(&sqs, &queue_url).await?;
        let rule_arn = eventbridge
            .put_rule()
            .name(&name)
            .event_bus_name(&names.bus)
            .event_pattern(
                serde_json::json!({"source": [INVALIDATION_SOURCE], "detail-type": [INVALIDATION_DETAIL_TYPE]}).to_string(),
            )
            .send()
            .await
            .map_err(|e| classify(format!("creating invalidation rule {name}"), e))?
            .rule_arn()
            .unwrap_or_default()
            .to_owned();
        crate::infra::allow_rule_to_send(&sqs, &queue_url, &queue_arn, &rule_arn).await?;
        let target = Target::builder()
            .id("api-instance")
            .arn(&queue_arn)
            .build()
            .map_err(|e| BackendError::rejected("building an AWS request", e))?;
        eventbridge
            .put_targets()
            .rule(&name)
            .event_bus_name(&names.bus)
            .targets(target)
            .send()
            .await
            .map_err(|e| classify(format!("targeting {name}"), e))?;
        tracing::info!(queue = %name, "subscribed to invalidations");
        Ok(Self { sqs, eventbridge, names, name, queue_url, metrics })
    }

    /// Forwards invalidations to `feed` until `stop`; deletes each message once forwarded (a
    /// lost invalidation costs at most one TTL of staleness, never data).
    pub async fn run(&self, feed: mpsc::Sender<Invalidation>, wait: Duration, stop: CancellationToken) {
        loop {
            let received = tokio::select! {
                () = stop.cancelled() => return,
                r = self.sqs.receive_message().queue_url(&self.queue_url).max_number_of_messages(10)
                    .wait_time_seconds(wait.as_secs().min(20) as i32).send() => r,
            };
            let out = match received {
                Ok(out) => out,
                Err(e) => {
                    tracing::warn!(error = %ServiceFault::from(e), "receiving invalidations failed; retrying");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            self.metrics.sqs_call("ReceiveMessage", out.messages().iter().map(|m| m.body().map_or(0, str::len)).sum());
            if out.messages().is_empty() {
                continue;
            }
            let mut products = Vec::new();
            let mut origins = Vec::new();
            let mut entries = Vec::new();
            for (i, m) in out.messages().iter().enumerate() {
                if let Some((changed, from)) = m.body().and_then(parse_changed) {
                    products.extend(changed);
                    origins.extend(from);
                } else {
                    tracing::warn!(body = m.body(), "ignoring a message that is not a Product Changed event");
                }
                if let Some(handle) = m.receipt_handle() {
                    entries
                        .extend(DeleteMessageBatchRequestEntry::builder().id(i.to_string()).receipt_handle(handle).build().ok());
                }
            }
            if !products.is_empty() && feed.send(Invalidation { products, log_sequence: None, origins }).await.is_err() {
                return;
            }
            self.metrics.sqs_call("DeleteMessageBatch", 0);
            if let Err(e) = self.sqs.delete_message_batch().queue_url(&self.queue_url).set_entries(Some(entries)).send().await {
                tracing::warn!(error = %ServiceFault::from(e), "deleting invalidations failed; they will be applied twice, harmlessly");
            }
        }
    }

    /// Removes the rule, its target and the queue (clean shutdown).
    pub async fn remove(&self) {
        let bus = &self.names.bus;
        if let Err(e) = self.eventbridge.remove_targets().rule(&self.name).event_bus_name(bus).ids("api-instance").send().await {
            tracing::warn!(error = %ServiceFault::from(e), "removing the invalidation target failed");
        }
        if let Err(e) = self.eventbridge.delete_rule().name(&self.name).event_bus_name(bus).send().await {
            tracing::warn!(error = %ServiceFault::from(e), "deleting the invalidation rule failed");
        }
        if let Err(e) = self.sqs.delete_queue().queue_url(&self.queue_url).send().await {
            tracing::warn!(error = %ServiceFault::from(e), "deleting the invalidation queue failed");
        }
    }
}

/// Reads a `Product Changed` event as EventBridge delivers it to SQS (the full envelope);
/// announcements with an invalid id are skipped.
fn parse_changed(body: &str) -> Option<(Vec<ProductChanged>, Vec<Origin>)> {
    let envelope: serde_json::Value = serde_json::from_str(body).ok()?;
    let detail: ChangedDetail = serde_json::from_value(envelope.get("detail")?.clone()).ok()?;
    let mut changed = Vec::with_capacity(detail.products.len());
    let mut origins = Vec::new();
    for p in detail.products {
        let Ok(product_id) = ProductId::parse(&p.product_id) else { continue };
        if let Some(ms) = p.accepted_at_ms {
            let trace = p.traceparent.as_deref().and_then(catalog_pipeline::trace::parse_traceparent);
            origins.push(Origin { product_id: product_id.clone(), accepted_at: time_from_millis(ms), trace });
        }
        changed.push(ProductChanged { product_id, revision: p.revision, versions: p.versions, state: None });
    }
    Some((changed, origins))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_envelope_eventbridge_delivers() {
        let body = r#"{"version":"0","id":"1","detail-type":"Product Changed","source":"catalog.pipeline","account":"1","time":"2026-01-01T00:00:00Z","region":"us-east-1","resources":[],"detail":{"products":[{"productId":"P1","revision":4,"versions":{"price":2}},{"productId":"bad id","revision":1},{"productId":"P2","revision":1}]}}"#;
        let (changed, origins) = parse_changed(body).unwrap();
        assert!(origins.is_empty(), "announcements from before origins were sent still read");
        assert_eq!(changed.len(), 2, "the invalid id is skipped");
        assert_eq!((changed[0].product_id.as_str(), changed[0].revision, changed[0].versions.price), ("P1", 4, Some(2)));
        assert_eq!(changed[1].product_id.as_str(), "P2");
        assert!(parse_changed("nope").is_none());
    }

    #[test]
    fn origins_carry_the_acceptance_time_and_trace() {
        let body = r#"{"detail":{"products":[{"productId":"P1","revision":4,"acceptedAtMs":1700000000000,"traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}]}}"#;
        let (_, origins) = parse_changed(body).unwrap();
        assert_eq!(origins.len(), 1);
        assert_eq!(catalog_domain::event::millis_since_epoch(origins[0].accepted_at), 1_700_000_000_000);
        assert_eq!(
            origins[0].trace.as_ref().map(|t| t.trace_id().to_string()).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
    }
}
