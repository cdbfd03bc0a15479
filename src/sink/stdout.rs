//! JSON lines on stdout, written by a thread of its own so a slow terminal
//! or pipe never stalls inference (full buffer: the result is dropped and counted).

use std::io::Write;
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::SystemTime;

use crate::message::{Event, ResultMsg};

use super::Sink;

type Item = (Arc<ResultMsg>, Option<Event>);

/// Writes each result as one JSON line to a writer.
pub struct LineSink {
    tx: SyncSender<Item>,
}

impl LineSink {
    /// A sink writing to stdout.
    pub fn stdout() -> std::io::Result<(Self, std::thread::JoinHandle<()>)> {
        Self::spawn("out-stdout", || Box::new(std::io::stdout()) as Box<dyn Write + Send>)
    }

    /// A sink writing to what `open` returns, on its own thread; the thread
    /// ends (after writing what is queued) when the sink is dropped.
    pub fn spawn(
        name: &str,
        open: impl FnOnce() -> Box<dyn Write + Send> + Send + 'static,
    ) -> std::io::Result<(Self, std::thread::JoinHandle<()>)> {
        let (tx, rx) = sync_channel::<Item>(1024);
        let thread_name = name.to_string();
        let handle = std::thread::Builder::new().name(name.into()).spawn(move || {
            let mut out = open();
            let mut failures: u64 = 0;
            for (msg, event) in rx {
                let mut line = crate::payload::result_bytes(&msg, event.as_ref(), SystemTime::now());
                line.push(b'\n');
                if let Err(e) = out.write_all(&line).and_then(|_| out.flush()) {
                    // Disk full, stdout closed: the result is lost; say so, rate-limited, and go on.
                    failures += 1;
                    if failures.is_power_of_two() {
                        log::warn!("{thread_name}: cannot write a result ({e}); {failures} lost so far");
                    }
                }
            }
            log::debug!("output thread ended");
        })?;
        Ok((LineSink { tx }, handle))
    }
}

impl Sink for LineSink {
    fn offer(&self, msg: &Arc<ResultMsg>, event: Option<&Event>) -> bool {
        match self.tx.try_send((msg.clone(), event.cloned())) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => false,
        }
    }
}
