//! The MQTT connection shared by every MQTT output and source.
//!
//! One client per daemon. Callers (inference workers on plain threads) hand
//! messages over with [`MqttHandle::enqueue`], which never blocks; the
//! connection keeps them in a bounded buffer (the oldest are dropped and
//! counted when it is full) and publishes them in order whenever it is
//! connected, so a slow or absent broker never stalls capture or inference.
//!
//! Two tasks share the work:
//! - the *driver* owns rumqttc's `EventLoop` and does nothing but poll it,
//!   because `poll` must not be cancelled half-way (so it never sits in a
//!   `select!`). After a failed poll it sleeps a jittered exponential backoff:
//!   rumqttc itself retries immediately, which would be a tight loop.
//! - the *manager* owns the buffer, the subscriptions and the bookkeeping. It
//!   hands at most [`WINDOW`] publishes to the client at a time and keeps each
//!   one until the broker has it (written for QoS 0, acknowledged for QoS 1
//!   and 2). When the connection drops, whatever was not confirmed goes back to
//!   the front of the buffer, so nothing is lost to rumqttc's internal queues
//!   (a clean session discards them), at the price of an occasional duplicate.
//!
//! Store and forward: with a disk queue configured (`mqtt.queue_dir`), a
//! QoS 1/2 *result* is rendered and appended to the [`DiskQueue`] inside
//! [`MqttHandle::enqueue`] (it counts as accepted only once stored) and leaves
//! the queue only when the broker acknowledged it (PUBACK/PUBCOMP). The
//! manager reads the queue in order; after a connection loss (or a restart)
//! it starts again from the oldest unacknowledged record. QoS 0 messages and
//! raw messages (health, discovery, command replies) keep the memory buffer.
//!
//! Status: the Last Will is a retained `offline` on the status topic; every
//! ConnAck publishes a retained `online` and re-subscribes every registered
//! filter (the session is clean, so the broker remembers nothing).

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rumqttc::{
    AsyncClient, ConnectionError, Event as MqttEvent, EventLoop, LastWill, MqttOptions, MqttState, Outgoing, Packet,
    QoS, SubscribeFilter, SubscribeReasonCode,
};
#[cfg(feature = "tls")]
use rumqttc::{TlsConfiguration, Transport};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, timeout, Instant};

use super::disk_queue::{DiskQueue, Record, Stored};
use crate::message::{Event, ResultMsg};
use crate::metrics::MqttMetrics;

/// Largest packet sent or accepted (an image frame on an MQTT source must fit).
pub const MAX_PACKET_BYTES: usize = 8 << 20;

/// Publishes handed to the client and not yet confirmed, at most. Below the
/// client's in-flight limit so QoS 1/2 packet ids never collide.
const WINDOW: usize = 64;
/// rumqttc's limit of unacknowledged QoS 1/2 publishes.
const CLIENT_INFLIGHT: u16 = 100;
/// rumqttc's request channel: the window plus status, subscribe and disconnect requests.
const REQUEST_CAPACITY: usize = WINDOW + 64;
/// A message that was in flight during this many connection losses is dropped
/// (a broker that disconnects whoever sends it, e.g. because it is too big).
const MAX_SEND_ATTEMPTS: u8 = 5;
/// How long shutdown waits for the broker to acknowledge the `offline` status.
const OFFLINE_ACK_TIMEOUT: Duration = Duration::from_secs(1);
/// How long shutdown waits for the DISCONNECT to be written.
const DISCONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Shutdown returns at the latest this long after its deadline.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(1800);
/// Events from the driver to the manager waiting to be handled.
const LINK_CAPACITY: usize = 1024;
/// The shortest reconnect delay, whatever the settings say (never a tight loop).
const MIN_RECONNECT: Duration = Duration::from_millis(10);

/// Connection settings, resolved from the config (topics rendered, password read).
#[derive(Clone)]
pub struct MqttSettings {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Client id.
    pub client_id: String,
    /// Keep-alive.
    pub keep_alive: Duration,
    /// User name.
    pub username: Option<String>,
    /// Password (never logged).
    pub password: Option<String>,
    /// Messages buffered while disconnected; the oldest are dropped beyond it.
    pub buffer: usize,
    /// First reconnect delay.
    pub reconnect_min: Duration,
    /// Longest reconnect delay.
    pub reconnect_max: Duration,
    /// Retained `online`/`offline` topic; also the Last Will.
    pub status_topic: String,
    /// TLS (`mqtts://`); None: plain TCP.
    pub tls: Option<super::mqtt_tls::Tls>,
    /// Store-and-forward queue for QoS 1/2 results; None: the memory buffer only.
    pub disk_queue: Option<Arc<DiskQueue>>,
}

impl std::fmt::Debug for MqttSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttSettings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

/// What a message carries.
pub enum Body {
    /// A result, rendered to JSON when it is published (so `published_at` is
    /// true); with a disk queue, QoS 1/2 results are rendered when accepted.
    Result(Arc<ResultMsg>, Option<Event>),
    /// Bytes ready to send (health).
    Raw(Vec<u8>),
}

/// A message to publish.
pub struct OutMessage {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub body: Body,
    /// QoS 0, 1 or 2.
    pub qos: u8,
    /// Retain flag.
    pub retain: bool,
}

impl OutMessage {
    fn payload(&self) -> Vec<u8> {
        match &self.body {
            Body::Result(msg, event) => crate::payload::result_bytes(msg, event.as_ref(), SystemTime::now()),
            Body::Raw(bytes) => bytes.clone(),
        }
    }
}

/// A handler for messages on a subscribed filter: (topic, payload). It runs on
/// the connection task, so it must be quick and must not block: hand the
/// payload to a thread of your own for anything heavy.
pub type MessageHandler = Arc<dyn Fn(&str, &[u8]) + Send + Sync>;

/// Called after every ConnAck (once the status and subscriptions are sent).
/// Like a [`MessageHandler`] it runs on the connection task: quick, never blocking.
pub type ConnectHook = Arc<dyn Fn() + Send + Sync>;

struct Subscription {
    filter: String,
    qos: u8,
    handler: MessageHandler,
    /// Whether retained messages reach the handler (not for commands: a retained
    /// command would run again on every reconnect).
    retained: bool,
}

/// What the handle and the task share.
struct Shared {
    /// False once shutdown began: enqueue refuses.
    accepting: AtomicBool,
    /// Every registered subscription, re-sent on each ConnAck.
    subscriptions: Mutex<Vec<Subscription>>,
    /// Called on each ConnAck.
    connect_hooks: Mutex<Vec<ConnectHook>>,
    /// Store-and-forward queue for QoS 1/2 results.
    disk: Option<Arc<DiskQueue>>,
    /// Wakes the manager when a record was stored.
    stored: tokio::sync::Notify,
    /// Results that could not be stored on disk and went to memory instead.
    disk_failures: AtomicU64,
}

enum Command {
    Subscribe { filter: String, qos: u8 },
    Shutdown { deadline: Duration },
}

/// A cheap, cloneable handle to the connection, usable from any thread.
#[derive(Clone)]
pub struct MqttHandle {
    /// The connection's figures.
    pub metrics: Arc<MqttMetrics>,
    shared: Arc<Shared>,
    messages: mpsc::Sender<OutMessage>,
    commands: mpsc::UnboundedSender<Command>,
}

impl MqttHandle {
    /// Queues a message without blocking; false when it had to be dropped
    /// (shutting down, or the hand-over channel is full). When the buffer
    /// behind it is full, its oldest message is dropped later and counted.
    pub fn enqueue(&self, msg: OutMessage) -> bool {
        if !self.shared.accepting.load(Relaxed) {
            self.metrics.dropped.fetch_add(1, Relaxed);
            log::debug!("MQTT: shutting down, message for `{}` dropped", msg.topic);
            return false;
        }
        let msg = match self.store(msg) {
            Ok(stored) => return stored,
            Err(msg) => msg,
        };
        let why = match self.messages.try_send(msg) {
            Ok(()) => return true,
            Err(mpsc::error::TrySendError::Full(_)) => "publish hand-over full",
            Err(mpsc::error::TrySendError::Closed(_)) => "connection task gone",
        };
        let n = self.metrics.dropped.fetch_add(1, Relaxed) + 1;
        if n.is_power_of_two() {
            log::warn!("MQTT: {why}, message dropped ({n} dropped so far)");
        }
        false
    }

    /// Appends a QoS 1/2 result to the disk queue (Ok: whether it was stored);
    /// hands back any other message for the memory buffer.
    fn store(&self, msg: OutMessage) -> Result<bool, OutMessage> {
        let Some(disk) = &self.shared.disk else { return Err(msg) };
        if msg.qos == 0 || !matches!(msg.body, Body::Result(..)) || !valid_topic(&msg.topic) {
            return Err(msg);
        }
        let payload = msg.payload();
        if payload.len() + msg.topic.len() + 16 > MAX_PACKET_BYTES {
            self.metrics.dropped.fetch_add(1, Relaxed);
            log::warn!("MQTT: result for `{}` dropped: payload too large", msg.topic);
            return Ok(false);
        }
        let record = Record { topic: msg.topic, qos: msg.qos.min(2), retain: msg.retain, payload };
        match disk.append(&record) {
            Ok(_) => {
                self.shared.stored.notify_one();
                Ok(true)
            }
            Err(e) => {
                // A full card or a bad queue_dir must not cost results the broker could
                // still take: they go to the memory buffer, as without a disk queue.
                let n = self.shared.disk_failures.fetch_add(1, Relaxed) + 1;
                if n.is_power_of_two() {
                    log::warn!(
                        "MQTT: result for `{}` not stored on disk: {e}; kept in memory instead ({n} so far)",
                        record.topic
                    );
                }
                Err(OutMessage {
                    topic: record.topic,
                    body: Body::Raw(record.payload),
                    qos: record.qos,
                    retain: record.retain,
                })
            }
        }
    }

    /// Subscribes (now and after every reconnect); `handler` gets each message.
    /// An invalid filter is logged and ignored.
    pub fn subscribe(&self, filter: &str, qos: u8, handler: MessageHandler) {
        self.subscribe_with(filter, qos, handler, true);
    }

    /// Like `subscribe`, but retained messages are not handed to `handler`.
    pub fn subscribe_live(&self, filter: &str, qos: u8, handler: MessageHandler) {
        self.subscribe_with(filter, qos, handler, false);
    }

    fn subscribe_with(&self, filter: &str, qos: u8, handler: MessageHandler, retained: bool) {
        if !valid_filter(filter) {
            log::warn!("MQTT: invalid topic filter `{filter}`: not subscribed");
            return;
        }
        let qos = qos.min(2);
        if let Ok(mut subs) = self.shared.subscriptions.lock() {
            subs.push(Subscription { filter: filter.to_string(), qos, handler, retained });
        }
        // The task is gone only after shutdown; nothing to subscribe then.
        let _ = self.commands.send(Command::Subscribe { filter: filter.to_string(), qos });
    }

    /// Calls `hook` after every (re)connection, and once now if already connected
    /// (so a hook registered around the first ConnAck may run twice).
    pub fn on_connect(&self, hook: ConnectHook) {
        if let Ok(mut hooks) = self.shared.connect_hooks.lock() {
            hooks.push(hook.clone());
        }
        if self.metrics.connected.load(Relaxed) {
            hook();
        }
    }
}

/// The running connection task, to shut down cleanly.
pub struct MqttTask {
    commands: mpsc::UnboundedSender<Command>,
    manager: JoinHandle<()>,
    driver: JoinHandle<()>,
}

impl MqttTask {
    /// Publishes what is buffered until `deadline`, then the retained
    /// `offline` status, then disconnects. Returns within about
    /// `deadline` + 2 s even when the broker is gone.
    pub async fn shutdown(self, deadline: Duration) {
        let MqttTask { commands, mut manager, driver } = self;
        let _ = commands.send(Command::Shutdown { deadline });
        if timeout(deadline + SHUTDOWN_GRACE, &mut manager).await.is_err() {
            log::warn!("MQTT: connection did not close in time; abandoning it");
            manager.abort();
        }
        driver.abort();
        let _ = driver.await;
    }
}

/// Starts the connection task on the current tokio runtime.
pub fn start(settings: MqttSettings, metrics: Arc<MqttMetrics>) -> (MqttHandle, MqttTask) {
    let capacity = settings.buffer.max(1);
    metrics.queue_capacity.store(capacity as u64, Relaxed);
    let label = match &settings.tls {
        Some(_) => format!("mqtts://{}:{}", settings.host, settings.port),
        None => format!("{}:{}", settings.host, settings.port),
    };

    let (client, eventloop) = AsyncClient::new(client_options(&settings), REQUEST_CAPACITY);
    if let Some(disk) = &settings.disk_queue {
        let _ = metrics.disk_queue.set(disk.clone());
        let pending = disk.pending();
        if pending > 0 {
            log::info!("MQTT: {pending} results waiting in the disk queue from before; replaying them");
        }
    }
    let shared = Arc::new(Shared {
        accepting: AtomicBool::new(true),
        subscriptions: Mutex::new(Vec::new()),
        connect_hooks: Mutex::new(Vec::new()),
        disk: settings.disk_queue.clone(),
        stored: tokio::sync::Notify::new(),
        disk_failures: AtomicU64::new(0),
    });
    let (msg_tx, msg_rx) = mpsc::channel(capacity.clamp(16, 1024));
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let (link_tx, link_rx) = mpsc::channel(LINK_CAPACITY);

    let backoff = Backoff::new(settings.reconnect_min, settings.reconnect_max);
    let driver = tokio::spawn(drive(eventloop, link_tx, metrics.clone(), backoff, label));
    let manager = Manager {
        client,
        shared: shared.clone(),
        metrics: metrics.clone(),
        status_topic: settings.status_topic,
        capacity,
        buffer: VecDeque::new(),
        disk: settings.disk_queue,
        disk_cursor: 0,
        disk_ready: VecDeque::new(),
        sent: VecDeque::new(),
        collided: None,
        unacked: HashMap::new(),
        next_order: 0,
        connected: false,
        offline_acked: false,
        disconnect_sent: false,
        invalid_warned: 0,
        disk_attempts: HashMap::new(),
    };
    let manager = tokio::spawn(manager.run(msg_rx, cmd_rx, link_rx));
    let handle = MqttHandle { metrics, shared, messages: msg_tx, commands: cmd_tx.clone() };
    (handle, MqttTask { commands: cmd_tx, manager, driver })
}

fn client_options(settings: &MqttSettings) -> MqttOptions {
    let client_id = broker_safe_client_id(&settings.client_id);
    if client_id != settings.client_id {
        log::warn!(
            "MQTT: client id `{}` has characters some brokers reject (+ # $ /); using `{client_id}`",
            settings.client_id
        );
    }
    let mut opts = MqttOptions::new(client_id, settings.host.clone(), settings.port);
    // rumqttc refuses keep-alives below one second (zero disables them).
    let keep_alive = match settings.keep_alive {
        k if k.is_zero() => k,
        k => k.max(Duration::from_secs(1)),
    };
    opts.set_keep_alive(keep_alive)
        .set_clean_session(true)
        .set_inflight(CLIENT_INFLIGHT)
        .set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES)
        .set_last_will(LastWill::new(settings.status_topic.clone(), "offline", QoS::AtLeastOnce, true));
    match (&settings.username, &settings.password) {
        (Some(user), password) => {
            opts.set_credentials(user.clone(), password.clone().unwrap_or_default());
        }
        // MQTT 3.1.1 has no password without a user name.
        (None, Some(_)) => log::warn!("MQTT: a password is set but no username: connecting without credentials"),
        (None, None) => {}
    }
    if !valid_topic(&settings.status_topic) {
        log::error!("MQTT: status topic `{}` is not a valid topic name; brokers will refuse it", settings.status_topic);
    }
    // With TLS configured, every connection is TLS: there is no plaintext fallback.
    #[cfg(feature = "tls")]
    if let Some(tls) = &settings.tls {
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls.config.clone())));
    }
    opts
}

/// A connection error as the log and health show it, with what it means when it is a TLS failure.
fn describe(e: &ConnectionError, connecting: bool) -> String {
    #[cfg(feature = "tls")]
    let handshake = connecting && matches!(e, ConnectionError::Tls(_));
    #[cfg(not(feature = "tls"))]
    let handshake = connecting;
    match super::mqtt_tls::explain(e, handshake) {
        Some(hint) => format!("TLS error: {hint} ({e})"),
        None => e.to_string(),
    }
}

/// `+ # $ /` replaced: the embedded broker (rumqttd) silently refuses ids with them.
fn broker_safe_client_id(id: &str) -> String {
    id.chars().map(|c| if matches!(c, '+' | '#' | '$' | '/') { '_' } else { c }).collect()
}

fn to_qos(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// Jittered exponential backoff: each delay is the current step times a
/// random factor in [0.5, 1); the step doubles up to the maximum.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    /// A backoff between `min` and `max` (`min` at least 10 ms, `max` at least `min`).
    pub fn new(min: Duration, max: Duration) -> Self {
        let min = min.max(MIN_RECONNECT);
        let max = max.max(min);
        Backoff { min, max, step: min }
    }

    /// The next delay to wait.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(self.max);
        step.mul_f64(0.5 + 0.5 * fastrand::f64())
    }

    /// Back to the shortest delay (after a successful connection).
    pub fn reset(&mut self) {
        self.step = self.min;
    }
}

/// What the driver tells the manager.
enum Link {
    /// ConnAck: the connection is up.
    Connected,
    /// An event of the current connection.
    Event(MqttEvent),
    /// The connection is gone. The manager answers once it stopped handing
    /// requests to the client, so none can reach the next connection.
    Lost(oneshot::Sender<()>),
}

/// Polls the event loop for ever (until the DISCONNECT is written or the
/// manager is gone), sleeping the backoff after each failure.
async fn drive(
    mut eventloop: EventLoop,
    links: mpsc::Sender<Link>,
    metrics: Arc<MqttMetrics>,
    mut backoff: Backoff,
    label: String,
) {
    let mut ever_connected = false;
    let mut failures: u64 = 0;
    loop {
        let connecting = eventloop.network.is_none();
        if connecting {
            metrics.connection_attempts.fetch_add(1, Relaxed);
        }
        match eventloop.poll().await {
            Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                if ever_connected {
                    metrics.reconnects.fetch_add(1, Relaxed);
                    log::info!("MQTT: reconnected to {label}");
                } else if failures > 0 {
                    log::info!("MQTT: connected to {label} after {} attempts", failures + 1);
                } else {
                    log::info!("MQTT: connected to {label}");
                }
                ever_connected = true;
                failures = 0;
                backoff.reset();
                if let Ok(mut last) = metrics.last_error.lock() {
                    *last = None;
                }
                if links.send(Link::Connected).await.is_err() {
                    return;
                }
            }
            Ok(event) => {
                let done = matches!(event, MqttEvent::Outgoing(Outgoing::Disconnect));
                if wanted(&event) && links.send(Link::Event(event)).await.is_err() {
                    return;
                }
                if done {
                    return;
                }
            }
            Err(e) => {
                failures += 1;
                let why = describe(&e, connecting);
                if let Ok(mut last) = metrics.last_error.lock() {
                    *last = Some(why.clone());
                }
                // A TLS failure is a setup problem (wrong CA, refused certificate): say it loudly.
                let tls_failure = why.starts_with("TLS error");
                if !connecting {
                    log::warn!("MQTT: connection to {label} lost: {why}; reconnecting");
                    // Messages received before the error are real; the rest
                    // (acks, writes) belongs to the dead connection.
                    let stale: Vec<MqttEvent> = eventloop.state.events.drain(..).collect();
                    for event in stale {
                        if matches!(event, MqttEvent::Incoming(Packet::Publish(_)))
                            && links.send(Link::Event(event)).await.is_err()
                        {
                            return;
                        }
                    }
                    let (ack_tx, ack_rx) = oneshot::channel();
                    if links.send(Link::Lost(ack_tx)).await.is_err() {
                        return;
                    }
                    let _ = ack_rx.await;
                    // The session is clean: drop every request rumqttc kept for
                    // it; the manager re-sends what was not confirmed.
                    eventloop.clean();
                    eventloop.pending.clear();
                    eventloop.state = MqttState::new(CLIENT_INFLIGHT, false);
                } else if (failures == 1 || failures.is_power_of_two()) && tls_failure {
                    log::error!("MQTT: cannot connect to {label}: {why}; retrying with backoff (attempt {failures})");
                } else if failures == 1 || failures.is_power_of_two() {
                    log::warn!("MQTT: cannot connect to {label}: {why}; retrying with backoff (attempt {failures})");
                } else {
                    log::debug!("MQTT: cannot connect to {label}: {why}");
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

/// Events the manager acts on.
fn wanted(event: &MqttEvent) -> bool {
    matches!(
        event,
        MqttEvent::Incoming(Packet::Publish(_))
            | MqttEvent::Incoming(Packet::PubAck(_))
            | MqttEvent::Incoming(Packet::PubComp(_))
            | MqttEvent::Incoming(Packet::SubAck(_))
            | MqttEvent::Outgoing(Outgoing::Publish(_))
            | MqttEvent::Outgoing(Outgoing::AwaitAck(_))
            | MqttEvent::Outgoing(Outgoing::Disconnect)
    )
}

/// A buffered message and how many connection losses it went through in flight.
struct Queued {
    msg: OutMessage,
    attempts: u8,
}

/// A publish handed to the client and not yet confirmed.
struct Handed {
    /// The message (None: the online/offline status, or a disk record).
    item: Option<Queued>,
    /// The disk queue record it is (acknowledged there once confirmed).
    disk_id: Option<u64>,
    /// The offline status (shutdown waits for it).
    offline: bool,
    /// QoS it was sent with.
    qos: u8,
    /// Hand-over order, to re-buffer in the original order.
    order: u64,
}

struct Manager {
    client: AsyncClient,
    shared: Arc<Shared>,
    metrics: Arc<MqttMetrics>,
    status_topic: String,
    capacity: usize,
    /// Waiting to be handed to the client.
    buffer: VecDeque<Queued>,
    /// Store-and-forward queue for QoS 1/2 results.
    disk: Option<Arc<DiskQueue>>,
    /// The last disk record handed on this connection (0: none yet).
    disk_cursor: u64,
    /// Disk records read and not yet handed.
    disk_ready: VecDeque<Stored>,
    /// Handed, not yet written (rumqttc reports writes in hand-over order).
    sent: VecDeque<Handed>,
    /// Handed, waiting for a free packet id (the broker acked out of order).
    collided: Option<Handed>,
    /// Written with QoS 1/2, waiting for PUBACK/PUBCOMP, by packet id.
    unacked: HashMap<u16, Handed>,
    next_order: u64,
    connected: bool,
    offline_acked: bool,
    disconnect_sent: bool,
    invalid_warned: u64,
    /// Connection losses each disk record was in flight for: a record the broker
    /// keeps disconnecting on is given up after MAX_SEND_ATTEMPTS, not resent forever.
    disk_attempts: HashMap<u64, u8>,
}

impl Manager {
    async fn run(
        mut self,
        mut messages: mpsc::Receiver<OutMessage>,
        mut commands: mpsc::UnboundedReceiver<Command>,
        mut links: mpsc::Receiver<Link>,
    ) {
        let mut messages_open = true;
        let mut commands_open = true;
        let mut links_open = true;
        let mut deadline: Option<Instant> = None;
        let shared = self.shared.clone();
        let has_disk = self.disk.is_some();
        let mut maintenance = tokio::time::interval(Duration::from_millis(100));
        maintenance.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.pump();
            self.update_depth();
            if let Some(d) = deadline {
                if self.buffer.is_empty() && self.in_flight() == 0 && self.disk_pending() == 0 {
                    break;
                }
                if Instant::now() >= d || !links_open {
                    break;
                }
            }
            tokio::select! {
                link = links.recv(), if links_open => match link {
                    Some(link) => self.on_link(link),
                    None => {
                        links_open = false;
                        self.connection_lost();
                        if deadline.is_none() {
                            log::error!("MQTT: the connection task ended unexpectedly; nothing more will be published");
                        }
                    }
                },
                msg = messages.recv(), if messages_open => match msg {
                    Some(msg) => self.push(msg),
                    None => messages_open = false,
                },
                cmd = commands.recv(), if commands_open => match cmd {
                    Some(Command::Subscribe { filter, qos }) => {
                        if self.connected {
                            if let Err(e) = self.client.try_subscribe(filter.clone(), to_qos(qos)) {
                                log::warn!("MQTT: subscribing to `{filter}` failed: {e}; retried on reconnect");
                            }
                        }
                    }
                    Some(Command::Shutdown { deadline: d }) => {
                        self.shared.accepting.store(false, Relaxed);
                        while let Ok(msg) = messages.try_recv() {
                            self.push(msg);
                        }
                        let waiting = self.buffer.len() + self.in_flight();
                        if waiting > 0 {
                            log::info!("MQTT: flushing {waiting} messages (up to {} ms)", d.as_millis());
                        }
                        deadline = Some(Instant::now() + d);
                    }
                    None => {
                        // Every handle and the task are gone: nobody can use the connection.
                        commands_open = false;
                        deadline.get_or_insert_with(Instant::now);
                    }
                },
                _ = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {}
                _ = shared.stored.notified(), if has_disk => {}
                _ = maintenance.tick(), if has_disk => {
                    if let Some(disk) = &self.disk {
                        disk.maintain();
                    }
                }
            }
        }
        self.finish(&mut messages, &mut links, links_open).await;
    }

    /// Publishes the offline status, disconnects, and counts what is left.
    async fn finish(
        &mut self,
        messages: &mut mpsc::Receiver<OutMessage>,
        links: &mut mpsc::Receiver<Link>,
        open: bool,
    ) {
        self.shared.accepting.store(false, Relaxed);
        let was_connected = self.connected;
        if self.connected && open {
            let offline = Handed { item: None, disk_id: None, offline: true, qos: 1, order: self.order() };
            if self.client.try_publish(self.status_topic.clone(), QoS::AtLeastOnce, true, "offline").is_ok() {
                self.sent.push_back(offline);
                let until = Instant::now() + OFFLINE_ACK_TIMEOUT;
                while self.connected && !self.offline_acked {
                    match timeout(until.saturating_duration_since(Instant::now()), links.recv()).await {
                        Ok(Some(link)) => self.on_link(link),
                        _ => break,
                    }
                }
                if !self.offline_acked {
                    log::warn!("MQTT: the broker did not acknowledge the offline status in time");
                }
            }
            if self.connected && self.client.try_disconnect().is_ok() {
                let until = Instant::now() + DISCONNECT_TIMEOUT;
                while !self.disconnect_sent {
                    match timeout(until.saturating_duration_since(Instant::now()), links.recv()).await {
                        Ok(Some(link)) => self.on_link(link),
                        _ => break,
                    }
                }
            }
        }
        while let Ok(msg) = messages.try_recv() {
            self.push(msg);
        }
        let unsent = self.buffer.len() + self.in_flight();
        if unsent > 0 {
            self.metrics.dropped.fetch_add(unsent as u64, Relaxed);
            log::warn!("MQTT: {unsent} messages not published before the shutdown deadline");
        }
        self.buffer.clear();
        if let Some(disk) = &self.disk {
            disk.close();
            let left = disk.pending();
            if left > 0 {
                log::info!("MQTT: {left} results stay in the disk queue for the next start");
            }
        }
        self.metrics.queue_depth.store(0, Relaxed);
        self.metrics.connected.store(false, Relaxed);
        if was_connected {
            log::info!("MQTT: disconnected");
        }
    }

    fn order(&mut self) -> u64 {
        self.next_order += 1;
        self.next_order
    }

    /// Data messages handed and not confirmed.
    fn in_flight(&self) -> usize {
        let data = |h: &Handed| h.item.is_some() as usize;
        self.sent.iter().map(data).sum::<usize>()
            + self.collided.as_ref().map(data).unwrap_or(0)
            + self.unacked.values().map(data).sum::<usize>()
    }

    /// Disk records not yet acknowledged (handed or not).
    fn disk_pending(&self) -> u64 {
        self.disk.as_ref().map(|d| d.pending()).unwrap_or(0)
    }

    fn handed(&self) -> usize {
        self.sent.len() + self.collided.is_some() as usize + self.unacked.len()
    }

    fn update_depth(&self) {
        self.metrics.queue_depth.store((self.buffer.len() + self.in_flight()) as u64, Relaxed);
    }

    /// Buffers a message, dropping the oldest when full.
    fn push(&mut self, msg: OutMessage) {
        if !valid_topic(&msg.topic) {
            self.drop_invalid(&msg.topic, "not a valid topic name");
            return;
        }
        self.buffer.push_back(Queued { msg, attempts: 0 });
        self.trim();
    }

    fn trim(&mut self) {
        while self.buffer.len() > self.capacity {
            self.buffer.pop_front();
            let n = self.metrics.dropped.fetch_add(1, Relaxed) + 1;
            if n.is_power_of_two() {
                log::warn!(
                    "MQTT: publish buffer full ({} messages), oldest dropped ({n} dropped so far)",
                    self.capacity
                );
            }
        }
    }

    fn drop_invalid(&mut self, topic: &str, why: &str) {
        self.metrics.dropped.fetch_add(1, Relaxed);
        self.invalid_warned += 1;
        if self.invalid_warned.is_power_of_two() {
            log::warn!("MQTT: message for `{topic}` dropped: {why} ({} such so far)", self.invalid_warned);
        }
    }

    /// Hands buffered messages to the client while connected and the window has room.
    fn pump(&mut self) {
        self.pump_disk();
        while self.connected && self.handed() < WINDOW {
            let Some(queued) = self.buffer.pop_front() else { break };
            let payload = queued.msg.payload();
            if payload.len() + queued.msg.topic.len() + 16 > MAX_PACKET_BYTES {
                self.drop_invalid(&queued.msg.topic, "payload too large");
                continue;
            }
            let q = queued.msg.qos.min(2);
            let retain = queued.msg.retain;
            match self.client.try_publish(queued.msg.topic.clone(), to_qos(q), retain, payload) {
                Ok(()) => {
                    let order = self.order();
                    self.sent.push_back(Handed { item: Some(queued), disk_id: None, offline: false, qos: q, order });
                }
                Err(_) => {
                    // The topic is valid, so the request channel is full: later.
                    self.buffer.push_front(queued);
                    break;
                }
            }
        }
    }

    /// Hands disk records in order, first refilling from the queue.
    fn pump_disk(&mut self) {
        let Some(disk) = self.disk.clone() else { return };
        // While memory messages wait (health, discovery, command replies, QoS 0
        // results), a long disk backlog leaves them a quarter of the window.
        let limit = if self.buffer.is_empty() { WINDOW } else { WINDOW - WINDOW / 4 };
        while self.connected && self.handed() < limit {
            if self.disk_ready.is_empty() {
                self.disk_ready.extend(disk.read_after(self.disk_cursor, WINDOW));
            }
            let Some(stored) = self.disk_ready.pop_front() else { break };
            let r = &stored.record;
            match self.client.try_publish(r.topic.clone(), to_qos(r.qos), r.retain, r.payload.clone()) {
                Ok(()) => {
                    self.disk_cursor = stored.id;
                    let order = self.order();
                    let qos = r.qos.min(2);
                    self.sent.push_back(Handed { item: None, disk_id: Some(stored.id), offline: false, qos, order });
                }
                Err(_) => {
                    self.disk_ready.push_front(stored);
                    break;
                }
            }
        }
    }

    fn on_link(&mut self, link: Link) {
        match link {
            Link::Connected => self.connected(),
            Link::Lost(ack) => {
                self.connection_lost();
                let _ = ack.send(());
            }
            Link::Event(event) => self.on_event(event),
        }
    }

    fn connected(&mut self) {
        self.connected = true;
        self.metrics.connected.store(true, Relaxed);
        let status = Handed { item: None, disk_id: None, offline: false, qos: 1, order: self.order() };
        match self.client.try_publish(self.status_topic.clone(), QoS::AtLeastOnce, true, "online") {
            Ok(()) => self.sent.push_back(status),
            Err(e) => log::warn!("MQTT: publishing the online status failed: {e}"),
        }
        let filters = self.subscription_filters();
        if !filters.is_empty() {
            let n = filters.len();
            if let Err(e) = self.client.try_subscribe_many(filters) {
                log::warn!("MQTT: subscribing to {n} filters failed: {e}; retried on reconnect");
            }
        }
        let hooks: Vec<ConnectHook> = self.shared.connect_hooks.lock().map(|h| h.clone()).unwrap_or_default();
        for hook in hooks {
            if std::panic::catch_unwind(AssertUnwindSafe(|| hook())).is_err() {
                log::error!("MQTT: a connect hook panicked");
            }
        }
    }

    /// Every registered filter once, with the highest QoS asked for it.
    fn subscription_filters(&self) -> Vec<SubscribeFilter> {
        let mut by_filter: Vec<(String, u8)> = Vec::new();
        if let Ok(subs) = self.shared.subscriptions.lock() {
            for s in subs.iter() {
                match by_filter.iter_mut().find(|(f, _)| *f == s.filter) {
                    Some((_, q)) => *q = (*q).max(s.qos),
                    None => by_filter.push((s.filter.clone(), s.qos)),
                }
            }
        }
        by_filter.into_iter().map(|(path, q)| SubscribeFilter::new(path, to_qos(q))).collect()
    }

    /// Everything not confirmed goes back to the front of the buffer, in order.
    fn connection_lost(&mut self) {
        self.connected = false;
        self.metrics.connected.store(false, Relaxed);
        let mut back: Vec<Handed> = self.sent.drain(..).collect();
        back.extend(self.collided.take());
        back.extend(self.unacked.drain().map(|(_, h)| h));
        back.sort_by_key(|h| h.order);
        // Disk records stay in the queue until acknowledged: read them again from the oldest.
        self.disk_cursor = 0;
        self.disk_ready.clear();
        for handed in back.into_iter().rev() {
            if let (Some(id), Some(disk)) = (handed.disk_id, &self.disk) {
                let attempts = self.disk_attempts.entry(id).or_insert(0);
                *attempts += 1;
                if *attempts >= MAX_SEND_ATTEMPTS {
                    self.disk_attempts.remove(&id);
                    // Marked done so the records behind it can go; counted and logged as dropped.
                    disk.ack(id);
                    self.drop_invalid("(disk queue)", "stored result in flight during too many connection losses");
                }
                continue;
            }
            let Some(mut queued) = handed.item else { continue };
            queued.attempts += 1;
            if queued.attempts >= MAX_SEND_ATTEMPTS {
                let topic = queued.msg.topic.clone();
                self.drop_invalid(&topic, "in flight during too many connection losses");
                continue;
            }
            self.buffer.push_front(queued);
        }
        self.trim();
    }

    fn on_event(&mut self, event: MqttEvent) {
        match event {
            MqttEvent::Incoming(Packet::Publish(p)) => self.dispatch(&p.topic, &p.payload, p.retain),
            MqttEvent::Outgoing(Outgoing::Publish(pkid)) => {
                let Some(handed) = self.collided.take().or_else(|| self.sent.pop_front()) else {
                    log::debug!("MQTT: write of a publish nobody handed (pkid {pkid})");
                    return;
                };
                if pkid == 0 || handed.qos == 0 {
                    self.confirm(handed);
                } else {
                    self.unacked.insert(pkid, handed);
                }
            }
            MqttEvent::Outgoing(Outgoing::AwaitAck(_)) => self.collided = self.sent.pop_front(),
            MqttEvent::Incoming(Packet::PubAck(ack)) => {
                if let Some(handed) = self.unacked.remove(&ack.pkid) {
                    self.confirm(handed);
                }
            }
            MqttEvent::Incoming(Packet::PubComp(comp)) => {
                if let Some(handed) = self.unacked.remove(&comp.pkid) {
                    self.confirm(handed);
                }
            }
            MqttEvent::Incoming(Packet::SubAck(ack)) => {
                let refused = ack.return_codes.iter().filter(|c| matches!(c, SubscribeReasonCode::Failure)).count();
                if refused > 0 {
                    log::warn!("MQTT: the broker refused {refused} subscription(s)");
                }
            }
            MqttEvent::Outgoing(Outgoing::Disconnect) => self.disconnect_sent = true,
            _ => {}
        }
    }

    fn confirm(&mut self, handed: Handed) {
        if handed.item.is_some() {
            self.metrics.published.fetch_add(1, Relaxed);
        }
        if let (Some(id), Some(disk)) = (handed.disk_id, &self.disk) {
            disk.ack(id);
            self.disk_attempts.remove(&id);
            self.metrics.published.fetch_add(1, Relaxed);
        }
        if handed.offline {
            self.offline_acked = true;
        }
    }

    /// Calls every handler whose filter matches; a panicking handler is logged, not fatal.
    fn dispatch(&self, topic: &str, payload: &[u8], retain: bool) {
        self.metrics.received.fetch_add(1, Relaxed);
        let handlers: Vec<MessageHandler> = match self.shared.subscriptions.lock() {
            Ok(subs) => subs
                .iter()
                .filter(|s| (s.retained || !retain) && topic_matches(&s.filter, topic))
                .map(|s| s.handler.clone())
                .collect(),
            Err(_) => return,
        };
        for handler in handlers {
            if std::panic::catch_unwind(AssertUnwindSafe(|| handler(topic, payload))).is_err() {
                log::error!("MQTT: the handler for a message on `{topic}` panicked");
            }
        }
    }
}

/// True when `topic` matches the subscription `filter` (`+` one level, `#`
/// the rest, including the parent level itself). Wildcards at the first level
/// do not match topics starting with `$` (MQTT 3.1.1, 4.7.2).
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// A topic name one can publish to: not empty, no wildcards, no NUL.
pub fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#', '\0'])
}

/// A subscription filter: not empty, `+` alone in its level, `#` alone and last.
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    let last = levels.len() - 1;
    levels.iter().enumerate().all(|(i, level)| match *level {
        "#" => i == last,
        "+" => true,
        l => !l.contains(['+', '#']),
    })
}

/// An MQTT output of a pipeline.
pub struct MqttSink {
    /// The connection.
    pub hub: MqttHandle,
    /// Topic template.
    pub topic: String,
    /// QoS.
    pub qos: u8,
    /// Retain.
    pub retain: bool,
}

impl super::Sink for MqttSink {
    fn offer(&self, msg: &Arc<ResultMsg>, event: Option<&Event>) -> bool {
        let topic = crate::payload::render_topic(&self.topic, msg);
        self.hub.enqueue(OutMessage {
            topic,
            body: Body::Result(msg.clone(), event.cloned()),
            qos: self.qos,
            retain: self.retain,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plus_matches_exactly_one_level() {
        assert!(topic_matches("a/+/c", "a/b/c"));
        assert!(topic_matches("a/+/c", "a//c"));
        assert!(!topic_matches("a/+/c", "a/b/x/c"));
        assert!(!topic_matches("a/+", "a"));
        assert!(topic_matches("+/+", "/finance"));
        assert!(topic_matches("+", "x"));
        assert!(!topic_matches("+", "x/y"));
    }

    #[test]
    fn hash_matches_the_rest_and_the_parent() {
        assert!(topic_matches("a/#", "a/b/c"));
        assert!(topic_matches("a/#", "a/b"));
        assert!(topic_matches("a/#", "a"));
        assert!(!topic_matches("a/#", "b/a"));
        assert!(topic_matches("#", "anything/at/all"));
        assert!(topic_matches("a/+/#", "a/b/c/d"));
    }

    #[test]
    fn literal_filters_match_only_themselves() {
        assert!(topic_matches("a/b", "a/b"));
        assert!(!topic_matches("a/b", "a/b/c"));
        assert!(!topic_matches("a/b/c", "a/b"));
        assert!(!topic_matches("a/b", "a/B"));
    }

    #[test]
    fn wildcards_do_not_match_dollar_topics() {
        assert!(!topic_matches("#", "$SYS/uptime"));
        assert!(!topic_matches("+/uptime", "$SYS/uptime"));
        assert!(topic_matches("$SYS/#", "$SYS/uptime"));
    }

    #[test]
    fn filters_and_topics_are_validated() {
        for ok in ["a", "a/b", "a/+/c", "#", "a/#", "+", "+/+", "/a"] {
            assert!(valid_filter(ok), "{ok}");
        }
        for bad in ["", "a/#/c", "a#", "a/b+", "#/a", "a\0"] {
            assert!(!valid_filter(bad), "{bad:?}");
        }
        assert!(valid_topic("edgeinfer/pi/cam/result"));
        assert!(!valid_topic(""));
        assert!(!valid_topic("a/+"));
        assert!(!valid_topic("a/#"));
    }

    #[test]
    fn backoff_grows_with_jitter_up_to_the_maximum_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let mut step = Duration::from_millis(100);
        for _ in 0..10 {
            let d = b.next_delay();
            assert!(d >= step / 2 && d < step, "{d:?} not in [{:?}, {step:?})", step / 2);
            step = (step * 2).min(Duration::from_millis(1000));
        }
        b.reset();
        assert!(b.next_delay() < Duration::from_millis(100));
    }

    #[test]
    fn backoff_is_never_zero() {
        let mut b = Backoff::new(Duration::ZERO, Duration::ZERO);
        assert!(b.next_delay() >= MIN_RECONNECT / 2);
    }

    #[test]
    fn client_ids_are_made_safe_for_every_broker() {
        assert_eq!(broker_safe_client_id("edgeinfer-pi"), "edgeinfer-pi");
        assert_eq!(broker_safe_client_id("a/b+c#$"), "a_b_c__");
    }

    #[test]
    fn settings_debug_hides_the_password() {
        let s = MqttSettings {
            host: "h".into(),
            port: 1,
            client_id: "c".into(),
            keep_alive: Duration::from_secs(5),
            username: Some("u".into()),
            password: Some("hunter2".into()),
            buffer: 1,
            reconnect_min: Duration::from_millis(1),
            reconnect_max: Duration::from_millis(2),
            status_topic: "s".into(),
            tls: None,
            disk_queue: None,
        };
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
