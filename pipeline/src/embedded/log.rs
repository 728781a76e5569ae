//! The embedded event source: a durable, ordered inbox in sled that is also the event log.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use catalog_domain::event::{millis_since_epoch, time_from_millis};
use opentelemetry::trace::SpanContext;
use tokio::sync::Notify;

use super::{storage_error, trees};
use crate::ports::{DeadLetter, EventSource, Received, SourceError};

pub const DEFAULT_VISIBILITY_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_RECEIVE_COUNT: u32 = 3;
pub const DEFAULT_WAIT_TIME: Duration = Duration::from_millis(500);
pub const DEFAULT_RELEASE_DELAY: Duration = Duration::from_millis(200);

const WATERMARK_KEY: &[u8] = b"consumed_watermark";
/// The log's size in bytes (keys and values), kept as entries are appended and compacted.
const LOG_BYTES_KEY: &[u8] = b"log_bytes";

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
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            visibility_timeout: DEFAULT_VISIBILITY_TIMEOUT,
            max_receive_count: DEFAULT_MAX_RECEIVE_COUNT,
            wait_time: DEFAULT_WAIT_TIME,
            release_delay: DEFAULT_RELEASE_DELAY,
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
    log: sled::Tree,
    dlq: sled::Tree,
    redriven: sled::Tree,
    meta: sled::Tree,
    /// The next sequence to assign. Held while inserting, so sequences become visible in
    /// order and a reader's cursor can never step over one that is still being written.
    next_sequence: Mutex<u64>,
    cursor: Mutex<Cursor>,
    arrived: Notify,
    closed: AtomicBool,
    /// sled's `len()` scans the whole tree, so the DLQ size is counted here instead.
    dead_letters: AtomicU64,
    /// Bytes the log's entries take (keys and values): what a byte retention bounds.
    log_bytes: AtomicU64,
    config: LogConfig,
}

struct Cursor {
    /// First sequence never handed out.
    next_unread: u64,
    /// Handed out and not yet acked or dead-lettered.
    in_flight: BTreeMap<u64, Lease>,
    /// Every sequence below this is done; persisted, so a restart resumes here.
    watermark: u64,
}

struct Lease {
    visible_at: Instant,
    /// Handed out and neither released nor deferred since: the pipeline is working on it, so
    /// the heartbeat keeps it invisible (SQS's in-flight set, the same way).
    in_pipeline: bool,
    receive_count: u32,
    last_error: Option<String>,
}

/// Set in an entry's time field when a trace context follows it. Milliseconds since 1970 stay
/// far below 2⁶³, and entries written before traces existed never have it, so they still read.
const TRACED: u64 = 1 << 63;

/// An entry: the acceptance time (ms, big-endian; the top bit flags a trace), the trace context
/// if flagged ([`crate::trace::ENCODED_LEN`] bytes), then the body exactly as received.
fn encode_entry(accepted_at_ms: u64, trace: Option<&SpanContext>, body: &[u8]) -> Vec<u8> {
    let mut value = Vec::with_capacity(8 + crate::trace::ENCODED_LEN + body.len());
    match trace {
        Some(sc) => {
            value.extend_from_slice(&(accepted_at_ms | TRACED).to_be_bytes());
            value.extend_from_slice(&crate::trace::encode(sc));
        }
        None => value.extend_from_slice(&accepted_at_ms.to_be_bytes()),
    }
    value.extend_from_slice(body);
    value
}

/// Where the body starts in an entry, and the acceptance time and trace before it.
fn entry_header(value: &[u8]) -> Option<(u64, Option<SpanContext>, usize)> {
    let stamp = u64::from_be_bytes(value.get(..8)?.try_into().ok()?);
    if stamp & TRACED == 0 {
        return Some((stamp, None, 8));
    }
    let end = 8 + crate::trace::ENCODED_LEN;
    Some((stamp & !TRACED, crate::trace::decode(value.get(8..end)?), end))
}

fn decode_entry(key: &[u8], value: sled::IVec) -> Option<LogEntry> {
    let sequence = u64::from_be_bytes(key.try_into().ok()?);
    let (accepted_ms, trace, start) = entry_header(&value)?;
    let bytes = Bytes::from_owner(value);
    Some(LogEntry { sequence, accepted_at: time_from_millis(accepted_ms), body: bytes.slice(start..), trace })
}

impl EmbeddedLog {
    pub fn open(db: &sled::Db, config: LogConfig) -> Result<Self, SourceError> {
        let open = storage_error("open");
        let log = db.open_tree(trees::LOG).map_err(&open)?;
        let dlq = db.open_tree(trees::DLQ).map_err(&open)?;
        let redriven = db.open_tree(trees::REDRIVEN).map_err(&open)?;
        let meta = db.open_tree(trees::META).map_err(&open)?;
        let last = log.last().map_err(&open)?.and_then(|(k, _)| k.as_ref().try_into().ok().map(u64::from_be_bytes));
        let watermark =
            meta.get(WATERMARK_KEY).map_err(&open)?.and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes)).unwrap_or(1);
        // Compaction removes entries below the watermark, at times all of them: sequences go
        // on from the watermark then, never again from 1 (they order unversioned events).
        let next_sequence = last.map_or(1, |s| s + 1).max(watermark);
        let log_bytes = match meta.get(LOG_BYTES_KEY).map_err(&open)?.and_then(|v| v.as_ref().try_into().ok()) {
            Some(bytes) => u64::from_be_bytes(bytes),
            // A log from before the count existed: counted once.
            None => {
                let mut total = 0u64;
                for item in log.iter() {
                    let (k, v) = item.map_err(&open)?;
                    total += (k.len() + v.len()) as u64;
                }
                meta.insert(LOG_BYTES_KEY, &total.to_be_bytes()).map_err(&open)?;
                total
            }
        };
        let dead_letters = AtomicU64::new(dlq.len() as u64);
        Ok(Self {
            inner: Arc::new(Inner {
                db: db.clone(),
                log,
                dlq,
                redriven,
                meta,
                next_sequence: Mutex::new(next_sequence),
                cursor: Mutex::new(Cursor { next_unread: watermark, in_flight: BTreeMap::new(), watermark }),
                arrived: Notify::new(),
                closed: AtomicBool::new(false),
                dead_letters,
                log_bytes: AtomicU64::new(log_bytes),
                config,
            }),
        })
    }

    /// Appends messages and returns once they are on disk: a 202 after this survives kill -9.
    /// Returns the first assigned sequence.
    pub async fn append(&self, bodies: &[Bytes]) -> Result<u64, SourceError> {
        self.append_traced(bodies, None).await
    }

    /// [`Self::append`], keeping `trace` (the context of the request that sent them) with each
    /// entry, so the pipeline continues that trace.
    pub async fn append_traced(&self, bodies: &[Bytes], trace: Option<&SpanContext>) -> Result<u64, SourceError> {
        let accepted_ms = millis_since_epoch(SystemTime::now());
        let first = {
            let mut next = lock(&self.inner.next_sequence);
            let first = *next;
            let mut batch = sled::Batch::default();
            let mut bytes = 0;
            for (i, body) in bodies.iter().enumerate() {
                let value = encode_entry(accepted_ms, trace, body);
                bytes += (8 + value.len()) as u64;
                batch.insert(&(first + i as u64).to_be_bytes(), value);
            }
            self.inner.log.apply_batch(batch).map_err(storage_error("append"))?;
            *next += bodies.len() as u64;
            self.add_log_bytes(bytes, true)?;
            first
        };
        // Wake the pipeline before the fsync: its writes land after these in sled's own log,
        // so a crash can never keep an effect whose event it lost.
        self.inner.arrived.notify_waiters();
        self.inner.db.flush_async().await.map_err(storage_error("flush"))?;
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
        self.inner.log.range(from.to_be_bytes()..).filter_map(|item| match item {
            Ok((k, v)) => decode_entry(&k, v).map(Ok),
            Err(e) => Some(Err(storage_error("read")(e))),
        })
    }

    /// Bytes the log's entries take now (approximate after a crash: the count is saved with
    /// each append, not in the same write).
    pub fn log_bytes(&self) -> u64 {
        self.inner.log_bytes.load(Ordering::Relaxed)
    }

    /// Counts `bytes` more (appended) or fewer (compacted) in the log, and saves the count.
    fn add_log_bytes(&self, bytes: u64, grow: bool) -> Result<(), SourceError> {
        let change = |b: u64| if grow { b.saturating_add(bytes) } else { b.saturating_sub(bytes) };
        // One atomic step: an append and a compaction at once must not lose either's change.
        let before =
            self.inner.log_bytes.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| Some(change(b))).unwrap_or_else(|b| b);
        self.inner.meta.insert(LOG_BYTES_KEY, &change(before).to_be_bytes()).map_err(storage_error("count the log"))?;
        Ok(())
    }

    /// Removes the entries up to `last` (inclusive), which a snapshot already holds; only
    /// entries below the watermark, which nothing will hand out again. Returns how many.
    pub(crate) fn remove_through(&self, last: u64) -> Result<u64, SourceError> {
        let last = last.min(self.consumed_watermark().saturating_sub(1));
        let mut batch = sled::Batch::default();
        let (mut removed, mut bytes) = (0u64, 0u64);
        for item in self.inner.log.range(..=last.to_be_bytes()) {
            let (k, v) = item.map_err(storage_error("compact"))?;
            bytes += (k.len() + v.len()) as u64;
            removed += 1;
            batch.remove(k);
        }
        self.inner.log.apply_batch(batch).map_err(storage_error("compact"))?;
        self.add_log_bytes(bytes, false)?;
        Ok(removed)
    }

    /// The snapshot of the entries compaction has removed (`embedded::compact`).
    pub fn snapshot(&self) -> Result<super::LogSnapshot, SourceError> {
        super::LogSnapshot::open(&self.inner.db)
    }

    /// The first entry the log still holds, if any.
    pub fn first_sequence(&self) -> Result<Option<u64>, SourceError> {
        let first = self.inner.log.first().map_err(storage_error("read"))?;
        Ok(first.and_then(|(k, _)| k.as_ref().try_into().ok().map(u64::from_be_bytes)))
    }

    /// The last sequence appended (0 for an empty log): the log's length, without a scan.
    pub fn last_sequence(&self) -> u64 {
        lock(&self.inner.next_sequence).saturating_sub(1)
    }

    /// Every sequence below this has been fully processed.
    pub fn consumed_watermark(&self) -> u64 {
        lock(&self.inner.cursor).watermark
    }

    /// Messages accepted and not yet processed (in flight included).
    pub fn backlog(&self) -> u64 {
        let next = *lock(&self.inner.next_sequence);
        next.saturating_sub(self.consumed_watermark())
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
                out.extend(key.map_err(&read)?.as_ref().try_into().ok().map(u64::from_be_bytes));
            }
        }
        Ok(out)
    }

    /// Moves dead letters back into the log as new entries, in the order given, each removed
    /// from the DLQ in the same transaction that appends it; returns `(old, new)` sequences
    /// of those that were there. Like SQS's redrive, an entry comes back as a new message: an
    /// unversioned event is then ordered by when it came back.
    pub async fn redrive(&self, sequences: &[u64]) -> Result<Vec<(u64, u64)>, SourceError> {
        use sled::Transactional;
        let write = storage_error("redrive");
        let accepted_ms = millis_since_epoch(SystemTime::now());
        let moved = {
            let mut next = lock(&self.inner.next_sequence);
            let inner = &self.inner;
            let moved = (&inner.log, &inner.dlq, &inner.redriven)
                .transaction(|(log, dlq, redriven)| {
                    let mut moved = Vec::new();
                    for &old in sequences {
                        let Some(value) = dlq.remove(&old.to_be_bytes())? else { continue };
                        let body = decode_dead_letter(value)
                            .map(|(_, body)| body)
                            .map_err(sled::transaction::ConflictableTransactionError::Abort)?;
                        let new = *next + moved.len() as u64;
                        log.insert(&new.to_be_bytes(), encode_entry(accepted_ms, None, &body))?;
                        redriven.insert(&old.to_be_bytes(), &new.to_be_bytes())?;
                        moved.push((old, new));
                    }
                    Ok(moved)
                })
                .map_err(|e| match e {
                    sled::transaction::TransactionError::Abort(e) => e,
                    sled::transaction::TransactionError::Storage(e) => write(e),
                })?;
            *next += moved.len() as u64;
            self.inner.dead_letters.fetch_sub(moved.len() as u64, Ordering::Relaxed);
            moved
        };
        self.inner.arrived.notify_waiters();
        self.inner.db.flush_async().await.map_err(storage_error("flush"))?;
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
        for (&sequence, lease) in cursor.in_flight.iter_mut() {
            if out.len() + exhausted.len() >= max {
                break;
            }
            if lease.visible_at > now {
                continue;
            }
            lease.receive_count += 1;
            if lease.receive_count > inner.config.max_receive_count {
                exhausted.push(sequence);
                continue;
            }
            lease.visible_at = now + inner.config.visibility_timeout;
            lease.in_pipeline = true;
            if let Some(entry) = inner.log.get(sequence.to_be_bytes()).map_err(storage_error("read"))? {
                out.extend(decode_entry(&sequence.to_be_bytes(), entry).map(|e| received(e, lease.receive_count)));
            }
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
            for item in inner.log.range(start.to_be_bytes()..).take(max - out.len()) {
                let (key, value) = item.map_err(storage_error("read"))?;
                let Some(entry) = decode_entry(&key, value) else { continue };
                cursor.next_unread = entry.sequence + 1;
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
                stored_body = self.inner.log.get(sequence.to_be_bytes()).map_err(&write)?;
                stored_body.as_deref().map_or(&[][..], |v| entry_header(v).and_then(|(_, _, at)| v.get(at..)).unwrap_or_default())
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
        for sequence in receipts {
            let Some(lease) = cursor.in_flight.get_mut(&sequence) else { continue };
            lease.in_pipeline = false;
            lease.last_error = Some(reason.to_owned());
            if lease.receive_count >= self.inner.config.max_receive_count {
                exhausted.push(sequence);
            } else {
                let backoff = self.inner.config.release_delay * 2u32.saturating_pow(lease.receive_count - 1);
                lease.visible_at = now + backoff;
            }
        }
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

    fn open(config: LogConfig) -> (tempfile::TempDir, sled::Db, EmbeddedLog) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let log = EmbeddedLog::open(&db, config).unwrap();
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
    async fn a_restart_resumes_after_the_watermark() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            let log = EmbeddedLog::open(&db, fast()).unwrap();
            log.append(&[Bytes::from_static(b"1"), Bytes::from_static(b"2")]).await.unwrap();
            let got = log.receive(1).await.unwrap();
            log.ack(vec![got[0].receipt]).await.unwrap();
            db.flush().unwrap();
        }
        let db = sled::open(dir.path()).unwrap();
        let log = EmbeddedLog::open(&db, fast()).unwrap();
        let got = log.receive(10).await.unwrap();
        assert_eq!(got.iter().map(|r| r.receipt).collect::<Vec<_>>(), [2]);
        log.append(&[Bytes::from_static(b"3")]).await.unwrap();
        assert_eq!(log.entries_from(1).count(), 3, "the log keeps everything for replay");
    }
}
