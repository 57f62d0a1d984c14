//! Which shard owns an org: a fixed hash, so the mapping survives restarts
//! and builds. A leaf: the shard runtime routes sockets, publishes and
//! history reads by it, and the history finds its orgs' files by it.

/// Stable org → shard mapping (FNV-1a 64): the same org lands on the same
/// shard index across restarts and builds.
pub fn shard_for(org_id: &str, shards: usize) -> usize {
    debug_assert!(shards > 0, "at least one shard");
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in org_id.bytes() {
        hash ^= byte as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % shards as u64) as usize
}
