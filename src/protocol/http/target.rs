//! The request target: its path and query, and percent-decoding.

use std::borrow::Cow;

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

/// Split a request target into path and raw query (without `?`). A
/// fragment, which clients must not send, is dropped rather than taken as
/// part of the query.
pub(super) fn split_target(target: &str) -> (&str, &str) {
    let target = target.split_once('#').map_or(target, |(before, _)| before);
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    (origin_form_path(path), query)
}

/// The path of an absolute-form target (`http://host:80/p` → `/p`), which
/// servers must accept (RFC 9112 §3.2.2); other forms are returned as is.
pub(super) fn origin_form_path(path: &str) -> &str {
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

pub(super) fn needs_decoding(s: &str) -> bool {
    s.bytes().any(|byte| byte == b'%' || byte == b'+')
}

pub(super) fn hex_value(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}
