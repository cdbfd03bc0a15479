//! edgeinfer: run quantized ONNX models on small Linux boards and publish
//! the results over MQTT.
//!
//! # Layout
//!
//! - [`engine`]: the only module that touches tract; loads, pins, optimises and runs models.
//! - [`tensor`]: plain tensors shared by every module, with `.npy` and JSON conversions.
//! - [`preprocess`]: pure functions turning images and arrays into model inputs.
//! - [`postprocess`]: pure functions turning model outputs into results (top-k, scores).
//! - [`cmd`]: the `inspect`, `infer` and `bench` subcommands, called by `main.rs`.

pub mod cmd;
pub mod engine;
pub mod postprocess;
pub mod preprocess;
pub mod tensor;
