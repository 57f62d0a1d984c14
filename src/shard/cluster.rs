//! A shard in cluster mode (`--nats-url`): which orgs it follows in
//! JetStream, the upgrades and reads waiting for an org's follow to start,
//! and the events the bridge sends (`crate::cluster::FollowEvent`).
//!
//! A shard follows an org — receives every new message of its stream and
//! fans it out here — while it holds a connection of that org or served a
//! read of it in the last [`IDLE_RELEASE`]; the first upgrade or read
//! starts the follow, and the WebSocket `welcome` (whose `seq` must be the
//! org's seq on this node) waits for it. A sweep releases idle follows.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Handoff, Shard};
use crate::cluster::{Bridge, FollowEvent};

/// How long a follow without connections or readers is kept.
pub const IDLE_RELEASE: Duration = Duration::from_secs(30);
/// How long a read or an upgrade waits for a follow to start.
const FOLLOW_WAIT: Duration = Duration::from_secs(5);
/// How often idle follows are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// Most upgrades waiting for one org's follow.
const WAITING_UPGRADES_MAX: usize = 4096;

/// One org's follow on this shard.
enum Follow {
    /// Asked for; upgrades wait for it.
    Starting {
        generation: u64,
        upgrades: Vec<Handoff>,
    },
    /// Running: the org's seq is known here.
    Running { generation: u64, used: Instant },
}

/// A shard's cluster state.
pub struct ShardCluster {
    /// The NATS bridge.
    pub bridge: Arc<Bridge>,
    /// This node's id, in `connection_id`s.
    pub node_id: String,
    follows: RefCell<HashMap<String, Follow>>,
    /// Wakes reads waiting for a follow.
    started: crate::notify::Notify,
}

impl ShardCluster {
    /// The cluster state of a shard.
    pub fn new(bridge: Arc<Bridge>, node_id: String) -> ShardCluster {
        ShardCluster {
            bridge,
            node_id,
            follows: RefCell::new(HashMap::new()),
            started: crate::notify::Notify::default(),
        }
    }
}

fn cluster(shard: &Shard) -> &ShardCluster {
    shard.cluster.as_ref().expect("cluster mode")
}

/// Starts following `org` unless it is followed or starting.
fn request(shard: &Shard, org: &str) {
    let c = cluster(shard);
    let mut follows = c.follows.borrow_mut();
    if !follows.contains_key(org) {
        let generation = c.bridge.follow(shard.id, org);
        follows.insert(
            org.to_string(),
            Follow::Starting {
                generation,
                upgrades: Vec::new(),
            },
        );
    }
}

/// An upgrade for `org` in cluster mode: adopted now when the org is
/// followed, else kept until its follow starts. Returns the handoff when
/// it can be adopted now.
pub fn adopt_or_wait(shard: &Shard, handoff: Handoff) -> Option<Handoff> {
    let org = handoff.org_id.clone();
    request(shard, &org);
    let c = cluster(shard);
    let mut follows = c.follows.borrow_mut();
    match follows.get_mut(&org) {
        Some(Follow::Running { used, .. }) => {
            *used = Instant::now();
            Some(handoff)
        }
        Some(Follow::Starting { upgrades, .. }) if upgrades.len() < WAITING_UPGRADES_MAX => {
            upgrades.push(handoff);
            None
        }
        _ => {
            drop(follows);
            refuse(handoff);
            None
        }
    }
}

/// Answers a waiting upgrade 503 (NATS not reachable).
fn refuse(mut handoff: Handoff) {
    let fd = std::mem::replace(&mut handoff.fd, -1);
    if handoff.tls.is_some() {
        // SAFETY: we own `fd` (moved out of the handoff).
        unsafe { libc::close(fd) };
        return;
    }
    let mut out = Vec::with_capacity(160);
    crate::protocol::http::write_error(
        &mut out,
        503,
        &[("Retry-After", "1"), ("Connection", "close")],
    );
    super::public::send_and_close(fd, &out);
}

/// Waits until `org` is followed here (its seq known), starting the
/// follow if needed; false when it could not start in time.
pub async fn ensure_followed(shard: &Shard, org: &str) -> bool {
    let deadline = Instant::now() + FOLLOW_WAIT;
    loop {
        let seen = cluster(shard).started.generation();
        request(shard, org);
        if let Some(Follow::Running { used, .. }) = cluster(shard).follows.borrow_mut().get_mut(org)
        {
            *used = Instant::now();
            return true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        futures_lite::future::or(
            async {
                cluster(shard).started.wait(seen).await;
            },
            async {
                glommio::timer::sleep(left.min(Duration::from_millis(500))).await;
            },
        )
        .await;
    }
}

/// Follows every org of `orgs` (hot upgrade: the orgs of the connections
/// handed over), all started at once; an error names one that could not
/// start in time.
pub async fn follow_all<'a>(
    shard: &Shard,
    orgs: impl IntoIterator<Item = &'a str> + Clone,
) -> Result<(), String> {
    for org in orgs.clone() {
        request(shard, org);
    }
    for org in orgs {
        if !ensure_followed(shard, org).await {
            return Err(format!(
                "cluster: cannot follow org {org} within {} s",
                FOLLOW_WAIT.as_secs()
            ));
        }
    }
    Ok(())
}

/// What the bridge sent this shard.
pub fn on_event(shard: &Shard, event: FollowEvent) {
    let c = cluster(shard);
    let log = shard.history.log().cluster().expect("cluster log");
    match event {
        FollowEvent::Followed {
            org,
            generation,
            result,
        } => {
            let upgrades = {
                let mut follows = c.follows.borrow_mut();
                match follows.get(&org) {
                    Some(Follow::Starting { generation: g, .. }) if *g == generation => {}
                    _ => return,
                }
                let Some(Follow::Starting { upgrades, .. }) = follows.remove(&org) else {
                    unreachable!("looked at above");
                };
                if let Ok((first, last)) = result {
                    log.followed(&org, first, last);
                    shard.registry.borrow_mut().set_org_seq(&org, last);
                    follows.insert(
                        org.clone(),
                        Follow::Running {
                            generation,
                            used: Instant::now(),
                        },
                    );
                }
                upgrades
            };
            match result {
                Ok(_) => {
                    for handoff in upgrades {
                        super::public::adopt(shard, handoff);
                    }
                }
                Err(e) => {
                    eprintln!("hookstream: cluster: cannot follow {org}: {e}");
                    c.bridge.unfollow(&org);
                    upgrades.into_iter().for_each(refuse);
                }
            }
            c.started.notify();
        }
        FollowEvent::Arrived {
            org,
            generation,
            batch,
        } => {
            if current(c, &org, generation) {
                shard.history.arrive(batch);
            }
        }
        FollowEvent::Trimmed {
            org,
            generation,
            through,
        } => {
            if current(c, &org, generation) {
                log.trimmed(&org, through);
            }
        }
    }
}

fn current(c: &ShardCluster, org: &str, generation: u64) -> bool {
    matches!(c.follows.borrow().get(org), Some(Follow::Running { generation: g, .. }) if *g == generation)
}

/// Releases the follows of orgs with no connection here and no read for
/// [`IDLE_RELEASE`]; runs for the life of the shard.
pub async fn sweep_loop(shard: Rc<Shard>) {
    loop {
        glommio::timer::sleep(SWEEP_EVERY).await;
        let c = cluster(&shard);
        let idle: Vec<String> = {
            let registry = shard.registry.borrow();
            c.follows
                .borrow()
                .iter()
                .filter_map(|(org, follow)| match follow {
                    Follow::Running { used, .. }
                        if used.elapsed() >= IDLE_RELEASE
                            && registry.org_connection_count(org) == 0 =>
                    {
                        Some(org.clone())
                    }
                    _ => None,
                })
                .collect()
        };
        let log = shard.history.log().cluster().expect("cluster log");
        for org in idle {
            c.bridge.unfollow(&org);
            c.follows.borrow_mut().remove(&org);
            log.forget(&org);
        }
    }
}
