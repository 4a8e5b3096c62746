//! The per-packet cost of a new flow with ClusterNetworkPolicy tiers present versus without
//! (issue 16, the `tiers` part), through BPF_PROG_TEST_RUN.
//!
//! One synthetic cluster is compiled for one node twice: with its NetworkPolicies only, and
//! with the same plus a set of Admin and Baseline ClusterNetworkPolicies (Deny, Accept,
//! Pass). Each result is rendered and loaded into a classifier of its own, both loaded at
//! once, so the two are timed side by side in one run. Packets are picked by the userspace
//! model from the compiled entries (an allow hit, a drop with no rule, an Admin Deny hit, a
//! pod the tiers make judged); each is the first packet of a flow, so it is timed per call
//! (repeat = 1, a new source port each) as `datapath` times new flows, next to the empty
//! program on the same frame, the two configurations interleaved in chunks.

use std::{collections::BTreeMap, net::{IpAddr, Ipv4Addr}, sync::Arc};

use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions};
use policy_agent::{
    compile::{self, Compiled, EndpointSlot, MapContents, MapOp, PodRef, Tier},
    crd::ClusterNetworkPolicy,
    datapath::{Datapath, Hook, MapSizes, Maps, PinLayout},
    state::{ClusterState, Object},
};
use policy_common::{
    Direction,
    endpoint::EndpointInfo,
    event::{CONFIG_EVENTS_DENIED, Config},
    policy::{COOKIE_DEFAULT_ALLOW, COOKIE_ISOLATED},
    proto,
};
use serde::{Deserialize, Serialize};

use super::{
    datapath::{EmptyProgram, LO, TC_ACT_OK, TC_ACT_SHOT},
    log, median,
};
use crate::packet::{Frame, SYN};

#[derive(Clone, Debug)]
pub struct Settings {
    pub pods: usize,
    pub policies: usize,
    /// Timed calls per case and configuration.
    pub calls: usize,
    /// Chunks the calls are split into, the cases and configurations taking turns.
    pub rounds: usize,
}

/// Map entries of one configuration.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Counts {
    pub compile_ms: f64,
    pub endpoints: usize,
    pub ipcache: usize,
    pub allow: usize,
    pub deny: usize,
    /// Of `allow` + `deny`, the endpoint port-block entries (the LPM trie).
    pub port_blocks: usize,
    /// Endpoint directions the classifier judges (isolated, or a tier applies).
    pub judged_directions: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Row {
    pub case: String,
    /// "without tiers" or "with tiers".
    pub config: String,
    /// What the classifier did: "allowed", "dropped" or "not judged".
    pub verdict: String,
    /// The rule that decided, in words (the compiler's cookie description).
    pub rule: String,
    /// The endpoint's ingress lookup mask (`policy::lookup` bits): which lookups can run.
    #[serde(default)]
    pub lookups: u8,
    /// Median ns per call, floor included.
    pub ns: f64,
    /// Median minus the median of the empty program's calls interleaved with it.
    pub net_ns: f64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub samples: Vec<f64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Results {
    pub pods: usize,
    pub policies: usize,
    /// The ClusterNetworkPolicies added: "name (tier, priority)".
    pub cluster_policies: Vec<String>,
    pub calls: usize,
    pub rounds: usize,
    pub floor_ns: f64,
    pub without: Counts,
    pub with: Counts,
    pub rows: Vec<Row>,
}

pub const WITHOUT: &str = "without tiers";
pub const WITH: &str = "with tiers";

impl Results {
    pub fn get(&self, case: &str, config: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.case == case && r.config == config)
    }

    /// The cases in measured order.
    pub fn cases(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for r in &self.rows {
            if !out.contains(&r.case.as_str()) {
                out.push(&r.case);
            }
        }
        out
    }
}

/// Admin and Baseline policies of the shapes the API's user stories describe: a hard
/// isolation between environments, a monitoring exception, a delegation to NetworkPolicy,
/// a blocked port, and a Baseline that accepts one port and denies the rest in staging.
const CLUSTER_POLICIES: &str = "
metadata: {name: deny-staging-to-prod}
spec:
  tier: Admin
  priority: 10
  subject: {namespaces: {matchLabels: {env: prod}}}
  ingress: [{name: no-staging, action: Deny, from: [{namespaces: {matchLabels: {env: staging}}}]}]
---
metadata: {name: accept-monitoring}
spec:
  tier: Admin
  priority: 20
  subject: {namespaces: {}}
  ingress: [{action: Accept, from: [{namespaces: {matchLabels: {team: team-3}}}], protocols: [{tcp: {destinationPort: {number: 9090}}}]}]
---
metadata: {name: pass-team-0}
spec:
  tier: Admin
  priority: 30
  subject: {namespaces: {}}
  ingress: [{action: Pass, from: [{namespaces: {matchLabels: {team: team-0}}}]}]
---
metadata: {name: deny-ssh}
spec:
  tier: Admin
  priority: 40
  subject: {namespaces: {}}
  ingress: [{action: Deny, from: [{namespaces: {}}], protocols: [{tcp: {destinationPort: {number: 22}}}]}]
---
metadata: {name: baseline-http}
spec:
  tier: Baseline
  priority: 10
  subject: {namespaces: {}}
  ingress: [{action: Accept, from: [{namespaces: {}}], protocols: [{tcp: {destinationPort: {number: 8080}}}]}]
---
metadata: {name: baseline-deny-staging}
spec:
  tier: Baseline
  priority: 20
  subject: {namespaces: {matchLabels: {env: staging}}}
  ingress: [{action: Deny, from: [{namespaces: {}}]}]
";

fn cluster_policies() -> Vec<ClusterNetworkPolicy> {
    let head = "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\n";
    CLUSTER_POLICIES.split("\n---\n").map(|doc| serde_yaml::from_str(&format!("{head}{}", doc.trim())).expect("a ClusterNetworkPolicy")).collect()
}

fn with_tiers(mut state: ClusterState, policies: &[ClusterNetworkPolicy]) -> ClusterState {
    for p in policies {
        state.insert(Object::ClusterNetworkPolicy(Arc::new(p.clone())));
    }
    state
}

/// Slots away from the loopback device: the measured endpoint's entry is copied to ifindex
/// 1 (where TEST_RUN runs) when its turn comes.
fn slots(compiled: &Compiled) -> BTreeMap<PodRef, EndpointSlot> {
    compiled.endpoints.keys().zip(1u32..).map(|(pod, n)| (pod.clone(), EndpointSlot { ifindex: 1000 + n, id: n })).collect()
}

fn counts(compiled: &Compiled, contents: &MapContents, compile_ms: f64) -> Counts {
    let deny = contents.policy.values().filter(|v| !v.allows()).count();
    Counts {
        compile_ms,
        endpoints: contents.endpoints.len(),
        ipcache: contents.ipcache.len(),
        allow: contents.policy.len() - deny,
        deny,
        port_blocks: contents.policy.keys().filter(|(len, _)| policy_common::policy::is_port_block(*len)).count(),
        judged_directions: compiled.endpoints.values().map(|e| usize::from(e.judged(Direction::Ingress)) + usize::from(e.judged(Direction::Egress))).sum(),
    }
}

/// The node compiled for: `node-1`, not the synthetic `node-0`, whose pods (every 50th,
/// app-0, version v0) no synthetic NetworkPolicy allows anything to; node-1's pods (app-1,
/// v1) are selected by allow rules as well as by default denies.
fn node() -> compile::NodeContext {
    compile::NodeContext { name: "node-1".to_owned(), ips: vec![Ipv4Addr::new(198, 18, 100, 2).into()] }
}

/// Pods on `node-1` that no NetworkPolicy selects: two in a prod and two in a staging
/// namespace of their own (no synthetic policy lives there), so the tiers alone judge them.
/// Addresses in 198.18.127.0/24, outside the synthetic pods' range.
fn add_unselected_pods(state: &mut ClusterState) {
    use k8s_openapi::{api::core::v1::{Namespace, Pod, PodIP, PodSpec, PodStatus}, apimachinery::pkg::apis::meta::v1::ObjectMeta};
    let labels = |pairs: &[(&str, &str)]| Some(pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect());
    for (n, (ns, env)) in [("batch-prod", "prod"), ("batch-staging", "staging")].into_iter().enumerate() {
        let meta = ObjectMeta { name: Some(ns.to_owned()), labels: labels(&[("env", env), ("team", "team-9")]), ..ObjectMeta::default() };
        state.insert(Object::Namespace(Arc::new(Namespace { metadata: meta, ..Namespace::default() })));
        for j in 0..2 {
            let ip = Ipv4Addr::new(198, 18, 127, (10 + 2 * n + j) as u8).to_string();
            let pod = Pod {
                metadata: ObjectMeta { name: Some(format!("batch-{j}")), namespace: Some(ns.to_owned()), labels: labels(&[("app", "batch")]), ..ObjectMeta::default() },
                spec: Some(PodSpec { node_name: Some("node-1".to_owned()), ..PodSpec::default() }),
                status: Some(PodStatus {
                    phase: Some("Running".to_owned()),
                    host_ip: Some("198.18.100.2".to_owned()),
                    pod_ip: Some(ip.clone()),
                    pod_ips: Some(vec![PodIP { ip }]),
                    ..PodStatus::default()
                }),
            };
            state.insert(Object::Pod(Arc::new(pod)));
        }
    }
}

/// One configuration: its compile, its maps as written, and the classifier holding them.
struct Loaded {
    compiled: Compiled,
    contents: MapContents,
    dp: Datapath,
    maps: Maps,
}

impl Loaded {
    fn new(state: &ClusterState, bpffs: &std::path::Path, conntrack: u32) -> (Self, Counts) {
        let started = std::time::Instant::now();
        let compiled = compile::compile(state, &node());
        let compile_ms = started.elapsed().as_secs_f64() * 1e3;
        let slots = slots(&compiled);
        let contents = compile::render(&compiled, &slots, false);
        let counts = counts(&compiled, &contents, compile_ms);
        let sizes = MapSizes { addresses: Some(contents.ipcache.len() as u32 + 1024), policy: Some(contents.policy.len() as u32 + 1024), conntrack: Some(conntrack) };
        let mut dp = Datapath::load_with_sizes(PinLayout::new(bpffs), sizes).expect("load classifier");
        let mut maps = dp.take_maps().expect("maps");
        maps.config.set(0, Config { flags: CONFIG_EVENTS_DENIED, events_per_sec: 1000, ct_budget: u32::MAX, _pad: 0 }, 0).expect("config");
        for op in compile::diff(&MapContents::default(), &contents).ordered_ops() {
            maps.write(&op).expect("map write");
        }
        (Self { compiled, contents, dp, maps }, counts)
    }

    fn prog(&self) -> &SchedClassifier {
        self.dp.program(Hook::ToPod).expect("to_pod")
    }

    fn endpoint(&self, pod: &PodRef) -> EndpointInfo {
        let n = self.compiled.endpoints.keys().position(|p| p == pod).expect("a local pod") as u32 + 1;
        self.contents.endpoints[&(1000 + n)]
    }

    /// Puts `pod`'s endpoint on the loopback device.
    fn measure_on(&mut self, pod: &PodRef) {
        let info = self.endpoint(pod);
        self.maps.write(&MapOp::EndpointUpsert { ifindex: LO, info }).expect("endpoint");
    }

    /// What the userspace model says of a new TCP flow from `peer` to `pod`'s `port`.
    fn class(&self, pod: &PodRef, peer: IpAddr, port: u16) -> Class {
        let n = self.compiled.endpoints.keys().position(|p| p == pod).expect("a local pod") as u32 + 1;
        if compile::isolated(&self.contents, 1000 + n, Direction::Ingress) != Some(true) {
            return Class::NotJudged;
        }
        match compile::decision(&self.contents, 1000 + n, Direction::Ingress, peer, proto::TCP, port) {
            None => Class::Miss,
            Some(hit) if !hit.allows => Class::Deny(hit.cookie),
            Some(hit) => Class::Allow(hit.cookie),
        }
    }

    fn tier_of(&self, cookie: u32) -> Option<Tier> {
        self.compiled.cookies.get(&cookie).and_then(|r| r.tier.as_ref()).map(|t| t.tier)
    }

    fn describe(&self, class: Class) -> (String, String) {
        match class {
            Class::NotJudged => ("not judged".into(), "no policy applies to the direction".into()),
            Class::Miss => ("dropped".into(), "isolated, no entry".into()),
            Class::Deny(c) => ("dropped".into(), self.compiled.describe_cookie(c)),
            Class::Allow(c) => ("allowed".into(), self.compiled.describe_cookie(c)),
        }
    }
}

/// The model's verdict on a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    NotJudged,
    Miss,
    Allow(u32),
    Deny(u32),
}

/// A measured packet: to `pod`'s `port` from `peer`, in both configurations.
struct Case {
    name: &'static str,
    pod: PodRef,
    peer: Ipv4Addr,
    port: u16,
}

/// Ports the candidate packets go to: those the synthetic policies and the tiers name, and
/// one nothing names.
const PORTS: [u16; 6] = [8080, 5432, 9090, 22, 443, 7];

/// Pod addresses of the cluster (the synthetic pods' 198.18.128.0/17), every `step`th.
fn peers(compiled: &Compiled, step: usize) -> Vec<Ipv4Addr> {
    let pods = compiled.ipcache.keys().filter_map(|p| match p.addr() {
        IpAddr::V4(a) if p.prefix_len() == 32 && a.octets()[2] >= 128 && a.octets()[..2] == [198, 18] => Some(a),
        _ => None,
    });
    pods.step_by(step.max(1)).collect()
}

/// What a case asks of a packet's classes (without tiers, with tiers).
type Want<'a> = &'a dyn Fn(Class, Class) -> bool;

/// The first packet (over local pods, peers and ports) whose classes in the two
/// configurations satisfy `want`.
fn find(without: &Loaded, with: &Loaded, peers: &[Ipv4Addr], name: &'static str, want: Want<'_>) -> Option<Case> {
    for pod in with.compiled.endpoints.keys() {
        for &peer in peers {
            for port in PORTS {
                if want(without.class(pod, peer.into(), port), with.class(pod, peer.into(), port)) {
                    return Some(Case { name, pod: pod.clone(), peer, port });
                }
            }
        }
    }
    log(format!("tiers: no packet found for case {name:?}"));
    None
}

/// The cases: the same packet in both configurations.
fn cases(without: &Loaded, with: &Loaded) -> Vec<Case> {
    let peers = peers(&with.compiled, 3);
    let tier = |c| with.tier_of(c);
    let np_allow = |c| tier(c).is_none() && c > COOKIE_ISOLATED;
    let specs: [(&'static str, Want<'_>); 6] = [
        ("allowed by a NetworkPolicy", &|a, b| matches!((a, b), (Class::Allow(x), Class::Allow(y)) if x == y && np_allow(y))),
        ("no rule allows (isolated)", &|a, b| a == Class::Miss && matches!(b, Class::Miss | Class::Deny(COOKIE_ISOLATED))),
        ("an Admin Deny", &|a, b| matches!(a, Class::Allow(_)) && matches!(b, Class::Deny(c) if tier(c) == Some(Tier::Admin))),
        ("not isolated, the default allow", &|a, b| a == Class::NotJudged && b == Class::Allow(COOKIE_DEFAULT_ALLOW)),
        ("not isolated, a Baseline Accept", &|a, b| a == Class::NotJudged && matches!(b, Class::Allow(c) if tier(c) == Some(Tier::Baseline))),
        ("not isolated, a Baseline Deny", &|a, b| a == Class::NotJudged && matches!(b, Class::Deny(c) if tier(c) == Some(Tier::Baseline))),
    ];
    specs.iter().filter_map(|(name, want)| find(without, with, &peers, name, *want)).collect()
}

fn frame(case: &Case, pod: Ipv4Addr, sport: u16) -> Vec<u8> {
    Frame::tcp(case.peer.into(), sport, pod.into(), case.port, SYN).padded()
}

/// The classifier's return value on one frame, unchecked.
fn verdict_of(prog: &SchedClassifier, data: &[u8]) -> u32 {
    let opts = TestRunOptions { data_in: Some(data), repeat: 1, ..TestRunOptions::default() };
    prog.test_run(opts).expect("BPF_PROG_TEST_RUN").return_value
}

/// One call of `prog` and of the floor on `data`: (ns, floor ns), kernel-reported. The
/// verdict must be `expect`: the model and the kernel agree, or the numbers mean nothing.
fn timed(prog: &SchedClassifier, floor: &EmptyProgram, data: &[u8], expect: u32) -> (f64, f64) {
    let floor_ns = floor.run(data, 1);
    let opts = TestRunOptions { data_in: Some(data), repeat: 1, ..TestRunOptions::default() };
    let result = prog.test_run(opts).expect("BPF_PROG_TEST_RUN");
    assert_eq!(result.return_value, expect, "the classifier's verdict differs from the model's");
    (result.duration.as_nanos() as f64, floor_ns)
}

fn expected(class: Class) -> u32 {
    match class {
        Class::NotJudged | Class::Allow(_) => TC_ACT_OK,
        Class::Miss | Class::Deny(_) => TC_ACT_SHOT,
    }
}

/// Samples of one (case, configuration): per-call ns and the floor's.
#[derive(Default)]
struct Samples {
    ns: Vec<f64>,
    floor: Vec<f64>,
}

/// Every case in both configurations, in `rounds` chunks taking turns; the source port
/// counts up per call, so each call is a new flow (allowed ones stay in conntrack, which
/// is sized for them).
fn measure(cfg: &Settings, configs: &mut [&mut Loaded; 2], floor: &EmptyProgram, cases: &[Case]) -> Vec<[Samples; 2]> {
    let mut out: Vec<[Samples; 2]> = cases.iter().map(|_| Default::default()).collect();
    let chunk = cfg.calls.div_ceil(cfg.rounds.max(1));
    for round in 0..cfg.rounds.max(1) {
        for (case, samples) in cases.iter().zip(out.iter_mut()) {
            // The two configurations swap places every round: no order effect favours one.
            let mut pairs: Vec<_> = configs.iter_mut().zip(samples.iter_mut()).collect();
            if round % 2 == 1 {
                pairs.reverse();
            }
            for (loaded, s) in pairs {
                loaded.measure_on(&case.pod);
                let pod = Ipv4Addr::from(loaded.endpoint(&case.pod).ipv4);
                let expect = expected(loaded.class(&case.pod, case.peer.into(), case.port));
                let prog = loaded.prog();
                // One untimed call per chunk: the endpoint entry just written, warm again.
                verdict_of(prog, &frame(case, pod, 64_000 + round as u16));
                for j in round * chunk..((round + 1) * chunk).min(cfg.calls) {
                    let (ns, f) = timed(prog, floor, &frame(case, pod, 1024 + j as u16), expect);
                    s.ns.push(ns);
                    s.floor.push(f);
                }
            }
        }
    }
    out
}

pub fn run(cfg: &Settings, bpffs: [&std::path::Path; 2]) -> Results {
    assert!(cfg.calls <= 60_000, "source ports 1024.. must stay below the probes' 64,000");
    let policies = cluster_policies();
    let mut base = crate::synthetic::synthetic_cluster(cfg.pods, cfg.policies);
    add_unselected_pods(&mut base);
    // Allowed new flows stay tracked: room for every case's calls.
    let conntrack = ((8 * cfg.calls + 4096) as u32).next_power_of_two();
    let (mut without, without_counts) = Loaded::new(&base, bpffs[0], conntrack);
    let (mut with, with_counts) = Loaded::new(&with_tiers(base, &policies), bpffs[1], conntrack);
    log(format!(
        "tiers: {} pods, {} policies, {} ClusterNetworkPolicies; policy entries without tiers {} allow, with {} allow + {} deny",
        cfg.pods, cfg.policies, policies.len(), without_counts.allow, with_counts.allow, with_counts.deny
    ));
    let cases = cases(&without, &with);
    let floor = EmptyProgram::load().expect("load the empty program");
    let samples = measure(cfg, &mut [&mut without, &mut with], &floor, &cases);
    let mut results = Results {
        pods: cfg.pods,
        policies: cfg.policies,
        cluster_policies: policies.iter().map(|p| format!("{} ({}, {})", p.metadata.name.as_deref().unwrap_or(""), p.spec.tier, p.spec.priority)).collect(),
        calls: cfg.calls,
        rounds: cfg.rounds,
        without: without_counts,
        with: with_counts,
        ..Results::default()
    };
    let mut floors = Vec::new();
    for (case, pair) in cases.iter().zip(samples) {
        for ((loaded, config), s) in [(&without, WITHOUT), (&with, WITH)].into_iter().zip(pair) {
            let class = loaded.class(&case.pod, case.peer.into(), case.port);
            let (verdict, rule) = loaded.describe(class);
            let ns = median(&s.ns);
            let floor_ns = median(&s.floor);
            floors.extend(s.floor);
            let lookups = loaded.endpoint(&case.pod).lookups[Direction::Ingress as usize];
            results.rows.push(Row { case: case.name.into(), config: config.into(), verdict, rule, lookups, ns, net_ns: ns - floor_ns, samples: s.ns });
        }
        let r = |c: &str| results.get(case.name, c).map_or(f64::NAN, |r| r.net_ns);
        log(format!("tiers {:<34} without {:>5.0} ns, with {:>5.0} ns above the floor ({:.2}x)", case.name, r(WITHOUT), r(WITH), r(WITH) / r(WITHOUT)));
    }
    results.floor_ns = median(&floors);
    results
}
