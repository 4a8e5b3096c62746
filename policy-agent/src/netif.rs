//! The node's network namespace as the agent sees it: its own addresses, and which
//! interface a pod's address is routed to (routed CNIs give each pod a /32 and /128 route
//! to its host-side veth). Everything is read from the namespace the agent runs in.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use crate::AgentError;

/// Addresses configured on this namespace's interfaces, without loopback and link-local
/// ones (they never appear as the source of node-to-pod traffic that policies judge).
pub fn node_addresses() -> Result<Vec<IpAddr>, AgentError> {
    let mut addrs = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list that we free below.
    if unsafe { libc::getifaddrs(&raw mut list) } != 0 {
        return Err(AgentError::Read { path: "getifaddrs".into(), source: std::io::Error::last_os_error() });
    }
    let mut cursor = list;
    while !cursor.is_null() {
        // SAFETY: cursor walks the list getifaddrs returned, which is valid until freed.
        let entry = unsafe { &*cursor };
        cursor = entry.ifa_next;
        if entry.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_addr is non-null and its family says which sockaddr it is.
        let addr = unsafe {
            match i32::from((*entry.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sin = &*entry.ifa_addr.cast::<libc::sockaddr_in>();
                    IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
                }
                libc::AF_INET6 => {
                    let sin6 = &*entry.ifa_addr.cast::<libc::sockaddr_in6>();
                    IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
                }
                _ => continue,
            }
        };
        let link_local = match addr {
            IpAddr::V4(a) => a.is_link_local(),
            IpAddr::V6(a) => a.segments()[0] & 0xffc0 == 0xfe80,
        };
        if !addr.is_loopback() && !link_local && !addrs.contains(&addr) {
            addrs.push(addr);
        }
    }
    // SAFETY: the list came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    addrs.sort();
    Ok(addrs)
}

/// A route of the main table: destination prefix and output interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub destination: IpAddr,
    pub prefix_len: u8,
    pub interface: String,
}

/// Reads the IPv4 and IPv6 routes of this network namespace from /proc/self/net.
pub fn routes() -> Result<Vec<Route>, AgentError> {
    let mut routes = Vec::new();
    let v4 = Path::new("/proc/self/net/route");
    let text = std::fs::read_to_string(v4).map_err(|source| AgentError::Read { path: v4.into(), source })?;
    routes.extend(parse_ipv4_routes(&text));
    let v6 = Path::new("/proc/self/net/ipv6_route");
    // A kernel without IPv6 has no such file: no IPv6 routes.
    if let Ok(text) = std::fs::read_to_string(v6) {
        routes.extend(parse_ipv6_routes(&text));
    }
    Ok(routes)
}

fn parse_ipv4_routes(text: &str) -> Vec<Route> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (iface, dest, mask) = (fields.first()?, fields.get(1)?, fields.get(7)?);
            // Little-endian hex of the network-order address, as the kernel prints it.
            let dest = u32::from_str_radix(dest, 16).ok()?.to_le_bytes();
            let mask = u32::from_str_radix(mask, 16).ok()?;
            Some(Route { destination: IpAddr::V4(Ipv4Addr::from(dest)), prefix_len: mask.count_ones() as u8, interface: (*iface).to_owned() })
        })
        .collect()
}

fn parse_ipv6_routes(text: &str) -> Vec<Route> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (dest, len, iface) = (fields.first()?, fields.get(1)?, fields.get(9)?);
            let dest = u128::from_str_radix(dest, 16).ok()?;
            let len = u8::from_str_radix(len, 16).ok()?;
            if *iface == "lo" {
                return None;
            }
            Some(Route { destination: IpAddr::V6(Ipv6Addr::from(dest)), prefix_len: len, interface: (*iface).to_owned() })
        })
        .collect()
}

/// The interface of the most specific non-default route covering `addr`.
pub fn interface_for(routes: &[Route], addr: IpAddr) -> Option<&str> {
    routes
        .iter()
        .filter(|r| r.prefix_len > 0 && covers(r.destination, r.prefix_len, addr))
        .max_by_key(|r| r.prefix_len)
        .map(|r| r.interface.as_str())
}

fn covers(network: IpAddr, len: u8, addr: IpAddr) -> bool {
    match (network, addr) {
        (IpAddr::V4(n), IpAddr::V4(a)) => {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len.min(32))) };
            u32::from(n) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) => {
            let mask = if len == 0 { 0 } else { u128::MAX << (128 - u32::from(len.min(128))) };
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

/// The index of an interface in this namespace, if it exists.
pub fn ifindex(name: &str) -> Option<u32> {
    let c_name = std::ffi::CString::new(name).ok()?;
    // SAFETY: a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    (index != 0).then_some(index)
}

/// The name of an interface index in this namespace.
pub fn ifname(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer has IF_NAMESIZE bytes, as if_indextoname requires.
    let ptr = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if ptr.is_null() {
        return None;
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into buf.
    Some(unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned())
}

/// Sets a link administratively up or down (SIOCSIFFLAGS).
pub fn set_link_up(name: &str, up: bool) -> Result<(), AgentError> {
    let err = |source| AgentError::Read { path: format!("link {name}").into(), source };
    let (socket, mut req) = ifreq(name).map_err(err)?;
    // SAFETY: a valid socket and an ifreq naming the interface.
    unsafe {
        if libc::ioctl(socket, libc::SIOCGIFFLAGS, &raw mut req) < 0 {
            let e = std::io::Error::last_os_error();
            libc::close(socket);
            return Err(err(e));
        }
        let flags = req.ifr_ifru.ifru_flags;
        let up_flag = libc::IFF_UP as libc::c_short;
        req.ifr_ifru.ifru_flags = if up { flags | up_flag } else { flags & !up_flag };
        let rc = libc::ioctl(socket, libc::SIOCSIFFLAGS, &raw mut req);
        let e = std::io::Error::last_os_error();
        libc::close(socket);
        if rc < 0 {
            return Err(err(e));
        }
    }
    Ok(())
}

fn ifreq(name: &str) -> Result<(libc::c_int, libc::ifreq), std::io::Error> {
    if name.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    // SAFETY: ifreq is plain data; zero is a valid start.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: a plain socket for ioctls.
    let socket = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if socket < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((socket, req))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_routes_and_picks_the_most_specific() {
        let v4 = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                  eth0\t00000000\t010012C6\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                  vetha\t0A0012C6\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n\
                  eth0\t000012C6\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n";
        let v6 = "20010002000000100000000000000001 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000001    vetha\n\
                  00000000000000000000000000000000 00 00000000000000000000000000000000 00 20010002000000000000000000000001 00000400 00000001 00000000 00000003     eth0\n";
        let mut routes = parse_ipv4_routes(v4);
        routes.extend(parse_ipv6_routes(v6));
        assert_eq!(interface_for(&routes, "198.18.0.10".parse().unwrap()), Some("vetha"));
        assert_eq!(interface_for(&routes, "198.18.0.11".parse().unwrap()), Some("eth0"), "the /16");
        assert_eq!(interface_for(&routes, "198.19.0.11".parse().unwrap()), None, "only the default route");
        assert_eq!(interface_for(&routes, "2001:2:0:10::1".parse().unwrap()), Some("vetha"));
        assert_eq!(interface_for(&routes, "2001:2:0:10::2".parse().unwrap()), None);
    }
}
