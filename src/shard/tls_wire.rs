//! Hibernating wss connections: after the TLS 1.3 or 1.2 handshake and
//! the upgrade, the connection keeps only its traffic keys (taken from
//! rustls with `dangerous_extract_secrets`), and records are sealed and
//! opened here with ring's AEAD — the write seam's TLS wire and the
//! reactor's read path. No TLS buffer is held while the connection is idle;
//! the key schedule is expanded per use, so a connection that is sent
//! nothing costs no crypto.
//!
//! The two versions' records differ only in framing: TLS 1.3 (RFC 8446
//! §5.2) hides the content type inside the sealed bytes, authenticates the
//! record header and derives the nonce as IV xor sequence; TLS 1.2's AEAD
//! records (RFC 5246 §6.2.3.3) carry the type in the header and
//! authenticate sequence, type, version and plaintext length; AES-GCM there
//! sends 8 bytes of the nonce in front of the ciphertext (RFC 5288 §3; we
//! send IV xor sequence as rustls does, the client's are read from each
//! record), ChaCha20-Poly1305 derives it like TLS 1.3 (RFC 7905 §2).

use std::cell::RefCell;
use std::io::IoSlice;
use std::os::unix::io::RawFd;

use ahash::AHashMap;
use ring::aead::{
    Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, AES_256_GCM, CHACHA20_POLY1305,
};
use rustls::ConnectionTrafficSecrets;

use crate::registry::{ConnKey, Wire};

/// Most plaintext in one TLS record (RFC 8446 §5.1).
const RECORD_PLAINTEXT_MAX: usize = 16 * 1024;
/// Record header bytes.
const HEADER: usize = 5;
/// AEAD tag bytes (all three suites).
const TAG: usize = 16;
/// The nonce bytes a TLS 1.2 AES-GCM record carries before its ciphertext.
const EXPLICIT_NONCE: usize = 8;
/// TLS 1.2's additional data: sequence, type, version, plaintext length.
const TLS12_AAD: usize = 8 + 1 + 2 + 2;
/// Most plaintext sealed per write call (then the socket decides).
const SEAL_PER_WRITE_MAX: usize = 4 * RECORD_PLAINTEXT_MAX;
/// Longest record a client may send: 2^14 + 256 of ciphertext.
const RECORD_CIPHERTEXT_MAX: usize = RECORD_PLAINTEXT_MAX + 256;

/// One direction's keys: the raw key, the IV and the next sequence number.
#[derive(Clone)]
struct Direction {
    /// 0 AES-128-GCM, 1 AES-256-GCM, 2 ChaCha20-Poly1305.
    suite: u8,
    /// TLS 1.2 records (else TLS 1.3). Here rather than in `Session`: it
    /// fits the padding after `suite`, so a session stays 120 bytes.
    tls12: bool,
    key: [u8; 32],
    iv: [u8; 12],
    seq: u64,
}

impl std::fmt::Debug for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Direction").field("seq", &self.seq).finish()
    }
}

impl Direction {
    fn of(seq: u64, secrets: &ConnectionTrafficSecrets, tls12: bool) -> Option<Direction> {
        let (suite, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (0u8, key.as_ref(), iv.as_ref()),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (1, key.as_ref(), iv.as_ref()),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (2, key.as_ref(), iv.as_ref())
            }
            _ => return None,
        };
        let mut direction = Direction {
            suite,
            tls12,
            key: [0; 32],
            iv: [0; 12],
            seq,
        };
        direction.key[..key.len()].copy_from_slice(key);
        direction.iv.copy_from_slice(iv.get(..12)?);
        Some(direction)
    }

    fn aead(&self) -> LessSafeKey {
        let (algorithm, len) = match self.suite {
            0 => (&AES_128_GCM, 16),
            1 => (&AES_256_GCM, 32),
            _ => (&CHACHA20_POLY1305, 32),
        };
        LessSafeKey::new(UnboundKey::new(algorithm, &self.key[..len]).expect("key length"))
    }

    /// IV xor the sequence number, which then advances.
    fn nonce_bytes(&mut self) -> [u8; 12] {
        let mut nonce = self.iv;
        for (byte, seq) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *byte ^= seq;
        }
        self.seq += 1;
        nonce
    }

    fn nonce(&mut self) -> Nonce {
        Nonce::assume_unique_for_key(self.nonce_bytes())
    }

    /// True for AES-GCM, whose TLS 1.2 records carry an explicit nonce.
    fn gcm(&self) -> bool {
        self.suite < 2
    }
}

/// TLS 1.2's additional data for a record of `content_type` with
/// `plaintext_len` bytes at sequence `seq`.
fn tls12_aad(seq: u64, content_type: u8, plaintext_len: usize) -> [u8; TLS12_AAD] {
    let mut aad = [0u8; TLS12_AAD];
    aad[..8].copy_from_slice(&seq.to_be_bytes());
    aad[8] = content_type;
    aad[9..11].copy_from_slice(&[0x03, 0x03]);
    aad[11..].copy_from_slice(&(plaintext_len as u16).to_be_bytes());
    aad
}

impl Drop for Direction {
    fn drop(&mut self) {
        // Best effort: the key does not outlive the connection in memory.
        for byte in self.key.iter_mut() {
            // SAFETY: a volatile write to our own byte.
            unsafe { std::ptr::write_volatile(byte, 0) };
        }
    }
}

/// A hibernating wss connection's TLS state: its keys, and bytes in
/// flight only while some are stuck.
#[derive(Debug)]
pub struct Session {
    tx: Direction,
    rx: Direction,
    /// Present only while bytes are stuck (boxed: an idle session is its
    /// keys alone).
    stuck: Option<Box<Stuck>>,
}

/// What a session holds between calls while bytes are stuck.
#[derive(Debug, Default)]
struct Stuck {
    /// Sealed bytes the socket has not taken yet.
    pending: Vec<u8>,
    /// Frame bytes sealed into `pending` that were reported as not taken,
    /// so the queue keeps them (and the reactor's EPOLLOUT interest): the
    /// next write counts them as taken without sealing them again.
    unreported: usize,
    /// The start of a client record not yet complete.
    partial: Vec<u8>,
}

impl Session {
    fn stuck(&mut self) -> &mut Stuck {
        self.stuck.get_or_insert_with(Box::default)
    }

    /// Frees the stuck bytes' box once nothing is stuck.
    fn unstick(&mut self) {
        if self
            .stuck
            .as_ref()
            .is_some_and(|s| s.pending.is_empty() && s.unreported == 0 && s.partial.is_empty())
        {
            self.stuck = None;
        }
    }
}

impl Session {
    /// The session of a connection's extracted secrets (`tls12`: the
    /// connection negotiated TLS 1.2, else 1.3); `None` for a suite this
    /// code does not seal.
    pub fn new(secrets: rustls::ExtractedSecrets, tls12: bool) -> Option<Session> {
        Some(Session {
            tx: Direction::of(secrets.tx.0, &secrets.tx.1, tls12)?,
            rx: Direction::of(secrets.rx.0, &secrets.rx.1, tls12)?,
            stuck: None,
        })
    }

    /// Ciphertext bytes the client sent after the request that are not a
    /// complete record yet (they were not given to rustls).
    pub fn set_partial(&mut self, bytes: Vec<u8>) {
        if !bytes.is_empty() {
            self.stuck().partial = bytes;
        }
    }

    /// Bytes of a sealed record before its plaintext: the header, and the
    /// explicit nonce of a TLS 1.2 AES-GCM record.
    fn prefix(&self) -> usize {
        if self.tx.tls12 && self.tx.gcm() {
            HEADER + EXPLICIT_NONCE
        } else {
            HEADER
        }
    }

    /// Seals `plaintext` (at most one record's) of `content_type` into `out`.
    fn seal(&mut self, content_type: u8, plaintext: &[u8], out: &mut Vec<u8>) {
        let start = begin_record(out, self.prefix());
        out.extend_from_slice(plaintext);
        self.finish_record(content_type, out, start);
    }

    /// Seals the record begun at `out[start]` (its plaintext follows the
    /// room `begin_record` made) in place, appending its tag (TLS 1.3: its
    /// type, then the tag).
    fn finish_record(&mut self, content_type: u8, out: &mut Vec<u8>, start: usize) {
        let key = self.tx.aead();
        if !self.tx.tls12 {
            out.push(content_type);
            let len = out.len() - start - HEADER + TAG;
            let header = [0x17, 0x03, 0x03, (len >> 8) as u8, len as u8];
            out[start..start + HEADER].copy_from_slice(&header);
            let nonce = self.tx.nonce();
            let tag = key
                .seal_in_place_separate_tag(nonce, Aad::from(header), &mut out[start + HEADER..])
                .expect("seal");
            out.extend_from_slice(tag.as_ref());
            return;
        }
        let prefix = self.prefix();
        let plaintext_len = out.len() - start - prefix;
        let len = prefix - HEADER + plaintext_len + TAG;
        let header = [content_type, 0x03, 0x03, (len >> 8) as u8, len as u8];
        out[start..start + HEADER].copy_from_slice(&header);
        let aad = tls12_aad(self.tx.seq, content_type, plaintext_len);
        let nonce = self.tx.nonce_bytes();
        if prefix > HEADER {
            out[start + HEADER..start + prefix].copy_from_slice(&nonce[4..]);
        }
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut out[start + prefix..],
            )
            .expect("seal");
        out.extend_from_slice(tag.as_ref());
    }

    /// Opens one client record (`header`, then `record`: its bytes after the
    /// header) in place: its content type and plaintext, or `None` when it
    /// does not open.
    fn open_record<'a>(
        &mut self,
        header: [u8; HEADER],
        record: &'a mut [u8],
    ) -> Option<(u8, &'a [u8])> {
        let key = self.rx.aead();
        if !self.rx.tls12 {
            let nonce = self.rx.nonce();
            let inner = key.open_in_place(nonce, Aad::from(header), record).ok()?;
            // TLSInnerPlaintext: content, the type, zero padding.
            let end = inner.iter().rposition(|&b| b != 0)?;
            return Some((inner[end], &inner[..end]));
        }
        let explicit = if self.rx.gcm() { EXPLICIT_NONCE } else { 0 };
        let plaintext_len = record.len().checked_sub(explicit + TAG)?;
        let aad = tls12_aad(self.rx.seq, header[0], plaintext_len);
        let mut nonce = self.rx.nonce_bytes();
        if explicit > 0 {
            // The salt (the IV's first 4 bytes) and the record's 8 bytes.
            nonce[..4].copy_from_slice(&self.rx.iv[..4]);
            nonce[4..].copy_from_slice(&record[..EXPLICIT_NONCE]);
        }
        let content = key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut record[explicit..],
            )
            .ok()?;
        Some((header[0], content))
    }
}

/// Room for a record's `prefix` (header, explicit nonce) at the end of
/// `out`; returns where the record starts.
fn begin_record(out: &mut Vec<u8>, prefix: usize) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER + EXPLICIT_NONCE][..prefix]);
    start
}

/// What the client's records said beside application data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    /// Only application data (or nothing complete yet).
    Data,
    /// close_notify: the client is done (like EOF).
    CloseNotify,
    /// A KeyUpdate: closed with 1001, the client resumes with `after`.
    KeyUpdate,
    /// A record that does not open, an alert, or anything unexpected.
    Bad,
}

thread_local! {
    /// The shard's hibernating TLS sessions, by connection.
    static SESSIONS: RefCell<AHashMap<ConnKey, Box<Session>>> = RefCell::new(AHashMap::new());
    /// The shard's one buffer for sealing.
    static SEALED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Gives connection `key` its TLS session (before anything is written).
pub fn attach(key: ConnKey, session: Box<Session>) {
    SESSIONS.with(|s| s.borrow_mut().insert(key, session));
}

/// Drops connection `key`'s session without a word (it never started).
pub fn forget(key: ConnKey) {
    SESSIONS.with(|s| s.borrow_mut().remove(&key));
}

/// True when connection `key` speaks TLS through this module.
pub fn is_tls(key: ConnKey) -> bool {
    SESSIONS.with(|s| {
        let sessions = s.borrow();
        !sessions.is_empty() && sessions.contains_key(&key)
    })
}

/// Drops connection `key`'s session, first sending close_notify when the
/// socket takes it at once.
pub fn detach(key: ConnKey, fd: RawFd) {
    let Some(mut session) = SESSIONS.with(|s| {
        let mut sessions = s.borrow_mut();
        if sessions.is_empty() {
            None
        } else {
            sessions.remove(&key)
        }
    }) else {
        return;
    };
    if session.stuck.as_ref().is_none_or(|s| s.pending.is_empty()) {
        let mut alert = Vec::with_capacity(HEADER + EXPLICIT_NONCE + 3 + TAG);
        session.seal(21, &[1, 0], &mut alert);
        // SAFETY: send of our own buffer on a socket the caller still owns.
        unsafe {
            libc::send(
                fd,
                alert.as_ptr().cast(),
                alert.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
    }
}

/// Opens the client's records in `ciphertext` (after any partial record
/// kept from before), appending their application data to `plaintext`.
pub fn open(key: ConnKey, ciphertext: &[u8], plaintext: &mut Vec<u8>) -> Opened {
    SESSIONS.with(|s| {
        let mut sessions = s.borrow_mut();
        let Some(session) = sessions.get_mut(&key) else {
            plaintext.extend_from_slice(ciphertext);
            return Opened::Data;
        };
        let mut bytes = session
            .stuck
            .as_mut()
            .map(|s| std::mem::take(&mut s.partial))
            .unwrap_or_default();
        bytes.extend_from_slice(ciphertext);
        let mut at = 0;
        let mut result = Opened::Data;
        // The smallest record: TLS 1.3 seals at least its type byte; TLS
        // 1.2 GCM carries its explicit nonce.
        let len_min = if !session.rx.tls12 {
            TAG + 1
        } else if session.rx.gcm() {
            TAG + EXPLICIT_NONCE
        } else {
            TAG
        };
        // The header types a record may have: TLS 1.3 says only
        // application data there; TLS 1.2 names alerts (21) and data (23),
        // and anything else (a renegotiation's handshake, a
        // ChangeCipherSpec) has no place after the upgrade.
        let tls12 = session.rx.tls12;
        let header_type_ok = |byte: u8| byte == 0x17 || (tls12 && byte == 21);
        while bytes.len() - at >= HEADER {
            let len = usize::from(u16::from_be_bytes([bytes[at + 3], bytes[at + 4]]));
            if !header_type_ok(bytes[at]) || !(len_min..=RECORD_CIPHERTEXT_MAX).contains(&len) {
                return Opened::Bad;
            }
            if bytes.len() - at < HEADER + len {
                break;
            }
            let header: [u8; HEADER] = bytes[at..at + HEADER].try_into().expect("header");
            let record = &mut bytes[at + HEADER..at + HEADER + len];
            let Some((content_type, content)) = session.open_record(header, record) else {
                return Opened::Bad;
            };
            match content_type {
                23 => plaintext.extend_from_slice(content),
                21 => {
                    // close_notify (a warning in TLS 1.2, level 1).
                    return if content == [1, 0] {
                        Opened::CloseNotify
                    } else {
                        Opened::Bad
                    };
                }
                22 if !tls12 && content.first() == Some(&24) => {
                    result = Opened::KeyUpdate;
                    at += HEADER + len;
                    break;
                }
                _ => return Opened::Bad,
            }
            at += HEADER + len;
        }
        if result == Opened::Data && at < bytes.len() {
            bytes.drain(..at);
            session.stuck().partial = bytes;
        }
        session.unstick();
        result
    })
}

/// The shard's wire: TLS connections get their frames sealed into records
/// (several frames per record where they fit), the others the plaintext
/// vectored send.
#[derive(Debug, Clone, Copy, Default)]
pub struct TlsAwareWire;

fn send(fd: RawFd, bytes: &[u8]) -> std::io::Result<usize> {
    super::send_vectored(fd, &[IoSlice::new(bytes)])
}

impl Wire for TlsAwareWire {
    fn write<'a>(
        &mut self,
        key: ConnKey,
        fd: RawFd,
        frames: impl Iterator<Item = &'a [u8]>,
    ) -> std::io::Result<usize> {
        let tls = SESSIONS.with(|s| {
            let sessions = s.borrow();
            !sessions.is_empty() && sessions.contains_key(&key)
        });
        if !tls {
            return super::send_vectored.write(key, fd, frames);
        }
        SESSIONS.with(|s| {
            let mut sessions = s.borrow_mut();
            let session = sessions.get_mut(&key).expect("checked above");
            let mut skip = 0;
            if let Some(stuck) = session.stuck.as_mut() {
                if !stuck.pending.is_empty() {
                    let sent = send(fd, &stuck.pending)?;
                    stuck.pending.drain(..sent);
                    if !stuck.pending.is_empty() {
                        return Err(std::io::ErrorKind::WouldBlock.into());
                    }
                    stuck.pending = Vec::new();
                }
                skip = std::mem::take(&mut stuck.unreported);
                session.unstick();
            }
            let skipped = skip;
            SEALED.with(|sealed| {
                let mut sealed = sealed.borrow_mut();
                sealed.clear();
                // The record being filled: where it starts in `sealed`.
                let mut open: Option<usize> = None;
                let mut taken = 0usize;
                let prefix = session.prefix();
                for frame in frames {
                    let frame = if skip > 0 {
                        let cut = skip.min(frame.len());
                        skip -= cut;
                        &frame[cut..]
                    } else {
                        frame
                    };
                    let mut rest = frame;
                    while !rest.is_empty() && taken < SEAL_PER_WRITE_MAX {
                        let start = *open.get_or_insert_with(|| begin_record(&mut sealed, prefix));
                        let in_record = sealed.len() - start - prefix;
                        let part = (RECORD_PLAINTEXT_MAX - in_record)
                            .min(rest.len())
                            .min(SEAL_PER_WRITE_MAX - taken);
                        sealed.extend_from_slice(&rest[..part]);
                        rest = &rest[part..];
                        taken += part;
                        if in_record + part == RECORD_PLAINTEXT_MAX {
                            session.finish_record(23, &mut sealed, start);
                            open = None;
                        }
                    }
                    if taken >= SEAL_PER_WRITE_MAX {
                        break;
                    }
                }
                if let Some(start) = open {
                    session.finish_record(23, &mut sealed, start);
                }
                if sealed.is_empty() {
                    return Ok(skipped);
                }
                let sent = match send(fd, &sealed) {
                    Ok(sent) => sent,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
                    Err(e) => return Err(e),
                };
                if sent == sealed.len() {
                    return Ok(skipped + taken);
                }
                // The socket took part: the rest of the sealed records waits
                // here, and one frame byte is reported as not taken so the
                // queue (and EPOLLOUT) stay until it is sent.
                let stuck = session.stuck();
                stuck.pending = sealed[sent..].to_vec();
                stuck.unreported = 1;
                Ok(skipped + taken - 1)
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What an idle hibernating TLS connection holds (docs/ARCHITECTURE.md,
    /// TLS): both directions' key, IV and sequence, and the empty box.
    #[test]
    fn an_idle_session_is_120_bytes() {
        assert_eq!(std::mem::size_of::<Session>(), 120);
    }
}
