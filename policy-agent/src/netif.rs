//! The node's network namespace as the agent sees it: its own addresses, and which
//! interface a pod's address is routed to (routed CNIs give each pod a /32 and /128 route
//! to its host-side veth). Everything is read from the namespace the agent runs in: links
//! and routes over netlink, and [`HostEvents`] wakes the agent when any of them changes.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
    time::Duration,
};

use rtnetlink::{
    packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_EXCL, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload},
    packet_route::{
        AddressFamily, RouteNetlinkMessage,
        link::{LinkAttribute, LinkMessage},
        neighbour::{NeighbourMessage, NeighbourState},
        route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol},
    },
    constants::{RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_IFADDR, RTMGRP_IPV6_ROUTE, RTMGRP_LINK},
    sys::{AsyncSocket as _, AsyncSocketExt as _, Socket, SocketAddr, TokioSocket, protocols::NETLINK_ROUTE},
};
use tokio::sync::Notify;

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

/// Reads the IPv4 and IPv6 routes of the main table over netlink (a link dump names the
/// output interfaces). Any error is an error: the caller then keeps everything as it is.
pub fn routes() -> Result<Vec<Route>, AgentError> {
    let names = links()?;
    let dumped = dump(RouteNetlinkMessage::GetRoute(RouteMessage::default()), "route")?;
    Ok(dumped
        .iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewRoute(route) => route_of(route, &names),
            _ => None,
        })
        .collect())
}

/// The interfaces of this namespace over netlink: index to name.
pub fn links() -> Result<BTreeMap<u32, String>, AgentError> {
    let dumped = dump(RouteNetlinkMessage::GetLink(LinkMessage::default()), "link")?;
    Ok(dumped
        .iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewLink(link) => link_of(link),
            _ => None,
        })
        .collect())
}

/// The index and name of a link message.
fn link_of(link: &LinkMessage) -> Option<(u32, String)> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some((link.header.index, name.clone())),
        _ => None,
    })
}

/// A route of the main table as the agent uses it, with its output interface named. Routes
/// over `lo` (IPv6 unreachable routes) and routes without an output interface (nexthop
/// objects) or one that is gone by now are left out, as /proc/net listed them.
fn route_of(route: &RouteMessage, names: &BTreeMap<u32, String>) -> Option<Route> {
    let table = route.attributes.iter().find_map(|a| if let RouteAttribute::Table(t) = a { Some(*t) } else { None });
    if table.unwrap_or(u32::from(route.header.table)) != u32::from(RouteHeader::RT_TABLE_MAIN) {
        return None;
    }
    let unspecified = match route.header.address_family {
        AddressFamily::Inet => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        AddressFamily::Inet6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        _ => return None,
    };
    let mut destination = unspecified;
    let mut oif = None;
    for attribute in &route.attributes {
        match attribute {
            RouteAttribute::Destination(RouteAddress::Inet(a)) => destination = IpAddr::V4(*a),
            RouteAttribute::Destination(RouteAddress::Inet6(a)) => destination = IpAddr::V6(*a),
            RouteAttribute::Oif(index) => oif = Some(*index),
            // The first hop's device, as /proc/net/route shows a multipath route.
            RouteAttribute::MultiPath(hops) => oif = oif.or(hops.first().map(|h| h.interface_index)),
            _ => {}
        }
    }
    let interface = names.get(&oif?)?;
    (interface != "lo").then(|| Route { destination, prefix_len: route.header.destination_prefix_length, interface: interface.clone() })
}

/// What a CNI configured on a pod's host-side link and the kernel deletes when the link
/// goes down: its routes and its permanent neighbour entries (IPv6 addresses go too, unless
/// `keep_addr_on_down`), kept to be put back, since the CNI will not add them again.
#[derive(Clone, Debug, Default)]
pub struct SavedLink {
    routes: Vec<RouteMessage>,
    neighbours: Vec<NeighbourMessage>,
    /// The link's `keep_addr_on_down` before the agent set it (None: no IPv6 on the link).
    keep_addr_on_down: Option<String>,
}

impl SavedLink {
    /// How many routes and neighbour entries will be put back.
    pub fn entries(&self) -> usize {
        self.routes.len() + self.neighbours.len()
    }
}

/// The local table's id: its routes (the interface's own addresses) come back with the link.
const RT_TABLE_LOCAL: u32 = 255;

/// Saves what [`restore_link`] puts back, and makes the link keep its IPv6 addresses while
/// it is down. Call it right before setting the link down.
pub fn save_link(ifname: &str, ifindex: u32) -> Result<SavedLink, AgentError> {
    let routes = dump(RouteNetlinkMessage::GetRoute(RouteMessage::default()), "route")?
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewRoute(route) if is_added_route_through(&route, ifindex) => Some(route),
            _ => None,
        })
        .collect();
    let neighbours = dump(RouteNetlinkMessage::GetNeighbour(NeighbourMessage::default()), "neighbour")?
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewNeighbour(n) if n.header.ifindex == ifindex && n.header.state == NeighbourState::Permanent => Some(n),
            _ => None,
        })
        .collect();
    let keep_addr_on_down = set_keep_addr_on_down(ifname, "1")?;
    Ok(SavedLink { routes, neighbours, keep_addr_on_down })
}

/// Sets the link's IPv6 `keep_addr_on_down`; returns the value it had (None without IPv6).
fn set_keep_addr_on_down(ifname: &str, value: &str) -> Result<Option<String>, AgentError> {
    let path = std::path::PathBuf::from(format!("/proc/sys/net/ipv6/conf/{ifname}/keep_addr_on_down"));
    let old = match std::fs::read_to_string(&path) {
        Ok(old) => old.trim().to_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(AgentError::Read { path, source }),
    };
    std::fs::write(&path, value).map_err(|source| AgentError::Write { path, source })?;
    Ok(Some(old))
}

/// Whether a route goes out of `ifindex` and was added by someone (not made by the kernel
/// for an address or a link, which it makes again when the link comes up).
fn is_added_route_through(route: &RouteMessage, ifindex: u32) -> bool {
    let table = route.attributes.iter().find_map(|a| if let RouteAttribute::Table(t) = a { Some(*t) } else { None });
    let through = route.attributes.iter().any(|a| matches!(a, RouteAttribute::Oif(i) if *i == ifindex));
    through && route.header.protocol != RouteProtocol::Kernel && table.unwrap_or(u32::from(route.header.table)) != RT_TABLE_LOCAL
}

/// Puts back what [`save_link`] saved, once the link is up again: neighbours first, so the
/// routes resolve at once. An entry that exists already (re-added by someone) is fine.
pub fn restore_link(ifname: &str, saved: &SavedLink) -> Result<(), AgentError> {
    let add = |payload, what: &str| match request(payload, NLM_F_CREATE | NLM_F_EXCL) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        result => result.map_err(|source| AgentError::Netlink { what: format!("{what} restore on {ifname}"), source }),
    };
    for neighbour in &saved.neighbours {
        add(RouteNetlinkMessage::NewNeighbour(neighbour.clone()), "neighbour")?;
    }
    for route in &saved.routes {
        add(RouteNetlinkMessage::NewRoute(route.clone()), "route")?;
    }
    if let Some(old) = &saved.keep_addr_on_down {
        set_keep_addr_on_down(ifname, old)?;
    }
    Ok(())
}

/// Sends one request and waits for the kernel's acknowledgement.
fn request(payload: RouteNetlinkMessage, flags: u16) -> Result<(), std::io::Error> {
    let socket = send(payload, NLM_F_ACK | flags)?;
    loop {
        let (chunk, _) = socket.recv_from_full()?;
        let answer = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&chunk).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
        if let NetlinkPayload::Error(e) = answer.payload {
            return if e.code.is_some() { Err(e.to_io()) } else { Ok(()) };
        }
    }
}

/// How often a dump the kernel marks interrupted (the table changed while it was read) is
/// read again before the pass gives up.
const DUMP_TRIES: usize = 3;

/// A full dump of `request`'s kind over a fresh netlink socket.
fn dump(request: RouteNetlinkMessage, what: &'static str) -> Result<Vec<RouteNetlinkMessage>, AgentError> {
    for _ in 1..DUMP_TRIES {
        let (messages, interrupted) = dump_once(request.clone(), what)?;
        if !interrupted {
            return Ok(messages);
        }
        tracing::debug!(what, "netlink dump interrupted by a change; reading again");
    }
    match dump_once(request, what)? {
        (messages, false) => Ok(messages),
        (_, true) => Err(netlink_err(what, std::io::Error::new(std::io::ErrorKind::Interrupted, "dump interrupted by changes, repeatedly"))),
    }
}

fn netlink_err(what: &'static str, source: std::io::Error) -> AgentError {
    AgentError::Netlink { what: format!("{what} dump"), source }
}

/// How long one dump may wait for the kernel's next answer before the pass is skipped.
const DUMP_TIMEOUT: libc::timeval = libc::timeval { tv_sec: 2, tv_usec: 0 };

/// One dump: the messages, and whether the kernel flagged the dump inconsistent.
fn dump_once(request: RouteNetlinkMessage, what: &'static str) -> Result<(Vec<RouteNetlinkMessage>, bool), AgentError> {
    let err = |e| netlink_err(what, e);
    let socket = send(request, NLM_F_DUMP).map_err(err)?;
    let mut dumped = Dumped::default();
    while !dumped.done {
        let (chunk, _) = socket.recv_from_full().map_err(err)?;
        dumped.add(&chunk).map_err(err)?;
    }
    Ok((dumped.messages, dumped.interrupted))
}

/// Sends one request with `flags` on a fresh netlink socket (answers time out after
/// `DUMP_TIMEOUT`), which is returned for reading the answer.
fn send(payload: RouteNetlinkMessage, flags: u16) -> Result<Socket, std::io::Error> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    set_receive_timeout(&socket)?;
    let mut message = NetlinkMessage::from(payload);
    message.header.flags = NLM_F_REQUEST | flags;
    message.header.sequence_number = DUMP_SEQUENCE;
    message.finalize();
    let mut buf = vec![0; message.buffer_len()];
    message.serialize(&mut buf);
    socket.send(&buf, 0)?;
    Ok(socket)
}

fn set_receive_timeout(socket: &Socket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let size = std::mem::size_of::<libc::timeval>() as libc::socklen_t;
    let timeout = DUMP_TIMEOUT;
    // SAFETY: a valid socket and a timeval that outlives the call.
    let rc = unsafe { libc::setsockopt(socket.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVTIMEO, (&raw const timeout).cast(), size) };
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

/// The sequence number of the agent's netlink requests (one request per socket).
const DUMP_SEQUENCE: u32 = 1;

/// The answer to a dump as it arrives, one datagram at a time.
#[derive(Default)]
struct Dumped {
    messages: Vec<RouteNetlinkMessage>,
    interrupted: bool,
    done: bool,
}

impl Dumped {
    /// Decodes one datagram of netlink messages. A kernel error or a message that does not
    /// decode is an error: a dump with holes would make pods look gone.
    fn add(&mut self, mut chunk: &[u8]) -> Result<(), std::io::Error> {
        let bad = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        while !chunk.is_empty() && !self.done {
            let message = NetlinkMessage::<RouteNetlinkMessage>::deserialize(chunk).map_err(|e| bad(e.to_string()))?;
            let len = (message.header.length as usize).next_multiple_of(4);
            if len == 0 {
                return Err(bad("netlink message of length 0".into()));
            }
            chunk = chunk.get(len..).unwrap_or_default();
            if message.header.sequence_number != DUMP_SEQUENCE {
                continue;
            }
            self.interrupted |= message.header.flags & NLM_F_DUMP_INTR != 0;
            match message.payload {
                NetlinkPayload::InnerMessage(inner) => self.messages.push(inner),
                NetlinkPayload::Done(_) => self.done = true,
                NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                NetlinkPayload::Overrun(_) => return Err(bad("netlink overrun".into())),
                // Acks, no-ops and future kinds carry no routes or links.
                _ => {}
            }
        }
        Ok(())
    }
}

/// Wakes the agent when a link, address or route of this namespace changes: a netlink
/// socket bound to the link, IPv4/IPv6 address and IPv4/IPv6 route groups. Events carry no
/// state the agent uses; each one only says "read again", so a burst is one wake-up and a
/// lost event (an overflowed socket) costs nothing but a pass.
pub struct HostEvents {
    wake: Arc<Notify>,
}

/// The rtnetlink groups whose changes can move a pod's placement or the node's addresses.
const HOST_GROUPS: u32 = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE;

/// Receive buffer asked for: a CNI creating many pods at once sends bursts of messages.
const EVENTS_BUFFER: usize = 4 << 20;

/// How long a failed subscription waits before it is opened again (the periodic resync
/// covers the time between).
const RESUBSCRIBE: Duration = Duration::from_secs(1);

impl HostEvents {
    /// Subscribes now, so that no change made after this call is missed by the next pass,
    /// and listens in a task. If subscribing fails, the task keeps trying.
    pub fn start() -> Self {
        let wake = Arc::new(Notify::new());
        let first = subscribe();
        if let Err(e) = &first {
            tracing::error!(error = %e, "cannot subscribe to link and route changes; relying on the periodic resync until it works");
        }
        tokio::spawn(listen(first.ok(), wake.clone()));
        Self { wake }
    }

    /// Waits until something changed since the last wake-up (at once if it already has).
    pub async fn changed(&self) {
        self.wake.notified().await;
    }
}

fn subscribe() -> Result<TokioSocket, AgentError> {
    let err = |source| AgentError::Netlink { what: "subscribe to link, address and route changes".into(), source };
    let mut socket = TokioSocket::new(NETLINK_ROUTE).map_err(err)?;
    socket.socket_mut().bind(&SocketAddr::new(0, HOST_GROUPS)).map_err(err)?;
    if let Err(e) = socket.socket_ref().set_rx_buf_sz(EVENTS_BUFFER) {
        tracing::debug!(error = %e, "cannot raise the netlink receive buffer");
    }
    Ok(socket)
}

/// Reads events until the socket fails, then subscribes again; every event, overflow or
/// failure wakes the agent, which then reads everything afresh.
async fn listen(mut socket: Option<TokioSocket>, wake: Arc<Notify>) {
    loop {
        if let Some(open) = &socket {
            let error = receive(open, &wake).await;
            tracing::warn!(error = %error, "link and route subscription failed; full resync, subscribing again");
            wake.notify_one();
        }
        tokio::time::sleep(RESUBSCRIBE).await;
        socket = match subscribe() {
            Ok(open) => {
                tracing::info!("subscribed to link and route changes again");
                // Changes made while there was no subscription.
                wake.notify_one();
                Some(open)
            }
            Err(e) => {
                tracing::debug!(error = %e, "still cannot subscribe to link and route changes");
                None
            }
        };
    }
}

/// Wakes the agent once per burst: after the first datagram, everything already queued is
/// read before the wake-up. Returns the error that ended the socket.
async fn receive(socket: &TokioSocket, wake: &Notify) -> std::io::Error {
    loop {
        match socket.recv_from_full().await {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => overflowed(),
            Err(e) => return e,
        }
        loop {
            match socket.socket_ref().recv_from_full() {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => overflowed(),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return e,
            }
        }
        wake.notify_one();
    }
}

/// Events were lost: the wake-up that follows reads everything, which is all a full resync is.
fn overflowed() {
    tracing::warn!("link and route events overflowed the socket (ENOBUFS); full resync");
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

    fn names() -> BTreeMap<u32, String> {
        [(1, "lo"), (2, "eth0"), (3, "vetha"), (4, "vethb"), (5, "vethc")].into_iter().map(|(i, n)| (i, n.to_owned())).collect()
    }

    /// A main-table route message as the kernel sends it.
    fn message(destination: Option<IpAddr>, prefix_len: u8, oif: u32) -> RouteMessage {
        let mut m = RouteMessage::default();
        m.header.address_family = if destination.is_some_and(|d| d.is_ipv6()) { AddressFamily::Inet6 } else { AddressFamily::Inet };
        m.header.destination_prefix_length = prefix_len;
        m.header.table = RouteHeader::RT_TABLE_MAIN;
        m.attributes.push(RouteAttribute::Table(u32::from(RouteHeader::RT_TABLE_MAIN)));
        if let Some(d) = destination {
            m.attributes.push(RouteAttribute::Destination(d.into()));
        }
        m.attributes.push(RouteAttribute::Oif(oif));
        m
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn decodes_netlink_routes_and_takes_only_host_routes() {
        let messages = [
            message(None, 0, 2),
            message(Some(ip("198.18.0.10")), 32, 3),
            message(Some(ip("198.18.0.0")), 16, 2),
            message(Some(ip("198.18.0.12")), 32, 4),
            message(Some(ip("198.18.0.12")), 32, 5),
            message(Some(ip("2001:2:0:10::1")), 128, 3),
            message(Some(ip("2001:2:0:10::")), 64, 2),
            message(None, 0, 2),
        ];
        let routes: Vec<Route> = messages.iter().filter_map(|m| route_of(m, &names())).collect();
        assert_eq!(routes[0], Route { destination: ip("0.0.0.0"), prefix_len: 0, interface: "eth0".into() }, "no destination: the default route");
        assert_eq!(host_route_interface(&routes, ip("198.18.0.10")), Some("vetha"));
        assert_eq!(host_route_interface(&routes, ip("198.18.0.11")), None, "a covering /16 is never used");
        assert_eq!(host_route_interface(&routes, ip("198.19.0.11")), None, "nor the default route");
        assert_eq!(host_route_interface(&routes, ip("198.18.0.12")), None, "two devices: ambiguous");
        assert_eq!(host_route_interface(&routes, ip("2001:2:0:10::1")), Some("vetha"));
        assert_eq!(host_route_interface(&routes, ip("2001:2:0:10::2")), None, "a covering /64 is never used");
    }

    #[test]
    fn other_tables_loopback_and_vanished_links_are_left_out() {
        let mut local = message(Some(ip("198.18.0.10")), 32, 3);
        local.header.table = 255;
        local.attributes.retain(|a| !matches!(a, RouteAttribute::Table(_)));
        assert_eq!(route_of(&local, &names()), None, "the local table");
        let mut big_table = message(Some(ip("198.18.0.10")), 32, 3);
        big_table.attributes.retain(|a| !matches!(a, RouteAttribute::Table(_)));
        big_table.attributes.push(RouteAttribute::Table(1000));
        assert_eq!(route_of(&big_table, &names()), None, "a table above 255 (only in the attribute)");
        assert_eq!(route_of(&message(Some(ip("2001:2::1")), 128, 1), &names()), None, "over lo");
        assert_eq!(route_of(&message(Some(ip("198.18.0.10")), 32, 99), &names()), None, "a link gone since the link dump");
        let mut no_oif = message(Some(ip("198.18.0.10")), 32, 3);
        no_oif.attributes.retain(|a| !matches!(a, RouteAttribute::Oif(_)));
        assert_eq!(route_of(&no_oif, &names()), None, "no output interface");
    }

    fn datagram(messages: Vec<(RouteNetlinkMessage, u16)>, done: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let mut payloads: Vec<(NetlinkPayload<RouteNetlinkMessage>, u16)> = messages.into_iter().map(|(m, f)| (NetlinkPayload::InnerMessage(m), f)).collect();
        if done {
            payloads.push((NetlinkPayload::Done(rtnetlink::packet_core::DoneMessage::default()), 0));
        }
        for (payload, flags) in payloads {
            let mut m = NetlinkMessage::new(rtnetlink::packet_core::NetlinkHeader::default(), payload);
            m.header.sequence_number = DUMP_SEQUENCE;
            m.header.flags = flags | rtnetlink::packet_core::NLM_F_MULTIPART;
            m.finalize();
            let mut buf = vec![0; m.buffer_len()];
            m.serialize(&mut buf);
            out.extend(buf);
        }
        out
    }

    #[test]
    fn a_dump_is_read_to_its_end_and_flags_interruptions() {
        let route = |last: u8| RouteNetlinkMessage::NewRoute(message(Some(IpAddr::V4(Ipv4Addr::new(198, 18, 0, last))), 32, 3));
        let mut dumped = Dumped::default();
        dumped.add(&datagram(vec![(route(1), 0), (route(2), 0)], false)).unwrap();
        assert!(!dumped.done, "more datagrams follow");
        dumped.add(&datagram(vec![(route(3), NLM_F_DUMP_INTR)], true)).unwrap();
        assert!(dumped.done && dumped.interrupted);
        assert_eq!(dumped.messages.len(), 3);
        let mut garbage = datagram(vec![(route(1), 0)], false);
        garbage.truncate(garbage.len() - 8);
        assert!(Dumped::default().add(&garbage).is_err(), "a message that does not decode is an error, not a shorter dump");
    }

    #[test]
    fn a_kernel_error_ends_the_dump_with_an_error() {
        let mut error = rtnetlink::packet_core::ErrorMessage::default();
        error.code = std::num::NonZeroI32::new(-libc::EPERM);
        let mut m = NetlinkMessage::<RouteNetlinkMessage>::new(rtnetlink::packet_core::NetlinkHeader::default(), NetlinkPayload::Error(error));
        m.header.sequence_number = DUMP_SEQUENCE;
        m.finalize();
        let mut buf = vec![0; m.buffer_len()];
        m.serialize(&mut buf);
        let e = Dumped::default().add(&buf).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
    }

    #[test]
    fn reads_this_namespaces_links_and_routes() {
        // Unprivileged and in any namespace: lo exists, and the dumps decode.
        let links = links().unwrap();
        assert!(links.values().any(|n| n == "lo"), "{links:?}");
        routes().unwrap();
    }

    #[test]
    fn loopback_is_not_a_veth() {
        assert!(!is_veth("lo").unwrap_or(false));
    }
}
