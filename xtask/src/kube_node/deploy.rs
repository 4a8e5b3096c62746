//! `cargo xtask kube-node deploy`: the agent as operators run it. Its image is assembled from
//! the release binary (manifests/install/Dockerfile needs a registry for its base images) and
//! imported into containerd under the DaemonSet's name; then `kubectl apply -f` of
//! manifests/install/, with one documented substitution: the DaemonSet's `--service-cidr`
//! example value becomes this node's Service range. The ClusterNetworkPolicy CRD is applied
//! and Established first, so the agent starts with ClusterNetworkPolicies served (it would
//! pick them up later anyway, within its watch backoff).

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use super::{NODE_NAME, SERVICE_CIDR, images, kubectl_ok, wait_for, work};

/// The value manifests/install/30-daemonset.yaml carries (kubeadm's default Service range);
/// operators set their cluster's.
const MANIFEST_SERVICE_CIDR: &str = "--service-cidr=10.96.0.0/12";
const NAMESPACE: &str = "policy-enforcer";
/// manifests/install/'s CRD, and the name it defines.
const CRD_FILE: &str = "05-crd-clusternetworkpolicies.yaml";
const CRD: &str = "crd/clusternetworkpolicies.policy.networking.k8s.io";

pub fn deploy() -> Result<()> {
    crate::require_root("kube-node deploy")?;
    let started = std::time::Instant::now();
    let bin = crate::kube::cache_dir().join("bin");
    let agent = build_release_agent()?;
    images::import_agent_image(&agent)?;
    let manifests = substituted_manifests()?;
    let existed = kubectl_ok(&bin, &["get", "daemonset/policy-agent", "-n", NAMESPACE]).is_ok();
    apply_crd(&bin, &manifests)?;
    kubectl_ok(&bin, &["apply", "-f", &manifests.display().to_string()])?;
    if existed {
        // A new image under the same tag: make the DaemonSet take it.
        kubectl_ok(&bin, &["rollout", "restart", "daemonset/policy-agent", "-n", NAMESPACE])?;
    }
    kubectl_ok(&bin, &["rollout", "status", "daemonset/policy-agent", "-n", NAMESPACE, "--timeout=180s"])
        .context("the agent's DaemonSet did not become ready (kubectl -n policy-enforcer describe pods)")?;
    let status = wait_enforcing(&bin)?;
    eprintln!("kube-node: agent deployed and enforcing in {:.0?}:\n{status}", started.elapsed());
    Ok(())
}

/// Applies the CRD alone and waits until the API server serves its kind.
fn apply_crd(bin: &Path, manifests: &Path) -> Result<()> {
    let file = manifests.join(CRD_FILE);
    anyhow::ensure!(file.is_file(), "{} is missing", file.display());
    kubectl_ok(bin, &["apply", "-f", &file.display().to_string()])?;
    kubectl_ok(bin, &["wait", "--for=condition=Established", CRD, "--timeout=60s"]).context("the ClusterNetworkPolicy CRD was not Established")?;
    Ok(())
}

/// `cargo build --release -p policy-agent`; the binary in `$CARGO_TARGET_DIR` (else target/).
fn build_release_agent() -> Result<PathBuf> {
    crate::setup::run()?;
    crate::run(crate::cargo().args(["build", "--release", "--package", "policy-agent", "--bin", "policy-agent"]))?;
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| crate::workspace_root().join("target"), PathBuf::from);
    Ok(target.join("release/policy-agent"))
}

/// manifests/install/*.yaml copied to the work directory with this node's `--service-cidr`.
fn substituted_manifests() -> Result<PathBuf> {
    let dir = work("manifests");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let source = crate::workspace_root().join("manifests/install");
    for file in std::fs::read_dir(&source)?.flatten().filter(|f| f.path().extension().is_some_and(|e| e == "yaml")) {
        let text = std::fs::read_to_string(file.path())?;
        std::fs::write(dir.join(file.file_name()), text.replace(MANIFEST_SERVICE_CIDR, &format!("--service-cidr={SERVICE_CIDR}")))?;
    }
    Ok(dir)
}

/// Until the agent's own `policy-agent status`, inside its container, answers.
fn wait_enforcing(bin: &Path) -> Result<String> {
    let pod = kubectl_ok(bin, &["get", "pods", "-n", NAMESPACE, "-l", "app.kubernetes.io/name=policy-agent", "-o", "jsonpath={.items[0].metadata.name}"])?;
    if pod.is_empty() {
        bail!("no policy-agent pod on {NODE_NAME}");
    }
    let mut status = String::new();
    wait_for("policy-agent status in the DaemonSet pod", Duration::from_secs(60), || {
        status = kubectl_ok(bin, &["exec", "-n", NAMESPACE, &pod, "--", "/usr/local/bin/policy-agent", "status"])?;
        Ok(!status.is_empty())
    })?;
    Ok(status)
}
