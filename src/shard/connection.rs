//! What one WebSocket connection says and how the server answers: client
//! messages (`subscribe`, `unsubscribe`, `ping`), control frames, error
//! replies, and the decision to close. The reactor (`shard::reactor`) reads
//! and decodes; this module only decides.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::Shard;
use crate::limits::BAD_MESSAGES_IN_A_ROW_MAX;
use crate::protocol::deflate::InflateError;
use crate::protocol::ws::{self, CloseCode, Message, WsError};
use crate::registry::{ConnKey, Frame, SubscribeError};

/// How a connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Drop the socket without a close frame.
    Abort,
    /// Send our close frame with this code, then wait for the peer's.
    CloseByUs(CloseCode, &'static str),
    /// The peer sent a close frame (with this code, as it came): answer it
    /// and drop the socket.
    CloseByPeer(u16),
}

/// The reason sent with 4003 when the key is still active and the session
/// the connection signed in with was signed out (a revoked key's 4003 says
/// "key revoked", [`CloseCode::server_reason`]).
pub const CLOSE_SIGNED_OUT_REASON: &str = "signed out";

/// The reason sent with 4003 when the session the connection signed in
/// with has expired (PROTOCOL.md §2).
pub const CLOSE_SESSION_EXPIRED_REASON: &str = "session expired";

/// The reason text sent with a protocol-error close.
pub fn error_reason(error: WsError) -> &'static str {
    match error.close_code() {
        CloseCode::INVALID_PAYLOAD => "invalid UTF-8",
        CloseCode::MESSAGE_TOO_BIG => "message too big",
        _ => "protocol error",
    }
}

/// Handles one message; `Some` ends the connection.
pub fn handle(shard: &Shard, key: ConnKey, message: Message<'_>) -> Option<Outcome> {
    let mut registry = shard.registry.borrow_mut();
    let conn = registry.get_mut(key)?;
    conn.missed_pongs = 0;
    match message {
        Message::Text(text) => {
            drop(registry);
            handle_text(shard, key, text)
        }
        Message::Binary(_) | Message::Compressed { binary: true, .. } => Some(Outcome::CloseByUs(
            CloseCode::UNSUPPORTED_DATA,
            "binary messages are not supported",
        )),
        Message::Compressed {
            binary: false,
            payload,
        } => {
            drop(registry);
            // Inflated by the shard's one inflater, into at most the
            // client message limit: a zip bomb stops there.
            let mut inflater = shard.inflater.borrow_mut();
            let text = match inflater.inflate(payload, shard.config.client_message_bytes) {
                Ok(inflated) => inflated,
                Err(InflateError::TooBig) => {
                    return Some(Outcome::CloseByUs(
                        CloseCode::MESSAGE_TOO_BIG,
                        "message too big",
                    ))
                }
                Err(InflateError::Invalid) => {
                    return Some(Outcome::CloseByUs(
                        CloseCode::INVALID_PAYLOAD,
                        "invalid compressed data",
                    ))
                }
            };
            let Ok(text) = std::str::from_utf8(text) else {
                return Some(Outcome::CloseByUs(
                    CloseCode::INVALID_PAYLOAD,
                    "invalid UTF-8",
                ));
            };
            handle_text(shard, key, text)
        }
        Message::Ping(payload) => {
            let mut frame = [0u8; 14];
            let len = ws::encode_header(
                &mut frame,
                true,
                ws::Opcode::Pong,
                payload.len() as u64,
                None,
            );
            let mut pong = Vec::with_capacity(len + payload.len());
            pong.extend_from_slice(&frame[..len]);
            pong.extend_from_slice(payload);
            registry.enqueue(key, &Frame::from(pong));
            None
        }
        Message::Pong(_) => None,
        Message::Close(frame) => Some(Outcome::CloseByPeer(frame.map(|f| f.code).unwrap_or(1000))),
    }
}

/// A client message's fields, each kept as raw JSON so that a field of the
/// wrong type gets its own error (the serde derive would reject the whole
/// message). Other fields are ignored; a `null` field counts as absent.
#[derive(Deserialize)]
struct RawClientMessage<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<&'a RawValue>,
    #[serde(borrow)]
    channel: Option<&'a RawValue>,
    #[serde(borrow)]
    after: Option<&'a RawValue>,
}

/// A JSON string, borrowed from the message when it has no escapes.
#[derive(Deserialize)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

fn as_text(raw: &RawValue) -> Option<Cow<'_, str>> {
    serde_json::from_str::<Text<'_>>(raw.get())
        .ok()
        .map(|text| text.0)
}

/// What a client asked for, once its fields have the right types.
enum ClientMessage<'a> {
    Ping,
    Subscribe {
        channel: Cow<'a, str>,
        after: Option<u64>,
    },
    Unsubscribe {
        channel: Cow<'a, str>,
    },
}

const TYPES: &str = "type must be subscribe, unsubscribe or ping";

/// Reads a client message; `Err` is the error reply. The type decides which
/// other fields matter: `ping` ignores `channel` and `after`, `unsubscribe`
/// ignores `after`.
fn parse_client_message(text: &str) -> Result<ClientMessage<'_>, Frame> {
    if !looks_like_object(text) {
        return Err(error_reply(
            "invalid_json",
            "message is not a JSON object",
            None,
        ));
    }
    let raw = match serde_json::from_str::<RawClientMessage<'_>>(text) {
        Ok(raw) => raw,
        Err(e) if e.is_data() => {
            // With every field raw, only a repeated field is a data error.
            return Err(error_reply(
                "invalid_json",
                "message has a repeated field",
                None,
            ));
        }
        Err(_) => {
            return Err(error_reply(
                "invalid_json",
                "message is not a JSON object",
                None,
            ))
        }
    };
    let Some(kind) = raw.kind else {
        return Err(error_reply(
            "unknown_type",
            "type is required; it must be subscribe, unsubscribe or ping",
            None,
        ));
    };
    let Some(kind) = as_text(kind) else {
        return Err(error_reply(
            "unknown_type",
            "type must be a string: subscribe, unsubscribe or ping",
            None,
        ));
    };
    let subscribe = match kind.as_ref() {
        "ping" => return Ok(ClientMessage::Ping),
        "subscribe" => true,
        "unsubscribe" => false,
        _ => return Err(error_reply("unknown_type", TYPES, None)),
    };
    let Some(channel) = raw.channel else {
        return Err(error_reply("unknown_channel", "channel is required", None));
    };
    let Some(channel) = as_text(channel) else {
        return Err(error_reply(
            "unknown_channel",
            "channel must be a string",
            None,
        ));
    };
    if !is_valid_channel(&channel) {
        return Err(error_reply(
            "unknown_channel",
            "no such channel",
            Some(&channel),
        ));
    }
    if !subscribe {
        return Ok(ClientMessage::Unsubscribe { channel });
    }
    let after = match raw.after {
        None => None,
        Some(after) => match serde_json::from_str::<u64>(after.get()) {
            Ok(after) => Some(after),
            Err(_) => {
                return Err(error_reply(
                    "invalid_json",
                    "after must be a seq: an integer from 0 to 18446744073709551615",
                    Some(&channel),
                ))
            }
        },
    };
    Ok(ClientMessage::Subscribe { channel, after })
}

pub use crate::message::is_valid_channel;

fn reply(json: &str) -> Frame {
    Frame::from(crate::message::text_frame(json.as_bytes()))
}

fn error_reply(code: &str, message: &str, channel: Option<&str>) -> Frame {
    // Built by hand so that `type` comes first, as in every other message.
    let quote = |text: &str| serde_json::Value::from(text).to_string();
    let mut json = format!(
        r#"{{"type":"error","code":"{code}","message":{}"#,
        quote(message)
    );
    if let Some(channel) = channel {
        json.push_str(&format!(r#","channel":{}"#, quote(channel)));
    }
    json.push('}');
    reply(&json)
}

/// True when `text` starts (after JSON whitespace) like a JSON object.
/// serde's derived `Deserialize` also accepts a struct written as an array
/// of its fields in order, so `["subscribe","events",null]` would otherwise
/// pass as a subscribe; every client message is an object.
fn looks_like_object(text: &str) -> bool {
    text.trim_start_matches([' ', '\t', '\n', '\r'])
        .starts_with('{')
}

fn handle_text(shard: &Shard, key: ConnKey, text: &str) -> Option<Outcome> {
    let answer =
        parse_client_message(text).and_then(|message| client_message(shard, key, &message));
    let outcome = answer_with(shard, key, answer);
    // A `subscribe` with `after` a few messages back: its replay is queued
    // behind the reply now, so both leave in one write.
    super::replay::run_cached(shard);
    outcome
}

/// Queues the answer to a client message (counting bad ones in a row).
fn answer_with(shard: &Shard, key: ConnKey, answer: Result<Frame, Frame>) -> Option<Outcome> {
    let mut registry = shard.registry.borrow_mut();
    let conn = registry.get_mut(key)?;
    let frame = match answer {
        Ok(frame) => {
            conn.bad_messages_in_row = 0;
            frame
        }
        Err(frame) => {
            conn.bad_messages_in_row = conn.bad_messages_in_row.saturating_add(1);
            if u32::from(conn.bad_messages_in_row) >= BAD_MESSAGES_IN_A_ROW_MAX {
                registry.enqueue(key, &frame);
                return Some(Outcome::CloseByUs(
                    CloseCode::POLICY,
                    "too many bad messages",
                ));
            }
            frame
        }
    };
    registry.enqueue(key, &frame);
    None
}

/// Acts on one well-formed client message; `Err` is an error reply.
fn client_message(
    shard: &Shard,
    key: ConnKey,
    message: &ClientMessage<'_>,
) -> Result<Frame, Frame> {
    match message {
        ClientMessage::Ping => Ok(reply(r#"{"type":"pong"}"#)),
        ClientMessage::Subscribe { channel, after } => {
            if after.is_some() || shard.replays.is_replaying(key, channel) {
                // Replay from history first, then live (shard::replay).
                return super::replay::subscribe(shard, key, channel, *after);
            }
            let mut registry = shard.registry.borrow_mut();
            match registry.subscribe(key, channel) {
                Err(SubscribeError::TooMany) => Err(error_reply(
                    "too_many_subscriptions",
                    &format!(
                        "at most {} subscriptions per connection",
                        registry.limits.subscriptions_max
                    ),
                    Some(channel),
                )),
                Ok(_) => Ok(reply(&format!(
                    r#"{{"type":"subscribed","channel":"{channel}"}}"#
                ))),
            }
        }
        ClientMessage::Unsubscribe { channel } => {
            shard.replays.cancel(key, channel);
            shard.registry.borrow_mut().unsubscribe(key, channel);
            Ok(reply(&format!(
                r#"{{"type":"unsubscribed","channel":"{channel}"}}"#
            )))
        }
    }
}
