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
pub struct RouteLabel {
    pub route: &'static str,
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
    product_duration: Histogram,
}

#[derive(Clone, Debug)]
pub struct ApiMetrics {
    pub requests: Family<RouteStatus, Counter>,
    pub duration: Family<RouteLabel, Histogram, fn() -> Histogram>,
    pub cache_fills: Counter,
    pub connections_open: Gauge,
    pub connections_refused: Counter,
    pub connections_timed_out: Counter,
    hot: HotSeries,
}

impl Default for ApiMetrics {
    fn default() -> Self {
        let requests: Family<RouteStatus, Counter> = Family::default();
        let duration: Family<RouteLabel, Histogram, fn() -> Histogram> = Family::new_with_constructor(new_histogram);
        let counter = |status| requests.get_or_create(&RouteStatus { route: "get_product", status }).clone();
        let hot = HotSeries {
            product_ok: counter(200),
            product_not_modified: counter(304),
            product_not_found: counter(404),
            product_duration: duration.get_or_create(&RouteLabel { route: "get_product" }).clone(),
        };
        Self {
            requests,
            duration,
            cache_fills: Counter::default(),
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
        r.register("request_duration_seconds", "Server time per request, by route", self.duration.clone());
        r.register("cache_fills", "Read-model misses filled from the store (cache-aside)", self.cache_fills.clone());
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

    pub fn observe(&self, route: &'static str, status: u16, started: std::time::Instant) {
        let seconds = started.elapsed().as_secs_f64();
        if route == "get_product" {
            let counter = match status {
                200 => Some(&self.hot.product_ok),
                304 => Some(&self.hot.product_not_modified),
                404 => Some(&self.hot.product_not_found),
                _ => None,
            };
            match counter {
                Some(c) => {
                    c.inc();
                }
                None => {
                    self.requests.get_or_create(&RouteStatus { route, status }).inc();
                }
            }
            self.hot.product_duration.observe(seconds);
            return;
        }
        self.requests.get_or_create(&RouteStatus { route, status }).inc();
        self.duration.get_or_create(&RouteLabel { route }).observe(seconds);
    }
}
