//! Privileged end-to-end tests of `policy-agent run --manifests`: a simulated node (network
//! namespaces), the agent started inside it as scripts start it, real probes between pods.
//! Run by `cargo xtask test` (root, one test thread).

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use testbed::{AgentRun, Bpffs, NODE_V4, Node, probe::{Servers, tcp_ok}};

const AGENT: &str = env!("CARGO_BIN_EXE_policy-agent");
const NODE_NAME: &str = "node-1";
const METRICS: &str = "127.0.0.1:9090";
const PROBE: Duration = Duration::from_millis(150);

struct PodSpec {
    name: &'static str,
    labels: &'static str,
    v4: Ipv4Addr,
    v6: Ipv6Addr,
}

fn pod(name: &'static str, labels: &'static str, last: u8) -> PodSpec {
    PodSpec { name, labels, v4: Ipv4Addr::new(198, 18, 20, last), v6: Ipv6Addr::new(0x2001, 2, 0, 20, 0, 0, 0, u16::from(last)) }
}

/// A node running the agent on a manifest directory.
struct AgentNode {
    node: Node,
    bpffs: Bpffs,
    dir: PathBuf,
    log: PathBuf,
    agent: Option<AgentRun>,
    extra_args: Vec<&'static str>,
    /// The agent's `--resync-ms`.
    resync_ms: &'static str,
    /// The agent's `--metrics-addr` (the tests read /status and /metrics there).
    metrics_addr: &'static str,
    /// The agent's `--cni-socket`; without one `--no-cni` (nothing under /run/policy-enforcer).
    cni_socket: Option<PathBuf>,
    _servers: Vec<Servers>,
}

impl AgentNode {
    fn new(suffix: &str, pods: &[PodSpec]) -> Self {
        let mut node = Node::new(suffix);
        for p in pods {
            node.add_pod(p.name, p.v4, p.v6);
        }
        let bpffs = Bpffs::new(suffix);
        let dir = bpffs.scratch("manifests");
        let log = bpffs.scratch("log").join("agent.log");
        let servers = pods.iter().map(|p| Servers::start(&node.pod(p.name).ns, &[80, 81], Duration::from_secs(120))).collect();
        let this = Self { node, bpffs, dir, log, agent: None, extra_args: Vec::new(), resync_ms: "200", metrics_addr: METRICS, cni_socket: None, _servers: servers };
        this.write("00-namespace.yaml", "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: e2e\n  labels:\n    team: blue\n");
        for p in pods {
            this.write(&format!("10-pod-{}.yaml", p.name), &pod_yaml(p));
        }
        this
    }

    /// Writes a manifest atomically (write, then rename).
    fn write(&self, name: &str, text: &str) {
        let tmp = self.dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).expect("write manifest");
        std::fs::rename(&tmp, self.dir.join(name)).expect("rename manifest");
    }

    fn remove(&self, name: &str) {
        std::fs::remove_file(self.dir.join(name)).expect("remove manifest");
    }

    fn start(&mut self) {
        let mut args: Vec<&std::ffi::OsStr> = vec!["--manifests".as_ref(), self.dir.as_os_str(), "--node".as_ref(), NODE_NAME.as_ref()];
        args.extend(["--bpffs".as_ref(), self.bpffs.path.as_os_str(), "--flow-log".as_ref(), "off".as_ref(), "--resync-ms".as_ref(), self.resync_ms.as_ref()]);
        args.extend::<[&std::ffi::OsStr; 2]>(["--incremental-check-ms".as_ref(), "0".as_ref()]);
        args.extend(self.extra_args.iter().map(|a| std::ffi::OsStr::new(*a)));
        match &self.cni_socket {
            Some(socket) => args.extend(["--cni-socket".as_ref(), socket.as_os_str()]),
            None => args.push("--no-cni".as_ref()),
        }
        self.agent = Some(AgentRun::start(AGENT.as_ref(), &self.node.ns, &args, self.metrics_addr, &self.log));
    }

    fn kill(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            agent.kill();
        }
    }

    fn get(&self, path: &'static str) -> Option<String> {
        self.agent.as_ref().and_then(|a| a.get(path))
    }

    fn status(&self) -> serde_json::Value {
        self.agent.as_ref().expect("agent running").status()
    }

    fn endpoint(&self, pod: &str) -> serde_json::Value {
        let status = self.status();
        status["endpoints"].as_array().expect("endpoints").iter().find(|e| e["pod"] == format!("e2e/{pod}")).cloned().unwrap_or_default()
    }

    fn reaches(&self, from: &str, to: &str, port: u16) -> bool {
        tcp_ok(&self.node.pod(from).ns, SocketAddr::new(self.node.pod(to).ipv4.into(), port), PROBE)
    }

    fn reaches6(&self, from: &str, to: &str, port: u16) -> bool {
        tcp_ok(&self.node.pod(from).ns, SocketAddr::new(self.node.pod(to).ipv6.into(), port), PROBE)
    }

    /// Waits until `from -> to:port` is `want` (both families); returns how long it took.
    fn until(&self, from: &str, to: &str, port: u16, want: bool) -> Duration {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if self.reaches(from, to, port) == want && self.reaches6(from, to, port) == want {
                return start.elapsed();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("{from} -> {to}:{port} never became {want}; log:\n{}", std::fs::read_to_string(&self.log).unwrap_or_default());
    }
}

impl Drop for AgentNode {
    fn drop(&mut self) {
        self.kill();
        let _ = Command::new(AGENT).args(["cleanup", "--bpffs"]).arg(&self.bpffs.path).stdout(Stdio::null()).status();
    }
}

fn pod_yaml(p: &PodSpec) -> String {
    let labels: String = p.labels.split(',').map(|kv| kv.replacen('=', ": ", 1)).map(|l| format!("    {l}\n")).collect();
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: e2e\n  labels:\n{labels}spec:\n  nodeName: {NODE_NAME}\n  containers:\n  - name: c\n    image: x\n    ports:\n    - name: http\n      containerPort: 80\nstatus:\n  phase: Running\n  hostIP: {NODE_V4}\n  podIP: {}\n  podIPs:\n  - ip: {}\n  - ip: {}\n",
        p.name, p.v4, p.v4, p.v6
    )
}

fn ingress_policy(name: &str, target: &str, from: &str, port: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: {name}\n  namespace: e2e\nspec:\n  podSelector:\n    matchLabels:\n      app: {target}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - podSelector:\n        matchLabels:\n          app: {from}\n    ports:\n    - port: {port}\n"
    )
}

const DENY_B: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: deny-b\n  namespace: e2e\nspec:\n  podSelector:\n    matchLabels:\n      app: b\n  policyTypes: [Ingress]\n";

fn three_pods() -> Vec<PodSpec> {
    vec![pod("a", "app=a", 1), pod("b", "app=b", 2), pod("c", "app=c", 3)]
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn policies_added_changed_and_removed_take_effect() {
    let mut n = AgentNode::new("chg", &three_pods());
    n.start();
    assert!(n.reaches("a", "b", 80), "no policy: open");
    let mut timings = Vec::new();

    n.write("20-policy.yaml", DENY_B);
    timings.push(("add deny-all for b", n.until("a", "b", 80, false)));
    let metrics = n.get("/metrics").expect("metrics");
    for line in [
        "policy_coverage_pods{namespace=\"e2e\",direction=\"ingress\",state=\"unprotected\"} 2",
        "policy_coverage_pods{namespace=\"e2e\",direction=\"ingress\",state=\"isolated_nothing_allowed\"} 1",
        "policy_coverage_pods{namespace=\"e2e\",direction=\"egress\",state=\"unprotected\"} 3",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} missing from\n{metrics}");
    }

    n.write("20-policy.yaml", &ingress_policy("deny-b", "b", "a", "80"));
    timings.push(("change: allow a on 80", n.until("a", "b", 80, true)));
    assert!(!n.reaches("c", "b", 80), "c is still denied");
    assert!(!n.reaches("a", "b", 81), "81 is not allowed");

    n.write("20-policy.yaml", &ingress_policy("deny-b", "b", "a", "http"));
    assert!(n.reaches("a", "b", 80), "named port http = 80");

    n.write("10-pod-a.yaml", &pod_yaml(&pod("a", "app=x", 1)));
    timings.push(("relabel a away from the policy", n.until("a", "b", 80, false)));
    n.write("10-pod-a.yaml", &pod_yaml(&pod("a", "app=a", 1)));
    timings.push(("relabel a back", n.until("a", "b", 80, true)));

    n.remove("20-policy.yaml");
    timings.push(("remove the policy", n.until("c", "b", 81, true)));
    for (what, took) in &timings {
        println!("{what}: enforced after {} ms (probe timeout {} ms included)", took.as_millis(), PROBE.as_millis());
    }
    let metrics = n.get("/metrics").expect("metrics");
    assert!(metrics.contains("policy_enforcement_latency_seconds_count"), "{metrics}");
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn sigkill_and_restart_keeps_enforcing_without_a_gap() {
    let mut n = AgentNode::new("rst", &three_pods());
    n.write("20-policy.yaml", &ingress_policy("b-from-a", "b", "a", "80"));
    n.start();
    n.until("c", "b", 80, false);
    assert!(n.reaches("a", "b", 80));

    // Probe continuously while the agent dies and comes back.
    let stop = Arc::new(AtomicBool::new(false));
    let wrong = Arc::new(AtomicUsize::new(0));
    let probes = Arc::new(AtomicUsize::new(0));
    let (a_ns, c_ns) = (n.node.pod("a").ns.name.clone(), n.node.pod("c").ns.name.clone());
    let b_addr = SocketAddr::new(n.node.pod("b").ipv4.into(), 80);
    let prober = {
        let (stop, wrong, probes) = (stop.clone(), wrong.clone(), probes.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                for (ns, want) in [(&a_ns, true), (&c_ns, false)] {
                    let ok = probe_in(ns, b_addr);
                    probes.fetch_add(1, Ordering::SeqCst);
                    if ok != want {
                        wrong.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    n.kill();
    let before = probes.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(1500));
    let while_dead = probes.load(Ordering::SeqCst) - before;
    n.start();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    prober.join().expect("prober");
    assert!(while_dead >= 4, "probes ran while the agent was dead ({while_dead})");
    assert_eq!(wrong.load(Ordering::SeqCst), 0, "no probe saw allow-all or deny-all across the restart ({} probes)", probes.load(Ordering::SeqCst));

    // The new agent adopted the links and still follows changes.
    let b = n.endpoint("b");
    assert_eq!(b["attached"], true, "{b}");
    let log = std::fs::read_to_string(&n.log).unwrap_or_default();
    let after_restart = log.rsplit("classifier loaded").next().unwrap_or_default();
    assert!(after_restart.contains("replaced=true"), "the restarted agent replaced the pinned programs in place:\n{log}");
    assert!(!after_restart.contains("maps synced"), "the restarted agent found the maps right and wrote nothing:\n{log}");
    n.remove("20-policy.yaml");
    n.until("c", "b", 80, true);
}

/// One TCP probe from a pod namespace (a fresh thread each, as namespaces are per thread).
fn probe_in(ns_name: &str, to: SocketAddr) -> bool {
    let path = format!("/run/netns/{ns_name}");
    std::thread::spawn(move || {
        testbed::enter_netns(&path);
        std::net::TcpStream::connect_timeout(&to, PROBE).is_ok()
    })
    .join()
    .unwrap_or(false)
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn bad_manifests_are_reported_and_change_nothing() {
    let mut n = AgentNode::new("bad", &three_pods());
    let good = ingress_policy("b-from-a", "b", "a", "80");
    n.write("20-policy.yaml", &good);
    n.start();
    n.until("c", "b", 80, false);

    n.write("30-broken.yaml", "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x\n  - nonsense\n");
    n.write("20-policy.yaml", "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: b-from-a\n  namespace: e2e\nspec:\n  podSelector: [not, a, map]\n");
    let invalid = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: bad-cidr\n  namespace: e2e\nspec:\n  podSelector:\n    matchLabels:\n      app: c\n  ingress:\n  - from:\n    - ipBlock:\n        cidr: 198.18.0.0/33\n";
    n.write("40-bad-cidr.yaml", invalid);
    let start = Instant::now();
    let problems = loop {
        let problems = n.status()["problems"].to_string();
        if problems.contains("30-broken.yaml") && problems.contains("20-policy.yaml") && problems.contains("bad-cidr") {
            break problems;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "problems not reported: {problems}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(problems.contains("spec.ingress[0].from[0].ipBlock.cidr"), "names the field: {problems}");
    // Enforcement is unchanged: the last good b-from-a still applies, c is isolated by the
    // policy with the bad CIDR (an invalid peer matches nothing, never everything).
    assert!(n.reaches("a", "b", 80));
    assert!(!n.reaches("c", "b", 80));
    assert!(!n.reaches("a", "c", 80), "the bad-cidr policy isolates c and allows nothing");
    assert!(n.agent.as_mut().expect("agent").alive(), "the agent is still running");

    n.write("20-policy.yaml", &ingress_policy("b-from-a", "b", "c", "80"));
    n.until("c", "b", 80, true);
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn status_and_metrics_report_correct_numbers() {
    let mut n = AgentNode::new("sts", &three_pods());
    n.write("20-policy.yaml", &ingress_policy("b-from-a", "b", "a", "80"));
    n.start();
    n.until("c", "b", 80, false);
    for _ in 0..5 {
        assert!(!n.reaches("c", "b", 81));
    }
    let status = n.status();
    assert_eq!(status["endpoints"].as_array().map(Vec::len), Some(3));
    let (a, b) = (n.endpoint("a"), n.endpoint("b"));
    assert_eq!((b["ingress_isolated"].as_bool(), b["egress_isolated"].as_bool()), (Some(true), Some(false)));
    assert_eq!(a["ingress_isolated"].as_bool(), Some(false));
    for e in [&a, &b] {
        assert_eq!(e["attached"], true, "{e}");
        assert_eq!(e["programs"].as_array().map(Vec::len), Some(2), "{e}");
        assert_eq!(e["interface"], n.node.pod(e["pod"].as_str().unwrap_or_default().trim_start_matches("e2e/")).host_if.as_str());
    }
    // b: a on TCP 80 over both families shares one identity entry, plus node traffic.
    assert_eq!(b["policy_entries"].as_u64(), Some(2), "{b}");
    assert_eq!(a["policy_entries"].as_u64(), Some(0));
    let policy_entries = status["maps"]["POLICY_V3"]["entries"].as_u64().expect("policy fill");
    assert_eq!(policy_entries, 2);

    let metrics = n.get("/metrics").expect("metrics");
    let drops = metric(&metrics, "policy_verdicts_total{pod=\"e2e/b\",direction=\"ingress\",verdict=\"drop\",reason=\"drop_policy\"}");
    assert!(drops >= 5, "counted drops: {drops}\n{metrics}");
    assert_eq!(metric(&metrics, "policy_map_entries{map=\"POLICY_V3\"}"), policy_entries);
    assert_eq!(metric(&metrics, "policy_endpoints{state=\"attached\"}"), 3);
    assert!(metric(&metrics, "policy_identities") >= 3);
    // Every compile was repeated in full (`--incremental-check-ms 0`), and none differed.
    assert!(metric(&metrics, "policy_incremental_checks_total") >= 1, "{metrics}");
    assert_eq!(metric(&metrics, "policy_incremental_mismatches_total"), 0, "{metrics}");

    // At rest (nothing changes, resync every 200 ms) the agent neither compiles nor syncs.
    let syncs = n.status()["syncs"].as_u64();
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(n.status()["syncs"].as_u64(), syncs, "no pass ran while nothing changed");

    // `status` reads the loopback status address by default.
    let out = n.node.ns.exec(&[AGENT, "status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().any(|l| l.starts_with("e2e/b") && l.contains("isolated") && l.contains("yes")), "{text}");
    assert!(n.get("/healthz").is_some());
}

/// An Admin-tier ClusterNetworkPolicy on b's ingress: `action` for peers labelled app=a.
fn cluster_policy(name: &str, action: &str) -> String {
    format!(
        "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata:\n  name: {name}\nspec:\n  tier: Admin\n  priority: 10\n  subject:\n    pods:\n      namespaceSelector: {{}}\n      podSelector:\n        matchLabels:\n          app: b\n  ingress:\n  - name: from-a\n    action: {action}\n    from:\n    - pods:\n        namespaceSelector: {{}}\n        podSelector:\n          matchLabels:\n            app: a\n"
    )
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn cluster_policies_deny_and_accept_over_network_policies() {
    let mut n = AgentNode::new("cnp", &three_pods());
    n.start();
    assert!(n.reaches("a", "b", 80), "no policy: open");
    // An Admin Deny for a: a is cut off, c (no rule matches) is allowed by default.
    n.write("30-cluster.yaml", &cluster_policy("deny-a", "Deny"));
    n.until("a", "b", 80, false);
    assert!(n.reaches("c", "b", 80), "no policy decided for c: default allow");
    let b = n.endpoint("b");
    assert_eq!((b["ingress_isolated"].as_bool(), b["egress_isolated"].as_bool()), (Some(true), Some(false)), "judged: {b}");
    assert_eq!(b["ingress_cluster_policies"], serde_json::json!(["deny-a"]), "{b}");
    let metrics = n.get("/metrics").expect("metrics");
    let denied = metric(&metrics, "policy_verdicts_total{pod=\"e2e/b\",direction=\"ingress\",verdict=\"drop\",reason=\"drop_deny\"}");
    assert!(denied >= 1, "drop_deny counted: {denied}\n{metrics}");
    // An Admin Accept wins over a NetworkPolicy that isolates b: a passes, c stays denied.
    n.write("20-policy.yaml", DENY_B);
    n.write("30-cluster.yaml", &cluster_policy("accept-a", "Accept"));
    n.until("a", "b", 80, true);
    assert!(!n.reaches("c", "b", 80), "the NetworkPolicy still isolates b for c");
    n.remove("30-cluster.yaml");
    n.until("a", "b", 80, false);
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).map(|v| v.trim().parse::<f64>().unwrap_or(0.0) as u64))
        .unwrap_or_else(|| panic!("no metric {name}"))
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn audit_mode_lets_drops_pass_and_counts_them() {
    let mut n = AgentNode::new("aud", &three_pods());
    n.extra_args = vec!["--audit"];
    n.write("20-policy.yaml", DENY_B);
    n.start();
    std::thread::sleep(Duration::from_millis(300));
    assert!(n.reaches("a", "b", 80), "audit: would-be drops pass");
    let metrics = n.get("/metrics").expect("metrics");
    assert!(metric(&metrics, "policy_verdicts_total{pod=\"e2e/b\",direction=\"ingress\",verdict=\"pass\",reason=\"audit\"}") >= 1, "{metrics}");
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn a_pod_whose_interface_appears_later_is_retried_and_attached() {
    let mut n = AgentNode::new("late", &three_pods());
    let late = pod("d", "app=d", 4);
    n.write("10-pod-d.yaml", &pod_yaml(&late));
    n.write("20-policy.yaml", &ingress_policy("d-from-a", "d", "a", "80"));
    n.start();
    let d = n.endpoint("d");
    assert_eq!(d["attached"], false);
    assert!(d["error"].as_str().unwrap_or_default().contains("no route"), "{d}");
    n.node.add_pod("d", late.v4, late.v6);
    let _servers = Servers::start(&n.node.pod("d").ns, &[80], Duration::from_secs(60));
    n.until("c", "d", 80, false);
    assert!(n.reaches("a", "d", 80));
    assert_eq!(n.endpoint("d")["attached"], true);
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn ebpf_debug_logs_drops_through_aya_log() {
    let mut n = AgentNode::new("dbg", &three_pods());
    n.extra_args = vec!["--ebpf-debug"];
    n.write("20-policy.yaml", DENY_B);
    n.start();
    n.until("a", "b", 80, false);
    std::thread::sleep(Duration::from_millis(300));
    let log = n.agent.as_ref().expect("agent").log_text();
    assert!(log.contains("drop endpoint="), "the classifier logged the drop:\n{log}");
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn a_full_policy_map_is_reported_and_fails_closed() {
    let mut n = AgentNode::new("full", &three_pods());
    // Room for b's first two entries only (a on TCP 80, node traffic).
    n.extra_args = vec!["--policy-map-size", "2"];
    n.write("20-policy.yaml", &ingress_policy("b-from-a", "b", "a", "80"));
    n.write("21-policy.yaml", &ingress_policy("b-from-c", "b", "c", "81"));
    n.start();
    let b = n.endpoint("b");
    assert!(b["error"].as_str().unwrap_or_default().contains("full"), "the pod names the full map: {b}");
    assert_eq!(b["ingress_isolated"], true);
    // Closed, never open: b's writes failed, so b is closed as a whole (its link is down)
    // until they succeed; nothing is let in, not even what was written.
    assert!(!n.reaches("c", "b", 80));
    assert!(!n.reaches("a", "b", 81));
    assert!(!n.reaches("a", "b", 80), "a pod whose writes failed is closed");
    assert!(n.reaches("a", "c", 80), "other pods are untouched");
    assert!(n.status()["problems"].as_array().is_some_and(|p| p.iter().any(|p| p.as_str().is_some_and(|p| p.contains("e2e/b")))), "reported as a problem");
    let metrics = n.get("/metrics").expect("metrics");
    assert!(metric(&metrics, "policy_sync_failures_total") >= 1, "{metrics}");
    assert!(metric(&metrics, "policy_map_fill_ratio{map=\"POLICY_V3\"}") >= 1, "{metrics}");

    // Once b fits again its link comes back up with what the kernel took away when it went
    // down (its routes and permanent neighbours; IPv6 addresses are kept), over IPv4 and IPv6.
    n.remove("21-policy.yaml");
    n.until("a", "b", 80, true);
    assert!(!n.reaches("c", "b", 80), "enforced after reopening");
    assert!(n.endpoint("b")["error"].is_null(), "{}", n.endpoint("b"));
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn a_recreated_interface_is_attached_again() {
    let mut n = AgentNode::new("rec", &three_pods());
    n.write("20-policy.yaml", &ingress_policy("b-from-a", "b", "a", "80"));
    n.start();
    n.until("c", "b", 80, false);
    let before = n.endpoint("b")["ifindex"].as_u64();
    n.node.recreate_link("b");
    // Same name, new ifindex: the agent notices on its next pass and attaches again.
    let start = Instant::now();
    while n.endpoint("b")["ifindex"].as_u64() == before || n.endpoint("b")["attached"] != true {
        assert!(start.elapsed() < Duration::from_secs(5), "not re-attached: {}", n.endpoint("b"));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!n.reaches("c", "b", 80), "enforced on the new interface");
    assert!(n.reaches("a", "b", 80));
    // Depending on whether a pass saw the interface missing, the old link was detached then,
    // or found stale now and replaced: enforcement on the new interface is what counts.
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn a_pod_without_a_host_route_to_a_veth_stays_pending() {
    let mut n = AgentNode::new("nort", &three_pods());
    // d: a /32 route, but to a bridge (as a bridge CNI has). e: only covering routes, over a's veth.
    let d = pod("d", "app=d", 4);
    let e = PodSpec { name: "e", labels: "app=e", v4: Ipv4Addr::new(198, 18, 21, 5), v6: Ipv6Addr::new(0x2001, 2, 0, 21, 0, 0, 0, 5) };
    n.write("10-pod-d.yaml", &pod_yaml(&d));
    n.write("10-pod-e.yaml", &pod_yaml(&e));
    n.write("20-policy.yaml", &ingress_policy("d-from-a", "d", "a", "80"));
    n.write("21-policy.yaml", &ingress_policy("e-from-a", "e", "a", "80"));
    let a_if = n.node.pod("a").host_if.clone();
    for cmd in [
        vec!["ip", "link", "add", "pbr0", "type", "bridge"],
        vec!["ip", "link", "set", "pbr0", "up"],
        vec!["ip", "route", "add", "198.18.20.4/32", "dev", "pbr0"],
        vec!["ip", "route", "add", "198.18.21.0/24", "dev", &a_if],
        vec!["ip", "-6", "route", "add", "2001:2:0:21::/64", "dev", &a_if],
    ] {
        assert!(n.node.ns.exec(&cmd).status.success(), "{cmd:?}");
    }
    n.start();
    std::thread::sleep(Duration::from_millis(500));
    for (name, why) in [("d", "not a veth"), ("e", "no route")] {
        let status = n.endpoint(name);
        assert_eq!(status["attached"], false, "{status}");
        assert!(status["interface"].is_null(), "{status}");
        assert!(status["error"].as_str().unwrap_or_default().contains(why), "{status}");
    }
    let a = n.endpoint("a");
    assert_eq!((a["attached"].as_bool(), a["interface"].as_str()), (Some(true), Some(a_if.as_str())), "{a}");
    assert!(n.reaches("b", "a", 80), "a keeps its own (empty) policy, not e's");
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn the_node_address_serves_only_health_and_counters() {
    let mut n = AgentNode::new("expo", &three_pods());
    // As the DaemonSet does: metrics on a node address (here the node's 198.18.0.1).
    n.metrics_addr = "198.18.0.1:9190";
    n.write("20-policy.yaml", DENY_B);
    n.start();
    n.until("a", "b", 80, false);
    assert!(n.get("/healthz").is_some() && n.get("/readyz").is_some());
    assert!(n.get("/status").is_none(), "no /status on a node address");
    let metrics = n.get("/metrics").expect("metrics");
    for name in ["pod=", "e2e/", "198.18.", "deny-b"] {
        assert!(!metrics.contains(name), "{name} on the node address:\n{metrics}");
    }
    assert!(metric(&metrics, "policy_verdicts_total{direction=\"ingress\",verdict=\"drop\",reason=\"drop_policy\"}") >= 1, "{metrics}");
    assert_eq!(metric(&metrics, "policy_endpoints{state=\"attached\"}"), 3);
    // Everything else is on the loopback status address, where `status` finds it.
    let out = n.node.ns.exec(&[AGENT, "status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    assert_eq!(status["endpoints"].as_array().map(Vec::len), Some(3), "{status}");
}

/// Waits until `done` holds; how long that took, or a panic naming `what` with the log.
fn within(n: &AgentNode, bound: Duration, what: &str, mut done: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < bound, "{what}: not within {bound:?}; log:\n{}", std::fs::read_to_string(&n.log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(10));
    }
    start.elapsed()
}

/// With a resync of ten minutes, only events can explain a prompt reaction.
const NO_RESYNC: &str = "600000";
/// Generous: events take milliseconds; the bound only rules out polling.
const PROMPT: Duration = Duration::from_secs(3);

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn link_and_route_events_attach_and_clean_up_at_once() {
    let mut n = AgentNode::new("evt", &three_pods());
    n.resync_ms = NO_RESYNC;
    let late = pod("d", "app=d", 4);
    n.write("10-pod-d.yaml", &pod_yaml(&late));
    n.write("20-policy.yaml", &ingress_policy("d-from-a", "d", "a", "80"));
    n.start();
    assert!(n.endpoint("d")["error"].as_str().unwrap_or_default().contains("no route"), "{}", n.endpoint("d"));

    // The CNI adds the veth and the routes: the route event wakes the agent.
    n.node.add_pod("d", late.v4, late.v6);
    let attached = within(&n, PROMPT, "attached after its route appeared", || n.endpoint("d")["attached"] == true);
    let _servers = Servers::start(&n.node.pod("d").ns, &[80], Duration::from_secs(60));
    assert!(!n.reaches("c", "d", 80), "enforced: c is not allowed");
    assert!(n.reaches("a", "d", 80));

    // The CNI deletes the veth: the link event wakes the agent, which detaches.
    let pins = policy_agent::datapath::PinLayout::new(&n.bpffs.path);
    let d_if = n.node.pod("d").host_if.clone();
    assert!(pins.link(&d_if, policy_agent::datapath::Hook::ToPod).exists());
    n.node.ns.exec(&["ip", "link", "del", &d_if]);
    let cleaned = within(&n, PROMPT, "cleaned up after its link was deleted", || {
        let d = n.endpoint("d");
        d["interface"].is_null() && d["attached"] == false && policy_agent::datapath::Hook::BOTH.iter().all(|h| !pins.link(&d_if, *h).exists())
    });
    println!("attached {} ms after the pod's routes appeared, cleaned up {} ms after its link went", attached.as_millis(), cleaned.as_millis());
    assert_eq!(n.endpoint("a")["attached"], true, "other pods keep their links");
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn manifest_changes_apply_without_polling() {
    let mut n = AgentNode::new("ino", &three_pods());
    n.resync_ms = NO_RESYNC;
    n.start();
    assert!(n.reaches("a", "b", 80));
    let start = Instant::now();
    n.write("20-policy.yaml", DENY_B);
    n.until("a", "b", 80, false);
    let denied = start.elapsed();
    assert!(denied < PROMPT, "a new policy file applied after {denied:?}");
    let start = Instant::now();
    n.remove("20-policy.yaml");
    n.until("a", "b", 80, true);
    let allowed = start.elapsed();
    assert!(allowed < PROMPT, "a removed policy file applied after {allowed:?}");
    println!("policy added: enforced after {} ms; removed: after {} ms (probe timeouts included)", denied.as_millis(), allowed.as_millis());
}

/// A pod as kubelet sees it before its sandbox exists: scheduled, no addresses yet.
fn unstarted_pod_yaml(p: &PodSpec) -> String {
    let labels: String = p.labels.split(',').map(|kv| kv.replacen('=', ": ", 1)).map(|l| format!("    {l}\n")).collect();
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: e2e\n  uid: uid-{}\n  labels:\n{labels}spec:\n  nodeName: {NODE_NAME}\n  containers:\n  - name: c\n    image: x\nstatus:\n  phase: Pending\n  hostIP: {NODE_V4}\n",
        p.name, p.name
    )
}

const DENY_LOCKED: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: deny-locked\n  namespace: e2e\nspec:\n  podSelector:\n    matchLabels:\n      app: locked\n  policyTypes: [Ingress, Egress]\n";

/// The container runtime's side of CNI: it runs our plugin (this binary through a symlink
/// named `policy-enforcer`, as /opt/cni/bin holds it) after the primary plugin, whose work
/// `Node::add_pod` has done (veth, addresses, /32 and /128 routes, as ptp makes them).
struct Runtime {
    plugin: PathBuf,
    socket: PathBuf,
}

impl Runtime {
    fn new(n: &AgentNode) -> Self {
        let bin = n.bpffs.scratch("cni-bin");
        let plugin = bin.join("policy-enforcer");
        let _ = std::fs::remove_file(&plugin);
        std::os::unix::fs::symlink(AGENT, &plugin).expect("plugin symlink");
        Self { plugin, socket: n.bpffs.scratch("cni-run").join("sock").join("cni.sock") }
    }

    /// The primary plugin's result for a pod made by `Node::add_pod`, in the 1.0.0 or 0.4.0 shape.
    fn prev_result(node: &Node, name: &str, v1: bool) -> serde_json::Value {
        let pod = node.pod(name);
        let sandbox = format!("/run/netns/{}", pod.ns.name);
        let (v4, v6) = (format!("{}/32", pod.ipv4), format!("{}/128", pod.ipv6));
        let ips = if v1 {
            serde_json::json!([{"interface": 1, "address": v4, "gateway": NODE_V4.to_string()}, {"interface": 1, "address": v6}])
        } else {
            serde_json::json!([{"version": "4", "interface": 1, "address": v4, "gateway": NODE_V4.to_string()}, {"version": "6", "interface": 1, "address": v6}])
        };
        serde_json::json!({
            "cniVersion": if v1 { "1.0.0" } else { "0.4.0" },
            "interfaces": [{"name": pod.host_if, "mac": "02:aa:00:00:00:01"}, {"name": "eth0", "mac": "02:bb:00:00:00:09", "sandbox": sandbox}],
            "ips": ips,
            "routes": [{"dst": "0.0.0.0/0", "gw": NODE_V4.to_string()}],
            "dns": {}
        })
    }

    /// Runs the plugin as containerd does: CNI_* environment, the network config on stdin.
    fn call(&self, command: &str, pod: &str, container: &str, prev: Option<&serde_json::Value>) -> std::process::Output {
        let version = prev.and_then(|p| p["cniVersion"].as_str()).unwrap_or("1.0.0");
        let mut conf = serde_json::json!({"cniVersion": version, "name": "k8s-pod-network", "type": "policy-enforcer", "socket": self.socket, "timeoutSeconds": 10});
        if let Some(prev) = prev {
            conf["prevResult"] = prev.clone();
        }
        let mut child = Command::new(&self.plugin)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container)
            .env("CNI_NETNS", format!("/run/netns/{container}"))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", self.plugin.parent().expect("bin dir"))
            .env("CNI_ARGS", format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=e2e;K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID={container};K8S_POD_UID=uid-{pod}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run the plugin");
        std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), conf.to_string().as_bytes()).expect("write stdin");
        child.wait_with_output().expect("plugin output")
    }
}

fn shown(out: &std::process::Output) -> String {
    format!("exit {:?}\nstdout: {}\nstderr: {}", out.status.code(), String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// A node whose agent serves the CNI socket, with p (isolated: only app=open may connect on
/// 80) and q (no policy) running, and l (app=locked, default-deny both ways) and o (app=open,
/// no policy) scheduled but not started.
fn cni_node(suffix: &str, extra_args: Vec<&'static str>) -> (AgentNode, Runtime) {
    let mut n = AgentNode::new(suffix, &[pod("p", "app=peer", 1), pod("q", "app=other", 2)]);
    n.write("20-policy.yaml", &ingress_policy("peer-from-open", "peer", "open", "80"));
    n.write("21-deny-locked.yaml", DENY_LOCKED);
    n.write("10-pod-l.yaml", &unstarted_pod_yaml(&pod("l", "app=locked", 5)));
    n.write("10-pod-o.yaml", &unstarted_pod_yaml(&pod("o", "app=open", 6)));
    let runtime = Runtime::new(&n);
    n.cni_socket = Some(runtime.socket.clone());
    n.extra_args = extra_args;
    n.start();
    within(&n, PROMPT, "p and q attached", || n.endpoint("p")["attached"] == true && n.endpoint("q")["attached"] == true);
    (n, runtime)
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn cni_add_enforces_a_pod_from_its_first_packet() {
    let (mut n, runtime) = cni_node("cni", Vec::new());
    let (l, o) = (pod("l", "app=locked", 5), pod("o", "app=open", 6));
    n.node.add_pod("l", l.v4, l.v6);
    n.node.add_pod("o", o.v4, o.v6);
    let _servers = [Servers::start(&n.node.pod("l").ns, &[80], Duration::from_secs(60)), Servers::start(&n.node.pod("o").ns, &[80], Duration::from_secs(60))];
    // The race without the plugin: l runs unenforced, and p drops o, whose address it does not know.
    assert!(n.reaches("l", "q", 80), "before ADD, l is not enforced yet (the runtime does not start it before ADD returns)");
    assert!(!n.reaches("o", "p", 80), "before ADD, p does not know o's identity");

    let prev = Runtime::prev_result(&n.node, "l", true);
    let started = Instant::now();
    let out = runtime.call("ADD", "l", "sandbox-l", Some(&prev));
    let add_took = started.elapsed();
    assert!(out.status.success(), "ADD of l: {}", shown(&out));
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("ADD prints JSON ({e}): {}", shown(&out)));
    assert_eq!(printed, prev, "a chained plugin passes the result through unchanged");
    // At once, no sleep: the pod's first packets meet its policy.
    assert!(!n.reaches("l", "q", 80), "l's first connection after ADD is dropped (egress deny)");
    assert!(!n.reaches6("l", "q", 80), "also over IPv6");
    assert!(!n.reaches("q", "l", 80), "and nothing reaches l (ingress deny)");
    let status = n.endpoint("l");
    assert_eq!((status["attached"].as_bool(), status["ingress_isolated"].as_bool(), status["egress_isolated"].as_bool()), (Some(true), Some(true), Some(true)), "{status}");
    assert_eq!(status["interface"], n.node.pod("l").host_if.as_str(), "{status}");

    let prev = Runtime::prev_result(&n.node, "o", false);
    let out = runtime.call("ADD", "o", "sandbox-o", Some(&prev));
    assert!(out.status.success(), "ADD of o: {}", shown(&out));
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&out.stdout).ok(), Some(prev), "0.4.0 result passed through");
    assert!(n.reaches("o", "p", 80), "p accepts o's first connection: o's identity was in the ipcache before ADD returned");
    assert!(n.reaches6("o", "p", 80), "also over IPv6");
    assert!(n.reaches("o", "q", 80), "the control pod o (no policy) connects at once");
    assert_eq!(n.endpoint("o")["attached"], true);
    let check = runtime.call("CHECK", "l", "sandbox-l", Some(&Runtime::prev_result(&n.node, "l", true)));
    assert!(check.status.success(), "CHECK of an enforced pod: {}", shown(&check));

    // Kubelet reports the addresses: nothing changes. DEL forgets o's CNI addresses (its status has none).
    n.write("10-pod-l.yaml", &pod_yaml(&l));
    std::thread::sleep(Duration::from_millis(300));
    assert!(!n.reaches("l", "q", 80), "still enforced once the status has the addresses");
    let del = runtime.call("DEL", "o", "sandbox-o", None);
    assert!(del.status.success(), "DEL: {}", shown(&del));
    within(&n, PROMPT, "o forgotten after DEL", || n.endpoint("o").is_null());
    assert!(!n.reaches("o", "p", 80), "after DEL p no longer knows o");
    assert!(n.agent.as_mut().expect("agent").alive());
    println!("ADD of a default-deny pod returned enforced after {} ms", add_took.as_millis());
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn cni_add_waits_for_a_pod_the_watch_does_not_know_yet_and_times_out() {
    let (mut n, runtime) = cni_node("cniw", vec!["--cni-timeout-ms", "2000"]);
    let w = pod("w", "app=locked", 7);
    n.node.add_pod("w", w.v4, w.v6);
    let prev = Runtime::prev_result(&n.node, "w", true);
    let runtime = Arc::new(runtime);
    let add = {
        let (runtime, prev) = (runtime.clone(), prev.clone());
        std::thread::spawn(move || runtime.call("ADD", "w", "sandbox-w", Some(&prev)))
    };
    std::thread::sleep(Duration::from_millis(500));
    assert!(!add.is_finished(), "ADD waits while the agent does not know the pod");
    // The watch catches up (the pod object arrives after kubelet started the sandbox).
    n.write("10-pod-w.yaml", &unstarted_pod_yaml(&w));
    let out = add.join().expect("ADD thread");
    assert!(out.status.success(), "ADD once the pod is known: {}", shown(&out));
    assert!(!n.reaches("w", "q", 80), "enforced from its first packet");

    // A pod the agent never learns of: the ADD fails after --cni-timeout-ms, naming it.
    let x = pod("x", "app=other", 8);
    n.node.add_pod("x", x.v4, x.v6);
    let started = Instant::now();
    let out = runtime.call("ADD", "x", "sandbox-x", Some(&Runtime::prev_result(&n.node, "x", true)));
    let took = started.elapsed();
    assert!(!out.status.success(), "{}", shown(&out));
    let error: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("CNI error JSON ({e}): {}", shown(&out)));
    assert_eq!(error["code"], 11, "{error}");
    assert!(error["msg"].as_str().is_some_and(|m| m.contains("e2e/x") && m.contains("has not seen")), "{error}");
    assert!(took >= Duration::from_millis(1900) && took < Duration::from_secs(8), "failed after the agent's timeout: {took:?}");
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn cni_add_without_agent_fails_try_again_later_and_del_succeeds() {
    let (mut n, runtime) = cni_node("cnid", Vec::new());
    let l = pod("l", "app=locked", 5);
    n.node.add_pod("l", l.v4, l.v6);
    let prev = Runtime::prev_result(&n.node, "l", true);
    n.kill();
    // SIGKILL leaves the socket file (connection refused); a never-started agent leaves none.
    for (why, socket_left) in [("killed agent", true), ("no agent", false)] {
        if !socket_left {
            let _ = std::fs::remove_file(&runtime.socket);
        }
        assert_eq!(runtime.socket.exists(), socket_left, "{why}");
        let started = Instant::now();
        let out = runtime.call("ADD", "l", "sandbox-l", Some(&prev));
        assert!(!out.status.success(), "{why}: ADD must fail: {}", shown(&out));
        assert!(started.elapsed() < Duration::from_secs(2), "{why}: fails at once");
        let error: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{why}: CNI error JSON ({e}): {}", shown(&out)));
        assert_eq!((error["code"].as_u64(), error["cniVersion"].as_str()), (Some(11), Some("1.0.0")), "{why}: {error}");
        assert!(error["msg"].as_str().is_some_and(|m| m.contains("e2e/l") && m.contains("unreachable")), "{why}: {error}");
        let del = runtime.call("DEL", "l", "sandbox-l", None);
        assert!(del.status.success(), "{why}: DEL always succeeds: {}", shown(&del));
    }
    let version = runtime.call("VERSION", "l", "sandbox-l", None);
    assert!(version.status.success() && String::from_utf8_lossy(&version.stdout).contains("supportedVersions"), "{}", shown(&version));
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn cni_addresses_survive_an_agent_restart_before_the_status_has_them() {
    let (mut n, runtime) = cni_node("cnir", Vec::new());
    let l = pod("l", "app=locked", 5);
    n.node.add_pod("l", l.v4, l.v6);
    let out = runtime.call("ADD", "l", "sandbox-l", Some(&Runtime::prev_result(&n.node, "l", true)));
    assert!(out.status.success(), "ADD: {}", shown(&out));
    assert!(!n.reaches("l", "q", 80));
    // Killed before kubelet's status update: the next agent still knows l's addresses, so it
    // keeps l attached instead of taking it for a pod without an interface.
    n.kill();
    n.start();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(n.endpoint("l")["attached"], true, "{}", n.endpoint("l"));
    for _ in 0..3 {
        assert!(!n.reaches("l", "q", 80), "l stays enforced across the restart");
    }
    let log = std::fs::read_to_string(&n.log).unwrap_or_default();
    assert!(log.rsplit("classifier loaded").next().unwrap_or_default().contains("CNI-reported pod addresses of the previous agent"), "{log}");
    // Deleting the pod object forgets them.
    n.remove("10-pod-l.yaml");
    within(&n, PROMPT, "l gone", || n.endpoint("l").is_null());
    let saved = std::fs::read_to_string(runtime.socket.with_file_name("cni-pods.json")).unwrap_or_default();
    assert!(!saved.contains("\"name\":\"l\""), "{saved}");
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn cni_install_copies_the_plugin_and_chains_it_once() {
    let bpffs = Bpffs::new("cnii");
    let (bin, conf) = (bpffs.scratch("opt-cni-bin"), bpffs.scratch("etc-cni-net.d"));
    let ptp = r#"{"cniVersion":"0.4.0","name":"k8s","plugins":[{"type":"ptp","ipam":{"type":"host-local","subnet":"198.18.64.0/24"}}]}"#;
    std::fs::write(conf.join("10-k8s.conflist"), ptp).expect("conflist");
    std::fs::write(conf.join("20-later.conflist"), ptp).expect("conflist");
    let install = |command: &str| {
        let out = Command::new(AGENT).args([command, "--bin-dir"]).arg(&bin).arg("--conf-dir").arg(&conf).args(["--socket", "/run/policy-enforcer/cni.sock"]).output().expect("run");
        assert!(out.status.success(), "{command}: {}", shown(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(install("cni-install").contains("chained policy-enforcer"));
    assert!(install("cni-install").contains("already chains"), "idempotent");
    let chained: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(conf.join("10-k8s.conflist")).expect("read")).expect("JSON");
    assert_eq!(chained["plugins"].as_array().map(Vec::len), Some(2), "{chained}");
    assert_eq!(chained["plugins"][1], serde_json::json!({"type": "policy-enforcer", "socket": "/run/policy-enforcer/cni.sock"}));
    assert_eq!(std::fs::read_to_string(conf.join("20-later.conflist")).expect("read"), ptp, "only the file the runtime uses");
    // The installed copy is the plugin (its name selects it).
    let version = Command::new(bin.join("policy-enforcer")).env("CNI_COMMAND", "VERSION").stdin(Stdio::null()).output().expect("run plugin");
    assert!(version.status.success() && String::from_utf8_lossy(&version.stdout).contains("\"1.0.0\""), "{}", shown(&version));
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(bin.join("policy-enforcer")).expect("stat").permissions());
    assert_eq!(mode & 0o777, 0o755);

    let removed = install("cni-uninstall");
    assert!(removed.contains("removed policy-enforcer from") && !bin.join("policy-enforcer").exists(), "{removed}");
    let restored: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(conf.join("10-k8s.conflist")).expect("read")).expect("JSON");
    assert_eq!(restored, serde_json::from_str::<serde_json::Value>(ptp).expect("JSON"));
    let leftovers: Vec<_> = std::fs::read_dir(&conf).expect("list").filter_map(Result::ok).map(|e| e.file_name()).filter(|n| n.to_string_lossy().starts_with('.')).collect();
    assert!(leftovers.is_empty(), "no temporary files: {leftovers:?}");

    std::fs::write(conf.join("05-ptp.conf"), r#"{"cniVersion":"0.4.0","name":"k8s","type":"ptp"}"#).expect("conf");
    let out = Command::new(AGENT).args(["cni-install", "--bin-dir"]).arg(&bin).arg("--conf-dir").arg(&conf).output().expect("run");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("05-ptp.conf"), "a .conf first is refused: {}", shown(&out));
}
