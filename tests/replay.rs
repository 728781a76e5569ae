//! The replay tools against a stopped embedded instance: `verify` names every drift and exits
//! 1, `--repair` and `reproject` put it right, and `dlq` lists, filters and moves dead letters.

mod helpers;

use std::path::Path;
use std::process::Command;

use catalog_domain::{ProductId, ProductState, ViewSettings};
use catalog_readmodel::{EmbeddedStore, ReadModel, StoredView};
use helpers::*;
use serde_json::json;

/// Runs `catalog replay <args> --data-dir <dir>`; whether it exited 0, and what it printed.
fn replay(args: &[&str], data_dir: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_catalog"))
        .arg("replay")
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .env("CATALOG_LOG", "warn")
        .output()
        .expect("run catalog replay");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[tokio::test]
async fn verify_names_every_drift_and_repair_and_reproject_put_it_right() {
    let dir = tempfile::tempdir().unwrap();
    let mut app = start_in(dir.path(), &Options::default());
    let mut events: Vec<serde_json::Value> = (0..20).map(|i| product(&format!("A{i}"), &format!("Item {i}"), "Tools")).collect();
    events.extend((0..20).map(|i| stock(&format!("A{i}"), 5, 1)));
    // An unversioned pair: the later one is what the store and the log must agree on.
    events.push(json!({"productId": "A0", "quantity": 8}));
    events.push(json!({"productId": "A0", "quantity": 6}));
    app.ingest(&json!(events)).await;
    app.caught_up(42).await;
    app.stop();
    let (ok, out) = replay(&["verify"], dir.path());
    assert!(ok, "{out}");
    assert!(out.contains("20 products") && out.contains("no drift"), "{out}");

    // Tamper as a bug or a half-finished restore would: the store, a view's bodies. (The
    // category index lives in memory, rebuilt from the records at each open: a listing cannot
    // drift between runs, and the replay crate's tests damage one within a run.)
    {
        let views = sled::open(dir.path().join("views.sled")).unwrap();
        let model = ReadModel::open(&views, ViewSettings::default(), None).unwrap();
        assert!(model.holds_state(), "an embedded read model opens as the store");
        let store = EmbeddedStore::new(model.clone());
        let mut a1 = store.get(&ProductId::parse("A1").unwrap()).unwrap().unwrap();
        a1.quantity = Some(999);
        a1.revision += 1;
        store.put(&[a1]).unwrap();
        let a3 = store.get(&ProductId::parse("A3").unwrap()).unwrap().unwrap();
        let mut renamed = a3.clone();
        renamed.info.as_mut().unwrap().name = "Tampered".into();
        views.open_tree("views").unwrap().insert("A3", mismatched_record(&a3, &renamed)).unwrap();
        views.flush().unwrap();
    }
    let (ok, out) = replay(&["verify"], dir.path());
    assert!(!ok, "drift exits 1: {out}");
    for expected in ["store≠log A1: quantity: log 5, store 999", "view≠store A3: web body", "replay reproject", "verify --repair"]
    {
        assert!(out.contains(expected), "missing {expected:?} in:\n{out}");
    }

    let (ok, out) = replay(&["verify", "--repair"], dir.path());
    assert!(!ok, "the store's drift is still there: {out}");
    assert!(out.contains("repaired the views and listings of 1 product(s)"), "{out}");
    let (ok, out) = replay(&["reproject"], dir.path());
    assert!(ok, "{out}");
    assert!(out.contains("1 rewritten, 19 already right"), "{out}");
    let (ok, out) = replay(&["reproject"], dir.path());
    assert!(ok && out.contains("0 rewritten, 20 already right"), "a second run changes nothing: {out}");
    let (ok, out) = replay(&["verify"], dir.path());
    assert!(ok, "{out}");

    // A run cut short resumes after its checkpoint: A1 sorts before A2, so it is not reached.
    let tamper_a1 = || {
        let views = sled::open(dir.path().join("views.sled")).unwrap();
        let store = EmbeddedStore::new(ReadModel::open(&views, ViewSettings::default(), None).unwrap());
        let mut a1 = store.get(&ProductId::parse("A1").unwrap()).unwrap().unwrap();
        a1.quantity = Some(998);
        a1.revision += 1;
        store.put(&[a1]).unwrap();
        views.flush().unwrap();
    };
    tamper_a1();
    std::fs::write(dir.path().join("reproject.checkpoint"), "A2").unwrap();
    let (ok, out) = replay(&["reproject"], dir.path());
    assert!(ok && out.contains("resuming after product \"A2\"") && out.contains("0 rewritten"), "{out}");
    assert!(!replay(&["verify"], dir.path()).0, "A1 was skipped");
    std::fs::write(dir.path().join("reproject.checkpoint"), "A2").unwrap();
    let (ok, out) = replay(&["reproject", "--restart"], dir.path());
    assert!(ok && out.contains("1 rewritten"), "{out}");
    assert!(!dir.path().join("reproject.checkpoint").exists(), "a finished run leaves no checkpoint");
    let (ok, out) = replay(&["verify"], dir.path());
    assert!(ok, "{out}");

    // The served catalog is the log's again.
    let app = start_in(dir.path(), &Options::default());
    let (_, a1) = app.get_json("/products/A1").await;
    assert_eq!(a1["stock"]["quantity"], 5);
    let (_, a0) = app.get_json("/products/A0").await;
    assert_eq!(a0["stock"]["quantity"], 6, "the later of two unversioned events");
    let (ids, _) = app.listing("Tools", 7).await;
    assert_eq!(ids.len(), 20);
}

/// A record whose bodies say what its state does not: what a build with a rendering bug, or a
/// half-finished restore, would leave. (The state follows the bodies, length first.)
fn mismatched_record(state: &ProductState, bodies_of: &ProductState) -> Vec<u8> {
    let mut record = StoredView::encode(bodies_of, ViewSettings::default(), 0, true);
    let mut stored = Vec::new();
    bodies_of.encode_stored(&mut stored);
    record.truncate(record.len() - 4 - stored.len());
    stored.clear();
    state.encode_stored(&mut stored);
    record.extend_from_slice(&(stored.len() as u32).to_be_bytes());
    record.extend_from_slice(&stored);
    record
}

#[tokio::test]
async fn dlq_lists_filters_and_moves_dead_letters_back_once_they_are_valid() {
    let dir = tempfile::tempdir().unwrap();
    // A small body limit dead-letters the long product; a later, larger limit makes it valid.
    let limited = Options { args: vec!["--max-body-bytes".into(), "300".into()], ..Options::default() };
    let mut app = start_in(dir.path(), &limited);
    let long = json!({"source": "product.service", "detail-type": "Product Update",
        "detail": {"productId": "L1", "name": "Long", "category": "Big", "status": "created", "description": "x".repeat(400)}});
    app.ingest(&json!([long, price("L2", "-1", "USD", 1), product("L3", "Short", "Big")])).await;
    app.eventually("/products/L3", |_| true).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while app.metric("catalog_pipeline_events_dead_lettered_total").await < 2.0 {
        assert!(std::time::Instant::now() < deadline, "the two bad events were never dead-lettered");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    app.stop();

    let (ok, out) = replay(&["dlq", "--inspect"], dir.path());
    assert!(ok, "{out}");
    assert!(out.starts_with("id\tcode\tstage\treceives\tproduct\tdetail-type\treason"), "{out}");
    assert!(out.contains("\tbody_too_large\tvalidate\t1\tL1\tProduct Update\t"), "{out}");
    assert!(out.contains("\tinvalid_price\tvalidate\t1\tL2\tPrice Update\t"), "{out}");
    assert!(out.contains("2 dead letters, 2 shown"), "{out}");
    let (_, out) = replay(&["dlq", "--inspect", "--code", "invalid_price"], dir.path());
    assert!(out.contains("2 dead letters, 1 shown") && !out.contains("\tL1\t"), "{out}");

    // Under the old limit both are still invalid: a dry run would move nothing.
    let (ok, out) = replay(&["dlq", "--dry-run", "--max-body-bytes", "300"], dir.path());
    assert!(ok && out.contains("would move 0 of 2 dead letters; 2 still invalid, kept (--force moves them)"), "{out}");
    let (ok, out) = replay(&["dlq", "--dry-run"], dir.path());
    assert!(ok && out.contains("would move 1 of 2") && out.contains("would move 1\t"), "{out}");
    let (ok, out) = replay(&["dlq", "--product", "L1,L9"], dir.path());
    assert!(ok, "{out}");
    assert!(out.contains("moved 1 of 1 chosen dead letters back"), "{out}");
    let (_, out) = replay(&["dlq", "--inspect"], dir.path());
    assert!(out.contains("1 dead letters, 1 shown") && out.contains("\tL2\t"), "the invalid one stays: {out}");

    // Served with the larger limit, the moved event is applied, and everything agrees.
    let mut app = start_in(dir.path(), &Options::default());
    let view = app.eventually("/products/L1", |_| true).await;
    assert_eq!(view["product"]["name"], "Long");
    app.stop();
    let (ok, out) = replay(&["verify"], dir.path());
    assert!(ok, "{out}");
}

#[test]
fn replay_commands_refuse_a_data_dir_that_is_in_use_or_missing() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, out) = replay(&["verify"], &dir.path().join("nope"));
    assert!(!ok && out.contains("CATALOG_DATA_DIR"), "{out}");
    let _app = start_in(dir.path(), &Options::default());
    for command in [&["verify"][..], &["reproject"], &["dlq", "--inspect"]] {
        let (ok, out) = replay(command, dir.path());
        assert!(!ok && out.contains("in use by another catalog process"), "{command:?}: {out}");
    }
}
