//! A peer gateway for the issue 6 benchmarks: the part of hookstream's
//! contract (docs/PROTOCOL.md §2–§3) the scenarios use, written the way a
//! Rust team would write it on tokio:
//!
//! - `GET /v1/ws?token=KEY` is upgraded by tokio-tungstenite (401 without the
//!   key); the first message is the `welcome`;
//! - `{"type":"subscribe","channel":"events"}` → `subscribed`, after which the
//!   connection's task holds a `tokio::sync::broadcast` receiver;
//! - `POST /v1/publish` on the admin listener (axum, `Authorization: Bearer`)
//!   with one event or a JSON array of events: each gets the next seq, is
//!   rendered ONCE into a `Message::Text` whose bytes are reference-counted,
//!   and that message goes into the broadcast channel; every subscriber's
//!   task feeds whatever is waiting into its sink and flushes once, so a
//!   batch leaves in few writes;
//! - a subscriber that falls a whole channel capacity behind is closed with
//!   1013 (slow consumer), as hookstream does past its queue limit;
//! - a ping every `--heartbeat-ms`, closing connections silent for two.

// tungstenite's handshake callback returns `Result<Response, ErrorResponse>`
// by its own signature; the large error type is not ours to shrink.
#![allow(clippy::result_large_err)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser, Debug)]
#[command(name = "tokio-gw", about = "tokio + tokio-tungstenite peer gateway")]
struct Args {
    /// Public (WebSocket) listener.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Admin (publish) listener.
    #[arg(long, default_value = "127.0.0.1:8081")]
    admin_listen: SocketAddr,
    /// The API key clients present as `?token=`.
    #[arg(long)]
    token: String,
    /// The admin token for `POST /v1/publish`.
    #[arg(long)]
    admin_token: String,
    /// The org of that key.
    #[arg(long, default_value = "bench")]
    org: String,
    /// Runtime worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// tungstenite read buffer per connection (its default is 128 KiB).
    #[arg(long, default_value_t = 128 * 1024)]
    read_buffer: usize,
    /// Messages a subscriber may fall behind before it is closed (1013).
    #[arg(long, default_value_t = 65_536)]
    channel_capacity: usize,
    /// Heartbeat interval.
    #[arg(long, default_value_t = 30_000)]
    heartbeat_ms: u64,
}

struct Gateway {
    args: Args,
    /// The org's latest seq; held while a message is sent into the channel
    /// so channel order is seq order.
    seq: Mutex<u64>,
    /// The `events` channel.
    events: broadcast::Sender<Message>,
    next_connection: AtomicU64,
}

fn main() {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(run(args));
}

async fn run(args: Args) {
    let (events, _) = broadcast::channel(args.channel_capacity);
    let public = TcpListener::bind(args.listen)
        .await
        .unwrap_or_else(|e| panic!("--listen {}: {e}", args.listen));
    let admin = TcpListener::bind(args.admin_listen)
        .await
        .unwrap_or_else(|e| panic!("--admin-listen {}: {e}", args.admin_listen));
    let gateway = Arc::new(Gateway {
        args,
        seq: Mutex::new(0),
        events,
        next_connection: AtomicU64::new(1),
    });
    let router = Router::new()
        .route("/v1/publish", post(publish))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(gateway.clone());
    tokio::spawn(async move {
        axum::serve(admin, router).await.expect("admin server");
    });
    eprintln!(
        "tokio-gw peer listening on ws://{}/v1/ws (admin http://{}), {} thread(s), read buffer {} B",
        gateway.args.listen, gateway.args.admin_listen, gateway.args.threads, gateway.args.read_buffer
    );
    let accept = {
        let gateway = gateway.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = public.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                tokio::spawn(connection(gateway.clone(), stream));
            }
        })
    };
    let _ = tokio::signal::ctrl_c().await;
    accept.abort();
}

/// Accepts `GET /v1/ws?token=KEY` only.
fn authorize(gateway: &Gateway, request: &Request) -> Result<(), ErrorResponse> {
    let uri = request.uri();
    let token_ok = uri.path() == "/v1/ws"
        && uri
            .query()
            .unwrap_or("")
            .split('&')
            .any(|pair| pair.strip_prefix("token=") == Some(gateway.args.token.as_str()));
    if token_ok {
        return Ok(());
    }
    let mut response = ErrorResponse::new(Some("{\"error\":\"unauthorized\"}".to_string()));
    *response.status_mut() = StatusCode::UNAUTHORIZED;
    Err(response)
}

async fn connection(gateway: Arc<Gateway>, stream: TcpStream) {
    let mut config = WebSocketConfig::default();
    config.read_buffer_size = gateway.args.read_buffer;
    config.max_message_size = Some(64 * 1024);
    let check =
        |request: &Request, response: Response| authorize(&gateway, request).map(|()| response);
    let Ok(ws) = tokio_tungstenite::accept_hdr_async_with_config(stream, check, Some(config)).await
    else {
        return;
    };
    let (mut sink, mut source) = ws.split();
    let welcome = serde_json::json!({
        "type": "welcome",
        "org_id": gateway.args.org,
        "connection_id": format!("c_{}", gateway.next_connection.fetch_add(1, Ordering::Relaxed)),
        "seq": *gateway.seq.lock().expect("seq lock"),
        "heartbeat_ms": gateway.args.heartbeat_ms,
    });
    if sink.send(Message::text(welcome.to_string())).await.is_err() {
        return;
    }
    let mut events: Option<broadcast::Receiver<Message>> = None;
    let mut heartbeat = tokio::time::interval(Duration::from_millis(gateway.args.heartbeat_ms));
    heartbeat.tick().await;
    let mut silent_intervals = 0u32;
    let mut bad_in_row = 0u32;
    let close = |code: u16, reason: &'static str| {
        Message::Close(Some(CloseFrame {
            code: CloseCode::from(code),
            reason: reason.into(),
        }))
    };
    loop {
        tokio::select! {
            incoming = source.next() => {
                silent_intervals = 0;
                let reply = match incoming {
                    Some(Ok(Message::Text(text))) => {
                        match command(&gateway, text.as_str(), &mut events) {
                            Ok(reply) => {
                                bad_in_row = 0;
                                reply
                            }
                            Err(reply) => {
                                bad_in_row += 1;
                                if bad_in_row >= 20 {
                                    let _ = sink.send(close(1008, "policy violation")).await;
                                    break;
                                }
                                reply
                            }
                        }
                    }
                    Some(Ok(Message::Binary(_))) => {
                        let _ = sink.send(close(1003, "binary message")).await;
                        break;
                    }
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                    Some(Ok(_)) => continue,
                };
                if sink.send(Message::text(reply)).await.is_err() {
                    break;
                }
            }
            message = next_event(&mut events) => {
                match message {
                    Ok(message) => {
                        // Feed everything already waiting, then write once.
                        let mut failed = sink.feed(message).await.is_err();
                        while let (false, Some(rx)) = (failed, events.as_mut()) {
                            match rx.try_recv() {
                                Ok(message) => failed = sink.feed(message).await.is_err(),
                                Err(_) => break,
                            }
                        }
                        if failed || sink.flush().await.is_err() {
                            break;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let _ = sink.send(close(1013, "slow consumer")).await;
                        break;
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
            _ = heartbeat.tick() => {
                silent_intervals += 1;
                if silent_intervals > 2 {
                    let _ = sink.send(close(1008, "heartbeat")).await;
                    break;
                }
                if sink.send(Message::Ping(Bytes::new())).await.is_err() {
                    break;
                }
            }
        }
    }
}

async fn next_event(
    events: &mut Option<broadcast::Receiver<Message>>,
) -> Result<Message, broadcast::error::RecvError> {
    match events {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

#[derive(Deserialize)]
struct ClientMessage<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    channel: Option<&'a str>,
}

/// Handles one client text message: `Ok(reply)` or `Err(error reply)`.
fn command(
    gateway: &Gateway,
    text: &str,
    events: &mut Option<broadcast::Receiver<Message>>,
) -> Result<String, String> {
    let error = |code: &str, message: &str| {
        serde_json::json!({"type": "error", "code": code, "message": message}).to_string()
    };
    let Ok(message) = serde_json::from_str::<ClientMessage>(text) else {
        return Err(error("invalid_json", "not JSON"));
    };
    match (message.kind, message.channel) {
        ("subscribe", Some("events")) => {
            if events.is_none() {
                *events = Some(gateway.events.subscribe());
            }
            Ok(r#"{"type":"subscribed","channel":"events"}"#.to_string())
        }
        ("unsubscribe", Some("events")) => {
            *events = None;
            Ok(r#"{"type":"unsubscribed","channel":"events"}"#.to_string())
        }
        ("subscribe" | "unsubscribe", _) => Err(error("unknown_channel", "unknown channel")),
        ("ping", _) => Ok(r#"{"type":"pong"}"#.to_string()),
        _ => Err(error("unknown_type", "unknown type")),
    }
}

#[derive(Deserialize)]
struct Incoming<'a> {
    org_id: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(borrow)]
    data: &'a RawValue,
}

#[derive(Deserialize)]
struct EventData<'a> {
    source_id: &'a str,
}

/// `[A-Za-z0-9_.-]{1,128}`.
fn is_id(text: &str) -> bool {
    (1..=128).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

fn answer(status: StatusCode, body: String) -> axum::response::Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn publish(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    let expected = format!("Bearer {}", gateway.args.admin_token);
    if headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()) != Some(expected.as_bytes()) {
        return answer(
            StatusCode::UNAUTHORIZED,
            r#"{"error":"unauthorized"}"#.into(),
        );
    }
    let invalid = |index: usize, reason: &str| {
        answer(
            StatusCode::BAD_REQUEST,
            serde_json::json!({"error": "invalid_message", "index": index, "reason": reason})
                .to_string(),
        )
    };
    let text = match std::str::from_utf8(&body) {
        Ok(text) => text,
        Err(_) => return invalid(0, "not UTF-8"),
    };
    let messages: Vec<Incoming> = if text.trim_start().starts_with('[') {
        match serde_json::from_str(text) {
            Ok(list) => list,
            Err(e) => return invalid(0, &e.to_string()),
        }
    } else {
        match serde_json::from_str(text) {
            Ok(one) => vec![one],
            Err(e) => return invalid(0, &e.to_string()),
        }
    };
    for (index, message) in messages.iter().enumerate() {
        if message.org_id != gateway.args.org {
            return invalid(index, "unknown org");
        }
        if message.kind != "event" {
            return invalid(index, "only events are supported by this peer");
        }
        match serde_json::from_str::<EventData>(message.data.get()) {
            Ok(data) if is_id(data.source_id) => {}
            _ => return invalid(index, "data must be an object with an id source_id"),
        }
    }
    let mut seqs = Vec::with_capacity(messages.len());
    {
        let mut seq = gateway.seq.lock().expect("seq lock");
        for message in &messages {
            *seq += 1;
            seqs.push(*seq);
            // Rendered once; every receiver gets a clone of the same bytes.
            let frame = format!(
                r#"{{"type":"event","channel":"events","seq":{},"data":{}}}"#,
                *seq,
                message.data.get()
            );
            let _ = gateway.events.send(Message::text(frame));
        }
    }
    answer(
        StatusCode::ACCEPTED,
        serde_json::json!({"accepted": seqs.len(), "seqs": seqs}).to_string(),
    )
}
