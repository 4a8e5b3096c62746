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
        let api = ApiServer::start(suffix, (AGENT_NAMESPACE, AGENT_SERVICE_ACCOUNT));
        api.kubectl_ok(&["create", "-f", manifests_dir().join("install").to_str().expect("utf-8")]);
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
    assert!(container["securityContext"]["privileged"] == true || caps.as_array().is_some_and(|c| c.len() == 4), "{container}");
    assert_eq!(container["ports"][0]["name"], "metrics");

    // The ClusterRole grants get/list/watch on exactly pods, namespaces, networkpolicies.
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
    let mut wanted: Vec<String> = [("", "namespaces"), ("", "pods"), ("networking.k8s.io", "networkpolicies")]
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
        for resource in ["pods", "namespaces", "networkpolicies.networking.k8s.io"] {
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
        ("delete", "namespaces"),
        ("list", "nodes"),
        ("create", "serviceaccounts/token"),
        ("escalate", "clusterroles.rbac.authorization.k8s.io"),
    ] {
        assert!(!can(&[verb, resource, "--all-namespaces"]), "the agent must not {verb} {resource}");
    }
    // And for real, not only as the authorizer says: reads work, writes and secrets do not.
    let as_agent = |args: &[&str]| {
        let mut full = vec![sa_arg.as_str()];
        full.extend(args);
        api.kubectl(&full)
    };
    assert!(as_agent(&["get", "pods,networkpolicies", "--all-namespaces"]).status.success());
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
