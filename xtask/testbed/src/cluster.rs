//! Simulated nodes routed to each other: one or two node namespaces (each a `Node` with its
//! pods), joined by a veth link between the node namespaces, with a /32 and /128 route on
//! each node for every pod of the other (as a routed CNI with BGP or static routes sets up),
//! and optional "outside world" namespaces attached to a node. Everything lives in the
//! per-run namespaces and goes with them; forwarding is switched on in the node namespaces
//! only (never the host's).
//!
//! Addresses: pods from `POD_CIDR_V4`/`POD_CIDR_V6` (chosen by the caller), the node link
//! 198.18.255.0/30 and 2001:2:0:ff00::/126 (each node's InternalIP), outside worlds from
//! 198.18.200.0/24 and 2001:2:0:c800::/64 upwards.

use std::net::{Ipv4Addr, Ipv6Addr};

use super::{NODE_V4, NODE_V6, Netns, Node, PodNet, run_prefix};

/// The pod range of the harness (kube-proxy's `--cluster-cidr`): everything else in
/// 198.18.0.0/15 (node links, outside worlds) is not a pod.
pub const POD_CIDR_V4: &str = "198.18.0.0/17";
pub const POD_CIDR_V6: &str = "2001:2::/52";

/// A node's name and InternalIPs (the addresses other nodes route its pods through).
#[derive(Clone, Debug)]
pub struct NodeAddrs {
    pub name: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
}

/// One or two routed nodes. Node `i` is named `node-{i+1}`.
pub struct Nodes {
    pub nodes: Vec<Node>,
    pub addrs: Vec<NodeAddrs>,
    /// The link's interface in every node namespace (same name on both ends), if two nodes.
    pub link_if: Option<String>,
    outside: Vec<Outside>,
}

/// A namespace that plays the world outside the cluster, attached to one node.
pub struct Outside {
    pub ns: Netns,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    /// The attached node's address on the outside link (the outside's gateway).
    pub gateway_v4: Ipv4Addr,
    pub gateway_v6: Ipv6Addr,
}

fn link_v4(node: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 255, node as u8 + 1)
}

fn link_v6(node: usize) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 2, 0, 0xff00, 0, 0, 0, node as u16 + 1)
}

fn link_mac(node: usize) -> String {
    format!("02:cc:00:00:00:{:02x}", node + 1)
}

impl Nodes {
    /// `count` (1 or 2) nodes, namespaces `<prefix>-<suffix><i>`. One node has no link: its
    /// InternalIPs are the pods' gateway addresses (`NODE_V4`, `NODE_V6`).
    pub fn new(suffix: &str, count: usize) -> Self {
        assert!((1..=2).contains(&count), "Nodes: 1 or 2 nodes");
        let nodes: Vec<Node> = (1..=count).map(|i| Node::new(&format!("{suffix}{i}"))).collect();
        let addrs = (0..count)
            .map(|i| {
                let (ipv4, ipv6) = if count == 1 { (NODE_V4, NODE_V6) } else { (link_v4(i), link_v6(i)) };
                NodeAddrs { name: format!("node-{}", i + 1), ipv4, ipv6 }
            })
            .collect();
        let mut set = Self { nodes, addrs, link_if: None, outside: Vec::new() };
        if count == 2 {
            set.link();
        }
        set
    }

    /// The veth between the two node namespaces, with fixed MACs and permanent neighbours
    /// (no link-local addresses, as on the pod links).
    fn link(&mut self) {
        let name = format!("{}nl", run_prefix());
        let peer = format!("{name}p");
        let (n1, n2) = (&self.nodes[0].ns, &self.nodes[1].ns);
        n1.exec(&["ip", "link", "add", &name, "address", &link_mac(0), "type", "veth", "peer", "name", &peer, "address", &link_mac(1)]);
        n1.exec(&["ip", "link", "set", &peer, "netns", &n2.name]);
        n2.exec(&["ip", "link", "set", &peer, "name", &name]);
        for (i, ns) in [n1, n2].into_iter().enumerate() {
            let other = 1 - i;
            ns.exec(&["sysctl", "-qw", &format!("net.ipv6.conf.{name}.addr_gen_mode=1")]);
            ns.exec(&["ip", "addr", "add", &format!("{}/30", link_v4(i)), "dev", &name]);
            ns.exec(&["ip", "-6", "addr", "add", &format!("{}/126", link_v6(i)), "dev", &name, "nodad"]);
            ns.exec(&["ip", "link", "set", &name, "up"]);
            for addr in [link_v4(other).to_string(), link_v6(other).to_string()] {
                ns.exec(&["ip", "neigh", "replace", &addr, "lladdr", &link_mac(other), "dev", &name, "nud", "permanent"]);
            }
        }
        self.link_if = Some(name);
    }

    /// Adds pod `short` on node `node`, routed from the other node through the link.
    pub fn add_pod(&mut self, node: usize, short: &str, ipv4: Ipv4Addr, ipv6: Ipv6Addr) -> &PodNet {
        self.nodes[node].add_pod(short, ipv4, ipv6);
        self.route_elsewhere(node, &[ipv4.to_string() + "/32", ipv6.to_string() + "/128"], true);
        self.nodes[node].pod(short)
    }

    /// Removes pod `short` (its namespace and veth) and the other node's routes to it.
    pub fn remove_pod(&mut self, short: &str) {
        let node = self.node_of(short).unwrap_or_else(|| panic!("no pod {short}"));
        let pod = self.nodes[node].pod(short);
        let prefixes = [pod.ipv4.to_string() + "/32", pod.ipv6.to_string() + "/128"];
        let host_if = pod.host_if.clone();
        self.nodes[node].pods.retain(|p| p.host_if != host_if);
        self.route_elsewhere(node, &prefixes, false);
    }

    /// Adds (or deletes) routes to `prefixes`, which are on `node`, on every other node.
    fn route_elsewhere(&self, node: usize, prefixes: &[String], add: bool) {
        let Some(link) = &self.link_if else { return };
        for other in self.nodes.iter().enumerate().filter(|(i, _)| *i != node).map(|(_, n)| n) {
            for prefix in prefixes {
                let (family, via) = if prefix.contains(':') { ("-6", link_v6(node).to_string()) } else { ("-4", link_v4(node).to_string()) };
                if add {
                    other.ns.exec(&["ip", family, "route", "replace", prefix, "via", &via, "dev", link]);
                } else {
                    let _ = std::process::Command::new("ip").args(["netns", "exec", &other.ns.name, "ip", family, "route", "del", prefix]).output();
                }
            }
        }
    }

    /// Which node pod `short` is on.
    pub fn node_of(&self, short: &str) -> Option<usize> {
        let host_if = format!("{}{short}", run_prefix());
        self.nodes.iter().position(|n| n.pods.iter().any(|p| p.host_if == host_if))
    }

    pub fn pod(&self, short: &str) -> &PodNet {
        let node = self.node_of(short).unwrap_or_else(|| panic!("no pod {short}"));
        self.nodes[node].pod(short)
    }

    /// A namespace `<prefix>-<suffix>` outside the cluster, attached to `node` by a veth
    /// (node side `<prefix>ow<k>`), the k-th one getting 198.18.(200+k).2/24 and
    /// 2001:2:0:c8kk::2/64; every other node routes that range through `node`.
    pub fn add_outside(&mut self, node: usize, suffix: &str) -> &Outside {
        let k = self.outside.len();
        let ns = Netns::new(suffix);
        let host_if = format!("{}ow{k}", run_prefix());
        let (gateway_v4, ipv4) = (Ipv4Addr::new(198, 18, 200 + k as u8, 1), Ipv4Addr::new(198, 18, 200 + k as u8, 2));
        let (gateway_v6, ipv6) = (Ipv6Addr::new(0x2001, 2, 0, 0xc800 + k as u16, 0, 0, 0, 1), Ipv6Addr::new(0x2001, 2, 0, 0xc800 + k as u16, 0, 0, 0, 2));
        let (host_mac, outside_mac) = ("02:dd:00:00:00:01", "02:dd:00:00:00:02");
        let n = &self.nodes[node].ns;
        n.exec(&["ip", "link", "add", &host_if, "address", host_mac, "type", "veth", "peer", "name", &format!("{host_if}p"), "address", outside_mac]);
        n.exec(&["ip", "link", "set", &format!("{host_if}p"), "netns", &ns.name]);
        ns.exec(&["ip", "link", "set", &format!("{host_if}p"), "name", "eth0"]);
        for (side, ifname, mine, peer, peer_mac) in [(n, host_if.as_str(), (gateway_v4, gateway_v6), (ipv4, ipv6), outside_mac), (&ns, "eth0", (ipv4, ipv6), (gateway_v4, gateway_v6), host_mac)] {
            side.exec(&["sysctl", "-qw", &format!("net.ipv6.conf.{ifname}.addr_gen_mode=1")]);
            side.exec(&["ip", "addr", "add", &format!("{}/24", mine.0), "dev", ifname]);
            side.exec(&["ip", "-6", "addr", "add", &format!("{}/64", mine.1), "dev", ifname, "nodad"]);
            side.exec(&["ip", "link", "set", ifname, "up"]);
            for addr in [peer.0.to_string(), peer.1.to_string()] {
                side.exec(&["ip", "neigh", "replace", &addr, "lladdr", peer_mac, "dev", ifname, "nud", "permanent"]);
            }
        }
        ns.exec(&["ip", "route", "add", "default", "via", &gateway_v4.to_string()]);
        ns.exec(&["ip", "-6", "route", "add", "default", "via", &gateway_v6.to_string()]);
        self.route_elsewhere(node, &[format!("198.18.{}.0/24", 200 + k), format!("2001:2:0:{:x}::/64", 0xc800 + k)], true);
        self.outside.push(Outside { ns, ipv4, ipv6, gateway_v4, gateway_v6 });
        self.outside.last().expect("just pushed")
    }

    /// One line for a report: each node's name, namespace and InternalIPs.
    pub fn describe(&self) -> String {
        let nodes: Vec<String> = self.addrs.iter().zip(&self.nodes).map(|(a, n)| format!("{} (netns {}) InternalIP {} {}", a.name, n.ns.name, a.ipv4, a.ipv6)).collect();
        format!("nodes: {}", nodes.join("; "))
    }
}
