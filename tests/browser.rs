//! The dashboard page and `/v1/client.js` in a real headless Chromium
//! (PROTOCOL.md §5): sign in and see a published message; reconnect by
//! itself after the server restarts and show what was missed once (resume
//! by seq), over plain ws and over wss (the same after a restart on the
//! same port, data directory and TLS pair); the dashboard over https/wss;
//! fall back to polling when WebSockets are blocked; refuse a
//! cookie-authenticated socket to a page of another origin; sign out one
//! browser of two signed in with one key (the other goes on; a second tab
//! says it was signed out, not revoked).
//!
//! Each scenario starts a real `hookstream serve` and runs
//! `node tests/browser/dashboard.mjs` (playwright-core driving Debian's
//! `/usr/bin/chromium`) against it, with the addresses, key and admin token
//! in its environment. The script asks for server restarts by printing
//! `CONTROL <command>` lines, answered here on its stdin. It ends with
//! `PASS <scenario> <facts>` or `FAIL <reason>`.
//!
//! Chromium and the npm packages are installed by `tools/setup-browser-tests`
//! (run by `.ci/run`); without them these tests fail, naming that script.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use common::{create_key, Server, ServerBuilder, TestDir};

/// A scenario (browser start included) must finish within this.
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a (re)started server may take to print its listening line.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// The org of every scenario.
const ORG: &str = "org_browser";

/// Browser scenarios run one at a time: each one measures latencies, and
/// two Chromiums on a 2-core box would make those measure each other.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Where screenshots go (the dashboard's, and one per failed scenario).
fn screenshots_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser")
}

fn chromium() -> PathBuf {
    std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

/// Fails, naming the setup script, when Chromium, Node.js or the npm
/// packages are missing: a browser test that silently skips is a test that
/// never runs.
fn require_setup() {
    let mut missing = Vec::new();
    if !chromium().exists() {
        missing.push(format!(
            "{} (Debian package chromium)",
            chromium().display()
        ));
    }
    if Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_or(true, |status| !status.success())
    {
        missing.push("node (Node.js 20 or newer)".to_string());
    }
    let modules = repo().join("tests/browser/node_modules/playwright-core");
    if !modules.exists() {
        missing.push(format!("{} (npm ci in tests/browser)", modules.display()));
    }
    assert!(
        missing.is_empty(),
        "the browser tests cannot run: missing {}. Run tools/setup-browser-tests \
         (installs them, and does nothing when they are there), then run the tests again.",
        missing.join(", ")
    );
}

/// What the script is pointed at.
struct Target {
    /// `http://ADDR`, or `https://localhost:PORT` for a TLS server.
    public_url: String,
    admin: SocketAddr,
    admin_token: String,
    key: String,
}

impl Target {
    fn of(server: &Server) -> Target {
        Target {
            public_url: format!("http://{}", server.ws_addr),
            admin: server.admin_addr,
            admin_token: server.admin_token.clone(),
            key: server.key(ORG).to_string(),
        }
    }
}

/// Runs one scenario of `dashboard.mjs`; `control` answers its `CONTROL`
/// lines (with the JSON to send back). Returns the `PASS` line.
fn run_scenario(
    scenario: &str,
    target: &Target,
    mut control: impl FnMut(&str) -> Result<String, String>,
) -> String {
    let mut command = Command::new("node");
    command
        .arg("dashboard.mjs")
        .current_dir(repo().join("tests/browser"))
        .env("SCENARIO", scenario)
        .env("HS_URL", &target.public_url)
        .env(
            "HS_IGNORE_CERTIFICATE_ERRORS",
            if target.public_url.starts_with("https") {
                "1"
            } else {
                "0"
            },
        )
        .env("HS_ADMIN_URL", format!("http://{}", target.admin))
        .env("HS_ADMIN_TOKEN", &target.admin_token)
        .env("HS_KEY", &target.key)
        .env("HS_ORG", ORG)
        .env("HS_SAMPLES", repo().join("assets/samples"))
        .env("HS_SCREENSHOTS", screenshots_dir())
        .env("CHROMIUM", chromium())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: prctl is async-signal-safe and touches only the child.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .expect("spawn node tests/browser/dashboard.mjs");
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let (lines_tx, lines_rx) = mpsc::channel();
    let stdout = child.stdout.take().expect("stdout is piped");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let stderr_text = Arc::new(Mutex::new(String::new()));
    {
        let stderr_text = stderr_text.clone();
        let stderr = child.stderr.take().expect("stderr is piped");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut text = stderr_text.lock().unwrap();
                text.push_str(&line);
                text.push('\n');
            }
        });
    }

    let deadline = Instant::now() + SCENARIO_TIMEOUT;
    let mut output = Vec::new();
    let mut timed_out = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines_rx.recv_timeout(left) {
            Ok(line) => {
                eprintln!("browser {scenario}: {line}");
                if let Some(request) = line.strip_prefix("CONTROL ") {
                    let answer = match control(request) {
                        Ok(json) => format!("OK {json}\n"),
                        Err(message) => format!("ERR {message}\n"),
                    };
                    let _ = stdin.write_all(answer.as_bytes());
                }
                output.push(line);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                timed_out = true;
                let _ = child.kill();
                break;
            }
        }
    }
    drop(stdin);
    let status = child.wait().expect("wait for node");
    // Let the stderr reader drain.
    std::thread::sleep(Duration::from_millis(50));
    let transcript = format!(
        "stdout:\n{}\nstderr:\n{}",
        output.join("\n"),
        stderr_text.lock().unwrap()
    );
    assert!(
        !timed_out,
        "browser scenario {scenario} took longer than {SCENARIO_TIMEOUT:?}; {transcript}"
    );
    let pass = output
        .iter()
        .find(|line| line.starts_with(&format!("PASS {scenario}")))
        .cloned();
    assert!(
        status.success() && pass.is_some(),
        "browser scenario {scenario} failed ({status}); screenshots in {}; {transcript}",
        screenshots_dir().display()
    );
    pass.unwrap()
}

fn no_control(request: &str) -> Result<String, String> {
    Err(format!("this scenario takes no CONTROL {request}"))
}

fn server() -> Server {
    ServerBuilder::new().org(ORG).start()
}

/// A self-signed P-256 pair for `localhost` in `dir` (certificate, key):
/// Chromium is told to accept it (`HS_IGNORE_CERTIFICATE_ERRORS`).
fn self_signed_pair(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .expect("openssl");
    assert!(status.success(), "openssl req made no pair");
    (cert, key)
}

#[test]
fn signs_in_subscribes_and_shows_a_published_message() {
    require_setup();
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let server = server();
    let pass = run_scenario("live", &Target::of(&server), no_control);
    println!("{pass}");
    // The README's screenshot: refreshed when missing or when asked to.
    let shot = screenshots_dir().join("dashboard.png");
    let docs = repo().join("docs/dashboard.png");
    if !docs.exists() || std::env::var_os("HOOKSTREAM_UPDATE_SCREENSHOT").is_some() {
        std::fs::copy(&shot, &docs).expect("copy the screenshot to docs/dashboard.png");
    }
}

/// The same dashboard over TLS: https:// page and client.js, the session
/// cookie (Secure) and wss:// with compression, Chromium told to accept the
/// test's self-signed certificate.
#[test]
fn the_dashboard_over_https_and_wss() {
    require_setup();
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TestDir::new();
    let (cert, key) = self_signed_pair(dir.path());
    let server = ServerBuilder::new()
        .org(ORG)
        .arg("--tls-cert", cert.display())
        .arg("--tls-key", key.display())
        .start();
    let mut target = Target::of(&server);
    target.public_url = format!("https://localhost:{}", server.ws_addr.port());
    let pass = run_scenario("live", &target, no_control);
    println!("{pass}");
    assert!(
        server.metric_sum("hookstream_tls_handshakes_total") > 0,
        "the browser spoke TLS"
    );
    assert!(
        server.metric_sum("hookstream_upgrades_total") > 0,
        "and upgraded over wss"
    );
}

/// Chromium offers permessage-deflate on every upgrade: the server accepts
/// it, and the dashboard (through client.js) shows messages that arrived as
/// compressed frames exactly like plain ones.
#[test]
fn chromium_negotiates_compression_and_the_dashboard_reads_compressed_frames() {
    require_setup();
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let server = server();
    let pass = run_scenario("live", &Target::of(&server), no_control);
    println!("{pass}");
    // The scenario checked every message on the page; the server says the
    // sample-sized ones went out compressed, so the browser negotiated
    // the extension and inflated them.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let compressed = server.metric_sum("hookstream_messages_delivered_compressed_total");
        if compressed > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no compressed delivery: Chromium did not negotiate permessage-deflate"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The files themselves, without a browser: types, caching, the page's
/// Content-Security-Policy, CORS on the module only, GET only.
#[test]
fn serves_the_page_and_the_module_with_their_headers() {
    let server = server();
    let get = |path: &str| common::http_request(server.ws_addr, "GET", path, &[], b"");
    let page = get("/");
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    let policy = page
        .header("content-security-policy")
        .expect("the page has a CSP");
    assert!(policy.contains("script-src 'self'") && policy.contains("connect-src 'self'"));
    assert_eq!(page.header("x-frame-options"), Some("DENY"));
    assert!(page
        .text()
        .contains(r#"<script type="module" src="/dashboard.js">"#));
    assert_eq!(page.header("access-control-allow-origin"), None);
    let module = get("/v1/client.js");
    assert_eq!(module.status, 200);
    assert_eq!(
        module.header("content-type"),
        Some("text/javascript; charset=utf-8")
    );
    assert_eq!(module.header("access-control-allow-origin"), Some("*"));
    assert_eq!(module.header("x-content-type-options"), Some("nosniff"));
    assert!(module.text().contains("export function connect("));
    for path in ["/dashboard.js", "/dashboard.css"] {
        let asset = get(path);
        assert_eq!(asset.status, 200, "{path}");
        assert_eq!(asset.header("cache-control"), Some("no-cache"), "{path}");
    }
    let post = common::http_request(server.ws_addr, "POST", "/", &[], b"");
    assert_eq!(post.status, 405);
    assert_eq!(post.header("allow"), Some("GET"));
    assert_eq!(get("/index.html").status, 404);
}

/// The client's timing and bookkeeping under Node.js with a fake clock,
/// socket and fetch (`tests/browser/client.unit.mjs`): the whole backoff
/// schedule up to its cap, truncated poll pages, a revoked key, expired
/// history, a silent socket — what a real browser would take minutes for.
#[test]
fn client_module_logic_with_a_fake_clock() {
    require_setup();
    let mut child = Command::new("node")
        .arg("client.unit.mjs")
        .current_dir(repo().join("tests/browser"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn node tests/browser/client.unit.mjs");
    let deadline = Instant::now() + SCENARIO_TIMEOUT;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().expect("node output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("PASS client-unit"),
        "client.unit.mjs failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    println!("{}", stdout.trim());
}

#[test]
fn falls_back_to_polling_when_websockets_are_blocked() {
    require_setup();
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let server = server();
    let pass = run_scenario("polling", &Target::of(&server), no_control);
    println!("{pass}");
}

#[test]
fn a_sign_out_ends_only_that_browser_and_says_so() {
    require_setup();
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let server = server();
    let pass = run_scenario("sign-out", &Target::of(&server), |request| match request {
        "revoke" => {
            let listed: serde_json::Value = serde_json::from_str(&common::cli(
                &["api-keys", "list", "--json"],
                server.data_dir(),
            ))
            .map_err(|e| format!("api-keys list --json: {e}"))?;
            let keys = listed.as_array().ok_or("api-keys list is not an array")?;
            for key in keys.iter().filter(|k| k["org_id"] == ORG) {
                let id = key["id"].as_str().ok_or("a key without id")?;
                common::cli(&["api-keys", "revoke", id], server.data_dir());
            }
            Ok(String::new())
        }
        other => Err(format!("unknown CONTROL {other}")),
    });
    println!("{pass}");
}

#[test]
fn another_origin_cannot_open_a_cookie_socket() {
    require_setup();
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let server = server();
    let pass = run_scenario("cross-origin", &Target::of(&server), no_control);
    println!("{pass}");
}

// ---------------------------------------------------------------------------
// Restarts over one data directory
// ---------------------------------------------------------------------------

/// A `hookstream serve` process over a data directory that outlives it.
struct Run {
    child: Child,
    public: SocketAddr,
    admin: SocketAddr,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Run {
    /// Starts on `listen` (`127.0.0.1:0` for any port) with `extra`
    /// flags (the TLS pair); retried when a start hangs before listening
    /// (see `ServerBuilder::start`).
    fn start(dir: &Path, listen: &str, extra: &[String]) -> Run {
        let mut hung = Vec::new();
        for _ in 0..3 {
            match Run::try_start(dir, listen, extra) {
                Ok(run) => return run,
                Err(stderr) => hung.push(stderr),
            }
        }
        panic!("hookstream serve --listen {listen} did not start: {hung:?}");
    }

    fn try_start(dir: &Path, listen: &str, extra: &[String]) -> Result<Run, String> {
        let mut args: Vec<String> = ["--listen", listen, "--admin-listen", "127.0.0.1:0"]
            .iter()
            .map(|a| a.to_string())
            .collect();
        args.extend_from_slice(extra);
        match common::spawn_serve(dir, &args, START_TIMEOUT) {
            Ok(spawned) => Ok(Run {
                child: spawned.child,
                public: spawned.ws_addr,
                admin: spawned.admin_addr,
                stderr: spawned.stderr,
            }),
            Err(common::StartError::Hung(stderr)) => Err(stderr),
            Err(common::StartError::Exited(message)) => panic!("{message}"),
        }
    }

    /// The sum of a metric's samples whose line contains `label` (`""` for
    /// all), from the admin listener's `/metrics`.
    fn metric_sum(&self, name: &str, label: &str, admin_token: &str) -> u64 {
        let response = common::http_request(
            self.admin,
            "GET",
            "/metrics",
            &[("Authorization", format!("Bearer {admin_token}"))],
            b"",
        );
        assert_eq!(response.status, 200);
        response
            .text()
            .lines()
            .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// SIGTERM (the graceful drain: sockets closed with 1001), then wait.
    fn stop(mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                assert!(
                    status.success(),
                    "drain exited {status}: {}",
                    self.stderr.lock().unwrap().join("\n")
                );
                return;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("hookstream did not exit within 10 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `resume` scenario against servers over one data directory, with
/// `extra` flags on every start and the page at `scheme://host:PORT`.
/// Returns the `PASS` line, the page's (restarted) server and the admin
/// token.
fn restart_scenario(dir: &Path, extra: &[String], scheme_host: &str) -> (String, Run, String) {
    let key = create_key(dir, ORG);
    let first = Run::start(dir, "127.0.0.1:0", extra);
    let public = first.public;
    let admin_token = || {
        std::fs::read_to_string(dir.join("admin-token"))
            .expect("admin-token")
            .trim()
            .to_string()
    };
    let target = Target {
        public_url: format!("{scheme_host}:{}", public.port()),
        admin: first.admin,
        admin_token: admin_token(),
        key,
    };
    // The page's server (restarted on its port) and the run on another port.
    let mut main = Some(first);
    let mut aside: Option<Run> = None;
    let pass = run_scenario("resume", &target, |request| match request {
        "stop" => {
            main.take().ok_or("not running")?.stop();
            Ok(String::new())
        }
        "start" => {
            let run = Run::start(dir, &public.to_string(), extra);
            assert_eq!(run.public, public, "restarted on the same port");
            let json =
                serde_json::json!({"url": format!("http://{}", run.admin), "token": admin_token()});
            main = Some(run);
            Ok(json.to_string())
        }
        "start-aside" => {
            let run = Run::start(dir, "127.0.0.1:0", extra);
            let json =
                serde_json::json!({"url": format!("http://{}", run.admin), "token": admin_token()});
            aside = Some(run);
            Ok(json.to_string())
        }
        "stop-aside" => {
            aside.take().ok_or("no run aside")?.stop();
            Ok(String::new())
        }
        other => Err(format!("unknown CONTROL {other}")),
    });
    let main = main.expect("the scenario ends with the page's server running");
    (pass, main, admin_token())
}

#[test]
fn reconnects_after_a_restart_and_shows_missed_messages_once() {
    require_setup();
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TestDir::new();
    let (pass, _main, _token) = restart_scenario(dir.path(), &[], "http://127.0.0.1");
    println!("{pass}");
}

/// The same over TLS: the page (https://) loses its wss:// socket when the
/// server stops, and reconnects by itself over wss:// to the server
/// restarted on the same port, data directory and pair; it resumes with
/// `after` and shows the messages published meanwhile (through a run on
/// another port) once each, then a live one.
#[test]
fn reconnects_over_wss_after_a_restart_and_shows_missed_messages_once() {
    require_setup();
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TestDir::new();
    let pair_dir = TestDir::new();
    let (cert, key) = self_signed_pair(pair_dir.path());
    let extra = vec![
        "--tls-cert".to_string(),
        cert.display().to_string(),
        "--tls-key".to_string(),
        key.display().to_string(),
    ];
    let (pass, main, token) = restart_scenario(dir.path(), &extra, "https://localhost");
    println!("{pass}");
    // The restarted server served the page's reconnect over TLS: a TLS
    // handshake and a WebSocket upgrade on the TLS listener.
    assert!(
        main.metric_sum("hookstream_tls_handshakes_total", "", &token) > 0,
        "the reconnect spoke TLS"
    );
    assert!(
        main.metric_sum("hookstream_upgrades_total", "", &token) > 0,
        "and upgraded over wss"
    );
}
