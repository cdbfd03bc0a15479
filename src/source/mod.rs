//! Input sources. Each runs on its own thread, pushes [`Input`]s into the
//! pipeline's bounded queue and stops when asked; a source that fails is
//! restarted with backoff and reported in health, never fatal to the daemon.

pub mod config;
pub mod files;
#[cfg(feature = "http-source")]
pub mod http;
pub mod iio;
pub mod lines;
pub mod mqtt;
pub mod pipe;
#[cfg(feature = "serial")]
pub mod serial;
pub mod synthetic;
// Always here: the frame conversions and the `devices` listing need no feature;
// capture itself is behind `v4l2` (and 64-bit targets).
pub mod v4l2;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;

use super::config::SourceConfig;
use crate::message::{Input, InputQueue, Pushed};
use crate::metrics::PipelineMetrics;
use crate::sink::mqtt::MqttHandle;

/// A source failure; the source is restarted after a backoff.
#[derive(Debug, Error)]
#[error("{0}")]
pub struct SourceError(pub String);

/// How a source run ended without failing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceEnd {
    /// It has nothing more to give (files played once, stdin closed, `count` reached).
    Finished,
    /// Shutdown was requested.
    Stopped,
}

/// What a source needs from its pipeline.
#[derive(Clone)]
pub struct SourceCtx {
    /// Pipeline name, for logs.
    pub pipeline: String,
    /// Where inputs go.
    pub queue: Arc<InputQueue>,
    /// Where drops and failures are counted.
    pub metrics: Arc<PipelineMetrics>,
    /// Set on shutdown.
    pub stop: Arc<AtomicBool>,
    /// Directory relative paths resolve against (the config file's).
    pub base_dir: PathBuf,
}

impl SourceCtx {
    /// Queues an input, counting what the overflow policy drops. False once the queue is closed.
    pub fn push(&self, input: Input) -> bool {
        let frame = matches!(input, Input::Frame(_));
        self.metrics.inputs.fetch_add(1, Relaxed);
        match self.queue.push(input) {
            Pushed::Queued => true,
            Pushed::DroppedOldest if frame => {
                self.metrics.dropped_stale.fetch_add(1, Relaxed);
                true
            }
            Pushed::DroppedOldest | Pushed::DroppedNewest => {
                let n = self.metrics.dropped_queue_full.fetch_add(1, Relaxed) + 1;
                if n.is_power_of_two() {
                    log::warn!("pipeline `{}`: input queue full, {n} inputs dropped so far", self.pipeline);
                }
                true
            }
            Pushed::Closed => false,
        }
    }

    /// True once shutdown was requested.
    pub fn stopped(&self) -> bool {
        self.stop.load(Relaxed)
    }

    /// Sleeps until `deadline`, waking early on shutdown. False if stopped.
    pub fn sleep_until(&self, deadline: Instant) -> bool {
        loop {
            if self.stopped() {
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                return true;
            }
            std::thread::sleep((deadline - now).min(Duration::from_millis(50)));
        }
    }
}

impl SourceCtx {
    /// Counts a frame that could not be decoded and logs the first of each power of two.
    pub fn bad_frame(&self, why: &str) {
        let n = self.metrics.bad_frames.fetch_add(1, Relaxed) + 1;
        if n.is_power_of_two() {
            log::warn!("pipeline `{}`: bad frame skipped: {why} ({n} so far)", self.pipeline);
        }
    }
}

/// `max_fps` for camera sources: admits a frame when at least 1/max_fps has
/// passed since the last admitted one. Checked before decoding, so frames it
/// refuses cost no decode.
#[derive(Debug, Clone)]
pub struct FrameGate {
    period: Option<Duration>,
    next: Option<Instant>,
}

impl FrameGate {
    /// A gate for at most `max_fps` frames per second (None: no limit).
    pub fn new(max_fps: Option<f64>) -> Self {
        FrameGate { period: max_fps.filter(|f| *f > 0.0).map(|f| Duration::from_secs_f64(1.0 / f)), next: None }
    }

    /// True if a frame arriving at `now` may pass.
    pub fn admit(&mut self, now: Instant) -> bool {
        let Some(period) = self.period else { return true };
        match self.next {
            Some(next) if now < next => false,
            // Schedule from the ideal time, not `now`, so jitter does not lower the
            // rate; but never from the past, or a stall would release a burst.
            Some(next) => {
                let ideal = next + period;
                self.next = Some(if ideal < now { now + period } else { ideal });
                true
            }
            None => {
                self.next = Some(now + period);
                true
            }
        }
    }
}

/// A context for source tests: a blocking queue of 1000 and fresh metrics.
#[cfg(test)]
pub(crate) fn test_ctx(base: &std::path::Path) -> SourceCtx {
    SourceCtx {
        pipeline: "t".into(),
        queue: InputQueue::new(1000, crate::message::Overflow::Block),
        metrics: Arc::new(PipelineMetrics::new("t", "m", 0.0)),
        stop: Arc::new(AtomicBool::new(false)),
        base_dir: base.to_path_buf(),
    }
}

fn run_once(cfg: &SourceConfig, ctx: &SourceCtx, mqtt: Option<&MqttHandle>) -> Result<SourceEnd, SourceError> {
    match cfg {
        SourceConfig::Synthetic { .. } => synthetic::run(cfg, ctx),
        SourceConfig::Files { .. } => files::run(cfg, ctx),
        SourceConfig::Lines { .. } => lines::run(cfg, ctx),
        SourceConfig::Mqtt { .. } => match mqtt {
            Some(hub) => mqtt::run(cfg, ctx, hub),
            None => Err(SourceError("the mqtt source needs an MQTT connection".into())),
        },
        SourceConfig::Pipe { .. } => pipe::run(cfg, ctx),
        SourceConfig::V4l2 { .. } => v4l2::run(cfg, ctx),
        #[cfg(feature = "http-source")]
        SourceConfig::Http { .. } => http::run(cfg, ctx),
        SourceConfig::Iio { .. } => iio::run(cfg, ctx),
        #[cfg(feature = "serial")]
        SourceConfig::Serial { .. } => serial::run(cfg, ctx),
        // Config validation refuses these first; this is for callers that skip it.
        #[cfg(not(all(feature = "http-source", feature = "serial")))]
        _ => Err(SourceError(crate::features::not_built(
            cfg.feature().unwrap_or("?"),
            &format!("source type `{}`", cfg.kind()),
        ))),
    }
}

/// Starts the source on its own thread. It is retried with exponential
/// backoff (1 s doubling to 30 s) when it fails; the queue is closed when it
/// finishes or is stopped, which ends the pipeline's worker.
pub fn spawn(
    cfg: SourceConfig,
    ctx: SourceCtx,
    mqtt: Option<MqttHandle>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name(format!("src-{}", ctx.pipeline)).spawn(move || {
        let mut backoff = Duration::from_secs(1);
        loop {
            ctx.metrics.source_running.store(true, Relaxed);
            let started = Instant::now();
            match run_once(&cfg, &ctx, mqtt.as_ref()) {
                Ok(end) => {
                    if end == SourceEnd::Finished {
                        log::info!("pipeline `{}`: {} source finished", ctx.pipeline, cfg.kind());
                    }
                    break;
                }
                Err(e) => {
                    ctx.metrics.source_failed(&e.0);
                    ctx.metrics.source_restarts.fetch_add(1, Relaxed);
                    if started.elapsed() > Duration::from_secs(60) {
                        backoff = Duration::from_secs(1);
                    }
                    log::warn!(
                        "pipeline `{}`: {} source failed: {e}; retrying in {:.0} s",
                        ctx.pipeline,
                        cfg.kind(),
                        backoff.as_secs_f64()
                    );
                    if !ctx.sleep_until(Instant::now() + backoff) {
                        break;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
        ctx.metrics.source_running.store(false, Relaxed);
        ctx.queue.close();
    })
}

/// Helpers for source tests that run a source on a thread.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::atomic::Ordering::Relaxed;
    use std::thread::JoinHandle;
    use std::time::{Duration, Instant};

    use super::{SourceCtx, SourceEnd, SourceError};
    use crate::message::{Input, Values};

    /// The next input's values, waiting up to 5 s.
    pub fn next(ctx: &SourceCtx) -> Values {
        let deadline = Instant::now() + Duration::from_secs(5);
        while ctx.queue.is_empty() {
            assert!(Instant::now() < deadline, "no input within 5 s");
            std::thread::sleep(Duration::from_millis(5));
        }
        // `pop` blocks while the queue is empty; it is not now.
        match ctx.queue.pop() {
            Some(Input::Values(v)) => v,
            other => panic!("{other:?}"),
        }
    }

    /// The run's error, waiting at most 5 s for the run to end.
    pub fn failure(handle: JoinHandle<Result<SourceEnd, SourceError>>) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !handle.is_finished() {
            assert!(Instant::now() < deadline, "the source did not fail within 5 s");
            std::thread::sleep(Duration::from_millis(10));
        }
        handle.join().unwrap().unwrap_err().0
    }

    /// Asks the source to stop and checks that it does, promptly.
    pub fn stop(ctx: &SourceCtx, handle: JoinHandle<Result<SourceEnd, SourceError>>) {
        ctx.stop.store(true, Relaxed);
        let t = Instant::now();
        assert_eq!(handle.join().unwrap().unwrap(), SourceEnd::Stopped);
        assert!(t.elapsed() < Duration::from_secs(2), "took {:?} to stop", t.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_gate_keeps_the_rate_under_max_fps() {
        let mut g = FrameGate::new(Some(10.0));
        let t0 = Instant::now();
        // 30 fps for one second: about 10 pass.
        let passed = (0..30).filter(|i| g.admit(t0 + Duration::from_millis(i * 33))).count();
        assert!((9..=11).contains(&passed), "{passed}");
        let mut open = FrameGate::new(None);
        assert!((0..5).all(|_| open.admit(t0)));
    }

    #[test]
    fn frame_gate_does_not_burst_after_a_stall() {
        let mut g = FrameGate::new(Some(10.0));
        let t0 = Instant::now();
        assert!(g.admit(t0));
        let late = t0 + Duration::from_secs(5);
        assert!(g.admit(late));
        assert!(!g.admit(late + Duration::from_millis(10)));
    }
}
