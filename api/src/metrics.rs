//! HTTP metrics: requests by route and status, and server time by route.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteStatus {
    pub route: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: &'static str,
}

/// Microsecond-scale buckets: the read path's budget is far below a millisecond.
const SECONDS_BUCKETS: [f64; 12] = [5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 5e-3, 2e-2, 1e-1, 1.0];

fn new_histogram() -> Histogram {
    Histogram::new(SECONDS_BUCKETS)
}

#[derive(Clone, Debug)]
pub struct ApiMetrics {
    pub requests: Family<RouteStatus, Counter>,
    pub duration: Family<RouteLabel, Histogram, fn() -> Histogram>,
    pub cache_fills: Counter,
}

impl Default for ApiMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(new_histogram),
            cache_fills: Counter::default(),
        }
    }
}

impl ApiMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("catalog_http");
        r.register("requests", "HTTP requests by route and status", self.requests.clone());
        r.register("request_duration_seconds", "Server time per request, by route", self.duration.clone());
        r.register("cache_fills", "Read-model misses filled from the store (cache-aside)", self.cache_fills.clone());
    }

    pub fn observe(&self, route: &'static str, status: u16, started: std::time::Instant) {
        self.requests.get_or_create(&RouteStatus { route, status }).inc();
        self.duration.get_or_create(&RouteLabel { route }).observe(started.elapsed().as_secs_f64());
    }
}
