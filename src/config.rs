//! The daemon's TOML configuration: serde structs that reject unknown keys,
//! defaults that work, and `load` which also resolves paths (relative to the
//! config file) and validates values, naming the key at fault.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

use crate::message::Overflow;
use crate::postprocess::Softmax;
use crate::preprocess::{ColorOrder, Layout, ResizeMode};

/// A configuration that cannot be used.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("{path}: cannot read: {reason}")]
    Read {
        /// The file.
        path: String,
        /// OS error.
        reason: String,
    },
    /// TOML syntax, an unknown key or a wrong type (the message names key and line).
    #[error("{path}: {reason}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message.
        reason: String,
    },
    /// A value that parses but makes no sense.
    #[error("{path}: `{key}`: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// Dotted key path, e.g. `pipelines[0].source.rate_hz`.
        key: String,
        /// Why.
        reason: String,
    },
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Device id used in topics and payloads (default: the host name).
    #[serde(default)]
    pub device: Option<String>,
    /// The broker to publish to; absent (or without `url`): the embedded broker.
    #[serde(default)]
    pub mqtt: MqttConfig,
    /// The embedded broker, started when `mqtt.url` is absent.
    #[serde(default)]
    pub broker: BrokerConfig,
    /// Health reports.
    #[serde(default)]
    pub health: HealthConfig,
    /// Shutdown behaviour.
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    /// Home Assistant MQTT discovery (off unless `enabled = true`).
    #[serde(default)]
    pub homeassistant: crate::homeassistant::HomeAssistantConfig,
    /// Remote commands over MQTT (off unless `enabled = true`).
    #[serde(default)]
    pub commands: crate::commands::CommandsConfig,
    /// Engine settings shared by every pipeline: threads and the start-up cache.
    #[serde(default)]
    pub engine: EngineConfig,
    /// The pipelines: source -> preprocess -> model -> postprocess -> outputs.
    #[serde(default)]
    pub pipelines: Vec<PipelineConfig>,
    /// Directory of the config file; relative paths resolve against it.
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// The config file (read again by `reload_config` and SIGHUP).
    #[serde(skip)]
    pub path: PathBuf,
}

/// MQTT client settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// `mqtt://host:port`; absent: start the embedded broker and use it.
    pub url: Option<String>,
    /// Client id; `{device}` is replaced.
    pub client_id: String,
    /// Keep-alive interval.
    pub keep_alive_s: u64,
    /// User name, if the broker wants one.
    pub username: Option<String>,
    /// Environment variable holding the password.
    pub password_env: Option<String>,
    /// File holding the password (first line).
    pub password_file: Option<PathBuf>,
    /// Results held in memory while the broker is unreachable; the oldest are dropped beyond it.
    pub buffer: usize,
    /// First reconnect delay.
    pub reconnect_min_ms: u64,
    /// Longest reconnect delay.
    pub reconnect_max_ms: u64,
    /// Retained availability topic (`online` / `offline`).
    pub status_topic: String,
    /// Retained health topic.
    pub health_topic: String,
    /// TLS for an `mqtts://` URL (`[mqtt.tls]`); absent: the system CA certificates, no client certificate.
    pub tls: Option<MqttTlsConfig>,
    /// Store-and-forward directory for QoS 1/2 results (relative: to the config file); absent: memory only.
    pub queue_dir: Option<PathBuf>,
    /// The disk queue's segment files never exceed this; the oldest are dropped beyond it.
    pub queue_max_bytes: u64,
    /// Queued results older than this are dropped.
    pub queue_max_age_s: u64,
    /// When queued results are forced to disk: `always`, `never` or an interval like `100ms`.
    pub queue_fsync: String,
    /// MQTT protocol version: `"3.1.1"` (default) or `"5"`.
    pub protocol: String,
    /// MQTT 5: results not delivered within this many seconds expire (on the broker and here).
    pub message_expiry_s: Option<u64>,
    /// MQTT 5: user properties added to every message (`{ site = "barn" }`).
    pub user_properties: std::collections::BTreeMap<String, String>,
}

impl MqttConfig {
    /// The protocol version (validated by [`Config::load`]).
    pub fn protocol(&self) -> crate::sink::mqtt_proto::Protocol {
        crate::sink::mqtt_proto::Protocol::parse(&self.protocol).unwrap_or_default()
    }
}

/// `[mqtt.tls]`: how to talk TLS to an `mqtts://` broker.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttTlsConfig {
    /// CA certificates (PEM) that sign the broker's certificate; absent: the system CA certificates.
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain (PEM) for mutual TLS.
    pub cert_file: Option<PathBuf>,
    /// Client private key (PEM file, unencrypted).
    pub key_file: Option<PathBuf>,
    /// Environment variable holding the client private key as PEM text (instead of key_file).
    pub key_env: Option<String>,
    /// ALPN protocols to offer, e.g. `["x-amzn-mqtt-ca"]` for AWS IoT Core on port 443.
    pub alpn: Vec<String>,
    /// Name the broker's certificate must be valid for, instead of the URL host.
    pub server_name: Option<String>,
    /// Accept any broker certificate: encrypted but not authenticated (tests only; logged as an error).
    pub insecure_skip_verify: bool,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            url: None,
            client_id: "edgeinfer-{device}".into(),
            keep_alive_s: 30,
            username: None,
            password_env: None,
            password_file: None,
            buffer: 1000,
            reconnect_min_ms: 500,
            reconnect_max_ms: 30_000,
            status_topic: "edgeinfer/{device}/status".into(),
            health_topic: "edgeinfer/{device}/health".into(),
            tls: None,
            queue_dir: None,
            queue_max_bytes: 64 << 20,
            queue_max_age_s: 7 * 24 * 3600,
            queue_fsync: "100ms".into(),
            protocol: "3.1.1".into(),
            message_expiry_s: None,
            user_properties: Default::default(),
        }
    }
}

/// `[engine]`: how models load and run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Threads for tract's matrix products and edgeinfer's convolutions, per pipeline (a pipeline's `threads` overrides it).
    pub threads: usize,
    /// Start-up cache directory (relative: to the config file); absent: no cache.
    pub cache_dir: Option<PathBuf>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig { threads: 1, cache_dir: None }
    }
}

/// A `threads` value: in range, and above 1 only with the `threads` feature.
fn check_threads(threads: usize) -> Result<(), String> {
    if !(1..=MAX_THREADS).contains(&threads) {
        return Err(format!("must be 1..={MAX_THREADS}"));
    }
    if threads > 1 {
        crate::features::require("threads", "more than one thread")?;
    }
    Ok(())
}

/// Most threads a model may ask for.
pub const MAX_THREADS: usize = 256;

/// The in-process broker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// Address to listen on.
    pub listen: String,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig { listen: "127.0.0.1:1883".into() }
    }
}

/// Health reporting.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Seconds between health messages (0 disables them).
    pub interval_s: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig { interval_s: 30 }
    }
}

/// Shutdown.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// How long to keep publishing queued results after SIGINT/SIGTERM.
    pub drain_timeout_ms: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig { drain_timeout_ms: 3000 }
    }
}

/// One pipeline.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Name used in topics and payloads.
    pub name: String,
    /// The ONNX model.
    pub model: PathBuf,
    /// Labels file (default: found next to the model).
    #[serde(default)]
    pub labels: Option<PathBuf>,
    /// Shape of the model's first input, when it is symbolic.
    #[serde(default)]
    pub input_shape: Option<Vec<usize>>,
    /// Run a QDQ int8 model on float kernels (faster in tract today; activation rounding is lost).
    #[serde(default)]
    pub qdq_as_float: bool,
    /// Threads for this pipeline's model (default: `engine.threads`).
    #[serde(default)]
    pub threads: Option<usize>,
    /// Items queued between source and model.
    #[serde(default)]
    pub queue: Option<usize>,
    /// What to do when the queue is full.
    #[serde(default)]
    pub overflow: Option<Overflow>,
    /// Where inputs come from.
    pub source: SourceConfig,
    /// How inputs become tensors.
    #[serde(default)]
    pub preprocess: PreprocessConfig,
    /// How outputs become results.
    #[serde(default)]
    pub postprocess: Option<PostprocessConfig>,
    /// Where results go (default: one MQTT output with default settings).
    #[serde(default)]
    pub outputs: Vec<OutputConfig>,
    /// JPEG snapshots of frames with their detections drawn (camera pipelines).
    #[serde(default)]
    pub snapshot: Option<SnapshotConfig>,
}

/// When a snapshot is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotWhen {
    /// When something was detected.
    #[default]
    Detection,
    /// For any result (still bounded by `min_interval_s`).
    Every,
}

/// Snapshot settings (`[pipelines.snapshot]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotConfig {
    /// MQTT topic; `{device}` and `{pipeline}` are filled in.
    pub topic: String,
    /// `detection` or `every`.
    pub when: SnapshotWhen,
    /// At most one snapshot per this many seconds.
    pub min_interval_s: f64,
    /// JPEG quality, 1 to 100.
    pub quality: u8,
    /// Frames wider than this are scaled down first.
    pub max_width: u32,
    /// MQTT retain flag (the latest snapshot is what a new subscriber gets).
    pub retain: bool,
    /// MQTT QoS.
    pub qos: u8,
    /// Also write the latest snapshot to this file (replaced atomically).
    pub path: Option<PathBuf>,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        SnapshotConfig {
            topic: "edgeinfer/{device}/{pipeline}/snapshot".into(),
            when: SnapshotWhen::Detection,
            min_interval_s: 5.0,
            quality: 80,
            max_width: 640,
            retain: true,
            qos: 0,
            path: None,
        }
    }
}

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

/// Sample order in a window tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WindowLayout {
    /// `[1, channels, window]`.
    ChannelsFirst,
    /// `[1, window, channels]`.
    ChannelsLast,
}

/// Preprocessing.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum PreprocessConfig {
    /// Chosen from the source and the model: images for frames, windows for
    /// sensor samples on a 3-D input, tabular rows on a 2-D input, tensors as is.
    #[default]
    Auto,
    /// Decode, resize, colour order, layout, normalisation.
    Image {
        /// Resize mode.
        #[serde(default)]
        resize: ResizeMode,
        /// Channel order.
        #[serde(default)]
        color: ColorOrder,
        /// Layout (guessed from the input shape when absent).
        #[serde(default)]
        layout: Option<Layout>,
        /// Pixel multiplier (default 1/255).
        #[serde(default)]
        scale: Option<f32>,
        /// Per-channel mean.
        #[serde(default)]
        mean: Option<[f32; 3]>,
        /// Per-channel std.
        #[serde(default)]
        std: Option<[f32; 3]>,
    },
    /// Sliding windows over sensor samples.
    Window {
        /// Samples per window (default: from the model input).
        #[serde(default)]
        window: Option<usize>,
        /// Samples between windows (default: the window: no overlap).
        #[serde(default)]
        hop: Option<usize>,
        /// Channels per sample (default: from the model input).
        #[serde(default)]
        channels: Option<usize>,
        /// Tensor layout (default: guessed from the model input).
        #[serde(default)]
        layout: Option<WindowLayout>,
        /// Per-channel value subtracted first.
        #[serde(default)]
        mean: Option<Vec<f32>>,
        /// Per-channel divisor applied after the mean.
        #[serde(default)]
        std: Option<Vec<f32>>,
    },
    /// One row of features per input.
    Tabular {
        /// Feature names in model order, for JSON objects.
        #[serde(default)]
        features: Option<Vec<String>>,
        /// Per-feature value subtracted first.
        #[serde(default)]
        mean: Option<Vec<f32>>,
        /// Per-feature divisor applied after the mean.
        #[serde(default)]
        std: Option<Vec<f32>>,
    },
    /// Sliding windows over PCM audio, raw or as log-mel features.
    Audio(crate::preprocess::audio::AudioConfig),
    /// The input already is the tensor (`.npy` files).
    None,
}

fn top3() -> usize {
    3
}

/// What the anomaly score is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnomalyScore {
    /// The first value of the output.
    #[default]
    Output,
    /// Mean squared error between the input tensor and the output (autoencoders).
    Reconstruction,
    /// 1 - probability of `normal_class` (classifiers).
    NotClass,
}

/// Postprocessing.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum PostprocessConfig {
    /// Class scores with labels.
    Classify {
        /// Classes reported.
        #[serde(default = "top3")]
        top_k: usize,
        /// Classes scoring below are left out.
        #[serde(default)]
        min_score: f32,
        /// Softmax policy.
        #[serde(default)]
        softmax: Softmax,
        /// Output name (default: the first class-shaped output).
        #[serde(default)]
        output: Option<String>,
    },
    /// Raw values (regression).
    Values {
        /// Output name (default: the first).
        #[serde(default)]
        output: Option<String>,
    },
    /// An anomaly score compared with a threshold.
    Anomaly {
        /// Score at or above which the input is anomalous.
        threshold: f32,
        /// How the score is computed.
        #[serde(default)]
        score: AnomalyScore,
        /// For `not_class`: the label of the normal class.
        #[serde(default)]
        normal_class: Option<String>,
        /// Output name (default: the first).
        #[serde(default)]
        output: Option<String>,
    },
    /// Object detection: boxes with labels and scores.
    Detect(DetectConfig),
}

/// Output layouts of object detectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DetectFormat {
    /// One output [1, N, 5+C]: cx, cy, w, h, objectness, class scores.
    Yolov5,
    /// One output [1, 4+C, N] (YOLOv8, YOLO11): cx, cy, w, h, class scores.
    Yolov8,
    /// Separate boxes [1, N, 4], classes [1, N], scores [1, N] and optional count [1] (TF OD API).
    Ssd,
}

/// Order of the four coordinates of an SSD-style box.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BoxOrder {
    /// y1, x1, y2, x2 (TensorFlow).
    Yxyx,
    /// x1, y1, x2, y2.
    Xyxy,
}

/// Units of box coordinates in the model output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BoxUnits {
    /// Model-input pixels.
    Pixels,
    /// Fractions 0..1 of the model input's width and height.
    Normalized,
}

fn quarter() -> f32 {
    0.25
}
fn hundred() -> usize {
    100
}

/// Object-detection postprocessing (`type = "detect"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectConfig {
    /// Output layout; guessed from the output shapes (and label count) when absent.
    #[serde(default)]
    pub format: Option<DetectFormat>,
    /// YOLO output in the other axis order: [1, N, 4+C] for yolov8, [1, 5+C, N] for yolov5.
    #[serde(default)]
    pub transposed: Option<bool>,
    /// Confidence below which a detection is dropped.
    #[serde(default = "quarter")]
    pub min_score: f32,
    /// Per-label confidence thresholds that replace `min_score`, e.g. `{ person = 0.6 }`.
    #[serde(default)]
    pub class_thresholds: std::collections::BTreeMap<String, f32>,
    /// Report only these labels (default: every label).
    #[serde(default)]
    pub classes: Option<Vec<String>>,
    /// Class-wise non-maximum suppression: a box overlapping a better one of its class by more
    /// than this IoU is dropped (default 0.45 for YOLO; SSD outputs are suppressed by the model).
    #[serde(default)]
    pub iou_threshold: Option<f32>,
    /// Most detections reported per result, best first.
    #[serde(default = "hundred")]
    pub max_detections: usize,
    /// Box units in the output (default: pixels for YOLO, normalized for SSD).
    #[serde(default)]
    pub box_units: Option<BoxUnits>,
    /// SSD box coordinate order (default yxyx).
    #[serde(default)]
    pub box_order: Option<BoxOrder>,
    /// SSD: added to the class id to index the labels (-1 when ids start at 1 and line 1 is class 1).
    #[serde(default)]
    pub class_offset: i64,
    /// YOLO: the output to decode (default: the only 3-D output).
    #[serde(default)]
    pub output: Option<String>,
    /// SSD: name of the boxes output (default: found by name or shape).
    #[serde(default)]
    pub boxes_output: Option<String>,
    /// SSD: name of the classes output.
    #[serde(default)]
    pub classes_output: Option<String>,
    /// SSD: name of the scores output.
    #[serde(default)]
    pub scores_output: Option<String>,
    /// SSD: name of the detection count output (optional).
    #[serde(default)]
    pub count_output: Option<String>,
}

impl DetectConfig {
    /// Checks value ranges; the error is (key, reason).
    pub fn validate(&self) -> Result<(), (String, String)> {
        let unit = |x: f32| (0.0..=1.0).contains(&x);
        if !unit(self.min_score) {
            return Err(("min_score".into(), format!("{} is not in 0..=1", self.min_score)));
        }
        if let Some((label, t)) = self.class_thresholds.iter().find(|(_, t)| !unit(**t)) {
            return Err((format!("class_thresholds.{label}"), format!("{t} is not in 0..=1")));
        }
        if self.iou_threshold.is_some_and(|t| !(t > 0.0 && t <= 1.0)) {
            return Err(("iou_threshold".into(), "must be in (0, 1] (1 keeps every box)".into()));
        }
        if self.max_detections == 0 {
            return Err(("max_detections".into(), "must be at least 1".into()));
        }
        if self.classes.as_ref().is_some_and(|c| c.is_empty()) {
            return Err(("classes".into(), "an empty list would report nothing; leave it out for every label".into()));
        }
        Ok(())
    }
}

/// Output kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputKind {
    /// Publish to the MQTT broker.
    Mqtt,
    /// JSON lines on stdout.
    Stdout,
    /// JSON lines in a file, rotated by size.
    File,
}

/// When an output publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum When {
    /// Every result.
    #[default]
    Every,
    /// When the top class changes (after `debounce` consecutive results agree).
    OnChange,
    /// When the score crosses `threshold` (with `debounce` and `hysteresis`).
    Threshold,
}

fn default_topic() -> String {
    "edgeinfer/{device}/{pipeline}/result".into()
}
fn debounce_one() -> u32 {
    1
}
fn ten_mib() -> u64 {
    10 * 1024 * 1024
}
fn keep_five() -> usize {
    5
}

/// One output of a pipeline.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// `mqtt`, `stdout` or `file`.
    #[serde(rename = "type")]
    pub kind: OutputKind,
    /// MQTT topic template: `{device}`, `{pipeline}`, `{model}`, `{label}`.
    #[serde(default = "default_topic")]
    pub topic: String,
    /// MQTT QoS 0, 1 or 2.
    #[serde(default)]
    pub qos: u8,
    /// MQTT retain flag.
    #[serde(default)]
    pub retain: bool,
    /// File path (`file` outputs).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Rotate the file when it would grow past this size.
    #[serde(default = "ten_mib")]
    pub max_bytes: u64,
    /// Rotated files kept (`path.1` newest ... `path.N`).
    #[serde(default = "keep_five")]
    pub keep: usize,
    /// Publish policy.
    #[serde(default)]
    pub when: When,
    /// Consecutive results needed before a change or crossing counts.
    #[serde(default = "debounce_one")]
    pub debounce: u32,
    /// Threshold for `when = "threshold"` (default: the anomaly threshold).
    #[serde(default)]
    pub threshold: Option<f32>,
    /// A crossing back down needs score < threshold - hysteresis.
    #[serde(default)]
    pub hysteresis: f32,
    /// For `threshold`: score of this class instead of the anomaly or top score.
    #[serde(default)]
    pub class: Option<String>,
}

impl OutputConfig {
    /// An MQTT output with every default.
    pub fn default_mqtt() -> Self {
        toml::from_str("type = \"mqtt\"").expect("defaults parse")
    }
}

/// Most inputs a pipeline queue may hold.
pub const MAX_QUEUE: usize = 1_000_000;

/// Reads the host name for the default device id.
fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "edgeinfer".into())
}

/// True for names safe inside an MQTT topic level.
fn is_topic_safe(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::Read { path: shown.clone(), reason: e.to_string() })?;
        let mut cfg = Config::parse(&text, &shown)?;
        // `edgeinfer run app.toml` has an empty parent: that is the current directory.
        cfg.base_dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        cfg.path = path.to_path_buf();
        cfg.validate(&shown)?;
        Ok(cfg)
    }

    /// Parses TOML text (no validation).
    pub fn parse(text: &str, shown: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse { path: shown.into(), reason: one_line(&e.to_string()) })
    }

    /// The device id.
    pub fn device(&self) -> String {
        self.device.clone().unwrap_or_else(host_name)
    }

    /// A path from the config, resolved against the config's directory.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    /// Checks values and fills defaults that depend on other keys.
    pub fn validate(&mut self, shown: &str) -> Result<(), ConfigError> {
        let bad = |key: String, reason: String| ConfigError::Invalid { path: shown.into(), key, reason };
        let device = self.device();
        if !is_topic_safe(&device) {
            return Err(bad("device".into(), format!("`{device}` must be letters, digits, `-`, `_` or `.`")));
        }
        if let Some(url) = &self.mqtt.url {
            parse_mqtt_url(url).map_err(|r| bad("mqtt.url".into(), r))?;
            if is_tls_url(url) {
                crate::features::require("tls", "an mqtts:// broker").map_err(|r| bad("mqtt.url".into(), r))?;
            }
        }
        if let Some(tls) = &self.mqtt.tls {
            validate_tls(tls, self.mqtt.url.as_deref())
                .map_err(|(k, r)| bad(if k.is_empty() { "mqtt.tls".into() } else { format!("mqtt.tls.{k}") }, r))?;
        }
        if self.mqtt.password_env.is_some() && self.mqtt.password_file.is_some() {
            return Err(bad("mqtt.password_env".into(), "give password_env or password_file, not both".into()));
        }
        if self.mqtt.keep_alive_s < 5 {
            return Err(bad("mqtt.keep_alive_s".into(), "must be at least 5".into()));
        }
        if self.mqtt.buffer == 0 {
            return Err(bad("mqtt.buffer".into(), "must be at least 1".into()));
        }
        crate::sink::disk_queue::FsyncPolicy::parse(&self.mqtt.queue_fsync)
            .map_err(|r| bad("mqtt.queue_fsync".into(), r))?;
        if self.mqtt.queue_max_bytes < 4096 {
            return Err(bad("mqtt.queue_max_bytes".into(), "must be at least 4096".into()));
        }
        if self.mqtt.queue_max_age_s == 0 {
            return Err(bad("mqtt.queue_max_age_s".into(), "must be at least 1".into()));
        }
        let protocol = crate::sink::mqtt_proto::Protocol::parse(&self.mqtt.protocol)
            .map_err(|r| bad("mqtt.protocol".into(), r))?;
        if protocol != crate::sink::mqtt_proto::Protocol::V5 {
            let v5_only = |key: &str| {
                bad(
                    format!("mqtt.{key}"),
                    "is an MQTT 5 property: set mqtt.protocol = \"5\" (the broker must speak MQTT 5)".into(),
                )
            };
            if self.mqtt.message_expiry_s.is_some() {
                return Err(v5_only("message_expiry_s"));
            }
            if !self.mqtt.user_properties.is_empty() {
                return Err(v5_only("user_properties"));
            }
        } else if self.mqtt.url.is_none() {
            return Err(bad(
                "mqtt.protocol".into(),
                "\"5\" needs an external broker (mqtt.url): the embedded broker speaks MQTT 3.1.1".into(),
            ));
        }
        if let Some(e) = self.mqtt.message_expiry_s {
            if e == 0 || e > u32::MAX as u64 {
                return Err(bad("mqtt.message_expiry_s".into(), format!("must be between 1 and {}", u32::MAX)));
            }
        }
        if self.mqtt.reconnect_min_ms == 0 || self.mqtt.reconnect_max_ms < self.mqtt.reconnect_min_ms {
            return Err(bad("mqtt.reconnect_max_ms".into(), "need 0 < reconnect_min_ms <= reconnect_max_ms".into()));
        }
        self.broker.listen.parse::<std::net::SocketAddr>().map_err(|e| bad("broker.listen".into(), e.to_string()))?;
        self.homeassistant.validate().map_err(|(k, r)| bad(format!("homeassistant.{k}"), r))?;
        self.commands.validate().map_err(|(k, r)| bad(format!("commands.{k}"), r))?;
        check_threads(self.engine.threads).map_err(|r| bad("engine.threads".into(), r))?;
        if let Some(dir) = &self.engine.cache_dir {
            let dir = self.resolve(dir);
            if dir.exists() && !dir.is_dir() {
                return Err(bad("engine.cache_dir".into(), format!("{} is not a directory", dir.display())));
            }
        }
        if self.pipelines.is_empty() {
            return Err(bad("pipelines".into(), "at least one [[pipelines]] table is needed".into()));
        }
        let mut names = std::collections::HashSet::new();
        let mut file_paths = std::collections::HashSet::new();
        for (key, topic) in
            [("mqtt.status_topic", &self.mqtt.status_topic), ("mqtt.health_topic", &self.mqtt.health_topic)]
        {
            let rendered = topic.replace("{device}", &device);
            if rendered.contains(['{', '}']) || !crate::sink::mqtt::valid_topic(&rendered) {
                return Err(bad(
                    key.into(),
                    format!("`{topic}` is not a valid topic (placeholder: {{device}}; no `+` or `#`)"),
                ));
            }
        }
        for ix in 0..self.pipelines.len() {
            let key = |k: &str| format!("pipelines[{ix}].{k}");
            let p = &self.pipelines[ix];
            if !is_topic_safe(&p.name) {
                return Err(bad(key("name"), format!("`{}` must be letters, digits, `-`, `_` or `.`", p.name)));
            }
            if !names.insert(p.name.clone()) {
                return Err(bad(key("name"), format!("`{}` is used by two pipelines", p.name)));
            }
            let model = self.resolve(&p.model);
            if !model.is_file() {
                return Err(bad(key("model"), format!("{} does not exist", model.display())));
            }
            if let Some(l) = &p.labels {
                let l = self.resolve(l);
                if !l.is_file() {
                    return Err(bad(key("labels"), format!("{} does not exist", l.display())));
                }
            }
            if let Some(t) = p.threads {
                check_threads(t).map_err(|r| bad(key("threads"), r))?;
            }
            if p.queue.is_some_and(|q| q == 0 || q > MAX_QUEUE) {
                return Err(bad(key("queue"), format!("must be 1..={MAX_QUEUE}")));
            }
            if let Some(feature) = p.source.feature() {
                crate::features::require(feature, &format!("source type `{}`", p.source.kind()))
                    .map_err(|r| bad(key("source.type"), r))?;
            }
            validate_source(&p.source).map_err(|(k, r)| bad(key(&format!("source.{k}")), r))?;
            if let Some(PostprocessConfig::Anomaly { threshold, .. }) = &p.postprocess {
                if !threshold.is_finite() {
                    return Err(bad(key("postprocess.threshold"), "must be a finite number".into()));
                }
            }
            if let Some(PostprocessConfig::Anomaly { score: AnomalyScore::NotClass, normal_class: None, .. }) =
                &p.postprocess
            {
                return Err(bad(key("postprocess.normal_class"), "needed when score = \"not_class\"".into()));
            }
            if let Some(PostprocessConfig::Detect(d)) = &p.postprocess {
                d.validate().map_err(|(k, r)| bad(key(&format!("postprocess.{k}")), r))?;
            }
            if let PreprocessConfig::Audio(a) = &p.preprocess {
                crate::preprocess::audio::AudioPlan::resolve(a, &p.source)
                    .map_err(|e| bad(key(&format!("preprocess.{}", e.key)), e.reason))?;
            }
            if let PreprocessConfig::Window { window, hop, .. } = &p.preprocess {
                if window.is_some_and(|w| w == 0 || w > crate::preprocess::window::MAX_WINDOW) {
                    return Err(bad(
                        key("preprocess.window"),
                        format!("must be 1..={}", crate::preprocess::window::MAX_WINDOW),
                    ));
                }
                if hop.is_some_and(|h| h == 0) {
                    return Err(bad(key("preprocess.hop"), "must be at least 1".into()));
                }
            }
            if let Some(snap) = &p.snapshot {
                let skey = |k: &str| key(&format!("snapshot.{k}"));
                if !(p.source.is_frames() || matches!(p.source, SourceConfig::Files { .. })) {
                    return Err(bad(
                        key("snapshot"),
                        format!("needs a camera source (this one is {})", p.source.kind()),
                    ));
                }
                if !(snap.min_interval_s >= 0.0 && snap.min_interval_s.is_finite()) {
                    return Err(bad(skey("min_interval_s"), "must be a finite number >= 0".into()));
                }
                if !(1..=100).contains(&snap.quality) {
                    return Err(bad(skey("quality"), "must be 1..=100".into()));
                }
                if !(16..=8192).contains(&snap.max_width) {
                    return Err(bad(skey("max_width"), "must be 16..=8192".into()));
                }
                if snap.qos > 2 {
                    return Err(bad(skey("qos"), format!("{} is not 0, 1 or 2", snap.qos)));
                }
                let topic = snap.topic.replace("{device}", "d").replace("{pipeline}", "p");
                if !crate::sink::mqtt::valid_topic(&topic) {
                    return Err(bad(skey("topic"), "not a valid MQTT topic (no wildcards, not empty)".into()));
                }
            }
            let p = &mut self.pipelines[ix];
            if p.outputs.is_empty() {
                p.outputs.push(OutputConfig::default_mqtt());
            }
            for (ox, o) in p.outputs.iter().enumerate() {
                let okey = |k: &str| format!("pipelines[{ix}].outputs[{ox}].{k}");
                if o.qos > 2 {
                    return Err(bad(okey("qos"), format!("{} is not 0, 1 or 2", o.qos)));
                }
                if o.kind == OutputKind::File && o.path.is_none() {
                    return Err(bad(okey("path"), "a file output needs a path".into()));
                }
                if o.kind != OutputKind::File && o.path.is_some() {
                    return Err(bad(okey("path"), "only file outputs take a path".into()));
                }
                if o.debounce == 0 {
                    return Err(bad(okey("debounce"), "must be at least 1".into()));
                }
                if !(o.hysteresis >= 0.0 && o.hysteresis.is_finite()) {
                    return Err(bad(okey("hysteresis"), "must be a finite number >= 0".into()));
                }
                if o.threshold.is_some_and(|t| !t.is_finite()) {
                    return Err(bad(okey("threshold"), "must be a finite number".into()));
                }
                if o.kind == OutputKind::File {
                    let path = self.base_dir.join(o.path.as_deref().unwrap_or(Path::new("")));
                    if !file_paths.insert(path.clone()) {
                        return Err(bad(
                            okey("path"),
                            format!("{} is already written by another file output", path.display()),
                        ));
                    }
                }
                if o.when == When::Threshold
                    && o.threshold.is_none()
                    && !matches!(p.postprocess, Some(PostprocessConfig::Anomaly { .. }))
                {
                    return Err(bad(
                        okey("threshold"),
                        "needed for when = \"threshold\" without an anomaly postprocess".into(),
                    ));
                }
                for placeholder in o.topic.match_indices('{').map(|(i, _)| &o.topic[i..]) {
                    let name = placeholder.split('}').next().unwrap_or("");
                    if !matches!(name, "{device" | "{pipeline" | "{model" | "{label") {
                        return Err(bad(
                            okey("topic"),
                            format!(
                                "unknown placeholder `{name}}}` (use {{device}}, {{pipeline}}, {{model}}, {{label}})"
                            ),
                        ));
                    }
                }
                if o.topic.contains(['+', '#']) {
                    return Err(bad(okey("topic"), "a publish topic cannot contain `+` or `#`".into()));
                }
            }
        }
        // Checked last: the default output (MQTT) is filled in above.
        if self.mqtt.url.is_none() && self.wants_mqtt() {
            crate::features::require("broker", "a config without mqtt.url (it starts the embedded MQTT broker)")
                .map_err(|r| bad("mqtt.url".into(), format!("{r}; or set mqtt.url = \"mqtt://HOST:1883\"")))?;
        }
        Ok(())
    }

    /// True when the daemon talks MQTT: a broker URL is set, or something publishes or subscribes.
    pub fn wants_mqtt(&self) -> bool {
        self.mqtt.url.is_some() || self.uses_mqtt() || self.commands.enabled
    }

    /// True when any output or source needs the MQTT broker.
    pub fn uses_mqtt(&self) -> bool {
        self.pipelines.iter().any(|p| {
            matches!(p.source, SourceConfig::Mqtt { .. }) || p.outputs.iter().any(|o| o.kind == OutputKind::Mqtt)
        })
    }
}

/// A finite number above zero (NaN is not).
fn positive(x: f64) -> bool {
    x > 0.0 && x.is_finite()
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
            if !crate::sink::mqtt::valid_filter(topic) {
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

/// `[mqtt.tls]` without reading files: it needs an `mqtts://` URL, a certificate goes with a key.
fn validate_tls(tls: &MqttTlsConfig, url: Option<&str>) -> Result<(), (String, String)> {
    let err = |k: &str, r: &str| Err((k.to_string(), r.to_string()));
    match url {
        Some(u) if is_tls_url(u) => {}
        Some(_) => return err("", "TLS settings are given but mqtt.url is mqtt:// (plaintext): use mqtts://host:port"),
        None => return err("", "needs mqtt.url = \"mqtts://host:port\" (the embedded broker speaks plaintext)"),
    }
    if tls.key_file.is_some() && tls.key_env.is_some() {
        return err("key_env", "give key_file or key_env, not both");
    }
    if tls.cert_file.is_some() && tls.key_file.is_none() && tls.key_env.is_none() {
        return err("key_file", "cert_file needs key_file or key_env");
    }
    if tls.cert_file.is_none() && (tls.key_file.is_some() || tls.key_env.is_some()) {
        return err("cert_file", "a client key is set but no cert_file");
    }
    if let Some(p) = tls.alpn.iter().find(|p| p.is_empty() || p.len() > 255) {
        return err("alpn", &format!("`{p}`: each protocol must be 1 to 255 bytes"));
    }
    if tls.server_name.as_deref().is_some_and(str::is_empty) {
        return err("server_name", "must not be empty");
    }
    Ok(())
}

/// True for an `mqtts://` URL.
pub fn is_tls_url(url: &str) -> bool {
    url.starts_with("mqtts://")
}

/// Splits `mqtt://host[:port]` (default 1883) or `mqtts://host[:port]`
/// (TLS, default 8883) into host and port; [`is_tls_url`] tells which.
pub fn parse_mqtt_url(url: &str) -> Result<(String, u16), String> {
    let (rest, default_port) = match (url.strip_prefix("mqtt://"), url.strip_prefix("mqtts://")) {
        (Some(rest), _) => (rest, 1883),
        (None, Some(rest)) => (rest, 8883),
        (None, None) => return Err(format!("`{url}` is not an mqtt://host:port or mqtts://host:port URL")),
    };
    let rest = rest.trim_end_matches('/');
    if rest.contains('@') {
        return Err("credentials do not belong in the URL: use mqtt.username and password_env / password_file".into());
    }
    let port_of = |p: &str| p.parse::<u16>().map_err(|_| format!("`{p}` is not a port number"));
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        // [::1] or [::1]:1884
        let (h, after) = v6.split_once(']').ok_or_else(|| format!("`{url}`: unclosed `[`"))?;
        match after.strip_prefix(':') {
            Some(p) => (h.to_string(), port_of(p)?),
            None if after.is_empty() => (h.to_string(), default_port),
            None => return Err(format!("`{url}` is not an mqtt://host:port URL")),
        }
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), port_of(p)?),
            None => (rest.to_string(), default_port),
        }
    };
    if host.is_empty() || host.contains('/') {
        return Err(format!("`{url}` has no valid host"));
    }
    Ok((host, port))
}

fn one_line(s: &str) -> String {
    s.lines().map(str::trim).filter(|l| !l.is_empty() && *l != "|").collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
device = "pi-1"
[[pipelines]]
name = "vib"
model = "m.onnx"
source = { type = "synthetic", signal = "sine" }
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MINIMAL, "c.toml").unwrap();
        assert_eq!(c.mqtt.keep_alive_s, 30);
        assert!(c.mqtt.url.is_none());
        assert_eq!(c.broker.listen, "127.0.0.1:1883");
        assert!(matches!(c.pipelines[0].source, SourceConfig::Synthetic { rate_hz, .. } if rate_hz == 100.0));
    }

    #[test]
    fn engine_table_sets_threads_and_cache() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("m.onnx"), b"").unwrap();
        let with = |extra: &str, pipeline_extra: &str| {
            let text = format!(
                "{}\n{extra}\n",
                MINIMAL.replace("model = \"m.onnx\"", &format!("model = \"m.onnx\"\n{pipeline_extra}"))
            );
            let mut c = Config::parse(&text, "c.toml")?;
            c.base_dir = dir.path().to_path_buf();
            c.validate("c.toml").map(|_| c)
        };
        let c = with("", "").unwrap();
        assert_eq!((c.engine.threads, c.engine.cache_dir.as_deref(), c.pipelines[0].threads), (1, None, None));
        let c = with("[engine]\ncache_dir = \"cache\"", "threads = 1").unwrap();
        assert_eq!(c.resolve(c.engine.cache_dir.as_ref().unwrap()), dir.path().join("cache"));
        assert_eq!(c.pipelines[0].threads, Some(1));
        if cfg!(feature = "threads") {
            let c = with("[engine]\nthreads = 2", "threads = 4").unwrap();
            assert_eq!((c.engine.threads, c.pipelines[0].threads), (2, Some(4)));
        } else {
            // Without tract's thread pool, more than one thread is refused, naming the key and feature.
            for (engine, pipeline, key) in
                [("[engine]\nthreads = 2", "", "`engine.threads`"), ("", "threads = 4", "`pipelines[0].threads`")]
            {
                let e = with(engine, pipeline).unwrap_err().to_string();
                assert!(e.contains(key) && e.contains("the `threads` feature"), "{e}");
            }
        }
        let e = with("[engine]\nthreads = 0", "").unwrap_err().to_string();
        assert!(e.contains("`engine.threads`"), "{e}");
        let e = with("", "threads = 1000").unwrap_err().to_string();
        assert!(e.contains("`pipelines[0].threads`"), "{e}");
        let e = with("[engine]\ncache_dir = \"m.onnx\"", "").unwrap_err().to_string();
        assert!(e.contains("`engine.cache_dir`") && e.contains("not a directory"), "{e}");
        let e = with("[engine]\ncache = \"x\"", "").unwrap_err().to_string();
        assert!(e.contains("cache"), "{e}");
    }

    #[test]
    fn unknown_keys_are_named_with_their_line() {
        let text = MINIMAL.replace("device = \"pi-1\"", "device = \"pi-1\"\ncolour = 3");
        let e = Config::parse(&text, "c.toml").unwrap_err().to_string();
        assert!(e.contains("colour") && e.contains("line 3"), "{e}");
        let text = MINIMAL.replace("signal = \"sine\"", "signal = \"sine\", rate = 5");
        let e = Config::parse(&text, "c.toml").unwrap_err().to_string();
        assert!(e.contains("rate"), "{e}");
    }

    #[test]
    fn wrong_values_are_named() {
        let text = MINIMAL.replace("signal = \"sine\"", "signal = \"square\"");
        let e = Config::parse(&text, "c.toml").unwrap_err().to_string();
        assert!(e.contains("square"), "{e}");
        let mut c = Config::parse(&MINIMAL.replace("\"pi-1\"", "\"pi 1\""), "c.toml").unwrap();
        let e = c.validate("c.toml").unwrap_err().to_string();
        assert!(e.contains("`device`"), "{e}");
    }

    #[test]
    fn mqtt_urls_parse() {
        assert_eq!(parse_mqtt_url("mqtt://broker.local:1884").unwrap(), ("broker.local".into(), 1884));
        assert_eq!(parse_mqtt_url("mqtt://10.0.0.2").unwrap(), ("10.0.0.2".into(), 1883));
        assert!(parse_mqtt_url("http://x").is_err());
        assert!(parse_mqtt_url("mqtt://h:notaport").is_err());
        assert_eq!(parse_mqtt_url("mqtts://h").unwrap(), ("h".into(), 8883));
        assert_eq!(parse_mqtt_url("mqtts://h:443").unwrap(), ("h".into(), 443));
        assert_eq!(parse_mqtt_url("mqtts://[::1]").unwrap(), ("::1".into(), 8883));
        assert!(is_tls_url("mqtts://h") && !is_tls_url("mqtt://h"));
        assert_eq!(parse_mqtt_url("mqtt://[::1]").unwrap(), ("::1".into(), 1883));
        assert_eq!(parse_mqtt_url("mqtt://[::1]:1884").unwrap(), ("::1".into(), 1884));
        assert!(parse_mqtt_url("mqtt://user:pw@host:1883").unwrap_err().contains("credentials"));
    }

    #[test]
    fn optional_parts_this_build_lacks_are_refused_naming_the_feature() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("m.onnx"), b"").unwrap();
        let validate = |text: &str| {
            let mut c = Config::parse(text, "c.toml").unwrap();
            c.base_dir = dir.path().to_path_buf();
            c.validate("c.toml").map_err(|e| e.to_string())
        };
        let expect = |r: Result<(), String>, on: bool, key: &str, feature: &str| match r {
            Ok(()) => assert!(on, "{feature}: accepted without the feature"),
            Err(e) => {
                assert!(!on, "{feature}: {e}");
                assert!(e.contains(&format!("`{key}`")) && e.contains(&format!("the `{feature}` feature")), "{e}");
            }
        };
        // No URL and the default MQTT output: the embedded broker.
        expect(validate(MINIMAL), cfg!(feature = "broker"), "mqtt.url", "broker");
        // Nothing that talks MQTT: no broker needed, in any build.
        let stdout_only = format!("{MINIMAL}  [[pipelines.outputs]]\n  type = \"stdout\"\n");
        validate(&stdout_only).unwrap();
        let tls = format!("[mqtt]\nurl = \"mqtts://b\"\n{}", MINIMAL.replace("device = \"pi-1\"", ""));
        expect(validate(&tls), cfg!(feature = "tls"), "mqtt.url", "tls");
        for (source, feature) in [
            ("{ type = \"serial\", port = \"/dev/ttyUSB0\" }", "serial"),
            ("{ type = \"http\", url = \"http://cam/\" }", "http-source"),
            ("{ type = \"v4l2\" }", "v4l2"),
        ] {
            let text = stdout_only.replace("{ type = \"synthetic\", signal = \"sine\" }", source);
            expect(validate(&text), crate::features::has(feature), "pipelines[0].source.type", feature);
        }
    }

    // Without `tls` an mqtts:// URL is refused first (tests/it/features.rs).
    #[cfg(feature = "tls")]
    #[test]
    fn mqtt_tls_table_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("m.onnx"), b"").unwrap();
        let with = |mqtt: &str| {
            let mut c = Config::parse(&format!("{MINIMAL}\n[mqtt]\n{mqtt}\n"), "c.toml")?;
            c.base_dir = dir.path().to_path_buf();
            c.validate("c.toml").map(|_| c)
        };
        let c = with("url = \"mqtts://b\"\ntls = { ca_file = \"ca.pem\", cert_file = \"c.pem\", key_env = \"K\", alpn = [\"x-amzn-mqtt-ca\"], server_name = \"b.example\" }").unwrap();
        assert_eq!(c.mqtt.tls.unwrap().alpn, vec!["x-amzn-mqtt-ca".to_string()]);
        let e = with("url = \"mqtts://b\"\ntls = { ca_flie = \"x\" }").unwrap_err().to_string();
        assert!(e.contains("ca_flie"), "{e}");
        let e = with("url = \"mqtt://b\"\ntls = { ca_file = \"x\" }").unwrap_err().to_string();
        assert!(e.contains("`mqtt.tls`") && e.contains("plaintext"), "{e}");
        let e = with("tls = { ca_file = \"x\" }").unwrap_err().to_string();
        assert!(e.contains("`mqtt.tls`") && e.contains("mqtts://"), "{e}");
        let e = with("url = \"mqtts://b\"\ntls = { cert_file = \"c.pem\" }").unwrap_err().to_string();
        assert!(e.contains("mqtt.tls.key_file"), "{e}");
        let e = with("url = \"mqtts://b\"\ntls = { key_file = \"k.pem\" }").unwrap_err().to_string();
        assert!(e.contains("mqtt.tls.cert_file"), "{e}");
        let e = with("url = \"mqtts://b\"\ntls = { cert_file = \"c\", key_file = \"k\", key_env = \"K\" }")
            .unwrap_err()
            .to_string();
        assert!(e.contains("mqtt.tls.key_env"), "{e}");
        let e = with("url = \"mqtts://b\"\ntls = { alpn = [\"\"] }").unwrap_err().to_string();
        assert!(e.contains("mqtt.tls.alpn"), "{e}");
        assert!(with("url = \"mqtts://b:443\"").is_ok());
    }
}
