//! The NetworkPolicy conformance suite: the cases of the upstream e2e suite
//! (kubernetes/kubernetes test/e2e/network/netpol), re-expressed on real packets. Two
//! simulated nodes (network namespaces routed to each other over a veth link, see
//! `testbed::cluster`) each run an agent on the same manifest directory, with the pods
//! spread over them (alternately, in model order), so every matrix mixes same-node and
//! cross-node pairs; the selector cases also run with every pod on one node. Namespaces
//! x, y, z hold pods a, b, c (labels `pod=<name>`, namespaces `ns=<name>`), each serving TCP,
//! UDP and SCTP on 80 and 81 with named container ports `serve-80-tcp` and so on, over IPv4
//! and IPv6. Each case sets policies (and labels, pods), states the whole expected
//! reachability matrix and probes every ordered pair on both families; a mismatch prints the
//! upstream truth tables (expected, observed, comparison; each pod shown with its node) and
//! fails the case. The `services` group adds Services (kube-proxy-style iptables rules in
//! every node namespace, `testbed::services`) and checks each connection through a
//! ClusterIP or NodePort against the backend it reached.
//!
//! The node, pods and agent are built once per group (#[test]); between cases every policy
//! is removed, labels and pods are restored and the agent's enforcement is awaited. Every
//! case of a group runs even if one fails; the group then fails listing them. Run one case
//! with `CONFORMANCE_CASE=<substring>`. Run by `cargo xtask test` (root, one test thread).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    panic::AssertUnwindSafe,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use testbed::{
    AgentRun, Bpffs, NODE_V4, NODE_V6, enter_netns,
    cluster::{Nodes, POD_CIDR_V4, POD_CIDR_V6},
    matrix::{self, ProbeOptions, ProbePod, Protocol, Reachability},
    probe::Servers,
    services::{self, Backend, Service},
};

const AGENT: &str = env!("CARGO_BIN_EXE_policy-agent");
/// kube-proxy's Service range, given to every agent.
const SERVICE_CIDR: &str = "198.19.0.0/24";
const TCP: Protocol = Protocol::Tcp;
const UDP: Protocol = Protocol::Udp;
const SCTP: Protocol = Protocol::Sctp;

type Labels = BTreeMap<String, String>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

#[derive(Clone, PartialEq, Debug)]
struct PodModel {
    ns: String,
    name: String,
    labels: Labels,
    /// The pod's sandbox: network namespace and host interface suffix.
    short: String,
    ipv4: Ipv4Addr,
    ipv6: Ipv6Addr,
    /// Named container ports (name, port, protocol).
    ports: Vec<(String, u16, Protocol)>,
    /// The node it runs on (index into the cluster's nodes).
    node: usize,
}

impl PodModel {
    fn id(&self) -> String {
        format!("{}/{}", self.ns, self.name)
    }

    fn file(&self) -> String {
        format!("10-pod-{}-{}.yaml", self.ns, self.name)
    }
}

/// The upstream model's container ports: serve-80-tcp, serve-80-udp, serve-80-sctp, ...
fn model_ports() -> Vec<(String, u16, Protocol)> {
    let mut ports = Vec::new();
    for port in [80, 81] {
        for (proto, name) in [(TCP, "tcp"), (UDP, "udp"), (SCTP, "sctp")] {
            ports.push((format!("serve-{port}-{name}"), port, proto));
        }
    }
    ports
}

/// Pod `j` (1-based) of namespace `i` (1-based): 198.18.10.(16i+j) and 2001:2:0:10::(16i+j),
/// so that namespace y is exactly 198.18.10.32/28 and 2001:2:0:10::20/124.
fn model_pod(ns: &str, name: &str, i: u8, j: u8) -> PodModel {
    let last = 16 * i + j;
    PodModel {
        ns: ns.into(),
        name: name.into(),
        labels: labels(&[("pod", name)]),
        short: format!("{ns}{name}"),
        ipv4: Ipv4Addr::new(198, 18, 10, last),
        ipv6: Ipv6Addr::new(0x2001, 2, 0, 0x10, 0, 0, 0, u16::from(last)),
        ports: model_ports(),
        node: 0,
    }
}

#[derive(Clone, PartialEq, Debug)]
struct NsModel {
    name: String,
    labels: Labels,
}

/// What a group's cluster holds.
struct Setup {
    namespaces: Vec<NsModel>,
    pods: Vec<PodModel>,
    server_ports: Vec<u16>,
    /// How many nodes (1 or 2); the pods alternate between them in model order.
    nodes: usize,
}

/// `setup` on `nodes` nodes, its pods placed alternately.
fn on_nodes(mut setup: Setup, nodes: usize) -> Setup {
    for (i, pod) in setup.pods.iter_mut().enumerate() {
        pod.node = i % nodes;
    }
    setup.nodes = nodes;
    setup
}

/// The upstream model: x, y, z with a, b, c each.
fn xyz() -> Setup {
    let mut namespaces = Vec::new();
    let mut pods = Vec::new();
    for (i, ns) in ["x", "y", "z"].into_iter().enumerate() {
        namespaces.push(NsModel { name: ns.into(), labels: labels(&[("ns", ns)]) });
        for (j, name) in ["a", "b", "c"].into_iter().enumerate() {
            pods.push(model_pod(ns, name, i as u8 + 1, j as u8 + 1));
        }
    }
    Setup { namespaces, pods, server_ports: vec![80, 81], nodes: 1 }
}

/// One node's agent: its bpffs (and log), its process, its metrics address.
struct NodeAgent {
    bpffs: Bpffs,
    agent: Option<AgentRun>,
    metrics: String,
}

/// Nodes each running the agent on one shared manifest directory, with the model's pods.
struct Cluster {
    probe_pods: BTreeMap<String, ProbePod>,
    servers: BTreeMap<String, Servers>,
    agents: Vec<NodeAgent>,
    net: Nodes,
    dir: PathBuf,
    server_ports: Vec<u16>,
    pods: Vec<PodModel>,
    namespaces: Vec<NsModel>,
    baseline_pods: Vec<PodModel>,
    baseline_namespaces: Vec<NsModel>,
    /// Pods deleted during the case whose sandbox still exists (probed as plain addresses).
    former: Vec<PodModel>,
    dirty: bool,
    case: String,
    options: ProbeOptions,
    /// The Services installed in every node namespace now.
    services: Vec<Service>,
    /// The outside world (a namespace attached to node-1), made on first use.
    outside: Option<(ProbePod, Servers)>,
}

impl Cluster {
    fn new(suffix: &str, setup: Setup) -> Self {
        let net = Nodes::new(suffix, setup.nodes);
        let agents: Vec<NodeAgent> = (1..=setup.nodes)
            .map(|i| NodeAgent { bpffs: Bpffs::new(&format!("{suffix}{i}")), agent: None, metrics: format!("127.0.0.1:{}", 9090 + i) })
            .collect();
        let dir = agents[0].bpffs.scratch("manifests");
        let mut c = Self {
            probe_pods: BTreeMap::new(),
            servers: BTreeMap::new(),
            agents,
            net,
            dir,
            server_ports: setup.server_ports,
            pods: Vec::new(),
            namespaces: setup.namespaces.clone(),
            baseline_pods: setup.pods.clone(),
            baseline_namespaces: setup.namespaces,
            former: Vec::new(),
            dirty: true,
            case: "setup".into(),
            options: ProbeOptions::default(),
            services: Vec::new(),
            outside: None,
        };
        for ns in c.namespaces.clone() {
            c.write(&format!("00-ns-{}.yaml", ns.name), &namespace_yaml(&ns));
        }
        for pod in setup.pods {
            c.sandbox(&pod);
            c.write(&pod.file(), &pod_yaml(&pod, &c.net));
            c.pods.push(pod);
        }
        for i in 0..c.agents.len() {
            c.start_agent(i);
        }
        c.settle();
        c
    }

    /// Starts node `i`'s agent in its node namespace, on the shared manifest directory.
    fn start_agent(&mut self, i: usize) {
        let node_name = self.net.addrs[i].name.clone();
        let NodeAgent { bpffs, metrics, .. } = &self.agents[i];
        let log = bpffs.scratch("log").join("agent.log");
        let mut args: Vec<std::ffi::OsString> = vec![
            "--manifests".into(),
            self.dir.clone().into(),
            "--node".into(),
            node_name.into(),
            "--bpffs".into(),
            bpffs.path.clone().into(),
            "--flow-log".into(),
            "off".into(),
            "--resync-ms".into(),
            "200".into(),
            "--incremental-check-ms".into(),
            "0".into(),
            "--service-cidr".into(),
            SERVICE_CIDR.into(),
        ];
        if let Some(link) = &self.net.link_if {
            args.extend(["--uplink".into(), link.into()]);
        }
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        let agent = AgentRun::start(AGENT.as_ref(), &self.net.nodes[i].ns, &args, metrics, &log);
        self.agents[i].agent = Some(agent);
    }

    /// The pod's network namespace on its node, servers (answering `who` with the pod's
    /// "ns/name") and SCTP receivers.
    fn sandbox(&mut self, pod: &PodModel) {
        self.net.add_pod(pod.node, &pod.short, pod.ipv4, pod.ipv6);
        let ns = &self.net.pod(&pod.short).ns;
        self.servers.insert(pod.short.clone(), Servers::start_named(ns, &self.server_ports, Duration::from_secs(900), &pod.id()));
        self.probe_pods.insert(pod.short.clone(), ProbePod::new(ns, pod.ipv4, pod.ipv6));
    }

    fn remove_sandbox(&mut self, short: &str) {
        self.probe_pods.remove(short);
        self.servers.remove(short);
        self.net.remove_pod(short);
    }

    /// Writes a manifest atomically (a dotfile, then rename).
    fn write(&mut self, name: &str, text: &str) {
        let tmp = self.dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).expect("write manifest");
        std::fs::rename(&tmp, self.dir.join(name)).expect("rename manifest");
        self.dirty = true;
    }

    fn remove(&mut self, name: &str) {
        std::fs::remove_file(self.dir.join(name)).unwrap_or_else(|e| panic!("remove {name}: {e}"));
        self.dirty = true;
    }

    fn agent(&self, node: usize) -> &AgentRun {
        self.agents[node].agent.as_ref().expect("agent running")
    }

    /// Every agent's log, for a failure message.
    fn logs(&self) -> String {
        (0..self.agents.len()).map(|i| format!("--- {} agent log:\n{}", self.net.addrs[i].name, self.agent(i).log_text())).collect()
    }

    /// Creates or replaces NetworkPolicy `ns/name` with `spec` (YAML, any indentation).
    fn apply(&mut self, ns: &str, name: &str, spec: &str) {
        let yaml = format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n{}",
            indent(spec, 2)
        );
        self.write(&format!("50-np-{ns}-{name}.yaml"), &yaml);
    }

    /// Writes a manifest file as it is (for the shipped examples).
    fn apply_file(&mut self, name: &str, text: &str) {
        self.write(&format!("50-np-file-{name}"), text);
    }

    /// Creates or replaces ClusterNetworkPolicy `name` with `spec`. (The `50-np-` prefix:
    /// removed between cases with the NetworkPolicies.)
    fn apply_cnp(&mut self, name: &str, spec: &str) {
        let yaml = format!(
            "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata:\n  name: {name}\nspec:\n{}",
            indent(spec, 2)
        );
        self.write(&format!("50-np-cnp-{name}.yaml"), &yaml);
    }

    fn delete_policy(&mut self, ns: &str, name: &str) {
        self.remove(&format!("50-np-{ns}-{name}.yaml"));
    }

    fn pod_mut(&mut self, id: &str) -> &mut PodModel {
        self.pods.iter_mut().find(|p| p.id() == id).unwrap_or_else(|| panic!("no pod {id}"))
    }

    fn rewrite_pod(&mut self, id: &str) {
        let pod = self.pod_mut(id).clone();
        self.write(&pod.file(), &pod_yaml(&pod, &self.net));
    }

    /// Replaces the labels of pod `id` ("ns/name").
    fn label_pod(&mut self, id: &str, pairs: &[(&str, &str)]) {
        self.pod_mut(id).labels = labels(pairs);
        self.rewrite_pod(id);
    }

    /// Adds a named container port to pod `id`.
    fn add_container_port(&mut self, id: &str, name: &str, port: u16, protocol: Protocol) {
        self.pod_mut(id).ports.push((name.into(), port, protocol));
        self.rewrite_pod(id);
    }

    /// Replaces the labels of namespace `ns` (the agent derives kubernetes.io/metadata.name).
    fn label_ns(&mut self, ns: &str, pairs: &[(&str, &str)]) {
        let model = self.namespaces.iter_mut().find(|n| n.name == ns).unwrap_or_else(|| panic!("no namespace {ns}"));
        model.labels = labels(pairs);
        let model = model.clone();
        self.write(&format!("00-ns-{ns}.yaml"), &namespace_yaml(&model));
    }

    /// A new pod with its own sandbox, on the next node in turn (by sandboxes made so far).
    fn add_pod(&mut self, mut pod: PodModel) {
        pod.node = self.probe_pods.len() % self.agents.len();
        self.sandbox(&pod);
        self.write(&pod.file(), &pod_yaml(&pod, &self.net));
        self.pods.push(pod);
    }

    /// Deletes pod `id` from the cluster; its sandbox stays, so its address can still send.
    fn delete_pod(&mut self, id: &str) {
        let pod = self.pod_mut(id).clone();
        self.remove(&pod.file());
        self.pods.retain(|p| p.id() != id);
        self.former.push(pod);
    }

    /// Deletes pod `id` and creates `ns/name` with `labels` in its sandbox (same addresses).
    fn replace_pod(&mut self, id: &str, name: &str, pairs: &[(&str, &str)]) {
        let old = self.pod_mut(id).clone();
        self.delete_pod(id);
        self.former.retain(|p| p.id() != id);
        let new = PodModel { name: name.into(), labels: labels(pairs), ..old };
        self.write(&new.file(), &pod_yaml(&new, &self.net));
        self.pods.push(new);
    }

    /// Node `node`'s agent's /status; a failed or partial answer is retried (and
    /// reported), never taken for an empty status.
    fn status(&self, node: usize) -> serde_json::Value {
        let start = Instant::now();
        let mut errors = Vec::new();
        loop {
            let path = format!("/run/netns/{}", self.net.nodes[node].ns.name);
            let metrics = self.agents[node].metrics.clone();
            let answer = std::thread::spawn(move || {
                enter_netns(&path);
                policy_agent::status::fetch(&metrics, "/status")
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("status thread panicked")));
            match answer.map(|body| serde_json::from_str::<serde_json::Value>(&body)) {
                Ok(Ok(v)) if v["passes"].is_u64() => {
                    assert_eq!(v["incremental_mismatches"].as_u64(), Some(0), "node {node}: the incremental compile differed from the full one");
                    if !errors.is_empty() {
                        eprintln!("note: /status failed {} time(s) before answering: {errors:?}", errors.len());
                    }
                    return v;
                }
                Ok(Ok(v)) => errors.push(format!("no passes in {v}")),
                Ok(Err(e)) => errors.push(format!("bad JSON: {e}")),
                Err(e) => errors.push(e.to_string()),
            }
            assert!(start.elapsed() < Duration::from_secs(15), "no /status answer from node {node} in 15 s: {errors:?}; log:\n{}", self.agent(node).log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn passes(&self, node: usize) -> u64 {
        self.status(node)["passes"].as_u64().expect("checked by status()")
    }

    /// Waits until every agent has enforced everything written so far: two passes of its
    /// loop that started after the last write (each pass is preceded by a rescan of the
    /// directory, and a pass that sees a change compiles and syncs it), then checks that
    /// nothing was refused and every pod of its node is attached.
    fn settle(&mut self) {
        let start = Instant::now();
        let first: Vec<u64> = (0..self.agents.len()).map(|i| self.passes(i)).collect();
        for (node, first) in first.into_iter().enumerate() {
            while self.passes(node) < first + 2 {
                assert!(start.elapsed() < Duration::from_secs(15), "agent of node {node} did not sync in 15 s; logs:\n{}", self.logs());
                std::thread::sleep(Duration::from_millis(20));
            }
            self.check_node_status(node);
        }
        self.dirty = false;
    }

    /// No problem reported by node `node`'s agent, and each of its pods attached.
    fn check_node_status(&self, node: usize) {
        let status = self.status(node);
        let problems = status["problems"].as_array().cloned().unwrap_or_default();
        assert!(problems.is_empty(), "the agent of node {node} refused manifests of this case: {problems:#?}");
        for pod in self.pods.iter().filter(|p| p.node == node) {
            let id = pod.id();
            let endpoint = status["endpoints"].as_array().into_iter().flatten().find(|e| e["pod"] == id.as_str());
            let endpoint = endpoint.unwrap_or_else(|| panic!("no endpoint for {id}: {status:#}"));
            assert_eq!(endpoint["attached"], true, "{id} not attached: {endpoint}");
            assert!(endpoint["error"].is_null(), "{id}: {endpoint}");
        }
    }

    /// The pods that exist now ("ns/name").
    fn pod_ids(&self) -> Vec<String> {
        self.pods.iter().map(PodModel::id).collect()
    }

    /// A reachability model over the pods that exist now, everything allowed.
    fn reach(&self) -> Reachability {
        Reachability::new(&self.pod_ids(), true)
    }

    fn model(&self, id: &str) -> &PodModel {
        self.pods.iter().chain(&self.former).find(|p| p.id() == id).unwrap_or_else(|| panic!("no pod {id}"))
    }

    fn probe_pod(&self, id: &str) -> &ProbePod {
        &self.probe_pods[&self.model(id).short]
    }

    /// The name of the node pod `id` runs on.
    fn node_of(&self, id: &str) -> String {
        self.net.addrs[self.model(id).node].name.clone()
    }

    /// Probes the whole matrix of `r` on `port`/`protocol` over both families; on a
    /// mismatch prints the truth tables and fails.
    fn check(&mut self, r: &Reachability, port: u16, protocol: Protocol) {
        if self.dirty {
            self.settle();
        }
        let pods: Vec<&ProbePod> = r.pods().iter().map(|id| self.probe_pod(id)).collect();
        let started = Instant::now();
        let comparisons = matrix::probe_matrix(&pods, r, port, protocol, self.options);
        let title = format!("{} {protocol}/{port}", self.case);
        let text = matrix::report_placed(&title, r, &comparisons, &|id| self.node_of(id), &self.net.describe());
        if comparisons.iter().any(|c| !c.wrong.is_empty()) {
            panic!("{text}");
        }
        println!("{}({} ms)", text.replace('\n', " "), started.elapsed().as_millis());
    }

    /// Whether the pod's own node reaches `to` over both families (kubelet probes).
    fn node_reaches(&self, to: &str, port: u16, protocol: Protocol) -> [bool; 2] {
        let pod = self.probe_pod(to);
        let node = &self.net.nodes[self.model(to).node].ns;
        [(IpAddr::V4(NODE_V4), pod.addr(false)), (IpAddr::V6(NODE_V6), pod.addr(true))]
            .map(|(from, to)| matrix::probe_from(node, from, SocketAddr::new(to, port), pod, protocol, self.options.timeout))
    }

    /// Back to the group's starting point: no policies, original labels, original pods.
    fn reset(&mut self) {
        for entry in std::fs::read_dir(&self.dir).expect("manifest dir").flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_baseline_pod = self.baseline_pods.iter().any(|p| p.file() == name);
            if name.starts_with("50-np-") || (name.starts_with("10-pod-") && !is_baseline_pod) {
                self.remove(&name);
            }
        }
        let sandboxes: Vec<String> = self.probe_pods.keys().cloned().collect();
        for short in sandboxes {
            if !self.baseline_pods.iter().any(|p| p.short == short) {
                self.remove_sandbox(&short);
            }
        }
        for pod in self.baseline_pods.clone() {
            if !self.pods.contains(&pod) {
                self.write(&pod.file(), &pod_yaml(&pod, &self.net));
            }
        }
        if !self.services.is_empty() {
            self.set_services(Vec::new());
        }
        for ns in self.baseline_namespaces.clone() {
            if !self.namespaces.contains(&ns) {
                self.write(&format!("00-ns-{}.yaml", ns.name), &namespace_yaml(&ns));
            }
        }
        self.pods = self.baseline_pods.clone();
        self.namespaces = self.baseline_namespaces.clone();
        self.former.clear();
        self.settle();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.agents {
            if let Some(mut agent) = node.agent.take() {
                agent.kill();
            }
            let _ = Command::new(AGENT).args(["cleanup", "--bpffs"]).arg(&node.bpffs.path).stdout(Stdio::null()).stderr(Stdio::null()).status();
        }
        self.outside = None;
        self.probe_pods.clear();
        self.servers.clear();
    }
}

fn service_file(service: &Service) -> String {
    format!("60-svc-{}.yaml", service.name.replace('/', "-"))
}

/// The client that plays the world outside the cluster (a namespace attached to node-1).
const OUTSIDE: &str = "outside";

/// What one connection through a Service found: the backend it reached (a pod id, "outside",
/// or a bare address; None if no flow was tracked: dropped before the DNAT) and whether it
/// was answered.
type Outcome = (Option<String>, bool);

/// Each backend (pod id) a client may reach through a Service, and whether it is allowed to.
type Expected<'a> = &'a [(&'a str, bool)];

/// One client's row of a Service check: the client, its expectation, its connections.
type ServiceRow<'a> = (&'a str, Expected<'a>, Vec<Outcome>);

impl Cluster {
    /// Installs `services` as kube-proxy would, in every node namespace (replacing the last
    /// set), and writes them with their Endpoints into the manifest directory (for an agent
    /// that reads them; others skip those kinds).
    fn set_services(&mut self, services: Vec<Service>) {
        for node in &self.net.nodes {
            services::install(&node.ns, &services, POD_CIDR_V4, POD_CIDR_V6);
        }
        for old in std::mem::take(&mut self.services) {
            self.remove(&service_file(&old));
        }
        for service in &services {
            let yaml = self.service_yaml(service);
            self.write(&service_file(service), &yaml);
        }
        self.services = services;
    }

    /// A Service without selector and its Endpoints (pod addresses, nodeName, targetRef).
    fn service_yaml(&self, service: &Service) -> String {
        let (ns, name) = service.name.split_once('/').expect("service name ns/name");
        let kind = if service.node_port.is_some() { "NodePort" } else { "ClusterIP" };
        let node_port = service.node_port.map(|p| format!(", nodePort: {p}")).unwrap_or_default();
        let (port, protocol, ip) = (service.port, service.protocol, service.cluster_ip);
        let mut addresses = String::new();
        let mut target_port = port;
        for backend in &service.backends {
            let pod = self.pods.iter().find(|p| IpAddr::V4(p.ipv4) == backend.ip || IpAddr::V6(p.ipv6) == backend.ip).expect("backend is a pod");
            let node = &self.net.addrs[pod.node].name;
            addresses.push_str(&format!("  - ip: {}\n    nodeName: {node}\n    targetRef: {{kind: Pod, namespace: {}, name: {}}}\n", backend.ip, pod.ns, pod.name));
            target_port = backend.port;
        }
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  type: {kind}\n  clusterIP: {ip}\n  clusterIPs: [{ip}]\n  ports:\n  - {{name: p, port: {port}, targetPort: {target_port}, protocol: {protocol}{node_port}}}\n---\napiVersion: v1\nkind: Endpoints\nmetadata: {{name: {name}, namespace: {ns}}}\nsubsets:\n- addresses:\n{addresses}  ports:\n  - {{name: p, port: {target_port}, protocol: {protocol}}}\n"
        )
    }

    /// Service `ns/name` on ClusterIP 198.19.0.`last`, port 80/`protocol` to port 80 of the
    /// pods `backends`.
    fn service(&self, name: &str, last: u8, protocol: Protocol, backends: &[&str], node_port: Option<u16>) -> Service {
        let backends = backends.iter().map(|id| Backend { ip: IpAddr::V4(self.model(id).ipv4), port: 80 }).collect();
        Service { name: name.into(), cluster_ip: IpAddr::V4(Ipv4Addr::new(198, 19, 0, last)), port: 80, protocol, backends, node_port }
    }

    /// The outside world: made on first use, attached to node-1, serving 80 (answering
    /// `who` with "outside").
    fn outside(&mut self) -> &ProbePod {
        if self.outside.is_none() {
            let world = self.net.add_outside(0, "world");
            let servers = Servers::start_named(&world.ns, &[80], Duration::from_secs(900), OUTSIDE);
            let pod = ProbePod::new(&world.ns, world.ipv4, world.ipv6);
            self.outside = Some((pod, servers));
        }
        &self.outside.as_ref().expect("just made").0
    }

    /// Connects from `client` to `to` until every one of `backends` was reached (at most 40
    /// connections; 8 without a tracked flow end it early), learning each connection's
    /// backend from the answer or, when refused, from the client node's conntrack table.
    fn ask(&self, client: &str, to: SocketAddr, protocol: Protocol, backends: &[&str]) -> Vec<Outcome> {
        let (pod, node) = if client == OUTSIDE { (&self.outside.as_ref().expect("outside made").0, 0) } else { (self.probe_pod(client), self.model(client).node) };
        let node_ns = &self.net.nodes[node].ns;
        let from = pod.addr(to.is_ipv6());
        let mut outcomes: Vec<Outcome> = Vec::new();
        let addresses: Vec<(IpAddr, String)> = self.pods.iter().chain(&self.former).flat_map(|p| [(IpAddr::V4(p.ipv4), p.id()), (IpAddr::V6(p.ipv6), p.id())]).collect();
        let outside: Vec<IpAddr> = self.outside.iter().flat_map(|(w, _)| [w.addr(false), w.addr(true)]).collect();
        let owner = |ip: IpAddr| addresses.iter().find(|(a, _)| *a == ip).map(|(_, id)| id.clone()).or_else(|| outside.contains(&ip).then(|| OUTSIDE.to_owned())).unwrap_or_else(|| ip.to_string());
        matrix::ask_backends(pod, to, protocol, Duration::from_millis(800), 40, |attempts| {
            if let Some(last) = attempts.last() {
                let reached = last.answer.clone().or_else(|| services::conntrack_backend(node_ns, protocol, from, last.sport).map(owner));
                outcomes.push((reached, last.answer.is_some()));
            }
            let all_hit = backends.iter().all(|b| outcomes.iter().any(|(r, _)| r.as_deref() == Some(*b)));
            all_hit || (outcomes.len() >= 8 && outcomes.iter().all(|(r, _)| r.is_none()))
        });
        outcomes
    }

    /// Probes `to` (a ClusterIP or node address and NodePort) from each client and checks
    /// each connection against the verdict of the backend it reached: every connection to
    /// an allowed backend answered, none to a denied one did, and, where anything is allowed,
    /// every backend was reached. On a mismatch prints a table (client x backend, each with
    /// its node: answered/connections) and fails.
    fn check_service(&mut self, what: &str, to: SocketAddr, protocol: Protocol, rows: &[(&str, Expected<'_>)]) {
        if self.dirty {
            self.settle();
        }
        let started = Instant::now();
        let mut wrong = Vec::new();
        let mut table = Vec::new();
        for (client, expected) in rows {
            let backends: Vec<&str> = expected.iter().map(|(b, _)| *b).collect();
            let outcomes = self.ask(client, to, protocol, &backends);
            wrong.extend(judge(client, expected, &outcomes));
            table.push((*client, *expected, outcomes));
        }
        let title = format!("{} {what} ({to} {protocol})", self.case);
        if !wrong.is_empty() {
            panic!("{title}: {} wrong\n{}\n{}\n{}", wrong.len(), self.net.describe(), self.service_table(&table), wrong.join("\n"));
        }
        println!("{title}: correct ({} ms)", started.elapsed().as_millis());
    }

    fn placed(&self, id: &str) -> String {
        if id == OUTSIDE { format!("{OUTSIDE}@{}", self.net.addrs[0].name) } else { format!("{id}@{}", self.node_of(id)) }
    }

    /// Rows: clients; columns: the expected backends and whatever else was reached; cells:
    /// answered/connections, the expectation (`.` allowed, `X` denied) and `!` on a mismatch.
    fn service_table(&self, table: &[ServiceRow<'_>]) -> String {
        let mut columns: Vec<Option<String>> = Vec::new();
        for (_, expected, outcomes) in table {
            for reached in expected.iter().map(|(b, _)| Some((*b).to_owned())).chain(outcomes.iter().map(|(r, _)| r.clone())) {
                if !columns.contains(&reached) {
                    columns.push(reached);
                }
            }
        }
        let head = |c: &Option<String>| c.as_deref().map_or_else(|| "(no flow)".to_owned(), |b| if b.contains('/') || b == OUTSIDE { self.placed(b) } else { b.to_owned() });
        let mut out = format!("{:<16}", "from \\ reached");
        for c in &columns {
            out.push_str(&format!("{:<18}", head(c)));
        }
        out.push('\n');
        for (client, expected, outcomes) in table {
            out.push_str(&format!("{:<16}", self.placed(client)));
            for c in &columns {
                let hits: Vec<bool> = outcomes.iter().filter(|(r, _)| r == c).map(|(_, ok)| *ok).collect();
                let want = expected.iter().find(|(b, _)| Some((*b).to_owned()) == *c).map(|(_, allowed)| *allowed);
                let mark = match want { Some(true) => ".", Some(false) => "X", None => "-" };
                let bad = match want {
                    Some(allowed) => hits.iter().any(|ok| *ok != allowed),
                    // Not a backend, or no flow where something is allowed.
                    None => !hits.is_empty() && (c.is_some() || expected.iter().any(|(_, allowed)| *allowed)),
                };
                let cell = format!("{}/{} {mark}{}", hits.iter().filter(|ok| **ok).count(), hits.len(), if bad { " !" } else { "" });
                out.push_str(&format!("{cell:<18}"));
            }
            out.push('\n');
        }
        out
    }
}

/// The mismatches of one client's connections through a Service (see `check_service`).
fn judge(client: &str, expected: Expected<'_>, outcomes: &[Outcome]) -> Vec<String> {
    let any_allowed = expected.iter().any(|(_, allowed)| *allowed);
    let mut wrong = Vec::new();
    for (reached, ok) in outcomes {
        let want = reached.as_deref().and_then(|r| expected.iter().find(|(b, _)| *b == r)).map(|(_, allowed)| *allowed);
        match (reached, want, ok) {
            (Some(r), Some(true), false) => wrong.push(format!("  {client} -> {r}: expected allowed, was BLOCKED")),
            (Some(r), Some(false), true) => wrong.push(format!("  {client} -> {r}: expected blocked, was ALLOWED")),
            (Some(r), None, _) => wrong.push(format!("  {client} -> {r}: not a backend of this Service (answered: {ok})")),
            (None, _, _) if any_allowed => wrong.push(format!("  {client}: a connection was dropped before any backend was chosen (no tracked flow)")),
            _ => {}
        }
    }
    if any_allowed {
        for (backend, _) in expected {
            if !outcomes.iter().any(|(r, _)| r.as_deref() == Some(*backend)) {
                wrong.push(format!("  {client} -> {backend}: never reached in {} connections", outcomes.len()));
            }
        }
    }
    wrong
}

/// Re-indents `text` (a YAML block written at any indentation) by `by` spaces.
fn indent(text: &str, by: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let common = lines.iter().map(|l| l.len() - l.trim_start().len()).min().unwrap_or(0);
    lines.iter().map(|l| format!("{}{}\n", " ".repeat(by), &l[common..])).collect()
}

fn labels_yaml(labels: &Labels, pad: &str) -> String {
    if labels.is_empty() {
        return " {}\n".into();
    }
    let mut out = String::from("\n");
    for (k, v) in labels {
        out.push_str(&format!("{pad}{k}: \"{v}\"\n"));
    }
    out
}

fn namespace_yaml(ns: &NsModel) -> String {
    format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {}\n  labels:{}", ns.name, labels_yaml(&ns.labels, "    "))
}

/// A running pod on its node (`spec.nodeName`, `status.hostIP` the node's InternalIP): one
/// container per named port, like the upstream model.
fn pod_yaml(pod: &PodModel, net: &Nodes) -> String {
    let node = &net.addrs[pod.node];
    let mut containers = String::new();
    for (name, port, protocol) in &pod.ports {
        containers.push_str(&format!(
            "  - name: cont-{}\n    image: registry.k8s.io/e2e-test-images/agnhost:2.47\n    ports:\n    - name: {name}\n      containerPort: {port}\n      protocol: {protocol}\n",
            name.to_lowercase()
        ));
    }
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {}\n  labels:{}spec:\n  nodeName: {}\n  containers:\n{containers}status:\n  phase: Running\n  hostIP: {}\n  podIP: {}\n  podIPs:\n  - ip: {}\n  - ip: {}\n",
        pod.name,
        pod.ns,
        labels_yaml(&pod.labels, "    "),
        node.name,
        node.ipv4,
        pod.ipv4,
        pod.ipv4,
        pod.ipv6
    )
}

/// A case: our name, the upstream case it re-expresses (or what it adds), the body.
type Case = (&'static str, &'static str, fn(&mut Cluster));

/// Builds the group's cluster once and runs every case on it, resetting in between.
fn run_group(suffix: &str, setup: Setup, cases: &[Case]) {
    let filter = std::env::var("CONFORMANCE_CASE").ok();
    let selected: Vec<&Case> = cases.iter().filter(|(name, _, _)| filter.as_deref().is_none_or(|f| name.contains(f))).collect();
    if selected.is_empty() {
        return;
    }
    let group_start = Instant::now();
    let mut c = Cluster::new(suffix, setup);
    let mut failed = Vec::new();
    for (name, upstream, case) in selected {
        c.case = (*name).to_owned();
        let start = Instant::now();
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| case(&mut c)));
        match outcome {
            Ok(()) => println!("ok     {name} ({:.1} s) -- upstream: {upstream}", start.elapsed().as_secs_f64()),
            Err(e) => {
                let msg = e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned())).unwrap_or_default();
                println!("FAILED {name} ({:.1} s) -- upstream: {upstream}", start.elapsed().as_secs_f64());
                failed.push(format!("{name}: {}", msg.lines().next().unwrap_or_default()));
            }
        }
        c.case = format!("reset after {name}");
        c.reset();
    }
    println!("group {suffix}: {} cases in {:.1} s", cases.len(), group_start.elapsed().as_secs_f64());
    assert!(failed.is_empty(), "{} case(s) failed (truth tables above):\n{}", failed.len(), failed.join("\n"));
}

// ---------------------------------------------------------------------------------------
// Default deny, allow-all, selectors
// ---------------------------------------------------------------------------------------

const DENY_INGRESS: &str = "
    podSelector: {}
    policyTypes: [Ingress]
";

fn default_deny_ingress(c: &mut Cluster) {
    c.apply("x", "deny-ingress", DENY_INGRESS);
    let mut r = c.reach();
    r.deny("*", "x/*");
    c.check(&r, 80, TCP);
}

fn default_deny_all(c: &mut Cluster) {
    c.apply("x", "deny-all", "
        podSelector: {}
        policyTypes: [Ingress, Egress]
    ");
    let mut r = c.reach();
    r.deny("*", "x/*").deny("x/*", "*");
    c.check(&r, 80, TCP);
    // Traffic from the pod's own node is always allowed (kubelet probes).
    assert_eq!(c.node_reaches("x/a", 80, TCP), [true, true], "node -> x/a (IPv4, IPv6)");
}

fn allow_from_pod_in_same_namespace(c: &mut Cluster) {
    c.apply("x", "x-a-allows-x-b", "
        podSelector:
          matchLabels: {pod: a}
        policyTypes: [Ingress]
        ingress:
        - from:
          - podSelector:
              matchLabels: {pod: b}
    ");
    let mut r = c.reach();
    r.ingress("x/a", false).allow("x/b", "x/a");
    c.check(&r, 80, TCP);
}

fn allow_ingress_for_target(c: &mut Cluster) {
    c.apply("x", "deny-all", DENY_INGRESS);
    c.apply("x", "allow-all-to-a", "
        podSelector:
          matchLabels: {pod: a}
        policyTypes: [Ingress]
        ingress:
        - from:
          - podSelector: {}
            namespaceSelector: {}
    ");
    let mut r = c.reach();
    r.deny("*", "x/*").allow("*", "x/a");
    c.check(&r, 80, TCP);
}

fn allow_from_all_namespaces(c: &mut Cluster) {
    c.apply("x", "allow-from-another-ns", "
        podSelector:
          matchLabels: {pod: a}
        policyTypes: [Ingress]
        ingress:
        - from:
          - namespaceSelector: {}
    ");
    c.check(&c.reach(), 80, TCP);
}

fn namespace_selector(c: &mut Cluster) {
    c.apply("x", "allow-client-a-via-ns-selector", "
        podSelector:
          matchLabels: {pod: a}
        policyTypes: [Ingress]
        ingress:
        - from:
          - namespaceSelector:
              matchLabels: {ns: y}
    ");
    let mut r = c.reach();
    r.deny("x/*", "x/a").deny("z/*", "x/a");
    c.check(&r, 80, TCP);
}

fn pod_selector_match_expressions(c: &mut Cluster) {
    c.apply("x", "x-a-allows-x-b", "
        podSelector:
          matchLabels: {pod: a}
        policyTypes: [Ingress]
        ingress:
        - from:
          - podSelector:
              matchExpressions:
              - {key: pod, operator: In, values: [b]}
    ");
    let mut r = c.reach();
    r.ingress("x/a", false).allow("x/b", "x/a");
    c.check(&r, 80, TCP);
}

fn namespace_selector_match_expressions(c: &mut Cluster) {
    c.apply("x", "allow-ns-y-match-selector", "
        podSelector:
          matchLabels: {pod: a}
        policyTypes: [Ingress]
        ingress:
        - from:
          - namespaceSelector:
              matchExpressions:
              - {key: kubernetes.io/metadata.name, operator: In, values: [y]}
    ");
    let mut r = c.reach();
    r.deny("x/*", "x/a").deny("z/*", "x/a");
    c.check(&r, 80, TCP);
}

fn pod_selector_or_namespace_selector(c: &mut Cluster) {
    c.apply("x", "allow-ns-y-match-selector", "
        podSelector:
          matchLabels: {pod: a}
        policyTypes: [Ingress]
        ingress:
        - from:
          - namespaceSelector:
              matchExpressions:
              - {key: kubernetes.io/metadata.name, operator: NotIn, values: [x]}
          - podSelector:
              matchLabels: {pod: b}
    ");
    let mut r = c.reach();
    r.deny("x/c", "x/a");
    c.check(&r, 80, TCP);
}

fn pod_selector_and_namespace_selector(c: &mut Cluster) {
    c.apply("x", "allow-ns-y-podselector-and-nsselector", "
        podSelector:
          matchLabels: {pod: a}
        policyTypes: [Ingress]
        ingress:
        - from:
          - namespaceSelector:
              matchExpressions:
              - {key: kubernetes.io/metadata.name, operator: NotIn, values: [x]}
            podSelector:
              matchLabels: {pod: b}
    ");
    let mut r = c.reach();
    r.ingress("x/a", false).allow("y/b", "x/a").allow("z/b", "x/a");
    c.check(&r, 80, TCP);
}

fn multiple_pod_and_namespace_selectors(c: &mut Cluster) {
    c.apply("x", "allow-ns-y-z-pod-b-c", "
        podSelector:
          matchLabels: {pod: a}
        policyTypes: [Ingress]
        ingress:
        - from:
          - namespaceSelector:
              matchExpressions:
              - {key: kubernetes.io/metadata.name, operator: NotIn, values: [x]}
            podSelector:
              matchExpressions:
              - {key: pod, operator: In, values: [b, c]}
    ");
    let mut r = c.reach();
    r.ingress("x/a", false).allow("y/b", "x/a").allow("y/c", "x/a").allow("z/b", "x/a").allow("z/c", "x/a");
    c.check(&r, 80, TCP);
}

fn any_pod_selectors(c: &mut Cluster) {
    c.apply("x", "allow-ns-x-pod-b-c", "
        podSelector:
          matchLabels: {pod: a}
        policyTypes: [Ingress]
        ingress:
        - from:
          - podSelector:
              matchLabels: {pod: b}
          - podSelector:
              matchLabels: {pod: c}
    ");
    let mut r = c.reach();
    r.ingress("x/a", false).allow("x/b", "x/a").allow("x/c", "x/a");
    c.check(&r, 80, TCP);
}

const X_A_FROM_Y_A: &str = "
    podSelector:
      matchLabels: {pod: a}
    policyTypes: [Ingress]
    ingress:
    - from:
      - namespaceSelector:
          matchLabels: {kubernetes.io/metadata.name: y}
        podSelector:
          matchLabels: {pod: a}
";

fn pod_in_other_namespace(c: &mut Cluster, protocol: Protocol) {
    c.apply("x", "allow-ns-y-pod-a-via-namespace-pod-selector", X_A_FROM_Y_A);
    let mut r = c.reach();
    r.ingress("x/a", false).allow("y/a", "x/a");
    c.check(&r, 80, protocol);
}

fn deny_ingress_from_other_namespaces(c: &mut Cluster) {
    c.apply("x", "deny-empty-policy", "
        podSelector: {}
        policyTypes: [Ingress]
        ingress:
        - from:
          - podSelector: {}
    ");
    let mut r = c.reach();
    r.deny("y/*", "x/*").deny("z/*", "x/*");
    c.check(&r, 80, TCP);
}

fn allow_all(c: &mut Cluster) {
    c.apply("x", "allow-all", "
        podSelector: {}
        policyTypes: [Ingress]
        ingress:
        - {}
    ");
    let r = c.reach();
    c.check(&r, 80, TCP);
    c.check(&r, 81, TCP);
}

fn default_namespace_label_match_labels(c: &mut Cluster) {
    c.apply("x", "allow-client-a-via-ns-selector-for-immutable-ns-label", "
        podSelector:
          matchLabels: {pod: a}
        policyTypes: [Ingress]
        ingress:
        - from:
          - namespaceSelector:
              matchLabels: {kubernetes.io/metadata.name: y}
    ");
    let mut r = c.reach();
    r.deny("x/*", "x/a").deny("z/*", "x/a");
    c.check(&r, 80, TCP);
}

/// In, NotIn (true where the key is absent), Exists, DoesNotExist, on pods and namespaces.
fn match_expression_operators(c: &mut Cluster) {
    c.apply("x", "operators", "
        podSelector:
          matchLabels: {pod: a}
        policyTypes: [Ingress]
        ingress:
        - from:
          - namespaceSelector:
              matchExpressions:
              - {key: ns, operator: Exists}
            podSelector:
              matchExpressions:
              - {key: pod, operator: NotIn, values: [a]}
              - {key: team, operator: DoesNotExist}
    ");
    let mut r = c.reach();
    r.ingress("x/a", false).allow("*/b", "x/a").allow("*/c", "x/a");
    c.check(&r, 80, TCP);
    // x/c loses its pod label (NotIn holds on an absent key), y/b gains a team.
    c.label_pod("x/c", &[("role", "client")]);
    c.label_pod("y/b", &[("pod", "b"), ("team", "blue")]);
    // Namespace z loses its `ns` label (kubernetes.io/metadata.name stays).
    c.label_ns("z", &[("zone", "z")]);
    let mut r = c.reach();
    r.ingress("x/a", false).allow("x/b", "x/a").allow("x/c", "x/a").allow("y/c", "x/a");
    c.check(&r, 80, TCP);
}

// ---------------------------------------------------------------------------------------
// Ports, named ports, endPort, protocols
// ---------------------------------------------------------------------------------------

fn ports(c: &mut Cluster) {
    c.apply("x", "allow-client-a-via-ns-selector", "
        podSelector:
          matchLabels: {pod: a}
        policyTypes: [Ingress]
        ingress:
        - from:
          - namespaceSelector:
              matchLabels: {kubernetes.io/metadata.name: y}
          ports:
          - {port: 81, protocol: TCP}
    ");
    let mut r = c.reach();
    r.deny("x/*", "x/a").deny("z/*", "x/a");
    c.check(&r, 81, TCP);
    let mut r = c.reach();
    r.ingress("x/a", false);
    c.check(&r, 80, TCP);
}

fn stacked_overlapping_policies(c: &mut Cluster) {
    let from_y_on = |port: u16| {
        format!(
            "
            podSelector:
              matchLabels: {{pod: a}}
            policyTypes: [Ingress]
            ingress:
            - from:
              - namespaceSelector:
                  matchLabels: {{kubernetes.io/metadata.name: y}}
              ports:
              - {{port: {port}, protocol: TCP}}
            "
        )
    };
    c.apply("x", "allow-client-a-via-ns-selector", &from_y_on(81));
    let mut allow = c.reach();
    allow.deny("x/*", "x/a").allow("y/*", "x/a").deny("z/*", "x/a");
    let mut deny = c.reach();
    deny.ingress("x/a", false);
    c.check(&allow, 81, TCP);
    c.check(&deny, 80, TCP);
    c.apply("x", "allow-client-a-via-ns-selector-80", &from_y_on(80));
    c.check(&allow, 80, TCP);
    c.check(&allow, 81, TCP);
}

fn named_port_ingress(c: &mut Cluster) {
    c.apply("x", "allow-all", "
        podSelector: {}
        policyTypes: [Ingress]
        ingress:
        - ports:
          - port: serve-81-tcp
    ");
    c.check(&c.reach(), 81, TCP);
    let mut r = c.reach();
    r.deny("*", "x/*");
    c.check(&r, 80, TCP);
}

fn named_port_ingress_from_namespace(c: &mut Cluster) {
    c.apply("x", "allow-client-a-via-ns-selector-80", "
        podSelector:
          matchLabels: {pod: a}
        policyTypes: [Ingress]
        ingress:
        - from:
          - namespaceSelector:
              matchLabels: {kubernetes.io/metadata.name: y}
          ports:
          - {port: serve-80-tcp, protocol: TCP}
    ");
    let mut r = c.reach();
    r.deny("x/*", "x/a").deny("z/*", "x/a");
    c.check(&r, 80, TCP);
    let mut r = c.reach();
    r.ingress("x/a", false);
    c.check(&r, 81, TCP);
}

fn named_port_egress(c: &mut Cluster) {
    c.apply("x", "allow-egress", "
        podSelector: {}
        policyTypes: [Egress]
        egress:
        - ports:
          - port: serve-80-tcp
    ");
    c.check(&c.reach(), 80, TCP);
    let mut r = c.reach();
    r.deny("x/*", "*");
    c.check(&r, 81, TCP);
}

/// A named port matches only a container port of that name with the same protocol.
fn named_port_protocol_must_match(c: &mut Cluster) {
    c.apply("x", "named-udp", "
        podSelector:
          matchLabels: {pod: a}
        policyTypes: [Ingress]
        ingress:
        - ports:
          - {port: serve-81-udp, protocol: UDP}
          - {port: serve-80-tcp, protocol: UDP}
    ");
    c.check(&c.reach(), 81, UDP);
    let mut closed = c.reach();
    closed.ingress("x/a", false);
    c.check(&closed, 80, UDP);
    c.check(&closed, 80, TCP);
    c.check(&closed, 81, TCP);
}

/// A named port resolves on each destination pod: on the selected pod for ingress, on the
/// peer for egress; pods without the name match nothing.
fn named_port_resolves_per_pod(c: &mut Cluster) {
    c.add_container_port("x/b", "web", 80, TCP);
    c.add_container_port("x/c", "web", 81, TCP);
    c.apply("x", "ingress-on-web", "
        podSelector: {}
        policyTypes: [Ingress]
        ingress:
        - ports:
          - port: web
    ");
    c.apply("y", "a-egress-to-web", "
        podSelector:
          matchLabels: {pod: a}
        policyTypes: [Egress]
        egress:
        - ports:
          - port: web
    ");
    let mut r = c.reach();
    r.deny("*", "x/a").deny("*", "x/c").egress("y/a", false).allow("y/a", "x/b");
    c.check(&r, 80, TCP);
    let mut r = c.reach();
    r.deny("*", "x/a").deny("*", "x/b").egress("y/a", false).allow("y/a", "x/c");
    c.check(&r, 81, TCP);
}

fn end_port_ingress(c: &mut Cluster) {
    c.apply("x", "range", "
        podSelector:
          matchLabels: {pod: a}
        policyTypes: [Ingress]
        ingress:
        - from:
          - namespaceSelector:
              matchLabels: {ns: y}
          ports:
          - {protocol: TCP, port: 1, endPort: 80}
    ");
    let mut from_y = c.reach();
    from_y.ingress("x/a", false).allow("y/*", "x/a");
    let mut closed = c.reach();
    closed.ingress("x/a", false);
    c.check(&from_y, 80, TCP);
    c.check(&closed, 81, TCP);
    c.apply("x", "range", "
        podSelector:
          matchLabels: {pod: a}
        policyTypes: [Ingress]
        ingress:
        - from:
          - namespaceSelector:
              matchLabels: {ns: y}
          ports:
          - {protocol: TCP, port: 81, endPort: 1000}
    ");
    c.check(&closed, 80, TCP);
    c.check(&from_y, 81, TCP);
}

fn end_port_egress(c: &mut Cluster) {
    c.apply("x", "udp-range", "
        podSelector: {}
        policyTypes: [Egress]
        egress:
        - ports:
          - {protocol: UDP, port: 80, endPort: 81}
    ");
    c.check(&c.reach(), 80, UDP);
    c.check(&c.reach(), 81, UDP);
    let mut r = c.reach();
    r.deny("x/*", "*");
    c.check(&r, 80, TCP);
}

fn multiple_ports_and_protocols(c: &mut Cluster) {
    c.apply("x", "mixed", "
        podSelector:
          matchLabels: {pod: a}
        policyTypes: [Ingress]
        ingress:
        - ports:
          - {protocol: TCP, port: 80}
          - {protocol: UDP, port: 81}
          - {protocol: SCTP, port: 80}
    ");
    let open = c.reach();
    let mut closed = c.reach();
    closed.ingress("x/a", false);
    c.check(&open, 80, TCP);
    c.check(&closed, 81, TCP);
    c.check(&closed, 80, UDP);
    c.check(&open, 81, UDP);
    c.check(&open, 80, SCTP);
    c.check(&closed, 81, SCTP);
}

fn any_port_on_one_protocol(c: &mut Cluster) {
    c.apply("x", "allow-ingress-by-proto", "
        podSelector:
          matchLabels: {pod: a}
        policyTypes: [Ingress]
        ingress:
        - ports:
          - protocol: TCP
    ");
    c.check(&c.reach(), 80, TCP);
    c.check(&c.reach(), 81, TCP);
    let mut r = c.reach();
    r.ingress("x/a", false);
    c.check(&r, 80, UDP);
}

fn sctp_not_mistaken_for_tcp(c: &mut Cluster) {
    c.apply("x", "deny-ingress", DENY_INGRESS);
    c.apply("x", "allow-only-sctp-ingress-on-port-81", "
        podSelector:
          matchLabels: {pod: a}
        policyTypes: [Ingress]
        ingress:
        - ports:
          - {port: 81, protocol: SCTP}
    ");
    let mut r = c.reach();
    r.deny("*", "x/*");
    c.check(&r, 81, TCP);
    c.check(&r, 81, UDP);
    // The SCTP allow itself works.
    r.allow("*", "x/a");
    c.check(&r, 81, SCTP);
}

fn sctp_policy_isolates(c: &mut Cluster) {
    c.apply("x", "allow-only-sctp-ingress-on-port-80", "
        podSelector:
          matchLabels: {pod: a}
        policyTypes: [Ingress]
        ingress:
        - ports:
          - {port: 80, protocol: SCTP}
    ");
    let mut r = c.reach();
    r.ingress("x/a", false);
    c.check(&r, 81, TCP);
    c.check(&r, 80, TCP);
    c.check(&r, 81, SCTP);
    c.check(&c.reach(), 80, SCTP);
}

fn udp_not_tcp(c: &mut Cluster) {
    c.apply("x", "allow-only-udp-ingress-on-port-81", "
        podSelector:
          matchLabels: {pod: a}
        policyTypes: [Ingress]
        ingress:
        - ports:
          - {port: 81, protocol: UDP}
    ");
    let mut r = c.reach();
    r.ingress("x/a", false);
    c.check(&r, 81, TCP);
    c.check(&c.reach(), 81, UDP);
}

fn default_deny_ingress_on(c: &mut Cluster, protocol: Protocol) {
    c.apply("x", "deny-all", DENY_INGRESS);
    let mut r = c.reach();
    r.deny("*", "x/*");
    c.check(&r, 80, protocol);
}

fn ports_on(c: &mut Cluster, protocol: Protocol) {
    c.apply("x", "allow-ingress-on-port-81-ns-x", &format!(
        "
        podSelector:
          matchLabels: {{pod: a}}
        policyTypes: [Ingress]
        ingress:
        - from:
          - namespaceSelector:
              matchLabels: {{kubernetes.io/metadata.name: y}}
          ports:
          - {{port: 81, protocol: {protocol}}}
        "
    ));
    let mut r = c.reach();
    r.deny("x/*", "x/a").deny("z/*", "x/a");
    c.check(&r, 81, protocol);
    let mut r = c.reach();
    r.ingress("x/a", false);
    c.check(&r, 80, protocol);
}

// ---------------------------------------------------------------------------------------
// Egress, ipBlock
// ---------------------------------------------------------------------------------------

fn deny_egress_by_pod_selector(c: &mut Cluster) {
    c.apply("x", "deny-egress-pod-a", "
        podSelector:
          matchLabels: {pod: a}
        policyTypes: [Egress]
    ");
    let mut r = c.reach();
    r.egress("x/a", false);
    c.check(&r, 80, TCP);
}

fn deny_egress_namespace(c: &mut Cluster) {
    c.apply("x", "deny-egress-ns-x", "
        podSelector: {}
        policyTypes: [Egress]
        egress: []
    ");
    let mut r = c.reach();
    r.deny("x/*", "*");
    c.check(&r, 80, TCP);
    c.check(&r, 80, UDP);
    c.check(&r, 80, SCTP);
}

fn ingress_and_egress_together(c: &mut Cluster) {
    c.apply("x", "allow-client-a-via-pod-selector", "
        podSelector:
          matchLabels: {pod: a}
        policyTypes: [Egress, Ingress]
        ingress:
        - from:
          - podSelector:
              matchLabels: {pod: b}
        egress:
        - ports:
          - port: 80
    ");
    let mut r = c.reach();
    r.ingress("x/a", false).allow("x/b", "x/a");
    c.check(&r, 80, TCP);
    let mut r = c.reach();
    r.ingress("x/a", false).egress("x/a", false).allow("x/b", "x/a");
    c.check(&r, 81, TCP);
}

/// policyTypes omitted: Ingress always, Egress because egress rules are present.
fn policy_types_implied(c: &mut Cluster) {
    c.apply("x", "implied", "
        podSelector:
          matchLabels: {pod: a}
        egress:
        - to:
          - namespaceSelector:
              matchLabels: {ns: y}
    ");
    let mut r = c.reach();
    r.ingress("x/a", false).egress("x/a", false).allow("x/a", "y/*");
    c.check(&r, 80, TCP);
}

fn client_side_egress_deny(c: &mut Cluster) {
    c.apply("x", "allow-to-ns-y-pod-a", "
        podSelector:
          matchLabels: {pod: a}
        policyTypes: [Egress]
        egress:
        - to:
          - namespaceSelector:
              matchLabels: {kubernetes.io/metadata.name: y}
            podSelector:
              matchLabels: {pod: a}
    ");
    for target in ["a", "b"] {
        c.apply("y", &format!("allow-from-xa-on-y{target}-match-selector"), &format!(
            "
            podSelector:
              matchLabels: {{pod: {target}}}
            policyTypes: [Ingress]
            ingress:
            - from:
              - namespaceSelector:
                  matchLabels: {{kubernetes.io/metadata.name: x}}
                podSelector:
                  matchLabels: {{pod: a}}
            "
        ));
    }
    let mut r = c.reach();
    r.deny("x/a", "*").deny("*", "y/a").allow("x/a", "y/a").deny("*", "y/b");
    c.check(&r, 80, TCP);
}

fn egress_to_pod_in_other_namespace(c: &mut Cluster) {
    c.apply("x", "allow-to-ns-y-pod-a", "
        podSelector:
          matchLabels: {pod: a}
        policyTypes: [Egress]
        egress:
        - to:
          - namespaceSelector:
              matchLabels: {kubernetes.io/metadata.name: y}
            podSelector:
              matchLabels: {pod: a}
    ");
    let mut r = c.reach();
    r.egress("x/a", false).allow("x/a", "y/a");
    c.check(&r, 80, TCP);
}

fn ingress_allow_all_takes_precedence(c: &mut Cluster) {
    c.apply("x", "allow-ingress-port-80", "
        podSelector: {}
        policyTypes: [Ingress]
        ingress:
        - ports:
          - port: 80
    ");
    let mut r = c.reach();
    r.deny("*", "x/*");
    c.check(&r, 81, TCP);
    c.apply("x", "allow-ingress", "
        podSelector: {}
        policyTypes: [Ingress]
        ingress:
        - {}
    ");
    c.check(&c.reach(), 81, TCP);
}

fn egress_allow_all_takes_precedence(c: &mut Cluster) {
    c.apply("x", "allow-egress-port-80", "
        podSelector: {}
        policyTypes: [Egress]
        egress:
        - ports:
          - port: 80
    ");
    let mut r = c.reach();
    r.deny("x/*", "*");
    c.check(&r, 81, TCP);
    c.apply("x", "allow-egress", "
        podSelector: {}
        policyTypes: [Egress]
        egress:
        - {}
    ");
    c.check(&c.reach(), 81, TCP);
}

fn egress_to_cidr(c: &mut Cluster) {
    c.apply("x", "allow-client-a-via-cidr-egress-rule", "
        podSelector:
          matchLabels: {pod: a}
        policyTypes: [Egress]
        egress:
        - to:
          - ipBlock: {cidr: 198.18.10.34/32}
          - ipBlock: {cidr: '2001:2:0:10::22/128'}
    ");
    let mut r = c.reach();
    r.egress("x/a", false).allow("x/a", "y/b");
    c.check(&r, 80, TCP);
}

const CIDR_EXCEPT_X_B: &str = "
    podSelector:
      matchLabels: {pod: a}
    policyTypes: [Egress]
    egress:
    - to:
      - ipBlock: {cidr: 198.18.0.0/15, except: [198.18.10.18/32]}
      - ipBlock: {cidr: '2001:2::/48', except: ['2001:2:0:10::12/128']}
";

fn egress_to_cidr_with_except(c: &mut Cluster) {
    c.apply("x", "allow-client-a-via-cidr-egress-rule", CIDR_EXCEPT_X_B);
    let mut r = c.reach();
    r.deny("x/a", "x/b");
    c.check(&r, 80, TCP);
}

fn cidr_and_except_overlap(c: &mut Cluster) {
    c.apply("x", "allow-client-a-via-cidr-egress-rule", CIDR_EXCEPT_X_B);
    let mut r = c.reach();
    r.deny("x/a", "x/b");
    c.check(&r, 80, TCP);
    // A second policy allows x/b's addresses: the union allows what the first excepts.
    let only_x_b = "
        podSelector:
          matchLabels: {pod: a}
        policyTypes: [Egress]
        egress:
        - to:
          - ipBlock: {cidr: 198.18.10.18/32}
          - ipBlock: {cidr: '2001:2:0:10::12/128'}
    ";
    c.apply("x", "allow-x-b", only_x_b);
    c.check(&c.reach(), 80, TCP);
    // Upstream's final step: the first policy replaced by the x/b-only one.
    c.apply("x", "allow-client-a-via-cidr-egress-rule", only_x_b);
    let mut r = c.reach();
    r.egress("x/a", false).allow("x/a", "x/b");
    c.check(&r, 80, TCP);
}

fn ingress_from_cidr_with_except(c: &mut Cluster) {
    c.apply("x", "from-y-addresses", "
        podSelector:
          matchLabels: {pod: a}
        policyTypes: [Ingress]
        ingress:
        - from:
          - ipBlock: {cidr: 198.18.10.32/28, except: [198.18.10.34/32]}
          - ipBlock: {cidr: '2001:2:0:10::20/124', except: ['2001:2:0:10::22/128']}
    ");
    let mut r = c.reach();
    r.ingress("x/a", false).allow("y/a", "x/a").allow("y/c", "x/a");
    c.check(&r, 80, TCP);
    c.check(&r, 80, UDP);
}

fn ingress_and_egress_independent(c: &mut Cluster) {
    c.apply("x", "allow-egress-for-target", "
        podSelector:
          matchLabels: {pod: a}
        policyTypes: [Egress]
        egress:
        - {}
    ");
    c.check(&c.reach(), 80, TCP);
    c.apply("x", "deny-ingress-via-label-selector", "
        podSelector:
          matchLabels: {pod: a}
        policyTypes: [Ingress]
    ");
    let mut r = c.reach();
    r.ingress("x/a", false);
    c.check(&r, 80, TCP);
}

fn default_namespace_label_match_expressions_egress(c: &mut Cluster) {
    c.apply("x", "allow-ns-y-match-selector-for-immutable-ns-label", "
        podSelector:
          matchLabels: {pod: a}
        policyTypes: [Egress]
        egress:
        - to:
          - namespaceSelector:
              matchExpressions:
              - {key: kubernetes.io/metadata.name, operator: NotIn, values: [y]}
    ");
    let mut r = c.reach();
    r.deny("x/a", "y/*");
    c.check(&r, 80, TCP);
}

// ---------------------------------------------------------------------------------------
// Changes: policies, labels, pods
// ---------------------------------------------------------------------------------------

fn updated_policy(c: &mut Cluster) {
    c.apply("x", "allow-all-mutate-to-deny-all", "
        podSelector: {}
        policyTypes: [Ingress]
        ingress:
        - {}
    ");
    c.check(&c.reach(), 81, TCP);
    c.apply("x", "allow-all-mutate-to-deny-all", "
        podSelector: {}
        policyTypes: [Ingress]
        ingress: []
    ");
    let mut r = c.reach();
    r.deny("*", "x/*");
    c.check(&r, 81, TCP);
}

fn updated_namespace_labels(c: &mut Cluster) {
    c.apply("x", "allow-client-a-via-ns-selector", "
        podSelector:
          matchLabels: {pod: a}
        policyTypes: [Ingress]
        ingress:
        - from:
          - namespaceSelector:
              matchLabels: {ns2: updated}
    ");
    let mut closed = c.reach();
    closed.ingress("x/a", false);
    c.check(&closed, 80, TCP);
    c.label_ns("y", &[("ns", "y"), ("ns2", "updated")]);
    let mut r = c.reach();
    r.ingress("x/a", false).allow("y/*", "*");
    c.check(&r, 80, TCP);
    // And back: the label removed closes it again.
    c.label_ns("y", &[("ns", "y")]);
    c.check(&closed, 80, TCP);
}

fn updated_pod_labels(c: &mut Cluster) {
    c.apply("x", "allow-client-a-via-pod-selector", "
        podSelector:
          matchLabels: {pod: a}
        policyTypes: [Ingress]
        ingress:
        - from:
          - podSelector:
              matchLabels: {pod: b, pod2: updated}
    ");
    let mut closed = c.reach();
    closed.ingress("x/a", false);
    c.check(&closed, 80, TCP);
    c.label_pod("x/b", &[("pod", "b"), ("pod2", "updated")]);
    let mut r = c.reach();
    r.ingress("x/a", false).allow("x/b", "x/a");
    c.check(&r, 80, TCP);
}

fn deny_ingress_to_updated_pod(c: &mut Cluster) {
    c.apply("x", "deny-ingress-via-label-selector", "
        podSelector:
          matchLabels: {target: isolated}
        policyTypes: [Ingress]
    ");
    c.check(&c.reach(), 80, TCP);
    c.label_pod("x/a", &[("pod", "a"), ("target", "isolated")]);
    let mut r = c.reach();
    r.ingress("x/a", false);
    c.check(&r, 80, TCP);
    // Unlabelled again: open again.
    c.label_pod("x/a", &[("pod", "a")]);
    c.check(&c.reach(), 80, TCP);
}

fn policy_deletion_restores_traffic(c: &mut Cluster) {
    c.apply("x", "deny-all", "
        podSelector: {}
        policyTypes: [Ingress, Egress]
    ");
    let mut r = c.reach();
    r.deny("x/*", "*").deny("*", "x/*");
    c.check(&r, 80, TCP);
    c.delete_policy("x", "deny-all");
    c.check(&c.reach(), 80, TCP);
}

/// A pod added to an isolated namespace is isolated at once and selected as a peer; a deleted
/// pod's address (its sandbox still sends) no longer counts as a pod.
fn pods_added_and_deleted(c: &mut Cluster) {
    c.apply("x", "from-y-only", "
        podSelector: {}
        policyTypes: [Ingress]
        ingress:
        - from:
          - namespaceSelector:
              matchLabels: {ns: y}
    ");
    c.apply("z", "from-pod-d", "
        podSelector:
          matchLabels: {pod: a}
        policyTypes: [Ingress]
        ingress:
        - from:
          - namespaceSelector: {}
            podSelector:
              matchLabels: {pod: d}
    ");
    let mut r = c.reach();
    r.deny("*", "x/*").allow("y/*", "x/*").ingress("z/a", false);
    c.check(&r, 80, TCP);
    c.add_pod(model_pod("x", "d", 1, 4));
    let mut r = c.reach();
    r.deny("*", "x/*").allow("y/*", "x/*").ingress("z/a", false).allow("x/d", "z/a");
    c.check(&r, 80, TCP);
    // y/b deleted: its address is not a pod of y any more (still probed, as "y/b").
    c.delete_pod("y/b");
    let mut pods = c.pod_ids();
    pods.push("y/b".into());
    let mut r = Reachability::new(&pods, true);
    r.deny("*", "x/*").allow("y/a", "x/*").allow("y/c", "x/*").ingress("z/a", false).allow("x/d", "z/a");
    c.check(&r, 80, TCP);
    // x/d deleted: z/a has no allowed peer left; x/d's sandbox is nobody's pod (not enforced).
    c.delete_pod("x/d");
    let mut r = Reachability::new(&pods, true);
    r.deny("*", "x/*").allow("y/a", "x/*").allow("y/c", "x/*").ingress("z/a", false).allow("*", "x/d");
    c.check(&r, 80, TCP);
}

/// A pod deleted and another created with its addresses (and other labels): what was allowed
/// for the old pod's labels no longer applies to the address.
fn pod_address_reused(c: &mut Cluster) {
    c.apply("x", "from-b", "
        podSelector:
          matchLabels: {pod: a}
        policyTypes: [Ingress]
        ingress:
        - from:
          - namespaceSelector: {}
            podSelector:
              matchLabels: {pod: b}
    ");
    let mut r = c.reach();
    r.ingress("x/a", false).allow("*/b", "x/a");
    c.check(&r, 80, TCP);
    c.replace_pod("y/b", "d", &[("pod", "d")]);
    let mut r = c.reach();
    r.ingress("x/a", false).allow("x/b", "x/a").allow("z/b", "x/a");
    c.check(&r, 80, TCP);
}

// ---------------------------------------------------------------------------------------
// The seed example: web / api / db
// ---------------------------------------------------------------------------------------

const SEED_NAMESPACE: &str = include_str!("../../manifests/examples/three-tier/00-namespace.yaml");
const SEED_POLICIES: [(&str, &str); 4] = [
    ("10-default-deny.yaml", include_str!("../../manifests/examples/three-tier/10-default-deny.yaml")),
    ("20-db-allow-api.yaml", include_str!("../../manifests/examples/three-tier/20-db-allow-api.yaml")),
    ("30-api-allow-web.yaml", include_str!("../../manifests/examples/three-tier/30-api-allow-web.yaml")),
    ("40-web-allow-all.yaml", include_str!("../../manifests/examples/three-tier/40-web-allow-all.yaml")),
];

/// x/a and y/a as outside clients, and the seed's three pods (labels and container ports as
/// in manifests/examples/three-tier/50-workloads.yaml); every pod serves 80, 3306 and 5000.
fn seed_setup() -> Setup {
    let mut setup = xyz();
    setup.pods.retain(|p| p.name == "a" && p.ns != "z");
    setup.namespaces.push(NsModel { name: "three-tier".into(), labels: labels(&[("app.kubernetes.io/part-of", "three-tier")]) });
    for (j, (app, port_name, port)) in [("web", "http", 80), ("api", "http-api", 5000), ("db", "mysql", 3306)].into_iter().enumerate() {
        let mut pod = model_pod("three-tier", app, 4, j as u8 + 1);
        pod.labels = labels(&[("app", app)]);
        pod.short = format!("t{app}");
        pod.ports = vec![(port_name.into(), port, TCP)];
        setup.pods.push(pod);
    }
    setup.server_ports = vec![80, 3306, 5000];
    setup
}

fn seed_ingress_expectations(c: &Cluster) -> [(u16, Reachability); 3] {
    let tier = |allow: &[(&str, &str)]| {
        let mut r = c.reach();
        r.deny("*", "three-tier/*");
        for (from, to) in allow {
            r.allow(from, to);
        }
        r
    };
    [
        (80, tier(&[("*", "three-tier/web")])),
        (5000, tier(&[("three-tier/web", "three-tier/api")])),
        (3306, tier(&[("three-tier/api", "three-tier/db")])),
    ]
}

fn seed_example(c: &mut Cluster) {
    // The shipped namespace manifest, as it is (it is the same object as the setup's).
    let ns: serde_yaml::Value = serde_yaml::from_str(SEED_NAMESPACE).expect("seed namespace YAML");
    assert_eq!(ns["metadata"]["labels"]["app.kubernetes.io/part-of"], "three-tier");
    for (name, text) in SEED_POLICIES {
        c.apply_file(name, text);
    }
    for (port, r) in seed_ingress_expectations(c) {
        c.check(&r, port, TCP);
    }
}

/// The seed's prose also asks for egress rules: web may only call api:5000, api only db:3306,
/// db nothing.
fn seed_example_with_egress(c: &mut Cluster) {
    for (name, text) in SEED_POLICIES {
        c.apply_file(name, text);
    }
    c.apply("three-tier", "web-egress", "
        podSelector:
          matchLabels: {app: web}
        policyTypes: [Egress]
        egress:
        - to:
          - podSelector:
              matchLabels: {app: api}
          ports:
          - {protocol: TCP, port: http-api}
    ");
    c.apply("three-tier", "api-egress", "
        podSelector:
          matchLabels: {app: api}
        policyTypes: [Egress]
        egress:
        - to:
          - podSelector:
              matchLabels: {app: db}
          ports:
          - {protocol: TCP, port: 3306}
    ");
    c.apply("three-tier", "db-egress", "
        podSelector:
          matchLabels: {app: db}
        policyTypes: [Egress]
    ");
    for (port, mut r) in seed_ingress_expectations(c) {
        r.deny("three-tier/*", "*");
        match port {
            5000 => r.allow("three-tier/web", "three-tier/api"),
            3306 => r.allow("three-tier/api", "three-tier/db"),
            _ => &mut r,
        };
        c.check(&r, port, TCP);
    }
}

// ---------------------------------------------------------------------------------------
// Services: kube-proxy-style DNAT in every node namespace (pods alternate between nodes:
// x/a, x/c, y/b, z/a, z/c on node-1; x/b, y/a, y/c, z/b on node-2)
// ---------------------------------------------------------------------------------------

/// The ClusterIP of Service 198.19.0.`last`, port 80.
fn cluster_ip(last: u8) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 19, 0, last)), 80)
}

/// x/a and x/b may only reach pod b of namespace y; through y/b's ClusterIP (TCP and UDP)
/// they reach it (x/a on the same node, x/b across), through y/c's they do not.
fn service_egress_pod_selector(c: &mut Cluster) {
    c.apply("x", "egress-to-y-b", "
        podSelector:
          matchExpressions:
          - {key: pod, operator: In, values: [a, b]}
        policyTypes: [Egress]
        egress:
        - to:
          - namespaceSelector:
              matchLabels: {ns: y}
            podSelector:
              matchLabels: {pod: b}
    ");
    let services = vec![c.service("y/b", 10, TCP, &["y/b"], None), c.service("y/b-udp", 11, UDP, &["y/b"], None), c.service("y/c", 12, TCP, &["y/c"], None)];
    c.set_services(services);
    let to_b: Expected<'_> = &[("y/b", true)];
    c.check_service("ClusterIP of y/b", cluster_ip(10), TCP, &[("x/a", to_b), ("x/b", to_b)]);
    c.check_service("ClusterIP of y/b (UDP)", cluster_ip(11), UDP, &[("x/a", to_b), ("x/b", to_b)]);
    c.check_service("ClusterIP of y/c", cluster_ip(12), TCP, &[("x/a", &[("y/c", false)]), ("x/b", &[("y/c", false)]), ("z/a", &[("y/c", true)])]);
}

/// "Anything but the cluster": egress to 0.0.0.0/0 and ::/0 except the pod range. Pods are
/// denied directly and through ClusterIPs; the outside world is allowed.
fn service_egress_except_pod_cidr(c: &mut Cluster) {
    c.apply("x", "internet-only", &format!(
        "
        podSelector:
          matchExpressions:
          - {{key: pod, operator: In, values: [a, b]}}
        policyTypes: [Egress]
        egress:
        - to:
          - ipBlock: {{cidr: 0.0.0.0/0, except: [{POD_CIDR_V4}]}}
          - ipBlock: {{cidr: '::/0', except: ['{POD_CIDR_V6}']}}
        "
    ));
    c.outside();
    c.set_services(vec![c.service("y/b", 10, TCP, &["y/b"], None), c.service("y/two", 13, TCP, &["y/a", "z/a"], None)]);
    let mut r = c.reach();
    r.egress("x/a", false).egress("x/b", false);
    c.check(&r, 80, TCP);
    let both: Expected<'_> = &[("y/a", false), ("z/a", false)];
    c.check_service("ClusterIP of y/b", cluster_ip(10), TCP, &[("x/a", &[("y/b", false)]), ("x/b", &[("y/b", false)])]);
    c.check_service("ClusterIP of y/a and z/a", cluster_ip(13), TCP, &[("x/a", both), ("x/b", both)]);
    let world = SocketAddr::new(c.outside().addr(false), 80);
    c.check_service("the outside world", world, TCP, &[("x/a", &[(OUTSIDE, true)]), ("x/b", &[(OUTSIDE, true)])]);
}

/// Egress to namespace y only, through a Service whose backends are y/a (node-2) and z/a
/// (node-1): each connection gets the verdict of the backend it reached.
fn service_egress_namespace_selector_two_backends(c: &mut Cluster) {
    c.apply("x", "egress-to-ns-y", "
        podSelector:
          matchExpressions:
          - {key: pod, operator: In, values: [a, b]}
        policyTypes: [Egress]
        egress:
        - to:
          - namespaceSelector:
              matchLabels: {ns: y}
    ");
    c.set_services(vec![c.service("y/mixed", 20, TCP, &["y/a", "z/a"], None)]);
    let split: Expected<'_> = &[("y/a", true), ("z/a", false)];
    c.check_service("ClusterIP of y/a and z/a", cluster_ip(20), TCP, &[("x/a", split), ("x/b", split), ("z/b", &[("y/a", true), ("z/a", true)])]);
}

/// Ingress of y/b (node-1) and y/c (node-2) only from x/a: through their ClusterIP, x/a
/// reaches both, x/b neither.
fn service_ingress_allow_list(c: &mut Cluster) {
    c.apply("y", "only-x-a", "
        podSelector:
          matchExpressions:
          - {key: pod, operator: In, values: [b, c]}
        policyTypes: [Ingress]
        ingress:
        - from:
          - namespaceSelector:
              matchLabels: {ns: x}
            podSelector:
              matchLabels: {pod: a}
    ");
    c.set_services(vec![c.service("y/bc", 30, TCP, &["y/b", "y/c"], None)]);
    c.check_service("ClusterIP of y/b and y/c", cluster_ip(30), TCP, &[("x/a", &[("y/b", true), ("y/c", true)]), ("x/b", &[("y/b", false), ("y/c", false)])]);
}

/// The outside world connects to node-1's InternalIP and a NodePort, DNATed (without
/// masquerade) to backends on both nodes: allowed by an ipBlock of the outside range, denied
/// where only pods are allowed (which pods still reach through the ClusterIP).
fn service_node_port_from_outside(c: &mut Cluster) {
    c.apply("y", "from-outside", "
        podSelector:
          matchExpressions:
          - {key: pod, operator: In, values: [a, b]}
        policyTypes: [Ingress]
        ingress:
        - from:
          - ipBlock: {cidr: 198.18.200.0/24}
          - ipBlock: {cidr: '2001:2:0:c800::/64'}
    ");
    for ns in ["y", "z"] {
        let pod = if ns == "y" { "c" } else { "a" };
        c.apply(ns, "pods-only", &format!(
            "
            podSelector:
              matchLabels: {{pod: {pod}}}
            policyTypes: [Ingress]
            ingress:
            - from:
              - namespaceSelector: {{}}
            "
        ));
    }
    c.outside();
    c.set_services(vec![c.service("y/ab", 40, TCP, &["y/a", "y/b"], Some(30080)), c.service("y/cz", 41, TCP, &["y/c", "z/a"], Some(30081))]);
    let node1 = IpAddr::V4(c.net.addrs[0].ipv4);
    c.check_service("NodePort 30080 of y/a and y/b", SocketAddr::new(node1, 30080), TCP, &[(OUTSIDE, &[("y/a", true), ("y/b", true)])]);
    c.check_service("NodePort 30081 of y/c and z/a", SocketAddr::new(node1, 30081), TCP, &[(OUTSIDE, &[("y/c", false), ("z/a", false)])]);
    c.check_service("ClusterIP of y/c and z/a", cluster_ip(41), TCP, &[("x/b", &[("y/c", true), ("z/a", true)])]);
}

/// Hairpin: x/a may only send to pods labelled like itself, and reaches itself through its
/// own Service (masqueraded, as kube-proxy does when source and backend are one); the other
/// backend, x/b on node-2, is denied.
fn service_hairpin(c: &mut Cluster) {
    c.apply("x", "egress-to-own-labels", "
        podSelector:
          matchLabels: {pod: a}
        policyTypes: [Egress]
        egress:
        - to:
          - podSelector:
              matchLabels: {pod: a}
    ");
    c.set_services(vec![c.service("x/a", 50, TCP, &["x/a"], None), c.service("x/ab", 51, TCP, &["x/a", "x/b"], None)]);
    c.check_service("its own ClusterIP", cluster_ip(50), TCP, &[("x/a", &[("x/a", true)])]);
    c.check_service("ClusterIP of x/a and x/b", cluster_ip(51), TCP, &[("x/a", &[("x/a", true), ("x/b", false)]), ("z/b", &[("x/a", true), ("x/b", true)])]);
}

// ---------------------------------------------------------------------------------------
// ClusterNetworkPolicy (network-policy-api v1alpha2; the upstream conformance suite's cases
// re-expressed on the x, y, z model: its namespaces are gryffindor, slytherin, ...)
// ---------------------------------------------------------------------------------------

/// An Admin or Baseline policy on namespace x's pods with one ingress rule from `from`.
fn cnp_ingress_to_x(tier: &str, priority: u32, action: &str, from: &str, protocols: &str) -> String {
    format!("
        tier: {tier}
        priority: {priority}
        subject:
          namespaces:
            matchLabels: {{ns: x}}
        ingress:
        - action: {action}
          from: [{from}]
          {protocols}
    ")
}

const FROM_NS_Y: &str = "{namespaces: {matchLabels: {ns: y}}}";
const FROM_ANY_NS: &str = "{namespaces: {}}";

fn cnp_admin_deny_ingress(c: &mut Cluster) {
    c.apply_cnp("deny-y-to-x", &cnp_ingress_to_x("Admin", 10, "Deny", FROM_NS_Y, ""));
    let mut r = c.reach();
    r.deny("y/*", "x/*");
    c.check(&r, 80, TCP);
    c.check(&r, 81, UDP);
    c.check(&r, 80, SCTP);
    // The node still reaches its pods (kubelet probes).
    assert_eq!(c.node_reaches("x/a", 80, TCP), [true, true], "node -> x/a (IPv4, IPv6)");
}

fn cnp_admin_deny_egress(c: &mut Cluster) {
    c.apply_cnp("deny-x-to-y", "
        tier: Admin
        priority: 10
        subject:
          namespaces:
            matchLabels: {ns: x}
        egress:
        - action: Deny
          to:
          - namespaces:
              matchLabels: {ns: y}
    ");
    let mut r = c.reach();
    r.deny("x/*", "y/*");
    c.check(&r, 80, TCP);
    c.check(&r, 81, UDP);
}

fn cnp_admin_accept_over_isolation(c: &mut Cluster) {
    c.apply("x", "deny-ingress", DENY_INGRESS);
    c.apply_cnp("accept-y", &cnp_ingress_to_x("Admin", 10, "Accept", FROM_NS_Y, ""));
    let mut r = c.reach();
    r.deny("*", "x/*").allow("y/*", "x/*");
    c.check(&r, 80, TCP);
}

fn cnp_deny_beats_network_policy_allow(c: &mut Cluster) {
    c.apply("x", "allow-all", "
        podSelector: {}
        policyTypes: [Ingress]
        ingress:
        - {}
    ");
    c.apply_cnp("deny-y-80", &cnp_ingress_to_x("Admin", 10, "Deny", FROM_NS_Y, "protocols: [{tcp: {destinationPort: {number: 80}}}]"));
    let mut r = c.reach();
    r.deny("y/*", "x/*");
    c.check(&r, 80, TCP);
    c.check(&c.reach(), 81, TCP);
    c.check(&c.reach(), 80, UDP);
}

fn cnp_pass_to_network_policy(c: &mut Cluster) {
    c.apply_cnp("pass-y", &cnp_ingress_to_x("Admin", 5, "Pass", FROM_NS_Y, ""));
    c.apply_cnp("deny-all", &cnp_ingress_to_x("Admin", 10, "Deny", FROM_ANY_NS, ""));
    let mut r = c.reach();
    // No NetworkPolicy yet: what Pass skips goes on to the default allow.
    r.deny("*", "x/*").allow("y/*", "x/*");
    c.check(&r, 80, TCP);
    // A NetworkPolicy isolating x decides what was passed: only y/a.
    c.apply("x", "from-y-a", "
        podSelector: {}
        policyTypes: [Ingress]
        ingress:
        - from:
          - namespaceSelector:
              matchLabels: {ns: y}
            podSelector:
              matchLabels: {pod: a}
    ");
    let mut r = c.reach();
    r.deny("*", "x/*").allow("y/a", "x/*");
    c.check(&r, 80, TCP);
}

fn cnp_pass_to_baseline(c: &mut Cluster) {
    c.apply_cnp("pass-y", &cnp_ingress_to_x("Admin", 5, "Pass", FROM_NS_Y, ""));
    c.apply_cnp("deny-y-z", &cnp_ingress_to_x("Admin", 10, "Deny", "{namespaces: {matchExpressions: [{key: ns, operator: In, values: [y, z]}]}}", ""));
    c.apply_cnp("baseline-deny-y-b", &cnp_ingress_to_x("Baseline", 5, "Deny", "{pods: {namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: b}}}}", ""));
    let mut r = c.reach();
    r.deny("z/*", "x/*").deny("y/b", "x/*");
    c.check(&r, 80, TCP);
}

fn cnp_baseline_loses_to_network_policy(c: &mut Cluster) {
    c.apply_cnp("baseline-deny-all", "
        tier: Baseline
        priority: 10
        subject:
          namespaces: {}
        ingress:
        - action: Deny
          from:
          - namespaces: {}
    ");
    c.apply("x", "from-y", "
        podSelector: {}
        policyTypes: [Ingress]
        ingress:
        - from:
          - namespaceSelector:
              matchLabels: {ns: y}
    ");
    let mut r = c.reach();
    r.deny("*", "*").allow("y/*", "x/*");
    c.check(&r, 80, TCP);
}

fn cnp_named_port(c: &mut Cluster) {
    c.apply_cnp("deny-y-serve-80-tcp", &cnp_ingress_to_x("Admin", 10, "Deny", FROM_NS_Y, "protocols: [{destinationNamedPort: serve-80-tcp}]"));
    let mut r = c.reach();
    r.deny("y/*", "x/*");
    c.check(&r, 80, TCP);
    c.check(&c.reach(), 81, TCP);
    c.check(&c.reach(), 80, UDP);
}

fn cnp_egress_named_port_and_range(c: &mut Cluster) {
    c.apply_cnp("deny-x-out", "
        tier: Admin
        priority: 10
        subject:
          namespaces:
            matchLabels: {ns: x}
        egress:
        - action: Deny
          to:
          - namespaces:
              matchLabels: {ns: y}
          protocols:
          - tcp:
              destinationPort:
                range: {start: 80, end: 81}
        - action: Deny
          to:
          - namespaces:
              matchLabels: {ns: z}
          protocols:
          - destinationNamedPort: serve-81-udp
    ");
    let mut r = c.reach();
    r.deny("x/*", "y/*");
    c.check(&r, 80, TCP);
    c.check(&r, 81, TCP);
    c.check(&c.reach(), 80, UDP);
    let mut r = c.reach();
    r.deny("x/*", "z/*");
    c.check(&r, 81, UDP);
}

fn cnp_networks_match_pods(c: &mut Cluster) {
    // Exactly namespace y's addresses (see model_pod).
    c.apply_cnp("deny-x-to-y-range", "
        tier: Admin
        priority: 10
        subject:
          namespaces:
            matchLabels: {ns: x}
        egress:
        - action: Deny
          to:
          - networks: [198.18.10.32/28, '2001:2:0:10::20/124']
    ");
    let mut r = c.reach();
    r.deny("x/*", "y/*");
    c.check(&r, 80, TCP);
}

fn cnp_priority_change(c: &mut Cluster) {
    c.apply_cnp("accept-y", &cnp_ingress_to_x("Admin", 10, "Accept", FROM_NS_Y, ""));
    c.apply_cnp("deny-y", &cnp_ingress_to_x("Admin", 20, "Deny", FROM_NS_Y, ""));
    c.check(&c.reach(), 80, TCP);
    // The Accept now comes after the Deny.
    c.apply_cnp("accept-y", &cnp_ingress_to_x("Admin", 30, "Accept", FROM_NS_Y, ""));
    let mut r = c.reach();
    r.deny("y/*", "x/*");
    c.check(&r, 80, TCP);
}

fn cnp_label_change(c: &mut Cluster) {
    c.apply_cnp("quarantine", "
        tier: Admin
        priority: 1
        subject:
          pods:
            namespaceSelector: {}
            podSelector:
              matchLabels: {quarantine: 'true'}
        ingress:
        - action: Deny
          from:
          - namespaces: {}
        egress:
        - action: Deny
          to:
          - namespaces: {}
    ");
    c.check(&c.reach(), 80, TCP);
    c.label_pod("y/b", &[("pod", "b"), ("quarantine", "true")]);
    let mut r = c.reach();
    r.ingress("y/b", false).egress("y/b", false);
    c.check(&r, 80, TCP);
    c.label_pod("y/b", &[("pod", "b")]);
    c.check(&c.reach(), 80, TCP);
}

const CLUSTER_POLICY_CASES: &[Case] = &[
    ("cnp_admin_deny_ingress", "CNPAdminTierIngressTCP/UDP/SCTP: Deny ingress from a namespace", cnp_admin_deny_ingress),
    ("cnp_admin_deny_egress", "CNPAdminTierEgressTCP/UDP: Deny egress to a namespace", cnp_admin_deny_egress),
    ("cnp_admin_accept_over_isolation", "CNPAdminTierGress: an Admin Accept wins over NetworkPolicy isolation", cnp_admin_accept_over_isolation),
    ("cnp_deny_beats_network_policy_allow", "CNPAdminTierIntegration: an Admin Deny wins over a NetworkPolicy allow", cnp_deny_beats_network_policy_allow),
    ("cnp_pass_to_network_policy", "CNPAdminTierIntegration: 'pass-ingress' respects the NetworkPolicy", cnp_pass_to_network_policy),
    ("cnp_pass_to_baseline", "CNPAdminTierIntegration: 'pass-ingress' respects the baseline CNP", cnp_pass_to_baseline),
    ("cnp_baseline_loses_to_network_policy", "CNPBaselineTierGress: a NetworkPolicy allow wins over a Baseline Deny", cnp_baseline_loses_to_network_policy),
    ("cnp_named_port", "CNPAdminTierIngressNamedPort", cnp_named_port),
    ("cnp_egress_named_port_and_range", "CNPAdminTierEgressNamedPort, port ranges (TCP range, UDP named port)", cnp_egress_named_port_and_range),
    ("cnp_networks_match_pods", "CNPAdminTierEgressInlineCIDRPeers: networks match pod addresses", cnp_networks_match_pods),
    ("cnp_priority_change", "CNPAdminTierPriorityField: a priority changed mid-case", cnp_priority_change),
    ("cnp_label_change", "(ours) a pod labelled into and out of a pods subject mid-case", cnp_label_change),
];

// ---------------------------------------------------------------------------------------
// Groups
// ---------------------------------------------------------------------------------------

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn conformance_selectors() {
    run_group("sel", on_nodes(xyz(), 2), SELECTOR_CASES);
}

/// The selector cases once more with every pod on one node (same-node paths only; the other
/// groups run on two nodes only, to keep the suite's time).
#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn conformance_selectors_one_node() {
    run_group("one", xyz(), SELECTOR_CASES);
}

const SELECTOR_CASES: &[Case] = &[
    ("default_deny_ingress", "should support a 'default-deny-ingress' policy", default_deny_ingress),
    ("default_deny_all", "should support a 'default-deny-all' policy", default_deny_all),
    ("allow_all", "should support allow-all policy", allow_all),
    ("allow_from_pod_in_same_namespace", "should enforce policy to allow traffic from pods within server namespace based on PodSelector", allow_from_pod_in_same_namespace),
    ("allow_ingress_for_target", "should enforce policy to allow ingress traffic for a target", allow_ingress_for_target),
    ("allow_from_all_namespaces", "should enforce policy to allow ingress traffic from pods in all namespaces", allow_from_all_namespaces),
    ("namespace_selector", "should enforce policy to allow traffic only from a different namespace, based on NamespaceSelector", namespace_selector),
    ("pod_selector_match_expressions", "should enforce policy based on PodSelector with MatchExpressions", pod_selector_match_expressions),
    ("namespace_selector_match_expressions", "should enforce policy based on NamespaceSelector with MatchExpressions", namespace_selector_match_expressions),
    ("pod_selector_or_namespace_selector", "should enforce policy based on PodSelector or NamespaceSelector", pod_selector_or_namespace_selector),
    ("pod_selector_and_namespace_selector", "should enforce policy based on PodSelector and NamespaceSelector", pod_selector_and_namespace_selector),
    ("multiple_pod_and_namespace_selectors", "should enforce policy based on Multiple PodSelectors and NamespaceSelectors", multiple_pod_and_namespace_selectors),
    ("any_pod_selectors", "should enforce policy based on any PodSelectors", any_pod_selectors),
    ("pod_in_other_namespace", "should enforce policy to allow traffic only from a pod in a different namespace based on PodSelector and NamespaceSelector", |c| pod_in_other_namespace(c, TCP)),
    ("deny_ingress_from_other_namespaces", "should deny ingress from pods on other namespaces", deny_ingress_from_other_namespaces),
    ("default_namespace_label_match_labels", "should enforce policy to allow traffic based on NamespaceSelector with MatchLabels using default ns label", default_namespace_label_match_labels),
    ("match_expression_operators", "(ours) In, NotIn on an absent key, Exists, DoesNotExist on pod and namespace labels", match_expression_operators),
    ("stacked_overlapping_policies", "should enforce multiple, stacked policies with overlapping podSelectors", stacked_overlapping_policies),
    ("ingress_allow_all_takes_precedence", "should enforce multiple ingress policies with ingress allow-all policy taking precedence", ingress_allow_all_takes_precedence),
];

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn conformance_ports_and_protocols() {
    run_group("prt", on_nodes(xyz(), 2), &[
        ("ports", "should enforce policy based on Ports", ports),
        ("named_port_ingress", "should allow ingress access on one named port", named_port_ingress),
        ("named_port_ingress_from_namespace", "should allow ingress access from namespace on one named port", named_port_ingress_from_namespace),
        ("named_port_egress", "should allow egress access on one named port", named_port_egress),
        ("named_port_protocol_must_match", "(ours) a named port matches only with its protocol", named_port_protocol_must_match),
        ("named_port_resolves_per_pod", "(ours) a named port resolves on each destination pod, ingress and egress", named_port_resolves_per_pod),
        ("end_port_ingress", "(endPort) ingress port ranges, both edges inclusive", end_port_ingress),
        ("end_port_egress", "(endPort) egress UDP port range", end_port_egress),
        ("multiple_ports_and_protocols", "(ours) one rule with TCP, UDP and SCTP ports", multiple_ports_and_protocols),
        ("any_port_on_one_protocol", "should enforce ingress policy allowing any port traffic to a server on a specific protocol", any_port_on_one_protocol),
        ("sctp_not_mistaken_for_tcp", "should not mistakenly treat 'protocol: SCTP' as 'protocol: TCP', even if the plugin doesn't support SCTP", sctp_not_mistaken_for_tcp),
        ("sctp_policy_isolates", "should properly isolate pods that are selected by a policy allowing SCTP, even if the plugin doesn't support SCTP", sctp_policy_isolates),
        ("udp_not_tcp", "should not allow access by TCP when a policy specifies only UDP", udp_not_tcp),
        ("udp_default_deny_ingress", "[UDP] should support a 'default-deny-ingress' policy", |c| default_deny_ingress_on(c, UDP)),
        ("udp_ports", "[UDP] should enforce policy based on Ports", |c| ports_on(c, UDP)),
        ("udp_pod_in_other_namespace", "[UDP] should enforce policy to allow traffic only from a pod in a different namespace based on PodSelector and NamespaceSelector", |c| pod_in_other_namespace(c, UDP)),
        ("sctp_default_deny_ingress", "[SCTP] should support a 'default-deny-ingress' policy", |c| default_deny_ingress_on(c, SCTP)),
        ("sctp_ports", "[SCTP] should enforce policy based on Ports", |c| ports_on(c, SCTP)),
        ("sctp_pod_in_other_namespace", "[SCTP] should enforce policy to allow traffic only from a pod in a different namespace based on PodSelector and NamespaceSelector", |c| pod_in_other_namespace(c, SCTP)),
    ]);
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn conformance_egress_and_ip_blocks() {
    run_group("egr", on_nodes(xyz(), 2), &[
        ("deny_egress_by_pod_selector", "should deny egress from pods based on PodSelector", deny_egress_by_pod_selector),
        ("deny_egress_namespace", "should deny egress from all pods in a namespace", deny_egress_namespace),
        ("ingress_and_egress_together", "should work with Ingress, Egress specified together", ingress_and_egress_together),
        ("policy_types_implied", "(ours) policyTypes omitted: egress rules imply Egress", policy_types_implied),
        ("client_side_egress_deny", "should support denying of egress traffic on the client side (even if the server explicitly allows this traffic)", client_side_egress_deny),
        ("egress_to_pod_in_other_namespace", "should enforce egress policy allowing traffic to a server in a different namespace based on PodSelector and NamespaceSelector", egress_to_pod_in_other_namespace),
        ("egress_allow_all_takes_precedence", "should enforce multiple egress policies with egress allow-all policy taking precedence", egress_allow_all_takes_precedence),
        ("egress_to_cidr", "should allow egress access to server in CIDR block", egress_to_cidr),
        ("egress_to_cidr_with_except", "should enforce except clause while egress access to server in CIDR block", egress_to_cidr_with_except),
        ("cidr_and_except_overlap", "should ensure an IP overlapping both IPBlock.CIDR and IPBlock.Except is allowed", cidr_and_except_overlap),
        ("ingress_from_cidr_with_except", "(ours) ingress ipBlock with except matches pod addresses", ingress_from_cidr_with_except),
        ("ingress_and_egress_independent", "should enforce policies to check ingress and egress policies can be controlled independently based on PodSelector", ingress_and_egress_independent),
        ("default_namespace_label_match_expressions_egress", "should enforce policy based on NamespaceSelector with MatchExpressions using default ns label", default_namespace_label_match_expressions_egress),
    ]);
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn conformance_changes() {
    run_group("chg", on_nodes(xyz(), 2), &[
        ("updated_policy", "should enforce updated policy", updated_policy),
        ("updated_namespace_labels", "should allow ingress access from updated namespace", updated_namespace_labels),
        ("updated_pod_labels", "should allow ingress access from updated pod", updated_pod_labels),
        ("deny_ingress_to_updated_pod", "should deny ingress access to updated pod", deny_ingress_to_updated_pod),
        ("policy_deletion_restores_traffic", "should stop enforcing policies after they are deleted", policy_deletion_restores_traffic),
        ("pods_added_and_deleted", "(ours) pods added to and deleted from an isolated namespace", pods_added_and_deleted),
        ("pod_address_reused", "(ours) a deleted pod's addresses reused by a pod with other labels", pod_address_reused),
    ]);
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn conformance_seed_example() {
    run_group("seed", on_nodes(seed_setup(), 2), &[
        ("seed_example", "(seed) manifests/examples/three-tier as shipped", seed_example),
        ("seed_example_with_egress", "(seed) web -> api:5000 -> db:3306 with egress rules", seed_example_with_egress),
    ]);
}

/// ClusterNetworkPolicy. Cases with a Deny need the classifier's deny entries.
#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn conformance_cluster_policies() {
    run_group("cnp", on_nodes(xyz(), 2), CLUSTER_POLICY_CASES);
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn conformance_services() {
    run_group("svc", on_nodes(xyz(), 2), &[
        ("services_egress_pod_selector", "(issue 11) egress allowed by podSelector, through a ClusterIP (TCP, UDP)", service_egress_pod_selector),
        ("services_egress_except_pod_cidr", "(issue 11) egress to 0.0.0.0/0 except the pod range: pods denied directly and through ClusterIPs", service_egress_except_pod_cidr),
        ("services_egress_namespace_selector_two_backends", "(issue 11) egress by namespaceSelector through a ClusterIP with an allowed and a denied backend", service_egress_namespace_selector_two_backends),
        ("services_ingress_allow_list", "(issue 11) ingress allow-list through a ClusterIP", service_ingress_allow_list),
        ("services_node_port_from_outside", "(issue 11) NodePort from outside the cluster: ipBlock allowed, pods-only denied", service_node_port_from_outside),
        ("services_hairpin", "(issue 11) a pod reaching itself through its own Service", service_hairpin),
    ]);
}
