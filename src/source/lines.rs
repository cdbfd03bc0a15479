//! The `lines` source: one sample (or feature row) per text line, from
//! stdin, a named pipe, or a regular file that is followed like `tail -F`.
//!
//! - `stdin`: read until EOF, then the source is finished. A helper thread
//!   does the blocking reads so that shutdown never waits for input.
//! - A named pipe (or a character device such as a serial port): opened
//!   non-blocking and polled, so neither waiting for a writer nor waiting for
//!   data delays shutdown. When a writer closes, its last line counts even
//!   without a newline, and the next writer is read on the same descriptor:
//!   the read end is deliberately kept open rather than reopened, because
//!   closing the only reader would throw away what a new writer has already
//!   written. If the path is replaced by another file, that one is opened.
//! - A regular file: read from the beginning, then followed: appended lines
//!   are picked up (polled every 50 ms), a shrunk file is read again from the
//!   start (truncation), and a new file under the same name is opened once
//!   the old one is drained (rotation). A partly written last line waits for
//!   its newline.
//!
//! A malformed line is counted in the pipeline's `errors`, logged (the first
//! and every 100th) and skipped.

use std::collections::HashSet;
use std::fmt;
use std::fs::{File, Metadata, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime};

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use super::config::{LineFormat, SourceConfig};
use crate::message::{Input, Values};

use super::{SourceCtx, SourceEnd, SourceError};

/// `O_NONBLOCK` on Linux (x86, ARM, RISC-V): opening a FIFO with it returns
/// at once instead of waiting for a writer, and reads return `WouldBlock`
/// instead of waiting for data.
const O_NONBLOCK: i32 = 0o4000;

/// Lines longer than this are dropped (counted as malformed) rather than buffered.
const MAX_LINE_BYTES: usize = 1 << 20;

/// How often an idle file or pipe is polled.
const IDLE_POLL: Duration = Duration::from_millis(50);

/// How soon to look again when the last poll found data.
const BUSY_POLL: Duration = Duration::from_millis(5);

/// How often a pipe's path is checked for having been replaced.
const IDENTITY_CHECK: Duration = Duration::from_secs(1);

/// Bytes read per call.
const CHUNK: usize = 64 * 1024;

/// Chunks read before looking at shutdown, truncation and rotation again.
const CHUNKS_PER_POLL: usize = 64;

/// The numbers of one line (or one JSON file).
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedValues {
    /// The numbers, in line order.
    pub values: Vec<f32>,
    /// Names, in the order the JSON object lists them, when the line was an object.
    pub names: Option<Vec<String>>,
}

impl ParsedValues {
    /// An input captured now.
    pub fn into_input(self, origin: Option<String>) -> Input {
        Input::Values(Values { values: self.values, names: self.names, captured: SystemTime::now(), origin })
    }
}

/// Parses one line. `Ok(None)` for lines that carry no data: empty lines and
/// `#` comments. JSON: an array of numbers (nested arrays are flattened), an
/// object of name: number (order kept), or a single number. CSV: numbers
/// separated by commas, spaces around them allowed. Non-finite values (NaN,
/// infinities, numbers beyond f32) are errors.
pub fn parse_line(format: LineFormat, line: &str) -> Result<Option<ParsedValues>, String> {
    let line = line.trim_start_matches('\u{feff}').trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    match format {
        LineFormat::Json => parse_json(line).map(Some),
        LineFormat::Csv => parse_csv(line).map(Some),
    }
}

/// Parses a JSON array (possibly nested, flattened), an object of
/// name: number (in the object's order) or a single number.
pub fn parse_json(text: &str) -> Result<ParsedValues, String> {
    let mut de = serde_json::Deserializer::from_str(text);
    let parsed = de.deserialize_any(TopLevel).map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())?;
    if parsed.values.is_empty() {
        return Err("no numbers".into());
    }
    Ok(parsed)
}

fn parse_csv(line: &str) -> Result<ParsedValues, String> {
    let values = line
        .split(',')
        .enumerate()
        .map(|(i, field)| {
            let field = field.trim();
            if field.is_empty() {
                return Err(format!("field {} is empty", i + 1));
            }
            match field.parse::<f32>() {
                Ok(x) if x.is_finite() => Ok(x),
                Ok(_) => Err(format!("field {} `{}` is not a finite number", i + 1, excerpt(field))),
                Err(_) => Err(format!("field {} `{}` is not a number", i + 1, excerpt(field))),
            }
        })
        .collect::<Result<Vec<f32>, String>>()?;
    Ok(ParsedValues { values, names: None })
}

/// At most 40 characters of `s`, for log messages.
fn excerpt(s: &str) -> String {
    match s.char_indices().nth(40) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

fn finite<E: de::Error>(x: f64) -> Result<f32, E> {
    let v = x as f32;
    if v.is_finite() {
        Ok(v)
    } else {
        Err(E::custom(format!("{x:e} is not a finite 32-bit number")))
    }
}

/// serde_json's `Value` keeps objects sorted by key (its `preserve_order`
/// feature is off), so objects are read with visitors that keep the order.
struct TopLevel;

impl<'de> Visitor<'de> for TopLevel {
    type Value = ParsedValues;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of numbers or an object of name: number")
    }

    fn visit_f64<E: de::Error>(self, x: f64) -> Result<ParsedValues, E> {
        Ok(ParsedValues { values: vec![finite(x)?], names: None })
    }

    fn visit_i64<E: de::Error>(self, x: i64) -> Result<ParsedValues, E> {
        self.visit_f64(x as f64)
    }

    fn visit_u64<E: de::Error>(self, x: u64) -> Result<ParsedValues, E> {
        self.visit_f64(x as f64)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ParsedValues, A::Error> {
        let mut values = Vec::new();
        while seq.next_element_seed(Flatten(&mut values))?.is_some() {}
        Ok(ParsedValues { values, names: None })
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ParsedValues, A::Error> {
        let (mut names, mut values, mut seen) = (Vec::new(), Vec::new(), HashSet::new());
        while let Some(name) = map.next_key::<String>()? {
            let value = map.next_value_seed(Number).map_err(|e| de::Error::custom(format!("`{name}`: {e}")))?;
            if !seen.insert(name.clone()) {
                return Err(de::Error::custom(format!("duplicate name `{name}`")));
            }
            names.push(name);
            values.push(value);
        }
        Ok(ParsedValues { values, names: Some(names) })
    }
}

/// Appends the numbers of a (nested) array.
struct Flatten<'a>(&'a mut Vec<f32>);

impl<'de> DeserializeSeed<'de> for Flatten<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Flatten<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a number or an array of numbers")
    }

    fn visit_f64<E: de::Error>(self, x: f64) -> Result<(), E> {
        self.0.push(finite(x)?);
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, x: i64) -> Result<(), E> {
        self.visit_f64(x as f64)
    }

    fn visit_u64<E: de::Error>(self, x: u64) -> Result<(), E> {
        self.visit_f64(x as f64)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Flatten(&mut *self.0))?.is_some() {}
        Ok(())
    }
}

/// One number.
struct Number;

impl<'de> DeserializeSeed<'de> for Number {
    type Value = f32;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<f32, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Number {
    type Value = f32;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a number")
    }

    fn visit_f64<E: de::Error>(self, x: f64) -> Result<f32, E> {
        finite(x)
    }

    fn visit_i64<E: de::Error>(self, x: i64) -> Result<f32, E> {
        finite(x as f64)
    }

    fn visit_u64<E: de::Error>(self, x: u64) -> Result<f32, E> {
        finite(x as f64)
    }
}

/// Runs the source until it finishes, fails or is stopped.
pub fn run(cfg: &SourceConfig, ctx: &SourceCtx) -> Result<SourceEnd, SourceError> {
    let SourceConfig::Lines { from, format } = cfg else {
        return Err(SourceError(format!("lines source started with a `{}` source config", cfg.kind())));
    };
    if from == "stdin" {
        let mut sink = LineSink::new(ctx, *format, "stdin".into());
        return read_stdin(ctx, &mut sink);
    }
    // `join` keeps an absolute path as it is.
    let path = ctx.base_dir.join(from);
    let mut sink = LineSink::new(ctx, *format, path.display().to_string());
    let meta = std::fs::metadata(&path).map_err(|e| SourceError(format!("lines source: {}: {e}", path.display())))?;
    let kind = meta.file_type();
    if kind.is_fifo() || kind.is_char_device() {
        read_stream(&path, ctx, &mut sink)
    } else if kind.is_file() {
        follow_file(&path, ctx, &mut sink)
    } else {
        Err(SourceError(format!(
            "lines source: {} is not a regular file, a named pipe or a character device",
            path.display()
        )))
    }
}

/// Turns complete lines into inputs and counts the malformed ones (shared
/// with the serial source).
pub(crate) struct LineSink<'a> {
    ctx: &'a SourceCtx,
    format: LineFormat,
    /// `stdin`, the path or the port, for logs.
    what: String,
    /// Origin given to the inputs (the serial port), if any.
    origin: Option<String>,
    /// Line number in the current file or stream.
    line_no: u64,
    malformed: u64,
    logged: Option<Instant>,
}

/// Malformed lines are logged the first time, then at most this often.
const LOG_EVERY: Duration = Duration::from_secs(10);

impl<'a> LineSink<'a> {
    /// A sink whose inputs carry no origin; `what` names the stream in logs.
    pub(crate) fn new(ctx: &'a SourceCtx, format: LineFormat, what: String) -> Self {
        LineSink { ctx, format, what, origin: None, line_no: 0, malformed: 0, logged: None }
    }

    /// A sink whose inputs carry `what` as their origin (the serial source's port).
    #[cfg(feature = "serial")]
    pub(crate) fn with_origin(ctx: &'a SourceCtx, format: LineFormat, what: String) -> Self {
        LineSink { origin: Some(what.clone()), ..Self::new(ctx, format, what) }
    }

    /// Handles one line (without its newline). False once the queue is closed.
    pub(crate) fn line(&mut self, raw: &[u8]) -> bool {
        self.line_no += 1;
        match parse_line(self.format, &String::from_utf8_lossy(raw)) {
            Ok(None) => true,
            Ok(Some(parsed)) => self.ctx.push(parsed.into_input(self.origin.clone())),
            Err(why) => {
                self.bad(&why);
                true
            }
        }
    }

    /// Counts a bad line and logs it, rate-limited.
    pub(crate) fn bad(&mut self, why: &str) {
        self.malformed += 1;
        self.ctx.metrics.errors.fetch_add(1, Relaxed);
        if self.logged.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            self.logged = Some(Instant::now());
            log::warn!(
                "pipeline `{}`: {} line {}: {why}; skipped ({} malformed lines so far)",
                self.ctx.pipeline,
                self.what,
                self.line_no,
                self.malformed
            );
        }
    }
}

/// Splits a byte stream into lines, holding back an unfinished last line.
#[derive(Default)]
struct LineBuf {
    partial: Vec<u8>,
    /// The current line passed [`MAX_LINE_BYTES`]: drop it up to its newline.
    overlong: bool,
}

impl LineBuf {
    /// Hands every complete line in `bytes` to `sink`. False once the queue is closed.
    fn feed(&mut self, mut bytes: &[u8], sink: &mut LineSink) -> bool {
        while let Some(i) = bytes.iter().position(|&b| b == b'\n') {
            let (head, rest) = (&bytes[..i], &bytes[i + 1..]);
            bytes = rest;
            if self.overlong {
                self.overlong = false;
                continue;
            }
            let open = if self.partial.is_empty() {
                sink.line(head)
            } else {
                self.partial.extend_from_slice(head);
                let line = std::mem::take(&mut self.partial);
                sink.line(&line)
            };
            if !open {
                return false;
            }
        }
        if !self.overlong {
            self.partial.extend_from_slice(bytes);
            if self.partial.len() > MAX_LINE_BYTES {
                self.partial = Vec::new();
                self.overlong = true;
                sink.line_no += 1;
                sink.bad(&format!("line longer than {MAX_LINE_BYTES} bytes"));
            }
        }
        true
    }

    /// The stream ended: an unfinished last line is complete. False once the queue is closed.
    fn finish(&mut self, sink: &mut LineSink) -> bool {
        self.overlong = false;
        if self.partial.is_empty() {
            return true;
        }
        let line = std::mem::take(&mut self.partial);
        sink.line(&line)
    }

    /// Forgets an unfinished line (the file was truncated under it).
    fn discard(&mut self) {
        self.partial.clear();
        self.overlong = false;
    }
}

fn read_stdin(ctx: &SourceCtx, sink: &mut LineSink) -> Result<SourceEnd, SourceError> {
    // A blocking read cannot be interrupted, so it happens on a helper thread;
    // on shutdown the source returns and the helper ends with the process (or
    // at its next read, when the channel is gone).
    let (tx, rx) = mpsc::sync_channel::<std::io::Result<Vec<u8>>>(16);
    std::thread::Builder::new()
        .name(format!("stdin-{}", ctx.pipeline))
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut chunk = vec![0u8; CHUNK];
            loop {
                match stdin.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => {
                        if tx.send(Ok(chunk[..n].to_vec())).is_err() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        break;
                    }
                }
            }
        })
        .map_err(|e| SourceError(format!("lines source: cannot start the stdin reader: {e}")))?;
    let mut lines = LineBuf::default();
    loop {
        if ctx.stopped() {
            return Ok(SourceEnd::Stopped);
        }
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(Ok(chunk)) => {
                if !lines.feed(&chunk, sink) {
                    return Ok(SourceEnd::Stopped);
                }
            }
            Ok(Err(e)) => return Err(SourceError(format!("lines source: reading stdin: {e}"))),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                return Ok(if lines.finish(sink) { SourceEnd::Finished } else { SourceEnd::Stopped });
            }
        }
    }
}

/// What identifies a file whatever its name: device and inode.
fn identity(m: &Metadata) -> (u64, u64) {
    (m.dev(), m.ino())
}

/// What a round of reads found.
enum Drained {
    /// Bytes were read (true) or not (false); the reader is at EOF or would block.
    Read(bool),
    /// End of stream: no writer (pipes only).
    Eof,
    /// The queue is closed.
    Closed,
}

/// Reads what is available (at most [`CHUNKS_PER_POLL`] chunks) into `lines`.
fn drain(
    file: &mut File,
    chunk: &mut [u8],
    lines: &mut LineBuf,
    sink: &mut LineSink,
    pos: &mut u64,
) -> std::io::Result<Drained> {
    let mut got = false;
    for _ in 0..CHUNKS_PER_POLL {
        match file.read(chunk) {
            Ok(0) => return Ok(if got { Drained::Read(true) } else { Drained::Eof }),
            Ok(n) => {
                got = true;
                *pos += n as u64;
                if !lines.feed(&chunk[..n], sink) {
                    return Ok(Drained::Closed);
                }
                if sink.ctx.stopped() {
                    break;
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Drained::Read(got))
}

fn open_stream(path: &Path) -> Result<(File, (u64, u64)), SourceError> {
    let fail = |e: std::io::Error| SourceError(format!("lines source: cannot open {}: {e}", path.display()));
    let file = OpenOptions::new().read(true).custom_flags(O_NONBLOCK).open(path).map_err(fail)?;
    let id = identity(&file.metadata().map_err(fail)?);
    Ok((file, id))
}

/// A named pipe or character device, polled without blocking.
fn read_stream(path: &Path, ctx: &SourceCtx, sink: &mut LineSink) -> Result<SourceEnd, SourceError> {
    let (mut file, mut id) = open_stream(path)?;
    let mut chunk = vec![0u8; CHUNK];
    let mut lines = LineBuf::default();
    let mut checked = Instant::now();
    let mut pos = 0;
    loop {
        if ctx.stopped() {
            return Ok(SourceEnd::Stopped);
        }
        let got = match drain(&mut file, &mut chunk, &mut lines, sink, &mut pos) {
            Ok(Drained::Read(got)) => got,
            // No writer, none yet or the last one closed: what it left unfinished is a line.
            Ok(Drained::Eof) => {
                if !lines.finish(sink) {
                    return Ok(SourceEnd::Stopped);
                }
                false
            }
            Ok(Drained::Closed) => return Ok(SourceEnd::Stopped),
            Err(e) => return Err(SourceError(format!("lines source: reading {}: {e}", path.display()))),
        };
        if !got && checked.elapsed() >= IDENTITY_CHECK {
            checked = Instant::now();
            let now = std::fs::metadata(path)
                .map_err(|e| SourceError(format!("lines source: {} is gone: {e}", path.display())))?;
            if identity(&now) != id {
                log::info!("pipeline `{}`: {} was replaced; opening the new one", ctx.pipeline, path.display());
                if !lines.finish(sink) {
                    return Ok(SourceEnd::Stopped);
                }
                (file, id) = open_stream(path)?;
                sink.line_no = 0;
                continue;
            }
        }
        if !ctx.sleep_until(Instant::now() + if got { BUSY_POLL } else { IDLE_POLL }) {
            return Ok(SourceEnd::Stopped);
        }
    }
}

/// A regular file, read from the start and then followed.
fn follow_file(path: &Path, ctx: &SourceCtx, sink: &mut LineSink) -> Result<SourceEnd, SourceError> {
    let open = |path: &Path| -> std::io::Result<(File, (u64, u64))> {
        let file = File::open(path)?;
        let id = identity(&file.metadata()?);
        Ok((file, id))
    };
    let (mut file, mut id) =
        open(path).map_err(|e| SourceError(format!("lines source: cannot open {}: {e}", path.display())))?;
    let read_err = |e: std::io::Error| SourceError(format!("lines source: reading {}: {e}", path.display()));
    let mut chunk = vec![0u8; CHUNK];
    let mut lines = LineBuf::default();
    let mut pos: u64 = 0;
    let mut missing_logged = false;
    loop {
        if ctx.stopped() {
            return Ok(SourceEnd::Stopped);
        }
        let got = match drain(&mut file, &mut chunk, &mut lines, sink, &mut pos).map_err(read_err)? {
            Drained::Read(got) => got,
            Drained::Eof => false,
            Drained::Closed => return Ok(SourceEnd::Stopped),
        };
        if got {
            // More may be waiting: read it before looking at the file's name again.
            continue;
        }
        match std::fs::metadata(path) {
            Ok(now) if identity(&now) != id => match open(path) {
                Ok((new_file, new_id)) => {
                    // Rotated: the old file was drained above; its unfinished line is final.
                    log::info!("pipeline `{}`: {} was replaced; reading the new file", ctx.pipeline, path.display());
                    if !lines.finish(sink) {
                        return Ok(SourceEnd::Stopped);
                    }
                    (file, id, pos) = (new_file, new_id, 0);
                    sink.line_no = 0;
                    missing_logged = false;
                    continue;
                }
                // Replaced again or removed in between: look again at the next poll.
                Err(e) => log::debug!("lines source: reopening {}: {e}", path.display()),
            },
            Ok(now) if now.len() < pos => {
                log::info!("pipeline `{}`: {} was truncated; reading it from the start", ctx.pipeline, path.display());
                file.seek(SeekFrom::Start(0)).map_err(read_err)?;
                lines.discard();
                pos = 0;
                sink.line_no = 0;
                continue;
            }
            Ok(_) => {}
            // Removed (or mid-rotation): keep following the open file until a new one appears.
            Err(e) if e.kind() == ErrorKind::NotFound => {
                if !missing_logged {
                    missing_logged = true;
                    log::warn!(
                        "pipeline `{}`: {} was removed; waiting for a new file under that name",
                        ctx.pipeline,
                        path.display()
                    );
                }
            }
            Err(e) => return Err(SourceError(format!("lines source: {}: {e}", path.display()))),
        }
        if !ctx.sleep_until(Instant::now() + IDLE_POLL) {
            return Ok(SourceEnd::Stopped);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::thread::JoinHandle;

    use super::*;

    fn parsed(values: &[f32], names: Option<&[&str]>) -> Option<ParsedValues> {
        Some(ParsedValues { values: values.to_vec(), names: names.map(|n| n.iter().map(|s| s.to_string()).collect()) })
    }

    #[test]
    fn parses_json_arrays_flattening_nested_ones() {
        assert_eq!(parse_line(LineFormat::Json, "[1.0, 2, -3.5e1]"), Ok(parsed(&[1.0, 2.0, -35.0], None)));
        assert_eq!(parse_line(LineFormat::Json, " [[1, 2], [3]] \r"), Ok(parsed(&[1.0, 2.0, 3.0], None)));
        assert_eq!(parse_line(LineFormat::Json, "42"), Ok(parsed(&[42.0], None)));
    }

    #[test]
    fn json_objects_keep_their_order() {
        assert_eq!(
            parse_line(LineFormat::Json, r#"{"zeta": 1, "alpha": 2.5, "mid": -1}"#),
            Ok(parsed(&[1.0, 2.5, -1.0], Some(&["zeta", "alpha", "mid"])))
        );
        assert!(parse_line(LineFormat::Json, r#"{"a": 1, "a": 2}"#).unwrap_err().contains("duplicate"));
        assert!(parse_line(LineFormat::Json, r#"{"a": "x"}"#).unwrap_err().contains("`a`"));
    }

    #[test]
    fn parses_csv_with_spaces() {
        assert_eq!(parse_line(LineFormat::Csv, "1.0,2.0,3.0"), Ok(parsed(&[1.0, 2.0, 3.0], None)));
        assert_eq!(parse_line(LineFormat::Csv, "  1 ,\t-2.5e-1 , 3\r"), Ok(parsed(&[1.0, -0.25, 3.0], None)));
        assert_eq!(parse_line(LineFormat::Csv, "7"), Ok(parsed(&[7.0], None)));
    }

    #[test]
    fn skips_empty_lines_and_comments() {
        for format in [LineFormat::Json, LineFormat::Csv] {
            assert_eq!(parse_line(format, ""), Ok(None));
            assert_eq!(parse_line(format, "   \t\r"), Ok(None));
            assert_eq!(parse_line(format, "# x,y,z"), Ok(None));
            assert_eq!(parse_line(format, "  # [1, 2]"), Ok(None));
        }
    }

    #[test]
    fn rejects_malformed_lines_with_a_reason() {
        let bad_json = ["[1, 2", "[1, \"a\"]", "[1, null]", "[]", "{}", "[1] [2]", "true", "{\"a\": [1]}", "x"];
        for line in bad_json {
            let e = parse_line(LineFormat::Json, line).unwrap_err();
            assert!(!e.is_empty() && !e.contains('\n'), "{line}: {e}");
        }
        assert_eq!(parse_line(LineFormat::Csv, "1,,3").unwrap_err(), "field 2 is empty");
        assert_eq!(parse_line(LineFormat::Csv, "1,2,").unwrap_err(), "field 3 is empty");
        assert_eq!(parse_line(LineFormat::Csv, "1,x").unwrap_err(), "field 2 `x` is not a number");
        assert!(parse_line(LineFormat::Csv, "[1, 2]").is_err());
    }

    #[test]
    fn rejects_nan_and_infinities() {
        assert_eq!(parse_line(LineFormat::Csv, "1,NaN").unwrap_err(), "field 2 `NaN` is not a finite number");
        assert!(parse_line(LineFormat::Csv, "inf,1").unwrap_err().contains("finite"));
        assert!(parse_line(LineFormat::Json, "[1, NaN]").is_err());
        assert!(parse_line(LineFormat::Json, "[1e39]").unwrap_err().contains("finite"));
        assert!(parse_line(LineFormat::Json, r#"{"a": -1e300}"#).unwrap_err().contains("finite"));
    }

    fn ctx(base: &Path) -> SourceCtx {
        crate::source::test_ctx(base)
    }

    fn start(from: &str, format: LineFormat, ctx: &SourceCtx) -> JoinHandle<Result<SourceEnd, SourceError>> {
        let cfg = SourceConfig::Lines { from: from.into(), format };
        let ctx = ctx.clone();
        std::thread::spawn(move || run(&cfg, &ctx))
    }

    /// The first value of each of `n` inputs, waiting up to 5 s for them.
    fn take(ctx: &SourceCtx, n: usize) -> Vec<f32> {
        let deadline = Instant::now() + Duration::from_secs(5);
        while ctx.queue.len() < n {
            assert!(Instant::now() < deadline, "only {} of {n} inputs arrived", ctx.queue.len());
            std::thread::sleep(Duration::from_millis(10));
        }
        (0..n)
            .map(|_| match ctx.queue.pop() {
                Some(Input::Values(v)) => {
                    assert!(v.origin.is_none());
                    v.values[0]
                }
                other => panic!("{other:?}"),
            })
            .collect()
    }

    fn stop(ctx: &SourceCtx, handle: JoinHandle<Result<SourceEnd, SourceError>>) {
        ctx.stop.store(true, Relaxed);
        let t = Instant::now();
        assert_eq!(handle.join().unwrap().unwrap(), SourceEnd::Stopped);
        assert!(t.elapsed() < Duration::from_secs(2), "took {:?} to stop", t.elapsed());
    }

    fn append(path: &Path, text: &str) {
        let mut f = OpenOptions::new().append(true).open(path).unwrap();
        f.write_all(text.as_bytes()).unwrap();
    }

    #[test]
    fn follows_a_file_through_appends_truncation_and_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("samples.csv");
        std::fs::write(&path, "# x,y\n1,10\n2,20\n").unwrap();
        let ctx = ctx(dir.path());
        let handle = start("samples.csv", LineFormat::Csv, &ctx);
        assert_eq!(take(&ctx, 2), [1.0, 2.0]);

        // Appended lines, one of them written in two parts, and a bad one.
        append(&path, "3,30\n4.5,");
        assert_eq!(take(&ctx, 1), [3.0]);
        std::thread::sleep(Duration::from_millis(120));
        assert!(ctx.queue.is_empty(), "an unfinished line must wait for its newline");
        append(&path, "45\nbad\n5,50\n");
        assert_eq!(take(&ctx, 2), [4.5, 5.0]);
        assert_eq!(ctx.metrics.errors.load(Relaxed), 1);

        // Truncated and rewritten shorter: read again from the start.
        std::fs::write(&path, "7\n").unwrap();
        assert_eq!(take(&ctx, 1), [7.0]);

        // Rotated: renamed away, a new file under the name.
        std::fs::rename(&path, dir.path().join("samples.csv.1")).unwrap();
        std::fs::write(&path, "8\n9\n").unwrap();
        assert_eq!(take(&ctx, 2), [8.0, 9.0]);
        append(&path, "10\n");
        assert_eq!(take(&ctx, 1), [10.0]);

        stop(&ctx, handle);
    }

    #[test]
    fn json_objects_from_a_file_arrive_with_names_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rows.jsonl");
        std::fs::write(&path, "{\"b\": 2, \"a\": 1}\n").unwrap();
        let ctx = ctx(dir.path());
        let handle = start(path.to_str().unwrap(), LineFormat::Json, &ctx);
        let deadline = Instant::now() + Duration::from_secs(5);
        while ctx.queue.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        match ctx.queue.pop() {
            Some(Input::Values(v)) => {
                assert_eq!(v.values, [2.0, 1.0]);
                assert_eq!(v.names, Some(vec!["b".to_string(), "a".to_string()]));
            }
            other => panic!("{other:?}"),
        }
        stop(&ctx, handle);
    }

    #[test]
    fn malformed_lines_are_counted_and_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mixed.jsonl");
        let mut text = String::new();
        for i in 0..250 {
            text.push_str(if i % 2 == 0 { "[1, 2]\n" } else { "[1, oops]\n" });
        }
        std::fs::write(&path, text).unwrap();
        let ctx = ctx(dir.path());
        let handle = start("mixed.jsonl", LineFormat::Json, &ctx);
        assert_eq!(take(&ctx, 125).len(), 125);
        stop(&ctx, handle);
        assert_eq!(ctx.metrics.errors.load(Relaxed), 125);
    }

    #[test]
    fn a_line_over_the_limit_is_skipped_counted_once_and_the_next_line_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut text = b"[1]\n".to_vec();
        text.extend(std::iter::repeat_n(b'7', MAX_LINE_BYTES + 10));
        text.extend_from_slice(b"\n[2]\n");
        std::fs::write(dir.path().join("long.jsonl"), text).unwrap();
        let ctx = ctx(dir.path());
        let handle = start("long.jsonl", LineFormat::Json, &ctx);
        let got = take(&ctx, 2);
        stop(&ctx, handle);
        assert_eq!(got, [1.0, 2.0], "the long line's tail must not become a sample");
        assert_eq!(ctx.metrics.errors.load(Relaxed), 1);
    }

    #[test]
    fn a_missing_path_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = ctx(dir.path());
        let cfg = SourceConfig::Lines { from: "nope.csv".into(), format: LineFormat::Csv };
        let e = run(&cfg, &ctx).unwrap_err();
        assert!(e.0.contains("nope.csv"), "{e}");
        let cfg = SourceConfig::Lines { from: ".".into(), format: LineFormat::Csv };
        assert!(run(&cfg, &ctx).unwrap_err().0.contains("not a regular file"));
    }

    #[test]
    fn reads_a_named_pipe_across_writers_and_stops_while_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sensor.fifo");
        let made = std::process::Command::new("mkfifo").arg(&path).status().unwrap();
        assert!(made.success());
        let ctx = ctx(dir.path());
        let handle = start("sensor.fifo", LineFormat::Csv, &ctx);

        // Each writer blocks in open() until the source has the read end open.
        let writer = |text: &'static str| {
            let path = path.clone();
            std::thread::spawn(move || {
                let mut f = OpenOptions::new().write(true).open(&path).unwrap();
                f.write_all(text.as_bytes()).unwrap();
            })
        };
        writer("1,1\n2,2\n3,3").join().unwrap();
        assert_eq!(take(&ctx, 3), [1.0, 2.0, 3.0], "the last line counts when the writer closes");
        writer("4\n5\n").join().unwrap();
        assert_eq!(take(&ctx, 2), [4.0, 5.0]);

        // No writer now: stopping must not wait for one.
        std::thread::sleep(Duration::from_millis(100));
        stop(&ctx, handle);
    }

    #[test]
    fn a_closed_queue_stops_the_source() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.csv"), "1\n2\n").unwrap();
        let ctx = ctx(dir.path());
        ctx.queue.close();
        let cfg = SourceConfig::Lines { from: "a.csv".into(), format: LineFormat::Csv };
        assert_eq!(run(&cfg, &ctx).unwrap(), SourceEnd::Stopped);
    }
}
