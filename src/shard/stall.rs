//! The write timeout of plain-HTTP answers (PROTOCOL.md §6): a client that
//! stops taking the bytes of an answer is disconnected after
//! [`WRITE_TIMEOUT_MS`], on both listeners.
//!
//! Two mechanisms, because each alone leaves a gap:
//! - glommio's write timeout fails a write that makes no progress for that
//!   long (nginx's `send_timeout`). But while the peer advertises a zero
//!   window, the kernel keeps growing the socket's send buffer (autotuning,
//!   up to `tcp_wmem`'s maximum), so the server's writes keep "progressing"
//!   into it for many seconds more;
//! - `TCP_USER_TIMEOUT` makes the kernel abort the connection when data has
//!   stayed unacknowledged, or untransmitted because of a zero window, for
//!   that long, whatever the application does; the pending write then
//!   fails at once. It also gives back the socket of a client that vanished
//!   (unplugged, no FIN) while it had an answer in flight.
//!
//! WebSocket connections get neither: their slow consumers are handled by
//! the send-queue limit and close code 1013 (PROTOCOL.md §6), and a
//! WebSocket client may pause reading for longer than this.

use std::os::unix::io::AsRawFd;
use std::time::Duration;

use glommio::net::TcpStream;

use crate::limits::WRITE_TIMEOUT_MS;

/// Bounds every answer written on `stream` by [`WRITE_TIMEOUT_MS`].
pub fn bound_http_answers(stream: &TcpStream) {
    let _ = stream.set_write_timeout(Some(Duration::from_millis(WRITE_TIMEOUT_MS)));
    set_user_timeout(stream, WRITE_TIMEOUT_MS as libc::c_uint);
}

/// Undoes [`bound_http_answers`] for a kept-alive connection whose later
/// request was a WebSocket upgrade: the socket option outlives the glommio
/// stream (the reactor keeps a duplicate of the descriptor).
pub fn unbound_for_websocket(stream: &TcpStream) {
    let _ = stream.set_write_timeout(None);
    // 0 restores the kernel's default.
    set_user_timeout(stream, 0);
}

/// Sets `TCP_USER_TIMEOUT` on `stream`'s socket.
fn set_user_timeout(stream: &TcpStream, timeout_ms: libc::c_uint) {
    // SAFETY: setsockopt on a socket the stream owns, with a value of the
    // size the option takes.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            (&timeout_ms as *const libc::c_uint).cast(),
            std::mem::size_of::<libc::c_uint>() as libc::socklen_t,
        );
    }
}
