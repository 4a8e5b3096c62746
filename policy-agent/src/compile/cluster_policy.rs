//! Validation of `ClusterNetworkPolicy` objects into rules the tier resolver evaluates.
//!
//! The API asks implementations to fail closed on what they cannot understand: an `Accept`
//! rule with an invalid part matches nothing; a `Deny` or `Pass` rule with an invalid part
//! becomes "deny everything". Every such case is reported with object and field.

use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::api::networking::v1::IPBlock;
use policy_common::{Direction, proto};

use super::policy::{ParsedPeer, ParsedPort, Reporter};
use crate::crd::{ClusterNetworkPolicy, NamespacedPod, Protocol};
use crate::resolve::{CidrBlock, Labels, Selector};
use crate::state::{Problem, cluster_policy_name};

/// The API's limits on rules per direction and peers or protocols per rule.
pub(crate) const MAX_ITEMS: usize = 25;
pub(crate) const MAX_PRIORITY: i32 = 1000;

/// Admin is evaluated before NetworkPolicy, Baseline after it (the derived order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    Admin,
    Baseline,
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tier::Admin => "Admin",
            Tier::Baseline => "Baseline",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RuleAction {
    Accept,
    Deny,
    Pass,
}

impl fmt::Display for RuleAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RuleAction::Accept => "Accept",
            RuleAction::Deny => "Deny",
            RuleAction::Pass => "Pass",
        })
    }
}

/// One validated ClusterNetworkPolicy.
#[derive(Clone, Debug)]
pub(crate) struct ParsedClusterPolicy {
    pub name: String,
    pub tier: Tier,
    /// Clamped to 0..=1000.
    pub priority: i32,
    /// `None`: the subject is invalid and the policy applies to no pod.
    pub subject: Option<ParsedSubject>,
    pub ingress: Vec<ParsedClusterRule>,
    pub egress: Vec<ParsedClusterRule>,
}

impl ParsedClusterPolicy {
    pub fn rules(&self, direction: Direction) -> &[ParsedClusterRule] {
        match direction {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }

    /// Whether the policy applies to a pod with these labels in a namespace with these.
    pub fn selects(&self, namespace_labels: &Labels, pod_labels: &Labels) -> bool {
        self.subject.as_ref().is_some_and(|s| s.namespaces.matches(namespace_labels) && s.pods.matches(pod_labels))
    }
}

/// `subject`: a namespace selector and a pod selector (`namespaces` selects every pod).
#[derive(Clone, Debug)]
pub(crate) struct ParsedSubject {
    pub namespaces: Selector,
    pub pods: Selector,
}

#[derive(Clone, Debug)]
pub(crate) struct ParsedClusterRule {
    pub index: usize,
    pub name: Option<String>,
    pub action: RuleAction,
    /// `None`: every peer (only a rule turned into "deny everything" has none).
    pub peers: Option<Vec<ParsedPeer>>,
    /// `None`: every protocol and port.
    pub ports: Option<Vec<ParsedPort>>,
}

/// A `NamespacedPod`'s two selectors, or `None` after reporting what is invalid.
fn namespaced_pod(reporter: &mut Reporter<'_>, field: &str, pods: &NamespacedPod) -> Option<(Selector, Selector)> {
    let namespaces = reporter.selector(&format!("{field}.namespaceSelector"), &pods.namespace_selector);
    let pods = reporter.selector(&format!("{field}.podSelector"), &pods.pod_selector);
    Some((namespaces?, pods?))
}

pub(crate) fn parse_cluster_policy(policy: &ClusterNetworkPolicy, problems: &mut Vec<Problem>) -> ParsedClusterPolicy {
    let name = cluster_policy_name(policy);
    let mut reporter = Reporter { object: format!("ClusterNetworkPolicy {name}"), problems };
    let spec = &policy.spec;
    let tier = match spec.tier.as_str() {
        "Admin" => Some(Tier::Admin),
        "Baseline" => Some(Tier::Baseline),
        other => {
            reporter.report(
                "spec.tier",
                format!("unknown tier {other:?} (Admin, Baseline): enforced in the Admin tier with its Accept rules dropped and its Pass rules denying"),
            );
            None
        }
    };
    let priority = spec.priority.clamp(0, MAX_PRIORITY);
    if priority != spec.priority {
        reporter.report("spec.priority", format!("{} is outside 0-{MAX_PRIORITY}; enforced as {priority}", spec.priority));
    }
    let subject = parse_subject(&mut reporter, &spec.subject);
    let ingress_rules = spec.ingress.iter().flatten().map(|r| (r.name.as_deref(), r.action.as_str(), peers_of_ingress(r), r.protocols.as_deref()));
    let ingress = parse_rules(&mut reporter, "spec.ingress", "from", tier.is_none(), ingress_rules);
    let egress_rules = spec.egress.iter().flatten().map(|r| (r.name.as_deref(), r.action.as_str(), peers_of_egress(r), r.protocols.as_deref()));
    let egress = parse_rules(&mut reporter, "spec.egress", "to", tier.is_none(), egress_rules);
    ParsedClusterPolicy { name, tier: tier.unwrap_or(Tier::Admin), priority, subject, ingress, egress }
}

fn parse_subject(reporter: &mut Reporter<'_>, subject: &crate::crd::Subject) -> Option<ParsedSubject> {
    let parsed = match (&subject.namespaces, &subject.pods) {
        (Some(namespaces), None) => {
            reporter.selector("spec.subject.namespaces", namespaces).map(|namespaces| ParsedSubject { namespaces, pods: Selector::everything() })
        }
        (None, Some(pods)) => namespaced_pod(reporter, "spec.subject.pods", pods).map(|(namespaces, pods)| ParsedSubject { namespaces, pods }),
        _ => {
            reporter.report("spec.subject", "exactly one of namespaces and pods must be set");
            None
        }
    };
    if parsed.is_none() {
        reporter.report("spec.subject", "invalid subject: the policy applies to no pod");
    }
    parsed
}

/// A peer as the parser sees it, whichever direction it comes from.
struct PeerFields<'a> {
    namespaces: Option<&'a LabelSelector>,
    pods: Option<&'a NamespacedPod>,
    networks: Option<&'a [String]>,
    /// Set fields this implementation does not enforce (`nodes`, `domainNames`).
    unsupported: Vec<&'static str>,
}

fn peers_of_ingress(rule: &crate::crd::IngressRule) -> Vec<PeerFields<'_>> {
    rule.from
        .iter()
        .map(|p| PeerFields { namespaces: p.namespaces.as_ref(), pods: p.pods.as_ref(), networks: None, unsupported: Vec::new() })
        .collect()
}

fn peers_of_egress(rule: &crate::crd::EgressRule) -> Vec<PeerFields<'_>> {
    rule.to
        .iter()
        .map(|p| {
            let mut unsupported = Vec::new();
            if p.nodes.is_some() {
                unsupported.push("nodes");
            }
            if p.domain_names.is_some() {
                unsupported.push("domainNames");
            }
            PeerFields { namespaces: p.namespaces.as_ref(), pods: p.pods.as_ref(), networks: p.networks.as_deref(), unsupported }
        })
        .collect()
}

type RawRule<'a> = (Option<&'a str>, &'a str, Vec<PeerFields<'a>>, Option<&'a [Protocol]>);

fn parse_rules<'a>(
    reporter: &mut Reporter<'_>,
    list: &str,
    peers_field: &str,
    unknown_tier: bool,
    rules: impl Iterator<Item = RawRule<'a>>,
) -> Vec<ParsedClusterRule> {
    let mut parsed = Vec::new();
    for (index, (name, action, peers, protocols)) in rules.enumerate() {
        if index == MAX_ITEMS {
            reporter.report(list, format!("more than {MAX_ITEMS} rules (the API's limit); all are enforced"));
        }
        let field = format!("{list}[{index}]");
        let rule = parse_rule(reporter, &field, peers_field, index, name, action, &peers, protocols);
        match rule {
            // An unknown tier may not open anything, nor skip what the Admin tier denies.
            Some(rule) if unknown_tier && rule.action == RuleAction::Accept => {}
            Some(rule) if unknown_tier => parsed.push(ParsedClusterRule { action: RuleAction::Deny, ..rule }),
            Some(rule) => parsed.push(rule),
            None => {}
        }
    }
    parsed
}

#[allow(clippy::too_many_arguments)]
fn parse_rule(
    reporter: &mut Reporter<'_>,
    field: &str,
    peers_field: &str,
    index: usize,
    name: Option<&str>,
    action: &str,
    peers: &[PeerFields<'_>],
    protocols: Option<&[Protocol]>,
) -> Option<ParsedClusterRule> {
    let name = name.map(str::to_owned);
    let deny_everything = |name| ParsedClusterRule { index, name, action: RuleAction::Deny, peers: None, ports: None };
    let action = match action {
        "Accept" => RuleAction::Accept,
        "Deny" => RuleAction::Deny,
        "Pass" => RuleAction::Pass,
        other => {
            reporter.report(format!("{field}.action"), format!("unknown action {other:?} (Accept, Deny, Pass): the rule denies everything"));
            return Some(deny_everything(name));
        }
    };
    let parsed_peers = parse_peers(reporter, &format!("{field}.{peers_field}"), peers);
    let parsed_ports = protocols.map(|p| parse_protocols(reporter, &format!("{field}.protocols"), p));
    let (Some(peers), Some(ports)) = (parsed_peers, parsed_ports.unwrap_or(Some(Vec::new()))) else {
        return if action == RuleAction::Accept {
            reporter.report(field, "invalid Accept rule: it matches nothing");
            None
        } else {
            reporter.report(field, format!("invalid {action} rule: it denies everything"));
            Some(deny_everything(name))
        };
    };
    let ports = protocols.is_some().then_some(ports);
    Some(ParsedClusterRule { index, name, action, peers: Some(peers), ports })
}

/// The peers of a rule; `None` (after reporting) if any is invalid or there are none.
fn parse_peers(reporter: &mut Reporter<'_>, field: &str, peers: &[PeerFields<'_>]) -> Option<Vec<ParsedPeer>> {
    if peers.is_empty() {
        reporter.report(field, "at least one peer is required");
        return None;
    }
    if peers.len() > MAX_ITEMS {
        reporter.report(field, format!("more than {MAX_ITEMS} peers (the API's limit); all are enforced"));
    }
    let mut parsed = Vec::new();
    let mut valid = true;
    for (i, peer) in peers.iter().enumerate() {
        match parse_peer(reporter, &format!("{field}[{i}]"), peer) {
            Some(mut items) => parsed.append(&mut items),
            None => valid = false,
        }
    }
    valid.then_some(parsed)
}

fn parse_peer(reporter: &mut Reporter<'_>, field: &str, peer: &PeerFields<'_>) -> Option<Vec<ParsedPeer>> {
    for name in &peer.unsupported {
        reporter.report(format!("{field}.{name}"), "not supported by this enforcer (experimental in the API)");
    }
    let set = usize::from(peer.namespaces.is_some()) + usize::from(peer.pods.is_some()) + usize::from(peer.networks.is_some()) + peer.unsupported.len();
    if set != 1 {
        if peer.unsupported.is_empty() {
            reporter.report(field, "exactly one of namespaces, pods and networks must be set");
        }
        return None;
    }
    if let Some(namespaces) = peer.namespaces {
        let namespaces = reporter.selector(&format!("{field}.namespaces"), namespaces)?;
        return Some(vec![ParsedPeer::Pods { namespaces: Some(namespaces), pods: Selector::everything() }]);
    }
    if let Some(pods) = peer.pods {
        let (namespaces, pods) = namespaced_pod(reporter, &format!("{field}.pods"), pods)?;
        return Some(vec![ParsedPeer::Pods { namespaces: Some(namespaces), pods }]);
    }
    let networks = peer.networks?;
    if networks.is_empty() || networks.len() > MAX_ITEMS {
        reporter.report(format!("{field}.networks"), format!("needs 1 to {MAX_ITEMS} CIDRs"));
        if networks.is_empty() {
            return None;
        }
    }
    let mut blocks = Vec::new();
    for (i, cidr) in networks.iter().enumerate() {
        match CidrBlock::parse(&IPBlock { cidr: cidr.clone(), except: None }) {
            Ok(block) => blocks.push(ParsedPeer::Block(block)),
            Err(errors) => {
                for (_, message) in errors {
                    reporter.report(format!("{field}.networks[{i}]"), message);
                }
                return None;
            }
        }
    }
    Some(blocks)
}

/// The ports of `protocols`; `None` (after reporting) if any entry is invalid.
fn parse_protocols(reporter: &mut Reporter<'_>, field: &str, protocols: &[Protocol]) -> Option<Vec<ParsedPort>> {
    if protocols.is_empty() {
        reporter.report(field, "at least one protocol is required when protocols is set");
        return None;
    }
    if protocols.len() > MAX_ITEMS {
        reporter.report(field, format!("more than {MAX_ITEMS} protocols (the API's limit); all are enforced"));
    }
    let mut ports = Vec::new();
    for (i, protocol) in protocols.iter().enumerate() {
        ports.extend(parse_protocol(reporter, &format!("{field}[{i}]"), protocol)?);
    }
    ports.sort();
    ports.dedup();
    Some(ports)
}

fn parse_protocol(reporter: &mut Reporter<'_>, field: &str, protocol: &Protocol) -> Option<Vec<ParsedPort>> {
    let set: Vec<(&str, u8, &crate::crd::ProtocolPort)> = [("tcp", proto::TCP, &protocol.tcp), ("udp", proto::UDP, &protocol.udp), ("sctp", proto::SCTP, &protocol.sctp)]
        .into_iter()
        .filter_map(|(name, number, port)| port.as_ref().map(|port| (name, number, port)))
        .collect();
    match (set.as_slice(), &protocol.destination_named_port) {
        ([], Some(name)) => match super::policy::port_name_error(name) {
            // A named port carries the protocol of the container port it names.
            None => Some([proto::TCP, proto::UDP, proto::SCTP].into_iter().map(|p| ParsedPort::Named(p, name.clone())).collect()),
            Some(why) => {
                reporter.report(format!("{field}.destinationNamedPort"), format!("invalid port name {name:?}: {why}"));
                None
            }
        },
        ([(name, number, port)], None) => {
            let field = format!("{field}.{name}.destinationPort");
            parse_port(reporter, &field, *number, port.destination_port.as_ref()).map(|p| vec![p])
        }
        _ => {
            reporter.report(field, "exactly one of tcp, udp, sctp and destinationNamedPort must be set");
            None
        }
    }
}

fn parse_port(reporter: &mut Reporter<'_>, field: &str, protocol: u8, port: Option<&crate::crd::Port>) -> Option<ParsedPort> {
    let Some(port) = port else { return Some(ParsedPort::Protocol(protocol)) };
    let number = |value: i32| u16::try_from(value).ok().filter(|p| *p != 0);
    match (port.number, &port.range) {
        (Some(n), None) => match number(n) {
            Some(p) => Some(ParsedPort::Range(protocol, p, p)),
            None => {
                reporter.report(format!("{field}.number"), format!("{n} is not a port (1-65535)"));
                None
            }
        },
        (None, Some(range)) => match (number(range.start), number(range.end)) {
            (Some(start), Some(end)) if start <= end => Some(ParsedPort::Range(protocol, start, end)),
            _ => {
                reporter.report(format!("{field}.range"), format!("{}-{} is not a port range (1-65535, start <= end)", range.start, range.end));
                None
            }
        },
        _ => {
            reporter.report(field, "exactly one of number and range must be set");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{ClusterNetworkPolicySpec, EgressPeer, EgressRule, IngressPeer, IngressRule, Port, PortRange, ProtocolPort, Subject};

    fn policy(spec: ClusterNetworkPolicySpec) -> ClusterNetworkPolicy {
        ClusterNetworkPolicy::new("p", spec)
    }

    fn all_namespaces() -> Subject {
        Subject { namespaces: Some(LabelSelector::default()), pods: None }
    }

    fn peer_all() -> IngressPeer {
        IngressPeer { namespaces: Some(LabelSelector::default()), pods: None }
    }

    fn parse(spec: ClusterNetworkPolicySpec) -> (ParsedClusterPolicy, Vec<Problem>) {
        let mut problems = Vec::new();
        let parsed = parse_cluster_policy(&policy(spec), &mut problems);
        (parsed, problems)
    }

    fn ingress(action: &str, from: Vec<IngressPeer>, protocols: Option<Vec<Protocol>>) -> IngressRule {
        IngressRule { name: None, action: action.to_owned(), from, protocols }
    }

    fn tcp(port: Option<Port>) -> Protocol {
        Protocol { tcp: Some(ProtocolPort { destination_port: port }), ..Protocol::default() }
    }

    #[test]
    fn a_valid_policy_parses_without_problems() {
        let spec = ClusterNetworkPolicySpec {
            tier: "Baseline".into(),
            priority: 7,
            subject: all_namespaces(),
            ingress: Some(vec![ingress(
                "Pass",
                vec![peer_all()],
                Some(vec![
                    tcp(Some(Port { number: Some(80), range: None })),
                    tcp(Some(Port { number: None, range: Some(PortRange { start: 1000, end: 2000 }) })),
                    Protocol { destination_named_port: Some("dns".into()), ..Protocol::default() },
                ]),
            )]),
            egress: Some(vec![EgressRule {
                name: Some("out".into()),
                action: "Deny".into(),
                to: vec![EgressPeer { networks: Some(vec!["198.18.0.0/16".into(), "2001:2::/48".into()]), ..EgressPeer::default() }],
                protocols: None,
            }]),
        };
        let (parsed, problems) = parse(spec);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!((parsed.tier, parsed.priority), (Tier::Baseline, 7));
        assert_eq!(parsed.ingress[0].action, RuleAction::Pass);
        assert_eq!(parsed.ingress[0].ports.as_ref().unwrap().len(), 5);
        assert_eq!(parsed.egress[0].peers.as_ref().unwrap().len(), 2);
        assert!(parsed.egress[0].ports.is_none());
    }

    #[test]
    fn an_invalid_accept_rule_matches_nothing_and_an_invalid_deny_or_pass_denies_everything() {
        let bad_peer = IngressPeer::default();
        let spec = ClusterNetworkPolicySpec {
            tier: "Admin".into(),
            priority: 1,
            subject: all_namespaces(),
            ingress: Some(vec![
                ingress("Accept", vec![peer_all(), bad_peer.clone()], None),
                ingress("Pass", vec![bad_peer], None),
                ingress("Deny", vec![peer_all()], Some(vec![tcp(Some(Port { number: Some(0), range: None }))])),
                ingress("Allow", vec![peer_all()], None),
            ]),
            egress: None,
        };
        let (parsed, problems) = parse(spec);
        assert_eq!(parsed.ingress.iter().map(|r| r.index).collect::<Vec<_>>(), [1, 2, 3]);
        for rule in &parsed.ingress {
            assert_eq!(rule.action, RuleAction::Deny);
            assert!(rule.peers.is_none() && rule.ports.is_none());
        }
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert!(fields.contains(&"spec.ingress[0].from[1]"), "{fields:?}");
        assert!(fields.contains(&"spec.ingress[2].protocols[0].tcp.destinationPort.number"), "{fields:?}");
        assert!(fields.contains(&"spec.ingress[3].action"), "{fields:?}");
    }

    #[test]
    fn unsupported_peers_fail_closed_and_limits_are_reported() {
        let spec = ClusterNetworkPolicySpec {
            tier: "Admin".into(),
            priority: 5000,
            subject: Subject::default(),
            ingress: Some((0..26).map(|_| ingress("Deny", vec![peer_all()], None)).collect()),
            egress: Some(vec![EgressRule {
                name: None,
                action: "Pass".into(),
                to: vec![EgressPeer { domain_names: Some(vec!["example.com".into()]), ..EgressPeer::default() }],
                protocols: None,
            }]),
        };
        let (parsed, problems) = parse(spec);
        assert_eq!(parsed.priority, MAX_PRIORITY);
        assert!(parsed.subject.is_none());
        assert_eq!(parsed.ingress.len(), 26);
        assert_eq!((parsed.egress[0].action, parsed.egress[0].peers.is_none()), (RuleAction::Deny, true));
        let text = problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n");
        for needle in ["spec.priority", "spec.subject", "more than 25 rules", "spec.egress[0].to[0].domainNames"] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
    }

    #[test]
    fn an_unknown_tier_keeps_only_its_restrictions() {
        let spec = ClusterNetworkPolicySpec {
            tier: "Developer".into(),
            priority: 1,
            subject: all_namespaces(),
            ingress: Some(vec![ingress("Accept", vec![peer_all()], None), ingress("Deny", vec![peer_all()], None)]),
            egress: None,
        };
        let (parsed, problems) = parse(spec);
        assert_eq!(parsed.tier, Tier::Admin);
        assert_eq!(parsed.ingress.iter().map(|r| (r.index, r.action)).collect::<Vec<_>>(), [(1, RuleAction::Deny)]);
        assert_eq!(problems[0].field, "spec.tier");
    }
}
