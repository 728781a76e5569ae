//! OTLP metrics from the Prometheus registry: every interval the registry `/metrics` serves is
//! read, turned into OpenTelemetry's data model and POSTed as OTLP/HTTP protobuf.
//!
//! Why not the OpenTelemetry SDK's meters: the figures live in prometheus-client, whose
//! pre-resolved handles are one atomic add on the read path (a meter with attributes is a hash
//! lookup per request), and the SDK exports only what its own instruments aggregated. The
//! mapping is the one the Collector's Prometheus receiver applies: a counter is a cumulative
//! monotonic sum, a gauge a gauge, a histogram a cumulative explicit-bucket histogram.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
    metric, number_data_point,
};
use prometheus_client::registry::Registry;
use prost::Message as _;
use tokio_util::sync::CancellationToken;

/// `OTEL_METRIC_EXPORT_INTERVAL`'s default in the specification.
pub const DEFAULT_INTERVAL_MS: u64 = 60_000;
/// How long one export may take (`OTEL_EXPORTER_OTLP_TIMEOUT`'s default).
pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;

/// Where and how often the figures go.
#[derive(Debug, Clone)]
pub struct MetricsExport {
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub interval: Duration,
    pub timeout: Duration,
}

impl MetricsExport {
    /// A thread of its own: a blocking HTTP client, and whatever the collector does, the
    /// runtime's threads never wait for it.
    pub fn spawn(
        self,
        registry: Arc<Registry>,
        resource: &opentelemetry_sdk::Resource,
        stop: CancellationToken,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let resource = proto_resource(resource);
        std::thread::Builder::new().name("otlp-metrics".into()).spawn(move || self.run(&registry, resource, &stop))
    }

    fn run(self, registry: &Registry, resource: opentelemetry_proto::tonic::resource::v1::Resource, stop: &CancellationToken) {
        let client = match reqwest::blocking::Client::builder().timeout(self.timeout).build() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "the OTLP metrics client could not be built; metrics are not exported");
                return;
            }
        };
        let started = unix_nanos(SystemTime::now());
        let mut failing = false;
        loop {
            let stopping = wait(stop, self.interval);
            let request = export_request(registry, &resource, started, unix_nanos(SystemTime::now()));
            let mut post = client.post(&self.url).header("content-type", "application/x-protobuf").body(request.encode_to_vec());
            for (k, v) in &self.headers {
                post = post.header(k, v);
            }
            // One line when exports start failing and one when they recover, not one a minute.
            match post.send().and_then(reqwest::blocking::Response::error_for_status) {
                Ok(_) if failing => {
                    failing = false;
                    tracing::info!(url = %self.url, "OTLP metrics export works again");
                }
                Ok(_) => {}
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(url = %self.url, error = %e, "OTLP metrics export failed; retrying every interval");
                }
                Err(_) => {}
            }
            if stopping {
                return;
            }
        }
    }
}

/// Sleeps `interval`, or less if `stop` fires; true when stopping (one last export follows).
fn wait(stop: &CancellationToken, interval: Duration) -> bool {
    let step = Duration::from_millis(50).min(interval);
    let deadline = std::time::Instant::now() + interval;
    while std::time::Instant::now() < deadline {
        if stop.is_cancelled() {
            return true;
        }
        std::thread::sleep(step);
    }
    stop.is_cancelled()
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

fn proto_resource(resource: &opentelemetry_sdk::Resource) -> opentelemetry_proto::tonic::resource::v1::Resource {
    let attributes = resource.iter().map(|(k, v)| string_kv(k.as_str(), &v.to_string())).collect();
    opentelemetry_proto::tonic::resource::v1::Resource { attributes, ..Default::default() }
}

fn string_kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(any_value::Value::StringValue(value.to_owned())) }),
        ..Default::default()
    }
}

/// The registry as one OTLP export request.
pub fn export_request(
    registry: &Registry,
    resource: &opentelemetry_proto::tonic::resource::v1::Resource,
    start_nanos: u64,
    now_nanos: u64,
) -> ExportMetricsServiceRequest {
    let mut text = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, registry);
    let metrics = parse(&text).into_iter().filter_map(|f| f.into_metric(start_nanos, now_nanos)).collect();
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(resource.clone()),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(InstrumentationScope {
                    name: "catalog".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                metrics,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// A sample's labels, in the order written.
type Labels = Vec<(String, String)>;
/// One sample line: its name (with `_total`, `_bucket`… suffixes), labels and value.
type Sample = (String, Labels, f64);

/// One metric family as the text exposition has it.
#[derive(Debug, Default, PartialEq)]
struct Family {
    name: String,
    kind: String,
    help: String,
    samples: Vec<Sample>,
}

/// Reads the OpenMetrics text prometheus-client writes: `# HELP`, `# TYPE`, samples, `# EOF`.
fn parse(text: &str) -> Vec<Family> {
    let mut families: Vec<Family> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            families.push(Family { name: name.to_owned(), help: help.to_owned(), ..Default::default() });
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            match families.last_mut() {
                Some(f) if f.name == name => f.kind = kind.to_owned(),
                _ => families.push(Family { name: name.to_owned(), kind: kind.to_owned(), ..Default::default() }),
            }
        } else if line.starts_with('#') || line.is_empty() {
            continue;
        } else if let (Some(sample), Some(family)) = (parse_sample(line), families.last_mut()) {
            family.samples.push(sample);
        }
    }
    families
}

fn parse_sample(line: &str) -> Option<Sample> {
    let (name, rest) = match line.find('{') {
        Some(i) => (&line[..i], &line[i..]),
        None => line.split_once(' ')?,
    };
    let (labels, value) = if let Some(inner) = rest.strip_prefix('{') {
        let (labels, after) = parse_labels(inner)?;
        (labels, after)
    } else {
        (Vec::new(), rest)
    };
    let value = value.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some((name.trim().to_owned(), labels, value))
}

/// `k="v",k2="v2"}` with `\\`, `\"` and `\n` escapes; returns the labels and what follows `}`.
fn parse_labels(text: &str) -> Option<(Labels, &str)> {
    let mut labels = Vec::new();
    let mut rest = text;
    loop {
        rest = rest.trim_start_matches(',');
        if let Some(after) = rest.strip_prefix('}') {
            return Some((labels, after));
        }
        let (key, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break i,
                c => value.push(c),
            }
        };
        labels.push((key.to_owned(), value));
        rest = &after[end + 1..];
    }
}

fn attributes(labels: &[(String, String)]) -> Vec<KeyValue> {
    labels.iter().map(|(k, v)| string_kv(k, v)).collect()
}

impl Family {
    fn into_metric(self, start: u64, now: u64) -> Option<Metric> {
        let point = |labels: &[(String, String)], value: f64| NumberDataPoint {
            attributes: attributes(labels),
            start_time_unix_nano: start,
            time_unix_nano: now,
            value: Some(number_data_point::Value::AsDouble(value)),
            ..Default::default()
        };
        let data = match self.kind.as_str() {
            "counter" => metric::Data::Sum(Sum {
                data_points: self
                    .samples
                    .iter()
                    .filter(|(n, _, _)| n.ends_with("_total"))
                    .map(|(_, l, v)| point(l, *v))
                    .collect(),
                aggregation_temporality: AggregationTemporality::Cumulative as i32,
                is_monotonic: true,
            }),
            "gauge" | "unknown" | "info" => {
                metric::Data::Gauge(Gauge { data_points: self.samples.iter().map(|(_, l, v)| point(l, *v)).collect() })
            }
            "histogram" => metric::Data::Histogram(Histogram {
                data_points: histogram_points(&self.name, &self.samples, start, now),
                aggregation_temporality: AggregationTemporality::Cumulative as i32,
            }),
            _ => return None,
        };
        Some(Metric { name: self.name, description: self.help, data: Some(data), ..Default::default() })
    }
}

/// Groups a histogram's `_bucket`, `_sum` and `_count` samples by their other labels and turns
/// cumulative bucket counts into OTLP's per-bucket counts.
fn histogram_points(name: &str, samples: &[Sample], start: u64, now: u64) -> Vec<HistogramDataPoint> {
    #[derive(Default)]
    struct Series {
        buckets: Vec<(f64, f64)>,
        sum: f64,
        count: f64,
    }
    let mut series: BTreeMap<Labels, Series> = BTreeMap::new();
    for (sample, labels, value) in samples {
        let suffix = sample.strip_prefix(name).unwrap_or_default();
        let mut key: Labels = labels.iter().filter(|(k, _)| k != "le").cloned().collect();
        key.sort();
        let entry = series.entry(key).or_default();
        match suffix {
            "_bucket" => {
                let le = labels.iter().find(|(k, _)| k == "le").and_then(|(_, v)| match v.as_str() {
                    "+Inf" => Some(f64::INFINITY),
                    v => v.parse().ok(),
                });
                if let Some(le) = le {
                    entry.buckets.push((le, *value));
                }
            }
            "_sum" => entry.sum = *value,
            "_count" => entry.count = *value,
            _ => {}
        }
    }
    series
        .into_iter()
        .map(|(labels, mut s)| {
            s.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            let explicit_bounds = s.buckets.iter().map(|b| b.0).filter(|b| b.is_finite()).collect();
            let mut previous = 0.0;
            let mut bucket_counts: Vec<u64> = s
                .buckets
                .iter()
                .map(|&(_, cumulative)| {
                    let n = (cumulative - previous).max(0.0) as u64;
                    previous = cumulative;
                    n
                })
                .collect();
            // The +Inf bucket closes the list; without it the overflow is whatever the count adds.
            if s.buckets.last().is_none_or(|b| b.0.is_finite()) {
                bucket_counts.push((s.count - previous).max(0.0) as u64);
            }
            HistogramDataPoint {
                attributes: attributes(&labels),
                start_time_unix_nano: start,
                time_unix_nano: now,
                count: s.count as u64,
                sum: Some(s.sum),
                bucket_counts,
                explicit_bounds,
                ..Default::default()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::EncodeLabelSet;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family as PromFamily;
    use prometheus_client::metrics::gauge::Gauge as PromGauge;
    use prometheus_client::metrics::histogram::Histogram as PromHistogram;

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct Labels {
        route: String,
    }

    fn registry() -> Registry {
        let mut r = Registry::default();
        let calls: PromFamily<Labels, Counter> = PromFamily::default();
        calls.get_or_create(&Labels { route: "a \"quoted\" \\ one".into() }).inc_by(3);
        r.register("demo_calls", "Calls", calls);
        let depth: PromGauge = PromGauge::default();
        depth.set(-4);
        r.register("demo_depth", "Depth", depth);
        let h = PromHistogram::new([0.1, 1.0]);
        for v in [0.05, 0.5, 0.5, 7.0] {
            h.observe(v);
        }
        r.register("demo_seconds", "Time", h);
        r
    }

    fn metric<'a>(req: &'a ExportMetricsServiceRequest, name: &str) -> &'a metric::Data {
        let m =
            req.resource_metrics[0].scope_metrics[0].metrics.iter().find(|m| m.name == name).unwrap_or_else(|| panic!("{name}"));
        m.data.as_ref().unwrap()
    }

    #[test]
    fn counters_gauges_and_histograms_map_to_otlp() {
        let req = export_request(&registry(), &Default::default(), 1, 2);
        let metric::Data::Sum(sum) = metric(&req, "demo_calls") else { panic!("a counter is a sum") };
        assert!(sum.is_monotonic);
        assert_eq!(sum.aggregation_temporality, AggregationTemporality::Cumulative as i32);
        let p = &sum.data_points[0];
        assert_eq!(p.value, Some(number_data_point::Value::AsDouble(3.0)));
        assert_eq!(p.attributes[0].key, "route");
        let Some(any_value::Value::StringValue(v)) = p.attributes[0].value.as_ref().and_then(|v| v.value.clone()) else {
            panic!()
        };
        assert_eq!(v, "a \"quoted\" \\ one", "escapes are undone");
        let metric::Data::Gauge(g) = metric(&req, "demo_depth") else { panic!("a gauge") };
        assert_eq!(g.data_points[0].value, Some(number_data_point::Value::AsDouble(-4.0)));
        let metric::Data::Histogram(h) = metric(&req, "demo_seconds") else { panic!("a histogram") };
        let p = &h.data_points[0];
        assert_eq!((p.count, p.sum), (4, Some(8.05)));
        assert_eq!(p.explicit_bounds, [0.1, 1.0]);
        assert_eq!(p.bucket_counts, [1, 2, 1], "per bucket, the overflow last");
        assert_eq!((p.start_time_unix_nano, p.time_unix_nano), (1, 2));
    }

    #[test]
    fn the_request_round_trips_through_protobuf() {
        let req = export_request(&registry(), &Default::default(), 1, 2);
        let decoded = ExportMetricsServiceRequest::decode(req.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded, req);
    }
}
