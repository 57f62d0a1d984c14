//! Access control over real sockets (issue 4, PROTOCOL.md §1, §2, §5, §6):
//! API keys created and revoked while the server runs, the key store
//! holding no key in clear, browser sessions and the Origin rule, the
//! per-address limits, the per-org connection cap, logs free of
//! credentials, and `serve --demo`.
//!
//! Every client is on 127.0.0.1 and every read has a deadline.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    cli, http_raw, http_request, tcp_connect, upgrade_request, Client, HttpResponse, Server,
    ServerBuilder, TestDir, STEP_TIMEOUT,
};
use serde_json::Value;

/// `api-keys list --json`.
fn list_keys(data_dir: &Path) -> Vec<Value> {
    let text = cli(&["api-keys", "list", "--json"], data_dir);
    let value: Value = serde_json::from_str(&text).expect("list --json prints JSON");
    value.as_array().expect("a JSON array").clone()
}

/// The id of the only key of `org`.
fn key_id_of(data_dir: &Path, org: &str) -> String {
    let keys = list_keys(data_dir);
    let ids: Vec<&str> = keys
        .iter()
        .filter(|k| k["org_id"] == org)
        .map(|k| k["id"].as_str().expect("id is a string"))
        .collect();
    assert_eq!(ids.len(), 1, "{keys:?}");
    ids[0].to_string()
}

/// Sends an upgrade and reads only the answer head: the status, and the
/// head text. Works for 101 (the welcome that follows is not read).
fn upgrade_status(addr: SocketAddr, path_and_query: &str, extra: &[&str]) -> (u16, String) {
    let mut stream = tcp_connect(addr);
    stream
        .write_all(upgrade_request(addr, path_and_query, extra).as_bytes())
        .expect("send upgrade");
    let deadline = Instant::now() + STEP_TIMEOUT;
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buffer[..at]).into_owned();
            let status = head
                .get(9..12)
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("bad status line in {head:?}"));
            return (status, head);
        }
        assert!(Instant::now() < deadline, "no answer head in time");
        match stream.read(&mut chunk) {
            Ok(0) => panic!("EOF before an answer head: {buffer:?}"),
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("read: {e}"),
        }
    }
}

/// A refused upgrade: the whole answer (it ends with the connection).
fn refused_upgrade(addr: SocketAddr, path_and_query: &str, extra: &[&str]) -> HttpResponse {
    let response = http_raw(
        addr,
        upgrade_request(addr, path_and_query, extra).as_bytes(),
    );
    assert_ne!(response.status, 101, "upgraded although it must not be");
    response
}

/// A tungstenite client with extra request headers (cookie, origin,
/// authorization); the welcome has been read. `Err` is the HTTP status of a
/// refusal.
fn connect_with(addr: SocketAddr, path: &str, headers: &[(&str, String)]) -> Result<Client, u16> {
    let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
    match Client::upgrade_once(addr, path, &headers) {
        Ok(mut client) => {
            client.welcome = client.next_json(STEP_TIMEOUT);
            Ok(client)
        }
        Err(common::UpgradeError::Status(status)) => Err(status),
        Err(common::UpgradeError::Other(e)) => panic!("handshake failed: {e}"),
    }
}

/// `POST /v1/sessions` with the key as bearer; returns the `hs_session`
/// value after checking the cookie's attributes.
fn open_session(server: &Server, key: &str) -> String {
    let response = http_request(
        server.ws_addr,
        "POST",
        "/v1/sessions",
        &[("Authorization", format!("Bearer {key}"))],
        b"",
    );
    assert_eq!(response.status, 200, "{}", response.text());
    let set_cookie = response
        .header("set-cookie")
        .expect("Set-Cookie")
        .to_string();
    let attributes: Vec<&str> = set_cookie.split(';').map(str::trim).collect();
    for wanted in ["HttpOnly", "SameSite=Lax", "Path=/"] {
        assert!(attributes.contains(&wanted), "{set_cookie}");
    }
    assert!(!attributes.contains(&"Secure"), "no TLS, so not Secure");
    let value = attributes[0]
        .strip_prefix("hs_session=")
        .expect("the cookie is hs_session");
    assert!(!value.is_empty());
    assert_eq!(response.header("cache-control"), Some("no-store"));
    let body = response.json();
    assert!(body["org_id"].is_string(), "{body}");
    value.to_string()
}

fn cookie_header(cookie: &str) -> (&'static str, String) {
    ("Cookie", format!("theme=dark; hs_session={cookie}"))
}

/// `GET /v1/sessions` with extra headers: who the credentials belong to.
fn whoami(server: &Server, headers: &[(&str, String)]) -> HttpResponse {
    http_request(server.ws_addr, "GET", "/v1/sessions", headers, b"")
}

/// The contract gives a running server 2 s to see a created or revoked
/// key, and every shard re-reads the key file on its own schedule: waits
/// until 2 s after `changed_at`, then checks `ATTEMPTS` upgrades with `key`
/// (landing on any shard) all get `status`.
fn after_2_s_every_upgrade_gets(addr: SocketAddr, key: &str, changed_at: Instant, status: u16) {
    const ATTEMPTS: usize = 8;
    std::thread::sleep(Duration::from_secs(2).saturating_sub(changed_at.elapsed()));
    for _ in 0..ATTEMPTS {
        let (got, head) = upgrade_status(addr, &format!("/v1/ws?token={key}"), &[]);
        assert_eq!(got, status, "2 s after the change: {head}");
    }
}

#[test]
fn a_created_key_connects_with_token_and_bearer_and_one_created_while_running_too() {
    let server = Server::start(&["org_a"]);
    let client = server.connect("org_a");
    assert_eq!(client.welcome["org_id"], "org_a");
    let bearer = connect_with(
        server.ws_addr,
        "/v1/ws",
        &[("Authorization", format!("Bearer {}", server.key("org_a")))],
    )
    .expect("bearer upgrade");
    assert_eq!(bearer.welcome["org_id"], "org_a");

    // A key created while the server runs works within 2 s.
    let created = cli(
        &["api-keys", "create", "--name", "late", "--org", "org_b"],
        server.data_dir(),
    );
    let created_at = Instant::now();
    let key = created.trim();
    assert!(key.starts_with("hsk_"), "{key}");
    after_2_s_every_upgrade_gets(server.ws_addr, key, created_at, 101);
    let mut client = Client::connect(server.ws_addr, &format!("/v1/ws?token={key}"));
    assert_eq!(client.welcome["org_id"], "org_b");
    client.ping_pong();
}

#[test]
fn revoking_closes_open_connections_with_4003_within_2_s_and_refuses_the_key() {
    let server = ServerBuilder::new().org("org_a").org("org_b").start();
    let mut revoked = server.connect("org_a");
    revoked.subscribe("events");
    let mut other = server.connect("org_b");
    let id = key_id_of(server.data_dir(), "org_a");

    cli(&["api-keys", "revoke", &id], server.data_dir());
    let revoked_at = Instant::now();
    let code = revoked.expect_close(Duration::from_secs(2));
    assert_eq!(code, Some(4003));
    assert!(revoked_at.elapsed() < Duration::from_secs(2));

    // Refused afterwards (every shard re-reads the key file on its own
    // schedule, within the same 2 s), with the same answer as a key that
    // never existed.
    after_2_s_every_upgrade_gets(server.ws_addr, server.key("org_a"), revoked_at, 401);
    let response = refused_upgrade(
        server.ws_addr,
        &format!("/v1/ws?token={}", server.key("org_a")),
        &[],
    );
    assert_eq!(response.status, 401);
    assert_eq!(response.json(), serde_json::json!({"error":"unauthorized"}));
    let unknown = refused_upgrade(
        server.ws_addr,
        "/v1/ws?token=hsk_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        &[],
    );
    assert_eq!(unknown.status, response.status);
    assert_eq!(unknown.body, response.body);
    // Opening a session with it is refused too.
    let session = http_request(
        server.ws_addr,
        "POST",
        "/v1/sessions",
        &[("Authorization", format!("Bearer {}", server.key("org_a")))],
        b"",
    );
    assert_eq!(session.status, 401);
    assert!(session.header("set-cookie").is_none());

    // Other keys are untouched.
    other.ping_pong();

    // list shows it revoked, never a key.
    let keys = list_keys(server.data_dir());
    let record = keys.iter().find(|k| k["id"] == id.as_str()).unwrap();
    assert!(record["revoked_at"].is_string(), "{record}");
    assert!(record.get("key").is_none() && record.get("hash").is_none());
}

#[test]
fn concurrent_creates_all_survive() {
    let dir = TestDir::new();
    const ROUNDS: usize = 6;
    let mut printed = Vec::new();
    for round in 0..ROUNDS {
        let children: Vec<Child> = (0..2)
            .map(|n| {
                Command::new(common::binary())
                    .args([
                        "api-keys",
                        "create",
                        "--json",
                        "--name",
                        &format!("k{round}_{n}"),
                        "--org",
                        "org_a",
                        "--data-dir",
                    ])
                    .arg(dir.path())
                    .env_remove("HOOKSTREAM_DATA_DIR")
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("spawn api-keys create")
            })
            .collect();
        for child in children {
            let output = child.wait_with_output().expect("wait for create");
            assert!(
                output.status.success(),
                "{}",
                String::from_utf8_lossy(&output.stderr)
            );
            let created: Value = serde_json::from_slice(&output.stdout).expect("--json output");
            for field in ["id", "name", "org_id", "key", "created_at"] {
                assert!(created[field].is_string(), "{field} missing in {created}");
            }
            printed.push(created);
        }
    }
    let listed = list_keys(dir.path());
    assert_eq!(listed.len(), 2 * ROUNDS, "{listed:?}");
    for created in &printed {
        assert!(
            listed.iter().any(|k| k["id"] == created["id"]),
            "{} lost",
            created["id"]
        );
    }
    // Every key is distinct.
    let mut keys: Vec<&str> = printed.iter().map(|c| c["key"].as_str().unwrap()).collect();
    keys.sort_unstable();
    keys.dedup();
    assert_eq!(keys.len(), 2 * ROUNDS);
}

/// Every regular file under `dir` (recursively), with its bytes.
fn all_files(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        for entry in std::fs::read_dir(&next).expect("read data dir") {
            let entry = entry.unwrap();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                pending.push(entry.path());
            } else if kind.is_file() {
                let bytes = std::fs::read(entry.path()).expect("read file");
                out.push((entry.path(), bytes));
            }
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn the_data_dir_holds_no_key_in_clear_and_last_used_is_recorded() {
    let mut server = ServerBuilder::new().org("org_a").org("org_b").start();
    let keys = [
        server.key("org_a").to_string(),
        server.key("org_b").to_string(),
    ];
    let mut client = server.connect("org_a");
    let cookie = open_session(&server, &keys[1]);
    client.ping_pong();
    // SIGTERM drains, which also writes the last-used times collected.
    server.signal(libc::SIGTERM);
    assert!(
        server.wait_exit(Duration::from_secs(10)).is_some(),
        "server did not exit"
    );

    let files = all_files(server.data_dir());
    let names: Vec<String> = files
        .iter()
        .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().any(|n| n == "keys.json"), "{names:?}");
    assert!(names.iter().any(|n| n == "session-secret"), "{names:?}");
    for (path, bytes) in &files {
        // Only `--demo` writes `demo-key`; this server did not run with it.
        assert_ne!(path.file_name().unwrap(), "demo-key");
        for key in &keys {
            // The whole key and its random part alone.
            let random = key.strip_prefix("hsk_").unwrap();
            assert!(
                !contains(bytes, key.as_bytes()) && !contains(bytes, random.as_bytes()),
                "{} holds a key in clear",
                path.display()
            );
        }
        assert!(
            !contains(bytes, cookie.as_bytes()),
            "{} holds a session cookie",
            path.display()
        );
    }
    for name in ["session-secret", "admin-token", "keys.json"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(server.data_dir().join(name))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{name} is readable by others: {mode:o}");
    }

    let listed = list_keys(server.data_dir());
    for record in &listed {
        assert!(
            record["last_used_at"].is_string(),
            "last use not recorded: {record}"
        );
    }
}

#[test]
fn session_cookie_works_from_an_allowed_origin_only() {
    let server = Server::start(&["org_a"]);
    let cookie = open_session(&server, server.key("org_a"));
    let own_origin = format!("http://{}", server.ws_addr);

    // WebSocket: the request's own Host is the default allowed origin.
    let mut client = connect_with(
        server.ws_addr,
        "/v1/ws",
        &[cookie_header(&cookie), ("Origin", own_origin.clone())],
    )
    .expect("cookie upgrade from the page's own origin");
    assert_eq!(client.welcome["org_id"], "org_a");
    client.ping_pong();

    // Another origin: 403, never upgraded.
    let cookie_line = format!("Cookie: hs_session={cookie}");
    let foreign = refused_upgrade(
        server.ws_addr,
        "/v1/ws",
        &[&cookie_line, "Origin: http://evil.example"],
    );
    assert_eq!(foreign.status, 403);
    assert_eq!(foreign.json(), serde_json::json!({"error":"forbidden"}));
    // A look-alike origin (the host as a prefix) is another origin.
    let lookalike = format!("Origin: http://{}.evil.example", server.ws_addr.ip());
    assert_eq!(
        refused_upgrade(server.ws_addr, "/v1/ws", &[&cookie_line, &lookalike]).status,
        403
    );
    // No Origin at all: refused.
    let missing = refused_upgrade(server.ws_addr, "/v1/ws", &[&cookie_line]);
    assert_eq!(missing.status, 403);

    // Token and bearer need no Origin and ignore a foreign one.
    let bearer = connect_with(
        server.ws_addr,
        "/v1/ws",
        &[
            ("Authorization", format!("Bearer {}", server.key("org_a"))),
            ("Origin", "http://evil.example".to_string()),
        ],
    );
    assert!(bearer.is_ok());

    // HTTP routes: allowed origin or none is fine, another origin is not.
    let mine = whoami(
        &server,
        &[cookie_header(&cookie), ("Origin", own_origin.clone())],
    );
    assert_eq!(mine.status, 200, "{}", mine.text());
    assert_eq!(mine.json()["org_id"], "org_a");
    let no_origin = whoami(&server, &[cookie_header(&cookie)]);
    assert_eq!(no_origin.status, 200);
    let foreign = whoami(
        &server,
        &[
            cookie_header(&cookie),
            ("Origin", "http://evil.example".to_string()),
        ],
    );
    assert_eq!(foreign.status, 403);
    assert_eq!(whoami(&server, &[]).status, 401);
    // The history routes apply the same rules.
    let poll = |headers: &[(&str, String)]| {
        http_request(
            server.ws_addr,
            "GET",
            "/v1/poll?channels=events",
            headers,
            b"",
        )
        .status
    };
    assert_eq!(
        poll(&[cookie_header(&cookie), ("Origin", own_origin.clone())]),
        200
    );
    assert_eq!(poll(&[cookie_header(&cookie)]), 200);
    assert_eq!(
        poll(&[
            cookie_header(&cookie),
            ("Origin", "http://evil.example".to_string())
        ]),
        403
    );
    assert_eq!(poll(&[]), 401);

    // Opening a session: bearer only, and not from another site's page.
    let by_query = http_request(
        server.ws_addr,
        "POST",
        &format!("/v1/sessions?token={}", server.key("org_a")),
        &[],
        b"",
    );
    assert_eq!(by_query.status, 401);
    let cross_site_sign_in = http_request(
        server.ws_addr,
        "POST",
        "/v1/sessions",
        &[
            ("Authorization", format!("Bearer {}", server.key("org_a"))),
            ("Origin", "http://evil.example".to_string()),
        ],
        b"",
    );
    assert_eq!(cross_site_sign_in.status, 403);
    assert!(cross_site_sign_in.header("set-cookie").is_none());
    let same_site_sign_in = http_request(
        server.ws_addr,
        "POST",
        "/v1/sessions",
        &[
            ("Authorization", format!("Bearer {}", server.key("org_a"))),
            ("Origin", own_origin.clone()),
        ],
        b"",
    );
    assert_eq!(same_site_sign_in.status, 200);

    // Signing out clears the cookie.
    let out = http_request(
        server.ws_addr,
        "DELETE",
        "/v1/sessions",
        &[("Origin", own_origin)],
        b"",
    );
    assert_eq!(out.status, 204);
    let cleared = out.header("set-cookie").expect("Set-Cookie");
    assert!(cleared.starts_with("hs_session=;"), "{cleared}");
    assert!(cleared.contains("Max-Age=0"), "{cleared}");
    let cross_site = http_request(
        server.ws_addr,
        "DELETE",
        "/v1/sessions",
        &[("Origin", "http://evil.example".to_string())],
        b"",
    );
    assert_eq!(cross_site.status, 403);
}

/// The answer head of a request that streams (SSE): status line and headers.
fn head_of(addr: SocketAddr, request: &str) -> String {
    let mut stream = tcp_connect(addr);
    stream.write_all(request.as_bytes()).expect("send request");
    let deadline = Instant::now() + STEP_TIMEOUT;
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            return String::from_utf8_lossy(&buffer[..at]).to_string();
        }
        assert!(Instant::now() < deadline, "no answer head");
        match stream.read(&mut chunk) {
            Ok(0) => panic!("closed: {}", String::from_utf8_lossy(&buffer)),
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            Err(_) => {}
        }
    }
}

/// A page of another origin holding a key can read the polling and history
/// routes (`Access-Control-Allow-Origin: *`, preflight answered), but never
/// with credentials the browser attaches by itself: no
/// `Access-Control-Allow-Credentials`, no reflected origin, the cookie from
/// another origin still refused, and `/v1/sessions` grants no preflight.
#[test]
fn history_routes_allow_any_origin_with_a_key_but_never_credentials() {
    let server = Server::start(&["org_a"]);
    let key = server.key("org_a").to_string();
    let foreign = ("Origin", "http://other.example".to_string());
    let no_credentials = |response: &HttpResponse, what: &str| {
        assert_eq!(
            response.header("access-control-allow-credentials"),
            None,
            "{what}"
        );
    };
    let routes = [
        "/v1/poll",
        "/v1/sse",
        "/v1/events",
        "/v1/deliveries",
        "/v1/issues",
        "/v1/collections/c1/sync",
    ];
    for path in routes {
        let preflight = http_request(
            server.ws_addr,
            "OPTIONS",
            &format!("{path}?channels=events"),
            &[
                foreign.clone(),
                ("Access-Control-Request-Method", "GET".to_string()),
                (
                    "Access-Control-Request-Headers",
                    "authorization".to_string(),
                ),
            ],
            b"",
        );
        assert_eq!(preflight.status, 204, "{path}: {}", preflight.text());
        assert_eq!(
            preflight.header("access-control-allow-origin"),
            Some("*"),
            "{path}"
        );
        assert_eq!(
            preflight.header("access-control-allow-methods"),
            Some("GET"),
            "{path}"
        );
        let allowed_headers = preflight
            .header("access-control-allow-headers")
            .unwrap_or_default()
            .to_ascii_lowercase();
        assert!(
            allowed_headers
                .split(',')
                .any(|h| h.trim() == "authorization"),
            "{path}: {allowed_headers}"
        );
        let max_age: u64 = preflight
            .header("access-control-max-age")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{path}: a numeric Access-Control-Max-Age"));
        assert!(max_age > 0);
        no_credentials(&preflight, path);
    }

    // The fallback of a page of another origin: bearer (after the
    // preflight) or token, and the answer is readable.
    let publish = http_request(
        server.admin_addr,
        "POST",
        "/v1/publish",
        &[("Authorization", format!("Bearer {}", server.admin_token))],
        br#"{"org_id":"org_a","type":"event","data":{"id":"e1","source_id":"s1"}}"#,
    );
    assert_eq!(publish.status, 202, "{}", publish.text());
    let by_bearer = http_request(
        server.ws_addr,
        "GET",
        "/v1/poll?channels=events&after=0",
        &[foreign.clone(), ("Authorization", format!("Bearer {key}"))],
        b"",
    );
    assert_eq!(by_bearer.status, 200, "{}", by_bearer.text());
    assert_eq!(by_bearer.json()["messages"][0]["data"]["id"], "e1");
    assert_eq!(by_bearer.header("access-control-allow-origin"), Some("*"));
    no_credentials(&by_bearer, "poll by bearer");
    let list = http_request(
        server.ws_addr,
        "GET",
        &format!("/v1/events?token={key}"),
        std::slice::from_ref(&foreign),
        b"",
    );
    assert_eq!(list.status, 200, "{}", list.text());
    assert_eq!(list.header("access-control-allow-origin"), Some("*"));
    no_credentials(&list, "events list");
    // Refusals are readable too (a page can tell a bad key from a network
    // error), and say nothing more than before.
    let refused = http_request(
        server.ws_addr,
        "GET",
        "/v1/poll?channels=events&token=hsk_wrong",
        std::slice::from_ref(&foreign),
        b"",
    );
    assert_eq!(refused.status, 401);
    assert_eq!(refused.header("access-control-allow-origin"), Some("*"));
    no_credentials(&refused, "401");
    let sse_head = head_of(
        server.ws_addr,
        &format!(
            "GET /v1/sse?channels=events&token={key} HTTP/1.1\r\nHost: {}\r\nOrigin: http://other.example\r\n\r\n",
            server.ws_addr
        ),
    )
    .to_ascii_lowercase();
    assert!(sse_head.starts_with("http/1.1 200"), "{sse_head}");
    assert!(
        sse_head.contains("\r\naccess-control-allow-origin: *"),
        "{sse_head}"
    );
    assert!(
        !sse_head.contains("access-control-allow-credentials"),
        "{sse_head}"
    );

    // The cookie from another origin is still refused (and a browser would
    // not show a credentialed answer under `*` anyway).
    let cookie = open_session(&server, &key);
    let with_cookie = http_request(
        server.ws_addr,
        "GET",
        "/v1/poll?channels=events",
        &[cookie_header(&cookie), foreign.clone()],
        b"",
    );
    assert_eq!(with_cookie.status, 403);
    no_credentials(&with_cookie, "cookie");
    // Sessions are not opened to other origins: no preflight granted.
    let sessions_preflight = http_request(
        server.ws_addr,
        "OPTIONS",
        "/v1/sessions",
        &[
            foreign,
            ("Access-Control-Request-Method", "POST".to_string()),
            (
                "Access-Control-Request-Headers",
                "authorization".to_string(),
            ),
        ],
        b"",
    );
    assert_ne!(sessions_preflight.status / 100, 2);
    assert_eq!(
        sessions_preflight.header("access-control-allow-origin"),
        None
    );
    // Other methods on a history route: 405, naming the preflight too.
    let post = http_request(server.ws_addr, "POST", "/v1/poll", &[], b"");
    assert_eq!(post.status, 405);
    assert_eq!(post.header("allow"), Some("GET, OPTIONS"));
}

#[test]
fn allowed_origins_flag_replaces_the_default() {
    let server = ServerBuilder::new()
        .org("org_a")
        .arg(
            "--allowed-origins",
            "https://app.example, http://localhost:3000",
        )
        .start();
    let cookie = open_session(&server, server.key("org_a"));
    for origin in ["https://app.example", "http://localhost:3000"] {
        let client = connect_with(
            server.ws_addr,
            "/v1/ws",
            &[cookie_header(&cookie), ("Origin", origin.to_string())],
        );
        assert!(client.is_ok(), "{origin} refused");
    }
    let own = format!("Origin: http://{}", server.ws_addr);
    let cookie_line = format!("Cookie: hs_session={cookie}");
    assert_eq!(
        refused_upgrade(server.ws_addr, "/v1/ws", &[&cookie_line, &own]).status,
        403
    );
}

#[test]
fn tampered_expired_and_revoked_key_cookies_are_refused() {
    let server = ServerBuilder::new()
        .org("org_a")
        .org("org_b")
        .arg("--session-ttl-secs", 2)
        .start();
    let origin = ("Origin", format!("http://{}", server.ws_addr));
    let cookie = open_session(&server, server.key("org_a"));
    let other = open_session(&server, server.key("org_b"));
    let works = |cookie: &str| {
        connect_with(
            server.ws_addr,
            "/v1/ws",
            &[cookie_header(cookie), origin.clone()],
        )
        .map(|c| c.welcome["org_id"].as_str().unwrap().to_string())
    };
    assert_eq!(works(&cookie), Ok("org_a".to_string()));

    // Tampered: a changed signature, another org, a longer life, a
    // signature moved from another session, garbage.
    let (payload, signature) = cookie.rsplit_once('.').unwrap();
    let flipped = if signature.starts_with('A') { "B" } else { "A" };
    let (_, other_signature) = other.rsplit_once('.').unwrap();
    let tampered = [
        format!("{payload}.{flipped}{}", &signature[1..]),
        cookie.replacen("org_a", "org_b", 1),
        {
            let fields: Vec<&str> = cookie.split('.').collect();
            format!(
                "{}.{}.{}.{}.{}",
                fields[0],
                fields[1],
                fields[2],
                fields[3].parse::<u64>().unwrap() + 3600,
                fields[4]
            )
        },
        format!("{payload}.{other_signature}"),
        "garbage".to_string(),
    ];
    for bad in &tampered {
        assert_ne!(bad, &cookie);
        assert_eq!(works(bad), Err(401), "{bad}");
    }

    // Expired: the server was told 2 s.
    std::thread::sleep(Duration::from_millis(3_100));
    assert_eq!(works(&cookie), Err(401));
    let expired = whoami(&server, &[cookie_header(&cookie)]);
    assert_eq!(expired.status, 401);

    // Revoked key: a fresh session of org_b dies with its key.
    let fresh = open_session(&server, server.key("org_b"));
    assert_eq!(works(&fresh), Ok("org_b".to_string()));
    let mut held = connect_with(
        server.ws_addr,
        "/v1/ws",
        &[cookie_header(&fresh), origin.clone()],
    )
    .expect("cookie upgrade");
    let id = key_id_of(server.data_dir(), "org_b");
    cli(&["api-keys", "revoke", &id], server.data_dir());
    let revoked_at = Instant::now();
    // The connection opened with the cookie is the key's connection too.
    assert_eq!(held.expect_close(Duration::from_secs(2)), Some(4003));
    after_2_s_every_upgrade_gets(server.ws_addr, server.key("org_b"), revoked_at, 401);
    for _ in 0..4 {
        assert_eq!(works(&fresh), Err(401));
        assert_eq!(whoami(&server, &[cookie_header(&fresh)]).status, 401);
    }
}

#[test]
fn wrong_or_missing_admin_token_gets_401() {
    let server = Server::start(&["org_a"]);
    let body = common::event("org_a", "evt_1", "src_1");
    for token in [Some("wrong"), Some(""), None] {
        let response = server.publish_with(&body, token, "application/json");
        assert_eq!(response.status, 401, "token {token:?}");
        assert_eq!(response.json(), serde_json::json!({"error":"unauthorized"}));
    }
    // An API key is not the admin token.
    let key = server.key("org_a").to_string();
    assert_eq!(
        server
            .publish_with(&body, Some(&key), "application/json")
            .status,
        401
    );
    assert_eq!(server.publish(&body).status, 202);
}

#[test]
fn upgrade_rate_limit_gives_429_and_recovers() {
    let server = ServerBuilder::new()
        .org("org_a")
        .arg("--upgrades-per-ip-per-sec", 2)
        .arg("--upgrade-burst-per-ip", 4)
        .start();
    let path = format!("/v1/ws?token={}", server.key("org_a"));
    let mut upgraded = 0;
    let mut limited = 0;
    for _ in 0..30 {
        let (status, _) = upgrade_status(server.ws_addr, &path, &[]);
        match status {
            101 => upgraded += 1,
            429 => limited += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(limited >= 20, "{upgraded} upgraded, {limited} limited");
    assert!(upgraded >= 1, "the burst must let some through");
    let refused = refused_upgrade(server.ws_addr, &path, &[]);
    assert_eq!(refused.status, 429);
    assert_eq!(refused.json(), serde_json::json!({"error":"rate_limited"}));
    assert_eq!(refused.header("retry-after"), Some("1"));

    // Tokens come back: within a few seconds upgrades work again.
    std::thread::sleep(Duration::from_millis(1_200));
    let start = Instant::now();
    loop {
        let (status, _) = upgrade_status(server.ws_addr, &path, &[]);
        if status == 101 {
            break;
        }
        assert_eq!(status, 429);
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "still limited after waiting"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn failed_authentications_per_ip_are_limited() {
    let server = ServerBuilder::new()
        .org("org_a")
        .arg("--auth-failures-per-ip-per-min", 4)
        .start();
    let mut unauthorized = 0;
    let mut limited = 0;
    for n in 0..12 {
        let (status, _) = upgrade_status(
            server.ws_addr,
            &format!("/v1/ws?token=hsk_guess{n:040}"),
            &[],
        );
        match status {
            401 => unauthorized += 1,
            429 => limited += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    // Whichever shard takes a connection, no more than the limit of
    // failures is answered 401; the rest get 429.
    assert!(
        unauthorized <= 4,
        "{unauthorized} failures answered 401, limit 4"
    );
    assert!(limited >= 8, "{limited} limited");
    // HTTP routes count against the same limit.
    let whoami = http_request(
        server.ws_addr,
        "GET",
        "/v1/sessions?token=hsk_another_guess",
        &[],
        b"",
    );
    assert!(matches!(whoami.status, 401 | 429), "{}", whoami.status);
    if whoami.status == 429 {
        assert_eq!(whoami.header("Retry-After"), Some("1"));
    }
    // A valid key from the same address is still let in: clients behind
    // one NAT are not locked out by one that keeps failing.
    for _ in 0..4 {
        let (status, head) = upgrade_status(
            server.ws_addr,
            &format!("/v1/ws?token={}", server.key("org_a")),
            &[],
        );
        assert_eq!(status, 101, "{head}");
    }
    let poll = http_request(
        server.ws_addr,
        "GET",
        &format!("/v1/poll?channels=events&token={}", server.key("org_a")),
        &[],
        b"",
    );
    assert_eq!(poll.status, 200, "{}", poll.text());
}

#[test]
fn connections_per_org_are_capped_with_503() {
    let server = ServerBuilder::new()
        .org("org_a")
        .org("org_b")
        .arg("--connections-per-org", 2)
        .start();
    let first = server.connect("org_a");
    let mut second = server.connect("org_a");
    let path = format!("/v1/ws?token={}", server.key("org_a"));
    let (status, head) = upgrade_status(server.ws_addr, &path, &[]);
    assert_eq!(status, 503, "{head}");
    // Other orgs are not affected.
    server.connect("org_b").ping_pong();
    // A freed place can be taken again.
    drop(first);
    let start = Instant::now();
    loop {
        let (status, _) = upgrade_status(server.ws_addr, &path, &[]);
        if status == 101 {
            break;
        }
        assert_eq!(status, 503);
        assert!(start.elapsed() < Duration::from_secs(5), "place not freed");
        std::thread::sleep(Duration::from_millis(50));
    }
    second.ping_pong();
}

/// A `hookstream serve` whose stdout and stderr are both collected.
struct Captured {
    child: Child,
    output: Arc<Mutex<String>>,
}

impl Captured {
    fn start(data_dir: &Path, extra: &[&str]) -> Captured {
        let mut args = vec!["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        let mut command = common::serve_command(data_dir, &args);
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawn hookstream serve");
        let output = Arc::new(Mutex::new(String::new()));
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        for stream in [
            Box::new(stdout) as Box<dyn Read + Send>,
            Box::new(stderr) as Box<dyn Read + Send>,
        ] {
            let output = output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    let mut all = output.lock().unwrap();
                    all.push_str(&line);
                    all.push('\n');
                }
            });
        }
        Captured { child, output }
    }

    /// Waits until some line contains `needle`; returns that line.
    fn wait_for_line(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self
                .output
                .lock()
                .unwrap()
                .lines()
                .find(|l| l.contains(needle))
            {
                return line.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no line with {needle:?}; output so far:\n{}",
                self.output.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The public address from the listening line.
    fn ws_addr(&self) -> SocketAddr {
        let line = self.wait_for_line("hookstream listening on ws://", Duration::from_secs(20));
        let rest = line.split("ws://").nth(1).unwrap();
        rest.split('/').next().unwrap().parse().unwrap()
    }

    /// Stops the server with SIGTERM and returns everything it printed.
    fn stop(mut self) -> String {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "server did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
        // Let the reader threads see EOF.
        std::thread::sleep(Duration::from_millis(100));
        let text = self.output.lock().unwrap().clone();
        text
    }
}

impl Drop for Captured {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn logs_of_a_run_hold_no_token_query_or_cookie() {
    let dir = TestDir::new();
    let key = cli(
        &["api-keys", "create", "--name", "log", "--org", "org_a"],
        dir.path(),
    )
    .trim()
    .to_string();
    let server = Captured::start(dir.path(), &[]);
    let addr = server.ws_addr();
    let wrong = "hsk_WRONGwrongWRONGwrongWRONGwrongWRONGwrong12";

    let mut client = Client::connect(addr, &format!("/v1/ws?token={key}&trace=secretquery"));
    client.subscribe("events");
    let (status, _) = upgrade_status(addr, &format!("/v1/ws?token={wrong}"), &[]);
    assert_eq!(status, 401);
    let session = http_request(
        addr,
        "POST",
        "/v1/sessions",
        &[("Authorization", format!("Bearer {key}"))],
        b"",
    );
    assert_eq!(session.status, 200);
    let cookie = session
        .header("set-cookie")
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .trim_start_matches("hs_session=")
        .to_string();
    let origin = ("Origin", format!("http://{addr}"));
    connect_with(addr, "/v1/ws", &[cookie_header(&cookie), origin])
        .expect("cookie upgrade")
        .ping_pong();
    let forged = format!("{cookie}x");
    assert_eq!(
        refused_upgrade(
            addr,
            "/v1/ws",
            &[
                &format!("Cookie: hs_session={forged}"),
                "Origin: http://evil.example"
            ]
        )
        .status,
        403
    );
    client.ping_pong();
    drop(client);

    let output = server.stop();
    assert!(
        output.contains("hookstream listening on"),
        "output was captured: {output}"
    );
    for secret in [
        key.as_str(),
        wrong,
        cookie.as_str(),
        "secretquery",
        "token=",
    ] {
        assert!(
            !output.contains(secret),
            "the logs hold {secret:?}:\n{output}"
        );
    }
    let random = key.strip_prefix("hsk_").unwrap();
    assert!(!output.contains(random));
}

#[test]
fn demo_streams_messages_within_3_s_of_start() {
    let dir = TestDir::new();
    let started = Instant::now();
    let server = Captured::start(dir.path(), &["--demo"]);
    let line = server.wait_for_line("websocat '", Duration::from_secs(3));
    let url = line
        .split('\'')
        .nth(1)
        .expect("the websocat command quotes its URL");
    assert!(url.starts_with("ws://127.0.0.1:"), "{url}");
    let addr: SocketAddr = url
        .trim_start_matches("ws://")
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let path = &url[url.find("/v1/ws").expect("path in URL")..];
    // The printed command and the key file agree.
    let key = std::fs::read_to_string(dir.path().join("demo-key")).expect("demo-key");
    assert!(path.ends_with(key.trim()), "{path}");

    let mut client = Client::connect(addr, path);
    assert_eq!(client.welcome["org_id"], "demo");
    client.subscribe("events");
    let left = Duration::from_secs(3).saturating_sub(started.elapsed());
    let message = client.next_json(left);
    assert_eq!(message["type"], "event", "{message}");
    assert_eq!(message["channel"], "events");
    assert!(message["data"].is_object());
    assert!(
        started.elapsed() <= Duration::from_secs(3),
        "first message after {:?}",
        started.elapsed()
    );
}
