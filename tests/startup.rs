//! Startup checks (PROTOCOL.md §1): each problem ends the process with one
//! clear line naming it and the fix, and a non-zero exit code — and a
//! server that stopped can be started again on the same port at once.

mod common;

use std::net::TcpListener;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{binary, ServerBuilder, TestDir};

/// Runs `hookstream serve` with `args`, expecting it to stop by itself
/// within a few seconds (a startup failure never waits for a signal).
fn serve_failing(prefix: &[&str], args: &[&str]) -> Output {
    let (program, mut command_args): (&str, Vec<&str>) = match prefix.split_first() {
        Some((first, rest)) => (first, rest.to_vec()),
        None => (binary(), Vec::new()),
    };
    if !prefix.is_empty() {
        command_args.push(binary());
    }
    command_args.push("serve");
    command_args.extend_from_slice(args);
    let mut child = Command::new(program)
        .args(&command_args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start hookstream");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().expect("output");
            panic!(
                "hookstream did not stop by itself; stderr: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `--data-dir DIR` on kernel-chosen ports, then `extra`.
fn on_any_port(data_dir: &std::path::Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "--data-dir".into(),
        data_dir.to_str().expect("UTF-8 temp path").into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--admin-listen".into(),
        "127.0.0.1:0".into(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

/// `serve_failing` with owned arguments.
fn serve_failing_owned(prefix: &[&str], args: &[String]) -> Output {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    serve_failing(prefix, &args)
}

/// The one error line; asserts there is exactly one line on stderr.
fn one_error_line(output: &Output) -> String {
    assert!(!output.status.success(), "expected a failing exit status");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    assert!(lines[0].starts_with("hookstream: error: "), "{}", lines[0]);
    lines[0].to_string()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn address_in_use_is_one_line_and_a_failing_exit() {
    let dir = TestDir::new();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let admin = format!("127.0.0.1:{}", free_port());
    let data = dir.path().to_str().unwrap();
    let output = serve_failing(
        &[],
        &[
            "--data-dir",
            data,
            "--listen",
            &addr,
            "--admin-listen",
            &admin,
        ],
    );
    let line = one_error_line(&output);
    assert!(
        line.contains(&addr) && line.contains("already in use"),
        "{line}"
    );
    assert!(line.contains("--listen"), "names the flag: {line}");
}

#[test]
fn data_dir_that_cannot_be_created_is_one_line() {
    let dir = TestDir::new();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let data = file.join("data");
    let output = serve_failing_owned(&[], &on_any_port(&data, &[]));
    let line = one_error_line(&output);
    assert!(
        line.contains("data directory") && line.contains("data"),
        "{line}"
    );
}

/// True when the tests run as root, so they can drop to `nobody`.
fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn data_dir_not_writable_is_one_line() {
    if !is_root() {
        // As a normal user a read-only directory is made directly.
        let dir = TestDir::new();
        let data = dir.path().join("ro");
        std::fs::create_dir(&data).unwrap();
        std::fs::set_permissions(&data, std::os::unix::fs::PermissionsExt::from_mode(0o555))
            .unwrap();
        let output = serve_failing_owned(&[], &on_any_port(&data, &[]));
        let line = one_error_line(&output);
        assert!(line.contains("not writable"), "{line}");
        return;
    }
    // Root writes anywhere: run the server as `nobody` on a root-owned 0755
    // directory (the binary and its parents are world-readable here).
    let dir = TestDir::new();
    let data = dir.path().join("root-only");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::set_permissions(&data, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let output = serve_failing_owned(
        &[
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "--",
        ],
        &on_any_port(&data, &[]),
    );
    let line = one_error_line(&output);
    assert!(
        line.contains("not writable") && line.contains("--data-dir"),
        "{line}"
    );
}

#[test]
fn locked_memory_limit_too_low_is_one_line_naming_the_fix() {
    if !is_root() {
        eprintln!("skipped: needs root to run as another user with a lowered limit");
        return;
    }
    let dir = TestDir::new();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let output = serve_failing_owned(
        &[
            "prlimit",
            "--memlock=65536:65536",
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "--",
        ],
        &on_any_port(dir.path(), &[]),
    );
    let line = one_error_line(&output);
    assert!(
        line.contains("RLIMIT_MEMLOCK") && line.contains("64 KiB"),
        "{line}"
    );
    assert!(line.contains("ulimit -l"), "names the fix: {line}");
}

#[test]
fn open_files_limit_below_max_connections_is_one_line() {
    let dir = TestDir::new();
    let output = serve_failing_owned(
        &["prlimit", "--nofile=1024:1024", "--"],
        &on_any_port(dir.path(), &["--max-connections", "5000"]),
    );
    let line = one_error_line(&output);
    assert!(
        line.contains("open-files limit (1024)") && line.contains("--max-connections 5000"),
        "{line}"
    );
    assert!(line.contains("ulimit -n"), "names the fix: {line}");
}

#[test]
fn a_second_server_on_the_same_data_dir_refuses_to_start() {
    let server = ServerBuilder::new().org("org_a").start();
    let output = serve_failing_owned(&[], &on_any_port(server.data_dir(), &[]));
    let line = one_error_line(&output);
    assert!(line.contains("already running"), "{line}");
}

#[test]
fn a_stopped_server_restarts_on_the_same_port_at_once() {
    // A server that had clients leaves TIME_WAIT sockets on its port; the
    // next start on that port must not fail for their minute.
    let mut first = ServerBuilder::new().org("org_a").start();
    let addr = first.ws_addr;
    let admin = first.admin_addr;
    let data_dir = first.data_dir().to_path_buf();
    // The clients stay open through the shutdown, so the server closes
    // first (1001) and its side of each connection goes to TIME_WAIT.
    let mut clients: Vec<_> = (0..5).map(|_| first.connect("org_a")).collect();
    for client in &mut clients {
        client.subscribe("events");
    }
    first.signal(libc::SIGTERM);
    for client in &mut clients {
        assert_eq!(client.expect_close(Duration::from_secs(5)), Some(1001));
    }
    let status = first
        .wait_exit(Duration::from_secs(10))
        .expect("exits on SIGTERM");
    assert!(status.success());
    let output = Command::new(binary())
        .args([
            "serve",
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--listen",
            &addr.to_string(),
            "--admin-listen",
            &admin.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start");
    let mut child = output;
    let started = Instant::now();
    let mut listening = false;
    while started.elapsed() < Duration::from_secs(5) {
        if std::net::TcpStream::connect(addr).is_ok() {
            listening = true;
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
            panic!("restart failed ({status}): {stderr}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    assert!(listening, "the restarted server never listened on {addr}");
}

/// Starts a server with `args` and `env`, connects one client of `org_a`
/// and returns the `heartbeat_ms` its welcome announces.
fn welcome_heartbeat(dir: &TestDir, args: &[&str], env: &[(&str, &str)]) -> u64 {
    let key = common::create_key(dir.path(), "org_a");
    let mut all: Vec<String> = vec![
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--admin-listen".into(),
        "127.0.0.1:0".into(),
    ];
    all.extend(args.iter().map(|a| a.to_string()));
    let mut spawned = common::spawn_serve_with_env(dir.path(), &all, env, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("server did not start: {e:?}"));
    let client = common::Client::connect(spawned.ws_addr, &format!("/v1/ws?token={key}"));
    let heartbeat = client.welcome["heartbeat_ms"]
        .as_u64()
        .expect("heartbeat_ms");
    drop(client);
    let _ = spawned.child.kill();
    let _ = spawned.child.wait();
    heartbeat
}

#[test]
fn flags_win_over_environment_and_environment_over_the_config_file() {
    let dir = TestDir::new();
    let config = dir.path().join("hookstream.toml");
    std::fs::write(&config, "heartbeat_ms = 11111\nsubscriptions_max = 3\n").unwrap();
    let config = config.to_str().unwrap();
    let data_dir = TestDir::new();
    // File alone.
    assert_eq!(
        welcome_heartbeat(&data_dir, &["--config", config], &[]),
        11111
    );
    // Environment over file.
    assert_eq!(
        welcome_heartbeat(
            &data_dir,
            &["--config", config],
            &[("HOOKSTREAM_HEARTBEAT_MS", "22222")]
        ),
        22222
    );
    // Flag over environment.
    assert_eq!(
        welcome_heartbeat(
            &data_dir,
            &["--config", config, "--heartbeat-ms", "33333"],
            &[("HOOKSTREAM_HEARTBEAT_MS", "22222")]
        ),
        33333
    );
}

#[test]
fn a_config_file_with_an_unknown_key_is_one_line() {
    let dir = TestDir::new();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "heartbeat = 5\n").unwrap();
    let output = serve_failing(
        &[],
        &[
            "--config",
            config.to_str().unwrap(),
            "--data-dir",
            dir.path().join("data").to_str().unwrap(),
        ],
    );
    let line = one_error_line(&output);
    assert!(
        line.contains("bad.toml") && line.contains("heartbeat"),
        "{line}"
    );
}

#[test]
fn a_relative_data_dir_keeps_history_working() {
    // The default data directory is relative (`./hookstream-data`); history
    // must commit there like anywhere else (glommio's directory API needs
    // an absolute path, so the server resolves it at startup).
    let cwd = TestDir::new();
    let mut child = common::serve_command(
        std::path::Path::new("relative-data"),
        &["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
    )
    .current_dir(cwd.path())
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .expect("start");
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stderr, &mut line).unwrap();
    let (_, admin, _) = common::parse_listening_line(line.trim_end());
    let token = std::fs::read_to_string(cwd.path().join("relative-data/admin-token")).unwrap();
    let body = br#"{"org_id":"org_rel","type":"issue","data":{"id":"iss_1"}}"#;
    let response = common::http_request(
        admin,
        "POST",
        "/v1/publish",
        &[("Authorization", format!("Bearer {}", token.trim()))],
        body,
    );
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    assert_eq!(response.status, 202, "{response:?}");
    assert!(cwd.path().join("relative-data/history/org_rel").is_dir());
    assert!(
        line.contains(cwd.path().to_str().unwrap()),
        "resolved: {line}"
    );
}

#[test]
fn log_format_json_makes_every_line_one_object() {
    use std::io::BufRead;
    let dir = TestDir::new();
    let mut child = common::serve_command(
        dir.path(),
        &[
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .expect("spawn hookstream serve");
    let stderr = child.stderr.take().unwrap();
    let mut lines = std::io::BufReader::new(stderr).lines();
    let first = lines.next().expect("a line").expect("text");
    let value: serde_json::Value =
        serde_json::from_str(&first).unwrap_or_else(|e| panic!("{first:?}: {e}"));
    assert_eq!(value["level"], "info");
    assert_eq!(value["pid"], child.id());
    assert!(value["ts"].as_str().unwrap().ends_with('Z'), "{value}");
    assert!(
        value["msg"]
            .as_str()
            .unwrap()
            .starts_with("hookstream listening on ws://127.0.0.1:"),
        "{value}"
    );
    // SAFETY: SIGTERM to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success());
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    assert!(!rest.is_empty(), "the drain says so");
    for line in rest {
        let value: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        assert!(value["msg"].is_string(), "{value}");
    }
}

#[test]
fn an_unknown_log_format_is_one_line() {
    let dir = TestDir::new();
    let output = common::serve_command(dir.path(), &["--log-format", "yaml"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--log-format \"yaml\" must be `text` or `json`"),
        "{stderr}"
    );
}
