//! The real stage topology over the real embedded adapters (sled in a temp dir): the log, and
//! the read model as the store.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use catalog_domain::{ProductId, ProductState, ViewSettings};
use catalog_pipeline::breaker::{Breaker, BreakerConfig, BreakerMetrics, BreakerState};
use catalog_pipeline::embedded::{EmbeddedBus, EmbeddedLog, LogConfig};
use catalog_pipeline::{FailureClass, PipelineConfig, PipelineMetrics, ProductStore, SequencedEvent, StoreError, WriteOutcome};
use catalog_readmodel::{EmbeddedStore, ReadModel};
use tokio_util::sync::CancellationToken;

struct Harness {
    _dir: tempfile::TempDir,
    /// As `catalog serve` runs it: without it, a message the pipeline holds would come back.
    _heartbeat: tokio::task::JoinHandle<()>,
    log: EmbeddedLog,
    store: EmbeddedStore,
    invalidations: tokio::sync::mpsc::Receiver<catalog_pipeline::Invalidation>,
    shutdown: CancellationToken,
    pipeline: tokio::task::JoinHandle<()>,
}

fn log_config() -> LogConfig {
    LogConfig {
        visibility_timeout: Duration::from_millis(200),
        wait_time: Duration::from_millis(20),
        release_delay: Duration::from_millis(5),
        ..LogConfig::default()
    }
}

fn start<St: ProductStore>(wrap: impl FnOnce(EmbeddedStore) -> St) -> Harness {
    start_with(wrap, Arc::new(Breaker::new(BreakerConfig::default(), BreakerMetrics::default())))
}

fn start_with<St: ProductStore>(wrap: impl FnOnce(EmbeddedStore) -> St, breaker: Arc<Breaker>) -> Harness {
    let config = PipelineConfig { write_batch_timeout: Duration::from_millis(2), ..PipelineConfig::default() };
    start_configured(wrap, breaker, config)
}

fn start_configured<St: ProductStore>(
    wrap: impl FnOnce(EmbeddedStore) -> St,
    breaker: Arc<Breaker>,
    config: PipelineConfig,
) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::open(dir.path()).unwrap();
    let log = EmbeddedLog::open(&db, &dir.path().join("event-log"), log_config()).unwrap();
    let store = EmbeddedStore::new(ReadModel::open_store(&db, ViewSettings::default()).unwrap());
    let bus = Arc::new(EmbeddedBus::new());
    let invalidations = bus.subscribe(1024);
    let shutdown = CancellationToken::new();
    let pipeline = tokio::spawn(catalog_pipeline::stages::run(
        Arc::new(log.clone()),
        Arc::new(wrap(store.clone())),
        bus,
        config,
        PipelineMetrics::default(),
        breaker,
        shutdown.clone(),
    ));
    let _heartbeat = log.spawn_heartbeat(shutdown.clone());
    Harness { _dir: dir, _heartbeat, log, store, invalidations, shutdown, pipeline }
}

async fn until(mut check: impl FnMut() -> bool) {
    for _ in 0..500 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not reached within 5 s");
}

fn id(s: &str) -> ProductId {
    ProductId::parse(s).unwrap()
}

#[tokio::test]
async fn malformed_body_is_dead_lettered_with_reason_and_good_input_after_it_lands() {
    let mut h = start(|s| s);
    let bodies = [
        r#"{"productId":"P1","name":"Laptop","category":"E","status":"created"}"#,
        r#"{not json"#,
        r#"{"productId":"P1","price":-1,"currency":"USD"}"#,
        r#"{"productId":"P1","price":999.99,"currency":"USD"}"#,
    ];
    h.log.append(&bodies.map(|b| Bytes::from_static(b.as_bytes()))).await.unwrap();
    until(|| h.log.consumed_watermark() == 5).await;
    let state = h.store.get(&id("P1")).unwrap().unwrap();
    assert_eq!(state.price.unwrap().minor(), 99_999);
    let letters = h.log.dead_letters().unwrap();
    let codes: Vec<_> = letters.iter().map(|(r, _)| (r.sequence, r.code.as_str(), r.stage.as_str())).collect();
    assert_eq!(codes, [(2, "malformed_json", "validate"), (3, "invalid_price", "validate")]);
    assert_eq!(letters[1].1, Bytes::from_static(bodies[2].as_bytes()), "the DLQ keeps the exact body");
    let inv = h.invalidations.recv().await.unwrap();
    assert_eq!(inv.products[0].product_id, id("P1"));
    h.shutdown.cancel();
    h.pipeline.await.unwrap();
}

#[tokio::test]
async fn duplicates_change_nothing_and_announce_nothing() {
    let mut h = start(|s| s);
    let body = Bytes::from_static(br#"{"productId":"P2","quantity":7,"version":3}"#);
    h.log.append(std::slice::from_ref(&body)).await.unwrap();
    let first = h.invalidations.recv().await.unwrap();
    assert_eq!(first.products.len(), 1);
    h.log.append(&[body.clone(), Bytes::from_static(br#"{"productId":"P2","quantity":1,"version":2}"#)]).await.unwrap();
    until(|| h.log.consumed_watermark() == 4).await;
    let state: ProductState = h.store.get(&id("P2")).unwrap().unwrap();
    assert_eq!((state.quantity, state.revision), (Some(7), 1));
    h.shutdown.cancel();
    h.pipeline.await.unwrap();
    while let Ok(inv) = h.invalidations.try_recv() {
        assert!(inv.products.is_empty(), "a no-op batch announces no product: {inv:?}");
    }
}

/// A store that fails with `class` while `down` is set.
struct FlakyStore {
    inner: EmbeddedStore,
    down: Arc<AtomicBool>,
    attempts: Arc<AtomicU32>,
    class: FailureClass,
}

impl ProductStore for FlakyStore {
    async fn write_batch(&self, events: &[SequencedEvent]) -> Result<WriteOutcome, StoreError> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::new(self.class, format!("writing {} events", events.len()), "injected outage"));
        }
        self.inner.write_batch(events).await
    }

    async fn get_states(&self, ids: &[ProductId]) -> Result<Vec<ProductState>, StoreError> {
        self.inner.get_states(ids).await
    }
}

#[tokio::test]
async fn a_store_that_rejects_writes_retries_then_dead_letters_and_recovery_resumes() {
    let down = Arc::new(AtomicBool::new(true));
    let flag = down.clone();
    let h = start(move |inner| FlakyStore { inner, down: flag, attempts: Arc::default(), class: FailureClass::Rejected });
    h.log.append(&[Bytes::from_static(br#"{"productId":"P3","quantity":1}"#)]).await.unwrap();
    until(|| h.log.dead_letter_count() == 1).await;
    let (record, _) = h.log.dead_letters().unwrap().remove(0);
    assert_eq!((record.code.as_str(), record.attempts), ("max_receive_count_exceeded", 3));
    assert!(record.message.contains("injected outage"), "{}", record.message);
    down.store(false, Ordering::SeqCst);
    h.log.append(&[Bytes::from_static(br#"{"productId":"P3","quantity":2}"#)]).await.unwrap();
    until(|| h.store.get(&id("P3")).unwrap().is_some()).await;
    assert_eq!(h.store.get(&id("P3")).unwrap().unwrap().quantity, Some(2));
    h.shutdown.cancel();
    h.pipeline.await.unwrap();
}

#[tokio::test]
async fn an_open_breaker_stops_writes_and_receives_until_the_store_is_back() {
    let down = Arc::new(AtomicBool::new(true));
    let attempts = Arc::new(AtomicU32::new(0));
    let config = BreakerConfig {
        consecutive_failures: 2,
        cool_down: Duration::from_millis(600),
        trial_successes: 1,
        ..BreakerConfig::default()
    };
    let breaker = Arc::new(Breaker::new(config, BreakerMetrics::default()));
    let (flag, count) = (down.clone(), attempts.clone());
    let h = start_with(
        move |inner| FlakyStore { inner, down: flag, attempts: count, class: FailureClass::Unavailable },
        breaker.clone(),
    );
    h.log.append(&[Bytes::from_static(br#"{"productId":"P4","quantity":4}"#)]).await.unwrap();
    until(|| breaker.state() == BreakerState::Open).await;
    let seen = attempts.load(Ordering::SeqCst);
    assert_eq!(seen, 2, "opened after two failed writes");
    // While open, nothing is written and nothing is taken from the log (its message keeps its
    // deliveries: it is not burned into the DLQ).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(attempts.load(Ordering::SeqCst), seen);
    down.store(false, Ordering::SeqCst);
    until(|| h.store.get(&id("P4")).unwrap().is_some()).await;
    // The record is visible as soon as the store wrote it; the pipeline tells the breaker
    // of that success right after, so the test waits for that too.
    until(|| breaker.state() == BreakerState::Closed).await;
    assert_eq!(breaker.state(), BreakerState::Closed, "a successful trial closed it");
    assert_eq!(h.log.dead_letter_count(), 0);
    h.shutdown.cancel();
    h.pipeline.await.unwrap();
}

#[tokio::test]
async fn an_outage_longer_than_every_delivery_dead_letters_nothing_and_loses_nothing() {
    let down = Arc::new(AtomicBool::new(true));
    let attempts = Arc::new(AtomicU32::new(0));
    // The breaker stays closed through many failures, so the hold alone keeps deliveries
    // down; visibility (200 ms) runs out many times over while the batch is held.
    let config = BreakerConfig { consecutive_failures: 1_000, cool_down: Duration::from_millis(100), ..BreakerConfig::default() };
    let breaker = Arc::new(Breaker::new(config, BreakerMetrics::default()));
    let (flag, count) = (down.clone(), attempts.clone());
    let h = start_with(move |inner| FlakyStore { inner, down: flag, attempts: count, class: FailureClass::Unavailable }, breaker);
    let bodies: Vec<Bytes> = (0..50).map(|i| Bytes::from(format!(r#"{{"productId":"O{i}","quantity":{i}}}"#))).collect();
    h.log.append(&bodies).await.unwrap();
    until(|| attempts.load(Ordering::SeqCst) >= 5).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(h.log.dead_letter_count(), 0, "an outage is not the messages' fault");
    down.store(false, Ordering::SeqCst);
    until(|| h.log.consumed_watermark() == 51).await;
    for i in 0..50 {
        assert_eq!(h.store.get(&id(&format!("O{i}"))).unwrap().unwrap().quantity, Some(i));
    }
    assert_eq!(h.log.dead_letter_count(), 0);
    h.shutdown.cancel();
    h.pipeline.await.unwrap();
}

#[tokio::test]
async fn the_store_write_budget_paces_a_backlog() {
    let breaker = Arc::new(Breaker::new(BreakerConfig::default(), BreakerMetrics::default()));
    let config = PipelineConfig { store_max_writes_per_sec: 100, ..PipelineConfig::default() };
    let h = start_configured(|s| s, breaker, config);
    let bodies: Vec<Bytes> = (0..200).map(|i| Bytes::from(format!(r#"{{"productId":"W{i}","quantity":{i}}}"#))).collect();
    let started = std::time::Instant::now();
    h.log.append(&bodies).await.unwrap();
    until(|| h.log.consumed_watermark() == 201).await;
    // A burst of one second's budget, then 100 a second: the second hundred waits about a second.
    assert!(started.elapsed() >= Duration::from_millis(800), "200 events at 100/s took {:?}", started.elapsed());
    h.shutdown.cancel();
    h.pipeline.await.unwrap();
}
