//! Authentication: the hashed API key store, the admin token, and signed
//! browser session cookies and the list of signed-out ones.

pub mod current;
pub mod keys;
pub mod revoked;
pub mod sessions;

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Replaces the file at `path` with `bytes` by way of `temp`: written with
/// mode 0600 and fsynced, then renamed over `path`, so a reader sees the
/// old file or the new one, never part of either. (Making the rename
/// durable, by syncing the directory, is the caller's choice.) An error
/// names the file it happened on.
pub(crate) fn replace_private_file(
    temp: &Path,
    path: &Path,
    bytes: &[u8],
) -> Result<(), (PathBuf, std::io::Error)> {
    let written = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(temp)
        .and_then(|mut out| {
            out.write_all(bytes)?;
            out.sync_all()
        });
    written.map_err(|e| (temp.to_path_buf(), e))?;
    fs::rename(temp, path).map_err(|e| (path.to_path_buf(), e))
}
