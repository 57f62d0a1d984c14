//! Measures a hot upgrade against a plain restart (issue 15): with N idle
//! subscribed connections and a few probe subscribers receiving a steady
//! stream, how long the handover takes, and the longest pause a probe sees
//! between two messages; for a restart, how long until every client has
//! reconnected and resumed (`subscribe` with `after`), the same pause, and
//! the new server's CPU time until then.
//!
//! It starts its own server from a copy of the binary (which it replaces
//! for the upgrade) and drives it over loopback from several source
//! addresses:
//!
//! ```sh
//! cargo build --release --bin hookstream --example upgrade_bench
//! target/release/examples/upgrade_bench --conns 10000 --mode upgrade
//! target/release/examples/upgrade_bench --conns 10000 --mode restart
//! ```

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Options {
    binary: PathBuf,
    conns: usize,
    probes: usize,
    rate: u64,
    shards: usize,
    mode: String,
    /// Print the servers' log lines at the end.
    server_log: bool,
}

fn parse_options() -> Options {
    let mut options = Options {
        binary: PathBuf::from("target/release/hookstream"),
        conns: 10_000,
        probes: 20,
        rate: 200,
        // One org lives on one shard, whose share of the open-files
        // budget must hold every connection.
        shards: 1,
        mode: "upgrade".to_string(),
        server_log: false,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let value = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--binary" => options.binary = PathBuf::from(value),
            "--conns" => options.conns = value.parse().expect("--conns N"),
            "--probes" => options.probes = value.parse().expect("--probes N"),
            "--rate" => options.rate = value.parse().expect("--rate MSGS_PER_SEC"),
            "--shards" => options.shards = value.parse().expect("--shards N"),
            "--mode" => options.mode = value,
            "--server-log" => {
                options.server_log = true;
                i += 1;
                continue;
            }
            other => panic!("unknown option {other}"),
        }
        i += 2;
    }
    options
}

/// Source addresses, 127.0.0.2 on: one source address and port pair per
/// connection, so many addresses keep clear of the ephemeral port range.
fn source(i: usize) -> [u8; 4] {
    [127, 0, (2 + i / 20_000) as u8, (2 + i % 200) as u8]
}

fn connect_from(source: [u8; 4], addr: SocketAddr) -> std::io::Result<TcpStream> {
    // SAFETY: a fresh socket, bound, connected, then owned by the stream.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        let mut local: libc::sockaddr_in = std::mem::zeroed();
        local.sin_family = libc::AF_INET as u16;
        local.sin_addr.s_addr = u32::from_ne_bytes(source);
        if libc::bind(
            fd,
            (&local as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        let SocketAddr::V4(v4) = addr else {
            panic!("IPv4 only")
        };
        let mut remote: libc::sockaddr_in = std::mem::zeroed();
        remote.sin_family = libc::AF_INET as u16;
        remote.sin_port = v4.port().to_be();
        remote.sin_addr.s_addr = u32::from_ne_bytes(v4.ip().octets());
        if libc::connect(
            fd,
            (&remote as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x80 | opcode];
    let mask = [1, 2, 3, 4];
    if payload.len() < 126 {
        frame.push(0x80 | payload.len() as u8);
    } else {
        frame.push(0x80 | 126);
        frame.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

fn next_frame(buffer: &mut Vec<u8>) -> Option<(u8, Vec<u8>)> {
    if buffer.len() < 2 {
        return None;
    }
    let opcode = buffer[0] & 0x0f;
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

/// A subscribed connection: (stream, bytes read past the last frame).
struct Conn {
    stream: TcpStream,
    buffer: Vec<u8>,
    channel: &'static str,
    last_seq: u64,
}

fn read_text(conn: &mut Conn) -> std::io::Result<serde_json::Value> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some((opcode, payload)) = next_frame(&mut conn.buffer) {
            if opcode == 1 {
                return Ok(serde_json::from_slice(&payload).expect("JSON"));
            }
            continue;
        }
        let n = conn.stream.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        conn.buffer.extend_from_slice(&chunk[..n]);
    }
}

/// Upgrades and subscribes (with `after` when resuming); returns once the
/// `subscribed` reply arrived.
fn open(
    i: usize,
    addr: SocketAddr,
    key: &str,
    channel: &'static str,
    after: Option<u64>,
) -> std::io::Result<Conn> {
    let mut stream = connect_from(source(i), addr)?;
    let request = format!(
        "GET /v1/ws?token={key} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes())?;
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buffer.extend_from_slice(&chunk[..n]);
    };
    if !buffer.starts_with(b"HTTP/1.1 101") {
        return Err(std::io::Error::other(
            String::from_utf8_lossy(&buffer[..end]).into_owned(),
        ));
    }
    buffer.drain(..end);
    let mut conn = Conn {
        stream,
        buffer,
        channel,
        last_seq: 0,
    };
    let welcome = read_text(&mut conn)?;
    conn.last_seq = after.unwrap_or(welcome["seq"].as_u64().unwrap_or(0));
    let subscribe = match after {
        Some(after) => {
            format!(r#"{{"type":"subscribe","channel":"{channel}","after":{after}}}"#)
        }
        None => format!(r#"{{"type":"subscribe","channel":"{channel}"}}"#),
    };
    conn.stream
        .write_all(&client_frame(1, subscribe.as_bytes()))?;
    loop {
        let reply = read_text(&mut conn)?;
        if reply["type"] == "subscribed" {
            break;
        }
        // Replayed messages may come first only after the reply; anything
        // else is kept for the reader by seq.
        if let Some(seq) = reply["seq"].as_u64() {
            conn.last_seq = conn.last_seq.max(seq);
        }
    }
    Ok(conn)
}

/// Arrival times of the probes' events: (probe, seq, when).
type Arrivals = Arc<Mutex<Vec<(usize, u64, Instant)>>>;

/// Reads the probes (and keeps the idle connections drained) until
/// `stop`; returns the connections with their last seqs.
fn reader(
    mut conns: Vec<Conn>,
    probes: usize,
    arrivals: Arrivals,
    stop: Arc<AtomicBool>,
    closed: Arc<AtomicU64>,
) -> std::thread::JoinHandle<Vec<Conn>> {
    std::thread::spawn(move || {
        // SAFETY: an epoll set owned here.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        for (i, conn) in conns.iter().enumerate() {
            conn.stream.set_nonblocking(true).unwrap();
            let mut event = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: i as u64,
            };
            // SAFETY: registering our socket.
            unsafe {
                libc::epoll_ctl(
                    epoll,
                    libc::EPOLL_CTL_ADD,
                    conn.stream.as_raw_fd(),
                    &mut event,
                )
            };
        }
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 512];
        let mut chunk = vec![0u8; 65536];
        let mut gone = vec![false; conns.len()];
        while !stop.load(Ordering::SeqCst) {
            // SAFETY: as above.
            let ready = unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), 512, 5) };
            for event in &events[..ready.max(0) as usize] {
                let i = event.u64 as usize;
                let conn = &mut conns[i];
                loop {
                    match conn.stream.read(&mut chunk) {
                        Ok(0) => {
                            if !gone[i] {
                                gone[i] = true;
                                closed.fetch_add(1, Ordering::SeqCst);
                                let mut none = libc::epoll_event { events: 0, u64: 0 };
                                // SAFETY: as above.
                                unsafe {
                                    libc::epoll_ctl(
                                        epoll,
                                        libc::EPOLL_CTL_DEL,
                                        conn.stream.as_raw_fd(),
                                        &mut none,
                                    )
                                };
                            }
                            break;
                        }
                        Ok(n) => conn.buffer.extend_from_slice(&chunk[..n]),
                        Err(_) => break,
                    }
                }
                let now = Instant::now();
                while let Some((opcode, payload)) = next_frame(&mut conn.buffer) {
                    match opcode {
                        1 => {
                            let value: serde_json::Value =
                                serde_json::from_slice(&payload).unwrap();
                            if let Some(seq) = value["seq"].as_u64() {
                                conn.last_seq = conn.last_seq.max(seq);
                                if i < probes {
                                    arrivals.lock().unwrap().push((i, seq, now));
                                }
                            }
                        }
                        9 => {
                            let _ = conn.stream.write_all(&client_frame(10, &payload));
                        }
                        8 => {
                            // Answer the close (a well-behaved client), so
                            // a draining server need not wait out its
                            // linger.
                            let _ = conn
                                .stream
                                .write_all(&client_frame(8, &payload[..payload.len().min(2)]));
                        }
                        _ => {}
                    }
                }
            }
        }
        // SAFETY: our epoll set.
        unsafe { libc::close(epoll) };
        for conn in &conns {
            conn.stream.set_nonblocking(false).unwrap();
        }
        conns
    })
}

fn publisher(
    admin: SocketAddr,
    token: String,
    rate: u64,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(u64, u64)> {
    std::thread::spawn(move || {
        let start = Instant::now();
        let (mut sent, mut failed) = (0u64, 0u64);
        while !stop.load(Ordering::SeqCst) {
            let body = format!(
                r#"{{"org_id":"bench","type":"event","data":{{"id":"e_{sent}","source_id":"s"}}}}"#
            );
            let request = format!(
                "POST /v1/publish HTTP/1.1\r\nHost: {admin}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let ok = (|| {
                let mut stream =
                    TcpStream::connect_timeout(&admin, Duration::from_secs(10)).ok()?;
                stream
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .ok()?;
                stream.write_all(request.as_bytes()).ok()?;
                let mut answer = Vec::new();
                let _ = stream.read_to_end(&mut answer);
                Some(answer.starts_with(b"HTTP/1.1 202"))
            })();
            if ok != Some(true) {
                failed += 1;
            }
            sent += 1;
            let due = start + Duration::from_micros(sent * 1_000_000 / rate);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
        (sent, failed)
    })
}

struct Server {
    child: Child,
    ws: SocketAddr,
    admin: SocketAddr,
    lines: Arc<Mutex<Vec<String>>>,
}

fn start_server(
    exe: &Path,
    data: &Path,
    listen: &str,
    admin_listen: &str,
    shards: usize,
    conns: usize,
) -> Server {
    let mut command = Command::new(exe);
    // SAFETY: prctl only touches the child: a bench that panics takes
    // its server with it (an upgraded server is not its child; the bench
    // kills that one itself).
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = command
        .args(["serve", "--data-dir"])
        .arg(data)
        .args([
            "--listen",
            listen,
            "--admin-listen",
            admin_listen,
            "--shards",
            &shards.to_string(),
            "--upgrades-per-ip-per-sec",
            "0",
            "--http-connections-per-ip",
            "0",
            "--connections-per-org",
            &(conns + 1000).to_string(),
            "--durability",
            "none",
            "--heartbeat-ms",
            "60000",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the server");
    let stderr = child.stderr.take().unwrap();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let lines = lines.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("hookstream listening on ") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(line.clone());
                    }
                }
                lines.lock().unwrap().push(line);
            }
        });
    }
    let line = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("no listening line: {:?}", lines.lock().unwrap()));
    let rest = line.strip_prefix("hookstream listening on ws://").unwrap();
    let (ws, rest) = rest.split_once("/v1/ws (admin http://").unwrap();
    let (admin, _) = rest.split_once(')').unwrap();
    Server {
        child,
        ws: ws.parse().unwrap(),
        admin: admin.parse().unwrap(),
        lines,
    }
}

/// CPU seconds (user + system) process `pid` used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // SAFETY: sysconf is a plain query.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after ')'.
    (ticks(11) + ticks(12)) / hz
}

/// Major page faults (pages read from disk, the binary's code among them)
/// process `pid` took so far: field 12 of `/proc/PID/stat`.
fn major_faults(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    after
        .split_whitespace()
        .nth(9)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Longest gap between two consecutive arrivals at any probe within
/// `window`, and whether every probe got consecutive seqs (once each).
fn longest_pause(
    arrivals: &[(usize, u64, Instant)],
    window: (Instant, Instant),
) -> (Duration, bool) {
    let mut by_probe: HashMap<usize, Vec<(u64, Instant)>> = HashMap::new();
    for (probe, seq, at) in arrivals {
        by_probe.entry(*probe).or_default().push((*seq, *at));
    }
    let mut longest = Duration::ZERO;
    let mut exact = true;
    for list in by_probe.values() {
        for pair in list.windows(2) {
            if pair[1].0 != pair[0].0 + 1 {
                exact = false;
            }
            if pair[1].1 >= window.0 && pair[0].1 <= window.1 {
                longest = longest.max(pair[1].1 - pair[0].1);
            }
        }
    }
    (longest, exact)
}

fn main() {
    let options = parse_options();
    let dir = std::env::temp_dir().join(format!("hookstream-upgrade-bench-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    let exe = dir.join("bin/hookstream");
    std::fs::copy(&options.binary, &exe).expect("copy the binary");
    let data = dir.join("data");
    let output = Command::new(&exe)
        .args([
            "api-keys",
            "create",
            "--name",
            "bench",
            "--org",
            "bench",
            "--data-dir",
        ])
        .arg(&data)
        .output()
        .expect("create a key");
    let key = String::from_utf8(output.stdout).unwrap().trim().to_string();
    let mut server = start_server(
        &exe,
        &data,
        "127.0.0.1:0",
        "127.0.0.1:0",
        options.shards,
        options.conns,
    );
    let token = std::fs::read_to_string(data.join("admin-token"))
        .unwrap()
        .trim()
        .to_string();
    let opening = Instant::now();
    let mut conns = Vec::with_capacity(options.conns + options.probes);
    for i in 0..options.probes {
        conns.push(open(i, server.ws, &key, "events", None).expect("open a probe"));
    }
    for i in 0..options.conns {
        conns.push(
            open(options.probes + i, server.ws, &key, "issues", None).expect("open a connection"),
        );
    }
    eprintln!(
        "{} idle connections and {} probes open in {:?}",
        options.conns,
        options.probes,
        opening.elapsed()
    );
    let arrivals: Arrivals = Arc::new(Mutex::new(Vec::new()));
    let stop_reading = Arc::new(AtomicBool::new(false));
    let closed = Arc::new(AtomicU64::new(0));
    let reading = reader(
        conns,
        options.probes,
        arrivals.clone(),
        stop_reading.clone(),
        closed.clone(),
    );
    let stop_publishing = Arc::new(AtomicBool::new(false));
    let publishing = publisher(
        server.admin,
        token.clone(),
        options.rate,
        stop_publishing.clone(),
    );
    std::thread::sleep(Duration::from_secs(2));

    let old_pid = server.child.id();
    let begin = Instant::now();
    let end;
    match options.mode.as_str() {
        "upgrade" => {
            let temporary = dir.join("bin/hookstream.new");
            std::fs::copy(&options.binary, &temporary).unwrap();
            std::fs::rename(&temporary, &exe).unwrap();
            let cpu_before = cpu_seconds(old_pid);
            let faults_before = major_faults(old_pid);
            let started = Instant::now();
            let status = Command::new(&exe)
                .args(["upgrade", "--data-dir"])
                .arg(&data)
                .status()
                .expect("run hookstream upgrade");
            end = Instant::now();
            let cpu_old = cpu_seconds(old_pid) - cpu_before;
            let faults_old = major_faults(old_pid).saturating_sub(faults_before);
            assert!(
                status.success(),
                "upgrade failed: {:?}",
                server.lines.lock().unwrap()
            );
            let new_pid: u32 = std::fs::read_to_string(data.join("hookstream.pid"))
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            let cpu_new = cpu_seconds(new_pid);
            println!(
                "upgrade: major page faults (pages read from disk): old process {faults_old} during it, new process {} from its start",
                major_faults(new_pid)
            );
            println!(
                "upgrade: {} connections handed over; `hookstream upgrade` took {:?}; CPU: old process {:.3} s during it (until it exited or was sampled), new process {:.3} s from its start",
                options.conns + options.probes,
                end - started,
                cpu_old,
                cpu_new
            );
            let _ = server.child.wait();
            let frozen = server
                .lines
                .lock()
                .unwrap()
                .iter()
                .find_map(|l| {
                    let (_, rest) = l.split_once("frozen for ")?;
                    Some(rest.split_once(" ms")?.0.to_string())
                })
                .unwrap_or_else(|| "?".to_string());
            println!("upgrade: the old process reports the shards frozen for {frozen} ms (freeze to the new process serving)");
            std::thread::sleep(Duration::from_secs(2));
            stop_publishing.store(true, Ordering::SeqCst);
            let (sent, failed) = publishing.join().unwrap();
            std::thread::sleep(Duration::from_millis(500));
            stop_reading.store(true, Ordering::SeqCst);
            let _conns = reading.join().unwrap();
            let (pause, exact) = longest_pause(&arrivals.lock().unwrap(), (begin, end));
            println!(
                "upgrade: longest pause between two messages at a probe ({} probes, {} msg/s): {:?}; every probe got every seq once, in order: {exact}; publishes {sent}, not 202: {failed}; connections closed: {}",
                options.probes,
                options.rate,
                pause,
                closed.load(Ordering::SeqCst)
            );
            // SAFETY: stop the new server.
            unsafe { libc::kill(new_pid as i32, libc::SIGKILL) };
            if options.server_log {
                for line in server.lines.lock().unwrap().iter() {
                    println!("server: {line}");
                }
            }
        }
        _ => {
            let listen = server.ws.to_string();
            let admin_listen = server.admin.to_string();
            // SAFETY: SIGTERM to our server.
            unsafe { libc::kill(old_pid as i32, libc::SIGTERM) };
            let _ = server.child.wait();
            stop_reading.store(true, Ordering::SeqCst);
            let conns = reading.join().unwrap();
            let restarted = Instant::now();
            server = start_server(
                &exe,
                &data,
                &listen,
                &admin_listen,
                options.shards,
                options.conns,
            );
            let new_pid = server.child.id();
            // Every client reconnects and resumes from its last seq, on
            // eight threads.
            let resume: Vec<(usize, &'static str, u64)> = conns
                .iter()
                .enumerate()
                .map(|(i, c)| (i, c.channel, c.last_seq))
                .collect();
            drop(conns);
            let resume = Arc::new(resume);
            let next = Arc::new(AtomicU64::new(0));
            let reopened: Arc<Mutex<Vec<(usize, Conn)>>> = Arc::new(Mutex::new(Vec::new()));
            let threads: Vec<_> = (0..8)
                .map(|_| {
                    let (resume, next, reopened, key) =
                        (resume.clone(), next.clone(), reopened.clone(), key.clone());
                    let ws = server.ws;
                    std::thread::spawn(move || loop {
                        let i = next.fetch_add(1, Ordering::SeqCst) as usize;
                        let Some(&(index, channel, after)) = resume.get(i) else {
                            return;
                        };
                        loop {
                            match open(index + 100_000, ws, &key, channel, Some(after)) {
                                Ok(conn) => {
                                    reopened.lock().unwrap().push((index, conn));
                                    break;
                                }
                                Err(_) => std::thread::sleep(Duration::from_millis(5)),
                            }
                        }
                    })
                })
                .collect();
            for thread in threads {
                thread.join().unwrap();
            }
            end = Instant::now();
            let cpu = cpu_seconds(new_pid);
            println!(
                "restart: {} clients reconnected and resumed {:?} after the restart began ({:?} after the new server started); new server CPU until then: {cpu:.3} s",
                resume.len(),
                end - begin,
                end - restarted
            );
            let mut reopened = std::mem::take(&mut *reopened.lock().unwrap());
            reopened.sort_by_key(|(i, _)| *i);
            let conns: Vec<Conn> = reopened.into_iter().map(|(_, c)| c).collect();
            let stop_reading = Arc::new(AtomicBool::new(false));
            let reading = reader(
                conns,
                options.probes,
                arrivals.clone(),
                stop_reading.clone(),
                closed.clone(),
            );
            std::thread::sleep(Duration::from_secs(2));
            stop_publishing.store(true, Ordering::SeqCst);
            let (sent, failed) = publishing.join().unwrap();
            std::thread::sleep(Duration::from_millis(500));
            stop_reading.store(true, Ordering::SeqCst);
            let _ = reading.join().unwrap();
            let (pause, exact) = longest_pause(&arrivals.lock().unwrap(), (begin, end));
            println!(
                "restart: longest pause between two messages at a probe: {pause:?}; every probe got every seq once, in order: {exact}; publishes {sent}, not 202 (refused while down): {failed}"
            );
            let _ = server.child.kill();
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
