//! Clocks, CPU time, latency histograms, memory samples of the server, and
//! the loopback send-cost probe.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// CLOCK_MONOTONIC in nanoseconds: one clock for every process on the box,
/// so a send time stamped by the publisher can be compared with a receive
/// time taken in a worker process.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the stack struct.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// User + system CPU seconds this process has used (getrusage).
pub fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the zeroed stack struct.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// User + system CPU seconds process `pid` (all its threads) has used,
/// from /proc/PID/stat: the server's own cost, which stays meaningful when
/// other users' processes compete for its core.
pub fn process_cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{}/stat", pid?)).ok()?;
    // Fields after the command name (which may hold spaces) start at state.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((utime + stime) / ticks)
}

/// A latency histogram in microseconds (1 µs .. 10 minutes, 3 digits).
pub struct Latency {
    histogram: Histogram<u64>,
}

impl Latency {
    pub fn new() -> Latency {
        Latency {
            histogram: Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds"),
        }
    }

    pub fn record(&mut self, micros: u64) {
        self.histogram.saturating_record(micros.max(1));
    }

    pub fn add(&mut self, other: &Latency) {
        let _ = self.histogram.add(&other.histogram);
    }

    /// Every recorded value and its count, for the coordinator to merge.
    pub fn to_json(&self) -> Value {
        let pairs: Vec<[u64; 2]> = self
            .histogram
            .iter_recorded()
            .map(|v| [v.value_iterated_to(), v.count_at_value()])
            .collect();
        Value::from(pairs.iter().map(|p| json!(p)).collect::<Vec<_>>())
    }

    pub fn merge_json(&mut self, value: &Value) {
        let Some(pairs) = value.as_array() else {
            return;
        };
        for pair in pairs {
            let (Some(v), Some(n)) = (pair[0].as_u64(), pair[1].as_u64()) else {
                continue;
            };
            let _ = self.histogram.record_n(v.max(1), n);
        }
    }

    /// Percentiles in microseconds.
    pub fn summary(&self) -> Value {
        if self.histogram.is_empty() {
            return json!({"count": 0});
        }
        let h = &self.histogram;
        json!({
            "count": h.len(),
            "min": h.min(),
            "p50": h.value_at_quantile(0.50),
            "p90": h.value_at_quantile(0.90),
            "p99": h.value_at_quantile(0.99),
            "p999": h.value_at_quantile(0.999),
            "max": h.max(),
            "mean": h.mean(),
        })
    }
}

/// The server's and the kernel's memory at one moment.
pub struct MemorySample {
    /// VmRSS of the server process.
    pub rss_bytes: Option<u64>,
    /// `TCP: … mem N` of /proc/net/sockstat (pages of socket buffers).
    pub sockstat_mem_bytes: Option<u64>,
    /// `Slab:` of /proc/meminfo (socket, file and inode objects live here).
    pub slab_bytes: Option<u64>,
}

impl MemorySample {
    pub fn take(server_pid: Option<u32>) -> MemorySample {
        let rss_bytes = server_pid.and_then(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            field_kib(&status, "VmRSS:").map(|k| k * 1024)
        });
        let sockstat_mem_bytes =
            std::fs::read_to_string("/proc/net/sockstat")
                .ok()
                .and_then(|text| {
                    let line = text.lines().find(|l| l.starts_with("TCP:"))?;
                    let mut words = line.split_whitespace();
                    while let Some(word) = words.next() {
                        if word == "mem" {
                            return words.next()?.parse::<u64>().ok().map(|p| p * 4096);
                        }
                    }
                    None
                });
        let slab_bytes = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|text| field_kib(&text, "Slab:").map(|k| k * 1024));
        MemorySample {
            rss_bytes,
            sockstat_mem_bytes,
            slab_bytes,
        }
    }
}

fn field_kib(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    line[name.len()..].split_whitespace().next()?.parse().ok()
}

/// Writes `bytes` to each of `sockets` loopback TCP connections in turn
/// (nobody reading meanwhile, so no send ever blocks), `rounds` times, and
/// reports the wall, system and CPU (user + system) time of one send. Run it
/// pinned to the server's core: it is the floor under "one event to N
/// sockets". The CPU time is the figure to use when other processes share
/// that core (wall time then includes their turns); rusage ticks are coarse,
/// so use enough sockets per round (2,000 sends ≈ 15 ms).
pub fn sendcost(sockets: usize, bytes: usize, rounds: usize) -> Result<String, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let mut clients = Vec::with_capacity(sockets);
    let mut servers = Vec::with_capacity(sockets);
    for _ in 0..sockets {
        let client = TcpStream::connect(addr).map_err(|e| e.to_string())?;
        let (server, _) = listener.accept().map_err(|e| e.to_string())?;
        server.set_nodelay(true).map_err(|e| e.to_string())?;
        client.set_nonblocking(true).map_err(|e| e.to_string())?;
        clients.push(client);
        servers.push(server);
    }
    let payload = vec![b'x'; bytes];
    let mut per_send_ns = Vec::with_capacity(rounds);
    let mut sys_per_send_ns = Vec::with_capacity(rounds);
    let mut cpu_per_send_ns = Vec::with_capacity(rounds);
    let mut drain = vec![0u8; 1 << 16];
    for _ in 0..rounds {
        let sys_before = system_seconds();
        let cpu_before = cpu_seconds();
        let start = Instant::now();
        for server in &mut servers {
            server.write_all(&payload).map_err(|e| e.to_string())?;
        }
        let elapsed = start.elapsed();
        let sys = system_seconds() - sys_before;
        let cpu = cpu_seconds() - cpu_before;
        cpu_per_send_ns.push(cpu * 1e9 / sockets as f64);
        per_send_ns.push(elapsed.as_nanos() as f64 / sockets as f64);
        sys_per_send_ns.push(sys * 1e9 / sockets as f64);
        for client in &mut clients {
            let mut got = 0;
            while got < bytes {
                match client.read(&mut drain) {
                    Ok(0) => return Err("loopback peer closed".to_string()),
                    Ok(n) => got += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::yield_now()
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
        }
    }
    per_send_ns.sort_by(f64::total_cmp);
    sys_per_send_ns.sort_by(f64::total_cmp);
    cpu_per_send_ns.sort_by(f64::total_cmp);
    Ok(json!({
        "mode": "sendcost",
        "sockets": sockets,
        "bytes": bytes,
        "rounds": rounds,
        "send_ns_median": per_send_ns[per_send_ns.len() / 2],
        "send_ns_min": per_send_ns[0],
        "send_sys_ns_median": sys_per_send_ns[sys_per_send_ns.len() / 2],
        "send_cpu_ns_median": cpu_per_send_ns[cpu_per_send_ns.len() / 2],
    })
    .to_string())
}

fn system_seconds() -> f64 {
    // SAFETY: getrusage writes into the zeroed stack struct.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    usage.ru_stime.tv_sec as f64 + usage.ru_stime.tv_usec as f64 / 1e6
}
