//! The preprocess settings of a pipeline (`preprocess`), parsed into typed
//! values and checked on their own; whether they fit the source and the
//! model is checked where both are known (`config`, `prepare`).

use serde::Deserialize;

use super::{ColorOrder, Layout, ResizeMode};

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
    Audio(super::audio::AudioConfig),
    /// The input already is the tensor (`.npy` files).
    None,
}

impl PreprocessConfig {
    /// Checks the values on their own; the error is (key under `preprocess.`, reason).
    pub fn validate(&self) -> Result<(), (String, String)> {
        if let PreprocessConfig::Window { window, hop, .. } = self {
            if window.is_some_and(|w| w == 0 || w > super::window::MAX_WINDOW) {
                return Err(("window".into(), format!("must be 1..={}", super::window::MAX_WINDOW)));
            }
            if hop.is_some_and(|h| h == 0) {
                return Err(("hop".into(), "must be at least 1".into()));
            }
        }
        Ok(())
    }
}
