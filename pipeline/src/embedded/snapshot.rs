//! A bounded event log: entries past their retention are folded into a snapshot of every
//! product's state (under the store's own rule) and removed, so the log holds only a tail. The
//! replay tools then fold snapshot + tail instead of the whole history.
//!
//! Only entries below both the consumed watermark (nothing hands them out again) and the read
//! model's checkpoint (start-up catch-up never needs them) are compacted. The states are
//! written first, in id order, then the last sequence they hold, and only then do the entries
//! go. A crash among the states leaves some of them past the recorded sequence:
//! folding those entries again changes nothing, since the fold ignores an event a facet already
//! holds (by version, else by log position). A crash before the entries go leaves entries the
//! snapshot already holds, which the next run removes.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, SystemTime};

use catalog_domain::{CatalogEvent, ParseLimits, ProductId, ProductState};
use itertools::{EitherOrBoth, Itertools};

use super::{EmbeddedLog, LogEntry, be_u64, storage_error, trees};
use crate::ports::SourceError;

/// Where the snapshot's last folded sequence is kept, in the snapshot's own tree: no product id
/// can start with a NUL byte.
const SEQUENCE_KEY: &[u8] = b"\0sequence";
/// Entries folded per step: bounds the memory one step holds.
const CHUNK: usize = 10_000;

pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
pub const DEFAULT_RETENTION_BYTES: u64 = 1024 * 1024 * 1024;
pub const DEFAULT_COMPACT_INTERVAL: Duration = Duration::from_secs(60);

/// How much of the log to keep. An entry goes once it is older than `retention`, or while the
/// log is over `max_bytes`, whichever comes first; `None` turns that bound off.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub retention: Option<Duration>,
    pub max_bytes: Option<u64>,
}

impl Default for Retention {
    fn default() -> Self {
        Self { retention: Some(DEFAULT_RETENTION), max_bytes: Some(DEFAULT_RETENTION_BYTES) }
    }
}

/// What one compaction did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CompactReport {
    pub entries_folded: u64,
    pub entries_removed: u64,
    /// The last sequence the snapshot holds now.
    pub snapshot_sequence: u64,
}

/// The state every product had reached at the snapshot's sequence.
#[derive(Clone)]
pub struct LogSnapshot {
    tree: sled::Tree,
}

impl LogSnapshot {
    pub fn open(db: &sled::Db) -> Result<Self, SourceError> {
        Ok(Self { tree: db.open_tree(trees::SNAPSHOT).map_err(storage_error("open the snapshot"))? })
    }

    /// The last log sequence folded in (0: no snapshot yet, the log is whole).
    pub fn sequence(&self) -> Result<u64, SourceError> {
        let value = self.tree.get(SEQUENCE_KEY).map_err(storage_error("read the snapshot"))?;
        Ok(value.and_then(|v| be_u64(&v)).unwrap_or(0))
    }

    /// Every product's state in the snapshot, in id order.
    pub fn states(&self) -> impl Iterator<Item = Result<ProductState, SourceError>> + use<> {
        self.merged_with(std::iter::empty())
    }

    /// One product's state in the snapshot.
    pub fn get(&self, id: &ProductId) -> Result<Option<ProductState>, SourceError> {
        let value = self.tree.get(id.as_str()).map_err(storage_error("read the snapshot"))?;
        value.map(|v| decode(id.as_str(), &v)).transpose()
    }

    /// Every product's state in id order, each of `newer` (in id order, as sled orders keys:
    /// by bytes) in place of the snapshot's. The snapshot's states are decoded one at a time
    /// as they are reached, and not at all where `newer` replaces them.
    pub fn merged_with<I: IntoIterator<Item = ProductState>>(
        &self,
        newer: I,
    ) -> impl Iterator<Item = Result<ProductState, SourceError>> + use<I> {
        let older = self.tree.iter().filter(|item| item.as_ref().map_or(true, |(k, _)| k.as_ref() != SEQUENCE_KEY));
        // A read error sorts first, so it is reported where it happened.
        let by_id = |old: &sled::Result<(sled::IVec, sled::IVec)>, new: &ProductState| match old {
            Ok((k, _)) => k.as_ref().cmp(new.id.as_str().as_bytes()),
            Err(_) => Ordering::Less,
        };
        older.merge_join_by(newer, by_id).map(|pair| match pair {
            EitherOrBoth::Left(Ok((k, v))) => decode(&String::from_utf8_lossy(&k), &v),
            EitherOrBoth::Left(Err(e)) => Err(storage_error("read the snapshot")(e)),
            EitherOrBoth::Right(state) | EitherOrBoth::Both(_, state) => Ok(state),
        })
    }

    /// Folds `entries` (in log order, right after the snapshot's sequence) into the snapshot.
    fn fold(&self, entries: &[LogEntry], skipped: &HashSet<u64>, limits: ParseLimits) -> Result<(), SourceError> {
        let Some(last) = entries.last() else { return Ok(()) };
        // In id order, as they are written below: neighbours share leaves, so consecutive
        // inserts find theirs in the cache.
        let mut touched: BTreeMap<ProductId, ProductState> = BTreeMap::new();
        for entry in entries.iter().filter(|e| !skipped.contains(&e.sequence)) {
            // The store never applied an invalid entry (it was dead-lettered): neither does this.
            let Ok(event) = CatalogEvent::parse(&entry.body, entry.accepted_at, limits) else { continue };
            let id = event.product_id.clone();
            if !touched.contains_key(&id) {
                let state = self.get(&id)?.unwrap_or_else(|| ProductState::new(id.clone()));
                touched.insert(id.clone(), state);
            }
            touched.get_mut(&id).expect("inserted above").apply_at(&event, Some(entry.sequence));
        }
        // One insert at a time, never a `sled::Batch`: the first batch a process applies turns
        // on sled's process-wide lock for good, after which every batch stops every read and
        // fold of the read model for as long as it runs. Under a steady load a compaction
        // then put seconds between an event and its view. Nothing here needs a batch's
        // atomicity (see the module's comment on a crash among the states).
        for (id, state) in touched {
            self.tree.insert(id.as_str(), encode(&state)).map_err(storage_error("write the snapshot"))?;
        }
        self.tree.insert(SEQUENCE_KEY, &last.sequence.to_be_bytes()).map_err(storage_error("write the snapshot"))?;
        Ok(())
    }
}

/// Folds the entries past `retention` into the snapshot and removes them from the log, never
/// past `keep_from` (exclusive: the read model's checkpoint + 1) nor the consumed watermark.
/// Blocking: sled calls; run it off the runtime's threads.
pub fn compact(
    log: &EmbeddedLog,
    snapshot: &LogSnapshot,
    retention: Retention,
    keep_from: u64,
    limits: ParseLimits,
) -> Result<CompactReport, SourceError> {
    let mut report = CompactReport { snapshot_sequence: snapshot.sequence()?, ..CompactReport::default() };
    // A crash after the last fold left entries the snapshot holds: they go first.
    if log.first_sequence()?.is_some_and(|first| first <= report.snapshot_sequence) {
        report.entries_removed += log.remove_through(report.snapshot_sequence)?;
    }
    let limit = keep_from.min(log.consumed_watermark());
    let oldest_kept = retention.retention.and_then(|r| SystemTime::now().checked_sub(r));
    // Read only when there is something to fold: most runs find nothing past the retention.
    let mut skipped: Option<HashSet<u64>> = None;
    loop {
        let mut over_bytes = retention.max_bytes.map_or(0, |max| log.log_bytes().saturating_sub(max));
        let mut chunk = Vec::with_capacity(CHUNK);
        for entry in log.entries_from(report.snapshot_sequence + 1).take(CHUNK) {
            let entry = entry?;
            let expired = oldest_kept.is_some_and(|t| entry.accepted_at < t);
            if entry.sequence >= limit || !(expired || over_bytes > 0) {
                break;
            }
            over_bytes = over_bytes.saturating_sub(entry.stored_bytes);
            chunk.push(entry);
        }
        let Some(last) = chunk.last().map(|e| e.sequence) else { break };
        let skipped = match &mut skipped {
            Some(set) => set,
            none => none.insert(log.skipped_sequences()?),
        };
        snapshot.fold(&chunk, skipped, limits)?;
        report.entries_folded += chunk.len() as u64;
        report.snapshot_sequence = last;
        report.entries_removed += log.remove_through(last)?;
        if chunk.len() < CHUNK {
            break;
        }
    }
    Ok(report)
}

/// The compact form records use too; snapshots written as JSON before still read.
fn encode(state: &ProductState) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    state.encode_stored(&mut out);
    out
}

fn decode(id: &str, bytes: &[u8]) -> Result<ProductState, crate::StoreError> {
    ProductState::decode_stored(id, bytes).map_err(|e| crate::StoreError::corrupt(format!("snapshot state of product {id}"), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EventSource;
    use bytes::Bytes;

    fn open() -> (tempfile::TempDir, sled::Db, EmbeddedLog, LogSnapshot) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let log = EmbeddedLog::open(&db, &dir.path().join("event-log"), Default::default()).unwrap();
        let snapshot = LogSnapshot::open(&db).unwrap();
        (dir, db, log, snapshot)
    }

    async fn append_and_ack(log: &EmbeddedLog, bodies: &[&str]) {
        log.append(&bodies.iter().map(|b| Bytes::from(b.to_string())).collect::<Vec<_>>()).await.unwrap();
        let received = log.receive(bodies.len()).await.unwrap();
        log.ack(received.into_iter().map(|r| r.receipt).collect()).await.unwrap();
    }

    fn all_time() -> Retention {
        Retention { retention: Some(Duration::ZERO), max_bytes: None }
    }

    #[tokio::test]
    async fn expired_entries_fold_into_the_snapshot_and_leave_the_log() {
        let (_dir, _db, log, snapshot) = open();
        append_and_ack(
            &log,
            &[
                r#"{"productId":"P1","name":"Old","category":"C","status":"created","version":1}"#,
                r#"{"productId":"P1","name":"New","category":"C","status":"updated","version":2}"#,
                r#"{"productId":"P1","name":"Stale","category":"C","status":"updated","version":1}"#,
                "{not json",
                r#"{"productId":"P2","quantity":4}"#,
            ],
        )
        .await;
        let before = log.log_bytes();
        let report = compact(&log, &snapshot, all_time(), u64::MAX, ParseLimits::default()).unwrap();
        assert_eq!(report, CompactReport { entries_folded: 5, entries_removed: 5, snapshot_sequence: 5 });
        assert_eq!(log.entries_from(1).count(), 0);
        assert!(log.log_bytes() < before && log.log_bytes() == 0, "{} of {before}", log.log_bytes());
        let states: Vec<ProductState> = snapshot.states().map(Result::unwrap).collect();
        assert_eq!(states.len(), 2);
        assert_eq!(states[0].info.as_ref().map(|p| p.name.as_str()), Some("New"), "versions decide, as in the store");
        assert_eq!(states[1].quantity, Some(4));
        assert_eq!(compact(&log, &snapshot, all_time(), u64::MAX, ParseLimits::default()).unwrap().entries_folded, 0);
    }

    #[tokio::test]
    async fn newer_states_take_their_place_among_the_snapshot_s_in_id_order() {
        let (_dir, _db, log, snapshot) = open();
        append_and_ack(
            &log,
            &[r#"{"productId":"A","quantity":1}"#, r#"{"productId":"C","quantity":1}"#, r#"{"productId":"E","quantity":1}"#],
        )
        .await;
        compact(&log, &snapshot, all_time(), u64::MAX, ParseLimits::default()).unwrap();
        let state =
            |id: &str, quantity| ProductState { quantity: Some(quantity), ..ProductState::new(ProductId::parse(id).unwrap()) };
        let get = |id: &str| snapshot.get(&ProductId::parse(id).unwrap()).unwrap().map(|s| s.quantity);
        assert_eq!((get("C"), get("B")), (Some(Some(1)), None));
        // Before the first, between, in place of one, and after the last.
        let merged: Vec<(String, Option<u64>)> = snapshot
            .merged_with([state("0", 2), state("B", 2), state("C", 2), state("F", 2)])
            .map(|s| s.map(|s| (s.id.as_str().to_owned(), s.quantity)).unwrap())
            .collect();
        let expected = [("0", 2), ("A", 1), ("B", 2), ("C", 2), ("E", 1), ("F", 2)].map(|(id, q)| (id.to_owned(), Some(q)));
        assert_eq!(merged, expected);
        assert_eq!(snapshot.states().count(), 3, "the sequence key is no state");
    }

    #[tokio::test]
    async fn nothing_unacked_unviewed_or_within_retention_is_compacted() {
        let (_dir, _db, log, snapshot) = open();
        append_and_ack(&log, &[r#"{"productId":"P1","quantity":1}"#, r#"{"productId":"P1","quantity":2}"#]).await;
        log.append(&[Bytes::from_static(br#"{"productId":"P1","quantity":3}"#)]).await.unwrap();
        let week = Retention::default();
        assert_eq!(
            compact(&log, &snapshot, week, u64::MAX, ParseLimits::default()).unwrap().entries_folded,
            0,
            "young entries stay"
        );
        let report = compact(&log, &snapshot, all_time(), 2, ParseLimits::default()).unwrap();
        assert_eq!(report.snapshot_sequence, 1, "the read model has not shown sequence 2 yet");
        let report = compact(&log, &snapshot, all_time(), u64::MAX, ParseLimits::default()).unwrap();
        assert_eq!(report.snapshot_sequence, 2, "sequence 3 is not acknowledged");
        assert_eq!(log.entries_from(1).map(|e| e.unwrap().sequence).collect::<Vec<_>>(), [3]);
    }

    #[tokio::test]
    async fn a_byte_bound_removes_the_oldest_until_the_log_fits() {
        let (_dir, _db, log, snapshot) = open();
        let bodies: Vec<String> = (0..100).map(|i| format!(r#"{{"productId":"P{i}","quantity":{i}}}"#)).collect();
        append_and_ack(&log, &bodies.iter().map(String::as_str).collect::<Vec<_>>()).await;
        let max = log.log_bytes() / 4;
        let bound = Retention { retention: None, max_bytes: Some(max) };
        compact(&log, &snapshot, bound, u64::MAX, ParseLimits::default()).unwrap();
        assert!(log.log_bytes() <= max, "{} > {max}", log.log_bytes());
        assert!(log.entries_from(1).count() >= 20, "only what had to go went: {}", log.entries_from(1).count());
    }

    #[tokio::test]
    async fn a_crash_among_the_states_folds_the_same_snapshot_when_run_again() {
        // Versioned and unversioned events of a few hundred products.
        const WRITTEN_BEFORE_THE_CRASH: usize = 256;
        let bodies: Vec<String> = (0..WRITTEN_BEFORE_THE_CRASH * 2 + 7)
            .flat_map(|i| {
                [
                    format!(r#"{{"productId":"P{i:04}","name":"N{i}","category":"C","status":"created","version":2}}"#),
                    format!(r#"{{"productId":"P{i:04}","quantity":{i}}}"#),
                    format!(r#"{{"productId":"P{i:04}","quantity":{}}}"#, i + 1),
                ]
            })
            .collect();
        let bodies: Vec<&str> = bodies.iter().map(String::as_str).collect();
        let (_dir, _db, log, snapshot) = open();
        append_and_ack(&log, &bodies).await;
        let entries: Vec<LogEntry> = log.entries_from(1).map(Result::unwrap).collect();
        snapshot.fold(&entries, &HashSet::new(), ParseLimits::default()).unwrap();
        let clean: Vec<ProductState> = snapshot.states().map(Result::unwrap).collect();
        // What a crash among the states leaves: the first of them written (they go in id
        // order), the sequence not.
        let ahead: Vec<(sled::IVec, sled::IVec)> = snapshot
            .tree
            .iter()
            .map(Result::unwrap)
            .filter(|(k, _)| k.as_ref() != SEQUENCE_KEY)
            .take(WRITTEN_BEFORE_THE_CRASH)
            .collect();
        snapshot.tree.clear().unwrap();
        for (k, v) in ahead {
            snapshot.tree.insert(k, v).unwrap();
        }
        assert_eq!(snapshot.sequence().unwrap(), 0);
        let report = compact(&log, &snapshot, all_time(), u64::MAX, ParseLimits::default()).unwrap();
        assert_eq!(report.snapshot_sequence, bodies.len() as u64);
        let again: Vec<ProductState> = snapshot.states().map(Result::unwrap).collect();
        assert_eq!(again.len(), clean.len());
        assert!(again == clean, "the states folded twice differ from the states folded once");
    }

    #[tokio::test]
    async fn sequences_go_on_after_the_whole_log_was_compacted() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            let log = EmbeddedLog::open(&db, &dir.path().join("event-log"), Default::default()).unwrap();
            append_and_ack(&log, &[r#"{"productId":"P1","quantity":1}"#, r#"{"productId":"P1","quantity":2}"#]).await;
            compact(&log, &LogSnapshot::open(&db).unwrap(), all_time(), u64::MAX, ParseLimits::default()).unwrap();
            db.flush().unwrap();
        }
        let db = super::super::reopen(dir.path());
        let log = EmbeddedLog::open(&db, &dir.path().join("event-log"), Default::default()).unwrap();
        assert_eq!(log.append(&[Bytes::from_static(b"x")]).await.unwrap(), 3, "never 1 again: sequences order events");
    }
}
