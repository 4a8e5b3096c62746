//! The demo behind `cargo xtask demo`: the seed's three-tier app (web :80, api :5000,
//! db :3306) as pods in network namespaces on a simulated node, the agent enforcing the
//! policies of manifests/examples/three-tier as they are dropped into its manifest directory
//! (after a platform ClusterNetworkPolicy that keeps every web pod from every db pod), and a
//! reachability table after each step. `--check` turns the expectations (tables, and what
//! explain names) into a test.
//!
//! Usage: demo --agent PATH [--check]

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Stdio},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Pod, PodIP, PodStatus};
use testbed::{
    Bpffs, NODE_V4, Node,
    probe::{Servers, tcp_ok},
};

fn http_get(addr: &str, path: &str) -> Option<String> {
    policy_agent::status::fetch(addr, path).ok()
}

const NODE_NAME: &str = "demo-node";
const NAMESPACE: &str = "three-tier";
const PODS: [(&str, u16, Ipv4Addr, Ipv6Addr); 3] = [
    ("web", 80, Ipv4Addr::new(198, 18, 0, 10), Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0x10)),
    ("api", 5000, Ipv4Addr::new(198, 18, 0, 11), Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0x11)),
    ("db", 3306, Ipv4Addr::new(198, 18, 0, 12), Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0x12)),
];
const METRICS: &str = "127.0.0.1:9190";
/// The platform team's guard rail, in the Admin tier so that no namespace's NetworkPolicy
/// can open it: no `app=web` pod reaches an `app=db` pod, in any namespace.
const PLATFORM_CNP_FILE: &str = "05-platform-no-web-to-db.yaml";
const PLATFORM_CNP: &str = "\
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata:
  name: platform-no-web-to-db
spec:
  tier: Admin
  priority: 10
  subject:
    pods:
      namespaceSelector: {}
      podSelector:
        matchLabels: {app: db}
  ingress:
  - name: no-web-to-db
    action: Deny
    from:
    - pods:
        namespaceSelector: {}
        podSelector:
          matchLabels: {app: web}
";
/// What explain must say about web -> db once the platform policy is in: the policy, its
/// tier and priority, the rule and its action.
const PLATFORM_EXPLAIN: [&str; 5] = ["platform-no-web-to-db", "Admin", "priority 10", "no-web-to-db", "Deny"];
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// Probes that watch for a change: short, as a round trip over a veth takes microseconds.
const WATCH_TIMEOUT: Duration = Duration::from_millis(50);

struct Args {
    agent: PathBuf,
    check: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut agent = None;
    let mut check = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--agent" => agent = args.next().map(PathBuf::from),
            "--check" => check = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Args { agent: agent.ok_or("--agent PATH is required")?, check })
}

/// Kills the agent on every way out.
struct AgentProcess(Child);

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("demo: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("demo: the reachability differed from what the policies say (see the tables above)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("demo: {e}");
            ExitCode::FAILURE
        }
    }
}

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../manifests/examples/three-tier")
}

fn run(args: &Args) -> Result<bool, String> {
    println!("== Building a node with three pods in network namespaces");
    let mut node = Node::new("demo");
    for (name, port, v4, v6) in PODS {
        node.add_pod(name, v4, v6);
        println!("   pod {NAMESPACE}/{name:<4} {v4:<13} {v6:<16} serving TCP {port}");
    }
    let bpffs = Bpffs::new("demo");
    let manifests = bpffs.scratch("manifests");
    let flows = bpffs.scratch("log").join("flows.jsonl");
    let _servers: Vec<Servers> = PODS.iter().map(|(name, port, ..)| Servers::start(&node.pod(name).ns, &[*port], Duration::from_secs(120))).collect();

    copy_example(&manifests, "00-namespace.yaml")?;
    write_pods(&manifests)?;
    println!("== Starting the agent on the node, watching {}", manifests.display());
    let agent = start_agent(args, &node, &manifests, &bpffs.path, &flows)?;
    wait_ready(&node)?;

    let mut ok = true;
    println!("\n== 1. No policy: every pod reaches every other pod");
    ok &= table(&node, |_, _| true);

    println!("\n== 2. A platform guard rail: an Admin ClusterNetworkPolicy denies web -> db in every namespace");
    let dropped_at = Instant::now();
    write_manifest(&manifests, PLATFORM_CNP_FILE, PLATFORM_CNP)?;
    // Not fatal: the table below shows what is enforced either way.
    match wait_for(|| !tcp_ok(&node.pod("web").ns, target("db"), WATCH_TIMEOUT), dropped_at) {
        Ok(latency) => println!("   enforced within {} ms of the file landing (a 50 ms probe timeout included)", latency.as_millis()),
        Err(e) => println!("   (!) {e}"),
    }
    ok &= table(&node, |from, to| (from, to) != ("web", "db"));
    println!("\n== Why is web -> db dropped? (policy-agent explain)");
    let said = show_tool(args, &manifests, &["explain", "--from", "three-tier/web", "--to", "three-tier/db", "--port", "3306"])?;
    ok &= names_all(&said, &PLATFORM_EXPLAIN);

    println!("\n== 3. Dropping in 10-default-deny.yaml and 20-db-allow-api.yaml (db accepts only api on 3306)");
    let dropped_at = Instant::now();
    copy_example(&manifests, "10-default-deny.yaml")?;
    copy_example(&manifests, "20-db-allow-api.yaml")?;
    let latency = wait_for(|| !tcp_ok(&node.pod("web").ns, target("api"), WATCH_TIMEOUT), dropped_at)?;
    println!("   enforced within {} ms of the files landing", latency.as_millis());
    ok &= table(&node, |from, to| from == "api" && to == "db");

    println!("\n== 4. The rest of the three-tier policies: api accepts web on 5000, web accepts everyone on 80");
    let dropped_at = Instant::now();
    copy_example(&manifests, "30-api-allow-web.yaml")?;
    copy_example(&manifests, "40-web-allow-all.yaml")?;
    let latency = wait_for(|| tcp_ok(&node.pod("web").ns, target("api"), WATCH_TIMEOUT), dropped_at)?;
    println!("   enforced within {} ms of the files landing", latency.as_millis());
    ok &= table(&node, |from, to| matches!((from, to), ("api", "db") | ("web", "api") | (_, "web")));

    println!("\n== Why is db -> api dropped? (policy-agent explain)");
    show_tool(args, &manifests, &["explain", "--from", "three-tier/db", "--to", "three-tier/api", "--port", "5000"])?;
    println!("\n== Which pods does no policy isolate? (policy-agent coverage)");
    show_tool(args, &manifests, &["coverage", "-n", "three-tier"])?;
    println!("\n== Flow log: the drops (JSON lines from the classifier's ring buffer)");
    ok &= show_drops(&flows);
    println!("\n== policy-agent status");
    show_status(&node);
    println!("\n== Cleaning up: stopping the agent, removing pinned maps and links, deleting the namespaces");
    drop(agent);
    let _ = Command::new(&args.agent).args(["cleanup", "--bpffs"]).arg(&bpffs.path).stdout(Stdio::null()).status();
    if args.check && !ok {
        return Ok(false);
    }
    Ok(ok || !args.check)
}

/// `policy-agent run` inside the node namespace, on the manifest directory, logging drops to
/// `flows`; stopped when the returned guard drops.
fn start_agent(args: &Args, node: &Node, manifests: &Path, bpffs: &Path, flows: &Path) -> Result<AgentProcess, String> {
    let agent = Command::new("ip")
        .args(["netns", "exec", &node.ns.name])
        .arg(&args.agent)
        .args(["run", "--manifests"])
        .arg(manifests)
        .args(["--node", NODE_NAME, "--bpffs"])
        .arg(bpffs)
        .args(["--metrics-addr", METRICS, "--flow-log", "denied", "--flow-log-file"])
        .arg(flows)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("start agent: {e}"))?;
    Ok(AgentProcess(agent))
}

/// Runs one of the agent's tools (`explain`, `coverage`) on the manifest directory, prints
/// what it says and returns it.
fn show_tool(args: &Args, manifests: &Path, tool: &[&str]) -> Result<String, String> {
    let output = Command::new(&args.agent)
        .args(tool)
        .arg("--manifests")
        .arg(manifests)
        .output()
        .map_err(|e| format!("{}: {e}", tool[0]))?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    print!("{text}");
    Ok(text)
}

/// Whether `text` mentions every one of `needles` (and says which it does not).
fn names_all(text: &str, needles: &[&str]) -> bool {
    let missing: Vec<&str> = needles.iter().copied().filter(|n| !text.contains(n)).collect();
    if !missing.is_empty() {
        println!("   (!) explain does not name {}", missing.join(", "));
    }
    missing.is_empty()
}

/// Prints the first drops of the flow log; whether there were any.
fn show_drops(flows: &Path) -> bool {
    // The agent drains the ring buffer on its own schedule.
    std::thread::sleep(Duration::from_millis(300));
    let log = std::fs::read_to_string(flows).unwrap_or_default();
    let drops: Vec<&str> = log.lines().filter(|l| l.contains("\"verdict\":\"deny\"")).collect();
    for line in drops.iter().take(6) {
        println!("   {line}");
    }
    if drops.len() > 6 {
        println!("   ... {} more", drops.len() - 6);
    }
    !drops.is_empty()
}

fn show_status(node: &Node) {
    let Some(body) = node.ns.run(|| http_get(METRICS, "/status")) else {
        println!("   (no answer)");
        return;
    };
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    for e in v["endpoints"].as_array().into_iter().flatten() {
        println!(
            "   {:<18} {:<12} endpoint {} ingress {} entries {} attached {}",
            e["pod"].as_str().unwrap_or("?"),
            e["interface"].as_str().unwrap_or("-"),
            e["endpoint_id"],
            if e["ingress_isolated"].as_bool() == Some(true) { "isolated" } else { "open" },
            e["policy_entries"],
            e["attached"]
        );
    }
}

fn target(pod: &str) -> SocketAddr {
    let (_, port, v4, _) = PODS.iter().find(|p| p.0 == pod).copied().expect("known pod");
    SocketAddr::new(v4.into(), port)
}

/// Probes every ordered pair on the destination's port (IPv4 and IPv6) and prints the table;
/// returns whether it matches `expected`.
fn table(node: &Node, expected: impl Fn(&str, &str) -> bool) -> bool {
    let mut matches = true;
    print!("   {:<8}", "from\\to");
    for (to, port, ..) in PODS {
        print!("{:>12}", format!("{to}:{port}"));
    }
    println!();
    for (from, ..) in PODS {
        print!("   {from:<8}");
        for (to, port, v4, v6) in PODS {
            if from == to {
                print!("{:>12}", "-");
                continue;
            }
            let ns = &node.pod(from).ns;
            let r4 = tcp_ok(ns, SocketAddr::new(v4.into(), port), PROBE_TIMEOUT);
            let r6 = tcp_ok(ns, SocketAddr::new(v6.into(), port), PROBE_TIMEOUT);
            let want = expected(from, to);
            let cell = match (r4, r6) {
                (true, true) => "allow",
                (false, false) => "DROP",
                _ => "MIXED",
            };
            let mark = if r4 == want && r6 == want { "" } else { " (!)" };
            matches &= mark.is_empty();
            print!("{:>12}", format!("{cell}{mark}"));
        }
        println!();
    }
    if !matches {
        println!("   (!) differs from what the policies say");
    }
    matches
}

fn copy_example(dir: &Path, name: &str) -> Result<(), String> {
    let from = examples_dir().join(name);
    let text = std::fs::read_to_string(&from).map_err(|e| format!("{}: {e}", from.display()))?;
    write_manifest(dir, name, &text)
}

fn write_manifest(dir: &Path, name: &str, text: &str) -> Result<(), String> {
    // Write then rename, as kubectl-style tooling does, so the agent never reads half a file.
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(name)).map_err(|e| format!("{name}: {e}"))
}

/// The example's pods as the API server would show them on this node: scheduled here, with
/// the addresses of their network namespaces.
fn write_pods(dir: &Path) -> Result<(), String> {
    let path = examples_dir().join("50-workloads.yaml");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let mut pod: Pod = serde::Deserialize::deserialize(doc).map_err(|e| format!("{}: {e}", path.display()))?;
        let name = pod.metadata.name.clone().unwrap_or_default();
        let (_, _, v4, v6) = PODS.iter().find(|p| p.0 == name).copied().ok_or(format!("unexpected pod {name}"))?;
        pod.spec.get_or_insert_default().node_name = Some(NODE_NAME.into());
        pod.status = Some(PodStatus {
            phase: Some("Running".into()),
            host_ip: Some(NODE_V4.to_string()),
            pod_ip: Some(v4.to_string()),
            pod_ips: Some(vec![PodIP { ip: v4.to_string() }, PodIP { ip: v6.to_string() }]),
            ..PodStatus::default()
        });
        docs.push(serde_yaml::to_string(&pod).map_err(|e| e.to_string())?);
    }
    std::fs::write(dir.join("50-workloads.yaml"), docs.join("---\n")).map_err(|e| e.to_string())
}

fn wait_ready(node: &Node) -> Result<(), String> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        if node.ns.run(|| http_get(METRICS, "/readyz")).is_some() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err("the agent did not become ready within 20 s".into())
}

/// Polls `done` until it holds (at most 10 s); returns the time since `since`.
fn wait_for(done: impl Fn() -> bool, since: Instant) -> Result<Duration, String> {
    while since.elapsed() < Duration::from_secs(10) {
        if done() {
            return Ok(since.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err("the change was not enforced within 10 s".into())
}
