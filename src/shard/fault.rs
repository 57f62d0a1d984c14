//! Fault injection for the tests of the panic policy, in debug builds
//! only: with `HOOKSTREAM_DEBUG_PANIC_PATH=/some/path`, a plain-HTTP
//! request for that path panics on the shard that reads it. Release builds
//! compile this to nothing.

/// Panics when `path` is the one `HOOKSTREAM_DEBUG_PANIC_PATH` names.
#[cfg(debug_assertions)]
pub fn panic_if_asked(path: &str) {
    static PATH: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let asked = PATH.get_or_init(|| std::env::var("HOOKSTREAM_DEBUG_PANIC_PATH").ok());
    if asked.as_deref() == Some(path) {
        panic!("injected by HOOKSTREAM_DEBUG_PANIC_PATH");
    }
}

/// Release builds: nothing.
#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn panic_if_asked(_path: &str) {}

/// The failure a hot upgrade's new process is asked to play, in debug
/// builds only (`HOOKSTREAM_DEBUG_HANDOFF`): `reads-9` (its HELLO says it
/// reads state version 9 only), `reads-1` (version 1 only: the previous
/// one, which it does read), `exit-after-early` (it exits with status
/// 6 once its shards registered the connections passed ahead of the
/// freeze, before EARLY_READY), `slow-early` (it waits 1.5 s there, then
/// goes on), `exit-after-state` (it exits with status
/// 3 once it holds the sockets and records, before READY),
/// `exit-after-ready` (status 4 right after READY: it confirmed the
/// handoff), `exit-when-prepared` (status 5 once its shards opened the log
/// and registered the connections, before PREPARED),
/// `hang-when-prepared` (it sleeps there for ever), `slow-when-prepared`
/// (it sleeps there 12 s, then goes on).
#[cfg(debug_assertions)]
pub fn handoff_fault() -> Option<String> {
    std::env::var("HOOKSTREAM_DEBUG_HANDOFF").ok()
}

/// Release builds: none.
#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn handoff_fault() -> Option<String> {
    None
}

/// How long a hot upgrade's old process waits for the new one to be ready
/// to serve, in debug builds when `HOOKSTREAM_DEBUG_HANDOFF_WAIT_MS` says
/// (tests of a new process that goes silent).
#[cfg(debug_assertions)]
pub fn handoff_wait() -> Option<std::time::Duration> {
    std::env::var("HOOKSTREAM_DEBUG_HANDOFF_WAIT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(std::time::Duration::from_millis)
}

/// Release builds: the built-in bound.
#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn handoff_wait() -> Option<std::time::Duration> {
    None
}
