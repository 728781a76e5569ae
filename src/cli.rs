//! The command line: every flag has a `CATALOG_*` environment twin, a default taken from the
//! crate that owns the limit, and a range checked here, so a value that makes no sense is
//! refused at start with the flag, its variable and the range it must be in.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::TypedValueParser;
use clap::{Args, Parser, Subcommand, ValueEnum};

use catalog_api::config as api;
use catalog_api::server;
use catalog_aws as aws;
use catalog_pipeline::breaker;
use catalog_pipeline::config as pipeline;
use catalog_pipeline::embedded;

use crate::assemble::background::Priority;

/// sled's page cache when `--cache-mb` is not given, in MiB.
pub const DEFAULT_CACHE_MB: u64 = 128;
/// Longest a graceful shutdown waits for in-flight batches.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// How the embedded log's compaction thread is scheduled (`--log-compact-nice`).
pub const DEFAULT_COMPACT_PRIORITY: Priority = Priority::Idle;

#[derive(Parser)]
#[command(name = "catalog", version, about = "Event-sourced product catalog: pipeline, read model and BFF in one binary")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log lines as text, or as one JSON object per line for a log collector.
    #[arg(long, env = "CATALOG_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
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

/// A whole number in `min..=max`. clap's own range check names only the flag; this error
/// also names the environment variable, which is where most deployments set the value.
#[derive(Clone, Copy)]
pub struct InRange {
    min: u64,
    max: u64,
}

impl InRange {
    const fn new(min: u64, max: u64) -> Self {
        Self { min, max }
    }
}

impl TypedValueParser for InRange {
    type Value = u64;

    fn parse_ref(&self, cmd: &clap::Command, arg: Option<&clap::Arg>, value: &std::ffi::OsStr) -> Result<u64, clap::Error> {
        let text = value.to_string_lossy();
        match text.trim().parse::<u64>() {
            Ok(v) if (self.min..=self.max).contains(&v) => Ok(v),
            _ => {
                let flag = arg.and_then(clap::Arg::get_long).map_or_else(|| "the value".to_owned(), |l| format!("--{l}"));
                let env = arg.and_then(clap::Arg::get_env).map(|e| format!(" (or {})", e.to_string_lossy())).unwrap_or_default();
                let range = if self.max == u64::MAX {
                    format!("at least {}", self.min)
                } else {
                    format!("from {} to {}", self.min, self.max)
                };
                let message = format!("invalid value {text:?} for {flag}{env}: expected a whole number {range}\n");
                Err(clap::Error::raw(clap::error::ErrorKind::ValueValidation, message).with_cmd(cmd))
            }
        }
    }
}

fn usize_in(min: usize, max: usize) -> impl TypedValueParser<Value = usize> {
    // Bounds are usize, so every accepted value converts back without loss.
    InRange::new(min as u64, max as u64).map(|v| v as usize)
}

fn u32_in(min: u32, max: u32) -> impl TypedValueParser<Value = u32> {
    InRange::new(u64::from(min), u64::from(max)).map(|v| v as u32)
}

/// The embedded log takes the same bounds as SQS, so a setting moves between backends as it is.
const SQS_MAX_VISIBILITY_SECS: u64 = aws::MAX_VISIBILITY_SECS;
const SQS_MAX_RECEIVE_COUNT: u32 = aws::MAX_RECEIVE_COUNT;

/// AWS resource names and limits; the endpoint, region and credentials come from the
/// standard AWS environment (`AWS_ENDPOINT_URL`, `AWS_REGION`, profiles, roles…).
#[derive(Args, Clone)]
pub struct AwsArgs {
    /// EventBridge bus producers publish to.
    #[arg(long, env = "CATALOG_BUS", default_value = aws::DEFAULT_BUS)]
    pub bus: String,
    /// Rule that routes catalog events from the bus to the ingest queue.
    #[arg(long, env = "CATALOG_INGEST_RULE", default_value = aws::DEFAULT_INGEST_RULE)]
    pub ingest_rule: String,
    /// SQS queue the pipeline reads events from.
    #[arg(long, env = "CATALOG_INGEST_QUEUE", default_value = aws::DEFAULT_INGEST_QUEUE)]
    pub ingest_queue: String,
    /// SQS queue that keeps invalid and repeatedly failing events.
    #[arg(long, env = "CATALOG_DLQ", default_value = aws::DEFAULT_DEAD_LETTER_QUEUE)]
    pub dead_letter_queue: String,
    /// DynamoDB table of the event log (gzip segments).
    #[arg(long, env = "CATALOG_EVENTS_TABLE", default_value = aws::DEFAULT_EVENTS_TABLE)]
    pub events_table: String,
    /// DynamoDB table of current product state.
    #[arg(long, env = "CATALOG_PRODUCTS_TABLE", default_value = aws::DEFAULT_PRODUCTS_TABLE)]
    pub products_table: String,
    /// Prefix of each API instance's invalidation queue and rule.
    #[arg(long, env = "CATALOG_INVALIDATION_PREFIX", default_value = aws::DEFAULT_INVALIDATION_PREFIX)]
    pub invalidation_prefix: String,
    /// SQS long-poll wait, in seconds.
    #[arg(long, env = "CATALOG_SQS_WAIT_SECS", default_value_t = aws::DEFAULT_WAIT_TIME.as_secs(),
          value_parser = InRange::new(0, aws::MAX_WAIT_TIME.as_secs()))]
    pub sqs_wait_secs: u64,
    /// Seconds a received message stays invisible (renewed by a heartbeat while in flight).
    #[arg(long, env = "CATALOG_SQS_VISIBILITY_SECS", default_value_t = aws::DEFAULT_VISIBILITY_TIMEOUT.as_secs(),
          value_parser = InRange::new(1, SQS_MAX_VISIBILITY_SECS))]
    pub sqs_visibility_secs: u64,
    /// Receives before SQS moves a failing message to the DLQ (the queue's redrive policy).
    #[arg(long, env = "CATALOG_SQS_MAX_RECEIVE_COUNT", default_value_t = aws::DEFAULT_MAX_RECEIVE_COUNT,
          value_parser = u32_in(1, SQS_MAX_RECEIVE_COUNT))]
    pub sqs_max_receive_count: u32,
}

/// How an AWS worker runs: meaningless to `infra init`, so only `serve` has them.
#[derive(Args, Clone)]
pub struct AwsRuntimeArgs {
    /// Concurrent SQS receive loops per worker.
    #[arg(long, env = "CATALOG_POLLERS", default_value_t = aws::DEFAULT_POLLERS, value_parser = usize_in(1, 64))]
    pub pollers: usize,
    /// DynamoDB conditional updates in flight per write batch.
    #[arg(long, env = "CATALOG_WRITE_CONCURRENCY", default_value_t = aws::DEFAULT_WRITE_CONCURRENCY, value_parser = usize_in(1, 1024))]
    pub write_concurrency: usize,
    /// Largest event-log segment, in bytes of JSON lines before compression (each segment is
    /// one DynamoDB item, billed per started KiB of its compressed size).
    #[arg(long, env = "CATALOG_LOG_SEGMENT_BYTES", default_value_t = aws::DEFAULT_LOG_SEGMENT_BYTES,
          value_parser = usize_in(1, aws::MAX_LOG_SEGMENT_BYTES))]
    pub log_segment_bytes: usize,
}

impl AwsArgs {
    /// The settings `infra init` needs; `serve` adds its runtime ones.
    pub fn settings(&self) -> aws::AwsSettings {
        aws::AwsSettings {
            names: aws::AwsNames {
                bus: self.bus.clone(),
                ingest_rule: self.ingest_rule.clone(),
                ingest_queue: self.ingest_queue.clone(),
                dead_letter_queue: self.dead_letter_queue.clone(),
                events_table: self.events_table.clone(),
                products_table: self.products_table.clone(),
                invalidation_prefix: self.invalidation_prefix.clone(),
            },
            wait_time: Duration::from_secs(self.sqs_wait_secs),
            visibility_timeout: Duration::from_secs(self.sqs_visibility_secs),
            max_receive_count: self.sqs_max_receive_count,
            ..aws::AwsSettings::default()
        }
    }
}

#[derive(Subcommand)]
pub enum ReplayCommand {
    /// Rebuild a stopped instance's read model: embedded from the event log, AWS (an API
    /// instance's data dir) from the products table. Online: `POST /admin/rebuild`.
    Rebuild(RebuildArgs),
    /// Compare the event log's projection, the store and the read model; print every drift,
    /// exit 1 if there is any.
    Verify(VerifyArgs),
    /// Put the store's current state right from the event log's projection.
    Reproject(ReprojectArgs),
    /// Inspect the dead-letter queue, or move its messages back to be processed again.
    Dlq(DlqArgs),
}

/// Messages `replay dlq` moves per second unless told otherwise.
pub const DEFAULT_DLQ_RATE: u32 = 100;
/// Products `replay reproject` writes per second unless told otherwise.
pub const DEFAULT_REPROJECT_RATE: u32 = 500;

/// Which deployment a replay command works on: the embedded data dir (stop `catalog serve`
/// first: sled allows one process), or the AWS resources (safe beside running workers).
#[derive(Args, Clone)]
pub struct ReplayTarget {
    /// The backend whose state the command reads and repairs.
    #[arg(long, env = "CATALOG_BACKEND", value_enum, default_value_t = Backend::Embedded)]
    pub backend: Backend,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub aws: AwsArgs,
    /// Segments of each DynamoDB parallel Scan (AWS).
    #[arg(long, env = "CATALOG_SCAN_SEGMENTS", default_value_t = aws::DEFAULT_SCAN_SEGMENTS, value_parser = u32_in(1, 1_000_000))]
    pub scan_segments: u32,
}

#[derive(Args, Clone)]
pub struct RebuildArgs {
    #[command(flatten)]
    pub target: ReplayTarget,
    /// Products table items read per second (AWS; 0: unlimited).
    #[arg(long, env = "CATALOG_REBUILD_MAX_PER_SEC", default_value_t = 0)]
    pub max_per_sec: u32,
}

#[derive(Args, Clone)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub target: ReplayTarget,
    /// Rewrite every drifted view and listing from the store (the read model in --data-dir;
    /// on AWS, an API instance's, stopped).
    #[arg(long)]
    pub repair: bool,
    /// DynamoDB items read per second (AWS; 0: unlimited). The embedded tools read local files unpaced.
    #[arg(long, env = "CATALOG_VERIFY_MAX_PER_SEC", default_value_t = 0)]
    pub max_per_sec: u32,
}

#[derive(Args, Clone)]
pub struct ReprojectArgs {
    #[command(flatten)]
    pub target: ReplayTarget,
    /// Products written per second (0: unlimited), so a reprojection does not starve the pipeline.
    #[arg(long, env = "CATALOG_REPROJECT_MAX_PER_SEC", default_value_t = DEFAULT_REPROJECT_RATE)]
    pub max_per_sec: u32,
    /// Where progress is saved, to resume an interrupted run (default: `reproject.checkpoint` in --data-dir).
    #[arg(long, env = "CATALOG_REPROJECT_CHECKPOINT")]
    pub checkpoint: Option<PathBuf>,
    /// Ignore a saved checkpoint and start from the first product.
    #[arg(long)]
    pub restart: bool,
}

#[derive(Args, Clone)]
pub struct DlqArgs {
    #[command(flatten)]
    pub target: ReplayTarget,
    /// List the dead letters (code, stage, receives, product, type, reason) and move nothing.
    #[arg(long)]
    pub inspect: bool,
    /// Say what would be moved, and move nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Look at no more than this many dead letters.
    #[arg(long, value_parser = usize_in(1, usize::MAX))]
    pub max: Option<usize>,
    /// Only these products (repeat, or comma-separate).
    #[arg(long = "product", value_delimiter = ',')]
    pub products: Vec<String>,
    /// Only these error codes, e.g. `max_receive_count_exceeded` (repeat, or comma-separate).
    #[arg(long = "code", value_delimiter = ',')]
    pub codes: Vec<String>,
    /// Only these detail-types, e.g. `Price Update` (repeat, or comma-separate).
    #[arg(long = "detail-type", value_delimiter = ',')]
    pub detail_types: Vec<String>,
    /// Move messages that still fail validation too (they will be dead-lettered again unless
    /// the limits changed); without it they stay where they are.
    #[arg(long)]
    pub force: bool,
    /// Messages moved per second (0: unlimited).
    #[arg(long, env = "CATALOG_DLQ_MAX_PER_SEC", default_value_t = DEFAULT_DLQ_RATE)]
    pub max_per_sec: u32,
}

#[derive(Args, Clone)]
pub struct DataArgs {
    /// Where the embedded databases live.
    #[arg(long, env = "CATALOG_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// sled page cache, in MiB: half for the read model's database and an eighth for the main
    /// one, which `serve` mostly writes (embedded); all the read model's (AWS, where it is the
    /// only one).
    #[arg(long, env = "CATALOG_CACHE_MB", default_value_t = DEFAULT_CACHE_MB, value_parser = InRange::new(1, 1 << 20))]
    pub cache_mb: u64,
    /// Largest event body accepted; larger ones are dead-lettered.
    #[arg(long, env = "CATALOG_MAX_BODY_BYTES", default_value_t = catalog_domain::event::DEFAULT_MAX_BODY_BYTES,
          value_parser = usize_in(1, 16 << 20))]
    pub max_body_bytes: usize,
    /// Quantity at or below which a product shows `Low Stock`.
    #[arg(long, env = "CATALOG_LOW_STOCK_THRESHOLD", default_value_t = catalog_domain::view::DEFAULT_LOW_STOCK_THRESHOLD)]
    pub low_stock_threshold: u64,
    /// Seconds a view is served before it is re-read from the store: the backstop for a
    /// missed invalidation.
    #[arg(long, env = "CATALOG_VIEW_TTL_SECS", default_value_t = catalog_readmodel::DEFAULT_VIEW_TTL.as_secs(),
          value_parser = InRange::new(1, u64::from(u32::MAX)))]
    pub view_ttl_secs: u64,
}

impl DataArgs {
    pub fn parse_limits(&self) -> catalog_domain::ParseLimits {
        catalog_domain::ParseLimits { max_body_bytes: self.max_body_bytes }
    }

    pub fn view_settings(&self) -> catalog_domain::ViewSettings {
        catalog_domain::ViewSettings { low_stock_threshold: self.low_stock_threshold }
    }
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
    #[command(flatten)]
    pub aws_runtime: AwsRuntimeArgs,
    /// Load a small sample catalog when the event log is empty.
    #[arg(long, env = "CATALOG_DEMO")]
    pub demo: bool,
    /// Bearer token `POST /events` requires.
    #[arg(long, env = "CATALOG_INGEST_TOKEN", hide_env_values = true)]
    pub ingest_token: Option<String>,
    /// Bearer token of the admin routes (`POST /admin/rebuild`); without it they answer 403.
    #[arg(long, env = "CATALOG_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Serve `POST /events` on a non-loopback address without a token (not recommended).
    #[arg(long, env = "CATALOG_ALLOW_PUBLIC_INGEST")]
    pub allow_public_ingest: bool,
    /// Browser origins allowed by CORS (repeat, or comma-separate; `*` for any).
    #[arg(long = "cors-origin", env = "CATALOG_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,
    /// Cache-Control of product answers.
    #[arg(long, env = "CATALOG_CACHE_CONTROL", default_value = api::DEFAULT_CACHE_CONTROL)]
    pub cache_control: String,
    /// Largest `POST /events` request body.
    #[arg(long, env = "CATALOG_MAX_REQUEST_BYTES", default_value_t = api::DEFAULT_MAX_REQUEST_BYTES,
          value_parser = InRange::new(1, 1 << 30))]
    pub max_request_bytes: u64,
    /// Most entries in one `POST /events`.
    #[arg(long, env = "CATALOG_MAX_ENTRIES", default_value_t = api::DEFAULT_MAX_ENTRIES, value_parser = usize_in(1, 1_000_000))]
    pub max_entries: usize,
    /// Messages taken from the event source per receive (SQS returns at most 10 whatever this says).
    #[arg(long, env = "CATALOG_RECEIVE_BATCH", default_value_t = pipeline::DEFAULT_RECEIVE_BATCH, value_parser = usize_in(1, 100_000))]
    pub receive_batch: usize,
    /// Most events per store write (default: 2048 embedded, 512 on AWS).
    #[arg(long, env = "CATALOG_WRITE_BATCH", value_parser = usize_in(1, 100_000))]
    pub write_batch: Option<usize>,
    /// Longest a partial write batch waits for more events, in milliseconds (default: 0
    /// embedded, where batches form from what queued while the writer was busy; 5 on AWS).
    #[arg(long, env = "CATALOG_WRITE_BATCH_TIMEOUT_MS", value_parser = InRange::new(0, 60_000))]
    pub write_batch_timeout_ms: Option<u64>,
    /// Seconds a received message stays invisible before it is redelivered (embedded).
    #[arg(long, env = "CATALOG_VISIBILITY_TIMEOUT_SECS", default_value_t = embedded::DEFAULT_VISIBILITY_TIMEOUT.as_secs(),
          value_parser = InRange::new(1, SQS_MAX_VISIBILITY_SECS))]
    pub visibility_timeout_secs: u64,
    /// Deliveries before a failing message goes to the dead-letter queue (embedded).
    #[arg(long, env = "CATALOG_MAX_RECEIVE_COUNT", default_value_t = embedded::DEFAULT_MAX_RECEIVE_COUNT,
          value_parser = u32_in(1, SQS_MAX_RECEIVE_COUNT))]
    pub max_receive_count: u32,
    /// Seconds an event stays in the embedded log as history once the snapshot holds it; 0 keeps
    /// events for ever (unless `--log-retention-mb` bounds them). A start and the replay tools
    /// read only what came after the snapshot, whatever this is.
    #[arg(long, env = "CATALOG_LOG_RETENTION_SECS", default_value_t = embedded::DEFAULT_RETENTION.as_secs(),
          value_parser = InRange::new(0, 10 * 365 * 24 * 3600))]
    pub log_retention_secs: u64,
    /// MiB the embedded log may take before its oldest events the snapshot holds are removed; 0: no bound.
    #[arg(long, env = "CATALOG_LOG_RETENTION_MB", default_value_t = embedded::DEFAULT_RETENTION_BYTES / (1024 * 1024),
          value_parser = InRange::new(0, 1 << 30))]
    pub log_retention_mb: u64,
    /// MiB at which the embedded log starts a new segment file. Compaction deletes whole
    /// segments, so the log's disk use runs up to one segment over its retention.
    #[arg(long, env = "CATALOG_LOG_SEGMENT_MB", default_value_t = embedded::DEFAULT_SEGMENT_BYTES / (1024 * 1024),
          value_parser = InRange::new(1, 1024))]
    pub log_segment_mb: u64,
    /// Seconds between two compactions of the embedded log.
    #[arg(long, env = "CATALOG_LOG_COMPACT_INTERVAL_SECS", default_value_t = embedded::DEFAULT_COMPACT_INTERVAL.as_secs(),
          value_parser = InRange::new(1, 24 * 3600))]
    pub log_compact_interval_secs: u64,
    /// Scheduling of the embedded log's compaction thread: `idle` (Linux's SCHED_IDLE, only CPU
    /// time nothing else wants) or a nice value as nice(1) counts (0: the pipeline's own, 19:
    /// lowest), which gives it a share of a busy machine.
    #[arg(long, env = "CATALOG_LOG_COMPACT_NICE", default_value_t = DEFAULT_COMPACT_PRIORITY, value_parser = clap::value_parser!(Priority))]
    pub log_compact_nice: Priority,
    /// Accepted events waiting to be processed past which the embedded log's compaction gives
    /// way: it then sleeps 2 ms after every 2 ms of work until the pipeline has caught up, so a
    /// compaction takes up to twice as long beside a pipeline that lags; 0: never.
    #[arg(long, env = "CATALOG_LOG_COMPACT_YIELD_BACKLOG", default_value_t = embedded::DEFAULT_YIELD_BACKLOG,
          value_parser = InRange::new(0, 1 << 40))]
    pub log_compact_yield_backlog: u64,
    /// MiB of the most read product views kept decoded in memory in front of sled (0: none);
    /// beyond it a read walks sled's tree, about a sixth more CPU per GET.
    #[arg(long, env = "CATALOG_HOT_VIEWS_MB", default_value_t = catalog_readmodel::DEFAULT_HOT_VIEWS_BYTES >> 20,
          value_parser = InRange::new(0, 1 << 20))]
    pub hot_views_mb: u64,
    /// Runtime worker threads (default: one per core).
    #[arg(long, env = "CATALOG_WORKER_THREADS", value_parser = usize_in(1, 1024))]
    pub worker_threads: Option<usize>,
    /// Seconds a client may take from the first byte of a request to the end of its headers.
    #[arg(long, env = "CATALOG_HEADER_READ_TIMEOUT_SECS", default_value_t = server::DEFAULT_HEADER_READ_TIMEOUT.as_secs(),
          value_parser = InRange::new(1, 3600))]
    pub header_read_timeout_secs: u64,
    /// Seconds a kept-alive connection may sit with no request before it is closed.
    #[arg(long, env = "CATALOG_IDLE_TIMEOUT_SECS", default_value_t = server::DEFAULT_IDLE_TIMEOUT.as_secs(),
          value_parser = InRange::new(1, 3600))]
    pub idle_timeout_secs: u64,
    /// Seconds a request may take from the end of its headers to its answer (a slow body gets 408).
    #[arg(long, env = "CATALOG_BODY_TIMEOUT_SECS", default_value_t = server::DEFAULT_BODY_TIMEOUT.as_secs(),
          value_parser = InRange::new(1, 3600))]
    pub body_timeout_secs: u64,
    /// Most client connections open at once; more are closed as they arrive (default: 10,000,
    /// or the open-file limit less 256 when that is lower).
    #[arg(long, env = "CATALOG_MAX_CONNECTIONS", value_parser = usize_in(1, 1_000_000))]
    pub max_connections: Option<usize>,
    /// Store writes failing in a row (unavailable or refused) that open the circuit breaker.
    #[arg(long, env = "CATALOG_BREAKER_FAILURES", default_value_t = breaker::DEFAULT_CONSECUTIVE_FAILURES, value_parser = u32_in(1, 10_000))]
    pub breaker_failures: u32,
    /// Percentage of failed store writes within one window that opens the breaker.
    #[arg(long, env = "CATALOG_BREAKER_FAILURE_PERCENT", default_value_t = (breaker::DEFAULT_FAILURE_RATE * 100.0) as u64,
          value_parser = InRange::new(1, 100))]
    pub breaker_failure_percent: u64,
    /// Fewest writes in a window before its failure percentage counts.
    #[arg(long, env = "CATALOG_BREAKER_MIN_CALLS", default_value_t = breaker::DEFAULT_MIN_CALLS, value_parser = u32_in(1, 1_000_000))]
    pub breaker_min_calls: u32,
    /// Seconds of the window the failure percentage is taken over.
    #[arg(long, env = "CATALOG_BREAKER_WINDOW_SECS", default_value_t = breaker::DEFAULT_WINDOW.as_secs(), value_parser = InRange::new(1, 3600))]
    pub breaker_window_secs: u64,
    /// Throttled store writes in a row that open the breaker (throttles alone are not an outage).
    #[arg(long, env = "CATALOG_BREAKER_THROTTLES", default_value_t = breaker::DEFAULT_CONSECUTIVE_THROTTLES, value_parser = u32_in(1, 100_000))]
    pub breaker_throttles: u32,
    /// Seconds an open breaker waits before letting a trial batch through.
    #[arg(long, env = "CATALOG_BREAKER_COOL_DOWN_SECS", default_value_t = breaker::DEFAULT_COOL_DOWN.as_secs(), value_parser = InRange::new(1, 3600))]
    pub breaker_cool_down_secs: u64,
    /// Trial batches a half-open breaker lets through at once.
    #[arg(long, env = "CATALOG_BREAKER_TRIAL_BATCHES", default_value_t = breaker::DEFAULT_TRIAL_BATCHES, value_parser = u32_in(1, 100))]
    pub breaker_trial_batches: u32,
    /// Successful trial batches that close a half-open breaker.
    #[arg(long, env = "CATALOG_BREAKER_TRIAL_SUCCESSES", default_value_t = breaker::DEFAULT_TRIAL_SUCCESSES, value_parser = u32_in(1, 1000))]
    pub breaker_trial_successes: u32,
    /// Requests per second one client may make to the product and ingest routes; over it the
    /// answer is 429 with `Retry-After` (0: no limit). Probes and `/metrics` are never limited.
    #[arg(long, env = "CATALOG_CLIENT_RATE_LIMIT", default_value_t = 0)]
    pub client_rate_limit: u32,
    /// Requests a client may make at once after a quiet spell (default: one second's worth).
    #[arg(long, env = "CATALOG_CLIENT_BURST", value_parser = u32_in(1, u32::MAX))]
    pub client_burst: Option<u32>,
    /// Header whose first address names the client, as a trusted load balancer sets it
    /// (e.g. `x-forwarded-for`); without it, the connection's peer address does.
    #[arg(long, env = "CATALOG_CLIENT_KEY_HEADER")]
    pub client_key_header: Option<String>,
    /// Seconds an id the store does not know is answered 404 without asking the store again
    /// (0: never remembered); a product created meanwhile shows as soon as its view is written.
    #[arg(long, env = "CATALOG_NEGATIVE_CACHE_SECS", default_value_t = catalog_api::state::DEFAULT_NEGATIVE_TTL.as_secs(),
          value_parser = InRange::new(0, 3600))]
    pub negative_cache_secs: u64,
    /// Milliseconds the first read-model miss waits for others to share its store read (0:
    /// only those already waiting).
    #[arg(long, env = "CATALOG_FILL_WINDOW_MS", default_value_t = catalog_api::state::DEFAULT_FILL_WINDOW.as_millis() as u64,
          value_parser = InRange::new(0, 1000))]
    pub fill_window_ms: u64,
    /// Events per second the pipeline writes to the store at most (0: no limit), so that
    /// draining a backlog after an outage does not stampede the store.
    #[arg(long, env = "CATALOG_STORE_MAX_WRITES_PER_SEC", default_value_t = 0)]
    pub store_max_writes_per_sec: u32,
    /// Longest a graceful shutdown waits for in-flight batches, in seconds.
    #[arg(long, env = "CATALOG_SHUTDOWN_TIMEOUT_SECS", default_value_t = DEFAULT_SHUTDOWN_TIMEOUT.as_secs(),
          value_parser = InRange::new(0, 3600))]
    pub shutdown_timeout_secs: u64,
}

impl ServeArgs {
    /// Checks what clap cannot see flag by flag, and maps the flags onto the BFF's settings.
    pub fn api_config(&self) -> anyhow::Result<api::ApiConfig> {
        if self.backend == Backend::Embedded && self.role != Role::All {
            let role = self.role.to_possible_value().map_or_else(String::new, |v| v.get_name().to_owned());
            anyhow::bail!(
                "--role {role} needs --backend aws (CATALOG_BACKEND=aws): the embedded backend runs everything in one process"
            );
        }
        for origin in &self.cors_origins {
            api::validate_origin(origin).map_err(|e| anyhow::anyhow!("--cors-origin (CATALOG_CORS_ORIGINS): {e}"))?;
        }
        let token = match &self.ingest_token {
            Some(t) if t.trim().is_empty() => anyhow::bail!(
                "--ingest-token (CATALOG_INGEST_TOKEN) is empty: set a token, or unset the variable to serve without one on loopback"
            ),
            Some(t) => Some(api::IngestToken::new(t.clone())),
            None => None,
        };
        let ingests = self.backend == Backend::Embedded;
        if ingests && !self.addr.ip().is_loopback() && token.is_none() && !self.allow_public_ingest {
            anyhow::bail!(
                "refusing to serve POST /events on {} without a token: set CATALOG_INGEST_TOKEN, bind to 127.0.0.1, or pass --allow-public-ingest",
                self.addr
            );
        }
        let admin_token = match &self.admin_token {
            Some(t) if t.trim().is_empty() => {
                anyhow::bail!(
                    "--admin-token (CATALOG_ADMIN_TOKEN) is empty: set a token, or unset the variable to turn admin routes off"
                )
            }
            Some(t) => Some(api::IngestToken::new(t.clone())),
            None => None,
        };
        let mut config = api::ApiConfig::default();
        config.admin_token = admin_token;
        config.cors_origins = self.cors_origins.clone();
        config.cache_control = self.cache_control.clone();
        config.ingest_token = token;
        config.max_request_bytes = self.max_request_bytes;
        config.max_entries = self.max_entries;
        config.product_routes = self.role != Role::Worker;
        Ok(config)
    }

    /// The pipeline's settings; `receive_batch`, `pollers` and the write batch's defaults
    /// depend on the backend.
    pub fn pipeline_config(
        &self,
        receive_batch: usize,
        pollers: usize,
        (default_batch, default_linger): (usize, Duration),
    ) -> pipeline::PipelineConfig {
        pipeline::PipelineConfig {
            receive_batch,
            pollers,
            write_batch: self.write_batch.unwrap_or(default_batch),
            write_batch_timeout: self.write_batch_timeout_ms.map_or(default_linger, Duration::from_millis),
            parse_limits: self.data.parse_limits(),
            store_max_writes_per_sec: self.store_max_writes_per_sec,
            ..pipeline::PipelineConfig::default()
        }
    }

    pub fn connection_limits(&self) -> server::ConnectionLimits {
        let fd_room = server::open_file_limit().map(|n| n.saturating_sub(server::RESERVED_DESCRIPTORS).max(1));
        let max_connections = match (self.max_connections, fd_room) {
            (Some(n), Some(room)) if n > room => {
                tracing::warn!(
                    max_connections = n,
                    open_file_limit = room + server::RESERVED_DESCRIPTORS,
                    "--max-connections is above what the open-file limit leaves room for; raise `ulimit -n`"
                );
                n
            }
            (Some(n), _) => n,
            (None, Some(room)) => room.min(server::DEFAULT_MAX_CONNECTIONS),
            (None, None) => server::DEFAULT_MAX_CONNECTIONS,
        };
        server::ConnectionLimits {
            header_read_timeout: Duration::from_secs(self.header_read_timeout_secs),
            idle_timeout: Duration::from_secs(self.idle_timeout_secs),
            body_timeout: Duration::from_secs(self.body_timeout_secs),
            max_connections,
        }
    }

    pub fn fill_config(&self) -> catalog_api::state::FillConfig {
        catalog_api::state::FillConfig {
            negative_ttl: Duration::from_secs(self.negative_cache_secs),
            window: Duration::from_millis(self.fill_window_ms),
            ..catalog_api::state::FillConfig::default()
        }
    }

    /// The per-client request limit, if one is set.
    pub fn client_rate_limit(&self) -> anyhow::Result<Option<server::ClientRateLimit>> {
        let Some(per_second) = std::num::NonZeroU32::new(self.client_rate_limit) else { return Ok(None) };
        let burst = self.client_burst.and_then(std::num::NonZeroU32::new).unwrap_or(per_second);
        let key_header = self
            .client_key_header
            .as_deref()
            .map(|h| {
                warp::http::header::HeaderName::try_from(h.trim())
                    .map_err(|_| anyhow::anyhow!("--client-key-header (CATALOG_CLIENT_KEY_HEADER): {h:?} is not a header name"))
            })
            .transpose()?;
        Ok(Some(server::ClientRateLimit { per_second, burst, key_header }))
    }

    pub fn breaker_config(&self) -> breaker::BreakerConfig {
        breaker::BreakerConfig {
            consecutive_failures: self.breaker_failures,
            failure_rate: self.breaker_failure_percent as f64 / 100.0,
            min_calls: self.breaker_min_calls,
            window: Duration::from_secs(self.breaker_window_secs),
            consecutive_throttles: self.breaker_throttles,
            cool_down: Duration::from_secs(self.breaker_cool_down_secs),
            trial_batches: self.breaker_trial_batches,
            trial_successes: self.breaker_trial_successes,
        }
    }

    pub fn aws_settings(&self) -> aws::AwsSettings {
        aws::AwsSettings {
            write_concurrency: self.aws_runtime.write_concurrency,
            log_segment_bytes: self.aws_runtime.log_segment_bytes,
            ..self.aws.settings()
        }
    }

    /// How much of the embedded log compaction keeps (0 turns a bound off).
    pub fn log_retention(&self) -> embedded::Retention {
        embedded::Retention {
            retention: (self.log_retention_secs > 0).then(|| Duration::from_secs(self.log_retention_secs)),
            max_bytes: (self.log_retention_mb > 0).then(|| self.log_retention_mb * 1024 * 1024),
        }
    }

    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs(self.shutdown_timeout_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve(args: &[&str]) -> Result<ServeArgs, clap::Error> {
        let mut argv = vec!["catalog", "serve"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).map(|cli| match cli.command {
            Command::Serve(args) => args,
            _ => unreachable!("parsed a serve command"),
        })
    }

    #[test]
    fn out_of_range_values_are_refused_naming_the_flag_the_variable_and_the_range() {
        for (flag, value) in [("--cache-mb", "0"), ("--write-batch", "0"), ("--max-entries", "0"), ("--sqs-wait-secs", "21")] {
            let message = serve(&[flag, value]).err().unwrap_or_else(|| panic!("{flag} {value} was accepted")).to_string();
            assert!(message.contains(flag), "{message}");
            assert!(message.contains("(or CATALOG_"), "{message}");
            assert!(message.contains("expected a whole number"), "{message}");
        }
        assert!(serve(&["--cache-mb", "abc"]).is_err());
    }

    #[test]
    fn defaults_parse_and_are_in_range() {
        let args = serve(&[]).unwrap();
        assert_eq!(args.data.cache_mb, DEFAULT_CACHE_MB);
        assert_eq!(args.write_batch, None, "the backend decides");
        assert!(args.api_config().is_ok());
    }

    #[test]
    fn every_option_of_every_command_says_what_it_is_for() {
        use clap::CommandFactory;
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if !builtin && arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} --{}", arg.get_long().unwrap_or(arg.get_id().as_str())));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "catalog", &mut missing);
        assert!(missing.is_empty(), "options without help: {missing:?}");
    }

    #[test]
    fn the_operations_page_lists_every_serve_flag() {
        use clap::CommandFactory;
        let page = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md")).unwrap();
        let cli = Cli::command();
        let serve = cli.find_subcommand("serve").unwrap();
        let missing: Vec<String> = serve
            .get_arguments()
            .filter_map(|a| a.get_long())
            .filter(|long| *long != "help" && !page.contains(&format!("`--{long}`")))
            .map(|long| format!("--{long}"))
            .collect();
        assert!(missing.is_empty(), "docs/operations.md does not list {missing:?}");
    }

    #[test]
    fn infra_init_offers_only_what_it_uses() {
        let err = Cli::try_parse_from(["catalog", "infra", "init", "--pollers", "2"]).err().expect("--pollers is a serve flag");
        assert_eq!(err.kind(), clap::error::ErrorKind::UnknownArgument);
        assert!(Cli::try_parse_from(["catalog", "infra", "init", "--sqs-max-receive-count", "5"]).is_ok());
    }

    #[test]
    fn an_empty_or_blank_token_is_refused() {
        for token in ["", "  "] {
            let args = serve(&["--ingest-token", token]).unwrap();
            let message = args.api_config().unwrap_err().to_string();
            assert!(message.contains("CATALOG_INGEST_TOKEN"), "{message}");
        }
    }

    #[test]
    fn a_split_role_needs_the_aws_backend_and_says_so_in_flag_words() {
        let message = serve(&["--role", "api"]).unwrap().api_config().unwrap_err().to_string();
        assert!(message.starts_with("--role api needs --backend aws"), "{message}");
    }
}
