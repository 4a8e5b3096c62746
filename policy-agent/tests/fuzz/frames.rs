//! Structure-aware, seeded frame generator for the differential fuzzer, and the scenarios
//! (map contents) it runs under. Everything here is deterministic given the seed.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use policy_agent::compile::MapContents;
use policy_common::{
    Direction,
    endpoint::{EndpointInfo, FLAG_AUDIT, FLAG_EGRESS_ISOLATED, FLAG_HAS_IPV4, FLAG_HAS_IPV6, FLAG_INGRESS_ISOLATED},
    identity,
    ipcache::{IpcacheKey, IpcacheValue},
    policy::{PREFIX_ANY_PROTOCOL, PREFIX_FULL, PREFIX_PROTOCOL, PolicyKey, PolicyValue, PortRangePrefixes, lookup},
    proto,
};

/// SplitMix64: small, fast, reproducible.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    pub fn range(&mut self, lo: u64, hi_inclusive: u64) -> u64 {
        lo + self.below(hi_inclusive - lo + 1)
    }

    /// True with probability num/den.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    pub fn u8(&mut self) -> u8 {
        self.next_u64() as u8
    }

    pub fn u16(&mut self) -> u16 {
        self.next_u64() as u16
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.u8()).collect()
    }

    /// Index by weight.
    pub fn weighted(&mut self, weights: &[u64]) -> usize {
        let total: u64 = weights.iter().sum();
        let mut x = self.below(total);
        for (i, w) in weights.iter().enumerate() {
            if x < *w {
                return i;
            }
            x -= w;
        }
        weights.len() - 1
    }
}

// ---- Addresses (198.18.0.0/15, 2001:2::/48, link-local, multicast, unspecified) ----

pub const POD4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 10);
pub const ALLOWED4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 20);
pub const DENIED4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 30);
pub const OTHERPOD4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 40);
pub const NODE4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const RANGE4: Ipv4Addr = Ipv4Addr::new(198, 18, 64, 5);
pub const BLOCK4: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 77);
pub const EXCEPT4: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 3);
pub const WORLD4: Ipv4Addr = Ipv4Addr::new(198, 19, 77, 7);

pub const POD6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 0x10);
pub const ALLOWED6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 0x20);
pub const DENIED6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 0x30);
pub const OTHERPOD6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 0x40);
pub const NODE6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);
pub const RANGE6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0x8001, 0, 0, 0, 5);
pub const BLOCK6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 2, 0, 0, 0, 0x77);
pub const EXCEPT6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 2, 0, 0, 0, 3);
pub const WORLD6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0xffff, 0, 0, 0, 7);
pub const LL_POD6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0x10);
pub const LL_NODE6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
pub const LL_EDGE6: Ipv6Addr = Ipv6Addr::new(0xfebf, 0xffff, 0, 0, 0, 0, 0, 1);
pub const NOT_LL6: Ipv6Addr = Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 1);
pub const MC_ALL6: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
pub const MC_ROUTERS6: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2);
pub const MC_SOLICITED6: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00, 0x10);
pub const MC_SITE6: Ipv6Addr = Ipv6Addr::new(0xff05, 0, 0, 0, 0, 0, 0, 2);
pub const UNSPEC6: Ipv6Addr = Ipv6Addr::UNSPECIFIED;

pub const POD_ID: u32 = 300;
pub const ALLOWED_ID: u32 = 1000;
pub const DENIED_ID: u32 = 1001;
pub const RANGE_ID: u32 = 1002;
pub const BLOCK_ID: u32 = 1003;
pub const OTHERPOD_ID: u32 = 1004;

const PEERS4: [Ipv4Addr; 9] = [ALLOWED4, DENIED4, OTHERPOD4, NODE4, RANGE4, BLOCK4, EXCEPT4, WORLD4, POD4];
const PEERS6: [Ipv6Addr; 16] = [
    ALLOWED6, DENIED6, OTHERPOD6, NODE6, RANGE6, BLOCK6, EXCEPT6, WORLD6, POD6, LL_POD6, LL_NODE6, LL_EDGE6, NOT_LL6,
    MC_ALL6, MC_SOLICITED6, UNSPEC6,
];
const PORTS: [u16; 14] = [80, 443, 53, 5000, 8080, 1000, 1023, 1024, 2047, 2048, 0, 65535, 40000, 33434];
const PROTOS: [u8; 6] = [proto::TCP, proto::UDP, proto::SCTP, proto::ICMP, proto::ICMPV6, 47];

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

fn ip4(a: Ipv4Addr) -> IpAddr {
    IpAddr::V4(a)
}
fn ip6(a: Ipv6Addr) -> IpAddr {
    IpAddr::V6(a)
}

// ---- Frame building ----

#[derive(Clone, Debug)]
pub enum Ext {
    /// Hop-by-hop (0), routing (43), destination options (60): hdr_ext_len.
    Opts(u8, u8),
    /// AH (51): its length field.
    Ah(u8),
    /// Fragment (44): offset in 8-byte units, M flag, id.
    Frag(u16, bool, u32),
}

/// An IP packet under construction; `build` lays it out and applies the lies.
#[derive(Clone, Debug)]
pub struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub ttl: u8,
    /// IPv4: identification, fragment offset (8-byte units), MF.
    pub id: u16,
    pub frag_off: u16,
    pub mf: bool,
    pub v4_options: Vec<u8>,
    /// Overrides IHL (IPv4) when set.
    pub ihl: Option<u8>,
    pub version: Option<u8>,
    pub ext: Vec<Ext>,
    pub l4: Vec<u8>,
    /// Added to the IPv4 total length / IPv6 payload length field.
    pub len_lie: i32,
    /// Bytes after the IP packet (Ethernet padding).
    pub trailer: usize,
}

impl Packet {
    pub fn new(src: IpAddr, dst: IpAddr, proto: u8, l4: Vec<u8>) -> Self {
        Self {
            src,
            dst,
            proto,
            ttl: 64,
            id: 0,
            frag_off: 0,
            mf: false,
            v4_options: Vec::new(),
            ihl: None,
            version: None,
            ext: Vec::new(),
            l4,
            len_lie: 0,
            trailer: 0,
        }
    }

    pub fn v6(&self) -> bool {
        self.src.is_ipv6()
    }

    /// The IP packet without Ethernet.
    pub fn ip(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match (self.src, self.dst) {
            (IpAddr::V4(s), d) => {
                let d = match d {
                    IpAddr::V4(d) => d,
                    IpAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
                };
                let mut opts = self.v4_options.clone();
                while !opts.len().is_multiple_of(4) {
                    opts.push(0);
                }
                opts.truncate(40);
                let ihl = self.ihl.unwrap_or((5 + opts.len() / 4) as u8);
                let total = 20 + opts.len() + self.l4.len();
                let total = (total as i64 + self.len_lie as i64).clamp(0, 0xffff) as u16;
                out.push((self.version.unwrap_or(4) << 4) | (ihl & 15));
                out.push(0);
                out.extend(total.to_be_bytes());
                out.extend(self.id.to_be_bytes());
                let frag = (self.frag_off & 0x1fff) | if self.mf { 0x2000 } else { 0 };
                out.extend(frag.to_be_bytes());
                out.push(self.ttl);
                out.push(self.proto);
                out.extend([0, 0]);
                out.extend(s.octets());
                out.extend(d.octets());
                out.extend(opts);
                out.extend(&self.l4);
            }
            (IpAddr::V6(s), d) => {
                let d = match d {
                    IpAddr::V6(d) => d,
                    IpAddr::V4(_) => Ipv6Addr::UNSPECIFIED,
                };
                let mut chain = Vec::new();
                let types: Vec<u8> = self
                    .ext
                    .iter()
                    .map(|e| match e {
                        Ext::Opts(t, _) => *t,
                        Ext::Ah(_) => 51,
                        Ext::Frag(..) => 44,
                    })
                    .collect();
                for (i, e) in self.ext.iter().enumerate() {
                    let next = types.get(i + 1).copied().unwrap_or(self.proto);
                    match e {
                        Ext::Opts(_, len) => {
                            let n = (*len as usize + 1) * 8;
                            let mut h = vec![0u8; n];
                            h[0] = next;
                            h[1] = *len;
                            // PadN option over the rest.
                            h[2] = 1;
                            h[3] = (n - 4) as u8;
                            chain.extend(h);
                        }
                        Ext::Ah(len) => {
                            let n = (*len as usize + 2) * 4;
                            let mut h = vec![0u8; n.max(2)];
                            h[0] = next;
                            h[1] = *len;
                            chain.extend(h);
                        }
                        Ext::Frag(off, m, id) => {
                            chain.push(next);
                            chain.push(0);
                            chain.extend((((off & 0x1fff) << 3) | u16::from(*m)).to_be_bytes());
                            chain.extend(id.to_be_bytes());
                        }
                    }
                }
                let first = types.first().copied().unwrap_or(self.proto);
                let plen = chain.len() + self.l4.len();
                let plen = (plen as i64 + self.len_lie as i64).clamp(0, 0xffff) as u16;
                out.push(self.version.unwrap_or(6) << 4);
                out.extend([0, 0, 0]);
                out.extend(plen.to_be_bytes());
                out.push(first);
                out.push(self.ttl);
                out.extend(s.octets());
                out.extend(d.octets());
                out.extend(chain);
                out.extend(&self.l4);
            }
        }
        out.extend(std::iter::repeat_n(0u8, self.trailer));
        out
    }

    pub fn frame(&self) -> Vec<u8> {
        eth(if self.v6() { 0x86dd } else { 0x0800 }, &self.ip())
    }
}

pub fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
    f.extend(ethertype.to_be_bytes());
    f.extend(payload);
    f
}

pub fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut h = vec![0u8; 20];
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[4..8].copy_from_slice(&0x1000_0000u32.to_be_bytes());
    h[12] = 5 << 4;
    h[13] = flags;
    h[14..16].copy_from_slice(&64240u16.to_be_bytes());
    h
}

pub fn udp(sport: u16, dport: u16, data: usize) -> Vec<u8> {
    let mut h = vec![0u8; 8 + data];
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[4..6].copy_from_slice(&((8 + data) as u16).to_be_bytes());
    h
}

pub fn sctp(sport: u16, dport: u16, vtag: u32, chunk: u8) -> Vec<u8> {
    let mut h = vec![0u8; 32];
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[4..8].copy_from_slice(&vtag.to_be_bytes());
    h[12] = chunk;
    h[14..16].copy_from_slice(&20u16.to_be_bytes());
    h
}

pub fn icmp(kind: u8, code: u8, id: u16, body: &[u8]) -> Vec<u8> {
    let mut h = vec![kind, code, 0, 0];
    h.extend(id.to_be_bytes());
    h.extend(1u16.to_be_bytes());
    h.extend(body);
    h
}

fn icmp_proto(v6: bool) -> u8 {
    if v6 { proto::ICMPV6 } else { proto::ICMP }
}

/// A flow the generator opened (as first sent), so it can send its replies and quotes.
#[derive(Clone, Copy, Debug)]
pub struct Flow {
    pub dir: Direction,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
}

/// The generator: produces (frame, direction) pairs and queued follow-ups.
pub struct Gen {
    pub rng: Rng,
    pub flows: Vec<Flow>,
    pending: VecDeque<(Vec<u8>, Direction, &'static str)>,
    next_frag_id: u32,
    /// Generate ICMPv6's number in IPv4 and ICMP's in IPv6 (off: `FUZZ_NO_CROSS_ICMP=1`).
    pub cross_icmp: bool,
    /// What the current allow entries admit (direction, identity, protocol, a port), so
    /// that new flows often hit them.
    hints: Vec<(Direction, u32, u8, u16)>,
    /// An endpoint entry taken away by [`Gen::change`], put back by a later change.
    removed: Option<EndpointInfo>,
}

fn other(dir: Direction) -> Direction {
    match dir {
        Direction::Ingress => Direction::Egress,
        Direction::Egress => Direction::Ingress,
    }
}

impl Gen {
    pub fn new(seed: u64) -> Self {
        Self { rng: Rng::new(seed), flows: Vec::new(), pending: VecDeque::new(), next_frag_id: 1, cross_icmp: std::env::var_os("FUZZ_NO_CROSS_ICMP").is_none(), hints: Vec::new(), removed: None }
    }

    /// Forget flows and queued frames (a new epoch).
    pub fn reset(&mut self) {
        self.flows.clear();
        self.pending.clear();
        self.removed = None;
    }

    fn dir(&mut self) -> Direction {
        if self.rng.chance(1, 2) { Direction::Ingress } else { Direction::Egress }
    }

    fn peer(&mut self, v6: bool) -> IpAddr {
        if v6 { ip6(self.rng.pick(&PEERS6)) } else { ip4(self.rng.pick(&PEERS4)) }
    }

    fn pod(&mut self, v6: bool) -> IpAddr {
        if v6 {
            if self.rng.chance(1, 12) { ip6(LL_POD6) } else { ip6(POD6) }
        } else {
            ip4(POD4)
        }
    }

    /// Source and destination for a packet in `dir`: mostly the pod on its side.
    fn addrs(&mut self, v6: bool, dir: Direction) -> (IpAddr, IpAddr) {
        let pod = if self.rng.chance(9, 10) { self.pod(v6) } else { self.peer(v6) };
        let peer = self.peer(v6);
        match dir {
            Direction::Egress => (pod, peer),
            Direction::Ingress => (peer, pod),
        }
    }

    fn port(&mut self) -> u16 {
        if self.rng.chance(3, 4) { self.rng.pick(&PORTS) } else { self.rng.u16() }
    }

    fn tcp_flags(&mut self) -> u8 {
        match self.rng.below(6) {
            0 => TCP_SYN,
            1 => TCP_SYN | TCP_ACK,
            2 => TCP_ACK,
            3 => TCP_ACK | TCP_PSH,
            4 => self.rng.pick(&[TCP_FIN | TCP_ACK, TCP_RST, TCP_RST | TCP_ACK, TCP_SYN | TCP_FIN, TCP_SYN | TCP_RST, 0, 0xc2]),
            _ => self.rng.u8(),
        }
    }

    /// The transport header for `proto`; `opening` biases towards opening packets.
    fn l4(&mut self, v6: bool, proto: u8, sport: u16, dport: u16, opening: bool) -> Vec<u8> {
        match proto {
            proto::TCP => {
                let flags = if opening && self.rng.chance(3, 4) { TCP_SYN } else { self.tcp_flags() };
                tcp(sport, dport, flags)
            }
            proto::UDP => udp(sport, dport, self.rng.below(24) as usize),
            proto::SCTP => {
                let init = opening && self.rng.chance(3, 4);
                let vtag = if init || self.rng.chance(1, 4) { 0 } else { self.rng.next_u64() as u32 | 1 };
                let chunk = if init { 1 } else { self.rng.pick(&[0, 1, 2, 3, 10, 11]) };
                sctp(sport, dport, vtag, chunk)
            }
            p if p == icmp_proto(v6) => {
                let kind = if v6 {
                    if opening { 128 } else { self.rng.pick(&[128, 129, 129, 200, 144]) }
                } else if opening {
                    8
                } else {
                    self.rng.pick(&[8, 0, 0, 13, 14, 9])
                };
                icmp(kind, 0, sport, &{ let n = self.rng.below(16) as usize; self.rng.bytes(n) })
            }
            _ => { let n = self.rng.below(24) as usize; self.rng.bytes(n) },
        }
    }

    /// A well-formed packet of a new flow in `dir`; the flow is remembered.
    fn opening(&mut self, dir: Direction) -> Packet {
        let v6 = self.rng.chance(1, 2);
        let (mut src, mut dst) = self.addrs(v6, dir);
        let hint = if !self.hints.is_empty() && self.rng.chance(1, 2) {
            let h = self.hints[self.rng.below(self.hints.len() as u64) as usize];
            if h.0 == dir { Some(h) } else { None }
        } else {
            None
        };
        if let Some((_, id, _, _)) = hint {
            let peer = match id {
                ALLOWED_ID => if v6 { ip6(ALLOWED6) } else { ip4(ALLOWED4) },
                RANGE_ID => if v6 { ip6(RANGE6) } else { ip4(RANGE4) },
                BLOCK_ID => if v6 { ip6(BLOCK6) } else { ip4(BLOCK4) },
                OTHERPOD_ID => if v6 { ip6(OTHERPOD6) } else { ip4(OTHERPOD4) },
                POD_ID => if v6 { ip6(POD6) } else { ip4(POD4) },
                identity::HOST => if v6 { ip6(NODE6) } else { ip4(NODE4) },
                identity::WORLD => if v6 { ip6(WORLD6) } else { ip4(WORLD4) },
                _ => self.peer(v6),
            };
            match dir {
                Direction::Egress => dst = peer,
                Direction::Ingress => src = peer,
            }
        }
        let proto = match self.rng.below(10) {
            _ if hint.is_some_and(|h| h.2 != 0 && (h.2 != icmp_proto(!v6) || self.cross_icmp)) => hint.map_or(0, |h| h.2),
            0..=3 => proto::TCP,
            4..=5 => proto::UDP,
            6 => proto::SCTP,
            7..=8 => icmp_proto(v6),
            _ if self.cross_icmp => self.rng.pick(&[47, 50, 59, 253, icmp_proto(!v6)]),
            _ => self.rng.pick(&[47, 50, 59, 253]),
        };
        let (sport, mut dport) = if proto == icmp_proto(v6) { (self.rng.u16() % 64, 0) } else { (self.port(), self.port()) };
        if let Some((_, _, _, port)) = hint
            && port != 0
            && proto != icmp_proto(v6)
        {
            dport = port;
        }
        let l4 = self.l4(v6, proto, sport, dport, true);
        if self.flows.len() < 64 {
            let (sport, dport) = if proto == icmp_proto(v6) { (u16::from_be_bytes([l4[4], l4[5]]), 0) } else { (sport, dport) };
            self.flows.push(Flow { dir, src, dst, proto, sport, dport });
        }
        Packet::new(src, dst, proto, l4)
    }

    /// A later packet of a remembered flow: same direction or reply.
    fn continuation(&mut self) -> Option<(Packet, Direction)> {
        if self.flows.is_empty() {
            return None;
        }
        let flow = self.flows[self.rng.below(self.flows.len() as u64) as usize];
        let v6 = flow.src.is_ipv6();
        let reply = self.rng.chance(1, 2);
        let (dir, src, dst, sport, dport) =
            if reply { (other(flow.dir), flow.dst, flow.src, flow.dport, flow.sport) } else { (flow.dir, flow.src, flow.dst, flow.sport, flow.dport) };
        let l4 = match flow.proto {
            proto::TCP => {
                let flags = if reply && self.rng.chance(1, 2) { TCP_SYN | TCP_ACK } else { self.tcp_flags() };
                tcp(sport, dport, flags)
            }
            p if p == icmp_proto(v6) => {
                let id = if reply { dport } else { sport };
                let kind = match (v6, reply) {
                    (false, true) => 0,
                    (false, false) => 8,
                    (true, true) => 129,
                    (true, false) => 128,
                };
                icmp(kind, 0, id, &[])
            }
            p => self.l4(v6, p, sport, dport, false),
        };
        Some((Packet::new(src, dst, flow.proto, l4), dir))
    }

    /// Opening frames of new flows (remembered, so later frames continue them).
    pub fn openings(&mut self, n: usize) -> Vec<(Vec<u8>, Direction)> {
        (0..n)
            .map(|_| {
                let dir = self.dir();
                (self.opening(dir).frame(), dir)
            })
            .collect()
    }

    /// Either a new flow or a continuation.
    fn flow_packet(&mut self) -> (Packet, Direction) {
        if self.rng.chance(1, 2)
            && let Some(p) = self.continuation()
        {
            return p;
        }
        let dir = self.dir();
        (self.opening(dir), dir)
    }

    /// An ICMP or ICMPv6 error quoting a flow (tracked or not), in either direction.
    fn icmp_error(&mut self) -> (Packet, Direction) {
        let (quoted, qdir) = if !self.flows.is_empty() && self.rng.chance(3, 4) {
            let f = self.flows[self.rng.below(self.flows.len() as u64) as usize];
            let l4 = self.l4(f.src.is_ipv6(), f.proto, f.sport, f.dport, true);
            // Quote the packet as sent, or as its reply.
            if self.rng.chance(1, 2) {
                (Packet::new(f.src, f.dst, f.proto, l4), f.dir)
            } else {
                let l4 = match f.proto {
                    proto::TCP => tcp(f.dport, f.sport, TCP_SYN | TCP_ACK),
                    proto::UDP => udp(f.dport, f.sport, 0),
                    proto::SCTP => sctp(f.dport, f.sport, 5, 2),
                    p if p == icmp_proto(f.src.is_ipv6()) => icmp(if f.src.is_ipv6() { 129 } else { 0 }, 0, f.sport, &[]),
                    _ => l4,
                };
                (Packet::new(f.dst, f.src, f.proto, l4), other(f.dir))
            }
        } else {
            let dir = self.dir();
            (self.opening(dir), dir)
        };
        let v6 = quoted.v6();
        // The error travels against the quoted packet: from its destination to its source.
        let dir = if self.rng.chance(7, 8) { other(qdir) } else { qdir };
        let (mut src, mut dst) = (quoted.dst, quoted.src);
        match self.rng.below(8) {
            0 => src = self.peer(v6),
            1 => dst = self.peer(v6),
            2 => src = if v6 { ip6(NODE6) } else { ip4(NODE4) },
            _ => {}
        }
        let kind = if v6 { self.rng.pick(&[1, 2, 3, 4]) } else { self.rng.pick(&[3, 4, 11, 12]) };
        let mut q = quoted.ip();
        match self.rng.below(10) {
            0 => q.truncate(self.rng.below(q.len() as u64) as usize),
            1 => {
                // Oversize, around the bound.
                let target = if v6 { 1280 - 40 - 8 } else { 576 - 20 - 8 };
                let n = (target as i64 - q.len() as i64 + self.rng.range(0, 16) as i64 - 8).max(0) as usize;
                q.extend(std::iter::repeat_n(0u8, n));
            }
            2 => q.extend(std::iter::repeat_n(0u8, self.rng.below(1400) as usize)),
            3 if !v6 => q[0] = (q[0] & 0xf0) | self.rng.below(16) as u8,
            _ => {}
        }
        let l4 = icmp(kind, self.rng.u8() % 4, 0, &q);
        let mut p = Packet::new(src, dst, icmp_proto(v6), l4);
        p.l4[4..8].copy_from_slice(&[0, 0, 0, 0]);
        (p, dir)
    }

    /// Neighbour discovery, router solicitation/advertisement, MLD, redirects.
    fn link_control(&mut self) -> (Packet, Direction) {
        let dir = self.dir();
        let kind = self.rng.pick(&[130, 131, 132, 133, 134, 135, 136, 143, 137]);
        let src = ip6(self.rng.pick(&[LL_POD6, LL_NODE6, LL_POD6, UNSPEC6, POD6, NODE6, ALLOWED6, LL_EDGE6, NOT_LL6, MC_ALL6]));
        let dst = ip6(self.rng.pick(&[
            MC_ALL6,
            MC_ROUTERS6,
            MC_SOLICITED6,
            LL_NODE6,
            LL_POD6,
            NODE6,
            POD6,
            ALLOWED6,
            MC_SITE6,
            NOT_LL6,
            UNSPEC6,
        ]));
        let (src, dst) = if dir == Direction::Ingress && self.rng.chance(1, 2) { (dst, src) } else { (src, dst) };
        let body = match self.rng.below(8) {
            0 => { let n = self.rng.below(1400) as usize; self.rng.bytes(n) },
            1 => vec![0; 1280 - 40 - 8 + self.rng.below(3) as usize - 1],
            _ => { let n = 16 + self.rng.below(16) as usize; self.rng.bytes(n) },
        };
        let mut p = Packet::new(src, dst, proto::ICMPV6, icmp(kind, 0, 0, &body));
        p.ttl = match self.rng.below(6) {
            0 => 1,
            1 => self.rng.u8(),
            2 => 254,
            _ => {
                if matches!(kind, 130 | 131 | 132 | 143) {
                    1
                } else {
                    255
                }
            }
        };
        if self.rng.chance(1, 4) {
            p.ext.push(Ext::Opts(0, 0));
        }
        if self.rng.chance(1, 8) {
            // As a first fragment, with a later one queued: link control records no fragment.
            self.next_frag_id = self.next_frag_id.wrapping_add(1) & 0xffff;
            let id = self.next_frag_id;
            p.ext.push(Ext::Frag(0, true, id));
            let mut later = Packet::new(p.src, p.dst, proto::ICMPV6, vec![0; 16]);
            later.ttl = p.ttl;
            later.ext.push(Ext::Frag(3, false, id));
            self.pending.push_back((later.frame(), dir, "later fragment"));
        }
        (p, dir)
    }

    fn redirect(&mut self) -> (Packet, Direction) {
        let dir = self.dir();
        let v6 = self.rng.chance(1, 2);
        let (src, dst) = self.addrs(v6, dir);
        let body = { let n = self.rng.below(64) as usize; self.rng.bytes(n) };
        let kind = if v6 { 137 } else { 5 };
        let mut p = Packet::new(src, dst, icmp_proto(v6), icmp(kind, 0, 0, &body));
        if v6 {
            p.ttl = 255;
        }
        (p, dir)
    }

    fn arp(&mut self) -> (Vec<u8>, Direction) {
        let dir = self.dir();
        let sender = self.rng.pick(&[POD4, POD4, Ipv4Addr::UNSPECIFIED, ALLOWED4, NODE4, OTHERPOD4]);
        let mut a = vec![0, 1, 8, 0, 6, 4, 0, self.rng.pick(&[1, 2])];
        a.extend([0x02, 0, 0, 0, 0, 0x02]);
        a.extend(sender.octets());
        a.extend([0; 6]);
        a.extend(self.rng.pick(&[NODE4, POD4, ALLOWED4]).octets());
        match self.rng.below(8) {
            0 => {
                let i = self.rng.below(6) as usize;
                a[i] ^= 1 << self.rng.below(8);
            }
            1 => a.truncate(self.rng.below(28) as usize),
            2 => a.extend(std::iter::repeat_n(0, 18)),
            _ => {}
        }
        (eth(0x0806, &a), dir)
    }

    /// A packet with IPv4 header oddities (options, IHL, version, length lies).
    fn ipv4_odd(&mut self) -> (Packet, Direction) {
        let (mut p, dir) = self.flow_packet_family(false);
        match self.rng.below(6) {
            0 | 1 => {
                let n = self.rng.range(1, 40) as usize;
                p.v4_options = if self.rng.chance(1, 2) { vec![1; n] } else { self.rng.bytes(n) };
            }
            2 => p.ihl = Some(self.rng.below(16) as u8),
            3 => p.version = Some(self.rng.pick(&[0, 5, 6, 15])),
            _ => {}
        }
        self.length_lie(&mut p);
        (p, dir)
    }

    fn length_lie(&mut self, p: &mut Packet) {
        match self.rng.below(5) {
            0 => p.len_lie = self.rng.range(1, 16) as i32,
            1 => p.len_lie = -(self.rng.range(1, 30) as i32),
            2 => p.len_lie = self.rng.pick(&[-20000, 30000, -1, 1]),
            3 => p.trailer = self.rng.range(1, 40) as usize,
            _ => {}
        }
    }

    fn flow_packet_family(&mut self, v6: bool) -> (Packet, Direction) {
        for _ in 0..8 {
            let (p, d) = self.flow_packet();
            if p.v6() == v6 {
                return (p, d);
            }
        }
        let dir = self.dir();
        let (src, dst) = self.addrs(v6, dir);
        let sport = self.port();
        let dport = self.port();
        (Packet::new(src, dst, proto::TCP, tcp(sport, dport, TCP_SYN)), dir)
    }

    /// IPv6 extension-header chains: 0..8 headers, duplicate fragment headers, lies.
    fn ipv6_ext(&mut self) -> (Packet, Direction) {
        let (mut p, dir) = self.flow_packet_family(true);
        let n = self.rng.weighted(&[2, 3, 3, 2, 2, 2, 4, 4, 2]);
        for _ in 0..n {
            let e = match self.rng.below(10) {
                0..=2 => Ext::Opts(0, self.rng.below(3) as u8),
                3..=4 => Ext::Opts(60, self.rng.below(3) as u8),
                5..=6 => Ext::Opts(43, self.rng.below(2) as u8),
                7 => Ext::Ah(self.rng.range(1, 6) as u8),
                _ => Ext::Frag(if self.rng.chance(1, 3) { self.rng.range(1, 200) as u16 } else { 0 }, self.rng.chance(1, 2), self.rng.below(4) as u32),
            };
            p.ext.push(e);
        }
        if !p.ext.is_empty() && self.rng.chance(1, 10) {
            // A long header, around the kernel's 1024-byte bound on the chain (finding F3).
            let i = self.rng.below(p.ext.len() as u64) as usize;
            p.ext[i] = match self.rng.below(3) {
                0 => Ext::Ah(self.rng.range(230, 250) as u8),
                1 => Ext::Opts(60, self.rng.range(110, 125) as u8),
                _ => Ext::Opts(0, self.rng.range(110, 125) as u8),
            };
        }
        if self.rng.chance(1, 3) {
            self.length_lie(&mut p);
        }
        (p, dir)
    }

    /// A first fragment (queueing its later fragments), or a stray later fragment.
    fn fragment(&mut self) -> (Packet, Direction) {
        let (mut p, dir) = self.flow_packet();
        let v6 = p.v6();
        let id = if self.rng.chance(1, 8) { self.rng.below(3) as u32 } else {
            self.next_frag_id = self.next_frag_id.wrapping_add(1) & 0xffff;
            self.next_frag_id
        };
        if self.rng.chance(1, 4) {
            // A later fragment only.
            let off = self.rng.range(1, 180) as u16;
            let data = { let n = 8 + self.rng.below(24) as usize; self.rng.bytes(n) };
            let mut l = Packet::new(p.src, p.dst, p.proto, data);
            Self::set_frag(&mut l, v6, off, self.rng.chance(1, 2), id);
            return (l, dir);
        }
        let mf = self.rng.chance(7, 8);
        Self::set_frag(&mut p, v6, 0, mf, id);
        // Its later fragments, sometimes with a field changed.
        for k in 0..self.rng.below(3) {
            let data = { let n = 8 + self.rng.below(24) as usize; self.rng.bytes(n) };
            let mut l = Packet::new(p.src, p.dst, p.proto, data);
            let mut lid = id;
            let mut ldir = dir;
            match self.rng.below(8) {
                0 => l.src = self.peer(v6),
                1 => l.dst = self.peer(v6),
                2 => l.proto = self.rng.pick(&PROTOS),
                3 => lid ^= 1,
                4 => ldir = other(dir),
                _ => {}
            }
            Self::set_frag(&mut l, v6, 3 + k as u16 * 4, self.rng.chance(1, 2), lid);
            if v6 && self.rng.chance(1, 6) {
                l.ext.insert(0, Ext::Opts(0, 0));
            }
            let frame = l.frame();
            self.pending.push_back((frame, ldir, "later fragment"));
        }
        (p, dir)
    }

    fn set_frag(p: &mut Packet, v6: bool, off: u16, mf: bool, id: u32) {
        if v6 {
            p.ext.push(Ext::Frag(off, mf, id));
        } else {
            p.id = id as u16;
            p.frag_off = off;
            p.mf = mf;
        }
    }

    /// One frame, its direction and a short class name.
    pub fn frame(&mut self) -> (Vec<u8>, Direction, &'static str) {
        if let Some(p) = self.pending.pop_front()
            && self.rng.chance(3, 4)
        {
            return p;
        }
        let class = self.rng.weighted(&[26, 22, 9, 7, 4, 4, 2, 6, 8, 8, 2, 5, 6, 1]);
        match class {
            0 => {
                let dir = self.dir();
                let p = self.opening(dir);
                (p.frame(), dir, "opening")
            }
            1 => {
                let (p, d) = self.flow_packet();
                (p.frame(), d, "flow")
            }
            2 => {
                let (p, d) = self.icmp_error();
                (p.frame(), d, "icmp error")
            }
            3 => {
                let (p, d) = self.link_control();
                (p.frame(), d, "link control")
            }
            4 => {
                let (f, d) = self.arp();
                (f, d, "arp")
            }
            5 => {
                let (p, d) = self.flow_packet();
                let ip = p.ip();
                let inner = if self.rng.chance(1, 2) { p.frame() } else { self.arp().0 };
                let mut f = inner[..12].to_vec();
                let tags = self.rng.range(1, 2);
                for _ in 0..tags {
                    f.extend(self.rng.pick(&[0x8100u16, 0x88a8, 0x9100]).to_be_bytes());
                    f.extend((self.rng.below(3) as u16).to_be_bytes());
                }
                f.extend(&inner[12..]);
                let _ = ip;
                (f, d, "vlan")
            }
            6 => {
                let dir = self.dir();
                let et = self.rng.pick(&[0x88cc, 0x8847, 0x8863, 0x0805, 0x05dc, 0x0000, 0xffff, 0x86dc, 0x0801, 0x8035]);
                let (p, _) = self.flow_packet();
                (eth(et, &p.ip()), dir, "ethertype")
            }
            7 => {
                let (p, d) = self.ipv4_odd();
                (p.frame(), d, "ipv4 odd")
            }
            8 => {
                let (p, d) = self.ipv6_ext();
                (p.frame(), d, "ipv6 ext")
            }
            9 => {
                let (p, d) = self.fragment();
                (p.frame(), d, "fragment")
            }
            10 => {
                let (p, d) = self.redirect();
                (p.frame(), d, "redirect")
            }
            11 => {
                let (f, d, _) = self.valid_any();
                let n = self.rng.range(14, f.len().max(14) as u64) as usize;
                (f[..n.min(f.len())].to_vec(), d, "truncated")
            }
            12 => {
                let (mut f, d, _) = self.valid_any();
                for _ in 0..self.rng.range(1, 4) {
                    let hi = f.len().min(if self.rng.chance(3, 4) { 80 } else { f.len() });
                    let i = self.rng.range(12, hi.max(13) as u64 - 1) as usize;
                    if i < f.len() {
                        if self.rng.chance(1, 2) {
                            f[i] ^= 1 << self.rng.below(8);
                        } else {
                            f[i] = self.rng.u8();
                        }
                    }
                }
                (f, d, "flipped")
            }
            _ => {
                let dir = self.dir();
                let n = self.rng.range(14, 120) as usize;
                let mut f = self.rng.bytes(n);
                f[12..14].copy_from_slice(&self.rng.pick(&[0x0800u16, 0x86dd, 0x0806]).to_be_bytes());
                (f, dir, "random")
            }
        }
    }

    /// A (mostly) well-formed frame of any structured class, as a base for truncation and flips.
    fn valid_any(&mut self) -> (Vec<u8>, Direction, &'static str) {
        match self.rng.below(7) {
            0 => {
                let (p, d) = self.icmp_error();
                (p.frame(), d, "")
            }
            1 => {
                let (p, d) = self.link_control();
                (p.frame(), d, "")
            }
            2 => {
                let (f, d) = self.arp();
                (f, d, "")
            }
            3 => {
                let (p, d) = self.ipv6_ext();
                (p.frame(), d, "")
            }
            4 => {
                let (p, d) = self.fragment();
                (p.frame(), d, "")
            }
            _ => {
                let (p, d) = self.flow_packet();
                (p.frame(), d, "")
            }
        }
    }

    // ---- Scenarios ----

    /// Random map contents for the endpoint on ifindex `ifindex`.
    pub fn scenario(&mut self, ifindex: u32) -> MapContents {
        let mut m = MapContents::default();
        let mut ipc = |addr: IpAddr, bits: u8, id: u32| {
            let key = match addr {
                IpAddr::V4(a) => IpcacheKey::v4(a.octets()),
                IpAddr::V6(a) => IpcacheKey::v6(a.octets()),
            };
            m.ipcache.insert((IpcacheKey::lpm_prefix_len(bits), key), IpcacheValue { identity: id });
        };
        let r = &mut self.rng;
        ipc(ip4(POD4), 32, POD_ID);
        ipc(ip6(POD6), 128, POD_ID);
        ipc(ip4(ALLOWED4), 32, ALLOWED_ID);
        ipc(ip6(ALLOWED6), 128, ALLOWED_ID);
        ipc(ip4(DENIED4), 32, DENIED_ID);
        ipc(ip6(DENIED6), 128, DENIED_ID);
        ipc(ip4(OTHERPOD4), 32, OTHERPOD_ID);
        ipc(ip6(OTHERPOD6), 128, OTHERPOD_ID);
        if r.chance(7, 8) {
            ipc(ip4(NODE4), 32, identity::HOST);
            ipc(ip6(NODE6), 128, identity::HOST);
        }
        if r.chance(1, 3) {
            ipc(ip6(LL_NODE6), 128, identity::HOST);
        }
        if r.chance(1, 4) {
            // A prefix that makes far-away addresses HOST (for link-control checks).
            ipc(ip6(Ipv6Addr::new(0x2001, 2, 0, 0xffff, 0, 0, 0, 0)), 64, identity::HOST);
        }
        ipc(ip4(Ipv4Addr::new(198, 18, 64, 0)), 18, RANGE_ID);
        ipc(ip6(Ipv6Addr::new(0x2001, 2, 0, 0x8000, 0, 0, 0, 0)), 49, RANGE_ID);
        ipc(ip4(Ipv4Addr::new(198, 18, 2, 0)), 24, BLOCK_ID);
        ipc(ip6(Ipv6Addr::new(0x2001, 2, 0, 2, 0, 0, 0, 0)), 64, BLOCK_ID);
        if r.chance(3, 4) {
            ipc(ip4(Ipv4Addr::new(198, 18, 2, 0)), 28, identity::WORLD);
            ipc(ip6(Ipv6Addr::new(0x2001, 2, 0, 2, 0, 0, 0, 0)), 124, identity::WORLD);
        }
        if r.chance(1, 20) {
            return m;
        }
        let mut flags = 0;
        for (flag, num) in [(FLAG_INGRESS_ISOLATED, 2), (FLAG_EGRESS_ISOLATED, 2), (FLAG_AUDIT, 1)] {
            if r.chance(num, if flag == FLAG_AUDIT { 5 } else { 3 }) {
                flags |= flag;
            }
        }
        if r.chance(9, 10) {
            flags |= FLAG_HAS_IPV4;
        }
        if r.chance(9, 10) {
            flags |= FLAG_HAS_IPV6;
        }
        let info = EndpointInfo {
            id: r.pick(&[7, 12, 4095]),
            flags,
            ipv4: if flags & FLAG_HAS_IPV4 != 0 || r.chance(1, 2) { POD4.octets() } else { [0; 4] },
            ipv6: if flags & FLAG_HAS_IPV6 != 0 || r.chance(1, 2) { POD6.octets() } else { [0; 16] },
            lookups: [0; 2],
            _pad: [0; 2],
            revision: r.below(4) as u32,
        };
        m.endpoints.insert(ifindex, info);
        self.new_policy(&mut m, ifindex);
        m
    }

    /// Replaces the endpoint's entries with a random set; recomputes the lookup mask
    /// (rarely a random one).
    pub fn new_policy(&mut self, m: &mut MapContents, ifindex: u32) {
        m.policy.clear();
        self.hints.clear();
        let Some(mut info) = m.endpoints.get(&ifindex).copied() else { return };
        let n = self.rng.weighted(&[1, 2, 3, 3, 2, 2, 1, 1, 1]);
        for i in 0..n {
            self.add_entry(m, info.id, 16 + i as u32);
        }
        info.lookups = mask(m, info.id);
        if self.rng.chance(1, 12) {
            info.lookups = [self.rng.u8(), self.rng.u8()];
        }
        m.endpoints.insert(ifindex, info);
    }

    fn add_entry(&mut self, m: &mut MapContents, endpoint: u32, cookie: u32) {
        let r = &mut self.rng;
        // Mostly allows; deny entries (a ClusterNetworkPolicy Deny) and, rarely, an action
        // the classifier does not know, which must deny too.
        let value = match r.below(12) {
            0..=7 => PolicyValue::allow(cookie),
            8..=10 => PolicyValue::deny(cookie),
            _ => PolicyValue { cookie, action: r.pick(&[2, 7, u32::MAX]) },
        };
        let peer = r.pick(&[ALLOWED_ID, ALLOWED_ID, RANGE_ID, BLOCK_ID, identity::HOST, identity::WORLD, identity::ANY, POD_ID, OTHERPOD_ID]);
        let dir = if r.chance(1, 2) { Direction::Ingress } else { Direction::Egress };
        let protocol = r.pick(&PROTOS);
        let kind = r.below(8);
        let sample = r.below(3);
        let hint_port = |first: u16, last: u16| match sample {
            0 => first,
            1 => last,
            _ => first + (last - first) / 2,
        };
        match kind {
            0..=3 => {
                let port = if protocol == proto::ICMP || protocol == proto::ICMPV6 {
                    r.pick(&[1, 3, 7, 0x2a])
                } else {
                    r.pick(&PORTS[..10])
                };
                if port != 0 {
                    m.policy.insert((PREFIX_FULL, PolicyKey::new(endpoint, peer, dir, protocol, port)), value);
                }
                self.hints.push((dir, peer, protocol, port));
            }
            4 | 5 => {
                let (first, last) = r.pick(&[(1000, 1023), (1024, 2047), (1, 1023), (8000, 8080), (5000, 5000), (0, 65535), (443, 444)]);
                for block in PortRangePrefixes::new(first, last) {
                    let len = block.lpm_prefix_len();
                    let len = if len == PREFIX_PROTOCOL { PREFIX_PROTOCOL } else { len };
                    m.policy.insert((len, PolicyKey::new(endpoint, peer, dir, protocol, block.port)), value);
                }
                self.hints.push((dir, peer, protocol, hint_port(first, last)));
            }
            6 => {
                m.policy.insert((PREFIX_PROTOCOL, PolicyKey::new(endpoint, peer, dir, protocol, 0)), value);
                self.hints.push((dir, peer, protocol, 0));
            }
            _ => {
                m.policy.insert((PREFIX_ANY_PROTOCOL, PolicyKey::new(endpoint, peer, dir, 0, 0)), value);
                self.hints.push((dir, peer, 0, 0));
            }
        }
    }

    /// A change within an epoch: policy, flags, revision or an identity. Returns a label.
    pub fn change(&mut self, m: &mut MapContents, ifindex: u32) -> &'static str {
        if let Some(mut info) = self.removed.take() {
            // The interface is managed again (same endpoint id: its state is still there).
            if self.rng.chance(1, 2) {
                info.revision = info.revision.wrapping_add(1);
            }
            m.endpoints.insert(ifindex, info);
            return "endpoint back";
        }
        let Some(mut info) = m.endpoints.get(&ifindex).copied() else { return "none" };
        if self.rng.chance(1, 25) {
            self.removed = m.endpoints.remove(&ifindex);
            return "endpoint removed";
        }
        let bump = self.rng.chance(4, 5);
        let label = match self.rng.below(6) {
            0 => {
                self.new_policy(m, ifindex);
                info = m.endpoints[&ifindex];
                "new policy"
            }
            1 => {
                info.flags ^= FLAG_INGRESS_ISOLATED;
                "toggle ingress"
            }
            2 => {
                info.flags ^= FLAG_EGRESS_ISOLATED;
                "toggle egress"
            }
            3 => {
                info.flags ^= FLAG_AUDIT;
                "toggle audit"
            }
            4 => {
                // An identity moves.
                let (addr, bits) = self.rng.pick(&[(ip4(ALLOWED4), 32), (ip6(ALLOWED6), 128), (ip4(DENIED4), 32), (ip6(DENIED6), 128)]);
                let key = match addr {
                    IpAddr::V4(a) => IpcacheKey::v4(a.octets()),
                    IpAddr::V6(a) => IpcacheKey::v6(a.octets()),
                };
                let id = self.rng.pick(&[ALLOWED_ID, DENIED_ID, RANGE_ID]);
                m.ipcache.insert((IpcacheKey::lpm_prefix_len(bits), key), IpcacheValue { identity: id });
                "identity"
            }
            _ => {
                let cookie = 100 + self.rng.below(100) as u32;
                self.add_entry(m, info.id, cookie);
                info.lookups = mask(m, info.id);
                "add entry"
            }
        };
        if bump {
            info.revision = info.revision.wrapping_add(1);
        }
        m.endpoints.insert(ifindex, info);
        label
    }
}

/// The lookup mask the compiler's render would write.
pub fn mask(m: &MapContents, endpoint: u32) -> [u8; 2] {
    let mut lookups = [0u8; 2];
    for (len, key) in m.policy.keys() {
        if key.endpoint() == endpoint
            && let Some(d) = key.direction()
        {
            lookups[d as usize] |= lookup::bit(*len, key.identity());
        }
    }
    lookups
}
