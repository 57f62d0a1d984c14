//! permessage-deflate (RFC 7692) over real sockets against a real server:
//! the negotiation table, one compressed frame shared byte for byte by
//! every compressing subscriber, the window rule, compressed client
//! messages, a zip bomb (1009, no memory growth), RSV1 where it does not
//! belong (1002), and real clients that offer the extension by default
//! (Python `websockets`, Node `ws` with `perMessageDeflate`).

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{encode_frame, read_some, tcp_connect, upgrade_request, Server, ServerBuilder};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use serde_json::Value;

const STEP: Duration = common::STEP_TIMEOUT;

/// A frame with its RSV bits, as read off the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
struct WireFrame {
    /// The whole frame as it arrived (header and payload).
    bytes: Vec<u8>,
    fin: bool,
    rsv1: bool,
    opcode: u8,
    payload: Vec<u8>,
}

fn parse_wire_frame(bytes: &[u8]) -> Option<(WireFrame, usize)> {
    if bytes.len() < 2 {
        return None;
    }
    assert_eq!(bytes[1] & 0x80, 0, "server frames are never masked");
    let (len, at) = match bytes[1] & 0x7f {
        126 => (
            u16::from_be_bytes(bytes.get(2..4)?.try_into().ok()?) as usize,
            4,
        ),
        127 => (
            u64::from_be_bytes(bytes.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    let payload = bytes.get(at..at + len)?.to_vec();
    Some((
        WireFrame {
            bytes: bytes[..at + len].to_vec(),
            fin: bytes[0] & 0x80 != 0,
            rsv1: bytes[0] & 0x40 != 0,
            opcode: bytes[0] & 0x0f,
            payload,
        },
        at + len,
    ))
}

/// Inflates one permessage-deflate message (the tail put back).
fn inflate(payload: &[u8]) -> Vec<u8> {
    let mut decompress = Decompress::new(false);
    let mut input = payload.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::with_capacity(payload.len() * 20 + 1024);
    decompress
        .decompress_vec(&input, &mut out, FlushDecompress::Sync)
        .expect("valid deflate");
    out
}

/// Deflates `data` as one message, the tail removed (RFC 7692 §7.2.1).
fn deflate(data: &[u8]) -> Vec<u8> {
    let mut compress = Compress::new(Compression::default(), false);
    let mut out = Vec::with_capacity(data.len() + 1024);
    compress
        .compress_vec(data, &mut out, FlushCompress::Sync)
        .expect("deflate");
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

/// A byte-level client that may offer permessage-deflate.
struct DeflateClient {
    stream: TcpStream,
    buffer: Vec<u8>,
    /// The `Sec-WebSocket-Extensions` the server answered, if any.
    extensions: Option<String>,
}

/// The 101's head for an upgrade with these `Sec-WebSocket-Extensions`
/// lines; the client is left just after it.
fn connect(server: &Server, org: &str, offers: &[&str]) -> DeflateClient {
    connect_addr(
        server.ws_addr,
        &format!("/v1/ws?token={}", server.key(org)),
        offers,
    )
}

fn connect_addr(addr: SocketAddr, path: &str, offers: &[&str]) -> DeflateClient {
    let lines: Vec<String> = offers
        .iter()
        .map(|o| format!("Sec-WebSocket-Extensions: {o}"))
        .collect();
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    let mut stream = tcp_connect(addr);
    stream
        .write_all(upgrade_request(addr, path, &lines).as_bytes())
        .unwrap();
    let mut buffer = Vec::new();
    let deadline = Instant::now() + STEP;
    let head_end = loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        assert!(read_some(&mut stream, &mut buffer, deadline).unwrap() > 0);
    };
    let head = String::from_utf8(buffer[..head_end].to_vec()).unwrap();
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    let extensions = head
        .lines()
        .filter_map(|l| l.split_once(": "))
        .find(|(name, _)| name.eq_ignore_ascii_case("sec-websocket-extensions"))
        .map(|(_, value)| value.to_string());
    buffer.drain(..head_end);
    let mut client = DeflateClient {
        stream,
        buffer,
        extensions,
    };
    let welcome = client.next_frame();
    assert!(!welcome.rsv1, "the welcome is sent plain");
    assert_eq!(json_of(&welcome)["type"], "welcome");
    client
}

fn json_of(frame: &WireFrame) -> Value {
    assert_eq!(frame.opcode, 1, "not a text frame: {frame:?}");
    let text = if frame.rsv1 {
        inflate(&frame.payload)
    } else {
        frame.payload.clone()
    };
    serde_json::from_slice(&text).expect("JSON")
}

impl DeflateClient {
    /// The next frame other than a ping; panics at EOF or timeout.
    fn next_frame(&mut self) -> WireFrame {
        self.try_next_frame().expect("a frame before EOF")
    }

    /// The next frame other than a ping; `None` at EOF.
    fn try_next_frame(&mut self) -> Option<WireFrame> {
        let deadline = Instant::now() + STEP;
        loop {
            if let Some((frame, used)) = parse_wire_frame(&self.buffer) {
                self.buffer.drain(..used);
                if frame.opcode == 9 {
                    continue;
                }
                return Some(frame);
            }
            match read_some(&mut self.stream, &mut self.buffer, deadline) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    /// Sends a masked frame with RSV1 as given.
    fn send(&mut self, fin: bool, rsv1: bool, opcode: u8, payload: &[u8]) {
        let mut frame = encode_frame(fin, opcode, payload, Some([1, 2, 3, 4]));
        if rsv1 {
            frame[0] |= 0x40;
        }
        self.stream.write_all(&frame).unwrap();
    }

    fn subscribe(&mut self, channel: &str) {
        let text = format!(r#"{{"type":"subscribe","channel":"{channel}"}}"#);
        self.send(true, false, 1, text.as_bytes());
        let reply = self.next_frame();
        assert_eq!(json_of(&reply)["type"], "subscribed");
    }

    /// Reads until a close frame and returns its code (None at EOF first).
    fn close_code(&mut self) -> Option<u16> {
        loop {
            let frame = self.try_next_frame()?;
            if frame.opcode == 8 {
                return Some(u16::from_be_bytes([frame.payload[0], frame.payload[1]]));
            }
        }
    }
}

const ANSWER: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

#[test]
fn the_negotiation_table() {
    let server = Server::start(&["org_n"]);
    let answer_bits = |bits: u8| format!("{ANSWER}; server_max_window_bits={bits}");
    let table: Vec<(Vec<&str>, Option<String>)> = vec![
        (vec![], None),
        (vec!["permessage-deflate"], Some(ANSWER.to_string())),
        (
            vec!["permessage-deflate; client_max_window_bits"],
            Some(ANSWER.to_string()),
        ),
        (
            vec!["permessage-deflate; client_max_window_bits=12"],
            Some(ANSWER.to_string()),
        ),
        (
            vec!["permessage-deflate; server_no_context_takeover"],
            Some(ANSWER.to_string()),
        ),
        (
            vec!["permessage-deflate; client_no_context_takeover"],
            Some(ANSWER.to_string()),
        ),
        (
            vec!["permessage-deflate; server_max_window_bits=10"],
            Some(answer_bits(10)),
        ),
        (
            vec!["permessage-deflate; server_max_window_bits=\"8\""],
            Some(answer_bits(8)),
        ),
        // Bad parameters: declined (plain connection), never failed.
        (vec!["permessage-deflate; server_max_window_bits"], None),
        (vec!["permessage-deflate; server_max_window_bits=7"], None),
        (vec!["permessage-deflate; server_max_window_bits=16"], None),
        (vec!["permessage-deflate; client_max_window_bits=99"], None),
        (vec!["permessage-deflate; server_no_context_takeover=yes"], None),
        (vec!["permessage-deflate; mystery"], None),
        (
            vec!["permessage-deflate; client_no_context_takeover; client_no_context_takeover"],
            None,
        ),
        (vec!["x-webkit-deflate-frame"], None),
        // Several offers: the first acceptable one.
        (
            vec!["permessage-deflate; server_max_window_bits=1, permessage-deflate; server_max_window_bits=12"],
            Some(answer_bits(12)),
        ),
        (
            vec!["permessage-deflate; bogus", "permessage-deflate"],
            Some(ANSWER.to_string()),
        ),
        // What browsers send.
        (
            vec!["permessage-deflate; client_max_window_bits"],
            Some(ANSWER.to_string()),
        ),
    ];
    for (offers, expected) in table {
        let mut client = connect(&server, "org_n", &offers);
        assert_eq!(client.extensions, expected, "offers {offers:?}");
        // Either way the connection works.
        client.subscribe("events");
    }

    let off = ServerBuilder::new()
        .org("org_n")
        .arg("--compression", "off")
        .start();
    let client = connect(&off, "org_n", &["permessage-deflate"]);
    assert_eq!(client.extensions, None, "--compression off declines");
}

fn big_event(org: &str, id: &str) -> String {
    let sample = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/assets/samples/event.json"
    ))
    .unwrap();
    let mut data: Value = serde_json::from_str(&sample).unwrap();
    data["id"] = Value::from(id);
    data["source_id"] = Value::from("src_1");
    serde_json::json!({"org_id": org, "type": "event", "data": data}).to_string()
}

#[test]
fn compressing_subscribers_share_one_compressed_frame_and_plain_ones_get_plain() {
    let server = Server::start(&["org_c"]);
    let mut first = connect(&server, "org_c", &["permessage-deflate"]);
    let mut second = connect(
        &server,
        "org_c",
        &["permessage-deflate; client_max_window_bits"],
    );
    let mut plain = connect(&server, "org_c", &[]);
    for client in [&mut first, &mut second, &mut plain] {
        client.subscribe("events");
    }
    server.publish_ok(&big_event("org_c", "evt_1"));
    let a = first.next_frame();
    let b = second.next_frame();
    let p = plain.next_frame();
    assert!(a.rsv1 && a.fin, "compressed: {a:?}");
    assert_eq!(a.bytes, b.bytes, "byte-identical compressed frames");
    assert!(!p.rsv1);
    assert!(a.bytes.len() < p.bytes.len());
    assert_eq!(inflate(&a.payload), p.payload, "the same message");
    server.wait_for_metric("hookstream_frames_compressed_total", 1);
    server.wait_for_metric("hookstream_messages_delivered_compressed_total", 2);

    // Below --compression-min-bytes (256): plain to everyone.
    server.publish_ok(r#"{"org_id":"org_c","type":"event","data":{"id":"e2","source_id":"s"}}"#);
    let small = first.next_frame();
    assert!(!small.rsv1);
    assert_eq!(json_of(&small)["data"]["id"], "e2");
}

#[test]
fn a_small_window_gets_compressed_frames_only_for_messages_it_covers() {
    let server = ServerBuilder::new()
        .org("org_w")
        .arg("--compression-min-bytes", 64)
        .start();
    // 2^9 = 512 bytes of window.
    let mut client = connect(
        &server,
        "org_w",
        &["permessage-deflate; server_max_window_bits=9"],
    );
    assert_eq!(
        client.extensions.as_deref(),
        Some(format!("{ANSWER}; server_max_window_bits=9").as_str())
    );
    client.subscribe("issues");
    let fits = "x".repeat(300);
    server.publish_ok(&format!(
        r#"{{"org_id":"org_w","type":"issue","data":{{"id":"i1","title":"{fits}"}}}}"#
    ));
    let frame = client.next_frame();
    assert!(frame.rsv1, "a message within the window is compressed");
    assert_eq!(json_of(&frame)["data"]["title"], fits.as_str());
    let long = "y".repeat(2000);
    server.publish_ok(&format!(
        r#"{{"org_id":"org_w","type":"issue","data":{{"id":"i2","title":"{long}"}}}}"#
    ));
    let frame = client.next_frame();
    assert!(
        !frame.rsv1,
        "a message longer than the window is sent plain"
    );
    assert_eq!(json_of(&frame)["data"]["title"], long.as_str());
}

#[test]
fn compressed_client_messages_are_inflated() {
    let server = Server::start(&["org_i"]);
    let mut client = connect(&server, "org_i", &["permessage-deflate"]);
    // One frame.
    client.send(
        true,
        true,
        1,
        &deflate(br#"{"type":"subscribe","channel":"issues"}"#),
    );
    assert_eq!(
        json_of(&client.next_frame()),
        serde_json::json!({"type":"subscribed","channel":"issues"})
    );
    // Fragmented: RSV1 on the first frame only, a ping in between.
    let compressed = deflate(br#"{"type":"subscribe","channel":"deliveries"}"#);
    let (head, tail) = compressed.split_at(compressed.len() / 2);
    client.send(false, true, 1, head);
    client.send(true, false, 9, b"hi");
    client.send(true, false, 0, tail);
    loop {
        let frame = client.next_frame();
        if frame.opcode == 10 {
            continue;
        }
        assert_eq!(
            json_of(&frame),
            serde_json::json!({"type":"subscribed","channel":"deliveries"})
        );
        break;
    }
    // A plain message on the same connection still works.
    client.send(true, false, 1, br#"{"type":"ping"}"#);
    assert_eq!(json_of(&client.next_frame())["type"], "pong");
    // Garbage that is not deflate: 1007.
    client.send(true, true, 1, &[0xff, 0xff, 0xff, 0xff]);
    assert_eq!(client.close_code(), Some(1007));
}

#[test]
fn a_zip_bomb_closes_1009_without_the_server_growing() {
    let server = Server::start(&["org_z"]);
    // 64 MiB of spaces deflates to about 64 KiB, which is over the default
    // 64 KiB message limit; 16 MiB deflates to about 16 KiB, under it.
    let bomb = deflate(&vec![b' '; 16 << 20]);
    assert!(bomb.len() < 60 * 1024, "{}", bomb.len());
    // Warm up: one bomb, then measure over many.
    let mut client = connect(&server, "org_z", &["permessage-deflate"]);
    client.send(true, true, 1, &bomb);
    assert_eq!(client.close_code(), Some(1009));
    let before = server.rss_kib();
    for _ in 0..20 {
        let mut client = connect(&server, "org_z", &["permessage-deflate"]);
        client.send(true, true, 1, &bomb);
        assert_eq!(client.close_code(), Some(1009));
    }
    let after = server.rss_kib();
    // Inflating 20 × 16 MiB would show; at most one message limit is ever
    // inflated, into the shard's one buffer.
    assert!(
        after < before + 4096,
        "RSS grew from {before} KiB to {after} KiB"
    );
}

#[test]
fn rsv1_where_it_does_not_belong_closes_1002() {
    let server = Server::start(&["org_r"]);
    // Without the extension.
    let mut plain = connect(&server, "org_r", &[]);
    plain.send(true, true, 1, &deflate(br#"{"type":"ping"}"#));
    assert_eq!(plain.close_code(), Some(1002));
    // A compressed control frame.
    let mut deflating = connect(&server, "org_r", &["permessage-deflate"]);
    deflating.send(true, true, 9, b"");
    assert_eq!(deflating.close_code(), Some(1002));
    // RSV1 on a continuation.
    let mut deflating = connect(&server, "org_r", &["permessage-deflate"]);
    deflating.send(false, false, 1, br#"{"type":""#);
    deflating.send(true, true, 0, br#"ping"}"#);
    assert_eq!(deflating.close_code(), Some(1002));
    // RSV2 is never allowed.
    let mut deflating = connect(&server, "org_r", &["permessage-deflate"]);
    let mut frame = encode_frame(true, 1, br#"{"type":"ping"}"#, Some([1, 2, 3, 4]));
    frame[0] |= 0x20;
    deflating.stream.write_all(&frame).unwrap();
    assert_eq!(deflating.close_code(), Some(1002));
}

// ---------------------------------------------------------------------------
// Real clients
// ---------------------------------------------------------------------------

/// Runs a peer client script (`program args…`) that connects to `url`,
/// subscribes to `events` and `issues`, prints `ready <extensions>`, then
/// prints every message it receives as one JSON line until it has
/// `count`. Returns (extensions, messages) after publishing `bodies`.
fn run_peer(
    server: &Server,
    program: &str,
    args: &[&str],
    bodies: &[String],
) -> (String, Vec<Value>) {
    use std::io::{BufRead, BufReader};
    let url = format!(
        "ws://{}/v1/ws?token={}",
        server.ws_addr,
        server.key("org_p")
    );
    let mut child = Command::new(program)
        .args(args)
        .arg(&url)
        .arg(bodies.len().to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = lines
        .next()
        .expect("the peer prints ready")
        .expect("read the peer's output");
    let extensions = ready
        .strip_prefix("ready ")
        .unwrap_or_else(|| panic!("expected ready, got {ready:?}"))
        .to_string();
    for body in bodies {
        server.publish_ok(body);
    }
    let messages: Vec<Value> = lines
        .take(bodies.len())
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect();
    let status = child.wait().unwrap();
    assert!(status.success(), "{program} exited with {status}");
    (extensions, messages)
}

fn peer_bodies() -> Vec<String> {
    let mut bodies: Vec<String> = (0..5)
        .map(|i| big_event("org_p", &format!("evt_{i}")))
        .collect();
    bodies.push(r#"{"org_id":"org_p","type":"issue","data":{"id":"iss_small"}}"#.to_string());
    let issue = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/assets/samples/issue.json"
    ))
    .unwrap();
    bodies.push(format!(
        r#"{{"org_id":"org_p","type":"issue","data":{issue}}}"#
    ));
    bodies
}

fn check_peer(server: &Server, extensions: &str, messages: &[Value], bodies: &[String]) {
    assert!(
        extensions.contains("permessage-deflate"),
        "the peer negotiated permessage-deflate: {extensions:?}"
    );
    assert_eq!(messages.len(), bodies.len());
    for (message, body) in messages.iter().zip(bodies) {
        let body: Value = serde_json::from_str(body).unwrap();
        assert_eq!(message["data"], body["data"]);
    }
    // The big ones went compressed (5 events + 1 issue; the small issue
    // is under the minimum).
    server.wait_for_metric("hookstream_messages_delivered_compressed_total", 6);
}

fn tools_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/deflate")
}

/// Panics naming the setup script when a real client is missing.
fn require_peer(what: &str, present: bool) {
    assert!(
        present,
        "the compression tests need {what}: run tools/setup-compression-tests \
         (installs it, and does nothing when it is there), then run the tests again"
    );
}

#[test]
fn python_websockets_negotiates_and_reads_compressed_frames() {
    require_peer(
        "Python's websockets",
        Command::new("python3")
            .args(["-c", "import websockets.sync.client"])
            .status()
            .is_ok_and(|s| s.success()),
    );
    let server = Server::start(&["org_p"]);
    let bodies = peer_bodies();
    let script = tools_dir().join("client.py");
    let (extensions, messages) = run_peer(&server, "python3", &[script.to_str().unwrap()], &bodies);
    check_peer(&server, &extensions, &messages, &bodies);
}

#[test]
fn node_ws_with_per_message_deflate_negotiates_and_reads_compressed_frames() {
    require_peer(
        "Node ws in tests/deflate",
        tools_dir().join("node_modules/ws").is_dir(),
    );
    let server = Server::start(&["org_p"]);
    let bodies = peer_bodies();
    let script = tools_dir().join("client.js");
    let (extensions, messages) = run_peer(&server, "node", &[script.to_str().unwrap()], &bodies);
    check_peer(&server, &extensions, &messages, &bodies);
}

/// `--compression` is also `HOOKSTREAM_COMPRESSION` and `compression` in
/// the TOML file (as `on`/`off` or a boolean), and a bad value is a
/// startup error naming the flag.
#[test]
fn compression_is_set_by_flag_environment_or_file() {
    let offer = ["permessage-deflate"];
    let listen: Vec<String> = ["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let declined_with = |args: Vec<String>, env: &[(&str, &str)]| -> Option<String> {
        let dir = common::TestDir::new();
        let key = common::create_key(dir.path(), "org_e");
        let mut spawned = common::spawn_serve_with_env(dir.path(), &args, env, STEP)
            .unwrap_or_else(|_| panic!("server with {args:?} {env:?} did not start"));
        let client = connect_addr(spawned.ws_addr, &format!("/v1/ws?token={key}"), &offer);
        let _ = spawned.child.kill();
        let _ = spawned.child.wait();
        client.extensions
    };
    assert_eq!(
        declined_with(listen.clone(), &[("HOOKSTREAM_COMPRESSION", "off")]),
        None
    );
    assert_eq!(
        declined_with(listen.clone(), &[("HOOKSTREAM_COMPRESSION", "false")]),
        None
    );
    assert_eq!(
        declined_with(listen.clone(), &[("HOOKSTREAM_COMPRESSION", "on")]).as_deref(),
        Some(ANSWER)
    );
    let file_dir = common::TestDir::new();
    let file = file_dir.path().join("hookstream.toml");
    std::fs::write(&file, "compression = false\ncompression_min_bytes = 64\n").unwrap();
    let mut with_file = listen.clone();
    with_file.extend(["--config".to_string(), file.display().to_string()]);
    assert_eq!(declined_with(with_file.clone(), &[]), None);
    // The flag wins over the file.
    with_file.extend(["--compression".to_string(), "on".to_string()]);
    assert_eq!(declined_with(with_file, &[]).as_deref(), Some(ANSWER));

    let dir = common::TestDir::new();
    let output = common::serve_command(dir.path(), &["--compression", "maybe"])
        .output()
        .expect("run serve");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--compression"), "{stderr}");
}
