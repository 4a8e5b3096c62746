//! Policy entries (allow or deny), keyed by (endpoint, peer identity, direction, protocol,
//! port).
//!
//! Logically one longest-prefix-match table (as in Cilium's `policy.h`): protocol and port
//! come last so that "any port of a protocol" and port ranges are prefixes; a full key is 96
//! bits, a whole protocol 80, any protocol 72, an `endPort` block 81 to 95. The kernel keeps it
//! in two maps so that the cost stays flat as entries grow: exact ports, whole protocols and
//! any protocol in a hash map (the wildcard fields are zero: port 0 and protocol 0 never occur
//! as real ones, and matching them is what the wildcard allows anyway), and port blocks in an
//! LPM trie. The classifier looks up the peer's identity, then the wildcard identity
//! [`ANY`], each in longest-prefix order (exact, block, protocol, any protocol), and only the
//! kinds the endpoint's [`lookups`] mask says exist. The first entry found decides: its
//! [`PolicyValue`] says allow or deny (the compiler resolves tiers, so the first hit carries
//! the right action); a pod with no matching entry in a judged direction is dropped.
//!
//! [`ANY`]: crate::identity::ANY
//! [`lookups`]: crate::endpoint::EndpointInfo::lookups

use bytemuck::{Pod, Zeroable};

use crate::Direction;

/// Capacity of the hash map of exact, protocol and any-protocol entries.
pub const MAX_ENTRIES: u32 = 65_536;
/// Capacity of the trie of `endPort` blocks.
pub const MAX_RANGE_ENTRIES: u32 = 16_384;
/// Prefix length of a key that matches one port exactly.
pub const PREFIX_FULL: u32 = 96;
/// Prefix length of a key that matches every port of its protocol.
pub const PREFIX_PROTOCOL: u32 = 80;
/// Prefix length of a key that matches every protocol and port.
pub const PREFIX_ANY_PROTOCOL: u32 = 72;

/// Data part of the policy LPM key; integers are big-endian so ranges are bit prefixes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Pod, Zeroable)]
pub struct PolicyKey {
    endpoint: [u8; 4],
    identity: [u8; 4],
    direction: u8,
    protocol: u8,
    port: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<PolicyKey>() == 12);

impl PolicyKey {
    pub const fn new(endpoint: u32, identity: u32, direction: Direction, protocol: u8, port: u16) -> Self {
        Self {
            endpoint: endpoint.to_be_bytes(),
            identity: identity.to_be_bytes(),
            direction: direction as u8,
            protocol,
            port: port.to_be_bytes(),
        }
    }

    pub const fn endpoint(&self) -> u32 {
        u32::from_be_bytes(self.endpoint)
    }

    pub const fn identity(&self) -> u32 {
        u32::from_be_bytes(self.identity)
    }

    pub const fn direction(&self) -> Option<Direction> {
        Direction::from_u8(self.direction)
    }

    pub const fn protocol(&self) -> u8 {
        self.protocol
    }

    pub const fn port(&self) -> u16 {
        u16::from_be_bytes(self.port)
    }

    /// The prefix length of an entry of the hash map, from its wildcard fields.
    pub const fn hash_prefix_len(&self) -> u32 {
        if self.protocol == 0 {
            PREFIX_ANY_PROTOCOL
        } else if self.port() == 0 {
            PREFIX_PROTOCOL
        } else {
            PREFIX_FULL
        }
    }
}

/// Whether an entry of this prefix length is a port block (it goes to the range trie).
pub const fn is_port_block(prefix_len: u32) -> bool {
    prefix_len > PREFIX_PROTOCOL && prefix_len < PREFIX_FULL
}

/// Bits of an endpoint's per-direction lookup mask: which kinds of entries exist, so the
/// classifier skips lookups that cannot hit. The low nibble is for the peer's own identity,
/// the high one for the wildcard identity.
pub mod lookup {
    pub const EXACT: u8 = 1 << 0;
    pub const PORT_BLOCK: u8 = 1 << 1;
    pub const PROTOCOL: u8 = 1 << 2;
    pub const ANY_PROTOCOL: u8 = 1 << 3;
    /// Shift of the wildcard identity's nibble.
    pub const ANY_IDENTITY_SHIFT: u8 = 4;

    /// The mask bit of an entry with this prefix length and identity.
    pub const fn bit(prefix_len: u32, identity: u32) -> u8 {
        let kind = if prefix_len == super::PREFIX_FULL {
            EXACT
        } else if super::is_port_block(prefix_len) {
            PORT_BLOCK
        } else if prefix_len == super::PREFIX_PROTOCOL {
            PROTOCOL
        } else {
            ANY_PROTOCOL
        };
        if identity == crate::identity::ANY { kind << ANY_IDENTITY_SHIFT } else { kind }
    }
}

/// The action of an entry that lets the flow through.
pub const ACTION_ALLOW: u32 = 0;
/// The action of an entry that drops the flow (a ClusterNetworkPolicy Deny that wins over
/// any allow). Any other value drops too: the kernel fails closed on values it does not know.
pub const ACTION_DENY: u32 = 1;

/// What an entry carries: the agent's precomputed verdict and the rule that produced it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct PolicyValue {
    /// Names the policy rule that decided; the agent maps it back to a name.
    pub cookie: u32,
    /// [`ACTION_ALLOW`] or [`ACTION_DENY`].
    pub action: u32,
}
const _: () = assert!(core::mem::size_of::<PolicyValue>() == 8);

impl PolicyValue {
    pub const fn allow(cookie: u32) -> Self {
        Self { cookie, action: ACTION_ALLOW }
    }

    pub const fn deny(cookie: u32) -> Self {
        Self { cookie, action: ACTION_DENY }
    }

    pub const fn allows(&self) -> bool {
        self.action == ACTION_ALLOW
    }
}

/// Cookie of the entries that let the node reach its pods (kubelet probes).
pub const COOKIE_NODE: u32 = 1;
/// Cookie of the entries that allow what no policy decided (a direction that only
/// ClusterNetworkPolicies select, for peers none of their rules matched).
pub const COOKIE_DEFAULT_ALLOW: u32 = 2;
/// Cookie of the deny entries that keep NetworkPolicy isolation where a less specific
/// entry (a ClusterNetworkPolicy's) would otherwise match: no NetworkPolicy rule allows.
pub const COOKIE_ISOLATED: u32 = 3;
/// Cookies at or above this name a (policy, direction, rule) of the cluster.
pub const FIRST_RULE_COOKIE: u32 = 16;

/// A port range as an LPM block: `port` with its top `bits` bits significant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortPrefix {
    pub port: u16,
    /// 0..=16 significant bits of `port`.
    pub bits: u8,
}

impl PortPrefix {
    /// The LPM prefix length of a key for this port block.
    pub const fn lpm_prefix_len(&self) -> u32 {
        PREFIX_PROTOCOL + self.bits as u32
    }

    /// Whether every port of `inner` lies in this block.
    pub const fn contains(&self, inner: &PortPrefix) -> bool {
        self.bits <= inner.bits && (self.bits == 0 || (self.port ^ inner.port) >> (16 - self.bits) == 0)
    }

    pub const fn first(&self) -> u16 {
        self.port
    }

    pub const fn last(&self) -> u16 {
        let span = if self.bits == 0 { u16::MAX } else { (1u16 << (16 - self.bits)).wrapping_sub(1) };
        self.port | span
    }
}

/// Splits the inclusive range `first..=last` into the fewest aligned power-of-two blocks
/// (at most 30 for a 16-bit range), so that `endPort` never expands to one entry per port.
pub struct PortRangePrefixes {
    next: u32,
    last: u32,
}

impl PortRangePrefixes {
    pub const fn new(first: u16, last: u16) -> Self {
        if first > last {
            // An empty range yields nothing.
            Self { next: 1, last: 0 }
        } else {
            Self { next: first as u32, last: last as u32 }
        }
    }
}

impl Iterator for PortRangePrefixes {
    type Item = PortPrefix;

    fn next(&mut self) -> Option<PortPrefix> {
        if self.next > self.last {
            return None;
        }
        let start = self.next;
        // The largest block aligned at `start` that stays inside the range.
        let mut size_log2 = if start == 0 { 16 } else { start.trailing_zeros().min(16) };
        while size_log2 > 0 && start + (1 << size_log2) - 1 > self.last {
            size_log2 -= 1;
        }
        self.next = start + (1 << size_log2);
        Some(PortPrefix { port: start as u16, bits: (16 - size_log2) as u8 })
    }
}

crate::user_pod!(PolicyKey, PolicyValue);

#[cfg(test)]
mod tests {
    use super::*;

    fn covered(first: u16, last: u16) -> (u32, usize) {
        let mut total = 0u32;
        let mut count = 0;
        let mut expect = first as u32;
        for p in PortRangePrefixes::new(first, last) {
            assert_eq!(p.first() as u32, expect, "blocks are contiguous");
            assert!(p.first() <= p.last());
            total += p.last() as u32 - p.first() as u32 + 1;
            expect = p.last() as u32 + 1;
            count += 1;
        }
        (total, count)
    }

    #[test]
    fn ranges_split_into_exact_blocks() {
        for (first, last) in [(0, 65535), (1, 65535), (80, 80), (1000, 2000), (32000, 32768), (65535, 65535), (0, 0)] {
            let (total, count) = covered(first, last);
            assert_eq!(total, last as u32 - first as u32 + 1, "{first}..={last}");
            assert!(count <= 30, "{first}..={last} took {count} blocks");
        }
        assert_eq!(PortRangePrefixes::new(0, 65535).collect::<std::vec::Vec<_>>(), [PortPrefix { port: 0, bits: 0 }]);
        assert_eq!(PortRangePrefixes::new(80, 80).next().unwrap().lpm_prefix_len(), PREFIX_FULL);
        assert_eq!(PortRangePrefixes::new(5, 4).count(), 0);
    }

    #[test]
    fn policy_key_layout_is_big_endian() {
        let key = PolicyKey::new(0x0102_0304, 0x0506_0708, Direction::Egress, 6, 0x1f90);
        let bytes: &[u8] = bytemuck::bytes_of(&key);
        assert_eq!(bytes, [1, 2, 3, 4, 5, 6, 7, 8, 1, 6, 0x1f, 0x90]);
        assert_eq!((key.endpoint(), key.identity(), key.port()), (0x0102_0304, 0x0506_0708, 0x1f90));
        assert_eq!(key.direction(), Some(Direction::Egress));
    }
}
