//! Home Assistant MQTT discovery: retained configs that make each pipeline's results appear as
//! Home Assistant entities, re-announced when Home Assistant (or edgeinfer) comes back, and
//! cleared when a pipeline is gone.
//!
//! Every pipeline whose first MQTT output has a fixed topic gets entities reading its
//! `edgeinfer/result/v1` payloads through `value_template`s (see [`entities`]). Configs go to
//! `<prefix>/<component>/edgeinfer_<device>/<object_id>/config`, retained, QoS 1, and are sent
//! again after every (re)connection of edgeinfer and whenever `online` arrives on Home
//! Assistant's status topic (it forgets non-retained state when it restarts).
//!
//! Removal without state of our own: edgeinfer keeps nothing on disk between runs, so the broker
//! is the memory. We subscribe to `<prefix>/+/edgeinfer_<device>/+/config`; the broker hands back
//! the retained configs this device published in earlier runs, and any non-empty one whose topic
//! is not among the configs of this run is cleared with an empty retained payload (which makes
//! Home Assistant delete the entity). The subscription stays, so a config that reappears later
//! (another process with the same device id) is cleared too.

use std::collections::HashSet;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::sink::config::{OutputConfig, OutputKind};
use crate::sink::mqtt::{valid_topic, Incoming, MqttHandle, OutMessage, JSON};

/// The `[homeassistant]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HomeAssistantConfig {
    /// Publish discovery configs (opt-in).
    pub enabled: bool,
    /// Home Assistant's discovery prefix.
    pub discovery_prefix: String,
    /// Where Home Assistant announces `online` after it starts (its birth message).
    pub status_topic: String,
    /// Device name shown in Home Assistant (default: the device id).
    pub device_name: Option<String>,
    /// Entities become unavailable when no result arrived for this long (default: never).
    pub expire_after_s: Option<u64>,
}

impl Default for HomeAssistantConfig {
    fn default() -> Self {
        HomeAssistantConfig {
            enabled: false,
            discovery_prefix: "homeassistant".into(),
            status_topic: "homeassistant/status".into(),
            device_name: None,
            expire_after_s: None,
        }
    }
}

impl HomeAssistantConfig {
    /// Checks the values; the error names the key (without the `homeassistant.` prefix).
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |k: &str, r: String| Err((k.to_string(), r));
        let p = &self.discovery_prefix;
        if !valid_topic(p) || p.starts_with('/') || p.ends_with('/') {
            return bad(
                "discovery_prefix",
                format!("`{p}` must be a topic without `+`, `#` or a leading/trailing `/`"),
            );
        }
        if !valid_topic(&self.status_topic) {
            return bad("status_topic", format!("`{}` is not a valid topic (no `+` or `#`)", self.status_topic));
        }
        if self.device_name.as_deref().is_some_and(|n| n.trim().is_empty()) {
            return bad("device_name", "must not be empty".into());
        }
        if self.expire_after_s == Some(0) {
            return bad("expire_after_s", "must be at least 1 (leave it out to never expire)".into());
        }
        Ok(())
    }
}

/// One retained discovery config.
#[derive(Debug, Clone)]
pub struct DiscoveryConfig {
    /// `<prefix>/<component>/<node_id>/<object_id>/config`.
    pub topic: String,
    /// The JSON config.
    pub payload: Value,
}

/// Everything this run announces.
#[derive(Debug, Clone)]
pub struct Discovery {
    /// `edgeinfer_<device>`: the node level of every config topic and the device identifier.
    pub node_id: String,
    /// Discovery prefix.
    pub prefix: String,
    /// Home Assistant's status topic.
    pub ha_status_topic: String,
    /// The configs.
    pub configs: Vec<DiscoveryConfig>,
}

impl Discovery {
    /// The filter matching every config of this device, whatever the component and object.
    pub fn config_filter(&self) -> String {
        format!("{}/+/{}/+/config", self.prefix, self.node_id)
    }

    /// True for a retained config of this device that this run does not produce (an empty
    /// payload is a removal already).
    pub fn is_stale(&self, topic: &str, payload: &[u8]) -> bool {
        !payload.is_empty() && !self.configs.iter().any(|c| c.topic == topic)
    }
}

/// What discovery needs to know of one pipeline.
#[derive(Debug, Clone, Copy)]
pub struct PipelineInfo<'a> {
    /// Pipeline name.
    pub name: &'a str,
    /// Postprocess kind: `classify`, `values`, `anomaly` or `detect`.
    pub kind: &'a str,
    /// Model name (fills `{model}` in the topic).
    pub model: &'a str,
    /// Its outputs (the first MQTT one is the state topic).
    pub outputs: &'a [OutputConfig],
}

/// One entity of a pipeline.
#[derive(Debug, Clone, PartialEq)]
pub struct Entity {
    /// `sensor` or `binary_sensor`.
    pub component: &'static str,
    /// Appended to the pipeline name in ids and to the entity name.
    pub suffix: &'static str,
    /// Reads the state out of a result payload.
    pub value_template: &'static str,
    /// Extra config keys.
    pub extra: Value,
}

/// The entities a pipeline with this postprocess kind gets.
pub fn entities(kind: &str) -> Vec<Entity> {
    let measurement = || json!({"state_class": "measurement"});
    match kind {
        "classify" => vec![
            Entity {
                component: "sensor",
                suffix: "class",
                value_template: "{{ value_json.result.classes[0].label }}",
                extra: json!({
                    "json_attributes_template": "{{ {'score': value_json.result.classes[0].score} | tojson }}",
                }),
            },
            Entity {
                component: "sensor",
                suffix: "score",
                value_template: "{{ value_json.result.classes[0].score }}",
                extra: measurement(),
            },
        ],
        "anomaly" => vec![
            Entity {
                component: "sensor",
                suffix: "score",
                value_template: "{{ value_json.result.anomaly.score }}",
                extra: measurement(),
            },
            Entity {
                component: "binary_sensor",
                suffix: "anomalous",
                value_template: "{{ 'ON' if value_json.result.anomaly.anomalous else 'OFF' }}",
                extra: json!({"device_class": "problem", "payload_on": "ON", "payload_off": "OFF"}),
            },
        ],
        "values" => vec![Entity {
            component: "sensor",
            suffix: "value",
            value_template: "{{ value_json.result.values[0] }}",
            extra: measurement(),
        }],
        "detect" => vec![Entity {
            component: "sensor",
            suffix: "detections",
            value_template: "{{ value_json.result.detections | length }}",
            extra: json!({
                "state_class": "measurement",
                "json_attributes_template":
                    "{{ {'labels': value_json.result.detections | map(attribute='label') | unique | sort | list} | tojson }}",
            }),
        }],
        _ => Vec::new(),
    }
}

/// Characters outside `[A-Za-z0-9_-]` (what Home Assistant allows in topic ids) become `_`.
pub fn topic_id(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' }).collect()
}

/// An entity-id slug: lower case `[a-z0-9]` runs joined by single `_` (Home Assistant refuses
/// capitals, `-`, doubled, leading or trailing `_`).
pub fn entity_slug(s: &str) -> String {
    let lower = s.to_ascii_lowercase();
    let words: Vec<&str> = lower.split(|c: char| !c.is_ascii_alphanumeric()).filter(|w| !w.is_empty()).collect();
    if words.is_empty() {
        "edgeinfer".into()
    } else {
        words.join("_")
    }
}

/// The discovery configs for these pipelines. `status_topic` is edgeinfer's (rendered)
/// availability topic. Pipelines without a usable state topic are skipped with a warning.
pub fn plan(ha: &HomeAssistantConfig, device: &str, status_topic: &str, pipelines: &[PipelineInfo]) -> Discovery {
    let node_id = format!("edgeinfer_{}", topic_id(device));
    let version = env!("CARGO_PKG_VERSION");
    let device_block = json!({
        "identifiers": [node_id],
        "name": ha.device_name.as_deref().unwrap_or(device),
        "model": "edgeinfer",
        "sw_version": version,
    });
    let mut configs: Vec<DiscoveryConfig> = Vec::new();
    let mut seen = HashSet::new();
    for p in pipelines {
        let Some(out) = p.outputs.iter().find(|o| o.kind == OutputKind::Mqtt) else {
            log::info!("homeassistant: pipeline `{}` has no MQTT output: no entities", p.name);
            continue;
        };
        if out.topic.contains("{label}") {
            log::warn!(
                "homeassistant: pipeline `{}`: its first MQTT output's topic `{}` changes with {{label}}, so it \
                 cannot be a state topic: no entities",
                p.name,
                out.topic
            );
            continue;
        }
        let state_topic =
            out.topic.replace("{device}", device).replace("{pipeline}", p.name).replace("{model}", p.model);
        let list = entities(p.kind);
        if list.is_empty() {
            log::warn!("homeassistant: pipeline `{}`: no entities for a `{}` postprocess", p.name, p.kind);
        }
        for e in list {
            let object_id = format!("{}_{}", topic_id(p.name), e.suffix);
            if !seen.insert((e.component, object_id.clone())) {
                log::warn!(
                    "homeassistant: pipeline `{}`: `{object_id}` is already used by another pipeline (names differing \
                     only in `.`?): skipped",
                    p.name
                );
                continue;
            }
            let unique_id = format!("{node_id}_{object_id}");
            let mut payload = json!({
                "name": format!("{} {}", p.name, e.suffix),
                "unique_id": unique_id,
                "default_entity_id": format!("{}.{}", e.component, entity_slug(&unique_id)),
                "state_topic": state_topic,
                "value_template": e.value_template,
                "qos": out.qos,
                "availability_topic": status_topic,
                "payload_available": "online",
                "payload_not_available": "offline",
                "device": device_block,
                "origin": {"name": "edgeinfer", "sw_version": version},
            });
            if let (Some(map), Value::Object(extra)) = (payload.as_object_mut(), e.extra) {
                if extra.contains_key("json_attributes_template") {
                    map.insert("json_attributes_topic".into(), Value::from(state_topic.clone()));
                }
                map.extend(extra);
                if let Some(s) = ha.expire_after_s {
                    map.insert("expire_after".into(), Value::from(s));
                }
            }
            let topic = format!("{}/{}/{node_id}/{object_id}/config", ha.discovery_prefix, e.component);
            configs.push(DiscoveryConfig { topic, payload });
        }
    }
    Discovery { node_id, prefix: ha.discovery_prefix.clone(), ha_status_topic: ha.status_topic.clone(), configs }
}

/// Publishes every config (retained, QoS 1).
fn announce(configs: &[(String, Vec<u8>)], hub: &MqttHandle) {
    for (topic, bytes) in configs {
        hub.enqueue(OutMessage::raw(topic.clone(), bytes.clone(), 1, true, JSON));
    }
}

/// Starts discovery for the daemon when `[homeassistant]` is enabled: announces on every
/// connection and on Home Assistant's `online`, and clears configs of pipelines that are gone.
/// `status_topic` is the daemon's availability topic, `{device}` filled in.
pub fn start(
    ha: &HomeAssistantConfig,
    device: &str,
    status_topic: &str,
    infos: &[PipelineInfo],
    hub: Option<&MqttHandle>,
) {
    if !ha.enabled {
        return;
    }
    let Some(hub) = hub else {
        log::warn!("homeassistant: enabled, but nothing uses MQTT (no mqtt output, no mqtt.url): no discovery");
        return;
    };
    let discovery = Arc::new(plan(ha, device, status_topic, infos));
    log::info!(
        "homeassistant: {} discovery configs under `{}/+/{}/`",
        discovery.configs.len(),
        discovery.prefix,
        discovery.node_id
    );
    let configs: Arc<Vec<(String, Vec<u8>)>> = Arc::new(
        discovery
            .configs
            .iter()
            .map(|c| (c.topic.clone(), serde_json::to_vec(&c.payload).unwrap_or_default()))
            .collect(),
    );

    // The handlers hold a handle to the connection they are registered on; the connection
    // task ends on shutdown, not when the last handle goes, so this cycle is harmless.
    let stale_hub = hub.clone();
    let stale_discovery = discovery.clone();
    hub.subscribe(
        &discovery.config_filter(),
        1,
        Arc::new(move |m: &Incoming| {
            let topic = m.topic.as_str();
            if stale_discovery.is_stale(topic, &m.payload) {
                log::info!("homeassistant: clearing `{topic}` (an entity this device no longer has)");
                stale_hub.enqueue(OutMessage::raw(topic.to_string(), Vec::new(), 1, true, JSON));
            }
        }),
    );

    let (birth_hub, birth_configs) = (hub.clone(), configs.clone());
    hub.subscribe(
        &discovery.ha_status_topic,
        1,
        Arc::new(move |m: &Incoming| {
            let topic = m.topic.as_str();
            if m.payload.trim_ascii() == b"online" {
                log::info!("homeassistant: `online` on `{topic}`: announcing {} configs again", birth_configs.len());
                announce(&birth_configs, &birth_hub);
            }
        }),
    );

    let connect_hub = hub.clone();
    hub.on_connect(Arc::new(move || announce(&configs, &connect_hub)));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<HomeAssistantConfig, String> {
        let c: HomeAssistantConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        c.validate().map_err(|(k, r)| format!("{k}: {r}"))?;
        Ok(c)
    }

    fn outputs(toml_text: &str) -> Vec<OutputConfig> {
        #[derive(Deserialize)]
        struct W {
            outputs: Vec<OutputConfig>,
        }
        toml::from_str::<W>(toml_text).unwrap().outputs
    }

    #[test]
    fn defaults_are_off_with_the_usual_topics() {
        let c = parse("").unwrap();
        assert!(!c.enabled);
        assert_eq!(c.discovery_prefix, "homeassistant");
        assert_eq!(c.status_topic, "homeassistant/status");
        assert!(c.device_name.is_none() && c.expire_after_s.is_none());
    }

    #[test]
    fn bad_values_name_their_key() {
        assert!(parse("enabeld = true").unwrap_err().contains("enabeld"));
        for (text, key) in [
            ("discovery_prefix = \"ha/+\"", "discovery_prefix"),
            ("discovery_prefix = \"ha/\"", "discovery_prefix"),
            ("discovery_prefix = \"\"", "discovery_prefix"),
            ("status_topic = \"ha/#\"", "status_topic"),
            ("device_name = \" \"", "device_name"),
            ("expire_after_s = 0", "expire_after_s"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.starts_with(key), "{text}: {e}");
        }
    }

    #[test]
    fn ids_are_safe_for_topics_and_entity_ids() {
        assert_eq!(topic_id("pi-4.lab"), "pi-4_lab");
        assert_eq!(entity_slug("edgeinfer_Pi-4.lab__x_"), "edgeinfer_pi_4_lab_x");
        assert_eq!(entity_slug("--"), "edgeinfer");
    }

    #[test]
    fn a_classify_pipeline_gets_a_label_and_a_score_sensor() {
        let ha = HomeAssistantConfig { expire_after_s: Some(60), ..Default::default() };
        let outs = outputs("[[outputs]]\ntype = \"stdout\"\n[[outputs]]\ntype = \"mqtt\"\nqos = 1\n");
        let info = PipelineInfo { name: "cam.1", kind: "classify", model: "digits", outputs: &outs };
        let d = plan(&ha, "pi", "edgeinfer/pi/status", &[info]);
        assert_eq!(d.config_filter(), "homeassistant/+/edgeinfer_pi/+/config");
        let topics: Vec<&str> = d.configs.iter().map(|c| c.topic.as_str()).collect();
        assert_eq!(
            topics,
            [
                "homeassistant/sensor/edgeinfer_pi/cam_1_class/config",
                "homeassistant/sensor/edgeinfer_pi/cam_1_score/config"
            ]
        );
        let c = &d.configs[0].payload;
        assert_eq!(c["unique_id"], "edgeinfer_pi_cam_1_class");
        assert_eq!(c["default_entity_id"], "sensor.edgeinfer_pi_cam_1_class");
        assert_eq!(c["state_topic"], "edgeinfer/pi/cam.1/result");
        assert_eq!(c["json_attributes_topic"], "edgeinfer/pi/cam.1/result");
        assert_eq!(c["qos"], 1);
        assert_eq!(c["expire_after"], 60);
        assert_eq!(c["availability_topic"], "edgeinfer/pi/status");
        assert_eq!(c["device"]["identifiers"][0], "edgeinfer_pi");
        assert_eq!(c["device"]["name"], "pi");
        assert_eq!(c["device"]["sw_version"], env!("CARGO_PKG_VERSION"));
        assert!(d.configs[1].payload.get("json_attributes_topic").is_none());
        assert!(!d.is_stale(topics[0], b"{}"));
        assert!(d.is_stale("homeassistant/sensor/edgeinfer_pi/old_class/config", b"{}"));
        assert!(!d.is_stale("homeassistant/sensor/edgeinfer_pi/old_class/config", b""));
    }

    #[test]
    fn label_topics_and_outputs_without_mqtt_give_no_entities() {
        let ha = HomeAssistantConfig::default();
        let label = outputs("[[outputs]]\ntype = \"mqtt\"\ntopic = \"x/{label}\"\n");
        let none = outputs("[[outputs]]\ntype = \"stdout\"\n");
        let model = outputs("[[outputs]]\ntype = \"mqtt\"\ntopic = \"x/{device}/{model}\"\n");
        let d = plan(
            &ha,
            "pi",
            "s",
            &[
                PipelineInfo { name: "a", kind: "anomaly", model: "m", outputs: &label },
                PipelineInfo { name: "b", kind: "anomaly", model: "m", outputs: &none },
                PipelineInfo { name: "c", kind: "detect", model: "yolo", outputs: &model },
            ],
        );
        assert_eq!(d.configs.len(), 1);
        assert_eq!(d.configs[0].topic, "homeassistant/sensor/edgeinfer_pi/c_detections/config");
        assert_eq!(d.configs[0].payload["state_topic"], "x/pi/yolo");
    }

    #[test]
    fn every_kind_has_entities_and_names_collide_safely() {
        assert_eq!(entities("anomaly")[1].component, "binary_sensor");
        assert_eq!(entities("values").len(), 1);
        assert!(entities("other").is_empty());
        let outs = outputs("[[outputs]]\ntype = \"mqtt\"\n");
        let p = |name| PipelineInfo { name, kind: "values", model: "m", outputs: &outs };
        let d = plan(&HomeAssistantConfig::default(), "pi", "s", &[p("a.b"), p("a_b")]);
        assert_eq!(d.configs.len(), 1);
    }
}
