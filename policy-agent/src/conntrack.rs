//! The agent's side of the conntrack budget: removing what the classifier cannot. Expired
//! flows nobody sends on again stay in the table until the periodic sweep takes them out, and
//! a departing endpoint's flows are flushed; every removal is credited back to the endpoint
//! in `CT_RELEASED_V1` (which only the agent writes), so its budget is free again.

use std::collections::BTreeMap;

use policy_common::conntrack::{CtKey, CtReleased, usage_slot};

use crate::{AgentError, datapath::Maps};

/// The clock the classifier reads (`bpf_ktime_get_coarse_ns`).
pub fn coarse_now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to write into; CLOCK_MONOTONIC_COARSE always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Removes the entries `doomed` selects; returns how many went, per usage slot (endpoint id
/// and opening direction), credited.
fn remove_where(maps: &mut Maps, mut doomed: impl FnMut(&CtKey, u64) -> bool) -> Result<BTreeMap<u32, u64>, AgentError> {
    let keys: Vec<CtKey> = maps.conntrack.keys().filter_map(Result::ok).collect();
    let mut removed: BTreeMap<u32, u64> = BTreeMap::new();
    for key in keys {
        let Ok(value) = maps.conntrack.get(&key, 0) else { continue };
        // Only what this call removed is credited: the classifier counts its own removals.
        if doomed(&key, value.expires_ns) && maps.conntrack.remove(&key).is_ok() {
            *removed.entry(usage_slot(key.endpoint, value.origin)).or_default() += 1;
        }
    }
    for (&slot, &n) in &removed {
        release(maps, slot, n)?;
    }
    Ok(removed)
}

fn release(maps: &mut Maps, slot: u32, n: u64) -> Result<(), AgentError> {
    let ebpf = |what: &str, e: aya::maps::MapError| AgentError::Ebpf { what: format!("{what} CT_RELEASED_V1[{slot}]"), source: Box::new(e) };
    let held = maps.ct_released.get(&slot, 0).map_err(|e| ebpf("read", e))?;
    maps.ct_released.set(slot, CtReleased { closed: held.closed + n }, 0).map_err(|e| ebpf("write", e))
}

/// Takes out every expired flow; returns how many.
pub fn sweep_expired(maps: &mut Maps) -> Result<u64, AgentError> {
    let now = coarse_now_ns();
    Ok(remove_where(maps, |_, expires| expires < now)?.values().sum())
}

/// Takes out every flow of an endpoint id that is going away, so that a pod that later gets
/// the id (and perhaps the address) inherits no flows and a full budget.
pub fn flush_endpoint(maps: &mut Maps, id: u32) -> Result<u64, AgentError> {
    Ok(remove_where(maps, |key, _| key.endpoint == id)?.values().sum())
}

/// Flows an endpoint holds, both opening directions, by the counts (what the budgets are
/// checked against).
pub fn held(maps: &Maps, id: u32) -> u64 {
    (0..2u8)
        .map(|origin| {
            let slot = usage_slot(id, origin);
            let usage = maps.ct_usage.get(&slot, 0).unwrap_or_default();
            let released = maps.ct_released.get(&slot, 0).unwrap_or_default();
            usage.opened.saturating_sub(usage.closed).saturating_sub(released.closed)
        })
        .sum()
}

/// The flows each endpoint may hold per opening direction: the table divided among the most
/// pods the node runs and two directions, less one per CPU (CPUs racing for an endpoint's
/// last slots may each take one), so that every budget always fits and no pod (nor any peer)
/// can take another's room.
pub fn budget(table_size: u32, max_pods: u32) -> u32 {
    let cpus = aya::util::nr_cpus().map_or(1, |n| n as u32);
    (table_size / max_pods.max(1) / 2).saturating_sub(cpus)
}
