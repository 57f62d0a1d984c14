//! Publishing and plain-HTTP edges of the contract found by a black-box
//! review: the `publish` command keeps every digit, publish bodies with
//! escaped strings, error positions in arrays, the NDJSON media type, the
//! 10 s request timeout on a kept-alive public connection, and the CLI's
//! answers for a data directory that is not there.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;

const DIGITS: &str =
    r#"{"id":"cli1","big":123456789012345678901234567890,"d":0.10000000000000000000001,"z":1}"#;

#[test]
fn the_publish_command_forwards_data_with_every_digit() {
    let server = Server::start(&["org_a"]);
    let mut client = server.connect("org_a");
    client.subscribe("issues");
    let output = hookstream_command()
        .args([
            "publish", "--org", "org_a", "--type", "issue", "--data", DIGITS,
        ])
        .arg("--admin-listen")
        .arg(server.admin_addr.to_string())
        .arg("--data-dir")
        .arg(server.data_dir())
        .output()
        .expect("run hookstream publish");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let (message, raw) = client.next_raw(STEP_TIMEOUT);
    assert_eq!(message["type"], "issue", "{raw}");
    assert_eq!(message["data"]["id"], "cli1", "{raw}");
    assert_eq!(
        number_tokens(&raw),
        vec![
            seq_of(&raw).to_string(),
            "123456789012345678901234567890".to_string(),
            "0.10000000000000000000001".to_string(),
            "1".to_string(),
        ],
        "{raw}"
    );
    assert!(
        raw.contains(r#""big":123456789012345678901234567890,"d":0.10000000000000000000001,"z":1"#),
        "data reordered or rewritten: {raw}"
    );
}

#[test]
fn the_cli_refuses_a_data_directory_that_is_not_there() {
    let dir = TestDir::new();
    let missing = dir.path().join("missing");
    for args in [
        vec!["api-keys", "list"],
        vec!["api-keys", "revoke", "key_0000000000000000"],
    ] {
        let output = hookstream_command()
            .args(&args)
            .arg("--data-dir")
            .arg(&missing)
            .output()
            .expect("run hookstream");
        assert!(!output.status.success(), "{args:?} succeeded");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("does not exist"), "{args:?}: {stderr}");
    }
    // `publish` reads the admin token; it does not make a new one that no
    // server knows.
    let output = hookstream_command()
        .args([
            "publish",
            "--org",
            "o",
            "--type",
            "issue",
            "--admin-listen",
            "127.0.0.1:9",
        ])
        .arg("--data-dir")
        .arg(&missing)
        .output()
        .expect("run hookstream publish");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no admin token"), "{stderr}");
    assert!(!missing.join("admin-token").exists());
}

#[test]
fn publish_fields_with_json_escapes_are_decoded() {
    let server = Server::start(&["org_a"]);
    let mut client = server.connect("org_a");
    client.subscribe("collections:col_1");
    client.subscribe("events");
    let seqs = server.publish_ok(
        r#"[{"org_id":"org\u005fa","type":"sync","collection_id":"col\u005f1","data":{"id":"s1"}},
            {"org_id":"org_a","type":"ev\u0065nt","data":{"id":"e1","source_id":"src_1"}}]"#,
    );
    assert_eq!(seqs.len(), 2);
    let first = client.next_json(STEP_TIMEOUT);
    assert_eq!(first["channel"], "collections:col_1", "{first}");
    let second = client.next_json(STEP_TIMEOUT);
    assert_eq!(second["type"], "event", "{second}");
}

#[test]
fn a_syntax_error_in_a_publish_array_names_its_element() {
    let server = Server::start(&["org_a"]);
    let good = issue("org_a", "i1");
    let body = format!(r#"[{good},{good},{{"org_id":"org_a","type":"issue","data":{{]"#);
    let response = server.publish(&body);
    assert_eq!(response.status, 400, "{}", response.text());
    let json = response.json();
    assert_eq!(json["error"], "invalid_message", "{json}");
    assert_eq!(json["index"], 2, "{json}");
}

#[test]
fn the_ndjson_media_type_is_matched_without_case_and_with_parameters() {
    let server = Server::start(&["org_a"]);
    let body = format!("{}\n{}\n", issue("org_a", "i1"), issue("org_a", "i2"));
    for content_type in [
        "Application/X-NDJSON",
        "application/x-ndjson; charset=utf-8",
    ] {
        let response = server.publish_with(&body, Some(&server.admin_token), content_type);
        assert_eq!(response.status, 202, "{content_type}: {}", response.text());
        assert_eq!(response.json()["accepted"], 2, "{content_type}");
    }
}

#[test]
fn a_second_request_that_stalls_on_a_kept_alive_connection_gets_408() {
    let server = Server::start(&["org_a"]);
    let mut stream = tcp_connect(server.ws_addr);
    stream
        .write_all(b"GET /healthz-nothing HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    // The first answer (404) keeps the connection.
    let first = read_http_response(&mut stream);
    assert_eq!(first.status, 404);
    // Half of a second head, then nothing.
    stream.write_all(b"GET /v1/poll HTTP/1.1\r\nHo").unwrap();
    let started = Instant::now();
    stream
        .set_read_timeout(Some(Duration::from_secs(25)))
        .unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 408"),
        "after {:?}: {answer:?}",
        started.elapsed()
    );
    // The contract's 10 s, not the 30 s an idle keep-alive connection gets.
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn health_probes_answer_head_with_the_get_head_and_no_body() {
    let server = Server::start(&["org_a"]);
    for path in ["/healthz", "/readyz"] {
        let get = server.admin_get(path, false);
        assert_eq!(get.status, 200);
        let mut stream = tcp_connect(server.admin_addr);
        stream
            .write_all(
                format!("HEAD {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .unwrap();
        stream.set_read_timeout(Some(STEP_TIMEOUT)).unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200"), "{path}: {answer:?}");
        let (head, rest) = answer.split_once("\r\n\r\n").expect("a complete head");
        assert_eq!(rest, "", "{path}: HEAD answer has a body");
        let length = format!("Content-Length: {}", get.body.len());
        assert!(
            head.lines().any(|l| l.eq_ignore_ascii_case(&length)),
            "{path}: {head}"
        );
    }
    // Other methods are still refused, and say which are allowed.
    let response = http_request(server.admin_addr, "POST", "/healthz", &[], b"");
    assert_eq!(response.status, 405);
    assert_eq!(response.header("Allow"), Some("GET, HEAD"));
}

/// A publish message with an `idempotency_key`.
fn keyed(org: &str, id: &str, key: &str) -> String {
    format!(
        r#"{{"org_id":"{org}","type":"event","idempotency_key":"{key}","data":{{"id":"{id}","source_id":"src_1"}}}}"#
    )
}

#[test]
fn a_retried_idempotency_key_answers_the_original_seq_and_is_delivered_once() {
    let server = ServerBuilder::new().org("org_a").arg("--shards", 2).start();
    let mut client = server.connect("org_a");
    client.subscribe("events");
    assert_eq!(server.publish_ok(&keyed("org_a", "e0", "k-0")), vec![1]);
    assert_eq!(server.publish_ok(&keyed("org_a", "e0", "k-0")), vec![1]);
    // In one request too: a repeated key answers its first message's seq.
    assert_eq!(
        server.publish_ok(&array(&[
            keyed("org_a", "e1", "k-1"),
            keyed("org_a", "e1", "k-1"),
            keyed("org_a", "e0", "k-0"),
            event("org_a", "e2", "src_1"),
        ])),
        vec![2, 2, 1, 3]
    );
    // Keys are per org.
    assert_eq!(server.publish_ok(&keyed("org_b", "b0", "k-0")), vec![1]);
    for (seq, id) in [(1, "e0"), (2, "e1"), (3, "e2")] {
        let message = client.next_json(STEP_TIMEOUT);
        assert_eq!(message["seq"], seq, "{message}");
        assert_eq!(message["data"]["id"], id, "{message}");
    }
    // Nothing was delivered twice.
    client.ping_pong();
    let page = http_request(
        server.ws_addr,
        "GET",
        &format!(
            "/v1/poll?channels=events&after=0&token={}",
            server.key("org_a")
        ),
        &[],
        b"",
    )
    .json();
    assert_eq!(page["messages"].as_array().unwrap().len(), 3, "{page}");
}

#[test]
fn a_bad_idempotency_key_refuses_the_request() {
    let server = Server::start(&["org_a"]);
    let long = "k".repeat(129);
    for (key, reason) in [
        (r#""""#, "idempotency_key must be 1-128"),
        (
            &format!(r#""{long}""#) as &str,
            "idempotency_key must be 1-128",
        ),
        (r#""a b""#, "idempotency_key must be 1-128"),
        ("7", "idempotency_key must be a string"),
    ] {
        let body = format!(
            r#"[{},{{"org_id":"org_a","type":"issue","idempotency_key":{key},"data":{{}}}}]"#,
            issue("org_a", "i0")
        );
        let response = server.publish(&body);
        assert_eq!(response.status, 400, "{key}: {}", response.text());
        let error = response.json();
        assert_eq!(error["index"], 1, "{error}");
        assert!(
            error["reason"].as_str().unwrap().starts_with(reason),
            "{key}: {error}"
        );
    }
    // Nothing of those requests was published.
    assert_eq!(server.publish_ok(&issue("org_a", "i1")), vec![1]);
}
