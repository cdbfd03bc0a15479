//! A crash-safe on-disk store-and-forward queue for QoS 1/2 MQTT results.
//!
//! Layout of the queue directory:
//! - `00000001.seg`, `00000002.seg`, ...: append-only segment files, rolled at
//!   a size. Each record is `len: u32 LE | crc32: u32 LE | body`, the CRC
//!   (IEEE, as zlib) over the body; the body is `id: u64 | appended_ms: u64 |
//!   qos: u8 | retain: u8 | topic_len: u16 | topic | payload` (all LE).
//! - `ack`: the highest id below which every record was acknowledged (or
//!   dropped), with a CRC; rewritten atomically (temporary file + rename).
//!
//! Ids grow for ever (they survive restarts through the `ack` file and the
//! records themselves), so a replay after a restart sends exactly the
//! records above the persisted ack position, in order. Acks are persisted at
//! most every [`ACK_PERSIST_EVERY`] (and on close): a crash may replay a few
//! records that were already acknowledged, never skip one (at-least-once).
//!
//! On open every segment is scanned; a record with a bad length, a bad CRC or
//! an id out of order ends that segment: the rest of it is truncated, counted
//! in `corrupt_records_skipped` and logged, never fatal.
//!
//! Bounds: the segment files never exceed `max_bytes` together; to make room
//! the oldest segment is deleted whole (its unacknowledged records counted in
//! `dropped_full`), so a segment is at most an eighth of the bound. Records
//! older than `max_age` are dropped (counted in `dropped_age`). Segments whose
//! records are all acknowledged are deleted.
//!
//! One [`Mutex`] guards the state: one or more writers and one sender. fsync
//! never runs under it (an fsync on an SD card can take tens of milliseconds):
//! the file to sync is taken under the lock and synced after it is released.

use std::collections::{BTreeSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Acks are written to the `ack` file at most this often (and on close).
pub const ACK_PERSIST_EVERY: Duration = Duration::from_millis(200);
/// Largest segment file, whatever the bound.
const MAX_SEGMENT_BYTES: u64 = 16 << 20;
/// Smallest segment file (a tiny bound still gets segments that hold a record or two).
const MIN_SEGMENT_BYTES: u64 = 1024;
/// `len` + `crc`.
const HEADER: usize = 8;
/// `id` + `appended_ms` + `qos` + `retain` + `topic_len`.
const BODY_FIXED: usize = 8 + 8 + 1 + 1 + 2;
/// Bodies above this are corrupt (the MQTT packet limit is far below).
const MAX_BODY: usize = 64 << 20;
/// Largest record id a file may hold: ids count records from 1, so a larger one is
/// corrupt (one near `u64::MAX` would overflow the next id).
const MAX_ID: u64 = 1 << 62;

/// When appended records are forced to the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// fsync after every record: a power cut loses nothing accepted.
    Always,
    /// fsync at most every so often: a power cut loses at most that much.
    Interval(Duration),
    /// Never fsync: the kernel writes back when it likes (about 30 s on Linux).
    Never,
}

impl FsyncPolicy {
    /// Parses `always`, `never`, `100ms`, `2s` or a bare number of milliseconds.
    pub fn parse(s: &str) -> Result<FsyncPolicy, String> {
        let t = s.trim();
        match t {
            "always" => return Ok(FsyncPolicy::Always),
            "never" => return Ok(FsyncPolicy::Never),
            _ => {}
        }
        let t = t.strip_prefix("interval_ms").map(|r| r.trim_start().trim_start_matches('=')).unwrap_or(t);
        let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
            (n, 1)
        } else if let Some(n) = t.strip_suffix('s') {
            (n, 1000)
        } else {
            (t, 1)
        };
        match num.trim().parse::<u64>() {
            Ok(n) if n > 0 => Ok(FsyncPolicy::Interval(Duration::from_millis(n * scale))),
            _ => Err(format!("`{s}`: expected \"always\", \"never\" or an interval like \"100ms\"")),
        }
    }
}

/// `queue_fsync` in a config: parsed once, at load.
impl<'de> serde::Deserialize<'de> for FsyncPolicy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        FsyncPolicy::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Bounds and durability of a queue.
#[derive(Debug, Clone)]
pub struct QueueOptions {
    /// The segment files together never exceed this.
    pub max_bytes: u64,
    /// Records older than this are dropped.
    pub max_age: Duration,
    /// When appended records are forced to the disk.
    pub fsync: FsyncPolicy,
}

/// Opens the queue `[mqtt] queue_dir` asks for (`resolve` makes it relative to the
/// config file); None when unset.
pub fn from_config(
    mqtt: &super::config::MqttConfig,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<Option<std::sync::Arc<DiskQueue>>, QueueError> {
    let Some(dir) = &mqtt.queue_dir else { return Ok(None) };
    let dir = resolve(dir);
    let fsync = mqtt.queue_fsync;
    let opts =
        QueueOptions { max_bytes: mqtt.queue_max_bytes, max_age: Duration::from_secs(mqtt.queue_max_age_s), fsync };
    let queue = DiskQueue::open(&dir, opts)?;
    let s = queue.stats();
    log::info!(
        "MQTT: disk queue {} ({} records, {} bytes waiting; fsync {fsync:?})",
        dir.display(),
        s.records,
        s.bytes
    );
    Ok(Some(std::sync::Arc::new(queue)))
}

/// A record as stored and sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Topic.
    pub topic: String,
    /// QoS 1 or 2.
    pub qos: u8,
    /// Retain flag.
    pub retain: bool,
    /// The bytes to publish (a result is rendered when it is accepted).
    pub payload: Vec<u8>,
}

/// A record read back, with its id (to acknowledge it).
#[derive(Debug, Clone)]
pub struct Stored {
    /// Id, increasing in append order.
    pub id: u64,
    /// The record.
    pub record: Record,
    /// Wall-clock time it was appended (ms since the epoch).
    pub appended_ms: u64,
}

impl Stored {
    /// How long ago it was appended; zero when the clock at append time or now cannot be
    /// trusted (a board without a real-time clock before NTP sets it).
    pub fn age(&self) -> Duration {
        let now = now_ms();
        if now < SANE_CLOCK_MS || self.appended_ms < SANE_CLOCK_MS || self.appended_ms > now {
            return Duration::ZERO;
        }
        Duration::from_millis(now - self.appended_ms)
    }
}

/// The figures of a queue (the health `mqtt.disk_queue` section).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Records waiting for an acknowledgement.
    pub records: u64,
    /// Bytes of the segment files.
    pub bytes: u64,
    /// Records dropped to stay within `max_bytes`.
    pub dropped_full: u64,
    /// Records dropped because they were older than `max_age`.
    pub dropped_age: u64,
    /// Corrupt spots found on open (each ends its segment: the rest is truncated).
    pub corrupt_records_skipped: u64,
}

/// Why a queue could not be opened or a record stored.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// A file operation failed.
    #[error("disk queue {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// The record can never fit the bound.
    #[error("record of {0} bytes is larger than the disk queue bound")]
    TooLarge(usize),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> QueueError + '_ {
    move |source| QueueError::Io { path: path.to_path_buf(), source }
}

/// Where a waiting record is.
#[derive(Debug, Clone, Copy)]
struct Entry {
    id: u64,
    segment: u32,
    offset: u64,
    len: u32,
    appended_ms: u64,
}

#[derive(Debug)]
struct Segment {
    no: u32,
    bytes: u64,
    /// Highest id in it (0: none).
    last_id: u64,
}

struct Inner {
    dir: PathBuf,
    opts: QueueOptions,
    segment_max: u64,
    segments: VecDeque<Segment>,
    /// The last segment, open for appending (shared so it can be synced outside the lock).
    active: Option<Arc<File>>,
    /// Records above the ack position, in id order (some may be acked out of order).
    entries: VecDeque<Entry>,
    /// Ids above `acked` acknowledged out of order.
    acked_ahead: BTreeSet<u64>,
    /// Every id up to this one is acknowledged or dropped.
    acked: u64,
    persisted_ack: u64,
    last_ack_write: Instant,
    next_id: u64,
    unsynced: bool,
    last_sync: Instant,
    stats: QueueStats,
}

/// The queue; share it with an `Arc`.
pub struct DiskQueue {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for DiskQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskQueue").field("stats", &self.stats()).finish()
    }
}

/// 2025-01-01T00:00:00Z: wall-clock times before it come from an unset clock.
const SANE_CLOCK_MS: u64 = 1_735_689_600_000;

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Syncs a segment taken by `take_due_sync`.
fn sync(file: Option<Arc<File>>) {
    if let Some(f) = file {
        if let Err(e) = f.sync_data() {
            log::warn!("disk queue: fsync failed: {e}");
        }
    }
}

fn segment_name(no: u32) -> String {
    format!("{no:08}.seg")
}

impl DiskQueue {
    /// Opens (creating it if needed) the queue in `dir`, recovering from a
    /// truncated or garbled tail.
    pub fn open(dir: &Path, opts: QueueOptions) -> Result<DiskQueue, QueueError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let acked = read_ack(&dir.join("ack"));
        let mut numbers: Vec<u32> = fs::read_dir(dir)
            .map_err(io_err(dir))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_suffix(".seg")?.parse::<u32>().ok()
            })
            .collect();
        numbers.sort_unstable();
        let segment_max = (opts.max_bytes / 8).clamp(MIN_SEGMENT_BYTES, MAX_SEGMENT_BYTES);
        let mut inner = Inner {
            dir: dir.to_path_buf(),
            opts,
            segment_max,
            segments: VecDeque::new(),
            active: None,
            entries: VecDeque::new(),
            acked_ahead: BTreeSet::new(),
            acked,
            persisted_ack: acked,
            last_ack_write: Instant::now(),
            next_id: acked + 1,
            unsynced: false,
            last_sync: Instant::now(),
            stats: QueueStats::default(),
        };
        for no in numbers {
            inner.recover_segment(no)?;
        }
        inner.collect_garbage();
        inner.expire();
        inner.refresh_stats();
        Ok(DiskQueue { inner: Mutex::new(inner) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent-enough state: the
        // files are the truth and the next open rescans them.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores a record (durably, as the fsync policy says); returns its id.
    pub fn append(&self, record: &Record) -> Result<u64, QueueError> {
        let (id, due) = {
            let mut inner = self.lock();
            let id = inner.append(record)?;
            (id, inner.take_due_sync(false))
        };
        sync(due);
        Ok(id)
    }

    /// Up to `max` waiting records with an id above `after`, in order.
    pub fn read_after(&self, after: u64, max: usize) -> Vec<Stored> {
        self.lock().read_after(after, max)
    }

    /// Marks a record acknowledged by the broker.
    pub fn ack(&self, id: u64) {
        self.lock().ack(id)
    }

    /// Periodic work: drops records past their age, persists acks, fsyncs an
    /// `interval` policy's pending writes. Call it every ~100 ms.
    pub fn maintain(&self) {
        let due = {
            let mut inner = self.lock();
            inner.expire();
            let due = inner.take_due_sync(true);
            if inner.acked != inner.persisted_ack && inner.last_ack_write.elapsed() >= ACK_PERSIST_EVERY {
                inner.persist_ack();
            }
            inner.refresh_stats();
            due
        };
        sync(due);
    }

    /// Forces pending writes and the ack position to the disk (at shutdown).
    pub fn close(&self) {
        let mut inner = self.lock();
        if let Some(f) = &inner.active {
            let _ = f.sync_data();
        }
        inner.unsynced = false;
        inner.persist_ack();
    }

    /// Records waiting for an acknowledgement.
    pub fn pending(&self) -> u64 {
        self.lock().stats.records
    }

    /// The current figures.
    pub fn stats(&self) -> QueueStats {
        self.lock().stats
    }

    /// The figures as the health message shows them.
    pub fn health(&self) -> serde_json::Value {
        let s = self.stats();
        serde_json::json!({
            "records": s.records,
            "bytes": s.bytes,
            "dropped_full": s.dropped_full,
            "dropped_age": s.dropped_age,
            "corrupt_records_skipped": s.corrupt_records_skipped,
        })
    }
}

impl crate::metrics::HealthSection for DiskQueue {
    fn health(&self) -> serde_json::Value {
        DiskQueue::health(self)
    }
}

impl Inner {
    fn seg_path(&self, no: u32) -> PathBuf {
        self.dir.join(segment_name(no))
    }

    /// Reads a segment's records into the index, truncating it at the first bad one.
    fn recover_segment(&mut self, no: u32) -> Result<(), QueueError> {
        let path = self.seg_path(no);
        let mut data = Vec::new();
        File::open(&path).and_then(|mut f| f.read_to_end(&mut data)).map_err(io_err(&path))?;
        let mut pos = 0usize;
        let mut last_id = self.segments.iter().map(|s| s.last_id).max().unwrap_or(0);
        let mut seg_last = 0;
        let mut bad: Option<String> = None;
        while pos < data.len() {
            match parse_record(&data[pos..]) {
                Ok((len, id, appended_ms, _)) if id > last_id && id <= MAX_ID => {
                    if id > self.acked {
                        let entry = Entry { id, segment: no, offset: pos as u64, len: len as u32, appended_ms };
                        self.entries.push_back(entry);
                    }
                    last_id = id;
                    seg_last = id;
                    pos += len;
                }
                Ok((_, id, _, _)) if id > MAX_ID => {
                    bad = Some(format!("record id {id} out of range"));
                    break;
                }
                Ok((_, id, _, _)) => {
                    bad = Some(format!("record id {id} out of order (after {last_id})"));
                    break;
                }
                Err(why) => {
                    bad = Some(why);
                    break;
                }
            }
        }
        if let Some(why) = bad {
            self.stats.corrupt_records_skipped += 1;
            log::warn!(
                "disk queue: {}: {why} at byte {pos}; the last {} bytes of the segment are skipped",
                path.display(),
                data.len() - pos
            );
            let f = OpenOptions::new().write(true).open(&path).map_err(io_err(&path))?;
            f.set_len(pos as u64).map_err(io_err(&path))?;
            f.sync_all().map_err(io_err(&path))?;
        }
        self.next_id = self.next_id.max(last_id + 1);
        self.segments.push_back(Segment { no, bytes: pos as u64, last_id: seg_last });
        Ok(())
    }

    fn total_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    fn append(&mut self, record: &Record) -> Result<u64, QueueError> {
        let id = self.next_id;
        let appended_ms = now_ms();
        let buf = encode(id, appended_ms, record);
        let len = buf.len() as u64;
        if len > self.opts.max_bytes || len > MAX_BODY as u64 {
            return Err(QueueError::TooLarge(buf.len()));
        }
        self.expire();
        let active_full = match self.segments.back() {
            Some(s) => self.active.is_none() || s.bytes + len > self.segment_max,
            None => true,
        };
        if active_full {
            self.roll()?;
        }
        // Room: whole oldest segments go (never the active one, which is last).
        while self.total_bytes() + len > self.opts.max_bytes && self.segments.len() > 1 {
            self.drop_oldest_segment();
        }
        let Some(seg) = self.segments.back() else { return Err(QueueError::TooLarge(buf.len())) };
        let (no, offset) = (seg.no, seg.bytes);
        let path = self.seg_path(no);
        let Some(file) = self.active.as_deref() else { return Err(QueueError::TooLarge(buf.len())) };
        let mut file: &File = file;
        if let Err(e) = file.write_all(&buf) {
            // A partial write would be a corrupt record mid-segment: cut it off.
            let _ = file.set_len(offset);
            return Err(QueueError::Io { path, source: e });
        }
        if let Some(seg) = self.segments.back_mut() {
            seg.bytes += len;
            seg.last_id = id;
        }
        self.next_id += 1;
        self.entries.push_back(Entry { id, segment: no, offset, len: len as u32, appended_ms });
        self.unsynced = true;
        self.refresh_stats();
        Ok(id)
    }

    /// Starts a new segment after the last one.
    fn roll(&mut self) -> Result<(), QueueError> {
        if let Some(f) = self.active.take() {
            if self.opts.fsync != FsyncPolicy::Never && self.unsynced {
                let _ = f.sync_data();
            }
        }
        let no = self.segments.back().map(|s| s.no + 1).unwrap_or(1);
        let path = self.seg_path(no);
        let file = OpenOptions::new().create(true).append(true).open(&path).map_err(io_err(&path))?;
        // The segment may already exist when an earlier one was deleted: start it afresh.
        file.set_len(0).map_err(io_err(&path))?;
        if self.opts.fsync != FsyncPolicy::Never {
            if let Ok(d) = File::open(&self.dir) {
                let _ = d.sync_all();
            }
        }
        self.segments.push_back(Segment { no, bytes: 0, last_id: 0 });
        self.active = Some(Arc::new(file));
        self.collect_garbage();
        Ok(())
    }

    /// The active segment when the fsync policy says it is due now, to sync after the lock is
    /// released (a write that lands in between is synced with it).
    fn take_due_sync(&mut self, periodic: bool) -> Option<Arc<File>> {
        if !self.unsynced {
            return None;
        }
        let due = match self.opts.fsync {
            FsyncPolicy::Always => true,
            FsyncPolicy::Interval(every) => self.last_sync.elapsed() >= every || (periodic && every.is_zero()),
            FsyncPolicy::Never => false,
        };
        if !due {
            return None;
        }
        self.unsynced = false;
        self.last_sync = Instant::now();
        self.active.clone()
    }

    fn drop_oldest_segment(&mut self) {
        let Some(seg) = self.segments.pop_front() else { return };
        let mut dropped = 0;
        while self.entries.front().is_some_and(|e| e.segment == seg.no) {
            if let Some(e) = self.entries.pop_front() {
                if !self.acked_ahead.remove(&e.id) {
                    dropped += 1;
                }
            }
        }
        self.acked = self.acked.max(seg.last_id);
        self.acked_ahead = self.acked_ahead.split_off(&(self.acked + 1));
        if dropped > 0 {
            let before = self.stats.dropped_full;
            self.stats.dropped_full += dropped;
            if (before + dropped).next_power_of_two() != before.next_power_of_two() || before == 0 {
                log::warn!(
                    "disk queue full ({} bytes): {dropped} oldest records dropped ({} so far)",
                    self.opts.max_bytes,
                    self.stats.dropped_full
                );
            }
        }
        let _ = fs::remove_file(self.seg_path(seg.no));
        self.advance();
    }

    /// Drops waiting records older than the age bound.
    fn expire(&mut self) {
        let now = now_ms();
        // A board without a real-time clock stores results with a 1970 (or stale
        // fake-hwclock) time until NTP steps the clock forward: such records, and
        // records dated in the future, have no trustworthy age and are left to the
        // byte bound rather than all expiring at once.
        if now < SANE_CLOCK_MS {
            return;
        }
        let limit = now.saturating_sub(self.opts.max_age.as_millis() as u64);
        let mut dropped = 0;
        while let Some(e) = self.entries.front().copied() {
            let trusted = e.appended_ms >= SANE_CLOCK_MS && e.appended_ms <= now;
            if !trusted || e.appended_ms >= limit {
                break;
            }
            self.entries.pop_front();
            if !self.acked_ahead.remove(&e.id) {
                dropped += 1;
            }
            self.acked = self.acked.max(e.id);
        }
        if dropped > 0 {
            self.stats.dropped_age += dropped;
            log::warn!("disk queue: {dropped} records older than {:?} dropped", self.opts.max_age);
            self.advance();
        }
    }

    fn read_after(&mut self, after: u64, max: usize) -> Vec<Stored> {
        let mut out = Vec::new();
        let mut file: Option<(u32, File)> = None;
        let start = self.entries.partition_point(|e| e.id <= after);
        let wanted: Vec<Entry> =
            self.entries.iter().skip(start).filter(|e| !self.acked_ahead.contains(&e.id)).take(max).copied().collect();
        // A record that cannot be read (its segment deleted by hand, EIO on the card) is
        // skipped and counted: left in place it would block every record behind it.
        let unreadable = |inner: &mut Self, e: &Entry, why: String| {
            if inner.stats.corrupt_records_skipped.is_power_of_two() || inner.stats.corrupt_records_skipped == 0 {
                log::warn!("disk queue: record {} cannot be read ({why}); skipped", e.id);
            }
            inner.stats.corrupt_records_skipped += 1;
            inner.acked_ahead.insert(e.id);
        };
        for e in wanted {
            if file.as_ref().map(|(n, _)| *n) != Some(e.segment) {
                match File::open(self.seg_path(e.segment)) {
                    Ok(f) => file = Some((e.segment, f)),
                    Err(err) => {
                        file = None;
                        unreadable(self, &e, format!("segment {}: {err}", segment_name(e.segment)));
                        continue;
                    }
                }
            }
            let Some((_, f)) = &file else { continue };
            let mut buf = vec![0u8; e.len as usize];
            if let Err(err) = f.read_exact_at(&mut buf, e.offset) {
                unreadable(self, &e, err.to_string());
                continue;
            }
            match parse_record(&buf) {
                Ok((_, id, appended_ms, record)) if id == e.id => out.push(Stored { id, record, appended_ms }),
                _ => {
                    // Changed under us (someone edited the file): skip it rather than send garbage.
                    log::warn!("disk queue: record {} no longer reads back; skipped", e.id);
                    self.stats.corrupt_records_skipped += 1;
                    self.acked_ahead.insert(e.id);
                }
            }
        }
        out
    }

    fn ack(&mut self, id: u64) {
        if id <= self.acked {
            return;
        }
        self.acked_ahead.insert(id);
        self.advance();
        self.refresh_stats();
    }

    /// Moves the ack position over contiguous acknowledged ids and deletes finished segments.
    fn advance(&mut self) {
        while let Some(e) = self.entries.front().copied() {
            if e.id <= self.acked {
                self.entries.pop_front();
            } else if self.acked_ahead.remove(&e.id) {
                self.acked = e.id;
                self.entries.pop_front();
            } else {
                break;
            }
        }
        if self.entries.is_empty() {
            // Nothing waits: every id handed out so far is done.
            self.acked = self.acked.max(self.next_id - 1);
            self.acked_ahead.clear();
        }
        self.collect_garbage();
    }

    /// Deletes segments (not the active one) whose records are all acknowledged.
    fn collect_garbage(&mut self) {
        let active = if self.active.is_some() { self.segments.back().map(|s| s.no) } else { None };
        let mut removed = false;
        while let Some(seg) = self.segments.front() {
            if Some(seg.no) == active || seg.last_id > self.acked {
                break;
            }
            let no = seg.no;
            self.segments.pop_front();
            let _ = fs::remove_file(self.seg_path(no));
            removed = true;
        }
        if removed {
            // The ack position must be on disk before a replay could miss the deleted records' ids.
            self.persist_ack();
        }
    }

    fn persist_ack(&mut self) {
        if self.acked == self.persisted_ack {
            return;
        }
        let path = self.dir.join("ack");
        let tmp = self.dir.join("ack.tmp");
        let mut buf = self.acked.to_le_bytes().to_vec();
        buf.extend_from_slice(&crc32(&buf).to_le_bytes());
        let res = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(&buf)?;
            if self.opts.fsync != FsyncPolicy::Never {
                f.sync_data()?;
            }
            fs::rename(&tmp, &path)
        })();
        match res {
            Ok(()) => self.persisted_ack = self.acked,
            Err(e) => log::warn!("disk queue: cannot write {}: {e}", path.display()),
        }
        self.last_ack_write = Instant::now();
    }

    fn refresh_stats(&mut self) {
        self.stats.records = self.entries.len().saturating_sub(self.acked_ahead.len()) as u64;
        self.stats.bytes = self.total_bytes();
    }
}

/// The persisted ack position; 0 (replay everything) when missing or unreadable.
fn read_ack(path: &Path) -> u64 {
    let Ok(data) = fs::read(path) else { return 0 };
    if data.len() == 12 {
        let (v, c) = data.split_at(8);
        if crc32(v).to_le_bytes() == c {
            let mut b = [0u8; 8];
            b.copy_from_slice(v);
            let id = u64::from_le_bytes(b);
            if id <= MAX_ID {
                return id;
            }
        }
    }
    log::warn!("disk queue: {} is corrupt; every stored record will be replayed", path.display());
    0
}

fn encode(id: u64, appended_ms: u64, r: &Record) -> Vec<u8> {
    let topic = r.topic.as_bytes();
    let topic_len = topic.len().min(u16::MAX as usize);
    let body_len = BODY_FIXED + topic_len + r.payload.len();
    let mut buf = Vec::with_capacity(HEADER + body_len);
    buf.extend_from_slice(&(body_len as u32).to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&id.to_le_bytes());
    buf.extend_from_slice(&appended_ms.to_le_bytes());
    buf.push(r.qos);
    buf.push(r.retain as u8);
    buf.extend_from_slice(&(topic_len as u16).to_le_bytes());
    buf.extend_from_slice(&topic[..topic_len]);
    buf.extend_from_slice(&r.payload);
    let crc = crc32(&buf[HEADER..]);
    buf[4..8].copy_from_slice(&crc.to_le_bytes());
    buf
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    (u32_at(b, at) as u64) | ((u32_at(b, at + 4) as u64) << 32)
}

/// One record from the start of `b`: (bytes used, id, appended_ms, record).
fn parse_record(b: &[u8]) -> Result<(usize, u64, u64, Record), String> {
    if b.len() < HEADER {
        return Err(format!("truncated header ({} bytes)", b.len()));
    }
    let body_len = u32_at(b, 0) as usize;
    if !(BODY_FIXED..=MAX_BODY).contains(&body_len) {
        return Err(format!("bad record length {body_len}"));
    }
    if b.len() < HEADER + body_len {
        return Err(format!("truncated record ({} of {} bytes)", b.len() - HEADER, body_len));
    }
    let body = &b[HEADER..HEADER + body_len];
    if crc32(body) != u32_at(b, 4) {
        return Err("CRC mismatch".into());
    }
    let id = u64_at(body, 0);
    let appended_ms = u64_at(body, 8);
    let qos = body[16];
    let retain = body[17] != 0;
    let topic_len = u16_at(body, 18) as usize;
    if BODY_FIXED + topic_len > body_len {
        return Err("topic longer than the record".into());
    }
    let topic = std::str::from_utf8(&body[BODY_FIXED..BODY_FIXED + topic_len])
        .map_err(|_| "topic is not UTF-8".to_string())?
        .to_string();
    let payload = body[BODY_FIXED + topic_len..].to_vec();
    Ok((HEADER + body_len, id, appended_ms, Record { topic, qos, retain, payload }))
}

/// CRC-32 (IEEE 802.3, as zlib and gzip) of `data`: the checksum of every record and of the
/// `ack` file, so files written by any version read back.
pub fn crc32(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(max_bytes: u64, fsync: FsyncPolicy) -> QueueOptions {
        QueueOptions { max_bytes, max_age: Duration::from_secs(3600), fsync }
    }

    fn rec(i: u32) -> Record {
        Record {
            topic: format!("edgeinfer/t/p{}/result", i % 3),
            qos: 1 + (i % 2) as u8,
            retain: i.is_multiple_of(5),
            payload: format!("{{\"seq\":{i}}}").into_bytes(),
        }
    }

    fn payloads(q: &DiskQueue) -> Vec<String> {
        q.read_after(0, usize::MAX).into_iter().map(|s| String::from_utf8(s.record.payload).unwrap()).collect()
    }

    fn segs(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "seg"))
            .collect();
        v.sort();
        v
    }

    fn count_records(mut data: &[u8]) -> usize {
        let mut n = 0;
        while let Ok((len, ..)) = parse_record(data) {
            data = &data[len..];
            n += 1;
        }
        n
    }

    #[test]
    fn crc_matches_the_standard_check_value() {
        // The CRC-32 check value, and a record checksum as the hand-written table gave it
        // before crc32fast: queue files written then still read.
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b"edgeinfer/dev/results"), 0x49A0_07AE); // Python: zlib.crc32(...)
                                                                  // Long enough for crc32fast's SIMD path.
        let kib: Vec<u8> = (0..1024).map(|i| i as u8).collect();
        assert_eq!(crc32(&kib), 0xB70B_4C26);
    }

    #[test]
    fn fsync_policies_parse() {
        assert_eq!(FsyncPolicy::parse("always"), Ok(FsyncPolicy::Always));
        assert_eq!(FsyncPolicy::parse("never"), Ok(FsyncPolicy::Never));
        assert_eq!(FsyncPolicy::parse("100ms"), Ok(FsyncPolicy::Interval(Duration::from_millis(100))));
        assert_eq!(FsyncPolicy::parse("2s"), Ok(FsyncPolicy::Interval(Duration::from_secs(2))));
        assert_eq!(FsyncPolicy::parse("250"), Ok(FsyncPolicy::Interval(Duration::from_millis(250))));
        assert_eq!(FsyncPolicy::parse("interval_ms = 50"), Ok(FsyncPolicy::Interval(Duration::from_millis(50))));
        assert!(FsyncPolicy::parse("sometimes").is_err());
        assert!(FsyncPolicy::parse("0ms").is_err());
    }

    #[test]
    fn append_ack_and_replay_across_reopen_in_every_fsync_mode() {
        for fsync in [FsyncPolicy::Always, FsyncPolicy::Interval(Duration::from_millis(50)), FsyncPolicy::Never] {
            let dir = tempfile::tempdir().unwrap();
            let q = DiskQueue::open(dir.path(), opts(1 << 20, fsync)).unwrap();
            let ids: Vec<u64> = (0..10).map(|i| q.append(&rec(i)).unwrap()).collect();
            assert!(ids.windows(2).all(|w| w[1] == w[0] + 1));
            let got = q.read_after(0, 100);
            assert_eq!(got.len(), 10);
            assert_eq!(got[3].record, rec(3));
            // Acks out of order: 0..3 and 5.
            for id in [ids[1], ids[0], ids[2], ids[5]] {
                q.ack(id);
            }
            assert_eq!(q.stats().records, 6);
            q.close();
            drop(q);
            let q = DiskQueue::open(dir.path(), opts(1 << 20, fsync)).unwrap();
            // id 5 was acked beyond the contiguous position: it may come back (at-least-once), 0..2 never.
            let want: Vec<String> = [3, 4, 5, 6, 7, 8, 9].iter().map(|i| format!("{{\"seq\":{i}}}")).collect();
            assert_eq!(payloads(&q), want, "{fsync:?}");
            let next = q.append(&rec(10)).unwrap();
            assert!(next > ids[9], "ids keep growing across reopen");
            let after = q.read_after(ids[8], 10);
            assert_eq!(after.iter().map(|s| s.id).collect::<Vec<_>>(), vec![ids[9], next]);
        }
    }

    #[test]
    fn segments_roll_and_fully_acked_ones_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let q = DiskQueue::open(dir.path(), opts(16 * 1024, FsyncPolicy::Never)).unwrap();
        let ids: Vec<u64> = (0..100).map(|i| q.append(&rec(i)).unwrap()).collect();
        let n = segs(dir.path()).len();
        assert!(n >= 3, "{n} segments for ~5 KiB at 2 KiB per segment");
        for id in &ids[..50] {
            q.ack(*id);
        }
        let m = segs(dir.path()).len();
        assert!(m < n, "acked segments deleted: {n} -> {m}");
        for id in &ids[50..] {
            q.ack(*id);
        }
        assert_eq!(segs(dir.path()).len(), 1, "only the active segment is left");
        assert_eq!(q.stats().records, 0);
        q.close();
        drop(q);
        let q = DiskQueue::open(dir.path(), opts(16 * 1024, FsyncPolicy::Never)).unwrap();
        assert!(payloads(&q).is_empty());
        assert!(q.append(&rec(1)).unwrap() > ids[99]);
    }

    #[test]
    fn an_unreadable_segment_is_skipped_and_does_not_block_the_records_behind_it() {
        let dir = tempfile::tempdir().unwrap();
        let q = DiskQueue::open(dir.path(), opts(16 * 1024, FsyncPolicy::Never)).unwrap();
        for i in 0..100 {
            q.append(&rec(i)).unwrap();
        }
        let all = payloads(&q);
        let files = segs(dir.path());
        assert!(files.len() >= 3, "{files:?}");
        // Someone deletes the oldest segment by hand while its records wait.
        fs::remove_file(&files[0]).unwrap();
        let left = payloads(&q);
        assert!(!left.is_empty() && left.len() < all.len(), "{} of {}", left.len(), all.len());
        assert_eq!(left.last(), all.last(), "the newest records still come");
        assert_eq!(q.stats().corrupt_records_skipped as usize, all.len() - left.len());
    }

    #[test]
    fn a_truncated_tail_at_every_byte_is_cut_off_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let q = DiskQueue::open(dir.path(), opts(1 << 20, FsyncPolicy::Always)).unwrap();
        for i in 0..5 {
            q.append(&rec(i)).unwrap();
        }
        drop(q);
        let seg = segs(dir.path()).pop().unwrap();
        let full = fs::read(&seg).unwrap();
        let last_len = encode(0, 0, &rec(4)).len();
        let start = full.len() - last_len;
        for cut in start..full.len() {
            let d = tempfile::tempdir().unwrap();
            fs::write(d.path().join("00000001.seg"), &full[..cut]).unwrap();
            let q = DiskQueue::open(d.path(), opts(1 << 20, FsyncPolicy::Always)).unwrap();
            let got = payloads(&q);
            assert_eq!(got.len(), 4, "cut at {cut}");
            let want = if cut == start { 0 } else { 1 };
            assert_eq!(q.stats().corrupt_records_skipped, want, "cut at {cut}");
            // New records go after the intact ones and read back.
            q.append(&rec(9)).unwrap();
            drop(q);
            let q = DiskQueue::open(d.path(), opts(1 << 20, FsyncPolicy::Always)).unwrap();
            assert_eq!(payloads(&q).len(), 5, "cut at {cut}");
            assert_eq!(q.stats().corrupt_records_skipped, 0, "the tail was truncated for good");
        }
    }

    #[test]
    fn a_garbled_record_mid_segment_ends_that_segment_only() {
        let dir = tempfile::tempdir().unwrap();
        let q = DiskQueue::open(dir.path(), opts(16 * 1024, FsyncPolicy::Never)).unwrap();
        for i in 0..60 {
            q.append(&rec(i)).unwrap();
        }
        drop(q);
        let all = segs(dir.path());
        assert!(all.len() >= 2);
        let first = &all[0];
        let mut data = fs::read(first).unwrap();
        let per_seg = count_records(&data);
        let one = encode(0, 0, &rec(0)).len();
        // Flip a payload byte of the third record.
        data[2 * one + HEADER + BODY_FIXED + 5] ^= 0x55;
        fs::write(first, &data).unwrap();
        let q = DiskQueue::open(dir.path(), opts(16 * 1024, FsyncPolicy::Never)).unwrap();
        assert_eq!(q.stats().corrupt_records_skipped, 1);
        let got = payloads(&q);
        assert_eq!(&got[..2], &["{\"seq\":0}".to_string(), "{\"seq\":1}".to_string()]);
        assert_eq!(got.len(), 60 - (per_seg - 2), "the rest of segment 1 is lost, later segments kept");
        assert_eq!(got.last().unwrap(), "{\"seq\":59}");
    }

    #[test]
    fn a_length_field_over_the_record_limit_is_corrupt_not_an_allocation() {
        let dir = tempfile::tempdir().unwrap();
        let q = DiskQueue::open(dir.path(), opts(16 * 1024, FsyncPolicy::Never)).unwrap();
        for i in 0..3 {
            q.append(&rec(i)).unwrap();
        }
        drop(q);
        let seg = &segs(dir.path())[0];
        let one = encode(0, 0, &rec(0)).len();
        // The third record says it is 4 GiB long, then just past MAX_BODY (the segment
        // is cut at the bad record when it is opened, so the record is written again).
        for len in [u32::MAX, MAX_BODY as u32 + 1] {
            let mut data = fs::read(seg).unwrap();
            data.resize(3 * one, 0);
            data[2 * one..2 * one + 4].copy_from_slice(&len.to_le_bytes());
            fs::write(seg, &data).unwrap();
            assert!(parse_record(&data[2 * one..]).unwrap_err().contains("bad record length"));
            let q = DiskQueue::open(dir.path(), opts(16 * 1024, FsyncPolicy::Never)).unwrap();
            assert_eq!(q.stats().corrupt_records_skipped, 1);
            assert_eq!(payloads(&q), ["{\"seq\":0}", "{\"seq\":1}"]);
        }
    }

    #[test]
    fn the_byte_bound_drops_the_oldest_and_counts_them() {
        let dir = tempfile::tempdir().unwrap();
        let max = 8 * 1024;
        let q = DiskQueue::open(dir.path(), opts(max, FsyncPolicy::Never)).unwrap();
        for i in 0..1000 {
            q.append(&rec(i)).unwrap();
            let on_disk: u64 = segs(dir.path()).iter().map(|p| fs::metadata(p).unwrap().len()).sum();
            assert!(on_disk <= max, "{on_disk} bytes on disk after record {i}");
        }
        let s = q.stats();
        let got = payloads(&q);
        assert_eq!(s.records as usize, got.len());
        assert_eq!(s.dropped_full + s.records, 1000, "{s:?}");
        assert_eq!(got.last().unwrap(), "{\"seq\":999}", "the newest are kept");
        let first: u32 = got[0].trim_start_matches("{\"seq\":").trim_end_matches('}').parse().unwrap();
        assert_eq!(first as u64, s.dropped_full, "exactly the oldest were dropped");
        let big = Record { topic: "t".into(), qos: 1, retain: false, payload: vec![0; max as usize] };
        assert!(matches!(q.append(&big), Err(QueueError::TooLarge(_))));
    }

    #[test]
    fn the_age_bound_drops_old_records_and_counts_them() {
        let dir = tempfile::tempdir().unwrap();
        let o = QueueOptions { max_bytes: 1 << 20, max_age: Duration::from_millis(300), fsync: FsyncPolicy::Never };
        let q = DiskQueue::open(dir.path(), o.clone()).unwrap();
        for i in 0..5 {
            q.append(&rec(i)).unwrap();
        }
        std::thread::sleep(Duration::from_millis(400));
        q.append(&rec(5)).unwrap();
        q.maintain();
        assert_eq!(q.stats().dropped_age, 5);
        assert_eq!(payloads(&q), vec!["{\"seq\":5}".to_string()]);
        q.close();
        drop(q);
        std::thread::sleep(Duration::from_millis(400));
        let q = DiskQueue::open(dir.path(), o).unwrap();
        assert_eq!(q.stats().dropped_age, 1, "expired while the daemon was down");
        assert!(payloads(&q).is_empty());
    }

    #[test]
    fn a_corrupt_ack_file_replays_everything() {
        let dir = tempfile::tempdir().unwrap();
        let q = DiskQueue::open(dir.path(), opts(1 << 20, FsyncPolicy::Never)).unwrap();
        let a = q.append(&rec(0)).unwrap();
        q.append(&rec(1)).unwrap();
        q.ack(a);
        q.close();
        drop(q);
        fs::write(dir.path().join("ack"), b"garbage").unwrap();
        let q = DiskQueue::open(dir.path(), opts(1 << 20, FsyncPolicy::Never)).unwrap();
        assert_eq!(payloads(&q).len(), 2);
    }

    #[test]
    fn config_keys_are_checked_and_the_dir_resolves_against_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let with = |mqtt: &str| -> Result<crate::sink::config::MqttConfig, String> {
            let m: crate::sink::config::MqttConfig =
                toml::from_str(&format!("url = \"mqtt://127.0.0.1\"\n{mqtt}")).map_err(|e| e.to_string())?;
            m.validate().map(|_| m).map_err(|(key, reason)| format!("{key}: {reason}"))
        };
        let resolve = |p: &Path| dir.path().join(p);
        let m = with("").unwrap();
        assert!(from_config(&m, &resolve).unwrap().is_none(), "absent queue_dir: memory only");
        let m = with("queue_dir = \"state/q\"\nqueue_max_bytes = 65536\nqueue_fsync = \"always\"").unwrap();
        assert_eq!(m.queue_fsync, FsyncPolicy::Always);
        let q = from_config(&m, &resolve).unwrap().unwrap();
        assert!(dir.path().join("state/q").is_dir());
        q.append(&rec(1)).unwrap();
        assert_eq!(q.stats().records, 1);
        // The policy is parsed once, at load: a bad one is refused there, never replaced by a default.
        for (bad, key) in [
            ("queue_dir = \"q\"\nqueue_fsync = \"sometimes\"", "queue_fsync"),
            ("queue_max_bytes = 10", "queue_max_bytes"),
            ("queue_max_age_s = 0", "queue_max_age_s"),
        ] {
            let e = with(bad).unwrap_err();
            assert!(e.contains(key), "{e}");
        }
    }

    /// `cargo test --release --lib disk_queue -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn throughput_by_fsync_policy() {
        let payload = vec![b'x'; 300];
        for (name, fsync) in [
            ("always", FsyncPolicy::Always),
            ("interval 100ms", FsyncPolicy::Interval(Duration::from_millis(100))),
            ("never", FsyncPolicy::Never),
        ] {
            let mut rates = Vec::new();
            for _ in 0..5 {
                let dir = tempfile::tempdir().unwrap();
                let q = DiskQueue::open(dir.path(), opts(64 << 20, fsync)).unwrap();
                let n = if fsync == FsyncPolicy::Always { 500 } else { 20_000 };
                let r =
                    Record { topic: "edgeinfer/dev/p/result".into(), qos: 1, retain: false, payload: payload.clone() };
                let t = Instant::now();
                for _ in 0..n {
                    q.append(&r).unwrap();
                }
                rates.push(n as f64 / t.elapsed().as_secs_f64());
            }
            rates.sort_by(|a, b| a.total_cmp(b));
            println!("disk queue append, fsync {name}: median {:.0} results/s (300-byte payload)", rates[2]);
        }
    }
}
