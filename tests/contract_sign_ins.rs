//! PROTOCOL.md §5: each sign-in is its own session. Two browsers signing in
//! with one key in the same second get different cookies, and signing one
//! out leaves the other signed in, on every route and on its WebSocket. The
//! close of a signed-out session's WebSocket says "signed out", a revoked
//! key's "key revoked" (both 4003). Cookies of the first format (no nonce)
//! stay valid until they expire. All through real sockets against
//! `hookstream serve`.

mod common;

use std::net::SocketAddr;
use std::time::Instant;

use common::{cli, http_request, sign_in, Client, HttpResponse, ServerBuilder, STEP_TIMEOUT};
use hookstream::auth::sessions::{Session, SessionSigner};
use tungstenite::Message;

/// Requests per check: connections spread over the shards by SO_REUSEPORT.
const ATTEMPTS: usize = 6;

fn sign_out(addr: SocketAddr, cookie: &str) {
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
}

fn get_with_cookie(addr: SocketAddr, path: &str, cookie: &str) -> HttpResponse {
    http_request(
        addr,
        "GET",
        path,
        &[("Cookie", format!("hs_session={cookie}"))],
        b"",
    )
}

fn ws_with_cookie(addr: SocketAddr, cookie: &str) -> Client {
    let cookie = format!("hs_session={cookie}");
    let origin = format!("http://{addr}");
    let mut client = Client::try_upgrade_with(
        addr,
        "/v1/ws",
        &[("Cookie", cookie.as_str()), ("Origin", origin.as_str())],
    )
    .expect("cookie upgrade");
    client.welcome = client.next_json(STEP_TIMEOUT);
    client
}

/// Every cookie route answers `status`, `ATTEMPTS` times each.
fn routes_answer(addr: SocketAddr, cookie: &str, status: u16) {
    for attempt in 0..ATTEMPTS {
        for path in ["/v1/sessions", "/v1/poll?channels=events", "/v1/events"] {
            let response = get_with_cookie(addr, path, cookie);
            assert_eq!(
                response.status,
                status,
                "attempt {attempt}, GET {path}: {}",
                response.text()
            );
        }
    }
}

/// Reads past messages until the close frame: its code and reason.
fn close_of(client: &mut Client) -> (u16, String) {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        assert!(Instant::now() < deadline, "no close frame");
        match client.ws.read() {
            Ok(Message::Close(Some(frame))) => {
                let _ = client.ws.flush();
                return (u16::from(frame.code), frame.reason.to_string());
            }
            Ok(Message::Close(None)) => panic!("a close frame without a code"),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("no close frame: {e}"),
        }
    }
}

#[test]
fn two_sign_ins_with_one_key_in_one_second_sign_out_separately() {
    let server = ServerBuilder::new().org("org_a").arg("--shards", 2).start();
    let addr = server.ws_addr;
    let key = server.key("org_a").to_string();
    // Signed in within the same second (the expiry has second resolution,
    // so without a nonce these two were one cookie).
    let (first, second) = loop {
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let first = sign_in(addr, &key);
        let second = sign_in(addr, &key);
        let ended = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        if started == ended {
            break (first, second);
        }
    };
    assert_ne!(first, second, "each sign-in gets its own cookie");
    let mut first_socket = ws_with_cookie(addr, &first);
    let mut second_socket = ws_with_cookie(addr, &second);

    sign_out(addr, &first);
    routes_answer(addr, &first, 401);
    let (code, reason) = close_of(&mut first_socket);
    assert_eq!((code, reason.as_str()), (4003, "signed out"));
    // The other sign-in is untouched: every route, its open socket, and a
    // new socket with its cookie.
    routes_answer(addr, &second, 200);
    second_socket.ping_pong();
    second_socket.subscribe("issues");
    let seq = server.publish_ok(&common::issue("org_a", "after_sign_out"))[0];
    assert_eq!(second_socket.next_json(STEP_TIMEOUT)["seq"], seq);
    ws_with_cookie(addr, &second).ping_pong();

    // Revoking the key closes the rest, and says it was the key.
    let listed: serde_json::Value =
        serde_json::from_str(&cli(&["api-keys", "list", "--json"], server.data_dir())).unwrap();
    let id = listed[0]["id"].as_str().unwrap().to_string();
    cli(&["api-keys", "revoke", &id], server.data_dir());
    let (code, reason) = close_of(&mut second_socket);
    assert_eq!((code, reason.as_str()), (4003, "key revoked"));
}

#[test]
fn first_format_cookies_stay_valid_until_they_expire_and_sign_out() {
    let server = ServerBuilder::new().org("org_b").start();
    let addr = server.ws_addr;
    let listed: serde_json::Value =
        serde_json::from_str(&cli(&["api-keys", "list", "--json"], server.data_dir())).unwrap();
    let key_id = listed[0]["id"].as_str().unwrap().to_string();
    let signer = SessionSigner::load_or_create(server.data_dir()).expect("the server's secret");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let session = |expires_unix_secs| Session {
        org_id: "org_b".to_string(),
        key_id: key_id.clone(),
        expires_unix_secs,
    };
    // A cookie an earlier version issued (no nonce), still within its day.
    let old = signer.issue_without_nonce(&session(now + 3600));
    assert!(old.starts_with("1.org_b."), "{old}");
    routes_answer(addr, &old, 200);
    ws_with_cookie(addr, &old).ping_pong();
    // Past its expiry it is refused like any expired cookie.
    let expired = signer.issue_without_nonce(&session(now.saturating_sub(1)));
    assert_eq!(get_with_cookie(addr, "/v1/sessions", &expired).status, 401);
    // And it signs out like a new one.
    sign_out(addr, &old);
    routes_answer(addr, &old, 401);
    // A new sign-in has the new format and is unaffected.
    let new = sign_in(addr, server.key("org_b"));
    assert!(new.starts_with("2.org_b."), "{new}");
    routes_answer(addr, &new, 200);
}

/// A session's WebSockets are closed when it expires, on every shard:
/// 4003 with the reason "session expired", never before the expiry. Its
/// cookie is refused from then on, and the key's own connection stays.
#[test]
fn an_expired_sessions_websockets_are_closed_with_4003_session_expired() {
    let server = ServerBuilder::new()
        .org("org_a")
        .arg("--shards", 2)
        .arg("--session-ttl-secs", 3)
        .start();
    let addr = server.ws_addr;
    let key = server.key("org_a").to_string();
    let cookie = sign_in(addr, &key);
    // The expiry has second resolution: 3 s from the second it was signed
    // in, so about 2 s from now at the least (less the sign-in's answer).
    let signed_in = Instant::now();
    let mut sockets: Vec<Client> = (0..ATTEMPTS)
        .map(|_| ws_with_cookie(addr, &cookie))
        .collect();
    let mut of_key = server.connect("org_a");
    for (i, socket) in sockets.iter_mut().enumerate() {
        let (code, reason) = close_of(socket);
        assert_eq!(
            (code, reason.as_str()),
            (4003, "session expired"),
            "socket {i}"
        );
        assert!(
            signed_in.elapsed() >= std::time::Duration::from_secs(1),
            "socket {i} closed {:?} after the sign-in",
            signed_in.elapsed()
        );
    }
    routes_answer(addr, &cookie, 401);
    of_key.ping_pong();
}
