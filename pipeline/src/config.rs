//! Every limit of the pipeline, with its default; the binary maps each to a flag and a `CATALOG_*` variable.

use std::time::Duration;

pub const DEFAULT_RECEIVE_BATCH: usize = 256;
/// AWS: events per store write, which sends them as `BatchWriteItem` calls of 25.
pub const DEFAULT_WRITE_BATCH: usize = 512;
/// Embedded: a batch is what queued while the writer was busy, up to this many. Below
/// saturation batches stay small whatever the cap, so it only decides how a backlog is
/// worked off: 2048 did so 11-14% faster than 512, with the same latency at the same load
/// (BENCHMARKS.md, "Write path, round ten").
pub const DEFAULT_EMBEDDED_WRITE_BATCH: usize = 2048;
/// Embedded: no linger, batches form from what queued while the writer was busy.
pub const DEFAULT_WRITE_BATCH_TIMEOUT: Duration = Duration::ZERO;
/// AWS: a short linger gathers several SQS receives into one batch, so fewer and fuller
/// `BatchWriteItem` calls and log segments.
pub const DEFAULT_AWS_WRITE_BATCH_TIMEOUT: Duration = Duration::from_millis(5);
pub const DEFAULT_CHANNEL_CAPACITY: usize = 8;
pub const DEFAULT_POLLERS: usize = 1;
pub const DEFAULT_PUBLISH_ATTEMPTS: u32 = 5;
pub const DEFAULT_RETRY_BASE: Duration = Duration::from_millis(50);
/// The longest single wait between two retries.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

/// The retry schedule every retry loop uses: `attempts` tries in all, waits growing from
/// `base` exponentially to at most [`MAX_RETRY_DELAY`], with full jitter so that workers which
/// failed together do not retry together.
pub fn backoff(base: Duration, attempts: u32) -> backon::ExponentialBuilder {
    backon::ExponentialBuilder::default()
        .with_min_delay(base)
        .with_max_delay(MAX_RETRY_DELAY)
        .with_max_times(attempts.saturating_sub(1) as usize)
        .with_jitter()
}

#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Messages asked for per receive call (SQS caps this at 10).
    pub receive_batch: usize,
    /// Events per store write; the store may split it further (DynamoDB: 25).
    pub write_batch: usize,
    /// How long a partial write batch waits for more events (zero: it takes what is queued).
    pub write_batch_timeout: Duration,
    /// Batches buffered between two stages: the backpressure bound.
    pub channel_capacity: usize,
    /// Concurrent receive loops on the source.
    pub pollers: usize,
    /// Attempts to publish one batch of invalidations before its messages are released.
    pub publish_attempts: u32,
    /// First retry delay; later ones back off exponentially with full jitter.
    pub retry_base: Duration,
    pub parse_limits: catalog_domain::ParseLimits,
    /// Events written to the store per second at most (0: no limit): the write budget that
    /// keeps a recovery from stampeding the store.
    pub store_max_writes_per_sec: u32,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            receive_batch: DEFAULT_RECEIVE_BATCH,
            write_batch: DEFAULT_WRITE_BATCH,
            write_batch_timeout: DEFAULT_WRITE_BATCH_TIMEOUT,
            channel_capacity: DEFAULT_CHANNEL_CAPACITY,
            pollers: DEFAULT_POLLERS,
            publish_attempts: DEFAULT_PUBLISH_ATTEMPTS,
            retry_base: DEFAULT_RETRY_BASE,
            parse_limits: catalog_domain::ParseLimits::default(),
            store_max_writes_per_sec: 0,
        }
    }
}
