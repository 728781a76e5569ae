//! `ReadModel`: reads that only slice stored bytes, and writes that never go backwards.
//! Embedded, it is also the store: each record holds its product's state, and a batch of
//! events is folded into the records directly (`fold`).

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;

use bytes::Bytes;
use catalog_domain::event::millis_since_epoch;
use catalog_domain::state::Applied;
use catalog_domain::{ProductId, ProductState, ViewSettings};
use catalog_pipeline::{ProductChanged, SequencedEvent, StoreError, WriteOutcome};

use crate::derived::{CategoryIndex, Id};
use crate::hot::{HotStats, HotViews};
use crate::view::StoredView;

/// The largest page a list route may ask for (docs/contract.md).
pub const DEFAULT_MAX_PAGE: usize = 100;
/// How long a view is served before it is re-read from the store: the backstop for a missed
/// invalidation.
pub const DEFAULT_VIEW_TTL: Duration = Duration::from_secs(300);
const CHECKPOINT_KEY: &[u8] = b"applied_sequence";

mod trees {
    pub const VIEWS: &str = "views";
    /// The category index, when it was kept in sled: a data dir from before it moved into
    /// memory (`derived`) has one per generation, dropped when it opens.
    pub const BY_CATEGORY: &str = "views_by_category";
    pub const META: &str = "readmodel_meta";
    /// Which generation of the trees above is live (see `ReadModel::begin_rebuild`).
    pub const ROOT: &str = "readmodel_root";
    pub const GENERATION_KEY: &[u8] = b"generation";
    /// Present once the database is a store (its records hold states): set by
    /// `ReadModel::open_store`, honoured by every later open, so no tool can write a record
    /// without its state there.
    pub const HOLDS_STATE_KEY: &[u8] = b"holds_state";
    /// Generation 0 keeps the plain names, so a data dir from before generations opens as it is.
    pub fn name(base: &str, generation: u64) -> String {
        if generation == 0 { base.to_owned() } else { format!("{base}@{generation}") }
    }
}

/// States one step of [`ReadModel::apply_all`] writes: bounds its memory and how long it
/// holds the writer lock at a time.
const APPLY_STEP: usize = 1024;

/// How long a replaced generation is kept after a swap, for reads that started on it.
const RETIRE_AFTER: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ReadModelError {
    #[error("read model storage failed during {operation}")]
    Storage {
        operation: &'static str,
        #[source]
        source: sled::Error,
    },
    #[error("refreshing views from the store failed")]
    Store(#[from] StoreError),
    #[error("a read-model task failed")]
    Task(#[from] tokio::task::JoinError),
    #[error("a rebuild of this read model is already running")]
    Busy,
    #[error("the record of product {id} {detail}")]
    Corrupt { id: String, detail: String },
}

fn storage(operation: &'static str) -> impl Fn(sled::Error) -> ReadModelError {
    move |source| ReadModelError::Storage { operation, source }
}

/// Cheap to clone; clones share the same trees.
#[derive(Clone)]
pub struct ReadModel {
    inner: Arc<Inner>,
}

struct Inner {
    db: sled::Db,
    /// The live generation's trees: swapped whole by an online rebuild while reads go on.
    trees: ArcSwap<Trees>,
    settings: ViewSettings,
    ttl: Option<Duration>,
    /// While an online rebuild runs: products written to the live trees meanwhile, which the
    /// rebuilt ones may have missed.
    written_during_rebuild: Mutex<Option<HashSet<String>>>,
    rebuilding: AtomicBool,
    /// The records hold their products' states: this read model is the store.
    holds_state: bool,
    /// Shared by every write of a record, held alone by the generation swap, so that nothing
    /// is written to the old generation after the swap has carried its records over. (Writes
    /// of one record exclude each other by compare-and-swap.)
    writer: std::sync::RwLock<()>,
    /// Bytes each generation keeps of its most read views in memory (0: none).
    hot_bytes: u64,
}

struct Trees {
    generation: u64,
    views: sled::Tree,
    meta: sled::Tree,
    /// Derived from `views` by a scan when first read (a tool that never lists never pays for
    /// it, and `replay rebuild`'s million writes skip it), kept up to date by every write after.
    index: OnceLock<CategoryIndex>,
    /// Shared by every write of a record until its listing is moved, held alone by the scan:
    /// a write is either seen by the scan or finds the index it derived.
    deriving: RwLock<()>,
    /// This generation's most read views; a swap starts the next one empty, so no entry
    /// outlives the trees it was read from.
    hot: Option<HotViews>,
}

impl Trees {
    fn open(db: &sled::Db, generation: u64, hot_bytes: u64) -> Result<Self, ReadModelError> {
        let open = storage("open");
        Ok(Self {
            generation,
            views: db.open_tree(trees::name(trees::VIEWS, generation)).map_err(&open)?,
            meta: db.open_tree(trees::name(trees::META, generation)).map_err(&open)?,
            index: OnceLock::new(),
            deriving: RwLock::new(()),
            hot: HotViews::new(hot_bytes),
        })
    }

    /// After a write of `id`'s record to `views`.
    fn written(&self, id: &str) {
        if let Some(hot) = &self.hot {
            hot.forget(id);
        }
    }

    /// After `views` was cleared.
    fn cleared(&self) {
        if let Some(hot) = &self.hot {
            hot.clear();
        }
    }

    /// The index for a reader of it, derived first if no one has yet. Never called while this
    /// thread holds [`Trees::writing`]'s guard.
    fn index(&self) -> Result<&CategoryIndex, ReadModelError> {
        if let Some(index) = self.index.get() {
            return Ok(index);
        }
        let _alone = self.deriving.write().unwrap_or_else(|p| p.into_inner());
        if let Some(index) = self.index.get() {
            return Ok(index);
        }
        let scanned = CategoryIndex::scan(&self.views).map_err(storage("scan views"))?;
        Ok(self.index.get_or_init(|| scanned))
    }

    /// For a writer: the index to move its listings in, `None` while none is derived (the scan
    /// that derives it will read the record instead). Hold the guard until the listing moved.
    fn writing(&self) -> (RwLockReadGuard<'_, ()>, Option<&CategoryIndex>) {
        let guard = self.deriving.read().unwrap_or_else(|p| p.into_inner());
        (guard, self.index.get())
    }
}

/// Drops every generation's trees but `keep`, and every sled category index (see
/// `trees::BY_CATEGORY`), in the background: sled drops a tree key by key.
fn retire_generations(db: &sled::Db, keep: u64, after: Duration) {
    let names: Vec<sled::IVec> = db
        .tree_names()
        .into_iter()
        .filter(|name| {
            let name = String::from_utf8_lossy(name);
            [trees::VIEWS, trees::BY_CATEGORY, trees::META].iter().any(|base| {
                let generation =
                    if name == *base { Some(0) } else { name.strip_prefix(&format!("{base}@")).and_then(|g| g.parse().ok()) };
                generation.is_some_and(|g: u64| g != keep || *base == trees::BY_CATEGORY)
            })
        })
        .collect();
    if names.is_empty() {
        return;
    }
    let db = db.clone();
    std::thread::spawn(move || {
        std::thread::sleep(after);
        for name in names {
            if let Err(e) = db.drop_tree(&name) {
                tracing::warn!(tree = %String::from_utf8_lossy(&name), error = %e, "dropping a replaced read-model generation failed");
            }
        }
    });
}

/// Products a fold needs before it splits across threads. Under a steady load of 100-event
/// requests at 1M products, splitting their batches in two saved no CPU and left the process
/// 15–30 MB larger, each helper with an allocator heap of its own (BENCHMARKS.md, round
/// sixteen). A bulk load's batches of 1,000 and more still split.
pub(crate) const PARALLEL_FOLD_MIN_PRODUCTS: usize = 512;

/// The threads that fold the other parts of a split batch, one per core beyond the first,
/// started by the first batch split; `None` with one core, or where they could not be started
/// (a batch is then folded whole).
///
/// A thread spawned and joined per batch, as before, had its allocator heap set up and torn
/// down each time: about 2% of a bulk load's CPU (BENCHMARKS.md, round seventeen).
fn fold_helpers() -> Option<&'static rayon_core::ThreadPool> {
    static HELPERS: std::sync::OnceLock<Option<rayon_core::ThreadPool>> = std::sync::OnceLock::new();
    HELPERS
        .get_or_init(|| {
            let helpers = std::thread::available_parallelism().map_or(1, |n| n.get()).checked_sub(1).filter(|&n| n > 0)?;
            rayon_core::ThreadPoolBuilder::new()
                .num_threads(helpers)
                .thread_name(|i| format!("catalog-fold-{}", i + 1))
                .build()
                .inspect_err(
                    |e| tracing::warn!(error = %e, "starting the fold's helper threads failed; batches are folded whole"),
                )
                .ok()
        })
        .as_ref()
}

/// One product, folded.
struct Folded {
    announced: ProductChanged,
    changed: bool,
    /// Its events that changed nothing (stale or repeated).
    stale: usize,
}

fn corrupt(id: &str, detail: impl Into<String>) -> ReadModelError {
    ReadModelError::Corrupt { id: id.to_owned(), detail: detail.into() }
}

fn decode_record(id: &str, raw: sled::IVec) -> Result<StoredView, ReadModelError> {
    StoredView::decode(Bytes::from_owner(raw)).ok_or_else(|| corrupt(id, "cannot be decoded"))
}

/// The state a record of the store holds; a record without one is damage, not a new product.
fn record_state(id: &str, view: &StoredView) -> Result<ProductState, ReadModelError> {
    match view.state(id) {
        Some(Ok(state)) => Ok(state),
        Some(Err(e)) => Err(corrupt(id, format!("holds a state that cannot be decoded: {e}"))),
        None => Err(corrupt(
            id,
            "holds no state: the data dir's states were not all moved into the read model yet (`catalog serve` moves them when it starts)",
        )),
    }
}

/// The category a record is listed in, if it is listed in one.
fn listing(view: &StoredView) -> Option<String> {
    Some(view.category()).filter(|c| view.listed && !c.is_empty()).map(str::to_owned)
}

/// Moves a product's category entry after its record was written (a fold lists first, for the
/// pages it races with; the writes that come here seldom race a page, and a page trusts the
/// record anyway).
fn reindex(index: Option<&CategoryIndex>, id: &str, old: Option<&str>, new: Option<&str>) {
    let Some(index) = index else { return };
    // Always listed anew: cheap in memory, and what puts back an entry a repair found missing.
    if let Some(new) = new {
        index.insert(new, id);
    }
    if let Some(old) = old.filter(|old| Some(*old) != new) {
        index.remove(old, id);
    }
}

/// Carries one product's record, and its listing, from the old generation into the new one:
/// written meanwhile, the old generation's record is the newest.
fn carry(old: &Trees, new: &Trees, id: &str) -> Result<(), ReadModelError> {
    let Some(raw) = old.views.get(id).map_err(storage("swap"))? else { return Ok(()) };
    let (_listing, index) = new.writing();
    let now_in = listing(&decode_record(id, raw.clone())?);
    let before = new.views.get(id).map_err(storage("swap"))?.map(|v| decode_record(id, v)).transpose()?;
    let before = before.as_ref().and_then(listing);
    if now_in != before
        && let (Some(category), Some(index)) = (&now_in, index)
    {
        index.insert(category, id);
    }
    new.views.insert(id, raw).map_err(storage("swap"))?;
    new.written(id);
    if now_in != before
        && let (Some(category), Some(index)) = (&before, index)
    {
        index.remove(category, id);
    }
    Ok(())
}

#[derive(Debug)]
pub struct Page {
    pub items: Vec<StoredView>,
    /// The id to pass as `cursor` for the next page; `None` on the last page.
    pub next_cursor: Option<String>,
}

impl ReadModel {
    /// `ttl`: how long a view is served before it counts as expired (expire-after-write).
    /// A database that is a store ([`ReadModel::open_store`]) opens as one, without a TTL.
    pub fn open(db: &sled::Db, settings: ViewSettings, ttl: Option<Duration>) -> Result<Self, ReadModelError> {
        let root = db.open_tree(trees::ROOT).map_err(storage("open"))?;
        let holds_state = root.contains_key(trees::HOLDS_STATE_KEY).map_err(storage("open"))?;
        Self::open_as(db, settings, ttl, holds_state)
    }

    /// The read model as the store (embedded): every record holds its product's state, so a
    /// view never expires (there is nothing else to re-read it from). An empty database is
    /// marked as a store at once, so every later open of it is one too; one that holds views
    /// already is marked by [`ReadModel::mark_as_store`] once its records are known to be a
    /// store's (`EmbeddedStore::recover` checks).
    pub fn open_store(db: &sled::Db, settings: ViewSettings) -> Result<Self, ReadModelError> {
        let model = Self::open_as(db, settings, None, true)?;
        if model.inner.trees.load().views.is_empty() {
            model.mark_as_store()?;
        }
        Ok(model)
    }

    /// Marks the database as a store: every later open of it is one.
    pub fn mark_as_store(&self) -> Result<(), ReadModelError> {
        let root = self.inner.db.open_tree(trees::ROOT).map_err(storage("open"))?;
        root.insert(trees::HOLDS_STATE_KEY, &[1]).map_err(storage("open"))?;
        Ok(())
    }

    fn open_as(db: &sled::Db, settings: ViewSettings, ttl: Option<Duration>, holds_state: bool) -> Result<Self, ReadModelError> {
        let ttl = if holds_state { None } else { ttl };
        let root = db.open_tree(trees::ROOT).map_err(storage("open"))?;
        let generation = root
            .get(trees::GENERATION_KEY)
            .map_err(storage("open"))?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0);
        // Leftovers of a swap (kept for in-flight reads) or of an interrupted rebuild.
        retire_generations(db, generation, Duration::ZERO);
        Ok(Self::over(db.clone(), Trees::open(db, generation, 0)?, settings, ttl, holds_state, 0))
    }

    /// Keeps up to `bytes` of the most read views in memory (0: none), as `serve` does; the
    /// replay tools read each record once and keep none. Call it on a model just opened,
    /// before it is cloned or derives its index.
    pub fn keep_hot(self, bytes: u64) -> Self {
        let inner = Arc::try_unwrap(self.inner).unwrap_or_else(|_| panic!("keep_hot is for a read model just opened"));
        let trees =
            Arc::try_unwrap(inner.trees.into_inner()).unwrap_or_else(|_| panic!("keep_hot is for a read model just opened"));
        let trees = Trees { hot: HotViews::new(bytes), ..trees };
        Self::over(inner.db, trees, inner.settings, inner.ttl, inner.holds_state, bytes)
    }

    /// How the hot views of the live generation have served (all zero when none are kept).
    pub fn hot_stats(&self) -> HotStats {
        self.inner.trees.load().hot.as_ref().map(HotViews::stats).unwrap_or_default()
    }

    fn over(
        db: sled::Db,
        trees: Trees,
        settings: ViewSettings,
        ttl: Option<Duration>,
        holds_state: bool,
        hot_bytes: u64,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                db,
                trees: ArcSwap::from_pointee(trees),
                settings,
                ttl,
                written_during_rebuild: Mutex::new(None),
                rebuilding: AtomicBool::new(false),
                holds_state,
                writer: std::sync::RwLock::new(()),
                hot_bytes,
            }),
        }
    }

    /// Whether the records hold their products' states: this read model is the store.
    pub fn holds_state(&self) -> bool {
        self.inner.holds_state
    }

    /// Makes everything written so far durable.
    pub fn flush(&self) -> Result<(), ReadModelError> {
        self.inner.db.flush().map(drop).map_err(storage("flush"))
    }

    fn writer(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.inner.writer.read().unwrap_or_else(|p| p.into_inner())
    }

    fn encode(&self, state: &ProductState, now_ms: u64) -> Vec<u8> {
        StoredView::encode(state, self.inner.settings, now_ms, self.inner.holds_state)
    }

    /// Starts an online rebuild: a read model over fresh, empty trees beside the live ones.
    /// Fill it, then [`ReadModel::swap_in`]; meanwhile this one serves and takes writes as usual,
    /// and notes which products were written, since the new trees may have missed them.
    pub fn begin_rebuild(&self) -> Result<ReadModel, ReadModelError> {
        if self.inner.rebuilding.swap(true, Ordering::SeqCst) {
            return Err(ReadModelError::Busy);
        }
        *self.inner.written_during_rebuild.lock().unwrap_or_else(|p| p.into_inner()) = Some(HashSet::new());
        let next = self.inner.trees.load().generation + 1;
        let db = &self.inner.db;
        for base in [trees::VIEWS, trees::META] {
            // A rebuild interrupted before its swap left these behind.
            db.drop_tree(trees::name(base, next)).map_err(storage("rebuild"))?;
        }
        let fresh = Trees::open(db, next, self.inner.hot_bytes)?;
        // Derived now, while it is empty, so the fill keeps it and the swap serves pages at once.
        fresh.index()?;
        Ok(Self::over(db.clone(), fresh, self.inner.settings, self.inner.ttl, self.inner.holds_state, self.inner.hot_bytes))
    }

    /// Makes a rebuilt model's trees the live ones, atomically for readers, and persists the
    /// choice; returns the products written to the old trees while it was built, for the
    /// caller to write again from the store (a write is forward-only, so that is always safe).
    /// Where the records are the store, those products' records are carried over here, under
    /// the writer lock (the old trees are the only place their latest state is): the caller
    /// has nothing left to write.
    pub fn swap_in(&self, fresh: &ReadModel) -> Result<Vec<String>, ReadModelError> {
        let _alone = self.inner.writer.write().unwrap_or_else(|p| p.into_inner());
        let new = fresh.inner.trees.load_full();
        let old = self.inner.trees.load_full();
        new.meta
            .insert(CHECKPOINT_KEY, &self.checkpoint()?.max(fresh.checkpoint()?).to_be_bytes())
            .map_err(storage("checkpoint"))?;
        let root = self.inner.db.open_tree(trees::ROOT).map_err(storage("swap"))?;
        // Complete: every write notes its product under the writer lock this swap holds alone.
        let written = self.inner.written_during_rebuild.lock().unwrap_or_else(|p| p.into_inner()).take().unwrap_or_default();
        if self.inner.holds_state {
            for id in &written {
                carry(&old, &new, id)?;
            }
        }
        self.inner.db.flush().map_err(storage("swap"))?;
        root.insert(trees::GENERATION_KEY, &new.generation.to_be_bytes()).map_err(storage("swap"))?;
        self.inner.db.flush().map_err(storage("swap"))?;
        self.inner.trees.store(new.clone());
        self.inner.rebuilding.store(false, Ordering::SeqCst);
        retire_generations(&self.inner.db, new.generation, RETIRE_AFTER);
        drop(old);
        Ok(written.into_iter().collect())
    }

    /// Gives up an online rebuild without swapping (its trees go at the next one).
    pub fn abandon_rebuild(&self) {
        self.inner.written_during_rebuild.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.inner.rebuilding.store(false, Ordering::SeqCst);
    }

    /// The live generation (0 until the first online rebuild).
    pub fn generation(&self) -> u64 {
        self.inner.trees.load().generation
    }

    /// The stored view, tombstones included (check `listed`).
    pub fn get(&self, id: &str) -> Result<Option<StoredView>, ReadModelError> {
        let trees = self.inner.trees.load();
        let read = || {
            let value = trees.views.get(id).map_err(storage("get"))?;
            Ok(value.and_then(|v| StoredView::decode(Bytes::from_owner(v))))
        };
        match &trees.hot {
            Some(hot) => hot.get_or_read(id, read),
            None => read(),
        }
    }

    /// Listed products of a category in id order, starting after `after`. Keyed by id, so
    /// concurrent changes can neither repeat nor skip a product across pages.
    pub fn page(&self, category: &str, after: Option<&str>, limit: usize) -> Result<Page, ReadModelError> {
        let trees = self.inner.trees.load_full();
        let mut items = Vec::with_capacity(limit.min(DEFAULT_MAX_PAGE));
        let mut last_id = String::new();
        let mut scanned: Option<Id> = after.map(|id| Id::new(id.as_bytes()));
        // One more than the page, to know whether a next page exists.
        let step = limit.saturating_add(1).min(DEFAULT_MAX_PAGE + 1);
        loop {
            let ids = trees.index()?.after(category, scanned.as_ref().map(Id::as_bytes), step);
            for id in &ids {
                let id = std::str::from_utf8(id.as_bytes()).unwrap_or_default();
                // The index may briefly hold an entry its view has moved away from (a write
                // lists before it writes the record, and unlists after): trust the view.
                let Some(view) = self.get(id)?.filter(|v| v.listed && v.category() == category) else { continue };
                if items.len() == limit {
                    return Ok(Page { items, next_cursor: Some(last_id) });
                }
                items.push(view);
                id.clone_into(&mut last_id);
            }
            if ids.len() < step {
                return Ok(Page { items, next_cursor: None });
            }
            scanned = ids.last().cloned();
        }
    }

    /// Applies states whose revision is newer than the stored view's; returns how many views
    /// changed. Compare-and-swap per product, so a refresh and a cache-aside fill racing on the
    /// same product can only ever leave the newer revision behind.
    pub fn apply<'a>(&self, states: impl IntoIterator<Item = &'a ProductState>) -> Result<usize, ReadModelError> {
        let _writer = self.writer();
        let trees = self.inner.trees.load();
        let (_listing, index) = trees.writing();
        let mut written = 0;
        for state in states {
            if self.apply_one(&trees, index, state)? {
                written += 1;
            }
        }
        Ok(written)
    }

    /// The product's state from its record; `None` when it has no record, or a record without
    /// a state (a read model that is not the store).
    pub fn state(&self, id: &str) -> Result<Option<ProductState>, ReadModelError> {
        let Some(raw) = self.inner.trees.load().views.get(id).map_err(storage("get"))? else { return Ok(None) };
        let view = decode_record(id, raw)?;
        if !view.has_state() {
            return Ok(None);
        }
        record_state(id, &view).map(Some)
    }

    /// Every record's state in id order: the replay tools' view of the embedded store. A
    /// record without a state is an error here, since in a store every record holds one.
    pub fn states(&self) -> impl Iterator<Item = Result<ProductState, ReadModelError>> + use<> {
        self.inner.trees.load().views.iter().map(|item| {
            let (key, raw) = item.map_err(storage("scan views"))?;
            let id = String::from_utf8_lossy(&key);
            record_state(&id, &decode_record(&id, raw)?)
        })
    }

    /// Folds a batch of events into their products' records, as the embedded store: each
    /// product's record is read once, its events applied in order (versions, else log
    /// positions, decide what is stale), and written once with its state and fresh bodies.
    /// The category index moves only where a product's listing did. Every changed state is
    /// also announced with the outcome, so the refresher has nothing left to write.
    ///
    /// Products are folded on up to one thread per core, each a part of the batch: sled's
    /// copy-on-write of leaves is most of a fold's time, and two inserts into one tree run in
    /// parallel, where one `apply_batch` at a time runs in the whole process. No batch is
    /// atomic across products, nor needs to be: a start folds in again whatever a crash cut off.
    pub fn fold(&self, events: &[SequencedEvent]) -> Result<WriteOutcome, ReadModelError> {
        debug_assert!(self.inner.holds_state, "only a read model that is the store folds events");
        if events.is_empty() {
            return Ok(WriteOutcome::default());
        }
        let _writer = self.writer();
        let trees = self.inner.trees.load_full();
        // Each product's events in their order, the products in the order they first appear.
        let mut slot: HashMap<&ProductId, usize> = HashMap::with_capacity(events.len());
        let mut products: Vec<(&ProductId, Vec<&SequencedEvent>)> = Vec::with_capacity(events.len());
        for sequenced in events {
            let id = &sequenced.event.product_id;
            match slot.entry(id) {
                Entry::Occupied(e) => products[*e.get()].1.push(sequenced),
                Entry::Vacant(e) => {
                    e.insert(products.len());
                    products.push((id, vec![sequenced]));
                }
            }
        }
        let now = millis_since_epoch(SystemTime::now());
        let helpers = fold_helpers().filter(|_| products.len() >= PARALLEL_FOLD_MIN_PRODUCTS);
        let threads = helpers.map_or(1, |pool| pool.current_num_threads() + 1);
        let per_thread = products.len().div_ceil(threads).max(1);
        let mut chunks = products.chunks(per_thread);
        let first = chunks.next().unwrap_or_default();
        // This thread folds the first part, a helper each of the others (none for a small batch).
        let mut rest: Vec<_> = chunks.map(|part| (part, None)).collect();
        let first = match helpers {
            Some(pool) if !rest.is_empty() => pool.in_place_scope(|scope| {
                for (part, folded) in &mut rest {
                    let (trees, part) = (&trees, *part);
                    scope.spawn(move |_| *folded = Some(self.fold_part(trees, part, now)));
                }
                self.fold_part(&trees, first, now)
            }),
            _ => self.fold_part(&trees, first, now),
        };
        let parts = std::iter::once(first)
            .chain(rest.into_iter().map(|(_, folded)| folded.expect("the scope ends once every part is folded")));
        let mut outcome = WriteOutcome::default();
        for part in parts {
            for folded in part? {
                outcome.unchanged += folded.stale;
                if folded.changed {
                    self.note_written(folded.announced.product_id.as_str());
                    outcome.changed.push(folded.announced);
                } else {
                    outcome.unchanged_products.push(folded.announced);
                }
            }
        }
        Ok(outcome)
    }

    fn fold_part(
        &self,
        trees: &Trees,
        products: &[(&ProductId, Vec<&SequencedEvent>)],
        now: u64,
    ) -> Result<Vec<Folded>, ReadModelError> {
        let (_listing, index) = trees.writing();
        let mut out = Vec::with_capacity(products.len());
        for (id, events) in products {
            let key = id.as_str();
            let mut current = trees.views.get(key).map_err(storage("get"))?;
            // Compare-and-swap: a cache-aside fill or a repair may write the same record
            // meanwhile; losing that race folds the product again over what it wrote, which
            // the failed swap hands back.
            let (state, changed, stale) = loop {
                let (mut state, listed_in) = match &current {
                    None => (ProductState::new((*id).clone()), None),
                    Some(raw) => {
                        let view = decode_record(key, raw.clone())?;
                        (record_state(key, &view)?, listing(&view))
                    }
                };
                let (mut changed, mut stale) = (false, 0);
                for sequenced in events {
                    match state.apply_at(&sequenced.event, sequenced.position) {
                        Applied::Changed => changed = true,
                        Applied::Stale | Applied::Unchanged => stale += 1,
                    }
                }
                if !changed {
                    break (state, changed, stale);
                }
                let now_in = state.category().filter(|c| !c.is_empty());
                let moved = now_in != listed_in.as_deref();
                // A new listing before the record, the old one after: a page meanwhile may see an
                // extra entry, which it skips since it trusts the record, and never a listed
                // record missing from its category.
                if let (Some(category), Some(index)) = (now_in.filter(|_| moved), index) {
                    index.insert(category, key);
                }
                let swapped = trees
                    .views
                    .compare_and_swap(key, current.as_deref(), Some(self.encode(&state, now)))
                    .map_err(storage("write view"))?;
                if let Err(lost) = swapped {
                    current = lost.current;
                    continue;
                }
                trees.written(key);
                if let (Some(category), Some(index)) = (listed_in.as_deref().filter(|_| moved), index) {
                    index.remove(category, key);
                }
                break (state, changed, stale);
            };
            let announced = ProductChanged {
                product_id: state.id.clone(),
                revision: state.revision,
                versions: state.versions.clone(),
                state: Some(Arc::new(state)),
            };
            out.push(Folded { announced, changed, stale });
        }
        Ok(out)
    }

    /// Applies states as [`ReadModel::apply`] does, 1,024 at a time, so memory holds
    /// one step and never the whole source; returns how many states it read. The first error,
    /// from the source or the model, stops it.
    pub fn apply_all<E: From<ReadModelError>>(
        &self,
        states: impl IntoIterator<Item = Result<ProductState, E>>,
    ) -> Result<u64, E> {
        let (mut read, mut step) = (0, Vec::with_capacity(APPLY_STEP));
        for state in states {
            step.push(state?);
            if step.len() == APPLY_STEP {
                self.apply(&step)?;
                read += step.len() as u64;
                step.clear();
            }
        }
        self.apply(&step)?;
        Ok(read + step.len() as u64)
    }

    /// Whether a view has outlived the TTL and should be re-read from the store.
    pub fn is_expired(&self, view: &StoredView) -> bool {
        self.inner.ttl.is_some_and(|ttl| {
            let age = millis_since_epoch(SystemTime::now()).saturating_sub(view.refreshed_at_ms);
            u128::from(age) >= ttl.as_millis()
        })
    }

    fn apply_one(&self, trees: &Trees, index: Option<&CategoryIndex>, state: &ProductState) -> Result<bool, ReadModelError> {
        let key = state.id.as_str();
        let mut encoded = None;
        let mut current = trees.views.get(key).map_err(storage("get"))?;
        loop {
            let current_view = current.clone().and_then(|v| StoredView::decode(Bytes::from_owner(v)));
            // Newer always wins; the same revision only renews an expired view's timestamp, or
            // gives a record of the store the state it lacks (a data dir from before records
            // held states).
            let keep = current_view.as_ref().is_some_and(|v| {
                v.revision > state.revision
                    || (v.revision == state.revision && !self.is_expired(v) && (v.has_state() || !self.inner.holds_state))
            });
            if keep {
                return Ok(false);
            }
            let now = millis_since_epoch(SystemTime::now());
            let value = encoded.get_or_insert_with(|| self.encode(state, now)).clone();
            match trees.views.compare_and_swap(key, current.as_deref(), Some(value)).map_err(storage("write view"))? {
                Ok(()) => {
                    trees.written(key);
                    self.note_written(key);
                    let old = current_view.filter(|v| v.listed).map(|v| v.category().to_owned()).filter(|c| !c.is_empty());
                    reindex(index, key, old.as_deref(), state.category());
                    return Ok(true);
                }
                Err(lost) => current = lost.current,
            }
        }
    }

    fn note_written(&self, id: &str) {
        if self.inner.rebuilding.load(Ordering::Relaxed)
            && let Some(written) = self.inner.written_during_rebuild.lock().unwrap_or_else(|p| p.into_inner()).as_mut()
        {
            written.insert(id.to_owned());
        }
    }

    /// Every stored view in id order, tombstones included: the replay tools' view.
    pub fn views(&self) -> impl Iterator<Item = Result<(String, Option<StoredView>), ReadModelError>> + use<> {
        self.inner.trees.load().views.iter().map(|item| {
            let (key, value) = item.map_err(storage("scan views"))?;
            Ok((String::from_utf8_lossy(&key).into_owned(), StoredView::decode(Bytes::from_owner(value))))
        })
    }

    /// Every category-index entry as `(category, id)`, categories in no particular order.
    pub fn listings(&self) -> Result<Vec<(String, String)>, ReadModelError> {
        Ok(self.inner.trees.load().index()?.entries())
    }

    pub fn is_indexed(&self, category: &str, id: &str) -> Result<bool, ReadModelError> {
        Ok(self.inner.trees.load().index()?.contains(category, id))
    }

    /// Scans the records for what is kept in memory beside them (the category index), if no
    /// read has yet: `serve` does it before it listens, so no request waits for it, and every
    /// write after keeps it.
    pub fn prepare(&self) -> Result<(), ReadModelError> {
        self.inner.trees.load().index().map(drop)
    }

    /// Writes the view of `state` whatever revision is stored, and fixes its index entry:
    /// `replay verify --repair`, which has compared the view with the store.
    pub fn overwrite(&self, state: &ProductState) -> Result<(), ReadModelError> {
        let _writer = self.writer();
        let key = state.id.as_str();
        let trees = self.inner.trees.load();
        let (_listing, index) = trees.writing();
        let value = self.encode(state, millis_since_epoch(SystemTime::now()));
        let old = trees.views.insert(key, value).map_err(storage("write view"))?;
        trees.written(key);
        self.note_written(key);
        let old = old.and_then(|v| StoredView::decode(Bytes::from_owner(v))).filter(|v| v.listed);
        let old = old.as_ref().map(StoredView::category).filter(|c| !c.is_empty()).map(str::to_owned);
        reindex(index, key, old.as_deref(), state.category());
        Ok(())
    }

    /// Drops a product's view and its index entry (a view the store knows nothing of).
    pub fn remove(&self, id: &str) -> Result<(), ReadModelError> {
        let _writer = self.writer();
        let trees = self.inner.trees.load();
        let (_listing, index) = trees.writing();
        let old = trees.views.remove(id).map_err(storage("remove view"))?;
        trees.written(id);
        if let Some(old) = old
            && let Some(view) = StoredView::decode(Bytes::from_owner(old))
            && let Some(index) = index
        {
            index.remove(view.category(), id);
        }
        Ok(())
    }

    /// Drops one index entry.
    pub fn unindex(&self, category: &str, id: &str) -> Result<(), ReadModelError> {
        self.inner.trees.load().index()?.remove(category, id);
        Ok(())
    }

    pub fn settings(&self) -> ViewSettings {
        self.inner.settings
    }

    pub fn revision_of(&self, id: &str) -> Result<Option<u64>, ReadModelError> {
        Ok(self.get(id)?.map(|v| v.revision))
    }

    /// The highest log sequence whose effects every view reflects.
    pub fn checkpoint(&self) -> Result<u64, ReadModelError> {
        let value = self.inner.trees.load().meta.get(CHECKPOINT_KEY).map_err(storage("checkpoint"))?;
        Ok(value.and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes)).unwrap_or(0))
    }

    pub fn set_checkpoint(&self, sequence: u64) -> Result<(), ReadModelError> {
        self.inner.trees.load().meta.insert(CHECKPOINT_KEY, &sequence.to_be_bytes()).map_err(storage("checkpoint"))?;
        Ok(())
    }

    /// Drops every view, index entry and the checkpoint (before a rebuild).
    pub fn clear(&self) -> Result<(), ReadModelError> {
        let clear = storage("clear");
        let trees = self.inner.trees.load();
        trees.views.clear().map_err(&clear)?;
        trees.cleared();
        if let Some(index) = trees.index.get() {
            index.clear();
        }
        trees.meta.clear().map_err(&clear)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use catalog_domain::{CatalogEvent, ProductId};
    use std::time::SystemTime;

    fn model() -> (tempfile::TempDir, ReadModel) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        (dir, ReadModel::open(&db, ViewSettings::default(), None).unwrap())
    }

    fn state(id: &str, events: &[serde_json::Value]) -> ProductState {
        let mut s = ProductState::new(ProductId::parse(id).unwrap());
        for e in events {
            s.apply(&CatalogEvent::from_value(e, SystemTime::UNIX_EPOCH).unwrap());
        }
        s
    }

    /// The product id a view's mobile body names.
    fn body_id(body: &[u8]) -> String {
        serde_json::from_slice::<serde_json::Value>(body).unwrap()["id"].as_str().unwrap().to_owned()
    }

    fn created(id: &str, category: &str) -> serde_json::Value {
        serde_json::json!({"productId": id, "name": format!("Product {id}"), "category": category, "status": "created"})
    }

    #[test]
    fn an_older_state_never_overwrites_a_newer_view() {
        let (_d, rm) = model();
        let v1 = state("P1", &[created("P1", "A")]);
        let v2 = state("P1", &[created("P1", "A"), serde_json::json!({"productId":"P1","quantity":3})]);
        assert_eq!(rm.apply(std::slice::from_ref(&v2)).unwrap(), 1);
        assert_eq!(rm.apply(&[v1]).unwrap(), 0);
        assert_eq!(rm.get("P1").unwrap().unwrap().revision, 2);
    }

    #[test]
    fn pages_walk_a_category_without_duplicates_or_gaps() {
        let (_d, rm) = model();
        let states: Vec<_> = (0..25).map(|i| state(&format!("P{i:02}"), &[created(&format!("P{i:02}"), "C")])).collect();
        rm.apply(&states).unwrap();
        rm.apply(&[state("Q1", &[created("Q1", "Other")])]).unwrap();
        let mut seen = Vec::new();
        let mut cursor = None;
        loop {
            let page = rm.page("C", cursor.as_deref(), 10).unwrap();
            seen.extend(page.items.iter().map(|v| v.body(crate::Variant::Mobile)));
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        assert_eq!(seen.len(), 25);
        let ids: Vec<String> = seen.iter().map(|b| body_id(b)).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(ids, sorted);
    }

    #[test]
    fn recategorised_and_deleted_products_leave_the_old_listing() {
        let (_d, rm) = model();
        rm.apply(&[state("P1", &[created("P1", "A")])]).unwrap();
        rm.apply(&[state("P1", &[created("P1", "A"), created("P1", "B")])]).unwrap();
        assert!(rm.page("A", None, 10).unwrap().items.is_empty());
        assert_eq!(rm.page("B", None, 10).unwrap().items.len(), 1);
        let deleted =
            state("P1", &[created("P1", "A"), created("P1", "B"), serde_json::json!({"productId":"P1","status":"deleted"})]);
        rm.apply(&[deleted]).unwrap();
        assert!(rm.page("B", None, 10).unwrap().items.is_empty());
        assert!(!rm.get("P1").unwrap().unwrap().listed);
    }

    #[test]
    fn the_index_is_built_from_the_records_when_the_model_opens() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        {
            let rm = ReadModel::open_store(&db, ViewSettings::default()).unwrap();
            for (id, category) in [("P1", "A"), ("P2", "A"), ("P3", "B")] {
                rm.apply(&[state(id, &[created(id, category)])]).unwrap();
            }
            let deleted = state("P2", &[created("P2", "A"), serde_json::json!({"productId":"P2","status":"deleted"})]);
            rm.apply(&[deleted]).unwrap();
        }
        // What a data dir from before the index moved into memory holds beside the records.
        db.open_tree(trees::BY_CATEGORY).unwrap().insert(b"A\0P9", &[]).unwrap();
        let rm = ReadModel::open(&db, ViewSettings::default(), None).unwrap();
        let ids = |category| -> Vec<String> {
            rm.page(category, None, 10).unwrap().items.iter().map(|v| body_id(&v.body(crate::Variant::Mobile))).collect()
        };
        assert_eq!(ids("A"), ["P1"], "P2 is a tombstone, P9 was only in the old index");
        assert_eq!(ids("B"), ["P3"]);
        let mut listed = rm.listings().unwrap();
        listed.sort();
        assert_eq!(listed, [("A".to_owned(), "P1".to_owned()), ("B".to_owned(), "P3".to_owned())]);
        for _ in 0..200 {
            if !db.tree_names().iter().any(|name| name.as_ref() == trees::BY_CATEGORY.as_bytes()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("the old sled index is dropped");
    }

    #[test]
    fn writes_before_the_index_is_derived_and_while_it_is_are_all_listed() {
        let (_d, rm) = model();
        let id = |i: usize| format!("P{i:04}");
        for i in 0..200 {
            rm.apply(&[state(&id(i), &[created(&id(i), "A")])]).unwrap();
        }
        assert!(rm.inner.trees.load().index.get().is_none(), "a write derives nothing");
        // Writers move products while a page derives the index: each write lands before the
        // scan, which reads it, or after, and moves the listing itself.
        std::thread::scope(|scope| {
            let writer = scope.spawn(|| {
                for i in 0..400 {
                    let category = if i % 2 == 0 { "B" } else { "A" };
                    rm.apply(&[state(&id(i), &[created(&id(i), "A"), created(&id(i), category)])]).unwrap();
                }
            });
            while !writer.is_finished() && rm.inner.trees.load().index.get().is_none() {
                rm.page("A", None, 1).unwrap();
            }
            writer.join().unwrap();
        });
        let mut listed = rm.listings().unwrap();
        listed.sort();
        let mut expected: Vec<(String, String)> =
            (0..400).map(|i| ((if i % 2 == 0 { "B" } else { "A" }).to_owned(), id(i))).collect();
        expected.sort();
        assert_eq!(listed, expected);
    }

    #[test]
    fn a_page_trusts_the_record_over_an_index_entry_it_moved_away_from() {
        let (_d, rm) = model();
        for id in ["P1", "P2", "P3"] {
            rm.apply(&[state(id, &[created(id, "A")])]).unwrap();
        }
        // What a page sees while a fold moves P2 to B: listed in both, its record in B.
        rm.apply(&[state("P2", &[created("P2", "A"), created("P2", "B")])]).unwrap();
        rm.inner.trees.load().index().unwrap().insert("A", "P2");
        let first = rm.page("A", None, 1).unwrap();
        assert_eq!(first.next_cursor.as_deref(), Some("P1"));
        let second = rm.page("A", first.next_cursor.as_deref(), 1).unwrap();
        assert_eq!((second.items.len(), second.next_cursor), (1, None), "P3, with P2 skipped");
        assert_eq!(rm.page("B", None, 10).unwrap().items.len(), 1);
    }

    #[test]
    fn an_expired_view_is_renewed_by_the_same_revision() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let rm = ReadModel::open(&db, ViewSettings::default(), Some(Duration::ZERO)).unwrap();
        let s = state("P1", &[created("P1", "A")]);
        rm.apply([&s]).unwrap();
        let first = rm.get("P1").unwrap().unwrap();
        assert!(rm.is_expired(&first));
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(rm.apply([&s]).unwrap(), 1, "same revision, expired: rewritten");
        assert!(rm.get("P1").unwrap().unwrap().refreshed_at_ms > first.refreshed_at_ms);
        let (_d, fresh) = model();
        fresh.apply([&s]).unwrap();
        assert_eq!(fresh.apply([&s]).unwrap(), 0, "same revision, no TTL: kept");
    }

    #[test]
    fn the_hot_views_follow_every_kind_of_write() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let rm = ReadModel::open(&db, ViewSettings::default(), None).unwrap().keep_hot(1 << 20);
        let revision = |rm: &ReadModel| {
            // Twice: the second read is the one memory answers.
            rm.get("P1").unwrap();
            rm.get("P1").unwrap().map(|v| v.revision)
        };
        let v1 = state("P1", &[created("P1", "A")]);
        let v2 = state("P1", &[created("P1", "A"), serde_json::json!({"productId":"P1","quantity":3})]);
        assert_eq!(revision(&rm), None);
        rm.apply([&v1]).unwrap();
        assert_eq!(revision(&rm), Some(1));
        rm.apply([&v2]).unwrap();
        assert_eq!(revision(&rm), Some(2), "a newer state");
        rm.overwrite(&v1).unwrap();
        assert_eq!(revision(&rm), Some(1), "an overwrite by a repair");
        rm.remove("P1").unwrap();
        assert_eq!(revision(&rm), None, "a removal");
        rm.overwrite(&v2).unwrap();
        assert_eq!(revision(&rm), Some(2));
        rm.clear().unwrap();
        assert_eq!(revision(&rm), None, "a clear");
        let stats = rm.hot_stats();
        assert!(stats.hits >= 4 && stats.entries == 0, "{stats:?}");
        assert_eq!(ReadModel::open(&db, ViewSettings::default(), None).unwrap().hot_stats(), HotStats::default());
    }

    #[test]
    fn checkpoint_round_trips() {
        let (_d, rm) = model();
        assert_eq!(rm.checkpoint().unwrap(), 0);
        rm.set_checkpoint(42).unwrap();
        assert_eq!(rm.checkpoint().unwrap(), 42);
    }
}

#[cfg(test)]
mod rebuild_tests {
    use super::*;
    use catalog_domain::{CatalogEvent, ProductId};

    fn state(id: &str, name: &str, revision_bumps: usize) -> ProductState {
        let mut s = ProductState::new(ProductId::parse(id).unwrap());
        for i in 0..=revision_bumps {
            let e = serde_json::json!({"productId": id, "name": name, "category": "C", "status": "updated", "version": i + 1});
            s.apply(&CatalogEvent::from_value(&e, SystemTime::UNIX_EPOCH).unwrap());
        }
        s
    }

    fn name_of(model: &ReadModel, id: &str) -> Option<String> {
        let view = model.get(id).unwrap()?;
        let body: serde_json::Value = serde_json::from_slice(&view.body(crate::Variant::Web)).ok()?;
        body["product"]["name"].as_str().map(str::to_owned)
    }

    #[test]
    fn an_online_rebuild_swaps_whole_generations_while_reads_and_writes_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        // Hot views kept: what was read from the old generation is not served after the swap.
        let live = ReadModel::open(&db, ViewSettings::default(), None).unwrap().keep_hot(1 << 20);
        live.apply(&[state("A", "Old A", 0), state("B", "Old B", 0)]).unwrap();
        live.set_checkpoint(7).unwrap();

        let fresh = live.begin_rebuild().unwrap();
        assert!(matches!(live.begin_rebuild(), Err(ReadModelError::Busy)), "one rebuild at a time");
        fresh.apply(&[state("A", "Rebuilt A", 1), state("B", "Rebuilt B", 1)]).unwrap();
        // The live model keeps serving the old generation, and takes a write meanwhile.
        assert_eq!(name_of(&live, "A").as_deref(), Some("Old A"));
        live.apply(&[state("C", "New C", 0)]).unwrap();
        let written = live.swap_in(&fresh).unwrap();
        assert_eq!(written, ["C"], "what the new trees may have missed");
        assert_eq!((name_of(&live, "A").as_deref(), live.get("C").unwrap().is_none()), (Some("Rebuilt A"), true));
        assert_eq!((live.generation(), live.checkpoint().unwrap()), (1, 7));
        assert_eq!(live.page("C", None, 10).unwrap().items.len(), 2);
        drop((live, fresh));

        // The choice survives a restart; the old generation's trees are dropped.
        let again = ReadModel::open(&db, ViewSettings::default(), None).unwrap();
        assert_eq!((again.generation(), name_of(&again, "B").as_deref()), (1, Some("Rebuilt B")));
        std::thread::sleep(Duration::from_millis(200));
        assert!(!db.tree_names().iter().any(|n| n.as_ref() == trees::VIEWS.as_bytes()), "generation 0 dropped");
    }
}
