//! The most read views, decoded and in memory in front of sled: a GET that hits skips sled's
//! tree walk and the record's decoding, which were a sixth of a read's CPU (BENCHMARKS.md).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use quick_cache::sync::{Cache, GuardResult};

use crate::view::StoredView;

/// Bytes kept for hot views when `--hot-views-mb` is not given.
pub const DEFAULT_HOT_VIEWS_BYTES: u64 = 32 << 20;

/// What an entry holds beyond its record: the key's allocation, the decoded offsets (about
/// 200 bytes of `StoredView`) and the cache's own bookkeeping; an estimate, not a measurement.
const ENTRY_OVERHEAD: u64 = 256;

/// Records are a few hundred bytes to a few KiB: the first guess of how many fit.
const TYPICAL_RECORD: u64 = 1536;

#[derive(Clone)]
struct Weight;

impl quick_cache::Weighter<String, StoredView> for Weight {
    fn weight(&self, key: &String, view: &StoredView) -> u64 {
        key.len() as u64 + view.raw().len() as u64 + ENTRY_OVERHEAD
    }
}

/// One generation's hot views. Every write of a record forgets its entry after sled has it;
/// a read that misses reserves the entry before it reads sled and fills it only if no write
/// forgot it meanwhile, so an entry is never older than the record it stands for.
pub(crate) struct HotViews {
    cache: Cache<String, StoredView, Weight>,
    hits: AtomicU64,
    misses: AtomicU64,
}

/// How the hot views have served, for the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HotStats {
    pub hits: u64,
    pub misses: u64,
    /// Weight held (records plus overhead), at most the configured bytes.
    pub bytes: u64,
    pub entries: u64,
}

impl HotViews {
    /// `None` for a budget of 0: every read goes to sled.
    pub(crate) fn new(bytes: u64) -> Option<Self> {
        (bytes > 0).then(|| Self {
            cache: Cache::with_weighter((bytes / TYPICAL_RECORD).max(16) as usize, bytes, Weight),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        })
    }

    /// The view of `id`: from memory, else from `read` (sled), kept for the next read.
    pub(crate) fn get_or_read<E>(
        &self,
        id: &str,
        read: impl FnOnce() -> Result<Option<StoredView>, E>,
    ) -> Result<Option<StoredView>, E> {
        // Zero wait: a reader never queues behind another's miss of the same id; it reads
        // sled itself, which is what it would do without this cache.
        match self.cache.get_value_or_guard(id, Some(Duration::ZERO)) {
            GuardResult::Value(view) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                Ok(Some(view))
            }
            GuardResult::Guard(reserved) => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                let view = read()?;
                if let Some(view) = &view {
                    // Refused when a write forgot the entry after the reservation: the view
                    // read may be older than sled's by now, and is not kept. Detached, so the
                    // weight is what the entry really holds.
                    let _ = reserved.insert(view.detached());
                }
                Ok(view)
            }
            GuardResult::Timeout => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                read()
            }
        }
    }

    /// After a write of `id`'s record: the next read takes it from sled.
    pub(crate) fn forget(&self, id: &str) {
        self.cache.remove(id);
    }

    pub(crate) fn clear(&self) {
        self.cache.clear();
    }

    pub(crate) fn stats(&self) -> HotStats {
        HotStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            bytes: self.cache.weight(),
            entries: self.cache.len() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use catalog_domain::{ProductState, ViewSettings};

    /// A record that says which write it came from by its revision.
    fn view(revision: u64) -> StoredView {
        let mut state = ProductState::new(catalog_domain::ProductId::parse("P1").unwrap());
        state.revision = revision;
        StoredView::decode(Bytes::from(StoredView::encode(&state, ViewSettings::default(), 0, true))).unwrap()
    }

    #[test]
    fn a_read_is_kept_and_a_write_forgets_it() {
        let hot = HotViews::new(1 << 20).unwrap();
        let mut reads = 0;
        for _ in 0..3 {
            hot.get_or_read::<()>("P1", || {
                reads += 1;
                Ok(Some(view(1)))
            })
            .unwrap();
        }
        assert_eq!(reads, 1, "the second and third reads are served from memory");
        hot.forget("P1");
        let again = hot.get_or_read::<()>("P1", || Ok(Some(view(2)))).unwrap().unwrap();
        assert_eq!(again.revision, 2);
        assert_eq!(hot.stats().hits, 2);
        assert_eq!(hot.stats().misses, 2);
    }

    #[test]
    fn a_write_during_a_miss_keeps_the_read_out() {
        let hot = HotViews::new(1 << 20).unwrap();
        // The read saw the old record; a write replaced it and forgot the entry before the
        // read could keep what it saw.
        let seen = hot
            .get_or_read::<()>("P1", || {
                hot.forget("P1");
                Ok(Some(view(1)))
            })
            .unwrap();
        assert!(seen.is_some(), "the read itself is answered");
        let next = hot.get_or_read::<()>("P1", || Ok(Some(view(2)))).unwrap().unwrap();
        assert_eq!(next.revision, 2, "what the raced read saw was not kept");
    }

    #[test]
    fn an_unknown_id_is_not_kept_and_no_budget_means_no_cache() {
        let hot = HotViews::new(1 << 20).unwrap();
        assert!(hot.get_or_read::<()>("P9", || Ok(None)).unwrap().is_none());
        assert_eq!(hot.stats().entries, 0);
        assert!(HotViews::new(0).is_none());
    }

    #[test]
    fn the_budget_bounds_what_is_held() {
        let hot = HotViews::new(64 << 10).unwrap();
        for i in 0..1000 {
            hot.get_or_read::<()>(&format!("P{i}"), || Ok(Some(view(1)))).unwrap();
        }
        assert!(hot.stats().bytes <= 64 << 10, "{:?}", hot.stats());
        assert!(hot.stats().entries < 1000);
    }
}
