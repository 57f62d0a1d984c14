//! What `serve` checks and prepares before any shard starts: the
//! locked-memory and open-files limits, the data directory and its lock,
//! and the listening addresses (probed, held, then bound by every shard
//! with SO_REUSEPORT). Each problem is one line naming it and the fix.

use std::path::PathBuf;

use crate::config::Config;

/// Raises RLIMIT_NOFILE's soft limit to the hard one and checks that it
/// covers the configured connections. Returns the connection budget.
pub fn check_open_files(config: &Config) -> Result<usize, String> {
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
pub fn check_memlock() -> Result<(), String> {
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
pub fn lock_data_dir(dir: &PathBuf) -> Result<std::fs::File, String> {
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

/// Accept backlog of each shard's listeners (the kernel caps it at
/// `net.core.somaxconn`).
const LISTEN_BACKLOG: i32 = 4096;

/// A listening socket with SO_REUSEPORT (every shard binds the same
/// address) and SO_REUSEADDR, non-blocking (the accept loops take
/// connections with `accept4` once it is readable; see
/// `upgrade::accept_loop`), close-on-exec. glommio's own `bind` sets only
/// the first option; without the second, the TIME_WAIT sockets a stopped
/// server leaves behind make a restart on the same port fail for a minute.
/// The process owns the descriptor for its life.
pub fn listen_socket(addr: std::net::SocketAddr) -> std::io::Result<std::os::unix::io::RawFd> {
    use std::os::unix::io::IntoRawFd;
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM.cloexec(),
        None,
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into_raw_fd())
}

/// Sets TCP_NODELAY on the public listener, which Linux copies to every
/// accepted socket (one `setsockopt` less per connection); also on a
/// listener inherited from an older process.
pub fn set_listener_nodelay(fd: std::os::unix::io::RawFd) -> std::io::Result<()> {
    let socket = std::mem::ManuallyDrop::new(
        // SAFETY: borrowed for the call; ManuallyDrop keeps it open.
        unsafe { <socket2::Socket as std::os::unix::io::FromRawFd>::from_raw_fd(fd) },
    );
    socket.set_nodelay(true)
}

/// The address a listening socket is bound to.
pub fn local_addr(fd: std::os::unix::io::RawFd) -> std::io::Result<std::net::SocketAddr> {
    let socket = std::mem::ManuallyDrop::new(
        // SAFETY: borrowed for the call; ManuallyDrop keeps it open.
        unsafe { <socket2::Socket as std::os::unix::io::FromRawFd>::from_raw_fd(fd) },
    );
    socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| std::io::Error::other("not an IP socket"))
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
pub fn probe_bind(
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

pub fn glommio_error(text: &str) -> String {
    if text.contains("MemLock") || text.contains("memlock") {
        return "the locked-memory limit (RLIMIT_MEMLOCK) is too low for io_uring: raise it with \
                `ulimit -l unlimited` (or LimitMEMLOCK=infinity in the systemd unit)"
            .to_string();
    }
    format!("cannot start the shard runtime: {text}")
}
