//! The `chunked` transfer coding of request bodies (RFC 9112 §7.1), for
//! `POST /v1/publish` bodies of unknown length (curl `-T -`, Node `fetch`
//! with a stream body).
//!
//! Pure and incremental: [`ChunkedDecoder::feed`] takes whatever bytes
//! arrived, appends the chunk data to the caller's body and says how many
//! input bytes it used, so a 16 MiB body is scanned once, not once per read.
//! Every line it must hold before deciding (a chunk-size line, a trailer
//! line) is bounded, and so is the decoded body: past `body_bytes_max` it
//! answers [`ChunkedError::TooLarge`] (413) at once, before the rest of the
//! body is read.

use crate::limits::HEAD_BYTES_MAX;

/// Longest chunk-size line (size, extensions, CRLF) accepted; a client has
/// no reason to send more than a few bytes of it.
pub const CHUNK_LINE_BYTES_MAX: usize = 1024;

/// Why a chunked body was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChunkedError {
    /// A chunk-size line, the CRLF after chunk data, or a trailer line is
    /// not what RFC 9112 §7.1 allows (400).
    #[error("malformed chunked body")]
    Malformed,
    /// The decoded body passed the limit (413).
    #[error("request body too large")]
    TooLarge,
}

impl ChunkedError {
    /// The HTTP status answered for this problem.
    pub fn status(self) -> u16 {
        match self {
            ChunkedError::Malformed => 400,
            ChunkedError::TooLarge => 413,
        }
    }
}

/// Where the decoder is in the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a chunk-size line.
    Size,
    /// Inside chunk data, with this many bytes of it to come.
    Data(u64),
    /// After chunk data: its CRLF must follow.
    DataEnd,
    /// After the last (zero-size) chunk: trailer lines until an empty one.
    Trailers,
    /// The body is complete.
    Done,
}

/// Decodes one chunked body, fed in pieces.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    /// Where in the body the next input byte is.
    state: State,
    /// Largest decoded body accepted.
    body_bytes_max: usize,
    /// Trailer bytes seen so far, bounded like a request head.
    trailer_bytes: usize,
}

impl ChunkedDecoder {
    /// A decoder for a body of at most `body_bytes_max` decoded bytes.
    pub fn new(body_bytes_max: usize) -> ChunkedDecoder {
        ChunkedDecoder {
            state: State::Size,
            body_bytes_max,
            trailer_bytes: 0,
        }
    }

    /// True once the last chunk and the trailer section were read.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Decodes from `input`, appending chunk data to `body`. Returns how
    /// many bytes of `input` were used: all of them unless the body ended
    /// inside it (the rest is the next request) or a line is incomplete at
    /// its end (call again with those bytes and more). Trailer fields are
    /// read and dropped.
    pub fn feed(&mut self, input: &[u8], body: &mut Vec<u8>) -> Result<usize, ChunkedError> {
        let mut used = 0;
        loop {
            let rest = &input[used..];
            match self.state {
                State::Done => return Ok(used),
                State::Size => {
                    let Some(line_len) = line_length(rest, CHUNK_LINE_BYTES_MAX)? else {
                        return Ok(used);
                    };
                    // httparse reads the size and skips extensions; it
                    // takes an empty size for 0, so a digit must come first.
                    if !rest[0].is_ascii_hexdigit() {
                        return Err(ChunkedError::Malformed);
                    }
                    let size = match httparse::parse_chunk_size(&rest[..line_len]) {
                        Ok(httparse::Status::Complete((parsed, size))) if parsed == line_len => {
                            size
                        }
                        _ => return Err(ChunkedError::Malformed),
                    };
                    used += line_len;
                    if size == 0 {
                        self.state = State::Trailers;
                    } else {
                        let room = self.body_bytes_max.saturating_sub(body.len());
                        if size > room as u64 {
                            return Err(ChunkedError::TooLarge);
                        }
                        self.state = State::Data(size);
                    }
                }
                State::Data(left) => {
                    if rest.is_empty() {
                        return Ok(used);
                    }
                    let take = rest.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    body.extend_from_slice(&rest[..take]);
                    used += take;
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        State::DataEnd
                    } else {
                        State::Data(left)
                    };
                }
                State::DataEnd => match rest {
                    [] | [b'\r'] => return Ok(used),
                    [b'\r', b'\n', ..] => {
                        used += 2;
                        self.state = State::Size;
                    }
                    _ => return Err(ChunkedError::Malformed),
                },
                State::Trailers => {
                    let room = HEAD_BYTES_MAX.saturating_sub(self.trailer_bytes);
                    let Some(line_len) = line_length(rest, room)? else {
                        return Ok(used);
                    };
                    used += line_len;
                    self.trailer_bytes += line_len;
                    if line_len == 2 {
                        self.state = State::Done;
                    }
                }
            }
        }
    }
}

/// The length of the CRLF-terminated line at the start of `input`, CRLF
/// included; `None` when it has not ended yet and is still under
/// `line_bytes_max`. A bare CR or LF is malformed (RFC 9112 §7.1 lines end
/// in CRLF; a lenient reading here is how request smuggling starts).
fn line_length(input: &[u8], line_bytes_max: usize) -> Result<Option<usize>, ChunkedError> {
    let window = &input[..input.len().min(line_bytes_max)];
    match window.iter().position(|&b| b == b'\r' || b == b'\n') {
        Some(at) if window[at] == b'\n' => Err(ChunkedError::Malformed),
        Some(at) => match input.get(at + 1) {
            Some(b'\n') if at + 2 <= line_bytes_max => Ok(Some(at + 2)),
            Some(b'\n') | None if at + 2 > line_bytes_max => Err(ChunkedError::Malformed),
            None => Ok(None),
            Some(_) => Err(ChunkedError::Malformed),
        },
        None if window.len() >= line_bytes_max => Err(ChunkedError::Malformed),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `input` fed in pieces of `piece` bytes (re-feeding what a
    /// call left unused, as a server does with its read buffer).
    fn decode_in_pieces(
        input: &[u8],
        piece: usize,
        max: usize,
    ) -> Result<(Vec<u8>, usize), ChunkedError> {
        let mut decoder = ChunkedDecoder::new(max);
        let mut body = Vec::new();
        let mut pending: Vec<u8> = Vec::new();
        let mut consumed = 0;
        for part in input.chunks(piece.max(1)) {
            pending.extend_from_slice(part);
            let used = decoder.feed(&pending, &mut body)?;
            consumed += used;
            pending.drain(..used);
            if decoder.is_done() {
                return Ok((body, consumed));
            }
        }
        assert!(!decoder.is_done());
        Err(ChunkedError::Malformed)
    }

    #[test]
    fn decodes_whole_and_in_every_piece_size() {
        let input =
            b"5\r\nhello\r\n1;ext=\"x\"\r\n \r\n6\r\nworld!\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT";
        let body_end = input.len() - 4;
        for piece in 1..=input.len() {
            let (body, used) = decode_in_pieces(input, piece, 1024).unwrap();
            assert_eq!(body, b"hello world!", "piece {piece}");
            assert_eq!(used, body_end, "piece {piece}");
        }
    }

    #[test]
    fn upper_case_hex_and_an_empty_body() {
        let (body, _) = decode_in_pieces(b"A\r\n0123456789\r\n0\r\n\r\n", 3, 64).unwrap();
        assert_eq!(body, b"0123456789");
        let (body, used) = decode_in_pieces(b"0\r\n\r\n", 1, 64).unwrap();
        assert!(body.is_empty());
        assert_eq!(used, 5);
    }

    #[test]
    fn the_limit_counts_decoded_bytes_and_is_checked_before_the_data() {
        assert!(decode_in_pieces(b"4\r\nabcd\r\n0\r\n\r\n", 7, 4).is_ok());
        assert_eq!(
            decode_in_pieces(b"4\r\nabcd\r\n1\r\n", 7, 4),
            Err(ChunkedError::TooLarge)
        );
        // Refused on the size line, before any of the data arrived.
        let mut decoder = ChunkedDecoder::new(1024);
        let mut body = Vec::new();
        assert_eq!(
            decoder.feed(b"1000000\r\n", &mut body),
            Err(ChunkedError::TooLarge)
        );
        assert_eq!(
            decoder.feed(b"fffffffffffffff\r\n", &mut body),
            Err(ChunkedError::TooLarge)
        );
    }

    #[test]
    fn malformed_bodies_are_refused() {
        for input in [
            &b"\r\n"[..],
            b"x\r\n",
            b"5\nhello\r\n",
            b"5\r\nhelloXX",
            b"5\r\nhello\n0\r\n\r\n",
            b"ffffffffffffffffff\r\n",
            b"-1\r\n",
            b"0\r\nbad\ntrailer\r\n\r\n",
        ] {
            let mut decoder = ChunkedDecoder::new(1 << 20);
            let mut body = Vec::new();
            assert_eq!(
                decoder.feed(input, &mut body),
                Err(ChunkedError::Malformed),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn lines_are_bounded() {
        let mut long = b"1;".to_vec();
        long.resize(CHUNK_LINE_BYTES_MAX + 10, b'a');
        let mut decoder = ChunkedDecoder::new(1 << 20);
        assert_eq!(
            decoder.feed(&long, &mut Vec::new()),
            Err(ChunkedError::Malformed)
        );
        // Just under the limit it still waits for more.
        let mut decoder = ChunkedDecoder::new(1 << 20);
        assert_eq!(
            decoder.feed(&long[..CHUNK_LINE_BYTES_MAX - 1], &mut Vec::new()),
            Ok(0)
        );
        let mut trailers = b"0\r\n".to_vec();
        for _ in 0..HEAD_BYTES_MAX / 10 + 1 {
            trailers.extend_from_slice(b"X-T: 123\r\n");
        }
        let mut decoder = ChunkedDecoder::new(1 << 20);
        assert_eq!(
            decoder.feed(&trailers, &mut Vec::new()),
            Err(ChunkedError::Malformed)
        );
    }

    #[test]
    fn incomplete_input_needs_more() {
        let mut decoder = ChunkedDecoder::new(64);
        let mut body = Vec::new();
        assert_eq!(decoder.feed(b"5\r", &mut body), Ok(0));
        assert_eq!(decoder.feed(b"5\r\nhel", &mut body), Ok(6));
        assert_eq!(body, b"hel");
        assert_eq!(decoder.feed(b"lo\r", &mut body), Ok(2));
        assert_eq!(decoder.feed(b"\r\n0\r\n", &mut body), Ok(5));
        assert!(!decoder.is_done());
        assert_eq!(decoder.feed(b"\r\n", &mut body), Ok(2));
        assert!(decoder.is_done());
        assert_eq!(body, b"hello");
    }
}
