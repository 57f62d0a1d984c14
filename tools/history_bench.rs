//! Measures the message history (issue 5): publish throughput and latency
//! with `--durability fsync` and `none` (messages/s, fsyncs/s, p50/p99
//! publish latency), and replay throughput (WebSocket `after` and
//! `/v1/poll` paging).
//!
//! It starts its own `hookstream serve` on a data directory on disk (not
//! tmpfs, so fsync is real) and drives it over real sockets:
//!
//! ```sh
//! cargo build --release --bin hookstream --example history_bench
//! target/release/examples/history_bench --durability fsync --publishers 16 --seconds 10
//! target/release/examples/history_bench --durability none --publishers 16 --seconds 10
//! target/release/examples/history_bench --replay 200000
//! target/release/examples/history_bench --shards 1 --publishers 0 --scan-stall 4 --seconds 10
//! ```
//!
//! `--scan-stall N` measures what history reads that match little cost
//! the rest of their shard: with `--replay` messages (default 100,000)
//! retained in one org, a subscriber of another org on the same shard
//! takes a message every 10 ms for `--seconds`, first alone, then while
//! N clients poll the first org over and over with 256 channels that
//! match nothing (each poll looks at every retained message); it prints
//! publish→receive latency for both and the polls answered per second.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

struct Options {
    binary: PathBuf,
    dir: PathBuf,
    durability: String,
    shards: usize,
    publishers: usize,
    seconds: u64,
    batch: usize,
    payload: usize,
    orgs: usize,
    replay: usize,
    scan_stall: usize,
}

fn parse_options() -> Options {
    let mut options = Options {
        binary: PathBuf::from("target/release/hookstream"),
        dir: PathBuf::from(format!("/var/tmp/hookstream-bench-{}", std::process::id())),
        durability: "fsync".to_string(),
        shards: 2,
        publishers: 16,
        seconds: 10,
        batch: 1,
        payload: 200,
        orgs: 8,
        replay: 0,
        scan_stall: 0,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let value = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--binary" => options.binary = value.into(),
            "--dir" => options.dir = value.into(),
            "--durability" => options.durability = value,
            "--shards" => options.shards = value.parse().expect("--shards N"),
            "--publishers" => options.publishers = value.parse().expect("--publishers N"),
            "--seconds" => options.seconds = value.parse().expect("--seconds N"),
            "--batch" => options.batch = value.parse().expect("--batch N"),
            "--payload" => options.payload = value.parse().expect("--payload BYTES"),
            "--orgs" => options.orgs = value.parse().expect("--orgs N"),
            "--replay" => options.replay = value.parse().expect("--replay N"),
            "--scan-stall" => options.scan_stall = value.parse().expect("--scan-stall N"),
            other => panic!("unknown option {other}"),
        }
        i += 2;
    }
    options
}

struct Server {
    child: Child,
    ws: SocketAddr,
    admin: SocketAddr,
    token: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(options: &Options) -> (Server, String) {
    let _ = std::fs::remove_dir_all(&options.dir);
    std::fs::create_dir_all(&options.dir).expect("create data dir");
    let key = create_key(options, "replay");
    let mut child = Command::new(&options.binary)
        .arg("serve")
        .arg("--data-dir")
        .arg(&options.dir)
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--durability", &options.durability])
        .args(["--shards", &options.shards.to_string()])
        .args([
            "--history-messages",
            &options.replay.max(100_000).to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn hookstream serve");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if line.starts_with("hookstream listening on ") {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(line);
                }
            } else {
                eprintln!("server: {line}");
            }
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("server started");
    let rest = line.strip_prefix("hookstream listening on ws://").unwrap();
    let (ws, rest) = rest.split_once("/v1/ws (admin http://").unwrap();
    let (admin, _) = rest.split_once(')').unwrap();
    let token = std::fs::read_to_string(options.dir.join("admin-token"))
        .unwrap()
        .trim()
        .to_string();
    (
        Server {
            child,
            ws: ws.parse().unwrap(),
            admin: admin.parse().unwrap(),
            token,
        },
        key,
    )
}

/// One keep-alive HTTP/1.1 connection.
struct Http {
    stream: TcpStream,
    buffer: Vec<u8>,
}

impl Http {
    fn connect(addr: SocketAddr) -> Http {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_nodelay(true).unwrap();
        Http {
            stream,
            buffer: Vec::new(),
        }
    }

    /// Sends a request and returns (status, body).
    fn request(
        &mut self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: &[u8],
    ) -> (u16, Vec<u8>) {
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {}\r\n",
            body.len()
        );
        if let Some(token) = token {
            head.push_str(&format!(
                "Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
            ));
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(body);
        self.stream.write_all(&out).expect("send request");
        let head_end = loop {
            if let Some(at) = self.buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            self.fill();
        };
        let head = String::from_utf8_lossy(&self.buffer[..head_end]).to_string();
        let status: u16 = head[9..12].parse().expect("status");
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .expect("content-length");
        while self.buffer.len() < head_end + length {
            self.fill();
        }
        let body = self.buffer[head_end..head_end + length].to_vec();
        self.buffer.drain(..head_end + length);
        (status, body)
    }

    fn fill(&mut self) {
        let mut chunk = [0u8; 65536];
        let n = self.stream.read(&mut chunk).expect("read answer");
        assert!(n > 0, "server closed the connection");
        self.buffer.extend_from_slice(&chunk[..n]);
    }
}

fn metric(server: &Server, name: &str) -> u64 {
    let mut http = Http::connect(server.admin);
    let (status, body) = http.request("GET", "/metrics", Some(&server.token), b"");
    assert_eq!(status, 200);
    String::from_utf8_lossy(&body)
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

fn message(org: &str, id: u64, payload: &str) -> String {
    format!(
        r#"{{"org_id":"{org}","type":"event","data":{{"id":"evt_{id}","source_id":"src_{}","payload":"{payload}"}}}}"#,
        id % 16
    )
}

fn publish_phase(options: &Options, server: &Server) {
    let payload = "x".repeat(options.payload);
    let stop = Arc::new(AtomicBool::new(false));
    let fsyncs_before = metric(server, "hookstream_history_fsyncs_total");
    let commits_before = metric(server, "hookstream_history_commits_total");
    let started = Instant::now();
    let mut threads = Vec::new();
    for p in 0..options.publishers {
        let stop = stop.clone();
        let payload = payload.clone();
        let admin = server.admin;
        let token = server.token.clone();
        let orgs = options.orgs;
        let batch = options.batch;
        threads.push(std::thread::spawn(move || {
            let mut http = Http::connect(admin);
            let mut latencies = Vec::new();
            let mut messages = 0u64;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let org = format!("bench_{}", (p + n as usize) % orgs);
                let body = if batch == 1 {
                    message(&org, n, &payload)
                } else {
                    let items: Vec<String> = (0..batch as u64)
                        .map(|i| message(&org, n * 1000 + i, &payload))
                        .collect();
                    format!("[{}]", items.join(","))
                };
                n += 1;
                let sent = Instant::now();
                let (status, _) =
                    http.request("POST", "/v1/publish", Some(&token), body.as_bytes());
                latencies.push(sent.elapsed());
                assert_eq!(status, 202);
                messages += batch as u64;
            }
            (latencies, messages)
        }));
    }
    std::thread::sleep(Duration::from_secs(options.seconds));
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    let mut messages = 0;
    for thread in threads {
        let (l, m) = thread.join().unwrap();
        latencies.extend(l);
        messages += m;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let fsyncs = metric(server, "hookstream_history_fsyncs_total") - fsyncs_before;
    let commits = metric(server, "hookstream_history_commits_total") - commits_before;
    latencies.sort();
    println!(
        "publish: durability={} shards={} publishers={} batch={} payload={}B orgs={} seconds={:.1}",
        options.durability,
        options.shards,
        options.publishers,
        options.batch,
        options.payload,
        options.orgs,
        elapsed
    );
    println!(
        "  {:.0} messages/s, {:.0} requests/s, {:.0} fsyncs/s, {:.0} commits/s, {:.1} messages per commit",
        messages as f64 / elapsed,
        latencies.len() as f64 / elapsed,
        fsyncs as f64 / elapsed,
        commits as f64 / elapsed,
        messages as f64 / commits.max(1) as f64
    );
    println!(
        "  publish latency p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        percentile(&latencies, 0.999).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3
    );
}

/// Publishes `total` events to the org `replay`, 1,000 per request.
fn fill_replay_org(options: &Options, server: &Server, total: usize) {
    let payload = "x".repeat(options.payload);
    let mut http = Http::connect(server.admin);
    let mut n = 0u64;
    while (n as usize) < total {
        let count = (total - n as usize).min(1000);
        let items: Vec<String> = (0..count as u64)
            .map(|i| message("replay", n + i, &payload))
            .collect();
        let (status, _) = http.request(
            "POST",
            "/v1/publish",
            Some(&server.token),
            format!("[{}]", items.join(",")).as_bytes(),
        );
        assert_eq!(status, 202);
        n += count as u64;
    }
}

fn replay_phase(options: &Options, server: &Server, key: &str) {
    fill_replay_org(options, server, options.replay);
    let total = options.replay;

    // WebSocket: subscribe with after=0 and read until the last message.
    let stream = TcpStream::connect(server.ws).unwrap();
    stream.set_nodelay(true).unwrap();
    let (mut ws, _) = tungstenite::client(format!("ws://{}/v1/ws?token={key}", server.ws), stream)
        .expect("upgrade");
    let _welcome = ws.read().unwrap();
    let started = Instant::now();
    ws.send(tungstenite::Message::text(
        r#"{"type":"subscribe","channel":"events","after":0}"#,
    ))
    .unwrap();
    let mut received = 0usize;
    let mut last_seq = 0u64;
    while received < total {
        if let tungstenite::Message::Text(text) = ws.read().unwrap() {
            if text.as_str().starts_with(r#"{"type":"event""#) {
                received += 1;
                let at = text.as_str().find("\"seq\":").unwrap() + 6;
                let seq: u64 = text.as_str()[at..]
                    .split(|c: char| !c.is_ascii_digit())
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert_eq!(seq, last_seq + 1, "replay out of order");
                last_seq = seq;
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "replay (WebSocket after=0): {total} messages of ~{}B in {:.2} s: {:.0} messages/s",
        options.payload + 120,
        elapsed,
        total as f64 / elapsed
    );

    // Polling: pages of 1000.
    let mut http = Http::connect(server.ws);
    let started = Instant::now();
    let mut after = 0u64;
    let mut polled = 0usize;
    loop {
        let (status, body) = http.request(
            "GET",
            &format!("/v1/poll?channels=events&after={after}&limit=1000&token={key}"),
            None,
            b"",
        );
        assert_eq!(status, 200);
        let text = String::from_utf8_lossy(&body);
        let count = text.matches(r#"{"type":"event""#).count();
        let at = text.rfind("\"next_after\":").unwrap() + 13;
        after = text[at..].trim_end_matches('}').parse().unwrap();
        if count == 0 {
            break;
        }
        polled += count;
    }
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(polled, total);
    println!(
        "replay (/v1/poll limit=1000): {polled} messages in {:.2} s: {:.0} messages/s",
        elapsed,
        polled as f64 / elapsed
    );
}

/// A key for `org` in the bench's data directory (a running server takes
/// it up within its 0.5 s key reload).
fn create_key(options: &Options, org: &str) -> String {
    let output = Command::new(&options.binary)
        .args([
            "api-keys",
            "create",
            "--name",
            "bench",
            "--org",
            org,
            "--data-dir",
        ])
        .arg(&options.dir)
        .output()
        .expect("run api-keys create");
    assert!(
        output.status.success(),
        "api-keys create: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

/// Publish→receive latencies of an `issues` subscriber of the org `quiet`
/// taking one message every 10 ms for `seconds`, and how many messages
/// were sent (those not received within 10 s of the last are missing
/// from the latencies).
fn quiet_latencies(
    server: &Server,
    quiet_key: &str,
    seconds: u64,
    round: u64,
) -> (Vec<Duration>, u64) {
    let stream = TcpStream::connect(server.ws).unwrap();
    stream.set_nodelay(true).unwrap();
    let (mut ws, _) = tungstenite::client(
        format!("ws://{}/v1/ws?token={quiet_key}", server.ws),
        stream,
    )
    .expect("upgrade");
    let _welcome = ws.read().unwrap();
    ws.send(tungstenite::Message::text(
        r#"{"type":"subscribe","channel":"issues"}"#,
    ))
    .unwrap();
    let _subscribed = ws.read().unwrap();
    ws.get_ref()
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let (tx, rx) = mpsc::channel::<(u64, Instant)>();
    let (done_tx, done_rx) = mpsc::channel::<Instant>();
    let count = seconds * 100;
    let reader = std::thread::spawn(move || {
        let mut taken = 0;
        let mut deadline = None;
        while taken < count {
            if let Ok(last_sent) = done_rx.try_recv() {
                deadline = Some(last_sent + Duration::from_secs(10));
            }
            if deadline.is_some_and(|d| Instant::now() > d) {
                break;
            }
            let text = match ws.read() {
                Ok(tungstenite::Message::Text(text)) => text,
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(e) => {
                    eprintln!("quiet subscriber: {e}");
                    break;
                }
            };
            let Some(at) = text.as_str().find("\"id\":\"q") else {
                continue;
            };
            let n: u64 = text.as_str()[at + 7..]
                .split('"')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            let _ = tx.send((n, Instant::now()));
            taken += 1;
        }
    });
    let mut http = Http::connect(server.admin);
    let mut sent = Vec::new();
    let start = Instant::now();
    for n in 0..count {
        let due = start + Duration::from_millis(10 * n);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let body = format!(
            r#"{{"org_id":"quiet","type":"issue","data":{{"id":"q{}"}}}}"#,
            round * 1_000_000 + n
        );
        sent.push(Instant::now());
        let (status, _) = http.request("POST", "/v1/publish", Some(&server.token), body.as_bytes());
        assert_eq!(status, 202);
    }
    let _ = done_tx.send(Instant::now());
    reader.join().unwrap();
    let mut latencies: Vec<Duration> = rx
        .try_iter()
        .map(|(n, at)| at - sent[(n - round * 1_000_000) as usize])
        .collect();
    latencies.sort();
    (latencies, count)
}

fn scan_stall_phase(options: &Options, server: &Server, key: &str) {
    let retained = options.replay.max(100_000);
    fill_replay_org(options, server, retained);
    let quiet_key = create_key(options, "quiet");
    std::thread::sleep(Duration::from_millis(1500));
    let channels: Vec<String> = (0..256).map(|i| format!("events:n{i}")).collect();
    let path = format!(
        "/v1/poll?channels={}&after=0&limit=100&token={key}",
        channels.join(",")
    );
    let report = |label: &str, (latencies, sent): &(Vec<Duration>, u64), polls: Option<f64>| {
        println!(
            "{label}: quiet org's subscriber got {} of {sent} within 10 s of the last publish; p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms of those{}",
            latencies.len(),
            percentile(latencies, 0.50).as_secs_f64() * 1e3,
            percentile(latencies, 0.99).as_secs_f64() * 1e3,
            latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
            polls.map_or(String::new(), |p| format!("; {p:.1} polls/s answered"))
        );
    };
    println!(
        "scan stall: {retained} messages retained in one org, shards={}, {} polling clients with 256 channels matching nothing",
        options.shards, options.scan_stall
    );
    let alone = quiet_latencies(server, &quiet_key, options.seconds, 0);
    report("  alone", &alone, None);
    let stop = Arc::new(AtomicBool::new(false));
    let pollers: Vec<_> = (0..options.scan_stall)
        .map(|_| {
            let stop = stop.clone();
            let path = path.clone();
            let addr = server.ws;
            std::thread::spawn(move || {
                let mut http = Http::connect(addr);
                let mut polls = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let (status, _) = http.request("GET", &path, None, b"");
                    assert_eq!(status, 200);
                    polls += 1;
                }
                polls
            })
        })
        .collect();
    let started = Instant::now();
    let loaded = quiet_latencies(server, &quiet_key, options.seconds, 1);
    stop.store(true, Ordering::Relaxed);
    let polls: u64 = pollers.into_iter().map(|t| t.join().unwrap()).sum();
    report(
        "  while polled",
        &loaded,
        Some(polls as f64 / started.elapsed().as_secs_f64()),
    );
}

fn main() {
    let options = parse_options();
    assert!(
        Path::new(&options.binary).exists(),
        "build the server first: cargo build --release"
    );
    let (server, key) = start(&options);
    if options.seconds > 0 && options.publishers > 0 {
        publish_phase(&options, &server);
    }
    if options.scan_stall > 0 {
        scan_stall_phase(&options, &server, &key);
    } else if options.replay > 0 {
        replay_phase(&options, &server, &key);
    }
    drop(server);
    let _ = std::fs::remove_dir_all(&options.dir);
}
