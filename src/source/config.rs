//! A pipeline's `source` table: one variant per input kind, parsed into
//! typed values and checked on their own, and what each kind gives the
//! stages after it ([`SourceOutput`]), which preprocessing is checked against.

use std::path::PathBuf;

use serde::Deserialize;

use crate::message::{Gives, SourceOutput};

/// Synthetic signal shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Signal {
    /// A sine per channel (phase-shifted), plus noise.
    Sine,
    /// Gaussian noise.
    Noise,
    /// A square wave.
    Steps,
    /// Rotating-machine vibration cycling through normal, imbalance, misalignment, bearing fault.
    Vibration,
    /// Camera test frames: a moving pattern.
    Frames,
}

/// Line formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LineFormat {
    /// `[1.0, 2.0, 3.0]` or `{"name": 1.0, ...}`.
    Json,
    /// `1.0,2.0,3.0`.
    Csv,
}

/// MQTT payload formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PayloadFormat {
    /// A JSON array (or object of named features).
    Json,
    /// A CSV line.
    Csv,
    /// Raw little-endian f32 values.
    F32le,
    /// A JPEG or PNG image.
    Image,
}

fn default_rate() -> f64 {
    100.0
}
fn default_channels() -> usize {
    3
}
fn one() -> f32 {
    1.0
}
fn five() -> f32 {
    5.0
}
fn noise_default() -> f32 {
    0.05
}
fn side() -> u32 {
    64
}
fn fps_default() -> f64 {
    10.0
}
fn files_rate() -> f64 {
    1.0
}
fn anomaly_len() -> f64 {
    1.0
}
fn segment_s() -> f64 {
    10.0
}
fn stdin() -> String {
    "stdin".into()
}
fn json_lines() -> LineFormat {
    LineFormat::Json
}

/// Input sources.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum SourceConfig {
    /// Generated signals or frames: runs with no hardware.
    Synthetic {
        /// Waveform or `frames`.
        signal: Signal,
        /// Samples per second (sensor signals).
        #[serde(default = "default_rate")]
        rate_hz: f64,
        /// Channels per sample.
        #[serde(default = "default_channels")]
        channels: usize,
        /// Peak amplitude.
        #[serde(default = "one")]
        amplitude: f32,
        /// Sine / step frequency.
        #[serde(default = "five")]
        frequency_hz: f32,
        /// Noise standard deviation.
        #[serde(default = "noise_default")]
        noise: f32,
        /// Inject an anomaly (a burst of large spikes) every N seconds.
        #[serde(default)]
        anomaly_every_s: Option<f64>,
        /// How long each anomaly lasts.
        #[serde(default = "anomaly_len")]
        anomaly_duration_s: f64,
        /// `vibration`: seconds per machine state.
        #[serde(default = "segment_s")]
        segment_s: f64,
        /// Frame width (`frames`).
        #[serde(default = "side")]
        width: u32,
        /// Frame height (`frames`).
        #[serde(default = "side")]
        height: u32,
        /// Frames per second (`frames`).
        #[serde(default = "fps_default")]
        fps: f64,
        /// Stop after this many samples or frames (default: never).
        #[serde(default)]
        count: Option<u64>,
        /// Random seed.
        #[serde(default)]
        seed: u64,
    },
    /// Images or `.npy` files replayed from a directory or glob.
    Files {
        /// A directory, a file or a glob such as `data/*.png`.
        path: String,
        /// Files per second (0: as fast as the model takes them).
        #[serde(default = "files_rate")]
        rate_hz: f64,
        /// Start again after the last file.
        #[serde(default, rename = "loop")]
        repeat: bool,
    },
    /// JSON arrays or CSV lines from stdin, a file (followed) or a named pipe.
    Lines {
        /// `stdin` or a path.
        #[serde(default = "stdin")]
        from: String,
        /// Line format.
        #[serde(default = "json_lines")]
        format: LineFormat,
    },
    /// Messages on an MQTT topic of the configured broker.
    Mqtt {
        /// Topic filter (wildcards allowed).
        topic: String,
        /// Payload format.
        format: PayloadFormat,
        /// Subscription QoS.
        #[serde(default)]
        qos: u8,
    },
    /// Frames or audio read from a command's stdout (ffmpeg, rpicam-vid, gst-launch, arecord).
    Pipe {
        /// Program and arguments, e.g. `["ffmpeg", "-i", "rtsp://cam/1", "-f", "mjpeg", "-"]`.
        command: Vec<String>,
        /// What the command writes on stdout.
        format: StreamFormat,
        /// Frame width (`rgb24`, `gray8`).
        #[serde(default)]
        width: Option<u32>,
        /// Frame height (`rgb24`, `gray8`).
        #[serde(default)]
        height: Option<u32>,
        /// Samples per second per channel (`s16le`, `f32le`).
        #[serde(default = "sample_rate_default")]
        sample_rate: u32,
        /// Interleaved audio channels (`s16le`, `f32le`).
        #[serde(default = "one_usize")]
        channels: usize,
        /// Audio handed on per push (`s16le`, `f32le`).
        #[serde(default = "chunk_ms_default")]
        chunk_ms: u32,
        /// Frames per second passed on at most (others are dropped and counted).
        #[serde(default)]
        max_fps: Option<f64>,
        /// Start the command again when it exits (false: a clean exit ends the source).
        #[serde(default = "yes")]
        restart: bool,
        /// Kill and restart the command when it writes nothing for this long (0: never).
        #[serde(default = "stall_default")]
        stall_timeout_s: f64,
    },
    /// A V4L2 camera (`/dev/videoN`).
    V4l2 {
        /// Device path.
        #[serde(default = "video0")]
        device: String,
        /// Requested width.
        #[serde(default = "width_default")]
        width: u32,
        /// Requested height.
        #[serde(default = "height_default")]
        height: u32,
        /// Requested capture rate (default: the driver's).
        #[serde(default)]
        fps: Option<u32>,
        /// Pixel format (default: MJPEG if offered, else YUYV).
        #[serde(default)]
        pixel_format: Option<PixelFormat>,
        /// Frames per second passed on at most.
        #[serde(default)]
        max_fps: Option<f64>,
    },
    /// An HTTP camera: an MJPEG stream or JPEG snapshots.
    Http {
        /// `http://host[:port]/path`.
        url: String,
        /// `stream` (multipart/x-mixed-replace) or `snapshot` (poll a JPEG).
        #[serde(default)]
        mode: HttpMode,
        /// Time between snapshots.
        #[serde(default = "interval_ms_default")]
        interval_ms: u64,
        /// Connect and read timeout.
        #[serde(default = "timeout_ms_default")]
        timeout_ms: u64,
        /// Frames per second passed on at most.
        #[serde(default)]
        max_fps: Option<f64>,
        /// Basic-auth user name (instead of `user:password@` in the URL).
        #[serde(default)]
        username: Option<String>,
        /// Environment variable holding the basic-auth password.
        #[serde(default)]
        password_env: Option<String>,
        /// File holding the basic-auth password (first line).
        #[serde(default)]
        password_file: Option<PathBuf>,
    },
    /// A Linux IIO sensor read through sysfs.
    Iio {
        /// `iio:device0`, the device's `name` (e.g. `lis3dh`), or a path.
        device: String,
        /// Channel names, e.g. `["in_accel_x", "in_accel_y", "in_accel_z"]`.
        channels: Vec<String>,
        /// Samples per second.
        #[serde(default = "default_rate")]
        rate_hz: f64,
        /// Where IIO devices are listed.
        #[serde(default = "iio_root")]
        root: PathBuf,
    },
    /// Lines from a serial port (UART, USB serial: an Arduino printing CSV).
    Serial {
        /// Device path, e.g. `/dev/ttyUSB0`.
        port: String,
        /// Baud rate.
        #[serde(default = "baud_default")]
        baud: u32,
        /// Line format.
        #[serde(default = "json_lines")]
        format: LineFormat,
    },
}

/// What a pipe source's command writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamFormat {
    /// Concatenated JPEG images (`-f mjpeg`, `--codec mjpeg`).
    Mjpeg,
    /// Raw RGB frames of `width` x `height`.
    Rgb24,
    /// Raw 8-bit grey frames of `width` x `height`.
    Gray8,
    /// Signed 16-bit little-endian PCM.
    S16le,
    /// 32-bit float little-endian PCM.
    F32le,
}

impl StreamFormat {
    /// True for audio formats.
    pub fn is_audio(self) -> bool {
        matches!(self, StreamFormat::S16le | StreamFormat::F32le)
    }
}

/// V4L2 pixel formats edgeinfer decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PixelFormat {
    /// Motion JPEG.
    Mjpeg,
    /// YUV 4:2:2 packed.
    Yuyv,
}

/// HTTP camera modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HttpMode {
    /// `multipart/x-mixed-replace` MJPEG stream.
    #[default]
    Stream,
    /// Poll a JPEG URL.
    Snapshot,
}

fn yes() -> bool {
    true
}
fn stall_default() -> f64 {
    10.0
}
fn sample_rate_default() -> u32 {
    16_000
}
fn one_usize() -> usize {
    1
}
fn chunk_ms_default() -> u32 {
    100
}
fn video0() -> String {
    "/dev/video0".into()
}
fn width_default() -> u32 {
    640
}
fn height_default() -> u32 {
    480
}
fn interval_ms_default() -> u64 {
    1000
}
fn timeout_ms_default() -> u64 {
    5000
}
fn iio_root() -> PathBuf {
    PathBuf::from("/sys/bus/iio/devices")
}
fn baud_default() -> u32 {
    115_200
}

impl SourceConfig {
    /// True for sources that produce camera-like frames (newest wins).
    pub fn is_frames(&self) -> bool {
        match self {
            SourceConfig::Synthetic { signal, .. } => *signal == Signal::Frames,
            SourceConfig::Mqtt { format, .. } => *format == PayloadFormat::Image,
            SourceConfig::Pipe { format, .. } => !format.is_audio(),
            SourceConfig::V4l2 { .. } | SourceConfig::Http { .. } => true,
            _ => false,
        }
    }

    /// The `type` key's value.
    pub fn kind(&self) -> &'static str {
        match self {
            SourceConfig::Synthetic { .. } => "synthetic",
            SourceConfig::Files { .. } => "files",
            SourceConfig::Lines { .. } => "lines",
            SourceConfig::Mqtt { .. } => "mqtt",
            SourceConfig::Pipe { .. } => "pipe",
            SourceConfig::V4l2 { .. } => "v4l2",
            SourceConfig::Http { .. } => "http",
            SourceConfig::Iio { .. } => "iio",
            SourceConfig::Serial { .. } => "serial",
        }
    }

    /// The Cargo feature this source type is compiled in with, if it is optional.
    pub fn feature(&self) -> Option<&'static str> {
        match self {
            SourceConfig::V4l2 { .. } => Some("v4l2"),
            SourceConfig::Http { .. } => Some("http-source"),
            SourceConfig::Serial { .. } => Some("serial"),
            _ => None,
        }
    }
}

/// A finite number above zero (NaN is not).
fn positive(x: f64) -> bool {
    x > 0.0 && x.is_finite()
}

impl SourceConfig {
    /// Checks the values on their own; the error is (key under `source.`, reason).
    pub fn validate(&self) -> Result<(), (String, String)> {
        validate_source(self)
    }

    /// What this source gives the stages after it.
    pub fn output(&self) -> SourceOutput {
        let gives = match self {
            s if s.is_frames() => Gives::Frames,
            SourceConfig::Files { .. } => Gives::Unknown,
            _ => Gives::Values,
        };
        let pcm = match self {
            SourceConfig::Pipe { format: StreamFormat::S16le | StreamFormat::F32le, sample_rate, channels, .. } => {
                Some((*sample_rate, *channels))
            }
            _ => None,
        };
        SourceOutput { kind: self.kind(), gives, per_origin: matches!(self, SourceConfig::Mqtt { .. }), pcm }
    }
}

fn validate_source(s: &SourceConfig) -> Result<(), (String, String)> {
    let err = |k: &str, r: &str| Err((k.to_string(), r.to_string()));
    match s {
        SourceConfig::Synthetic {
            rate_hz,
            channels,
            fps,
            width,
            height,
            segment_s,
            anomaly_every_s,
            anomaly_duration_s,
            ..
        } => {
            if !positive(*segment_s) {
                return err("segment_s", "must be positive");
            }
            if anomaly_every_s.is_some_and(|a| !positive(a)) {
                return err("anomaly_every_s", "must be positive");
            }
            if !(positive(*anomaly_duration_s) || *anomaly_duration_s == 0.0) {
                return err("anomaly_duration_s", "must not be negative");
            }
            if !(*rate_hz > 0.0 && *rate_hz <= 100_000.0) {
                return err("rate_hz", "must be in (0, 100000]");
            }
            if *channels == 0 || *channels > crate::preprocess::window::MAX_CHANNELS {
                return Err(("channels".into(), format!("must be 1..={}", crate::preprocess::window::MAX_CHANNELS)));
            }
            if !(*fps > 0.0 && *fps <= 1000.0) {
                return err("fps", "must be in (0, 1000]");
            }
            if *width == 0 || *height == 0 || *width > 8192 || *height > 8192 {
                return err("width", "width and height must be 1..=8192");
            }
        }
        SourceConfig::Files { rate_hz, path, .. } => {
            if !(*rate_hz == 0.0 || positive(*rate_hz)) {
                return err("rate_hz", "must be a finite number >= 0");
            }
            if path.is_empty() {
                return err("path", "must not be empty");
            }
        }
        SourceConfig::Lines { from, .. } => {
            if from.is_empty() {
                return err("from", "`stdin` or a path");
            }
        }
        SourceConfig::Mqtt { topic, qos, .. } => {
            if !crate::mqtt::valid_filter(topic) {
                return err(
                    "topic",
                    "not a valid MQTT topic filter (`+` and `#` must fill a whole level; `#` only last)",
                );
            }
            if *qos > 2 {
                return err("qos", "must be 0, 1 or 2");
            }
        }
        SourceConfig::Pipe {
            command,
            format,
            width,
            height,
            sample_rate,
            channels,
            chunk_ms,
            max_fps,
            stall_timeout_s,
            ..
        } => {
            if !(*stall_timeout_s == 0.0 || positive(*stall_timeout_s)) {
                return err("stall_timeout_s", "must be a finite number >= 0");
            }
            if command.first().is_none_or(|c| c.trim().is_empty()) {
                return err("command", "needs a program, e.g. [\"ffmpeg\", \"-i\", \"...\", \"-\"]");
            }
            if matches!(format, StreamFormat::Rgb24 | StreamFormat::Gray8) {
                match (width, height) {
                    (Some(w), Some(h)) if (1..=8192).contains(w) && (1..=8192).contains(h) => {}
                    (Some(_), Some(_)) => return err("width", "width and height must be 1..=8192"),
                    _ => return err("width", "raw frames need `width` and `height`"),
                }
            }
            if format.is_audio() {
                if !(1..=384_000).contains(sample_rate) {
                    return err("sample_rate", "must be 1..=384000");
                }
                if *channels == 0 || *channels > crate::preprocess::window::MAX_CHANNELS {
                    return Err((
                        "channels".into(),
                        format!("must be 1..={}", crate::preprocess::window::MAX_CHANNELS),
                    ));
                }
                if !(1..=10_000).contains(chunk_ms) {
                    return err("chunk_ms", "must be 1..=10000");
                }
            }
            check_max_fps(*max_fps)?;
        }
        SourceConfig::V4l2 { device, width, height, fps, max_fps, .. } => {
            if device.is_empty() {
                return err("device", "a path such as /dev/video0");
            }
            if *width == 0 || *height == 0 || *width > 8192 || *height > 8192 {
                return err("width", "width and height must be 1..=8192");
            }
            if fps.is_some_and(|f| f == 0 || f > 1000) {
                return err("fps", "must be 1..=1000");
            }
            check_max_fps(*max_fps)?;
        }
        SourceConfig::Http { url, interval_ms, timeout_ms, max_fps, username, password_env, password_file, .. } => {
            if !url.starts_with("http://") {
                return err("url", "must be an http://host[:port]/path URL (HTTPS is not supported yet)");
            }
            #[cfg(feature = "http-source")]
            let in_url = crate::source::http::Target::parse(url).map_err(|e| ("url".to_string(), e))?.has_credentials();
            // Without the feature, `Config::validate` has refused the source already.
            #[cfg(not(feature = "http-source"))]
            let in_url = false;
            if password_env.is_some() && password_file.is_some() {
                return err("password_env", "give password_env or password_file, not both");
            }
            if username.is_some() && in_url {
                return err("username", "give the credentials in the URL or as username/password_*, not both");
            }
            if username.is_none() && (password_env.is_some() || password_file.is_some()) {
                return err("username", "password_env / password_file need a username");
            }
            if *interval_ms == 0 {
                return err("interval_ms", "must be positive");
            }
            if *timeout_ms == 0 {
                return err("timeout_ms", "must be positive");
            }
            check_max_fps(*max_fps)?;
        }
        SourceConfig::Iio { device, channels, rate_hz, .. } => {
            if device.is_empty() {
                return err("device", "`iio:deviceN`, a device name or a path");
            }
            if channels.is_empty() || channels.len() > crate::preprocess::window::MAX_CHANNELS {
                return Err((
                    "channels".into(),
                    format!("list 1 to {} channel names", crate::preprocess::window::MAX_CHANNELS),
                ));
            }
            if !(*rate_hz > 0.0 && *rate_hz <= 10_000.0) {
                return err("rate_hz", "must be in (0, 10000]");
            }
        }
        SourceConfig::Serial { port, baud, .. } => {
            if port.is_empty() {
                return err("port", "a device path such as /dev/ttyUSB0");
            }
            if *baud == 0 {
                return err("baud", "must be positive");
            }
        }
    }
    Ok(())
}

fn check_max_fps(max_fps: Option<f64>) -> Result<(), (String, String)> {
    match max_fps {
        Some(f) if !(f > 0.0 && f <= 1000.0) => Err(("max_fps".into(), "must be in (0, 1000]".into())),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Result<(), (String, String)> {
        toml::from_str::<SourceConfig>(text).expect("parses").validate()
    }

    #[test]
    fn raw_frames_over_8192_pixels_a_side_are_refused_naming_the_key() {
        let pipe = |w: u32, h: u32| {
            format!("type = \"pipe\"\nformat = \"rgb24\"\nwidth = {w}\nheight = {h}\ncommand = [\"cat\"]")
        };
        for (w, h) in [(8193, 10), (10, 8193), (0, 10)] {
            let (key, why) = check(&pipe(w, h)).unwrap_err();
            assert_eq!(key, "width");
            assert!(why.contains("1..=8192"), "{why}");
        }
        check(&pipe(8192, 8192)).expect("8192 x 8192 is allowed");
    }
}
