//! Crafted Ethernet frames for BPF_PROG_TEST_RUN (the datapath tests and benchmarks).

use std::net::IpAddr;

#[derive(Clone, Debug)]
pub enum L4 {
    Tcp { sport: u16, dport: u16, flags: u8 },
    Udp { sport: u16, dport: u16 },
    Sctp { sport: u16, dport: u16 },
    /// ICMP or ICMPv6 (chosen by the address family) with type, code and identifier.
    Icmp { kind: u8, code: u8, id: u16 },
    /// An ICMP error quoting `inner` (built without its Ethernet header).
    IcmpError { kind: u8, inner: Box<Frame> },
}

pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;
pub const RST: u8 = 0x04;
pub const FIN: u8 = 0x01;

/// An Ethernet frame carrying IPv4 or IPv6.
#[derive(Clone, Debug)]
pub struct Frame {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub l4: L4,
    /// IPv4 options (padded to a multiple of four bytes).
    pub ipv4_options: Vec<u8>,
    /// IPv6 extension headers to insert, by type (hop-by-hop 0, routing 43, dest opts 60).
    pub ipv6_ext: Vec<u8>,
    /// (id, more fragments, offset in 8-byte units).
    pub fragment: Option<(u32, bool, u16)>,
    /// Cut the frame to this many bytes.
    pub truncate: Option<usize>,
    /// IPv4 TTL / IPv6 hop limit.
    pub hop_limit: u8,
    /// VLAN tags (TPIDs such as 0x8100 or 0x88a8, each with VID 0) after the MAC addresses,
    /// outermost first.
    pub vlan_tags: Vec<u16>,
}

impl Frame {
    pub fn new(src: IpAddr, dst: IpAddr, l4: L4) -> Self {
        Self { src, dst, l4, ipv4_options: Vec::new(), ipv6_ext: Vec::new(), fragment: None, truncate: None, hop_limit: 64, vlan_tags: Vec::new() }
    }

    pub fn tcp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, flags: u8) -> Self {
        Self::new(src, dst, L4::Tcp { sport, dport, flags })
    }

    pub fn udp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Self {
        Self::new(src, dst, L4::Udp { sport, dport })
    }

    pub fn sctp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Self {
        Self::new(src, dst, L4::Sctp { sport, dport })
    }

    /// The Ethernet frame.
    pub fn build(&self) -> Vec<u8> {
        let mut frame = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
        for tpid in &self.vlan_tags {
            frame.extend(tpid.to_be_bytes());
            frame.extend([0, 0]);
        }
        frame.extend_from_slice(if self.src.is_ipv6() { &[0x86, 0xdd] } else { &[0x08, 0x00] });
        frame.extend(self.ip());
        if let Some(n) = self.truncate {
            frame.truncate(n);
        }
        frame
    }

    /// The Ethernet frame, padded to the 64-byte minimum a real link carries.
    pub fn padded(&self) -> Vec<u8> {
        let mut frame = self.build();
        if frame.len() < 64 {
            frame.resize(64, 0);
        }
        frame
    }

    /// The IP packet (no Ethernet header).
    pub fn ip(&self) -> Vec<u8> {
        let v6 = self.src.is_ipv6();
        let (protocol, l4) = self.transport(v6);
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let mut options = self.ipv4_options.clone();
                while !options.len().is_multiple_of(4) {
                    options.push(0);
                }
                let ihl = 5 + options.len() / 4;
                let total = ihl * 4 + l4.len();
                let (id, flags) = match self.fragment {
                    Some((id, more, offset)) => (id as u16, (u16::from(more) << 13) | offset),
                    None => (0x1234, 0x4000),
                };
                let mut p = vec![0x40 | ihl as u8, 0];
                p.extend((total as u16).to_be_bytes());
                p.extend(id.to_be_bytes());
                p.extend(flags.to_be_bytes());
                p.extend([self.hop_limit, protocol, 0, 0]);
                p.extend(s.octets());
                p.extend(d.octets());
                p.extend(options);
                let checksum = ipv4_checksum(&p);
                p[10..12].copy_from_slice(&checksum.to_be_bytes());
                p.extend(l4);
                p
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let mut types = self.ipv6_ext.clone();
                if self.fragment.is_some() {
                    types.push(44);
                }
                let mut ext = Vec::new();
                for (i, &t) in types.iter().enumerate() {
                    let next = types.get(i + 1).copied().unwrap_or(protocol);
                    if t == 44 {
                        let (id, more, offset) = self.fragment.expect("fragment header");
                        ext.extend([next, 0]);
                        ext.extend(((offset << 3) | u16::from(more)).to_be_bytes());
                        ext.extend(id.to_be_bytes());
                    } else if t == 43 {
                        // A routing header with no segments left (type 0: nothing to route).
                        ext.extend([next, 0, 0, 0, 0, 0, 0, 0]);
                    } else {
                        // Eight bytes: next header, length 0, PadN option of four bytes.
                        ext.extend([next, 0, 1, 4, 0, 0, 0, 0]);
                    }
                }
                let first = types.first().copied().unwrap_or(protocol);
                let mut p = vec![0x60, 0, 0, 0];
                p.extend(((ext.len() + l4.len()) as u16).to_be_bytes());
                p.extend([first, self.hop_limit]);
                p.extend(s.octets());
                p.extend(d.octets());
                p.extend(ext);
                p.extend(l4);
                p
            }
            _ => panic!("mixed address families"),
        }
    }

    fn transport(&self, v6: bool) -> (u8, Vec<u8>) {
        match &self.l4 {
            L4::Tcp { sport, dport, flags } => {
                let mut t = Vec::new();
                t.extend(sport.to_be_bytes());
                t.extend(dport.to_be_bytes());
                t.extend([0, 0, 0, 1, 0, 0, 0, 0, 0x50, *flags, 0xff, 0xff, 0, 0, 0, 0]);
                (6, t)
            }
            L4::Udp { sport, dport } => {
                let mut t = Vec::new();
                t.extend(sport.to_be_bytes());
                t.extend(dport.to_be_bytes());
                t.extend([0, 12, 0, 0, b'p', b'i', b'n', b'g']);
                (17, t)
            }
            L4::Sctp { sport, dport } => (132, super::probe::sctp_init(*sport, *dport)),
            L4::Icmp { kind, code, id } => {
                let mut t = vec![*kind, *code, 0, 0];
                t.extend(id.to_be_bytes());
                t.extend([0, 1]);
                (if v6 { 58 } else { 1 }, t)
            }
            L4::IcmpError { kind, inner } => {
                let mut t = vec![*kind, 0, 0, 0, 0, 0, 0, 0];
                t.extend(inner.ip());
                (if v6 { 58 } else { 1 }, t)
            }
        }
    }
}

/// The IPv4 header checksum (RFC 791), so that crafted frames survive a real node's checks.
pub fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header.chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ARP request frame from 198.18.0.1.
pub fn arp() -> Vec<u8> {
    arp_from(std::net::Ipv4Addr::new(198, 18, 0, 1))
}

/// An ARP request frame with this sender protocol address.
pub fn arp_from(sender: std::net::Ipv4Addr) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend([0x02, 0, 0, 0, 0, 0x01, 0x08, 0x06]);
    f.extend([0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend([0x02, 0, 0, 0, 0, 0x01]);
    f.extend(sender.octets());
    f.extend([0, 0, 0, 0, 0, 0, 198, 18, 0, 2]);
    f.resize(60, 0);
    f
}
