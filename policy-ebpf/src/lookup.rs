//! Identity and policy lookups: the peer address to an identity (whole addresses in a hash
//! map, then ipBlock prefixes in an LPM trie), then the allow entry for (endpoint, identity,
//! direction, protocol, port): the peer's identity first, then the wildcard identity, each in
//! longest-prefix order (as in Cilium's policy.h). The first entry found decides, allow or
//! deny: the compiler makes sure it carries the right action. Only the kinds of entries the endpoint's
//! mask says exist are looked up, so a typical pod costs one or two hash lookups however
//! many entries the node holds.

use aya_ebpf::maps::lpm_trie::Key;
use policy_common::{
    Direction, family, identity,
    ipcache::IpcacheKey,
    policy::{self, PolicyKey, PolicyValue, lookup},
};

use crate::{
    maps::{ADDRESSES, POLICY, PORT_RANGES, PREFIXES},
    parse::Packet,
};

/// The ipcache key of a whole address, with its address bits (32 or 128).
#[inline(always)]
pub fn address_key(addr_family: u8, addr: &[u8; 16]) -> (IpcacheKey, u8) {
    if addr_family == family::IPV4 {
        (IpcacheKey::v4([addr[0], addr[1], addr[2], addr[3]]), 32)
    } else {
        (IpcacheKey::v6(*addr), 128)
    }
}

#[inline(always)]
pub fn identity_of(addr_family: u8, addr: &[u8; 16]) -> u32 {
    let (key, bits) = address_key(addr_family, addr);
    if let Some(value) = ADDRESSES.get_ptr(&key) {
        // SAFETY: a value pointer from a successful lookup, read once.
        return unsafe { (*value).identity };
    }
    match PREFIXES.get(Key::new(IpcacheKey::lpm_prefix_len(bits), key)) {
        Some(value) => value.identity,
        None => identity::WORLD,
    }
}

/// The identity of the packet's peer. Towards a pod, the node's own addresses (HOST) are
/// believed only from the node itself: a packet that came in on another interface with a
/// node address as its source was forged (IPv6 has no martian-source check), and is WORLD.
#[inline(always)]
pub fn peer_identity(packet: &Packet, peer: &[u8; 16], direction: Direction) -> u32 {
    let id = identity_of(packet.family, peer);
    if id == identity::HOST && direction == Direction::Ingress && packet.forwarded { identity::WORLD } else { id }
}

/// The action marker of a lookup that found no entry (never stored: the kernel reads every
/// stored action other than allow as deny, see [`hash_entry`]).
pub const MISS: u32 = u32::MAX;

/// The entry that decides this flow: its cookie and action, or [`MISS`]. `mask` is the
/// endpoint's lookup mask for the direction. A plain value, not an `Option<PolicyValue>`:
/// the verifier refused the latter.
#[inline(always)]
pub fn decision(endpoint: u32, mask: u8, peer: u32, direction: Direction, protocol: u8, port: u16) -> PolicyValue {
    let hit = decision_for(endpoint, mask, peer, direction, protocol, port);
    if hit.action != MISS {
        return hit;
    }
    decision_for(endpoint, mask >> lookup::ANY_IDENTITY_SHIFT, identity::ANY, direction, protocol, port)
}

/// Longest prefix first; the first entry found decides, whatever its action.
#[inline(always)]
fn decision_for(endpoint: u32, mask: u8, identity: u32, direction: Direction, protocol: u8, port: u16) -> PolicyValue {
    // Exact entries never name port 0 (a port without a number is the whole protocol).
    if port != 0 && mask & lookup::EXACT != 0 {
        let hit = hash_entry(PolicyKey::new(endpoint, identity, direction, protocol, port));
        if hit.action != MISS {
            return hit;
        }
    }
    if mask & lookup::PORT_BLOCK != 0
        && let Some(value) = PORT_RANGES.get(Key::new(policy::PREFIX_FULL, PolicyKey::new(endpoint, identity, direction, protocol, port)))
    {
        return known(value.cookie, value.action);
    }
    if mask & lookup::PROTOCOL != 0 {
        let hit = hash_entry(PolicyKey::new(endpoint, identity, direction, protocol, 0));
        if hit.action != MISS {
            return hit;
        }
    }
    if mask & lookup::ANY_PROTOCOL != 0 {
        return hash_entry(PolicyKey::new(endpoint, identity, direction, 0, 0));
    }
    PolicyValue { cookie: 0, action: MISS }
}

#[inline(always)]
fn hash_entry(key: PolicyKey) -> PolicyValue {
    match POLICY.get_ptr(&key) {
        // SAFETY: a value pointer from a successful lookup, read once.
        Some(value) => unsafe { known((*value).cookie, (*value).action) },
        None => PolicyValue { cookie: 0, action: MISS },
    }
}

/// A stored entry: allow stays allow, every other action (deny, or one this program does
/// not know) is deny, so an unknown value fails closed and never reads as a miss.
#[inline(always)]
fn known(cookie: u32, action: u32) -> PolicyValue {
    PolicyValue { cookie, action: if action == policy::ACTION_ALLOW { policy::ACTION_ALLOW } else { policy::ACTION_DENY } }
}
