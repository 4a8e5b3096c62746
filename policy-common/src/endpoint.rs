//! Endpoints: the local pods the classifier is attached to, keyed by host-side ifindex.

use bytemuck::{Pod, Zeroable};

pub const MAX_ENTRIES: u32 = 4_096;

/// The pod is isolated for ingress: new inbound flows need a policy entry.
pub const FLAG_INGRESS_ISOLATED: u32 = 1 << 0;
/// The pod is isolated for egress: new outbound flows need a policy entry.
pub const FLAG_EGRESS_ISOLATED: u32 = 1 << 1;
/// Count and report drops, but let the packets pass.
pub const FLAG_AUDIT: u32 = 1 << 2;
/// `ipv4` holds the pod's address (checked against the source of packets leaving the pod).
pub const FLAG_HAS_IPV4: u32 = 1 << 3;
/// `ipv6` holds the pod's address.
pub const FLAG_HAS_IPV6: u32 = 1 << 4;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct EndpointKey {
    pub ifindex: u32,
}
const _: () = assert!(core::mem::size_of::<EndpointKey>() == 4);

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct EndpointInfo {
    /// Endpoint id used in policy and conntrack keys and as the counter slot
    /// (`1..MAX_ENTRIES`; 0 is the slot of traffic on an interface with no endpoint).
    pub id: u32,
    pub flags: u32,
    pub ipv4: [u8; 4],
    pub ipv6: [u8; 16],
    /// Per direction (indexed by [`Direction`](crate::Direction)), which kinds of policy
    /// entries exist ([`policy::lookup`](crate::policy::lookup) bits).
    pub lookups: [u8; 2],
    pub _pad: [u8; 2],
    /// Changes whenever anything that could change a verdict of this endpoint changes (its
    /// flags, its allow entries, the identities of addresses). A conntrack entry written
    /// under another revision is judged again before it lets a packet through, so a revoked
    /// flow (or one opened in audit mode) is cut and one still allowed is kept.
    pub revision: u32,
}
const _: () = assert!(core::mem::size_of::<EndpointInfo>() == 36);

impl EndpointInfo {
    pub const fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }

    pub const fn isolated_any(&self) -> bool {
        self.flags & (FLAG_INGRESS_ISOLATED | FLAG_EGRESS_ISOLATED) != 0
    }
}

crate::user_pod!(EndpointKey, EndpointInfo);
