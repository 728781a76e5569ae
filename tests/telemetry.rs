//! OpenTelemetry end to end: the real binary exports to an in-process OTLP/HTTP receiver, and
//! one trace follows an event from `POST /events` through every stage to its view; the
//! figures `/metrics` serves arrive over OTLP too.

#[macro_use]
mod helpers;

use std::collections::HashMap;

use helpers::otlp::{self, attr, hex};
use helpers::{Options, product, spawn_with};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use serde_json::json;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

fn exporting_to(receiver: &otlp::Receiver) -> Options {
    Options {
        envs: vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), receiver.endpoint.clone()),
            ("OTEL_SERVICE_NAME".into(), "catalog-under-test".into()),
            ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
            ("OTEL_METRIC_EXPORT_INTERVAL".into(), "300".into()),
        ],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_trace_follows_an_event_from_post_to_its_view() {
    let receiver = otlp::start().await;
    let app = spawn_with(exporting_to(&receiver));
    let event = product("T1", "Traced", "Trace");
    let r = app
        .client
        .post(app.url("/events"))
        .header("traceparent", format!("00-{TRACE_ID}-{CALLER_SPAN}-01"))
        .json(&event)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    app.eventually("/products/T1", |v| v["product"]["name"] == "Traced").await;

    let spans = receiver
        .spans_until("view span in the caller's trace", |spans| {
            spans.iter().any(|(_, s)| s.name == "readmodel view visible" && hex(&s.trace_id) == TRACE_ID)
        })
        .await;
    let trace: Vec<_> = spans.iter().filter(|(_, s)| hex(&s.trace_id) == TRACE_ID).collect();
    let named = |name: &str| {
        trace.iter().find(|(_, s)| s.name == name).map(|(_, s)| s).unwrap_or_else(|| {
            panic!("no {name:?} span in the trace: {:?}", trace.iter().map(|(_, s)| &s.name).collect::<Vec<_>>())
        })
    };
    let post = named("POST /events");
    assert_eq!(post.kind, SpanKind::Server as i32);
    assert_eq!(hex(&post.parent_span_id), CALLER_SPAN, "the server span continues the caller's trace");
    assert_eq!(attr(post, "http.route").as_deref(), Some("/events"));
    assert_eq!(attr(post, "http.request.method").as_deref(), Some("POST"));
    assert_eq!(attr(post, "http.response.status_code").as_deref(), Some("202"));
    let send = named("event_log send");
    assert_eq!(send.kind, SpanKind::Producer as i32);
    assert_eq!(send.parent_span_id, post.span_id);
    for stage in ["validate", "write", "publish", "ack"] {
        let s = named(stage);
        assert_eq!(s.kind, SpanKind::Consumer as i32, "{stage}");
        assert_eq!(s.parent_span_id, send.span_id, "{stage} continues from the message's send span");
        assert_eq!(attr(s, "messaging.batch.message_count").as_deref(), Some("1"), "{stage}");
    }
    named("readmodel refresh");
    let visible = named("readmodel view visible");
    assert_eq!(attr(visible, "catalog.product_id").as_deref(), Some("T1"));
    let (resource, _) = trace.iter().find(|(_, s)| s.name == "POST /events").unwrap();
    assert_eq!(resource.get("service.name").map(String::as_str), Some("catalog-under-test"));
    assert!(resource.contains_key("service.version"), "{resource:?}");

    // A read is a server span too, named by its route template.
    assert_eq!(app.get("/products/T1").await.status(), 200);
    let spans = receiver.spans_until("GET span", |spans| spans.iter().any(|(_, s)| s.name == "GET /products/{id}")).await;
    let (_, get) = spans.iter().find(|(_, s)| s.name == "GET /products/{id}").unwrap();
    assert_eq!(attr(get, "http.route").as_deref(), Some("/products/{id}"));
    assert_eq!(attr(get, "url.path").as_deref(), Some("/products/T1"));
    assert_eq!(attr(get, "http.response.status_code").as_deref(), Some("200"));
    assert!(receiver.content_types().iter().all(|ct| ct == "application/x-protobuf"), "{:?}", receiver.content_types());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_figures_of_metrics_arrive_over_otlp() {
    let receiver = otlp::start().await;
    let app = spawn_with(exporting_to(&receiver));
    app.ingest(&json!([
        product("M1", "A", "C"),
        {"source": "pricing.service", "detail-type": "Price Update", "detail": {"productId": "M1", "price": -1, "currency": "USD"}},
    ]))
    .await;
    app.eventually("/products/M1", |v| v["product"]["name"] == "A").await;
    assert_eq!(app.get("/products/M1").await.status(), 200);
    assert_eq!(app.get("/products/NOPE").await.status(), 404);

    let at_least = |n: f64| move |_: &HashMap<String, String>, v: f64| v >= n;
    receiver.metric_until("catalog_pipeline_events_received", at_least(2.0)).await;
    receiver.metric_until("catalog_pipeline_events_validated", at_least(1.0)).await;
    receiver.metric_until("catalog_pipeline_events_dead_lettered", |l, v| l["code"] == "invalid_price" && v >= 1.0).await;
    receiver.metric_until("catalog_pipeline_write_batches", at_least(1.0)).await;
    receiver.metric_until("catalog_pipeline_invalidations_published", at_least(1.0)).await;
    receiver.metric_until("catalog_pipeline_messages_acked", at_least(1.0)).await;
    receiver.metric_until("catalog_pipeline_batch_size", at_least(1.0)).await;
    receiver.metric_until("catalog_pipeline_stage_duration_seconds", |l, v| l["stage"] == "write" && v >= 1.0).await;
    receiver.metric_until("catalog_pipeline_messages_in_flight", |_, v| v == 0.0).await;
    receiver.metric_until("catalog_readmodel_event_visible_lag_seconds", at_least(1.0)).await;
    receiver.metric_until("catalog_breaker_state", |_, v| v == 0.0).await;
    receiver.metric_until("catalog_cache_hits", at_least(1.0)).await;
    receiver.metric_until("catalog_cache_misses", at_least(1.0)).await;
    receiver
        .metric_until("catalog_http_request_duration_seconds", |l, v| {
            l.get("route").map(String::as_str) == Some("get_product")
                && l.get("status").map(String::as_str) == Some("404")
                && v >= 1.0
        })
        .await;
    receiver.metric_until("catalog_event_log_backlog", |_, v| v == 0.0).await;
    receiver.metric_until("process_resident_memory_bytes", at_least(1.0)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn on_aws_the_trace_crosses_sqs_dynamodb_and_eventbridge() {
    require_moto!();
    let receiver = otlp::start().await;
    let mut env = helpers::aws::aws_env("otel");
    helpers::aws::infra_init(&env);
    env.extend(exporting_to(&receiver).envs);
    let app = helpers::aws::serve(&env, "all");
    // A producer sends straight to the queue with its trace in the `traceparent` attribute.
    let aws = helpers::aws::clients().await;
    let queue = aws.queue_url(helpers::aws::var(&env, "CATALOG_INGEST_QUEUE")).await;
    let attribute = aws_sdk_sqs::types::MessageAttributeValue::builder()
        .data_type("String")
        .string_value(format!("00-{TRACE_ID}-{CALLER_SPAN}-01"))
        .build()
        .unwrap();
    aws.sqs
        .send_message()
        .queue_url(&queue)
        .message_body(product("A1", "Across", "Cloud").to_string())
        .message_attributes("traceparent", attribute)
        .send()
        .await
        .unwrap();
    app.eventually("/products/A1", |v| v["product"]["name"] == "Across").await;

    let spans = receiver
        .spans_until("the API instance's view span in the producer's trace", |spans| {
            spans.iter().any(|(_, s)| s.name == "readmodel view visible" && hex(&s.trace_id) == TRACE_ID)
        })
        .await;
    let trace: Vec<_> = spans.iter().map(|(_, s)| s).filter(|s| hex(&s.trace_id) == TRACE_ID).collect();
    let names: Vec<&str> = trace.iter().map(|s| s.name.as_str()).collect();
    let named = |name: &str| *trace.iter().find(|s| s.name == name).unwrap_or_else(|| panic!("no {name:?} in {names:?}"));
    let validate = named("validate");
    assert_eq!(hex(&validate.parent_span_id), CALLER_SPAN, "the pipeline continues the producer's span");
    let write = named("write");
    let dynamodb: Vec<_> = trace.iter().filter(|s| s.name.starts_with("DynamoDB.")).collect();
    assert!(!dynamodb.is_empty(), "no DynamoDB client span in {names:?}");
    for call in &dynamodb {
        assert_eq!(call.kind, SpanKind::Client as i32, "{}", call.name);
        assert_eq!(attr(call, "db.system").as_deref(), Some("dynamodb"), "{}", call.name);
    }
    assert!(dynamodb.iter().any(|c| c.parent_span_id == write.span_id), "the write stage's own calls: {names:?}");
    let read_back = named("DynamoDB.BatchGetItem");
    assert_eq!(read_back.parent_span_id, named("readmodel refresh").span_id, "the API instance reads the new state for the view");
    let put = named("EventBridge.PutEvents");
    assert_eq!(put.kind, SpanKind::Client as i32);
    assert_eq!(attr(put, "messaging.system").as_deref(), Some("aws_eventbridge"));
    assert_eq!(put.parent_span_id, named("publish").span_id);
    let delete = named("SQS.DeleteMessageBatch");
    assert_eq!(attr(delete, "messaging.system").as_deref(), Some("aws_sqs"));
    assert_eq!(delete.parent_span_id, named("ack").span_id);
    assert!(
        spans.iter().all(|(_, s)| !(s.name.starts_with("SQS.") && s.parent_span_id.is_empty())),
        "untraced polls are not exported"
    );

    // A producer with no trace (PutEvents, through the rule): its batch's stages and its view
    // still make one trace, rooted at the validate span.
    aws.put_events(helpers::aws::var(&env, "CATALOG_BUS"), &[product("A2", "Untraced", "Cloud")]).await;
    app.eventually("/products/A2", |v| v["product"]["name"] == "Untraced").await;
    let spans = receiver
        .spans_until("A2's view span", |spans| {
            spans
                .iter()
                .any(|(_, s)| s.name == "readmodel view visible" && attr(s, "catalog.product_id").as_deref() == Some("A2"))
        })
        .await;
    let (_, view) = spans.iter().find(|(_, s)| attr(s, "catalog.product_id").as_deref() == Some("A2")).unwrap();
    let root =
        spans.iter().map(|(_, s)| s).find(|s| s.trace_id == view.trace_id && s.parent_span_id.is_empty()).expect("a root span");
    assert_eq!(root.name, "validate");
    for stage in ["write", "publish", "ack"] {
        assert!(spans.iter().any(|(_, s)| s.trace_id == view.trace_id && s.name == stage), "{stage} in A2's trace");
    }
}
