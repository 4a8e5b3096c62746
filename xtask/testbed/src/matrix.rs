//! Reachability matrices, the way the upstream NetworkPolicy e2e suite checks an enforcer:
//! an expected truth table (rows = from, columns = to) built from a default and a few rules,
//! a prober that fills the observed table from real connections between pod namespaces
//! (TCP, UDP, SCTP over raw sockets; both address families; concurrently; bounded), and the
//! printed comparison with every mismatch marked.
//!
//! Every probe uses a source port never used before in this process, so a conntrack entry
//! left by an earlier allowed probe can never answer for a later one.

use std::{
    collections::HashSet,
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use super::{Netns, enter_netns, probe::sctp_init, probe::sockaddr};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        })
    }
}

/// Whether `pattern` names `pod` ("ns/name"): `*` is every pod, `x/*` every pod of namespace
/// x, `*/a` every pod named a, `x/a` that pod.
fn matches(pattern: &str, pod: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    let (pns, pname) = pattern.split_once('/').unwrap_or((pattern, "*"));
    let (ns, name) = pod.split_once('/').unwrap_or((pod, ""));
    (pns == "*" || pns == ns) && (pname == "*" || pname == name)
}

/// An n x n table of booleans over pods named "ns/name". Pod-to-itself is never judged
/// (upstream ignores loopback too): the diagonal is left out of every comparison.
#[derive(Clone, Debug)]
pub struct TruthTable {
    pods: Vec<String>,
    values: Vec<Vec<Option<bool>>>,
}

impl TruthTable {
    pub fn new(pods: &[String], default: Option<bool>) -> Self {
        let n = pods.len();
        Self { pods: pods.to_vec(), values: vec![vec![default; n]; n] }
    }

    pub fn pods(&self) -> &[String] {
        &self.pods
    }

    pub fn get(&self, from: usize, to: usize) -> Option<bool> {
        self.values[from][to]
    }

    pub fn set(&mut self, from: usize, to: usize, value: bool) {
        self.values[from][to] = Some(value);
    }

    /// Upstream's layout: a header of columns, one row per source; `.` connected, `X` not,
    /// `-` not judged (the pod itself), `?` not observed.
    pub fn render(&self, mark: impl Fn(usize, usize, Option<bool>) -> &'static str) -> String {
        let width = self.pods.iter().map(String::len).max().unwrap_or(1).max(1) + 2;
        let mut out = format!("{:<width$}", "-");
        for to in &self.pods {
            let _ = write!(out, "{to:<width$}");
        }
        out.push('\n');
        for (i, from) in self.pods.iter().enumerate() {
            let _ = write!(out, "{from:<width$}");
            for j in 0..self.pods.len() {
                let _ = write!(out, "{:<width$}", if i == j { "-" } else { mark(i, j, self.values[i][j]) });
            }
            out.push('\n');
        }
        out
    }

    pub fn pretty(&self) -> String {
        self.render(|_, _, v| match v {
            Some(true) => ".",
            Some(false) => "X",
            None => "?",
        })
    }
}

/// The expected connectivity of a case: every ordered pair starts at a default, then rules
/// override it in order (later rules win), like upstream's `Reachability`.
#[derive(Clone, Debug)]
pub struct Reachability {
    pub expected: TruthTable,
}

impl Reachability {
    pub fn new<S: AsRef<str>>(pods: &[S], default: bool) -> Self {
        let pods: Vec<String> = pods.iter().map(|p| p.as_ref().to_owned()).collect();
        Self { expected: TruthTable::new(&pods, Some(default)) }
    }

    pub fn pods(&self) -> &[String] {
        self.expected.pods()
    }

    /// Sets every pair whose source matches `from` and destination matches `to` (patterns:
    /// `*`, `x/*`, `*/a`, `x/a`). A pattern that matches no pod is a typo: panics.
    pub fn expect(&mut self, from: &str, to: &str, allowed: bool) -> &mut Self {
        let pods = self.expected.pods.clone();
        for (what, pattern) in [("from", from), ("to", to)] {
            assert!(pods.iter().any(|p| matches(pattern, p)), "{what} pattern {pattern:?} matches no pod of {pods:?}");
        }
        for (i, f) in pods.iter().enumerate() {
            for (j, t) in pods.iter().enumerate() {
                if matches(from, f) && matches(to, t) {
                    self.expected.set(i, j, allowed);
                }
            }
        }
        self
    }

    pub fn allow(&mut self, from: &str, to: &str) -> &mut Self {
        self.expect(from, to, true)
    }

    pub fn deny(&mut self, from: &str, to: &str) -> &mut Self {
        self.expect(from, to, false)
    }

    /// Everything into `to` (upstream `ExpectAllIngress`).
    pub fn ingress(&mut self, to: &str, allowed: bool) -> &mut Self {
        self.expect("*", to, allowed)
    }

    /// Everything out of `from` (upstream `ExpectAllEgress`).
    pub fn egress(&mut self, from: &str, allowed: bool) -> &mut Self {
        self.expect(from, "*", allowed)
    }
}

/// The comparison of one family's probe round with its expectation.
pub struct Comparison {
    pub family: &'static str,
    pub observed: TruthTable,
    pub wrong: Vec<(String, String, bool)>,
    pub right: usize,
}

/// Prints what upstream prints when a case fails: the counts, the expected, observed and
/// comparison tables (`X` in the comparison marks a mismatch), and the mismatched pairs.
pub fn report(title: &str, expected: &Reachability, comparisons: &[Comparison]) -> String {
    let mut out = String::new();
    for c in comparisons {
        let _ = writeln!(out, "{title} [{}]: reachability: correct:{}, incorrect:{}, result={}", c.family, c.right, c.wrong.len(), c.wrong.is_empty());
        if c.wrong.is_empty() {
            continue;
        }
        let _ = writeln!(out, "\nexpected:\n\n{}", expected.expected.pretty());
        let _ = writeln!(out, "observed:\n\n{}", c.observed.pretty());
        let comparison = c.observed.render(|i, j, v| if v == expected.expected.get(i, j) { "." } else { "X" });
        let _ = writeln!(out, "comparison:\n\n{comparison}");
        for (from, to, expected_allowed) in &c.wrong {
            let what = if *expected_allowed { "expected allowed, was BLOCKED" } else { "expected blocked, was ALLOWED" };
            let _ = writeln!(out, "  {from} -> {to}: {what}");
        }
        out.push('\n');
    }
    out
}

/// `report` for pods spread over nodes: every row, column and mismatched pair names the
/// node of its pod (`x/a@node-1`), and a failure starts with `header` (the nodes' addresses).
pub fn report_placed(title: &str, expected: &Reachability, comparisons: &[Comparison], node_of: &dyn Fn(&str) -> String, header: &str) -> String {
    let place = |pod: &String| format!("{pod}@{}", node_of(pod));
    let relabel = |table: &TruthTable| TruthTable { pods: table.pods.iter().map(place).collect(), values: table.values.clone() };
    let placed = Reachability { expected: relabel(&expected.expected) };
    let comparisons: Vec<Comparison> = comparisons
        .iter()
        .map(|c| Comparison {
            family: c.family,
            observed: relabel(&c.observed),
            wrong: c.wrong.iter().map(|(from, to, allowed)| (place(from), place(to), *allowed)).collect(),
            right: c.right,
        })
        .collect();
    let text = report(title, &placed, &comparisons);
    if comparisons.iter().any(|c| !c.wrong.is_empty()) { format!("{header}\n{text}") } else { text }
}

/// Source ports handed out once each (20000..=60999), shared by every protocol.
fn next_source_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    (20_000 + n % 41_000) as u16
}

/// What arrived: (source address, source port, destination port), and a signal per arrival.
type Arrivals = (Mutex<HashSet<(IpAddr, u16, u16)>>, Condvar);

/// SCTP packets that arrived in a pod namespace, by (source address, source port,
/// destination port), recorded by raw IP sockets (the kernel has no SCTP stack) until drop.
pub struct SctpInbox {
    seen: Arc<Arrivals>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl SctpInbox {
    pub fn start(ns: &Netns) -> Self {
        let seen = Arc::new((Mutex::new(HashSet::new()), Condvar::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let mut threads = Vec::new();
        for v6 in [false, true] {
            let (seen, stop, ready) = (seen.clone(), stop.clone(), ready_tx.clone());
            threads.push(ns.spawn(move || sctp_receive(v6, &seen, &stop, &ready)));
        }
        for _ in 0..2 {
            ready_rx.recv_timeout(Duration::from_secs(5)).expect("SCTP receiver ready");
        }
        Self { seen, stop, threads }
    }

    /// Waits until a packet from `from`:`sport` to `dport` has arrived, at most `timeout`.
    pub fn wait_for(&self, from: IpAddr, sport: u16, dport: u16, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (lock, cond) = &*self.seen;
        let mut seen = lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        loop {
            if seen.contains(&(from, sport, dport)) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            seen = cond.wait_timeout(seen, deadline - now).unwrap_or_else(std::sync::PoisonError::into_inner).0;
        }
    }
}

impl Drop for SctpInbox {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn sctp_receive(v6: bool, seen: &Arrivals, stop: &AtomicBool, ready: &std::sync::mpsc::Sender<()>) {
    let domain = if v6 { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: a fresh raw socket we own.
    let fd = unsafe { libc::socket(domain, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 132) };
    assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
    // SAFETY: we own fd.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let timeout = libc::timeval { tv_sec: 0, tv_usec: 50_000 };
    // SAFETY: a valid socket and option buffer.
    unsafe {
        libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVTIMEO, (&raw const timeout).cast(), size_of::<libc::timeval>() as u32);
    }
    let _ = ready.send(());
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::SeqCst) {
        // SAFETY: sockaddr_storage is plain data.
        let mut from: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: valid buffers and lengths.
        let n = unsafe { libc::recvfrom(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0, (&raw mut from).cast(), &raw mut len) };
        let Ok(n) = usize::try_from(n) else { continue };
        // IPv4 raw sockets deliver the IP header; IPv6 ones do not.
        let (src, off) = if v6 {
            // SAFETY: the kernel filled a sockaddr_in6 for an AF_INET6 socket.
            let sin6 = unsafe { &*(&raw const from).cast::<libc::sockaddr_in6>() };
            (IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)), 0)
        } else {
            if n < 20 {
                continue;
            }
            (IpAddr::V4(Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15])), usize::from(buf[0] & 0x0f) * 4)
        };
        if n >= off + 4 {
            let sport = u16::from_be_bytes([buf[off], buf[off + 1]]);
            let dport = u16::from_be_bytes([buf[off + 2], buf[off + 3]]);
            let (lock, cond) = seen;
            lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert((src, sport, dport));
            cond.notify_all();
        }
    }
}

/// A pod as the prober sees it: its namespace (entered by the probing thread), addresses and
/// SCTP inbox.
pub struct ProbePod {
    netns_path: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    sctp: SctpInbox,
}

impl ProbePod {
    pub fn new(ns: &Netns, ipv4: Ipv4Addr, ipv6: Ipv6Addr) -> Self {
        Self { netns_path: format!("/run/netns/{}", ns.name), ipv4, ipv6, sctp: SctpInbox::start(ns) }
    }

    pub fn addr(&self, v6: bool) -> IpAddr {
        if v6 { IpAddr::V6(self.ipv6) } else { IpAddr::V4(self.ipv4) }
    }

    /// The pod's network namespace, as a path for `enter_netns`.
    pub fn netns_path(&self) -> &str {
        &self.netns_path
    }
}

/// One connection attempt from the calling thread's network namespace. `to_inbox` is the
/// destination's SCTP inbox (SCTP only); `from` is the source address expected there.
fn probe_once(protocol: Protocol, from: IpAddr, to: SocketAddr, to_inbox: Option<&SctpInbox>, timeout: Duration) -> bool {
    let sport = next_source_port();
    match protocol {
        Protocol::Tcp => tcp_probe(to, sport, timeout),
        Protocol::Udp => udp_probe(to, sport, timeout),
        Protocol::Sctp => {
            sctp_send(to, sport);
            to_inbox.is_some_and(|inbox| inbox.wait_for(from, sport, to.port(), timeout))
        }
    }
}

fn any_addr(v6: bool, port: u16) -> SocketAddr {
    if v6 { SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port) } else { SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port) }
}

/// Connects from source port `sport`, sends a line and expects it echoed.
fn tcp_probe(to: SocketAddr, sport: u16, timeout: Duration) -> bool {
    tcp_exchange(to, sport, timeout, b"ping\n").is_some_and(|answer| answer == b"ping\n")
}

/// Connects from source port `sport` within `timeout`, sends `request` and returns the first
/// answer (up to 64 bytes, or up to a newline).
fn tcp_exchange(to: SocketAddr, sport: u16, timeout: Duration, request: &[u8]) -> Option<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut stream = tcp_connect(to, sport, deadline)?;
    let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(50));
    let _ = stream.set_read_timeout(Some(left));
    let _ = stream.set_write_timeout(Some(left));
    stream.write_all(request).ok()?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 64];
    while answer.len() < 64 && !answer.ends_with(b"\n") {
        let n = stream.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
    }
    Some(answer)
}

/// A non-blocking connect from source port `sport`, bounded by `deadline`; the stream is
/// returned blocking.
fn tcp_connect(to: SocketAddr, sport: u16, deadline: Instant) -> Option<TcpStream> {
    let domain = if to.is_ipv6() { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: plain socket syscalls on a fresh fd we own; buffers are valid.
    let stream = unsafe {
        let fd = libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0);
        if fd < 0 {
            return None;
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let one: libc::c_int = 1;
        libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, (&raw const one).cast(), 4);
        let (local, local_len) = sockaddr(&any_addr(to.is_ipv6(), sport));
        if libc::bind(fd.as_raw_fd(), (&raw const local).cast(), local_len) != 0 {
            return None;
        }
        let (remote, remote_len) = sockaddr(&to);
        if libc::connect(fd.as_raw_fd(), (&raw const remote).cast(), remote_len) != 0
            && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINPROGRESS)
        {
            return None;
        }
        let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
        let left = deadline.saturating_duration_since(Instant::now());
        if libc::poll(&raw mut pfd, 1, left.as_millis() as libc::c_int) != 1 {
            return None;
        }
        let mut err: libc::c_int = 0;
        let mut len = 4 as libc::socklen_t;
        libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_ERROR, (&raw mut err).cast(), &raw mut len);
        if err != 0 {
            return None;
        }
        TcpStream::from(fd)
    };
    stream.set_nonblocking(false).ok()?;
    Some(stream)
}

/// Sends a datagram from source port `sport` and expects the echo from `to`.
fn udp_probe(to: SocketAddr, sport: u16, timeout: Duration) -> bool {
    udp_exchange(to, sport, timeout, b"ping").is_some_and(|answer| answer == b"ping")
}

/// Sends `request` from source port `sport` and returns the first answer that comes from
/// `to` itself (through a Service: only if the reply was translated back).
fn udp_exchange(to: SocketAddr, sport: u16, timeout: Duration, request: &[u8]) -> Option<Vec<u8>> {
    let socket = UdpSocket::bind(any_addr(to.is_ipv6(), sport)).ok()?;
    let deadline = Instant::now() + timeout;
    socket.send_to(request, to).ok()?;
    let mut buf = [0u8; 64];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        socket.set_read_timeout(Some(left)).ok()?;
        match socket.recv_from(&mut buf) {
            Ok((n, from)) if from == to => return Some(buf[..n].to_vec()),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
}

/// Sends one SCTP INIT from source port `sport` through a raw socket.
fn sctp_send(to: SocketAddr, sport: u16) {
    let domain = if to.is_ipv6() { libc::AF_INET6 } else { libc::AF_INET };
    let packet = sctp_init(sport, to.port());
    let (sa, len) = sockaddr(&SocketAddr::new(to.ip(), 0));
    // SAFETY: a fresh raw socket we own, a valid buffer and address.
    unsafe {
        let fd = libc::socket(domain, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 132);
        if fd < 0 {
            return;
        }
        let fd = OwnedFd::from_raw_fd(fd);
        libc::sendto(fd.as_raw_fd(), packet.as_ptr().cast(), packet.len(), 0, (&raw const sa).cast(), len);
    }
}

/// How a matrix is probed.
#[derive(Clone, Copy, Debug)]
pub struct ProbeOptions {
    /// Per attempt.
    pub timeout: Duration,
    /// Concurrent probing threads.
    pub workers: usize,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        Self { timeout: Duration::from_millis(400), workers: 24 }
    }
}

/// Probes every ordered pair of `pods` (but a pod to itself) on `port`/`protocol`, over
/// IPv4 and IPv6, and compares with `expected`. An expected connection that failed is
/// probed once more (a loaded machine can miss a deadline); a connection that should have
/// been blocked but went through is final: a packet passed that must not have.
pub fn probe_matrix(pods: &[&ProbePod], expected: &Reachability, port: u16, protocol: Protocol, options: ProbeOptions) -> Vec<Comparison> {
    let n = pods.len();
    assert_eq!(n, expected.pods().len(), "one probe pod per matrix pod");
    let mut jobs = Vec::new();
    for v6 in [false, true] {
        for from in 0..n {
            for to in 0..n {
                if from != to {
                    jobs.push((v6, from, to));
                }
            }
        }
    }
    let results = run_jobs(pods, &jobs, port, protocol, options);
    let retry: Vec<_> = jobs
        .iter()
        .zip(&results)
        .filter(|((_, from, to), ok)| !**ok && expected.expected.get(*from, *to) == Some(true))
        .map(|(job, _)| *job)
        .collect();
    let retried = run_jobs(pods, &retry, port, protocol, options);
    let mut comparisons = Vec::new();
    for (v6, family) in [(false, "IPv4"), (true, "IPv6")] {
        let mut observed = TruthTable::new(expected.pods(), None);
        for (&(jv6, from, to), &ok) in jobs.iter().zip(&results).chain(retry.iter().zip(&retried)) {
            if jv6 == v6 {
                // A retry overwrites the first attempt.
                observed.set(from, to, ok);
            }
        }
        let mut wrong = Vec::new();
        let mut right = 0;
        for from in 0..n {
            for to in 0..n {
                if from == to {
                    continue;
                }
                let want = expected.expected.get(from, to);
                if observed.get(from, to) == want {
                    right += 1;
                } else {
                    wrong.push((expected.pods()[from].clone(), expected.pods()[to].clone(), want == Some(true)));
                }
            }
        }
        comparisons.push(Comparison { family, observed, wrong, right });
    }
    comparisons
}

fn run_jobs(pods: &[&ProbePod], jobs: &[(bool, usize, usize)], port: u16, protocol: Protocol, options: ProbeOptions) -> Vec<bool> {
    let results: Vec<Mutex<bool>> = jobs.iter().map(|_| Mutex::new(false)).collect();
    let next = AtomicU32::new(0);
    std::thread::scope(|scope| {
        for _ in 0..options.workers.clamp(1, jobs.len().max(1)) {
            scope.spawn(|| {
                // Each probing thread enters the source pod's namespace; it only moves when
                // the next job comes from another pod.
                let mut current: Option<usize> = None;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some(&(v6, from, to)) = jobs.get(i) else { break };
                    if current != Some(from) {
                        enter_netns(&pods[from].netns_path);
                        current = Some(from);
                    }
                    let target = SocketAddr::new(pods[to].addr(v6), port);
                    let ok = probe_once(protocol, pods[from].addr(v6), target, Some(&pods[to].sctp), options.timeout);
                    *results[i].lock().unwrap_or_else(std::sync::PoisonError::into_inner) = ok;
                }
            });
        }
    });
    results.into_iter().map(|m| m.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner)).collect()
}

/// One probe from the calling process's namespace at the time (e.g. a thread that entered
/// the node namespace): node-to-pod traffic.
pub fn probe_from(netns: &Netns, from: IpAddr, to: SocketAddr, to_pod: &ProbePod, protocol: Protocol, timeout: Duration) -> bool {
    let path = format!("/run/netns/{}", netns.name);
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                enter_netns(&path);
                probe_once(protocol, from, to, Some(&to_pod.sctp), timeout)
            })
            .join()
            .unwrap_or(false)
    })
}

/// One connection through a Service: its source port (to find the flow in conntrack) and
/// the name the backend answered with (None: no answer).
#[derive(Clone, Debug)]
pub struct Attempt {
    pub sport: u16,
    pub answer: Option<String>,
}

/// Connects from `from` to `to` (a ClusterIP or NodePort) up to `max` times, sequentially,
/// each time asking the server's name (`who`, see `probe::Servers::start_named`), until
/// `done` says enough was seen. TCP and UDP only (SCTP has no server here to answer).
pub fn ask_backends(from: &ProbePod, to: SocketAddr, protocol: Protocol, timeout: Duration, max: usize, mut done: impl FnMut(&[Attempt]) -> bool + Send) -> Vec<Attempt> {
    assert!(protocol != Protocol::Sctp, "ask_backends: TCP or UDP");
    let path = from.netns_path.clone();
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                enter_netns(&path);
                let mut attempts = Vec::new();
                while attempts.len() < max && !done(&attempts) {
                    let sport = next_source_port();
                    let answer = match protocol {
                        Protocol::Tcp => tcp_exchange(to, sport, timeout, b"who\n"),
                        _ => udp_exchange(to, sport, timeout, b"who"),
                    };
                    let answer = answer.map(|a| String::from_utf8_lossy(&a).trim_end().to_owned()).filter(|a| !a.is_empty());
                    attempts.push(Attempt { sport, answer });
                }
                attempts
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placed_report_names_each_pods_node() {
        let pods = ["x/a", "x/b"];
        let mut expected = Reachability::new(&pods, true);
        expected.deny("x/a", "x/b");
        let mut observed = TruthTable::new(expected.pods(), None);
        observed.set(0, 1, true);
        observed.set(1, 0, true);
        let wrong = vec![("x/a".to_owned(), "x/b".to_owned(), false)];
        let comparison = Comparison { family: "IPv4", observed, wrong, right: 1 };
        let node_of = |pod: &str| if pod == "x/a" { "node-1".to_owned() } else { "node-2".to_owned() };
        let text = report_placed("case", &expected, &[comparison], &node_of, "nodes: node-1, node-2");
        assert!(text.starts_with("nodes: node-1, node-2\n"), "{text}");
        assert!(text.contains("x/a@node-1  x/b@node-2"), "{text}");
        assert!(text.contains("x/a@node-1 -> x/b@node-2: expected blocked, was ALLOWED"), "{text}");
    }
}
