//! `cargo xtask kube-node up|down|status|deploy|e2e`: a real single-node Kubernetes v1.20.2
//! cluster on this machine, offline, from the binaries `cargo xtask kube` builds; the agent
//! deployed on it with `kubectl apply -f manifests/install/`; Kubernetes' own NetworkPolicy
//! e2e suite run against it.
//!
//! The node: containerd (Debian's, run as a plain process with its socket and state under
//! [`RUN_DIR`]) with runc and the ptp CNI plugin, etcd, kube-apiserver, kube-controller-manager,
//! kube-scheduler, kubelet and kube-proxy in iptables mode, all started by `up` and stopped
//! by the PIDs it recorded. Everything `up` changes on the host is journaled first
//! ([`STATE_FILE`], see `host`) and `down` undoes exactly that, also from a fresh process
//! after a killed `up`; `up` begins with a `down`.
//!
//! Addresses (all in the test ranges): the node's own address [`NODE_IP`] sits on a host-only
//! veth. It cannot be loopback: the API server publishes its address as the endpoint of
//! the in-cluster `kubernetes` Service (what the DaemonSet's agent connects to), and Endpoints
//! refuse loopback addresses; kubelet refuses a loopback node IP too. kube-apiserver and
//! kubelet listen there, everything else on 127.0.0.1 only; a DROP chain keeps the uplink
//! from reaching any of it, and nothing for the test ranges leaves through the uplink.

mod control;
mod deploy;
mod down;
mod e2e;
mod host;
mod images;
mod net;
mod pki;

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

pub use deploy::deploy;
pub use down::down;
pub use e2e::{E2eOptions, e2e};

/// Everything `up` keeps on disk: certificates, etcd's data, containerd's root, kubelet's
/// root, the logs, the images it builds.
pub const WORK_DIR: &str = "/var/lib/policy-kube-node";
/// containerd's socket and state (shim sockets, the containers' rootfs mounts).
pub const RUN_DIR: &str = "/run/policy-kube-node";
/// The journal of what `up` changed (beside the work directory, which it also lists).
pub const STATE_FILE: &str = "/var/lib/policy-kube-node.state";
pub const CONTAINERD_SOCK: &str = "/run/policy-kube-node/containerd.sock";
/// The filter chain that keeps the test ranges off the uplink (jumped to from INPUT, FORWARD
/// and OUTPUT).
pub const IPTABLES_CHAIN: &str = "POLICY-KUBE-NODE";
pub const NODE_NAME: &str = "policy-node";
/// The node's address, on the veth [`NODE_LINK`] (its peer has none).
pub const NODE_IP: &str = "198.18.0.1";
pub const NODE_LINK: &str = "polnode0";
/// Pods' addresses (host-local IPAM of the ptp plugin); kube-proxy's `--cluster-cidr`.
pub const POD_CIDR: &str = "198.18.64.0/24";
/// Service ClusterIPs; the agent's `--service-cidr`.
pub const SERVICE_CIDR: &str = "198.19.0.0/24";
pub const API_PORT: u16 = 6443;
/// The kubeconfig `up` writes for the user (admin).
pub const KUBECONFIG: &str = "/var/lib/policy-kube-node/admin.kubeconfig";

pub fn work(name: &str) -> PathBuf {
    Path::new(WORK_DIR).join(name)
}

/// Brings the node up: cleans what a previous run left, then host setup, control plane,
/// node, images; waits until the node is Ready and a pod answers on its pod IP.
pub fn up() -> Result<()> {
    crate::require_root("kube-node")?;
    let started = std::time::Instant::now();
    let bin = crate::kube::ensure()?;
    crate::setup::ensure_debian_packages(control::PACKAGES)?;
    down()?;
    host::create_dir(Path::new(WORK_DIR))?;
    host::create_dir(Path::new(RUN_DIR))?;
    for dir in ["logs", "images"] {
        std::fs::create_dir_all(work(dir))?;
    }
    let result = bring_up(&bin);
    if let Err(e) = &result {
        eprintln!("kube-node: up failed: {e:#}\nkube-node: logs in {}; `cargo xtask kube-node down` cleans up", work("logs").display());
        return result;
    }
    eprintln!("kube-node: up in {:.0?}. Try:\n  KUBECONFIG={KUBECONFIG} {} get pods -A", started.elapsed(), bin.join("kubectl").display());
    Ok(())
}

fn bring_up(bin: &Path) -> Result<()> {
    net::setup()?;
    pki::generate()?;
    control::start_control_plane(bin)?;
    control::start_containerd()?;
    images::import_e2e_images(bin)?;
    control::start_node(bin)?;
    control::wait_node_ready(bin)?;
    control::smoke_test(bin)
}

/// `kubectl` as the admin of the node's cluster.
pub fn kubectl(bin: &Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(bin.join("kubectl"));
    cmd.arg("--kubeconfig").arg(KUBECONFIG);
    cmd
}

/// Runs kubectl and returns its stdout, failing with its stderr.
pub fn kubectl_ok(bin: &Path, args: &[&str]) -> Result<String> {
    let out = kubectl(bin).args(args).output().context("spawn kubectl")?;
    anyhow::ensure!(out.status.success(), "kubectl {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What runs (from the journal) and the cluster's nodes and pods.
pub fn status() -> Result<()> {
    let entries = host::journal();
    if entries.is_empty() {
        println!("kube-node: not up ({STATE_FILE} does not exist)");
        return Ok(());
    }
    for entry in &entries {
        if let host::Entry::Pid { name, pid, exe } = entry {
            let state = if host::is_ours(*pid, exe) { "running" } else { "NOT RUNNING" };
            println!("{name:<24} pid {pid:<8} {state}");
        }
    }
    let bin = crate::kube::cache_dir().join("bin");
    let out = kubectl(&bin).args(["get", "nodes,pods", "-A", "-o", "wide"]).output().context("spawn kubectl")?;
    print!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("KUBECONFIG={KUBECONFIG} {} get pods -A", bin.join("kubectl").display());
    Ok(())
}

/// Polls `check` every 500 ms until it returns true or `timeout` passes.
pub fn wait_for(what: &str, timeout: std::time::Duration, mut check: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let last = check();
        if matches!(last, Ok(true)) {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            let why = last.err().map(|e| format!(": {e:#}")).unwrap_or_default();
            anyhow::bail!("{what}: not within {timeout:?}{why}");
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

/// `POLICY_SKIP_REAL_NODE=1` leaves the real-node step out of `cargo xtask test`.
pub const SKIP_ENV: &str = "POLICY_SKIP_REAL_NODE";

/// `cargo xtask test`'s real-node step: up, deploy, the upstream suite, and down whatever
/// happened; fails if any case failed. Prints each phase's time.
/// `kube-node check`: pods enforced from their first packet, a ClusterNetworkPolicy made
/// through the API server enforced and then lifted, and no verdict changed while kubelet
/// restarts a SIGKILLed agent (the node up, the agent deployed).
pub fn checks() -> Result<()> {
    let kubectl = crate::node_checks::Kubectl { binary: crate::kube::cache_dir().join("bin/kubectl"), kubeconfig: KUBECONFIG.into() };
    crate::node_checks::first_packet(&kubectl)?;
    crate::node_checks::cluster_policy(&kubectl)?;
    crate::node_checks::restart(&kubectl)
}

pub fn real_node_suite() -> Result<()> {
    let phase = |name: &str, started: std::time::Instant| eprintln!("kube-node: {name} took {:.0?}", started.elapsed());
    let started = std::time::Instant::now();
    let result = (|| {
        let t = std::time::Instant::now();
        up()?;
        phase("up", t);
        let t = std::time::Instant::now();
        deploy()?;
        phase("deploy", t);
        let t = std::time::Instant::now();
        let outcome = e2e(&E2eOptions { nodes: 4, label: "test".into(), focus: None })?;
        phase("the NetworkPolicy suite", t);
        let t = std::time::Instant::now();
        let checks = checks();
        phase("the first-packet, ClusterNetworkPolicy and restart checks", t);
        anyhow::ensure!(outcome.failed == 0 && outcome.passed > 0, "upstream NetworkPolicy suite: {} passed, {} failed", outcome.passed, outcome.failed);
        checks
    })();
    let t = std::time::Instant::now();
    let cleaned = down();
    phase("down", t);
    phase("the real-node step", started);
    result.and(cleaned)
}
