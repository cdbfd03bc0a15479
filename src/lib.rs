//! edgeinfer: run quantized ONNX models on small Linux boards and publish
//! the results over MQTT.
//!
//! # Layout
//!
//! - [`engine`]: the only module that touches tract; loads, pins, optimises and runs models.
//! - [`tensor`]: plain tensors shared by every module, with `.npy` and JSON conversions.
//! - [`preprocess`]: pure functions turning images and arrays into model inputs.
//! - [`postprocess`]: pure functions turning model outputs into results (top-k, scores).
//! - [`cmd`]: the `inspect`, `infer`, `bench` and `devices` subcommands, called by `main.rs`.
//! - [`config`]: the daemon's TOML configuration, parsed and validated.
//! - [`message`]: what flows between stages: inputs, the bounded input queue, results.
//! - [`source`]: input sources (synthetic, files, lines, mqtt), one thread each.
//! - [`sink`]: outputs (mqtt, stdout, file) that never block inference.
//! - `broker`: the embedded MQTT broker used when no broker is configured (feature `broker`).
//! - [`features`]: which optional Cargo features this binary has; the error naming a missing one.
//! - [`prepare`]: start-up checks: a pipeline's model loaded and its stages fitted to it; `edgeinfer check`.
//! - [`pipeline`]: wires sources, models and sinks; runs the daemon and its shutdown.
//! - [`mqtt`]: what the MQTT client and the embedded broker share (packet size).
//! - [`metrics`]: counters, latency percentiles and the health message.
//! - [`payload`]: the versioned JSON payloads.
//! - [`stats`]: percentiles and resident memory, for the metrics and the `bench` tool.
//! - [`sdnotify`]: systemd readiness, watchdog and stopping notifications.
//! - [`homeassistant`]: Home Assistant MQTT discovery configs for each pipeline.
//! - [`commands`]: remote commands over MQTT (pause, thresholds, health, model reload), optional HMAC.

#[cfg(feature = "broker")]
pub mod broker;
pub mod cmd;
pub mod commands;
pub mod config;
pub mod engine;
pub mod features;
pub mod homeassistant;
pub mod message;
pub mod metrics;
pub mod mqtt;
pub mod payload;
pub mod pipeline;
pub mod postprocess;
pub mod prepare;
pub mod preprocess;
pub mod sdnotify;
pub mod sink;
pub mod source;
pub mod stats;
pub mod tensor;
