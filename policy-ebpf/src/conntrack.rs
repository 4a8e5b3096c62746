//! Connection tracking: flows that were let through once pass without a policy lookup,
//! in both directions, until their lifetime runs out.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_coarse_ns};
use policy_common::{
    Direction, proto,
    conntrack::*,
};

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use crate::{
    maps::{CONFIG, CONNTRACK, CT_RELEASED, CT_USAGE, FRAGMENTS},
    parse::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, Tuple},
};

/// Monotonic time at tick resolution: lifetimes are seconds long, and the coarse clock is a
/// cached read where the precise one reads the clock source on every packet.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: a helper with no arguments and no preconditions.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// The key of `tuple` on `endpoint`, normalised to the pod's side so that both directions of
/// a flow find the same entry.
#[inline(always)]
pub fn key(endpoint: u32, family: u8, tuple: &Tuple, direction: Direction) -> CtKey {
    match direction {
        // Leaving the pod: the pod is the source.
        Direction::Egress => CtKey::new(endpoint, family, tuple.protocol, tuple.src, tuple.sport, tuple.dst, tuple.dport),
        Direction::Ingress => CtKey::new(endpoint, family, tuple.protocol, tuple.dst, tuple.dport, tuple.src, tuple.sport),
    }
}

#[inline(always)]
fn lifetime(protocol: u8, tcp_flags_seen: u8) -> u64 {
    match protocol {
        proto::TCP => {
            if tcp_flags_seen & (TCP_SEEN_FIN | TCP_SEEN_RST) != 0 {
                LIFETIME_TCP_CLOSING_NS
            } else if tcp_flags_seen & TCP_SEEN_ACK != 0 {
                LIFETIME_TCP_ESTABLISHED_NS
            } else {
                LIFETIME_TCP_OPENING_NS
            }
        }
        proto::UDP => LIFETIME_UDP_NS,
        proto::SCTP => LIFETIME_SCTP_NS,
        proto::ICMP | proto::ICMPV6 => LIFETIME_ICMP_NS,
        _ => LIFETIME_OTHER_NS,
    }
}

/// What a conntrack hit says about the packet.
pub enum Tracked {
    /// Same direction as the first packet.
    Established,
    Reply,
}

/// The live entry of the packet's flow, if any. An expired one is removed on the way, which
/// returns its slot to the endpoint's budget.
#[inline(always)]
pub fn find(key: &CtKey, time: u64) -> Option<&'static mut CtValue> {
    let entry = CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: the pointer from a successful lookup is valid for this program run; concurrent
    // writers on other CPUs only store whole aligned words, which is benign for a lifetime.
    let entry = unsafe { &mut *entry };
    if entry.expires_ns < time {
        forget(key, entry.origin);
        return None;
    }
    Some(entry)
}

/// Removes a flow (expired, or its verdict revoked) opened in `origin`, and counts it.
#[inline(always)]
pub fn forget(key: &CtKey, origin: u8) {
    if CONNTRACK.remove(key).is_ok() {
        usage_add(usage_slot(key.endpoint, origin), false);
    }
}

/// Follows the TCP state of a live entry and refreshes its lifetime in place (no map update
/// on the fast path); says which way the packet goes relative to the opening one.
#[inline(always)]
pub fn track(entry: &mut CtValue, packet: &Packet, direction: Direction, time: u64) -> Tracked {
    let origin = entry.origin;
    let mut seen = entry.tcp_flags;
    if packet.tuple.protocol == proto::TCP {
        if packet.tcp_flags & TCP_RST != 0 {
            seen |= TCP_SEEN_RST;
        }
        if packet.tcp_flags & TCP_FIN != 0 {
            seen |= TCP_SEEN_FIN;
        }
        // Half open once the side that did not open has answered; complete (the long
        // lifetime) only when the opener acknowledges that answer, so a peer that never
        // finishes the handshake cannot hold a pod's entries for hours.
        if packet.tcp_flags & TCP_ACK != 0 {
            if origin != direction as u8 {
                seen |= TCP_SEEN_REPLY;
            } else if seen & TCP_SEEN_REPLY != 0 {
                seen |= TCP_SEEN_ACK;
            }
        }
        // A new SYN on a closing tuple reopens it.
        if packet.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN && origin == direction as u8 {
            seen = 0;
        }
    }
    let expires = time + lifetime(packet.tuple.protocol, seen);
    // Write only when something changed by more than a second, to keep the cache line
    // shared between CPUs on the established path.
    if seen != entry.tcp_flags || expires > entry.expires_ns + 1_000_000_000 || expires < entry.expires_ns {
        entry.tcp_flags = seen;
        entry.expires_ns = expires;
    }
    if origin == direction as u8 { Tracked::Established } else { Tracked::Reply }
}

/// Looks up the flow an ICMP error is about (its reversed tuple); no refresh.
#[inline(always)]
pub fn related(key: &CtKey, time: u64) -> bool {
    // SAFETY: as in `lookup`; read only.
    CONNTRACK.get_ptr(key).is_some_and(|entry| unsafe { (*entry).expires_ns >= time })
}

/// Adds one to a usage slot's `opened` or `closed` count.
#[inline(always)]
fn usage_add(slot: u32, opened: bool) {
    let Some(usage) = CT_USAGE.get_ptr_mut(slot) else { return };
    // SAFETY: a valid, aligned u64 in an array value that lives as long as the map; every
    // writer of these fields uses this atomic add (BPF_XADD: the generic BPF CPU has no
    // fetching atomics, so the result is not read).
    unsafe {
        let counter = if opened { &raw mut (*usage).opened } else { &raw mut (*usage).closed };
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, 1);
    }
}

/// Whether the endpoint may hold one more entry: what it opened minus what the classifier
/// and the agent closed stays under the budget. Check and add are two steps, so CPUs racing
/// for the last slots can overshoot by at most one entry each; the agent leaves that room.
#[inline(always)]
fn within_budget(slot: u32) -> bool {
    let budget = match CONFIG.get(0).map_or(0, |c| c.ct_budget) {
        0 => DEFAULT_BUDGET,
        set => set,
    } as u64;
    let released = CT_RELEASED.get(slot).map_or(0, |r| r.closed);
    let Some(usage) = CT_USAGE.get(slot) else { return false };
    // SAFETY: aligned u64s of a live array value; 64-bit loads are atomic on BPF.
    let (opened, closed) = unsafe { (core::ptr::read_volatile(&raw const usage.opened), core::ptr::read_volatile(&raw const usage.closed)) };
    opened.wrapping_sub(closed).wrapping_sub(released) < budget
}

/// Records a flow that was let through, judged under `revision`, if the endpoint's budget
/// allows. Without an entry the flow still passed; its later packets are judged by policy.
#[inline(always)]
pub fn create(key: &CtKey, packet: &Packet, direction: Direction, cookie: u32, revision: u32, flags: u8, time: u64) {
    let slot = usage_slot(key.endpoint, direction as u8);
    if !within_budget(slot) {
        return;
    }
    let mut seen = 0;
    if packet.tuple.protocol == proto::TCP && packet.tcp_flags & TCP_RST != 0 {
        seen = TCP_SEEN_RST;
    }
    let value = CtValue {
        expires_ns: time + lifetime(packet.tuple.protocol, seen),
        cookie,
        origin: direction as u8,
        tcp_flags: seen,
        flags,
        _pad: 0,
        revision,
        _pad2: 0,
    };
    // Another CPU may have inserted the same flow first: then nothing is counted.
    if CONNTRACK.insert(key, &value, BPF_NOEXIST as u64).is_ok() {
        usage_add(slot, true);
    }
}

#[inline(always)]
pub fn fragment_key(endpoint: u32, packet: &Packet, direction: Direction) -> FragKey {
    FragKey {
        endpoint,
        id: packet.fragment_id,
        family: packet.family,
        protocol: packet.tuple.protocol,
        direction: direction as u8,
        _pad: 0,
        src_addr: packet.tuple.src,
        dst_addr: packet.tuple.dst,
    }
}

/// Remembers that the first fragment of a datagram passed, so its later fragments may too.
#[inline(always)]
pub fn allow_fragments(key: &FragKey, time: u64) {
    let _ = FRAGMENTS.insert(key, &FragValue { expires_ns: time + LIFETIME_FRAGMENT_NS }, 0);
}

#[inline(always)]
pub fn fragments_allowed(key: &FragKey, time: u64) -> bool {
    // SAFETY: a value pointer from a successful lookup, read once.
    FRAGMENTS.get_ptr(key).is_some_and(|entry| unsafe { (*entry).expires_ns >= time })
}
