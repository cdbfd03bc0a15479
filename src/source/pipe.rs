//! Frames (MJPEG, raw RGB24/GRAY8) or PCM audio read from a command's stdout,
//! so whatever the board already has becomes a camera or a microphone:
//! `rpicam-vid ... -o -`, `ffmpeg ... -f mjpeg -`, `gst-launch-1.0 ... fdsink`,
//! `arecord -t raw`. The command runs in its own process group; its stderr
//! goes to the log; it is killed on shutdown or when it stalls, and the
//! daemon restarts it with backoff when it exits.

use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use image::RgbImage;

use super::config::{SourceConfig, StreamFormat};
use super::{FrameGate, SourceCtx, SourceEnd, SourceError};
use crate::message::{Frame, Input, Values};

/// Largest JPEG accepted from a stream; past it the stream is resynchronised.
pub const MAX_JPEG_BYTES: usize = 16 * 1024 * 1024;

/// Bytes read from the pipe per call.
const READ_CHUNK: usize = 64 * 1024;

/// Runs the command until it exits, fails, stalls or the daemon stops.
pub fn run(cfg: &SourceConfig, ctx: &SourceCtx) -> Result<SourceEnd, SourceError> {
    let SourceConfig::Pipe {
        command,
        format,
        width,
        height,
        sample_rate,
        channels,
        chunk_ms,
        max_fps,
        restart,
        stall_timeout_s,
    } = cfg
    else {
        return Err(SourceError("not a pipe source".into()));
    };
    let program = command.first().map(String::as_str).unwrap_or("");
    let mut child = Command::new(program)
        .args(&command[1..])
        .current_dir(&ctx.base_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a `sh -c` wrapper and its children are stopped together.
        .process_group(0)
        .spawn()
        .map_err(|e| SourceError(format!("cannot start `{program}`: {e}")))?;
    let pid = child.id() as i32;
    log::info!("pipeline `{}`: started `{}` (pid {pid})", ctx.pipeline, command.join(" "));
    let stdout = child.stdout.take().ok_or_else(|| SourceError("no stdout pipe".into()))?;
    let last_stderr = Arc::new(Mutex::new(String::new()));
    if let Some(stderr) = child.stderr.take() {
        spawn_stderr_logger(stderr, ctx.pipeline.clone(), program.to_string(), last_stderr.clone());
    }

    let started = Instant::now();
    let progress = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let stalled = Arc::new(AtomicBool::new(false));
    let watchdog = spawn_watchdog(
        pid,
        ctx.clone(),
        started,
        progress.clone(),
        done.clone(),
        stalled.clone(),
        Duration::from_secs_f64(*stall_timeout_s),
    );

    let mut reader = Stamped { inner: stdout, started, progress };
    let mut gate = FrameGate::new(*max_fps);
    let read = match format {
        StreamFormat::Mjpeg => read_mjpeg(&mut reader, ctx, &mut gate),
        StreamFormat::Rgb24 | StreamFormat::Gray8 => {
            read_raw(&mut reader, ctx, &mut gate, *format, width.unwrap_or(0), height.unwrap_or(0))
        }
        StreamFormat::S16le | StreamFormat::F32le => {
            let per_chunk = (*sample_rate as u64 * *chunk_ms as u64 / 1000).max(1) as usize * *channels;
            read_pcm(&mut reader, ctx, *format, per_chunk)
        }
    };
    done.store(true, Relaxed);
    terminate(pid, &mut child);
    let _ = watchdog.join();
    let status = child.wait().map_err(|e| SourceError(format!("`{program}`: {e}")))?;
    if ctx.stopped() || matches!(read, Ok(ReadEnd::Closed)) {
        return Ok(SourceEnd::Stopped);
    }
    if stalled.load(Relaxed) {
        return Err(SourceError(format!("`{program}` wrote nothing for {stall_timeout_s} s; restarting it")));
    }
    if let Err(e) = read {
        return Err(SourceError(format!("reading from `{program}`: {e}")));
    }
    let last = last_stderr.lock().map(|s| s.clone()).unwrap_or_default();
    let said = if last.is_empty() { String::new() } else { format!(" (last stderr line: {last})") };
    if status.success() && !*restart {
        log::info!("pipeline `{}`: `{program}` finished", ctx.pipeline);
        return Ok(SourceEnd::Finished);
    }
    Err(SourceError(format!("`{program}` exited with {status}{said}")))
}

/// How reading stdout ended without an I/O error.
enum ReadEnd {
    /// End of file: the command exited or closed stdout.
    Eof,
    /// The pipeline's queue closed (shutdown).
    Closed,
}

/// A reader that records when it last returned data, for the stall watchdog.
struct Stamped<R> {
    inner: R,
    started: Instant,
    progress: Arc<AtomicU64>,
}

impl<R: Read> Read for Stamped<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            self.progress.store(self.started.elapsed().as_millis() as u64, Relaxed);
        }
        Ok(n)
    }
}

fn spawn_stderr_logger(stderr: std::process::ChildStderr, pipeline: String, program: String, last: Arc<Mutex<String>>) {
    let spawned = std::thread::Builder::new().name(format!("stderr-{pipeline}")).spawn(move || {
        let mut lines = BufReader::new(stderr);
        let mut line = Vec::new();
        loop {
            line.clear();
            // Bounded: a command that writes megabytes without a newline cannot grow this.
            match (&mut lines).take(4096).read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&line);
                    let text = text.trim_end();
                    if !text.is_empty() {
                        log::info!("pipeline `{pipeline}`: {program}: {text}");
                        if let Ok(mut l) = last.lock() {
                            text.clone_into(&mut l);
                        }
                    }
                }
            }
        }
    });
    if let Err(e) = spawned {
        log::warn!("cannot start the stderr logger: {e}");
    }
}

/// Kills the command's process group on shutdown or when it writes nothing
/// for `stall`, which ends the blocking read in the source thread.
fn spawn_watchdog(
    pid: i32,
    ctx: SourceCtx,
    started: Instant,
    progress: Arc<AtomicU64>,
    done: Arc<AtomicBool>,
    stalled: Arc<AtomicBool>,
    stall: Duration,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !done.load(Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
            if ctx.stopped() {
                signal_group(pid, libc::SIGTERM);
                return;
            }
            let last = Duration::from_millis(progress.load(Relaxed));
            if !stall.is_zero() && started.elapsed().saturating_sub(last) > stall {
                stalled.store(true, Relaxed);
                signal_group(pid, libc::SIGKILL);
                return;
            }
        }
    })
}

fn signal_group(pid: i32, sig: libc::c_int) {
    // SAFETY: kill(2) with a negative pid signals the process group we created; no memory is touched.
    unsafe {
        libc::kill(-pid, sig);
    }
}

/// Asks the command's group to stop, then kills it if it has not exited within a second.
fn terminate(pid: i32, child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        // The leader is gone; stop what it left in its group (e.g. under `sh -c`).
        signal_group(pid, libc::SIGKILL);
        return;
    }
    signal_group(pid, libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            signal_group(pid, libc::SIGKILL);
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    signal_group(pid, libc::SIGKILL);
}

fn read_mjpeg(r: &mut impl Read, ctx: &SourceCtx, gate: &mut FrameGate) -> io::Result<ReadEnd> {
    let mut split = JpegSplitter::default();
    loop {
        if ctx.stopped() {
            return Ok(ReadEnd::Closed);
        }
        if split.fill_from(r)? == 0 {
            return Ok(ReadEnd::Eof);
        }
        let mut open = true;
        split.drain(|part| {
            let jpeg = match part {
                Ok(j) => j,
                Err(why) => return ctx.bad_frame(&why),
            };
            let captured = SystemTime::now();
            if !open {
                return;
            }
            // The gate is asked before decoding, so frames over max_fps cost no decode.
            if !gate.admit(Instant::now()) {
                ctx.metrics.dropped_max_fps.fetch_add(1, Relaxed);
                return;
            }
            match crate::preprocess::decode_image(jpeg) {
                Ok(image) => open = ctx.push(Input::Frame(Frame { image, captured, origin: None })),
                Err(e) => ctx.bad_frame(&e.to_string()),
            }
        });
        if !open {
            return Ok(ReadEnd::Closed);
        }
    }
}

fn read_raw(
    r: &mut impl Read,
    ctx: &SourceCtx,
    gate: &mut FrameGate,
    format: StreamFormat,
    width: u32,
    height: u32,
) -> io::Result<ReadEnd> {
    let pixels = width as usize * height as usize;
    let bytes = if format == StreamFormat::Gray8 { pixels } else { pixels * 3 };
    let mut grey = Vec::new();
    let mut discard = Vec::new();
    loop {
        if ctx.stopped() {
            return Ok(ReadEnd::Closed);
        }
        let admitted = gate.admit(Instant::now());
        if !admitted {
            discard.resize(bytes, 0);
            if !read_full(r, &mut discard)? {
                return Ok(ReadEnd::Eof);
            }
            ctx.metrics.dropped_max_fps.fetch_add(1, Relaxed);
            continue;
        }
        // RGB frames are read straight into the image's own buffer: no copy.
        let mut rgb = vec![0u8; pixels * 3];
        let complete = if format == StreamFormat::Gray8 {
            grey.resize(bytes, 0);
            let ok = read_full(r, &mut grey)?;
            for (px, &g) in rgb.chunks_exact_mut(3).zip(&grey) {
                px.fill(g);
            }
            ok
        } else {
            read_full(r, &mut rgb)?
        };
        if !complete {
            return Ok(ReadEnd::Eof);
        }
        let captured = SystemTime::now();
        let Some(image) = RgbImage::from_raw(width, height, rgb) else {
            ctx.bad_frame("frame buffer size mismatch");
            continue;
        };
        if !ctx.push(Input::Frame(Frame { image, captured, origin: None })) {
            return Ok(ReadEnd::Closed);
        }
    }
}

fn read_pcm(r: &mut impl Read, ctx: &SourceCtx, format: StreamFormat, samples: usize) -> io::Result<ReadEnd> {
    let width = if format == StreamFormat::S16le { 2 } else { 4 };
    let mut raw = vec![0u8; samples * width];
    loop {
        if ctx.stopped() {
            return Ok(ReadEnd::Closed);
        }
        if !read_full(r, &mut raw)? {
            return Ok(ReadEnd::Eof);
        }
        let captured = SystemTime::now();
        let values: Vec<f32> = if format == StreamFormat::S16le {
            raw.chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]]) as f32 / 32768.0).collect()
        } else {
            raw.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .map(|v| if v.is_finite() { v } else { 0.0 })
                .collect()
        };
        if !ctx.push(Input::Values(Values { values, names: None, captured, origin: None })) {
            return Ok(ReadEnd::Closed);
        }
    }
}

/// Fills `buf` completely; false on end of file (a partial tail is discarded).
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => return Ok(false),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Splits a byte stream of concatenated JPEG images by walking the JPEG
/// marker structure: segment lengths are skipped, so an `FF D9` inside an
/// EXIF thumbnail does not end the frame, and entropy-coded data is scanned
/// for the next real marker. Garbage between images is skipped and reported.
#[derive(Debug, Default)]
pub struct JpegSplitter {
    buf: Vec<u8>,
    /// Where the current image starts (its SOI), once found.
    start: Option<usize>,
    /// Scan position inside the current image.
    pos: usize,
    /// Inside entropy-coded data (after SOS).
    entropy: bool,
}

/// What scanning the buffer found.
enum Scan {
    /// A complete image ends here (exclusive).
    End(usize),
    /// More bytes are needed.
    More,
    /// The image is corrupt; skip to the next SOI after its start.
    Corrupt(&'static str),
}

impl JpegSplitter {
    /// Appends bytes (for callers that already hold them).
    #[cfg(test)]
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Reads once from `r` straight into the buffer; 0 at end of file.
    pub fn fill_from(&mut self, r: &mut impl Read) -> io::Result<usize> {
        let len = self.buf.len();
        self.buf.resize(len + READ_CHUNK, 0);
        let n = loop {
            match r.read(&mut self.buf[len..]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        self.buf.truncate(len + *n.as_ref().unwrap_or(&0));
        n
    }

    /// Hands every complete image (or the reason one was skipped) to `on`, then compacts the buffer.
    pub fn drain(&mut self, mut on: impl FnMut(Result<&[u8], String>)) {
        let mut consumed = 0;
        loop {
            let start = match self.start {
                Some(s) => s,
                None => match find_soi(&self.buf, consumed) {
                    Some(s) => {
                        if s > consumed && self.buf[consumed..s].iter().any(|&b| b != 0) {
                            on(Err(format!("{} bytes of non-JPEG data skipped", s - consumed)));
                        }
                        self.start = Some(s);
                        self.pos = s + 2;
                        self.entropy = false;
                        s
                    }
                    None => {
                        // Keep a trailing 0xFF: it may be the first half of the next SOI.
                        let keep = usize::from(self.buf.last() == Some(&0xFF));
                        let skipped = self.buf.len() - keep - consumed;
                        if skipped > 0 && self.buf[consumed..self.buf.len() - keep].iter().any(|&b| b != 0) {
                            on(Err(format!("{skipped} bytes of non-JPEG data skipped")));
                        }
                        consumed = self.buf.len() - keep;
                        break;
                    }
                },
            };
            match self.scan() {
                Scan::End(end) if end - start > MAX_JPEG_BYTES => {
                    // Its end came in the same read that passed the bound.
                    on(Err(format!("a JPEG larger than {} MiB was skipped", MAX_JPEG_BYTES >> 20)));
                    consumed = end;
                    self.start = None;
                }
                Scan::End(end) => {
                    on(Ok(&self.buf[start..end]));
                    consumed = end;
                    self.start = None;
                }
                Scan::More if self.buf.len() - start > MAX_JPEG_BYTES => {
                    on(Err(format!("a JPEG larger than {} MiB was skipped", MAX_JPEG_BYTES >> 20)));
                    consumed = self.buf.len();
                    self.start = None;
                }
                Scan::More => {
                    consumed = start;
                    break;
                }
                Scan::Corrupt(why) => {
                    on(Err(format!("corrupt JPEG in stream: {why}")));
                    consumed = start + 1;
                    self.start = None;
                }
            }
        }
        if consumed > 0 {
            self.buf.drain(..consumed);
            if let Some(s) = self.start.as_mut() {
                *s -= consumed;
                self.pos -= consumed;
            }
        }
    }

    fn scan(&mut self) -> Scan {
        let b = &self.buf;
        loop {
            if self.entropy {
                // Entropy-coded data ends at an 0xFF that is not stuffing (FF 00) or a restart marker.
                loop {
                    // A segment skip may have moved past what has arrived so far.
                    let Some(rest) = b.get(self.pos..) else { return Scan::More };
                    let Some(off) = rest.iter().position(|&x| x == 0xFF) else {
                        self.pos = b.len();
                        return Scan::More;
                    };
                    let at = self.pos + off;
                    let Some(&next) = b.get(at + 1) else {
                        self.pos = at;
                        return Scan::More;
                    };
                    if next == 0x00 || (0xD0..=0xD7).contains(&next) {
                        self.pos = at + 2;
                    } else if next == 0xFF {
                        self.pos = at + 1;
                    } else {
                        self.pos = at;
                        self.entropy = false;
                        break;
                    }
                }
            }
            // At a marker.
            let Some(&ff) = b.get(self.pos) else { return Scan::More };
            if ff != 0xFF {
                return Scan::Corrupt("expected a marker");
            }
            let Some(&m) = b.get(self.pos + 1) else { return Scan::More };
            match m {
                0xFF => self.pos += 1, // fill byte
                0xD9 => return Scan::End(self.pos + 2),
                0xD8 => return Scan::Corrupt("an image starts inside another"),
                0x01 | 0xD0..=0xD7 => self.pos += 2,
                _ => {
                    let Some(len) = b.get(self.pos + 2..self.pos + 4) else { return Scan::More };
                    let len = u16::from_be_bytes([len[0], len[1]]) as usize;
                    if len < 2 {
                        return Scan::Corrupt("segment length below 2");
                    }
                    self.pos += 2 + len;
                    if m == 0xDA {
                        self.entropy = true;
                    }
                }
            }
        }
    }
}

fn find_soi(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?.windows(2).position(|w| w == [0xFF, 0xD8]).map(|p| p + from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jpeg(w: u32, h: u32, rgb: [u8; 3]) -> Vec<u8> {
        let img = RgbImage::from_pixel(w, h, image::Rgb(rgb));
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90).encode_image(&img).unwrap();
        out
    }

    /// A JPEG with an APP1 segment holding a thumbnail JPEG, whose EOI must not end the outer image.
    fn jpeg_with_thumbnail(rgb: [u8; 3]) -> Vec<u8> {
        let outer = jpeg(32, 16, rgb);
        let thumb = jpeg(8, 8, [0, 0, 0]);
        let mut app1 = vec![0xFF, 0xE1];
        app1.extend_from_slice(&((thumb.len() + 2 + 6) as u16).to_be_bytes());
        app1.extend_from_slice(b"Exif\0\0");
        app1.extend_from_slice(&thumb);
        let mut out = outer[..2].to_vec();
        out.extend_from_slice(&app1);
        out.extend_from_slice(&outer[2..]);
        out
    }

    fn split_all(stream: &[u8], chunk: usize) -> (Vec<Vec<u8>>, Vec<String>) {
        let mut s = JpegSplitter::default();
        let (mut frames, mut errors) = (Vec::new(), Vec::new());
        for piece in stream.chunks(chunk) {
            s.push(piece);
            s.drain(|f| match f {
                Ok(j) => frames.push(j.to_vec()),
                Err(e) => errors.push(e),
            });
        }
        (frames, errors)
    }

    #[test]
    fn a_jpeg_over_the_limit_is_skipped_and_the_next_one_is_found() {
        // SOI, SOS, then entropy data with no marker for more than the limit.
        let mut stream = vec![0xFF, 0xD8, 0xFF, 0xDA, 0x00, 0x02];
        stream.resize(stream.len() + MAX_JPEG_BYTES + (128 << 10), 0x11);
        let small = jpeg(16, 16, [9, 9, 9]);
        stream.extend_from_slice(&small);
        let (frames, errors) = split_all(&stream, 64 << 10);
        assert!(errors.iter().any(|e| e.contains("larger than 16 MiB")), "{errors:?}");
        assert_eq!(frames, [small]);
        // All in one read: the oversized image's end comes in the read that passes the bound.
        let mut whole = vec![0xFF, 0xD8, 0xFF, 0xDA, 0x00, 0x02];
        whole.resize(whole.len() + MAX_JPEG_BYTES, 0x11);
        whole.extend_from_slice(&[0xFF, 0xD9]);
        let (frames, errors) = split_all(&whole, whole.len());
        assert!(frames.is_empty(), "a {} byte image was handed on", frames.first().map_or(0, Vec::len));
        assert!(errors.iter().any(|e| e.contains("larger than 16 MiB")), "{errors:?}");
    }

    #[test]
    fn splitter_finds_each_image_at_any_chunking() {
        let imgs = [jpeg(16, 16, [255, 0, 0]), jpeg_with_thumbnail([0, 255, 0]), jpeg(24, 8, [0, 0, 255])];
        let stream = imgs.concat();
        for chunk in [1, 7, 100, 4096, stream.len()] {
            let (frames, errors) = split_all(&stream, chunk);
            assert_eq!(frames, imgs, "chunk {chunk}");
            assert!(errors.is_empty(), "{errors:?}");
        }
        let decoded = crate::preprocess::decode_image(&imgs[1]).unwrap();
        assert_eq!(decoded.dimensions(), (32, 16));
    }

    #[test]
    fn splitter_skips_garbage_and_truncated_images() {
        let a = jpeg(16, 16, [10, 20, 30]);
        let b = jpeg(16, 16, [200, 100, 0]);
        let mut stream = b"junk".to_vec();
        stream.extend_from_slice(&a[..a.len() / 2]); // truncated: the next SOI appears inside it
        stream.extend_from_slice(&b);
        let (frames, errors) = split_all(&stream, 13);
        assert_eq!(frames, vec![b]);
        assert!(errors.iter().any(|e| e.contains("non-JPEG")), "{errors:?}");
        assert!(errors.iter().any(|e| e.contains("corrupt")), "{errors:?}");
    }

    fn pipe_cfg(toml_source: &str) -> SourceConfig {
        toml::from_str(&format!("type = \"pipe\"\n{toml_source}")).unwrap()
    }

    fn collect(ctx: &SourceCtx) -> Vec<Input> {
        std::iter::from_fn(|| if ctx.queue.is_empty() { None } else { ctx.queue.pop() }).collect()
    }

    #[test]
    fn raw_grey_frames_from_a_shell_command() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = super::super::test_ctx(dir.path());
        // Three 4x2 grey frames of values 1, 2, 3, then a partial frame that is discarded.
        let cfg = pipe_cfg(
            "command = [\"sh\", \"-c\", \"printf '\\\\001\\\\001\\\\001\\\\001\\\\001\\\\001\\\\001\\\\001\\\\002\\\\002\\\\002\\\\002\\\\002\\\\002\\\\002\\\\002\\\\003\\\\003\\\\003\\\\003\\\\003\\\\003\\\\003\\\\003\\\\004'\"]\nformat = \"gray8\"\nwidth = 4\nheight = 2\nrestart = false",
        );
        assert_eq!(run(&cfg, &ctx).unwrap(), SourceEnd::Finished);
        let frames: Vec<_> = collect(&ctx)
            .into_iter()
            .map(|i| match i {
                Input::Frame(f) => f.image,
                _ => panic!("not a frame"),
            })
            .collect();
        assert_eq!(frames.len(), 3);
        for (i, f) in frames.iter().enumerate() {
            assert_eq!(f.dimensions(), (4, 2));
            assert!(f.pixels().all(|p| p.0 == [i as u8 + 1; 3]));
        }
    }

    #[test]
    fn exit_is_an_error_with_stderr_unless_restart_is_off() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = super::super::test_ctx(dir.path());
        let cfg = pipe_cfg("command = [\"sh\", \"-c\", \"echo 'camera not found' >&2; exit 3\"]\nformat = \"mjpeg\"");
        let e = run(&cfg, &ctx).unwrap_err().0;
        assert!(e.contains("exit status: 3") && e.contains("camera not found"), "{e}");
        let cfg = pipe_cfg("command = [\"no-such-program-xyz\"]\nformat = \"mjpeg\"");
        let e = run(&cfg, &ctx).unwrap_err().0;
        assert!(e.contains("cannot start `no-such-program-xyz`"), "{e}");
    }

    #[test]
    fn a_silent_command_is_killed_after_the_stall_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = super::super::test_ctx(dir.path());
        let cfg = pipe_cfg("command = [\"sleep\", \"30\"]\nformat = \"mjpeg\"\nstall_timeout_s = 0.3");
        let t = Instant::now();
        let e = run(&cfg, &ctx).unwrap_err().0;
        assert!(e.contains("wrote nothing"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn stop_kills_the_command_promptly() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = super::super::test_ctx(dir.path());
        let cfg =
            pipe_cfg("command = [\"sh\", \"-c\", \"sleep 30; sleep 30\"]\nformat = \"s16le\"\nstall_timeout_s = 0");
        let stop = ctx.stop.clone();
        let t = Instant::now();
        let h = std::thread::spawn(move || run(&cfg, &ctx).map_err(|e| e.0));
        std::thread::sleep(Duration::from_millis(200));
        stop.store(true, Relaxed);
        assert_eq!(h.join().unwrap(), Ok(SourceEnd::Stopped));
        assert!(t.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn pcm_chunks_are_scaled_and_sized() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = super::super::test_ctx(dir.path());
        // 8 stereo s16 frames at 40 Hz with 100 ms chunks: two chunks of 4 frames x 2 channels.
        let cfg = pipe_cfg(
            "command = [\"sh\", \"-c\", \"printf '\\\\000\\\\100\\\\000\\\\300%.0s' 1 2 3 4 5 6 7 8\"]\nformat = \"s16le\"\nsample_rate = 40\nchannels = 2\nchunk_ms = 100\nrestart = false",
        );
        assert_eq!(run(&cfg, &ctx).unwrap(), SourceEnd::Finished);
        let chunks: Vec<Vec<f32>> = collect(&ctx)
            .into_iter()
            .map(|i| match i {
                Input::Values(v) => v.values,
                _ => panic!("not values"),
            })
            .collect();
        assert_eq!(chunks.len(), 2);
        for c in &chunks {
            assert_eq!(c.len(), 8);
            assert!(c.chunks(2).all(|s| s == [0.5, -0.5]), "{c:?}");
        }
    }
}
