//! A synthetic cluster for benchmarks (`src/bin/compile_bench.rs`, `cargo xtask bench`).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use k8s_openapi::api::core::v1::{Container, ContainerPort, Namespace, Pod, PodIP, PodSpec, PodStatus};
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use policy_agent::compile::NodeContext;
use policy_agent::state::ClusterState;

/// Nodes the synthetic pods are spread over; [`synthetic_node`] is the first of them.
pub const NODES: usize = 50;
const PODS_PER_NAMESPACE: usize = 100;
const APPS_PER_NAMESPACE: usize = 10;

fn labels(pairs: &[(&str, String)]) -> Option<BTreeMap<String, String>> {
    Some(pairs.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect())
}

fn select(pairs: &[(&str, String)]) -> LabelSelector {
    LabelSelector { match_labels: labels(pairs), match_expressions: None }
}

fn tcp(port: IntOrString, end_port: Option<i32>) -> NetworkPolicyPort {
    NetworkPolicyPort { port: Some(port), end_port, protocol: Some("TCP".to_owned()) }
}

/// The node to compile for: holds `pods / NODES` of the pods.
pub fn synthetic_node() -> NodeContext {
    NodeContext { name: "node-0".to_owned(), ips: vec![Ipv4Addr::new(198, 18, 100, 1).into()] }
}

/// `pods` pods in namespaces of 100 (10 apps x 3 tiers each, dual-stack, spread over
/// [`NODES`] nodes) and `policies` policies mixing the shapes real clusters use: default
/// deny, pod and namespace selectors, matchExpressions, ipBlocks with except, numeric, named
/// and ranged ports. Addresses stay inside 198.18.0.0/15 and 2001:2::/48: pods in
/// 198.18.128.0/17 (distinct up to 32768 pods) and 2001:2:0:8000::/64, nodes in 198.18.100.0/24,
/// ipBlocks in 198.19.0.0/16.
pub fn synthetic_cluster(pods: usize, policies: usize) -> ClusterState {
    let namespaces = pods.div_ceil(PODS_PER_NAMESPACE).max(1);
    let mut state = ClusterState::default();
    for n in 0..namespaces {
        let (name, namespace) = synthetic_namespace(n);
        state.namespaces.insert(name, std::sync::Arc::new(namespace));
    }
    for i in 0..pods {
        state.insert(policy_agent::state::Object::Pod(std::sync::Arc::new(synthetic_pod(i))));
    }
    for p in 0..policies {
        let policy = NetworkPolicy {
            metadata: ObjectMeta {
                name: Some(format!("policy-{p}")),
                namespace: Some(format!("ns-{}", p % namespaces)),
                ..ObjectMeta::default()
            },
            spec: Some(synthetic_policy_spec(p)),
        };
        state.insert(policy_agent::state::Object::NetworkPolicy(std::sync::Arc::new(policy)));
    }
    state
}

fn synthetic_namespace(n: usize) -> (String, Namespace) {
    let name = format!("ns-{n}");
    let namespace = Namespace {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: labels(&[("team", format!("team-{}", n % 7)), ("env", ["prod", "staging"][n % 2].to_owned())]),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    (name, namespace)
}

/// Pod `i`: in namespace `i / 100`, on node `i % 50`, serving `http` and `metrics`.
fn synthetic_pod(i: usize) -> Pod {
    let namespace = format!("ns-{}", i / PODS_PER_NAMESPACE);
    let app = format!("app-{}", i % APPS_PER_NAMESPACE);
    let tier = ["web", "api", "db"][i % 3].to_owned();
    let index = u32::try_from(i).unwrap_or(u32::MAX);
    let v4 = Ipv4Addr::from(0xc612_8000 | index);
    let v6 = Ipv6Addr::from(0x2001_0002_0000_8000_0000_0000_0000_0000_u128 | u128::from(index));
    let node = i % NODES;
    Pod {
        metadata: ObjectMeta {
            name: Some(format!("pod-{i}")),
            namespace: Some(namespace),
            labels: labels(&[("app", app), ("tier", tier), ("version", format!("v{}", i % 2))]),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            node_name: Some(format!("node-{node}")),
            containers: vec![Container {
                name: "main".to_owned(),
                ports: Some(vec![
                    ContainerPort {
                        name: Some("http".to_owned()),
                        container_port: 8080,
                        ..ContainerPort::default()
                    },
                    ContainerPort {
                        name: Some("metrics".to_owned()),
                        container_port: 9090,
                        ..ContainerPort::default()
                    },
                ]),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".to_owned()),
            host_ip: Some(format!("198.18.100.{}", node + 1)),
            pod_ip: Some(v4.to_string()),
            pod_ips: Some(vec![PodIP { ip: v4.to_string() }, PodIP { ip: v6.to_string() }]),
            ..PodStatus::default()
        }),
    }
}

/// Policy `p`: one of six kinds, in turn.
fn synthetic_policy_spec(p: usize) -> NetworkPolicySpec {
    let app = |k: usize| format!("app-{}", (p + k) % APPS_PER_NAMESPACE);
    match p % 6 {
        0 => default_deny(),
        1 => db_from_api(&app(0)),
        2 => team_on_named_port(p, &app(1)),
        3 => egress_to_external_range(p),
        4 => egress_to_same_app(&app(2)),
        _ => monitoring_from_namespace(p),
    }
}

/// Default deny for the namespace.
fn default_deny() -> NetworkPolicySpec {
    NetworkPolicySpec {
        pod_selector: Some(LabelSelector::default()),
        policy_types: Some(vec!["Ingress".to_owned(), "Egress".to_owned()]),
        ..NetworkPolicySpec::default()
    }
}

/// An app's db tier from its api tier on a port.
fn db_from_api(app: &str) -> NetworkPolicySpec {
    NetworkPolicySpec {
        pod_selector: Some(select(&[("app", app.to_owned()), ("tier", "db".to_owned())])),
        ingress: Some(vec![NetworkPolicyIngressRule {
            from: Some(vec![NetworkPolicyPeer {
                pod_selector: Some(select(&[("app", app.to_owned()), ("tier", "api".to_owned())])),
                ..NetworkPolicyPeer::default()
            }]),
            ports: Some(vec![tcp(IntOrString::Int(5432), None)]),
        }]),
        ..NetworkPolicySpec::default()
    }
}

/// From a team's namespaces, named port.
fn team_on_named_port(p: usize, app: &str) -> NetworkPolicySpec {
    NetworkPolicySpec {
        pod_selector: Some(select(&[("app", app.to_owned())])),
        ingress: Some(vec![NetworkPolicyIngressRule {
            from: Some(vec![NetworkPolicyPeer {
                namespace_selector: Some(select(&[("team", format!("team-{}", p % 7))])),
                pod_selector: Some(LabelSelector {
                    match_labels: None,
                    match_expressions: Some(vec![LabelSelectorRequirement {
                        key: "tier".to_owned(),
                        operator: "In".to_owned(),
                        values: Some(vec!["web".to_owned(), "api".to_owned()]),
                    }]),
                }),
                ..NetworkPolicyPeer::default()
            }]),
            ports: Some(vec![tcp(IntOrString::String("http".to_owned()), None)]),
        }]),
        ..NetworkPolicySpec::default()
    }
}

/// Egress to an external range with an exception.
fn egress_to_external_range(p: usize) -> NetworkPolicySpec {
    NetworkPolicySpec {
        pod_selector: Some(select(&[("tier", "api".to_owned())])),
        policy_types: Some(vec!["Egress".to_owned()]),
        egress: Some(vec![NetworkPolicyEgressRule {
            to: Some(vec![NetworkPolicyPeer {
                ip_block: Some(IPBlock {
                    cidr: format!("198.19.{}.0/20", 16 * (p % 16)),
                    except: Some(vec![format!("198.19.{}.0/24", 16 * (p % 16) + (p % 256) / 16)]),
                }),
                ..NetworkPolicyPeer::default()
            }]),
            ports: Some(vec![tcp(IntOrString::Int(443), None)]),
        }]),
        ..NetworkPolicySpec::default()
    }
}

/// Egress to the metrics port of same-app pods anywhere, plus a port range.
fn egress_to_same_app(app: &str) -> NetworkPolicySpec {
    NetworkPolicySpec {
        pod_selector: Some(select(&[("app", app.to_owned())])),
        egress: Some(vec![NetworkPolicyEgressRule {
            to: Some(vec![NetworkPolicyPeer {
                namespace_selector: Some(select(&[("env", "prod".to_owned())])),
                pod_selector: Some(select(&[("app", app.to_owned())])),
                ..NetworkPolicyPeer::default()
            }]),
            ports: Some(vec![
                tcp(IntOrString::String("metrics".to_owned()), None),
                tcp(IntOrString::Int(30000), Some(32767)),
            ]),
        }]),
        ..NetworkPolicySpec::default()
    }
}

/// Monitoring from anywhere in the namespace, any port.
fn monitoring_from_namespace(p: usize) -> NetworkPolicySpec {
    NetworkPolicySpec {
        pod_selector: Some(select(&[("version", format!("v{}", p % 2))])),
        ingress: Some(vec![NetworkPolicyIngressRule {
            from: Some(vec![NetworkPolicyPeer {
                pod_selector: Some(LabelSelector::default()),
                ..NetworkPolicyPeer::default()
            }]),
            ports: None,
        }]),
        ..NetworkPolicySpec::default()
    }
}

/// The kinds of change the control-plane benchmarks time, each as the state after it.
/// `state` is a [`synthetic_cluster`] of at least 200 pods and 6 policies; unchanged objects
/// keep their `Arc`s, as the agent's stores keep them.
pub fn synthetic_changes(state: &ClusterState) -> Vec<(&'static str, ClusterState)> {
    use policy_agent::state::{NamespacedName, Object, PodRef};
    use std::sync::Arc;
    let pods = state.pods.len();
    let policies = state.policies.len();
    let namespaces = state.namespaces.len().max(1);
    let with = |change: &dyn Fn(&mut ClusterState)| {
        let mut changed = state.clone();
        change(&mut changed);
        changed
    };
    let relabel = |i: usize, app: &'static str| {
        move |s: &mut ClusterState| {
            let mut pod = synthetic_pod(i);
            pod.metadata.labels.get_or_insert_default().insert("app".to_owned(), app.to_owned());
            s.insert(Object::Pod(Arc::new(pod)));
        }
    };
    // Pod 1 is app-1, api, v1 like pod 7 but for its app; pod `pods` would start a namespace.
    let new_pod = |s: &mut ClusterState| {
        let mut pod = synthetic_pod(pods);
        pod.metadata.namespace = Some("ns-0".to_owned());
        pod.metadata.labels = synthetic_pod(pods % PODS_PER_NAMESPACE).metadata.labels;
        s.insert(Object::Pod(Arc::new(pod)));
    };
    let new_policy = |spec: NetworkPolicySpec| {
        move |s: &mut ClusterState| {
            let metadata = ObjectMeta { name: Some("policy-new".to_owned()), namespace: Some("ns-0".to_owned()), ..ObjectMeta::default() };
            s.insert(Object::NetworkPolicy(Arc::new(NetworkPolicy { metadata, spec: Some(spec.clone()) })));
        }
    };
    let pod_ref = |i: usize| PodRef::new(format!("ns-{}", i / PODS_PER_NAMESPACE), format!("pod-{i}"));
    vec![
        ("new policy", with(&new_policy(db_from_api("app-1")))),
        ("new policy with a new ipBlock", with(&new_policy(with_new_block(egress_to_external_range(policies))))),
        ("policy removed", with(&|s| drop(s.policies.remove(&NamespacedName::new(format!("ns-{}", 1 % namespaces), "policy-1"))))),
        ("label change to a label set in use", with(&relabel(1, "app-7"))),
        ("label change to a new label set", with(&relabel(1, "app-elsewhere"))),
        ("new pod", with(&new_pod)),
        ("pod deleted", with(&|s| drop(s.pods.remove(&pod_ref(pods / 2))))),
        ("namespace relabel", with(&|s| {
            let (name, mut namespace) = synthetic_namespace(1);
            namespace.metadata.labels.get_or_insert_default().insert("team".to_owned(), "team-new".to_owned());
            s.namespaces.insert(name, Arc::new(namespace));
        })),
    ]
}

/// The spec with its ipBlock moved to a range no synthetic policy uses (198.19.255.0/24).
fn with_new_block(mut spec: NetworkPolicySpec) -> NetworkPolicySpec {
    let blocks = spec.egress.iter_mut().flatten().flat_map(|rule| rule.to.iter_mut().flatten()).filter_map(|peer| peer.ip_block.as_mut());
    for block in blocks {
        *block = IPBlock { cidr: "198.19.255.0/24".to_owned(), except: None };
    }
    spec
}
