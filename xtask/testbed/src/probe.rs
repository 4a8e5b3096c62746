//! Bounded probes: every server stops after its deadline, every client after its timeout.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use super::Netns;

/// Servers in a pod namespace (TCP and UDP echo on the given ports, both families), running
/// until dropped or `lifetime` passes. A named server answers the request `who` (TCP
/// `who\n`) with its name instead, so a probe through a Service learns which backend it
/// reached; every other request is echoed.
pub struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Servers {
    pub fn start(ns: &Netns, ports: &[u16], lifetime: Duration) -> Self {
        Self::start_named(ns, ports, lifetime, "")
    }

    /// Servers that answer `who` with `name` (empty: echo it like any request).
    pub fn start_named(ns: &Netns, ports: &[u16], lifetime: Duration, name: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let deadline = Instant::now() + lifetime;
        let mut threads = Vec::new();
        for &port in ports {
            for any in [IpAddr::from([0u8; 4]), IpAddr::from([0u16; 8])] {
                let (s1, s2) = (stop.clone(), stop.clone());
                let (name_tcp, name_udp) = (Answer::new(name), Answer::new(name));
                let (ready_tx, ready_rx) = std::sync::mpsc::channel();
                let ready_udp = ready_tx.clone();
                threads.push(ns.spawn(move || tcp_server(SocketAddr::new(any, port), &s1, deadline, &ready_tx, &name_tcp)));
                threads.push(ns.spawn(move || udp_server(SocketAddr::new(any, port), &s2, deadline, &ready_udp, &name_udp)));
                for _ in 0..2 {
                    ready_rx.recv_timeout(Duration::from_secs(5)).expect("server ready");
                }
            }
        }
        Self { stop, threads }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// What a server sends back for a request: its name for `who`, else the request itself.
struct Answer {
    name: Vec<u8>,
}

impl Answer {
    fn new(name: &str) -> Self {
        Self { name: name.as_bytes().to_vec() }
    }

    fn to(&self, request: &[u8]) -> Vec<u8> {
        match request {
            b"who" if !self.name.is_empty() => self.name.clone(),
            b"who\n" if !self.name.is_empty() => [self.name.as_slice(), b"\n"].concat(),
            _ => request.to_vec(),
        }
    }
}

fn v6only(addr: &SocketAddr, fd: i32) {
    if addr.is_ipv6() {
        let one: libc::c_int = 1;
        // SAFETY: a valid socket and option buffer.
        unsafe {
            libc::setsockopt(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, (&raw const one).cast(), 4);
        }
    }
}

fn bind_tcp(addr: SocketAddr) -> TcpListener {
    let domain = if addr.is_ipv6() { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: plain socket syscalls on a fresh fd we own.
    unsafe {
        let fd = libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let one: libc::c_int = 1;
        libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, (&raw const one).cast(), 4);
        v6only(&addr, fd);
        let owned = OwnedFd::from_raw_fd(fd);
        let listener = TcpListener::from(owned);
        let (sa, len) = sockaddr(&addr);
        assert_eq!(libc::bind(listener.as_raw_fd(), (&raw const sa).cast(), len), 0, "bind {addr}");
        assert_eq!(libc::listen(listener.as_raw_fd(), 128), 0);
        listener
    }
}

fn bind_udp(addr: SocketAddr) -> UdpSocket {
    let domain = if addr.is_ipv6() { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: plain socket syscalls on a fresh fd we own.
    unsafe {
        let fd = libc::socket(domain, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        v6only(&addr, fd);
        let socket = UdpSocket::from(OwnedFd::from_raw_fd(fd));
        let (sa, len) = sockaddr(&addr);
        assert_eq!(libc::bind(socket.as_raw_fd(), (&raw const sa).cast(), len), 0, "bind {addr}");
        socket
    }
}

pub fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; zero is a valid start.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = (&raw mut storage).cast::<libc::sockaddr_in>();
            // SAFETY: storage is large enough for sockaddr_in.
            unsafe {
                (*sin).sin_family = libc::AF_INET as u16;
                (*sin).sin_port = a.port().to_be();
                (*sin).sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
            }
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = (&raw mut storage).cast::<libc::sockaddr_in6>();
            // SAFETY: storage is large enough for sockaddr_in6.
            unsafe {
                (*sin6).sin6_family = libc::AF_INET6 as u16;
                (*sin6).sin6_port = a.port().to_be();
                (*sin6).sin6_addr.s6_addr = a.ip().octets();
            }
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

fn tcp_server(addr: SocketAddr, stop: &AtomicBool, deadline: Instant, ready: &std::sync::mpsc::Sender<()>, answer: &Answer) {
    let listener = bind_tcp(addr);
    listener.set_nonblocking(true).expect("nonblocking");
    let _ = ready.send(());
    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
        match listener.accept() {
            Ok((mut stream, _)) => {
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
                let mut buf = [0u8; 64];
                if let Ok(n) = stream.read(&mut buf) {
                    let _ = stream.write_all(&answer.to(&buf[..n]));
                }
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn udp_server(addr: SocketAddr, stop: &AtomicBool, deadline: Instant, ready: &std::sync::mpsc::Sender<()>, answer: &Answer) {
    let socket = bind_udp(addr);
    socket.set_read_timeout(Some(Duration::from_millis(50))).expect("timeout");
    let _ = ready.send(());
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(&answer.to(&buf[..n]), from);
        }
    }
}

/// Connects, sends a line and expects it echoed: the connection and its replies passed.
pub fn tcp_ok(ns: &Netns, to: SocketAddr, timeout: Duration) -> bool {
    ns.run(move || {
        let Ok(mut stream) = TcpStream::connect_timeout(&to, timeout) else { return false };
        let _ = stream.set_read_timeout(Some(timeout));
        if stream.write_all(b"ping\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 5];
        stream.read_exact(&mut buf).is_ok() && &buf == b"ping\n"
    })
}

/// Sends a datagram and expects the echo: the request and its reply passed.
pub fn udp_ok(ns: &Netns, to: SocketAddr, timeout: Duration) -> bool {
    ns.run(move || {
        let any: SocketAddr = if to.is_ipv6() { "[::]:0".parse().expect("addr") } else { "0.0.0.0:0".parse().expect("addr") };
        let socket = UdpSocket::bind(any).expect("bind");
        socket.set_read_timeout(Some(timeout)).expect("timeout");
        let _ = socket.send_to(b"ping", to);
        let mut buf = [0u8; 16];
        matches!(socket.recv_from(&mut buf), Ok((4, from)) if from == to)
    })
}

/// A raw IP socket for protocol 132 (the kernel has no SCTP stack): receives what arrives.
pub struct SctpSink {
    handle: Option<JoinHandle<Vec<u16>>>,
}

impl SctpSink {
    /// Collects the destination ports of SCTP packets arriving in `ns` for `duration`.
    pub fn start(ns: &Netns, v6: bool, duration: Duration) -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = ns.spawn(move || {
            let domain = if v6 { libc::AF_INET6 } else { libc::AF_INET };
            // SAFETY: a fresh raw socket we own.
            let fd = unsafe { libc::socket(domain, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 132) };
            assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
            // SAFETY: we own fd.
            let socket = unsafe { UdpSocket::from_raw_fd(fd) };
            socket.set_read_timeout(Some(Duration::from_millis(50))).expect("timeout");
            let _ = tx.send(());
            let deadline = Instant::now() + duration;
            let mut ports = Vec::new();
            let mut buf = [0u8; 2048];
            while Instant::now() < deadline {
                if let Ok(n) = socket.recv(&mut buf) {
                    // IPv4 raw sockets deliver the IP header; IPv6 ones do not.
                    let off = if v6 { 0 } else { ((buf[0] & 0x0f) as usize) * 4 };
                    if n >= off + 4 {
                        ports.push(u16::from_be_bytes([buf[off + 2], buf[off + 3]]));
                    }
                }
            }
            ports
        });
        rx.recv_timeout(Duration::from_secs(5)).expect("sink ready");
        Self { handle: Some(handle) }
    }

    pub fn ports(mut self) -> Vec<u16> {
        self.handle.take().expect("joined once").join().expect("sink thread")
    }
}

/// Sends one SCTP INIT to `to` through a raw socket from `ns`.
pub fn sctp_send_init(ns: &Netns, to: SocketAddr, sport: u16) {
    ns.run(move || {
        let domain = if to.is_ipv6() { libc::AF_INET6 } else { libc::AF_INET };
        // SAFETY: a fresh raw socket we own, a valid buffer and address.
        unsafe {
            let fd = libc::socket(domain, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 132);
            assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
            let packet = sctp_init(sport, to.port());
            let dest = SocketAddr::new(to.ip(), 0);
            let (sa, len) = sockaddr(&dest);
            let n = libc::sendto(fd, packet.as_ptr().cast(), packet.len(), 0, (&raw const sa).cast(), len);
            libc::close(fd);
            assert!(n > 0, "sendto: {}", std::io::Error::last_os_error());
        }
    });
}

/// An SCTP common header and an INIT chunk, with its CRC32c checksum.
pub fn sctp_init(sport: u16, dport: u16) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend(sport.to_be_bytes());
    p.extend(dport.to_be_bytes());
    p.extend([0u8; 8]); // verification tag 0 (INIT), checksum below
    // INIT: type 1, flags 0, length 20, initiate tag, a_rwnd, streams, initial TSN.
    p.extend([1, 0, 0, 20]);
    p.extend(0x0102_0304u32.to_be_bytes());
    p.extend(65_535u32.to_be_bytes());
    p.extend([0, 1, 0, 1]);
    p.extend(1u32.to_be_bytes());
    let crc = crc32c(&p);
    p[8..12].copy_from_slice(&crc.to_le_bytes());
    p
}

fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82f6_3b78 } else { crc >> 1 };
        }
    }
    !crc
}
