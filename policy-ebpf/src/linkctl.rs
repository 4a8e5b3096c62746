//! IPv6 neighbour discovery and multicast listener messages: the link's own plumbing, passed
//! without a policy lookup, so they are held to the addressing rules of RFC 4861 and
//! RFC 3810. Anything else would be a channel around the policy: global addresses, remote
//! peers or kilobytes of payload.

use policy_common::{Direction, counters::Reason, endpoint::{EndpointInfo, FLAG_HAS_IPV6}, family, identity};

use crate::{
    lookup,
    parse::{MAX_ICMPV6_CONTROL, Packet},
};

const ROUTER_ADVERTISEMENT: u8 = 134;

/// The verdict for a message of type 130-136 or 143.
#[inline(always)]
pub fn verdict(endpoint: &EndpointInfo, packet: &Packet, direction: Direction) -> Reason {
    let (src, dst) = (&packet.tuple.src, &packet.tuple.dst);
    let addressed = match direction {
        // A pod is not a router: it never advertises one.
        Direction::Egress => {
            packet.icmp_type != ROUTER_ADVERTISEMENT
                && (own(endpoint, src) || link_local(src) || unspecified(src))
                && (link_local(dst) || link_multicast(dst) || node(dst))
        }
        // The node's address counts only if the node sent it (see lookup::peer_identity).
        Direction::Ingress => {
            (link_local(src) || unspecified(src) || (!packet.forwarded && node(src)))
                && (own(endpoint, dst) || link_local(dst) || link_multicast(dst))
        }
    };
    if addressed && packet.ip_len <= MAX_ICMPV6_CONTROL && packet.hop_limit == required_hop_limit(packet.icmp_type) {
        Reason::PassNonIp
    } else {
        Reason::DropFrame
    }
}

/// ND (133-136) must arrive with hop limit 255, proof that no router forwarded it; MLD
/// (130-132, 143) is sent with hop limit 1.
#[inline(always)]
fn required_hop_limit(icmp_type: u8) -> u8 {
    if (133..=136).contains(&icmp_type) { 255 } else { 1 }
}

#[inline(always)]
fn own(endpoint: &EndpointInfo, addr: &[u8; 16]) -> bool {
    endpoint.has(FLAG_HAS_IPV6) && *addr == endpoint.ipv6
}

/// fe80::/10
#[inline(always)]
fn link_local(addr: &[u8; 16]) -> bool {
    addr[0] == 0xfe && addr[1] & 0xc0 == 0x80
}

/// ff02::/16, link-scope multicast (all-nodes, all-routers, solicited-node, MLDv2 reports).
#[inline(always)]
fn link_multicast(addr: &[u8; 16]) -> bool {
    addr[0] == 0xff && addr[1] == 0x02
}

#[inline(always)]
fn unspecified(addr: &[u8; 16]) -> bool {
    *addr == [0; 16]
}

/// One of the node's own addresses (the agent maps them to HOST).
#[inline(always)]
fn node(addr: &[u8; 16]) -> bool {
    lookup::identity_of(family::IPV6, addr) == identity::HOST
}
