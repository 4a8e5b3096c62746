//! Real packets over veths: a UDP flood from pod `a` to pod `b` through a forwarding node
//! namespace, with no enforcement, with the classifier, and with iptables, iptables + ipset
//! and nftables translations of the same policy; and TCP throughput with iperf3.
//!
//! Each variant has its own node and pods (namespaces), built once; the runs of all variants
//! are interleaved round by round, so drift on a shared machine hits them alike. `b` is
//! isolated for ingress and accepts `rules` (peer, UDP port) pairs: `rules - 1` peers that
//! send nothing, and `a` on UDP 10000-10999 (one rule, the last one in linear chains). The
//! allowed flood goes to 10000 from one source port (one flow); the "new flows" flood walks
//! source ports 1024-65535 and destination ports 10000-10999 so no 5-tuple repeats within a
//! run; the denied flood goes to 5002, which no rule allows.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use policy_common::{
    Direction,
    endpoint::{EndpointInfo, EndpointKey, FLAG_HAS_IPV4, FLAG_HAS_IPV6, FLAG_INGRESS_ISOLATED},
    event::Config,
    ipcache::{IpcacheKey, IpcacheValue},
    policy::{PREFIX_FULL, PolicyKey, PolicyValue, PortRangePrefixes, lookup},
    proto,
};
use serde::{Deserialize, Serialize};

use super::{CpuTicks, log, median, thread_cpu_ns};
use policy_agent::{
    compile::MapOp,
    datapath::{Datapath, MapSizes, Maps, PinLayout},
};

/// Address and policy map capacity of the policy-ebpf flood variant: 100,000 fillers in each
/// family plus the allowed port blocks.
const FLOOD_MAP_ENTRIES: u32 = 262_144;

use crate::{Bpffs, Netns, Node};

pub const A4: Ipv4Addr = Ipv4Addr::new(198, 18, 40, 1);
pub const B4: Ipv4Addr = Ipv4Addr::new(198, 18, 40, 2);
const A6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 40, 0, 0, 0, 1);
const B6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 40, 0, 0, 0, 2);
const A_ID: u32 = 3000;
const A_EP: u32 = 1;
const B_EP: u32 = 2;
const ALLOWED_FIRST: u16 = 10000;
const ALLOWED_LAST: u16 = 10999;
const DENIED_PORT: u16 = 5002;
const IPERF_PORT: u16 = 5201;
/// The TCP port of the connection-rate and request-response server in `b` (one rule, after the UDP one).
pub const CRR_PORT: u16 = 7000;
/// UDP payload making 64-byte Ethernet frames (14 + 20 + 8 + 22).
const PAYLOAD: usize = 22;
const BATCH: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Variant {
    None,
    Bpf,
    Iptables,
    Ipset,
    Nftables,
    NftLinear,
}

impl Variant {
    pub const ALL: [Variant; 6] = [Variant::None, Variant::Bpf, Variant::Iptables, Variant::Ipset, Variant::Nftables, Variant::NftLinear];

    pub fn label(self) -> &'static str {
        match self {
            Variant::None => "no enforcement",
            Variant::Bpf => "policy-ebpf (TCX classifier)",
            Variant::Iptables => "iptables, one rule per peer and port",
            Variant::Ipset => "iptables + ipset hash:ip,port",
            Variant::Nftables => "nftables set (ip . port)",
            Variant::NftLinear => "nftables, one rule per peer and port",
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            Variant::None => "none",
            Variant::Bpf => "bpf",
            Variant::Iptables => "iptables",
            Variant::Ipset => "ipset",
            Variant::Nftables => "nftables",
            Variant::NftLinear => "nft-linear",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// One 5-tuple, allowed.
    Allowed,
    /// A new 5-tuple every packet, allowed.
    AllowedNewFlows,
    /// One 5-tuple, denied.
    Denied,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Allowed, Kind::AllowedNewFlows, Kind::Denied];

    pub fn label(self) -> &'static str {
        match self {
            Kind::Allowed => "allowed, one flow",
            Kind::AllowedNewFlows => "allowed, new flow per packet",
            Kind::Denied => "denied",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Run {
    pub variant: Variant,
    /// An IPv6 flood (pods' IPv6 addresses, ip6tables, inet6 sets).
    #[serde(default)]
    pub v6: bool,
    pub rules: usize,
    pub kind: Kind,
    pub round: usize,
    pub secs: f64,
    pub sent: u64,
    pub delivered: u64,
    pub sent_pps: f64,
    pub delivered_pps: f64,
    pub dropped_pps: f64,
    /// Busy CPU time of the whole machine (/proc/stat) per packet sent.
    pub cpu_ns_per_packet: f64,
    /// CPU time of the sending thread per packet sent (forwarding runs in its softirq).
    pub sender_cpu_ns_per_packet: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Summary {
    pub variant: Variant,
    #[serde(default)]
    pub v6: bool,
    pub rules: usize,
    pub kind: Kind,
    /// Packets per second handled: delivered for allowed floods, dropped for denied ones
    /// (delivered for both with no enforcement).
    pub pps: f64,
    pub sent_pps: f64,
    pub delivered_fraction: f64,
    pub cpu_ns_per_packet: f64,
    pub sender_cpu_ns_per_packet: f64,
    /// Median over rounds of pps / pps of no enforcement (same rules, kind and round).
    pub ratio: f64,
    /// Median over rounds of 1e9/pps - 1e9/pps(no enforcement), same pairing.
    pub added_ns: f64,
    pub rounds: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TcpSummary {
    pub variant: Variant,
    pub gbits: f64,
    /// Raw; empty in summary.json.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub samples: Vec<f64>,
    pub ratio: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Results {
    pub seconds_per_run: f64,
    pub rounds: usize,
    pub rules: Vec<usize>,
    /// Raw, one per round; empty in summary.json.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub runs: Vec<Run>,
    pub summary: Vec<Summary>,
    pub tcp_seconds: u32,
    pub tcp: Vec<TcpSummary>,
    pub iptables_binary: String,
    pub nf_conntrack_max: u64,
    /// IPv6 flood rule counts (their summaries have `v6` set).
    #[serde(default)]
    pub rules6: Vec<usize>,
    /// Seconds a variant may take to install one rule count before it is reported as timed out.
    #[serde(default)]
    pub budget_secs: f64,
    /// Every install: how long it took, or that it ran out of the budget.
    #[serde(default)]
    pub installs: Vec<Install>,
    /// TCP connection and request-response rates (`crr` part).
    #[serde(default)]
    pub rates: Option<super::crr::Results>,
}

impl Results {
    /// The variant ran out of its install budget at or below `rules` in this family.
    pub fn timed_out(&self, v: Variant, rules: usize, v6: bool) -> bool {
        self.installs.iter().any(|i| i.variant == v && i.v6 == v6 && i.timed_out && i.rules <= rules)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Install {
    pub variant: Variant,
    pub rules: usize,
    pub v6: bool,
    pub secs: f64,
    pub timed_out: bool,
}

#[derive(Clone, Debug)]
pub struct Settings {
    /// IPv4 flood rule counts (empty: no IPv4 floods).
    pub rules: Vec<usize>,
    /// IPv6 flood rule counts (empty: no IPv6 floods).
    pub rules6: Vec<usize>,
    pub rounds: usize,
    pub seconds: f64,
    /// iperf3 throughput (none vs policy-ebpf).
    pub iperf: bool,
    pub tcp_rounds: usize,
    pub tcp_seconds: u32,
    /// Install budget per variant and rule count.
    pub budget_secs: f64,
    /// Connection and request-response rates, at `rates.rules` IPv4 rules.
    pub rates: Option<super::crr::Settings>,
}

/// One variant's node and pods.
struct Topology {
    variant: Variant,
    node: Node,
    bpffs: Option<Bpffs>,
    maps: Option<Maps>,
    /// Where the next "new flows" flood starts, so 5-tuples never repeat within a run.
    next_flow: u64,
    scratch: PathBuf,
    /// Ran out of the install budget (IPv4, IPv6): larger rule counts are skipped.
    timed_out: [bool; 2],
}

/// Peers that send nothing: 198.18.64.1 upwards stays inside 198.18.0.0/15 for 100k+ rules.
fn filler_peer(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 64, 0)) + 1 + i as u32)
}
fn filler_peer6(i: usize) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(Ipv6Addr::new(0x2001, 2, 0, 0x41, 0, 0, 0, 0)) + 1 + i as u128)
}
fn filler_port(i: usize) -> u16 {
    6000 + (i % 100) as u16
}

impl Topology {
    fn new(variant: Variant, agent: &Path) -> Self {
        let suffix = match variant {
            Variant::None => "fn",
            Variant::Bpf => "fb",
            Variant::Iptables => "fi",
            Variant::Ipset => "fs",
            Variant::Nftables => "ft",
            Variant::NftLinear => "fl",
        }
        .to_owned();
        let mut node = Node::new(&suffix);
        node.add_pod("a", A4, A6);
        node.add_pod("b", B4, B6);
        let scratch = std::env::temp_dir().join(format!("{}-{suffix}", crate::run_prefix()));
        std::fs::create_dir_all(&scratch).expect("scratch dir");
        let mut topo = Self { variant, node, bpffs: None, maps: None, next_flow: 0, scratch, timed_out: [false; 2] };
        if variant == Variant::Bpf {
            let bpffs = Bpffs::new(&suffix);
            // Maps sized for 100k+ rules in both families, pinned before `attach` reuses them
            // (the agent's defaults hold fewer addresses).
            let sizes = MapSizes { addresses: Some(FLOOD_MAP_ENTRIES), policy: Some(FLOOD_MAP_ENTRIES), conntrack: None };
            drop(Datapath::load_with_sizes(PinLayout::new(&bpffs.path), sizes).expect("load the classifier with flood map sizes"));
            for pod in &topo.node.pods {
                let out = topo.node.ns.exec(&[agent.to_str().expect("utf-8"), "attach", "--iface", &pod.host_if, "--bpffs", bpffs.path.to_str().expect("utf-8")]);
                let text = String::from_utf8_lossy(&out.stdout);
                assert!(text.contains("attached from_pod") && text.contains("attached to_pod"), "{text}");
            }
            let mut maps = Maps::open_pinned(&PinLayout::new(&bpffs.path)).expect("pinned maps");
            let id = IpcacheValue { identity: A_ID };
            for (len, key) in [(32, IpcacheKey::v4(A4.octets())), (128, IpcacheKey::v6(A6.octets()))] {
                maps.write(&MapOp::IpcacheUpsert { prefix_len: IpcacheKey::lpm_prefix_len(len), key, value: id }).expect("ipcache");
            }
            let ifindex = |short: &str| topo.node.ns.ifindex(&topo.node.pod(short).host_if);
            let (ifa, ifb) = (ifindex("a"), ifindex("b"));
            // b's ingress: a UDP port range (port blocks) and the iperf3 port (exact).
            let mut lookups = [0; 2];
            lookups[Direction::Ingress as usize] = lookup::PORT_BLOCK | lookup::EXACT;
            let info = |id, flags: u32, v4: Ipv4Addr, v6: Ipv6Addr, lookups| EndpointInfo {
                id,
                flags: flags | FLAG_HAS_IPV4 | FLAG_HAS_IPV6,
                ipv4: v4.octets(),
                ipv6: v6.octets(),
                lookups,
                _pad: [0; 2],
            revision: 0,
            };
            maps.endpoints.insert(EndpointKey { ifindex: ifa }, info(A_EP, 0, A4, A6, [0; 2]), 0).expect("endpoint a");
            maps.endpoints.insert(EndpointKey { ifindex: ifb }, info(B_EP, FLAG_INGRESS_ISOLATED, B4, B6, lookups), 0).expect("endpoint b");
            // No flow-log events (as before), and a conntrack budget as large as the table, so
            // the new-flow rows measure the insert of every flow (until the table is full).
            maps.config.set(0, Config { flags: 0, events_per_sec: 0, ct_budget: u32::MAX, _pad: 0 }, 0).expect("config");
            for block in PortRangePrefixes::new(ALLOWED_FIRST, ALLOWED_LAST) {
                let key = PolicyKey::new(B_EP, A_ID, Direction::Ingress, proto::UDP, block.port);
                maps.write(&MapOp::PolicyUpsert { prefix_len: block.lpm_prefix_len(), key, value: PolicyValue::allow(16) }).expect("policy");
            }
            for port in [IPERF_PORT, CRR_PORT] {
                let key = PolicyKey::new(B_EP, A_ID, Direction::Ingress, proto::TCP, port);
                maps.write(&MapOp::PolicyUpsert { prefix_len: PREFIX_FULL, key, value: PolicyValue::allow(17) }).expect("policy");
            }
            topo.bpffs = Some(bpffs);
            topo.maps = Some(maps);
        }
        topo
    }

    fn host_if(&self, short: &str) -> String {
        self.node.pod(short).host_if.clone()
    }

    /// Runs `args FILE` (FILE holding `text`) in the node namespace, killed after `budget`
    /// seconds; false if it ran out of time.
    fn exec_file(&self, args: &[&str], name: &str, text: &str, budget: f64) -> bool {
        let path = self.scratch.join(name);
        std::fs::write(&path, text).expect("write rules file");
        let secs = format!("{:.0}", budget.max(1.0).ceil());
        let out = Command::new("timeout")
            .args(["-k", "5", &secs, "ip", "netns", "exec", &self.node.ns.name])
            .args(args)
            .arg(&path)
            .output()
            .expect("spawn timeout");
        if matches!(out.status.code(), Some(124 | 137) | None) {
            return false;
        }
        assert!(out.status.success(), "{args:?} {} failed: {}", path.display(), String::from_utf8_lossy(&out.stderr));
        true
    }

    /// Makes `b` accept `rules` (peer, port) pairs in this variant's mechanism, for one
    /// family; false if that took longer than `budget` seconds.
    fn install(&mut self, rules: usize, v6: bool, budget: f64) -> bool {
        let fillers = rules.saturating_sub(1);
        let started = Instant::now();
        let left = move || budget - started.elapsed().as_secs_f64();
        let b_if = self.host_if("b");
        let (a, plen) = if v6 { (IpAddr::V6(A6), 128) } else { (IpAddr::V4(A4), 32) };
        let peer = |i: usize| if v6 { IpAddr::V6(filler_peer6(i)) } else { IpAddr::V4(filler_peer(i)) };
        match self.variant {
            Variant::None => true,
            Variant::Bpf => {
                let maps = self.maps.as_mut().expect("maps");
                for i in 0..fillers {
                    let id = 5000 + i as u32;
                    let key = if v6 { IpcacheKey::v6(filler_peer6(i).octets()) } else { IpcacheKey::v4(filler_peer(i).octets()) };
                    let address = MapOp::IpcacheUpsert { prefix_len: IpcacheKey::lpm_prefix_len(plen), key, value: IpcacheValue { identity: id } };
                    let key = PolicyKey::new(B_EP, id, Direction::Ingress, proto::UDP, filler_port(i));
                    let allow = MapOp::PolicyUpsert { prefix_len: PREFIX_FULL, key, value: PolicyValue::allow(18) };
                    for op in [address, allow] {
                        if let Err(e) = maps.write(&op) {
                            // Reported like a timeout (skipped from here on), with the reason in the log.
                            log(format!("flood: policy-ebpf install of {rules} rules failed at entry {i}: {e:?}"));
                            return false;
                        }
                    }
                }
                left() > 0.0
            }
            Variant::Iptables | Variant::Ipset => {
                let set = if v6 { "pod-b-in6" } else { "pod-b-in" };
                let mut r = String::from("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POD-B-IN - [0:0]\n");
                r += &format!("-A FORWARD -o {b_if} -j POD-B-IN\n");
                r += "-A POD-B-IN -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n";
                if self.variant == Variant::Iptables {
                    for i in 0..fillers {
                        r += &format!("-A POD-B-IN -s {}/{plen} -p udp -m udp --dport {} -j ACCEPT\n", peer(i), filler_port(i));
                    }
                    r += &format!("-A POD-B-IN -s {a}/{plen} -p udp -m udp --dport {ALLOWED_FIRST}:{ALLOWED_LAST} -j ACCEPT\n");
                    r += &format!("-A POD-B-IN -s {a}/{plen} -p tcp -m tcp --dport {CRR_PORT} -j ACCEPT\n");
                } else {
                    let family = if v6 { "inet6" } else { "inet" };
                    let mut s = format!("create {set} hash:ip,port family {family} hashsize 4096 maxelem 262144\nflush {set}\n");
                    for i in 0..fillers {
                        s += &format!("add {set} {},udp:{}\n", peer(i), filler_port(i));
                    }
                    s += &format!("add {set} {a},udp:{ALLOWED_FIRST}-{ALLOWED_LAST}\nadd {set} {a},tcp:{CRR_PORT}\n");
                    if !self.exec_file(&["ipset", "-exist", "restore", "-file"], "ipset.txt", &s, left()) {
                        return false;
                    }
                    r += &format!("-A POD-B-IN -m set --match-set {set} src,dst -j ACCEPT\n");
                }
                r += "-A POD-B-IN -j DROP\nCOMMIT\n";
                self.exec_file(&[if v6 { IP6TABLES_RESTORE } else { IPTABLES_RESTORE }], "iptables.txt", &r, left())
            }
            Variant::Nftables | Variant::NftLinear => {
                let text = self.nft_ruleset(fillers, v6, &b_if, &peer);
                self.exec_file(&["nft", "-f"], "nft.txt", &text, left())
            }
        }
    }

    /// One table per family (`inet bench4` / `inet bench6`): a forward hook for that family
    /// jumping to b's ingress chain (a set lookup, or one rule per pair).
    fn nft_ruleset(&self, fillers: usize, v6: bool, b_if: &str, peer: &dyn Fn(usize) -> IpAddr) -> String {
        let (table, fam, addr_type, saddr, a) =
            if v6 { ("bench6", "ipv6", "ipv6_addr", "ip6 saddr", IpAddr::V6(A6)) } else { ("bench4", "ipv4", "ipv4_addr", "ip saddr", IpAddr::V4(A4)) };
        let mut chain = String::from("    ct state established,related accept\n");
        let mut set = String::new();
        if self.variant == Variant::Nftables {
            let mut elements: Vec<String> = (0..fillers).map(|i| format!("{} . {}", peer(i), filler_port(i))).collect();
            elements.extend((ALLOWED_FIRST..=ALLOWED_LAST).chain([CRR_PORT]).map(|p| format!("{a} . {p}")));
            set = format!("  set pod_b_in {{\n    type {addr_type} . inet_service\n    size 262144\n    elements = {{ {} }}\n  }}\n", elements.join(", "));
            chain += &format!("    {saddr} . udp dport @pod_b_in accept\n    {saddr} . tcp dport @pod_b_in accept\n");
        } else {
            for i in 0..fillers {
                chain += &format!("    {saddr} {} udp dport {} accept\n", peer(i), filler_port(i));
            }
            chain += &format!("    {saddr} {a} udp dport {ALLOWED_FIRST}-{ALLOWED_LAST} accept\n    {saddr} {a} tcp dport {CRR_PORT} accept\n");
        }
        format!(
            "table inet {table} {{}}\ndelete table inet {table}\ntable inet {table} {{\n{set}  chain pod_b_ingress {{\n{chain}    drop\n  }}\n  chain forward {{\n    type filter hook forward priority filter; policy accept;\n    meta nfproto {fam} oifname \"{b_if}\" jump pod_b_ingress\n  }}\n}}\n"
        )
    }

    /// Removes this variant's IPv4 rules (before the IPv6 floods, so they do not slow them).
    fn clear_v4(&self) {
        match self.variant {
            Variant::None | Variant::Bpf => {}
            Variant::Iptables | Variant::Ipset => {
                self.exec_file(&[IPTABLES_RESTORE], "iptables.txt", "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n", 60.0);
                if self.variant == Variant::Ipset {
                    self.node.ns.exec(&["ipset", "destroy", "pod-b-in"]);
                }
            }
            Variant::Nftables | Variant::NftLinear => {
                self.exec_file(&["nft", "-f"], "nft.txt", "table inet bench4 {}\ndelete table inet bench4\n", 60.0);
            }
        }
    }
    fn tx_packets(&self, ifname: &str) -> u64 {
        let out = self.node.ns.exec(&["cat", &format!("/sys/class/net/{ifname}/statistics/tx_packets")]);
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0)
    }
}

/// iptables with the x_tables backend (the classic one kube-router-style chains use); the
/// nft-backed `iptables` compiles every rule to nftables bytecode, as the nft rows show.
pub const IPTABLES_RESTORE: &str = "iptables-legacy-restore";
pub const IP6TABLES_RESTORE: &str = "ip6tables-legacy-restore";

/// UDP sockets bound in `b` on every port a flood targets, with tiny receive buffers: what
/// arrives is delivered to a socket and dropped when the buffer is full, without ICMP.
struct Sink {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Sink {
    fn start(ns: &Netns) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let s = stop.clone();
        let handle = ns.spawn(move || {
            let mut sockets = Vec::new();
            for port in (ALLOWED_FIRST..=ALLOWED_LAST).chain([DENIED_PORT]) {
                // [::] without IPV6_V6ONLY: one socket for the IPv4 and the IPv6 floods.
                let sock = std::net::UdpSocket::bind(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port)).expect("bind sink");
                let size: libc::c_int = 2048;
                // SAFETY: a valid socket and option buffer.
                unsafe { libc::setsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, (&raw const size).cast(), 4) };
                sockets.push(sock);
            }
            let _ = tx.send(());
            while !s.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(20));
            }
            drop(sockets);
        });
        rx.recv_timeout(Duration::from_secs(10)).expect("sink ready");
        Self { stop, handle: Some(handle) }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Sends UDP frames (64 bytes for IPv4, 84 for IPv6) from `ns` to `dst` with sendmmsg on a
/// raw socket (we write the UDP header, so ports can change per packet) for `secs`; the
/// deadline is checked after every batch, so slow rule sets stay bounded. Returns (sent,
/// seconds, sender thread CPU ns).
fn send_flood(ns: &Netns, dst: IpAddr, kind: Kind, first_flow: u64, secs: f64) -> (u64, f64, f64) {
    ns.run(move || {
        let af = if dst.is_ipv6() { libc::AF_INET6 } else { libc::AF_INET };
        // SAFETY: a fresh raw socket we own.
        let fd = unsafe { libc::socket(af, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::IPPROTO_UDP) };
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        // SAFETY: we own fd.
        let _owned = unsafe { OwnedFd::from_raw_fd(fd) };
        if dst.is_ipv6() {
            // IPv6 has no "no checksum": let the kernel fill it in at offset 6.
            const IPV6_CHECKSUM: libc::c_int = 7;
            let offset: libc::c_int = 6;
            // SAFETY: a valid socket and option buffer.
            unsafe { libc::setsockopt(fd, libc::IPPROTO_IPV6, IPV6_CHECKSUM, (&raw const offset).cast(), 4) };
        }
        let (addr, addr_len) = crate::probe::sockaddr(&SocketAddr::new(dst, 0));
        let mut bufs = vec![[0u8; 8 + PAYLOAD]; BATCH];
        let fixed_dport = if kind == Kind::Denied { DENIED_PORT } else { ALLOWED_FIRST };
        for b in &mut bufs {
            b[0..2].copy_from_slice(&40000u16.to_be_bytes());
            b[2..4].copy_from_slice(&fixed_dport.to_be_bytes());
            b[4..6].copy_from_slice(&((8 + PAYLOAD) as u16).to_be_bytes());
        }
        let mut iovs: Vec<libc::iovec> = bufs.iter_mut().map(|b| libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: b.len() }).collect();
        // SAFETY: mmsghdr is plain data; zero is a valid start.
        let mut msgs: Vec<libc::mmsghdr> = (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
        for (m, iov) in msgs.iter_mut().zip(iovs.iter_mut()) {
            m.msg_hdr.msg_name = (&raw const addr).cast_mut().cast();
            m.msg_hdr.msg_namelen = addr_len;
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
        }
        let mut flow = first_flow;
        let mut sent = 0u64;
        let cpu0 = thread_cpu_ns();
        let start = Instant::now();
        let deadline = Duration::from_secs_f64(secs);
        while start.elapsed() < deadline {
            if kind == Kind::AllowedNewFlows {
                for b in &mut bufs {
                    let sport = 1024 + (flow % 64512) as u16;
                    let dport = ALLOWED_FIRST + ((flow / 64512) % 1000) as u16;
                    b[0..2].copy_from_slice(&sport.to_be_bytes());
                    b[2..4].copy_from_slice(&dport.to_be_bytes());
                    flow += 1;
                }
            }
            // SAFETY: msgs point at live buffers, iovecs and the address for this call.
            let n = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), BATCH as u32, 0) };
            if n > 0 {
                sent += n as u64;
            }
        }
        let elapsed = start.elapsed().as_secs_f64();
        (sent, elapsed, thread_cpu_ns() - cpu0)
    })
}

fn flood_once(topo: &mut Topology, rules: usize, v6: bool, kind: Kind, round: usize, secs: f64) -> Run {
    let b_if = topo.host_if("b");
    let before = topo.tx_packets(&b_if);
    let cpu0 = CpuTicks::now();
    let first = topo.next_flow;
    let dst = if v6 { IpAddr::V6(B6) } else { IpAddr::V4(B4) };
    let (sent, elapsed, sender_cpu) = send_flood(&topo.node.pod("a").ns, dst, kind, first, secs);
    let cpu1 = CpuTicks::now();
    if kind == Kind::AllowedNewFlows {
        topo.next_flow += sent + BATCH as u64;
    }
    // Let the last batch drain through the softirq before reading the counter.
    std::thread::sleep(Duration::from_millis(20));
    let delivered = topo.tx_packets(&b_if).saturating_sub(before);
    let sent_pps = sent as f64 / elapsed;
    let delivered_pps = delivered as f64 / elapsed;
    Run {
        variant: topo.variant,
        v6,
        rules,
        kind,
        round,
        secs: elapsed,
        sent,
        delivered,
        sent_pps,
        delivered_pps,
        dropped_pps: sent.saturating_sub(delivered) as f64 / elapsed,
        cpu_ns_per_packet: cpu1.busy_ns_since(&cpu0) / sent.max(1) as f64,
        sender_cpu_ns_per_packet: sender_cpu / sent.max(1) as f64,
    }
}

fn handled_pps(run: &Run) -> f64 {
    if run.kind == Kind::Denied && run.variant != Variant::None { run.dropped_pps } else { run.delivered_pps }
}

/// TCP throughput a -> b with iperf3 (Gbit/s), bounded by `timeout`.
fn iperf(topo: &Topology, secs: u32) -> f64 {
    let b = &topo.node.pod("b").ns.name;
    let a = &topo.node.pod("a").ns.name;
    let limit = (secs + 10).to_string();
    let mut server = Command::new("timeout")
        .args([limit.as_str(), "ip", "netns", "exec", b, "iperf3", "-s", "-1", "-p", &IPERF_PORT.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start iperf3 server");
    let target = SocketAddr::new(IpAddr::V4(B4), IPERF_PORT);
    let start = Instant::now();
    // Wait until the server listens (a probe connection would count as its one client, so
    // look at the listening sockets instead).
    while start.elapsed() < Duration::from_secs(5) {
        let out = Command::new("ip").args(["netns", "exec", b, "ss", "-Hltn", &format!("sport = :{IPERF_PORT}")]).output();
        if out.is_ok_and(|o| !o.stdout.is_empty()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = Command::new("timeout")
        .args([limit.as_str(), "ip", "netns", "exec", a, "iperf3", "-c", &target.ip().to_string(), "-p", &IPERF_PORT.to_string(), "-t", &secs.to_string(), "-J"])
        .output()
        .expect("run iperf3 client");
    let _ = server.kill();
    let _ = server.wait();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    json["end"]["sum_received"]["bits_per_second"].as_f64().map_or(f64::NAN, |b| b / 1e9)
}

pub fn run(settings: &Settings, agent: &Path) -> Results {
    let mut results = Results {
        seconds_per_run: settings.seconds,
        rounds: settings.rounds,
        rules: settings.rules.clone(),
        rules6: settings.rules6.clone(),
        budget_secs: settings.budget_secs,
        tcp_seconds: settings.tcp_seconds,
        iptables_binary: IPTABLES_RESTORE.to_owned(),
        nf_conntrack_max: std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_max").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0),
        ..Results::default()
    };
    log("flood: building one node with two pods per variant");
    let mut topos: Vec<Topology> = Variant::ALL.iter().map(|&v| Topology::new(v, agent)).collect();
    let _sinks: Vec<Sink> = topos.iter().map(|t| Sink::start(&t.node.pod("b").ns)).collect();
    let mut counts: Vec<usize> = settings.rules.iter().copied().chain(settings.rates.as_ref().map(|r| r.rules)).collect();
    counts.sort_unstable();
    counts.dedup();
    for &rules in &counts {
        install_all(&mut topos, rules, false, settings.budget_secs, &mut results.installs);
        if settings.rules.contains(&rules) {
            flood_rounds(&mut topos, rules, false, settings, &mut results);
        }
        if let Some(rates) = settings.rates.as_ref().filter(|r| r.rules == rules) {
            let pods: Vec<(Variant, &Netns, &Netns)> =
                topos.iter().filter(|t| !t.timed_out[0]).map(|t| (t.variant, &t.node.pod("a").ns, &t.node.pod("b").ns)).collect();
            results.rates = Some(super::crr::run(rates, &pods));
        }
    }
    if settings.iperf {
        results.tcp = tcp_throughput(&topos, settings);
    }
    if !settings.rules6.is_empty() {
        for t in &topos {
            t.clear_v4();
        }
        for &rules in &settings.rules6 {
            install_all(&mut topos, rules, true, settings.budget_secs, &mut results.installs);
            flood_rounds(&mut topos, rules, true, settings, &mut results);
        }
    }
    for t in &topos {
        let _ = std::fs::remove_dir_all(&t.scratch);
        if let Some(b) = &t.bpffs {
            let _ = Command::new(agent).args(["cleanup", "--bpffs"]).arg(&b.path).stdout(Stdio::null()).status();
        }
    }
    drop(_sinks);
    drop(topos);
    results
}

/// Installs `rules` in every variant that has not yet run out of its budget in this family.
fn install_all(topos: &mut [Topology], rules: usize, v6: bool, budget: f64, installs: &mut Vec<Install>) {
    for t in topos.iter_mut().filter(|t| !t.timed_out[usize::from(v6)]) {
        let started = Instant::now();
        let ok = t.install(rules, v6, budget);
        let secs = started.elapsed().as_secs_f64();
        t.timed_out[usize::from(v6)] = !ok;
        installs.push(Install { variant: t.variant, rules, v6, secs, timed_out: !ok });
        log(format!(
            "flood: {} {} rules installed in {secs:.1} s{}",
            t.variant.short(),
            rules,
            if ok { String::new() } else { format!(" - TIMED OUT (budget {budget:.0} s), skipped from here on") }
        ));
    }
}

/// `settings.rounds` rounds of every flood kind over every variant still in, interleaved.
fn flood_rounds(topos: &mut [Topology], rules: usize, v6: bool, settings: &Settings, results: &mut Results) {
    for round in 0..settings.rounds {
        for t in topos.iter_mut().filter(|t| !t.timed_out[usize::from(v6)]) {
            for kind in Kind::ALL {
                let run = flood_once(t, rules, v6, kind, round, settings.seconds);
                results.runs.push(run);
            }
        }
        log(format!("flood{}: {rules} rules, round {} of {} done", if v6 { " IPv6" } else { "" }, round + 1, settings.rounds));
    }
    results.summary.extend(summarize(&results.runs, rules, v6));
}

/// Per variant and kind of flood, the medians of the rounds run with `rules` rules.
fn summarize(runs: &[Run], rules: usize, v6: bool) -> Vec<Summary> {
    let mut summaries = Vec::new();
    for kind in Kind::ALL {
        let pick = |v: Variant| -> Vec<&Run> { runs.iter().filter(|r| r.variant == v && r.v6 == v6 && r.rules == rules && r.kind == kind).collect() };
        let none = pick(Variant::None);
        let base_of = |round: usize| none.iter().find(|r| r.round == round).map_or(f64::NAN, |r| handled_pps(r));
        for v in Variant::ALL {
            let runs = pick(v);
            if runs.is_empty() {
                continue;
            }
            let med = |f: &dyn Fn(&Run) -> f64| median(&runs.iter().map(|r| f(r)).collect::<Vec<_>>());
            // Paired with the no-enforcement run of the same round, then the median.
            let summary = Summary {
                variant: v,
                v6,
                rules,
                kind,
                pps: med(&handled_pps),
                sent_pps: med(&|r| r.sent_pps),
                delivered_fraction: med(&|r| r.delivered as f64 / r.sent.max(1) as f64),
                cpu_ns_per_packet: med(&|r| r.cpu_ns_per_packet),
                sender_cpu_ns_per_packet: med(&|r| r.sender_cpu_ns_per_packet),
                ratio: med(&|r| handled_pps(r) / base_of(r.round)),
                added_ns: med(&|r| 1e9 / handled_pps(r) - 1e9 / base_of(r.round)),
                rounds: runs.len(),
            };
            log(format!(
                "flood{} {rules:>6} rules, {:<29} {:<38} {:>9.0} pps ({:.2}x), delivered {:>5.1}%, {:.0} ns CPU/packet",
                if v6 { "6" } else { "" },
                kind.label(),
                v.label(),
                summary.pps,
                summary.ratio,
                summary.delivered_fraction * 100.0,
                summary.cpu_ns_per_packet
            ));
            summaries.push(summary);
        }
    }
    summaries
}

/// TCP: no enforcement vs the classifier (b isolated, a allowed on the iperf3 port), rounds
/// interleaved.
fn tcp_throughput(topos: &[Topology], settings: &Settings) -> Vec<TcpSummary> {
    let mut tcp: Vec<(Variant, Vec<f64>)> = vec![(Variant::None, Vec::new()), (Variant::Bpf, Vec::new())];
    for _ in 0..settings.tcp_rounds {
        for (v, samples) in &mut tcp {
            let topo = topos.iter().find(|t| t.variant == *v).expect("topology");
            samples.push(iperf(topo, settings.tcp_seconds));
        }
    }
    let base = median(&tcp[0].1);
    tcp.into_iter()
        .map(|(v, samples)| {
            let gbits = median(&samples);
            log(format!("tcp: {} {gbits:.2} Gbit/s ({:.2}x)", v.label(), gbits / base));
            TcpSummary { variant: v, gbits, samples, ratio: gbits / base }
        })
        .collect()
}
