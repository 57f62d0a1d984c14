//! Browser sessions (PROTOCOL.md §5): the `hs_session` cookie is a signed,
//! expiring token naming an org and an API key id. It carries no secret of
//! its own: the server checks the HMAC-SHA256 signature with a secret kept
//! in `<data-dir>/session-secret` (generated once, mode 0600), then checks
//! that the key is still active, so a session dies with its key.
//!
//! The cookie value is `2.<org_id>.<key_id>.<expires_unix_secs>.<nonce>.<mac>`,
//! with `nonce` 128 random bits (base64url) drawn for each sign-in and `mac`
//! the base64url HMAC of everything before it. The nonce makes each sign-in
//! its own session: two browsers signing in with one key in the same second
//! get different cookies, and signing one out (which names the session by a
//! hash of its cookie) leaves the other signed in. Cookies of the first
//! format, `1.<org_id>.<key_id>.<expires_unix_secs>.<mac>` (no nonce), stay
//! valid until they expire. Org ids, key ids and the nonce never contain a
//! dot, so the split is unambiguous; every character is a cookie-octet
//! (RFC 6265 §4.1.1), so the value needs no quoting.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::protocol::http::SESSION_COOKIE_NAME;

/// File name of the signing secret inside the data directory.
pub const SECRET_FILE: &str = "session-secret";

/// Version tag, the first field of every cookie issued now.
const FORMAT_TAG: &str = "2";

/// Tag of the first format (no nonce): still verified, never issued.
const FORMAT_TAG_WITHOUT_NONCE: &str = "1";

/// Random bytes of a sign-in's nonce.
const NONCE_BYTES: usize = 16;

/// Longest cookie value accepted for verification: tag, a 64-byte org id, a
/// key id, a timestamp and a 43-byte MAC fit well within it.
const COOKIE_BYTES_MAX: usize = 512;

/// Bytes of the signing secret (the HMAC-SHA256 block is 64; 32 random bytes
/// are the full strength of SHA-256).
const SECRET_BYTES: usize = 32;

type HmacSha256 = Hmac<Sha256>;

/// The signing secret of one data directory. Its `Debug` never shows it.
#[derive(Clone)]
pub struct SessionSigner {
    /// The HMAC key.
    secret: [u8; SECRET_BYTES],
}

impl std::fmt::Debug for SessionSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionSigner(..)")
    }
}

/// What a valid cookie names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The org the session belongs to.
    pub org_id: String,
    /// The API key the session was opened with; the session is refused once
    /// that key is revoked.
    pub key_id: String,
    /// Seconds since the Unix epoch after which the cookie is refused.
    pub expires_unix_secs: u64,
}

impl SessionSigner {
    /// A signer with a given secret (tests).
    pub fn from_secret(secret: [u8; SECRET_BYTES]) -> SessionSigner {
        SessionSigner { secret }
    }

    /// Reads `<data-dir>/session-secret`, creating it (mode 0600) on first
    /// use. Two processes racing to create it agree on the first one written.
    pub fn load_or_create(data_dir: &Path) -> Result<SessionSigner, String> {
        let path = data_dir.join(SECRET_FILE);
        let describe = |e: std::io::Error| format!("{}: {e}", path.display());
        match fs::read_to_string(&path) {
            Ok(text) if !text.trim().is_empty() => return Self::decode(&path, text.trim()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(describe(e)),
        }
        fs::create_dir_all(data_dir).map_err(|e| format!("{}: {e}", data_dir.display()))?;
        let mut secret = [0u8; SECRET_BYTES];
        getrandom::fill(&mut secret).expect("the operating system's random source failed");
        let text = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret);
        // Written to a private temporary file and linked into place, so a
        // reader never sees a half-written secret and the loser of a race
        // reads the winner's.
        let temp = data_dir.join(format!("{SECRET_FILE}.{}.tmp", std::process::id()));
        super::write_private_file(&temp, text.as_bytes())
            .map_err(|(file, e)| format!("{}: {e}", file.display()))?;
        let linked = fs::hard_link(&temp, &path);
        let _ = fs::remove_file(&temp);
        match linked {
            Ok(()) => Ok(SessionSigner { secret }),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let text = fs::read_to_string(&path).map_err(describe)?;
                Self::decode(&path, text.trim())
            }
            Err(e) => Err(describe(e)),
        }
    }

    /// The secret as stored (base64url), for cluster mode, where every node
    /// must sign with the same one.
    pub fn secret_text(&self) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(self.secret)
    }

    /// Cluster mode: takes the cluster's secret `text` in place of this
    /// node's, writing it to `<data-dir>/session-secret` (atomically, 0600)
    /// so a restart keeps it.
    pub fn adopt(data_dir: &Path, text: &str) -> Result<SessionSigner, String> {
        let path = data_dir.join(SECRET_FILE);
        let signer = Self::decode(Path::new("the cluster's session secret"), text)?;
        let temp = data_dir.join(format!("{SECRET_FILE}.{}.tmp", std::process::id()));
        super::replace_private_file(&temp, &path, text.as_bytes())
            .map_err(|(file, e)| format!("{}: {e}", file.display()))?;
        Ok(signer)
    }

    fn decode(path: &Path, text: &str) -> Result<SessionSigner, String> {
        if let Ok(meta) = fs::metadata(path) {
            if meta.permissions().mode() & 0o077 != 0 {
                let _ = fs::set_permissions(path, fs::Permissions::from_mode(0o600));
            }
        }
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text)
            .ok()
            .filter(|b| b.len() == SECRET_BYTES)
            .ok_or_else(|| {
                format!(
                    "{}: not a session secret; delete it to generate a new one (this signs out every browser)",
                    path.display()
                )
            })?;
        let mut secret = [0u8; SECRET_BYTES];
        secret.copy_from_slice(&bytes);
        Ok(SessionSigner { secret })
    }

    fn mac(&self, payload: &str) -> HmacSha256 {
        let mut mac =
            HmacSha256::new_from_slice(&self.secret).expect("HMAC takes a key of any length");
        mac.update(payload.as_bytes());
        mac
    }

    /// The cookie value for a new sign-in to `session`: its own nonce, so
    /// no two sign-ins share a cookie.
    pub fn issue(&self, session: &Session) -> String {
        let mut nonce = [0u8; NONCE_BYTES];
        getrandom::fill(&mut nonce).expect("the operating system's random source failed");
        self.issue_with_nonce(session, &nonce)
    }

    /// The cookie value for `session` with a given nonce (tests).
    pub fn issue_with_nonce(&self, session: &Session, nonce: &[u8; NONCE_BYTES]) -> String {
        assert!(crate::auth::keys::is_valid_org_id(&session.org_id));
        assert!(!session.key_id.is_empty());
        assert!(!session.key_id.contains('.'));
        let nonce = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(nonce);
        let payload = format!(
            "{FORMAT_TAG}.{}.{}.{}.{nonce}",
            session.org_id, session.key_id, session.expires_unix_secs
        );
        self.sign(payload)
    }

    /// A cookie of the first format, without a nonce (tests of the
    /// compatibility rule; never issued by the server).
    pub fn issue_without_nonce(&self, session: &Session) -> String {
        let payload = format!(
            "{FORMAT_TAG_WITHOUT_NONCE}.{}.{}.{}",
            session.org_id, session.key_id, session.expires_unix_secs
        );
        self.sign(payload)
    }

    fn sign(&self, payload: String) -> String {
        let tag = self.mac(&payload).finalize().into_bytes();
        let tag = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tag);
        format!("{payload}.{tag}")
    }

    /// The session a cookie value names, if its signature is ours and it has
    /// not expired at `now_unix_secs`. Says nothing about why it failed: a
    /// forged, tampered and expired cookie are the same to the client.
    pub fn verify(&self, cookie: &str, now_unix_secs: u64) -> Option<Session> {
        if cookie.len() > COOKIE_BYTES_MAX {
            return None;
        }
        let (payload, tag) = cookie.rsplit_once('.')?;
        let tag = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(tag)
            .ok()?;
        // The signature is checked before any field is believed; the
        // comparison inside `verify_slice` takes constant time.
        self.mac(payload).verify_slice(&tag).ok()?;
        let mut fields = payload.split('.');
        let (Some(tag), Some(org_id), Some(key_id), Some(expires)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return None;
        };
        // The current format ends with the nonce; the first one ends here.
        let well_formed = match (tag, fields.next(), fields.next()) {
            (FORMAT_TAG, Some(nonce), None) => !nonce.is_empty(),
            (FORMAT_TAG_WITHOUT_NONCE, None, None) => true,
            _ => false,
        };
        if !well_formed {
            return None;
        }
        let expires_unix_secs: u64 = expires.parse().ok()?;
        if now_unix_secs >= expires_unix_secs {
            return None;
        }
        Some(Session {
            org_id: org_id.to_string(),
            key_id: key_id.to_string(),
            expires_unix_secs,
        })
    }
}

/// Seconds since the Unix epoch, now.
pub fn now_unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The `Set-Cookie` value that stores a session in the browser: not readable
/// by scripts (HttpOnly), not sent on cross-site subrequests (SameSite=Lax),
/// for every path, expiring with the session. `secure` adds `Secure` (when
/// the server speaks TLS).
pub fn set_cookie_value(cookie: &str, max_age_secs: u64, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!(
        "{SESSION_COOKIE_NAME}={cookie}; Max-Age={max_age_secs}; Path=/; HttpOnly; SameSite=Lax{secure}"
    )
}

/// The `Set-Cookie` value that removes the session cookie.
pub fn clear_cookie_value(secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!("{SESSION_COOKIE_NAME}=; Max-Age=0; Path=/; HttpOnly; SameSite=Lax{secure}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> SessionSigner {
        SessionSigner::from_secret([7u8; SECRET_BYTES])
    }

    fn session(expires: u64) -> Session {
        Session {
            org_id: "org_a".to_string(),
            key_id: "key_0123456789abcdef".to_string(),
            expires_unix_secs: expires,
        }
    }

    #[test]
    fn round_trip_before_expiry() {
        let cookie = signer().issue(&session(1_000));
        assert_eq!(signer().verify(&cookie, 999), Some(session(1_000)));
    }

    #[test]
    fn each_sign_in_gets_its_own_cookie() {
        let first = signer().issue(&session(1_000));
        let second = signer().issue(&session(1_000));
        assert_ne!(first, second);
        assert!(first.starts_with("2.org_a.key_0123456789abcdef.1000."));
        assert_eq!(signer().verify(&first, 999), Some(session(1_000)));
        assert_eq!(signer().verify(&second, 999), Some(session(1_000)));
        let fixed = signer().issue_with_nonce(&session(1_000), &[1; NONCE_BYTES]);
        assert_eq!(
            fixed,
            signer().issue_with_nonce(&session(1_000), &[1; NONCE_BYTES])
        );
    }

    #[test]
    fn first_format_cookies_stay_valid_until_they_expire() {
        let old = signer().issue_without_nonce(&session(1_000));
        assert!(old.starts_with("1.org_a.key_0123456789abcdef.1000."));
        assert_eq!(signer().verify(&old, 999), Some(session(1_000)));
        assert_eq!(signer().verify(&old, 1_000), None);
        // A tag that does not match its field count is refused even when
        // signed: a nonce under tag 1, none under tag 2.
        let payload_1_with_nonce = "1.org_a.key_0123456789abcdef.1000.abc".to_string();
        assert_eq!(
            signer().verify(&signer().sign(payload_1_with_nonce), 0),
            None
        );
        let payload_2_without = "2.org_a.key_0123456789abcdef.1000".to_string();
        assert_eq!(signer().verify(&signer().sign(payload_2_without), 0), None);
        let payload_2_empty = "2.org_a.key_0123456789abcdef.1000.".to_string();
        assert_eq!(signer().verify(&signer().sign(payload_2_empty), 0), None);
        let payload_3 = "3.org_a.key_0123456789abcdef.1000.abc".to_string();
        assert_eq!(signer().verify(&signer().sign(payload_3), 0), None);
    }

    #[test]
    fn expired_is_refused() {
        let cookie = signer().issue(&session(1_000));
        assert_eq!(signer().verify(&cookie, 1_000), None);
        assert_eq!(signer().verify(&cookie, 5_000), None);
    }

    #[test]
    fn other_secret_is_refused() {
        let cookie = signer().issue(&session(1_000));
        let other = SessionSigner::from_secret([8u8; SECRET_BYTES]);
        assert_eq!(other.verify(&cookie, 0), None);
    }

    #[test]
    fn every_single_byte_change_is_refused() {
        let cookie = signer().issue(&session(1_000));
        let bytes = cookie.as_bytes();
        for index in 0..bytes.len() {
            for replacement in [b'A', b'0', b'.', b'_', b'z'] {
                if bytes[index] == replacement {
                    continue;
                }
                let mut changed = bytes.to_vec();
                changed[index] = replacement;
                let changed = String::from_utf8(changed).unwrap();
                assert_eq!(signer().verify(&changed, 0), None, "{changed}");
            }
        }
    }

    #[test]
    fn extended_expiry_is_refused() {
        let cookie = signer().issue(&session(1_000));
        let forged = cookie.replacen(".1000.", ".9999999999.", 1);
        assert_ne!(forged, cookie);
        assert_eq!(signer().verify(&forged, 0), None);
    }

    #[test]
    fn garbage_is_refused() {
        for text in ["", ".", "1....", "1.a.b.c.d", "x".repeat(600).as_str()] {
            assert_eq!(signer().verify(text, 0), None);
        }
    }

    #[test]
    fn cookie_is_made_of_cookie_octets() {
        let cookie = signer().issue(&session(u64::MAX));
        assert!(cookie
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)));
        assert!(cookie.len() <= COOKIE_BYTES_MAX);
    }

    #[test]
    fn set_cookie_attributes() {
        let value = set_cookie_value("abc", 60, false);
        assert_eq!(
            value,
            "hs_session=abc; Max-Age=60; Path=/; HttpOnly; SameSite=Lax"
        );
        assert!(set_cookie_value("abc", 60, true).ends_with("; Secure"));
        assert!(clear_cookie_value(false).starts_with("hs_session=; Max-Age=0;"));
    }

    #[test]
    fn secret_file_is_created_once_with_mode_0600() {
        let dir = std::env::temp_dir().join(format!(
            "hookstream-session-test-{}-{}",
            std::process::id(),
            now_unix_secs()
        ));
        let first = SessionSigner::load_or_create(&dir).unwrap();
        let second = SessionSigner::load_or_create(&dir).unwrap();
        assert_eq!(first.secret, second.secret);
        let mode = fs::metadata(dir.join(SECRET_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let _ = fs::remove_dir_all(&dir);
    }
}
