//! Audio windows for voice-activity and keyword-spotting models: PCM samples
//! are downmixed to mono, kept in a ring buffer allocated once, and every
//! window is handed on raw or as log-mel features (a planned real FFT, a
//! librosa-compatible mel filterbank, dB or natural log).

use std::sync::Arc;

use realfft::num_complex::Complex;
use realfft::{RealFftPlanner, RealToComplex};
use serde::Deserialize;

use crate::engine::TensorSpec;
use crate::message::SourceOutput;
use crate::tensor::{Data, ElemType, Tensor};

use super::to_elem_type;
use super::window::MAX_CHANNELS;

/// Longest audio window.
pub const MAX_WINDOW_MS: u32 = 60_000;
/// Most mel bands.
pub const MAX_N_MELS: usize = 512;
/// Largest FFT.
pub const MAX_N_FFT: usize = 65_536;

/// What a window becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AudioFeatures {
    /// The mono samples themselves, in [-1, 1].
    #[default]
    Raw,
    /// Log-mel spectrogram frames.
    LogMel,
}

/// Hz-to-mel mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MelScale {
    /// Slaney's Auditory Toolbox scale: linear below 1 kHz, logarithmic above (librosa's default).
    #[default]
    Slaney,
    /// `2595 * log10(1 + f / 700)` (HTK, Kaldi, torchaudio's default).
    Htk,
}

/// Filter weighting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MelNorm {
    /// Each triangle scaled to unit area, `2 / (f_high - f_low)` (librosa's default).
    #[default]
    Slaney,
    /// Triangles peak at 1 (torchaudio's default).
    None,
}

/// How the mel power is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogKind {
    /// `10 * log10(max(power, log_floor))`: librosa's `power_to_db(S, ref=1.0, amin=log_floor, top_db=None)`.
    #[default]
    Db,
    /// `ln(power + log_floor)`.
    Ln,
}

/// Order of a log-mel tensor's two feature axes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeatureLayout {
    /// Time-major: `[.., frames, n_mels]`.
    FramesMels,
    /// Mel-major: `[.., n_mels, frames]` (librosa's and torchaudio's order).
    MelsFrames,
}

/// The keys of `preprocess = { type = "audio", ... }`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AudioConfig {
    /// Window length handed to the model.
    pub window_ms: u32,
    /// Time between windows (default: the window, no overlap).
    #[serde(default)]
    pub hop_ms: Option<u32>,
    /// Samples per second (default: the pipe source's `sample_rate`).
    #[serde(default)]
    pub sample_rate: Option<u32>,
    /// Interleaved channels, averaged to mono (default: the pipe source's `channels`, else 1).
    #[serde(default)]
    pub channels: Option<usize>,
    /// `raw` or `log_mel`.
    #[serde(default)]
    pub features: AudioFeatures,
    /// Analysis frame length (default 25 ms).
    #[serde(default)]
    pub frame_ms: Option<f64>,
    /// Analysis frame length in samples, instead of `frame_ms`.
    #[serde(default)]
    pub frame_samples: Option<usize>,
    /// Step between frames (default 10 ms).
    #[serde(default)]
    pub frame_hop_ms: Option<f64>,
    /// Step between frames in samples, instead of `frame_hop_ms`.
    #[serde(default)]
    pub frame_hop_samples: Option<usize>,
    /// FFT size (default: the next power of two of the frame).
    #[serde(default)]
    pub n_fft: Option<usize>,
    /// Mel bands (default 40).
    #[serde(default)]
    pub n_mels: Option<usize>,
    /// Lowest filter edge (default 0).
    #[serde(default)]
    pub fmin_hz: Option<f64>,
    /// Highest filter edge (default: sample_rate / 2).
    #[serde(default)]
    pub fmax_hz: Option<f64>,
    /// Mel scale (default `slaney`).
    #[serde(default)]
    pub mel_scale: Option<MelScale>,
    /// Filter weighting (default `slaney`).
    #[serde(default)]
    pub mel_norm: Option<MelNorm>,
    /// librosa's `center=True`: pad n_fft/2 zeros on both sides of the window (default false).
    #[serde(default)]
    pub center: Option<bool>,
    /// `db` or `ln` (default `db`).
    #[serde(default)]
    pub log: Option<LogKind>,
    /// Floor for the log: `amin` for dB (default 1e-10), added epsilon for ln (default 1e-6).
    #[serde(default)]
    pub log_floor: Option<f64>,
    /// Feature order (default: read from the model input).
    #[serde(default)]
    pub layout: Option<FeatureLayout>,
    /// Subtracted from each feature: one value, or one per mel band.
    #[serde(default)]
    pub mean: Option<Vec<f32>>,
    /// Divides each feature after the mean: one value, or one per mel band.
    #[serde(default)]
    pub std: Option<Vec<f32>>,
}

/// A bad `audio` key: which one and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct AudioConfigError {
    /// The key, relative to the preprocess table.
    pub key: String,
    /// Why.
    pub reason: String,
}

fn bad<T>(key: &str, reason: impl Into<String>) -> Result<T, AudioConfigError> {
    Err(AudioConfigError { key: key.into(), reason: reason.into() })
}

/// Log-mel settings in samples, resolved and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct MelSettings {
    /// Sample rate.
    pub sample_rate: u32,
    /// Frame length.
    pub frame: usize,
    /// Step between frames.
    pub hop: usize,
    /// FFT size (>= frame).
    pub n_fft: usize,
    /// Mel bands.
    pub n_mels: usize,
    /// Lowest filter edge.
    pub fmin_hz: f64,
    /// Highest filter edge.
    pub fmax_hz: f64,
    /// Mel scale.
    pub scale: MelScale,
    /// Filter weighting.
    pub norm: MelNorm,
    /// Pad n_fft/2 zeros on each side (librosa `center=True`, `pad_mode="constant"`).
    pub center: bool,
    /// Log kind.
    pub log: LogKind,
    /// Log floor.
    pub log_floor: f64,
}

impl MelSettings {
    /// Frames computed from a window of `samples`.
    pub fn frames(&self, samples: usize) -> usize {
        if self.center {
            1 + (samples + 2 * (self.n_fft / 2) - self.n_fft) / self.hop
        } else if samples < self.frame {
            0
        } else {
            1 + (samples - self.frame) / self.hop
        }
    }

    /// Window length (samples) that gives `frames` frames.
    fn samples_for(&self, frames: usize) -> usize {
        let span = frames.saturating_sub(1) * self.hop;
        if self.center {
            (span + self.n_fft).saturating_sub(2 * (self.n_fft / 2))
        } else {
            span + self.frame
        }
    }

    /// Signal index of the first sample of frame 0 (negative: inside the zero padding).
    fn first_offset(&self) -> isize {
        if self.center {
            // librosa centres a short window inside the n_fft frame: its left edge
            // sits (n_fft - frame) / 2 into a frame that starts n_fft / 2 before the signal.
            ((self.n_fft - self.frame) / 2) as isize - (self.n_fft / 2) as isize
        } else {
            0
        }
    }
}

/// Everything an audio stage needs, resolved from the config and the source.
#[derive(Debug, Clone, PartialEq)]
pub struct AudioPlan {
    /// Samples per second.
    pub sample_rate: u32,
    /// Interleaved channels in the input.
    pub channels: usize,
    /// Window length in (mono) samples.
    pub window: usize,
    /// Samples between windows.
    pub hop: usize,
    /// Log-mel settings (`None`: raw samples).
    pub mel: Option<MelSettings>,
    /// Normalisation: one value, or one per mel band.
    pub mean: Vec<f32>,
    /// Reciprocal standard deviations, the same length as `mean`.
    pub inv_std: Vec<f32>,
    /// Feature order asked for in the config.
    pub layout: Option<FeatureLayout>,
}

fn ms_to_samples(ms: f64, rate: u32) -> usize {
    (ms * rate as f64 / 1000.0).round() as usize
}

/// Frames in samples from the `_ms` or `_samples` key (not both), or a default in ms.
fn length(
    ms: Option<f64>,
    samples: Option<usize>,
    (ms_key, samples_key): (&str, &str),
    default_ms: f64,
    rate: u32,
) -> Result<usize, AudioConfigError> {
    let n = match (ms, samples) {
        (Some(_), Some(_)) => return bad(ms_key, format!("give `{ms_key}` or `{samples_key}`, not both")),
        (Some(ms), None) if !(ms > 0.0 && ms <= MAX_WINDOW_MS as f64) => {
            return bad(ms_key, format!("must be in (0, {MAX_WINDOW_MS}]"))
        }
        (Some(ms), None) => ms_to_samples(ms, rate),
        (None, Some(n)) => n,
        (None, None) => ms_to_samples(default_ms, rate),
    };
    if n == 0 {
        let key = if samples.is_some() { samples_key } else { ms_key };
        return bad(key, format!("is less than one sample at {rate} Hz"));
    }
    Ok(n)
}

impl AudioPlan {
    /// Checks the keys against each other and the source; errors name the key.
    pub fn resolve(cfg: &AudioConfig, source: &SourceOutput) -> Result<AudioPlan, AudioConfigError> {
        if source.is_frames() {
            return bad(
                "type",
                format!("audio preprocessing needs a source of samples; this `{}` source gives images", source.kind),
            );
        }
        let (src_rate, src_channels) = match source.pcm {
            Some((rate, channels)) => (Some(rate), Some(channels)),
            None => (None, None),
        };
        let sample_rate = match (cfg.sample_rate, src_rate) {
            (Some(a), Some(b)) if a != b => {
                return bad("sample_rate", format!("{a} differs from the source's sample_rate = {b}"))
            }
            (Some(r), _) | (None, Some(r)) => r,
            (None, None) => {
                return bad("sample_rate", format!("needed: a `{}` source does not say its sample rate", source.kind))
            }
        };
        if !(1..=384_000).contains(&sample_rate) {
            return bad("sample_rate", "must be 1..=384000");
        }
        let channels = match (cfg.channels, src_channels) {
            (Some(a), Some(b)) if a != b => {
                return bad("channels", format!("{a} differs from the source's channels = {b}"))
            }
            (Some(c), _) | (None, Some(c)) => c,
            (None, None) => 1,
        };
        if channels == 0 || channels > MAX_CHANNELS {
            return bad("channels", format!("must be 1..={MAX_CHANNELS}"));
        }
        if cfg.window_ms == 0 || cfg.window_ms > MAX_WINDOW_MS {
            return bad("window_ms", format!("must be 1..={MAX_WINDOW_MS}"));
        }
        let window = ms_to_samples(cfg.window_ms as f64, sample_rate);
        if window == 0 {
            return bad("window_ms", format!("is less than one sample at {sample_rate} Hz"));
        }
        let hop_ms = cfg.hop_ms.unwrap_or(cfg.window_ms);
        if hop_ms == 0 || hop_ms > MAX_WINDOW_MS {
            return bad("hop_ms", format!("must be 1..={MAX_WINDOW_MS}"));
        }
        let hop = ms_to_samples(hop_ms as f64, sample_rate).max(1);
        let mel = match cfg.features {
            AudioFeatures::Raw => {
                let mel_keys = [
                    ("frame_ms", cfg.frame_ms.is_some()),
                    ("frame_samples", cfg.frame_samples.is_some()),
                    ("frame_hop_ms", cfg.frame_hop_ms.is_some()),
                    ("frame_hop_samples", cfg.frame_hop_samples.is_some()),
                    ("n_fft", cfg.n_fft.is_some()),
                    ("n_mels", cfg.n_mels.is_some()),
                    ("fmin_hz", cfg.fmin_hz.is_some()),
                    ("fmax_hz", cfg.fmax_hz.is_some()),
                    ("mel_scale", cfg.mel_scale.is_some()),
                    ("mel_norm", cfg.mel_norm.is_some()),
                    ("center", cfg.center.is_some()),
                    ("log", cfg.log.is_some()),
                    ("log_floor", cfg.log_floor.is_some()),
                    ("layout", cfg.layout.is_some()),
                ];
                if let Some((key, _)) = mel_keys.iter().find(|(_, given)| *given) {
                    return bad(key, "only applies to features = \"log_mel\"");
                }
                None
            }
            AudioFeatures::LogMel => Some(mel_settings(cfg, sample_rate, window)?),
        };
        let per = mel.as_ref().map_or(1, |m| m.n_mels);
        let allowed = if per == 1 { "1 value".to_string() } else { format!("1 value or {per} (one per mel band)") };
        let mean = cfg.mean.clone().unwrap_or_else(|| vec![0.0]);
        if !(mean.len() == 1 || mean.len() == per) || mean.iter().any(|m| !m.is_finite()) {
            return bad("mean", format!("has {} values; give {allowed}, all finite", mean.len()));
        }
        let std = cfg.std.clone().unwrap_or_else(|| vec![1.0]);
        if !(std.len() == 1 || std.len() == per) || std.iter().any(|s| !(s.is_finite() && *s != 0.0)) {
            return bad("std", format!("has {} values; give {allowed}, all finite and non-zero", std.len()));
        }
        Ok(AudioPlan {
            sample_rate,
            channels,
            window,
            hop,
            mel,
            mean,
            inv_std: std.iter().map(|s| 1.0 / s).collect(),
            layout: cfg.layout,
        })
    }

    /// Frames and mel bands per window, for log-mel features.
    pub fn feature_shape(&self) -> Option<(usize, usize)> {
        self.mel.as_ref().map(|m| (m.frames(self.window), m.n_mels))
    }

    /// Values per window tensor.
    pub fn feature_len(&self) -> usize {
        self.feature_shape().map_or(self.window, |(f, m)| f * m)
    }
}

fn mel_settings(cfg: &AudioConfig, sample_rate: u32, window: usize) -> Result<MelSettings, AudioConfigError> {
    let frame = length(cfg.frame_ms, cfg.frame_samples, ("frame_ms", "frame_samples"), 25.0, sample_rate)?;
    if frame < 2 {
        return bad("frame_samples", "a frame needs at least 2 samples");
    }
    let hop =
        length(cfg.frame_hop_ms, cfg.frame_hop_samples, ("frame_hop_ms", "frame_hop_samples"), 10.0, sample_rate)?;
    let n_fft = cfg.n_fft.unwrap_or_else(|| frame.next_power_of_two());
    if n_fft < frame || n_fft > MAX_N_FFT {
        return bad("n_fft", format!("{n_fft} must be at least the frame ({frame} samples) and at most {MAX_N_FFT}"));
    }
    let n_mels = cfg.n_mels.unwrap_or(40);
    if n_mels == 0 || n_mels > MAX_N_MELS {
        return bad("n_mels", format!("must be 1..={MAX_N_MELS}"));
    }
    let nyquist = sample_rate as f64 / 2.0;
    let fmin_hz = cfg.fmin_hz.unwrap_or(0.0);
    if !(fmin_hz >= 0.0 && fmin_hz < nyquist) {
        return bad("fmin_hz", format!("must be in [0, {nyquist})"));
    }
    let fmax_hz = cfg.fmax_hz.unwrap_or(nyquist);
    if !(fmax_hz > fmin_hz && fmax_hz <= nyquist) {
        return bad("fmax_hz", format!("must be above fmin_hz ({fmin_hz}) and at most sample_rate / 2 ({nyquist})"));
    }
    let log = cfg.log.unwrap_or_default();
    let log_floor = cfg.log_floor.unwrap_or(match log {
        LogKind::Db => 1e-10,
        LogKind::Ln => 1e-6,
    });
    if !(log_floor > 0.0 && log_floor.is_finite()) {
        return bad("log_floor", "must be a finite number above 0");
    }
    let s = MelSettings {
        sample_rate,
        frame,
        hop,
        n_fft,
        n_mels,
        fmin_hz,
        fmax_hz,
        scale: cfg.mel_scale.unwrap_or_default(),
        norm: cfg.mel_norm.unwrap_or_default(),
        center: cfg.center.unwrap_or(false),
        log,
        log_floor,
    };
    if s.frames(window) == 0 {
        return bad(
            "window_ms",
            format!("a window of {window} samples is shorter than one frame ({frame} samples) with center = false"),
        );
    }
    Ok(s)
}

fn hz_to_mel(f: f64, scale: MelScale) -> f64 {
    match scale {
        MelScale::Htk => 2595.0 * (1.0 + f / 700.0).log10(),
        MelScale::Slaney => {
            let (f_sp, min_log_hz) = (200.0 / 3.0, 1000.0);
            let min_log_mel = min_log_hz / f_sp;
            if f >= min_log_hz {
                min_log_mel + (f / min_log_hz).ln() / (6.4f64.ln() / 27.0)
            } else {
                f / f_sp
            }
        }
    }
}

fn mel_to_hz(m: f64, scale: MelScale) -> f64 {
    match scale {
        MelScale::Htk => 700.0 * (10f64.powf(m / 2595.0) - 1.0),
        MelScale::Slaney => {
            let (f_sp, min_log_hz) = (200.0 / 3.0, 1000.0);
            let min_log_mel = min_log_hz / f_sp;
            if m >= min_log_mel {
                min_log_hz * ((6.4f64.ln() / 27.0) * (m - min_log_mel)).exp()
            } else {
                f_sp * m
            }
        }
    }
}

/// One triangular filter: its first FFT bin and its weights from there.
#[derive(Debug, Clone)]
struct Filter {
    start: usize,
    weights: Vec<f32>,
}

/// Triangular mel filters over the `n_fft / 2 + 1` power bins, computed in
/// f64 the way `librosa.filters.mel` does, kept sparse (only non-zero spans).
fn mel_filters(s: &MelSettings) -> Vec<Filter> {
    let bins = s.n_fft / 2 + 1;
    let fft_hz: Vec<f64> = (0..bins).map(|k| k as f64 * s.sample_rate as f64 / s.n_fft as f64).collect();
    let (lo, hi) = (hz_to_mel(s.fmin_hz, s.scale), hz_to_mel(s.fmax_hz, s.scale));
    let points = s.n_mels + 2;
    let edges: Vec<f64> = (0..points)
        .map(|i| if i + 1 == points { hi } else { lo + (hi - lo) * i as f64 / (points - 1) as f64 })
        .map(|m| mel_to_hz(m, s.scale))
        .collect();
    (0..s.n_mels)
        .map(|i| {
            let (left, centre, right) = (edges[i], edges[i + 1], edges[i + 2]);
            let area = match s.norm {
                MelNorm::Slaney => 2.0 / (right - left),
                MelNorm::None => 1.0,
            };
            let w: Vec<f64> = fft_hz
                .iter()
                .map(|&f| ((f - left) / (centre - left)).min((right - f) / (right - centre)).max(0.0) * area)
                .collect();
            let start = w.iter().position(|&x| x > 0.0).unwrap_or(0);
            let end = w.iter().rposition(|&x| x > 0.0).map_or(start, |e| e + 1);
            Filter { start, weights: w[start..end].iter().map(|&x| x as f32).collect() }
        })
        .collect()
}

/// Log-mel features of a window; every buffer is planned once.
pub struct LogMel {
    s: MelSettings,
    fft: Arc<dyn RealToComplex<f32>>,
    window_fn: Vec<f32>,
    frame_buf: Vec<f32>,
    spectrum: Vec<Complex<f32>>,
    scratch: Vec<Complex<f32>>,
    power: Vec<f32>,
    filters: Vec<Filter>,
}

impl LogMel {
    /// Plans the FFT and builds the filterbank.
    pub fn new(s: &MelSettings) -> LogMel {
        let fft = RealFftPlanner::<f32>::new().plan_fft_forward(s.n_fft);
        let n = s.frame as f64;
        // Periodic Hann (scipy's `get_window("hann", n, fftbins=True)`, as librosa and tf.signal use).
        let window_fn =
            (0..s.frame).map(|i| (0.5 - 0.5 * (2.0 * std::f64::consts::PI * i as f64 / n).cos()) as f32).collect();
        let filters = mel_filters(s);
        let empty = filters.iter().filter(|f| f.weights.is_empty()).count();
        if empty > 0 {
            log::warn!(
                "{empty} of {} mel bands cover no FFT bin (n_fft {} at {} Hz): they stay at the log floor",
                s.n_mels,
                s.n_fft,
                s.sample_rate
            );
        }
        LogMel {
            frame_buf: fft.make_input_vec(),
            spectrum: fft.make_output_vec(),
            scratch: fft.make_scratch_vec(),
            power: vec![0.0; s.n_fft / 2 + 1],
            fft,
            window_fn,
            filters,
            s: s.clone(),
        }
    }

    /// The settings.
    pub fn settings(&self) -> &MelSettings {
        &self.s
    }

    /// Computes the features of `signal` into `out` (`frames * n_mels` values) in `layout`.
    pub fn compute(&mut self, signal: &[f32], out: &mut [f32], layout: FeatureLayout) {
        let frames = self.s.frames(signal.len());
        let n_mels = self.s.n_mels;
        debug_assert_eq!(out.len(), frames * n_mels);
        let offset = self.s.first_offset();
        let floor = self.s.log_floor as f32;
        for t in 0..frames {
            let start = (t * self.s.hop) as isize + offset;
            let (buf, win) = (&mut self.frame_buf, &self.window_fn);
            // The windowed frame goes first and zeros fill up to n_fft: the power
            // spectrum is the same wherever the frame sits (a circular shift).
            for (i, dst) in buf.iter_mut().enumerate() {
                let at = start + i as isize;
                *dst = if i < win.len() && at >= 0 && (at as usize) < signal.len() {
                    signal[at as usize] * win[i]
                } else {
                    0.0
                };
            }
            // Lengths come from the same plan, so the FFT cannot reject them.
            let _ = self.fft.process_with_scratch(buf, &mut self.spectrum, &mut self.scratch);
            for (p, c) in self.power.iter_mut().zip(&self.spectrum) {
                *p = c.re * c.re + c.im * c.im;
            }
            for (m, f) in self.filters.iter().enumerate() {
                let e: f32 = f.weights.iter().zip(&self.power[f.start..]).map(|(w, p)| w * p).sum();
                let v = match self.s.log {
                    LogKind::Db => 10.0 * e.max(floor).log10(),
                    LogKind::Ln => (e + floor).ln(),
                };
                let ix = match layout {
                    FeatureLayout::FramesMels => t * n_mels + m,
                    FeatureLayout::MelsFrames => m * frames + t,
                };
                out[ix] = v;
            }
        }
    }
}

/// The last `window` mono samples, in a buffer allocated once.
struct Ring {
    buf: Vec<f32>,
    pos: usize,
    hop: usize,
    samples: u64,
    since_last: usize,
}

impl Ring {
    fn new(window: usize, hop: usize) -> Ring {
        Ring { buf: vec![0.0; window], pos: 0, hop, samples: 0, since_last: 0 }
    }

    /// Adds a sample; true when a window is due (the first full one, then every hop).
    fn push(&mut self, x: f32) -> bool {
        self.buf[self.pos] = x;
        self.pos = (self.pos + 1) % self.buf.len();
        self.samples += 1;
        self.since_last += 1;
        let window = self.buf.len() as u64;
        if self.samples >= window && (self.samples == window || self.since_last >= self.hop) {
            self.since_last = 0;
            return true;
        }
        false
    }

    /// Copies the window, oldest sample first.
    fn copy_to(&self, out: &mut [f32]) {
        let tail = self.buf.len() - self.pos;
        out[..tail].copy_from_slice(&self.buf[self.pos..]);
        out[tail..].copy_from_slice(&self.buf[..self.pos]);
    }
}

/// Checks the model input against the feature shape; returns the layout to write.
fn fit_input(spec: &TensorSpec, plan: &AudioPlan) -> Result<FeatureLayout, String> {
    let dims: Vec<usize> = spec.shape.iter().copied().filter(|&d| d != 1).collect();
    let rate = plan.sample_rate;
    let ms = |samples: usize| {
        let ms = samples as f64 * 1000.0 / rate as f64;
        if ms.fract() == 0.0 {
            format!("window_ms = {ms}")
        } else {
            format!("a window of {samples} samples ({ms:.2} ms, not a whole number of ms at {rate} Hz)")
        }
    };
    let shape = &spec.shape;
    let name = &spec.name;
    let Some(mel) = &plan.mel else {
        let n = plan.window;
        if dims == [n] && shape.len() <= 3 && !shape.is_empty() {
            return Ok(FeatureLayout::FramesMels);
        }
        let mut msg = format!(
            "input `{name}` has shape {shape:?}; features = \"raw\" gives windows of {n} samples \
             ({} at {rate} Hz), which fit [1, {n}], [1, 1, {n}] or [1, {n}, 1]",
            ms(n)
        );
        if let [want] = dims[..] {
            msg += &format!("; the model's {want} samples would need {}", ms(want));
        }
        return Err(msg);
    };
    let (frames, n_mels) = (mel.frames(plan.window), mel.n_mels);
    let fits = match dims[..] {
        [a, b] if a == frames && b == n_mels && (a != b || plan.layout != Some(FeatureLayout::MelsFrames)) => {
            Some(FeatureLayout::FramesMels)
        }
        [a, b] if a == n_mels && b == frames => Some(FeatureLayout::MelsFrames),
        [n] if n == frames * n_mels => Some(FeatureLayout::FramesMels),
        _ => None,
    };
    match (fits, plan.layout) {
        (Some(found), Some(wanted)) if found != wanted => Err(format!(
            "input `{name}` has shape {shape:?}, which is {found:?}, but the config says layout = \"{}\"",
            match wanted {
                FeatureLayout::FramesMels => "frames_mels",
                FeatureLayout::MelsFrames => "mels_frames",
            }
        )),
        (Some(found), _) => Ok(found),
        (None, _) => {
            let mut msg = format!(
                "input `{name}` has shape {shape:?}; log_mel gives {frames} frames x {n_mels} mels per window \
                 ({} at {rate} Hz, frames of {} samples every {}, center = {}), which fit [1, {frames}, {n_mels}], \
                 [1, {n_mels}, {frames}], [1, 1, {frames}, {n_mels}], [1, 1, {n_mels}, {frames}] or [1, {}]",
                ms(plan.window),
                mel.frame,
                mel.hop,
                mel.center,
                frames * n_mels
            );
            let other = match dims[..] {
                [a, b] if a == n_mels => Some(b),
                [a, b] if b == n_mels => Some(a),
                _ => None,
            };
            match other {
                Some(f) => {
                    msg += &format!("; the model's {f} frames would need {}", ms(mel.samples_for(f)));
                }
                None => msg += &format!("; no dimension of the model input is n_mels = {n_mels}"),
            }
            Err(msg)
        }
    }
}

/// The audio preprocessing of one pipeline: samples in, model inputs out.
pub struct AudioStage {
    plan: AudioPlan,
    spec: TensorSpec,
    layout: FeatureLayout,
    ring: Ring,
    linear: Vec<f32>,
    mel: Option<LogMel>,
    scratch: Vec<f32>,
}

impl AudioStage {
    /// Resolves the config and checks the model input against the feature shape.
    pub fn new(cfg: &AudioConfig, spec: &TensorSpec, source: &SourceOutput) -> Result<AudioStage, String> {
        let plan = AudioPlan::resolve(cfg, source).map_err(|e| e.to_string())?;
        AudioStage::from_plan(plan, spec)
    }

    /// Builds the stage from a resolved plan.
    pub fn from_plan(plan: AudioPlan, spec: &TensorSpec) -> Result<AudioStage, String> {
        let layout = fit_input(spec, &plan)?;
        Ok(AudioStage {
            ring: Ring::new(plan.window, plan.hop),
            linear: if plan.mel.is_some() { vec![0.0; plan.window] } else { Vec::new() },
            mel: plan.mel.as_ref().map(LogMel::new),
            scratch: vec![0.0; plan.feature_len()],
            layout,
            spec: spec.clone(),
            plan,
        })
    }

    /// The resolved settings.
    pub fn plan(&self) -> &AudioPlan {
        &self.plan
    }

    /// Takes interleaved samples; runs `ready` on each window that completes.
    /// `buf` is the model-shaped f32 tensor from `Preprocessor::buffer`.
    pub fn feed(&mut self, values: &[f32], buf: &mut Tensor, mut ready: impl FnMut(&Tensor)) -> Result<(), String> {
        let c = self.plan.channels;
        if !values.len().is_multiple_of(c) {
            return Err(format!("{} values do not make whole samples of {c} channels", values.len()));
        }
        let inv_c = 1.0 / c as f32;
        for frame in values.chunks_exact(c) {
            let mono = if c == 1 { frame[0] } else { frame.iter().sum::<f32>() * inv_c };
            if !self.ring.push(mono) {
                continue;
            }
            let direct = self.spec.elem_type == ElemType::F32
                && matches!(&buf.data, Data::F32(d) if d.len() == self.plan.feature_len());
            if direct {
                if let Data::F32(dst) = &mut buf.data {
                    self.write_features(dst);
                }
                ready(buf);
            } else {
                let mut out = std::mem::take(&mut self.scratch);
                self.write_features(&mut out);
                let t = to_elem_type(out.clone(), &self.spec, None).map_err(|e| e.to_string());
                self.scratch = out;
                ready(&t?);
            }
        }
        Ok(())
    }

    fn write_features(&mut self, out: &mut [f32]) {
        match &mut self.mel {
            None => self.ring.copy_to(out),
            Some(mel) => {
                self.ring.copy_to(&mut self.linear);
                mel.compute(&self.linear, out, self.layout);
            }
        }
        let (mean, inv_std) = (&self.plan.mean, &self.plan.inv_std);
        if mean.len() == 1 {
            if mean[0] != 0.0 || inv_std[0] != 1.0 {
                out.iter_mut().for_each(|x| *x = (*x - mean[0]) * inv_std[0]);
            }
            return;
        }
        let n_mels = mean.len();
        let frames = out.len() / n_mels;
        for (i, x) in out.iter_mut().enumerate() {
            let m = match self.layout {
                FeatureLayout::FramesMels => i % n_mels,
                FeatureLayout::MelsFrames => i / frames,
            };
            *x = (*x - mean[m]) * inv_std[m];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipe(rate: u32, channels: usize) -> SourceOutput {
        SourceOutput { pcm: Some((rate, channels)), ..SourceOutput::values("pipe") }
    }

    fn cfg(text: &str) -> AudioConfig {
        toml::from_str(text).unwrap()
    }

    fn spec(shape: &[usize]) -> TensorSpec {
        TensorSpec { name: "x".into(), shape: shape.to_vec(), elem_type: ElemType::F32, quantization: None }
    }

    #[test]
    fn defaults_give_98_frames_of_40_mels_for_a_second() {
        let plan = AudioPlan::resolve(&cfg("window_ms = 1000\nfeatures = \"log_mel\""), &pipe(16000, 1)).unwrap();
        assert_eq!((plan.window, plan.hop), (16000, 16000));
        let mel = plan.mel.as_ref().unwrap();
        assert_eq!((mel.frame, mel.hop, mel.n_fft, mel.n_mels), (400, 160, 512, 40));
        assert_eq!(plan.feature_shape(), Some((98, 40)));
        let centred =
            AudioPlan::resolve(&cfg("window_ms = 1000\nfeatures = \"log_mel\"\ncenter = true"), &pipe(16000, 1))
                .unwrap();
        assert_eq!(centred.feature_shape(), Some((101, 40)), "librosa: 1 + 16000 // 160");
    }

    #[test]
    fn bad_keys_are_named() {
        let lines = SourceOutput::values("lines");
        let key = |text: &str, source: &SourceOutput| AudioPlan::resolve(&cfg(text), source).unwrap_err().key;
        assert_eq!(key("window_ms = 1000", &lines), "sample_rate");
        assert_eq!(key("window_ms = 1000\nsample_rate = 8000", &pipe(16000, 1)), "sample_rate");
        assert_eq!(key("window_ms = 0", &pipe(16000, 1)), "window_ms");
        assert_eq!(key("window_ms = 1000\nhop_ms = 0", &pipe(16000, 1)), "hop_ms");
        assert_eq!(key("window_ms = 1000\nn_mels = 40", &pipe(16000, 1)), "n_mels");
        let mel = "window_ms = 1000\nfeatures = \"log_mel\"\n";
        assert_eq!(key(&format!("{mel}fmax_hz = 9000"), &pipe(16000, 1)), "fmax_hz");
        assert_eq!(key(&format!("{mel}fmin_hz = -1"), &pipe(16000, 1)), "fmin_hz");
        assert_eq!(key(&format!("{mel}n_fft = 256"), &pipe(16000, 1)), "n_fft");
        assert_eq!(key(&format!("{mel}frame_ms = 25\nframe_samples = 400"), &pipe(16000, 1)), "frame_ms");
        assert_eq!(key(&format!("{mel}mean = [1.0, 2.0]"), &pipe(16000, 1)), "mean");
        assert_eq!(key(&format!("{mel}std = [0.0]"), &pipe(16000, 1)), "std");
        assert_eq!(key(&format!("{mel}log_floor = 0"), &pipe(16000, 1)), "log_floor");
        assert_eq!(key("window_ms = 10\nfeatures = \"log_mel\"", &pipe(16000, 1)), "window_ms");
        assert_eq!(key("window_ms = 1000\nchannels = 2", &pipe(16000, 1)), "channels");
        let camera = SourceOutput { gives: crate::message::Gives::Frames, ..SourceOutput::values("v4l2") };
        assert_eq!(key("window_ms = 1000\nsample_rate = 16000", &camera), "type");
        assert!(toml::from_str::<AudioConfig>("window_ms = 1000\nn_mel = 40")
            .unwrap_err()
            .to_string()
            .contains("n_mel"));
    }

    #[test]
    fn slaney_scale_is_linear_below_1khz_and_invertible() {
        assert!((hz_to_mel(1000.0, MelScale::Slaney) - 15.0).abs() < 1e-12);
        assert!((hz_to_mel(500.0, MelScale::Slaney) - 7.5).abs() < 1e-12);
        for f in [0.0, 300.0, 999.0, 1000.0, 4000.0, 8000.0] {
            for scale in [MelScale::Slaney, MelScale::Htk] {
                assert!((mel_to_hz(hz_to_mel(f, scale), scale) - f).abs() < 1e-9, "{f} {scale:?}");
            }
        }
        assert!((hz_to_mel(700.0, MelScale::Htk) - 2595.0 * 2f64.log10()).abs() < 1e-9);
    }

    #[test]
    fn a_tone_lights_up_the_mel_band_holding_its_frequency() {
        let plan =
            AudioPlan::resolve(&cfg("window_ms = 100\nfeatures = \"log_mel\"\nn_mels = 20"), &pipe(16000, 1)).unwrap();
        let mel_settings = plan.mel.clone().unwrap();
        let mut mel = LogMel::new(&mel_settings);
        let tone: Vec<f32> =
            (0..1600).map(|i| (2.0 * std::f32::consts::PI * 2000.0 * i as f32 / 16000.0).sin()).collect();
        let (frames, n_mels) = plan.feature_shape().unwrap();
        let mut out = vec![0.0; frames * n_mels];
        mel.compute(&tone, &mut out, FeatureLayout::FramesMels);
        let filters = mel_filters(&mel_settings);
        let bin = 2000 * 512 / 16000;
        let holder = (0..n_mels)
            .max_by(|&a, &b| {
                let w = |m: usize| {
                    let f = &filters[m];
                    if bin >= f.start && bin < f.start + f.weights.len() {
                        f.weights[bin - f.start]
                    } else {
                        0.0
                    }
                };
                w(a).total_cmp(&w(b))
            })
            .unwrap();
        for t in 0..frames {
            let row = &out[t * n_mels..(t + 1) * n_mels];
            let loudest = (0..n_mels).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap();
            assert_eq!(loudest, holder, "frame {t}: {row:?}");
        }
    }

    #[test]
    fn raw_windows_downmix_and_hop() {
        let plan = AudioPlan::resolve(&cfg("window_ms = 1"), &pipe(4000, 2)).unwrap();
        assert_eq!((plan.window, plan.channels), (4, 2));
        let mut stage = AudioStage::from_plan(plan, &spec(&[1, 1, 4])).unwrap();
        let mut buf = Tensor { shape: vec![1, 1, 4], data: Data::F32(vec![0.0; 4]) };
        let mut got = Vec::new();
        let stereo: Vec<f32> = (0..12).flat_map(|i| [i as f32, i as f32 + 1.0]).collect();
        stage.feed(&stereo, &mut buf, |t| got.push(t.data.clone())).unwrap();
        let want = [[0.5, 1.5, 2.5, 3.5], [4.5, 5.5, 6.5, 7.5], [8.5, 9.5, 10.5, 11.5]];
        assert_eq!(got, want.map(|w| Data::F32(w.to_vec())));
        assert!(stage.feed(&[1.0, 2.0, 3.0], &mut buf, |_| {}).is_err(), "3 values are not whole stereo samples");
    }

    #[test]
    fn model_shapes_are_matched_or_explained() {
        let plan = |extra: &str| {
            AudioPlan::resolve(&cfg(&format!("window_ms = 1000\nfeatures = \"log_mel\"\n{extra}")), &pipe(16000, 1))
                .unwrap()
        };
        let fit = |shape: &[usize], extra: &str| fit_input(&spec(shape), &plan(extra));
        assert_eq!(fit(&[1, 98, 40], ""), Ok(FeatureLayout::FramesMels));
        assert_eq!(fit(&[1, 40, 98], ""), Ok(FeatureLayout::MelsFrames));
        assert_eq!(fit(&[1, 1, 98, 40], ""), Ok(FeatureLayout::FramesMels));
        assert_eq!(fit(&[1, 40, 98, 1], ""), Ok(FeatureLayout::MelsFrames));
        assert_eq!(fit(&[1, 3920], ""), Ok(FeatureLayout::FramesMels));
        assert!(fit(&[1, 98, 40], "layout = \"mels_frames\"").unwrap_err().contains("layout"));
        let e = fit(&[1, 49, 40], "").unwrap_err();
        assert!(e.contains("[1, 49, 40]") && e.contains("98 frames x 40 mels") && e.contains("window_ms = 505"), "{e}");
        let e = fit(&[1, 98, 64], "").unwrap_err();
        assert!(e.contains("n_mels = 40"), "{e}");
        let raw = AudioPlan::resolve(&cfg("window_ms = 1000"), &pipe(16000, 1)).unwrap();
        assert_eq!(fit_input(&spec(&[1, 16000]), &raw), Ok(FeatureLayout::FramesMels));
        let e = fit_input(&spec(&[1, 15600]), &raw).unwrap_err();
        assert!(e.contains("16000 samples") && e.contains("window_ms = 975"), "{e}");
    }

    #[test]
    fn per_mel_normalisation_follows_the_layout() {
        let text = "window_ms = 100\nfeatures = \"log_mel\"\nn_mels = 4\nmean = [1, 2, 3, 4]\nstd = [2, 2, 2, 2]";
        let signal: Vec<f32> = (0..1600).map(|i| ((i * 7919) % 200) as f32 / 100.0 - 1.0).collect();
        let mut outs = Vec::new();
        for shape in [[1, 8, 4], [1, 4, 8]] {
            let plan = AudioPlan::resolve(&cfg(text), &pipe(16000, 1)).unwrap();
            let mut stage = AudioStage::from_plan(plan, &spec(&shape)).unwrap();
            let mut buf = Tensor { shape: shape.to_vec(), data: Data::F32(vec![0.0; 32]) };
            stage.feed(&signal, &mut buf, |t| outs.push(t.data.clone())).unwrap();
        }
        let (Data::F32(fm), Data::F32(mf)) = (&outs[0], &outs[1]) else { panic!() };
        let mut plain = LogMel::new(
            AudioPlan::resolve(&cfg("window_ms = 100\nfeatures = \"log_mel\"\nn_mels = 4"), &pipe(16000, 1))
                .unwrap()
                .mel
                .as_ref()
                .unwrap(),
        );
        let mut raw = vec![0.0; 32];
        plain.compute(&signal, &mut raw, FeatureLayout::FramesMels);
        for t in 0..8 {
            for m in 0..4 {
                let want = (raw[t * 4 + m] - (m + 1) as f32) / 2.0;
                assert!((fm[t * 4 + m] - want).abs() < 1e-5 && (mf[m * 8 + t] - want).abs() < 1e-5, "t {t} m {m}");
            }
        }
    }
}
