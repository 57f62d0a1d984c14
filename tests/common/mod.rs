//! Shared harness for the integration tests that drive a real `hookstream`
//! process over real sockets: start a server on kernel-chosen ports in its
//! own temporary data directory, talk to it with tungstenite clients, raw
//! WebSocket bytes and a tiny blocking HTTP/1.1 client.
//!
//! Every read here has a deadline, so a misbehaving server fails a test
//! instead of hanging it. Servers are killed (SIGKILL) and their data
//! directories removed when their handle drops; the server also gets
//! `PR_SET_PDEATHSIG` so it dies with the test thread that started it even if
//! the test process is killed before `Drop` runs.
//!
//! Each test crate compiles this module separately and uses a different part
//! of it, hence the `dead_code` allowance.

#![allow(dead_code)]

pub mod deflate;

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tungstenite::handshake::HandshakeError;
use tungstenite::protocol::WebSocket;
use tungstenite::Message;

pub use deflate::DeflateStream;

/// How long any single step (a handshake, a reply, an HTTP answer) may take
/// before a test fails. Generous for a loaded 2-core CI box, small enough
/// that a hang is reported quickly.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the server may take to print its listening line. A debug
/// build starts in well under a second; the margin is for a loaded box.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);

/// The binary under test.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_hookstream")
}

// ---------------------------------------------------------------------------
// Temporary directories
// ---------------------------------------------------------------------------

/// A fresh directory under the system temp dir, removed on drop.
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    /// Creates `hookstream-test-<pid>-<n>-<nanos>`; unique per call, also
    /// across test processes running at once (nextest).
    pub fn new() -> TestDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "hookstream-test-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("create test directory");
        TestDir { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Default for TestDir {
    fn default() -> TestDir {
        TestDir::new()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

// ---------------------------------------------------------------------------
// The server process
// ---------------------------------------------------------------------------

/// Runs `hookstream ARGS… --data-dir DIR` to completion (see
/// [`hookstream_command`]) and returns stdout; panics on failure.
pub fn cli(args: &[&str], data_dir: &Path) -> String {
    let output = hookstream_command()
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .stdin(Stdio::null())
        .output()
        .expect("run hookstream");
    assert!(
        output.status.success(),
        "hookstream {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("stdout is UTF-8")
}

/// Creates an API key for `org` in `data_dir` with the CLI; returns the key.
pub fn create_key(data_dir: &Path, org: &str) -> String {
    let output = hookstream_command()
        .args([
            "api-keys",
            "create",
            "--name",
            "t",
            "--org",
            org,
            "--data-dir",
        ])
        .arg(data_dir)
        .stdin(Stdio::null())
        .output()
        .expect("run hookstream api-keys create");
    assert!(
        output.status.success(),
        "api-keys create failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let key = String::from_utf8(output.stdout).expect("key is UTF-8");
    let key = key.trim().to_string();
    assert!(
        !key.is_empty() && !key.contains(char::is_whitespace),
        "api-keys create must print the key alone on stdout, got {key:?}"
    );
    key
}

/// A `Command` for the binary with every `HOOKSTREAM_*` variable of the
/// surrounding environment removed, so tests see only their own flags.
pub fn hookstream_command() -> Command {
    hookstream_command_at(Path::new(binary()))
}

/// [`hookstream_command`] for the binary at `exe` (a copy, say, that a
/// test replaces while the server runs).
pub fn hookstream_command_at(exe: &Path) -> Command {
    let mut command = Command::new(exe);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("HOOKSTREAM_") {
            command.env_remove(name);
        }
    }
    command
}

/// How to start a server: extra `serve` flags and the orgs to create keys for.
#[derive(Debug, Default, Clone)]
pub struct ServerBuilder {
    args: Vec<String>,
    orgs: Vec<String>,
    /// Another server's data directory and keys, whose key file, admin
    /// token and session secret this one starts with (cluster nodes).
    shared: Option<(PathBuf, HashMap<String, String>)>,
    /// Files written into the data directory last, before the start.
    files: Vec<(String, String)>,
}

impl ServerBuilder {
    /// No flags beyond the data dir and `:0` listeners, no keys.
    pub fn new() -> ServerBuilder {
        ServerBuilder::default()
    }

    /// Adds `--flag value` to the `serve` command line.
    pub fn arg(mut self, flag: &str, value: impl ToString) -> ServerBuilder {
        self.args.push(flag.to_string());
        self.args.push(value.to_string());
        self
    }

    /// Creates an API key for `org` before the server starts
    /// ([`Server::key`] returns it).
    pub fn org(mut self, org: &str) -> ServerBuilder {
        self.orgs.push(org.to_string());
        self
    }

    /// Starts with `server`'s keys, admin token and session secret (copies
    /// of its files): another node of the same cluster.
    pub fn share_keys_with(mut self, server: &Server) -> ServerBuilder {
        self.shared = Some((server.data_dir().to_path_buf(), server.keys.clone()));
        self
    }

    /// Writes `contents` to `<data-dir>/name` before the server starts
    /// (after the shared files and keys: it replaces them).
    pub fn file(mut self, name: &str, contents: &str) -> ServerBuilder {
        self.files.push((name.to_string(), contents.to_string()));
        self
    }

    /// Starts `hookstream serve` and waits for its listening line; panics
    /// with the server's stderr if it exits or stays silent instead.
    pub fn start(self) -> Server {
        match self.try_start() {
            Ok(server) => server,
            Err(StartError::Hung(stderr)) => panic!(
                "hookstream serve printed no listening line within {STARTUP_TIMEOUT:?}; stderr:\n{stderr}"
            ),
            Err(StartError::Exited(message)) => panic!("{message}"),
        }
    }

    fn try_start(&self) -> Result<Server, StartError> {
        let dir = TestDir::new();
        let mut keys: HashMap<String, String> = HashMap::new();
        if let Some((from, shared)) = &self.shared {
            for file in ["keys.json", "admin-token", "session-secret"] {
                if from.join(file).exists() {
                    std::fs::copy(from.join(file), dir.path().join(file)).expect("copy a key file");
                }
            }
            keys.extend(shared.clone());
        }
        keys.extend(
            self.orgs
                .iter()
                .map(|org| (org.clone(), create_key(dir.path(), org))),
        );
        for (name, contents) in &self.files {
            std::fs::write(dir.path().join(name), contents).expect("write a data-dir file");
        }
        let mut args: Vec<String> = ["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]
            .iter()
            .map(|a| a.to_string())
            .collect();
        args.extend(self.args.iter().cloned());
        let spawned = spawn_serve(dir.path(), &args, STARTUP_TIMEOUT)?;
        let admin_token = std::fs::read_to_string(dir.path().join("admin-token"))
            .expect("admin-token is created at startup")
            .trim()
            .to_string();
        Ok(Server {
            child: spawned.child,
            ws_addr: spawned.ws_addr,
            admin_addr: spawned.admin_addr,
            shards: spawned.shards,
            admin_token,
            keys,
            stderr: spawned.stderr,
            exit_status: None,
            dir,
        })
    }
}

/// `hookstream serve --data-dir DIR ARGS…` with no `HOOKSTREAM_*`
/// (but `HOOKSTREAM_COMPRESSION_MIN_BYTES=0` in deflate mode)
/// environment and stdin closed, killed with the test thread that starts it
/// (PR_SET_PDEATHSIG) even when the test panics before cleaning up. The
/// caller chooses stdout and stderr.
pub fn serve_command<S: AsRef<std::ffi::OsStr>>(data_dir: &Path, args: &[S]) -> Command {
    serve_command_at(Path::new(binary()), data_dir, args)
}

/// [`serve_command`] for the binary at `exe`.
pub fn serve_command_at<S: AsRef<std::ffi::OsStr>>(
    exe: &Path,
    data_dir: &Path,
    args: &[S],
) -> Command {
    let mut command = hookstream_command_at(exe);
    command
        .arg("serve")
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .stdin(Stdio::null());
    if deflate::enabled() {
        // Every fan-out frame compressed, not only those of 256 bytes and
        // more, so the deflate pass exercises compression in every test
        // (a test's own --compression-min-bytes still wins).
        command.env("HOOKSTREAM_COMPRESSION_MIN_BYTES", "0");
    }
    // SAFETY: prctl is async-signal-safe and touches only the child.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    command
}

/// A `hookstream serve` process that printed its listening line.
pub struct Spawned {
    /// The process (not killed on drop: the caller decides).
    pub child: Child,
    /// Public listener.
    pub ws_addr: SocketAddr,
    /// Admin listener.
    pub admin_addr: SocketAddr,
    /// Shard count as printed.
    pub shards: usize,
    /// Every stderr line so far, collected for the process's whole life.
    pub stderr: Arc<Mutex<Vec<String>>>,
}

/// Starts `hookstream serve --data-dir DIR ARGS…` (no `HOOKSTREAM_*`
/// environment, stdout discarded, killed with the test thread that started
/// it) and waits up to `timeout` for its listening line.
pub fn spawn_serve(
    data_dir: &Path,
    args: &[String],
    timeout: Duration,
) -> Result<Spawned, StartError> {
    spawn_serve_with_env(data_dir, args, &[], timeout)
}

/// [`spawn_serve`] with these `HOOKSTREAM_*` (or other) variables set.
pub fn spawn_serve_with_env(
    data_dir: &Path,
    args: &[String],
    env: &[(&str, &str)],
    timeout: Duration,
) -> Result<Spawned, StartError> {
    let mut command = serve_command(data_dir, args);
    command.envs(env.iter().copied());
    spawn_command(command, timeout)
}

/// Starts a `serve` command (stdout discarded, stderr collected) and waits
/// up to `timeout` for its listening line.
pub fn spawn_command(mut command: Command, timeout: Duration) -> Result<Spawned, StartError> {
    command.stdout(Stdio::null()).stderr(Stdio::piped());
    // A binary copied a moment ago (a test's own copy) is "busy" while a
    // process another test thread forked meanwhile still holds the copy's
    // descriptor, until that process execs: try again shortly.
    let mut tries = 0;
    let mut child = loop {
        match command.spawn() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 100 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            spawned => break spawned.expect("spawn hookstream serve"),
        }
    };
    let stderr = child.stderr.take().expect("stderr is piped");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let (ready_tx, ready_rx) = mpsc::channel();
    {
        let lines = lines.clone();
        // Reads stderr for the process's whole life so the pipe never
        // fills and blocks the server.
        std::thread::spawn(move || {
            let mut ready = Some(ready_tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("hookstream listening on ") {
                    if let Some(ready) = ready.take() {
                        let _ = ready.send(line.clone());
                    }
                }
                lines.lock().unwrap().push(line);
            }
        });
    }
    let line = match ready_rx.recv_timeout(timeout) {
        Ok(line) => line,
        Err(timeout_or_gone) => {
            let hung = timeout_or_gone == mpsc::RecvTimeoutError::Timeout;
            // Where each of a silent server's threads waits, for the report
            // (a rare silent start under heavy load is not explained yet).
            let threads = if hung {
                threads_of(child.id())
            } else {
                String::new()
            };
            let _ = child.kill();
            let status = child.wait();
            // Give the reader thread a moment to collect the last lines.
            std::thread::sleep(Duration::from_millis(50));
            let stderr = lines.lock().unwrap().join("\n");
            return Err(if hung {
                StartError::Hung(format!(
                    "{stderr}\nthreads (name, state, wchan):\n{threads}"
                ))
            } else {
                StartError::Exited(format!(
                    "hookstream serve exited before listening ({status:?}); stderr:\n{stderr}"
                ))
            });
        }
    };
    let (ws_addr, admin_addr, shards) = parse_listening_line(&line);
    Ok(Spawned {
        child,
        ws_addr,
        admin_addr,
        shards,
        stderr: lines,
    })
}

/// Each thread of process `pid`: its name, scheduler state and the kernel
/// function it sleeps in.
fn threads_of(pid: u32) -> String {
    let mut out = String::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let path = task.path();
        let read = |name: &str| {
            std::fs::read_to_string(path.join(name))
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        let stat = read("stat");
        let state = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().next().unwrap_or("?").to_string())
            .unwrap_or_default();
        out.push_str(&format!("  {} {} {}\n", read("comm"), state, read("wchan")));
    }
    out
}

/// Why one start attempt failed.
#[derive(Debug)]
pub enum StartError {
    /// Still running, silent, after [`STARTUP_TIMEOUT`] (stderr so far).
    Hung(String),
    /// Exited before listening: a real error, never retried.
    Exited(String),
}

/// Parses `hookstream listening on ws://ADDR/v1/ws (admin http://ADDR2), N shard(s), data dir DIR`
/// (`wss://` and `https://` when the listeners speak TLS, then a TLS note
/// before the shard count).
pub fn parse_listening_line(line: &str) -> (SocketAddr, SocketAddr, usize) {
    let parsed = (|| {
        let rest = line.strip_prefix("hookstream listening on ")?;
        let rest = rest
            .strip_prefix("ws://")
            .or_else(|| rest.strip_prefix("wss://"))?;
        let (ws, rest) = rest.split_once("/v1/ws (admin ")?;
        let rest = rest
            .strip_prefix("http://")
            .or_else(|| rest.strip_prefix("https://"))?;
        let (admin, rest) = rest.split_once(')')?;
        let (before, _) = rest.split_once(" shard(s)")?;
        let shards = before.rsplit(", ").next()?;
        Some((ws.parse().ok()?, admin.parse().ok()?, shards.parse().ok()?))
    })();
    parsed.unwrap_or_else(|| panic!("unexpected listening line: {line:?}"))
}

/// A running `hookstream serve`, killed when dropped.
pub struct Server {
    child: Child,
    /// Public listener (WebSocket, polling).
    pub ws_addr: SocketAddr,
    /// Admin listener (publish, metrics, probes).
    pub admin_addr: SocketAddr,
    /// Shard count as printed at startup.
    pub shards: usize,
    /// Contents of `<data-dir>/admin-token`.
    pub admin_token: String,
    keys: HashMap<String, String>,
    stderr: Arc<Mutex<Vec<String>>>,
    exit_status: Option<ExitStatus>,
    // Last, so the directory is removed after the process is gone.
    dir: TestDir,
}

impl Server {
    /// A server with default flags and a key for each of `orgs`.
    pub fn start(orgs: &[&str]) -> Server {
        orgs.iter()
            .fold(ServerBuilder::new(), |b, org| b.org(org))
            .start()
    }

    /// The key created for `org` at startup.
    pub fn key(&self, org: &str) -> &str {
        self.keys
            .get(org)
            .unwrap_or_else(|| panic!("no key was created for org {org}"))
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the server wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Resident set size from `/proc/PID/status`, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/PID/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }

    /// Sends `signal` to the server.
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.pid() as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill({}, {signal})", self.pid());
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.exit_status = Some(status);
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A WebSocket client of `org`, authenticated with `?token=`; the
    /// welcome has been read.
    pub fn connect(&self, org: &str) -> Client {
        Client::connect(self.ws_addr, &format!("/v1/ws?token={}", self.key(org)))
    }

    /// `POST /v1/publish` with the admin token.
    pub fn publish(&self, body: &str) -> HttpResponse {
        self.publish_with(body, Some(&self.admin_token), "application/json")
    }

    /// `POST /v1/publish` with any token (or none) and content type.
    pub fn publish_with(
        &self,
        body: &str,
        token: Option<&str>,
        content_type: &str,
    ) -> HttpResponse {
        let mut headers = vec![("Content-Type", content_type.to_string())];
        if let Some(token) = token {
            headers.push(("Authorization", format!("Bearer {token}")));
        }
        http_request(
            self.admin_addr,
            "POST",
            "/v1/publish",
            &headers,
            body.as_bytes(),
        )
    }

    /// Publishes and asserts `202`; returns the seqs of the answer after
    /// checking `accepted` matches their count.
    pub fn publish_ok(&self, body: &str) -> Vec<u64> {
        let response = self.publish(body);
        assert_eq!(
            response.status,
            202,
            "publish answered {}: {}",
            response.status,
            response.text()
        );
        let json = response.json();
        let seqs: Vec<u64> = json["seqs"]
            .as_array()
            .unwrap_or_else(|| panic!("no seqs in {json}"))
            .iter()
            .map(|s| s.as_u64().expect("seq is an integer"))
            .collect();
        assert_eq!(json["accepted"].as_u64(), Some(seqs.len() as u64), "{json}");
        seqs
    }

    /// `GET path` on the admin listener, with the admin token when `token`.
    pub fn admin_get(&self, path: &str, token: bool) -> HttpResponse {
        let headers = if token {
            vec![("Authorization", format!("Bearer {}", self.admin_token))]
        } else {
            Vec::new()
        };
        http_request(self.admin_addr, "GET", path, &headers, b"")
    }

    /// The sum over shards of a metric in `/metrics` (lines `name{…} value`).
    pub fn metric_sum(&self, name: &str) -> u64 {
        let response = self.admin_get("/metrics", true);
        assert_eq!(response.status, 200);
        let text = response.text();
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }
}

impl Server {
    /// Waits until the summed metric equals `value`: each shard refreshes
    /// its gauges on its own clock, so `/metrics` lags by a few hundred ms.
    pub fn wait_for_metric(&self, name: &str, value: u64) {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            let now = self.metric_sum(name);
            if now == value {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{name} is {now}, expected {value}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.exit_status.is_none() {
            if let Ok(None) = self.child.try_wait() {
                let _ = self.child.kill();
            }
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// Publish bodies
// ---------------------------------------------------------------------------

/// An event message for `POST /v1/publish`.
pub fn event(org: &str, id: &str, source_id: &str) -> String {
    format!(
        r#"{{"org_id":"{org}","type":"event","data":{{"id":"{id}","source_id":"{source_id}"}}}}"#
    )
}

/// A delivery message.
pub fn delivery(org: &str, id: &str, destination_id: &str) -> String {
    format!(
        r#"{{"org_id":"{org}","type":"delivery","data":{{"id":"{id}","destination_id":"{destination_id}"}}}}"#
    )
}

/// An issue message.
pub fn issue(org: &str, id: &str) -> String {
    format!(r#"{{"org_id":"{org}","type":"issue","data":{{"id":"{id}"}}}}"#)
}

/// A sync message of a collection.
pub fn sync(org: &str, collection_id: &str, id: &str) -> String {
    format!(
        r#"{{"org_id":"{org}","type":"sync","collection_id":"{collection_id}","data":{{"id":"{id}"}}}}"#
    )
}

/// A JSON array of messages.
pub fn array(messages: &[String]) -> String {
    format!("[{}]", messages.join(","))
}

/// The number tokens of a JSON text exactly as written, outside strings.
/// Used to check that every digit of a number survived the trip.
pub fn number_tokens(json: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut chars = json.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                // Skip a string, honouring escapes.
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => {
                            chars.next();
                        }
                        '"' => break,
                        _ => {}
                    }
                }
            }
            '-' | '0'..='9' => {
                let mut token = String::from(c);
                while let Some(&c) = chars.peek() {
                    if c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-') {
                        token.push(c);
                        chars.next();
                    } else {
                        break;
                    }
                }
                tokens.push(token);
            }
            _ => {}
        }
    }
    tokens
}

// ---------------------------------------------------------------------------
// tungstenite clients
// ---------------------------------------------------------------------------

/// What one read of a client produced.
#[derive(Debug)]
pub enum Received {
    /// A text message, parsed as JSON (`raw` keeps the exact text).
    Json {
        /// The message as JSON.
        value: Value,
        /// The message text as received.
        raw: String,
    },
    /// A close frame with this code (1005 when the frame had none).
    Close(u16),
    /// The connection ended without a close frame.
    Eof,
    /// The connection failed in another way: bytes that are not a valid
    /// WebSocket stream (a torn or malformed frame), or a socket error.
    Error(String),
    /// Nothing arrived in time.
    Timeout,
}

/// A tungstenite client over a std `TcpStream` with read and write timeouts,
/// through a [`DeflateStream`] that is a plain pass-through unless
/// `HOOKSTREAM_TEST_DEFLATE=1` (see [`deflate`]).
pub struct Client {
    /// The WebSocket; public so tests can send arbitrary messages.
    pub ws: WebSocket<DeflateStream<TcpStream>>,
    /// The `welcome` message.
    pub welcome: Value,
    /// WebSocket pings received from the server so far.
    pub pings: u64,
}

/// The read timeout of a client socket: short, so deadlines are honoured
/// with little overshoot.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Connects a plain TCP socket with both timeouts set.
pub fn tcp_connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&addr, STEP_TIMEOUT).expect("TCP connect");
    stream.set_read_timeout(Some(POLL_INTERVAL)).unwrap();
    stream.set_write_timeout(Some(STEP_TIMEOUT)).unwrap();
    let _ = stream.set_nodelay(true);
    stream
}

/// Why an upgrade did not produce a WebSocket.
#[derive(Debug)]
pub enum UpgradeError {
    /// The server answered with this HTTP status.
    Status(u16),
    /// Anything else.
    Other(String),
}

impl Client {
    /// Upgrades at `path_and_query` and reads the welcome; panics on failure.
    pub fn connect(addr: SocketAddr, path_and_query: &str) -> Client {
        Client::connect_with(addr, path_and_query, &[])
    }

    /// Like [`Client::connect`], with extra request headers.
    pub fn connect_with(
        addr: SocketAddr,
        path_and_query: &str,
        headers: &[(&str, &str)],
    ) -> Client {
        let mut client = Client::try_upgrade_with(addr, path_and_query, headers)
            .unwrap_or_else(|e| panic!("upgrade {path_and_query} failed: {e:?}"));
        client.welcome = client.next_json(STEP_TIMEOUT);
        client
    }

    /// Upgrades without reading anything.
    pub fn try_upgrade(addr: SocketAddr, path_and_query: &str) -> Result<Client, UpgradeError> {
        Client::try_upgrade_with(addr, path_and_query, &[])
    }

    /// Upgrades with extra request headers, without reading anything. An
    /// answer of `429` is retried: the contract rate-limits upgrades per
    /// source IP, and every test client comes from 127.0.0.1.
    pub fn try_upgrade_with(
        addr: SocketAddr,
        path_and_query: &str,
        headers: &[(&str, &str)],
    ) -> Result<Client, UpgradeError> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            match Client::upgrade_once(addr, path_and_query, headers) {
                Err(UpgradeError::Status(429)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => return other,
            }
        }
    }

    /// One upgrade attempt with extra request headers (no retry of a
    /// `429`), without reading anything.
    pub fn upgrade_once(
        addr: SocketAddr,
        path_and_query: &str,
        headers: &[(&str, &str)],
    ) -> Result<Client, UpgradeError> {
        use tungstenite::client::IntoClientRequest;
        let stream = tcp_connect(addr);
        let mut request = format!("ws://{addr}{path_and_query}")
            .into_client_request()
            .map_err(|e| UpgradeError::Other(e.to_string()))?;
        for (name, value) in headers {
            request.headers_mut().insert(
                tungstenite::http::HeaderName::from_bytes(name.as_bytes()).expect("header name"),
                value.parse().expect("header value"),
            );
        }
        let deflate_mode = deflate::enabled();
        let stream = if deflate_mode {
            request.headers_mut().insert(
                "Sec-WebSocket-Extensions",
                deflate::OFFER.parse().expect("header value"),
            );
            DeflateStream::deflate(stream)
        } else {
            DeflateStream::plain(stream)
        };
        let deadline = Instant::now() + STEP_TIMEOUT;
        let mut attempt = tungstenite::client(request, stream);
        loop {
            match attempt {
                Ok((ws, response)) => {
                    if deflate_mode {
                        deflate::assert_accepted(
                            response
                                .headers()
                                .get("sec-websocket-extensions")
                                .and_then(|v| v.to_str().ok()),
                        );
                    }
                    return Ok(Client {
                        ws,
                        welcome: Value::Null,
                        pings: 0,
                    });
                }
                Err(HandshakeError::Interrupted(mid)) => {
                    if Instant::now() >= deadline {
                        return Err(UpgradeError::Other("handshake timed out".into()));
                    }
                    attempt = mid.handshake();
                }
                Err(HandshakeError::Failure(tungstenite::Error::Http(response))) => {
                    return Err(UpgradeError::Status(response.status().as_u16()))
                }
                Err(HandshakeError::Failure(e)) => return Err(UpgradeError::Other(e.to_string())),
            }
        }
    }

    /// How many compressed messages this client received and sent (both 0
    /// unless `HOOKSTREAM_TEST_DEFLATE=1`).
    pub fn compressed_counts(&self) -> (u64, u64) {
        let stream = self.ws.get_ref();
        (stream.inflated, stream.deflated)
    }

    /// Sends a text message.
    pub fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::text(text))
            .unwrap_or_else(|e| panic!("send {text:?}: {e}"));
    }

    /// Reads until a text message, a close, EOF or the timeout. Pings are
    /// answered by tungstenite and counted; pongs are skipped.
    pub fn recv(&mut self, timeout: Duration) -> Received {
        let deadline = Instant::now() + timeout;
        loop {
            match self.ws.read() {
                Ok(Message::Text(text)) => {
                    let raw = text.as_str().to_string();
                    let value = serde_json::from_str(&raw)
                        .unwrap_or_else(|e| panic!("server sent invalid JSON {raw:?}: {e}"));
                    return Received::Json { value, raw };
                }
                Ok(Message::Binary(bytes)) => {
                    panic!("server sent a binary message ({} bytes)", bytes.len())
                }
                Ok(Message::Ping(_)) => self.pings += 1,
                Ok(Message::Pong(_)) | Ok(Message::Frame(_)) => {}
                Ok(Message::Close(frame)) => {
                    // Let tungstenite send its close reply.
                    let _ = self.ws.flush();
                    return Received::Close(frame.map(|f| u16::from(f.code)).unwrap_or(1005));
                }
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if Instant::now() >= deadline {
                        return Received::Timeout;
                    }
                }
                Err(
                    tungstenite::Error::ConnectionClosed
                    | tungstenite::Error::AlreadyClosed
                    | tungstenite::Error::Protocol(
                        tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
                    ),
                ) => return Received::Eof,
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::UnexpectedEof
                            | io::ErrorKind::ConnectionReset
                            | io::ErrorKind::BrokenPipe
                    ) =>
                {
                    return Received::Eof
                }
                Err(e) => return Received::Error(e.to_string()),
            }
        }
    }

    /// The next JSON message; panics on anything else.
    pub fn next_json(&mut self, timeout: Duration) -> Value {
        match self.recv(timeout) {
            Received::Json { value, .. } => value,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    /// The next JSON message and its exact text.
    pub fn next_raw(&mut self, timeout: Duration) -> (Value, String) {
        match self.recv(timeout) {
            Received::Json { value, raw } => (value, raw),
            other => panic!("expected a message, got {other:?}"),
        }
    }

    /// Subscribes and checks the acknowledgement.
    pub fn subscribe(&mut self, channel: &str) {
        self.send_text(&format!(r#"{{"type":"subscribe","channel":"{channel}"}}"#));
        let ack = self.next_json(STEP_TIMEOUT);
        assert_eq!(ack["type"], "subscribed", "ack of {channel}: {ack}");
        assert_eq!(ack["channel"], channel, "ack of {channel}: {ack}");
    }

    /// Sends `subscribe` with `after` and returns the reply, checked to be
    /// the `subscribed` of `channel`.
    pub fn subscribe_after(&mut self, channel: &str, after: u64) -> Value {
        self.send_text(&format!(
            r#"{{"type":"subscribe","channel":"{channel}","after":{after}}}"#
        ));
        let ack = self.next_json(STEP_TIMEOUT);
        assert_eq!(ack["type"], "subscribed", "{ack}");
        assert_eq!(ack["channel"], channel, "{ack}");
        ack
    }

    /// Unsubscribes and checks the acknowledgement.
    pub fn unsubscribe(&mut self, channel: &str) {
        self.send_text(&format!(
            r#"{{"type":"unsubscribe","channel":"{channel}"}}"#
        ));
        let ack = self.next_json(STEP_TIMEOUT);
        assert_eq!(ack["type"], "unsubscribed", "ack of {channel}: {ack}");
        assert_eq!(ack["channel"], channel, "ack of {channel}: {ack}");
    }

    /// Sends `{"type":"ping"}` and expects `{"type":"pong"}`: proof that the
    /// connection is open and that everything sent before was handled.
    pub fn ping_pong(&mut self) {
        self.send_text(r#"{"type":"ping"}"#);
        let pong = self.next_json(STEP_TIMEOUT);
        assert_eq!(pong, serde_json::json!({"type":"pong"}));
    }

    /// Reads past any messages until the close frame or EOF; returns the
    /// close code, or `None` for EOF without a close frame.
    pub fn expect_close(&mut self, timeout: Duration) -> Option<u16> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left) {
                Received::Json { .. } => {}
                Received::Close(code) => return Some(code),
                Received::Eof => return None,
                Received::Error(e) => panic!("expected a close frame or EOF, got: {e}"),
                Received::Timeout => panic!("connection still open after {timeout:?}"),
            }
        }
    }
}

/// The `seq` of a server message text, found without a full JSON parse
/// (a debug-build parse of 50 MiB of messages is the slowest part of the
/// slow-consumer test otherwise). Only for texts whose `data` has no `seq`.
pub fn seq_of(raw: &str) -> u64 {
    let at = raw.find("\"seq\":").expect("message has a seq") + "\"seq\":".len();
    let digits: String = raw[at..]
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().expect("seq is an integer")
}

// ---------------------------------------------------------------------------
// Raw WebSocket bytes
// ---------------------------------------------------------------------------

/// A frame as read off the wire by [`RawClient`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    /// FIN bit.
    pub fin: bool,
    /// Opcode (1 text, 2 binary, 8 close, 9 ping, 10 pong).
    pub opcode: u8,
    /// Whether the server masked it (it must not).
    pub masked: bool,
    /// Unmasked payload.
    pub payload: Vec<u8>,
}

impl RawFrame {
    /// The close code of a close frame (1005 when it has none).
    pub fn close_code(&self) -> u16 {
        assert_eq!(self.opcode, 8, "not a close frame");
        if self.payload.len() >= 2 {
            u16::from_be_bytes([self.payload[0], self.payload[1]])
        } else {
            1005
        }
    }
}

/// The request head of a WebSocket upgrade, with `extra` header lines.
pub fn upgrade_request(addr: SocketAddr, path_and_query: &str, extra: &[&str]) -> String {
    let mut head = format!(
        "GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    );
    for line in extra {
        head.push_str(line);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    head
}

/// A WebSocket client that writes and reads frames byte by byte, for what
/// tungstenite will not do (unmasked frames, never answering pings).
pub struct RawClient {
    /// The socket.
    pub stream: TcpStream,
    buffer: Vec<u8>,
}

impl RawClient {
    /// Upgrades at `path_and_query`; panics unless the answer is 101.
    pub fn connect(addr: SocketAddr, path_and_query: &str) -> RawClient {
        let mut stream = tcp_connect(addr);
        stream
            .write_all(upgrade_request(addr, path_and_query, &[]).as_bytes())
            .expect("send upgrade");
        let mut buffer = Vec::new();
        let deadline = Instant::now() + STEP_TIMEOUT;
        let head_end = loop {
            if let Some(at) = find(&buffer, b"\r\n\r\n") {
                break at + 4;
            }
            assert!(
                read_some(&mut stream, &mut buffer, deadline).expect("read 101") > 0,
                "EOF before the 101 answer"
            );
        };
        let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
        assert!(
            head.starts_with("HTTP/1.1 101 "),
            "expected 101, got {head:?}"
        );
        assert!(
            head.to_ascii_lowercase()
                .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
            "wrong Sec-WebSocket-Accept in {head:?}"
        );
        buffer.drain(..head_end);
        RawClient { stream, buffer }
    }

    /// Writes one frame; `mask` chooses a (fixed, non-zero) masking key or none.
    pub fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8], mask: bool) {
        let frame = encode_frame(
            fin,
            opcode,
            payload,
            mask.then_some([0x37, 0xfa, 0x21, 0x3d]),
        );
        self.stream.write_all(&frame).expect("send frame");
    }

    /// The next frame, `Ok(None)` at EOF, `Err` on timeout or socket error.
    pub fn read_frame(&mut self, timeout: Duration) -> io::Result<Option<RawFrame>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((frame, used)) = decode_frame(&self.buffer) {
                self.buffer.drain(..used);
                return Ok(Some(frame));
            }
            if read_some(&mut self.stream, &mut self.buffer, deadline)? == 0 {
                return Ok(None);
            }
        }
    }

    /// Bytes read but not yet decoded into a frame.
    pub fn leftover(&self) -> &[u8] {
        &self.buffer
    }

    /// The next text frame as JSON, skipping pings (which are *not* answered).
    pub fn next_json(&mut self, timeout: Duration) -> Value {
        loop {
            let frame = self
                .read_frame(timeout)
                .expect("read frame")
                .expect("connection open");
            if frame.opcode == 1 {
                return serde_json::from_slice(&frame.payload).expect("text frame holds JSON");
            }
            assert_eq!(frame.opcode, 9, "unexpected frame {frame:?}");
        }
    }
}

/// Encodes a client (or, unmasked, server-style) frame.
pub fn encode_frame(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = vec![(u8::from(fin) << 7) | opcode];
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= 0xffff => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(key) => {
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// Decodes one complete frame at the start of `bytes`.
fn decode_frame(bytes: &[u8]) -> Option<(RawFrame, usize)> {
    if bytes.len() < 2 {
        return None;
    }
    let masked = bytes[1] & 0x80 != 0;
    let (len, mut at) = match bytes[1] & 0x7f {
        126 => (
            u16::from_be_bytes(bytes.get(2..4)?.try_into().ok()?) as usize,
            4,
        ),
        127 => (
            u64::from_be_bytes(bytes.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    let key = if masked {
        let key: [u8; 4] = bytes.get(at..at + 4)?.try_into().ok()?;
        at += 4;
        Some(key)
    } else {
        None
    };
    let mut payload = bytes.get(at..at + len)?.to_vec();
    if let Some(key) = key {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= key[i % 4];
        }
    }
    let frame = RawFrame {
        fin: bytes[0] & 0x80 != 0,
        opcode: bytes[0] & 0x0f,
        masked,
        payload,
    };
    Some((frame, at + len))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Appends what one read returns, retrying on timeouts until `deadline`.
/// Returns the bytes read (0 at EOF); `TimedOut` past the deadline.
pub fn read_some(
    stream: &mut TcpStream,
    buffer: &mut Vec<u8>,
    deadline: Instant,
) -> io::Result<usize> {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut chunk) {
            Ok(n) => {
                buffer.extend_from_slice(&chunk[..n]);
                return Ok(n);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if Instant::now() >= deadline {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "read deadline passed",
                    ));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

// ---------------------------------------------------------------------------
// Blocking HTTP/1.1
// ---------------------------------------------------------------------------

/// An HTTP answer.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Header lines as (name, value), in order.
    pub headers: Vec<(String, String)>,
    /// The body (by `Content-Length` when given, else up to EOF).
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics if it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.text()))
    }
}

/// Sends `GET path` with `headers` on a fresh connection and leaves it
/// open (for streamed answers: SSE, long-polls).
pub fn send_get(addr: SocketAddr, path: &str, headers: &[(&str, String)]) -> TcpStream {
    let mut stream = tcp_connect(addr);
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).expect("send request");
    stream
}

/// Opens an SSE stream: `GET path` with `headers`, then the answer head,
/// checked to be a 200 `text/event-stream`. Returns the stream and the body
/// bytes read with the head.
pub fn open_sse(addr: SocketAddr, path: &str, headers: &[(&str, String)]) -> (TcpStream, Vec<u8>) {
    let mut stream = send_get(addr, path, headers);
    let deadline = Instant::now() + STEP_TIMEOUT;
    let mut buffer = Vec::new();
    let head_end = loop {
        if let Some(at) = find(&buffer, b"\r\n\r\n") {
            break at + 4;
        }
        match read_some(&mut stream, &mut buffer, deadline) {
            Ok(0) => panic!("closed: {:?}", String::from_utf8_lossy(&buffer)),
            Ok(_) => {}
            Err(e) => panic!("no SSE answer head: {e}"),
        }
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/event-stream"),
        "{head}"
    );
    buffer.drain(..head_end);
    (stream, buffer)
}

/// One request with `Content-Length` and `Connection: close`; reads the
/// answer to EOF.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> HttpResponse {
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(body);
    http_raw(addr, &bytes)
}

/// Writes `request` as is and reads the answer to EOF (or to the end of
/// its `Content-Length` body).
pub fn http_raw(addr: SocketAddr, request: &[u8]) -> HttpResponse {
    let mut stream = tcp_connect(addr);
    stream.write_all(request).expect("send HTTP request");
    read_http_response(&mut stream)
}

/// Reads one HTTP answer from `stream`.
pub fn read_http_response(stream: &mut TcpStream) -> HttpResponse {
    let deadline = Instant::now() + STEP_TIMEOUT;
    let mut buffer = Vec::new();
    let head_end = loop {
        if let Some(at) = find(&buffer, b"\r\n\r\n") {
            break at + 4;
        }
        let n = read_some(stream, &mut buffer, deadline).expect("read HTTP answer");
        assert!(
            n > 0,
            "EOF before a complete answer head: {:?}",
            String::from_utf8_lossy(&buffer)
        );
    };
    let head = String::from_utf8(buffer[..head_end].to_vec()).expect("head is text");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (n, v) = l.split_once(':').expect("header line has a colon");
            (n.trim().to_string(), v.trim().to_string())
        })
        .collect();
    let length = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.parse::<usize>().expect("numeric Content-Length"));
    let mut body = buffer[head_end..].to_vec();
    loop {
        if length.is_some_and(|len| body.len() >= len) {
            break;
        }
        match read_some(stream, &mut body, deadline) {
            Ok(0) => break,
            Ok(_) => {}
            // A reset after a complete answer is how some refusals end.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("reading the body: {e}"),
        }
    }
    if let Some(len) = length {
        assert_eq!(body.len(), len, "body shorter than Content-Length");
    }
    HttpResponse {
        status,
        headers,
        body,
    }
}

/// `POST /v1/sessions` with `key` as bearer; the `hs_session` value.
pub fn sign_in(addr: SocketAddr, key: &str) -> String {
    let response = http_request(
        addr,
        "POST",
        "/v1/sessions",
        &[("Authorization", format!("Bearer {key}"))],
        b"",
    );
    assert_eq!(response.status, 200, "{}", response.text());
    response
        .header("set-cookie")
        .expect("Set-Cookie")
        .split(';')
        .next()
        .and_then(|c| c.strip_prefix("hs_session="))
        .expect("the cookie is hs_session")
        .to_string()
}
