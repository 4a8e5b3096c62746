//! Project on ingest: each watched object is cut down at once to the fields the compiler,
//! the identity resolver, explain and coverage read, so the stores hold no managedFields,
//! annotations, env, volumes or conditions, and an update that touches only such fields
//! gives an equal projection (and so no recompile).
//!
//! The projections are still k8s-openapi objects, so `ClusterState` and everything
//! downstream work unchanged. A field read downstream must be kept here too: the test
//! `projected_objects_compile_like_full_ones` compiles both ways and compares.

use k8s_openapi::{
    api::{
        core::v1::{
            Container, ContainerPort, HostIP, LoadBalancerIngress, LoadBalancerStatus, Namespace, Pod, PodIP, PodSpec, PodStatus, Service,
            ServiceSpec, ServiceStatus,
        },
        networking::v1::NetworkPolicy,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use crate::crd::ClusterNetworkPolicy;

/// An object kind the Kubernetes source projects before storing it.
pub trait Project {
    /// The object with only what the compiler reads.
    fn project(&self) -> Self;
}

impl Project for Pod {
    fn project(&self) -> Self {
        project_pod(self)
    }
}

impl Project for Namespace {
    fn project(&self) -> Self {
        project_namespace(self)
    }
}

impl Project for NetworkPolicy {
    fn project(&self) -> Self {
        project_policy(self)
    }
}

impl Project for Service {
    fn project(&self) -> Self {
        project_service(self)
    }
}

impl Project for ClusterNetworkPolicy {
    fn project(&self) -> Self {
        project_cluster_policy(self)
    }
}

/// Name and namespace: the store key and `PodRef`/`policy_ref` (messages, map keys).
fn identity_meta(meta: &ObjectMeta) -> ObjectMeta {
    ObjectMeta { name: meta.name.clone(), namespace: meta.namespace.clone(), ..ObjectMeta::default() }
}

/// What of a Pod is read downstream, and why:
/// - metadata.name, namespace: the pod's key; labels: selectors and identities;
///   creationTimestamp, deletionTimestamp: who wins an address several pods report
///   (`resolve::claim_order`).
/// - spec.nodeName: which pods are this node's endpoints and whose hostIPs are the node's;
///   spec.hostNetwork: such a pod's addresses are the node's, not an endpoint;
///   containers[].ports (name, containerPort, protocol only): named ports of policies,
///   kept in order in one container. Container names, images, env, volumes... are dropped.
/// - status.phase: Succeeded and Failed pods hold no address; podIP(s): the pod's
///   addresses; hostIP(s): the node's addresses. Conditions and container statuses
///   (readiness, restarts) are dropped: they change often and decide nothing here.
pub fn project_pod(pod: &Pod) -> Pod {
    let meta = &pod.metadata;
    let metadata = ObjectMeta {
        labels: meta.labels.clone(),
        creation_timestamp: meta.creation_timestamp.clone(),
        deletion_timestamp: meta.deletion_timestamp.clone(),
        // A CNI ADD names the pod by uid too: a re-created pod of the same name is another.
        uid: meta.uid.clone(),
        ..identity_meta(meta)
    };
    let spec = pod.spec.as_ref().map(|spec| PodSpec {
        node_name: spec.node_name.clone(),
        host_network: spec.host_network,
        containers: project_containers(&spec.containers),
        ..PodSpec::default()
    });
    let status = pod.status.as_ref().map(|status| PodStatus {
        phase: status.phase.clone(),
        pod_ip: status.pod_ip.clone(),
        pod_ips: status.pod_ips.as_ref().map(|ips| ips.iter().map(|p| PodIP { ip: p.ip.clone() }).collect()),
        host_ip: status.host_ip.clone(),
        host_ips: status.host_ips.as_ref().map(|ips| ips.iter().map(|h| HostIP { ip: h.ip.clone() }).collect()),
        ..PodStatus::default()
    });
    Pod { metadata, spec, status }
}

/// The ports of all containers (name, number, protocol: what a named port resolves to), in
/// one nameless container, or no container when none declares a port. Named ports are
/// resolved over the ports of all containers in order, the first match winning, so one
/// container with every port in the same order resolves alike, and a Container is 2 KiB.
fn project_containers(containers: &[Container]) -> Vec<Container> {
    let ports: Vec<ContainerPort> = containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .map(|p| ContainerPort { name: p.name.clone(), container_port: p.container_port, protocol: p.protocol.clone(), ..ContainerPort::default() })
        .collect();
    if ports.is_empty() { Vec::new() } else { vec![Container { ports: Some(ports), ..Container::default() }] }
}

/// A Namespace's name (its key and `kubernetes.io/metadata.name`) and labels
/// (namespaceSelectors). Its status (Terminating) and finalizers decide nothing here.
pub fn project_namespace(namespace: &Namespace) -> Namespace {
    let metadata = ObjectMeta { labels: namespace.metadata.labels.clone(), ..identity_meta(&namespace.metadata) };
    Namespace { metadata, ..Namespace::default() }
}

/// A NetworkPolicy's name and namespace (its key, cookies and messages) and its whole spec
/// (everything in it is policy).
pub fn project_policy(policy: &NetworkPolicy) -> NetworkPolicy {
    NetworkPolicy { metadata: identity_meta(&policy.metadata), spec: policy.spec.clone() }
}

/// A ClusterNetworkPolicy's name (its key, the tie-break between equal priorities, cookies
/// and messages) and its whole spec. Its status (conditions an implementation writes) is
/// not even in the type.
pub fn project_cluster_policy(policy: &ClusterNetworkPolicy) -> ClusterNetworkPolicy {
    ClusterNetworkPolicy { metadata: identity_meta(&policy.metadata), spec: policy.spec.clone() }
}

/// A Service's addresses that kube-proxy translates (ClusterIPs, externalIPs, load-balancer
/// ingress IPs): egress towards them is judged after the translation. Ports, selectors and
/// everything else decide nothing here.
pub fn project_service(service: &Service) -> Service {
    let spec = service.spec.as_ref().map(|spec| ServiceSpec {
        cluster_ip: spec.cluster_ip.clone(),
        cluster_ips: spec.cluster_ips.clone(),
        external_ips: spec.external_ips.clone(),
        ..ServiceSpec::default()
    });
    let ingress = service.status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|lb| lb.ingress.as_ref());
    let status = ingress.map(|ingress| ServiceStatus {
        load_balancer: Some(LoadBalancerStatus {
            ingress: Some(ingress.iter().map(|i| LoadBalancerIngress { ip: i.ip.clone(), ..LoadBalancerIngress::default() }).collect()),
        }),
        ..ServiceStatus::default()
    });
    Service { metadata: identity_meta(&service.metadata), spec, status }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::{
        compile::{NodeContext, compile, render, sequential_slots},
        state::{ClusterState, Object},
    };

    /// Metadata as an API server writes it: managedFields, annotations, owners, versions.
    fn server_meta(name: &str, namespace: Option<&str>, labels: Value) -> Value {
        json!({
            "name": name, "namespace": namespace, "labels": labels,
            "uid": format!("uid-{name}"), "resourceVersion": "1234", "generation": 1,
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{\"a\": 1}"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "uid": "u", "controller": true}],
            "finalizers": ["example.com/keep"],
            "managedFields": [{"manager": "kubelet", "operation": "Update", "apiVersion": "v1", "time": "2026-01-01T00:00:01Z",
                "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {"f:conditions": {}}}, "subresource": "status"}],
        })
    }

    /// A pod as a real cluster has it: two containers (one without ports), env, volumes,
    /// probes, tolerations, and a kubelet's status with conditions and container statuses.
    fn full_pod(namespace: &str, name: &str, app: &str, node: &str, ip: &str, http: u16) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": server_meta(name, Some(namespace), json!({"app": app, "pod-template-hash": "5d9f"})),
            "spec": {
                "nodeName": node, "serviceAccountName": "default", "restartPolicy": "Always",
                "containers": [
                    {"name": "app", "image": "example.invalid/app:1", "args": ["--serve"],
                     "env": [{"name": "MODE", "value": "prod"}],
                     "ports": [{"name": "http", "containerPort": http, "protocol": "TCP", "hostPort": 0}, {"name": "dns", "containerPort": 53, "protocol": "UDP"}],
                     "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                     "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}}},
                    {"name": "sidecar", "image": "example.invalid/sidecar:1"},
                    {"name": "metrics", "image": "example.invalid/m:1", "ports": [{"name": "metrics", "containerPort": 9100}]},
                ],
                "volumes": [{"name": "data", "emptyDir": {}}],
                "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute"}],
            },
            "status": {
                "phase": "Running", "hostIP": "198.19.192.1", "hostIPs": [{"ip": "198.19.192.1"}],
                "podIP": ip, "podIPs": [{"ip": ip}], "qosClass": "BestEffort", "startTime": "2026-01-01T00:00:02Z",
                "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:03Z"}],
                "containerStatuses": [{"name": "app", "ready": true, "restartCount": 0, "image": "example.invalid/app:1", "imageID": "sha256:1", "started": true, "state": {"running": {"startedAt": "2026-01-01T00:00:03Z"}}}],
            },
        })
    }

    fn pod(value: Value) -> Pod {
        serde_json::from_value(value).expect("pod")
    }

    /// Namespaces, pods on two nodes (one hostNetwork, one terminated, one terminating that
    /// shares an address and would win it if it were not terminating), policies using
    /// named ports, both selector kinds and an ipBlock, and ClusterNetworkPolicies of both
    /// tiers (as the API server has them: metadata noise and a status an implementation
    /// wrote). The NetworkPolicy named `egress` stays last.
    fn full_state() -> Vec<Object> {
        let namespace = |name: &str, team: &str| {
            Object::Namespace(std::sync::Arc::new(
                serde_json::from_value(json!({"metadata": server_meta(name, None, json!({"team": team})), "status": {"phase": "Active"}})).expect("namespace"),
            ))
        };
        let mut pods = vec![
            full_pod("x", "a", "web", "n1", "198.18.1.1", 80),
            full_pod("x", "b", "web", "n1", "198.18.1.2", 8080),
            full_pod("x", "c", "client", "n2", "198.18.1.3", 80),
            full_pod("y", "d", "client", "n1", "198.18.2.1", 80),
            full_pod("y", "b-old", "client", "n2", "198.18.2.1", 80),
            full_pod("y", "done", "web", "n1", "198.18.2.9", 80),
            full_pod("kube-system", "hostnet", "agent", "n1", "198.19.192.1", 80),
        ];
        pods[4]["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:01:00Z");
        pods[5]["status"]["phase"] = json!("Succeeded");
        pods[6]["spec"]["hostNetwork"] = json!(true);
        // n2's address known from one pod's hostIP and another's hostIPs only.
        pods[2]["status"]["hostIP"] = json!("198.19.192.2");
        pods[2]["status"].as_object_mut().expect("status").remove("hostIPs");
        pods[4]["status"]["hostIPs"] = json!([{"ip": "198.19.192.3"}]);
        pods[4]["status"].as_object_mut().expect("status").remove("hostIP");
        let policy = |namespace: &str, name: &str, spec: Value| {
            let value =
                json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": server_meta(name, Some(namespace), json!({})), "spec": spec});
            Object::NetworkPolicy(std::sync::Arc::new(serde_json::from_value(value).expect("policy")))
        };
        let mut objects = vec![namespace("x", "blue"), namespace("y", "red")];
        objects.extend(pods.into_iter().map(|p| Object::Pod(std::sync::Arc::new(pod(p)))));
        objects.extend(full_cluster_policies());
        objects.push(policy("x", "web", json!({"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}, {"namespaceSelector": {"matchLabels": {"team": "red"}}}], "ports": [{"port": "http"}, {"port": "dns", "protocol": "UDP"}]}]})));
        objects.push(policy("y", "egress", json!({"podSelector": {}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"team": "blue"}}, "podSelector": {"matchLabels": {"app": "web"}}}], "ports": [{"port": "metrics"}]}, {"to": [{"ipBlock": {"cidr": "198.18.0.0/16", "except": ["198.18.1.0/24"]}}]}]})));
        objects
    }

    fn full_cluster_policies() -> Vec<Object> {
        let cnp = |name: &str, spec: Value| {
            let value = json!({"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
                "metadata": server_meta(name, None, json!({"owner": "platform"})), "spec": spec,
                "status": {"conditions": [{"type": "Accepted", "status": "True", "reason": "Ok", "message": "", "lastTransitionTime": "2026-01-01T00:00:05Z"}]}});
            Object::ClusterNetworkPolicy(std::sync::Arc::new(serde_json::from_value(value).expect("cluster policy")))
        };
        vec![
            cnp("guard-web", json!({"tier": "Admin", "priority": 10, "subject": {"pods": {"namespaceSelector": {"matchLabels": {"team": "blue"}}, "podSelector": {"matchLabels": {"app": "web"}}}},
                "ingress": [{"name": "no-red", "action": "Deny", "from": [{"namespaces": {"matchLabels": {"team": "red"}}}], "protocols": [{"tcp": {"destinationPort": {"number": 80}}}]},
                            {"action": "Pass", "from": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "client"}}}}]}]})),
            cnp("baseline", json!({"tier": "Baseline", "priority": 5, "subject": {"namespaces": {}},
                "egress": [{"action": "Deny", "to": [{"networks": ["198.18.2.0/24"]}], "protocols": [{"destinationNamedPort": "http"}]}]})),
        ]
    }

    fn projected(object: &Object) -> Object {
        match object {
            Object::Namespace(ns) => Object::Namespace(std::sync::Arc::new(project_namespace(ns))),
            Object::Pod(pod) => Object::Pod(std::sync::Arc::new(project_pod(pod))),
            Object::NetworkPolicy(policy) => Object::NetworkPolicy(std::sync::Arc::new(project_policy(policy))),
            Object::Service(service) => Object::Service(std::sync::Arc::new(project_service(service))),
            Object::ClusterNetworkPolicy(policy) => Object::ClusterNetworkPolicy(std::sync::Arc::new(project_cluster_policy(policy))),
        }
    }

    #[test]
    fn projected_objects_compile_like_full_ones() {
        let full = ClusterState::from_objects(full_state());
        let projected = ClusterState::from_objects(full_state().iter().map(projected));
        assert_ne!(full, projected, "something was dropped");
        for node in ["n1", "n2"] {
            let node = NodeContext { name: node.into(), ips: vec!["198.19.192.1".parse().expect("ip")] };
            let (from_full, from_projected) = (compile(&full, &node), compile(&projected, &node));
            assert!(!from_full.endpoints.is_empty() && from_full.cookies.len() >= 2, "{from_full:#?}");
            let by_cluster_policies = from_full.endpoints.values().filter(|e| !e.ingress_cluster_policies.is_empty() || !e.egress_cluster_policies.is_empty());
            assert!(by_cluster_policies.count() > 0, "the ClusterNetworkPolicies select pods of {}", node.name);
            assert_eq!(from_full, from_projected, "node {}", node.name);
            let slots = sequential_slots(&from_full);
            assert_eq!(render(&from_full, &slots, false), render(&from_projected, &slots, false));
        }
        assert_eq!(crate::coverage::report(&full, None), crate::coverage::report(&projected, None));
    }

    #[test]
    fn projection_drops_what_the_compiler_does_not_read() {
        let full = full_state();
        let text: String = full.iter().map(|o| full_json(&projected(o))).collect();
        for dropped in [
            "managedFields",
            "annotations",
            "ownerReferences",
            "resourceVersion",
            "finalizers",
            "conditions",
            "containerStatuses",
            "env",
            "volumes",
            "image",
            "tolerations",
            "qosClass",
            "hostPort",
            "sidecar",
            "readinessProbe",
        ] {
            assert!(!text.contains(&format!("\"{dropped}\"")), "{dropped} kept: {text}");
        }
        let Object::Pod(a) = &full[2] else { panic!("pod first after namespaces") };
        let a = project_pod(a);
        let ports: Vec<_> =
            a.spec.iter().flat_map(|s| &s.containers).flat_map(|c| c.ports.iter().flatten()).map(|p| (p.name.as_deref(), p.container_port)).collect();
        assert_eq!(ports, [(Some("http"), 80), (Some("dns"), 53), (Some("metrics"), 9100)], "ports kept in order");
        assert_eq!(a.spec.as_ref().map(|s| s.containers.len()), Some(1), "in one container");
        let full_len: usize = full.iter().map(|o| full_json(o).len()).sum();
        assert!(text.len() * 3 < full_len, "projected {} bytes of {full_len}", text.len());
    }

    fn full_json(object: &Object) -> String {
        match object {
            Object::Namespace(ns) => serde_json::to_string(&**ns),
            Object::Pod(pod) => serde_json::to_string(&**pod),
            Object::NetworkPolicy(policy) => serde_json::to_string(&**policy),
            Object::Service(service) => serde_json::to_string(&**service),
            Object::ClusterNetworkPolicy(policy) => serde_json::to_string(&**policy),
        }
        .expect("json")
    }

    /// `base` with `value` set at a JSON pointer (the field may be new).
    fn changed(base: &Value, pointer: &str, value: Value) -> Pod {
        let mut changed = base.clone();
        let (parent, key) = pointer.rsplit_once('/').expect("a pointer");
        match changed.pointer_mut(parent).unwrap_or_else(|| panic!("{parent}")) {
            Value::Object(map) => drop(map.insert(key.to_owned(), value)),
            Value::Array(items) => items[key.parse::<usize>().expect("an index")] = value,
            other => panic!("{parent} is {other}"),
        }
        pod(changed)
    }

    #[test]
    fn status_only_and_metadata_noise_give_an_equal_projection() {
        let base = full_pod("x", "a", "web", "n1", "198.18.1.1", 80);
        let before = project_pod(&pod(base.clone()));
        for (pointer, value) in [
            ("/status/conditions/0/status", json!("False")),
            ("/status/containerStatuses/0/ready", json!(false)),
            ("/status/containerStatuses/0/restartCount", json!(3)),
            ("/metadata/annotations", json!({"deployment.kubernetes.io/revision": "2"})),
            ("/metadata/resourceVersion", json!("99999")),
            ("/metadata/managedFields", json!([])),
            ("/spec/containers/0/image", json!("example.invalid/app:2")),
        ] {
            assert_eq!(project_pod(&changed(&base, pointer, value)), before, "{pointer}");
        }
    }

    #[test]
    fn what_the_compiler_reads_gives_a_different_projection() {
        let base = full_pod("x", "a", "web", "n1", "198.18.1.1", 80);
        let before = project_pod(&pod(base.clone()));
        for (pointer, value) in [
            ("/metadata/labels/app", json!("db")),
            ("/metadata/creationTimestamp", json!("2026-01-02T00:00:00Z")),
            ("/status/podIP", json!("198.18.1.7")),
            ("/status/podIPs", json!([{"ip": "198.18.1.1"}, {"ip": "2001:2::1"}])),
            ("/status/hostIP", json!("198.19.192.2")),
            ("/status/phase", json!("Failed")),
            ("/spec/nodeName", json!("n2")),
            ("/spec/hostNetwork", json!(true)),
            ("/spec/containers/0/ports/0/containerPort", json!(81)),
            ("/spec/containers/0/ports/0/name", json!("web")),
            ("/spec/containers/0/ports/1/protocol", json!("TCP")),
            ("/metadata/deletionTimestamp", json!("2026-01-01T00:01:00Z")),
        ] {
            assert_ne!(project_pod(&changed(&base, pointer, value)), before, "{pointer}");
        }
    }

    #[test]
    fn namespace_and_policy_projections() {
        let Object::Namespace(ns) = &full_state()[0] else { panic!("namespace first") };
        let mut relabelled = (**ns).clone();
        relabelled.metadata.labels.get_or_insert_default().insert("team".into(), "green".into());
        let mut annotated = (**ns).clone();
        annotated.metadata.annotations = None;
        annotated.metadata.resource_version = Some("7".into());
        assert_eq!(project_namespace(&annotated), project_namespace(ns));
        assert_ne!(project_namespace(&relabelled), project_namespace(ns));
        let Some(Object::NetworkPolicy(policy)) = full_state().pop() else { panic!("policy last") };
        let projected = project_policy(&policy);
        assert_eq!(
            (projected.spec.as_ref(), projected.metadata.name.as_deref(), projected.metadata.namespace.as_deref()),
            (policy.spec.as_ref(), Some("egress"), Some("y"))
        );
        assert_eq!(projected.metadata, ObjectMeta { name: Some("egress".into()), namespace: Some("y".into()), ..ObjectMeta::default() });
    }

    #[test]
    fn cluster_policy_projection_keeps_name_and_spec_only() {
        let Object::ClusterNetworkPolicy(policy) = &full_cluster_policies()[0] else { panic!("a cluster policy") };
        let projected = project_cluster_policy(policy);
        assert_eq!(projected.spec, policy.spec);
        assert_eq!(projected.metadata, ObjectMeta { name: Some("guard-web".into()), ..ObjectMeta::default() });
        let mut noisy = (**policy).clone();
        noisy.metadata.resource_version = Some("99".into());
        noisy.metadata.generation = Some(2);
        noisy.metadata.annotations = None;
        assert_eq!(project_cluster_policy(&noisy), projected, "metadata noise");
        let mut reprioritised = (**policy).clone();
        reprioritised.spec.priority = 11;
        assert_ne!(project_cluster_policy(&reprioritised), projected);
    }
}
