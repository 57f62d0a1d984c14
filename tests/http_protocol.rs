//! Byte-level cases for `protocol::http`: every rule of the request-head
//! parser and of the WebSocket upgrade (RFC 6455 §4.2.1) with the exact HTTP
//! status it must produce, the response writers, a cross-check against
//! tungstenite's client, and property tests that no input panics the parser.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::io::{self, Read, Write};

use hookstream::limits::{HEADERS_MAX, HEAD_BYTES_MAX};
use hookstream::protocol::chunked::{ChunkedDecoder, ChunkedError};
use hookstream::protocol::http::{
    accept_key, bearer_token, cookie_value, error_code, mark_closing, parse_head, parse_head_with,
    percent_decode, reason_phrase, validate_upgrade, write_error, write_http_error, write_response,
    write_switching_protocols, Framing, HeadRules, HttpError, Upgrade, PROBE_PATHS,
    SWITCHING_PROTOCOLS_LEN_MAX,
};
use proptest::prelude::*;

/// Body limit used by most cases; big enough for every request here.
const BODY_BYTES_MAX: usize = 1024;

/// The RFC 6455 §1.3 example key and its accept value.
const RFC_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const RFC_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// The headers of a valid upgrade request, in the order a browser sends them.
const UPGRADE_HEADERS: &[(&str, &str)] = &[
    ("Host", "example.com"),
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Key", RFC_KEY),
    ("Sec-WebSocket-Version", "13"),
];

/// A request with `request_line` and the valid upgrade headers, where each
/// override replaces the header of that name (`None` removes it) or, when
/// there is none, is appended.
fn request_with(request_line: &str, overrides: &[(&str, Option<&str>)]) -> Vec<u8> {
    let mut headers: Vec<(String, String)> = UPGRADE_HEADERS
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect();
    for (name, value) in overrides {
        let position = headers
            .iter()
            .position(|(existing, _)| existing.eq_ignore_ascii_case(name));
        match (position, value) {
            (Some(position), Some(value)) => headers[position].1 = value.to_string(),
            (Some(position), None) => {
                headers.remove(position);
            }
            (None, Some(value)) => headers.push((name.to_string(), value.to_string())),
            (None, None) => {}
        }
    }
    let mut request = format!("{request_line}\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.into_bytes()
}

fn upgrade_with(overrides: &[(&str, Option<&str>)]) -> Vec<u8> {
    request_with("GET /v1/ws HTTP/1.1", overrides)
}

/// The status a request ends in: the error's status, 101 for a valid upgrade.
/// Panics when the request is incomplete, which no table case is.
fn upgrade_status(request: &[u8]) -> u16 {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    match parse_head(request, &mut headers, BODY_BYTES_MAX) {
        Ok(Some(head)) => match validate_upgrade(&head) {
            Ok(_) => 101,
            Err(error) => error.status(),
        },
        Ok(None) => panic!("incomplete: {:?}", String::from_utf8_lossy(request)),
        Err(error) => error.status(),
    }
}

/// The status `parse_head` alone ends in: 200 for a complete head.
fn parse_status(request: &[u8], body_bytes_max: usize) -> u16 {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    match parse_head(request, &mut headers, body_bytes_max) {
        Ok(Some(_)) => 200,
        Ok(None) => panic!("incomplete: {:?}", String::from_utf8_lossy(request)),
        Err(error) => error.status(),
    }
}

#[test]
fn upgrade_rules_give_their_exact_status() {
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("valid upgrade", upgrade_with(&[]), 101),
        (
            "another key of 16 bytes",
            upgrade_with(&[("Sec-WebSocket-Key", Some("AAAAAAAAAAAAAAAAAAAAAA=="))]),
            101,
        ),
        (
            "POST upgrade",
            request_with("POST /v1/ws HTTP/1.1", &[]),
            405,
        ),
        ("PUT upgrade", request_with("PUT /v1/ws HTTP/1.1", &[]), 405),
        (
            "lower-case method is another method",
            request_with("get /v1/ws HTTP/1.1", &[]),
            405,
        ),
        ("HTTP/1.0", request_with("GET /v1/ws HTTP/1.0", &[]), 505),
        ("HTTP/2.0", request_with("GET /v1/ws HTTP/2.0", &[]), 505),
        ("HTTP/1.2", request_with("GET /v1/ws HTTP/1.2", &[]), 505),
        (
            "garbage version",
            request_with("GET /v1/ws FTP/1.1", &[]),
            400,
        ),
        ("missing Host", upgrade_with(&[("Host", None)]), 400),
        ("empty Host", upgrade_with(&[("Host", Some(""))]), 400),
        (
            "two Host headers",
            request_with("GET /v1/ws HTTP/1.1\r\nHost: evil.example", &[]),
            400,
        ),
        ("missing Upgrade", upgrade_with(&[("Upgrade", None)]), 400),
        (
            "Upgrade: WebSocket",
            upgrade_with(&[("Upgrade", Some("WebSocket"))]),
            101,
        ),
        (
            "Upgrade token list",
            upgrade_with(&[("Upgrade", Some("h2c, websocket"))]),
            101,
        ),
        (
            "Upgrade: h2c",
            upgrade_with(&[("Upgrade", Some("h2c"))]),
            400,
        ),
        (
            "Upgrade: websockets",
            upgrade_with(&[("Upgrade", Some("websockets"))]),
            400,
        ),
        (
            "missing Connection",
            upgrade_with(&[("Connection", None)]),
            400,
        ),
        (
            "Connection: keep-alive, Upgrade",
            upgrade_with(&[("Connection", Some("keep-alive, Upgrade"))]),
            101,
        ),
        (
            "Connection: upgrade",
            upgrade_with(&[("Connection", Some("upgrade"))]),
            101,
        ),
        (
            "Connection: keep-alive",
            upgrade_with(&[("Connection", Some("keep-alive"))]),
            400,
        ),
        (
            "version 12",
            upgrade_with(&[("Sec-WebSocket-Version", Some("12"))]),
            426,
        ),
        (
            "version 8",
            upgrade_with(&[("Sec-WebSocket-Version", Some("8"))]),
            426,
        ),
        (
            "missing version is malformed, not another version",
            upgrade_with(&[("Sec-WebSocket-Version", None)]),
            400,
        ),
        (
            "version 12 with a bad key still learns the version",
            upgrade_with(&[
                ("Sec-WebSocket-Version", Some("12")),
                ("Sec-WebSocket-Key", Some("x")),
            ]),
            426,
        ),
        (
            "missing key",
            upgrade_with(&[("Sec-WebSocket-Key", None)]),
            400,
        ),
        (
            "key of 15 bytes",
            upgrade_with(&[("Sec-WebSocket-Key", Some("AAAAAAAAAAAAAAAAAAAA"))]),
            400,
        ),
        (
            "key of 17 bytes",
            upgrade_with(&[("Sec-WebSocket-Key", Some("AAAAAAAAAAAAAAAAAAAAAAA="))]),
            400,
        ),
        (
            "key of 24 characters that is not base64",
            upgrade_with(&[("Sec-WebSocket-Key", Some("!!!!!!!!!!!!!!!!!!!!!!=="))]),
            400,
        ),
        (
            "key without padding",
            upgrade_with(&[("Sec-WebSocket-Key", Some("dGhlIHNhbXBsZSBub25jZQ"))]),
            400,
        ),
        (
            "two keys",
            request_with(
                "GET /v1/ws HTTP/1.1\r\nSec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==",
                &[],
            ),
            400,
        ),
        (
            "upgrade with a body",
            upgrade_with(&[("Content-Length", Some("5"))]),
            400,
        ),
        (
            "upgrade with Content-Length: 0",
            upgrade_with(&[("Content-Length", Some("0"))]),
            101,
        ),
        (
            "upgrade with chunked body",
            upgrade_with(&[("Transfer-Encoding", Some("chunked"))]),
            411,
        ),
        (
            "permessage-deflate offered",
            upgrade_with(&[(
                "Sec-WebSocket-Extensions",
                Some("permessage-deflate; client_max_window_bits"),
            )]),
            101,
        ),
        (
            "absolute-form target",
            request_with("GET http://example.com/v1/ws HTTP/1.1", &[]),
            101,
        ),
    ];
    for (name, request, expected) in cases {
        assert_eq!(upgrade_status(&request), expected, "case: {name}");
    }
}

#[test]
fn head_rules_give_their_exact_status() {
    let plain = |extra: &str| format!("GET /healthz HTTP/1.1\r\nHost: h\r\n{extra}\r\n");
    let cases: Vec<(&str, String, u16)> = vec![
        ("plain GET", plain(""), 200),
        ("chunked", plain("Transfer-Encoding: chunked\r\n"), 411),
        (
            "Transfer-Encoding: gzip",
            plain("Transfer-Encoding: gzip\r\n"),
            411,
        ),
        (
            "Transfer-Encoding next to Content-Length",
            plain("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n"),
            411,
        ),
        (
            "Content-Length at the limit",
            plain("Content-Length: 1024\r\n"),
            200,
        ),
        (
            "Content-Length over the limit",
            plain("Content-Length: 1025\r\n"),
            413,
        ),
        (
            "Content-Length too large for usize",
            plain("Content-Length: 999999999999999999999999999\r\n"),
            413,
        ),
        (
            "Content-Length not a number",
            plain("Content-Length: abc\r\n"),
            400,
        ),
        (
            "Content-Length negative",
            plain("Content-Length: -1\r\n"),
            400,
        ),
        ("Content-Length empty", plain("Content-Length: \r\n"), 400),
        (
            "Content-Length repeated, equal",
            plain("Content-Length: 5\r\nContent-Length: 5\r\n"),
            200,
        ),
        (
            "Content-Length repeated, conflicting",
            plain("Content-Length: 5\r\nContent-Length: 6\r\n"),
            400,
        ),
        (
            "Content-Length list, conflicting",
            plain("Content-Length: 5, 6\r\n"),
            400,
        ),
        ("missing Host", "GET / HTTP/1.1\r\n\r\n".to_string(), 400),
        ("bad header name", plain("Bad Name: x\r\n"), 400),
        ("header without colon", plain("NoColon\r\n"), 400),
        (
            "bare LF line endings are accepted",
            "GET / HTTP/1.1\nHost: h\n\n".to_string(),
            200,
        ),
        (
            "binary garbage",
            "\u{1}\u{2}\u{3} / HTTP/1.1\r\n\r\n".to_string(),
            400,
        ),
        (
            "HTTP/1.0",
            "GET / HTTP/1.0\r\nHost: h\r\n\r\n".to_string(),
            505,
        ),
    ];
    for (name, request, expected) in cases {
        assert_eq!(
            parse_status(request.as_bytes(), BODY_BYTES_MAX),
            expected,
            "case: {name}"
        );
    }
}

/// The rules of the admin listener: chunked bodies and HTTP/1.0 probes.
const RELAXED: HeadRules = HeadRules {
    chunked: true,
    http10_paths: PROBE_PATHS,
};

/// What `parse_head_with` ends in: the framing and HTTP/1.0-ness of a
/// complete head, or the status of the error.
type Relaxed = Result<(Framing, bool), u16>;

fn relaxed_outcome(request: &str, rules: HeadRules) -> Relaxed {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    match parse_head_with(request.as_bytes(), &mut headers, BODY_BYTES_MAX, rules) {
        Ok(Some(head)) => Ok((head.framing, head.http10)),
        Ok(None) => panic!("incomplete: {request:?}"),
        Err(error) => Err(error.status()),
    }
}

#[test]
fn relaxed_rules_take_chunked_bodies_and_http10_probes_only() {
    let post = |extra: &str| format!("POST /v1/publish HTTP/1.1\r\nHost: h\r\n{extra}\r\n");
    let cases: Vec<(&str, String, Relaxed)> = vec![
        ("no framing", post(""), Ok((Framing::Unframed, false))),
        (
            "Content-Length",
            post("Content-Length: 3\r\n"),
            Ok((Framing::Length, false)),
        ),
        (
            "chunked",
            post("Transfer-Encoding: chunked\r\n"),
            Ok((Framing::Chunked, false)),
        ),
        (
            "chunked, any case",
            post("Transfer-Encoding:  Chunked \r\n"),
            Ok((Framing::Chunked, false)),
        ),
        (
            "chunked next to Content-Length",
            post("Transfer-Encoding: chunked\r\nContent-Length: 3\r\n"),
            Err(400),
        ),
        ("gzip", post("Transfer-Encoding: gzip\r\n"), Err(411)),
        (
            "gzip, chunked",
            post("Transfer-Encoding: gzip, chunked\r\n"),
            Err(411),
        ),
        (
            "chunked twice",
            post("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n"),
            Err(411),
        ),
        (
            "HTTP/1.0 probe without Host",
            "GET /healthz HTTP/1.0\r\n\r\n".to_string(),
            Ok((Framing::Unframed, true)),
        ),
        (
            "HTTP/1.0 HEAD probe with Host",
            "HEAD /readyz HTTP/1.0\r\nHost: lb\r\n\r\n".to_string(),
            Ok((Framing::Unframed, true)),
        ),
        (
            "HTTP/1.0 probe with a query",
            "GET /healthz?check=1 HTTP/1.0\r\n\r\n".to_string(),
            Ok((Framing::Unframed, true)),
        ),
        (
            "HTTP/1.0 POST of a probe path",
            "POST /healthz HTTP/1.0\r\n\r\n".to_string(),
            Err(505),
        ),
        (
            "HTTP/1.0 of another path",
            "GET /metrics HTTP/1.0\r\nHost: h\r\n\r\n".to_string(),
            Err(505),
        ),
        (
            "HTTP/1.0 upgrade",
            "GET /v1/ws HTTP/1.0\r\nHost: h\r\n\r\n".to_string(),
            Err(505),
        ),
        (
            "HTTP/1.1 probe still needs Host",
            "GET /healthz HTTP/1.1\r\n\r\n".to_string(),
            Err(400),
        ),
    ];
    for (name, request, expected) in cases {
        assert_eq!(relaxed_outcome(&request, RELAXED), expected, "case: {name}");
    }
    // The strict rules (and parse_head) keep refusing both.
    assert_eq!(
        relaxed_outcome(&post("Transfer-Encoding: chunked\r\n"), HeadRules::STRICT),
        Err(411)
    );
    assert_eq!(
        relaxed_outcome("GET /healthz HTTP/1.0\r\n\r\n", HeadRules::STRICT),
        Err(505)
    );
    // A chunked upgrade is an upgrade with a body.
    let chunked_upgrade = upgrade_with(&[("Transfer-Encoding", Some("chunked"))]);
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let head = parse_head_with(&chunked_upgrade, &mut headers, BODY_BYTES_MAX, RELAXED)
        .expect("parses")
        .expect("complete");
    assert_eq!(
        validate_upgrade(&head).err(),
        Some(HttpError::UpgradeWithBody)
    );
}

#[test]
fn closing_answers_say_so_once() {
    let mut out = Vec::new();
    write_response(&mut out, 200, "application/json", &[], b"{}");
    mark_closing(&mut out);
    let response = parse_response(&out);
    assert_eq!(response.status, 200);
    assert_eq!(response.header("connection"), Some("close"));
    assert_eq!(response.body, b"{}");
    let once = out.clone();
    mark_closing(&mut out);
    assert_eq!(out, once);
    let mut out = Vec::new();
    write_http_error(&mut out, HttpError::LengthRequired);
    let before = out.clone();
    mark_closing(&mut out);
    assert_eq!(out, before);
}

/// A plain request with `count` headers in total (Host included).
fn request_with_header_count(count: usize) -> Vec<u8> {
    let mut request = String::from("GET / HTTP/1.1\r\nHost: h\r\n");
    for index in 1..count {
        request.push_str(&format!("X-Header-{index}: {index}\r\n"));
    }
    request.push_str("\r\n");
    request.into_bytes()
}

/// A plain request whose head is exactly `head_bytes` long.
fn request_of_length(head_bytes: usize) -> Vec<u8> {
    let start = "GET / HTTP/1.1\r\nHost: h\r\nX-Padding: ";
    let end = "\r\n\r\n";
    let padding = head_bytes - start.len() - end.len();
    let request = format!("{start}{}{end}", "a".repeat(padding));
    assert_eq!(request.len(), head_bytes);
    request.into_bytes()
}

#[test]
fn header_count_limit() {
    assert_eq!(
        parse_status(&request_with_header_count(HEADERS_MAX), 0),
        200
    );
    assert_eq!(
        parse_status(&request_with_header_count(HEADERS_MAX + 1), 0),
        431
    );
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    assert_eq!(
        parse_head(&request_with_header_count(65), &mut headers, 0).err(),
        Some(HttpError::TooManyHeaders)
    );
}

#[test]
fn head_size_limit() {
    assert_eq!(parse_status(&request_of_length(HEAD_BYTES_MAX), 0), 200);
    assert_eq!(parse_status(&request_of_length(HEAD_BYTES_MAX + 1), 0), 431);
    assert_eq!(parse_status(&request_of_length(9 * 1024), 0), 431);

    // A head that never ends is refused once the limit is reached, not
    // before.
    let endless = request_of_length(9 * 1024);
    let endless = &endless[..endless.len() - 4];
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    assert_eq!(
        parse_head(&endless[..HEAD_BYTES_MAX - 1], &mut headers, 0),
        Ok(None)
    );
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    assert_eq!(
        parse_head(&endless[..HEAD_BYTES_MAX], &mut headers, 0).err(),
        Some(HttpError::HeadTooLarge)
    );
}

#[test]
fn incomplete_heads_need_more() {
    let request = upgrade_with(&[]);
    for cut in [0, 1, 3, 4, 16, request.len() - 2, request.len() - 1] {
        let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
        assert_eq!(
            parse_head(&request[..cut], &mut headers, BODY_BYTES_MAX),
            Ok(None),
            "cut at {cut}"
        );
    }
}

/// What a parse ended in, comparable across calls.
#[derive(Debug, PartialEq)]
enum Outcome {
    Need,
    Head {
        method: String,
        path: String,
        query: String,
        header_count: usize,
        head_len: usize,
        content_length: usize,
    },
    Error(HttpError),
}

fn outcome(buf: &[u8]) -> Outcome {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    match parse_head(buf, &mut headers, BODY_BYTES_MAX) {
        Ok(None) => Outcome::Need,
        Ok(Some(head)) => Outcome::Head {
            method: head.method.to_string(),
            path: head.path.to_string(),
            query: head.query.to_string(),
            header_count: head.headers.len(),
            head_len: head.head_len,
            content_length: head.content_length,
        },
        Err(error) => Outcome::Error(error),
    }
}

/// Feeding `request` one byte at a time must end the same way as feeding it
/// at once: "need more" until the byte that decides, then the same answer.
fn assert_byte_at_a_time_agrees(request: &[u8]) {
    let at_once = outcome(request);
    let mut decided = None;
    for length in 0..=request.len() {
        let result = outcome(&request[..length]);
        if result != Outcome::Need {
            decided = Some((length, result));
            break;
        }
    }
    match decided {
        Some((length, result)) => {
            assert_eq!(result, at_once, "decided at byte {length}");
            if let Outcome::Head { head_len, .. } = result {
                assert_eq!(length, head_len);
            }
        }
        None => assert_eq!(at_once, Outcome::Need),
    }
}

#[test]
fn byte_at_a_time_gives_the_same_result() {
    let mut requests = vec![
        upgrade_with(&[]),
        request_with(
            "POST /v1/publish HTTP/1.1",
            &[("Content-Length", Some("5"))],
        ),
        request_with("GET /v1/ws HTTP/1.0", &[]),
        request_with("GET /v1/ws HTTP/2.0", &[]),
        request_with("GET /v1/ws HTTX/1.1", &[]),
        upgrade_with(&[("Transfer-Encoding", Some("chunked"))]),
        upgrade_with(&[("Content-Length", Some("x"))]),
        upgrade_with(&[("Content-Length", Some("100000"))]),
        upgrade_with(&[("Host", None)]),
        b"\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\nbody".to_vec(),
        b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n".to_vec(),
        request_with_header_count(HEADERS_MAX + 1),
        request_of_length(HEAD_BYTES_MAX),
        request_of_length(HEAD_BYTES_MAX + 1),
    ];
    // A request followed by the start of a WebSocket frame.
    let mut with_frame = upgrade_with(&[]);
    with_frame.extend_from_slice(&[0x81, 0x85, 1, 2, 3, 4]);
    requests.push(with_frame);
    for request in requests {
        assert_byte_at_a_time_agrees(&request);
    }
}

#[test]
fn head_fields_borrow_from_the_request() {
    let request = b"POST /v1/publish?a=1&b=2 HTTP/1.1\r\nHost: admin:8081\r\n\
Content-Length: 5\r\nContent-Type: application/json\r\nExpect: 100-continue\r\n\
Connection: close\r\n\r\n{\"a\"}";
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let head = parse_head(request, &mut headers, BODY_BYTES_MAX)
        .expect("valid")
        .expect("complete");
    assert_eq!(head.method, "POST");
    assert_eq!(head.target, "/v1/publish?a=1&b=2");
    assert_eq!(head.path, "/v1/publish");
    assert_eq!(head.query, "a=1&b=2");
    assert_eq!(head.host, b"admin:8081");
    assert_eq!(head.headers.len(), 5);
    assert_eq!(head.content_length, 5);
    assert_eq!(&request[head.head_len..], b"{\"a\"}");
    assert_eq!(head.header("CONTENT-TYPE"), Some(&b"application/json"[..]));
    assert_eq!(head.header("x-missing"), None);
    assert!(head.expects_continue());
    assert!(head.connection_close());
}

#[test]
fn percent_decoding() {
    let cases: &[(&str, Option<&str>)] = &[
        ("plain", Some("plain")),
        ("", Some("")),
        ("a%2Bb", Some("a+b")),
        ("a%2bb", Some("a+b")),
        ("a%20b", Some("a b")),
        ("a+b", Some("a b")),
        ("%41%42%43", Some("ABC")),
        ("caf%C3%A9", Some("café")),
        ("100%25", Some("100%")),
        ("%", None),
        ("%2", None),
        ("a%2", None),
        ("%zz", None),
        ("%2G", None),
        ("%FF", None),
        ("%C3", None),
    ];
    for (input, expected) in cases {
        assert_eq!(
            percent_decode(input).as_deref(),
            *expected,
            "input: {input:?}"
        );
    }
    assert!(matches!(
        percent_decode("hs_live_abc"),
        Some(Cow::Borrowed(_))
    ));
    assert!(matches!(percent_decode("a%20b"), Some(Cow::Owned(_))));
}

fn with_head<R>(request: &[u8], check: impl FnOnce(&hookstream::protocol::http::Head) -> R) -> R {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let head = parse_head(request, &mut headers, BODY_BYTES_MAX)
        .expect("valid")
        .expect("complete");
    check(&head)
}

#[test]
fn query_parameters() {
    let request = request_with(
        "GET /v1/ws?after=5&token=hs%2Blive%20x&empty=&flag&token=second&na%6De=v HTTP/1.1",
        &[],
    );
    with_head(&request, |head| {
        assert_eq!(head.query_param("after").as_deref(), Some("5"));
        assert_eq!(head.query_param("token").as_deref(), Some("hs+live x"));
        assert_eq!(head.query_param("empty").as_deref(), Some(""));
        assert_eq!(head.query_param("flag").as_deref(), Some(""));
        assert_eq!(head.query_param("name").as_deref(), Some("v"));
        assert_eq!(head.query_param("missing"), None);
        assert_eq!(head.query_param("afte"), None);
        assert!(matches!(
            head.query_param("after"),
            Some(Cow::Borrowed("5"))
        ));
    });
    let bad_escape = request_with("GET /v1/ws?token=%zz HTTP/1.1", &[]);
    with_head(&bad_escape, |head| {
        assert_eq!(head.query_param("token"), None)
    });
    let no_query = upgrade_with(&[]);
    with_head(&no_query, |head| {
        assert_eq!(head.query, "");
        assert_eq!(head.query_param("token"), None);
    });
}

#[test]
fn cookie_parsing() {
    let header = b"theme=dark; hs_session=abc.def-123; lang=en";
    assert_eq!(cookie_value(header, "hs_session"), Some("abc.def-123"));
    assert_eq!(cookie_value(header, "theme"), Some("dark"));
    assert_eq!(cookie_value(header, "lang"), Some("en"));
    assert_eq!(cookie_value(header, "missing"), None);
    assert_eq!(cookie_value(header, "HS_SESSION"), None);
    assert_eq!(
        cookie_value(b"xhs_session=1; hs_session=2", "hs_session"),
        Some("2")
    );
    assert_eq!(
        cookie_value(b"hs_session=\"quoted\"", "hs_session"),
        Some("quoted")
    );
    assert_eq!(
        cookie_value(b"  hs_session = spaced ;", "hs_session"),
        Some("spaced")
    );
    assert_eq!(
        cookie_value(b"hs_session=first; hs_session=second", "hs_session"),
        Some("first")
    );
    assert_eq!(cookie_value(b"hs_session=", "hs_session"), None);
    assert_eq!(cookie_value(b"hs_session", "hs_session"), None);
    assert_eq!(cookie_value(b"", "hs_session"), None);
    assert_eq!(cookie_value(b"hs_session=\xff", "hs_session"), None);
    assert_eq!(cookie_value(b"a=b=c", "a"), Some("b=c"));
}

#[test]
fn bearer_parsing() {
    let cases: &[(&[u8], Option<&str>)] = &[
        (b"Bearer hs_live_abc", Some("hs_live_abc")),
        (b"bearer hs_live_abc", Some("hs_live_abc")),
        (b"BEARER   hs_live_abc  ", Some("hs_live_abc")),
        (b"Bearer abc+/=~.-_", Some("abc+/=~.-_")),
        (b"Basic dXNlcjpwYXNz", None),
        (b"Bearer", None),
        (b"Bearer ", None),
        (b"Bearerabc", None),
        (b"Bearer a b", None),
        (b"Bearer a,b", None),
        (b"Bearer \xff", None),
        (b"", None),
    ];
    for (input, expected) in cases {
        assert_eq!(
            bearer_token(input),
            *expected,
            "input: {:?}",
            String::from_utf8_lossy(input)
        );
    }
}

#[test]
fn upgrade_extracts_credentials_without_copying() {
    let request = request_with(
        "GET /v1/ws?token=hs_live_k1 HTTP/1.1",
        &[
            ("Origin", Some("https://app.example.com")),
            ("Authorization", Some("Bearer hs_live_k2")),
            ("Cookie", Some("a=1; hs_session=s3")),
        ],
    );
    with_head(&request, |head| {
        let upgrade = validate_upgrade(head).expect("valid upgrade");
        assert_eq!(
            upgrade,
            Upgrade {
                key: RFC_KEY.as_bytes(),
                host: b"example.com",
                origin: Some(b"https://app.example.com"),
                token: Some(Cow::Borrowed("hs_live_k1")),
                bearer: Some("hs_live_k2"),
                session_cookie: Some("s3"),
            }
        );
        assert!(matches!(upgrade.token, Some(Cow::Borrowed(_))));
    });

    // Nothing offered, an empty token, and a cookie on its second header line.
    let request = request_with(
        "GET /v1/ws?token= HTTP/1.1",
        &[("Cookie", Some("a=1\r\nCookie: hs_session=late"))],
    );
    with_head(&request, |head| {
        let upgrade = validate_upgrade(head).expect("valid upgrade");
        assert_eq!(upgrade.token, None);
        assert_eq!(upgrade.bearer, None);
        assert_eq!(upgrade.origin, None);
        assert_eq!(upgrade.session_cookie, Some("late"));
    });
}

#[test]
fn accept_key_matches_rfc_6455_example() {
    assert_eq!(&accept_key(RFC_KEY.as_bytes()), RFC_ACCEPT.as_bytes());
}

#[test]
fn switching_protocols_answer() {
    let mut out = [0u8; SWITCHING_PROTOCOLS_LEN_MAX];
    let written = write_switching_protocols(&mut out, RFC_KEY.as_bytes());
    let expected = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Accept: {RFC_ACCEPT}\r\n\r\n"
    );
    assert_eq!(&out[..written], expected.as_bytes());
    let text = String::from_utf8_lossy(&out[..written]).to_ascii_lowercase();
    assert!(!text.contains("extension"));
    assert!(!text.contains("deflate"));
}

/// A response parsed back: status, headers, body.
struct ParsedResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl ParsedResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(existing, _)| existing.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

/// Parse a written response with httparse and check its framing: the body
/// is exactly `Content-Length` bytes.
fn parse_response(bytes: &[u8]) -> ParsedResponse {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(bytes).expect("well-formed response") {
        httparse::Status::Complete(head_len) => head_len,
        httparse::Status::Partial => panic!("incomplete response"),
    };
    let headers: Vec<(String, String)> = response
        .headers
        .iter()
        .map(|header| {
            (
                header.name.to_string(),
                String::from_utf8(header.value.to_vec()).expect("ASCII header"),
            )
        })
        .collect();
    let parsed = ParsedResponse {
        status: response.code.expect("status"),
        headers,
        body: bytes[head_len..].to_vec(),
    };
    match parsed.header("content-length") {
        Some(length) => assert_eq!(length.parse::<usize>().ok(), Some(parsed.body.len())),
        None => assert!(parsed.body.is_empty()),
    }
    parsed
}

#[test]
fn error_responses() {
    for status in [
        400, 401, 403, 404, 405, 408, 411, 413, 426, 429, 431, 500, 503, 505,
    ] {
        let mut out = Vec::new();
        write_error(&mut out, status, &[]);
        let response = parse_response(&out);
        assert_eq!(response.status, status);
        assert_eq!(response.header("content-type"), Some("application/json"));
        let body: serde_json::Value = serde_json::from_slice(&response.body).expect("JSON");
        assert_eq!(body, serde_json::json!({ "error": error_code(status) }));
        assert!(!reason_phrase(status).is_empty());
        assert!(
            out.starts_with(format!("HTTP/1.1 {status} {}\r\n", reason_phrase(status)).as_bytes())
        );
    }

    let mut out = Vec::new();
    write_error(&mut out, 401, &[]);
    assert!(out.ends_with(b"\r\n\r\n{\"error\":\"unauthorized\"}"));

    let codes = [
        (400, "bad_request"),
        (401, "unauthorized"),
        (404, "not_found"),
        (429, "rate_limited"),
    ];
    for (status, code) in codes {
        assert_eq!(error_code(status), code);
    }
}

#[test]
fn version_426_names_the_supported_version() {
    let request = upgrade_with(&[("Sec-WebSocket-Version", Some("12"))]);
    let error = with_head(&request, |head| {
        validate_upgrade(head).expect_err("refused")
    });
    assert_eq!(error, HttpError::UnsupportedWebSocketVersion);
    assert_eq!(error.status(), 426);

    let mut out = Vec::new();
    write_error(&mut out, error.status(), &[("X-Request-Id", "7")]);
    let response = parse_response(&out);
    assert_eq!(response.status, 426);
    assert_eq!(response.header("sec-websocket-version"), Some("13"));
    assert_eq!(response.header("x-request-id"), Some("7"));

    let mut out = Vec::new();
    write_http_error(&mut out, error);
    let response = parse_response(&out);
    assert_eq!(response.header("sec-websocket-version"), Some("13"));
    assert_eq!(response.header("connection"), Some("close"));
}

#[test]
fn method_not_allowed_names_get() {
    let mut out = Vec::new();
    write_http_error(&mut out, HttpError::MethodNotAllowed);
    let response = parse_response(&out);
    assert_eq!(response.status, 405);
    assert_eq!(response.header("allow"), Some("GET"));
    assert_eq!(response.header("connection"), Some("close"));
}

#[test]
fn plain_responses() {
    let mut out = Vec::new();
    write_response(
        &mut out,
        202,
        "application/json",
        &[("X-Seq", "1")],
        b"{\"accepted\":1}",
    );
    let response = parse_response(&out);
    assert_eq!(response.status, 202);
    assert_eq!(response.header("x-seq"), Some("1"));
    assert_eq!(response.body, b"{\"accepted\":1}");

    // 204 carries neither a body nor Content-Length.
    let mut out = Vec::new();
    write_response(&mut out, 204, "text/plain", &[], b"");
    assert_eq!(out, b"HTTP/1.1 204 No Content\r\n\r\n");

    // A header value that came from a request cannot split the response.
    let mut out = Vec::new();
    write_response(
        &mut out,
        200,
        "",
        &[("X-Echo", "a\r\nSet-Cookie: x=1")],
        b"ok",
    );
    let response = parse_response(&out);
    assert_eq!(response.header("set-cookie"), None);
    assert_eq!(response.header("content-type"), None);
    assert_eq!(response.body, b"ok");

    // Appending keeps what was in the buffer.
    let mut out = b"before".to_vec();
    write_error(&mut out, 404, &[]);
    assert!(out.starts_with(b"beforeHTTP/1.1 404 Not Found\r\n"));
}

/// An in-memory socket for tungstenite: writes are kept for the test to
/// read, reads come from what the test queued and would block when empty.
#[derive(Debug, Default)]
struct MemoryStream {
    from_server: VecDeque<u8>,
    to_server: Vec<u8>,
}

impl Read for MemoryStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.from_server.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.from_server.read(buf)
    }
}

impl Write for MemoryStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.to_server.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

type ClientMidHandshake =
    tungstenite::handshake::MidHandshake<tungstenite::ClientHandshake<MemoryStream>>;

/// Start tungstenite's client handshake and return it paused, waiting for
/// the server's answer, with its request bytes.
fn start_tungstenite_client(
    request: impl tungstenite::client::IntoClientRequest,
) -> (ClientMidHandshake, Vec<u8>) {
    match tungstenite::client(request, MemoryStream::default()) {
        Err(tungstenite::HandshakeError::Interrupted(mut handshake)) => {
            let sent = std::mem::take(&mut handshake.get_mut().get_mut().to_server);
            (handshake, sent)
        }
        Err(tungstenite::HandshakeError::Failure(error)) => panic!("client failed: {error}"),
        Ok(_) => panic!("handshake finished without an answer"),
    }
}

#[test]
fn tungstenite_client_handshake_completes_against_our_answer() {
    let uri: tungstenite::http::Uri = "ws://example.com:8080/v1/ws?token=hs_live_abc%2Bdef"
        .parse()
        .expect("uri");
    let request = tungstenite::ClientRequestBuilder::new(uri)
        .with_header("Origin", "http://example.com:8080")
        .with_header("Cookie", "hs_session=s1");
    let (mut handshake, sent) = start_tungstenite_client(request);

    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let head = parse_head(&sent, &mut headers, 0)
        .expect("tungstenite's request parses")
        .expect("tungstenite's request is complete");
    assert_eq!(head.head_len, sent.len());
    assert_eq!(head.path, "/v1/ws");
    let upgrade = validate_upgrade(&head).expect("tungstenite's request is a valid upgrade");
    assert_eq!(upgrade.token.as_deref(), Some("hs_live_abc+def"));
    assert_eq!(upgrade.host, b"example.com:8080");
    assert_eq!(upgrade.origin, Some(&b"http://example.com:8080"[..]));
    assert_eq!(upgrade.session_cookie, Some("s1"));

    let mut answer = [0u8; SWITCHING_PROTOCOLS_LEN_MAX];
    let written = write_switching_protocols(&mut answer, upgrade.key);
    handshake
        .get_mut()
        .get_mut()
        .from_server
        .extend(&answer[..written]);
    let (mut socket, response) = match handshake.handshake() {
        Ok(done) => done,
        Err(error) => panic!("tungstenite refused our 101: {error}"),
    };
    assert_eq!(response.status(), 101);

    // The connection is usable: a message the client sends arrives masked.
    socket
        .send(tungstenite::Message::text("{\"type\":\"ping\"}"))
        .expect("send");
    let frame = &socket.get_ref().to_server;
    assert_eq!(frame[0], 0x81);
    assert_eq!(frame[1], 0x80 | 15);
}

#[test]
fn tungstenite_client_refuses_a_wrong_accept_key() {
    // The control for the test above: the client really checks our answer.
    let (mut handshake, _sent) = start_tungstenite_client("ws://example.com/v1/ws");
    let mut answer = [0u8; SWITCHING_PROTOCOLS_LEN_MAX];
    let written = write_switching_protocols(&mut answer, RFC_KEY.as_bytes());
    handshake
        .get_mut()
        .get_mut()
        .from_server
        .extend(&answer[..written]);
    assert!(handshake.handshake().is_err());
}

#[test]
fn tungstenite_bearer_request_is_accepted() {
    let uri: tungstenite::http::Uri = "ws://127.0.0.1:8080/v1/ws".parse().expect("uri");
    let request = tungstenite::ClientRequestBuilder::new(uri)
        .with_header("Authorization", "Bearer hs_live_xyz");
    let (_handshake, sent) = start_tungstenite_client(request);
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let head = parse_head(&sent, &mut headers, 0)
        .expect("parses")
        .expect("complete");
    let upgrade = validate_upgrade(&head).expect("valid upgrade");
    assert_eq!(upgrade.bearer, Some("hs_live_xyz"));
    assert_eq!(upgrade.token, None);
}

/// Request-shaped bytes: a method, a target and headers from small sets with
/// random values, so the property tests reach the checks after httparse.
fn request_like() -> impl Strategy<Value = Vec<u8>> {
    let method = prop::sample::select(vec!["GET", "POST", "get", "DELETE", "G ET"]);
    let target = "(/[a-z0-9%+=&?._~-]{0,30}){1,3}";
    let version = prop::sample::select(vec!["HTTP/1.1", "HTTP/1.0", "HTTP/2", "HTTP/1.1 "]);
    let name = prop::sample::select(vec![
        "Host",
        "Upgrade",
        "Connection",
        "Sec-WebSocket-Key",
        "Sec-WebSocket-Version",
        "Content-Length",
        "Transfer-Encoding",
        "Cookie",
        "Authorization",
        "Origin",
        "X-Other",
    ]);
    let value = prop::sample::select(vec![
        "websocket",
        "Upgrade",
        "keep-alive, upgrade",
        RFC_KEY,
        "13",
        "12",
        "5",
        "5, 5",
        "0",
        "chunked",
        "hs_session=a; x=\"b\"",
        "Bearer t",
        "",
        "example.com",
        "\u{ff}",
    ]);
    let headers = prop::collection::vec((name, value), 0..12);
    let tail = prop::collection::vec(any::<u8>(), 0..8);
    (method, target, version, headers, tail).prop_map(|(method, target, version, headers, tail)| {
        let mut request = format!("{method} {target} {version}\r\n");
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        let mut request = request.into_bytes();
        request.extend(tail);
        request
    })
}

/// Run everything a server would run on a head; only panics count.
fn exercise(buf: &[u8]) {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    if let Ok(Some(head)) = parse_head(buf, &mut headers, BODY_BYTES_MAX) {
        assert!(head.head_len <= buf.len());
        assert!(head.head_len <= HEAD_BYTES_MAX);
        let _ = head.query_param("token");
        let _ = head.expects_continue();
        if let Ok(upgrade) = validate_upgrade(&head) {
            let mut answer = [0u8; SWITCHING_PROTOCOLS_LEN_MAX];
            write_switching_protocols(&mut answer, upgrade.key);
        }
    }
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        exercise(&bytes);
    }

    #[test]
    fn request_like_bytes_never_panic_and_agree_byte_at_a_time(request in request_like()) {
        exercise(&request);
        assert_byte_at_a_time_agrees(&request);
    }

    #[test]
    fn mutated_upgrades_never_panic(
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let mut request = upgrade_with(&[("Cookie", Some("hs_session=a")), ("Origin", Some("o"))]);
        for (index, byte) in flips {
            let at = index.index(request.len());
            request[at] = byte;
        }
        exercise(&request);
        assert_byte_at_a_time_agrees(&request);
    }

    #[test]
    fn helpers_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256), text in ".{0,64}") {
        let _ = bearer_token(&bytes);
        let _ = cookie_value(&bytes, "hs_session");
        let _ = accept_key(&bytes);
        let _ = percent_decode(&text);
    }

    #[test]
    fn chunked_bodies_decode_whole_in_any_chunking_and_any_feeding(
        body in prop::collection::vec(any::<u8>(), 0..2000),
        chunk_lens in prop::collection::vec(1usize..300, 1..20),
        feed_lens in prop::collection::vec(1usize..64, 1..20),
        upper_hex in any::<bool>(),
    ) {
        // Encode `body` in chunks of the given sizes (cycled).
        let mut encoded = Vec::new();
        let mut rest = &body[..];
        let mut sizes = chunk_lens.iter().cycle();
        while !rest.is_empty() {
            let take = (*sizes.next().unwrap()).min(rest.len());
            let size = if upper_hex { format!("{take:X}") } else { format!("{take:x}") };
            encoded.extend_from_slice(size.as_bytes());
            encoded.extend_from_slice(b"\r\n");
            encoded.extend_from_slice(&rest[..take]);
            encoded.extend_from_slice(b"\r\n");
            rest = &rest[take..];
        }
        encoded.extend_from_slice(b"0\r\n\r\nGET / HTTP/1.1\r\n");
        let body_end = encoded.len() - b"GET / HTTP/1.1\r\n".len();
        // Feed it in pieces, keeping what a call left unused.
        let mut decoder = ChunkedDecoder::new(body.len());
        let mut decoded = Vec::new();
        let mut pending = Vec::new();
        let mut consumed = 0;
        let mut feeds = feed_lens.iter().cycle();
        let mut at = 0;
        while !decoder.is_done() {
            prop_assert!(at < encoded.len(), "ran out of input");
            let take = (*feeds.next().unwrap()).min(encoded.len() - at);
            pending.extend_from_slice(&encoded[at..at + take]);
            at += take;
            let used = decoder.feed(&pending, &mut decoded).expect("valid chunked body");
            consumed += used;
            pending.drain(..used);
        }
        prop_assert_eq!(&decoded, &body);
        prop_assert_eq!(consumed, body_end);
        // One byte less of room is refused as too large (when there is a body).
        if !body.is_empty() {
            let mut decoder = ChunkedDecoder::new(body.len() - 1);
            let mut decoded = Vec::new();
            prop_assert_eq!(decoder.feed(&encoded, &mut decoded), Err(ChunkedError::TooLarge));
            prop_assert!(decoded.len() < body.len());
        }
    }

    #[test]
    fn arbitrary_chunked_input_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let mut decoder = ChunkedDecoder::new(256);
        let mut decoded = Vec::new();
        if let Ok(used) = decoder.feed(&bytes, &mut decoded) {
            prop_assert!(used <= bytes.len());
            prop_assert!(decoded.len() <= 256);
        }
    }

    #[test]
    fn percent_decode_inverts_percent_encoding(text in ".{0,64}") {
        let encoded: String = text.bytes().map(|byte| format!("%{byte:02X}")).collect();
        let decoded = percent_decode(&encoded);
        prop_assert_eq!(decoded.as_deref(), Some(text.as_str()));
    }
}
