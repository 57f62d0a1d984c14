//! Writing answers: a response with a body, the one shape of error
//! answers (`{"error":"<code>"}` with the status's required headers), and
//! the `Connection: close` marking.

use super::*;

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
/// `{"error":"<error_code(status)>"}`. A 401 carries
/// `WWW-Authenticate: Bearer` and a 426 `Sec-WebSocket-Version: 13` by
/// themselves (RFC 9110 §11.6.1, RFC 6455 §4.4).
pub fn write_error(out: &mut Vec<u8>, status: u16, extra_headers: &[(&str, &str)]) {
    write_error_parts(out, status, &[extra_headers]);
}

/// Append the error answer for a refused request head or upgrade: its
/// status, the headers that status requires, and `Connection: close`, since
/// after a refused head the server closes the connection (where the next
/// request would start is unknown, and PROTOCOL.md §6 closes after 431).
pub fn write_http_error(out: &mut Vec<u8>, error: HttpError) {
    let closing: &[(&str, &str)] = &[("Connection", "close")];
    let start = out.len();
    write_error_parts(out, error.status(), &[error.required_headers(), closing]);
    if error == HttpError::HeadNotAllowed {
        let mut answer = out.split_off(start);
        strip_body(&mut answer);
        out.extend_from_slice(&answer);
    }
}

/// Cuts the complete answer at the start of `out` down to its head (its
/// `Content-Length` kept): the answer to a `HEAD` request, which never
/// has a body (RFC 9110 §9.3.2); body bytes would be read as the start of
/// the next answer on a kept-alive connection.
pub fn strip_body(out: &mut Vec<u8>) {
    if let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") {
        out.truncate(end + 4);
    }
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

pub(super) fn write_error_parts(out: &mut Vec<u8>, status: u16, header_lists: &[&[(&str, &str)]]) {
    let code = error_code(status);
    // The longest code is 26 bytes; the body is built on the stack.
    let mut body = [0u8; 64];
    let mut body_len = 0;
    for part in [b"{\"error\":\"".as_slice(), code.as_bytes(), b"\"}"] {
        body[body_len..body_len + part.len()].copy_from_slice(part);
        body_len += part.len();
    }
    // Headers the status itself calls for: the challenge of a 401 (RFC
    // 9110 §11.6.1; every credential here is a bearer token: a key, the
    // admin token, or a cookie holding one), the version a 426 asks for, and
    // when a rate-limited (429) client may retry (the per-address buckets
    // refill continuously: a second is plenty).
    let required: &[(&str, &str)] = match status {
        401 => &[("WWW-Authenticate", "Bearer")],
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

pub(super) fn write_response_parts(
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

pub(super) fn push_header(out: &mut Vec<u8>, name: &str, value: &str) {
    push_without_line_breaks(out, name.as_bytes());
    out.extend_from_slice(b": ");
    push_without_line_breaks(out, value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

pub(super) fn push_without_line_breaks(out: &mut Vec<u8>, bytes: &[u8]) {
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
pub(super) fn push_decimal(out: &mut Vec<u8>, mut value: usize) {
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
