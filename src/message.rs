//! What a message is, in one place: its kinds, which channels it targets,
//! which channel names exist, and how it is rendered for a subscriber
//! (`{"type","channel","seq","data"}`, PROTOCOL.md §3). Used by the
//! publish parser, the registry's fan-out, the history and the connection
//! code alike.

use std::rc::Rc;

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
    /// `idempotency_key` (at most 128 bytes): a retry with the same key
    /// within the window answers the original seq and is not stored or
    /// delivered again (PROTOCOL.md §3).
    pub idempotency_key: Option<Box<str>>,
}

/// Longest channel name a message can target: the longest prefix
/// (`collections:`) and a route id at its limit. Built on the stack.
const CHANNEL_BYTES_MAX: usize = "collections:".len() + crate::limits::ID_BYTES_MAX;

impl Message {
    /// Calls `f` with each channel this message goes to, broadest first
    /// (PROTOCOL.md §3): `events` then `events:<source_id>`, `deliveries`
    /// then `deliveries:<destination_id>`, `issues`, `collections:<id>`.
    /// The names are composed on the stack, not allocated.
    pub fn for_each_channel(&self, mut f: impl FnMut(&str)) {
        let (broad, prefix) = match self.kind {
            MessageKind::Event => (Some("events"), Some("events:")),
            MessageKind::Delivery => (Some("deliveries"), Some("deliveries:")),
            MessageKind::Issue => (Some("issues"), None),
            MessageKind::Sync => (None, Some("collections:")),
        };
        if let Some(broad) = broad {
            f(broad);
        }
        let (Some(prefix), Some(id)) = (prefix, self.route_id.as_deref()) else {
            return;
        };
        let len = prefix.len() + id.len();
        if len > CHANNEL_BYTES_MAX {
            // Never from a validated publish (ids are at most 128 bytes).
            f(&format!("{prefix}{id}"));
            return;
        }
        let mut name = [0u8; CHANNEL_BYTES_MAX];
        name[..prefix.len()].copy_from_slice(prefix.as_bytes());
        name[prefix.len()..len].copy_from_slice(id.as_bytes());
        f(std::str::from_utf8(&name[..len]).expect("two str joined"));
    }
}

/// True when a message of `kind` with route id `route` goes to `channel`
/// (the routing of PROTOCOL.md §3).
pub fn channel_matches(channel: &str, kind: MessageKind, route: Option<&str>) -> bool {
    match channel {
        // Every message: what `hookstream cluster import` reads. Never a
        // client's channel (`is_valid_channel` refuses it).
        "*" => true,
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

/// A list of channel names compiled for matching: which of them a
/// message of a kind and route goes to, in time independent of how many
/// there are (a history read may name 256 channels and look at every one
/// of 100,000 retained messages; asking each name in turn cost 256
/// comparisons a message). Matches exactly what [`channel_matches`] says
/// for each name.
#[derive(Debug, Default)]
pub struct ChannelFilter {
    /// Indexes of `*` in the list (every message).
    all: smallvec::SmallVec<[u32; 1]>,
    /// Indexes of each kind's broad channel (`events`, `deliveries`,
    /// `issues`), by kind.
    kinds: [smallvec::SmallVec<[u32; 1]>; 4],
    /// Indexes of each route's channel (`events:<id>`, `deliveries:<id>`,
    /// `collections:<id>`), by kind and route id.
    routes: [ahash::AHashMap<Box<str>, smallvec::SmallVec<[u32; 1]>>; 4],
}

impl ChannelFilter {
    /// Compiles `channels`.
    pub fn new<S: AsRef<str>>(channels: &[S]) -> ChannelFilter {
        let mut filter = ChannelFilter::default();
        for (index, channel) in channels.iter().enumerate() {
            let index = u32::try_from(index).unwrap_or(u32::MAX);
            let channel = channel.as_ref();
            let slot = match channel {
                "*" => Some(&mut filter.all),
                "events" => Some(&mut filter.kinds[MessageKind::Event as usize]),
                "deliveries" => Some(&mut filter.kinds[MessageKind::Delivery as usize]),
                "issues" => Some(&mut filter.kinds[MessageKind::Issue as usize]),
                _ => {
                    let kind = match channel.split_once(':') {
                        Some(("events", id)) => Some((MessageKind::Event, id)),
                        Some(("deliveries", id)) => Some((MessageKind::Delivery, id)),
                        Some(("collections", id)) => Some((MessageKind::Sync, id)),
                        _ => None,
                    };
                    kind.map(|(kind, id)| {
                        filter.routes[kind as usize].entry(id.into()).or_default()
                    })
                }
            };
            if let Some(slot) = slot {
                slot.push(index);
            }
        }
        filter
    }

    /// True when a message of `kind` with route id `route` goes to one of
    /// the channels.
    pub fn matches(&self, kind: MessageKind, route: Option<&str>) -> bool {
        !self.all.is_empty()
            || !self.kinds[kind as usize].is_empty()
            || route.is_some_and(|route| self.routes[kind as usize].contains_key(route))
    }

    /// The indexes in the compiled list of the channels a message of
    /// `kind` with route id `route` goes to, in list order.
    pub fn matching(&self, kind: MessageKind, route: Option<&str>) -> smallvec::SmallVec<[u32; 4]> {
        let mut found: smallvec::SmallVec<[u32; 4]> = smallvec::SmallVec::new();
        found.extend_from_slice(&self.all);
        found.extend_from_slice(&self.kinds[kind as usize]);
        if let Some(indexes) = route.and_then(|route| self.routes[kind as usize].get(route)) {
            found.extend_from_slice(indexes);
        }
        found.sort_unstable();
        found
    }
}

/// True when `id` matches `[A-Za-z0-9_.-]{1,128}`.
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= crate::limits::ID_BYTES_MAX
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
}

/// True for the channel names of PROTOCOL.md §2.
pub fn is_valid_channel(name: &str) -> bool {
    match name {
        "events" | "deliveries" | "issues" => true,
        _ => match name.split_once(':') {
            Some(("events" | "deliveries" | "collections", id)) => is_valid_id(id),
            _ => false,
        },
    }
}

/// A complete server frame (or, once, the 101 answer), shared by every
/// connection it is written or queued to.
pub type Frame = Rc<[u8]>;

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

/// The decimal digits of `n`, in a stack buffer from the returned index.
fn decimal(n: u64) -> ([u8; 20], usize) {
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
    (digits, i)
}

/// The pieces of `{"type":…,"channel":…,"seq":…,"data":…}`, in order.
/// Channel names are restricted to `[A-Za-z0-9_.:-]`, so they need no
/// escaping; `data` is the publisher's JSON text.
fn envelope<'a>(
    kind: MessageKind,
    channel: &'a str,
    seq_digits: &'a [u8],
    data: &'a str,
) -> [&'a [u8]; 9] {
    debug_assert!(channel
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b)));
    [
        b"{\"type\":\"",
        kind.as_str().as_bytes(),
        b"\",\"channel\":\"",
        channel.as_bytes(),
        b"\",\"seq\":",
        seq_digits,
        b",\"data\":",
        data.as_bytes(),
        b"}",
    ]
}

/// Renders the envelope of `data` on `channel` as one complete text frame.
pub fn render_message(kind: MessageKind, channel: &str, seq: u64, data: &str) -> Vec<u8> {
    let (digits, from) = decimal(seq);
    let parts = envelope(kind, channel, &digits[from..], data);
    let json_len: usize = parts.iter().map(|p| p.len()).sum();
    let mut header = [0u8; 14];
    let header_len = ws::encode_header(&mut header, true, ws::Opcode::Text, json_len as u64, None);
    let mut frame = Vec::with_capacity(header_len + json_len);
    frame.extend_from_slice(&header[..header_len]);
    for part in parts {
        frame.extend_from_slice(part);
    }
    frame
}

/// [`render_message`] straight into the shared [`Frame`]: one allocation,
/// no copy (the fan-out's staging renders every frame this way).
pub fn render_frame(kind: MessageKind, channel: &str, seq: u64, data: &str) -> Frame {
    let (digits, from) = decimal(seq);
    let parts = envelope(kind, channel, &digits[from..], data);
    let json_len: usize = parts.iter().map(|p| p.len()).sum();
    let mut header = [0u8; 14];
    let header_len = ws::encode_header(&mut header, true, ws::Opcode::Text, json_len as u64, None);
    let len = header_len + json_len;
    let mut frame = Rc::<[u8]>::new_uninit_slice(len);
    let out = Rc::get_mut(&mut frame).expect("a new Rc is unique");
    let mut at = 0;
    for part in std::iter::once(&header[..header_len]).chain(parts) {
        let slots = &mut out[at..at + part.len()];
        // SAFETY: `slots` is exactly `part.len()` bytes of the new frame
        // (the slice above is bounds-checked), `MaybeUninit<u8>` has the
        // layout of `u8`, and the frame cannot overlap `part`.
        unsafe {
            std::ptr::copy_nonoverlapping(part.as_ptr(), slots.as_mut_ptr().cast(), part.len());
        }
        at += part.len();
    }
    assert_eq!(at, len, "every byte of the frame written");
    // SAFETY: the loop above wrote all `len` bytes (asserted).
    unsafe { frame.assume_init() }
}

/// Appends the decimal digits of `n`.
pub fn push_u64(out: &mut Vec<u8>, n: u64) {
    let (digits, from) = decimal(n);
    out.extend_from_slice(&digits[from..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: MessageKind, route: Option<&str>) -> Message {
        Message {
            org_id: "org_a".to_string(),
            kind,
            route_id: route.map(str::to_string),
            data: "{}".into(),
            idempotency_key: None,
        }
    }

    fn targets(message: &Message) -> Vec<String> {
        let mut out = Vec::new();
        message.for_each_channel(|name| out.push(name.to_string()));
        out
    }

    #[test]
    fn every_kind_targets_its_channels_broadest_first() {
        use MessageKind::*;
        assert_eq!(targets(&message(Event, Some("s"))), ["events", "events:s"]);
        assert_eq!(targets(&message(Event, None)), ["events"]);
        assert_eq!(
            targets(&message(Delivery, Some("d"))),
            ["deliveries", "deliveries:d"]
        );
        assert_eq!(targets(&message(Issue, Some("i"))), ["issues"]);
        assert_eq!(targets(&message(Sync, Some("c"))), ["collections:c"]);
        assert!(targets(&message(Sync, None)).is_empty());
        let long = "x".repeat(crate::limits::ID_BYTES_MAX);
        assert_eq!(
            targets(&message(Sync, Some(&long))),
            [format!("collections:{long}")]
        );
        let longer = "y".repeat(crate::limits::ID_BYTES_MAX + 50);
        assert_eq!(
            targets(&message(Event, Some(&longer)))[1],
            format!("events:{longer}")
        );
        for name in targets(&message(Delivery, Some("d_1.x-2"))) {
            assert!(is_valid_channel(&name), "{name}");
            assert!(channel_matches(&name, Delivery, Some("d_1.x-2")));
        }
    }

    #[test]
    fn the_shared_frame_is_byte_for_byte_the_rendered_one() {
        // Around the 7-bit and 16-bit payload length boundaries.
        for data_len in [0, 1, 60, 70, 100, 125, 126, 200, 65_400, 65_535, 65_600] {
            let data = format!("\"{}\"", "d".repeat(data_len));
            for seq in [0, 9, 10, 12_345, u64::MAX] {
                let vec = render_message(MessageKind::Issue, "issues", seq, &data);
                let shared = render_frame(MessageKind::Issue, "issues", seq, &data);
                assert_eq!(&vec[..], &shared[..], "data {data_len}, seq {seq}");
            }
        }
    }

    /// The compiled filter says what asking each name in turn says, for
    /// every kind and route against lists built from every kind of name
    /// (broad, routed, `*`, unknown, repeated).
    #[test]
    fn a_channel_filter_matches_exactly_what_channel_matches_says() {
        use MessageKind::*;
        let names = [
            "events",
            "events:a",
            "events:b",
            "deliveries",
            "deliveries:a",
            "issues",
            "collections:a",
            "collections:b",
            "*",
            "nonsense",
            "events:",
            "issues:a",
            "events:a",
        ];
        let messages = [
            (Event, Some("a")),
            (Event, Some("b")),
            (Event, Some("c")),
            (Event, None),
            (Delivery, Some("a")),
            (Delivery, None),
            (Issue, None),
            (Issue, Some("a")),
            (Sync, Some("a")),
            (Sync, Some("b")),
            (Sync, None),
        ];
        // Every list of up to three names (with repeats), in every order.
        let mut level: Vec<Vec<&str>> = vec![vec![]];
        let mut lists = level.clone();
        for _ in 0..3 {
            level = level
                .iter()
                .flat_map(|list| {
                    names.iter().map(move |&name| {
                        let mut next = list.clone();
                        next.push(name);
                        next
                    })
                })
                .collect();
            lists.extend(level.iter().cloned());
        }
        let mut checked = 0;
        for list in &lists {
            let filter = ChannelFilter::new(list);
            for &(kind, route) in &messages {
                let expected: Vec<u32> = (0..list.len() as u32)
                    .filter(|&i| channel_matches(list[i as usize], kind, route))
                    .collect();
                assert_eq!(
                    filter.matches(kind, route),
                    !expected.is_empty(),
                    "{list:?} {kind:?} {route:?}"
                );
                assert_eq!(filter.matching(kind, route).to_vec(), expected, "{list:?}");
                checked += 1;
            }
        }
        assert!(checked > 20_000, "{checked}");
    }
}
