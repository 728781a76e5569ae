//! What the routes need from the rest of the process, behind small object-safe ports.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use catalog_domain::ProductId;
use catalog_pipeline::embedded::EmbeddedLog;
use catalog_pipeline::error::chain;
pub use catalog_pipeline::health::{BoxFuture, Check, Readiness};
use catalog_pipeline::{ProductStore, SourceError, StoreError};
use catalog_readmodel::{ReadModel, ReadModelError, StoredView, catch_up};
use opentelemetry::trace::SpanContext;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::config::ApiConfig;
use crate::metrics::ApiMetrics;

/// Accepts raw event messages durably (`POST /events`).
pub trait Ingest: Send + Sync + 'static {
    /// Resolves once every message is durable. `trace` is the request's trace context, which
    /// every message carries on through the pipeline.
    fn accept(&self, messages: Vec<Bytes>, trace: Option<SpanContext>) -> BoxFuture<'_, Result<(), SourceError>>;
}

impl Ingest for EmbeddedLog {
    fn accept(&self, messages: Vec<Bytes>, trace: Option<SpanContext>) -> BoxFuture<'_, Result<(), SourceError>> {
        Box::pin(async move { self.append_traced(&messages, trace.as_ref()).await.map(|_| ()) })
    }
}

/// Cache-aside: on a read-model miss, fetch the product from the store and keep its view.
pub trait ViewFill: Send + Sync + 'static {
    /// The product's view after reading it from the store; `None` when the store has none.
    fn fill(self: Arc<Self>, id: ProductId) -> BoxFuture<'static, Result<Option<StoredView>, ReadModelError>>;

    /// Re-reads an expired view in the background while the stale one is served.
    fn refresh_later(self: Arc<Self>, id: ProductId);
}

/// How long an id the store does not know is answered without asking it again.
pub const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(5);
/// How long the first miss waits for others to share its store read.
pub const DEFAULT_FILL_WINDOW: Duration = Duration::from_millis(2);
/// Unknown ids remembered at most; past it the expired ones go, then all of them.
pub const DEFAULT_NEGATIVE_CAPACITY: usize = 100_000;

#[derive(Debug, Clone, Copy)]
pub struct FillConfig {
    /// Zero: unknown ids are not remembered.
    pub negative_ttl: Duration,
    /// Zero: only misses that arrive while the first one yields once share its read.
    pub window: Duration,
    pub negative_capacity: usize,
}

impl Default for FillConfig {
    fn default() -> Self {
        Self { negative_ttl: DEFAULT_NEGATIVE_TTL, window: DEFAULT_FILL_WINDOW, negative_capacity: DEFAULT_NEGATIVE_CAPACITY }
    }
}

/// What a miss storm did: hits and misses are counted by the routes, these by the fill.
#[derive(Clone, Debug, Default)]
pub struct FillMetrics {
    /// Misses that joined a store read another miss had started.
    pub coalesced: Counter,
    /// Misses answered from the negative cache, without a store read.
    pub negative_hits: Counter,
    /// Store reads made for misses (each one `get_states` call for any number of ids).
    pub store_reads: Counter,
}

impl FillMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("catalog_cache");
        r.register("coalesced", "Read-model misses that shared another miss's store read", self.coalesced.clone());
        r.register(
            "negative_hits",
            "Read-model misses for ids the store recently did not know, answered without it",
            self.negative_hits.clone(),
        );
        r.register("store_reads", "Store reads made to fill read-model misses", self.store_reads.clone());
    }
}

/// `None` while the store read runs; then how it went.
type ReadResult = Option<Result<(), Arc<str>>>;

#[derive(Default)]
struct Pending {
    /// The read being gathered: ids join it until its window closes.
    open: Option<(Vec<ProductId>, watch::Sender<ReadResult>)>,
    /// Every id being read, with the read that reads it.
    in_flight: HashMap<ProductId, watch::Receiver<ReadResult>>,
}

/// Fills misses from the store with one read per window, however many requests miss: the
/// first miss opens a read, every miss within the window (for the same id or another) joins
/// it, and ids the store does not know are remembered for a short while. A storm of GETs for
/// missing or cold products costs a few store reads (one `BatchGetItem` per 100 ids on AWS),
/// not one each.
pub struct StoreFill<St> {
    pub store: Arc<St>,
    pub model: ReadModel,
    /// Products being refreshed now: a burst of GETs on one expired view costs one store read.
    refreshing: Mutex<HashSet<ProductId>>,
    pending: Mutex<Pending>,
    /// Ids the store did not know, until when.
    negative: Mutex<HashMap<ProductId, Instant>>,
    config: FillConfig,
    metrics: FillMetrics,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<St: ProductStore> StoreFill<St> {
    pub fn new(store: Arc<St>, model: ReadModel, config: FillConfig, metrics: FillMetrics) -> Self {
        Self {
            store,
            model,
            refreshing: Mutex::new(HashSet::new()),
            pending: Mutex::new(Pending::default()),
            negative: Mutex::new(HashMap::new()),
            config,
            metrics,
        }
    }

    fn known_missing(&self, id: &ProductId) -> bool {
        let mut negative = lock(&self.negative);
        match negative.get(id) {
            Some(until) if *until > Instant::now() => true,
            Some(_) => {
                negative.remove(id);
                false
            }
            None => false,
        }
    }

    fn remember_missing(&self, ids: impl IntoIterator<Item = ProductId>) {
        if self.config.negative_ttl.is_zero() {
            return;
        }
        let until = Instant::now() + self.config.negative_ttl;
        let mut negative = lock(&self.negative);
        for id in ids {
            if negative.len() >= self.config.negative_capacity {
                let now = Instant::now();
                negative.retain(|_, until| *until > now);
                if negative.len() >= self.config.negative_capacity {
                    negative.clear();
                }
            }
            negative.insert(id, until);
        }
    }

    /// The read a miss for `id` waits on, and whether this miss must start it.
    fn join(&self, id: &ProductId) -> (watch::Receiver<ReadResult>, bool) {
        let mut pending = lock(&self.pending);
        let Pending { open, in_flight } = &mut *pending;
        if let Some(read) = in_flight.get(id) {
            self.metrics.coalesced.inc();
            return (read.clone(), false);
        }
        let (read, starts) = match open {
            Some((ids, tx)) => {
                self.metrics.coalesced.inc();
                ids.push(id.clone());
                (tx.subscribe(), false)
            }
            None => {
                let (tx, rx) = watch::channel(None);
                *open = Some((vec![id.clone()], tx));
                (rx, true)
            }
        };
        in_flight.insert(id.clone(), read.clone());
        (read, starts)
    }

    /// Closes the open read after its window and runs it; always to the end, whoever waits.
    async fn run_read(self: Arc<Self>) {
        if self.config.window.is_zero() {
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(self.config.window).await;
        }
        let Some((ids, tx)) = lock(&self.pending).open.take() else { return };
        self.metrics.store_reads.inc();
        let result = catch_up(&self.model, &*self.store, ids.clone()).await.map(drop).map_err(|e| Arc::from(chain(&e)));
        if result.is_ok() {
            let missing: Vec<ProductId> =
                ids.iter().filter(|id| self.model.get(id.as_str()).ok().flatten().is_none()).cloned().collect();
            self.remember_missing(missing);
        }
        let mut pending = lock(&self.pending);
        for id in &ids {
            pending.in_flight.remove(id);
        }
        tx.send_replace(Some(result));
    }
}

impl<St: ProductStore> ViewFill for StoreFill<St> {
    fn fill(self: Arc<Self>, id: ProductId) -> BoxFuture<'static, Result<Option<StoredView>, ReadModelError>> {
        Box::pin(async move {
            if self.known_missing(&id) {
                self.metrics.negative_hits.inc();
                return Ok(None);
            }
            let (mut read, starts) = self.join(&id);
            if starts {
                // Spawned: the read finishes and releases its waiters even if this request goes away.
                tokio::spawn(self.clone().run_read());
            }
            let outcome = read.wait_for(Option::is_some).await.map(|r| r.clone());
            match outcome {
                Ok(Some(Ok(()))) => self.model.get(id.as_str()),
                Ok(Some(Err(why))) => {
                    Err(ReadModelError::Store(StoreError::unavailable("filling a view from the store", why.to_string())))
                }
                _ => {
                    Err(ReadModelError::Store(StoreError::unavailable("filling a view from the store", "the read was abandoned")))
                }
            }
        })
    }

    fn refresh_later(self: Arc<Self>, id: ProductId) {
        if !lock(&self.refreshing).insert(id.clone()) {
            return;
        }
        tokio::spawn(async move {
            if let Err(e) = catch_up(&self.model, &*self.store, vec![id.clone()]).await {
                tracing::warn!(product = %id, error = %chain(&e), "refreshing an expired view failed; serving it stale");
            }
            lock(&self.refreshing).remove(&id);
        });
    }
}

/// Rebuilds the read model online (`POST /admin/rebuild`), from whatever store this backend has.
pub trait Rebuilder: Send + Sync + 'static {
    fn rebuild(&self) -> BoxFuture<'_, Result<catalog_readmodel::OnlineRebuild, ReadModelError>>;
}

pub struct AppState {
    pub readmodel: ReadModel,
    /// `None` where this process does not ingest (an API-only instance).
    pub ingest: Option<Arc<dyn Ingest>>,
    pub fill: Option<Arc<dyn ViewFill>>,
    /// `None` where this process serves no read model (a worker).
    pub rebuilder: Option<Arc<dyn Rebuilder>>,
    pub readiness: Arc<dyn Readiness>,
    pub registry: Arc<Registry>,
    pub metrics: ApiMetrics,
    pub config: ApiConfig,
    /// Set on shutdown: `/readyz` turns 503 so load balancers stop sending traffic.
    pub draining: Arc<AtomicBool>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use catalog_domain::{CatalogEvent, ParseLimits, ProductState, ViewSettings};
    use catalog_pipeline::{SequencedEvent, WriteOutcome};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// A store that counts its reads (a fake is enough here: this tests the fill's logic).
    #[derive(Default)]
    struct CountingStore {
        states: HashMap<ProductId, ProductState>,
        reads: AtomicUsize,
        down: AtomicBool,
    }

    impl ProductStore for CountingStore {
        async fn write_batch(&self, _: &[SequencedEvent]) -> Result<WriteOutcome, StoreError> {
            unreachable!("fills only read")
        }

        async fn get_states(&self, ids: &[ProductId]) -> Result<Vec<ProductState>, StoreError> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(5)).await;
            if self.down.load(Ordering::SeqCst) {
                return Err(StoreError::unavailable("get_states", "injected outage"));
            }
            Ok(ids.iter().filter_map(|id| self.states.get(id).cloned()).collect())
        }
    }

    fn fill(config: FillConfig) -> (tempfile::TempDir, Arc<StoreFill<CountingStore>>) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let model = ReadModel::open(&db, ViewSettings::default(), None).unwrap();
        let mut store = CountingStore::default();
        for i in 0..10 {
            let id = ProductId::parse(&format!("K{i}")).unwrap();
            let mut state = ProductState::new(id.clone());
            let body = format!(r#"{{"productId":"K{i}","name":"Known","category":"C","status":"created"}}"#);
            state
                .apply(&CatalogEvent::parse(body.as_bytes(), std::time::SystemTime::UNIX_EPOCH, ParseLimits::default()).unwrap());
            store.states.insert(id, state);
        }
        (dir, Arc::new(StoreFill::new(Arc::new(store), model, config, FillMetrics::default())))
    }

    fn id(s: &str) -> ProductId {
        ProductId::parse(s).unwrap()
    }

    #[tokio::test]
    async fn a_storm_of_misses_for_known_unknown_and_repeated_ids_is_one_store_read() {
        let (_dir, fill) = fill(FillConfig { window: Duration::from_millis(20), ..FillConfig::default() });
        let ids: Vec<ProductId> = (0..10).flat_map(|i| [id(&format!("K{i}")), id(&format!("U{i}")), id("K0")]).collect();
        let views = futures_util::future::join_all(ids.iter().map(|i| fill.clone().fill(i.clone()))).await;
        for (i, view) in ids.iter().zip(views) {
            assert_eq!(view.unwrap().is_some(), i.as_str().starts_with('K'), "{i}");
        }
        assert_eq!(fill.store.reads.load(Ordering::SeqCst), 1);
        assert_eq!((fill.metrics.store_reads.get(), fill.metrics.coalesced.get()), (1, 29));
    }

    #[tokio::test]
    async fn unknown_ids_are_remembered_for_the_negative_ttl() {
        let (_dir, fill) =
            fill(FillConfig { negative_ttl: Duration::from_millis(200), window: Duration::ZERO, ..FillConfig::default() });
        assert!(fill.clone().fill(id("NOPE")).await.unwrap().is_none());
        for _ in 0..5 {
            assert!(fill.clone().fill(id("NOPE")).await.unwrap().is_none());
        }
        assert_eq!((fill.store.reads.load(Ordering::SeqCst), fill.metrics.negative_hits.get()), (1, 5));
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(fill.clone().fill(id("NOPE")).await.unwrap().is_none());
        assert_eq!(fill.store.reads.load(Ordering::SeqCst), 2, "asked again once the entry expired");
    }

    #[tokio::test]
    async fn a_failed_read_fails_every_waiter_and_the_next_miss_tries_again() {
        let (_dir, fill) = fill(FillConfig { window: Duration::from_millis(10), ..FillConfig::default() });
        fill.store.down.store(true, Ordering::SeqCst);
        let both = futures_util::future::join(fill.clone().fill(id("K1")), fill.clone().fill(id("K1"))).await;
        assert!(both.0.is_err() && both.1.is_err());
        fill.store.down.store(false, Ordering::SeqCst);
        assert!(fill.clone().fill(id("K1")).await.unwrap().is_some(), "nothing is left waiting on the failed read");
        assert!(fill.clone().fill(id("U1")).await.unwrap().is_none());
        assert_eq!(fill.store.reads.load(Ordering::SeqCst), 3);
    }
}
