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
    let mut addrs: Vec<IpAddr> = interface_addresses()?.into_iter().map(|a| a.addr).collect();
    addrs.sort();
    addrs.dedup();
    Ok(addrs)
}

/// One address of one interface, with its prefix length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceAddress {
    pub interface: String,
    pub addr: IpAddr,
    pub prefix_len: u8,
}

/// Every address of this namespace's interfaces, without loopback and link-local ones.
pub fn interface_addresses() -> Result<Vec<InterfaceAddress>, AgentError> {
    let mut addrs = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list that we free below.
    if unsafe { libc::getifaddrs(&raw mut list) } != 0 {
        return Err(AgentError::Syscall { what: "getifaddrs".into(), source: std::io::Error::last_os_error() });
    }
    let mut cursor = list;
    while !cursor.is_null() {
        // SAFETY: cursor walks the list getifaddrs returned, which is valid until freed.
        let entry = unsafe { &*cursor };
        cursor = entry.ifa_next;
        // SAFETY: the pointers come from getifaddrs and are null or valid.
        let Some((addr, prefix_len)) = (unsafe { sockaddr_ip(entry.ifa_addr) })
            .map(|addr| (addr, unsafe { sockaddr_ip(entry.ifa_netmask) }.map_or(max_len(addr), mask_len)))
        else {
            continue;
        };
        let link_local = match addr {
            IpAddr::V4(a) => a.is_link_local(),
            IpAddr::V6(a) => a.segments()[0] & 0xffc0 == 0xfe80,
        };
        if addr.is_loopback() || link_local {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string valid until the list is freed.
        let interface = unsafe { std::ffi::CStr::from_ptr(entry.ifa_name) }.to_string_lossy().into_owned();
        addrs.push(InterfaceAddress { interface, addr, prefix_len });
    }
    // SAFETY: the list came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    Ok(addrs)
}

/// The address in a sockaddr, if it is IPv4 or IPv6.
///
/// # Safety
/// `sa` is null or points to a sockaddr whose family says which sockaddr it is.
unsafe fn sockaddr_ip(sa: *const libc::sockaddr) -> Option<IpAddr> {
    if sa.is_null() {
        return None;
    }
    // SAFETY: non-null, and the family tells the concrete type (the caller's contract).
    unsafe {
        match i32::from((*sa).sa_family) {
            libc::AF_INET => {
                let sin = &*sa.cast::<libc::sockaddr_in>();
                Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))))
            }
            libc::AF_INET6 => {
                let sin6 = &*sa.cast::<libc::sockaddr_in6>();
                Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
            }
            _ => None,
        }
    }
}

fn mask_len(mask: IpAddr) -> u8 {
    let ones = match mask {
        IpAddr::V4(m) => u32::from(m).leading_ones(),
        IpAddr::V6(m) => u128::from(m).leading_ones(),
    };
    u8::try_from(ones).unwrap_or(u8::MAX)
}

const fn max_len(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
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
    routes_from(Path::new("/proc/self/net/route"), Path::new("/proc/self/net/ipv6_route"))
}

/// Reads the routes from these files. Any read error is an error (the caller then keeps
/// everything as it is), except a missing IPv6 file: a kernel without IPv6 has no such
/// file, and no IPv6 routes.
fn routes_from(v4: &Path, v6: &Path) -> Result<Vec<Route>, AgentError> {
    let text = std::fs::read_to_string(v4).map_err(|source| AgentError::Read { path: v4.into(), source })?;
    let mut routes = parse_ipv4_routes(&text);
    match std::fs::read_to_string(v6) {
        Ok(text) => routes.extend(parse_ipv6_routes(&text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(AgentError::Read { path: v6.into(), source }),
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

/// The interface of the host route (/32, /128) to exactly `addr`, as routed CNIs install
/// them. A covering route is never used: it leads to an uplink or a bridge that other
/// traffic shares. Host routes to one address over different interfaces: none (ambiguous).
pub fn host_route_interface(routes: &[Route], addr: IpAddr) -> Option<&str> {
    let mut found = routes.iter().filter(|r| r.prefix_len == max_len(addr) && r.destination == addr).map(|r| r.interface.as_str());
    let first = found.next()?;
    found.all(|other| other == first).then_some(first)
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
    let err = |source| AgentError::Syscall { what: format!("set link {name} {}", if up { "up" } else { "down" }), source };
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

/// Whether an interface is a veth (its ethtool driver is `veth`), as a pod's host side is.
pub fn is_veth(name: &str) -> Result<bool, AgentError> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GDRVINFO: u32 = 3;
    /// `struct ethtool_drvinfo` of linux/ethtool.h.
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        counts: [u32; 5],
    }
    let err = |source| AgentError::Syscall { what: format!("ethtool driver info of {name}"), source };
    let (socket, mut req) = ifreq(name).map_err(err)?;
    // SAFETY: plain data; zero is a valid start.
    let mut info: DrvInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    req.ifr_ifru.ifru_data = (&raw mut info).cast();
    // SAFETY: a valid socket, an ifreq naming the interface and pointing at a drvinfo that
    // outlives the call.
    let rc = unsafe { libc::ioctl(socket, SIOCETHTOOL as _, &raw mut req) };
    let e = std::io::Error::last_os_error();
    // SAFETY: the socket is ours and closed once.
    unsafe { libc::close(socket) };
    if rc < 0 {
        // Interfaces without ethtool support (lo, some virtual ones) are not veths.
        return if e.raw_os_error() == Some(libc::EOPNOTSUPP) { Ok(false) } else { Err(err(e)) };
    }
    let driver = info.driver.split(|b| *b == 0).next().unwrap_or_default();
    Ok(driver == b"veth")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_routes_and_takes_only_host_routes() {
        let v4 = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                  eth0\t00000000\t010012C6\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                  vetha\t0A0012C6\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n\
                  eth0\t000012C6\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n\
                  vethb\t0C0012C6\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n\
                  vethc\t0C0012C6\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n";
        let v6 = "20010002000000100000000000000001 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000001    vetha\n\
                  20010002000000100000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000001     eth0\n\
                  00000000000000000000000000000000 00 00000000000000000000000000000000 00 20010002000000000000000000000001 00000400 00000001 00000000 00000003     eth0\n";
        let mut routes = parse_ipv4_routes(v4);
        routes.extend(parse_ipv6_routes(v6));
        assert_eq!(host_route_interface(&routes, "198.18.0.10".parse().unwrap()), Some("vetha"));
        assert_eq!(host_route_interface(&routes, "198.18.0.11".parse().unwrap()), None, "a covering /16 is never used");
        assert_eq!(host_route_interface(&routes, "198.19.0.11".parse().unwrap()), None, "nor the default route");
        assert_eq!(host_route_interface(&routes, "198.18.0.12".parse().unwrap()), None, "two devices: ambiguous");
        assert_eq!(host_route_interface(&routes, "2001:2:0:10::1".parse().unwrap()), Some("vetha"));
        assert_eq!(host_route_interface(&routes, "2001:2:0:10::2".parse().unwrap()), None, "a covering /64 is never used");
    }

    #[test]
    fn a_route_read_error_is_an_error() {
        let dir = std::env::temp_dir().join(format!("netif-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let v4 = dir.join("route");
        std::fs::write(&v4, "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n").unwrap();
        assert!(routes_from(&dir.join("missing"), &dir.join("missing6")).is_err(), "no IPv4 routes file");
        assert_eq!(routes_from(&v4, &dir.join("missing6")).unwrap(), Vec::new(), "no IPv6 in this kernel");
        // A directory cannot be read as a file: an error, never "no routes".
        assert!(routes_from(&v4, &dir).is_err(), "an unreadable IPv6 routes file");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn loopback_is_not_a_veth() {
        assert!(!is_veth("lo").unwrap_or(false));
    }
}
