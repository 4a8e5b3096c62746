//! TCP connection rate (connect, 1-byte request, 1-byte response, close, as netperf TCP_CRR
//! does) and request-response rate (1-byte ping-pong on long-lived connections, TCP_RR) from
//! pod `a` to a server in pod `b`, through the flood topologies (pod -> veth -> node -> veth
//! -> pod), one variant after another within each round. A new connection is where a
//! per-flow policy cost shows: every SYN walks the rules (or the classifier's full lookup and
//! conntrack insert); a request-response packet is an established packet.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use super::{flood::{B4, CRR_PORT, Variant}, log, median};
use crate::Netns;

/// One client step on its (re)used connection: whether it succeeded.
type ClientOp = fn(&SocketAddr, &mut Option<TcpStream>) -> bool;

#[derive(Clone, Debug)]
pub struct Settings {
    /// IPv4 rules installed while the rates are measured.
    pub rules: usize,
    pub rounds: usize,
    /// Measured seconds per test, variant and round (after `warmup_secs`).
    pub secs: f64,
    pub warmup_secs: f64,
    /// Concurrent clients of the connection-rate test.
    pub crr_clients: usize,
    /// Connections of the concurrent request-response test.
    pub rr_connections: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Test {
    /// connect, request, response, close; `crr_clients` at once.
    ConnectRate,
    /// One connection, 1-byte ping-pong.
    RequestResponse,
    /// `rr_connections` connections, 1-byte ping-pong each.
    RequestResponseMany,
}

impl Test {
    pub const ALL: [Test; 3] = [Test::ConnectRate, Test::RequestResponse, Test::RequestResponseMany];

    pub fn label(self) -> &'static str {
        match self {
            Test::ConnectRate => "connections/s (TCP_CRR)",
            Test::RequestResponse => "transactions/s, 1 connection (TCP_RR)",
            Test::RequestResponseMany => "transactions/s, concurrent connections (TCP_RR)",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Summary {
    pub variant: Variant,
    pub test: Test,
    /// Median over rounds of the operations per second.
    pub per_sec: f64,
    /// Median over rounds of per_sec / no enforcement's per_sec in the same round.
    pub ratio: f64,
    /// Connections or transactions that failed (timeouts, resets), all rounds.
    pub errors: u64,
    /// Raw, one per round; empty in summary.json.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub samples: Vec<f64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Results {
    pub rules: usize,
    pub rounds: usize,
    pub secs: f64,
    #[serde(default)]
    pub warmup_secs: f64,
    pub crr_clients: usize,
    pub rr_connections: usize,
    pub summary: Vec<Summary>,
}

impl Results {
    pub fn get(&self, v: Variant, test: Test) -> Option<&Summary> {
        self.summary.iter().find(|s| s.variant == v && s.test == test)
    }
}

/// A TCP server in `b` on [::]:CRR_PORT: worker threads blocking in accept on one listener,
/// each answering every byte of its connection with one byte until the peer closes.
struct Server {
    stop: Arc<AtomicBool>,
    workers: Vec<std::thread::JoinHandle<()>>,
    wake: SocketAddr,
    ns_name: String,
}

impl Server {
    fn start(b: &Netns, workers: usize) -> Self {
        let listener = b.run(|| TcpListener::bind(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), CRR_PORT)).expect("bind the rate server"));
        let stop = Arc::new(AtomicBool::new(false));
        let handles = (0..workers)
            .map(|_| {
                let l = listener.try_clone().expect("clone listener");
                let stop = stop.clone();
                // Accepted sockets need no namespace: the listener's fixes theirs.
                std::thread::spawn(move || {
                    while let Ok((mut conn, _)) = l.accept() {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let _ = conn.set_nodelay(true);
                        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                        let mut byte = [0u8; 1];
                        while matches!(conn.read(&mut byte), Ok(1)) && conn.write_all(&byte).is_ok() {}
                    }
                })
            })
            .collect();
        Self { stop, workers: handles, wake: SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), CRR_PORT), ns_name: b.name.clone() }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let (n, wake) = (self.workers.len(), self.wake);
        let path = format!("/run/netns/{}", self.ns_name);
        // One connection per worker from inside b: each accept returns and sees the flag.
        let _ = std::thread::spawn(move || {
            crate::enter_netns(&path);
            for _ in 0..n {
                let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
            }
        })
        .join();
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

/// Runs `threads` client threads in `a` for `secs`; each calls `op` until the deadline and
/// counts successes and failures. Returns (operations per second, failures).
fn clients(a: &Netns, threads: usize, secs: f64, op: fn(&SocketAddr, &mut Option<TcpStream>) -> bool) -> (f64, u64) {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = Duration::from_secs_f64(secs);
    let target = SocketAddr::new(IpAddr::V4(B4), CRR_PORT);
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (ok, failed) = (ok.clone(), failed.clone());
            a.spawn(move || {
                let mut conn = None;
                let (mut n, mut bad) = (0, 0);
                while start.elapsed() < deadline {
                    if op(&target, &mut conn) { n += 1 } else { bad += 1 }
                }
                ok.fetch_add(n, Ordering::SeqCst);
                failed.fetch_add(bad, Ordering::SeqCst);
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
    let elapsed = start.elapsed().as_secs_f64();
    (ok.load(Ordering::SeqCst) as f64 / elapsed, failed.load(Ordering::SeqCst))
}

fn connect(target: &SocketAddr) -> Option<TcpStream> {
    let c = TcpStream::connect_timeout(target, Duration::from_secs(1)).ok()?;
    c.set_nodelay(true).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    Some(c)
}

fn ping(c: &mut TcpStream) -> bool {
    let mut byte = [1u8; 1];
    c.write_all(&byte).is_ok() && matches!(c.read(&mut byte), Ok(1))
}

/// One TCP_CRR transaction: a fresh connection, one request and response, close.
fn crr_op(target: &SocketAddr, _: &mut Option<TcpStream>) -> bool {
    connect(target).is_some_and(|mut c| ping(&mut c))
}

/// One TCP_RR transaction on the thread's connection (opened on first use, and again after a failure).
fn rr_op(target: &SocketAddr, conn: &mut Option<TcpStream>) -> bool {
    if conn.is_none() {
        *conn = connect(target);
    }
    let ok = conn.as_mut().is_some_and(ping);
    if !ok {
        *conn = None;
    }
    ok
}

/// Every test on every variant's pods (`(variant, a, b)`), rounds interleaved.
pub fn run(settings: &Settings, pods: &[(Variant, &Netns, &Netns)]) -> Results {
    for (_, a, _) in pods {
        // Clients close first, so their ports sit in TIME_WAIT: let connect reuse them (our
        // own namespace; its sysctls go with it).
        a.exec(&["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"]);
        a.exec(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535"]);
    }
    let workers = settings.crr_clients.max(settings.rr_connections) + 2;
    let servers: Vec<Server> = pods.iter().map(|(_, _, b)| Server::start(b, workers)).collect();
    let mut samples: Vec<(Variant, Test, Vec<f64>, u64)> = Vec::new();
    for round in 0..settings.rounds {
        for (v, a, _) in pods {
            for test in Test::ALL {
                let (threads, op): (usize, ClientOp) = match test {
                    Test::ConnectRate => (settings.crr_clients, crr_op),
                    Test::RequestResponse => (1, rr_op),
                    Test::RequestResponseMany => (settings.rr_connections, rr_op),
                };
                let _ = clients(a, threads, settings.warmup_secs, op);
                let (rate, errors) = clients(a, threads, settings.secs, op);
                match samples.iter_mut().find(|s| s.0 == *v && s.1 == test) {
                    Some(s) => {
                        s.2.push(rate);
                        s.3 += errors;
                    }
                    None => samples.push((*v, test, vec![rate], errors)),
                }
            }
        }
        log(format!("crr: round {} of {} done", round + 1, settings.rounds));
    }
    drop(servers);
    let base = |test: Test| samples.iter().find(|s| s.0 == Variant::None && s.1 == test).map(|s| s.2.clone()).unwrap_or_default();
    let summary: Vec<Summary> = samples
        .iter()
        .map(|(v, test, rates, errors)| {
            let b = base(*test);
            let ratios: Vec<f64> = rates.iter().zip(&b).map(|(r, b)| r / b).collect();
            let s = Summary { variant: *v, test: *test, per_sec: median(rates), ratio: median(&ratios), errors: *errors, samples: rates.clone() };
            log(format!("crr: {:<38} {:<48} {:>9.0}/s ({:.2}x), {} errors", v.label(), test.label(), s.per_sec, s.ratio, s.errors));
            s
        })
        .collect();
    Results { rules: settings.rules, rounds: settings.rounds, secs: settings.secs, warmup_secs: settings.warmup_secs, crr_clients: settings.crr_clients, rr_connections: settings.rr_connections, summary }
}
