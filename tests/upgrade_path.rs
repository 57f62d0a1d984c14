//! The upgrade path of issue 18, through real sockets: the accept's fast
//! path (the whole head read with one `recv`), connections parked in the
//! epoll set until their head arrives, the hand-over to the handshake task
//! (a head in parts, plain HTTP), and the 101 and welcome in one write.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{
    encode_frame, read_http_response, read_some, tcp_connect, upgrade_request, ServerBuilder,
    STEP_TIMEOUT,
};
use serde_json::Value;

const MASK: Option<[u8; 4]> = Some([0x11, 0x22, 0x33, 0x44]);

/// Reads until `buffer` holds an HTTP head; returns its length.
fn read_head(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> usize {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            return at + 4;
        }
        let n = read_some(stream, buffer, deadline).expect("read an answer head");
        assert!(
            n > 0,
            "EOF before an answer: {:?}",
            String::from_utf8_lossy(buffer)
        );
    }
}

/// Reads server frames (unmasked text) after the head until `count` JSON
/// messages are in; returns them.
fn read_messages(stream: &mut TcpStream, buffer: &mut Vec<u8>, count: usize) -> Vec<Value> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    let mut messages = Vec::new();
    loop {
        while buffer.len() >= 2 {
            let (len, start) = match buffer[1] & 0x7f {
                126 if buffer.len() >= 4 => {
                    (u16::from_be_bytes([buffer[2], buffer[3]]) as usize, 4)
                }
                126 => break,
                127 => panic!("no message here is that long"),
                n => (n as usize, 2),
            };
            if buffer.len() < start + len {
                break;
            }
            assert_eq!(buffer[0], 0x81, "a final text frame");
            messages.push(serde_json::from_slice(&buffer[start..start + len]).expect("JSON"));
            buffer.drain(..start + len);
        }
        if messages.len() >= count {
            return messages;
        }
        let n = read_some(stream, buffer, deadline).expect("read messages");
        assert!(n > 0, "EOF after {} messages", messages.len());
    }
}

fn assert_upgraded(head: &[u8]) {
    let head = String::from_utf8_lossy(head);
    assert!(
        head.starts_with("HTTP/1.1 101 "),
        "expected 101, got {head:?}"
    );
}

#[test]
fn a_head_and_a_subscribe_in_one_write_are_both_served() {
    let server = ServerBuilder::new().org("org_p").start();
    let key = server.key("org_p").to_string();
    let mut stream = tcp_connect(server.ws_addr);
    let mut bytes =
        upgrade_request(server.ws_addr, &format!("/v1/ws?token={key}"), &[]).into_bytes();
    bytes.extend(encode_frame(
        true,
        1,
        br#"{"type":"subscribe","channel":"events"}"#,
        MASK,
    ));
    bytes.extend(encode_frame(true, 1, br#"{"type":"ping"}"#, MASK));
    stream.write_all(&bytes).unwrap();
    let mut buffer = Vec::new();
    let head_len = read_head(&mut stream, &mut buffer);
    assert_upgraded(&buffer[..head_len]);
    buffer.drain(..head_len);
    let messages = read_messages(&mut stream, &mut buffer, 3);
    assert_eq!(messages[0]["type"], "welcome");
    assert_eq!(messages[1]["type"], "subscribed");
    assert_eq!(messages[1]["channel"], "events");
    assert_eq!(messages[2]["type"], "pong");
    // And the subscription is live.
    let seqs = server.publish_ok(&common::array(&[common::event("org_p", "e1", "s1")]));
    let message = &read_messages(&mut stream, &mut buffer, 1)[0];
    assert_eq!(message["type"], "event");
    assert_eq!(message["seq"], seqs[0]);
}

/// A stream that lets the server's answer pile up before the client's
/// first read, and records what that read returned.
struct LateFirstRead {
    stream: TcpStream,
    first_read: Option<Vec<u8>>,
}

impl Read for LateFirstRead {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.first_read.is_none() {
            std::thread::sleep(Duration::from_millis(300));
            let n = self.stream.read(buf)?;
            self.first_read = Some(buf[..n].to_vec());
            return Ok(n);
        }
        self.stream.read(buf)
    }
}

impl Write for LateFirstRead {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.stream.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.stream.flush()
    }
}

#[test]
fn the_101_and_the_welcome_in_one_read_are_parsed_by_tungstenite() {
    let server = ServerBuilder::new().org("org_r").start();
    let key = server.key("org_r");
    let stream = TcpStream::connect(server.ws_addr).unwrap();
    stream.set_read_timeout(Some(STEP_TIMEOUT)).unwrap();
    let late = LateFirstRead {
        stream,
        first_read: None,
    };
    let url = format!("ws://{}/v1/ws?token={key}", server.ws_addr);
    let (mut ws, response) = tungstenite::client(url.as_str(), late).expect("upgrade");
    assert_eq!(response.status().as_u16(), 101);
    let first = ws.get_ref().first_read.clone().expect("the handshake read");
    let text = String::from_utf8_lossy(&first);
    assert!(
        text.starts_with("HTTP/1.1 101 ") && text.contains(r#""type":"welcome""#),
        "one read brought the 101 and the welcome: {text:?}"
    );
    let welcome = ws
        .read()
        .expect("the welcome, from the handshake's leftover");
    let welcome: Value = serde_json::from_str(welcome.to_text().unwrap()).unwrap();
    assert_eq!(welcome["type"], "welcome");
    assert_eq!(welcome["org_id"], "org_r");
    ws.send(tungstenite::Message::text(r#"{"type":"ping"}"#))
        .unwrap();
    let pong: Value = serde_json::from_str(ws.read().unwrap().to_text().unwrap()).unwrap();
    assert_eq!(pong["type"], "pong");
}

/// Upgrades on `stream` after `pause` of silence, optionally sending the
/// head in two parts `split` apart; returns the welcome.
fn upgrade_after(addr: SocketAddr, key: &str, pause: Duration, split: Option<Duration>) -> Value {
    let mut stream = tcp_connect(addr);
    std::thread::sleep(pause);
    let request = upgrade_request(addr, &format!("/v1/ws?token={key}"), &[]);
    match split {
        Some(gap) => {
            let (a, b) = request.as_bytes().split_at(request.len() / 2);
            stream.write_all(a).unwrap();
            std::thread::sleep(gap);
            stream.write_all(b).unwrap();
        }
        None => stream.write_all(request.as_bytes()).unwrap(),
    }
    let mut buffer = Vec::new();
    let head_len = read_head(&mut stream, &mut buffer);
    assert_upgraded(&buffer[..head_len]);
    buffer.drain(..head_len);
    read_messages(&mut stream, &mut buffer, 1).remove(0)
}

#[test]
fn heads_that_come_late_or_in_parts_still_upgrade() {
    let server = ServerBuilder::new().org("org_l").start();
    let key = server.key("org_l");
    for (pause, split) in [
        (Duration::from_millis(300), None),
        (Duration::ZERO, Some(Duration::from_millis(200))),
        (Duration::from_millis(200), Some(Duration::from_millis(200))),
    ] {
        let welcome = upgrade_after(server.ws_addr, key, pause, split);
        assert_eq!(welcome["type"], "welcome", "{pause:?} {split:?}");
    }
    // Plain HTTP after a pause: the handshake task serves it.
    let mut stream = tcp_connect(server.ws_addr);
    std::thread::sleep(Duration::from_millis(200));
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        .unwrap();
    assert_eq!(read_http_response(&mut stream).status, 200);
}

#[test]
fn connections_waiting_for_their_head_count_against_the_address_and_are_given_back() {
    let server = ServerBuilder::new()
        .org("org_c")
        .arg("--shards", 1)
        .arg("--http-connections-per-ip", 3)
        .start();
    let key = server.key("org_c").to_string();
    let addr = server.ws_addr;
    // Clients that leave before sending anything, many times over: each
    // count is given back (a leak would refuse the address after three).
    for _ in 0..30 {
        let stream = tcp_connect(addr);
        drop(stream);
    }
    // Each is a failed handshake once the server has seen it leave (till
    // then it holds its place, as it would in the handshake task).
    server.wait_for_metric("hookstream_handshake_failures_total", 30);
    // Three silent connections hold the address's three places.
    let silent: Vec<TcpStream> = (0..3).map(|_| tcp_connect(addr)).collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut fourth = tcp_connect(addr);
    fourth
        .write_all(upgrade_request(addr, &format!("/v1/ws?token={key}"), &[]).as_bytes())
        .unwrap();
    assert_eq!(read_http_response(&mut fourth).status, 429);
    drop(silent);
    // Places come back once they close (each parked one sees its FIN).
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        match common::Client::upgrade_once(addr, &format!("/v1/ws?token={key}"), &[]) {
            Ok(_) => break,
            Err(common::UpgradeError::Status(429)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("upgrade after the silent ones left: {e:?}"),
        }
    }
    // Thirty upgrades that each wait a moment before their head, in turn:
    // every one is parked, served and gives its place back.
    for _ in 0..30 {
        let welcome = upgrade_after(addr, &key, Duration::from_millis(20), None);
        assert_eq!(welcome["type"], "welcome");
    }
}

#[test]
fn the_head_timeout_counts_from_the_accept_for_silent_and_late_partial_heads() {
    let server = ServerBuilder::new().arg("--shards", 1).start();
    let addr = server.ws_addr;
    // Silent: closed without an answer at the head timeout (10 s).
    let silent = std::thread::spawn(move || {
        let started = Instant::now();
        let mut stream = tcp_connect(addr);
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut bytes = Vec::new();
        let _ = stream.read_to_end(&mut bytes);
        (started.elapsed(), bytes)
    });
    // Silent for 6 s, then part of a head: the 408 comes at 10 s from the
    // accept, not 10 s from the first byte.
    let started = Instant::now();
    let mut stream = tcp_connect(addr);
    std::thread::sleep(Duration::from_secs(6));
    stream.write_all(b"GET /v1/ws HTTP/1.1\r\nHost:").unwrap();
    let response = read_http_response(&mut stream);
    let waited = started.elapsed();
    assert_eq!(response.status, 408);
    assert!(
        waited >= Duration::from_millis(9_500) && waited < Duration::from_secs(14),
        "408 after {waited:?}, not about 10 s after the connect"
    );
    let (waited, bytes) = silent.join().unwrap();
    assert!(
        bytes.is_empty(),
        "a silent connection gets no answer: {bytes:?}"
    );
    assert!(
        waited >= Duration::from_millis(9_500) && waited < Duration::from_secs(14),
        "silent connection closed after {waited:?}"
    );
}

#[test]
fn a_pipelined_resume_gets_subscribed_then_its_messages_then_live_ones() {
    let server = ServerBuilder::new().org("org_s").start();
    let key = server.key("org_s").to_string();
    let events: Vec<String> = (0..12)
        .map(|i| common::event("org_s", &format!("e{i}"), "s1"))
        .collect();
    let seqs = server.publish_ok(&common::array(&events));
    // Ten messages behind: the replay comes from the log's memory.
    let after = seqs[1];
    let mut stream = tcp_connect(server.ws_addr);
    let mut bytes =
        upgrade_request(server.ws_addr, &format!("/v1/ws?token={key}"), &[]).into_bytes();
    let subscribe = format!(r#"{{"type":"subscribe","channel":"events","after":{after}}}"#);
    bytes.extend(encode_frame(true, 1, subscribe.as_bytes(), MASK));
    stream.write_all(&bytes).unwrap();
    let mut buffer = Vec::new();
    let head_len = read_head(&mut stream, &mut buffer);
    assert_upgraded(&buffer[..head_len]);
    buffer.drain(..head_len);
    let messages = read_messages(&mut stream, &mut buffer, 12);
    assert_eq!(messages[0]["type"], "welcome");
    assert_eq!(messages[0]["seq"], seqs[11]);
    assert_eq!(messages[1]["type"], "subscribed");
    assert_eq!(messages[1]["recovered"], true);
    let replayed: Vec<u64> = messages[2..]
        .iter()
        .map(|m| m["seq"].as_u64().expect("a seq"))
        .collect();
    assert_eq!(
        replayed,
        seqs[2..].to_vec(),
        "every message after `after`, in order"
    );
    // Live from there, no gap and no duplicate.
    let live = server.publish_ok(&common::array(&[common::event("org_s", "e12", "s1")]));
    let message = &read_messages(&mut stream, &mut buffer, 1)[0];
    assert_eq!(message["seq"], live[0]);
}
