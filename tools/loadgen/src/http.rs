//! The publisher: `POST /v1/publish` over one keep-alive HTTP/1.1
//! connection, at a fixed rate, each message carrying its send time.

use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::MissedTickBehavior;

use crate::stats::{monotonic_ns, Latency};

/// What the publisher did.
pub struct PublishOutcome {
    /// Messages the server accepted (sum of `accepted`).
    pub accepted: u64,
    /// Requests made.
    pub requests: u64,
    /// Requests that failed or were not answered 202.
    pub errors: u64,
    /// The first failure, if any.
    pub first_error: Option<String>,
    /// CLOCK_MONOTONIC of the first send.
    pub first_send_ns: u64,
    /// Time from the first send to the last answer.
    pub elapsed: Duration,
    /// Request round trips in microseconds.
    pub request_us: Latency,
}

/// Publishes `rate` messages/s in requests of `batch` messages for
/// `duration`, over `publishers` keep-alive connections each offering an
/// equal share with staggered ticks. On each connection a request that
/// takes longer than its interval delays the next one (missed ticks are
/// skipped, not bunched): the achieved rate is then below the offered one,
/// and the result line says so.
#[allow(clippy::too_many_arguments)]
pub fn publish_for(
    admin_url: &str,
    admin_token: &str,
    org: &str,
    rate: f64,
    batch: usize,
    payload: usize,
    duration: Duration,
    publishers: usize,
) -> Result<PublishOutcome, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let publishers = publishers.max(1);
    let share = rate / publishers as f64;
    let stagger = Duration::from_secs_f64(batch as f64 / rate);
    let outcomes = runtime.block_on(futures_util::future::join_all((0..publishers).map(|i| {
        let delay = stagger * i as u32;
        async move {
            tokio::time::sleep(delay).await;
            run(admin_url, admin_token, org, share, batch, payload, duration).await
        }
    })));
    let mut outcomes = outcomes.into_iter().collect::<Result<Vec<_>, String>>()?;
    let first_ns = outcomes.iter().map(|o| o.first_send_ns).min().unwrap_or(0);
    let end_ns = outcomes
        .iter()
        .map(|o| o.first_send_ns + o.elapsed.as_nanos() as u64)
        .max()
        .unwrap_or(0);
    let mut total = outcomes.pop().ok_or("no publisher")?;
    for outcome in outcomes {
        total.accepted += outcome.accepted;
        total.requests += outcome.requests;
        total.errors += outcome.errors;
        if total.first_error.is_none() {
            total.first_error = outcome.first_error;
        }
        total.request_us.add(&outcome.request_us);
    }
    total.first_send_ns = first_ns;
    total.elapsed = Duration::from_nanos(end_ns.saturating_sub(first_ns));
    Ok(total)
}

/// Publishes `count` messages in one request; returns their seqs.
pub fn publish_once(
    admin_url: &str,
    admin_token: &str,
    org: &str,
    count: usize,
    payload: usize,
) -> Result<Vec<u64>, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let host = admin_url
            .strip_prefix("http://")
            .ok_or("--admin-url must start with http://")?
            .trim_end_matches('/')
            .to_string();
        let mut client = Client::connect(&host, admin_token).await?;
        let mut body = vec![b'['];
        for i in 0..count {
            if i > 0 {
                body.push(b',');
            }
            message(&mut body, org, monotonic_ns(), payload);
        }
        body.push(b']');
        match client.post(&body).await? {
            (202, answer) => {
                let value: Value = serde_json::from_slice(&answer).map_err(|e| e.to_string())?;
                let seqs: Vec<u64> = value["seqs"]
                    .as_array()
                    .map(|seqs| seqs.iter().filter_map(Value::as_u64).collect())
                    .unwrap_or_default();
                if seqs.len() != count {
                    return Err(format!("publish answered {value}"));
                }
                Ok(seqs)
            }
            (status, answer) => Err(format!(
                "publish: status {status}: {}",
                String::from_utf8_lossy(&answer)
            )),
        }
    })
}

#[allow(clippy::too_many_arguments)]
async fn run(
    admin_url: &str,
    admin_token: &str,
    org: &str,
    rate: f64,
    batch: usize,
    payload: usize,
    duration: Duration,
) -> Result<PublishOutcome, String> {
    let host = admin_url
        .strip_prefix("http://")
        .ok_or("--admin-url must start with http://")?
        .trim_end_matches('/')
        .to_string();
    let mut client = Client::connect(&host, admin_token).await?;
    let interval_s = batch as f64 / rate;
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(interval_s));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let requests_max = ((duration.as_secs_f64() / interval_s).round() as u64).max(1);
    let mut outcome = PublishOutcome {
        accepted: 0,
        requests: 0,
        errors: 0,
        first_error: None,
        first_send_ns: 0,
        elapsed: Duration::ZERO,
        request_us: Latency::new(),
    };
    let deadline = Instant::now() + duration;
    let start = Instant::now();
    let mut body = Vec::with_capacity(batch * (payload + 64) + 2);
    while outcome.requests < requests_max && Instant::now() < deadline {
        ticker.tick().await;
        body.clear();
        let now = monotonic_ns();
        if outcome.requests == 0 {
            outcome.first_send_ns = now;
        }
        if batch > 1 {
            body.push(b'[');
        }
        for i in 0..batch {
            if i > 0 {
                body.push(b',');
            }
            message(&mut body, org, now, payload);
        }
        if batch > 1 {
            body.push(b']');
        }
        outcome.requests += 1;
        let sent = Instant::now();
        match client.post(&body).await {
            Ok((202, answer)) => {
                outcome.request_us.record(sent.elapsed().as_micros() as u64);
                let accepted = serde_json::from_slice::<Value>(&answer)
                    .ok()
                    .and_then(|v| v["accepted"].as_u64())
                    .unwrap_or(0);
                outcome.accepted += accepted;
                if accepted != batch as u64 {
                    outcome.errors += 1;
                    outcome
                        .first_error
                        .get_or_insert_with(|| format!("accepted {accepted} of {batch}"));
                }
            }
            Ok((status, answer)) => {
                outcome.errors += 1;
                outcome.first_error.get_or_insert_with(|| {
                    format!("status {status}: {}", String::from_utf8_lossy(&answer))
                });
            }
            Err(e) => {
                outcome.errors += 1;
                outcome.first_error.get_or_insert_with(|| e.clone());
                client = Client::connect(&host, admin_token).await?;
            }
        }
    }
    outcome.elapsed = start.elapsed();
    Ok(outcome)
}

/// One message whose `data` JSON is `payload` bytes long (or as short as
/// its fixed fields allow) with the send time `t` in nanoseconds.
/// The `--data-file` object, sent as `data.sample` instead of padding.
pub static SAMPLE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn message(out: &mut Vec<u8>, org: &str, t: u64, payload: usize) {
    out.extend_from_slice(b"{\"org_id\":\"");
    out.extend_from_slice(org.as_bytes());
    out.extend_from_slice(b"\",\"type\":\"event\",\"data\":");
    if let Some(sample) = SAMPLE.get() {
        out.extend_from_slice(format!("{{\"source_id\":\"s\",\"t\":{t},\"sample\":").as_bytes());
        out.extend_from_slice(sample.as_bytes());
        out.extend_from_slice(b"}}");
        return;
    }
    let head = format!("{{\"source_id\":\"s\",\"t\":{t},\"pad\":\"");
    let fixed = head.len() + 2;
    out.extend_from_slice(head.as_bytes());
    out.resize(out.len() + payload.saturating_sub(fixed), b'x');
    out.extend_from_slice(b"\"}}");
}

/// A minimal HTTP/1.1 keep-alive client for one host.
struct Client {
    stream: TcpStream,
    head: String,
    buffer: Vec<u8>,
}

impl Client {
    async fn connect(host: &str, token: &str) -> Result<Client, String> {
        let stream = TcpStream::connect(host)
            .await
            .map_err(|e| format!("connect {host}: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let head = format!(
            "POST /v1/publish HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: "
        );
        Ok(Client {
            stream,
            head,
            buffer: Vec::with_capacity(1 << 16),
        })
    }

    /// Sends one request; returns the status and the body.
    async fn post(&mut self, body: &[u8]) -> Result<(u16, Vec<u8>), String> {
        let mut request = Vec::with_capacity(self.head.len() + 16 + body.len());
        request.extend_from_slice(self.head.as_bytes());
        request.extend_from_slice(format!("{}\r\n\r\n", body.len()).as_bytes());
        request.extend_from_slice(body);
        self.stream
            .write_all(&request)
            .await
            .map_err(|e| format!("send: {e}"))?;
        self.buffer.clear();
        let mut chunk = [0u8; 8192];
        loop {
            if let Some(end) = find(&self.buffer, b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buffer[..end]).map_err(|e| e.to_string())?;
                let status: u16 = head
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .ok_or("bad status line")?;
                let length: usize = head
                    .lines()
                    .find_map(|l| {
                        let (name, value) = l.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                let total = end + 4 + length;
                while self.buffer.len() < total {
                    let n = self
                        .stream
                        .read(&mut chunk)
                        .await
                        .map_err(|e| format!("read: {e}"))?;
                    if n == 0 {
                        return Err("connection closed mid-answer".to_string());
                    }
                    self.buffer.extend_from_slice(&chunk[..n]);
                }
                return Ok((status, self.buffer[end + 4..total].to_vec()));
            }
            let n = self
                .stream
                .read(&mut chunk)
                .await
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("connection closed before an answer".to_string());
            }
            self.buffer.extend_from_slice(&chunk[..n]);
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(haystack, needle)
}
