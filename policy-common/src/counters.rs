//! Per-CPU packet counters, one slot per (endpoint id, direction, reason), in a per-CPU
//! array: index = `(endpoint * 2 + direction) * REASON_SLOTS + reason`.

use bytemuck::{Pod, Zeroable};

use crate::{Direction, endpoint};

/// Why the classifier passed or dropped a packet.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// The pod is not isolated in this direction.
    PassNotIsolated = 0,
    /// Not IPv4/IPv6 (ARP), or IPv6 neighbour discovery.
    PassNonIp = 1,
    /// A later packet of a flow the conntrack map knows, in its opening direction.
    PassEstablished = 2,
    /// A reply of a flow the conntrack map knows.
    PassReply = 3,
    /// A new flow that a policy entry allows.
    PassPolicy = 4,
    /// A non-first fragment of a datagram whose first fragment passed.
    PassFragment = 5,
    /// Would have been dropped, but the endpoint is in audit mode.
    PassAudit = 6,
    /// No endpoint entry for this interface (the agent does not manage it).
    PassUnmanaged = 7,
    /// A new flow with no policy entry.
    DropPolicy = 8,
    /// Truncated or malformed headers on an isolated pod.
    DropMalformed = 9,
    /// A non-first fragment with no allowed first fragment.
    DropFragment = 10,
    /// A packet leaving an isolated pod with a source address that is not the pod's.
    DropSpoofed = 11,
    /// A frame a pod interface never legitimately carries: a VLAN tag, an EtherType other
    /// than IPv4, IPv6 and ARP, ARP with another sender address, neighbour discovery or MLD
    /// that breaks its RFC's addressing rules, an ICMP redirect, an oversized ICMP error.
    DropFrame = 12,
    /// Egress towards a Service address: marked and handed on, to be judged after kube-proxy's
    /// translation as egress towards the backend (counted again there).
    PassDeferred = 13,
    /// A deferred packet whose marked endpoint is no longer on the node.
    DropStale = 14,
    /// A new flow that an entry denies (a ClusterNetworkPolicy Deny rule decided).
    DropDeny = 15,
}

/// Slots reserved per endpoint (room to add reasons without a layout change).
pub const REASON_SLOTS: u32 = 16;
pub const MAX_ENTRIES: u32 = endpoint::MAX_ENTRIES * 2 * REASON_SLOTS;

impl Reason {
    pub const ALL: [Reason; 16] = [
        Reason::PassNotIsolated,
        Reason::PassNonIp,
        Reason::PassEstablished,
        Reason::PassReply,
        Reason::PassPolicy,
        Reason::PassFragment,
        Reason::PassAudit,
        Reason::PassUnmanaged,
        Reason::DropPolicy,
        Reason::DropMalformed,
        Reason::DropFragment,
        Reason::DropSpoofed,
        Reason::DropFrame,
        Reason::PassDeferred,
        Reason::DropStale,
        Reason::DropDeny,
    ];

    pub const fn from_u32(value: u32) -> Option<Self> {
        if (value as usize) < Self::ALL.len() { Some(Self::ALL[value as usize]) } else { None }
    }

    pub const fn is_drop(self) -> bool {
        matches!(self, Reason::DropPolicy | Reason::DropMalformed | Reason::DropFragment | Reason::DropSpoofed | Reason::DropFrame | Reason::DropStale | Reason::DropDeny)
    }

    /// The `snake_case` name used in metrics and flow logs.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::PassNotIsolated => "not_isolated",
            Reason::PassNonIp => "non_ip",
            Reason::PassEstablished => "established",
            Reason::PassReply => "reply",
            Reason::PassPolicy => "policy",
            Reason::PassFragment => "fragment",
            Reason::PassAudit => "audit",
            Reason::PassUnmanaged => "unmanaged",
            Reason::DropPolicy => "drop_policy",
            Reason::DropMalformed => "drop_malformed",
            Reason::DropFragment => "drop_fragment",
            Reason::DropSpoofed => "drop_spoofed",
            Reason::DropFrame => "drop_frame",
            Reason::PassDeferred => "deferred",
            Reason::DropStale => "drop_stale",
            Reason::DropDeny => "drop_deny",
        }
    }

    pub const fn slot(self, endpoint: u32, direction: Direction) -> u32 {
        (endpoint * 2 + direction as u32) * REASON_SLOTS + self as u32
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Counter>() == 16);

crate::user_pod!(Counter);
