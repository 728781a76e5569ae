//! `spawn_app()`: the real `catalog` binary on port 0 with its own data dir, and typed helpers.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

#[macro_use]
pub mod aws;
pub mod moto;
pub mod otlp;

pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub data_dir: PathBuf,
    child: Option<Child>,
    _dir: Option<tempfile::TempDir>,
}

#[derive(Default)]
pub struct Options {
    pub args: Vec<String>,
    pub envs: Vec<(String, String)>,
}

pub fn spawn_app() -> TestApp {
    spawn_with(Options::default())
}

pub fn spawn_with(options: Options) -> TestApp {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut app = start_in(dir.path(), &options);
    app._dir = Some(dir);
    app
}

/// Starts the binary on an existing data dir (restarts, crash recovery).
pub fn start_in(data_dir: &Path, options: &Options) -> TestApp {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_catalog"));
    cmd.args(["serve", "--addr", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .args(&options.args)
        .env("CATALOG_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in &options.envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn catalog");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let base = loop {
        let line = lines.next().expect("catalog exited before listening").expect("read stdout");
        if let Some(addr) = line.strip_prefix("catalog listening on ") {
            break addr.to_owned();
        }
    };
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    TestApp { base, client: reqwest::Client::new(), data_dir: data_dir.to_owned(), child: Some(child), _dir: None }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.expect("GET")
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let r = self.get(path).await;
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn post_events(&self, body: &Value) -> reqwest::Response {
        self.client.post(self.url("/events")).json(body).send().await.expect("POST /events")
    }

    /// Posts and asserts 202 with every entry accepted.
    pub async fn ingest(&self, body: &Value) {
        let n = body.as_array().map_or(1, Vec::len);
        let r = self.post_events(body).await;
        assert_eq!(r.status(), 202, "POST /events");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["accepted"], n);
    }

    /// Polls until `path` answers 200 and `check` holds on its JSON.
    pub async fn eventually(&self, path: &str, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let (status, body) = self.get_json(path).await;
            if status == 200 && check(&body) {
                return body;
            }
            assert!(Instant::now() < deadline, "{path} never satisfied the check; last: {status} {body}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls `/readyz` until the read model reflects every log entry up to `sequence`. A view
    /// answering is not enough before a listing: a GET fills one product's view from the store
    /// (cache-aside) while the pipeline may still be on the products before it.
    pub async fn caught_up(&self, sequence: u64) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let (_, ready) = self.get_json("/readyz").await;
            let checkpoint = ready["checks"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c["detail"].as_str()?.rsplit_once("checkpoint ")?.1.parse::<u64>().ok())
                .next();
            if checkpoint.is_some_and(|c| c >= sequence) {
                return;
            }
            assert!(Instant::now() < deadline, "the read model never reached sequence {sequence}; last: {ready}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every id of a category listing, walked page by page with `nextCursor`; and how many
    /// pages that took.
    pub async fn listing(&self, category: &str, limit: usize) -> (Vec<String>, usize) {
        let (mut ids, mut pages) = (Vec::new(), 0);
        let mut cursor: Option<String> = None;
        loop {
            let mut path = format!("/products?category={category}&limit={limit}");
            if let Some(c) = &cursor {
                path.push_str(&format!("&cursor={c}"));
            }
            let (status, page) = self.get_json(&path).await;
            assert_eq!(status, 200, "{page}");
            pages += 1;
            ids.extend(page["items"].as_array().unwrap().iter().map(|v| v["product"]["id"].as_str().unwrap().to_owned()));
            match page["nextCursor"].as_str() {
                Some(next) => cursor = Some(next.to_owned()),
                None => return (ids, pages),
            }
        }
    }

    pub async fn metric(&self, name_and_labels: &str) -> f64 {
        let text = self.get("/metrics").await.text().await.unwrap();
        text.lines()
            .filter(|l| l.starts_with(name_and_labels))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .fold(0.0, |a, b| a + b)
    }

    /// Waits (20 s at most) until `name_and_labels` reads at least `at_least`; `what` says
    /// what failed to happen if it never does.
    pub async fn metric_reaches(&self, name_and_labels: &str, at_least: f64, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.metric(name_and_labels).await < at_least {
            assert!(Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM and wait: the graceful path.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill -TERM");
            let status = child.wait().expect("wait");
            assert!(status.success(), "graceful shutdown exited with {status}");
        }
    }

    /// SIGKILL: no chance to flush or drain.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("kill -9");
            child.wait().expect("wait");
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn product(id: &str, name: &str, category: &str) -> Value {
    serde_json::json!({"source": "product.service", "detail-type": "Product Update",
        "detail": {"productId": id, "name": name, "category": category, "status": "created"}})
}

pub fn price(id: &str, price: &str, currency: &str, version: u64) -> Value {
    let price: serde_json::Number = price.parse().unwrap();
    serde_json::json!({"source": "pricing.service", "detail-type": "Price Update",
        "detail": {"productId": id, "price": price, "currency": currency, "version": version}})
}

pub fn stock(id: &str, quantity: u64, version: u64) -> Value {
    serde_json::json!({"source": "inventory.service", "detail-type": "Inventory Update",
        "detail": {"productId": id, "quantity": quantity, "version": version}})
}

pub const SEED: &str = r#"{"source":"product.service","detail-type":"Product Update","detail":{"productId":"P123","name":"Laptop","price":999.99,"status":"updated"}}"#;
