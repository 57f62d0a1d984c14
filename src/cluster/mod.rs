//! Cluster mode (`--nats-url`): the bridge between the glommio shards and
//! NATS JetStream, where every org's history is one stream shared by all
//! gateway nodes.
//!
//! async-nats needs tokio; the shards run glommio, one executor per core,
//! and never block. So the process runs one tokio runtime (current-thread)
//! on a thread of its own, `nats`, which holds the NATS connection. A shard
//! asks it for something by spawning a task on that runtime through its
//! `Handle` (thread-safe, never blocks) and awaits the answer on a
//! `futures_channel::oneshot`, which a glommio task can await. What NATS
//! pushes (a followed org's new messages) goes the other way through the
//! shards' inboxes (`shard::mesh`, a mutex-guarded queue and an eventfd):
//! the bridge is given one function, [`Deliver`], that queues a
//! [`FollowEvent`] for a shard. No shard ever waits on a lock the tokio
//! thread holds across an await.
//!
//! Layout in JetStream (see docs/ARCHITECTURE.md, Cluster):
//! - one stream per org, named `HS_<org>`, subjects `hs.<org>.>`;
//! - a message's subject is `hs.<org>.<type>.<route>` (`~` when it has no
//!   route id); ids are escaped for NATS tokens by [`token`];
//! - the stream sequence is the org's `seq`; `--history-messages` and
//!   `--history-age` are the stream's limits;
//! - `idempotency_key` is the `Nats-Msg-Id` header: JetStream's duplicate
//!   window (2 minutes, or the history age when shorter) answers a retry
//!   with the original seq and stores nothing.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use futures_lite::StreamExt;

use crate::message::{Message, MessageKind};

/// The idempotency window: how long JetStream remembers a message id.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// How long one JetStream request may take before the node answers 503.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a whole publish request may wait for JetStream before it is
/// answered 503.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

/// Most messages a history read looks at per request (matching or not): a
/// read that stops there says how far it looked, and the reader goes on.
const SCAN_MAX: u64 = 10_000;

/// Messages per fetch from a read consumer.
const FETCH_BATCH: usize = 256;

/// Room in a bounded fetch's byte bound for a message's subject and
/// headers beside its payload.
const FETCH_BYTES_SLACK: usize = 64 << 10;

/// Most messages handed to a shard in one event.
const ARRIVAL_BATCH: usize = 512;

/// While a follower's consumer is being created (which waits for the
/// JetStream meta leader), what was published is read by direct gets this
/// often.
const CREATE_CATCH_UP: Duration = Duration::from_secs(1);

/// A follower's watchdog: the last seq it handed over, and the signal to
/// start its consumer again.
struct Liveness {
    progress: Arc<AtomicU64>,
    kick: Arc<tokio::sync::Notify>,
}

/// A message read from an org's stream (live or history).
#[derive(Debug)]
pub struct Arrival {
    /// Its seq (the stream sequence).
    pub seq: u64,
    /// When the stream stored it (ms since the Unix epoch).
    pub time_ms: u64,
    /// The message.
    pub message: Message,
}

/// What the bridge tells the shard that follows an org.
#[derive(Debug)]
pub enum FollowEvent {
    /// The follow started: the stream's first and last seq at that moment
    /// (every later message comes as [`FollowEvent::Arrived`]), or why not.
    Followed {
        /// The org.
        org: String,
        /// Which follow of this org (a released and renewed follow has a
        /// new one; events of an older one are ignored).
        generation: u64,
        /// `(first, last)` seq of the stream, or the error.
        result: Result<(u64, u64), String>,
    },
    /// New messages of the org, in seq order, contiguous after the last
    /// one sent (the follower backfills from the stream on a jump).
    Arrived {
        /// The org.
        org: String,
        /// Which follow.
        generation: u64,
        /// The messages.
        batch: Vec<Arrival>,
    },
    /// Retention moved the stream's first seq.
    Trimmed {
        /// The org.
        org: String,
        /// Which follow.
        generation: u64,
        /// The highest seq retention dropped.
        through: u64,
    },
}

/// Queues an event for a shard (its inbox).
pub type Deliver = Arc<dyn Fn(usize, FollowEvent) + Send + Sync>;

/// Why a publish was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishError {
    /// NATS or the stream is not reachable (503 with Retry-After).
    Unavailable(String),
}

impl std::fmt::Display for PublishError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PublishError::Unavailable(e) => write!(f, "unavailable: {e}"),
        }
    }
}

/// A history read's answer from the stream.
#[derive(Debug, Default)]
pub struct Read {
    /// The matching messages, oldest first.
    pub messages: Vec<Arrival>,
    /// The seq up to which the stream was looked at.
    pub looked_upto: u64,
    /// The stream's first seq when the read saw it (for `recovered`).
    pub first_seq: Option<u64>,
}

/// Stream limits of every org stream.
#[derive(Debug, Clone, Copy)]
pub struct StreamLimits {
    /// `--history-messages`.
    pub messages_max: u64,
    /// `--history-age`, in ms.
    pub age_ms: u64,
    /// `--nats-replicas`.
    pub replicas: usize,
}

/// The bridge: the NATS connection on its tokio thread, shared by every
/// shard.
pub struct Bridge {
    runtime: tokio::runtime::Handle,
    client: async_nats::Client,
    js: jetstream::Context,
    limits: StreamLimits,
    /// `--session-ttl-secs`: how long a sign-out is kept.
    session_ttl_secs: u64,
    /// Orgs whose stream is known to exist.
    ensured: Mutex<HashSet<String>>,
    /// Running follows: org → (generation, the tasks to stop).
    follows: Mutex<HashMap<String, (u64, Vec<tokio::task::AbortHandle>)>>,
    generation: AtomicU64,
    deliver: OnceLock<Deliver>,
    /// Counts (re)connections to NATS: every follower restarts its
    /// consumer from its last seq at once when it moves, instead of
    /// waiting for the consumer's missed heartbeats.
    connections: tokio::sync::watch::Receiver<u64>,
}

/// Escapes an org or route id for a NATS subject token and a stream name:
/// `[A-Za-z0-9_-]` as is, every other byte as `~` and two hex digits.
pub fn token(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("~{b:02x}"));
        }
    }
    out
}

/// The inverse of [`token`] (None for what [`token`] never makes).
pub fn untoken(token: &str) -> Option<String> {
    let bytes = token.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'~' {
            let hex = token.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The stream of an org.
pub fn stream_name(org: &str) -> String {
    format!("HS_{}", token(org))
}

/// The subject of a message.
pub fn subject_of(message: &Message) -> String {
    let route = message
        .route_id
        .as_deref()
        .map_or_else(|| "~".to_string(), token);
    format!(
        "hs.{}.{}.{}",
        token(&message.org_id),
        message.kind.as_str(),
        route
    )
}

/// The message a stored subject and payload stand for.
fn message_of(org: &str, subject: &str, payload: &[u8]) -> Option<Message> {
    let mut parts = subject.split('.');
    let (Some("hs"), Some(_), Some(kind), Some(route), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return None;
    };
    let kind = MessageKind::parse(kind)?;
    let route_id = if route == "~" {
        None
    } else {
        Some(untoken(route)?)
    };
    let data = std::str::from_utf8(payload).ok()?;
    Some(Message {
        org_id: org.to_string(),
        kind,
        route_id,
        data: data.into(),
        idempotency_key: None,
    })
}

fn arrival_of(org: &str, message: &jetstream::Message) -> Option<Arrival> {
    let info = message.info().ok()?;
    let seq = info.stream_sequence;
    let time_ms = (info.published.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
    let message = message_of(org, message.subject.as_str(), &message.payload)?;
    Some(Arrival {
        seq,
        time_ms,
        message,
    })
}

/// How often the key and sign-out watches ask for what is new.
const WATCH_POLL: Duration = Duration::from_millis(250);

/// Core NATS subjects (no JetStream) on which a key revocation and a
/// sign-out are also announced as they are made: every node acts on them
/// at once, also while JetStream elects a stream leader (seconds after a
/// NATS server is lost), when the record itself cannot be stored yet. The
/// stored record stays the truth (a node that missed the announcement
/// takes it from the stream); an announcement only ever takes access away.
const NOW_REVOKED: &str = "hs_now.revoked_key";
const NOW_SIGNED_OUT: &str = "hs_now.signed_out";

/// How often a node's key file is looked at for revocations to announce.
const ANNOUNCE_POLL: Duration = Duration::from_millis(100);

/// The first message of `stream` with seq `from` or above on `subject`
/// (wildcards allowed), as (seq, payload); `None` when there is none yet.
/// A direct get: any server holding the stream answers it, with no
/// consumer (whose creation waits for the JetStream meta leader, and which
/// may go silent with a lost NATS server). A replica that lags answers
/// "none yet"; the next ask goes on.
async fn next_on(
    stream: &stream::Stream,
    subject: &str,
    from: u64,
) -> Result<Option<(u64, bytes::Bytes)>, String> {
    let asked = tokio::time::timeout(
        REQUEST_TIMEOUT,
        stream.direct_get_next_for_subject(subject, Some(from)),
    )
    .await
    .map_err(|_| format!("no answer within {REQUEST_TIMEOUT:?}"))?;
    match asked {
        Ok(message) => {
            // Parsed as a direct get by seq is (Nats-Sequence and the rest).
            let message = jetstream::message::StreamMessage::try_from(message.message)
                .map_err(|e| format!("a direct get's answer: {e}"))?;
            Ok(Some((message.sequence, message.payload)))
        }
        Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// Records a sign-out (a [`SignOut`] as JSON) of another node in this
/// node's list, unless it is known already.
async fn take_sign_out(revoked: &Arc<crate::auth::revoked::Revocations>, payload: &[u8]) {
    let Ok(sign_out) = serde_json::from_slice::<SignOut>(payload) else {
        return;
    };
    let Ok(id) = u128::from_str_radix(&sign_out.id, 16) else {
        return;
    };
    // A key id is one token of the signed-out sessions file: one that is
    // not (spaces, line breaks) could write lines of its own there.
    if !crate::message::is_valid_id(&sign_out.key_id) {
        return;
    }
    if revoked.is_revoked(id, &sign_out.key_id, sign_out.expires) {
        return;
    }
    let now = crate::auth::sessions::now_unix_secs();
    let pending = revoked.revoke(id, &sign_out.key_id, sign_out.expires, now);
    let revoked = revoked.clone();
    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || revoked.persist(pending, now)).await {
        eprintln!("hookstream: cluster: a sign-out of another node was not saved: {e}");
    }
}

/// The set behind `known`, also after a panic elsewhere.
fn lock(known: &Mutex<HashSet<String>>) -> std::sync::MutexGuard<'_, HashSet<String>> {
    known.lock().unwrap_or_else(|e| e.into_inner())
}

/// Merges key records of other nodes into this node's key file
/// (`KeyStore::merge`), on a blocking thread (it writes and fsyncs).
async fn merge_keys(
    data_dir: &std::path::Path,
    records: Vec<crate::auth::keys::KeyRecord>,
) -> Result<(), String> {
    let dir = data_dir.to_path_buf();
    tokio::task::spawn_blocking(move || crate::auth::keys::KeyStore::new(&dir).merge(&records))
        .await
        .map_err(|e| e.to_string())?
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Announces `payload` on the core NATS subject `subject` (see
/// [`NOW_REVOKED`]); a failure is left to the stored record.
async fn announce(client: &async_nats::Client, subject: &'static str, payload: Vec<u8>) {
    if client.publish(subject, payload.into()).await.is_ok() {
        let _ = tokio::time::timeout(REQUEST_TIMEOUT, client.flush()).await;
    }
}

/// Takes the announcements on `subject` for the life of the process,
/// handing each payload to `take`.
async fn listen<F, Fut>(client: async_nats::Client, subject: &'static str, take: F)
where
    F: Fn(bytes::Bytes) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    loop {
        // Subscribed again by the client after a reconnect.
        if let Ok(mut announcements) = client.subscribe(subject).await {
            while let Some(message) = announcements.next().await {
                take(message.payload).await;
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// An ordered consumer of `stream` from seq `start_sequence` on, and its
/// messages.
async fn ordered_from(
    stream: &stream::Stream,
    start_sequence: u64,
) -> Result<consumer::pull::Ordered, String> {
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::ByStartSequence { start_sequence },
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    consumer.messages().await.map_err(|e| e.to_string())
}

/// True when the error says the stream does not exist (the org never
/// published).
fn no_stream(error: &jetstream::context::GetStreamError) -> bool {
    matches!(
        error.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(e)
            if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

impl Bridge {
    /// Starts the `nats` thread and its runtime and begins connecting to
    /// `urls`. Returns at once: a NATS server that is not reachable yet is
    /// retried in the background ([`Bridge::connected`] says when it is).
    pub fn start(
        urls: &[String],
        limits: StreamLimits,
        session_ttl_secs: u64,
    ) -> Result<Arc<Bridge>, String> {
        let (tx, rx) = std::sync::mpsc::channel();
        let urls = urls.to_vec();
        std::thread::Builder::new()
            .name("nats".to_string())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = tx.send(Err(format!("cannot start the NATS runtime: {e}")));
                        return;
                    }
                };
                let handle = runtime.handle().clone();
                let (connections_tx, connections) = tokio::sync::watch::channel(0u64);
                let connections_tx = Arc::new(connections_tx);
                runtime.block_on(async move {
                    let logged = Arc::new(std::sync::atomic::AtomicBool::new(false));
                    let options = async_nats::ConnectOptions::new()
                        .name("hookstream")
                        .retry_on_initial_connect()
                        .max_reconnects(None)
                        // Back within a second or two of a NATS server
                        // returning (the default backs off to 4 s).
                        .reconnect_delay_callback(|attempts| {
                            Duration::from_millis((attempts as u64 * 250).min(2_000))
                        })
                        .connection_timeout(Duration::from_secs(2))
                        .event_callback(move |event| {
                            let logged = logged.clone();
                            let connections_tx = connections_tx.clone();
                            async move {
                                match event {
                                    async_nats::Event::Connected => {
                                        logged.store(false, Ordering::Relaxed);
                                        connections_tx.send_modify(|n| *n += 1);
                                        eprintln!("hookstream: cluster: connected to NATS");
                                    }
                                    async_nats::Event::Disconnected => {
                                        eprintln!("hookstream: cluster: NATS connection lost, reconnecting; publishes answer 503 meanwhile");
                                    }
                                    async_nats::Event::ClientError(e)
                                        if !logged.swap(true, Ordering::Relaxed) =>
                                    {
                                        eprintln!("hookstream: cluster: NATS not reachable ({e}); not ready, still trying");
                                    }
                                    _ => {}
                                }
                            }
                        });
                    match options.connect(urls.as_slice()).await {
                        Ok(client) => {
                            let _ = tx.send(Ok((handle, client, connections)));
                            // The runtime lives as long as the process.
                            std::future::pending::<()>().await;
                        }
                        Err(e) => {
                            let _ = tx.send(Err(format!("NATS {}: {e}", urls.join(","))));
                        }
                    }
                });
            })
            .map_err(|e| format!("cannot start the NATS thread: {e}"))?;
        let (runtime, client, connections) = rx
            .recv()
            .map_err(|_| "the NATS thread stopped".to_string())??;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(REQUEST_TIMEOUT);
        Ok(Arc::new(Bridge {
            runtime,
            client,
            js,
            limits,
            session_ttl_secs,
            ensured: Mutex::new(HashSet::new()),
            follows: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(1),
            deliver: OnceLock::new(),
            connections,
        }))
    }

    /// Sets where follow events go (the shards' inboxes); once.
    pub fn set_deliver(&self, deliver: Deliver) {
        let _ = self.deliver.set(deliver);
    }

    /// True while the NATS connection is up.
    pub fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    fn stream_config(&self, org: &str) -> stream::Config {
        Bridge::stream_config_for(org, self.limits)
    }

    /// An org's stream, with these limits.
    fn stream_config_for(org: &str, limits: StreamLimits) -> stream::Config {
        let age = Duration::from_millis(limits.age_ms);
        stream::Config {
            name: stream_name(org),
            subjects: vec![format!("hs.{}.>", token(org))],
            max_messages: i64::try_from(limits.messages_max).unwrap_or(i64::MAX),
            max_age: age,
            num_replicas: limits.replicas,
            duplicate_window: DUPLICATE_WINDOW.min(age),
            storage: stream::StorageType::File,
            discard: stream::DiscardPolicy::Old,
            allow_direct: true,
            ..Default::default()
        }
    }

    /// The org's stream, created with the node's limits when missing.
    async fn ensure_stream(&self, org: &str) -> Result<stream::Stream, String> {
        let known = self
            .ensured
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(org);
        let stream = if known {
            self.js
                .get_stream(stream_name(org))
                .await
                .map_err(|e| e.to_string())
        } else {
            self.js
                .get_or_create_stream(self.stream_config(org))
                .await
                .map_err(|e| e.to_string())
        };
        match stream {
            Ok(stream) => {
                self.ensured
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(org.to_string());
                Ok(stream)
            }
            Err(e) => {
                self.ensured
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(org);
                Err(e)
            }
        }
    }

    /// Publishes `messages` to their orgs' streams, in order, and answers
    /// their seqs once JetStream acknowledged every one (a retried
    /// `idempotency_key` answers the original seq).
    pub fn publish(
        self: &Arc<Self>,
        messages: Vec<Message>,
    ) -> futures_channel::oneshot::Receiver<Result<Vec<u64>, PublishError>> {
        let (reply, answer) = futures_channel::oneshot::channel();
        let bridge = self.clone();
        self.runtime.spawn(async move {
            let _ = reply.send(bridge.publish_now(messages).await);
        });
        answer
    }

    async fn publish_now(&self, messages: Vec<Message>) -> Result<Vec<u64>, PublishError> {
        if !self.connected() {
            return Err(PublishError::Unavailable(
                "not connected to NATS".to_string(),
            ));
        }
        // One bound for the whole request, so a publisher hears 503 within
        // it whatever JetStream is going through (a leader election).
        match tokio::time::timeout(PUBLISH_TIMEOUT, self.publish_in_order(&messages)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(PublishError::Unavailable(format!(
                "no JetStream acknowledgement within {PUBLISH_TIMEOUT:?}"
            ))),
        }
    }

    async fn publish_in_order(&self, messages: &[Message]) -> Result<Vec<u64>, PublishError> {
        let unavailable = |e: String| PublishError::Unavailable(e);
        // Streams not known to exist are made first; a known one costs no
        // request (a stream deleted by hand is made again after the
        // publish that finds it missing).
        let mut orgs: Vec<&str> = messages
            .iter()
            .map(|m| m.org_id.as_str())
            .filter(|org| {
                !self
                    .ensured
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains(*org)
            })
            .collect();
        orgs.sort_unstable();
        orgs.dedup();
        for org in orgs {
            self.ensure_stream(org).await.map_err(unavailable)?;
        }
        let mut acks = Vec::with_capacity(messages.len());
        for message in messages {
            let mut headers = async_nats::HeaderMap::new();
            if let Some(key) = &message.idempotency_key {
                headers.insert("Nats-Msg-Id", key.as_ref());
            }
            let payload = bytes::Bytes::copy_from_slice(message.data.as_bytes());
            let ack = self
                .js
                .publish_with_headers(subject_of(message), headers, payload)
                .await
                .map_err(|e| unavailable(e.to_string()))?;
            acks.push(ack);
        }
        let mut seqs = Vec::with_capacity(acks.len());
        for (ack, message) in acks.into_iter().zip(messages) {
            match ack.await {
                Ok(ack) => seqs.push(ack.sequence),
                Err(e) => {
                    if e.kind() == jetstream::context::PublishErrorKind::StreamNotFound {
                        self.ensured
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&message.org_id);
                    }
                    return Err(unavailable(e.to_string()));
                }
            }
        }
        Ok(seqs)
    }

    /// Starts following `org` for shard `shard`: a
    /// [`FollowEvent::Followed`], then every new message of its stream as
    /// [`FollowEvent::Arrived`], in order, across NATS reconnects, until
    /// [`Bridge::unfollow`]. Returns the follow's generation.
    pub fn follow(self: &Arc<Self>, shard: usize, org: &str) -> u64 {
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        let bridge = self.clone();
        let org_owned = org.to_string();
        let task = self.runtime.spawn(async move {
            bridge.follow_task(shard, org_owned, generation).await;
        });
        let old = self
            .follows
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(org.to_string(), (generation, vec![task.abort_handle()]));
        if let Some((_, tasks)) = old {
            tasks.iter().for_each(tokio::task::AbortHandle::abort);
        }
        generation
    }

    /// Stops following `org` (its shard has no connection and no reader
    /// for it any more).
    pub fn unfollow(&self, org: &str) {
        let old = self
            .follows
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(org);
        if let Some((_, tasks)) = old {
            tasks.iter().for_each(tokio::task::AbortHandle::abort);
        }
    }

    fn send(&self, shard: usize, event: FollowEvent) {
        if let Some(deliver) = self.deliver.get() {
            deliver(shard, event);
        }
    }

    async fn follow_task(self: Arc<Self>, shard: usize, org: String, generation: u64) {
        let started = async {
            let stream = self.ensure_stream(&org).await?;
            let info = stream.get_info().await.map_err(|e| e.to_string())?;
            Ok::<_, String>((stream, info.state.first_sequence, info.state.last_sequence))
        }
        .await;
        let (stream, first, mut last) = match started {
            Ok(started) => started,
            Err(e) => {
                self.send(
                    shard,
                    FollowEvent::Followed {
                        org,
                        generation,
                        result: Err(e),
                    },
                );
                return;
            }
        };
        self.send(
            shard,
            FollowEvent::Followed {
                org: org.clone(),
                generation,
                result: Ok((first, last)),
            },
        );
        // The last seq handed to the shard, and a way to make the consumer
        // start again.
        let progress = Arc::new(AtomicU64::new(last));
        let kick = Arc::new(tokio::sync::Notify::new());
        // Every 2 s: retention moves the first seq, and a consumer that
        // fell silent while the stream grew (its server went away and the
        // consumer with it, unnoticed) is started again.
        let trim = {
            let bridge = self.clone();
            let org = org.clone();
            let stream = stream.clone();
            let progress = progress.clone();
            let kick = kick.clone();
            self.runtime.spawn(async move {
                let mut trimmed = first.saturating_sub(1);
                let mut behind_at: Option<u64> = None;
                loop {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    if let Ok(info) = stream.get_info().await {
                        let delivered = progress.load(Ordering::Relaxed);
                        if info.state.last_sequence > delivered {
                            if behind_at == Some(delivered) {
                                // No progress for a whole interval.
                                eprintln!("hookstream: cluster: following {org}: no message after {delivered} while the stream holds {}; starting a new consumer", info.state.last_sequence);
                                kick.notify_one();
                                behind_at = None;
                            } else {
                                behind_at = Some(delivered);
                            }
                        } else {
                            behind_at = None;
                        }
                        let through = if info.state.messages == 0 {
                            info.state.last_sequence
                        } else {
                            info.state.first_sequence.saturating_sub(1)
                        };
                        if through > trimmed {
                            trimmed = through;
                            bridge.send(
                                shard,
                                FollowEvent::Trimmed {
                                    org: org.clone(),
                                    generation,
                                    through,
                                },
                            );
                        }
                    }
                }
            })
        };
        if let Some((g, tasks)) = self
            .follows
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&org)
        {
            if *g == generation {
                tasks.push(trim.abort_handle());
            } else {
                trim.abort();
            }
        }
        let liveness = Liveness { progress, kick };
        loop {
            if let Err(e) = self
                .consume(&stream, shard, &org, generation, &mut last, &liveness)
                .await
            {
                if self.connected() {
                    eprintln!("hookstream: cluster: following {org}: {e}; resuming after {last}");
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Reads the org's stream from `last + 1` with an ordered consumer and
    /// hands each batch to the shard; returns when the consumer fails (the
    /// caller starts another from the new `last`).
    async fn consume(
        &self,
        stream: &stream::Stream,
        shard: usize,
        org: &str,
        generation: u64,
        last: &mut u64,
        liveness: &Liveness,
    ) -> Result<(), String> {
        let Liveness { progress, kick } = liveness;
        let start_sequence = *last + 1;
        let mut create = std::pin::pin!(ordered_from(stream, start_sequence));
        // Creating a consumer needs the JetStream meta leader, which a lost
        // NATS server may have been: until one is elected again (seconds)
        // the stream's own servers still answer direct gets, so what is
        // published meanwhile is read that way, every second. The consumer
        // then skips what was read (`seq <= last`).
        let mut messages = loop {
            let created = futures_lite::future::or(async { Some(create.as_mut().await) }, async {
                tokio::time::sleep(CREATE_CATCH_UP).await;
                None
            })
            .await;
            match created {
                Some(messages) => break messages?,
                None => {
                    self.catch_up_direct(stream, shard, org, generation, last, progress)
                        .await
                }
            }
        };
        let mut connections = self.connections.clone();
        connections.mark_unchanged();
        loop {
            let next = futures_lite::future::or(
                async { Some(messages.next().await) },
                futures_lite::future::or(
                    async {
                        let _ = connections.changed().await;
                        None
                    },
                    async {
                        kick.notified().await;
                        None
                    },
                ),
            )
            .await;
            let Some(first) = next else {
                // Reconnected, or silent while the stream grew (seen when
                // the consumer was placed on a NATS server that is gone):
                // catch up by direct gets, which any server holding the
                // stream answers, then a new consumer from `last + 1`.
                self.catch_up_direct(stream, shard, org, generation, last, progress)
                    .await;
                return Ok(());
            };
            let Some(first) = first else {
                return Err("consumer ended".to_string());
            };
            let mut batch = Vec::new();
            let mut next = Some(first);
            // A failure after some messages of the batch were taken: `last`
            // already counts them, so they are handed over before it is
            // returned (else the next consumer would start after them).
            let mut failed = None;
            while let Some(item) = next.take() {
                let message = match item {
                    Ok(message) => message,
                    Err(e) => {
                        failed = Some(e.to_string());
                        break;
                    }
                };
                let Some(arrival) = arrival_of(org, &message) else {
                    continue;
                };
                if arrival.seq <= *last {
                    continue;
                }
                if arrival.seq > *last + 1 {
                    // A jump: backfill what is still in the stream.
                    let read = match self
                        .read_now(
                            org,
                            *last + 1,
                            arrival.seq - 1,
                            usize::MAX,
                            None,
                            usize::MAX,
                        )
                        .await
                    {
                        Ok(read) => read,
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    };
                    for missing in read.messages {
                        *last = missing.seq;
                        batch.push(missing);
                    }
                }
                *last = arrival.seq;
                batch.push(arrival);
                if batch.len() >= ARRIVAL_BATCH {
                    break;
                }
                // Whatever else is already here goes in the same batch.
                next = futures_lite::future::poll_once(messages.next())
                    .await
                    .flatten();
            }
            if !batch.is_empty() {
                progress.store(*last, Ordering::Relaxed);
                self.send(
                    shard,
                    FollowEvent::Arrived {
                        org: org.to_string(),
                        generation,
                        batch,
                    },
                );
            }
            if let Some(e) = failed {
                return Err(e);
            }
        }
    }

    /// Hands the shard every message after `last` up to the stream's last
    /// seq, read one by one with direct gets (no consumer), in batches.
    async fn catch_up_direct(
        &self,
        stream: &stream::Stream,
        shard: usize,
        org: &str,
        generation: u64,
        last: &mut u64,
        progress: &AtomicU64,
    ) {
        let info = match stream.get_info().await {
            Ok(info) => info,
            Err(e) => {
                eprintln!(
                    "hookstream: cluster: following {org}: catching up: stream info: {e}; a new consumer goes on after {last}"
                );
                return;
            }
        };
        let upto = info.state.last_sequence.min(*last + SCAN_MAX);
        // What retention dropped is skipped (a jump the shard records).
        let from = (*last + 1).max(info.state.first_sequence);
        let mut batch = Vec::new();
        for seq in from..=upto {
            // A replica's direct-get service may not answer yet after a NATS
            // server went away; the stream leader answers the plain get.
            let got = match stream.direct_get(seq).await {
                Ok(message) => Ok(message),
                Err(direct) => stream
                    .get_raw_message(seq)
                    .await
                    .map_err(|e| format!("direct get: {direct}; get: {e}")),
            };
            match got {
                Ok(message) => {
                    let time_ms = (message.time.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
                    if let Some(message) =
                        message_of(org, message.subject.as_str(), &message.payload)
                    {
                        batch.push(Arrival {
                            seq,
                            time_ms,
                            message,
                        });
                    }
                }
                // Not found may be a replica that has not applied it yet:
                // stop here, never skip (the next consumer goes on).
                Err(e) => {
                    eprintln!(
                        "hookstream: cluster: following {org}: catching up: seq {seq}: {e}; a new consumer goes on after {last}"
                    );
                    break;
                }
            }
            *last = seq;
            if batch.len() >= ARRIVAL_BATCH || seq == upto {
                progress.store(*last, Ordering::Relaxed);
                self.send(
                    shard,
                    FollowEvent::Arrived {
                        org: org.to_string(),
                        generation,
                        batch: std::mem::take(&mut batch),
                    },
                );
            }
        }
        if !batch.is_empty() {
            progress.store(*last, Ordering::Relaxed);
            self.send(
                shard,
                FollowEvent::Arrived {
                    org: org.to_string(),
                    generation,
                    batch,
                },
            );
        }
    }

    /// Reads messages of `org` with seq in `[from, upto]` on any of
    /// `channels` (all when None), oldest first: at most `limit`, and at
    /// most `bytes_max` bytes of data (at least one message).
    pub fn read(
        self: &Arc<Self>,
        org: &str,
        from: u64,
        upto: u64,
        limit: usize,
        channels: Vec<String>,
        bytes_max: usize,
    ) -> futures_channel::oneshot::Receiver<Result<Read, String>> {
        let (reply, answer) = futures_channel::oneshot::channel();
        let bridge = self.clone();
        let org = org.to_string();
        self.runtime.spawn(async move {
            let read = bridge
                .read_now(&org, from, upto, limit, Some(&channels), bytes_max)
                .await;
            let _ = reply.send(read);
        });
        answer
    }

    async fn read_now(
        &self,
        org: &str,
        from: u64,
        upto: u64,
        limit: usize,
        channels: Option<&[String]>,
        bytes_max: usize,
    ) -> Result<Read, String> {
        let mut read = Read {
            looked_upto: upto,
            ..Read::default()
        };
        if from > upto || limit == 0 {
            return Ok(read);
        }
        if !self.connected() {
            return Err("not connected to NATS".to_string());
        }
        let filter = channels.map(crate::message::ChannelFilter::new);
        let stream = match self.js.get_stream(stream_name(org)).await {
            Ok(stream) => stream,
            Err(e) if no_stream(&e) => {
                // No stream: the org never published.
                return Ok(read);
            }
            Err(e) => return Err(e.to_string()),
        };
        let consumer = stream
            .create_consumer(consumer::pull::Config {
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: from,
                },
                ack_policy: consumer::AckPolicy::None,
                memory_storage: true,
                inactive_threshold: Duration::from_secs(10),
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        let name = consumer.cached_info().name.clone();
        // A bounded read also asks NATS for a bounded batch: about the
        // bytes it may keep and one more message of the largest size NATS
        // allows (a pull whose next message is larger than its byte bound
        // gets nothing). Without it a batch of 256 large messages reached
        // this process to give a list page two of them.
        let batch_bytes = (bytes_max != usize::MAX).then(|| {
            bytes_max
                .saturating_add(self.client.server_info().max_payload)
                .saturating_add(FETCH_BYTES_SLACK)
        });
        let result = async {
            let mut bytes = 0usize;
            let mut scanned = 0u64;
            'fetch: loop {
                let mut fetch = consumer.fetch().max_messages(FETCH_BATCH);
                if let Some(batch_bytes) = batch_bytes {
                    fetch = fetch.max_bytes(batch_bytes);
                }
                let mut batch = fetch.messages().await.map_err(|e| e.to_string())?;
                let mut got = 0;
                while let Some(message) = batch.next().await {
                    let message = message.map_err(|e| e.to_string())?;
                    got += 1;
                    let Some(arrival) = arrival_of(org, &message) else {
                        continue;
                    };
                    if read.first_seq.is_none() {
                        read.first_seq = Some(arrival.seq);
                    }
                    if arrival.seq > upto {
                        read.looked_upto = upto;
                        break 'fetch;
                    }
                    scanned += 1;
                    let seq = arrival.seq;
                    let message = &arrival.message;
                    if filter
                        .as_ref()
                        .is_none_or(|f| f.matches(message.kind, message.route_id.as_deref()))
                    {
                        bytes += arrival.message.data.len();
                        read.messages.push(arrival);
                        if read.messages.len() >= limit || bytes >= bytes_max {
                            read.looked_upto = seq;
                            break 'fetch;
                        }
                    }
                    if seq >= upto {
                        read.looked_upto = upto;
                        break 'fetch;
                    }
                    if scanned >= SCAN_MAX {
                        read.looked_upto = seq;
                        break 'fetch;
                    }
                }
                if got == 0 {
                    // Nothing more in the stream.
                    read.looked_upto = upto;
                    break;
                }
            }
            Ok::<_, String>(())
        }
        .await;
        // The consumer would go by itself after its inactive threshold.
        let js = self.js.clone();
        let stream_name = stream_name(org);
        self.runtime.spawn(async move {
            let _ = js.delete_consumer_from_stream(name, stream_name).await;
        });
        result.map(|()| read)
    }
}

/// `hookstream cluster import`: writes one org's retained messages into its
/// stream with their own seqs, and the key records into [`KEYS_STREAM`].
pub struct Importer {
    js: jetstream::Context,
    limits: StreamLimits,
    /// The org being imported: its stream, the next seq it will give, and
    /// the seqs of the placeholders published to make gaps.
    org: Option<(String, stream::Stream, u64, Vec<u64>)>,
}

/// What became of one org.
#[derive(Debug, PartialEq, Eq)]
pub enum ImportStart {
    /// Its stream is empty and now starts at the first retained seq.
    Importing,
    /// Its stream already ends at the same last seq (imported before).
    AlreadyThere,
}

impl Importer {
    /// Connects to `urls` (failing at once when NATS is not reachable).
    pub async fn connect(urls: &[String], limits: StreamLimits) -> Result<Importer, String> {
        let client = async_nats::ConnectOptions::new()
            .name("hookstream-import")
            .connection_timeout(Duration::from_secs(5))
            .connect(urls)
            .await
            .map_err(|e| format!("NATS {}: {e}", urls.join(",")))?;
        let mut js = jetstream::new(client);
        js.set_timeout(Duration::from_secs(10));
        Ok(Importer {
            js,
            limits,
            org: None,
        })
    }

    /// Starts an org whose retained messages are `first..=last` (`first` =
    /// `last + 1` when none is retained). Refuses a stream that already
    /// holds other messages.
    pub async fn begin_org(
        &mut self,
        org: &str,
        first: u64,
        last: u64,
    ) -> Result<ImportStart, String> {
        let bridge_config = Bridge::stream_config_for(org, self.limits);
        let mut stream = self
            .js
            .get_or_create_stream(bridge_config)
            .await
            .map_err(|e| format!("stream of {org}: {e}"))?;
        let state = stream
            .info()
            .await
            .map_err(|e| e.to_string())?
            .state
            .clone();
        if state.last_sequence == last && last > 0 {
            return Ok(ImportStart::AlreadyThere);
        }
        if state.messages > 0 || state.last_sequence > 0 {
            return Err(format!(
                "stream {} of org {org} already holds messages up to seq {} (the data directory's last is {last}); not importing over them",
                stream_name(org),
                state.last_sequence
            ));
        }
        if first > 1 {
            // An empty stream purged up to `first` gives `first` next.
            stream
                .purge()
                .sequence(first)
                .await
                .map_err(|e| format!("stream of {org}: {e}"))?;
        }
        self.org = Some((org.to_string(), stream, first, Vec::new()));
        Ok(ImportStart::Importing)
    }

    /// Writes the org's next retained messages, `(seq, message)` in seq
    /// order; a gap in the seqs becomes a placeholder, deleted at the end.
    pub async fn records(&mut self, batch: Vec<(u64, Message)>) -> Result<(), String> {
        let (org, _, next, placeholders) = self.org.as_mut().ok_or("no org begun")?;
        let mut acks = Vec::with_capacity(batch.len());
        for (seq, message) in &batch {
            while *next < *seq {
                let ack = self
                    .js
                    .publish(format!("hs.{}.gap.~", token(org)), bytes::Bytes::new())
                    .await
                    .map_err(|e| e.to_string())?;
                acks.push((*next, ack, true));
                *next += 1;
            }
            let payload = bytes::Bytes::copy_from_slice(message.data.as_bytes());
            let ack = self
                .js
                .publish(subject_of(message), payload)
                .await
                .map_err(|e| e.to_string())?;
            acks.push((*seq, ack, false));
            *next = seq + 1;
        }
        for (seq, ack, placeholder) in acks {
            let ack = ack.await.map_err(|e| e.to_string())?;
            if ack.sequence != seq {
                return Err(format!(
                    "org {org}: JetStream gave seq {} to the message of seq {seq}; is a node publishing to it?",
                    ack.sequence
                ));
            }
            if placeholder {
                placeholders.push(seq);
            }
        }
        Ok(())
    }

    /// Ends the org: its placeholders are deleted (their seqs become gaps).
    pub async fn end_org(&mut self) -> Result<(), String> {
        let Some((_, stream, _, placeholders)) = self.org.take() else {
            return Ok(());
        };
        for seq in placeholders {
            stream
                .delete_message(seq)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Puts key records into [`KEYS_STREAM`], where every node takes them.
    pub async fn keys(&mut self, records: &[crate::auth::keys::KeyRecord]) -> Result<(), String> {
        self.js
            .get_or_create_stream(keys_stream_config(self.limits.replicas))
            .await
            .map_err(|e| e.to_string())?;
        for record in records {
            let mut record = record.clone();
            record.last_used_at = None;
            let json = serde_json::to_vec(&record).expect("records serialize");
            self.js
                .publish(format!("{KEYS_SUBJECT}.{}", token(&record.id)), json.into())
                .await
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

fn keys_stream_config(replicas: usize) -> stream::Config {
    stream::Config {
        name: KEYS_STREAM.to_string(),
        subjects: vec![format!("{KEYS_SUBJECT}.*"), SECRET_SUBJECT.to_string()],
        max_messages_per_subject: 1,
        num_replicas: replicas,
        storage: stream::StorageType::File,
        discard: stream::DiscardPolicy::Old,
        allow_direct: true,
        ..Default::default()
    }
}

/// The stream that carries every node's API key records, the last record
/// of each key id (subject `hs_keys.<id>`).
pub const KEYS_STREAM: &str = "HSKEYS";
const KEYS_SUBJECT: &str = "hs_keys";
/// The stream of sign-outs (`DELETE /v1/sessions`) of every node.
pub const SIGNOUTS_STREAM: &str = "HSSIGNOUTS";
const SIGNOUTS_SUBJECT: &str = "hs_signouts";

/// One sign-out as it travels between nodes.
#[derive(serde::Serialize, serde::Deserialize)]
struct SignOut {
    /// The session id (`auth::revoked::session_id`), hex.
    id: String,
    key_id: String,
    expires: u64,
}

impl Bridge {
    /// Tells every node that a session was signed out here (waits for
    /// JetStream's acknowledgement, at most a few seconds).
    pub fn sign_out(
        self: &Arc<Self>,
        id: u128,
        key_id: &str,
        expires: u64,
    ) -> futures_channel::oneshot::Receiver<Result<(), String>> {
        let (reply, answer) = futures_channel::oneshot::channel();
        let bridge = self.clone();
        let json = serde_json::to_vec(&SignOut {
            id: format!("{id:032x}"),
            key_id: key_id.to_string(),
            expires,
        })
        .expect("a sign-out serializes");
        self.runtime.spawn(async move {
            announce(&bridge.client, NOW_SIGNED_OUT, json.clone()).await;
            // Stored for nodes that start later or were cut off: tried
            // again every second (JetStream may be electing a leader) for as
            // long as the cookie could be used, the answer given after the
            // first try.
            let mut reply = Some(reply);
            loop {
                let sent = async {
                    bridge
                        .js
                        .get_or_create_stream(bridge.signouts_config())
                        .await
                        .map_err(|e| e.to_string())?;
                    bridge
                        .js
                        .publish(SIGNOUTS_SUBJECT, json.clone().into())
                        .await
                        .map_err(|e| e.to_string())?
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok::<(), String>(())
                };
                let outcome = tokio::time::timeout(PUBLISH_TIMEOUT, sent)
                    .await
                    .unwrap_or_else(|_| Err("no JetStream acknowledgement".to_string()));
                let stored = outcome.is_ok();
                if let Some(reply) = reply.take() {
                    let _ = reply.send(outcome);
                }
                if stored || crate::auth::sessions::now_unix_secs() >= expires {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        answer
    }

    fn signouts_config(&self) -> stream::Config {
        stream::Config {
            name: SIGNOUTS_STREAM.to_string(),
            subjects: vec![SIGNOUTS_SUBJECT.to_string()],
            // A cookie lives at most this long; its sign-out no longer.
            max_age: Duration::from_secs(self.session_ttl_secs.max(60) + 3600),
            num_replicas: self.limits.replicas,
            storage: stream::StorageType::File,
            discard: stream::DiscardPolicy::Old,
            allow_direct: true,
            ..Default::default()
        }
    }

    /// The stream `config` names, created with it when missing; direct
    /// gets are turned on when it was created without them (by an older
    /// build).
    async fn direct_stream(&self, config: stream::Config) -> Result<stream::Stream, String> {
        let mut stream = self
            .js
            .get_or_create_stream(config)
            .await
            .map_err(|e| e.to_string())?;
        if !stream.cached_info().config.allow_direct {
            let mut config = stream.cached_info().config.clone();
            config.allow_direct = true;
            self.js
                .update_stream(config)
                .await
                .map_err(|e| e.to_string())?;
            stream = self
                .js
                .get_stream(&stream.cached_info().config.name)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(stream)
    }

    /// Takes every node's sign-outs into this node's list, for the life
    /// of the process: its shards then refuse the cookie and close its
    /// connections with 4003, as for a sign-out taken here.
    pub fn sync_signouts(self: &Arc<Self>, revoked: Arc<crate::auth::revoked::Revocations>) {
        let listener = revoked.clone();
        self.runtime.spawn(listen(
            self.client.clone(),
            NOW_SIGNED_OUT,
            move |payload| {
                let revoked = listener.clone();
                async move { take_sign_out(&revoked, &payload).await }
            },
        ));
        let bridge = self.clone();
        self.runtime.spawn(async move {
            let mut failing = false;
            let mut seen = 0u64;
            loop {
                match bridge.sync_signouts_now(&revoked, &mut seen).await {
                    Ok(()) => {}
                    Err(e) if !failing && bridge.connected() => {
                        eprintln!("hookstream: cluster: sign-out sync: {e}; retrying");
                        failing = true;
                    }
                    Err(_) => {}
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }

    async fn sync_signouts_now(
        &self,
        revoked: &Arc<crate::auth::revoked::Revocations>,
        seen: &mut u64,
    ) -> Result<(), String> {
        let stream = self.direct_stream(self.signouts_config()).await?;
        let mut failing = false;
        loop {
            let (seq, payload) = match next_on(&stream, SIGNOUTS_SUBJECT, *seen + 1).await {
                Ok(Some(next)) => {
                    failing = false;
                    next
                }
                Ok(None) => {
                    failing = false;
                    tokio::time::sleep(WATCH_POLL).await;
                    continue;
                }
                // Said once per spell; asked again at the next turn.
                Err(e) => {
                    if !failing && self.connected() {
                        eprintln!("hookstream: cluster: sign-out sync: {e}; retrying");
                        failing = true;
                    }
                    tokio::time::sleep(WATCH_POLL).await;
                    continue;
                }
            };
            *seen = seq;
            take_sign_out(revoked, &payload).await;
        }
    }
}

/// The subject of the cluster's session secret (in [`KEYS_STREAM`]).
const SECRET_SUBJECT: &str = "hs_session_secret";

impl Bridge {
    /// The session secret every node signs cookies with: the one in
    /// JetStream, or `local` when there is none yet (then stored there,
    /// only if still none: two nodes starting at once agree). `None` when
    /// NATS (or JetStream, still electing its leaders) does not answer
    /// within 4 s (the node keeps its own secret until it restarts).
    /// Blocks; called before the shards start.
    pub fn shared_session_secret(self: &Arc<Self>, local: &str) -> Option<String> {
        // Startup waits at most this long for it.
        let deadline = std::time::Instant::now() + Duration::from_secs(4);
        while !self.connected() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if !self.connected() {
            return None;
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let bridge = self.clone();
        let local = local.to_string();
        self.runtime.spawn(async move {
            let _ = tx.send(bridge.session_secret_now(&local).await);
        });
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left.max(Duration::from_millis(500))) {
            Ok(Ok(secret)) => Some(secret),
            Ok(Err(e)) => {
                eprintln!("hookstream: cluster: session secret: {e}");
                None
            }
            Err(_) => None,
        }
    }

    /// After [`Bridge::shared_session_secret`] found no answer: asks again
    /// every 2 s until the cluster's secret is known (stored from `local`
    /// when there is still none), then calls `adopt` with it once, unless
    /// it is `local` itself.
    pub fn agree_session_secret_later(
        self: &Arc<Self>,
        local: String,
        adopt: impl FnOnce(String) + Send + 'static,
    ) {
        let bridge = self.clone();
        self.runtime.spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                if !bridge.connected() {
                    continue;
                }
                if let Ok(shared) = bridge.session_secret_now(&local).await {
                    if shared != local {
                        adopt(shared);
                    }
                    return;
                }
            }
        });
    }

    async fn session_secret_now(&self, local: &str) -> Result<String, String> {
        let stream = self
            .js
            .get_or_create_stream(keys_stream_config(self.limits.replicas))
            .await
            .map_err(|e| e.to_string())?;
        for _ in 0..2 {
            if let Ok(message) = stream.get_last_raw_message_by_subject(SECRET_SUBJECT).await {
                return String::from_utf8(message.payload.to_vec()).map_err(|e| e.to_string());
            }
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Expected-Last-Subject-Sequence", "0");
            let stored = self
                .js
                .publish_with_headers(SECRET_SUBJECT, headers, local.to_string().into())
                .await
                .map_err(|e| e.to_string())?
                .await;
            if stored.is_ok() {
                return Ok(local.to_string());
            }
            // Another node stored one first: read it.
        }
        Err("no session secret could be agreed on".to_string())
    }
}

impl Bridge {
    /// Keeps `<data_dir>/keys.json` and the cluster's key bucket in step,
    /// for the life of the process: a record created or revoked on any
    /// node (by the CLI on its data directory) is put in the bucket, and
    /// what other nodes put is merged into this node's file (new keys
    /// added, revocations taken over), where the key reload of every shard
    /// acts on it within 0.5 s (4003 for a revoked key's connections).
    pub fn sync_keys(self: &Arc<Self>, data_dir: std::path::PathBuf) {
        // Revoked keys this node knows of: revoked in its file when it
        // started, or taken from another node (announced or read from the
        // stream) before they reach the file. Only a revocation that is
        // not among them was made here, and is announced.
        let known = Arc::new(Mutex::new(HashSet::new()));
        let dir = data_dir.clone();
        let taken = known.clone();
        self.runtime
            .spawn(listen(self.client.clone(), NOW_REVOKED, move |payload| {
                let dir = dir.clone();
                let taken = taken.clone();
                async move {
                    use crate::auth::keys::KeyRecord;
                    // Only a revocation is taken this way.
                    let Ok(record) = serde_json::from_slice::<KeyRecord>(&payload) else {
                        return;
                    };
                    if record.revoked_at.is_none() {
                        return;
                    }
                    lock(&taken).insert(record.id.clone());
                    if let Err(e) = merge_keys(&dir, vec![record]).await {
                        eprintln!(
                            "hookstream: cluster: an announced revocation was not saved: {e}"
                        );
                    }
                }
            }));
        // A revocation made in this node's file is announced at once, by a
        // task of its own: nothing that waits for JetStream delays it.
        let dir = data_dir.clone();
        let client = self.client.clone();
        let announced = known.clone();
        self.runtime.spawn(async move {
            use crate::auth::keys::KeyStore;
            let store = KeyStore::new(&dir);
            if let Ok(file) = store.load() {
                lock(&announced).extend(
                    file.keys
                        .into_iter()
                        .filter(|record| record.revoked_at.is_some())
                        .map(|record| record.id),
                );
            }
            let mut stamp = store.stamp();
            loop {
                tokio::time::sleep(ANNOUNCE_POLL).await;
                let now = store.stamp();
                if now == stamp {
                    continue;
                }
                stamp = now;
                let Ok(file) = store.load() else { continue };
                for record in file.keys {
                    if record.revoked_at.is_some() && lock(&announced).insert(record.id.clone()) {
                        let json = serde_json::to_vec(&record).expect("records serialize");
                        announce(&client, NOW_REVOKED, json).await;
                    }
                }
            }
        });
        let bridge = self.clone();
        self.runtime.spawn(async move {
            let mut failing = false;
            loop {
                match bridge.sync_keys_now(&data_dir, &known).await {
                    Ok(()) => {}
                    Err(e) if !failing && bridge.connected() => {
                        eprintln!("hookstream: cluster: key sync: {e}; retrying");
                        failing = true;
                    }
                    Err(_) => {}
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }

    async fn sync_keys_now(
        &self,
        data_dir: &std::path::Path,
        known: &Mutex<HashSet<String>>,
    ) -> Result<(), String> {
        use crate::auth::keys::{KeyRecord, KeyStore};
        // A key-value bucket in all but name: one subject per key id,
        // the last record of each kept (the KV API of async-nats does not
        // decode NATS 2.9's answers), read by direct gets.
        let stream = self
            .direct_stream(keys_stream_config(self.limits.replicas))
            .await?;
        let records = format!("{KEYS_SUBJECT}.*");
        // The last seq read.
        let mut seen = 0u64;
        let store = KeyStore::new(data_dir);
        // What the bucket holds, as far as this node knows.
        let mut bucket: HashMap<String, KeyRecord> = HashMap::new();
        let mut stamp = None;
        let mut upload = true;
        let mut failing = false;
        loop {
            // The bucket → this node's file: what is new in it. Read before
            // anything of the file is put, so a node that starts with a
            // file from before a revocation takes the revocation instead of
            // putting the key back.
            let mut arrived = Vec::new();
            let read = loop {
                match next_on(&stream, &records, seen + 1).await {
                    Ok(Some((seq, payload))) => {
                        seen = seq;
                        let Ok(record) = serde_json::from_slice::<KeyRecord>(&payload) else {
                            continue;
                        };
                        match bucket.get_mut(&record.id) {
                            Some(known) if known.revoked_at.is_some() => {
                                if record.revoked_at.is_none() {
                                    // Another node put the key back unrevoked
                                    // before it saw the revocation: put it
                                    // again.
                                    bucket.remove(&record.id);
                                    upload = true;
                                }
                            }
                            Some(known) => *known = record.clone(),
                            None => {
                                bucket.insert(record.id.clone(), record.clone());
                            }
                        }
                        arrived.push(record);
                    }
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(e),
                }
            };
            if !arrived.is_empty() {
                lock(known).extend(
                    arrived
                        .iter()
                        .filter(|record| record.revoked_at.is_some())
                        .map(|record| record.id.clone()),
                );
                merge_keys(data_dir, arrived).await?;
            }
            // This node's file → the bucket, when the file changed (once
            // the bucket was read through).
            let now = store.stamp();
            let put = if read.is_ok() && (upload || now != stamp) {
                stamp = now;
                upload = false;
                let file = store.load().map_err(|e| e.to_string())?;
                let mut put = Ok(());
                for mut record in file.keys {
                    record.last_used_at = None;
                    let newer = match bucket.get(&record.id) {
                        None => true,
                        // Only a revocation is news for a known record.
                        Some(known) => known.revoked_at.is_none() && record.revoked_at.is_some(),
                    };
                    if !newer {
                        continue;
                    }
                    let json = serde_json::to_vec(&record).expect("records serialize");
                    let subject = format!("{KEYS_SUBJECT}.{}", token(&record.id));
                    let acked = async {
                        self.js
                            .publish(subject, json.into())
                            .await
                            .map_err(|e| e.to_string())?
                            .await
                            .map_err(|e| e.to_string())
                    }
                    .await;
                    if let Err(e) = acked {
                        // Put again at the next turn.
                        upload = true;
                        put = Err(e);
                        break;
                    }
                    bucket.insert(record.id.clone(), record);
                }
                put
            } else {
                Ok(())
            };
            // A failure (NATS or JetStream not answering) is said once per
            // spell and tried again at the next turn; nothing read or put
            // is lost.
            match read.and(put) {
                Err(e) if !failing && self.connected() => {
                    eprintln!("hookstream: cluster: key sync: {e}; retrying");
                    failing = true;
                }
                Err(_) => {}
                Ok(()) => failing = false,
            }
            tokio::time::sleep(WATCH_POLL).await;
        }
    }
}

/// How long `hookstream api-keys … --nats-url` waits for NATS to answer
/// one step (connect, a stream lookup, an acknowledgement).
const KEY_ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

/// `hookstream api-keys create|list|revoke --nats-url URL`: the cluster's
/// key bucket ([`KEYS_STREAM`]) read and written from any machine, no data
/// directory needed. Every node takes what is put there into its own key
/// file within a second ([`Bridge::sync_keys`]), where its shards act on
/// it (a revoked key's connections are closed with 4003).
pub struct KeyAdmin {
    client: async_nats::Client,
    js: jetstream::Context,
    replicas: usize,
}

/// `what` within [`KEY_ADMIN_TIMEOUT`], or why not.
async fn in_time<T, E: std::fmt::Display>(
    what: &str,
    step: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(KEY_ADMIN_TIMEOUT, step).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!(
            "{what}: no answer from NATS within {} s",
            KEY_ADMIN_TIMEOUT.as_secs()
        )),
    }
}

impl KeyAdmin {
    /// Connects to `urls`, failing at once when no NATS server answers.
    /// `replicas`: of the key stream when this creates it (as the nodes'
    /// `--nats-replicas`).
    pub async fn connect(urls: &[String], replicas: usize) -> Result<KeyAdmin, String> {
        let client = async_nats::ConnectOptions::new()
            .name("hookstream-api-keys")
            .connection_timeout(KEY_ADMIN_TIMEOUT)
            .connect(urls)
            .await
            .map_err(|e| format!("NATS {} is not reachable: {e}", urls.join(",")))?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(KEY_ADMIN_TIMEOUT);
        Ok(KeyAdmin {
            client,
            js,
            replicas,
        })
    }

    async fn stream(&self) -> Result<stream::Stream, String> {
        in_time(
            "the key stream",
            self.js
                .get_or_create_stream(keys_stream_config(self.replicas.max(1))),
        )
        .await
    }

    async fn put(&self, record: &crate::auth::keys::KeyRecord) -> Result<(), String> {
        let json = serde_json::to_vec(record).expect("records serialize");
        let ack = in_time(
            "put the key record",
            self.js
                .publish(format!("{KEYS_SUBJECT}.{}", token(&record.id)), json.into()),
        )
        .await?;
        in_time(
            "put the key record",
            std::future::IntoFuture::into_future(ack),
        )
        .await?;
        Ok(())
    }

    /// Puts a new record (made by `auth::keys::new_key`) into the bucket.
    pub async fn create(&self, record: &crate::auth::keys::KeyRecord) -> Result<(), String> {
        self.stream().await?;
        self.put(record).await
    }

    /// Every key record of the bucket, in creation order.
    pub async fn list(&self) -> Result<Vec<crate::auth::keys::KeyRecord>, String> {
        let stream = self.stream().await?;
        let consumer = in_time(
            "read the key stream",
            stream.create_consumer(consumer::pull::OrderedConfig {
                deliver_policy: consumer::DeliverPolicy::LastPerSubject,
                filter_subject: format!("{KEYS_SUBJECT}.*"),
                ..Default::default()
            }),
        )
        .await?;
        let pending = consumer.cached_info().num_pending;
        let mut records = Vec::new();
        if pending > 0 {
            let mut messages = in_time("read the key stream", consumer.messages()).await?;
            loop {
                let next = in_time("read the key stream", async {
                    match messages.next().await {
                        Some(next) => next.map_err(|e| e.to_string()),
                        None => Err("the key stream ended".to_string()),
                    }
                })
                .await?;
                if let Ok(record) =
                    serde_json::from_slice::<crate::auth::keys::KeyRecord>(&next.payload)
                {
                    records.push(record);
                }
                if next.info().map(|i| i.pending).unwrap_or(0) == 0 {
                    break;
                }
            }
        }
        records.sort_by(|a, b| a.created_at.cmp(&b.created_at));
        Ok(records)
    }

    /// Marks the key `id` revoked in the bucket: false if there is none.
    pub async fn revoke(&self, id: &str) -> Result<bool, String> {
        let stream = self.stream().await?;
        let subject = format!("{KEYS_SUBJECT}.{}", token(id));
        let last = match tokio::time::timeout(
            KEY_ADMIN_TIMEOUT,
            stream.get_last_raw_message_by_subject(&subject),
        )
        .await
        {
            Err(_) => return Err("read the key record: no answer from NATS".to_string()),
            Ok(Err(e)) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                return Ok(false)
            }
            Ok(Err(e)) => return Err(format!("read the key record: {e}")),
            Ok(Ok(message)) => message,
        };
        let mut record: crate::auth::keys::KeyRecord = serde_json::from_slice(&last.payload)
            .map_err(|e| format!("the key record of {id} in NATS is not readable: {e}"))?;
        if record.revoked_at.is_none() {
            record.revoked_at = Some(crate::auth::keys::now_rfc3339());
            let json = serde_json::to_vec(&record).expect("records serialize");
            announce(&self.client, NOW_REVOKED, json).await;
            self.put(&record).await?;
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_escape_what_nats_cannot_carry_and_come_back() {
        assert_eq!(token("org_a-1"), "org_a-1");
        assert_eq!(token("a.b"), "a~2eb");
        assert_eq!(token("~"), "~7e");
        for id in ["org_a", "a.b.c", "x~y", "é", "*>"] {
            assert_eq!(untoken(&token(id)).as_deref(), Some(id));
            assert!(!token(id).contains(['.', '*', '>', ' ']));
        }
        assert_eq!(untoken("~zz"), None);
    }

    #[test]
    fn subjects_carry_kind_and_route() {
        let message = Message {
            org_id: "org.a".into(),
            kind: MessageKind::Delivery,
            route_id: Some("dest.1".into()),
            data: "{}".into(),
            idempotency_key: None,
        };
        let subject = subject_of(&message);
        assert_eq!(subject, "hs.org~2ea.delivery.dest~2e1");
        let back = message_of("org.a", &subject, b"{}").expect("parses");
        assert_eq!(back.kind, MessageKind::Delivery);
        assert_eq!(back.route_id.as_deref(), Some("dest.1"));
        let none = Message {
            route_id: None,
            kind: MessageKind::Issue,
            ..message
        };
        let back = message_of("org.a", &subject_of(&none), b"1").expect("parses");
        assert_eq!(back.route_id, None);
        assert_eq!(stream_name("org.a"), "HS_org~2ea");
    }
}
