//! The server's log lines on stderr: plain text (the default), or with
//! `--log-format json` one JSON object per line — `ts` (RFC 3339 UTC,
//! milliseconds), `level` (`info`, `warn`, `error`), `pid` (which process:
//! two run side by side during a hot upgrade) and `msg` (the text line
//! without its `hookstream: ` prefix). A leaf: every module logs through
//! it, and it knows nothing of them.

use std::fmt::Display;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

/// Set once at startup by `--log-format json`.
static JSON: AtomicBool = AtomicBool::new(false);

/// How bad a line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Something happened as it should (listening, a reload, an upgrade).
    Info,
    /// Something was skipped or dropped; the server goes on.
    Warn,
    /// Something failed.
    Error,
}

impl Level {
    fn name(self) -> &'static str {
        match self {
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }
}

/// Chooses JSON lines (true) or plain text for the rest of the process.
pub fn set_json(json: bool) {
    JSON.store(json, Ordering::Relaxed);
}

/// True under `--log-format json`.
pub fn is_json() -> bool {
    JSON.load(Ordering::Relaxed)
}

/// The line for `text` at `level`, as it is written (without the newline).
pub fn render(level: Level, text: &str, json: bool, now: SystemTime, pid: u32) -> String {
    if !json {
        return text.to_string();
    }
    let message = text.strip_prefix("hookstream: ").unwrap_or(text);
    serde_json::json!({
        "ts": humantime::format_rfc3339_millis(now).to_string(),
        "level": level.name(),
        "pid": pid,
        "msg": message,
    })
    .to_string()
}

/// Writes one line to stderr in one `write` (lines of the shards and the
/// main thread never interleave).
pub fn line(level: Level, text: impl Display) {
    let mut out = render(
        level,
        &text.to_string(),
        is_json(),
        SystemTime::now(),
        std::process::id(),
    );
    out.push('\n');
    let _ = std::io::stderr().lock().write_all(out.as_bytes());
}

/// [`line`] at [`Level::Info`].
pub fn info(text: impl Display) {
    line(Level::Info, text)
}

/// [`line`] at [`Level::Warn`].
pub fn warn(text: impl Display) {
    line(Level::Warn, text)
}

/// [`line`] at [`Level::Error`].
pub fn error(text: impl Display) {
    line(Level::Error, text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn text_stays_as_it_is_and_json_is_one_object() {
        let at = UNIX_EPOCH + Duration::from_millis(1_765_000_000_123);
        let text = "hookstream: upgrade failed, this process serves on: \"quoted\"\nsecond";
        assert_eq!(render(Level::Warn, text, false, at, 7), text);
        let json = render(Level::Warn, text, true, at, 7);
        assert!(!json.contains('\n'), "{json}");
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value["level"], "warn");
        assert_eq!(value["pid"], 7);
        assert_eq!(value["ts"], "2025-12-06T05:46:40.123Z");
        assert_eq!(
            value["msg"],
            "upgrade failed, this process serves on: \"quoted\"\nsecond"
        );
    }
}
