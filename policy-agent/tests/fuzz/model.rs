//! Reference model of the classifier's decision, written from
//! /work/spec/datapath-semantics.md (not from the classifier's code). It reuses the
//! compiler's userspace lookup model for identities and allow entries.
//!
//! Readings chosen where the spec leaves room (see fuzz-findings.md):
//! * an ICMP error's size bound is checked before its quote is read;
//! * a quoted IPv4 header with IHL < 5 is malformed;
//! * an IPv6 later fragment's extension headers after the fragment header are walked like
//!   any others (the spec only says that no transport header is parsed);
//! * ICMP means protocol 1 in IPv4 and 58 in IPv6; the other number is "another protocol";
//! * link control never records a fragment entry; passes of steps 10-12 do;
//! * "the pod's own IPv6" needs FLAG_HAS_IPV6 in both directions;
//! * conntrack budget (the lead's answer in the spec): an endpoint holding `ct_budget`
//!   entries (0: DEFAULT_BUDGET) gets no new ones; the verdict is unchanged.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use policy_agent::compile::{Hit, MapContents, decision, ipcache_lookup};
use policy_common::{
    Direction,
    conntrack::{CtKey, FragKey},
    counters::Reason,
    endpoint::{EndpointInfo, FLAG_AUDIT, FLAG_EGRESS_ISOLATED, FLAG_HAS_IPV4, FLAG_HAS_IPV6, FLAG_INGRESS_ISOLATED},
    family, identity, proto,
};

/// BPF_PROG_TEST_RUN runs on ifindex 1.
pub const IFINDEX: u32 = 1;

/// Where the IPv6 extension-header chain may end (the transport header's offset in the
/// frame) at most; beyond it the packet is malformed (finding F3: the kernel's bound, not in
/// the spec; fail-closed, so the model takes it).
pub const MAX_L4_OFFSET: usize = 1024;

/// Interpretation switches (defaults: the readings above).
pub const QUOTE_IHL_STRICT: bool = true;
/// Whether an ICMP error whose conntrack entry has another revision is still "related".
pub const RELATED_IGNORES_REVISION: bool = true;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub pass: bool,
    pub reason: Reason,
}

impl Outcome {
    const fn pass(reason: Reason) -> Self {
        Self { pass: true, reason }
    }
    const fn drop(reason: Reason) -> Self {
        Self { pass: false, reason }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtEntry {
    pub origin: Direction,
    pub revision: u32,
    pub cookie: u32,
}

/// A state change a verdict implies (applied by [`Model::commit`]).
#[derive(Clone, Copy, Debug)]
pub enum Change {
    CtPut(CtKey, CtEntry),
    CtDelete(CtKey),
    FragPut(FragKey),
    /// An opening packet that got no state: the endpoint's budget is spent (no-op).
    BudgetFull,
}

#[derive(Clone, Debug, Default)]
pub struct Model {
    /// Entries the endpoint may hold (`Config::ct_budget`, 0 = `DEFAULT_BUDGET`); at the
    /// budget, opening packets get their verdict but no state.
    pub ct_budget: u32,
    pub maps: MapContents,
    pub ct: HashMap<CtKey, CtEntry>,
    /// Entries of `ct` whose lifetime has run out (the driver ages them in the kernel too).
    pub expired: HashSet<CtKey>,
    pub frags: HashSet<FragKey>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frag {
    None,
    First,
    Later,
}

#[derive(Clone, Copy, Debug)]
pub struct Tuple {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

#[derive(Clone, Copy, Debug)]
pub enum L4 {
    /// Later fragment: nothing parsed.
    None,
    Normal { sport: u16, dport: u16, opening: bool },
    /// `related`: the quoted tuple reversed.
    IcmpError { related: Tuple },
    LinkControl { kind: u8 },
}

#[derive(Clone, Copy, Debug)]
pub struct Ip {
    pub v6: bool,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub frag: Frag,
    pub frag_id: u32,
    /// IPv4 total length or IPv6 40 + payload length.
    pub ip_len: usize,
    pub hop_limit: u8,
    pub l4: L4,
}

#[derive(Clone, Copy, Debug)]
pub enum Parsed {
    Frame,
    Arp { sender: [u8; 4] },
    Malformed,
    Ip(Ip),
}

fn be16(f: &[u8], o: usize) -> u16 {
    u16::from_be_bytes([f[o], f[o + 1]])
}
fn be32(f: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([f[o], f[o + 1], f[o + 2], f[o + 3]])
}
fn v4_at(f: &[u8], o: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(f[o], f[o + 1], f[o + 2], f[o + 3]))
}
fn v6_at(f: &[u8], o: usize) -> IpAddr {
    let mut a = [0u8; 16];
    a.copy_from_slice(&f[o..o + 16]);
    IpAddr::V6(Ipv6Addr::from(a))
}

pub fn parse(f: &[u8]) -> Parsed {
    if f.len() < 14 {
        return Parsed::Frame;
    }
    match be16(f, 12) {
        0x0806 => {
            if f.len() < 14 + 28 {
                return Parsed::Frame;
            }
            if be16(f, 14) != 1 || be16(f, 16) != 0x0800 || f[18] != 6 || f[19] != 4 {
                return Parsed::Frame;
            }
            Parsed::Arp { sender: [f[28], f[29], f[30], f[31]] }
        }
        0x0800 => parse_v4(f).map_or(Parsed::Malformed, |r| r),
        0x86dd => parse_v6(f).map_or(Parsed::Malformed, |r| r),
        _ => Parsed::Frame,
    }
}

/// `None` = malformed; `Some(Parsed::Frame)` = DropFrame found during the parse.
fn parse_v4(f: &[u8]) -> Option<Parsed> {
    if f.len() < 34 || f[14] >> 4 != 4 {
        return None;
    }
    let ihl = (f[14] & 15) as usize * 4;
    let total = be16(f, 16) as usize;
    if ihl < 20 || total < ihl || 14 + total > f.len() {
        return None;
    }
    let ip_end = 14 + total;
    // Options (lead's answer): any option byte (IP header bytes 20..IHL) that is 0x83 or 0x89
    // (loose or strict source route) is DropFrame.
    if f[34..14 + ihl].iter().any(|&b| b == 0x83 || b == 0x89) {
        return Some(Parsed::Frame);
    }
    let fragw = be16(f, 20);
    let frag = if fragw & 0x1fff != 0 {
        Frag::Later
    } else if fragw & 0x2000 != 0 {
        Frag::First
    } else {
        Frag::None
    };
    let mut ip = Ip {
        v6: false,
        src: v4_at(f, 26),
        dst: v4_at(f, 30),
        proto: f[23],
        frag,
        frag_id: be16(f, 18) as u32,
        ip_len: total,
        hop_limit: f[22],
        l4: L4::None,
    };
    if frag == Frag::Later {
        return Some(Parsed::Ip(ip));
    }
    match transport(f, &mut ip, 14 + ihl, ip_end)? {
        true => Some(Parsed::Ip(ip)),
        false => Some(Parsed::Frame),
    }
}

fn parse_v6(f: &[u8]) -> Option<Parsed> {
    if f.len() < 54 || f[14] >> 4 != 6 {
        return None;
    }
    let plen = be16(f, 18) as usize;
    if 54 + plen > f.len() {
        return None;
    }
    let ip_end = 54 + plen;
    let mut next = f[20];
    let mut off = 54;
    let mut count = 0;
    let mut frag = Frag::None;
    let mut frag_id = 0;
    let mut seen_frag = false;
    while matches!(next, 0 | 43 | 60 | 51 | 44) {
        count += 1;
        if count > 6 {
            return None;
        }
        if next == 44 {
            if seen_frag || off + 8 > ip_end {
                return None;
            }
            seen_frag = true;
            let w = be16(f, off + 2);
            frag = if w & 0xfff8 != 0 {
                Frag::Later
            } else if w & 1 != 0 {
                Frag::First
            } else {
                Frag::None
            };
            frag_id = be32(f, off + 4);
            next = f[off];
            off += 8;
            // The kernel bounds each next-header offset as it goes (F3).
            if off > MAX_L4_OFFSET {
                return None;
            }
        } else {
            if off + 2 > ip_end {
                return None;
            }
            // A routing header that still has segments to visit (lead's answer).
            if next == 43 {
                if off + 4 > ip_end {
                    return None;
                }
                if f[off + 3] != 0 {
                    return Some(Parsed::Frame);
                }
            }
            let len = if next == 51 { (f[off + 1] as usize + 2) * 4 } else { (f[off + 1] as usize + 1) * 8 };
            if off + len > ip_end {
                return None;
            }
            next = f[off];
            off += len;
            if off > MAX_L4_OFFSET {
                return None;
            }
        }
    }
    if off > MAX_L4_OFFSET {
        return None;
    }
    let mut ip = Ip {
        v6: true,
        src: v6_at(f, 22),
        dst: v6_at(f, 38),
        proto: next,
        frag,
        frag_id,
        ip_len: 40 + plen,
        hop_limit: f[21],
        l4: L4::None,
    };
    if frag == Frag::Later {
        return Some(Parsed::Ip(ip));
    }
    match transport(f, &mut ip, off, ip_end)? {
        true => Some(Parsed::Ip(ip)),
        false => Some(Parsed::Frame),
    }
}

/// Fills `ip.l4`. `None` = malformed, `Some(false)` = DropFrame.
fn transport(f: &[u8], ip: &mut Ip, l4: usize, ip_end: usize) -> Option<bool> {
    let need = |n: usize| if l4 + n <= ip_end { Some(()) } else { None };
    let icmp = if ip.v6 { proto::ICMPV6 } else { proto::ICMP };
    ip.l4 = match ip.proto {
        proto::TCP => {
            need(20)?;
            if f[l4 + 12] >> 4 < 5 {
                return None;
            }
            let flags = f[l4 + 13];
            L4::Normal { sport: be16(f, l4), dport: be16(f, l4 + 2), opening: flags & 0x17 == 0x02 }
        }
        proto::UDP => {
            need(8)?;
            L4::Normal { sport: be16(f, l4), dport: be16(f, l4 + 2), opening: true }
        }
        proto::SCTP => {
            need(16)?;
            let init = f[l4 + 12] == 1 && be32(f, l4 + 4) == 0;
            L4::Normal { sport: be16(f, l4), dport: be16(f, l4 + 2), opening: init }
        }
        p if p == icmp => {
            need(8)?;
            let kind = f[l4];
            let id = be16(f, l4 + 4);
            let (request, reply, error, redirect) = if ip.v6 { (128, 129, (1..=4).contains(&kind), 137) } else { (8, 0, matches!(kind, 3 | 4 | 11 | 12), 5) };
            if kind == redirect {
                return Some(false);
            }
            if kind == request {
                L4::Normal { sport: id, dport: 0, opening: true }
            } else if kind == reply {
                L4::Normal { sport: 0, dport: id, opening: false }
            } else if error {
                let bound = if ip.v6 { 1280 } else { 576 };
                if ip.ip_len > bound || ip.frag != Frag::None {
                    return Some(false);
                }
                L4::IcmpError { related: quote(f, ip.v6, l4 + 8, ip_end)? }
            } else if ip.v6 && matches!(kind, 130..=136 | 143) {
                if ip.frag != Frag::None {
                    return Some(false);
                }
                L4::LinkControl { kind }
            } else {
                L4::Normal { sport: 0, dport: 0, opening: false }
            }
        }
        _ => L4::Normal { sport: 0, dport: 0, opening: true },
    };
    Some(true)
}

/// The quoted packet's tuple, reversed.
fn quote(f: &[u8], v6: bool, q: usize, ip_end: usize) -> Option<Tuple> {
    let need = |end: usize| if end <= ip_end && end <= f.len() { Some(()) } else { None };
    let (src, dst, proto, t) = if v6 {
        need(q + 40)?;
        (v6_at(f, q + 8), v6_at(f, q + 24), f[q + 6], q + 40)
    } else {
        need(q + 20)?;
        let ihl = (f[q] & 15) as usize * 4;
        if QUOTE_IHL_STRICT && ihl < 20 {
            return None;
        }
        (v4_at(f, q + 12), v4_at(f, q + 16), f[q + 9], q + ihl)
    };
    let icmp = if v6 { proto::ICMPV6 } else { proto::ICMP };
    let (sport, dport) = match proto {
        proto::TCP | proto::UDP | proto::SCTP => {
            need(t + 4)?;
            (be16(f, t), be16(f, t + 2))
        }
        p if p == icmp => {
            need(t + 8)?;
            let id = be16(f, t + 4);
            if f[t] == if v6 { 128 } else { 8 } { (id, 0) } else { (0, id) }
        }
        _ => (0, 0),
    };
    Some(Tuple { src: dst, dst: src, sport: dport, dport: sport, proto })
}

pub fn bytes16(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(a) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&a.octets());
            b
        }
        IpAddr::V6(a) => a.octets(),
    }
}

fn fam(a: IpAddr) -> u8 {
    if a.is_ipv4() { family::IPV4 } else { family::IPV6 }
}

fn link_local(a: IpAddr) -> bool {
    matches!(a, IpAddr::V6(a) if a.segments()[0] & 0xffc0 == 0xfe80)
}
fn mc_ff02(a: IpAddr) -> bool {
    matches!(a, IpAddr::V6(a) if a.segments()[0] == 0xff02)
}
fn unspecified(a: IpAddr) -> bool {
    matches!(a, IpAddr::V6(a) if a.is_unspecified())
}

pub fn isolation_flag(d: Direction) -> u32 {
    match d {
        Direction::Ingress => FLAG_INGRESS_ISOLATED,
        Direction::Egress => FLAG_EGRESS_ISOLATED,
    }
}

/// The conntrack key of a packet, normalised to the pod's side.
pub fn ct_key(ep: u32, dir: Direction, proto: u8, src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> CtKey {
    match dir {
        Direction::Egress => CtKey::new(ep, fam(src), proto, bytes16(src), sport, bytes16(dst), dport),
        Direction::Ingress => CtKey::new(ep, fam(src), proto, bytes16(dst), dport, bytes16(src), sport),
    }
}

fn key_addr(family_: u8, b: &[u8; 16]) -> IpAddr {
    if family_ == family::IPV4 { IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])) } else { IpAddr::V6(Ipv6Addr::from(*b)) }
}

impl Model {
    pub fn endpoint(&self) -> Option<EndpointInfo> {
        self.maps.endpoints.get(&IFINDEX).copied()
    }

    fn is_host(&self, a: IpAddr) -> bool {
        ipcache_lookup(&self.maps, a) == identity::HOST
    }

    /// The verdict for `frame` in `dir`, and the state changes it implies (not applied).
    pub fn judge(&self, frame: &[u8], dir: Direction) -> (Outcome, Vec<Change>) {
        let mut changes = Vec::new();
        let out = self.decide(frame, dir, &mut changes);
        (out, changes)
    }

    pub fn commit(&mut self, changes: &[Change]) {
        for c in changes {
            match *c {
                Change::CtPut(k, e) => {
                    self.ct.insert(k, e);
                    self.expired.remove(&k);
                }
                Change::CtDelete(k) => {
                    self.ct.remove(&k);
                    self.expired.remove(&k);
                }
                Change::FragPut(k) => {
                    self.frags.insert(k);
                }
                Change::BudgetFull => {}
            }
        }
    }

    fn decide(&self, frame: &[u8], dir: Direction, changes: &mut Vec<Change>) -> Outcome {
        // 1.
        let Some(ep) = self.endpoint() else { return Outcome::pass(Reason::PassUnmanaged) };
        let egress = dir == Direction::Egress;
        let enforced = ep.has(isolation_flag(dir));
        let audit = ep.has(FLAG_AUDIT);
        let has4 = ep.has(FLAG_HAS_IPV4);
        let has6 = ep.has(FLAG_HAS_IPV6);
        let pod6 = IpAddr::V6(Ipv6Addr::from(ep.ipv6));
        let pod4 = IpAddr::V4(Ipv4Addr::from(ep.ipv4));
        // 3, 4.
        let ip = match parse(frame) {
            Parsed::Frame => return Outcome::drop(Reason::DropFrame),
            Parsed::Arp { sender } => {
                if egress && sender != [0; 4] && !(has4 && sender == ep.ipv4) {
                    return Outcome::drop(Reason::DropFrame);
                }
                return Outcome::pass(Reason::PassNonIp);
            }
            // 6.
            Parsed::Malformed => {
                return if egress || enforced { Outcome::drop(Reason::DropMalformed) } else { Outcome::pass(Reason::PassNotIsolated) };
            }
            Parsed::Ip(ip) => ip,
        };
        // 5.
        if let L4::LinkControl { kind } = ip.l4 {
            let ok = ip.ip_len <= 1280
                && if matches!(kind, 133..=136) { ip.hop_limit == 255 } else { ip.hop_limit == 1 }
                && !(egress && kind == 134)
                && if egress {
                    ((has6 && ip.src == pod6) || link_local(ip.src) || unspecified(ip.src))
                        && (link_local(ip.dst) || mc_ff02(ip.dst) || self.is_host(ip.dst))
                } else {
                    (link_local(ip.src) || unspecified(ip.src) || self.is_host(ip.src))
                        && ((has6 && ip.dst == pod6) || link_local(ip.dst) || mc_ff02(ip.dst))
                };
            return if ok { Outcome::pass(Reason::PassNonIp) } else { Outcome::drop(Reason::DropFrame) };
        }
        // 7.
        if egress {
            let own = if ip.v6 { has6 && ip.src == pod6 } else { has4 && ip.src == pod4 };
            if !own {
                return Outcome::drop(Reason::DropSpoofed);
            }
        }
        // 8.
        if !ep.isolated_any() {
            return Outcome::pass(Reason::PassNotIsolated);
        }
        let fam_ = fam(ip.src);
        let frag_key = FragKey {
            endpoint: ep.id,
            id: ip.frag_id,
            family: fam_,
            protocol: ip.proto,
            direction: dir as u8,
            _pad: 0,
            src_addr: bytes16(ip.src),
            dst_addr: bytes16(ip.dst),
        };
        // 9.
        if ip.frag == Frag::Later {
            if !enforced {
                return Outcome::pass(Reason::PassNotIsolated);
            }
            return if self.frags.contains(&frag_key) { Outcome::pass(Reason::PassFragment) } else { Outcome::drop(Reason::DropFragment) };
        }
        let out = self.stateful(&ep, &ip, dir, enforced, audit, changes);
        // 13.
        if out.pass && enforced && ip.frag == Frag::First {
            changes.push(Change::FragPut(frag_key));
        }
        out
    }

    fn stateful(&self, ep: &EndpointInfo, ip: &Ip, dir: Direction, enforced: bool, audit: bool, changes: &mut Vec<Change>) -> Outcome {
        let egress = dir == Direction::Egress;
        let peer = if egress { ip.dst } else { ip.src };
        // The first entry found decides; every action but allow denies (fail closed).
        let policy = |port: u16| decision(&self.maps, IFINDEX, dir, peer, ip.proto, port);
        // 10.
        if let L4::IcmpError { related } = ip.l4 {
            if !enforced {
                return Outcome::pass(Reason::PassNotIsolated);
            }
            let addrs = ip.dst == related.dst && (ip.src == related.src || (!egress && self.is_host(ip.src)));
            let key = ct_key(ep.id, dir, related.proto, related.src, related.sport, related.dst, related.dport);
            let live = match self.ct.get(&key) {
                Some(e) => !self.expired.contains(&key) && (RELATED_IGNORES_REVISION || e.revision == ep.revision),
                None => false,
            };
            if addrs && live && related.src.is_ipv6() == ip.v6 {
                return Outcome::pass(Reason::PassReply);
            }
            return match policy(0) {
                Some(Hit { allows: true, .. }) => Outcome::pass(Reason::PassPolicy),
                _ if audit => Outcome::pass(Reason::PassAudit),
                Some(_) => Outcome::drop(Reason::DropDeny),
                None => Outcome::drop(Reason::DropPolicy),
            };
        }
        let (sport, dport, opening) = match ip.l4 {
            L4::Normal { sport, dport, opening } => (sport, dport, opening),
            _ => (0, 0, true),
        };
        // 11.
        let key = ct_key(ep.id, dir, ip.proto, ip.src, sport, ip.dst, dport);
        let expired = self.expired.contains(&key);
        if expired {
            // An expired entry met on lookup is removed; the packet is judged as new.
            changes.push(Change::CtDelete(key));
        }
        if let Some(entry) = self.ct.get(&key).copied().filter(|_| !expired) {
            let mut hit = true;
            if entry.revision != ep.revision {
                let o = entry.origin;
                let mut updated = CtEntry { revision: ep.revision, ..entry };
                if ep.has(isolation_flag(o)) {
                    let peer = key_addr(key.family, &key.peer_addr);
                    let port = if o == Direction::Egress { key.peer_port() } else { key.pod_port() };
                    // A deny entry revokes like a missing one.
                    match decision(&self.maps, IFINDEX, o, peer, ip.proto, port) {
                        Some(Hit { cookie, allows: true, .. }) => {
                            updated.cookie = cookie;
                            changes.push(Change::CtPut(key, updated));
                        }
                        _ if audit => changes.push(Change::CtPut(key, updated)),
                        _ => {
                            changes.push(Change::CtDelete(key));
                            hit = false;
                        }
                    }
                } else {
                    changes.push(Change::CtPut(key, updated));
                }
            }
            if hit {
                return Outcome::pass(if dir == entry.origin { Reason::PassEstablished } else { Reason::PassReply });
            }
        }
        // 12.
        let create = |cookie: u32, changes: &mut Vec<Change>| {
            // Each opening direction of the endpoint has a budget of its own.
            let held = self
                .ct
                .iter()
                .filter(|(k, e)| k.endpoint == key.endpoint && e.origin == dir && !changes.iter().any(|c| matches!(c, Change::CtDelete(d) if d == *k)))
                .count();
            let budget = if self.ct_budget == 0 { policy_common::conntrack::DEFAULT_BUDGET } else { self.ct_budget };
            if opening && (held as u64) < u64::from(budget) {
                changes.push(Change::CtPut(key, CtEntry { origin: dir, revision: ep.revision, cookie }));
            } else if opening {
                changes.push(Change::BudgetFull);
            }
        };
        if !enforced {
            create(0, changes);
            return Outcome::pass(Reason::PassNotIsolated);
        }
        match policy(dport) {
            Some(Hit { cookie, allows: true, .. }) => {
                create(cookie, changes);
                Outcome::pass(Reason::PassPolicy)
            }
            _ if audit => {
                create(0, changes);
                Outcome::pass(Reason::PassAudit)
            }
            Some(_) => Outcome::drop(Reason::DropDeny),
            None => Outcome::drop(Reason::DropPolicy),
        }
    }
}
