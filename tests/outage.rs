//! AWS mode through a DynamoDB outage and back, against moto: a TCP proxy cuts DynamoDB alone
//! while events keep arriving; the breaker opens, reads go on, nothing is dead-lettered by the
//! outage, and the runbook in docs/ (run word for word) ends with `replay verify` exiting 0.
//! Also `replay verify`, `reproject` and `dlq` on AWS. Loopback only, bounded in time.

#[macro_use]
mod helpers;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::AttributeValue;
use helpers::aws::*;
use helpers::*;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};

/// How long DynamoDB stays cut: longer than every receive the default redrive policy allows
/// at the default visibility timeout, so a message that spent a delivery per retry would be
/// dead-lettered by it.
const OUTAGE: Duration = Duration::from_secs(60);

/// A TCP proxy in front of moto that can cut DynamoDB off: while cut, open connections are
/// dropped and new ones closed at once, as a partition or a regional outage looks to a client.
struct CutProxy {
    url: String,
    cut: tokio::sync::watch::Sender<bool>,
}

async fn cut_proxy(upstream: &str) -> CutProxy {
    let upstream = upstream.trim_start_matches("http://").trim_end_matches('/').to_owned();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (cut, watch) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let mut watch = watch.clone();
            if *watch.borrow() {
                continue;
            }
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let Ok(mut server) = TcpStream::connect(&upstream).await else { return };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    _ = watch.wait_for(|cut| *cut) => {}
                }
            });
        }
    });
    CutProxy { url, cut }
}

/// `catalog <args>` with the test's AWS environment; whether it exited 0, and what it printed.
fn catalog(args: &[&str], env: &[(String, String)], data_dir: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_catalog"))
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .envs(env.iter().cloned())
        .env("CATALOG_LOG", "warn")
        .output()
        .expect("run catalog");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn compact(e: &Value) -> String {
    serde_json::to_string(&json!({"type": e["detail-type"], "source": e["source"], "detail": e["detail"]})).unwrap()
}

async fn queue_depth(aws: &Aws, queue: &str) -> (u64, u64) {
    use aws_sdk_sqs::types::QueueAttributeName as Q;
    let url = aws.queue_url(queue).await;
    let out = aws.sqs.get_queue_attributes().queue_url(url).attribute_names(Q::All).send().await.unwrap();
    let count = |n| out.attributes().unwrap().get(&n).and_then(|v| v.parse().ok()).unwrap_or(0);
    (count(Q::ApproximateNumberOfMessages), count(Q::ApproximateNumberOfMessagesNotVisible))
}

async fn until(what: &str, within: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_verify_reproject_and_dlq_work_on_aws() {
    require_moto!();
    let env = aws_env("replay");
    infra_init(&env);
    let app = serve(&env, "all");
    let aws = clients().await;
    let none = tempfile::tempdir().unwrap();
    let bus = var(&env, "CATALOG_BUS");
    let mut events: Vec<Value> = (0..6).map(|i| product(&format!("R{i}"), "Rake", "Garden")).collect();
    events.push(stock("R1", 5, 1));
    aws.put_events(bus, &events).await;
    app.eventually("/products/R1", |v| v["stock"]["quantity"] == 5).await;
    until("the queue drains", Duration::from_secs(20), async || {
        queue_depth(&aws, var(&env, "CATALOG_INGEST_QUEUE")).await == (0, 0)
    })
    .await;
    let (ok, out) = catalog(&["replay", "verify", "--backend", "aws"], &env, none.path());
    assert!(ok, "{out}");
    assert!(out.contains("the store (6 products)") && out.contains("no drift"), "{out}");

    // Someone edits the products table by hand.
    aws.dynamodb
        .update_item()
        .table_name(var(&env, "CATALOG_PRODUCTS_TABLE"))
        .key("productId", AttributeValue::S("R1".into()))
        .update_expression("SET quantity = :q ADD revision :one")
        .expression_attribute_values(":q", AttributeValue::N("999".into()))
        .expression_attribute_values(":one", AttributeValue::N("1".into()))
        .send()
        .await
        .unwrap();
    let (ok, out) = catalog(&["replay", "verify", "--backend", "aws"], &env, none.path());
    assert!(!ok && out.contains("store≠log R1: quantity: log 5, store 999"), "{out}");
    let checkpoint = none.path().join("reproject.checkpoint");
    let (ok, out) = catalog(&["replay", "reproject", "--backend", "aws"], &env, none.path());
    assert!(ok && out.contains("1 rewritten, 5 already right"), "{out}");
    assert!(!checkpoint.exists(), "a finished run leaves no checkpoint");
    let (ok, out) = catalog(&["replay", "verify", "--backend", "aws"], &env, none.path());
    assert!(ok, "{out}");
    // The rewrite was announced, so the API instance's view follows.
    app.eventually("/products/R1", |v| v["stock"]["quantity"] == 5).await;

    // The DLQ: one invalid message, one valid one the queue's redrive policy put there.
    let dlq = var(&env, "CATALOG_DLQ");
    aws.send_raw(dlq, &["{not json".into(), compact(&stock("R2", 7, 3))]).await;
    let (ok, out) = catalog(&["replay", "dlq", "--backend", "aws", "--inspect"], &env, none.path());
    assert!(ok, "{out}");
    assert!(out.contains("\tmax_receive_count_exceeded\tqueue\t-\tR2\tInventory Update\t"), "{out}");
    assert!(out.contains("2 dead letters, 2 shown"), "{out}");
    assert_eq!(queue_depth(&aws, dlq).await, (2, 0), "inspecting leaves every message visible");
    let (ok, out) = catalog(&["replay", "dlq", "--backend", "aws"], &env, none.path());
    assert!(ok && out.contains("moved 1 of 1 chosen dead letters back") && out.contains("1 still invalid, kept"), "{out}");
    app.eventually("/products/R2", |v| v["stock"]["quantity"] == 7).await;
    assert_eq!(queue_depth(&aws, dlq).await, (1, 0), "the invalid one stays");
    until("the queue drains", Duration::from_secs(20), async || {
        queue_depth(&aws, var(&env, "CATALOG_INGEST_QUEUE")).await == (0, 0)
    })
    .await;
    let (ok, out) = catalog(&["replay", "verify", "--backend", "aws"], &env, none.path());
    assert!(ok, "{out}");

    // A stopped API instance's read model, rebuilt from the products table, agrees too.
    let api_dir = tempfile::tempdir().unwrap();
    let (ok, out) = catalog(&["replay", "rebuild", "--backend", "aws"], &env, api_dir.path());
    assert!(ok && out.contains("rebuilt 6 views of 6 products from the products table"), "{out}");
    let (ok, out) = catalog(&["replay", "verify", "--backend", "aws"], &env, api_dir.path());
    assert!(ok && out.contains("read model 6 views and 6 listing entries"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dynamodb_outage_loses_nothing_keeps_reads_and_the_runbook_recovers_it() {
    require_moto!();
    let mut env = aws_env("outage");
    infra_init(&env);
    let proxy = cut_proxy(&endpoint()).await;
    env.push(("AWS_ENDPOINT_URL_DYNAMODB".into(), proxy.url.clone()));
    env.push(("CATALOG_BREAKER_COOL_DOWN_SECS".into(), "5".into()));
    let app = serve(&env, "all");
    let aws = clients().await;
    let bus = var(&env, "CATALOG_BUS").to_owned();
    let before: Vec<Value> = (0..10).map(|i| product(&format!("B{i}"), "Before", "Outage")).collect();
    aws.put_events(&bus, &before).await;
    app.eventually("/products/B9", |_| true).await;
    // Dead letters from before: an invalid event, which the runbook must leave alone.
    aws.send_raw(var(&env, "CATALOG_INGEST_QUEUE"), &["{not json".into()]).await;

    proxy.cut.send_replace(true);
    let cut_at = Instant::now();
    let (mut saw_open, mut reads) = (false, 0);
    let mut sent = 0;
    while cut_at.elapsed() < OUTAGE {
        // Events keep arriving: EventBridge and SQS are up.
        if sent < 20 && cut_at.elapsed() > Duration::from_secs(3 * sent / 2) {
            aws.put_events(&bus, &[product(&format!("D{sent}"), "During", "Outage"), stock("B0", sent, sent + 1)]).await;
            sent += 1;
        }
        let (status, ready) = app.get_json("/readyz").await;
        let breaker = ready["checks"].as_array().unwrap().iter().find(|c| c["name"] == "breaker").unwrap()["detail"].clone();
        if status == 503 && (breaker.as_str().unwrap().starts_with("open") || breaker.as_str().unwrap().starts_with("half-open"))
        {
            saw_open = true;
        }
        // Reads keep being served from the read model.
        let (status, view) = app.get_json("/products/B3").await;
        assert_eq!((status, view["product"]["name"].as_str()), (200, Some("Before")), "a read failed during the outage");
        reads += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(saw_open, "the breaker never showed open on /readyz");
    assert!(reads > 50);
    assert_eq!(queue_depth(&aws, var(&env, "CATALOG_DLQ")).await.0, 1, "the outage dead-lettered something");
    assert!(app.metric("catalog_breaker_transitions_total{to=\"open\"}").await >= 1.0);
    proxy.cut.send_replace(false);

    // A message the queue's redrive policy moved during the outage, as a refused write would
    // be: the runbook moves it back.
    aws.send_raw(var(&env, "CATALOG_DLQ"), &[compact(&product("X1", "Redriven", "Outage"))]).await;
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_catalog")).parent().unwrap();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let views = tempfile::tempdir().unwrap();
    let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/walkthrough"))
        .args([app.base.as_str(), "docs/runbook-dynamodb-outage.md", "runbook"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .envs(env.iter().cloned())
        .env("PATH", path)
        .env("CATALOG_DATA_DIR", views.path().join("none"))
        .env("CATALOG_LOG", "warn")
        .env("WALKTHROUGH_EVENTUALLY_SECS", "90")
        .env("W", &app.base)
        .output()
        .expect("run scripts/walkthrough (needs bash, curl, jq)");
    let printed = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the runbook failed:\n{printed}");

    // Everything sent during the outage is applied, the last stock update included.
    for i in 0..sent {
        app.eventually(&format!("/products/D{i}"), |_| true).await;
    }
    app.eventually("/products/B0", |v| v["stock"]["quantity"] == sent - 1).await;
    app.eventually("/products/X1", |_| true).await;
    let (status, _) = app.get_json("/readyz").await;
    assert_eq!(status, 200);
    assert_eq!(queue_depth(&aws, var(&env, "CATALOG_DLQ")).await, (1, 0), "only the invalid event is left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_worker_mid_batch_loses_nothing_and_verifies_clean() {
    require_moto!();
    const ROUNDS: u64 = 3;
    let mut env = aws_env("kill9");
    // Messages a killed worker had in flight come back after this.
    env.push(("CATALOG_SQS_VISIBILITY_SECS".into(), "3".into()));
    // SQS counts every receive, a dead worker's too: at the default redrive limit of 3, a
    // message in flight at each of the three kills would rightly be dead-lettered as one
    // that keeps killing its workers. Above the kills, the test sees only what a crash loses.
    env.push(("CATALOG_SQS_MAX_RECEIVE_COUNT".into(), "10".into()));
    infra_init(&env);
    let api = serve(&env, "api");
    let aws = clients().await;
    let bus = var(&env, "CATALOG_BUS").to_owned();
    for round in 0..ROUNDS {
        let mut worker = serve(&env, "worker");
        for chunk in 0..3 {
            let mut events: Vec<Value> = (0..8).map(|i| product(&format!("K{round}-{chunk}{i}"), "Kettle", "Kitchen")).collect();
            events.push(price("K0-00", &format!("{}.00", round + 1), "USD", round + 1));
            events.push(json!({"source": "inventory.service", "detail-type": "Inventory Update",
                "detail": {"productId": "K0-00", "quantity": round}}));
            aws.put_events(&bus, &events).await;
        }
        // Mid-batch: the worker is receiving and writing these when it dies.
        tokio::time::sleep(Duration::from_millis(300 + 200 * round)).await;
        worker.kill9();
    }
    let _worker = serve(&env, "worker");
    let last = ROUNDS - 1;
    api.eventually("/products/K0-00", |v| {
        v["displayPrice"] == format!("${}.00", last + 1).as_str() && v["stock"]["quantity"] == last
    })
    .await;
    let mut expected: Vec<String> =
        (0..ROUNDS).flat_map(|r| (0..3).flat_map(move |c| (0..8).map(move |i| format!("K{r}-{c}{i}")))).collect();
    expected.sort();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (ids, _) = api.listing("Kitchen", 50).await;
        if ids == expected {
            break;
        }
        if Instant::now() >= deadline {
            let dlq = queue_depth(&aws, var(&env, "CATALOG_DLQ")).await;
            panic!("the listing never held every product: {} of {}; DLQ (waiting, in flight) {dlq:?}", ids.len(), expected.len());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    until("the queue drains", Duration::from_secs(30), async || {
        queue_depth(&aws, var(&env, "CATALOG_INGEST_QUEUE")).await == (0, 0)
    })
    .await;
    assert_eq!(queue_depth(&aws, var(&env, "CATALOG_DLQ")).await, (0, 0), "a crash is not the messages' fault");
    let none = tempfile::tempdir().unwrap();
    let (ok, out) = catalog(&["replay", "verify", "--backend", "aws"], &env, none.path());
    assert!(ok, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_table_slows_the_pipeline_down_but_loses_nothing_and_opens_nothing() {
    require_moto!();
    let mut env = aws_env("throttled");
    infra_init(&env);
    let (proxy, throttled) = dynamodb_proxy(Fault::Throttle).await;
    env.push(("AWS_ENDPOINT_URL_DYNAMODB".into(), proxy));
    let app = serve(&env, "all");
    let aws = clients().await;
    let bus = var(&env, "CATALOG_BUS").to_owned();
    for chunk in 0..3 {
        let mut events: Vec<Value> = (0..8).map(|i| product(&format!("T{chunk}{i}"), "Throttled", "Slow")).collect();
        events.push(price("T00", &format!("{}.00", chunk + 1), "USD", chunk + 1));
        events.push(json!({"source": "inventory.service", "detail-type": "Inventory Update", "detail": {"productId": "T00", "quantity": chunk}}));
        aws.put_events(&bus, &events).await;
    }
    // Slowly: the SDK backs off on each throttle, then the held batch does.
    until("the last price and stock show", Duration::from_secs(120), async || {
        let (_, v) = app.get_json("/products/T00").await;
        v["displayPrice"] == "$3.00" && v["stock"]["quantity"] == 2
    })
    .await;
    until("every product is listed", Duration::from_secs(60), async || app.listing("Slow", 50).await.0.len() == 24).await;
    until("the queue drains", Duration::from_secs(30), async || {
        queue_depth(&aws, var(&env, "CATALOG_INGEST_QUEUE")).await == (0, 0)
    })
    .await;
    assert!(throttled.load(std::sync::atomic::Ordering::SeqCst) > 10, "the proxy throttled too little to prove anything");
    assert_eq!(app.metric("catalog_breaker_transitions_total{to=\"open\"}").await, 0.0, "a throttle is not an outage");
    assert_eq!(queue_depth(&aws, var(&env, "CATALOG_DLQ")).await, (0, 0), "a throttle is not the messages' fault");
    let none = tempfile::tempdir().unwrap();
    let (ok, out) = catalog(&["replay", "verify", "--backend", "aws"], &env, none.path());
    assert!(ok, "{out}");
}
