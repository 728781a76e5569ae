//! The seam between a backend and the process: each backend assembles one [`Assembly`], and
//! `serve` runs whichever it gets (HTTP started once, shutdown written once).
//!
//! - `embedded`: event log → pipeline → sled store → in-process bus → read model. No AWS
//!   type appears on this path.
//! - `aws`: SQS → pipeline → DynamoDB → EventBridge (worker role); per-instance invalidation
//!   queue → read model (api role).

pub mod aws;
pub mod background;
pub mod embedded;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use catalog_api::{Ingest, Readiness, Rebuilder, ViewFill};
use catalog_readmodel::ReadModel;
use prometheus_client::registry::Registry;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Work left for after the background tasks have drained: flushes, unsubscribing.
pub type FinishStep = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

/// One backend's process, assembled and running: what the BFF serves from, what runs beside
/// it, and how it stops.
pub struct Assembly {
    pub readmodel: ReadModel,
    /// `None` where this process does not take `POST /events`.
    pub ingest: Option<Arc<dyn Ingest>>,
    /// Cache-aside fills from the store on a read-model miss.
    pub fill: Option<Arc<dyn ViewFill>>,
    /// Online rebuilds of the read model (`POST /admin/rebuild`); `None` where none is served.
    pub rebuilder: Option<Arc<dyn Rebuilder>>,
    pub readiness: Arc<dyn Readiness>,
    /// Every metric the backend registered; the BFF adds its own.
    pub registry: Registry,
    /// Background tasks (pipeline, refresher, pollers, gauges): each ends once `stop` fires and
    /// its in-flight work is done; shutdown waits for them, bounded.
    pub tasks: Vec<JoinHandle<()>>,
    /// Fired when shutdown begins.
    pub stop: CancellationToken,
    /// Run in order once the tasks have drained.
    pub finish: Vec<FinishStep>,
}

/// `catalog_hot_views_*`: how the read model's in-memory views serve, read at each scrape; what
/// an operator sizes `--hot-views-mb` by.
fn register_hot_views(registry: &mut Registry, model: catalog_readmodel::ReadModel) {
    registry.register_collector(Box::new(HotViews(model)));
}

struct HotViews(catalog_readmodel::ReadModel);

impl std::fmt::Debug for HotViews {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HotViews").finish_non_exhaustive()
    }
}

impl prometheus_client::collector::Collector for HotViews {
    fn encode(&self, mut encoder: prometheus_client::encoding::DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::{counter::ConstCounter, gauge::ConstGauge};
        let stats = self.0.hot_stats();
        let gauge = |v: u64| ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
        for (name, help, value) in [
            ("catalog_hot_views_hits", "View reads served from memory", stats.hits),
            ("catalog_hot_views_misses", "View reads that went to sled", stats.misses),
        ] {
            let metric = ConstCounter::new(value);
            metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)?;
        }
        for (name, help, value) in [
            ("catalog_hot_views_bytes", "Bytes the views in memory take (at most --hot-views-mb)", stats.bytes),
            ("catalog_hot_views_entries", "Views held in memory", stats.entries),
        ] {
            let metric = gauge(value);
            metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)?;
        }
        Ok(())
    }
}

/// `catalog_storage_disk_bytes`: what the process's sled databases take on disk (embedded: log,
/// state, snapshot and views; AWS: the read model), read at each scrape.
fn register_disk_size(registry: &mut Registry, dbs: Vec<sled::Db>, log: Option<catalog_pipeline::embedded::EmbeddedLog>) {
    registry.register_collector(Box::new(DiskSize(dbs, log)));
}

struct DiskSize(Vec<sled::Db>, Option<catalog_pipeline::embedded::EmbeddedLog>);

impl std::fmt::Debug for DiskSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskSize").field("databases", &self.0.len()).finish()
    }
}

impl prometheus_client::collector::Collector for DiskSize {
    fn encode(&self, mut encoder: prometheus_client::encoding::DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        let Ok(sled) = self.0.iter().map(sled::Db::size_on_disk).sum::<Result<u64, _>>() else { return Ok(()) };
        let bytes = sled + self.1.as_ref().map_or(0, catalog_pipeline::embedded::EmbeddedLog::disk_bytes);
        let metric = prometheus_client::metrics::gauge::ConstGauge::new(i64::try_from(bytes).unwrap_or(i64::MAX));
        let help = "Bytes the data dir takes on disk (embedded: log segments, state, snapshot and views; AWS: the read model)";
        metric.encode(encoder.encode_descriptor("catalog_storage_disk_bytes", help, None, metric.metric_type())?)
    }
}
