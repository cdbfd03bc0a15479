//! MQTT 3.1.1 and MQTT 5 behind one small interface.
//!
//! rumqttc has a separate client, event loop and packet types per protocol
//! version. The connection code (`mqtt.rs`) drives either through [`Client`]
//! (requests) and [`Loop`] (events, normalised to [`Ev`]), so the buffering,
//! acknowledgement and store-and-forward logic exists once.

use std::error::Error as StdError;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5;
use rumqttc::v5::mqttbytes::v5 as p5;
use rumqttc::Outgoing;
#[cfg(feature = "tls")]
use rumqttc::{TlsConfiguration, Transport};

use super::mqtt::{MqttSettings, MAX_PACKET_BYTES};

/// rumqttc's limit of unacknowledged QoS 1/2 publishes.
pub const CLIENT_INFLIGHT: u16 = 100;

/// MQTT protocol version spoken to the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// MQTT 3.1.1 (the default: every broker speaks it).
    #[default]
    V311,
    /// MQTT 5: properties (content type, message expiry, user properties, response topic).
    V5,
}

impl Protocol {
    /// Reads `"3.1.1"` or `"5"` (as in `[mqtt] protocol`).
    pub fn parse(s: &str) -> Result<Protocol, String> {
        match s.trim() {
            "3.1.1" | "311" | "4" => Ok(Protocol::V311),
            "5" | "5.0" => Ok(Protocol::V5),
            other => Err(format!("`{other}`: expected \"3.1.1\" or \"5\"")),
        }
    }
}

/// `[mqtt] protocol` in a config: parsed once, at load.
impl<'de> serde::Deserialize<'de> for Protocol {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Protocol::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// MQTT 5 properties of one outgoing publish (ignored on MQTT 3.1.1).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishMeta {
    /// Content type (`application/json`, `image/jpeg`, `text/plain`).
    pub content_type: Option<&'static str>,
    /// Seconds the broker keeps the message for subscribers that have not received it yet.
    pub expiry_s: Option<u32>,
    /// Correlation data echoed from a request (command replies).
    pub correlation_data: Option<Vec<u8>>,
}

/// A message received on a subscription, with its MQTT 5 properties (None/empty on 3.1.1).
#[derive(Debug, Clone)]
pub struct Incoming {
    /// Topic it was published to.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// Retained flag (a retained message the broker replays on subscribe).
    pub retain: bool,
    /// MQTT 5 response topic: where the sender wants the reply.
    pub response_topic: Option<String>,
    /// MQTT 5 correlation data: echoed in the reply.
    pub correlation_data: Option<Bytes>,
}

/// What the connection acts on, whichever the protocol.
#[derive(Debug)]
pub enum Ev {
    /// The broker accepted the connection; MQTT 5 brokers may cap in-flight publishes.
    ConnAck {
        /// The broker's Receive Maximum (MQTT 5).
        receive_max: Option<u16>,
    },
    /// A message on a subscribed filter.
    Publish(Incoming),
    /// QoS 1 acknowledged; `refused` holds the MQTT 5 reason when the broker did not take it.
    PubAck { pkid: u16, refused: Option<String> },
    /// QoS 2 received by the broker (PUBREL follows); `refused` as for PubAck.
    PubRec { pkid: u16, refused: Option<String> },
    /// QoS 2 complete.
    PubComp { pkid: u16 },
    /// Subscriptions answered; how many the broker refused.
    SubAck { refused: usize },
    /// A publish was written with this packet id (0 for QoS 0).
    OutPublish(u16),
    /// A publish waits for a packet id still in use.
    AwaitAck,
    /// The DISCONNECT was written.
    OutDisconnect,
}

/// The request side of the connection.
#[derive(Clone)]
pub enum Client {
    /// MQTT 3.1.1.
    V4(rumqttc::AsyncClient),
    /// MQTT 5, with the user properties put on every publish.
    V5(v5::AsyncClient, std::sync::Arc<Vec<(String, String)>>),
}

/// The event side of the connection.
pub struct Loop {
    inner: LoopInner,
    /// A ConnAck arrived and no error since.
    up: bool,
}

enum LoopInner {
    V4(Box<rumqttc::EventLoop>),
    V5(Box<v5::EventLoop>),
}

/// A failed poll: the error, and whether it is a TLS error.
pub struct PollError {
    /// What failed.
    pub error: Box<dyn StdError + Send + Sync + 'static>,
    /// A TLS failure (a handshake problem when it happens while connecting).
    pub tls: bool,
}

fn qos4(q: u8) -> rumqttc::QoS {
    match q {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        _ => rumqttc::QoS::ExactlyOnce,
    }
}

fn qos5(q: u8) -> v5::mqttbytes::QoS {
    match q {
        0 => v5::mqttbytes::QoS::AtMostOnce,
        1 => v5::mqttbytes::QoS::AtLeastOnce,
        _ => v5::mqttbytes::QoS::ExactlyOnce,
    }
}

/// True for content types whose payload is UTF-8 text (MQTT 5 payload format indicator).
fn is_text(content_type: &str) -> bool {
    content_type.starts_with("text/") || content_type == "application/json"
}

/// User name and password to send. MQTT 3.1.1 has no password without a user name (MQTT 5
/// has, but rumqttc sends both or neither).
fn credentials(settings: &MqttSettings) -> Option<(String, String)> {
    match (&settings.username, &settings.password) {
        (Some(user), password) => Some((user.clone(), password.clone().unwrap_or_default())),
        (None, Some(_)) => {
            log::warn!("MQTT: a password is set but no username: connecting without credentials");
            None
        }
        (None, None) => None,
    }
}

/// Makes the client and event loop for `settings` (client id already made broker-safe).
pub fn connect(settings: &MqttSettings, client_id: String, keep_alive: Duration, cap: usize) -> (Client, Loop) {
    // With TLS configured, every connection is TLS: there is no plaintext fallback.
    #[cfg(feature = "tls")]
    let transport =
        settings.tls.as_ref().map(|tls| Transport::tls_with_config(TlsConfiguration::Rustls(tls.config.clone())));
    match settings.protocol {
        Protocol::V311 => {
            let mut opts = rumqttc::MqttOptions::new(client_id, settings.host.clone(), settings.port);
            opts.set_keep_alive(keep_alive)
                .set_clean_session(true)
                .set_inflight(CLIENT_INFLIGHT)
                .set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES)
                .set_last_will(rumqttc::LastWill::new(
                    settings.status_topic.clone(),
                    "offline",
                    rumqttc::QoS::AtLeastOnce,
                    true,
                ));
            if let Some((user, password)) = credentials(settings) {
                opts.set_credentials(user, password);
            }
            #[cfg(feature = "tls")]
            if let Some(t) = transport {
                opts.set_transport(t);
            }
            let (client, eventloop) = rumqttc::AsyncClient::new(opts, cap);
            (Client::V4(client), Loop { inner: LoopInner::V4(Box::new(eventloop)), up: false })
        }
        Protocol::V5 => {
            let mut opts = v5::MqttOptions::new(client_id, settings.host.clone(), settings.port);
            // rumqttc's MQTT 5 client refuses (panics on) keep-alives under 5 s.
            let keep_alive = keep_alive.max(Duration::from_secs(5));
            let will = p5::LastWillProperties {
                delay_interval: None,
                payload_format_indicator: Some(1),
                message_expiry_interval: None,
                content_type: Some("text/plain".into()),
                response_topic: None,
                correlation_data: None,
                user_properties: settings.user_properties.clone(),
            };
            opts.set_keep_alive(keep_alive)
                .set_clean_start(true)
                .set_outgoing_inflight_upper_limit(CLIENT_INFLIGHT)
                .set_max_packet_size(Some(MAX_PACKET_BYTES as u32))
                .set_last_will(p5::LastWill::new(settings.status_topic.clone(), "offline", qos5(1), true, Some(will)));
            if let Some((user, password)) = credentials(settings) {
                opts.set_credentials(user, password);
            }
            #[cfg(feature = "tls")]
            if let Some(t) = transport {
                opts.set_transport(t);
            }
            let (client, eventloop) = v5::AsyncClient::new(opts, cap);
            let props = std::sync::Arc::new(settings.user_properties.clone());
            (Client::V5(client, props), Loop { inner: LoopInner::V5(Box::new(eventloop)), up: false })
        }
    }
}

impl Client {
    /// Hands a publish to the client without waiting; Err when its request channel is full.
    pub fn publish(
        &self,
        topic: String,
        qos: u8,
        retain: bool,
        payload: Vec<u8>,
        meta: &PublishMeta,
    ) -> Result<(), String> {
        match self {
            Client::V4(c) => c.try_publish(topic, qos4(qos), retain, payload).map_err(|e| e.to_string()),
            Client::V5(c, user_properties) => {
                let props = p5::PublishProperties {
                    payload_format_indicator: meta.content_type.filter(|t| is_text(t)).map(|_| 1),
                    message_expiry_interval: meta.expiry_s,
                    content_type: meta.content_type.map(str::to_string),
                    correlation_data: meta.correlation_data.clone().map(Bytes::from),
                    user_properties: user_properties.as_ref().clone(),
                    ..Default::default()
                };
                c.try_publish_with_properties(topic, qos5(qos), retain, payload, props).map_err(|e| e.to_string())
            }
        }
    }

    /// Subscribes to each (filter, qos).
    pub fn subscribe_many(&self, filters: &[(String, u8)]) -> Result<(), String> {
        match self {
            Client::V4(c) => c
                .try_subscribe_many(filters.iter().map(|(f, q)| rumqttc::SubscribeFilter::new(f.clone(), qos4(*q))))
                .map_err(|e| e.to_string()),
            Client::V5(c, _) => c
                .try_subscribe_many(filters.iter().map(|(f, q)| p5::Filter::new(f.clone(), qos5(*q))))
                .map_err(|e| e.to_string()),
        }
    }

    /// Unsubscribes from a filter.
    pub fn unsubscribe(&self, filter: &str) -> Result<(), String> {
        match self {
            Client::V4(c) => c.try_unsubscribe(filter).map_err(|e| e.to_string()),
            Client::V5(c, _) => c.try_unsubscribe(filter).map_err(|e| e.to_string()),
        }
    }

    /// Asks for a DISCONNECT.
    pub fn disconnect(&self) -> Result<(), String> {
        match self {
            Client::V4(c) => c.try_disconnect().map_err(|e| e.to_string()),
            Client::V5(c, _) => c.try_disconnect().map_err(|e| e.to_string()),
        }
    }
}

/// A v5 reason code other than success, as text.
fn refused5<R: std::fmt::Debug + PartialEq>(reason: &R, ok: &[R]) -> Option<String> {
    (!ok.contains(reason)).then(|| format!("{reason:?}"))
}

impl Loop {
    /// True until the first ConnAck, and again after every error.
    pub fn connecting(&self) -> bool {
        !self.up
    }

    /// The next event the connection acts on (None: one it does not need).
    pub async fn poll(&mut self) -> Result<Option<Ev>, PollError> {
        let event = match &mut self.inner {
            LoopInner::V4(l) => match l.poll().await {
                Ok(e) => Ok(v4_event(e)),
                Err(e) => {
                    #[cfg(feature = "tls")]
                    let tls = matches!(e, rumqttc::ConnectionError::Tls(_));
                    #[cfg(not(feature = "tls"))]
                    let tls = false;
                    Err(PollError { error: Box::new(e), tls })
                }
            },
            LoopInner::V5(l) => match l.poll().await {
                Ok(e) => Ok(v5_event(e)),
                Err(e) => {
                    #[cfg(feature = "tls")]
                    let tls = matches!(e, v5::ConnectionError::Tls(_));
                    #[cfg(not(feature = "tls"))]
                    let tls = false;
                    Err(PollError { error: Box::new(e), tls })
                }
            },
        };
        match &event {
            Ok(Some(Ev::ConnAck { .. })) => self.up = true,
            Err(_) => self.up = false,
            _ => {}
        }
        event
    }

    /// Messages received on the connection that just failed, not yet polled.
    pub fn stale_publishes(&mut self) -> Vec<Incoming> {
        match &mut self.inner {
            LoopInner::V4(l) => l.state.events.drain(..).filter_map(v4_event).collect::<Vec<_>>(),
            LoopInner::V5(l) => l.state.events.drain(..).filter_map(v5_event).collect::<Vec<_>>(),
        }
        .into_iter()
        .filter_map(|e| match e {
            Ev::Publish(m) => Some(m),
            _ => None,
        })
        .collect()
    }

    /// Forgets every request rumqttc kept for the lost (clean) session; the
    /// connection code re-sends what was not confirmed.
    pub fn reset(&mut self) {
        match &mut self.inner {
            LoopInner::V4(l) => {
                l.clean();
                l.pending.clear();
                l.state = rumqttc::MqttState::new(CLIENT_INFLIGHT, false);
            }
            LoopInner::V5(l) => {
                l.clean();
                l.pending.clear();
                l.state = v5::MqttState::new(CLIENT_INFLIGHT, false);
            }
        }
    }
}

fn v4_event(event: rumqttc::Event) -> Option<Ev> {
    use rumqttc::{Event, Packet, SubscribeReasonCode};
    Some(match event {
        Event::Incoming(Packet::ConnAck(_)) => Ev::ConnAck { receive_max: None },
        Event::Incoming(Packet::Publish(p)) => Ev::Publish(Incoming {
            topic: p.topic,
            payload: p.payload,
            retain: p.retain,
            response_topic: None,
            correlation_data: None,
        }),
        Event::Incoming(Packet::PubAck(a)) => Ev::PubAck { pkid: a.pkid, refused: None },
        Event::Incoming(Packet::PubRec(r)) => Ev::PubRec { pkid: r.pkid, refused: None },
        Event::Incoming(Packet::PubComp(c)) => Ev::PubComp { pkid: c.pkid },
        Event::Incoming(Packet::SubAck(a)) => {
            Ev::SubAck { refused: a.return_codes.iter().filter(|c| matches!(c, SubscribeReasonCode::Failure)).count() }
        }
        Event::Outgoing(Outgoing::Publish(pkid)) => Ev::OutPublish(pkid),
        Event::Outgoing(Outgoing::AwaitAck(_)) => Ev::AwaitAck,
        Event::Outgoing(Outgoing::Disconnect) => Ev::OutDisconnect,
        _ => return None,
    })
}

fn v5_event(event: v5::Event) -> Option<Ev> {
    use p5::{Packet, PubAckReason, PubRecReason, SubscribeReasonCode};
    Some(match event {
        v5::Event::Incoming(Packet::ConnAck(a)) => {
            Ev::ConnAck { receive_max: a.properties.as_ref().and_then(|p| p.receive_max) }
        }
        v5::Event::Incoming(Packet::Publish(p)) => {
            let (response_topic, correlation_data) = match p.properties {
                Some(props) => (props.response_topic, props.correlation_data),
                None => (None, None),
            };
            Ev::Publish(Incoming {
                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                payload: p.payload,
                retain: p.retain,
                response_topic,
                correlation_data,
            })
        }
        v5::Event::Incoming(Packet::PubAck(a)) => Ev::PubAck {
            pkid: a.pkid,
            refused: refused5(&a.reason, &[PubAckReason::Success, PubAckReason::NoMatchingSubscribers]),
        },
        v5::Event::Incoming(Packet::PubRec(r)) => Ev::PubRec {
            pkid: r.pkid,
            refused: refused5(&r.reason, &[PubRecReason::Success, PubRecReason::NoMatchingSubscribers]),
        },
        v5::Event::Incoming(Packet::PubComp(c)) => Ev::PubComp { pkid: c.pkid },
        v5::Event::Incoming(Packet::SubAck(a)) => Ev::SubAck {
            refused: a.return_codes.iter().filter(|c| !matches!(c, SubscribeReasonCode::Success(_))).count(),
        },
        v5::Event::Outgoing(Outgoing::Publish(pkid)) => Ev::OutPublish(pkid),
        v5::Event::Outgoing(Outgoing::AwaitAck(_)) => Ev::AwaitAck,
        v5::Event::Outgoing(Outgoing::Disconnect) => Ev::OutDisconnect,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_names_parse_and_errors_list_the_choices() {
        assert_eq!(Protocol::parse("3.1.1"), Ok(Protocol::V311));
        assert_eq!(Protocol::parse("5"), Ok(Protocol::V5));
        let e = Protocol::parse("6").unwrap_err();
        assert!(e.contains("\"3.1.1\" or \"5\""), "{e}");
    }

    #[test]
    fn json_and_text_are_flagged_as_utf8_payloads_images_are_not() {
        assert!(is_text("application/json"));
        assert!(is_text("text/plain"));
        assert!(!is_text("image/jpeg"));
    }
}
