//! Pure protocol code: no I/O, no runtime. Every parser takes bytes and
//! answers complete (value, bytes used), need more (`Ok(None)`), or an error
//! that maps to exactly one HTTP status or WebSocket close code.

pub mod chunked;
pub mod deflate;
pub mod http;
pub mod ws;
