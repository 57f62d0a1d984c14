//! permessage-deflate (RFC 7692) without a context per connection: the
//! negotiation of the upgrade (pure, allocation-free), the shard's one
//! compressor (each message compressed once, as a complete raw-deflate
//! stream, and shared by every subscriber that negotiated the extension)
//! and the shard's one inflater (reset per message, its output bounded by
//! the client message limit).
//!
//! The server always answers `server_no_context_takeover;
//! client_no_context_takeover` (RFC 7692 §7.1.1 lets it require both): no
//! message depends on an earlier one in either direction, so neither side
//! of a connection keeps a window between messages.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::ws;

/// The extension's registered name.
pub const EXTENSION_NAME: &str = "permessage-deflate";

/// Largest LZ77 window (2^15 bytes), the default of both directions.
pub const WINDOW_BITS_MAX: u8 = 15;

/// Smallest window a peer may ask for (RFC 7692 §7.1.2.1).
pub const WINDOW_BITS_MIN: u8 = 8;

/// The tail a sync flush ends with, removed from every compressed message
/// and put back by the receiver (RFC 7692 §7.2.1, §7.2.2).
pub const SYNC_FLUSH_TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// What the server agreed to, from the first acceptable offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreement {
    /// The `server_max_window_bits` the client offered: the largest window
    /// the server's compressed messages may use. `None` when not offered
    /// (then 15, and the answer does not name it).
    pub server_max_window_bits: Option<u8>,
}

impl Agreement {
    /// The window the server may compress with, in bits.
    pub fn server_window_bits(self) -> u8 {
        self.server_max_window_bits.unwrap_or(WINDOW_BITS_MAX)
    }

    /// The `Sec-WebSocket-Extensions` header line (with its CRLF) of the
    /// 101 answer, written into `out`; returns its length.
    ///
    /// Panics when `out` is shorter than [`RESPONSE_LINE_LEN_MAX`].
    pub fn write_response_line(self, out: &mut [u8]) -> usize {
        assert!(out.len() >= RESPONSE_LINE_LEN_MAX);
        let mut written = 0;
        let mut put = |part: &[u8]| {
            out[written..written + part.len()].copy_from_slice(part);
            written += part.len();
        };
        put(RESPONSE_LINE_START);
        if let Some(bits) = self.server_max_window_bits {
            put(b"; server_max_window_bits=");
            if bits >= 10 {
                put(&[b'1', b'0' + bits - 10]);
            } else {
                put(&[b'0' + bits]);
            }
        }
        put(b"\r\n");
        written
    }
}

const RESPONSE_LINE_START: &[u8] = b"Sec-WebSocket-Extensions: permessage-deflate; \
server_no_context_takeover; client_no_context_takeover";

/// Longest line [`Agreement::write_response_line`] writes.
pub const RESPONSE_LINE_LEN_MAX: usize =
    RESPONSE_LINE_START.len() + "; server_max_window_bits=15\r\n".len();

/// The first acceptable permessage-deflate offer among the values of every
/// `Sec-WebSocket-Extensions` header of the request (in order; each value
/// is a comma-separated list of offers), or `None`: then the connection is
/// plain, as if nothing had been offered. Never an error: an offer the
/// server cannot accept is declined (RFC 7692 §5), and so is every offer of
/// a value that is not valid syntax. Allocates nothing.
///
/// An offer is accepted when each of its parameters is known, appears at
/// most once and has a valid value (RFC 7692 §7): `server_no_context_takeover`
/// and `client_no_context_takeover` without a value, `server_max_window_bits`
/// with a value 8–15, `client_max_window_bits` without a value or with 8–15
/// (a token or a quoted string, RFC 7692 §7.1.2). The server inflates with a
/// 32 KiB window, which reads any window a client uses, so it never limits
/// the client's window and does not answer `client_max_window_bits`.
pub fn negotiate<'b>(values: impl IntoIterator<Item = &'b [u8]>) -> Option<Agreement> {
    for value in values {
        let mut rest = value;
        while !rest.is_empty() {
            let Some((offer, after)) = split_outside_quotes(rest, b',') else {
                // An unterminated quoted string: nothing more of this value
                // can be read reliably.
                break;
            };
            rest = after;
            if let Some(agreement) = accept_offer(offer) {
                return Some(agreement);
            }
        }
    }
    None
}

/// The offer's agreement when it is permessage-deflate with acceptable
/// parameters.
fn accept_offer(offer: &[u8]) -> Option<Agreement> {
    let (name, mut params) = split_outside_quotes(offer, b';')?;
    if !name
        .trim_ascii()
        .eq_ignore_ascii_case(EXTENSION_NAME.as_bytes())
    {
        return None;
    }
    let mut server_no_context_takeover = false;
    let mut client_no_context_takeover = false;
    let mut server_max_window_bits: Option<u8> = None;
    let mut client_max_window_bits_seen = false;
    while !params.is_empty() {
        let (param, after) = split_outside_quotes(params, b';')?;
        params = after;
        let (name, value) = match param.iter().position(|&b| b == b'=') {
            Some(at) => (param[..at].trim_ascii(), Some(param[at + 1..].trim_ascii())),
            None => (param.trim_ascii(), None),
        };
        if !is_token(name) {
            return None;
        }
        match name {
            b"server_no_context_takeover" if value.is_none() && !server_no_context_takeover => {
                server_no_context_takeover = true;
            }
            b"client_no_context_takeover" if value.is_none() && !client_no_context_takeover => {
                client_no_context_takeover = true;
            }
            b"server_max_window_bits" if server_max_window_bits.is_none() => {
                server_max_window_bits = Some(window_bits(value?)?);
            }
            b"client_max_window_bits" if !client_max_window_bits_seen => {
                client_max_window_bits_seen = true;
                if let Some(value) = value {
                    window_bits(value)?;
                }
            }
            // Unknown, repeated, or with a value where none belongs.
            _ => return None,
        }
    }
    Some(Agreement {
        server_max_window_bits,
    })
}

/// The window bits a parameter value names: `8`–`15` without leading
/// zeros (RFC 7692 §7.1.2.1's ABNF), as a token or inside a quoted string.
fn window_bits(value: &[u8]) -> Option<u8> {
    let digits = match value {
        [b'"', inner @ .., b'"'] => {
            // A quoted string's content after unescaping must conform; two
            // digits at most, each possibly escaped.
            let mut unescaped = [0u8; 2];
            let mut len = 0;
            let mut escaped = false;
            for &b in inner {
                if b == b'\\' && !escaped {
                    escaped = true;
                    continue;
                }
                escaped = false;
                if len == unescaped.len() {
                    return None;
                }
                unescaped[len] = b;
                len += 1;
            }
            if escaped {
                return None;
            }
            return window_bits_digits(&unescaped[..len]);
        }
        _ => value,
    };
    window_bits_digits(digits)
}

fn window_bits_digits(digits: &[u8]) -> Option<u8> {
    match digits {
        [d @ b'8'..=b'9'] => Some(d - b'0'),
        [b'1', d @ b'0'..=b'5'] => Some(10 + d - b'0'),
        _ => None,
    }
}

/// True for a non-empty RFC 9110 token.
fn is_token(bytes: &[u8]) -> bool {
    !bytes.is_empty()
        && bytes
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Splits `bytes` at the first `separator` outside a quoted string:
/// (before, after). Without one, all of `bytes` and an empty rest. `None`
/// when a quoted string is not terminated.
fn split_outside_quotes(bytes: &[u8], separator: u8) -> Option<(&[u8], &[u8])> {
    let mut quoted = false;
    let mut escaped = false;
    for (at, &b) in bytes.iter().enumerate() {
        if quoted {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                quoted = false;
            }
        } else if b == b'"' {
            quoted = true;
        } else if b == separator {
            return Some((&bytes[..at], &bytes[at + 1..]));
        }
    }
    if quoted {
        return None;
    }
    Some((bytes, &[]))
}

/// Deflate level of the shared compressor. Every compressed frame is paid
/// once per message, not per delivery, so a middle level costs little;
/// docs/benchmarks.md compares levels on the sample objects.
pub const COMPRESSION_LEVEL: u32 = 6;

/// Output capacity the compressor keeps between messages.
pub const DEFLATE_BUFFER_KEEP_BYTES: usize = 256 * 1024;

/// The shard's one compressor: each message becomes a complete raw-deflate
/// stream of its own (no context kept between messages).
pub struct Deflater {
    /// zlib's compressor, reset before every message.
    compress: Compress,
    /// Compressed bytes of the message being compressed; its capacity is
    /// kept for the next one.
    scratch: Vec<u8>,
}

impl std::fmt::Debug for Deflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deflater").finish_non_exhaustive()
    }
}

impl Default for Deflater {
    fn default() -> Self {
        Deflater::new()
    }
}

impl Deflater {
    /// A compressor with a 32 KiB window at [`COMPRESSION_LEVEL`].
    pub fn new() -> Deflater {
        Deflater {
            compress: Compress::new_with_window_bits(
                Compression::new(COMPRESSION_LEVEL),
                false,
                WINDOW_BITS_MAX,
            ),
            scratch: Vec::new(),
        }
    }

    /// Compresses `payload` as one message (RFC 7692 §7.2.1: deflate, sync
    /// flush, the `00 00 ff ff` tail removed) and returns the compressed
    /// bytes, or `None` when they are not smaller than `payload`.
    pub fn compress(&mut self, payload: &[u8]) -> Option<&[u8]> {
        self.compress.reset();
        if self.scratch.capacity() > DEFLATE_BUFFER_KEEP_BYTES {
            // One large message (a publish body may be 16 MiB) does not
            // keep its buffer for every small one after it.
            self.scratch = Vec::new();
        }
        self.scratch.clear();
        // Deflate never grows data by more than a few bytes per 16 KiB
        // stored block; the sync flush adds at most a few more. Reserve
        // enough that one call finishes.
        let bound = payload.len() + payload.len() / 1000 + 64;
        self.scratch.reserve(bound);
        let mut input = payload;
        loop {
            let before_in = self.compress.total_in();
            let status = self
                .compress
                .compress_vec(input, &mut self.scratch, FlushCompress::Sync)
                .ok()?;
            let consumed = (self.compress.total_in() - before_in) as usize;
            input = &input[consumed..];
            // Done when all input is taken and the flush's output fit.
            if input.is_empty() && self.scratch.len() < self.scratch.capacity() {
                break;
            }
            if status == Status::BufError && consumed == 0 {
                self.scratch.reserve(self.scratch.capacity().max(64));
            } else {
                self.scratch.reserve(64);
            }
        }
        if self.scratch.ends_with(&SYNC_FLUSH_TAIL) {
            self.scratch
                .truncate(self.scratch.len() - SYNC_FLUSH_TAIL.len());
        }
        (self.scratch.len() < payload.len()).then_some(&self.scratch[..])
    }

    /// The compressed twin of a complete, unmasked, final server text
    /// frame: the same message with RSV1 set and its payload compressed,
    /// or `None` when compression does not make the frame smaller.
    pub fn compress_frame(&mut self, frame: &[u8]) -> Option<Vec<u8>> {
        let (header, header_len) = ws::FrameHeader::parse(frame).ok()??;
        assert!(header.fin && header.rsv == 0 && header.mask.is_none());
        assert_eq!(header.opcode, ws::Opcode::Text);
        let payload = &frame[header_len..];
        assert_eq!(payload.len() as u64, header.payload_len);
        let compressed = self.compress(payload)?;
        let mut head = [0u8; 14];
        let head_len = ws::encode_header(
            &mut head,
            true,
            ws::Opcode::Text,
            compressed.len() as u64,
            None,
        );
        head[0] |= RSV1;
        if head_len + compressed.len() >= frame.len() {
            return None;
        }
        let mut out = Vec::with_capacity(head_len + compressed.len());
        out.extend_from_slice(&head[..head_len]);
        out.extend_from_slice(compressed);
        Some(out)
    }
}

/// RSV1 in a frame's first byte: "this message is compressed" under
/// permessage-deflate (RFC 7692 §6).
pub const RSV1: u8 = 0x40;

/// Why a compressed client message could not be inflated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InflateError {
    /// It inflates to more than the message limit (1009).
    #[error("inflated message over the size limit")]
    TooBig,
    /// It is not a valid deflate stream (1007).
    #[error("invalid compressed data")]
    Invalid,
}

/// The shard's one inflater for compressed client messages: reset per
/// message (the client agreed to `client_no_context_takeover`), its output
/// never larger than the message limit.
pub struct Inflater {
    /// zlib's decompressor with a 32 KiB window (reads any smaller one).
    decompress: Decompress,
    /// The inflated message; grows up to the limit, then is shrunk back to
    /// [`INFLATE_BUFFER_KEEP_BYTES`] after a large message.
    out: Vec<u8>,
}

impl std::fmt::Debug for Inflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inflater").finish_non_exhaustive()
    }
}

/// Output capacity the inflater keeps between messages.
pub const INFLATE_BUFFER_KEEP_BYTES: usize = 16 * 1024;

impl Default for Inflater {
    fn default() -> Self {
        Inflater::new()
    }
}

impl Inflater {
    /// An inflater with nothing buffered.
    pub fn new() -> Inflater {
        Inflater {
            decompress: Decompress::new_with_window_bits(false, WINDOW_BITS_MAX),
            out: Vec::new(),
        }
    }

    /// Inflates one compressed message (`payload` as received, without the
    /// tail, which is put back here) into at most `limit_bytes` bytes. More
    /// output than that fails with [`InflateError::TooBig`] as soon as it is
    /// produced: at most `limit_bytes + 1` bytes are ever inflated.
    pub fn inflate(&mut self, payload: &[u8], limit_bytes: usize) -> Result<&[u8], InflateError> {
        if self.out.capacity() > INFLATE_BUFFER_KEEP_BYTES.max(limit_bytes + 1) {
            self.out = Vec::new();
        }
        self.decompress.reset(false);
        self.out.clear();
        for input in [payload, &SYNC_FLUSH_TAIL[..]] {
            let mut input = input;
            loop {
                if self.out.len() == self.out.capacity() {
                    // Grow by doubling, but never past limit + 1: one byte
                    // over the limit is enough to know it is too big.
                    let target = (self.out.capacity() * 2).max(4096).min(limit_bytes + 1);
                    if target <= self.out.len() {
                        return Err(InflateError::TooBig);
                    }
                    self.out.reserve_exact(target - self.out.len());
                }
                let before_in = self.decompress.total_in();
                let before_out = self.out.len();
                let status = self
                    .decompress
                    .decompress_vec(input, &mut self.out, FlushDecompress::Sync)
                    .map_err(|_| InflateError::Invalid)?;
                if self.out.len() > limit_bytes {
                    return Err(InflateError::TooBig);
                }
                let consumed = (self.decompress.total_in() - before_in) as usize;
                input = &input[consumed..];
                if status == Status::StreamEnd {
                    // A final block ended the stream (RFC 7692 §7.2.3.3):
                    // whatever follows, the tail included, is not data.
                    return Ok(&self.out);
                }
                let progressed = consumed > 0 || self.out.len() > before_out;
                if input.is_empty() && self.out.len() < self.out.capacity() {
                    break;
                }
                if !progressed && self.out.len() < self.out.capacity() {
                    return Err(InflateError::Invalid);
                }
            }
        }
        Ok(&self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn offer(value: &str) -> Option<Agreement> {
        negotiate([value.as_bytes()])
    }

    #[test]
    fn negotiation_table() {
        let plain = Some(Agreement {
            server_max_window_bits: None,
        });
        let bits = |n| {
            Some(Agreement {
                server_max_window_bits: Some(n),
            })
        };
        let table: &[(&str, Option<Agreement>)] = &[
            ("permessage-deflate", plain),
            ("Permessage-Deflate", plain),
            ("permessage-deflate; client_max_window_bits", plain),
            ("permessage-deflate; client_max_window_bits=10", plain),
            ("permessage-deflate; client_max_window_bits=\"12\"", plain),
            ("permessage-deflate; server_no_context_takeover", plain),
            ("permessage-deflate; client_no_context_takeover", plain),
            (
                "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
                plain,
            ),
            ("permessage-deflate; server_max_window_bits=8", bits(8)),
            ("permessage-deflate; server_max_window_bits=15", bits(15)),
            ("permessage-deflate;server_max_window_bits = \"1\\0\"", bits(10)),
            ("permessage-deflate; server_max_window_bits", None),
            ("permessage-deflate; server_max_window_bits=7", None),
            ("permessage-deflate; server_max_window_bits=16", None),
            ("permessage-deflate; server_max_window_bits=08", None),
            ("permessage-deflate; client_max_window_bits=0", None),
            ("permessage-deflate; client_max_window_bits=abc", None),
            ("permessage-deflate; server_no_context_takeover=1", None),
            ("permessage-deflate; client_no_context_takeover=\"\"", None),
            (
                "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
                None,
            ),
            (
                "permessage-deflate; client_max_window_bits; client_max_window_bits=9",
                None,
            ),
            ("permessage-deflate; unknown_param", None),
            ("permessage-deflate; ", None),
            ("permessage-deflate; x=\"unterminated", None),
            ("x-webkit-deflate-frame", None),
            ("", None),
            // Several offers: the first acceptable one wins.
            (
                "permessage-deflate; server_max_window_bits=20, permessage-deflate; server_max_window_bits=9",
                bits(9),
            ),
            (
                "foo; a=\"x,y\", permessage-deflate; client_max_window_bits",
                plain,
            ),
            (
                "permessage-deflate; client_max_window_bits=15, permessage-deflate",
                plain,
            ),
        ];
        for (value, expected) in table {
            assert_eq!(offer(value), *expected, "offer {value:?}");
        }
    }

    #[test]
    fn offers_in_several_header_lines_are_read_in_order() {
        let lines: [&[u8]; 2] = [
            b"permessage-deflate; bogus",
            b"permessage-deflate; server_max_window_bits=12",
        ];
        assert_eq!(
            negotiate(lines),
            Some(Agreement {
                server_max_window_bits: Some(12)
            })
        );
    }

    #[test]
    fn response_lines() {
        let mut out = [0u8; RESPONSE_LINE_LEN_MAX];
        let len = Agreement {
            server_max_window_bits: None,
        }
        .write_response_line(&mut out);
        assert_eq!(
            &out[..len],
            b"Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover\r\n"
        );
        for bits in WINDOW_BITS_MIN..=WINDOW_BITS_MAX {
            let len = Agreement {
                server_max_window_bits: Some(bits),
            }
            .write_response_line(&mut out);
            let line = std::str::from_utf8(&out[..len]).unwrap();
            assert!(line.ends_with(&format!("; server_max_window_bits={bits}\r\n")));
            // What the server answers, a client's parser reads back.
            let value = line.trim_end().split_once(": ").unwrap().1;
            assert_eq!(
                offer(value),
                Some(Agreement {
                    server_max_window_bits: Some(bits)
                })
            );
        }
    }

    #[test]
    fn compressed_messages_inflate_to_the_original_and_drop_the_tail() {
        let mut deflater = Deflater::new();
        let mut inflater = Inflater::new();
        let text = br#"{"type":"event","data":{"headers":{"a":"b","a":"b","a":"b"}}}"#.repeat(20);
        let compressed = deflater.compress(&text).unwrap().to_vec();
        assert!(!compressed.ends_with(&SYNC_FLUSH_TAIL));
        assert!(compressed.len() < text.len() / 4);
        assert_eq!(
            inflater.inflate(&compressed, text.len()).unwrap(),
            &text[..]
        );
        // One byte less room than the message needs is too big.
        assert_eq!(
            inflater.inflate(&compressed, text.len() - 1),
            Err(InflateError::TooBig)
        );
        // Reset per message: the same inflater reads the next one alone.
        assert_eq!(
            inflater.inflate(&compressed, text.len()).unwrap(),
            &text[..]
        );
    }

    #[test]
    fn incompressible_payloads_are_not_compressed() {
        let mut deflater = Deflater::new();
        let noise: Vec<u8> = (0u32..200)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        assert_eq!(deflater.compress(&noise), None);
        assert_eq!(deflater.compress(b"ab"), None);
    }

    #[test]
    fn a_frame_compressed_is_the_same_text_with_rsv1() {
        let mut deflater = Deflater::new();
        let json = br#"{"type":"issue","channel":"issues","seq":7,"data":{"title":"disk full","body":"disk full disk full disk full"}}"#;
        let frame = crate::message::text_frame(json);
        let compressed = deflater.compress_frame(&frame).unwrap();
        let (header, header_len) = ws::FrameHeader::parse(&compressed).unwrap().unwrap();
        assert!(header.fin);
        assert_eq!(header.rsv, 0b100);
        assert_eq!(header.opcode, ws::Opcode::Text);
        let mut inflater = Inflater::new();
        assert_eq!(
            inflater
                .inflate(&compressed[header_len..], 1 << 16)
                .unwrap(),
            &json[..]
        );
    }

    #[test]
    fn a_final_block_ends_the_message() {
        // A client may end a message with BFINAL set (RFC 7692 §7.2.3.3):
        // the tail the receiver appends is then not data.
        let text = b"hello hello hello hello";
        let mut compress = Compress::new(Compression::default(), false);
        let mut out = Vec::with_capacity(128);
        compress
            .compress_vec(text, &mut out, FlushCompress::Finish)
            .unwrap();
        let mut inflater = Inflater::new();
        assert_eq!(inflater.inflate(&out, 100).unwrap(), &text[..]);
    }

    #[test]
    fn garbage_is_invalid_and_a_bomb_stops_at_the_limit() {
        let mut inflater = Inflater::new();
        assert_eq!(
            inflater.inflate(&[0xff, 0xff, 0xff, 0xff], 1000),
            Err(InflateError::Invalid)
        );
        let zeros = vec![0u8; 10 << 20];
        let mut deflater = Deflater::new();
        let bomb = deflater.compress(&zeros).unwrap().to_vec();
        assert!(bomb.len() < 20_000);
        assert_eq!(inflater.inflate(&bomb, 65536), Err(InflateError::TooBig));
        assert!(inflater.out.capacity() <= 65537);
    }

    proptest! {
        #[test]
        fn any_payload_round_trips(payload in proptest::collection::vec(any::<u8>(), 0..3000), repeat in 1usize..4) {
            let payload = payload.repeat(repeat);
            let mut deflater = Deflater::new();
            let mut inflater = Inflater::new();
            if let Some(compressed) = deflater.compress(&payload) {
                let compressed = compressed.to_vec();
                prop_assert!(compressed.len() < payload.len());
                prop_assert_eq!(inflater.inflate(&compressed, payload.len()).unwrap(), &payload[..]);
            }
        }

        #[test]
        fn negotiation_never_panics(value in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = negotiate([&value[..]]);
        }

        #[test]
        fn accepted_offers_survive_any_whitespace_and_case(
            spaces in proptest::collection::vec(0usize..3, 6),
            bits in WINDOW_BITS_MIN..=WINDOW_BITS_MAX,
            upper in any::<bool>(),
        ) {
            let pad = |n: usize| " ".repeat(n);
            let name = if upper { "PERMESSAGE-DEFLATE" } else { "permessage-deflate" };
            let value = format!(
                "{}{name}{};{}server_max_window_bits{}={}{bits};client_max_window_bits",
                pad(spaces[0]), pad(spaces[1]), pad(spaces[2]), pad(spaces[3]), pad(spaces[4]),
            );
            prop_assert_eq!(offer(&value), Some(Agreement { server_max_window_bits: Some(bits) }));
        }
    }
}
