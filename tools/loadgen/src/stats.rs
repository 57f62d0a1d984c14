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

/// User + system CPU seconds the server's processes `pids` (all their
/// threads; a TLS terminator in front of the server is one more) have used,
/// from /proc/PID/stat: the server's own cost, which stays meaningful when
/// other users' processes compete for its core. `None` without pids.
pub fn process_cpu_seconds(pids: &[u32]) -> Option<f64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&pid| one_process_cpu_seconds(pid)).sum()
}

fn one_process_cpu_seconds(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
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
    /// VmRSS of the server's processes, summed.
    pub rss_bytes: Option<u64>,
    /// `TCP: … mem N` of /proc/net/sockstat (pages of socket buffers).
    pub sockstat_mem_bytes: Option<u64>,
    /// `Slab:` of /proc/meminfo (socket, file and inode objects live here).
    pub slab_bytes: Option<u64>,
}

impl MemorySample {
    pub fn take(server_pids: &[u32]) -> MemorySample {
        let rss_bytes = if server_pids.is_empty() {
            None
        } else {
            server_pids
                .iter()
                .map(|pid| {
                    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
                    field_kib(&status, "VmRSS:").map(|k| k * 1024)
                })
                .sum()
        };
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
/// `reader_cpu`: when set, a reader thread pinned to that CPU drains the
/// client ends as data arrives (waiting in epoll when there is none, as a
/// subscriber does), so each send also pays for waking it; otherwise the
/// client ends are drained after each round, with nobody waiting.
pub fn sendcost(
    sockets: usize,
    bytes: usize,
    rounds: usize,
    reader_cpu: Option<usize>,
) -> Result<String, String> {
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
    let received = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (reader, mut clients) = match reader_cpu {
        Some(cpu) => (
            Some(spawn_reader(clients, cpu, received.clone())?),
            Vec::new(),
        ),
        None => (None, clients),
    };
    let mut drain = vec![0u8; 1 << 16];
    for round in 0..rounds {
        let sys_before = thread_system_seconds();
        let cpu_before = thread_cpu_seconds();
        let start = Instant::now();
        for server in &mut servers {
            server.write_all(&payload).map_err(|e| e.to_string())?;
        }
        let elapsed = start.elapsed();
        let sys = thread_system_seconds() - sys_before;
        let cpu = thread_cpu_seconds() - cpu_before;
        cpu_per_send_ns.push(cpu * 1e9 / sockets as f64);
        per_send_ns.push(elapsed.as_nanos() as f64 / sockets as f64);
        sys_per_send_ns.push(sys * 1e9 / sockets as f64);
        if reader.is_some() {
            // Let the reader catch up, so every round starts with it asleep.
            let want = (round + 1) * sockets * bytes;
            let deadline = Instant::now() + std::time::Duration::from_secs(10);
            while received.load(std::sync::atomic::Ordering::Relaxed) < want {
                if Instant::now() > deadline {
                    return Err("the reader thread fell behind by 10 s".to_string());
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
            continue;
        }
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
    drop(servers);
    if let Some(reader) = reader {
        reader
            .join()
            .map_err(|_| "reader thread panicked".to_string())??;
    }
    per_send_ns.sort_by(f64::total_cmp);
    sys_per_send_ns.sort_by(f64::total_cmp);
    cpu_per_send_ns.sort_by(f64::total_cmp);
    Ok(json!({
        "mode": "sendcost",
        "sockets": sockets,
        "bytes": bytes,
        "rounds": rounds,
        "reader_cpu": reader_cpu,
        "send_ns_median": per_send_ns[per_send_ns.len() / 2],
        "send_ns_min": per_send_ns[0],
        "send_sys_ns_median": sys_per_send_ns[sys_per_send_ns.len() / 2],
        "send_cpu_ns_median": cpu_per_send_ns[cpu_per_send_ns.len() / 2],
    })
    .to_string())
}

/// A thread pinned to `cpu` that reads every client end through one epoll
/// set until all of them reach EOF, adding the bytes read to `received`.
fn spawn_reader(
    clients: Vec<TcpStream>,
    cpu: usize,
    received: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> Result<std::thread::JoinHandle<Result<(), String>>, String> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: plain syscalls on descriptors this function owns; the event
    // array outlives each epoll_wait.
    let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if epoll < 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    for (i, client) in clients.iter().enumerate() {
        let mut event = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: i as u64,
        };
        if unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, client.as_raw_fd(), &mut event) }
            < 0
        {
            return Err(std::io::Error::last_os_error().to_string());
        }
    }
    Ok(std::thread::spawn(move || {
        let mut clients = clients;
        // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes into it.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(format!("cannot pin the reader to CPU {cpu}"));
            }
        }
        let mut open = clients.len();
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
        let mut buffer = vec![0u8; 1 << 16];
        while open > 0 {
            let ready = unsafe {
                libc::epoll_wait(epoll, events.as_mut_ptr(), events.len() as i32, 10_000)
            };
            if ready < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e.to_string());
            }
            if ready == 0 {
                return Err("the reader saw nothing for 10 s".to_string());
            }
            for event in &events[..ready as usize] {
                let client = &mut clients[event.u64 as usize];
                loop {
                    match client.read(&mut buffer) {
                        Ok(0) => {
                            unsafe {
                                libc::epoll_ctl(
                                    epoll,
                                    libc::EPOLL_CTL_DEL,
                                    client.as_raw_fd(),
                                    std::ptr::null_mut(),
                                )
                            };
                            open -= 1;
                            break;
                        }
                        Ok(n) => {
                            received.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e.to_string()),
                    }
                }
            }
        }
        unsafe { libc::close(epoll) };
        Ok(())
    }))
}

/// User + system CPU seconds of the calling thread.
fn thread_cpu_seconds() -> f64 {
    let usage = thread_usage();
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// System CPU seconds of the calling thread.
fn thread_system_seconds() -> f64 {
    let usage = thread_usage();
    usage.ru_stime.tv_sec as f64 + usage.ru_stime.tv_usec as f64 / 1e6
}

fn thread_usage() -> libc::rusage {
    // SAFETY: getrusage writes into the zeroed stack struct.
    unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_THREAD, &mut usage);
        usage
    }
}
