//! Proof that the upgrade path allocates nothing: parsing a realistic
//! browser upgrade request, validating it, extracting its credentials and
//! writing the 101 answer, counted by a global allocator that wraps the
//! system one. Its own test binary, so no other test shares the allocator.

mod counting_alloc;

use std::hint::black_box;

use hookstream::limits::HEADERS_MAX;
use hookstream::protocol::http::{
    accept_key, parse_head, validate_upgrade, write_error, write_switching_protocols,
    SWITCHING_PROTOCOLS_LEN_MAX,
};

use counting_alloc::allocations_during;

/// What Chrome sends for `new WebSocket("wss://…/v1/ws?token=…")` from a
/// page of another origin, with the session cookie present as well.
const BROWSER_UPGRADE: &[u8] = b"GET /v1/ws?token=hs_live_4f9a2c7e1b8d3a6f5e0c9b2a7d4e1f8c HTTP/1.1\r\n\
Host: gateway.example.com\r\n\
Connection: Upgrade\r\n\
Pragma: no-cache\r\n\
Cache-Control: no-cache\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36\r\n\
Upgrade: websocket\r\n\
Origin: https://app.example.com\r\n\
Sec-WebSocket-Version: 13\r\n\
Accept-Encoding: gzip, deflate, br, zstd\r\n\
Accept-Language: en-US,en;q=0.9,de;q=0.8\r\n\
Cookie: _ga=GA1.1.123456789.1700000000; hs_session=v1.org_a.key_7.1735689600.Zm9vYmFyYmF6; theme=dark\r\n\
Sec-WebSocket-Key: x3JJHMbDL1EzLkh9GBhXDw==\r\n\
Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\
\r\n";

/// The whole upgrade path as the server runs it; returns what it extracted
/// so nothing can be optimized away.
fn upgrade_path(request: &[u8]) -> (usize, bool, bool, bool, bool, [u8; 28]) {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let head = match parse_head(request, &mut headers, 0) {
        Ok(Some(head)) => head,
        other => panic!("request refused: {other:?}"),
    };
    let upgrade = match validate_upgrade(&head) {
        Ok(upgrade) => upgrade,
        Err(error) => panic!("upgrade refused: {error:?}"),
    };
    let mut answer = [0u8; SWITCHING_PROTOCOLS_LEN_MAX];
    let written = write_switching_protocols(&mut answer, upgrade.key);
    black_box(&answer[..written]);
    (
        written,
        upgrade.token.is_some(),
        upgrade.origin.is_some(),
        upgrade.session_cookie.is_some(),
        upgrade.bearer.is_some(),
        accept_key(upgrade.key),
    )
}

#[test]
fn upgrade_path_allocates_nothing() {
    // Warm up once: the first call may touch lazily initialized state of
    // the standard library (the CPU feature detection of sha1, for example).
    let warm = upgrade_path(BROWSER_UPGRADE);
    assert_eq!(warm.0, SWITCHING_PROTOCOLS_LEN_MAX);
    assert_eq!(&warm.5, b"HSmrc0sMlYUkAGmm5OPpG2HaGWk=");

    let (result, allocations) = allocations_during(|| {
        let mut last = None;
        for _ in 0..100 {
            last = Some(upgrade_path(black_box(BROWSER_UPGRADE)));
        }
        last
    });
    assert_eq!(allocations, 0, "the upgrade path allocated");
    let (_, has_token, has_origin, has_cookie, has_bearer, _) = result.expect("ran");
    assert!(has_token);
    assert!(has_origin);
    assert!(has_cookie);
    assert!(!has_bearer);
}

#[test]
fn bearer_upgrade_allocates_nothing() {
    let request = b"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nConnection: Upgrade\r\n\
Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Authorization: Bearer hs_live_4f9a2c7e1b8d3a6f\r\n\r\n";
    upgrade_path(request);
    let (result, allocations) = allocations_during(|| upgrade_path(black_box(request)));
    assert_eq!(allocations, 0, "the upgrade path allocated");
    assert!(result.4);
}

#[test]
fn escaped_token_is_the_one_allocation() {
    // The documented exception: a token that really holds an escape is
    // decoded into one String.
    let request = b"GET /v1/ws?token=hs_live_a%2Bb HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\n\
Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    upgrade_path(request);
    let (_, allocations) = allocations_during(|| upgrade_path(black_box(request)));
    assert_eq!(allocations, 1);
}

#[test]
fn error_answer_into_a_reserved_buffer_allocates_nothing() {
    let mut out = Vec::with_capacity(512);
    let ((), allocations) = allocations_during(|| {
        write_error(&mut out, 426, &[("Connection", "close")]);
        out.clear();
        write_error(&mut out, 401, &[]);
    });
    assert_eq!(allocations, 0);
    assert!(out.ends_with(b"{\"error\":\"unauthorized\"}"));
}

/// The permessage-deflate part of the upgrade: reading the browser's offer
/// and writing the 101 answer that accepts it.
fn deflate_upgrade(request: &[u8]) -> usize {
    use hookstream::protocol::deflate::{negotiate, RESPONSE_LINE_LEN_MAX};
    use hookstream::protocol::http::{
        write_switching_protocols_with, SWITCHING_PROTOCOLS_DEFLATE_LEN_MAX,
    };
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let head = match parse_head(request, &mut headers, 0) {
        Ok(Some(head)) => head,
        other => panic!("request refused: {other:?}"),
    };
    let upgrade = validate_upgrade(&head).expect("a valid upgrade");
    let agreement = negotiate(head.headers_named("sec-websocket-extensions")).expect("accepted");
    let mut line = [0u8; RESPONSE_LINE_LEN_MAX];
    let line_len = agreement.write_response_line(&mut line);
    let mut answer = [0u8; SWITCHING_PROTOCOLS_DEFLATE_LEN_MAX];
    let written = write_switching_protocols_with(&mut answer, upgrade.key, &line[..line_len]);
    black_box(&answer[..written]);
    written
}

#[test]
fn negotiating_permessage_deflate_allocates_nothing() {
    let warm = deflate_upgrade(BROWSER_UPGRADE);
    assert!(warm > SWITCHING_PROTOCOLS_LEN_MAX);
    let (written, allocations) = allocations_during(|| {
        let mut last = 0;
        for _ in 0..100 {
            last = deflate_upgrade(black_box(BROWSER_UPGRADE));
        }
        last
    });
    assert_eq!(allocations, 0, "negotiating permessage-deflate allocated");
    assert_eq!(written, warm);
}
