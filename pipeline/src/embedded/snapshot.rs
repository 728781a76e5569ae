//! A bounded event log: every entry the read model shows is folded into a snapshot of every
//! product's state (under the store's own rule), and entries past their retention are removed,
//! so the log holds a bounded history. The replay tools and a start fold snapshot + the tail
//! after it, which is what one compaction interval appended, whatever the retention.
//!
//! Only entries below both the consumed watermark (nothing hands them out again) and the read
//! model's checkpoint (start-up catch-up never needs them) are folded, and only folded ones are
//! removed. The snapshot is a directory of sorted runs of states (`runs`) and a manifest naming
//! them with the last sequence they hold. Each fold writes the states it changed as a new run,
//! then a new manifest (written aside and renamed over the old one, so a crash leaves the one
//! or the other). A crash before the rename leaves a run no manifest names, which the next open
//! deletes.
//!
//! Runs are merged by size tiers ([`next_merge`]): [`MERGE_WIDTH`] runs of about one size
//! become one run of the next tier, and all runs become one once the newer ones add up to the
//! oldest. So a snapshot is a few runs per tier (tiers of 4× in size up to the products) and a
//! state is rewritten about log4(products / chunk) times, each time in one sequential pass.
//! The snapshot was a sled tree beside the log's cursor before: at 1M products a compaction's
//! random inserts into it cost the serving process about 100 MB and put its pauses in front
//! of the pipeline's acks (BENCHMARKS.md, "Write path, round nine"). A data dir's tree from
//! then is moved into a run when the log opens.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use catalog_domain::{CatalogEvent, ParseLimits, ProductId, ProductState};
use itertools::{EitherOrBoth, Itertools};

use super::pace::Pacer;
use super::runs::{Block, Merged, Run, RunWriter};
use super::{EmbeddedLog, LogEntry, be_u64, file_error, storage_error, trees};
use crate::ports::SourceError;

/// Where a sled snapshot kept its last folded sequence, in its own tree: no product id can
/// start with a NUL byte.
const SEQUENCE_KEY: &[u8] = b"\0sequence";
/// Entries folded per step: bounds the memory one step holds, and sizes the smallest run.
const CHUNK: usize = 10_000;
/// Runs of about one size merged at once (see the module's comment): a state is rewritten
/// about log4(products / chunk) times on its way to the oldest run, where merging pairs
/// rewrote it log2 times.
const MERGE_WIDTH: usize = 4;
/// Runs up to this many times the newest's size count as its size.
const TIER_SPREAD: u64 = 2;
const MANIFEST: &str = "MANIFEST";
const MANIFEST_ASIDE: &str = "MANIFEST.new";
const MANIFEST_HEADER: &str = "catalog log snapshot 1";
const RUN_SUFFIX: &str = ".run";

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

/// The state every product had reached at the snapshot's sequence. Clones share one view of
/// the files: a reader keeps the runs it started on, even once a merge has replaced them.
#[derive(Clone)]
pub struct LogSnapshot {
    inner: Arc<Shared>,
}

struct Shared {
    dir: PathBuf,
    current: Mutex<Arc<Version>>,
    /// The number the next run file is named by.
    next_file: AtomicU64,
    /// One fold at a time.
    folding: Mutex<()>,
}

/// What one manifest says.
struct Version {
    sequence: u64,
    /// Oldest first: a state in a later run replaces the same product's in an earlier one.
    runs: Vec<Arc<Run>>,
}

type States = Box<dyn Iterator<Item = io::Result<(Vec<u8>, Vec<u8>)>> + Send>;

impl LogSnapshot {
    /// Opens the snapshot kept in `dir`, creating it empty, and first moves in the states of a
    /// snapshot from before its files, kept in `legacy`'s tree. Only the log opens it
    /// (`EmbeddedLog::snapshot` hands out clones): a second opening would keep a view of the
    /// files of its own, which the log's compactions would leave behind.
    pub(crate) fn open(dir: &Path, legacy: &sled::Db) -> Result<Self, SourceError> {
        let opening = |e| file_error("embedded snapshot open", e);
        std::fs::create_dir_all(dir).map_err(opening)?;
        let manifest = read_manifest(dir).map_err(opening)?;
        let (sequence, names) = manifest.clone().unwrap_or_default();
        let mut highest = 0;
        for item in std::fs::read_dir(dir).map_err(opening)? {
            let name = item.map_err(opening)?.file_name().to_string_lossy().into_owned();
            if let Some(n) = name.strip_suffix(RUN_SUFFIX).and_then(|n| n.parse::<u64>().ok()) {
                highest = highest.max(n);
            }
            // A run written, or merged, before a crash kept its manifest from being renamed in.
            if name != MANIFEST && !names.contains(&name) {
                std::fs::remove_file(dir.join(&name)).map_err(opening)?;
            }
        }
        let runs = names.iter().map(|name| Run::open(&dir.join(name)).map(Arc::new)).collect::<io::Result<Vec<_>>>();
        let snapshot = Self {
            inner: Arc::new(Shared {
                dir: dir.to_owned(),
                current: Mutex::new(Arc::new(Version { sequence, runs: runs.map_err(opening)? })),
                next_file: AtomicU64::new(highest + 1),
                folding: Mutex::new(()),
            }),
        };
        snapshot.adopt(legacy, manifest.is_some())?;
        Ok(snapshot)
    }

    /// The last log sequence folded in (0: no snapshot yet, the log is whole).
    pub fn sequence(&self) -> u64 {
        self.current().sequence
    }

    /// How many files the snapshot is made of now.
    #[cfg(test)]
    fn runs(&self) -> usize {
        self.current().runs.len()
    }

    /// Every product's state in the snapshot, in id order.
    pub fn states(&self) -> impl Iterator<Item = Result<ProductState, SourceError>> + Send + use<> {
        self.merged_with(std::iter::empty())
    }

    /// One product's state in the snapshot.
    pub fn get(&self, id: &ProductId) -> Result<Option<ProductState>, SourceError> {
        let version = self.current();
        lookup(&version, id, &mut blocks(&version))
    }

    /// Every product's state in id order, each of `newer` (in id order, by the ids' bytes) in
    /// place of the snapshot's. The snapshot's states are decoded one at a time as they are
    /// reached, and not at all where `newer` replaces them.
    pub fn merged_with<I>(&self, newer: I) -> impl Iterator<Item = Result<ProductState, SourceError>> + Send + use<I>
    where
        I: IntoIterator<Item = ProductState>,
        I::IntoIter: Send,
    {
        let older: States = match Merged::new(&self.current().runs) {
            Ok(merged) => Box::new(merged),
            Err(e) => Box::new(std::iter::once(Err(e))),
        };
        // A read error sorts first, so it is reported where it happened.
        let by_id = |old: &io::Result<(Vec<u8>, Vec<u8>)>, new: &ProductState| match old {
            Ok((k, _)) => k.as_slice().cmp(new.id.as_str().as_bytes()),
            Err(_) => Ordering::Less,
        };
        older.merge_join_by(newer, by_id).map(|pair| match pair {
            EitherOrBoth::Left(Ok((k, v))) => decode(&String::from_utf8_lossy(&k), &v),
            EitherOrBoth::Left(Err(e)) => Err(file_error("embedded snapshot read", e)),
            EitherOrBoth::Right(state) | EitherOrBoth::Both(_, state) => Ok(state),
        })
    }

    /// Folds `entries` (in log order, right after the snapshot's sequence) into the snapshot.
    fn fold(
        &self,
        entries: &[LogEntry],
        skipped: &HashSet<u64>,
        limits: ParseLimits,
        pace: &mut Pacer<'_>,
    ) -> Result<(), SourceError> {
        let Some(last) = entries.last() else { return Ok(()) };
        let _one = lock(&self.inner.folding);
        let mut events = Vec::with_capacity(entries.len());
        for entry in entries.iter().filter(|e| !skipped.contains(&e.sequence)) {
            pace.step();
            // The store never applied an invalid entry (it was dead-lettered): neither does this.
            if let Ok(event) = CatalogEvent::parse(&entry.body, entry.accepted_at, limits) {
                events.push((event, entry.sequence));
            }
        }
        // The states these events change are looked up in id order, so the lookups of ids
        // that share a block of a run read it once (in a load that walks the ids in order,
        // one read of each block instead of sixteen), and the run is written in that order.
        let version = self.current();
        let ids: BTreeSet<&ProductId> = events.iter().map(|(event, _)| &event.product_id).collect();
        let mut blocks = blocks(&version);
        let mut touched = BTreeMap::new();
        for id in ids {
            pace.step();
            let state = lookup(&version, id, &mut blocks)?.unwrap_or_else(|| ProductState::new(id.clone()));
            touched.insert(id.clone(), state);
        }
        for (event, sequence) in &events {
            touched.get_mut(&event.product_id).expect("looked up above").apply_at(event, Some(*sequence));
        }
        let writing = |e| file_error("embedded snapshot write", e);
        let mut runs = version.runs.clone();
        if !touched.is_empty() {
            let mut out = RunWriter::create(&self.next_path()).map_err(writing)?;
            let mut value = Vec::with_capacity(256);
            for (id, state) in &touched {
                pace.step();
                value.clear();
                state.encode_stored(&mut value);
                out.push(id.as_str().as_bytes(), &value).map_err(writing)?;
            }
            runs.push(Arc::new(out.finish().map_err(writing)?));
        }
        self.install(Version { sequence: last.sequence, runs }, &[]).map_err(writing)?;
        self.merge_small_runs(pace).map_err(writing)
    }

    /// Merges runs while [`next_merge`] names some.
    fn merge_small_runs(&self, pace: &mut Pacer<'_>) -> io::Result<()> {
        loop {
            let now = self.current();
            let sizes: Vec<u64> = now.runs.iter().map(|run| run.bytes()).collect();
            let Some(from) = next_merge(&sizes) else { return Ok(()) };
            let merged = super::runs::merge(&now.runs[from..], &self.next_path(), pace)?;
            let mut runs = now.runs[..from].to_vec();
            runs.push(Arc::new(merged));
            self.install(Version { sequence: now.sequence, runs }, &now.runs[from..])?;
        }
    }

    /// Makes `version` the snapshot: its manifest on disk, then in memory, then the files it
    /// no longer names (`retired`) deleted. Readers that began before keep theirs open.
    fn install(&self, version: Version, retired: &[Arc<Run>]) -> io::Result<()> {
        let dir = &self.inner.dir;
        let mut text = format!("{MANIFEST_HEADER}\nsequence {}\n", version.sequence);
        for run in &version.runs {
            let name = run.path().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            text.push_str(&format!("run {name}\n"));
        }
        text.push_str(&format!("crc {}\n", crc32fast::hash(text.as_bytes())));
        let aside = dir.join(MANIFEST_ASIDE);
        {
            let file = std::fs::File::create(&aside)?;
            std::io::Write::write_all(&mut &file, text.as_bytes())?;
            file.sync_data()?;
        }
        std::fs::rename(&aside, dir.join(MANIFEST))?;
        // The rename, and the names of the runs it lists, survive a crash from here on.
        std::fs::File::open(dir)?.sync_all()?;
        *lock(&self.inner.current) = Arc::new(version);
        for run in retired {
            if let Err(e) = std::fs::remove_file(run.path()) {
                // The next open deletes what no manifest names.
                tracing::warn!(file = %run.path().display(), error = %e, "could not delete a merged snapshot file");
            }
        }
        Ok(())
    }

    /// Moves a snapshot kept in `db`'s tree (before the snapshot had files) into one run, then
    /// drops the tree. A crash before the manifest is renamed in moves it again; one after
    /// leaves only the tree to drop.
    fn adopt(&self, db: &sled::Db, has_manifest: bool) -> Result<(), SourceError> {
        if !db.tree_names().iter().any(|name| name.as_ref() == trees::SNAPSHOT.as_bytes()) {
            return Ok(());
        }
        let moving = storage_error("move the snapshot into its files");
        let writing = |e| file_error("embedded snapshot write", e);
        if !has_manifest {
            let tree = db.open_tree(trees::SNAPSHOT).map_err(&moving)?;
            let sequence = tree.get(SEQUENCE_KEY).map_err(&moving)?.and_then(|v| be_u64(&v)).unwrap_or(0);
            let mut out = RunWriter::create(&self.next_path()).map_err(writing)?;
            // As stored: a state written as JSON by an older build still reads from the run.
            for item in tree.iter() {
                let (key, value) = item.map_err(&moving)?;
                if key.as_ref() != SEQUENCE_KEY {
                    out.push(&key, &value).map_err(writing)?;
                }
            }
            let run = out.finish().map_err(writing)?;
            let states = run.records();
            self.install(Version { sequence, runs: vec![Arc::new(run)] }, &[]).map_err(writing)?;
            tracing::info!(states, sequence, "the log's snapshot moved from sled into its own files");
        }
        db.drop_tree(trees::SNAPSHOT).map_err(&moving)?;
        db.flush().map_err(&moving)?;
        Ok(())
    }

    fn current(&self) -> Arc<Version> {
        lock(&self.inner.current).clone()
    }

    fn next_path(&self) -> PathBuf {
        let n = self.inner.next_file.fetch_add(1, AtomicOrdering::Relaxed);
        self.inner.dir.join(format!("{n:020}{RUN_SUFFIX}"))
    }
}

/// The manifest's sequence and runs, or `None` if there is none yet.
fn read_manifest(dir: &Path) -> io::Result<Option<(u64, Vec<String>)>> {
    let path = dir.join(MANIFEST);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let damaged =
        |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("snapshot manifest {}: {what}", path.display()));
    let body_end = text.trim_end_matches('\n').rfind('\n').map_or(0, |i| i + 1);
    let (body, crc_line) = text.split_at(body_end);
    let stated = crc_line.trim().strip_prefix("crc ").and_then(|c| c.parse::<u32>().ok());
    if stated != Some(crc32fast::hash(body.as_bytes())) {
        return Err(damaged("its checksum does not match"));
    }
    let mut lines = body.lines();
    if lines.next() != Some(MANIFEST_HEADER) {
        return Err(damaged("not a manifest this build reads"));
    }
    let sequence = lines
        .next()
        .and_then(|l| l.strip_prefix("sequence "))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| damaged("no sequence"))?;
    let runs: io::Result<Vec<String>> =
        lines.map(|l| l.strip_prefix("run ").map(str::to_owned).ok_or_else(|| damaged("a line that is no run"))).collect();
    Ok(Some((sequence, runs?)))
}

/// Which runs to merge into one, given their sizes oldest first: those from the index
/// returned on, or none. As RocksDB's universal compaction: all of them once the newer runs
/// add up to the oldest (so a state is held at most about twice over, and the oldest run is
/// rewritten once per its size of newer states), else the newest [`MERGE_WIDTH`] or more once
/// that many are each within [`TIER_SPREAD`] of the newest's size.
fn next_merge(bytes: &[u64]) -> Option<usize> {
    let (oldest, newer) = bytes.split_first()?;
    if newer.is_empty() {
        return None;
    }
    if newer.iter().sum::<u64>() >= *oldest {
        return Some(0);
    }
    let newest = bytes[bytes.len() - 1];
    let tier = bytes.iter().rev().take_while(|&&b| b <= TIER_SPREAD * newest).count();
    (tier >= MERGE_WIDTH).then(|| bytes.len() - tier)
}

/// One product's state in `version`: from the newest run that holds it, each run read
/// through its own one of `blocks`.
fn lookup(version: &Version, id: &ProductId, blocks: &mut [Block]) -> Result<Option<ProductState>, SourceError> {
    for (run, block) in version.runs.iter().zip(blocks).rev() {
        let value = run.get_in(id.as_str().as_bytes(), block).map_err(|e| file_error("embedded snapshot read", e))?;
        if let Some(value) = value {
            return decode(id.as_str(), &value).map(Some);
        }
    }
    Ok(None)
}

/// An empty block cache for each of `version`'s runs, for [`lookup`].
fn blocks(version: &Version) -> Vec<Block> {
    std::iter::repeat_with(Block::default).take(version.runs.len()).collect()
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Folds every entry the read model shows into the snapshot, never past `keep_from`
/// (exclusive: the read model's checkpoint + 1) nor the consumed watermark, then removes the
/// entries the snapshot holds that are past `retention`. Blocking: file and sled calls; run it
/// off the runtime's threads. It never gives way to the pipeline: for the tools, and a log
/// nothing else uses ([`compact_beside`] serves one).
pub fn compact(
    log: &EmbeddedLog,
    retention: Retention,
    keep_from: u64,
    limits: ParseLimits,
) -> Result<CompactReport, SourceError> {
    compact_beside(log, retention, keep_from, limits, 0).map(|(report, _)| report)
}

/// [`compact`] beside a running pipeline: while more than `yield_backlog` accepted entries
/// wait to be processed, it sleeps a little after every few milliseconds of work, so the
/// pipeline catches up first (`pace`); 0 never gives way. The report says how long it slept.
pub fn compact_beside(
    log: &EmbeddedLog,
    retention: Retention,
    keep_from: u64,
    limits: ParseLimits,
    yield_backlog: u64,
) -> Result<(CompactReport, Duration), SourceError> {
    let behind = || log.backlog() > yield_backlog;
    let pace = &mut if yield_backlog == 0 { Pacer::never() } else { Pacer::when(&behind) };
    let snapshot = &log.snapshot();
    let mut report = CompactReport { snapshot_sequence: snapshot.sequence(), ..CompactReport::default() };
    let limit = keep_from.min(log.consumed_watermark());
    // Read only when there is something to fold: an idle log has nothing past the snapshot.
    let mut skipped: Option<HashSet<u64>> = None;
    while report.snapshot_sequence + 1 < limit {
        let mut chunk = Vec::with_capacity(CHUNK);
        for entry in log.entries_from(report.snapshot_sequence + 1).take(CHUNK) {
            let entry = entry?;
            if entry.sequence >= limit {
                break;
            }
            chunk.push(entry);
        }
        let Some(last) = chunk.last().map(|e| e.sequence) else { break };
        let skipped = match &mut skipped {
            Some(set) => set,
            none => none.insert(log.skipped_sequences()?),
        };
        snapshot.fold(&chunk, skipped, limits, pace)?;
        report.entries_folded += chunk.len() as u64;
        report.snapshot_sequence = last;
        if chunk.len() < CHUNK {
            break;
        }
    }
    report.entries_removed = remove_past(log, retention, report.snapshot_sequence)?;
    Ok((report, pace.paused()))
}

/// Removes the oldest entries, through `through` at most, while they are older than the
/// retention or the log is over its bytes.
fn remove_past(log: &EmbeddedLog, retention: Retention, through: u64) -> Result<u64, SourceError> {
    let oldest_kept = retention.retention.and_then(|r| SystemTime::now().checked_sub(r));
    let mut over_bytes = retention.max_bytes.map_or(0, |max| log.log_bytes().saturating_sub(max));
    let mut last = None;
    for entry in log.entries_from(1) {
        let entry = entry?;
        let expired = oldest_kept.is_some_and(|t| entry.accepted_at < t);
        if entry.sequence > through || !(expired || over_bytes > 0) {
            break;
        }
        over_bytes = over_bytes.saturating_sub(entry.stored_bytes);
        last = Some(entry.sequence);
    }
    last.map_or(Ok(0), |last| log.remove_through(last))
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
        let snapshot = log.snapshot();
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
        let report = compact(&log, all_time(), u64::MAX, ParseLimits::default()).unwrap();
        assert_eq!(report, CompactReport { entries_folded: 5, entries_removed: 5, snapshot_sequence: 5 });
        assert_eq!(log.entries_from(1).count(), 0);
        assert!(log.log_bytes() < before && log.log_bytes() == 0, "{} of {before}", log.log_bytes());
        let states: Vec<ProductState> = snapshot.states().map(Result::unwrap).collect();
        assert_eq!(states.len(), 2);
        assert_eq!(states[0].info.as_ref().map(|p| p.name.as_str()), Some("New"), "versions decide, as in the store");
        assert_eq!(states[1].quantity, Some(4));
        assert_eq!(compact(&log, all_time(), u64::MAX, ParseLimits::default()).unwrap().entries_folded, 0);
    }

    #[tokio::test]
    async fn newer_states_take_their_place_among_the_snapshot_s_in_id_order() {
        let (_dir, _db, log, snapshot) = open();
        append_and_ack(
            &log,
            &[r#"{"productId":"A","quantity":1}"#, r#"{"productId":"C","quantity":1}"#, r#"{"productId":"E","quantity":1}"#],
        )
        .await;
        compact(&log, all_time(), u64::MAX, ParseLimits::default()).unwrap();
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
    }

    #[tokio::test]
    async fn a_compaction_beside_a_lagging_pipeline_gives_way_and_folds_the_same() {
        // 40,000 entries processed and 5,000 waiting: a pipeline behind by more than the bound.
        let bodies: Vec<String> =
            (0..45_000).map(|i| format!(r#"{{"productId":"P{:05}","quantity":{i}}}"#, i % 20_000)).collect();
        let (processed, waiting) = bodies.split_at(40_000);
        let lagging = || async {
            let (dir, db, log, snapshot) = open();
            for chunk in processed.chunks(5_000) {
                append_and_ack(&log, &chunk.iter().map(String::as_str).collect::<Vec<_>>()).await;
            }
            log.append(&waiting.iter().map(|b| Bytes::from(b.clone())).collect::<Vec<_>>()).await.unwrap();
            assert_eq!(log.backlog(), 5_000, "the entries waiting");
            (dir, db, log, snapshot)
        };
        let states = |snapshot: &LogSnapshot| snapshot.states().map(|s| s.unwrap().quantity).collect::<Vec<_>>();

        let (_dir, _db, log, snapshot) = lagging().await;
        let (report, gave_way) = compact_beside(&log, all_time(), u64::MAX, ParseLimits::default(), 1_000).unwrap();
        assert!(gave_way > Duration::ZERO, "a backlog of 5,000 is over the bound of 1,000");
        assert_eq!((report.entries_folded, report.snapshot_sequence), (40_000, 40_000), "it gives way, it does not stop");
        let behind_the_lag = states(&snapshot);

        let (_dir, _db, log, snapshot) = lagging().await;
        let (again, gave_way) = compact_beside(&log, all_time(), u64::MAX, ParseLimits::default(), 10_000).unwrap();
        assert_eq!(gave_way, Duration::ZERO, "a backlog under the bound");
        assert_eq!(again, report);
        assert_eq!(states(&snapshot), behind_the_lag);
        assert_eq!(behind_the_lag.len(), 20_000);
        assert_eq!(behind_the_lag[0], Some(20_000), "P00000's last processed quantity");
    }

    #[tokio::test]
    async fn the_snapshot_takes_what_the_read_model_shows_and_the_log_keeps_what_the_retention_does() {
        let (_dir, _db, log, _) = open();
        append_and_ack(&log, &[r#"{"productId":"P1","quantity":1}"#, r#"{"productId":"P1","quantity":2}"#]).await;
        log.append(&[Bytes::from_static(br#"{"productId":"P1","quantity":3}"#)]).await.unwrap();
        let week = Retention::default();
        let report = compact(&log, week, 2, ParseLimits::default()).unwrap();
        assert_eq!(report.snapshot_sequence, 1, "the read model has not shown sequence 2 yet");
        let report = compact(&log, week, u64::MAX, ParseLimits::default()).unwrap();
        assert_eq!(report, CompactReport { entries_folded: 1, entries_removed: 0, snapshot_sequence: 2 }, "3 is unacked");
        let sequences = |log: &EmbeddedLog| log.entries_from(1).map(|e| e.unwrap().sequence).collect::<Vec<_>>();
        assert_eq!(sequences(&log), [1, 2, 3], "young entries stay, folded or not");
        let report = compact(&log, all_time(), u64::MAX, ParseLimits::default()).unwrap();
        assert_eq!(report, CompactReport { entries_folded: 0, entries_removed: 2, snapshot_sequence: 2 });
        assert_eq!(sequences(&log), [3], "what is not folded stays, however old");
    }

    #[tokio::test]
    async fn history_the_snapshot_holds_is_still_there_after_a_restart_and_removed_entries_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let bodies: Vec<String> = (0..4).map(|i| format!(r#"{{"productId":"P{i}","quantity":{i}}}"#)).collect();
        let sequences = |log: &EmbeddedLog| log.entries_from(1).map(|e| e.unwrap().sequence).collect::<Vec<_>>();
        {
            let db = sled::open(dir.path()).unwrap();
            let log = EmbeddedLog::open(&db, &dir.path().join("event-log"), Default::default()).unwrap();
            append_and_ack(&log, &bodies.iter().map(String::as_str).collect::<Vec<_>>()).await;
            assert_eq!(compact(&log, Retention::default(), u64::MAX, ParseLimits::default()).unwrap().snapshot_sequence, 4);
            db.flush().unwrap();
        }
        let db = super::super::reopen(dir.path());
        let log = EmbeddedLog::open(&db, &dir.path().join("event-log"), Default::default()).unwrap();
        assert_eq!((log.snapshot().sequence(), sequences(&log)), (4, vec![1, 2, 3, 4]));
        let one = Retention { retention: None, max_bytes: Some(log.log_bytes() / 4) };
        assert_eq!(compact(&log, one, u64::MAX, ParseLimits::default()).unwrap().entries_removed, 3);
        drop((log, db));
        let db = super::super::reopen(dir.path());
        let log = EmbeddedLog::open(&db, &dir.path().join("event-log"), Default::default()).unwrap();
        assert_eq!(sequences(&log), [4]);
        assert_eq!(log.append(&[Bytes::from_static(b"x")]).await.unwrap(), 5);
    }

    #[tokio::test]
    async fn a_byte_bound_removes_the_oldest_until_the_log_fits() {
        let (_dir, _db, log, _) = open();
        let bodies: Vec<String> = (0..100).map(|i| format!(r#"{{"productId":"P{i}","quantity":{i}}}"#)).collect();
        append_and_ack(&log, &bodies.iter().map(String::as_str).collect::<Vec<_>>()).await;
        let max = log.log_bytes() / 4;
        let bound = Retention { retention: None, max_bytes: Some(max) };
        compact(&log, bound, u64::MAX, ParseLimits::default()).unwrap();
        assert!(log.log_bytes() <= max, "{} > {max}", log.log_bytes());
        assert!(log.entries_from(1).count() >= 20, "only what had to go went: {}", log.entries_from(1).count());
    }

    /// Bodies of versioned and unversioned events of `products` products, three each.
    fn mixed(products: usize) -> Vec<String> {
        (0..products)
            .flat_map(|i| {
                [
                    format!(r#"{{"productId":"P{i:04}","name":"N{i}","category":"C","status":"created","version":2}}"#),
                    format!(r#"{{"productId":"P{i:04}","quantity":{i}}}"#),
                    format!(r#"{{"productId":"P{i:04}","quantity":{}}}"#, i + 1),
                ]
            })
            .collect()
    }

    fn states(snapshot: &LogSnapshot) -> Vec<ProductState> {
        snapshot.states().map(Result::unwrap).collect()
    }

    #[tokio::test]
    async fn many_small_folds_keep_few_files_and_fold_to_what_one_fold_does() {
        let bodies = mixed(700);
        let bodies: Vec<&str> = bodies.iter().map(String::as_str).collect();
        let (_dir, _db, log, snapshot) = open();
        let (_one_dir, _one_db, one_log, one) = open();
        append_and_ack(&log, &bodies).await;
        append_and_ack(&one_log, &bodies).await;
        let entries: Vec<LogEntry> = log.entries_from(1).map(Result::unwrap).collect();
        one.fold(&entries, &HashSet::new(), ParseLimits::default(), &mut Pacer::never()).unwrap();
        // Steps of unequal size, so runs of many sizes meet in the merges.
        let mut at = 0;
        for step in (1..).map(|i| 1 + (i * 37) % 97) {
            let end = (at + step).min(entries.len());
            snapshot.fold(&entries[at..end], &HashSet::new(), ParseLimits::default(), &mut Pacer::never()).unwrap();
            assert!(snapshot.runs() <= 12, "{} files after {end} entries", snapshot.runs());
            at = end;
            if at == entries.len() {
                break;
            }
        }
        assert_eq!(snapshot.sequence(), entries.len() as u64);
        let folded = states(&one);
        assert_eq!(folded.len(), 700);
        assert!(states(&snapshot) == folded, "folded in steps, the states differ from one fold's");
        for state in &folded[..50] {
            assert_eq!(snapshot.get(&state.id).unwrap().as_ref(), Some(state));
        }
        let files = std::fs::read_dir(&snapshot.inner.dir).unwrap().count();
        assert_eq!(files, snapshot.runs() + 1, "the runs and the manifest, no merged file left behind");
    }

    /// Folds of `chunk` states each into a snapshot of `products` products walked in order (as
    /// a steady load of updates does), merged as [`next_merge`] says: the most runs there ever
    /// were, and how many times over the folds' states were written.
    fn simulate(products: u64, chunk: u64, folds: u64) -> (usize, f64) {
        // A run as the range of products it holds, in chunks: size = the products it spans.
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let (mut most, mut written) = (0, 0u64);
        for f in 0..folds {
            let start = (f * chunk) % products;
            runs.push((start, start + chunk));
            written += chunk;
            while let Some(from) = next_merge(&runs.iter().map(|(a, b)| b - a).collect::<Vec<_>>()) {
                let (lo, hi) = runs[from..].iter().fold((u64::MAX, 0), |(lo, hi), (a, b)| (lo.min(*a), hi.max(*b)));
                let merged = (lo, lo + (hi - lo).min(products));
                written += merged.1 - merged.0;
                runs.truncate(from);
                runs.push(merged);
            }
            most = most.max(runs.len());
        }
        (most, written as f64 / (folds * chunk) as f64)
    }

    #[test]
    fn merges_keep_few_runs_and_write_each_state_a_few_times() {
        // 1M products in folds of 10,000, as a compaction under a steady load at scale.
        let (most, amplification) = simulate(1_000_000, 10_000, 1_000);
        assert!(most <= 14, "{most} runs at most");
        assert!(amplification < 6.0, "each state written {amplification:.1} times");
        // Folds of one state, and one big run with small ones after it.
        assert!(simulate(1_000, 1, 5_000).0 <= 20);
        assert_eq!(next_merge(&[100, 1, 1, 1]), None, "three small runs wait for a fourth");
        assert_eq!(next_merge(&[100, 1, 1, 1, 1]), Some(1));
        assert_eq!(next_merge(&[100, 40, 30, 30]), Some(0), "the newer runs add up to the oldest");
        assert_eq!(next_merge(&[100, 8, 2, 1, 1, 1]), Some(2), "a tier: the runs within twice the newest");
        assert_eq!(next_merge(&[7]), None);
        assert_eq!(next_merge(&[]), None);
    }

    #[tokio::test]
    async fn a_crash_before_the_manifest_leaves_the_snapshot_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let log_dir = dir.path().join("event-log");
        let before = {
            let db = sled::open(dir.path()).unwrap();
            let log = EmbeddedLog::open(&db, &log_dir, Default::default()).unwrap();
            let bodies = mixed(30);
            append_and_ack(&log, &bodies.iter().map(String::as_str).collect::<Vec<_>>()).await;
            compact(&log, all_time(), u64::MAX, ParseLimits::default()).unwrap();
            db.flush().unwrap();
            states(&log.snapshot())
        };
        // What a crash mid-fold leaves: a run no manifest names, and a manifest not renamed in.
        let snapshot_dir = log_dir.join("snapshot");
        std::fs::write(snapshot_dir.join("00000000000000000099.run"), b"CATRUN01 half a run").unwrap();
        std::fs::write(snapshot_dir.join(MANIFEST_ASIDE), b"catalog log snapshot 1\nsequence 9999\n").unwrap();
        let db = super::super::reopen(dir.path());
        let log = EmbeddedLog::open(&db, &log_dir, Default::default()).unwrap();
        let snapshot = log.snapshot();
        assert_eq!((snapshot.sequence(), states(&snapshot)), (90, before));
        let names: Vec<String> =
            std::fs::read_dir(&snapshot_dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert!(!names.iter().any(|n| n.contains("99.run") || n == MANIFEST_ASIDE), "{names:?}");
        // The next run is named past the leftover's number, which a later crash may leave again.
        append_and_ack(&log, &[r#"{"productId":"P0000","quantity":77}"#]).await;
        compact(&log, all_time(), u64::MAX, ParseLimits::default()).unwrap();
        assert_eq!(snapshot.get(&ProductId::parse("P0000").unwrap()).unwrap().unwrap().quantity, Some(77));
    }

    /// An error and its sources, as `serve` prints them.
    fn chain(e: &dyn std::error::Error) -> String {
        std::iter::successors(Some(e), |e| e.source()).map(ToString::to_string).collect::<Vec<_>>().join(": ")
    }

    #[tokio::test]
    async fn a_damaged_file_or_manifest_fails_the_open_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let log_dir = dir.path().join("event-log");
        {
            let db = sled::open(dir.path()).unwrap();
            let log = EmbeddedLog::open(&db, &log_dir, Default::default()).unwrap();
            append_and_ack(&log, &[r#"{"productId":"P1","quantity":1}"#]).await;
            compact(&log, all_time(), u64::MAX, ParseLimits::default()).unwrap();
            db.flush().unwrap();
        }
        let manifest = log_dir.join("snapshot").join(MANIFEST);
        let text = std::fs::read_to_string(&manifest).unwrap();
        std::fs::write(&manifest, text.replace("sequence 1", "sequence 2")).unwrap();
        let db = super::super::reopen(dir.path());
        let err = chain(&EmbeddedLog::open(&db, &log_dir, Default::default()).err().expect("a damaged manifest"));
        assert!(err.contains("MANIFEST") && err.contains("checksum"), "{err}");
        std::fs::write(&manifest, &text).unwrap();
        let run = text.lines().find_map(|l| l.strip_prefix("run ")).unwrap();
        std::fs::write(log_dir.join("snapshot").join(run), b"CATRUN01\x01").unwrap();
        let err = chain(&EmbeddedLog::open(&db, &log_dir, Default::default()).err().expect("a damaged run"));
        assert!(err.contains(run) && err.contains("cut short"), "{err}");
    }

    #[tokio::test]
    async fn a_snapshot_kept_in_sled_moves_into_its_files() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let tree = db.open_tree(trees::SNAPSHOT).unwrap();
        let mut state = ProductState::new(ProductId::parse("P1").unwrap());
        state.quantity = Some(5);
        let mut value = Vec::new();
        state.encode_stored(&mut value);
        tree.insert("P1", value).unwrap();
        // An older build wrote its states as JSON.
        tree.insert("P2", serde_json::to_vec(&ProductState::new(ProductId::parse("P2").unwrap())).unwrap()).unwrap();
        tree.insert(SEQUENCE_KEY, &7u64.to_be_bytes()).unwrap();
        let log = EmbeddedLog::open(&db, &dir.path().join("event-log"), Default::default()).unwrap();
        let snapshot = log.snapshot();
        let moved = states(&snapshot);
        assert_eq!((snapshot.sequence(), moved.len(), moved[0].quantity), (7, 2, Some(5)));
        assert!(!db.tree_names().iter().any(|n| n.as_ref() == trees::SNAPSHOT.as_bytes()), "the tree is gone");
        assert_eq!(log.append(&[Bytes::from_static(b"x")]).await.unwrap(), 8, "the log goes on after the snapshot");
    }

    #[tokio::test]
    async fn sequences_go_on_after_the_whole_log_was_compacted() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            let log = EmbeddedLog::open(&db, &dir.path().join("event-log"), Default::default()).unwrap();
            append_and_ack(&log, &[r#"{"productId":"P1","quantity":1}"#, r#"{"productId":"P1","quantity":2}"#]).await;
            compact(&log, all_time(), u64::MAX, ParseLimits::default()).unwrap();
            db.flush().unwrap();
        }
        let db = super::super::reopen(dir.path());
        let log = EmbeddedLog::open(&db, &dir.path().join("event-log"), Default::default()).unwrap();
        assert_eq!(log.append(&[Bytes::from_static(b"x")]).await.unwrap(), 3, "never 1 again: sequences order events");
    }
}
