//! The shard runtime: one glommio executor pinned per CPU, each with its own
//! public and admin listener (SO_REUSEPORT), registry, key index and
//! metrics, joined by a channel mesh over which sockets and publishes travel
//! to the shard that owns their org.

pub mod access;
mod admin;
mod connection;
mod fault;
pub mod history_routes;
mod mesh;
mod public;
pub mod ratelimit;
pub mod reactor;
pub mod routes;
mod stall;
pub mod waits;
mod web;

use std::cell::{Cell, RefCell};
use std::io::IoSlice;
use std::os::unix::io::RawFd;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use glommio::{LocalExecutorBuilder, Placement};

use crate::auth::keys::{KeyIndex, KeyStore};
use crate::config::Config;
use crate::metrics::ShardMetrics;
use crate::registry::{Broadcast, ConnKey, Delivered, Flush, Outgoing, Registry, RegistryLimits};

/// Size of a pooled read buffer: a request head fits, and most client
/// messages; bigger frames grow a buffer that is then not pooled.
pub const READ_BUFFER_BYTES: usize = crate::limits::HEAD_BYTES_MAX;

/// Pooled buffers kept per shard beyond which returned ones are freed.
const POOL_BUFFERS_MAX: usize = 32;

/// How often each shard re-checks the key file.
const KEY_RELOAD_MS: u64 = 500;

/// Close code for a revoked key (PROTOCOL.md §2).
pub const CLOSE_KEY_REVOKED: u16 = 4003;
/// Close code when the server shuts down.
pub const CLOSE_GOING_AWAY: u16 = 1001;
/// Internal: drop the socket without a close frame (never sent on the wire).
pub const CLOSE_ABORT: u16 = 1006;

/// Stable org → shard mapping (FNV-1a 64): the same org lands on the same
/// shard index across restarts and builds.
pub fn shard_for(org_id: &str, shards: usize) -> usize {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in org_id.bytes() {
        hash ^= byte as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % shards as u64) as usize
}

/// What shards send each other.
pub enum ShardMessage {
    /// A WebSocket upgrade authenticated elsewhere, for the owner to answer.
    Adopt(Handoff),
    /// Messages for orgs this shard owns; the reply carries their seqs.
    Publish {
        /// The messages, in request order.
        messages: Vec<Outgoing>,
        /// Where the seqs go (or why the history could not keep them).
        reply: futures_channel::oneshot::Sender<Result<Vec<u64>, String>>,
    },
    /// A history read (poll, SSE, lists) for an org this shard owns.
    History {
        /// What to read.
        query: crate::history::query::Query,
        /// Where the answer goes.
        reply: futures_channel::oneshot::Sender<crate::history::query::Answer>,
    },
}

/// An authenticated upgrade travelling to its org's owner shard.
pub struct Handoff {
    /// A duplicate of the accepted socket, owned by the message.
    pub fd: RawFd,
    /// Bytes read after the request head (a first frame may already be there).
    pub leftover: Vec<u8>,
    /// The org.
    pub org_id: String,
    /// The API key id, for revocation.
    pub key_id: String,
    /// The session id and expiry when the cookie was the credential, for
    /// sign-out (boxed: most handoffs have none, and the mesh's messages
    /// stay small).
    pub session: Option<Box<(u128, u64)>>,
    /// `Sec-WebSocket-Key` of the request, for the 101 answer.
    pub ws_key: String,
}

impl Drop for Handoff {
    fn drop(&mut self) {
        if self.fd >= 0 {
            // SAFETY: the handoff owns this descriptor until adopted (fd = -1).
            unsafe { libc::close(self.fd) };
        }
    }
}

/// State of one shard, shared by its tasks (never across threads).
pub struct Shard {
    /// This shard's index.
    pub id: usize,
    /// Number of shards.
    pub count: usize,
    /// The configuration.
    pub config: Arc<Config>,
    /// Connections, orgs, channels, queues.
    pub registry: RefCell<Registry>,
    /// Active keys: this shard's copy of the process-wide index, which
    /// every shard swaps for all (revocation is one moment everywhere).
    pub keys: crate::auth::current::CachedKeys,
    /// The admin token.
    pub admin_token: Arc<str>,
    /// Inboxes of every shard (None with one shard).
    pub mesh: Option<mesh::Mesh>,
    /// This shard's counters.
    pub metrics: Arc<ShardMetrics>,
    /// Every shard's counters, for `/metrics`.
    pub all_metrics: Arc<Vec<Arc<ShardMetrics>>>,
    /// Parked read buffers.
    pool: RefCell<Vec<Vec<u8>>>,
    /// Set when the shard drains for shutdown.
    pub stopping: Cell<bool>,
    /// Notified when the key index is replaced and when the shard starts
    /// draining, so SSE streams and long-polls served here (which are not
    /// in the registry) re-check their key and the stop flag.
    pub http_wake: crate::history::Notify,
    /// SSE streams and polls being served here; the drain waits for them
    /// to be answered.
    pub http_streams: Cell<usize>,
    /// The history log of the orgs this shard owns.
    pub history: crate::history::History,
    /// The epoll set of this shard's connections.
    pub reactor: reactor::Reactor,
    /// Closing connections and when their linger ends.
    pub lingering: RefCell<Vec<(ConnKey, Instant)>>,
    /// Session signer, per-address limits, keys used since the last
    /// last-used write.
    pub access: access::AccessState,
}

impl Shard {
    /// A read buffer from the pool.
    pub fn take_buffer(&self) -> Vec<u8> {
        self.pool
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| vec![0u8; READ_BUFFER_BYTES])
    }

    /// Parks a read buffer (oversized ones are freed).
    pub fn return_buffer(&self, buffer: Vec<u8>) {
        let mut pool = self.pool.borrow_mut();
        if buffer.len() == READ_BUFFER_BYTES && pool.len() < POOL_BUFFERS_MAX {
            pool.push(buffer);
        }
    }

    /// Decoder limits for client frames.
    pub fn decoder_config(&self) -> crate::protocol::ws::DecoderConfig {
        crate::protocol::ws::DecoderConfig {
            message_bytes_max: self.config.client_message_bytes,
            require_mask: true,
        }
    }

    /// Copies the registry's counters into the shared metrics.
    pub fn sync_metrics(&self) {
        let registry = self.registry.borrow();
        let c = registry.counters;
        let m = &self.metrics;
        m.connections
            .store(registry.connections.len() as u64, Ordering::Relaxed);
        m.published.store(c.published, Ordering::Relaxed);
        m.delivered.store(c.delivered, Ordering::Relaxed);
        m.bytes_sent.store(c.bytes_sent, Ordering::Relaxed);
        m.sends.store(c.sends, Ordering::Relaxed);
        m.slow_consumer_closes
            .store(c.slow_consumer_closes, Ordering::Relaxed);
        let h = self.history.counters.get();
        m.history_commits.store(h.commits, Ordering::Relaxed);
        m.history_fsyncs.store(h.fsyncs, Ordering::Relaxed);
        m.history_bytes_written.store(h.bytes, Ordering::Relaxed);
    }

    /// Connections written between two turns for the shard's other work
    /// in [`Shard::deliver`] and [`Shard::flush_dirty`]. A send costs the
    /// kernel 6-9 µs on loopback, so a part is about 2 ms: the shard's other
    /// connections (pings, other orgs' subscribers) wait about that long
    /// behind a big broadcast instead of the whole walk (docs/ARCHITECTURE.md).
    const WALK_PART: usize = 256;

    /// Most ready sockets served between two parts of a walk.
    const SERVE_BETWEEN_PARTS: usize = 64;

    /// Writes every connection with newly queued frames, yielding to the
    /// executor between chunks so one big broadcast can't stall the core.
    pub async fn flush_dirty(&self) {
        let dirty = self.registry.borrow_mut().take_dirty();
        for chunk in dirty.chunks(Self::WALK_PART) {
            {
                let mut registry = self.registry.borrow_mut();
                for &index in chunk {
                    flush_one(&mut registry, &self.reactor, index);
                }
            }
            if chunk.len() == Self::WALK_PART {
                glommio::yield_if_needed().await;
            }
        }
        self.registry.borrow_mut().return_dirty(dirty);
    }

    /// Writes staged broadcasts to their subscribers, a part of each org's
    /// connection list at a time with yields between, so one big broadcast
    /// can't stall the core; then ends each (see [`Registry::finish`]).
    pub async fn deliver(&self, staged: Vec<Broadcast>) {
        let mut outcome = Delivered::default();
        let mut ready = [libc::epoll_event { events: 0, u64: 0 }; Self::SERVE_BETWEEN_PARTS];
        for broadcast in &staged {
            let mut from = 0;
            loop {
                let to = (from + Self::WALK_PART).min(broadcast.positions);
                {
                    let mut registry = self.registry.borrow_mut();
                    registry.deliver(broadcast, from..to, &mut send_vectored, &mut outcome);
                    self.act_on(&mut registry, &mut outcome);
                }
                from = to;
                if from >= broadcast.positions {
                    break;
                }
                // The shard's other connections get a turn at every part.
                reactor::serve_ready(self, &mut ready);
                glommio::yield_if_needed().await;
            }
            self.registry.borrow_mut().finish(broadcast);
        }
        // Connections that had queued bytes got the frames queued.
        self.flush_dirty().await;
    }

    /// Sockets that refused bytes wait for writability; failed ones close.
    fn act_on(&self, registry: &mut Registry, outcome: &mut Delivered) {
        for (key, fd) in outcome.blocked.drain(..) {
            self.reactor.want_write(fd, key, true);
        }
        for key in outcome.failed.drain(..) {
            registry.request_close(key, CLOSE_ABORT);
        }
    }

    /// Sequences messages this shard owns and returns their seqs once the
    /// history made them durable; the history's committer fans them out.
    pub async fn publish_local(&self, messages: Vec<Outgoing>) -> Result<Vec<u64>, String> {
        self.history.append(messages).await
    }

    /// Routes messages to their owner shards; seqs come back in input order.
    pub async fn publish(&self, messages: Vec<Outgoing>) -> Result<Vec<u64>, String> {
        let mut by_shard: Vec<Vec<(usize, Outgoing)>> =
            (0..self.count).map(|_| Vec::new()).collect();
        for (index, message) in messages.into_iter().enumerate() {
            by_shard[shard_for(&message.org_id, self.count)].push((index, message));
        }
        let total: usize = by_shard.iter().map(Vec::len).sum();
        let mut seqs = vec![0u64; total];
        for (owner, batch) in by_shard.into_iter().enumerate() {
            if batch.is_empty() {
                continue;
            }
            let (indexes, batch): (Vec<usize>, Vec<Outgoing>) = batch.into_iter().unzip();
            let batch_seqs = if owner == self.id {
                self.publish_local(batch).await?
            } else {
                let (reply, answer) = futures_channel::oneshot::channel();
                let mesh = self.mesh.as_ref().expect("several shards have a mesh");
                mesh.send_to(
                    owner,
                    ShardMessage::Publish {
                        messages: batch,
                        reply,
                    },
                )
                .map_err(|_| "owner shard stopped".to_string())?;
                answer
                    .await
                    .map_err(|_| "owner shard stopped".to_string())??
            };
            for (index, seq) in indexes.into_iter().zip(batch_seqs) {
                seqs[index] = seq;
            }
        }
        Ok(seqs)
    }
}

/// Non-blocking vectored send on a raw socket.
pub fn send_vectored(fd: RawFd, slices: &[IoSlice<'_>]) -> std::io::Result<usize> {
    // SAFETY: IoSlice is ABI-compatible with iovec on Unix; msghdr is plain
    // data and every pointer in it outlives the call.
    unsafe {
        let mut header: libc::msghdr = std::mem::zeroed();
        header.msg_iov = slices.as_ptr() as *mut libc::iovec;
        header.msg_iovlen = slices.len() as _;
        let written = libc::sendmsg(fd, &header, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL);
        if written < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(written as usize)
        }
    }
}

/// Flushes one connection unless the reactor already waits for it to be
/// writable. A socket that refuses bytes gets EPOLLOUT interest; one that
/// fails is closed without a close frame.
pub fn flush_one(registry: &mut Registry, reactor: &reactor::Reactor, index: u32) {
    let Some(conn) = registry.connections.get(index as usize) else {
        return;
    };
    if conn.write_blocked || conn.queue_is_empty() {
        return;
    }
    let key = ConnKey {
        index,
        generation: conn.generation,
    };
    let fd = conn.fd;
    match registry.flush(index, &mut send_vectored) {
        Flush::Drained => {}
        Flush::Blocked => reactor.want_write(fd, key, true),
        Flush::Failed => registry.request_close(key, CLOSE_ABORT),
    }
}

/// Everything the shards share at startup.
struct Shared {
    config: Arc<Config>,
    admin_token: Arc<str>,
    /// The one key index of the process (see `auth::current`).
    keys: Arc<crate::auth::current::CurrentKeys>,
    signer: crate::auth::sessions::SessionSigner,
    /// Signed-out sessions, one list for every shard.
    revoked: Arc<crate::auth::revoked::Revocations>,
    all_metrics: Arc<Vec<Arc<ShardMetrics>>>,
    stop: Arc<AtomicBool>,
    exited: std::sync::atomic::AtomicUsize,
    connections_max_per_shard: usize,
}

/// Counts a shard's end, also when it panics, so the main thread notices.
struct ExitGuard(Arc<Shared>);

impl Drop for ExitGuard {
    fn drop(&mut self) {
        self.0.exited.fetch_add(1, Ordering::SeqCst);
    }
}

/// Raises RLIMIT_NOFILE's soft limit to the hard one and checks that it
/// covers the configured connections. Returns the connection budget.
fn check_open_files(config: &Config) -> Result<usize, String> {
    // Files the server needs besides client sockets: listeners, rings,
    // eventfds, data files, admin connections in flight.
    let reserve = 64 + 16 * config.shards as u64;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a stack struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err("cannot read the open-files limit (getrlimit)".to_string());
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    let available = limit.rlim_cur.saturating_sub(reserve);
    match config.max_connections {
        Some(wanted) if wanted as u64 > available => Err(format!(
            "the open-files limit ({}) is too low for --max-connections {wanted}: it needs at least {}; \
             raise it (ulimit -n, or LimitNOFILE= in the systemd unit) or lower --max-connections",
            limit.rlim_cur,
            wanted as u64 + reserve
        )),
        Some(wanted) => Ok(wanted),
        None if available < 16 => Err(format!(
            "the open-files limit ({}) leaves no room for connections; raise it (ulimit -n)",
            limit.rlim_cur
        )),
        None => Ok(available as usize),
    }
}

/// glommio's io_uring rings need locked memory; root is exempt.
fn check_memlock() -> Result<(), String> {
    const NEEDED: u64 = 512 * 1024;
    // SAFETY: geteuid and getrlimit/setrlimit on a stack struct.
    unsafe {
        if libc::geteuid() == 0 {
            return Ok(());
        }
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) != 0 {
            return Ok(());
        }
        if limit.rlim_cur < NEEDED && limit.rlim_max >= NEEDED {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_MEMLOCK, &raised) == 0 {
                return Ok(());
            }
        }
        if limit.rlim_cur < NEEDED {
            return Err(format!(
                "the locked-memory limit (RLIMIT_MEMLOCK) is {} KiB but io_uring needs at least {} KiB: \
                 raise it with `ulimit -l unlimited` (or LimitMEMLOCK=infinity in the systemd unit) and start again",
                limit.rlim_cur / 1024,
                NEEDED / 1024
            ));
        }
    }
    Ok(())
}

/// Creates the data directory, checks it is writable, and locks it so a
/// second server (which SO_REUSEPORT would otherwise let share our ports)
/// refuses to start. The returned file holds the lock for the process's life.
fn lock_data_dir(dir: &PathBuf) -> Result<std::fs::File, String> {
    use std::os::unix::io::AsRawFd;
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("data directory {} cannot be created: {e}", dir.display()))?;
    let probe = dir.join(".write-probe");
    std::fs::write(&probe, b"ok").map_err(|e| {
        format!(
            "data directory {} is not writable: {e}; choose another with --data-dir",
            dir.display()
        )
    })?;
    let _ = std::fs::remove_file(&probe);
    let lock_path = dir.join("server.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| format!("{}: {e}", lock_path.display()))?;
    // SAFETY: flock on a descriptor we own.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(format!(
            "another hookstream server is already running on data directory {}",
            dir.display()
        ));
    }
    Ok(file)
}

/// How long the shards may take to open history and bind before startup is
/// declared stuck.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(120);

/// Accept backlog of each shard's listeners (the kernel caps it at
/// `net.core.somaxconn`).
const LISTEN_BACKLOG: i32 = 4096;

/// A listener with SO_REUSEPORT (every shard binds the same address) and
/// SO_REUSEADDR. glommio's own `bind` sets only the first; without the second,
/// the TIME_WAIT sockets a stopped server leaves behind make a restart on the
/// same port fail for a minute.
fn listen(addr: std::net::SocketAddr) -> std::io::Result<glommio::net::TcpListener> {
    use std::os::unix::io::{FromRawFd, IntoRawFd};
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    // SAFETY: the listener takes ownership of the descriptor.
    Ok(unsafe { glommio::net::TcpListener::from_raw_fd(socket.into_raw_fd()) })
}

/// Finds out whether the address is free (a plain, non-reuseport bind
/// fails while anything listens there) and resolves port 0 to a real port,
/// then keeps that port: the returned socket (SO_REUSEPORT but not
/// SO_REUSEADDR, bound, not listening) must live until every shard has
/// bound its listener. Without it the port is free between this probe and
/// the shards' binds (the history opens in between): another process's
/// `bind(:0)`, or another server's probe of the same explicit port, can
/// take it; both servers then bind it with SO_REUSEPORT (allowed for one
/// user) and the kernel splits connections between them. The held socket
/// keeps `bind(:0)` and any bind without SO_REUSEPORT off the port (not
/// SO_REUSEADDR: with it, a SO_REUSEADDR probe could share the port while
/// neither listens), lets the shards' SO_REUSEPORT listeners join, and,
/// not listening, takes no connection.
fn probe_bind(
    what: &str,
    addr: std::net::SocketAddr,
) -> Result<(std::net::SocketAddr, socket2::Socket), String> {
    let probed = match std::net::TcpListener::bind(addr) {
        Ok(listener) => listener
            .local_addr()
            .map_err(|e| format!("--{what} {addr}: {e}"))?,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            return Err(format!(
                "address {addr} (--{what}) is already in use: stop the other process or choose another address"
            ))
        }
        Err(e) => return Err(format!("cannot listen on {addr} (--{what}): {e}")),
    };
    let hold = (|| {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(probed),
            socket2::Type::STREAM,
            None,
        )?;
        socket.set_reuse_port(true)?;
        socket.bind(&probed.into())?;
        Ok::<_, std::io::Error>(socket)
    })();
    match hold {
        Ok(socket) => Ok((probed, socket)),
        // Taken in the microseconds since the probe.
        Err(e) => Err(format!("cannot listen on {probed} (--{what}): {e}")),
    }
}

/// Runs the gateway until SIGTERM or SIGINT. `on_ready` runs once every
/// shard listens (used by `--demo` to print its instructions).
pub fn run(mut config: Config, on_ready: impl FnOnce(&Config, &str)) -> Result<(), String> {
    check_memlock()?;
    let connections_max = check_open_files(&config)?;
    let _lock = lock_data_dir(&config.data_dir)?;
    // glommio opens history directories with openat(-1, path), which only
    // works for absolute paths: resolve `./hookstream-data` (the default)
    // once, here, for every file API alike.
    config.data_dir = std::fs::canonicalize(&config.data_dir).map_err(|e| {
        format!(
            "data directory {} cannot be resolved: {e}",
            config.data_dir.display()
        )
    })?;
    let (listen, listen_hold) = probe_bind("listen", config.listen)?;
    let (admin_listen, admin_hold) = probe_bind("admin-listen", config.admin_listen)?;
    config.listen = listen;
    config.admin_listen = admin_listen;
    let admin_token: Arc<str> = crate::auth::keys::admin_token(&config.data_dir)
        .map_err(|e| format!("admin token: {e}"))?
        .into();
    let store = KeyStore::new(&config.data_dir);
    // Taken before the load: a change made after it is noticed by the
    // reload loop even when it lands before the loop starts.
    let keys_stamp = store.stamp();
    let keys = KeyIndex::from_file(&store.load().map_err(|e| e.to_string())?);
    let keys = Arc::new(crate::auth::current::CurrentKeys::new(keys_stamp, keys));
    let signer = crate::auth::sessions::SessionSigner::load_or_create(&config.data_dir)?;
    let revoked = Arc::new(
        crate::auth::revoked::Revocations::load(
            &config.data_dir,
            crate::auth::sessions::now_unix_secs(),
        )
        .map_err(|e| format!("signed-out sessions: {e}"))?,
    );

    // Signals are taken synchronously by the main thread: block them here,
    // before any executor thread exists, so every thread inherits the mask.
    // SAFETY: sigset manipulation on stack values.
    let signals = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };

    let shards = config.shards;
    let config = Arc::new(config);
    let shared = Arc::new(Shared {
        config: config.clone(),
        admin_token: admin_token.clone(),
        keys,
        signer,
        revoked,
        all_metrics: Arc::new(
            (0..shards)
                .map(|_| Arc::new(ShardMetrics::default()))
                .collect(),
        ),
        stop: Arc::new(AtomicBool::new(false)),
        exited: std::sync::atomic::AtomicUsize::new(0),
        connections_max_per_shard: connections_max.div_ceil(shards).max(1),
    });
    let mesh =
        mesh::Mesh::new(shards).map_err(|e| format!("cannot create the shard inboxes: {e}"))?;
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
    let mut handles = Vec::new();
    for id in 0..shards {
        let shared = shared.clone();
        let mesh = mesh.clone();
        let ready = ready_tx.clone();
        let builder = LocalExecutorBuilder::new(Placement::Fixed(id % cpus))
            .name(&format!("shard-{id}"))
            .ring_depth(1024)
            .io_memory(2 << 20)
            .preempt_timer(Duration::from_millis(5))
            .spin_before_park(Duration::from_micros(0));
        let handle = builder
            .spawn(move || async move { shard_main(id, shared, mesh, ready).await })
            .map_err(|e| glommio_error(&e.to_string()))?;
        handles.push(handle);
    }
    drop(ready_tx);
    // Opening history scans segments, so a large data directory may take a
    // while; a shard that says nothing for this long is stuck, and the
    // process ends with a line instead of hanging.
    let startup_deadline = Instant::now() + STARTUP_TIMEOUT;
    for _ in 0..shards {
        let left = startup_deadline.saturating_duration_since(Instant::now());
        match ready_rx.recv_timeout(left) {
            Ok(Ok(())) => {}
            Ok(Err(message)) => {
                shared.stop.store(true, Ordering::SeqCst);
                return Err(message);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(format!(
                    "the shards did not start within {} s; see the lines above",
                    STARTUP_TIMEOUT.as_secs()
                ));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(glommio_error("a shard stopped during startup"));
            }
        }
    }
    // Every shard listens: the port is theirs now.
    drop((listen_hold, admin_hold));
    let listen_line = format!(
        "hookstream listening on ws://{}/v1/ws (admin http://{}), {} shard(s), data dir {}",
        config.listen,
        config.admin_listen,
        shards,
        config.data_dir.display()
    );
    eprintln!("{listen_line}");
    on_ready(&config, &admin_token);

    // Wait for a signal, or for a shard to die.
    loop {
        let timeout = libc::timespec {
            tv_sec: 0,
            tv_nsec: 200_000_000,
        };
        // SAFETY: sigtimedwait with a blocked set and stack values.
        let signal = unsafe { libc::sigtimedwait(&signals, std::ptr::null_mut(), &timeout) };
        if signal == libc::SIGTERM || signal == libc::SIGINT {
            eprintln!("hookstream: signal received, closing connections with 1001 and stopping");
            break;
        }
        if shared.exited.load(Ordering::SeqCst) > 0 {
            shared.stop.store(true, Ordering::SeqCst);
            for handle in handles {
                let _ = handle.join();
            }
            return Err("a shard stopped unexpectedly".to_string());
        }
    }
    shared.stop.store(true, Ordering::SeqCst);
    for handle in handles {
        let _ = handle.join();
    }
    Ok(())
}

fn glommio_error(text: &str) -> String {
    if text.contains("MemLock") || text.contains("memlock") {
        return "the locked-memory limit (RLIMIT_MEMLOCK) is too low for io_uring: raise it with \
                `ulimit -l unlimited` (or LimitMEMLOCK=infinity in the systemd unit)"
            .to_string();
    }
    format!("cannot start the shard runtime: {text}")
}

async fn shard_main(
    id: usize,
    shared: Arc<Shared>,
    mesh: mesh::Mesh,
    ready: mpsc::Sender<Result<(), String>>,
) {
    let _exit = ExitGuard(shared.clone());
    let config = shared.config.clone();
    let limits = RegistryLimits {
        connections_per_org: config.connections_per_org,
        connections_max: shared.connections_max_per_shard,
        subscriptions_max: config.subscriptions_max,
        send_queue_bytes: config.send_queue_bytes,
    };
    let reactor = match reactor::Reactor::new() {
        Ok(reactor) => reactor,
        Err(e) => {
            let _ = ready.send(Err(format!("cannot create the shard's epoll set: {e}")));
            return;
        }
    };
    let history_config = crate::history::HistoryConfig {
        dir: config.data_dir.join("history"),
        durability: config.durability,
        messages_max: config.history_messages,
        age_ms: config.history_age_ms,
    };
    let opened = match crate::history::History::open(history_config, id, config.shards).await {
        Ok(opened) => opened,
        Err(e) => {
            let _ = ready.send(Err(format!("cannot open the message history: {e}")));
            return;
        }
    };
    let mut registry = Registry::new(limits);
    for (org_id, seq) in &opened.seqs {
        registry.set_org_seq(org_id, *seq);
    }
    let shard = Rc::new(Shard {
        id,
        count: config.shards,
        config: config.clone(),
        registry: RefCell::new(registry),
        keys: crate::auth::current::CachedKeys::new(shared.keys.clone()),
        admin_token: shared.admin_token.clone(),
        mesh: (config.shards > 1).then(|| mesh.clone()),
        metrics: shared.all_metrics[id].clone(),
        all_metrics: shared.all_metrics.clone(),
        pool: RefCell::new(Vec::new()),
        stopping: Cell::new(false),
        http_wake: crate::history::Notify::default(),
        http_streams: Cell::new(0),
        history: opened.history,
        reactor,
        lingering: RefCell::new(Vec::new()),
        access: access::AccessState::new(&config, shared.signer.clone(), shared.revoked.clone()),
    });
    let public_listener = match listen(config.listen) {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(format!(
                "cannot listen on {} (--listen): {e}",
                config.listen
            )));
            return;
        }
    };
    let admin_listener = match listen(config.admin_listen) {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(format!(
                "cannot listen on {} (--admin-listen): {e}",
                config.admin_listen
            )));
            return;
        }
    };

    // Messages from the other shards.
    let mesh_task = {
        let shard = shard.clone();
        let mesh = mesh.clone();
        glommio::spawn_local(async move {
            loop {
                for message in mesh.receive(shard.id).await {
                    match message {
                        ShardMessage::Adopt(handoff) => public::adopt(&shard, handoff),
                        ShardMessage::Publish { messages, reply } => {
                            let shard = shard.clone();
                            glommio::spawn_local(async move {
                                let seqs = shard.publish_local(messages).await;
                                let _ = reply.send(seqs);
                            })
                            .detach();
                        }
                        ShardMessage::History { query, mut reply } => {
                            let shard = shard.clone();
                            glommio::spawn_local(async move {
                                // A long-poll whose asker went away (its
                                // key was revoked, its client left) stops
                                // waiting here too.
                                let answer = futures_lite::future::or(
                                    async {
                                        Some(
                                            crate::history::query::run(&shard.history, query).await,
                                        )
                                    },
                                    async {
                                        reply.cancellation().await;
                                        None
                                    },
                                )
                                .await;
                                if let Some(answer) = answer {
                                    let _ = reply.send(answer);
                                }
                            })
                            .detach();
                        }
                    }
                }
            }
        })
    };

    let accept_public = glommio::spawn_local(public::accept_loop(shard.clone(), public_listener));
    let accept_admin = glommio::spawn_local(admin::accept_loop(shard.clone(), admin_listener));
    let heartbeat = glommio::spawn_local(heartbeat_loop(shard.clone()));
    let _history_tasks = [
        glommio::spawn_local(crate::history::commit_loop(shard.clone())),
        glommio::spawn_local(crate::history::retention_loop(shard.clone())),
        glommio::spawn_local(crate::history::replay::worker(shard.clone())),
    ];
    let reactor_task = glommio::spawn_local(reactor::run(shard.clone()));
    let key_reload = glommio::spawn_local(key_reload_loop(shard.clone()));
    let last_used = glommio::spawn_local(access::last_used_loop(shard.clone()));
    let demo = (config.demo && id == 0).then(|| glommio::spawn_local(demo_loop(shard.clone())));
    let _ = ready.send(Ok(()));

    // Wait for the stop flag, keeping metrics fresh meanwhile.
    let mut last_sync = Instant::now();
    while !shared.stop.load(Ordering::Relaxed) {
        glommio::timer::sleep(Duration::from_millis(50)).await;
        if last_sync.elapsed() >= Duration::from_millis(200) {
            shard.sync_metrics();
            last_sync = Instant::now();
        }
    }

    // Drain: stop accepting, answer waiting long-polls and end SSE
    // streams, close every connection with 1001, wait.
    shard.stopping.set(true);
    shard.history.stop_waits();
    shard.http_wake.notify();
    drop(accept_public);
    drop(accept_admin);
    drop(heartbeat);
    drop(key_reload);
    drop(last_used);
    access::flush_last_used(&shard).await;
    drop(demo);
    let keys = shard.registry.borrow().keys();
    for key in keys {
        shard
            .registry
            .borrow_mut()
            .request_close(key, CLOSE_GOING_AWAY);
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while (!shard.registry.borrow().connections.is_empty() || shard.http_streams.get() > 0)
        && Instant::now() < deadline
    {
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    drop(reactor_task);
    for key in shard.registry.borrow().keys() {
        reactor::remove_now(&shard, key);
    }
    if let Some(mesh) = &shard.mesh {
        mesh.close(shard.id);
    }
    drop(mesh_task);
}

/// Most slices the heartbeat interval is cut into.
const HEARTBEAT_SLICES_MAX: u64 = 30;

/// Pings every connection each `heartbeat_ms`; closes the ones that have not
/// sent anything for two intervals. The interval is cut into slices (one
/// per 100 ms, at most [`HEARTBEAT_SLICES_MAX`]) and each tick pings the
/// connections of one slice (slab index modulo the slice count), so every
/// connection is still pinged once per interval but a shard never pings
/// all of its connections at once: 100,000 pings in one go would hold the
/// core for most of a second and delay every broadcast behind them.
async fn heartbeat_loop(shard: Rc<Shard>) {
    let interval = Duration::from_millis(shard.config.heartbeat_ms);
    let slices = (shard.config.heartbeat_ms / 100).clamp(1, HEARTBEAT_SLICES_MAX);
    let tick = interval / slices as u32;
    let mut ping_frame = [0u8; 14];
    let len = crate::protocol::ws::encode_header(
        &mut ping_frame,
        true,
        crate::protocol::ws::Opcode::Ping,
        0,
        None,
    );
    let ping: crate::registry::Frame = Rc::from(&ping_frame[..len]);
    let mut next = Instant::now() + tick;
    let mut slice = 0u64;
    loop {
        glommio::timer::sleep(next.saturating_duration_since(Instant::now())).await;
        next += tick;
        {
            let mut registry = shard.registry.borrow_mut();
            let due: Vec<ConnKey> = registry
                .connections
                .iter()
                .filter(|(index, conn)| *index as u64 % slices == slice && conn.close.is_none())
                .map(|(index, conn)| ConnKey {
                    index: index as u32,
                    generation: conn.generation,
                })
                .collect();
            let mut outcome = Delivered::default();
            for key in due {
                let Some(conn) = registry.get_mut(key) else {
                    continue;
                };
                if conn.missed_pongs >= 2 {
                    registry.request_close(key, connection::CLOSE_HEARTBEAT);
                } else {
                    conn.missed_pongs += 1;
                    // Written at once: an idle connection gets no queue.
                    registry.write_or_queue(key.index, &ping, &mut send_vectored, &mut outcome);
                }
            }
            shard.act_on(&mut registry, &mut outcome);
        }
        slice = (slice + 1) % slices;
        shard.flush_dirty().await;
    }
}

/// Closes with 4003 the connections of this shard that signed in with a
/// session cookie since signed out (`DELETE /v1/sessions`), as for a
/// revoked key: the credential they were accepted with no longer is one.
fn close_signed_out(shard: &Shard) {
    let revoked = &shard.access.revoked;
    let mut registry = shard.registry.borrow_mut();
    let closing =
        registry.keys_of_sessions(|key_id, id, expires| revoked.is_revoked(id, key_id, expires));
    for key in closing {
        registry.request_close(key, CLOSE_KEY_REVOKED);
    }
}

/// Re-reads the key file when it changes; closes the connections of keys
/// that were revoked with 4003, and those of sessions signed out since the
/// last turn; wakes the SSE streams and long-polls served here, which end
/// when their credential is no longer accepted. The index is the
/// process's (`auth::current`): whichever shard notices a change swaps it
/// for every shard before closing anything, and the others act on the new
/// generation at their next turn (they already authenticate with it).
async fn key_reload_loop(shard: Rc<Shard>) {
    let store = KeyStore::new(&shard.config.data_dir);
    let mut acted = shard.keys.shared().generation();
    let mut sign_outs = shard.access.revoked.generation();
    loop {
        glommio::timer::sleep(Duration::from_millis(KEY_RELOAD_MS)).await;
        let generation = shard.access.revoked.generation();
        if generation != sign_outs {
            sign_outs = generation;
            close_signed_out(&shard);
            shard.http_wake.notify();
        }
        if let Err(e) = shard.keys.shared().refresh(&store) {
            eprintln!(
                "hookstream: shard {}: key store not reloaded: {e}",
                shard.id
            );
        }
        let generation = shard.keys.shared().generation();
        if generation == acted {
            continue;
        }
        acted = generation;
        let index = shard.keys.get();
        shard.http_wake.notify();
        let mut registry = shard.registry.borrow_mut();
        for key_id in registry.connected_key_ids() {
            if !index.is_active(&key_id) {
                for key in registry.keys_of_api_key(&key_id) {
                    registry.request_close(key, CLOSE_KEY_REVOKED);
                }
            }
        }
    }
}

/// `--demo`: a synthetic event, delivery and issue every second.
async fn demo_loop(shard: Rc<Shard>) {
    let mut tick = 0u64;
    loop {
        glommio::timer::sleep(Duration::from_secs(1)).await;
        tick += 1;
        if let Err(e) = shard.publish(crate::demo::messages(tick)).await {
            eprintln!("hookstream: demo publish failed: {e}");
        }
    }
}
