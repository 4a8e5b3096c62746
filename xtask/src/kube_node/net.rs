//! The host's network for the node: the uplink guard, the node's address, forwarding, the
//! CNI configuration and plugin directory, bpffs.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

use super::{
    IPTABLES_CHAIN, NODE_IP, NODE_LINK, POD_CIDR, SERVICE_CIDR, WORK_DIR,
    host::{self, Entry, record, sh},
};

/// Pods, the node, Services: every address the node uses.
const TEST_RANGES: &[&str] = &["198.18.0.0/15", SERVICE_CIDR];
/// Where containerd looks for the conflist and the plugins (also where the DaemonSet's init
/// container installs ours).
pub const CNI_CONF_DIR: &str = "/etc/cni/net.d";
pub const CNI_BIN_DIR: &str = "/opt/cni/bin";
/// Debian's containernetworking-plugins.
const DEBIAN_CNI: &str = "/usr/lib/cni";
pub const CNI_CONFLIST: &str = "/etc/cni/net.d/10-policy-kube-node.conflist";
/// Sysctls kubelet (its kernel defaults) and kube-proxy (route_localnet, conntrack) set
/// themselves: saved before they start, restored by `down`.
const SET_BY_COMPONENTS: &[&str] = &[
    "net/ipv4/conf/all/route_localnet",
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "net/netfilter/nf_conntrack_max",
    "net/netfilter/nf_conntrack_tcp_timeout_established",
    "net/netfilter/nf_conntrack_tcp_timeout_close_wait",
    "net/bridge/bridge-nf-call-iptables",
];

pub fn setup() -> Result<()> {
    guard_uplink()?;
    node_address()?;
    host::set_sysctl("net/ipv4/ip_forward", "1")?;
    for key in SET_BY_COMPONENTS {
        host::save_sysctl(key)?;
    }
    cni()?;
    bpffs()
}

/// The default route's interface.
fn uplink() -> Result<Option<String>> {
    let routes = sh("ip", &["-4", "route", "show", "default"])?;
    Ok(routes.split_whitespace().skip_while(|w| *w != "dev").nth(1).map(str::to_owned))
}

/// DROP for the test ranges in and out of the uplink, and the uplink's side of the agent's
/// metrics port (the DaemonSet serves it on all addresses; here it is for the node only).
fn guard_uplink() -> Result<()> {
    record(Entry::Iptables)?;
    sh("iptables", &["-N", IPTABLES_CHAIN])?;
    for builtin in ["INPUT", "FORWARD", "OUTPUT"] {
        sh("iptables", &["-I", builtin, "1", "-j", IPTABLES_CHAIN])?;
    }
    let Some(uplink) = uplink()? else { return Ok(()) };
    let add = |args: &[&str]| -> Result<()> {
        let mut all = vec!["-A", IPTABLES_CHAIN];
        all.extend(args);
        all.extend(["-j", "DROP"]);
        sh("iptables", &all).map(drop)
    };
    for range in TEST_RANGES {
        add(&["-o", &uplink, "-d", range])?;
        add(&["-o", &uplink, "-s", range])?;
        add(&["-i", &uplink, "-d", range])?;
        add(&["-i", &uplink, "-s", range])?;
    }
    add(&["-i", &uplink, "-p", "tcp", "--dport", "9190"])?;
    eprintln!("kube-node: {} and {SERVICE_CIDR} kept off {uplink}", TEST_RANGES[0]);
    Ok(())
}

/// The node's address on a veth pair of its own (this kernel has no dummy interfaces);
/// unknown pod addresses go to a blackhole, Service addresses to the veth: a host process
/// connecting to a ClusterIP needs a route that does not fail before kube-proxy's DNAT in
/// OUTPUT rewrites the destination (a blackhole fails connect() at once); what is not
/// rewritten dies there (nothing answers ARP on the peer, which has no address).
fn node_address() -> Result<()> {
    record(Entry::Link(NODE_LINK.into()))?;
    let peer = format!("{NODE_LINK}p");
    sh("ip", &["link", "add", NODE_LINK, "type", "veth", "peer", "name", &peer])?;
    sh("ip", &["addr", "add", &format!("{NODE_IP}/32"), "dev", NODE_LINK])?;
    sh("ip", &["link", "set", &peer, "up"])?;
    sh("ip", &["link", "set", NODE_LINK, "up"])?;
    let blackhole = "blackhole 198.18.0.0/15";
    record(Entry::Route(blackhole.into()))?;
    sh("ip", &["route", "add", "blackhole", "198.18.0.0/15"])?;
    // The veth's routes go with it.
    sh("ip", &["route", "add", SERVICE_CIDR, "dev", NODE_LINK])?;
    Ok(())
}

/// A ptp + host-local conflist, alone in the conf directory (anything there is moved aside),
/// and the plugin directory with Debian's plugins.
fn cni() -> Result<()> {
    let saved = Path::new(WORK_DIR).join("cni-saved");
    std::fs::create_dir_all(&saved)?;
    host::create_dir(Path::new(CNI_CONF_DIR))?;
    for file in std::fs::read_dir(CNI_CONF_DIR)?.flatten() {
        let to = saved.join(file.file_name());
        record(Entry::Moved { from: file.path(), to: to.clone() })?;
        std::fs::rename(file.path(), &to).with_context(|| format!("move {} aside", file.path().display()))?;
    }
    record(Entry::File(CNI_CONFLIST.into()))?;
    std::fs::write(CNI_CONFLIST, conflist())?;
    host::create_dir(Path::new(CNI_BIN_DIR))?;
    // What the DaemonSet's init container and agent will create on the host.
    for made in [Path::new(CNI_BIN_DIR).join("policy-enforcer"), PathBuf::from("/run/policy-enforcer")] {
        if !made.exists() {
            record(if made.starts_with("/run") { Entry::Dir(made) } else { Entry::File(made) })?;
        }
    }
    for plugin in std::fs::read_dir(DEBIAN_CNI).with_context(|| format!("read {DEBIAN_CNI}"))?.flatten() {
        let link = Path::new(CNI_BIN_DIR).join(plugin.file_name());
        if !link.exists() {
            record(Entry::File(link.clone()))?;
            std::os::unix::fs::symlink(plugin.path(), &link)?;
        }
    }
    Ok(())
}

/// The pod network: each pod gets a veth whose host side has a /32 route to the pod. A
/// chained plugin is appended to `plugins` (the DaemonSet's init container does this).
pub fn conflist() -> String {
    let ipam = format!(
        r#"{{"type": "host-local", "ranges": [[{{"subnet": "{POD_CIDR}"}}]], "routes": [{{"dst": "0.0.0.0/0"}}], "dataDir": "{WORK_DIR}/cni-ipam"}}"#
    );
    format!(
        "{{\n  \"cniVersion\": \"0.4.0\",\n  \"name\": \"policy-kube-node\",\n  \"plugins\": [\n    {{\"type\": \"ptp\", \"ipMasq\": false, \"mtu\": 1500, \"ipam\": {ipam}}}\n  ]\n}}\n"
    )
}

/// The DaemonSet mounts the host's /sys/fs/bpf; systemd mounts a bpffs there on most hosts,
/// this machine has none. Shared, as systemd's mounts are: the DaemonSet's
/// `mountPropagation: HostToContainer` needs a shared or slave mount (containerd refuses a
/// private one).
fn bpffs() -> Result<()> {
    let mounted = std::fs::read_to_string("/proc/self/mounts")?.lines().any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"));
    if !mounted {
        record(Entry::Mount("/sys/fs/bpf".into()))?;
        sh("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"])?;
        sh("mount", &["--make-shared", "/sys/fs/bpf"])?;
    }
    Ok(())
}
