//! The `hookstream` binary: parse the command line, validate, run.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use hookstream::auth::keys::KeyStore;
use hookstream::config::{self, ApiKeysCommand, Cli, Command, Config, PublishArgs};

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
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("hookstream: error: {message}");
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
        let line = format!(
            "hookstream: fatal: panic in thread {}{location}: {}; exiting with status 70 for a supervisor to restart the server (clients reconnect and resume)\n",
            thread.name().unwrap_or("main"),
            message.replace('\n', " ")
        );
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
    match command {
        ApiKeysCommand::Create {
            name,
            org,
            json,
            common,
        } => {
            let store = KeyStore::new(&config::data_dir_of(&common)?);
            let created = store.create(&name, &org).map_err(|e| e.to_string())?;
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
            Ok(())
        }
        ApiKeysCommand::List { json, common } => {
            let store = KeyStore::new(&existing_data_dir(&common)?);
            let file = store.load().map_err(|e| e.to_string())?;
            if json {
                let rows: Vec<_> = file
                    .keys
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
                for k in &file.keys {
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
            Ok(())
        }
        ApiKeysCommand::Revoke { id, common } => {
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
        .map_err(|e| format!("cannot reach the admin listener at {base}: {e}"))?;
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
