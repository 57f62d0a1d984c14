//! Parsing and validating `POST /v1/publish` bodies (PROTOCOL.md §3): one
//! object, a JSON array of objects, or NDJSON. Validation is all-or-nothing:
//! the first bad message makes the whole request a 400 and nothing is
//! published.
//!
//! `data` is kept as the publisher's own JSON text (`serde_json::RawValue`),
//! never re-serialized, so every digit of every number arrives as sent.
//! (simd-json was the first choice for this parse, but its value model does
//! not give the byte span of a sub-value, which is exactly what forwarding
//! `data` verbatim needs; see docs/ARCHITECTURE.md.)

use std::borrow::Cow;
use std::cell::Cell;

use serde::de::{Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::message::{Message, MessageKind};

/// Why a request was refused; `index` is the message's position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishError {
    /// Position of the first bad message (0 for a body that is not JSON at all).
    pub index: usize,
    /// What is wrong with it.
    pub reason: String,
}

impl PublishError {
    fn at(index: usize, reason: impl Into<String>) -> PublishError {
        PublishError {
            index,
            reason: reason.into(),
        }
    }

    /// The 400 body of the contract.
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "error": "invalid_message",
            "index": self.index,
            "reason": self.reason,
        })
        .to_string()
    }
}

/// One message's fields. The strings are borrowed from the body unless
/// they contain escapes (`"org\u005fa"` is the valid JSON for `org_a`).
#[derive(Deserialize)]
struct RawMessage<'a> {
    #[serde(borrow)]
    org_id: Option<Cow<'a, str>>,
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    collection_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    idempotency_key: Option<serde_json::Value>,
}

/// Longest `idempotency_key`, in bytes.
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 128;

/// An `idempotency_key`: 1-128 bytes of printable ASCII (no space), so it
/// can be a NATS header value as it is.
fn idempotency_key(value: Option<serde_json::Value>) -> Result<Option<Box<str>>, String> {
    match value {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(key))
            if !key.is_empty()
                && key.len() <= IDEMPOTENCY_KEY_BYTES_MAX
                && key.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            Ok(Some(key.into()))
        }
        Some(serde_json::Value::String(_)) => Err(format!(
            "idempotency_key must be 1-{IDEMPOTENCY_KEY_BYTES_MAX} printable ASCII characters without spaces"
        )),
        Some(_) => Err("idempotency_key must be a string".to_string()),
    }
}

#[derive(Deserialize)]
struct RouteIds {
    source_id: Option<serde_json::Value>,
    destination_id: Option<serde_json::Value>,
}

pub use crate::message::is_valid_id;

fn string_id(value: Option<serde_json::Value>, field: &str) -> Result<String, String> {
    match value {
        Some(serde_json::Value::String(id)) if is_valid_id(&id) => Ok(id),
        Some(serde_json::Value::String(_)) => {
            Err(format!("data.{field} must match [A-Za-z0-9_.-]{{1,128}}"))
        }
        Some(_) => Err(format!("data.{field} must be a string")),
        None => Err(format!("data.{field} is required")),
    }
}

fn validate(index: usize, raw: &str) -> Result<Message, PublishError> {
    let envelope: RawMessage<'_> = serde_json::from_str(raw)
        .map_err(|e| PublishError::at(index, format!("not a message object: {e}")))?;
    let org_id = envelope
        .org_id
        .ok_or_else(|| PublishError::at(index, "org_id is required"))?;
    if !crate::auth::keys::is_valid_org_id(&org_id) {
        return Err(PublishError::at(
            index,
            "org_id must match [A-Za-z0-9_-]{1,64}",
        ));
    }
    let kind = envelope
        .kind
        .as_deref()
        .and_then(MessageKind::parse)
        .ok_or_else(|| PublishError::at(index, "type must be event, delivery, issue or sync"))?;
    let data = envelope
        .data
        .ok_or_else(|| PublishError::at(index, "data is required"))?;
    if !data.get().starts_with('{') {
        return Err(PublishError::at(index, "data must be a JSON object"));
    }
    let route_id = match kind {
        MessageKind::Event | MessageKind::Delivery => {
            let ids: RouteIds = serde_json::from_str(data.get())
                .map_err(|e| PublishError::at(index, format!("data: {e}")))?;
            let (value, field) = if kind == MessageKind::Event {
                (ids.source_id, "source_id")
            } else {
                (ids.destination_id, "destination_id")
            };
            Some(string_id(value, field).map_err(|reason| PublishError::at(index, reason))?)
        }
        MessageKind::Issue => None,
        MessageKind::Sync => {
            let id = envelope
                .collection_id
                .ok_or_else(|| PublishError::at(index, "collection_id is required for sync"))?;
            if !is_valid_id(&id) {
                return Err(PublishError::at(
                    index,
                    "collection_id must match [A-Za-z0-9_.-]{1,128}",
                ));
            }
            Some(id.into_owned())
        }
    };
    let idempotency_key = idempotency_key(envelope.idempotency_key)
        .map_err(|reason| PublishError::at(index, reason))?;
    Ok(Message {
        org_id: org_id.into_owned(),
        kind,
        route_id,
        data: data.get().into(),
        idempotency_key,
    })
}

/// Parses a publish body. `ndjson` is true for `application/x-ndjson`.
pub fn parse_body(body: &[u8], ndjson: bool) -> Result<Vec<Message>, PublishError> {
    let text = std::str::from_utf8(body).map_err(|_| PublishError::at(0, "body is not UTF-8"))?;
    if ndjson {
        let mut out = Vec::new();
        for line in text.split('\n') {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            out.push(validate(out.len(), line)?);
        }
        return Ok(out);
    }
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        let items = parse_array(text)?;
        items
            .iter()
            .enumerate()
            .map(|(index, raw)| validate(index, raw.get()))
            .collect()
    } else {
        // Check the whole body is one JSON value before looking inside.
        let raw: &RawValue = serde_json::from_str(text)
            .map_err(|e| PublishError::at(0, format!("invalid JSON: {e}")))?;
        Ok(vec![validate(0, raw.get())?])
    }
}

/// The elements of a JSON array body, each as its own text; a syntax error
/// is reported at the index of the element it is in.
fn parse_array(text: &str) -> Result<Vec<&RawValue>, PublishError> {
    struct Elements<'c> {
        parsed: &'c Cell<usize>,
    }
    impl<'de> Visitor<'de> for Elements<'_> {
        type Value = Vec<&'de RawValue>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON array")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut items = Vec::new();
            while let Some(item) = seq.next_element::<&'de RawValue>()? {
                items.push(item);
                self.parsed.set(items.len());
            }
            Ok(items)
        }
    }
    let parsed = Cell::new(0);
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let items = deserializer
        .deserialize_seq(Elements { parsed: &parsed })
        .and_then(|items| deserializer.end().map(|()| items))
        .map_err(|e| PublishError::at(parsed.get(), format!("invalid JSON: {e}")))?;
    Ok(items)
}

/// True for a `Content-Type` whose media type is `application/x-ndjson`
/// (compared without case, parameters after `;` ignored).
pub fn is_ndjson(content_type: &[u8]) -> bool {
    let media = content_type
        .split(|&b| b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    media.eq_ignore_ascii_case(b"application/x-ndjson")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_array_and_ndjson() {
        let one = br#"{"org_id":"o","type":"issue","data":{"id":"i"}}"#;
        assert_eq!(parse_body(one, false).unwrap().len(), 1);
        let many = br#"[{"org_id":"o","type":"issue","data":{}},{"org_id":"o","type":"event","data":{"source_id":"s"}}]"#;
        let parsed = parse_body(many, false).unwrap();
        assert_eq!(parsed[1].route_id.as_deref(), Some("s"));
        let nd = b"{\"org_id\":\"o\",\"type\":\"issue\",\"data\":{}}\n\n{\"org_id\":\"o\",\"type\":\"sync\",\"collection_id\":\"c\",\"data\":{}}\n";
        assert_eq!(parse_body(nd, true).unwrap().len(), 2);
    }

    #[test]
    fn first_bad_message_is_reported_with_its_index() {
        let body = br#"[{"org_id":"o","type":"issue","data":{}},{"org_id":"o","type":"event","data":{"source_id":5}}]"#;
        let err = parse_body(body, false).unwrap_err();
        assert_eq!(err.index, 1);
        assert!(err.reason.contains("source_id"));
        for (body, needle) in [
            (&br#"{"type":"issue","data":{}}"#[..], "org_id"),
            (br#"{"org_id":"o!","type":"issue","data":{}}"#, "org_id"),
            (br#"{"org_id":"o","type":"nope","data":{}}"#, "type"),
            (br#"{"org_id":"o","type":"issue","data":[1]}"#, "object"),
            (
                br#"{"org_id":"o","type":"sync","data":{}}"#,
                "collection_id",
            ),
            (
                br#"{"org_id":"o","type":"delivery","data":{}}"#,
                "destination_id",
            ),
            (br#"{"org_id":"o","#, "invalid JSON"),
        ] {
            let err = parse_body(body, false).unwrap_err();
            assert!(
                err.reason.contains(needle),
                "{} -> {}",
                String::from_utf8_lossy(body),
                err.reason
            );
        }
    }

    #[test]
    fn escaped_strings_are_decoded() {
        let body = br#"{"org_id":"org\u005fa","type":"ev\u0065nt","data":{"source_id":"s"}}"#;
        let parsed = parse_body(body, false).unwrap();
        assert_eq!(parsed[0].org_id, "org_a");
        assert_eq!(parsed[0].kind, MessageKind::Event);
        let sync = br#"{"org_id":"o","type":"sync","collection_id":"col\u005f1","data":{}}"#;
        assert_eq!(
            parse_body(sync, false).unwrap()[0].route_id.as_deref(),
            Some("col_1")
        );
    }

    #[test]
    fn a_syntax_error_in_an_array_is_reported_at_its_element() {
        let body = br#"[{"org_id":"o","type":"issue","data":{}},{"org_id":"o","type":"issue","data":{}},{"org_id":"o","type":"issue","data":{]"#;
        let err = parse_body(body, false).unwrap_err();
        assert_eq!(err.index, 2, "{}", err.reason);
        assert!(err.reason.contains("invalid JSON"));
        let trailing = br#"[{"org_id":"o","type":"issue","data":{}}] x"#;
        assert!(parse_body(trailing, false).is_err());
    }

    #[test]
    fn ndjson_media_type_is_matched_without_case_or_parameters() {
        assert!(is_ndjson(b"application/x-ndjson"));
        assert!(is_ndjson(b"Application/X-NDJSON; charset=utf-8"));
        assert!(!is_ndjson(b"application/x-ndjsonx"));
        assert!(!is_ndjson(b"application/json"));
    }

    #[test]
    fn data_is_kept_verbatim() {
        let body = br#"{"org_id":"o","type":"issue","data":{"big":123456789012345678901234567890,"d":0.10000000000000000000001}}"#;
        let parsed = parse_body(body, false).unwrap();
        assert_eq!(
            &*parsed[0].data,
            r#"{"big":123456789012345678901234567890,"d":0.10000000000000000000001}"#
        );
    }
}
