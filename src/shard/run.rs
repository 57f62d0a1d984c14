//! The process around the shards: `run` checks the environment, starts one
//! pinned executor per shard, waits for SIGTERM or SIGINT (or a shard's
//! death) and stops them; `shard_main` is one shard's life — open its
//! history, bind, start its tasks, wait for the shutdown signal, drain.

use std::cell::{Cell, RefCell};
use std::os::unix::io::RawFd;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use glommio::{LocalExecutorBuilder, Placement};

use super::heartbeat::heartbeat_loop;
use super::key_reload::key_reload_loop;
use super::startup::{
    check_memlock, check_open_files, glommio_error, listen_socket, local_addr, lock_data_dir,
    probe_bind, set_listener_nodelay,
};
use super::upgrade_process::{self, Outcome};
use super::writer::commit_loop;
use super::{access, admin, mesh, public, reactor, replay, upgrade, Shard, ShardMessage};
use crate::auth::keys::{KeyIndex, KeyStore};
use crate::config::Config;
use crate::handoff::ConnRecord;
use crate::metrics::ShardMetrics;
use crate::protocol::ws::CloseCode;
use crate::registry::{Registry, RegistryLimits};

/// One list per shard.
type PerShard<T> = Vec<Vec<T>>;

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
    /// Shards that ended (normally or by a panic), for the main thread.
    exited: std::sync::atomic::AtomicUsize,
    connections_max_per_shard: usize,
    /// The TLS pair, when the public listener speaks TLS.
    tls: Option<Arc<super::tls::Tls>>,
    /// Each shard's (public, admin) listening socket, owned by the process
    /// (a hot upgrade passes them on; a shard's accept loop only uses its
    /// pair).
    listeners: Vec<(std::os::unix::io::RawFd, std::os::unix::io::RawFd)>,
    /// Connections handed over by the previous process (hot upgrade), per
    /// owner shard, taken by each shard as it starts (state version 2: once
    /// told `ShardMessage::Prepare`); a socket passed ahead of the freeze
    /// is `None` here, found by the record's id among [`Shared::early`]'s.
    adopted: std::sync::Mutex<PerShard<(Option<RawFd>, ConnRecord)>>,
    /// State version 2: connections passed ahead of the freeze, per owner
    /// shard, registered by each shard as it starts, before the log is
    /// open (see `upgrade::register_early`).
    early: std::sync::Mutex<PerShard<(RawFd, ConnRecord)>>,
    /// State version 2: the shards start before the freeze, register the
    /// connections passed early, and wait for `ShardMessage::Prepare`
    /// before they open the log.
    early_pass: bool,
    /// Hot upgrade: the old process still holds every connection until it
    /// commits the handover; each shard starts up (log, registry, adopted
    /// connections registered), reports ready and then waits for
    /// `ShardMessage::Go` before it reads, writes or accepts anything.
    gated: bool,
    /// The NATS bridge in cluster mode.
    bridge: Option<Arc<crate::cluster::Bridge>>,
}

/// Counts a shard's end, also when it panics, so the main thread notices.
struct ExitGuard(Arc<Shared>);

impl Drop for ExitGuard {
    fn drop(&mut self) {
        self.0.exited.fetch_add(1, Ordering::SeqCst);
    }
}

/// How many connections passed ahead of a hot upgrade's freeze a shard
/// registers in one go.
const EARLY_SLICE: usize = 1000;

/// How long the shards may take to open history and bind before startup is
/// declared stuck.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs the gateway until SIGTERM or SIGINT. `on_ready` runs once every
/// shard listens (used by `--demo` to print its instructions).
pub fn run(mut config: Config, on_ready: impl FnOnce(&Config, &str)) -> Result<(), String> {
    check_memlock()?;
    let connections_max = check_open_files(&config)?;
    // Started by a hot upgrade: take the old process's state first, load
    // what can be loaded beside it, and only then confirm (the old process
    // then lets go of the data directory's lock and the log): whatever
    // fails before the confirmation leaves the old process serving.
    // (Loaded before the HELLO, which is when the old process freezes:
    // none of it lengthens the pause.)
    if let Some(channel) = crate::handoff::Channel::from_env() {
        crate::handoff::trace("new: started");
        let channel = channel?;
        let prepared = match prepare(&mut config) {
            Ok(prepared) => prepared,
            Err(e) => {
                let _ = channel.send(crate::handoff::kind::FAILED, e.as_bytes(), &[]);
                return Err(e);
            }
        };
        // State version 2: the shards start and register the connections
        // passed ahead of the freeze before the old process freezes (the
        // rest of the handover is `serve`'s); version 1: every connection
        // came at the freeze.
        let inherited = match upgrade_process::receive(channel)?.early() {
            Ok(early) => early,
            Err(received) => received.confirm()?,
        };
        return serve(
            config,
            Some(inherited),
            Some(prepared),
            connections_max,
            on_ready,
        );
    }
    serve(config, None, None, connections_max, on_ready)
}

/// What startup loads that does not need the data directory's lock.
struct Prepared {
    tls: Option<Arc<super::tls::Tls>>,
    admin_token: Arc<str>,
    keys: Arc<crate::auth::current::CurrentKeys>,
    signer: crate::auth::sessions::SessionSigner,
}

/// Loads the TLS pair, the admin token, the keys and the session secret
/// (the data directory is resolved to an absolute path first).
fn prepare(config: &mut Config) -> Result<Prepared, String> {
    config.data_dir = std::fs::canonicalize(&config.data_dir).map_err(|e| {
        format!(
            "data directory {} cannot be resolved: {e}",
            config.data_dir.display()
        )
    })?;
    let tls = match &config.tls {
        Some(files) => Some(Arc::new(super::tls::Tls::load(&files.cert, &files.key)?)),
        None => None,
    };
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
    Ok(Prepared {
        tls,
        admin_token,
        keys,
        signer,
    })
}

/// Startup from the lock on, then serving until a signal.
fn serve(
    mut config: Config,
    mut inherited: Option<upgrade_process::Inherited>,
    prepared: Option<Prepared>,
    connections_max: usize,
    on_ready: impl FnOnce(&Config, &str),
) -> Result<(), String> {
    // A hot upgrade's old process shares its lock (the same open file,
    // whose flock then holds as long as either process does) and keeps
    // every connection until it commits; an old process from before the
    // commit handshake let go of both already.
    let shared_lock = inherited.as_mut().and_then(|i| i.lock.take());
    // State version 2: the lock comes once the freeze's state was read.
    let early_pass = inherited.as_ref().is_some_and(|i| i.early.is_some());
    let gated = shared_lock.is_some() || early_pass;
    let mut lock = match shared_lock {
        Some(lock) => Some(lock),
        None if early_pass => None,
        None => Some(lock_data_dir(&config.data_dir)?),
    };
    // glommio opens history directories with openat(-1, path), which only
    // works for absolute paths: `prepare` resolves `./hookstream-data`
    // (the default) once, for every file API alike. A TLS pair that does
    // not load ends startup with one line naming the file.
    let Prepared {
        tls,
        admin_token,
        keys,
        mut signer,
    } = match prepared {
        Some(prepared) => prepared,
        None => prepare(&mut config)?,
    };
    // The listening sockets: the old process's when upgrading (the same
    // sockets: what the kernel queued meanwhile is accepted here), else
    // bound now, after a probe (see `probe_bind`).
    let inherited_listeners = inherited
        .as_ref()
        .map(|i| i.listeners.clone())
        .unwrap_or_default();
    let mut holds = Vec::new();
    if let Some(&(public, admin)) = inherited_listeners.first() {
        config.listen = local_addr(public).map_err(|e| format!("inherited listener: {e}"))?;
        config.admin_listen = local_addr(admin).map_err(|e| format!("inherited listener: {e}"))?;
    } else {
        let (listen, listen_hold) = probe_bind("listen", config.listen)?;
        let (admin_listen, admin_hold) = probe_bind("admin-listen", config.admin_listen)?;
        config.listen = listen;
        config.admin_listen = admin_listen;
        holds.push(listen_hold);
        holds.push(admin_hold);
    }
    let mut listeners = Vec::with_capacity(config.shards);
    for id in 0..config.shards {
        if let Some(pair) = inherited_listeners.get(id) {
            // A listener of an older process may lack it; a failure only
            // costs a setsockopt per connection (the fast path sets none).
            let _ = set_listener_nodelay(pair.0);
            listeners.push(*pair);
            continue;
        }
        let public = listen_socket(config.listen)
            .map_err(|e| format!("cannot listen on {} (--listen): {e}", config.listen))?;
        let admin = listen_socket(config.admin_listen).map_err(|e| {
            format!(
                "cannot listen on {} (--admin-listen): {e}",
                config.admin_listen
            )
        })?;
        set_listener_nodelay(public)
            .map_err(|e| format!("cannot listen on {} (--listen): {e}", config.listen))?;
        listeners.push((public, admin));
    }
    // An old process with more shards passed more listeners than this
    // one uses: closing them drops what they queued (clients retry).
    for &(public, admin) in inherited_listeners.iter().skip(config.shards) {
        // SAFETY: inherited descriptors we own and do not use.
        unsafe {
            libc::close(public);
            libc::close(admin);
        }
    }
    let now = crate::auth::sessions::now_unix_secs();
    let revoked = if inherited.is_some() {
        crate::auth::revoked::Revocations::load_only(&config.data_dir, now)
    } else {
        crate::auth::revoked::Revocations::load(&config.data_dir, now)
    };
    let revoked = Arc::new(revoked.map_err(|e| format!("signed-out sessions: {e}"))?);

    // Signals are taken synchronously by the main thread: block them here,
    // before any executor thread exists, so every thread inherits the mask.
    // SAFETY: sigset manipulation on stack values.
    let signals = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::sigaddset(&mut set, libc::SIGUSR2);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };

    let shards = config.shards;
    let mut adopted: Vec<Vec<_>> = (0..shards).map(|_| Vec::new()).collect();
    let mut early: Vec<Vec<_>> = (0..shards).map(|_| Vec::new()).collect();
    // Each early connection's id and shard.
    let mut early_ids = std::collections::HashMap::new();
    let (control, mut handed_count) = match inherited {
        Some(inherited) => {
            let count = inherited.connections.len();
            for (fd, record) in inherited.connections {
                adopted[super::shard_for(&record.org_id, shards)].push((fd, record));
            }
            for (fd, record) in inherited.early.into_iter().flatten() {
                let shard = super::shard_for(&record.org_id, shards);
                early_ids.insert(record.id, shard);
                early[shard].push((fd, record));
            }
            (Some(inherited.channel), Some(count))
        }
        None => (None, None),
    };
    let mesh =
        mesh::Mesh::new(shards).map_err(|e| format!("cannot create the shard inboxes: {e}"))?;
    // Cluster mode: the NATS thread starts before the shards; a NATS that
    // is not reachable yet leaves the node up and not ready.
    let bridge = match &config.cluster {
        None => None,
        Some(cluster) => {
            let bridge = crate::cluster::Bridge::start(
                &cluster.urls,
                crate::cluster::StreamLimits {
                    messages_max: config.history_messages,
                    age_ms: config.history_age_ms,
                    replicas: cluster.replicas,
                },
                config.session_ttl_secs,
            )?;
            bridge.sync_signouts(revoked.clone());
            bridge.sync_keys(config.data_dir.clone());
            // Every node signs session cookies with the cluster's secret.
            let local = signer.secret_text();
            match bridge.shared_session_secret(&local) {
                Some(shared) if shared != local => {
                    signer =
                        crate::auth::sessions::SessionSigner::adopt(&config.data_dir, &shared)?;
                }
                Some(_) => {}
                None => {
                    eprintln!(
                        "hookstream: cluster: the cluster's session secret could not be read at startup: this node signs session cookies with its own secret until it can (it keeps trying)"
                    );
                    let data_dir = config.data_dir.clone();
                    let inboxes = mesh.clone();
                    bridge.agree_session_secret_later(local, move |shared| {
                        match crate::auth::sessions::SessionSigner::adopt(&data_dir, &shared) {
                            Ok(signer) => {
                                eprintln!(
                                    "hookstream: cluster: signing session cookies with the cluster's secret now (cookies this node signed before still work here)"
                                );
                                for shard in 0..shards {
                                    let _ = inboxes
                                        .send_to(shard, ShardMessage::SessionSigner(signer.clone()));
                                }
                            }
                            Err(e) => eprintln!(
                                "hookstream: cluster: the cluster's session secret was not adopted: {e}"
                            ),
                        }
                    });
                }
            }
            let inboxes = mesh.clone();
            bridge.set_deliver(Arc::new(move |shard, event| {
                let _ = inboxes.send_to(shard, ShardMessage::Cluster(event));
            }));
            Some(bridge)
        }
    };
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
        exited: std::sync::atomic::AtomicUsize::new(0),
        connections_max_per_shard: connections_max.div_ceil(shards).max(1),
        tls: tls.clone(),
        listeners,
        adopted: std::sync::Mutex::new(adopted),
        early: std::sync::Mutex::new(early),
        early_pass,
        gated,
        bridge,
    });
    crate::handoff::trace("new: starting the shards");
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
    let mut handles = Vec::new();
    for id in 0..shards {
        let shared = shared.clone();
        let mesh = mesh.clone();
        let ready = ready_tx.clone();
        // Pinned to its core from the start — except in a hot upgrade's new
        // process, whose shards run unbound until they took their
        // connections up (see `pin_to`).
        let placement = if gated {
            Placement::Unbound
        } else {
            Placement::Fixed(id % cpus)
        };
        let builder = LocalExecutorBuilder::new(placement)
            .name(&format!("shard-{id}"))
            .ring_depth(1024)
            .io_memory(2 << 20)
            .preempt_timer(Duration::from_millis(5))
            .spin_before_park(Duration::from_micros(0));
        let handle = builder
            .spawn(move || async move { shard_main(id, id % cpus, shared, mesh, ready).await })
            .map_err(|e| glommio_error(&e.to_string()))?;
        handles.push(handle);
    }
    drop(ready_tx);
    // Opening history scans segments, so a large data directory may take a
    // while; a shard that says nothing for this long is stuck, and the
    // process ends with a line instead of hanging.
    let wait_shards = || -> Result<(), String> {
        let startup_deadline = Instant::now() + STARTUP_TIMEOUT;
        for _ in 0..shards {
            let left = startup_deadline.saturating_duration_since(Instant::now());
            match ready_rx.recv_timeout(left) {
                Ok(Ok(())) => {}
                Ok(Err(message)) if gated => {
                    // The old process serves on (it sees this one exit): no
                    // shard may drain, which would close its connections.
                    if let Some(control) = &control {
                        let _ = control.send(crate::handoff::kind::FAILED, message.as_bytes(), &[]);
                    }
                    return Err(message);
                }
                Ok(Err(message)) => {
                    stop_shards(&mesh, shards);
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
        Ok(())
    };
    wait_shards()?;
    if let (true, Some(control)) = (early_pass, &control) {
        // State version 2: every connection passed early is registered;
        // the old process freezes now. Then the records (and the sockets
        // of the connections accepted since), READY, and the log.
        crate::handoff::trace("new: early connections registered, sending EARLY_READY");
        // Read straight into each shard's list (no copy on the pause's
        // path).
        let connections = upgrade_process::receive_freeze(control, &early_ids, shards)?;
        lock = Some(
            upgrade_process::confirm_freeze(control)?
                .ok_or("handoff: the old process passed no lock")?,
        );
        // Sign-outs the old process wrote since this one loaded the file
        // (before the freeze) count too.
        if let Err(e) = shared
            .revoked
            .reload_only(&config.data_dir, crate::auth::sessions::now_unix_secs())
        {
            let e = format!("signed-out sessions: {e}");
            let _ = control.send(crate::handoff::kind::FAILED, e.as_bytes(), &[]);
            return Err(e);
        }
        handed_count = Some(connections.iter().map(Vec::len).sum());
        *shared.adopted.lock().expect("not poisoned") = connections;
        for id in 0..shards {
            let _ = mesh.send_to(id, ShardMessage::Prepare);
        }
        wait_shards()?;
    }
    if let (true, Some(control)) = (gated, &control) {
        crate::handoff::trace("new: every shard ready, sending PREPARED");
        await_commit(control)?;
        crate::handoff::trace("new: COMMIT received");
        for id in 0..shards {
            let _ = mesh.send_to(id, ShardMessage::Go);
        }
        // SERVING (and the old process's "frozen for") once every shard
        // took its connections up; bounded, the commit is made anyway.
        let deadline = Instant::now() + Duration::from_secs(10);
        for _ in 0..shards {
            let left = deadline.saturating_duration_since(Instant::now());
            if ready_rx.recv_timeout(left).is_err() {
                break;
            }
        }
    }
    // Every shard listens: the port is theirs now.
    drop(holds);
    // The pid file names the serving process (after an upgrade, this one).
    if let Err(e) = upgrade_process::write_pid_file(&config.data_dir) {
        stop_shards(&mesh, shards);
        return Err(format!("cannot write the pid file: {e}"));
    }
    let (ws, admin) = match (config.tls.is_some(), config.admin_tls) {
        (false, _) => ("ws", "http"),
        (true, false) => ("wss", "http"),
        (true, true) => ("wss", "https"),
    };
    let tls_note = match &config.tls {
        Some(files) => format!(
            ", TLS on the {} with {}",
            if config.admin_tls {
                "public and admin listeners"
            } else {
                "public listener"
            },
            files.cert.display()
        ),
        None => String::new(),
    };
    let listen_line = format!(
        "hookstream listening on {ws}://{}/v1/ws (admin {admin}://{}){tls_note}, {} shard(s), data dir {}",
        config.listen,
        config.admin_listen,
        shards,
        config.data_dir.display()
    );
    crate::log::info(&listen_line);
    if let (Some(control), Some(count)) = (&control, handed_count) {
        crate::log::info(format_args!(
            "hookstream: took over {count} connection(s) from the previous process (hot upgrade)"
        ));
        upgrade_process::notify_systemd(&format!("MAINPID={}\nREADY=1", std::process::id()));
        let mut serving = std::process::id().to_le_bytes().to_vec();
        serving.extend_from_slice(&crate::handoff::monotonic_ns().to_le_bytes());
        let _ = control.send(crate::handoff::kind::SERVING, &serving, &[]);
        crate::handoff::trace("new: SERVING sent");
    } else {
        upgrade_process::notify_systemd("READY=1");
    }
    drop(control);
    on_ready(&config, &admin_token);

    // Wait for a signal, or for a shard to die; SIGHUP and a changed
    // certificate or key file (looked at every 2 s) reload the TLS pair.
    let mut tls_stamp = tls.as_ref().and_then(|tls| tls.stamp());
    let mut tls_checked = std::time::Instant::now();
    loop {
        let timeout = libc::timespec {
            tv_sec: 0,
            tv_nsec: 200_000_000,
        };
        // SAFETY: sigtimedwait with a blocked set and stack values.
        let signal = unsafe { libc::sigtimedwait(&signals, std::ptr::null_mut(), &timeout) };
        if signal == libc::SIGTERM || signal == libc::SIGINT {
            crate::log::info(
                "hookstream: signal received, closing connections with 1001 and stopping",
            );
            break;
        }
        if signal == libc::SIGUSR2 {
            let pid = std::process::id();
            let outcome = upgrade_process::perform(upgrade_process::Old {
                mesh: &mesh,
                shards,
                listeners: &shared.listeners,
                lock: &mut lock,
            });
            match outcome {
                Outcome::Serving {
                    pid: new_pid,
                    connections,
                    frozen,
                } => {
                    crate::log::info(format_args!(
                        "hookstream: upgrade: process {new_pid} serves every connection now ({connections} handed over, frozen for {} ms); process {pid} exits",
                        frozen.as_millis()
                    ));
                    upgrade_process::write_outcome(
                        &config.data_dir,
                        &format!("ok {pid} {new_pid}"),
                    );
                    stop_shards(&mesh, shards);
                    for handle in handles {
                        let _ = handle.join();
                    }
                    return Ok(());
                }
                Outcome::Failed(reason) => {
                    crate::log::warn(format_args!(
                        "hookstream: upgrade failed, this process serves on: {reason}"
                    ));
                    upgrade_process::write_outcome(
                        &config.data_dir,
                        &format!("failed {pid} {reason}"),
                    );
                }
                Outcome::Lost(reason) => {
                    crate::log::error(format_args!(
                        "hookstream: upgrade failed after the handover, stopping: {reason}"
                    ));
                    upgrade_process::write_outcome(
                        &config.data_dir,
                        &format!("failed {pid} {reason} (the old process stopped)"),
                    );
                    stop_shards(&mesh, shards);
                    for handle in handles {
                        let _ = handle.join();
                    }
                    return Err(format!("upgrade failed after the handover: {reason}"));
                }
            }
        }
        if let Some(tls) = &tls {
            let hangup = signal == libc::SIGHUP;
            if hangup || tls_checked.elapsed() >= std::time::Duration::from_secs(2) {
                tls_checked = std::time::Instant::now();
                let stamp = tls.stamp();
                if hangup || (stamp.is_some() && stamp != tls_stamp) {
                    tls_stamp = stamp;
                    match tls.reload() {
                        Ok(()) => crate::log::info(format_args!(
                            "hookstream: TLS pair reloaded from {} and {} for new connections",
                            tls.cert.display(),
                            tls.key.display()
                        )),
                        Err(e) => crate::log::warn(format_args!(
                            "hookstream: TLS pair not reloaded, the old one stays in use: {e}"
                        )),
                    }
                }
            }
        }
        if shared.exited.load(Ordering::SeqCst) > 0 {
            stop_shards(&mesh, shards);
            for handle in handles {
                let _ = handle.join();
            }
            return Err("a shard stopped unexpectedly".to_string());
        }
    }
    stop_shards(&mesh, shards);
    for handle in handles {
        let _ = handle.join();
    }
    upgrade_process::remove_pid_file(&config.data_dir);
    Ok(())
}

/// In a hot upgrade's new process, once every shard is ready (and none has
/// read or written a byte of a connection): says PREPARED and waits
/// (bounded) for the old process to commit the handover. Anything else
/// ends this process without a drain (the old process serves on).
fn await_commit(control: &crate::handoff::Channel) -> Result<(), String> {
    use crate::handoff::kind;
    match super::fault::handoff_fault().as_deref() {
        // SAFETY: _exit ends the process at once (no exit handlers racing
        // the running shards: the status is the one asked for).
        Some("exit-when-prepared") => unsafe { libc::_exit(5) },
        Some("hang-when-prepared") => loop {
            std::thread::sleep(Duration::from_secs(1));
        },
        Some("slow-when-prepared") => std::thread::sleep(Duration::from_secs(12)),
        _ => {}
    }
    control
        .send(kind::PREPARED, b"", &[])
        .map_err(|e| format!("handoff: the old process went away before the commit: {e}"))?;
    match control.receive(upgrade_process::COMMIT_TIMEOUT) {
        Ok(Some((kind::COMMIT, _, _))) => Ok(()),
        // Never served without the commit: the end of the channel may be
        // the old process serving on (it stopped this process's parent, a
        // wrapper that did not exec, say) as well as its death.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Err("handoff: the old process ended the handoff before it committed".to_string())
        }
        Ok(Some((kind::FAILED, body, _))) => Err(format!(
            "handoff: the old process gave up: {}",
            String::from_utf8_lossy(&body)
        )),
        Ok(Some((other, _, fds))) => {
            for fd in fds {
                // SAFETY: received descriptors we own.
                unsafe { libc::close(fd) };
            }
            Err(format!(
                "handoff: unexpected message {other} before the commit"
            ))
        }
        Ok(None) => Err(format!(
            "handoff: the old process did not commit within {} s",
            upgrade_process::COMMIT_TIMEOUT.as_secs()
        )),
        Err(e) => Err(format!("handoff: {e}")),
    }
}

/// Triggers every shard's shutdown signal, through its inbox (a shard that
/// already stopped refuses the message; nothing else to do for it).
fn stop_shards(mesh: &mesh::Mesh, shards: usize) {
    for id in 0..shards {
        let _ = mesh.send_to(id, ShardMessage::Stop);
    }
}

/// One shard's life: open its history, make its state, bind its
/// listeners, start its tasks, report ready; then wait for the shutdown
/// signal and drain (see `docs/ARCHITECTURE.md`, Shape).
async fn shard_main(
    id: usize,
    cpu: usize,
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
    let mut registry = Registry::new(limits);
    if config.compression {
        registry.enable_compression(config.compression_min_bytes);
    }
    // State version 2 of a hot upgrade: the connections passed ahead of
    // the freeze are registered now, while the old process serves them
    // (nothing here reads, writes or dispatches); then the old process
    // freezes, and this shard waits to be told the log is its to open.
    // Messages that arrive meanwhile are handled once the inbox task runs.
    let mut early: std::collections::HashMap<u64, upgrade::Early> =
        std::collections::HashMap::new();
    let mut held = Vec::new();
    let mut room: Vec<upgrade::Adopted> = Vec::new();
    if shared.early_pass {
        let passed = std::mem::take(&mut shared.early.lock().expect("not poisoned")[id]);
        crate::handoff::trace(&format!(
            "new: shard {id} registering {} connections passed early",
            passed.len()
        ));
        // In slices with a pause between them: one long burst would leave
        // this thread owing the scheduler its share, and the next wake-up
        // (`Prepare`, inside the pause) would wait for it.
        let mut passed = passed.into_iter().peekable();
        while passed.peek().is_some() {
            for (fd, record) in passed.by_ref().take(EARLY_SLICE) {
                let id = record.id;
                let registered = upgrade::register_early(&mut registry, &reactor, fd, record);
                early.insert(id, registered);
            }
            if passed.peek().is_some() {
                glommio::timer::sleep(Duration::from_micros(500)).await;
            }
        }
        crate::handoff::trace(&format!("new: shard {id} registered them"));
        // The list of adopted connections, touched before the pause.
        room = upgrade_process::touched(early.len() + early.len() / 8 + 64, || {
            upgrade::Adopted::Gone
        });
        let _ = ready.send(Ok(()));
        let mut prepare = false;
        while !prepare {
            for message in mesh.receive(id).await {
                match message {
                    ShardMessage::Prepare => prepare = true,
                    other => held.push(other),
                }
            }
        }
        crate::handoff::trace(&format!("new: shard {id} told to prepare"));
    }
    let history_config = crate::history::HistoryConfig {
        dir: config.data_dir.join("history"),
        durability: config.durability,
        messages_max: config.history_messages,
        age_ms: config.history_age_ms,
    };
    let shutdown = crate::shutdown::Shutdown::new();
    if shared.gated {
        crate::handoff::trace(&format!("new: shard {id} opening the log"));
    }
    let history = match &shared.bridge {
        Some(bridge) => crate::history::History::new(
            crate::history::Backend::Cluster(crate::history::JetStreamLog::new(
                bridge.clone(),
                config.history_messages,
            )),
            shutdown.clone(),
        ),
        None => {
            match crate::history::History::open(history_config, id, config.shards, shutdown.clone())
                .await
            {
                Ok(history) => history,
                Err(e) => {
                    let _ = ready.send(Err(format!("cannot open the message history: {e}")));
                    return;
                }
            }
        }
    };
    for (org_id, seq) in &history.last_seqs() {
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
        inflater: RefCell::new(crate::protocol::deflate::Inflater::new()),
        shutdown: shutdown.clone(),
        http_wake: crate::notify::Notify::default(),
        http_streams: Cell::new(0),
        history,
        replays: replay::Replays::default(),
        reactor,
        lingering: RefCell::new(Vec::new()),
        accept_wake: crate::notify::Notify::default(),
        parked: public::Parked::default(),
        access: access::AccessState::new(&config, shared.signer.clone(), shared.revoked.clone()),
        tls: shared.tls.clone(),
        handover: upgrade::Handover::default(),
        cluster: match (&shared.bridge, &config.cluster) {
            (Some(bridge), Some(cluster)) => Some(super::cluster::ShardCluster::new(
                bridge.clone(),
                cluster.node_id.clone(),
            )),
            _ => None,
        },
    });
    let (public_listener, admin_listener) = shared.listeners[id];
    let go = Rc::new(crate::notify::Notify::default());

    // Messages from the other shards.
    let mesh_task = {
        let shard = shard.clone();
        let mesh = mesh.clone();
        let go = go.clone();
        let mut batch = std::collections::VecDeque::from(held);
        glommio::spawn_local(async move {
            loop {
                for message in std::mem::take(&mut batch) {
                    match message {
                        ShardMessage::Adopt(handoff) => public::adopt(&shard, handoff),
                        ShardMessage::Stop => shard.shutdown.trigger(),
                        ShardMessage::Freeze { version, reply } => {
                            let shard = shard.clone();
                            glommio::spawn_local(async move {
                                let snapshot = upgrade::freeze(&shard, version).await;
                                let _ = reply.send((shard.id, snapshot));
                            })
                            .detach();
                        }
                        ShardMessage::PassEarly { channel, reply } => {
                            let shard = shard.clone();
                            glommio::spawn_local(async move {
                                let passed = upgrade::pass_early(&shard, &channel).await;
                                let _ = reply.send((shard.id, passed));
                            })
                            .detach();
                        }
                        // Only awaited before this task starts.
                        ShardMessage::Prepare => {}
                        ShardMessage::Thaw => upgrade::thaw(&shard),
                        ShardMessage::Go => go.notify(),
                        ShardMessage::SessionSigner(signer) => shard.access.adopt_signer(signer),
                        ShardMessage::Hand { reply } => {
                            let shard = shard.clone();
                            glommio::spawn_local(async move {
                                upgrade::hand(&shard).await;
                                let _ = reply.send((shard.id, ()));
                            })
                            .detach();
                        }
                        ShardMessage::Retire { reply } => {
                            let shard = shard.clone();
                            glommio::spawn_local(async move {
                                upgrade::retire(&shard).await;
                                let _ = reply.send((shard.id, ()));
                            })
                            .detach();
                        }
                        ShardMessage::Release { reply } => {
                            let shard = shard.clone();
                            glommio::spawn_local(async move {
                                upgrade::release(&shard).await;
                                let _ = reply.send((shard.id, ()));
                            })
                            .detach();
                        }
                        ShardMessage::Cluster(event) => super::cluster::on_event(&shard, event),
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
                                    async { super::history_routes::run_query(&shard, query).await },
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
                batch = mesh.receive(shard.id).await;
            }
        })
    };

    // Connections handed over by the previous process (hot upgrade):
    // registered now, read and written once it committed (`Go`). In
    // cluster mode their orgs are followed first (the inbox runs: the
    // follow's start comes through it), so that each channel's gap is
    // known; an org that cannot be followed fails the startup, and the old
    // process serves on.
    let records = std::mem::take(&mut shared.adopted.lock().expect("not poisoned")[id]);
    if shard.cluster.is_some() && !records.is_empty() {
        // A short record's org is its early record's.
        let orgs: std::collections::BTreeSet<&str> = records
            .iter()
            .filter_map(|(_, r)| match (r.same_as_early, early.get(&r.id)) {
                (false, _) => Some(r.org_id.as_str()),
                (true, Some(upgrade::Early::Registered { record, .. })) => {
                    Some(record.org_id.as_str())
                }
                (true, _) => None,
            })
            .collect();
        if let Err(e) = super::cluster::follow_all(&shard, orgs).await {
            let _ = ready.send(Err(e));
            return;
        }
    }
    if shared.gated {
        crate::handoff::trace(&format!("new: shard {id} log open, adopting"));
    }
    let mut gaps = upgrade::Gaps::default();
    let mut adopted = room;
    adopted.reserve(records.len());
    for (fd, record) in records {
        adopted.push(match fd {
            Some(fd) => upgrade::adopt_record(&shard, fd, record, &mut gaps),
            None => match early.remove(&record.id) {
                Some(registered) => upgrade::adopt_early(&shard, registered, record, &mut gaps),
                // The main thread checked every id against the early pass,
                // and a connection's org (so its shard) never changes.
                None => upgrade::Adopted::Gone,
            },
        });
    }
    // Passed early, closed or not carried since.
    for (_, registered) in early.drain() {
        upgrade::discard_early(&shard, registered);
    }
    if shared.gated {
        crate::handoff::trace(&format!("new: shard {id} adopted"));
    }
    if shared.gated {
        // Ready, and nothing touched: the main thread tells the old
        // process, which commits the handover (or gives up and ends this
        // process).
        let _ = ready.send(Ok(()));
        if go.generation() == 0 {
            go.wait(0).await;
        }
    }
    upgrade::start_adopted(&shard, adopted);
    if shared.gated {
        crate::handoff::trace(&format!("new: shard {id} serves"));
        // Pinned once the handover is over (the old process has retired):
        // moving to a busy core now would delay the first deliveries.
        glommio::spawn_local(async move {
            glommio::timer::sleep(Duration::from_secs(1)).await;
            pin_to(cpu);
        })
        .detach();
        // Once more: the main thread says SERVING when every shard serves.
        let _ = ready.send(Ok(()));
    }

    // Tasks that end when the shutdown starts: the accept loops (closing
    // their listeners), the heartbeat, the key reload, the demo traffic.
    let stopping_tasks = [
        spawn_until(
            &shutdown,
            public::accept_loop(shard.clone(), public_listener),
        ),
        spawn_until(&shutdown, public::expire_parked(shard.clone())),
        spawn_until(
            &shutdown,
            upgrade::accept_loop(shard.clone(), admin_listener, admin::on_accept),
        ),
        spawn_until(&shutdown, heartbeat_loop(shard.clone())),
        spawn_until(&shutdown, key_reload_loop(shard.clone())),
        spawn_until(&shutdown, sync_metrics_loop(shard.clone())),
        spawn_until(&shutdown, demo_loop(shard.clone(), config.demo && id == 0)),
    ];
    // Tasks that run until the drain ends, when this function returns and
    // drops them: the committer, retention, replays, the reactor (which
    // carries out the 1001 closes) and the inbox.
    let _history_tasks = [
        glommio::spawn_local(commit_loop(shard.clone())),
        glommio::spawn_local({
            let shard = shard.clone();
            async move { crate::history::retention_loop(&shard.history).await }
        }),
        glommio::spawn_local(replay::worker(shard.clone())),
        glommio::spawn_local({
            let shard = shard.clone();
            async move {
                if shard.cluster.is_some() {
                    super::cluster::sweep_loop(shard).await;
                }
            }
        }),
    ];
    let reactor_task = glommio::spawn_local(reactor::run(shard.clone()));
    // Writes the keys used until the shutdown, then once more.
    let last_used = glommio::spawn_local(access::last_used_loop(shard.clone()));
    if !shared.gated {
        let _ = ready.send(Ok(()));
    }

    shutdown.wait().await;
    upgrade::close_let_go(&shard);

    // Drain: the accept loops, heartbeat and key reload end; waiting
    // long-polls answer and SSE streams end (they hold the signal too);
    // every connection is closed with 1001; then wait, bounded.
    for task in stopping_tasks {
        task.await;
    }
    last_used.await;
    let keys = shard.registry.borrow().keys();
    for key in keys {
        shard
            .registry
            .borrow_mut()
            .request_close(key, CloseCode::GOING_AWAY);
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while (!shard.registry.borrow().is_empty() || shard.http_streams.get() > 0)
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

/// Spawns `task` on this shard, cut short when the shutdown starts.
fn spawn_until(
    shutdown: &crate::shutdown::Shutdown,
    task: impl std::future::Future<Output = ()> + 'static,
) -> glommio::Task<()> {
    let shutdown = shutdown.clone();
    glommio::spawn_local(async move {
        shutdown.run_until(task).await;
    })
}

/// Copies the registry's and the history's counters into the shared
/// metrics every 200 ms.
async fn sync_metrics_loop(shard: Rc<Shard>) {
    loop {
        glommio::timer::sleep(Duration::from_millis(200)).await;
        shard.sync_metrics();
    }
}

/// `--demo` (shard 0 only, `enabled`): a synthetic event, delivery and
/// issue every second.
async fn demo_loop(shard: Rc<Shard>, enabled: bool) {
    if !enabled {
        return;
    }
    let mut tick = 0u64;
    loop {
        glommio::timer::sleep(Duration::from_secs(1)).await;
        tick += 1;
        if let Err(e) = shard.publish(crate::demo::messages(tick)).await {
            crate::log::warn(format_args!("hookstream: demo publish failed: {e}"));
        }
    }
}

/// Pins the calling thread (a shard of a hot upgrade's new process, which
/// started unbound) to `cpu`, as every shard of a process started plainly
/// is from its start (`Placement::Fixed`). Until its connections are taken
/// up, an unbound shard runs on whichever core is free: pinned, it waited
/// for its own core at every wake-up during the pause, up to 7-11 ms when
/// another thread ran there (the scheduler does not preempt that thread for
/// one that just ran a long burst, such as registering ten thousand
/// connections), the longest single wait of the pause.
fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t on the stack, for this thread only.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        crate::log::warn(format_args!(
            "hookstream: cannot pin a shard to core {cpu}: {}",
            std::io::Error::last_os_error()
        ));
    }
}
