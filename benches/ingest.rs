//! Embedded pipeline, end to end, against the release binary on 127.0.0.1 with its own data
//! dir: events/s from `POST /events` to visible in the read model, then event → visible
//! latency at half that rate. Prints its figures.
//!
//! cargo bench --bench ingest            (CATALOG_BENCH_EVENTS to change the count,
//!                                        CATALOG_BENCH_LATENCY_SECS the paced phase's length,
//!                                        CATALOG_BENCH_MIX=distinct for one Product Update
//!                                        per product, the PostgreSQL peer's workload;
//!                                        CATALOG_BENCH_DUMP=FILE writes the events as JSON
//!                                        lines and exits, for scripts/bench-peer;
//!                                        CATALOG_BENCH_PACED_RATE=R paces at R events/s instead
//!                                        of half the max, to compare two settings at one load;
//!                                        with CATALOG_BENCH_URL it runs only the paced phase,
//!                                        against CATALOG_BENCH_PRODUCTS products already
//!                                        loaded, for scripts/bench-scale;
//!                                        CATALOG_BENCH_PROBES=FILE writes every probe of the
//!                                        paced phase as a line: its start in Unix seconds, ms
//!                                        to the 202, ms to visible, to line slow ones up with
//!                                        the server's log or a trace)

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

const DEFAULT_EVENTS: usize = 100_000;
const BATCH: usize = 1_000;
const POSTERS: usize = 4;
/// Paced phase: events per POST, one of them a probe whose visibility is timed.
const PACED_BATCH: usize = 100;
const DEFAULT_LATENCY_SECS: u64 = 10;
/// How often a probe's product is re-read while waiting for it to show the probe, at first.
const PROBE_POLL: Duration = Duration::from_micros(250);
/// A probe that has waited `t` re-reads every `t / PROBE_BACKOFF` (and never more often than
/// [`PROBE_POLL`]; tokio's timer rounds that up to its millisecond), so its latency is
/// measured to within about 3% or a millisecond. At a fixed interval every probe still waiting
/// re-read about a thousand times a second: one pause of the server put dozens of probes in
/// that loop, and the GETs they sent took the CPU the server needed to catch up (BENCHMARKS.md,
/// round fifteen).
const PROBE_BACKOFF: u32 = 32;

/// One Product Update for each of `total` distinct products: what scripts/bench-peer gives
/// PostgreSQL too.
fn distinct_events(total: usize) -> Vec<Value> {
    (0..total)
        .map(|p| {
            json!({"source":"product.service","detail-type":"Product Update","detail":{"productId":format!("P{p:07}"),
                "name":format!("Product {p}"),"category":format!("C{}", p % 100),"status":"created","version":1}})
        })
        .collect()
}

fn events(total: usize) -> Vec<Value> {
    if std::env::var("CATALOG_BENCH_MIX").is_ok_and(|m| m == "distinct") {
        return distinct_events(total);
    }
    let products = total / 4;
    let mut out = Vec::with_capacity(total);
    for round in 0..4 {
        for p in 0..products {
            let id = format!("P{p:07}");
            out.push(match round {
                0 => json!({"source":"product.service","detail-type":"Product Update","detail":{"productId":id,"name":format!("Product {p}"),"category":format!("C{}", p % 100),"status":"created","version":1}}),
                1 => json!({"source":"pricing.service","detail-type":"Price Update","detail":{"productId":id,"price":19.99,"currency":"USD","version":1}}),
                2 => json!({"source":"inventory.service","detail-type":"Inventory Update","detail":{"productId":id,"quantity":p % 50,"version":1}}),
                _ => json!({"source":"inventory.service","detail-type":"Inventory Update","detail":{"productId":id,"quantity":p % 7,"version":2}}),
            });
        }
    }
    out
}

/// CPU seconds (user + system, and the system part alone) the server has used so far, from
/// /proc (Linux ticks of 10 ms): steadier than wall-clock rates on a shared machine, so A/B runs
/// compare it too; the system part tells a run that cost more in system calls and page faults
/// from one that did more folding.
fn cpu_seconds(pid: u32) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some((catalog_api::metrics::cpu_seconds(&stat)?, catalog_api::metrics::system_seconds(&stat)?))
}

async fn checkpoint(client: &reqwest::Client, base: &str) -> u64 {
    let ready: Value = client.get(format!("{base}/readyz")).send().await.unwrap().json().await.unwrap();
    let detail = ready["checks"][0]["detail"].as_str().unwrap_or_default().to_owned();
    detail.rsplit("checkpoint ").next().and_then(|n| n.trim().parse().ok()).unwrap_or(0)
}

/// Event → visible at a steady `rate`: POSTs of `PACED_BATCH` inventory updates to products
/// already in the catalog, each batch carrying one probe; a probe's latency runs from just
/// before its POST (so it includes the durable 202) to the first GET that shows it.
async fn paced_latency(client: &reqwest::Client, base: &str, products: usize, rate: f64, length: Duration) {
    let interval = Duration::from_secs_f64(PACED_BATCH as f64 / rate);
    let batches = (length.as_secs_f64() / interval.as_secs_f64()).ceil() as usize;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut probes = Vec::with_capacity(batches);
    let mut next_product = 0usize;
    let before = metrics_text(client, base).await;
    let started = Instant::now();
    for b in 0..batches {
        ticker.tick().await;
        let version = 3 + b as u64;
        let body: Vec<Value> = (0..PACED_BATCH)
            .map(|_| {
                next_product = (next_product + 1) % products;
                json!({"source":"inventory.service","detail-type":"Inventory Update",
                    "detail":{"productId":format!("P{next_product:07}"),"quantity":1000 + version,"version":version}})
            })
            .collect();
        let probe = format!("P{next_product:07}");
        let expected = 1000 + version;
        let (client, base) = (client.clone(), base.to_owned());
        probes.push(tokio::spawn(async move {
            let sent = Instant::now();
            let sent_at = SystemTime::now();
            let r = client
                .post(format!("{base}/events"))
                .header("content-type", "application/json")
                .body(serde_json::to_vec(&body).unwrap())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 202);
            let accepted = sent.elapsed();
            loop {
                let view: Value = client.get(format!("{base}/products/{probe}")).send().await.unwrap().json().await.unwrap();
                if view["stock"]["quantity"].as_u64() == Some(expected) {
                    return Probe { sent_at, accepted, visible: sent.elapsed() };
                }
                tokio::time::sleep(PROBE_POLL.max(sent.elapsed() / PROBE_BACKOFF)).await;
            }
        }));
    }
    if probes.is_empty() {
        return;
    }
    let mut done = Vec::with_capacity(probes.len());
    for p in probes {
        done.push(p.await.unwrap());
    }
    if let Ok(path) = std::env::var("CATALOG_BENCH_PROBES") {
        let lines: String = done
            .iter()
            .map(|p| {
                let at = p.sent_at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
                format!("{at:.6} {:.3} {:.3}\n", p.accepted.as_secs_f64() * 1e3, p.visible.as_secs_f64() * 1e3)
            })
            .collect();
        std::fs::write(&path, lines).unwrap();
    }
    let mut latencies: Vec<Duration> = done.iter().map(|p| p.visible).collect();
    let achieved = (batches * PACED_BATCH) as f64 / started.elapsed().as_secs_f64();
    latencies.sort();
    let q = |f: f64| latencies[((latencies.len() as f64 * f) as usize).min(latencies.len() - 1)];
    println!(
        "  event → visible at {achieved:.0} events/s, {} probes: p50 {:.2?} · p99 {:.2?} · max {:.2?}",
        latencies.len(),
        q(0.50),
        q(0.99),
        latencies[latencies.len() - 1]
    );
    // The server's own histograms over this phase alone (a load before it would blur them):
    // which part of the tail is the durable 202 and which the write stage.
    let after = metrics_text(client, base).await;
    let p99 = |name: &str, labels: &str| {
        p99_bound(&histogram(&after, name, labels), &histogram(&before, name, labels))
            .map_or_else(|| "?".to_owned(), |le| format!("{:.1} ms", le * 1e3))
    };
    println!(
        "  event → visible, the server's part: durable 202 p99 ≤ {} · write stage p99 ≤ {} (histogram bounds)",
        p99("catalog_http_request_duration_seconds", r#"route="post_events",status="202""#),
        p99("catalog_pipeline_stage_duration_seconds", r#"stage="write""#),
    );
}

/// One probe of the paced phase: when its POST left, how long its 202 and its visibility took.
struct Probe {
    sent_at: SystemTime,
    accepted: Duration,
    visible: Duration,
}

async fn metrics_text(client: &reqwest::Client, base: &str) -> String {
    client.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap()
}

/// A histogram's cumulative bucket counts by upper bound, from the Prometheus text: the
/// series `name` with `labels` among its labels.
fn histogram(text: &str, name: &str, labels: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    text.lines()
        .filter(|l| l.starts_with(&prefix) && l.contains(labels))
        .filter_map(|l| {
            let le = l[prefix.len()..].split('"').next()?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((le, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect()
}

/// The upper bound of the bucket holding the 99th percentile of what `after` counted past `before`.
fn p99_bound(after: &[(f64, f64)], before: &[(f64, f64)]) -> Option<f64> {
    let count = |buckets: &[(f64, f64)], le: f64| buckets.iter().find(|b| b.0 == le).map_or(0.0, |b| b.1);
    let total = count(after, f64::INFINITY) - count(before, f64::INFINITY);
    if total <= 0.0 {
        return None;
    }
    after.iter().find(|(le, n)| n - count(before, *le) >= 0.99 * total).map(|b| b.0)
}

fn main() {
    let total: usize = std::env::var("CATALOG_BENCH_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_EVENTS);
    if let Ok(path) = std::env::var("CATALOG_BENCH_DUMP") {
        let lines: Vec<String> = events(total).iter().map(Value::to_string).collect();
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // CATALOG_BENCH_URL targets a server started by hand (e.g. under a profiler).
    let external = std::env::var("CATALOG_BENCH_URL").ok();
    // CATALOG_BENCH_BIN compares another build (A/B runs interleaved on a noisy machine).
    let bin = std::env::var("CATALOG_BENCH_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_catalog").to_owned());
    // With a URL there is nothing to start: a server started anyway would idle on, waking
    // its flushers, beside whatever runs next on this machine.
    let server = external.is_none().then(|| Server::start(&bin, dir.path()));
    let base = match &server {
        Some(server) => server.url.clone(),
        None => external.clone().expect("no server is started only when given a URL"),
    };
    let server_pid = server.as_ref().map(|s| s.child.id());
    let bodies: Vec<Vec<u8>> = events(total).chunks(BATCH).map(|c| serde_json::to_vec(c).unwrap()).collect();
    let bytes: usize = bodies.iter().map(Vec::len).sum();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let secs = std::env::var("CATALOG_BENCH_LATENCY_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_LATENCY_SECS);
    let paced_only = std::env::var("CATALOG_BENCH_PACED_RATE").ok().and_then(|r| r.parse::<f64>().ok());
    rt.block_on(async {
        let client = reqwest::Client::new();
        if let Some(rate) = paced_only.filter(|_| external.is_some()) {
            let products = std::env::var("CATALOG_BENCH_PRODUCTS").ok().and_then(|p| p.parse().ok()).unwrap_or(total);
            return paced_latency(&client, &base, products, rate, Duration::from_secs(secs)).await;
        }
        let cpu_before = server_pid.and_then(cpu_seconds);
        let started = Instant::now();
        let mut posters = Vec::new();
        for k in 0..POSTERS {
            let client = client.clone();
            let base = base.clone();
            let mine: Vec<Vec<u8>> = bodies.iter().skip(k).step_by(POSTERS).cloned().collect();
            posters.push(tokio::spawn(async move {
                for body in mine {
                    let r = client
                        .post(format!("{base}/events"))
                        .header("content-type", "application/json")
                        .body(body)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 202);
                }
            }));
        }
        for p in posters {
            p.await.unwrap();
        }
        let accepted = started.elapsed();
        while checkpoint(&client, &base).await < total as u64 {
            assert!(started.elapsed() < Duration::from_secs(600), "pipeline did not catch up in 10 minutes");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let visible = started.elapsed();
        let cpu = cpu_before.zip(server_pid.and_then(cpu_seconds)).map(|(a, b)| (b.0 - a.0, b.1 - a.1));
        let metrics = metrics_text(&client, &base).await;
        let metric = |name: &str| -> f64 {
            metrics
                .lines()
                .filter(|l| l.starts_with(name))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .fold(0.0, |a, b| a + b)
        };
        let distinct = std::env::var("CATALOG_BENCH_MIX").is_ok_and(|m| m == "distinct");
        println!(
            "embedded pipeline, {total} events ({} products, {:.0} B/event), {POSTERS} posters × {BATCH}-event POSTs",
            if distinct { total } else { total / 4 },
            bytes as f64 / total as f64
        );
        println!("  accepted (durable, 202)   {:>9.0} events/s   ({accepted:.2?})", total as f64 / accepted.as_secs_f64());
        println!("  POST → visible            {:>9.0} events/s   ({visible:.2?})", total as f64 / visible.as_secs_f64());
        if let Some((cpu, system)) = cpu {
            println!(
                "  server CPU                {:>9.2} µs/event   ({cpu:.2} s user + system, {system:.2} s of it system)",
                cpu * 1e6 / total as f64
            );
        }
        println!(
            "  applied {} · unchanged {} · write batches {} · dead-lettered {}",
            metric("catalog_pipeline_events_applied_total"),
            metric("catalog_pipeline_events_unchanged_total"),
            metric("catalog_pipeline_write_batches_total"),
            metric("catalog_pipeline_events_dead_lettered_total"),
        );
        // Where the time went: busy seconds per stage, and the POSTs' server time.
        let busy = |prefix: &str, label: &str| -> Vec<(String, f64)> {
            metrics
                .lines()
                .filter(|l| l.starts_with(prefix))
                .filter_map(|l| {
                    let value = l.rsplit(' ').next()?.parse::<f64>().ok()?;
                    let name = l.split(&format!("{label}=\"")).nth(1)?.split('"').next()?.to_owned();
                    Some((name, value))
                })
                .collect()
        };
        let stages: Vec<String> = busy("catalog_pipeline_stage_duration_seconds_sum", "stage")
            .into_iter()
            .map(|(stage, secs)| format!("{stage} {secs:.2}s"))
            .collect();
        let posts: f64 = busy("catalog_http_request_duration_seconds_sum", "route")
            .into_iter()
            .filter(|(route, _)| route == "post_events")
            .map(|(_, secs)| secs)
            .sum();
        let refresh = metric("catalog_readmodel_refresh_duration_seconds_sum");
        println!("  busy: {} · read-model refresh {refresh:.2}s · POST /events {posts:.2}s", stages.join(" · "));
        let max_rate = total as f64 / visible.as_secs_f64();
        // A fixed rate compares two builds (or settings) at the same load, where half of each
        // one's own maximum would load the faster one harder.
        let rate = paced_only.unwrap_or(max_rate / 2.0);
        paced_latency(&client, &base, total / 4, rate, Duration::from_secs(secs)).await;
    });
}

/// The release binary serving on a free loopback port; stopped when dropped, a panic
/// included, so no failed run leaves a server behind.
struct Server {
    child: Child,
    url: String,
    /// Kept open: a server writing to a closed pipe would fail.
    _stdout: std::io::Lines<BufReader<ChildStdout>>,
}

impl Server {
    fn start(bin: &str, data_dir: &std::path::Path) -> Self {
        let mut child = Command::new(bin)
            .args(["serve", "--addr", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .env("CATALOG_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        // Stopped at once if it never says where it listens: the guard does not exist yet.
        let url = lines.by_ref().find_map(|line| line.ok()?.strip_prefix("catalog listening on ").map(str::to_owned));
        let Some(url) = url else {
            let _ = child.kill();
            panic!("the catalog exited before it listened");
        };
        Server { child, url, _stdout: lines }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}
