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

/// Longest a closing HTTP connection keeps reading what its client still
/// sends after the answer (nginx's `lingering_timeout`).
const LINGER: Duration = Duration::from_secs(1);

/// Most bytes read and dropped while lingering.
const LINGER_BYTES: usize = 256 * 1024;

/// Closes an HTTP connection after its answer was written, when the client
/// may still be sending (a body refused before it was read: 401, 411, 413,
/// 431). Closing a socket with unread input makes the kernel send a reset,
/// which can reach the client before it reads the answer, or fail its
/// write of the rest of the body before it looks. So: FIN after the answer,
/// then read and drop what keeps arriving — at most [`LINGER_BYTES`] for at
/// most [`LINGER`] — until the client closes its side. Nothing read is kept:
/// the cost is one 16 KiB buffer for up to a second, taken from the heap so
/// that the tasks that may linger (every public connection's handshake) do
/// not carry it, and the descriptor stays counted against its address
/// meanwhile.
pub async fn linger_close(stream: &mut TcpStream) {
    use futures_lite::AsyncReadExt;
    use futures_lite::AsyncWriteExt;
    let _ = stream.flush().await;
    if stream.shutdown(std::net::Shutdown::Write).await.is_err() {
        return;
    }
    let deadline = std::time::Instant::now() + LINGER;
    let mut sink = vec![0u8; 16 * 1024];
    let mut dropped = 0;
    while dropped < LINGER_BYTES {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match stream.read(&mut sink).await {
            Ok(0) | Err(_) => return,
            Ok(read) => dropped += read,
        }
    }
}
