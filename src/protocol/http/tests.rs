//! Unit tests of the HTTP head parser, the upgrade and the answers.

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
        HttpError::HeadNotAllowed,
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
