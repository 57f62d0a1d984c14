//! The `hookstream` binary: parse the command line, validate, run.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use hookstream::auth::keys::KeyStore;
use hookstream::config::{self, ApiKeysCommand, Cli, Command, Config, PublishArgs, UpgradeArgs};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Everything this binary creates is the data directory or lives in it
    // (keys, secrets, history): none of it is meant for other users, so
    // whatever umask we inherit, directories are created 0700 and files
    // 0600 (PROTOCOL.md §1).
    // SAFETY: umask(2) only swaps the process's creation mask.
    unsafe { libc::umask(0o077) };
    exit_on_panic();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::ApiKeys(command) => api_keys(command),
        Command::Publish(args) => publish(args),
        Command::Upgrade(args) => upgrade(args),
        Command::Cluster(config::ClusterCommand::Import {
            nats_url,
            nats_replicas,
            history_messages,
            history_age,
            common,
        }) => cluster_import(
            &nats_url,
            nats_replicas,
            history_messages,
            history_age,
            &common,
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            hookstream::log::error(format_args!("hookstream: error: {message}"));
            ExitCode::FAILURE
        }
    }
}

/// The panic policy (docs/ARCHITECTURE.md, "Panics"): a panic anywhere
/// ends the process at once with one line and exit status 70, so that a
/// supervisor restarts it and clients reconnect and resume (`after`,
/// `Last-Event-ID`). Unwinding a shard's task would leave a half-dead
/// server: that shard's connections unanswered, its orgs unpublishable,
/// while the process looks alive. Everything acknowledged is already
/// durable (a publish is answered after its fsync), so stopping loses
/// nothing that was promised.
fn exit_on_panic() {
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".to_string());
        let thread = std::thread::current();
        let location = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let text = format!(
            "hookstream: fatal: panic in thread {}{location}: {}; exiting with status 70 for a supervisor to restart the server (clients reconnect and resume)",
            thread.name().unwrap_or("main"),
            message.replace('\n', " ")
        );
        let mut line = hookstream::log::render(
            hookstream::log::Level::Error,
            &text,
            hookstream::log::is_json(),
            std::time::SystemTime::now(),
            std::process::id(),
        );
        line.push('\n');
        // One write(2) of the whole line, then _exit: no other thread runs
        // on with state the panic left behind, and no destructor runs.
        // SAFETY: write and _exit on the process's own stderr.
        unsafe {
            libc::write(2, line.as_ptr().cast(), line.len());
            libc::_exit(70);
        }
    }));
}

fn serve(args: config::ServeArgs) -> Result<(), String> {
    let config = Config::from_serve_args(args)?;
    hookstream::log::set_json(config.log_json);
    let demo_key = if config.demo {
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| format!("data directory {}: {e}", config.data_dir.display()))?;
        Some(hookstream::demo::ensure_demo_key(&config.data_dir)?)
    } else {
        None
    };
    hookstream::shard::run(config, |config, _admin_token| {
        if let Some(key) = &demo_key {
            let (ws, http) = if config.tls.is_some() {
                ("wss", "https")
            } else {
                ("ws", "http")
            };
            let ws = format!("{ws}://{}/v1/ws?token={key}", config.listen);
            println!("hookstream demo: org \"demo\", publishing an event, a delivery and an issue every second.");
            println!("Watch them arrive:");
            println!("  websocat '{ws}'");
            println!("  then type: {{\"type\":\"subscribe\",\"channel\":\"events\"}}");
            println!("Or open the dashboard and sign in with the key {key}:");
            println!("  {http}://{}/", config.listen);
            println!(
                "Admin token: {}",
                config.data_dir.join("admin-token").display()
            );
            let _ = std::io::stdout().flush();
        }
    })
}

fn api_keys(command: ApiKeysCommand) -> Result<(), String> {
    let nats = match &command {
        ApiKeysCommand::Create { nats, .. }
        | ApiKeysCommand::List { nats, .. }
        | ApiKeysCommand::Revoke { nats, .. } => nats.clone(),
    };
    if let Some(url) = &nats.nats_url {
        return api_keys_in_nats(command, url, nats.nats_replicas);
    }
    match command {
        ApiKeysCommand::Create {
            name,
            org,
            json,
            common,
            ..
        } => {
            let store = KeyStore::new(&config::data_dir_of(&common)?);
            let created = store.create(&name, &org).map_err(|e| e.to_string())?;
            print_created(&created, json);
            Ok(())
        }
        ApiKeysCommand::List { json, common, .. } => {
            let store = KeyStore::new(&existing_data_dir(&common)?);
            let file = store.load().map_err(|e| e.to_string())?;
            print_keys(&file.keys, json);
            Ok(())
        }
        ApiKeysCommand::Revoke { id, common, .. } => {
            let store = KeyStore::new(&existing_data_dir(&common)?);
            if store.revoke(&id).map_err(|e| e.to_string())? {
                eprintln!("revoked {id}");
                Ok(())
            } else {
                Err(format!("no key with id {id}"))
            }
        }
    }
}

/// `hookstream api-keys … --nats-url URL`: the same commands on the
/// cluster's key bucket in JetStream, no data directory read or written.
fn api_keys_in_nats(command: ApiKeysCommand, url: &str, replicas: usize) -> Result<(), String> {
    let urls: Vec<String> = url
        .split(',')
        .map(|u| u.trim().to_string())
        .filter(|u| !u.is_empty())
        .collect();
    if urls.is_empty() {
        return Err("--nats-url is empty".to_string());
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async move {
        let admin = hookstream::cluster::KeyAdmin::connect(&urls, replicas).await?;
        match command {
            ApiKeysCommand::Create {
                name, org, json, ..
            } => {
                let created =
                    hookstream::auth::keys::new_key(&name, &org).map_err(|e| e.to_string())?;
                admin.create(&created.record).await?;
                print_created(&created, json);
                Ok(())
            }
            ApiKeysCommand::List { json, .. } => {
                print_keys(&admin.list().await?, json);
                Ok(())
            }
            ApiKeysCommand::Revoke { id, .. } => {
                if admin.revoke(&id).await? {
                    eprintln!("revoked {id} (every node closes its connections within 2 s)");
                    Ok(())
                } else {
                    Err(format!("no key with id {id} in NATS"))
                }
            }
        }
    })
}

fn print_created(created: &hookstream::auth::keys::CreatedKey, json: bool) {
    if json {
        let value = serde_json::json!({
            "id": created.record.id,
            "name": created.record.name,
            "org_id": created.record.org_id,
            "key": created.key,
            "created_at": created.record.created_at,
        });
        println!("{value}");
    } else {
        eprintln!(
            "created key {} for org {} (shown once; only its hash is stored)",
            created.record.id, created.record.org_id
        );
        println!("{}", created.key);
    }
}

fn print_keys(keys: &[hookstream::auth::keys::KeyRecord], json: bool) {
    if json {
        let rows: Vec<_> = keys
            .iter()
            .map(|k| {
                serde_json::json!({
                    "id": k.id, "name": k.name, "org_id": k.org_id,
                    "created_at": k.created_at, "last_used_at": k.last_used_at,
                    "revoked_at": k.revoked_at,
                })
            })
            .collect();
        println!("{}", serde_json::Value::from(rows));
    } else {
        println!(
            "{:<22} {:<20} {:<20} {:<22} {:<22} status",
            "id", "name", "org", "created", "last used"
        );
        for k in keys {
            println!(
                "{:<22} {:<20} {:<20} {:<22} {:<22} {}",
                k.id,
                k.name,
                k.org_id,
                k.created_at,
                k.last_used_at.as_deref().unwrap_or("-"),
                if k.revoked_at.is_some() {
                    "revoked"
                } else {
                    "active"
                }
            );
        }
    }
}

/// The data directory of a command that only reads it: a missing one is a
/// mistyped path, not an empty server.
fn existing_data_dir(common: &config::DataDirArgs) -> Result<std::path::PathBuf, String> {
    let data_dir = config::data_dir_of(common)?;
    if !data_dir.is_dir() {
        return Err(format!(
            "data directory {} does not exist (give the server's --data-dir)",
            data_dir.display()
        ));
    }
    Ok(data_dir)
}

/// The body `hookstream publish` sends: `data` goes as the user's own JSON
/// text, so every digit of every number is kept (PROTOCOL.md §2).
#[derive(serde::Serialize)]
struct PublishBody<'a> {
    org_id: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    collection_id: Option<&'a str>,
    data: &'a serde_json::value::RawValue,
}

/// Longest `hookstream publish` waits for the admin listener's answer (a
/// publish is answered once durable: with fsync, milliseconds).
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);

/// The TLS side of `hookstream publish`: rustls with ring, trusting the
/// certificates of `ca` (PEM) when given, else the Mozilla roots.
fn publish_tls(ca: Option<&std::path::Path>) -> Result<ureq::tls::TlsConfig, String> {
    #[allow(deprecated)]
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut builder = ureq::tls::TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::Rustls)
        .unversioned_rustls_crypto_provider(provider);
    if let Some(path) = ca {
        let pem = std::fs::read(path).map_err(|e| format!("--ca {}: {e}", path.display()))?;
        let mut certs = Vec::new();
        for item in ureq::tls::parse_pem(&pem) {
            match item.map_err(|e| format!("--ca {}: {e}", path.display()))? {
                ureq::tls::PemItem::Certificate(cert) => certs.push(cert),
                _ => continue,
            }
        }
        if certs.is_empty() {
            return Err(format!("--ca {}: no PEM certificate in it", path.display()));
        }
        builder = builder.root_certs(ureq::tls::RootCerts::from(certs));
    }
    Ok(builder.build())
}

fn publish(args: PublishArgs) -> Result<(), String> {
    let base = config::admin_url_of(&args)?;
    let data_dir = config::data_dir_of(&args.common)?;
    let token = hookstream::auth::keys::existing_admin_token(&data_dir)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| {
            format!(
                "no admin token: {} does not exist; set HOOKSTREAM_ADMIN_TOKEN or give the server's --data-dir",
                data_dir.join("admin-token").display()
            )
        })?;
    let data_text = match args.data.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?,
        None => args.data.clone(),
    };
    let data: Box<serde_json::value::RawValue> =
        serde_json::from_str(data_text.trim()).map_err(|e| format!("--data is not JSON: {e}"))?;
    let body = serde_json::to_string(&PublishBody {
        org_id: &args.org,
        kind: &args.message_type,
        collection_id: args.collection_id.as_deref(),
        data: &data,
    })
    .map_err(|e| e.to_string())?;
    // An HTTP client from a well-kept crate (https:// with rustls and the
    // ring provider the server uses); every status is an answer to show,
    // not a transport error.
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(PUBLISH_TIMEOUT))
        .tls_config(publish_tls(args.ca.as_deref())?)
        .build()
        .into();
    let mut response = agent
        .post(&format!("{base}/v1/publish"))
        .header("Authorization", &format!("Bearer {token}"))
        .content_type("application/json")
        .send(&body)
        .map_err(|e| {
            let error = e.to_string();
            // What `openssl req -x509` makes by default: a self-signed
            // certificate marked as a CA, which no TLS client accepts as a
            // server's own (RFC 5280 §4.2.1.9).
            let hint = if error.contains("CaUsedAsEndEntity") {
                "; the server's certificate is a CA certificate (basicConstraints CA:TRUE, \
                 what `openssl req -x509` makes unless told otherwise): make a self-signed \
                 one with `-addext basicConstraints=critical,CA:FALSE`, or sign the server's \
                 certificate with that CA"
            } else {
                ""
            };
            format!("cannot reach the admin listener at {base}: {error}{hint}")
        })?;
    let status = response.status();
    let answer = response
        .body_mut()
        .read_to_string()
        .map_err(|e| format!("read failed: {e}"))?;
    println!("{answer}");
    if status == ureq::http::StatusCode::ACCEPTED {
        Ok(())
    } else if base.starts_with("http://") && answer.contains("\"tls_required\"") {
        Err(format!(
            "HTTP/1.1 {}: the admin listener at {base} speaks TLS; publish with --admin-tls \
             (and --ca FILE for a private CA) or an https:// --admin-url",
            status.as_u16()
        ))
    } else {
        Err(format!(
            "HTTP/1.1 {} {}",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        ))
    }
}

/// True when a server holds the data directory's lock (`server.lock`):
/// trying to take it fails.
fn data_dir_is_locked(data_dir: &std::path::Path) -> bool {
    use std::os::unix::io::AsRawFd;
    let Ok(file) = std::fs::OpenOptions::new()
        .read(true)
        .open(data_dir.join("server.lock"))
    else {
        return false;
    };
    // SAFETY: flock on a descriptor we own; released when it closes.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) != 0 }
}

/// True while process `pid` exists (a zombie included).
fn process_exists(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

/// `hookstream upgrade`: SIGUSR2 to the process the pid file names, then
/// wait for the outcome it writes (docs/ARCHITECTURE.md, "Hot upgrade").
fn upgrade(args: UpgradeArgs) -> Result<(), String> {
    let data_dir = existing_data_dir(&args.common)?;
    let pid_path = data_dir.join(hookstream::shard::PID_FILE);
    let pid = hookstream::shard::read_pid(&pid_path).ok_or_else(|| {
        format!(
            "{} does not name a process: is a server running on this data directory?",
            pid_path.display()
        )
    })?;
    if !process_exists(pid) || !data_dir_is_locked(&data_dir) {
        // A pid file left by a server that did not exit cleanly: the pid
        // may belong to another program by now, which must not get the
        // signal.
        return Err(format!(
            "no server runs on {} ({} names process {pid}, but the data directory is not locked by a server)",
            data_dir.display(),
            pid_path.display()
        ));
    }
    let outcome_path = data_dir.join(hookstream::shard::OUTCOME_FILE);
    let _ = std::fs::remove_file(&outcome_path);
    // SAFETY: sending a signal.
    if unsafe { libc::kill(pid as libc::pid_t, libc::SIGUSR2) } != 0 {
        return Err(format!(
            "cannot signal process {pid}: {}",
            std::io::Error::last_os_error()
        ));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(args.timeout_secs);
    loop {
        if let Ok(text) = std::fs::read_to_string(&outcome_path) {
            let mut words = text.trim().splitn(3, ' ');
            let (verdict, old, rest) = (words.next(), words.next(), words.next());
            if old == Some(pid.to_string().as_str()) {
                match verdict {
                    Some("ok") => {
                        let new = rest.unwrap_or("").to_string();
                        let named = hookstream::shard::read_pid(&pid_path);
                        if named.map(|p| p.to_string()) != Some(new.clone()) {
                            return Err(format!(
                                "process {new} took over but {} names {named:?}",
                                pid_path.display()
                            ));
                        }
                        eprintln!("upgraded: process {new} serves every connection (was {pid})");
                        return Ok(());
                    }
                    _ => {
                        return Err(format!(
                            "upgrade failed: {}",
                            rest.unwrap_or("no reason given")
                        ))
                    }
                }
            }
        }
        if !process_exists(pid) {
            return Err(format!(
                "process {pid} exited without reporting how the upgrade went"
            ));
        }
        if std::time::Instant::now() >= deadline {
            return Err(format!(
                "no outcome within {} s (process {pid} still runs)",
                args.timeout_secs
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What the reading thread of `cluster import` hands the NATS side.
enum ImportItem {
    /// An org: its first retained and last seq.
    Org(String, u64, u64),
    /// Its next retained messages.
    Records(Vec<(u64, hookstream::message::Message)>),
    /// The org is complete.
    End,
}

/// `hookstream cluster import`: copies every org's retained messages, with
/// their seqs, and every key record of a single-node data directory into
/// JetStream (docs/PROTOCOL.md §1). The local history is read by a glommio
/// executor on its own thread (the segmented log's I/O is glommio's) and
/// written by async-nats on a tokio runtime on this one, a channel between.
fn cluster_import(
    nats_url: &str,
    replicas: usize,
    history_messages: Option<u64>,
    history_age: Option<String>,
    common: &config::DataDirArgs,
) -> Result<(), String> {
    use hookstream::history::{HistoryConfig, Log, SegmentedLog};
    let data_dir = config::data_dir_of(common)?;
    if !data_dir.join("history").is_dir() && !data_dir.join("keys.json").is_file() {
        return Err(format!(
            "{} holds no history and no keys: nothing to import",
            data_dir.display()
        ));
    }
    let _lock = hookstream::shard::lock_data_dir(&data_dir)?;
    let data_dir = std::fs::canonicalize(&data_dir).map_err(|e| e.to_string())?;
    let urls: Vec<String> = nats_url
        .split(',')
        .map(|u| u.trim().to_string())
        .filter(|u| !u.is_empty())
        .collect();
    let age_ms = match history_age {
        None => hookstream::history::HISTORY_AGE_MS_DEFAULT,
        Some(text) => humantime::parse_duration(&text)
            .map_err(|e| format!("--history-age {text:?}: {e}"))?
            .as_millis() as u64,
    };
    let limits = hookstream::cluster::StreamLimits {
        messages_max: history_messages.unwrap_or(hookstream::history::HISTORY_MESSAGES_DEFAULT),
        age_ms,
        replicas,
    };
    let keys = KeyStore::new(&data_dir)
        .load()
        .map_err(|e| e.to_string())?
        .keys;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<ImportItem, String>>(4);
    let history_dir = data_dir.join("history");
    let reader = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .name("import")
        .io_memory(2 << 20)
        .spawn(move || async move {
            let send = |item| tx.blocking_send(item).is_ok();
            // Opened with the node's retention, as its next start would:
            // what it no longer serves is not imported.
            let config = HistoryConfig {
                dir: history_dir,
                durability: hookstream::history::Durability::None,
                messages_max: limits.messages_max,
                age_ms: limits.age_ms,
            };
            let log = match SegmentedLog::open(config, 0, 1).await {
                Ok(log) => log,
                Err(e) => {
                    send(Err(e));
                    return;
                }
            };
            let all = ["*".to_string()];
            for (org, last) in log.last_seqs() {
                let mut after = log.trimmed_through(&org);
                if !send(Ok(ImportItem::Org(org.clone(), after + 1, last))) {
                    return;
                }
                while after < last {
                    let (items, looked) = log.read_forward(&org, after, last, 512, &all).await;
                    let batch = items
                        .into_iter()
                        .map(|r| {
                            (
                                r.seq,
                                hookstream::message::Message {
                                    org_id: org.clone(),
                                    kind: r.kind,
                                    route_id: r.route.as_deref().map(str::to_string),
                                    data: r.data.as_ref().into(),
                                    idempotency_key: None,
                                },
                            )
                        })
                        .collect();
                    if !send(Ok(ImportItem::Records(batch))) {
                        return;
                    }
                    after = looked.max(after + 1);
                }
                if !send(Ok(ImportItem::End)) {
                    return;
                }
            }
        })
        .map_err(|e| format!("cannot start the reader: {e}"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let outcome = runtime.block_on(async move {
        let mut importer = hookstream::cluster::Importer::connect(&urls, limits).await?;
        let (mut orgs, mut messages) = (0usize, 0usize);
        let mut skipping = false;
        while let Some(item) = rx.recv().await {
            match item? {
                ImportItem::Org(org, first, last) => {
                    skipping = importer.begin_org(&org, first, last).await?
                        == hookstream::cluster::ImportStart::AlreadyThere;
                    if skipping {
                        eprintln!("hookstream: import: {org}: already in JetStream up to seq {last}");
                    } else {
                        orgs += 1;
                    }
                }
                ImportItem::Records(batch) if !skipping => {
                    messages += batch.len();
                    importer.records(batch).await?;
                }
                ImportItem::Records(_) => {}
                ImportItem::End => importer.end_org().await?,
            }
        }
        importer.keys(&keys).await?;
        eprintln!(
            "hookstream: import: {messages} messages of {orgs} org(s) and {} key record(s) copied into JetStream, every seq kept",
            keys.len()
        );
        Ok::<(), String>(())
    });
    // The reader ends when the channel closes (an error drops it early).
    let _ = reader.join();
    outcome
}
