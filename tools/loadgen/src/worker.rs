//! One worker process: a single-threaded tokio runtime holding its share of
//! the connections. It prints JSON lines (`ready`, `result`) on stdout and
//! takes commands (`finish`, `stop`) as JSON lines on stdin.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::os::unix::io::AsRawFd;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::AsyncBufReadExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use memchr::memmem::Finder;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use crate::raw::{End, RawConn, ReadError};
use crate::stats::{cpu_seconds, monotonic_ns, Latency};
use crate::Common;

/// What a worker's connections do once open.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Subscribe, then sit idle.
    Idle,
    /// Stop at the welcome (the upgrade is what is measured).
    Storm,
    /// Subscribe, then count and time every event.
    Fanout,
    /// Subscribe with `after` and stop once `replayed` messages and
    /// `subscribed` arrived (a reconnect storm that resumes).
    Resume,
}

/// A worker's share of a run.
#[derive(Serialize, Deserialize, Debug)]
pub struct WorkerSpec {
    pub mode: Mode,
    pub common: Common,
    /// Worker number.
    pub index: usize,
    /// Global number of this worker's first connection (picks source IPs).
    pub offset: usize,
    /// Connections to open.
    pub conns: usize,
    /// Connection attempts in flight at once in this worker.
    pub inflight: usize,
    /// Resume: the `after` of every subscribe.
    #[serde(default)]
    pub after: Option<u64>,
    /// Resume: messages each connection must get (seq > after).
    #[serde(default)]
    pub replayed: u64,
}

/// Delivery counters of one worker, shared by its connection tasks.
struct Deliveries {
    latency: Latency,
    received: u64,
    duplicates: u64,
    gaps: u64,
    /// Connections that ended before the process did (close frame, EOF,
    /// read error or bad frame).
    closed: u64,
    /// Connections abandoned on bytes that are not valid frames.
    protocol_errors: u64,
    /// The first reason a connection ended early.
    first_close: Option<String>,
    last_receive_ns: u64,
}

impl Deliveries {
    fn ended(&mut self, why: String, protocol_error: bool) {
        self.closed += 1;
        self.protocol_errors += u64::from(protocol_error);
        self.first_close.get_or_insert(why);
    }
}

/// What a worker's connection holds once open: fan-out subscribers use the
/// hand-written client of `raw`, the other modes tungstenite.
enum Conn {
    Tungstenite(Box<Ws>),
    Raw(RawConn),
}

impl Conn {
    /// Whether its TLS handshake resumed a session (`None`: not TLS).
    fn tls_resumed(&self) -> Option<bool> {
        match self {
            Conn::Tungstenite(_) => None,
            Conn::Raw(conn) => conn.tls_resumed(),
        }
    }
}

/// What every connection task of a worker shares.
struct Shared {
    deliveries: RefCell<Deliveries>,
    /// The fan-out read buffer (its capacity is the largest read).
    buffer: RefCell<Vec<u8>>,
    seq: Finder<'static>,
    t: Finder<'static>,
}

type Ws = WebSocketStream<TcpStream>;

pub fn run(spec: WorkerSpec) {
    raise_open_files();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        if let Err(message) = main(spec).await {
            println!("{}", json!({"event": "fatal", "error": message}));
        }
    });
    std::process::exit(0);
}

fn raise_open_files() {
    // SAFETY: getrlimit/setrlimit on a stack struct.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// `ws://` or `wss://` stripped from `url`.
fn without_scheme(url: &str) -> Result<&str, String> {
    url.strip_prefix("ws://")
        .or_else(|| url.strip_prefix("wss://"))
        .ok_or_else(|| "--url must start with ws:// or wss://".to_string())
}

/// TLS 1.3 tickets a worker's [`TicketPool`] keeps at most (the oldest go
/// first): each counted connection takes one and the server sends two or
/// more, so the pool only grows; this bounds it (each holds the session's
/// secret and certificate chain, a few hundred bytes).
const TICKETS_MAX: usize = 4096;

/// The client session store of `--tls-resume`, shared by every connection
/// of a worker process (one server name). rustls' own memory cache keeps at
/// most 8 TLS 1.3 tickets per server, fewer than the handshakes in flight
/// in a storm, so most of those would fall back to full handshakes; this
/// one keeps up to [`TICKETS_MAX`]. Each ticket is used at most once, as
/// the trait requires (RFC 8446 §C.4). Everything else (the key-exchange
/// hint, the TLS 1.2 session) is rustls' cache.
struct TicketPool {
    other: rustls::client::ClientSessionMemoryCache,
    tls13: Mutex<VecDeque<rustls::client::Tls13ClientSessionValue>>,
}

impl std::fmt::Debug for TicketPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let held = self.tls13.lock().map_or(0, |pool| pool.len());
        f.debug_struct("TicketPool")
            .field("tls13_tickets", &held)
            .finish()
    }
}

impl TicketPool {
    fn new() -> TicketPool {
        TicketPool {
            other: rustls::client::ClientSessionMemoryCache::new(16),
            tls13: Mutex::new(VecDeque::new()),
        }
    }

    /// TLS 1.3 tickets held now.
    fn len(&self) -> usize {
        self.tls13.lock().expect("ticket pool lock").len()
    }
}

impl rustls::client::ClientSessionStore for TicketPool {
    fn set_kx_hint(&self, name: ServerName<'static>, group: rustls::NamedGroup) {
        self.other.set_kx_hint(name, group)
    }

    fn kx_hint(&self, name: &ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.other.kx_hint(name)
    }

    fn set_tls12_session(
        &self,
        name: ServerName<'static>,
        value: rustls::client::Tls12ClientSessionValue,
    ) {
        self.other.set_tls12_session(name, value)
    }

    fn tls12_session(
        &self,
        name: &ServerName<'_>,
    ) -> Option<rustls::client::Tls12ClientSessionValue> {
        self.other.tls12_session(name)
    }

    fn remove_tls12_session(&self, name: &ServerName<'static>) {
        self.other.remove_tls12_session(name)
    }

    fn insert_tls13_ticket(
        &self,
        _name: ServerName<'static>,
        value: rustls::client::Tls13ClientSessionValue,
    ) {
        let mut pool = self.tls13.lock().expect("ticket pool lock");
        if pool.len() == TICKETS_MAX {
            pool.pop_front();
        }
        pool.push_back(value);
    }

    fn take_tls13_ticket(
        &self,
        _name: &ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        // The newest: the freshest ticket, furthest from its lifetime.
        self.tls13.lock().expect("ticket pool lock").pop_back()
    }
}

/// The client TLS configuration of `--tls`/`wss://`: rustls with the ring
/// provider, trusting exactly the certificates of `--ca`. Without
/// `--tls-resume` every handshake is full (rustls' default in-memory
/// session cache is turned off); with it, the worker's connections share a
/// [`TicketPool`], returned too.
pub fn tls_config(common: &Common) -> Result<Option<TlsClient>, String> {
    if !(common.tls || common.url.starts_with("wss://")) {
        if common.tls_resume {
            return Err("--tls-resume needs TLS (--tls or a wss:// --url)".to_string());
        }
        return Ok(None);
    }
    let path = common.ca.as_ref().ok_or("TLS needs --ca FILE")?;
    let mut roots = rustls::RootCertStore::empty();
    let certs =
        CertificateDer::pem_file_iter(path).map_err(|e| format!("--ca {}: {e}", path.display()))?;
    for cert in certs {
        let cert = cert.map_err(|e| format!("--ca {}: {e}", path.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("--ca {}: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("--ca {}: no certificate", path.display()));
    }
    // ring, as the server uses: its deprecation is only that it offers no
    // post-quantum key exchange.
    #[allow(deprecated)]
    let mut provider = rustls::crypto::ring::default_provider();
    // X25519 first, as browsers, curl and OpenSSL offer it (the key share
    // a ClientHello carries): ring's list starts with P-384, whose key
    // exchange costs the server (which follows the client's order) about
    // ten times as much CPU with ring's generic big-number code.
    use rustls::crypto::ring::kx_group;
    provider.kx_groups = vec![kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1];
    let provider = Arc::new(provider);
    let versions: &[&rustls::SupportedProtocolVersion] = if common.tls12 {
        &[&rustls::version::TLS12]
    } else {
        rustls::DEFAULT_VERSIONS
    };
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|e| format!("tls: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut config = config;
    let pool = common.tls_resume.then(|| Arc::new(TicketPool::new()));
    config.resumption = match &pool {
        Some(pool) => rustls::client::Resumption::store(pool.clone()),
        None => rustls::client::Resumption::disabled(),
    };
    Ok(Some(TlsClient {
        config: Arc::new(config),
        pool,
    }))
}

/// A worker's TLS client side.
pub struct TlsClient {
    config: Arc<rustls::ClientConfig>,
    /// The shared session store with `--tls-resume`.
    pool: Option<Arc<TicketPool>>,
}

/// `ws://host:port/path` → the socket address.
fn server_addr(url: &str) -> Result<SocketAddr, String> {
    let rest = without_scheme(url)?;
    let authority = rest.split('/').next().unwrap_or(rest);
    authority
        .to_socket_addrs()
        .map_err(|e| format!("{authority}: {e}"))?
        .find(SocketAddr::is_ipv4)
        .ok_or_else(|| format!("{authority}: no IPv4 address"))
}

async fn main(spec: WorkerSpec) -> Result<(), String> {
    let server = server_addr(&spec.common.url)?;
    let tls_client = tls_config(&spec.common)?;
    let tls = tls_client.as_ref().map(|client| client.config.clone());
    let separator = if spec.common.url.contains('?') {
        '&'
    } else {
        '?'
    };
    let url: Rc<str> = format!("{}{separator}token={}", spec.common.url, spec.common.token).into();
    let read_buffer = spec.common.read_buffer.unwrap_or(match spec.mode {
        Mode::Fanout => 256 * 1024,
        Mode::Idle | Mode::Storm | Mode::Resume => 4 * 1024,
    });
    let mut config = WebSocketConfig::default();
    config.read_buffer_size = read_buffer;
    config.write_buffer_size = 0;
    let (host, target) = split_url(&url)?;
    let (host, target): (Rc<str>, Rc<str>) = (host.into(), target.into());
    let subscribe: Rc<str> = match spec.after {
        Some(after) => {
            json!({"type": "subscribe", "channel": spec.common.channel, "after": after})
        }
        None => json!({"type": "subscribe", "channel": spec.common.channel}),
    }
    .to_string()
    .into();
    let resume = (spec.after.unwrap_or(0), spec.replayed);
    let shared = Rc::new(Shared {
        deliveries: RefCell::new(Deliveries {
            latency: Latency::new(),
            received: 0,
            duplicates: 0,
            gaps: 0,
            closed: 0,
            protocol_errors: 0,
            first_close: None,
            last_receive_ns: 0,
        }),
        buffer: RefCell::new(Vec::with_capacity(if spec.mode == Mode::Fanout {
            read_buffer.max(4096)
        } else {
            0
        })),
        seq: Finder::new(b"\"seq\":"),
        t: Finder::new(b"\"t\":"),
    });
    let gate = Rc::new(Semaphore::new(spec.inflight));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Result<(u64, Option<bool>), String>>();
    let source_ips = spec.common.source_ips.clamp(1, 253) as usize;
    let source_of = |global: usize| Ipv4Addr::new(127, 0, 0, 2 + (global % source_ips) as u8);
    let mut commands = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    if let (Some(config), Some(pool)) = (&tls, tls_client.as_ref().and_then(|c| c.pool.clone())) {
        // --tls-resume: full handshakes to fill the pool, one per
        // connection in flight (not counted), then wait for `go` so the
        // server's CPU is read after them.
        let count = spec.inflight.min(spec.conns).max(1);
        let primers = (0..count).map(|i| {
            let (host, target, shared) = (&host, &target, &shared);
            let source = source_of(spec.offset + i);
            async move {
                open_raw(
                    host,
                    target,
                    source,
                    server,
                    None,
                    shared,
                    false,
                    Some(config),
                )
                .await
            }
        });
        let primed = futures_util::future::join_all(primers).await;
        let opened: Vec<RawConn> = primed
            .into_iter()
            .collect::<Result<_, _>>()
            .map_err(|e| format!("priming the TLS session pool: {e}"))?;
        println!(
            "{}",
            json!({"event": "primed", "worker": spec.index, "primed": opened.len(), "tickets": pool.len()})
        );
        drop(opened);
        match commands.next_line().await {
            Ok(Some(line)) if line.contains("\"go\"") => {}
            _ => return Ok(()),
        }
    }
    let start_ns = monotonic_ns();
    for i in 0..spec.conns {
        let source = source_of(spec.offset + i);
        let url = url.clone();
        let (host, target) = (host.clone(), target.clone());
        let subscribe = subscribe.clone();
        let gate = gate.clone();
        let done = done_tx.clone();
        let shared = shared.clone();
        let mode = spec.mode;
        let deflate = spec.common.deflate;
        let tls = tls.clone();
        tokio::task::spawn_local(async move {
            let permit = gate.acquire().await.expect("semaphore open");
            let began = monotonic_ns();
            let opened = match mode {
                // wss: the hand-written client over rustls in every mode
                // (storm stops at the welcome).
                _ if tls.is_some() => {
                    let subscribe = (mode != Mode::Storm).then_some(&*subscribe);
                    let tls = tls.as_ref();
                    open_raw(
                        &host, &target, source, server, subscribe, &shared, deflate, tls,
                    )
                    .await
                    .map(Conn::Raw)
                }
                Mode::Fanout => open_raw(
                    &host,
                    &target,
                    source,
                    server,
                    Some(&subscribe),
                    &shared,
                    deflate,
                    None,
                )
                .await
                .map(Conn::Raw),
                // Idle connections that offer permessage-deflate: the raw
                // client, which can take it up.
                Mode::Idle if deflate => open_raw(
                    &host,
                    &target,
                    source,
                    server,
                    Some(&subscribe),
                    &shared,
                    deflate,
                    None,
                )
                .await
                .map(Conn::Raw),
                Mode::Idle | Mode::Storm | Mode::Resume => {
                    open(&url, source, server, config, mode, &subscribe, resume)
                        .await
                        .map(|ws| Conn::Tungstenite(Box::new(ws)))
                }
            };
            drop(permit);
            let conn = match opened {
                Ok(conn) => {
                    let _ = done.send(Ok(((monotonic_ns() - began) / 1000, conn.tls_resumed())));
                    conn
                }
                Err(e) => {
                    let _ = done.send(Err(e));
                    return;
                }
            };
            drop(done);
            match conn {
                Conn::Tungstenite(ws) => hold(*ws, &shared.deliveries).await,
                Conn::Raw(conn) => hold_raw(conn, &shared).await,
            }
        });
    }
    drop(done_tx);

    let mut opened = 0u64;
    let mut failed = 0u64;
    let (mut tls_resumed, mut tls_full) = (0u64, 0u64);
    let mut first_error: Option<String> = None;
    let mut latency = Latency::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(spec.common.setup_timeout_s);
    while opened + failed < spec.conns as u64 {
        match tokio::time::timeout_at(deadline, done_rx.recv()).await {
            Ok(Some(Ok((micros, resumed)))) => {
                opened += 1;
                latency.record(micros);
                match resumed {
                    Some(true) => tls_resumed += 1,
                    Some(false) => tls_full += 1,
                    None => {}
                }
            }
            Ok(Some(Err(e))) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
            Ok(None) => break,
            Err(_) => {
                let pending = spec.conns as u64 - opened - failed;
                failed += pending;
                first_error.get_or_insert(format!(
                    "{pending} connections still pending at the setup timeout"
                ));
                break;
            }
        }
    }
    let done_ns = monotonic_ns();
    let cpu_ready = cpu_seconds();
    println!(
        "{}",
        json!({
            "event": "ready",
            "worker": spec.index,
            "opened": opened,
            "failed": failed,
            "first_error": first_error,
            "tls_resumed": tls_resumed,
            "tls_full": tls_full,
            "start_ns": start_ns,
            "done_ns": done_ns,
            "latency_us": latency.to_json(),
            "cpu_s": cpu_ready,
        })
    );

    while let Ok(Some(line)) = commands.next_line().await {
        let command: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        match command["cmd"].as_str() {
            Some("finish") => {
                let per_sub = command["expected_per_sub"].as_u64().unwrap_or(0);
                let wait = Duration::from_millis(command["deadline_ms"].as_u64().unwrap_or(10_000));
                let expected = per_sub * opened;
                let until = tokio::time::Instant::now() + wait;
                while shared.deliveries.borrow().received < expected
                    && tokio::time::Instant::now() < until
                {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                let d = shared.deliveries.borrow();
                println!(
                    "{}",
                    json!({
                        "event": "result",
                        "worker": spec.index,
                        "received": d.received,
                        "duplicates": d.duplicates,
                        "gaps": d.gaps,
                        "closed": d.closed,
                        "protocol_errors": d.protocol_errors,
                        "first_close": d.first_close,
                        "last_receive_ns": d.last_receive_ns,
                        "latency_us": d.latency.to_json(),
                        "cpu_s": cpu_seconds() - cpu_ready,
                    })
                );
            }
            _ => break,
        }
    }
    Ok(())
}

/// Connects from `source`, upgrades, waits for the welcome and (except in
/// storm mode) subscribes and waits for `subscribed`; in resume mode also
/// for `resume.1` messages with a seq above `resume.0`.
async fn open(
    url: &str,
    source: Ipv4Addr,
    server: SocketAddr,
    config: WebSocketConfig,
    mode: Mode,
    subscribe: &str,
    resume: (u64, u64),
) -> Result<Ws, String> {
    let stream = connect(source, server).await?;
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(config))
        .await
        .map_err(|e| format!("upgrade: {e}"))?;
    expect(&mut ws, "welcome").await?;
    if mode == Mode::Storm {
        return Ok(ws);
    }
    ws.send(Message::text(subscribe))
        .await
        .map_err(|e| format!("send subscribe: {e}"))?;
    if mode == Mode::Resume {
        expect_replay(&mut ws, resume.0, resume.1).await?;
        return Ok(ws);
    }
    expect(&mut ws, "subscribed").await?;
    Ok(ws)
}

/// Reads until `subscribed` and `count` messages with a seq above `after`
/// (in order, no duplicate) arrived.
async fn expect_replay(ws: &mut Ws, after: u64, count: u64) -> Result<(), String> {
    let mut subscribed = false;
    let mut got = 0u64;
    let mut last = after;
    while !subscribed || got < count {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => {
                let value: Value = serde_json::from_str(text.as_str())
                    .map_err(|e| format!("bad JSON while resuming: {e}"))?;
                match value["type"].as_str() {
                    Some("subscribed") => subscribed = true,
                    Some("error") => return Err(format!("server error while resuming: {text}")),
                    _ => {
                        if let Some(seq) = value["seq"].as_u64() {
                            if seq <= last {
                                return Err(format!("seq {seq} after {last} while resuming"));
                            }
                            last = seq;
                            got += 1;
                        }
                    }
                }
            }
            Some(Ok(Message::Close(frame))) => {
                return Err(format!("closed while resuming: {frame:?}"))
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(format!("while resuming: {e}")),
            None => return Err("eof while resuming".to_string()),
        }
    }
    Ok(())
}

/// A TCP connection from `source` (port chosen at connect time) to `server`,
/// with Nagle off.
async fn connect(source: Ipv4Addr, server: SocketAddr) -> Result<TcpStream, String> {
    let socket = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
    // Let the kernel pick the source port at connect time, per destination,
    // instead of reserving one at bind time.
    let on: libc::c_int = 1;
    // SAFETY: setsockopt with a valid fd and a c_int option value.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            &on as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    socket
        .bind(SocketAddr::new(source.into(), 0))
        .map_err(|e| format!("bind {source}: {e}"))?;
    let stream = socket
        .connect(server)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    Ok(stream)
}

/// Reads until a text message of `type` arrives.
async fn expect(ws: &mut Ws, kind: &str) -> Result<(), String> {
    let wanted = format!("\"type\":\"{kind}\"");
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => {
                if text.as_str().contains(&wanted) {
                    return Ok(());
                }
                if text.as_str().contains("\"type\":\"error\"") {
                    return Err(format!("server error while waiting for {kind}: {text}"));
                }
            }
            Some(Ok(Message::Close(frame))) => {
                return Err(format!("closed while waiting for {kind}: {frame:?}"))
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(format!("while waiting for {kind}: {e}")),
            None => return Err(format!("eof while waiting for {kind}")),
        }
    }
}

/// Keeps a tungstenite connection (idle and storm modes) until the process
/// ends, reading (tungstenite answers pings while reading).
async fn hold(mut ws: Ws, deliveries: &RefCell<Deliveries>) {
    let why = loop {
        match ws.next().await {
            Some(Ok(Message::Close(frame))) => break format!("closed by the server: {frame:?}"),
            Some(Err(e)) => break format!("read: {e}"),
            None => break "eof".to_string(),
            Some(Ok(_)) => {}
        }
    };
    deliveries.borrow_mut().ended(why, false);
}

/// Connects from `source` and upgrades with the hand-written client (after
/// a TLS handshake with `tls`), waits for the welcome, then, with
/// `subscribe`, subscribes and waits for `subscribed`.
#[allow(clippy::too_many_arguments)]
async fn open_raw(
    host: &str,
    target: &str,
    source: Ipv4Addr,
    server: SocketAddr,
    subscribe: Option<&str>,
    shared: &Shared,
    deflate: bool,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<RawConn, String> {
    let stream = connect(source, server).await?;
    let mut conn = RawConn::upgrade(stream, host, target, deflate, tls).await?;
    if deflate && !conn.deflates() {
        return Err("the server declined permessage-deflate".to_string());
    }
    expect_raw(&mut conn, shared, "welcome").await?;
    let Some(subscribe) = subscribe else {
        return Ok(conn);
    };
    conn.send_text(subscribe)
        .await
        .map_err(|e| format!("send subscribe: {e}"))?;
    expect_raw(&mut conn, shared, "subscribed").await?;
    Ok(conn)
}

/// Reads until a text message of `type` arrives.
async fn expect_raw(conn: &mut RawConn, shared: &Shared, kind: &str) -> Result<(), String> {
    let wanted = format!("\"type\":\"{kind}\"");
    let wanted = Finder::new(wanted.as_bytes());
    let error = Finder::new(b"\"type\":\"error\"");
    let mut refused = None;
    let end = conn
        .read(&shared.buffer, &mut |text, _| {
            if wanted.find(text).is_some() {
                return false;
            }
            if error.find(text).is_some() {
                refused = Some(String::from_utf8_lossy(text).into_owned());
                return false;
            }
            true
        })
        .await
        .map_err(|e| format!("while waiting for {kind}: {e}"))?;
    match (end, refused) {
        (_, Some(text)) => Err(format!("server error while waiting for {kind}: {text}")),
        (End::Stopped, None) => Ok(()),
        (End::Closed(code), None) => Err(format!("closed ({code:?}) while waiting for {kind}")),
        (End::Eof, None) => Err(format!("eof while waiting for {kind}")),
    }
}

/// Keeps a fan-out subscriber until the process ends: counts and times
/// every event (`"seq":` and `"t":` found by scanning, not by parsing the
/// JSON), in the order the frames arrive.
async fn hold_raw(mut conn: RawConn, shared: &Shared) {
    let mut last_seq = 0u64;
    let result = conn
        .read(&shared.buffer, &mut |bytes, now| {
            let Some(seq) = number_after(bytes, &shared.seq) else {
                return true;
            };
            let mut d = shared.deliveries.borrow_mut();
            if let Some(sent) = number_after(bytes, &shared.t) {
                d.latency.record(now.saturating_sub(sent) / 1000);
            }
            d.received += 1;
            d.last_receive_ns = now;
            if last_seq != 0 {
                if seq <= last_seq {
                    d.duplicates += 1;
                } else if seq != last_seq + 1 {
                    d.gaps += seq - last_seq - 1;
                }
            }
            last_seq = last_seq.max(seq);
            true
        })
        .await;
    let mut d = shared.deliveries.borrow_mut();
    match result {
        Ok(End::Closed(code)) => d.ended(format!("closed by the server ({code:?})"), false),
        Ok(End::Eof) => d.ended("eof without a close frame".to_string(), false),
        Ok(End::Stopped) => d.ended("stopped".to_string(), false),
        Err(ReadError::Protocol(e)) => d.ended(format!("bad frame: {e}"), true),
        Err(e @ ReadError::Io(_)) => d.ended(e.to_string(), false),
    }
}

/// `ws://host:port/path?query` → (`host:port`, `/path?query`).
fn split_url(url: &str) -> Result<(String, String), String> {
    let rest = without_scheme(url)?;
    Ok(match rest.find(['/', '?']) {
        Some(at) if rest[at..].starts_with('/') => (rest[..at].to_string(), rest[at..].to_string()),
        Some(at) => (rest[..at].to_string(), format!("/{}", &rest[at..])),
        None => (rest.to_string(), "/".to_string()),
    })
}

/// The unsigned integer right after the first `needle` in `bytes`.
fn number_after(bytes: &[u8], needle: &Finder<'_>) -> Option<u64> {
    let at = needle.find(bytes)? + needle.needle().len();
    let mut value = 0u64;
    let mut digits = 0;
    for &b in &bytes[at..] {
        if !b.is_ascii_digit() {
            break;
        }
        value = value.wrapping_mul(10).wrapping_add((b - b'0') as u64);
        digits += 1;
    }
    (digits > 0).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::{number_after, split_url, Finder};

    #[test]
    fn finds_seq_and_send_time() {
        let text = br#"{"type":"event","channel":"events","seq":42,"data":{"source_id":"s","t":123456789,"pad":"xx"}}"#;
        assert_eq!(number_after(text, &Finder::new(b"\"seq\":")), Some(42));
        assert_eq!(number_after(text, &Finder::new(b"\"t\":")), Some(123456789));
        assert_eq!(number_after(text, &Finder::new(b"\"nope\":")), None);
    }

    #[test]
    fn splits_the_url() {
        let split = |url| split_url(url).unwrap();
        assert_eq!(
            split("ws://127.0.0.1:8080/v1/ws?token=k"),
            ("127.0.0.1:8080".into(), "/v1/ws?token=k".into())
        );
        assert_eq!(
            split("ws://h:1?token=k"),
            ("h:1".into(), "/?token=k".into())
        );
        assert_eq!(split("ws://h:1"), ("h:1".into(), "/".into()));
        assert!(split_url("http://h/").is_err());
    }
}
