//! HTTP/1.1 request heads and the WebSocket opening handshake (RFC 6455 §4).
//!
//! Pure: every function takes bytes and answers a value, "need more"
//! (`Ok(None)`) or an [`HttpError`] that maps to exactly one HTTP status.
//! Nothing here does I/O, and the upgrade path (parse the head, validate the
//! upgrade, compute the accept key, write the 101) allocates nothing: every
//! string it hands out borrows from the caller's read buffer, and percent
//! decoding only allocates when a value really contains an escape.
//!
//! The head parser sits on `httparse` and adds what httparse leaves to us:
//! the size and header-count limits of `limits.rs`, HTTP/1.1 only, exactly
//! one `Host`, no `Transfer-Encoding` (bodies are `Content-Length` only, so
//! chunked requests get 411 and request smuggling through conflicting
//! framing headers is impossible), and a bounded, consistent `Content-Length`.
//! [`parse_head_with`] relaxes two of these where a listener asks for it
//! ([`HeadRules`]): `Transfer-Encoding: chunked` alone as a body's framing
//! (never next to a `Content-Length`), and HTTP/1.0 health probes without
//! `Host`.
//!
//! - this file: [`HttpError`] (one variant per problem, one status each),
//!   reason phrases and error codes by status;
//! - `head`: parsing a request head and reading its headers and
//!   credentials; `target`: the path, the query and percent-decoding;
//! - `upgrade`: the WebSocket handshake and the 101;
//! - `response`: writing answers and error answers.

mod head;
mod response;
mod target;
mod upgrade;

pub use self::head::*;
pub use self::response::*;
pub use self::target::*;
pub use self::upgrade::*;
use crate::limits::{HEADERS_MAX, HEAD_BYTES_MAX};

/// Why a request head or an upgrade request was refused. Each variant is one
/// problem and maps to exactly one status through [`HttpError::status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// The bytes are not an HTTP/1.x request head (bad method token, bad
    /// target, bad header name or value, bad line endings).
    #[error("malformed request head")]
    Malformed,
    /// The head did not end within `HEAD_BYTES_MAX` bytes.
    #[error("request head larger than {HEAD_BYTES_MAX} bytes")]
    HeadTooLarge,
    /// The head carries more than `HEADERS_MAX` header lines.
    #[error("more than {HEADERS_MAX} request headers")]
    TooManyHeaders,
    /// The request line names a version other than HTTP/1.1.
    #[error("HTTP version other than HTTP/1.1")]
    NotHttp11,
    /// An HTTP/1.1 request without a (non-empty) `Host` header (RFC 9112 §3.2).
    #[error("missing Host header")]
    MissingHost,
    /// More than one `Host` header (RFC 9112 §3.2 demands 400).
    #[error("more than one Host header")]
    DuplicateHost,
    /// The request uses `Transfer-Encoding`; bodies must carry a
    /// `Content-Length` instead.
    #[error("Transfer-Encoding is not supported, send Content-Length")]
    LengthRequired,
    /// A `Content-Length` that is not a decimal number, or several that
    /// disagree.
    #[error("invalid Content-Length")]
    BadContentLength,
    /// A `Content-Length` above the body limit of the route.
    #[error("request body too large")]
    BodyTooLarge,
    /// An upgrade request with a method other than GET.
    #[error("method not allowed, the WebSocket upgrade needs GET")]
    MethodNotAllowed,
    /// A `HEAD` of the upgrade path: refused like any method but GET,
    /// with an answer that has no body (RFC 9110 §9.3.2).
    #[error("method not allowed, the WebSocket upgrade needs GET")]
    HeadNotAllowed,
    /// An upgrade request whose `Upgrade` header lacks the token `websocket`.
    #[error("missing Upgrade: websocket")]
    NotAnUpgrade,
    /// An upgrade request whose `Connection` header lacks the token `upgrade`.
    #[error("missing Connection: upgrade")]
    ConnectionNotUpgrade,
    /// `Sec-WebSocket-Key` absent, repeated, or not base64 of 16 bytes.
    #[error("invalid Sec-WebSocket-Key")]
    BadWebSocketKey,
    /// `Sec-WebSocket-Version` not 13.
    #[error("unsupported Sec-WebSocket-Version, only 13 is supported")]
    UnsupportedWebSocketVersion,
    /// An upgrade request without `Sec-WebSocket-Version`: malformed
    /// (RFC 6455 §4.2.1 requires it), not a version we could name.
    #[error("missing Sec-WebSocket-Version")]
    MissingWebSocketVersion,
    /// `Transfer-Encoding: chunked` next to a `Content-Length`: two framings
    /// that disagree are how request smuggling works (RFC 9112 §6.3).
    #[error("both Transfer-Encoding and Content-Length")]
    ConflictingFraming,
    /// An upgrade request announcing a body: after the head the connection
    /// speaks WebSocket frames, so body bytes would be misread as frames.
    #[error("upgrade request with a body")]
    UpgradeWithBody,
}

impl HttpError {
    /// The HTTP status answered for this problem; the one place the mapping
    /// lives.
    pub fn status(self) -> u16 {
        match self {
            HttpError::Malformed => 400,
            HttpError::HeadTooLarge => 431,
            HttpError::TooManyHeaders => 431,
            HttpError::NotHttp11 => 505,
            HttpError::MissingHost => 400,
            HttpError::DuplicateHost => 400,
            HttpError::LengthRequired => 411,
            HttpError::BadContentLength => 400,
            HttpError::BodyTooLarge => 413,
            HttpError::MethodNotAllowed | HttpError::HeadNotAllowed => 405,
            HttpError::NotAnUpgrade => 400,
            HttpError::ConnectionNotUpgrade => 400,
            HttpError::BadWebSocketKey => 400,
            HttpError::UnsupportedWebSocketVersion => 426,
            HttpError::MissingWebSocketVersion => 400,
            HttpError::ConflictingFraming => 400,
            HttpError::UpgradeWithBody => 400,
        }
    }

    /// Headers the answer to this problem must carry besides the ones
    /// [`write_error`] adds by status: a 405 from [`validate_upgrade`] must
    /// name the allowed method (RFC 9110 §15.5.6).
    pub fn required_headers(self) -> &'static [(&'static str, &'static str)] {
        match self {
            HttpError::MethodNotAllowed | HttpError::HeadNotAllowed => &[("Allow", "GET")],
            _ => &[],
        }
    }
}

/// The reason phrase of a status this server answers; `""` for any other
/// status, which HTTP/1.1 allows (the phrase is informational only).
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

/// The machine-readable code in the JSON body `{"error":"<code>"}` of an
/// error answer with this status; `"error"` for a status without its own code.
pub fn error_code(status: u16) -> &'static str {
    match status {
        400 => "bad_request",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        408 => "request_timeout",
        411 => "length_required",
        413 => "payload_too_large",
        426 => "upgrade_required",
        429 => "rate_limited",
        431 => "headers_too_large",
        500 => "internal_error",
        503 => "unavailable",
        505 => "http_version_not_supported",
        _ => "error",
    }
}

#[cfg(test)]
mod tests;
