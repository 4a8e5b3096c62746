//! The TC classifier attached to each pod's host-side veth: TC ingress sees what leaves the
//! pod (its egress), TC egress what enters it (its ingress). It parses, looks up and
//! decides; every policy decision was made by the agent when it wrote the maps.
#![no_std]
#![no_main]

mod conntrack;
mod lookup;
mod maps;
mod parse;
mod telemetry;

use aya_log_ebpf::info;
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_skb_pull_data,
    macros::classifier,
    programs::TcContext,
};
use policy_common::{
    Direction, family,
    counters::Reason,
    endpoint::{EndpointInfo, EndpointKey, FLAG_AUDIT, FLAG_EGRESS_ISOLATED, FLAG_HAS_IPV4, FLAG_HAS_IPV6, FLAG_INGRESS_ISOLATED},
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

/// Traffic entering the pod.
#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    classify(&ctx, Direction::Ingress)
}

#[inline(always)]
fn classify(ctx: &TcContext, direction: Direction) -> i32 {
    // SAFETY: the context pointer is valid for the program run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let Some(endpoint) = ENDPOINTS.get_ptr(&EndpointKey { ifindex }) else {
        telemetry::count(0, direction, Reason::PassUnmanaged, ctx.len());
        return TC_ACT_OK as i32;
    };
    // SAFETY: a value pointer from a successful lookup; copied once.
    let endpoint = unsafe { *endpoint };
    let reason = if endpoint.isolated_any() {
        decide(ctx, &endpoint, ifindex, direction)
    } else {
        // Not isolated either way: nothing to judge and no replies to track.
        Reason::PassNotIsolated
    };
    telemetry::count(endpoint.id, direction, reason, ctx.len());
    if reason.is_drop() {
        if telemetry::debug_log_enabled() {
            info!(ctx, "drop endpoint={} ifindex={} direction={} reason={}", endpoint.id, ifindex, direction as u8, reason as u32);
        }
        TC_ACT_SHOT as i32
    } else {
        TC_ACT_OK as i32
    }
}

#[inline(always)]
fn isolated(endpoint: &EndpointInfo, direction: Direction) -> bool {
    endpoint.has(match direction {
        Direction::Ingress => FLAG_INGRESS_ISOLATED,
        Direction::Egress => FLAG_EGRESS_ISOLATED,
    })
}

/// The verdict for a pod isolated in at least one direction. Replies must be tracked even in
/// a direction that is not isolated, so the other direction lets them back in.
#[inline(always)]
fn decide(ctx: &TcContext, endpoint: &EndpointInfo, ifindex: u32, direction: Direction) -> Reason {
    let enforced = isolated(endpoint, direction);
    let packet = match parse_linear(ctx) {
        Ok(packet) => packet,
        Err(ParseError::NotIp) => return Reason::PassNonIp,
        Err(ParseError::Malformed) => {
            return refuse(endpoint, ifindex, None, direction, Reason::DropMalformed, enforced);
        }
    };
    if packet.kind == Kind::LinkControl {
        return Reason::PassNonIp;
    }
    if direction == Direction::Egress && !own_source(endpoint, &packet) {
        return refuse(endpoint, ifindex, Some(&packet), direction, Reason::DropSpoofed, true);
    }
    let time = conntrack::now();
    if packet.fragment == Fragment::Later {
        if !enforced {
            return Reason::PassNotIsolated;
        }
        let key = conntrack::fragment_key(endpoint.id, &packet, direction);
        if conntrack::fragments_allowed(&key, time) {
            return Reason::PassFragment;
        }
        return refuse(endpoint, ifindex, Some(&packet), direction, Reason::DropFragment, true);
    }
    let reason = judge(endpoint, ifindex, &packet, direction, enforced, time);
    if enforced && packet.fragment == Fragment::First && !reason.is_drop() {
        conntrack::allow_fragments(&conntrack::fragment_key(endpoint.id, &packet, direction), time);
    }
    reason
}

/// Conntrack first, then policy for a new flow.
#[inline(always)]
fn judge(
    endpoint: &EndpointInfo,
    ifindex: u32,
    packet: &Packet,
    direction: Direction,
    enforced: bool,
    time: u64,
) -> Reason {
    if packet.kind == Kind::IcmpError {
        let key = conntrack::key(endpoint.id, packet.family, &packet.related, direction);
        if conntrack::related(&key, time) {
            return Reason::PassReply;
        }
    }
    let key = conntrack::key(endpoint.id, packet.family, &packet.tuple, direction);
    if packet.kind == Kind::Normal {
        match conntrack::lookup(&key, packet, direction, time) {
            Some(Tracked::Established) => return Reason::PassEstablished,
            Some(Tracked::Reply) => return Reason::PassReply,
            None => {}
        }
    }
    if !enforced {
        if packet.kind == Kind::Normal {
            conntrack::create(&key, packet, direction, 0, time);
        }
        return Reason::PassNotIsolated;
    }
    let peer = match direction {
        Direction::Egress => &packet.tuple.dst,
        Direction::Ingress => &packet.tuple.src,
    };
    let peer_identity = lookup::identity_of(packet.family, peer);
    // The destination port is the one a policy names, on either side of the connection.
    let mask = endpoint.lookups[direction as usize & 1];
    match lookup::allowed(endpoint.id, mask, peer_identity, direction, packet.tuple.protocol, packet.tuple.dport) {
        Some(cookie) => {
            if packet.kind == Kind::Normal {
                conntrack::create(&key, packet, direction, cookie, time);
            }
            telemetry::report(endpoint.id, ifindex, packet, direction, Reason::PassPolicy, cookie, peer_identity, time);
            Reason::PassPolicy
        }
        None => {
            if endpoint.has(FLAG_AUDIT) && packet.kind == Kind::Normal {
                // Audit lets the flow work as it would without the policy, replies included.
                conntrack::create(&key, packet, direction, 0, time);
            }
            let reason = if endpoint.has(FLAG_AUDIT) { Reason::PassAudit } else { Reason::DropPolicy };
            telemetry::report(endpoint.id, ifindex, packet, direction, reason, 0, peer_identity, time);
            reason
        }
    }
}

/// A packet that fails a check: dropped where the direction is enforced (or always, for a
/// spoofed source), passed in audit mode, and reported either way.
#[inline(always)]
fn refuse(
    endpoint: &EndpointInfo,
    ifindex: u32,
    packet: Option<&Packet>,
    direction: Direction,
    reason: Reason,
    enforced: bool,
) -> Reason {
    if !enforced {
        return Reason::PassNotIsolated;
    }
    let reason = if endpoint.has(FLAG_AUDIT) { Reason::PassAudit } else { reason };
    if let Some(packet) = packet {
        telemetry::report(endpoint.id, ifindex, packet, direction, reason, 0, 0, conntrack::now());
    }
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
