//! `hookstream serve --demo`: an org `demo` with a key (reused across runs),
//! instructions on stdout, and a synthetic event, delivery and issue every
//! second so a newcomer sees messages within seconds of the first command.

use std::path::Path;

use crate::auth::keys::{KeyIndex, KeyStore};
use crate::message::{Message, MessageKind};

/// The demo org.
pub const DEMO_ORG: &str = "demo";

const EVENT: &str = include_str!("../assets/samples/event.json");
const DELIVERY: &str = include_str!("../assets/samples/delivery.json");
const ISSUE: &str = include_str!("../assets/samples/issue.json");

/// The demo key: reused from `<data-dir>/demo-key` while it is still active,
/// created otherwise. The demo key is the one key kept in clear, so that a
/// second `--demo` run prints a working command again.
pub fn ensure_demo_key(data_dir: &Path) -> Result<String, String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let store = KeyStore::new(data_dir);
    let path = data_dir.join("demo-key");
    if let Ok(key) = std::fs::read_to_string(&path) {
        let key = key.trim().to_string();
        let index = KeyIndex::from_file(&store.load().map_err(|e| e.to_string())?);
        if index
            .authenticate(&key)
            .is_some_and(|k| k.org_id == DEMO_ORG)
        {
            return Ok(key);
        }
    }
    let created = store.create("demo", DEMO_ORG).map_err(|e| e.to_string())?;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    file.write_all(created.key.as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(created.key)
}

fn with_fields(sample: &str, id: String, tick: u64) -> Box<str> {
    let mut value: serde_json::Value =
        serde_json::from_str(sample).expect("samples are valid JSON");
    value["id"] = serde_json::Value::from(id);
    value["org_id"] = serde_json::Value::from(DEMO_ORG);
    value["demo_tick"] = serde_json::Value::from(tick);
    value.to_string().into()
}

/// The three synthetic messages of one tick.
pub fn messages(tick: u64) -> Vec<Message> {
    let event = with_fields(EVENT, format!("evt_demo_{tick}"), tick);
    let delivery = with_fields(DELIVERY, format!("dlv_demo_{tick}"), tick);
    let issue = with_fields(ISSUE, format!("iss_demo_{tick}"), tick);
    vec![
        Message {
            org_id: DEMO_ORG.to_string(),
            kind: MessageKind::Event,
            route_id: Some("src_stripe_prod".to_string()),
            data: event,
            idempotency_key: None,
        },
        Message {
            org_id: DEMO_ORG.to_string(),
            kind: MessageKind::Delivery,
            route_id: Some("dst_billing_api".to_string()),
            data: delivery,
            idempotency_key: None,
        },
        Message {
            org_id: DEMO_ORG.to_string(),
            kind: MessageKind::Issue,
            route_id: None,
            data: issue,
            idempotency_key: None,
        },
    ]
}
