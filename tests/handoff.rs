//! Hot upgrade over real sockets (docs/ARCHITECTURE.md, "Hot upgrade"):
//! the server runs from a copy of the binary in a temporary directory, the
//! copy is replaced while it serves, and `hookstream upgrade` hands every
//! live connection to the new file. Subscribers are raw WebSocket clients
//! from several loopback source addresses, driven by one epoll loop, so
//! thousands of them cost one thread.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// Source addresses the clients connect from (all answer on loopback).
const SOURCES: [[u8; 4]; 4] = [
    [127, 0, 0, 2],
    [127, 0, 0, 3],
    [127, 0, 0, 4],
    [127, 0, 0, 5],
];

/// Kills the process the pid file names when the test ends: after an
/// upgrade the server is no longer the test's child (PR_SET_PDEATHSIG does
/// not reach it).
struct Reaper {
    pid_file: PathBuf,
}

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Some(pid) = std::fs::read_to_string(&self.pid_file)
            .ok()
            .and_then(|t| t.trim().parse::<i32>().ok())
        {
            // SAFETY: kill(2) of the server process this test started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// A copy of the binary in its own directory, which a test may replace.
struct Installed {
    dir: TestDir,
}

impl Installed {
    fn new() -> Installed {
        let dir = TestDir::new();
        let installed = Installed { dir };
        std::fs::copy(binary(), installed.path()).expect("copy the binary");
        installed
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("hookstream")
    }

    /// Replaces the file at the path (a new inode, as a package manager
    /// does) with `content`'s bytes, or a script.
    fn replace_with(&self, source: &Path) {
        let temporary = self.dir.path().join("hookstream.new");
        std::fs::copy(source, &temporary).expect("copy the new binary");
        std::fs::rename(&temporary, self.path()).expect("install the new binary");
    }

    fn replace_with_script(&self, script: &str) {
        use std::os::unix::fs::PermissionsExt;
        let temporary = self.dir.path().join("hookstream.new");
        std::fs::write(&temporary, script).expect("write the script");
        std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&temporary, self.path()).expect("install the script");
    }
}

/// The inode of the file at `path`.
fn inode(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("stat").ino()
}

/// The inode of the executable of process `pid`.
fn exe_inode(pid: u32) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{pid}/exe"))
        .expect("stat /proc/PID/exe")
        .ino()
}

fn read_pid(data_dir: &Path) -> u32 {
    std::fs::read_to_string(data_dir.join("hookstream.pid"))
        .expect("read hookstream.pid")
        .trim()
        .parse()
        .expect("a pid")
}

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

/// A masked client frame.
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    client_fragment(true, opcode, payload)
}

/// A masked client frame, final or not.
fn client_fragment(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![if fin { 0x80 } else { 0 } | opcode];
    let mask = [0x11, 0x22, 0x33, 0x44];
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// The next complete server frame at the front of `buffer`: (opcode,
/// payload), removed from it.
fn next_frame(buffer: &mut Vec<u8>) -> Option<(u8, Vec<u8>)> {
    if buffer.len() < 2 {
        return None;
    }
    let opcode = buffer[0] & 0x0f;
    assert_eq!(buffer[1] & 0x80, 0, "server frames are not masked");
    let (len, header) = match buffer[1] & 0x7f {
        126 if buffer.len() >= 4 => (u16::from_be_bytes([buffer[2], buffer[3]]) as usize, 4),
        127 if buffer.len() >= 10 => (
            u64::from_be_bytes(buffer[2..10].try_into().unwrap()) as usize,
            10,
        ),
        126 | 127 => return None,
        n => (n as usize, 2),
    };
    if buffer.len() < header + len {
        return None;
    }
    let payload = buffer[header..header + len].to_vec();
    buffer.drain(..header + len);
    Some((opcode, payload))
}

/// Connects from `source` to `addr` (blocking, with timeouts), with this
/// receive buffer size when given (set before the connection, which also
/// turns the kernel's autotuning off).
fn connect_with_buffer(source: [u8; 4], addr: SocketAddr, rcvbuf: Option<i32>) -> TcpStream {
    // SAFETY: a fresh socket, bound and connected, then owned by the
    // TcpStream.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let stream = TcpStream::from_raw_fd(fd);
        let mut local: libc::sockaddr_in = std::mem::zeroed();
        local.sin_family = libc::AF_INET as u16;
        local.sin_addr.s_addr = u32::from_ne_bytes(source);
        let rc = libc::bind(
            fd,
            (&local as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        );
        assert_eq!(
            rc,
            0,
            "bind {source:?}: {}",
            std::io::Error::last_os_error()
        );
        if let Some(bytes) = rcvbuf {
            let rc = libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&bytes as *const i32).cast(),
                4,
            );
            assert_eq!(rc, 0);
        }
        let SocketAddr::V4(v4) = addr else {
            panic!("IPv4 listener expected")
        };
        let mut remote: libc::sockaddr_in = std::mem::zeroed();
        remote.sin_family = libc::AF_INET as u16;
        remote.sin_port = v4.port().to_be();
        remote.sin_addr.s_addr = u32::from_ne_bytes(v4.ip().octets());
        let rc = libc::connect(
            fd,
            (&remote as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        );
        assert_eq!(rc, 0, "connect: {}", std::io::Error::last_os_error());
        stream.set_read_timeout(Some(STEP_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(STEP_TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        stream
    }
}

/// One subscriber as the epoll loop sees it.
struct Subscriber {
    stream: TcpStream,
    buffer: Vec<u8>,
    /// The `n` of every event received, in order.
    received: Vec<u64>,
    /// Seqs received, to check they only grow.
    last_seq: u64,
    /// Anything the subscriber should never see (close, EOF, a second
    /// welcome, a bad frame).
    trouble: Vec<String>,
    /// Pings it sent (payloads) not answered yet.
    pings_out: Vec<Vec<u8>>,
    pongs: u64,
    server_pings: u64,
}

impl Subscriber {
    /// Upgrades, reads the welcome, subscribes to `events`.
    fn open(source: [u8; 4], addr: SocketAddr, key: &str) -> Subscriber {
        Subscriber::open_with(source, addr, key, None, "events")
    }

    fn open_with(
        source: [u8; 4],
        addr: SocketAddr,
        key: &str,
        rcvbuf: Option<i32>,
        channel: &str,
    ) -> Subscriber {
        let mut stream = connect_with_buffer(source, addr, rcvbuf);
        let request = format!(
            "GET /v1/ws?token={key} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).unwrap();
        let mut buffer = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            let n = stream.read(&mut chunk).expect("read the 101");
            assert!(n > 0, "EOF before the 101");
            buffer.extend_from_slice(&chunk[..n]);
        };
        assert!(
            buffer.starts_with(b"HTTP/1.1 101"),
            "{}",
            String::from_utf8_lossy(&buffer)
        );
        buffer.drain(..head_end);
        let mut subscriber = Subscriber {
            stream,
            buffer,
            received: Vec::new(),
            last_seq: 0,
            trouble: Vec::new(),
            pings_out: Vec::new(),
            pongs: 0,
            server_pings: 0,
        };
        let welcome = subscriber.next_text();
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        let subscribe = format!(r#"{{"type":"subscribe","channel":"{channel}"}}"#);
        subscriber
            .stream
            .write_all(&client_frame(1, subscribe.as_bytes()))
            .unwrap();
        let subscribed = subscriber.next_text();
        assert_eq!(subscribed["type"], "subscribed", "{subscribed}");
        subscriber.stream.set_nonblocking(true).unwrap();
        subscriber
    }

    /// Blocking: the next text message (setup only).
    fn next_text(&mut self) -> serde_json::Value {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some((opcode, payload)) = next_frame(&mut self.buffer) {
                if opcode == 1 {
                    return serde_json::from_slice(&payload).expect("JSON");
                }
                continue;
            }
            let n = self.stream.read(&mut chunk).expect("read a message");
            assert!(n > 0, "EOF during setup");
            self.buffer.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads what is there and handles every complete frame.
    fn on_readable(&mut self) {
        let mut chunk = [0u8; 16384];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    self.trouble.push("EOF".to_string());
                    return;
                }
                Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    self.trouble.push(format!("read: {e}"));
                    return;
                }
            }
        }
        while let Some((opcode, payload)) = next_frame(&mut self.buffer) {
            match opcode {
                1 => {
                    let value: serde_json::Value = match serde_json::from_slice(&payload) {
                        Ok(value) => value,
                        Err(e) => {
                            self.trouble.push(format!("bad JSON: {e}"));
                            continue;
                        }
                    };
                    match value["type"].as_str() {
                        Some("event") => {
                            let seq = value["seq"].as_u64().unwrap_or(0);
                            if seq <= self.last_seq {
                                self.trouble
                                    .push(format!("seq {seq} after {}", self.last_seq));
                            }
                            self.last_seq = seq;
                            let id = value["data"]["id"].as_str().unwrap_or("");
                            let n = id.strip_prefix("e_").and_then(|n| n.parse().ok());
                            self.received.push(n.unwrap_or(u64::MAX));
                        }
                        _ => self.trouble.push(format!("unexpected message {value}")),
                    }
                }
                8 => self.trouble.push(format!("close frame {payload:?}")),
                9 => {
                    self.server_pings += 1;
                    let pong = client_frame(10, &payload);
                    let _ = self.stream.write_all(&pong);
                }
                10 => {
                    if let Some(at) = self.pings_out.iter().position(|p| *p == payload) {
                        self.pings_out.remove(at);
                        self.pongs += 1;
                    } else {
                        self.trouble.push(format!("unasked pong {payload:?}"));
                    }
                }
                other => self.trouble.push(format!("opcode {other}")),
            }
        }
    }

    fn ping(&mut self, payload: Vec<u8>) {
        let frame = client_frame(9, &payload);
        self.pings_out.push(payload);
        // A few bytes to an idle socket: taken at once.
        let _ = self.stream.write_all(&frame);
    }
}

/// Every subscriber in one epoll loop on its own thread; also sends a
/// ping on one subscriber after another every few milliseconds.
struct Fleet {
    /// Events received by all subscribers together.
    events: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<Subscriber>>>,
    pings_sent: Arc<AtomicU64>,
}

impl Fleet {
    fn start(subscribers: Vec<Subscriber>) -> Fleet {
        let stop = Arc::new(AtomicBool::new(false));
        let pings_sent = Arc::new(AtomicU64::new(0));
        let events = Arc::new(AtomicU64::new(0));
        let thread = {
            let stop = stop.clone();
            let pings_sent = pings_sent.clone();
            let events = events.clone();
            std::thread::spawn(move || run_fleet(subscribers, &stop, &pings_sent, &events))
        };
        Fleet {
            events,
            stop,
            thread: Some(thread),
            pings_sent,
        }
    }

    /// Waits (up to 30 s) until the subscribers received `total` events
    /// together; returns how long that took.
    fn wait_for(&self, total: u64) -> Duration {
        let start = Instant::now();
        while self.events.load(Ordering::SeqCst) < total
            && start.elapsed() < Duration::from_secs(30)
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        start.elapsed()
    }

    fn finish(mut self) -> Vec<Subscriber> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().expect("fleet thread")
    }
}

fn run_fleet(
    mut subscribers: Vec<Subscriber>,
    stop: &AtomicBool,
    pings: &AtomicU64,
    events_received: &AtomicU64,
) -> Vec<Subscriber> {
    // SAFETY: an epoll set owned by this function, closed at its end.
    let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    assert!(epoll >= 0);
    for (i, s) in subscribers.iter().enumerate() {
        let mut event = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: i as u64,
        };
        // SAFETY: registering a socket we own.
        let rc = unsafe {
            libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, s.stream.as_raw_fd(), &mut event)
        };
        assert_eq!(rc, 0);
    }
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut next_ping = Instant::now();
    let mut ping_target = 0usize;
    let mut ping_counter = 0u64;
    while !stop.load(Ordering::SeqCst) {
        // SAFETY: epoll_wait into our buffer.
        let ready = unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), events.len() as i32, 5) };
        for event in &events[..ready.max(0) as usize] {
            let i = event.u64 as usize;
            let before = subscribers[i].received.len();
            subscribers[i].on_readable();
            events_received.fetch_add(
                (subscribers[i].received.len() - before) as u64,
                Ordering::SeqCst,
            );
            if !subscribers[i].trouble.is_empty() {
                // Stop watching a broken socket (its EOF stays readable).
                let mut none = libc::epoll_event { events: 0, u64: 0 };
                // SAFETY: as above.
                unsafe {
                    libc::epoll_ctl(
                        epoll,
                        libc::EPOLL_CTL_DEL,
                        subscribers[i].stream.as_raw_fd(),
                        &mut none,
                    )
                };
            }
        }
        if Instant::now() >= next_ping {
            next_ping += Duration::from_millis(10);
            ping_counter += 1;
            subscribers[ping_target].ping(ping_counter.to_be_bytes().to_vec());
            pings.fetch_add(1, Ordering::Relaxed);
            ping_target = (ping_target + 97) % subscribers.len();
        }
    }
    // Last answers in flight.
    let deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline {
        // SAFETY: as above.
        let ready =
            unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), events.len() as i32, 20) };
        for event in &events[..ready.max(0) as usize] {
            subscribers[event.u64 as usize].on_readable();
        }
    }
    // SAFETY: our epoll descriptor.
    unsafe { libc::close(epoll) };
    subscribers
}

/// Publishes `e_0`, `e_1`, … at `per_sec` messages a second, ten
/// requests a second (each on a fresh connection, `Connection: close`)
/// until stopped; returns how many messages, with every answer that was
/// not 202. (A debug server walks thousands of subscribers slowly: one
/// message per request would not reach the rate.)
fn publisher(
    admin: SocketAddr,
    token: String,
    per_sec: u64,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(u64, Vec<String>)> {
    publisher_counting(admin, token, per_sec, stop, Arc::new(AtomicU64::new(0)))
}

/// [`publisher`] to `running` at 50 msg/s: its stop flag and its thread.
fn publish_50_per_sec(
    running: &Running,
) -> (Arc<AtomicBool>, std::thread::JoinHandle<(u64, Vec<String>)>) {
    let stop = Arc::new(AtomicBool::new(false));
    let publishing = publisher(
        running.spawned.admin_addr,
        running.token.clone(),
        50,
        stop.clone(),
    );
    (stop, publishing)
}

/// [`publisher`], counting in `started` the messages whose request was
/// sent.
fn publisher_counting(
    admin: SocketAddr,
    token: String,
    per_sec: u64,
    stop: Arc<AtomicBool>,
    started: Arc<AtomicU64>,
) -> std::thread::JoinHandle<(u64, Vec<String>)> {
    std::thread::spawn(move || {
        let batch = (per_sec / 10).max(1);
        let mut n = 0u64;
        let mut failures = Vec::new();
        let start = Instant::now();
        let mut slowest = Duration::ZERO;
        while !stop.load(Ordering::SeqCst) {
            let messages: Vec<String> = (n..n + batch)
                .map(|i| event("org_a", &format!("e_{i}"), "src"))
                .collect();
            let body = array(&messages);
            let sent = Instant::now();
            started.store(n + batch, Ordering::SeqCst);
            let (status, answer) = post_publish(admin, &token, &body);
            slowest = slowest.max(sent.elapsed());
            if status != 202 {
                failures.push(format!("e_{n}..: {status} {answer}"));
            }
            n += batch;
            let due = start + Duration::from_micros(n * 1_000_000 / per_sec);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
        eprintln!(
            "published {n} in {:?}, slowest answer {slowest:?}",
            start.elapsed()
        );
        (n, failures)
    })
}

/// One publish on a fresh connection (`Connection: close`), read with
/// blocking reads to the end of the answer: (status, answer text), status
/// 0 when the connection ended without an answer.
fn post_publish(admin: SocketAddr, token: &str, body: &str) -> (u16, String) {
    let mut stream = match TcpStream::connect_timeout(&admin, STEP_TIMEOUT) {
        Ok(stream) => stream,
        Err(e) => return (0, format!("connect: {e}")),
    };
    stream.set_read_timeout(Some(STEP_TIMEOUT)).unwrap();
    let _ = stream.set_nodelay(true);
    let request = format!(
        "POST /v1/publish HTTP/1.1\r\nHost: {admin}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    if let Err(e) = stream.write_all(request.as_bytes()) {
        return (0, format!("write: {e}"));
    }
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&answer[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if answer.len() >= end + 4 + length {
                break;
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
            Err(e) => return (0, format!("read: {e}")),
        }
    }
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// Runs `hookstream upgrade` (the current test binary, not the installed
/// one) for `data_dir`; returns (success, stderr).
/// Waits (up to 15 s) for the old process, the one the test started, to
/// exit after an upgrade; its exit status.
fn wait_for_old_exit(running: &mut Running) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = running.spawned.child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "the old process did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn run_upgrade(data_dir: &Path) -> (bool, String) {
    let output = hookstream_command()
        .args(["upgrade", "--timeout-secs", "60", "--data-dir"])
        .arg(data_dir)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run hookstream upgrade");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

struct Running {
    spawned: Spawned,
    _reaper: Reaper,
    data: TestDir,
    key: String,
    token: String,
}

fn start(installed: &Installed, shards: usize) -> Running {
    start_with(installed, shards, &[])
}

fn start_with(installed: &Installed, shards: usize, extra: &[&str]) -> Running {
    let data = TestDir::new();
    let key = create_key(data.path(), "org_a");
    let args: Vec<String> = [
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--shards",
        &shards.to_string(),
        "--upgrades-per-ip-per-sec",
        "0",
        // Pings from the server during the test, but none missed while
        // thousands of subscribers are still being opened one by one.
        "--heartbeat-ms",
        "10000",
        "--durability",
        "none",
    ]
    .iter()
    .chain(extra)
    .map(|s| s.to_string())
    .collect();
    let command = serve_command_at(&installed.path(), data.path(), &args);
    let spawned = spawn_command(command, Duration::from_secs(30)).expect("server starts");
    let token = std::fs::read_to_string(data.path().join("admin-token"))
        .unwrap()
        .trim()
        .to_string();
    let reaper = Reaper {
        pid_file: data.path().join("hookstream.pid"),
    };
    Running {
        spawned,
        _reaper: reaper,
        data,
        key,
        token,
    }
}

fn open_fleet(running: &Running, count: usize) -> Vec<Subscriber> {
    (0..count)
        .map(|i| {
            Subscriber::open(
                SOURCES[i % SOURCES.len()],
                running.spawned.ws_addr,
                &running.key,
            )
        })
        .collect()
}

fn subscribers_count() -> usize {
    std::env::var("HOOKSTREAM_HANDOFF_CONNECTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

/// Stops `publishing` and returns how many messages it published; each
/// must have been answered 202.
fn stop_publishing(
    stop: &AtomicBool,
    publishing: std::thread::JoinHandle<(u64, Vec<String>)>,
    context: &str,
) -> u64 {
    stop.store(true, Ordering::SeqCst);
    let (published, failures) = publishing.join().unwrap();
    assert!(
        failures.is_empty(),
        "{context}: publishes not answered 202: {failures:?}"
    );
    published
}

/// Waits until each of `count` subscribers had all `published` messages,
/// stops the fleet and checks it ([`check_fleet`]) and that every ping was
/// answered; returns how long the last messages took to arrive.
fn finish_fleet(fleet: Fleet, published: u64, count: u64, context: &str) -> Duration {
    let caught_up = fleet.wait_for(published * count);
    let pings = fleet.pings_sent.clone();
    let subscribers = fleet.finish();
    let pongs = check_fleet(&subscribers, published);
    assert_eq!(
        pongs,
        pings.load(Ordering::SeqCst),
        "{context}: every ping answered"
    );
    caught_up
}

/// Checks every subscriber got `e_0 … e_{n-1}`, each once, in order, and
/// nothing it should not have; returns the pongs counted.
fn check_fleet(subscribers: &[Subscriber], published: u64) -> u64 {
    let short: Vec<(usize, usize, usize, u64)> = subscribers
        .iter()
        .enumerate()
        .filter(|(_, s)| s.received.len() as u64 != published)
        .map(|(i, s)| (i, s.received.len(), s.pings_out.len(), s.server_pings))
        .collect();
    if !short.is_empty() {
        eprintln!(
            "{} subscriber(s) short (index, received, unanswered pings, server pings): {:?}",
            short.len(),
            &short[..short.len().min(40)]
        );
    }
    let mut pongs = 0;
    for (i, s) in subscribers.iter().enumerate() {
        assert!(s.trouble.is_empty(), "subscriber {i}: {:?}", s.trouble);
        let expected: Vec<u64> = (0..published).collect();
        if s.received != expected {
            let missing: Vec<u64> = expected
                .iter()
                .copied()
                .filter(|n| !s.received.contains(n))
                .collect();
            let mut counts: HashMap<u64, usize> = HashMap::new();
            for n in &s.received {
                *counts.entry(*n).or_default() += 1;
            }
            let twice: Vec<u64> = counts
                .iter()
                .filter(|(_, c)| **c > 1)
                .map(|(n, _)| *n)
                .collect();
            panic!(
                "subscriber {i}: {} of {published} messages; missing {missing:?}, repeated {twice:?}",
                s.received.len()
            );
        }
        assert!(
            s.pings_out.is_empty(),
            "subscriber {i}: unanswered pings {:?}",
            s.pings_out
        );
        pongs += s.pongs;
    }
    pongs
}

#[test]
fn an_upgrade_hands_every_connection_to_the_new_binary_and_no_client_notices() {
    let installed = Installed::new();
    let mut running = start(&installed, 2);
    let old_pid = running.spawned.child.id();
    assert_eq!(read_pid(running.data.path()), old_pid);
    let count = subscribers_count();
    let opening = Instant::now();
    let subscribers = open_fleet(&running, count);
    eprintln!("{count} subscribers opened in {:?}", opening.elapsed());
    let fleet = Fleet::start(subscribers);

    let stop = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicU64::new(0));
    let publishing = publisher_counting(
        running.spawned.admin_addr,
        running.token.clone(),
        50,
        stop.clone(),
        started.clone(),
    );
    std::thread::sleep(Duration::from_millis(1500));

    // A new build lands at the server's path; the deploy step runs.
    installed.replace_with(Path::new(binary()));
    let new_inode = inode(&installed.path());
    let upgrading = Instant::now();
    let before = started.load(Ordering::SeqCst);
    let (ok, stderr) = run_upgrade(running.data.path());
    let after = started.load(Ordering::SeqCst);
    eprintln!(
        "hookstream upgrade took {:?}; {} messages published meanwhile",
        upgrading.elapsed(),
        after - before
    );
    assert!(
        ok,
        "hookstream upgrade failed: {stderr}\nserver:\n{}",
        running.spawned.stderr.lock().unwrap().join("\n")
    );

    let new_pid = read_pid(running.data.path());
    assert_ne!(new_pid, old_pid);
    assert_eq!(
        exe_inode(new_pid),
        new_inode,
        "the new process runs the new file"
    );
    // The old process exits by itself.
    let status = wait_for_old_exit(&mut running);
    eprintln!(
        "the old process exited {:?} after the upgrade began",
        upgrading.elapsed()
    );
    assert!(status.success(), "old process: {status}");
    assert!(alive(new_pid));

    // Publishing goes on against the new process (50 messages more), then
    // stops.
    let deadline = Instant::now() + Duration::from_secs(30);
    while started.load(Ordering::SeqCst) < after + 50 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let published = stop_publishing(&stop, publishing, "upgrade");
    let caught_up = finish_fleet(fleet, published, count as u64, "upgrade");
    eprintln!("the last messages arrived {caught_up:?} after the last publish was answered");
    assert!(
        after > before,
        "no publish was sent while the upgrade ran ({before} before, {after} after)"
    );
    assert!(published >= after + 50, "published {published}");
    let lines = running.spawned.stderr.lock().unwrap().join("\n");
    assert!(
        lines.contains(&format!("took over {count} connection(s)")),
        "{lines}"
    );
}

#[test]
fn a_new_binary_that_fails_changes_nothing_for_the_clients() {
    let installed = Installed::new();
    let running = start(&installed, 2);
    let old_pid = running.spawned.child.id();
    let subscribers = open_fleet(&running, 200);
    let fleet = Fleet::start(subscribers);
    let (stop, publishing) = publish_50_per_sec(&running);
    std::thread::sleep(Duration::from_millis(500));

    // A "binary" that exits at once.
    installed.replace_with_script("#!/bin/sh\nexit 1\n");
    let (ok, stderr) = run_upgrade(running.data.path());
    assert!(!ok, "upgrade to a failing binary succeeded");
    assert!(
        stderr.contains("the new binary exited (exit status: 1) before it answered"),
        "{stderr}"
    );
    assert_eq!(read_pid(running.data.path()), old_pid);

    // One that never answers: the old process gives up after its bound.
    installed.replace_with_script("#!/bin/sh\nexec sleep 1000\n");
    let (ok, stderr) = run_upgrade(running.data.path());
    assert!(!ok, "upgrade to a silent binary succeeded");
    assert!(stderr.contains("did not answer within 10 s"), "{stderr}");
    assert_eq!(read_pid(running.data.path()), old_pid);

    std::thread::sleep(Duration::from_millis(500));
    let published = stop_publishing(&stop, publishing, "failing binaries");
    finish_fleet(fleet, published, 200, "failing binaries");
    let lines = running.spawned.stderr.lock().unwrap().join("\n");
    assert_eq!(
        lines
            .matches("upgrade failed, this process serves on")
            .count(),
        2,
        "{lines}"
    );
}

/// Reads from a blocking subscriber until `want` events arrived (or a
/// deadline); returns the events' `n` and anything else it saw.
fn read_events(
    s: &mut Subscriber,
    want: usize,
    timeout: Duration,
) -> (Vec<u64>, Vec<serde_json::Value>) {
    s.stream.set_nonblocking(false).unwrap();
    s.stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let deadline = Instant::now() + timeout;
    let mut events = Vec::new();
    let mut others = Vec::new();
    let mut chunk = vec![0u8; 65536];
    while events.len() < want && Instant::now() < deadline {
        while let Some((opcode, payload)) = next_frame(&mut s.buffer) {
            match opcode {
                1 => {
                    let value: serde_json::Value = serde_json::from_slice(&payload).unwrap();
                    if value["type"] == "event" {
                        let id = value["data"]["id"].as_str().unwrap().to_string();
                        events.push(id.strip_prefix("e_").unwrap().parse().unwrap());
                    } else {
                        others.push(value);
                    }
                }
                9 => s.stream.write_all(&client_frame(10, &payload)).unwrap(),
                other => others.push(serde_json::json!({ "opcode": other })),
            }
        }
        match s.stream.read(&mut chunk) {
            Ok(0) => {
                others.push(serde_json::json!("EOF"));
                break;
            }
            Ok(n) => s.buffer.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("read: {e}"),
        }
    }
    (events, others)
}

#[test]
fn half_received_input_and_unsent_output_cross_the_upgrade() {
    let installed = Installed::new();
    // A queue far above what the kernel buffers, so a reader that stops
    // leaves megabytes in the server's send queue.
    let running = start_with(&installed, 1, &["--send-queue-bytes", "67108864"]);
    let addr = running.spawned.ws_addr;

    // A: a subscribe split into two fragments, the second cut short.
    let mut a = Subscriber::open(SOURCES[0], addr, &running.key);
    a.stream.set_nonblocking(false).unwrap();
    let first = client_fragment(false, 1, br#"{"type":"subscribe","#);
    let second = client_fragment(true, 0, br#""channel":"issues"}"#);
    a.stream.write_all(&first).unwrap();
    a.stream.write_all(&second[..5]).unwrap();

    // B: subscribed to events with a 4 KiB receive buffer, and stops
    // reading.
    let mut b = Subscriber::open_with(SOURCES[1], addr, &running.key, Some(4096), "events");
    let pad = "x".repeat(64 * 1024);
    let count = 128u64;
    for n in 0..count {
        let body = format!(
            r#"{{"org_id":"org_a","type":"event","data":{{"id":"e_{n}","source_id":"s","pad":"{pad}"}}}}"#
        );
        let (status, answer) = post_publish(running.spawned.admin_addr, &running.token, &body);
        assert_eq!(status, 202, "{answer}");
    }
    // 8 MiB published: more than B's socket buffers can hold (the
    // kernel's send buffer stops at net.ipv4.tcp_wmem's 4 MiB), so the
    // rest waits in the server's send queue.
    std::thread::sleep(Duration::from_millis(300));

    installed.replace_with(Path::new(binary()));
    let (ok, stderr) = run_upgrade(running.data.path());
    assert!(ok, "upgrade failed: {stderr}");

    // A finishes its message: the new process completes the assembly.
    a.stream.write_all(&second[5..]).unwrap();
    let (a_events, a_others) = read_events(&mut a, count as usize, Duration::from_secs(30));
    assert_eq!(a_events, (0..count).collect::<Vec<_>>());
    assert_eq!(
        a_others,
        vec![serde_json::json!({"type":"subscribed","channel":"issues"})],
        "A saw something else"
    );
    // B reads everything, in order, once.
    let (b_events, b_others) = read_events(&mut b, count as usize, Duration::from_secs(60));
    assert!(b_others.is_empty(), "B saw {b_others:?}");
    assert_eq!(b_events, (0..count).collect::<Vec<_>>());
}

#[test]
fn the_pid_file_names_the_serving_process_and_goes_with_it() {
    let installed = Installed::new();
    let mut running = start(&installed, 1);
    let pid = running.spawned.child.id();
    assert_eq!(read_pid(running.data.path()), pid);
    // SAFETY: SIGTERM to the server this test started.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let status = running.spawned.child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(
        !running.data.path().join("hookstream.pid").exists(),
        "a clean exit removes the pid file"
    );
    let (ok, stderr) = run_upgrade(running.data.path());
    assert!(!ok);
    assert!(stderr.contains("does not name a process"), "{stderr}");

    // A stale pid file naming some other live process: no signal reaches
    // it, the command says no server runs.
    let mut bystander = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    std::fs::write(
        running.data.path().join("hookstream.pid"),
        format!("{}\n", bystander.id()),
    )
    .unwrap();
    let (ok, stderr) = run_upgrade(running.data.path());
    assert!(!ok);
    assert!(stderr.contains("no server runs"), "{stderr}");
    assert!(
        bystander.try_wait().unwrap().is_none(),
        "the bystander was signalled"
    );
    let _ = bystander.kill();
    let _ = bystander.wait();
}

/// 200 subscribers of `running` and a publisher at 50 msg/s, then the
/// real binary installed anew and `hookstream upgrade` run: the fleet, the
/// publisher's stop flag and thread, and the command's outcome.
fn upgrade_under_load(installed: &Installed, running: &Running) -> UnderLoad {
    let fleet = Fleet::start(open_fleet(running, 200));
    let (stop, publishing) = publish_50_per_sec(running);
    std::thread::sleep(Duration::from_millis(500));
    installed.replace_with(Path::new(binary()));
    let (ok, stderr) = run_upgrade(running.data.path());
    UnderLoad {
        fleet,
        stop,
        publishing,
        ok,
        stderr,
    }
}

/// What [`upgrade_under_load`] leaves running, and the command's outcome.
struct UnderLoad {
    fleet: Fleet,
    stop: Arc<AtomicBool>,
    publishing: std::thread::JoinHandle<(u64, Vec<String>)>,
    ok: bool,
    stderr: String,
}

/// Starts a server whose next upgrade's new process plays `fault` (debug
/// builds: `HOOKSTREAM_DEBUG_HANDOFF`).
fn start_with_fault(installed: &Installed, fault: &str) -> Running {
    start_with_env(installed, &[("HOOKSTREAM_DEBUG_HANDOFF", fault)])
}

/// Starts a 2-shard server with extra environment variables.
fn start_with_env(installed: &Installed, env: &[(&str, &str)]) -> Running {
    let data = TestDir::new();
    let key = create_key(data.path(), "org_a");
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--shards",
        "2",
        "--upgrades-per-ip-per-sec",
        "0",
        "--heartbeat-ms",
        "10000",
        "--durability",
        "none",
    ];
    let mut command = serve_command_at(&installed.path(), data.path(), &args);
    command.envs(env.iter().copied());
    let spawned = spawn_command(command, Duration::from_secs(30)).expect("server starts");
    let token = std::fs::read_to_string(data.path().join("admin-token"))
        .unwrap()
        .trim()
        .to_string();
    let reaper = Reaper {
        pid_file: data.path().join("hookstream.pid"),
    };
    Running {
        spawned,
        _reaper: reaper,
        data,
        key,
        token,
    }
}

#[test]
fn a_new_binary_that_cannot_read_the_state_or_dies_holding_the_sockets_changes_nothing() {
    for (fault, reason) in [
        (
            "reads-9",
            "the new binary reads state versions [9], this process writes versions [2, 1]",
        ),
        (
            "exit-after-state",
            "the new binary exited (exit status: 3) before it read the state",
        ),
        // Once it holds every socket passed ahead of the freeze, each in its
        // shards' epoll sets, before the old process froze anything.
        (
            "exit-after-early",
            "the new binary exited (exit status: 6) before it registered the connections",
        ),
    ] {
        let installed = Installed::new();
        let running = start_with_fault(&installed, fault);
        let old_pid = running.spawned.child.id();
        let UnderLoad {
            fleet,
            stop,
            publishing,
            ok,
            stderr,
        } = upgrade_under_load(&installed, &running);
        assert!(!ok, "{fault}: the upgrade succeeded");
        assert!(stderr.contains(reason), "{fault}: {stderr}");
        assert_eq!(read_pid(running.data.path()), old_pid);
        std::thread::sleep(Duration::from_millis(500));
        let published = stop_publishing(&stop, publishing, fault);
        finish_fleet(fleet, published, 200, fault);
        let lines = running.spawned.stderr.lock().unwrap().join("\n");
        assert_eq!(
            lines
                .matches("upgrade failed, this process serves on")
                .count(),
            1,
            "{fault}: {lines}"
        );
    }
}

/// Reads text messages until one of type `kind` (blocking, bounded).
fn next_of_type(s: &mut Subscriber, kind: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let message = s.next_text();
        if message["type"] == kind {
            return message;
        }
        assert!(Instant::now() < deadline, "no {kind} message");
    }
}

/// Between the early pass (every socket already in the new process) and
/// the freeze, the old process serves on: a connection that closes there
/// sees its close answered and the connection end at once (not when the
/// new process lets go of its copy of the socket), one that changes its
/// subscriptions keeps exactly the new ones, and one that arrives there is
/// carried over with the others (debug-build fault injection: the new
/// process waits 1.5 s before it says the early connections are
/// registered).
#[test]
fn connections_that_close_change_or_arrive_after_the_early_pass_are_carried_right() {
    let installed = Installed::new();
    let mut running = start_with_env(
        &installed,
        &[
            ("HOOKSTREAM_DEBUG_HANDOFF", "slow-early"),
            ("HOOKSTREAM_UPGRADE_TRACE", "1"),
        ],
    );
    let addr = running.spawned.ws_addr;
    let fleet = Fleet::start(open_fleet(&running, 100));
    let mut leaving = Subscriber::open_with([127, 0, 3, 1], addr, &running.key, None, "issues");
    let mut moving =
        Subscriber::open_with([127, 0, 3, 2], addr, &running.key, None, "deliveries:d_old");
    let (stop, publishing) = publish_50_per_sec(&running);
    std::thread::sleep(Duration::from_millis(300));
    installed.replace_with(Path::new(binary()));
    let data = running.data.path().to_path_buf();
    let upgrading = std::thread::spawn(move || run_upgrade(&data));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !running
        .spawned
        .stderr
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("sockets passed ahead of the freeze"))
    {
        assert!(Instant::now() < deadline, "no early pass");
        std::thread::sleep(Duration::from_millis(5));
    }
    let window = Instant::now();

    // Closes: its close is answered and the connection ends while the
    // new process still holds a copy of the socket.
    leaving.stream.set_nonblocking(false).unwrap();
    leaving
        .stream
        .write_all(&client_frame(8, &1000u16.to_be_bytes()))
        .unwrap();
    let mut chunk = [0u8; 4096];
    loop {
        match leaving.stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => leaving.buffer.extend_from_slice(&chunk[..n]),
            Err(e) => panic!("the closing connection did not end: {e}"),
        }
    }
    let ended_after = window.elapsed();
    assert!(
        !upgrading.is_finished(),
        "the upgrade ended before the check"
    );
    assert!(
        ended_after < Duration::from_millis(1000),
        "the connection ended {ended_after:?} after the early pass"
    );
    assert_eq!(next_frame(&mut leaving.buffer).map(|f| f.0), Some(8));

    // Changes its subscriptions.
    moving.stream.set_nonblocking(false).unwrap();
    for message in [
        r#"{"type":"unsubscribe","channel":"deliveries:d_old"}"#,
        r#"{"type":"subscribe","channel":"deliveries:d_new"}"#,
    ] {
        moving
            .stream
            .write_all(&client_frame(1, message.as_bytes()))
            .unwrap();
    }
    next_of_type(&mut moving, "subscribed");

    // Arrives.
    let mut joining = Subscriber::open_with([127, 0, 3, 3], addr, &running.key, None, "events");

    let (ok, stderr) = upgrading.join().unwrap();
    assert!(
        ok,
        "hookstream upgrade failed: {stderr}\nserver:\n{}",
        running.spawned.stderr.lock().unwrap().join("\n")
    );
    wait_for_old_exit(&mut running);

    // The new process serves each as it was at the freeze.
    for (destination, id) in [("d_old", "x_old"), ("d_new", "x_new")] {
        let body = array(&[delivery("org_a", id, destination)]);
        let (status, answer) = post_publish(running.spawned.admin_addr, &running.token, &body);
        assert_eq!(status, 202, "{answer}");
    }
    let first = next_of_type(&mut moving, "delivery");
    assert_eq!(first["data"]["id"], "x_new", "{first}");
    let (events, others) = read_events(&mut joining, 3, Duration::from_secs(10));
    assert!(events.len() >= 3, "{events:?} {others:?}");
    assert!(others.is_empty(), "{others:?}");

    std::thread::sleep(Duration::from_millis(300));
    let published = stop_publishing(&stop, publishing, "early window");
    finish_fleet(fleet, published, 100, "early window");
    let lines = running.spawned.stderr.lock().unwrap().join("\n");
    assert!(lines.contains("took over 102 connection(s)"), "{lines}");
}

/// A new binary that reads only the previous state version (1: every
/// socket and record at the freeze, no early pass) is written that version
/// and takes over like any other; this binary reads it (debug-build fault
/// injection: its HELLO says it reads version 1 only).
#[test]
fn the_previous_state_version_is_written_and_read() {
    let installed = Installed::new();
    let mut running = start_with_env(
        &installed,
        &[
            ("HOOKSTREAM_DEBUG_HANDOFF", "reads-1"),
            ("HOOKSTREAM_UPGRADE_TRACE", "1"),
        ],
    );
    let old_pid = running.spawned.child.id();
    let UnderLoad {
        fleet,
        stop,
        publishing,
        ok,
        stderr,
    } = upgrade_under_load(&installed, &running);
    assert!(
        ok,
        "hookstream upgrade failed: {stderr}\nserver:\n{}",
        running.spawned.stderr.lock().unwrap().join("\n")
    );
    let new_pid = read_pid(running.data.path());
    assert_ne!(new_pid, old_pid);
    wait_for_old_exit(&mut running);
    std::thread::sleep(Duration::from_millis(500));
    let published = stop_publishing(&stop, publishing, "version 1");
    finish_fleet(fleet, published, 200, "version 1");
    let lines = running.spawned.stderr.lock().unwrap().join("\n");
    assert!(lines.contains("took over 200 connection(s)"), "{lines}");
    // Traced: it froze, and passed nothing ahead of the freeze.
    assert!(lines.contains("old: freezing"), "{lines}");
    assert!(!lines.contains("passed ahead of the freeze"), "{lines}");
}

/// The processes whose parent is `pid` (from /proc/*/stat).
fn children_of(pid: u32) -> Vec<u32> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": the comm may hold spaces.
        let after = &stat[stat.rfind(')').map_or(0, |i| i + 1)..];
        let parent = after.split_whitespace().nth(1).and_then(|p| p.parse().ok());
        if parent == Some(pid) {
            children.push(child);
        }
    }
    children
}

/// The processes (other than `hookstream upgrade`) whose command line
/// names `data_dir`.
fn processes_serving(data_dir: &Path) -> Vec<u32> {
    let needle = data_dir.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.iter().any(|a| a == "serve") && args.contains(&needle) {
            found.push(pid);
        }
    }
    found
}

/// The commit point: a new process that confirmed the handoff (READY) and
/// then dies, or dies or goes silent once its shards opened the log and
/// registered every connection (nothing served yet), is stopped, and the
/// old process takes the log back and serves on — one line in its log,
/// `hookstream upgrade` fails naming the reason, no client notices (every
/// message once and in order, no close, every ping answered, every publish
/// 202, also those the old process committed while handing over). One
/// behind a wrapper that does not exec, slow to get ready, outlives the
/// wrapper the old process stops and exits without serving. A real
/// upgrade afterwards hands everything over as usual.
#[test]
fn a_new_binary_that_dies_or_goes_silent_before_it_serves_changes_nothing() {
    let installed = Installed::new();
    // The old process gives a silent new one 8 s (debug builds): time
    // enough for a debug build to get ready on a loaded machine.
    let mut running = start_with_env(&installed, &[("HOOKSTREAM_DEBUG_HANDOFF_WAIT_MS", "8000")]);
    let old_pid = running.spawned.child.id();
    let count = 200;
    let fleet = Fleet::start(open_fleet(&running, count));
    let (stop, publishing) = publish_50_per_sec(&running);
    std::thread::sleep(Duration::from_millis(500));
    for (fault, reason) in [
        (
            "exit-after-ready",
            "the new binary exited (exit status: 4) before it was ready to serve",
        ),
        (
            "exit-when-prepared",
            "the new binary exited (exit status: 5) before it was ready to serve",
        ),
        (
            "hang-when-prepared",
            "the new binary did not get ready to serve within 8 s",
        ),
    ] {
        // The real binary, asked to fail at that step.
        installed.replace_with_script(&format!(
            "#!/bin/sh\nHOOKSTREAM_DEBUG_HANDOFF={fault} exec '{}' \"$@\"\n",
            binary()
        ));
        let (ok, stderr) = run_upgrade(running.data.path());
        assert!(!ok, "{fault}: the upgrade succeeded");
        assert!(stderr.contains(reason), "{fault}: {stderr}");
        assert_eq!(read_pid(running.data.path()), old_pid, "{fault}");
        assert!(alive(old_pid), "{fault}");
        assert_eq!(
            children_of(old_pid),
            Vec::<u32>::new(),
            "{fault}: the new process was not stopped"
        );
        // Served on: messages keep arriving between the attempts.
        std::thread::sleep(Duration::from_millis(500));
    }

    // Behind a wrapper that does not exec, a new process that is slow to
    // get ready outlives the wrapper the old process stops, and then finds
    // the handoff ended: it exits without serving anything.
    installed.replace_with_script(&format!(
        "#!/bin/sh\nHOOKSTREAM_DEBUG_HANDOFF=slow-when-prepared '{}' \"$@\"\n",
        binary()
    ));
    let (ok, stderr) = run_upgrade(running.data.path());
    assert!(!ok, "slow behind a wrapper: the upgrade succeeded");
    assert!(
        stderr.contains("the new binary did not get ready to serve within 8 s"),
        "{stderr}"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let others: Vec<u32> = processes_serving(running.data.path())
            .into_iter()
            .filter(|pid| *pid != old_pid)
            .collect();
        if others.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the orphaned new process {others:?} is still there"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(read_pid(running.data.path()), old_pid);

    // Now a real upgrade.
    installed.replace_with(Path::new(binary()));
    let (ok, stderr) = run_upgrade(running.data.path());
    assert!(ok, "the upgrade after the failures failed: {stderr}");
    let new_pid = read_pid(running.data.path());
    assert_ne!(new_pid, old_pid);
    wait_for_old_exit(&mut running);
    std::thread::sleep(Duration::from_millis(500));
    let published = stop_publishing(&stop, publishing, "dies before serving");
    finish_fleet(fleet, published, count as u64, "dies before serving");
    let lines = running.spawned.stderr.lock().unwrap().join("\n");
    assert_eq!(
        lines
            .matches("upgrade failed, this process serves on")
            .count(),
        4,
        "{lines}"
    );
}

/// SSE streams and waiting long-polls are not handed over: at an upgrade
/// they are answered as at SIGTERM — the long-poll with what it has and
/// `next_after`, the SSE stream ended — and their clients carry on against
/// the new process from there.
#[test]
fn long_polls_are_answered_and_sse_streams_end_at_an_upgrade() {
    let installed = Installed::new();
    let running = start(&installed, 1);
    let addr = running.spawned.ws_addr;
    let key = running.key.clone();
    let (status, answer) = post_publish(
        running.spawned.admin_addr,
        &running.token,
        &event("org_a", "e_0", "s"),
    );
    assert_eq!(status, 202, "{answer}");

    let poll = {
        let key = key.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            let answer = http_request(
                addr,
                "GET",
                &format!("/v1/poll?channels=events&after=1&wait_ms=30000&token={key}"),
                &[],
                b"",
            );
            (answer, started.elapsed())
        })
    };
    let mut sse = TcpStream::connect(addr).unwrap();
    sse.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    sse.write_all(
        format!("GET /v1/sse?channels=events&token={key} HTTP/1.1\r\nHost: {addr}\r\n\r\n")
            .as_bytes(),
    )
    .unwrap();
    let mut head = [0u8; 1024];
    let n = sse.read(&mut head).unwrap();
    assert!(
        head[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head[..n])
    );
    std::thread::sleep(Duration::from_millis(300));

    installed.replace_with(Path::new(binary()));
    let upgrading = Instant::now();
    let (ok, stderr) = run_upgrade(running.data.path());
    assert!(ok, "{stderr}");

    // The long-poll was answered at once, empty, with where to go on.
    let (answer, waited) = poll.join().unwrap();
    assert_eq!(answer.status, 200);
    assert!(waited < Duration::from_secs(15), "waited {waited:?}");
    let page: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
    assert_eq!(page["messages"], serde_json::json!([]), "{page}");
    assert_eq!(page["next_after"], 1, "{page}");
    // The SSE stream ended (EOF), without waiting for a message.
    let mut rest = Vec::new();
    let _ = sse.read_to_end(&mut rest);
    assert!(upgrading.elapsed() < Duration::from_secs(15));

    // The new process answers the next poll with what came after.
    let (status, answer) = post_publish(
        running.spawned.admin_addr,
        &running.token,
        &event("org_a", "e_1", "s"),
    );
    assert_eq!(status, 202, "{answer}");
    let answer = http_request(
        addr,
        "GET",
        &format!("/v1/poll?channels=events&after=1&wait_ms=5000&token={key}"),
        &[],
        b"",
    );
    assert_eq!(answer.status, 200);
    let page: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
    assert_eq!(page["messages"][0]["data"]["id"], "e_1", "{page}");
}

#[test]
fn systemd_is_told_ready_at_start_and_the_new_main_pid_at_an_upgrade() {
    // What `Type=notify` + `NotifyAccess=all` in deploy/hookstream.service
    // rely on, over the same datagram socket systemd gives in
    // NOTIFY_SOCKET: READY=1 once the server listens, and after a hot
    // upgrade MAINPID=<the new process> with READY=1, sent by the new
    // process itself (so systemd keeps tracking the service when the old
    // main process exits).
    let installed = Installed::new();
    let sockets = TestDir::new();
    let path = sockets.path().join("notify");
    let notify = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let running = start_with_env(&installed, &[("NOTIFY_SOCKET", path.to_str().unwrap())]);
    let mut datagram = [0u8; 256];
    let mut next = || {
        let n = notify.recv(&mut datagram).expect("a notification");
        String::from_utf8_lossy(&datagram[..n]).into_owned()
    };
    assert_eq!(next(), "READY=1");
    let old = read_pid(running.data.path());
    installed.replace_with(Path::new(binary()));
    let (ok, stderr) = run_upgrade(running.data.path());
    assert!(ok, "{stderr}");
    let new = read_pid(running.data.path());
    assert_ne!(new, old);
    assert_eq!(next(), format!("MAINPID={new}\nREADY=1"));
}
