//! Measures cluster mode (issue 14) against a single node on the same
//! machine: publish → receive latency (p50/p99) of a subscriber on the
//! publishing node and on another node, and publish throughput (messages/s,
//! p99 request latency) through JetStream beside a bare async-nats
//! JetStream publisher (the ceiling).
//!
//! It starts its own `nats-server -js` (temporary store) and gateway nodes
//! on free loopback ports:
//!
//! ```sh
//! cargo build --release --bin hookstream --example cluster_bench
//! target/release/examples/cluster_bench --messages 2000 --rate 200 --seconds 5
//! ```
//!
//! `--throughput-only` skips the latency runs (`tools/bench --only cluster`
//! measures latency at 1,000 and 10,000 subscribers with tools/loadgen and
//! takes the throughput pair from here). The last line of the output is
//! every figure as one JSON object.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

struct Options {
    binary: PathBuf,
    messages: usize,
    rate: u64,
    seconds: u64,
    publishers: usize,
    batch: usize,
    throughput_only: bool,
}

fn options() -> Options {
    let mut o = Options {
        binary: PathBuf::from("target/release/hookstream"),
        messages: 2000,
        rate: 200,
        seconds: 5,
        publishers: 8,
        batch: 50,
        throughput_only: false,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let v = args.get(i + 1).cloned().unwrap_or_default();
        if args[i] == "--throughput-only" {
            o.throughput_only = true;
            i += 1;
            continue;
        }
        match args[i].as_str() {
            "--binary" => o.binary = v.into(),
            "--messages" => o.messages = v.parse().expect("--messages N"),
            "--rate" => o.rate = v.parse().expect("--rate N"),
            "--seconds" => o.seconds = v.parse().expect("--seconds N"),
            "--publishers" => o.publishers = v.parse().expect("--publishers N"),
            "--batch" => o.batch = v.parse().expect("--batch N"),
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    o
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "hookstream-cluster-bench-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A JetStream `nats-server` on a port it picks itself (`-p -1`), read
/// from its log: no port is picked here and then taken by someone else
/// before the server binds it.
fn start_nats() -> (Proc, u16) {
    let dir = temp_dir("nats");
    let mut child = Command::new("nats-server")
        .args(["-js", "-a", "127.0.0.1", "-p", "-1", "-sd"])
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nats-server (tools/setup-nats-tests installs it)");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut port = None;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some((_, at)) = line.split_once("Listening for client connections on ") {
                port = at
                    .rsplit(':')
                    .next()
                    .and_then(|p| p.trim().parse::<u16>().ok());
            }
            if line.contains("Server is ready") {
                let _ = tx.send(port);
            }
        }
    });
    let port = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("nats-server ready")
        .expect("nats-server's client port in its log");
    (Proc(child), port)
}

struct Node {
    _proc: Proc,
    ws: SocketAddr,
    admin: SocketAddr,
    dir: PathBuf,
}

fn start_node(o: &Options, name: &str, nats: Option<u16>, token: &str) -> Node {
    let dir = temp_dir(name);
    let mut command = Command::new(&o.binary);
    command
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .args(["--shards", "1", "--data-dir"])
        .arg(&dir)
        .env("HOOKSTREAM_ADMIN_TOKEN", token)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(port) = nats {
        command.args([
            "--nats-url",
            &format!("nats://127.0.0.1:{port}"),
            "--node-id",
            name,
        ]);
    }
    let mut child = command.spawn().expect("start hookstream");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("listening on ws://").nth(1) {
                let ws: SocketAddr = rest.split('/').next().unwrap().parse().unwrap();
                let admin: SocketAddr = rest
                    .split("(admin http://")
                    .nth(1)
                    .unwrap()
                    .split(')')
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap();
                let _ = tx.send((ws, admin));
            }
        }
    });
    let (ws, admin) = rx.recv_timeout(Duration::from_secs(20)).expect("listening");
    let node = Node {
        _proc: Proc(child),
        ws,
        admin,
        dir,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while http(node.admin, "GET", "/readyz", "", b"").0 != 200 {
        assert!(Instant::now() < deadline, "{name} not ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    node
}

fn create_key(o: &Options, dir: &Path) -> String {
    let out = Command::new(&o.binary)
        .args([
            "api-keys",
            "create",
            "--name",
            "bench",
            "--org",
            "org_bench",
            "--data-dir",
        ])
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// One HTTP/1.1 request on a fresh connection: (status, body).
fn http(addr: SocketAddr, method: &str, path: &str, token: &str, body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// A subscriber's latencies (µs) of `count` messages, on its own thread.
fn subscriber(ws: SocketAddr, key: &str, count: usize) -> std::thread::JoinHandle<Vec<u64>> {
    let url = format!("ws://{ws}/v1/ws?token={key}");
    let (mut socket, _) = tungstenite::connect(url).expect("upgrade");
    socket.read().unwrap(); // welcome
    socket
        .send(tungstenite::Message::text(
            r#"{"type":"subscribe","channel":"events"}"#,
        ))
        .unwrap();
    socket.read().unwrap(); // subscribed
    std::thread::spawn(move || {
        let mut out = Vec::with_capacity(count);
        while out.len() < count {
            if let tungstenite::Message::Text(text) = socket.read().unwrap() {
                let at = now_us();
                let value: serde_json::Value = serde_json::from_str(&text).unwrap();
                if let Some(sent) = value["data"]["sent_us"].as_u64() {
                    out.push(at.saturating_sub(sent));
                }
            }
        }
        out
    })
}

fn latency(
    o: &Options,
    publish_on: &Node,
    subscribe_on: &[&Node],
    key: &str,
    token: &str,
) -> Vec<Vec<u64>> {
    let subs: Vec<_> = subscribe_on
        .iter()
        .map(|n| subscriber(n.ws, key, o.messages))
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let interval = Duration::from_micros(1_000_000 / o.rate);
    let start = Instant::now();
    for i in 0..o.messages {
        let due = start + interval * i as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let body = format!(
            r#"{{"org_id":"org_bench","type":"event","data":{{"id":"e{i}","source_id":"s","sent_us":{}}}}}"#,
            now_us()
        );
        let (status, text) = http(
            publish_on.admin,
            "POST",
            "/v1/publish",
            token,
            body.as_bytes(),
        );
        assert_eq!(status, 202, "{text}");
    }
    subs.into_iter()
        .map(|h| {
            let mut v = h.join().unwrap();
            v.sort_unstable();
            v
        })
        .collect()
}

/// Publish throughput: `publishers` threads posting `batch` messages per
/// request for `seconds`: (messages/s, p99 request latency ms).
fn throughput(o: &Options, node: &Node, token: &str) -> (f64, f64) {
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let body: String = {
        let items: Vec<String> = (0..o.batch)
            .map(|i| format!(r#"{{"org_id":"org_tp","type":"event","data":{{"id":"t{i}","source_id":"s","pad":"{}"}}}}"#, "x".repeat(100)))
            .collect();
        format!("[{}]", items.join(","))
    };
    let threads: Vec<_> = (0..o.publishers)
        .map(|_| {
            let stop = stop.clone();
            let sent = sent.clone();
            let body = body.clone();
            let admin = node.admin;
            let token = token.to_string();
            let batch = o.batch as u64;
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let (status, text) =
                        http(admin, "POST", "/v1/publish", &token, body.as_bytes());
                    assert_eq!(status, 202, "{text}");
                    lat.push(t.elapsed().as_micros() as u64);
                    sent.fetch_add(batch, Ordering::Relaxed);
                }
                lat
            })
        })
        .collect();
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(o.seconds));
    stop.store(true, Ordering::Relaxed);
    let mut lat: Vec<u64> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    (
        sent.load(Ordering::Relaxed) as f64 / elapsed,
        percentile(&lat, 0.99) as f64 / 1000.0,
    )
}

/// A bare async-nats JetStream publisher: `batch` publishes pipelined,
/// then their acks, for `seconds`: messages/s.
fn bare_publisher(o: &Options, port: u16) -> f64 {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client = async_nats::connect(format!("nats://127.0.0.1:{port}"))
            .await
            .unwrap();
        let js = async_nats::jetstream::new(client);
        js.get_or_create_stream(async_nats::jetstream::stream::Config {
            name: "BARE".to_string(),
            subjects: vec!["bare.>".to_string()],
            max_messages: 100_000,
            ..Default::default()
        })
        .await
        .unwrap();
        let payload = bytes::Bytes::from(format!(
            r#"{{"id":"t","source_id":"s","pad":"{}"}}"#,
            "x".repeat(100)
        ));
        let start = Instant::now();
        let mut count = 0u64;
        while start.elapsed() < Duration::from_secs(o.seconds) {
            let mut acks = Vec::with_capacity(o.batch);
            for _ in 0..o.batch {
                acks.push(js.publish("bare.event", payload.clone()).await.unwrap());
            }
            for ack in acks {
                ack.await.unwrap();
            }
            count += o.batch as u64;
        }
        count as f64 / start.elapsed().as_secs_f64()
    })
}

fn report(name: &str, v: &[u64]) {
    println!(
        "  {name:<40} p50 {:>7.2} ms  p99 {:>7.2} ms  ({} messages)",
        percentile(v, 0.5) as f64 / 1000.0,
        percentile(v, 0.99) as f64 / 1000.0,
        v.len()
    );
}

fn main() {
    let o = options();
    let token = "bench-admin-token";
    println!(
        "cluster_bench: {} messages at {}/s per latency run; throughput {} publishers x {} messages/request for {} s",
        o.messages, o.rate, o.publishers, o.batch, o.seconds
    );

    // Single node (the local log, --durability fsync default).
    let single = start_node(&o, "single", None, token);
    let key = create_key(&o, &single.dir);
    std::thread::sleep(Duration::from_millis(1200));
    let single_lat = if o.throughput_only {
        vec![Vec::new()]
    } else {
        latency(&o, &single, &[&single], &key, token)
    };
    let (single_tp, single_p99) = throughput(&o, &single, token);
    drop(single);

    // Two nodes on one nats-server.
    let (_nats, port) = start_nats();
    let a = start_node(&o, "a", Some(port), token);
    let key = create_key(&o, &a.dir);
    let b = start_node(&o, "b", Some(port), token);
    // B gets A's key through NATS.
    std::thread::sleep(Duration::from_millis(1500));
    let cluster_lat = if o.throughput_only {
        vec![Vec::new(), Vec::new()]
    } else {
        latency(&o, &a, &[&a, &b], &key, token)
    };
    let (cluster_tp, cluster_p99) = throughput(&o, &a, token);
    let bare = bare_publisher(&o, port);

    if !o.throughput_only {
        println!("publish -> receive latency, 1 subscriber per node:");
        report("single node", &single_lat[0]);
        report(
            "cluster, subscriber on the publishing node",
            &cluster_lat[0],
        );
        report("cluster, subscriber on the other node", &cluster_lat[1]);
    }
    println!("publish throughput:");
    println!(
        "  single node (fsync)      {single_tp:>9.0} messages/s, p99 request {single_p99:.2} ms"
    );
    println!(
        "  cluster (JetStream R1)   {cluster_tp:>9.0} messages/s, p99 request {cluster_p99:.2} ms"
    );
    println!(
        "  bare async-nats publisher {bare:>8.0} messages/s (batches of {}); cluster = {:.0}% of it",
        o.batch,
        cluster_tp / bare * 100.0
    );
    let ms = |v: &[u64], p| percentile(v, p) as f64 / 1000.0;
    println!(
        "{}",
        serde_json::json!({
            "publishers": o.publishers,
            "batch": o.batch,
            "seconds": o.seconds,
            "single_publish_per_s": single_tp,
            "single_publish_request_p99_ms": single_p99,
            "cluster_publish_per_s": cluster_tp,
            "cluster_publish_request_p99_ms": cluster_p99,
            "bare_publish_per_s": bare,
            "cluster_over_bare": cluster_tp / bare,
            "latency_single_p50_ms": ms(&single_lat[0], 0.5),
            "latency_single_p99_ms": ms(&single_lat[0], 0.99),
            "latency_same_node_p99_ms": ms(&cluster_lat[0], 0.99),
            "latency_other_node_p99_ms": ms(&cluster_lat[1], 0.99),
        })
    );
    drop((a, b, _nats));
    for name in ["single", "nats", "a", "b"] {
        let _ = std::fs::remove_dir_all(std::env::temp_dir().join(format!(
            "hookstream-cluster-bench-{}-{name}",
            std::process::id()
        )));
    }
}
