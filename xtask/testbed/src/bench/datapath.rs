//! Per-packet cost of the classifier through BPF_PROG_TEST_RUN, at growing map sizes.
//!
//! TEST_RUN runs one packet `repeat` times and reports the mean time per run. That is sound
//! for paths that do not change state: a conntrack hit (established), a drop (drops are never
//! tracked) and a pod with no isolation. A new allowed flow is tracked by its first run, so
//! it is measured per call instead: many distinct packets (a new source port each) with
//! repeat = 1, next to an empty program and an established packet timed the same way, and the
//! medians of those single runs are compared. The floor (an empty SCHED_CLS program, loaded
//! through the raw bpf(2) syscall) is measured in both modes and subtracted.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{FromRawFd as _, OwnedFd, AsRawFd as _},
};

use aya::{
    programs::{SchedClassifier, TestRun as _, TestRunOptions},
};
use policy_common::{
    Direction,
    conntrack::{CtKey, CtValue},
    endpoint::{EndpointInfo, EndpointKey, FLAG_HAS_IPV4, FLAG_HAS_IPV6, FLAG_INGRESS_ISOLATED},
    event::{CONFIG_EVENTS_DENIED, Config},
    family,
    ipcache::{IpcacheKey, IpcacheValue},
    policy::{PREFIX_FULL, PolicyKey, PolicyValue, lookup},
    proto,
};
use serde::{Deserialize, Serialize};

use super::{log, median};
use policy_agent::{
    compile::MapOp,
    datapath::{Datapath, Hook, MapSizes, Maps, PinLayout},
};

use crate::packet::{ACK, Frame, SYN};

/// BPF_PROG_TEST_RUN runs on the loopback device: the endpoint entry is keyed by ifindex 1.
pub(super) const LO: u32 = 1;
const ENDPOINT_SPREAD: usize = 64;
/// A pass hands the packet to the next program of the TCX chain (TCX_NEXT, -1).
pub(super) const TC_ACT_OK: u32 = u32::MAX;
pub(super) const TC_ACT_SHOT: u32 = 2;

#[derive(Clone, Debug)]
pub struct Settings {
    pub sizes: Vec<usize>,
    pub repeat: u32,
    pub runs: usize,
    pub new_flow_calls: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Row {
    pub family: String,
    pub entries: usize,
    pub path: String,
    /// "repeat" (TEST_RUN repeat) or "per-call" (median of repeat = 1 calls).
    pub method: String,
    /// Median ns per packet, floor included.
    pub ns: f64,
    /// Median minus the floor measured the same way.
    pub net_ns: f64,
    /// Raw; empty in summary.json.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub samples: Vec<f64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Results {
    pub repeat: u32,
    pub runs: usize,
    pub new_flow_calls: usize,
    pub floor_repeat_ns: f64,
    pub floor_per_call_ns: f64,
    pub rows: Vec<Row>,
}

pub const PATHS: [&str; 4] = ["established", "new allowed", "denied", "not isolated"];

impl Results {
    pub fn get(&self, family: &str, entries: usize, path: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.family == family && r.entries == entries && r.path == path)
    }
}

/// An empty SCHED_CLS program (`r0 = 0; exit`) loaded through the raw bpf(2) syscall.
pub(super) struct EmptyProgram {
    fd: OwnedFd,
}

#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn put_u32(&mut self, off: usize, v: u32) {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
    }
    fn put_u64(&mut self, off: usize, v: u64) {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
    }
    fn u32_at(&self, off: usize) -> u32 {
        u32::from_ne_bytes(self.0[off..off + 4].try_into().expect("4 bytes"))
    }
}

fn bpf(cmd: i64, attr: &mut Attr) -> std::io::Result<i64> {
    // SAFETY: a valid attribute buffer of the size we pass; the kernel reads and writes
    // within it.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.0.as_mut_ptr(), attr.0.len()) };
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(rc) }
}

impl EmptyProgram {
    pub(super) fn load() -> std::io::Result<Self> {
        const BPF_PROG_LOAD: i64 = 5;
        const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
        let insns: [u8; 16] = [0xb7, 0, 0, 0, 0, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0];
        let license = b"GPL\0";
        let mut attr = Attr([0; 128]);
        attr.put_u32(0, BPF_PROG_TYPE_SCHED_CLS);
        attr.put_u32(4, 2);
        attr.put_u64(8, insns.as_ptr() as u64);
        attr.put_u64(16, license.as_ptr() as u64);
        attr.0[48..53].copy_from_slice(b"floor");
        let fd = bpf(BPF_PROG_LOAD, &mut attr)?;
        // SAFETY: the kernel returned a new file descriptor we now own.
        Ok(Self { fd: unsafe { OwnedFd::from_raw_fd(fd as i32) } })
    }

    /// ns per run, as the kernel reports it.
    pub(super) fn run(&self, data: &[u8], repeat: u32) -> f64 {
        const BPF_PROG_TEST_RUN: i64 = 10;
        let mut attr = Attr([0; 128]);
        attr.put_u32(0, self.fd.as_raw_fd() as u32);
        attr.put_u32(8, data.len() as u32);
        attr.put_u64(16, data.as_ptr() as u64);
        attr.put_u32(32, repeat);
        bpf(BPF_PROG_TEST_RUN, &mut attr).expect("BPF_PROG_TEST_RUN of the empty program");
        f64::from(attr.u32_at(36))
    }
}

pub(super) fn run_prog(prog: &SchedClassifier, data: &[u8], repeat: u32, expect: u32) -> f64 {
    let opts = TestRunOptions { data_in: Some(data), repeat, ..TestRunOptions::default() };
    let result = prog.test_run(opts).expect("BPF_PROG_TEST_RUN");
    assert_eq!(result.return_value, expect, "unexpected verdict in the benchmark setup");
    result.duration.as_nanos() as f64
}

pub(super) fn peer_v4(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + 256 + i as u32)
}
fn peer_v6(i: usize) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 0)) + 256 + i as u128)
}
pub(super) const POD_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 10);
const POD_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0xffff, 0, 0, 0, 0x10);
pub(super) fn identity(i: usize) -> u32 {
    256 + i as u32
}
fn endpoint_of(i: usize) -> u32 {
    1 + (i % ENDPOINT_SPREAD) as u32
}
pub(super) fn port_of(i: usize) -> u16 {
    1000 + (i % 1000) as u16
}
pub(super) const DENIED_PORT: u16 = 7;

pub(super) fn addr16(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(a) => {
            let mut out = [0; 16];
            out[..4].copy_from_slice(&a.octets());
            out
        }
        IpAddr::V6(a) => a.octets(),
    }
}

/// Writes entries `from..to`: an IPv4 and an IPv6 prefix per identity, a policy entry per
/// identity (spread over 64 endpoints and 1,000 ports) and a conntrack entry.
fn fill(maps: &mut Maps, from: usize, to: usize) {
    let far = u64::MAX / 2;
    for i in from..to {
        let id = IpcacheValue { identity: identity(i) };
        let v4 = MapOp::IpcacheUpsert { prefix_len: IpcacheKey::lpm_prefix_len(32), key: IpcacheKey::v4(peer_v4(i).octets()), value: id };
        let v6 = MapOp::IpcacheUpsert { prefix_len: IpcacheKey::lpm_prefix_len(128), key: IpcacheKey::v6(peer_v6(i).octets()), value: id };
        let key = PolicyKey::new(endpoint_of(i), identity(i), Direction::Ingress, proto::TCP, port_of(i));
        let allow = MapOp::PolicyUpsert { prefix_len: PREFIX_FULL, key, value: PolicyValue::allow(16 + i as u32) };
        for op in [v4, v6, allow] {
            maps.write(&op).expect("map write");
        }
        let (fam, pod, peer) = if i % 2 == 0 {
            (family::IPV4, IpAddr::V4(POD_V4), IpAddr::V4(peer_v4(i)))
        } else {
            (family::IPV6, IpAddr::V6(POD_V6), IpAddr::V6(peer_v6(i)))
        };
        let ct = CtKey::new(endpoint_of(i), fam, proto::TCP, addr16(pod), port_of(i), addr16(peer), 20000 + (i % 40000) as u16);
        maps.conntrack.insert(ct, CtValue { expires_ns: far, cookie: 16, origin: 0, tcp_flags: 0, flags: 0, _pad: 0, revision: 0, _pad2: 0 }, 0).expect("conntrack");
    }
}

pub fn run(cfg: &Settings, bpffs_root: &std::path::Path) -> Results {
    let max = cfg.sizes.iter().copied().max().unwrap_or(10);
    let sizes = MapSizes {
        addresses: Some((2 * max + 1024) as u32),
        policy: Some((max + 1024) as u32),
        conntrack: Some((2 * (max + cfg.new_flow_calls) + 4096).next_power_of_two() as u32),
    };
    let mut dp = Datapath::load_with_sizes(PinLayout::new(bpffs_root), sizes).expect("load classifier");
    let mut maps = dp.take_maps().expect("maps");
    // The agent's defaults: a flow log of drops, 1,000 events per second per CPU.
    maps.config.set(0, Config { flags: CONFIG_EVENTS_DENIED, events_per_sec: 1000, ct_budget: u32::MAX, _pad: 0 }, 0).expect("config");
    let floor = EmptyProgram::load().expect("load the empty program");
    let prog = dp.program(Hook::ToPod).expect("to_pod");

    let mut results = Results { repeat: cfg.repeat, runs: cfg.runs, new_flow_calls: cfg.new_flow_calls, ..Results::default() };
    let mut floor_repeat = Vec::new();
    let mut floor_call = Vec::new();
    let mut filled = 0;
    for &n in &cfg.sizes {
        fill(&mut maps, filled, n);
        filled = n;
        for v6 in [false, true] {
            let target = Target::new(n, v6);
            let (repeat, floors) = measure_repeat(cfg, prog, &floor, &mut maps, &target);
            let per_call = measure_per_call(cfg, prog, &floor, &mut maps, &target);
            let floor_rep = median(&floors);
            let floor_one = median(&per_call.floor);
            let mut push = |path: &str, method: &str, s: Vec<f64>, floor: f64| {
                let ns = median(&s);
                results.rows.push(Row { family: target.family.into(), entries: n, path: path.into(), method: method.into(), ns, net_ns: ns - floor, samples: s });
            };
            let [est, den, not_iso] = repeat;
            push("established", "repeat", est, floor_rep);
            push("new allowed", "per-call", per_call.new_flow, floor_one);
            push("denied", "repeat", den, floor_rep);
            push("not isolated", "repeat", not_iso, floor_rep);
            push("established (per-call check)", "per-call", per_call.established, floor_one);
            floor_repeat.extend(floors);
            floor_call.extend(per_call.floor);
            let r = |p: &str| results.get(target.family, n, p).map_or(f64::NAN, |r| r.net_ns);
            log(format!(
                "datapath {} {n:>6} entries: established {:.0} ns, new allowed {:.0} ns, denied {:.0} ns, not isolated {:.0} ns (net of floor {floor_rep:.0}/{floor_one:.0} ns)",
                target.family, r("established"), r("new allowed"), r("denied"), r("not isolated")
            ));
        }
    }
    results.floor_repeat_ns = median(&floor_repeat);
    results.floor_per_call_ns = median(&floor_call);
    results
}

/// The measured flow at one map size and family: from the peer in the middle of the filled
/// entries to the pod, on that peer's allowed port.
struct Target {
    family: &'static str,
    v6: bool,
    pod: IpAddr,
    peer: IpAddr,
    endpoint: u32,
    port: u16,
}

impl Target {
    fn new(entries: usize, v6: bool) -> Self {
        let mid = entries / 2;
        let (family, pod, peer) = if v6 {
            ("IPv6", IpAddr::V6(POD_V6), IpAddr::V6(peer_v6(mid)))
        } else {
            ("IPv4", IpAddr::V4(POD_V4), IpAddr::V4(peer_v4(mid)))
        };
        Self { family, v6, pod, peer, endpoint: endpoint_of(mid), port: port_of(mid) }
    }
}

pub(super) fn set_endpoint(maps: &mut Maps, endpoint: u32, flags: u32) {
    // As the compiler writes it for a pod with exact-port rules plus the node's any-protocol
    // entry: two lookups for a denied flow.
    let mut lookups = [0; 2];
    lookups[Direction::Ingress as usize] = lookup::EXACT | lookup::ANY_PROTOCOL;
    let info = EndpointInfo { id: endpoint, flags: flags | FLAG_HAS_IPV4 | FLAG_HAS_IPV6, ipv4: POD_V4.octets(), ipv6: POD_V6.octets(), lookups, _pad: [0; 2], revision: 0 };
    maps.endpoints.insert(EndpointKey { ifindex: LO }, info, 0).expect("endpoint");
}

/// The paths TEST_RUN can repeat (established, denied, not isolated), `cfg.runs` times
/// each, and the empty program's time per run alongside.
fn measure_repeat(cfg: &Settings, prog: &SchedClassifier, floor: &EmptyProgram, maps: &mut Maps, t: &Target) -> ([Vec<f64>; 3], Vec<f64>) {
    let syn = Frame::tcp(t.peer, 40000, t.pod, t.port, SYN).padded();
    let ack = Frame::tcp(t.peer, 40000, t.pod, t.port, ACK).padded();
    let denied = Frame::tcp(t.peer, 40001, t.pod, DENIED_PORT, SYN).padded();
    set_endpoint(maps, t.endpoint, FLAG_INGRESS_ISOLATED);
    // Opens the flow the established packets belong to.
    run_prog(prog, &syn, 1, TC_ACT_OK);
    // One untimed round first (JIT image, map pages and caches warm).
    floor.run(&ack, cfg.repeat / 10);
    run_prog(prog, &ack, cfg.repeat / 10, TC_ACT_OK);
    run_prog(prog, &denied, cfg.repeat / 10, TC_ACT_SHOT);
    for _ in 0..1000 {
        floor.run(&ack, 1);
        run_prog(prog, &ack, 1, TC_ACT_OK);
    }
    let mut samples: [Vec<f64>; 3] = Default::default();
    let mut floors = Vec::new();
    for _ in 0..cfg.runs {
        floors.push(floor.run(&ack, cfg.repeat));
        samples[0].push(run_prog(prog, &ack, cfg.repeat, TC_ACT_OK));
        samples[1].push(run_prog(prog, &denied, cfg.repeat, TC_ACT_SHOT));
        set_endpoint(maps, t.endpoint, 0);
        samples[2].push(run_prog(prog, &syn, cfg.repeat, TC_ACT_OK));
        set_endpoint(maps, t.endpoint, FLAG_INGRESS_ISOLATED);
    }
    (samples, floors)
}

/// Single-call timings, interleaved.
struct PerCall {
    new_flow: Vec<f64>,
    established: Vec<f64>,
    floor: Vec<f64>,
}

/// New allowed flows, one call per packet (a new source port each), interleaved with the
/// two baselines; then removes the conntrack entries they created.
fn measure_per_call(cfg: &Settings, prog: &SchedClassifier, floor: &EmptyProgram, maps: &mut Maps, t: &Target) -> PerCall {
    let ack = Frame::tcp(t.peer, 40000, t.pod, t.port, ACK).padded();
    let mut calls = PerCall { new_flow: Vec::new(), established: Vec::new(), floor: Vec::new() };
    for j in 0..cfg.new_flow_calls {
        let fresh = Frame::tcp(t.peer, 1024 + j as u16, t.pod, t.port, SYN).padded();
        calls.floor.push(floor.run(&fresh, 1));
        calls.established.push(run_prog(prog, &ack, 1, TC_ACT_OK));
        calls.new_flow.push(run_prog(prog, &fresh, 1, TC_ACT_OK));
    }
    let fam_code = if t.v6 { family::IPV6 } else { family::IPV4 };
    let mut stale = 0;
    for j in 0..cfg.new_flow_calls {
        let key = CtKey::new(t.endpoint, fam_code, proto::TCP, addr16(t.pod), t.port, addr16(t.peer), 1024 + j as u16);
        if maps.conntrack.remove(&key).is_err() {
            stale += 1;
        }
    }
    if stale > 0 {
        log(format!("datapath: {stale} new-flow conntrack entries were not found to remove"));
    }
    calls
}
