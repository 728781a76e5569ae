//! AWS mode end to end, against the moto server `scripts/test` starts: real SQS, DynamoDB
//! and EventBridge wire protocols through the real aws-sdk clients. Each test has its own
//! resource names, so tests never share state.

#[macro_use]
mod helpers;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use helpers::aws::*;
use helpers::*;
use serde_json::{Value, json};

#[test]
fn infra_init_without_a_region_says_to_set_aws_region() {
    let empty = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_catalog"))
        .args(["infra", "init"])
        .env_remove("AWS_REGION")
        .env_remove("AWS_DEFAULT_REGION")
        .env_remove("AWS_PROFILE")
        .env("AWS_CONFIG_FILE", empty.path().join("config"))
        .env("AWS_SHARED_CREDENTIALS_FILE", empty.path().join("credentials"))
        // Never probe the instance-metadata address from a test.
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("set AWS_REGION"), "{stderr}");
    assert!(!stderr.contains("DispatchFailure"), "{stderr}");
}

#[tokio::test]
async fn an_embedded_data_dir_is_refused_by_an_aws_instance_before_any_aws_call() {
    let dir = tempfile::tempdir().unwrap();
    let mut app = start_in(dir.path(), &Options::default());
    app.ingest(&json!([product("E1", "Embedded", "Local")])).await;
    app.caught_up(1).await;
    app.stop();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_catalog"))
        .args(["serve", "--backend", "aws", "--addr", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("AWS_REGION", "us-east-1")
        // Nothing listens there: were the data dir not refused first, the AWS calls would fail.
        .env("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("holds an embedded catalog"), "{stderr}");
    // And the embedded catalog is still whole.
    let app = start_in(dir.path(), &Options::default());
    let (status, _) = app.get_json("/products/E1").await;
    assert_eq!(status, 200);
}

#[test]
fn infra_init_is_idempotent() {
    require_moto!();
    let env = aws_env("infra");
    let first = infra_init(&env);
    assert_eq!(first.lines().filter(|l| l.starts_with("created")).count(), 6, "{first}");
    let second = infra_init(&env);
    assert_eq!(second.lines().filter(|l| l.starts_with("found")).count(), 6, "{second}");
    assert!(second.contains(var(&env, "CATALOG_PRODUCTS_TABLE")), "{second}");
}

#[tokio::test]
async fn put_events_flows_through_rule_queue_pipeline_dynamodb_and_invalidation_to_the_bff() {
    require_moto!();
    let env = aws_env("e2e");
    infra_init(&env);
    let app = serve(&env, "all");
    let aws = clients().await;
    let seed: Value = serde_json::from_str(SEED).unwrap();
    aws.put_events(var(&env, "CATALOG_BUS"), &[seed]).await;
    let view = app.eventually("/products/P123", |_| true).await;
    assert_eq!(view["displayPrice"], "$999.99");
    assert_eq!(view["price"], json!({"amount": "999.99", "currency": "USD"}));
    let (status, ready) = app.get_json("/readyz").await;
    assert_eq!((status, ready["status"].as_str()), (200, Some("ready")));
    assert!(app.metric("catalog_aws_eventbridge_entries_total").await >= 1.0);
    assert!(app.metric("catalog_aws_dynamodb_write_units_total").await > 0.0);
}

#[tokio::test]
async fn a_worker_and_a_separate_api_instance_converge() {
    require_moto!();
    let env = aws_env("split");
    infra_init(&env);
    let worker = serve(&env, "worker");
    let api = serve(&env, "api");
    assert_eq!(worker.get_json("/products/W1").await.0, 404, "a worker serves no products");
    let aws = clients().await;
    let bus = var(&env, "CATALOG_BUS");
    aws.put_events(bus, &[product("W1", "Widget", "Gadgets"), price("W1", "12.00", "EUR", 1), stock("W1", 2, 1)]).await;
    let view = api.eventually("/products/W1", |v| v["price"].is_object() && v["stock"].is_object()).await;
    assert_eq!((view["displayPrice"].as_str(), view["availability"].as_str()), (Some("€12.00"), Some("Low Stock")));
    aws.put_events(bus, &[stock("W1", 40, 2)]).await;
    api.eventually("/products/W1", |v| v["availability"] == "In Stock").await;
    // A second API instance that starts later warms its read model from DynamoDB.
    let late = serve(&env, "api");
    let (_, page) = late.get_json("/products?category=Gadgets").await;
    assert_eq!(page["items"][0]["product"]["id"], "W1");
    assert!(worker.metric("catalog_pipeline_events_applied_total").await >= 4.0);
}

#[tokio::test]
async fn a_bad_event_lands_in_the_dlq_with_its_reason_attributes() {
    require_moto!();
    let env = aws_env("dlq");
    infra_init(&env);
    let app = serve(&env, "all");
    let aws = clients().await;
    let good = serde_json::to_string(
        &json!({"type": "Inventory Update", "source": "inventory.service", "detail": {"productId": "D1", "quantity": 3}}),
    )
    .unwrap();
    let named = serde_json::to_string(&product("D1", "Desk", "Office")).unwrap();
    aws.send_raw(var(&env, "CATALOG_INGEST_QUEUE"), &["{not json".into(), named, good]).await;
    app.eventually("/products/D1", |v| v["stock"]["quantity"] == 3).await;
    let dlq = aws.queue_url(var(&env, "CATALOG_DLQ")).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let message = loop {
        let out =
            aws.sqs.receive_message().queue_url(&dlq).message_attribute_names("All").wait_time_seconds(1).send().await.unwrap();
        if let Some(m) = out.messages().first() {
            break m.clone();
        }
        assert!(Instant::now() < deadline, "nothing reached the DLQ");
    };
    assert_eq!(message.body(), Some("{not json"));
    let attrs: HashMap<&str, &str> =
        message.message_attributes().unwrap().iter().map(|(k, v)| (k.as_str(), v.string_value().unwrap_or_default())).collect();
    assert_eq!(attrs["catalog.error.code"], "malformed_json");
    assert_eq!(attrs["catalog.error.stage"], "validate");
    assert!(attrs["catalog.error.message"].contains("not valid JSON"), "{attrs:?}");
    // It left the ingest queue: once the good messages are acked, nothing waits or is in flight.
    let ingest = aws.queue_url(var(&env, "CATALOG_INGEST_QUEUE")).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = aws
            .sqs
            .get_queue_attributes()
            .queue_url(&ingest)
            .attribute_names(aws_sdk_sqs::types::QueueAttributeName::All)
            .send()
            .await
            .unwrap();
        let count = |n| out.attributes().unwrap().get(&n).cloned().unwrap_or_default();
        let waiting = count(aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages);
        let in_flight = count(aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessagesNotVisible);
        if (waiting.as_str(), in_flight.as_str()) == ("0", "0") {
            break;
        }
        assert!(Instant::now() < deadline, "ingest queue still holds {waiting} waiting, {in_flight} in flight");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(app.metric("catalog_pipeline_events_dead_lettered_total{code=\"malformed_json\"}").await, 1.0);
}

#[tokio::test]
async fn shuffled_duplicate_deliveries_converge_on_the_highest_version() {
    require_moto!();
    let env = aws_env("dups");
    infra_init(&env);
    let app = serve(&env, "all");
    let aws = clients().await;
    let compact = |e: Value| {
        serde_json::to_string(&json!({"type": e["detail-type"], "source": e["source"], "detail": e["detail"]})).unwrap()
    };
    let mut bodies = vec![compact(product("S1", "Sofa", "Living"))];
    for v in [3, 1, 4, 4, 2, 1, 3] {
        bodies.push(compact(price("S1", &format!("{v}00"), "USD", v)));
    }
    for v in [2, 5, 1, 5] {
        bodies.push(compact(stock("S1", v * 10, v)));
    }
    aws.send_raw(var(&env, "CATALOG_INGEST_QUEUE"), &bodies).await;
    let view = app.eventually("/products/S1", |v| v["displayPrice"] == "$400.00" && v["stock"]["quantity"] == 50).await;
    assert_eq!(view["availability"], "In Stock");
    // Everything was consumed and nothing went backwards afterwards.
    let deadline = Instant::now() + Duration::from_secs(15);
    while app.metric("catalog_pipeline_messages_acked_total").await < bodies.len() as f64 {
        assert!(Instant::now() < deadline, "not every delivery was acknowledged");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, view) = app.get_json("/products/S1").await;
    assert_eq!((view["displayPrice"].as_str(), view["stock"]["quantity"].as_u64()), (Some("$400.00"), Some(50)));
}

// Multi-threaded: the proxy must keep answering while `serve` blocks reading the child's stdout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unprocessed_batch_writes_are_retried_until_every_event_is_logged() {
    require_moto!();
    let mut env = aws_env("throttle");
    infra_init(&env);
    let (proxy, throttled) = dynamodb_proxy(Fault::UnprocessedWrites).await;
    env.push(("AWS_ENDPOINT_URL_DYNAMODB".into(), proxy));
    // One event per log segment, so that a batch holds several items for the proxy to refuse.
    env.push(("CATALOG_LOG_SEGMENT_BYTES".into(), "1".into()));
    let app = serve(&env, "all");
    let aws = clients().await;
    let products: Vec<Value> = (0..10).map(|i| product(&format!("T{i}"), "Throttled", "Slow")).collect();
    aws.put_events(var(&env, "CATALOG_BUS"), &products).await;
    for i in 0..10 {
        app.eventually(&format!("/products/T{i}"), |_| true).await;
    }
    assert!(throttled.load(Ordering::SeqCst) > 0, "the proxy never throttled a batch");
    // Every event reached the log (read straight from moto), written through retries of what
    // came back unprocessed.
    let scan = aws.dynamodb.scan().table_name(var(&env, "CATALOG_EVENTS_TABLE")).send().await.unwrap();
    assert_eq!(scan.count(), 10);
    let mut logged: Vec<String> = scan
        .items()
        .iter()
        .flat_map(|item| catalog_aws::dynamodb::decode_segment(item).unwrap())
        .map(|e| e["detail"]["productId"].as_str().unwrap().to_owned())
        .collect();
    logged.sort();
    assert_eq!(logged, (0..10).map(|i| format!("T{i}")).collect::<Vec<_>>());
    let calls = app.metric("catalog_aws_calls_total{service=\"dynamodb\",operation=\"BatchWriteItem\"}").await;
    assert!(calls >= 10.0, "one item per call means at least ten calls, saw {calls}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn superseded_versions_are_not_acked_when_the_winning_update_fails() {
    require_moto!();
    let mut env = aws_env("superseded");
    env.push(("CATALOG_SQS_VISIBILITY_SECS".into(), "2".into()));
    infra_init(&env);
    let (proxy, faulted) = dynamodb_proxy(Fault::FailUpdatesOf("F1")).await;
    env.push(("AWS_ENDPOINT_URL_DYNAMODB".into(), proxy));
    let app = serve(&env, "all");
    let aws = clients().await;
    // Three versions of one facet in one SQS batch: they coalesce into one update of v3.
    let compact = |v: u64| {
        serde_json::to_string(&json!({"type": "Price Update", "source": "pricing.service",
        "detail": {"productId": "F1", "price": v, "currency": "USD", "version": v}}))
        .unwrap()
    };
    let url = aws.queue_url(var(&env, "CATALOG_INGEST_QUEUE")).await;
    let entries = (1..=3)
        .map(|v| {
            aws_sdk_sqs::types::SendMessageBatchRequestEntry::builder()
                .id(v.to_string())
                .message_body(compact(v))
                .build()
                .unwrap()
        })
        .collect();
    aws.sqs.send_message_batch().queue_url(&url).set_entries(Some(entries)).send().await.unwrap();
    // The update never succeeds, so SQS redrive must move all three to the DLQ: none of the
    // superseded versions may be acked on the strength of a write that failed.
    let dlq = aws.queue_url(var(&env, "CATALOG_DLQ")).await;
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut dead = std::collections::BTreeSet::new();
    while dead.len() < 3 {
        assert!(Instant::now() < deadline, "only {dead:?} reached the DLQ");
        let out = aws.sqs.receive_message().queue_url(&dlq).max_number_of_messages(10).wait_time_seconds(1).send().await.unwrap();
        for m in out.messages() {
            let v: Value = serde_json::from_str(m.body().unwrap()).unwrap();
            dead.insert(v["detail"]["version"].as_u64().unwrap());
        }
    }
    assert_eq!(dead.into_iter().collect::<Vec<_>>(), [1, 2, 3]);
    assert!(faulted.load(Ordering::SeqCst) >= 3);
    assert_eq!(app.metric("catalog_pipeline_messages_acked_total").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_gets_for_missing_or_cold_products_costs_a_few_batch_gets() {
    require_moto!();
    let mut env = aws_env("storm");
    // A wide window, so that requests a loaded machine spreads out still meet in it; the
    // count below would be 60 if each miss read on its own.
    env.push(("CATALOG_FILL_WINDOW_MS".into(), "500".into()));
    infra_init(&env);
    let api = serve(&env, "api");
    let aws = clients().await;
    // Cold: in the products table, never announced, so not in this instance's read model.
    for i in 0..20 {
        aws.dynamodb
            .put_item()
            .table_name(var(&env, "CATALOG_PRODUCTS_TABLE"))
            .item("productId", aws_sdk_dynamodb::types::AttributeValue::S(format!("C{i}")))
            .item("productName", aws_sdk_dynamodb::types::AttributeValue::S("Cold".into()))
            .item("revision", aws_sdk_dynamodb::types::AttributeValue::N("1".into()))
            .send()
            .await
            .unwrap();
    }
    let batch_gets = "catalog_aws_calls_total{service=\"dynamodb\",operation=\"BatchGetItem\"}";
    let before = api.metric(batch_gets).await;
    let paths: Vec<String> =
        (0..20).flat_map(|i| [format!("/products/C{i}"), format!("/products/C{i}"), format!("/products/M{i}")]).collect();
    let answers = futures_util::future::join_all(paths.iter().map(|p| api.get_json(p))).await;
    for (path, (status, _)) in paths.iter().zip(answers) {
        assert_eq!(status, if path.contains("/C") { 200 } else { 404 }, "{path}");
    }
    let storm = api.metric(batch_gets).await - before;
    assert!(storm <= 10.0, "60 concurrent misses took {storm} BatchGetItem calls");
    assert!(api.metric("catalog_cache_coalesced_total").await > 0.0);
    // Asked again at once, the missing ones are answered without DynamoDB.
    for i in 0..20 {
        assert_eq!(api.get_json(&format!("/products/M{i}")).await.0, 404);
    }
    assert_eq!(api.metric(batch_gets).await - before, storm);
    assert_eq!(api.metric("catalog_cache_negative_hits_total").await, 20.0);
    for i in 0..20 {
        assert_eq!(api.get_json(&format!("/products/C{i}")).await.0, 200);
    }
    assert!(api.metric("catalog_cache_hits_total").await >= 20.0, "the cold ones are in the read model now");
    assert_eq!(api.metric(batch_gets).await - before, storm);
}
