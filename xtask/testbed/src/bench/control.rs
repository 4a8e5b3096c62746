//! Control plane: compile time and peak memory of the compiler on synthetic clusters (each
//! in a child process, peak read from VmHWM), time from a manifest change to enforcement
//! measured by probing between pods while the agent runs in a node namespace, and the
//! agent's memory at rest with a large cluster.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use super::{log, median, percentile, proc_status_kib};
use policy_agent::compile::{IdentityAllocator, IncrementalCompiler, MapContents, NodeContext, compile, diff, render, sequential_slots};
use policy_agent::state::ClusterState;

use crate::{
    AgentRun, Bpffs, NODE_V4, Node,
    probe::Servers,
    synthetic::{synthetic_changes, synthetic_cluster, synthetic_node},
};

// --- Compile -------------------------------------------------------------------------------

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CompileResult {
    pub pods: usize,
    pub policies: usize,
    pub runs: usize,
    pub compile_ms: f64,
    pub compile_ms_min: f64,
    pub compile_ms_max: f64,
    pub render_ms: f64,
    pub diff_ms: f64,
    /// RSS after building the cluster state, before compiling.
    pub state_rss_kib: u64,
    /// Peak RSS (VmHWM, reset after building the state) over compile, render and diff.
    pub peak_kib: u64,
    pub identities: usize,
    pub ipcache_entries: usize,
    pub local_endpoints: usize,
    pub policy_entries: usize,
    /// One change each, compiled by the agent's incremental compiler.
    #[serde(default)]
    pub changes: Vec<ChangeCompile>,
}

/// The incremental compile of one kind of change (median of [`CHANGE_RUNS`]).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChangeCompile {
    pub kind: String,
    pub ms: f64,
    /// What it redid: "addresses", "identities" or "peers of N policies".
    pub redone: String,
}

const CHANGE_RUNS: usize = 7;

/// Times each of [`synthetic_changes`] through an [`IncrementalCompiler`] primed with
/// `state`, going back to `state` (untimed) after each run.
pub fn change_compiles(state: &ClusterState, node: &NodeContext) -> Vec<ChangeCompile> {
    let now = Instant::now();
    let mut compiler = IncrementalCompiler::new(IdentityAllocator::default());
    compiler.compile(state, node, now);
    let mut out = Vec::new();
    for (kind, changed) in synthetic_changes(state) {
        let mut times = Vec::new();
        let mut reuse = compiler.last_reuse();
        for _ in 0..CHANGE_RUNS {
            let start = Instant::now();
            let compiled = compiler.compile(&changed, node, now);
            times.push(start.elapsed().as_secs_f64() * 1e3);
            reuse = compiler.last_reuse();
            drop(compiled);
            compiler.compile(state, node, now);
        }
        let redone = if reuse.identities_resolved {
            "identities and every policy's peers".to_owned()
        } else if reuse.addresses_updated {
            "pod addresses".to_owned()
        } else {
            format!("peers of {} policies", reuse.peers_resolved)
        };
        out.push(ChangeCompile { kind: kind.to_owned(), ms: median(&times), redone });
    }
    out
}

/// Runs in the child: compiles `runs` times and prints one JSON line.
pub fn compile_child(pods: usize, policies: usize, runs: usize) {
    let state = synthetic_cluster(pods, policies);
    let node = synthetic_node();
    let state_rss_kib = proc_status_kib("self", "VmRSS").unwrap_or(0);
    // Resets VmHWM to the current RSS, so the peak below is the compile's.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let mut times = Vec::new();
    let mut compiled = None;
    for _ in 0..runs.max(1) {
        drop(compiled.take());
        let start = Instant::now();
        let c = compile(&state, &node);
        times.push(start.elapsed().as_secs_f64() * 1e3);
        compiled = Some(c);
    }
    let compiled = compiled.expect("compiled once");
    let slots = sequential_slots(&compiled);
    let start = Instant::now();
    let contents = render(&compiled, &slots, false);
    let render_ms = start.elapsed().as_secs_f64() * 1e3;
    let start = Instant::now();
    let updates = diff(&MapContents::default(), &contents);
    let diff_ms = start.elapsed().as_secs_f64() * 1e3;
    drop(updates);
    let peak_kib = proc_status_kib("self", "VmHWM").unwrap_or(0);
    let result = CompileResult {
        pods,
        policies,
        runs: times.len(),
        compile_ms: median(&times),
        compile_ms_min: times.iter().copied().fold(f64::INFINITY, f64::min),
        compile_ms_max: times.iter().copied().fold(0.0, f64::max),
        render_ms,
        diff_ms,
        state_rss_kib,
        peak_kib,
        identities: compiled.identities.len(),
        ipcache_entries: contents.ipcache.len(),
        local_endpoints: contents.endpoints.len(),
        policy_entries: contents.policy.len(),
        changes: change_compiles(&state, &node),
    };
    println!("{}", serde_json::to_string(&result).expect("json"));
}

/// Runs each configuration in a child process (`exe compile-child PODS POLICIES RUNS`).
pub fn compile_suite(exe: &Path, configs: &[(usize, usize)], runs: usize) -> Vec<CompileResult> {
    let mut out = Vec::new();
    for &(pods, policies) in configs {
        let output = Command::new(exe)
            .args(["compile-child", &pods.to_string(), &policies.to_string(), &runs.to_string()])
            .output()
            .expect("spawn compile child");
        let text = String::from_utf8_lossy(&output.stdout);
        match text.lines().last().and_then(|l| serde_json::from_str::<CompileResult>(l).ok()) {
            Some(r) => {
                log(format!(
                    "compile {pods} pods, {policies} policies: {:.1} ms (median of {}), peak {:.1} MiB ({:.1} MiB state), {} policy entries, {} identities",
                    r.compile_ms,
                    r.runs,
                    r.peak_kib as f64 / 1024.0,
                    r.state_rss_kib as f64 / 1024.0,
                    r.policy_entries,
                    r.identities
                ));
                out.push(r);
            }
            None => log(format!("compile {pods}/{policies}: child failed: {}", String::from_utf8_lossy(&output.stderr))),
        }
    }
    out
}

// --- Manifests ------------------------------------------------------------------------------

const NODE_NAME: &str = "bench-node";
pub(super) const METRICS: &str = "127.0.0.1:9090";

pub(super) fn write_atomic(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).expect("write manifest");
    std::fs::rename(&tmp, dir.join(name)).expect("rename manifest");
}

pub(super) fn pod_yaml(namespace: &str, name: &str, labels: &[(&str, &str)], v4: Ipv4Addr, v6: Ipv6Addr) -> String {
    let labels: String = labels.iter().map(|(k, v)| format!("    {k}: {v}\n")).collect();
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  labels:\n{labels}spec:\n  nodeName: {NODE_NAME}\n  containers:\n  - name: c\n    image: x\n    ports:\n    - name: http\n      containerPort: 80\nstatus:\n  phase: Running\n  hostIP: {NODE_V4}\n  podIP: {v4}\n  podIPs:\n  - ip: {v4}\n  - ip: {v6}\n"
    )
}

fn ingress_policy(namespace: &str, name: &str, target: &str, from: Option<&str>) -> String {
    let rules = match from {
        Some(app) => format!("  ingress:\n  - from:\n    - podSelector:\n        matchLabels:\n          app: {app}\n    ports:\n    - port: 80\n"),
        None => String::new(),
    };
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n  podSelector:\n    matchLabels:\n      app: {target}\n  policyTypes: [Ingress]\n{rules}"
    )
}

/// The synthetic cluster as a JSON stream (all of its pods are on other nodes).
fn write_background(dir: &Path, pods: usize, policies: usize) {
    let state = synthetic_cluster(pods, policies);
    let mut text = String::new();
    for ns in state.namespaces.values() {
        text += &serde_json::to_string(&**ns).expect("json");
        text.push('\n');
    }
    for pod in state.pods.values() {
        text += &serde_json::to_string(&**pod).expect("json");
        text.push('\n');
    }
    for policy in state.policies.values() {
        text += &serde_json::to_string(&**policy).expect("json");
        text.push('\n');
    }
    write_atomic(dir, "05-background.json", &text);
}

pub(super) fn agent_args<'a>(dir: &'a Path, bpffs: &'a Path) -> Vec<&'a std::ffi::OsStr> {
    vec![
        "--manifests".as_ref(),
        dir.as_os_str(),
        "--node".as_ref(),
        NODE_NAME.as_ref(),
        "--bpffs".as_ref(),
        bpffs.as_os_str(),
        "--flow-log".as_ref(),
        "off".as_ref(),
    ]
}

/// The pid of the agent reading `dir` (`ip netns exec` execs it, so it is the only process
/// with that directory on its command line).
fn agent_pid(dir: &Path) -> Option<String> {
    let needle = dir.to_str()?.to_owned();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid = e.file_name().to_str()?.to_owned();
        pid.parse::<u32>().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_agent = args.iter().any(|a| *a == b"run") && args.contains(&needle.as_bytes());
        let not_ip = args.first().is_some_and(|a| !a.ends_with(b"/ip") && *a != b"ip");
        (is_agent && not_ip).then_some(pid)
    })
}

pub(super) fn cleanup_agent(agent: &Path, bpffs: &Path) {
    let _ = Command::new(agent).args(["cleanup", "--bpffs"]).arg(bpffs).stdout(std::process::Stdio::null()).status();
}

// --- Enforcement latency -------------------------------------------------------------------

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Latency {
    pub change: String,
    pub expect: String,
    /// Raw; empty in summary.json.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub samples_ms: Vec<f64>,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub failures: usize,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LatencyResults {
    pub background_pods: usize,
    pub background_policies: usize,
    /// The connect timeout while waiting for a drop.
    pub probe_timeout_ms: u64,
    /// The connect timeout while waiting for an allow.
    #[serde(default)]
    pub allow_probe_timeout_ms: u64,
    pub rows: Vec<Latency>,
    /// The agent's own histogram (change seen to maps written): mean over the run.
    pub agent_reported_mean_ms: f64,
    pub agent_rss_kib: u64,
}

/// While waiting for a drop: a connect slower than this would be taken for one, and dated early.
const PROBE_TIMEOUT: Duration = Duration::from_millis(25);
/// While waiting for an allow: a slow connect only delays the allow, and a short timeout
/// keeps the wait for the next probe short (a connect over the veth takes well under 1 ms).
const ALLOW_PROBE_TIMEOUT: Duration = Duration::from_millis(5);
const GIVE_UP: Duration = Duration::from_secs(10);

/// Probes `from -> to` until its reachability is `want`; the time since `start` when the
/// first probe showing it began (a drop is seen when a probe's SYN goes unanswered).
fn until(node: &Node, from: &str, to: SocketAddr, want: bool, start: Instant) -> Option<f64> {
    let ns = &node.pod(from).ns;
    ns.run(move || {
        while start.elapsed() < GIVE_UP {
            let began = start.elapsed();
            let ok = std::net::TcpStream::connect_timeout(&to, if want { ALLOW_PROBE_TIMEOUT } else { PROBE_TIMEOUT }).is_ok();
            if ok == want {
                let at = if want { start.elapsed() } else { began };
                return Some(at.as_secs_f64() * 1e3);
            }
            if ok {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        None
    })
}

/// The latency node's namespace and pods (name, last address byte).
const LATENCY_NS: &str = "bench";
const LATENCY_PODS: [(&str, u8); 4] = [("a", 1), ("b", 2), ("c", 3), ("d", 4)];

fn latency_addr(last: u8) -> (Ipv4Addr, Ipv6Addr) {
    (Ipv4Addr::new(198, 18, 50, last), Ipv6Addr::new(0x2001, 2, 0, 50, 0, 0, 0, u16::from(last)))
}

/// The manifest of latency pod `name`, labelled `app`.
fn latency_pod_file(name: &str, app: &str) -> String {
    let last = LATENCY_PODS.iter().find(|p| p.0 == name).expect("pod").1;
    let (v4, v6) = latency_addr(last);
    pod_yaml(LATENCY_NS, name, &[("app", app)], v4, v6)
}

pub fn latency(agent: &Path, iterations: usize, background: (usize, usize)) -> LatencyResults {
    let mut node = Node::new("lt");
    for (name, last) in LATENCY_PODS {
        let (v4, v6) = latency_addr(last);
        node.add_pod(name, v4, v6);
    }
    let bpffs = Bpffs::new("lt");
    let dir = bpffs.scratch("manifests");
    let log_path = bpffs.scratch("log").join("agent.log");
    let _servers: Vec<Servers> = ["b", "c", "d"].iter().map(|p| Servers::start(&node.pod(p).ns, &[80], Duration::from_secs(600))).collect();
    write_latency_manifests(&dir, background);
    let args = agent_args(&dir, &bpffs.path);
    let run = AgentRun::start(agent, &node.ns, &args, METRICS, &log_path);
    // Ready means synced: a -> b allowed, c unmanaged (no manifest), d open.
    let target = SocketAddr::new(IpAddr::V4(node.pod("b").ipv4), 80);
    let _ = until(&node, "a", target, true, Instant::now());
    let mut rows: Vec<Latency> = Vec::new();
    for i in 0..iterations {
        latency_iteration(&node, &dir, &mut rows);
        if i == 0 || (i + 1) % 5 == 0 {
            log(format!("latency: iteration {} of {iterations}", i + 1));
        }
    }
    for r in &mut rows {
        r.p50_ms = percentile(&r.samples_ms, 50.0);
        r.p99_ms = percentile(&r.samples_ms, 99.0);
        log(format!("latency {:<45} -> {:<5}: p50 {:.0} ms, p99 {:.0} ms ({} samples, {} timeouts)", r.change, r.expect, r.p50_ms, r.p99_ms, r.samples_ms.len(), r.failures));
    }
    let agent_reported_mean_ms = agent_mean_latency_ms(&run.get("/metrics").unwrap_or_default());
    let agent_rss_kib = agent_pid(&dir).and_then(|pid| proc_status_kib(&pid, "VmRSS")).unwrap_or(0);
    drop(run);
    cleanup_agent(agent, &bpffs.path);
    LatencyResults {
        background_pods: background.0,
        background_policies: background.1,
        probe_timeout_ms: PROBE_TIMEOUT.as_millis() as u64,
        allow_probe_timeout_ms: ALLOW_PROBE_TIMEOUT.as_millis() as u64,
        rows,
        agent_reported_mean_ms,
        agent_rss_kib,
    }
}

/// The namespace, the background, pods a, b and d, b allowing a, and a deny-all for c.
fn write_latency_manifests(dir: &Path, background: (usize, usize)) {
    write_atomic(dir, "00-namespace.yaml", &format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {LATENCY_NS}\n"));
    write_background(dir, background.0, background.1);
    for p in ["a", "b", "d"] {
        write_atomic(dir, &format!("10-pod-{p}.yaml"), &latency_pod_file(p, p));
    }
    write_atomic(dir, "20-b-allow-a.yaml", &ingress_policy(LATENCY_NS, "b-allow-a", "b", Some("a")));
    write_atomic(dir, "21-deny-c.yaml", &ingress_policy(LATENCY_NS, "deny-c", "c", None));
}

/// Each change once and back, timed from the file write to the verdict flipping.
fn latency_iteration(node: &Node, dir: &Path, rows: &mut Vec<Latency>) {
    let target = |p: &str| SocketAddr::new(IpAddr::V4(node.pod(p).ipv4), 80);
    // A new policy isolates d.
    let start = Instant::now();
    write_atomic(dir, "30-deny-d.yaml", &ingress_policy(LATENCY_NS, "deny-d", "d", None));
    record(rows, "new policy (deny-all for a pod)", "drop", until(node, "a", target("d"), false, start));
    let start = Instant::now();
    std::fs::remove_file(dir.join("30-deny-d.yaml")).expect("remove policy");
    record(rows, "policy removed", "allow", until(node, "a", target("d"), true, start));
    // A label change takes a out of b's allowed peers, and back.
    let start = Instant::now();
    write_atomic(dir, "10-pod-a.yaml", &latency_pod_file("a", "x"));
    record(rows, "label change (peer leaves the allowed set)", "drop", until(node, "a", target("b"), false, start));
    let start = Instant::now();
    write_atomic(dir, "10-pod-a.yaml", &latency_pod_file("a", "a"));
    record(rows, "label change (peer joins the allowed set)", "allow", until(node, "a", target("b"), true, start));
    // A new pod that a policy isolates (its interface exists already, as after CNI ADD).
    let start = Instant::now();
    write_atomic(dir, "10-pod-c.yaml", &latency_pod_file("c", "c"));
    record(rows, "new pod (selected by a deny-all policy)", "drop", until(node, "a", target("c"), false, start));
    let start = Instant::now();
    std::fs::remove_file(dir.join("10-pod-c.yaml")).expect("remove pod");
    record(rows, "pod deleted", "allow", until(node, "a", target("c"), true, start));
}

/// Adds a sample (or, for `None`, a timeout) to the row of this change.
fn record(rows: &mut Vec<Latency>, change: &str, expect: &str, v: Option<f64>) {
    let row = match rows.iter_mut().position(|r| r.change == change && r.expect == expect) {
        Some(i) => &mut rows[i],
        None => {
            rows.push(Latency { change: change.into(), expect: expect.into(), samples_ms: Vec::new(), p50_ms: 0.0, p99_ms: 0.0, failures: 0 });
            rows.last_mut().expect("pushed")
        }
    };
    match v {
        Some(ms) => row.samples_ms.push(ms),
        None => row.failures += 1,
    }
}

/// The mean of the agent's own `policy_enforcement_latency_seconds` histogram, in ms.
fn agent_mean_latency_ms(metrics: &str) -> f64 {
    let metric = |name: &str| -> f64 {
        metrics.lines().find(|l| l.starts_with(name)).and_then(|l| l.split_whitespace().last()).and_then(|v| v.parse().ok()).unwrap_or(f64::NAN)
    };
    metric("policy_enforcement_latency_seconds_sum") / metric("policy_enforcement_latency_seconds_count") * 1e3
}

// --- Agent memory at rest -----------------------------------------------------------------

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RssResult {
    pub pods: usize,
    pub policies: usize,
    pub local_pods: usize,
    pub ready_secs: f64,
    pub rest_secs: f64,
    pub rss_kib: u64,
    pub hwm_kib: u64,
    pub identities: u64,
    pub policy_entries: u64,
}

pub fn rss(agent: &Path, pods: usize, policies: usize, rest: Duration) -> RssResult {
    let mut node = Node::new("rs");
    let local = [("a", 1u8), ("b", 2u8)];
    for (name, last) in local {
        node.add_pod(name, Ipv4Addr::new(198, 18, 60, last), Ipv6Addr::new(0x2001, 2, 0, 60, 0, 0, 0, u16::from(last)));
    }
    let bpffs = Bpffs::new("rs");
    let dir: PathBuf = bpffs.scratch("manifests");
    let log_path = bpffs.scratch("log").join("agent.log");
    write_background(&dir, pods, policies);
    // Local pods in the first synthetic namespace, labelled like its pods, so the synthetic
    // policies select them.
    for (name, last) in local {
        let labels = [("app", "app-0"), ("tier", "db"), ("version", "v0")];
        let text = pod_yaml("ns-0", &format!("local-{name}"), &labels, Ipv4Addr::new(198, 18, 60, last), Ipv6Addr::new(0x2001, 2, 0, 60, 0, 0, 0, u16::from(last)));
        write_atomic(&dir, &format!("10-local-{name}.yaml"), &text);
    }
    let args = agent_args(&dir, &bpffs.path);
    let start = Instant::now();
    let run = AgentRun::start(agent, &node.ns, &args, METRICS, &log_path);
    let ready_secs = start.elapsed().as_secs_f64();
    std::thread::sleep(rest);
    let pid = agent_pid(&dir);
    let rss_kib = pid.as_deref().and_then(|p| proc_status_kib(p, "VmRSS")).unwrap_or(0);
    let hwm_kib = pid.as_deref().and_then(|p| proc_status_kib(p, "VmHWM")).unwrap_or(0);
    let metrics = run.get("/metrics").unwrap_or_default();
    let gauge = |prefix: &str| -> u64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    let identities = gauge("policy_identities");
    let policy_entries = gauge("policy_map_entries{map=\"POLICY");
    drop(run);
    cleanup_agent(agent, &bpffs.path);
    let r = RssResult { pods, policies, local_pods: local.len(), ready_secs, rest_secs: rest.as_secs_f64(), rss_kib, hwm_kib, identities, policy_entries };
    log(format!(
        "agent at rest with {pods} pods and {policies} policies: RSS {:.1} MiB (peak {:.1} MiB), ready after {ready_secs:.1} s, {identities} identities",
        rss_kib as f64 / 1024.0,
        hwm_kib as f64 / 1024.0
    ));
    r
}
