//! The SQS dead-letter queue as the replay tool sees it: walked without being consumed, and
//! chosen messages moved back to the ingest queue by receive → send → delete, which works on
//! every SQS (AWS, moto, LocalStack) and keeps each message until its copy is safely sent.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_sqs::types::{MessageAttributeValue, MessageSystemAttributeName, SendMessageBatchRequestEntry};
use catalog_pipeline::BackendError;

use crate::sqs::{SQS_BATCH, change_visibility, delete, lookup_queue_url};
use crate::{AwsMetrics, AwsNames, classify};

pub const CODE_ATTRIBUTE: &str = "catalog.error.code";
pub const MESSAGE_ATTRIBUTE: &str = "catalog.error.message";
pub const STAGE_ATTRIBUTE: &str = "catalog.error.stage";
pub const RECEIVES_ATTRIBUTE: &str = "catalog.error.receives";
/// Attributes that describe the dead-lettering, left behind when a message moves back.
const ERROR_ATTRIBUTE_PREFIX: &str = "catalog.error.";
/// How long a walk hides what it has seen, so one walk reads each message once.
pub const DEFAULT_WALK_HOLD: Duration = Duration::from_secs(60);
/// A receive that waits this long and gets nothing ends the walk.
const WALK_WAIT_SECS: i32 = 1;

/// One dead letter, with what the pipeline recorded about it.
#[derive(Debug, Clone)]
pub struct DeadLetterMessage {
    pub message_id: String,
    pub body: String,
    /// The pipeline's reason; `None` for a message the queue's redrive policy moved itself
    /// (it failed `maxReceiveCount` deliveries without the pipeline dead-lettering it).
    pub code: Option<String>,
    pub message: Option<String>,
    pub stage: Option<String>,
    /// Deliveries from the ingest queue before it was dead-lettered, when recorded.
    pub receives: Option<u32>,
    pub sent_at_ms: u64,
    handle: String,
    attributes: HashMap<String, MessageAttributeValue>,
}

/// The ingest queue and its DLQ.
pub struct SqsDeadLetters {
    client: aws_sdk_sqs::Client,
    dlq_url: String,
    ingest_url: String,
    metrics: AwsMetrics,
}

/// What happened to one message asked to move.
#[derive(Debug)]
pub enum Moved {
    Moved,
    Failed(String),
}

impl SqsDeadLetters {
    pub async fn connect(client: aws_sdk_sqs::Client, names: &AwsNames, metrics: AwsMetrics) -> Result<Self, BackendError> {
        let dlq_url = lookup_queue_url(&client, &names.dead_letter_queue).await?;
        let ingest_url = lookup_queue_url(&client, &names.ingest_queue).await?;
        Ok(Self { client, dlq_url, ingest_url, metrics })
    }

    /// Receives up to `max` messages (all, if `None`), each hidden for `hold` so the walk sees
    /// it once; call [`Self::release`] for those to leave, [`Self::move_back`] for the others.
    pub async fn walk(&self, max: Option<usize>, hold: Duration) -> Result<Vec<DeadLetterMessage>, BackendError> {
        let mut out = Vec::new();
        loop {
            let want = max.map_or(SQS_BATCH, |m| m.saturating_sub(out.len()).min(SQS_BATCH));
            if want == 0 {
                return Ok(out);
            }
            self.metrics.sqs_call("ReceiveMessage", 0);
            let received = self
                .client
                .receive_message()
                .queue_url(&self.dlq_url)
                .max_number_of_messages(want as i32)
                .wait_time_seconds(WALK_WAIT_SECS)
                .visibility_timeout(i32::try_from(hold.as_secs()).unwrap_or(i32::MAX))
                .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp)
                .message_attribute_names("All")
                .send()
                .await
                .map_err(|e| classify("SQS ReceiveMessage from the DLQ", e))?;
            if received.messages().is_empty() {
                return Ok(out);
            }
            for m in received.messages() {
                let (Some(handle), Some(id)) = (m.receipt_handle(), m.message_id()) else { continue };
                let attributes = m.message_attributes().cloned().unwrap_or_default();
                let text = |name: &str| attributes.get(name).and_then(|v| v.string_value()).map(str::to_owned);
                let sent_at_ms = m
                    .attributes()
                    .and_then(|a| a.get(&MessageSystemAttributeName::SentTimestamp))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                out.push(DeadLetterMessage {
                    message_id: id.to_owned(),
                    body: m.body().unwrap_or_default().to_owned(),
                    code: text(CODE_ATTRIBUTE),
                    message: text(MESSAGE_ATTRIBUTE),
                    stage: text(STAGE_ATTRIBUTE),
                    receives: text(RECEIVES_ATTRIBUTE).and_then(|r| r.parse().ok()),
                    sent_at_ms,
                    handle: handle.to_owned(),
                    attributes,
                });
            }
        }
    }

    /// Makes walked messages visible again at once, untouched.
    pub async fn release(&self, messages: &[&DeadLetterMessage]) -> Result<(), BackendError> {
        for chunk in messages.chunks(SQS_BATCH) {
            change_visibility(&self.client, &self.metrics, &self.dlq_url, chunk.iter().map(|m| m.handle.as_str()), 0).await?;
        }
        Ok(())
    }

    /// Sends each message to the ingest queue (body and attributes, less the `catalog.error.*`
    /// ones), then deletes from the DLQ those whose copy was sent. A crash in between leaves a
    /// duplicate, which the store applies idempotently, never a loss.
    pub async fn move_back(&self, messages: &[&DeadLetterMessage]) -> Result<Vec<Moved>, BackendError> {
        let mut results = Vec::with_capacity(messages.len());
        for chunk in messages.chunks(SQS_BATCH) {
            let mut entries = Vec::with_capacity(chunk.len());
            for (i, m) in chunk.iter().enumerate() {
                let kept: HashMap<String, MessageAttributeValue> = m
                    .attributes
                    .iter()
                    .filter(|(k, _)| !k.starts_with(ERROR_ATTRIBUTE_PREFIX))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                entries.push(
                    SendMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .message_body(&m.body)
                        .set_message_attributes((!kept.is_empty()).then_some(kept))
                        .build()
                        .map_err(|e| BackendError::rejected("SQS SendMessageBatch", e))?,
                );
            }
            self.metrics.sqs_call("SendMessageBatch", chunk.iter().map(|m| m.body.len()).sum());
            let sent = self
                .client
                .send_message_batch()
                .queue_url(&self.ingest_url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| classify("SQS SendMessageBatch to the ingest queue", e))?;
            let mut outcome: Vec<Moved> = chunk.iter().map(|_| Moved::Failed("no answer for this entry".into())).collect();
            for failed in sent.failed() {
                if let Some(slot) = failed.id().parse::<usize>().ok().and_then(|i| outcome.get_mut(i)) {
                    *slot = Moved::Failed(format!("send: {} {}", failed.code(), failed.message().unwrap_or_default()));
                }
            }
            let sent_ids: Vec<usize> =
                sent.successful().iter().filter_map(|ok| ok.id().parse().ok()).filter(|&i| i < chunk.len()).collect();
            for &i in &sent_ids {
                outcome[i] = Moved::Moved;
            }
            let handles = sent_ids.iter().map(|&i| (i, chunk[i].handle.as_str()));
            for (i, code) in delete(&self.client, &self.metrics, &self.dlq_url, handles).await? {
                if let Some(slot) = outcome.get_mut(i) {
                    // The copy is on its way; the original stays and would be moved again.
                    *slot = Moved::Failed(format!("sent, but not deleted from the DLQ: {code}"));
                }
            }
            results.extend(outcome);
        }
        Ok(results)
    }
}
