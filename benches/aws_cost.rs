//! The AWS bill per million events, priced from the project's own counters (docs/cost-model.md):
//! a worker and two API instances on the moto server, events sent through EventBridge
//! PutEvents exactly as producers send them. Batching and coalescing move these figures; the
//! machine does not, so moto is a fair stand-in for counting.
//!
//! cargo bench --bench aws_cost          (CATALOG_COST_EVENTS to change the count)

#[path = "../tests/helpers/moto.rs"]
mod moto;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const DEFAULT_EVENTS: usize = 1_000;
const API_INSTANCES: usize = 2;
// List prices, us-east-1 (docs/cost-model.md).
const SQS_PER_REQUEST: f64 = 0.40e-6;
const EVENTBRIDGE_PER_EVENT: f64 = 1.00e-6;
const DYNAMODB_PER_WRU: f64 = 0.625e-6;
const DYNAMODB_PER_RRU: f64 = 0.125e-6;
const SEED_DESIGN_PER_MILLION: f64 = 3.30;

struct Instance {
    child: Child,
    base: String,
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}

fn start(env: &[(String, String)], role: &str, dir: &Path) -> Instance {
    let mut child = Command::new(env!("CARGO_BIN_EXE_catalog"))
        .args(["serve", "--addr", "127.0.0.1:0", "--role", role, "--data-dir"])
        .arg(dir)
        .envs(env.iter().cloned())
        .env("CATALOG_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let base = loop {
        let line = lines.next().expect("catalog exited").unwrap();
        if let Some(a) = line.strip_prefix("catalog listening on ") {
            break a.to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Instance { child, base }
}

async fn metric(client: &reqwest::Client, base: &str, name: &str) -> f64 {
    let text = client.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines().filter(|l| l.starts_with(name)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).fold(0.0, |a, b| a + b)
}

/// `total` events over products such that in every group of 10 (one PutEvents call, about one
/// SQS batch) `repeat_share` of them hit a product already in the group.
fn events(total: usize, repeat_share: f64) -> Vec<Value> {
    let repeats_per_ten = (repeat_share * 10.0).round() as usize;
    let mut out = Vec::with_capacity(total);
    let mut next_product = 0usize;
    for group in 0..total.div_ceil(10) {
        let mut ids = Vec::new();
        for i in 0..10 {
            let id = if i >= 10 - repeats_per_ten {
                ids[i - (10 - repeats_per_ten)]
            } else {
                next_product += 1;
                next_product
            };
            ids.push(id);
            let version = group * 10 + i + 1;
            out.push(json!({"source": "inventory.service", "detail-type": "Inventory Update",
                "detail": {"productId": format!("C{id:06}"), "quantity": version % 97, "version": version}}));
        }
    }
    out.truncate(total);
    out
}

struct Figures {
    sqs: f64,
    wru: f64,
    wru_reported: f64,
    rru: f64,
    eventbridge: f64,
    deliveries: f64,
}

async fn run(endpoint: &str, total: usize, repeat_share: f64, label: &str) -> Figures {
    let suffix = format!("cost-{label}-{}", std::process::id());
    let env = moto::moto_env(endpoint, &suffix);
    let init = Command::new(env!("CARGO_BIN_EXE_catalog")).args(["infra", "init"]).envs(env.iter().cloned()).output().unwrap();
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let dirs: Vec<tempfile::TempDir> = (0..=API_INSTANCES).map(|_| tempfile::tempdir().unwrap()).collect();
    let worker = start(&env, "worker", dirs[0].path());
    let apis: Vec<Instance> = (1..=API_INSTANCES).map(|i| start(&env, "api", dirs[i].path())).collect();

    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_sqs::config::Credentials::new("test", "test", None, None, "bench"))
        .load()
        .await;
    let eventbridge = aws_sdk_eventbridge::Client::new(&config);
    let bus = format!("bus-{suffix}");
    for chunk in events(total, repeat_share).chunks(10) {
        let entries = chunk
            .iter()
            .map(|e| {
                aws_sdk_eventbridge::types::PutEventsRequestEntry::builder()
                    .event_bus_name(&bus)
                    .source(e["source"].as_str().unwrap())
                    .detail_type(e["detail-type"].as_str().unwrap())
                    .detail(e["detail"].to_string())
                    .build()
            })
            .collect();
        eventbridge.put_events().set_entries(Some(entries)).send().await.unwrap();
    }
    let client = reqwest::Client::new();
    let started = Instant::now();
    while metric(&client, &worker.base, "catalog_pipeline_messages_acked_total").await < total as f64 {
        assert!(started.elapsed() < Duration::from_secs(300), "the worker did not finish in 5 minutes");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Let the API instances drain their invalidation queues.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut figures = Figures { sqs: 0.0, wru: 0.0, wru_reported: 0.0, rru: 0.0, eventbridge: 0.0, deliveries: 0.0 };
    for instance in std::iter::once(&worker).chain(apis.iter()) {
        figures.sqs += metric(&client, &instance.base, "catalog_aws_sqs_billed_requests_total").await;
        // moto reports 1 unit per BatchWriteItem call and none for UpdateItem: price the
        // larger of what the service reported and the units by item size.
        let reported = metric(&client, &instance.base, "catalog_aws_dynamodb_write_units_total").await;
        let estimated = metric(&client, &instance.base, "catalog_aws_dynamodb_estimated_write_units_total").await;
        figures.wru_reported += reported;
        figures.wru += reported.max(estimated);
        figures.rru += metric(&client, &instance.base, "catalog_aws_dynamodb_read_units_total").await;
        figures.eventbridge += metric(&client, &instance.base, "catalog_aws_eventbridge_entries_total").await;
    }
    // What AWS does on our behalf and bills us for, which no client of ours sees: the ingest
    // rule's delivery of each event to SQS, and each invalidation's delivery to each API queue.
    figures.deliveries = total as f64 + figures.eventbridge * API_INSTANCES as f64;
    let per = |x: f64| x / total as f64;
    Figures {
        sqs: per(figures.sqs),
        wru: per(figures.wru),
        wru_reported: per(figures.wru_reported),
        rru: per(figures.rru),
        eventbridge: per(figures.eventbridge),
        deliveries: per(figures.deliveries),
    }
}

fn dollars(f: &Figures) -> [(&'static str, f64); 5] {
    [
        ("SQS requests made by worker and API instances", f.sqs * SQS_PER_REQUEST * 1e6),
        ("SQS deliveries by EventBridge (ingest + invalidations)", f.deliveries * SQS_PER_REQUEST * 1e6),
        ("DynamoDB write units", f.wru * DYNAMODB_PER_WRU * 1e6),
        ("DynamoDB read units", f.rru * DYNAMODB_PER_RRU * 1e6),
        ("EventBridge invalidation entries", f.eventbridge * EVENTBRIDGE_PER_EVENT * 1e6),
    ]
}

fn main() {
    let total: usize = std::env::var("CATALOG_COST_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_EVENTS);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (endpoint, started_moto) = match std::env::var("CATALOG_TEST_AWS_ENDPOINT") {
        Ok(e) => (e, false),
        Err(_) => {
            let out = Command::new(root.join("scripts/moto")).arg("start").output().unwrap();
            assert!(out.status.success(), "scripts/moto start failed: {}", String::from_utf8_lossy(&out.stderr));
            (String::from_utf8(out.stdout).unwrap().trim().to_owned(), true)
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let results: Vec<(&str, Figures)> = rt.block_on(async {
        let mut r = Vec::new();
        for (label, share) in [("0% same-product", 0.0), ("20% same-product", 0.2)] {
            r.push((label, run(&endpoint, total, share, &label[..2].replace('%', "")).await));
        }
        r
    });
    if started_moto {
        let _ = Command::new(root.join("scripts/moto")).arg("stop").status();
    }
    println!(
        "AWS bill per million events: {total} events per scenario, 1 worker + {API_INSTANCES} API instances, list prices us-east-1"
    );
    println!(
        "(worker and API compute are containers, not priced here; the seed's Lambda column is; producers' PutEvents excluded)\n"
    );
    for (label, f) in &results {
        println!(
            "{label}: per event {:.3} SQS requests + {:.3} deliveries, {:.3} WRU (moto reported {:.3}), {:.3} RRU, {:.3} EventBridge entries",
            f.sqs, f.deliveries, f.wru, f.wru_reported, f.rru, f.eventbridge
        );
        let mut total_cost = 0.0;
        for (item, cost) in dollars(f) {
            println!("  {item:<56} ${cost:>6.3}");
            total_cost += cost;
        }
        println!(
            "  {:<56} ${total_cost:>6.3}   = {:.2}× the seed design's ${SEED_DESIGN_PER_MILLION:.2}\n",
            "total per million events",
            total_cost / SEED_DESIGN_PER_MILLION
        );
    }
}
