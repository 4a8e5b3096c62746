//! The TC classifier attached to each pod's host-side veth: TC ingress sees what leaves the
//! pod (its egress), TC egress what enters it (its ingress). It parses, looks up and
//! decides; every policy decision was made by the agent when it wrote the maps.
#![no_std]
#![no_main]
// Atomic adds on map values: core's AtomicU64 has no read-modify-write on BPF.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod conntrack;
mod linkctl;
mod lookup;
mod maps;
mod parse;
mod service;
mod telemetry;

use aya_log_ebpf::info;
use aya_ebpf::{
    bindings::{TC_ACT_SHOT, tcx_action_base::TCX_NEXT},
    helpers::bpf_skb_pull_data,
    macros::classifier,
    programs::TcContext,
};
use policy_common::{
    Direction, family, identity,
    conntrack::{CT_DEFERRED, CtKey, CtValue},
    counters::Reason,
    endpoint::{EndpointInfo, EndpointKey, FLAG_AUDIT, FLAG_EGRESS_ISOLATED, FLAG_HAS_IPV4, FLAG_HAS_IPV6, FLAG_INGRESS_ISOLATED},
    policy::ACTION_ALLOW,
};

use crate::{
    conntrack::Tracked,
    maps::ENDPOINTS,
    parse::{Fragment, Kind, Packet, ParseError},
};

/// Headers we may need in the linear part of the skb (Ethernet, IPv6 with extension
/// headers, an ICMP error quoting an IPv6 header and ports).
const PULL_BYTES: u32 = 256;

/// Traffic leaving the pod.
#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    classify(&ctx, Direction::Egress)
}

/// Traffic entering the pod. A packet some pod deferred (one towards a Service address,
/// since translated) is first judged as that pod's egress, wherever it now goes; so `to_pod`
/// also runs on the node's uplinks, where only such packets are judged.
#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    let deferred_by = service::deferred_by(&ctx);
    if deferred_by != 0 && late_egress(&ctx, deferred_by).is_drop() {
        return TC_ACT_SHOT as i32;
    }
    classify(&ctx, Direction::Ingress)
}

/// Passes hand the packet to the next program of the TCX chain (a CNI's own, say) rather
/// than ending the chain; drops end it. A subprogram: its stack and `late_egress`'s are never
/// on the stack together (the verifier's limit is 512 bytes for the whole chain).
#[inline(never)]
fn classify(ctx: &TcContext, direction: Direction) -> i32 {
    // SAFETY: the context pointer is valid for the program run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let Some(endpoint) = ENDPOINTS.get_ptr(&EndpointKey { ifindex }) else {
        telemetry::count(0, direction, Reason::PassUnmanaged, ctx.len());
        return TCX_NEXT;
    };
    // SAFETY: a value pointer from a successful lookup; copied once.
    let endpoint = unsafe { *endpoint };
    let reason = decide(ctx, &endpoint, ifindex, direction);
    telemetry::count(endpoint.id, direction, reason, ctx.len());
    if reason == Reason::PassDeferred {
        service::defer(ctx, endpoint.id);
    }
    if reason.is_drop() {
        if telemetry::debug_log_enabled() {
            info!(ctx, "drop endpoint={} ifindex={} direction={} reason={}", endpoint.id, ifindex, direction as u8, reason as u32);
        }
        TC_ACT_SHOT as i32
    } else {
        TCX_NEXT
    }
}

/// A deferred packet, after the translation: the egress verdict of the endpoint that sent it,
/// towards where it goes now. An endpoint that is gone cannot vouch for it: dropped.
/// A subprogram of its own: the verifier then explores the rest of `to_pod` once after it,
/// not once per path through it.
#[inline(never)]
fn late_egress(ctx: &TcContext, id: u32) -> Reason {
    let Some((endpoint, ifindex)) = service::source_endpoint(id) else {
        telemetry::count(0, Direction::Egress, Reason::DropStale, ctx.len());
        return Reason::DropStale;
    };
    let reason = match parse_linear(ctx) {
        // Only IP packets are deferred, and the translation keeps them readable.
        Ok(packet) if matches!(packet.kind, Kind::Normal | Kind::IcmpError) => {
            verdict(&endpoint, ifindex, &packet, Direction::Egress, isolated(&endpoint, Direction::Egress), false)
        }
        _ => Reason::DropMalformed,
    };
    telemetry::count(endpoint.id, Direction::Egress, reason, ctx.len());
    reason
}

#[inline(always)]
fn isolated(endpoint: &EndpointInfo, direction: Direction) -> bool {
    endpoint.has(match direction {
        Direction::Ingress => FLAG_INGRESS_ISOLATED,
        Direction::Egress => FLAG_EGRESS_ISOLATED,
    })
}

/// The verdict for a frame of a managed pod. The frame checks and the source check hold for
/// every managed pod, isolated or not: other pods' verdicts depend on source addresses, and
/// what a pod sends past the classifier the node routes.
#[inline(always)]
fn decide(ctx: &TcContext, endpoint: &EndpointInfo, ifindex: u32, direction: Direction) -> Reason {
    // SAFETY: the context pointer is valid for the program run.
    if unsafe { (*ctx.skb.skb).vlan_present } != 0 {
        return Reason::DropFrame;
    }
    let enforced = isolated(endpoint, direction);
    let mut packet = match parse_linear(ctx) {
        Ok(packet) => packet,
        Err(ParseError::Frame) => return Reason::DropFrame,
        // A packet leaving the pod whose headers we cannot read has no verified source.
        Err(ParseError::Malformed) if enforced || direction == Direction::Egress => return Reason::DropMalformed,
        Err(ParseError::Malformed) => return Reason::PassNotIsolated,
    };
    // SAFETY: the context pointer is valid for the program run.
    packet.forwarded = unsafe { (*ctx.skb.skb).ingress_ifindex } != 0;
    match packet.kind {
        Kind::Arp => return arp_verdict(endpoint, &packet, direction),
        Kind::LinkControl => return linkctl::verdict(endpoint, &packet, direction),
        Kind::Normal | Kind::IcmpError => {}
    }
    if direction == Direction::Egress && !own_source(endpoint, &packet) {
        return refuse(endpoint, ifindex, &packet, direction, Reason::DropSpoofed);
    }
    if !endpoint.isolated_any() {
        // Not isolated either way: nothing to judge and no replies to track.
        return Reason::PassNotIsolated;
    }
    verdict(endpoint, ifindex, &packet, direction, enforced, direction == Direction::Egress)
}

/// The verdict for a parsed IP packet of an endpoint that is isolated in some direction.
/// `may_defer`: a packet towards a Service address is handed on, to be judged after the
/// translation (only where it leaves its pod).
#[inline(always)]
fn verdict(endpoint: &EndpointInfo, ifindex: u32, packet: &Packet, direction: Direction, enforced: bool, may_defer: bool) -> Reason {
    let time = conntrack::now();
    if packet.fragment == Fragment::Later {
        if may_defer && enforced && service::covers(packet.family, &packet.tuple.dst) {
            return Reason::PassDeferred;
        }
        return later_fragment(endpoint, ifindex, packet, direction, enforced, time);
    }
    let reason = judge(endpoint, ifindex, packet, direction, enforced, may_defer, time);
    if enforced && packet.fragment == Fragment::First && !reason.is_drop() {
        conntrack::allow_fragments(&conntrack::fragment_key(endpoint.id, packet, direction), time);
    }
    reason
}

/// ARP from the pod must carry the pod's own address (or none, as a probe does).
#[inline(always)]
fn arp_verdict(endpoint: &EndpointInfo, packet: &Packet, direction: Direction) -> Reason {
    let sender = &packet.tuple.src[..4];
    let own = endpoint.has(FLAG_HAS_IPV4) && sender == endpoint.ipv4;
    if direction == Direction::Egress && !own && sender != [0; 4] { Reason::DropFrame } else { Reason::PassNonIp }
}

/// A later fragment has no ports: it follows the verdict of its first fragment.
#[inline(always)]
fn later_fragment(endpoint: &EndpointInfo, ifindex: u32, packet: &Packet, direction: Direction, enforced: bool, time: u64) -> Reason {
    if !enforced {
        return Reason::PassNotIsolated;
    }
    if conntrack::fragments_allowed(&conntrack::fragment_key(endpoint.id, packet, direction), time) {
        return Reason::PassFragment;
    }
    refuse(endpoint, ifindex, packet, direction, Reason::DropFragment)
}

/// Conntrack first, then policy for a new flow. Only opening packets create state, so a
/// segment sent from outside cannot make a pod's own SYN look like a reply.
#[inline(always)]
fn judge(endpoint: &EndpointInfo, ifindex: u32, packet: &Packet, direction: Direction, enforced: bool, may_defer: bool, time: u64) -> Reason {
    if packet.kind == Kind::IcmpError {
        if !enforced {
            return Reason::PassNotIsolated;
        }
        if related_error(endpoint, packet, direction, time) {
            return Reason::PassReply;
        }
        return policy_verdict(endpoint, ifindex, packet, direction, time).0;
    }
    let key = conntrack::key(endpoint.id, packet.family, &packet.tuple, direction);
    if let Some(entry) = conntrack::find(&key, time)
        && !untranslated(entry, direction, may_defer)
        && still_allowed(endpoint, &key, entry)
    {
        let tracked = conntrack::track(entry, packet, direction, time);
        if may_defer && entry.flags & CT_DEFERRED != 0 {
            return Reason::PassDeferred;
        }
        return match tracked {
            Tracked::Established => Reason::PassEstablished,
            Tracked::Reply => Reason::PassReply,
        };
    }
    if may_defer && enforced && service::covers(packet.family, &packet.tuple.dst) {
        // Judged after the translation; the entry lets the replies (from the Service
        // address, after the reverse translation) back in.
        if packet.opening {
            conntrack::create(&key, packet, direction, 0, endpoint.revision, CT_DEFERRED, time);
        }
        return Reason::PassDeferred;
    }
    let (reason, cookie) = if enforced {
        policy_verdict(endpoint, ifindex, packet, direction, time)
    } else {
        (Reason::PassNotIsolated, 0)
    };
    if packet.opening && !reason.is_drop() {
        conntrack::create(&key, packet, direction, cookie, endpoint.revision, 0, time);
    }
    reason
}

/// A deferred flow's own entry met by its packet after the translation: the packet still goes
/// to the Service address (no rule translated it), so the entry does not vouch for it and it
/// is judged as egress towards that address.
#[inline(always)]
fn untranslated(entry: &CtValue, direction: Direction, may_defer: bool) -> bool {
    entry.flags & CT_DEFERRED != 0 && direction == Direction::Egress && !may_defer
}

/// The policy lookup for a packet no tracked flow covers: the verdict and the cookie of the
/// rule that allowed it (0 for none). The flow event names the rule that decided, allow or
/// deny.
#[inline(always)]
fn policy_verdict(endpoint: &EndpointInfo, ifindex: u32, packet: &Packet, direction: Direction, time: u64) -> (Reason, u32) {
    let peer = match direction {
        Direction::Egress => &packet.tuple.dst,
        Direction::Ingress => &packet.tuple.src,
    };
    let peer_identity = lookup::peer_identity(packet, peer, direction);
    // The destination port is the one a policy names, on either side of the connection.
    let mask = endpoint.lookups[direction as usize & 1];
    let hit = lookup::decision(endpoint.id, mask, peer_identity, direction, packet.tuple.protocol, packet.tuple.dport);
    let cookie = if hit.action == lookup::MISS { 0 } else { hit.cookie };
    let reason = if hit.action == ACTION_ALLOW {
        Reason::PassPolicy
    } else if endpoint.has(FLAG_AUDIT) {
        // Audit lets the flow work as it would without the policy, replies included.
        Reason::PassAudit
    } else if hit.action == lookup::MISS {
        Reason::DropPolicy
    } else {
        Reason::DropDeny
    };
    telemetry::report(endpoint.id, ifindex, packet, direction, reason, cookie, peer_identity, time);
    (reason, if reason == Reason::PassPolicy { cookie } else { 0 })
}

/// Whether a tracked flow may go on. An entry judged under another revision of the endpoint
/// (policy, isolation, audit or identities changed since) is judged again in its opening
/// direction: still allowed, it is kept under the new revision; revoked, it is forgotten and
/// the packet is judged as if the flow were new.
#[inline(always)]
fn still_allowed(endpoint: &EndpointInfo, key: &CtKey, entry: &mut CtValue) -> bool {
    if entry.revision == endpoint.revision {
        return true;
    }
    let origin = if entry.origin == Direction::Egress as u8 { Direction::Egress } else { Direction::Ingress };
    let deferred = entry.flags & CT_DEFERRED != 0 || (origin == Direction::Egress && service::covers(key.family, &key.peer_addr));
    if deferred && isolated(endpoint, origin) {
        // Towards a Service address: judged again after the translation, packet by packet.
        entry.flags |= CT_DEFERRED;
    } else if isolated(endpoint, origin) {
        // The policy names the destination port of the opening packet.
        let port = match origin {
            Direction::Egress => key.peer_port(),
            Direction::Ingress => key.pod_port(),
        };
        let peer_identity = lookup::identity_of(key.family, &key.peer_addr);
        let mask = endpoint.lookups[origin as usize & 1];
        // A deny entry revokes like a missing one.
        let hit = lookup::decision(endpoint.id, mask, peer_identity, origin, key.protocol, port);
        if hit.action == ACTION_ALLOW {
            entry.cookie = hit.cookie;
        } else if !endpoint.has(FLAG_AUDIT) {
            conntrack::forget(key, entry.origin);
            return false;
        }
    }
    entry.revision = endpoint.revision;
    true
}

/// An ICMP error is related to a tracked flow only if it travels that flow's reply path: to
/// the flow's source, from its destination (or, towards the pod, from the node, which
/// reports unreachable routes and path MTUs). Anything else would be a channel to any host.
#[inline(always)]
fn related_error(endpoint: &EndpointInfo, packet: &Packet, direction: Direction, time: u64) -> bool {
    let related = &packet.related;
    let from_flow_peer = packet.tuple.src == related.src
        || (direction == Direction::Ingress && lookup::peer_identity(packet, &packet.tuple.src, direction) == identity::HOST);
    packet.tuple.dst == related.dst
        && from_flow_peer
        && conntrack::related(&conntrack::key(endpoint.id, packet.family, related, direction), time)
}

/// A packet that fails a check: dropped, and reported.
#[inline(always)]
fn refuse(endpoint: &EndpointInfo, ifindex: u32, packet: &Packet, direction: Direction, reason: Reason) -> Reason {
    telemetry::report(endpoint.id, ifindex, packet, direction, reason, 0, 0, conntrack::now());
    reason
}

/// Whether a packet leaving the pod carries one of the pod's own addresses.
#[inline(always)]
fn own_source(endpoint: &EndpointInfo, packet: &Packet) -> bool {
    let src = &packet.tuple.src;
    if packet.family == family::IPV4 {
        endpoint.has(FLAG_HAS_IPV4) && src[..4] == endpoint.ipv4
    } else {
        endpoint.has(FLAG_HAS_IPV6) && *src == endpoint.ipv6
    }
}

/// Parses with direct packet access; if the headers straddle the linear part of the skb,
/// pulls them in once and parses again.
#[inline(always)]
fn parse_linear(ctx: &TcContext) -> Result<Packet, ParseError> {
    match parse::parse(ctx) {
        Err(ParseError::Malformed) => {
            let linear = (ctx.data_end() - ctx.data()) as u32;
            let len = ctx.len();
            if linear >= len || linear >= PULL_BYTES {
                return Err(ParseError::Malformed);
            }
            let want = if len < PULL_BYTES { len } else { PULL_BYTES };
            // SAFETY: the skb pointer is valid; the helper invalidates packet pointers, and
            // we re-read data/data_end in the second parse.
            if unsafe { bpf_skb_pull_data(ctx.skb.skb, want) } != 0 {
                return Err(ParseError::Malformed);
            }
            parse::parse(ctx)
        }
        other => other,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
