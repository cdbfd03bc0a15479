//! What the MQTT client (`sink::mqtt`) and the embedded broker (`broker`)
//! must agree on. The start of the top-level MQTT module the connection, its
//! driver and the disk store are to move into (docs/development.md).

/// Largest packet sent or accepted (an image frame on an MQTT source must fit):
/// the client's limit both ways and the embedded broker's payload limit.
pub const MAX_PACKET_BYTES: usize = 8 << 20;
