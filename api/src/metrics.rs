//! HTTP metrics: requests by route and status, and server time by route.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteStatus {
    pub route: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: u16,
}

/// Microsecond-scale buckets: the read path's budget is far below a millisecond.
const SECONDS_BUCKETS: [f64; 12] = [5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 5e-3, 2e-2, 1e-1, 1.0];

fn new_histogram() -> Histogram {
    Histogram::new(SECONDS_BUCKETS)
}

/// Handles of the busiest series, resolved once: a family lookup (lock + hash) per request
/// is measurable on a path this short.
#[derive(Clone, Debug)]
struct HotSeries {
    product_ok: Counter,
    product_not_modified: Counter,
    product_not_found: Counter,
    product_duration_ok: Histogram,
    product_duration_not_modified: Histogram,
    product_duration_not_found: Histogram,
    responses_ok: Counter,
    responses_not_modified: Counter,
    responses_not_found: Counter,
}

#[derive(Clone, Debug)]
pub struct ApiMetrics {
    pub requests: Family<RouteStatus, Counter>,
    /// Every answer the server sent, matched route or not (unknown paths, 405s, timeouts,
    /// malformed requests hyper refused).
    pub responses: Family<StatusLabel, Counter>,
    pub duration: Family<RouteStatus, Histogram, fn() -> Histogram>,
    pub cache_fills: Counter,
    /// Product lookups the read model answered.
    pub cache_hits: Counter,
    /// Product lookups the read model had no view for (then filled, or answered missing).
    pub cache_misses: Counter,
    pub connections_open: Gauge,
    pub connections_refused: Counter,
    pub connections_timed_out: Counter,
    hot: HotSeries,
}

impl Default for ApiMetrics {
    fn default() -> Self {
        let requests: Family<RouteStatus, Counter> = Family::default();
        let duration: Family<RouteStatus, Histogram, fn() -> Histogram> = Family::new_with_constructor(new_histogram);
        let timer = |status| duration.get_or_create(&RouteStatus { route: "get_product", status }).clone();
        let counter = |status| requests.get_or_create(&RouteStatus { route: "get_product", status }).clone();
        let responses: Family<StatusLabel, Counter> = Family::default();
        let response = |status| responses.get_or_create(&StatusLabel { status }).clone();
        let hot = HotSeries {
            product_ok: counter(200),
            product_not_modified: counter(304),
            product_not_found: counter(404),
            product_duration_ok: timer(200),
            product_duration_not_modified: timer(304),
            product_duration_not_found: timer(404),
            responses_ok: response(200),
            responses_not_modified: response(304),
            responses_not_found: response(404),
        };
        Self {
            requests,
            responses,
            duration,
            cache_fills: Counter::default(),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            connections_open: Gauge::default(),
            connections_refused: Counter::default(),
            connections_timed_out: Counter::default(),
            hot,
        }
    }
}

impl ApiMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("catalog_http");
        r.register("requests", "HTTP requests by route and status", self.requests.clone());
        r.register("responses", "Every HTTP answer by status, routed or not", self.responses.clone());
        r.register("request_duration_seconds", "Server time per request, by route and status", self.duration.clone());
        r.register("cache_fills", "Read-model misses filled from the store (cache-aside)", self.cache_fills.clone());
        let cache = registry.sub_registry_with_prefix("catalog_cache");
        cache.register("hits", "Product lookups the read model answered", self.cache_hits.clone());
        cache.register("misses", "Product lookups the read model had no view for", self.cache_misses.clone());
        let r = registry.sub_registry_with_prefix("catalog_http");
        r.register("connections_open", "Client connections open now", self.connections_open.clone());
        r.register(
            "connections_refused",
            "Connections closed at accept: the connection limit was reached",
            self.connections_refused.clone(),
        );
        r.register(
            "connections_timed_out",
            "Connections closed for a slow header or an idle keep-alive",
            self.connections_timed_out.clone(),
        );
    }

    /// Counts one answer of the server, whatever produced it.
    pub fn count_response(&self, status: u16) {
        match status {
            200 => self.hot.responses_ok.inc(),
            304 => self.hot.responses_not_modified.inc(),
            404 => self.hot.responses_not_found.inc(),
            _ => self.responses.get_or_create(&StatusLabel { status }).inc(),
        };
    }

    pub fn observe(&self, route: &'static str, status: u16, started: std::time::Instant) {
        let seconds = started.elapsed().as_secs_f64();
        if route == "get_product" {
            let hot = match status {
                200 => Some((&self.hot.product_ok, &self.hot.product_duration_ok)),
                304 => Some((&self.hot.product_not_modified, &self.hot.product_duration_not_modified)),
                404 => Some((&self.hot.product_not_found, &self.hot.product_duration_not_found)),
                _ => None,
            };
            if let Some((counter, timer)) = hot {
                counter.inc();
                timer.observe(seconds);
                return;
            }
        }
        self.requests.get_or_create(&RouteStatus { route, status }).inc();
        self.duration.get_or_create(&RouteStatus { route, status }).observe(seconds);
    }
}

/// `catalog_build_info{version}` (always 1) and the process's CPU, memory and descriptors,
/// read from `/proc` at each scrape.
pub fn register_process(registry: &mut Registry, version: &'static str, backend: &'static str) {
    let info: Family<BuildLabels, Gauge> = Family::default();
    info.get_or_create(&BuildLabels { version, backend }).set(1);
    registry.register("catalog_build_info", "The running build: version and backend (always 1)", info);
    registry.register_collector(Box::new(ProcessCollector));
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    backend: &'static str,
}

/// Linux's fixed clock tick for `/proc/<pid>/stat` times.
const TICKS_PER_SECOND: f64 = 100.0;

#[derive(Debug)]
struct ProcessCollector;

#[derive(Debug, Default, PartialEq)]
struct ProcessStats {
    cpu_seconds: Option<f64>,
    resident_bytes: Option<i64>,
    open_fds: Option<i64>,
    max_fds: Option<i64>,
}

impl ProcessStats {
    fn read() -> Self {
        let stat = std::fs::read_to_string("/proc/self/stat").ok();
        let status = std::fs::read_to_string("/proc/self/status").ok();
        Self {
            cpu_seconds: stat.as_deref().and_then(cpu_seconds),
            resident_bytes: status.as_deref().and_then(resident_bytes),
            open_fds: std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count() as i64),
            max_fds: crate::server::open_file_limit().map(|n| n as i64),
        }
    }
}

/// CPU seconds (utime + stime, the 14th and 15th fields) of a `/proc/<pid>/stat` text; the
/// command name before them may hold spaces. The ingest bench reads the server's with it too.
pub fn cpu_seconds(stat: &str) -> Option<f64> {
    Some((stat_ticks(stat, 11)? + stat_ticks(stat, 12)?) as f64 / TICKS_PER_SECOND)
}

/// Of those, the kernel's part (stime): the ingest bench prints it beside the total.
pub fn system_seconds(stat: &str) -> Option<f64> {
    Some(stat_ticks(stat, 12)? as f64 / TICKS_PER_SECOND)
}

/// The `index`th field after the command name, in clock ticks.
fn stat_ticks(stat: &str, index: usize) -> Option<u64> {
    stat.rsplit_once(')')?.1.split_whitespace().nth(index)?.parse().ok()
}

fn resident_bytes(status: &str) -> Option<i64> {
    let kib: i64 = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}

impl prometheus_client::collector::Collector for ProcessCollector {
    fn encode(&self, mut encoder: prometheus_client::encoding::DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        let stats = ProcessStats::read();
        if let Some(v) = stats.cpu_seconds {
            let metric = ConstCounter::new(v);
            metric.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "User and system CPU time",
                None,
                metric.metric_type(),
            )?)?;
        }
        let gauges = [
            ("process_resident_memory_bytes", "Resident memory", stats.resident_bytes),
            ("process_open_fds", "Open file descriptors", stats.open_fds),
            ("process_max_fds", "The open-file limit", stats.max_fds),
        ];
        for (name, help, value) in gauges {
            if let Some(v) = value {
                let metric = ConstGauge::new(v);
                metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_and_status_are_read_as_the_kernel_writes_them() {
        let stat = "4242 (cat alog) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 1234 1000 500";
        assert_eq!(cpu_seconds(stat), Some(3.0));
        assert_eq!(system_seconds(stat), Some(0.5));
        assert_eq!(resident_bytes("Name:\tcatalog\nVmRSS:\t  2048 kB\nThreads:\t3\n"), Some(2048 * 1024));
        assert_eq!(resident_bytes("Name:\tcatalog\n"), None);
    }

    #[test]
    fn every_figure_is_there_on_linux() {
        if std::path::Path::new("/proc/self/stat").exists() {
            let stats = ProcessStats::read();
            assert!(stats.cpu_seconds.is_some() && stats.resident_bytes.is_some_and(|b| b > 0));
            assert!(stats.open_fds.is_some_and(|n| n > 0));
        }
    }
}
