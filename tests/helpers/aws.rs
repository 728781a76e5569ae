//! AWS test helpers: the moto server `scripts/test` starts, the standard AWS environment
//! pointed at it with resource names unique to one test, the real SDK clients, and fault
//! proxies in front of moto's DynamoDB.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use serde_json::{Value, json};

use super::{Options, TestApp, spawn_with};

pub fn endpoint() -> String {
    std::env::var(MOTO_ENDPOINT).expect("require_moto! runs first in every AWS test")
}

/// Where scripts/test puts the moto server's URL.
pub const MOTO_ENDPOINT: &str = "CATALOG_TEST_AWS_ENDPOINT";

/// Skips the test, saying why, when no moto server was started: plain `cargo test` runs
/// everything else. scripts/test (and so CI) always sets it, so nothing is skipped there.
#[allow(unused_macros)]
macro_rules! require_moto {
    () => {
        if std::env::var_os($crate::helpers::aws::MOTO_ENDPOINT).is_none() {
            eprintln!(
                "skipped: the AWS tests need the moto server; run scripts/test, or export {}=$(scripts/moto start)",
                $crate::helpers::aws::MOTO_ENDPOINT
            );
            return;
        }
    };
}

/// The standard AWS environment pointed at moto, and resource names unique to one test.
pub fn aws_env(test: &str) -> Vec<(String, String)> {
    static N: AtomicU32 = AtomicU32::new(0);
    let suffix = format!("{test}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst));
    let mut env = super::moto::moto_env(&endpoint(), &suffix);
    env.push(("CATALOG_SQS_WAIT_SECS".to_owned(), "1".to_owned()));
    env
}

pub fn var<'a>(env: &'a [(String, String)], name: &str) -> &'a str {
    &env.iter().find(|(k, _)| k == name).expect("set by aws_env").1
}

pub fn infra_init(env: &[(String, String)]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_catalog")).args(["infra", "init"]).envs(env.iter().cloned()).output().unwrap();
    assert!(out.status.success(), "infra init failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

pub fn serve(env: &[(String, String)], role: &str) -> TestApp {
    spawn_with(Options { args: vec!["--role".into(), role.into()], envs: env.to_vec() })
}

pub struct Aws {
    pub sqs: aws_sdk_sqs::Client,
    pub eventbridge: aws_sdk_eventbridge::Client,
    pub dynamodb: aws_sdk_dynamodb::Client,
}

pub async fn clients() -> Aws {
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(endpoint())
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_sqs::config::Credentials::new("test", "test", None, None, "tests"))
        .load()
        .await;
    Aws {
        sqs: aws_sdk_sqs::Client::new(&config),
        eventbridge: aws_sdk_eventbridge::Client::new(&config),
        dynamodb: aws_sdk_dynamodb::Client::new(&config),
    }
}

impl Aws {
    /// A producer's PutEvents, exactly as product, pricing and inventory services would call it.
    pub async fn put_events(&self, bus: &str, events: &[Value]) {
        let entries = events
            .iter()
            .map(|e| {
                aws_sdk_eventbridge::types::PutEventsRequestEntry::builder()
                    .event_bus_name(bus)
                    .source(e["source"].as_str().unwrap())
                    .detail_type(e["detail-type"].as_str().unwrap())
                    .detail(e["detail"].to_string())
                    .build()
            })
            .collect();
        let out = self.eventbridge.put_events().set_entries(Some(entries)).send().await.unwrap();
        assert_eq!(out.failed_entry_count(), 0);
    }

    pub async fn queue_url(&self, name: &str) -> String {
        self.sqs.get_queue_url().queue_name(name).send().await.unwrap().queue_url().unwrap().to_owned()
    }

    pub async fn send_raw(&self, queue: &str, bodies: &[String]) {
        let url = self.queue_url(queue).await;
        for body in bodies {
            self.sqs.send_message().queue_url(&url).message_body(body).send().await.unwrap();
        }
    }
}

/// Faults a proxy in front of moto's DynamoDB injects.
#[derive(Clone, Copy)]
pub enum Fault {
    /// Two of every three `UpdateItem` and `BatchWriteItem` calls are refused as a throttled
    /// table refuses them: `ProvisionedThroughputExceededException` and `ThrottlingException`.
    Throttle,
    /// Each `BatchWriteItem` writes only its first item and hands the rest back as
    /// `UnprocessedItems`, as a throttled table does (moto itself never returns any).
    UnprocessedWrites,
    /// Every `UpdateItem` of this product fails with a non-retryable error.
    FailUpdatesOf(&'static str),
}

/// A proxy in front of moto's DynamoDB that injects `fault`; everything else passes through.
/// Returns its URL and how many requests it faulted.
pub async fn dynamodb_proxy(fault: Fault) -> (String, std::sync::Arc<AtomicU32>) {
    use warp::Filter;
    let upstream = endpoint();
    let throttled = std::sync::Arc::new(AtomicU32::new(0));
    let counter = throttled.clone();
    let client = reqwest::Client::new();
    let route = warp::any()
        .and(warp::method())
        .and(warp::path::full())
        .and(warp::header::headers_cloned())
        .and(warp::body::bytes())
        .then(move |method: warp::http::Method, path: warp::path::FullPath, headers: warp::http::HeaderMap, body: bytes::Bytes| {
            let (client, upstream, counter) = (client.clone(), upstream.clone(), counter.clone());
            async move {
                let target = headers.get("x-amz-target").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
                let mut body = body.to_vec();
                let mut unprocessed = serde_json::Map::new();
                let writes = target.ends_with(".UpdateItem") || target.ends_with(".BatchWriteItem");
                if matches!(fault, Fault::Throttle) && writes {
                    let n = counter.fetch_add(1, Ordering::SeqCst);
                    if n % 3 != 2 {
                        let code = if n % 2 == 0 { "ProvisionedThroughputExceededException" } else { "ThrottlingException" };
                        let error = json!({"__type": format!("com.amazonaws.dynamodb.v20120810#{code}"), "message": "injected throttle"});
                        return warp::http::Response::builder()
                            .status(400)
                            .header("content-type", "application/x-amz-json-1.0")
                            .body(serde_json::to_vec(&error).unwrap())
                            .unwrap();
                    }
                }
                if let Fault::FailUpdatesOf(id) = fault {
                    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    if target.ends_with(".UpdateItem") && request["Key"]["productId"]["S"] == id {
                        counter.fetch_add(1, Ordering::SeqCst);
                        let error = json!({"__type": "com.amazonaws.dynamodb.v20120810#ValidationException", "message": "injected fault"});
                        return warp::http::Response::builder()
                            .status(400)
                            .header("content-type", "application/x-amz-json-1.0")
                            .body(serde_json::to_vec(&error).unwrap())
                            .unwrap();
                    }
                }
                if matches!(fault, Fault::UnprocessedWrites) && target.ends_with(".BatchWriteItem") {
                    let mut request: Value = serde_json::from_slice(&body).unwrap();
                    for (table, writes) in request["RequestItems"].as_object_mut().unwrap() {
                        let writes = writes.as_array_mut().unwrap();
                        if writes.len() > 1 {
                            unprocessed.insert(table.clone(), Value::Array(writes.split_off(1)));
                        }
                    }
                    if !unprocessed.is_empty() {
                        counter.fetch_add(1, Ordering::SeqCst);
                    }
                    body = serde_json::to_vec(&request).unwrap();
                }
                let mut forwarded = headers.clone();
                forwarded.remove("host");
                forwarded.remove("content-length");
                let response = client
                    .request(method, format!("{upstream}{}", path.as_str()))
                    .headers(forwarded)
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                let status = response.status();
                let mut answer = response.bytes().await.unwrap().to_vec();
                if !unprocessed.is_empty() {
                    let mut v: Value = serde_json::from_slice(&answer).unwrap();
                    v["UnprocessedItems"] = Value::Object(unprocessed);
                    answer = serde_json::to_vec(&v).unwrap();
                }
                warp::http::Response::builder()
                    .status(status)
                    .header("content-type", "application/x-amz-json-1.0")
                    .body(answer)
                    .unwrap()
            }
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(warp::serve(route).incoming(listener).run());
    (url, throttled)
}
