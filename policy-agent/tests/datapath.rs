//! Privileged datapath tests: the real classifier in the real kernel, driven with crafted
//! packets through BPF_PROG_TEST_RUN, and with real TCP, UDP and SCTP traffic between pods
//! in network namespaces. Run by `cargo xtask test` (root, one test thread).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use aya::{
    maps::{MapData, ring_buf::RingBuf},
    programs::{TestRun as _, TestRunOptions},
};
use policy_agent::{
    compile::MapOp,
    datapath::{Datapath, Hook, Maps, PinLayout},
};
use policy_common::{
    Direction,
    counters::Reason,
    endpoint::{EndpointInfo, EndpointKey, FLAG_AUDIT, FLAG_EGRESS_ISOLATED, FLAG_HAS_IPV4, FLAG_HAS_IPV6, FLAG_INGRESS_ISOLATED},
    event::{CONFIG_EVENTS_ALLOWED, CONFIG_EVENTS_DENIED, Config, VerdictEvent},
    identity,
    ipcache::{IpcacheKey, IpcacheValue},
    policy::{PREFIX_ANY_PROTOCOL, PREFIX_FULL, PREFIX_PROTOCOL, PolicyKey, PolicyValue, PortRangePrefixes, lookup},
    proto,
};
use testbed::{
    Bpffs, Node,
    packet::{ACK, FIN, Frame, L4, SYN, arp},
    probe::{SctpSink, Servers, sctp_send_init, tcp_ok, udp_ok},
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;

/// BPF_PROG_TEST_RUN runs on the loopback device, so the endpoint is ifindex 1.
const LO: u32 = 1;
const ENDPOINT: u32 = 7;
const POD: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 10);
const PEER: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 20);
const OTHER: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 30);
const POD6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 0x10);
const PEER6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 0x20);
const PEER_ID: u32 = 1000;
const OTHER_ID: u32 = 1001;
const COOKIE: u32 = 4242;

fn v4(a: Ipv4Addr) -> IpAddr {
    IpAddr::V4(a)
}
fn v6(a: Ipv6Addr) -> IpAddr {
    IpAddr::V6(a)
}

/// A loaded classifier on a private bpffs, with typed map handles.
struct Fixture {
    datapath: Datapath,
    maps: Maps,
    /// The endpoint's flags and lookup mask, rewritten whenever an entry kind is added (as
    /// the compiler's render does).
    flags: u32,
    lookups: [u8; 2],
    _bpffs: Bpffs,
}

impl Fixture {
    fn new() -> Self {
        let bpffs = Bpffs::new("dp");
        let mut datapath = Datapath::load(PinLayout::new(&bpffs.path)).expect("load classifier");
        let mut maps = datapath.take_maps().expect("maps");
        maps.config.set(0, Config { flags: CONFIG_EVENTS_DENIED | CONFIG_EVENTS_ALLOWED, events_per_sec: 1000 }, 0).expect("config");
        for (addr, id) in [(v4(PEER), PEER_ID), (v4(OTHER), OTHER_ID), (v6(PEER6), PEER_ID)] {
            insert_identity(&mut maps, addr, if addr.is_ipv4() { 32 } else { 128 }, id);
        }
        Self { datapath, maps, flags: 0, lookups: [0; 2], _bpffs: bpffs }
    }

    fn endpoint(&mut self, flags: u32) {
        self.flags = flags;
        let info = EndpointInfo {
            id: ENDPOINT,
            flags: flags | FLAG_HAS_IPV4 | FLAG_HAS_IPV6,
            ipv4: POD.octets(),
            ipv6: POD6.octets(),
            lookups: self.lookups,
            _pad: [0; 2],
            revision: 0,
        };
        self.maps.endpoints.insert(EndpointKey { ifindex: LO }, info, 0).expect("endpoint");
    }

    /// Writes an allow entry the way the agent does (through `Maps::write`).
    fn entry(&mut self, prefix_len: u32, key: PolicyKey) {
        self.maps.write(&MapOp::PolicyUpsert { prefix_len, key, value: PolicyValue { cookie: COOKIE } }).expect("policy entry");
        let direction = key.direction().expect("direction");
        self.lookups[direction as usize] |= lookup::bit(prefix_len, key.identity());
        self.endpoint(self.flags);
    }

    fn allow(&mut self, peer: u32, direction: Direction, protocol: Option<u8>, port: Option<u16>) {
        let (prefix, protocol, port) = match (protocol, port) {
            (None, _) => (PREFIX_ANY_PROTOCOL, 0, 0),
            (Some(p), None) => (PREFIX_PROTOCOL, p, 0),
            (Some(p), Some(port)) => (PREFIX_FULL, p, port),
        };
        self.entry(prefix, PolicyKey::new(ENDPOINT, peer, direction, protocol, port));
    }

    fn allow_range(&mut self, peer: u32, direction: Direction, protocol: u8, first: u16, last: u16) {
        for block in PortRangePrefixes::new(first, last) {
            self.entry(block.lpm_prefix_len(), PolicyKey::new(ENDPOINT, peer, direction, protocol, block.port));
        }
    }

    fn run(&self, hook: Hook, frame: &[u8]) -> u32 {
        let program = self.datapath.program(hook).expect("program");
        let opts = TestRunOptions { data_in: Some(frame), ..TestRunOptions::default() };
        program.test_run(opts).expect("BPF_PROG_TEST_RUN").return_value
    }

    /// Packets counted for `reason` on `endpoint`, both directions, over all CPUs.
    fn counted(&self, endpoint: u32, reason: Reason) -> u64 {
        [Direction::Ingress, Direction::Egress]
            .into_iter()
            .map(|d| self.maps.counters.get(&reason.slot(endpoint, d), 0).expect("counter").iter().map(|c| c.packets).sum::<u64>())
            .sum()
    }

    fn events(&mut self) -> Vec<VerdictEvent> {
        drain_events(&mut self.maps.events)
    }

    fn conntrack_len(&self) -> usize {
        self.maps.conntrack.keys().count()
    }
}

fn insert_identity(maps: &mut Maps, addr: IpAddr, bits: u8, identity: u32) {
    let key = match addr {
        IpAddr::V4(a) => IpcacheKey::v4(a.octets()),
        IpAddr::V6(a) => IpcacheKey::v6(a.octets()),
    };
    let op = MapOp::IpcacheUpsert { prefix_len: IpcacheKey::lpm_prefix_len(bits), key, value: IpcacheValue { identity } };
    maps.write(&op).expect("ipcache");
}

fn drain_events(ring: &mut RingBuf<MapData>) -> Vec<VerdictEvent> {
    let mut events = Vec::new();
    while let Some(item) = ring.next() {
        events.push(*bytemuck::from_bytes::<VerdictEvent>(&item[..size_of::<VerdictEvent>()]));
    }
    events
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn allowed_new_flow_passes_and_is_tracked() {
    let mut f = Fixture::new();
    f.endpoint(FLAG_INGRESS_ISOLATED);
    f.allow(PEER_ID, Direction::Ingress, Some(proto::TCP), Some(80));
    assert_eq!(f.run(Hook::ToPod, &Frame::tcp(v4(PEER), 40000, v4(POD), 80, SYN).build()), TC_ACT_OK);
    assert_eq!(f.counted(ENDPOINT, Reason::PassPolicy), 1);
    assert_eq!(f.conntrack_len(), 1, "the allowed flow is tracked");
    // Same peer, port without an entry.
    assert_eq!(f.run(Hook::ToPod, &Frame::tcp(v4(PEER), 40000, v4(POD), 81, SYN).build()), TC_ACT_SHOT);
    // The next packet of the tracked flow passes as established.
    assert_eq!(f.run(Hook::ToPod, &Frame::tcp(v4(PEER), 40000, v4(POD), 80, ACK).build()), TC_ACT_OK);
    assert_eq!(f.counted(ENDPOINT, Reason::PassEstablished), 1);
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn denied_new_flow_is_dropped_and_reported() {
    let mut f = Fixture::new();
    f.endpoint(FLAG_INGRESS_ISOLATED);
    f.allow(PEER_ID, Direction::Ingress, Some(proto::TCP), Some(80));
    f.events();
    assert_eq!(f.run(Hook::ToPod, &Frame::tcp(v4(OTHER), 41000, v4(POD), 80, SYN).build()), TC_ACT_SHOT);
    assert_eq!(f.counted(ENDPOINT, Reason::DropPolicy), 1);
    assert_eq!(f.conntrack_len(), 0, "a dropped flow is not tracked");
    let events = f.events();
    let drop = events.iter().find(|e| e.reason == Reason::DropPolicy as u8).expect("a drop event");
    assert_eq!((drop.endpoint, drop.peer_identity, drop.protocol), (ENDPOINT, OTHER_ID, proto::TCP));
    assert_eq!((drop.src_port(), drop.dst_port(), drop.direction), (41000, 80, Direction::Ingress as u8));
    assert_eq!(&drop.src_addr[..4], &OTHER.octets());
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn replies_pass_through_conntrack_in_both_directions() {
    let mut f = Fixture::new();
    f.endpoint(FLAG_INGRESS_ISOLATED | FLAG_EGRESS_ISOLATED);
    f.allow(PEER_ID, Direction::Ingress, Some(proto::TCP), Some(80));
    f.allow(PEER_ID, Direction::Egress, Some(proto::UDP), Some(53));
    // Inbound connection: SYN in, SYN-ACK out is a reply (no egress entry needed).
    assert_eq!(f.run(Hook::ToPod, &Frame::tcp(v4(PEER), 40000, v4(POD), 80, SYN).build()), TC_ACT_OK);
    assert_eq!(f.run(Hook::FromPod, &Frame::tcp(v4(POD), 80, v4(PEER), 40000, SYN | ACK).build()), TC_ACT_OK);
    assert_eq!(f.counted(ENDPOINT, Reason::PassReply), 1);
    // Not a reply: another port on the peer.
    assert_eq!(f.run(Hook::FromPod, &Frame::tcp(v4(POD), 80, v4(PEER), 40001, SYN | ACK).build()), TC_ACT_SHOT);
    // Outbound UDP: the answer comes back in although ingress allows only TCP 80.
    assert_eq!(f.run(Hook::FromPod, &Frame::udp(v4(POD), 5353, v4(PEER), 53).build()), TC_ACT_OK);
    assert_eq!(f.run(Hook::ToPod, &Frame::udp(v4(PEER), 53, v4(POD), 5353).build()), TC_ACT_OK);
    assert_eq!(f.counted(ENDPOINT, Reason::PassReply), 2);
    // A FIN keeps the flow alive (closing), it is still a reply.
    assert_eq!(f.run(Hook::FromPod, &Frame::tcp(v4(POD), 80, v4(PEER), 40000, FIN | ACK).build()), TC_ACT_OK);
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn replies_are_tracked_when_only_the_other_direction_is_isolated() {
    let mut f = Fixture::new();
    f.endpoint(FLAG_INGRESS_ISOLATED);
    // Egress is not isolated: the connection goes out untouched but is tracked...
    assert_eq!(f.run(Hook::FromPod, &Frame::tcp(v4(POD), 45000, v4(OTHER), 443, SYN).build()), TC_ACT_OK);
    assert_eq!(f.counted(ENDPOINT, Reason::PassNotIsolated), 1);
    // ...so its reply gets in through the isolated ingress.
    assert_eq!(f.run(Hook::ToPod, &Frame::tcp(v4(OTHER), 443, v4(POD), 45000, SYN | ACK).build()), TC_ACT_OK);
    assert_eq!(f.counted(ENDPOINT, Reason::PassReply), 1);
    // A new inbound flow from the same peer is still judged.
    assert_eq!(f.run(Hook::ToPod, &Frame::tcp(v4(OTHER), 443, v4(POD), 45001, SYN).build()), TC_ACT_SHOT);
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn wildcard_port_protocol_and_identity() {
    let mut f = Fixture::new();
    f.endpoint(FLAG_INGRESS_ISOLATED);
    // Any peer, every TCP port.
    f.allow(identity::ANY, Direction::Ingress, Some(proto::TCP), None);
    // One peer, every protocol.
    f.allow(PEER_ID, Direction::Ingress, None, None);
    assert_eq!(f.run(Hook::ToPod, &Frame::tcp(v4(OTHER), 1, v4(POD), 9999, SYN).build()), TC_ACT_OK);
    assert_eq!(f.run(Hook::ToPod, &Frame::udp(v4(OTHER), 1, v4(POD), 9999).build()), TC_ACT_SHOT);
    assert_eq!(f.run(Hook::ToPod, &Frame::udp(v4(PEER), 1, v4(POD), 9999).build()), TC_ACT_OK);
    assert_eq!(f.run(Hook::ToPod, &Frame::sctp(v4(PEER), 1, v4(POD), 7).build()), TC_ACT_OK);
    // An address no prefix covers is WORLD, which only the ANY entries match.
    let world = v4(Ipv4Addr::new(198, 19, 9, 9));
    assert_eq!(f.run(Hook::ToPod, &Frame::tcp(world, 1, v4(POD), 22, SYN).build()), TC_ACT_OK);
    assert_eq!(f.run(Hook::ToPod, &Frame::udp(world, 1, v4(POD), 22).build()), TC_ACT_SHOT);
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn port_range_edges() {
    let mut f = Fixture::new();
    f.endpoint(FLAG_INGRESS_ISOLATED);
    f.allow_range(PEER_ID, Direction::Ingress, proto::TCP, 1000, 2000);
    for (port, verdict) in [(999, TC_ACT_SHOT), (1000, TC_ACT_OK), (1023, TC_ACT_OK), (1024, TC_ACT_OK), (1500, TC_ACT_OK), (2000, TC_ACT_OK), (2001, TC_ACT_SHOT), (65535, TC_ACT_SHOT)] {
        assert_eq!(f.run(Hook::ToPod, &Frame::tcp(v4(PEER), 30000, v4(POD), port, SYN).build()), verdict, "port {port}");
    }
    assert_eq!(f.run(Hook::ToPod, &Frame::udp(v4(PEER), 1, v4(POD), 1500).build()), TC_ACT_SHOT, "other protocol");
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn ipv6_with_extension_headers() {
    let mut f = Fixture::new();
    f.endpoint(FLAG_INGRESS_ISOLATED);
    f.allow(PEER_ID, Direction::Ingress, Some(proto::TCP), Some(443));
    let mut frame = Frame::tcp(v6(PEER6), 40000, v6(POD6), 443, SYN);
    assert_eq!(f.run(Hook::ToPod, &frame.build()), TC_ACT_OK, "plain IPv6");
    frame.l4 = L4::Tcp { sport: 40001, dport: 443, flags: SYN };
    frame.ipv6_ext = vec![0, 60, 43];
    assert_eq!(f.run(Hook::ToPod, &frame.build()), TC_ACT_OK, "hop-by-hop, destination options, routing");
    frame.l4 = L4::Tcp { sport: 40002, dport: 444, flags: SYN };
    assert_eq!(f.run(Hook::ToPod, &frame.build()), TC_ACT_SHOT, "the port behind the extension headers is judged");
    frame.l4 = L4::Tcp { sport: 40003, dport: 443, flags: SYN };
    frame.ipv6_ext = vec![60; 7];
    assert_eq!(f.run(Hook::ToPod, &frame.build()), TC_ACT_SHOT, "more extension headers than we skip");
    assert_eq!(f.counted(ENDPOINT, Reason::DropMalformed), 1);
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn truncated_headers_fail_closed_only_where_isolated() {
    let mut f = Fixture::new();
    f.endpoint(FLAG_INGRESS_ISOLATED);
    f.allow(identity::ANY, Direction::Ingress, None, None);
    let mut frame = Frame::tcp(v4(PEER), 40000, v4(POD), 80, SYN);
    frame.truncate = Some(14 + 20 + 10);
    assert_eq!(f.run(Hook::ToPod, &frame.build()), TC_ACT_SHOT, "cut TCP header on an isolated direction");
    assert_eq!(f.counted(ENDPOINT, Reason::DropMalformed), 1);
    let mut out = Frame::tcp(v4(POD), 80, v4(PEER), 40000, SYN);
    out.truncate = Some(14 + 20 + 10);
    assert_eq!(f.run(Hook::FromPod, &out.build()), TC_ACT_OK, "egress is not isolated: untouched");
    let mut udp = Frame::udp(v6(PEER6), 1, v6(POD6), 53);
    udp.truncate = Some(14 + 40 + 4);
    assert_eq!(f.run(Hook::ToPod, &udp.build()), TC_ACT_SHOT, "cut UDP header over IPv6");
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn ipv4_options_are_skipped_by_ihl() {
    let mut f = Fixture::new();
    f.endpoint(FLAG_INGRESS_ISOLATED);
    f.allow(PEER_ID, Direction::Ingress, Some(proto::TCP), Some(80));
    let mut frame = Frame::tcp(v4(PEER), 40000, v4(POD), 80, SYN);
    // Record route (7) with room for two addresses, then end of options.
    frame.ipv4_options = vec![7, 11, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    assert_eq!(f.run(Hook::ToPod, &frame.build()), TC_ACT_OK);
    frame.l4 = L4::Tcp { sport: 40000, dport: 81, flags: SYN };
    assert_eq!(f.run(Hook::ToPod, &frame.build()), TC_ACT_SHOT, "port read after the options");
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn fragments_follow_their_first_fragment() {
    let mut f = Fixture::new();
    f.endpoint(FLAG_INGRESS_ISOLATED);
    f.allow(PEER_ID, Direction::Ingress, Some(proto::UDP), Some(53));
    for (src, dst) in [(v4(PEER), v4(POD)), (v6(PEER6), v6(POD6))] {
        let mut first = Frame::udp(src, 1000, dst, 53);
        first.fragment = Some((77, true, 0));
        assert_eq!(f.run(Hook::ToPod, &first.build()), TC_ACT_OK, "first fragment, allowed port");
        let mut later = Frame::udp(src, 0, dst, 0);
        later.fragment = Some((77, false, 3));
        assert_eq!(f.run(Hook::ToPod, &later.build()), TC_ACT_OK, "later fragment of an allowed datagram");
        later.fragment = Some((78, false, 3));
        assert_eq!(f.run(Hook::ToPod, &later.build()), TC_ACT_SHOT, "later fragment with no allowed first");
        let mut denied = Frame::udp(src, 1000, dst, 54);
        denied.fragment = Some((79, true, 0));
        assert_eq!(f.run(Hook::ToPod, &denied.build()), TC_ACT_SHOT);
        later.fragment = Some((79, false, 3));
        assert_eq!(f.run(Hook::ToPod, &later.build()), TC_ACT_SHOT, "later fragment of a denied datagram");
    }
    assert_eq!(f.counted(ENDPOINT, Reason::PassFragment), 2);
    assert_eq!(f.counted(ENDPOINT, Reason::DropFragment), 4);
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn spoofed_source_is_dropped() {
    let mut f = Fixture::new();
    f.endpoint(FLAG_EGRESS_ISOLATED);
    f.allow(identity::ANY, Direction::Egress, None, None);
    assert_eq!(f.run(Hook::FromPod, &Frame::tcp(v4(POD), 1, v4(PEER), 80, SYN).build()), TC_ACT_OK);
    assert_eq!(f.run(Hook::FromPod, &Frame::tcp(v4(OTHER), 1, v4(PEER), 80, SYN).build()), TC_ACT_SHOT);
    assert_eq!(f.run(Hook::FromPod, &Frame::tcp(v6(PEER6), 1, v6(POD6), 80, SYN).build()), TC_ACT_SHOT);
    assert_eq!(f.counted(ENDPOINT, Reason::DropSpoofed), 2);
    // Also when only ingress is isolated: the source decides other pods' ingress verdicts.
    f.endpoint(FLAG_INGRESS_ISOLATED);
    assert_eq!(f.run(Hook::FromPod, &Frame::udp(v4(OTHER), 1, v4(PEER), 80).build()), TC_ACT_SHOT);
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn non_ip_and_neighbour_discovery_pass() {
    let mut f = Fixture::new();
    f.endpoint(FLAG_INGRESS_ISOLATED | FLAG_EGRESS_ISOLATED);
    assert_eq!(f.run(Hook::ToPod, &arp()), TC_ACT_OK);
    assert_eq!(f.run(Hook::FromPod, &arp()), TC_ACT_OK);
    let solicit = Frame::new(v6(PEER6), v6(POD6), L4::Icmp { kind: 135, code: 0, id: 0 });
    assert_eq!(f.run(Hook::ToPod, &solicit.build()), TC_ACT_OK);
    assert_eq!(f.counted(ENDPOINT, Reason::PassNonIp), 3);
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn non_isolated_pod_is_untouched() {
    let mut f = Fixture::new();
    f.endpoint(0);
    for hook in Hook::BOTH {
        assert_eq!(f.run(hook, &Frame::tcp(v4(OTHER), 1, v4(POD), 80, SYN).build()), TC_ACT_OK);
        let mut cut = Frame::tcp(v4(OTHER), 1, v4(POD), 80, SYN);
        cut.truncate = Some(14 + 20 + 10);
        assert_eq!(f.run(hook, &cut.build()), TC_ACT_OK);
    }
    assert_eq!(f.conntrack_len(), 0, "nothing is tracked for a pod with no isolation");
    assert_eq!(f.counted(ENDPOINT, Reason::PassNotIsolated), 4);
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn unmanaged_interface_passes() {
    let f = Fixture::new();
    assert_eq!(f.run(Hook::ToPod, &Frame::tcp(v4(OTHER), 1, v4(POD), 80, SYN).build()), TC_ACT_OK);
    assert_eq!(f.counted(0, Reason::PassUnmanaged), 1);
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn icmp_echo_replies_and_errors_are_related() {
    let mut f = Fixture::new();
    f.endpoint(FLAG_INGRESS_ISOLATED | FLAG_EGRESS_ISOLATED);
    f.allow(PEER_ID, Direction::Egress, None, None);
    let request = Frame::new(v4(POD), v4(PEER), L4::Icmp { kind: 8, code: 0, id: 99 });
    assert_eq!(f.run(Hook::FromPod, &request.build()), TC_ACT_OK);
    let reply = Frame::new(v4(PEER), v4(POD), L4::Icmp { kind: 0, code: 0, id: 99 });
    assert_eq!(f.run(Hook::ToPod, &reply.build()), TC_ACT_OK, "echo reply of our request");
    let stray = Frame::new(v4(PEER), v4(POD), L4::Icmp { kind: 0, code: 0, id: 100 });
    assert_eq!(f.run(Hook::ToPod, &stray.build()), TC_ACT_SHOT, "echo reply nobody asked for");
    // A UDP datagram out, then "port unreachable" about it comes back.
    let sent = Frame::udp(v4(POD), 5000, v4(PEER), 9);
    assert_eq!(f.run(Hook::FromPod, &sent.build()), TC_ACT_OK);
    let error = Frame::new(v4(PEER), v4(POD), L4::IcmpError { kind: 3, inner: Box::new(sent) });
    assert_eq!(f.run(Hook::ToPod, &error.build()), TC_ACT_OK, "ICMP error about a tracked flow");
    let unrelated = Frame::new(v4(PEER), v4(POD), L4::IcmpError { kind: 3, inner: Box::new(Frame::udp(v4(POD), 5001, v4(PEER), 9)) });
    assert_eq!(f.run(Hook::ToPod, &unrelated.build()), TC_ACT_SHOT, "ICMP error about an unknown flow");
    // ICMPv6 echo.
    let request6 = Frame::new(v6(POD6), v6(PEER6), L4::Icmp { kind: 128, code: 0, id: 7 });
    assert_eq!(f.run(Hook::FromPod, &request6.build()), TC_ACT_OK);
    let reply6 = Frame::new(v6(PEER6), v6(POD6), L4::Icmp { kind: 129, code: 0, id: 7 });
    assert_eq!(f.run(Hook::ToPod, &reply6.build()), TC_ACT_OK);
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn sctp_is_not_mistaken_for_tcp() {
    let mut f = Fixture::new();
    f.endpoint(FLAG_INGRESS_ISOLATED);
    f.allow(PEER_ID, Direction::Ingress, Some(proto::TCP), Some(80));
    assert_eq!(f.run(Hook::ToPod, &Frame::sctp(v4(PEER), 5000, v4(POD), 80).build()), TC_ACT_SHOT);
    f.allow(PEER_ID, Direction::Ingress, Some(proto::SCTP), Some(80));
    assert_eq!(f.run(Hook::ToPod, &Frame::sctp(v4(PEER), 5001, v4(POD), 80).build()), TC_ACT_OK);
    assert_eq!(f.run(Hook::ToPod, &Frame::sctp(v4(PEER), 5002, v4(POD), 81).build()), TC_ACT_SHOT);
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn audit_mode_passes_and_reports_would_be_drops() {
    let mut f = Fixture::new();
    f.endpoint(FLAG_INGRESS_ISOLATED | FLAG_AUDIT);
    f.events();
    assert_eq!(f.run(Hook::ToPod, &Frame::tcp(v4(OTHER), 1, v4(POD), 80, SYN).build()), TC_ACT_OK);
    assert_eq!(f.counted(ENDPOINT, Reason::PassAudit), 1);
    assert_eq!(f.counted(ENDPOINT, Reason::DropPolicy), 0);
    assert!(f.events().iter().any(|e| e.reason == Reason::PassAudit as u8));
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn cidr_prefix_identity_matches_by_longest_prefix() {
    let mut f = Fixture::new();
    f.endpoint(FLAG_INGRESS_ISOLATED);
    insert_identity(&mut f.maps, v4(Ipv4Addr::new(198, 18, 2, 0)), 24, 5000);
    insert_identity(&mut f.maps, v4(Ipv4Addr::new(198, 18, 2, 128)), 25, 5001);
    f.allow(5000, Direction::Ingress, Some(proto::TCP), Some(80));
    assert_eq!(f.run(Hook::ToPod, &Frame::tcp(v4(Ipv4Addr::new(198, 18, 2, 7)), 1, v4(POD), 80, SYN).build()), TC_ACT_OK);
    assert_eq!(f.run(Hook::ToPod, &Frame::tcp(v4(Ipv4Addr::new(198, 18, 2, 200)), 1, v4(POD), 80, SYN).build()), TC_ACT_SHOT, "the /25 (an except) is another identity");
    assert_eq!(f.run(Hook::ToPod, &Frame::tcp(v4(Ipv4Addr::new(198, 18, 3, 7)), 1, v4(POD), 80, SYN).build()), TC_ACT_SHOT, "outside: WORLD");
}

// --- Real traffic between pods in network namespaces -------------------------------------

const PROBE_TIMEOUT: Duration = Duration::from_millis(700);

/// A node with pods `a` and `b`, the classifier attached to both host-side veths by the agent
/// binary's `attach` (what `cargo xtask build-and-load` runs), and the test writing the maps.
struct Cluster {
    node: Node,
    bpffs: Bpffs,
    maps: Maps,
    /// Flags and lookup masks of each pod's endpoint, as written last.
    endpoints: std::collections::BTreeMap<&'static str, (u32, u32, [u8; 2])>,
}

const A4: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 1);
const B4: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 2);
const A6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 10, 0, 0, 0, 1);
const B6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 10, 0, 0, 0, 2);
const A_ID: u32 = 3000;
const B_ID: u32 = 3001;
const A_EP: u32 = 1;
const B_EP: u32 = 2;

impl Cluster {
    fn new() -> Self {
        let mut node = Node::new("dpn");
        node.add_pod("a", A4, A6);
        node.add_pod("b", B4, B6);
        let bpffs = Bpffs::new("dpn");
        for pod in &node.pods {
            let out = node.ns.exec(&[env!("CARGO_BIN_EXE_policy-agent"), "attach", "--iface", &pod.host_if, "--bpffs", bpffs.path.to_str().expect("utf-8")]);
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains("attached from_pod") && text.contains("attached to_pod"), "{text}");
        }
        let mut maps = Maps::open_pinned(&PinLayout::new(&bpffs.path)).expect("pinned maps");
        for (addr, bits, id) in [(v4(A4), 32, A_ID), (v4(B4), 32, B_ID), (v6(A6), 128, A_ID), (v6(B6), 128, B_ID)] {
            insert_identity(&mut maps, addr, bits, id);
        }
        let mut cluster = Self { node, bpffs, maps, endpoints: std::collections::BTreeMap::new() };
        cluster.endpoint("a", A_EP, 0);
        cluster.endpoint("b", B_EP, 0);
        cluster
    }

    fn endpoint(&mut self, pod: &'static str, id: u32, flags: u32) {
        let lookups = self.endpoints.get(pod).map_or([0; 2], |e| e.2);
        self.endpoints.insert(pod, (id, flags, lookups));
        let p = self.node.pod(pod);
        let ifindex = self.node.ns.ifindex(&p.host_if);
        let info = EndpointInfo {
            id,
            flags: flags | FLAG_HAS_IPV4 | FLAG_HAS_IPV6,
            ipv4: p.ipv4.octets(),
            ipv6: p.ipv6.octets(),
            lookups,
            _pad: [0; 2],
            revision: 0,
        };
        self.maps.endpoints.insert(EndpointKey { ifindex }, info, 0).expect("endpoint");
    }

    fn allow(&mut self, pod: &'static str, peer: u32, direction: Direction, protocol: u8, port: u16) {
        let (id, flags, mut lookups) = self.endpoints[pod];
        let key = PolicyKey::new(id, peer, direction, protocol, port);
        self.maps.write(&MapOp::PolicyUpsert { prefix_len: PREFIX_FULL, key, value: PolicyValue { cookie: COOKIE } }).expect("policy");
        lookups[direction as usize] |= lookup::bit(PREFIX_FULL, peer);
        self.endpoints.insert(pod, (id, flags, lookups));
        self.endpoint(pod, id, flags);
    }

    fn target(&self, pod: &str, v6: bool, port: u16) -> SocketAddr {
        SocketAddr::new(self.node.pod(pod).addr(v6), port)
    }
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn real_tcp_and_udp_between_pods_follow_the_maps() {
    let mut c = Cluster::new();
    let _servers_b = Servers::start(&c.node.pod("b").ns, &[80, 81], Duration::from_secs(60));
    let _servers_a = Servers::start(&c.node.pod("a").ns, &[80], Duration::from_secs(60));
    let a = &c.node.pod("a").ns;
    for v6 in [false, true] {
        assert!(tcp_ok(a, c.target("b", v6, 81), PROBE_TIMEOUT), "no policy: open (v6={v6})");
    }
    // b accepts only a on TCP 80 and UDP 80, and may not open connections itself.
    c.endpoint("b", B_EP, FLAG_INGRESS_ISOLATED | FLAG_EGRESS_ISOLATED);
    c.allow("b", A_ID, Direction::Ingress, proto::TCP, 80);
    c.allow("b", A_ID, Direction::Ingress, proto::UDP, 80);
    let a = &c.node.pod("a").ns;
    let b = &c.node.pod("b").ns;
    for v6 in [false, true] {
        assert!(tcp_ok(a, c.target("b", v6, 80), PROBE_TIMEOUT), "a -> b:80/TCP allowed, replies flow (v6={v6})");
        assert!(!tcp_ok(a, c.target("b", v6, 81), PROBE_TIMEOUT), "a -> b:81/TCP dropped (v6={v6})");
        assert!(udp_ok(a, c.target("b", v6, 80), PROBE_TIMEOUT), "a -> b:80/UDP allowed, reply flows (v6={v6})");
        assert!(!udp_ok(a, c.target("b", v6, 81), PROBE_TIMEOUT), "a -> b:81/UDP dropped (v6={v6})");
        assert!(!tcp_ok(b, c.target("a", v6, 80), PROBE_TIMEOUT), "b egress isolated: b -> a dropped (v6={v6})");
    }
    // Lifting isolation restores traffic.
    c.endpoint("b", B_EP, 0);
    let a = &c.node.pod("a").ns;
    assert!(tcp_ok(a, c.target("b", false, 81), PROBE_TIMEOUT));
    assert_eq!(c.bpffs.path.join("links").read_dir().map(|d| d.count()).unwrap_or(0), 4, "two pinned links per pod");
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn sctp_over_raw_sockets_follows_the_maps() {
    let mut c = Cluster::new();
    c.endpoint("b", B_EP, FLAG_INGRESS_ISOLATED);
    c.allow("b", A_ID, Direction::Ingress, proto::SCTP, 80);
    c.allow("b", A_ID, Direction::Ingress, proto::TCP, 81);
    for v6 in [false, true] {
        let sink = SctpSink::start(&c.node.pod("b").ns, v6, Duration::from_millis(800));
        let a = &c.node.pod("a").ns;
        sctp_send_init(a, c.target("b", v6, 80), 40000);
        sctp_send_init(a, c.target("b", v6, 81), 40001);
        sctp_send_init(a, c.target("b", v6, 82), 40002);
        let ports = sink.ports();
        assert_eq!(ports, vec![80], "only the allowed SCTP port arrives; a TCP entry does not admit SCTP (v6={v6})");
    }
}
