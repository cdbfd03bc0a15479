//! The `serial` source: text lines from a serial port (a UART, a USB serial
//! adapter, an Arduino on /dev/ttyACM0), parsed exactly as the `lines` source
//! parses them (`format = "json"` or `"csv"`).
//!
//! The port is opened exclusively at `baud`, 8 data bits, no parity, one stop
//! bit, no flow control, and its input buffer is flushed (bytes that arrived
//! before the speed was set may be garbled). Everything up to the first line
//! end after opening is discarded: the source may have come in in the middle
//! of a line, whose tail could parse as a shorter, wrong sample. Lines end
//! with LF, CRLF or a lone CR. A malformed line is counted in `errors`,
//! logged (the first, then at most once every 10 s) and skipped; a line
//! longer than [`MAX_LINE_BYTES`] is dropped and counted the same way.
//!
//! Reads wait at most [`READ_TIMEOUT`], so shutdown is prompt. When the port
//! fails or hangs up (a USB adapter unplugged), the run ends with an error and
//! the daemon reopens the port with backoff; an unfinished line from before is
//! not carried over.

use std::io::{ErrorKind, Read};
use std::path::Path;
use std::time::Duration;

use serialport::{ClearBuffer, DataBits, FlowControl, Parity, SerialPort, StopBits};

use super::config::{LineFormat, SourceConfig};
use super::{SourceCtx, SourceEnd, SourceError};
use crate::source::lines::LineSink;

/// Lines longer than this (without a line end) are dropped.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// The longest a read waits for data before shutdown is looked at again.
pub const READ_TIMEOUT: Duration = Duration::from_millis(100);

/// Runs the source until it ends, fails or is stopped.
pub fn run(cfg: &SourceConfig, ctx: &SourceCtx) -> Result<SourceEnd, SourceError> {
    let SourceConfig::Serial { port, baud, format } = cfg else {
        return Err(SourceError(format!("serial source started with a `{}` source config", cfg.kind())));
    };
    // `join` keeps an absolute path as it is.
    let path = ctx.base_dir.join(port);
    let name = path.display().to_string();
    let mut tty = open(&path, *baud)?;
    log::info!("pipeline `{}`: serial port {name} open at {baud} baud, 8N1", ctx.pipeline);
    let mut lines = SerialLines::new(ctx, *format, name.clone());
    let mut chunk = vec![0u8; 4096];
    loop {
        if ctx.stopped() {
            return Ok(SourceEnd::Stopped);
        }
        match tty.read(&mut chunk) {
            Ok(0) => return Err(SourceError(format!("serial source: {name}: hung up (device unplugged?)"))),
            Ok(n) => {
                if !lines.feed(&chunk[..n]) {
                    return Ok(SourceEnd::Stopped);
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
            Err(e) if e.kind() == ErrorKind::BrokenPipe => {
                return Err(SourceError(format!("serial source: {name}: hung up (device unplugged?)")))
            }
            Err(e) => return Err(SourceError(format!("serial source: reading {name}: {e}"))),
        }
    }
}

/// Opens `path` at `baud`, 8N1, no flow control, with an empty input buffer.
fn open(path: &Path, baud: u32) -> Result<serialport::TTYPort, SourceError> {
    let name = path.to_string_lossy();
    let tty = serialport::new(name.as_ref(), baud)
        .data_bits(DataBits::Eight)
        .parity(Parity::None)
        .stop_bits(StopBits::One)
        .flow_control(FlowControl::None)
        .timeout(READ_TIMEOUT)
        .open_native()
        .map_err(|e| {
            let hint = match std::fs::metadata(path) {
                Err(_) => " (not plugged in?)",
                Ok(_) if e.kind() == serialport::ErrorKind::Io(ErrorKind::PermissionDenied) => {
                    " (add the user to the `dialout` group)"
                }
                Ok(_) if e.kind() == serialport::ErrorKind::NoDevice => " (in use by another program?)",
                Ok(_) => "",
            };
            SourceError(format!("serial source: cannot open {name}: {e}{hint}"))
        })?;
    if let Err(e) = tty.clear(ClearBuffer::Input) {
        log::debug!("serial source: {name}: flushing the input buffer: {e}");
    }
    Ok(tty)
}

/// Splits the byte stream into lines and turns them into inputs.
struct SerialLines<'a> {
    sink: LineSink<'a>,
    partial: Vec<u8>,
    /// Still dropping the first (possibly partial) line after opening.
    syncing: bool,
    /// The current line passed [`MAX_LINE_BYTES`]: drop it up to its end.
    overlong: bool,
}

impl<'a> SerialLines<'a> {
    fn new(ctx: &'a SourceCtx, format: LineFormat, port: String) -> Self {
        SerialLines {
            sink: LineSink::with_origin(ctx, format, port),
            partial: Vec::new(),
            syncing: true,
            overlong: false,
        }
    }

    /// Hands every complete line in `bytes` on. False once the queue is closed.
    fn feed(&mut self, mut bytes: &[u8]) -> bool {
        while let Some(i) = bytes.iter().position(|&b| b == b'\n' || b == b'\r') {
            let (head, rest) = (&bytes[..i], &bytes[i + 1..]);
            bytes = rest;
            if self.syncing || self.overlong {
                self.syncing = false;
                self.overlong = false;
                self.partial.clear();
                continue;
            }
            let open = if self.partial.is_empty() {
                self.sink.line(head)
            } else {
                self.partial.extend_from_slice(head);
                let line = std::mem::take(&mut self.partial);
                let open = self.sink.line(&line);
                // Keep the allocation for the next partial line.
                self.partial = line;
                self.partial.clear();
                open
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
                if !self.syncing {
                    self.sink.bad(&format!("line longer than {MAX_LINE_BYTES} bytes without a line end; dropped"));
                }
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::io::Write;
    use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd, RawFd};
    use std::thread::JoinHandle;

    use serialport::TTYPort;

    use std::sync::atomic::Ordering::Relaxed;
    use std::time::Instant;

    use super::*;
    use crate::source::testing::{failure, next, stop};

    fn cfg(port: &Path, format: LineFormat) -> SourceConfig {
        SourceConfig::Serial { port: port.to_str().unwrap().into(), baud: 115_200, format }
    }

    fn start(cfg: SourceConfig, ctx: &SourceCtx) -> JoinHandle<Result<SourceEnd, SourceError>> {
        let ctx = ctx.clone();
        std::thread::spawn(move || run(&cfg, &ctx))
    }

    /// A pseudo-terminal: the master end (the "device") and the slave's path.
    /// The slave end returned by `pair` is kept open so the pty stays up
    /// between the source's opens; it never reads, so the source gets every byte.
    struct Pty {
        master: File,
        _slave: OwnedFd,
        path: String,
    }

    fn pty() -> Pty {
        let (master, slave) = TTYPort::pair().expect("a pseudo-terminal pair");
        let path = slave.name().expect("the slave's path");
        Pty { master: File::from(cloexec(master.into_raw_fd())), _slave: cloexec(slave.into_raw_fd()), path }
    }

    /// A close-on-exec copy of `fd`, which is closed. `pair` leaves both ends
    /// inheritable, and a process another test starts meanwhile would keep the
    /// master open, so that closing it here would never hang the pty up.
    fn cloexec(fd: RawFd) -> OwnedFd {
        // SAFETY: `fd` was just taken out of its owner with `into_raw_fd`.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        owned.try_clone().expect("F_DUPFD_CLOEXEC")
    }

    /// Writes `0` lines until the source passes one on: it is then open and in step.
    fn sync(master: &mut File, ctx: &SourceCtx) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while ctx.queue.is_empty() {
            assert!(Instant::now() < deadline, "the source never read the port");
            master.write_all(b"0\n").unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
        // Let the sync lines already written arrive, then drop them.
        std::thread::sleep(Duration::from_millis(150));
        while !ctx.queue.is_empty() {
            assert_eq!(next(ctx).values, [0.0]);
        }
    }

    #[test]
    fn reads_csv_lines_with_any_line_end_and_skips_malformed_ones() {
        let dir = tempfile::tempdir().unwrap();
        let mut pty = pty();
        let ctx = crate::source::test_ctx(dir.path());
        let handle = start(cfg(Path::new(&pty.path), LineFormat::Csv), &ctx);
        sync(&mut pty.master, &ctx);
        pty.master.write_all(b"1.5,2,3\r\n4,x,6\r\n# header\r\n7,8,9\r10,11,12\n").unwrap();
        // A line written in pieces is joined.
        pty.master.write_all(b"13,1").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        pty.master.write_all(b"4,15\n").unwrap();
        let v = next(&ctx);
        assert_eq!(v.values, [1.5, 2.0, 3.0]);
        assert_eq!(v.origin.as_deref(), Some(pty.path.as_str()));
        assert_eq!(next(&ctx).values, [7.0, 8.0, 9.0]);
        assert_eq!(next(&ctx).values, [10.0, 11.0, 12.0]);
        assert_eq!(next(&ctx).values, [13.0, 14.0, 15.0]);
        assert_eq!(ctx.metrics.errors.load(Relaxed), 1, "the malformed line is counted");
        stop(&ctx, handle);
    }

    #[test]
    fn reads_json_lines_and_drops_overlong_ones() {
        let dir = tempfile::tempdir().unwrap();
        let mut pty = pty();
        let ctx = crate::source::test_ctx(dir.path());
        let handle = start(cfg(Path::new(&pty.path), LineFormat::Json), &ctx);
        sync(&mut pty.master, &ctx);
        pty.master.write_all(b"{\"t\": 21.5, \"rh\": 40}\n").unwrap();
        let v = next(&ctx);
        assert_eq!(v.values, [21.5, 40.0]);
        assert_eq!(v.names, Some(vec!["t".to_string(), "rh".to_string()]));

        // 100 KiB with no line end, then a line: the long one is dropped, once.
        let writer = {
            let mut master = pty.master.try_clone().unwrap();
            std::thread::spawn(move || {
                let long = vec![b'7'; 100 * 1024];
                for piece in long.chunks(4096) {
                    master.write_all(piece).unwrap();
                }
                master.write_all(b"\n[1, 2]\n").unwrap();
            })
        };
        writer.join().unwrap();
        assert_eq!(next(&ctx).values, [1.0, 2.0]);
        assert_eq!(ctx.metrics.errors.load(Relaxed), 1);
        stop(&ctx, handle);
    }

    #[test]
    fn a_hang_up_ends_the_run_and_a_reopen_starts_clean() {
        let dir = tempfile::tempdir().unwrap();
        // The configured path is a symlink, as udev's /dev/serial/by-id names are,
        // so the "replugged" device can come back as another pty under the same name.
        let link = dir.path().join("ttyTEST");
        let mut first = pty();
        std::os::unix::fs::symlink(&first.path, &link).unwrap();
        let ctx = crate::source::test_ctx(dir.path());
        let handle = start(cfg(&link, LineFormat::Csv), &ctx);
        sync(&mut first.master, &ctx);
        first.master.write_all(b"1,2\n3,").unwrap();
        assert_eq!(next(&ctx).values, [1.0, 2.0]);
        std::thread::sleep(Duration::from_millis(50));
        // Unplugged: the master end goes away.
        drop(first);
        let e = failure(handle);
        assert!(e.contains("ttyTEST") && e.contains("hung up"), "{e}");
        assert!(ctx.queue.is_empty(), "the unfinished `3,` must not become a sample");

        // Gone for good: opening fails, naming the port.
        std::fs::remove_file(&link).unwrap();
        let e = run(&cfg(&link, LineFormat::Csv), &ctx).unwrap_err().0;
        assert!(e.contains("ttyTEST") && e.contains("not plugged in"), "{e}");

        // Back: the source is reopened and reads the new device from a clean line.
        let mut second = pty();
        std::os::unix::fs::symlink(&second.path, &link).unwrap();
        let handle = start(cfg(&link, LineFormat::Csv), &ctx);
        sync(&mut second.master, &ctx);
        second.master.write_all(b"4,5\n").unwrap();
        assert_eq!(next(&ctx).values, [4.0, 5.0]);
        stop(&ctx, handle);
    }

    #[test]
    fn the_first_line_after_opening_is_dropped_as_possibly_partial() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = crate::source::test_ctx(dir.path());
        let mut lines = SerialLines::new(&ctx, LineFormat::Csv, "p".into());
        assert!(lines.feed(b"5,6\r\n7,8\n"));
        assert_eq!(ctx.queue.len(), 1);
        assert_eq!(next(&ctx).values, [7.0, 8.0]);
        // An overlong first line is only resynchronised on, not counted.
        let mut lines = SerialLines::new(&ctx, LineFormat::Csv, "p".into());
        assert!(lines.feed(&vec![b'1'; MAX_LINE_BYTES + 10]));
        assert!(lines.feed(b"\n9\n"));
        assert_eq!(next(&ctx).values, [9.0]);
        assert_eq!(ctx.metrics.errors.load(Relaxed), 0);
    }
}
