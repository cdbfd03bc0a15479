//! The `iio` source: Linux Industrial I/O sensors (accelerometers, gyroscopes,
//! ADCs, temperature, pressure, humidity) read through sysfs, with the
//! kernel's scale and offset applied.
//!
//! The device is found under `root` (default `/sys/bus/iio/devices`) by
//! directory name (`iio:device0`), by the content of its `name` file
//! (`lis3dh`), or as a path (anything with a `/`). For each channel the source
//! reads `<channel>_raw` and computes `(raw + offset) * scale`, as the kernel's
//! ABI defines it, with scale and offset taken from the most specific file
//! present: `<channel>_scale`, then the type-level `in_accel_scale`, then the
//! direction-level `in_scale`, then the device-level `scale` (absent: scale 1,
//! offset 0). A channel that only has `<channel>_input` is already processed
//! by its driver and is used as it is; when both exist, `_input` wins, since a
//! driver that offers it may be correcting for what a linear scale cannot.
//! Results are in the IIO ABI's units, the same as `_input`: m/s² for
//! acceleration, rad/s for angular velocity, milli-°C for temperature, mV for
//! voltage, kPa for pressure.
//!
//! Scale and offset are read once when the source opens (again on every
//! reopen). Samples are paced against absolute deadlines (sample `n` is due
//! at `start + n / rate_hz`), so the rate does not drift; a source that falls
//! more than a period behind skips the slots it missed rather than bursting
//! to catch up, and counts them in `dropped.late_samples`.
//!
//! Every read opens the attribute file afresh: a sysfs attribute is
//! re-evaluated by the driver on each read anyway, and opening by path makes a
//! vanished device (module unloaded, USB sensor unplugged) fail with an error
//! naming the file, after which the daemon reopens the source with backoff. A
//! value that does not parse as a number is counted in `errors` and its sample
//! skipped; an I/O error ends the run.
//!
//! Not built: the buffered interface (`/dev/iio:deviceN` with
//! `scan_elements` and a trigger), which high rates (above about 1 kHz) need.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime};

use super::config::SourceConfig;
use super::{SourceCtx, SourceEnd, SourceError};
use crate::message::{Input, Values};

/// How often the same kind of warning (late samples, unreadable values) is logged at most.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// The longest attribute value read; sysfs numbers are far shorter.
const MAX_VALUE_BYTES: usize = 128;

/// Runs the source until it ends, fails or is stopped.
pub fn run(cfg: &SourceConfig, ctx: &SourceCtx) -> Result<SourceEnd, SourceError> {
    let SourceConfig::Iio { device, channels, rate_hz, root } = cfg else {
        return Err(SourceError(format!("iio source started with a `{}` source config", cfg.kind())));
    };
    if !(rate_hz.is_finite() && *rate_hz > 0.0) {
        return Err(SourceError(format!("iio source: `rate_hz` must be a positive number, got {rate_hz}")));
    }
    let root = ctx.base_dir.join(root);
    let dev = IioDevice::open(&root, device, channels, &ctx.base_dir)?;
    log::info!("pipeline `{}`: {} at {} Hz", ctx.pipeline, dev.describe(), rate_hz);
    sample(&dev, *rate_hz, ctx)
}

/// Reads the device at `rate_hz` until stopped or a read fails.
fn sample(dev: &IioDevice, rate_hz: f64, ctx: &SourceCtx) -> Result<SourceEnd, SourceError> {
    let mut clock = SampleClock::new(Instant::now(), rate_hz);
    let mut garbled = RateLimited::default();
    let mut late = RateLimited::default();
    loop {
        if !ctx.sleep_until(clock.due()) {
            return Ok(SourceEnd::Stopped);
        }
        let captured = SystemTime::now();
        match dev.read()? {
            Ok(values) => {
                let input = Input::Values(Values { values, names: None, captured, origin: Some(dev.name.clone()) });
                if !ctx.push(input) {
                    return Ok(SourceEnd::Stopped);
                }
            }
            Err(why) => {
                ctx.metrics.errors.fetch_add(1, Relaxed);
                if let Some(n) = garbled.tick() {
                    log::warn!("pipeline `{}`: {why}; sample skipped ({n} so far)", ctx.pipeline);
                }
            }
        }
        let missed = clock.advance(Instant::now());
        if missed > 0 {
            ctx.metrics.dropped_late.fetch_add(missed, Relaxed);
            if let Some(n) = late.add(missed) {
                log::warn!(
                    "pipeline `{}`: iio source fell behind {rate_hz} Hz; {n} samples skipped so far",
                    ctx.pipeline
                );
            }
        }
    }
}

/// Counts events and says when to log them: the first, then at most once per [`LOG_EVERY`].
#[derive(Default)]
struct RateLimited {
    count: u64,
    logged: Option<Instant>,
}

impl RateLimited {
    /// Counts one event; the total when it should be logged.
    fn tick(&mut self) -> Option<u64> {
        self.add(1)
    }

    /// Counts `n` events; the total when they should be logged.
    fn add(&mut self, n: u64) -> Option<u64> {
        self.count += n;
        if self.logged.is_some_and(|t| t.elapsed() < LOG_EVERY) {
            return None;
        }
        self.logged = Some(Instant::now());
        Some(self.count)
    }
}

/// Drift-free sample deadlines: sample `n` is due at `start + n / rate`.
#[derive(Debug)]
struct SampleClock {
    start: Instant,
    rate: f64,
    n: u64,
}

impl SampleClock {
    fn new(start: Instant, rate: f64) -> Self {
        SampleClock { start, rate, n: 0 }
    }

    /// When the next sample is due.
    fn due(&self) -> Instant {
        self.start + Duration::from_secs_f64(self.n as f64 / self.rate)
    }

    /// Moves to the next sample after one was taken; if at `now` that one is
    /// already a whole period or more overdue, skips the slots that passed
    /// (so a stall does not release a burst). Returns how many were skipped.
    fn advance(&mut self, now: Instant) -> u64 {
        self.n += 1;
        let late = now.saturating_duration_since(self.due()).as_secs_f64();
        let missed = (late * self.rate).floor() as u64;
        self.n += missed;
        missed
    }
}

/// An opened IIO device: where each configured channel's value comes from.
#[derive(Debug)]
pub struct IioDevice {
    /// The device directory.
    pub dir: PathBuf,
    /// Its `name` (the directory name if it has none).
    pub name: String,
    channels: Vec<Channel>,
}

/// One channel: the file its value is read from and how to convert it.
#[derive(Debug)]
struct Channel {
    name: String,
    path: PathBuf,
    /// Scale and offset for a `_raw` value; None for an `_input` one.
    convert: Option<(f64, f64)>,
}

impl IioDevice {
    /// Finds `device` under `root` and checks that it has every channel,
    /// reading their scales and offsets. Relative paths resolve against `base`.
    pub fn open(root: &Path, device: &str, channels: &[String], base: &Path) -> Result<IioDevice, SourceError> {
        let dir = find_device(root, device, base)?;
        let name = match read_text(&dir.join("name")) {
            Ok(Some(name)) if !name.is_empty() => name,
            _ => dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| device.to_string()),
        };
        let mut opened = Vec::with_capacity(channels.len());
        for configured in channels {
            let chan =
                configured.strip_suffix("_raw").or_else(|| configured.strip_suffix("_input")).unwrap_or(configured);
            let input = dir.join(format!("{chan}_input"));
            let raw = dir.join(format!("{chan}_raw"));
            let channel = if input.is_file() {
                Channel { name: chan.to_string(), path: input, convert: None }
            } else if raw.is_file() {
                let scale = attribute(&dir, chan, "scale")?.unwrap_or(1.0);
                let offset = attribute(&dir, chan, "offset")?.unwrap_or(0.0);
                Channel { name: chan.to_string(), path: raw, convert: Some((scale, offset)) }
            } else {
                let have = available_channels(&dir);
                return Err(SourceError(format!(
                    "iio device `{name}` ({}): no channel `{chan}` (neither {chan}_raw nor {chan}_input exists); \
                     it has: {}",
                    dir.display(),
                    if have.is_empty() { "no channels".to_string() } else { have.join(", ") }
                )));
            };
            opened.push(channel);
        }
        Ok(IioDevice { dir, name, channels: opened })
    }

    /// One line for the log: the device and how each channel is converted.
    pub fn describe(&self) -> String {
        let chans: Vec<String> = self
            .channels
            .iter()
            .map(|c| match c.convert {
                Some((scale, offset)) => format!("{} = (raw + {offset}) * {scale}", c.name),
                None => format!("{} (processed)", c.name),
            })
            .collect();
        format!("iio device `{}` at {}: {}", self.name, self.dir.display(), chans.join(", "))
    }

    /// Reads every channel once, in configured order. The outer error is an
    /// I/O failure (the device is gone); the inner one a value that is not a number.
    pub fn read(&self) -> Result<Result<Vec<f32>, String>, SourceError> {
        let mut values = Vec::with_capacity(self.channels.len());
        for c in &self.channels {
            let text = read_text(&c.path)?
                .ok_or_else(|| SourceError(format!("iio device `{}`: {} disappeared", self.name, c.path.display())))?;
            let Ok(x) = text.parse::<f64>() else {
                return Ok(Err(format!("{}: `{}` is not a number", c.path.display(), excerpt(&text))));
            };
            let (scale, offset) = c.convert.unwrap_or((1.0, 0.0));
            let v = ((x + offset) * scale) as f32;
            if !v.is_finite() {
                return Ok(Err(format!("{}: {text} gives {v}, not a finite value", c.path.display())));
            }
            values.push(v);
        }
        Ok(Ok(values))
    }
}

/// The device directory for `device`: a path, `iio:deviceN` under `root`, or
/// the device under `root` whose `name` file says `device`.
fn find_device(root: &Path, device: &str, base: &Path) -> Result<PathBuf, SourceError> {
    if device.contains('/') {
        let dir = base.join(device);
        return if dir.is_dir() {
            Ok(dir)
        } else {
            Err(SourceError(format!("iio source: device {} is not a directory", dir.display())))
        };
    }
    let devices = list_devices(root)?;
    let listing = || {
        if devices.is_empty() {
            format!("{} lists no IIO devices (is the driver loaded? see `dmesg`)", root.display())
        } else {
            let all: Vec<String> = devices
                .iter()
                .map(|(dir, name)| match name {
                    Some(n) => format!("{dir} ({n})"),
                    None => dir.clone(),
                })
                .collect();
            format!("devices: {}", all.join(", "))
        }
    };
    if let Some((dir, _)) = devices.iter().find(|(dir, _)| dir == device) {
        return Ok(root.join(dir));
    }
    let named: Vec<&String> =
        devices.iter().filter(|(_, name)| name.as_deref() == Some(device)).map(|(dir, _)| dir).collect();
    match named.as_slice() {
        [] => Err(SourceError(format!("iio source: no device `{device}` under {}; {}", root.display(), listing()))),
        [one] => Ok(root.join(one)),
        [first, rest @ ..] => {
            let others: Vec<&str> = rest.iter().map(|s| s.as_str()).collect();
            log::warn!(
                "iio source: several devices are named `{device}`; using {first} (others: {}); \
                 set `device` to a path to choose",
                others.join(", ")
            );
            Ok(root.join(first))
        }
    }
}

/// `(directory name, name file)` of every `iio:deviceN` under `root`, by N.
fn list_devices(root: &Path) -> Result<Vec<(String, Option<String>)>, SourceError> {
    let entries = std::fs::read_dir(root).map_err(|e| {
        let hint = if e.kind() == ErrorKind::NotFound { " (no IIO driver is loaded)" } else { "" };
        SourceError(format!("iio source: {}: {e}{hint}", root.display()))
    })?;
    let mut devices: Vec<(u64, String, Option<String>)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let dir = e.file_name().to_string_lossy().into_owned();
            let n = dir.strip_prefix("iio:device")?.parse::<u64>().ok()?;
            let name = read_text(&e.path().join("name")).ok().flatten();
            Some((n, dir, name))
        })
        .collect();
    devices.sort();
    Ok(devices.into_iter().map(|(_, dir, name)| (dir, name)).collect())
}

/// The channels of a device: every `<channel>_raw` and `<channel>_input`, sorted.
fn available_channels(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter_map(|e| {
                    let file = e.file_name().to_string_lossy().into_owned();
                    let chan = file.strip_suffix("_raw").or_else(|| file.strip_suffix("_input"))?;
                    Some(chan.to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names.dedup();
    names
}

/// The files an attribute (`scale`, `offset`) of `chan` may come from, most
/// specific first, as the kernel names them: `in_accel_x_scale` (this
/// channel), `in_accel_scale` (shared by type), `in_scale` (by direction),
/// `scale` (by the whole device).
fn attribute_files(chan: &str, attr: &str) -> Vec<String> {
    let mut files = vec![format!("{chan}_{attr}")];
    if let Some((dir, rest)) = chan.split_once('_') {
        let kind: String = rest.chars().take_while(|c| c.is_ascii_lowercase()).collect();
        let by_type = format!("{dir}_{kind}_{attr}");
        if !kind.is_empty() && by_type != files[0] {
            files.push(by_type);
        }
        files.push(format!("{dir}_{attr}"));
    }
    files.push(attr.to_string());
    files
}

/// The value of `chan`'s attribute from the most specific file present; None if none is.
fn attribute(dir: &Path, chan: &str, attr: &str) -> Result<Option<f64>, SourceError> {
    for file in attribute_files(chan, attr) {
        let path = dir.join(&file);
        if let Some(text) = read_text(&path)? {
            return match text.parse::<f64>() {
                Ok(x) if x.is_finite() => Ok(Some(x)),
                _ => Err(SourceError(format!("iio source: {}: `{}` is not a number", path.display(), excerpt(&text)))),
            };
        }
    }
    Ok(None)
}

/// A short attribute file's content, trimmed; None if it does not exist.
fn read_text(path: &Path) -> Result<Option<String>, SourceError> {
    let io_err = |e: std::io::Error| SourceError(format!("iio source: {}: {e}", path.display()));
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(e)),
    };
    let mut buf = [0u8; MAX_VALUE_BYTES];
    let mut len = 0;
    loop {
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => {
                len += n;
                if len == buf.len() {
                    return Err(SourceError(format!(
                        "iio source: {}: longer than {MAX_VALUE_BYTES} bytes, not an attribute value",
                        path.display()
                    )));
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err(e)),
        }
    }
    Ok(Some(String::from_utf8_lossy(&buf[..len]).trim().to_string()))
}

/// At most 40 characters of `s`, for messages.
fn excerpt(s: &str) -> String {
    match s.char_indices().nth(40) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::Relaxed;
    use std::thread::JoinHandle;

    use super::*;
    use crate::source::testing::{failure, next, stop};

    /// Writes a sysfs-shaped device directory `root/dir` with `files` (name, content).
    fn device(root: &Path, dir: &str, files: &[(&str, &str)]) -> PathBuf {
        let path = root.join(dir);
        std::fs::create_dir_all(&path).unwrap();
        for (name, content) in files {
            std::fs::write(path.join(name), format!("{content}\n")).unwrap();
        }
        path
    }

    fn lis3dh(root: &Path) -> PathBuf {
        device(
            root,
            "iio:device1",
            &[
                ("name", "lis3dh"),
                ("in_accel_x_raw", "100"),
                ("in_accel_y_raw", "-50"),
                ("in_accel_z_raw", "1000"),
                ("in_accel_scale", "0.5"),
                ("in_accel_x_offset", "10"),
                ("in_accel_z_scale", "0.25"),
                ("in_temp_raw", "0"),
                ("in_temp_input", "23500"),
                ("in_voltage0_raw", "7"),
                ("in_voltage1_raw", "-3"),
                ("in_voltage_offset", "1.5"),
                ("sampling_frequency", "100"),
            ],
        )
    }

    fn cfg(root: &Path, device: &str, channels: &[&str], rate_hz: f64) -> SourceConfig {
        SourceConfig::Iio {
            device: device.into(),
            channels: channels.iter().map(|c| c.to_string()).collect(),
            rate_hz,
            root: root.to_path_buf(),
        }
    }

    fn start(cfg: SourceConfig, ctx: &SourceCtx) -> JoinHandle<Result<SourceEnd, SourceError>> {
        let ctx = ctx.clone();
        std::thread::spawn(move || run(&cfg, &ctx))
    }

    #[test]
    fn applies_scale_and_offset_the_kernel_way() {
        let root = tempfile::tempdir().unwrap();
        device(root.path(), "iio:device0", &[("name", "bme280"), ("in_temp_input", "1")]);
        lis3dh(root.path());
        let ctx = crate::source::test_ctx(root.path());
        let chans = ["in_accel_x", "in_accel_y", "in_accel_z", "in_temp", "in_voltage0", "in_voltage1_raw"];
        let handle = start(cfg(root.path(), "lis3dh", &chans, 50.0), &ctx);
        let v = next(&ctx);
        // x: (100 + 10) * 0.5 (its own offset, the type's scale); y: -50 * 0.5;
        // z: its own scale wins over the type's; temp: `_input` as is, no scale;
        // voltages: the type's offset, no scale anywhere.
        assert_eq!(v.values, [55.0, -25.0, 250.0, 23500.0, 8.5, -1.5]);
        assert_eq!(v.origin.as_deref(), Some("lis3dh"));
        assert!(v.names.is_none());
        stop(&ctx, handle);
        assert_eq!(ctx.metrics.errors.load(Relaxed), 0);
    }

    #[test]
    fn finds_the_device_by_name_directory_or_path() {
        let root = tempfile::tempdir().unwrap();
        device(root.path(), "iio:device0", &[("name", "bme280"), ("in_pressure_input", "101.325")]);
        let dir = lis3dh(root.path());
        device(root.path(), "trigger0", &[("name", "lis3dh")]);
        let chans = ["in_accel_y".to_string()];
        for how in ["lis3dh", "iio:device1", dir.to_str().unwrap()] {
            let dev = IioDevice::open(root.path(), how, &chans, Path::new("/")).unwrap();
            assert_eq!(dev.dir, dir, "{how}");
            assert_eq!(dev.name, "lis3dh");
            assert_eq!(dev.read().unwrap().unwrap(), [-25.0]);
        }
        // Relative paths resolve against the config's directory.
        let dev = IioDevice::open(Path::new("/nonexistent"), "./iio:device1", &chans, root.path()).unwrap();
        assert_eq!(dev.name, "lis3dh");

        let e = IioDevice::open(root.path(), "mpu6050", &chans, Path::new("/")).unwrap_err().0;
        assert!(e.contains("no device `mpu6050`"), "{e}");
        assert!(e.contains("iio:device0 (bme280), iio:device1 (lis3dh)"), "{e}");
        assert!(!e.contains("trigger0"), "{e}");
        let e = IioDevice::open(&root.path().join("none"), "lis3dh", &chans, Path::new("/")).unwrap_err().0;
        assert!(e.contains("none") && e.contains("no IIO driver"), "{e}");
    }

    #[test]
    fn a_missing_channel_is_an_error_listing_those_there_are() {
        let root = tempfile::tempdir().unwrap();
        lis3dh(root.path());
        let ctx = crate::source::test_ctx(root.path());
        let e = run(&cfg(root.path(), "lis3dh", &["in_accel_x", "in_anglvel_x"], 10.0), &ctx).unwrap_err().0;
        assert!(e.contains("no channel `in_anglvel_x`"), "{e}");
        assert!(e.contains("it has: in_accel_x, in_accel_y, in_accel_z, in_temp, in_voltage0, in_voltage1"), "{e}");
    }

    #[test]
    fn an_unparsable_scale_is_an_error_naming_the_file() {
        let root = tempfile::tempdir().unwrap();
        let dir = lis3dh(root.path());
        std::fs::write(dir.join("in_accel_scale"), "fast\n").unwrap();
        let e = IioDevice::open(root.path(), "lis3dh", &["in_accel_y".into()], Path::new("/")).unwrap_err().0;
        assert!(e.contains("in_accel_scale") && e.contains("`fast` is not a number"), "{e}");
    }

    #[test]
    fn values_changing_between_reads_are_picked_up_and_garbage_is_skipped() {
        let root = tempfile::tempdir().unwrap();
        let dir = lis3dh(root.path());
        let ctx = crate::source::test_ctx(root.path());
        let handle = start(cfg(root.path(), "iio:device1", &["in_accel_x", "in_temp"], 100.0), &ctx);
        assert_eq!(next(&ctx).values, [55.0, 23500.0]);
        // Written in place, as sysfs values change: the same inode, new content.
        std::fs::write(dir.join("in_accel_x_raw"), "-210\n").unwrap();
        std::fs::write(dir.join("in_temp_input"), "24000\n").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while next(&ctx).values != [-100.0, 24000.0] {
            assert!(Instant::now() < deadline, "the new values never arrived");
        }
        // A value that is not a number skips samples, counted, without ending the source.
        std::fs::write(dir.join("in_accel_x_raw"), "n/a\n").unwrap();
        while ctx.metrics.errors.load(Relaxed) == 0 {
            assert!(Instant::now() < deadline + Duration::from_secs(5), "the bad value was not counted");
            std::thread::sleep(Duration::from_millis(5));
        }
        std::fs::write(dir.join("in_accel_x_raw"), "0\n").unwrap();
        while next(&ctx).values != [5.0, 24000.0] {
            assert!(Instant::now() < deadline + Duration::from_secs(5), "the source did not recover");
        }
        assert!(!handle.is_finished());
        stop(&ctx, handle);
    }

    #[test]
    fn a_removed_device_ends_the_run_with_an_error_naming_the_file() {
        let root = tempfile::tempdir().unwrap();
        let dir = lis3dh(root.path());
        let ctx = crate::source::test_ctx(root.path());
        let handle = start(cfg(root.path(), "lis3dh", &["in_accel_z"], 100.0), &ctx);
        assert_eq!(next(&ctx).values, [250.0]);
        std::fs::remove_dir_all(&dir).unwrap();
        let e = failure(handle);
        assert!(e.contains("in_accel_z_raw"), "{e}");
        // Reopening now fails, saying what is there instead.
        device(root.path(), "iio:device0", &[("name", "bme280")]);
        let e = run(&cfg(root.path(), "lis3dh", &["in_accel_z"], 100.0), &ctx).unwrap_err().0;
        assert!(e.contains("iio:device0 (bme280)"), "{e}");
    }

    #[test]
    fn scale_is_read_once_per_open() {
        let root = tempfile::tempdir().unwrap();
        let dir = lis3dh(root.path());
        let chans = ["in_accel_y".to_string()];
        let dev = IioDevice::open(root.path(), "lis3dh", &chans, Path::new("/")).unwrap();
        std::fs::write(dir.join("in_accel_scale"), "2\n").unwrap();
        assert_eq!(dev.read().unwrap().unwrap(), [-25.0]);
        let reopened = IioDevice::open(root.path(), "lis3dh", &chans, Path::new("/")).unwrap();
        assert_eq!(reopened.read().unwrap().unwrap(), [-100.0]);
    }

    #[test]
    fn a_slow_rate_still_stops_promptly() {
        let root = tempfile::tempdir().unwrap();
        lis3dh(root.path());
        let ctx = crate::source::test_ctx(root.path());
        let handle = start(cfg(root.path(), "lis3dh", &["in_accel_x"], 0.2), &ctx);
        assert_eq!(next(&ctx).values, [55.0]);
        stop(&ctx, handle);
    }

    #[test]
    fn attribute_files_follow_the_kernel_sharing_levels() {
        assert_eq!(attribute_files("in_accel_x", "scale"), ["in_accel_x_scale", "in_accel_scale", "in_scale", "scale"]);
        assert_eq!(attribute_files("in_voltage3", "offset")[1], "in_voltage_offset");
        assert_eq!(attribute_files("in_voltage0-voltage1", "scale")[1], "in_voltage_scale");
        assert_eq!(attribute_files("in_humidityrelative", "scale"), ["in_humidityrelative_scale", "in_scale", "scale"]);
        assert_eq!(attribute_files("in_temp", "offset"), ["in_temp_offset", "in_offset", "offset"]);
        assert_eq!(attribute_files("in_rot_from_north_magnetic", "scale")[1], "in_rot_scale");
    }

    #[test]
    fn the_clock_does_not_drift_and_skips_what_it_missed() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut clock = SampleClock::new(t0, 100.0);
        assert_eq!(clock.due(), t0);
        // Each sample taken a little late: deadlines stay on the 10 ms grid.
        for i in 1..=1000u64 {
            assert_eq!(clock.advance(clock.due() + ms(3)), 0);
            assert_eq!(clock.due(), t0 + ms(10 * i));
        }
        // Late by less than a period: no skip, the next sample is due at once.
        let due = clock.due();
        assert_eq!(clock.advance(due + ms(19)), 0);
        assert_eq!(clock.due(), due + ms(10));
        // A 45 ms stall after the sample due at `due`: the slots at +10..+40 passed.
        let due = clock.due();
        assert_eq!(clock.advance(due + ms(45)), 3);
        assert_eq!(clock.due(), due + ms(40));
    }
}
