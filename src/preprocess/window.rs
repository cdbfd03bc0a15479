//! Sliding windows over sensor samples, kept in a fixed-capacity ring buffer
//! (`heapless`): pushing a sample never allocates, and a ready window is
//! copied straight into the model's input buffer.

use heapless::HistoryBuf;

use super::config::WindowLayout;

/// Longest window, in samples.
pub const MAX_WINDOW: usize = 4096;
/// Most channels per sample.
pub const MAX_CHANNELS: usize = 16;

const CAPACITY: usize = MAX_WINDOW * MAX_CHANNELS;

/// Accumulates samples and says when a window is due.
pub struct Windower {
    ring: Box<HistoryBuf<f32, CAPACITY>>,
    window: usize,
    hop: usize,
    channels: usize,
    layout: WindowLayout,
    mean: [f32; MAX_CHANNELS],
    inv_std: [f32; MAX_CHANNELS],
    since_last: usize,
    samples: usize,
}

/// Why a window cannot be configured.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct WindowError(pub String);

impl Windower {
    /// A windower of `window` samples of `channels` values, emitting every `hop` samples.
    pub fn new(
        window: usize,
        hop: usize,
        channels: usize,
        layout: WindowLayout,
        mean: Option<&[f32]>,
        std: Option<&[f32]>,
    ) -> Result<Self, WindowError> {
        if window == 0 || window > MAX_WINDOW {
            return Err(WindowError(format!("window {window} must be 1..={MAX_WINDOW}")));
        }
        if channels == 0 || channels > MAX_CHANNELS {
            return Err(WindowError(format!("channels {channels} must be 1..={MAX_CHANNELS}")));
        }
        if hop == 0 {
            return Err(WindowError("hop must be at least 1".into()));
        }
        let mut m = [0.0; MAX_CHANNELS];
        let mut s = [1.0; MAX_CHANNELS];
        for (name, given, dst) in [("mean", mean, &mut m), ("std", std, &mut s)] {
            if let Some(v) = given {
                if v.len() != channels {
                    return Err(WindowError(format!("{name} has {} values for {channels} channels", v.len())));
                }
                dst[..channels].copy_from_slice(v);
            }
        }
        if s[..channels].contains(&0.0) {
            return Err(WindowError("std must not contain 0".into()));
        }
        let mut inv_std = [1.0; MAX_CHANNELS];
        for (i, x) in s.iter().enumerate() {
            inv_std[i] = 1.0 / x;
        }
        Ok(Windower {
            ring: Box::new(HistoryBuf::new()),
            window,
            hop,
            channels,
            layout,
            mean: m,
            inv_std,
            since_last: 0,
            samples: 0,
        })
    }

    /// An empty windower with the same settings (for another sample stream).
    pub fn fresh(&self) -> Windower {
        Windower { ring: Box::new(HistoryBuf::new()), since_last: 0, samples: 0, ..*self }
    }

    /// Values per sample.
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// Adds one sample (`channels` values). Returns true when a window is ready.
    pub fn push(&mut self, sample: &[f32]) -> bool {
        debug_assert_eq!(sample.len(), self.channels);
        for (c, &x) in sample.iter().enumerate() {
            self.ring.write((x - self.mean[c]) * self.inv_std[c]);
        }
        self.samples += 1;
        self.since_last += 1;
        if self.samples >= self.window && (self.samples == self.window || self.since_last >= self.hop) {
            self.since_last = 0;
            return true;
        }
        false
    }

    /// Copies the latest window into `out` (`window * channels` values) in the configured layout.
    pub fn fill(&self, out: &mut [f32]) {
        let n = self.window * self.channels;
        debug_assert_eq!(out.len(), n);
        let skip = self.ring.len() - n;
        let values = self.ring.oldest_ordered().skip(skip);
        match self.layout {
            WindowLayout::ChannelsLast => {
                for (dst, &v) in out.iter_mut().zip(values) {
                    *dst = v;
                }
            }
            WindowLayout::ChannelsFirst => {
                for (i, &v) in values.enumerate() {
                    let (t, c) = (i / self.channels, i % self.channels);
                    out[c * self.window + t] = v;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_window_then_every_hop() {
        let mut w = Windower::new(4, 2, 1, WindowLayout::ChannelsLast, None, None).unwrap();
        let ready: Vec<bool> = (0..10).map(|i| w.push(&[i as f32])).collect();
        assert_eq!(ready, [false, false, false, true, false, true, false, true, false, true]);
        let mut out = [0.0; 4];
        w.fill(&mut out);
        assert_eq!(out, [6.0, 7.0, 8.0, 9.0]);
    }

    #[test]
    fn channels_first_transposes_and_normalises() {
        let mut w = Windower::new(3, 3, 2, WindowLayout::ChannelsFirst, Some(&[1.0, 0.0]), Some(&[1.0, 2.0])).unwrap();
        for t in 0..3 {
            w.push(&[t as f32, 10.0 * t as f32]);
        }
        let mut out = [0.0; 6];
        w.fill(&mut out);
        assert_eq!(out, [-1.0, 0.0, 1.0, 0.0, 5.0, 10.0]);
    }

    #[test]
    fn bad_settings_are_rejected() {
        assert!(Windower::new(0, 1, 1, WindowLayout::ChannelsLast, None, None).is_err());
        assert!(Windower::new(MAX_WINDOW + 1, 1, 1, WindowLayout::ChannelsLast, None, None).is_err());
        assert!(Windower::new(4, 1, 2, WindowLayout::ChannelsLast, Some(&[1.0]), None).is_err());
        assert!(Windower::new(4, 1, 1, WindowLayout::ChannelsLast, None, Some(&[0.0])).is_err());
    }
}
