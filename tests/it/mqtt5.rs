//! MQTT 5 end to end: the daemon with `protocol = "5"`, a real mosquitto, and an MQTT 5 client
//! (rumqttc's v5 client) that reads the properties edgeinfer sets and sends commands with a
//! response topic and correlation data.

use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant, SystemTime};

use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;

use crate::support::{free_port, Daemon, Mosquitto};

const LONG: Duration = Duration::from_secs(30);

/// One message as an MQTT 5 subscriber sees it.
#[derive(Debug, Clone)]
struct Msg5 {
    topic: String,
    payload: Vec<u8>,
    props: PublishProperties,
    received: SystemTime,
}

impl Msg5 {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload).unwrap_or_else(|e| panic!("{}: not JSON: {e}", self.topic))
    }
}

/// A real MQTT 5 client subscribed to `filter`.
struct Client5 {
    client: rumqttc::v5::Client,
    rx: Receiver<Msg5>,
    seen: Vec<Msg5>,
}

impl Client5 {
    fn connect(port: u16, filter: &str) -> Client5 {
        let mut opts = rumqttc::v5::MqttOptions::new(format!("v5-{}", fastrand::u64(..)), "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(5));
        let (client, mut connection) = rumqttc::v5::Client::new(opts, 256);
        client.subscribe(filter, QoS::AtLeastOnce).unwrap();
        let (tx, rx) = channel();
        let (ready_tx, ready_rx) = channel();
        std::thread::spawn(move || {
            for event in connection.iter() {
                match event {
                    Ok(rumqttc::v5::Event::Incoming(Packet::SubAck(_))) => {
                        let _ = ready_tx.send(());
                    }
                    Ok(rumqttc::v5::Event::Incoming(Packet::Publish(p))) => {
                        let msg = Msg5 {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            payload: p.payload.to_vec(),
                            props: p.properties.unwrap_or_default(),
                            received: SystemTime::now(),
                        };
                        if tx.send(msg).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(200)),
                }
            }
        });
        ready_rx.recv_timeout(Duration::from_secs(10)).expect("subscription acknowledged");
        Client5 { client, rx, seen: Vec::new() }
    }

    fn wait_for(&mut self, timeout: Duration, pred: impl Fn(&Msg5) -> bool) -> Option<Msg5> {
        crate::support::wait_in(&self.rx, &mut self.seen, timeout, pred)
    }

    /// Publishes a request with a response topic and correlation data.
    fn request(&self, topic: &str, payload: &str, response_topic: &str, correlation: &[u8]) {
        let props = PublishProperties {
            response_topic: Some(response_topic.into()),
            correlation_data: Some(correlation.to_vec().into()),
            ..Default::default()
        };
        self.client
            .publish_with_properties(topic, QoS::AtLeastOnce, false, payload.as_bytes().to_vec(), props)
            .unwrap();
    }
}

fn config(port: u16, device: &str, extra_mqtt: &str, extra: &str) -> String {
    format!(
        r#"
device = "{device}"
[mqtt]
url = "mqtt://127.0.0.1:{port}"
protocol = "5"
reconnect_min_ms = 100
reconnect_max_ms = 400
user_properties = {{ site = "barn-3", fleet = "test" }}
{extra_mqtt}
[health]
interval_s = 1
{extra}
[[pipelines]]
name = "digits"
model = "{{models}}/digits_cnn_int8.onnx"
source = {{ type = "files", path = "{{models}}/samples/digits/digit_4_1.png", rate_hz = 20, loop = true }}
  [[pipelines.outputs]]
  type = "mqtt"
  qos = 1
"#
    )
}

fn user_props(m: &Msg5) -> Vec<(String, String)> {
    m.props.user_properties.clone()
}

#[test]
fn mqtt5_messages_carry_content_type_user_properties_and_result_expiry() {
    let broker = Mosquitto::start();
    let device = "v5props";
    let mut sub = Client5::connect(broker.port, &format!("edgeinfer/{device}/#"));
    let daemon = Daemon::start(&config(broker.port, device, "message_expiry_s = 60", ""));

    let result = sub
        .wait_for(LONG, |m| m.topic.ends_with("/digits/result"))
        .unwrap_or_else(|| panic!("no result; daemon log:\n{}", daemon.stderr()));
    assert_eq!(result.json()["pipeline"], "digits");
    assert_eq!(result.props.content_type.as_deref(), Some("application/json"));
    assert_eq!(result.props.payload_format_indicator, Some(1), "JSON is flagged as UTF-8");
    let expiry = result.props.message_expiry_interval.expect("results carry a message expiry");
    assert!((1..=60).contains(&expiry), "expiry {expiry}");
    let props = user_props(&result);
    assert!(props.contains(&("site".into(), "barn-3".into())), "{props:?}");
    assert!(props.contains(&("fleet".into(), "test".into())), "{props:?}");

    let status = sub.wait_for(LONG, |m| m.topic.ends_with("/status")).expect("status");
    assert_eq!(status.payload, b"online");
    assert_eq!(status.props.content_type.as_deref(), Some("text/plain"));

    let health = sub.wait_for(LONG, |m| m.topic.ends_with("/health")).expect("health");
    assert_eq!(health.props.content_type.as_deref(), Some("application/json"));
    assert_eq!(health.props.message_expiry_interval, None, "only results expire");
    assert_eq!(health.json()["mqtt"]["expired"], 0);
}

#[test]
fn mqtt5_commands_are_answered_on_the_response_topic_with_the_correlation_data() {
    let broker = Mosquitto::start();
    let device = "v5cmd";
    let mut sub = Client5::connect(broker.port, "ops/replies/#");
    let daemon = Daemon::start(&config(broker.port, device, "", "[commands]\nenabled = true"));

    // Until the pipelines run, commands are answered "starting up"; ask until one succeeds.
    let deadline = Instant::now() + LONG;
    let mut n = 0u32;
    let reply = loop {
        assert!(Instant::now() < deadline, "no successful reply; daemon log:\n{}", daemon.stderr());
        n += 1;
        let corr = format!("corr-{n}");
        sub.request(&format!("edgeinfer/{device}/cmd/health"), r#"{"id": "h"}"#, "ops/replies/health", corr.as_bytes());
        let got = sub.wait_for(Duration::from_secs(2), |m| {
            m.props.correlation_data.as_deref() == Some(corr.as_bytes()) && m.json()["ok"] == true
        });
        if let Some(m) = got {
            break m;
        }
    };
    assert_eq!(reply.topic, "ops/replies/health");
    let v = reply.json();
    assert_eq!(v["id"], "h", "{v}");
    assert_eq!(v["command"], "health");
    assert_eq!(v["result"]["device"], device);
    assert_eq!(reply.props.content_type.as_deref(), Some("application/json"));

    // An error reply goes to the response topic too, with its correlation data.
    sub.request(&format!("edgeinfer/{device}/cmd/pause"), r#"{"id": 2}"#, "ops/replies/pause", b"\x00\x01bin");
    let err = sub
        .wait_for(LONG, |m| m.topic == "ops/replies/pause")
        .unwrap_or_else(|| panic!("no error reply; daemon log:\n{}", daemon.stderr()));
    assert_eq!(err.props.correlation_data.as_deref(), Some(&b"\x00\x01bin"[..]));
    let v = err.json();
    assert_eq!(v["ok"], false);
    assert!(v["error"].as_str().unwrap().contains("`pipeline` is missing"), "{v}");
}

#[test]
fn mqtt5_results_that_waited_longer_than_their_expiry_are_dropped_and_counted() {
    let port = free_port();
    let broker = Mosquitto::start_on(port);
    let device = "v5exp";
    let queue = tempfile::tempdir().unwrap();
    let extra = format!("message_expiry_s = 2\nqueue_dir = \"{}\"", queue.path().display());
    let daemon = Daemon::start(&config(port, device, &extra, ""));
    let mut sub = Client5::connect(port, &format!("edgeinfer/{device}/#"));
    let first = sub
        .wait_for(LONG, |m| m.topic.ends_with("/result"))
        .unwrap_or_else(|| panic!("no result; daemon log:\n{}", daemon.stderr()));
    let seq_before = first.json()["seq"].as_u64().unwrap();

    // 6 s without a broker at 20 results/s: about 120 results queue up on disk, and all but
    // the last 2 s of them expire before the broker is back.
    broker.stop();
    std::thread::sleep(Duration::from_secs(6));
    let restarted = SystemTime::now();
    let _broker = Mosquitto::start_on(port);
    let mut sub = Client5::connect(port, &format!("edgeinfer/{device}/#"));
    let health = sub
        .wait_for(LONG, |m| m.topic.ends_with("/health") && m.json()["mqtt"]["expired"].as_u64().unwrap_or(0) > 0)
        .unwrap_or_else(|| panic!("expired results never counted; daemon log:\n{}", daemon.stderr()));
    let expired = health.json()["mqtt"]["expired"].as_u64().unwrap();
    assert!(expired >= 40, "expected most of ~120 queued results to expire, got {expired}");

    // What is delivered after the restart was captured at most ~2 s (plus slack) before it.
    let results: Vec<Msg5> = {
        sub.wait_for(LONG, |m| m.topic.ends_with("/result")).expect("results after the restart");
        std::thread::sleep(Duration::from_secs(1));
        while let Ok(m) = sub.rx.try_recv() {
            sub.seen.push(m);
        }
        sub.seen.iter().filter(|m| m.topic.ends_with("/result")).cloned().collect()
    };
    let restart_ms = restarted.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_millis() as u64;
    for m in &results {
        let v = m.json();
        assert!(v["seq"].as_u64().unwrap() > seq_before);
        let captured = v["captured_ms"].as_u64().unwrap();
        assert!(
            captured + 4000 >= restart_ms,
            "a result captured {} ms before the restart was delivered",
            restart_ms - captured
        );
        let left = m.props.message_expiry_interval.expect("expiry");
        assert!((1..=2).contains(&left), "remaining expiry {left}");
        assert!(m.received >= restarted);
    }
}
