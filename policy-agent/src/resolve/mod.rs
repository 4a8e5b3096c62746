//! Label selectors, CIDR blocks and security identities.
//!
//! An address's identity is derived from a canonical key that holds everything a policy can
//! tell apart about it:
//! - a pod address: (namespace, namespace labels, pod labels, the ipBlocks that match this
//!   very address, and the ports that the egress rules' named ports resolve to on the pod);
//! - any other prefix in the ipcache: the set of ipBlocks an address whose longest match is
//!   that prefix falls in (a CIDR identity), or WORLD when none;
//! - an address of this node: HOST, or a host identity keyed by its ipBlocks.
//!
//! So pods with equal labels share an identity and policy entries scale with identities, yet
//! ipBlocks and egress named ports stay exact per address. Derived numbers come from an
//! [`IdentityAllocator`]: a hash of the key (FNV-1a 64) with linear probing, kept by the key
//! while it exists and held back after, so the same state gives the same numbers on every
//! run and a number never moves to another label set while entries may name it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::IPBlock;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use policy_common::identity;
use policy_common::proto;

use crate::state::{ClusterState, PodRef, Problem, pod_ref};

mod update;
pub use update::{changed_pods, update_pod_addresses};

pub type Labels = BTreeMap<String, String>;

// ---------------------------------------------------------------------------------------
// Label selectors

/// A validated label selector; every requirement must hold (an empty selector matches all).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Requirement {
    In(String, BTreeSet<String>),
    NotIn(String, BTreeSet<String>),
    Exists(String),
    DoesNotExist(String),
}

impl Selector {
    /// The selector that matches everything (`{}`, or an absent selector).
    pub const fn everything() -> Self {
        Self { requirements: Vec::new() }
    }

    /// Validates a selector. Errors are (field path below the selector, message); an invalid
    /// selector must match nothing, so the caller drops it.
    pub fn parse(selector: &LabelSelector) -> Result<Self, Vec<(String, String)>> {
        let mut requirements = Vec::new();
        let mut errors = Vec::new();
        for (key, value) in selector.match_labels.iter().flatten() {
            requirements.push(Requirement::In(key.clone(), BTreeSet::from([value.clone()])));
        }
        for (index, expression) in selector.match_expressions.iter().flatten().enumerate() {
            let field = format!("matchExpressions[{index}]");
            let key = expression.key.clone();
            let values: BTreeSet<String> = expression.values.iter().flatten().cloned().collect();
            if key.is_empty() {
                errors.push((format!("{field}.key"), "must not be empty".to_owned()));
                continue;
            }
            let requirement = match expression.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    errors.push((
                        format!("{field}.values"),
                        format!("operator {} needs at least one value", expression.operator),
                    ));
                    continue;
                }
                "In" => Requirement::In(key, values),
                "NotIn" => Requirement::NotIn(key, values),
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    errors.push((
                        format!("{field}.values"),
                        format!("must be empty for operator {}", expression.operator),
                    ));
                    continue;
                }
                "Exists" => Requirement::Exists(key),
                "DoesNotExist" => Requirement::DoesNotExist(key),
                other => {
                    errors.push((
                        format!("{field}.operator"),
                        format!("unknown operator {other:?} (In, NotIn, Exists, DoesNotExist)"),
                    ));
                    continue;
                }
            };
            requirements.push(requirement);
        }
        if errors.is_empty() {
            requirements.sort();
            requirements.dedup();
            Ok(Self { requirements })
        } else {
            Err(errors)
        }
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|requirement| match requirement {
            Requirement::In(key, values) => labels.get(key).is_some_and(|v| values.contains(v)),
            // NotIn holds when the key is absent.
            Requirement::NotIn(key, values) => labels.get(key).is_none_or(|v| !values.contains(v)),
            Requirement::Exists(key) => labels.contains_key(key),
            Requirement::DoesNotExist(key) => !labels.contains_key(key),
        })
    }

    pub fn is_everything(&self) -> bool {
        self.requirements.is_empty()
    }
}

// ---------------------------------------------------------------------------------------
// Prefixes and ipBlocks

/// An IPv4 or IPv6 prefix with its host bits cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IpPrefix {
    addr: IpAddr,
    len: u8,
}

impl IpPrefix {
    /// `addr/len`, host bits cleared; `None` if `len` is too long for the family.
    pub fn new(addr: IpAddr, len: u8) -> Option<Self> {
        let max = max_len(addr);
        (len <= max).then(|| Self { addr: mask(addr, len), len })
    }

    /// The /32 or /128 of one address.
    pub fn host(addr: IpAddr) -> Self {
        Self { addr, len: max_len(addr) }
    }

    /// Parses `a.b.c.d/n` or `x::y/n`; host bits set below the prefix are cleared, as Go's
    /// `net.ParseCIDR` does.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (addr, len) =
            text.split_once('/').ok_or_else(|| format!("{text:?} is not in CIDR notation (address/length)"))?;
        let addr: IpAddr = addr.parse().map_err(|_| format!("{text:?}: invalid IP address"))?;
        let len: u8 = len
            .parse()
            .ok()
            .filter(|l| *l <= max_len(addr))
            .ok_or_else(|| format!("{text:?}: invalid prefix length"))?;
        Ok(Self { addr: mask(addr, len), len })
    }

    pub const fn addr(&self) -> IpAddr {
        self.addr
    }

    pub const fn prefix_len(&self) -> u8 {
        self.len
    }

    pub const fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    pub fn contains(&self, addr: IpAddr) -> bool {
        addr.is_ipv4() == self.addr.is_ipv4() && mask(addr, self.len) == self.addr
    }

    /// Whether `other` lies inside this prefix (equal counts).
    pub fn covers(&self, other: &IpPrefix) -> bool {
        other.len >= self.len && self.contains(other.addr)
    }
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

const fn max_len(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let masked = if len == 0 { 0 } else { bits & (u32::MAX << (32 - u32::from(len.min(32)))) };
            IpAddr::V4(Ipv4Addr::from(masked))
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let masked = if len == 0 { 0 } else { bits & (u128::MAX << (128 - u32::from(len.min(128)))) };
            IpAddr::V6(Ipv6Addr::from(masked))
        }
    }
}

/// A validated ipBlock in canonical form (except list sorted, duplicates dropped), so equal
/// blocks from different policies are one block.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CidrBlock {
    pub cidr: IpPrefix,
    pub except: Vec<IpPrefix>,
}

impl CidrBlock {
    /// Validates an ipBlock; errors are (field below the ipBlock, message).
    pub fn parse(block: &IPBlock) -> Result<Self, Vec<(String, String)>> {
        let mut errors = Vec::new();
        let cidr = IpPrefix::parse(&block.cidr).map_err(|m| vec![("cidr".to_owned(), m)])?;
        let mut except = Vec::new();
        for (index, text) in block.except.iter().flatten().enumerate() {
            match IpPrefix::parse(text) {
                // Equal to the cidr is allowed (the block then matches nothing), as upstream.
                Ok(prefix) if cidr.covers(&prefix) => except.push(prefix),
                Ok(_) => errors.push((format!("except[{index}]"), format!("{text} is not inside cidr {cidr}"))),
                Err(message) => errors.push((format!("except[{index}]"), message)),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        except.sort();
        except.dedup();
        Ok(Self { cidr, except })
    }

    pub fn contains(&self, addr: IpAddr) -> bool {
        self.cidr.contains(addr) && !self.except.iter().any(|e| e.contains(addr))
    }

    /// Whether every address whose longest ipcache match is `prefix` is in the block (see
    /// the module comment: prefixes in the ipcache are nested or disjoint).
    fn matches_lpm_prefix(&self, prefix: &IpPrefix) -> bool {
        self.cidr.covers(prefix) && !self.except.iter().any(|e| e.covers(prefix))
    }
}

impl fmt::Display for CidrBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.cidr)?;
        if !self.except.is_empty() {
            let except: Vec<String> = self.except.iter().map(ToString::to_string).collect();
            write!(f, " except {}", except.join(","))?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Pods

/// Whether the pod has finished and so holds no IP any more.
pub fn is_terminated(pod: &Pod) -> bool {
    matches!(pod.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"))
}

/// Whether a pod's IPs are its own: not in the host network and not terminated. (Such a
/// pod on this node is an endpoint; anywhere, its addresses get its identity.)
pub fn is_live_pod(pod: &Pod) -> bool {
    !is_host_network(pod) && !is_terminated(pod)
}

/// Who wins an address that several live pods report: a pod that is not terminating over
/// one that is, then the newest (creationTimestamp), then the first by name. Sorts first.
fn claim_order<'p>(pod_ref: &'p PodRef, pod: &'p Pod) -> impl Ord + 'p {
    let terminating = pod.metadata.deletion_timestamp.is_some();
    let created = std::cmp::Reverse(pod.metadata.creation_timestamp.as_ref());
    (terminating, created, pod_ref)
}

pub fn is_host_network(pod: &Pod) -> bool {
    pod.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false)
}

pub fn node_name(pod: &Pod) -> Option<&str> {
    pod.spec.as_ref().and_then(|s| s.node_name.as_deref())
}

pub fn pod_labels(pod: &Pod) -> Labels {
    pod.metadata.labels.clone().unwrap_or_default()
}

/// The pod's IPs (`podIPs`, then `podIP`), deduplicated; unparsable ones are reported.
pub fn pod_ips(pod: &Pod, problems: &mut Vec<Problem>) -> Vec<IpAddr> {
    let Some(status) = pod.status.as_ref() else { return Vec::new() };
    let texts = status
        .pod_ips
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, p)| (format!("status.podIPs[{i}].ip"), &p.ip))
        .chain(status.pod_ip.iter().map(|ip| ("status.podIP".to_owned(), ip)));
    parse_ips(texts, &format!("Pod {}", pod_ref(pod)), problems)
}

/// The node address a pod reports (`hostIPs`, then `hostIP`).
pub fn host_ips(pod: &Pod, problems: &mut Vec<Problem>) -> Vec<IpAddr> {
    let Some(status) = pod.status.as_ref() else { return Vec::new() };
    let texts = status
        .host_ips
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, p)| (format!("status.hostIPs[{i}].ip"), &p.ip))
        .chain(status.host_ip.iter().map(|ip| ("status.hostIP".to_owned(), ip)));
    parse_ips(texts, &format!("Pod {}", pod_ref(pod)), problems)
}

fn parse_ips<'a>(
    texts: impl Iterator<Item = (String, &'a String)>,
    object: &str,
    problems: &mut Vec<Problem>,
) -> Vec<IpAddr> {
    let mut ips = Vec::new();
    for (field, text) in texts {
        if text.is_empty() {
            continue;
        }
        match text.parse::<IpAddr>() {
            Ok(ip) if !ips.contains(&ip) => ips.push(ip),
            Ok(_) => {}
            Err(_) => problems.push(Problem::new(object, field, format!("{text:?} is not an IP address; ignored"))),
        }
    }
    ips
}

/// Protocol names NetworkPolicy and container ports accept, as IP protocol numbers.
pub fn protocol_number(name: &str) -> Option<u8> {
    match name {
        "TCP" => Some(proto::TCP),
        "UDP" => Some(proto::UDP),
        "SCTP" => Some(proto::SCTP),
        _ => None,
    }
}

pub fn protocol_name(number: u8) -> &'static str {
    match number {
        proto::TCP => "TCP",
        proto::UDP => "UDP",
        proto::SCTP => "SCTP",
        _ => "other",
    }
}

/// The container port a named port resolves to on `pod` for `protocol`, if the pod declares
/// that name with that protocol.
pub fn resolve_named_port(pod: &Pod, name: &str, protocol: u8) -> Option<u16> {
    let spec = pod.spec.as_ref()?;
    spec.containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| {
            p.name.as_deref() == Some(name) && protocol_number(p.protocol.as_deref().unwrap_or("TCP")) == Some(protocol)
        })
        .and_then(|p| u16::try_from(p.container_port).ok())
        .filter(|port| *port != 0)
}

// ---------------------------------------------------------------------------------------
// Identities

/// What an identity stands for, for explain, status and flow logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdentityInfo {
    /// HOST or WORLD.
    Reserved(&'static str),
    /// Pod addresses of one namespace with these labels (and these ipBlocks matching them).
    Pod { namespace: String, labels: Labels, blocks: Vec<CidrBlock>, named_ports: BTreeMap<(String, u8), u16> },
    /// Addresses outside the pods and the node that fall in exactly these ipBlocks.
    Cidr { blocks: Vec<CidrBlock> },
    /// Addresses of this node that fall in these ipBlocks.
    Host { blocks: Vec<CidrBlock> },
}

impl fmt::Display for IdentityInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let blocks = |blocks: &[CidrBlock]| blocks.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
        match self {
            IdentityInfo::Reserved(name) => f.write_str(name),
            IdentityInfo::Pod { namespace, labels, blocks: b, .. } => {
                let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                write!(f, "pods in {namespace} with labels {{{}}}", labels.join(","))?;
                if !b.is_empty() {
                    write!(f, " in ipBlocks [{}]", blocks(b))?;
                }
                Ok(())
            }
            IdentityInfo::Cidr { blocks: b } => write!(f, "addresses in ipBlocks [{}]", blocks(b)),
            IdentityInfo::Host { blocks: b } => write!(f, "this node, in ipBlocks [{}]", blocks(b)),
        }
    }
}

/// The canonical key an identity is derived from. Label groups and blocks are indices into
/// lists sorted by content (so index order is content order, and keys compare cheaply); the
/// hash uses the content itself.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum IdentityKey {
    Pod {
        /// Index into the sorted (namespace, pod labels) groups; namespace labels follow.
        group: usize,
        blocks: BTreeSet<usize>,
        named_ports: BTreeMap<(String, u8), u16>,
    },
    Cidr(BTreeSet<usize>),
    Host(BTreeSet<usize>),
}

/// One (namespace, pod labels) group, borrowed from the state.
struct GroupData<'s> {
    namespace: &'s str,
    pod_labels: &'s Labels,
    namespace_labels: Labels,
}

static NO_LABELS: Labels = BTreeMap::new();

fn group_of<'s>(pod_ref: &'s PodRef, pod: &'s Pod) -> (&'s str, &'s Labels) {
    (pod_ref.namespace.as_str(), pod.metadata.labels.as_ref().unwrap_or(&NO_LABELS))
}

/// Pods of one namespace with the same labels: selectors are evaluated once per group.
#[derive(Clone, Debug)]
pub struct LabelGroup {
    pub namespace: String,
    pub pod_labels: Labels,
    /// The identities of the group's addresses (several when ipBlocks or named ports split it).
    pub identities: BTreeSet<u32>,
}

/// The result of identity resolution for one node.
#[derive(Clone, Debug, Default)]
pub struct IdentityTable {
    /// Every prefix the datapath needs, with its identity.
    pub ipcache: BTreeMap<IpPrefix, u32>,
    pub info: BTreeMap<u32, IdentityInfo>,
    /// Label groups by namespace, for pod selectors.
    pub groups: BTreeMap<String, Vec<LabelGroup>>,
    /// For each block (index into `blocks`), the identities whose addresses it matches.
    pub block_members: Vec<BTreeSet<u32>>,
    pub blocks: Vec<CidrBlock>,
    /// Identities of this node's addresses (HOST and derived host identities).
    pub host_identities: BTreeSet<u32>,
    /// Named-port resolutions of pod identities (only names the egress rules refer to).
    pub named_ports: BTreeMap<u32, BTreeMap<(String, u8), u16>>,
    /// Identity of each pod address (cluster-wide), for explain and status.
    pub pod_addresses: BTreeMap<IpAddr, (PodRef, u32)>,
    /// The labels of every namespace in `groups`, for namespace selectors.
    pub namespace_labels: BTreeMap<String, Labels>,
}

impl IdentityTable {
    /// Every pod identity (the peers of an egress rule with no `to` and a named port).
    pub fn pod_identities(&self) -> impl Iterator<Item = u32> + '_ {
        self.named_ports.keys().copied()
    }
}

/// What the identity resolution needs from the compiled policies.
pub struct IdentityInputs<'a> {
    /// Valid ipBlocks of all policies, sorted and distinct.
    pub blocks: &'a [CidrBlock],
    /// (name, protocol) of every named port in an egress rule.
    pub egress_named_ports: &'a BTreeSet<(String, u8)>,
}

/// Assigns identities to every address the datapath of `node_name` may see.
pub fn resolve_identities(
    state: &ClusterState,
    node_name: &str,
    node_ips: &[IpAddr],
    inputs: &IdentityInputs<'_>,
    allocator: &mut IdentityAllocator,
    problems: &mut Vec<Problem>,
) -> IdentityTable {
    let blocks = inputs.blocks;
    // Node addresses first: they win over a pod claiming the same address.
    let node_addresses = node_addresses(state, node_name, node_ips, problems);
    let mut keys: BTreeMap<IdentityKey, Vec<IpPrefix>> = BTreeMap::new();
    for addr in &node_addresses {
        keys.entry(IdentityKey::Host(blocks_matching(blocks, *addr))).or_default().push(IpPrefix::host(*addr));
    }
    let live = live_pods(state, problems);
    let (group_index, groups) = label_groups(state, &live);
    let claims = PodClaims { node_name, node_addresses: &node_addresses, inputs, group_index: &group_index };
    let (pod_keys, claimed) = claims.claim(live, &mut keys, problems);
    let world_prefixes = cidr_keys(blocks, &claimed, &node_addresses, &mut keys);
    let numbers = number_keys(&keys, blocks, &groups, allocator);
    let number_of = |key: &IdentityKey| -> u32 {
        match key {
            IdentityKey::Host(b) if b.is_empty() => identity::HOST,
            _ => numbers.get(key).copied().unwrap_or(identity::WORLD),
        }
    };
    let mut table = table_of(&keys, blocks, &groups, &number_of);
    for prefix in world_prefixes {
        table.ipcache.insert(prefix, identity::WORLD);
    }
    for (pod_ref, ip, key) in pod_keys {
        table.pod_addresses.insert(ip, (pod_ref, number_of(&key)));
    }
    table
}

fn blocks_matching(blocks: &[CidrBlock], addr: IpAddr) -> BTreeSet<usize> {
    blocks.iter().enumerate().filter(|(_, b)| b.contains(addr)).map(|(i, _)| i).collect()
}

/// The node's own addresses and those of its pods' hosts and hostNetwork pods.
fn node_addresses(state: &ClusterState, node_name: &str, node_ips: &[IpAddr], problems: &mut Vec<Problem>) -> BTreeSet<IpAddr> {
    let mut addresses: BTreeSet<IpAddr> = node_ips.iter().copied().collect();
    for pod in state.pods.values().filter(|p| node_name_is(p, node_name)) {
        addresses.extend(host_ips(pod, problems));
        if is_host_network(pod) && !is_terminated(pod) {
            addresses.extend(pod_ips(pod, problems));
        }
    }
    addresses
}

type LivePod<'s> = (&'s PodRef, &'s Pod, Vec<IpAddr>);

/// Live pods with addresses, in claim order: the winner of a shared address comes first.
fn live_pods<'s>(state: &'s ClusterState, problems: &mut Vec<Problem>) -> Vec<LivePod<'s>> {
    let mut live: Vec<LivePod<'s>> = state
        .pods
        .iter()
        .filter(|(_, pod)| is_live_pod(pod))
        .map(|(pod_ref, pod)| (pod_ref, &**pod, pod_ips(pod, problems)))
        .filter(|(_, _, ips)| !ips.is_empty())
        .collect();
    live.sort_by(|a, b| claim_order(a.0, a.1).cmp(&claim_order(b.0, b.1)));
    live
}

type GroupIndex<'s> = BTreeMap<(&'s str, &'s Labels), usize>;

/// The (namespace, pod labels) groups of the live pods, numbered in content order, with
/// their namespace's labels.
fn label_groups<'s>(state: &'s ClusterState, live: &[LivePod<'s>]) -> (GroupIndex<'s>, Vec<GroupData<'s>>) {
    let mut group_index: GroupIndex<'s> = live.iter().map(|(pod_ref, pod, _)| (group_of(pod_ref, pod), 0)).collect();
    let mut namespace_labels: BTreeMap<&str, Labels> = BTreeMap::new();
    let mut groups: Vec<GroupData<'_>> = Vec::with_capacity(group_index.len());
    for (index, ((namespace, pod_labels), slot)) in group_index.iter_mut().enumerate() {
        *slot = index;
        let ns_labels = namespace_labels.entry(namespace).or_insert_with(|| state.namespace_labels(namespace)).clone();
        groups.push(GroupData { namespace, pod_labels, namespace_labels: ns_labels });
    }
    (group_index, groups)
}

/// A pod address and its key.
type PodKey = (PodRef, IpAddr, IdentityKey);

/// What deciding the pod addresses' keys needs.
struct PodClaims<'a, 's> {
    node_name: &'a str,
    node_addresses: &'a BTreeSet<IpAddr>,
    inputs: &'a IdentityInputs<'a>,
    group_index: &'a GroupIndex<'s>,
}

impl PodClaims<'_, '_> {
    /// Gives each pod address (not the node's, not already claimed) its key. Returns the
    /// keys by address and who claimed each address.
    fn claim(
        &self,
        live: Vec<LivePod<'_>>,
        keys: &mut BTreeMap<IdentityKey, Vec<IpPrefix>>,
        problems: &mut Vec<Problem>,
    ) -> (Vec<PodKey>, BTreeMap<IpAddr, PodRef>) {
        let mut claimed: BTreeMap<IpAddr, PodRef> = BTreeMap::new();
        let mut pod_keys = Vec::new();
        for (pod_ref, pod, ips) in live {
            let group = self.group_index.get(&group_of(pod_ref, pod)).copied().unwrap_or_default();
            let named_ports = resolve_named_ports(pod, self.inputs.egress_named_ports);
            for ip in ips {
                let taken_by = if self.node_addresses.contains(&ip) {
                    Some(format!("{ip} is an address of node {}; treated as the node", self.node_name))
                } else {
                    claimed.get(&ip).map(|owner| format!("{ip} is also the address of pod {owner}; ignored here"))
                };
                if let Some(message) = taken_by {
                    problems.push(Problem::new(format!("Pod {pod_ref}"), "status.podIPs", message));
                    continue;
                }
                claimed.insert(ip, pod_ref.clone());
                let key = IdentityKey::Pod { group, blocks: blocks_matching(self.inputs.blocks, ip), named_ports: named_ports.clone() };
                keys.entry(key.clone()).or_default().push(IpPrefix::host(ip));
                pod_keys.push((pod_ref.clone(), ip, key));
            }
        }
        (pod_keys, claimed)
    }
}

/// What each of `names` (name, protocol) resolves to on `pod`; names it lacks are left out.
pub fn resolve_named_ports(pod: &Pod, names: &BTreeSet<(String, u8)>) -> BTreeMap<(String, u8), u16> {
    names.iter().filter_map(|(name, protocol)| resolve_named_port(pod, name, *protocol).map(|port| ((name.clone(), *protocol), port))).collect()
}

/// Keys for every cidr and except prefix, for addresses that are neither pods nor the
/// node. Returns the prefixes that must say WORLD (inside a block, in none).
fn cidr_keys(
    blocks: &[CidrBlock],
    claimed: &BTreeMap<IpAddr, PodRef>,
    node_addresses: &BTreeSet<IpAddr>,
    keys: &mut BTreeMap<IdentityKey, Vec<IpPrefix>>,
) -> Vec<IpPrefix> {
    let mut cidr_prefixes: BTreeSet<IpPrefix> = BTreeSet::new();
    for block in blocks {
        cidr_prefixes.insert(block.cidr);
        cidr_prefixes.extend(block.except.iter().copied());
    }
    let mut world_prefixes = Vec::new();
    for prefix in cidr_prefixes {
        let host = IpPrefix::host(prefix.addr());
        if prefix == host && (claimed.contains_key(&prefix.addr()) || node_addresses.contains(&prefix.addr())) {
            continue; // the pod or node entry already says everything about this address
        }
        let matching: BTreeSet<usize> =
            blocks.iter().enumerate().filter(|(_, b)| b.matches_lpm_prefix(&prefix)).map(|(i, _)| i).collect();
        if matching.is_empty() {
            // Needed only where a shorter prefix would otherwise capture these addresses.
            if blocks.iter().any(|b| b.cidr.covers(&prefix) && b.cidr != prefix) {
                world_prefixes.push(prefix);
            }
        } else {
            keys.entry(IdentityKey::Cidr(matching)).or_default().push(prefix);
        }
    }
    world_prefixes
}

/// The table of numbered keys: ipcache entries, what each identity is, label groups and
/// block members.
fn table_of(
    keys: &BTreeMap<IdentityKey, Vec<IpPrefix>>,
    blocks: &[CidrBlock],
    groups: &[GroupData<'_>],
    number_of: &dyn Fn(&IdentityKey) -> u32,
) -> IdentityTable {
    let mut table = IdentityTable {
        blocks: blocks.to_vec(),
        block_members: vec![BTreeSet::new(); blocks.len()],
        ..IdentityTable::default()
    };
    table.info.insert(identity::HOST, IdentityInfo::Reserved("host"));
    table.info.insert(identity::WORLD, IdentityInfo::Reserved("world"));
    table.host_identities.insert(identity::HOST);
    let block_list = |set: &BTreeSet<usize>| set.iter().filter_map(|i| blocks.get(*i).cloned()).collect::<Vec<_>>();
    let mut group_identities: BTreeMap<usize, BTreeSet<u32>> = BTreeMap::new();
    for (key, prefixes) in keys {
        let number = number_of(key);
        for prefix in prefixes {
            table.ipcache.insert(*prefix, number);
        }
        let block_set = match key {
            IdentityKey::Pod { group, blocks: b, named_ports } => {
                group_identities.entry(*group).or_default().insert(number);
                table.named_ports.insert(number, named_ports.clone());
                let data = &groups[*group];
                let info = IdentityInfo::Pod {
                    namespace: data.namespace.to_owned(),
                    labels: data.pod_labels.clone(),
                    blocks: block_list(b),
                    named_ports: named_ports.clone(),
                };
                table.info.insert(number, info);
                b
            }
            IdentityKey::Cidr(b) => {
                table.info.insert(number, IdentityInfo::Cidr { blocks: block_list(b) });
                b
            }
            IdentityKey::Host(b) => {
                table.host_identities.insert(number);
                if !b.is_empty() {
                    table.info.insert(number, IdentityInfo::Host { blocks: block_list(b) });
                }
                b
            }
        };
        for index in block_set {
            if let Some(members) = table.block_members.get_mut(*index) {
                members.insert(number);
            }
        }
    }
    for (group, identities) in group_identities {
        let data = &groups[group];
        table.namespace_labels.entry(data.namespace.to_owned()).or_insert_with(|| data.namespace_labels.clone());
        table.groups.entry(data.namespace.to_owned()).or_default().push(LabelGroup {
            namespace: data.namespace.to_owned(),
            pod_labels: data.pod_labels.clone(),
            identities,
        });
    }
    table
}

/// The number of every derived key (all but plain HOST), from the allocator.
fn number_keys<'k>(
    keys: &'k BTreeMap<IdentityKey, Vec<IpPrefix>>,
    blocks: &[CidrBlock],
    groups: &[GroupData<'_>],
    allocator: &mut IdentityAllocator,
) -> BTreeMap<&'k IdentityKey, u32> {
    let derived: Vec<(&IdentityKey, Vec<u8>)> = keys
        .keys()
        .filter(|k| !matches!(k, IdentityKey::Host(b) if b.is_empty()))
        .map(|k| (k, canonical_bytes(k, blocks, groups)))
        .collect();
    let wanted: BTreeMap<&[u8], &[IpPrefix]> =
        derived.iter().map(|(k, bytes)| (bytes.as_slice(), keys[*k].as_slice())).collect();
    allocator.assign(&wanted);
    derived.iter().filter_map(|(k, bytes)| Some((*k, allocator.number(bytes)?))).collect()
}

/// How long a freed identity number is held back before another key may get it: every map
/// entry naming it goes in the sync that frees it, and tracked flows are judged again.
pub const IDENTITY_HOLD_BACK: Duration = Duration::from_secs(600);

/// Identity numbers across compiles. A number stays with its key while the key exists; a
/// freed number is not given to another key for [`IDENTITY_HOLD_BACK`], so no map entry
/// written for one label set ever applies to another. A new key takes its hash (probing
/// linearly past numbers in use or held back), or on the first compile after a restart the
/// number its addresses had in the pinned maps. The compiler stays pure: this state is an
/// explicit input and output, and time is passed in.
#[derive(Clone, Debug)]
pub struct IdentityAllocator {
    hash: fn(&[u8]) -> u64,
    /// Number -> the canonical bytes of the key holding it, and back.
    owners: BTreeMap<u32, Vec<u8>>,
    numbers: BTreeMap<Vec<u8>, u32>,
    /// Freed numbers and when they were freed.
    held: BTreeMap<u32, Instant>,
    /// The numbers prefixes had in the pinned maps, for the first compile.
    adopted: BTreeMap<IpPrefix, u32>,
    now: Instant,
}

impl Default for IdentityAllocator {
    fn default() -> Self {
        Self::with_hash(fnv1a64)
    }
}

impl IdentityAllocator {
    /// An allocator with another hash (the tests force collisions with a tiny one).
    pub fn with_hash(hash: fn(&[u8]) -> u64) -> Self {
        Self {
            hash,
            owners: BTreeMap::new(),
            numbers: BTreeMap::new(),
            held: BTreeMap::new(),
            adopted: BTreeMap::new(),
            now: Instant::now(),
        }
    }

    /// Sets the time of the next compile (when numbers freed by it are freed).
    pub fn set_time(&mut self, now: Instant) {
        self.now = now;
    }

    /// Records the numbers of the ipcache entries found in the pinned maps: the next compile
    /// gives each key the number its addresses had.
    pub fn adopt(&mut self, entries: impl IntoIterator<Item = (IpPrefix, u32)>) {
        let derived = identity::FIRST_DERIVED..identity::MAX_DERIVED;
        self.adopted.extend(entries.into_iter().filter(|(_, n)| derived.contains(n)));
    }

    /// The number of a key, if it has one.
    pub fn number(&self, key: &[u8]) -> Option<u32> {
        self.numbers.get(key).copied()
    }

    /// Whether a number is held back (freed less than [`IDENTITY_HOLD_BACK`] ago).
    pub fn is_held(&self, number: u32) -> bool {
        self.held.contains_key(&number)
    }

    /// Gives every key (canonical bytes, with the prefixes it covers) a number.
    fn assign(&mut self, keys: &BTreeMap<&[u8], &[IpPrefix]>) {
        let now = self.now;
        let gone: Vec<Vec<u8>> = self.numbers.keys().filter(|k| !keys.contains_key(k.as_slice())).cloned().collect();
        for key in gone {
            if let Some(number) = self.numbers.remove(&key) {
                self.owners.remove(&number);
                self.held.insert(number, now);
            }
        }
        self.held.retain(|_, freed| now.saturating_duration_since(*freed) < IDENTITY_HOLD_BACK);
        self.assign_adopted(keys);
        for key in keys.keys() {
            if !self.numbers.contains_key(*key)
                && let Some(number) = self.free_from((self.hash)(key))
            {
                self.give(key, number);
            }
        }
    }

    /// After a restart: each new key takes the number most of its prefixes had, if it is
    /// free; the numbers no key took are held back (entries may still name them).
    fn assign_adopted(&mut self, keys: &BTreeMap<&[u8], &[IpPrefix]>) {
        let adopted = std::mem::take(&mut self.adopted);
        if adopted.is_empty() {
            return;
        }
        for (key, prefixes) in keys {
            if self.numbers.contains_key(*key) {
                continue;
            }
            let mut votes: BTreeMap<u32, usize> = BTreeMap::new();
            for number in prefixes.iter().filter_map(|p| adopted.get(p)) {
                *votes.entry(*number).or_default() += 1;
            }
            let best = votes.iter().filter(|(n, _)| self.is_free(**n)).max_by_key(|(n, count)| (**count, std::cmp::Reverse(**n)));
            if let Some((&number, _)) = best {
                self.give(key, number);
            }
        }
        for number in adopted.into_values() {
            if !self.owners.contains_key(&number) {
                self.held.insert(number, self.now);
            }
        }
    }

    fn is_free(&self, number: u32) -> bool {
        !self.owners.contains_key(&number) && !self.held.contains_key(&number)
    }

    /// The first free number from `hash`'s slot on, wrapping; `None` if all are taken.
    fn free_from(&self, hash: u64) -> Option<u32> {
        let first = u64::from(identity::FIRST_DERIVED);
        let span = u64::from(identity::MAX_DERIVED) - first;
        let start = hash % span;
        (0..span).map(|i| (start + i) % span).map(|slot| u32::try_from(first + slot).unwrap_or(u32::MAX)).find(|n| self.is_free(*n))
    }

    fn give(&mut self, key: &[u8], number: u32) {
        self.owners.insert(number, key.to_vec());
        self.numbers.insert(key.to_vec(), number);
    }
}

fn node_name_is(pod: &Pod, node: &str) -> bool {
    node_name(pod) == Some(node)
}

/// Length-prefixed encoding of a key, so that no two keys share bytes.
fn canonical_bytes(key: &IdentityKey, blocks: &[CidrBlock], groups: &[GroupData<'_>]) -> Vec<u8> {
    fn put(out: &mut Vec<u8>, text: &str) {
        out.extend_from_slice(&(text.len() as u64).to_le_bytes());
        out.extend_from_slice(text.as_bytes());
    }
    fn put_labels(out: &mut Vec<u8>, labels: &Labels) {
        out.extend_from_slice(&(labels.len() as u64).to_le_bytes());
        for (k, v) in labels {
            put(out, k);
            put(out, v);
        }
    }
    let put_blocks = |out: &mut Vec<u8>, set: &BTreeSet<usize>| {
        out.extend_from_slice(&(set.len() as u64).to_le_bytes());
        for block in set.iter().filter_map(|i| blocks.get(*i)) {
            put(out, &block.to_string());
        }
    };
    let mut out = Vec::with_capacity(128);
    match key {
        IdentityKey::Pod { group, blocks: b, named_ports } => {
            put(&mut out, "pod");
            if let Some(data) = groups.get(*group) {
                put(&mut out, data.namespace);
                put_labels(&mut out, &data.namespace_labels);
                put_labels(&mut out, data.pod_labels);
            }
            put_blocks(&mut out, b);
            out.extend_from_slice(&(named_ports.len() as u64).to_le_bytes());
            for ((name, protocol), port) in named_ports {
                put(&mut out, name);
                out.push(*protocol);
                out.extend_from_slice(&port.to_le_bytes());
            }
        }
        IdentityKey::Cidr(b) => {
            put(&mut out, "cidr");
            put_blocks(&mut out, b);
        }
        IdentityKey::Host(b) => {
            put(&mut out, "host");
            put_blocks(&mut out, b);
        }
    }
    out
}

/// FNV-1a, 64 bits: a stable hash (std's hashers may change between releases).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// Gives each key a number in `first..end` from its hash, probing linearly (wrapping) on a
/// collision. Keys are taken in the iterator's order, which callers keep sorted, so the
/// result depends only on the set of keys.
pub fn allocate<'k, K: Ord + 'k>(
    keys: impl Iterator<Item = &'k K>,
    hash: impl Fn(&K) -> u64,
    first: u32,
    end: u64,
) -> BTreeMap<&'k K, u32> {
    let span = end.saturating_sub(u64::from(first)).max(1);
    let mut taken: BTreeSet<u64> = BTreeSet::new();
    let mut numbers = BTreeMap::new();
    for key in keys {
        let mut slot = hash(key) % span;
        // Bounded: the key count is far below the span.
        while !taken.insert(slot) {
            slot = (slot + 1) % span;
        }
        // `slot < span <= end - first`, and `end <= 2^32`, so this fits in a u32.
        numbers.insert(key, u32::try_from(u64::from(first) + slot).unwrap_or(u32::MAX));
    }
    numbers
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn expression(key: &str, operator: &str, values: &[&str]) -> LabelSelector {
        LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: key.to_owned(),
                operator: operator.to_owned(),
                values: (!values.is_empty()).then(|| values.iter().map(|v| (*v).to_owned()).collect()),
            }]),
            match_labels: None,
        }
    }

    #[test]
    fn selector_operators() {
        let web = labels(&[("app", "web")]);
        let none = labels(&[]);
        let cases: &[(LabelSelector, &Labels, bool)] = &[
            (expression("app", "In", &["web", "api"]), &web, true),
            (expression("app", "In", &["api"]), &web, false),
            (expression("app", "NotIn", &["api"]), &web, true),
            (expression("app", "NotIn", &["web"]), &web, false),
            (expression("app", "NotIn", &["web"]), &none, true),
            (expression("app", "Exists", &[]), &web, true),
            (expression("app", "Exists", &[]), &none, false),
            (expression("app", "DoesNotExist", &[]), &none, true),
            (expression("app", "DoesNotExist", &[]), &web, false),
            (LabelSelector::default(), &none, true),
        ];
        for (selector, labels, expected) in cases {
            assert_eq!(Selector::parse(selector).unwrap().matches(labels), *expected, "{selector:?} on {labels:?}");
        }
    }

    #[test]
    fn invalid_selectors_are_rejected() {
        for selector in [
            expression("app", "in", &["web"]),
            expression("app", "In", &[]),
            expression("app", "NotIn", &[]),
            expression("app", "Exists", &["x"]),
            expression("", "Exists", &[]),
        ] {
            assert!(Selector::parse(&selector).is_err(), "{selector:?}");
        }
    }

    #[test]
    fn prefixes_and_blocks() {
        let p = IpPrefix::parse("198.18.18.3/16").unwrap();
        assert_eq!(p.to_string(), "198.18.0.0/16");
        assert!(IpPrefix::parse("198.18.0.0").is_err());
        assert!(IpPrefix::parse("198.18.0.0/33").is_err());
        assert!(IpPrefix::parse("2001:2:0:ff::/129").is_err());
        assert!(IpPrefix::parse("0.0.0.0/0").unwrap().contains("198.19.255.4".parse().unwrap()));
        assert!(!IpPrefix::parse("0.0.0.0/0").unwrap().contains("2001:2::1".parse().unwrap()));
        let block =
            CidrBlock::parse(&IPBlock { cidr: "198.18.0.0/16".into(), except: Some(vec!["198.18.16.0/20".into()]) })
                .unwrap();
        assert!(block.contains("198.18.32.1".parse().unwrap()));
        assert!(!block.contains("198.18.16.1".parse().unwrap()));
        assert!(
            CidrBlock::parse(&IPBlock { cidr: "198.18.0.0/20".into(), except: Some(vec!["198.18.16.0/24".into()]) })
                .is_err()
        );
        assert!(
            CidrBlock::parse(&IPBlock { cidr: "198.18.0.0/20".into(), except: Some(vec!["2001:2::/64".into()]) })
                .is_err()
        );
    }

    fn pod_at(name: &str, app: &str, ip: &str, created: i64, deleting: bool) -> crate::state::Object {
        let mut value = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "ns", "labels": {"app": app},
                         "creationTimestamp": jiff_time(created)},
            "spec": {"nodeName": "elsewhere", "containers": []},
            "status": {"podIP": ip},
        });
        if deleting {
            value["metadata"]["deletionTimestamp"] = serde_json::Value::String(jiff_time(created + 100));
        }
        crate::state::Object::Pod(std::sync::Arc::new(serde_json::from_value(value).unwrap()))
    }

    fn jiff_time(seconds: i64) -> String {
        format!("2026-01-01T00:{:02}:{:02}Z", seconds / 60, seconds % 60)
    }

    /// The labels of the pod that holds `ip` in the resolved table.
    fn owner_app(objects: Vec<crate::state::Object>, ip: &str) -> String {
        let state = ClusterState::from_objects(objects);
        let inputs = IdentityInputs { blocks: &[], egress_named_ports: &BTreeSet::new() };
        let table = resolve_identities(&state, "node", &[], &inputs, &mut IdentityAllocator::default(), &mut Vec::new());
        let (_, identity) = table.pod_addresses[&ip.parse::<IpAddr>().unwrap()];
        match &table.info[&identity] {
            IdentityInfo::Pod { labels, .. } => labels["app"].clone(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_shared_ip_goes_to_the_newest_pod_that_is_not_terminating() {
        let ip = "198.18.7.7";
        // "a" sorts first by name, but "b" is newer.
        assert_eq!(owner_app(vec![pod_at("a", "old", ip, 10, false), pod_at("b", "new", ip, 20, false)], ip), "new");
        // The newest is terminating: the other one wins.
        assert_eq!(owner_app(vec![pod_at("a", "old", ip, 10, false), pod_at("b", "new", ip, 20, true)], ip), "old");
        // Equal times: the first by name.
        assert_eq!(owner_app(vec![pod_at("b", "bee", ip, 10, false), pod_at("a", "ay", ip, 10, false)], ip), "ay");
        // Only terminating pods: the newest of them.
        assert_eq!(owner_app(vec![pod_at("a", "old", ip, 10, true), pod_at("b", "new", ip, 20, true)], ip), "new");
    }

    #[test]
    fn allocation_is_stable_and_probes() {
        let keys: BTreeSet<u32> = (0..100).collect();
        // A constant hash forces every key through the probe.
        let a = allocate(keys.iter(), |_| 7, 256, 1 << 30);
        let b = allocate(keys.iter().rev().collect::<BTreeSet<_>>().into_iter(), |_| 7, 256, 1 << 30);
        assert_eq!(a.values().copied().collect::<BTreeSet<_>>().len(), 100);
        assert_eq!(
            a.iter().map(|(k, v)| (**k, *v)).collect::<Vec<_>>(),
            b.iter().map(|(k, v)| (**k, *v)).collect::<Vec<_>>()
        );
        assert_eq!(a[&0], 263);
    }

    #[test]
    fn a_freed_number_is_held_back_and_a_used_one_never_moves() {
        let t0 = Instant::now();
        let second = Duration::from_secs(1);
        let none: &[IpPrefix] = &[];
        let keys = |names: &[&'static [u8]]| names.iter().map(|n| (*n, none)).collect::<BTreeMap<&[u8], &[IpPrefix]>>();
        // Every key hashes to the same slot.
        let mut allocator = IdentityAllocator::with_hash(|_| 0);
        allocator.set_time(t0);
        allocator.assign(&keys(&[b"a", b"b"]));
        assert_eq!((allocator.number(b"a"), allocator.number(b"b")), (Some(256), Some(257)));
        // a goes: b keeps its number (it used to move to 256), and 256 is held back.
        allocator.set_time(t0 + second);
        allocator.assign(&keys(&[b"b", b"c"]));
        assert_eq!((allocator.number(b"b"), allocator.number(b"c")), (Some(257), Some(258)));
        assert!(allocator.is_held(256));
        allocator.set_time(t0 + second + IDENTITY_HOLD_BACK - second);
        allocator.assign(&keys(&[b"b", b"c", b"d"]));
        assert_eq!(allocator.number(b"d"), Some(259), "256 is still held back");
        allocator.set_time(t0 + second + IDENTITY_HOLD_BACK);
        allocator.assign(&keys(&[b"b", b"c", b"d", b"e"]));
        assert_eq!(allocator.number(b"e"), Some(256), "free again after the hold-back period");
    }

    #[test]
    fn numbers_are_adopted_from_the_pinned_maps() {
        let p = |text: &str| IpPrefix::parse(text).unwrap();
        let (a1, a2, b1) = (p("198.18.0.1/32"), p("198.18.0.2/32"), p("198.18.0.3/32"));
        let mut allocator = IdentityAllocator::with_hash(|_| 0);
        allocator.adopt([(a1, 700), (a2, 700), (b1, 900), (p("198.18.0.9/32"), 800)]);
        let (pa, pb) = ([a1, a2], [b1]);
        allocator.assign(&BTreeMap::from([(b"a".as_slice(), pa.as_slice()), (b"b".as_slice(), pb.as_slice())]));
        assert_eq!((allocator.number(b"a"), allocator.number(b"b")), (Some(700), Some(900)));
        assert!(allocator.is_held(800), "a number no key took may still be named by entries");
    }
}

/// Identity churn with forced collisions: after every single ordered write between two
/// cluster states, what both states deny stays denied and what both allow stays allowed.
#[cfg(test)]
mod churn_tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;
    use crate::compile::{EndpointSlot, MapContents, NodeContext, compile_with, diff, render, verdict};
    use crate::state::Object;

    const PODS: usize = 6;
    const LOCAL: usize = 3;

    /// A hash space of eight numbers: most keys collide.
    fn tiny_hash(bytes: &[u8]) -> u64 {
        fnv1a64(bytes) % 8
    }

    fn pod_ip(i: usize) -> IpAddr {
        IpAddr::from([198, 18, 0, 10 + i as u8])
    }

    fn pod(i: usize, app: usize) -> Object {
        let node = if i < LOCAL { "n1" } else { "n2" };
        let app = ["a", "b", "c"][app];
        let value = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("p{i}"), "namespace": if i.is_multiple_of(2) { "x" } else { "y" },
                         "labels": {"app": app}},
            "spec": {"nodeName": node, "containers": []},
            "status": {"podIP": pod_ip(i).to_string()},
        });
        Object::Pod(std::sync::Arc::new(serde_json::from_value(value).unwrap()))
    }

    fn policy(index: usize) -> Object {
        let (namespace, spec) = match index {
            0 => ("x", json!({"podSelector": {"matchLabels": {"app": "a"}},
                             "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "b"}}}], "ports": [{"port": 80}]}]})),
            1 => ("x", json!({"podSelector": {},
                             "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "c"}}}]}]})),
            2 => ("y", json!({"podSelector": {"matchLabels": {"app": "b"}}, "policyTypes": ["Egress"],
                             "egress": [{"to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "a"}}}], "ports": [{"port": 81}]}]})),
            _ => ("y", json!({"podSelector": {},
                             "ingress": [{"from": [{"ipBlock": {"cidr": "198.18.0.0/24", "except": ["198.18.0.12/32"]}}], "ports": [{"port": 80}]}]})),
        };
        let value = json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                           "metadata": {"name": format!("np{index}"), "namespace": namespace}, "spec": spec});
        Object::NetworkPolicy(std::sync::Arc::new(serde_json::from_value(value).unwrap()))
    }

    fn namespace(name: &str) -> Object {
        let value = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": {"team": name}}});
        Object::Namespace(std::sync::Arc::new(serde_json::from_value(value).unwrap()))
    }

    fn state(apps: &[usize], policies: &[bool], present: &[bool]) -> ClusterState {
        let mut objects = vec![namespace("x"), namespace("y")];
        objects.extend(policies.iter().enumerate().filter(|(_, on)| **on).map(|(i, _)| policy(i)));
        objects.extend((0..PODS).filter(|i| present[*i]).map(|i| pod(i, apps[i])));
        ClusterState::from_objects(objects)
    }

    fn slots(present: &[bool]) -> BTreeMap<crate::state::PodRef, EndpointSlot> {
        (0..LOCAL)
            .filter(|i| present[*i])
            .map(|i| {
                let pod_ref = crate::state::PodRef::new(if i.is_multiple_of(2) { "x" } else { "y" }, format!("p{i}"));
                (pod_ref, EndpointSlot { ifindex: 100 + i as u32, id: 1 + i as u32 })
            })
            .collect()
    }

    /// Every (endpoint, direction, peer, port) both states agree on keeps that verdict.
    fn check(old: &MapContents, new: &MapContents, now: &MapContents, op: usize) -> Result<(), TestCaseError> {
        let peers: Vec<IpAddr> = (0..PODS).map(pod_ip).chain([IpAddr::from([198, 18, 0, 200]), IpAddr::from([198, 19, 0, 1])]).collect();
        for ifindex in old.endpoints.keys().filter(|i| new.endpoints.contains_key(i)) {
            for direction in [policy_common::Direction::Ingress, policy_common::Direction::Egress] {
                for peer in &peers {
                    for port in [80, 81] {
                        let judge = |maps: &MapContents| verdict(maps, *ifindex, direction, *peer, proto::TCP, port).allows();
                        let (before, after) = (judge(old), judge(new));
                        if before == after {
                            prop_assert_eq!(judge(now), before, "after write {}: endpoint {} {:?} peer {} port {}", op, ifindex, direction, peer, port);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn every_write_keeps_agreed_verdicts_under_identity_churn(
            apps in prop::collection::vec(0..3usize, PODS),
            policies in prop::collection::vec(any::<bool>(), 4),
            states in prop::collection::vec(prop::collection::vec(any::<bool>(), PODS), 2..6),
        ) {
            let node = NodeContext { name: "n1".into(), ips: vec![IpAddr::from([198, 18, 0, 1])] };
            let mut allocator = IdentityAllocator::with_hash(tiny_hash);
            let start = Instant::now();
            let mut loaded = MapContents::default();
            for (step, present) in states.iter().enumerate() {
                let now = start + Duration::from_secs(step as u64);
                let compiled = compile_with(&state(&apps, &policies, present), &node, &mut allocator, now);
                let desired = render(&compiled, &slots(present), false);
                let mut maps = loaded.clone();
                for (index, op) in diff(&loaded, &desired).ordered_ops().iter().enumerate() {
                    maps.apply(op);
                    check(&loaded, &desired, &maps, index)?;
                }
                prop_assert_eq!(&maps, &desired);
                loaded = desired;
            }
        }
    }
}
