//! Validation of `NetworkPolicy` objects into a form the compiler can evaluate.
//!
//! Invalid input never widens: an invalid peer or port matches nothing (and a list left with
//! only invalid items makes its rule match nothing, not everything); an invalid policy
//! podSelector makes the policy select nothing. Every such item is reported.

use std::collections::BTreeSet;

use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use policy_common::{Direction, proto};

use crate::resolve::{CidrBlock, Selector, protocol_number};
use crate::state::{NamespacedName, Problem, policy_ref};

/// One validated policy.
#[derive(Clone, Debug)]
pub(crate) struct ParsedPolicy {
    pub name: NamespacedName,
    /// `None`: the podSelector is invalid and the policy selects nothing.
    pub selector: Option<Selector>,
    /// `Some` when the policy isolates ingress (then these rules allow).
    pub ingress: Option<Vec<ParsedRule>>,
    pub egress: Option<Vec<ParsedRule>>,
}

impl ParsedPolicy {
    pub fn rules(&self, direction: Direction) -> Option<&[ParsedRule]> {
        match direction {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) struct ParsedRule {
    pub index: usize,
    /// `None`: every peer (`from`/`to` missing or empty).
    pub peers: Option<Vec<ParsedPeer>>,
    /// `None`: every protocol and port (`ports` missing or empty).
    pub ports: Option<Vec<ParsedPort>>,
}

#[derive(Clone, Debug)]
pub(crate) enum ParsedPeer {
    Pods {
        /// `None`: the policy's own namespace.
        namespaces: Option<Selector>,
        pods: Selector,
    },
    Block(CidrBlock),
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum ParsedPort {
    /// Every port of the protocol.
    Protocol(u8),
    /// An inclusive range (a single port is `first == last`).
    Range(u8, u16, u16),
    /// A container port name, resolved on the destination pod.
    Named(u8, String),
}

/// Reports problems of one object, by field.
pub(crate) struct Reporter<'a> {
    pub object: String,
    pub problems: &'a mut Vec<Problem>,
}

impl Reporter<'_> {
    pub fn report(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem::new(self.object.clone(), field, message));
    }

    /// A selector, or `None` after reporting why it is invalid.
    pub fn selector(&mut self, field: &str, selector: &LabelSelector) -> Option<Selector> {
        match Selector::parse(selector) {
            Ok(selector) => Some(selector),
            Err(errors) => {
                for (sub, message) in errors {
                    self.report(format!("{field}.{sub}"), message);
                }
                None
            }
        }
    }
}

pub(crate) fn parse_policy(policy: &NetworkPolicy, problems: &mut Vec<Problem>) -> ParsedPolicy {
    let name = policy_ref(policy);
    let mut reporter = Reporter { object: format!("NetworkPolicy {name}"), problems };
    let empty_spec = k8s_openapi::api::networking::v1::NetworkPolicySpec::default();
    let spec = policy.spec.as_ref().unwrap_or(&empty_spec);

    // A missing podSelector is the empty selector (the Go field is not a pointer).
    let selector = match &spec.pod_selector {
        None => Some(Selector::everything()),
        Some(selector) => {
            let parsed = reporter.selector("spec.podSelector", selector);
            if parsed.is_none() {
                reporter.report("spec.podSelector", "invalid selector: the policy selects no pod");
            }
            parsed
        }
    };

    let types = policy_types(&mut reporter, spec);
    let ingress = types.contains(&Direction::Ingress).then(|| {
        let rules = spec.ingress.iter().flatten().map(|rule| (rule.from.as_deref(), rule.ports.as_deref()));
        parse_rules(&mut reporter, "spec.ingress", "from", rules)
    });
    let egress = types.contains(&Direction::Egress).then(|| {
        let rules = spec.egress.iter().flatten().map(|rule| (rule.to.as_deref(), rule.ports.as_deref()));
        parse_rules(&mut reporter, "spec.egress", "to", rules)
    });
    ParsedPolicy { name, selector, ingress, egress }
}

/// The directions the policy isolates: `spec.policyTypes`, or its default.
fn policy_types(reporter: &mut Reporter<'_>, spec: &k8s_openapi::api::networking::v1::NetworkPolicySpec) -> BTreeSet<Direction> {
    let has_egress_rules = spec.egress.as_ref().is_some_and(|rules| !rules.is_empty());
    let mut types: BTreeSet<Direction> = BTreeSet::new();
    for (index, policy_type) in spec.policy_types.iter().flatten().enumerate() {
        match policy_type.as_str() {
            "Ingress" => {
                types.insert(Direction::Ingress);
            }
            "Egress" => {
                types.insert(Direction::Egress);
            }
            other => reporter.report(
                format!("spec.policyTypes[{index}]"),
                format!("unknown policy type {other:?} (Ingress, Egress); ignored"),
            ),
        }
    }
    if types.is_empty() {
        // Defaulting (also when only unknown types were given: that isolates, never opens).
        types.insert(Direction::Ingress);
        if has_egress_rules {
            types.insert(Direction::Egress);
        }
    }
    types
}

/// The rules of `spec.ingress` or `spec.egress` (`list`), each given as its peers and ports.
fn parse_rules<'r>(
    reporter: &mut Reporter<'_>,
    list: &str,
    peers_field: &str,
    rules: impl Iterator<Item = (Option<&'r [NetworkPolicyPeer]>, Option<&'r [NetworkPolicyPort]>)>,
) -> Vec<ParsedRule> {
    rules
        .enumerate()
        .map(|(index, (peers, ports))| parse_rule(reporter, &format!("{list}[{index}]"), peers_field, index, peers, ports))
        .collect()
}

fn parse_rule(
    reporter: &mut Reporter<'_>,
    field: &str,
    peers_field: &str,
    index: usize,
    peers: Option<&[NetworkPolicyPeer]>,
    ports: Option<&[NetworkPolicyPort]>,
) -> ParsedRule {
    let peers = peers.filter(|p| !p.is_empty()).map(|peers| {
        peers
            .iter()
            .enumerate()
            .filter_map(|(i, peer)| parse_peer(reporter, &format!("{field}.{peers_field}[{i}]"), peer))
            .collect::<Vec<_>>()
    });
    let ports = ports.filter(|p| !p.is_empty()).map(|ports| {
        let mut parsed: Vec<ParsedPort> = ports
            .iter()
            .enumerate()
            .filter_map(|(i, port)| parse_port(reporter, &format!("{field}.ports[{i}]"), port))
            .collect();
        parsed.sort();
        parsed.dedup();
        parsed
    });
    let rule = ParsedRule { index, peers, ports };
    if rule.peers.as_ref().is_some_and(Vec::is_empty) {
        reporter.report(format!("{field}.{peers_field}"), "no valid peer left: the rule matches nothing");
    }
    if rule.ports.as_ref().is_some_and(Vec::is_empty) {
        reporter.report(format!("{field}.ports"), "no valid port left: the rule matches nothing");
    }
    rule
}

fn parse_peer(reporter: &mut Reporter<'_>, field: &str, peer: &NetworkPolicyPeer) -> Option<ParsedPeer> {
    if let Some(block) = &peer.ip_block {
        if peer.pod_selector.is_some() || peer.namespace_selector.is_some() {
            reporter.report(
                field,
                "ipBlock cannot be combined with podSelector or namespaceSelector; the peer matches nothing",
            );
            return None;
        }
        return match CidrBlock::parse(block) {
            Ok(block) => Some(ParsedPeer::Block(block)),
            Err(errors) => {
                for (sub, message) in errors {
                    reporter.report(format!("{field}.ipBlock.{sub}"), format!("{message}; the peer matches nothing"));
                }
                None
            }
        };
    }
    if peer.pod_selector.is_none() && peer.namespace_selector.is_none() {
        reporter.report(field, "a peer needs podSelector, namespaceSelector or ipBlock; it matches nothing");
        return None;
    }
    let namespaces = match &peer.namespace_selector {
        None => None,
        Some(selector) => Some(reporter.selector(&format!("{field}.namespaceSelector"), selector)?),
    };
    let pods = match &peer.pod_selector {
        None => Selector::everything(),
        Some(selector) => reporter.selector(&format!("{field}.podSelector"), selector)?,
    };
    Some(ParsedPeer::Pods { namespaces, pods })
}

fn parse_port(reporter: &mut Reporter<'_>, field: &str, port: &NetworkPolicyPort) -> Option<ParsedPort> {
    let protocol = match port.protocol.as_deref() {
        None => proto::TCP,
        Some(name) => match protocol_number(name) {
            Some(number) => number,
            None => {
                reporter.report(
                    format!("{field}.protocol"),
                    format!("unknown protocol {name:?} (TCP, UDP, SCTP); the port matches nothing"),
                );
                return None;
            }
        },
    };
    let mut invalid = |sub: &str, message: String| {
        reporter.report(format!("{field}.{sub}"), format!("{message}; the port matches nothing"));
        None
    };
    match (&port.port, port.end_port) {
        (None, None) => Some(ParsedPort::Protocol(protocol)),
        (None, Some(_)) => invalid("endPort", "endPort needs a numeric port".to_owned()),
        (Some(IntOrString::String(name)), Some(_)) => {
            invalid("endPort", format!("endPort needs a numeric port, not the name {name:?}"))
        }
        (Some(IntOrString::String(name)), None) => match port_name_error(name) {
            None => Some(ParsedPort::Named(protocol, name.clone())),
            Some(why) => invalid("port", format!("invalid port name {name:?}: {why}")),
        },
        (Some(IntOrString::Int(number)), end) => {
            let Some(first) = u16::try_from(*number).ok().filter(|p| *p != 0) else {
                return invalid("port", format!("{number} is not a port (1-65535)"));
            };
            match end {
                None => Some(ParsedPort::Range(protocol, first, first)),
                Some(end) => match u16::try_from(end).ok().filter(|e| *e >= first) {
                    Some(last) => Some(ParsedPort::Range(protocol, first, last)),
                    None => invalid("endPort", format!("{end} must be between port {first} and 65535")),
                },
            }
        }
    }
}

/// Checks a name against `IANA_SVC_NAME` (what the API server accepts for named ports).
pub(crate) fn port_name_error(name: &str) -> Option<&'static str> {
    if name.is_empty() || name.len() > 15 {
        Some("must be 1 to 15 characters")
    } else if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
        Some("only lowercase letters, digits and '-' are allowed")
    } else if !name.bytes().any(|b| b.is_ascii_lowercase()) {
        Some("must contain a letter")
    } else if name.starts_with('-') || name.ends_with('-') || name.contains("--") {
        Some("'-' may not start or end it or appear twice in a row")
    } else {
        None
    }
}
