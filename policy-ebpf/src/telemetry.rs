//! Per-CPU counters for every verdict, and rate-limited verdict events for the flow log.

use bytemuck::Zeroable;
use policy_common::{
    Direction,
    counters::{self, Reason},
    event::{CONFIG_DEBUG_LOG, CONFIG_EVENTS_ALLOWED, CONFIG_EVENTS_DENIED, VerdictEvent},
};

use crate::{
    maps::{CONFIG, COUNTERS, EVENT_RATE, EVENTS},
    parse::Packet,
};

#[inline(always)]
pub fn count(endpoint: u32, direction: Direction, reason: Reason, bytes: u32) {
    let slot = reason.slot(endpoint, direction);
    if slot >= counters::MAX_ENTRIES {
        return;
    }
    if let Some(counter) = COUNTERS.get_ptr_mut(slot) {
        // SAFETY: a per-CPU slot: no other writer while this program runs on this CPU.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += bytes as u64;
        }
    }
}

/// Sends a verdict event if the config asks for this kind and the per-CPU budget allows.
#[inline(always)]
pub fn report(
    endpoint: u32,
    ifindex: u32,
    packet: &Packet,
    direction: Direction,
    reason: Reason,
    cookie: u32,
    peer_identity: u32,
    time: u64,
) {
    let Some(config) = CONFIG.get(0) else { return };
    let wanted = if reason.is_drop() || reason == Reason::PassAudit {
        CONFIG_EVENTS_DENIED
    } else {
        CONFIG_EVENTS_ALLOWED
    };
    if config.flags & wanted == 0 || !within_budget(config.events_per_sec, time) {
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<VerdictEvent>(0) else { return };
    let mut event: VerdictEvent = Zeroable::zeroed();
    // SAFETY: a helper with no arguments; the precise clock only for events (flow-log times).
    event.timestamp_ns = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
    event.endpoint = endpoint;
    event.ifindex = ifindex;
    event.cookie = cookie;
    event.peer_identity = peer_identity;
    event.reason = reason as u8;
    event.direction = direction as u8;
    event.protocol = packet.tuple.protocol;
    event.family = packet.family;
    event.src_addr = packet.tuple.src;
    event.dst_addr = packet.tuple.dst;
    event.set_ports(packet.tuple.sport, packet.tuple.dport);
    entry.write(event);
    entry.submit(0);
}

/// Whether the agent asked for aya-log drop logs (`--ebpf-debug`).
#[inline(always)]
pub fn debug_log_enabled() -> bool {
    CONFIG.get(0).is_some_and(|c| c.flags & CONFIG_DEBUG_LOG != 0)
}

/// A fixed one-second window per CPU: cheap, and bursts beyond it are counted, not sent.
#[inline(always)]
fn within_budget(per_sec: u32, time: u64) -> bool {
    let Some(state) = EVENT_RATE.get_ptr_mut(0) else { return false };
    // SAFETY: per-CPU state, only this program on this CPU writes it.
    let state = unsafe { &mut *state };
    if time.wrapping_sub(state.window_start_ns) >= 1_000_000_000 {
        state.window_start_ns = time;
        state.sent = 0;
    }
    if state.sent >= per_sec {
        state.suppressed = state.suppressed.wrapping_add(1);
        return false;
    }
    state.sent += 1;
    true
}
