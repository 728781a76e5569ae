//! What the AWS side costs, counted where it is spent: calls per service and operation,
//! DynamoDB capacity units as `ReturnConsumedCapacity` reports them, EventBridge entries.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Call {
    pub service: &'static str,
    pub operation: &'static str,
}

#[derive(Clone, Debug, Default)]
pub struct AwsMetrics {
    pub calls: Family<Call, Counter>,
    /// SQS bills each 64 KiB of a request as one request.
    pub sqs_requests: Counter,
    pub dynamodb_write_units: Counter<f64, AtomicU64>,
    pub dynamodb_read_units: Counter<f64, AtomicU64>,
    /// Write units by DynamoDB's sizing rules (1 per started KiB of each item written, at least
    /// 1 for a failed conditional write): emulators do not all report `ConsumedCapacity` for
    /// every write call, so the bill is priced from the larger of this and the reported figure.
    pub dynamodb_estimated_write_units: Counter,
    pub eventbridge_entries: Counter,
}

impl AwsMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("catalog_aws");
        r.register("calls", "AWS API calls by service and operation", self.calls.clone());
        r.register("sqs_billed_requests", "SQS requests as billed (64 KiB chunks)", self.sqs_requests.clone());
        r.register("dynamodb_write_units", "DynamoDB write capacity units consumed", self.dynamodb_write_units.clone());
        r.register("dynamodb_read_units", "DynamoDB read capacity units consumed", self.dynamodb_read_units.clone());
        r.register(
            "dynamodb_estimated_write_units",
            "DynamoDB write units by item size (1 per started KiB per item written)",
            self.dynamodb_estimated_write_units.clone(),
        );
        r.register("eventbridge_entries", "EventBridge entries published", self.eventbridge_entries.clone());
    }

    pub fn call(&self, service: &'static str, operation: &'static str) {
        self.calls.get_or_create(&Call { service, operation }).inc();
    }

    /// One SQS call; `payload_bytes` counts toward extra 64 KiB billing chunks.
    pub fn sqs_call(&self, operation: &'static str, payload_bytes: usize) {
        self.call("sqs", operation);
        self.sqs_requests.inc_by(payload_bytes.div_ceil(64 * 1024).max(1) as u64);
    }

    pub fn consumed<'a>(&self, capacity: impl IntoIterator<Item = &'a aws_sdk_dynamodb::types::ConsumedCapacity>, write: bool) {
        let units: f64 = capacity.into_iter().filter_map(|c| c.capacity_units()).fold(0.0, |a, b| a + b);
        if write {
            self.dynamodb_write_units.inc_by(units);
        } else {
            self.dynamodb_read_units.inc_by(units);
        }
    }
}

/// An item's size by DynamoDB's rules (attribute names plus values), close enough to price it.
pub fn item_size(item: &std::collections::HashMap<String, aws_sdk_dynamodb::types::AttributeValue>) -> usize {
    use aws_sdk_dynamodb::types::AttributeValue as V;
    item.iter()
        .map(|(name, value)| {
            name.len()
                + match value {
                    V::S(s) => s.len(),
                    // Numbers are stored in about one byte per two digits, plus one.
                    V::N(n) => n.len().div_ceil(2) + 1,
                    V::Bool(_) | V::Null(_) => 1,
                    V::B(b) => b.as_ref().len(),
                    other => format!("{other:?}").len(),
                }
        })
        .sum()
}

/// Write units for writing an item of `bytes`.
pub fn write_units(bytes: usize) -> u64 {
    bytes.div_ceil(1024).max(1) as u64
}
