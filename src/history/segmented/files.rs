//! Segment file I/O: opening, reading whole or in spans, writing, syncing
//! a directory, and the startup scan of one org's segments.

use std::path::{Path, PathBuf};

use glommio::io::{BufferedFile, OpenOptions};

use super::org::{IndexEntry, OrgLog, Segment};
use super::READ_CHUNK_BYTES;
use crate::history::record;

pub(super) async fn read_whole(file: &BufferedFile, size: u64) -> Result<Vec<u8>, String> {
    let mut bytes = Vec::with_capacity(size as usize);
    while (bytes.len() as u64) < size {
        let want = ((size - bytes.len() as u64) as usize).min(READ_CHUNK_BYTES);
        let read = file
            .read_at(bytes.len() as u64, want)
            .await
            .map_err(|e| e.to_string())?;
        if read.is_empty() {
            break;
        }
        bytes.extend_from_slice(&read);
    }
    Ok(bytes)
}

/// Bytes read from a segment: the reactor's buffer itself when one read
/// returned them all (the usual case: no copy), else the pieces joined.
pub(super) enum Span {
    Whole(glommio::io::ReadResult),
    Pieces(Vec<u8>),
}

impl Span {
    pub(super) fn bytes(&self) -> &[u8] {
        match self {
            Span::Whole(read) => read,
            Span::Pieces(bytes) => bytes,
        }
    }
}

pub(super) async fn read_span(file: &BufferedFile, start: u64, span: usize) -> Span {
    let mut bytes = Vec::new();
    while bytes.len() < span {
        match file
            .read_at(start + bytes.len() as u64, span - bytes.len())
            .await
        {
            Ok(read) if read.len() == span => return Span::Whole(read),
            Ok(read) if !read.is_empty() => bytes.extend_from_slice(&read),
            _ => break,
        }
    }
    Span::Pieces(bytes)
}

pub(super) async fn open_rw(path: &Path, create: bool) -> Result<BufferedFile, String> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .buffered_open(path)
        .await
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// fsyncs a directory, so a file created (or removed) in it survives a crash.
pub(super) async fn sync_dir(path: &Path) -> Result<(), String> {
    let dir = glommio::io::Directory::open(path)
        .await
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let synced = dir
        .sync()
        .await
        .map_err(|e| format!("{}: {e}", path.display()));
    let _ = dir.close().await;
    synced
}

/// Reads one org's segments at startup.
pub(super) async fn load_org(org_id: &str, dir: PathBuf) -> Result<OrgLog, String> {
    let mut org = OrgLog::new(org_id.into(), dir.clone());
    org.dir_ready = true;
    let mut files: Vec<(u64, PathBuf)> = std::fs::read_dir(&dir)
        .map_err(|e| format!("history directory {}: {e}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let first = name.strip_suffix(".log")?.parse::<u64>().ok()?;
            Some((first, e.path()))
        })
        .collect();
    files.sort();
    let mut previous_seq = 0u64;
    for (first_seq, path) in files {
        let file = open_rw(&path, false).await?;
        let size = file
            .file_size()
            .await
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let bytes = read_whole(&file, size).await?;
        let mut segment = Segment {
            first_seq,
            path: path.clone(),
            size: 0,
            records: 0,
            last_seq: first_seq.saturating_sub(1),
            first_time_ms: 0,
        };
        let mut new_entries = Vec::new();
        let mut routes = Vec::new();
        // A segment is named after the first seq of the batch that created
        // it, so every seq below its name was handed out before: the org's
        // seq never goes below that, even when retention deleted the older
        // segments and this one is empty (a crash right after creating it).
        previous_seq = previous_seq.max(first_seq.saturating_sub(1));
        let stop = record::scan(&bytes, org_id, previous_seq, |record, offset, len| {
            if segment.records == 0 {
                segment.first_time_ms = record.time_ms;
            }
            segment.records += 1;
            segment.last_seq = record.seq;
            segment.size = (offset + len) as u64;
            routes.push(record.route.map(str::to_string));
            new_entries.push(IndexEntry {
                seq: record.seq,
                time_ms: record.time_ms,
                segment: first_seq,
                offset: offset as u64,
                len: len as u32,
                kind: record.kind,
                route: None,
            });
        });
        if let Some(stop) = stop {
            crate::log::warn(format_args!(
                "hookstream: warning: history segment {}: {} at offset {}: dropping that record and the {} byte(s) after it in this segment",
                path.display(),
                stop.error.describe(),
                stop.offset,
                bytes.len() - stop.offset
            ));
            file.truncate(stop.offset as u64)
                .await
                .map_err(|e| format!("{}: {e}", path.display()))?;
            file.fdatasync()
                .await
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        let _ = file.close().await;
        debug_assert_eq!(
            segment.size as usize,
            stop.map_or(bytes.len(), |s| s.offset)
        );
        for (mut entry, route) in new_entries.into_iter().zip(routes) {
            entry.route = org.intern_route(route.as_deref());
            org.entries.push_back(entry);
        }
        if segment.records > 0 {
            previous_seq = segment.last_seq;
        }
        org.segments.push_back(segment);
    }
    org.assigned = previous_seq;
    org.committed = previous_seq;
    org.trimmed_through = org.entries.front().map_or(previous_seq, |e| e.seq - 1);
    Ok(org)
}

pub(super) async fn write_all(
    file: &BufferedFile,
    buffer: Vec<u8>,
    offset: u64,
) -> Result<(), String> {
    let total = buffer.len();
    // A regular file takes the whole write unless the disk is full; a short
    // write fails the commit, and the next one overwrites from `offset`.
    let written = file
        .write_at(buffer, offset)
        .await
        .map_err(|e| e.to_string())?;
    if written < total {
        return Err(format!(
            "short write: {written} of {total} bytes (disk full?)"
        ));
    }
    Ok(())
}
