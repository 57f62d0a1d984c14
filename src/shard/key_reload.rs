//! Key reload: each shard re-reads the key file when it changes and acts
//! on sign-outs and expired sessions, closing the connections whose
//! credential is no longer accepted (4003) and waking the SSE streams and
//! long-polls served here.

use std::rc::Rc;
use std::time::Duration;

use super::Shard;
use crate::auth::keys::KeyStore;
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

/// Closes with 4003 the connections of this shard whose session has
/// expired: an expired cookie is no longer accepted, so neither is a
/// connection that signed in with it. Wakes the SSE streams and long-polls
/// too (each wakes at its own session's expiry as well).
fn close_expired_sessions(shard: &Shard) {
    let now = crate::auth::sessions::now_unix_secs();
    let mut registry = shard.registry.borrow_mut();
    let expired = registry.keys_of_expired_sessions(now);
    for key in &expired {
        registry.request_close(*key, CloseCode::KEY_REVOKED);
    }
    if !expired.is_empty() {
        shard.http_wake.notify();
    }
}

/// Re-reads the key file when it changes; closes the connections of keys
/// that were revoked with 4003, and those of sessions signed out since the
/// last turn; wakes the SSE streams and long-polls served here, which end
/// when their credential is no longer accepted. The index is the
/// process's (`auth::current`): whichever shard notices a change swaps it
/// for every shard before closing anything, and the others act on the new
/// generation at their next turn (they already authenticate with it).
pub async fn key_reload_loop(shard: Rc<Shard>) {
    let store = KeyStore::new(&shard.config.data_dir);
    let mut acted = shard.keys.shared().generation();
    let mut sign_outs = shard.access.revoked.generation();
    loop {
        glommio::timer::sleep(Duration::from_millis(KEY_RELOAD_MS)).await;
        close_expired_sessions(&shard);
        let generation = shard.access.revoked.generation();
        if generation != sign_outs {
            sign_outs = generation;
            close_signed_out(&shard);
            shard.http_wake.notify();
        }
        if let Err(e) = shard.keys.shared().refresh(&store) {
            crate::log::warn(format_args!(
                "hookstream: shard {}: key store not reloaded: {e}",
                shard.id
            ));
        }
        let generation = shard.keys.shared().generation();
        if generation == acted {
            continue;
        }
        acted = generation;
        let index = shard.keys.get();
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
