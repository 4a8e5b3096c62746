//! The policy compiler: from cluster state and a node to the desired contents of every BPF
//! map. [`compile`] is pure and deterministic (`BTreeMap`s throughout, identities and cookies
//! derived from stable hashes); [`render`] turns its result into raw map entries, [`diff`]
//! into ordered updates, and [`verdict`] models the classifier's lookup for `explain` and the
//! tests.

mod cluster_policy;
mod maps;
mod policy;
mod tiers;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use k8s_openapi::api::core::v1::Pod;
use policy_common::Direction;
use policy_common::identity;
use policy_common::policy::{COOKIE_DEFAULT_ALLOW, COOKIE_ISOLATED, COOKIE_NODE, FIRST_RULE_COOKIE, PortPrefix, PortRangePrefixes};

pub use maps::{
    EndpointSlot, MapContents, MapOp, MapUpdates, Verdict, diff, ipcache_lookup, ipcache_prefix, isolated, lookup, render, verdict,
};
pub use cluster_policy::{RuleAction, Tier};
use policy::{ParsedPeer, ParsedPolicy, ParsedPort, ParsedRule, parse_policy};

use crate::resolve::{
    self, IdentityInputs, IdentityTable, Labels, fnv1a64, node_name, pod_ips,
    pod_labels, resolve_named_port,
};
pub use crate::resolve::{IdentityAllocator, IdentityInfo, IpPrefix};
use crate::state::ClusterState;
pub use crate::state::{NamespacedName, PodRef, Problem};

/// The node being compiled for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeContext {
    /// Matches the pods' `spec.nodeName`.
    pub name: String,
    /// The node's own addresses (the pods' `status.hostIPs` on this node are added to them).
    pub ips: Vec<IpAddr>,
}

/// One allow entry of an endpoint, before it becomes a policy map key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleKey {
    pub direction: Direction,
    /// The peer's identity, or [`identity::ANY`].
    pub peer: u32,
    /// `None`: every protocol.
    pub protocol: Option<u8>,
    /// `None`: every port of the protocol.
    pub port: Option<PortPrefix>,
}

/// What one local pod is allowed to do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointPolicy {
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    pub ingress_isolated: bool,
    pub egress_isolated: bool,
    /// The policies that select the pod for ingress (and so isolate it), sorted.
    pub ingress_policies: Vec<NamespacedName>,
    pub egress_policies: Vec<NamespacedName>,
    /// Allow entries, each with the cookie of the rule that produced it.
    pub rules: BTreeMap<RuleKey, u32>,
    /// Deny entries (a ClusterNetworkPolicy Deny won, or NetworkPolicy isolation denies
    /// where a less specific entry would otherwise allow), with the deciding cookie.
    pub denies: BTreeMap<RuleKey, u32>,
    /// The ClusterNetworkPolicies whose subject is the pod, per direction with rules, sorted
    /// by tier and precedence.
    pub ingress_cluster_policies: Vec<String>,
    pub egress_cluster_policies: Vec<String>,
}

impl EndpointPolicy {
    pub fn isolated(&self, direction: Direction) -> bool {
        match direction {
            Direction::Ingress => self.ingress_isolated,
            Direction::Egress => self.egress_isolated,
        }
    }

    pub fn policies(&self, direction: Direction) -> &[NamespacedName] {
        match direction {
            Direction::Ingress => &self.ingress_policies,
            Direction::Egress => &self.egress_policies,
        }
    }

    pub fn cluster_policies(&self, direction: Direction) -> &[String] {
        match direction {
            Direction::Ingress => &self.ingress_cluster_policies,
            Direction::Egress => &self.egress_cluster_policies,
        }
    }

    /// Whether the classifier judges this direction: a NetworkPolicy isolates it or a
    /// ClusterNetworkPolicy applies to it (then its entries decide, a miss drops).
    pub fn judged(&self, direction: Direction) -> bool {
        self.isolated(direction) || !self.cluster_policies(direction).is_empty()
    }
}

/// Names one rule of one policy: what a cookie stands for.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleRef {
    /// Empty for a ClusterNetworkPolicy.
    pub namespace: String,
    pub policy: String,
    pub direction: Direction,
    /// Index in `spec.ingress` or `spec.egress`.
    pub index: usize,
    /// `Some` for a ClusterNetworkPolicy rule.
    pub tier: Option<TierRule>,
}

/// What makes a ClusterNetworkPolicy rule's cookie explainable.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TierRule {
    pub tier: Tier,
    pub priority: i32,
    pub action: RuleAction,
    /// The rule's `name`, if it has one.
    pub name: Option<String>,
}

impl RuleRef {
    /// The action of the rule: NetworkPolicy rules only allow.
    pub fn action(&self) -> RuleAction {
        self.tier.as_ref().map_or(RuleAction::Accept, |t| t.action)
    }
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = match self.direction {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        };
        match &self.tier {
            None => write!(f, "{}/{} spec.{list}[{}]", self.namespace, self.policy, self.index),
            Some(tier) => {
                write!(f, "ClusterNetworkPolicy/{} ({}, priority {}, {list} rule {}", self.policy, tier.tier, tier.priority, self.index)?;
                if let Some(name) = &tier.name {
                    write!(f, " {name:?}")?;
                }
                write!(f, ": {})", tier.action)
            }
        }
    }
}

/// The desired state of the node's maps, with what is needed to explain it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    /// Pod addresses cluster-wide (/32, /128), ipBlock prefixes and the node's addresses.
    pub ipcache: BTreeMap<IpPrefix, u32>,
    /// Local pods (on this node, with an IP, not hostNetwork, not terminated).
    pub endpoints: BTreeMap<PodRef, EndpointPolicy>,
    pub identities: BTreeMap<u32, IdentityInfo>,
    /// The rule behind every cookie of every valid policy. [`COOKIE_NODE`] names no rule and
    /// is not listed (see [`Compiled::describe_cookie`]).
    pub cookies: BTreeMap<u32, RuleRef>,
    pub problems: Vec<Problem>,
}

impl Compiled {
    /// A cookie in words, for explain and flow logs.
    pub fn describe_cookie(&self, cookie: u32) -> String {
        if cookie == COOKIE_NODE {
            "node traffic (always allowed)".to_owned()
        } else if cookie == COOKIE_DEFAULT_ALLOW {
            "no policy decided (default allow)".to_owned()
        } else if cookie == COOKIE_ISOLATED {
            "isolated by NetworkPolicy: no rule allows".to_owned()
        } else if let Some(rule) = self.cookies.get(&cookie) {
            rule.to_string()
        } else {
            format!("unknown cookie {cookie}")
        }
    }
}

/// Endpoint slots numbered 1, 2, ... in pod order, as the agent would hand them out on a
/// fresh node: for compiling without a datapath (explain, benchmarks).
pub fn sequential_slots(compiled: &Compiled) -> BTreeMap<PodRef, EndpointSlot> {
    compiled.endpoints.keys().zip(1u32..).map(|(pod, n)| (pod.clone(), EndpointSlot { ifindex: n, id: n })).collect()
}

/// Whether a pod is enforced on its node: scheduled there, with an IP, not in the host
/// network, not terminated.
pub fn is_local_endpoint(pod: &Pod, node: &str) -> bool {
    node_name(pod) == Some(node) && resolve::is_live_pod(pod)
}

/// Compiles the state for one node. Pure: the same state and node give the same result.
pub fn compile(state: &ClusterState, node: &NodeContext) -> Compiled {
    compile_with(state, node, &mut IdentityAllocator::default(), std::time::Instant::now())
}

/// [`compile`] with identity numbers kept across compiles by `allocator` (at time `now`).
pub fn compile_with(state: &ClusterState, node: &NodeContext, allocator: &mut IdentityAllocator, now: std::time::Instant) -> Compiled {
    allocator.set_time(now);
    let mut problems = Vec::new();
    let policies: Vec<ParsedPolicy> = state.policies.values().map(|p| parse_policy(p, &mut problems)).collect();
    let inputs = PolicyInputs::collect(&policies);
    let table = resolve::resolve_identities(
        state,
        &node.name,
        &node.ips,
        &IdentityInputs { blocks: &inputs.blocks, egress_named_ports: &inputs.egress_named_ports },
        allocator,
        &mut problems,
    );
    let cookies = allocate_cookies(&policies);
    let endpoints = {
        let sources = RuleSources {
            policies: &policies,
            by_namespace: policies_by_namespace(&policies),
            peer_sets: resolve_all_peers(&policies, &table),
            cookies: &cookies,
            table: &table,
            ingress_named_ports: &inputs.ingress_named_ports,
        };
        compile_endpoints(state, node, &sources)
    };
    problems.sort();
    problems.dedup();
    Compiled {
        ipcache: table.ipcache,
        endpoints,
        identities: table.info,
        cookies: cookies.into_iter().map(|(rule, cookie)| (cookie, rule)).collect(),
        problems,
    }
}

/// What identities and endpoints depend on besides labels: the ipBlocks and named ports the
/// policies use.
struct PolicyInputs {
    blocks: Vec<resolve::CidrBlock>,
    /// Resolved on each peer, so part of a pod's identity.
    egress_named_ports: BTreeSet<(String, u8)>,
    /// Resolved on the selected pod, so part of an endpoint's shape.
    ingress_named_ports: BTreeSet<(String, u8)>,
}

impl PolicyInputs {
    fn collect(policies: &[ParsedPolicy]) -> Self {
        let mut blocks = BTreeSet::new();
        let mut egress_named_ports = BTreeSet::new();
        let mut ingress_named_ports = BTreeSet::new();
        for policy in policies {
            for (direction, rules) in [(Direction::Ingress, &policy.ingress), (Direction::Egress, &policy.egress)] {
                for rule in rules.iter().flatten() {
                    for peer in rule.peers.iter().flatten() {
                        if let ParsedPeer::Block(block) = peer {
                            blocks.insert(block.clone());
                        }
                    }
                    let named = if direction == Direction::Egress { &mut egress_named_ports } else { &mut ingress_named_ports };
                    for port in rule.ports.iter().flatten() {
                        if let ParsedPort::Named(protocol, name) = port {
                            named.insert((name.clone(), *protocol));
                        }
                    }
                }
            }
        }
        Self { blocks: blocks.into_iter().collect(), egress_named_ports, ingress_named_ports }
    }
}

fn rule_ref(policy: &ParsedPolicy, direction: Direction, rule: &ParsedRule) -> RuleRef {
    RuleRef { namespace: policy.name.namespace.clone(), policy: policy.name.name.clone(), direction, index: rule.index, tier: None }
}

/// A cookie for every rule of every valid policy, stable across runs (a hash of the rule's name).
fn allocate_cookies(policies: &[ParsedPolicy]) -> BTreeMap<RuleRef, u32> {
    let rule_refs: BTreeSet<RuleRef> = policies
        .iter()
        .flat_map(|policy| {
            [Direction::Ingress, Direction::Egress].into_iter().flat_map(move |direction| {
                policy.rules(direction).into_iter().flatten().map(move |rule| rule_ref(policy, direction, rule))
            })
        })
        .collect();
    let numbers = resolve::allocate(
        rule_refs.iter(),
        |rule| {
            fnv1a64(format!("{}\0{}\0{}\0{}", rule.namespace, rule.policy, rule.direction as u8, rule.index).as_bytes())
        },
        FIRST_RULE_COOKIE,
        1 << 32,
    );
    numbers.into_iter().map(|(rule, cookie)| (rule.clone(), cookie)).collect()
}

/// The peers of each rule, per policy (same order as `policies`), keyed by direction and
/// rule index. Peers do not depend on the selected pod, so each rule is resolved once.
fn resolve_all_peers(policies: &[ParsedPolicy], table: &IdentityTable) -> Vec<BTreeMap<(Direction, usize), PeerSet>> {
    let namespace_labels = &table.namespace_labels;
    policies
        .iter()
        .map(|policy| {
            let mut sets = BTreeMap::new();
            for direction in [Direction::Ingress, Direction::Egress] {
                for rule in policy.rules(direction).into_iter().flatten() {
                    sets.insert((direction, rule.index), resolve_peers(policy, rule, table, namespace_labels));
                }
            }
            sets
        })
        .collect()
}

/// Indices into `policies`, by the policy's namespace.
fn policies_by_namespace(policies: &[ParsedPolicy]) -> BTreeMap<&str, Vec<usize>> {
    let mut by_namespace: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (index, policy) in policies.iter().enumerate() {
        by_namespace.entry(policy.name.namespace.as_str()).or_default().push(index);
    }
    by_namespace
}

/// What every endpoint's rules are built from.
struct RuleSources<'a> {
    policies: &'a [ParsedPolicy],
    by_namespace: BTreeMap<&'a str, Vec<usize>>,
    peer_sets: Vec<BTreeMap<(Direction, usize), PeerSet>>,
    cookies: &'a BTreeMap<RuleRef, u32>,
    table: &'a IdentityTable,
    ingress_named_ports: &'a BTreeSet<(String, u8)>,
}

/// The local pods' endpoint policies. Endpoints of the same shape (namespace, labels,
/// ingress named ports) get the same rules, so each shape is compiled once.
fn compile_endpoints(
    state: &ClusterState,
    node: &NodeContext,
    sources: &RuleSources<'_>,
) -> BTreeMap<PodRef, EndpointPolicy> {
    let mut memo: BTreeMap<EndpointShape, EndpointPolicy> = BTreeMap::new();
    let mut endpoints = BTreeMap::new();
    for (pod_ref, pod) in &state.pods {
        if !is_local_endpoint(pod, &node.name) {
            continue;
        }
        let Some((ipv4, ipv6)) = endpoint_addresses(pod) else { continue };
        let shape = endpoint_shape(pod_ref, pod, sources.ingress_named_ports);
        let template = memo.entry(shape).or_insert_with_key(|shape| endpoint_rules(sources, shape));
        let mut endpoint = template.clone();
        endpoint.ipv4 = ipv4;
        endpoint.ipv6 = ipv6;
        endpoints.insert(pod_ref.clone(), endpoint);
    }
    endpoints
}

/// A pod's first IPv4 and first IPv6 address; `None` if it has neither.
fn endpoint_addresses(pod: &Pod) -> Option<(Option<Ipv4Addr>, Option<Ipv6Addr>)> {
    // Problems with these addresses were reported during identity resolution.
    let ips = pod_ips(pod, &mut Vec::new());
    let ipv4 = ips.iter().find_map(|ip| match ip {
        IpAddr::V4(v4) => Some(*v4),
        IpAddr::V6(_) => None,
    });
    let ipv6 = ips.iter().find_map(|ip| match ip {
        IpAddr::V6(v6) => Some(*v6),
        IpAddr::V4(_) => None,
    });
    (ipv4.is_some() || ipv6.is_some()).then_some((ipv4, ipv6))
}

fn endpoint_shape(pod_ref: &PodRef, pod: &Pod, ingress_named_ports: &BTreeSet<(String, u8)>) -> EndpointShape {
    let own_ports = ingress_named_ports
        .iter()
        .filter_map(|(name, protocol)| resolve_named_port(pod, name, *protocol).map(|port| ((name.clone(), *protocol), port)))
        .collect();
    (pod_ref.namespace.clone(), pod_labels(pod), own_ports)
}

/// The isolation and allow entries of an endpoint of this shape (addresses not filled in).
fn endpoint_rules(sources: &RuleSources<'_>, (namespace, labels, own_ports): &EndpointShape) -> EndpointPolicy {
    let selecting = sources
        .by_namespace
        .get(namespace.as_str())
        .into_iter()
        .flatten()
        .filter(|index| sources.policies[**index].selector.as_ref().is_some_and(|s| s.matches(labels)));
    let mut endpoint = EndpointPolicy::default();
    for &index in selecting {
        let policy = &sources.policies[index];
        for direction in [Direction::Ingress, Direction::Egress] {
            let Some(rules) = policy.rules(direction) else { continue };
            let (isolated, isolating) = match direction {
                Direction::Ingress => (&mut endpoint.ingress_isolated, &mut endpoint.ingress_policies),
                Direction::Egress => (&mut endpoint.egress_isolated, &mut endpoint.egress_policies),
            };
            *isolated = true;
            isolating.push(policy.name.clone());
            for rule in rules {
                let Some(peers) = sources.peer_sets[index].get(&(direction, rule.index)) else { continue };
                let cookie = sources.cookies.get(&rule_ref(policy, direction, rule)).copied().unwrap_or(COOKIE_NODE);
                emit_rule(&mut endpoint.rules, direction, rule, peers, own_ports, sources.table, cookie);
            }
        }
    }
    if endpoint.ingress_isolated {
        // The node reaches its pods for probes whatever the policies say.
        for &host in &sources.table.host_identities {
            let key = RuleKey { direction: Direction::Ingress, peer: host, protocol: None, port: None };
            endpoint.rules.insert(key, COOKIE_NODE);
        }
    }
    endpoint
}

/// What an endpoint's rules depend on: namespace, labels and its ingress named ports.
type EndpointShape = (String, Labels, BTreeMap<(String, u8), u16>);

/// The identities one rule's peer list matches.
#[derive(Clone, Debug, Default)]
struct PeerSet {
    /// Every peer (no `from`/`to`): the wildcard identity.
    any: bool,
    identities: BTreeSet<u32>,
}

fn resolve_peers(
    policy: &ParsedPolicy,
    rule: &ParsedRule,
    table: &IdentityTable,
    namespace_labels: &BTreeMap<String, Labels>,
) -> PeerSet {
    let Some(peers) = &rule.peers else {
        return PeerSet { any: true, identities: BTreeSet::new() };
    };
    let mut identities = BTreeSet::new();
    for peer in peers {
        match peer {
            ParsedPeer::Block(block) => {
                if let Ok(index) = table.blocks.binary_search(block) {
                    identities.extend(table.block_members[index].iter().copied());
                }
            }
            ParsedPeer::Pods { namespaces: None, pods } => {
                for group in table.groups.get(&policy.name.namespace).into_iter().flatten() {
                    if pods.matches(&group.pod_labels) {
                        identities.extend(group.identities.iter().copied());
                    }
                }
            }
            ParsedPeer::Pods { namespaces: Some(namespaces), pods } => {
                for (namespace, groups) in &table.groups {
                    if !namespace_labels.get(namespace.as_str()).is_some_and(|labels| namespaces.matches(labels)) {
                        continue;
                    }
                    for group in groups {
                        if pods.matches(&group.pod_labels) {
                            identities.extend(group.identities.iter().copied());
                        }
                    }
                }
            }
        }
    }
    PeerSet { any: false, identities }
}

/// Adds the entries of one rule for one endpoint. The first rule (in policy name, direction,
/// rule order) to produce a key names it.
fn emit_rule(
    rules: &mut BTreeMap<RuleKey, u32>,
    direction: Direction,
    rule: &ParsedRule,
    peers: &PeerSet,
    own_ports: &BTreeMap<(String, u8), u16>,
    table: &IdentityTable,
    cookie: u32,
) {
    let peer_ids: Vec<u32> = if peers.any { vec![identity::ANY] } else { peers.identities.iter().copied().collect() };
    let mut add = |peer: u32, protocol: Option<u8>, port: Option<PortPrefix>| {
        rules.entry(RuleKey { direction, peer, protocol, port }).or_insert(cookie);
    };
    let Some(ports) = &rule.ports else {
        for &peer in &peer_ids {
            add(peer, None, None);
        }
        return;
    };
    for port in ports {
        match port {
            ParsedPort::Protocol(protocol) => {
                for &peer in &peer_ids {
                    add(peer, Some(*protocol), None);
                }
            }
            ParsedPort::Range(protocol, first, last) => {
                for prefix in PortRangePrefixes::new(*first, *last) {
                    // A block of all 65536 ports is the same entry as "any port".
                    let prefix = (prefix.bits > 0).then_some(prefix);
                    for &peer in &peer_ids {
                        add(peer, Some(*protocol), prefix);
                    }
                }
            }
            ParsedPort::Named(protocol, name) => {
                let key = (name.clone(), *protocol);
                match direction {
                    // Ingress: the destination is the endpoint itself.
                    Direction::Ingress => {
                        if let Some(port) = own_ports.get(&key) {
                            for &peer in &peer_ids {
                                add(peer, Some(*protocol), Some(PortPrefix { port: *port, bits: 16 }));
                            }
                        }
                    }
                    // Egress: each peer pod resolves the name; its identity pins the number.
                    Direction::Egress => {
                        let candidates: Box<dyn Iterator<Item = u32>> = if peers.any {
                            Box::new(table.pod_identities())
                        } else {
                            Box::new(peers.identities.iter().copied())
                        };
                        for peer in candidates {
                            if let Some(port) = table.named_ports.get(&peer).and_then(|ports| ports.get(&key)) {
                                add(peer, Some(*protocol), Some(PortPrefix { port: *port, bits: 16 }));
                            }
                        }
                    }
                }
            }
        }
    }
}
