//! The on-disk record format of the history log, pure: encoding, decoding
//! and scanning a segment's bytes, and the CRC-32C that guards each record.
//! No I/O here, so corruption handling is testable byte by byte.
//!
//! A record, little-endian:
//!
//! ```text
//! u32 body_len   bytes after this 8-byte prefix
//! u32 crc32c     of the body
//! body:
//!   u64 seq        the org's sequence number
//!   u64 time_ms    publish time, ms since the Unix epoch
//!   u8  kind       0 event, 1 delivery, 2 issue, 3 sync
//!   u8  org_len
//!   u8  route_len  0 when the message has no route id
//!   u8  zero
//!   u32 data_len
//!   org bytes, route bytes, data bytes (the publisher's JSON text)
//! ```
//!
//! A zero-filled or half-written tail fails the length or the CRC check, so
//! a torn write is found the same way as a flipped byte.

use crate::message::MessageKind;

/// Bytes before the body: length and CRC.
pub const PREFIX_BYTES: usize = 8;
/// Fixed part of the body before the variable fields.
pub const BODY_FIXED_BYTES: usize = 24;
/// Largest body a record may claim; anything larger is corruption (a
/// publish body is at most 1 GiB by configuration, a message far less).
pub const BODY_BYTES_MAX: usize = 1 << 30;

/// One record, borrowed from a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<'a> {
    /// The org's sequence number.
    pub seq: u64,
    /// Publish time, ms since the Unix epoch.
    pub time_ms: u64,
    /// Message type.
    pub kind: MessageKind,
    /// The org id.
    pub org: &'a str,
    /// `source_id`, `destination_id` or `collection_id`, by kind.
    pub route: Option<&'a str>,
    /// The publisher's `data` JSON text.
    pub data: &'a str,
}

/// Why a record could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordError {
    /// Fewer bytes than the record claims (a torn tail).
    Truncated,
    /// A length field is impossible.
    BadLength,
    /// The checksum does not match (a flipped byte, or garbage).
    BadChecksum,
    /// The fields are not what a writer produces (bad kind, not UTF-8).
    BadField,
}

impl RecordError {
    /// A short description for the log line.
    pub fn describe(self) -> &'static str {
        match self {
            RecordError::Truncated => "truncated record (torn write)",
            RecordError::BadLength => "impossible record length",
            RecordError::BadChecksum => "checksum mismatch",
            RecordError::BadField => "invalid record field",
        }
    }
}

fn kind_code(kind: MessageKind) -> u8 {
    match kind {
        MessageKind::Event => 0,
        MessageKind::Delivery => 1,
        MessageKind::Issue => 2,
        MessageKind::Sync => 3,
    }
}

fn kind_of(code: u8) -> Option<MessageKind> {
    match code {
        0 => Some(MessageKind::Event),
        1 => Some(MessageKind::Delivery),
        2 => Some(MessageKind::Issue),
        3 => Some(MessageKind::Sync),
        _ => None,
    }
}

/// Encoded size of a record.
pub fn encoded_len(org: &str, route: Option<&str>, data: &str) -> usize {
    PREFIX_BYTES + BODY_FIXED_BYTES + org.len() + route.map_or(0, str::len) + data.len()
}

/// Appends one encoded record to `out`.
pub fn encode(out: &mut Vec<u8>, record: &Record<'_>) {
    assert!(record.org.len() <= u8::MAX as usize);
    let route = record.route.unwrap_or("");
    assert!(route.len() <= u8::MAX as usize);
    let body_len = BODY_FIXED_BYTES + record.org.len() + route.len() + record.data.len();
    assert!(body_len <= BODY_BYTES_MAX);
    let start = out.len();
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    out.extend_from_slice(&record.seq.to_le_bytes());
    out.extend_from_slice(&record.time_ms.to_le_bytes());
    out.push(kind_code(record.kind));
    out.push(record.org.len() as u8);
    out.push(route.len() as u8);
    out.push(0);
    out.extend_from_slice(&(record.data.len() as u32).to_le_bytes());
    out.extend_from_slice(record.org.as_bytes());
    out.extend_from_slice(route.as_bytes());
    out.extend_from_slice(record.data.as_bytes());
    let crc = crc32c(&out[start + PREFIX_BYTES..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    debug_assert_eq!(out.len() - start, PREFIX_BYTES + body_len);
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// Decodes the record at the start of `bytes`: the record and its encoded
/// length. With `verify` false the checksum is not computed (for reads of
/// records already verified when the log was opened).
pub fn decode(bytes: &[u8], verify: bool) -> Result<(Record<'_>, usize), RecordError> {
    if bytes.len() < PREFIX_BYTES {
        return Err(RecordError::Truncated);
    }
    let body_len = u32_at(bytes, 0) as usize;
    if !(BODY_FIXED_BYTES..=BODY_BYTES_MAX).contains(&body_len) {
        return Err(RecordError::BadLength);
    }
    let total = PREFIX_BYTES + body_len;
    if bytes.len() < total {
        return Err(RecordError::Truncated);
    }
    let body = &bytes[PREFIX_BYTES..total];
    if verify && crc32c(body) != u32_at(bytes, 4) {
        return Err(RecordError::BadChecksum);
    }
    let org_len = body[17] as usize;
    let route_len = body[18] as usize;
    let data_len = u32_at(body, 20) as usize;
    if BODY_FIXED_BYTES + org_len + route_len + data_len != body_len {
        return Err(RecordError::BadLength);
    }
    let kind = kind_of(body[16]).ok_or(RecordError::BadField)?;
    let text = |range: std::ops::Range<usize>| {
        std::str::from_utf8(&body[range]).map_err(|_| RecordError::BadField)
    };
    let org_end = BODY_FIXED_BYTES + org_len;
    let route_end = org_end + route_len;
    let record = Record {
        seq: u64_at(body, 0),
        time_ms: u64_at(body, 8),
        kind,
        org: text(BODY_FIXED_BYTES..org_end)?,
        route: if route_len == 0 {
            None
        } else {
            Some(text(org_end..route_end)?)
        },
        data: text(route_end..body_len)?,
    };
    if record.org.is_empty() || record.seq == 0 {
        return Err(RecordError::BadField);
    }
    Ok((record, total))
}

/// Where a scan of a segment stopped early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanStop {
    /// Offset of the first bad record; everything from here is dropped.
    pub offset: usize,
    /// What was wrong with it.
    pub error: RecordError,
}

/// Walks a segment's bytes, calling `each(record, offset, len)` for every
/// valid record in order. A record is valid when it decodes with a good
/// checksum, belongs to `org` and has a seq above the previous one. Returns
/// the first bad record's position, if any: that record and everything
/// after it in the segment are to be dropped.
pub fn scan<'a>(
    bytes: &'a [u8],
    org: &str,
    mut previous_seq: u64,
    mut each: impl FnMut(&Record<'a>, usize, usize),
) -> Option<ScanStop> {
    let mut offset = 0;
    while offset < bytes.len() {
        match decode(&bytes[offset..], true) {
            Ok((record, len)) => {
                if record.org != org || record.seq <= previous_seq {
                    return Some(ScanStop {
                        offset,
                        error: RecordError::BadField,
                    });
                }
                previous_seq = record.seq;
                each(&record, offset, len);
                offset += len;
            }
            Err(error) => return Some(ScanStop { offset, error }),
        }
    }
    None
}

/// CRC-32C (Castagnoli) lookup tables for slicing-by-8, built at compile time.
const CRC_TABLES: [[u32; 256]; 8] = crc_tables();

const fn crc_tables() -> [[u32; 256]; 8] {
    const POLY: u32 = 0x82f6_3b78;
    let mut tables = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ POLY
            } else {
                crc >> 1
            };
            bit += 1;
        }
        tables[0][i] = crc;
        i += 1;
    }
    let mut t = 1;
    while t < 8 {
        let mut i = 0;
        while i < 256 {
            let previous = tables[t - 1][i];
            tables[t][i] = (previous >> 8) ^ tables[0][(previous & 0xff) as usize];
            i += 1;
        }
        t += 1;
    }
    tables
}

/// CRC-32C of `bytes`: the SSE4.2 `crc32` instruction when the CPU has it
/// (replay reads check every record again, so this is on the read path),
/// else slicing-by-8 tables.
pub fn crc32c(bytes: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("sse4.2") {
            // SAFETY: the CPU supports SSE4.2 (checked just above).
            return unsafe { crc32c_sse42(bytes) };
        }
    }
    crc32c_tables(bytes)
}

/// CRC-32C with the SSE4.2 instruction, 8 bytes at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
unsafe fn crc32c_sse42(bytes: &[u8]) -> u32 {
    use std::arch::x86_64::{_mm_crc32_u64, _mm_crc32_u8};
    let mut crc = u64::from(!0u32);
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        crc = _mm_crc32_u64(crc, u64::from_le_bytes(chunk.try_into().expect("8 bytes")));
    }
    let mut crc = crc as u32;
    for &byte in chunks.remainder() {
        crc = _mm_crc32_u8(crc, byte);
    }
    !crc
}

/// CRC-32C with slicing-by-8 tables (any CPU).
pub fn crc32c_tables(bytes: &[u8]) -> u32 {
    let t = &CRC_TABLES;
    let mut crc = !0u32;
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let low = u32::from_le_bytes(chunk[0..4].try_into().expect("4 bytes")) ^ crc;
        let high = u32::from_le_bytes(chunk[4..8].try_into().expect("4 bytes"));
        crc = t[7][(low & 0xff) as usize]
            ^ t[6][((low >> 8) & 0xff) as usize]
            ^ t[5][((low >> 16) & 0xff) as usize]
            ^ t[4][(low >> 24) as usize]
            ^ t[3][(high & 0xff) as usize]
            ^ t[2][((high >> 8) & 0xff) as usize]
            ^ t[1][((high >> 16) & 0xff) as usize]
            ^ t[0][(high >> 24) as usize];
    }
    for &byte in chunks.remainder() {
        crc = (crc >> 8) ^ t[0][((crc ^ byte as u32) & 0xff) as usize];
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crc_bytewise(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &byte in bytes {
            crc = (crc >> 8) ^ CRC_TABLES[0][((crc ^ byte as u32) & 0xff) as usize];
        }
        !crc
    }

    #[test]
    fn crc32c_known_vectors_and_slicing_matches_bytewise() {
        assert_eq!(crc32c(b""), 0);
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        let data: Vec<u8> = (0..300u32).map(|i| (i * 7 + 3) as u8).collect();
        for start in 0..9 {
            for end in start..data.len() {
                let expected = crc_bytewise(&data[start..end]);
                assert_eq!(crc32c(&data[start..end]), expected);
                assert_eq!(crc32c_tables(&data[start..end]), expected);
            }
        }
    }

    fn sample(seq: u64) -> Vec<u8> {
        let mut out = Vec::new();
        encode(
            &mut out,
            &Record {
                seq,
                time_ms: 1_700_000_000_000 + seq,
                kind: MessageKind::Event,
                org: "org_a",
                route: Some("src_1"),
                data: r#"{"id":"evt","n":123456789012345678901234567890}"#,
            },
        );
        out
    }

    #[test]
    fn round_trip() {
        let bytes = sample(7);
        assert_eq!(
            bytes.len(),
            encoded_len(
                "org_a",
                Some("src_1"),
                r#"{"id":"evt","n":123456789012345678901234567890}"#
            )
        );
        let (record, len) = decode(&bytes, true).unwrap();
        assert_eq!(len, bytes.len());
        assert_eq!(record.seq, 7);
        assert_eq!(record.kind, MessageKind::Event);
        assert_eq!(record.org, "org_a");
        assert_eq!(record.route, Some("src_1"));
        assert!(record.data.contains("123456789012345678901234567890"));
    }

    #[test]
    fn every_flipped_byte_and_every_truncation_is_detected() {
        let one = sample(1);
        for at in 0..one.len() {
            for bit in 0..8 {
                let mut bad = one.clone();
                bad[at] ^= 1 << bit;
                assert!(decode(&bad, true).is_err(), "flip at {at} bit {bit}");
            }
        }
        for len in 0..one.len() {
            assert!(decode(&one[..len], true).is_err(), "truncated to {len}");
        }
    }

    #[test]
    fn scan_stops_at_the_first_bad_record() {
        let mut bytes = Vec::new();
        for seq in 1..=5 {
            bytes.extend_from_slice(&sample(seq));
        }
        let len = sample(1).len();
        let mut seen = Vec::new();
        assert_eq!(scan(&bytes, "org_a", 0, |r, _, _| seen.push(r.seq)), None);
        assert_eq!(seen, vec![1, 2, 3, 4, 5]);

        let mut flipped = bytes.clone();
        flipped[2 * len + 40] ^= 0x10;
        let mut seen = Vec::new();
        let stop = scan(&flipped, "org_a", 0, |r, _, _| seen.push(r.seq)).unwrap();
        assert_eq!(seen, vec![1, 2]);
        assert_eq!(stop.offset, 2 * len);
        assert_eq!(stop.error, RecordError::BadChecksum);

        let torn = &bytes[..4 * len + 10];
        let mut seen = Vec::new();
        let stop = scan(torn, "org_a", 0, |r, _, _| seen.push(r.seq)).unwrap();
        assert_eq!(seen, vec![1, 2, 3, 4]);
        assert_eq!(stop.error, RecordError::Truncated);

        let mut zeros = bytes[..len].to_vec();
        zeros.extend_from_slice(&[0u8; 4096]);
        let stop = scan(&zeros, "org_a", 0, |_, _, _| {}).unwrap();
        assert_eq!(stop.offset, len);

        // Another org's record, or a seq going backwards, is not accepted.
        assert!(scan(&bytes, "org_b", 0, |_, _, _| {}).is_some());
        assert!(scan(&bytes, "org_a", 3, |_, _, _| {}).is_some());
    }
}
