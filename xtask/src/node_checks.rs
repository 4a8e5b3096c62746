//! Checks on the real node (`cargo xtask kube-node`), with the agent deployed by its
//! DaemonSet: pods are enforced from their first packet, a SIGKILLed agent changes no
//! verdict while kubelet restarts it, and a ClusterNetworkPolicy made through the API server
//! denies what no NetworkPolicy does until it is deleted.
//!
//! Every probe is a pod whose shell loop starts at its first instruction and counts bounded
//! `agnhost connect` attempts; the counts come back through `kubectl logs`.

use std::{
    io::Write as _,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

/// kubectl with the node's kubeconfig.
pub struct Kubectl {
    pub binary: PathBuf,
    pub kubeconfig: PathBuf,
}

impl Kubectl {
    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--kubeconfig").arg(&self.kubeconfig);
        cmd
    }

    fn run(&self, args: &[&str]) -> Result<String> {
        let out = self.command().args(args).output().with_context(|| format!("kubectl {args:?}"))?;
        ensure!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn apply(&self, yaml: &str) -> Result<()> {
        let mut child = self.command().args(["apply", "-f", "-"]).stdin(Stdio::piped()).stdout(Stdio::null()).spawn().context("kubectl apply")?;
        child.stdin.take().context("stdin")?.write_all(yaml.as_bytes())?;
        ensure!(child.wait()?.success(), "kubectl apply failed for:\n{yaml}");
        Ok(())
    }

    /// A pod's IP, once it has one.
    fn pod_ip(&self, ns: &str, pod: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let ip = self.run(&["-n", ns, "get", "pod", pod, "-o", "jsonpath={.status.podIP}"])?;
            if !ip.trim().is_empty() {
                return Ok(ip.trim().to_owned());
            }
            ensure!(Instant::now() < deadline, "pod {ns}/{pod} has no IP after {timeout:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for a probe pod to finish and returns the `key=value` counts it printed.
    fn probe_result(&self, ns: &str, pod: &str, timeout: Duration) -> Result<Vec<(String, u64)>> {
        let deadline = Instant::now() + timeout;
        loop {
            let phase = self.run(&["-n", ns, "get", "pod", pod, "-o", "jsonpath={.status.phase}"])?;
            match phase.trim() {
                "Succeeded" => break,
                "Failed" => bail!("probe pod {ns}/{pod} failed: {}", self.run(&["-n", ns, "logs", pod]).unwrap_or_default()),
                _ => {}
            }
            ensure!(Instant::now() < deadline, "probe pod {ns}/{pod} still {} after {timeout:?}", phase.trim());
            std::thread::sleep(Duration::from_millis(250));
        }
        let logs = self.run(&["-n", ns, "logs", pod])?;
        Ok(logs.lines().filter_map(|l| l.split_once('=')).filter_map(|(k, v)| Some((k.trim().to_owned(), v.trim().parse().ok()?))).collect())
    }
}

fn count(result: &[(String, u64)], key: &str) -> Result<u64> {
    result.iter().find(|(k, _)| k == key).map(|(_, v)| *v).with_context(|| format!("no {key}= in the probe's output {result:?}"))
}

const AGNHOST: &str = "k8s.gcr.io/e2e-test-images/agnhost:2.21";
const PORT: u16 = 8080;

/// A pod `name` with label `role`, running `script` under sh once (restartPolicy Never).
fn pod_yaml(ns: &str, name: &str, role: &str, script: &str) -> String {
    let script = script.replace('\'', "''");
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{role: {role}}}}}\n\
         spec:\n  restartPolicy: Never\n  terminationGracePeriodSeconds: 0\n  containers:\n  - name: c\n    image: {AGNHOST}\n    imagePullPolicy: Never\n    \
         command: [sh, -c, '{script}']\n"
    )
}

/// A shell loop of `attempts` connects to `target`, `pause` apart, from the pod's first
/// instruction; prints `successes=`, `failures=` and `first_success=` (attempt number, 0 for
/// none). With `serve`, the pod also serves HTTP on PORT meanwhile.
fn connect_loop(target: &str, attempts: u32, pause: &str, serve: bool) -> String {
    let server = if serve { format!("/agnhost netexec --http-port={PORT} & ") } else { String::new() };
    format!(
        "{server}ok=0; bad=0; first=0; i=0; while [ $i -lt {attempts} ]; do i=$((i+1)); \
         if /agnhost connect --timeout=300ms {target}:{PORT} 2>/dev/null; then ok=$((ok+1)); [ $first = 0 ] && first=$i; else bad=$((bad+1)); fi; \
         sleep {pause}; done; echo successes=$ok; echo failures=$bad; echo first_success=$first"
    )
}

const POLICIES: &str = "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-isolated, namespace: NS}
spec:
  podSelector: {matchLabels: {role: isolated}}
  policyTypes: [Ingress, Egress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allowed-egress-to-target, namespace: NS}
spec:
  podSelector: {matchLabels: {role: allowed}}
  policyTypes: [Egress]
  egress:
  - to: [{podSelector: {matchLabels: {role: target}}}]
    ports: [{port: 8080}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: target-ingress, namespace: NS}
spec:
  podSelector: {matchLabels: {role: target}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchExpressions: [{key: role, operator: In, values: [allowed, control]}]}}]
    ports: [{port: 8080}]
";

/// A namespace with the target server and `policies` (YAML, `NS` standing for the
/// namespace; empty for none); deleted on drop.
struct Scene<'k> {
    kubectl: &'k Kubectl,
    ns: String,
    target_ip: String,
}

impl<'k> Scene<'k> {
    fn new(kubectl: &'k Kubectl, name: &str, policies: &str) -> Result<Self> {
        let ns = format!("pe-{name}-{}", std::process::id());
        kubectl.run(&["create", "namespace", &ns])?;
        let mut scene = Self { kubectl, ns, target_ip: String::new() };
        if !policies.trim().is_empty() {
            kubectl.apply(&policies.replace("NS", &scene.ns))?;
        }
        let target = pod_yaml(&scene.ns, "target", "target", &format!("exec /agnhost netexec --http-port={PORT}"))
            .replace("restartPolicy: Never", "restartPolicy: Always");
        kubectl.apply(&target)?;
        kubectl.run(&["-n", &scene.ns, "wait", "--for=condition=Ready", "pod/target", "--timeout=120s"])?;
        scene.target_ip = kubectl.pod_ip(&scene.ns, "target", Duration::from_secs(5))?;
        Ok(scene)
    }

    fn probe(&self, name: &str, role: &str, script: &str) -> Result<()> {
        self.kubectl.apply(&pod_yaml(&self.ns, name, role, script))
    }
}

impl Drop for Scene<'_> {
    fn drop(&mut self) {
        let _ = self.kubectl.run(&["delete", "namespace", &self.ns, "--wait=false"]);
    }
}

/// Pods are enforced from their first packet: an isolated pod's tight connect loop and a
/// peer's loop towards it get nothing through; an allowed pod and a pod no policy selects
/// connect on their first attempt (their identities are known to the target's ingress before
/// they run).
pub fn first_packet(kubectl: &Kubectl) -> Result<()> {
    let scene = Scene::new(kubectl, "first", POLICIES)?;
    let target = scene.target_ip.clone();
    scene.probe("isolated", "isolated", &connect_loop(&target, 60, "0", true))?;
    scene.probe("allowed", "allowed", &connect_loop(&target, 5, "0", false))?;
    scene.probe("control", "control", &connect_loop(&target, 5, "0", false))?;
    let isolated_ip = kubectl.pod_ip(&scene.ns, "isolated", Duration::from_secs(60))?;
    scene.probe("prober", "prober", &connect_loop(&isolated_ip, 60, "0", false))?;
    let wait = Duration::from_secs(180);
    let isolated = kubectl.probe_result(&scene.ns, "isolated", wait)?;
    let prober = kubectl.probe_result(&scene.ns, "prober", wait)?;
    let allowed = kubectl.probe_result(&scene.ns, "allowed", wait)?;
    let control = kubectl.probe_result(&scene.ns, "control", wait)?;
    println!("first packet: isolated out {isolated:?}; towards isolated {prober:?}; allowed {allowed:?}; control {control:?}");
    ensure!(count(&isolated, "successes")? == 0, "an isolated pod got {} connections out", count(&isolated, "successes")?);
    ensure!(count(&prober, "successes")? == 0, "{} connections reached an isolated pod", count(&prober, "successes")?);
    ensure!(count(&allowed, "first_success")? == 1, "the allowed pod's first connection failed: {allowed:?}");
    ensure!(count(&control, "first_success")? == 1, "the control pod's first connection failed: {control:?}");
    Ok(())
}

/// SIGKILLs the agent (kubelet restarts its container) while an allowed and a denied probe
/// loop run: no denied connection passes, no allowed one fails.
pub fn restart(kubectl: &Kubectl) -> Result<()> {
    let scene = Scene::new(kubectl, "restart", POLICIES)?;
    let target = scene.target_ip.clone();
    // 20 s of probes, one connection per 100 ms each.
    scene.probe("allowed", "allowed", &connect_loop(&target, 200, "0.1", false))?;
    scene.probe("isolated", "isolated", &connect_loop(&target, 200, "0.1", false))?;
    kubectl.run(&["-n", &scene.ns, "wait", "--for=condition=Ready", "pod/allowed", "pod/isolated", "--timeout=60s"])?;
    std::thread::sleep(Duration::from_secs(3));
    let before = agent_restarts(kubectl)?;
    let killed = Command::new("pkill").args(["-KILL", "-f", "^/usr/local/bin/policy-agent run"]).status()?;
    ensure!(killed.success(), "no agent process to kill");
    println!("restart: agent SIGKILLed (container restarts so far: {before})");
    let wait = Duration::from_secs(120);
    let allowed = kubectl.probe_result(&scene.ns, "allowed", wait)?;
    let isolated = kubectl.probe_result(&scene.ns, "isolated", wait)?;
    let after = agent_restarts(kubectl)?;
    println!("restart: allowed {allowed:?}; denied {isolated:?}; container restarts now {after}");
    ensure!(after > before, "the agent's container did not restart");
    ensure!(count(&allowed, "failures")? == 0, "{} allowed connections failed across the restart", count(&allowed, "failures")?);
    ensure!(count(&isolated, "successes")? == 0, "{} denied connections passed across the restart", count(&isolated, "successes")?);
    kubectl.run(&["-n", "policy-enforcer", "rollout", "status", "daemonset/policy-agent", "--timeout=120s"])?;
    Ok(())
}

/// An Admin-tier Deny of ingress to the scene's target from its `role: client` pods. `NAME`
/// and `NS` are substituted.
const ADMIN_DENY: &str = "
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: NAME}
spec:
  tier: Admin
  priority: 10
  subject:
    pods:
      namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: NS}}
      podSelector: {matchLabels: {role: target}}
  ingress:
  - name: no-clients
    action: Deny
    from:
    - pods:
        namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: NS}}
        podSelector: {matchLabels: {role: client}}
";

/// A cluster-scoped ClusterNetworkPolicy, deleted on drop (a failed check must not leave a
/// Deny behind for the next one).
struct ClusterPolicy<'k> {
    kubectl: &'k Kubectl,
    name: String,
}

impl Drop for ClusterPolicy<'_> {
    fn drop(&mut self) {
        let _ = self.kubectl.run(&["delete", "clusternetworkpolicy", &self.name, "--ignore-not-found"]);
    }
}

/// How long the checks give the agent to apply a ClusterNetworkPolicy change before probing
/// (it takes milliseconds; the probes cannot wait for it otherwise).
const SETTLE: Duration = Duration::from_secs(3);

/// A ClusterNetworkPolicy made through the real API server is enforced: with no
/// NetworkPolicy in the namespace a client reaches the target; an Admin Deny from clients
/// stops every connection of a client (and not of another pod) until it is deleted, after
/// which a client connects on its first attempt again.
pub fn cluster_policy(kubectl: &Kubectl) -> Result<()> {
    let scene = Scene::new(kubectl, "cnp", "")?;
    let target = scene.target_ip.clone();
    scene.probe("before", "client", &connect_loop(&target, 5, "0.2", false))?;
    let before = kubectl.probe_result(&scene.ns, "before", Duration::from_secs(120))?;
    ensure!(count(&before, "first_success")? == 1, "without any policy a client's first connection failed: {before:?}");

    let policy = ClusterPolicy { kubectl, name: scene.ns.clone() };
    kubectl.apply(&ADMIN_DENY.replace("NAME", &policy.name).replace("NS", &scene.ns))?;
    std::thread::sleep(SETTLE);
    scene.probe("denied", "client", &connect_loop(&target, 20, "0.1", false))?;
    scene.probe("other", "other", &connect_loop(&target, 5, "0.2", false))?;
    let denied = kubectl.probe_result(&scene.ns, "denied", Duration::from_secs(120))?;
    let other = kubectl.probe_result(&scene.ns, "other", Duration::from_secs(120))?;
    println!("cluster policy: before {before:?}; client under the Admin Deny {denied:?}; another pod {other:?}");
    ensure!(count(&denied, "successes")? == 0, "{} connections passed an Admin Deny", count(&denied, "successes")?);
    ensure!(count(&other, "first_success")? == 1, "a pod the Deny does not name was cut off: {other:?}");

    kubectl.run(&["delete", "clusternetworkpolicy", &policy.name])?;
    std::thread::sleep(SETTLE);
    scene.probe("after", "client", &connect_loop(&target, 5, "0.2", false))?;
    let after = kubectl.probe_result(&scene.ns, "after", Duration::from_secs(120))?;
    println!("cluster policy: after its deletion {after:?}");
    ensure!(count(&after, "first_success")? == 1, "the client is still denied after the policy's deletion: {after:?}");
    Ok(())
}

fn agent_restarts(kubectl: &Kubectl) -> Result<u64> {
    let out = kubectl.run(&[
        "-n",
        "policy-enforcer",
        "get",
        "pods",
        "-l",
        "app.kubernetes.io/name=policy-agent",
        "-o",
        "jsonpath={.items[0].status.containerStatuses[0].restartCount}",
    ])?;
    out.trim().parse().with_context(|| format!("restart count {out:?}"))
}
