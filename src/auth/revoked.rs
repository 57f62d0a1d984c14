//! Signed-out sessions (PROTOCOL.md §5, `DELETE /v1/sessions`). A session
//! cookie is stateless — checked by its signature and expiry — so signing
//! out has to remember the cookies it ended until they would have expired
//! anyway. One table for the whole process, shared by every shard, so a
//! cookie refused on one shard is refused on all of them from the moment
//! the sign-out is recorded; it is also appended to
//! `<data-dir>/revoked-sessions`, so it stays refused across a restart
//! (the signing secret, and so the cookie, survives one).
//!
//! A session is named by [`session_id`], 128 bits of the SHA-256 of the
//! cookie value: neither the table nor the file holds a cookie.
//!
//! Bounded: an entry lives until its cookie's own expiry (at most
//! `--session-ttl-secs`). One key may have at most
//! [`REVOKED_SESSIONS_PER_KEY_MAX`] entries and the table at most
//! [`REVOKED_SESSIONS_MAX`]; past either, the key's entries are folded into
//! one per-key watermark, "every session of this key expiring at or before
//! T is signed out" — safe (a few other browsers of the same key are signed
//! out too), never a revived session. Watermarks die with their expiry
//! too; there is at most one per key that signed a session out.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

/// File name of the revocation list inside the data directory.
pub const REVOKED_FILE: &str = "revoked-sessions";

/// Most signed-out sessions remembered one by one, process-wide.
pub const REVOKED_SESSIONS_MAX: usize = 100_000;

/// Most signed-out sessions remembered one by one per API key.
pub const REVOKED_SESSIONS_PER_KEY_MAX: usize = 1_000;

/// Lines appended since the last compaction past which the file is
/// rewritten with the live entries only.
const APPENDED_LINES_MAX: usize = 4_096;

/// The name of a session in the table: 128 bits of SHA-256 of its cookie.
pub fn session_id(cookie: &str) -> u128 {
    let digest = Sha256::digest(cookie.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    u128::from_be_bytes(bytes)
}

/// The in-memory table.
#[derive(Debug, Default)]
struct Table {
    /// Session id → (key id, expiry in Unix seconds).
    sessions: HashMap<u128, (String, u64)>,
    /// Entries per key id.
    per_key: HashMap<String, usize>,
    /// Key id → every session of it expiring at or before this is out.
    watermarks: HashMap<String, u64>,
}

/// One line of the file.
enum Line {
    Session(u128, String, u64),
    Watermark(String, u64),
}

impl Line {
    fn parse(text: &str) -> Option<Line> {
        let mut fields = text.split(' ');
        let line = match (
            fields.next()?,
            fields.next()?,
            fields.next()?,
            fields.next()?,
        ) {
            ("s", id, key_id, expires) => Line::Session(
                u128::from_str_radix(id, 16).ok()?,
                key_id.to_string(),
                expires.parse().ok()?,
            ),
            ("k", key_id, _, expires) => Line::Watermark(key_id.to_string(), expires.parse().ok()?),
            _ => return None,
        };
        fields.next().is_none().then_some(line)
    }

    fn write(&self, out: &mut String) {
        use std::fmt::Write as _;
        let _ = match self {
            Line::Session(id, key_id, expires) => writeln!(out, "s {id:032x} {key_id} {expires}"),
            Line::Watermark(key_id, expires) => writeln!(out, "k {key_id} - {expires}"),
        };
    }
}

impl Table {
    fn len(&self) -> usize {
        self.sessions.len() + self.watermarks.len()
    }

    fn is_revoked(&self, id: u128, key_id: &str, expires: u64) -> bool {
        self.sessions.contains_key(&id)
            || self.watermarks.get(key_id).is_some_and(|&w| expires <= w)
    }

    /// Records a sign-out; returns the lines that record it in the file.
    fn revoke(&mut self, id: u128, key_id: &str, expires: u64, now: u64) -> Vec<Line> {
        if self.is_revoked(id, key_id, expires) {
            return Vec::new();
        }
        let per_key = self.per_key.get(key_id).copied().unwrap_or(0);
        if per_key < REVOKED_SESSIONS_PER_KEY_MAX && self.sessions.len() < REVOKED_SESSIONS_MAX {
            self.sessions.insert(id, (key_id.to_string(), expires));
            *self.per_key.entry(key_id.to_string()).or_insert(0) += 1;
            return vec![Line::Session(id, key_id.to_string(), expires)];
        }
        self.prune(now);
        let per_key = self.per_key.get(key_id).copied().unwrap_or(0);
        if per_key < REVOKED_SESSIONS_PER_KEY_MAX && self.sessions.len() < REVOKED_SESSIONS_MAX {
            self.sessions.insert(id, (key_id.to_string(), expires));
            *self.per_key.entry(key_id.to_string()).or_insert(0) += 1;
            return vec![Line::Session(id, key_id.to_string(), expires)];
        }
        // Full: fold this key's entries into its watermark.
        let mut mark = expires.max(self.watermarks.get(key_id).copied().unwrap_or(0));
        self.sessions.retain(|_, (k, e)| {
            if k == key_id {
                mark = mark.max(*e);
                false
            } else {
                true
            }
        });
        self.per_key.remove(key_id);
        self.watermarks.insert(key_id.to_string(), mark);
        vec![Line::Watermark(key_id.to_string(), mark)]
    }

    /// Drops what has expired at `now`.
    fn prune(&mut self, now: u64) {
        self.sessions.retain(|_, (_, e)| *e > now);
        self.watermarks.retain(|_, e| *e > now);
        self.per_key.clear();
        for (key_id, _) in self.sessions.values() {
            *self.per_key.entry(key_id.clone()).or_insert(0) += 1;
        }
    }

    fn lines(&self) -> Vec<Line> {
        let mut lines: Vec<Line> = self
            .watermarks
            .iter()
            .map(|(k, e)| Line::Watermark(k.clone(), *e))
            .collect();
        lines.extend(
            self.sessions
                .iter()
                .map(|(id, (k, e))| Line::Session(*id, k.clone(), *e)),
        );
        lines
    }
}

/// Adds what the file at `path` holds (not expired at `now`) to `table`;
/// a missing file holds nothing.
fn read_into(path: &Path, table: &mut Table, now: u64) -> Result<(), String> {
    match File::open(path) {
        Ok(file) => {
            for line in BufReader::new(file).lines() {
                let line = line.map_err(|e| format!("{}: {e}", path.display()))?;
                match Line::parse(&line) {
                    Some(Line::Session(id, key_id, expires)) if expires > now => {
                        table.revoke(id, &key_id, expires, now);
                    }
                    Some(Line::Watermark(key_id, expires)) if expires > now => {
                        let mark = table.watermarks.entry(key_id).or_insert(0);
                        *mark = (*mark).max(expires);
                    }
                    _ => {}
                }
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// The process-wide list of signed-out sessions.
#[derive(Debug)]
pub struct Revocations {
    table: Mutex<Table>,
    /// Counts sign-outs, so shards notice one and close its connections.
    generation: AtomicU64,
    /// The file; only touched from blocking threads.
    file: Mutex<FileState>,
}

#[derive(Debug)]
struct FileState {
    path: PathBuf,
    appended: usize,
}

impl Revocations {
    /// Loads `<data-dir>/revoked-sessions` (creating it, mode 0600), keeping
    /// what has not expired at `now`, and rewrites it compacted. Lines that
    /// do not parse (a write cut short by a crash) are skipped.
    pub fn load(data_dir: &Path, now: u64) -> Result<Revocations, String> {
        let revocations = Revocations::load_only(data_dir, now)?;
        revocations.compact(now)?;
        Ok(revocations)
    }

    /// [`Revocations::load`] without rewriting the file (a hot upgrade's
    /// new process: the rewrite, two fsyncs, would lengthen the pause; the
    /// old process did it at its start, and the next one comes after 4,096
    /// appends).
    pub fn load_only(data_dir: &Path, now: u64) -> Result<Revocations, String> {
        let path = data_dir.join(REVOKED_FILE);
        let mut table = Table::default();
        read_into(&path, &mut table, now)?;
        let revocations = Revocations {
            file: Mutex::new(FileState { path, appended: 0 }),
            table: Mutex::new(table),
            generation: AtomicU64::new(0),
        };
        Ok(revocations)
    }

    /// Reads the file again and adds what it holds (a hot upgrade's new
    /// process, which loaded it before the old process froze: sign-outs
    /// the old one wrote since are taken too). Nothing is rewritten.
    pub fn reload_only(&self, data_dir: &Path, now: u64) -> Result<(), String> {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        read_into(&data_dir.join(REVOKED_FILE), &mut table, now)?;
        drop(table);
        self.generation.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// An empty list kept in memory only (tests).
    pub fn in_memory() -> Revocations {
        Revocations {
            table: Mutex::new(Table::default()),
            generation: AtomicU64::new(0),
            file: Mutex::new(FileState {
                path: PathBuf::new(),
                appended: 0,
            }),
        }
    }

    /// True when the session `id` of key `key_id` expiring at `expires` was
    /// signed out.
    pub fn is_revoked(&self, id: u128, key_id: &str, expires: u64) -> bool {
        self.table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_revoked(id, key_id, expires)
    }

    /// Signs a session out, in memory: refused everywhere from now on.
    /// Returns the file lines to [`persist`](Self::persist).
    pub fn revoke(&self, id: u128, key_id: &str, expires: u64, now: u64) -> Pending {
        let lines = self
            .table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .revoke(id, key_id, expires, now);
        self.generation.fetch_add(1, Ordering::SeqCst);
        Pending(lines)
    }

    /// Changes with every sign-out.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Appends a sign-out to the file and syncs it; rewrites the file
    /// compacted once enough was appended. Blocks: call it on a blocking
    /// thread.
    pub fn persist(&self, pending: Pending, now: u64) -> Result<(), String> {
        if pending.0.is_empty() {
            return Ok(());
        }
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if file.path.as_os_str().is_empty() {
            return Ok(());
        }
        let mut text = String::new();
        for line in &pending.0 {
            line.write(&mut text);
        }
        let describe = |e: std::io::Error| format!("{}: {e}", file.path.display());
        let mut out = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&file.path)
            .map_err(describe)?;
        out.write_all(text.as_bytes())
            .and_then(|()| out.sync_data())
            .map_err(describe)?;
        file.appended += pending.0.len();
        if file.appended > APPENDED_LINES_MAX {
            drop(file);
            self.compact(now)?;
        }
        Ok(())
    }

    /// Drops expired entries and rewrites the file with the rest,
    /// atomically.
    fn compact(&self, now: u64) -> Result<(), String> {
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let text = {
            let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
            table.prune(now);
            let mut text = String::new();
            for line in table.lines() {
                line.write(&mut text);
            }
            text
        };
        let path = file.path.clone();
        let temp = path.with_extension("tmp");
        super::replace_private_file(&temp, &path, text.as_bytes())
            .map_err(|(p, e)| format!("{}: {e}", p.display()))?;
        if let Some(dir) = path.parent() {
            if let Ok(dir) = File::open(dir) {
                let _ = dir.sync_all();
            }
        }
        file.appended = 0;
        Ok(())
    }

    /// Entries held (tests, metrics).
    pub fn len(&self) -> usize {
        self.table.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A sign-out recorded in memory, still to be written to the file.
#[must_use]
pub struct Pending(Vec<Line>);

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn revoked_until_expiry_then_forgotten() {
        let r = Revocations::in_memory();
        let id = session_id("cookie-a");
        assert!(!r.is_revoked(id, "key_a", 100));
        let _ = r.revoke(id, "key_a", 100, 10);
        assert!(r.is_revoked(id, "key_a", 100));
        assert!(!r.is_revoked(session_id("cookie-b"), "key_a", 100));
        r.table.lock().unwrap().prune(100);
        assert!(r.is_empty());
    }

    #[test]
    fn a_full_key_folds_into_a_watermark() {
        let mut table = Table::default();
        for i in 0..REVOKED_SESSIONS_PER_KEY_MAX as u128 {
            table.revoke(i, "key_a", 1_000 + i as u64, 0);
        }
        table.revoke(1 << 100, "key_b", 5_000, 0);
        assert_eq!(table.sessions.len(), REVOKED_SESSIONS_PER_KEY_MAX + 1);
        table.revoke(1 << 101, "key_a", 500, 0);
        assert_eq!(table.sessions.len(), 1);
        assert!(table.is_revoked(1 << 101, "key_a", 500));
        assert!(table.is_revoked(7, "key_a", 1_007));
        // Other sessions of key_a expiring earlier are out too (safe side);
        // later ones and other keys are not.
        assert!(table.is_revoked(1 << 102, "key_a", 900));
        assert!(!table.is_revoked(1 << 102, "key_a", 5_000));
        assert!(table.is_revoked(1 << 100, "key_b", 5_000));
        assert!(!table.is_revoked(1 << 103, "key_b", 4_000));
    }

    #[test]
    fn a_reload_adds_what_another_process_wrote_since() {
        let dir = std::env::temp_dir().join(format!(
            "hookstream-revoked-reload-{}-{}",
            std::process::id(),
            crate::auth::sessions::now_unix_secs()
        ));
        fs::create_dir_all(&dir).unwrap();
        let old = Revocations::load(&dir, 10).unwrap();
        let p = old.revoke(session_id("a"), "key_a", 100, 10);
        old.persist(p, 10).unwrap();
        let new = Revocations::load_only(&dir, 10).unwrap();
        let p = old.revoke(session_id("b"), "key_a", 100, 10);
        old.persist(p, 10).unwrap();
        assert!(!new.is_revoked(session_id("b"), "key_a", 100));
        let seen = new.generation();
        new.reload_only(&dir, 10).unwrap();
        assert!(new.is_revoked(session_id("a"), "key_a", 100));
        assert!(new.is_revoked(session_id("b"), "key_a", 100));
        assert_eq!(new.len(), 2);
        assert!(new.generation() > seen);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn survives_a_reload_and_drops_expired() {
        let dir = std::env::temp_dir().join(format!(
            "hookstream-revoked-test-{}-{}",
            std::process::id(),
            crate::auth::sessions::now_unix_secs()
        ));
        fs::create_dir_all(&dir).unwrap();
        let r = Revocations::load(&dir, 10).unwrap();
        let p = r.revoke(session_id("a"), "key_a", 100, 10);
        r.persist(p, 10).unwrap();
        let p = r.revoke(session_id("b"), "key_a", 20, 10);
        r.persist(p, 10).unwrap();
        fs::OpenOptions::new()
            .append(true)
            .open(dir.join(REVOKED_FILE))
            .unwrap()
            .write_all(b"s 12 garbage")
            .unwrap();
        let again = Revocations::load(&dir, 30).unwrap();
        assert!(again.is_revoked(session_id("a"), "key_a", 100));
        assert!(!again.is_revoked(session_id("b"), "key_a", 20));
        assert_eq!(again.len(), 1);
        let text = fs::read_to_string(dir.join(REVOKED_FILE)).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        let _ = fs::remove_dir_all(&dir);
    }
}
