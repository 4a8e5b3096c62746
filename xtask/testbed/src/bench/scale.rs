//! The classifier's per-packet cost at 10 to 1,000,000 map entries with random peers, so
//! cache misses show (the `scale` part). The repeat-mode figures of `datapath` run one packet
//! again and again, so every lookup hits a warm cache line; here a pool of many frames from
//! peers drawn at random over all the filled entries runs in turn, one TEST_RUN call each
//! (repeat = 1), next to the empty program on the same frame, and the kernel-reported
//! durations are averaged over the pool.

use aya::programs::SchedClassifier;
use policy_common::{
    Direction,
    conntrack::{CtKey, CtValue},
    endpoint::FLAG_INGRESS_ISOLATED,
    event::{CONFIG_EVENTS_DENIED, Config},
    family,
    ipcache::{IpcacheKey, IpcacheValue},
    policy::{PREFIX_FULL, PolicyKey, PolicyValue},
    proto,
};
use serde::{Deserialize, Serialize};

use super::{
    datapath::{DENIED_PORT, EmptyProgram, POD_V4, TC_ACT_OK, TC_ACT_SHOT, addr16, identity, peer_v4, port_of, run_prog},
    log, median,
};
use crate::packet::{ACK, Frame, SYN};
use policy_agent::{
    compile::MapOp,
    datapath::{Datapath, Hook, MapSizes, Maps, PinLayout},
};

/// Every entry belongs to one endpoint here, so any peer of the pool hits its entries.
const ENDPOINT: u32 = 1;

#[derive(Clone, Debug)]
pub struct Settings {
    pub sizes: Vec<usize>,
    /// Frames in the pool (peers drawn at random, with repetition, from the filled entries).
    pub pool: usize,
    /// Passes over the pool per path; the table shows the median of the pass means.
    pub passes: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Row {
    pub entries: usize,
    pub path: String,
    /// Median over passes of the mean ns per call, floor included.
    pub ns: f64,
    /// The empty program's mean per call on the same frames, same passes.
    pub floor_ns: f64,
    /// Median over passes of (mean - floor mean).
    pub net_ns: f64,
    /// The same, measured the same way, with every frame of the pool from one peer (a hot key).
    #[serde(default)]
    pub hot_net_ns: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Results {
    pub pool: usize,
    pub passes: usize,
    pub conntrack_capacity: u32,
    pub rows: Vec<Row>,
}

impl Results {
    pub fn get(&self, entries: usize, path: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.entries == entries && r.path == path)
    }
}

/// Entries `from..to`: the peer's IPv4 address, an allow entry on its port, a live flow.
fn fill(maps: &mut Maps, from: usize, to: usize) {
    let far = u64::MAX / 2;
    for i in from..to {
        let id = IpcacheValue { identity: identity(i) };
        let v4 = MapOp::IpcacheUpsert { prefix_len: IpcacheKey::lpm_prefix_len(32), key: IpcacheKey::v4(peer_v4(i).octets()), value: id };
        let key = PolicyKey::new(ENDPOINT, identity(i), Direction::Ingress, proto::TCP, port_of(i));
        let allow = MapOp::PolicyUpsert { prefix_len: PREFIX_FULL, key, value: PolicyValue::allow(16) };
        for op in [v4, allow] {
            maps.write(&op).expect("map write");
        }
        let ct = CtKey::new(ENDPOINT, family::IPV4, proto::TCP, addr16(POD_V4.into()), port_of(i), addr16(peer_v4(i).into()), 20000 + (i % 40000) as u16);
        maps.conntrack.insert(ct, CtValue { expires_ns: far, cookie: 16, origin: 0, tcp_flags: 0, flags: 0, _pad: 0, revision: 0, _pad2: 0 }, 0).expect("conntrack");
    }
}

/// A small xorshift: reproducible random peers without a dependency.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

pub fn run(cfg: &Settings, bpffs_root: &std::path::Path) -> Results {
    let max = cfg.sizes.iter().copied().max().unwrap_or(10);
    let extra = cfg.pool * (cfg.passes + 2) + 4096;
    let conntrack_capacity = ((max + extra) as u32).next_power_of_two();
    let sizes = MapSizes { addresses: Some((max + 1024) as u32), policy: Some((max + 1024) as u32), conntrack: Some(conntrack_capacity) };
    let mut dp = Datapath::load_with_sizes(PinLayout::new(bpffs_root), sizes).expect("load classifier");
    let mut maps = dp.take_maps().expect("maps");
    maps.config.set(0, Config { flags: CONFIG_EVENTS_DENIED, events_per_sec: 1000, ct_budget: u32::MAX, _pad: 0 }, 0).expect("config");
    let floor = EmptyProgram::load().expect("load the empty program");
    let prog = dp.program(Hook::ToPod).expect("to_pod");
    let mut results = Results { pool: cfg.pool, passes: cfg.passes, conntrack_capacity, rows: Vec::new() };
    let mut filled = 0;
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    for &n in &cfg.sizes {
        let started = std::time::Instant::now();
        fill(&mut maps, filled, n);
        filled = n;
        log(format!("scale: {n} entries filled in {:.1} s", started.elapsed().as_secs_f64()));
        let peers: Vec<usize> = (0..cfg.pool).map(|_| (next_random(&mut seed) % n as u64) as usize).collect();
        let random = measure(cfg, prog, &floor, &mut maps, &peers, 0);
        let hot = measure(cfg, prog, &floor, &mut maps, &vec![peers[0]; peers.len()], cfg.passes);
        for ((path, ns, floor_ns, net_ns), (_, _, _, hot_net_ns)) in random.into_iter().zip(hot) {
            results.rows.push(Row { entries: n, path: path.into(), ns, floor_ns, net_ns, hot_net_ns });
        }
        let r = |p: &str| results.get(n, p).map_or((f64::NAN, f64::NAN), |r| (r.net_ns, r.hot_net_ns));
        log(format!(
            "scale {n:>8} entries, per call above the floor, random peers (one hot peer): established {:.0} ({:.0}) ns, new allowed {:.0} ({:.0}) ns, denied {:.0} ({:.0}) ns, not isolated {:.0} ({:.0}) ns",
            r("established").0, r("established").1, r("new allowed").0, r("new allowed").1, r("denied").0, r("denied").1, r("not isolated").0, r("not isolated").1
        ));
    }
    results
}

/// Mean ns per call of `prog` and of the floor over `frames`, one call each (median over
/// `passes` passes of the means and of their differences).
fn timed_passes(passes: usize, prog: &SchedClassifier, floor: &EmptyProgram, frames: &dyn Fn(usize) -> Vec<Vec<u8>>, expect: u32) -> (f64, f64, f64) {
    let (mut means, mut floors, mut nets) = (Vec::new(), Vec::new(), Vec::new());
    for pass in 0..passes {
        let batch = frames(pass);
        let (mut sum, mut floor_sum) = (0.0, 0.0);
        for f in &batch {
            floor_sum += floor.run(f, 1);
            sum += run_prog(prog, f, 1, expect);
        }
        let k = batch.len().max(1) as f64;
        means.push(sum / k);
        floors.push(floor_sum / k);
        nets.push((sum - floor_sum) / k);
    }
    (median(&means), median(&floors), median(&nets))
}

/// The four paths over the pool of `peers`; returns (path, ns, floor ns, net ns). New flows
/// take source ports from pass `first_pass` on (a second pool at the same size starts after the first).
fn measure(cfg: &Settings, prog: &SchedClassifier, floor: &EmptyProgram, maps: &mut Maps, peers: &[usize], first_pass: usize) -> Vec<(&'static str, f64, f64, f64)> {
    let pod = POD_V4.into();
    let tcp = |i: usize, sport: u16, dport: u16, flags| Frame::tcp(peer_v4(i).into(), sport, pod, dport, flags).padded();
    super::datapath::set_endpoint(maps, ENDPOINT, FLAG_INGRESS_ISOLATED);
    // The pool's flows, opened by the classifier itself (so the ACKs below are conntrack hits).
    for (j, &i) in peers.iter().enumerate() {
        run_prog(prog, &tcp(i, 60000 + (j % 5000) as u16, port_of(i), SYN), 1, TC_ACT_OK);
    }
    let ack = |_| peers.iter().enumerate().map(|(j, &i)| tcp(i, 60000 + (j % 5000) as u16, port_of(i), ACK)).collect::<Vec<_>>();
    let denied = |_| peers.iter().enumerate().map(|(j, &i)| tcp(i, 60000 + (j % 5000) as u16, DENIED_PORT, SYN)).collect::<Vec<_>>();
    // A source port per pass and frame that no other flow of this size uses: below the
    // pool's (60000+), and never the one port the filled flow of that peer has.
    let new_sport = |pass: usize, j: usize, i: usize| {
        let port = 1024 + (((first_pass + pass) * peers.len() + j) % 58_976) as u16;
        if port == 20000 + (i % 40000) as u16 { port + 1 } else { port }
    };
    let fresh = |pass: usize| peers.iter().enumerate().map(|(j, &i)| tcp(i, new_sport(pass, j, i), port_of(i), SYN)).collect::<Vec<_>>();
    timed_passes(1, prog, floor, &ack, TC_ACT_OK);
    let mut out = Vec::new();
    let (a, b, c) = timed_passes(cfg.passes, prog, floor, &ack, TC_ACT_OK);
    out.push(("established", a, b, c));
    let (a, b, c) = timed_passes(cfg.passes, prog, floor, &fresh, TC_ACT_OK);
    out.push(("new allowed", a, b, c));
    let (a, b, c) = timed_passes(cfg.passes, prog, floor, &denied, TC_ACT_SHOT);
    out.push(("denied", a, b, c));
    super::datapath::set_endpoint(maps, ENDPOINT, 0);
    let (a, b, c) = timed_passes(cfg.passes, prog, floor, &ack, TC_ACT_OK);
    out.push(("not isolated", a, b, c));
    super::datapath::set_endpoint(maps, ENDPOINT, FLAG_INGRESS_ISOLATED);
    // The new flows' entries go, so the next size starts from its own entries.
    for pass in 0..cfg.passes {
        for (j, &i) in peers.iter().enumerate() {
            let key = CtKey::new(ENDPOINT, family::IPV4, proto::TCP, addr16(pod), port_of(i), addr16(peer_v4(i).into()), new_sport(pass, j, i));
            let _ = maps.conntrack.remove(&key);
        }
    }
    out
}
