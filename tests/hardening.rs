//! Hostile and careless clients (issue 19), over real sockets against a
//! real server process: revocation is one moment for every shard, files
//! are private, a panic does not leave a half-dead server, every answer
//! has a write timeout, abandoned waits give their sockets back.
//!
//! Every read has a deadline; bounds asserted here are the documented
//! limits of PROTOCOL.md §6, measured on the server process.

mod common;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{
    cli, http_request, open_sse, Client, Server, ServerBuilder, UpgradeError, STEP_TIMEOUT,
};
use serde_json::Value;

/// Creates a key for `org` while the server runs and waits until the
/// server accepts it: (id, key).
fn create_live_key(server: &Server, org: &str) -> (String, String) {
    let text = cli(
        &["api-keys", "create", "--name", "h", "--org", org, "--json"],
        server.data_dir(),
    );
    let created: Value = serde_json::from_str(&text).expect("create --json prints JSON");
    let id = created["id"].as_str().unwrap().to_string();
    let key = created["key"].as_str().unwrap().to_string();
    let deadline = Instant::now() + STEP_TIMEOUT;
    while bearer_status(server.ws_addr, &key) != 200 {
        assert!(Instant::now() < deadline, "the new key never worked");
        std::thread::sleep(Duration::from_millis(50));
    }
    (id, key)
}

/// Status of `GET /v1/sessions` with `key` as bearer token, on a fresh
/// connection (so on whichever shard the kernel picks).
fn bearer_status(addr: SocketAddr, key: &str) -> u16 {
    http_request(
        addr,
        "GET",
        "/v1/sessions",
        &[("Authorization", format!("Bearer {key}"))],
        b"",
    )
    .status
}

/// Waits until one of `streams` ends (EOF or reset); returns its index.
fn first_to_end(streams: &mut [TcpStream]) -> usize {
    for stream in streams.iter() {
        stream
            .set_read_timeout(Some(Duration::from_millis(2)))
            .unwrap();
    }
    let deadline = Instant::now() + STEP_TIMEOUT;
    let mut buffer = [0u8; 4096];
    loop {
        assert!(Instant::now() < deadline, "no stream ended");
        for (i, stream) in streams.iter_mut().enumerate() {
            match stream.read(&mut buffer) {
                Ok(0) => return i,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return i,
                _ => {}
            }
        }
    }
}

/// Item 9: once any shard has acted on a revocation (closed a stream of
/// the key), no shard accepts the key again. The streams are spread over
/// both shards (the kernel picks the accepting shard per connection), and
/// the attempts start the moment the first stream ends: with a key index
/// per shard, reloaded by each shard on its own timer, the other shard
/// still accepted the key for up to half a second.
#[test]
fn once_one_shard_closed_a_revoked_keys_stream_no_shard_accepts_the_key() {
    let server = ServerBuilder::new().org("org_r").arg("--shards", 2).start();
    let (id, key) = create_live_key(&server, "org_r");
    let path = format!("/v1/sse?channels=issues&token={key}");
    let mut streams: Vec<TcpStream> = (0..12)
        .map(|_| open_sse(server.ws_addr, &path, &[]).0)
        .collect();

    cli(&["api-keys", "revoke", &id], server.data_dir());
    first_to_end(&mut streams);
    // Fewer than the failed-authentication limit (60 a minute), which would
    // answer 429 instead.
    for attempt in 0..10 {
        assert_eq!(
            bearer_status(server.ws_addr, &key),
            401,
            "attempt {attempt} right after a shard closed the key's stream"
        );
        match Client::try_upgrade(server.ws_addr, &format!("/v1/ws?token={key}")) {
            Err(UpgradeError::Status(401)) => {}
            Ok(_) => panic!("attempt {attempt}: the revoked key was upgraded"),
            Err(e) => panic!("attempt {attempt}: {e:?}"),
        }
    }
    // The other key of the org is untouched.
    assert_eq!(bearer_status(server.ws_addr, server.key("org_r")), 200);
}
