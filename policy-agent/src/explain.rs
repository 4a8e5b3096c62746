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
use policy_common::policy::{COOKIE_DEFAULT_ALLOW, COOKIE_ISOLATED, COOKIE_NODE};
use serde_json::{Value, json};

use k8s_openapi::api::core::v1::{Endpoints, Namespace, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::Api;
use kube::api::ListParams;

use crate::AgentError;
use crate::crd::ClusterNetworkPolicy;
use crate::compile::{self, Compiled, EndpointSlot, NodeContext, RuleRef, Verdict};
use crate::resolve::{is_host_network, is_terminated, node_name, pod_ips, protocol_name, protocol_number};
use crate::state::{ClusterState, NamespacedName, Object, PodRef, Problem, load_manifest_dir};
use crate::watch::{ClusterArgs, client};


#[derive(clap::Args, Debug, Clone)]
pub struct ExplainArgs {
    #[command(flatten)]
    pub input: InputArgs,
    /// Source: `namespace/pod`, `pod` (in the default namespace), an IP address, or
    /// `svc/namespace/name` (each ready backend of the Service; live cluster only).
    #[arg(long, value_name = "SRC")]
    pub from: String,
    /// Destination: `namespace/pod`, `pod`, an IP address, or `svc/namespace/name` (each
    /// ready backend, on the target port of the Service port `--port`; live cluster only).
    #[arg(long, value_name = "DST")]
    pub to: String,
    /// Destination port (1-65535); for a Service, the Service's port.
    #[arg(long, value_name = "PORT")]
    pub port: String,
    /// TCP, UDP or SCTP.
    #[arg(long, value_name = "PROTOCOL", default_value = "TCP")]
    pub protocol: String,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Where the cluster's objects come from, for `explain` and `coverage`: a manifest
/// directory, else the live cluster (`--kubeconfig`/`--context`, in-cluster, $KUBECONFIG).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct InputArgs {
    /// Directory of YAML or JSON manifests (Namespaces, Pods, NetworkPolicies) instead of a
    /// live cluster.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kubeconfig", "context"])]
    pub manifests: Option<PathBuf>,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Namespace of names given without one (`--from client`); for `coverage`, the only
    /// namespace shown. Default: the kubeconfig context's namespace, else `default`.
    #[arg(short = 'n', long, value_name = "NAMESPACE")]
    pub namespace: Option<String>,
}

/// The objects read for one command, and where they came from.
pub struct Loaded {
    pub state: ClusterState,
    /// What was wrong in the manifest files (skipped).
    pub problems: Vec<Problem>,
    /// The live cluster's client (`None` with `--manifests`).
    pub client: Option<kube::Client>,
    /// `-n`, else the kubeconfig context's namespace, else `default`.
    pub default_namespace: String,
}

impl InputArgs {
    /// Reads the manifest directory, or lists Namespaces, Pods and NetworkPolicies from the
    /// API server into the same state the agent compiles.
    pub async fn load(&self) -> Result<Loaded, String> {
        match &self.manifests {
            Some(dir) => {
                let (state, problems) = load_manifest_dir(dir).map_err(|e| e.to_string())?;
                let default_namespace = self.namespace.clone().unwrap_or_else(|| "default".to_owned());
                Ok(Loaded { state, problems, client: None, default_namespace })
            }
            None => {
                let client = client(&self.cluster).await.map_err(|e| e.to_string())?;
                let state = list_live(&client).await.map_err(|e| e.to_string())?;
                let default_namespace = self.namespace.clone().unwrap_or_else(|| client.default_namespace().to_owned());
                Ok(Loaded { state, problems: Vec::new(), client: Some(client), default_namespace })
            }
        }
    }
}

/// Lists the kinds the compiler reads, cluster-wide, as one consistent-enough state (one
/// list each, like the agent's watches).
pub async fn list_live(client: &kube::Client) -> Result<ClusterState, AgentError> {
    let params = ListParams::default();
    let kube_err = |what: &str| {
        let what = format!("list {what}");
        move |e: kube::Error| AgentError::Kube { what, source: Box::new(e) }
    };
    let namespaces = Api::<Namespace>::all(client.clone()).list(&params).await.map_err(kube_err("namespaces"))?;
    let pods = Api::<Pod>::all(client.clone()).list(&params).await.map_err(kube_err("pods"))?;
    let policies =
        Api::<NetworkPolicy>::all(client.clone()).list(&params).await.map_err(kube_err("networkpolicies"))?;
    let cluster_policies = match Api::<ClusterNetworkPolicy>::all(client.clone()).list(&params).await {
        Ok(list) => list.items,
        // The CRD is not installed: there are none.
        Err(kube::Error::Api(response)) if response.code == 404 => Vec::new(),
        Err(e) => return Err(kube_err("clusternetworkpolicies")(e)),
    };
    let objects = namespaces
        .items
        .into_iter()
        .map(|n| Object::Namespace(std::sync::Arc::new(n)))
        .chain(pods.items.into_iter().map(|p| Object::Pod(std::sync::Arc::new(p))))
        .chain(policies.items.into_iter().map(|p| Object::NetworkPolicy(std::sync::Arc::new(p))))
        .chain(cluster_policies.into_iter().map(|p| Object::ClusterNetworkPolicy(std::sync::Arc::new(p))));
    Ok(ClusterState::from_objects(objects))
}

/// Builds the runtime a command's API calls run on (the tools are otherwise synchronous).
pub fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| format!("start the async runtime: {e}"))
}

/// Runs the command: exit 0 with any verdict, 2 on bad input.
pub fn main(args: &ExplainArgs) -> ExitCode {
    match runtime().and_then(|rt| rt.block_on(run(args))) {
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

async fn run(args: &ExplainArgs) -> Result<String, String> {
    let port = parse_port(&args.port)?;
    let protocol = parse_protocol(&args.protocol)?;
    let input = args.input.load().await?;
    let from = Subject::parse(&args.from, &input.default_namespace).map_err(|e| format!("--from: {e}"))?;
    let to = Subject::parse(&args.to, &input.default_namespace).map_err(|e| format!("--to: {e}"))?;
    for problem in &input.problems {
        eprintln!("warning: {problem}");
    }
    let (from, to) = match (from, to) {
        (Subject::Address(from), Subject::Address(to)) => {
            let explanation = explain(&input.state, &from, &to, protocol, port).map_err(|e| hint_service(e, &args.from, &args.to))?;
            warn_problems(&explanation.problems);
            return Ok(if args.json { format!("{}\n", explanation.to_json()) } else { explanation.to_text() });
        }
        pair => pair,
    };
    let from = side_of(&input, from, "--from", None).await?;
    let to = side_of(&input, to, "--to", Some((port, protocol))).await?;
    let answer = ServiceAnswer::explain(&input.state, from, to, protocol, port)?;
    // Every backend's compile reports the same problems: once is enough.
    if let Some(Ok(first)) = answer.results.first().map(|r| &r.explanation) {
        warn_problems(&first.problems);
    }
    Ok(if args.json { format!("{}\n", answer.to_json()) } else { answer.to_text() })
}

fn warn_problems(problems: &[Problem]) {
    for problem in problems {
        eprintln!("warning: {problem}");
    }
}

/// `svc/x` reads as the pod x of namespace svc: say how to name a Service.
fn hint_service(message: String, from: &str, to: &str) -> String {
    if message.starts_with("unknown pod svc/") && (from.starts_with("svc/") || to.starts_with("svc/")) {
        format!("{message} (a Service is svc/NAMESPACE/NAME)")
    } else {
        message
    }
}

/// One side of a connection involving a Service: the Service's backends, or one address.
async fn side_of(input: &Loaded, subject: Subject, flag: &str, port: Option<(u16, u8)>) -> Result<Side, String> {
    match subject {
        Subject::Address(address) => Ok(Side::Address(address)),
        Subject::Service(name) => {
            let Some(client) = &input.client else {
                return Err(format!(
                    "{flag}: svc/{}/{}: Services and their Endpoints are read from a live cluster only (drop --manifests)",
                    name.namespace, name.name
                ));
            };
            let (service, endpoints) = fetch_service(client, &name).await.map_err(|e| format!("{flag}: {e}"))?;
            service_backends(&service, endpoints.as_ref(), port).map(Side::Service).map_err(|e| format!("{flag}: {e}"))
        }
    }
}

/// The Service and its v1 Endpoints (EndpointSlices are only beta in v1.20). Endpoints that
/// do not exist yet are `None`: a Service without backends.
async fn fetch_service(client: &kube::Client, name: &NamespacedName) -> Result<(Service, Option<Endpoints>), String> {
    let service = Api::<Service>::namespaced(client.clone(), &name.namespace)
        .get_opt(&name.name)
        .await
        .map_err(|e| format!("get Service {name}: {e}"))?
        .ok_or_else(|| format!("unknown Service {name}"))?;
    let endpoints = Api::<Endpoints>::namespaced(client.clone(), &name.namespace)
        .get_opt(&name.name)
        .await
        .map_err(|e| format!("get Endpoints {name}: {e}"))?;
    Ok((service, endpoints))
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

/// A connection end as given on the command line, Services included.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    Address(Address),
    /// `svc/namespace/name`: answered per backend.
    Service(NamespacedName),
}

impl Subject {
    /// Parses `svc/namespace/name`, a bare pod name (in `default_namespace`), or whatever
    /// [`Address::parse`] takes.
    pub fn parse(text: &str, default_namespace: &str) -> Result<Self, String> {
        if let Some(rest) = text.strip_prefix("svc/")
            && let Some((namespace, name)) = rest.split_once('/')
        {
            if !is_dns_label(namespace) || name.is_empty() || name.contains('/') {
                return Err(format!("{text:?} is not svc/NAMESPACE/NAME"));
            }
            return Ok(Subject::Service(NamespacedName::new(namespace, name)));
        }
        if !text.contains('/') && text.parse::<IpAddr>().is_err() {
            // A pod name is a DNS subdomain; all digits and dots is a mistyped address.
            let name_like = !text.is_empty()
                && text.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
                && text.bytes().any(|b| b.is_ascii_lowercase() || b == b'-');
            if !name_like {
                return Err(format!("{text:?} is neither namespace/pod, a pod name, svc/NAMESPACE/NAME nor an IP address"));
            }
            return Ok(Subject::Address(Address::Pod(NamespacedName::new(default_namespace, text))));
        }
        Address::parse(text).map(Subject::Address)
    }
}

fn is_dns_label(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
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
    /// Only ClusterNetworkPolicies judge this direction and none of their rules matched.
    AllowedByDefault,
    /// Isolated and no entry matches (NetworkPolicy isolation: no rule allows).
    Denied,
    /// A deny entry decided: a ClusterNetworkPolicy Deny (or Pass, unresolved) rule.
    DeniedByRule {
        cookie: u32,
        rule: Option<RuleRef>,
    },
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
    /// The ClusterNetworkPolicies whose subject is the pod in this direction, by tier and
    /// precedence.
    pub cluster_policies: Vec<String>,
    /// The identity of the peer address in that node's ipcache, and what it stands for.
    pub peer_identity: Option<(u32, String)>,
}

impl DirectionExplanation {
    pub fn allowed(&self) -> bool {
        !matches!(self.outcome, Outcome::Denied | Outcome::DeniedByRule { .. })
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
        let outcome = match &side.outcome {
            Outcome::NotEnforced(why) => return format!("{at}: allowed, not enforced: {why}"),
            Outcome::NotIsolated => return format!("{at}: allowed, not isolated (no policy selects the pod for {name})"),
            Outcome::AllowedNodeTraffic => {
                format!("{at}: allowed, node traffic ({peer_text} is the pod's node, always allowed)")
            }
            Outcome::AllowedByDefault => format!("{at}: allowed: no policy decided (default allow); {peer_text}"),
            Outcome::AllowedByRule { cookie, rule } => match rule {
                Some(rule) if rule.tier.is_some() => format!("{at}: allowed by {rule} (cookie {cookie}); {peer_text}"),
                Some(rule) => format!(
                    "{at}: allowed by policy {}/{} {name} rule {} (cookie {cookie}); {peer_text}",
                    rule.namespace, rule.policy, rule.index
                ),
                None => format!("{at}: allowed by cookie {cookie}; {peer_text}"),
            },
            Outcome::Denied if policies.is_empty() => {
                format!("{at}: denied, no entry matches {peer_text} on {}/{}", protocol_name(self.protocol), self.port)
            }
            Outcome::Denied => format!(
                "{at}: denied, isolated by {policies}; no rule allows {peer_text} on {}/{}",
                protocol_name(self.protocol),
                self.port
            ),
            Outcome::DeniedByRule { cookie, rule } => match rule {
                Some(rule) => format!("{at}: denied by {rule} (cookie {cookie}); {peer_text}"),
                None => format!("{at}: denied by cookie {cookie}; {peer_text}"),
            },
        };
        match side.cluster_policies.as_slice() {
            [] => outcome,
            names => format!("{outcome}; ClusterNetworkPolicies for {name}: {}", names.join(", ")),
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
                Outcome::AllowedByDefault => ("default-allow", None, None, Some(COOKIE_DEFAULT_ALLOW)),
                Outcome::Denied => ("no-matching-rule", None, None, None),
                Outcome::DeniedByRule { cookie, rule } => ("deny-rule", None, rule.as_ref().map(rule_json), Some(*cookie)),
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
                "cluster_policies": side.cluster_policies,
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
        "tier": rule.tier.as_ref().map(|t| t.tier.to_string()),
        "priority": rule.tier.as_ref().map(|t| t.priority),
        "rule_name": rule.tier.as_ref().and_then(|t| t.name.clone()),
        "action": rule.action().to_string(),
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
        cluster_policies: Vec::new(),
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
        explanation.cluster_policies = endpoint.cluster_policies(direction).to_vec();
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
            } else if cookie == COOKIE_DEFAULT_ALLOW {
                Outcome::AllowedByDefault
            } else {
                Outcome::AllowedByRule { cookie, rule: compiled.cookies.get(&cookie).cloned() }
            }
        }
        Verdict::Denied { peer_identity } => {
            explanation.peer_identity = Some((peer_identity, identity_text(peer_identity)));
            Outcome::Denied
        }
        // NetworkPolicy isolation kept under a less specific cluster entry: no rule allows.
        Verdict::DeniedByEntry { cookie: COOKIE_ISOLATED, peer_identity } => {
            explanation.peer_identity = Some((peer_identity, identity_text(peer_identity)));
            Outcome::Denied
        }
        Verdict::DeniedByEntry { cookie, peer_identity } => {
            explanation.peer_identity = Some((peer_identity, identity_text(peer_identity)));
            Outcome::DeniedByRule { cookie, rule: compiled.cookies.get(&cookie).cloned() }
        }
    };
    explanation
}

// ---------------------------------------------------------------------------------------
// Services: `svc/namespace/name`, answered per backend.

/// One backend of a Service, from its Endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    pub ip: IpAddr,
    /// The Endpoints address's `targetRef`, when it names a Pod.
    pub pod: Option<PodRef>,
    /// The target port (the Service port mapped by name); `None` on the source side.
    pub port: Option<u16>,
}

/// The Service port asked for, and the name that maps it to each backend's target port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub port: u16,
    pub protocol: u8,
    pub name: Option<String>,
}

/// A Service and the backends its Endpoints list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceBackends {
    pub service: NamespacedName,
    /// `None` when the Service is the source (no port to map).
    pub port: Option<ServicePort>,
    pub ready: Vec<Backend>,
    pub not_ready: Vec<Backend>,
}

/// One side of a connection that involves a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Side {
    Address(Address),
    Service(ServiceBackends),
}

/// The backends of `service` for the Service port `port` (destination side), or all of
/// them (`None`, source side). The Service port maps to each Endpoints port of the same
/// name and protocol, as kube-proxy maps it.
pub fn service_backends(service: &Service, endpoints: Option<&Endpoints>, port: Option<(u16, u8)>) -> Result<ServiceBackends, String> {
    let name = NamespacedName::new(
        service.metadata.namespace.clone().unwrap_or_else(|| "default".to_owned()),
        service.metadata.name.clone().unwrap_or_default(),
    );
    let service_port = port.map(|(number, protocol)| find_service_port(&name, service, number, protocol)).transpose()?;
    let mut backends = ServiceBackends { service: name.clone(), port: service_port.clone(), ready: Vec::new(), not_ready: Vec::new() };
    let subsets = endpoints.and_then(|e| e.subsets.as_ref()).into_iter().flatten();
    for subset in subsets {
        let target_port = match &service_port {
            None => None,
            Some(wanted) => {
                let same_name = |p: &&k8s_openapi::api::core::v1::EndpointPort| {
                    p.name.as_deref().filter(|n| !n.is_empty()) == wanted.name.as_deref()
                        && protocol_of(p.protocol.as_deref()) == Some(wanted.protocol)
                };
                // A subset without this port does not serve it.
                let Some(port) = subset.ports.iter().flatten().find(same_name) else { continue };
                let Some(port) = u16::try_from(port.port).ok().filter(|p| *p != 0) else { continue };
                Some(port)
            }
        };
        let to_backend = |address: &k8s_openapi::api::core::v1::EndpointAddress| {
            let ip = address.ip.parse::<IpAddr>().ok()?;
            let pod = address.target_ref.as_ref().filter(|r| r.kind.as_deref() == Some("Pod")).and_then(|r| {
                Some(NamespacedName::new(r.namespace.clone().unwrap_or_else(|| name.namespace.clone()), r.name.clone()?))
            });
            Some(Backend { ip, pod, port: target_port })
        };
        backends.ready.extend(subset.addresses.iter().flatten().filter_map(to_backend));
        backends.not_ready.extend(subset.not_ready_addresses.iter().flatten().filter_map(to_backend));
    }
    for list in [&mut backends.ready, &mut backends.not_ready] {
        list.sort_by_key(|b| (b.ip, b.port));
        list.dedup();
    }
    Ok(backends)
}

fn protocol_of(text: Option<&str>) -> Option<u8> {
    protocol_number(text.unwrap_or("TCP"))
}

fn find_service_port(name: &NamespacedName, service: &Service, number: u16, protocol: u8) -> Result<ServicePort, String> {
    let ports = service.spec.as_ref().and_then(|s| s.ports.as_ref()).map(Vec::as_slice).unwrap_or_default();
    let found = ports.iter().find(|p| p.port == i32::from(number) && protocol_of(p.protocol.as_deref()) == Some(protocol));
    match found {
        Some(p) => Ok(ServicePort { port: number, protocol, name: p.name.clone().filter(|n| !n.is_empty()) }),
        None => {
            let known: Vec<String> = ports.iter().map(|p| format!("{}/{}", p.port, p.protocol.as_deref().unwrap_or("TCP"))).collect();
            Err(format!(
                "Service {name} has no port {number}/{} (its ports: {})",
                protocol_name(protocol),
                if known.is_empty() { "none".to_owned() } else { known.join(", ") }
            ))
        }
    }
}

/// The explanation for one backend (or pair of backends).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendResult {
    pub from_backend: Option<Backend>,
    pub to_backend: Option<Backend>,
    /// The explanation, or why this backend has none (no address family in common).
    pub explanation: Result<Explanation, String>,
}

/// A connection with a Service on either side, answered per ready backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAnswer {
    pub from: Side,
    pub to: Side,
    pub protocol: u8,
    pub port: u16,
    pub results: Vec<BackendResult>,
}

/// What the whole answer comes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overall {
    Allow,
    Deny,
    Partial,
    NoBackends,
}

impl ServiceAnswer {
    /// Explains every pair of (source, destination) backend; a Service side with no ready
    /// backend gives no pairs, which is an answer too.
    pub fn explain(state: &ClusterState, from: Side, to: Side, protocol: u8, port: u16) -> Result<Self, String> {
        let ends = |side: &Side, to_port: Option<u16>| -> Vec<(Option<Backend>, Address, u16)> {
            match side {
                Side::Address(address) => vec![(None, address.clone(), port)],
                Side::Service(backends) => backends
                    .ready
                    .iter()
                    .map(|b| (Some(b.clone()), Address::Ip(b.ip), b.port.or(to_port).unwrap_or(port)))
                    .collect(),
            }
        };
        let mut results = Vec::new();
        for (from_backend, from_address, _) in ends(&from, None) {
            for (to_backend, to_address, to_port) in ends(&to, Some(port)) {
                let explanation = explain(state, &from_address, &to_address, protocol, to_port);
                // A named pod that does not exist is bad input, not a per-backend answer.
                if let Err(message) = &explanation
                    && message.starts_with("unknown pod")
                {
                    return Err(message.clone());
                }
                results.push(BackendResult { from_backend: from_backend.clone(), to_backend, explanation });
            }
        }
        Ok(Self { from, to, protocol, port, results })
    }

    pub fn overall(&self) -> Overall {
        let answered: Vec<bool> = self.results.iter().filter_map(|r| r.explanation.as_ref().ok()).map(Explanation::allowed).collect();
        match (answered.iter().filter(|a| **a).count(), answered.len()) {
            (_, 0) => Overall::NoBackends,
            (allowed, total) if allowed == total => Overall::Allow,
            (0, _) => Overall::Deny,
            _ => Overall::Partial,
        }
    }

    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for (side, role) in [(&self.from, "source"), (&self.to, "destination")] {
            if let Side::Service(backends) = side {
                let _ = writeln!(out, "{}", describe_service(backends, role));
            }
        }
        let total = self.results.len();
        for (index, result) in self.results.iter().enumerate() {
            let _ = writeln!(out, "--- backend {} of {total}: {}", index + 1, describe_pair(result));
            match &result.explanation {
                Ok(explanation) => out.push_str(&explanation.to_text()),
                Err(message) => {
                    let _ = writeln!(out, "not answered: {message}");
                }
            }
        }
        let allowed = self.results.iter().filter(|r| r.explanation.as_ref().is_ok_and(Explanation::allowed)).count();
        let answered = self.results.iter().filter(|r| r.explanation.is_ok()).count();
        let _ = match self.overall() {
            Overall::Allow => writeln!(out, "overall: ALLOW (all {answered} backends allowed)"),
            Overall::Deny => writeln!(out, "overall: DENY (none of {answered} backends allowed)"),
            Overall::Partial => writeln!(out, "overall: PARTIAL ({allowed} of {answered} backends allowed)"),
            Overall::NoBackends => writeln!(out, "overall: NO BACKENDS (no ready backend answers; nothing to connect to)"),
        };
        out
    }

    pub fn to_json(&self) -> Value {
        let side = |side: &Side| match side {
            Side::Address(_) => Value::Null,
            Side::Service(backends) => service_json(backends),
        };
        let backends: Vec<Value> = self
            .results
            .iter()
            .filter_map(|r| {
                let mut value = r.explanation.as_ref().ok()?.to_json();
                value["from_backend"] = r.from_backend.as_ref().map_or(Value::Null, backend_json);
                value["to_backend"] = r.to_backend.as_ref().map_or(Value::Null, backend_json);
                Some(value)
            })
            .collect();
        let unanswered: Vec<Value> = self
            .results
            .iter()
            .filter_map(|r| {
                let error = r.explanation.as_ref().err()?;
                Some(json!({
                    "from_backend": r.from_backend.as_ref().map_or(Value::Null, backend_json),
                    "to_backend": r.to_backend.as_ref().map_or(Value::Null, backend_json),
                    "error": error,
                }))
            })
            .collect();
        let verdict = match self.overall() {
            Overall::Allow => "allow",
            Overall::Deny => "deny",
            Overall::Partial => "partial",
            Overall::NoBackends => "no-backends",
        };
        json!({
            "verdict": verdict,
            "protocol": protocol_name(self.protocol),
            "port": self.port,
            "from_service": side(&self.from),
            "to_service": side(&self.to),
            "backends": backends,
            "unanswered": unanswered,
        })
    }
}

fn describe_service(backends: &ServiceBackends, role: &str) -> String {
    let counts = format!("{} ready backends, {} not ready", backends.ready.len(), backends.not_ready.len());
    match &backends.port {
        Some(port) => format!(
            "service {} ({role}) port {}/{} -> target port {}: {counts}",
            backends.service,
            port.port,
            protocol_name(port.protocol),
            port.name.as_deref().map_or_else(|| "of the unnamed port".to_owned(), |n| format!("named {n:?}"))
        ),
        None => format!("service {} ({role}): {counts}", backends.service),
    }
}

fn describe_backend(backend: &Backend) -> String {
    let address = match backend.port {
        Some(port) if backend.ip.is_ipv6() => format!("[{}]:{port}", backend.ip),
        Some(port) => format!("{}:{port}", backend.ip),
        None => backend.ip.to_string(),
    };
    match &backend.pod {
        Some(pod) => format!("{pod} {address}"),
        None => address,
    }
}

fn describe_pair(result: &BackendResult) -> String {
    match (&result.from_backend, &result.to_backend) {
        (Some(from), Some(to)) => format!("{} -> {}", describe_backend(from), describe_backend(to)),
        (Some(from), None) => format!("from {}", describe_backend(from)),
        (None, Some(to)) => describe_backend(to),
        (None, None) => String::new(),
    }
}

fn backend_json(backend: &Backend) -> Value {
    json!({"address": backend.ip.to_string(), "pod": backend.pod.as_ref().map(ToString::to_string), "port": backend.port})
}

fn service_json(backends: &ServiceBackends) -> Value {
    json!({
        "service": backends.service.to_string(),
        "port": backends.port.as_ref().map(|p| p.port),
        "protocol": backends.port.as_ref().map(|p| protocol_name(p.protocol)),
        "port_name": backends.port.as_ref().and_then(|p| p.name.clone()),
        "ready": backends.ready.iter().map(backend_json).collect::<Vec<_>>(),
        "not_ready": backends.not_ready.iter().map(backend_json).collect::<Vec<_>>(),
    })
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

    #[test]
    fn subjects_take_services_bare_names_and_addresses() {
        let pod = |ns: &str, name: &str| Ok(Subject::Address(Address::Pod(NamespacedName::new(ns, name))));
        assert_eq!(Subject::parse("svc/shop/web", "d"), Ok(Subject::Service(NamespacedName::new("shop", "web"))));
        assert_eq!(Subject::parse("client", "shop"), pod("shop", "client"), "-n supplies the namespace");
        assert_eq!(Subject::parse("web-0.x", "shop"), pod("shop", "web-0.x"));
        assert_eq!(Subject::parse("x/a", "shop"), pod("x", "a"));
        assert_eq!(Subject::parse("svc/a", "shop"), pod("svc", "a"), "svc/NAME is a pod of namespace svc");
        assert_eq!(Subject::parse("198.18.0.1", "shop"), Ok(Subject::Address(Address::Ip("198.18.0.1".parse().unwrap()))));
        for bad in ["", "svc/Shop/web", "svc/shop/", "svc//web", "svc/shop/web/x", "198.300.1.1", "Client", "x/"] {
            assert!(Subject::parse(bad, "shop").is_err(), "{bad}");
        }
    }

    fn service_and_endpoints() -> (Service, Endpoints) {
        let service = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"ports": [
                {"name": "http", "port": 80, "targetPort": "web"},
                {"name": "dns", "port": 53, "protocol": "UDP"},
            ]},
        }))
        .unwrap();
        let endpoints = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "subsets": [
                {
                    "addresses": [
                        {"ip": "198.18.0.2", "targetRef": {"kind": "Pod", "name": "web-1", "namespace": "shop"}},
                        {"ip": "198.18.0.1", "targetRef": {"kind": "Pod", "name": "web-0"}},
                    ],
                    "notReadyAddresses": [{"ip": "198.18.0.3"}],
                    "ports": [{"name": "http", "port": 8080}, {"name": "dns", "port": 5353, "protocol": "UDP"}],
                },
                {"addresses": [{"ip": "198.18.0.9"}], "ports": [{"name": "http", "port": 9090}]},
                {"addresses": [{"ip": "198.18.0.7"}], "ports": [{"name": "other", "port": 1}]},
            ],
        }))
        .unwrap();
        (service, endpoints)
    }

    #[test]
    fn a_service_port_maps_to_each_backends_target_port_by_name() {
        let (service, endpoints) = service_and_endpoints();
        let backends = service_backends(&service, Some(&endpoints), Some((80, 6))).unwrap();
        assert_eq!(backends.port, Some(ServicePort { port: 80, protocol: 6, name: Some("http".into()) }));
        let ready: Vec<(String, Option<String>, Option<u16>)> =
            backends.ready.iter().map(|b| (b.ip.to_string(), b.pod.as_ref().map(ToString::to_string), b.port)).collect();
        assert_eq!(
            ready,
            [
                ("198.18.0.1".to_owned(), Some("shop/web-0".to_owned()), Some(8080)),
                ("198.18.0.2".to_owned(), Some("shop/web-1".to_owned()), Some(8080)),
                ("198.18.0.9".to_owned(), None, Some(9090)),
            ]
        );
        assert_eq!(backends.not_ready.len(), 1);
        let udp = service_backends(&service, Some(&endpoints), Some((53, 17))).unwrap();
        assert_eq!(udp.ready.iter().map(|b| b.port).collect::<Vec<_>>(), [Some(5353), Some(5353)]);
        let error = service_backends(&service, Some(&endpoints), Some((53, 6))).unwrap_err();
        assert!(error.contains("no port 53/TCP") && error.contains("80/TCP, 53/UDP"), "{error}");
        let sources = service_backends(&service, Some(&endpoints), None).unwrap();
        assert_eq!(sources.ready.len(), 4, "as a source, every ready address");
        assert!(service_backends(&service, None, Some((80, 6))).unwrap().ready.is_empty(), "no Endpoints yet");
    }

    #[test]
    fn cluster_policy_outcomes_name_the_tier_rule_and_action() {
        let (objects, problems) = crate::state::parse_manifest_str(
            "t.yaml",
            false,
            r#"
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Namespace, metadata: {name: shop}}
- {apiVersion: v1, kind: Pod, metadata: {name: client, namespace: shop, labels: {app: client}}, spec: {nodeName: n1, containers: [{name: c}]}, status: {podIP: 198.18.0.5}}
- {apiVersion: v1, kind: Pod, metadata: {name: web, namespace: shop, labels: {app: web}}, spec: {nodeName: n1, containers: [{name: c}]}, status: {podIP: 198.18.0.6}}
- {apiVersion: v1, kind: Pod, metadata: {name: db, namespace: shop, labels: {app: db}}, spec: {nodeName: n1, containers: [{name: c}]}, status: {podIP: 198.18.0.7}}
- apiVersion: policy.networking.k8s.io/v1alpha2
  kind: ClusterNetworkPolicy
  metadata: {name: deny-client-db}
  spec:
    tier: Admin
    priority: 10
    subject: {pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: db}}}}
    ingress:
    - name: no-client
      action: Deny
      from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: client}}}}]
"#,
        );
        assert!(problems.is_empty(), "{problems:?}");
        let state = ClusterState::from_objects(objects);
        let pod = |name: &str| Address::Pod(NamespacedName::new("shop", name));
        let denied = explain(&state, &pod("client"), &pod("db"), 6, 5432).unwrap();
        assert!(!denied.allowed());
        let text = denied.to_text();
        let rule = r#"denied by ClusterNetworkPolicy/deny-client-db (Admin, priority 10, ingress rule 0 "no-client": Deny)"#;
        assert!(text.contains(rule), "{text}");
        assert!(text.contains("ClusterNetworkPolicies for ingress: deny-client-db"), "{text}");
        let json = denied.to_json();
        assert_eq!(json["ingress"]["reason"], "deny-rule");
        assert_eq!((&json["ingress"]["policy"]["tier"], &json["ingress"]["policy"]["action"]), (&json!("Admin"), &json!("Deny")));
        assert_eq!(json["ingress"]["cluster_policies"], json!(["deny-client-db"]));
        // Another peer: the ClusterNetworkPolicy judges db's ingress, and nothing decided.
        let allowed = explain(&state, &pod("web"), &pod("db"), 6, 5432).unwrap();
        assert!(allowed.allowed());
        assert!(allowed.to_text().contains("allowed: no policy decided (default allow)"), "{}", allowed.to_text());
        assert_eq!(allowed.to_json()["ingress"]["reason"], "default-allow");
    }

    #[test]
    fn a_service_answer_is_per_backend_and_no_backend_is_an_answer() {
        let (objects, problems) = crate::state::parse_manifest_str(
            "t.yaml",
            false,
            r"
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Pod, metadata: {name: client, namespace: shop, labels: {app: client}}, spec: {nodeName: n1, containers: [{name: c}]}, status: {podIP: 198.18.0.5}}
- {apiVersion: v1, kind: Pod, metadata: {name: web-0, namespace: shop, labels: {app: web, open: 'yes'}}, spec: {nodeName: n1, containers: [{name: c}]}, status: {podIP: 198.18.0.1}}
- {apiVersion: v1, kind: Pod, metadata: {name: web-1, namespace: shop, labels: {app: web}}, spec: {nodeName: n1, containers: [{name: c}]}, status: {podIP: 198.18.0.2}}
- {apiVersion: v1, kind: Pod, metadata: {name: web-2, namespace: shop, labels: {app: web}}, spec: {nodeName: n2, containers: [{name: c}]}, status: {podIP: 198.18.0.9}}
- {apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: web, namespace: shop}, spec: {podSelector: {matchLabels: {app: web}}, ingress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{port: 8080}]}]}}
",
        );
        assert!(problems.is_empty(), "{problems:?}");
        let state = ClusterState::from_objects(objects);
        let (service, endpoints) = service_and_endpoints();
        let to = Side::Service(service_backends(&service, Some(&endpoints), Some((80, 6))).unwrap());
        let client = Side::Address(Address::Pod(NamespacedName::new("shop", "client")));
        let answer = ServiceAnswer::explain(&state, client.clone(), to, 6, 80).unwrap();
        // web-0 and web-1 on 8080 (allowed); 198.18.0.9 (web-2, no targetRef) on 9090 (denied).
        assert_eq!(answer.results.len(), 3);
        assert_eq!(answer.overall(), Overall::Partial);
        let json = answer.to_json();
        assert_eq!(json["verdict"], "partial");
        assert_eq!(json["backends"][2]["verdict"], "deny");
        assert_eq!(json["backends"][2]["to"]["pod"], "shop/web-2", "the address's pod, found by IP");
        assert_eq!(json["backends"][0]["to_backend"]["port"], 8080);
        assert_eq!(json["backends"][0]["ingress"]["reason"], "rule");
        assert_eq!(json["to_service"]["port_name"], "http");
        let text = answer.to_text();
        assert!(text.contains("--- backend 1 of 3: shop/web-0 198.18.0.1:8080\nALLOW\n"), "{text}");
        assert!(text.contains("--- backend 3 of 3: 198.18.0.9:9090\nDENY\n"), "{text}");
        assert!(text.ends_with("overall: PARTIAL (2 of 3 backends allowed)\n"), "{text}");

        let none = Side::Service(service_backends(&service, None, Some((80, 6))).unwrap());
        let answer = ServiceAnswer::explain(&state, client, none, 6, 80).unwrap();
        assert_eq!(answer.overall(), Overall::NoBackends);
        assert_eq!(answer.to_json()["verdict"], "no-backends");
        assert!(answer.to_text().contains("overall: NO BACKENDS"));
    }
}
