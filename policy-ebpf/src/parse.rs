//! Packet parsing: Ethernet, IPv4 (with options), IPv6 (with a bounded number of extension
//! headers), TCP, UDP, SCTP, ICMP and ICMPv6, all through one bounds-checked accessor.

use aya_ebpf::programs::TcContext;
use policy_common::{family, proto};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
/// IPv6 extension headers skipped before giving up (fail closed on an isolated pod).
const MAX_IPV6_EXT_HEADERS: usize = 6;

const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AH: u8 = 51;
const IPV6_DEST_OPTS: u8 = 60;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Why a packet could not be parsed.
#[derive(Clone, Copy)]
pub enum ParseError {
    /// Not IPv4 or IPv6: the classifier does not judge it.
    NotIp,
    /// Headers shorter than they claim, or more extension headers than we skip.
    Malformed,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    /// A whole datagram.
    None,
    /// The first fragment (carries the ports); later ones are judged by its verdict.
    First,
    /// A later fragment: no transport header.
    Later,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Normal,
    /// IPv6 neighbour discovery and multicast listener messages: link plumbing, always passed.
    LinkControl,
    /// An ICMP error about another flow: `related` holds that flow as its reply would look.
    IcmpError,
}

/// A flow tuple: addresses (IPv4 in the first four bytes) and ports in host order.
#[derive(Clone, Copy)]
pub struct Tuple {
    pub protocol: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
}

pub struct Packet {
    pub family: u8,
    pub tuple: Tuple,
    pub tcp_flags: u8,
    pub fragment: Fragment,
    pub fragment_id: u32,
    pub kind: Kind,
    /// For [`Kind::IcmpError`]: the quoted flow, reversed so it reads like one of its replies.
    pub related: Tuple,
}

/// The one way to read packet data: a pointer to a `T` at `offset`, if it lies inside the
/// linear packet data.
#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Result<*const T, ParseError> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return Err(ParseError::Malformed);
    }
    Ok((start + offset) as *const T)
}

/// Reads `N` bytes at `offset`. Keep `N >= 2`: LLVM rewrites the one-byte bounds check
/// into a form the verifier cannot use.
#[inline(always)]
fn bytes_at<const N: usize>(ctx: &TcContext, offset: usize) -> Result<[u8; N], ParseError> {
    // SAFETY: ptr_at checked that N bytes at offset are inside the packet; [u8; N] has
    // alignment 1, so the unaligned packet pointer is fine.
    Ok(unsafe { *ptr_at::<[u8; N]>(ctx, offset)? })
}

#[inline(always)]
fn u16_at(ctx: &TcContext, offset: usize) -> Result<u16, ParseError> {
    Ok(u16::from_be_bytes(bytes_at::<2>(ctx, offset)?))
}

const EMPTY_TUPLE: Tuple = Tuple { protocol: 0, src: [0; 16], dst: [0; 16], sport: 0, dport: 0 };

#[inline(always)]
pub fn parse(ctx: &TcContext) -> Result<Packet, ParseError> {
    let ethertype = u16_at(ctx, 12).map_err(|_| ParseError::NotIp)?;
    let mut packet = Packet {
        family: 0,
        tuple: EMPTY_TUPLE,
        tcp_flags: 0,
        fragment: Fragment::None,
        fragment_id: 0,
        kind: Kind::Normal,
        related: EMPTY_TUPLE,
    };
    let l4 = match ethertype {
        ETH_P_IP => parse_ipv4(ctx, ETH_HLEN, &mut packet)?,
        ETH_P_IPV6 => parse_ipv6(ctx, ETH_HLEN, &mut packet)?,
        _ => return Err(ParseError::NotIp),
    };
    if packet.fragment != Fragment::Later {
        parse_l4(ctx, l4, &mut packet)?;
    }
    Ok(packet)
}

/// Parses the IPv4 header at `offset`; returns the transport header offset.
#[inline(always)]
fn parse_ipv4(ctx: &TcContext, offset: usize, packet: &mut Packet) -> Result<usize, ParseError> {
    let header = bytes_at::<20>(ctx, offset)?;
    if header[0] >> 4 != 4 {
        return Err(ParseError::Malformed);
    }
    let ihl = ((header[0] & 0x0f) as usize) * 4;
    if ihl < 20 {
        return Err(ParseError::Malformed);
    }
    packet.family = family::IPV4;
    packet.tuple.protocol = header[9];
    packet.tuple.src[..4].copy_from_slice(&header[12..16]);
    packet.tuple.dst[..4].copy_from_slice(&header[16..20]);
    let frag = u16::from_be_bytes([header[6], header[7]]);
    let more_fragments = frag & 0x2000 != 0;
    let fragment_offset = frag & 0x1fff;
    packet.fragment_id = u16::from_be_bytes([header[4], header[5]]) as u32;
    packet.fragment = if fragment_offset != 0 {
        Fragment::Later
    } else if more_fragments {
        Fragment::First
    } else {
        Fragment::None
    };
    Ok(offset + ihl)
}

/// Parses the IPv6 header and its extension headers; returns the transport header offset.
#[inline(always)]
fn parse_ipv6(ctx: &TcContext, offset: usize, packet: &mut Packet) -> Result<usize, ParseError> {
    let header = bytes_at::<40>(ctx, offset)?;
    if header[0] >> 4 != 6 {
        return Err(ParseError::Malformed);
    }
    packet.family = family::IPV6;
    packet.tuple.src.copy_from_slice(&header[8..24]);
    packet.tuple.dst.copy_from_slice(&header[24..40]);
    let mut next = header[6];
    let mut off = offset + 40;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS => {
                let ext = bytes_at::<2>(ctx, off)?;
                next = ext[0];
                off += (ext[1] as usize + 1) * 8;
            }
            IPV6_AH => {
                let ext = bytes_at::<2>(ctx, off)?;
                next = ext[0];
                off += (ext[1] as usize + 2) * 4;
            }
            IPV6_FRAGMENT => {
                let ext = bytes_at::<8>(ctx, off)?;
                next = ext[0];
                let frag = u16::from_be_bytes([ext[2], ext[3]]);
                packet.fragment_id = u32::from_be_bytes([ext[4], ext[5], ext[6], ext[7]]);
                packet.fragment = if frag & 0xfff8 != 0 {
                    Fragment::Later
                } else if frag & 1 != 0 {
                    Fragment::First
                } else {
                    Fragment::None
                };
                off += 8;
            }
            _ => {
                packet.tuple.protocol = next;
                return Ok(off);
            }
        }
        // Keeps the offset bounded for the verifier (and rejects absurd header chains).
        if off > 1024 {
            return Err(ParseError::Malformed);
        }
    }
    Err(ParseError::Malformed)
}

#[inline(always)]
fn parse_l4(ctx: &TcContext, offset: usize, packet: &mut Packet) -> Result<(), ParseError> {
    match packet.tuple.protocol {
        proto::TCP => {
            let header = bytes_at::<20>(ctx, offset)?;
            packet.tuple.sport = u16::from_be_bytes([header[0], header[1]]);
            packet.tuple.dport = u16::from_be_bytes([header[2], header[3]]);
            if (header[12] >> 4) < 5 {
                return Err(ParseError::Malformed);
            }
            packet.tcp_flags = header[13];
        }
        proto::UDP => {
            let header = bytes_at::<8>(ctx, offset)?;
            packet.tuple.sport = u16::from_be_bytes([header[0], header[1]]);
            packet.tuple.dport = u16::from_be_bytes([header[2], header[3]]);
        }
        proto::SCTP => {
            // Common header: ports, verification tag, checksum.
            let header = bytes_at::<12>(ctx, offset)?;
            packet.tuple.sport = u16::from_be_bytes([header[0], header[1]]);
            packet.tuple.dport = u16::from_be_bytes([header[2], header[3]]);
        }
        proto::ICMP => parse_icmp(ctx, offset, packet, false)?,
        proto::ICMPV6 => parse_icmp(ctx, offset, packet, true)?,
        // Other protocols have no ports; policies can still allow them with a rule that
        // names no ports (any protocol).
        _ => {}
    }
    Ok(())
}

#[inline(always)]
fn parse_icmp(ctx: &TcContext, offset: usize, packet: &mut Packet, v6: bool) -> Result<(), ParseError> {
    let header = bytes_at::<8>(ctx, offset)?;
    let icmp_type = header[0];
    let id = u16::from_be_bytes([header[4], header[5]]);
    let (echo_request, echo_reply, error) = if v6 {
        (icmp_type == 128, icmp_type == 129, icmp_type >= 1 && icmp_type <= 4)
    } else {
        (icmp_type == 8, icmp_type == 0, matches!(icmp_type, 3 | 4 | 5 | 11 | 12))
    };
    // Echo: the identifier plays the client's port, so request and reply share a tuple.
    if echo_request {
        packet.tuple.sport = id;
    } else if echo_reply {
        packet.tuple.dport = id;
    } else if error {
        packet.kind = Kind::IcmpError;
        parse_quoted(ctx, offset + 8, packet, v6)?;
    } else if v6 && (130..=137).contains(&icmp_type) || v6 && icmp_type == 143 {
        packet.kind = Kind::LinkControl;
    }
    Ok(())
}

/// Parses the packet quoted in an ICMP error (the original packet, sent the other way) and
/// stores its reversed tuple, i.e. how a reply of that flow would look.
#[inline(always)]
fn parse_quoted(ctx: &TcContext, offset: usize, packet: &mut Packet, v6: bool) -> Result<(), ParseError> {
    let (protocol, src, dst, l4) = if v6 {
        let header = bytes_at::<40>(ctx, offset)?;
        let mut src = [0u8; 16];
        let mut dst = [0u8; 16];
        src.copy_from_slice(&header[8..24]);
        dst.copy_from_slice(&header[24..40]);
        (header[6], src, dst, offset + 40)
    } else {
        let header = bytes_at::<20>(ctx, offset)?;
        let ihl = ((header[0] & 0x0f) as usize) * 4;
        if ihl < 20 {
            return Err(ParseError::Malformed);
        }
        let mut src = [0u8; 16];
        let mut dst = [0u8; 16];
        src[..4].copy_from_slice(&header[12..16]);
        dst[..4].copy_from_slice(&header[16..20]);
        (header[9], src, dst, offset + ihl)
    };
    let (sport, dport) = match protocol {
        proto::TCP | proto::UDP | proto::SCTP => {
            let ports = bytes_at::<4>(ctx, l4)?;
            (u16::from_be_bytes([ports[0], ports[1]]), u16::from_be_bytes([ports[2], ports[3]]))
        }
        proto::ICMP | proto::ICMPV6 => {
            // A quoted echo request: its identifier is the flow's client port.
            let header = bytes_at::<8>(ctx, l4)?;
            let id = u16::from_be_bytes([header[4], header[5]]);
            if header[0] == 8 || header[0] == 128 { (id, 0) } else { (0, id) }
        }
        _ => (0, 0),
    };
    packet.related = Tuple { protocol, src: dst, dst: src, sport: dport, dport: sport };
    Ok(())
}
