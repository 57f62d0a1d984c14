//! The API key store: `<data-dir>/keys.json`, holding only SHA-256 hashes of
//! keys. Writers take an exclusive `flock` on `<data-dir>/keys.lock`, read,
//! modify, and replace the file atomically (temp file, fsync, rename, fsync
//! of the directory), so two CLI calls at once lose nothing. The running
//! server re-reads the file when its modification time changes.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Every key starts with this, so a leaked key is recognisable in scans.
pub const KEY_PREFIX: &str = "hsk_";

/// File name of the store inside the data directory.
pub const KEYS_FILE: &str = "keys.json";

/// One stored key. The key itself is never stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyRecord {
    /// Public identifier, used to revoke and list.
    pub id: String,
    /// Human name given at creation.
    pub name: String,
    /// The org every connection with this key belongs to.
    pub org_id: String,
    /// Hex SHA-256 of the key.
    pub hash: String,
    /// RFC 3339 creation time.
    pub created_at: String,
    /// RFC 3339 time of the last accepted use, if any.
    #[serde(default)]
    pub last_used_at: Option<String>,
    /// RFC 3339 revocation time; a revoked key is refused everywhere.
    #[serde(default)]
    pub revoked_at: Option<String>,
}

/// The whole file.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct KeyFile {
    /// All keys ever created, revoked ones included.
    pub keys: Vec<KeyRecord>,
}

/// What `create` returns: the record and the key, shown once.
#[derive(Debug, Clone)]
pub struct CreatedKey {
    /// The stored record.
    pub record: KeyRecord,
    /// The secret key, never stored.
    pub key: String,
}

/// Errors of the key store, with the path involved.
#[derive(Debug, thiserror::Error)]
pub enum KeyStoreError {
    /// Reading, writing or locking failed.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The file is not a key store.
    #[error("{path}: not a valid key store: {reason}")]
    Corrupt {
        /// The file involved.
        path: PathBuf,
        /// What the JSON parser said.
        reason: String,
    },
    /// Bad input from the command line.
    #[error("{0}")]
    Invalid(String),
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> KeyStoreError + '_ {
    move |source| KeyStoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Hex SHA-256 of a key.
pub fn hash_key(key: &str) -> String {
    let mut hex = [0u8; 64];
    hash_key_into(key, &mut hex).to_string()
}

/// Hex SHA-256 of a key, written into `out` (no allocation: every upgrade
/// looks its key up by this).
pub fn hash_key_into<'a>(key: &str, out: &'a mut [u8; 64]) -> &'a str {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(key.as_bytes());
    for (i, byte) in digest.iter().enumerate() {
        out[2 * i] = HEX[usize::from(byte >> 4)];
        out[2 * i + 1] = HEX[usize::from(byte & 0x0f)];
    }
    std::str::from_utf8(out).expect("hex digits are ASCII")
}

/// True when `org` matches `[A-Za-z0-9_-]{1,64}`.
pub fn is_valid_org_id(org: &str) -> bool {
    !org.is_empty()
        && org.len() <= crate::limits::ORG_ID_BYTES_MAX
        && org
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// RFC 3339 UTC timestamp of now, to the second.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).expect("the operating system's random source failed");
    bytes
}

/// A new random 256-bit key with the recognisable prefix.
pub fn generate_key() -> String {
    let bytes: [u8; 32] = random_bytes();
    format!(
        "{KEY_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// A random token of 32 bytes, base64url; used for the admin token and secrets.
pub fn generate_token() -> String {
    let bytes: [u8; 32] = random_bytes();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn generate_id() -> String {
    let bytes: [u8; 8] = random_bytes();
    let mut id = String::from("key_");
    for byte in bytes {
        id.push_str(&format!("{byte:02x}"));
    }
    id
}

/// A new key for `org` and its record, stored nowhere yet (the key store
/// of a data directory, or the cluster's key bucket, stores the record).
pub fn new_key(name: &str, org: &str) -> Result<CreatedKey, KeyStoreError> {
    if !is_valid_org_id(org) {
        return Err(KeyStoreError::Invalid(format!(
            "org id {org:?} must match [A-Za-z0-9_-]{{1,64}}"
        )));
    }
    if name.is_empty() || name.len() > 256 || name.chars().any(char::is_control) {
        return Err(KeyStoreError::Invalid(
            "--name must be 1 to 256 printable characters".to_string(),
        ));
    }
    let key = generate_key();
    let record = KeyRecord {
        id: generate_id(),
        name: name.to_string(),
        org_id: org.to_string(),
        hash: hash_key(&key),
        created_at: now_rfc3339(),
        last_used_at: None,
        revoked_at: None,
    };
    Ok(CreatedKey { record, key })
}

/// The key store of one data directory.
#[derive(Debug, Clone)]
pub struct KeyStore {
    dir: PathBuf,
}

/// Holds the store's exclusive lock until dropped.
struct LockGuard {
    _file: File,
}

impl KeyStore {
    /// The store in `dir`; the directory is created on first write.
    pub fn new(dir: &Path) -> KeyStore {
        KeyStore {
            dir: dir.to_path_buf(),
        }
    }

    /// Path of the keys file.
    pub fn path(&self) -> PathBuf {
        self.dir.join(KEYS_FILE)
    }

    fn lock(&self) -> Result<LockGuard, KeyStoreError> {
        fs::create_dir_all(&self.dir).map_err(io_error(&self.dir))?;
        let path = self.dir.join("keys.lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_error(&path))?;
        // SAFETY: flock on a file descriptor we own; blocks until we hold it.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(io_error(&path)(std::io::Error::last_os_error()));
        }
        Ok(LockGuard { _file: file })
    }

    /// Reads the file; a missing file is an empty store.
    pub fn load(&self) -> Result<KeyFile, KeyStoreError> {
        let path = self.path();
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| KeyStoreError::Corrupt {
                path,
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(KeyFile::default()),
            Err(e) => Err(io_error(&path)(e)),
        }
    }

    fn store(&self, file: &KeyFile) -> Result<(), KeyStoreError> {
        let path = self.path();
        let temp = self.dir.join(format!("{KEYS_FILE}.tmp"));
        let bytes = serde_json::to_vec_pretty(file).expect("key records always serialize");
        super::replace_private_file(&temp, &path, &bytes)
            .map_err(|(path, source)| KeyStoreError::Io { path, source })?;
        File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .map_err(io_error(&self.dir))?;
        Ok(())
    }

    /// Creates a key for `org`.
    pub fn create(&self, name: &str, org: &str) -> Result<CreatedKey, KeyStoreError> {
        let created = new_key(name, org)?;
        let _lock = self.lock()?;
        let mut file = self.load()?;
        file.keys.push(created.record.clone());
        self.store(&file)?;
        Ok(created)
    }

    /// Revokes the key with `id`; false if there is none.
    pub fn revoke(&self, id: &str) -> Result<bool, KeyStoreError> {
        let _lock = self.lock()?;
        let mut file = self.load()?;
        let Some(record) = file.keys.iter_mut().find(|r| r.id == id) else {
            return Ok(false);
        };
        if record.revoked_at.is_none() {
            record.revoked_at = Some(now_rfc3339());
            self.store(&file)?;
        }
        Ok(true)
    }

    /// Merges key records from another node (cluster mode): unknown ids
    /// are added, and a revocation is taken over (a revoked key stays
    /// revoked whatever the other side says); names, hashes and last-used
    /// times of known records stay as they are. One locked write, only
    /// when something changed; returns whether it did.
    pub fn merge(&self, records: &[KeyRecord]) -> Result<bool, KeyStoreError> {
        let _lock = self.lock()?;
        let mut file = self.load()?;
        let mut changed = false;
        for incoming in records {
            match file.keys.iter_mut().find(|r| r.id == incoming.id) {
                Some(known) => {
                    if known.revoked_at.is_none() && incoming.revoked_at.is_some() {
                        known.revoked_at = incoming.revoked_at.clone();
                        changed = true;
                    }
                }
                None => {
                    let mut record = incoming.clone();
                    record.last_used_at = None;
                    file.keys.push(record);
                    changed = true;
                }
            }
        }
        if changed {
            self.store(&file)?;
        }
        Ok(changed)
    }

    /// Records last-used times for the given key ids, in one write.
    pub fn touch(&self, used: &HashMap<String, String>) -> Result<(), KeyStoreError> {
        if used.is_empty() {
            return Ok(());
        }
        let _lock = self.lock()?;
        let mut file = self.load()?;
        let mut changed = false;
        for record in &mut file.keys {
            if let Some(at) = used.get(&record.id) {
                record.last_used_at = Some(at.clone());
                changed = true;
            }
        }
        if changed {
            self.store(&file)?;
        }
        Ok(())
    }

    /// What identifies this version of the file, to notice changes
    /// cheaply: every write replaces the file by a rename, so the inode
    /// changes even when two writes fall in one tick of the mtime clock.
    pub fn stamp(&self) -> Option<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        let meta = fs::metadata(self.path()).ok()?;
        Some(FileStamp {
            modified: meta.modified().ok(),
            inode: meta.ino(),
            len: meta.len(),
        })
    }
}

/// One version of the key file (see [`KeyStore::stamp`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    modified: Option<SystemTime>,
    inode: u64,
    len: u64,
}

/// `text` quoted and escaped for a log line, cut at 80 characters.
fn shown(text: &str) -> String {
    let cut: String = text.chars().take(80).collect();
    format!("{cut:?}")
}

/// Why a stored key record cannot be used, or `None`. `create` never
/// writes such a record; a hand edit can.
fn record_problem(record: &KeyRecord) -> Option<String> {
    let id_ok = !record.id.is_empty()
        && record.id.len() <= 64
        && record
            .id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !id_ok {
        return Some("its id must match [A-Za-z0-9_-]{1,64}".to_string());
    }
    if !is_valid_org_id(&record.org_id) {
        return Some(format!(
            "org id {} must match [A-Za-z0-9_-]{{1,64}}",
            shown(&record.org_id)
        ));
    }
    let hash_ok = record.hash.len() == 64
        && record
            .hash
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !hash_ok {
        return Some("its hash must be 64 lowercase hex digits".to_string());
    }
    None
}

/// What the server needs to authenticate: active keys by hash.
#[derive(Debug, Default, Clone)]
pub struct KeyIndex {
    /// Active keys by the hex hash of the key, for keys presented in clear.
    by_hash: HashMap<String, ActiveKey>,
    /// Org of each active key by key id, for session cookies (which name
    /// the key id) and revocation checks.
    org_by_id: HashMap<String, String>,
}

/// An active (not revoked) key as the server sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveKey {
    /// The key's id, to close its connections when it is revoked.
    pub id: String,
    /// The org it belongs to.
    pub org_id: String,
}

impl KeyIndex {
    /// Builds the index of every key that is not revoked. A record the
    /// server could not use safely (a hand edit: an org id or key id that
    /// breaks the rules every other part relies on, a hash that is not
    /// one) is skipped with one line on stderr naming it, never the key
    /// (the file holds none); its key is then refused like an unknown one.
    pub fn from_file(file: &KeyFile) -> KeyIndex {
        let by_hash = file
            .keys
            .iter()
            .filter(|r| r.revoked_at.is_none())
            .filter(|r| match record_problem(r) {
                None => true,
                Some(problem) => {
                    crate::log::warn(format_args!(
                        "hookstream: {KEYS_FILE}: key record {} skipped: {problem}",
                        shown(&r.id)
                    ));
                    false
                }
            })
            .map(|r| {
                (
                    r.hash.clone(),
                    ActiveKey {
                        id: r.id.clone(),
                        org_id: r.org_id.clone(),
                    },
                )
            })
            .collect::<HashMap<_, _>>();
        let org_by_id = by_hash
            .values()
            .map(|k| (k.id.clone(), k.org_id.clone()))
            .collect();
        KeyIndex { by_hash, org_by_id }
    }

    /// Looks a presented key up by its hash.
    pub fn authenticate(&self, key: &str) -> Option<&ActiveKey> {
        if !key.starts_with(KEY_PREFIX) || key.len() > 128 {
            return None;
        }
        let mut hex = [0u8; 64];
        self.by_hash.get(hash_key_into(key, &mut hex))
    }

    /// True while a key id is active.
    pub fn is_active(&self, id: &str) -> bool {
        self.org_by_id.contains_key(id)
    }

    /// The org of an active key id; `None` once it is revoked.
    pub fn org_of(&self, id: &str) -> Option<&str> {
        self.org_by_id.get(id).map(String::as_str)
    }

    /// Number of active keys.
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    /// True when there is no active key.
    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }
}

/// Compares two secrets in time that depends only on their hashes.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let a = Sha256::digest(a);
    let b = Sha256::digest(b);
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// The admin token already set: `HOOKSTREAM_ADMIN_TOKEN`, or
/// `<data-dir>/admin-token` if there is one (never creates it: for clients
/// of a running server).
pub fn existing_admin_token(data_dir: &Path) -> Result<Option<String>, KeyStoreError> {
    if let Ok(token) = std::env::var("HOOKSTREAM_ADMIN_TOKEN") {
        if !token.is_empty() {
            return Ok(Some(token));
        }
    }
    let path = data_dir.join("admin-token");
    match fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => Ok(Some(text.trim().to_string())),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error(&path)(e)),
    }
}

/// Longest admin token accepted: a request head is at most 8 KiB, and the
/// token must fit in one with room for the rest of the request.
pub const ADMIN_TOKEN_BYTES_MAX: usize = 4096;

/// Why an admin token cannot be used, as one line naming the rule; `None`
/// when it can be presented as `Authorization: Bearer <token>` (RFC 6750
/// token68 characters, as `protocol::http::bearer_token` accepts them).
pub fn admin_token_problem(token: &str) -> Option<String> {
    let presentable = |byte: u8| byte.is_ascii_alphanumeric() || b"-._~+/=".contains(&byte);
    if token.is_empty() {
        return Some("is empty".to_string());
    }
    if token.len() > ADMIN_TOKEN_BYTES_MAX || !token.bytes().all(presentable) {
        return Some(format!(
            "must be 1 to {ADMIN_TOKEN_BYTES_MAX} characters of A-Z a-z 0-9 - . _ ~ + / = \
             (what an `Authorization: Bearer` header carries)"
        ));
    }
    None
}

/// The admin token: `HOOKSTREAM_ADMIN_TOKEN`, or `<data-dir>/admin-token`,
/// generated once with mode 0600. A token nobody could present (an empty
/// file, characters a Bearer header cannot carry) is refused with the rule
/// it breaks, rather than starting a server whose admin API is locked.
pub fn admin_token(data_dir: &Path) -> Result<String, KeyStoreError> {
    let checked = |token: String, source: &str| match admin_token_problem(&token) {
        None => Ok(token),
        Some(problem) => Err(KeyStoreError::Invalid(format!("{source} {problem}"))),
    };
    if let Ok(token) = std::env::var("HOOKSTREAM_ADMIN_TOKEN") {
        if !token.is_empty() {
            return checked(token, "HOOKSTREAM_ADMIN_TOKEN");
        }
    }
    let path = data_dir.join("admin-token");
    let source = format!(
        "{} (delete it to have a new token generated)",
        path.display()
    );
    match fs::read_to_string(&path) {
        Ok(text) => return checked(text.trim().to_string(), &source),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error(&path)(e)),
    }
    fs::create_dir_all(data_dir).map_err(io_error(data_dir))?;
    let token = generate_token();
    let out = OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(&path);
    match out {
        Ok(mut file) => {
            file.write_all(token.as_bytes()).map_err(io_error(&path))?;
            file.sync_all().map_err(io_error(&path))?;
            Ok(token)
        }
        // Another process created it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => fs::read_to_string(&path)
            .map_err(io_error(&path))
            .and_then(|t| checked(t.trim().to_string(), &source)),
        Err(e) => Err(io_error(&path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let nanos = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        std::env::temp_dir().join(format!(
            "hookstream-keys-{name}-{}-{nanos}",
            std::process::id()
        ))
    }

    #[test]
    fn hash_is_the_lowercase_hex_sha256() {
        // FIPS 180-2's "abc" vector: the stored hashes of existing key
        // files must keep matching.
        assert_eq!(
            hash_key("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn keys_are_prefixed_random_and_hash_to_hex() {
        let a = generate_key();
        let b = generate_key();
        assert_ne!(a, b);
        assert!(a.starts_with(KEY_PREFIX));
        assert_eq!(a.len(), KEY_PREFIX.len() + 43);
        let hash = hash_key(&a);
        assert_eq!(hash.len(), 64);
        assert!(hash.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(hash, hash_key(&b));
    }

    #[test]
    fn index_holds_active_keys_only() {
        let dir = temp_dir("index");
        let store = KeyStore::new(&dir);
        let kept = store.create("kept", "org_a").unwrap();
        let gone = store.create("gone", "org_b").unwrap();
        assert!(store.revoke(&gone.record.id).unwrap());
        assert!(!store.revoke("key_unknown").unwrap());
        let index = KeyIndex::from_file(&store.load().unwrap());
        assert_eq!(index.len(), 1);
        let found = index.authenticate(&kept.key).unwrap();
        assert_eq!(found.id, kept.record.id);
        assert_eq!(found.org_id, "org_a");
        assert_eq!(index.org_of(&kept.record.id), Some("org_a"));
        assert!(index.is_active(&kept.record.id));
        assert_eq!(index.authenticate(&gone.key), None);
        assert_eq!(index.org_of(&gone.record.id), None);
        assert!(!index.is_active(&gone.record.id));
        // Not a key at all: refused before hashing.
        assert_eq!(index.authenticate(&kept.key[KEY_PREFIX.len()..]), None);
        assert_eq!(index.authenticate(&"hsk_x".repeat(40)), None);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_file_holds_hashes_not_keys_and_touch_records_last_use() {
        let dir = temp_dir("file");
        let store = KeyStore::new(&dir);
        let created = store.create("web", "org_a").unwrap();
        let text = fs::read_to_string(store.path()).unwrap();
        assert!(!text.contains(&created.key));
        assert!(text.contains(&created.record.hash));
        let used = HashMap::from([(created.record.id.clone(), now_rfc3339())]);
        store.touch(&used).unwrap();
        let file = store.load().unwrap();
        assert_eq!(
            file.keys[0].last_used_at,
            used.get(&created.record.id).cloned()
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn concurrent_creates_lose_nothing() {
        let dir = temp_dir("concurrent");
        let threads: Vec<_> = (0..8)
            .map(|n| {
                let store = KeyStore::new(&dir);
                std::thread::spawn(move || {
                    (0..5)
                        .map(|m| store.create(&format!("k{n}_{m}"), "org_a").unwrap())
                        .map(|c| c.record.id)
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let ids: Vec<String> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        let file = KeyStore::new(&dir).load().unwrap();
        assert_eq!(file.keys.len(), ids.len());
        for id in &ids {
            assert!(file.keys.iter().any(|k| &k.id == id), "{id} lost");
        }
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn invalid_input_is_refused() {
        let store = KeyStore::new(&temp_dir("invalid"));
        assert!(store.create("web", "bad org").is_err());
        assert!(store.create("web", &"o".repeat(65)).is_err());
        assert!(store.create("", "org_a").is_err());
        assert!(store.create("a\nb", "org_a").is_err());
    }

    #[test]
    fn constant_time_eq_compares_contents() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
