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

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, timeout, Instant};

use super::disk_queue::{DiskQueue, Record, Stored};
use super::mqtt_proto::{Client, Ev, Loop, PollError};
pub use super::mqtt_proto::{Incoming, Protocol, PublishMeta};
use crate::message::{Event, ResultMsg};
use crate::metrics::MqttMetrics;

pub use crate::mqtt::{valid_filter, valid_topic, MAX_PACKET_BYTES};

/// Publishes handed to the client and not yet confirmed, at most. Below the
/// client's in-flight limit so QoS 1/2 packet ids never collide. An MQTT 5
/// broker with a smaller Receive Maximum makes it smaller.
const WINDOW: usize = 64;
/// QoS 2 publishes in flight (not yet PUBCOMP), at most. A broker holds each until its
/// PUBREL and limits how many it holds per client (mosquitto: `max_inflight_messages`,
/// 20 by default); beyond it mosquitto answers with "quota exceeded", which an MQTT 3.1.1
/// client cannot see, and drops the message. An MQTT 5 broker states its limit (Receive
/// Maximum), and the window follows it.
const QOS2_WINDOW: usize = 16;
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
    /// MQTT 3.1.1 or 5.
    pub protocol: Protocol,
    /// MQTT 5: results not delivered within this long are dropped by the broker (and by us).
    pub message_expiry: Option<Duration>,
    /// MQTT 5: user properties on every publish.
    pub user_properties: Vec<(String, String)>,
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
            .field("protocol", &self.protocol)
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
    /// A result rendered already (it could not be stored on disk and went to memory).
    Rendered(Vec<u8>),
}

/// Content type of results, health, discovery and replies.
pub const JSON: &str = "application/json";

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
    /// MQTT 5 properties (content type, correlation data); results get theirs when published.
    pub meta: PublishMeta,
}

impl OutMessage {
    /// A message of ready bytes with a content type.
    pub fn raw(topic: String, bytes: Vec<u8>, qos: u8, retain: bool, content_type: &'static str) -> OutMessage {
        OutMessage {
            topic,
            body: Body::Raw(bytes),
            qos,
            retain,
            meta: PublishMeta { content_type: Some(content_type), ..PublishMeta::default() },
        }
    }

    fn payload(&self) -> Vec<u8> {
        match &self.body {
            Body::Result(msg, event) => crate::payload::result_bytes(msg, event.as_ref(), SystemTime::now()),
            Body::Raw(bytes) | Body::Rendered(bytes) => bytes.clone(),
        }
    }

    /// A result (MQTT 5 message expiry applies to it).
    fn is_result(&self) -> bool {
        matches!(self.body, Body::Result(..) | Body::Rendered(_))
    }
}

/// A handler for messages on a subscribed filter. It runs on the connection
/// task, so it must be quick and must not block: hand the payload to a thread
/// of your own for anything heavy.
pub type MessageHandler = Arc<dyn Fn(&Incoming) + Send + Sync>;

/// Called after every ConnAck (once the status and subscriptions are sent).
/// Like a [`MessageHandler`] it runs on the connection task: quick, never blocking.
pub type ConnectHook = Arc<dyn Fn() + Send + Sync>;

struct Subscription {
    /// Which `subscribe_with` call made it (a one-shot fetch removes only its own).
    id: u64,
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
    /// The id the next subscription gets.
    next_subscription: AtomicU64,
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
    Unsubscribe { filter: String },
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
            Err(msg) => *msg,
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
    fn store(&self, msg: OutMessage) -> Result<bool, Box<OutMessage>> {
        let Some(disk) = &self.shared.disk else { return Err(Box::new(msg)) };
        if msg.qos == 0 || !matches!(msg.body, Body::Result(..)) || !valid_topic(&msg.topic) {
            return Err(Box::new(msg));
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
                Err(Box::new(OutMessage {
                    topic: record.topic,
                    body: Body::Rendered(record.payload),
                    qos: record.qos,
                    retain: record.retain,
                    meta: PublishMeta { content_type: Some(JSON), ..PublishMeta::default() },
                }))
            }
        }
    }

    /// Subscribes (now and after every reconnect); `handler` gets each message.
    /// An invalid filter is logged and ignored.
    pub fn subscribe(&self, filter: &str, qos: u8, handler: MessageHandler) {
        let _ = self.subscribe_with(filter, qos, handler, true);
    }

    /// Like `subscribe`, but retained messages are not handed to `handler`.
    pub fn subscribe_live(&self, filter: &str, qos: u8, handler: MessageHandler) {
        let _ = self.subscribe_with(filter, qos, handler, false);
    }

    fn subscribe_with(&self, filter: &str, qos: u8, handler: MessageHandler, retained: bool) -> Option<u64> {
        if !valid_filter(filter) {
            log::warn!("MQTT: invalid topic filter `{filter}`: not subscribed");
            return None;
        }
        let qos = qos.min(2);
        let id = self.shared.next_subscription.fetch_add(1, Relaxed);
        if let Ok(mut subs) = self.shared.subscriptions.lock() {
            subs.push(Subscription { id, filter: filter.to_string(), qos, handler, retained });
        }
        // The task is gone only after shutdown; nothing to subscribe then.
        let _ = self.commands.send(Command::Subscribe { filter: filter.to_string(), qos });
        Some(id)
    }

    /// Removes subscription `id`; the broker is told only when no other one uses its filter.
    fn unsubscribe(&self, id: u64) {
        let Ok(mut subs) = self.shared.subscriptions.lock() else { return };
        let Some(ix) = subs.iter().position(|s| s.id == id) else { return };
        let filter = subs.remove(ix).filter;
        if !subs.iter().any(|s| s.filter == filter) {
            let _ = self.commands.send(Command::Unsubscribe { filter });
        }
    }

    /// The retained message on `topic` (a model or its signature published once with `-r`),
    /// waiting up to `timeout` for it; then the subscription is dropped again. Blocks:
    /// call it from a thread of your own, never from a handler.
    pub fn fetch_retained(&self, topic: &str, timeout: Duration) -> Result<bytes::Bytes, String> {
        if !valid_topic(topic) {
            return Err(format!("`{topic}` is not a topic name (no wildcards)"));
        }
        let (tx, rx) = std::sync::mpsc::sync_channel::<bytes::Bytes>(1);
        let want = topic.to_string();
        let handler: MessageHandler = Arc::new(move |m: &Incoming| {
            if m.topic == want {
                let _ = tx.try_send(m.payload.clone());
            }
        });
        let id =
            self.subscribe_with(topic, 1, handler, true).ok_or_else(|| format!("cannot subscribe to `{topic}`"))?;
        let got = rx.recv_timeout(timeout);
        self.unsubscribe(id);
        match got {
            Ok(payload) if payload.is_empty() => Err(format!("`{topic}`: the retained message is empty")),
            Ok(payload) => Ok(payload),
            Err(_) => Err(format!(
                "no retained message on `{topic}` within {} s (publish it with -r, and check the broker's message size limit)",
                timeout.as_secs()
            )),
        }
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
    let label = match settings.protocol {
        Protocol::V311 => label,
        Protocol::V5 => format!("{label} (MQTT 5)"),
    };

    let (client, eventloop) = client_options(&settings);
    if let Some(disk) = &settings.disk_queue {
        let _ = metrics.disk_queue.set(disk.clone() as Arc<dyn crate::metrics::HealthSection>);
        let pending = disk.pending();
        if pending > 0 {
            log::info!("MQTT: {pending} results waiting in the disk queue from before; replaying them");
        }
    }
    let shared = Arc::new(Shared {
        accepting: AtomicBool::new(true),
        subscriptions: Mutex::new(Vec::new()),
        next_subscription: AtomicU64::new(0),
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
        released: HashMap::new(),
        window: WINDOW,
        last_pkid: 0,
        pkid_max: super::mqtt_proto::CLIENT_INFLIGHT,
        expected_pkids: VecDeque::new(),
        pkid_drift_warned: false,
        message_expiry: settings.message_expiry.filter(|_| settings.protocol == Protocol::V5),
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

/// The client and event loop for `settings`, after the checks that only warn.
fn client_options(settings: &MqttSettings) -> (Client, Loop) {
    let client_id = broker_safe_client_id(&settings.client_id);
    if client_id != settings.client_id {
        log::warn!(
            "MQTT: client id `{}` has characters some brokers reject (+ # $ /); using `{client_id}`",
            settings.client_id
        );
    }
    // rumqttc refuses keep-alives below one second (zero disables them).
    let keep_alive = match settings.keep_alive {
        k if k.is_zero() => k,
        k => k.max(Duration::from_secs(1)),
    };
    if !valid_topic(&settings.status_topic) {
        log::error!("MQTT: status topic `{}` is not a valid topic name; brokers will refuse it", settings.status_topic);
    }
    super::mqtt_proto::connect(settings, client_id, keep_alive, REQUEST_CAPACITY)
}

/// A connection error as the log and health show it, with what it means when it is a TLS failure.
fn describe(e: &PollError, connecting: bool) -> String {
    let handshake = connecting && e.tls;
    match super::mqtt_tls::explain(e.error.as_ref(), handshake) {
        Some(hint) => format!("TLS error: {hint} ({})", e.error),
        None => e.error.to_string(),
    }
}

/// `+ # $ /` replaced: the embedded broker (rumqttd) silently refuses ids with them.
fn broker_safe_client_id(id: &str) -> String {
    id.chars().map(|c| if matches!(c, '+' | '#' | '$' | '/') { '_' } else { c }).collect()
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
    /// ConnAck: the connection is up; an MQTT 5 broker's Receive Maximum.
    Connected(Option<u16>),
    /// An event of the current connection.
    Event(Ev),
    /// The connection is gone. The manager answers once it stopped handing
    /// requests to the client, so none can reach the next connection.
    Lost(oneshot::Sender<()>),
}

/// Polls the event loop for ever (until the DISCONNECT is written or the
/// manager is gone), sleeping the backoff after each failure.
async fn drive(
    mut eventloop: Loop,
    links: mpsc::Sender<Link>,
    metrics: Arc<MqttMetrics>,
    mut backoff: Backoff,
    label: String,
) {
    let mut ever_connected = false;
    let mut failures: u64 = 0;
    loop {
        let connecting = eventloop.connecting();
        if connecting {
            metrics.connection_attempts.fetch_add(1, Relaxed);
        }
        match eventloop.poll().await {
            Ok(Some(Ev::ConnAck { receive_max })) => {
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
                if links.send(Link::Connected(receive_max)).await.is_err() {
                    return;
                }
            }
            Ok(Some(event)) => {
                let done = matches!(event, Ev::OutDisconnect);
                if links.send(Link::Event(event)).await.is_err() {
                    return;
                }
                if done {
                    return;
                }
            }
            Ok(None) => {}
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
                    for message in eventloop.stale_publishes() {
                        if links.send(Link::Event(Ev::Publish(message))).await.is_err() {
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
                    eventloop.reset();
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

/// A buffered message and how many connection losses it went through in flight.
struct Queued {
    msg: OutMessage,
    attempts: u8,
    /// When it was accepted (MQTT 5 message expiry counts from here).
    at: SystemTime,
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
    client: Client,
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
    /// Written with QoS 1/2, waiting for PUBACK (QoS 1) or PUBREC (QoS 2), by packet id.
    unacked: HashMap<u16, Handed>,
    /// QoS 2 received by the broker (PUBREC), waiting for PUBCOMP, by packet id. Kept
    /// apart from `unacked`: rumqttc frees the packet id at PUBREC, so a new publish
    /// can take the same id before this one's PUBCOMP arrives.
    released: HashMap<u16, Handed>,
    /// Publishes handed and not confirmed, at most (WINDOW, or less for an MQTT 5
    /// broker with a smaller Receive Maximum).
    window: usize,
    /// MQTT 5 message expiry of results (None on MQTT 3.1.1).
    message_expiry: Option<Duration>,
    /// The packet id rumqttc gave the last QoS 1/2 publish or subscribe of this connection
    /// (0: none yet). rumqttc counts ids 1..=`pkid_max` in request order, and it reuses an
    /// id as soon as a QoS 2 publish got its PUBREC, while the MQTT spec (2.3.1) keeps it
    /// busy until PUBCOMP: a broker then takes the new publish for a duplicate of the QoS 2
    /// one and drops it (mosquitto acknowledges it and never delivers it). Mirroring the
    /// counter lets the manager hold a publish back until the id it would get is free.
    last_pkid: u16,
    /// Largest packet id of this connection (rumqttc's in-flight limit, lowered by an MQTT 5
    /// broker's Receive Maximum).
    pkid_max: u16,
    /// The ids QoS 1/2 publishes handed over should get, in order: checked against the ids
    /// rumqttc reports, so a drift of the mirrored counter is noticed.
    expected_pkids: VecDeque<u16>,
    pkid_drift_warned: bool,
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
        let maintaining = Arc::new(AtomicBool::new(false));
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
                            match self.client.subscribe_many(&[(filter.clone(), qos)]) {
                                Ok(()) => {
                                    self.take_pkid();
                                }
                                Err(e) => {
                                    log::warn!("MQTT: subscribing to `{filter}` failed: {e}; retried on reconnect")
                                }
                            }
                        }
                    }
                    Some(Command::Unsubscribe { filter }) => {
                        // Disconnected: nothing to undo, and the filter is no longer sent on reconnect.
                        if self.connected {
                            match self.client.unsubscribe(&filter) {
                                Ok(()) => {
                                    self.take_pkid();
                                }
                                Err(e) => log::warn!("MQTT: unsubscribing from `{filter}` failed: {e}"),
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
                    // Expiry, ack persistence and interval fsyncs touch the disk: off the reactor,
                    // one at a time.
                    if let Some(disk) = &self.disk {
                        if !maintaining.swap(true, Relaxed) {
                            let (disk, maintaining, shared) = (disk.clone(), maintaining.clone(), shared.clone());
                            tokio::task::spawn_blocking(move || {
                                disk.maintain();
                                maintaining.store(false, Relaxed);
                                // Its figures may end a shutdown's wait: look again.
                                shared.stored.notify_one();
                            });
                        }
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
            if self.client.publish(self.status_topic.clone(), 1, true, b"offline".to_vec(), &text_meta()).is_ok() {
                self.publish_pkid();
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
            if self.connected && self.client.disconnect().is_ok() {
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
            + self.released.values().map(data).sum::<usize>()
    }

    /// Disk records not yet acknowledged (handed or not).
    fn disk_pending(&self) -> u64 {
        self.disk.as_ref().map(|d| d.pending()).unwrap_or(0)
    }

    /// QoS 2 publishes handed and not complete.
    fn qos2_in_flight(&self) -> usize {
        let q2 = |h: &Handed| (h.qos == 2) as usize;
        self.sent.iter().map(q2).sum::<usize>()
            + self.collided.as_ref().map(q2).unwrap_or(0)
            + self.unacked.values().map(q2).sum::<usize>()
            + self.released.values().map(q2).sum::<usize>()
    }

    /// Whether a publish of QoS `q` must wait: its packet id is still busy, or too many QoS 2
    /// publishes are in flight.
    fn must_wait(&self, q: u8) -> bool {
        q > 0 && (self.pkid_busy() || (q == 2 && self.qos2_in_flight() >= QOS2_WINDOW))
    }

    fn handed(&self) -> usize {
        self.sent.len() + self.collided.is_some() as usize + self.unacked.len() + self.released.len()
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
        self.buffer.push_back(Queued { msg, attempts: 0, at: SystemTime::now() });
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
        while self.connected && self.handed() < self.window {
            let Some(queued) = self.buffer.pop_front() else { break };
            if self.must_wait(queued.msg.qos.min(2)) {
                self.buffer.push_front(queued);
                break;
            }
            let mut meta = queued.msg.meta.clone();
            if queued.msg.is_result() {
                meta.content_type = Some(JSON);
                if let Some(expiry) = self.message_expiry {
                    let age = SystemTime::now().duration_since(queued.at).unwrap_or_default();
                    match remaining_s(expiry, age) {
                        Some(s) => meta.expiry_s = Some(s),
                        None => {
                            self.expired(&queued.msg.topic);
                            continue;
                        }
                    }
                }
            }
            let payload = queued.msg.payload();
            if payload.len() + queued.msg.topic.len() + 16 > MAX_PACKET_BYTES {
                self.drop_invalid(&queued.msg.topic, "payload too large");
                continue;
            }
            let q = queued.msg.qos.min(2);
            let retain = queued.msg.retain;
            match self.client.publish(queued.msg.topic.clone(), q, retain, payload, &meta) {
                Ok(()) => {
                    if q > 0 {
                        self.publish_pkid();
                    }
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
        let limit = if self.buffer.is_empty() { self.window } else { self.window - self.window / 4 };
        while self.connected && self.handed() < limit {
            if self.disk_ready.is_empty() {
                self.disk_ready.extend(disk.read_after(self.disk_cursor, WINDOW));
            }
            let Some(stored) = self.disk_ready.pop_front() else { break };
            if self.must_wait(stored.record.qos.min(2)) {
                self.disk_ready.push_front(stored);
                break;
            }
            let mut meta = PublishMeta { content_type: Some(JSON), ..PublishMeta::default() };
            if let Some(expiry) = self.message_expiry {
                match remaining_s(expiry, stored.age()) {
                    Some(s) => meta.expiry_s = Some(s),
                    None => {
                        self.disk_cursor = stored.id;
                        disk.ack(stored.id);
                        self.disk_attempts.remove(&stored.id);
                        self.expired(&stored.record.topic);
                        continue;
                    }
                }
            }
            let r = &stored.record;
            match self.client.publish(r.topic.clone(), r.qos.min(2), r.retain, r.payload.clone(), &meta) {
                Ok(()) => {
                    self.publish_pkid();
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
            Link::Connected(receive_max) => {
                // Keep one id spare: rumqttc hands out ids up to the broker's maximum.
                self.window = match receive_max {
                    Some(max) => (usize::from(max).saturating_sub(1)).clamp(1, WINDOW),
                    None => WINDOW,
                };
                let limit = super::mqtt_proto::CLIENT_INFLIGHT;
                self.pkid_max = receive_max.map(|m| m.clamp(1, limit)).unwrap_or(limit);
                self.connected()
            }
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
        // Subscriptions before the `online` status: whoever waits for `online` and then sends
        // a command finds the subscription in place (the broker handles packets in order).
        let filters = self.subscription_filters();
        if !filters.is_empty() {
            let n = filters.len();
            match self.client.subscribe_many(&filters) {
                Ok(()) => {
                    self.take_pkid();
                }
                Err(e) => log::warn!("MQTT: subscribing to {n} filters failed: {e}; retried on reconnect"),
            }
        }
        let status = Handed { item: None, disk_id: None, offline: false, qos: 1, order: self.order() };
        match self.client.publish(self.status_topic.clone(), 1, true, b"online".to_vec(), &text_meta()) {
            Ok(()) => {
                self.publish_pkid();
                self.sent.push_back(status)
            }
            Err(e) => log::warn!("MQTT: publishing the online status failed: {e}"),
        }
        let hooks: Vec<ConnectHook> = self.shared.connect_hooks.lock().map(|h| h.clone()).unwrap_or_default();
        for hook in hooks {
            if std::panic::catch_unwind(AssertUnwindSafe(|| hook())).is_err() {
                log::error!("MQTT: a connect hook panicked");
            }
        }
    }

    /// Every registered filter once, with the highest QoS asked for it.
    fn subscription_filters(&self) -> Vec<(String, u8)> {
        let mut by_filter: Vec<(String, u8)> = Vec::new();
        if let Ok(subs) = self.shared.subscriptions.lock() {
            for s in subs.iter() {
                match by_filter.iter_mut().find(|(f, _)| *f == s.filter) {
                    Some((_, q)) => *q = (*q).max(s.qos),
                    None => by_filter.push((s.filter.clone(), s.qos)),
                }
            }
        }
        by_filter
    }

    /// The id rumqttc gives the next QoS 1/2 publish or subscribe (its counter, mirrored).
    fn next_pkid(&self) -> u16 {
        if self.last_pkid >= self.pkid_max {
            1
        } else {
            self.last_pkid + 1
        }
    }

    /// Counts one packet id as taken (after a QoS 1/2 publish or a subscribe was handed over).
    fn take_pkid(&mut self) -> u16 {
        let id = self.next_pkid();
        self.last_pkid = if id == self.pkid_max { 0 } else { id };
        id
    }

    /// `take_pkid` for a QoS 1/2 publish, remembering the id it should get.
    fn publish_pkid(&mut self) {
        let id = self.take_pkid();
        self.expected_pkids.push_back(id);
    }

    /// True when the next packet id still belongs to a QoS 2 publish waiting for PUBCOMP.
    fn pkid_busy(&self) -> bool {
        self.released.contains_key(&self.next_pkid())
    }

    /// Everything not confirmed goes back to the front of the buffer, in order.
    fn connection_lost(&mut self) {
        self.connected = false;
        // The driver gives rumqttc a fresh state for the next connection.
        self.last_pkid = 0;
        self.expected_pkids.clear();
        self.metrics.connected.store(false, Relaxed);
        let mut back: Vec<Handed> = self.sent.drain(..).collect();
        back.extend(self.collided.take());
        back.extend(self.unacked.drain().map(|(_, h)| h));
        back.extend(self.released.drain().map(|(_, h)| h));
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

    fn on_event(&mut self, event: Ev) {
        match event {
            Ev::Publish(m) => self.dispatch(&m),
            Ev::OutPublish(pkid) => {
                let Some(handed) = self.collided.take().or_else(|| self.sent.pop_front()) else {
                    log::debug!("MQTT: write of a publish nobody handed (pkid {pkid})");
                    return;
                };
                if pkid != 0 {
                    let expected = self.expected_pkids.pop_front();
                    if expected != Some(pkid) && !self.pkid_drift_warned {
                        self.pkid_drift_warned = true;
                        log::warn!(
                            "MQTT: packet id {pkid} where {expected:?} was expected; QoS 2 id reuse may go unnoticed"
                        );
                    }
                }
                if pkid == 0 || handed.qos == 0 {
                    self.confirm(handed);
                } else if let Some(old) = self.unacked.insert(pkid, handed) {
                    // Cannot happen while rumqttc keeps an id busy until its ack; never lose track.
                    log::warn!("MQTT: packet id {pkid} reused before its acknowledgement");
                    self.confirm(old);
                }
            }
            Ev::AwaitAck => self.collided = self.sent.pop_front(),
            Ev::PubAck { pkid, refused } => {
                if let Some(handed) = self.unacked.remove(&pkid) {
                    self.acknowledged(handed, refused);
                }
            }
            Ev::PubRec { pkid, refused } => {
                if let Some(handed) = self.unacked.remove(&pkid) {
                    match refused {
                        // No PUBREL/PUBCOMP follows a refusal.
                        Some(_) => self.acknowledged(handed, refused),
                        None => {
                            if let Some(old) = self.released.insert(pkid, handed) {
                                log::warn!("MQTT: packet id {pkid} released twice");
                                self.confirm(old);
                            }
                        }
                    }
                }
            }
            Ev::PubComp { pkid } => {
                if let Some(handed) = self.released.remove(&pkid) {
                    self.confirm(handed);
                }
            }
            Ev::SubAck { refused } => {
                if refused > 0 {
                    log::warn!("MQTT: the broker refused {refused} subscription(s)");
                }
            }
            Ev::OutDisconnect => self.disconnect_sent = true,
            Ev::ConnAck { .. } => {}
        }
    }

    /// A PUBACK/PUBREC: confirmed, or refused by an MQTT 5 broker (not authorised, quota,
    /// ...). A refused message is not sent again (it would be refused again): it is dropped
    /// and counted, and a disk record is removed.
    fn acknowledged(&mut self, handed: Handed, refused: Option<String>) {
        let Some(reason) = refused else { return self.confirm(handed) };
        let topic = handed.item.as_ref().map(|q| q.msg.topic.clone()).unwrap_or_else(|| "(disk queue)".into());
        if let (Some(id), Some(disk)) = (handed.disk_id, &self.disk) {
            disk.ack(id);
            self.disk_attempts.remove(&id);
        }
        if handed.offline {
            self.offline_acked = true;
        }
        self.drop_invalid(&topic, &format!("the broker refused it ({reason})"));
    }

    /// A result older than the MQTT 5 message expiry: nobody wants it any more.
    fn expired(&mut self, topic: &str) {
        let n = self.metrics.expired.fetch_add(1, Relaxed) + 1;
        if n.is_power_of_two() {
            log::info!("MQTT: result for `{topic}` expired before it could be sent ({n} so far)");
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
    fn dispatch(&self, m: &Incoming) {
        let (topic, retain) = (m.topic.as_str(), m.retain);
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
            if std::panic::catch_unwind(AssertUnwindSafe(|| handler(m))).is_err() {
                log::error!("MQTT: the handler for a message on `{topic}` panicked");
            }
        }
    }
}

/// The `online`/`offline` status's MQTT 5 properties.
fn text_meta() -> PublishMeta {
    PublishMeta { content_type: Some("text/plain"), ..PublishMeta::default() }
}

/// Whole seconds left of `expiry` after `age` (at least 1); None once expired.
fn remaining_s(expiry: Duration, age: Duration) -> Option<u32> {
    let left = expiry.checked_sub(age)?;
    if left.is_zero() {
        return None;
    }
    Some(left.as_secs_f64().ceil().clamp(1.0, u32::MAX as f64) as u32)
}

/// True when `topic` matches the subscription `filter` (`+` one level, `#`
/// the rest, including the parent level itself). Wildcards at the first level
/// do not match topics starting with `$` (MQTT 3.1.1, 4.7.2). A shared
/// subscription (`$share/<group>/<filter>`) matches what `<filter>` matches.
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    let filter = match filter.strip_prefix("$share/").and_then(|rest| rest.split_once('/')) {
        Some((_group, inner)) => inner,
        None => filter,
    };
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
            meta: PublishMeta::default(),
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
            protocol: Protocol::V311,
            message_expiry: None,
            user_properties: Vec::new(),
        };
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn shared_subscriptions_match_what_their_filter_matches() {
        assert!(topic_matches("$share/g/edgeinfer/+/in", "edgeinfer/dev1/in"));
        assert!(!topic_matches("$share/g/edgeinfer/+/in", "edgeinfer/dev1/out"));
        assert!(topic_matches("$share/g/#", "a/b"));
    }

    #[test]
    fn expiry_counts_down_in_whole_seconds_and_ends() {
        let e = Duration::from_secs(10);
        assert_eq!(remaining_s(e, Duration::ZERO), Some(10));
        assert_eq!(remaining_s(e, Duration::from_millis(2500)), Some(8));
        assert_eq!(remaining_s(e, Duration::from_millis(9990)), Some(1));
        assert_eq!(remaining_s(e, e), None);
        assert_eq!(remaining_s(e, Duration::from_secs(60)), None);
    }
}
