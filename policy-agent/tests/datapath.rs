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
    Bpffs, Netns, Node,
    packet::{ACK, FIN, Frame, L4, RST, SYN, arp, arp_from, ipv4_checksum},
    probe::{SctpSink, Servers, sctp_send_init, tcp_ok, udp_ok},
};

/// A pass hands the packet to the next program of the TCX chain (TCX_NEXT, -1).
const TC_ACT_OK: u32 = u32::MAX;
const TC_ACT_SHOT: u32 = 2;

/// BPF_PROG_TEST_RUN runs on the loopback device, so the endpoint is ifindex 1.
const LO: u32 = 1;
const ENDPOINT: u32 = 7;
const POD: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 10);
const PEER: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 20);
const OTHER: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 30);
const POD6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 0x10);
const PEER6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 0x20);
/// One of the node's addresses (identity HOST), and a link-local one.
const NODE6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 1);
const LINK_LOCAL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
const PEER_ID: u32 = 1000;
const OTHER_ID: u32 = 1001;
const COOKIE: u32 = 4242;
/// The cookie of the deny entries (a ClusterNetworkPolicy Deny rule).
const DENY_COOKIE: u32 = 4343;
/// Tracked flows per endpoint in the fixture.
const CT_BUDGET: u32 = 64;

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
    /// The endpoint's revision, as written last.
    revision: u32,
    _bpffs: Bpffs,
}

impl Fixture {
    fn new() -> Self {
        let bpffs = Bpffs::new("dp");
        let mut datapath = Datapath::load(PinLayout::new(&bpffs.path)).expect("load classifier");
        let mut maps = datapath.take_maps().expect("maps");
        maps.config.set(0, Config { flags: CONFIG_EVENTS_DENIED | CONFIG_EVENTS_ALLOWED, events_per_sec: 1000, ct_budget: CT_BUDGET, _pad: 0 }, 0).expect("config");
        for (addr, id) in [(v4(PEER), PEER_ID), (v4(OTHER), OTHER_ID), (v6(PEER6), PEER_ID), (v6(NODE6), identity::HOST)] {
            insert_identity(&mut maps, addr, if addr.is_ipv4() { 32 } else { 128 }, id);
        }
        Self { datapath, maps, flags: 0, lookups: [0; 2], revision: 0, _bpffs: bpffs }
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
            revision: self.revision,
        };
        self.maps.endpoints.insert(EndpointKey { ifindex: LO }, info, 0).expect("endpoint");
    }

    /// Rewrites the endpoint with flags and a new revision, as the agent does after any
    /// change that could alter a verdict.
    fn new_revision(&mut self, flags: u32) {
        self.revision += 1;
        self.endpoint(flags);
    }

    /// Removes an exact-port allow entry (the agent's write) without touching the endpoint.
    fn revoke(&mut self, peer: u32, direction: Direction, protocol: u8, port: u16) {
        let key = PolicyKey::new(ENDPOINT, peer, direction, protocol, port);
        self.maps.write(&MapOp::PolicyRemove { prefix_len: PREFIX_FULL, key }).expect("policy removal");
    }

    /// Writes an allow entry the way the agent does (through `Maps::write`).
    fn entry(&mut self, prefix_len: u32, key: PolicyKey) {
        self.entry_value(prefix_len, key, PolicyValue::allow(COOKIE));
    }

    /// Writes an entry with any value (a deny, or an action the classifier does not know).
    fn entry_value(&mut self, prefix_len: u32, key: PolicyKey, value: PolicyValue) {
        self.maps.write(&MapOp::PolicyUpsert { prefix_len, key, value }).expect("policy entry");
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

    /// Runs the frame as if it had come in on interface `ingress_ifindex` (0: sent by the
    /// node itself).
    fn run_from(&self, hook: Hook, frame: &[u8], ingress_ifindex: u32) -> u32 {
        // `struct __sk_buff` up to `ifindex`: TEST_RUN takes a prefix, `ingress_ifindex` at 36.
        let mut ctx = [0u8; 44];
        ctx[36..40].copy_from_slice(&ingress_ifindex.to_ne_bytes());
        let program = self.datapath.program(hook).expect("program");
        let opts = TestRunOptions { data_in: Some(frame), ctx_in: Some(&ctx), ..TestRunOptions::default() };
        program.test_run(opts).expect("BPF_PROG_TEST_RUN").return_value
    }

    /// Runs the frame with `skb->mark` set; returns the verdict and the mark after the run.
    fn run_marked(&self, hook: Hook, frame: &[u8], mark: u32) -> (u32, u32) {
        // `struct __sk_buff` up to `ifindex`: `mark` at 8.
        let mut ctx = [0u8; 44];
        ctx[8..12].copy_from_slice(&mark.to_ne_bytes());
        // The kernel writes back the whole `struct __sk_buff` (192 bytes) or fails.
        let mut out = [0u8; 256];
        let program = self.datapath.program(hook).expect("program");
        let opts = TestRunOptions { data_in: Some(frame), ctx_in: Some(&ctx), ctx_out: Some(&mut out), ..TestRunOptions::default() };
        let verdict = program.test_run(opts).expect("BPF_PROG_TEST_RUN").return_value;
        (verdict, u32::from_ne_bytes([out[8], out[9], out[10], out[11]]))
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

    /// Tracked flows of one endpoint id.
    fn conntrack_of(&self, endpoint: u32) -> usize {
        self.maps.conntrack.keys().filter_map(Result::ok).filter(|k| k.endpoint == endpoint).count()
    }

    /// The same interface as another endpoint id (TEST_RUN always runs on one interface).
    fn endpoint_id(&mut self, id: u32, flags: u32) {
        self.endpoint(flags);
        let mut info = self.maps.endpoints.get(&EndpointKey { ifindex: LO }, 0).expect("endpoint");
        info.id = id;
        self.maps.endpoints.insert(EndpointKey { ifindex: LO }, info, 0).expect("endpoint");
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
fn truncated_headers_fail_closed_where_isolated_and_leaving_any_pod() {
    let mut f = Fixture::new();
    f.endpoint(FLAG_INGRESS_ISOLATED);
    f.allow(identity::ANY, Direction::Ingress, None, None);
    let mut frame = Frame::tcp(v4(PEER), 40000, v4(POD), 80, SYN);
    frame.truncate = Some(14 + 20 + 10);
    assert_eq!(f.run(Hook::ToPod, &frame.build()), TC_ACT_SHOT, "cut TCP header on an isolated direction");
    assert_eq!(f.counted(ENDPOINT, Reason::DropMalformed), 1);
    let mut out = Frame::tcp(v4(POD), 80, v4(PEER), 40000, SYN);
    out.truncate = Some(14 + 20 + 10);
    assert_eq!(f.run(Hook::FromPod, &out.build()), TC_ACT_SHOT, "leaving the pod: its source cannot be verified");
    let mut udp = Frame::udp(v6(PEER6), 1, v6(POD6), 53);
    udp.truncate = Some(14 + 40 + 4);
    assert_eq!(f.run(Hook::ToPod, &udp.build()), TC_ACT_SHOT, "cut UDP header over IPv6");
    f.endpoint(FLAG_EGRESS_ISOLATED);
    assert_eq!(f.run(Hook::ToPod, &frame.build()), TC_ACT_OK, "entering, ingress not isolated: untouched");
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
fn arp_and_neighbour_discovery_pass() {
    let mut f = Fixture::new();
    f.endpoint(FLAG_INGRESS_ISOLATED | FLAG_EGRESS_ISOLATED);
    assert_eq!(f.run(Hook::ToPod, &arp()), TC_ACT_OK);
    assert_eq!(f.run(Hook::FromPod, &arp_from(POD)), TC_ACT_OK);
    let mut solicit = Frame::new(v6(LINK_LOCAL), v6(POD6), L4::Icmp { kind: 135, code: 0, id: 0 });
    solicit.hop_limit = 255;
    assert_eq!(f.run(Hook::ToPod, &solicit.build()), TC_ACT_OK);
    assert_eq!(f.counted(ENDPOINT, Reason::PassNonIp), 3);
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn non_isolated_pod_is_untouched() {
    let mut f = Fixture::new();
    f.endpoint(0);
    assert_eq!(f.run(Hook::ToPod, &Frame::tcp(v4(OTHER), 1, v4(POD), 80, SYN).build()), TC_ACT_OK);
    assert_eq!(f.run(Hook::FromPod, &Frame::tcp(v4(POD), 80, v4(OTHER), 1, SYN | ACK).build()), TC_ACT_OK);
    let mut cut = Frame::tcp(v4(OTHER), 1, v4(POD), 80, SYN);
    cut.truncate = Some(14 + 20 + 10);
    assert_eq!(f.run(Hook::ToPod, &cut.build()), TC_ACT_OK, "entering: nothing to judge");
    assert_eq!(f.conntrack_len(), 0, "nothing is tracked for a pod with no isolation");
    assert_eq!(f.counted(ENDPOINT, Reason::PassNotIsolated), 3);
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

// --- Deny entries: a ClusterNetworkPolicy Deny (issue 16) ----------------------------------

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn deny_entry_drops_what_a_less_specific_allow_admits() {
    let mut f = Fixture::new();
    f.endpoint(FLAG_INGRESS_ISOLATED);
    f.allow(identity::ANY, Direction::Ingress, Some(proto::TCP), None);
    // Control: the whole-protocol allow admits the peer on port 80.
    assert_eq!(f.run(Hook::ToPod, &Frame::tcp(v4(PEER), 40000, v4(POD), 80, SYN).build()), TC_ACT_OK);
    assert_eq!(f.conntrack_len(), 1);
    // A deny for the peer on TCP 80, more specific: it is found first and drops.
    f.entry_value(PREFIX_FULL, PolicyKey::new(ENDPOINT, PEER_ID, Direction::Ingress, proto::TCP, 80), PolicyValue::deny(DENY_COOKIE));
    f.new_revision(FLAG_INGRESS_ISOLATED);
    f.events();
    assert_eq!(f.run(Hook::ToPod, &Frame::tcp(v4(PEER), 40001, v4(POD), 80, SYN).build()), TC_ACT_SHOT);
    assert_eq!(f.counted(ENDPOINT, Reason::DropDeny), 1);
    assert_eq!(f.counted(ENDPOINT, Reason::DropPolicy), 0, "a deny is not a miss");
    let events = f.events();
    let drop = events.iter().find(|e| e.reason == Reason::DropDeny as u8).expect("a drop_deny event");
    assert_eq!((drop.cookie, drop.peer_identity, drop.dst_port()), (DENY_COOKIE, PEER_ID, 80), "the event names the deny rule");
    // The flow opened before the deny is judged again under the new revision: revoked.
    assert_eq!(f.run(Hook::ToPod, &Frame::tcp(v4(PEER), 40000, v4(POD), 80, ACK).build()), TC_ACT_SHOT, "a deny revokes a tracked flow");
    assert_eq!(f.conntrack_len(), 0);
    // What the deny does not name is still allowed by the broader entry.
    assert_eq!(f.run(Hook::ToPod, &Frame::tcp(v4(PEER), 40002, v4(POD), 81, SYN).build()), TC_ACT_OK, "another port");
    assert_eq!(f.run(Hook::ToPod, &Frame::tcp(v4(OTHER), 40003, v4(POD), 80, SYN).build()), TC_ACT_OK, "another peer");
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn unknown_actions_fail_closed() {
    let mut f = Fixture::new();
    f.endpoint(FLAG_INGRESS_ISOLATED);
    f.allow(identity::ANY, Direction::Ingress, None, None);
    // An action this classifier does not know is a deny, never a miss that would fall
    // through to the broader allow; u32::MAX too (the lookup's own miss marker).
    for (port, action) in [(80, 7), (81, u32::MAX), (82, policy_common::policy::ACTION_DENY)] {
        let key = PolicyKey::new(ENDPOINT, PEER_ID, Direction::Ingress, proto::TCP, port);
        f.entry_value(PREFIX_FULL, key, PolicyValue { cookie: DENY_COOKIE, action });
        assert_eq!(f.run(Hook::ToPod, &Frame::tcp(v4(PEER), 40000, v4(POD), port, SYN).build()), TC_ACT_SHOT, "action {action}");
    }
    assert_eq!(f.counted(ENDPOINT, Reason::DropDeny), 3);
    // Control: a port without an entry of its own takes the any-protocol allow.
    assert_eq!(f.run(Hook::ToPod, &Frame::tcp(v4(PEER), 40000, v4(POD), 83, SYN).build()), TC_ACT_OK);
    // The same in a port block (the trie).
    f.entry_value(PREFIX_PROTOCOL + 8, PolicyKey::new(ENDPOINT, PEER_ID, Direction::Ingress, proto::UDP, 0x1000), PolicyValue { cookie: DENY_COOKIE, action: 7 });
    assert_eq!(f.run(Hook::ToPod, &Frame::udp(v4(PEER), 40000, v4(POD), 0x1001).build()), TC_ACT_SHOT, "port block, action 7");
    assert_eq!(f.run(Hook::ToPod, &Frame::udp(v4(PEER), 40000, v4(POD), 0x2001).build()), TC_ACT_OK, "outside the block");
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn audit_mode_passes_a_deny_and_names_its_rule() {
    let mut f = Fixture::new();
    f.endpoint(FLAG_INGRESS_ISOLATED | FLAG_AUDIT);
    f.entry_value(PREFIX_PROTOCOL, PolicyKey::new(ENDPOINT, PEER_ID, Direction::Ingress, proto::TCP, 0), PolicyValue::deny(DENY_COOKIE));
    f.events();
    assert_eq!(f.run(Hook::ToPod, &Frame::tcp(v4(PEER), 40000, v4(POD), 80, SYN).build()), TC_ACT_OK);
    assert_eq!((f.counted(ENDPOINT, Reason::PassAudit), f.counted(ENDPOINT, Reason::DropDeny)), (1, 0));
    assert!(f.events().iter().any(|e| e.reason == Reason::PassAudit as u8 && e.cookie == DENY_COOKIE), "the would-be drop names the deny rule");
    // Leaving audit mode: the tracked flow is judged again and the deny cuts it.
    f.new_revision(FLAG_INGRESS_ISOLATED);
    assert_eq!(f.run(Hook::ToPod, &Frame::tcp(v4(PEER), 40000, v4(POD), 80, ACK).build()), TC_ACT_SHOT);
    assert_eq!(f.counted(ENDPOINT, Reason::DropDeny), 1);
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn deferred_egress_honours_deny_entries() {
    use policy_common::service;
    let mut f = Fixture::new();
    f.endpoint(FLAG_EGRESS_ISOLATED);
    f.allow(identity::ANY, Direction::Egress, Some(proto::TCP), None);
    f.entry_value(PREFIX_FULL, PolicyKey::new(ENDPOINT, PEER_ID, Direction::Egress, proto::TCP, 80), PolicyValue::deny(DENY_COOKIE));
    f.maps.endpoint_ids.set(ENDPOINT, EndpointKey { ifindex: LO }, 0).expect("endpoint id");
    let marked = service::mark(0, ENDPOINT);
    // After the translation, towards the backend: the deny decides; the control passes.
    assert_eq!(f.run_marked(Hook::ToPod, &Frame::tcp(v4(POD), 40000, v4(PEER), 80, SYN).build(), marked).0, TC_ACT_SHOT);
    assert_eq!(f.counted(ENDPOINT, Reason::DropDeny), 1);
    assert_eq!(f.run_marked(Hook::ToPod, &Frame::tcp(v4(POD), 40001, v4(PEER), 81, SYN).build(), marked).0, TC_ACT_OK);
    assert_eq!(f.run_marked(Hook::ToPod, &Frame::tcp(v4(POD), 40002, v4(OTHER), 80, SYN).build(), marked).0, TC_ACT_OK);
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
    /// Every endpoint write is a new revision, as the agent's are.
    revision: u32,
}

const A4: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 1);
const B4: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 2);
const A6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 10, 0, 0, 0, 1);
const B6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 10, 0, 0, 0, 2);
const C4: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 3);
const C6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 10, 0, 0, 0, 3);
const A_ID: u32 = 3000;
const B_ID: u32 = 3001;
const C_ID: u32 = 3002;
const A_EP: u32 = 1;
const B_EP: u32 = 2;
const C_EP: u32 = 3;

impl Cluster {
    fn new() -> Self {
        let mut node = Node::new("dpn");
        node.add_pod("a", A4, A6);
        node.add_pod("b", B4, B6);
        node.add_pod("c", C4, C6);
        let bpffs = Bpffs::new("dpn");
        for pod in &node.pods {
            let out = node.ns.exec(&[env!("CARGO_BIN_EXE_policy-agent"), "attach", "--iface", &pod.host_if, "--bpffs", bpffs.path.to_str().expect("utf-8")]);
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains("attached from_pod") && text.contains("attached to_pod"), "{text}");
        }
        let mut maps = Maps::open_pinned(&PinLayout::new(&bpffs.path)).expect("pinned maps");
        let addresses = [(v4(A4), A_ID), (v4(B4), B_ID), (v4(C4), C_ID), (v6(A6), A_ID), (v6(B6), B_ID), (v6(C6), C_ID)];
        for (addr, bits, id) in addresses.map(|(a, id)| (a, if a.is_ipv4() { 32 } else { 128 }, id)) {
            insert_identity(&mut maps, addr, bits, id);
        }
        let mut cluster = Self { node, bpffs, maps, endpoints: std::collections::BTreeMap::new(), revision: 0 };
        cluster.endpoint("a", A_EP, 0);
        cluster.endpoint("b", B_EP, 0);
        cluster.endpoint("c", C_EP, 0);
        cluster
    }

    fn endpoint(&mut self, pod: &'static str, id: u32, flags: u32) {
        let lookups = self.endpoints.get(pod).map_or([0; 2], |e| e.2);
        self.endpoints.insert(pod, (id, flags, lookups));
        self.revision += 1;
        let p = self.node.pod(pod);
        let ifindex = self.node.ns.ifindex(&p.host_if);
        let info = EndpointInfo {
            id,
            flags: flags | FLAG_HAS_IPV4 | FLAG_HAS_IPV6,
            ipv4: p.ipv4.octets(),
            ipv6: p.ipv6.octets(),
            lookups,
            _pad: [0; 2],
            revision: self.revision,
        };
        self.maps.write(&MapOp::EndpointUpsert { ifindex, info }).expect("endpoint");
    }

    /// Takes the pod out of enforcement (as if no agent managed it): the control case of the
    /// attack tests, which proves the test would see the frame get through.
    fn unmanage(&mut self, pod: &str) {
        let ifindex = self.node.ns.ifindex(&self.node.pod(pod).host_if);
        self.maps.endpoints.remove(&EndpointKey { ifindex }).expect("endpoint removal");
    }

    /// Removes an exact-port allow entry of `pod` and writes its endpoint under a new revision.
    fn revoke(&mut self, pod: &'static str, peer: u32, direction: Direction, protocol: u8, port: u16) {
        let (id, flags, _) = self.endpoints[pod];
        let key = PolicyKey::new(id, peer, direction, protocol, port);
        self.maps.write(&MapOp::PolicyRemove { prefix_len: PREFIX_FULL, key }).expect("policy removal");
        self.endpoint(pod, id, flags);
    }

    fn allow(&mut self, pod: &'static str, peer: u32, direction: Direction, protocol: u8, port: u16) {
        let (id, flags, mut lookups) = self.endpoints[pod];
        let key = PolicyKey::new(id, peer, direction, protocol, port);
        self.maps.write(&MapOp::PolicyUpsert { prefix_len: PREFIX_FULL, key, value: PolicyValue::allow(COOKIE) }).expect("policy");
        lookups[direction as usize] |= lookup::bit(PREFIX_FULL, peer);
        self.endpoints.insert(pod, (id, flags, lookups));
        self.endpoint(pod, id, flags);
    }

    /// Writes any entry of `pod` (a deny, a whole protocol) and its endpoint's new mask.
    fn entry(&mut self, pod: &'static str, prefix_len: u32, key: PolicyKey, value: PolicyValue) {
        let (id, flags, mut lookups) = self.endpoints[pod];
        self.maps.write(&MapOp::PolicyUpsert { prefix_len, key, value }).expect("policy");
        lookups[key.direction().expect("direction") as usize] |= lookup::bit(prefix_len, key.identity());
        self.endpoints.insert(pod, (id, flags, lookups));
        self.endpoint(pod, id, flags);
    }

    /// Packets counted for `reason` on an endpoint id, both directions, over all CPUs.
    fn counted_reason(&self, endpoint: u32, reason: Reason) -> u64 {
        [Direction::Ingress, Direction::Egress]
            .into_iter()
            .map(|d| self.maps.counters.get(&reason.slot(endpoint, d), 0).expect("counter").iter().map(|c| c.packets).sum::<u64>())
            .sum()
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
    assert_eq!(c.bpffs.path.join("links").read_dir().map(|d| d.count()).unwrap_or(0), 6, "two pinned links per pod");
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

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn real_deny_entry_overrides_a_broader_allow() {
    let mut c = Cluster::new();
    c.maps.config.set(0, Config { flags: CONFIG_EVENTS_DENIED, events_per_sec: 1000, ct_budget: 0, _pad: 0 }, 0).expect("config");
    let _servers = Servers::start(&c.node.pod("b").ns, &[80, 81], Duration::from_secs(60));
    // b accepts every peer on TCP (a whole-protocol entry for the wildcard identity).
    c.endpoint("b", B_EP, FLAG_INGRESS_ISOLATED);
    c.entry("b", PREFIX_PROTOCOL, PolicyKey::new(B_EP, identity::ANY, Direction::Ingress, proto::TCP, 0), PolicyValue::allow(COOKIE));
    for v6 in [false, true] {
        assert!(tcp_ok(&c.node.pod("a").ns, c.target("b", v6, 80), PROBE_TIMEOUT), "control: no deny, a -> b:80 allowed (v6={v6})");
    }
    // A Deny for a on TCP 80: more specific, it wins over the allow.
    c.entry("b", PREFIX_FULL, PolicyKey::new(B_EP, A_ID, Direction::Ingress, proto::TCP, 80), PolicyValue::deny(DENY_COOKIE));
    drain_events(&mut c.maps.events);
    for v6 in [false, true] {
        assert!(!tcp_ok(&c.node.pod("a").ns, c.target("b", v6, 80), PROBE_TIMEOUT), "a -> b:80 denied (v6={v6})");
        assert!(tcp_ok(&c.node.pod("a").ns, c.target("b", v6, 81), PROBE_TIMEOUT), "a -> b:81 still allowed (v6={v6})");
        assert!(tcp_ok(&c.node.pod("c").ns, c.target("b", v6, 80), PROBE_TIMEOUT), "c -> b:80 still allowed (v6={v6})");
    }
    assert!(c.counted_reason(B_EP, Reason::DropDeny) >= 2, "drop_deny counted");
    assert_eq!(c.counted_reason(B_EP, Reason::DropPolicy), 0);
    let events = drain_events(&mut c.maps.events);
    let drop = events.iter().find(|e| e.reason == Reason::DropDeny as u8).expect("a drop_deny event");
    assert_eq!((drop.endpoint, drop.cookie, drop.peer_identity, drop.dst_port()), (B_EP, DENY_COOKIE, A_ID, 80));
}

// --- Services: egress judged after kube-proxy's translation (issue 11) --------------------

const SVC_B: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const SVC_C: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 11);
const SVC_D: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 12);
/// b's Service over IPv6 (a ClusterIP from the IPv6 Service range).
const SVC_B6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0xff, 0, 0, 0, 0x10);
/// A pod on another node, behind the node's uplink.
const D4: Ipv4Addr = Ipv4Addr::new(198, 18, 11, 4);
const D_ID: u32 = 3003;

/// kube-proxy's iptables rules, reduced to what matters here: DNAT of each ClusterIP's TCP and
/// UDP port 80 to one backend, and masquerade for hairpin traffic (a backend reaching itself).
fn kube_proxy_rules(node: &Netns, services: &[(Ipv4Addr, Ipv4Addr)]) {
    for (service, backend) in services {
        for protocol in ["tcp", "udp"] {
            let (service, backend) = (service.to_string(), format!("{backend}:80"));
            for chain in ["PREROUTING", "OUTPUT"] {
                let out = node.exec(&["iptables", "-t", "nat", "-A", chain, "-d", &service, "-p", protocol, "--dport", "80", "-j", "DNAT", "--to-destination", &backend]);
                assert!(out.status.success(), "iptables: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        let backend = backend.to_string();
        node.exec(&["iptables", "-t", "nat", "-A", "POSTROUTING", "-s", &backend, "-d", &backend, "-j", "MASQUERADE"]);
    }
    for chain in ["PREROUTING", "OUTPUT"] {
        let to = format!("[{B6}]:80");
        let out = node.exec(&["ip6tables", "-t", "nat", "-A", chain, "-d", &SVC_B6.to_string(), "-p", "tcp", "--dport", "80", "-j", "DNAT", "--to-destination", &to]);
        assert!(out.status.success(), "ip6tables: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// A pod on another node: a namespace behind a veth from the node (its uplink), routed.
/// Returns the pod's namespace and the uplink's name.
fn remote_pod(c: &Cluster) -> (Netns, String) {
    let remote = Netns::new("dpr");
    let uplink = format!("{}up", testbed::run_prefix());
    let node = &c.node.ns;
    node.exec(&["ip", "link", "add", &uplink, "type", "veth", "peer", "name", "eth0", "netns", &remote.name]);
    node.exec(&["ip", "addr", "add", "198.18.11.1/30", "dev", &uplink]);
    node.exec(&["ip", "link", "set", &uplink, "up"]);
    node.exec(&["ip", "route", "add", &format!("{D4}/32"), "via", "198.18.11.2"]);
    remote.exec(&["ip", "addr", "add", "198.18.11.2/30", "dev", "eth0"]);
    remote.exec(&["ip", "addr", "add", &format!("{D4}/32"), "dev", "eth0"]);
    remote.exec(&["ip", "link", "set", "eth0", "up"]);
    remote.exec(&["ip", "route", "add", "default", "via", "198.18.11.1"]);
    (remote, uplink)
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn real_service_egress_is_judged_as_egress_towards_the_backend() {
    let mut c = Cluster::new();
    let (remote, uplink) = remote_pod(&c);
    let out = c.node.ns.exec(&[env!("CARGO_BIN_EXE_policy-agent"), "attach", "--iface", &uplink, "--direction", "egress", "--bpffs", c.bpffs.path.to_str().expect("utf-8")]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("attached to_pod"), "{out:?}");
    insert_identity(&mut c.maps, v4(D4), 32, D_ID);
    kube_proxy_rules(&c.node.ns, &[(SVC_B, B4), (SVC_C, C4), (SVC_D, D4)]);
    let _servers = [&c.node.pod("b").ns, &c.node.pod("c").ns, &remote].map(|ns| Servers::start(ns, &[80], Duration::from_secs(60)));
    let svc = |ip: Ipv4Addr| SocketAddr::new(v4(ip), 80);
    // a may reach b (TCP and UDP), the remote pod d, and "the internet" (WORLD: an ipBlock
    // 0.0.0.0/0 except the pod range), but not c.
    c.endpoint("a", A_EP, FLAG_EGRESS_ISOLATED);
    c.allow("a", B_ID, Direction::Egress, proto::TCP, 80);
    c.allow("a", B_ID, Direction::Egress, proto::UDP, 80);
    c.allow("a", D_ID, Direction::Egress, proto::TCP, 80);
    c.allow("a", identity::WORLD, Direction::Egress, proto::TCP, 80);

    // Control: without the Service range a ClusterIP is judged as itself (WORLD), and c is
    // reached through the rule meant for the outside world.
    let a = &c.node.pod("a").ns;
    assert!(tcp_ok(a, svc(SVC_C), PROBE_TIMEOUT), "control: the leak of issue 11 is visible");
    assert!(!tcp_ok(a, c.target("c", false, 80), PROBE_TIMEOUT), "control: c's pod IP is denied");

    let ranges = ["198.19.0.0/24", "2001:2:0:ff::/64"].map(|r| policy_agent::resolve::IpPrefix::parse(r).expect("prefix"));
    c.maps.set_service_nets(&ranges).expect("service ranges");
    let a = &c.node.pod("a").ns;
    assert!(tcp_ok(a, svc(SVC_B), PROBE_TIMEOUT), "a -> b through its ClusterIP: allowed as a -> b");
    assert!(tcp_ok(a, SocketAddr::new(v6(SVC_B6), 80), PROBE_TIMEOUT), "IPv6: a -> b through its IPv6 ClusterIP");
    assert!(udp_ok(a, svc(SVC_B), PROBE_TIMEOUT), "UDP too, and the reply comes back from the ClusterIP");
    assert!(!tcp_ok(a, svc(SVC_C), PROBE_TIMEOUT), "a -> c through its ClusterIP: denied as a -> c");
    assert!(!udp_ok(a, svc(SVC_C), PROBE_TIMEOUT), "UDP to c denied");
    assert!(tcp_ok(a, svc(SVC_D), PROBE_TIMEOUT), "a backend on another node: judged on the uplink, allowed");
    assert!(tcp_ok(a, c.target("b", false, 80), PROBE_TIMEOUT) && !tcp_ok(a, c.target("c", false, 80), PROBE_TIMEOUT), "pod IPs as before");
    assert!(c.counted_reason(A_EP, Reason::PassDeferred) > 0);

    // Revoked: the next connection to d is dropped where it leaves the node.
    c.revoke("a", D_ID, Direction::Egress, proto::TCP, 80);
    let a = &c.node.pod("a").ns;
    assert!(!tcp_ok(a, svc(SVC_D), PROBE_TIMEOUT), "revoked: dropped on the uplink");

    // Isolated for ingress too: the replies from the ClusterIP are replies.
    c.endpoint("a", A_EP, FLAG_EGRESS_ISOLATED | FLAG_INGRESS_ISOLATED);
    let a = &c.node.pod("a").ns;
    assert!(tcp_ok(a, svc(SVC_B), PROBE_TIMEOUT), "replies from the ClusterIP pass a's ingress");

    // Hairpin: b reaches itself through its own Service (masqueraded to the node's address).
    c.endpoint("b", B_EP, FLAG_EGRESS_ISOLATED);
    let b = &c.node.pod("b").ns;
    assert!(!tcp_ok(b, svc(SVC_B), PROBE_TIMEOUT), "b may not reach itself yet");
    c.allow("b", B_ID, Direction::Egress, proto::TCP, 80);
    let b = &c.node.pod("b").ns;
    assert!(tcp_ok(b, svc(SVC_B), PROBE_TIMEOUT), "hairpin allowed by b's egress towards itself");
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn service_flows_are_marked_and_judged_after_the_translation() {
    use policy_common::service;
    let mut f = Fixture::new();
    f.endpoint(FLAG_EGRESS_ISOLATED);
    f.allow(PEER_ID, Direction::Egress, Some(proto::TCP), Some(80));
    f.maps.endpoint_ids.set(ENDPOINT, EndpointKey { ifindex: LO }, 0).expect("endpoint id");
    let range = policy_agent::resolve::IpPrefix::parse("198.19.0.0/24").expect("prefix");
    f.maps.set_service_nets(&[range]).expect("service range");
    let cluster_ip = v4(SVC_B);

    // Leaving the pod towards the Service: passed and marked with the endpoint id, over the
    // mark's other bits (kube-proxy's 0x4000); the same for the next packet of the flow.
    let syn = Frame::tcp(v4(POD), 40000, cluster_ip, 80, SYN).build();
    assert_eq!(f.run_marked(Hook::FromPod, &syn, 0x4000), (TC_ACT_OK, service::mark(0x4000, ENDPOINT)));
    let ack = Frame::tcp(v4(POD), 40000, cluster_ip, 80, ACK).build();
    assert_eq!(f.run_marked(Hook::FromPod, &ack, 0).1, service::mark(0, ENDPOINT));
    assert_eq!(f.counted(ENDPOINT, Reason::PassDeferred), 2);
    // Towards a pod IP: judged here, and not marked.
    assert_eq!(f.run_marked(Hook::FromPod, &Frame::tcp(v4(POD), 40001, v4(PEER), 80, SYN).build(), 0), (TC_ACT_OK, 0));
    // The reply from the Service address is a reply (the entry of the deferred flow).
    f.endpoint(FLAG_EGRESS_ISOLATED | FLAG_INGRESS_ISOLATED);
    assert_eq!(f.run(Hook::ToPod, &Frame::tcp(cluster_ip, 80, v4(POD), 40000, SYN | ACK).build()), TC_ACT_OK);

    // After the translation: judged as the endpoint's egress towards the backend (TEST_RUN
    // has one interface: the packet then meets the same endpoint's ingress, not isolated).
    f.endpoint(FLAG_EGRESS_ISOLATED);
    let marked = service::mark(0, ENDPOINT);
    assert_eq!(f.run_marked(Hook::ToPod, &Frame::tcp(v4(POD), 40002, v4(PEER), 80, SYN).build(), marked).0, TC_ACT_OK);
    assert_eq!(f.run_marked(Hook::ToPod, &Frame::tcp(v4(POD), 40003, v4(OTHER), 80, SYN).build(), marked).0, TC_ACT_SHOT);
    // Not translated (no rule for the port): the deferred flow's own entry does not vouch
    // for it; judged towards the Service address (WORLD), denied.
    assert_eq!(f.run_marked(Hook::ToPod, &Frame::tcp(v4(POD), 40000, cluster_ip, 80, ACK).build(), marked).0, TC_ACT_SHOT);
    // A mark naming an endpoint that is not there (or whose id moved) is dropped.
    assert_eq!(f.run_marked(Hook::ToPod, &Frame::tcp(v4(POD), 40004, v4(PEER), 80, SYN).build(), service::mark(0, 99)).0, TC_ACT_SHOT);
    assert_eq!(f.counted(0, Reason::DropStale), 1);
    // Without a Service range, nothing is deferred: the ClusterIP is judged as itself.
    f.maps.set_service_nets(&[]).expect("no service range");
    assert_eq!(f.run_marked(Hook::FromPod, &Frame::tcp(v4(POD), 40005, cluster_ip, 80, SYN).build(), 0), (TC_ACT_SHOT, 0));
}

// --- What an attacker in a pod with CAP_NET_RAW tries (issue 12) -------------------------
// Each test first shows its control: the same kind of frame passes where it is legitimate.

/// Appends `extra` payload bytes and fixes the length fields (and the IPv4 checksum).
fn grow(mut frame: Vec<u8>, extra: usize) -> Vec<u8> {
    frame.resize(frame.len() + extra, 0xab);
    fix_lengths(&mut frame);
    frame
}

/// Sets the IP length field to `len` (IPv4 total length, IPv6 payload length): a lie.
fn set_ip_len(frame: &mut [u8], len: usize) {
    let field = if frame[12..14] == [0x86, 0xdd] { 18 } else { 16 };
    frame[field..field + 2].copy_from_slice(&(len as u16).to_be_bytes());
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn vlan_tagged_frames_are_dropped_on_every_pod() {
    let mut f = Fixture::new();
    for flags in [0, FLAG_EGRESS_ISOLATED] {
        f.endpoint(flags);
        f.allow(identity::ANY, Direction::Egress, None, None);
        let plain = Frame::udp(v4(POD), 40000, v4(PEER), 53);
        assert_eq!(f.run(Hook::FromPod, &plain.build()), TC_ACT_OK, "control: untagged");
        for tags in [vec![0x8100], vec![0x88a8, 0x8100], vec![0x8100, 0x8100], vec![0x9100]] {
            for v6 in [false, true] {
                let mut tagged = if v6 { Frame::udp(self::v6(POD6), 40000, self::v6(PEER6), 53) } else { plain.clone() };
                tagged.vlan_tags = tags.clone();
                assert_eq!(f.run(Hook::FromPod, &tagged.build()), TC_ACT_SHOT, "{tags:x?} v6={v6} flags={flags}");
                assert_eq!(f.run(Hook::ToPod, &tagged.build()), TC_ACT_SHOT, "{tags:x?} v6={v6} flags={flags}");
            }
        }
    }
    assert_eq!(f.counted(ENDPOINT, Reason::DropFrame), 32);
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn only_ip_and_arp_with_the_pods_sender_pass() {
    let mut f = Fixture::new();
    f.endpoint(0);
    assert_eq!(f.run(Hook::FromPod, &arp_from(POD)), TC_ACT_OK, "control: the pod's own ARP");
    assert_eq!(f.run(Hook::FromPod, &arp_from(Ipv4Addr::UNSPECIFIED)), TC_ACT_OK, "an ARP probe");
    assert_eq!(f.run(Hook::FromPod, &arp_from(PEER)), TC_ACT_SHOT, "ARP claiming another pod's address");
    assert_eq!(f.run(Hook::ToPod, &arp_from(PEER)), TC_ACT_OK, "ARP towards the pod");
    let mut not_ipv4 = arp_from(POD);
    not_ipv4[16..18].copy_from_slice(&[0x86, 0xdd]);
    assert_eq!(f.run(Hook::FromPod, &not_ipv4), TC_ACT_SHOT, "ARP for another protocol");
    for ethertype in [[0x88, 0xcc], [0x80, 0x35], [0x08, 0x42], [0x88, 0x8e], [0x00, 0x20]] {
        let mut frame = Frame::udp(v4(POD), 1, v4(PEER), 53).build();
        frame[12..14].copy_from_slice(&ethertype);
        for hook in Hook::BOTH {
            assert_eq!(f.run(hook, &frame), TC_ACT_SHOT, "EtherType {ethertype:x?}");
        }
    }
    assert_eq!(f.counted(ENDPOINT, Reason::DropFrame), 2 + 10);
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn forged_icmp_errors_are_not_related() {
    let mut f = Fixture::new();
    f.endpoint(FLAG_INGRESS_ISOLATED | FLAG_EGRESS_ISOLATED);
    f.allow(PEER_ID, Direction::Egress, Some(proto::UDP), Some(53));
    assert_eq!(f.run(Hook::FromPod, &Frame::udp(v4(POD), 40000, v4(PEER), 53).build()), TC_ACT_OK);
    let sent = Frame::udp(v4(POD), 40000, v4(PEER), 53);
    let got = Frame::udp(v4(PEER), 53, v4(POD), 40000);
    let error = |src, dst, kind, quoted: &Frame| Frame::new(v4(src), v4(dst), L4::IcmpError { kind, inner: Box::new(quoted.clone()) });
    // Controls: the peer reports the pod's datagram unreachable; the pod reports the peer's.
    assert_eq!(f.run(Hook::ToPod, &error(PEER, POD, 3, &sent).build()), TC_ACT_OK, "control: from the flow's peer");
    assert_eq!(f.run(Hook::FromPod, &error(POD, PEER, 3, &got).build()), TC_ACT_OK, "control: to the flow's peer");
    assert_eq!(f.counted(ENDPOINT, Reason::PassReply), 2);
    // Exfiltration: an error quoting the tracked flow, sent to another host.
    assert_eq!(f.run(Hook::FromPod, &error(POD, OTHER, 3, &got).build()), TC_ACT_SHOT, "to a host off the flow");
    // Injection: from a host that is not the flow's peer.
    assert_eq!(f.run(Hook::ToPod, &error(OTHER, POD, 3, &sent).build()), TC_ACT_SHOT, "from a host off the flow");
    // Size: an error is at most 576 bytes; a payload channel is not.
    let big = grow(error(PEER, POD, 3, &sent).build(), 600);
    assert_eq!(f.run(Hook::ToPod, &big), TC_ACT_SHOT, "an oversized error");
    // Redirects are never legitimate on a pod's link.
    assert_eq!(f.run(Hook::ToPod, &error(PEER, POD, 5, &sent).build()), TC_ACT_SHOT, "an ICMP redirect");
    let redirect6 = Frame::new(v6(LINK_LOCAL), v6(POD6), L4::Icmp { kind: 137, code: 0, id: 0 });
    assert_eq!(f.run(Hook::ToPod, &redirect6.build()), TC_ACT_SHOT, "an ICMPv6 redirect");
    assert_eq!(f.counted(ENDPOINT, Reason::DropPolicy), 2);
    assert_eq!(f.counted(ENDPOINT, Reason::DropFrame), 3);
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn the_node_may_report_errors_for_a_flow() {
    let mut f = Fixture::new();
    f.endpoint(FLAG_INGRESS_ISOLATED | FLAG_EGRESS_ISOLATED);
    f.allow(PEER_ID, Direction::Egress, Some(proto::UDP), Some(53));
    let sent = Frame::udp(v6(POD6), 40000, v6(PEER6), 53);
    assert_eq!(f.run(Hook::FromPod, &sent.build()), TC_ACT_OK);
    let too_big = Frame::new(v6(NODE6), v6(POD6), L4::IcmpError { kind: 2, inner: Box::new(sent.clone()) });
    assert_eq!(f.run(Hook::ToPod, &too_big.build()), TC_ACT_OK, "packet too big from the node");
    let forged = Frame::new(v6(PEER6), v6(POD6), L4::IcmpError { kind: 1, inner: Box::new(Frame::udp(v6(POD6), 40001, v6(PEER6), 53)) });
    assert_eq!(f.run(Hook::ToPod, &forged.build()), TC_ACT_SHOT, "quoting an untracked flow");
    assert_eq!(f.run(Hook::ToPod, &grow(too_big.build(), 1300)), TC_ACT_SHOT, "over 1280 bytes");
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn neighbour_discovery_and_mld_keep_to_the_link() {
    let mut f = Fixture::new();
    f.endpoint(0);
    let nd = |src, dst, kind, hop_limit| {
        let mut frame = Frame::new(v6(src), v6(dst), L4::Icmp { kind, code: 0, id: 0 });
        frame.hop_limit = hop_limit;
        frame.build()
    };
    let solicited = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00, 0x20);
    let mld_reports = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x16);
    // Controls: what a pod's stack really sends and receives.
    for (hook, frame) in [
        (Hook::FromPod, nd(POD6, solicited, 135, 255)),
        (Hook::FromPod, nd(LINK_LOCAL, LINK_LOCAL, 136, 255)),
        (Hook::FromPod, nd(POD6, NODE6, 136, 255)),
        (Hook::FromPod, nd(Ipv6Addr::UNSPECIFIED, solicited, 135, 255)),
        (Hook::FromPod, nd(LINK_LOCAL, Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2), 133, 255)),
        (Hook::FromPod, nd(LINK_LOCAL, mld_reports, 143, 1)),
        (Hook::ToPod, nd(LINK_LOCAL, POD6, 135, 255)),
        (Hook::ToPod, nd(NODE6, POD6, 136, 255)),
        (Hook::ToPod, nd(LINK_LOCAL, Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1), 134, 255)),
    ] {
        assert_eq!(f.run(hook, &frame), TC_ACT_OK, "control {hook:?}");
    }
    // Around the policy: global addresses, remote peers, wrong hop limits, payload, RAs.
    for (hook, frame, what) in [
        (Hook::FromPod, nd(POD6, PEER6, 135, 255), "to a remote peer"),
        (Hook::FromPod, nd(PEER6, solicited, 135, 255), "from another pod's address"),
        (Hook::FromPod, nd(LINK_LOCAL, solicited, 135, 64), "hop limit not 255"),
        (Hook::FromPod, nd(LINK_LOCAL, PEER6, 143, 1), "MLD to a remote peer"),
        (Hook::FromPod, nd(LINK_LOCAL, mld_reports, 143, 64), "MLD hop limit not 1"),
        (Hook::FromPod, nd(LINK_LOCAL, Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1), 134, 255), "a router advertisement from a pod"),
        (Hook::FromPod, grow(nd(LINK_LOCAL, solicited, 135, 255), 1400), "kilobytes of payload"),
        (Hook::ToPod, nd(PEER6, POD6, 136, 255), "from a remote peer"),
        (Hook::ToPod, nd(LINK_LOCAL, PEER6, 135, 255), "to another pod"),
    ] {
        assert_eq!(f.run(hook, &frame), TC_ACT_SHOT, "{what}");
    }
    assert_eq!(f.counted(ENDPOINT, Reason::DropFrame), 9);
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn pods_without_policy_cannot_spoof_either() {
    let mut f = Fixture::new();
    f.endpoint(0);
    assert_eq!(f.run(Hook::FromPod, &Frame::udp(v4(POD), 1, v4(OTHER), 80).build()), TC_ACT_OK, "control: own address");
    assert_eq!(f.run(Hook::FromPod, &Frame::udp(v4(PEER), 1, v4(OTHER), 80).build()), TC_ACT_SHOT, "as an allowed peer");
    assert_eq!(f.run(Hook::FromPod, &Frame::udp(v6(NODE6), 1, v6(PEER6), 80).build()), TC_ACT_SHOT, "as the node");
    let mut later = Frame::udp(v4(PEER), 1, v4(OTHER), 80);
    later.fragment = Some((9, false, 10));
    assert_eq!(f.run(Hook::FromPod, &later.build()), TC_ACT_SHOT, "a later fragment");
    assert_eq!(f.counted(ENDPOINT, Reason::DropSpoofed), 3);
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn only_opening_packets_create_state() {
    let mut f = Fixture::new();
    // Egress isolated, nothing allowed; ingress open.
    f.endpoint(FLAG_EGRESS_ISOLATED);
    for flags in [SYN | ACK, ACK, RST, FIN | ACK, SYN | FIN] {
        assert_eq!(f.run(Hook::ToPod, &Frame::tcp(v4(PEER), 80, v4(POD), 40000, flags).build()), TC_ACT_OK);
    }
    let sctp_data = {
        let mut frame = Frame::sctp(v4(PEER), 9, v4(POD), 40000).build();
        frame[14 + 20 + 12] = 0; // a DATA chunk, not INIT
        frame
    };
    assert_eq!(f.run(Hook::ToPod, &sctp_data), TC_ACT_OK);
    assert_eq!(f.run(Hook::ToPod, &Frame::new(v4(PEER), v4(POD), L4::Icmp { kind: 0, code: 0, id: 7 }).build()), TC_ACT_OK);
    assert_eq!(f.conntrack_len(), 0, "none of these opens a flow");
    // So the pod's own SYN is not a reply to anything.
    assert_eq!(f.run(Hook::FromPod, &Frame::tcp(v4(POD), 40000, v4(PEER), 80, SYN).build()), TC_ACT_SHOT);
    assert_eq!(f.run(Hook::FromPod, &Frame::sctp(v4(POD), 40000, v4(PEER), 9).build()), TC_ACT_SHOT);
    assert_eq!(f.run(Hook::FromPod, &Frame::new(v4(POD), v4(PEER), L4::Icmp { kind: 8, code: 0, id: 7 }).build()), TC_ACT_SHOT);
    // Control: a real SYN from the peer opens a flow, and the pod's SYN-ACK is its reply.
    assert_eq!(f.run(Hook::ToPod, &Frame::tcp(v4(PEER), 81, v4(POD), 40001, SYN).build()), TC_ACT_OK);
    assert_eq!(f.run(Hook::FromPod, &Frame::tcp(v4(POD), 40001, v4(PEER), 81, SYN | ACK).build()), TC_ACT_OK);
    assert_eq!(f.conntrack_len(), 1);
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn a_new_revision_cuts_revoked_flows_and_keeps_allowed_ones() {
    let mut f = Fixture::new();
    f.endpoint(FLAG_INGRESS_ISOLATED);
    f.allow(PEER_ID, Direction::Ingress, Some(proto::TCP), Some(80));
    f.allow(PEER_ID, Direction::Ingress, Some(proto::TCP), Some(81));
    for port in [80, 81] {
        assert_eq!(f.run(Hook::ToPod, &Frame::tcp(v4(PEER), 40000, v4(POD), port, SYN).build()), TC_ACT_OK);
    }
    // Port 81 is revoked; the revision changes.
    f.revoke(PEER_ID, Direction::Ingress, proto::TCP, 81);
    f.new_revision(FLAG_INGRESS_ISOLATED);
    assert_eq!(f.run(Hook::ToPod, &Frame::tcp(v4(PEER), 40000, v4(POD), 80, ACK).build()), TC_ACT_OK, "still allowed: kept");
    assert_eq!(f.run(Hook::ToPod, &Frame::tcp(v4(PEER), 40000, v4(POD), 81, ACK).build()), TC_ACT_SHOT, "revoked: cut");
    assert_eq!(f.run(Hook::FromPod, &Frame::tcp(v4(POD), 81, v4(PEER), 40000, ACK).build()), TC_ACT_OK, "egress not isolated");
    assert_eq!(f.conntrack_len(), 1, "the revoked flow is forgotten");
    assert_eq!(f.run(Hook::ToPod, &Frame::tcp(v4(PEER), 40000, v4(POD), 80, ACK).build()), TC_ACT_OK);
    assert_eq!(f.counted(ENDPOINT, Reason::PassEstablished), 2);
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn leaving_audit_mode_cuts_what_audit_let_through() {
    let mut f = Fixture::new();
    f.endpoint(FLAG_INGRESS_ISOLATED | FLAG_AUDIT);
    assert_eq!(f.run(Hook::ToPod, &Frame::tcp(v4(PEER), 40000, v4(POD), 80, SYN).build()), TC_ACT_OK);
    assert_eq!(f.counted(ENDPOINT, Reason::PassAudit), 1);
    assert_eq!(f.run(Hook::ToPod, &Frame::tcp(v4(PEER), 40000, v4(POD), 80, ACK).build()), TC_ACT_OK, "control: audit keeps it");
    f.new_revision(FLAG_INGRESS_ISOLATED);
    assert_eq!(f.run(Hook::ToPod, &Frame::tcp(v4(PEER), 40000, v4(POD), 80, ACK).build()), TC_ACT_SHOT);
    assert_eq!(f.conntrack_len(), 0);
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn length_fields_must_match_the_frame() {
    let mut f = Fixture::new();
    f.endpoint(FLAG_INGRESS_ISOLATED);
    f.allow(identity::ANY, Direction::Ingress, None, None);
    for v6 in [false, true] {
        let (peer, pod) = if v6 { (self::v6(PEER6), self::v6(POD6)) } else { (v4(PEER), v4(POD)) };
        let good = Frame::tcp(peer, 40000, pod, 80, SYN);
        assert_eq!(f.run(Hook::ToPod, &good.build()), TC_ACT_OK, "control v6={v6}");
        assert_eq!(f.run(Hook::ToPod, &good.padded()), TC_ACT_OK, "control with Ethernet padding v6={v6}");
        let ip_header = if v6 { 0 } else { 20 };
        for len in [ip_header + 10, ip_header + 19, ip_header + 21 + 200] {
            let mut lie = good.build();
            set_ip_len(&mut lie, len);
            assert_eq!(f.run(Hook::ToPod, &lie), TC_ACT_SHOT, "length {len} v6={v6}");
            // Leaving a pod that no policy isolates, too: the source is not trusted then.
            let mut out = Frame::tcp(pod, 80, peer, 40000, SYN).build();
            set_ip_len(&mut out, len);
            assert_eq!(f.run(Hook::FromPod, &out), TC_ACT_SHOT, "leaving, length {len} v6={v6}");
        }
    }
    let mut short_ihl = Frame::tcp(v4(PEER), 40000, v4(POD), 80, SYN).build();
    set_ip_len(&mut short_ihl, 16);
    assert_eq!(f.run(Hook::ToPod, &short_ihl), TC_ACT_SHOT, "total length below the header");
    assert_eq!(f.counted(ENDPOINT, Reason::DropMalformed), 13);
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn ipv6_header_chains_have_exact_bounds() {
    let mut f = Fixture::new();
    f.endpoint(FLAG_INGRESS_ISOLATED);
    f.allow(PEER_ID, Direction::Ingress, Some(proto::TCP), Some(443));
    let mut frame = Frame::tcp(v6(PEER6), 40003, v6(POD6), 443, SYN);
    frame.ipv6_ext = vec![0, 60, 43, 60, 60, 60];
    assert_eq!(f.run(Hook::ToPod, &frame.build()), TC_ACT_OK, "six extension headers are read");
    frame.ipv6_ext = vec![0, 60, 43, 60, 60];
    frame.fragment = Some((77, true, 0));
    assert_eq!(f.run(Hook::ToPod, &frame.build()), TC_ACT_OK, "five and a fragment header");
    frame.ipv6_ext = vec![44, 60];
    frame.fragment = Some((78, true, 0));
    assert_eq!(f.run(Hook::ToPod, &frame.build()), TC_ACT_SHOT, "two fragment headers");
    assert_eq!(f.counted(ENDPOINT, Reason::DropMalformed), 1);
}

// --- Real frames from a pod with CAP_NET_RAW, over AF_PACKET ------------------------------
// The attacker is pod a. Each test first sends its frame with a's endpoint removed (or with
// a policy that allows it) and sees it arrive: the control that proves a leak would show.

/// How long a receiver listens for a frame.
const FRAME_WAIT: Duration = Duration::from_millis(400);

/// Sends raw Ethernet frames out of the pod's eth0 (to the node's host-side veth MAC).
fn send_frames(ns: &Netns, frames: Vec<Vec<u8>>) {
    ns.run(move || {
        // SAFETY: plain socket calls on a descriptor owned here; buffers outlive each call.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_ifindex = libc::if_nametoindex(c"eth0".as_ptr()) as i32;
            addr.sll_halen = 6;
            addr.sll_addr[..6].copy_from_slice(&HOST_MAC);
            for mut frame in frames {
                frame[..6].copy_from_slice(&HOST_MAC);
                let sent = libc::sendto(fd, frame.as_ptr().cast(), frame.len(), 0, (&raw const addr).cast(), size_of::<libc::sockaddr_ll>() as u32);
                assert_eq!(sent, frame.len() as isize, "sendto: {}", std::io::Error::last_os_error());
            }
            libc::close(fd);
        }
    });
}

/// The MAC of every host-side veth in the test bed.
const HOST_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 1];

/// Counts the frames that arrive on a pod's eth0 carrying `marker`, for `FRAME_WAIT`.
struct FrameSink(std::thread::JoinHandle<usize>);

impl FrameSink {
    fn start(ns: &Netns, marker: [u8; 8]) -> Self {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let handle = ns.spawn(move || {
            // SAFETY: as in `send_frames`; the receive buffer outlives each call.
            unsafe {
                let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, (libc::ETH_P_ALL as u16).to_be() as i32);
                assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
                let timeout = libc::timeval { tv_sec: 0, tv_usec: 50_000 };
                libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, (&raw const timeout).cast(), size_of::<libc::timeval>() as u32);
                let _ = ready_tx.send(());
                let deadline = std::time::Instant::now() + FRAME_WAIT;
                let mut seen = 0;
                let mut buf = [0u8; 4096];
                while std::time::Instant::now() < deadline {
                    let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
                    if n > 0 && buf[..n as usize].windows(8).any(|w| w == marker) {
                        seen += 1;
                    }
                }
                libc::close(fd);
                seen
            }
        });
        ready_rx.recv_timeout(Duration::from_secs(5)).expect("sink ready");
        Self(handle)
    }

    fn count(self) -> usize {
        self.0.join().expect("sink thread")
    }
}

/// Whether `frame`, sent by pod a, reaches pod `to` (which must see `marker` in it).
fn delivered(c: &Cluster, to: &str, marker: [u8; 8], frame: Vec<u8>) -> bool {
    let sink = FrameSink::start(&c.node.pod(to).ns, marker);
    send_frames(&c.node.pod("a").ns, vec![frame]);
    sink.count() > 0
}

/// A UDP datagram whose payload is `marker` (UDP checksum 0: none, fine for IPv4).
fn marked_udp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, marker: [u8; 8]) -> Vec<u8> {
    let mut frame = Frame::udp(src, sport, dst, dport).build();
    let end = frame.len();
    frame[end - 4..].copy_from_slice(&marker[..4]);
    frame.extend_from_slice(&marker[4..]);
    fix_lengths(&mut frame);
    frame
}

/// Recomputes the IP length fields (and the IPv4 header checksum) after a frame grew.
fn fix_lengths(frame: &mut [u8]) {
    let offset = if frame[12..14] == [0x86, 0xdd] || frame[12..14] == [0x08, 0x00] { 14 } else { 22 };
    if frame[offset] >> 4 == 6 {
        let len = (frame.len() - offset - 40) as u16;
        frame[offset + 4..offset + 6].copy_from_slice(&len.to_be_bytes());
    } else {
        let len = (frame.len() - offset) as u16;
        frame[offset + 2..offset + 4].copy_from_slice(&len.to_be_bytes());
        frame[offset + 10..offset + 12].copy_from_slice(&[0, 0]);
        let ihl = usize::from(frame[offset] & 0x0f) * 4;
        let checksum = ipv4_checksum(&frame[offset..offset + ihl]);
        frame[offset + 10..offset + 12].copy_from_slice(&checksum.to_be_bytes());
    }
    if frame[offset] >> 4 == 4 && frame[offset + 9] == proto::UDP {
        let len = (frame.len() - offset - 20) as u16;
        frame[offset + 24..offset + 26].copy_from_slice(&len.to_be_bytes());
    }
}

fn marker(n: u8) -> [u8; 8] {
    [0x5a, 0xa5, 0x5a, 0xa5, n, std::process::id() as u8, 0xc3, 0x3c]
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn real_double_vlan_tagged_frames_do_not_leave_a_pod() {
    let mut c = Cluster::new();
    for (i, tags) in [[0x88a8u16, 0x8100], [0x8100, 0x8100]].into_iter().enumerate() {
        let m = marker(i as u8);
        let frame = marked_udp(v4(A4), 40000, v4(B4), 9, m);
        let mut tagged = frame[..12].to_vec();
        for tpid in tags {
            tagged.extend(tpid.to_be_bytes());
            tagged.extend([0, 0]);
        }
        tagged.extend_from_slice(&frame[12..]);
        c.unmanage("a");
        assert!(delivered(&c, "b", m, tagged.clone()), "control: the node strips both tags and routes the packet ({tags:x?})");
        c.endpoint("a", A_EP, FLAG_EGRESS_ISOLATED);
        assert!(!delivered(&c, "b", m, tagged.clone()), "an egress-isolated pod sends through VLAN tags ({tags:x?})");
        c.endpoint("a", A_EP, 0);
        assert!(!delivered(&c, "b", m, tagged), "a pod with no policy sends tagged frames ({tags:x?})");
    }
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn real_forged_icmp_errors_carry_nothing_out() {
    let mut c = Cluster::new();
    c.endpoint("a", A_EP, FLAG_EGRESS_ISOLATED);
    c.allow("a", B_ID, Direction::Egress, proto::UDP, 53);
    // a's flow to b: tracked.
    send_frames(&c.node.pod("a").ns, vec![marked_udp(v4(A4), 40000, v4(B4), 53, marker(9))]);
    let m = marker(1);
    let quoted = Frame::udp(v4(B4), 53, v4(A4), 40000);
    let error = |dst: Ipv4Addr| {
        let mut frame = Frame::new(v4(A4), v4(dst), L4::IcmpError { kind: 3, inner: Box::new(quoted.clone()) }).build();
        frame.extend_from_slice(&m);
        fix_lengths(&mut frame);
        frame
    };
    assert!(delivered(&c, "b", m, error(B4)), "control: an error to the flow's peer is related");
    assert!(!delivered(&c, "c", m, error(C4)), "an error quoting a's flow, sent to c");
    c.unmanage("a");
    assert!(delivered(&c, "c", m, error(C4)), "control: without enforcement it reaches c");
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn real_neighbour_discovery_with_global_addresses_stays_home() {
    let mut c = Cluster::new();
    let m = marker(2);
    let mut frame = Frame::new(v6(A6), v6(C6), L4::Icmp { kind: 135, code: 0, id: 0 });
    frame.hop_limit = 255;
    let mut frame = frame.build();
    frame.extend_from_slice(&m);
    frame.extend_from_slice(&[0; 1000]);
    fix_lengths(&mut frame);
    // c takes no part: only a's egress is under test.
    c.unmanage("c");
    c.unmanage("a");
    assert!(delivered(&c, "c", m, frame.clone()), "control: the node forwards it to c");
    for flags in [0, FLAG_EGRESS_ISOLATED] {
        c.endpoint("a", A_EP, flags);
        assert!(!delivered(&c, "c", m, frame.clone()), "a neighbour solicitation to a remote peer (flags {flags})");
    }
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn real_spoofing_from_a_pod_without_policy() {
    let mut c = Cluster::new();
    // c accepts only b on UDP 9; a has no policy at all.
    c.endpoint("c", C_EP, FLAG_INGRESS_ISOLATED);
    c.allow("c", B_ID, Direction::Ingress, proto::UDP, 9);
    let m = marker(3);
    let spoofed = marked_udp(v4(B4), 40000, v4(C4), 9, m);
    c.unmanage("a");
    assert!(delivered(&c, "c", m, spoofed.clone()), "control: unenforced, a passes as b");
    c.endpoint("a", A_EP, 0);
    assert!(!delivered(&c, "c", m, spoofed), "a pod no policy selects sends as an allowed peer");
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn real_segments_from_outside_open_no_state() {
    let mut c = Cluster::new();
    c.endpoint("a", A_EP, FLAG_EGRESS_ISOLATED);
    // b, outside a's policy, sends a SYN-ACK and an ACK to a's port 40000.
    let from_b: Vec<Vec<u8>> = [SYN | ACK, ACK].iter().map(|&flags| Frame::tcp(v4(B4), 80, v4(A4), 40000, flags).build()).collect();
    send_frames(&c.node.pod("b").ns, from_b);
    let m = marker(4);
    let mut syn = Frame::tcp(v4(A4), 40000, v4(B4), 80, SYN).build();
    syn.extend_from_slice(&m);
    fix_lengths(&mut syn);
    assert!(!delivered(&c, "b", m, syn.clone()), "a's SYN passes as a reply to b's forged segments");
    c.allow("a", B_ID, Direction::Egress, proto::TCP, 80);
    assert!(delivered(&c, "b", m, syn), "control: allowed, the same SYN arrives");
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn real_connection_is_cut_when_its_policy_is_revoked() {
    let mut c = Cluster::new();
    c.endpoint("b", B_EP, FLAG_INGRESS_ISOLATED);
    c.allow("b", A_ID, Direction::Ingress, proto::TCP, 80);
    c.allow("b", A_ID, Direction::Ingress, proto::TCP, 81);
    let _echo = persistent_echo(&c.node.pod("b").ns, &[80, 81]);
    let streams: Vec<(u16, std::net::TcpStream)> = [80, 81].into_iter().map(|port| (port, connect(&c, port))).collect();
    for (port, stream) in &streams {
        assert!(echoes(stream), "control: port {port} echoes");
    }
    c.revoke("b", A_ID, Direction::Ingress, proto::TCP, 81);
    assert!(echoes(&streams[0].1), "still allowed under the new revision: kept");
    assert!(!echoes(&streams[1].1), "revoked: the open connection is cut");
}

fn connect(c: &Cluster, port: u16) -> std::net::TcpStream {
    let to = c.target("b", false, port);
    c.node.pod("a").ns.run(move || {
        let stream = std::net::TcpStream::connect_timeout(&to, PROBE_TIMEOUT).expect("connect");
        stream.set_read_timeout(Some(PROBE_TIMEOUT)).expect("timeout");
        stream
    })
}

fn echoes(mut stream: &std::net::TcpStream) -> bool {
    use std::io::{Read as _, Write as _};
    let mut buf = [0u8; 4];
    stream.write_all(b"ping").is_ok() && stream.read_exact(&mut buf).is_ok() && &buf == b"ping"
}

/// TCP echo servers that keep each connection open (at most 30 s).
fn persistent_echo(ns: &Netns, ports: &[u16]) -> Vec<std::thread::JoinHandle<()>> {
    ports
        .iter()
        .map(|&port| {
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let handle = ns.spawn(move || {
                use std::io::{Read as _, Write as _};
                let deadline = std::time::Instant::now() + Duration::from_secs(30);
                let listener = std::net::TcpListener::bind(("0.0.0.0", port)).expect("bind");
                listener.set_nonblocking(true).expect("nonblocking");
                let _ = ready_tx.send(());
                let mut stream = loop {
                    match listener.accept() {
                        Ok((stream, _)) => break stream,
                        Err(_) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                        Err(_) => return,
                    }
                };
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut buf = [0u8; 64];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 || stream.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
            ready_rx.recv_timeout(Duration::from_secs(5)).expect("echo ready");
            handle
        })
        .collect()
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn one_pod_cannot_take_another_pods_conntrack_room() {
    let mut f = Fixture::new();
    // Pod 7 opens flows as fast as it can; each endpoint may hold CT_BUDGET of them.
    f.endpoint_id(ENDPOINT, FLAG_INGRESS_ISOLATED);
    for port in 0..(CT_BUDGET as u16 * 3) {
        assert_eq!(f.run(Hook::FromPod, &Frame::udp(v4(POD), 10000 + port, v4(PEER), 53).build()), TC_ACT_OK, "its flows still pass");
    }
    assert_eq!(f.conntrack_of(ENDPOINT), CT_BUDGET as usize, "pod 7 holds its budget and no more");
    // Pod 8 (control: the table has room and tracks it) loses nothing to pod 7, and pod 7
    // lost nothing to pod 8.
    f.endpoint_id(8, FLAG_INGRESS_ISOLATED);
    for port in 0..CT_BUDGET as u16 {
        assert_eq!(f.run(Hook::FromPod, &Frame::udp(v4(POD), 20000 + port, v4(PEER), 53).build()), TC_ACT_OK);
    }
    assert_eq!(f.conntrack_of(8), CT_BUDGET as usize);
    assert_eq!(f.conntrack_of(ENDPOINT), CT_BUDGET as usize);
    // Pod 7 over budget: its replies are judged by policy (ingress isolated: dropped), its
    // tracked flows still work.
    f.endpoint_id(ENDPOINT, FLAG_INGRESS_ISOLATED);
    assert_eq!(f.run(Hook::ToPod, &Frame::udp(v4(PEER), 53, v4(POD), 10000).build()), TC_ACT_OK, "a tracked flow's reply");
    assert_eq!(f.run(Hook::ToPod, &Frame::udp(v4(PEER), 53, v4(POD), 10000 + CT_BUDGET as u16).build()), TC_ACT_SHOT, "an untracked one");
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn the_agent_sweep_returns_expired_flows_to_the_budget() {
    let mut f = Fixture::new();
    f.endpoint(FLAG_INGRESS_ISOLATED);
    for port in 0..CT_BUDGET as u16 {
        assert_eq!(f.run(Hook::FromPod, &Frame::udp(v4(POD), 30000 + port, v4(PEER), 53).build()), TC_ACT_OK);
    }
    assert_eq!(policy_agent::conntrack::held(&f.maps, ENDPOINT), CT_BUDGET as u64, "the budget is spent");
    // Age every entry as if its lifetime had run out.
    let keys: Vec<_> = f.maps.conntrack.keys().filter_map(Result::ok).collect();
    for key in &keys {
        let mut value = f.maps.conntrack.get(key, 0).expect("entry");
        value.expires_ns = 1;
        f.maps.conntrack.insert(key, value, 0).expect("age");
    }
    // The classifier removes an expired entry it meets (counted on its side)...
    assert_eq!(f.run(Hook::FromPod, &Frame::udp(v4(POD), 30000, v4(PEER), 53).build()), TC_ACT_OK);
    // ... and the agent's sweep the rest (credited on its side).
    let swept = policy_agent::conntrack::sweep_expired(&mut f.maps).expect("sweep");
    assert_eq!(swept, CT_BUDGET as u64 - 1);
    assert_eq!(f.conntrack_len(), 1, "only the flow just re-opened is left");
    assert_eq!(policy_agent::conntrack::held(&f.maps, ENDPOINT), 1);
    for port in 1..CT_BUDGET as u16 {
        assert_eq!(f.run(Hook::FromPod, &Frame::udp(v4(POD), 31000 + port, v4(PEER), 53).build()), TC_ACT_OK);
    }
    assert_eq!(f.conntrack_of(ENDPOINT), CT_BUDGET as usize, "the whole budget is usable again");
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn node_addresses_from_outside_are_world() {
    let mut f = Fixture::new();
    f.endpoint(FLAG_INGRESS_ISOLATED | FLAG_EGRESS_ISOLATED);
    // The compiler lets the node reach every pod; here, any protocol from HOST.
    f.allow(identity::HOST, Direction::Ingress, None, None);
    // Two flows: the first is tracked once it passes.
    let from_node = |sport| Frame::udp(v6(NODE6), sport, v6(POD6), 9999).build();
    assert_eq!(f.run_from(Hook::ToPod, &from_node(53), 0), TC_ACT_OK, "control: sent by the node itself");
    assert_eq!(f.run_from(Hook::ToPod, &from_node(54), 5), TC_ACT_SHOT, "the node's address, forged on another interface");
    let mut nd = Frame::new(v6(NODE6), v6(POD6), L4::Icmp { kind: 136, code: 0, id: 0 });
    nd.hop_limit = 255;
    assert_eq!(f.run_from(Hook::ToPod, &nd.build(), 0), TC_ACT_OK, "control: the node's neighbour advertisement");
    assert_eq!(f.run_from(Hook::ToPod, &nd.build(), 5), TC_ACT_SHOT, "a forged one");
    f.allow(PEER_ID, Direction::Egress, Some(proto::UDP), Some(53));
    let sent = Frame::udp(v6(POD6), 40000, v6(PEER6), 53);
    assert_eq!(f.run(Hook::FromPod, &sent.build()), TC_ACT_OK);
    let too_big = Frame::new(v6(NODE6), v6(POD6), L4::IcmpError { kind: 2, inner: Box::new(sent) }).build();
    assert_eq!(f.run_from(Hook::ToPod, &too_big, 0), TC_ACT_OK, "control: the node reports the path MTU");
    assert_eq!(f.run_from(Hook::ToPod, &too_big, 5), TC_ACT_SHOT, "a forged report");
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn source_routes_and_fragmented_control_messages_are_dropped() {
    let mut f = Fixture::new();
    f.endpoint(FLAG_EGRESS_ISOLATED);
    f.allow(identity::ANY, Direction::Egress, None, None);
    let mut routed = Frame::udp(v4(POD), 1, v4(PEER), 53);
    routed.ipv4_options = vec![0x94, 4, 0, 0];
    assert_eq!(f.run(Hook::FromPod, &routed.build()), TC_ACT_OK, "control: router alert");
    for option in [0x83u8, 0x89] {
        routed.ipv4_options = vec![1, option, 7, 4, 198, 18, 1, 30];
        assert_eq!(f.run(Hook::FromPod, &routed.build()), TC_ACT_SHOT, "IPv4 source route {option:x}");
    }
    let mut segment = Frame::udp(v6(POD6), 1, v6(PEER6), 53);
    segment.ipv6_ext = vec![43];
    assert_eq!(f.run(Hook::FromPod, &segment.build()), TC_ACT_OK, "control: no segments left");
    let mut frame = segment.build();
    frame[14 + 40 + 3] = 1;
    assert_eq!(f.run(Hook::FromPod, &frame), TC_ACT_SHOT, "a routing header with a segment left");
    let mut solicit = Frame::new(v6(LINK_LOCAL), v6(LINK_LOCAL), L4::Icmp { kind: 135, code: 0, id: 0 });
    solicit.hop_limit = 255;
    assert_eq!(f.run(Hook::FromPod, &solicit.build()), TC_ACT_OK, "control: whole");
    solicit.fragment = Some((5, true, 0));
    assert_eq!(f.run(Hook::FromPod, &solicit.build()), TC_ACT_SHOT, "neighbour discovery in fragments");
    let error = Frame::new(v4(POD), v4(PEER), L4::IcmpError { kind: 3, inner: Box::new(Frame::udp(v4(PEER), 53, v4(POD), 1)) });
    let mut fragmented = error.clone();
    fragmented.fragment = Some((6, true, 0));
    assert_eq!(f.run(Hook::FromPod, &fragmented.build()), TC_ACT_SHOT, "an ICMP error in fragments");
    assert_eq!(f.counted(ENDPOINT, Reason::DropFrame), 5);
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn peers_cannot_take_the_room_of_the_pods_own_flows() {
    let mut f = Fixture::new();
    f.endpoint(FLAG_EGRESS_ISOLATED);
    f.allow(PEER_ID, Direction::Egress, Some(proto::UDP), Some(53));
    // A peer opens flows to the pod as fast as it can (ingress is not isolated).
    for port in 0..(CT_BUDGET as u16 * 2) {
        assert_eq!(f.run(Hook::ToPod, &Frame::udp(v4(PEER), 20000 + port, v4(POD), 9).build()), TC_ACT_OK);
    }
    assert_eq!(f.conntrack_len(), CT_BUDGET as usize, "flows the peer opened: one budget");
    // The pod's own flows still get state, and their replies pass.
    for port in 0..CT_BUDGET as u16 {
        assert_eq!(f.run(Hook::FromPod, &Frame::udp(v4(POD), 40000 + port, v4(PEER), 53).build()), TC_ACT_OK);
    }
    assert_eq!(f.conntrack_len(), 2 * CT_BUDGET as usize, "the pod's own: a budget of their own");
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn a_half_open_connection_keeps_the_short_lifetime() {
    let mut f = Fixture::new();
    f.endpoint(FLAG_INGRESS_ISOLATED);
    f.allow(PEER_ID, Direction::Ingress, Some(proto::TCP), Some(443));
    assert_eq!(f.run(Hook::ToPod, &Frame::tcp(v4(PEER), 40000, v4(POD), 443, SYN).build()), TC_ACT_OK);
    assert_eq!(f.run(Hook::FromPod, &Frame::tcp(v4(POD), 443, v4(PEER), 40000, SYN | ACK).build()), TC_ACT_OK);
    let lifetime = || {
        let key = f.maps.conntrack.keys().next().expect("entry").expect("key");
        let expires = f.maps.conntrack.get(&key, 0).expect("value").expires_ns;
        Duration::from_nanos(expires.saturating_sub(policy_agent::conntrack::coarse_now_ns()))
    };
    assert!(lifetime() <= Duration::from_secs(60), "the pod's SYN-ACK alone: still opening ({:?})", lifetime());
    assert_eq!(f.run(Hook::ToPod, &Frame::tcp(v4(PEER), 40000, v4(POD), 443, ACK).build()), TC_ACT_OK);
    assert!(lifetime() > Duration::from_secs(3600), "the opener's ACK completes it ({:?})", lifetime());
}
