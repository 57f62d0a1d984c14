//! Key reload: each shard re-reads the key file when it changes and acts
//! on sign-outs, closing the connections whose credential is no longer
//! accepted (4003) and waking the SSE streams and long-polls served here.

use std::rc::Rc;
use std::time::Duration;

use super::Shard;
use crate::auth::keys::{FileStamp, KeyIndex, KeyStore};
use crate::protocol::ws::CloseCode;

/// How often each shard re-checks the key file.
const KEY_RELOAD_MS: u64 = 500;

/// Closes with 4003 the connections of this shard that signed in with a
/// session cookie since signed out (`DELETE /v1/sessions`), as for a
/// revoked key: the credential they were accepted with no longer is one.
fn close_signed_out(shard: &Shard) {
    let revoked = &shard.access.revoked;
    let mut registry = shard.registry.borrow_mut();
    let closing =
        registry.keys_of_sessions(|key_id, id, expires| revoked.is_revoked(id, key_id, expires));
    for key in closing {
        registry.request_close(key, CloseCode::KEY_REVOKED);
    }
}

/// Re-reads the key file when it changes; closes the connections of keys
/// that were revoked with 4003, and those of sessions signed out since the
/// last turn; wakes the SSE streams and long-polls served here, which end
/// when their credential is no longer accepted.
pub async fn key_reload_loop(shard: Rc<Shard>, loaded: Option<FileStamp>) {
    let store = KeyStore::new(&shard.config.data_dir);
    let mut seen = loaded;
    let mut sign_outs = shard.access.revoked.generation();
    loop {
        glommio::timer::sleep(Duration::from_millis(KEY_RELOAD_MS)).await;
        let generation = shard.access.revoked.generation();
        if generation != sign_outs {
            sign_outs = generation;
            close_signed_out(&shard);
            shard.http_wake.notify();
        }
        let stamp = store.stamp();
        if stamp == seen {
            continue;
        }
        // Remembered only once loaded: a failed read is retried next time.
        let file = match store.load() {
            Ok(file) => file,
            Err(e) => {
                eprintln!(
                    "hookstream: shard {}: key store not reloaded: {e}",
                    shard.id
                );
                continue;
            }
        };
        seen = stamp;
        let index = Rc::new(KeyIndex::from_file(&file));
        *shard.keys.borrow_mut() = index.clone();
        shard.http_wake.notify();
        let mut registry = shard.registry.borrow_mut();
        for key_id in registry.connected_key_ids() {
            if !index.is_active(&key_id) {
                for key in registry.keys_of_api_key(&key_id) {
                    registry.request_close(key, CloseCode::KEY_REVOKED);
                }
            }
        }
    }
}
