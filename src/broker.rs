//! The embedded MQTT broker (rumqttd), started when no broker URL is
//! configured: MQTT 3.1.1 on one address (and optionally over TLS on a second),
//! optional user name and password, with retained messages and Last Will. It
//! runs on threads of its own (its router and a server thread with its own
//! small runtime) for the life of the process; rumqttd has no way to stop it.
//!
//! rumqttd logs through `tracing`, and with no tracing subscriber installed
//! its events reach the `log` facade: every packet at info, and per-message
//! spans at *error* level. The logger should switch off [`LOG_TARGETS`].

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

/// The largest payload a client may publish (camera frames are published).
pub const MAX_PAYLOAD_BYTES: usize = crate::mqtt::MAX_PACKET_BYTES;
/// `log` targets of rumqttd's records (its events and its spans). Filter
/// them out (e.g. `env_logger::Builder::filter_module(target, LevelFilter::Off)`)
/// unless debugging the broker: at info it logs several lines per message,
/// some at error level.
pub const LOG_TARGETS: [&str; 2] = ["rumqttd", "tracing::span"];
/// How long `start` waits for the port to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(5);

/// The broker could not start.
#[derive(Debug, thiserror::Error)]
#[error("embedded broker on {addr}: {reason}")]
pub struct BrokerError {
    /// Listen address.
    pub addr: SocketAddr,
    /// Why.
    pub reason: String,
}

/// The broker's configuration, built in code (values after rumqttd's own
/// `rumqttd.toml`, sized for an edge device).
pub fn config(addr: SocketAddr, login: Option<(String, String)>) -> Config {
    let connections = ConnectionSettings {
        // Time a new connection has to send its CONNECT.
        connection_timeout_ms: 60_000,
        max_payload_size: MAX_PAYLOAD_BYTES,
        max_inflight_count: 100,
        // rumqttd compares the password in constant time and refuses a CONNECT without one.
        auth: login.map(|(user, password)| HashMap::from([(user, password)])),
        external_auth: None,
        dynamic_filters: true,
    };
    let server =
        ServerSettings { name: "v4-1".into(), listen: addr, tls: None, next_connection_delay_ms: 1, connections };
    Config {
        id: 0,
        router: RouterConfig {
            max_connections: 1000,
            max_outgoing_packet_count: 200,
            // Each subscribed filter keeps up to count x size bytes of recent
            // messages in memory: 20 MiB at most per filter.
            max_segment_size: 2 << 20,
            max_segment_count: 10,
            ..RouterConfig::default()
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Config::default()
    }
}

/// Starts the broker on its own threads and returns once it accepts
/// connections. Blocks for up to about 5 s.
pub fn start(addr: SocketAddr, login: Option<(String, String)>) -> Result<(), BrokerError> {
    let fail = |reason: String| BrokerError { addr, reason };
    if addr.port() == 0 {
        return Err(fail("port 0 is not supported: give the port to listen on".into()));
    }
    // rumqttd only logs a failed bind (on its own thread), so find out first.
    match TcpListener::bind(addr) {
        Ok(probe) => drop(probe),
        Err(e) => return Err(fail(bind_reason(&e))),
    }

    let config = config(addr, login);
    let thread = std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = Broker::new(config);
            if let Err(e) = broker.start() {
                log::error!("embedded MQTT broker stopped: {e}");
            }
        })
        .map_err(|e| fail(format!("cannot start its thread: {e}")))?;

    let target = SocketAddr::new(reachable_ip(addr.ip()), addr.port());
    let started = Instant::now();
    loop {
        if thread.is_finished() {
            return Err(fail("it stopped right after starting (see the log above)".into()));
        }
        if TcpStream::connect_timeout(&target, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if started.elapsed() > READY_TIMEOUT {
            return Err(fail(format!("not accepting connections after {} s", READY_TIMEOUT.as_secs())));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Most `[broker.tls]` connections at once (the router's own bound); more are closed at once.
#[cfg(feature = "tls")]
pub const MAX_TLS_CONNECTIONS: usize = 1000;
/// Time a TLS client has to finish its handshake before its connection is closed.
#[cfg(feature = "tls")]
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts the `[broker.tls]` listener on `addr` (inside a tokio runtime): TLS ends here and
/// each connection's MQTT bytes go to the broker's plain listener `broker`, so its login
/// and limits apply on both ports. rumqttd's own TLS would build a second rustls with
/// another certificate parser; this keeps the one the client side already uses.
#[cfg(feature = "tls")]
pub fn start_tls(
    addr: SocketAddr,
    config: std::sync::Arc<rustls::ServerConfig>,
    broker: SocketAddr,
) -> Result<(), BrokerError> {
    let fail = |reason: String| BrokerError { addr, reason };
    if addr.port() == 0 {
        return Err(fail("port 0 is not supported: give the port to listen on".into()));
    }
    let listener =
        TcpListener::bind(addr).map_err(|e| fail(bind_reason(&e).replace("broker.listen", "broker.tls.listen")))?;
    listener.set_nonblocking(true).map_err(|e| fail(e.to_string()))?;
    let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| fail(e.to_string()))?;
    let upstream = SocketAddr::new(reachable_ip(broker.ip()), broker.port());
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_TLS_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors, most likely: wait rather than spin.
                    log::warn!("broker TLS listener {addr}: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                log::warn!("broker TLS listener {addr}: {MAX_TLS_CONNECTIONS} connections open; {peer} refused");
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let mut tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => return log::info!("broker TLS listener: {peer}: handshake failed: {e}"),
                    Err(_) => return log::info!("broker TLS listener: {peer}: no handshake within 10 s"),
                };
                let mut plain = match tokio::net::TcpStream::connect(upstream).await {
                    Ok(s) => s,
                    Err(e) => return log::warn!("broker TLS listener: cannot reach the broker at {upstream}: {e}"),
                };
                let _ = plain.set_nodelay(true);
                // Ends when either side closes; errors are a client going away.
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    Ok(())
}

/// A bind error in words a user can act on.
fn bind_reason(e: &std::io::Error) -> String {
    match e.kind() {
        ErrorKind::AddrInUse => {
            "address already in use (is another MQTT broker running? point mqtt.url at it, or change broker.listen)"
                .into()
        }
        ErrorKind::AddrNotAvailable => "address not available on this machine (check broker.listen)".into(),
        ErrorKind::PermissionDenied => "permission denied (ports below 1024 need privileges)".into(),
        _ => format!("cannot listen: {e}"),
    }
}

/// Where to check that a listener on `ip` accepts connections.
fn reachable_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};

    fn free_port() -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
        l.local_addr().expect("local addr").port()
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
    }

    /// A client whose event loop runs until the task is aborted; received publishes go to the channel.
    fn client(
        id: &str,
        port: u16,
        will: Option<LastWill>,
    ) -> (AsyncClient, tokio::sync::mpsc::UnboundedReceiver<rumqttc::Publish>, tokio::task::JoinHandle<()>) {
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(5)).set_max_packet_size(MAX_PAYLOAD_BYTES, MAX_PAYLOAD_BYTES);
        if let Some(w) = will {
            opts.set_last_will(w);
        }
        let (client, mut eventloop) = AsyncClient::new(opts, 100);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send(p);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        (client, rx, task)
    }

    async fn next(rx: &mut tokio::sync::mpsc::UnboundedReceiver<rumqttc::Publish>) -> rumqttc::Publish {
        tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("a message in time").expect("open")
    }

    #[test]
    fn a_second_broker_on_the_same_address_says_address_in_use() {
        let held = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = held.local_addr().expect("addr");
        let err = start(addr, None).expect_err("must fail");
        let text = err.to_string();
        assert!(text.contains("address already in use"), "{text}");
        assert!(text.contains(&addr.to_string()), "{text}");
    }

    #[test]
    fn retained_messages_last_will_and_large_payloads_work() {
        let port = free_port();
        start(SocketAddr::from(([127, 0, 0, 1], port)), None).expect("broker starts");
        runtime().block_on(async {
            let will = LastWill::new("t/status", "offline", QoS::AtLeastOnce, true);
            let (dying, _, dying_task) = client("dying", port, Some(will));
            dying.publish("t/status", QoS::AtLeastOnce, true, "online").await.expect("queue");
            let big = vec![7u8; 1 << 20];
            dying.publish("t/big", QoS::AtLeastOnce, true, big.clone()).await.expect("queue");

            // A late subscriber gets the retained messages.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let (late, mut rx, late_task) = client("late", port, None);
            late.subscribe("t/#", QoS::AtLeastOnce).await.expect("queue");
            let mut got = HashMap::new();
            while got.len() < 2 {
                let p = next(&mut rx).await;
                assert!(p.retain, "retained flag on {}", p.topic);
                got.insert(p.topic.clone(), p.payload.to_vec());
            }
            assert_eq!(got["t/status"], b"online");
            assert_eq!(got["t/big"].len(), big.len());

            // The connection dies without DISCONNECT: the will is published.
            dying_task.abort();
            drop(dying);
            let p = next(&mut rx).await;
            assert_eq!((p.topic.as_str(), &p.payload[..]), ("t/status", &b"offline"[..]));

            // ... and retained.
            let (later, mut rx2, later_task) = client("later", port, None);
            later.subscribe("t/status", QoS::AtLeastOnce).await.expect("queue");
            let p = next(&mut rx2).await;
            assert!(p.retain);
            assert_eq!(&p.payload[..], b"offline");
            late_task.abort();
            later_task.abort();
        });
    }
}
