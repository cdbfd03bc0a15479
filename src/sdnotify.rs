//! systemd service notifications (`Type=notify`, `WatchdogSec=`): the sd_notify
//! datagram protocol written by hand, so no libsystemd is linked and a static
//! binary keeps working. Outside systemd (`NOTIFY_SOCKET` unset) everything is a no-op.
//!
//! Not the `sd-notify` crate: its 0.5 connects to `$NOTIFY_SOCKET` as a path only,
//! and sd_notify(3) also allows a Linux abstract socket (`@name`), tested here.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Where to send notifications: a filesystem path or, with a leading `@`, a Linux abstract socket.
#[derive(Debug, Clone)]
pub struct Notifier {
    socket: String,
}

impl Notifier {
    /// The notifier systemd asked for through `$NOTIFY_SOCKET`, if any.
    pub fn from_env() -> Option<Notifier> {
        let socket = std::env::var("NOTIFY_SOCKET").ok().filter(|s| !s.is_empty())?;
        Some(Notifier { socket })
    }

    /// A notifier for an explicit socket address (as `$NOTIFY_SOCKET` would give it).
    pub fn new(socket: impl Into<String>) -> Notifier {
        Notifier { socket: socket.into() }
    }

    /// Sends one state string such as `READY=1`.
    pub fn notify(&self, state: &str) -> std::io::Result<()> {
        let sock = UnixDatagram::unbound()?;
        match self.socket.strip_prefix('@') {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
                sock.send_to_addr(state.as_bytes(), &addr)?;
            }
            None => {
                sock.send_to(state.as_bytes(), &self.socket)?;
            }
        }
        Ok(())
    }

    /// Sends a state, logging (not failing) when systemd cannot be reached: the
    /// daemon's work matters more than its supervisor's view of it.
    fn send(&self, state: &str) {
        if let Err(e) = self.notify(state) {
            log::warn!("sd_notify {state} to {}: {e}", self.socket);
        }
    }
}

/// How often to ping the watchdog: half of `$WATCHDOG_USEC`, when it is meant for this process.
pub fn watchdog_interval() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok()?;
    let pid = std::env::var("WATCHDOG_PID").ok();
    ping_interval(&usec, pid.as_deref(), std::process::id())
}

/// Half the watchdog timeout, or None when it is unset, zero, malformed or for another pid.
fn ping_interval(usec: &str, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    if pid.is_some_and(|p| p.trim().parse::<u32>().ok() != Some(own_pid)) {
        return None;
    }
    let usec: u64 = usec.trim().parse().ok().filter(|&u| u > 0)?;
    Some(Duration::from_micros(usec / 2))
}

/// Tells systemd the daemon is up (`READY=1`) and, when a watchdog is configured,
/// pings it from a task on the current tokio runtime: a stalled reactor (MQTT,
/// health, signals) then stops the pings and systemd restarts the service.
/// Returns the ping task, to abort at shutdown.
pub fn ready() -> Option<tokio::task::JoinHandle<()>> {
    let notifier = Notifier::from_env()?;
    notifier.send(&format!("READY=1\nMAINPID={}", std::process::id()));
    let interval = watchdog_interval()?;
    log::debug!("systemd watchdog: ping every {} ms", interval.as_millis());
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        loop {
            tick.tick().await;
            notifier.send("WATCHDOG=1");
        }
    }))
}

/// Tells systemd the daemon is shutting down (`STOPPING=1`) and stops the pings.
pub fn stopping(pinger: Option<tokio::task::JoinHandle<()>>) {
    if let Some(task) = pinger {
        task.abort();
    }
    if let Some(n) = Notifier::from_env() {
        n.send("STOPPING=1");
    }
}

/// Tells systemd the daemon is reloading (`RELOADING=1`; the restarted process sends
/// `READY=1` again) and stops the pings.
pub fn reloading(pinger: Option<tokio::task::JoinHandle<()>>) {
    if let Some(task) = pinger {
        task.abort();
    }
    if let Some(n) = Notifier::from_env() {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime writes into the timespec we own.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let usec = ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000;
        n.send(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_datagrams_to_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(path.to_str().unwrap());
        n.notify("READY=1").unwrap();
        n.notify("WATCHDOG=1").unwrap();
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1");
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1");
    }

    #[test]
    fn sends_datagrams_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("edgeinfer-test-{}-{}", std::process::id(), fastrand::u64(..));
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        Notifier::new(format!("@{name}")).notify("STOPPING=1").unwrap();
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"STOPPING=1");
    }

    #[test]
    fn missing_socket_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Notifier::new(dir.path().join("absent").to_str().unwrap()).notify("READY=1").is_err());
    }

    #[test]
    fn watchdog_interval_is_half_the_timeout_for_this_pid_only() {
        assert_eq!(ping_interval("10000000", None, 7), Some(Duration::from_secs(5)));
        assert_eq!(ping_interval("10000000", Some("7"), 7), Some(Duration::from_secs(5)));
        assert_eq!(ping_interval("10000000", Some("8"), 7), None);
        assert_eq!(ping_interval("0", None, 7), None);
        assert_eq!(ping_interval("ten", None, 7), None);
    }
}
