//! A small kube-proxy (iptables mode) for the simulated nodes: Services written as the nat
//! rules kube-proxy would write, installed with `iptables-restore` (nf_tables or legacy,
//! whichever the machine's `iptables` is) into a node namespace, where they go with it.
//!
//! The layout follows kube-proxy: PREROUTING and OUTPUT jump to KUBE-SERVICES; per Service
//! a KUBE-SVC chain picks a backend with `-m statistic --mode random --probability 1/k`; per
//! backend a KUBE-SEP chain DNATs to it. Masquerade (KUBE-MARK-MASQ, then MASQUERADE in
//! KUBE-POSTROUTING) only for hairpin (the source is the chosen backend) and for sources
//! outside the pod range that reach a ClusterIP; NodePorts (on every local address, as
//! `--nodeport-addresses` unset) DNAT without masquerade, so the backend sees the real
//! client (what `externalTrafficPolicy: Local` gives, without its local-only backends).

use std::{
    fmt::Write as _,
    io::Write as _,
    net::IpAddr,
    process::{Command, Stdio},
};

use super::{Netns, matrix::Protocol};

/// A backend: a pod address and the Service's targetPort on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    pub ip: IpAddr,
    pub port: u16,
}

/// A Service port as kube-proxy sees it (one port per Service here).
#[derive(Clone, Debug)]
pub struct Service {
    /// "namespace/name", for the rule comments.
    pub name: String,
    pub cluster_ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub backends: Vec<Backend>,
    pub node_port: Option<u16>,
}

fn proto(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

fn host_prefix(ip: IpAddr) -> String {
    if ip.is_ipv4() { format!("{ip}/32") } else { format!("{ip}/128") }
}

fn dnat_target(backend: &Backend) -> String {
    match backend.ip {
        IpAddr::V4(ip) => format!("{ip}:{}", backend.port),
        IpAddr::V6(ip) => format!("[{ip}]:{}", backend.port),
    }
}

/// The `iptables-restore` input for the nat table of one family: the Services of that family
/// (by ClusterIP), with `pod_cidr` as kube-proxy's `--cluster-cidr`.
pub fn nat_rules(services: &[Service], v6: bool, pod_cidr: &str) -> String {
    let services: Vec<&Service> = services.iter().filter(|s| s.cluster_ip.is_ipv6() == v6).collect();
    let mut chains = vec!["KUBE-SERVICES".to_owned(), "KUBE-NODEPORTS".into(), "KUBE-POSTROUTING".into(), "KUBE-MARK-MASQ".into()];
    let mut rules = vec![
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES".to_owned(),
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES".into(),
        "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING".into(),
        "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000".into(),
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN".into(),
        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000".into(),
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE".into(),
    ];
    for (i, service) in services.iter().enumerate() {
        service_rules(i, service, pod_cidr, &mut chains, &mut rules);
    }
    // Last, as kube-proxy: anything else addressed to this node goes to the NodePorts.
    rules.push("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS".into());
    let mut out = String::from("*nat\n");
    for chain in &chains {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    for rule in &rules {
        let _ = writeln!(out, "{rule}");
    }
    out.push_str("COMMIT\n");
    out
}

/// The chains and rules of Service number `i`.
fn service_rules(i: usize, service: &Service, pod_cidr: &str, chains: &mut Vec<String>, rules: &mut Vec<String>) {
    let (p, name, svc) = (proto(service.protocol), &service.name, format!("KUBE-SVC-{i}"));
    let cip = host_prefix(service.cluster_ip);
    let port = service.port;
    chains.push(svc.clone());
    rules.push(format!("-A KUBE-SERVICES -d {cip} -p {p} -m {p} --dport {port} -m comment --comment \"{name} cluster IP\" -j {svc}"));
    rules.push(format!("-A {svc} ! -s {pod_cidr} -d {cip} -p {p} -m {p} --dport {port} -m comment --comment \"{name} cluster IP\" -j KUBE-MARK-MASQ"));
    if let Some(node_port) = service.node_port {
        rules.push(format!("-A KUBE-NODEPORTS -p {p} -m {p} --dport {node_port} -m comment --comment \"{name}\" -j {svc}"));
    }
    let n = service.backends.len();
    for (j, backend) in service.backends.iter().enumerate() {
        let sep = format!("KUBE-SEP-{i}-{j}");
        chains.push(sep.clone());
        let comment = format!("-m comment --comment \"{name} -> {}\"", dnat_target(backend));
        // Backend k of n is taken with probability 1/(n-k) of what is left: uniform overall.
        let pick = if j + 1 < n { format!("-m statistic --mode random --probability {:.10} ", 1.0 / (n - j) as f64) } else { String::new() };
        rules.push(format!("-A {svc} {comment} {pick}-j {sep}"));
        rules.push(format!("-A {sep} -s {} {comment} -j KUBE-MARK-MASQ", host_prefix(backend.ip)));
        rules.push(format!("-A {sep} -p {p} {comment} -m {p} -j DNAT --to-destination {}", dnat_target(backend)));
    }
    if n == 0 {
        // kube-proxy rejects connections to a Service without endpoints.
        rules.push(format!("-A {svc} -m comment --comment \"{name} has no endpoints\" -j DROP"));
    }
}

/// Installs `services` in `ns` (replacing its whole nat table, both families): what
/// kube-proxy does on every node. An empty list leaves only the base chains.
pub fn install(ns: &Netns, services: &[Service], pod_cidr_v4: &str, pod_cidr_v6: &str) {
    restore(ns, "iptables-restore", &nat_rules(services, false, pod_cidr_v4));
    restore(ns, "ip6tables-restore", &nat_rules(services, true, pod_cidr_v6));
}

fn restore(ns: &Netns, tool: &str, rules: &str) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name, tool, "-w", "5"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {tool}: {e}"));
    child.stdin.take().expect("piped stdin").write_all(rules.as_bytes()).unwrap_or_else(|e| panic!("write to {tool}: {e}"));
    let out = child.wait_with_output().unwrap_or_else(|e| panic!("wait for {tool}: {e}"));
    assert!(out.status.success(), "{tool} in {} failed: {}\n{rules}", ns.name, String::from_utf8_lossy(&out.stderr));
}

/// The backend a flow from `client`:`sport` was translated to, from the conntrack table of
/// `node` (the client's node): the reply tuple's source. None if no flow is tracked there
/// (the packet was dropped before the nat hook, or never sent).
pub fn conntrack_backend(node: &Netns, protocol: Protocol, client: IpAddr, sport: u16) -> Option<IpAddr> {
    let family = if client.is_ipv6() { "ipv6" } else { "ipv4" };
    let out = Command::new("ip")
        .args(["netns", "exec", &node.name, "conntrack", "-L", "-f", family, "-p", proto(protocol), "-s", &client.to_string(), "--sport", &sport.to_string()])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // `tcp 6 117 SYN_SENT src=C dst=VIP sport=S dport=P [UNREPLIED] src=B dst=C ...`: the
    // second src= is where the reply comes from, the backend.
    let line = text.lines().next()?;
    line.split_whitespace().filter_map(|f| f.strip_prefix("src=")).nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_follow_kube_proxy() {
        let service = Service {
            name: "y/web".into(),
            cluster_ip: "198.19.0.10".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
            backends: vec![Backend { ip: "198.18.10.33".parse().unwrap(), port: 80 }, Backend { ip: "198.18.10.34".parse().unwrap(), port: 8080 }],
            node_port: Some(30080),
        };
        let rules = nat_rules(&[service], false, "198.18.0.0/17");
        assert!(rules.contains("-A KUBE-SVC-0 ! -s 198.18.0.0/17 -d 198.19.0.10/32 -p tcp -m tcp --dport 80"), "{rules}");
        assert!(rules.contains("-m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-0-0"), "{rules}");
        assert!(rules.contains("-A KUBE-SEP-0-1 -s 198.18.10.34/32"), "{rules}");
        assert!(rules.contains("-j DNAT --to-destination 198.18.10.34:8080"), "{rules}");
        assert!(rules.contains("-A KUBE-NODEPORTS -p tcp -m tcp --dport 30080"), "{rules}");
        assert!(rules.trim_end().ends_with("COMMIT"));
        assert!(!nat_rules(&[], true, "2001:2::/52").contains("KUBE-SVC"));
    }
}
