//! Versions, dead letters, restarts and crashes, against the real binary and its data dir.

mod helpers;

use std::time::Duration;

use helpers::*;
use serde_json::{Value, json};

#[tokio::test]
async fn stale_and_duplicate_events_converge_on_the_highest_version() {
    let app = spawn_app();
    app.ingest(&json!([product("V1", "Vase", "Home")])).await;
    // Shuffled, duplicated deliveries of versions 1..=4.
    let deliveries = json!([
        price("V1", "40", "USD", 4),
        price("V1", "10", "USD", 1),
        price("V1", "40", "USD", 4),
        price("V1", "30", "USD", 3),
        price("V1", "20", "USD", 2),
        stock("V1", 9, 2),
        stock("V1", 1, 1),
    ]);
    app.ingest(&deliveries).await;
    app.ingest(&deliveries).await;
    let view = app.eventually("/products/V1", |v| v["stock"]["quantity"] == 9).await;
    assert_eq!(view["displayPrice"], "$40.00");
    // Let the pipeline finish everything, then check nothing went backwards.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, view) = app.get_json("/products/V1").await;
    assert_eq!((view["displayPrice"].clone(), view["stock"]["quantity"].clone()), (json!("$40.00"), json!(9)));
    assert!(app.metric("catalog_pipeline_events_unchanged_total").await >= 9.0);
}

#[tokio::test]
async fn bad_input_is_dead_lettered_while_good_input_after_it_lands() {
    let app = spawn_app();
    app.ingest(&json!([
        {"source": "pricing.service", "detail-type": "Price Update", "detail": {"productId": "B1", "price": -1, "currency": "USD"}},
        {"source": "pricing.service", "detail-type": "Price Update", "detail": {"productId": "B1", "price": 0.001, "currency": "USD"}},
        {"source": "nobody", "detail-type": "Price Update", "detail": {}},
        {"productId": "bad id!", "quantity": 1},
        product("B1", "Bowl", "Kitchen"),
        price("B1", "12.50", "EUR", 1),
    ]))
    .await;
    let view = app.eventually("/products/B1", |v| v["price"].is_object()).await;
    assert_eq!(view["displayPrice"], "€12.50");
    let dead = app.metric("catalog_pipeline_events_dead_lettered_total").await;
    assert_eq!(dead, 4.0);
    assert_eq!(app.metric("catalog_pipeline_events_dead_lettered_total{code=\"invalid_price\"}").await, 2.0);
    assert_eq!(app.metric("catalog_pipeline_events_dead_lettered_total{code=\"unknown_event_type\"}").await, 1.0);
}

#[tokio::test]
async fn state_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut app = start_in(dir.path(), &Options::default());
    app.ingest(&json!([product("R1", "Rug", "Home"), stock("R1", 0, 1)])).await;
    let before = app.eventually("/products/R1", |v| v["availability"] == "Out of Stock").await;
    app.stop();
    let app = start_in(dir.path(), &Options::default());
    let (status, after) = app.get_json("/products/R1").await;
    assert_eq!(status, 200);
    assert_eq!(after, before);
    let (_, page) = app.get_json("/products?category=Home").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
}

/// Runs `catalog <args> --data-dir <dir>`: whether it succeeded, and what it printed.
fn run_on(dir: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_catalog")).args(args).arg("--data-dir").arg(dir).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// `catalog replay verify` on a stopped instance's data dir finds no drift.
fn assert_verifies_clean(dir: &std::path::Path) {
    let (ok, out) = run_on(dir, &["replay", "verify"]);
    assert!(ok, "{out}");
}

/// Starts the catalog on `dir`, has it accept `n` products (`{prefix}000`…) in `category`, and
/// kills it with SIGKILL right after the 202.
async fn accept_then_kill_9(dir: &std::path::Path, n: usize, prefix: &str, category: &str) {
    let mut app = start_in(dir, &Options::default());
    let events: Vec<Value> = (0..n).map(|i| product(&format!("{prefix}{i:03}"), "Kit", category)).collect();
    app.ingest(&Value::Array(events)).await;
    app.kill9();
}

#[tokio::test]
async fn kill_9_right_after_202_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    accept_then_kill_9(dir.path(), 500, "K", "Crash").await;
    let app = start_in(dir.path(), &Options::default());
    // Every accepted event must come back: all 500 products, checked 100 ids at a time.
    for chunk in 0..5 {
        let ids: Vec<String> = (chunk * 100..chunk * 100 + 100).map(|i| format!("K{i:03}")).collect();
        app.eventually(&format!("/products?ids={}", ids.join(",")), |v| v["missing"] == json!([])).await;
    }
}

#[tokio::test]
async fn a_torn_log_tail_is_cut_off_at_start_and_nothing_answered_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    accept_then_kill_9(dir.path(), 300, "T", "Camping").await;
    // What a power cut in the middle of the next append leaves: half a record at the end of the
    // last segment, never answered.
    let mut segments: Vec<_> = std::fs::read_dir(dir.path().join("event-log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    segments.sort();
    let last = segments.last().expect("the log has a segment");
    let mut torn = std::fs::OpenOptions::new().append(true).open(last).unwrap();
    std::io::Write::write_all(&mut torn, &[200, 0, 0, 0, 7, 7, 7, 7, 1, 2, 3]).unwrap();
    drop(torn);

    let mut app = start_in(dir.path(), &Options::default());
    app.caught_up(300).await;
    assert_eq!(app.listing("Camping", 100).await.0.len(), 300);
    // Appends go on right after the last whole record.
    app.ingest(&json!([product("T300", "Tent", "Camping")])).await;
    app.caught_up(301).await;
    app.stop();
    assert_verifies_clean(dir.path());
}

#[tokio::test]
async fn kill_9_mid_pipeline_loses_nothing_goes_back_nowhere_and_verifies_clean() {
    const ROUNDS: usize = 4;
    const PER_ROUND: usize = 400;
    let dir = tempfile::tempdir().unwrap();
    for round in 0..ROUNDS {
        let mut app = start_in(dir.path(), &Options::default());
        let mut events: Vec<Value> = (0..PER_ROUND).map(|i| product(&format!("L{round}-{i:03}"), "Lamp", "Lights")).collect();
        // Updates of the first products, versioned and not, interleaved with every crash.
        events.extend((0..20).map(|i| price(&format!("L0-{i:03}"), &format!("{}.00", round + 1), "USD", round as u64 + 1)));
        events.extend((0..20).map(|i| json!({"productId": format!("L0-{i:03}"), "quantity": round})));
        for chunk in events.chunks(110) {
            app.ingest(&Value::Array(chunk.to_vec())).await;
        }
        // The pipeline is still writing state, views and index entries when the process dies.
        app.kill9();
    }
    let mut app = start_in(dir.path(), &Options::default());
    app.caught_up((ROUNDS * (PER_ROUND + 40)) as u64).await;
    let mut expected: Vec<String> = (0..ROUNDS).flat_map(|r| (0..PER_ROUND).map(move |i| format!("L{r}-{i:03}"))).collect();
    expected.sort();
    assert_eq!(app.listing("Lights", 100).await.0, expected, "every product served by id is in its listing");
    for i in 0..20 {
        let (_, view) = app.get_json(&format!("/products/L0-{i:03}")).await;
        let last = ROUNDS - 1;
        assert_eq!(
            (view["displayPrice"].as_str(), view["stock"]["quantity"].as_u64()),
            (Some(&*format!("${}.00", last + 1)), Some(last as u64))
        );
    }
    app.stop();
    assert_verifies_clean(dir.path());
}

#[tokio::test]
async fn replay_rebuild_restores_a_lost_read_model() {
    let dir = tempfile::tempdir().unwrap();
    let mut app = start_in(dir.path(), &Options::default());
    app.ingest(&json!([product("RB1", "Bench", "Garden"), price("RB1", "99", "USD", 1), product("RB2", "Hose", "Garden")])).await;
    let before = app.eventually("/products/RB1", |v| v["price"].is_object()).await;
    app.eventually("/products/RB2", |_| true).await;
    app.stop();

    // The read model's database lost outright (what a crash between the rebuild's two renames
    // leaves): serve re-renders every view from the store at start.
    std::fs::remove_dir_all(dir.path().join("views.sled")).unwrap();
    let mut app = start_in(dir.path(), &Options::default());
    assert_eq!(app.get_json("/products/RB1").await, (200, before.clone()));
    // A start's first compaction takes what the read model shows into the snapshot.
    app.metric_reaches("catalog_event_log_folded_total", 3.0, "the snapshot never took the entries").await;
    app.stop();

    // A rebuild that died part way left its half-built database behind: the next one starts over.
    std::fs::create_dir_all(dir.path().join("views.sled.rebuild/blobs")).unwrap();
    std::fs::write(dir.path().join("views.sled.rebuild/db"), b"half written").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_catalog"))
        .args(["replay", "rebuild", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("rebuilt 2 views of 2 products from the snapshot through sequence 3 and 0 log entries"), "{report}");
    let mut entries: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    entries.sort();
    assert_eq!(entries, ["catalog.sled", "event-log", "views.sled"], "the rebuilt database swapped in, nothing left over");

    let app = start_in(dir.path(), &Options::default());
    assert_eq!(app.get_json("/products/RB1").await, (200, before));
    let (_, page) = app.get_json("/products?category=Garden").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 2);
}

#[test]
fn replay_rebuild_refuses_a_data_dir_in_use() {
    let app = spawn_app();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_catalog"))
        .args(["replay", "rebuild", "--data-dir"])
        .arg(&app.data_dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_model_is_rebuilt_online_while_reads_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options { args: vec!["--admin-token".into(), "adm1n".into()], ..Default::default() };
    let app = start_in(dir.path(), &options);
    let events: Vec<Value> = (0..3000).map(|i| product(&format!("O{i:04}"), "Online", "Shelf")).collect();
    for chunk in events.chunks(1000) {
        app.ingest(&Value::Array(chunk.to_vec())).await;
    }
    app.caught_up(3000).await;
    let post = |token: Option<&'static str>| {
        let mut request = app.client.post(app.url("/admin/rebuild"));
        if let Some(t) = token {
            request = request.bearer_auth(t);
        }
        request.send()
    };
    assert_eq!(post(None).await.unwrap().status(), 401);
    assert_eq!(post(Some("wrong")).await.unwrap().status(), 401);

    // Reads keep answering while the new generation is built and swapped in.
    let reading = {
        let (client, base) = (app.client.clone(), app.base.clone());
        tokio::spawn(async move {
            let mut answered = 0;
            for i in 0..400 {
                let status = client.get(format!("{base}/products/O{:04}", (i * 7) % 3000)).send().await.unwrap().status();
                assert_eq!(status, 200, "a read failed during the rebuild");
                answered += 1;
            }
            answered
        })
    };
    let done: Value = post(Some("adm1n")).await.unwrap().json().await.unwrap();
    assert_eq!((done["products"].as_u64(), done["generation"].as_u64()), (Some(3000), Some(1)), "{done}");
    assert_eq!(reading.await.unwrap(), 400);
    assert_eq!(app.listing("Shelf", 100).await.0.len(), 3000);
    drop(app);

    // The new generation is what a restart serves.
    let app = start_in(dir.path(), &Options::default());
    assert_eq!(app.listing("Shelf", 100).await.0.len(), 3000);
    assert_eq!(
        app.client.post(app.url("/admin/rebuild")).send().await.unwrap().status(),
        403,
        "no --admin-token: admin routes are off"
    );
}

/// The log compacted every second, behind a one-second retention, while the process is killed
/// mid-pipeline: what was folded into the snapshot and what is still in the tail add up to the
/// store, the views and the listings, and verify and rebuild work from snapshot + tail.
#[tokio::test]
async fn a_compacted_log_survives_kill_9_and_verifies_and_rebuilds_from_its_snapshot() {
    let compacting = || Options {
        args: ["--log-retention-secs", "1", "--log-compact-interval-secs", "1"].map(String::from).to_vec(),
        ..Default::default()
    };
    let dir = tempfile::tempdir().unwrap();
    for round in 0..3u64 {
        let mut app = start_in(dir.path(), &compacting());
        let mut events: Vec<Value> = (0..200).map(|i| product(&format!("K{round}-{i:03}"), "Kettle", "Kitchen")).collect();
        events.extend((0..20).map(|i| price(&format!("K0-{i:03}"), &format!("{}.00", round + 1), "USD", round + 1)));
        events.extend((0..20).map(|i| json!({"productId": format!("K0-{i:03}"), "quantity": round})));
        for chunk in events.chunks(60) {
            app.ingest(&Value::Array(chunk.to_vec())).await;
        }
        // Long enough for entries to expire and a compaction or two to run, then a crash.
        tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
        app.ingest(&json!([stock("K0-000", 100 + round, round + 10)])).await;
        app.kill9();
    }
    let mut app = start_in(dir.path(), &compacting());
    app.caught_up(3 * 241).await;
    // This process compacts what the last one left; earlier ones compacted the rest.
    app.metric_reaches("catalog_event_log_compacted_total", 1.0, "compaction never caught up").await;
    let mut expected: Vec<String> = (0..3).flat_map(|r| (0..200).map(move |i| format!("K{r}-{i:03}"))).collect();
    expected.sort();
    assert_eq!(app.listing("Kitchen", 100).await.0, expected);
    let (_, k0) = app.get_json("/products/K0-000").await;
    assert_eq!((k0["displayPrice"].as_str(), k0["stock"]["quantity"].as_u64()), (Some("$3.00"), Some(102)));
    // A tail the snapshot does not hold yet.
    app.ingest(&json!([price("K1-000", "7.50", "USD", 5)])).await;
    app.eventually("/products/K1-000", |v| v["displayPrice"] == "$7.50").await;
    app.stop();

    let run = |args: &[&str]| run_on(dir.path(), args);
    let (ok, out) = run(&["replay", "verify"]);
    assert!(ok, "{out}");
    let through: u64 = out
        .split("snapshot through sequence ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("verify folds snapshot + tail: {out}"));
    assert!(through >= 600, "most of the history is in the snapshot, not the log: {out}");
    let (ok, out) = run(&["replay", "rebuild"]);
    assert!(ok, "{out}");
    let app = start_in(dir.path(), &Options::default());
    let (_, k1) = app.get_json("/products/K1-000").await;
    assert_eq!(k1["displayPrice"], "$7.50");
    assert_eq!(app.listing("Kitchen", 100).await.0.len(), 600);
    drop(app);

    // The read model is the store, and still derived: without it, a start takes the
    // snapshot's states and folds the tail after it.
    std::fs::remove_dir_all(dir.path().join("views.sled")).unwrap();
    let mut app = start_in(dir.path(), &Options::default());
    assert_eq!(app.listing("Kitchen", 100).await.0, expected);
    let (_, k0) = app.get_json("/products/K0-000").await;
    assert_eq!((k0["displayPrice"].as_str(), k0["stock"]["quantity"].as_u64()), (Some("$3.00"), Some(102)));
    let (_, k1) = app.get_json("/products/K1-000").await;
    assert_eq!(k1["displayPrice"], "$7.50");
    app.stop();
    let (ok, out) = run(&["replay", "verify"]);
    assert!(ok && out.contains("no drift"), "{out}");
}

/// A week's retention keeps the history, and the snapshot still follows the read model: a
/// start and the replay tools fold only the last interval's tail, whatever the retention.
#[tokio::test]
async fn a_long_retention_keeps_the_history_while_the_snapshot_keeps_up() {
    let folding = || Options { args: ["--log-compact-interval-secs", "1"].map(String::from).to_vec(), ..Default::default() };
    let dir = tempfile::tempdir().unwrap();
    let mut app = start_in(dir.path(), &folding());
    let events: Vec<Value> = (0..300).map(|i| product(&format!("H{i:03}"), "Hat", "Hats")).collect();
    app.ingest(&Value::Array(events)).await;
    app.caught_up(300).await;
    app.metric_reaches("catalog_event_log_folded_total", 300.0, "the snapshot never took the events").await;
    assert_eq!(app.metric("catalog_event_log_compacted_total").await, 0.0, "nothing is past a week");
    app.kill9();

    let (ok, out) = run_on(dir.path(), &["replay", "verify"]);
    assert!(ok && out.contains("snapshot through sequence 300"), "{out}");
    let app = start_in(dir.path(), &folding());
    assert_eq!(app.listing("Hats", 100).await.0.len(), 300);
    let held = app.metric("catalog_event_log_bytes").await;
    assert!(held > 300.0 * 50.0, "the log still holds the 300 events: {held} bytes");
}
