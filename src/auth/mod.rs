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

/// Writes `bytes` to a new file at `temp` with mode 0600 and fsyncs it. An
/// error names the file.
pub(crate) fn write_private_file(
    temp: &Path,
    bytes: &[u8],
) -> Result<(), (PathBuf, std::io::Error)> {
    OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(temp)
        .and_then(|mut out| {
            out.write_all(bytes)?;
            out.sync_all()
        })
        .map_err(|e| (temp.to_path_buf(), e))
}

/// Replaces the file at `path` with `bytes` by way of `temp`
/// ([`write_private_file`], then renamed over `path`), so a reader sees the
/// old file or the new one, never part of either. (Making the rename
/// durable, by syncing the directory, is the caller's choice.) An error
/// names the file it happened on.
pub(crate) fn replace_private_file(
    temp: &Path,
    path: &Path,
    bytes: &[u8],
) -> Result<(), (PathBuf, std::io::Error)> {
    write_private_file(temp, bytes)?;
    fs::rename(temp, path).map_err(|e| (path.to_path_buf(), e))
}
