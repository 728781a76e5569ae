//! The snapshot's files: runs of `(key, value)` records in key order, each written once and
//! never changed, found through a sparse index held in memory and merged, newest first, into
//! larger runs, as an LSM tree's sorted tables are.
//!
//! A run is `CATRUN01` and then records `[key length u32][value length u32][crc32 u32][key]
//! [value]`, little-endian, the CRC over key and value.

use std::cmp::Ordering;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::pace::Pacer;

const MAGIC: &[u8; 8] = b"CATRUN01";
const HEADER: usize = 12;
/// The index holds every this many records' key: a lookup reads at most this many records
/// (under 2 KB at about 100 bytes a state), and the index of 1M states is about 3 MB.
const INDEX_EVERY: u64 = 16;
/// Writeback of a run is started after every this many bytes (as RocksDB's `bytes_per_sync`),
/// so the disk takes a run as a steady stream and the run's own fdatasync finds little left to
/// write. Left to the kernel, a merge's 100 MB went out in bursts that an fdatasync of the
/// event log waited behind.
const SYNC_EVERY: u64 = 1 << 20;
/// The bloom filter's size and probes: about 1% false positives, so a lookup reads a block of
/// the runs that hold the key and of about one in a hundred of the others (a snapshot's runs
/// each span all the ids, so without it every lookup read a block of every run).
const BLOOM_BITS_PER_KEY: u64 = 10;
const BLOOM_PROBES: u64 = 7;
/// How much one read of a run's stream takes.
const READ_AHEAD: usize = 256 * 1024;
/// No key or value comes near this: a longer length is damage, not a record.
const MAX_LEN: usize = 1 << 26;

fn crc(key: &[u8], value: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(key);
    h.update(value);
    h.finalize()
}

fn corrupt(path: &Path, at: u64, what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("snapshot file {} at byte {at}: {what}", path.display()))
}

/// One run file, open for reading.
pub(crate) struct Run {
    path: PathBuf,
    file: File,
    bytes: u64,
    records: u64,
    /// The key and offset of every [`INDEX_EVERY`]-th record.
    index: Vec<(Box<[u8]>, u64)>,
    bloom: Bloom,
}

impl Run {
    /// Opens a run written before, reading it through once: every record's checksum and the
    /// keys' order are checked here, so damage is found when the snapshot opens, not halfway
    /// through a rebuild.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        let bytes = file.metadata()?.len();
        let mut run = Self { path: path.to_owned(), file, bytes, records: 0, index: Vec::new(), bloom: Bloom::default() };
        let (mut records, mut index, mut hashes) = (0u64, Vec::new(), Vec::new());
        let mut reader = Reader::new(&run)?;
        let mut last: Option<Vec<u8>> = None;
        while let Some((at, key, _)) = reader.next_record()? {
            if last.as_ref().is_some_and(|last| key.as_slice() <= last.as_slice()) {
                return Err(corrupt(path, at, "a key out of order"));
            }
            if records.is_multiple_of(INDEX_EVERY) {
                index.push((key.clone().into(), at));
            }
            records += 1;
            hashes.push(Bloom::hash(&key));
            last = Some(key);
        }
        (run.records, run.index, run.bloom) = (records, index, Bloom::of(&hashes));
        Ok(run)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn records(&self) -> u64 {
        self.records
    }

    /// The value of `key`, if this run holds it.
    #[cfg(test)]
    pub fn get(&self, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
        self.get_in(key, &mut Block::default())
    }

    /// [`Run::get`], reading through `block`: the block of records read last, kept by the
    /// caller for the next lookup in this run, which reads nothing if its key falls in it too.
    pub fn get_in(&self, key: &[u8], block: &mut Block) -> io::Result<Option<Vec<u8>>> {
        if !self.bloom.may_hold(Bloom::hash(key)) {
            return Ok(None);
        }
        let i = self.index.partition_point(|(k, _)| k.as_ref() <= key);
        let Some(&(_, start)) = i.checked_sub(1).and_then(|i| self.index.get(i)) else { return Ok(None) };
        let end = self.index.get(i).map_or(self.bytes, |&(_, at)| at);
        if block.start != Some(start) {
            let len = usize::try_from(end - start).map_err(|_| corrupt(&self.path, start, "a block too long"))?;
            block.start = None;
            block.bytes.resize(len, 0);
            self.file.read_exact_at(&mut block.bytes, start)?;
            block.start = Some(start);
        }
        let block = &block.bytes;
        let mut at = 0;
        while at < block.len() {
            let damaged = |what| corrupt(&self.path, start + at as u64, what);
            let (k, _, len) = parse(&block[at..], false).map_err(damaged)?;
            match k.cmp(key) {
                Ordering::Less => at += len,
                Ordering::Equal => return Ok(Some(parse(&block[at..], true).map_err(damaged)?.1.to_vec())),
                Ordering::Greater => break,
            }
        }
        Ok(None)
    }
}

/// One block of a run's records (those between two keys of its index), as last read by
/// [`Run::get_in`]. Lookups in key order read each block once rather than once per key in it.
#[derive(Default)]
pub(crate) struct Block {
    /// Where `bytes` start in the run; `None` until read (or when a read failed halfway).
    start: Option<u64>,
    bytes: Vec<u8>,
}

/// One record at the start of `bytes`: its key, its value and its length. `check`: whether to
/// compare its checksum (a lookup skips that for the records it passes over: opening the run
/// checked them all).
fn parse(bytes: &[u8], check: bool) -> Result<(&[u8], &[u8], usize), &'static str> {
    let header = bytes.get(..HEADER).ok_or("a record cut short")?;
    let word = |i: usize| u32::from_le_bytes(header[i..i + 4].try_into().expect("4 bytes"));
    let (key_len, value_len, sum) = (word(0) as usize, word(4) as usize, word(8));
    if key_len > MAX_LEN || value_len > MAX_LEN {
        return Err("a record longer than any written");
    }
    let body = bytes.get(HEADER..HEADER + key_len + value_len).ok_or("a record cut short")?;
    let (key, value) = body.split_at(key_len);
    if check && crc(key, value) != sum {
        return Err("a record whose checksum does not match");
    }
    Ok((key, value, HEADER + key_len + value_len))
}

/// A record: where it starts, its key and its value.
type Record = (u64, Vec<u8>, Vec<u8>);

/// A run's records in key order, read ahead in large blocks.
pub(crate) struct Reader<R> {
    run: R,
    /// The file offset of `buf[0]`.
    at: u64,
    buf: Vec<u8>,
    pos: usize,
}

impl<R: std::ops::Deref<Target = Run>> Reader<R> {
    pub fn new(run: R) -> io::Result<Self> {
        let mut magic = [0; MAGIC.len()];
        if run.bytes < MAGIC.len() as u64 || {
            run.file.read_exact_at(&mut magic, 0)?;
            &magic != MAGIC
        } {
            return Err(corrupt(&run.path, 0, "not a snapshot file"));
        }
        Ok(Self { run, at: MAGIC.len() as u64, buf: Vec::new(), pos: 0 })
    }

    /// The next record and where it starts, or `None` at the end of the run.
    pub fn next_record(&mut self) -> io::Result<Option<Record>> {
        let offset = self.at + self.pos as u64;
        if offset >= self.run.bytes {
            return Ok(None);
        }
        loop {
            match parse(&self.buf[self.pos..], true) {
                Ok((key, value, len)) => {
                    let record = (offset, key.to_vec(), value.to_vec());
                    self.pos += len;
                    return Ok(Some(record));
                }
                Err("a record cut short") if self.at + (self.buf.len() as u64) < self.run.bytes => self.fill()?,
                Err(what) => return Err(corrupt(&self.run.path, offset, what)),
            }
        }
    }

    /// Keeps the unread part of the buffer and reads on after it.
    fn fill(&mut self) -> io::Result<()> {
        self.buf.drain(..self.pos);
        self.at += self.pos as u64;
        self.pos = 0;
        let have = self.buf.len();
        let end = self.at + have as u64;
        // At least a whole record more: a state larger than the read-ahead still fits.
        let want = READ_AHEAD.max(have * 2).min(usize::try_from(self.run.bytes - end).unwrap_or(usize::MAX));
        self.buf.resize(have + want, 0);
        self.run.file.read_exact_at(&mut self.buf[have..], end)
    }
}

/// Writes one run, in key order.
pub(crate) struct RunWriter {
    path: PathBuf,
    out: BufWriter<File>,
    written: u64,
    /// Where writeback was last started.
    started: u64,
    records: u64,
    index: Vec<(Box<[u8]>, u64)>,
    hashes: Vec<u64>,
    last: Option<Vec<u8>>,
}

impl RunWriter {
    pub fn create(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(path)?;
        let mut out = BufWriter::with_capacity(READ_AHEAD, file);
        out.write_all(MAGIC)?;
        let written = MAGIC.len() as u64;
        Ok(Self {
            path: path.to_owned(),
            out,
            written,
            started: 0,
            records: 0,
            index: Vec::new(),
            hashes: Vec::new(),
            last: None,
        })
    }

    /// Adds a record: each key must be greater than the one before.
    pub fn push(&mut self, key: &[u8], value: &[u8]) -> io::Result<()> {
        if self.last.as_deref().is_some_and(|last| key <= last) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "snapshot records must come in key order"));
        }
        let fits = |len: usize| u32::try_from(len).ok().filter(|&l| l as usize <= MAX_LEN);
        let (Some(key_len), Some(value_len)) = (fits(key.len()), fits(value.len())) else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "a snapshot record longer than 64 MiB"));
        };
        if self.records.is_multiple_of(INDEX_EVERY) {
            self.index.push((key.into(), self.written));
        }
        self.out.write_all(&key_len.to_le_bytes())?;
        self.out.write_all(&value_len.to_le_bytes())?;
        self.out.write_all(&crc(key, value).to_le_bytes())?;
        self.out.write_all(key)?;
        self.out.write_all(value)?;
        self.written += (HEADER + key.len() + value.len()) as u64;
        self.records += 1;
        self.hashes.push(Bloom::hash(key));
        self.last = Some(key.to_vec());
        if self.written - self.started >= SYNC_EVERY {
            self.out.flush()?;
            start_writeback(self.out.get_ref(), self.started, self.written - self.started);
            self.started = self.written;
        }
        Ok(())
    }

    /// Syncs the run and opens it for reading. (Its name is made durable by whoever lists it:
    /// one sync of the directory for every file a manifest names.)
    pub fn finish(self) -> io::Result<Run> {
        let file = self.out.into_inner().map_err(io::IntoInnerError::into_error)?;
        file.sync_data()?;
        let bloom = Bloom::of(&self.hashes);
        Ok(Run { path: self.path, file, bytes: self.written, records: self.records, index: self.index, bloom })
    }
}

/// A bloom filter over a run's keys, built in memory whenever the run is written or opened.
#[derive(Default)]
struct Bloom {
    bits: Vec<u64>,
}

impl Bloom {
    /// The same for the same key within a process, which is all a filter never written needs.
    fn hash(key: &[u8]) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        key.hash(&mut h);
        h.finish()
    }

    fn of(hashes: &[u64]) -> Self {
        let words = (hashes.len() as u64 * BLOOM_BITS_PER_KEY).div_ceil(64).max(1).next_power_of_two();
        let mut bloom = Self { bits: vec![0; words as usize] };
        for &h in hashes {
            for bit in bloom.probes(h) {
                bloom.bits[(bit / 64) as usize] |= 1 << (bit % 64);
            }
        }
        bloom
    }

    /// Bit positions by double hashing (Kirsch and Mitzenmacher): two halves of one hash.
    fn probes(&self, h: u64) -> impl Iterator<Item = u64> + use<> {
        let mask = self.bits.len() as u64 * 64 - 1;
        let (a, b) = (h, h.rotate_left(32) | 1);
        (0..BLOOM_PROBES).map(move |i| a.wrapping_add(i.wrapping_mul(b)) & mask)
    }

    fn may_hold(&self, h: u64) -> bool {
        self.bits.is_empty() || self.probes(h).all(|bit| self.bits[(bit / 64) as usize] & (1 << (bit % 64)) != 0)
    }
}

/// Asks the kernel to start writing a range out, without waiting for it.
fn start_writeback(file: &File, from: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: plain integers and a descriptor `file` keeps open; a failure only leaves the
        // range to the kernel's own writeback, and the run's fdatasync still covers it.
        #[allow(unsafe_code)]
        unsafe {
            libc::sync_file_range(file.as_raw_fd(), from as libc::off64_t, len as libc::off64_t, libc::SYNC_FILE_RANGE_WRITE);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, from, len);
}

/// The records of several runs in key order, each key once: from the newest run that holds it
/// (`runs` go oldest first).
pub(crate) struct Merged {
    readers: Vec<Reader<Arc<Run>>>,
    heads: Vec<Option<(Vec<u8>, Vec<u8>)>>,
    started: bool,
}

impl Merged {
    pub fn new(runs: &[Arc<Run>]) -> io::Result<Self> {
        let readers = runs.iter().map(|run| Reader::new(run.clone())).collect::<io::Result<Vec<_>>>()?;
        let heads = readers.iter().map(|_| None).collect();
        Ok(Self { readers, heads, started: false })
    }

    fn advance(&mut self, i: usize) -> io::Result<()> {
        self.heads[i] = self.readers[i].next_record()?.map(|(_, k, v)| (k, v));
        Ok(())
    }

    fn step(&mut self) -> io::Result<Option<(Vec<u8>, Vec<u8>)>> {
        if !self.started {
            self.started = true;
            for i in 0..self.readers.len() {
                self.advance(i)?;
            }
        }
        // A handful of runs: a scan for the least key is cheaper than a heap's upkeep.
        let mut least: Option<usize> = None;
        for (i, head) in self.heads.iter().enumerate() {
            let Some((key, _)) = head else { continue };
            // On a tie the later (newer) run wins.
            if least.is_none_or(|l| key.as_slice() <= self.heads[l].as_ref().expect("a head").0.as_slice()) {
                least = Some(i);
            }
        }
        let Some(winner) = least else { return Ok(None) };
        let record = self.heads[winner].take().expect("the least head");
        self.advance(winner)?;
        for i in 0..self.heads.len() {
            if self.heads[i].as_ref().is_some_and(|(k, _)| *k == record.0) {
                self.advance(i)?;
            }
        }
        Ok(Some(record))
    }
}

impl Iterator for Merged {
    type Item = io::Result<(Vec<u8>, Vec<u8>)>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.step() {
            Ok(record) => record.map(Ok),
            Err(e) => {
                // One error, then the end: the readers' places are no longer known.
                self.readers.clear();
                self.heads.clear();
                Some(Err(e))
            }
        }
    }
}

/// Writes the records of `runs` (oldest first, newest wins) as one run at `path`.
pub(crate) fn merge(runs: &[Arc<Run>], path: &Path, pace: &mut Pacer<'_>) -> io::Result<Run> {
    let mut out = RunWriter::create(path)?;
    for record in Merged::new(runs)? {
        pace.step();
        let (key, value) = record?;
        out.push(&key, &value)?;
    }
    out.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, records: &[(&str, &str)]) -> Run {
        let mut out = RunWriter::create(path).unwrap();
        for (k, v) in records {
            out.push(k.as_bytes(), v.as_bytes()).unwrap();
        }
        out.finish().unwrap()
    }

    fn all(run: Run) -> Vec<(String, String)> {
        let run = Arc::new(run);
        Merged::new(&[run])
            .unwrap()
            .map(|r| r.map(|(k, v)| (String::from_utf8(k).unwrap(), String::from_utf8(v).unwrap())).unwrap())
            .collect()
    }

    #[test]
    fn a_run_reads_back_in_order_and_finds_each_key() {
        let dir = tempfile::tempdir().unwrap();
        let keys: Vec<String> = (0..1000).map(|i| format!("P{i:05}")).collect();
        let values: Vec<String> = (0..1000).map(|i| "v".repeat(i % 700)).collect();
        let records: Vec<(&str, &str)> = keys.iter().zip(&values).map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let written = write(&dir.path().join("a.run"), &records);
        let opened = Run::open(&dir.path().join("a.run")).unwrap();
        assert_eq!((opened.records(), opened.bytes(), opened.index.len()), (1000, written.bytes(), written.index.len()));
        for (k, v) in &records {
            assert_eq!(opened.get(k.as_bytes()).unwrap().as_deref(), Some(v.as_bytes()), "{k}");
        }
        for absent in ["A", "P00000a", "P00999a", "Z"] {
            assert_eq!(opened.get(absent.as_bytes()).unwrap(), None, "{absent}");
        }
        let read = all(opened);
        assert_eq!(read.len(), 1000);
        assert!(read.iter().zip(&records).all(|((k, v), (k2, v2))| k == k2 && v == v2));
    }

    #[test]
    fn lookups_through_one_block_find_what_lookups_alone_do_in_any_order() {
        let dir = tempfile::tempdir().unwrap();
        let keys: Vec<String> = (0..200).map(|i| format!("P{:05}", i * 2)).collect();
        let records: Vec<(&str, &str)> = keys.iter().map(|k| (k.as_str(), &k[3..])).collect();
        let run = write(&dir.path().join("a.run"), &records);
        // Present and absent keys, ascending, then descending, then jumping about: the block
        // kept from the lookup before must never answer for a key outside it.
        let mut probes: Vec<String> = (0..400).map(|i| format!("P{i:05}")).collect();
        probes.extend((0..400).rev().map(|i| format!("P{i:05}")));
        probes.extend((0..400).map(|i| format!("P{:05}", (i * 37) % 400)));
        let mut block = Block::default();
        for key in &probes {
            assert_eq!(run.get_in(key.as_bytes(), &mut block).unwrap(), run.get(key.as_bytes()).unwrap(), "{key}");
        }
        assert_eq!(run.get_in(b"P00010", &mut block).unwrap().as_deref(), Some(&b"010"[..]));
    }

    #[test]
    fn the_bloom_filter_never_misses_a_key_and_rarely_admits_another() {
        let hashes: Vec<u64> = (0..10_000).map(|i| Bloom::hash(format!("P{i}").as_bytes())).collect();
        let bloom = Bloom::of(&hashes);
        assert!(hashes.iter().all(|&h| bloom.may_hold(h)));
        let admitted = (10_000..20_000).filter(|i| bloom.may_hold(Bloom::hash(format!("P{i}").as_bytes()))).count();
        assert!(admitted < 300, "{admitted} of 10,000 absent keys admitted");
        assert!(Bloom::default().may_hold(7), "an empty run's filter answers maybe");
    }

    #[test]
    fn the_newest_run_wins_a_merge_and_each_key_comes_once() {
        let dir = tempfile::tempdir().unwrap();
        let old = Arc::new(write(&dir.path().join("1.run"), &[("a", "1"), ("c", "1"), ("e", "1")]));
        let mid = Arc::new(write(&dir.path().join("2.run"), &[("b", "2"), ("c", "2")]));
        let new = Arc::new(write(&dir.path().join("3.run"), &[("c", "3"), ("f", "3")]));
        let merged = merge(&[old, mid, new], &dir.path().join("4.run"), &mut Pacer::never()).unwrap();
        let expected = [("a", "1"), ("b", "2"), ("c", "3"), ("e", "1"), ("f", "3")].map(|(k, v)| (k.to_owned(), v.to_owned()));
        assert_eq!(all(merged), expected);
        assert_eq!(all(Run::open(&dir.path().join("4.run")).unwrap()), expected);
    }

    #[test]
    fn damage_is_found_on_open_with_the_file_and_the_byte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.run");
        write(&path, &[("a", "one"), ("b", "two")]);
        let mut bytes = std::fs::read(&path).unwrap();
        *bytes.last_mut().unwrap() ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let err = Run::open(&path).err().expect("damage is an error").to_string();
        assert!(err.contains("a.run") && err.contains("checksum") && err.contains("byte 24"), "{err}");
        std::fs::write(&path, &bytes[..bytes.len() - 2]).unwrap();
        assert!(Run::open(&path).err().unwrap().to_string().contains("cut short"));
        std::fs::write(&path, b"not a run").unwrap();
        assert!(Run::open(&path).err().unwrap().to_string().contains("not a snapshot file"));
    }

    #[test]
    fn keys_out_of_order_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut out = RunWriter::create(&dir.path().join("a.run")).unwrap();
        out.push(b"b", b"").unwrap();
        assert!(out.push(b"a", b"").is_err());
        assert!(out.push(b"b", b"").is_err());
    }
}
