//! The WebSocket opening handshake (RFC 6455 §4.2): validating an upgrade
//! request, the accept key, and the `101 Switching Protocols` answer.

use std::borrow::Cow;

use base64::Engine as _;
use sha1::Digest as _;

use super::*;

/// A valid WebSocket upgrade request: what the server needs to authenticate
/// it and to answer 101. Every field borrows from the read buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade<'b> {
    /// `Sec-WebSocket-Key` as sent (base64 of 16 bytes, whitespace trimmed):
    /// the input of [`accept_key`].
    pub key: &'b [u8],
    /// The `Host` header; the default allowed origin.
    pub host: &'b [u8],
    /// The `Origin` header; browsers always send it, and a cookie-authenticated
    /// upgrade is only accepted when it is allowed (cross-site hijacking).
    pub origin: Option<&'b [u8]>,
    /// The decoded `?token=` query parameter, the first credential tried;
    /// `None` when absent, empty or undecodable.
    pub token: Option<Cow<'b, str>>,
    /// The token of `Authorization: Bearer <token>`, the second credential.
    pub bearer: Option<&'b str>,
    /// The value of the `hs_session` cookie, the third credential.
    pub session_cookie: Option<&'b str>,
}

/// Name of the browser session cookie (PROTOCOL.md §5).
pub const SESSION_COOKIE_NAME: &str = "hs_session";

/// The only WebSocket protocol version spoken (RFC 6455).
pub const WEBSOCKET_VERSION: &str = "13";

/// Check a parsed head against RFC 6455 §4.2.1 and extract the credentials.
///
/// Order of checks: GET (else `MethodNotAllowed`, or `HeadNotAllowed` for
/// a HEAD, 405), `Host` present,
/// no body, `Upgrade` lists `websocket`, `Connection` lists `upgrade` (both
/// case-insensitive token lists, so `keep-alive, Upgrade` is fine),
/// `Sec-WebSocket-Version` present (else `MissingWebSocketVersion`, 400)
/// and `13` (else 426, checked before the key so that a client of another
/// draft learns the version we speak), and
/// exactly one `Sec-WebSocket-Key` that is base64 of 16 bytes. HTTP/1.1 is
/// already guaranteed by [`parse_head`]. Allocates only when the token holds
/// a percent-escape.
pub fn validate_upgrade<'b>(head: &Head<'b, '_>) -> Result<Upgrade<'b>, HttpError> {
    if head.method == "HEAD" {
        return Err(HttpError::HeadNotAllowed);
    }
    if head.method != "GET" {
        return Err(HttpError::MethodNotAllowed);
    }
    if head.host.is_empty() {
        return Err(HttpError::MissingHost);
    }
    if head.content_length != 0 || head.framing == Framing::Chunked {
        return Err(HttpError::UpgradeWithBody);
    }
    // One pass over the headers (the upgrade is on every connection's
    // path): note what each relevant header says, then check in the order
    // documented above.
    let mut upgrade_websocket = false;
    let mut connection_upgrade = false;
    let mut version_seen = false;
    let mut version_wrong = false;
    let mut key: Option<&'b [u8]> = None;
    let mut key_count = 0usize;
    let mut authorization: Option<&'b [u8]> = None;
    let mut origin: Option<&'b [u8]> = None;
    let mut session_cookie: Option<&'b str> = None;
    for header in head.headers {
        let name = header.name.as_bytes();
        let value = header.value;
        // Dispatch on length first: most headers are rejected by one compare.
        match name.len() {
            7 if name.eq_ignore_ascii_case(b"upgrade") => {
                upgrade_websocket |= token_list_contains(value, "websocket");
            }
            10 if name.eq_ignore_ascii_case(b"connection") => {
                connection_upgrade |= token_list_contains(value, "upgrade");
            }
            21 if name.eq_ignore_ascii_case(b"sec-websocket-version") => {
                version_seen = true;
                version_wrong |= value.trim_ascii() != WEBSOCKET_VERSION.as_bytes();
            }
            17 if name.eq_ignore_ascii_case(b"sec-websocket-key") => {
                key_count += 1;
                key = Some(value.trim_ascii());
            }
            13 if name.eq_ignore_ascii_case(b"authorization") => {
                authorization = authorization.or(Some(value));
            }
            6 if name.eq_ignore_ascii_case(b"origin") => {
                origin = origin.or(Some(value.trim_ascii()));
            }
            6 if session_cookie.is_none() && name.eq_ignore_ascii_case(b"cookie") => {
                session_cookie = cookie_value(value, SESSION_COOKIE_NAME);
            }
            _ => {}
        }
    }
    if !upgrade_websocket {
        return Err(HttpError::NotAnUpgrade);
    }
    if !connection_upgrade {
        return Err(HttpError::ConnectionNotUpgrade);
    }
    if !version_seen {
        return Err(HttpError::MissingWebSocketVersion);
    }
    if version_wrong {
        return Err(HttpError::UnsupportedWebSocketVersion);
    }
    let key = match (key, key_count) {
        (Some(key), 1) if is_valid_websocket_key(key) => key,
        _ => return Err(HttpError::BadWebSocketKey),
    };

    let token = head.query_param("token").filter(|token| !token.is_empty());
    let bearer = authorization.and_then(bearer_token);
    Ok(Upgrade {
        key,
        host: head.host,
        origin,
        token,
        bearer,
        session_cookie,
    })
}

/// A WebSocket key is base64 of exactly 16 bytes: 24 characters ending in
/// `==`. Decoding (canonical, with padding) on the stack checks the rest.
pub(super) fn is_valid_websocket_key(key: &[u8]) -> bool {
    const KEY_BASE64_LEN: usize = 24;
    const KEY_BYTES: usize = 16;
    if key.len() != KEY_BASE64_LEN {
        return false;
    }
    // 24 base64 characters decode to at most 18 bytes.
    let mut decoded = [0u8; 18];
    matches!(
        base64::engine::general_purpose::STANDARD.decode_slice(key, &mut decoded),
        Ok(KEY_BYTES)
    )
}

/// The GUID RFC 6455 §1.3 appends to the key before hashing.
pub(super) const WEBSOCKET_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Length of a base64 SHA-1 digest: 20 bytes → 28 characters.
pub const ACCEPT_KEY_LEN: usize = 28;

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key`: base64(SHA-1(key +
/// GUID)), computed on the stack.
pub fn accept_key(key: &[u8]) -> [u8; ACCEPT_KEY_LEN] {
    let mut hasher = sha1::Sha1::new();
    hasher.update(key);
    hasher.update(WEBSOCKET_GUID);
    let digest = hasher.finalize();
    let mut accept = [0u8; ACCEPT_KEY_LEN];
    let written = base64::engine::general_purpose::STANDARD.encode_slice(digest, &mut accept);
    assert_eq!(written, Ok(ACCEPT_KEY_LEN));
    accept
}

pub(super) const SWITCHING_PROTOCOLS_START: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\n\
Upgrade: websocket\r\n\
Connection: Upgrade\r\n\
Sec-WebSocket-Accept: ";

pub(super) const SWITCHING_PROTOCOLS_END: &[u8] = b"\r\n\r\n";

/// Exact length of what [`write_switching_protocols`] writes; size the
/// output buffer with it.
pub const SWITCHING_PROTOCOLS_LEN_MAX: usize =
    SWITCHING_PROTOCOLS_START.len() + ACCEPT_KEY_LEN + SWITCHING_PROTOCOLS_END.len();

/// Write the 101 answer for `key` (the `Sec-WebSocket-Key` as received) into
/// `out` and return its length. It names no extension and no subprotocol:
/// an extension is declined by omission (RFC 6455 §9.1), and a client must
/// not use an extension the server did not list; an accepted
/// permessage-deflate is answered by [`write_switching_protocols_with`].
///
/// Panics when `out` is shorter than `SWITCHING_PROTOCOLS_LEN_MAX`: a
/// buffer sized by the caller, never by input.
pub fn write_switching_protocols(out: &mut [u8], key: &[u8]) -> usize {
    assert!(out.len() >= SWITCHING_PROTOCOLS_LEN_MAX);
    let accept = accept_key(key);
    let mut written = 0;
    for part in [SWITCHING_PROTOCOLS_START, &accept, SWITCHING_PROTOCOLS_END] {
        out[written..written + part.len()].copy_from_slice(part);
        written += part.len();
    }
    assert_eq!(written, SWITCHING_PROTOCOLS_LEN_MAX);
    written
}

/// Longest answer [`write_switching_protocols_with`] writes: the plain one
/// with a permessage-deflate line.
pub const SWITCHING_PROTOCOLS_DEFLATE_LEN_MAX: usize =
    SWITCHING_PROTOCOLS_LEN_MAX + crate::protocol::deflate::RESPONSE_LINE_LEN_MAX;

/// [`write_switching_protocols`] that also lists the extensions the server
/// accepted: `extension_line` is a complete header line with its CRLF
/// (`deflate::Agreement::write_response_line`), or empty.
///
/// Panics when `out` is shorter than the plain answer and the line.
pub fn write_switching_protocols_with(out: &mut [u8], key: &[u8], extension_line: &[u8]) -> usize {
    assert!(out.len() >= SWITCHING_PROTOCOLS_LEN_MAX + extension_line.len());
    let accept = accept_key(key);
    let mut written = 0;
    for part in [
        SWITCHING_PROTOCOLS_START,
        &accept,
        b"\r\n",
        extension_line,
        b"\r\n",
    ] {
        out[written..written + part.len()].copy_from_slice(part);
        written += part.len();
    }
    written
}
