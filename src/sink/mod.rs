//! Outputs: where results go. Every sink takes results without blocking the
//! inference worker; what it cannot take is dropped and counted.

pub mod config;
pub mod disk_queue;
pub mod file;
pub mod mqtt;
pub mod mqtt_proto;
#[cfg(feature = "tls")]
pub mod mqtt_tls;
pub mod stdout;

/// Without the `tls` feature: the same names as the real `mqtt_tls`, but no TLS
/// configuration can exist (config validation refuses `mqtts://` first), so the
/// MQTT client needs only `#[cfg]`s where it touches rustls itself.
#[cfg(not(feature = "tls"))]
pub mod mqtt_tls {
    use std::path::{Path, PathBuf};

    use super::config::MqttTlsConfig;

    /// A TLS setting that cannot be used: here, any, as TLS is not built in.
    #[derive(Debug, thiserror::Error)]
    #[error("mqtt.tls: {0}")]
    pub struct TlsError(String);

    /// A TLS client configuration; never made in a binary without TLS.
    #[derive(Debug, Clone)]
    pub struct Tls {
        /// One line describing it.
        pub summary: String,
        /// Certificate verification is off.
        pub insecure: bool,
        #[allow(dead_code)]
        never: std::convert::Infallible,
    }

    /// Always the error naming the `tls` feature.
    pub fn load(_cfg: &MqttTlsConfig, _resolve: &dyn Fn(&Path) -> PathBuf) -> Result<Tls, TlsError> {
        Err(TlsError(crate::features::not_built("tls", "mqtts://")))
    }

    /// No TLS error can happen without TLS.
    pub fn explain(_err: &(dyn std::error::Error + 'static), _handshake: bool) -> Option<&'static str> {
        None
    }
}

use std::sync::Arc;

use crate::message::{Event, ResultMsg};

/// A destination for results.
pub trait Sink: Send + Sync {
    /// Hands over a result without blocking; false when it had to be dropped.
    fn offer(&self, msg: &Arc<ResultMsg>, event: Option<&Event>) -> bool;
}

/// A sink shared by several pipelines (the one stdout).
impl<S: Sink + ?Sized> Sink for Arc<S> {
    fn offer(&self, msg: &Arc<ResultMsg>, event: Option<&Event>) -> bool {
        (**self).offer(msg, event)
    }
}
