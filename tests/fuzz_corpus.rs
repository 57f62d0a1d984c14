//! Replays the saved fuzz corpus (`tools/fuzz/corpus/<target>/`) through the
//! same checks as the fuzz targets, without libFuzzer, so every input that
//! once found a bug or new coverage stays a regression test under a plain
//! `cargo test`. A missing or empty corpus directory fails the test: the
//! suite must not pass by replaying nothing.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

#[path = "../tools/fuzz/src/lib.rs"]
mod checks;

/// Runs `check` on every file of the target's corpus directory and fails
/// with the names of all the files that panicked.
fn replay(target: &str, check: fn(&[u8])) {
    let dir: PathBuf = [
        env!("CARGO_MANIFEST_DIR"),
        "tools",
        "fuzz",
        "corpus",
        target,
    ]
    .iter()
    .collect();
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|error| panic!("corpus directory {} unreadable: {error}", dir.display()));
    let mut paths: Vec<PathBuf> = entries
        .map(|entry| entry.expect("corpus directory entry").path())
        .filter(|path| path.is_file())
        .collect();
    paths.sort();
    assert!(
        !paths.is_empty(),
        "corpus directory {} is empty",
        dir.display()
    );

    let mut failures = Vec::new();
    for path in &paths {
        let input = std::fs::read(path).expect("corpus file");
        if catch_unwind(AssertUnwindSafe(|| check(&input))).is_err() {
            failures.push(path.display().to_string());
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} {target} inputs failed: {failures:#?}",
        failures.len(),
        paths.len()
    );
}

#[test]
fn request_head_corpus() {
    replay("request_head", checks::check_request_head);
}

#[test]
fn frame_decoder_corpus() {
    replay("frame_decoder", checks::check_frame_decoder);
}

#[test]
fn unmask_corpus() {
    replay("unmask", checks::check_unmask);
}
