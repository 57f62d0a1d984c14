//! TLS in the process, over real TLS with a CA made in the test (rcgen):
//! wss:// with tungstenite on rustls, Python `websockets` and Node `ws`
//! (SSL_CERT_FILE / NODE_EXTRA_CA_CERTS), https:// routes with curl, bad
//! input on the TLS port, startup errors, and rotation of the pair.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{event, Server, ServerBuilder, TestDir, STEP_TIMEOUT};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tungstenite::Message;

/// A CA made for one test, and the leaf pairs it signs.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    dir: TestDir,
}

/// A leaf pair written to files.
struct Pair {
    cert: PathBuf,
    key: PathBuf,
    der: Vec<u8>,
}

impl Ca {
    fn new() -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "hookstream test CA");
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let dir = TestDir::new();
        std::fs::write(dir.path().join("ca.pem"), cert.pem()).unwrap();
        Ca { cert, key, dir }
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A leaf for localhost and 127.0.0.1 with this serial, written as
    /// `<name>.crt` and `<name>.key` (PKCS#8).
    fn leaf(&self, name: &str, serial: u64) -> Pair {
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        params.serial_number = Some(serial.into());
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        let pair = Pair {
            cert: self.dir.path().join(format!("{name}.crt")),
            key: self.dir.path().join(format!("{name}.key")),
            der: cert.der().to_vec(),
        };
        std::fs::write(&pair.cert, cert.pem()).unwrap();
        std::fs::write(&pair.key, key.serialize_pem()).unwrap();
        pair
    }

    fn client_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.der().clone()).unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            #[allow(deprecated)]
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

fn tls_server(pair: &Pair, orgs: &[&str], extra: &[(&str, &str)]) -> Server {
    let mut builder = ServerBuilder::new()
        .arg("--tls-cert", pair.cert.display())
        .arg("--tls-key", pair.key.display());
    for (flag, value) in extra {
        builder = builder.arg(flag, value);
    }
    for org in orgs {
        builder = builder.org(org);
    }
    builder.start()
}

type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A TLS connection to `addr` (name `localhost`), handshake done.
fn tls_connect(config: Arc<rustls::ClientConfig>, addr: SocketAddr) -> TlsStream {
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(STEP_TIMEOUT)).unwrap();
    tcp.set_write_timeout(Some(STEP_TIMEOUT)).unwrap();
    let conn =
        rustls::ClientConnection::new(config, ServerName::try_from("localhost").unwrap()).unwrap();
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    while stream.conn.is_handshaking() {
        stream
            .conn
            .complete_io(&mut stream.sock)
            .expect("TLS handshake");
    }
    stream
}

fn peer_cert(stream: &TlsStream) -> Vec<u8> {
    let certs: &[CertificateDer<'_>] = stream.conn.peer_certificates().unwrap();
    certs[0].to_vec()
}

type Wss = tungstenite::WebSocket<TlsStream>;

/// A wss client of `org` (welcome read and returned).
fn wss(ca: &Ca, server: &Server, query: &str) -> (Wss, Value) {
    let stream = tls_connect(ca.client_config(&[b"http/1.1"]), server.ws_addr);
    let url = format!("wss://localhost:{}/v1/ws?{query}", server.ws_addr.port());
    let (mut ws, response) = tungstenite::client(url.as_str(), stream).expect("wss upgrade");
    assert_eq!(response.status(), 101);
    let welcome = next_json(&mut ws);
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    (ws, welcome)
}

fn next_json(ws: &mut Wss) -> Value {
    loop {
        match ws.read().expect("read a wss message") {
            Message::Text(text) => return serde_json::from_str(&text).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn send_json(ws: &mut Wss, json: &str) {
    ws.send(Message::Text(json.into())).unwrap();
}

/// The close code the server sends, skipping data messages.
fn close_code(ws: &mut Wss) -> u16 {
    loop {
        match ws.read() {
            Ok(Message::Close(Some(frame))) => return frame.code.into(),
            Ok(Message::Close(None)) => return 1005,
            Ok(_) => continue,
            Err(e) => panic!("connection ended without a close frame: {e}"),
        }
    }
}

/// `curl --cacert CA` on `https://localhost:PORT/path`; returns (status, head, body).
fn curl(
    ca: &Ca,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[String],
) -> (u16, String, String) {
    let mut command = Command::new("curl");
    command
        .args(["-sS", "-i", "--max-time", "10", "--cacert"])
        .arg(ca.ca_file())
        .args(["-X", method]);
    for header in headers {
        command.args(["-H", header]);
    }
    let output = command
        .arg(format!("https://localhost:{}{path}", addr.port()))
        .stdin(Stdio::null())
        .output()
        .expect("run curl");
    assert!(
        output.status.success(),
        "curl {path}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_string(), body.to_string())
}

fn tls_failures(server: &Server, reason: &str) -> u64 {
    let text = server.admin_get("/metrics", true).text();
    text.lines()
        .filter(|l| {
            l.starts_with("hookstream_tls_failures_total{")
                && l.contains(&format!("reason=\"{reason}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn wait_for_tls_failures(server: &Server, reason: &str, at_least: u64) {
    let deadline = Instant::now() + STEP_TIMEOUT;
    while tls_failures(server, reason) < at_least {
        assert!(
            Instant::now() < deadline,
            "hookstream_tls_failures_total{{reason={reason}}} stayed below {at_least}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The contract over wss equals plain: welcome, routing, resume with
/// `after`, replies; a second client keeps its own subscriptions.
#[test]
fn wss_welcome_routing_and_resume() {
    let ca = Ca::new();
    let pair = ca.leaf("a", 1);
    let server = tls_server(&pair, &["org_a"], &[]);
    let key = server.key("org_a").to_string();
    let (mut events, welcome) = wss(&ca, &server, &format!("token={key}"));
    assert_eq!(welcome["org_id"], "org_a");
    send_json(&mut events, r#"{"type":"subscribe","channel":"events"}"#);
    assert_eq!(next_json(&mut events)["type"], "subscribed");
    let (mut issues, _) = wss(&ca, &server, &format!("token={key}"));
    send_json(&mut issues, r#"{"type":"subscribe","channel":"issues"}"#);
    assert_eq!(next_json(&mut issues)["type"], "subscribed");

    let seqs = server.publish_ok(&event("org_a", "evt_1", "src_1"));
    server.publish_ok(r#"{"org_id":"org_a","type":"issue","data":{"id":"iss_1"}}"#);
    let got = next_json(&mut events);
    assert_eq!(
        (got["channel"].as_str(), got["seq"].as_u64()),
        (Some("events"), Some(seqs[0]))
    );
    assert_eq!(got["data"]["id"], "evt_1");
    let got = next_json(&mut issues);
    assert_eq!(got["channel"], "issues");
    assert_eq!(got["data"]["id"], "iss_1");

    // Resume: a new wss connection asks for what came after seq 0.
    let (mut resumed, _) = wss(&ca, &server, &format!("token={key}"));
    send_json(
        &mut resumed,
        r#"{"type":"subscribe","channel":"events","after":0}"#,
    );
    let mut replayed = Vec::new();
    while replayed.len() < 2 {
        let message = next_json(&mut resumed);
        replayed.push(message);
    }
    let data: Vec<&Value> = replayed
        .iter()
        .filter(|m| m.get("data").is_some())
        .collect();
    assert_eq!(data.len(), 1, "{replayed:?}");
    assert_eq!(data[0]["data"]["id"], "evt_1");

    // Ping/pong reply over TLS.
    send_json(&mut events, r#"{"type":"ping"}"#);
    assert_eq!(next_json(&mut events)["type"], "pong");
    assert!(
        server.metric_sum("hookstream_tls_handshakes_total") >= 3,
        "handshakes are counted"
    );
}

/// https:// for the other public routes (curl): probes, dashboard,
/// client.js, a session with a Secure cookie, poll, SSE, history lists.
#[test]
fn https_routes_with_curl_and_a_secure_session_cookie() {
    let ca = Ca::new();
    let pair = ca.leaf("a", 1);
    let server = tls_server(&pair, &["org_h"], &[]);
    let key = server.key("org_h").to_string();
    let seqs = server.publish_ok(&event("org_h", "evt_1", "src_1"));
    let addr = server.ws_addr;

    let (status, _, body) = curl(&ca, addr, "GET", "/healthz", &[]);
    assert_eq!((status, body.contains("ok")), (200, true), "{body}");
    let (status, head, body) = curl(&ca, addr, "GET", "/", &[]);
    assert_eq!(status, 200);
    assert!(head.to_ascii_lowercase().contains("text/html"), "{head}");
    assert!(!body.is_empty());
    let (status, _, body) = curl(&ca, addr, "GET", "/v1/client.js", &[]);
    assert_eq!(status, 200);
    assert!(body.contains("export"), "client.js is an ES module");

    let bearer = format!("Authorization: Bearer {key}");
    let (status, head, _) = curl(
        &ca,
        addr,
        "POST",
        "/v1/sessions",
        std::slice::from_ref(&bearer),
    );
    assert!(status == 200 || status == 201 || status == 204, "{head}");
    let set_cookie = head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .unwrap_or_else(|| panic!("no Set-Cookie in {head}"));
    let attributes: Vec<&str> = set_cookie.split(';').map(|a| a.trim()).collect();
    assert!(
        attributes.contains(&"Secure"),
        "TLS, so Secure: {set_cookie}"
    );
    assert!(attributes.contains(&"HttpOnly"), "{set_cookie}");
    let cookie = set_cookie
        .split_once(':')
        .unwrap()
        .1
        .trim()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    // The cookie session works over TLS (GET /v1/sessions reports it).
    let (status, _, body) = curl(
        &ca,
        addr,
        "GET",
        "/v1/sessions",
        &[format!("Cookie: {cookie}")],
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("org_h"), "{body}");

    let (status, _, body) = curl(
        &ca,
        addr,
        "GET",
        "/v1/poll?channels=events&after=0",
        std::slice::from_ref(&bearer),
    );
    assert_eq!(status, 200, "{body}");
    let poll: Value = serde_json::from_str(&body).unwrap();
    assert!(body.contains("evt_1"), "{poll}");
    let (status, _, body) = curl(
        &ca,
        addr,
        "GET",
        "/v1/events?limit=10",
        std::slice::from_ref(&bearer),
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("evt_1"), "{body}");

    // SSE: the stream carries the message as an event with its seq as id;
    // curl stops at --max-time, so read with a raw TLS client instead.
    let mut stream = tls_connect(ca.client_config(&[b"http/1.1"]), addr);
    write!(
        stream,
        "GET /v1/sse?channels=events HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {key}\r\nLast-Event-ID: 0\r\n\r\n"
    )
    .unwrap();
    stream.flush().unwrap();
    let mut seen = Vec::new();
    let deadline = Instant::now() + STEP_TIMEOUT;
    let id_line = format!("id: {}", seqs[0]);
    while !String::from_utf8_lossy(&seen).contains(&id_line) {
        assert!(
            Instant::now() < deadline,
            "no SSE event: {}",
            String::from_utf8_lossy(&seen)
        );
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).expect("read SSE");
        assert!(
            n > 0,
            "SSE stream ended: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&chunk[..n]);
    }
    assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200"));
}

/// A slow consumer over wss is closed with 1013, and the others are not.
#[test]
fn wss_slow_consumer_is_closed_1013() {
    let ca = Ca::new();
    let pair = ca.leaf("a", 1);
    let server = tls_server(&pair, &["org_s"], &[("--send-queue-bytes", "65536")]);
    let key = server.key("org_s").to_string();
    let (mut slow, _) = wss(&ca, &server, &format!("token={key}"));
    send_json(&mut slow, r#"{"type":"subscribe","channel":"events"}"#);
    assert_eq!(next_json(&mut slow)["type"], "subscribed");
    slow.get_mut()
        .sock
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let payload = "x".repeat(60_000);
    let body = format!(
        r#"{{"org_id":"org_s","type":"event","data":{{"id":"evt","source_id":"s","pad":"{payload}"}}}}"#
    );
    // Publish until the server gives up on the reader that does not read:
    // socket buffers on both sides of the terminator fill first.
    let deadline = Instant::now() + Duration::from_secs(60);
    while server.metric_sum("hookstream_slow_consumer_closes_total") == 0 {
        assert!(Instant::now() < deadline, "no 1013 within 60 s");
        let bodies: Vec<String> = (0..20).map(|_| body.clone()).collect();
        server.publish_ok(&common::array(&bodies));
    }
    assert_eq!(close_code(&mut slow), 1013);
    // Another wss client is served.
    let (mut other, _) = wss(&ca, &server, &format!("token={key}"));
    send_json(&mut other, r#"{"type":"ping"}"#);
    assert_eq!(next_json(&mut other)["type"], "pong");
}

/// SIGTERM closes wss connections with 1001, like plain ones.
#[test]
fn wss_sigterm_closes_1001() {
    let ca = Ca::new();
    let pair = ca.leaf("a", 1);
    let mut server = tls_server(&pair, &["org_t"], &[]);
    let key = server.key("org_t").to_string();
    let (mut ws, _) = wss(&ca, &server, &format!("token={key}"));
    send_json(&mut ws, r#"{"type":"subscribe","channel":"events"}"#);
    assert_eq!(next_json(&mut ws)["type"], "subscribed");
    server.signal(libc::SIGTERM);
    assert_eq!(close_code(&mut ws), 1001);
    let status = server.wait_exit(Duration::from_secs(10)).expect("exits");
    assert!(status.success(), "{status}");
}

/// Plain HTTP and a plain WebSocket upgrade on the TLS port are answered
/// 400 `tls_required` in plain text and counted; an impossible ClientHello
/// (no common ALPN), a forged record and bytes after close_notify are closed
/// and counted; everyone else is served throughout.
#[test]
fn bad_input_on_the_tls_port_is_closed_and_counted() {
    let ca = Ca::new();
    let pair = ca.leaf("a", 1);
    let server = tls_server(&pair, &["org_b"], &[]);
    let key = server.key("org_b").to_string();
    let (mut watcher, _) = wss(&ca, &server, &format!("token={key}"));
    send_json(&mut watcher, r#"{"type":"subscribe","channel":"events"}"#);
    assert_eq!(next_json(&mut watcher)["type"], "subscribed");

    for request in [
        "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".to_string(),
        format!(
            "GET /v1/ws?token={key} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ),
    ] {
        let mut tcp = TcpStream::connect(server.ws_addr).unwrap();
        tcp.set_read_timeout(Some(STEP_TIMEOUT)).unwrap();
        tcp.write_all(request.as_bytes()).unwrap();
        let mut answer = String::new();
        tcp.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.ends_with(r#"{"error":"tls_required"}"#), "{answer}");
    }
    wait_for_tls_failures(&server, "plain_http", 2);

    // No protocol in common: the handshake fails with an alert.
    let tcp = TcpStream::connect(server.ws_addr).unwrap();
    tcp.set_read_timeout(Some(STEP_TIMEOUT)).unwrap();
    let conn = rustls::ClientConnection::new(
        ca.client_config(&[b"h2"]),
        ServerName::try_from("localhost").unwrap(),
    )
    .unwrap();
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    let mut failed = false;
    while stream.conn.is_handshaking() {
        if stream.conn.complete_io(&mut stream.sock).is_err() {
            failed = true;
            break;
        }
    }
    assert!(failed, "a ClientHello offering only h2 is refused");
    wait_for_tls_failures(&server, "handshake", 1);

    // A forged application-data record after a good handshake.
    let mut stream = tls_connect(ca.client_config(&[b"http/1.1"]), server.ws_addr);
    let mut forged = vec![0x17, 0x03, 0x03, 0x00, 0x40];
    forged.extend((0..0x40).map(|i| (i * 37) as u8));
    stream.sock.write_all(&forged).unwrap();
    let mut rest = Vec::new();
    let _ = stream.sock.read_to_end(&mut rest);
    wait_for_tls_failures(&server, "bad_record", 1);

    // A truncated record, then the client goes: closed, nothing served.
    let mut stream = tls_connect(ca.client_config(&[b"http/1.1"]), server.ws_addr);
    stream
        .sock
        .write_all(&[0x17, 0x03, 0x03, 0x10, 0x00, 1, 2, 3])
        .unwrap();
    drop(stream);

    // Bytes after close_notify: the server stops reading at close_notify.
    let mut stream = tls_connect(ca.client_config(&[b"http/1.1"]), server.ws_addr);
    stream.conn.send_close_notify();
    stream.conn.complete_io(&mut stream.sock).unwrap();
    let _ = stream.sock.write_all(&forged);
    let mut rest = Vec::new();
    let _ = stream.sock.read_to_end(&mut rest);

    // Everyone else is still served.
    let seqs = server.publish_ok(&event("org_b", "evt_1", "src_1"));
    let got = next_json(&mut watcher);
    assert_eq!(got["seq"].as_u64(), Some(seqs[0]));
    let (status, _, _) = curl(&ca, server.ws_addr, "GET", "/healthz", &[]);
    assert_eq!(status, 200);
}

/// A handshake that stalls is closed after the head's 10 s, counted, and
/// a flood of ClientHellos leaves the server serving.
#[test]
fn stalled_handshakes_and_a_client_hello_flood() {
    let ca = Ca::new();
    let pair = ca.leaf("a", 1);
    let server = tls_server(&pair, &["org_f"], &[]);
    let key = server.key("org_f").to_string();

    let started = Instant::now();
    let mut stalled = TcpStream::connect(server.ws_addr).unwrap();
    stalled
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    // The start of a handshake record, and nothing more.
    stalled
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .unwrap();

    // The flood: 200 connections each sending a full ClientHello and
    // leaving without finishing, at once.
    let mut hellos = Vec::new();
    for _ in 0..200 {
        let conn = rustls::ClientConnection::new(
            ca.client_config(&[b"http/1.1"]),
            ServerName::try_from("localhost").unwrap(),
        )
        .unwrap();
        let mut tcp = TcpStream::connect(server.ws_addr).unwrap();
        let mut conn = conn;
        let mut hello = Vec::new();
        conn.write_tls(&mut hello).unwrap();
        tcp.write_all(&hello).unwrap();
        hellos.push(tcp);
    }
    // Served meanwhile.
    let (mut ws, _) = wss(&ca, &server, &format!("token={key}"));
    send_json(&mut ws, r#"{"type":"ping"}"#);
    assert_eq!(next_json(&mut ws)["type"], "pong");
    drop(hellos);

    let mut rest = Vec::new();
    let _ = stalled.read_to_end(&mut rest);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(9) && waited < Duration::from_secs(19),
        "a stalled handshake is closed after 10 s, took {waited:?}"
    );
    assert!(
        rest.is_empty() || rest[0] == 0x15,
        "nothing but an alert: {rest:?}"
    );
    wait_for_tls_failures(&server, "timeout", 1);
    wait_for_tls_failures(&server, "eof", 1);
    send_json(&mut ws, r#"{"type":"ping"}"#);
    assert_eq!(next_json(&mut ws)["type"], "pong");
}

fn serve_status(dir: &Path, args: &[String]) -> (bool, String) {
    let output = common::serve_command(dir, args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A pair that does not load ends startup with one line naming the file:
/// unreadable, not PEM, a key that does not match; and one flag alone.
#[test]
fn startup_refuses_a_bad_pair_naming_the_file() {
    let ca = Ca::new();
    let a = ca.leaf("a", 1);
    let b = ca.leaf("b", 2);
    let data = TestDir::new();
    let junk = ca.dir.path().join("junk.pem");
    std::fs::write(&junk, "not a pem file\n").unwrap();
    let missing = ca.dir.path().join("missing.pem");
    let listen = ["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"];
    let cases: [(&Path, &Path, &Path); 4] = [
        (&missing, &a.key, &missing),
        (&junk, &a.key, &junk),
        (&a.cert, &junk, &junk),
        (&a.cert, &b.key, &b.key),
    ];
    for (cert, key, named) in cases {
        let mut args: Vec<String> = listen.iter().map(|s| s.to_string()).collect();
        args.extend([
            "--tls-cert".to_string(),
            cert.display().to_string(),
            "--tls-key".to_string(),
            key.display().to_string(),
        ]);
        let (ok, stderr) = serve_status(data.path(), &args);
        assert!(!ok, "started with {cert:?} {key:?}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line: {stderr}");
        assert!(
            lines[0].contains(&named.display().to_string()),
            "names {named:?}: {stderr}"
        );
    }
    let mut args: Vec<String> = listen.iter().map(|s| s.to_string()).collect();
    args.extend(["--tls-cert".to_string(), a.cert.display().to_string()]);
    let (ok, stderr) = serve_status(data.path(), &args);
    assert!(!ok && stderr.contains("--tls-key"), "{stderr}");
    let mut args: Vec<String> = listen.iter().map(|s| s.to_string()).collect();
    args.push("--admin-tls".to_string());
    let (ok, stderr) = serve_status(data.path(), &args);
    assert!(!ok && stderr.contains("--tls-cert"), "{stderr}");
}

/// PKCS#1 (RSA) and SEC1 (EC) keys load too (converted with openssl), from
/// the environment and the TOML file as well as flags; `--admin-tls` puts
/// the admin listener on the same pair, and the startup line says so.
#[test]
fn key_formats_environment_file_and_admin_tls() {
    let ca = Ca::new();
    let pair = ca.leaf("a", 1);
    let dir = ca.dir.path();
    let sec1 = dir.join("sec1.key");
    let status = Command::new("openssl")
        .args(["ec", "-in"])
        .arg(&pair.key)
        .arg("-out")
        .arg(&sec1)
        .stderr(Stdio::null())
        .status()
        .expect("openssl");
    assert!(status.success());
    assert!(std::fs::read_to_string(&sec1)
        .unwrap()
        .contains("BEGIN EC PRIVATE KEY"));
    // An RSA pair in PKCS#1, self-signed by openssl.
    let rsa_key = dir.join("rsa.key");
    let rsa_cert = dir.join("rsa.crt");
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-keyout",
        ])
        .arg(&rsa_key)
        .arg("-out")
        .arg(&rsa_cert)
        .stderr(Stdio::null())
        .status()
        .expect("openssl");
    assert!(status.success());
    let pkcs1 = dir.join("pkcs1.key");
    let status = Command::new("openssl")
        .args(["rsa", "-traditional", "-in"])
        .arg(&rsa_key)
        .arg("-out")
        .arg(&pkcs1)
        .stderr(Stdio::null())
        .status()
        .expect("openssl");
    assert!(status.success());
    assert!(std::fs::read_to_string(&pkcs1)
        .unwrap()
        .contains("BEGIN RSA PRIVATE KEY"));

    let data = TestDir::new();
    let listen: Vec<String> = ["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    // SEC1 by the environment, admin TLS too.
    let spawned = common::spawn_serve_with_env(
        data.path(),
        &[listen.clone(), vec!["--admin-tls".to_string()]].concat(),
        &[
            ("HOOKSTREAM_TLS_CERT", pair.cert.to_str().unwrap()),
            ("HOOKSTREAM_TLS_KEY", sec1.to_str().unwrap()),
        ],
        Duration::from_secs(15),
    )
    .unwrap_or_else(|e| panic!("{e:?}"));
    let line = listening_line(&spawned);
    assert!(
        line.contains("wss://") && line.contains("admin https://"),
        "{line}"
    );
    assert!(
        line.contains("TLS on the public and admin listeners"),
        "{line}"
    );
    let (status, _, body) = curl(&ca, spawned.admin_addr, "GET", "/healthz", &[]);
    assert_eq!(status, 200, "{body}");
    let mut child = spawned.child;
    let _ = child.kill();
    let _ = child.wait();

    // PKCS#1 from the TOML file; the admin listener stays plain.
    let data = TestDir::new();
    let config = data.path().join("hookstream.toml");
    std::fs::write(
        &config,
        format!(
            "tls_cert = {:?}\ntls_key = {:?}\n",
            rsa_cert.display().to_string(),
            pkcs1.display().to_string()
        ),
    )
    .unwrap();
    let spawned = common::spawn_serve(
        data.path(),
        &[
            listen,
            vec!["--config".to_string(), config.display().to_string()],
        ]
        .concat(),
        Duration::from_secs(15),
    )
    .unwrap_or_else(|e| panic!("{e:?}"));
    let line = listening_line(&spawned);
    assert!(
        line.contains("wss://") && line.contains("admin http://"),
        "{line}"
    );
    assert!(line.contains("TLS on the public listener"), "{line}");
    // The self-signed RSA certificate is its own CA here: check with curl -k
    // that TLS is spoken with it.
    let output = Command::new("curl")
        .args(["-sS", "-k", "--max-time", "10"])
        .arg(format!(
            "https://127.0.0.1:{}/healthz",
            spawned.ws_addr.port()
        ))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&output.stdout).contains("ok"));
    let mut child = spawned.child;
    let _ = child.kill();
    let _ = child.wait();
}

/// Rotation: a new pair (SIGHUP, then a file change) is used by new
/// connections; a connection opened before keeps receiving; a broken pair
/// is refused with one log line and the old one stays in use.
#[test]
fn rotation_by_sighup_and_by_file_change() {
    let ca = Ca::new();
    let first = ca.leaf("first", 1001);
    let second = ca.leaf("second", 1002);
    let third = ca.leaf("third", 1003);
    // The server reads the files at these paths.
    let live = ca.leaf("live", 1001);
    std::fs::copy(&first.cert, &live.cert).unwrap();
    std::fs::copy(&first.key, &live.key).unwrap();
    let server = tls_server(&live, &["org_r"], &[]);
    let key = server.key("org_r").to_string();
    let config = ca.client_config(&[b"http/1.1"]);
    assert_eq!(
        peer_cert(&tls_connect(config.clone(), server.ws_addr)),
        first.der
    );

    let (mut old, _) = wss(&ca, &server, &format!("token={key}"));
    send_json(&mut old, r#"{"type":"subscribe","channel":"events"}"#);
    assert_eq!(next_json(&mut old)["type"], "subscribed");

    // SIGHUP after replacing both files (atomically, by rename).
    let replace = |from: &Pair| {
        let tmp_cert = ca.dir.path().join("tmp.crt");
        let tmp_key = ca.dir.path().join("tmp.key");
        std::fs::copy(&from.cert, &tmp_cert).unwrap();
        std::fs::copy(&from.key, &tmp_key).unwrap();
        std::fs::rename(&tmp_key, &live.key).unwrap();
        std::fs::rename(&tmp_cert, &live.cert).unwrap();
    };
    let wait_for_cert = |der: &[u8]| {
        let deadline = Instant::now() + Duration::from_secs(12);
        loop {
            if peer_cert(&tls_connect(config.clone(), server.ws_addr)) == der {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the new certificate is not in use"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    replace(&second);
    server.signal(libc::SIGHUP);
    wait_for_cert(&second.der);
    let seqs = server.publish_ok(&event("org_r", "evt_1", "s"));
    assert_eq!(next_json(&mut old)["seq"].as_u64(), Some(seqs[0]));

    // A file change alone, noticed within 10 s.
    replace(&third);
    wait_for_cert(&third.der);
    let seqs = server.publish_ok(&event("org_r", "evt_2", "s"));
    assert_eq!(next_json(&mut old)["seq"].as_u64(), Some(seqs[0]));

    // A broken pair: refused with one line, the third stays.
    std::fs::write(&live.cert, "-----BEGIN CERTIFICATE-----\nbroken\n").unwrap();
    server.signal(libc::SIGHUP);
    let deadline = Instant::now() + STEP_TIMEOUT;
    while !server.stderr().contains("not reloaded") {
        assert!(
            Instant::now() < deadline,
            "no refusal logged: {}",
            server.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let refusal: Vec<String> = server
        .stderr()
        .lines()
        .filter(|l| l.contains("not reloaded"))
        .map(|l| l.to_string())
        .collect();
    assert!(
        refusal[0].contains(&live.cert.display().to_string()),
        "{refusal:?}"
    );
    assert!(
        !server.stderr().contains("PRIVATE KEY"),
        "nothing secret is logged"
    );
    assert_eq!(
        peer_cert(&tls_connect(config.clone(), server.ws_addr)),
        third.der
    );
    let seqs = server.publish_ok(&event("org_r", "evt_3", "s"));
    assert_eq!(next_json(&mut old)["seq"].as_u64(), Some(seqs[0]));
}

/// A TLS 1.3 session ticket resumes: the second handshake is counted as
/// resumed. TLS 1.2 works too.
#[test]
fn resumption_and_tls12() {
    let ca = Ca::new();
    let pair = ca.leaf("a", 1);
    let server = tls_server(&pair, &["org_k"], &[]);
    let config = ca.client_config(&[b"http/1.1"]);
    for _ in 0..2 {
        let mut stream = tls_connect(config.clone(), server.ws_addr);
        write!(
            stream,
            "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
    }
    let text = server.admin_get("/metrics", true).text();
    let resumed: u64 = text
        .lines()
        .filter(|l| {
            l.starts_with("hookstream_tls_handshakes_total{") && l.contains("resumed=\"true\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(resumed, 1, "{text}");

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert.der().clone()).unwrap();
    let tls12 = rustls::ClientConfig::builder_with_provider(Arc::new(
        #[allow(deprecated)]
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let stream = tls_connect(Arc::new(tls12), server.ws_addr);
    assert_eq!(
        stream.conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
}

/// The listening line of a spawned server (the reader thread signals it
/// just before it stores it).
fn listening_line(spawned: &common::Spawned) -> String {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        if let Some(line) = spawned
            .stderr
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.starts_with("hookstream listening on "))
        {
            return line.clone();
        }
        assert!(Instant::now() < deadline, "no listening line");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn peer_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/deflate")
}

/// Runs a peer script of tests/deflate against wss:// with `env` pointing
/// it at the test CA; checks it negotiated compression and got the data.
fn run_wss_peer(program: &str, script: &str, ca_variable: &str) {
    use std::io::BufRead;
    let ca = Ca::new();
    let pair = ca.leaf("a", 1);
    let server = tls_server(&pair, &["org_p"], &[]);
    let url = format!(
        "wss://localhost:{}/v1/ws?token={}",
        server.ws_addr.port(),
        server.key("org_p")
    );
    let mut child = Command::new(program)
        .arg(peer_dir().join(script))
        .arg(&url)
        .arg("2")
        .env(ca_variable, ca.ca_file())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = lines.next().unwrap().unwrap();
    assert!(ready.contains("permessage-deflate"), "{ready}");
    let pad = "y".repeat(2000);
    let bodies = [
        format!(
            r#"{{"org_id":"org_p","type":"event","data":{{"id":"e1","source_id":"s","pad":"{pad}"}}}}"#
        ),
        r#"{"org_id":"org_p","type":"issue","data":{"id":"i1"}}"#.to_string(),
    ];
    for body in &bodies {
        server.publish_ok(body);
    }
    let got: Vec<Value> = lines
        .take(2)
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect();
    assert_eq!(got[0]["data"]["id"], "e1");
    assert_eq!(got[0]["data"]["pad"].as_str().map(str::len), Some(2000));
    assert_eq!(got[1]["data"]["id"], "i1");
    assert!(child.wait().unwrap().success());
    // The big event went compressed, over TLS.
    server.wait_for_metric("hookstream_messages_delivered_compressed_total", 1);
}

#[test]
fn python_websockets_over_wss_with_compression() {
    assert!(
        Command::new("python3")
            .args(["-c", "import websockets.sync.client"])
            .status()
            .is_ok_and(|s| s.success()),
        "needs Python's websockets: run tools/setup-compression-tests"
    );
    run_wss_peer("python3", "client.py", "SSL_CERT_FILE");
}

#[test]
fn node_ws_over_wss_with_node_extra_ca_certs() {
    assert!(
        peer_dir().join("node_modules/ws").is_dir(),
        "needs Node ws in tests/deflate: run tools/setup-compression-tests"
    );
    run_wss_peer("node", "client.js", "NODE_EXTRA_CA_CERTS");
}

fn open_fds(server: &Server) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", server.pid()))
        .unwrap()
        .count()
}

fn wss_with(ca: &Ca, config: Arc<rustls::ClientConfig>, server: &Server, query: &str) -> Wss {
    let _ = ca;
    let stream = tls_connect(config, server.ws_addr);
    let url = format!("wss://localhost:{}/v1/ws?{query}", server.ws_addr.port());
    let (mut ws, _) = tungstenite::client(url.as_str(), stream).expect("wss upgrade");
    assert_eq!(next_json(&mut ws)["type"], "welcome");
    ws
}

/// After a TLS 1.3 upgrade the connection hibernates like a plain one: its
/// socket goes to the reactor with the traffic keys, no socketpair and no
/// task stay behind (one descriptor per connection, as plain), and a
/// published message reaches every subscriber sealed per connection —
/// messages larger than a record too, and client messages that span
/// several records.
#[test]
fn wss_connections_hibernate_and_receive_sealed_fan_out() {
    let ca = Ca::new();
    let pair = ca.leaf("a", 1);
    let server = tls_server(&pair, &["org_z"], &[("--upgrades-per-ip-per-sec", "0")]);
    let key = server.key("org_z").to_string();
    // Settle pools and lazily made state with a first connection.
    let (mut first, _) = wss(&ca, &server, &format!("token={key}"));
    send_json(&mut first, r#"{"type":"subscribe","channel":"events"}"#);
    assert_eq!(next_json(&mut first)["type"], "subscribed");
    let before = open_fds(&server);
    let mut clients = Vec::new();
    for _ in 0..40 {
        let (mut ws, _) = wss(&ca, &server, &format!("token={key}"));
        // A client message of three records' worth: reassembled and answered.
        let pad = "p".repeat(40_000);
        send_json(
            &mut ws,
            &format!(r#"{{"type":"subscribe","channel":"events","pad":"{pad}"}}"#),
        );
        assert_eq!(next_json(&mut ws)["type"], "subscribed");
        clients.push(ws);
    }
    let grown = open_fds(&server) - before;
    assert!(
        grown <= 42,
        "40 wss connections hold {grown} more descriptors: one each expected (no socketpair)"
    );
    let (big, small) = publish_big_then_small(&server, "org_z");
    for ws in clients.iter_mut().chain(std::iter::once(&mut first)) {
        expect_big_then_small(ws, big, small);
    }
}

/// A client KeyUpdate on a hibernating connection closes it with 1001 (the
/// client resumes with `after`); a forged record closes it and is counted;
/// a close_notify ends it. Others are served throughout.
#[test]
fn wss_key_update_forged_record_and_close_notify_after_the_upgrade() {
    let ca = Ca::new();
    let pair = ca.leaf("a", 1);
    let server = tls_server(&pair, &["org_u"], &[]);
    let key = server.key("org_u").to_string();
    let config = ca.client_config(&[b"http/1.1"]);

    let mut updating = wss_with(&ca, config.clone(), &server, &format!("token={key}"));
    updating.get_mut().conn.refresh_traffic_keys().unwrap();
    send_json(&mut updating, r#"{"type":"ping"}"#);
    assert_eq!(close_code(&mut updating), 1001);

    let mut forging = wss_with(&ca, config.clone(), &server, &format!("token={key}"));
    let mut forged = vec![0x17, 0x03, 0x03, 0x00, 0x30];
    forged.extend((0..0x30).map(|i| (i * 13) as u8));
    forging.get_mut().sock.write_all(&forged).unwrap();
    let mut rest = Vec::new();
    let _ = forging.get_mut().sock.read_to_end(&mut rest);
    wait_for_tls_failures(&server, "bad_record", 1);

    let mut leaving = wss_with(&ca, config.clone(), &server, &format!("token={key}"));
    leaving.get_mut().conn.send_close_notify();
    let stream = leaving.get_mut();
    stream.conn.complete_io(&mut stream.sock).unwrap();
    let mut rest = Vec::new();
    let _ = stream.sock.read_to_end(&mut rest);
    server.wait_for_metric("hookstream_connections", 0);

    let mut other = wss_with(&ca, config, &server, &format!("token={key}"));
    send_json(&mut other, r#"{"type":"ping"}"#);
    assert_eq!(next_json(&mut other)["type"], "pong");
}

/// A TLS 1.2 client's wss works too (hibernated, sealed by `tls_wire`).
#[test]
fn wss_over_tls12() {
    let ca = Ca::new();
    let pair = ca.leaf("a", 1);
    let server = tls_server(&pair, &["org_w"], &[]);
    let key = server.key("org_w").to_string();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert.der().clone()).unwrap();
    let tls12 = rustls::ClientConfig::builder_with_provider(Arc::new(
        #[allow(deprecated)]
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut ws = wss_with(&ca, Arc::new(tls12), &server, &format!("token={key}"));
    send_json(&mut ws, r#"{"type":"subscribe","channel":"events"}"#);
    assert_eq!(next_json(&mut ws)["type"], "subscribed");
    let seqs = server.publish_ok(&event("org_w", "evt_1", "s"));
    assert_eq!(next_json(&mut ws)["seq"].as_u64(), Some(seqs[0]));
}

/// `hookstream publish` to the admin listener of `server` with `args`
/// (and `env`); returns (success, stdout, stderr).
fn publish_cli(server: &Server, args: &[&str], env: &[(&str, &Path)]) -> (bool, String, String) {
    let mut command = common::hookstream_command();
    command
        .args(["publish", "--org", "org_a", "--type", "event", "--data"])
        .arg(r#"{"id":"evt_cli","source_id":"src_1"}"#)
        .arg("--data-dir")
        .arg(server.data_dir())
        .args(args);
    for (name, value) in env {
        command.env(name, value);
    }
    let output = command.output().expect("run hookstream publish");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `hookstream publish` reaches an admin listener under `--admin-tls`:
/// https:// with `--admin-tls` and `--ca` (or `HOOKSTREAM_CA`), or with
/// `--admin-url https://localhost:PORT` (the certificate's name). Without
/// the private CA the certificate is refused, and plain HTTP to the TLS
/// port is answered 400 `tls_required`; each says so in one line and
/// publishes nothing.
#[test]
fn publish_command_over_https_with_a_private_ca() {
    let ca = Ca::new();
    let pair = ca.leaf("a", 1);
    let server = tls_server(&pair, &["org_a"], &[("--admin-tls", "true")]);
    let key = server.key("org_a").to_string();
    let (mut events, _) = wss(&ca, &server, &format!("token={key}"));
    send_json(&mut events, r#"{"type":"subscribe","channel":"events"}"#);
    assert_eq!(next_json(&mut events)["type"], "subscribed");
    let admin = server.admin_addr.to_string();
    let ca_file = ca.ca_file();
    let ca_arg = ca_file.to_str().unwrap();
    let admin_url = format!("https://localhost:{}", server.admin_addr.port());

    // Refused: no private CA (the built-in roots do not know it), and
    // plain HTTP to the TLS port.
    let (ok, _, stderr) = publish_cli(&server, &["--admin-listen", &admin, "--admin-tls"], &[]);
    assert!(!ok);
    assert!(
        stderr.contains("cannot reach the admin listener at https://")
            && stderr.to_lowercase().contains("certificate"),
        "{stderr}"
    );
    let (ok, stdout, stderr) = publish_cli(&server, &["--admin-listen", &admin], &[]);
    assert!(!ok);
    assert!(stdout.contains(r#""tls_required""#), "{stdout}");
    assert!(
        stderr.contains("speaks TLS; publish with --admin-tls"),
        "{stderr}"
    );
    let (ok, _, stderr) = publish_cli(
        &server,
        &["--admin-url", "ftp://localhost:1", "--ca", ca_arg],
        &[],
    );
    assert!(!ok);
    assert!(
        stderr.contains("must start with http:// or https://"),
        "{stderr}"
    );

    // Accepted three ways; each message arrives once, in order.
    type Way<'a> = (Vec<&'a str>, Vec<(&'a str, &'a Path)>);
    let ways: [Way; 3] = [
        (
            vec!["--admin-listen", &admin, "--admin-tls", "--ca", ca_arg],
            vec![],
        ),
        (
            vec!["--admin-listen", &admin, "--admin-tls"],
            vec![("HOOKSTREAM_CA", ca_file.as_path())],
        ),
        (vec!["--admin-url", &admin_url, "--ca", ca_arg], vec![]),
    ];
    let mut seqs = Vec::new();
    for (args, env) in &ways {
        let (ok, stdout, stderr) = publish_cli(&server, args, env);
        assert!(ok, "{args:?}: {stderr}");
        let answer: Value = serde_json::from_str(stdout.trim()).expect("the 202 body");
        let seq = answer["seqs"][0].as_u64().expect("a seq");
        let got = next_json(&mut events);
        assert_eq!(got["seq"].as_u64(), Some(seq), "{got}");
        assert_eq!(got["data"]["id"], "evt_cli", "{got}");
        seqs.push(seq);
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
}

/// A rustls client limited to TLS 1.2 and one cipher suite.
fn tls12_config(ca: &Ca, suite: rustls::SupportedCipherSuite) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert.der().clone()).unwrap();
    #[allow(deprecated)]
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![suite];
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// TLS 1.2 wss connections hibernate like TLS 1.3 ones, with each AEAD
/// suite (AES-128-GCM and AES-256-GCM with their explicit nonces,
/// ChaCha20-Poly1305): one descriptor each (no socketpair, no task), a
/// client message over several records reassembled, a published message
/// larger than a record and a small one sealed to each; a forged record
/// closes its connection and is counted, a close_notify ends one, and the
/// others are served throughout.
#[test]
fn wss_over_tls12_hibernates_with_each_aead_suite() {
    use rustls::crypto::ring::cipher_suite;
    let ca = Ca::new();
    let pair = ca.leaf("a", 1);
    let server = tls_server(&pair, &["org_t"], &[("--upgrades-per-ip-per-sec", "0")]);
    let key = server.key("org_t").to_string();
    let query = format!("token={key}");
    let suites = [
        cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        cipher_suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    ];
    // Settle pools and lazily made state with a first connection.
    let mut first = wss_with(&ca, tls12_config(&ca, suites[0]), &server, &query);
    send_json(&mut first, r#"{"type":"subscribe","channel":"events"}"#);
    assert_eq!(next_json(&mut first)["type"], "subscribed");
    let before = open_fds(&server);
    let mut clients = Vec::new();
    for round in 0..10 {
        for suite in suites {
            let mut ws = wss_with(&ca, tls12_config(&ca, suite), &server, &query);
            let negotiated = ws.get_ref().conn.negotiated_cipher_suite().unwrap();
            assert_eq!(negotiated.suite(), suite.suite());
            assert_eq!(
                ws.get_ref().conn.protocol_version(),
                Some(rustls::ProtocolVersion::TLSv1_2)
            );
            // Three records' worth from the client (every tenth: 40 KB).
            let pad = "p".repeat(if round == 0 { 40_000 } else { 10 });
            send_json(
                &mut ws,
                &format!(r#"{{"type":"subscribe","channel":"events","pad":"{pad}"}}"#),
            );
            assert_eq!(next_json(&mut ws)["type"], "subscribed");
            clients.push(ws);
        }
    }
    let grown = open_fds(&server) - before;
    assert!(
        grown <= 32,
        "30 TLS 1.2 wss connections hold {grown} more descriptors: one each expected (no socketpair)"
    );
    let (big, small) = publish_big_then_small(&server, "org_t");
    for ws in clients.iter_mut().chain(std::iter::once(&mut first)) {
        expect_big_then_small(ws, big, small);
        // And the client's messages still open after the fan-out.
        send_json(ws, r#"{"type":"ping"}"#);
        assert_eq!(next_json(ws)["type"], "pong");
    }

    // A forged application-data record (GCM and ChaCha framing alike).
    for suite in [suites[0], suites[2]] {
        let mut forging = wss_with(&ca, tls12_config(&ca, suite), &server, &query);
        let mut forged = vec![0x17, 0x03, 0x03, 0x00, 0x30];
        forged.extend((0..0x30).map(|i| (i * 13) as u8));
        forging.get_mut().sock.write_all(&forged).unwrap();
        let mut rest = Vec::new();
        let _ = forging.get_mut().sock.read_to_end(&mut rest);
    }
    wait_for_tls_failures(&server, "bad_record", 2);

    // close_notify ends a connection; the others stay.
    let connections = clients.len() + 1;
    let mut leaving = wss_with(&ca, tls12_config(&ca, suites[1]), &server, &query);
    leaving.get_mut().conn.send_close_notify();
    let stream = leaving.get_mut();
    stream.conn.complete_io(&mut stream.sock).unwrap();
    let mut rest = Vec::new();
    let _ = stream.sock.read_to_end(&mut rest);
    server.wait_for_metric("hookstream_connections", connections as u64);
    for ws in clients.iter_mut().take(3) {
        send_json(ws, r#"{"type":"ping"}"#);
        assert_eq!(next_json(ws)["type"], "pong");
    }
    // SIGTERM: each gets a close frame 1001 sealed the TLS 1.2 way.
    server.signal(libc::SIGTERM);
    for ws in clients.iter_mut().step_by(7) {
        assert_eq!(close_code(ws), 1001);
    }
}

/// OpenSSL's TLS 1.2 (Python `ssl` capped at 1.2, `websockets`) against a
/// hibernating TLS 1.2 connection: another implementation than the rustls
/// the server's handshake used, so a framing mistake in the sealing code
/// would not cancel out. It sends a message over several records, gets
/// the big and the small message, and closes.
#[test]
fn openssl_tls12_client_over_a_hibernating_connection() {
    use std::io::BufRead;
    let ca = Ca::new();
    let pair = ca.leaf("a", 1);
    let server = tls_server(&pair, &["org_o"], &[]);
    let url = format!(
        "wss://localhost:{}/v1/ws?token={}",
        server.ws_addr.port(),
        server.key("org_o")
    );
    let script = r#"
import json, ssl, sys
from websockets.sync.client import connect
url, cafile = sys.argv[1], sys.argv[2]
context = ssl.create_default_context(cafile=cafile)
context.maximum_version = ssl.TLSVersion.TLSv1_2
with connect(url, ssl=context, open_timeout=10, close_timeout=5, max_size=None) as ws:
    assert json.loads(ws.recv(timeout=10))["type"] == "welcome"
    ws.send(json.dumps({"type": "subscribe", "channel": "events", "pad": "p" * 40000}))
    assert json.loads(ws.recv(timeout=10))["type"] == "subscribed"
    print("ready", ws.socket.version(), ws.socket.cipher()[0], flush=True)
    for _ in range(2):
        message = json.loads(ws.recv(timeout=10))
        print("got", message["seq"], len(message["data"].get("pad", "")), flush=True)
print("closed", flush=True)
"#;
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&url)
        .arg(ca.ca_file())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3");
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = lines.next().expect("a ready line").unwrap();
    assert!(ready.starts_with("ready TLSv1.2 "), "{ready}");
    let big = "b".repeat(100_000);
    let seqs = server.publish_ok(&format!(
        r#"{{"org_id":"org_o","type":"event","data":{{"id":"evt_big","source_id":"s","pad":"{big}"}}}}"#
    ));
    let small = server.publish_ok(&event("org_o", "evt_small", "s"));
    let got: Vec<String> = lines.by_ref().take(3).map(|l| l.unwrap()).collect();
    assert_eq!(
        got,
        vec![
            format!("got {} 100000", seqs[0]),
            format!("got {} 0", small[0]),
            "closed".to_string()
        ]
    );
    assert!(child.wait().unwrap().success());
    server.wait_for_metric("hookstream_connections", 0);
    assert_eq!(tls_failures(&server, "bad_record"), 0);
}

/// A hot upgrade cannot carry a wss connection's record state yet: the
/// connection is closed with 1012 (service restart), and the client
/// resumes on the new process with `after`.
#[test]
fn wss_hot_upgrade_closes_1012_and_the_client_resumes() {
    let ca = Ca::new();
    let pair = ca.leaf("a", 1);
    let mut server = tls_server(&pair, &["org_t"], &[]);
    let key = server.key("org_t").to_string();
    let (mut ws, welcome) = wss(&ca, &server, &format!("token={key}"));
    send_json(&mut ws, r#"{"type":"subscribe","channel":"events"}"#);
    assert_eq!(next_json(&mut ws)["type"], "subscribed");
    let output = common::hookstream_command()
        .args(["upgrade", "--timeout-secs", "60", "--data-dir"])
        .arg(server.data_dir())
        .output()
        .unwrap();
    let pid_file = server.data_dir().join("hookstream.pid");
    let new_pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // The new process is not this test's child: stop it at the end.
    struct Kill(i32);
    impl Drop for Kill {
        fn drop(&mut self) {
            // SAFETY: kill(2) of the server this test upgraded.
            unsafe { libc::kill(self.0, libc::SIGKILL) };
        }
    }
    let _kill = Kill(new_pid);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_ne!(new_pid as u32, server.pid());
    assert_eq!(close_code(&mut ws), 1012);
    let status = server
        .wait_exit(Duration::from_secs(15))
        .expect("the old process exits");
    assert!(status.success(), "{status}");
    // The same listener, now the new process's: resume from the welcome.
    server.publish_ok(&common::event("org_t", "e_after", "s"));
    let (mut again, _) = wss(&ca, &server, &format!("token={key}"));
    let after = welcome["seq"].as_u64().unwrap();
    send_json(
        &mut again,
        &format!(r#"{{"type":"subscribe","channel":"events","after":{after}}}"#),
    );
    assert_eq!(next_json(&mut again)["type"], "subscribed");
    let event = next_json(&mut again);
    assert_eq!(event["data"]["id"], "e_after", "{event}");
}

/// Publishes a 100 KB event (several TLS records when sealed) and then a
/// small one to `org`'s `events`; returns their seqs.
fn publish_big_then_small(server: &Server, org: &str) -> (u64, u64) {
    let pad = "b".repeat(100_000);
    let big = server.publish_ok(&format!(
        r#"{{"org_id":"{org}","type":"event","data":{{"id":"evt_big","source_id":"s","pad":"{pad}"}}}}"#
    ));
    let small = server.publish_ok(&event(org, "evt_small", "s"));
    (big[0], small[0])
}

/// The two messages of [`publish_big_then_small`] arrive whole, once, in
/// order.
fn expect_big_then_small(ws: &mut Wss, big: u64, small: u64) {
    let got = next_json(ws);
    assert_eq!(got["seq"].as_u64(), Some(big));
    assert_eq!(got["data"]["pad"].as_str().map(str::len), Some(100_000));
    assert_eq!(next_json(ws)["seq"].as_u64(), Some(small));
}

/// A self-signed P-256 pair for localhost and 127.0.0.1 made with openssl
/// in `dir` as `<name>.crt`/`<name>.key`, with `extra` `-addext` values.
fn openssl_self_signed(dir: &Path, name: &str, extra: &[&str]) -> Pair {
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    let mut command = Command::new("openssl");
    command.args([
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=localhost",
        "-addext",
        "subjectAltName=DNS:localhost,IP:127.0.0.1",
    ]);
    for value in extra {
        command.args(["-addext", value]);
    }
    let status = command
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .expect("openssl");
    assert!(status.success());
    Pair {
        cert,
        key,
        der: Vec::new(),
    }
}

/// `--ca` with the server's own self-signed certificate (PROTOCOL.md §1):
/// the README's openssl command makes one `hookstream publish` trusts. One
/// made by plain `openssl req -x509` is marked a CA (basicConstraints
/// CA:TRUE), which a TLS client must not accept as the server's own
/// certificate; the one line then says how to make one that works.
#[test]
fn publish_command_trusts_the_readme_self_signed_certificate() {
    let dir = TestDir::new();
    for (name, extra, works) in [
        ("readme", &["basicConstraints=critical,CA:FALSE"][..], true),
        ("plain", &[][..], false),
    ] {
        let pair = openssl_self_signed(dir.path(), name, extra);
        let server = tls_server(&pair, &["org_a"], &[("--admin-tls", "true")]);
        let admin = server.admin_addr.to_string();
        let ca = pair.cert.to_str().unwrap();
        let (ok, stdout, stderr) = publish_cli(
            &server,
            &["--admin-listen", &admin, "--admin-tls", "--ca", ca],
            &[],
        );
        assert_eq!(ok, works, "{name}: {stdout} {stderr}");
        if works {
            assert!(stdout.contains("\"accepted\":1"), "{name}: {stdout}");
        } else {
            assert_eq!(stdout, "", "{name}: nothing was answered");
            assert_eq!(stderr.lines().count(), 1, "{name}: {stderr}");
            assert!(
                stderr.contains("cannot reach the admin listener at https://")
                    && stderr.contains("basicConstraints=critical,CA:FALSE"),
                "{name}: {stderr}"
            );
        }
    }
}

/// The client's address in the per-address tests below, and another one.
const LOCAL: [u8; 4] = [127, 0, 0, 1];
const OTHER: [u8; 4] = [127, 0, 0, 2];

/// A TCP connection to `addr` from the loopback address `source`.
fn tcp_from(source: [u8; 4], addr: SocketAddr) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&SocketAddr::from((source, 0)).into()).unwrap();
    socket
        .connect_timeout(&addr.into(), STEP_TIMEOUT)
        .expect("TCP connect");
    let tcp: TcpStream = socket.into();
    tcp.set_read_timeout(Some(STEP_TIMEOUT)).unwrap();
    tcp.set_write_timeout(Some(STEP_TIMEOUT)).unwrap();
    tcp
}

/// A TLS handshake (name `localhost`) over `tcp`.
fn tls_over(config: Arc<rustls::ClientConfig>, tcp: TcpStream) -> std::io::Result<TlsStream> {
    let conn =
        rustls::ClientConnection::new(config, ServerName::try_from("localhost").unwrap()).unwrap();
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock)?;
    }
    Ok(stream)
}

/// A wss client of the server from `source`, welcome read; `Err` when the
/// connection is refused or closed on the way.
fn wss_from(ca: &Ca, server: &Server, source: [u8; 4], query: &str) -> Result<Wss, String> {
    let tcp = tcp_from(source, server.ws_addr);
    let stream = tls_over(ca.client_config(&[b"http/1.1"]), tcp).map_err(|e| e.to_string())?;
    let url = format!("wss://localhost:{}/v1/ws?{query}", server.ws_addr.port());
    let (mut ws, _) = tungstenite::client(url.as_str(), stream).map_err(|e| e.to_string())?;
    assert_eq!(next_json(&mut ws)["type"], "welcome");
    Ok(ws)
}

/// True when the server closes `tcp`, to which the client sent nothing,
/// without a byte within `within`.
fn closed_unread(tcp: &mut TcpStream, within: Duration) -> bool {
    tcp.set_read_timeout(Some(within)).unwrap();
    match tcp.read(&mut [0u8; 1]) {
        Ok(0) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

/// `name{...reason="<reason>"...}` from the (plain) admin listener.
fn metric_with_reason(server: &Server, name: &str, reason: &str) -> u64 {
    let text = server.admin_get("/metrics", true).text();
    text.lines()
        .filter(|l| {
            l.starts_with(&format!("{name}{{")) && l.contains(&format!("reason=\"{reason}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// `--http-connections-per-ip` counts a TLS connection from its accept,
/// before the handshake, until it is a WebSocket (docs/PROTOCOL.md §6):
/// idle connections, half ClientHellos and handshaken ones that send
/// nothing hold their address's places (8 here); past them a connection is closed at once,
/// unread; another address is served meanwhile; the server's open files
/// stay bounded; places come back when their connections close; and wss
/// connections do not count. TLS connections used to be counted only once
/// their first request reached the plaintext side: one address could hold
/// any number of handshakes and silent sessions, and fill the shard's
/// 1,024 handshakes in flight, locking every other client out.
#[test]
fn tls_connections_count_against_their_address_from_the_accept() {
    let ca = Ca::new();
    let pair = ca.leaf("a", 1);
    let server = tls_server(
        &pair,
        &["org_l"],
        &[("--shards", "1"), ("--http-connections-per-ip", "8")],
    );
    let key = server.key("org_l").to_string();
    let addr = server.ws_addr;
    let config = ca.client_config(&[b"http/1.1"]);
    let baseline = open_fds(&server);

    // Two idle, two that sent the start of a ClientHello, four handshaken
    // that send nothing.
    let mut idle: Vec<TcpStream> = (0..4).map(|_| tcp_from(LOCAL, addr)).collect();
    for tcp in &mut idle[2..] {
        tcp.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
            .unwrap();
    }
    let silent: Vec<TlsStream> = (0..4)
        .map(|_| tls_over(config.clone(), tcp_from(LOCAL, addr)).expect("TLS handshake"))
        .collect();
    for n in 0..32 {
        let mut tcp = tcp_from(LOCAL, addr);
        assert!(
            closed_unread(&mut tcp, Duration::from_secs(3)),
            "connection {} from one address was kept past its 8 places",
            n + 9
        );
    }
    assert!(
        metric_with_reason(
            &server,
            "hookstream_handshake_failures_total",
            "rate_limited"
        ) >= 32
    );
    // Another address is served meanwhile.
    let mut other =
        wss_from(&ca, &server, OTHER, &format!("token={key}")).expect("wss from 127.0.0.2");
    send_json(&mut other, r#"{"type":"ping"}"#);
    assert_eq!(next_json(&mut other)["type"], "pong");
    // The 8 held connections and the wss one, and a small margin: not the
    // 40 opened from the first address.
    let open = open_fds(&server);
    assert!(
        open <= baseline + 9 + 3,
        "{open} open files, {baseline} before 8 places and one wss"
    );

    // The places come back once their connections close.
    drop(idle);
    drop(silent);
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        match wss_from(&ca, &server, LOCAL, &format!("token={key}")) {
            Ok(_) => break,
            Err(e) => {
                assert!(Instant::now() < deadline, "places never came back: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    // wss connections do not count: 12 at once from one address.
    let mut sockets: Vec<Wss> = (0..12)
        .map(|n| {
            wss_from(&ca, &server, LOCAL, &format!("token={key}"))
                .unwrap_or_else(|e| panic!("wss {n}: {e}"))
        })
        .collect();
    // Nor do those upgraded by a later request of a kept-alive connection
    // (served by the plaintext side, behind the terminator's pump).
    for n in 0..10 {
        let tcp = tcp_from(LOCAL, addr);
        let mut tls = tls_over(config.clone(), tcp).expect("TLS handshake");
        assert_eq!(https_get(&mut tls, "/healthz"), 200);
        let url = format!("wss://localhost:{}/v1/ws?token={key}", addr.port());
        let (mut ws, _) = tungstenite::client(url.as_str(), tls)
            .unwrap_or_else(|e| panic!("later upgrade {n}: {e}"));
        assert_eq!(next_json(&mut ws)["type"], "welcome");
        sockets.push(ws);
    }
    for ws in &mut sockets {
        send_json(ws, r#"{"type":"ping"}"#);
        assert_eq!(next_json(ws)["type"], "pong");
    }
}

/// `GET path` on a TLS connection that stays open (keep-alive); the
/// status.
fn https_get(stream: &mut TlsStream, path: &str) -> u16 {
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
        .unwrap();
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&buffer).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .expect("Content-Length");
            if body.len() >= length {
                return head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap();
            }
        }
        let n = stream.read(&mut chunk).expect("read an answer");
        assert!(n > 0, "closed before a whole answer: {text}");
        buffer.extend_from_slice(&chunk[..n]);
    }
}

/// Under `--admin-tls` the admin listener counts connections per source
/// address as it does plain (here 4), under the client's own address and
/// from the accept: past its places a connection is closed at once and
/// unread, another address is served, and places come back. Behind TLS
/// the admin side used to see only its socketpair, which has no address,
/// and counted nothing.
#[test]
fn admin_tls_connections_count_against_their_address() {
    let ca = Ca::new();
    let pair = ca.leaf("a", 1);
    let server = tls_server(
        &pair,
        &[],
        &[
            ("--admin-tls", "true"),
            ("--shards", "1"),
            ("--http-connections-per-ip", "4"),
        ],
    );
    let addr = server.admin_addr;
    let config = ca.client_config(&[b"http/1.1"]);
    let idle: Vec<TcpStream> = (0..2).map(|_| tcp_from(LOCAL, addr)).collect();
    // Two that were served a request each and stay open.
    let kept: Vec<TlsStream> = (0..2)
        .map(|_| {
            let mut tls = tls_over(config.clone(), tcp_from(LOCAL, addr)).expect("TLS handshake");
            assert_eq!(https_get(&mut tls, "/healthz"), 200);
            tls
        })
        .collect();
    for n in 0..8 {
        let mut tcp = tcp_from(LOCAL, addr);
        assert!(
            closed_unread(&mut tcp, Duration::from_secs(3)),
            "admin connection {} from one address was kept past its 4 places",
            n + 5
        );
    }
    let mut other = tls_over(config.clone(), tcp_from(OTHER, addr)).expect("TLS from 127.0.0.2");
    assert_eq!(https_get(&mut other, "/healthz"), 200);
    drop(idle);
    drop(kept);
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let served = tls_over(config.clone(), tcp_from(LOCAL, addr))
            .ok()
            .and_then(|mut tls| {
                let status = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    https_get(&mut tls, "/healthz")
                }));
                status.ok()
            });
        if served == Some(200) {
            break;
        }
        assert!(Instant::now() < deadline, "admin places never came back");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The status of a wss upgrade with `query`.
fn wss_status(ca: &Ca, server: &Server, query: &str) -> u16 {
    let stream = tls_connect(ca.client_config(&[b"http/1.1"]), server.ws_addr);
    let url = format!("wss://localhost:{}/v1/ws?{query}", server.ws_addr.port());
    match tungstenite::client(url.as_str(), stream) {
        Ok((_, response)) => response.status().as_u16(),
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(response))) => {
            response.status().as_u16()
        }
        Err(e) => panic!("wss upgrade: {e}"),
    }
}

/// A refused wss upgrade is authenticated once, as a plain one: with 6
/// failed authentications a minute per address, 6 bad keys over wss get
/// 401 and the next ones 429, and a valid key is still let in. The TLS
/// path used to hand a refused upgrade to the plaintext side, which
/// authenticated it again: a failure cost two of the 6, and only 3 got 401.
#[test]
fn a_refused_wss_upgrade_is_authenticated_once() {
    let ca = Ca::new();
    let pair = ca.leaf("a", 1);
    let server = tls_server(
        &pair,
        &["org_r"],
        &[("--shards", "1"), ("--auth-failures-per-ip-per-min", "6")],
    );
    let statuses: Vec<u16> = (0..10)
        .map(|n| wss_status(&ca, &server, &format!("token=hsk_guess{n:040}")))
        .collect();
    // The bucket holds 6 and gains one every 10 s: the 7th may be let
    // through on a slow run, never fewer than 6.
    let unauthorized = statuses.iter().filter(|s| **s == 401).count();
    assert!(statuses[..6].iter().all(|s| *s == 401), "{statuses:?}");
    assert!(unauthorized <= 7, "{statuses:?}");
    assert!(
        statuses.iter().all(|s| matches!(s, 401 | 429)),
        "{statuses:?}"
    );
    assert_eq!(statuses[9], 429, "{statuses:?}");
    assert_eq!(
        metric_with_reason(
            &server,
            "hookstream_handshake_failures_total",
            "unauthorized"
        ),
        unauthorized as u64
    );
    let (mut ws, _) = wss(&ca, &server, &format!("token={}", server.key("org_r")));
    send_json(&mut ws, r#"{"type":"ping"}"#);
    assert_eq!(next_json(&mut ws)["type"], "pong");
}

/// One address cannot fill a shard's 1,024 handshakes in flight: with the
/// default 256 connections per address (one shard), 1,100 idle TCP
/// connections from one address hold 256 places, the rest are closed at
/// once, none is refused as `busy`, another address completes a wss
/// handshake, and the server holds about 256 descriptors for them, not
/// 1,100. (Before, those 1,100 held every handshake place for 10 s and
/// the other address was closed at accept.)
#[test]
fn one_address_cannot_fill_the_handshakes_in_flight() {
    let ca = Ca::new();
    let pair = ca.leaf("a", 1);
    let server = tls_server(&pair, &["org_p"], &[("--shards", "1")]);
    let key = server.key("org_p").to_string();
    let baseline = open_fds(&server);
    let flood: Vec<TcpStream> = (0..1100).map(|_| tcp_from(LOCAL, server.ws_addr)).collect();
    let mut ws =
        wss_from(&ca, &server, OTHER, &format!("token={key}")).expect("wss from 127.0.0.2");
    send_json(&mut ws, r#"{"type":"ping"}"#);
    assert_eq!(next_json(&mut ws)["type"], "pong");
    assert_eq!(tls_failures(&server, "busy"), 0);
    // Every flood connection was accepted before the wss one (one accept
    // queue): 844 refused, 256 held.
    let refused = metric_with_reason(
        &server,
        "hookstream_handshake_failures_total",
        "rate_limited",
    );
    assert_eq!(refused, 1100 - 256);
    let open = open_fds(&server);
    assert!(
        open <= baseline + 256 + 1 + 3,
        "{open} open files, {baseline} before 256 places and one wss"
    );
    drop(flood);
}
