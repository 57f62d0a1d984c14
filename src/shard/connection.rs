//! The task of one WebSocket connection, from the welcome to the close.
//!
//! One task per connection both reads and waits for writability, inside a
//! single `poll_fn`: glommio's reads are readiness-based, so a pending read
//! holds no buffer — the read buffer comes from the shard's pool only while
//! bytes are being decoded, and goes back when the socket is drained.
//! Writes normally happen outside this task: the fan-out writes straight to
//! the socket (non-blocking `sendmsg`) and only when the socket is full does
//! this task wait for writability and drain the rest.

use std::borrow::Cow;
use std::future::poll_fn;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_lite::io::{AsyncRead, AsyncWrite};
use futures_lite::AsyncWriteExt;
use glommio::net::TcpStream;
use serde::Deserialize;

use super::{flush_one, Shard, CLOSE_ABORT};
use crate::limits::BAD_MESSAGES_IN_A_ROW_MAX;
use crate::protocol::ws::{self, Decoder, DecoderConfig, Message, WsError};
use crate::registry::{ConnKey, Flush, Frame, SubscribeError};

/// Close code after 20 bad messages in a row, and for missed heartbeats.
pub const CLOSE_POLICY: u16 = 1008;
/// Close code for a binary message (the protocol is JSON text only).
pub const CLOSE_BINARY: u16 = 1003;
/// Close code when the heartbeat went unanswered for two intervals.
pub const CLOSE_HEARTBEAT: u16 = 1008;
/// How long a closing connection may take to finish the close handshake.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// What woke the connection task.
enum Event {
    /// New bytes are in the read buffer.
    Read,
    /// The peer closed the TCP connection or it failed.
    Gone,
    /// The server asked to close with this code.
    Close(u16),
}

/// How the connection ends.
enum Outcome {
    /// Drop the socket without a close frame.
    Abort,
    /// Send our close frame with this code, then wait for the peer's.
    CloseByUs(u16, &'static str),
    /// The peer sent a close frame: answer it and drop the socket.
    CloseByPeer(u16),
}

/// The read side of a connection task: its decoder and (while bytes are
/// in flight) its read buffer.
struct Reader {
    decoder: Decoder,
    buffer: Option<Vec<u8>>,
    filled: usize,
}

/// Runs a connection until it closes, then removes it from the registry.
pub async fn run(shard: Rc<Shard>, key: ConnKey, mut stream: TcpStream, leftover: Vec<u8>) {
    let mut reader = Reader {
        decoder: Decoder::new(DecoderConfig {
            message_bytes_max: shard.config.client_message_bytes,
            require_mask: true,
        }),
        filled: leftover.len(),
        buffer: None,
    };
    if !leftover.is_empty() {
        let mut buffer = shard.take_buffer();
        if leftover.len() > buffer.len() {
            buffer.resize(leftover.len(), 0);
        }
        buffer[..leftover.len()].copy_from_slice(&leftover);
        reader.buffer = Some(buffer);
    }
    let outcome = loop {
        if reader.filled > 0 {
            if let Some(outcome) = process(&shard, key, &mut reader) {
                break outcome;
            }
        }
        let event = poll_fn(|cx| poll_event(&shard, key, &mut stream, &mut reader, cx)).await;
        match event {
            Event::Read => continue,
            Event::Gone => break Outcome::Abort,
            Event::Close(CLOSE_ABORT) => break Outcome::Abort,
            Event::Close(code) => break Outcome::CloseByUs(code, close_reason(code)),
        }
    };
    finish(&shard, key, &mut stream, &mut reader, outcome).await;
    if let Some(buffer) = reader.buffer.take() {
        shard.return_buffer(buffer);
    }
    shard.registry.borrow_mut().remove(key);
}

fn close_reason(code: u16) -> &'static str {
    match code {
        1001 => "server shutting down",
        1013 => "slow consumer",
        4003 => "key revoked",
        1008 => "policy violation",
        _ => "",
    }
}

fn poll_event(
    shard: &Shard,
    key: ConnKey,
    stream: &mut TcpStream,
    reader: &mut Reader,
    cx: &mut Context<'_>,
) -> Poll<Event> {
    {
        let mut registry = shard.registry.borrow_mut();
        let Some(conn) = registry.get_mut(key) else {
            return Poll::Ready(Event::Gone);
        };
        if !conn.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            conn.waker = Some(cx.waker().clone());
        }
        if let Some(code) = conn.close {
            return Poll::Ready(Event::Close(code));
        }
        // The fan-out found the socket full: wait for writability here.
        while registry.get(key).is_some_and(|c| c.write_blocked) {
            let conn = registry.get(key).expect("checked above");
            let front = conn
                .queue
                .front()
                .expect("a blocked connection has a queue");
            let pending = Pin::new(&mut *stream).poll_write(cx, &front[conn.front_sent as usize..]);
            match pending {
                Poll::Pending => break,
                Poll::Ready(Err(_)) => return Poll::Ready(Event::Gone),
                Poll::Ready(Ok(written)) => {
                    registry.wrote(key, written);
                    match registry.flush(key.index, &mut super::send_vectored) {
                        Flush::Drained | Flush::Blocked => {}
                        Flush::Failed => return Poll::Ready(Event::Gone),
                    }
                }
            }
        }
    }
    let buffer = reader.buffer.get_or_insert_with(|| shard.take_buffer());
    if reader.filled == buffer.len() {
        // A frame larger than the buffer is on its way: `process` already
        // checked it against the message limit, so growing is bounded.
        let hint = Decoder::frame_len_hint(&buffer[..reader.filled]).unwrap_or(buffer.len() * 2);
        buffer.resize(hint.max(reader.filled + 1), 0);
    }
    match Pin::new(&mut *stream).poll_read(cx, &mut buffer[reader.filled..]) {
        Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => Poll::Ready(Event::Gone),
        Poll::Ready(Ok(read)) => {
            reader.filled += read;
            Poll::Ready(Event::Read)
        }
        Poll::Pending => {
            if reader.filled == 0 {
                // Hibernate: an idle connection holds no read buffer.
                if let Some(buffer) = reader.buffer.take() {
                    shard.return_buffer(buffer);
                }
            }
            Poll::Pending
        }
    }
}

/// Decodes and handles every complete frame in the read buffer.
fn process(shard: &Shard, key: ConnKey, reader: &mut Reader) -> Option<Outcome> {
    let buffer = reader
        .buffer
        .as_mut()
        .expect("bytes were read into a buffer");
    let mut start = 0;
    let mut outcome = None;
    while start < reader.filled {
        match reader.decoder.decode(&mut buffer[start..reader.filled]) {
            Ok(None) => break,
            Ok(Some(decoded)) => {
                start += decoded.consumed;
                if let Some(message) = decoded.message {
                    if let Some(end) = handle(shard, key, message) {
                        outcome = Some(end);
                        break;
                    }
                }
            }
            Err(error) => {
                outcome = Some(Outcome::CloseByUs(error.close_code(), error_reason(error)));
                break;
            }
        }
    }
    buffer.copy_within(start..reader.filled, 0);
    reader.filled -= start;
    if reader.filled > 0 {
        if let Some(needed) = Decoder::frame_len_hint(&buffer[..reader.filled]) {
            if needed > buffer.len() {
                buffer.resize(needed, 0);
            }
        }
    } else if buffer.len() != super::READ_BUFFER_BYTES {
        // A big frame grew the buffer; don't keep the growth.
        reader.buffer = None;
    }
    let mut registry = shard.registry.borrow_mut();
    flush_one(&mut registry, key.index);
    outcome
}

fn error_reason(error: WsError) -> &'static str {
    match error.close_code() {
        1007 => "invalid UTF-8",
        1009 => "message too big",
        _ => "protocol error",
    }
}

/// Handles one message; `Some` ends the connection.
fn handle(shard: &Shard, key: ConnKey, message: Message<'_>) -> Option<Outcome> {
    let mut registry = shard.registry.borrow_mut();
    let conn = registry.get_mut(key)?;
    conn.missed_pongs = 0;
    match message {
        Message::Text(text) => {
            drop(registry);
            handle_text(shard, key, text)
        }
        Message::Binary(_) => Some(Outcome::CloseByUs(
            CLOSE_BINARY,
            "binary messages are not supported",
        )),
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
            registry.enqueue(key.index, &Frame::from(pong));
            None
        }
        Message::Pong(_) => None,
        Message::Close(frame) => Some(Outcome::CloseByPeer(frame.map(|f| f.code).unwrap_or(1000))),
    }
}

#[derive(Deserialize)]
struct ClientMessage<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    channel: Option<Cow<'a, str>>,
    after: Option<u64>,
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

fn reply(json: &str) -> Frame {
    Frame::from(crate::registry::text_frame(json.as_bytes()))
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

fn handle_text(shard: &Shard, key: ConnKey, text: &str) -> Option<Outcome> {
    let answer = match serde_json::from_str::<ClientMessage<'_>>(text) {
        Err(_) => Err(error_reply(
            "invalid_json",
            "message is not a JSON object",
            None,
        )),
        Ok(message) => client_message(shard, key, &message),
    };
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
                registry.enqueue(key.index, &frame);
                return Some(Outcome::CloseByUs(CLOSE_POLICY, "too many bad messages"));
            }
            frame
        }
    };
    registry.enqueue(key.index, &frame);
    None
}

/// Acts on one well-formed client message; `Err` is an error reply.
fn client_message(
    shard: &Shard,
    key: ConnKey,
    message: &ClientMessage<'_>,
) -> Result<Frame, Frame> {
    let kind = message.kind.as_deref().unwrap_or("");
    match kind {
        "ping" => Ok(reply(r#"{"type":"pong"}"#)),
        "subscribe" | "unsubscribe" => {
            let Some(channel) = message.channel.as_deref() else {
                return Err(error_reply("unknown_channel", "channel is required", None));
            };
            if !is_valid_channel(channel) {
                return Err(error_reply(
                    "unknown_channel",
                    "no such channel",
                    Some(channel),
                ));
            }
            if kind == "subscribe"
                && (message.after.is_some() || shard.history.is_replaying(key, channel))
            {
                // Replay from history first, then live (history::replay).
                return crate::history::replay::subscribe(shard, key, channel, message.after);
            }
            let mut registry = shard.registry.borrow_mut();
            if kind == "unsubscribe" {
                shard.history.cancel_replay(key, channel);
                registry.unsubscribe(key, channel);
                return Ok(reply(&format!(
                    r#"{{"type":"unsubscribed","channel":"{channel}"}}"#
                )));
            }
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
        _ => Err(error_reply(
            "unknown_type",
            "type must be subscribe, unsubscribe or ping",
            None,
        )),
    }
}

/// Ends a connection according to `outcome`, within `CLOSE_LINGER`.
async fn finish(
    shard: &Shard,
    key: ConnKey,
    stream: &mut TcpStream,
    reader: &mut Reader,
    outcome: Outcome,
) {
    let (code, reason) = match outcome {
        Outcome::Abort => return,
        Outcome::CloseByUs(code, reason) => (code, reason),
        Outcome::CloseByPeer(code) => (
            if ws::is_valid_close_code(code) {
                code
            } else {
                1000
            },
            "",
        ),
    };
    // Whatever is still queued goes first, then the close frame.
    let mut pending = Vec::new();
    {
        let mut registry = shard.registry.borrow_mut();
        let Some(conn) = registry.get_mut(key) else {
            return;
        };
        conn.close.get_or_insert(code);
        let mut first = true;
        for frame in conn.queue.drain(..) {
            let start = if first { conn.front_sent as usize } else { 0 };
            first = false;
            pending.extend_from_slice(&frame[start..]);
        }
        conn.queue_bytes = 0;
        conn.front_sent = 0;
    }
    let mut close = [0u8; ws::CLOSE_FRAME_BYTES_MAX];
    let len = ws::encode_close_frame(&mut close, code, reason);
    pending.extend_from_slice(&close[..len]);
    let write = async {
        if stream.write_all(&pending).await.is_err() {
            return;
        }
        if matches!(outcome, Outcome::CloseByPeer(_)) {
            return;
        }
        // Wait for the peer's close frame (or EOF), discarding data.
        let mut buffer = reader.buffer.take().unwrap_or_else(|| shard.take_buffer());
        let mut decoder = Decoder::new(DecoderConfig {
            message_bytes_max: usize::MAX / 2,
            require_mask: false,
        });
        let mut filled = 0;
        loop {
            if filled == buffer.len() {
                filled = 0;
            }
            match futures_lite::AsyncReadExt::read(stream, &mut buffer[filled..]).await {
                Ok(0) | Err(_) => break,
                Ok(read) => filled += read,
            }
            let mut start = 0;
            let mut closed = false;
            while let Ok(Some(decoded)) = decoder.decode(&mut buffer[start..filled]) {
                start += decoded.consumed;
                if matches!(decoded.message, Some(Message::Close(_))) {
                    closed = true;
                    break;
                }
            }
            if closed {
                break;
            }
            buffer.copy_within(start..filled, 0);
            filled -= start;
        }
        shard.return_buffer(buffer);
    };
    let _ = glommio::timer::timeout(CLOSE_LINGER, async {
        write.await;
        Ok(())
    })
    .await;
}
