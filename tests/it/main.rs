//! Integration tests: one test binary (cheaper to link than many), one
//! module per area. They run against the shipped models and the real binary.

mod alloc;
mod audio;
mod cameras;
mod cli;
mod commands;
// Converted models, the start-up cache and `threads` (which several cases set).
#[cfg(feature = "threads")]
mod convert;
mod daemon;
mod detect;
mod features;
mod fleet;
// The fuzz targets cover the HTTP camera too; its module exists with `http-source`.
#[cfg(feature = "http-source")]
mod fuzz_regressions;
mod homeassistant;
#[cfg(feature = "http-source")]
mod http_camera;
#[cfg(feature = "model-fetch")]
mod model_updates;
mod mqtt5;
mod mqtt_hub;
mod parity;
mod pipe;
mod sensors;
#[cfg(feature = "serial")]
mod serial;
#[cfg(feature = "http-server")]
mod status_page;
mod store_forward;
mod support;
mod systemd;
#[cfg(feature = "tls")]
mod tls;

use std::path::PathBuf;

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A path under `models/`.
pub fn model(name: &str) -> PathBuf {
    root().join("models").join(name)
}
