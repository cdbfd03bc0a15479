//! What the MQTT client (`sink::mqtt`), the embedded broker (`broker`) and
//! the config checks must agree on: the packet limit and what a topic is.
//! It is the start of the top-level MQTT module that the connection, its
//! driver and the disk store are to move into (docs/development.md).

/// Largest packet sent or accepted (an image frame on an MQTT source must fit):
/// the client's limit both ways and the embedded broker's payload limit.
pub const MAX_PACKET_BYTES: usize = 8 << 20;

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
