//! `loadgen`: the load generator of issue 6, with its own client stack
//! (tokio + tokio-tungstenite, and the hand-written WebSocket client of
//! `raw` for the fan-out subscribers), so it shares no code with the server
//! it measures. It speaks the contract subset every target implements: the
//! `welcome` message, `subscribe`/`subscribed`, and `POST /v1/publish` with
//! the admin token.
//!
//! Modes, each printing one JSON line per result on stdout:
//! - `idle --conns N`: open N connections, subscribe each, wait until all are
//!   welcomed and subscribed, then report the server's RSS delta per
//!   connection, the kernel's socket memory delta and the connect rate;
//! - `fanout --subs N --rate R --payload B --duration S`: N subscribers and a
//!   publisher at R messages/s carrying its send time; delivered messages/s,
//!   expected vs received, publish→receive latency percentiles;
//! - `storm --conns N`: upgrades per second and connect→welcome latency;
//! - `resume --conns N --behind K`: the same storm with every client
//!   subscribing with `after` K messages back (published first): server
//!   CPU per resumed client, time until every client has its messages;
//! - `sendcost`: the kernel cost of one small loopback send, the floor the
//!   fan-out latency target is measured against.
//!
//! One process may hold at most 20,000 files here, so the coordinator splits
//! the connections over `--procs` worker processes (more when needed), each a
//! single-threaded tokio runtime; every worker reports its own CPU time
//! (getrusage) so a run where the client is the bottleneck shows. Client
//! sockets are bound to 127.0.0.2, 127.0.0.3, … (`--source-ips`) so that
//! many connections never exhaust one source address's ephemeral ports.

mod http;
mod probe;
mod raw;
mod stats;
mod worker;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command as Process, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::stats::{cpu_seconds, process_cpu_seconds, Latency, MemorySample};
use crate::worker::{Mode, WorkerSpec};

/// Connections one worker process opens at most (files: one per socket,
/// under the 20,000 per process the machine allows).
const CONNECTIONS_PER_PROCESS_MAX: usize = 15_000;

#[derive(Parser)]
#[command(
    name = "loadgen",
    about = "Load generator for hookstream and its peer gateways"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Hold N idle, subscribed connections; report server memory per connection.
    Idle {
        #[command(flatten)]
        common: Common,
        /// Connections to open.
        #[arg(long)]
        conns: usize,
        /// Milliseconds to wait after the last subscription before sampling
        /// memory, so the server settles.
        #[arg(long, default_value_t = 1000)]
        settle_ms: u64,
    },
    /// N subscribers, one publisher at R messages/s; delivery rate, loss, latency.
    Fanout {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        publish: PublishArgs,
        /// Subscribers.
        #[arg(long)]
        subs: usize,
        /// Messages per second offered by the publisher.
        #[arg(long)]
        rate: f64,
        /// Bytes of each message's `data` JSON.
        #[arg(long, default_value_t = 256)]
        payload: usize,
        /// Seconds of publishing.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Messages per publish request (a JSON array when more than one).
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Concurrent publisher connections sharing the rate.
        #[arg(long, default_value_t = 1)]
        publishers: usize,
        /// Seconds to wait after the last publish for every delivery.
        #[arg(long, default_value_t = 15.0)]
        drain_s: f64,
        /// Also hold one connection subscribed to nothing that pings every
        /// N ms while publishing and reports its ping→pong round trips
        /// (`probe_rtt_us`): how long the server's other connections wait
        /// behind a broadcast. 0: no probe.
        #[arg(long, default_value_t = 0)]
        probe_ms: u64,
    },
    /// Open N connections as fast as the server upgrades them.
    Storm {
        #[command(flatten)]
        common: Common,
        /// Connections to open.
        #[arg(long)]
        conns: usize,
    },
    /// Publish `behind` messages, then open N connections that each
    /// subscribe with `after` that many messages back: a reconnect storm
    /// that resumes. Reports server CPU per resumed client and the time
    /// until every client has its messages.
    Resume {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        publish: PublishArgs,
        /// Connections to open.
        #[arg(long)]
        conns: usize,
        /// Messages every client is behind.
        #[arg(long, default_value_t = 10)]
        behind: u64,
        /// Bytes of each message's `data` JSON.
        #[arg(long, default_value_t = 256)]
        payload: usize,
    },
    /// Measure the kernel cost of one small loopback TCP send.
    Sendcost {
        /// Sockets to write to per round.
        #[arg(long, default_value_t = 2000)]
        sockets: usize,
        /// Bytes per send (one frame of the fan-out scenario).
        #[arg(long, default_value_t = 320)]
        bytes: usize,
        /// Rounds.
        #[arg(long, default_value_t = 20)]
        rounds: usize,
        /// Drain the receiving ends from a thread pinned to this CPU as the
        /// bytes arrive (each send then also wakes it), instead of after
        /// each round with nobody waiting.
        #[arg(long)]
        reader_cpu: Option<usize>,
    },
    /// Internal: one worker process (spawned by the modes above).
    #[command(hide = true)]
    Worker {
        /// The worker's specification as JSON.
        spec: String,
    },
}

/// Options every connection mode takes.
#[derive(Args, Clone, Serialize, Deserialize, Debug)]
pub struct Common {
    /// WebSocket URL; `?token=` is appended.
    #[arg(long, default_value = "ws://127.0.0.1:8080/v1/ws")]
    pub url: String,
    /// More WebSocket URLs of the same service (other gateway nodes of a
    /// cluster), repeatable: the worker processes are spread over `--url`
    /// and these in turn (at least one process per URL), so the
    /// connections split evenly between them.
    #[arg(long)]
    #[serde(default)]
    pub also_url: Vec<String>,
    /// API key for `?token=`.
    #[arg(long)]
    pub token: String,
    /// Name of the target, copied into the result line.
    #[arg(long, default_value = "target")]
    pub label: String,
    /// Worker processes (raised to keep each under 15,000 connections).
    #[arg(long, default_value_t = 1)]
    pub procs: usize,
    /// Source addresses 127.0.0.2 … 127.0.0.(1+K) to spread client sockets over (K ≤ 253).
    #[arg(long, default_value_t = 8)]
    pub source_ips: u8,
    /// Connection attempts in flight at once, over all workers.
    #[arg(long, default_value_t = 200)]
    pub inflight: usize,
    /// PID of the server, to read its RSS from /proc.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// More processes of the server side (e.g. a TLS terminator in front of
    /// it), repeatable: their RSS and CPU time are added to the server's.
    #[arg(long)]
    #[serde(default)]
    pub also_pid: Vec<u32>,
    /// Channel to subscribe to.
    #[arg(long, default_value = "events")]
    pub channel: String,
    /// Bytes per socket read. fanout: the read buffer every subscriber of a
    /// worker shares (default 256 KiB; never zero-filled). idle and storm:
    /// tungstenite's per-connection read buffer (default 4 KiB), which it
    /// zero-fills before every read.
    #[arg(long)]
    pub read_buffer: Option<usize>,
    /// Seconds allowed for opening every connection.
    #[arg(long, default_value_t = 120)]
    pub setup_timeout_s: u64,
    /// Offer permessage-deflate (RFC 7692) and inflate compressed messages
    /// (fanout; idle then holds raw connections that negotiated it). One
    /// inflater per worker process, reset per message: the answer must
    /// name client_no_context_takeover.
    #[arg(long)]
    #[serde(default)]
    pub deflate: bool,
    /// Connect with TLS (wss; implied by a `wss://` --url): a full
    /// handshake per connection (no session resumption unless
    /// --tls-resume), then the same upgrade and frames over the decrypted
    /// bytes. Every mode then uses the hand-written client.
    #[arg(long)]
    #[serde(default)]
    pub tls: bool,
    /// PEM file of the certificate(s) to trust for TLS (the server's own
    /// self-signed certificate, or its CA). Required with TLS.
    #[arg(long)]
    #[serde(default)]
    pub ca: Option<std::path::PathBuf>,
    /// Resume TLS sessions: each worker process first makes as many full
    /// handshakes as it has connections in flight (not counted; their
    /// connections are closed) to fill one session store its connections
    /// share, then every counted connection resumes with a ticket of it
    /// (TLS 1.3 PSK; each ticket used once, and each handshake brings new
    /// ones). Results count `tls_resumed` and `tls_full` handshakes.
    #[arg(long)]
    #[serde(default)]
    pub tls_resume: bool,
    /// Offer TLS 1.2 only (default: TLS 1.3 and 1.2, so 1.3).
    #[arg(long)]
    #[serde(default)]
    pub tls12: bool,
}

impl Common {
    /// The server's process and the other processes counted with it.
    fn server_pids(&self) -> Vec<u32> {
        self.server_pid
            .iter()
            .chain(&self.also_pid)
            .copied()
            .collect()
    }
}

/// Where and how to publish.
#[derive(Args, Clone, Debug)]
struct PublishArgs {
    /// Admin listener base URL.
    #[arg(long, default_value = "http://127.0.0.1:8081")]
    admin_url: String,
    /// Admin token for `Authorization: Bearer`.
    #[arg(long)]
    admin_token: String,
    /// Org to publish to (the key's org).
    #[arg(long, default_value = "bench")]
    org: String,
    /// A JSON object file sent as `data.sample` of every message (with
    /// `source_id` and the send time `t` beside it) instead of `--payload`
    /// bytes of padding: realistic text for compression.
    #[arg(long)]
    data_file: Option<std::path::PathBuf>,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Worker { spec } => {
            let spec: WorkerSpec = serde_json::from_str(&spec).expect("worker spec is JSON");
            worker::run(spec);
            return;
        }
        Command::Idle {
            common,
            conns,
            settle_ms,
        } => idle(common, conns, settle_ms),
        Command::Storm { common, conns } => storm(common, conns),
        Command::Resume {
            common,
            publish,
            conns,
            behind,
            payload,
        } => resume(common, publish, conns, behind, payload),
        Command::Fanout {
            common,
            publish,
            subs,
            rate,
            payload,
            duration,
            batch,
            publishers,
            drain_s,
            probe_ms,
        } => fanout(
            common,
            publish,
            FanoutPlan {
                subs,
                rate,
                payload,
                duration_s: duration,
                batch: batch.max(1),
                publishers,
                drain_s,
                probe_ms,
            },
        ),
        Command::Sendcost {
            sockets,
            bytes,
            rounds,
            reader_cpu,
        } => stats::sendcost(sockets, bytes, rounds, reader_cpu),
    };
    match result {
        // Empty: the mode printed its line itself.
        Ok(line) if line.is_empty() => {}
        Ok(line) => println!("{line}"),
        Err(message) => {
            println!("{}", json!({"error": message}));
            std::process::exit(1);
        }
    }
}

/// The worker processes of one run and the lines they print.
struct Workers {
    children: Vec<Child>,
    stdins: Vec<ChildStdin>,
    lines: mpsc::Receiver<(usize, Value)>,
}

impl Workers {
    /// Splits `conns` over enough processes and starts them.
    fn spawn(common: &Common, mode: Mode, conns: usize) -> Result<Workers, String> {
        Workers::spawn_resuming(common, mode, conns, None, 0)
    }

    /// [`Workers::spawn`] whose connections subscribe with `after` and
    /// wait for `replayed` messages (resume mode).
    fn spawn_resuming(
        common: &Common,
        mode: Mode,
        conns: usize,
        after: Option<u64>,
        replayed: u64,
    ) -> Result<Workers, String> {
        let urls: Vec<&String> = std::iter::once(&common.url)
            .chain(&common.also_url)
            .collect();
        let procs = common
            .procs
            .max(conns.div_ceil(CONNECTIONS_PER_PROCESS_MAX))
            .max(urls.len());
        let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
        let (tx, lines) = mpsc::channel();
        let mut children = Vec::new();
        let mut stdins = Vec::new();
        let mut offset = 0;
        for index in 0..procs {
            let share = conns / procs + usize::from(index < conns % procs);
            let mut worker_common = common.clone();
            worker_common.url = urls[index % urls.len()].clone();
            let spec = WorkerSpec {
                mode,
                common: worker_common,
                index,
                offset,
                conns: share,
                inflight: common.inflight.div_ceil(procs).max(1),
                after,
                replayed,
            };
            offset += share;
            let mut child = Process::new(&exe)
                .arg("worker")
                .arg(serde_json::to_string(&spec).expect("spec serializes"))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .map_err(|e| format!("spawn worker: {e}"))?;
            let stdout = child.stdout.take().expect("piped");
            stdins.push(child.stdin.take().expect("piped"));
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    match serde_json::from_str::<Value>(&line) {
                        Ok(value) => {
                            if tx.send((index, value)).is_err() {
                                break;
                            }
                        }
                        Err(_) => eprintln!("loadgen: worker {index}: {line}"),
                    }
                }
            });
            children.push(child);
        }
        Ok(Workers {
            children,
            stdins,
            lines,
        })
    }

    /// One line of the given `event` from every worker.
    fn collect(&self, event: &str, timeout: Duration) -> Result<Vec<Value>, String> {
        let deadline = Instant::now() + timeout;
        let mut out: Vec<Option<Value>> = vec![None; self.children.len()];
        while out.iter().any(Option::is_none) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((index, value)) => {
                    if value["event"] == "fatal" {
                        return Err(format!(
                            "worker {index}: {}",
                            value["error"].as_str().unwrap_or("failed")
                        ));
                    }
                    if value["event"] == event {
                        out[index] = Some(value);
                    }
                }
                Err(_) => {
                    return Err(format!(
                        "timed out after {} s waiting for every worker's `{event}`",
                        timeout.as_secs()
                    ))
                }
            }
        }
        Ok(out.into_iter().map(Option::unwrap).collect())
    }

    /// With `--tls-resume`: waits until every worker has filled its session
    /// pool (their `primed` lines), returning how many full handshakes that
    /// took; the workers then wait for [`Workers::go`]. Without it: 0.
    fn primed(&self, common: &Common) -> Result<u64, String> {
        if !common.tls_resume {
            return Ok(0);
        }
        let primed = self.collect("primed", setup_timeout(common))?;
        Ok(sum_u64(&primed, "primed"))
    }

    /// Lets primed workers open their counted connections.
    fn go(&mut self, common: &Common) {
        if common.tls_resume {
            self.tell(&json!({"cmd": "go"}));
        }
    }

    /// Sends one command line to every worker.
    fn tell(&mut self, command: &Value) {
        let line = format!("{command}\n");
        for stdin in &mut self.stdins {
            let _ = stdin.write_all(line.as_bytes());
            let _ = stdin.flush();
        }
    }

    /// Tells every worker to stop and waits for them.
    fn stop(mut self) {
        self.tell(&json!({"cmd": "stop"}));
        self.stdins.clear();
        let deadline = Instant::now() + Duration::from_secs(20);
        for mut child in self.children {
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
    }
}

fn sum_u64(values: &[Value], field: &str) -> u64 {
    values.iter().map(|v| v[field].as_u64().unwrap_or(0)).sum()
}

fn sum_f64(values: &[Value], field: &str) -> f64 {
    values
        .iter()
        .map(|v| v[field].as_f64().unwrap_or(0.0))
        .sum()
}

fn min_u64(values: &[Value], field: &str) -> u64 {
    values
        .iter()
        .filter_map(|v| v[field].as_u64())
        .min()
        .unwrap_or(0)
}

fn max_u64(values: &[Value], field: &str) -> u64 {
    values
        .iter()
        .filter_map(|v| v[field].as_u64())
        .max()
        .unwrap_or(0)
}

fn first_error(values: &[Value]) -> Value {
    values
        .iter()
        .find_map(|v| {
            v["first_error"]
                .as_str()
                .map(|s| Value::from(s.to_string()))
        })
        .unwrap_or(Value::Null)
}

fn server_cpu_delta(before: Option<f64>, after: Option<f64>) -> Option<f64> {
    Some(after? - before?)
}

fn setup_timeout(common: &Common) -> Duration {
    Duration::from_secs(common.setup_timeout_s)
}

fn idle(common: Common, conns: usize, settle_ms: u64) -> Result<String, String> {
    let mut before = MemorySample::take(&common.server_pids());
    let mut server_cpu_before = process_cpu_seconds(&common.server_pids());
    let mut workers = Workers::spawn(&common, Mode::Idle, conns)?;
    if let Err(e) = workers.primed(&common) {
        workers.stop();
        return Err(e);
    }
    if common.tls_resume {
        // After the priming connections (closed), before the counted ones.
        before = MemorySample::take(&common.server_pids());
        server_cpu_before = process_cpu_seconds(&common.server_pids());
    }
    workers.go(&common);
    let ready = match workers.collect("ready", setup_timeout(&common)) {
        Ok(ready) => ready,
        Err(e) => {
            workers.stop();
            return Err(e);
        }
    };
    std::thread::sleep(Duration::from_millis(settle_ms));
    let after = MemorySample::take(&common.server_pids());
    let server_cpu_s = server_cpu_delta(
        server_cpu_before,
        process_cpu_seconds(&common.server_pids()),
    );
    let opened = sum_u64(&ready, "opened");
    let elapsed_ns = max_u64(&ready, "done_ns").saturating_sub(min_u64(&ready, "start_ns"));
    let cpu_s = sum_f64(&ready, "cpu_s");
    let per_conn = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) if opened > 0 => Value::from((b as f64 - a as f64) / opened as f64),
        _ => Value::Null,
    };
    let line = json!({
        "mode": "idle",
        "server_cpu_s": server_cpu_s,
        "target": common.label,
        "conns": conns,
        "opened": opened,
        "failed": sum_u64(&ready, "failed"),
        "first_error": first_error(&ready),
        "procs": ready.len(),
        "connect_rate_per_s": opened as f64 / (elapsed_ns.max(1) as f64 / 1e9),
        "server_rss_before_bytes": before.rss_bytes,
        "server_rss_after_bytes": after.rss_bytes,
        "server_rss_bytes_per_conn": per_conn(before.rss_bytes, after.rss_bytes),
        "sockstat_mem_bytes_per_conn": per_conn(before.sockstat_mem_bytes, after.sockstat_mem_bytes),
        "kernel_slab_bytes_per_conn_both_ends": per_conn(before.slab_bytes, after.slab_bytes),
        "client_cpu_s": cpu_s,
        "client_cpu_util": cpu_s / (elapsed_ns.max(1) as f64 / 1e9),
    });
    workers.stop();
    Ok(line.to_string())
}

fn storm(common: Common, conns: usize) -> Result<String, String> {
    let mut server_cpu_before = process_cpu_seconds(&common.server_pids());
    let mut workers = Workers::spawn(&common, Mode::Storm, conns)?;
    let primed = match workers.primed(&common) {
        Ok(primed) => primed,
        Err(e) => {
            workers.stop();
            return Err(e);
        }
    };
    if common.tls_resume {
        // The priming handshakes are not counted, nor their server CPU.
        server_cpu_before = process_cpu_seconds(&common.server_pids());
    }
    workers.go(&common);
    let ready = match workers.collect("ready", setup_timeout(&common)) {
        Ok(ready) => ready,
        Err(e) => {
            workers.stop();
            return Err(e);
        }
    };
    let opened = sum_u64(&ready, "opened");
    let elapsed_ns = max_u64(&ready, "done_ns").saturating_sub(min_u64(&ready, "start_ns"));
    let mut latency = Latency::new();
    for value in &ready {
        latency.merge_json(&value["latency_us"]);
    }
    let cpu_s = sum_f64(&ready, "cpu_s");
    let server_cpu_s = server_cpu_delta(
        server_cpu_before,
        process_cpu_seconds(&common.server_pids()),
    );
    let line = json!({
        "mode": "storm",
        "server_cpu_s": server_cpu_s,
        "server_cpu_us_per_upgrade": server_cpu_s.map(|s| s * 1e6 / opened.max(1) as f64),
        "target": common.label,
        "conns": conns,
        "inflight": common.inflight,
        "opened": opened,
        "failed": sum_u64(&ready, "failed"),
        "first_error": first_error(&ready),
        "procs": ready.len(),
        "upgrades_per_s": opened as f64 / (elapsed_ns.max(1) as f64 / 1e9),
        "tls_resumed": sum_u64(&ready, "tls_resumed"),
        "tls_full": sum_u64(&ready, "tls_full"),
        "tls_primed": primed,
        "connect_to_welcome_us": latency.summary(),
        "client_cpu_s": cpu_s,
        "client_cpu_util": cpu_s / (elapsed_ns.max(1) as f64 / 1e9),
    });
    print_before_stopping(&line, workers)
}

fn resume(
    common: Common,
    publish: PublishArgs,
    conns: usize,
    behind: u64,
    payload: usize,
) -> Result<String, String> {
    if behind == 0 {
        return Err("--behind must be at least 1".to_string());
    }
    let seqs = http::publish_once(
        &publish.admin_url,
        &publish.admin_token,
        &publish.org,
        behind as usize,
        payload,
    )?;
    let last = *seqs.last().ok_or("the publish returned no seqs")?;
    let after = last - behind;
    let server_cpu_before = process_cpu_seconds(&common.server_pids());
    let workers = Workers::spawn_resuming(&common, Mode::Resume, conns, Some(after), behind)?;
    let ready = match workers.collect("ready", setup_timeout(&common)) {
        Ok(ready) => ready,
        Err(e) => {
            workers.stop();
            return Err(e);
        }
    };
    let server_cpu_s = server_cpu_delta(
        server_cpu_before,
        process_cpu_seconds(&common.server_pids()),
    );
    let opened = sum_u64(&ready, "opened");
    let elapsed_ns = max_u64(&ready, "done_ns").saturating_sub(min_u64(&ready, "start_ns"));
    let mut latency = Latency::new();
    for value in &ready {
        latency.merge_json(&value["latency_us"]);
    }
    let cpu_s = sum_f64(&ready, "cpu_s");
    let line = json!({
        "mode": "resume",
        "target": common.label,
        "conns": conns,
        "behind": behind,
        "after": after,
        "inflight": common.inflight,
        "opened": opened,
        "failed": sum_u64(&ready, "failed"),
        "first_error": first_error(&ready),
        "procs": ready.len(),
        "server_cpu_s": server_cpu_s,
        "server_cpu_us_per_client": server_cpu_s.map(|s| s * 1e6 / opened.max(1) as f64),
        "resumes_per_s": opened as f64 / (elapsed_ns.max(1) as f64 / 1e9),
        "all_resumed_s": elapsed_ns as f64 / 1e9,
        "connect_to_replayed_us": latency.summary(),
        "client_cpu_s": cpu_s,
        "client_cpu_util": cpu_s / (elapsed_ns.max(1) as f64 / 1e9),
    });
    print_before_stopping(&line, workers)
}

/// Prints the result line, then closes the connections: a profiler of the
/// server stopped at the line (`perf stat`, `perf record`) then leaves
/// their teardown out.
fn print_before_stopping(line: &Value, workers: Workers) -> Result<String, String> {
    println!("{line}");
    let _ = std::io::stdout().flush();
    workers.stop();
    Ok(String::new())
}

/// What a fan-out run offers.
struct FanoutPlan {
    subs: usize,
    rate: f64,
    payload: usize,
    duration_s: f64,
    batch: usize,
    publishers: usize,
    drain_s: f64,
    probe_ms: u64,
}

fn fanout(common: Common, publish: PublishArgs, plan: FanoutPlan) -> Result<String, String> {
    if plan.rate <= 0.0 || plan.duration_s <= 0.0 {
        return Err("--rate and --duration must be positive".to_string());
    }
    let mut workers = Workers::spawn(&common, Mode::Fanout, plan.subs)?;
    if let Err(e) = workers.primed(&common) {
        workers.stop();
        return Err(e);
    }
    workers.go(&common);
    let ready = match workers.collect("ready", setup_timeout(&common)) {
        Ok(ready) => ready,
        Err(e) => {
            workers.stop();
            return Err(e);
        }
    };
    let subscribed = sum_u64(&ready, "opened");
    if subscribed < plan.subs as u64 {
        let error = first_error(&ready);
        workers.stop();
        return Err(format!(
            "only {subscribed} of {} subscribers connected: {error}",
            plan.subs
        ));
    }
    let probe = if plan.probe_ms > 0 {
        let separator = if common.url.contains('?') { '&' } else { '?' };
        let url = format!("{}{separator}token={}", common.url, common.token);
        match probe::Probe::start(&url, Duration::from_millis(plan.probe_ms)) {
            Ok(probe) => Some(probe),
            Err(e) => {
                workers.stop();
                return Err(e);
            }
        }
    } else {
        None
    };
    let rss_before = MemorySample::take(&common.server_pids()).rss_bytes;
    let server_cpu_before = process_cpu_seconds(&common.server_pids());
    let cpu_before = cpu_seconds();
    if let Some(path) = &publish.data_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--data-file {}: {e}", path.display()))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| format!("--data-file: {e}"))?;
        let _ = http::SAMPLE.set(value.to_string());
    }
    let outcome = http::publish_for(
        &publish.admin_url,
        &publish.admin_token,
        &publish.org,
        plan.rate,
        plan.batch,
        plan.payload,
        Duration::from_secs_f64(plan.duration_s),
        plan.publishers,
    );
    let publisher_cpu_s = cpu_seconds() - cpu_before;
    let probe_rtt = match probe.map(probe::Probe::finish) {
        None => Value::Null,
        Some(Ok(rtt)) => rtt.summary(),
        Some(Err(e)) => {
            workers.stop();
            return Err(e);
        }
    };
    let outcome = match outcome {
        Ok(outcome) => outcome,
        Err(e) => {
            workers.stop();
            return Err(format!("publisher: {e}"));
        }
    };
    workers.tell(&json!({
        "cmd": "finish",
        "expected_per_sub": outcome.accepted,
        "deadline_ms": (plan.drain_s * 1000.0) as u64,
    }));
    let results = match workers.collect("result", Duration::from_secs_f64(plan.drain_s + 30.0)) {
        Ok(results) => results,
        Err(e) => {
            workers.stop();
            return Err(e);
        }
    };
    let rss_after = MemorySample::take(&common.server_pids()).rss_bytes;
    let server_cpu_s = server_cpu_delta(
        server_cpu_before,
        process_cpu_seconds(&common.server_pids()),
    );
    workers.stop();

    let expected = outcome.accepted * plan.subs as u64;
    let received = sum_u64(&results, "received");
    let last_receive_ns = max_u64(&results, "last_receive_ns");
    // First publish → last receive; the publishing time when nothing arrived.
    let window_ns = match last_receive_ns.saturating_sub(outcome.first_send_ns) {
        0 => outcome.elapsed.as_nanos() as u64,
        ns => ns,
    };
    let window_s = window_ns.max(1) as f64 / 1e9;
    let mut latency = Latency::new();
    for value in &results {
        latency.merge_json(&value["latency_us"]);
    }
    let worker_cpu_s = sum_f64(&results, "cpu_s");
    let client_cpu_s = worker_cpu_s + publisher_cpu_s;
    let lost = expected.saturating_sub(received);
    let protocol_errors = sum_u64(&results, "protocol_errors");
    let line = json!({
        "mode": "fanout",
        "target": common.label,
        "subs": plan.subs,
        "rate": plan.rate,
        "payload": plan.payload,
        "batch": plan.batch,
        "publishers": plan.publishers,
        "duration_s": plan.duration_s,
        "procs": results.len(),
        "published": outcome.accepted,
        "publish_requests": outcome.requests,
        "publish_errors": outcome.errors,
        "publish_first_error": outcome.first_error,
        "publish_rate_achieved": outcome.accepted as f64 / outcome.elapsed.as_secs_f64(),
        "publish_request_us": outcome.request_us.summary(),
        "expected": expected,
        "received": received,
        "lost": lost,
        "duplicates": sum_u64(&results, "duplicates"),
        "gaps": sum_u64(&results, "gaps"),
        "closed_early": sum_u64(&results, "closed"),
        "first_close": results.iter().find_map(|v| v["first_close"].as_str()),
        "protocol_errors": protocol_errors,
        "zero_loss": lost == 0 && outcome.errors == 0 && received == expected && protocol_errors == 0,
        "delivered_per_s": received as f64 / window_s,
        "latency_us": latency.summary(),
        "probe_rtt_us": probe_rtt,
        "server_rss_before_bytes": rss_before,
        "server_rss_after_bytes": rss_after,
        "server_cpu_s": server_cpu_s,
        "server_cpu_util": server_cpu_s.map(|s| s / window_s),
        "server_cpu_ns_per_delivery": server_cpu_s.filter(|_| received > 0).map(|s| s * 1e9 / received as f64),
        "client_cpu_s": client_cpu_s,
        "client_cpu_util": client_cpu_s / window_s,
        "client_cpu_ns_per_delivery": if received > 0 { client_cpu_s * 1e9 / received as f64 } else { 0.0 },
        "window_s": window_s,
    });
    Ok(line.to_string())
}
