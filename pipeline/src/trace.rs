//! Trace context that crosses the queue: an event's W3C `traceparent` travels with its message
//! (the embedded log entry, an SQS message attribute, the invalidation), so the stages and the
//! read model continue the trace of the request that accepted it.
//!
//! Spans are only recorded when the process exports traces: with no OpenTelemetry layer
//! installed, every helper here is a cheap no-op and no span is even created (see
//! [`SPAN_TARGET`]).

use std::collections::{HashMap, HashSet};

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The target every span of ours is created under. The log layer never records spans and the
/// OpenTelemetry layer records only these, so without an exporter `info_span!` costs a
/// disabled callsite check and nothing more.
pub const SPAN_TARGET: &str = "catalog::trace";

/// The header and SQS message attribute that carry the context (W3C Trace Context).
pub const TRACEPARENT: &str = "traceparent";

/// The context of the current span, when it is being recorded.
pub fn current() -> Option<SpanContext> {
    let cx = tracing::Span::current().context();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| sc.clone())
}

/// `traceparent` text for a context.
pub fn to_traceparent(sc: &SpanContext) -> String {
    let mut carrier = HashMap::new();
    let cx = opentelemetry::Context::new().with_remote_span_context(sc.clone());
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove(TRACEPARENT).unwrap_or_default()
}

/// The context a `traceparent` value names; `None` when it is not a valid one.
pub fn parse_traceparent(value: &str) -> Option<SpanContext> {
    let carrier = HashMap::from([(TRACEPARENT.to_owned(), value.trim().to_owned())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    let sc = cx.span().span_context().clone();
    sc.is_valid().then_some(sc)
}

/// Bytes a context takes in the embedded log: trace id, span id, flags.
pub const ENCODED_LEN: usize = 25;

pub fn encode(sc: &SpanContext) -> [u8; ENCODED_LEN] {
    let mut out = [0u8; ENCODED_LEN];
    out[..16].copy_from_slice(&sc.trace_id().to_bytes());
    out[16..24].copy_from_slice(&sc.span_id().to_bytes());
    out[24] = sc.trace_flags().to_u8();
    out
}

pub fn decode(bytes: &[u8]) -> Option<SpanContext> {
    let trace_id = TraceId::from_bytes(bytes.get(..16)?.try_into().ok()?);
    let span_id = SpanId::from_bytes(bytes.get(16..24)?.try_into().ok()?);
    let flags = TraceFlags::new(*bytes.get(24)?);
    let sc = SpanContext::new(trace_id, span_id, flags, true, TraceState::NONE);
    sc.is_valid().then_some(sc)
}

/// Makes `span` continue the traces of the messages it works on: the first context becomes its
/// parent, every other distinct trace a link (OpenTelemetry's rule for batch processing). Call
/// it before the span is entered.
pub fn follow<'a>(span: &tracing::Span, contexts: impl IntoIterator<Item = &'a SpanContext>) {
    if span.is_disabled() {
        return;
    }
    let mut seen: HashSet<TraceId> = HashSet::new();
    for sc in contexts {
        if !seen.insert(sc.trace_id()) {
            continue;
        }
        if seen.len() == 1 {
            let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(sc.clone()));
        } else {
            span.add_link(sc.clone());
        }
        // The parent and as many links as a span keeps: the rest would be dropped anyway.
        if seen.len() > MAX_LINKS {
            return;
        }
    }
}

/// Links one span carries at most (the SDK's own default limit).
const MAX_LINKS: usize = 128;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_and_binary_forms_round_trip() {
        let text = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let sc = parse_traceparent(text).unwrap();
        assert_eq!(to_traceparent(&sc), text);
        assert_eq!(decode(&encode(&sc)), Some(sc));
        assert!(parse_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none(), "an all-zero trace id");
        assert!(parse_traceparent("nonsense").is_none());
        assert!(decode(&[0u8; ENCODED_LEN]).is_none());
        assert!(decode(&[1u8; 10]).is_none());
    }
}
