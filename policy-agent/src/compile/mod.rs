//! The policy compiler: from cluster state and a node to the desired contents of every BPF
//! map. [`compile`] is pure and deterministic (`BTreeMap`s throughout, identities and cookies
//! derived from stable hashes); [`render`] turns its result into raw map entries, [`diff`]
//! into ordered updates, and [`verdict`] models the classifier's lookup for `explain` and the
//! tests.

mod cluster_policy;
mod incremental;
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
    EndpointSlot, Hit, MapContents, MapOp, MapUpdates, Verdict, decision, diff, ipcache_lookup, ipcache_prefix, isolated, lookup, render, verdict,
};
pub use cluster_policy::{RuleAction, Tier};
pub use incremental::{Check, CheckPoint, IncrementalCompiler, Reuse};
use cluster_policy::{ParsedClusterPolicy, parse_cluster_policy};
use policy::{ParsedPeer, ParsedPolicy, ParsedPort, ParsedRule, parse_policy};

use crate::resolve::{
    self, IdentityInputs, IdentityTable, Labels, fnv1a64, node_name, pod_ips,
    pod_labels,
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
/// The reference for [`IncrementalCompiler`], which must give the same result.
pub fn compile_with(state: &ClusterState, node: &NodeContext, allocator: &mut IdentityAllocator, now: std::time::Instant) -> Compiled {
    allocator.set_time(now);
    let mut problems = Vec::new();
    let policies: Vec<ParsedPolicy> = state.policies.values().map(|p| parse_policy(p, &mut problems)).collect();
    let cluster_policies = parse_cluster_policies(state, &mut problems);
    let policies: Vec<&ParsedPolicy> = policies.iter().collect();
    let inputs = PolicyInputs::collect(&policies, &cluster_policies);
    let table = resolve::resolve_identities(state, &node.name, &node.ips, &inputs.identity_inputs(), allocator, &mut problems);
    let peer_sets: Vec<PolicyPeers> = policies.iter().map(|p| resolve_policy_peers(p, &table)).collect();
    let parts = Parts { policies: &policies, peer_sets: peer_sets.iter().collect(), cluster_policies: &cluster_policies, inputs: &inputs, table: &table };
    assemble(state, node, &parts, problems)
}

/// The parsed policies with their resolved peers and identities: what endpoints are built from.
struct Parts<'a> {
    /// In name order.
    policies: &'a [&'a ParsedPolicy],
    /// The peers of `policies[i]`.
    peer_sets: Vec<&'a PolicyPeers>,
    /// In evaluation order.
    cluster_policies: &'a [ParsedClusterPolicy],
    inputs: &'a PolicyInputs,
    table: &'a IdentityTable,
}

/// Cookies, endpoints and problems from the parts.
fn assemble(state: &ClusterState, node: &NodeContext, parts: &Parts<'_>, mut problems: Vec<Problem>) -> Compiled {
    let cookies = allocate_cookies(parts.policies, parts.cluster_policies);
    let endpoints = {
        let sources = RuleSources {
            policies: parts.policies,
            by_namespace: policies_by_namespace(parts.policies),
            peer_sets: &parts.peer_sets,
            cluster_policies: parts.cluster_policies,
            cluster_peer_sets: resolve_cluster_peers(parts.cluster_policies, parts.table),
            cookies: &cookies,
            table: parts.table,
            ingress_named_ports: &parts.inputs.ingress_named_ports,
        };
        compile_endpoints(state, node, &sources)
    };
    report_equal_priorities(parts.cluster_policies, &endpoints, &mut problems);
    problems.sort();
    problems.dedup();
    Compiled {
        ipcache: parts.table.ipcache.clone(),
        endpoints,
        identities: parts.table.info.clone(),
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
    fn collect(policies: &[&ParsedPolicy], cluster_policies: &[ParsedClusterPolicy]) -> Self {
        let mut blocks = BTreeSet::new();
        let mut egress_named_ports = BTreeSet::new();
        let mut ingress_named_ports = BTreeSet::new();
        let directions = [Direction::Ingress, Direction::Egress];
        let network_rules = policies.iter().flat_map(|policy| {
            directions.into_iter().flat_map(move |d| policy.rules(d).into_iter().flatten().map(move |r| (d, &r.peers, &r.ports)))
        });
        let cluster_rules = cluster_policies
            .iter()
            .flat_map(|policy| directions.into_iter().flat_map(move |d| policy.rules(d).iter().map(move |r| (d, &r.peers, &r.ports))));
        for (direction, peers, ports) in network_rules.chain(cluster_rules) {
            for peer in peers.iter().flatten() {
                if let ParsedPeer::Block(block) = peer {
                    blocks.insert(block.clone());
                }
            }
            let named = if direction == Direction::Egress { &mut egress_named_ports } else { &mut ingress_named_ports };
            for port in ports.iter().flatten() {
                if let ParsedPort::Named(protocol, name) = port {
                    named.insert((name.clone(), *protocol));
                }
            }
        }
        Self { blocks: blocks.into_iter().collect(), egress_named_ports, ingress_named_ports }
    }

    fn identity_inputs(&self) -> IdentityInputs<'_> {
        IdentityInputs { blocks: &self.blocks, egress_named_ports: &self.egress_named_ports }
    }
}

/// The valid ClusterNetworkPolicies in evaluation order: tier, then priority, then name
/// (the documented tie-break for equal priorities).
fn parse_cluster_policies(state: &ClusterState, problems: &mut Vec<Problem>) -> Vec<ParsedClusterPolicy> {
    let mut parsed: Vec<ParsedClusterPolicy> = state.cluster_policies.values().map(|p| parse_cluster_policy(p, problems)).collect();
    parsed.sort_by(|a, b| (a.tier, a.priority, &a.name).cmp(&(b.tier, b.priority, &b.name)));
    parsed
}

/// Warns about ClusterNetworkPolicies of the same tier and priority that apply to the same
/// pod in the same direction: the name order decides between them.
fn report_equal_priorities(cluster_policies: &[ParsedClusterPolicy], endpoints: &BTreeMap<PodRef, EndpointPolicy>, problems: &mut Vec<Problem>) {
    let by_name: BTreeMap<&str, &ParsedClusterPolicy> = cluster_policies.iter().map(|p| (p.name.as_str(), p)).collect();
    let mut overlaps: BTreeMap<(&str, &str), &PodRef> = BTreeMap::new();
    for (pod, endpoint) in endpoints {
        for direction in [Direction::Ingress, Direction::Egress] {
            for pair in endpoint.cluster_policies(direction).windows(2) {
                let (Some(a), Some(b)) = (by_name.get(pair[0].as_str()), by_name.get(pair[1].as_str())) else { continue };
                if (a.tier, a.priority) == (b.tier, b.priority) {
                    overlaps.entry((a.name.as_str(), b.name.as_str())).or_insert(pod);
                }
            }
        }
    }
    for ((first, second), pod) in overlaps {
        let policy = by_name[first];
        problems.push(Problem::new(
            format!("ClusterNetworkPolicy {first}"),
            "spec.priority",
            format!(
                "same tier ({}) and priority ({}) as ClusterNetworkPolicy {second}, and both apply to pod {pod} (and maybe others): {first} is evaluated first (name order)",
                policy.tier, policy.priority
            ),
        ));
    }
}

fn rule_ref(policy: &ParsedPolicy, direction: Direction, rule: &ParsedRule) -> RuleRef {
    RuleRef { namespace: policy.name.namespace.clone(), policy: policy.name.name.clone(), direction, index: rule.index, tier: None }
}

fn cluster_rule_ref(policy: &ParsedClusterPolicy, direction: Direction, rule: &cluster_policy::ParsedClusterRule) -> RuleRef {
    RuleRef {
        namespace: String::new(),
        policy: policy.name.clone(),
        direction,
        index: rule.index,
        tier: Some(TierRule { tier: policy.tier, priority: policy.priority, action: rule.action, name: rule.name.clone() }),
    }
}

/// A cookie for every rule of every valid policy, stable across runs (a hash of the rule's name).
fn allocate_cookies(policies: &[&ParsedPolicy], cluster_policies: &[ParsedClusterPolicy]) -> BTreeMap<RuleRef, u32> {
    let directions = [Direction::Ingress, Direction::Egress];
    let mut rule_refs: BTreeSet<RuleRef> = policies
        .iter()
        .flat_map(|policy| {
            directions.into_iter().flat_map(move |direction| {
                policy.rules(direction).into_iter().flatten().map(move |rule| rule_ref(policy, direction, rule))
            })
        })
        .collect();
    rule_refs.extend(cluster_policies.iter().flat_map(|policy| {
        directions.into_iter().flat_map(move |d| policy.rules(d).iter().map(move |rule| cluster_rule_ref(policy, d, rule)))
    }));
    let numbers = resolve::allocate(
        rule_refs.iter(),
        |rule| {
            let kind = if rule.tier.is_some() { "ClusterNetworkPolicy\0" } else { "" };
            fnv1a64(format!("{kind}{}\0{}\0{}\0{}", rule.namespace, rule.policy, rule.direction as u8, rule.index).as_bytes())
        },
        FIRST_RULE_COOKIE,
        1 << 32,
    );
    numbers.into_iter().map(|(rule, cookie)| (rule.clone(), cookie)).collect()
}

/// The peers of each rule of one policy, by direction and rule index.
type PolicyPeers = BTreeMap<(Direction, usize), PeerSet>;

/// The peers of each rule of `policy`. Peers do not depend on the selected pod, so each rule
/// is resolved once.
fn resolve_policy_peers(policy: &ParsedPolicy, table: &IdentityTable) -> PolicyPeers {
    let mut sets = BTreeMap::new();
    for direction in [Direction::Ingress, Direction::Egress] {
        for rule in policy.rules(direction).into_iter().flatten() {
            let peers = resolve_peers(&policy.name.namespace, rule.peers.as_deref(), table, &table.namespace_labels);
            sets.insert((direction, rule.index), peers);
        }
    }
    sets
}

/// [`resolve_policy_peers`] for every ClusterNetworkPolicy (their peers always name namespaces).
fn resolve_cluster_peers(policies: &[ParsedClusterPolicy], table: &IdentityTable) -> Vec<PolicyPeers> {
    policies
        .iter()
        .map(|policy| {
            [Direction::Ingress, Direction::Egress]
                .into_iter()
                .flat_map(|d| policy.rules(d).iter().map(move |rule| (d, rule)))
                .map(|(d, rule)| ((d, rule.index), resolve_peers("", rule.peers.as_deref(), table, &table.namespace_labels)))
                .collect()
        })
        .collect()
}

/// Indices into `policies`, by the policy's namespace.
fn policies_by_namespace<'a>(policies: &[&'a ParsedPolicy]) -> BTreeMap<&'a str, Vec<usize>> {
    let mut by_namespace: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (index, policy) in policies.iter().enumerate() {
        by_namespace.entry(policy.name.namespace.as_str()).or_default().push(index);
    }
    by_namespace
}

/// What every endpoint's rules are built from.
struct RuleSources<'a> {
    policies: &'a [&'a ParsedPolicy],
    by_namespace: BTreeMap<&'a str, Vec<usize>>,
    peer_sets: &'a [&'a PolicyPeers],
    /// In evaluation order.
    cluster_policies: &'a [ParsedClusterPolicy],
    cluster_peer_sets: Vec<PolicyPeers>,
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
    (pod_ref.namespace.clone(), pod_labels(pod), resolve::resolve_named_ports(pod, ingress_named_ports))
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
        let policy = sources.policies[index];
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
                emit_rule(&mut endpoint.rules, direction, rule.ports.as_deref(), peers, own_ports, sources.table, cookie);
            }
        }
    }
    let namespace_labels = sources.table.namespace_labels.get(namespace.as_str()).cloned().unwrap_or_else(|| {
        Labels::from([(crate::state::NAMESPACE_NAME_LABEL.to_owned(), namespace.clone())])
    });
    let applying: Vec<usize> =
        (0..sources.cluster_policies.len()).filter(|&i| sources.cluster_policies[i].selects(&namespace_labels, labels)).collect();
    for direction in [Direction::Ingress, Direction::Egress] {
        let names = applying.iter().map(|&i| &sources.cluster_policies[i]).filter(|p| !p.rules(direction).is_empty()).map(|p| p.name.clone());
        match direction {
            Direction::Ingress => endpoint.ingress_cluster_policies = names.collect(),
            Direction::Egress => endpoint.egress_cluster_policies = names.collect(),
        }
    }
    if endpoint.judged(Direction::Ingress) {
        // The node reaches its pods for probes whatever the policies say.
        for &host in &sources.table.host_identities {
            let key = RuleKey { direction: Direction::Ingress, peer: host, protocol: None, port: None };
            endpoint.rules.insert(key, COOKIE_NODE);
        }
    }
    for direction in [Direction::Ingress, Direction::Egress] {
        if !endpoint.cluster_policies(direction).is_empty() {
            apply_tiers(&mut endpoint, direction, &applying, sources, own_ports);
        }
    }
    endpoint
}

/// Replaces one direction's NetworkPolicy entries by the tiers' verdicts: node and
/// NetworkPolicy entries plus the rules of the ClusterNetworkPolicies (`applying`, indices
/// in evaluation order) that apply to the endpoint.
fn apply_tiers(
    endpoint: &mut EndpointPolicy,
    direction: Direction,
    applying: &[usize],
    sources: &RuleSources<'_>,
    own_ports: &BTreeMap<(String, u8), u16>,
) {
    let mut atoms: Vec<tiers::Atom> = Vec::new();
    for (key, cookie) in endpoint.rules.iter().filter(|(k, _)| k.direction == direction) {
        let stage = if *cookie == COOKIE_NODE { tiers::Stage::Node } else { tiers::Stage::NetworkPolicy };
        atoms.push(tiers::Atom { stage, action: RuleAction::Accept, cookie: *cookie, key: *key });
    }
    for &index in applying {
        let policy = &sources.cluster_policies[index];
        for rule in policy.rules(direction) {
            let Some(peers) = sources.cluster_peer_sets[index].get(&(direction, rule.index)) else { continue };
            let Some(&cookie) = sources.cookies.get(&cluster_rule_ref(policy, direction, rule)) else { continue };
            let mut keys = BTreeMap::new();
            emit_rule(&mut keys, direction, rule.ports.as_deref(), peers, own_ports, sources.table, cookie);
            let stage = tiers::Stage::from(policy.tier);
            atoms.extend(keys.into_keys().map(|key| tiers::Atom { stage, action: rule.action, cookie, key }));
        }
    }
    // Stable: precedence order within a stage is kept.
    atoms.sort_by_key(|atom| atom.stage);
    let (allows, denies) = tiers::resolve(direction, &atoms, endpoint.isolated(direction));
    endpoint.rules.retain(|key, _| key.direction != direction);
    endpoint.rules.extend(allows);
    endpoint.denies.extend(denies);
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

/// `policy_namespace`: where a peer without a namespace selector looks for pods.
fn resolve_peers(
    policy_namespace: &str,
    peers: Option<&[ParsedPeer]>,
    table: &IdentityTable,
    namespace_labels: &BTreeMap<String, Labels>,
) -> PeerSet {
    let Some(peers) = peers else {
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
                for group in table.groups.get(policy_namespace).into_iter().flatten() {
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
    ports: Option<&[ParsedPort]>,
    peers: &PeerSet,
    own_ports: &BTreeMap<(String, u8), u16>,
    table: &IdentityTable,
    cookie: u32,
) {
    let peer_ids: Vec<u32> = if peers.any { vec![identity::ANY] } else { peers.identities.iter().copied().collect() };
    let mut add = |peer: u32, protocol: Option<u8>, port: Option<PortPrefix>| {
        rules.entry(RuleKey { direction, peer, protocol, port }).or_insert(cookie);
    };
    let Some(ports) = ports else {
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
