//! The heartbeat: one shared ping frame to every connection each interval,
//! a slice of the connections per tick; a connection silent for two
//! intervals is closed with 1008.

use std::rc::Rc;
use std::time::{Duration, Instant};

use super::{wire, Shard};
use crate::protocol::ws::CloseCode;
use crate::registry::Delivered;

/// Most slices the heartbeat interval is cut into.
const HEARTBEAT_SLICES_MAX: u64 = 30;

/// Pings every connection each `heartbeat_ms`; closes the ones that have not
/// sent anything for two intervals. The interval is cut into slices (one
/// per 100 ms, at most [`HEARTBEAT_SLICES_MAX`]) and each tick pings the
/// connections of one slice (slab index modulo the slice count), so every
/// connection is still pinged once per interval but a shard never pings
/// all of its connections at once: 100,000 pings in one go would hold the
/// core for most of a second and delay every broadcast behind them.
pub async fn heartbeat_loop(shard: Rc<Shard>) {
    let interval = Duration::from_millis(shard.config.heartbeat_ms);
    let slices = (shard.config.heartbeat_ms / 100).clamp(1, HEARTBEAT_SLICES_MAX) as usize;
    let tick = interval / slices as u32;
    let mut ping_frame = [0u8; 14];
    let len = crate::protocol::ws::encode_header(
        &mut ping_frame,
        true,
        crate::protocol::ws::Opcode::Ping,
        0,
        None,
    );
    let ping: crate::registry::Frame = Rc::from(&ping_frame[..len]);
    let mut next = Instant::now() + tick;
    let mut slice = 0usize;
    // Kept across ticks: its lists only grow to what one tick needs.
    let mut outcome = Delivered::default();
    loop {
        glommio::timer::sleep(next.saturating_duration_since(Instant::now())).await;
        next += tick;
        if !shard.handover.serving() {
            // Frozen or retiring (hot upgrade): no pings; the new process
            // carries on with each connection's count of missed pongs.
            continue;
        }
        {
            let mut registry = shard.registry.borrow_mut();
            registry.for_each_in_slice(slice, slices, |registry, key| {
                let Some(conn) = registry.get_mut(key) else {
                    return;
                };
                if !conn.state.can_send() {
                    return;
                }
                if conn.missed_pongs >= 2 {
                    registry.request_close(key, CloseCode::POLICY);
                } else {
                    conn.missed_pongs += 1;
                    // Written at once: an idle connection gets no queue.
                    registry.write_or_queue(key, &ping, &mut wire(), &mut outcome);
                }
            });
            shard.act_on(&mut registry, &mut outcome);
        }
        slice = (slice + 1) % slices;
        shard.flush_dirty().await;
    }
}
