//! Logs, traces and metrics export, set up once per process from the standard OpenTelemetry
//! environment (`OTEL_EXPORTER_OTLP_ENDPOINT` and friends). No endpoint, no export: then not
//! even a span is created.
//!
//! - Logs go to stderr as text or JSON; JSON lines carry the trace and span ids.
//! - Traces: our spans (target [`SPAN_TARGET`]) and the AWS SDK's operation spans, batched on
//!   the SDK's own thread and sent over OTLP/HTTP. A full queue drops spans, so a missing or
//!   slow collector never holds up a request or a batch.
//! - Metrics: the Prometheus registry that `/metrics` serves, sent over OTLP/HTTP every
//!   `OTEL_METRIC_EXPORT_INTERVAL` (`metrics.rs`).

mod metrics;

use std::time::Duration;

use anyhow::{Context as _, bail};
use catalog_pipeline::trace::SPAN_TARGET;
use opentelemetry::KeyValue;
use opentelemetry::trace::{SpanKind, TracerProvider as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanProcessor};
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::cli::LogFormat;
pub use metrics::MetricsExport;

/// sled's info lines are noise to an operator; so are the AWS SDK's warnings that the EC2
/// metadata service cannot be reached, on any machine that is not an EC2 instance.
const DEFAULT_LOG_FILTER: &str = "info,sled=warn,aws_config::imds=error";

/// `service.name` when neither `OTEL_SERVICE_NAME` nor `OTEL_RESOURCE_ATTRIBUTES` names one.
const DEFAULT_SERVICE_NAME: &str = "catalog";

/// The only OTLP protocol this build speaks (gRPC would compile a second HTTP/2 stack).
const PROTOCOL: &str = "http/protobuf";

/// The AWS SDK crates whose operation spans (`DynamoDB.BatchWriteItem`, …) are exported.
const AWS_SDK_TARGETS: [&str; 3] = ["aws_sdk_dynamodb", "aws_sdk_sqs", "aws_sdk_eventbridge"];

/// What the process exports; shut it down last, so the final spans and figures are sent.
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
    metrics: Option<MetricsExport>,
    resource: Resource,
}

impl Telemetry {
    /// Sends `registry`'s figures every interval until `stop` fires, then once more.
    pub fn export_metrics(
        &self,
        registry: std::sync::Arc<prometheus_client::registry::Registry>,
        stop: tokio_util::sync::CancellationToken,
    ) -> Option<std::thread::JoinHandle<()>> {
        let export = self.metrics.clone()?;
        match export.spawn(registry, &self.resource, stop) {
            Ok(thread) => Some(thread),
            Err(e) => {
                tracing::error!(error = %e, "starting the OTLP metrics exporter failed; metrics are not exported");
                None
            }
        }
    }

    pub fn shutdown(self) {
        if let Some(tracer) = self.tracer
            && let Err(e) = tracer.shutdown()
        {
            tracing::warn!(error = %e, "flushing the last spans failed");
        }
    }
}

/// Reads the OpenTelemetry environment and installs the log (and, when exporting, trace)
/// subscriber. Bad settings are an error naming the variable, before anything starts.
pub fn init(format: LogFormat, service_version: &'static str) -> anyhow::Result<Telemetry> {
    let env = Env::from_process();
    let resource = resource(service_version);
    let tracer = match env.traces_enabled()? {
        true => Some(tracer_provider(resource.clone())?),
        false => None,
    };
    let metrics = env.metrics_export()?;

    let filter = tracing_subscriber::EnvFilter::try_from_env("CATALOG_LOG").unwrap_or_else(|_| DEFAULT_LOG_FILTER.into());
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match format {
        LogFormat::Text => logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).boxed(),
        LogFormat::Json => {
            logs.json().event_format(JsonWithTrace(tracing_subscriber::fmt::format().json().flatten_event(true))).boxed()
        }
    };
    let logs = logs.with_filter(EventsOnly(filter));
    let subscriber = tracing_subscriber::registry().with(logs);
    // Two subscribers, not an `Option` layer: a `None` layer answers "always" for every callsite,
    // which enabled (and so created) every span with nothing to export it (measured: 4–6% of the
    // read path).
    match &tracer {
        Some(provider) => {
            subscriber.with(tracing_opentelemetry::layer().with_tracer(provider.tracer("catalog")).with_filter(Traced)).try_init()
        }
        None => subscriber.try_init(),
    }
    .context("installing the log subscriber")?;
    Ok(Telemetry { tracer, metrics, resource })
}

fn resource(service_version: &'static str) -> Resource {
    // The default detectors read OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; ours only fill
    // in what they leave unset.
    let attributes = std::env::var("OTEL_RESOURCE_ATTRIBUTES").unwrap_or_default();
    let declared = |key: &str| attributes.split(',').any(|kv| kv.split_once('=').is_some_and(|(k, _)| k.trim() == key));
    let mut builder = Resource::builder();
    let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.is_empty()) || declared("service.name");
    if !named {
        builder = builder.with_service_name(DEFAULT_SERVICE_NAME);
    }
    if !declared("service.version") {
        builder = builder.with_attribute(KeyValue::new("service.version", service_version));
    }
    builder.build()
}

fn tracer_provider(resource: Resource) -> anyhow::Result<SdkTracerProvider> {
    // Endpoint, headers, timeout and compression come from the OTEL_EXPORTER_OTLP_* variables.
    let exporter = opentelemetry_otlp::SpanExporter::builder().with_http().build().context("building the OTLP span exporter")?;
    // The batch processor runs on a thread of its own with a bounded queue (OTEL_BSP_*): a
    // collector that is down or slow costs dropped spans, never a wait.
    let batch = opentelemetry_sdk::trace::BatchSpanProcessor::builder(exporter).build();
    // The sampler comes from OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG (default: parent-based, always on).
    Ok(SdkTracerProvider::builder().with_resource(resource).with_span_processor(AwsClientSpans(batch)).build())
}

/// The AWS SDK names its operation spans `DynamoDB.BatchWriteItem` and gives them `rpc.*`
/// attributes but no kind: this makes them client spans with the database and messaging
/// semantic conventions, on their way to the exporter.
#[derive(Debug)]
struct AwsClientSpans<P>(P);

impl<P: SpanProcessor> SpanProcessor for AwsClientSpans<P> {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &opentelemetry::Context) {
        self.0.on_start(span, cx);
    }

    fn on_end(&self, mut span: SpanData) {
        if let Some((service, operation)) = span.name.split_once('.')
            && span.attributes.iter().any(|kv| kv.key.as_str() == "rpc.system")
        {
            // Calls outside any traced work (long polls, heartbeats, queue gauges) would each
            // be a trace of their own, several a second: they are counted in the metrics instead.
            if span.parent_span_id == opentelemetry::trace::SpanId::INVALID {
                return;
            }
            let extra = aws_semantics(service, operation);
            if !extra.is_empty() {
                span.span_kind = SpanKind::Client;
                span.attributes.extend(extra);
            }
        }
        self.0.on_end(span);
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.0.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.0.set_resource(resource);
    }
}

/// Semantic-convention attributes of one AWS operation.
fn aws_semantics(service: &str, operation: &str) -> Vec<KeyValue> {
    let operation = operation.to_owned();
    match service {
        "DynamoDB" => vec![
            KeyValue::new("db.system", "dynamodb"),
            KeyValue::new("db.system.name", "aws.dynamodb"),
            KeyValue::new("db.operation.name", operation),
        ],
        "SQS" => {
            let kind = match operation.as_str() {
                "SendMessage" | "SendMessageBatch" => "send",
                "ReceiveMessage" => "receive",
                "DeleteMessage" | "DeleteMessageBatch" => "settle",
                _ => "",
            };
            let mut kv = vec![KeyValue::new("messaging.system", "aws_sqs"), KeyValue::new("messaging.operation.name", operation)];
            if !kind.is_empty() {
                kv.push(KeyValue::new("messaging.operation.type", kind));
            }
            kv
        }
        "EventBridge" => {
            vec![KeyValue::new("messaging.system", "aws_eventbridge"), KeyValue::new("messaging.operation.name", operation)]
        }
        _ => Vec::new(),
    }
}

/// The OpenTelemetry variables this process reads itself (the exporter reads the rest).
struct Env {
    get: fn(&str) -> Option<String>,
}

impl Env {
    fn from_process() -> Self {
        Self { get: |name| std::env::var(name).ok().filter(|v| !v.trim().is_empty()) }
    }

    fn var(&self, name: &str) -> Option<String> {
        (self.get)(name)
    }

    fn disabled(&self) -> bool {
        self.var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
    }

    fn exporter_off(&self, signal_var: &str) -> anyhow::Result<bool> {
        match self.var(signal_var).as_deref().map(str::trim) {
            None | Some("otlp") => Ok(false),
            Some("none") => Ok(true),
            Some(other) => bail!("{signal_var}={other}: this build exports with otlp (or none)"),
        }
    }

    fn check_protocol(&self, signal_var: &str) -> anyhow::Result<()> {
        for name in [signal_var, "OTEL_EXPORTER_OTLP_PROTOCOL"] {
            if let Some(p) = self.var(name) {
                if p.trim() != PROTOCOL {
                    bail!("{name}={p}: this build speaks {PROTOCOL} only (the collector's OTLP/HTTP port, 4318)");
                }
                return Ok(());
            }
        }
        Ok(())
    }

    fn traces_enabled(&self) -> anyhow::Result<bool> {
        let endpoint = self.var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| self.var("OTEL_EXPORTER_OTLP_ENDPOINT"));
        if endpoint.is_none() || self.disabled() || self.exporter_off("OTEL_TRACES_EXPORTER")? {
            return Ok(false);
        }
        self.check_protocol("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")?;
        Ok(true)
    }

    fn metrics_export(&self) -> anyhow::Result<Option<MetricsExport>> {
        let url = match (self.var("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"), self.var("OTEL_EXPORTER_OTLP_ENDPOINT")) {
            (Some(url), _) => url,
            (None, Some(base)) => format!("{}/v1/metrics", base.trim_end_matches('/')),
            (None, None) => return Ok(None),
        };
        if self.disabled() || self.exporter_off("OTEL_METRICS_EXPORTER")? {
            return Ok(None);
        }
        self.check_protocol("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL")?;
        let millis = |names: &[&str], default: u64| -> anyhow::Result<Duration> {
            for name in names {
                if let Some(v) = self.var(name) {
                    let ms: u64 = v.trim().parse().with_context(|| format!("{name}={v}: expected milliseconds"))?;
                    if ms == 0 {
                        bail!("{name}=0: must be at least 1 ms");
                    }
                    return Ok(Duration::from_millis(ms));
                }
            }
            Ok(Duration::from_millis(default))
        };
        let headers = self.var("OTEL_EXPORTER_OTLP_METRICS_HEADERS").or_else(|| self.var("OTEL_EXPORTER_OTLP_HEADERS"));
        Ok(Some(MetricsExport {
            url,
            headers: parse_headers(headers.as_deref().unwrap_or(""))?,
            interval: millis(&["OTEL_METRIC_EXPORT_INTERVAL"], metrics::DEFAULT_INTERVAL_MS)?,
            timeout: millis(
                &["OTEL_METRIC_EXPORT_TIMEOUT", "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"],
                metrics::DEFAULT_TIMEOUT_MS,
            )?,
        }))
    }
}

/// `key1=value1,key2=value2`, values percent-decoded (the OTLP exporter's own format).
fn parse_headers(text: &str) -> anyhow::Result<Vec<(String, String)>> {
    text.split(',')
        .filter(|pair| !pair.trim().is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').with_context(|| format!("OTLP header {pair:?}: expected key=value"))?;
            let v = percent_encoding::percent_decode_str(v.trim()).decode_utf8_lossy().into_owned();
            Ok((k.trim().to_owned(), v))
        })
        .collect()
}

/// The log layer's filter: the `CATALOG_LOG` directives, for events only. Our spans exist for
/// the trace exporter; keeping them from the log layer keeps the text logs as they were. Both
/// answers are static per callsite (never for a span, the env filter's for an event) and the
/// env filter's level is the hint: a closure filter would make every callsite, every request's
/// `info_span!` and `debug!` among them, ask again each time (measured: 7–12% off the read path).
struct EventsOnly(tracing_subscriber::EnvFilter);

impl<S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>> tracing_subscriber::layer::Filter<S>
    for EventsOnly
{
    fn enabled(&self, meta: &tracing::Metadata<'_>, cx: &tracing_subscriber::layer::Context<'_, S>) -> bool {
        // Events, and the `enabled!` hints that guard them, which are not events themselves.
        !meta.is_span() && tracing_subscriber::layer::Filter::enabled(&self.0, meta, cx)
    }

    fn callsite_enabled(&self, meta: &'static tracing::Metadata<'static>) -> tracing::subscriber::Interest {
        if meta.is_span() {
            return tracing::subscriber::Interest::never();
        }
        tracing_subscriber::layer::Filter::<S>::callsite_enabled(&self.0, meta)
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        tracing_subscriber::layer::Filter::<S>::max_level_hint(&self.0)
    }
}

/// The trace layer's filter: our spans and the AWS SDK's operation spans; warnings and errors
/// as events of the span they happen in. Static per callsite, like [`EventsOnly`].
struct Traced;

impl Traced {
    fn wants(meta: &tracing::Metadata<'_>) -> bool {
        if meta.is_span() {
            let crate_name = meta.target().split("::").next().unwrap_or_default();
            meta.target() == SPAN_TARGET || AWS_SDK_TARGETS.contains(&crate_name)
        } else {
            *meta.level() <= tracing::Level::WARN
        }
    }
}

impl<S> tracing_subscriber::layer::Filter<S> for Traced {
    fn enabled(&self, meta: &tracing::Metadata<'_>, _: &tracing_subscriber::layer::Context<'_, S>) -> bool {
        Self::wants(meta)
    }

    fn callsite_enabled(&self, meta: &'static tracing::Metadata<'static>) -> tracing::subscriber::Interest {
        if Self::wants(meta) { tracing::subscriber::Interest::always() } else { tracing::subscriber::Interest::never() }
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        // The SDK's operation spans are at debug.
        Some(tracing::level_filters::LevelFilter::DEBUG)
    }
}

/// tracing-subscriber's JSON line, with the OpenTelemetry trace and span ids of the span the
/// event happened in, so a log line leads to its trace.
struct JsonWithTrace(tracing_subscriber::fmt::format::Format<tracing_subscriber::fmt::format::Json>);

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for JsonWithTrace
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let mut line = String::new();
        self.0.format_event(ctx, tracing_subscriber::fmt::format::Writer::new(&mut line), event)?;
        match catalog_pipeline::trace::current() {
            Some(sc) => match line.trim_end().strip_suffix('}') {
                Some(head) => {
                    writeln!(writer, "{head},\"trace_id\":\"{}\",\"span_id\":\"{}\"}}", sc.trace_id(), sc.span_id())
                }
                None => writer.write_str(&line),
            },
            None => writer.write_str(&line),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &'static [(&'static str, &'static str)]) -> Env {
        // A function pointer cannot capture: the table lives in a static of the test.
        thread_local!(static VARS: std::cell::Cell<&'static [(&'static str, &'static str)]> = const { std::cell::Cell::new(&[]) });
        VARS.with(|v| v.set(vars));
        Env { get: |name| VARS.with(|v| v.get().iter().find(|(k, _)| *k == name).map(|(_, v)| (*v).to_owned())) }
    }

    #[test]
    fn without_an_exporter_no_span_is_even_created() {
        // The one test here that installs the process's subscriber, as `main` does.
        assert!(std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_none());
        let telemetry = init(LogFormat::Text, "test").unwrap();
        let span = tracing::info_span!(target: SPAN_TARGET, "HTTP request", http.route = "/x");
        assert!(span.is_disabled(), "a span was created with nothing to export it");
        assert!(tracing::enabled!(tracing::Level::WARN), "logs still flow");
        telemetry.shutdown();
    }

    #[test]
    fn no_endpoint_means_no_export() {
        let e = env(&[]);
        assert!(!e.traces_enabled().unwrap());
        assert!(e.metrics_export().unwrap().is_none());
    }

    #[test]
    fn the_generic_endpoint_serves_both_signals_with_their_paths() {
        let e = env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318/"), ("OTEL_METRIC_EXPORT_INTERVAL", "500")]);
        assert!(e.traces_enabled().unwrap());
        let m = e.metrics_export().unwrap().unwrap();
        assert_eq!(m.url, "http://127.0.0.1:4318/v1/metrics");
        assert_eq!(m.interval, Duration::from_millis(500));
        assert_eq!(m.timeout, Duration::from_millis(metrics::DEFAULT_TIMEOUT_MS));
    }

    #[test]
    fn signal_settings_win_and_none_turns_a_signal_off() {
        let e = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4318"),
            ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "http://b:4318/custom"),
            ("OTEL_TRACES_EXPORTER", "none"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "x-key=a%20b, other=1"),
        ]);
        assert!(!e.traces_enabled().unwrap());
        let m = e.metrics_export().unwrap().unwrap();
        assert_eq!(m.url, "http://b:4318/custom");
        assert_eq!(m.headers, [("x-key".to_owned(), "a b".to_owned()), ("other".to_owned(), "1".to_owned())]);
        assert!(!env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a"), ("OTEL_SDK_DISABLED", "true")]).traces_enabled().unwrap());
    }

    #[test]
    fn unsupported_settings_are_named() {
        let e = env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4317"), ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]);
        let err = e.traces_enabled().unwrap_err().to_string();
        assert!(err.contains("OTEL_EXPORTER_OTLP_PROTOCOL=grpc") && err.contains("http/protobuf"), "{err}");
        let e = env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a"), ("OTEL_METRIC_EXPORT_INTERVAL", "soon")]);
        assert!(e.metrics_export().unwrap_err().to_string().contains("OTEL_METRIC_EXPORT_INTERVAL=soon"));
        assert!(parse_headers("novalue").is_err());
    }

    #[test]
    fn aws_operations_get_their_semantic_conventions() {
        let kv = aws_semantics("SQS", "ReceiveMessage");
        assert!(kv.contains(&KeyValue::new("messaging.system", "aws_sqs")));
        assert!(kv.contains(&KeyValue::new("messaging.operation.type", "receive")));
        assert!(aws_semantics("DynamoDB", "BatchWriteItem").contains(&KeyValue::new("db.system", "dynamodb")));
        assert!(aws_semantics("S3", "GetObject").is_empty());
    }
}
