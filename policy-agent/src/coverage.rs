//! `policy-agent coverage`: which pods no policy isolates, per direction, which are isolated
//! with nothing allowed, and which namespaces have a default deny.
//!
//! Isolation and allow entries come from the compiler's own output for each pod's node (the
//! same [`compile::compile`] the agent enforces), so the report says what the maps hold.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::process::ExitCode;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use policy_common::Direction;
use policy_common::policy::COOKIE_NODE;
use serde::Serialize;

use crate::compile::{self, Compiled, EndpointPolicy, NodeContext};
use crate::metrics;
use crate::explain::{InputArgs, runtime};
use crate::resolve::{Selector, is_live_pod, node_name, pod_ips};
use crate::state::{ClusterState, PodRef, Problem};
#[cfg(test)]
use crate::state::NamespacedName;

#[derive(clap::Args, Debug, Clone)]
pub struct CoverageArgs {
    #[command(flatten)]
    pub input: InputArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// How one direction of one pod is covered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Isolation {
    /// No policy selects the pod for this direction: everything is allowed.
    NotIsolated,
    /// Selected by a policy that allows some peer.
    Isolated,
    /// Selected, and no rule of the selecting policies allows any peer (node traffic to the
    /// pod, which is always allowed, does not count).
    IsolatedNothingAllowed,
}

/// One direction of one pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DirectionCoverage {
    pub state: Isolation,
    /// The policies that select the pod for this direction.
    pub policies: Vec<String>,
}

/// One enforced pod (scheduled, with an IP, not hostNetwork, not terminated).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PodCoverage {
    pub pod: String,
    pub namespace: String,
    pub node: String,
    pub ingress: DirectionCoverage,
    pub egress: DirectionCoverage,
}

/// One namespace: pod counts per direction and its default-deny policies.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NamespaceCoverage {
    pub namespace: String,
    pub pods: u64,
    pub ingress: NamespaceDirection,
    pub egress: NamespaceDirection,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NamespaceDirection {
    pub not_isolated: u64,
    pub isolated: u64,
    pub isolated_nothing_allowed: u64,
    /// Policies with an empty podSelector that isolate this direction and have no rule in it.
    pub default_deny: Vec<String>,
}

/// The whole report; lists sorted by namespace and name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CoverageReport {
    pub pods: Vec<PodCoverage>,
    /// Live pods that are not enforced yet anywhere (no node or no IP).
    pub pending: Vec<String>,
    pub namespaces: Vec<NamespaceCoverage>,
    pub problems: Vec<Problem>,
}

impl CoverageReport {
    /// The report as the agent's per-namespace metrics.
    pub fn per_namespace(&self) -> Vec<metrics::NamespaceCoverage> {
        let counts = |d: &NamespaceDirection| metrics::CoverageCounts {
            unprotected: d.not_isolated,
            isolated: d.isolated,
            isolated_nothing_allowed: d.isolated_nothing_allowed,
        };
        let namespace = |n: &NamespaceCoverage| metrics::NamespaceCoverage {
            namespace: n.namespace.clone(),
            ingress: counts(&n.ingress),
            egress: counts(&n.egress),
            default_deny_ingress: !n.ingress.default_deny.is_empty(),
            default_deny_egress: !n.egress.default_deny.is_empty(),
        };
        self.namespaces.iter().map(namespace).collect()
    }

    /// Only what concerns `namespace` (pods, pending pods, the namespace).
    pub fn retain_namespace(&mut self, namespace: &str) {
        self.pods.retain(|p| p.namespace == namespace);
        self.pending.retain(|p| p.split_once('/').is_some_and(|(ns, _)| ns == namespace));
        self.namespaces.retain(|n| n.namespace == namespace);
    }
}

/// The coverage of every enforced pod (only those of `node`, if given), compiled for each
/// pod's node.
pub fn report(state: &ClusterState, node: Option<&str>) -> CoverageReport {
    let nodes: BTreeSet<&str> = state
        .pods
        .values()
        .filter(|p| is_live_pod(p))
        .filter_map(|p| node_name(p))
        .filter(|n| node.is_none_or(|wanted| wanted == *n))
        .collect();
    let compiled: Vec<(String, Compiled)> =
        nodes.into_iter().map(|n| (n.to_owned(), compile::compile(state, &NodeContext { name: n.to_owned(), ips: Vec::new() }))).collect();
    let mut report = report_compiled(state, compiled.iter().map(|(n, c)| (n.as_str(), c)));
    if node.is_some() {
        // Pending pods have no node: they belong to no node's report.
        report.pending.clear();
    }
    report
}

/// The report from compilations already made (the agent passes its own, for its node).
pub fn report_compiled<'c>(state: &ClusterState, compiled: impl IntoIterator<Item = (&'c str, &'c Compiled)>) -> CoverageReport {
    let mut report = CoverageReport::default();
    let mut problems = BTreeSet::new();
    let mut enforced = BTreeSet::new();
    for (node, compiled) in compiled {
        problems.extend(compiled.problems.iter().cloned());
        for (pod, endpoint) in &compiled.endpoints {
            enforced.insert(pod.clone());
            report.pods.push(PodCoverage {
                pod: pod.to_string(),
                namespace: pod.namespace.clone(),
                node: node.to_owned(),
                ingress: direction_coverage(endpoint, Direction::Ingress),
                egress: direction_coverage(endpoint, Direction::Egress),
            });
        }
    }
    report.pods.sort_by(|a, b| a.pod.cmp(&b.pod));
    report.pending = pending_pods(state, &enforced);
    report.namespaces = namespaces(state, &report.pods);
    report.problems = problems.into_iter().collect();
    report
}

fn direction_coverage(endpoint: &EndpointPolicy, direction: Direction) -> DirectionCoverage {
    let cluster = endpoint.cluster_policies(direction).iter().map(|name| format!("ClusterNetworkPolicy/{name}"));
    let policies = endpoint.policies(direction).iter().map(ToString::to_string).chain(cluster).collect();
    // The node's own entries are added to every ingress-isolated pod: they allow no peer
    // that a policy named. (A default-allow entry does allow peers.)
    let allows_a_peer = endpoint.rules.iter().any(|(key, cookie)| key.direction == direction && *cookie != COOKIE_NODE);
    // A pod only ClusterNetworkPolicies select is judged too: it is protected.
    let state = match (endpoint.judged(direction), allows_a_peer) {
        (false, _) => Isolation::NotIsolated,
        (true, true) => Isolation::Isolated,
        (true, false) => Isolation::IsolatedNothingAllowed,
    };
    DirectionCoverage { state, policies }
}

/// Live pods that no node enforces yet: not scheduled, or without an address.
fn pending_pods(state: &ClusterState, enforced: &BTreeSet<PodRef>) -> Vec<String> {
    state
        .pods
        .iter()
        .filter(|(pod_ref, pod)| is_live_pod(pod) && !enforced.contains(*pod_ref))
        .filter(|(_, pod)| node_name(pod).is_none() || pod_ips(pod, &mut Vec::new()).is_empty())
        .map(|(pod_ref, _)| pod_ref.to_string())
        .collect()
}

/// Every namespace with an object, a pod or a policy; counts from `pods`.
fn namespaces(state: &ClusterState, pods: &[PodCoverage]) -> Vec<NamespaceCoverage> {
    let mut by_name: BTreeMap<&str, NamespaceCoverage> = BTreeMap::new();
    let names = state
        .namespaces
        .keys()
        .chain(state.pods.keys().map(|p| &p.namespace))
        .chain(state.policies.keys().map(|p| &p.namespace));
    for name in names {
        by_name.entry(name).or_insert_with(|| NamespaceCoverage { namespace: name.clone(), ..NamespaceCoverage::default() });
    }
    for pod in pods {
        let Some(entry) = by_name.get_mut(pod.namespace.as_str()) else { continue };
        entry.pods += 1;
        for (counts, coverage) in [(&mut entry.ingress, &pod.ingress), (&mut entry.egress, &pod.egress)] {
            match coverage.state {
                Isolation::NotIsolated => counts.not_isolated += 1,
                Isolation::Isolated => counts.isolated += 1,
                Isolation::IsolatedNothingAllowed => counts.isolated_nothing_allowed += 1,
            }
        }
    }
    for (policy_ref, policy) in &state.policies {
        let Some(entry) = by_name.get_mut(policy_ref.namespace.as_str()) else { continue };
        for direction in [Direction::Ingress, Direction::Egress] {
            if is_default_deny(policy, direction) {
                let counts = if direction == Direction::Ingress { &mut entry.ingress } else { &mut entry.egress };
                counts.default_deny.push(policy_ref.to_string());
            }
        }
    }
    by_name.into_values().collect()
}

/// A default deny for `direction`: an empty podSelector, the direction among its policy
/// types (`spec.policyTypes`, or the API's default: Ingress, plus Egress when there are
/// egress rules), and no rule in that direction.
pub fn is_default_deny(policy: &NetworkPolicy, direction: Direction) -> bool {
    let Some(spec) = &policy.spec else {
        return direction == Direction::Ingress; // `spec: {}`: selects all, isolates ingress
    };
    let selects_all = spec.pod_selector.as_ref().is_none_or(|s| Selector::parse(s).is_ok_and(|s| s.is_everything()));
    let types: Vec<&str> = spec.policy_types.iter().flatten().map(String::as_str).filter(|t| matches!(*t, "Ingress" | "Egress")).collect();
    let has_rules = match direction {
        Direction::Ingress => spec.ingress.as_ref().is_some_and(|r| !r.is_empty()),
        Direction::Egress => spec.egress.as_ref().is_some_and(|r| !r.is_empty()),
    };
    let isolates = if types.is_empty() {
        direction == Direction::Ingress || has_rules
    } else {
        types.contains(&if direction == Direction::Ingress { "Ingress" } else { "Egress" })
    };
    selects_all && isolates && !has_rules
}

/// Runs the command: exit 0 with a report, 2 on bad input or an unreachable cluster.
pub fn main(args: &CoverageArgs) -> ExitCode {
    let result = runtime().and_then(|rt| rt.block_on(args.input.load()));
    match result {
        Ok(loaded) => {
            for problem in &loaded.problems {
                eprintln!("warning: {problem}");
            }
            let mut report = report(&loaded.state, None);
            if let Some(namespace) = &args.input.namespace {
                report.retain_namespace(namespace);
            }
            for problem in &report.problems {
                eprintln!("warning: {problem}");
            }
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
            } else {
                print!("{}", report.to_text());
            }
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
    }
}

impl CoverageReport {
    /// Pods no policy isolates first (per direction), then pods isolated with nothing
    /// allowed, then one line per namespace.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let sections = [
            ("not isolated for ingress (every source allowed)", Isolation::NotIsolated, Direction::Ingress),
            ("not isolated for egress (every destination allowed)", Isolation::NotIsolated, Direction::Egress),
            ("isolated for ingress, nothing allowed", Isolation::IsolatedNothingAllowed, Direction::Ingress),
            ("isolated for egress, nothing allowed", Isolation::IsolatedNothingAllowed, Direction::Egress),
        ];
        for (title, wanted, direction) in sections {
            let side = |p: &PodCoverage| if direction == Direction::Ingress { p.ingress.clone() } else { p.egress.clone() };
            let pods: Vec<&PodCoverage> = self.pods.iter().filter(|p| side(p).state == wanted).collect();
            let _ = writeln!(out, "pods {title}: {}", pods.len());
            for pod in pods {
                let by = side(pod).policies.join(", ");
                let by = if by.is_empty() { String::new() } else { format!("  by {by}") };
                let _ = writeln!(out, "  {:<40} node {}{by}", pod.pod, pod.node);
            }
        }
        if !self.pending.is_empty() {
            let _ = writeln!(out, "pods not enforced yet (no node or no IP): {}", self.pending.len());
            for pod in &self.pending {
                let _ = writeln!(out, "  {pod}");
            }
        }
        let _ = writeln!(out, "namespaces (pods not isolated / isolated / nothing allowed):");
        let _ = writeln!(out, "  {:<24} {:>5} {:<14} {:<14} {:<28} {:<28}", "NAMESPACE", "PODS", "INGRESS", "EGRESS", "DEFAULT-DENY-INGRESS", "DEFAULT-DENY-EGRESS");
        for ns in &self.namespaces {
            let counts = |d: &NamespaceDirection| format!("{}/{}/{}", d.not_isolated, d.isolated, d.isolated_nothing_allowed);
            let deny = |d: &NamespaceDirection| {
                if d.default_deny.is_empty() {
                    "no".to_owned()
                } else {
                    let names: Vec<&str> = d.default_deny.iter().map(|p| p.split_once('/').map_or(p.as_str(), |(_, n)| n)).collect();
                    format!("yes ({})", names.join(", "))
                }
            };
            let _ = writeln!(
                out,
                "  {:<24} {:>5} {:<14} {:<14} {:<28} {:<28}",
                ns.namespace,
                ns.pods,
                counts(&ns.ingress),
                counts(&ns.egress),
                deny(&ns.ingress),
                deny(&ns.egress)
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::parse_manifest_str;

    fn pod(namespace: &str, name: &str, app: &str, node: Option<&str>, ip: Option<&str>) -> String {
        let node = node.map_or_else(String::new, |n| format!("nodeName: {n}, "));
        let status = ip.map_or_else(|| "{phase: Pending}".to_owned(), |ip| format!("{{phase: Running, podIP: {ip}}}"));
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}, labels: {{app: {app}}}}}\nspec: {{{node}containers: [{{name: c}}]}}\nstatus: {status}\n"
        )
    }

    fn policy(namespace: &str, name: &str, spec: &str) -> String {
        format!("---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec: {spec}\n")
    }

    fn state(documents: &[String]) -> ClusterState {
        let (objects, problems) = parse_manifest_str("test.yaml", false, &documents.concat());
        assert!(problems.is_empty(), "{problems:?}");
        ClusterState::from_objects(objects)
    }

    /// x: a (open), b (ingress from a only), c (ingress isolated, from nobody that exists),
    /// on two nodes; y: d with a default deny both ways; a pending pod; a hostNetwork pod.
    fn cluster() -> ClusterState {
        let mut documents = vec![
            pod("x", "a", "a", Some("n1"), Some("198.18.0.1")),
            pod("x", "b", "b", Some("n1"), Some("198.18.0.2")),
            pod("x", "c", "c", Some("n2"), Some("198.18.0.3")),
            pod("x", "pending", "a", None, None),
            pod("y", "d", "d", Some("n2"), Some("198.18.0.4")),
            policy("x", "b-from-a", "{podSelector: {matchLabels: {app: b}}, ingress: [{from: [{podSelector: {matchLabels: {app: a}}}]}]}"),
            policy("x", "c-from-ghost", "{podSelector: {matchLabels: {app: c}}, ingress: [{from: [{podSelector: {matchLabels: {app: ghost}}}]}]}"),
            policy("y", "deny-all", "{podSelector: {}, policyTypes: [Ingress, Egress]}"),
        ];
        documents.push(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {name: host, namespace: x}\nspec: {nodeName: n1, hostNetwork: true, containers: [{name: c}]}\nstatus: {podIP: 198.19.0.1}\n"
                .to_owned(),
        );
        state(&documents)
    }

    fn states(report: &CoverageReport) -> Vec<(&str, Isolation, Isolation)> {
        report.pods.iter().map(|p| (p.pod.as_str(), p.ingress.state, p.egress.state)).collect()
    }

    #[test]
    fn pods_are_classified_per_direction_from_the_compiled_endpoints() {
        use Isolation::*;
        let report = report(&cluster(), None);
        assert_eq!(
            states(&report),
            [
                ("x/a", NotIsolated, NotIsolated),
                ("x/b", Isolated, NotIsolated),
                ("x/c", IsolatedNothingAllowed, NotIsolated),
                ("y/d", IsolatedNothingAllowed, IsolatedNothingAllowed),
            ]
        );
        assert_eq!(report.pods[1].ingress.policies, ["x/b-from-a"]);
        assert_eq!(report.pods[2].node, "n2");
        assert_eq!(report.pending, ["x/pending"], "hostNetwork pods are not listed");
    }

    #[test]
    fn a_pod_only_a_cluster_policy_selects_is_protected() {
        use Isolation::*;
        let mut documents = vec![pod("x", "a", "a", Some("n1"), Some("198.18.0.1")), pod("x", "e", "e", Some("n1"), Some("198.18.0.5"))];
        documents.push(
            "---\napiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: guard-e}\nspec: {tier: Admin, priority: 5, subject: {pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: e}}}}, ingress: [{action: Deny, from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: a}}}}]}]}\n"
                .to_owned(),
        );
        let report = report(&state(&documents), None);
        assert_eq!(states(&report), [("x/a", NotIsolated, NotIsolated), ("x/e", Isolated, NotIsolated)]);
        assert_eq!(report.pods[1].ingress.policies, ["ClusterNetworkPolicy/guard-e"]);
    }

    #[test]
    fn namespaces_count_pods_and_find_default_denies() {
        let report = report(&cluster(), None);
        assert_eq!(report.per_namespace(), [counts("x", [1, 1, 1], [3, 0, 0], false, false), counts("y", [0, 0, 1], [0, 0, 1], true, true)]);
        assert_eq!(report.namespaces[1].ingress.default_deny, ["y/deny-all"]);
    }

    #[test]
    fn a_node_report_has_only_that_nodes_pods() {
        let report = report(&cluster(), Some("n2"));
        assert_eq!(report.pods.iter().map(|p| p.pod.as_str()).collect::<Vec<_>>(), ["x/c", "y/d"]);
        assert!(report.pending.is_empty());
        assert_eq!(report.per_namespace()[0], counts("x", [0, 0, 1], [1, 0, 0], false, false));
    }

    /// Expected metrics: `[unprotected, isolated, isolated with nothing allowed]` per direction.
    fn counts(namespace: &str, ingress: [u64; 3], egress: [u64; 3], deny_ingress: bool, deny_egress: bool) -> metrics::NamespaceCoverage {
        let direction = |[unprotected, isolated, isolated_nothing_allowed]: [u64; 3]| metrics::CoverageCounts { unprotected, isolated, isolated_nothing_allowed };
        metrics::NamespaceCoverage {
            namespace: namespace.to_owned(),
            ingress: direction(ingress),
            egress: direction(egress),
            default_deny_ingress: deny_ingress,
            default_deny_egress: deny_egress,
        }
    }

    #[test]
    fn default_deny_needs_an_empty_selector_the_type_and_no_rule() {
        let deny = |spec: &str, direction| {
            let state = state(&[policy("x", "p", spec)]);
            is_default_deny(&state.policies[&NamespacedName::new("x", "p")], direction)
        };
        use Direction::{Egress, Ingress};
        assert!(deny("{podSelector: {}}", Ingress), "policyTypes default to Ingress");
        assert!(!deny("{podSelector: {}}", Egress));
        assert!(deny("{podSelector: {}, policyTypes: [Egress]}", Egress));
        assert!(!deny("{podSelector: {}, policyTypes: [Egress]}", Ingress));
        assert!(!deny("{podSelector: {matchLabels: {app: a}}, policyTypes: [Ingress]}", Ingress), "not every pod");
        assert!(!deny("{podSelector: {}, ingress: [{}]}", Ingress), "allows everything");
        assert!(!deny("{podSelector: {}, egress: [{to: [{podSelector: {}}]}]}", Egress), "egress rules: isolates, allows");
        assert!(deny("{podSelector: {}, ingress: [], policyTypes: [Ingress]}", Ingress), "an empty list is no rule");
    }

    #[test]
    fn restricting_to_a_namespace_keeps_only_it() {
        let mut report = report(&cluster(), None);
        report.retain_namespace("y");
        assert_eq!(states(&report).len(), 1);
        assert!(report.pending.is_empty());
        assert_eq!(report.namespaces.len(), 1);
        let text = report.to_text();
        assert!(text.contains("isolated for ingress, nothing allowed: 1\n  y/d"), "{text}");
        assert!(text.contains("yes (deny-all)"), "{text}");
    }
}
