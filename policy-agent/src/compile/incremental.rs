//! The compiler the agent runs: [`compile_with`]'s stages, each skipped when its inputs are
//! the objects (the same `Arc`s) it last ran on. A policy is parsed, and its peers resolved,
//! only when it or the identities changed. Identities are resolved again only when a
//! namespace, the node, or the policies' ipBlocks or egress named ports changed, or a pod
//! change does more than move addresses ([`resolve::update_pod_addresses`]). The result
//! equals [`compile_with`]'s on the same state; the property test below and the agent's
//! periodic re-check ([`IncrementalCompiler::check`]) hold it to that.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::api::networking::v1::NetworkPolicy;

use super::policy::{ParsedPolicy, parse_policy};
use super::{Compiled, NodeContext, Parts, PolicyInputs, PolicyPeers, assemble, compile_with, parse_cluster_policies, resolve_policy_peers};
use crate::resolve::{self, CidrBlock, IdentityAllocator, IdentityTable};
use crate::state::{ClusterState, NamespacedName, PodRef, Problem};

/// A policy as parsed, with its peers for the cached identities (`None` once they change).
struct CachedPolicy {
    object: Arc<NetworkPolicy>,
    parsed: ParsedPolicy,
    problems: Vec<Problem>,
    peers: Option<PolicyPeers>,
}

/// The identity table and what it was resolved from.
struct CachedIdentities {
    node: NodeContext,
    state: ClusterState,
    blocks: Vec<CidrBlock>,
    egress_named_ports: BTreeSet<(String, u8)>,
    table: IdentityTable,
    problems: Vec<Problem>,
}

impl CachedIdentities {
    /// Whether the table was resolved from the same inputs, pods aside.
    fn same_inputs_but_pods(&self, state: &ClusterState, node: &NodeContext, inputs: &PolicyInputs) -> bool {
        self.node == *node
            && self.blocks == inputs.blocks
            && self.egress_named_ports == inputs.egress_named_ports
            && same_objects(&self.state.namespaces, &state.namespaces)
    }

    /// Brings the table to `state` if only pods changed and only their addresses move (see
    /// [`resolve::update_pod_addresses`]); whether it is now `state`'s.
    fn update(&mut self, state: &ClusterState, node: &NodeContext, inputs: &PolicyInputs, allocator: &IdentityAllocator) -> Update {
        if !self.same_inputs_but_pods(state, node, inputs) {
            return Update::Failed;
        }
        let changed: Vec<PodRef> = {
            let changed = resolve::changed_pods(&self.state, state);
            if changed.is_empty() {
                return Update::Unchanged;
            }
            let node_of = (node.name.as_str(), node.ips.as_slice());
            let states = (&self.state, state);
            if !self.problems.is_empty()
                || !resolve::update_pod_addresses(&mut self.table, states, &changed, node_of, &inputs.identity_inputs(), allocator)
            {
                return Update::Failed;
            }
            changed.into_iter().cloned().collect()
        };
        for pod in changed {
            match state.pods.get(&pod) {
                Some(object) => self.state.pods.insert(pod, object.clone()),
                None => self.state.pods.remove(&pod),
            };
        }
        Update::Addresses
    }
}

enum Update {
    Unchanged,
    /// Only pod addresses moved: every policy's peers stay.
    Addresses,
    Failed,
}

/// Whether two maps hold the same keys and the very same objects.
fn same_objects<K: Eq, T>(a: &BTreeMap<K, Arc<T>>, b: &BTreeMap<K, Arc<T>>) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|((ka, va), (kb, vb))| ka == kb && Arc::ptr_eq(va, vb))
}

/// What the last compile did again and what it took from the cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reuse {
    pub policies_parsed: usize,
    pub policies_reused: usize,
    pub identities_resolved: bool,
    /// Only pod addresses changed in the identity table.
    pub addresses_updated: bool,
    pub peers_resolved: usize,
}

impl Reuse {
    /// Whether the compile's pods were the objects of the one before (both compiles were of
    /// this compiler, and its caches were not dropped in between).
    pub fn pods_unchanged(&self) -> bool {
        !self.identities_resolved && !self.addresses_updated
    }
}

/// The allocator before a compile, to repeat that compile in full.
pub struct CheckPoint {
    allocator: IdentityAllocator,
}

/// Whether an incremental compile matched the full one ([`IncrementalCompiler::check`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    Matched,
    /// The caches were dropped.
    Differed,
}

/// [`compile_with`] with its stages cached between compiles.
pub struct IncrementalCompiler {
    allocator: IdentityAllocator,
    policies: BTreeMap<NamespacedName, CachedPolicy>,
    identities: Option<CachedIdentities>,
    last: Reuse,
}

impl IncrementalCompiler {
    pub fn new(allocator: IdentityAllocator) -> Self {
        Self { allocator, policies: BTreeMap::new(), identities: None, last: Reuse::default() }
    }

    /// What the last compile redid.
    pub fn last_reuse(&self) -> Reuse {
        self.last
    }

    /// Compiles `state` for `node` at time `now`, redoing only the stages whose inputs changed.
    pub fn compile(&mut self, state: &ClusterState, node: &NodeContext, now: Instant) -> Compiled {
        self.allocator.set_time(now);
        let mut reuse = Reuse::default();
        self.parse_policies(state, &mut reuse);
        let mut problems: Vec<Problem> = self.policies.values().flat_map(|c| c.problems.iter().cloned()).collect();
        let cluster_policies = parse_cluster_policies(state, &mut problems);
        let parsed: Vec<&ParsedPolicy> = self.policies.values().map(|c| &c.parsed).collect();
        let inputs = PolicyInputs::collect(&parsed, &cluster_policies);
        let update = self.identities.as_mut().map_or(Update::Failed, |c| c.update(state, node, &inputs, &self.allocator));
        let identities = match (update, self.identities.take()) {
            (Update::Unchanged, Some(cached)) => cached,
            (Update::Addresses, Some(cached)) => {
                reuse.addresses_updated = true;
                cached
            }
            _ => {
                reuse.identities_resolved = true;
                self.resolve_identities(state, node, &inputs)
            }
        };
        for cached in self.policies.values_mut().filter(|c| c.peers.is_none()) {
            cached.peers = Some(resolve_policy_peers(&cached.parsed, &identities.table));
            reuse.peers_resolved += 1;
        }
        problems.extend(identities.problems.iter().cloned());
        let parsed: Vec<&ParsedPolicy> = self.policies.values().map(|c| &c.parsed).collect();
        let peer_sets: Vec<&PolicyPeers> = self.policies.values().filter_map(|c| c.peers.as_ref()).collect();
        let parts = Parts { policies: &parsed, peer_sets, cluster_policies: &cluster_policies, inputs: &inputs, table: &identities.table };
        let compiled = assemble(state, node, &parts, problems);
        self.identities = Some(identities);
        self.last = reuse;
        compiled
    }

    /// The allocator as it is now, for checking the next compile ([`Self::check`]).
    pub fn checkpoint(&self) -> CheckPoint {
        CheckPoint { allocator: self.allocator.clone() }
    }

    /// Compiles in full what the compile after `point` compiled (the same state, node and
    /// time) and compares. If the two differ, the caches are dropped and the allocator
    /// becomes the full compile's: the next compile starts afresh.
    pub fn check(&mut self, point: CheckPoint, state: &ClusterState, node: &NodeContext, now: Instant, compiled: &Compiled) -> Check {
        let mut allocator = point.allocator;
        if compile_with(state, node, &mut allocator, now) == *compiled {
            return Check::Matched;
        }
        self.allocator = allocator;
        self.policies.clear();
        self.identities = None;
        Check::Differed
    }

    /// Parses the policies that are new or changed; forgets those that are gone.
    fn parse_policies(&mut self, state: &ClusterState, reuse: &mut Reuse) {
        self.policies.retain(|name, cached| state.policies.get(name).is_some_and(|p| Arc::ptr_eq(p, &cached.object)));
        reuse.policies_reused = self.policies.len();
        for (name, object) in &state.policies {
            if self.policies.contains_key(name) {
                continue;
            }
            let mut problems = Vec::new();
            let parsed = parse_policy(object, &mut problems);
            let peers = None;
            self.policies.insert(name.clone(), CachedPolicy { object: object.clone(), parsed, problems, peers });
            reuse.policies_parsed += 1;
        }
    }

    /// Resolves the identities afresh; every policy's peers must then be resolved again.
    fn resolve_identities(&mut self, state: &ClusterState, node: &NodeContext, inputs: &PolicyInputs) -> CachedIdentities {
        let mut problems = Vec::new();
        let table = resolve::resolve_identities(state, &node.name, &node.ips, &inputs.identity_inputs(), &mut self.allocator, &mut problems);
        for cached in self.policies.values_mut() {
            cached.peers = None;
        }
        CachedIdentities {
            node: node.clone(),
            state: ClusterState { pods: state.pods.clone(), namespaces: state.namespaces.clone(), ..ClusterState::default() },
            blocks: inputs.blocks.clone(),
            egress_named_ports: inputs.egress_named_ports.clone(),
            table,
            problems,
        }
    }
}

#[cfg(test)]
mod tests {
    //! Incremental == full after every event of random sequences: pods, labels, addresses,
    //! namespaces, NetworkPolicies (ipBlocks, named ports, invalid ones) and
    //! ClusterNetworkPolicies added, changed, re-sent unchanged and removed.

    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;
    use crate::state::{Object, parse_manifest_str};

    fn object(yaml: &str) -> Object {
        let (mut objects, problems) = parse_manifest_str("event.yaml", false, yaml);
        assert!(problems.is_empty() && objects.len() == 1, "{yaml}: {problems:?}");
        objects.remove(0)
    }

    /// Pod `slot` (in x for even slots, y for odd) in one of a few shapes; addresses repeat
    /// across slots on purpose, and one shape is the node's address.
    fn pod(slot: u8, shape: u8) -> Object {
        let namespace = if slot.is_multiple_of(2) { "x" } else { "y" };
        let label = ["a", "b", "c"][usize::from(shape % 3)];
        let node = if shape.is_multiple_of(4) { "n2" } else { "n1" };
        let ip = match shape % 7 {
            6 => "198.19.192.1".to_owned(),
            n => format!("198.18.1.{}", 1 + (slot * 3 + n) % 10),
        };
        let ip = if shape % 13 == 12 { "not-an-address".to_owned() } else { ip };
        let phase = if shape % 9 == 8 { "Succeeded" } else { "Running" };
        let port = if shape.is_multiple_of(2) { 80 } else { 8080 };
        let host_network = shape % 11 == 10;
        object(&format!(
            "{{apiVersion: v1, kind: Pod, metadata: {{name: p{slot}, namespace: {namespace}, labels: {{pod: {label}}}}}, spec: {{nodeName: {node}, hostNetwork: {host_network}, containers: [{{name: c, ports: [{{name: http, containerPort: {port}}}]}}]}}, status: {{phase: {phase}, hostIP: 198.19.192.1, podIP: {ip}, podIPs: [{{ip: {ip}}}, {{ip: '2001:2::{slot}'}}]}}}}"
        ))
    }

    fn namespace(slot: u8, shape: u8) -> Object {
        let name = ["x", "y", "z"][usize::from(slot % 3)];
        let team = ["blue", "red"][usize::from(shape % 2)];
        object(&format!("{{apiVersion: v1, kind: Namespace, metadata: {{name: {name}, labels: {{team: {team}}}}}}}"))
    }

    const SPECS: [&str; 7] = [
        "{podSelector: {}}",
        "{podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]}",
        "{podSelector: {}, policyTypes: [Egress], egress: [{to: [{namespaceSelector: {matchLabels: {team: blue}}}]}]}",
        "{podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 198.18.1.0/24, except: [198.18.1.2/32]}}]}]}",
        "{podSelector: {}, policyTypes: [Egress], egress: [{ports: [{port: http}]}]}",
        "{podSelector: {matchLabels: {pod: b}}, ingress: [{ports: [{port: http, protocol: TCP}]}]}",
        "{podSelector: {matchExpressions: [{key: pod, operator: Bad}]}}",
    ];

    fn policy(slot: u8, shape: u8) -> Object {
        let namespace = if slot.is_multiple_of(2) { "x" } else { "y" };
        let spec = SPECS[usize::from(shape) % SPECS.len()];
        object(&format!(
            "{{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {{name: np{slot}, namespace: {namespace}}}, spec: {spec}}}"
        ))
    }

    fn cluster_policy(shape: u8) -> Object {
        let (tier, action) = [("Admin", "Deny"), ("Baseline", "Accept"), ("Admin", "Pass")][usize::from(shape % 3)];
        object(&format!(
            "{{apiVersion: policy.networking.k8s.io/v1alpha2, kind: ClusterNetworkPolicy, metadata: {{name: cnp}}, spec: {{tier: {tier}, priority: 5, subject: {{namespaces: {{matchLabels: {{team: blue}}}}}}, ingress: [{{action: {action}, from: [{{namespaces: {{matchLabels: {{team: red}}}}}}]}}]}}}}"
        ))
    }

    #[derive(Clone, Debug)]
    enum Event {
        Set(u8, u8, u8),
        Delete(u8, u8),
        /// The same object again, as a new `Arc` (a re-list).
        Resend,
        NodeIps(u8),
        Wait(u16),
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            6 => (0u8..4, 0u8..8, 0u8..40).prop_map(|(k, s, v)| Event::Set(k, s, v)),
            2 => (0u8..4, 0u8..8).prop_map(|(k, s)| Event::Delete(k, s)),
            1 => Just(Event::Resend),
            1 => (0u8..3).prop_map(Event::NodeIps),
            1 => (0u16..1300).prop_map(Event::Wait),
        ]
    }

    fn apply(state: &mut ClusterState, node: &mut NodeContext, event: &Event) {
        match *event {
            Event::Set(kind, slot, shape) => {
                let object = match kind {
                    0 => pod(slot, shape),
                    1 => namespace(slot, shape),
                    2 => policy(slot % 4, shape),
                    _ => cluster_policy(shape),
                };
                state.insert(object);
            }
            Event::Delete(kind, slot) => {
                let pods: Vec<_> = state.pods.keys().cloned().collect();
                let policies: Vec<_> = state.policies.keys().cloned().collect();
                let namespaces: Vec<_> = state.namespaces.keys().cloned().collect();
                let pick = |n: usize| usize::from(slot) % n.max(1);
                match kind {
                    0 if !pods.is_empty() => drop(state.pods.remove(&pods[pick(pods.len())])),
                    1 if !namespaces.is_empty() => drop(state.namespaces.remove(&namespaces[pick(namespaces.len())])),
                    2 if !policies.is_empty() => drop(state.policies.remove(&policies[pick(policies.len())])),
                    _ => state.cluster_policies.clear(),
                }
            }
            Event::Resend => {
                let copies: Vec<Object> = state
                    .pods
                    .values()
                    .map(|p| Object::Pod(Arc::new((**p).clone())))
                    .chain(state.policies.values().map(|p| Object::NetworkPolicy(Arc::new((**p).clone()))))
                    .collect();
                for copy in copies {
                    state.insert(copy);
                }
            }
            Event::NodeIps(variant) => {
                node.ips = match variant {
                    0 => vec!["198.19.192.1".parse().unwrap()],
                    1 => vec!["198.19.192.1".parse().unwrap(), "198.18.1.3".parse().unwrap()],
                    _ => vec![],
                };
            }
            Event::Wait(_) => {}
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]
        #[test]
        fn incremental_equals_full_after_every_event(events in prop::collection::vec(event(), 1..40)) {
            let mut state = ClusterState::default();
            let mut node = NodeContext { name: "n1".into(), ips: vec!["198.19.192.1".parse().unwrap()] };
            let mut reference = IdentityAllocator::default();
            let mut incremental = IncrementalCompiler::new(IdentityAllocator::default());
            let mut now = Instant::now();
            for (step, event) in events.iter().enumerate() {
                apply(&mut state, &mut node, event);
                if let Event::Wait(seconds) = event {
                    now += Duration::from_secs(u64::from(*seconds));
                }
                let full = compile_with(&state, &node, &mut reference, now);
                let fast = incremental.compile(&state, &node, now);
                prop_assert_eq!(&fast, &full, "step {} ({:?}), reuse {:?}", step, event, incremental.last_reuse());
            }
        }
    }

    /// Pods 0 and 2 share 198.18.1.2 (shapes 1 and 5), so one loses it; pod 4 keeps
    /// their label group when one of them goes.
    #[test]
    fn pods_that_share_an_address_are_resolved_in_full() {
        let mut state = ClusterState::from_objects([pod(0, 1), pod(2, 5), pod(4, 1), policy(0, 1)]);
        let node = NodeContext { name: "n1".into(), ips: vec![] };
        let mut compiler = IncrementalCompiler::new(IdentityAllocator::default());
        let mut reference = IdentityAllocator::default();
        let now = Instant::now();
        assert_eq!(compiler.compile(&state, &node, now), compile_with(&state, &node, &mut reference, now));
        let first_owner = state.pods.keys().next().cloned().unwrap();
        state.pods.remove(&first_owner);
        let full = compile_with(&state, &node, &mut reference, now);
        assert_eq!(compiler.compile(&state, &node, now), full);
        assert!(compiler.last_reuse().identities_resolved, "{:?}", compiler.last_reuse());
        // The control: a pod added where nothing is shared only moves addresses.
        state.insert(pod(6, 1));
        assert_eq!(compiler.compile(&state, &node, now), compile_with(&state, &node, &mut reference, now));
        assert!(compiler.last_reuse().addresses_updated, "{:?}", compiler.last_reuse());
    }

    #[test]
    fn the_pods_are_unchanged_only_when_every_pod_is_the_same_object() {
        let mut state = ClusterState::from_objects([namespace(0, 0), pod(0, 1), policy(0, 0)]);
        let node = NodeContext { name: "n1".into(), ips: vec![] };
        let mut compiler = IncrementalCompiler::new(IdentityAllocator::default());
        let now = Instant::now();
        compiler.compile(&state, &node, now);
        assert!(!compiler.last_reuse().pods_unchanged(), "the first compile");
        state.insert(policy(1, 1));
        compiler.compile(&state, &node, now);
        assert!(compiler.last_reuse().pods_unchanged(), "a policy change");
        state.insert(pod(0, 1)); // the same pod, as a new object
        compiler.compile(&state, &node, now);
        assert!(!compiler.last_reuse().pods_unchanged(), "a pod re-sent");
        state.insert(pod(1, 2));
        compiler.compile(&state, &node, now);
        assert!(!compiler.last_reuse().pods_unchanged(), "a new pod");
    }

    #[test]
    fn a_policy_change_reuses_the_identities_and_other_policies() {
        let mut state = ClusterState::from_objects([namespace(0, 0), pod(0, 1), pod(1, 2), policy(0, 0), policy(1, 1)]);
        let node = NodeContext { name: "n1".into(), ips: vec![] };
        let mut compiler = IncrementalCompiler::new(IdentityAllocator::default());
        let now = Instant::now();
        compiler.compile(&state, &node, now);
        assert_eq!(compiler.last_reuse(), Reuse { policies_parsed: 2, identities_resolved: true, peers_resolved: 2, ..Reuse::default() });
        state.insert(policy(2, 1));
        compiler.compile(&state, &node, now);
        assert_eq!(compiler.last_reuse(), Reuse { policies_parsed: 1, policies_reused: 2, peers_resolved: 1, ..Reuse::default() });
        state.insert(policy(3, 3)); // an ipBlock: identities change
        compiler.compile(&state, &node, now);
        assert_eq!(compiler.last_reuse(), Reuse { policies_parsed: 1, policies_reused: 3, identities_resolved: true, peers_resolved: 4, ..Reuse::default() });
        state.insert(pod(4, 1));
        let point = compiler.checkpoint();
        let compiled = compiler.compile(&state, &node, now);
        assert!(compiler.last_reuse().identities_resolved);
        assert_eq!(compiler.check(point, &state, &node, now, &compiled), Check::Matched);
        // The control: a result that is not the full one's is caught, and the caches go.
        let mut stale = compiled.clone();
        stale.ipcache.pop_last();
        assert_eq!(compiler.check(compiler.checkpoint(), &state, &node, now, &stale), Check::Differed);
        assert_eq!(compiler.compile(&state, &node, now), compiled);
        assert_eq!(compiler.last_reuse(), Reuse { policies_parsed: 4, identities_resolved: true, peers_resolved: 4, ..Reuse::default() });
    }
}
