//! PROTOCOL.md §5 sign-out: after `DELETE /v1/sessions` the cookie it was
//! sent with is a dead credential — refused with 401 by every route on
//! every shard, also after a restart — and the WebSocket and SSE
//! connections it opened are closed (4003 on the WebSocket, as for a
//! revoked key, §1/§2). All through real sockets against `hookstream serve`.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use common::{
    create_key, http_request, tcp_connect, Client, HttpResponse, ServerBuilder, TestDir,
    UpgradeError, STEP_TIMEOUT,
};

/// Requests made per check: connections are spread over the shards by
/// SO_REUSEPORT's 4-tuple hash, so several land on each shard.
const ATTEMPTS: usize = 8;

/// `DELETE /v1/sessions` with the cookie, as the page's own origin.
fn sign_out(addr: SocketAddr, cookie: &str) -> HttpResponse {
    let response = http_request(
        addr,
        "DELETE",
        "/v1/sessions",
        &[
            ("Cookie", format!("hs_session={cookie}")),
            ("Origin", format!("http://{addr}")),
        ],
        b"",
    );
    assert_eq!(response.status, 204, "{}", response.text());
    let clear = response.header("set-cookie").expect("Set-Cookie");
    assert!(clear.starts_with("hs_session=; Max-Age=0"), "{clear}");
    response
}

/// `GET` of `path` with the cookie.
fn get_with_cookie(addr: SocketAddr, path: &str, cookie: &str) -> HttpResponse {
    http_request(
        addr,
        "GET",
        path,
        &[("Cookie", format!("hs_session={cookie}"))],
        b"",
    )
}

/// A WebSocket upgrade with the cookie from the page's own origin.
fn ws_with_cookie(addr: SocketAddr, cookie: &str) -> Result<Client, UpgradeError> {
    let cookie = format!("hs_session={cookie}");
    let origin = format!("http://{addr}");
    let mut client = Client::try_upgrade_with(
        addr,
        "/v1/ws",
        &[("Cookie", cookie.as_str()), ("Origin", origin.as_str())],
    )?;
    client.welcome = client.next_json(STEP_TIMEOUT);
    Ok(client)
}

/// Every route that takes the cookie, `ATTEMPTS` times each, answers
/// `status`.
fn every_route_answers(addr: SocketAddr, cookie: &str, status: u16) {
    for attempt in 0..ATTEMPTS {
        for path in ["/v1/sessions", "/v1/poll?channels=events", "/v1/events"] {
            let response = get_with_cookie(addr, path, cookie);
            assert_eq!(
                response.status,
                status,
                "attempt {attempt}, GET {path}: {}",
                response.text()
            );
            if status == 401 {
                assert_eq!(response.json()["error"], "unauthorized");
            }
        }
        match (ws_with_cookie(addr, cookie), status) {
            (Ok(_), 200) => {}
            (Err(UpgradeError::Status(401)), 401) => {}
            (Ok(_), _) => panic!("attempt {attempt}: the WebSocket upgrade was accepted"),
            (Err(e), _) => panic!("attempt {attempt}: upgrade: {e:?}"),
        }
    }
}

#[test]
fn a_signed_out_cookie_is_refused_on_every_shard() {
    let server = ServerBuilder::new().org("org_a").arg("--shards", 2).start();
    let addr = server.ws_addr;
    let cookie = common::sign_in(addr, server.key("org_a"));
    every_route_answers(addr, &cookie, 200);
    // A second browser signed in with the same key (a second later, so its
    // cookie differs: the expiry is in seconds).
    std::thread::sleep(Duration::from_millis(1_100));
    let other = common::sign_in(addr, server.key("org_a"));
    assert_ne!(other, cookie);

    sign_out(addr, &cookie);
    // At once, with no wait: the answer of the sign-out is the moment.
    every_route_answers(addr, &cookie, 401);
    // Signing out twice is harmless, and still 204.
    sign_out(addr, &cookie);
    // Only that session ended: the other browser and the key itself work.
    every_route_answers(addr, &other, 200);
    let bearer = http_request(
        addr,
        "GET",
        "/v1/sessions",
        &[("Authorization", format!("Bearer {}", server.key("org_a")))],
        b"",
    );
    assert_eq!(bearer.status, 200, "{}", bearer.text());
    // The cookie's value is never written anywhere a log could show it.
    assert!(!server.stderr().contains(&cookie), "{}", server.stderr());
}

#[test]
fn signing_out_closes_the_sessions_websockets_with_4003() {
    let server = ServerBuilder::new().org("org_a").arg("--shards", 2).start();
    let addr = server.ws_addr;
    let cookie = common::sign_in(addr, server.key("org_a"));
    let mut of_session: Vec<Client> = (0..ATTEMPTS)
        .map(|_| ws_with_cookie(addr, &cookie).expect("cookie upgrade"))
        .collect();
    let mut of_key = server.connect("org_a");
    std::thread::sleep(Duration::from_millis(1_100));
    let other = common::sign_in(addr, server.key("org_a"));
    let mut of_other = ws_with_cookie(addr, &other).expect("cookie upgrade");

    sign_out(addr, &cookie);
    for (i, client) in of_session.iter_mut().enumerate() {
        assert_eq!(
            client.expect_close(STEP_TIMEOUT),
            Some(4003),
            "connection {i} of the signed-out session"
        );
    }
    // Connections opened with the key or another session stay open.
    of_key.ping_pong();
    of_other.ping_pong();
}

/// `GET /v1/sse` with the cookie; the stream after its `200` head.
fn sse_with_cookie(addr: SocketAddr, cookie: &str) -> std::net::TcpStream {
    let mut stream = tcp_connect(addr);
    let request = format!(
        "GET /v1/sse?channels=events HTTP/1.1\r\nHost: {addr}\r\nCookie: hs_session={cookie}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut head = Vec::new();
    let deadline = Instant::now() + STEP_TIMEOUT;
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        assert!(Instant::now() < deadline, "no SSE head");
        let mut byte = [0u8; 1];
        match stream.read(&mut byte) {
            Ok(0) => panic!("EOF before the SSE head"),
            Ok(_) => head.push(byte[0]),
            Err(_) => {}
        }
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    stream
}

/// True when `stream` reaches EOF (or a reset) within `timeout`.
fn ends_within(stream: &mut std::net::TcpStream, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut buffer = [0u8; 4096];
    while Instant::now() < deadline {
        match stream.read(&mut buffer) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => {}
        }
    }
    false
}

#[test]
fn signing_out_ends_the_sessions_sse_streams() {
    let server = ServerBuilder::new().org("org_a").arg("--shards", 2).start();
    let addr = server.ws_addr;
    let cookie = common::sign_in(addr, server.key("org_a"));
    let mut of_session: Vec<_> = (0..4).map(|_| sse_with_cookie(addr, &cookie)).collect();
    std::thread::sleep(Duration::from_millis(1_100));
    let other = common::sign_in(addr, server.key("org_a"));
    let mut of_other = sse_with_cookie(addr, &other);

    sign_out(addr, &cookie);
    for (i, stream) in of_session.iter_mut().enumerate() {
        assert!(
            ends_within(stream, STEP_TIMEOUT),
            "SSE stream {i} of the signed-out session still open"
        );
    }
    // Another session's stream goes on: it still gets what is published.
    server.publish_ok(&common::event("org_a", "evt_1", "src_1"));
    let deadline = Instant::now() + STEP_TIMEOUT;
    let mut seen = Vec::new();
    let mut buffer = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("evt_1") {
        assert!(
            Instant::now() < deadline,
            "the other session's stream got nothing"
        );
        match of_other.read(&mut buffer) {
            Ok(0) => panic!("the other session's stream ended"),
            Ok(n) => seen.extend_from_slice(&buffer[..n]),
            Err(_) => {}
        }
    }
}

/// `hookstream serve` over a data directory that outlives it.
fn start_node(dir: &Path) -> (Child, SocketAddr) {
    let args: Vec<String> = ["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]
        .iter()
        .map(|a| a.to_string())
        .collect();
    let spawned = common::spawn_serve(dir, &args, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("server did not start: {e:?}"));
    (spawned.child, spawned.ws_addr)
}

#[test]
fn a_sign_out_survives_a_restart() {
    let dir = TestDir::new();
    let key = create_key(dir.path(), "org_a");
    let (mut first, addr) = start_node(dir.path());
    let cookie = common::sign_in(addr, &key);
    std::thread::sleep(Duration::from_millis(1_100));
    let kept = common::sign_in(addr, &key);
    sign_out(addr, &cookie);
    // Killed, not drained: the sign-out was durable when it was answered.
    first.kill().unwrap();
    first.wait().unwrap();

    let (mut second, addr) = start_node(dir.path());
    // The signing secret survived, so an unrevoked cookie still works...
    assert_eq!(get_with_cookie(addr, "/v1/sessions", &kept).status, 200);
    // ...and the signed-out one does not.
    every_route_answers(addr, &cookie, 401);
    // The list holds no cookie, only names derived from it.
    let list = std::fs::read_to_string(dir.path().join("revoked-sessions")).unwrap();
    assert!(!list.contains(&cookie) && !list.is_empty(), "{list}");
    second.kill().unwrap();
    second.wait().unwrap();
}

/// A session's SSE streams end and its long-polls are answered 401 when
/// the session expires (as at a sign-out), on every shard; a stream opened
/// with the key goes on.
#[test]
fn an_expired_sessions_sse_streams_and_long_polls_end() {
    let server = ServerBuilder::new()
        .org("org_a")
        .arg("--shards", 2)
        .arg("--session-ttl-secs", 3)
        .start();
    let addr = server.ws_addr;
    let key = server.key("org_a").to_string();
    let cookie = common::sign_in(addr, &key);
    let mut streams: Vec<_> = (0..4).map(|_| sse_with_cookie(addr, &cookie)).collect();
    let polls: Vec<_> = (0..4)
        .map(|_| {
            let request = format!(
                "GET /v1/poll?channels=events&wait_ms=30000 HTTP/1.1\r\nHost: {addr}\r\nCookie: hs_session={cookie}\r\n\r\n"
            );
            std::thread::spawn(move || common::http_raw(addr, request.as_bytes()).status)
        })
        .collect();
    let mut of_key = tcp_connect(addr);
    of_key
        .write_all(
            format!("GET /v1/sse?channels=events&token={key} HTTP/1.1\r\nHost: {addr}\r\n\r\n")
                .as_bytes(),
        )
        .unwrap();
    for (i, stream) in streams.iter_mut().enumerate() {
        assert!(
            ends_within(stream, STEP_TIMEOUT),
            "SSE stream {i} of the expired session still open"
        );
    }
    for (i, poll) in polls.into_iter().enumerate() {
        assert_eq!(poll.join().unwrap(), 401, "long-poll {i}");
    }
    // The key's stream goes on: it still gets what is published.
    server.publish_ok(&common::event("org_a", "evt_1", "src_1"));
    let deadline = Instant::now() + STEP_TIMEOUT;
    let mut seen = Vec::new();
    let mut buffer = [0u8; 4096];
    of_key
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    while !String::from_utf8_lossy(&seen).contains("evt_1") {
        assert!(Instant::now() < deadline, "the key's stream got nothing");
        match of_key.read(&mut buffer) {
            Ok(0) => panic!("the key's stream ended"),
            Ok(n) => seen.extend_from_slice(&buffer[..n]),
            Err(_) => {}
        }
    }
}
