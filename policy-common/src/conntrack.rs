//! Connection tracking: one hash of flows that a policy (or a non-isolated direction) let
//! through, so that later packets and replies pass without a policy lookup.
//!
//! The table is a plain hash, not an LRU: an LRU evicts whichever flow is oldest node-wide, so
//! one pod opening flows would push out every other pod's. Instead every endpoint has a budget
//! of entries (`Config::ct_budget`, the table size divided by the node's maximum pod count),
//! counted in [`CtUsage`] and [`CtReleased`]; a pod that spends its budget stops getting new
//! state for itself, and nobody else notices. Expired entries are removed by the classifier
//! when it meets them and by the agent's sweep.
//!
//! The key is normalised to the pod's side (pod address and port first, the peer second), so
//! a packet in either direction finds the same entry with one lookup; `origin` in the value
//! says which way the connection was opened.

use bytemuck::{Pod, Zeroable};

pub const MAX_ENTRIES: u32 = 262_144;
/// The most pods a node runs unless the agent is told otherwise (kubelet's default).
pub const DEFAULT_MAX_PODS: u32 = 110;
/// The budget (per endpoint and opening direction) the classifier uses while the agent has
/// written none (a bare `attach`): the default table shared by the default pod count and two
/// directions, with room for 256 racing CPUs.
pub const DEFAULT_BUDGET: u32 = MAX_ENTRIES / DEFAULT_MAX_PODS / 2 - 256;

/// Lifetimes, in nanoseconds, refreshed on every packet of the flow.
pub const LIFETIME_TCP_OPENING_NS: u64 = 60 * NS_PER_SEC;
pub const LIFETIME_TCP_ESTABLISHED_NS: u64 = 6 * 3_600 * NS_PER_SEC;
/// After a FIN or RST: long enough for the last ACKs, short enough to free the slot.
pub const LIFETIME_TCP_CLOSING_NS: u64 = 10 * NS_PER_SEC;
pub const LIFETIME_UDP_NS: u64 = 60 * NS_PER_SEC;
pub const LIFETIME_SCTP_NS: u64 = 3_600 * NS_PER_SEC;
pub const LIFETIME_ICMP_NS: u64 = 30 * NS_PER_SEC;
pub const LIFETIME_OTHER_NS: u64 = 60 * NS_PER_SEC;
const NS_PER_SEC: u64 = 1_000_000_000;

/// TCP flags recorded in [`CtValue::tcp_flags`].
pub const TCP_SEEN_FIN: u8 = 1 << 0;
pub const TCP_SEEN_RST: u8 = 1 << 1;
/// The opening side acknowledged the other side's answer: the handshake is complete.
pub const TCP_SEEN_ACK: u8 = 1 << 2;
/// The side that did not open answered (a SYN-ACK): half open until the opener's ACK.
pub const TCP_SEEN_REPLY: u8 = 1 << 3;

/// [`CtValue::flags`]: the flow goes to a Service address, so its packets are handed on
/// unjudged (marked) and judged after the address translation; see [`crate::service`].
pub const CT_DEFERRED: u8 = 1 << 0;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct CtKey {
    pub endpoint: u32,
    pub family: u8,
    pub protocol: u8,
    pod_port: [u8; 2],
    peer_port: [u8; 2],
    _pad: [u8; 2],
    /// IPv4 addresses use the first four bytes, the rest stays zero.
    pub pod_addr: [u8; 16],
    pub peer_addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<CtKey>() == 44);

impl CtKey {
    pub const fn new(
        endpoint: u32,
        family: u8,
        protocol: u8,
        pod_addr: [u8; 16],
        pod_port: u16,
        peer_addr: [u8; 16],
        peer_port: u16,
    ) -> Self {
        Self {
            endpoint,
            family,
            protocol,
            pod_port: pod_port.to_be_bytes(),
            peer_port: peer_port.to_be_bytes(),
            _pad: [0; 2],
            pod_addr,
            peer_addr,
        }
    }

    pub const fn pod_port(&self) -> u16 {
        u16::from_be_bytes(self.pod_port)
    }

    pub const fn peer_port(&self) -> u16 {
        u16::from_be_bytes(self.peer_port)
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct CtValue {
    /// `bpf_ktime_get_ns` after which the entry no longer counts.
    pub expires_ns: u64,
    /// Cookie of the rule that allowed the first packet (0 when not isolated).
    pub cookie: u32,
    /// The [`Direction`](crate::Direction) of the first packet.
    pub origin: u8,
    pub tcp_flags: u8,
    /// [`CT_DEFERRED`] and future flags.
    pub flags: u8,
    pub _pad: u8,
    /// The endpoint's [`revision`](crate::endpoint::EndpointInfo::revision) when the flow
    /// was last judged.
    pub revision: u32,
    pub _pad2: u32,
}
const _: () = assert!(core::mem::size_of::<CtValue>() == 24);

/// Non-first fragments of a datagram whose first fragment passed; keyed like the IP
/// reassembly id. Only the first fragment carries ports, so this is how the rest are judged.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FragKey {
    pub endpoint: u32,
    pub id: u32,
    pub family: u8,
    pub protocol: u8,
    pub direction: u8,
    pub _pad: u8,
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<FragKey>() == 44);

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct FragValue {
    pub expires_ns: u64,
}
const _: () = assert!(core::mem::size_of::<FragValue>() == 8);

pub const FRAG_MAX_ENTRIES: u32 = 8_192;
/// Reassembly gives up after 30 s (ipfrag_time); so do we.
pub const LIFETIME_FRAGMENT_NS: u64 = 30 * NS_PER_SEC;

/// Per endpoint id and opening direction (index `id * 2 + direction`), written only by the
/// classifier (atomically): entries it inserted and entries it removed. The agent reads it.
/// Flows a peer opens and flows the pod opens have budgets of their own, so no peer can take
/// the room of the pod's own connections.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct CtUsage {
    pub opened: u64,
    pub closed: u64,
}
const _: () = assert!(core::mem::size_of::<CtUsage>() == 16);

/// Per endpoint id and opening direction, written only by the agent: entries its sweep and
/// flushes removed. Two
/// maps, because a whole-value write from user space would race the classifier's atomics.
/// An endpoint holds `opened - closed - released` entries.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct CtReleased {
    pub closed: u64,
}
const _: () = assert!(core::mem::size_of::<CtReleased>() == 8);

/// Slots of the usage maps: one per endpoint id and opening direction.
pub const USAGE_SLOTS: u32 = crate::endpoint::MAX_ENTRIES * 2;

/// The usage slot of flows of `endpoint` opened in `origin` (a [`crate::Direction`] value).
pub const fn usage_slot(endpoint: u32, origin: u8) -> u32 {
    endpoint * 2 + (origin & 1) as u32
}

crate::user_pod!(CtKey, CtValue, FragKey, FragValue, CtUsage, CtReleased);
