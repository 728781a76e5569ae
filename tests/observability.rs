//! What an operator reads without a dashboard: every answer counted in /metrics, build and
//! process figures, reasons that exist before the first dead letter, one log line per dead
//! letter, and JSON logs on request.

mod helpers;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use helpers::*;
use serde_json::{Value, json};

#[tokio::test]
async fn metrics_count_every_status_and_show_build_and_process_figures() {
    let app = spawn_app();
    let fresh = app.get("/metrics").await.text().await.unwrap();
    assert!(
        fresh.contains("catalog_pipeline_events_dead_lettered_total{code=\"invalid_price\"} 0"),
        "every dead-letter reason exists at zero before the first one:\n{fresh}"
    );
    assert!(fresh.contains("catalog_build_info{version=\""), "{fresh}");
    for family in ["process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds", "process_max_fds"] {
        let value = fresh.lines().find(|l| l.starts_with(family)).and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
        assert!(value.is_some_and(|v| v >= 0.0), "{family} in:\n{fresh}");
    }
    assert!(app.metric("process_resident_memory_bytes").await > 0.0);

    app.get("/nope").await;
    app.client.delete(app.url("/healthz")).send().await.unwrap();
    app.client.post(app.url("/events")).body("{}").send().await.unwrap();
    // A request hyper itself refuses (no such method token): counted as the 400 it gets.
    let addr = app.base.trim_start_matches("http://").to_owned();
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(b"G\x01T / HTTP/1.1\r\n\r\n").unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
    })
    .await
    .unwrap();
    for (status, at_least) in [("404", 1.0), ("405", 1.0), ("415", 1.0), ("400", 1.0), ("200", 1.0)] {
        let n = app.metric(&format!("catalog_http_responses_total{{status=\"{status}\"}}")).await;
        assert!(n >= at_least, "status {status}: {n}");
    }
}

/// Runs `serve` with its stderr captured until `ready` has been seen, returning the lines.
fn serve_logging(envs: &[(&str, &str)], then: impl FnOnce(&str)) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_catalog"))
        .args(["serve", "--addr", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .envs(envs.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let base = loop {
        let line = stdout.next().expect("listening line").unwrap();
        if let Some(addr) = line.strip_prefix("catalog listening on ") {
            break addr.to_owned();
        }
    };
    then(&base);
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap()).lines().map(Result::unwrap).collect();
    child.wait().unwrap();
    stderr
}

fn post_and_wait_for_dead_letter(base: &str) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let client = reqwest::Client::new();
        let r = client
            .post(format!("{base}/events"))
            .json(&json!([{"source": "pricing.service", "detail-type": "Price Update",
                           "detail": {"productId": "D1", "price": -1, "currency": "USD"}}]))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        for _ in 0..200 {
            let text = client.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
            if text.contains("catalog_dead_letters 1") {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        panic!("the dead letter never showed");
    });
}

#[test]
fn one_log_line_per_dead_letter() {
    let lines = serve_logging(&[("CATALOG_LOG", "info")], post_and_wait_for_dead_letter);
    let dead: Vec<&String> = lines.iter().filter(|l| l.contains("dead-letter") || l.contains("invalid message")).collect();
    assert_eq!(dead.len(), 1, "{dead:#?}");
    assert!(dead[0].contains("invalid_price"), "{}", dead[0]);
}

#[test]
fn json_logs_are_one_object_per_line_with_their_fields() {
    let lines = serve_logging(&[("CATALOG_LOG", "info"), ("CATALOG_LOG_FORMAT", "json")], post_and_wait_for_dead_letter);
    assert!(!lines.is_empty());
    let parsed: Vec<Value> = lines.iter().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}"))).collect();
    let dead = parsed.iter().find(|v| v["message"] == "message dead-lettered").expect("the dead letter's line");
    assert_eq!(dead["code"], "invalid_price");
    assert_eq!(dead["level"], "WARN");
}

#[test]
fn requests_are_logged_at_debug() {
    let lines = serve_logging(&[("CATALOG_LOG", "catalog_api=debug,warn")], |base| {
        let out = Command::new("curl").args(["-s", &format!("{base}/healthz")]).output().unwrap();
        assert!(out.status.success());
    });
    assert!(lines.iter().any(|l| l.contains("request") && l.contains("/healthz") && l.contains("status=200")), "{lines:#?}");
}

#[test]
fn json_logs_carry_the_trace_and_a_missing_collector_stops_nothing() {
    // Nothing listens on port 9 of the loopback: every export fails, the service goes on.
    let envs = [
        ("CATALOG_LOG", "info"),
        ("CATALOG_LOG_FORMAT", "json"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "200"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let lines = serve_logging(&envs, post_and_wait_for_dead_letter);
    let parsed: Vec<Value> = lines.iter().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}"))).collect();
    let dead = parsed.iter().find(|v| v["message"] == "message dead-lettered").expect("the dead letter's line");
    let trace_id = dead["trace_id"].as_str().unwrap_or_else(|| panic!("no trace_id: {dead}"));
    assert!(trace_id.len() == 32 && trace_id.chars().all(|c| c.is_ascii_hexdigit()), "{dead}");
    assert_eq!(dead["span_id"].as_str().map(str::len), Some(16), "{dead}");
    assert!(
        parsed.iter().any(|v| v["message"].as_str().is_some_and(|m| m.contains("OTLP metrics export failed"))),
        "the failing export is said once: {lines:#?}"
    );
}
