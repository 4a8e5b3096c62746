//! The oracle: a straightforward reference evaluator written from the NetworkPolicy v1 text
//! and the ClusterNetworkPolicy (v1alpha2) text (per pair of addresses, per protocol and
//! port: egress allowed at the source AND ingress allowed at the destination, each through
//! Admin tier -> NetworkPolicy -> Baseline tier -> default allow; no identities, no maps),
//! against compile + render + the lookup model, over random small clusters.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Container, ContainerPort, HostIP, Namespace, Pod, PodIP, PodSpec, PodStatus};
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use policy_agent::compile::{self, Compiled, EndpointSlot, MapContents, NodeContext, PodRef, RuleKey};
use policy_agent::crd::{
    ClusterNetworkPolicy, ClusterNetworkPolicySpec, EgressPeer, EgressRule, IngressPeer, IngressRule, NamespacedPod, Port,
    PortRange, Protocol, ProtocolPort, Subject,
};
use policy_agent::state::{ClusterState, Object};
use policy_common::Direction;
use policy_common::identity;
use policy_common::policy::PortPrefix;
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------
// Random clusters: plain data first, then k8s objects.

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const NODES: usize = 3;
const LABEL_KEYS: [&str; 3] = ["app", "tier", "env"];
const LABEL_VALUES: [&str; 3] = ["a", "b", "c"];
const PORT_NAMES: [&str; 5] = ["http", "dns", "metrics", "nope", "80"];
const CONTAINER_PORTS: [u16; 4] = [80, 81, 8080, 53];
const PROTOCOLS: [&str; 3] = ["TCP", "UDP", "SCTP"];
/// Held by no pod or node: one inside the pods' /24 (/112), one inside their /17 but not /18
/// (/56 but not /64), one outside their /16 (/52).
const EXTERNAL: [&str; 6] =
    ["198.18.0.200", "198.18.64.5", "198.19.0.1", "2001:2::ff", "2001:2:0:1::5", "2001:2:0:f000::1"];
/// (protocol, port) probed for every pair.
const PROBES: [(&str, u16); 8] =
    [("TCP", 80), ("TCP", 81), ("TCP", 443), ("TCP", 8080), ("UDP", 53), ("UDP", 80), ("UDP", 81), ("SCTP", 80)];

fn pod_v4(i: usize) -> IpAddr {
    format!("198.18.0.{}", 10 + i).parse().unwrap()
}
fn pod_v6(i: usize) -> IpAddr {
    format!("2001:2::{:x}", 0x10 + i).parse().unwrap()
}
fn node_v4(n: usize) -> IpAddr {
    format!("198.18.1.{}", 1 + n).parse().unwrap()
}
fn node_v6(n: usize) -> IpAddr {
    format!("2001:2::1:{:x}", 1 + n).parse().unwrap()
}

#[derive(Clone, Debug)]
struct PodGen {
    namespace: usize,
    labels: BTreeMap<usize, usize>,
    node: usize,
    host_network: bool,
    /// 0..=6 running, 7 no IP yet, 8 terminated.
    phase: u8,
    ipv6: bool,
    /// name index -> (port index, protocol index)
    ports: BTreeMap<usize, (usize, usize)>,
}

#[derive(Clone, Debug)]
struct SelectorGen {
    labels: BTreeMap<usize, usize>,
    /// (key, operator 0..5 where 4 is invalid, values)
    expressions: Vec<(usize, usize, Vec<usize>)>,
}

#[derive(Clone, Debug)]
struct CidrGen {
    /// Index into the address pool; the family picks v4 or v6.
    base: usize,
    ipv6: bool,
    len: usize,
    /// (pool index, extra length)
    except: Vec<(usize, u8)>,
}

#[derive(Clone, Debug)]
enum PeerGen {
    Pods {
        namespaces: Option<SelectorGen>,
        pods: Option<SelectorGen>,
    },
    Block(CidrGen),
    /// 0: empty peer, 1: ipBlock with a selector, 2: CIDR without length.
    Invalid(u8),
}

#[derive(Clone, Debug)]
struct PortGen {
    /// 0: absent, 1..=3 TCP/UDP/SCTP, 4: invalid name.
    protocol: usize,
    /// 0: absent, 1: numeric, 2: named
    kind: usize,
    number: i32,
    name: usize,
    end_port: Option<i32>,
}

#[derive(Clone, Debug)]
struct RuleGen {
    peers: Option<Vec<PeerGen>>,
    ports: Option<Vec<PortGen>>,
}

#[derive(Clone, Debug)]
struct PolicyGen {
    namespace: usize,
    selector: Option<SelectorGen>,
    /// 0: absent, 1: [], 2: [Ingress], 3: [Egress], 4: both
    types: usize,
    ingress: Option<Vec<RuleGen>>,
    egress: Option<Vec<RuleGen>>,
}

#[derive(Clone, Debug)]
enum CnpPeerGen {
    Namespaces(SelectorGen),
    Pods(SelectorGen, SelectorGen),
    /// Egress only (an ingress rule gets a namespaces peer instead); `None`: a CIDR without
    /// a length (invalid).
    Networks(Vec<Option<CidrGen>>),
}

#[derive(Clone, Debug)]
struct CnpProtocolGen {
    /// 0..=2 tcp, udp, sctp; 3 destinationNamedPort; 4 two of them at once (invalid).
    kind: usize,
    /// 0: no destinationPort, 1: number, 2: range, 3: neither number nor range (invalid).
    port: usize,
    number: i32,
    end: i32,
    name: usize,
}

#[derive(Clone, Debug)]
struct CnpRuleGen {
    /// 0 Accept, 1 Deny, 2 Pass, 3 unknown.
    action: usize,
    peers: Vec<CnpPeerGen>,
    protocols: Option<Vec<CnpProtocolGen>>,
}

#[derive(Clone, Debug)]
struct CnpGen {
    baseline: bool,
    priority: i32,
    /// (namespaces, Some(pods)) for a pods subject.
    subject: (SelectorGen, Option<SelectorGen>),
    ingress: Vec<CnpRuleGen>,
    egress: Vec<CnpRuleGen>,
}

#[derive(Clone, Debug)]
struct ClusterGen {
    namespace_labels: Vec<BTreeMap<usize, usize>>,
    /// Whether namespace z has an object at all.
    z_exists: bool,
    pods: Vec<PodGen>,
    policies: Vec<PolicyGen>,
    cluster_policies: Vec<CnpGen>,
}

fn labels_gen() -> impl Strategy<Value = BTreeMap<usize, usize>> {
    prop::collection::btree_map(0..3usize, 0..3usize, 0..3)
}

fn selector_gen() -> impl Strategy<Value = SelectorGen> {
    (
        prop::collection::btree_map(0..3usize, 0..3usize, 0..2),
        prop::collection::vec(
            (0..3usize, prop_oneof![8 => 0..4usize, 1 => Just(4usize)], prop::collection::vec(0..3usize, 0..3)),
            0..2,
        ),
    )
        .prop_map(|(labels, expressions)| SelectorGen { labels, expressions })
}

fn cidr_gen() -> impl Strategy<Value = CidrGen> {
    (0..20usize, any::<bool>(), 0..9usize, prop::collection::vec((0..20usize, 0..6u8), 0..3))
        .prop_map(|(base, ipv6, len, except)| CidrGen { base, ipv6, len, except })
}

fn peer_gen() -> impl Strategy<Value = PeerGen> {
    prop_oneof![
        4 => (prop::option::of(selector_gen()), prop::option::of(selector_gen()))
            .prop_map(|(namespaces, pods)| PeerGen::Pods { namespaces, pods }),
        3 => cidr_gen().prop_map(PeerGen::Block),
        1 => (0..3u8).prop_map(PeerGen::Invalid),
    ]
}

fn port_gen() -> impl Strategy<Value = PortGen> {
    (
        prop_oneof![3 => Just(0usize), 2 => 1..4usize, 1 => Just(4usize)],
        prop_oneof![1 => Just(0usize), 2 => Just(1usize), 2 => Just(2usize)],
        prop::sample::select(vec![80, 81, 443, 8080, 53, 0, 70000, 79]),
        prop_oneof![6 => 0..3usize, 1 => 3..PORT_NAMES.len()],
        prop::option::weighted(0.3, prop::sample::select(vec![81, 90, 79, 1000, 8080, 65535])),
    )
        .prop_map(|(protocol, kind, number, name, end_port)| PortGen { protocol, kind, number, name, end_port })
}

/// A missing list, an empty list (both mean "all"), or one to three items.
fn list_gen<T: std::fmt::Debug + Clone>(
    item: impl Strategy<Value = T> + 'static,
) -> impl Strategy<Value = Option<Vec<T>>> {
    prop_oneof![
        1 => Just(None),
        1 => Just(Some(Vec::new())),
        5 => prop::collection::vec(item, 1..3).prop_map(Some),
    ]
}

fn rule_gen() -> impl Strategy<Value = RuleGen> {
    (list_gen(peer_gen()), list_gen(port_gen())).prop_map(|(peers, ports)| RuleGen { peers, ports })
}

fn policy_gen() -> impl Strategy<Value = PolicyGen> {
    (
        0..3usize,
        prop::option::weighted(0.8, selector_gen()),
        prop_oneof![2 => Just(0usize), 1 => Just(1usize), 1 => Just(2usize), 2 => Just(3usize), 2 => Just(4usize)],
        prop::option::of(prop::collection::vec(rule_gen(), 0..3)),
        prop::option::of(prop::collection::vec(rule_gen(), 0..3)),
    )
        .prop_map(|(namespace, selector, types, ingress, egress)| PolicyGen {
            namespace,
            selector,
            types,
            ingress,
            egress,
        })
}

fn pod_gen() -> impl Strategy<Value = PodGen> {
    (
        0..3usize,
        labels_gen(),
        0..NODES,
        prop::bool::weighted(0.1),
        0..9u8,
        any::<bool>(),
        prop::collection::btree_map(
            0..4usize,
            (0..4usize, prop_oneof![3 => Just(0usize), 1 => Just(1usize), 1 => Just(2usize)]),
            0..4,
        ),
    )
        .prop_map(|(namespace, labels, node, host_network, phase, ipv6, ports)| PodGen {
            namespace,
            labels,
            node,
            host_network,
            phase,
            ipv6,
            ports,
        })
}

/// Often `{}`, so that policies overlap and their order matters.
fn broad_selector_gen() -> impl Strategy<Value = SelectorGen> {
    prop_oneof![
        2 => Just(SelectorGen { labels: BTreeMap::new(), expressions: Vec::new() }),
        3 => selector_gen(),
    ]
}

fn cnp_peer_gen() -> impl Strategy<Value = CnpPeerGen> {
    prop_oneof![
        3 => broad_selector_gen().prop_map(CnpPeerGen::Namespaces),
        3 => (broad_selector_gen(), broad_selector_gen()).prop_map(|(n, p)| CnpPeerGen::Pods(n, p)),
        2 => prop::collection::vec(prop::option::weighted(0.95, cidr_gen()), 1..3).prop_map(CnpPeerGen::Networks),
    ]
}

fn cnp_protocol_gen() -> impl Strategy<Value = CnpProtocolGen> {
    (
        prop_oneof![6 => 0..3usize, 3 => Just(3usize), 1 => Just(4usize)],
        prop_oneof![2 => Just(0usize), 3 => Just(1usize), 3 => Just(2usize), 1 => Just(3usize)],
        prop::sample::select(vec![80, 81, 53, 8080, 443, 0, 70000]),
        prop::sample::select(vec![80, 81, 90, 8080, 65535, 79]),
        prop_oneof![6 => 0..3usize, 1 => 3..PORT_NAMES.len()],
    )
        .prop_map(|(kind, port, number, end, name)| CnpProtocolGen { kind, port, number, end, name })
}

fn cnp_rule_gen() -> impl Strategy<Value = CnpRuleGen> {
    (
        prop_oneof![3 => Just(0usize), 3 => Just(1usize), 3 => Just(2usize), 1 => Just(3usize)],
        prop::collection::vec(cnp_peer_gen(), 1..3),
        prop::option::weighted(0.6, prop::collection::vec(cnp_protocol_gen(), 1..3)),
    )
        .prop_map(|(action, peers, protocols)| CnpRuleGen { action, peers, protocols })
}

fn cnp_gen() -> impl Strategy<Value = CnpGen> {
    (
        any::<bool>(),
        // Few values, so that equal priorities (decided by name) are common.
        prop::sample::select(vec![0, 1, 1, 1, 1000]),
        (broad_selector_gen(), prop::option::of(broad_selector_gen())),
        prop::collection::vec(cnp_rule_gen(), 0..3),
        prop::collection::vec(cnp_rule_gen(), 0..3),
    )
        .prop_map(|(baseline, priority, subject, ingress, egress)| CnpGen { baseline, priority, subject, ingress, egress })
}

fn cluster_gen() -> impl Strategy<Value = ClusterGen> {
    (
        prop::collection::vec(labels_gen(), 3),
        any::<bool>(),
        prop::collection::vec(pod_gen(), 1..8),
        prop::collection::vec(policy_gen(), 0..5),
        prop_oneof![1 => Just(Vec::new()), 3 => prop::collection::vec(cnp_gen(), 1..4)],
    )
        .prop_map(|(namespace_labels, z_exists, pods, policies, cluster_policies)| ClusterGen {
            namespace_labels,
            z_exists,
            pods,
            policies,
            cluster_policies,
        })
}

fn to_labels(labels: &BTreeMap<usize, usize>) -> BTreeMap<String, String> {
    labels.iter().map(|(k, v)| (LABEL_KEYS[*k].to_owned(), LABEL_VALUES[*v].to_owned())).collect()
}

fn to_selector(selector: &SelectorGen) -> LabelSelector {
    const OPERATORS: [&str; 5] = ["In", "NotIn", "Exists", "DoesNotExist", "Near"];
    LabelSelector {
        match_labels: (!selector.labels.is_empty()).then(|| to_labels(&selector.labels)),
        match_expressions: (!selector.expressions.is_empty()).then(|| {
            selector
                .expressions
                .iter()
                .map(|(key, operator, values)| LabelSelectorRequirement {
                    key: LABEL_KEYS[*key].to_owned(),
                    operator: OPERATORS[*operator].to_owned(),
                    values: (!values.is_empty()).then(|| values.iter().map(|v| LABEL_VALUES[*v].to_owned()).collect()),
                })
                .collect()
        }),
    }
}

/// Pool of interesting addresses for CIDR bases: pod, node and external addresses.
fn pool_address(index: usize, ipv6: bool) -> IpAddr {
    match (index, ipv6) {
        (0..=9, false) => pod_v4(index),
        (0..=9, true) => pod_v6(index),
        (10..=12, false) => node_v4(index - 10),
        (10..=12, true) => node_v6(index - 10),
        (_, false) => EXTERNAL[index % 3].parse().unwrap(),
        (_, true) => EXTERNAL[3 + index % 3].parse().unwrap(),
    }
}

fn masked(addr: IpAddr, len: u8) -> String {
    match addr {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let bits = if len == 0 { 0 } else { bits & (u32::MAX << (32 - u32::from(len))) };
            format!("{}/{len}", std::net::Ipv4Addr::from(bits))
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let bits = if len == 0 { 0 } else { bits & (u128::MAX << (128 - u32::from(len))) };
            format!("{}/{len}", std::net::Ipv6Addr::from(bits))
        }
    }
}

fn to_ip_block(cidr: &CidrGen) -> IPBlock {
    // Every address is inside 198.18.0.0/15 and 2001:2::/48; /0 is the only wider prefix.
    const V4_LENS: [u8; 9] = [32, 31, 30, 28, 24, 18, 17, 16, 0];
    const V6_LENS: [u8; 9] = [128, 127, 124, 120, 112, 64, 56, 52, 0];
    let max = if cidr.ipv6 { 128 } else { 32 };
    let len = if cidr.ipv6 { V6_LENS[cidr.len] } else { V4_LENS[cidr.len] };
    // A longer except of a /0 is the widest in-range prefix, which covers the same pool
    // addresses as a /1../5 would.
    let widest = if cidr.ipv6 { 48 } else { 16 };
    let except = cidr
        .except
        .iter()
        .map(|(base, extra)| {
            let except_len = if len == 0 && *extra > 0 { widest } else { (len + extra).min(max) };
            masked(pool_address(*base, cidr.ipv6), except_len)
        })
        .collect::<Vec<_>>();
    IPBlock { cidr: masked(pool_address(cidr.base, cidr.ipv6), len), except: (!except.is_empty()).then_some(except) }
}

fn to_peer(peer: &PeerGen) -> NetworkPolicyPeer {
    match peer {
        PeerGen::Pods { namespaces, pods } => NetworkPolicyPeer {
            namespace_selector: namespaces.as_ref().map(to_selector),
            pod_selector: pods.as_ref().map(to_selector),
            ip_block: None,
        },
        PeerGen::Block(cidr) => NetworkPolicyPeer { ip_block: Some(to_ip_block(cidr)), ..Default::default() },
        PeerGen::Invalid(0) => NetworkPolicyPeer::default(),
        PeerGen::Invalid(1) => NetworkPolicyPeer {
            ip_block: Some(IPBlock { cidr: "198.18.0.0/15".into(), except: None }),
            pod_selector: Some(LabelSelector::default()),
            namespace_selector: None,
        },
        PeerGen::Invalid(_) => NetworkPolicyPeer {
            ip_block: Some(IPBlock { cidr: "198.18.0.0".into(), except: None }),
            ..Default::default()
        },
    }
}

fn to_port(port: &PortGen) -> NetworkPolicyPort {
    NetworkPolicyPort {
        protocol: match port.protocol {
            0 => None,
            4 => Some("tcp".to_owned()),
            p => Some(PROTOCOLS[p - 1].to_owned()),
        },
        port: match port.kind {
            0 => None,
            1 => Some(IntOrString::Int(port.number)),
            _ => Some(IntOrString::String(PORT_NAMES[port.name].to_owned())),
        },
        end_port: port.end_port,
    }
}

fn to_namespaced_pod(namespaces: &SelectorGen, pods: &SelectorGen) -> NamespacedPod {
    NamespacedPod { namespace_selector: to_selector(namespaces), pod_selector: to_selector(pods) }
}

fn to_cnp_protocol(protocol: &CnpProtocolGen) -> Protocol {
    let destination_port = match protocol.port {
        0 => None,
        1 => Some(Port { number: Some(protocol.number), range: None }),
        2 => Some(Port { number: None, range: Some(PortRange { start: protocol.number, end: protocol.end }) }),
        _ => Some(Port::default()),
    };
    let port = Some(ProtocolPort { destination_port });
    match protocol.kind {
        0 => Protocol { tcp: port, ..Protocol::default() },
        1 => Protocol { udp: port, ..Protocol::default() },
        2 => Protocol { sctp: port, ..Protocol::default() },
        3 => Protocol { destination_named_port: Some(PORT_NAMES[protocol.name].to_owned()), ..Protocol::default() },
        _ => Protocol { tcp: port, destination_named_port: Some(PORT_NAMES[protocol.name].to_owned()), ..Protocol::default() },
    }
}

fn to_network(cidr: &Option<CidrGen>) -> String {
    cidr.as_ref().map_or_else(|| "198.18.0.0".to_owned(), |c| to_ip_block(c).cidr)
}

fn to_egress_peer(peer: &CnpPeerGen) -> EgressPeer {
    match peer {
        CnpPeerGen::Namespaces(n) => EgressPeer { namespaces: Some(to_selector(n)), ..EgressPeer::default() },
        CnpPeerGen::Pods(n, p) => EgressPeer { pods: Some(to_namespaced_pod(n, p)), ..EgressPeer::default() },
        CnpPeerGen::Networks(cidrs) => EgressPeer { networks: Some(cidrs.iter().map(to_network).collect()), ..EgressPeer::default() },
    }
}

fn to_ingress_peer(peer: &CnpPeerGen) -> IngressPeer {
    match peer {
        CnpPeerGen::Pods(n, p) => IngressPeer { pods: Some(to_namespaced_pod(n, p)), namespaces: None },
        CnpPeerGen::Namespaces(n) => IngressPeer { namespaces: Some(to_selector(n)), pods: None },
        CnpPeerGen::Networks(_) => IngressPeer { namespaces: Some(LabelSelector::default()), pods: None },
    }
}

const ACTIONS: [&str; 4] = ["Accept", "Deny", "Pass", "Allow"];

fn to_cnp(index: usize, cnp: &CnpGen) -> ClusterNetworkPolicy {
    let (namespaces, pods) = &cnp.subject;
    let subject = match pods {
        None => Subject { namespaces: Some(to_selector(namespaces)), pods: None },
        Some(pods) => Subject { namespaces: None, pods: Some(to_namespaced_pod(namespaces, pods)) },
    };
    let protocols = |r: &CnpRuleGen| r.protocols.as_ref().map(|p| p.iter().map(to_cnp_protocol).collect());
    let ingress = cnp
        .ingress
        .iter()
        .map(|r| IngressRule { name: None, action: ACTIONS[r.action].to_owned(), from: r.peers.iter().map(to_ingress_peer).collect(), protocols: protocols(r) })
        .collect();
    let egress = cnp
        .egress
        .iter()
        .map(|r| EgressRule { name: None, action: ACTIONS[r.action].to_owned(), to: r.peers.iter().map(to_egress_peer).collect(), protocols: protocols(r) })
        .collect();
    let tier = if cnp.baseline { "Baseline" } else { "Admin" };
    ClusterNetworkPolicy::new(
        &format!("cnp{index}"),
        ClusterNetworkPolicySpec { tier: tier.to_owned(), priority: cnp.priority, subject, ingress: Some(ingress), egress: Some(egress) },
    )
}

fn build(cluster: &ClusterGen) -> ClusterState {
    let mut objects = Vec::new();
    for (index, name) in NAMESPACES.iter().enumerate() {
        if index == 2 && !cluster.z_exists {
            continue;
        }
        let mut labels = to_labels(&cluster.namespace_labels[index]);
        labels.insert("team".to_owned(), ["red", "blue"][index % 2].to_owned());
        objects.push(Object::Namespace(Arc::new(Namespace {
            metadata: ObjectMeta { name: Some((*name).to_owned()), labels: Some(labels), ..Default::default() },
            ..Default::default()
        })));
    }
    for (i, pod) in cluster.pods.iter().enumerate() {
        let (pod_ip, pod_ips) = if pod.phase == 7 {
            (None, None)
        } else if pod.host_network {
            (
                Some(node_v4(pod.node).to_string()),
                Some(vec![PodIP { ip: node_v4(pod.node).to_string() }, PodIP { ip: node_v6(pod.node).to_string() }]),
            )
        } else {
            let mut ips = vec![PodIP { ip: pod_v4(i).to_string() }];
            if pod.ipv6 {
                ips.push(PodIP { ip: pod_v6(i).to_string() });
            }
            (Some(pod_v4(i).to_string()), Some(ips))
        };
        let ports = pod
            .ports
            .iter()
            .map(|(name, (port, protocol))| ContainerPort {
                name: Some(PORT_NAMES[*name].to_owned()),
                container_port: i32::from(CONTAINER_PORTS[*port]),
                protocol: (*protocol != 0).then(|| PROTOCOLS[*protocol].to_owned()),
                ..Default::default()
            })
            .collect();
        objects.push(Object::Pod(Arc::new(Pod {
            metadata: ObjectMeta {
                name: Some(format!("p{i}")),
                namespace: Some(NAMESPACES[pod.namespace].to_owned()),
                labels: Some(to_labels(&pod.labels)),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some(format!("n{}", pod.node)),
                host_network: pod.host_network.then_some(true),
                containers: vec![Container { name: "c".into(), ports: Some(ports), ..Default::default() }],
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some(if pod.phase == 8 { "Succeeded" } else { "Running" }.to_owned()),
                host_ip: Some(node_v4(pod.node).to_string()),
                host_ips: Some(vec![
                    HostIP { ip: node_v4(pod.node).to_string() },
                    HostIP { ip: node_v6(pod.node).to_string() },
                ]),
                pod_ip,
                pod_ips,
                ..Default::default()
            }),
        })));
    }
    for (i, policy) in cluster.policies.iter().enumerate() {
        let types = match policy.types {
            0 => None,
            1 => Some(vec![]),
            2 => Some(vec!["Ingress".to_owned()]),
            3 => Some(vec!["Egress".to_owned()]),
            _ => Some(vec!["Ingress".to_owned(), "Egress".to_owned()]),
        };
        let rules = |rules: &Option<Vec<RuleGen>>| {
            rules.as_ref().map(|rules| {
                rules
                    .iter()
                    .map(|r| {
                        (
                            r.peers.as_ref().map(|p| p.iter().map(to_peer).collect::<Vec<_>>()),
                            r.ports.as_ref().map(|p| p.iter().map(to_port).collect::<Vec<_>>()),
                        )
                    })
                    .collect::<Vec<_>>()
            })
        };
        objects.push(Object::NetworkPolicy(Arc::new(NetworkPolicy {
            metadata: ObjectMeta {
                name: Some(format!("np{i}")),
                namespace: Some(NAMESPACES[policy.namespace].to_owned()),
                ..Default::default()
            },
            spec: Some(NetworkPolicySpec {
                pod_selector: policy.selector.as_ref().map(to_selector),
                policy_types: types,
                ingress: rules(&policy.ingress)
                    .map(|r| r.into_iter().map(|(from, ports)| NetworkPolicyIngressRule { from, ports }).collect()),
                egress: rules(&policy.egress)
                    .map(|r| r.into_iter().map(|(to, ports)| NetworkPolicyEgressRule { to, ports }).collect()),
            }),
        })));
    }
    for (i, cnp) in cluster.cluster_policies.iter().enumerate() {
        objects.push(Object::ClusterNetworkPolicy(Arc::new(to_cnp(i, cnp))));
    }
    ClusterState::from_objects(objects)
}

// ---------------------------------------------------------------------------------------
// The reference evaluator, from the specification text.

mod reference {
    use super::*;

    fn selector_valid(selector: &LabelSelector) -> bool {
        selector.match_expressions.iter().flatten().all(|e| {
            let values = e.values.as_ref().map_or(0, Vec::len);
            !e.key.is_empty()
                && match e.operator.as_str() {
                    "In" | "NotIn" => values > 0,
                    "Exists" | "DoesNotExist" => values == 0,
                    _ => false,
                }
        })
    }

    /// A valid selector matches when all of matchLabels and matchExpressions hold.
    fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
        let labels_ok = selector.match_labels.iter().flatten().all(|(k, v)| labels.get(k) == Some(v));
        let expressions_ok = selector.match_expressions.iter().flatten().all(|e| {
            let values = e.values.clone().unwrap_or_default();
            let value = labels.get(&e.key);
            match e.operator.as_str() {
                "In" => value.is_some_and(|v| values.contains(v)),
                "NotIn" => value.is_none_or(|v| !values.contains(v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                _ => false,
            }
        });
        labels_ok && expressions_ok
    }

    fn valid_and_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
        selector_valid(selector) && selector_matches(selector, labels)
    }

    fn parse_cidr(text: &str) -> Option<(IpAddr, u32)> {
        let (addr, len) = text.split_once('/')?;
        let addr: IpAddr = addr.parse().ok()?;
        let len: u32 = len.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (len <= max).then_some((addr, len))
    }

    fn in_cidr(ip: IpAddr, (net, len): (IpAddr, u32)) -> bool {
        match (ip, net) {
            (IpAddr::V4(a), IpAddr::V4(n)) => len == 0 || (u32::from(a) ^ u32::from(n)) >> (32 - len) == 0,
            (IpAddr::V6(a), IpAddr::V6(n)) => len == 0 || (u128::from(a) ^ u128::from(n)) >> (128 - len) == 0,
            _ => false,
        }
    }

    /// `except` must be inside `cidr`; an invalid block matches nothing.
    fn ip_block_matches(block: &IPBlock, ip: IpAddr) -> bool {
        let Some(cidr) = parse_cidr(&block.cidr) else { return false };
        let mut excepts = Vec::new();
        for text in block.except.iter().flatten() {
            let Some(except) = parse_cidr(text) else { return false };
            if except.1 < cidr.1 || !in_cidr(except.0, cidr) {
                return false;
            }
            excepts.push(except);
        }
        in_cidr(ip, cidr) && !excepts.iter().any(|e| in_cidr(ip, *e))
    }

    /// A live pod (running, not hostNetwork) and its namespace labels.
    pub struct PodView<'a> {
        pub pod: &'a Pod,
        pub namespace: String,
    }

    fn namespace_labels(state: &ClusterState, namespace: &str) -> BTreeMap<String, String> {
        let mut labels = state.namespaces.get(namespace).and_then(|n| n.metadata.labels.clone()).unwrap_or_default();
        labels.insert("kubernetes.io/metadata.name".to_owned(), namespace.to_owned());
        labels
    }

    fn peer_matches(
        state: &ClusterState,
        peers: Option<&Vec<NetworkPolicyPeer>>,
        policy_namespace: &str,
        ip: IpAddr,
        pod: Option<&PodView<'_>>,
    ) -> bool {
        let Some(peers) = peers.filter(|p| !p.is_empty()) else { return true };
        peers.iter().any(|peer| {
            if let Some(block) = &peer.ip_block {
                return peer.pod_selector.is_none() && peer.namespace_selector.is_none() && ip_block_matches(block, ip);
            }
            if peer.pod_selector.is_none() && peer.namespace_selector.is_none() {
                return false;
            }
            let Some(pod) = pod else { return false };
            let namespace_ok = match &peer.namespace_selector {
                None => pod.namespace == policy_namespace,
                Some(selector) => valid_and_matches(selector, &namespace_labels(state, &pod.namespace)),
            };
            let pod_ok = match &peer.pod_selector {
                None => true,
                Some(selector) => valid_and_matches(selector, &pod.pod.metadata.labels.clone().unwrap_or_default()),
            };
            namespace_ok && pod_ok
        })
    }

    fn protocol_of(name: Option<&str>) -> Option<&'static str> {
        match name.unwrap_or("TCP") {
            "TCP" => Some("TCP"),
            "UDP" => Some("UDP"),
            "SCTP" => Some("SCTP"),
            _ => None,
        }
    }

    fn valid_port_name(name: &str) -> bool {
        (1..=15).contains(&name.len())
            && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && name.bytes().any(|b| b.is_ascii_lowercase())
    }

    fn port_matches(
        ports: Option<&Vec<NetworkPolicyPort>>,
        protocol: &str,
        port: u16,
        destination: Option<&Pod>,
    ) -> bool {
        let Some(ports) = ports.filter(|p| !p.is_empty()) else { return true };
        ports.iter().any(|entry| {
            if protocol_of(entry.protocol.as_deref()) != Some(protocol) {
                return false;
            }
            match (&entry.port, entry.end_port) {
                (None, None) => true,
                (None | Some(IntOrString::String(_)), Some(_)) => false,
                (Some(IntOrString::Int(first)), end) => {
                    let last = end.unwrap_or(*first);
                    (1..=65535).contains(first)
                        && (*first..=65535).contains(&last)
                        && (*first..=last).contains(&i32::from(port))
                }
                (Some(IntOrString::String(name)), None) => {
                    valid_port_name(name)
                        && destination.is_some_and(|pod| {
                            pod.spec.iter().flat_map(|s| &s.containers).flat_map(|c| c.ports.iter().flatten()).any(
                                |p| {
                                    p.name.as_deref() == Some(name.as_str())
                                        && protocol_of(p.protocol.as_deref()) == Some(protocol)
                                        && p.container_port == i32::from(port)
                                },
                            )
                        })
                }
            }
        })
    }

    fn policy_types(spec: &NetworkPolicySpec) -> (bool, bool) {
        match spec.policy_types.as_ref().filter(|t| !t.is_empty()) {
            Some(types) => (types.iter().any(|t| t == "Ingress"), types.iter().any(|t| t == "Egress")),
            None => (true, spec.egress.as_ref().is_some_and(|e| !e.is_empty())),
        }
    }

    fn selecting_policies<'a>(state: &'a ClusterState, pod: &PodView<'_>) -> impl Iterator<Item = &'a NetworkPolicy> {
        let labels = pod.pod.metadata.labels.clone().unwrap_or_default();
        let namespace = pod.namespace.clone();
        state.policies.values().map(|policy| &**policy).filter(move |policy| {
            policy.metadata.namespace.as_deref() == Some(namespace.as_str())
                && match policy.spec.as_ref().and_then(|s| s.pod_selector.as_ref()) {
                    None => true,
                    Some(selector) => valid_and_matches(selector, &labels),
                }
        })
    }

    /// NetworkPolicy egress at the source pod towards `ip` (owned by `peer` if a live pod):
    /// `None` if no policy isolates it.
    fn network_policy_egress(
        state: &ClusterState,
        source: &PodView<'_>,
        ip: IpAddr,
        peer: Option<&PodView<'_>>,
        protocol: &str,
        port: u16,
    ) -> Option<bool> {
        let mut isolated = false;
        for policy in selecting_policies(state, source) {
            let spec = policy.spec.clone().unwrap_or_default();
            if !policy_types(&spec).1 {
                continue;
            }
            isolated = true;
            let namespace = policy.metadata.namespace.clone().unwrap_or_default();
            for rule in spec.egress.iter().flatten() {
                if peer_matches(state, rule.to.as_ref(), &namespace, ip, peer)
                    && port_matches(rule.ports.as_ref(), protocol, port, peer.map(|p| p.pod))
                {
                    return Some(true);
                }
            }
        }
        isolated.then_some(false)
    }

    /// NetworkPolicy ingress at the destination pod from `ip`: `None` if not isolated.
    fn network_policy_ingress(
        state: &ClusterState,
        destination: &PodView<'_>,
        ip: IpAddr,
        peer: Option<&PodView<'_>>,
        protocol: &str,
        port: u16,
    ) -> Option<bool> {
        let mut isolated = false;
        for policy in selecting_policies(state, destination) {
            let spec = policy.spec.clone().unwrap_or_default();
            if !policy_types(&spec).0 {
                continue;
            }
            isolated = true;
            let namespace = policy.metadata.namespace.clone().unwrap_or_default();
            for rule in spec.ingress.iter().flatten() {
                if peer_matches(state, rule.from.as_ref(), &namespace, ip, peer)
                    && port_matches(rule.ports.as_ref(), protocol, port, Some(destination.pod))
                {
                    return Some(true);
                }
            }
        }
        isolated.then_some(false)
    }

    /// Egress at the source pod towards `ip` (owned by `peer` if a live pod).
    pub fn egress_allowed(
        state: &ClusterState,
        source: &PodView<'_>,
        ip: IpAddr,
        peer: Option<&PodView<'_>>,
        protocol: &str,
        port: u16,
    ) -> bool {
        let packet = Packet { ip, peer, protocol, port, destination: peer.map(|p| p.pod) };
        tiers(state, source, Direction::Egress, &packet, || network_policy_egress(state, source, ip, peer, protocol, port))
    }

    /// Ingress at the destination pod from `ip`. `node_addresses` are the destination node's.
    pub fn ingress_allowed(
        state: &ClusterState,
        destination: &PodView<'_>,
        ip: IpAddr,
        peer: Option<&PodView<'_>>,
        node_addresses: &BTreeSet<IpAddr>,
        protocol: &str,
        port: u16,
    ) -> bool {
        // The node (kubelet probes) always reaches its pods.
        if node_addresses.contains(&ip) {
            return true;
        }
        let packet = Packet { ip, peer, protocol, port, destination: Some(destination.pod) };
        tiers(state, destination, Direction::Ingress, &packet, || network_policy_ingress(state, destination, ip, peer, protocol, port))
    }

    // -----------------------------------------------------------------------------------
    // ClusterNetworkPolicy, from the v1alpha2 API text.

    /// What one direction's decision looks at. `destination`: the pod a named port
    /// resolves on (the subject for ingress, the peer for egress).
    struct Packet<'a> {
        ip: IpAddr,
        peer: Option<&'a PodView<'a>>,
        protocol: &'a str,
        port: u16,
        destination: Option<&'a Pod>,
    }

    /// Admin tier (Accept and Deny end it, Pass skips to NetworkPolicy), then NetworkPolicy
    /// if it isolates the pod, then the Baseline tier (Pass: the default), then allow.
    fn tiers(
        state: &ClusterState,
        pod: &PodView<'_>,
        direction: Direction,
        packet: &Packet<'_>,
        network_policy: impl FnOnce() -> Option<bool>,
    ) -> bool {
        match first_action(state, "Admin", pod, direction, packet) {
            Some("Accept") => return true,
            Some("Deny") => return false,
            _ => {}
        }
        if let Some(allowed) = network_policy() {
            return allowed;
        }
        first_action(state, "Baseline", pod, direction, packet) != Some("Deny")
    }

    /// The action of the first matching rule of the tier's policies that apply to `pod`,
    /// lowest priority number first, then by name, rules in order.
    fn first_action(
        state: &ClusterState,
        tier: &str,
        pod: &PodView<'_>,
        direction: Direction,
        packet: &Packet<'_>,
    ) -> Option<&'static str> {
        let mut policies: Vec<&ClusterNetworkPolicy> =
            state.cluster_policies.values().map(|p| &**p).filter(|p| p.spec.tier == tier && subject_matches(state, p, pod)).collect();
        policies.sort_by_key(|p| (p.spec.priority, p.metadata.name.clone()));
        policies.into_iter().find_map(|policy| match direction {
            Direction::Ingress => policy.spec.ingress.iter().flatten().find_map(|rule| {
                let peers: Vec<PeerView<'_>> = rule.from.iter().map(|p| PeerView { namespaces: p.namespaces.as_ref(), pods: p.pods.as_ref(), networks: None }).collect();
                rule_action(state, &rule.action, &peers, rule.protocols.as_deref(), packet)
            }),
            Direction::Egress => policy.spec.egress.iter().flatten().find_map(|rule| {
                let peers: Vec<PeerView<'_>> =
                    rule.to.iter().map(|p| PeerView { namespaces: p.namespaces.as_ref(), pods: p.pods.as_ref(), networks: p.networks.as_deref() }).collect();
                rule_action(state, &rule.action, &peers, rule.protocols.as_deref(), packet)
            }),
        })
    }

    fn subject_matches(state: &ClusterState, policy: &ClusterNetworkPolicy, pod: &PodView<'_>) -> bool {
        let namespace = namespace_labels(state, &pod.namespace);
        let labels = pod.pod.metadata.labels.clone().unwrap_or_default();
        match (&policy.spec.subject.namespaces, &policy.spec.subject.pods) {
            (Some(namespaces), None) => valid_and_matches(namespaces, &namespace),
            (None, Some(pods)) => {
                // Both selectors must be valid, even if the first already fails to match.
                selector_valid(&pods.namespace_selector)
                    && selector_valid(&pods.pod_selector)
                    && selector_matches(&pods.namespace_selector, &namespace)
                    && selector_matches(&pods.pod_selector, &labels)
            }
            _ => false,
        }
    }

    struct PeerView<'a> {
        namespaces: Option<&'a LabelSelector>,
        pods: Option<&'a NamespacedPod>,
        networks: Option<&'a [String]>,
    }

    /// The rule's action if it matches the packet. A rule with an invalid part fails
    /// closed: an Accept matches nothing, anything else denies everything.
    fn rule_action(
        state: &ClusterState,
        action: &str,
        peers: &[PeerView<'_>],
        protocols: Option<&[Protocol]>,
        packet: &Packet<'_>,
    ) -> Option<&'static str> {
        let action = match action {
            "Accept" => "Accept",
            "Deny" => "Deny",
            "Pass" => "Pass",
            _ => return Some("Deny"),
        };
        let valid = !peers.is_empty()
            && peers.iter().all(cnp_peer_valid)
            && protocols.is_none_or(|p| !p.is_empty() && p.iter().all(cnp_protocol_valid));
        if !valid {
            return (action != "Accept").then_some("Deny");
        }
        let peer_ok = peers.iter().any(|peer| cnp_peer_matches(state, peer, packet));
        let protocol_ok = protocols.is_none_or(|p| p.iter().any(|protocol| cnp_protocol_matches(protocol, packet)));
        (peer_ok && protocol_ok).then_some(action)
    }

    fn cnp_peer_valid(peer: &PeerView<'_>) -> bool {
        let set = usize::from(peer.namespaces.is_some()) + usize::from(peer.pods.is_some()) + usize::from(peer.networks.is_some());
        set == 1
            && peer.namespaces.is_none_or(selector_valid)
            && peer.pods.is_none_or(|p| selector_valid(&p.namespace_selector) && selector_valid(&p.pod_selector))
            && peer.networks.is_none_or(|n| !n.is_empty() && n.iter().all(|c| parse_cidr(c).is_some()))
    }

    /// `namespaces` and `pods` match live pods only; `networks` match any address.
    fn cnp_peer_matches(state: &ClusterState, peer: &PeerView<'_>, packet: &Packet<'_>) -> bool {
        if let Some(networks) = peer.networks {
            return networks.iter().filter_map(|c| parse_cidr(c)).any(|cidr| in_cidr(packet.ip, cidr));
        }
        let Some(pod) = packet.peer else { return false };
        let namespace = namespace_labels(state, &pod.namespace);
        let labels = pod.pod.metadata.labels.clone().unwrap_or_default();
        match (peer.namespaces, peer.pods) {
            (Some(namespaces), _) => selector_matches(namespaces, &namespace),
            (_, Some(pods)) => selector_matches(&pods.namespace_selector, &namespace) && selector_matches(&pods.pod_selector, &labels),
            _ => false,
        }
    }

    fn port_number_valid(value: i32) -> bool {
        (1..=65535).contains(&value)
    }

    fn cnp_protocol_valid(protocol: &Protocol) -> bool {
        let ports = [&protocol.tcp, &protocol.udp, &protocol.sctp];
        let set = ports.iter().filter(|p| p.is_some()).count() + usize::from(protocol.destination_named_port.is_some());
        let ports_ok = ports.iter().copied().flatten().all(|p| match &p.destination_port {
            None => true,
            Some(Port { number: Some(n), range: None }) => port_number_valid(*n),
            Some(Port { number: None, range: Some(r) }) => port_number_valid(r.start) && port_number_valid(r.end) && r.start <= r.end,
            Some(_) => false,
        });
        set == 1 && ports_ok && protocol.destination_named_port.as_deref().is_none_or(valid_port_name)
    }

    fn cnp_protocol_matches(protocol: &Protocol, packet: &Packet<'_>) -> bool {
        let port = i32::from(packet.port);
        if let Some(name) = &protocol.destination_named_port {
            // The container port's own protocol applies.
            return packet.destination.is_some_and(|pod| {
                pod.spec.iter().flat_map(|s| &s.containers).flat_map(|c| c.ports.iter().flatten()).any(|p| {
                    p.name.as_deref() == Some(name.as_str())
                        && protocol_of(p.protocol.as_deref()) == Some(packet.protocol)
                        && p.container_port == port
                })
            });
        }
        let (name, entry) = match (&protocol.tcp, &protocol.udp, &protocol.sctp) {
            (Some(e), _, _) => ("TCP", e),
            (_, Some(e), _) => ("UDP", e),
            (_, _, Some(e)) => ("SCTP", e),
            _ => return false,
        };
        name == packet.protocol
            && match &entry.destination_port {
                None => true,
                Some(Port { number: Some(n), .. }) => *n == port,
                Some(Port { range: Some(r), .. }) => (r.start..=r.end).contains(&port),
                Some(_) => false,
            }
    }
}

// ---------------------------------------------------------------------------------------
// The comparison.

struct NodeMaps {
    compiled: Compiled,
    contents: MapContents,
    slots: BTreeMap<PodRef, EndpointSlot>,
}

/// The classifier's contract on the compiled entries: the first hit among allow and deny
/// entries, the peer's own identity before the wildcard, longest port prefix first, then
/// the whole protocol, then any protocol; a miss drops where the direction is judged.
fn first_hit(maps: &NodeMaps, pod: &PodRef, direction: Direction, peer: IpAddr, protocol: u8, port: u16) -> bool {
    let endpoint = &maps.compiled.endpoints[pod];
    let peer_identity = compile::ipcache_lookup(&maps.contents, peer);
    let mut specs: Vec<(Option<u8>, Option<PortPrefix>)> = (1..=16u8)
        .rev()
        .map(|bits| (Some(protocol), Some(PortPrefix { port: port & !u16::MAX.checked_shr(u32::from(bits)).unwrap_or(0), bits })))
        .collect();
    specs.push((Some(protocol), None));
    specs.push((None, None));
    for peer in [peer_identity, identity::ANY] {
        for &(protocol, port) in &specs {
            let key = RuleKey { direction, peer, protocol, port };
            if endpoint.rules.contains_key(&key) {
                return true;
            }
            if endpoint.denies.contains_key(&key) {
                return false;
            }
        }
    }
    !endpoint.judged(direction)
}

/// The verdict at a local pod: from the compiled entries and from the rendered maps (they
/// must agree with the reference both).
fn judge(maps: &NodeMaps, pod: &PodRef, direction: Direction, peer: IpAddr, protocol: u8, port: u16) -> (bool, bool) {
    let model = first_hit(maps, pod, direction, peer, protocol, port);
    let rendered = compile::verdict(&maps.contents, maps.slots[pod].ifindex, direction, peer, protocol, port).allows();
    (model, rendered)
}

fn compile_node(state: &ClusterState, node: &str) -> NodeMaps {
    let compiled = compile::compile(state, &NodeContext { name: node.to_owned(), ips: Vec::new() });
    // Deliberately not sequential, so that ifindex and endpoint id are never confused.
    let slots: BTreeMap<PodRef, EndpointSlot> = compiled
        .endpoints
        .keys()
        .zip(1u32..)
        .map(|(pod, n)| (pod.clone(), EndpointSlot { ifindex: 100 + n * 7, id: n }))
        .collect();
    NodeMaps { contents: compile::render(&compiled, &slots, false), compiled, slots }
}

fn check(cluster: &ClusterGen) -> Result<(), TestCaseError> {
    let state = build(cluster);
    let nodes: BTreeMap<String, NodeMaps> =
        (0..NODES).map(|n| (format!("n{n}"), compile_node(&state, &format!("n{n}")))).collect();

    // Addresses: live pods (owner known), node addresses, terminated pods' old IPs, outsiders.
    let mut owners: BTreeMap<IpAddr, (PodRef, reference::PodView<'_>, String)> = BTreeMap::new();
    let mut addresses: BTreeSet<IpAddr> = EXTERNAL.iter().map(|a| a.parse().unwrap()).collect();
    let mut node_addresses: BTreeMap<String, BTreeSet<IpAddr>> = BTreeMap::new();
    for (i, pod) in cluster.pods.iter().enumerate() {
        let node = format!("n{}", pod.node);
        let set = node_addresses.entry(node.clone()).or_default();
        set.insert(node_v4(pod.node));
        set.insert(node_v6(pod.node));
        addresses.insert(node_v4(pod.node));
        addresses.insert(node_v6(pod.node));
        if pod.phase == 7 || pod.host_network {
            continue;
        }
        addresses.insert(pod_v4(i));
        if pod.ipv6 {
            addresses.insert(pod_v6(i));
        }
        if pod.phase == 8 {
            continue;
        }
        let pod_ref = PodRef::new(NAMESPACES[pod.namespace], format!("p{i}"));
        let ips = if pod.ipv6 { vec![pod_v4(i), pod_v6(i)] } else { vec![pod_v4(i)] };
        for ip in ips {
            let view = reference::PodView { pod: &state.pods[&pod_ref], namespace: pod_ref.namespace.clone() };
            owners.insert(ip, (pod_ref.clone(), view, node.clone()));
        }
    }

    let no_addresses = BTreeSet::new();
    for &source in &addresses {
        for &destination in &addresses {
            if source == destination || source.is_ipv4() != destination.is_ipv4() {
                continue;
            }
            let source_pod = owners.get(&source);
            let destination_pod = owners.get(&destination);
            if source_pod.is_none() && destination_pod.is_none() {
                continue;
            }
            if let (Some(s), Some(d)) = (source_pod, destination_pod)
                && s.0 == d.0
            {
                continue; // pod to itself is not judged
            }
            for (protocol, port) in PROBES {
                let protocol_number = match protocol {
                    "TCP" => 6,
                    "UDP" => 17,
                    _ => 132,
                };
                let expected_egress = source_pod.is_none_or(|(_, view, _)| {
                    reference::egress_allowed(&state, view, destination, destination_pod.map(|d| &d.1), protocol, port)
                });
                let expected_ingress = destination_pod.is_none_or(|(_, view, node)| {
                    let node_addresses = node_addresses.get(node).unwrap_or(&no_addresses);
                    reference::ingress_allowed(
                        &state,
                        view,
                        source,
                        source_pod.map(|s| &s.1),
                        node_addresses,
                        protocol,
                        port,
                    )
                });
                let (egress_model, egress_rendered) = source_pod.map_or((true, true), |(pod, _, node)| {
                    judge(&nodes[node], pod, Direction::Egress, destination, protocol_number, port)
                });
                let (ingress_model, ingress_rendered) = destination_pod.map_or((true, true), |(pod, _, node)| {
                    judge(&nodes[node], pod, Direction::Ingress, source, protocol_number, port)
                });
                let (actual_egress, actual_ingress) = (egress_model, ingress_model);
                prop_assert_eq!(
                    (actual_egress, actual_ingress),
                    (expected_egress, expected_ingress),
                    "(egress, ingress) {} ({:?}) -> {} ({:?}) {}/{}",
                    source,
                    source_pod.map(|s| s.0.to_string()),
                    destination,
                    destination_pod.map(|d| d.0.to_string()),
                    protocol,
                    port
                );
                prop_assert_eq!(
                    (egress_rendered, ingress_rendered),
                    (expected_egress, expected_ingress),
                    "rendered maps: (egress, ingress) {} -> {} {}/{}",
                    source,
                    destination,
                    protocol,
                    port
                );
            }
        }
    }
    Ok(())
}

// 256 cases by default (a few seconds; three in four clusters hold ClusterNetworkPolicies);
// PROPTEST_CASES=5000 for a deeper run.
proptest! {
    #[test]
    fn compiled_maps_agree_with_the_reference(cluster in cluster_gen()) {
        check(&cluster)?;
    }
}

/// A shape random clusters rarely hit: a Pass on a whole protocol from one peer, then a Deny
/// of everything from it, on a pod whose NetworkPolicy allows every peer on one port. The
/// passed packets on that port must reach the NetworkPolicy's allow (the resolver's key
/// refinement), the rest of the protocol its isolation.
#[test]
fn a_pass_over_a_wildcard_network_policy_port_agrees_with_the_reference() {
    let everything = || SelectorGen { labels: BTreeMap::new(), expressions: Vec::new() };
    let pod = |namespace| PodGen { namespace, labels: BTreeMap::new(), node: 0, host_network: false, phase: 0, ipv6: true, ports: BTreeMap::new() };
    let tcp_80 = PortGen { protocol: 1, kind: 1, number: 80, name: 0, end_port: None };
    let cluster = ClusterGen {
        namespace_labels: vec![BTreeMap::new(); 3],
        z_exists: true,
        pods: vec![pod(0), pod(1)],
        policies: vec![PolicyGen {
            namespace: 0,
            selector: Some(everything()),
            types: 2,
            ingress: Some(vec![RuleGen { peers: None, ports: Some(vec![tcp_80]) }]),
            egress: None,
        }],
        cluster_policies: vec![CnpGen {
            baseline: false,
            priority: 1,
            subject: (everything(), None),
            ingress: vec![
                CnpRuleGen {
                    action: 2,
                    peers: vec![CnpPeerGen::Pods(everything(), everything())],
                    protocols: Some(vec![CnpProtocolGen { kind: 0, port: 0, number: 80, end: 80, name: 0 }]),
                },
                CnpRuleGen { action: 1, peers: vec![CnpPeerGen::Namespaces(everything())], protocols: None },
            ],
            egress: Vec::new(),
        }],
    };
    check(&cluster).unwrap();
}
