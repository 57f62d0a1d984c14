//! HTTP at the edges, as load balancers, proxies and publishers send it
//! (PROTOCOL.md §1, §2, §3, §6), over real sockets and real clients (curl,
//! tungstenite) against `hookstream serve`:
//!
//! - `/healthz` and `/readyz` on the public listener too, without a token;
//!   HTTP/1.0 probes without `Host` on both listeners (raw socket and
//!   `curl -0`); every other HTTP/1.0 request keeps its 505;
//! - a WebSocket upgrade sent as a later request of a kept-alive connection;
//! - chunked publish bodies (curl `-T -`, `--data-binary @-` with
//!   `Transfer-Encoding: chunked`) under the 16 MiB limit: 413 past it and a
//!   body cut short publish nothing; neither length nor chunking: 411;
//! - a missing `Sec-WebSocket-Version` is 400, a wrong one 426;
//! - every error is JSON of one shape on both listeners;
//! - an unauthenticated publish is answered 401 before its body is read,
//!   and 16 MiB bodies sent with bad tokens do not grow the server.
//!
//! Every read has a deadline; no assertion is about speed.

mod common;

use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    http_raw, issue, read_http_response, read_some, tcp_connect, upgrade_request, Client,
    HttpResponse, Server, ServerBuilder, STEP_TIMEOUT,
};
use serde_json::Value;

const MIB: usize = 1024 * 1024;

/// Reads everything until the server closes the connection (EOF or reset).
fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    let mut bytes = Vec::new();
    loop {
        match read_some(stream, &mut bytes, deadline) {
            Ok(0) => return bytes,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return bytes,
            Err(e) => panic!("the connection was not closed: {e}; read {bytes:?}"),
        }
    }
}

/// Sends `request` on a fresh socket and reads until the server closes it.
fn raw_until_close(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = tcp_connect(addr);
    stream.write_all(request).unwrap();
    String::from_utf8_lossy(&read_to_close(&mut stream)).into_owned()
}

/// Asserts `response` is an error answer of the one shape: JSON with a
/// string `error` equal to `code`.
fn assert_json_error(response: &HttpResponse, status: u16, code: &str, what: &str) {
    assert_eq!(response.status, status, "{what}: {}", response.text());
    assert_eq!(
        response.header("content-type"),
        Some("application/json"),
        "{what}"
    );
    let body: Value = serde_json::from_slice(&response.body)
        .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {:?}", response.text()));
    assert_eq!(body["error"], code, "{what}: {body}");
}

fn curl(args: &[&str], stdin: &[u8]) -> String {
    let mut child = Command::new("curl")
        .args(["-s", "-S", "--max-time", "10"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("curl runs");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// `after=0` poll of `channels`: every retained message's seq.
fn retained(server: &Server, org: &str, channels: &str) -> Vec<u64> {
    // A page holds at most 1 MiB of messages (PROTOCOL.md §6), so read
    // page after page until one comes back empty.
    let mut seqs = Vec::new();
    let mut after = 0;
    loop {
        let response = common::http_request(
            server.ws_addr,
            "GET",
            &format!(
                "/v1/poll?channels={channels}&after={after}&limit=1000&token={}",
                server.key(org)
            ),
            &[],
            b"",
        );
        assert_eq!(response.status, 200, "{}", response.text());
        let page = response.json();
        let messages = page["messages"].as_array().unwrap();
        if messages.is_empty() {
            return seqs;
        }
        seqs.extend(messages.iter().map(|m| m["seq"].as_u64().unwrap()));
        after = page["next_after"].as_u64().unwrap();
    }
}

#[test]
fn health_probes_answer_on_both_listeners_and_to_http10_without_host() {
    let server = Server::start(&["org_h"]);
    for (listener, addr) in [("public", server.ws_addr), ("admin", server.admin_addr)] {
        // HAProxy's default check: HTTP/1.0, no Host, then the close.
        let answer = raw_until_close(addr, b"GET /healthz HTTP/1.0\r\n\r\n");
        assert!(
            answer.starts_with("HTTP/1.1 200 OK\r\n"),
            "{listener}: {answer}"
        );
        assert!(
            answer.ends_with("\r\n\r\n{\"status\":\"ok\"}"),
            "{listener}: {answer}"
        );
        assert!(
            answer.contains("Connection: close\r\n"),
            "{listener}: {answer}"
        );
        let answer = raw_until_close(addr, b"GET /readyz HTTP/1.0\r\nHost: lb\r\n\r\n");
        assert!(
            answer.ends_with("{\"status\":\"ready\"}"),
            "{listener}: {answer}"
        );
        let answer = raw_until_close(addr, b"HEAD /readyz HTTP/1.0\r\n\r\n");
        assert!(
            answer.starts_with("HTTP/1.1 200 OK\r\n"),
            "{listener}: {answer}"
        );
        assert!(answer.ends_with("\r\n\r\n"), "HEAD has no body: {answer}");
        // curl -0 (HTTP/1.0).
        for path in ["/healthz", "/readyz"] {
            let out = curl(&["-0", "-i", &format!("http://{addr}{path}")], b"");
            assert!(out.starts_with("HTTP/1.1 200"), "{listener} {path}: {out}");
            assert!(out.contains("\"status\":"), "{listener} {path}: {out}");
        }
        // Any other HTTP/1.0 request keeps its 505.
        for request in [
            &b"GET /metrics HTTP/1.0\r\nHost: h\r\n\r\n"[..],
            b"GET /v1/poll?channels=events HTTP/1.0\r\n\r\n",
            b"POST /healthz HTTP/1.0\r\n\r\n",
            b"GET /v1/ws HTTP/1.0\r\nHost: h\r\n\r\n",
        ] {
            let response = http_raw(addr, request);
            assert_json_error(
                &response,
                505,
                "http_version_not_supported",
                &format!("{listener} {:?}", String::from_utf8_lossy(request)),
            );
        }
    }
    // On the public listener, HTTP/1.1 without a token, kept alive.
    let mut stream = tcp_connect(server.ws_addr);
    for path in ["/healthz", "/readyz", "/healthz"] {
        write!(stream, "GET {path} HTTP/1.1\r\nHost: gw\r\n\r\n").unwrap();
        let response = read_http_response(&mut stream);
        assert_eq!(response.status, 200, "{path}: {}", response.text());
        assert!(response.json()["status"].is_string());
    }
    write!(
        stream,
        "POST /healthz HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let response = read_http_response(&mut stream);
    assert_json_error(&response, 405, "method_not_allowed", "POST /healthz");
    assert_eq!(response.header("allow"), Some("GET, HEAD"));
}

/// Opens a WebSocket on `stream` (tungstenite's client) after whatever
/// was already exchanged on it; the welcome is read.
fn upgrade_on(stream: TcpStream, addr: SocketAddr, path: &str) -> Client {
    stream.set_read_timeout(Some(STEP_TIMEOUT)).unwrap();
    // Its own handshake, not the helpers': never offers permessage-deflate.
    let stream = common::DeflateStream::plain(stream);
    let (ws, response) = tungstenite::client(format!("ws://{addr}{path}"), stream)
        .unwrap_or_else(|e| panic!("upgrade on the kept-alive connection: {e}"));
    assert_eq!(response.status().as_u16(), 101);
    ws.get_ref()
        .get_ref()
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut client = Client {
        ws,
        welcome: Value::Null,
        pings: 0,
    };
    client.welcome = client.next_json(STEP_TIMEOUT);
    assert_eq!(client.welcome["type"], "welcome");
    client
}

#[test]
fn an_upgrade_as_a_later_request_of_a_kept_alive_connection_upgrades() {
    let server = ServerBuilder::new().org("org_k").arg("--shards", 2).start();
    let key = server.key("org_k").to_string();
    // After a GET of a probe, then after a poll with the key: each on one
    // connection, the upgrade its second (third) request.
    let mut stream = tcp_connect(server.ws_addr);
    write!(stream, "GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n").unwrap();
    assert_eq!(read_http_response(&mut stream).status, 200);
    let mut after_probe = upgrade_on(stream, server.ws_addr, &format!("/v1/ws?token={key}"));

    let mut stream = tcp_connect(server.ws_addr);
    for _ in 0..2 {
        write!(
            stream,
            "GET /v1/poll?channels=issues&token={key} HTTP/1.1\r\nHost: gw\r\n\r\n"
        )
        .unwrap();
        let response = read_http_response(&mut stream);
        assert_eq!(response.status, 200, "{}", response.text());
    }
    let mut after_polls = upgrade_on(stream, server.ws_addr, &format!("/v1/ws?token={key}"));

    for client in [&mut after_probe, &mut after_polls] {
        client.subscribe("issues");
    }
    let seq = server.publish_ok(&issue("org_k", "later"))[0];
    for client in [&mut after_probe, &mut after_polls] {
        let message = client.next_json(STEP_TIMEOUT);
        assert_eq!(message["seq"], seq, "{message}");
        client.ping_pong();
    }

    // A refused later upgrade is answered like a first one.
    let mut stream = tcp_connect(server.ws_addr);
    write!(stream, "GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n").unwrap();
    assert_eq!(read_http_response(&mut stream).status, 200);
    let request = upgrade_request(server.ws_addr, "/v1/ws?token=hsk_wrong", &[]);
    stream.write_all(request.as_bytes()).unwrap();
    let response = read_http_response(&mut stream);
    assert_json_error(&response, 401, "unauthorized", "later upgrade, bad key");
}

#[test]
fn a_missing_websocket_version_is_400_and_a_wrong_one_426() {
    let server = Server::start(&["org_v"]);
    let key = server.key("org_v");
    let path = format!("/v1/ws?token={key}");
    let without =
        upgrade_request(server.ws_addr, &path, &[]).replace("Sec-WebSocket-Version: 13\r\n", "");
    assert!(!without.contains("Sec-WebSocket-Version"), "{without}");
    let response = http_raw(server.ws_addr, without.as_bytes());
    assert_json_error(&response, 400, "bad_request", "no Sec-WebSocket-Version");
    let wrong = upgrade_request(server.ws_addr, &path, &[])
        .replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8");
    let response = http_raw(server.ws_addr, wrong.as_bytes());
    assert_json_error(
        &response,
        426,
        "upgrade_required",
        "Sec-WebSocket-Version: 8",
    );
    assert_eq!(response.header("sec-websocket-version"), Some("13"));
}

#[test]
fn chunked_ndjson_publishes_with_curl() {
    let server = Server::start(&["org_c"]);
    let mut subscriber = server.connect("org_c");
    subscriber.subscribe("issues");
    let url = format!("http://{}/v1/publish", server.admin_addr);
    let auth = format!("Authorization: Bearer {}", server.admin_token);
    let ndjson = format!(
        "{}\n{}\n{}\n",
        issue("org_c", "a"),
        issue("org_c", "b"),
        issue("org_c", "c")
    );
    // curl -T - sends the body from stdin chunked (length unknown).
    let out = curl(
        &[
            "-T",
            "-",
            "-X",
            "POST",
            "-H",
            &auth,
            "-H",
            "Content-Type: application/x-ndjson",
            &url,
        ],
        ndjson.as_bytes(),
    );
    let answer: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(answer["accepted"], 3, "{answer}");
    assert_eq!(answer["seqs"], serde_json::json!([1, 2, 3]));
    // --data-binary @- with the header asked for explicitly, a JSON array.
    let array = common::array(&[issue("org_c", "d"), issue("org_c", "e")]);
    let out = curl(
        &[
            "-i",
            "--data-binary",
            "@-",
            "-H",
            "Transfer-Encoding: chunked",
            "-H",
            &auth,
            "-H",
            "Content-Type: application/json",
            &url,
        ],
        array.as_bytes(),
    );
    assert!(out.starts_with("HTTP/1.1 202"), "{out}");
    assert!(out.contains("\"seqs\":[4,5]"), "{out}");
    for seq in 1..=5u64 {
        let message = subscriber.next_json(STEP_TIMEOUT);
        assert_eq!(message["seq"], seq, "{message}");
    }

    // Several chunked publishes on one kept-alive connection, by hand: a
    // body in odd chunk sizes with an extension and a trailer.
    let mut stream = tcp_connect(server.admin_addr);
    for round in 0..2 {
        let body = issue("org_c", &format!("raw{round}"));
        let (first, rest) = body.split_at(7);
        write!(
            stream,
            "POST /v1/publish HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {}\r\n\
             Transfer-Encoding: chunked\r\n\r\n{:x};note=1\r\n{first}\r\n{:x}\r\n{rest}\r\n0\r\nX-Done: 1\r\n\r\n",
            server.admin_token,
            first.len(),
            rest.len()
        )
        .unwrap();
        let response = read_http_response(&mut stream);
        assert_eq!(response.status, 202, "{}", response.text());
        assert_eq!(response.json()["seqs"][0], 6 + round);
    }
}

/// Sends a chunked NDJSON publish of about `total_bytes`, one 1 MiB
/// message per chunk; returns the answer and whether the whole body was
/// written.
fn chunked_publish(server: &Server, org: &str, total_bytes: usize) -> (HttpResponse, bool) {
    let mut stream = tcp_connect(server.admin_addr);
    write!(
        stream,
        "POST /v1/publish HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n",
        server.admin_token
    )
    .unwrap();
    let reader = stream.try_clone().unwrap();
    let padding = "x".repeat(MIB - 200);
    let line = format!(
        "{{\"org_id\":\"{org}\",\"type\":\"issue\",\"data\":{{\"id\":\"big\",\"pad\":\"{padding}\"}}}}\n"
    );
    let writer = std::thread::spawn(move || {
        for _ in 0..total_bytes / MIB {
            let chunk = format!("{:x}\r\n{line}\r\n", line.len());
            if stream.write_all(chunk.as_bytes()).is_err() {
                return false;
            }
        }
        stream.write_all(b"0\r\n\r\n").is_ok()
    });
    let mut reader = reader;
    let response = read_http_response(&mut reader);
    let completed = writer.join().unwrap();
    (response, completed)
}

#[test]
fn a_chunked_body_past_16_mib_is_413_and_publishes_nothing() {
    let server = Server::start(&["org_l"]);
    // Just under the limit: 15 lines of 1 MiB are published.
    let (response, completed) = chunked_publish(&server, "org_l", 15 * MIB);
    assert!(completed);
    assert_eq!(response.status, 202, "{}", response.text());
    assert_eq!(response.json()["accepted"], 15);
    // Past it: 413 as soon as the limit is passed, nothing of it published.
    let (response, _) = chunked_publish(&server, "org_l", 17 * MIB);
    assert_json_error(&response, 413, "payload_too_large", "17 MiB chunked");
    assert_eq!(response.header("connection"), Some("close"));
    assert_eq!(
        retained(&server, "org_l", "issues"),
        (1..=15).collect::<Vec<u64>>()
    );
    assert_eq!(server.publish_ok(&issue("org_l", "next")), vec![16]);
}

#[test]
fn a_chunked_body_cut_short_publishes_nothing() {
    let server = Server::start(&["org_s"]);
    let mut subscriber = server.connect("org_s");
    subscriber.subscribe("issues");
    // Whole messages in a first chunk, then the connection ends mid-body.
    for cut in ["", "2", "20\r\n{\"org_id\"", "0\r\n"] {
        let mut stream = tcp_connect(server.admin_addr);
        let line = format!("{}\n", issue("org_s", "cut"));
        write!(
            stream,
            "POST /v1/publish HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n\
             {:x}\r\n{line}\r\n{cut}",
            server.admin_token,
            line.len()
        )
        .unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        let answer = read_to_close(&mut stream);
        assert!(
            answer.is_empty(),
            "cut {cut:?}: {:?}",
            String::from_utf8_lossy(&answer)
        );
    }
    // A malformed chunk is 400, and publishes nothing either.
    let response = http_raw(
        server.admin_addr,
        format!(
            "POST /v1/publish HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {}\r\n\
             Transfer-Encoding: chunked\r\n\r\nzz\r\n{{}}\r\n0\r\n\r\n",
            server.admin_token
        )
        .as_bytes(),
    );
    assert_json_error(&response, 400, "bad_request", "malformed chunk size");
    // Nothing reached the subscriber or the history: the next publish is
    // the org's first message.
    assert_eq!(server.publish_ok(&issue("org_s", "whole")), vec![1]);
    assert_eq!(subscriber.next_json(STEP_TIMEOUT)["seq"], 1);
    assert_eq!(retained(&server, "org_s", "issues"), vec![1]);
}

#[test]
fn a_publish_with_neither_length_nor_chunking_is_411() {
    let server = Server::start(&["org_x"]);
    let response = http_raw(
        server.admin_addr,
        format!(
            "POST /v1/publish HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\n\r\n",
            server.admin_token
        )
        .as_bytes(),
    );
    assert_json_error(&response, 411, "length_required", "publish without framing");
    // Another coding than chunked, or both framings, are refused too.
    let response = http_raw(
        server.admin_addr,
        format!(
            "POST /v1/publish HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {}\r\n\
             Transfer-Encoding: gzip\r\n\r\n",
            server.admin_token
        )
        .as_bytes(),
    );
    assert_json_error(&response, 411, "length_required", "gzip");
    let response = http_raw(
        server.admin_addr,
        format!(
            "POST /v1/publish HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {}\r\n\
             Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
            server.admin_token
        )
        .as_bytes(),
    );
    assert_json_error(&response, 400, "bad_request", "chunked and a length");
    assert_eq!(server.publish_ok(&issue("org_x", "first")), vec![1]);
}

/// Sends a partial head and reads the head timeout's answer (10 s).
fn timed_out_head(addr: SocketAddr) -> HttpResponse {
    let mut stream = tcp_connect(addr);
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost:").unwrap();
    // read_http_response waits STEP_TIMEOUT (10 s) from its call.
    std::thread::sleep(Duration::from_secs(5));
    read_http_response(&mut stream)
}

#[test]
fn errors_are_json_of_one_shape_on_both_listeners() {
    let server = ServerBuilder::new()
        .org("org_e")
        .arg("--auth-failures-per-ip-per-min", 1)
        .arg("--publish-body-bytes", 1024)
        .start();
    let public = server.ws_addr;
    let admin = server.admin_addr;
    let token = server.admin_token.clone();
    // The two 408s take the head timeout (10 s): wait for both at once.
    let timeouts = [public, admin].map(|addr| std::thread::spawn(move || timed_out_head(addr)));

    let long_head = format!(
        "GET /healthz HTTP/1.1\r\nHost: h\r\nX-Long: {}\r\n\r\n",
        "a".repeat(9 * 1024)
    );
    let cases: Vec<(&str, SocketAddr, String, u16, &str)> = vec![
        ("public 404", public, "GET /nowhere HTTP/1.1\r\nHost: h\r\n\r\n".into(), 404, "not_found"),
        (
            "public 405",
            public,
            "DELETE /v1/poll HTTP/1.1\r\nHost: h\r\n\r\n".into(),
            405,
            "method_not_allowed",
        ),
        (
            "public 411",
            public,
            "POST /v1/sessions HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n".into(),
            411,
            "length_required",
        ),
        (
            "public 413",
            public,
            "POST /v1/sessions HTTP/1.1\r\nHost: h\r\nContent-Length: 1000000\r\n\r\n".into(),
            413,
            "payload_too_large",
        ),
        ("public 431", public, long_head.clone(), 431, "headers_too_large"),
        ("public 505", public, "GET / HTTP/2.0\r\nHost: h\r\n\r\n".into(), 505, "http_version_not_supported"),
        (
            "admin 404",
            admin,
            format!("GET /nowhere HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer {token}\r\n\r\n"),
            404,
            "not_found",
        ),
        (
            "admin 405",
            admin,
            format!("GET /v1/publish HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer {token}\r\n\r\n"),
            405,
            "method_not_allowed",
        ),
        (
            "admin 411",
            admin,
            format!("POST /v1/publish HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer {token}\r\n\r\n"),
            411,
            "length_required",
        ),
        (
            "admin 413",
            admin,
            format!(
                "POST /v1/publish HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer {token}\r\nContent-Length: 2000\r\n\r\n"
            ),
            413,
            "payload_too_large",
        ),
        ("admin 431", admin, long_head, 431, "headers_too_large"),
        ("admin 505", admin, "GET /metrics HTTP/2.0\r\nHost: h\r\n\r\n".into(), 505, "http_version_not_supported"),
        ("admin 401", admin, "GET /metrics HTTP/1.1\r\nHost: h\r\n\r\n".into(), 401, "unauthorized"),
    ];
    for (what, addr, request, status, code) in cases {
        let response = http_raw(addr, request.as_bytes());
        assert_json_error(&response, status, code, what);
    }
    // 429: past the failed-authentication limit (1 a minute here).
    let bad = || {
        common::http_request(
            public,
            "GET",
            "/v1/poll?channels=events&token=hsk_wrong",
            &[],
            b"",
        )
    };
    // Each shard keeps its share of the limit: a few tries reach it on
    // whichever shard the connections land.
    let limited = (0..20)
        .map(|_| bad())
        .find(|response| {
            if response.status == 401 {
                assert_json_error(response, 401, "unauthorized", "bad key");
            }
            response.status != 401
        })
        .expect("the failed-authentication limit was never reached");
    assert_json_error(&limited, 429, "rate_limited", "public 429");
    assert!(limited.header("retry-after").is_some());
    // A chunked publish past the (here 1 KiB) limit: the same 413, answered
    // from the chunk's size line. The rest of the body, sent after the
    // answer, must not turn the close into a reset that fails the client's
    // write or loses the answer: the server reads and drops it (lingers).
    let mut stream = tcp_connect(admin);
    write!(
        stream,
        "POST /v1/publish HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\n\
         Transfer-Encoding: chunked\r\n\r\n800\r\n"
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    write!(stream, "{}\r\n", "x".repeat(0x800)).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    write!(stream, "0\r\n\r\n").unwrap();
    let response = read_http_response(&mut stream);
    assert_json_error(&response, 413, "payload_too_large", "admin chunked 413");
    for (timeout, listener) in timeouts.into_iter().zip(["public", "admin"]) {
        let response = timeout.join().unwrap();
        assert_json_error(
            &response,
            408,
            "request_timeout",
            &format!("{listener} 408"),
        );
    }
}

/// One unauthenticated 16 MiB publish on a raw socket: the head alone is
/// answered 401 and the connection closed; the body then cannot be sent.
/// Returns the bytes of body the socket took before it failed.
fn unauthenticated_big_publish(
    addr: SocketAddr,
    authorization: Option<&str>,
    chunked: bool,
) -> usize {
    let mut stream = tcp_connect(addr);
    let auth = authorization
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    let framing = if chunked {
        "Transfer-Encoding: chunked\r\n".to_string()
    } else {
        format!("Content-Length: {}\r\n", 16 * MIB)
    };
    write!(
        stream,
        "POST /v1/publish HTTP/1.1\r\nHost: a\r\n{auth}{framing}Content-Type: application/json\r\n\r\n"
    )
    .unwrap();
    // The answer comes before a byte of the body was sent.
    let response = read_http_response(&mut stream);
    assert_json_error(&response, 401, "unauthorized", "unauthenticated publish");
    assert_eq!(response.header("connection"), Some("close"));
    // The connection is closed: the body cannot be delivered.
    let block = vec![b'x'; 64 * 1024];
    let mut sent = 0;
    while sent < 16 * MIB {
        match stream.write(&block) {
            Ok(n) => sent += n,
            Err(_) => return sent,
        }
    }
    panic!("the server took a whole unauthenticated 16 MiB body");
}

#[test]
fn unauthenticated_16_mib_publish_bodies_are_refused_unread_without_growth() {
    let server = Server::start(&["org_u"]);
    let admin = server.admin_addr;
    // Warm up: one of each, so first-use allocations are not counted.
    unauthenticated_big_publish(admin, None, false);
    let before_kib = server.rss_kib();
    let senders: Vec<_> = (0..8)
        .map(|i| {
            std::thread::spawn(move || {
                let auth = match i % 3 {
                    0 => None,
                    1 => Some("Bearer wrong-token"),
                    _ => Some("Basic YWRtaW46YWRtaW4="),
                };
                unauthenticated_big_publish(admin, auth, i % 2 == 1)
            })
        })
        .collect();
    let sent: Vec<usize> = senders.into_iter().map(|t| t.join().unwrap()).collect();
    let after_kib = server.rss_kib();
    let growth_kib = after_kib.saturating_sub(before_kib);
    eprintln!("8 unauthenticated 16 MiB publishes: RSS {before_kib} -> {after_kib} KiB; body bytes the sockets took before failing: {sent:?}");
    // Reading the bodies would cost 128 MiB; a few MiB is allocator noise.
    assert!(growth_kib < 8 * 1024, "RSS grew by {growth_kib} KiB");
    assert!(sent.iter().all(|&bytes| bytes < 16 * MIB));
    assert_eq!(server.publish_ok(&issue("org_u", "still")), vec![1]);
    // A wrong token on /metrics is answered and closed the same way.
    let answer = raw_until_close(
        admin,
        b"GET /metrics HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer nope\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 401 "), "{answer}");
    assert!(answer.ends_with("{\"error\":\"unauthorized\"}"), "{answer}");
}

#[test]
fn readyz_while_draining_is_an_error_answer_like_the_others() {
    // One shard: the one draining is the one holding the probe connection.
    let server = ServerBuilder::new().org("org_d").arg("--shards", 1).start();
    // A WebSocket that never answers the server's close keeps the drain
    // going (up to its 3 s), with this kept-alive probe connection open.
    let _held = server.connect("org_d");
    let mut probe = tcp_connect(server.admin_addr);
    write!(probe, "GET /readyz HTTP/1.1\r\nHost: lb\r\n\r\n").unwrap();
    assert_eq!(read_http_response(&mut probe).json()["status"], "ready");
    server.signal(libc::SIGTERM);
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        write!(probe, "GET /readyz HTTP/1.1\r\nHost: lb\r\n\r\n").unwrap();
        let response = read_http_response(&mut probe);
        if response.status == 503 {
            assert_json_error(&response, 503, "unavailable", "readyz while draining");
            assert_eq!(response.json()["status"], "stopping");
            break;
        }
        assert_eq!(response.status, 200, "{}", response.text());
        assert!(Instant::now() < deadline, "readyz never said stopping");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `HEAD path` and then `GET /healthz` on one kept-alive connection;
/// returns the HEAD answer's head and every byte that came after it up to
/// the close, which must be exactly the `GET`'s answer.
fn head_then_healthz(addr: SocketAddr, path: &str) -> (String, String) {
    let mut stream = tcp_connect(addr);
    write!(
        stream,
        "HEAD {path} HTTP/1.1\r\nHost: h\r\n\r\nGET /healthz HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let answer = String::from_utf8_lossy(&read_to_close(&mut stream)).into_owned();
    let (head, rest) = answer
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("HEAD {path}: no complete answer head: {answer:?}"));
    (head.to_string(), rest.to_string())
}

/// RFC 9110 §9.3.2: the answer to a HEAD never has a body, whatever its
/// status — a client reads none, so body bytes would be taken for the
/// start of the next answer on a kept-alive connection (Node's http client
/// fails with a parse error). No public route but the probes serves HEAD:
/// each answers it as it answers any method it does not take (405 with
/// `Allow`, or 404), head only.
#[test]
fn head_refusals_on_the_public_listener_have_no_body() {
    let server = Server::start(&["org_h"]);
    let key = server.key("org_h").to_string();
    let cases = [
        ("/".to_string(), 405, Some("GET")),
        ("/v1/client.js".to_string(), 405, Some("GET")),
        (format!("/v1/events?token={key}"), 405, Some("GET, OPTIONS")),
        (
            "/v1/poll?channels=events".to_string(),
            405,
            Some("GET, OPTIONS"),
        ),
        (
            "/v1/collections/col_1/sync".to_string(),
            405,
            Some("GET, OPTIONS"),
        ),
        ("/v1/sessions".to_string(), 405, Some("GET, POST, DELETE")),
        ("/nowhere".to_string(), 404, None),
    ];
    for (path, status, allow) in cases {
        let (head, rest) = head_then_healthz(server.ws_addr, &path);
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status} ")),
            "HEAD {path}: {head}"
        );
        let allow_line = head.lines().find_map(|line| line.strip_prefix("Allow: "));
        assert_eq!(allow_line, allow, "HEAD {path}: {head}");
        assert!(
            rest.starts_with("HTTP/1.1 200 OK\r\n") && rest.ends_with("{\"status\":\"ok\"}"),
            "HEAD {path}: the answer after the HEAD's head must be the next request's, got {rest:?}"
        );
    }
    // The upgrade path refuses HEAD and closes: still no body.
    let answer = raw_until_close(
        server.ws_addr,
        format!("HEAD /v1/ws?token={key} HTTP/1.1\r\nHost: h\r\n\r\n").as_bytes(),
    );
    assert!(answer.starts_with("HTTP/1.1 405 "), "HEAD /v1/ws: {answer}");
    assert!(
        answer.contains("\r\nAllow: GET\r\n"),
        "HEAD /v1/ws: {answer}"
    );
    assert!(
        answer.ends_with("\r\n\r\n"),
        "HEAD /v1/ws has a body: {answer:?}"
    );
}

/// RFC 9110 §11.6.1: a 401 carries a `WWW-Authenticate` challenge. Every
/// 401 of both listeners names the scheme it takes, `Bearer`, once — on
/// the WebSocket upgrade, the history routes and sessions as on the admin
/// listener's publish and metrics.
#[test]
fn every_401_carries_a_bearer_challenge() {
    let server = Server::start(&["org_w"]);
    let public = server.ws_addr;
    let admin = server.admin_addr;
    let cases: Vec<(&str, SocketAddr, String)> = vec![
        (
            "upgrade without credentials",
            public,
            upgrade_request(public, "/v1/ws", &[]),
        ),
        (
            "upgrade with a wrong key",
            public,
            upgrade_request(public, "/v1/ws?token=hsk_wrong", &[]),
        ),
        (
            "poll without credentials",
            public,
            "GET /v1/poll?channels=events HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n".into(),
        ),
        (
            "list with a wrong bearer",
            public,
            "GET /v1/events HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer hsk_wrong\r\nConnection: close\r\n\r\n".into(),
        ),
        (
            "sign-in without a key",
            public,
            "POST /v1/sessions HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into(),
        ),
        (
            "publish without a token",
            admin,
            "POST /v1/publish HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\n{}".into(),
        ),
        (
            "metrics with a wrong token",
            admin,
            "GET /metrics HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer wrong\r\n\r\n".into(),
        ),
    ];
    for (what, addr, request) in cases {
        let response = http_raw(addr, request.as_bytes());
        assert_json_error(&response, 401, "unauthorized", what);
        let challenges: Vec<&str> = response
            .headers
            .iter()
            .filter(|(name, _)| name.eq_ignore_ascii_case("www-authenticate"))
            .map(|(_, value)| value.as_str())
            .collect();
        assert_eq!(challenges, ["Bearer"], "{what}: {:?}", response.headers);
    }
}

/// The first request of a public connection, refused before its body was
/// read (413: a body past the public routes' 16 KiB), whose client sends
/// the body after the answer anyway: the server reads and drops it
/// (lingers) instead of closing with unread input, which makes the kernel
/// answer with a reset that fails the client's writes and can lose the
/// answer. Later requests and the admin listener did so already.
#[test]
fn a_first_public_request_refused_unread_lingers_for_its_body() {
    let server = Server::start(&["org_a"]);
    for attempt in 0..4 {
        let mut stream = tcp_connect(server.ws_addr);
        write!(
            stream,
            "POST /v1/sessions HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
            64 * 1024
        )
        .unwrap();
        // The answer is written and the server closes its side.
        std::thread::sleep(Duration::from_millis(200));
        let body = vec![b'x'; 16 * 1024];
        for part in 0..4 {
            stream
                .write_all(&body)
                .unwrap_or_else(|e| panic!("attempt {attempt}: body part {part}: {e}"));
            std::thread::sleep(Duration::from_millis(50));
        }
        let response = common::read_http_response(&mut stream);
        assert_json_error(&response, 413, "payload_too_large", "public 413");
    }
}
