//! Cluster mode (`--nats-url`) through real sockets: a real `nats-server`
//! (Debian's, installed by tools/setup-nats-tests) with JetStream on a free
//! loopback port and a temporary store, and two or three hookstream nodes
//! sharing it. Each org's history is one stream; a message published on any
//! node reaches the subscribers of every node with one seq, and every read
//! (resume with `after`, poll, SSE, lists) works on every node.

mod common;

use std::io::{BufRead, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::{array, event, http_request, issue, HttpResponse, Server, ServerBuilder, TestDir};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(10);

/// A `nats-server -js` on a loopback port with its store in a temporary
/// directory, killed when dropped (and with the test process).
struct Nats {
    child: Option<Child>,
    port: u16,
    dir: TestDir,
    /// Flags beyond the port and store (a clustered server's name, cluster
    /// port and routes).
    extra: Vec<String>,
    /// Its monitoring port (`/healthz`).
    monitor: u16,
}

fn nats_binary() -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let path = PathBuf::from(dir).join("nats-server");
        if path.exists() {
            return path;
        }
    }
    let sbin = PathBuf::from("/usr/sbin/nats-server");
    assert!(
        sbin.exists(),
        "nats-server is not installed: run tools/setup-nats-tests (tools/test does)"
    );
    sbin
}

/// `GET path` on a connection of its own, read to its end (at most `wait`
/// per read): the whole answer as text, or the error (nothing listens yet,
/// no answer in time).
fn get_raw(at: SocketAddr, path: &str, wait: Duration) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(at)?;
    stream.set_read_timeout(Some(wait))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text)
}

/// A port nothing listens on, for a `nats-server` to take. Taken below
/// the kernel's ephemeral range (32768 and up here), where every `:0`
/// listener and client socket of the tests gets its port: a port picked
/// there could be taken by one of those before the NATS server binds it.
/// Each test process walks its own stretch (from its pid), skipping ports
/// in use.
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 10_000;
    const SPAN: u32 = 22_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = (std::process::id() % 64) * 343;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(n < SPAN, "no free port below the ephemeral range");
        let port = (FIRST + (start + n) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

impl Nats {
    fn start() -> Nats {
        let mut nats = Nats {
            child: None,
            port: free_port(),
            dir: TestDir::new(),
            extra: Vec::new(),
            monitor: free_port(),
        };
        nats.restart();
        nats
    }

    /// `n` servers clustered with JetStream (routes on loopback).
    fn cluster(n: usize) -> Vec<Nats> {
        Nats::cluster_tagged(n, false)
    }

    /// [`Nats::cluster`], with `tagged`: server `i` carries the server tag
    /// `s<i>` (set in a configuration file), so a stream can be placed on
    /// it (`placement.tags`).
    fn cluster_tagged(n: usize, tagged: bool) -> Vec<Nats> {
        let cluster_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let routes = cluster_ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut servers: Vec<Nats> = (0..n)
            .map(|i| Nats {
                child: None,
                port: free_port(),
                monitor: free_port(),
                dir: TestDir::new(),
                extra: vec![
                    "-n".into(),
                    format!("nats-{i}"),
                    "--cluster_name".into(),
                    "hs".into(),
                    "--cluster".into(),
                    format!("nats://127.0.0.1:{}", cluster_ports[i]),
                    "--routes".into(),
                    routes.clone(),
                ],
            })
            .collect();
        if tagged {
            for (i, server) in servers.iter_mut().enumerate() {
                let config = server.dir.path().join("tags.conf");
                std::fs::write(&config, format!("server_tags: [\"s{i}\"]\n")).unwrap();
                server.extra.push("-c".into());
                server.extra.push(config.to_str().unwrap().into());
            }
        }
        for server in &mut servers {
            server.restart();
        }
        servers
    }

    /// Starts (again) on the same port and store.
    fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let mut command = Command::new(nats_binary());
        command
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-m",
                &self.monitor.to_string(),
                "-sd",
            ])
            .arg(self.dir.path())
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: prctl is async-signal-safe and touches only the child.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = command.spawn().expect("spawn nats-server");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("Server is ready") {
                    let _ = tx.send(Ok(()));
                }
                lines.push(line);
            }
            let _ = tx.send(Err(lines.join("\n")));
        });
        match rx.recv_timeout(WAIT) {
            Ok(Ok(())) => {}
            Ok(Err(log)) => panic!("nats-server exited:\n{log}"),
            Err(_) => panic!("nats-server not ready within {WAIT:?}"),
        }
        self.child = Some(child);
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Waits (up to 30 s) until the server's `/healthz` says ok: in a
    /// cluster, its routes are up and its JetStream assets are current.
    fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let at = SocketAddr::from(([127, 0, 0, 1], self.monitor));
            let answer = get_raw(at, "/healthz", Duration::from_secs(2));
            if matches!(&answer, Ok(text) if text.starts_with("HTTP/1.1 200")) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nats-server on {} not healthy within 30 s: {answer:?}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A gateway node on `url`, with `peer`'s keys and admin token when given
/// (else a key for `org_a`); waits until it is ready (connected to NATS).
fn node_on(url: &str, peer: Option<&Server>, id: &str, extra: &[(&str, &str)]) -> Server {
    let mut builder = ServerBuilder::new()
        .arg("--nats-url", url)
        .arg("--node-id", id)
        .arg("--shards", 2);
    builder = match peer {
        Some(peer) => builder.share_keys_with(peer),
        None => builder.org("org_a"),
    };
    for (flag, value) in extra {
        builder = builder.arg(flag, value);
    }
    let server = builder.start();
    wait_ready(&server);
    server
}

fn node(nats: &Nats, peer: Option<&Server>, id: &str) -> Server {
    node_on(&nats.url(), peer, id, &[])
}

fn readyz(server: &Server) -> HttpResponse {
    http_request(server.admin_addr, "GET", "/readyz", &[], b"")
}

fn wait_ready(server: &Server) {
    let deadline = Instant::now() + WAIT;
    loop {
        let response = readyz(server);
        if response.status == 200 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node not ready within {WAIT:?}: {} {}\n{}",
            response.status,
            response.text(),
            server.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn get_json(addr: SocketAddr, path: &str) -> Value {
    let response = http_request(addr, "GET", path, &[], b"");
    assert_eq!(response.status, 200, "GET {path}: {}", response.text());
    response.json()
}

/// The next `n` messages of a client: (seq, data.id).
fn take(client: &mut common::Client, n: usize) -> Vec<(u64, String)> {
    (0..n)
        .map(|_| {
            let m = client.next_json(WAIT);
            assert!(m["seq"].is_u64(), "not a message: {m}");
            (
                m["seq"].as_u64().unwrap(),
                m["data"]["id"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// [`take`], saying on a timeout or anything but a message what each of
/// `nodes` logged.
fn take_from(client: &mut common::Client, n: usize, nodes: &[&Server]) -> Vec<(u64, String)> {
    take_within(client, n, WAIT, nodes)
}

/// [`take_from`], waiting up to `wait` for each message (a node that lost
/// its NATS server reconnects with a backoff first).
fn take_within(
    client: &mut common::Client,
    n: usize,
    wait: Duration,
    nodes: &[&Server],
) -> Vec<(u64, String)> {
    let mut got = Vec::new();
    while got.len() < n {
        match client.recv(wait) {
            common::Received::Json { value, .. } if value["seq"].is_u64() => got.push((
                value["seq"].as_u64().unwrap(),
                value["data"]["id"].as_str().unwrap_or_default().to_string(),
            )),
            other => {
                let logs: Vec<String> = nodes.iter().map(|node| node.stderr()).collect();
                panic!("after {got:?}: {other:?}\n{}", logs.join("\n--\n"));
            }
        }
    }
    got
}

fn events(from: usize, to: usize) -> String {
    let bodies: Vec<String> = (from..to)
        .map(|i| event("org_a", &format!("e{i}"), "src_1"))
        .collect();
    array(&bodies)
}

#[test]
fn a_message_published_on_one_node_reaches_every_node_with_one_seq() {
    let nats = Nats::start();
    let a = node(&nats, None, "a");
    let b = node(&nats, Some(&a), "b");
    let c = node(&nats, Some(&a), "c");
    let mut on_a = a.connect("org_a");
    let mut on_b = b.connect("org_a");
    let mut on_c = c.connect("org_a");
    on_c.subscribe("events");
    assert_eq!(on_a.welcome["seq"], 0, "{}", on_a.welcome);
    assert!(
        on_b.welcome["connection_id"]
            .as_str()
            .unwrap()
            .starts_with("c_b_"),
        "the node id is in connection ids: {}",
        on_b.welcome
    );
    on_a.subscribe("events");
    on_b.subscribe("events:src_1");

    let seqs = a.publish_ok(&events(0, 3));
    assert_eq!(seqs, vec![1, 2, 3]);
    let expected: Vec<(u64, String)> = (0..3).map(|i| (i + 1, format!("e{i}"))).collect();
    assert_eq!(take(&mut on_a, 3), expected);
    assert_eq!(take(&mut on_b, 3), expected);
    assert_eq!(take(&mut on_c, 3), expected);

    // Published on the other node: the same stream, the next seq.
    assert_eq!(b.publish_ok(&events(3, 4)), vec![4]);
    assert_eq!(take(&mut on_a, 1), vec![(4, "e3".to_string())]);
    assert_eq!(take(&mut on_b, 1), vec![(4, "e3".to_string())]);
    assert_eq!(take(&mut on_c, 1), vec![(4, "e3".to_string())]);
    on_a.ping_pong();
    on_b.ping_pong();
    on_c.ping_pong();

    // A new connection on either node is welcomed with the org's seq.
    assert_eq!(b.connect("org_a").welcome["seq"], 4);
    assert_eq!(a.connect("org_a").welcome["seq"], 4);
}

#[test]
fn a_subscriber_moves_from_b_to_c_with_after_while_a_publishes() {
    let nats = Nats::start();
    let a = node(&nats, None, "a");
    let b = node(&nats, Some(&a), "b");
    let c = node(&nats, Some(&a), "c");
    const TOTAL: usize = 300;
    let mut first = b.connect("org_a");
    first.subscribe("events");
    // A publisher on node A all along, 10 messages a request.
    let admin = a.admin_addr;
    let token = a.admin_token.clone();
    let publisher = std::thread::spawn(move || {
        for batch in 0..TOTAL / 10 {
            let body = events(batch * 10, batch * 10 + 10);
            let response = http_request(
                admin,
                "POST",
                "/v1/publish",
                &[
                    ("Authorization", format!("Bearer {token}")),
                    ("Content-Type", "application/json".to_string()),
                ],
                body.as_bytes(),
            );
            assert_eq!(response.status, 202, "{}", response.text());
            std::thread::sleep(Duration::from_millis(2));
        }
    });
    // Some messages on B, then the client moves to C with `after`.
    let got = take(&mut first, 40);
    drop(first);
    let last = got.last().unwrap().0;
    let mut second = c.connect("org_a");
    let ack = second.subscribe_after("events", last);
    assert_eq!(ack["recovered"], true, "{ack}");
    let rest = take(&mut second, TOTAL - 40);
    publisher.join().unwrap();
    let all: Vec<(u64, String)> = got.into_iter().chain(rest).collect();
    let expected: Vec<(u64, String)> = (0..TOTAL)
        .map(|i| (i as u64 + 1, format!("e{i}")))
        .collect();
    assert_eq!(all, expected, "every message once, in order, across nodes");
    second.ping_pong();
}

#[test]
fn poll_sse_and_lists_read_the_stream_on_every_node() {
    let nats = Nats::start();
    let a = node(&nats, None, "a");
    let b = node(&nats, Some(&a), "b");
    let key = a.key("org_a").to_string();
    let mut bodies: Vec<String> = (0..5)
        .map(|i| event("org_a", &format!("e{i}"), "src_1"))
        .collect();
    bodies.push(issue("org_a", "i0"));
    assert_eq!(a.publish_ok(&array(&bodies)), vec![1, 2, 3, 4, 5, 6]);
    for server in [&a, &b] {
        let page = get_json(
            server.ws_addr,
            &format!("/v1/poll?channels=events&after=2&token={key}"),
        );
        let seqs: Vec<u64> = page["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(seqs, vec![3, 4, 5], "{page}");
        assert_eq!(page["next_after"], 6, "{page}");
        assert!(page.get("recovered").is_none(), "{page}");

        let list = get_json(server.ws_addr, &format!("/v1/events?limit=2&token={key}"));
        let ids: Vec<&str> = list["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, vec!["e4", "e3"], "{list}");
        assert_eq!(list["has_more"], true, "{list}");
        let before = list["next_before"].as_u64().unwrap();
        let older = get_json(
            server.ws_addr,
            &format!("/v1/events?limit=10&before={before}&token={key}"),
        );
        let ids: Vec<&str> = older["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, vec!["e2", "e1", "e0"], "{older}");
        assert_eq!(older["has_more"], false, "{older}");
    }

    // A long-poll on B is answered by a publish on A.
    let addr = b.ws_addr;
    let poll_key = key.clone();
    let waiting = std::thread::spawn(move || {
        get_json(
            addr,
            &format!("/v1/poll?channels=issues&after=6&wait_ms=10000&token={poll_key}"),
        )
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(a.publish_ok(&issue("org_a", "i1")), vec![7]);
    let page = waiting.join().unwrap();
    assert_eq!(page["messages"][0]["seq"], 7, "{page}");

    // SSE on B resumes from Last-Event-ID.
    let mut stream = TcpStream::connect(b.ws_addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        stream,
        "GET /v1/sse?channels=events,issues&token={key} HTTP/1.1\r\nHost: x\r\nLast-Event-ID: 4\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    let mut buffer = [0u8; 4096];
    let deadline = Instant::now() + WAIT;
    while text.matches("\nid: ").count() < 3 && Instant::now() < deadline {
        let n = stream.read(&mut buffer).unwrap();
        assert!(n > 0, "SSE ended: {text}");
        text.push_str(&String::from_utf8_lossy(&buffer[..n]));
    }
    let ids: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .collect();
    assert_eq!(ids, vec!["5", "6", "7"], "{text}");
}

#[test]
fn a_retried_publish_with_an_idempotency_key_is_not_duplicated() {
    let nats = Nats::start();
    let a = node(&nats, None, "a");
    let b = node(&nats, Some(&a), "b");
    let mut watcher = b.connect("org_a");
    watcher.subscribe("events");
    let keyed = |id: &str, key: &str| {
        format!(
            r#"{{"org_id":"org_a","type":"event","idempotency_key":"{key}","data":{{"id":"{id}","source_id":"src_1"}}}}"#
        )
    };
    assert_eq!(a.publish_ok(&keyed("e0", "k-0")), vec![1]);
    // The retry, on the same node and on the other one: the original seq.
    assert_eq!(a.publish_ok(&keyed("e0", "k-0")), vec![1]);
    assert_eq!(b.publish_ok(&keyed("e0", "k-0")), vec![1]);
    assert_eq!(
        b.publish_ok(&array(&[keyed("e1", "k-1"), keyed("e0", "k-0")])),
        vec![2, 1]
    );
    assert_eq!(
        take(&mut watcher, 2),
        vec![(1, "e0".to_string()), (2, "e1".to_string())]
    );
    // Nothing else was delivered.
    watcher.ping_pong();
}

#[test]
fn clients_of_a_killed_node_resume_on_the_other_with_nothing_lost() {
    let nats = Nats::start();
    let mut a = node(&nats, None, "a");
    let b = node(&nats, Some(&a), "b");
    let mut on_a = a.connect("org_a");
    on_a.subscribe("events");
    // Publishing through B goes on while A is killed.
    let stop = Arc::new(AtomicBool::new(false));
    let admin = b.admin_addr;
    let token = b.admin_token.clone();
    let publisher = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut acknowledged = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let response = http_request(
                    admin,
                    "POST",
                    "/v1/publish",
                    &[("Authorization", format!("Bearer {token}"))],
                    event("org_a", &format!("e{i}"), "src_1").as_bytes(),
                );
                assert_eq!(response.status, 202, "{}", response.text());
                acknowledged.push((
                    response.json()["seqs"][0].as_u64().unwrap(),
                    format!("e{i}"),
                ));
                i += 1;
                std::thread::sleep(Duration::from_millis(3));
            }
            acknowledged
        })
    };
    let got = take(&mut on_a, 20);
    a.signal(libc::SIGKILL);
    assert!(a.wait_exit(WAIT).is_some());
    drop(on_a);
    let last = got.last().unwrap().0;
    let mut moved = b.connect("org_a");
    moved.subscribe_after("events", last);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let acknowledged = publisher.join().unwrap();
    let rest = take(&mut moved, acknowledged.len() - got.len());
    let all: Vec<(u64, String)> = got.into_iter().chain(rest).collect();
    assert_eq!(
        all, acknowledged,
        "every acknowledged message, once, in order"
    );
    moved.ping_pong();
}

#[test]
fn without_nats_the_node_is_not_ready_and_publish_answers_503_until_it_comes() {
    // A port where no NATS listens yet.
    let mut nats = Nats {
        child: None,
        port: free_port(),
        dir: TestDir::new(),
        extra: Vec::new(),
        monitor: free_port(),
    };
    let server = ServerBuilder::new()
        .org("org_a")
        .arg("--nats-url", nats.url())
        .arg("--node-id", "lonely")
        .start();
    let response = readyz(&server);
    assert_eq!(response.status, 503, "{}", response.text());
    assert_eq!(response.json()["error"], "unavailable");
    let response = server.publish(&events(0, 1));
    assert_eq!(response.status, 503, "{}", response.text());
    assert_eq!(response.json(), serde_json::json!({"error":"unavailable"}));
    assert!(
        response.header("Retry-After").is_some(),
        "{:?}",
        response.headers
    );

    nats.restart();
    wait_ready(&server);
    assert_eq!(server.publish_ok(&events(0, 1)), vec![1]);

    // NATS lost while running: open connections stay, publishes get 503,
    // and after NATS is back the subscriber gets what is published.
    let mut client = server.connect("org_a");
    assert_eq!(client.welcome["seq"], 1);
    client.subscribe("events");
    assert_eq!(server.publish_ok(&events(1, 2)), vec![2]);
    assert_eq!(take(&mut client, 1), vec![(2, "e1".to_string())]);
    nats.stop();
    let deadline = Instant::now() + WAIT;
    while readyz(&server).status != 503 {
        assert!(Instant::now() < deadline, "still ready without NATS");
        std::thread::sleep(Duration::from_millis(50));
    }
    let response = server.publish(&events(2, 3));
    assert_eq!(response.status, 503, "{}", response.text());
    client.ping_pong();
    nats.restart();
    wait_ready(&server);
    assert_eq!(server.publish_ok(&events(3, 4)), vec![3]);
    assert_eq!(take(&mut client, 1), vec![(3, "e3".to_string())]);
    client.ping_pong();
}

/// The id of the (first) key of `org` in `data_dir`, from `api-keys list --json`.
fn key_id_of(data_dir: &std::path::Path, org: &str) -> String {
    let listed: Value =
        serde_json::from_str(&common::cli(&["api-keys", "list", "--json"], data_dir)).unwrap();
    listed
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["org_id"] == org)
        .unwrap_or_else(|| panic!("no key of {org}: {listed}"))["id"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn keys_created_or_revoked_on_one_node_act_on_every_node_within_2_s() {
    let nats = Nats::start();
    let a = node(&nats, None, "a");
    // B starts with no key file of its own: A's keys come through NATS.
    let b = ServerBuilder::new()
        .arg("--nats-url", nats.url())
        .arg("--node-id", "b")
        .start();
    wait_ready(&b);
    // An upgrade with `key`, its welcome read.
    let admitted = |server: &Server, key: &str| {
        let mut client =
            common::Client::try_upgrade(server.ws_addr, &format!("/v1/ws?token={key}")).ok()?;
        client.welcome = client.next_json(WAIT);
        assert_eq!(client.welcome["type"], "welcome", "{}", client.welcome);
        Some(client)
    };
    let deadline = Instant::now() + WAIT;
    let mut on_b = loop {
        if let Some(client) = admitted(&b, a.key("org_a")) {
            break client;
        }
        assert!(
            Instant::now() < deadline,
            "A's key never reached B:\n{}\n{}",
            a.stderr(),
            b.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    on_b.subscribe("events");

    // Created on A while both run: accepted on B within 2 s.
    let created = common::create_key(a.data_dir(), "org_c");
    let created_at = Instant::now();
    let mut late = loop {
        if let Some(client) = admitted(&b, &created) {
            break client;
        }
        assert!(
            created_at.elapsed() < Duration::from_secs(2),
            "a key created on A is not accepted on B after 2 s"
        );
        std::thread::sleep(Duration::from_millis(25));
    };
    assert_eq!(late.welcome["org_id"], "org_c");
    late.ping_pong();

    // Revoked on A: its connection on B is closed with 4003 within 2 s,
    // and B refuses the key.
    let id = key_id_of(a.data_dir(), "org_a");
    common::cli(&["api-keys", "revoke", &id], a.data_dir());
    let revoked_at = Instant::now();
    assert_eq!(on_b.expect_close(Duration::from_secs(2)), Some(4003));
    assert!(revoked_at.elapsed() < Duration::from_secs(2));
    assert!(admitted(&b, a.key("org_a")).is_none());
    late.ping_pong();
}

/// `hookstream api-keys ARGS --nats-url URL` run in an empty directory with
/// no data directory given: (exit success, stdout, stderr).
fn keys_cli_in_nats(args: &[&str], url: &str, cwd: &std::path::Path) -> (bool, String, String) {
    let output = common::hookstream_command()
        .args(args)
        .args(["--nats-url", url])
        .env_remove("HOOKSTREAM_DATA_DIR")
        .env_remove("HOOKSTREAM_CONFIG")
        .current_dir(cwd)
        .stdin(Stdio::null())
        .output()
        .expect("run hookstream");
    (
        output.status.success(),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

/// Key `id`'s row in `api-keys list --json --nats-url url`, run in `cwd`,
/// and the whole list as printed.
fn listed_in_nats(url: &str, id: &str, cwd: &std::path::Path) -> (Value, String) {
    let (ok, out, err) = keys_cli_in_nats(&["api-keys", "list", "--json"], url, cwd);
    assert!(ok, "list failed: {err}");
    let listed: Value = serde_json::from_str(&out).unwrap();
    let row = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == id)
        .unwrap_or_else(|| panic!("{id} not listed: {listed}"))
        .clone();
    (row, out)
}

#[test]
fn api_keys_with_nats_url_need_no_data_dir_and_act_on_running_nodes() {
    let nats = Nats::start();
    // A node with no key of its own: every key comes through NATS.
    let node = ServerBuilder::new()
        .arg("--nats-url", nats.url())
        .arg("--node-id", "a")
        .start();
    wait_ready(&node);
    // Another machine: an empty working directory, no data directory.
    let elsewhere = TestDir::new();
    let (ok, out, err) = keys_cli_in_nats(
        &[
            "api-keys", "create", "--name", "ops", "--org", "org_k", "--json",
        ],
        &nats.url(),
        elsewhere.path(),
    );
    assert!(ok, "create failed: {err}");
    let created: Value = serde_json::from_str(&out).unwrap();
    let key = created["key"].as_str().unwrap().to_string();
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(created["org_id"], "org_k");
    let mut client = connect_when_admitted(&node, &key);
    assert_eq!(client.welcome["org_id"], "org_k");
    client.subscribe("events");

    let (row, out) = listed_in_nats(&nats.url(), &id, elsewhere.path());
    assert_eq!(row["org_id"], "org_k");
    assert!(row["revoked_at"].is_null(), "{row}");
    assert!(!out.contains(&key), "list shows the key itself");

    // Revoked from elsewhere: the node closes the key's connection with
    // 4003 within 2 s and refuses the key.
    let (ok, _, err) =
        keys_cli_in_nats(&["api-keys", "revoke", &id], &nats.url(), elsewhere.path());
    assert!(ok, "revoke failed: {err}");
    let revoked_at = Instant::now();
    assert_eq!(
        client.expect_close(Duration::from_secs(2)),
        Some(4003),
        "{}",
        node.stderr()
    );
    assert!(revoked_at.elapsed() < Duration::from_secs(2));
    assert!(
        common::Client::try_upgrade(node.ws_addr, &format!("/v1/ws?token={key}")).is_err(),
        "a revoked key is still admitted"
    );
    let (ok, out, _) = keys_cli_in_nats(
        &["api-keys", "list", "--json"],
        &nats.url(),
        elsewhere.path(),
    );
    assert!(ok);
    let listed: Value = serde_json::from_str(&out).unwrap();
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["id"] == id.as_str() && k["revoked_at"].is_string()),
        "{listed}"
    );
    // An unknown id: an error, non-zero exit.
    let (ok, _, err) = keys_cli_in_nats(
        &["api-keys", "revoke", "key_nope"],
        &nats.url(),
        elsewhere.path(),
    );
    assert!(!ok);
    assert!(err.contains("no key with id key_nope"), "{err}");
    // Nothing was written where the commands ran.
    assert_eq!(std::fs::read_dir(elsewhere.path()).unwrap().count(), 0);

    // NATS not reachable: a non-zero exit and one line saying so.
    let closed = format!("nats://127.0.0.1:{}", free_port());
    for args in [
        &["api-keys", "create", "--name", "x", "--org", "org_k"][..],
        &["api-keys", "list"][..],
        &["api-keys", "revoke", &id][..],
    ] {
        let started = Instant::now();
        let (ok, out, err) = keys_cli_in_nats(args, &closed, elsewhere.path());
        assert!(!ok, "{args:?} succeeded without NATS: {out}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains("not reachable"), "{args:?}: {err}");
        assert!(
            started.elapsed() < WAIT,
            "{args:?} took {:?}",
            started.elapsed()
        );
    }
}

/// The peak resident memory of `server` (`VmHWM`), in KiB.
fn peak_kib(server: &Server) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

/// A list page read from the stream loads at most about 1 MiB of messages
/// (PROTOCOL.md §6), also when they are large: 150 messages of 900 KB are
/// listed newest first, 2 a page, every one once, and the node's peak
/// memory grows by far less than the 135 MB they hold (a list read its
/// window of 256 seqs whole: with 100 messages the peak grew by 89 MB;
/// now by 22-33 MB whatever their number, the pages' copies and the
/// allocators' own).
#[test]
fn a_list_of_large_messages_loads_about_a_page_at_a_time() {
    let nats = Nats::start();
    let a = node(&nats, None, "a");
    let key = a.key("org_a").to_string();
    let pad = "x".repeat(900_000);
    for i in 0..150 {
        let body = format!(
            r#"{{"org_id":"org_a","type":"event","data":{{"id":"e{i}","source_id":"s","pad":"{pad}"}}}}"#
        );
        let response = a.publish(&body);
        assert_eq!(response.status, 202, "{}", response.text());
    }
    let before = peak_kib(&a);
    let mut ids = Vec::new();
    let mut next = String::new();
    let mut pages = 0;
    loop {
        let response = http_request(
            a.ws_addr,
            "GET",
            &format!("/v1/events?limit=100{next}&token={key}"),
            &[],
            b"",
        );
        assert_eq!(response.status, 200, "{}", response.text());
        let page = response.json();
        let data = page["data"].as_array().unwrap();
        assert!((1..=2).contains(&data.len()), "{} on a page", data.len());
        ids.extend(data.iter().map(|d| d["id"].as_str().unwrap().to_string()));
        pages += 1;
        if page["has_more"] == false {
            break;
        }
        next = format!("&before={}", page["next_before"]);
    }
    let expected: Vec<String> = (0..150).rev().map(|i| format!("e{i}")).collect();
    assert_eq!(ids, expected);
    let grown = peak_kib(&a).saturating_sub(before);
    assert!(
        grown < 64 << 10,
        "peak memory grew by {grown} KiB over {pages} pages"
    );
}

#[test]
fn an_announcement_only_takes_access_away_and_bad_ones_change_nothing() {
    // The core NATS subjects a revocation and a sign-out are announced on
    // are an input: what is not a revocation grants nothing, and what
    // does not parse is dropped, the node serving on.
    let nats = Nats::start();
    let a = node(&nats, None, "a");
    drop(connect_when_admitted(&a, a.key("org_a")));
    // A key A does not know, with its record as a node would announce it
    // (unrevoked).
    let elsewhere = TestDir::new();
    let stranger = common::create_key(elsewhere.path(), "org_x");
    let file: Value =
        serde_json::from_str(&std::fs::read_to_string(elsewhere.path().join("keys.json")).unwrap())
            .unwrap();
    let record = file["keys"][0].to_string();
    let stranger_id = file["keys"][0]["id"].as_str().unwrap().to_string();
    // A sign-out whose key id carries a line of the signed-out sessions
    // file: a watermark signing out every session of A's key.
    let victim = key_id_of(a.data_dir(), "org_a");
    let smuggled = serde_json::json!({
        "id": "1",
        "key_id": format!("x 1\nk {victim} - 9999999999\ns 2"),
        "expires": 9_999_999_999u64,
    })
    .to_string();
    let payloads: [(&str, Vec<u8>); 6] = [
        ("hs_now.revoked_key", record.into_bytes()),
        ("hs_now.revoked_key", b"\xff\x00 not json".to_vec()),
        ("hs_now.revoked_key", br#"{"id":7}"#.to_vec()),
        ("hs_now.signed_out", b"{".to_vec()),
        (
            "hs_now.signed_out",
            br#"{"id":"zz","key_id":"k","expires":1}"#.to_vec(),
        ),
        ("hs_now.signed_out", smuggled.into_bytes()),
    ];
    let url = nats.url();
    with_jetstream(&nats.url(), |_| async move {
        let client = async_nats::connect(url).await.unwrap();
        for (subject, payload) in payloads {
            client.publish(subject, payload.into()).await.unwrap();
        }
        client.flush().await.unwrap();
    });
    // Past the watches' and the key reload's periods.
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        common::Client::try_upgrade(a.ws_addr, &format!("/v1/ws?token={stranger}")).is_err(),
        "an announced unrevoked record admitted its key"
    );
    let kept = std::fs::read_to_string(a.data_dir().join("keys.json")).unwrap();
    assert!(!kept.contains(&stranger_id), "{kept}");
    let signed_out =
        std::fs::read_to_string(a.data_dir().join("revoked-sessions")).unwrap_or_default();
    assert!(!signed_out.contains(&victim), "{signed_out}");
    let mut client = connect_when_admitted(&a, a.key("org_a"));
    client.ping_pong();
    let cookie = common::sign_in(a.ws_addr, a.key("org_a"));
    let response = session_of(&a, &cookie);
    assert_eq!(response.status, 200, "{}", response.text());
    assert!(!a.stderr().contains("panic"), "{}", a.stderr());
}

#[test]
fn a_node_starting_with_a_key_file_from_before_a_revocation_does_not_put_the_key_back() {
    let nats = Nats::start();
    let a = node(&nats, None, "a");
    let key = a.key("org_a").to_string();
    let id = key_id_of(a.data_dir(), "org_a");
    let stale = std::fs::read_to_string(a.data_dir().join("keys.json")).unwrap();
    let admin_token = std::fs::read_to_string(a.data_dir().join("admin-token")).unwrap();
    // The key's record is in JetStream (A put it at startup).
    drop(connect_when_admitted(&a, &key));
    drop(a);
    // Revoked from another machine while no node runs.
    let cwd = TestDir::new();
    let (ok, _, said) = keys_cli_in_nats(&["api-keys", "revoke", &id], &nats.url(), cwd.path());
    assert!(ok, "{said}");
    // A node that starts with the file from before the revocation.
    let c = ServerBuilder::new()
        .arg("--nats-url", nats.url())
        .arg("--node-id", "c")
        .file("keys.json", &stale)
        .file("admin-token", &admin_token)
        .start();
    wait_ready(&c);
    // It takes the revocation (its reload acts within 0.5 s), and the
    // stream keeps it: the key stays refused.
    std::thread::sleep(Duration::from_secs(2));
    let refused = common::Client::try_upgrade(c.ws_addr, &format!("/v1/ws?token={key}"));
    assert!(
        refused.is_err(),
        "the revoked key is accepted again:\n{}",
        c.stderr()
    );
    let (record, _) = listed_in_nats(&nats.url(), &id, cwd.path());
    assert!(!record["revoked_at"].is_null(), "{record}");
}

#[test]
fn history_limits_are_the_stream_limits_and_older_after_is_not_recovered() {
    let nats = Nats::start();
    let a = node_on(&nats.url(), None, "a", &[("--history-messages", "5")]);
    let b = node_on(&nats.url(), Some(&a), "b", &[("--history-messages", "5")]);
    let key = a.key("org_a").to_string();
    assert_eq!(a.publish_ok(&events(0, 10)), (1..=10).collect::<Vec<u64>>());
    let page = get_json(
        b.ws_addr,
        &format!("/v1/poll?channels=events&after=2&token={key}"),
    );
    let seqs: Vec<u64> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![6, 7, 8, 9, 10], "{page}");
    assert_eq!(page["recovered"], false, "{page}");
    let mut client = b.connect("org_a");
    assert_eq!(client.welcome["seq"], 10);
    let ack = client.subscribe_after("events", 1);
    assert_eq!(ack["recovered"], false, "{ack}");
    assert_eq!(
        take(&mut client, 5).iter().map(|m| m.0).collect::<Vec<_>>(),
        vec![6, 7, 8, 9, 10]
    );
    let ack = client.subscribe_after("events:src_1", 7);
    assert_eq!(ack["recovered"], true, "{ack}");
    assert_eq!(
        take(&mut client, 3).iter().map(|m| m.0).collect::<Vec<_>>(),
        vec![8, 9, 10]
    );
}

/// Publishes one event of org_a with an idempotency key, retrying on 503
/// (with the same key, so a message stored before a 503 is not stored
/// twice) for up to 30 s; returns its seq.
fn publish_with_retries(server: &Server, i: usize) -> u64 {
    publish_until_accepted(server, "org_a", &format!("key-{i}"), &format!("e{i}"))
}

/// Publishes event `id` of `org` with idempotency key `key` until it is
/// accepted: every refusal meanwhile must be a 503 with Retry-After, for
/// at most 30 s (the first publish of a JetStream cluster waits for its
/// leaders). Returns its seq.
fn publish_until_accepted(server: &Server, org: &str, key: &str, id: &str) -> u64 {
    let body = format!(
        r#"{{"org_id":"{org}","type":"event","idempotency_key":"{key}","data":{{"id":"{id}","source_id":"src_1"}}}}"#
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let response = server.publish(&body);
        if response.status == 202 {
            return response.json()["seqs"][0].as_u64().unwrap();
        }
        assert_eq!(response.status, 503, "{}", response.text());
        assert!(response.header("Retry-After").is_some());
        assert!(
            Instant::now() < deadline,
            "publish {org} {id} still refused after 30 s: {}\n{}",
            response.text(),
            server.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Three clustered NATS servers and two nodes A and B (A's keys) that know
/// all three, with `--nats-replicas 3`.
fn two_nodes_on_three_replicas() -> (Vec<Nats>, Server, Server) {
    let servers = Nats::cluster(3);
    let urls = servers.iter().map(Nats::url).collect::<Vec<_>>().join(",");
    let replicas = [("--nats-replicas", "3")];
    let a = node_on(&urls, None, "a", &replicas);
    let b = node_on(&urls, Some(&a), "b", &replicas);
    (servers, a, b)
}

#[test]
fn with_three_replicas_stopping_one_nats_server_loses_nothing_and_publishing_goes_on() {
    let (mut servers, a, b) = two_nodes_on_three_replicas();
    // The first publish waits for the JetStream cluster to elect its leaders.
    assert_eq!(publish_with_retries(&a, 0), 1);
    let mut subscriber = b.connect("org_a");
    subscriber.subscribe_after("events", 0);
    for i in 1..20 {
        assert_eq!(publish_with_retries(&a, i), i as u64 + 1);
    }
    servers[0].stop();
    for i in 20..40 {
        assert_eq!(publish_with_retries(&a, i), i as u64 + 1);
    }
    // B's NATS client may have been on the stopped server: it reconnects
    // to another (with its backoff) and its follower goes on from its last
    // seq.
    let expected: Vec<(u64, String)> = (0..40).map(|i| (i as u64 + 1, format!("e{i}"))).collect();
    let got = take_within(
        &mut subscriber,
        expected.len(),
        Duration::from_secs(30),
        &[&a, &b],
    );
    assert_eq!(got, expected);
    subscriber.ping_pong();
}

/// A client of `key` on `server` once the node accepts the key (keys reach
/// a node through NATS), its welcome read. Waits up to 30 s: on a JetStream
/// cluster just started, the first key waits for the keys stream's leader
/// to be elected, which took over 10 s once on a loaded 2-core machine.
fn connect_when_admitted(server: &Server, key: &str) -> common::Client {
    let deadline = Instant::now() + 3 * WAIT;
    loop {
        if let Ok(mut client) =
            common::Client::try_upgrade(server.ws_addr, &format!("/v1/ws?token={key}"))
        {
            client.welcome = client.next_json(WAIT);
            assert_eq!(client.welcome["type"], "welcome", "{}", client.welcome);
            return client;
        }
        assert!(
            Instant::now() < deadline,
            "key not accepted:\n{}",
            server.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn cluster_import_keeps_every_seq_and_key_so_clients_resume_across_the_switch() {
    // A single node (no NATS) with history, some of it dropped by retention.
    let mut single = ServerBuilder::new()
        .org("org_a")
        .arg("--history-messages", "6")
        .start();
    let key = single.key("org_a").to_string();
    let mut bodies: Vec<String> = (0..10)
        .map(|i| event("org_a", &format!("e{i}"), "src_1"))
        .collect();
    bodies.push(common::sync("org_a", "col_1", "c0"));
    assert_eq!(
        single.publish_ok(&array(&bodies)),
        (1..=11).collect::<Vec<u64>>()
    );
    let poll = format!("/v1/poll?channels=events,collections:col_1&after=0&token={key}");
    let before = get_json(single.ws_addr, &poll);
    assert_eq!(
        before["recovered"], false,
        "retention dropped some: {before}"
    );
    single.signal(libc::SIGTERM);
    assert!(single.wait_exit(WAIT).is_some());

    let nats = Nats::start();
    let import = common::hookstream_command()
        .args(["cluster", "import", "--history-messages", "6"])
        .args(["--nats-url", &nats.url(), "--data-dir"])
        .arg(single.data_dir())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&import.stderr).to_string();
    assert!(import.status.success(), "{said}");
    assert!(said.contains("messages of 1 org(s)"), "{said}");
    // Again: nothing is imported twice.
    let again = common::hookstream_command()
        .args(["cluster", "import", "--history-messages", "6"])
        .args(["--nats-url", &nats.url(), "--data-dir"])
        .arg(single.data_dir())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&again.stderr).to_string();
    assert!(again.status.success(), "{said}");
    assert!(said.contains("already in JetStream up to seq 11"), "{said}");

    // A fresh node: the key and every seq came through JetStream.
    let b = ServerBuilder::new()
        .arg("--nats-url", nats.url())
        .arg("--node-id", "b")
        .arg("--history-messages", "6")
        .start();
    wait_ready(&b);
    let mut client = connect_when_admitted(&b, &key);
    assert_eq!(client.welcome["seq"], 11);
    let after = get_json(b.ws_addr, &poll);
    assert_eq!(after, before, "the same page before and after the import");
    let ack = client.subscribe_after("events", 8);
    assert_eq!(ack["recovered"], true, "{ack}");
    assert_eq!(
        take(&mut client, 2),
        vec![(9, "e8".to_string()), (10, "e9".to_string())]
    );
    assert_eq!(b.publish_ok(&events(10, 11)), vec![12]);
    assert_eq!(take(&mut client, 1), vec![(12, "e10".to_string())]);
}

#[test]
fn a_node_that_loses_its_nats_server_gets_what_others_published_meanwhile() {
    let mut servers = Nats::cluster(3);
    let replicas = [("--nats-replicas", "3")];
    // A knows only the first NATS server, B only the second.
    let a = node_on(&servers[0].url(), None, "a", &replicas);
    let b = node_on(&servers[1].url(), Some(&a), "b", &replicas);
    assert_eq!(publish_with_retries(&b, 0), 1);
    let mut on_a = a.connect("org_a");
    on_a.subscribe_after("events", 0);
    assert_eq!(take(&mut on_a, 1), vec![(1, "e0".to_string())]);
    // A's NATS server goes away while B publishes.
    servers[0].stop();
    for i in 1..30 {
        assert_eq!(publish_with_retries(&b, i), i as u64 + 1);
    }
    servers[0].restart();
    for i in 30..40 {
        assert_eq!(publish_with_retries(&b, i), i as u64 + 1);
    }
    // Every message once, in order, on A's connection, which stayed open.
    let expected: Vec<(u64, String)> = (1..40).map(|i| (i as u64 + 1, format!("e{i}"))).collect();
    // A's client reconnects to another NATS server (with its backoff),
    // then its follower starts a new consumer from its last seq.
    let got = take_within(
        &mut on_a,
        expected.len(),
        Duration::from_secs(30),
        &[&a, &b],
    );
    assert_eq!(got, expected);
    on_a.ping_pong();
}

#[test]
fn a_session_cookie_signed_on_one_node_works_on_every_node() {
    let nats = Nats::start();
    let a = node(&nats, None, "a");
    // B's own secret differs until it adopts the cluster's at startup.
    let b = node(&nats, Some(&a), "b");
    let c = ServerBuilder::new()
        .arg("--nats-url", nats.url())
        .arg("--node-id", "c")
        .start();
    wait_ready(&c);
    let cookie = common::sign_in(a.ws_addr, a.key("org_a"));
    for server in [&a, &b, &c] {
        // Keys reach C through NATS; the cookie needs its key.
        drop(connect_when_admitted(server, a.key("org_a")));
        let response = http_request(
            server.ws_addr,
            "GET",
            "/v1/sessions",
            &[("Cookie", format!("hs_session={cookie}"))],
            b"",
        );
        assert_eq!(response.status, 200, "{}", response.text());
        assert_eq!(response.json()["org_id"], "org_a", "{}", response.text());
    }
    let secret = |s: &Server| std::fs::read_to_string(s.data_dir().join("session-secret")).unwrap();
    assert_eq!(
        secret(&a),
        secret(&c),
        "the adopted secret is kept for restarts"
    );
}

/// Runs `work` with a JetStream context on `url`, on a runtime of its own.
fn with_jetstream<T, F: std::future::Future<Output = T>>(
    url: &str,
    work: impl FnOnce(async_nats::jetstream::Context) -> F,
) -> T {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client = async_nats::connect(url).await.expect("connect to NATS");
        work(async_nats::jetstream::new(client)).await
    })
}

/// The cluster's session secret as stored in JetStream, once there is one
/// (asked for up to 30 s while the JetStream cluster elects its leaders).
fn stored_session_secret(url: &str) -> String {
    with_jetstream(url, |js| async move {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(stream) = js.get_stream("HSKEYS").await {
                if let Ok(message) = stream
                    .get_last_raw_message_by_subject("hs_session_secret")
                    .await
                {
                    return String::from_utf8(message.payload.to_vec()).unwrap();
                }
            }
            assert!(Instant::now() < deadline, "no session secret in HSKEYS");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

/// Waits up to 30 s for `server` to log a line containing `text`.
fn wait_for_log(server: &Server, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !server.stderr().contains(text) {
        assert!(
            Instant::now() < deadline,
            "no \"{text}\" within 30 s:\n{}",
            server.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits up to 10 s until the number of `server`'s log lines containing
/// `text` satisfies `enough`.
fn wait_for_log_count(server: &Server, text: &str, enough: impl Fn(usize) -> bool) {
    let deadline = Instant::now() + WAIT;
    while !enough(server.stderr().matches(text).count()) {
        assert!(
            Instant::now() < deadline,
            "not enough \"{text}\" within {WAIT:?}:\n{}",
            server.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn session_of(server: &Server, cookie: &str) -> HttpResponse {
    http_request(
        server.ws_addr,
        "GET",
        "/v1/sessions",
        &[("Cookie", format!("hs_session={cookie}"))],
        b"",
    )
}

#[test]
fn a_node_that_cannot_read_the_session_secret_at_startup_adopts_it_once_it_can() {
    let mut nats = Nats::start();
    let b = node(&nats, None, "b");
    let secret = stored_session_secret(&nats.url());
    // NATS gone while A starts: A cannot read the cluster's secret.
    nats.stop();
    let a = ServerBuilder::new()
        .arg("--nats-url", nats.url())
        .arg("--node-id", "a")
        .arg("--shards", 2)
        .org("org_a")
        .start();
    wait_for_log(&a, "session secret could not be read at startup");
    let early = common::sign_in(a.ws_addr, a.key("org_a"));
    nats.restart();
    wait_for_log(&a, "signing session cookies with the cluster's secret now");
    let file = |s: &Server| std::fs::read_to_string(s.data_dir().join("session-secret")).unwrap();
    assert_eq!(file(&a), secret, "the adopted secret is kept for restarts");
    // A cookie A signed with its own secret still works on A; one it signs
    // now works on B too.
    let response = session_of(&a, &early);
    assert_eq!(response.status, 200, "{}", response.text());
    let cookie = common::sign_in(a.ws_addr, a.key("org_a"));
    // A's own key reaches B through NATS; the cookie needs it.
    drop(connect_when_admitted(&b, a.key("org_a")));
    for server in [&a, &b] {
        let response = session_of(server, &cookie);
        assert_eq!(response.status, 200, "{}", response.text());
        assert_eq!(response.json()["org_id"], "org_a", "{}", response.text());
    }
}

#[test]
fn a_sign_out_on_one_node_closes_that_session_on_every_node_within_2_s() {
    let nats = Nats::start();
    let a = node(&nats, None, "a");
    let b = node(&nats, Some(&a), "b");
    let cookie = common::sign_in(a.ws_addr, a.key("org_a"));
    let origin = format!("http://{}", b.ws_addr);
    let mut on_b = common::Client::connect_with(
        b.ws_addr,
        "/v1/ws",
        &[
            ("Cookie", &format!("hs_session={cookie}")),
            ("Origin", &origin),
        ],
    );
    on_b.subscribe("events");
    let signed_out = http_request(
        a.ws_addr,
        "DELETE",
        "/v1/sessions",
        &[("Cookie", format!("hs_session={cookie}"))],
        b"",
    );
    assert_eq!(signed_out.status, 204, "{}", signed_out.text());
    let at = Instant::now();
    assert_eq!(on_b.expect_close(Duration::from_secs(2)), Some(4003));
    assert!(at.elapsed() < Duration::from_secs(2));
    let refused = http_request(
        b.ws_addr,
        "GET",
        "/v1/events",
        &[("Cookie", format!("hs_session={cookie}"))],
        b"",
    );
    assert_eq!(refused.status, 401, "{}", refused.text());
}

/// Publishes event `id` of `org` (idempotency key `org-id`), retrying on
/// 503 ([`publish_until_accepted`]); returns its seq.
fn publish_org_with_retries(server: &Server, org: &str, id: &str) -> u64 {
    publish_until_accepted(server, org, &format!("{org}-{id}"), id)
}

/// Creates `org`'s stream as a node would (one replica, the nodes'
/// default limits), placed on the NATS server tagged `tag`, named
/// `server`: what an operator does to spread orgs over NATS servers (a
/// node takes a stream that exists as it is). Retries while the JetStream
/// cluster elects its leader.
fn create_placed_stream(url: &str, org: &str, tag: &str, server: &str) {
    use async_nats::jetstream::stream;
    with_jetstream(url, |js| async move {
        let config = stream::Config {
            name: format!("HS_{org}"),
            subjects: vec![format!("hs.{org}.>")],
            max_messages: 100_000,
            max_age: Duration::from_secs(24 * 3600),
            num_replicas: 1,
            duplicate_window: Duration::from_secs(120),
            storage: stream::StorageType::File,
            discard: stream::DiscardPolicy::Old,
            allow_direct: true,
            placement: Some(stream::Placement {
                tags: vec![tag.to_string()],
                ..Default::default()
            }),
            ..Default::default()
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let info = loop {
            match js.create_stream(config.clone()).await {
                Ok(mut stream) => break stream.info().await.expect("stream info").clone(),
                Err(e) => {
                    assert!(Instant::now() < deadline, "stream of {org}: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        let leader = info.cluster.as_ref().and_then(|c| c.leader.clone());
        assert_eq!(leader.as_deref(), Some(server), "{info:?}");
    })
}

/// `GET /v1/poll?channels=events&after=0` of `key`'s org on `node`,
/// asked again (for up to 30 s) while the node answers 503 or not within
/// 10 s (a NATS server that just came back may take a few seconds to
/// answer the follow and the read it needs).
fn poll_when_answered(node: &Server, key: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let path = format!("/v1/poll?channels=events&after=0&token={key}");
        let answer = get_raw(node.ws_addr, &path, Duration::from_secs(10));
        if let Ok(text) = &answer {
            if text.starts_with("HTTP/1.1 200") {
                let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
                return serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {text}"));
            }
        }
        assert!(
            Instant::now() < deadline,
            "no poll answer within 30 s: {answer:?}\n{}",
            node.stderr()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_stream_without_quorum_answers_503_for_its_org_only() {
    // Three clustered NATS servers, tagged s0..s2, and single-replica
    // streams: each org's stream lives on one server, X's on the second
    // and Y's on the third. The node talks to the first only, so stopping
    // the second leaves its NATS connection alone.
    let mut servers = Nats::cluster_tagged(3, true);
    let (org_x, org_y) = ("org_x", "org_y");
    create_placed_stream(&servers[0].url(), org_x, "s1", "nats-1");
    create_placed_stream(&servers[0].url(), org_y, "s2", "nats-2");
    let node = ServerBuilder::new()
        .arg("--nats-url", servers[0].url())
        .arg("--node-id", "a")
        .arg("--nats-replicas", 1)
        .org(org_x)
        .org(org_y)
        .start();
    wait_ready(&node);
    for org in [org_x, org_y] {
        for i in 0..3 {
            assert_eq!(
                publish_org_with_retries(&node, org, &format!("e{i}")),
                i + 1
            );
        }
    }
    assert_eq!(publish_org_with_retries(&node, org_y, "e3"), 4);
    let mut subscriber = node.connect(org_y);
    subscriber.subscribe_after("events", 4);

    servers[1].stop();
    // X's stream has no server left: 503 unavailable with Retry-After.
    let response = node.publish(&format!(
        r#"{{"org_id":"{org_x}","type":"event","data":{{"id":"lost","source_id":"src_1"}}}}"#
    ));
    assert_eq!(response.status, 503, "{}", response.text());
    assert_eq!(response.json()["error"], "unavailable");
    assert!(response.header("Retry-After").is_some());
    // Y publishes and delivers on as before, with no 503.
    for i in 4..9 {
        let body = format!(
            r#"{{"org_id":"{org_y}","type":"event","data":{{"id":"e{i}","source_id":"src_1"}}}}"#
        );
        assert_eq!(node.publish_ok(&body), vec![i + 1]);
    }
    let expected: Vec<(u64, String)> = (4..9).map(|i| (i + 1, format!("e{i}"))).collect();
    assert_eq!(take_from(&mut subscriber, 5, &[&node]), expected);
    // X's server back: X publishes again, after everything acknowledged
    // before (nothing lost, the refused message not stored).
    servers[1].restart();
    assert_eq!(publish_org_with_retries(&node, org_x, "e3"), 4);
    let key = node.key(org_x).to_string();
    let page = poll_when_answered(&node, &key);
    let kept: Vec<(u64, String)> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["seq"].as_u64().unwrap(),
                m["data"]["id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expected: Vec<(u64, String)> = (0..4).map(|i| (i + 1, format!("e{i}"))).collect();
    assert_eq!(kept, expected, "{page}");
    subscriber.ping_pong();
}

#[test]
fn a_follow_started_while_jetstream_has_no_meta_leader_still_delivers_live() {
    // Y's single-replica stream lives on the third NATS server, which the
    // node talks to. Stopping the other two leaves JetStream without a
    // meta leader (no consumer can be created) while Y's stream, its
    // leader alive, still stores and answers reads.
    let mut servers = Nats::cluster_tagged(3, true);
    let org_y = "org_y";
    create_placed_stream(&servers[0].url(), org_y, "s2", "nats-2");
    let node = ServerBuilder::new()
        .arg("--nats-url", servers[2].url())
        .arg("--node-id", "a")
        .arg("--nats-replicas", 1)
        .org(org_y)
        .start();
    wait_ready(&node);
    for i in 0..3 {
        assert_eq!(
            publish_org_with_retries(&node, org_y, &format!("e{i}")),
            i + 1
        );
    }
    servers[0].stop();
    servers[1].stop();
    // The org's first connection on the node: its follow starts now.
    let mut subscriber = node.connect(org_y);
    subscriber.subscribe_after("events", 3);
    for i in 3..8 {
        assert_eq!(
            publish_org_with_retries(&node, org_y, &format!("e{i}")),
            i + 1
        );
    }
    let expected: Vec<(u64, String)> = (3..8).map(|i| (i + 1, format!("e{i}"))).collect();
    assert_eq!(take_from(&mut subscriber, 5, &[&node]), expected);
    subscriber.ping_pong();
}

/// Kills the process `<data-dir>/hookstream.pid` names when the test ends:
/// after a hot upgrade the node is no longer the test's child.
struct Reaper(PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Some(pid) = std::fs::read_to_string(&self.0)
            .ok()
            .and_then(|t| t.trim().parse::<i32>().ok())
        {
            // SAFETY: kill(2) of the node this test started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Publishes `prefix0`, `prefix1`, … one a request through `admin` until
/// stopped; returns the acknowledged (seq, id) pairs. Every answer must be
/// 202.
fn publishing(
    admin: SocketAddr,
    token: String,
    prefix: &'static str,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<(u64, String)>> {
    std::thread::spawn(move || {
        let mut acknowledged = Vec::new();
        let mut i = 0;
        while !stop.load(Ordering::Relaxed) {
            let id = format!("{prefix}{i}");
            let response = http_request(
                admin,
                "POST",
                "/v1/publish",
                &[("Authorization", format!("Bearer {token}"))],
                event("org_a", &id, "src_1").as_bytes(),
            );
            assert_eq!(response.status, 202, "{id}: {}", response.text());
            acknowledged.push((response.json()["seqs"][0].as_u64().unwrap(), id));
            i += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
        acknowledged
    })
}

/// Issue 15 in cluster mode: a node hot-upgrades while its subscribers
/// receive what is published through it and through another node; each
/// subscriber gets every message once, in seq order, with no close and no
/// second welcome, and answers a ping on the new process.
#[test]
fn a_node_hot_upgrades_while_both_nodes_publish_and_its_subscribers_miss_nothing() {
    let nats = Nats::start();
    let mut a = node(&nats, None, "a");
    let _reaper = Reaper(a.data_dir().join("hookstream.pid"));
    let b = node(&nats, Some(&a), "b");
    let mut subscribers: Vec<common::Client> = (0..20)
        .map(|_| {
            let mut client = a.connect("org_a");
            client.subscribe("events");
            client
        })
        .collect();
    let mut on_b = b.connect("org_a");
    on_b.subscribe("events");
    let stop = Arc::new(AtomicBool::new(false));
    let through_a = publishing(a.admin_addr, a.admin_token.clone(), "a", stop.clone());
    let through_b = publishing(b.admin_addr, b.admin_token.clone(), "b", stop.clone());
    std::thread::sleep(Duration::from_millis(500));

    let old_pid = a.pid();
    let output = common::hookstream_command()
        .args(["upgrade", "--timeout-secs", "60", "--data-dir"])
        .arg(a.data_dir())
        .stdin(Stdio::null())
        .output()
        .expect("run hookstream upgrade");
    assert!(
        output.status.success(),
        "upgrade failed: {}\nnode a:\n{}",
        String::from_utf8_lossy(&output.stderr),
        a.stderr()
    );
    let new_pid: u32 = std::fs::read_to_string(a.data_dir().join("hookstream.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_ne!(new_pid, old_pid);
    let status = a.wait_exit(WAIT).expect("the old process exits");
    assert!(status.success(), "old process: {status}");

    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let mut expected: Vec<(u64, String)> = through_a.join().unwrap();
    let from_b = through_b.join().unwrap();
    assert!(!expected.is_empty() && !from_b.is_empty());
    expected.extend(from_b);
    expected.sort();
    let seqs: Vec<u64> = expected.iter().map(|(seq, _)| *seq).collect();
    assert_eq!(
        seqs,
        (1..=expected.len() as u64).collect::<Vec<_>>(),
        "one seq per acknowledged message"
    );
    for (i, client) in subscribers.iter_mut().chain([&mut on_b]).enumerate() {
        // Everything it receives (until quiet for 2 s), the welcome or a
        // close included, so that a difference shows.
        let mut got = Vec::new();
        while got.len() < expected.len() {
            match client.recv(Duration::from_secs(2)) {
                common::Received::Json { value, .. } => got.push((
                    value["seq"].as_u64().unwrap_or(0),
                    format!(
                        "{}{}",
                        value["data"]["id"].as_str().unwrap_or_default(),
                        if value["type"] == "event" {
                            String::new()
                        } else {
                            format!(" {value}")
                        }
                    ),
                )),
                other => {
                    got.push((0, format!("{other:?}")));
                    break;
                }
            }
        }
        assert_eq!(
            got, expected,
            "subscriber {i}: every message once, in order"
        );
        client.ping_pong();
    }
    let lines = a.stderr();
    assert!(lines.contains("took over 20 connection(s)"), "{lines}");
}

#[test]
fn a_key_revoked_or_a_session_signed_out_while_any_one_of_three_nats_servers_is_down_acts_everywhere_within_2_s(
) {
    // Each of the three NATS servers in turn is down while a key is
    // revoked and a session signed out on A: whichever held a stream's
    // leader or a node's connection, B closes the key's and the session's
    // connections within 2 s (the stored records may wait seconds for
    // JetStream to elect a leader).
    let (mut servers, a, b) = two_nodes_on_three_replicas();
    let origin = format!("http://{}", b.ws_addr);
    // Per NATS server: a key with a connection on B, and a session (of
    // another key) with a connection on B.
    let mut on_b: Vec<(String, common::Client, String, common::Client)> = (0..3)
        .map(|k| {
            let key = common::create_key(a.data_dir(), &format!("org_k{k}"));
            let mut by_key = connect_when_admitted(&b, &key);
            by_key.subscribe("events");
            let session_key = common::create_key(a.data_dir(), &format!("org_s{k}"));
            // Each node takes a new key on its own clock (A's reload, B's
            // watch).
            drop(connect_when_admitted(&a, &session_key));
            drop(connect_when_admitted(&b, &session_key));
            let cookie = common::sign_in(a.ws_addr, &session_key);
            let mut by_cookie = common::Client::connect_with(
                b.ws_addr,
                "/v1/ws",
                &[
                    ("Cookie", &format!("hs_session={cookie}")),
                    ("Origin", &origin),
                ],
            );
            by_cookie.subscribe("events");
            (format!("org_k{k}"), by_key, cookie, by_cookie)
        })
        .collect();
    // The close a client sees within 2 s.
    let closed_within_2_s = |client: &mut common::Client| {
        let at = Instant::now();
        let closed = loop {
            match client.recv(Duration::from_secs(2)) {
                common::Received::Json { .. } => continue,
                other => break other,
            }
        };
        (closed, at.elapsed())
    };
    for (k, (org, by_key, cookie, by_cookie)) in on_b.iter_mut().enumerate() {
        servers[k].stop();
        // The nodes that talked to it are back on another (a node cut off
        // from NATS learns of nothing).
        std::thread::sleep(Duration::from_millis(200));
        for node in [&a, &b] {
            wait_for_log_count(node, "cluster: connected to NATS", |connected| {
                connected > node.stderr().matches("NATS connection lost").count()
            });
        }
        let id = key_id_of(a.data_dir(), org);
        common::cli(&["api-keys", "revoke", &id], a.data_dir());
        let (closed, after) = closed_within_2_s(by_key);
        assert!(
            matches!(closed, common::Received::Close(4003)) && after < Duration::from_secs(2),
            "nats-{k} down, key revoked: {closed:?} after {after:?}\nA:\n{}\nB:\n{}",
            a.stderr(),
            b.stderr()
        );
        // The sign-out's answer may wait for JetStream; the close must not.
        let signing_out = {
            let (at, cookie) = (a.ws_addr, cookie.clone());
            std::thread::spawn(move || {
                http_request(
                    at,
                    "DELETE",
                    "/v1/sessions",
                    &[("Cookie", format!("hs_session={cookie}"))],
                    b"",
                )
                .status
            })
        };
        let (closed, after) = closed_within_2_s(by_cookie);
        assert!(
            matches!(closed, common::Received::Close(4003)) && after < Duration::from_secs(2),
            "nats-{k} down, signed out: {closed:?} after {after:?}\nA:\n{}\nB:\n{}",
            a.stderr(),
            b.stderr()
        );
        assert_eq!(signing_out.join().unwrap(), 204);
        servers[k].restart();
        // Back in the cluster before the next one goes.
        servers.iter().for_each(Nats::wait_healthy);
    }
}
