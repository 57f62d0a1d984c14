//! What a message is, in one place: its kinds, which channels it targets,
//! which channel names exist, and how it is rendered for a subscriber
//! (`{"type","channel","seq","data"}`, PROTOCOL.md §3). Used by the
//! publish parser, the registry's fan-out, the history and the connection
//! code alike.

use smallvec::SmallVec;

use crate::protocol::ws;

/// Message types of the contract and the channel prefix each routes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    /// `event` → `events`, `events:<source_id>`.
    Event,
    /// `delivery` → `deliveries`, `deliveries:<destination_id>`.
    Delivery,
    /// `issue` → `issues`.
    Issue,
    /// `sync` → `collections:<collection_id>`.
    Sync,
}

impl MessageKind {
    /// The `type` string.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageKind::Event => "event",
            MessageKind::Delivery => "delivery",
            MessageKind::Issue => "issue",
            MessageKind::Sync => "sync",
        }
    }

    /// Parses the `type` string.
    pub fn parse(text: &str) -> Option<MessageKind> {
        match text {
            "event" => Some(MessageKind::Event),
            "delivery" => Some(MessageKind::Delivery),
            "issue" => Some(MessageKind::Issue),
            "sync" => Some(MessageKind::Sync),
            _ => None,
        }
    }
}

/// A validated message ready to be sequenced and fanned out.
#[derive(Debug, Clone)]
pub struct Message {
    /// Org it belongs to.
    pub org_id: String,
    /// Its type.
    pub kind: MessageKind,
    /// `source_id`, `destination_id` or `collection_id`, by kind.
    pub route_id: Option<String>,
    /// The publisher's `data` JSON text, forwarded as is.
    pub data: Box<str>,
}

impl Message {
    /// The channels this message goes to, broadest first.
    pub fn channels(&self) -> SmallVec<[String; 2]> {
        let mut out = SmallVec::new();
        match self.kind {
            MessageKind::Event => {
                out.push("events".to_string());
                if let Some(id) = &self.route_id {
                    out.push(format!("events:{id}"));
                }
            }
            MessageKind::Delivery => {
                out.push("deliveries".to_string());
                if let Some(id) = &self.route_id {
                    out.push(format!("deliveries:{id}"));
                }
            }
            MessageKind::Issue => out.push("issues".to_string()),
            MessageKind::Sync => {
                if let Some(id) = &self.route_id {
                    out.push(format!("collections:{id}"));
                }
            }
        }
        out
    }
}

/// True when a message of `kind` with route id `route` goes to `channel`
/// (the routing of PROTOCOL.md §3).
pub fn channel_matches(channel: &str, kind: MessageKind, route: Option<&str>) -> bool {
    match channel {
        "events" => kind == MessageKind::Event,
        "deliveries" => kind == MessageKind::Delivery,
        "issues" => kind == MessageKind::Issue,
        _ => match channel.split_once(':') {
            Some(("events", id)) => kind == MessageKind::Event && route == Some(id),
            Some(("deliveries", id)) => kind == MessageKind::Delivery && route == Some(id),
            Some(("collections", id)) => kind == MessageKind::Sync && route == Some(id),
            _ => false,
        },
    }
}

/// True for the channel names of PROTOCOL.md §2.
pub fn is_valid_channel(name: &str) -> bool {
    match name {
        "events" | "deliveries" | "issues" => true,
        _ => match name.split_once(':') {
            Some(("events" | "deliveries" | "collections", id)) => crate::publish::is_valid_id(id),
            _ => false,
        },
    }
}

/// Appends the decimal digits of `n`.
pub fn push_u64(out: &mut Vec<u8>, n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// A complete server text frame holding `json`.
pub fn text_frame(json: &[u8]) -> Vec<u8> {
    let mut header = [0u8; 14];
    let header_len =
        ws::encode_header(&mut header, true, ws::Opcode::Text, json.len() as u64, None);
    let mut out = Vec::with_capacity(header_len + json.len());
    out.extend_from_slice(&header[..header_len]);
    out.extend_from_slice(json);
    out
}

/// Renders `{"type":…,"channel":…,"seq":…,"data":…}` as one complete text
/// frame. Channel names are restricted to `[A-Za-z0-9_.:-]`, so they need no
/// escaping; `data` is the publisher's JSON text.
pub fn render_message(kind: MessageKind, channel: &str, seq: u64, data: &str) -> Vec<u8> {
    debug_assert!(channel
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b)));
    let mut json = Vec::with_capacity(64 + channel.len() + data.len());
    json.extend_from_slice(b"{\"type\":\"");
    json.extend_from_slice(kind.as_str().as_bytes());
    json.extend_from_slice(b"\",\"channel\":\"");
    json.extend_from_slice(channel.as_bytes());
    json.extend_from_slice(b"\",\"seq\":");
    push_u64(&mut json, seq);
    json.extend_from_slice(b",\"data\":");
    json.extend_from_slice(data.as_bytes());
    json.push(b'}');
    let mut header = [0u8; 14];
    let header_len =
        ws::encode_header(&mut header, true, ws::Opcode::Text, json.len() as u64, None);
    let mut frame = Vec::with_capacity(header_len + json.len());
    frame.extend_from_slice(&header[..header_len]);
    frame.extend_from_slice(&json);
    frame
}
