//! An in-process OTLP/HTTP receiver: a real HTTP server on 127.0.0.1 that takes the protobuf
//! `POST /v1/traces` and `POST /v1/metrics` a collector would, decodes them and keeps them for
//! the test to read.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::metric;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use warp::Filter;

#[derive(Default)]
struct Received {
    spans: Vec<(HashMap<String, String>, Span)>,
    metrics: Vec<ExportMetricsServiceRequest>,
    /// Content types of the requests, to prove the protocol.
    content_types: Vec<String>,
}

#[derive(Clone)]
pub struct Receiver {
    pub endpoint: String,
    received: Arc<Mutex<Received>>,
}

pub fn value_text(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        _ => String::new(),
    }
}

pub fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes.iter().find(|kv| kv.key == key).map(|kv| value_text(&kv.value))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Starts the receiver on a free port; it runs until the test's runtime ends.
pub async fn start() -> Receiver {
    let received = Arc::new(Mutex::new(Received::default()));
    let kept = received.clone();
    let route =
        warp::post().and(warp::path!("v1" / String)).and(warp::header::<String>("content-type")).and(warp::body::bytes()).map(
            move |signal: String, content_type: String, body: bytes::Bytes| {
                let mut r = kept.lock().unwrap();
                r.content_types.push(content_type);
                match signal.as_str() {
                    "traces" => r.keep_spans(ExportTraceServiceRequest::decode(body).expect("a protobuf trace export")),
                    "metrics" => r.metrics.push(ExportMetricsServiceRequest::decode(body).expect("a protobuf metrics export")),
                    other => panic!("an export to /v1/{other}"),
                }
                warp::http::Response::builder().header("content-type", "application/x-protobuf").body(Vec::<u8>::new()).unwrap()
            },
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the OTLP receiver");
    let addr = listener.local_addr().expect("its address");
    tokio::spawn(warp::serve(route).incoming(listener).run());
    Receiver { endpoint: format!("http://{addr}"), received }
}

impl Received {
    /// Every span of an export, with its resource's attributes.
    fn keep_spans(&mut self, request: ExportTraceServiceRequest) {
        for rs in request.resource_spans {
            let resource: HashMap<String, String> = rs
                .resource
                .map(|r| r.attributes.into_iter().map(|kv| (kv.key, value_text(&kv.value))).collect())
                .unwrap_or_default();
            for ss in rs.scope_spans {
                self.spans.extend(ss.spans.into_iter().map(|s| (resource.clone(), s)));
            }
        }
    }
}

impl Receiver {
    pub fn spans(&self) -> Vec<(HashMap<String, String>, Span)> {
        self.received.lock().unwrap().spans.clone()
    }

    pub fn content_types(&self) -> Vec<String> {
        self.received.lock().unwrap().content_types.clone()
    }

    /// Waits (bounded) until `check` holds for the spans received so far.
    pub async fn spans_until(
        &self,
        what: &str,
        check: impl Fn(&[(HashMap<String, String>, Span)]) -> bool,
    ) -> Vec<(HashMap<String, String>, Span)> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let spans = self.spans();
            if check(&spans) {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} within 30 s; spans: {:#?}",
                spans.iter().map(|(_, s)| &s.name).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The newest exported value of each data point of `name`: (attributes, value; for a
    /// histogram its count).
    pub fn metric_points(&self, name: &str) -> Vec<(HashMap<String, String>, f64)> {
        let r = self.received.lock().unwrap();
        let Some(last) = r.metrics.iter().rev().find_map(|req| {
            req.resource_metrics
                .iter()
                .flat_map(|rm| &rm.scope_metrics)
                .flat_map(|sm| &sm.metrics)
                .find(|m| m.name == name)
                .cloned()
        }) else {
            return Vec::new();
        };
        use opentelemetry_proto::tonic::metrics::v1::number_data_point::Value;
        let labels = |attrs: &[opentelemetry_proto::tonic::common::v1::KeyValue]| -> HashMap<String, String> {
            attrs.iter().map(|kv| (kv.key.clone(), value_text(&kv.value))).collect()
        };
        let number = |v: &Option<Value>| match v {
            Some(Value::AsDouble(d)) => *d,
            Some(Value::AsInt(i)) => *i as f64,
            None => f64::NAN,
        };
        match last.data {
            Some(metric::Data::Sum(s)) => s.data_points.iter().map(|p| (labels(&p.attributes), number(&p.value))).collect(),
            Some(metric::Data::Gauge(g)) => g.data_points.iter().map(|p| (labels(&p.attributes), number(&p.value))).collect(),
            Some(metric::Data::Histogram(h)) => h.data_points.iter().map(|p| (labels(&p.attributes), p.count as f64)).collect(),
            _ => Vec::new(),
        }
    }

    /// Waits (bounded) until metric `name` has a point for which `check` holds.
    pub async fn metric_until(&self, name: &str, check: impl Fn(&HashMap<String, String>, f64) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.metric_points(name).iter().any(|(l, v)| check(l, *v)) {
                return;
            }
            assert!(Instant::now() < deadline, "metric {name} never matched within 30 s: {:?}", self.metric_points(name));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
