//! The embedded event source: a durable, ordered inbox that is also the event log. Entries
//! live in segment files (`segments`); the DLQ, the watermark and the cursor's state in sled.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use catalog_domain::event::{millis_since_epoch, time_from_millis};
use opentelemetry::trace::SpanContext;
use tokio::sync::Notify;

use super::segments::{DEFAULT_SEGMENT_BYTES, SegmentLog};
use super::{be_u64, storage_error, trees};
use crate::ports::{DeadLetter, EventSource, Received, SourceError};

pub const DEFAULT_VISIBILITY_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_RECEIVE_COUNT: u32 = 3;
pub const DEFAULT_WAIT_TIME: Duration = Duration::from_millis(500);
pub const DEFAULT_RELEASE_DELAY: Duration = Duration::from_millis(200);

const WATERMARK_KEY: &[u8] = b"consumed_watermark";
/// The first sequence the log still holds. Logs from before it removed everything the
/// snapshot held, so its absence means the snapshot's sequence + 1.
const START_KEY: &[u8] = b"log_start";
/// The snapshot's files, inside the log's directory (no segment's name).
const SNAPSHOT_DIR: &str = "snapshot";
/// Left by logs from before segment files: the count is taken from the files now.
const LEGACY_LOG_BYTES_KEY: &[u8] = b"log_bytes";
/// Entries read from the segments per step of [`EmbeddedLog::entries_from`].
const READ_STEP: usize = 1024;

#[derive(Debug, Clone)]
pub struct LogConfig {
    /// How long a received message stays invisible before it is handed out again.
    pub visibility_timeout: Duration,
    /// Deliveries after which a message that keeps failing goes to the DLQ (SQS's maxReceiveCount).
    pub max_receive_count: u32,
    /// Longest a `receive` waits for new messages (long polling).
    pub wait_time: Duration,
    /// Delay before a released message is visible again; doubles with each delivery.
    pub release_delay: Duration,
    /// Size at which the log starts a new segment file; compaction deletes whole segments.
    pub segment_bytes: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            visibility_timeout: DEFAULT_VISIBILITY_TIMEOUT,
            max_receive_count: DEFAULT_MAX_RECEIVE_COUNT,
            wait_time: DEFAULT_WAIT_TIME,
            release_delay: DEFAULT_RELEASE_DELAY,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
        }
    }
}

/// One accepted message as the log holds it.
#[derive(Debug, Clone)]
pub struct LogEntry {
    pub sequence: u64,
    pub accepted_at: SystemTime,
    pub body: Bytes,
    /// The trace of the request that appended it, when it was traced.
    pub trace: Option<SpanContext>,
    /// What it takes in the log, headers included: what a byte retention counts.
    pub stored_bytes: u64,
}

/// What the DLQ keeps besides the body: enough for an operator to decide, and to redrive.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeadLetterRecord {
    pub sequence: u64,
    pub message_id: String,
    pub code: String,
    pub message: String,
    pub stage: String,
    pub attempts: u32,
    pub dead_lettered_at_ms: u64,
}

/// Cheap to clone; all clones share one log.
#[derive(Clone)]
pub struct EmbeddedLog {
    inner: Arc<Inner>,
}

struct Inner {
    db: sled::Db,
    /// The entries. Only durable ones are read, so no effect can ever outlive its event.
    segments: SegmentLog,
    dlq: sled::Tree,
    redriven: sled::Tree,
    meta: sled::Tree,
    cursor: Mutex<Cursor>,
    arrived: Notify,
    closed: AtomicBool,
    /// sled's `len()` scans the whole tree, so the DLQ size is counted here instead.
    dead_letters: AtomicU64,
    config: LogConfig,
    snapshot: super::LogSnapshot,
}

struct Cursor {
    /// First sequence never handed out.
    next_unread: u64,
    /// Handed out and not yet acked or dead-lettered.
    in_flight: BTreeMap<u64, Lease>,
    /// Every sequence below this is done; persisted, so a restart resumes here.
    watermark: u64,
    /// No lease becomes visible again before this: until then a receive does not walk the
    /// leases, which are thousands while the pipeline is busy.
    next_due: Instant,
}

/// How far off `next_due` is put when no lease is waiting to come back.
const NOTHING_DUE: Duration = Duration::from_secs(3600);

struct Lease {
    visible_at: Instant,
    /// Handed out and neither released nor deferred since: the pipeline is working on it, so
    /// the heartbeat keeps it invisible (SQS's in-flight set, the same way).
    in_pipeline: bool,
    receive_count: u32,
    last_error: Option<String>,
}

/// Set in an entry's time field when a trace context follows it. Milliseconds since 1970 stay
/// far below 2⁶², and entries written before traces existed never have it, so they still read.
const TRACED: u64 = 1 << 63;
/// Set when the entry is a dead letter moved back: the sequence it had follows the time.
const REDRIVEN: u64 = 1 << 62;

/// An entry: the acceptance time (ms, big-endian; the top bits flag what follows), the original
/// sequence of a redriven entry, the trace context if flagged ([`crate::trace::ENCODED_LEN`]
/// bytes), then the body exactly as received.
fn encode_entry(accepted_at_ms: u64, trace: Option<&SpanContext>, redriven_from: Option<u64>, body: &[u8]) -> Vec<u8> {
    let mut value = Vec::with_capacity(16 + crate::trace::ENCODED_LEN + body.len());
    let flags = trace.map_or(0, |_| TRACED) | redriven_from.map_or(0, |_| REDRIVEN);
    value.extend_from_slice(&(accepted_at_ms | flags).to_be_bytes());
    if let Some(old) = redriven_from {
        value.extend_from_slice(&old.to_be_bytes());
    }
    if let Some(sc) = trace {
        value.extend_from_slice(&crate::trace::encode(sc));
    }
    value.extend_from_slice(body);
    value
}

/// An entry's header: the acceptance time, the trace, the original sequence of a redriven
/// entry, and where the body starts.
struct Header {
    accepted_ms: u64,
    trace: Option<SpanContext>,
    redriven_from: Option<u64>,
    body_at: usize,
}

fn entry_header(value: &[u8]) -> Option<Header> {
    let stamp = u64::from_be_bytes(value.get(..8)?.try_into().ok()?);
    let mut at = 8;
    let redriven_from = if stamp & REDRIVEN != 0 {
        at += 8;
        Some(u64::from_be_bytes(value.get(8..16)?.try_into().ok()?))
    } else {
        None
    };
    let trace = if stamp & TRACED != 0 {
        let end = at + crate::trace::ENCODED_LEN;
        let trace = crate::trace::decode(value.get(at..end)?);
        at = end;
        trace
    } else {
        None
    };
    Some(Header { accepted_ms: stamp & !(TRACED | REDRIVEN), trace, redriven_from, body_at: at })
}

fn decode_entry(sequence: u64, value: Bytes) -> Option<LogEntry> {
    let header = entry_header(&value)?;
    Some(LogEntry {
        sequence,
        accepted_at: time_from_millis(header.accepted_ms),
        body: value.slice(header.body_at..),
        trace: header.trace,
        stored_bytes: SegmentLog::record_bytes(value.len()),
    })
}

impl EmbeddedLog {
    /// Opens the log kept in `dir` (its segment files) and `db` (everything else). A log from
    /// before segment files, kept in `db`, is moved into them first.
    pub fn open(db: &sled::Db, dir: &Path, config: LogConfig) -> Result<Self, SourceError> {
        let open = storage_error("open");
        let dlq = db.open_tree(trees::DLQ).map_err(&open)?;
        let redriven = db.open_tree(trees::REDRIVEN).map_err(&open)?;
        let meta = db.open_tree(trees::META).map_err(&open)?;
        let watermark = meta.get(WATERMARK_KEY).map_err(&open)?.and_then(|v| be_u64(&v)).unwrap_or(1);
        let snapshot = super::LogSnapshot::open(&dir.join(SNAPSHOT_DIR), db)?;
        // Entries the snapshot holds stay as history until the retention removes them.
        let start = match meta.get(START_KEY).map_err(&open)?.and_then(|v| be_u64(&v)) {
            Some(start) => start,
            None => {
                let start = snapshot.sequence() + 1;
                meta.insert(START_KEY, &start.to_be_bytes()).map_err(&open)?;
                start
            }
        };
        // Redrives whose entries are written but whose dead letters may not be gone yet.
        let mut redrives = Vec::new();
        let segments = SegmentLog::open(dir, config.segment_bytes, start, watermark, &mut |sequence, payload| {
            if let Some(old) = entry_header(payload).and_then(|h| h.redriven_from) {
                redrives.push((old, sequence));
            }
        })
        .map_err(|e| segment_error("open", e))?;
        let inner = Inner {
            db: db.clone(),
            segments,
            dlq,
            redriven,
            meta,
            cursor: Mutex::new(Cursor {
                next_unread: watermark,
                in_flight: BTreeMap::new(),
                watermark,
                next_due: Instant::now() + NOTHING_DUE,
            }),
            arrived: Notify::new(),
            closed: AtomicBool::new(false),
            dead_letters: AtomicU64::new(0),
            config,
            snapshot,
        };
        let log = Self { inner: Arc::new(inner) };
        log.migrate_legacy_tree()?;
        log.finish_redrives(&redrives)?;
        log.inner.dead_letters.store(log.inner.dlq.len() as u64, Ordering::Relaxed);
        Ok(log)
    }

    /// Moves the entries of a log kept in sled (before segment files) into segments, once.
    fn migrate_legacy_tree(&self) -> Result<(), SourceError> {
        let db = &self.inner.db;
        let legacy = trees::LOG.as_bytes();
        if !db.tree_names().iter().any(|n| n.as_ref() == legacy) {
            return Ok(());
        }
        let write = storage_error("move the log into segment files");
        let tree = db.open_tree(legacy).map_err(&write)?;
        let mut batch = Vec::new();
        let mut moved = 0u64;
        // A move cut short by a crash resumes after what it had written.
        let mut end = self.inner.segments.end();
        for item in tree.iter() {
            let (key, value) = item.map_err(&write)?;
            let Some(sequence) = be_u64(&key) else { continue };
            match end {
                Some(end) if sequence < end => continue,
                Some(_) => {}
                None => {
                    // The segments start where the tree did, whatever compaction had removed.
                    self.inner.segments.restart_at(sequence);
                    end = Some(sequence);
                }
            }
            batch.push(value.to_vec());
            if batch.len() == READ_STEP {
                moved += self.append_blocking(&std::mem::take(&mut batch))?.1;
            }
        }
        if !batch.is_empty() {
            moved += self.append_blocking(&batch)?.1;
        }
        db.drop_tree(legacy).map_err(&write)?;
        self.inner.meta.remove(LEGACY_LOG_BYTES_KEY).map_err(&write)?;
        db.flush().map_err(&write)?;
        if moved > 0 {
            tracing::info!(entries = moved, "event log moved from sled into segment files");
        }
        Ok(())
    }

    /// A crash between writing redriven entries and removing their dead letters: finish it.
    fn finish_redrives(&self, redrives: &[(u64, u64)]) -> Result<(), SourceError> {
        let write = storage_error("finish a redrive");
        let mut finished = false;
        for &(old, new) in redrives {
            if self.inner.dlq.remove(old.to_be_bytes()).map_err(&write)?.is_some() {
                self.inner.redriven.insert(old.to_be_bytes(), &new.to_be_bytes()).map_err(&write)?;
                finished = true;
            }
        }
        if finished {
            self.inner.db.flush().map_err(&write)?;
        }
        Ok(())
    }

    /// Writes and syncs entries; returns the first sequence and how many. Blocking.
    fn append_blocking(&self, payloads: &[Vec<u8>]) -> Result<(u64, u64), SourceError> {
        let segments = &self.inner.segments;
        let first = segments.append(payloads).map_err(|e| segment_error("append", e))?;
        let n = payloads.len() as u64;
        segments.sync_through(first + n - 1).map_err(|e| segment_error("sync", e))?;
        Ok((first, n))
    }

    /// Appends messages and returns once they are on disk: a 202 after this survives kill -9.
    /// Returns the first assigned sequence.
    pub async fn append(&self, bodies: &[Bytes]) -> Result<u64, SourceError> {
        self.append_traced(bodies, None).await
    }

    /// [`Self::append`], keeping `trace` (the context of the request that sent them) with each
    /// entry, so the pipeline continues that trace.
    pub async fn append_traced(&self, bodies: &[Bytes], trace: Option<&SpanContext>) -> Result<u64, SourceError> {
        if bodies.is_empty() {
            return Ok(self.inner.segments.next_sequence());
        }
        let accepted_ms = millis_since_epoch(SystemTime::now());
        let payloads: Vec<Vec<u8>> = bodies.iter().map(|body| encode_entry(accepted_ms, trace, None, body)).collect();
        let log = self.clone();
        // A write and an fsync: off the threads that serve GETs. Concurrent requests share the
        // fsync (group commit).
        let (first, _) = tokio::task::spawn_blocking(move || log.append_blocking(&payloads))
            .await
            .map_err(|e| SourceError::unavailable("embedded log append", e))??;
        // Only now may the pipeline see them: it reads durable entries only.
        self.inner.arrived.notify_waiters();
        Ok(first)
    }

    /// Keeps the messages the pipeline is working on invisible, however long that takes (a
    /// batch held through a store outage): every third of the visibility timeout their
    /// leases are renewed, as the SQS source's heartbeat renews its messages' visibility.
    /// A message the pipeline releases or defers is left to its own delay.
    pub fn spawn_heartbeat(&self, stop: tokio_util::sync::CancellationToken) -> tokio::task::JoinHandle<()> {
        let log = self.clone();
        let every = (self.inner.config.visibility_timeout / 3).max(Duration::from_millis(10));
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(every) => log.renew_leases(),
                }
            }
        })
    }

    fn renew_leases(&self) {
        let visible_at = Instant::now() + self.inner.config.visibility_timeout;
        for lease in lock(&self.inner.cursor).in_flight.values_mut().filter(|l| l.in_pipeline) {
            lease.visible_at = lease.visible_at.max(visible_at);
        }
    }

    /// Makes every pending and future `receive` return at once.
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        self.inner.arrived.notify_waiters();
    }

    /// Entries from `from` (inclusive) in sequence order: the replay tools' view of the log.
    pub fn entries_from(&self, from: u64) -> impl Iterator<Item = Result<LogEntry, SourceError>> + use<> {
        let log = self.clone();
        let mut next = from;
        let mut step = std::collections::VecDeque::new();
        let mut failed = false;
        std::iter::from_fn(move || {
            if step.is_empty() && !failed {
                match log.inner.segments.read(next, READ_STEP) {
                    Ok(records) => {
                        next = records.last().map_or(next, |(s, _)| s + 1);
                        step.extend(records.into_iter().filter_map(|(s, payload)| decode_entry(s, payload)).map(Ok));
                    }
                    Err(e) => {
                        failed = true;
                        return Some(Err(segment_error("read", e)));
                    }
                }
            }
            step.pop_front()
        })
    }

    /// One entry, if the log holds it.
    fn entry(&self, sequence: u64) -> Result<Option<LogEntry>, SourceError> {
        let records = self.inner.segments.read(sequence, 1).map_err(|e| segment_error("read", e))?;
        Ok(records.into_iter().find(|(s, _)| *s == sequence).and_then(|(s, payload)| decode_entry(s, payload)))
    }

    /// Bytes the log's live entries take, headers included: what a byte retention bounds.
    pub fn log_bytes(&self) -> u64 {
        self.inner.segments.live_bytes()
    }

    /// Bytes the log's segment files take on disk: the live entries, plus compacted ones that
    /// share a segment with them (at most one segment's worth).
    pub fn disk_bytes(&self) -> u64 {
        self.inner.segments.disk_bytes()
    }

    /// Removes the entries up to `last` (inclusive); only entries the snapshot holds and below
    /// the watermark, which nothing will hand out again. Returns how many.
    pub(crate) fn remove_through(&self, last: u64) -> Result<u64, SourceError> {
        let last = last.min(self.consumed_watermark().saturating_sub(1)).min(self.inner.snapshot.sequence());
        let start = (last + 1).min(self.inner.segments.next_sequence());
        if start <= self.inner.segments.start() {
            return Ok(0);
        }
        // The new start, and the watermark these entries are removed behind, are on disk before
        // the files go: a start never looks for entries before it.
        let compact = storage_error("compact");
        self.inner.meta.insert(START_KEY, &start.to_be_bytes()).map_err(&compact)?;
        self.inner.db.flush().map_err(&compact)?;
        self.inner.segments.remove_through(last).map_err(|e| segment_error("compact", e))
    }

    /// The snapshot of the entries compaction has folded (`embedded::compact`).
    pub fn snapshot(&self) -> super::LogSnapshot {
        self.inner.snapshot.clone()
    }

    /// The last sequence appended (0 for an empty log): the log's length, without a scan.
    pub fn last_sequence(&self) -> u64 {
        self.inner.segments.next_sequence().saturating_sub(1)
    }

    /// Entries after the snapshot: what a fold of snapshot + tail reads.
    pub fn unfolded(&self) -> u64 {
        self.last_sequence().saturating_sub(self.inner.snapshot.sequence())
    }

    /// Every sequence below this has been fully processed.
    pub fn consumed_watermark(&self) -> u64 {
        lock(&self.inner.cursor).watermark
    }

    /// Messages accepted and not yet processed (in flight included).
    pub fn backlog(&self) -> u64 {
        self.inner.segments.next_sequence().saturating_sub(self.consumed_watermark())
    }

    /// Every dead letter with its body, oldest first.
    pub fn dead_letters(&self) -> Result<Vec<(DeadLetterRecord, Bytes)>, SourceError> {
        let read = storage_error("read dead letters");
        self.inner.dlq.iter().map(|item| decode_dead_letter(item.map_err(&read)?.1)).collect()
    }

    /// Log sequences whose events the store never applied as they stand: dead letters, and
    /// dead letters redriven (those apply at the sequence they came back as). A fold of the
    /// log skips them, as the pipeline did.
    pub fn skipped_sequences(&self) -> Result<std::collections::HashSet<u64>, SourceError> {
        let read = storage_error("read dead letters");
        let mut out = std::collections::HashSet::new();
        for tree in [&self.inner.dlq, &self.inner.redriven] {
            for key in tree.iter().keys() {
                out.extend(be_u64(&key.map_err(&read)?));
            }
        }
        Ok(out)
    }

    /// Moves dead letters back into the log as new entries, in the order given; returns
    /// `(old, new)` sequences of those that were there. Like SQS's redrive, an entry comes back
    /// as a new message: an unversioned event is then ordered by when it came back. Each new
    /// entry names the dead letter it came from, so a crash between writing it and removing
    /// the dead letter is finished on the next open, and no dead letter comes back twice.
    pub async fn redrive(&self, sequences: &[u64]) -> Result<Vec<(u64, u64)>, SourceError> {
        let write = storage_error("redrive");
        let accepted_ms = millis_since_epoch(SystemTime::now());
        let mut olds = Vec::new();
        let mut payloads = Vec::new();
        for &old in sequences {
            if olds.contains(&old) {
                continue;
            }
            let Some(value) = self.inner.dlq.get(old.to_be_bytes()).map_err(&write)? else { continue };
            let (_, body) = decode_dead_letter(value)?;
            payloads.push(encode_entry(accepted_ms, None, Some(old), &body));
            olds.push(old);
        }
        if olds.is_empty() {
            return Ok(Vec::new());
        }
        let log = self.clone();
        let (first, _) = tokio::task::spawn_blocking(move || log.append_blocking(&payloads))
            .await
            .map_err(|e| SourceError::unavailable("embedded log redrive", e))??;
        let moved: Vec<(u64, u64)> = olds.into_iter().enumerate().map(|(i, old)| (old, first + i as u64)).collect();
        self.finish_redrives(&moved)?;
        self.inner.dead_letters.fetch_sub(moved.len() as u64, Ordering::Relaxed);
        self.inner.arrived.notify_waiters();
        Ok(moved)
    }

    pub fn dead_letter_count(&self) -> u64 {
        self.inner.dead_letters.load(Ordering::Relaxed)
    }

    fn take(&self, max: usize) -> Result<Vec<Received<u64>>, SourceError> {
        let inner = &self.inner;
        let now = Instant::now();
        let mut cursor = lock(&inner.cursor);
        let mut out = Vec::new();
        let mut exhausted = Vec::new();
        let mut due = now + NOTHING_DUE;
        let leases = if now >= cursor.next_due { cursor.in_flight.iter_mut() } else { Default::default() };
        for (&sequence, lease) in leases {
            if out.len() + exhausted.len() >= max {
                due = now;
                break;
            }
            if lease.visible_at > now {
                due = due.min(lease.visible_at);
                continue;
            }
            lease.receive_count += 1;
            if lease.receive_count > inner.config.max_receive_count {
                exhausted.push(sequence);
                continue;
            }
            lease.visible_at = now + inner.config.visibility_timeout;
            lease.in_pipeline = true;
            due = due.min(lease.visible_at);
            if let Some(entry) = self.entry(sequence)? {
                out.push(received(entry, lease.receive_count));
            }
        }
        if now >= cursor.next_due {
            cursor.next_due = due;
        }
        for sequence in exhausted {
            let reason = cursor.in_flight.get(&sequence).and_then(|l| l.last_error.clone());
            let message = reason.unwrap_or_else(|| {
                format!("not acknowledged within the visibility timeout in {} deliveries", inner.config.max_receive_count)
            });
            tracing::warn!(sequence, code = "max_receive_count_exceeded", error = %message, stage = "source", "message dead-lettered");
            self.move_to_dlq(&mut cursor, sequence, "max_receive_count_exceeded", &message, "source", None)?;
        }
        if out.len() < max {
            let start = cursor.next_unread;
            let records = inner.segments.read(start, max - out.len()).map_err(|e| segment_error("read", e))?;
            for (sequence, payload) in records {
                cursor.next_unread = sequence + 1;
                let Some(entry) = decode_entry(sequence, payload) else { continue };
                cursor.next_due = cursor.next_due.min(now + inner.config.visibility_timeout);
                cursor.in_flight.insert(
                    entry.sequence,
                    Lease {
                        visible_at: now + inner.config.visibility_timeout,
                        in_pipeline: true,
                        receive_count: 1,
                        last_error: None,
                    },
                );
                out.push(received(entry, 1));
            }
        }
        self.advance_watermark(&mut cursor)?;
        Ok(out)
    }

    fn move_to_dlq(
        &self,
        cursor: &mut Cursor,
        sequence: u64,
        code: &str,
        message: &str,
        stage: &str,
        body: Option<&[u8]>,
    ) -> Result<(), SourceError> {
        let write = storage_error("dead-letter");
        let attempts = cursor.in_flight.remove(&sequence).map_or(1, |l| l.receive_count.min(self.inner.config.max_receive_count));
        let stored_body;
        let body = match body {
            Some(b) => b,
            None => {
                stored_body = self.entry(sequence)?.map(|e| e.body).unwrap_or_default();
                &stored_body[..]
            }
        };
        let record = DeadLetterRecord {
            sequence,
            message_id: message_id(sequence),
            code: code.to_owned(),
            message: message.to_owned(),
            stage: stage.to_owned(),
            attempts,
            dead_lettered_at_ms: millis_since_epoch(SystemTime::now()),
        };
        let header = serde_json::to_vec(&record).expect("record serializes");
        let mut value = Vec::with_capacity(4 + header.len() + body.len());
        value.extend_from_slice(&(header.len() as u32).to_be_bytes());
        value.extend_from_slice(&header);
        value.extend_from_slice(body);
        if self.inner.dlq.insert(sequence.to_be_bytes(), value).map_err(&write)?.is_none() {
            self.inner.dead_letters.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn advance_watermark(&self, cursor: &mut Cursor) -> Result<(), SourceError> {
        let watermark = cursor.in_flight.keys().next().copied().unwrap_or(cursor.next_unread);
        if watermark != cursor.watermark {
            cursor.watermark = watermark;
            self.inner.meta.insert(WATERMARK_KEY, &watermark.to_be_bytes()).map_err(storage_error("ack"))?;
        }
        Ok(())
    }
}

fn segment_error(operation: &'static str, e: std::io::Error) -> SourceError {
    super::file_error(format!("embedded log {operation}"), e)
}

fn decode_dead_letter(value: sled::IVec) -> Result<(DeadLetterRecord, Bytes), SourceError> {
    let header_len = value.get(..4).map_or(0, |b| u32::from_be_bytes(b.try_into().unwrap_or_default()) as usize);
    let header = value.get(4..4 + header_len).unwrap_or_default();
    let record: DeadLetterRecord =
        serde_json::from_slice(header).map_err(|e| SourceError::corrupt("decoding a dead letter", e))?;
    Ok((record, Bytes::from_owner(value).slice(4 + header_len..)))
}

fn message_id(sequence: u64) -> String {
    format!("embedded-{sequence}")
}

fn received(entry: LogEntry, receive_count: u32) -> Received<u64> {
    Received {
        receipt: entry.sequence,
        message_id: message_id(entry.sequence),
        body: entry.body,
        accepted_at: entry.accepted_at,
        receive_count,
        sequence: Some(entry.sequence),
        position: Some(entry.sequence),
        trace: entry.trace,
    }
}

/// A poisoned lock means a panic mid-update elsewhere; the cursor is still consistent enough to
/// go on, since every update to it is a single insert or remove.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl EventSource for EmbeddedLog {
    type Receipt = u64;

    async fn receive(&self, max: usize) -> Result<Vec<Received<u64>>, SourceError> {
        let deadline = tokio::time::Instant::now() + self.inner.config.wait_time;
        loop {
            let notified = self.inner.arrived.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.inner.closed.load(Ordering::SeqCst) {
                return Ok(Vec::new());
            }
            let batch = self.take(max)?;
            if !batch.is_empty() {
                return Ok(batch);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(Vec::new());
            }
        }
    }

    async fn ack(&self, receipts: Vec<u64>) -> Result<(), SourceError> {
        let mut cursor = lock(&self.inner.cursor);
        for sequence in receipts {
            cursor.in_flight.remove(&sequence);
        }
        self.advance_watermark(&mut cursor)
    }

    async fn release(&self, receipts: Vec<u64>, reason: &str) -> Result<(), SourceError> {
        let mut cursor = lock(&self.inner.cursor);
        let now = Instant::now();
        let mut exhausted = Vec::new();
        let mut earliest = cursor.next_due;
        for sequence in receipts {
            let Some(lease) = cursor.in_flight.get_mut(&sequence) else { continue };
            lease.in_pipeline = false;
            lease.last_error = Some(reason.to_owned());
            if lease.receive_count >= self.inner.config.max_receive_count {
                exhausted.push(sequence);
            } else {
                let backoff = self.inner.config.release_delay * 2u32.saturating_pow(lease.receive_count - 1);
                lease.visible_at = now + backoff;
                earliest = earliest.min(lease.visible_at);
            }
        }
        cursor.next_due = earliest;
        for sequence in exhausted {
            let message = format!("failed {} deliveries; last error: {reason}", self.inner.config.max_receive_count);
            tracing::warn!(sequence, code = "max_receive_count_exceeded", error = %message, stage = "write", "message dead-lettered");
            self.move_to_dlq(&mut cursor, sequence, "max_receive_count_exceeded", &message, "write", None)?;
        }
        self.advance_watermark(&mut cursor)
    }

    async fn defer(&self, receipts: Vec<u64>, delay: Duration) -> Result<(), SourceError> {
        let mut cursor = lock(&self.inner.cursor);
        let visible_at = Instant::now() + delay;
        for sequence in receipts {
            let Some(lease) = cursor.in_flight.get_mut(&sequence) else { continue };
            lease.in_pipeline = false;
            // This delivery was never tried: it does not count.
            lease.receive_count = lease.receive_count.saturating_sub(1);
            lease.visible_at = visible_at;
        }
        cursor.next_due = cursor.next_due.min(visible_at);
        Ok(())
    }

    async fn dead_letter(&self, letters: Vec<DeadLetter<u64>>) -> Result<(), SourceError> {
        let mut cursor = lock(&self.inner.cursor);
        for letter in letters {
            self.move_to_dlq(&mut cursor, letter.receipt, &letter.code, &letter.message, letter.stage, Some(&letter.body))?;
        }
        self.advance_watermark(&mut cursor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::super::reopen;

    fn open(config: LogConfig) -> (tempfile::TempDir, sled::Db, EmbeddedLog) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let log = EmbeddedLog::open(&db, &dir.path().join("event-log"), config).unwrap();
        (dir, db, log)
    }

    fn fast() -> LogConfig {
        LogConfig {
            visibility_timeout: Duration::from_millis(30),
            wait_time: Duration::from_millis(50),
            release_delay: Duration::from_millis(1),
            ..LogConfig::default()
        }
    }

    #[tokio::test]
    async fn receives_in_order_and_acks_advance_the_watermark() {
        let (_dir, _db, log) = open(fast());
        log.append(&[Bytes::from_static(b"a"), Bytes::from_static(b"b"), Bytes::from_static(b"c")]).await.unwrap();
        let got = log.receive(2).await.unwrap();
        assert_eq!(got.iter().map(|r| r.receipt).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(got[0].body, Bytes::from_static(b"a"));
        log.ack(vec![2]).await.unwrap();
        assert_eq!(log.consumed_watermark(), 1, "1 is still in flight");
        log.ack(vec![1]).await.unwrap();
        assert_eq!(log.consumed_watermark(), 3);
        assert_eq!(log.receive(10).await.unwrap().iter().map(|r| r.receipt).collect::<Vec<_>>(), [3]);
    }

    #[tokio::test]
    async fn unacked_messages_come_back_then_go_to_the_dlq() {
        let (_dir, _db, log) = open(fast());
        log.append(&[Bytes::from_static(b"x")]).await.unwrap();
        for attempt in 1..=3 {
            let got = log.receive(10).await.unwrap();
            assert_eq!(got.len(), 1, "delivery {attempt}");
            assert_eq!(got[0].receive_count, attempt);
            log.release(vec![got[0].receipt], "store down").await.unwrap();
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        assert!(log.receive(10).await.unwrap().is_empty());
        let letters = log.dead_letters().unwrap();
        assert_eq!(letters.len(), 1);
        assert_eq!(letters[0].0.code, "max_receive_count_exceeded");
        assert!(letters[0].0.message.contains("store down"), "{}", letters[0].0.message);
        assert_eq!(letters[0].1, Bytes::from_static(b"x"));
        assert_eq!(log.consumed_watermark(), 2);
    }

    #[tokio::test]
    async fn redriven_dead_letters_come_back_once_as_new_entries() {
        let (_dir, _db, log) = open(LogConfig { max_receive_count: 1, ..fast() });
        log.append(&[Bytes::from_static(b"x"), Bytes::from_static(b"y")]).await.unwrap();
        let got = log.receive(10).await.unwrap();
        log.release(vec![got[0].receipt], "store down").await.unwrap();
        log.ack(vec![got[1].receipt]).await.unwrap();
        assert_eq!((log.dead_letter_count(), log.skipped_sequences().unwrap()), (1, [1].into()));
        assert_eq!(log.redrive(&[1, 1, 7]).await.unwrap(), [(1, 3)], "unknown and repeated sequences are skipped");
        assert_eq!((log.dead_letter_count(), log.dead_letters().unwrap().len()), (0, 0));
        let again = log.receive(10).await.unwrap();
        assert_eq!((again.len(), again[0].receipt, &again[0].body[..], again[0].receive_count), (1, 3, &b"x"[..], 1));
        assert_eq!(log.skipped_sequences().unwrap(), [1].into(), "the original stays out of any fold");
    }

    #[tokio::test]
    async fn deferred_messages_come_back_without_counting_a_delivery() {
        let (_dir, _db, log) = open(fast());
        log.append(&[Bytes::from_static(b"x")]).await.unwrap();
        for _ in 0..10 {
            let got = log.receive(10).await.unwrap();
            assert_eq!(got.len(), 1);
            assert_eq!(got[0].receive_count, 1, "never tried, so never counted");
            log.defer(vec![got[0].receipt], Duration::from_millis(5)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(log.dead_letter_count(), 0);
    }

    #[tokio::test]
    async fn the_heartbeat_keeps_messages_in_the_pipeline_invisible_but_not_released_ones() {
        let (_dir, _db, log) = open(fast());
        log.append(&[Bytes::from_static(b"held"), Bytes::from_static(b"released")]).await.unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let heartbeat = log.spawn_heartbeat(stop.clone());
        let got = log.receive(10).await.unwrap();
        log.release(vec![got[1].receipt], "store down").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let again = log.receive(10).await.unwrap();
        assert_eq!(
            again.iter().map(|r| r.receipt).collect::<Vec<_>>(),
            [2],
            "three visibility timeouts later, only the released one"
        );
        stop.cancel();
        heartbeat.await.unwrap();
    }

    #[tokio::test]
    async fn a_log_kept_in_sled_moves_into_segments_once_and_keeps_its_sequences() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            let legacy = db.open_tree(trees::LOG).unwrap();
            // As the sled log left it: entries 1 and 2 compacted away, 3 processed, 4 not yet.
            for (sequence, body) in [(3u64, "three"), (4, "four")] {
                legacy.insert(sequence.to_be_bytes(), encode_entry(7, None, None, body.as_bytes())).unwrap();
            }
            db.open_tree(trees::META).unwrap().insert(WATERMARK_KEY, &4u64.to_be_bytes()).unwrap();
            db.flush().unwrap();
        }
        for _ in 0..2 {
            let db = reopen(dir.path());
            let log = EmbeddedLog::open(&db, &dir.path().join("event-log"), fast()).unwrap();
            assert!(!db.tree_names().iter().any(|n| n.as_ref() == trees::LOG.as_bytes()), "the tree is gone");
            let entries: Vec<_> = log.entries_from(1).map(|e| e.unwrap()).map(|e| (e.sequence, e.body)).collect();
            assert_eq!(entries, [(3, Bytes::from_static(b"three")), (4, Bytes::from_static(b"four"))]);
            assert_eq!((log.last_sequence(), log.consumed_watermark()), (4, 4));
            drop(log);
            db.flush().unwrap();
        }
        let db = reopen(dir.path());
        let log = EmbeddedLog::open(&db, &dir.path().join("event-log"), fast()).unwrap();
        assert_eq!(log.receive(10).await.unwrap().iter().map(|r| r.receipt).collect::<Vec<_>>(), [4]);
        assert_eq!(log.append(&[Bytes::from_static(b"five")]).await.unwrap(), 5);
    }

    #[tokio::test]
    async fn a_redrive_cut_short_by_a_crash_is_finished_on_open_and_never_repeated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("event-log");
        {
            let db = sled::open(dir.path()).unwrap();
            let log = EmbeddedLog::open(&db, &path, LogConfig { max_receive_count: 1, ..fast() }).unwrap();
            log.append(&[Bytes::from_static(b"x")]).await.unwrap();
            let got = log.receive(10).await.unwrap();
            log.release(vec![got[0].receipt], "store down").await.unwrap();
            assert_eq!(log.dead_letter_count(), 1);
            // What a crash right after writing the redriven entry leaves: the entry, and the
            // dead letter still in place.
            log.append_blocking(&[encode_entry(9, None, Some(1), b"x")]).unwrap();
            db.flush().unwrap();
        }
        let db = reopen(dir.path());
        let log = EmbeddedLog::open(&db, &path, fast()).unwrap();
        assert_eq!(log.dead_letter_count(), 0, "the move was finished");
        assert_eq!(log.skipped_sequences().unwrap(), [1].into());
        assert!(log.redrive(&[1]).await.unwrap().is_empty(), "and is not made twice");
        assert_eq!(log.last_sequence(), 2);
    }

    #[tokio::test]
    async fn a_restart_resumes_after_the_watermark() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            let log = EmbeddedLog::open(&db, &dir.path().join("event-log"), fast()).unwrap();
            log.append(&[Bytes::from_static(b"1"), Bytes::from_static(b"2")]).await.unwrap();
            let got = log.receive(1).await.unwrap();
            log.ack(vec![got[0].receipt]).await.unwrap();
            db.flush().unwrap();
        }
        let db = reopen(dir.path());
        let log = EmbeddedLog::open(&db, &dir.path().join("event-log"), fast()).unwrap();
        let got = log.receive(10).await.unwrap();
        assert_eq!(got.iter().map(|r| r.receipt).collect::<Vec<_>>(), [2]);
        log.append(&[Bytes::from_static(b"3")]).await.unwrap();
        assert_eq!(log.entries_from(1).count(), 3, "the log keeps everything for replay");
    }
}
