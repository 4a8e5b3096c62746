//! Privileged end-to-end tests against a real control plane: etcd and kube-apiserver v1.20.2
//! (built and cached by `cargo xtask kube`; `cargo xtask test` passes their directory in
//! POLICY_KUBE_BIN). Namespaces, Pods and NetworkPolicies are made through the API with a
//! kube-rs client; `policy-agent run --kubeconfig` runs in a simulated node's network
//! namespace with the install manifests' ServiceAccount identity (not admin), and real packets
//! between pod namespaces show what it enforces. The manifests under manifests/ are applied
//! to the same kind of server, so a broken manifest fails here.
//!
//! The API server listens on the host's 127.0.0.1 only; the agent reaches it through a relay
//! listening on the node namespace's own 127.0.0.1 (see `testbed::apiserver`).
//! Run by `cargo xtask test` (root, one test thread).

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    core::v1::{Namespace, Pod},
    networking::v1::NetworkPolicy,
};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use policy_agent::crd::ClusterNetworkPolicy;
use testbed::{
    AgentRun, Bpffs, NODE_V4, Node,
    apiserver::{ApiServer, Relay},
    probe::{Servers, tcp_ok},
};
use serde_json::json;

const AGENT: &str = env!("CARGO_BIN_EXE_policy-agent");
const NODE_NAME: &str = "kube-node-1";
const METRICS: &str = "127.0.0.1:9090";
const PROBE: Duration = Duration::from_millis(150);
/// What manifests/install/ creates and the agent authenticates as.
const AGENT_NAMESPACE: &str = "policy-enforcer";
const AGENT_SERVICE_ACCOUNT: &str = "policy-agent";
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";
/// The CRD manifests/install/ defines, and its file (applied first: its name sorts first).
const CNP_CRD: &str = "clusternetworkpolicies.policy.networking.k8s.io";
const CNP_CRD_FILE: &str = "05-crd-clusternetworkpolicies.yaml";

fn manifests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").join("manifests")
}

/// An admin kube-rs client with its own runtime (the tests are synchronous).
struct Kube {
    rt: tokio::runtime::Runtime,
    client: Client,
}

impl Kube {
    fn new(kubeconfig: &Path) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        let client = rt.block_on(async {
            let file = kube::config::Kubeconfig::read_from(kubeconfig).expect("read kubeconfig");
            let config = kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default()).await.expect("load kubeconfig");
            Client::try_from(config).expect("client")
        });
        Self { rt, client }
    }

    fn namespaces(&self) -> Api<Namespace> {
        Api::all(self.client.clone())
    }

    fn pods(&self, ns: &str) -> Api<Pod> {
        Api::namespaced(self.client.clone(), ns)
    }

    fn policies(&self, ns: &str) -> Api<NetworkPolicy> {
        Api::namespaced(self.client.clone(), ns)
    }

    fn create_namespace(&self, name: &str, labels: &[(&str, &str)]) {
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).expect("namespace");
        self.rt.block_on(self.namespaces().create(&PostParams::default(), &ns)).unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
    }

    fn label_namespace(&self, name: &str, labels: serde_json::Value) {
        let patch = json!({"metadata": {"labels": labels}});
        self.rt.block_on(self.namespaces().patch(name, &PatchParams::default(), &Patch::Merge(&patch))).expect("label namespace");
    }

    /// Creates a pod bound to `node`, then sets what a kubelet would report through the status
    /// subresource: Running, the node's address, the pod's two addresses.
    fn create_pod(&self, ns: &str, spec: &PodSpec, node: &str) {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": spec.name, "labels": spec.labels()},
            "spec": {
                "nodeName": node,
                "containers": [{"name": "c", "image": "example.invalid/none", "ports": [{"name": "http", "containerPort": 80}]}],
            },
        }))
        .expect("pod");
        let pods = self.pods(ns);
        self.rt.block_on(pods.create(&PostParams::default(), &pod)).unwrap_or_else(|e| panic!("create pod {ns}/{}: {e}", spec.name));
        let status = json!({"status": {
            "phase": "Running",
            "hostIP": NODE_V4.to_string(),
            "podIP": spec.v4.to_string(),
            "podIPs": [{"ip": spec.v4.to_string()}, {"ip": spec.v6.to_string()}],
        }});
        self.rt
            .block_on(pods.patch_status(spec.name, &PatchParams::default(), &Patch::Merge(&status)))
            .unwrap_or_else(|e| panic!("patch status of pod {ns}/{}: {e}", spec.name));
    }

    fn relabel_pod(&self, ns: &str, name: &str, labels: serde_json::Value) {
        let patch = json!({"metadata": {"labels": labels}});
        self.rt.block_on(self.pods(ns).patch(name, &PatchParams::default(), &Patch::Merge(&patch))).expect("relabel pod");
    }

    /// Deletes at once, as a kubelet confirming the end would (nothing here runs one).
    fn delete_pod(&self, ns: &str, name: &str) {
        let params = DeleteParams { grace_period_seconds: Some(0), ..DeleteParams::default() };
        self.rt.block_on(self.pods(ns).delete(name, &params)).expect("delete pod");
    }

    /// Creates the policy, or replaces the existing one (an update with its resourceVersion).
    fn put_policy(&self, ns: &str, policy: serde_json::Value) {
        let mut policy: NetworkPolicy = serde_json::from_value(policy).expect("policy");
        let name = policy.metadata.name.clone().expect("policy name");
        let api = self.policies(ns);
        self.rt.block_on(async {
            match api.get_opt(&name).await.expect("get policy") {
                Some(existing) => {
                    policy.metadata.resource_version = existing.metadata.resource_version;
                    api.replace(&name, &PostParams::default(), &policy).await.expect("replace policy");
                }
                None => {
                    api.create(&PostParams::default(), &policy).await.expect("create policy");
                }
            }
        });
    }

    fn delete_policy(&self, ns: &str, name: &str) {
        self.rt.block_on(self.policies(ns).delete(name, &DeleteParams::default())).expect("delete policy");
    }

    fn cluster_policies(&self) -> Api<ClusterNetworkPolicy> {
        Api::all(self.client.clone())
    }

    fn create_cluster_policy(&self, policy: serde_json::Value) {
        let policy: ClusterNetworkPolicy = serde_json::from_value(policy).expect("cluster policy");
        self.rt.block_on(self.cluster_policies().create(&PostParams::default(), &policy)).expect("create cluster policy");
    }

    fn delete_cluster_policy(&self, name: &str) {
        self.rt.block_on(self.cluster_policies().delete(name, &DeleteParams::default())).expect("delete cluster policy");
    }
}

/// Until the API server serves ClusterNetworkPolicies (the CRD's Established condition).
fn wait_crd_established(api: &ApiServer) {
    api.kubectl_ok(&["wait", "--for=condition=Established", &format!("crd/{CNP_CRD}"), "--timeout=30s"]);
}

/// An Admin-tier policy with one ingress rule (`action`) to pods `app=to` of namespace e2e
/// from pods `app=from` of any namespace.
fn admin_rule(name: &str, action: &str, from: &str, to: &str) -> serde_json::Value {
    let pods = |app: &str, namespaces: serde_json::Value| json!({"pods": {"namespaceSelector": namespaces, "podSelector": {"matchLabels": {"app": app}}}});
    json!({
        "apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy", "metadata": {"name": name},
        "spec": {"tier": "Admin", "priority": 10, "subject": pods(to, json!({"matchLabels": {NAMESPACE_NAME_LABEL: E2E}})),
                 "ingress": [{"name": "rule", "action": action, "from": [pods(from, json!({}))]}]},
    })
}

struct PodSpec {
    name: &'static str,
    app: &'static str,
    v4: Ipv4Addr,
    v6: Ipv6Addr,
}

impl PodSpec {
    fn labels(&self) -> serde_json::Value {
        json!({"app": self.app})
    }
}

fn pod(name: &'static str, last: u8) -> PodSpec {
    PodSpec { name, app: name, v4: Ipv4Addr::new(198, 18, 30, last), v6: Ipv6Addr::new(0x2001, 2, 0, 30, 0, 0, 0, u16::from(last)) }
}

fn ingress_policy(name: &str, target: &str, from: serde_json::Value, ports: serde_json::Value) -> serde_json::Value {
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name},
        "spec": {
            "podSelector": {"matchLabels": {"app": target}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": from, "ports": ports}],
        },
    })
}

fn from_app(app: &str) -> serde_json::Value {
    json!([{"podSelector": {"matchLabels": {"app": app}}}])
}

/// A control plane with the install manifests applied, a node with pods (each also a Pod in
/// the API, on this node), and the agent in kube mode as the ServiceAccount. Fields drop in
/// order: agent, its pins, the relay, the node, the control plane.
struct KubeNode {
    agent: Option<AgentRun>,
    bpffs: Bpffs,
    _relay: Relay,
    _servers: Vec<Servers>,
    node: Node,
    kube: Kube,
    api: ApiServer,
    log: PathBuf,
    agent_kubeconfig: PathBuf,
}

/// Pods a, b, c in namespace e2e (team=blue) and d in namespace other.
const E2E: &str = "e2e";
const OTHER: &str = "other";

impl KubeNode {
    fn new(suffix: &str) -> Self {
        Self::installing(suffix, true)
    }

    /// With manifests/install/ created, the ClusterNetworkPolicy CRD only if `crd` (else it
    /// is left to the test).
    fn installing(suffix: &str, crd: bool) -> Self {
        let api = ApiServer::start(suffix, (AGENT_NAMESPACE, AGENT_SERVICE_ACCOUNT));
        let install = manifests_dir().join("install");
        for file in manifest_files(&install).iter().filter(|f| crd || !f.ends_with(CNP_CRD_FILE)) {
            api.kubectl_ok(&["create", "-f", file.to_str().expect("utf-8")]);
        }
        if crd {
            wait_crd_established(&api);
        }
        let kube = Kube::new(&api.admin_kubeconfig);
        kube.create_namespace(E2E, &[("team", "blue")]);
        kube.create_namespace(OTHER, &[]);
        let mut node = Node::new(suffix);
        let mut servers = Vec::new();
        for (ns, spec) in [(E2E, pod("a", 1)), (E2E, pod("b", 2)), (E2E, pod("c", 3)), (OTHER, pod("d", 4))] {
            node.add_pod(spec.name, spec.v4, spec.v6);
            servers.push(Servers::start(&node.pod(spec.name).ns, &[80, 81], Duration::from_secs(300)));
            kube.create_pod(ns, &spec, NODE_NAME);
        }
        // A pod of another node: known to the agent as a peer, never one of its endpoints.
        kube.create_pod(OTHER, &PodSpec { name: "remote", app: "remote", v4: Ipv4Addr::new(198, 18, 31, 1), v6: Ipv6Addr::new(0x2001, 2, 0, 31, 0, 0, 0, 1) }, "kube-node-2");
        let bpffs = Bpffs::new(suffix);
        let log = bpffs.scratch("log").join("agent.log");
        let relay = Relay::start(&node.ns, SocketAddr::from((Ipv4Addr::LOCALHOST, api.port)));
        let agent_kubeconfig = api.service_account_kubeconfig(relay.port);
        Self { agent: None, bpffs, _relay: relay, _servers: servers, node, kube, api, log, agent_kubeconfig }
    }

    fn start_agent(&mut self) {
        let args: Vec<&std::ffi::OsStr> = vec![
            "--kubeconfig".as_ref(),
            self.agent_kubeconfig.as_os_str(),
            "--node".as_ref(),
            NODE_NAME.as_ref(),
            "--bpffs".as_ref(),
            self.bpffs.path.as_os_str(),
            "--flow-log".as_ref(),
            "off".as_ref(),
            "--resync-ms".as_ref(),
            "200".as_ref(),
            "--incremental-check-ms".as_ref(),
            "0".as_ref(),
        ];
        self.agent = Some(AgentRun::start(AGENT.as_ref(), &self.node.ns, &args, METRICS, &self.log));
    }

    /// GETs a path of the agent's endpoint from inside the node namespace.
    fn fetch(&self, path: &'static str) -> std::io::Result<String> {
        self.node.ns.run(move || policy_agent::status::fetch(METRICS, path))
    }

    fn agent(&mut self) -> &mut AgentRun {
        self.agent.as_mut().expect("agent started")
    }

    fn endpoints(&self) -> Vec<String> {
        let status = self.agent.as_ref().expect("agent").status();
        status["endpoints"].as_array().into_iter().flatten().filter_map(|e| e["pod"].as_str().map(str::to_owned)).collect()
    }

    fn reaches(&self, from: &str, to: &str, port: u16, v6: bool) -> bool {
        let to = self.node.pod(to).addr(v6);
        tcp_ok(&self.node.pod(from).ns, SocketAddr::new(to, port), PROBE)
    }

    /// Waits until `from -> to:port` is `want` over both families; returns how long it took.
    fn until(&self, from: &str, to: &str, port: u16, want: bool, timeout: Duration) -> Duration {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.reaches(from, to, port, false) == want && self.reaches(from, to, port, true) == want {
                return start.elapsed();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "{from} -> {to}:{port} never became {want} in {timeout:?}; agent log:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    fn check(&self, from: &str, to: &str, port: u16, want: bool) {
        for v6 in [false, true] {
            assert_eq!(self.reaches(from, to, port, v6), want, "{from} -> {to}:{port} (v6 {v6})");
        }
    }
}

impl Drop for KubeNode {
    fn drop(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            agent.kill();
        }
        let _ = Command::new(AGENT).args(["cleanup", "--bpffs"]).arg(&self.bpffs.path).stdout(Stdio::null()).status();
    }
}

const CHANGE: Duration = Duration::from_secs(15);

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn kube_mode_enforces_what_is_made_changed_and_deleted_through_the_api() {
    let mut n = KubeNode::new("kchg");
    n.start_agent();
    let mut endpoints = n.endpoints();
    endpoints.sort();
    assert_eq!(endpoints, ["e2e/a", "e2e/b", "e2e/c", "other/d"], "the pods with spec.nodeName {NODE_NAME}, not other/remote");
    n.check("a", "b", 80, true);
    let mut timings = Vec::new();

    // Create, then update (replace) a policy.
    n.kube.put_policy(E2E, json!({"metadata": {"name": "b-ingress"}, "spec": {"podSelector": {"matchLabels": {"app": "b"}}, "policyTypes": ["Ingress"]}}));
    timings.push(("create: deny all to b", n.until("a", "b", 80, false, CHANGE)));
    n.kube.put_policy(E2E, ingress_policy("b-ingress", "b", from_app("a"), json!([{"port": 81}])));
    timings.push(("update: allow a on 81", n.until("a", "b", 81, true, CHANGE)));
    n.check("a", "b", 80, false);
    n.check("c", "b", 81, false);
    // A named port, resolved on the target pod's container ports as the API server has them.
    n.kube.put_policy(E2E, ingress_policy("b-ingress", "b", from_app("a"), json!([{"port": "http"}])));
    timings.push(("update: named port http (80)", n.until("a", "b", 80, true, CHANGE)));
    n.check("a", "b", 81, false);

    // Pod label changes.
    n.kube.relabel_pod(E2E, "a", json!({"app": "x"}));
    timings.push(("relabel a away from the policy", n.until("a", "b", 80, false, CHANGE)));
    n.kube.relabel_pod(E2E, "a", json!({"app": "a"}));
    timings.push(("relabel a back", n.until("a", "b", 80, true, CHANGE)));

    // kubernetes.io/metadata.name: a 1.20 API server does not set it; the agent derives it.
    let other = n.kube.rt.block_on(n.kube.namespaces().get(OTHER)).expect("get namespace");
    assert!(
        !other.metadata.labels.unwrap_or_default().contains_key(NAMESPACE_NAME_LABEL),
        "API server 1.20 does not label namespaces with their name"
    );
    let from_ns = |labels: serde_json::Value| json!([{"namespaceSelector": {"matchLabels": labels}}]);
    n.kube.put_policy(E2E, ingress_policy("c-ingress", "c", from_ns(json!({NAMESPACE_NAME_LABEL: OTHER})), json!([{"port": 80}])));
    timings.push(("namespaceSelector on the derived name label", n.until("a", "c", 80, false, CHANGE)));
    n.check("d", "c", 80, true);

    // Namespace label changes.
    n.kube.put_policy(E2E, ingress_policy("c-ingress", "c", from_ns(json!({"team": "red"})), json!([{"port": 80}])));
    timings.push(("namespaceSelector team=red: nobody yet", n.until("d", "c", 80, false, CHANGE)));
    n.kube.label_namespace(OTHER, json!({"team": "red"}));
    timings.push(("label namespace other team=red", n.until("d", "c", 80, true, CHANGE)));
    n.kube.label_namespace(OTHER, json!({"team": null}));
    timings.push(("remove the namespace label", n.until("d", "c", 80, false, CHANGE)));
    n.kube.label_namespace(OTHER, json!({"team": "red"}));
    n.until("d", "c", 80, true, CHANGE);

    // Pod deletion: d's address is no longer a pod of `other`, and d no longer an endpoint.
    n.kube.delete_pod(OTHER, "d");
    timings.push(("delete pod d", n.until("d", "c", 80, false, CHANGE)));
    let start = Instant::now();
    while n.endpoints().contains(&"other/d".to_owned()) {
        assert!(start.elapsed() < CHANGE, "other/d is still an endpoint: {:?}", n.endpoints());
        std::thread::sleep(Duration::from_millis(50));
    }

    // Policy deletion.
    n.kube.delete_policy(E2E, "b-ingress");
    timings.push(("delete the policy of b", n.until("c", "b", 81, true, CHANGE)));
    n.check("a", "c", 80, false);
    n.kube.delete_policy(E2E, "c-ingress");
    timings.push(("delete the policy of c", n.until("a", "c", 80, true, CHANGE)));

    assert!(n.agent().alive());
    for (what, took) in &timings {
        println!("{what}: enforced after {} ms (probe timeout {} ms included)", took.as_millis(), PROBE.as_millis());
    }
    let metrics = n.agent().get("/metrics").expect("metrics");
    assert!(metrics.contains("policy_enforcement_latency_seconds_count"), "{metrics}");
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn the_agent_keeps_enforcing_while_the_api_server_restarts() {
    let mut n = KubeNode::new("krst");
    n.kube.put_policy(E2E, ingress_policy("b-from-a", "b", from_app("a"), json!([{"port": 80}])));
    n.start_agent();
    n.until("c", "b", 80, false, CHANGE);
    n.check("a", "b", 80, true);

    n.api.stop_apiserver();
    let stopped = Instant::now();
    let mut probes = 0;
    while stopped.elapsed() < Duration::from_secs(6) {
        n.check("a", "b", 80, true);
        n.check("c", "b", 80, false);
        n.check("a", "c", 80, true);
        probes += 1;
    }
    assert!(probes >= 3, "probed while the API server was down ({probes} rounds)");
    assert!(n.agent().alive(), "the agent survives the API server going away");
    // A loaded machine may drop one connection; a sick agent fails all three.
    let health = (0..3).map(|_| n.fetch("/healthz")).find(Result::is_ok).unwrap_or_else(|| n.fetch("/healthz"));
    assert!(health.is_ok(), "and stays healthy: {health:?}; log:\n{}", std::fs::read_to_string(&n.log).unwrap_or_default());
    let log = std::fs::read_to_string(&n.log).unwrap_or_default();
    assert!(log.contains("watch failed"), "the agent noticed the outage:\n{log}");

    // Back, unchanged: enforcement unchanged, and the next change applies.
    n.api.start_apiserver();
    let restarted = Instant::now();
    n.check("c", "b", 80, false);
    n.kube.put_policy(E2E, ingress_policy("b-from-a", "b", from_app("c"), json!([{"port": 80}])));
    n.until("c", "b", 80, true, Duration::from_secs(90));
    n.check("a", "b", 80, false);
    println!("change after the API server restart enforced {} ms after it was ready", restarted.elapsed().as_millis());
    // The relisted state has every pod: a new label still counts.
    n.kube.relabel_pod(E2E, "a", json!({"app": "c"}));
    n.until("a", "b", 80, true, CHANGE);
    assert!(n.agent().alive());

    // A node booting while the API server is away: the agent (re)starts, adopts what is
    // pinned, waits for its first lists, and gets ready once the server is back.
    n.agent().kill();
    n.api.stop_apiserver();
    let KubeNode { agent, bpffs, node, api, log, agent_kubeconfig, .. } = &mut n;
    let started = std::thread::scope(|scope| {
        let starting = scope.spawn(|| {
            let args: Vec<&std::ffi::OsStr> =
                vec!["--kubeconfig".as_ref(), agent_kubeconfig.as_os_str(), "--node".as_ref(), NODE_NAME.as_ref(), "--bpffs".as_ref(), bpffs.path.as_os_str()];
            AgentRun::start(AGENT.as_ref(), &node.ns, &args, METRICS, log)
        });
        std::thread::sleep(Duration::from_secs(3));
        assert!(!starting.is_finished(), "not ready without the API server");
        // From this thread: the API server's parent-death signal follows its spawning thread.
        api.start_apiserver();
        starting.join().expect("agent ready after the API server came back")
    });
    *agent = Some(started);
    // b admits app=c, which a and c both are now; d (another namespace) stays out.
    n.check("a", "b", 80, true);
    n.check("c", "b", 80, true);
    n.check("d", "b", 80, false);
    n.kube.relabel_pod(E2E, "a", json!({"app": "a"}));
    n.until("a", "b", 80, false, CHANGE);
}

/// The agent starts on a cluster without the ClusterNetworkPolicy CRD (it syncs and enforces
/// NetworkPolicies), picks the CRD up once it is installed, and enforces an Admin Accept made
/// through the API ahead of a NetworkPolicy that isolates the pod, until it is deleted.
/// (An Accept, not a Deny: the classifier on this branch does not act on deny entries yet.)
#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn cluster_network_policies_are_enforced_once_their_crd_is_installed() {
    let mut n = KubeNode::installing("kcnp", false);
    n.start_agent();
    n.kube.put_policy(E2E, json!({"metadata": {"name": "b-isolated"}, "spec": {"podSelector": {"matchLabels": {"app": "b"}}, "policyTypes": ["Ingress"]}}));
    n.until("a", "b", 80, false, CHANGE);
    let log = std::fs::read_to_string(&n.log).unwrap_or_default();
    assert_eq!(log.matches("does not serve the kind").count(), 1, "the missing CRD is reported once:\n{log}");

    n.api.kubectl_ok(&["create", "-f", manifests_dir().join("install").join(CNP_CRD_FILE).to_str().expect("utf-8")]);
    wait_crd_established(&n.api);
    n.kube.create_cluster_policy(admin_rule("accept-a-to-b", "Accept", "a", "b"));
    let took = n.until("a", "b", 80, true, CHANGE);
    println!("Admin Accept a -> b: enforced {} ms after it was created (the CRD installed just before)", took.as_millis());
    n.check("c", "b", 80, false);
    n.kube.delete_cluster_policy("accept-a-to-b");
    let took = n.until("a", "b", 80, false, CHANGE);
    println!("Admin Accept deleted: a -> b isolated by the NetworkPolicy again after {} ms", took.as_millis());
    let log = std::fs::read_to_string(&n.log).unwrap_or_default();
    assert!(log.contains("serves the kind now"), "{log}");
    assert!(n.agent().alive());
}

/// The generated CRD is a structural apiextensions.k8s.io/v1 schema a 1.20 API server accepts
/// (no CEL: 1.20 has none), and its OpenAPI validation refuses what the API refuses.
#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn the_cluster_network_policy_crd_is_accepted_and_validates_on_a_1_20_server() {
    let api = ApiServer::start("kcrd", (AGENT_NAMESPACE, AGENT_SERVICE_ACCOUNT));
    api.kubectl_ok(&["create", "-f", manifests_dir().join("install").to_str().expect("utf-8")]);
    wait_crd_established(&api);
    let crd: serde_json::Value = serde_json::from_str(&api.kubectl_ok(&["get", "crd", CNP_CRD, "-o", "json"])).expect("CRD JSON");
    let conditions: Vec<&str> = crd["status"]["conditions"].as_array().expect("conditions").iter().filter(|c| c["status"] == "True").filter_map(|c| c["type"].as_str()).collect();
    assert!(conditions.contains(&"Established") && !conditions.contains(&"NonStructuralSchema"), "{conditions:?}");
    // A *.k8s.io group needs an approved API (the annotation), else the server refuses the CRD.
    assert!(conditions.contains(&"KubernetesAPIApprovalPolicyConformant"), "{conditions:?}");
    assert_eq!(crd["spec"]["scope"], "Cluster");

    let dir = api.scratch("cnp");
    let create = |name: &str, spec: serde_json::Value| {
        let file = dir.join(format!("{name}.json"));
        let object = json!({"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy", "metadata": {"name": name}, "spec": spec});
        std::fs::write(&file, object.to_string()).expect("write policy");
        // The server's validation, not kubectl's own check of required fields and types.
        api.kubectl(&["create", "--validate=false", "-f", file.to_str().expect("utf-8")])
    };
    let valid = json!({"tier": "Admin", "priority": 1000, "subject": {"namespaces": {"matchLabels": {"team": "a"}}},
        "ingress": [{"name": "monitoring", "action": "Accept", "from": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "prometheus"}}}}],
                     "protocols": [{"tcp": {"destinationPort": {"number": 9090}}}, {"udp": {"destinationPort": {"range": {"start": 53, "end": 54}}}}, {"destinationNamedPort": "web"}]}],
        "egress": [{"action": "Pass", "to": [{"networks": ["198.18.0.0/16", "2001:2::/48"]}]}]});
    let out = create("valid", valid.clone());
    assert!(out.status.success(), "a valid policy is refused: {}", String::from_utf8_lossy(&out.stderr));
    let baseline = json!({"tier": "Baseline", "priority": 0, "subject": {"pods": {"namespaceSelector": {}, "podSelector": {}}}, "egress": [{"action": "Deny", "to": [{"namespaces": {}}]}]});
    assert!(create("baseline", baseline).status.success());
    // The printer columns, under the short name.
    let listed = api.kubectl_ok(&["get", "cnp"]);
    assert!(listed.lines().any(|l| l.split_whitespace().take(3).eq(["valid", "Admin", "1000"])), "{listed}");

    let with = |pointer: &str, value: serde_json::Value| {
        let mut spec = valid.clone();
        *spec.pointer_mut(pointer).unwrap_or_else(|| panic!("{pointer}")) = value;
        spec
    };
    for (what, spec, field) in [
        ("priority 5000", with("/priority", json!(5000)), "spec.priority"),
        ("priority -1", with("/priority", json!(-1)), "spec.priority"),
        ("tier Foo", with("/tier", json!("Foo")), "spec.tier"),
        ("action Allow", with("/ingress/0/action", json!("Allow")), "spec.ingress[0].action"),
        ("both subject fields", with("/subject", json!({"namespaces": {}, "pods": {"namespaceSelector": {}, "podSelector": {}}})), "spec.subject"),
        ("an empty subject", with("/subject", json!({})), "spec.subject"),
        ("no peers", with("/ingress/0/from", json!([])), "spec.ingress[0].from"),
        ("port 0", with("/ingress/0/protocols/0/tcp/destinationPort/number", json!(0)), "spec.ingress[0].protocols[0].tcp.destinationPort.number"),
        ("port 65536", with("/ingress/0/protocols/1/udp/destinationPort/range/end", json!(65536)), "spec.ingress[0].protocols[1].udp.destinationPort.range.end"),
        ("26 ingress rules", with("/ingress", json!(vec![valid["ingress"][0].clone(); 26])), "spec.ingress"),
    ] {
        let out = create("invalid", spec);
        let err = String::from_utf8_lossy(&out.stderr);
        // Whether a server prints list indices in field paths differs between versions.
        assert!(!out.status.success() && err.contains("is invalid") && without_indices(&err).contains(&without_indices(field)), "{what}: {err}");
    }
    let mut no_subject = valid.clone();
    no_subject.as_object_mut().expect("spec").remove("subject");
    let err = String::from_utf8_lossy(&create("invalid", no_subject).stderr).into_owned();
    assert!(err.contains("spec.subject") && err.contains("Required"), "subject is required: {err}");

    // The agent's ServiceAccount reads them; the viewer role lists them; neither writes them.
    let sa = api.service_account_kubeconfig(api.port);
    let sa_arg = format!("--kubeconfig={}", sa.display());
    let listed = api.kubectl(&[&sa_arg, "get", "clusternetworkpolicies", "-o", "name"]);
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    assert!(String::from_utf8_lossy(&listed.stdout).contains("clusternetworkpolicy.policy.networking.k8s.io/valid"));
    // A real delete, not --dry-run=server: kubectl checks a custom resource's dry-run support
    // in the server's OpenAPI document, which the server publishes some time after the CRD,
    // and before it does, kubectl lists CRDs, which this ServiceAccount may not.
    let delete = api.kubectl(&[&sa_arg, "delete", "clusternetworkpolicies", "valid"]);
    let err = String::from_utf8_lossy(&delete.stderr);
    assert!(!delete.status.success() && err.contains("Forbidden"), "the agent deletes a policy: {err}{}", String::from_utf8_lossy(&delete.stdout));
}

/// `text` without list indices (`[0]`).
fn without_indices(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(open) = rest.find('[') {
        let close = rest[open..].find(']').map(|c| open + c);
        match close.filter(|&c| c > open + 1 && rest[open + 1..c].bytes().all(|b| b.is_ascii_digit())) {
            Some(close) => {
                out.push_str(&rest[..open]);
                rest = &rest[close + 1..];
            }
            None => {
                out.push_str(&rest[..=open]);
                rest = &rest[open + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Every file under `dir` (recursively) that kubectl reads, sorted.
fn manifest_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("read {}: {e}", d.display())) {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml" || e == "json") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// `kind/name` of every object in the files (lowercase kind, as `kubectl -o name` prints
/// without the group).
fn objects_in(files: &[PathBuf]) -> Vec<(String, String)> {
    let mut objects = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file).expect("read manifest");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = <serde_yaml::Value as serde::Deserialize>::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            if value.is_null() {
                continue;
            }
            let kind = value["kind"].as_str().unwrap_or_else(|| panic!("{}: an object without kind", file.display()));
            let name = value["metadata"]["name"].as_str().unwrap_or_else(|| panic!("{}: an object without a name", file.display()));
            objects.push((kind.to_lowercase(), name.to_owned()));
        }
    }
    objects
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn install_and_example_manifests_apply_and_the_cluster_role_is_minimal() {
    let api = ApiServer::start("kman", (AGENT_NAMESPACE, AGENT_SERVICE_ACCOUNT));
    let dirs = [manifests_dir().join("install"), manifests_dir().join("examples")];
    let files: Vec<PathBuf> = dirs.iter().flat_map(|d| manifest_files(d)).collect();
    let objects = objects_in(&files);
    assert!(objects.len() >= 14, "found the manifests: {objects:?}");
    let mut file_args: Vec<&str> = Vec::new();
    for f in &files {
        file_args.extend(["-f", f.to_str().expect("utf-8 path")]);
    }
    // The patterns are written for the reader's own namespace.
    api.kubectl_ok(&["create", "namespace", "my-namespace"]);

    // Create (kubectl validates against the server's 1.20 schema: a field 1.20 does not know
    // fails here), then a server-side dry run of a server-side apply over what exists.
    let mut create = vec!["create", "-o", "name"];
    create.extend(&file_args);
    let created = api.kubectl_ok(&create);
    let created: Vec<&str> = created.lines().collect();
    assert_eq!(created.len(), objects.len(), "every object was created: {created:?}");
    assert!(created.iter().any(|c| c.ends_with(&format!("/{CNP_CRD}"))), "the CRD is installed: {created:?}");
    wait_crd_established(&api);
    for (kind, name) in &objects {
        assert!(
            created.iter().any(|c| c.split('/').next().is_some_and(|k| k.split('.').next() == Some(kind)) && c.ends_with(&format!("/{name}"))),
            "{kind}/{name} not among {created:?}"
        );
    }
    let mut dry_run = vec!["apply", "--server-side", "--dry-run=server", "--field-manager=policy-tests"];
    dry_run.extend(&file_args);
    let applied = api.kubectl_ok(&dry_run);
    assert_eq!(applied.lines().filter(|l| l.contains("server dry run")).count(), objects.len(), "{applied}");

    // 1.20 drops fields it does not know without a word: what matters came through.
    let ds: serde_json::Value =
        serde_json::from_str(&api.kubectl_ok(&["get", "daemonset", "-n", AGENT_NAMESPACE, "policy-agent", "-o", "json"])).expect("daemonset JSON");
    let pod = &ds["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["serviceAccountName"], AGENT_SERVICE_ACCOUNT);
    assert!(pod["tolerations"].as_array().is_some_and(|t| t.iter().any(|t| t["operator"] == "Exists" && t.get("key").is_none())), "{pod}");
    assert!(
        container["env"].as_array().is_some_and(|e| e.iter().any(|e| e["name"] == "NODE_NAME" && e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName")),
        "{container}"
    );
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert!(container["volumeMounts"].as_array().is_some_and(|m| m.iter().any(|m| m["mountPath"] == "/sys/fs/bpf")), "{container}");
    let caps = &container["securityContext"]["capabilities"]["add"];
    assert!(container["securityContext"]["privileged"] == true || caps.as_array().is_some_and(|c| c.len() == 3), "{container}");
    assert_eq!(container["ports"][0]["name"], "metrics");
    // The CNI plugin's init container, and the socket it talks to the agent over.
    let init = &pod["initContainers"][0];
    assert_eq!(init["args"][0], "cni-install", "{init}");
    assert!(init["securityContext"]["capabilities"]["add"].is_null(), "the installer needs no capability: {init}");
    assert!(container["args"].as_array().is_some_and(|a| a.iter().any(|a| a == "--cni-socket=/run/policy-enforcer/cni.sock")), "{container}");

    // The ClusterRole grants get/list/watch on exactly pods, namespaces, networkpolicies,
    // services and clusternetworkpolicies.
    let role: serde_json::Value = serde_json::from_str(&api.kubectl_ok(&["get", "clusterrole", "policy-agent", "-o", "json"])).expect("role JSON");
    let mut granted = Vec::new();
    for rule in role["rules"].as_array().expect("rules") {
        assert!(rule.get("nonResourceURLs").is_none() && rule.get("resourceNames").is_none(), "{rule}");
        for group in rule["apiGroups"].as_array().expect("apiGroups") {
            for resource in rule["resources"].as_array().expect("resources") {
                for verb in rule["verbs"].as_array().expect("verbs") {
                    granted.push(format!("{}/{}/{}", group.as_str().unwrap_or("?"), resource.as_str().unwrap_or("?"), verb.as_str().unwrap_or("?")));
                }
            }
        }
    }
    granted.sort();
    let mut wanted: Vec<String> =
        [("", "namespaces"), ("", "pods"), ("", "services"), ("networking.k8s.io", "networkpolicies"), ("policy.networking.k8s.io", "clusternetworkpolicies")]
        .iter()
        .flat_map(|(g, r)| ["get", "list", "watch"].map(|v| format!("{g}/{r}/{v}")))
        .collect();
    wanted.sort();
    assert_eq!(granted, wanted, "the ClusterRole grants exactly these");

    // As the agent's ServiceAccount (bound by the manifests): what it needs, nothing more.
    let sa = api.service_account_kubeconfig(api.port);
    let sa_arg = format!("--kubeconfig={}", sa.display());
    let can = |args: &[&str]| {
        let mut full = vec![sa_arg.as_str(), "auth", "can-i"];
        full.extend(args);
        let out = api.kubectl(&full);
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    };
    for verb in ["get", "list", "watch"] {
        for resource in ["pods", "namespaces", "services", "networkpolicies.networking.k8s.io", CNP_CRD] {
            assert!(can(&[verb, resource, "--all-namespaces"]), "the agent can {verb} {resource}");
        }
    }
    for (verb, resource) in [
        ("create", "pods"),
        ("delete", "pods"),
        ("patch", "pods"),
        ("update", "pods/status"),
        ("get", "secrets"),
        ("list", "secrets"),
        ("list", "configmaps"),
        ("create", "networkpolicies.networking.k8s.io"),
        ("delete", "networkpolicies.networking.k8s.io"),
        ("create", CNP_CRD),
        ("update", CNP_CRD),
        ("delete", CNP_CRD),
        ("update", "clusternetworkpolicies.policy.networking.k8s.io/status"),
        ("delete", "customresourcedefinitions.apiextensions.k8s.io"),
        ("delete", "namespaces"),
        ("list", "nodes"),
        ("create", "serviceaccounts/token"),
        ("escalate", "clusterroles.rbac.authorization.k8s.io"),
    ] {
        assert!(!can(&[verb, resource, "--all-namespaces"]), "the agent must not {verb} {resource}");
    }
    // Its status ConfigMap: create and patch (a server-side apply) in its own namespace only.
    let can_here = |verb: &str, resource: &str, ns: &str| can(&[verb, resource, "-n", ns]);
    assert!(can_here("create", "configmaps", AGENT_NAMESPACE) && can_here("patch", "configmaps/policy-agent-status-n1", AGENT_NAMESPACE));
    for (verb, ns) in [("get", AGENT_NAMESPACE), ("list", AGENT_NAMESPACE), ("delete", AGENT_NAMESPACE), ("update", AGENT_NAMESPACE), ("create", "default"), ("patch", "kube-system")] {
        assert!(!can_here(verb, "configmaps", ns), "the agent must not {verb} configmaps in {ns}");
    }
    // The plugin's roles (bound to nobody by the manifests) grant reads only.
    let role: serde_json::Value = serde_json::from_str(&api.kubectl_ok(&["get", "clusterrole", "policy-viewer", "-o", "json"])).expect("viewer JSON");
    for rule in role["rules"].as_array().expect("rules") {
        assert_eq!(rule["verbs"], json!(["get", "list"]), "{rule}");
    }
    let reader: serde_json::Value =
        serde_json::from_str(&api.kubectl_ok(&["get", "role", "policy-status-reader", "-n", AGENT_NAMESPACE, "-o", "json"])).expect("reader JSON");
    assert_eq!(reader["rules"], json!([{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}]));

    // And for real, not only as the authorizer says: reads work, writes and secrets do not.
    let as_agent = |args: &[&str]| {
        let mut full = vec![sa_arg.as_str()];
        full.extend(args);
        api.kubectl(&full)
    };
    assert!(as_agent(&["get", "pods,networkpolicies", "--all-namespaces"]).status.success());
    assert!(as_agent(&["get", "clusternetworkpolicies"]).status.success());
    assert!(as_agent(&["get", "namespaces"]).status.success());
    for args in [
        &["get", "secrets", "--all-namespaces"][..],
        &["delete", "pod", "web", "-n", "three-tier", "--dry-run=server"],
        &["label", "pod", "web", "-n", "three-tier", "x=y", "--dry-run=server"],
        &["delete", "networkpolicy", "deny-all", "-n", "my-namespace", "--dry-run=server"],
        &["create", "namespace", "agent-made", "--dry-run=server"],
    ] {
        let out = as_agent(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("Forbidden"), "kubectl {args:?} as the agent: {err}");
    }
}

// ---------------------------------------------------------------------------------------
// Tools against the live cluster: explain, coverage, the kubectl plugin.

/// Runs `policy-agent ARGS`; returns (exit code, stdout, stderr).
fn agent_cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(AGENT).args(args).output().expect("run policy-agent");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn agent_json(args: &[&str]) -> serde_json::Value {
    let (code, stdout, stderr) = agent_cli(args);
    assert_eq!(code, 0, "policy-agent {args:?}: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("policy-agent {args:?} printed no JSON ({e}):\n{stdout}"))
}

impl Kube {
    fn create_json<K>(&self, ns: &str, object: serde_json::Value)
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()> + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
    {
        let object: K = serde_json::from_value(object).expect("object");
        let api: Api<K> = Api::namespaced(self.client.clone(), ns);
        self.rt.block_on(api.create(&PostParams::default(), &object)).unwrap_or_else(|e| panic!("create {} in {ns}: {e}", K::kind(&())));
    }

    /// Writes every Namespace, Pod and NetworkPolicy as the API server has them into `dir`
    /// (one JSON file per kind): the files a `--manifests` user would have.
    fn dump(&self, dir: &Path) {
        let params = kube::api::ListParams::default();
        self.rt.block_on(async {
            let namespaces = self.namespaces().list(&params).await.expect("list namespaces").items;
            let pods = Api::<Pod>::all(self.client.clone()).list(&params).await.expect("list pods").items;
            let policies = Api::<NetworkPolicy>::all(self.client.clone()).list(&params).await.expect("list policies").items;
            let write = |name: &str, items: Vec<String>| std::fs::write(dir.join(name), items.join("\n")).expect("write dump");
            write("namespaces.json", namespaces.iter().map(|o| serde_json::to_string(o).expect("json")).collect());
            write("pods.json", pods.iter().map(|o| serde_json::to_string(o).expect("json")).collect());
            write("policies.json", policies.iter().map(|o| serde_json::to_string(o).expect("json")).collect());
        });
    }
}

/// A control plane with pods a, b, c of namespace e2e (not running anywhere: the tools only
/// read the API) and a policy letting only a reach b on 80.
fn tools_cluster(suffix: &str) -> (ApiServer, Kube) {
    let api = ApiServer::start(suffix, (AGENT_NAMESPACE, AGENT_SERVICE_ACCOUNT));
    let kube = Kube::new(&api.admin_kubeconfig);
    kube.create_namespace(E2E, &[("team", "blue")]);
    for spec in [pod("a", 1), pod("b", 2), pod("c", 3)] {
        kube.create_pod(E2E, &spec, NODE_NAME);
    }
    kube.put_policy(E2E, ingress_policy("b-ingress", "b", from_app("a"), json!([{"port": 80}])));
    (api, kube)
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn live_explain_and_coverage_answer_from_the_api_server_not_from_stale_files() {
    let (api, kube) = tools_cluster("ktool");
    let live = ["--kubeconfig", api.admin_kubeconfig.to_str().expect("utf-8")];
    let stale_dir = api.scratch("stale");
    kube.dump(&stale_dir);
    let stale = ["--manifests", stale_dir.to_str().expect("utf-8")];
    let explain = |source: &[&str], from: &str, to: &str, port: &str| {
        let mut args = vec!["explain", "--json", "--from", from, "--to", to, "--port", port];
        args.extend(source);
        agent_json(&args)
    };
    // The files and the API server agree until the policy changes through the API.
    assert_eq!(explain(&live, "e2e/c", "e2e/b", "80")["verdict"], "deny");
    assert_eq!(explain(&stale, "e2e/c", "e2e/b", "80")["verdict"], "deny");
    kube.put_policy(E2E, ingress_policy("b-ingress", "b", from_app("c"), json!([{"port": 80}])));
    let now = explain(&live, "e2e/c", "e2e/b", "80");
    assert_eq!(now["verdict"], "allow", "{now:#}");
    assert_eq!(now["ingress"]["policy"]["name"], "b-ingress");
    assert_eq!(explain(&stale, "e2e/c", "e2e/b", "80")["verdict"], "deny", "the stale files still say the old");
    // -n names the namespace of bare pod names; text and exit code as with files.
    let (code, text, _) = agent_cli(&[&["explain", "-n", E2E, "--from", "a", "--to", "b", "--port", "80"][..], &live].concat());
    assert_eq!(code, 0);
    assert!(text.starts_with("DENY\n") && text.contains("ingress at e2e/b (node kube-node-1): denied, isolated by e2e/b-ingress"), "{text}");
    let (code, _, stderr) = agent_cli(&[&["explain", "--from", "e2e/nope", "--to", "e2e/b", "--port", "80"][..], &live].concat());
    assert!(code == 2 && stderr.contains("unknown pod e2e/nope"), "{stderr}");

    services_are_answered_per_backend(&kube, &live, &stale);

    // Coverage: a default deny for egress made through the API shows live only.
    kube.put_policy(E2E, json!({"metadata": {"name": "deny-egress"}, "spec": {"podSelector": {}, "policyTypes": ["Egress"]}}));
    let coverage = |source: &[&str]| agent_json(&[&["coverage", "--json", "-n", E2E][..], source].concat());
    let (now, before) = (coverage(&live), coverage(&stale));
    let namespace = |report: &serde_json::Value| report["namespaces"].as_array().and_then(|n| n.first()).cloned().expect("one namespace");
    assert_eq!(now["namespaces"].as_array().map(Vec::len), Some(1), "-n: only e2e: {now:#}");
    let e2e = namespace(&now);
    assert_eq!(e2e["egress"]["default_deny"], json!(["e2e/deny-egress"]), "{e2e:#}");
    assert_eq!((e2e["egress"]["isolated_nothing_allowed"].as_u64(), e2e["ingress"]["not_isolated"].as_u64()), (Some(3), Some(2)), "{e2e:#}");
    let old = namespace(&before);
    assert_eq!((old["egress"]["default_deny"].as_array().map(Vec::len), old["egress"]["not_isolated"].as_u64()), (Some(0), Some(3)), "{old:#}");
    let pod_b = now["pods"].as_array().and_then(|p| p.iter().find(|p| p["pod"] == "e2e/b")).cloned().expect("e2e/b listed");
    assert_eq!((pod_b["ingress"]["state"].as_str(), pod_b["egress"]["state"].as_str()), (Some("isolated"), Some("isolated-nothing-allowed")));
    let (code, text, _) = agent_cli(&[&["coverage", "-n", E2E][..], &live].concat());
    assert_eq!(code, 0);
    assert!(text.starts_with("pods not isolated for ingress (every source allowed): 2\n  e2e/a"), "{text}");
    assert!(text.contains("isolated for egress, nothing allowed: 3") && text.contains("yes (deny-egress)"), "{text}");
}

/// `svc/e2e/web`: port 8080 maps by name to 80 on backends b (only c may reach it) and c.
fn services_are_answered_per_backend(kube: &Kube, live: &[&str], stale: &[&str]) {
    use k8s_openapi::api::core::v1::{Endpoints, Service};
    kube.create_json::<Service>(E2E, json!({"metadata": {"name": "web"}, "spec": {"ports": [{"name": "http", "port": 8080, "targetPort": 80}]}}));
    // The addresses `pod(name, last)` gives.
    let address = |name: &str, last: u8| json!({"ip": Ipv4Addr::new(198, 18, 30, last).to_string(), "targetRef": {"kind": "Pod", "name": name, "namespace": E2E}});
    kube.create_json::<Endpoints>(
        E2E,
        json!({"metadata": {"name": "web"}, "subsets": [{"addresses": [address("b", 2), address("c", 3)], "notReadyAddresses": [address("a", 1)], "ports": [{"name": "http", "port": 80}]}]}),
    );
    let answer = agent_json(&[&["explain", "--json", "--from", "e2e/a", "--to", "svc/e2e/web", "--port", "8080"][..], live].concat());
    assert_eq!(answer["verdict"], "partial", "{answer:#}");
    let backends = answer["backends"].as_array().expect("backends");
    let summary: Vec<(String, u64, String)> = backends
        .iter()
        .map(|b| (b["to_backend"]["pod"].as_str().unwrap_or("-").to_owned(), b["port"].as_u64().unwrap_or(0), b["verdict"].as_str().unwrap_or("-").to_owned()))
        .collect();
    assert_eq!(summary, [("e2e/b".to_owned(), 80, "deny".to_owned()), ("e2e/c".to_owned(), 80, "allow".to_owned())]);
    assert_eq!(answer["to_service"]["not_ready"][0]["pod"], "e2e/a");
    let (code, text, _) = agent_cli(&[&["explain", "--from", "e2e/c", "--to", "svc/e2e/web", "--port", "8080"][..], live].concat());
    assert_eq!(code, 0);
    assert!(text.contains("--- backend 1 of 2: e2e/b 198.18.30.2:80\nALLOW\n") && text.ends_with("overall: ALLOW (all 2 backends allowed)\n"), "{text}");

    // No Endpoints at all: an answer, not an error.
    kube.create_json::<Service>(E2E, json!({"metadata": {"name": "empty"}, "spec": {"ports": [{"port": 80}]}}));
    let none = agent_json(&[&["explain", "--json", "--from", "e2e/a", "--to", "svc/e2e/empty", "--port", "80"][..], live].concat());
    assert_eq!((none["verdict"].as_str(), none["backends"].as_array().map(Vec::len)), (Some("no-backends"), Some(0)), "{none:#}");
    for (args, message) in [
        (&["explain", "--from", "e2e/a", "--to", "svc/e2e/web", "--port", "80"][..], "has no port 80/TCP"),
        (&["explain", "--from", "e2e/a", "--to", "svc/e2e/nope", "--port", "80"][..], "unknown Service e2e/nope"),
    ] {
        let (code, _, stderr) = agent_cli(&[args, live].concat());
        assert!(code == 2 && stderr.contains(message), "{args:?}: {stderr}");
    }
    let (code, _, stderr) = agent_cli(&[&["explain", "--from", "e2e/a", "--to", "svc/e2e/web", "--port", "8080"][..], stale].concat());
    assert!(code == 2 && stderr.contains("live cluster only"), "{stderr}");
}

/// A kubeconfig that acts as `user` (admin's token, impersonating): what the plugin's users
/// are granted by binding the install manifests' `policy-viewer` roles.
fn impersonating_kubeconfig(api: &ApiServer, user: &str) -> PathBuf {
    let admin = std::fs::read_to_string(&api.admin_kubeconfig).expect("read admin kubeconfig");
    let text = admin.replace("  user:\n    token:", &format!("  user:\n    as: {user}\n    token:"));
    assert_ne!(text, admin, "kubeconfig layout changed");
    let path = api.scratch("viewer").join("kubeconfig");
    std::fs::write(&path, text).expect("write viewer kubeconfig");
    path
}

/// Runs the real kubectl with PATH = the plugin directory, kubectl's own, and the system's.
fn kubectl_plugin(api: &ApiServer, plugins: &Path, args: &[&str], env: &[(&str, &Path)]) -> (i32, String, String) {
    let kubectl = api.kubectl_path();
    let path = format!("{}:{}:/usr/sbin:/usr/bin:/sbin:/bin", plugins.display(), kubectl.parent().expect("bin dir").display());
    let mut cmd = Command::new(&kubectl);
    cmd.args(args).env_clear().env("PATH", path).env("HOME", plugins);
    for (key, value) in env {
        cmd.env(key, value);
    }
    let out = cmd.output().expect("run kubectl");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn the_kubectl_plugin_explains_covers_and_shows_a_nodes_published_status() {
    let mut n = KubeNode::new("kplg");
    n.kube.put_policy(E2E, ingress_policy("b-ingress", "b", from_app("a"), json!([{"port": 80}])));
    n.start_agent();
    // The plugin's user has only what manifests/install/40-viewer-rbac.yaml grants.
    n.api.kubectl_ok(&["create", "clusterrolebinding", "policy-viewer-test", "--clusterrole=policy-viewer", "--user=policy-viewer"]);
    n.api.kubectl_ok(&["create", "rolebinding", "policy-status-reader-test", "-n", AGENT_NAMESPACE, "--role=policy-status-reader", "--user=policy-viewer"]);
    let viewer = impersonating_kubeconfig(&n.api, "policy-viewer");
    let viewer_arg = viewer.to_str().expect("utf-8");
    let plugins = n.api.scratch("plugins");
    std::os::unix::fs::symlink(AGENT, plugins.join("kubectl-policy")).expect("symlink kubectl-policy");

    let (code, list, stderr) = kubectl_plugin(&n.api, &plugins, &["plugin", "list"], &[]);
    assert!(code == 0 && list.contains("kubectl-policy"), "kubectl finds the plugin: {list}{stderr}");

    // explain, with --kubeconfig and --context after the plugin's words (as kubectl passes them).
    let (code, text, stderr) =
        kubectl_plugin(&n.api, &plugins, &["policy", "explain", "--from", "c", "--to", "b", "--port", "80", "-n", E2E, "--kubeconfig", viewer_arg, "--context", "test"], &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(text.starts_with("DENY\n") && text.contains("isolated by e2e/b-ingress"), "{text}{stderr}");
    let (code, _, stderr) = kubectl_plugin(&n.api, &plugins, &["policy", "explain", "--from", "c", "--to", "b", "--port", "80", "--kubeconfig", viewer_arg], &[]);
    assert!(code == 2 && stderr.contains("unknown pod default/c"), "no -n: the context's namespace (default): {stderr}");

    // coverage, with $KUBECONFIG.
    let (code, text, stderr) = kubectl_plugin(&n.api, &plugins, &["policy", "coverage", "-n", E2E, "--json"], &[("KUBECONFIG", viewer.as_path())]);
    assert_eq!(code, 0, "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&text).expect("coverage JSON");
    let b = report["pods"].as_array().and_then(|p| p.iter().find(|p| p["pod"] == "e2e/b")).cloned().expect("e2e/b");
    assert_eq!((b["ingress"]["state"].as_str(), b["node"].as_str()), (Some("isolated"), Some(NODE_NAME)), "{report:#}");

    // status NODE: what the agent published (ready, its four endpoints), and how old it is.
    let start = Instant::now();
    let text = loop {
        let (code, text, stderr) = kubectl_plugin(&n.api, &plugins, &["policy", "status", NODE_NAME, "--kubeconfig", viewer_arg], &[]);
        if code == 0 && text.contains("ready true") && text.contains("other/d") {
            break text;
        }
        assert!(
            start.elapsed() < Duration::from_secs(45),
            "no ready status published: {text}{stderr}\nagent log:\n{}",
            std::fs::read_to_string(&n.log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(text.starts_with(&format!("status of node {NODE_NAME}'s agent, published ")) && text.contains("s ago"), "{text}");
    assert!(text.contains("e2e/b") && text.contains("isolated"), "{text}");
    let (code, json_text, _) = kubectl_plugin(&n.api, &plugins, &["policy", "status", NODE_NAME, "--json", "--kubeconfig", viewer_arg], &[]);
    assert_eq!(code, 0);
    let status: serde_json::Value = serde_json::from_str(&json_text).expect("status JSON");
    assert!(status["age_seconds"].as_u64().is_some_and(|a| a < 400), "{status:#}");
    assert_eq!(status["status"]["node"], NODE_NAME);
    let (code, _, stderr) = kubectl_plugin(&n.api, &plugins, &["policy", "status", "no-such-node", "--kubeconfig", viewer_arg], &[]);
    assert!(code == 2 && stderr.contains("no ConfigMap policy-enforcer/policy-agent-status-no-such-node"), "{stderr}");

    // A change reaches the ConfigMap (at most every 10 s), without the agent missing a beat.
    n.kube.put_policy(E2E, json!({"metadata": {"name": "d-deny"}, "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}));
    n.kube.put_policy(OTHER, json!({"metadata": {"name": "d-deny"}, "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}));
    n.until("a", "d", 80, false, CHANGE);
    let start = Instant::now();
    loop {
        let (_, json_text, _) = kubectl_plugin(&n.api, &plugins, &["policy", "status", NODE_NAME, "--json", "--kubeconfig", viewer_arg], &[]);
        let status: serde_json::Value = serde_json::from_str(&json_text).unwrap_or_default();
        let d = status["status"]["endpoints"].as_array().and_then(|e| e.iter().find(|e| e["pod"] == "other/d")).cloned();
        if d.is_some_and(|d| d["ingress_isolated"] == true) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "the change was not published: {status:#}");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(n.agent().alive());
}

/// The agent's `syncs` (passes that compiled or wrote) once it has stayed put for a second.
fn settled_syncs(n: &mut KubeNode) -> u64 {
    let syncs = |n: &mut KubeNode| n.agent().status()["syncs"].as_u64().expect("syncs in /status");
    let start = Instant::now();
    let mut last = syncs(n);
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = syncs(n);
        if now == last {
            return now;
        }
        assert!(start.elapsed() < CHANGE, "the agent keeps syncing ({last} -> {now}); log:\n{}", std::fs::read_to_string(&n.log).unwrap_or_default());
        last = now;
    }
}

#[test]
#[ignore = "privileged: run by cargo xtask test"]
fn status_only_and_annotation_updates_cost_no_recompile_while_a_label_change_applies() {
    let mut n = KubeNode::new("kprj");
    n.kube.put_policy(E2E, ingress_policy("b-from-a", "b", from_app("a"), json!([{"port": 80}])));
    n.start_agent();
    n.until("c", "b", 80, false, CHANGE);
    n.check("a", "b", 80, true);
    let before = settled_syncs(&mut n);

    // What a kubelet and controllers write all day: readiness conditions, container
    // statuses, annotations; on local pods, a remote pod, the namespace and the policy.
    let merge = |value: serde_json::Value| Patch::Merge(value);
    for round in 0..5 {
        let ready = if round % 2 == 0 { "False" } else { "True" };
        let status = json!({"status": {
            "conditions": [{"type": "Ready", "status": ready, "lastTransitionTime": format!("2026-01-01T00:00:0{round}Z")}],
            "containerStatuses": [{"name": "c", "image": "example.invalid/none", "imageID": "", "ready": ready == "True", "restartCount": round, "started": true}],
        }});
        let annotation = json!({"metadata": {"annotations": {"example.com/round": round.to_string()}}});
        for (ns, pod) in [(E2E, "a"), (E2E, "b"), (OTHER, "remote")] {
            n.kube.rt.block_on(n.kube.pods(ns).patch_status(pod, &PatchParams::default(), &merge(status.clone()))).expect("patch pod status");
            n.kube.rt.block_on(n.kube.pods(ns).patch(pod, &PatchParams::default(), &merge(annotation.clone()))).expect("annotate pod");
        }
        n.kube.rt.block_on(n.kube.namespaces().patch(E2E, &PatchParams::default(), &merge(annotation.clone()))).expect("annotate namespace");
        n.kube.rt.block_on(n.kube.policies(E2E).patch("b-from-a", &PatchParams::default(), &merge(annotation))).expect("annotate policy");
        std::thread::sleep(Duration::from_millis(300));
    }
    let pod = n.kube.rt.block_on(n.kube.pods(E2E).get("a")).expect("get pod");
    assert_eq!(pod.status.and_then(|s| s.conditions).map(|c| c.len()), Some(1), "the status updates were made");
    // Several resync passes (200 ms) after the last update.
    std::thread::sleep(Duration::from_secs(1));
    let after = n.agent().status()["syncs"].as_u64().expect("syncs");
    assert_eq!(after, before, "status-only and annotation updates recompiled; log:\n{}", std::fs::read_to_string(&n.log).unwrap_or_default());
    n.check("a", "b", 80, true);
    n.check("c", "b", 80, false);

    // A label change is still a change.
    n.kube.relabel_pod(E2E, "c", json!({"app": "a"}));
    n.until("c", "b", 80, true, CHANGE);
    assert!(n.agent().status()["syncs"].as_u64().expect("syncs") > before, "the relabel was compiled");
    assert!(n.agent().alive());
}
