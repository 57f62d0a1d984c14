//! `fanout --probe-ms N`: one more connection, subscribed to nothing, that
//! sends a WebSocket ping every N ms while the publisher runs and times each
//! pong. It measures how long a server keeps its other connections waiting
//! while it walks a broadcast to every subscriber (head-of-line blocking).

use crate::stats::Latency;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::{self, Message};

/// Longest wait for one pong before the probe gives up.
const PONG_WAIT: Duration = Duration::from_secs(10);

/// A running probe; [`Probe::finish`] stops it and returns its figures.
pub struct Probe {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<Latency, String>>,
}

impl Probe {
    /// Connects to `url` (with `?token=`) and starts pinging every `every`.
    pub fn start(url: &str, every: Duration) -> Result<Probe, String> {
        let authority = url
            .strip_prefix("ws://")
            .ok_or_else(|| format!("probe: only ws:// URLs: {url}"))?
            .split('/')
            .next()
            .unwrap_or_default()
            .to_string();
        let stream = TcpStream::connect(&authority).map_err(|e| format!("probe connect: {e}"))?;
        stream
            .set_read_timeout(Some(PONG_WAIT))
            .map_err(|e| format!("probe: {e}"))?;
        stream
            .set_nodelay(true)
            .map_err(|e| format!("probe: {e}"))?;
        let (mut socket, _) =
            tungstenite::client(url, stream).map_err(|e| format!("probe upgrade: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut rtt = Latency::new();
            let mut n: u64 = 0;
            while !stopped.load(Ordering::Relaxed) {
                n += 1;
                let payload = n.to_be_bytes();
                let sent = Instant::now();
                socket
                    .send(Message::Ping(payload.to_vec().into()))
                    .map_err(|e| format!("probe ping: {e}"))?;
                loop {
                    match socket.read().map_err(|e| format!("probe read: {e}"))? {
                        Message::Pong(p) if p.as_ref() == payload => break,
                        Message::Close(c) => return Err(format!("probe closed: {c:?}")),
                        _ => {}
                    }
                }
                rtt.record(sent.elapsed().as_micros() as u64);
                std::thread::sleep(every);
            }
            let _ = socket.close(None);
            Ok(rtt)
        });
        Ok(Probe { stop, thread })
    }

    /// Stops the probe; its ping→pong round trips.
    pub fn finish(self) -> Result<Latency, String> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| "probe thread panicked".to_string())?
    }
}
