//! The Grafana dashboard against a real Prometheus (Debian's `prometheus`): it scrapes a loaded
//! embedded catalog and, with moto, a loaded AWS-mode one, and every query of every panel must
//! return live figures through Prometheus's HTTP API.

#[macro_use]
mod helpers;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use helpers::{Options, TestApp, price, product, spawn_with};
use serde_json::{Value, json};

const DASHBOARD: &str = "deploy/grafana/dashboards/catalog.json";
/// Where scripts/test says the Prometheus server is, when it is not on the PATH.
const PROMETHEUS: &str = "CATALOG_TEST_PROMETHEUS";
/// Grafana's `$__rate_interval` is at least four scrape intervals; the test scrapes every second.
const RATE_INTERVAL: &str = "15s";

fn prometheus_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(PROMETHEUS) {
        return Some(p.into());
    }
    std::env::var_os("PATH")?.to_str()?.split(':').map(|dir| Path::new(dir).join("prometheus")).find(|p| p.is_file())
}

/// Every query of every panel, `$__rate_interval` substituted.
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(DASHBOARD)).unwrap();
    let dashboard: Value = serde_json::from_str(&text).unwrap();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap().replace("$__rate_interval", RATE_INTERVAL);
            assert!(!expr.contains('$'), "a variable the test does not know: {expr}");
            queries.push((format!("{} / {}", panel["title"].as_str().unwrap(), target["legendFormat"]), expr));
        }
    }
    queries
}

struct Prometheus {
    child: Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn start_prometheus(binary: &Path, targets: &[&str]) -> Prometheus {
    let dir = tempfile::tempdir().unwrap();
    let targets: Vec<String> = targets.iter().map(|t| format!("'{}'", t.trim_start_matches("http://"))).collect();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: catalog\n    static_configs:\n      - targets: [{}]\n",
        targets.join(", ")
    );
    std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
    let port = free_port();
    let child = Command::new(binary)
        .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start prometheus");
    Prometheus { child, base: format!("http://127.0.0.1:{port}"), _dir: dir }
}

impl Prometheus {
    async fn query(&self, client: &reqwest::Client, expr: &str) -> Value {
        let encoded = percent_encoding::utf8_percent_encode(expr, percent_encoding::NON_ALPHANUMERIC);
        let r = client.get(format!("{}/api/v1/query?query={encoded}", self.base)).send().await.unwrap();
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["status"], "success", "{expr}: {body}");
        body["data"]["result"].clone()
    }

    async fn ready(&self, client: &reqwest::Client) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while client.get(format!("{}/-/ready", self.base)).send().await.map(|r| r.status().as_u16()).ok() != Some(200) {
            assert!(Instant::now() < deadline, "prometheus did not become ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A finite number in an instant-query result: the query has live figures.
fn has_figures(result: &Value) -> bool {
    result.as_array().is_some_and(|series| {
        series.iter().any(|s| s["value"][1].as_str().and_then(|v| v.parse::<f64>().ok()).is_some_and(f64::is_finite))
    })
}

/// Writes, invalid events, hits and misses against one catalog for `length`.
async fn load_embedded(app: &TestApp, length: Duration) {
    let started = Instant::now();
    let mut n = 0;
    while started.elapsed() < length {
        n += 1;
        app.ingest(&json!([product(&format!("L{n}"), "Load", "Dash"), price(&format!("L{n}"), "1.50", "USD", 1)])).await;
        let bad = json!({"source": "pricing.service", "detail-type": "Price Update", "detail": {"productId": "BAD", "price": -1, "currency": "USD"}});
        app.ingest(&bad).await;
        let _ = app.get(&format!("/products/L{}", n.max(2) - 1)).await;
        let _ = app.get("/products/NOPE").await;
        let _ = app.get("/products?category=Dash").await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn load_aws(app: &TestApp, env: &[(String, String)], length: Duration) {
    let aws = helpers::aws::clients().await;
    let queue = helpers::aws::var(env, "CATALOG_INGEST_QUEUE");
    let started = Instant::now();
    let mut n = 0;
    while started.elapsed() < length {
        n += 1;
        aws.send_raw(queue, &[product(&format!("W{n}"), "Load", "Dash").to_string()]).await;
        let _ = app.get(&format!("/products/W{}", n.max(2) - 1)).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_dashboard_query_returns_live_figures_from_prometheus() {
    let Some(binary) = prometheus_binary() else {
        eprintln!("skipped: needs Prometheus (apt-get install prometheus, or set {PROMETHEUS}); scripts/test installs it");
        return;
    };
    // Its dead letters are on purpose: no warning line for each.
    let quiet = || Options { envs: vec![("CATALOG_LOG".into(), "error".into())], ..Default::default() };
    let embedded = spawn_with(quiet());
    // The AWS-calls panel has figures only from an AWS-mode catalog: with moto, one is loaded too.
    let aws = std::env::var_os(helpers::aws::MOTO_ENDPOINT).map(|_| {
        let mut env = helpers::aws::aws_env("dashboard");
        helpers::aws::infra_init(&env);
        env.extend(quiet().envs);
        (helpers::aws::serve(&env, "all"), env)
    });
    let mut targets = vec![embedded.base.as_str()];
    if let Some((app, _)) = &aws {
        targets.push(app.base.as_str());
    }
    let prometheus = start_prometheus(&binary, &targets);
    let client = reqwest::Client::new();
    prometheus.ready(&client).await;

    let length = Duration::from_secs(8);
    match &aws {
        Some((app, env)) => tokio::join!(load_embedded(&embedded, length), load_aws(app, env, length)).0,
        None => load_embedded(&embedded, length).await,
    }

    let up = prometheus.query(&client, "up").await;
    assert_eq!(up.as_array().map(Vec::len), Some(targets.len()), "{up}");
    let mut missing = Vec::new();
    for (name, expr) in dashboard_queries() {
        let aws_only = expr.contains("catalog_aws_");
        if aws_only && aws.is_none() {
            eprintln!("not checked without moto: {name}");
            continue;
        }
        // A second look after a scrape or two, for a figure that had just one sample in its window.
        let mut result = prometheus.query(&client, &expr).await;
        for _ in 0..5 {
            if has_figures(&result) {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            result = prometheus.query(&client, &expr).await;
        }
        if !has_figures(&result) {
            missing.push(format!("{name}: {expr} → {result}"));
        }
    }
    assert!(missing.is_empty(), "panels without live figures:\n{}", missing.join("\n"));
}
