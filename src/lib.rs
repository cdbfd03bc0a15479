//! edgeinfer: run quantized ONNX models on small Linux boards and publish
//! the results over MQTT.
//!
//! # Layout
//!
//! From the bottom up; a module imports only from modules above it in this
//! list (`.ci/import-graph` checks that there is no import circle).
//!
//! - [`tensor`]: plain tensors shared by every module, with `.npy` and JSON conversions.
//! - [`features`]: which optional Cargo features this binary has; the error naming a missing one.
//! - [`stats`]: percentiles and resident memory, for the metrics and the `bench` tool.
//! - [`mqtt`]: what the MQTT client, the embedded broker and the config checks share (packet size, topics).
//! - [`sdnotify`]: systemd readiness, watchdog and stopping notifications.
//! - [`secret`]: secrets named by an environment variable or a file (HMAC key, status page password).
//! - [`engine`]: the only module that touches tract; loads, pins, optimises and runs models.
//! - [`model_store`]: the models directory `reload_model` may read from (confined, size-capped) and ed25519 model signatures.
//! - [`message`]: what flows between stages: inputs, what a source gives, the bounded input queue, results.
//! - `broker`: the embedded MQTT broker used when no broker is configured (feature `broker`).
//! - [`preprocess`]: inputs into model inputs (images, windows, rows, audio); its settings in `preprocess::config`.
//! - [`postprocess`]: model outputs into results (top-k, detections, events); its settings in `postprocess::config`.
//! - [`payload`]: the versioned JSON payloads.
//! - [`metrics`]: counters, latency percentiles and the health message.
//! - [`sink`]: outputs (mqtt, stdout, file) that never block inference, and the MQTT connection; `sink::config`.
//! - [`source`]: input sources, one thread each; their settings and what each gives in `source::config`.
//! - [`homeassistant`]: Home Assistant MQTT discovery configs for each pipeline.
//! - [`http`]: the status page and Prometheus `/metrics` (`[http]`; the server needs feature `http-server`).
//! - [`config`]: the daemon's TOML file: aggregates the components' settings, loads, runs the cross-component checks.
//! - [`cmd`]: the `inspect`, `infer`, `bench`, `convert` and `devices` subcommands, called by `main.rs`.
//! - [`prepare`]: start-up checks: a pipeline's model loaded and its stages fitted to it; `edgeinfer check`.
//! - [`commands`]: remote commands over MQTT (pause, thresholds, health, model and config reload), optional HMAC.
//! - [`pipeline`]: wires sources, models and sinks; runs the daemon and its shutdown.

#[cfg(feature = "broker")]
pub mod broker;
pub mod cmd;
pub mod commands;
pub mod config;
pub mod engine;
pub mod features;
pub mod homeassistant;
pub mod http;
pub mod message;
pub mod metrics;
pub mod model_store;
pub mod mqtt;
pub mod payload;
pub mod pipeline;
pub mod postprocess;
pub mod prepare;
pub mod preprocess;
pub mod sdnotify;
pub mod secret;
pub mod sink;
pub mod source;
pub mod stats;
pub mod tensor;
