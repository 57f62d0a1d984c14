//! The one key index of the process: revocation is one moment for every
//! shard.
//!
//! Shards share nothing else on the hot path, but a revocation cannot be
//! per shard: if each shard reloaded the key file on its own, a client
//! whose stream one shard had just closed for a revoked key could
//! reconnect to another shard that had not reloaded yet and be let in
//! again. So the index lives here, once: whichever shard notices a change
//! of the key file first loads it and swaps the index for all of them,
//! and bumps a generation, *before* it closes any connection. Each shard
//! keeps a cached copy of the index and, at every authentication, compares
//! its copy's generation with the current one (one atomic load); on a
//! difference it takes the new index. Whatever a shard closes, every shard
//! already refuses.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::keys::{FileStamp, KeyIndex, KeyStore, KeyStoreError};

/// The current key index, the key file version it was loaded from, and a
/// generation that changes with every swap.
#[derive(Debug)]
pub struct CurrentKeys {
    /// The index and the file version it came from, swapped together.
    state: Mutex<(Option<FileStamp>, Arc<KeyIndex>)>,
    /// Bumped after every swap (while the lock is held), so a cached copy
    /// knows with one load whether it is stale.
    generation: AtomicU64,
}

impl CurrentKeys {
    /// The index loaded from the key file at version `stamp` (the stamp
    /// taken *before* the load, so a change racing the load is reloaded).
    pub fn new(stamp: Option<FileStamp>, index: KeyIndex) -> CurrentKeys {
        CurrentKeys {
            state: Mutex::new((stamp, Arc::new(index))),
            generation: AtomicU64::new(1),
        }
    }

    /// The generation of the current index.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// The current index and its generation.
    pub fn current(&self) -> (u64, Arc<KeyIndex>) {
        let state = self.lock();
        (self.generation(), state.1.clone())
    }

    /// Reloads the key file if it changed since the current index was
    /// loaded, and swaps the index for every shard. Returns whether it
    /// swapped. A failed read leaves the index as it is (retried next
    /// time, as the stamp is not remembered).
    pub fn refresh(&self, store: &KeyStore) -> Result<bool, KeyStoreError> {
        let mut state = self.lock();
        let stamp = store.stamp();
        if stamp == state.0 {
            return Ok(false);
        }
        let file = store.load()?;
        *state = (stamp, Arc::new(KeyIndex::from_file(&file)));
        // Under the lock: `current` never pairs the new index with the
        // old generation for longer than this store takes, and a shard
        // that sees the new generation finds the new index.
        self.generation.fetch_add(1, Ordering::SeqCst);
        Ok(true)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Option<FileStamp>, Arc<KeyIndex>)> {
        // A panic while holding the lock cannot leave the pair half
        // written (it is assigned whole), so a poisoned lock is still good.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A shard's cached copy of the current index.
#[derive(Debug)]
pub struct CachedKeys {
    /// The process-wide index.
    current: Arc<CurrentKeys>,
    /// The copy and the generation it belongs to.
    cached: std::cell::RefCell<(u64, Arc<KeyIndex>)>,
}

impl CachedKeys {
    /// A copy of `current`, taken now.
    pub fn new(current: Arc<CurrentKeys>) -> CachedKeys {
        let cached = current.current();
        CachedKeys {
            current,
            cached: std::cell::RefCell::new(cached),
        }
    }

    /// The current index: the cached copy while its generation is the
    /// current one, otherwise the new one (then cached).
    pub fn get(&self) -> Arc<KeyIndex> {
        let generation = self.current.generation();
        let mut cached = self.cached.borrow_mut();
        if cached.0 != generation {
            *cached = self.current.current();
        }
        cached.1.clone()
    }

    /// The process-wide index behind this copy.
    pub fn shared(&self) -> &CurrentKeys {
        &self.current
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_swap_by_one_holder_is_seen_by_every_cached_copy() {
        let dir = std::env::temp_dir().join(format!(
            "hookstream-current-keys-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let store = KeyStore::new(&dir);
        let created = store.create("k", "org_a").unwrap();
        let current = Arc::new(CurrentKeys::new(
            store.stamp(),
            KeyIndex::from_file(&store.load().unwrap()),
        ));
        let first = CachedKeys::new(current.clone());
        let second = CachedKeys::new(current.clone());
        assert!(first.get().authenticate(&created.key).is_some());
        assert!(second.get().authenticate(&created.key).is_some());
        assert!(!current.refresh(&store).unwrap(), "nothing changed yet");

        store.revoke(&created.record.id).unwrap();
        // One holder refreshes; the other, which did nothing, refuses too.
        assert!(current.refresh(&store).unwrap());
        assert!(second.get().authenticate(&created.key).is_none());
        assert!(first.get().authenticate(&created.key).is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
