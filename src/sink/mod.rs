//! Outputs: where results go. Every sink takes results without blocking the
//! inference worker; what it cannot take is dropped and counted.

pub mod disk_queue;
pub mod file;
pub mod mqtt;
pub mod mqtt_proto;
pub mod mqtt_tls;
pub mod stdout;

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
