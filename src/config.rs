//! Command line, environment and TOML configuration, merged into one
//! validated [`Config`]. Precedence: flag, then `HOOKSTREAM_<FLAG>`, then the
//! `--config` file, then the embedded default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

use crate::limits;

/// The `hookstream` command line.
#[derive(Debug, Parser)]
#[command(
    name = "hookstream",
    version,
    about = "Self-hosted real-time push gateway"
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands of the contract (PROTOCOL.md §1).
// Parsed once at startup: the size of `serve`'s flags costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve(ServeArgs),
    /// Manage API keys in the data directory.
    #[command(name = "api-keys", subcommand)]
    ApiKeys(ApiKeysCommand),
    /// Post one message to a running server's admin API.
    Publish(PublishArgs),
    /// Hand every live connection of the running server to the binary now
    /// installed at its path (hot upgrade, SIGUSR2); waits for the outcome.
    Upgrade(UpgradeArgs),
    /// Cluster mode (NATS JetStream) tools.
    #[command(subcommand)]
    Cluster(ClusterCommand),
}

/// `hookstream upgrade …`
#[derive(Debug, Args)]
pub struct UpgradeArgs {
    /// Longest to wait for the outcome, in seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout_secs: u64,
    #[command(flatten)]
    pub common: DataDirArgs,
}

/// `hookstream cluster …`
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Copy a single-node data directory's retained messages (every seq
    /// kept) and API keys into JetStream, so clients resume across the
    /// switch to cluster mode. The server on that directory must be
    /// stopped.
    Import {
        /// NATS server URL(s), comma-separated.
        #[arg(long, env = "HOOKSTREAM_NATS_URL")]
        nats_url: String,
        /// JetStream replicas of the streams created (as the nodes' flag).
        #[arg(long, env = "HOOKSTREAM_NATS_REPLICAS", default_value_t = 1)]
        nats_replicas: usize,
        /// Messages kept per org stream (as the nodes' flag).
        #[arg(long, env = "HOOKSTREAM_HISTORY_MESSAGES")]
        history_messages: Option<u64>,
        /// Longest a message is kept (as the nodes' flag), e.g. `24h`.
        #[arg(long, env = "HOOKSTREAM_HISTORY_AGE")]
        history_age: Option<String>,
        #[command(flatten)]
        common: DataDirArgs,
    },
}

/// Where `hookstream api-keys …` keeps the keys in cluster mode.
#[derive(Debug, Args, Clone)]
pub struct KeysNatsArgs {
    /// NATS server URL(s), comma-separated: read and write the cluster's
    /// key bucket instead of a data directory (from any machine; every
    /// node takes the change within a second or two).
    #[arg(long, env = "HOOKSTREAM_NATS_URL")]
    pub nats_url: Option<String>,
    /// JetStream replicas of the key stream if this creates it (as the
    /// nodes' flag).
    #[arg(long, env = "HOOKSTREAM_NATS_REPLICAS", default_value_t = 1)]
    pub nats_replicas: usize,
}

/// `hookstream api-keys …`
#[derive(Debug, Subcommand)]
pub enum ApiKeysCommand {
    /// Create a key; prints the key alone on stdout.
    Create {
        /// A name to recognise the key by.
        #[arg(long)]
        name: String,
        /// The org the key belongs to.
        #[arg(long, default_value = "default")]
        org: String,
        /// Print `{"id","name","org_id","key","created_at"}` instead.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        common: DataDirArgs,
        #[command(flatten)]
        nats: KeysNatsArgs,
    },
    /// List keys (never the key itself).
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        common: DataDirArgs,
        #[command(flatten)]
        nats: KeysNatsArgs,
    },
    /// Revoke a key by id.
    Revoke {
        /// The key id (as printed by `create --json` or `list`).
        id: String,
        #[command(flatten)]
        common: DataDirArgs,
        #[command(flatten)]
        nats: KeysNatsArgs,
    },
}

/// The data directory and config file, for commands that only need those.
#[derive(Debug, Args, Clone)]
pub struct DataDirArgs {
    /// Data directory (default `./hookstream-data`).
    #[arg(long, env = "HOOKSTREAM_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// TOML configuration file.
    #[arg(long, env = "HOOKSTREAM_CONFIG")]
    pub config: Option<PathBuf>,
}

/// `hookstream publish …`
#[derive(Debug, Args)]
pub struct PublishArgs {
    /// Org to publish to.
    #[arg(long)]
    pub org: String,
    /// Message type: event, delivery, issue or sync.
    #[arg(long = "type")]
    pub message_type: String,
    /// The `data` object as JSON, or `@file` to read it from a file.
    #[arg(long, default_value = "{}")]
    pub data: String,
    /// Collection id, for `sync` messages.
    #[arg(long)]
    pub collection_id: Option<String>,
    /// Admin listener address of the running server.
    #[arg(long, env = "HOOKSTREAM_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// The admin listener speaks TLS (a server run with --admin-tls):
    /// publish over https:// to the --admin-listen address, whose
    /// certificate must name that IP address (else use --admin-url).
    #[arg(long, env = "HOOKSTREAM_ADMIN_TLS", value_parser = clap::builder::BoolishValueParser::new(), num_args = 0..=1, default_missing_value = "true")]
    pub admin_tls: Option<bool>,
    /// The admin listener's URL, `http://HOST:PORT` or `https://HOST:PORT`
    /// (a host name the certificate names), instead of --admin-listen and
    /// --admin-tls.
    #[arg(long, env = "HOOKSTREAM_ADMIN_URL")]
    pub admin_url: Option<String>,
    /// PEM file of the certificates to trust for https:// (a private CA,
    /// or the server's own self-signed certificate). Default: the Mozilla
    /// roots built in (webpki-roots).
    #[arg(long, env = "HOOKSTREAM_CA")]
    pub ca: Option<PathBuf>,
    #[command(flatten)]
    pub common: DataDirArgs,
}

/// Flags of `hookstream serve`. Every one is optional here so that the
/// config file can fill what neither flag nor environment set.
#[derive(Debug, Args, Default)]
pub struct ServeArgs {
    /// Also create an org `demo` with a key and publish synthetic messages.
    #[arg(long)]
    pub demo: bool,
    /// TOML configuration file.
    #[arg(long, env = "HOOKSTREAM_CONFIG")]
    pub config: Option<PathBuf>,
    /// Public listener (WebSocket, polling); TLS (wss://, https://) with
    /// --tls-cert and --tls-key.
    #[arg(long, env = "HOOKSTREAM_LISTEN")]
    pub listen: Option<String>,
    /// Admin listener (publish, metrics, probes); TLS (https://) with
    /// --admin-tls.
    #[arg(long, env = "HOOKSTREAM_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// Data directory.
    #[arg(long, env = "HOOKSTREAM_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// When a publish is answered 202: `fsync` (default; after fdatasync of
    /// its history record) or `none` (after the write only: fast, and lossy
    /// if the machine, not just the process, crashes).
    #[arg(long, env = "HOOKSTREAM_DURABILITY")]
    pub durability: Option<String>,
    /// Log lines on stderr: `text` (default) or `json` (one object per
    /// line: ts, level, pid, msg).
    #[arg(long, env = "HOOKSTREAM_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Messages of history kept per org (default 100000).
    #[arg(long, env = "HOOKSTREAM_HISTORY_MESSAGES")]
    pub history_messages: Option<u64>,
    /// Longest a message is kept in history, e.g. `24h`, `90m` (default 24h).
    #[arg(long, env = "HOOKSTREAM_HISTORY_AGE")]
    pub history_age: Option<String>,
    /// Number of shards (default: one per online CPU).
    #[arg(long, env = "HOOKSTREAM_SHARDS")]
    pub shards: Option<usize>,
    /// Comma-separated origins allowed for cookie-authenticated requests.
    #[arg(long, env = "HOOKSTREAM_ALLOWED_ORIGINS")]
    pub allowed_origins: Option<String>,
    /// WebSocket ping interval in milliseconds.
    #[arg(long, env = "HOOKSTREAM_HEARTBEAT_MS")]
    pub heartbeat_ms: Option<u64>,
    /// TLS certificate chain (PEM): the public listener speaks TLS (wss://,
    /// https://). Needs --tls-key. Reloaded on SIGHUP or when the file changes.
    #[arg(long, env = "HOOKSTREAM_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM: PKCS#8, PKCS#1 or SEC1) matching --tls-cert.
    #[arg(long, env = "HOOKSTREAM_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// The admin listener speaks TLS too, with the same pair (https://).
    #[arg(long, env = "HOOKSTREAM_ADMIN_TLS", value_parser = clap::builder::BoolishValueParser::new(), num_args = 0..=1, default_missing_value = "true")]
    pub admin_tls: Option<bool>,
    /// Most open client connections (default: what the open-files limit allows).
    #[arg(long, env = "HOOKSTREAM_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Most connections per org.
    #[arg(long, env = "HOOKSTREAM_CONNECTIONS_PER_ORG")]
    pub connections_per_org: Option<usize>,
    /// Most subscriptions per connection.
    #[arg(long, env = "HOOKSTREAM_SUBSCRIPTIONS_MAX")]
    pub subscriptions_max: Option<usize>,
    /// Most bytes queued to one connection before it is closed with 1013.
    #[arg(long, env = "HOOKSTREAM_SEND_QUEUE_BYTES")]
    pub send_queue_bytes: Option<usize>,
    /// Largest client WebSocket message in bytes.
    #[arg(long, env = "HOOKSTREAM_CLIENT_MESSAGE_BYTES")]
    pub client_message_bytes: Option<usize>,
    /// Largest publish request body in bytes.
    #[arg(long, env = "HOOKSTREAM_PUBLISH_BODY_BYTES")]
    pub publish_body_bytes: Option<usize>,
    /// WebSocket upgrades per source IP per second; default 200, 0 = unlimited.
    #[arg(long, env = "HOOKSTREAM_UPGRADES_PER_IP_PER_SEC")]
    pub upgrades_per_ip_per_sec: Option<u32>,
    /// Burst of WebSocket upgrades per source IP; default 400.
    #[arg(long, env = "HOOKSTREAM_UPGRADE_BURST_PER_IP")]
    pub upgrade_burst_per_ip: Option<u32>,
    /// Failed authentications per source IP per minute before 429; default 60, 0 = unlimited.
    #[arg(long, env = "HOOKSTREAM_AUTH_FAILURES_PER_IP_PER_MIN")]
    pub auth_failures_per_ip_per_min: Option<u32>,
    /// Waiting HTTP requests (long-polls, SSE streams) per source IP at once; default 256, 0 = unlimited.
    #[arg(long, env = "HOOKSTREAM_HTTP_WAITS_PER_IP")]
    pub http_waits_per_ip: Option<u32>,
    /// Connections per source IP that are not WebSockets (handshakes, plain HTTP), on each listener; default 256, 0 = unlimited.
    #[arg(long, env = "HOOKSTREAM_HTTP_CONNECTIONS_PER_IP")]
    pub http_connections_per_ip: Option<u32>,
    /// Lifetime of a browser session cookie in seconds; default 86400.
    #[arg(long, env = "HOOKSTREAM_SESSION_TTL_SECS")]
    pub session_ttl_secs: Option<u64>,
    /// permessage-deflate (RFC 7692) for clients that offer it: on (default) or off.
    #[arg(long, env = "HOOKSTREAM_COMPRESSION", value_name = "on|off", hide_possible_values = true, value_parser = clap::builder::BoolishValueParser::new())]
    pub compression: Option<bool>,
    /// Smallest message frame in bytes that is compressed; default 256.
    #[arg(long, env = "HOOKSTREAM_COMPRESSION_MIN_BYTES")]
    pub compression_min_bytes: Option<usize>,
    /// Cluster mode: NATS server URL(s), comma-separated; each org's
    /// history is a JetStream stream shared by every node.
    #[arg(long, env = "HOOKSTREAM_NATS_URL")]
    pub nats_url: Option<String>,
    /// JetStream replicas of each org's stream (cluster mode); default 1.
    #[arg(long, env = "HOOKSTREAM_NATS_REPLICAS")]
    pub nats_replicas: Option<usize>,
    /// This node's id in connection ids (cluster mode); default: host name
    /// and public port.
    #[arg(long, env = "HOOKSTREAM_NODE_ID")]
    pub node_id: Option<String>,
}

/// What the TOML file may hold: the same names as the flags, with `_`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    admin_listen: Option<String>,
    data_dir: Option<PathBuf>,
    durability: Option<String>,
    log_format: Option<String>,
    history_messages: Option<u64>,
    history_age: Option<String>,
    shards: Option<usize>,
    allowed_origins: Option<String>,
    heartbeat_ms: Option<u64>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    admin_tls: Option<bool>,
    max_connections: Option<usize>,
    connections_per_org: Option<usize>,
    subscriptions_max: Option<usize>,
    send_queue_bytes: Option<usize>,
    client_message_bytes: Option<usize>,
    publish_body_bytes: Option<usize>,
    upgrades_per_ip_per_sec: Option<u32>,
    upgrade_burst_per_ip: Option<u32>,
    auth_failures_per_ip_per_min: Option<u32>,
    http_waits_per_ip: Option<u32>,
    http_connections_per_ip: Option<u32>,
    session_ttl_secs: Option<u64>,
    compression: Option<bool>,
    compression_min_bytes: Option<usize>,
    nats_url: Option<String>,
    nats_replicas: Option<usize>,
    node_id: Option<String>,
}

/// The validated configuration of a running server.
#[derive(Debug, Clone)]
pub struct Config {
    /// Public listener address.
    pub listen: SocketAddr,
    /// Admin listener address.
    pub admin_listen: SocketAddr,
    /// Where keys, the admin token and (later) history live.
    pub data_dir: PathBuf,
    /// When a publish is acknowledged (`--durability`).
    pub durability: crate::history::Durability,
    /// `--log-format json`: one JSON object per log line.
    pub log_json: bool,
    /// Messages of history kept per org (`--history-messages`).
    pub history_messages: u64,
    /// Longest a message is kept in history (`--history-age`), in ms.
    pub history_age_ms: u64,
    /// Number of shards, one executor pinned per CPU.
    pub shards: usize,
    /// Origins allowed for cookie-authenticated requests; empty means the
    /// request's own `Host`.
    pub allowed_origins: Vec<String>,
    /// WebSocket ping interval.
    pub heartbeat_ms: u64,
    /// Most open client connections; `None` means what the open-files limit
    /// allows, decided at startup.
    pub max_connections: Option<usize>,
    /// Most connections per org (503 past it).
    pub connections_per_org: usize,
    /// Most subscriptions per connection.
    pub subscriptions_max: usize,
    /// Most bytes queued to one connection (1013 past it).
    pub send_queue_bytes: usize,
    /// Largest client message (1009 past it).
    pub client_message_bytes: usize,
    /// Largest publish body (413 past it).
    pub publish_body_bytes: usize,
    /// Upgrades per source IP per second, the token bucket's refill rate
    /// (429 past it); 0 disables the limit.
    pub upgrades_per_ip_per_sec: u32,
    /// Upgrades per source IP at once, the token bucket's size.
    pub upgrade_burst_per_ip: u32,
    /// Failed authentications per source IP per minute before its requests
    /// get 429; 0 disables the limit.
    pub auth_failures_per_ip_per_min: u32,
    /// Waiting HTTP requests (long-polls, SSE streams) per source IP at
    /// once (429 past it); 0 disables the limit.
    pub http_waits_per_ip: u32,
    /// Public-listener connections per source IP that are not WebSockets
    /// (429 past it); 0 disables the limit.
    pub http_connections_per_ip: u32,
    /// Lifetime of a session cookie.
    pub session_ttl_secs: u64,
    /// Whether permessage-deflate is negotiated with clients that offer it.
    pub compression: bool,
    /// Smallest frame (header included) that gets a compressed twin.
    pub compression_min_bytes: usize,
    /// Whether `--demo` was asked for.
    pub demo: bool,
    /// `--tls-cert` and `--tls-key`: the public listener speaks TLS.
    pub tls: Option<TlsFiles>,
    /// `--admin-tls`: the admin listener speaks TLS with the same pair.
    pub admin_tls: bool,
    /// `--nats-url` and friends: cluster mode (None: the local log).
    pub cluster: Option<ClusterConfig>,
}

/// Cluster mode: the org logs are JetStream streams (`--nats-url`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// NATS server URLs.
    pub urls: Vec<String>,
    /// JetStream replicas per org stream.
    pub replicas: usize,
    /// This node's id, `[A-Za-z0-9_.-]`, in every `connection_id`.
    pub node_id: String,
}

/// Most JetStream replicas (what JetStream allows).
pub const NATS_REPLICAS_MAX: usize = 5;

/// The node id: `--node-id`, or the host name and the public port, with
/// anything outside `[A-Za-z0-9_.-]` replaced by `-`.
fn node_id_of(given: Option<String>, listen: &SocketAddr) -> Result<String, String> {
    if let Some(id) = given {
        if !crate::message::is_valid_id(&id) {
            return Err(format!(
                "--node-id {id:?} must be 1-128 characters of A-Z a-z 0-9 _ . -"
            ));
        }
        return Ok(id);
    }
    let mut name = [0u8; 256];
    // SAFETY: gethostname writes at most `len` bytes into our buffer.
    let ok = unsafe { libc::gethostname(name.as_mut_ptr().cast(), name.len()) } == 0;
    let host = if ok {
        let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
        String::from_utf8_lossy(&name[..end]).into_owned()
    } else {
        "node".to_string()
    };
    let mut id: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(100)
        .collect();
    if id.is_empty() {
        id.push_str("node");
    }
    id.push('-');
    id.push_str(&listen.port().to_string());
    Ok(id)
}

/// The certificate chain and key files of `--tls-cert`/`--tls-key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// Default public listener.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Default admin listener.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:8081";
/// Default data directory.
pub const DEFAULT_DATA_DIR: &str = "./hookstream-data";

fn read_file_config(path: Option<&Path>) -> Result<FileConfig, String> {
    let Some(path) = path else {
        return Ok(FileConfig::default());
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
    // toml's Display draws a multi-line snippet; startup errors are one line.
    toml::from_str(&text).map_err(|e: toml::de::Error| {
        let line = e
            .span()
            .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
        let message = e.message().trim().replace('\n', " ");
        match line {
            Some(line) => format!("config file {} line {line}: {message}", path.display()),
            None => format!("config file {}: {message}", path.display()),
        }
    })
}

fn parse_addr(what: &str, value: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    value
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| format!("--{what} {value:?} is not a valid address (expected host:port)"))
}

/// The data directory for commands other than `serve`.
pub fn data_dir_of(args: &DataDirArgs) -> Result<PathBuf, String> {
    let file = read_file_config(args.config.as_deref())?;
    Ok(args
        .data_dir
        .clone()
        .or(file.data_dir)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)))
}

/// The admin listener's base URL for `hookstream publish` (no trailing
/// `/`): `--admin-url`, or `http(s)://` + the admin address, https when
/// `--admin-tls` (flag, environment or the file's `admin_tls`) says so.
pub fn admin_url_of(args: &PublishArgs) -> Result<String, String> {
    if let Some(url) = &args.admin_url {
        let rest = url
            .strip_prefix("https://")
            .or_else(|| url.strip_prefix("http://"))
            .ok_or_else(|| format!("--admin-url {url:?} must start with http:// or https://"))?;
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains(['/', '?', '#', '@']) {
            return Err(format!(
                "--admin-url {url:?} must be a scheme, a host and a port only (e.g. https://admin.example.com:8081)"
            ));
        }
        return Ok(url.trim_end_matches('/').to_string());
    }
    let file = read_file_config(args.common.config.as_deref())?;
    let value = args
        .admin_listen
        .clone()
        .or(file.admin_listen)
        .unwrap_or_else(|| DEFAULT_ADMIN_LISTEN.to_string());
    let addr = parse_addr("admin-listen", &value)?;
    let tls = args.admin_tls.or(file.admin_tls).unwrap_or(false);
    Ok(format!("{}://{addr}", if tls { "https" } else { "http" }))
}

impl Config {
    /// Merges flags/env with the config file and the defaults, then validates.
    pub fn from_serve_args(args: ServeArgs) -> Result<Config, String> {
        let file = read_file_config(args.config.as_deref())?;
        let listen = args
            .listen
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.to_string());
        let admin_listen = args
            .admin_listen
            .or(file.admin_listen)
            .unwrap_or_else(|| DEFAULT_ADMIN_LISTEN.to_string());
        let online_cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let origins = args.allowed_origins.or(file.allowed_origins);
        let durability_text = args.durability.or(file.durability);
        let durability = match durability_text.as_deref() {
            None => crate::history::Durability::Fsync,
            Some(text) => crate::history::Durability::parse(text)
                .ok_or_else(|| format!("--durability {text:?} must be `fsync` or `none`"))?,
        };
        let log_json = match args.log_format.or(file.log_format).as_deref() {
            None | Some("text") => false,
            Some("json") => true,
            Some(text) => return Err(format!("--log-format {text:?} must be `text` or `json`")),
        };
        let history_age_ms = match args.history_age.or(file.history_age) {
            None => crate::history::HISTORY_AGE_MS_DEFAULT,
            Some(text) => humantime::parse_duration(&text)
                .map_err(|e| format!("--history-age {text:?}: {e} (e.g. 24h, 90m, 3600s)"))?
                .as_millis() as u64,
        };
        let listen_addr = parse_addr("listen", &listen)?;
        let cluster = match args.nats_url.or(file.nats_url) {
            None => None,
            Some(urls) => {
                let urls: Vec<String> = urls
                    .split(',')
                    .map(|u| u.trim().to_string())
                    .filter(|u| !u.is_empty())
                    .collect();
                if urls.is_empty() {
                    return Err("--nats-url names no server".to_string());
                }
                let replicas = args.nats_replicas.or(file.nats_replicas).unwrap_or(1);
                if replicas == 0 || replicas > NATS_REPLICAS_MAX {
                    return Err(format!(
                        "--nats-replicas {replicas} must be 1 to {NATS_REPLICAS_MAX}"
                    ));
                }
                Some(ClusterConfig {
                    urls,
                    replicas,
                    node_id: node_id_of(args.node_id.or(file.node_id), &listen_addr)?,
                })
            }
        };
        let config = Config {
            cluster,
            listen: listen_addr,
            admin_listen: parse_addr("admin-listen", &admin_listen)?,
            data_dir: args
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            durability,
            log_json,
            history_messages: args
                .history_messages
                .or(file.history_messages)
                .unwrap_or(crate::history::HISTORY_MESSAGES_DEFAULT),
            history_age_ms,
            shards: args.shards.or(file.shards).unwrap_or(online_cpus),
            allowed_origins: origins
                .map(|list| {
                    list.split(',')
                        .map(|s| s.trim().trim_end_matches('/').to_string())
                        .filter(|s| !s.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
            heartbeat_ms: args
                .heartbeat_ms
                .or(file.heartbeat_ms)
                .unwrap_or(limits::HEARTBEAT_MS),
            max_connections: args.max_connections.or(file.max_connections),
            connections_per_org: args
                .connections_per_org
                .or(file.connections_per_org)
                .unwrap_or(limits::CONNECTIONS_PER_ORG_MAX),
            subscriptions_max: args
                .subscriptions_max
                .or(file.subscriptions_max)
                .unwrap_or(limits::SUBSCRIPTIONS_PER_CONNECTION_MAX),
            send_queue_bytes: args
                .send_queue_bytes
                .or(file.send_queue_bytes)
                .unwrap_or(limits::SEND_QUEUE_BYTES_MAX),
            client_message_bytes: args
                .client_message_bytes
                .or(file.client_message_bytes)
                .unwrap_or(limits::CLIENT_MESSAGE_BYTES_MAX),
            publish_body_bytes: args
                .publish_body_bytes
                .or(file.publish_body_bytes)
                .unwrap_or(limits::PUBLISH_BODY_BYTES_MAX),
            upgrades_per_ip_per_sec: args
                .upgrades_per_ip_per_sec
                .or(file.upgrades_per_ip_per_sec)
                .unwrap_or(limits::UPGRADES_PER_IP_PER_SEC),
            upgrade_burst_per_ip: args
                .upgrade_burst_per_ip
                .or(file.upgrade_burst_per_ip)
                .unwrap_or(limits::UPGRADE_BURST_PER_IP),
            auth_failures_per_ip_per_min: args
                .auth_failures_per_ip_per_min
                .or(file.auth_failures_per_ip_per_min)
                .unwrap_or(limits::AUTH_FAILURES_PER_IP_PER_MIN),
            http_waits_per_ip: args
                .http_waits_per_ip
                .or(file.http_waits_per_ip)
                .unwrap_or(limits::HTTP_WAITS_PER_IP),
            http_connections_per_ip: args
                .http_connections_per_ip
                .or(file.http_connections_per_ip)
                .unwrap_or(limits::HTTP_CONNECTIONS_PER_IP),
            session_ttl_secs: args
                .session_ttl_secs
                .or(file.session_ttl_secs)
                .unwrap_or(limits::SESSION_TTL_SECS),
            compression: args
                .compression
                .or(file.compression)
                .unwrap_or(limits::COMPRESSION),
            compression_min_bytes: args
                .compression_min_bytes
                .or(file.compression_min_bytes)
                .unwrap_or(limits::COMPRESSION_MIN_BYTES),
            demo: args.demo,
            tls: match (
                args.tls_cert.or(file.tls_cert),
                args.tls_key.or(file.tls_key),
            ) {
                (None, None) => None,
                (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
                (Some(_), None) => return Err("--tls-cert needs --tls-key".to_string()),
                (None, Some(_)) => return Err("--tls-key needs --tls-cert".to_string()),
            },
            admin_tls: args.admin_tls.or(file.admin_tls).unwrap_or(false),
        };
        if config.admin_tls && config.tls.is_none() {
            return Err("--admin-tls needs --tls-cert and --tls-key".to_string());
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks how the values relate; one clear line per problem.
    pub fn validate(&self) -> Result<(), String> {
        if self.history_messages == 0 {
            return Err("--history-messages must be at least 1".to_string());
        }
        if self.history_age_ms < 1000 {
            return Err("--history-age must be at least 1s".to_string());
        }
        if self.shards == 0 || self.shards > 1024 {
            return Err(format!(
                "--shards {} must be between 1 and 1024",
                self.shards
            ));
        }
        if self.heartbeat_ms < 100 {
            return Err(format!(
                "--heartbeat-ms {} is too small (at least 100)",
                self.heartbeat_ms
            ));
        }
        if self.subscriptions_max == 0 || self.subscriptions_max > 65_536 {
            return Err("--subscriptions-max must be between 1 and 65536".to_string());
        }
        if self.client_message_bytes < limits::CONTROL_PAYLOAD_BYTES_MAX
            || self.client_message_bytes > 16 * 1024 * 1024
        {
            return Err("--client-message-bytes must be between 125 and 16 MiB".to_string());
        }
        if self.send_queue_bytes < 4096 {
            return Err("--send-queue-bytes must be at least 4096".to_string());
        }
        if self.publish_body_bytes == 0 || self.publish_body_bytes > 1 << 30 {
            return Err("--publish-body-bytes must be between 1 and 1 GiB".to_string());
        }
        if self.connections_per_org == 0 {
            return Err("--connections-per-org must be at least 1".to_string());
        }
        if self.upgrades_per_ip_per_sec > 0 && self.upgrade_burst_per_ip == 0 {
            return Err("--upgrade-burst-per-ip must be at least 1".to_string());
        }
        if self.session_ttl_secs == 0 || self.session_ttl_secs > limits::SESSION_TTL_SECS_MAX {
            return Err(format!(
                "--session-ttl-secs must be between 1 and {}",
                limits::SESSION_TTL_SECS_MAX
            ));
        }
        // Port 0 asks the kernel for a free port, resolved at startup, so two
        // `:0` listeners on one host never collide.
        if self.listen == self.admin_listen && self.listen.port() != 0 {
            return Err("--listen and --admin-listen must differ".to_string());
        }
        Ok(())
    }
}
