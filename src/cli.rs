//! The command line: every flag has a `CATALOG_*` environment twin and a default that serves a laptop.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "catalog", version, about = "Event-sourced product catalog: pipeline, read model and BFF in one binary")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once at start and moved into its command: the size of a variant costs nothing here.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub enum Command {
    /// Run the pipeline, the read model and the BFF in one process (embedded: no AWS needed).
    Serve(ServeArgs),
    /// Rebuild derived state after an outage or a lost read model.
    #[command(subcommand)]
    Replay(ReplayCommand),
    /// Create the AWS resources the AWS backend needs.
    #[command(subcommand)]
    Infra(InfraCommand),
}

#[derive(Subcommand)]
pub enum InfraCommand {
    /// Create (idempotently) the bus, ingest rule, queues with redrive, and tables with the category index.
    Init(AwsArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// Everything in this process on sled: no cloud needed.
    Embedded,
    /// SQS, DynamoDB and EventBridge, from the standard AWS environment.
    Aws,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Role {
    /// Pipeline and BFF in one process.
    All,
    /// The BFF with its read model, fed by invalidations (AWS backend).
    Api,
    /// The pipeline only (AWS backend); serves health, readiness and metrics.
    Worker,
}

/// AWS resource names and limits; the endpoint, region and credentials come from the
/// standard AWS environment (`AWS_ENDPOINT_URL`, `AWS_REGION`, profiles, roles…).
#[derive(Args, Clone)]
pub struct AwsArgs {
    /// EventBridge bus producers publish to.
    #[arg(long, env = "CATALOG_BUS", default_value = "catalog")]
    pub bus: String,
    /// Rule that routes catalog events from the bus to the ingest queue.
    #[arg(long, env = "CATALOG_INGEST_RULE", default_value = "catalog-ingest")]
    pub ingest_rule: String,
    #[arg(long, env = "CATALOG_INGEST_QUEUE", default_value = "catalog-ingest")]
    pub ingest_queue: String,
    #[arg(long, env = "CATALOG_DLQ", default_value = "catalog-ingest-dlq")]
    pub dead_letter_queue: String,
    #[arg(long, env = "CATALOG_EVENTS_TABLE", default_value = "catalog-events")]
    pub events_table: String,
    #[arg(long, env = "CATALOG_PRODUCTS_TABLE", default_value = "catalog-products")]
    pub products_table: String,
    /// Prefix of each API instance's invalidation queue and rule.
    #[arg(long, env = "CATALOG_INVALIDATION_PREFIX", default_value = "catalog-invalidations")]
    pub invalidation_prefix: String,
    /// SQS long-poll wait, in seconds (at most 20).
    #[arg(long, env = "CATALOG_SQS_WAIT_SECS", default_value_t = 20)]
    pub sqs_wait_secs: u64,
    /// Concurrent SQS receive loops per worker.
    #[arg(long, env = "CATALOG_POLLERS", default_value_t = 4)]
    pub pollers: usize,
    /// DynamoDB conditional updates in flight per write batch.
    #[arg(long, env = "CATALOG_WRITE_CONCURRENCY", default_value_t = catalog_pipeline::aws::DEFAULT_WRITE_CONCURRENCY)]
    pub write_concurrency: usize,
    /// Largest event-log segment, in bytes of JSON lines before compression (each segment is
    /// one DynamoDB item, billed per started KiB of its compressed size).
    #[arg(long, env = "CATALOG_LOG_SEGMENT_BYTES", default_value_t = catalog_pipeline::aws::DEFAULT_LOG_SEGMENT_BYTES)]
    pub log_segment_bytes: usize,
    /// Seconds a received message stays invisible (renewed by a heartbeat while in flight).
    #[arg(long, env = "CATALOG_SQS_VISIBILITY_SECS", default_value_t = 30)]
    pub sqs_visibility_secs: u64,
    /// Receives before SQS moves a failing message to the DLQ (the queue's redrive policy).
    #[arg(long, env = "CATALOG_SQS_MAX_RECEIVE_COUNT", default_value_t = 3)]
    pub sqs_max_receive_count: u32,
}

impl AwsArgs {
    pub fn settings(&self) -> catalog_pipeline::aws::AwsSettings {
        use catalog_pipeline::aws::{AwsNames, AwsSettings};
        AwsSettings {
            names: AwsNames {
                bus: self.bus.clone(),
                ingest_rule: self.ingest_rule.clone(),
                ingest_queue: self.ingest_queue.clone(),
                dead_letter_queue: self.dead_letter_queue.clone(),
                events_table: self.events_table.clone(),
                products_table: self.products_table.clone(),
                invalidation_prefix: self.invalidation_prefix.clone(),
            },
            wait_time: std::time::Duration::from_secs(self.sqs_wait_secs.min(20)),
            visibility_timeout: std::time::Duration::from_secs(self.sqs_visibility_secs.max(1)),
            max_receive_count: self.sqs_max_receive_count.max(1),
            write_concurrency: self.write_concurrency.max(1),
            log_segment_bytes: self.log_segment_bytes.clamp(1, catalog_pipeline::aws::MAX_LOG_SEGMENT_BYTES),
            ..AwsSettings::default()
        }
    }
}

#[derive(Subcommand)]
pub enum ReplayCommand {
    /// Rebuild the read model from the event log (stop `catalog serve` first).
    Rebuild(DataArgs),
}

#[derive(Args, Clone)]
pub struct DataArgs {
    /// Where the embedded database lives.
    #[arg(long, env = "CATALOG_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// sled page cache, in MiB: shared evenly by the event-log/state database and the read
    /// model's (embedded), or all the read model's (AWS, where it is the only one).
    #[arg(long, env = "CATALOG_CACHE_MB", default_value_t = 128)]
    pub cache_mb: u64,
    /// Largest event body accepted; larger ones are dead-lettered.
    #[arg(long, env = "CATALOG_MAX_BODY_BYTES", default_value_t = catalog_domain::event::DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,
    /// Quantity at or below which a product shows `Low Stock`.
    #[arg(long, env = "CATALOG_LOW_STOCK_THRESHOLD", default_value_t = catalog_domain::view::DEFAULT_LOW_STOCK_THRESHOLD)]
    pub low_stock_threshold: u64,
    /// Seconds a view is served before it is re-read from the store: the backstop for a
    /// missed invalidation.
    #[arg(long, env = "CATALOG_VIEW_TTL_SECS", default_value_t = 300)]
    pub view_ttl_secs: u64,
}

#[derive(Args)]
pub struct ServeArgs {
    /// Address the BFF listens on (port 0 picks a free port, printed at start).
    #[arg(long, env = "CATALOG_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    #[command(flatten)]
    pub data: DataArgs,
    /// Where events come from and state goes.
    #[arg(long, env = "CATALOG_BACKEND", value_enum, default_value_t = Backend::Embedded)]
    pub backend: Backend,
    /// What this process runs; `api` and `worker` need the AWS backend.
    #[arg(long, env = "CATALOG_ROLE", value_enum, default_value_t = Role::All)]
    pub role: Role,
    #[command(flatten)]
    pub aws: AwsArgs,
    /// Load a small sample catalog when the event log is empty.
    #[arg(long, env = "CATALOG_DEMO")]
    pub demo: bool,
    /// Bearer token `POST /events` requires.
    #[arg(long, env = "CATALOG_INGEST_TOKEN", hide_env_values = true)]
    pub ingest_token: Option<String>,
    /// Serve `POST /events` on a non-loopback address without a token (not recommended).
    #[arg(long, env = "CATALOG_ALLOW_PUBLIC_INGEST")]
    pub allow_public_ingest: bool,
    /// Browser origins allowed by CORS (repeat, or comma-separate; `*` for any).
    #[arg(long = "cors-origin", env = "CATALOG_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,
    /// Cache-Control of product answers.
    #[arg(long, env = "CATALOG_CACHE_CONTROL", default_value = catalog_api::config::DEFAULT_CACHE_CONTROL)]
    pub cache_control: String,
    /// Largest `POST /events` request body.
    #[arg(long, env = "CATALOG_MAX_REQUEST_BYTES", default_value_t = catalog_api::config::DEFAULT_MAX_REQUEST_BYTES)]
    pub max_request_bytes: u64,
    /// Most entries in one `POST /events`.
    #[arg(long, env = "CATALOG_MAX_ENTRIES", default_value_t = catalog_api::config::DEFAULT_MAX_ENTRIES)]
    pub max_entries: usize,
    /// Messages taken from the event source per receive.
    #[arg(long, env = "CATALOG_RECEIVE_BATCH", default_value_t = catalog_pipeline::config::DEFAULT_RECEIVE_BATCH)]
    pub receive_batch: usize,
    /// Events per store write.
    #[arg(long, env = "CATALOG_WRITE_BATCH", default_value_t = catalog_pipeline::config::DEFAULT_WRITE_BATCH)]
    pub write_batch: usize,
    /// Longest a partial write batch waits for more events, in milliseconds (default: 0
    /// embedded, where batches form from what queued while the writer was busy; 5 on AWS).
    #[arg(long, env = "CATALOG_WRITE_BATCH_TIMEOUT_MS")]
    pub write_batch_timeout_ms: Option<u64>,
    /// Seconds a received message stays invisible before it is redelivered.
    #[arg(long, env = "CATALOG_VISIBILITY_TIMEOUT_SECS", default_value_t = 30)]
    pub visibility_timeout_secs: u64,
    /// Deliveries before a failing message goes to the dead-letter queue.
    #[arg(long, env = "CATALOG_MAX_RECEIVE_COUNT", default_value_t = 3)]
    pub max_receive_count: u32,
    /// Runtime worker threads (default: one per core).
    #[arg(long, env = "CATALOG_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// Longest a graceful shutdown waits for in-flight batches, in seconds.
    #[arg(long, env = "CATALOG_SHUTDOWN_TIMEOUT_SECS", default_value_t = 30)]
    pub shutdown_timeout_secs: u64,
}
