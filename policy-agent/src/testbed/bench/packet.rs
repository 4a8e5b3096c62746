//! Crafted Ethernet frames for BPF_PROG_TEST_RUN (TCP and UDP over IPv4 and IPv6), after
//! tests/common/packet.rs, padded to the 64-byte minimum Ethernet frame.

use std::net::IpAddr;

pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;

#[derive(Clone, Copy, Debug)]
pub enum L4 {
    Tcp { sport: u16, dport: u16, flags: u8 },
    Udp { sport: u16, dport: u16 },
}

pub fn tcp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, flags: u8) -> Vec<u8> {
    frame(src, dst, L4::Tcp { sport, dport, flags })
}

pub fn udp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Vec<u8> {
    frame(src, dst, L4::Udp { sport, dport })
}

/// An Ethernet frame carrying `l4` from `src` to `dst` (same family).
pub fn frame(src: IpAddr, dst: IpAddr, l4: L4) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
    frame.extend_from_slice(if src.is_ipv6() { &[0x86, 0xdd] } else { &[0x08, 0x00] });
    let (protocol, transport) = match l4 {
        L4::Tcp { sport, dport, flags } => {
            let mut t = Vec::new();
            t.extend(sport.to_be_bytes());
            t.extend(dport.to_be_bytes());
            t.extend([0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
            (6u8, t)
        }
        L4::Udp { sport, dport } => {
            let mut t = Vec::new();
            t.extend(sport.to_be_bytes());
            t.extend(dport.to_be_bytes());
            t.extend([0, 12, 0, 0, b'p', b'i', b'n', b'g']);
            (17u8, t)
        }
    };
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = 20 + transport.len();
            frame.extend([0x45, 0]);
            frame.extend((total as u16).to_be_bytes());
            frame.extend([0x12, 0x34, 0x40, 0x00, 64, protocol, 0, 0]);
            frame.extend(s.octets());
            frame.extend(d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            frame.extend([0x60, 0, 0, 0]);
            frame.extend((transport.len() as u16).to_be_bytes());
            frame.extend([protocol, 64]);
            frame.extend(s.octets());
            frame.extend(d.octets());
        }
        _ => panic!("mixed address families"),
    }
    frame.extend(transport);
    if frame.len() < 64 {
        frame.resize(64, 0);
    }
    frame
}
