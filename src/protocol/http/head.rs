//! The request head: parsing it (on `httparse`, with the limits, the
//! framing rules and the version rules of this server), and reading its
//! headers, including the credential headers (`Authorization: Bearer`,
//! the session cookie).

use std::borrow::Cow;

use super::*;
use crate::limits::{HEADERS_MAX, HEAD_BYTES_MAX};

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

/// True when the comma-separated list `value` holds `token`
/// (case-insensitive, whitespace around items ignored).
pub(super) fn token_list_contains(value: &[u8], token: &str) -> bool {
    value
        .split(|&byte| byte == b',')
        .any(|item| item.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Fold one `Content-Length` value into what earlier ones said: identical
/// repeats (also as a list, `5, 5`) are allowed by RFC 9110 §8.6, anything
/// else is an error. A number too large for `usize` saturates, which is
/// still refused by every body limit.
pub(super) fn merge_content_length(
    previous: Option<usize>,
    value: &[u8],
) -> Result<usize, HttpError> {
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
pub(super) fn classify_version_error(window: &[u8]) -> HttpError {
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
