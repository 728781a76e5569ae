//! The event log's bytes on disk: append-only segment files, one fsync shared by every request
//! that wrote before it (group commit), whole files deleted once compaction is past them.
//!
//! A segment is named by its first sequence (`00000000000000000001.log`) and holds records
//! `[payload length u32][crc32 u32][sequence u64][payload]`, little-endian, with the CRC over
//! the sequence and the payload. A crash can tear only the last record of the last segment
//! (earlier segments are synced before the next one is created); opening truncates such a
//! tail, which no request was ever answered for.
//!
//! Appends land in zeros written ahead of them by a thread of the log's own, so a request
//! never waits for a fill.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;

const HEADER: usize = 16;
const SUFFIX: &str = ".log";
/// Offsets within a segment are kept as u32: a segment never grows past this, whatever is asked.
const MAX_SEGMENT_BYTES: u64 = 1 << 30;

pub const DEFAULT_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// How far ahead of its records a segment is kept filled with zeros. An fdatasync of a write
/// that grows a file must also commit its new size: on ext4 a journal commit, which waits
/// behind every other file's pending metadata (a removed directory, another database's
/// writeback). A write into bytes that already exist commits data only. So appends land in
/// zeros written ahead and synced, as PostgreSQL zero-fills its WAL segments, and the fsync a
/// POST waits for stays short.
const ZERO_AHEAD: u64 = 4 * 1024 * 1024;
/// What the filler writes and syncs at a time. The fill runs beside the appends, on their file,
/// so a POST's fdatasync also writes out whatever zeros of a fill are still dirty: one step is
/// all it can meet. (The appends once filled 4 MiB themselves, under the log's lock: a 13–21 ms
/// stall for every request behind it, the durable 202's whole tail at 1M products.)
const FILL_STEP: u64 = 256 * 1024;
/// How long the filler waits before trying again after a failed fill (a full disk): the appends
/// fill for themselves meanwhile, and report the error to their requests.
const FILL_RETRY: Duration = Duration::from_secs(1);
/// The zeros one write of a fill takes: a fill writes this block over and over, since a fresh
/// 4 MiB zeroed buffer per fill cost page faults and TLB shootdowns on every step.
const ZERO_BLOCK: usize = 256 * 1024;
static ZEROS: [u8; ZERO_BLOCK] = [0; ZERO_BLOCK];

/// Fills `file` with zeros from `from` up to `to`.
fn write_zeros(file: &File, from: u64, to: u64) -> io::Result<()> {
    let mut at = from;
    while at < to {
        let n = (to - at).min(ZERO_BLOCK as u64);
        file.write_all_at(&ZEROS[..n as usize], at)?;
        at += n;
    }
    Ok(())
}

struct Segment {
    first: u64,
    path: PathBuf,
    file: Arc<File>,
    /// Where each record starts: record `first + i` at `offsets[i]`.
    offsets: Vec<u32>,
    len: u64,
    /// The file's size: zeros written ahead of `len`, where appends go.
    zeroed: u64,
}

impl Segment {
    fn end(&self) -> u64 {
        self.first + self.offsets.len() as u64
    }

    /// Whether the filler has zeros to write here: less than `ZERO_AHEAD` ahead of the records,
    /// and the file not yet at the segment's size.
    fn wants_fill(&self, segment_bytes: u64) -> bool {
        self.zeroed < (self.len + ZERO_AHEAD).min(segment_bytes)
    }
}

struct State {
    /// By first sequence; the last one is the one appended to.
    segments: BTreeMap<u64, Segment>,
    next_sequence: u64,
    /// Entries below this are compacted away, though their segment may still be on disk.
    start: u64,
    /// The filler is writing zeros past the active segment's `zeroed`, with the lock released:
    /// nothing else may write there, or seal the segment, until it is done.
    filling: bool,
    /// The log is closing: the filler ends.
    closed: bool,
}

/// What the appends and the filler thread share.
struct Shared {
    state: Mutex<State>,
    /// Signalled when the active segment's room shrinks, a fill ends, or the log closes.
    changed: Condvar,
}

pub(crate) struct SegmentLog {
    dir: PathBuf,
    segment_bytes: u64,
    shared: Arc<Shared>,
    /// Held by the one request syncing for everyone who wrote before it.
    sync: Mutex<()>,
    /// Every sequence up to and including this is on disk (0: none).
    durable: AtomicU64,
    filler: Option<JoinHandle<()>>,
}

impl Drop for SegmentLog {
    fn drop(&mut self) {
        // Set under the lock the filler checks it and waits with, so the signal cannot fall
        // between the two.
        lock(&self.shared.state).closed = true;
        self.shared.changed.notify_all();
        if let Some(filler) = self.filler.take() {
            // At most one step's write and sync: the filler checks for the close between steps.
            let _ = filler.join();
        }
    }
}

/// The filler: keeps `ZERO_AHEAD` bytes (up to the segment's size) of zeros, synced, ahead of
/// the active segment's records, one `FILL_STEP` at a time, outside the lock.
fn fill_ahead(shared: &Shared, segment_bytes: u64) {
    let mut state = lock(&shared.state);
    loop {
        if state.closed {
            return;
        }
        let wanted = state
            .segments
            .values()
            .next_back()
            .filter(|s| s.wants_fill(segment_bytes))
            .map(|s| (s.first, s.file.clone(), s.zeroed));
        let Some((first, file, from)) = wanted.filter(|_| !state.filling) else {
            state = shared.changed.wait(state).unwrap_or_else(|p| p.into_inner());
            continue;
        };
        let to = (from + FILL_STEP).min(segment_bytes);
        state.filling = true;
        drop(state);
        let filled = write_zeros(&file, from, to).and_then(|()| file.sync_data());
        state = lock(&shared.state);
        state.filling = false;
        shared.changed.notify_all();
        match filled {
            Ok(()) => {
                if let Some(segment) = state.segments.get_mut(&first) {
                    segment.zeroed = segment.zeroed.max(to);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "event log: filling zeros ahead failed; appends fill for themselves");
                state = shared.changed.wait_timeout(state, FILL_RETRY).unwrap_or_else(|p| p.into_inner()).0;
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}{SUFFIX}"))
}

fn crc(sequence: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&sequence.to_le_bytes());
    h.update(payload);
    h.finalize()
}

fn corrupt(path: &Path, at: u64, what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("event log segment {} at byte {at}: {what}", path.display()))
}

/// What reading a segment found.
struct Scanned {
    offsets: Vec<u32>,
    /// Where the valid records end.
    len: u64,
    /// The file's size: zero-filled ahead of `len` (see [`ZERO_AHEAD`]).
    size: u64,
    /// Whether anything but zeros follows the valid records: a torn or damaged write.
    torn: bool,
}

/// Reads a segment's records, calling `each` with every one, up to the first that is not a
/// whole, valid record (zeros, where the file was filled ahead, or the tail a crash tore).
fn scan(path: &Path, first: u64, each: &mut dyn FnMut(u64, &[u8])) -> io::Result<Scanned> {
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    let mut reader = BufReader::with_capacity(1 << 20, &file);
    let (mut offsets, mut at) = (Vec::new(), 0u64);
    let mut payload = Vec::new();
    while size - at >= HEADER as u64 {
        let mut header = [0u8; HEADER];
        reader.read_exact(&mut header)?;
        let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
        let sum = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
        let sequence = u64::from_le_bytes(header[8..].try_into().expect("8 bytes"));
        if size - at - (HEADER as u64) < len as u64 {
            break;
        }
        payload.resize(len, 0);
        reader.read_exact(&mut payload)?;
        let expected = first + offsets.len() as u64;
        if crc(sequence, &payload) != sum || sequence != expected {
            break;
        }
        each(sequence, &payload);
        offsets.push(u32::try_from(at).map_err(|_| corrupt(path, at, "segment too large"))?);
        at += (HEADER + len) as u64;
    }
    // The rest must be the zeros written ahead; anything else is a write cut short.
    let mut torn = false;
    let mut chunk = vec![0u8; 1 << 20];
    let mut from = at;
    while from < size && !torn {
        let n = chunk.len().min((size - from) as usize);
        file.read_exact_at(&mut chunk[..n], from)?;
        torn = chunk[..n].iter().any(|&b| b != 0);
        from += n as u64;
    }
    Ok(Scanned { offsets, len: at, size, torn })
}

impl SegmentLog {
    /// Opens (or creates) the log in `dir`, calling `each` with every record in order. `start`
    /// is the first sequence still wanted (the snapshot's sequence + 1), and `min_next` the
    /// least next sequence (the consumed watermark, which survives a log compacted empty).
    pub fn open(dir: &Path, segment_bytes: u64, start: u64, min_next: u64, each: &mut dyn FnMut(u64, &[u8])) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut firsts = Vec::new();
        for item in std::fs::read_dir(dir)? {
            let name = item?.file_name();
            let name = name.to_string_lossy();
            if let Some(first) = name.strip_suffix(SUFFIX).and_then(|n| n.parse::<u64>().ok()) {
                firsts.push(first);
            }
        }
        firsts.sort_unstable();
        let mut segments = BTreeMap::new();
        let count = firsts.len();
        for (i, first) in firsts.into_iter().enumerate() {
            let path = segment_path(dir, first);
            let Scanned { offsets, len, size, torn } = scan(&path, first, each)?;
            if let Some(prev) = segments.values().next_back().map(Segment::end)
                && prev != first
            {
                return Err(corrupt(&path, 0, &format!("starts at sequence {first}, the previous segment ends before {prev}")));
            }
            let file = OpenOptions::new().read(true).write(true).open(&path)?;
            if torn {
                if i + 1 < count {
                    return Err(corrupt(&path, len, "a damaged record before the last segment"));
                }
                // Written, never synced, never answered: the tail a crash tore. Zeroed rather than
                // cut, so the file keeps the room filled ahead for appends.
                tracing::warn!(segment = %path.display(), valid_bytes = len, "event log: cutting off a torn tail");
                write_zeros(&file, len, size)?;
                file.sync_data()?;
            }
            segments.insert(first, Segment { first, path, file: Arc::new(file), offsets, len, zeroed: size });
        }
        let end = segments.values().next_back().map_or(1, Segment::end);
        let next_sequence = end.max(min_next).max(start).max(1);
        let durable = next_sequence - 1;
        let segment_bytes = segment_bytes.clamp(4096, MAX_SEGMENT_BYTES);
        let shared = Arc::new(Shared {
            state: Mutex::new(State { segments, next_sequence, start: start.max(1), filling: false, closed: false }),
            changed: Condvar::new(),
        });
        let filler = {
            let shared = shared.clone();
            std::thread::Builder::new().name("event-log-fill".into()).spawn(move || fill_ahead(&shared, segment_bytes))?
        };
        let log = Self {
            dir: dir.to_owned(),
            segment_bytes,
            shared,
            sync: Mutex::new(()),
            durable: AtomicU64::new(durable),
            filler: Some(filler),
        };
        Ok(log)
    }

    /// Writes `payloads` as the next records, in order, and returns their first sequence; they are
    /// not durable until [`Self::sync_through`] the last one. Blocking.
    pub fn append(&self, payloads: &[Vec<u8>]) -> io::Result<u64> {
        let mut state = lock(&self.shared.state);
        if payloads.is_empty() {
            return Ok(state.next_sequence);
        }
        let size: usize = payloads.iter().map(|p| HEADER + p.len()).sum();
        // Taken after any wait for the filler: another request may append meanwhile.
        let first = loop {
            let first = state.next_sequence;
            let active = state.segments.values().next_back();
            // Behind the records already written, the new ones would take their sequences.
            if let Some(s) = active.filter(|s| s.end() > first) {
                return Err(corrupt(&s.path, s.len, &format!("next sequence {first} is behind the segment's end {}", s.end())));
            }
            let active_full = active.is_none_or(|s| s.len >= self.segment_bytes);
            // Compaction keeps the active segment, so sequences never jump past its end; should a
            // damaged data dir make them (a watermark past the last record), the new records get
            // a segment of their own rather than a sequence their place in the file contradicts.
            let gap = active.is_some_and(|s| s.end() != first);
            let short = active.is_some_and(|s| s.len + size as u64 > s.zeroed);
            // The filler's zeros are not written yet: neither the records nor a roll may go
            // where it writes. It is one step from done.
            if state.filling && (active_full || gap || short) {
                state = self.shared.changed.wait(state).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            if active_full || gap {
                self.roll(&mut state, first)?;
            }
            break first;
        };
        let mut buf = Vec::with_capacity(size);
        let segment = state.segments.values_mut().next_back().expect("rolled above");
        let needed = segment.len + size as u64;
        if needed > segment.zeroed {
            // Ahead of the filler (a new segment, a burst, a request larger than the room): this
            // request fills what it needs, and one step, itself.
            let to = needed.max((segment.zeroed + FILL_STEP).min(self.segment_bytes));
            write_zeros(&segment.file, segment.zeroed, to)?;
            // Its size committed now, once, and not by the fsync of the appends that follow.
            segment.file.sync_data()?;
            segment.zeroed = to;
        }
        let mut at = segment.len;
        for (i, payload) in payloads.iter().enumerate() {
            let sequence = first + i as u64;
            buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            buf.extend_from_slice(&crc(sequence, payload).to_le_bytes());
            buf.extend_from_slice(&sequence.to_le_bytes());
            buf.extend_from_slice(payload);
            segment.offsets.push(at as u32);
            at += (HEADER + payload.len()) as u64;
        }
        if let Err(e) = segment.file.write_all_at(&buf, segment.len) {
            // Nothing of this request counts: the next write goes over it.
            segment.offsets.truncate(segment.offsets.len() - payloads.len());
            return Err(e);
        }
        segment.len = at;
        if segment.wants_fill(self.segment_bytes) {
            self.shared.changed.notify_all();
        }
        state.next_sequence = first + payloads.len() as u64;
        Ok(first)
    }

    /// Seals the active segment (synced, so only the last segment can ever be torn) and starts
    /// one at `first`.
    fn roll(&self, state: &mut State, first: u64) -> io::Result<()> {
        if let Some(active) = state.segments.values_mut().next_back() {
            // The zeros filled ahead are no longer needed once nothing appends here.
            active.file.set_len(active.len)?;
            active.file.sync_data()?;
            active.zeroed = active.len;
        }
        let path = segment_path(&self.dir, first);
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path)?;
        // The new file's name must survive a crash as well as its records.
        File::open(&self.dir)?.sync_all()?;
        state.segments.insert(first, Segment { first, path, file: Arc::new(file), offsets: Vec::new(), len: 0, zeroed: 0 });
        self.shared.changed.notify_all();
        Ok(())
    }

    /// Returns once every record up to `last` is on disk. Concurrent callers share one fsync:
    /// whoever syncs covers everything written before it started. Blocking.
    pub fn sync_through(&self, last: u64) -> io::Result<()> {
        if self.durable.load(Ordering::Acquire) >= last {
            return Ok(());
        }
        let _one = lock(&self.sync);
        if self.durable.load(Ordering::Acquire) >= last {
            return Ok(());
        }
        let (file, upto) = {
            let state = lock(&self.shared.state);
            let Some(active) = state.segments.values().next_back() else { return Ok(()) };
            (active.file.clone(), state.next_sequence - 1)
        };
        file.sync_data()?;
        self.durable.fetch_max(upto, Ordering::AcqRel);
        Ok(())
    }

    /// One past the last record the segment files hold, if they hold any file.
    pub fn end(&self) -> Option<u64> {
        lock(&self.shared.state).segments.values().next_back().map(Segment::end)
    }

    /// Makes `next` the next sequence of a log without segment files (moving an older log in).
    pub fn restart_at(&self, next: u64) {
        let mut state = lock(&self.shared.state);
        debug_assert!(state.segments.is_empty());
        state.next_sequence = next;
        self.durable.store(next.saturating_sub(1), Ordering::Release);
    }

    /// The last sequence on disk (0: none).
    pub fn durable(&self) -> u64 {
        self.durable.load(Ordering::Acquire)
    }

    pub fn next_sequence(&self) -> u64 {
        lock(&self.shared.state).next_sequence
    }

    /// The first sequence the log holds (compacted entries excluded).
    pub fn start(&self) -> u64 {
        lock(&self.shared.state).start
    }

    /// Up to `max` durable records from `from` on, as `(sequence, payload)`, in order; fewer at
    /// a segment's end (call again). Blocking: one read.
    pub fn read(&self, from: u64, max: usize) -> io::Result<Vec<(u64, Bytes)>> {
        let durable = self.durable();
        let (file, first, offsets, end_at) = {
            let state = lock(&self.shared.state);
            let mut from = from.max(state.start);
            // The segment holding `from`, else the next one (sequences may jump past a log
            // compacted empty).
            let holding = state.segments.range(..=from).next_back().map(|(_, s)| s).filter(|s| from < s.end());
            let Some(segment) = holding.or_else(|| state.segments.range(from + 1..).next().map(|(_, s)| s)) else {
                return Ok(Vec::new());
            };
            from = from.max(segment.first);
            let last = segment.end().min(durable + 1);
            if from >= last || max == 0 {
                return Ok(Vec::new());
            }
            let i = (from - segment.first) as usize;
            let n = max.min((last - from) as usize);
            let end_at = segment.offsets.get(i + n).map_or(segment.len, |&o| u64::from(o));
            (segment.file.clone(), from, segment.offsets[i..i + n].to_vec(), end_at)
        };
        let start_at = u64::from(offsets[0]);
        let mut buf = vec![0u8; (end_at - start_at) as usize];
        file.read_exact_at(&mut buf, start_at)?;
        let buf = Bytes::from(buf);
        let mut out = Vec::with_capacity(offsets.len());
        for (i, &offset) in offsets.iter().enumerate() {
            let at = (u64::from(offset) - start_at) as usize;
            let len = u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes")) as usize;
            out.push((first + i as u64, buf.slice(at + HEADER..at + HEADER + len)));
        }
        Ok(out)
    }

    /// Drops the entries through `last` (compacted): they are no longer read, and every segment
    /// holding only such entries is deleted, except the one being appended to. Returns how many
    /// entries went. Blocking.
    pub fn remove_through(&self, last: u64) -> io::Result<u64> {
        let (removed, gone) = {
            let mut state = lock(&self.shared.state);
            let new_start = (last + 1).min(state.next_sequence);
            if new_start <= state.start {
                return Ok(0);
            }
            let removed = new_start - state.start;
            state.start = new_start;
            let active = state.segments.keys().next_back().copied();
            let gone: Vec<Segment> = state
                .segments
                .extract_if(.., |&first, s| s.end() <= new_start && Some(first) != active)
                .map(|(_, s)| s)
                .collect();
            (removed, gone)
        };
        // Unlinked with the lock released: freeing a segment's extents takes the file system
        // milliseconds, which every append would wait out, and the compaction that calls this
        // runs at the lowest priority, so a wake-up of the pipeline could stall it in between.
        // A segment that fails to go (and those after it) stay on disk until the log is opened
        // again; they are behind its start then, and the next compaction that removes entries
        // deletes them with its own.
        for segment in gone {
            std::fs::remove_file(&segment.path)?;
        }
        Ok(removed)
    }

    /// Bytes the log's live entries take, headers included: what a byte retention bounds.
    pub fn live_bytes(&self) -> u64 {
        let state = lock(&self.shared.state);
        let start = state.start;
        state
            .segments
            .values()
            .filter(|s| s.end() > start)
            .map(|s| {
                let skip = start.saturating_sub(s.first) as usize;
                s.len - s.offsets.get(skip).map_or(s.len, |&o| u64::from(o))
            })
            .sum()
    }

    /// Bytes the segment files take on disk (compacted entries in a live segment and the zeros
    /// filled ahead included).
    pub fn disk_bytes(&self) -> u64 {
        lock(&self.shared.state).segments.values().map(|s| s.zeroed).sum()
    }

    /// The bytes one record of `payload_len` takes.
    pub const fn record_bytes(payload_len: usize) -> u64 {
        (HEADER + payload_len) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path, segment_bytes: u64) -> (SegmentLog, Vec<u64>) {
        let mut seen = Vec::new();
        let log = SegmentLog::open(dir, segment_bytes, 1, 1, &mut |s, _| seen.push(s)).unwrap();
        (log, seen)
    }

    fn payloads(n: usize, tag: &str) -> Vec<Vec<u8>> {
        (0..n).map(|i| format!("{tag}-{i}").into_bytes()).collect()
    }

    #[test]
    fn records_read_back_only_once_durable_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = open(dir.path(), 4096);
        assert_eq!(log.append(&payloads(3, "a")).unwrap(), 1);
        assert!(log.read(1, 10).unwrap().is_empty(), "not synced yet");
        log.sync_through(3).unwrap();
        let got = log.read(2, 10).unwrap();
        assert_eq!(got.iter().map(|(s, p)| (*s, p.to_vec())).collect::<Vec<_>>(), [(2, b"a-1".to_vec()), (3, b"a-2".to_vec())]);
        drop(log);
        let (log, seen) = open(dir.path(), 4096);
        assert_eq!((seen, log.next_sequence(), log.durable()), (vec![1, 2, 3], 4, 3));
    }

    #[test]
    fn segments_roll_and_whole_ones_go_when_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = open(dir.path(), 4096);
        for k in 0..20 {
            let first = log.append(&payloads(50, &format!("batch{k}"))).unwrap();
            log.sync_through(first + 49).unwrap();
        }
        let files = || std::fs::read_dir(dir.path()).unwrap().count();
        let before = files();
        {
            let state = lock(&log.shared.state);
            let sealed: Vec<_> = state.segments.values().rev().skip(1).collect();
            for s in sealed {
                assert_eq!(std::fs::metadata(&s.path).unwrap().len(), s.len, "a sealed segment is cut to its records");
            }
        }
        assert!(before >= 4, "{before} segments");
        let mut all = Vec::new();
        let mut from = 1;
        loop {
            let got = log.read(from, 64).unwrap();
            let Some(last) = got.last().map(|(s, _)| *s) else { break };
            all.extend(got.into_iter().map(|(s, _)| s));
            from = last + 1;
        }
        assert_eq!(all, (1..=1000).collect::<Vec<_>>(), "reads cross segment ends");
        let live = log.live_bytes();
        assert_eq!(log.remove_through(600).unwrap(), 600);
        assert!(files() < before && log.live_bytes() < live);
        assert_eq!(log.read(1, 1).unwrap()[0].0, 601, "compacted entries are not read even if their file stays");
        assert_eq!(log.remove_through(1000).unwrap(), 400);
        assert_eq!((files(), log.live_bytes()), (1, 0), "only the active segment is left");
        let first = log.append(&payloads(1, "after")).unwrap();
        assert_eq!(first, 1001);
        log.sync_through(first).unwrap();
        drop(log);
        let mut seen = Vec::new();
        let log = SegmentLog::open(dir.path(), 4096, 1001, 1, &mut |s, _| seen.push(s)).unwrap();
        assert_eq!((log.read(1, 10).unwrap().len(), log.next_sequence()), (1, 1002));
    }

    #[test]
    fn a_torn_tail_is_cut_off_and_appends_go_on_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = open(dir.path(), 1 << 20);
        log.append(&payloads(5, "x")).unwrap();
        log.sync_through(5).unwrap();
        drop(log);
        let path = segment_path(dir.path(), 1);
        let size = std::fs::metadata(&path).unwrap().len();
        assert!(size > 5 * (HEADER as u64 + 3), "appends go into zeros written ahead");
        // The last record half written: its last bytes never reached the disk.
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        let last_end = 5 * (HEADER as u64 + 3);
        file.write_all_at(&[0xff; 2], last_end - 2).unwrap();
        drop(file);
        let (log, seen) = open(dir.path(), 1 << 20);
        assert_eq!((seen, log.next_sequence()), (vec![1, 2, 3, 4], 5));
        assert!(std::fs::metadata(&path).unwrap().len() >= size, "zeroed, not cut: the room ahead stays");
        log.append(&payloads(1, "y")).unwrap();
        log.sync_through(5).unwrap();
        assert_eq!(&log.read(5, 1).unwrap()[0].1[..], b"y-0");
        drop(log);
        // A clean reopen finds zeros after the records, not a torn tail.
        let (log, seen) = open(dir.path(), 1 << 20);
        assert_eq!((seen.len(), log.next_sequence()), (5, 6));
    }

    #[test]
    fn a_damaged_record_before_the_last_segment_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = open(dir.path(), 4096);
        for _ in 0..4 {
            let first = log.append(&payloads(100, "z")).unwrap();
            log.sync_through(first + 99).unwrap();
        }
        drop(log);
        let path = segment_path(dir.path(), 1);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER + 1] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
        let err = SegmentLog::open(dir.path(), 4096, 1, 1, &mut |_, _| {}).err().unwrap();
        assert!(err.to_string().contains("damaged"), "{err}");
    }

    #[test]
    fn the_filler_keeps_zeros_ahead_of_the_records() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = open(dir.path(), 1 << 20);
        let first = log.append(&payloads(3, "a")).unwrap();
        log.sync_through(first + 2).unwrap();
        let path = segment_path(dir.path(), 1);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        // The segment is smaller than the room kept ahead: the filler takes it to its full size.
        while lock(&log.shared.state).segments[&1].zeroed < 1 << 20 {
            assert!(std::time::Instant::now() < deadline, "the filler never filled the segment");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20);
        let first = log.append(&payloads(3, "b")).unwrap();
        log.sync_through(first + 2).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20, "appends go into the zeros, not past them");
    }

    #[test]
    fn concurrent_appenders_share_fsyncs_and_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let segment = 2 << 20;
        let (log, _) = open(dir.path(), segment);
        let log = Arc::new(log);
        // 1 KiB records through 2 MiB segments, half the requests larger than a fill step:
        // appends race the filler, wait for it, and roll, all along.
        let payloads = |n: usize, tag: &str| -> Vec<Vec<u8>> {
            payloads(n, tag)
                .into_iter()
                .map(|mut p| {
                    p.resize(1024, b'.');
                    p
                })
                .collect()
        };
        let per_request = |t: usize| if t.is_multiple_of(2) { 10 } else { 300 };
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for k in 0..20 {
                        let n = per_request(t);
                        let first = log.append(&payloads(n, &format!("{t}-{k}"))).unwrap();
                        log.sync_through(first + n as u64 - 1).unwrap();
                        assert!(log.durable() >= first + n as u64 - 1);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let total = 20 * (0..4).map(per_request).sum::<usize>() as u64;
        assert_eq!(log.durable(), total);
        drop(log);
        let mut seen = Vec::new();
        let log = SegmentLog::open(dir.path(), segment, 1, 1, &mut |s, p| seen.push((s, p.to_vec()))).unwrap();
        assert_eq!(seen.iter().map(|(s, _)| *s).collect::<Vec<_>>(), (1..=total).collect::<Vec<_>>());
        // Every request's records are there once, whole and in order.
        let mut by_request: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (_, p) in &seen {
            let text = String::from_utf8_lossy(p);
            let (request, i) = text.trim_end_matches('.').rsplit_once('-').unwrap();
            by_request.entry(request.to_owned()).or_default().push(i.parse().unwrap());
        }
        assert_eq!(by_request.len(), 80);
        for (request, records) in by_request {
            let t: usize = request.split('-').next().unwrap().parse().unwrap();
            assert_eq!(records, (0..per_request(t)).collect::<Vec<_>>(), "{request}");
        }
        assert!(lock(&log.shared.state).segments.len() > 1, "the appends crossed segments");
    }
}
