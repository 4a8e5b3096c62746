//! `policy-agent explain`: is a connection allowed, and which policy decides it.
//!
//! The answer comes from the rendered maps through the classifier's lookup model (the same
//! bytes the kernel would see), compiled for the source pod's node (egress) and for the
//! destination pod's node (ingress); the compiled metadata only names what the maps say.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use policy_common::Direction;
use policy_common::policy::COOKIE_NODE;
use serde_json::{Value, json};

use crate::compile::{self, Compiled, EndpointSlot, NodeContext, RuleRef, Verdict};
use crate::resolve::{is_host_network, is_terminated, node_name, pod_ips, protocol_name, protocol_number};
use crate::state::{ClusterState, NamespacedName, PodRef, Problem, load_manifest_dir};

#[derive(clap::Args, Debug, Clone)]
pub struct ExplainArgs {
    /// Directory of YAML or JSON manifests (Namespaces, Pods, NetworkPolicies).
    #[arg(long, value_name = "DIR")]
    pub manifests: PathBuf,
    /// Source: `namespace/pod` or an IP address.
    #[arg(long, value_name = "SRC")]
    pub from: String,
    /// Destination: `namespace/pod` or an IP address.
    #[arg(long, value_name = "DST")]
    pub to: String,
    /// Destination port (1-65535).
    #[arg(long, value_name = "PORT")]
    pub port: String,
    /// TCP, UDP or SCTP.
    #[arg(long, value_name = "PROTOCOL", default_value = "TCP")]
    pub protocol: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs the command: exit 0 with either verdict, 2 on bad input.
pub fn main(args: &ExplainArgs) -> ExitCode {
    match run(args) {
        Ok(output) => {
            print!("{output}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
    }
}

fn run(args: &ExplainArgs) -> Result<String, String> {
    let port = parse_port(&args.port)?;
    let protocol = parse_protocol(&args.protocol)?;
    let from = Address::parse(&args.from).map_err(|e| format!("--from: {e}"))?;
    let to = Address::parse(&args.to).map_err(|e| format!("--to: {e}"))?;
    let (state, problems) = load_manifest_dir(&args.manifests).map_err(|e| e.to_string())?;
    for problem in &problems {
        eprintln!("warning: {problem}");
    }
    let explanation = explain(&state, &from, &to, protocol, port)?;
    for problem in &explanation.problems {
        eprintln!("warning: {problem}");
    }
    Ok(if args.json { format!("{}\n", explanation.to_json()) } else { explanation.to_text() })
}

pub fn parse_port(text: &str) -> Result<u16, String> {
    text.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| format!("--port: {text:?} is not a port (1-65535)"))
}

pub fn parse_protocol(text: &str) -> Result<u8, String> {
    protocol_number(&text.to_ascii_uppercase()).ok_or_else(|| format!("--protocol: {text:?} is not TCP, UDP or SCTP"))
}

/// A connection end as given on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    Pod(PodRef),
    Ip(IpAddr),
}

impl Address {
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Ok(Address::Ip(ip));
        }
        match text.split_once('/') {
            // Namespace names are DNS labels, so `198.18.0.0/16` is not mistaken for a pod.
            Some((namespace, name))
                if !namespace.is_empty()
                    && namespace.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !name.is_empty()
                    && !name.contains('/') =>
            {
                Ok(Address::Pod(NamespacedName::new(namespace, name)))
            }
            _ => Err(format!("{text:?} is neither namespace/pod nor an IP address")),
        }
    }
}

/// One end of the connection, resolved against the cluster state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct End {
    pub ip: IpAddr,
    /// The pod holding the address, if any.
    pub pod: Option<PodRef>,
    pub node: Option<String>,
    pub host_network: bool,
}

/// How one direction was decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing of ours judges this side (not a pod, hostNetwork, not scheduled).
    NotEnforced(String),
    NotIsolated,
    AllowedByRule {
        cookie: u32,
        rule: Option<RuleRef>,
    },
    AllowedNodeTraffic,
    Denied,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectionExplanation {
    pub direction: Direction,
    /// The pod whose policies apply on this side.
    pub pod: Option<PodRef>,
    pub node: Option<String>,
    pub outcome: Outcome,
    /// The policies that select the pod for this direction.
    pub isolating_policies: Vec<NamespacedName>,
    /// The identity of the peer address in that node's ipcache, and what it stands for.
    pub peer_identity: Option<(u32, String)>,
}

impl DirectionExplanation {
    pub fn allowed(&self) -> bool {
        !matches!(self.outcome, Outcome::Denied)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explanation {
    pub from: End,
    pub to: End,
    pub protocol: u8,
    pub port: u16,
    pub egress: DirectionExplanation,
    pub ingress: DirectionExplanation,
    /// What the compiler reported about the policies and pods (skipped items).
    pub problems: Vec<Problem>,
}

impl Explanation {
    pub fn allowed(&self) -> bool {
        self.egress.allowed() && self.ingress.allowed()
    }

    pub fn to_text(&self) -> String {
        let mut out = String::new();
        out.push_str(if self.allowed() { "ALLOW\n" } else { "DENY\n" });
        let _ = writeln!(
            out,
            "connection: {} -> {} {}/{}",
            describe_end(&self.from),
            describe_end(&self.to),
            protocol_name(self.protocol),
            self.port
        );
        for (side, peer) in [(&self.egress, &self.to), (&self.ingress, &self.from)] {
            let _ = writeln!(out, "{}", self.describe_direction(side, peer));
        }
        out
    }

    fn describe_direction(&self, side: &DirectionExplanation, peer: &End) -> String {
        let name = match side.direction {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        };
        let at = match (&side.pod, &side.node) {
            (Some(pod), Some(node)) => format!("{name} at {pod} (node {node})"),
            (Some(pod), None) => format!("{name} at {pod}"),
            (None, _) => {
                format!("{name} at {}", if side.direction == Direction::Egress { self.from.ip } else { self.to.ip })
            }
        };
        let peer_text = match &side.peer_identity {
            Some((identity, what)) => format!("peer {} (identity {identity}: {what})", peer.ip),
            None => format!("peer {}", peer.ip),
        };
        let policies = side.isolating_policies.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
        match &side.outcome {
            Outcome::NotEnforced(why) => format!("{at}: allowed, not enforced: {why}"),
            Outcome::NotIsolated => format!("{at}: allowed, not isolated (no policy selects the pod for {name})"),
            Outcome::AllowedNodeTraffic => {
                format!("{at}: allowed, node traffic ({peer_text} is the pod's node, always allowed)")
            }
            Outcome::AllowedByRule { cookie, rule } => match rule {
                Some(rule) => format!(
                    "{at}: allowed by policy {}/{} {name} rule {} (cookie {cookie}); {peer_text}",
                    rule.namespace, rule.policy, rule.index
                ),
                None => format!("{at}: allowed by cookie {cookie}; {peer_text}"),
            },
            Outcome::Denied => format!(
                "{at}: denied, isolated by {policies}; no rule allows {peer_text} on {}/{}",
                protocol_name(self.protocol),
                self.port
            ),
        }
    }

    pub fn to_json(&self) -> Value {
        let end = |end: &End| {
            json!({
                "address": end.ip.to_string(),
                "pod": end.pod.as_ref().map(ToString::to_string),
                "node": end.node,
                "host_network": end.host_network,
            })
        };
        let side = |side: &DirectionExplanation| {
            let (reason, detail, policy, cookie) = match &side.outcome {
                Outcome::NotEnforced(why) => ("not-enforced", Some(why.clone()), None, None),
                Outcome::NotIsolated => ("not-isolated", None, None, None),
                Outcome::AllowedNodeTraffic => ("node-traffic", None, None, Some(COOKIE_NODE)),
                Outcome::AllowedByRule { cookie, rule } => ("rule", None, rule.as_ref().map(rule_json), Some(*cookie)),
                Outcome::Denied => ("no-matching-rule", None, None, None),
            };
            json!({
                "allowed": side.allowed(),
                "reason": reason,
                "detail": detail,
                "pod": side.pod.as_ref().map(ToString::to_string),
                "node": side.node,
                "isolated": !matches!(side.outcome, Outcome::NotEnforced(_) | Outcome::NotIsolated),
                "policy": policy,
                "cookie": cookie,
                "isolating_policies": side.isolating_policies.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "peer_identity": side.peer_identity.as_ref().map(|(id, what)| json!({"id": id, "description": what})),
            })
        };
        json!({
            "verdict": if self.allowed() { "allow" } else { "deny" },
            "from": end(&self.from),
            "to": end(&self.to),
            "protocol": protocol_name(self.protocol),
            "port": self.port,
            "egress": side(&self.egress),
            "ingress": side(&self.ingress),
        })
    }
}

fn rule_json(rule: &RuleRef) -> Value {
    json!({
        "namespace": rule.namespace,
        "name": rule.policy,
        "direction": if rule.direction == Direction::Ingress { "ingress" } else { "egress" },
        "rule": rule.index,
    })
}

fn describe_end(end: &End) -> String {
    match &end.pod {
        Some(pod) if end.host_network => format!("{pod} ({}, hostNetwork)", end.ip),
        Some(pod) => format!("{pod} ({})", end.ip),
        None => end.ip.to_string(),
    }
}

/// Resolves an address to an end: a pod (by name, or the live pod holding the IP) or a bare
/// IP. Errors are one-line messages for bad input.
fn resolve_end(state: &ClusterState, address: &Address) -> Result<(End, Vec<IpAddr>), String> {
    let mut ignored = Vec::new();
    match address {
        Address::Pod(pod_ref) => {
            let pod = state.pods.get(pod_ref).ok_or_else(|| format!("unknown pod {pod_ref}"))?;
            if is_terminated(pod) {
                return Err(format!("pod {pod_ref} has terminated and holds no IP"));
            }
            let ips = pod_ips(pod, &mut ignored);
            if ips.is_empty() {
                return Err(format!("pod {pod_ref} has no IP yet"));
            }
            let end = End {
                ip: ips[0],
                pod: Some(pod_ref.clone()),
                node: node_name(pod).map(str::to_owned),
                host_network: is_host_network(pod),
            };
            Ok((end, ips))
        }
        Address::Ip(ip) => {
            let holder = state
                .pods
                .iter()
                .filter(|(_, pod)| !is_terminated(pod))
                // A regular pod before a hostNetwork pod sharing the node's address.
                .filter(|(_, pod)| pod_ips(pod, &mut ignored).contains(ip))
                .min_by_key(|(_, pod)| is_host_network(pod));
            let end = match holder {
                Some((pod_ref, pod)) => End {
                    ip: *ip,
                    pod: Some(pod_ref.clone()),
                    node: node_name(pod).map(str::to_owned),
                    host_network: is_host_network(pod),
                },
                None => End { ip: *ip, pod: None, node: None, host_network: false },
            };
            Ok((end, vec![*ip]))
        }
    }
}

/// Explains one connection from the cluster state.
pub fn explain(
    state: &ClusterState,
    from: &Address,
    to: &Address,
    protocol: u8,
    port: u16,
) -> Result<Explanation, String> {
    let (mut from, from_ips) = resolve_end(state, from)?;
    let (mut to, to_ips) = resolve_end(state, to)?;
    // Same family on both ends, IPv4 first.
    let (from_ip, to_ip) = from_ips
        .iter()
        .flat_map(|f| to_ips.iter().map(move |t| (*f, *t)))
        .filter(|(f, t)| f.is_ipv4() == t.is_ipv4())
        .min_by_key(|(f, _)| !f.is_ipv4())
        .ok_or_else(|| format!("{} and {} have no address family in common", from.ip, to.ip))?;
    from.ip = from_ip;
    to.ip = to_ip;

    let mut compiled_for: BTreeMap<String, (Compiled, compile::MapContents, BTreeMap<PodRef, EndpointSlot>)> =
        BTreeMap::new();
    let egress = judge(state, &mut compiled_for, Direction::Egress, &from, to.ip, protocol, port);
    let ingress = judge(state, &mut compiled_for, Direction::Ingress, &to, from.ip, protocol, port);
    let mut problems: Vec<Problem> = if compiled_for.is_empty() {
        // Neither side is a pod: compile anyway, so that broken policies are still reported.
        compile::compile(state, &NodeContext::default()).problems
    } else {
        compiled_for.values().flat_map(|(compiled, _, _)| compiled.problems.iter().cloned()).collect()
    };
    problems.sort();
    problems.dedup();
    Ok(Explanation { from, to, protocol, port, egress, ingress, problems })
}

type NodeMaps = (Compiled, compile::MapContents, BTreeMap<PodRef, EndpointSlot>);

/// Judges one direction at `local` (the source for egress, the destination for ingress).
fn judge(
    state: &ClusterState,
    compiled_for: &mut BTreeMap<String, NodeMaps>,
    direction: Direction,
    local: &End,
    peer: IpAddr,
    protocol: u8,
    port: u16,
) -> DirectionExplanation {
    let mut explanation = DirectionExplanation {
        direction,
        pod: local.pod.clone(),
        node: local.node.clone(),
        outcome: Outcome::NotIsolated,
        isolating_policies: Vec::new(),
        peer_identity: None,
    };
    let not_enforced = |why: &str| Outcome::NotEnforced(why.to_owned());
    let (Some(pod), Some(node)) = (&local.pod, &local.node) else {
        explanation.outcome = not_enforced(if local.pod.is_none() {
            "not a pod, so no policy of ours applies on its side"
        } else {
            "the pod is not scheduled on a node"
        });
        return explanation;
    };
    if local.host_network {
        explanation.outcome = not_enforced("hostNetwork pod: it is the node, which policies do not isolate");
        return explanation;
    }
    let (compiled, contents, slots) = compiled_for.entry(node.clone()).or_insert_with(|| {
        let compiled = compile::compile(state, &NodeContext { name: node.clone(), ips: Vec::new() });
        let slots = compile::sequential_slots(&compiled);
        let contents = compile::render(&compiled, &slots, false);
        (compiled, contents, slots)
    });
    let Some(slot) = slots.get(pod) else {
        explanation.outcome = not_enforced("the pod is not an endpoint on its node");
        return explanation;
    };
    if let Some(endpoint) = compiled.endpoints.get(pod) {
        explanation.isolating_policies = endpoint.policies(direction).to_vec();
    }
    let identity_text =
        |identity: u32| compiled.identities.get(&identity).map_or_else(|| "unknown".to_owned(), ToString::to_string);
    explanation.outcome = match compile::verdict(contents, slot.ifindex, direction, peer, protocol, port) {
        Verdict::Unmanaged => not_enforced("the pod is not an endpoint on its node"),
        Verdict::NotIsolated { peer_identity } => {
            explanation.peer_identity = Some((peer_identity, identity_text(peer_identity)));
            Outcome::NotIsolated
        }
        Verdict::Allowed { cookie, peer_identity } => {
            explanation.peer_identity = Some((peer_identity, identity_text(peer_identity)));
            if cookie == COOKIE_NODE {
                Outcome::AllowedNodeTraffic
            } else {
                Outcome::AllowedByRule { cookie, rule: compiled.cookies.get(&cookie).cloned() }
            }
        }
        Verdict::Denied { peer_identity } => {
            explanation.peer_identity = Some((peer_identity, identity_text(peer_identity)));
            Outcome::Denied
        }
    };
    explanation
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_parsing() {
        assert_eq!(Address::parse("x/a"), Ok(Address::Pod(NamespacedName::new("x", "a"))));
        assert_eq!(Address::parse("198.18.0.1"), Ok(Address::Ip("198.18.0.1".parse().unwrap())));
        assert_eq!(Address::parse("2001:2:0:ff::1"), Ok(Address::Ip("2001:2:0:ff::1".parse().unwrap())));
        for bad in ["x", "/a", "x/", "x/a/b", "198.18.0.0/16", "198.300.1.1"] {
            assert!(Address::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_port("80"), Ok(80));
        assert!(parse_port("0").is_err() && parse_port("65536").is_err() && parse_port("http").is_err());
        assert_eq!(parse_protocol("udp"), Ok(17));
        assert!(parse_protocol("icmp").is_err());
    }
}
