//! The log's projection: the state every product reaches when its events are folded in log
//! order under the same rule the store applies (versions, else positions).

use std::collections::HashSet;
use std::hash::BuildHasher;

use hashbrown::{DefaultHashBuilder, HashTable};

use catalog_domain::state::Applied;
use catalog_domain::{CatalogEvent, ParseLimits, ProductId, ProductState};
use catalog_pipeline::SourceError;
use catalog_pipeline::embedded::{EmbeddedLog, LogEntry, LogSnapshot};

use crate::ReplayError;

/// Log entries parsed together (in parallel) before they are folded in order.
const PARSE_CHUNK: usize = 16 * 1024;
/// The most states a projection makes room for up front (about 4 GiB of address space); past
/// it, the room grows as products come.
const MAX_ROOM: usize = 16 << 20;

/// What a fold read and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FoldReport {
    pub entries_read: u64,
    pub events_applied: u64,
    pub invalid_skipped: u64,
    pub dead_lettered_skipped: u64,
    pub last_sequence: u64,
    /// The last sequence the snapshot holds (0: none, the log was whole).
    pub snapshot_sequence: u64,
}

/// The state of every product a fold met (AWS: the whole log; embedded: the tail past the
/// snapshot), in the order it first met them, found by id through a table of positions: the
/// states are written once, where they stay. Held as a map of id to state, 1M products took a
/// 2M-slot table of whole states that grew by rehashing, and its fresh pages were a sixth of a
/// rebuild's CPU (BENCHMARKS.md, round six).
#[derive(Default)]
pub struct Projection {
    states: Vec<ProductState>,
    slots: HashTable<u32>,
    hasher: DefaultHashBuilder,
    pub report: FoldReport,
}

impl std::fmt::Debug for Projection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Projection").field("products", &self.states.len()).field("report", &self.report).finish()
    }
}

impl Projection {
    /// A projection with room for `products` states, if memory allows (untouched room costs
    /// address space, not memory).
    fn with_room(products: usize) -> Self {
        let mut projection = Self::default();
        let _ = projection.states.try_reserve_exact(products);
        projection
    }

    /// Folds one event in; call in log order.
    pub fn apply(&mut self, event: &CatalogEvent, position: Option<u64>) {
        let state = self.state_mut(&event.product_id);
        if state.apply_at(event, position) == Applied::Changed {
            self.report.events_applied += 1;
        }
    }

    /// The product's state, a new one if the projection has none yet.
    fn state_mut(&mut self, id: &ProductId) -> &mut ProductState {
        let hash = self.hasher.hash_one(id);
        let at = match self.slot(hash, id) {
            Some(at) => at,
            None => self.push(hash, ProductState::new(id.clone())),
        };
        &mut self.states[at]
    }

    /// Sets a product's state outright (from a snapshot).
    fn insert(&mut self, state: ProductState) {
        let hash = self.hasher.hash_one(&state.id);
        match self.slot(hash, &state.id) {
            Some(at) => self.states[at] = state,
            None => {
                self.push(hash, state);
            }
        }
    }

    fn slot(&self, hash: u64, id: &ProductId) -> Option<usize> {
        self.slots.find(hash, |&at| self.states[at as usize].id == *id).map(|&at| at as usize)
    }

    /// Adds the state of a product the projection does not hold; returns where it is.
    fn push(&mut self, hash: u64, state: ProductState) -> usize {
        let at = self.states.len();
        self.states.push(state);
        let (states, hasher) = (&self.states, &self.hasher);
        let slot = u32::try_from(at).expect("fewer than 2^32 products");
        self.slots.insert_unique(hash, slot, |&at| hasher.hash_one(&states[at as usize].id));
        at
    }

    pub fn get(&self, id: &ProductId) -> Option<&ProductState> {
        self.slot(self.hasher.hash_one(id), id).map(|at| &self.states[at])
    }

    pub fn contains(&self, id: &ProductId) -> bool {
        self.get(id).is_some()
    }

    /// How many products the log names.
    pub fn len(&self) -> usize {
        self.states.len()
    }

    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
    }

    /// The states in the order the projection first met their products (the snapshot's, then
    /// the tail's).
    pub fn states(&self) -> impl Iterator<Item = &ProductState> {
        self.states.iter()
    }

    /// The states in id order.
    pub fn into_sorted(self) -> Vec<ProductState> {
        drop(self.slots);
        let mut states = self.states;
        states.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        states
    }
}

/// Folds the embedded log's tail (the entries after the snapshot compaction left; dead-lettered
/// ones skipped, since the store never applied them, and a redriven one applies at the
/// sequence it came back as) onto the snapshot's states of the products it names, and no
/// others: the projection holds those, and the rest are read in id order from the snapshot
/// where they are needed ([`LogSnapshot::merged_with`]). With all of a snapshot's 1M states
/// held, `replay rebuild` peaked at 586-625 MB; holding those a tail of 529k entries names, at
/// 436-460 MB (BENCHMARKS.md, round eight). `progress` gets the entries read so far.
pub fn project_tail(
    log: &EmbeddedLog,
    limits: ParseLimits,
    mut progress: impl FnMut(u64),
) -> Result<(Projection, LogSnapshot), ReplayError> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let skipped: HashSet<u64> = log.skipped_sequences()?;
    let snapshot = log.snapshot();
    let from = snapshot.sequence() + 1;
    // Room for one product per entry of the tail, capped so that a long log asks for no more
    // address space than a machine may grant.
    let tail = usize::try_from(log.last_sequence().saturating_sub(from - 1)).unwrap_or(usize::MAX);
    let mut projection = Projection::with_room(tail.min(MAX_ROOM));
    // A log never compacted has nothing to look up (a first compaction cut short may have left
    // states, but the whole log is folded, so they add nothing): with the snapshot in sled, an
    // empty tree's lookup for each of 1M products made a rebuild's fold a fifth slower.
    let look_up = from > 1;
    projection.report.snapshot_sequence = from - 1;
    projection.report.last_sequence = from - 1;
    // A reader thread walks the log while the chunk before is parsed and folded.
    let (chunks_tx, chunks_rx) = std::sync::mpsc::sync_channel::<Result<Vec<LogEntry>, SourceError>>(2);
    let reader_log = log.clone();
    let reader = std::thread::spawn(move || {
        let mut entries = reader_log.entries_from(from);
        loop {
            let chunk: Result<Vec<LogEntry>, SourceError> = entries.by_ref().take(PARSE_CHUNK).collect();
            let done = chunk.as_ref().map_or(true, Vec::is_empty);
            if chunks_tx.send(chunk).is_err() || done {
                return;
            }
        }
    });
    for chunk in chunks_rx {
        let mut chunk = chunk?;
        if chunk.is_empty() {
            break;
        }
        let report = &mut projection.report;
        report.entries_read += chunk.len() as u64;
        report.last_sequence = chunk.last().map_or(report.last_sequence, |e| e.sequence);
        let before = chunk.len();
        chunk.retain(|e| !skipped.contains(&e.sequence));
        report.dead_lettered_skipped += (before - chunk.len()) as u64;
        // The parsers also look up the snapshot's state of each product the projection lacks:
        // on the folding thread, the lookups took a 529k-entry tail's fold from 1.5-1.8 s to
        // 1.8-2.4 s.
        let known = &projection;
        let parsed = map_in_parallel(&chunk, threads, |entry| {
            let event = CatalogEvent::parse(&entry.body, entry.accepted_at, limits).ok()?;
            let earlier =
                if look_up && !known.contains(&event.product_id) { snapshot.get(&event.product_id).transpose() } else { None };
            Some((event, earlier))
        });
        for (entry, parsed) in chunk.iter().zip(parsed) {
            let Some((event, earlier)) = parsed else {
                projection.report.invalid_skipped += 1;
                continue;
            };
            // An earlier entry of this chunk may have brought the product in already.
            if let Some(state) = earlier.transpose()?
                && !projection.contains(&state.id)
            {
                projection.insert(state);
            }
            projection.apply(&event, Some(entry.sequence));
        }
        progress(projection.report.entries_read);
    }
    reader.join().expect("log reader panicked");
    Ok((projection, snapshot))
}

/// `f` of every log entry of a chunk, on `threads` threads.
fn map_in_parallel<T: Send>(chunk: &[LogEntry], threads: usize, f: impl Fn(&LogEntry) -> T + Sync) -> Vec<T> {
    if threads < 2 || chunk.len() < 2 * 1024 {
        return chunk.iter().map(f).collect();
    }
    let per_thread = chunk.len().div_ceil(threads);
    let f = &f;
    std::thread::scope(|scope| {
        let workers: Vec<_> =
            chunk.chunks(per_thread).map(|part| scope.spawn(move || part.iter().map(f).collect::<Vec<T>>())).collect();
        workers.into_iter().flat_map(|w| w.join().expect("parser thread panicked")).collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn event(id: &str, quantity: u64) -> CatalogEvent {
        let body = serde_json::json!({"productId": id, "quantity": quantity});
        CatalogEvent::from_value(&body, SystemTime::UNIX_EPOCH).unwrap()
    }

    #[test]
    fn each_product_keeps_one_state_however_its_events_interleave() {
        let mut projection = Projection::with_room(2);
        let id = |i: u32| format!("P{:05}", (i * 7919) % 3000);
        // More products than the room made up front, each named many times.
        for round in 0..3u64 {
            for i in 0..3000 {
                projection.apply(&event(&id(i), round * 10_000 + u64::from(i)), None);
            }
        }
        assert_eq!(projection.len(), 3000);
        assert_eq!(projection.report.events_applied, 9000);
        let p = ProductId::parse(&id(5)).unwrap();
        assert_eq!(projection.get(&p).unwrap().quantity, Some(20_005));
        assert!(!projection.contains(&ProductId::parse("P99999").unwrap()));
        projection.insert(ProductState::new(p.clone()));
        assert_eq!((projection.len(), projection.get(&p).unwrap().quantity), (3000, None), "replaced, not added");
        let sorted = projection.into_sorted();
        assert!(sorted.windows(2).all(|w| w[0].id < w[1].id));
    }
}
