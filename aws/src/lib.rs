//! Adapters for SQS, DynamoDB and EventBridge: the ports of `catalog-pipeline`, on the real
//! wire protocols (AWS, LocalStack, or the moto server the tests start). Only the binary
//! depends on this crate, so nothing else compiles the AWS SDK.
//!
//! Layout:
//! - `sqs`: the event source: long polling, batch delete after durable writes, visibility
//!   heartbeat, explicit dead-lettering with reason attributes.
//! - `dynamodb`: the store: event log segments via `BatchWriteItem`, current state via
//!   version-guarded `UpdateItem` per product facet, reads via `BatchGetItem`.
//! - `eventbridge`: the invalidation bus (`PutEvents`) and each API instance's
//!   subscription queue.
//! - `infra`: `catalog infra init`, idempotent.
//! - `retry`: bounded full-jitter retries of the items a batch call left unprocessed.
//! - `cost`: calls, capacity units and entries, counted for the bill per million events.
//! - `readiness`: the `/readyz` lines of an AWS process (table, queue, backlog).
//! - `classify`: an SDK error sorted into the pipeline's failure classes.

pub mod cost;
pub mod dlq;
pub mod dynamodb;
pub mod eventbridge;
pub mod infra;
pub mod readiness;
pub mod retry;
pub mod sqs;

use std::time::Duration;

use aws_sdk_sqs::config::http::HttpResponse;
use aws_sdk_sqs::error::{ProvideErrorMetadata, SdkError};
use catalog_pipeline::{BackendError, FailureClass};

pub use cost::AwsMetrics;

/// Resource names, each configurable so that several catalogs (or tests) share an account.
#[derive(Debug, Clone)]
pub struct AwsNames {
    pub bus: String,
    pub ingest_rule: String,
    pub ingest_queue: String,
    pub dead_letter_queue: String,
    pub events_table: String,
    pub products_table: String,
    /// Each API instance subscribes through a queue and rule named `<prefix>-<instance id>`.
    pub invalidation_prefix: String,
}

pub const DEFAULT_BUS: &str = "catalog";
pub const DEFAULT_INGEST_RULE: &str = "catalog-ingest";
pub const DEFAULT_INGEST_QUEUE: &str = "catalog-ingest";
pub const DEFAULT_DEAD_LETTER_QUEUE: &str = "catalog-ingest-dlq";
pub const DEFAULT_EVENTS_TABLE: &str = "catalog-events";
pub const DEFAULT_PRODUCTS_TABLE: &str = "catalog-products";
pub const DEFAULT_INVALIDATION_PREFIX: &str = "catalog-invalidations";

impl Default for AwsNames {
    fn default() -> Self {
        Self {
            bus: DEFAULT_BUS.into(),
            ingest_rule: DEFAULT_INGEST_RULE.into(),
            ingest_queue: DEFAULT_INGEST_QUEUE.into(),
            dead_letter_queue: DEFAULT_DEAD_LETTER_QUEUE.into(),
            events_table: DEFAULT_EVENTS_TABLE.into(),
            products_table: DEFAULT_PRODUCTS_TABLE.into(),
            invalidation_prefix: DEFAULT_INVALIDATION_PREFIX.into(),
        }
    }
}

/// The GSI that lists products by category (the seed's Q10: partition by id, index by category).
pub const CATEGORY_INDEX: &str = "category-index";
/// Source and detail-type of the invalidations the pipeline publishes.
pub const INVALIDATION_SOURCE: &str = "catalog.pipeline";
pub const INVALIDATION_DETAIL_TYPE: &str = "Product Changed";

/// SQS long polling waits at most 20 s.
pub const MAX_WAIT_TIME: Duration = Duration::from_secs(20);
pub const DEFAULT_WAIT_TIME: Duration = MAX_WAIT_TIME;
/// SQS's longest visibility timeout (12 hours) and largest redrive receive count.
pub const MAX_VISIBILITY_SECS: u64 = 12 * 60 * 60;
pub const MAX_RECEIVE_COUNT: u32 = 1_000;
/// Concurrent SQS receive loops per worker: each returns at most 10 messages per call.
pub const DEFAULT_POLLERS: usize = 4;
/// Segments of a parallel Scan (read-model warm-up, replay tools): DynamoDB serves each
/// segment's pages independently, so a whole-table read takes about 1/n of the time.
pub const DEFAULT_SCAN_SEGMENTS: u32 = 4;
pub const DEFAULT_VISIBILITY_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_RECEIVE_COUNT: u32 = 3;
pub const DEFAULT_BATCH_ATTEMPTS: u32 = 5;
pub const DEFAULT_WRITE_CONCURRENCY: usize = 16;
/// 64 KiB of JSON lines gzip to roughly 8–12 KiB: a tenth of a write unit per event or less,
/// and far below DynamoDB's 400 KB item limit even for incompressible input.
pub const DEFAULT_LOG_SEGMENT_BYTES: usize = 64 * 1024;
/// Largest segment allowed: its compressed item stays under DynamoDB's 400 KB item limit even
/// if the events do not compress at all.
pub const MAX_LOG_SEGMENT_BYTES: usize = 256 * 1024;

#[derive(Debug, Clone)]
pub struct AwsSettings {
    pub names: AwsNames,
    /// SQS long-poll wait (at most 20 s).
    pub wait_time: Duration,
    /// Visibility of a received message; the heartbeat renews it while a batch is in flight.
    pub visibility_timeout: Duration,
    /// SQS redrive: deliveries before the queue moves a message to the DLQ.
    pub max_receive_count: u32,
    /// Attempts of a batch call whose items come back unprocessed.
    pub batch_attempts: u32,
    /// First retry delay; later ones back off exponentially with full jitter.
    pub retry_base: Duration,
    /// Conditional updates in flight at once per write batch.
    pub write_concurrency: usize,
    /// Largest log segment, in bytes of uncompressed JSON lines.
    pub log_segment_bytes: usize,
}

impl Default for AwsSettings {
    fn default() -> Self {
        Self {
            names: AwsNames::default(),
            wait_time: DEFAULT_WAIT_TIME,
            visibility_timeout: DEFAULT_VISIBILITY_TIMEOUT,
            max_receive_count: DEFAULT_MAX_RECEIVE_COUNT,
            batch_attempts: DEFAULT_BATCH_ATTEMPTS,
            retry_base: Duration::from_millis(50),
            write_concurrency: DEFAULT_WRITE_CONCURRENCY,
            log_segment_bytes: DEFAULT_LOG_SEGMENT_BYTES,
        }
    }
}

/// The three clients, built once from the standard chain (`AWS_ENDPOINT_URL`,
/// `AWS_ENDPOINT_URL_<SERVICE>`, `AWS_REGION`, credentials) and cheap to clone.
#[derive(Clone, Debug)]
pub struct AwsClients {
    pub sqs: aws_sdk_sqs::Client,
    pub dynamodb: aws_sdk_dynamodb::Client,
    pub eventbridge: aws_sdk_eventbridge::Client,
}

impl AwsClients {
    /// Fails at once, saying what to set, when no region is configured: every call would
    /// otherwise fail later with a dispatch error that does not say why.
    pub async fn from_env() -> Result<Self, BackendError> {
        let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
        if config.region().is_none() {
            return Err(BackendError::rejected(
                "loading the AWS configuration",
                "no AWS region: set AWS_REGION (for example us-east-1), or use a profile that has one",
            ));
        }
        Ok(Self {
            sqs: aws_sdk_sqs::Client::new(&config),
            dynamodb: aws_sdk_dynamodb::Client::new(&config),
            eventbridge: aws_sdk_eventbridge::Client::new(&config),
        })
    }
}

/// Error codes AWS services use for "slow down" (DynamoDB, SQS, EventBridge and the SDK's own).
const THROTTLING_CODES: &[&str] = &[
    "ThrottlingException",
    "Throttling",
    "ThrottledException",
    "RequestThrottled",
    "RequestThrottledException",
    "ProvisionedThroughputExceededException",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "LimitExceededException",
    "SlowDown",
];

/// Sorts an SDK error into a failure class, keeping the error as the cause: no answer (a
/// connection, DNS or timeout failure) or a 5xx is an outage, a throttling code is a throttle,
/// any other answer is a refusal.
pub fn classify<E>(operation: impl Into<String>, error: SdkError<E, HttpResponse>) -> BackendError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let class = match &error {
        SdkError::ConstructionFailure(_) => FailureClass::Rejected,
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => FailureClass::Unavailable,
        SdkError::ServiceError(e) => {
            let code = e.err().code().unwrap_or_default();
            if THROTTLING_CODES.contains(&code) {
                FailureClass::Throttled
            } else if e.raw().status().is_server_error() {
                FailureClass::Unavailable
            } else {
                FailureClass::Rejected
            }
        }
        _ => FailureClass::Unavailable,
    };
    BackendError::new(class, operation, ServiceFault::from(error))
}

/// An SDK error as operators read it: `Code: message` when the service answered, else the
/// whole cause chain (a transport failure's detail, e.g. "connection refused", is deep in it).
#[derive(Debug)]
pub struct ServiceFault(String);

impl<E> From<SdkError<E, HttpResponse>> for ServiceFault
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    fn from(error: SdkError<E, HttpResponse>) -> Self {
        Self(match (error.code(), error.message()) {
            (Some(code), Some(message)) => format!("{code}: {message}"),
            (Some(code), None) => code.to_owned(),
            _ => aws_sdk_sqs::error::DisplayErrorContext(&error).to_string(),
        })
    }
}

impl std::fmt::Display for ServiceFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ServiceFault {}
