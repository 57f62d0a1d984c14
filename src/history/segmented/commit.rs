//! One commit round on disk: group the round by org, roll segments that are
//! full or old, write every org's part concurrently, fsync the files (and
//! new directories) touched, then index the records.

use std::path::PathBuf;
use std::rc::Rc;

use ahash::AHashMap;
use glommio::io::BufferedFile;

use super::files::{open_rw, sync_dir, write_all};
use super::org::{IndexEntry, Segment};
use super::SegmentedLog;
use crate::history::{now_ms, record, Durability, HistoryConfig};
use crate::message::Message;

/// Largest segment file before a new one is started.
pub(super) const SEGMENT_BYTES_MAX: u64 = 64 << 20;

/// Records per segment: a tenth of what an org keeps, so retention by
/// count deletes files in steps of about 10 %.
pub(super) fn segment_records_max(config: &HistoryConfig) -> u64 {
    (config.messages_max / 10).clamp(1, 1 << 20)
}

/// Age of a segment's first record past which a new segment starts, so
/// retention by age also deletes files in steps of about 10 %.
pub(super) fn segment_age_ms(config: &HistoryConfig) -> u64 {
    (config.age_ms / 10).max(1)
}

/// A message of a round being committed, with the seq the log gave it.
pub(super) struct Numbered<'a> {
    /// The message.
    pub(super) message: &'a Message,
    /// Its seq.
    pub(super) seq: u64,
    /// Its publish time.
    pub(super) time_ms: u64,
}

/// Writes one batch and makes it durable; on success indexes it.
pub(super) async fn commit(history: &SegmentedLog, records: &[Numbered<'_>]) -> Result<(), String> {
    // Group by org, keeping order.
    let mut by_org: Vec<(Rc<str>, Vec<&Numbered<'_>>)> = Vec::new();
    let mut position: AHashMap<&str, usize> = AHashMap::new();
    for record in records {
        let org_id = record.message.org_id.as_str();
        match position.get(org_id) {
            Some(&at) => by_org[at].1.push(record),
            None => {
                position.insert(org_id, by_org.len());
                by_org.push((org_id.into(), vec![record]));
            }
        }
    }
    let fsync = history.config.durability == Durability::Fsync;
    let mut to_sync: Vec<Rc<BufferedFile>> = Vec::new();
    let mut dirs_to_sync: Vec<PathBuf> = Vec::new();
    // (org, segment first_seq, offset of the batch in the segment)
    let mut written: Vec<(Rc<str>, u64, u64)> = Vec::new();
    let mut bytes_total = 0u64;
    // Prepare and encode every org's part, then write them all at once.
    let mut parts: Vec<(Rc<BufferedFile>, u64, u64)> = Vec::with_capacity(by_org.len());
    let mut writes = Vec::with_capacity(by_org.len());
    for (org_id, list) in &by_org {
        let first_seq = list[0].seq;
        let (writer, offset, segment_first) = prepare_segment(
            history,
            org_id,
            first_seq,
            list[0].time_ms,
            &mut dirs_to_sync,
        )
        .await?;
        let mut buffer = Vec::with_capacity(
            list.iter()
                .map(|r| {
                    record::encoded_len(org_id, r.message.route_id.as_deref(), &r.message.data)
                })
                .sum(),
        );
        for record in list {
            record::encode(
                &mut buffer,
                &record::Record {
                    seq: record.seq,
                    time_ms: record.time_ms,
                    kind: record.message.kind,
                    org: org_id,
                    route: record.message.route_id.as_deref(),
                    data: &record.message.data,
                },
            );
        }
        written.push((org_id.clone(), segment_first, offset));
        parts.push((writer.clone(), offset, buffer.len() as u64));
        // Started now, awaited below: the writes of all orgs overlap.
        writes.push(glommio::spawn_local(async move {
            write_all(&writer, buffer, offset).await
        }));
    }
    let mut failure = None;
    for write in writes {
        if let Err(e) = write.await {
            failure = Some(e);
        }
    }
    if let Some(e) = failure {
        // No segment size moved: the next commit writes over the same offsets.
        return Err(format!("writing history: {e}"));
    }
    {
        let now = now_ms();
        let mut orgs = history.orgs.borrow_mut();
        for ((org_id, _), (_, offset, len)) in by_org.iter().zip(&parts) {
            let org = orgs.get_mut(&**org_id).expect("prepared");
            let segment = org.segments.back_mut().expect("prepared");
            segment.size = offset + len;
            org.last_write_ms = now;
            bytes_total += len;
        }
    }
    if fsync {
        to_sync.extend(parts.into_iter().map(|(writer, _, _)| writer));
    }
    if fsync {
        let mut tasks = Vec::new();
        for dir in dirs_to_sync {
            tasks.push(glommio::spawn_local(async move { sync_dir(&dir).await }));
        }
        let fsyncs = to_sync.len() as u64;
        for file in to_sync {
            tasks.push(glommio::spawn_local(async move {
                file.fdatasync().await.map_err(|e| e.to_string())
            }));
        }
        let mut failure = None;
        for task in tasks {
            if let Err(e) = task.await {
                failure = Some(e);
            }
        }
        history.bump(|c| c.fsyncs += fsyncs);
        if let Some(e) = failure {
            return Err(format!("fdatasync of history: {e}"));
        }
    }
    history.bump(|c| {
        c.commits += 1;
        c.records += records.len() as u64;
        c.bytes += bytes_total;
    });
    // Durable: index it.
    let now = now_ms();
    let mut orgs = history.orgs.borrow_mut();
    let mut deleted = Vec::new();
    for ((org_id, list), (_, segment_first, mut offset)) in by_org.iter().zip(written) {
        let org = orgs.get_mut(&**org_id).expect("prepared");
        for record in list {
            let len = record::encoded_len(
                org_id,
                record.message.route_id.as_deref(),
                &record.message.data,
            );
            let route = org.intern_route(record.message.route_id.as_deref());
            org.entries.push_back(IndexEntry {
                seq: record.seq,
                time_ms: record.time_ms,
                segment: segment_first,
                offset,
                len: len as u32,
                kind: record.message.kind,
                route,
            });
            offset += len as u64;
            org.remember(record.seq, record.message.data.as_ref().into());
            org.committed = record.seq;
            let segment = org.segments.back_mut().expect("prepared");
            if segment.records == 0 {
                segment.first_time_ms = record.time_ms;
            }
            segment.records += 1;
            segment.last_seq = record.seq;
        }
        if org.entries.len() as u64 > history.config.messages_max {
            deleted.extend(org.trim(&history.config, now));
        }
    }
    drop(orgs);
    for path in deleted {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// Makes sure the org has a directory and an active segment with room,
/// starting a new segment (named `first_seq`) when the last one is full or
/// old. Returns the writer, the offset to write at and the segment's name.
pub(super) async fn prepare_segment(
    history: &SegmentedLog,
    org_id: &Rc<str>,
    first_seq: u64,
    time_ms: u64,
    dirs_to_sync: &mut Vec<PathBuf>,
) -> Result<(Rc<BufferedFile>, u64, u64), String> {
    let (dir, dir_ready, roll, writer, path) = {
        let mut orgs = history.orgs.borrow_mut();
        let org = history.org_entry(&mut orgs, org_id);
        let roll = match org.segments.back() {
            None => true,
            Some(segment) => {
                segment.size >= SEGMENT_BYTES_MAX
                    || segment.records >= segment_records_max(&history.config)
                    || (segment.records > 0
                        && time_ms.saturating_sub(segment.first_time_ms)
                            >= segment_age_ms(&history.config))
            }
        };
        let path = if roll {
            org.segment_path(first_seq)
        } else {
            org.segments.back().expect("not rolling").path.clone()
        };
        (
            org.dir.clone(),
            org.dir_ready,
            roll,
            org.writer.clone(),
            path,
        )
    };
    if !dir_ready {
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        dirs_to_sync.push(history.config.dir.clone());
        history
            .orgs
            .borrow_mut()
            .get_mut(&**org_id)
            .expect("created")
            .dir_ready = true;
    }
    if !roll {
        if let Some(writer) = writer {
            let orgs = history.orgs.borrow();
            let org = orgs.get(&**org_id).expect("created");
            let segment = org.segments.back().expect("not rolling");
            return Ok((writer, segment.size, segment.first_seq));
        }
        // Reopen the last segment (after a restart) for appending.
        let file = Rc::new(open_rw(&path, false).await?);
        let mut orgs = history.orgs.borrow_mut();
        let org = orgs.get_mut(&**org_id).expect("created");
        org.writer = Some(file.clone());
        let segment = org.segments.back().expect("not rolling");
        return Ok((file, segment.size, segment.first_seq));
    }
    let file = Rc::new(open_rw(&path, true).await?);
    dirs_to_sync.push(dir);
    let old = {
        let mut orgs = history.orgs.borrow_mut();
        let org = orgs.get_mut(&**org_id).expect("created");
        org.segments.push_back(Segment {
            first_seq,
            path,
            size: 0,
            records: 0,
            last_seq: first_seq - 1,
            first_time_ms: time_ms,
        });
        org.writer.replace(file.clone())
    };
    if let Some(old) = old {
        // Written records of the old segment were synced by their commit.
        if let Ok(old) = Rc::try_unwrap(old) {
            let _ = old.close().await;
        }
    }
    Ok((file, 0, first_seq))
}
