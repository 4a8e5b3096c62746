//! Packet parsing: Ethernet, ARP, IPv4 (with options), IPv6 (with a bounded number of
//! extension headers), TCP, UDP, SCTP, ICMP and ICMPv6, all through one bounds-checked
//! accessor. Every read must lie inside the linear packet data *and* inside the length the IP
//! header claims, so a frame cannot show the classifier one packet and the stack another.

use aya_ebpf::programs::TcContext;
use policy_common::{family, proto};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86DD;
/// IPv6 extension headers accepted before the transport header; one more is malformed.
pub const MAX_IPV6_EXT_HEADERS: usize = 6;
/// RFC 1812 4.3.2.3: an ICMPv4 error is at most 576 bytes long.
const MAX_ICMPV4_ERROR: u32 = 576;
/// RFC 4443 2.4 (c): an ICMPv6 error, and any ND or MLD message, fits the minimum MTU.
pub const MAX_ICMPV6_CONTROL: u32 = 1280;

const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AH: u8 = 51;
const IPV6_DEST_OPTS: u8 = 60;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

const IPOPT_LSRR: u8 = 0x83;
const IPOPT_SSRR: u8 = 0x89;

const SCTP_CHUNK_INIT: u8 = 1;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_REDIRECT: u8 = 5;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;
const ICMPV6_REDIRECT: u8 = 137;

/// Why a packet could not be parsed.
#[derive(Clone, Copy)]
pub enum ParseError {
    /// A frame a pod interface never legitimately carries (see `Reason::DropFrame`).
    Frame,
    /// Headers shorter than they claim, lengths that lie, or too many extension headers.
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
    /// ARP for IPv4 over Ethernet: `tuple.src` holds the sender protocol address.
    Arp,
    /// IPv6 neighbour discovery and multicast listener messages (`icmp_type` says which).
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
    /// Whether this packet may open a flow (create conntrack state): a lone TCP SYN, any UDP
    /// datagram, an SCTP INIT, an ICMP echo request, any packet of another protocol.
    pub opening: bool,
    pub icmp_type: u8,
    /// IPv6 hop limit (IPv4 TTL): ND and MLD require fixed values.
    pub hop_limit: u8,
    /// Length of the IP packet as its header claims (IPv4 total length, IPv6 40 + payload).
    pub ip_len: u32,
    /// For [`Kind::IcmpError`]: the quoted flow, reversed so it reads like one of its replies.
    pub related: Tuple,
    /// The packet came in on another interface (the skb's ingress ifindex is set): towards a
    /// pod, its source was not the node itself, whatever address it carries.
    pub forwarded: bool,
}

/// The one way to read packet data: a pointer to a `T` at `offset`, if it lies inside the
/// linear packet data and ends at or before `limit` (the end of the IP packet).
#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, offset: usize, limit: usize) -> Result<*const T, ParseError> {
    let start = ctx.data();
    let end = ctx.data_end();
    let size = core::mem::size_of::<T>();
    if start + offset + size > end || offset + size > limit {
        return Err(ParseError::Malformed);
    }
    Ok((start + offset) as *const T)
}

/// Reads `N` bytes at `offset`. Keep `N >= 2`: LLVM rewrites the one-byte bounds check
/// into a form the verifier cannot use.
#[inline(always)]
fn bytes_at<const N: usize>(ctx: &TcContext, offset: usize, limit: usize) -> Result<[u8; N], ParseError> {
    // SAFETY: ptr_at checked that N bytes at offset are inside the packet; [u8; N] has
    // alignment 1, so the unaligned packet pointer is fine.
    Ok(unsafe { *ptr_at::<[u8; N]>(ctx, offset, limit)? })
}

const EMPTY_TUPLE: Tuple = Tuple { protocol: 0, src: [0; 16], dst: [0; 16], sport: 0, dport: 0 };

#[inline(always)]
pub fn parse(ctx: &TcContext) -> Result<Packet, ParseError> {
    let frame_len = ctx.len() as usize;
    let ethertype = bytes_at::<2>(ctx, 12, frame_len).map_err(|_| ParseError::Frame)?;
    let mut packet = Packet {
        family: 0,
        tuple: EMPTY_TUPLE,
        tcp_flags: 0,
        fragment: Fragment::None,
        fragment_id: 0,
        kind: Kind::Normal,
        opening: false,
        icmp_type: 0,
        hop_limit: 0,
        ip_len: 0,
        related: EMPTY_TUPLE,
        forwarded: false,
    };
    // VLAN tags (0x8100, 0x88a8, 0x9100) and every other EtherType end here: a pod has no
    // business sending them, and the node would route what it finds inside.
    let (l4, ip_end) = match u16::from_be_bytes(ethertype) {
        ETH_P_IP => parse_ipv4(ctx, frame_len, &mut packet)?,
        ETH_P_IPV6 => parse_ipv6(ctx, frame_len, &mut packet)?,
        ETH_P_ARP => return parse_arp(ctx, frame_len, packet),
        _ => return Err(ParseError::Frame),
    };
    if packet.fragment != Fragment::Later {
        parse_l4(ctx, l4, ip_end, &mut packet)?;
    }
    Ok(packet)
}

/// ARP for IPv4 over Ethernet only; the sender protocol address goes to `tuple.src`.
#[inline(always)]
fn parse_arp(ctx: &TcContext, frame_len: usize, mut packet: Packet) -> Result<Packet, ParseError> {
    let arp = bytes_at::<28>(ctx, ETH_HLEN, frame_len).map_err(|_| ParseError::Frame)?;
    if arp[0..6] != [0, 1, 0x08, 0x00, 6, 4] {
        return Err(ParseError::Frame);
    }
    packet.kind = Kind::Arp;
    packet.family = family::IPV4;
    packet.tuple.src[..4].copy_from_slice(&arp[14..18]);
    Ok(packet)
}

/// Parses the IPv4 header; returns the transport header offset and the end of the packet.
#[inline(always)]
fn parse_ipv4(ctx: &TcContext, frame_len: usize, packet: &mut Packet) -> Result<(usize, usize), ParseError> {
    let header = bytes_at::<20>(ctx, ETH_HLEN, frame_len)?;
    if header[0] >> 4 != 4 {
        return Err(ParseError::Malformed);
    }
    let ihl = ((header[0] & 0x0f) as usize) * 4;
    let total = u16::from_be_bytes([header[2], header[3]]) as usize;
    // Trailing Ethernet padding is fine; a packet longer than its frame, or shorter than its
    // own header, is not.
    if ihl < 20 || total < ihl || ETH_HLEN + total > frame_len {
        return Err(ParseError::Malformed);
    }
    refuse_source_route(ctx, ihl, ETH_HLEN + total)?;
    packet.family = family::IPV4;
    packet.ip_len = total as u32;
    packet.hop_limit = header[8];
    packet.tuple.protocol = header[9];
    packet.tuple.src[..4].copy_from_slice(&header[12..16]);
    packet.tuple.dst[..4].copy_from_slice(&header[16..20]);
    let frag = u16::from_be_bytes([header[6], header[7]]);
    packet.fragment_id = u16::from_be_bytes([header[4], header[5]]) as u32;
    packet.fragment = fragment_kind(frag & 0x1fff != 0, frag & 0x2000 != 0);
    Ok((ETH_HLEN + ihl, ETH_HLEN + total))
}

/// IPv4 loose and strict source routes name the next hops: a node that honours them
/// (`accept_source_route`) would forward the packet past the destination we judged. Any
/// option byte with their type drops the packet: a scan of fixed words keeps the verifier's
/// paths few, and pods send hardly any options at all (a false match fails closed).
#[inline(always)]
fn refuse_source_route(ctx: &TcContext, ihl: usize, ip_end: usize) -> Result<(), ParseError> {
    for word in 0..10 {
        let off = ETH_HLEN + 20 + word * 4;
        if off >= ETH_HLEN + ihl {
            break;
        }
        let [a, b, c, d] = bytes_at::<4>(ctx, off, ip_end)?;
        if source_route(a) || source_route(b) || source_route(c) || source_route(d) {
            return Err(ParseError::Frame);
        }
    }
    Ok(())
}

#[inline(always)]
fn source_route(option: u8) -> bool {
    option == IPOPT_LSRR || option == IPOPT_SSRR
}

#[inline(always)]
fn fragment_kind(later: bool, more: bool) -> Fragment {
    if later {
        Fragment::Later
    } else if more {
        Fragment::First
    } else {
        Fragment::None
    }
}

/// Parses the IPv6 header and its extension headers; returns the transport header offset
/// and the end of the packet.
#[inline(always)]
fn parse_ipv6(ctx: &TcContext, frame_len: usize, packet: &mut Packet) -> Result<(usize, usize), ParseError> {
    let header = bytes_at::<40>(ctx, ETH_HLEN, frame_len)?;
    if header[0] >> 4 != 6 {
        return Err(ParseError::Malformed);
    }
    let total = 40 + u16::from_be_bytes([header[4], header[5]]) as usize;
    if ETH_HLEN + total > frame_len {
        return Err(ParseError::Malformed);
    }
    let ip_end = ETH_HLEN + total;
    packet.family = family::IPV6;
    packet.ip_len = total as u32;
    packet.hop_limit = header[7];
    packet.tuple.src.copy_from_slice(&header[8..24]);
    packet.tuple.dst.copy_from_slice(&header[24..40]);
    let mut next = header[6];
    let mut off = ETH_HLEN + 40;
    let mut fragment_seen = false;
    for count in 0..=MAX_IPV6_EXT_HEADERS {
        if !matches!(next, IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS | IPV6_AH | IPV6_FRAGMENT) {
            packet.tuple.protocol = next;
            return Ok((off, ip_end));
        }
        if count == MAX_IPV6_EXT_HEADERS {
            break;
        }
        let len = match next {
            IPV6_AH => {
                let ext = bytes_at::<2>(ctx, off, ip_end)?;
                next = ext[0];
                (ext[1] as usize + 2) * 4
            }
            IPV6_ROUTING => {
                // Segments left: the node (seg6, RPL) would send the packet on to an address
                // we never judged.
                let ext = bytes_at::<4>(ctx, off, ip_end)?;
                if ext[3] != 0 {
                    return Err(ParseError::Frame);
                }
                next = ext[0];
                (ext[1] as usize + 1) * 8
            }
            IPV6_FRAGMENT => {
                // Two fragment headers would let the classifier and the reassembler disagree
                // about which one counts.
                if fragment_seen {
                    return Err(ParseError::Malformed);
                }
                fragment_seen = true;
                let ext = bytes_at::<8>(ctx, off, ip_end)?;
                next = ext[0];
                let frag = u16::from_be_bytes([ext[2], ext[3]]);
                packet.fragment_id = u32::from_be_bytes([ext[4], ext[5], ext[6], ext[7]]);
                packet.fragment = fragment_kind(frag & 0xfff8 != 0, frag & 1 != 0);
                8
            }
            // Hop-by-hop and destination options.
            _ => {
                let ext = bytes_at::<2>(ctx, off, ip_end)?;
                next = ext[0];
                (ext[1] as usize + 1) * 8
            }
        };
        off += len;
        // Keeps the offset bounded for the verifier; the header must end inside the packet.
        if off > 1024 || off > ip_end {
            return Err(ParseError::Malformed);
        }
    }
    Err(ParseError::Malformed)
}

#[inline(always)]
fn parse_l4(ctx: &TcContext, offset: usize, ip_end: usize, packet: &mut Packet) -> Result<(), ParseError> {
    match packet.tuple.protocol {
        proto::TCP => {
            let header = bytes_at::<20>(ctx, offset, ip_end)?;
            set_ports(packet, &header);
            if (header[12] >> 4) < 5 {
                return Err(ParseError::Malformed);
            }
            packet.tcp_flags = header[13];
            packet.opening = header[13] & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN;
        }
        proto::UDP => {
            let header = bytes_at::<8>(ctx, offset, ip_end)?;
            set_ports(packet, &header);
            packet.opening = true;
        }
        proto::SCTP => {
            // Common header (ports, verification tag, checksum) and the first chunk header.
            let header = bytes_at::<16>(ctx, offset, ip_end)?;
            set_ports(packet, &header);
            packet.opening = header[12] == SCTP_CHUNK_INIT && header[4..8] == [0; 4];
        }
        // ICMP is protocol 1 in IPv4 and 58 in IPv6; the other number is just another protocol.
        proto::ICMP if packet.family == family::IPV4 => parse_icmp(ctx, offset, ip_end, packet, false)?,
        proto::ICMPV6 if packet.family == family::IPV6 => parse_icmp(ctx, offset, ip_end, packet, true)?,
        // Other protocols have no ports; policies can still allow them with a rule that
        // names no ports (any protocol). They have no handshake either: any packet opens.
        _ => packet.opening = true,
    }
    Ok(())
}

#[inline(always)]
fn set_ports(packet: &mut Packet, header: &[u8]) {
    packet.tuple.sport = u16::from_be_bytes([header[0], header[1]]);
    packet.tuple.dport = u16::from_be_bytes([header[2], header[3]]);
}

#[inline(always)]
fn parse_icmp(ctx: &TcContext, offset: usize, ip_end: usize, packet: &mut Packet, v6: bool) -> Result<(), ParseError> {
    let header = bytes_at::<8>(ctx, offset, ip_end)?;
    let icmp_type = header[0];
    packet.icmp_type = icmp_type;
    let id = u16::from_be_bytes([header[4], header[5]]);
    let (echo_request, echo_reply, error, redirect) = if v6 {
        (icmp_type == ICMPV6_ECHO_REQUEST, icmp_type == ICMPV6_ECHO_REPLY, (1..=4).contains(&icmp_type), icmp_type == ICMPV6_REDIRECT)
    } else {
        (icmp_type == ICMP_ECHO_REQUEST, icmp_type == ICMP_ECHO_REPLY, matches!(icmp_type, 3 | 4 | 11 | 12), icmp_type == ICMP_REDIRECT)
    };
    // Pods are hosts: nobody may redirect their routes, and they redirect nobody's.
    if redirect {
        return Err(ParseError::Frame);
    }
    // Echo: the identifier plays the client's port, so request and reply share a tuple.
    if echo_request {
        packet.tuple.sport = id;
        packet.opening = true;
    } else if echo_reply {
        packet.tuple.dport = id;
    } else if error {
        let limit = if v6 { MAX_ICMPV6_CONTROL } else { MAX_ICMPV4_ERROR };
        // A fragmented error would carry past its bound in later fragments.
        if packet.ip_len > limit || packet.fragment != Fragment::None {
            return Err(ParseError::Frame);
        }
        packet.kind = Kind::IcmpError;
        parse_quoted(ctx, offset + 8, ip_end, packet, v6)?;
    } else if v6 && ((130..=136).contains(&icmp_type) || icmp_type == 143) {
        if packet.fragment != Fragment::None {
            return Err(ParseError::Frame);
        }
        packet.kind = Kind::LinkControl;
    }
    Ok(())
}

/// Parses the packet quoted in an ICMP error (the original packet, sent the other way) and
/// stores its reversed tuple, i.e. how a reply of that flow would look.
#[inline(always)]
fn parse_quoted(ctx: &TcContext, offset: usize, ip_end: usize, packet: &mut Packet, v6: bool) -> Result<(), ParseError> {
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    let (protocol, l4) = if v6 {
        let header = bytes_at::<40>(ctx, offset, ip_end)?;
        src.copy_from_slice(&header[8..24]);
        dst.copy_from_slice(&header[24..40]);
        (header[6], offset + 40)
    } else {
        let header = bytes_at::<20>(ctx, offset, ip_end)?;
        let ihl = ((header[0] & 0x0f) as usize) * 4;
        if ihl < 20 {
            return Err(ParseError::Malformed);
        }
        src[..4].copy_from_slice(&header[12..16]);
        dst[..4].copy_from_slice(&header[16..20]);
        (header[9], offset + ihl)
    };
    let (sport, dport) = match protocol {
        proto::TCP | proto::UDP | proto::SCTP => {
            let ports = bytes_at::<4>(ctx, l4, ip_end)?;
            (u16::from_be_bytes([ports[0], ports[1]]), u16::from_be_bytes([ports[2], ports[3]]))
        }
        proto::ICMP | proto::ICMPV6 if (protocol == proto::ICMPV6) == v6 => {
            // A quoted echo request: its identifier is the flow's client port.
            let header = bytes_at::<8>(ctx, l4, ip_end)?;
            let id = u16::from_be_bytes([header[4], header[5]]);
            let request = if v6 { ICMPV6_ECHO_REQUEST } else { ICMP_ECHO_REQUEST };
            if header[0] == request { (id, 0) } else { (0, id) }
        }
        _ => (0, 0),
    };
    packet.related = Tuple { protocol, src: dst, dst: src, sport: dport, dport: sport };
    Ok(())
}
