//! The SQS event source: long polling, deletes only after durable writes, explicit DLQ moves
//! for invalid bodies, and a visibility heartbeat for batches that take a while.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry, MessageAttributeValue, MessageSystemAttributeName,
    QueueAttributeName, SendMessageBatchRequestEntry,
};
use bytes::Bytes;
use catalog_domain::event::time_from_millis;
use tokio_util::sync::CancellationToken;

use catalog_pipeline::{BackendError, DeadLetter, EventSource, FailureClass, Received, SourceError};

use crate::{AwsMetrics, AwsSettings, MAX_VISIBILITY_SECS, classify};

/// SQS takes at most 10 entries per batch call.
pub(crate) const SQS_BATCH: usize = 10;
/// SQS caps a message attribute's useful size; reasons are cut to this many characters.
const MAX_REASON_CHARS: usize = 1_000;
/// SQS visibility is set in whole seconds: a released message waits at least this long, then
/// twice as long on each later delivery...
const RELEASE_BACKOFF_BASE_SECS: u64 = 1;
/// ...up to this.
const MAX_RELEASE_BACKOFF_SECS: u64 = 300;

/// How long a message released after its `receive_count`-th delivery stays invisible: 1 s,
/// 2 s, 4 s… up to 5 minutes. Whole seconds throughout, so no step truncates to zero.
/// Bits of a position below the send time's milliseconds.
const POSITION_TIE_BITS: u32 = 10;

/// A message's place in the order the log and the store agree on: its send time in
/// milliseconds, then a hash of its id to order messages sent in the same millisecond (a
/// standard queue keeps no order among those anyway). Below 2⁵³ until the year 2248, so
/// DynamoDB numbers and JSON readers hold it exactly.
pub fn position(sent_ms: u64, message_id: &str) -> u64 {
    // FNV-1a: stable across processes and releases, unlike the standard library's hasher.
    let hash = message_id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    (sent_ms << POSITION_TIE_BITS) | (hash & ((1 << POSITION_TIE_BITS) - 1))
}

fn release_delay_secs(receive_count: u32) -> i32 {
    let doublings = receive_count.saturating_sub(1).min(16);
    let secs = (RELEASE_BACKOFF_BASE_SECS << doublings).min(MAX_RELEASE_BACKOFF_SECS);
    i32::try_from(secs).unwrap_or(i32::MAX)
}

#[derive(Debug, Clone)]
pub struct SqsReceipt {
    pub handle: Arc<str>,
    pub message_id: Arc<str>,
    pub receive_count: u32,
}

#[derive(Clone)]
pub struct SqsSource {
    inner: Arc<Inner>,
}

struct Inner {
    client: aws_sdk_sqs::Client,
    queue_url: String,
    dlq_url: String,
    settings: AwsSettings,
    metrics: AwsMetrics,
    /// Receipt handle → when its visibility was last set: what the heartbeat renews.
    in_flight: Mutex<HashMap<Arc<str>, Instant>>,
}

pub(crate) async fn lookup_queue_url(client: &aws_sdk_sqs::Client, name: &str) -> Result<String, BackendError> {
    let out = client.get_queue_url().queue_name(name).send().await.map_err(|e| {
        let e = classify(format!("SQS GetQueueUrl {name:?}"), e);
        match e.class() {
            FailureClass::Rejected => {
                BackendError::rejected(format!("queue {name:?} not found; run `catalog infra init` first"), e)
            }
            _ => e,
        }
    })?;
    out.queue_url()
        .map(str::to_owned)
        .ok_or_else(|| BackendError::rejected(format!("SQS GetQueueUrl {name:?}"), "the answer holds no queue URL"))
}

/// A queue's messages waiting and in flight, as SQS approximates them (readiness, gauges).
pub(crate) async fn queue_depth(client: &aws_sdk_sqs::Client, queue_url: &str) -> Result<(u64, u64), BackendError> {
    let out = client
        .get_queue_attributes()
        .queue_url(queue_url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await
        .map_err(|e| classify("SQS GetQueueAttributes", e))?;
    let count = |name| out.attributes().and_then(|a| a.get(&name)).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Ok((count(QueueAttributeName::ApproximateNumberOfMessages), count(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)))
}

/// One `ChangeMessageVisibilityBatch` call (at most [`SQS_BATCH`] handles) on `queue_url`.
pub(crate) async fn change_visibility(
    client: &aws_sdk_sqs::Client,
    metrics: &AwsMetrics,
    queue_url: &str,
    handles: impl Iterator<Item = &str>,
    seconds: i32,
) -> Result<(), BackendError> {
    let entries = handles
        .enumerate()
        .map(|(i, h)| {
            ChangeMessageVisibilityBatchRequestEntry::builder()
                .id(i.to_string())
                .receipt_handle(h)
                .visibility_timeout(seconds)
                .build()
                .map_err(|e| BackendError::rejected("SQS ChangeMessageVisibilityBatch", e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    metrics.sqs_call("ChangeMessageVisibilityBatch", 0);
    let out = client
        .change_message_visibility_batch()
        .queue_url(queue_url)
        .set_entries(Some(entries))
        .send()
        .await
        .map_err(|e| classify("SQS ChangeMessageVisibilityBatch", e))?;
    for failed in out.failed() {
        // A message acked while its renewal was on the way no longer exists: expected.
        if failed.code() == "ReceiptHandleIsInvalid" {
            tracing::debug!(message = failed.message(), "visibility change for a message already deleted");
        } else {
            tracing::warn!(code = failed.code(), message = failed.message(), "changing visibility failed for a message");
        }
    }
    Ok(())
}

impl SqsSource {
    pub async fn connect(client: aws_sdk_sqs::Client, settings: AwsSettings, metrics: AwsMetrics) -> Result<Self, SourceError> {
        let queue_url = lookup_queue_url(&client, &settings.names.ingest_queue).await?;
        let dlq_url = lookup_queue_url(&client, &settings.names.dead_letter_queue).await?;
        Ok(Self {
            inner: Arc::new(Inner { client, queue_url, dlq_url, settings, metrics, in_flight: Mutex::new(HashMap::new()) }),
        })
    }

    fn in_flight(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Instant>> {
        self.inner.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn forget(&self, receipts: &[SqsReceipt]) {
        let mut in_flight = self.in_flight();
        for r in receipts {
            in_flight.remove(&r.handle);
        }
    }

    /// Messages in the ingest queue (waiting and in flight) and in its dead-letter queue, as
    /// SQS approximates them: the `catalog_event_log_backlog` and `catalog_dead_letters` gauges.
    pub async fn depths(&self) -> Result<(u64, u64), SourceError> {
        let inner = &self.inner;
        let mut depths = [0u64; 2];
        for (depth, url) in depths.iter_mut().zip([&inner.queue_url, &inner.dlq_url]) {
            inner.metrics.sqs_call("GetQueueAttributes", 0);
            let (waiting, in_flight) = queue_depth(&inner.client, url).await?;
            *depth = waiting + in_flight;
        }
        Ok((depths[0], depths[1]))
    }

    /// Renews the visibility of messages still being processed, every third of the timeout,
    /// so a slow batch is not handed to another worker halfway through.
    pub fn spawn_heartbeat(&self, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        let source = self.clone();
        let period = (self.inner.settings.visibility_timeout / 3).max(Duration::from_secs(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => source.renew_visibility(period).await,
                }
            }
        })
    }

    async fn renew_visibility(&self, older_than: Duration) {
        let now = Instant::now();
        let due: Vec<Arc<str>> =
            self.in_flight().iter().filter(|(_, at)| now.duration_since(**at) >= older_than).map(|(h, _)| h.clone()).collect();
        let timeout = self.inner.settings.visibility_timeout.as_secs() as i32;
        for chunk in due.chunks(SQS_BATCH) {
            if self.change_visibility(chunk, timeout).await.is_ok() {
                let mut in_flight = self.in_flight();
                for handle in chunk {
                    if let Some(at) = in_flight.get_mut(handle) {
                        *at = now;
                    }
                }
            }
        }
    }

    async fn change_visibility(&self, handles: &[Arc<str>], seconds: i32) -> Result<(), SourceError> {
        let inner = &self.inner;
        change_visibility(&inner.client, &inner.metrics, &inner.queue_url, handles.iter().map(AsRef::as_ref), seconds).await
    }

    async fn delete(&self, handles: Vec<Arc<str>>) -> Result<(), SourceError> {
        let inner = &self.inner;
        for chunk in handles.chunks(SQS_BATCH) {
            let failed =
                delete(&inner.client, &inner.metrics, &inner.queue_url, chunk.iter().map(AsRef::as_ref).enumerate()).await?;
            // A message that could not be deleted comes back and is re-applied idempotently.
            for (_, code) in failed {
                tracing::warn!(code, "deleting a processed message failed");
            }
        }
        Ok(())
    }
}

/// One `DeleteMessageBatch` call (at most [`SQS_BATCH`] handles, each with the id its caller
/// knows it by) on `queue_url`; returns the ids that could not be deleted, with SQS's code.
pub(crate) async fn delete<'a>(
    client: &aws_sdk_sqs::Client,
    metrics: &AwsMetrics,
    queue_url: &str,
    handles: impl Iterator<Item = (usize, &'a str)>,
) -> Result<Vec<(usize, String)>, BackendError> {
    let entries = handles
        .map(|(id, h)| {
            DeleteMessageBatchRequestEntry::builder()
                .id(id.to_string())
                .receipt_handle(h)
                .build()
                .map_err(|e| BackendError::rejected("SQS DeleteMessageBatch", e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    metrics.sqs_call("DeleteMessageBatch", 0);
    let out = client
        .delete_message_batch()
        .queue_url(queue_url)
        .set_entries(Some(entries))
        .send()
        .await
        .map_err(|e| classify("SQS DeleteMessageBatch", e))?;
    Ok(out.failed().iter().filter_map(|f| Some((f.id().parse().ok()?, f.code().to_owned()))).collect())
}

pub(crate) fn attribute(value: &str) -> Result<MessageAttributeValue, SourceError> {
    let text: String = value.chars().take(MAX_REASON_CHARS).collect();
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(if text.is_empty() { "-".to_owned() } else { text })
        .build()
        .map_err(|e| BackendError::rejected("SQS SendMessageBatch to the DLQ", e))
}

impl EventSource for SqsSource {
    type Receipt = SqsReceipt;

    async fn receive(&self, max: usize) -> Result<Vec<Received<SqsReceipt>>, SourceError> {
        let inner = &self.inner;
        let out = inner
            .client
            .receive_message()
            .queue_url(&inner.queue_url)
            .max_number_of_messages(max.clamp(1, SQS_BATCH) as i32)
            .wait_time_seconds(inner.settings.wait_time.as_secs().min(20) as i32)
            .visibility_timeout(inner.settings.visibility_timeout.as_secs() as i32)
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp)
            .message_attribute_names(catalog_pipeline::trace::TRACEPARENT)
            .send()
            .await
            .map_err(|e| classify("SQS ReceiveMessage", e))?;
        let messages = out.messages();
        let bytes: usize = messages.iter().map(|m| m.body().map_or(0, str::len)).sum();
        inner.metrics.sqs_call("ReceiveMessage", bytes);
        let now = Instant::now();
        let mut received = Vec::with_capacity(messages.len());
        let mut in_flight = self.in_flight();
        for m in messages {
            let (Some(handle), Some(id)) = (m.receipt_handle(), m.message_id()) else { continue };
            let attrs = m.attributes();
            let system = |name: MessageSystemAttributeName| attrs.and_then(|a| a.get(&name)).and_then(|v| v.parse::<u64>().ok());
            let receive_count = system(MessageSystemAttributeName::ApproximateReceiveCount).unwrap_or(1) as u32;
            let sent_ms = system(MessageSystemAttributeName::SentTimestamp).unwrap_or(0);
            let handle: Arc<str> = handle.into();
            in_flight.insert(handle.clone(), now);
            received.push(Received {
                receipt: SqsReceipt { handle, message_id: id.into(), receive_count },
                message_id: id.to_owned(),
                body: Bytes::from(m.body().unwrap_or_default().to_owned()),
                accepted_at: time_from_millis(sent_ms),
                receive_count,
                sequence: None,
                position: (sent_ms > 0).then(|| position(sent_ms, id)),
                // A producer's trace: the `traceparent` message attribute (W3C Trace Context).
                trace: m
                    .message_attributes()
                    .and_then(|a| a.get(catalog_pipeline::trace::TRACEPARENT))
                    .and_then(|v| v.string_value())
                    .and_then(catalog_pipeline::trace::parse_traceparent),
            });
        }
        Ok(received)
    }

    async fn ack(&self, receipts: Vec<SqsReceipt>) -> Result<(), SourceError> {
        self.forget(&receipts);
        self.delete(receipts.into_iter().map(|r| r.handle).collect()).await
    }

    /// Shortens the visibility so the message returns after a backoff; SQS's redrive policy
    /// moves it to the DLQ once it has been received `maxReceiveCount` times.
    async fn release(&self, receipts: Vec<SqsReceipt>, reason: &str) -> Result<(), SourceError> {
        self.forget(&receipts);
        tracing::info!(count = receipts.len(), reason, "releasing messages for another attempt");
        let mut by_delay: HashMap<i32, Vec<Arc<str>>> = HashMap::new();
        for r in receipts {
            by_delay.entry(release_delay_secs(r.receive_count)).or_default().push(r.handle);
        }
        for (seconds, handles) in by_delay {
            for chunk in handles.chunks(SQS_BATCH) {
                self.change_visibility(chunk, seconds).await?;
            }
        }
        Ok(())
    }

    /// Hides the messages for `delay` (whole seconds, at least 1). SQS counts every receive, so
    /// the next delivery still counts towards its redrive policy; the breaker keeps receives
    /// off while it is open, so only its trial batches add deliveries.
    async fn defer(&self, receipts: Vec<SqsReceipt>, delay: Duration) -> Result<(), SourceError> {
        self.forget(&receipts);
        let seconds = i32::try_from(delay.as_secs().clamp(1, MAX_VISIBILITY_SECS)).unwrap_or(i32::MAX);
        let handles: Vec<Arc<str>> = receipts.into_iter().map(|r| r.handle).collect();
        for chunk in handles.chunks(SQS_BATCH) {
            self.change_visibility(chunk, seconds).await?;
        }
        Ok(())
    }

    /// Sends each letter to the DLQ with its reason as `catalog.error.*` attributes, then
    /// deletes it from the ingest queue; a letter whose send failed stays and comes back.
    async fn dead_letter(&self, letters: Vec<DeadLetter<SqsReceipt>>) -> Result<(), SourceError> {
        let receipts: Vec<SqsReceipt> = letters.iter().map(|l| l.receipt.clone()).collect();
        self.forget(&receipts);
        for chunk in letters.chunks(SQS_BATCH) {
            let mut entries = Vec::with_capacity(chunk.len());
            let mut bytes = 0;
            for (i, letter) in chunk.iter().enumerate() {
                let body = String::from_utf8_lossy(&letter.body).into_owned();
                bytes += body.len();
                entries.push(
                    SendMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .message_body(if body.is_empty() { " ".to_owned() } else { body })
                        .message_attributes("catalog.error.code", attribute(&letter.code)?)
                        .message_attributes("catalog.error.message", attribute(&letter.message)?)
                        .message_attributes("catalog.error.stage", attribute(letter.stage)?)
                        .message_attributes("catalog.source.message-id", attribute(&letter.message_id)?)
                        .message_attributes(crate::dlq::RECEIVES_ATTRIBUTE, attribute(&letter.receipt.receive_count.to_string())?)
                        .build()
                        .map_err(|e| BackendError::rejected("SQS SendMessageBatch to the DLQ", e))?,
                );
            }
            self.inner.metrics.sqs_call("SendMessageBatch", bytes);
            let out = self
                .inner
                .client
                .send_message_batch()
                .queue_url(&self.inner.dlq_url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| classify("SQS SendMessageBatch to the DLQ", e))?;
            let sent: Vec<Arc<str>> = out
                .successful()
                .iter()
                .filter_map(|ok| ok.id().parse::<usize>().ok())
                .filter_map(|i| chunk.get(i).map(|l| l.receipt.handle.clone()))
                .collect();
            for failed in out.failed() {
                tracing::error!(
                    code = failed.code(),
                    message = failed.message(),
                    "sending a message to the DLQ failed; it will come back"
                );
            }
            self.delete(sent).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_follow_send_time_and_are_stable_per_message() {
        assert!(position(1_700_000_000_001, "b") > position(1_700_000_000_000, "a"));
        assert_eq!(position(1_700_000_000_000, "a"), position(1_700_000_000_000, "a"));
        assert_ne!(position(1_700_000_000_000, "a"), position(1_700_000_000_000, "b"));
        assert!(position(8_000_000_000_000, "x") < 1 << 53);
    }

    #[test]
    fn a_released_message_waits_at_least_a_second_and_longer_each_time_up_to_the_cap() {
        let delays: Vec<i32> = (0..=12).map(release_delay_secs).collect();
        assert_eq!(delays, [1, 1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert_eq!(release_delay_secs(u32::MAX), 300);
    }
}
