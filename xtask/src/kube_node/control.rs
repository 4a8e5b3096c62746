//! Starting the node's processes (each detached into its own process group, its output in
//! `WORK/logs/NAME.log`, its PID journaled) and waiting for them.

use std::{
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result};

use super::{
    API_PORT, CONTAINERD_SOCK, KUBECONFIG, NODE_IP, NODE_NAME, POD_CIDR, RUN_DIR, SERVICE_CIDR,
    host::{Entry, record},
    images, kubectl, kubectl_ok, net, wait_for, work,
};

/// Debian packages of the node's runtime, with a file each provides.
pub const PACKAGES: &[(&str, &str)] = &[
    ("containerd", "containerd"),
    ("runc", "runc"),
    ("containernetworking-plugins", "/usr/lib/cni/ptp"),
    ("conntrack", "conntrack"),
    ("socat", "socat"),
    ("busybox-static", "/bin/busybox"),
    ("umoci", "umoci"),
    ("skopeo", "skopeo"),
    ("iptables", "iptables"),
    ("etcd-server", "/usr/bin/etcd"),
    ("openssl", "openssl"),
];

/// Spawns `program` detached (it outlives this process; `down` stops it by PID).
fn spawn(name: &str, program: &Path, args: &[String]) -> Result<()> {
    let log = work("logs").join(format!("{name}.log"));
    let out = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0)
        .spawn()
        .with_context(|| format!("spawn {}", program.display()))?;
    let exe = std::fs::canonicalize(program)?;
    record(Entry::Pid { name: name.into(), pid: child.id(), exe })?;
    eprintln!("kube-node: started {name} (pid {}), log {}", child.id(), log.display());
    Ok(())
}

fn s(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| (*a).to_owned()).collect()
}

fn pki(name: &str) -> String {
    work("pki").join(name).display().to_string()
}

pub fn start_control_plane(bin: &Path) -> Result<()> {
    let data = work("etcd").display().to_string();
    spawn(
        "etcd",
        Path::new("/usr/bin/etcd"),
        &s(&[
            "--name=policy-node", &format!("--data-dir={data}"), "--listen-client-urls=http://127.0.0.1:23790",
            "--advertise-client-urls=http://127.0.0.1:23790", "--listen-peer-urls=http://127.0.0.1:23800",
            "--initial-advertise-peer-urls=http://127.0.0.1:23800", "--initial-cluster=policy-node=http://127.0.0.1:23800",
            "--logger=zap", "--log-level=warn",
        ]),
    )?;
    spawn("kube-apiserver", &bin.join("kube-apiserver"), &apiserver_args())?;
    wait_for("kube-apiserver /readyz", Duration::from_secs(90), || {
        Ok(kubectl(bin).args(["get", "--raw", "/readyz", "--request-timeout=2s"]).output()?.status.success())
    })?;
    let kubeconfig = format!("--kubeconfig={KUBECONFIG}");
    spawn(
        "kube-controller-manager",
        &bin.join("kube-controller-manager"),
        &s(&[
            &kubeconfig, "--leader-elect=false", "--port=0", "--secure-port=0", &format!("--service-account-private-key-file={}", pki("sa.key")),
            &format!("--root-ca-file={}", pki("ca.crt")), "--use-service-account-credentials=false", "--allocate-node-cidrs=false",
            &format!("--service-cluster-ip-range={SERVICE_CIDR}"), "--controllers=*,-nodeipam,-cloud-node-lifecycle",
        ]),
    )?;
    spawn("kube-scheduler", &bin.join("kube-scheduler"), &s(&[&kubeconfig, "--leader-elect=false", "--port=0", "--secure-port=0"]))
}

/// Loopback etcd, the node address, token authentication, RBAC and the Node authorizer; the
/// kubelet is reached at its InternalIP with a client certificate.
fn apiserver_args() -> Vec<String> {
    let mut args = s(&[
        "--etcd-servers=http://127.0.0.1:23790",
        &format!("--bind-address={NODE_IP}"),
        &format!("--advertise-address={NODE_IP}"),
        &format!("--secure-port={API_PORT}"),
        "--insecure-port=0",
        &format!("--service-cluster-ip-range={SERVICE_CIDR}"),
        &format!("--tls-cert-file={}", pki("apiserver.crt")),
        &format!("--tls-private-key-file={}", pki("apiserver.key")),
        &format!("--kubelet-client-certificate={}", pki("apiserver-kubelet-client.crt")),
        &format!("--kubelet-client-key={}", pki("apiserver-kubelet-client.key")),
        "--kubelet-preferred-address-types=InternalIP",
        &format!("--service-account-key-file={}", pki("sa.pub")),
        &format!("--service-account-signing-key-file={}", pki("sa.key")),
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        "--api-audiences=https://kubernetes.default.svc.cluster.local",
        &format!("--token-auth-file={}", pki("tokens.csv")),
        "--authorization-mode=Node,RBAC",
        "--allow-privileged=true",
        "--anonymous-auth=false",
        "--profiling=false",
    ]);
    args.push(format!("--cert-dir={}", work("pki").display()));
    args
}

/// containerd for kubelet: CRI with runc (cgroupfs), overlayfs, our CNI directories, the
/// pause image the e2e images are tagged next to.
pub fn start_containerd() -> Result<()> {
    let config = work("containerd.toml");
    std::fs::write(&config, containerd_config())?;
    spawn("containerd", Path::new("/usr/bin/containerd"), &["--config".into(), config.display().to_string()])?;
    wait_for("containerd", Duration::from_secs(30), || Ok(ctr(&["version"]).is_ok()))
}

/// `restrict_oom_score_adj`: root here lacks CAP_SYS_RESOURCE, so runc cannot lower a
/// container's oom_score_adj below its own and fails ("can't get final child's PID from
/// pipe"); with it, containerd never asks for less than its own score.
fn containerd_config() -> String {
    let root = work("containerd").display().to_string();
    format!(
        r#"version = 2
root = "{root}"
state = "{RUN_DIR}/containerd"
[grpc]
  address = "{CONTAINERD_SOCK}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{bin_dir}"
    conf_dir = "{conf_dir}"
"#,
        pause = images::PAUSE_IMAGE,
        bin_dir = net::CNI_BIN_DIR,
        conf_dir = net::CNI_CONF_DIR,
    )
}

/// `ctr` against our containerd, in kubelet's namespace.
pub fn ctr(args: &[&str]) -> Result<String> {
    let mut all = vec!["--address", CONTAINERD_SOCK, "--namespace", "k8s.io"];
    all.extend(args);
    super::host::sh("ctr", &all)
}

pub fn start_node(bin: &Path) -> Result<()> {
    for dir in ["/var/log/pods", "/var/log/containers", "/run/containerd", "/var/lib/kubelet/device-plugins"] {
        // kubelet (its device-plugin socket directory ignores --root-dir) and containerd's
        // runc shims hard-code these.
        super::host::create_dir(Path::new(dir))?;
    }
    let config = work("kubelet.yaml");
    std::fs::write(&config, kubelet_config())?;
    let kubeconfig = format!("--kubeconfig={KUBECONFIG}");
    spawn(
        "kubelet",
        &bin.join("kubelet"),
        &s(&[
            &format!("--config={}", config.display()), &kubeconfig, "--container-runtime=remote",
            &format!("--container-runtime-endpoint=unix://{CONTAINERD_SOCK}"), &format!("--hostname-override={NODE_NAME}"),
            &format!("--node-ip={NODE_IP}"), &format!("--root-dir={}", work("kubelet").display()),
            &format!("--cert-dir={}", work("kubelet-pki").display()), "--v=1",
        ]),
    )?;
    spawn(
        "kube-proxy",
        &bin.join("kube-proxy"),
        &s(&[
            &kubeconfig, "--proxy-mode=iptables", &format!("--cluster-cidr={POD_CIDR}"), &format!("--hostname-override={NODE_NAME}"),
            &format!("--bind-address={NODE_IP}"), "--healthz-bind-address=127.0.0.1:10256", "--metrics-bind-address=127.0.0.1:10249",
            "--conntrack-max-per-core=0", "--conntrack-tcp-timeout-established=0", "--conntrack-tcp-timeout-close-wait=0",
            "--oom-score-adj=0",
        ]),
    )
}

/// Kubelet on the node address (apiserver → kubelet with the client certificate, no anonymous
/// access), cgroupfs like containerd, no swap check, no disk-pressure evictions of test pods,
/// no image garbage collection (the node is offline: an image it collects on a full disk
/// cannot be pulled back), no oom_score_adj below ours (root here lacks CAP_SYS_RESOURCE).
fn kubelet_config() -> String {
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {NODE_IP}
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
cgroupDriver: cgroupfs
failSwapOn: false
oomScoreAdj: 0
clusterDomain: cluster.local
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: false
  x509:
    clientCAFile: {ca}
authorization:
  mode: AlwaysAllow
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: "1Mi"
  nodefs.available: "1%"
  imagefs.available: "1%"
  nodefs.inodesFree: "1%"
serializeImagePulls: false
"#,
        ca = pki("ca.crt")
    )
}

pub fn wait_node_ready(bin: &Path) -> Result<()> {
    wait_for("node Ready", Duration::from_secs(180), || {
        let out = kubectl(bin)
            .args(["get", "node", NODE_NAME, "-o", r#"jsonpath={.status.conditions[?(@.type=="Ready")].status}"#])
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).trim() == "True")
    })?;
    // Pods cannot be created before the controller-manager gives `default` its ServiceAccount.
    wait_for("ServiceAccount default/default", Duration::from_secs(60), || {
        Ok(kubectl(bin).args(["get", "serviceaccount", "default", "-n", "default"]).output()?.status.success())
    })?;
    eprintln!("kube-node: node {NODE_NAME} Ready");
    Ok(())
}

/// An agnhost pod that must run and answer on its pod IP (from the host, through its veth).
pub fn smoke_test(bin: &Path) -> Result<()> {
    let manifest = work("smoke-pod.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: kube-node-smoke\n  namespace: default\nspec:\n  containers:\n  - name: agnhost\n    \
             image: {}\n    args: [\"netexec\", \"--http-port=8080\"]\n",
            images::AGNHOST_IMAGE
        ),
    )?;
    kubectl_ok(bin, &["apply", "-f", &manifest.display().to_string()])?;
    let result = reach_smoke_pod(bin);
    let _ = kubectl_ok(bin, &["delete", "pod", "kube-node-smoke", "-n", "default", "--wait=false"]);
    result
}

fn reach_smoke_pod(bin: &Path) -> Result<()> {
    let mut ip = String::new();
    wait_for("pod kube-node-smoke Running", Duration::from_secs(120), || {
        let out = kubectl_ok(bin, &["get", "pod", "kube-node-smoke", "-n", "default", "-o", "jsonpath={.status.phase} {.status.podIP}"])?;
        let mut words = out.split_whitespace();
        let running = words.next() == Some("Running");
        ip = words.next().unwrap_or_default().to_owned();
        Ok(running && !ip.is_empty())
    })?;
    wait_for(&format!("agnhost answering on {ip}:8080"), Duration::from_secs(30), || {
        Ok(http_get(&ip, 8080, "/hostname").is_ok_and(|body| body.contains("kube-node-smoke")))
    })?;
    eprintln!("kube-node: test pod answered on {ip}:8080");
    Ok(())
}

/// A bounded HTTP/1.0 GET; returns the whole response.
pub fn http_get(ip: &str, port: u16, path: &str) -> Result<String> {
    use std::io::{Read as _, Write as _};
    let addr: std::net::SocketAddr = format!("{ip}:{port}").parse()?;
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(stream, "GET {path} HTTP/1.0\r\n\r\n")?;
    let mut body = String::new();
    stream.read_to_string(&mut body)?;
    Ok(body)
}
