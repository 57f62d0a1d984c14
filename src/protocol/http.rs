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

use std::borrow::Cow;

use base64::Engine as _;
use sha1::Digest as _;

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
            HttpError::MethodNotAllowed => 405,
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
            HttpError::MethodNotAllowed => &[("Allow", "GET")],
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

/// A complete, parsed request head. Every string borrows from the read
/// buffer (`'b`); the header slice borrows from the caller's stack array
/// (`'h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head<'b, 'h> {
    /// The request method exactly as sent (methods are case-sensitive).
    pub method: &'b str,
    /// The request target exactly as sent, query included.
    pub target: &'b str,
    /// The path part of the target, without the query; for an absolute-form
    /// target (`http://host/p`, RFC 9112 §3.2.2) the part after the authority.
    pub path: &'b str,
    /// The raw query without the leading `?`, `""` when there is none; decode
    /// single values with [`Head::query_param`].
    pub query: &'b str,
    /// The value of the one `Host` header, never empty; the default allowed
    /// origin is derived from it.
    pub host: &'b [u8],
    /// All header lines in the order sent.
    pub headers: &'h [httparse::Header<'b>],
    /// Bytes of the head including the final CRLFCRLF: the body (or, after an
    /// upgrade, the first WebSocket frame) starts at this offset.
    pub head_len: usize,
    /// The announced body length; 0 when there is no `Content-Length`
    /// (and for a chunked body, whose length is unknown).
    pub content_length: usize,
    /// How the body is framed.
    pub framing: Framing,
    /// An HTTP/1.0 request (only ever a health probe, see [`HeadRules`]);
    /// its connection closes after the answer.
    pub http10: bool,
}

/// How a request says where its body ends (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Neither `Content-Length` nor `Transfer-Encoding`: no body. A route
    /// that needs one answers 411.
    Unframed,
    /// `Content-Length` (the value is [`Head::content_length`]).
    Length,
    /// `Transfer-Encoding: chunked` (decode with `protocol::chunked`).
    Chunked,
}

/// What a listener accepts beyond the strict HTTP/1.1 of [`parse_head`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadRules {
    /// Accept `Transfer-Encoding: chunked` alone as the body's framing
    /// (`POST /v1/publish`); otherwise any `Transfer-Encoding` is 411.
    pub chunked: bool,
    /// Accept HTTP/1.0 `GET` and `HEAD` of these paths, with or without
    /// `Host` (load balancers' default health checks); any other HTTP/1.0
    /// request stays 505.
    pub http10_paths: &'static [&'static str],
}

impl HeadRules {
    /// HTTP/1.1 only, `Content-Length` bodies only.
    pub const STRICT: HeadRules = HeadRules {
        chunked: false,
        http10_paths: &[],
    };
}

/// The health probes, answered on both listeners without a token and also
/// to HTTP/1.0 (PROTOCOL.md §3).
pub const PROBE_PATHS: &[&str] = &["/healthz", "/readyz"];

impl<'b, 'h> Head<'b, 'h> {
    /// The value of the first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&'b [u8]> {
        self.headers_named(name).next()
    }

    /// The values of every header called `name` (case-insensitive), in
    /// order: list-valued headers may be split over several lines.
    pub fn headers_named<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'b [u8]> + 's {
        self.headers
            .iter()
            .filter(move |header| header.name.eq_ignore_ascii_case(name))
            .map(|header| header.value)
    }

    /// True when some header called `name` holds `token` in its
    /// comma-separated list (both compared case-insensitively).
    pub fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.headers_named(name)
            .any(|value| token_list_contains(value, token))
    }

    /// The percent-decoded value of the first query parameter called `name`;
    /// `+` decodes to a space. Borrowed when the value holds no escape.
    /// `None` when absent, or when its escapes are invalid or decode to
    /// something that is not UTF-8. A parameter without `=` has value `""`.
    pub fn query_param(&self, name: &str) -> Option<Cow<'b, str>> {
        for pair in self.query.split('&') {
            let (raw_name, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
            let name_matches = if needs_decoding(raw_name) {
                percent_decode(raw_name).is_some_and(|decoded| decoded == name)
            } else {
                raw_name == name
            };
            if name_matches {
                return percent_decode(raw_value);
            }
        }
        None
    }

    /// True when the client sent `Expect: 100-continue` and waits for an
    /// interim `100 Continue` before sending its body (curl does this for
    /// bodies over 1 KiB).
    pub fn expects_continue(&self) -> bool {
        self.headers_named("expect")
            .any(|value| value.trim_ascii().eq_ignore_ascii_case(b"100-continue"))
    }

    /// True when the connection closes after this request: the client
    /// asked for it (`Connection: close`), or spoke HTTP/1.0 (whose
    /// keep-alive we do not offer); HTTP/1.1 keeps it open otherwise.
    pub fn connection_close(&self) -> bool {
        self.http10 || self.header_has_token("connection", "close")
    }
}

/// Parse a request head from the start of `buf`.
///
/// `Ok(None)`: the head is incomplete and still under `HEAD_BYTES_MAX`; read
/// more and call again with the whole buffer. Only the first
/// `HEAD_BYTES_MAX` bytes are ever looked at, so feeding a request byte by
/// byte gives the same answer as feeding it at once.
///
/// Errors: incomplete at `HEAD_BYTES_MAX` bytes (so also any complete head
/// longer than that) → `HeadTooLarge` (431); more than `HEADERS_MAX` headers →
/// `TooManyHeaders` (431); any `Transfer-Encoding` → `LengthRequired` (411);
/// a non-numeric or conflicting `Content-Length` → `BadContentLength` (400);
/// `Content-Length` above `body_bytes_max` → `BodyTooLarge` (413); a version
/// other than HTTP/1.1 → `NotHttp11` (505); no `Host` → `MissingHost`, two →
/// `DuplicateHost` (400); any other syntax error → `Malformed` (400).
pub fn parse_head<'b, 'h>(
    buf: &'b [u8],
    headers: &'h mut [httparse::Header<'b>; HEADERS_MAX],
    body_bytes_max: usize,
) -> Result<Option<Head<'b, 'h>>, HttpError> {
    parse_head_with(buf, headers, body_bytes_max, HeadRules::STRICT)
}

/// [`parse_head`] with what `rules` relaxes: a `Transfer-Encoding` of
/// exactly `chunked` is [`Framing::Chunked`] (with a `Content-Length` too →
/// `ConflictingFraming`, 400; any other coding → 411), and HTTP/1.0 `GET` or
/// `HEAD` of one of `rules.http10_paths` is accepted without `Host`.
pub fn parse_head_with<'b, 'h>(
    buf: &'b [u8],
    headers: &'h mut [httparse::Header<'b>; HEADERS_MAX],
    body_bytes_max: usize,
    rules: HeadRules,
) -> Result<Option<Head<'b, 'h>>, HttpError> {
    // Looking at no more than the limit bounds the parse work per call and
    // makes "complete but too long" and "incomplete at the limit" the same
    // case.
    let window = &buf[..buf.len().min(HEAD_BYTES_MAX)];
    let mut request = httparse::Request::new(headers);
    let head_len = match request.parse(window) {
        Ok(httparse::Status::Complete(head_len)) => head_len,
        Ok(httparse::Status::Partial) => {
            if window.len() >= HEAD_BYTES_MAX {
                return Err(HttpError::HeadTooLarge);
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => return Err(HttpError::TooManyHeaders),
        Err(httparse::Error::Version) => return Err(classify_version_error(window)),
        Err(_) => return Err(HttpError::Malformed),
    };
    assert!(head_len <= HEAD_BYTES_MAX);
    assert!(head_len <= buf.len());

    let httparse::Request {
        method,
        path: target,
        version,
        headers,
    } = request;
    // httparse fills all three once the head is complete; a missing one
    // would be a parser bug, answered as a malformed request, not a panic.
    let (Some(method), Some(target), Some(version)) = (method, target, version) else {
        return Err(HttpError::Malformed);
    };
    let (path, query) = split_target(target);
    let http10 =
        version == 0 && matches!(method, "GET" | "HEAD") && rules.http10_paths.contains(&path);
    if version != 1 && !http10 {
        return Err(HttpError::NotHttp11);
    }
    let headers: &'h [httparse::Header<'b>] = headers;

    let mut host: Option<&'b [u8]> = None;
    let mut content_length: Option<usize> = None;
    let mut chunked = false;
    for header in headers {
        if header.name.eq_ignore_ascii_case("transfer-encoding") {
            // Only `chunked` alone, once: anything else (another coding, a
            // list, a repeat) would need decoding we do not do.
            if !rules.chunked
                || chunked
                || !header.value.trim_ascii().eq_ignore_ascii_case(b"chunked")
            {
                return Err(HttpError::LengthRequired);
            }
            chunked = true;
        } else if header.name.eq_ignore_ascii_case("host") {
            if host.is_some() {
                return Err(HttpError::DuplicateHost);
            }
            host = Some(header.value.trim_ascii());
        } else if header.name.eq_ignore_ascii_case("content-length") {
            content_length = Some(merge_content_length(content_length, header.value)?);
        }
    }
    let host = match host {
        Some(host) if !host.is_empty() => host,
        // HTTP/1.0 has no Host requirement (RFC 9112 §3.2 is HTTP/1.1's).
        None if http10 => b"",
        _ => return Err(HttpError::MissingHost),
    };
    let framing = match (chunked, content_length) {
        (true, Some(_)) => return Err(HttpError::ConflictingFraming),
        (true, None) => Framing::Chunked,
        (false, Some(_)) => Framing::Length,
        (false, None) => Framing::Unframed,
    };
    let content_length = content_length.unwrap_or(0);
    if content_length > body_bytes_max {
        return Err(HttpError::BodyTooLarge);
    }

    Ok(Some(Head {
        method,
        target,
        path,
        query,
        host,
        headers,
        head_len,
        content_length,
        framing,
        http10,
    }))
}

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
/// Order of checks: GET (else `MethodNotAllowed`, 405), `Host` present,
/// no body, `Upgrade` lists `websocket`, `Connection` lists `upgrade` (both
/// case-insensitive token lists, so `keep-alive, Upgrade` is fine),
/// `Sec-WebSocket-Version` present (else `MissingWebSocketVersion`, 400)
/// and `13` (else 426, checked before the key so that a client of another
/// draft learns the version we speak), and
/// exactly one `Sec-WebSocket-Key` that is base64 of 16 bytes. HTTP/1.1 is
/// already guaranteed by [`parse_head`]. Allocates only when the token holds
/// a percent-escape.
pub fn validate_upgrade<'b>(head: &Head<'b, '_>) -> Result<Upgrade<'b>, HttpError> {
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

/// The token of an `Authorization` value `Bearer <token>` (scheme
/// case-insensitive, RFC 6750 §2.1); `None` for another scheme, an empty
/// token, or a token with characters outside token68.
pub fn bearer_token(authorization: &[u8]) -> Option<&str> {
    let value = authorization.trim_ascii();
    const SCHEME: &[u8] = b"bearer";
    if value.len() <= SCHEME.len() || !value[..SCHEME.len()].eq_ignore_ascii_case(SCHEME) {
        return None;
    }
    let rest = &value[SCHEME.len()..];
    // The scheme must end at a space: "Bearerx" is another scheme.
    if rest.first() != Some(&b' ') {
        return None;
    }
    let token = rest.trim_ascii_start();
    let is_token68 = |byte: &u8| byte.is_ascii_alphanumeric() || b"-._~+/=".contains(byte);
    if token.is_empty() || !token.iter().all(is_token68) {
        return None;
    }
    // token68 is ASCII, so this cannot fail; no unwrap all the same.
    std::str::from_utf8(token).ok()
}

/// The value of the first cookie called `name` (case-sensitive, RFC 6265
/// §5.4) in a `Cookie` header `a=1; b=2`, with optional surrounding double
/// quotes removed; `None` when absent, empty or not UTF-8.
pub fn cookie_value<'a>(cookie_header: &'a [u8], name: &str) -> Option<&'a str> {
    for pair in cookie_header.split(|&byte| byte == b';') {
        let pair = pair.trim_ascii();
        let Some(equals) = pair.iter().position(|&byte| byte == b'=') else {
            continue;
        };
        if pair[..equals].trim_ascii() != name.as_bytes() {
            continue;
        }
        let mut value = pair[equals + 1..].trim_ascii();
        if value.len() >= 2 && value[0] == b'"' && value[value.len() - 1] == b'"' {
            value = &value[1..value.len() - 1];
        }
        if value.is_empty() {
            return None;
        }
        return std::str::from_utf8(value).ok();
    }
    None
}

/// Decode `%XX` escapes and `+` (a space in form encoding). Borrowed when
/// `s` holds neither; `None` when an escape is not `%` and two hex digits,
/// or when the result is not UTF-8. Strict on purpose: these values are
/// credentials and ids, and a lenient decode would let two spellings name
/// the same thing.
pub fn percent_decode(s: &str) -> Option<Cow<'_, str>> {
    if !needs_decoding(s) {
        return Some(Cow::Borrowed(s));
    }
    let bytes = s.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'%' => {
                let high = hex_value(*bytes.get(index + 1)?)?;
                let low = hex_value(*bytes.get(index + 2)?)?;
                decoded.push(high << 4 | low);
                index += 3;
            }
            b'+' => {
                decoded.push(b' ');
                index += 1;
            }
            byte => {
                decoded.push(byte);
                index += 1;
            }
        }
    }
    String::from_utf8(decoded).ok().map(Cow::Owned)
}

/// The GUID RFC 6455 §1.3 appends to the key before hashing.
const WEBSOCKET_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

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

const SWITCHING_PROTOCOLS_START: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\n\
Upgrade: websocket\r\n\
Connection: Upgrade\r\n\
Sec-WebSocket-Accept: ";
const SWITCHING_PROTOCOLS_END: &[u8] = b"\r\n\r\n";

/// Exact length of what [`write_switching_protocols`] writes; size the
/// output buffer with it.
pub const SWITCHING_PROTOCOLS_LEN_MAX: usize =
    SWITCHING_PROTOCOLS_START.len() + ACCEPT_KEY_LEN + SWITCHING_PROTOCOLS_END.len();

/// Write the 101 answer for `key` (the `Sec-WebSocket-Key` as received) into
/// `out` and return its length. It names no extension and no subprotocol:
/// permessage-deflate is declined by omission (RFC 6455 §9.1), and a client
/// must not use an extension the server did not list.
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

/// Append a complete HTTP/1.1 response to `out`: status line, `Content-Type`
/// (omitted when empty), `Content-Length`, `extra_headers`, blank line, body.
/// For 1xx, 204 and 304, which must not carry a body (RFC 9110 §6.4.1), the
/// content headers and the body are left out.
///
/// CR and LF inside a header name or value are written as spaces, so a value
/// that came from a request can never split the response.
pub fn write_response(
    out: &mut Vec<u8>,
    status: u16,
    content_type: &str,
    extra_headers: &[(&str, &str)],
    body: &[u8],
) {
    write_response_parts(out, status, content_type, &[extra_headers], body);
}

/// Append an error response with the JSON body
/// `{"error":"<error_code(status)>"}`. A 426 carries
/// `Sec-WebSocket-Version: 13` by itself (RFC 6455 §4.4).
pub fn write_error(out: &mut Vec<u8>, status: u16, extra_headers: &[(&str, &str)]) {
    write_error_parts(out, status, &[extra_headers]);
}

/// Append the error answer for a refused request head or upgrade: its
/// status, the headers that status requires, and `Connection: close`, since
/// after a refused head the server closes the connection (where the next
/// request would start is unknown, and PROTOCOL.md §6 closes after 431).
pub fn write_http_error(out: &mut Vec<u8>, error: HttpError) {
    let closing: &[(&str, &str)] = &[("Connection", "close")];
    write_error_parts(out, error.status(), &[error.required_headers(), closing]);
}

/// Adds `Connection: close` to the complete answer at the start of `out`
/// (after its status line) unless its head already says so: for answers
/// after which the server closes (HTTP/1.0, a body left unread).
pub fn mark_closing(out: &mut Vec<u8>) {
    let head_end = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(out.len());
    let head = &out[..head_end];
    let already = head
        .split(|&b| b == b'\n')
        .any(|line| line.trim_ascii().eq_ignore_ascii_case(b"connection: close"));
    if already {
        return;
    }
    let Some(status_end) = out.windows(2).position(|w| w == b"\r\n") else {
        return;
    };
    let at = status_end + 2;
    out.splice(at..at, b"Connection: close\r\n".iter().copied());
}

fn write_error_parts(out: &mut Vec<u8>, status: u16, header_lists: &[&[(&str, &str)]]) {
    let code = error_code(status);
    // The longest code is 26 bytes; the body is built on the stack.
    let mut body = [0u8; 64];
    let mut body_len = 0;
    for part in [b"{\"error\":\"".as_slice(), code.as_bytes(), b"\"}"] {
        body[body_len..body_len + part.len()].copy_from_slice(part);
        body_len += part.len();
    }
    // Headers the status itself calls for: the version a 426 asks for, and
    // when a rate-limited (429) client may retry (the per-address buckets
    // refill continuously: a second is plenty).
    let required: &[(&str, &str)] = match status {
        426 => &[("Sec-WebSocket-Version", WEBSOCKET_VERSION)],
        429 => &[("Retry-After", "1")],
        _ => &[],
    };
    // Room for those and the caller's lists, without a Vec.
    let mut lists: [&[(&str, &str)]; 4] = [required, &[], &[], &[]];
    assert!(header_lists.len() < lists.len());
    lists[1..=header_lists.len()].copy_from_slice(header_lists);
    write_response_parts(out, status, "application/json", &lists, &body[..body_len]);
}

fn write_response_parts(
    out: &mut Vec<u8>,
    status: u16,
    content_type: &str,
    header_lists: &[&[(&str, &str)]],
    body: &[u8],
) {
    let has_body = !(status < 200 || status == 204 || status == 304);
    debug_assert!(has_body || body.is_empty());
    out.extend_from_slice(b"HTTP/1.1 ");
    push_decimal(out, usize::from(status));
    out.push(b' ');
    out.extend_from_slice(reason_phrase(status).as_bytes());
    out.extend_from_slice(b"\r\n");
    if has_body {
        if !content_type.is_empty() {
            push_header(out, "Content-Type", content_type);
        }
        out.extend_from_slice(b"Content-Length: ");
        push_decimal(out, body.len());
        out.extend_from_slice(b"\r\n");
    }
    for (name, value) in header_lists.iter().copied().flatten() {
        push_header(out, name, value);
    }
    out.extend_from_slice(b"\r\n");
    if has_body {
        out.extend_from_slice(body);
    }
}

/// True when the comma-separated list `value` holds `token`
/// (case-insensitive, whitespace around items ignored).
fn token_list_contains(value: &[u8], token: &str) -> bool {
    value
        .split(|&byte| byte == b',')
        .any(|item| item.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// A WebSocket key is base64 of exactly 16 bytes: 24 characters ending in
/// `==`. Decoding (canonical, with padding) on the stack checks the rest.
fn is_valid_websocket_key(key: &[u8]) -> bool {
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

/// Fold one `Content-Length` value into what earlier ones said: identical
/// repeats (also as a list, `5, 5`) are allowed by RFC 9110 §8.6, anything
/// else is an error. A number too large for `usize` saturates, which is
/// still refused by every body limit.
fn merge_content_length(previous: Option<usize>, value: &[u8]) -> Result<usize, HttpError> {
    let mut merged = previous;
    for item in value.split(|&byte| byte == b',') {
        let digits = item.trim_ascii();
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return Err(HttpError::BadContentLength);
        }
        let length = digits.iter().fold(0usize, |length, digit| {
            length
                .saturating_mul(10)
                .saturating_add(usize::from(digit - b'0'))
        });
        match merged {
            Some(earlier) if earlier != length => return Err(HttpError::BadContentLength),
            _ => merged = Some(length),
        }
    }
    merged.ok_or(HttpError::BadContentLength)
}

/// httparse reports a bad version for anything after the target that is not
/// `HTTP/1.0` or `HTTP/1.1`. A real version (`HTTP/` and a digit, as in
/// `HTTP/2.0`) gets 505; anything else is garbage, 400. httparse stops at
/// the first wrong byte, so this only looks at what is there, and gives the
/// same answer for any prefix that already made httparse fail.
fn classify_version_error(window: &[u8]) -> HttpError {
    let start = window
        .iter()
        .position(|&byte| byte != b'\r' && byte != b'\n')
        .unwrap_or(window.len());
    let rest = &window[start..];
    let line_end = rest
        .iter()
        .position(|&byte| byte == b'\r' || byte == b'\n')
        .unwrap_or(rest.len());
    let version = rest[..line_end].splitn(3, |&byte| byte == b' ').nth(2);
    match version {
        Some([b'H', b'T', b'T', b'P', b'/', digit, ..]) if digit.is_ascii_digit() => {
            HttpError::NotHttp11
        }
        _ => HttpError::Malformed,
    }
}

/// Split a request target into path and raw query (without `?`). A
/// fragment, which clients must not send, is dropped rather than taken as
/// part of the query.
fn split_target(target: &str) -> (&str, &str) {
    let target = target.split_once('#').map_or(target, |(before, _)| before);
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    (origin_form_path(path), query)
}

/// The path of an absolute-form target (`http://host:80/p` → `/p`), which
/// servers must accept (RFC 9112 §3.2.2); other forms are returned as is.
fn origin_form_path(path: &str) -> &str {
    for scheme in ["http://", "https://"] {
        let Some(prefix) = path.get(..scheme.len()) else {
            continue;
        };
        if prefix.eq_ignore_ascii_case(scheme) {
            let after_scheme = &path[scheme.len()..];
            return match after_scheme.find('/') {
                Some(slash) => &after_scheme[slash..],
                None => "/",
            };
        }
    }
    path
}

fn needs_decoding(s: &str) -> bool {
    s.bytes().any(|byte| byte == b'%' || byte == b'+')
}

fn hex_value(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

fn push_header(out: &mut Vec<u8>, name: &str, value: &str) {
    push_without_line_breaks(out, name.as_bytes());
    out.extend_from_slice(b": ");
    push_without_line_breaks(out, value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn push_without_line_breaks(out: &mut Vec<u8>, bytes: &[u8]) {
    if bytes.iter().any(|&byte| byte == b'\r' || byte == b'\n') {
        out.extend(bytes.iter().map(|&byte| match byte {
            b'\r' | b'\n' => b' ',
            other => other,
        }));
    } else {
        out.extend_from_slice(bytes);
    }
}

/// Append `value` in decimal without going through `fmt`.
fn push_decimal(out: &mut Vec<u8>, mut value: usize) {
    // usize::MAX has 20 decimal digits on 64-bit targets.
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_lists_are_case_insensitive_and_trimmed() {
        assert!(token_list_contains(b"keep-alive, Upgrade", "upgrade"));
        assert!(token_list_contains(b"  UPGRADE  ", "upgrade"));
        assert!(token_list_contains(b"a,,upgrade", "upgrade"));
        assert!(!token_list_contains(b"upgrades", "upgrade"));
        assert!(!token_list_contains(b"", "upgrade"));
        assert!(!token_list_contains(b"up grade", "upgrade"));
    }

    #[test]
    fn push_decimal_matches_display() {
        for value in [0, 1, 9, 10, 99, 100, 12_345, usize::MAX] {
            let mut out = Vec::new();
            push_decimal(&mut out, value);
            assert_eq!(out, value.to_string().into_bytes());
        }
    }

    #[test]
    fn targets_split_into_path_and_query() {
        assert_eq!(split_target("/v1/ws"), ("/v1/ws", ""));
        assert_eq!(split_target("/v1/ws?"), ("/v1/ws", ""));
        assert_eq!(split_target("/v1/ws?token=a&b"), ("/v1/ws", "token=a&b"));
        assert_eq!(split_target("/p?a=1#frag"), ("/p", "a=1"));
        assert_eq!(split_target("http://h:1/v1/ws?x=1"), ("/v1/ws", "x=1"));
        assert_eq!(split_target("HTTPS://h"), ("/", ""));
        assert_eq!(split_target("*"), ("*", ""));
    }

    #[test]
    fn version_errors_are_classified_on_any_prefix() {
        assert_eq!(
            classify_version_error(b"GET / HTTP/2.0\r\n"),
            HttpError::NotHttp11
        );
        assert_eq!(
            classify_version_error(b"GET / HTTP/2"),
            HttpError::NotHttp11
        );
        assert_eq!(
            classify_version_error(b"\r\nGET / HTTP/3"),
            HttpError::NotHttp11
        );
        assert_eq!(classify_version_error(b"GET / HTTX"), HttpError::Malformed);
        assert_eq!(
            classify_version_error(b"GET / HTTP/x"),
            HttpError::Malformed
        );
        assert_eq!(classify_version_error(b"GET /"), HttpError::Malformed);
    }

    #[test]
    fn content_length_repeats_must_agree() {
        assert_eq!(merge_content_length(None, b"5"), Ok(5));
        assert_eq!(merge_content_length(None, b"5, 5"), Ok(5));
        assert_eq!(merge_content_length(Some(5), b"5"), Ok(5));
        assert_eq!(
            merge_content_length(Some(5), b"6"),
            Err(HttpError::BadContentLength)
        );
        assert_eq!(
            merge_content_length(None, b"5, 6"),
            Err(HttpError::BadContentLength)
        );
        assert_eq!(
            merge_content_length(None, b"-1"),
            Err(HttpError::BadContentLength)
        );
        assert_eq!(
            merge_content_length(None, b"+1"),
            Err(HttpError::BadContentLength)
        );
        assert_eq!(
            merge_content_length(None, b""),
            Err(HttpError::BadContentLength)
        );
        assert_eq!(
            merge_content_length(None, b"99999999999999999999999999"),
            Ok(usize::MAX)
        );
    }

    #[test]
    fn websocket_keys_must_be_16_bytes() {
        assert!(is_valid_websocket_key(b"dGhlIHNhbXBsZSBub25jZQ=="));
        // 15 bytes, 17 bytes, bad characters, non-canonical trailing bits.
        assert!(!is_valid_websocket_key(b"dGhlIHNhbXBsZSBub25j"));
        assert!(!is_valid_websocket_key(b"dGhlIHNhbXBsZSBub25jZQ=A"));
        assert!(!is_valid_websocket_key(b"dGhlIHNhbXBsZSBub25jZQ!="));
        assert!(!is_valid_websocket_key(b"dGhlIHNhbXBsZSBub25jZR=="));
    }

    #[test]
    fn every_error_has_a_client_or_version_status() {
        let all = [
            HttpError::Malformed,
            HttpError::HeadTooLarge,
            HttpError::TooManyHeaders,
            HttpError::NotHttp11,
            HttpError::MissingHost,
            HttpError::DuplicateHost,
            HttpError::LengthRequired,
            HttpError::BadContentLength,
            HttpError::BodyTooLarge,
            HttpError::MethodNotAllowed,
            HttpError::NotAnUpgrade,
            HttpError::ConnectionNotUpgrade,
            HttpError::BadWebSocketKey,
            HttpError::UnsupportedWebSocketVersion,
            HttpError::MissingWebSocketVersion,
            HttpError::ConflictingFraming,
            HttpError::UpgradeWithBody,
        ];
        for error in all {
            let status = error.status();
            assert!((400..=505).contains(&status));
            assert!(!reason_phrase(status).is_empty());
            assert_ne!(error_code(status), "error");
        }
    }

    #[test]
    fn switching_protocols_has_its_exact_length() {
        let mut out = [0u8; SWITCHING_PROTOCOLS_LEN_MAX];
        let written = write_switching_protocols(&mut out, b"dGhlIHNhbXBsZSBub25jZQ==");
        assert_eq!(written, 129);
        assert!(out.ends_with(b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"));
    }
}
