//! Time from a pod's route appearing to its interface being attached, and from its link
//! being deleted to its links being unpinned: the agent runs with a resync of ten minutes, so
//! only its netlink subscription can explain a reaction. Observed on the pinned links in the
//! bpffs (a `stat` per check, no HTTP), polled every 200 µs.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
    time::{Duration, Instant},
};

use policy_agent::datapath::{Hook, PinLayout};
use serde::{Deserialize, Serialize};

use super::{
    control::{METRICS, agent_args, cleanup_agent, pod_yaml, write_atomic},
    log, percentile,
};
use crate::{AgentRun, Bpffs, Netns, run_prefix, sh};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AttachRow {
    pub event: String,
    pub until: String,
    /// Raw; empty in summary.json.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub samples_ms: Vec<f64>,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Not seen within `GIVE_UP`.
    pub failures: usize,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AttachResults {
    pub pods: usize,
    pub resync_ms: u64,
    pub poll_us: u64,
    pub settle_ms: u64,
    pub rows: Vec<AttachRow>,
}

const NAMESPACE: &str = "attach";
const RESYNC_MS: u64 = 600_000;
const POLL: Duration = Duration::from_micros(200);
const GIVE_UP: Duration = Duration::from_secs(5);
/// Time for the agent to handle a veth's own link events before its route is added, so
/// that the clock measures the route event alone.
const SETTLE: Duration = Duration::from_millis(30);

fn pod_addr(i: usize) -> (Ipv4Addr, Ipv6Addr) {
    let i = u8::try_from(i + 1).expect("at most 254 pods");
    (Ipv4Addr::new(198, 18, 70, i), Ipv6Addr::new(0x2001, 2, 0, 70, 0, 0, 0, u16::from(i)))
}

fn ifname(i: usize) -> String {
    format!("{}t{i}", run_prefix())
}

/// Runs the measurement with `pods` pods, one at a time.
pub fn run(agent: &Path, pods: usize) -> AttachResults {
    let node = Netns::new("at");
    let bpffs = Bpffs::new("at");
    let dir = bpffs.scratch("manifests");
    let log_path = bpffs.scratch("log").join("agent.log");
    write_atomic(&dir, "00-namespace.yaml", &format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NAMESPACE}\n"));
    for i in 0..pods {
        let (v4, v6) = pod_addr(i);
        write_atomic(&dir, &format!("10-pod-{i}.yaml"), &pod_yaml(NAMESPACE, &format!("p{i}"), &[("app", "p")], v4, v6));
    }
    let resync = RESYNC_MS.to_string();
    let mut args = agent_args(&dir, &bpffs.path);
    args.extend([std::ffi::OsStr::new("--resync-ms"), resync.as_ref()]);
    let run = AgentRun::start(agent, &node, &args, METRICS, &log_path);
    let pins = PinLayout::new(&bpffs.path);
    let mut attached = AttachRow { event: "route added (`ip route add` returned)".into(), until: "classifier attached (both links pinned)".into(), ..AttachRow::default() };
    for i in 0..pods {
        record(&mut attached, route_to_attached(&node.name, &pins, i));
    }
    let mut detached = AttachRow { event: "link deleted (`ip link del` returned)".into(), until: "links unpinned".into(), ..AttachRow::default() };
    for i in 0..pods {
        record(&mut detached, link_del_to_detached(&node.name, &pins, i));
    }
    let mut rows = vec![finish(attached), finish(detached)];
    rows.extend(expedited(&node.name, &pins, pods));
    drop(run);
    cleanup_agent(agent, &bpffs.path);
    AttachResults { pods, resync_ms: RESYNC_MS, poll_us: POLL.as_micros() as u64, settle_ms: SETTLE.as_millis() as u64, rows }
}

/// The same attach measurement with the kernel's RCU grace periods expedited: each TCX
/// attach waits for one under the RTNL lock, which is most of the time above. None if the
/// setting cannot be changed here.
fn expedited(ns: &str, pins: &PinLayout, pods: usize) -> Option<AttachRow> {
    let _expedited = RcuExpedited::set()?;
    let mut row = AttachRow { event: "route added, with `/sys/kernel/rcu_expedited` = 1".into(), until: "classifier attached (both links pinned)".into(), ..AttachRow::default() };
    for i in 0..pods {
        record(&mut row, route_to_attached(ns, pins, i));
    }
    for i in 0..pods {
        let _ = link_del_to_detached(ns, pins, i);
    }
    Some(finish(row))
}

const RCU_EXPEDITED: &str = "/sys/kernel/rcu_expedited";

/// Sets `rcu_expedited` to 1 while it lives, and puts back the value it had.
struct RcuExpedited(String);

impl RcuExpedited {
    fn set() -> Option<Self> {
        let old = std::fs::read_to_string(RCU_EXPEDITED).ok()?;
        std::fs::write(RCU_EXPEDITED, "1").ok()?;
        Some(Self(old.trim().to_owned()))
    }
}

impl Drop for RcuExpedited {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(RCU_EXPEDITED, &self.0) {
            log(format!("attach: cannot restore {RCU_EXPEDITED} to {}: {e}", self.0));
        }
    }
}

/// Creates pod `i`'s veth (no route yet), lets the agent see it, adds the route and times
/// until both hooks are pinned.
fn route_to_attached(ns: &str, pins: &PinLayout, i: usize) -> Option<f64> {
    let name = ifname(i);
    sh(&["ip", "-n", ns, "link", "add", &name, "type", "veth", "peer", "name", &format!("{name}p")]);
    sh(&["ip", "-n", ns, "link", "set", &name, "up"]);
    std::thread::sleep(SETTLE);
    let route = format!("{}/32", pod_addr(i).0);
    sh(&["ip", "-n", ns, "route", "add", &route, "dev", &name]);
    let start = Instant::now();
    until(start, || Hook::BOTH.iter().all(|h| pins.link(&name, *h).exists()))
}

fn link_del_to_detached(ns: &str, pins: &PinLayout, i: usize) -> Option<f64> {
    let name = ifname(i);
    sh(&["ip", "-n", ns, "link", "del", &name]);
    let start = Instant::now();
    until(start, || Hook::BOTH.iter().all(|h| !pins.link(&name, *h).exists()))
}

/// Milliseconds from `start` until `done`, checked every `POLL`; `None` after `GIVE_UP`.
fn until(start: Instant, mut done: impl FnMut() -> bool) -> Option<f64> {
    while start.elapsed() < GIVE_UP {
        if done() {
            return Some(start.elapsed().as_secs_f64() * 1e3);
        }
        std::thread::sleep(POLL);
    }
    None
}

fn record(row: &mut AttachRow, sample: Option<f64>) {
    match sample {
        Some(ms) => row.samples_ms.push(ms),
        None => row.failures += 1,
    }
}

fn finish(mut row: AttachRow) -> AttachRow {
    row.p50_ms = percentile(&row.samples_ms, 50.0);
    row.p99_ms = percentile(&row.samples_ms, 99.0);
    row.max_ms = row.samples_ms.iter().copied().fold(f64::NAN, f64::max);
    log(format!("{} -> {}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} samples, {} never)", row.event, row.until, row.p50_ms, row.p99_ms, row.max_ms, row.samples_ms.len(), row.failures));
    row
}
