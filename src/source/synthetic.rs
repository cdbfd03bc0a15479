//! The `synthetic` source: generated sensor signals or camera frames, so a
//! pipeline runs (and can be demonstrated) with no hardware at all.
//!
//! Sensor signals (`sine`, `noise`, `steps`, `vibration`) emit one
//! [`Input::Values`] per sample, paced at `rate_hz` against absolute deadlines
//! (sample `n` is due at `start + n / rate_hz`), waking at most every
//! [`MIN_WAKE`] and pushing every sample that is due, so high rates neither
//! drift nor spin. The waveform itself is a pure function of the sample index
//! and the seed: the same config and `seed` always give the same numbers.
//!
//! `vibration` is the 3-axis accelerometer (x, y radial, z axial; in g, z
//! carrying +1 g of gravity) of `vib_signal` in models/make_models.py, the
//! signal the shipped `vibration_*.onnx` models were trained on. It cycles
//! through normal, imbalance, misalignment and bearing fault, `segment_s`
//! seconds each, drawing a new machine (speed, amplitudes, phases, noise) for
//! every segment. It always has 3 channels whatever `channels` says, ignores
//! `frequency_hz` and `noise` (the model's own formulas set them), and must
//! run at `rate_hz = 1000` ([`VIBRATION_RATE_HZ`]) for the model to recognise it.
//!
//! With `anomaly_every_s`, every that many seconds a burst of
//! `anomaly_duration_s` adds ±5·`amplitude` spikes to about 10% of the samples.
//!
//! `frames` emits [`Input::Frame`]s at `fps`: a bright square moving across a
//! gradient background.

use std::f64::consts::{PI, TAU};
use std::time::{Duration, Instant, SystemTime};

use image::{Rgb, RgbImage};

use super::config::{Signal, SourceConfig};
use crate::message::{Frame, Input, Values};

use super::{SourceCtx, SourceEnd, SourceError};

/// The shortest sleep between two wake-ups; at high rates every wake-up
/// pushes all the samples that fell due meanwhile.
pub const MIN_WAKE: Duration = Duration::from_millis(5);

/// Sample rate the shipped vibration model was trained at (Hz). The
/// `vibration` signal is generated at `rate_hz` as given, so set `rate_hz = 1000`.
pub const VIBRATION_RATE_HZ: f64 = 1000.0;

/// The machine states of the `vibration` signal, in the order they cycle and
/// in the shipped model's class order (`models/vibration.labels.txt`).
pub const VIBRATION_STATES: [&str; 4] = ["normal", "imbalance", "misalignment", "bearing_fault"];

/// Runs the source until it finishes, fails or is stopped.
pub fn run(cfg: &SourceConfig, ctx: &SourceCtx) -> Result<SourceEnd, SourceError> {
    let SourceConfig::Synthetic { signal, rate_hz, fps, count, .. } = cfg else {
        return Err(SourceError(format!("synthetic source started with a `{}` source config", cfg.kind())));
    };
    if *signal == Signal::Frames {
        let mut frames = FrameGen::new(cfg)?;
        check_rate("fps", *fps)?;
        return Ok(paced(ctx, *fps, *count, |_| {
            Input::Frame(Frame { image: frames.next_frame(), captured: SystemTime::now(), origin: None })
        }));
    }
    check_rate("rate_hz", *rate_hz)?;
    let mut samples = SampleGen::new(cfg)?;
    if *signal == Signal::Vibration && *rate_hz != VIBRATION_RATE_HZ {
        log::warn!(
            "pipeline `{}`: vibration signal at rate_hz = {rate_hz}; the shipped model expects {VIBRATION_RATE_HZ} Hz",
            ctx.pipeline
        );
    }
    Ok(paced(ctx, *rate_hz, *count, |_| {
        Input::Values(Values { values: samples.next_sample(), names: None, captured: SystemTime::now(), origin: None })
    }))
}

fn check_rate(key: &str, rate: f64) -> Result<(), SourceError> {
    if rate.is_finite() && rate > 0.0 {
        Ok(())
    } else {
        Err(SourceError(format!("synthetic source: `{key}` must be a positive number, got {rate}")))
    }
}

/// Pushes `make(n)` for n = 0, 1, ... at `rate` per second until `count`
/// items were pushed (Finished), shutdown is requested or the queue closes (Stopped).
fn paced(ctx: &SourceCtx, rate: f64, count: Option<u64>, mut make: impl FnMut(u64) -> Input) -> SourceEnd {
    let start = Instant::now();
    let mut n: u64 = 0;
    loop {
        if count.is_some_and(|c| n >= c) {
            return SourceEnd::Finished;
        }
        // Items 0..due have deadlines at or before now.
        let due = (start.elapsed().as_secs_f64() * rate).floor() as u64 + 1;
        let due = count.map_or(due, |c| due.min(c));
        while n < due {
            if ctx.stopped() || !ctx.push(make(n)) {
                return SourceEnd::Stopped;
            }
            n += 1;
        }
        if count.is_some_and(|c| n >= c) {
            return SourceEnd::Finished;
        }
        let next = start + Duration::from_secs_f64(n as f64 / rate);
        if !ctx.sleep_until(next.max(Instant::now() + MIN_WAKE)) {
            return SourceEnd::Stopped;
        }
    }
}

/// Gaussian numbers from a seeded uniform generator (Box-Muller).
struct Gauss {
    rng: fastrand::Rng,
    spare: Option<f64>,
}

impl Gauss {
    fn new(seed: u64) -> Self {
        Gauss { rng: fastrand::Rng::with_seed(seed), spare: None }
    }

    /// Uniform in [lo, hi).
    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.rng.f64()
    }

    /// Standard normal.
    fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        // 1 - u lies in (0, 1], so the logarithm is finite.
        let u1 = 1.0 - self.rng.f64();
        let u2 = self.rng.f64();
        let r = (-2.0 * u1.ln()).sqrt();
        self.spare = Some(r * (TAU * u2).sin());
        r * (TAU * u2).cos()
    }
}

/// The generator behind the sensor signals: one sample per call, a pure
/// function of the config and the seed.
pub struct SampleGen {
    signal: Signal,
    rate_hz: f64,
    channels: usize,
    amplitude: f64,
    frequency_hz: f64,
    noise: f64,
    /// (every_s, duration_s) of the spike bursts.
    anomaly: Option<(f64, f64)>,
    segment_s: f64,
    rng: Gauss,
    /// Index of the next sample.
    n: u64,
    machine: Option<Machine>,
}

impl SampleGen {
    /// A generator for a synthetic sensor signal (not `frames`).
    pub fn new(cfg: &SourceConfig) -> Result<Self, SourceError> {
        let SourceConfig::Synthetic {
            signal,
            rate_hz,
            channels,
            amplitude,
            frequency_hz,
            noise,
            anomaly_every_s,
            anomaly_duration_s,
            segment_s,
            seed,
            ..
        } = cfg
        else {
            return Err(SourceError(format!("synthetic source started with a `{}` source config", cfg.kind())));
        };
        if *signal == Signal::Frames {
            return Err(SourceError("synthetic source: `frames` is not a sensor signal".into()));
        }
        check_rate("rate_hz", *rate_hz)?;
        if *channels == 0 && *signal != Signal::Vibration {
            return Err(SourceError("synthetic source: `channels` must be at least 1".into()));
        }
        if *signal == Signal::Vibration && !(segment_s.is_finite() && *segment_s > 0.0) {
            return Err(SourceError(format!(
                "synthetic source: `segment_s` must be a positive number, got {segment_s}"
            )));
        }
        let anomaly = match anomaly_every_s {
            None => None,
            Some(every) if every.is_finite() && *every > 0.0 && anomaly_duration_s.is_finite() => {
                Some((*every, anomaly_duration_s.max(0.0)))
            }
            Some(every) => {
                return Err(SourceError(format!(
                    "synthetic source: `anomaly_every_s` = {every} / `anomaly_duration_s` = {anomaly_duration_s} \
                     must be positive numbers"
                )))
            }
        };
        Ok(SampleGen {
            signal: *signal,
            rate_hz: *rate_hz,
            // The vibration signal is a 3-axis accelerometer whatever `channels` says.
            channels: if *signal == Signal::Vibration { 3 } else { *channels },
            amplitude: f64::from(*amplitude),
            frequency_hz: f64::from(*frequency_hz),
            noise: f64::from(noise.max(0.0)),
            anomaly,
            segment_s: *segment_s,
            rng: Gauss::new(*seed),
            n: 0,
            machine: None,
        })
    }

    /// Values per sample (3 for `vibration`).
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// Index of the `vibration` state (see [`VIBRATION_STATES`]) the next sample belongs to.
    pub fn vibration_state(&self) -> usize {
        let t = self.n as f64 / self.rate_hz;
        ((t / self.segment_s).floor() as u64 % 4) as usize
    }

    /// The next sample: one value per channel.
    pub fn next_sample(&mut self) -> Vec<f32> {
        let t = self.n as f64 / self.rate_hz;
        let mut out = vec![0f64; self.channels];
        match self.signal {
            Signal::Sine => {
                for (c, v) in out.iter_mut().enumerate() {
                    // The fractional cycle keeps precision however long the source runs.
                    let cycle = (self.frequency_hz * t + c as f64 / self.channels as f64).fract();
                    *v = self.amplitude * (TAU * cycle).sin() + self.noise * self.rng.normal();
                }
            }
            Signal::Noise => {
                for v in out.iter_mut() {
                    *v = self.noise * self.rng.normal();
                }
            }
            Signal::Steps => {
                for (c, v) in out.iter_mut().enumerate() {
                    let cycle = (self.frequency_hz * t + c as f64 / self.channels as f64).fract();
                    let level = if cycle < 0.5 { self.amplitude } else { -self.amplitude };
                    *v = level + self.noise * self.rng.normal();
                }
            }
            Signal::Vibration => self.vibration(t, &mut out),
            Signal::Frames => {}
        }
        if self.in_anomaly(t) && self.rng.rng.f64() < 0.1 {
            for v in out.iter_mut() {
                let sign = if self.rng.rng.bool() { 1.0 } else { -1.0 };
                *v += sign * 5.0 * self.amplitude;
            }
        }
        self.n += 1;
        out.into_iter().map(|v| v as f32).collect()
    }

    /// Bursts start at every multiple of `every_s` after the first (the
    /// signal starts normal) and last `duration_s`.
    fn in_anomaly(&self, t: f64) -> bool {
        match self.anomaly {
            Some((every, duration)) => t >= every && t % every < duration,
            None => false,
        }
    }

    fn vibration(&mut self, t: f64, out: &mut [f64]) {
        let segment = (t / self.segment_s).floor();
        let seg_start = segment * self.segment_s;
        let state = (segment as u64 % 4) as usize;
        if self.machine.as_ref().is_none_or(|m| m.seg_start != seg_start) {
            self.machine = Some(Machine::draw(state, seg_start, &mut self.rng));
        }
        if let Some(m) = self.machine.as_mut() {
            m.sample(t - seg_start, &mut self.rng, out);
        }
    }
}

// The vibration model, ported from `vib_signal` in models/make_models.py:
// a 3-axis accelerometer (x, y radial; z axial) in g, z carrying +1 g of gravity.
const F_ROT: f64 = 25.0;
const BPFO_RATIO: f64 = 3.58;
const RESONANCE: f64 = 280.0;

/// One machine state's parameters, drawn once per segment as the Python
/// generator draws them once per window; time runs from the segment start.
struct Machine {
    seg_start: f64,
    f0: f64,
    /// (axis, amplitude, harmonic of f0, phase).
    tones: Vec<(usize, f64, f64, f64)>,
    noise_std: f64,
    bearing: Option<Bearing>,
}

/// Bearing-fault impacts: each excites a decaying resonance.
struct Bearing {
    period: f64,
    amp: f64,
    tau: f64,
    /// Time of the next impact not yet started.
    next_impact: f64,
    /// (time, amplitude) of the impacts still ringing.
    ringing: Vec<(f64, f64)>,
}

impl Machine {
    fn draw(state: usize, seg_start: f64, rng: &mut Gauss) -> Machine {
        let f0 = F_ROT * rng.uniform(0.9, 1.1);
        let ph: [f64; 4] = std::array::from_fn(|_| rng.uniform(0.0, TAU));
        let (a1, a2) = (rng.uniform(0.05, 0.2), rng.uniform(0.02, 0.08));
        // Every machine: small 1x and 2x, broadband noise.
        let mut tones = vec![
            (0, a1, 1.0, ph[0]),
            (0, a2, 2.0, ph[1]),
            (1, a1, 1.0, ph[0] + PI / 2.0),
            (1, a2, 2.0, ph[1] + PI / 2.0),
            (2, a1 * 0.3, 1.0, ph[2]),
        ];
        let mut bearing = None;
        match state {
            1 => {
                // Imbalance: strong 1x radial, x and y 90 degrees apart.
                let a = rng.uniform(0.5, 1.2);
                tones.push((0, a, 1.0, ph[3]));
                tones.push((1, a * rng.uniform(0.7, 1.0), 1.0, ph[3] + PI / 2.0));
                tones.push((2, rng.uniform(0.02, 0.1), 1.0, ph[2]));
            }
            2 => {
                // Misalignment: strong 2x radial and strong axial 1x + 2x.
                let a = rng.uniform(0.4, 0.9);
                tones.push((0, a, 2.0, ph[3]));
                tones.push((0, rng.uniform(0.1, 0.3), 1.0, ph[1]));
                tones.push((1, a * rng.uniform(0.6, 1.0), 2.0, ph[3] + PI / 2.0));
                tones.push((2, rng.uniform(0.3, 0.7), 2.0, ph[2]));
                tones.push((2, rng.uniform(0.2, 0.5), 1.0, ph[0]));
            }
            3 => {
                // Bearing fault: impacts at the outer-race defect frequency.
                let period = 1.0 / (BPFO_RATIO * f0 * rng.uniform(0.97, 1.03));
                let next_impact = rng.uniform(0.0, period);
                let amp = rng.uniform(0.8, 1.6);
                let tau = rng.uniform(0.003, 0.006);
                bearing = Some(Bearing { period, amp, tau, next_impact, ringing: Vec::new() });
            }
            _ => {}
        }
        let noise_std = rng.uniform(0.03, 0.12);
        Machine { seg_start, f0, tones, noise_std, bearing }
    }

    /// The sample at `t` seconds into the segment (t never decreases).
    fn sample(&mut self, t: f64, rng: &mut Gauss, out: &mut [f64]) {
        for &(axis, a, k, p) in &self.tones {
            out[axis] += a * (TAU * k * self.f0 * t + p).sin();
        }
        if let Some(b) = self.bearing.as_mut() {
            while b.next_impact <= t {
                b.ringing.push((b.next_impact, b.amp * rng.uniform(0.7, 1.0)));
                b.next_impact += b.period;
            }
            // exp(-20) is below anything a float sample can show.
            b.ringing.retain(|&(t0, _)| t - t0 < 20.0 * b.tau);
            let ring: f64 = b
                .ringing
                .iter()
                .map(|&(t0, a)| {
                    let dt = t - t0;
                    a * (-dt / b.tau).exp() * (TAU * RESONANCE * dt).sin()
                })
                .sum();
            out[0] += ring;
            out[1] += 0.6 * ring;
            out[2] += 0.3 * ring;
        }
        for v in out.iter_mut() {
            *v += self.noise_std * rng.normal();
        }
        out[2] += 1.0;
    }
}

/// Test frames: a bright square moving across a gradient background.
pub struct FrameGen {
    width: u32,
    height: u32,
    n: u64,
}

impl FrameGen {
    /// A generator for the `frames` signal.
    pub fn new(cfg: &SourceConfig) -> Result<Self, SourceError> {
        let SourceConfig::Synthetic { width, height, .. } = cfg else {
            return Err(SourceError(format!("synthetic source started with a `{}` source config", cfg.kind())));
        };
        if *width == 0 || *height == 0 {
            return Err(SourceError(format!("synthetic source: frame size {width}x{height} is empty")));
        }
        Ok(FrameGen { width: *width, height: *height, n: 0 })
    }

    /// The next frame.
    pub fn next_frame(&mut self) -> RgbImage {
        let (w, h) = (u64::from(self.width), u64::from(self.height));
        let side = (w.min(h) / 4).max(1);
        // The square moves two pixels right and one down per frame, wrapping around.
        let (sx, sy) = ((self.n * 2) % w, self.n % h);
        let image = RgbImage::from_fn(self.width, self.height, |x, y| {
            let (x, y) = (u64::from(x), u64::from(y));
            if (x + w - sx) % w < side && (y + h - sy) % h < side {
                Rgb([255, 255, 255])
            } else {
                Rgb([(x * 200 / w) as u8, (y * 200 / h) as u8, 80])
            }
        });
        self.n += 1;
        image
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    use std::sync::Arc;

    use super::*;
    use crate::message::{InputQueue, Overflow};
    use crate::metrics::PipelineMetrics;

    fn synthetic(signal: Signal) -> SourceConfig {
        SourceConfig::Synthetic {
            signal,
            rate_hz: 1000.0,
            channels: 3,
            amplitude: 1.0,
            frequency_hz: 5.0,
            noise: 0.05,
            anomaly_every_s: None,
            anomaly_duration_s: 1.0,
            segment_s: 10.0,
            width: 32,
            height: 24,
            fps: 1000.0,
            count: None,
            seed: 7,
        }
    }

    fn with(cfg: SourceConfig, f: impl FnOnce(&mut SourceConfig)) -> SourceConfig {
        let mut cfg = cfg;
        f(&mut cfg);
        cfg
    }

    fn ctx(cap: usize) -> SourceCtx {
        SourceCtx {
            pipeline: "t".into(),
            queue: InputQueue::new(cap, Overflow::Block),
            metrics: Arc::new(PipelineMetrics::new("t", "m", 0.0)),
            stop: Arc::new(AtomicBool::new(false)),
            base_dir: std::env::temp_dir(),
        }
    }

    fn take(gen: &mut SampleGen, n: usize) -> Vec<Vec<f32>> {
        (0..n).map(|_| gen.next_sample()).collect()
    }

    #[test]
    fn same_seed_same_samples_other_seed_other_samples() {
        for signal in [Signal::Sine, Signal::Noise, Signal::Steps, Signal::Vibration] {
            let cfg = synthetic(signal);
            let a = take(&mut SampleGen::new(&cfg).unwrap(), 500);
            let b = take(&mut SampleGen::new(&cfg).unwrap(), 500);
            assert_eq!(a, b, "{signal:?}");
            let other = with(cfg, |c| {
                if let SourceConfig::Synthetic { seed, .. } = c {
                    *seed = 8
                }
            });
            let c = take(&mut SampleGen::new(&other).unwrap(), 500);
            assert_ne!(a, c, "{signal:?}");
        }
    }

    #[test]
    fn sine_channels_are_phase_shifted_sines_with_small_noise() {
        let cfg = with(synthetic(Signal::Sine), |c| {
            if let SourceConfig::Synthetic { noise, rate_hz, .. } = c {
                *noise = 0.0;
                *rate_hz = 100.0;
            }
        });
        let s = take(&mut SampleGen::new(&cfg).unwrap(), 100);
        assert!(s.iter().all(|v| v.len() == 3));
        for (n, v) in s.iter().enumerate() {
            for (c, x) in v.iter().enumerate() {
                let want = (TAU * (5.0 * n as f64 / 100.0 + c as f64 / 3.0)).sin();
                assert!((f64::from(*x) - want).abs() < 1e-5, "n={n} c={c}");
            }
        }
        // Gaussian noise with the configured spread.
        let noisy = with(synthetic(Signal::Noise), |c| {
            if let SourceConfig::Synthetic { noise, .. } = c {
                *noise = 2.0;
            }
        });
        let xs: Vec<f64> =
            take(&mut SampleGen::new(&noisy).unwrap(), 4000).concat().iter().map(|&x| x.into()).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let std = (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64).sqrt();
        assert!(mean.abs() < 0.1 && (std - 2.0).abs() < 0.1, "mean {mean} std {std}");
    }

    #[test]
    fn steps_are_a_square_wave() {
        let cfg = with(synthetic(Signal::Steps), |c| {
            if let SourceConfig::Synthetic { noise, amplitude, channels, .. } = c {
                *noise = 0.0;
                *amplitude = 2.0;
                *channels = 1;
            }
        });
        let s = take(&mut SampleGen::new(&cfg).unwrap(), 200);
        // 5 Hz at 1 kHz: 100 high samples, then 100 low.
        assert!(s[..100].iter().all(|v| v == &[2.0]));
        assert!(s[100..].iter().all(|v| v == &[-2.0]));
    }

    #[test]
    fn anomalies_are_spike_bursts_at_the_configured_times() {
        let cfg = with(synthetic(Signal::Sine), |c| {
            if let SourceConfig::Synthetic { anomaly_every_s, anomaly_duration_s, channels, .. } = c {
                *anomaly_every_s = Some(1.0);
                *anomaly_duration_s = 0.5;
                *channels = 1;
            }
        });
        let s = take(&mut SampleGen::new(&cfg).unwrap(), 3000);
        let spikes = |r: std::ops::Range<usize>| s[r].iter().filter(|v| v[0].abs() > 3.0).count();
        assert_eq!(spikes(0..1000), 0);
        let burst = spikes(1000..1500);
        assert!((25..=80).contains(&burst), "{burst} spikes in a 500-sample burst");
        assert_eq!(spikes(1500..2000), 0);
        assert!(spikes(2000..2500) > 20);
    }

    #[test]
    fn vibration_has_three_axes_gravity_and_cycles_states() {
        let cfg = with(synthetic(Signal::Vibration), |c| {
            if let SourceConfig::Synthetic { channels, segment_s, .. } = c {
                *channels = 8;
                *segment_s = 0.5;
            }
        });
        let mut g = SampleGen::new(&cfg).unwrap();
        assert_eq!(g.channels(), 3);
        let mut states = Vec::new();
        let mut z = 0.0;
        for _ in 0..2500 {
            states.push(g.vibration_state());
            let v = g.next_sample();
            assert_eq!(v.len(), 3);
            z += f64::from(v[2]);
        }
        assert!((z / 2500.0 - 1.0).abs() < 0.1, "mean z {}", z / 2500.0);
        assert_eq!(states[0], 0);
        assert_eq!(states[500], 1);
        assert_eq!(states[1000], 2);
        assert_eq!(states[1500], 3);
        assert_eq!(states[2000], 0);
    }

    /// The daemon demo relies on this: the shipped model tells the states apart.
    #[test]
    fn shipped_vibration_model_classifies_the_generated_states() {
        use crate::engine::Model;
        use crate::tensor::{Data, Tensor};

        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/vibration_int8.onnx");
        let model = Model::load(&path, &Default::default()).unwrap();
        let mut session = model.session().unwrap();
        const WIN: usize = 128;
        const PER_SEGMENT: usize = 5;
        let mut right = [0usize; 4];
        let mut total = [0usize; 4];
        for seed in 0..6 {
            let cfg = with(synthetic(Signal::Vibration), |c| {
                if let SourceConfig::Synthetic { segment_s, seed: s, .. } = c {
                    *segment_s = (WIN * PER_SEGMENT) as f64 / VIBRATION_RATE_HZ;
                    *s = seed;
                }
            });
            let mut g = SampleGen::new(&cfg).unwrap();
            // Two full cycles of the four states per seed.
            for _ in 0..(8 * PER_SEGMENT) {
                let state = g.vibration_state();
                let window = take(&mut g, WIN);
                // Channels first: [1, 3, 128].
                let data: Vec<f32> = (0..3).flat_map(|c| window.iter().map(move |s| s[c])).collect();
                let out = session.run(&[Tensor::from_f32(vec![1, 3, WIN], data).unwrap()]).unwrap();
                let Data::F32(logits) = &out[0].data else { panic!("logits are not f32") };
                let best = (0..logits.len()).max_by(|&a, &b| logits[a].total_cmp(&logits[b])).unwrap();
                total[state] += 1;
                right[state] += usize::from(best == state);
            }
        }
        for s in 0..4 {
            let acc = right[s] as f64 / total[s] as f64;
            assert!(acc >= 0.9, "{}: {}/{} windows classified right", VIBRATION_STATES[s], right[s], total[s]);
        }
    }

    #[test]
    fn frames_move_and_have_the_configured_size() {
        let mut g = FrameGen::new(&synthetic(Signal::Frames)).unwrap();
        let a = g.next_frame();
        let b = g.next_frame();
        assert_eq!(a.dimensions(), (32, 24));
        assert_ne!(a, b);
        assert_eq!(a.get_pixel(0, 0), &Rgb([255, 255, 255]));
        assert_eq!(b.get_pixel(2, 1), &Rgb([255, 255, 255]));
        assert_ne!(b.get_pixel(0, 0), &Rgb([255, 255, 255]));
    }

    #[test]
    fn count_limits_samples_and_frames() {
        for signal in [Signal::Sine, Signal::Vibration, Signal::Frames] {
            let cfg = with(synthetic(signal), |c| {
                if let SourceConfig::Synthetic { count, .. } = c {
                    *count = Some(37);
                }
            });
            let ctx = ctx(100);
            assert_eq!(run(&cfg, &ctx).unwrap(), SourceEnd::Finished);
            assert_eq!(ctx.queue.len(), 37, "{signal:?}");
            let first = ctx.queue.pop().unwrap();
            match (signal, first) {
                (Signal::Frames, Input::Frame(f)) => assert_eq!(f.image.dimensions(), (32, 24)),
                (Signal::Frames, other) => panic!("{other:?}"),
                (_, Input::Values(v)) => assert!(v.values.len() == 3 && v.names.is_none() && v.origin.is_none()),
                (_, other) => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn stops_promptly_on_shutdown_and_on_a_closed_queue() {
        let ctx = ctx(100_000);
        let stop = ctx.stop.clone();
        let cfg = synthetic(Signal::Sine);
        let handle = {
            let ctx = ctx.clone();
            std::thread::spawn(move || run(&cfg, &ctx))
        };
        std::thread::sleep(Duration::from_millis(150));
        stop.store(true, Relaxed);
        let t = Instant::now();
        assert_eq!(handle.join().unwrap().unwrap(), SourceEnd::Stopped);
        assert!(t.elapsed() < Duration::from_secs(2));
        assert!(!ctx.queue.is_empty());

        let ctx2 = self::ctx(10);
        ctx2.queue.close();
        assert_eq!(run(&synthetic(Signal::Frames), &ctx2).unwrap(), SourceEnd::Stopped);
    }

    #[test]
    fn other_source_configs_are_refused() {
        let cfg = SourceConfig::Lines { from: "stdin".into(), format: crate::source::config::LineFormat::Json };
        assert!(run(&cfg, &ctx(1)).unwrap_err().0.contains("lines"));
    }
}
