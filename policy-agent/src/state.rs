//! Cluster state: the Namespaces, Pods and NetworkPolicies the compiler works from, and a
//! loader for manifest directories (YAML or JSON, multi-document, kubectl's `List` format).
//!
//! Objects are kept in `BTreeMap`s keyed by namespace and name, so the compiler sees them in
//! the same order whatever order they were loaded or watched in.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::fmt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::AgentError;
use crate::crd::ClusterNetworkPolicy;

/// The label every namespace carries (API servers since 1.21 set it; we derive it).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// A namespaced object's name: `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct NamespacedName {
    pub namespace: String,
    pub name: String,
}

/// A pod, by namespace and name.
pub type PodRef = NamespacedName;

impl NamespacedName {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self { namespace: namespace.into(), name: name.into() }
    }
}

impl fmt::Display for NamespacedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Something wrong with the input that was reported and skipped (never fatal).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Problem {
    /// The object (`NetworkPolicy ns/name`) or document (`file.yaml document 2`).
    pub object: String,
    /// Field path inside the object (`spec.ingress[0].from[1].ipBlock.cidr`); empty if none.
    pub field: String,
    pub message: String,
}

impl Problem {
    pub fn new(object: impl Into<String>, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { object: object.into(), field: field.into(), message: message.into() }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.object, self.message)
        } else {
            write!(f, "{}: {}: {}", self.object, self.field, self.message)
        }
    }
}

/// One object the compiler understands, shared rather than copied: a snapshot of the
/// watch stores costs a reference count per object, not a deep clone.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Namespace(Arc<Namespace>),
    Pod(Arc<Pod>),
    NetworkPolicy(Arc<NetworkPolicy>),
    /// Read only for the addresses kube-proxy translates (see `crate::services`).
    Service(Arc<Service>),
    ClusterNetworkPolicy(Arc<ClusterNetworkPolicy>),
}

impl Object {
    pub fn kind(&self) -> &'static str {
        match self {
            Object::Namespace(_) => "Namespace",
            Object::Pod(_) => "Pod",
            Object::NetworkPolicy(_) => "NetworkPolicy",
            Object::Service(_) => "Service",
            Object::ClusterNetworkPolicy(_) => "ClusterNetworkPolicy",
        }
    }

    /// `Kind namespace/name` (or `Kind name` for namespaces), for messages.
    pub fn describe(&self) -> String {
        match self {
            Object::Namespace(ns) => format!("Namespace {}", ns.metadata.name.as_deref().unwrap_or("")),
            Object::Pod(pod) => format!("Pod {}", pod_ref(pod)),
            Object::NetworkPolicy(policy) => format!("NetworkPolicy {}", policy_ref(policy)),
            Object::Service(service) => format!("Service {}", service_ref(service)),
            Object::ClusterNetworkPolicy(policy) => format!("ClusterNetworkPolicy {}", cluster_policy_name(policy)),
        }
    }

    /// Without metadata.name: such an object has no key, and the loaders skip it.
    pub fn is_unnamed(&self) -> bool {
        let meta = match self {
            Object::Namespace(o) => &o.metadata,
            Object::Pod(o) => &o.metadata,
            Object::NetworkPolicy(o) => &o.metadata,
            Object::Service(o) => &o.metadata,
            Object::ClusterNetworkPolicy(o) => &o.metadata,
        };
        meta.name.is_none()
    }
}

/// Objects without a namespace land in `default`, as `kubectl apply` would put them.
fn namespace_or_default(namespace: Option<&String>) -> String {
    namespace.map_or_else(|| "default".to_owned(), Clone::clone)
}

pub fn pod_ref(pod: &Pod) -> PodRef {
    NamespacedName::new(
        namespace_or_default(pod.metadata.namespace.as_ref()),
        pod.metadata.name.clone().unwrap_or_default(),
    )
}

pub fn policy_ref(policy: &NetworkPolicy) -> NamespacedName {
    NamespacedName::new(
        namespace_or_default(policy.metadata.namespace.as_ref()),
        policy.metadata.name.clone().unwrap_or_default(),
    )
}

pub fn service_ref(service: &Service) -> NamespacedName {
    NamespacedName::new(namespace_or_default(service.metadata.namespace.as_ref()), service.metadata.name.clone().unwrap_or_default())
}

pub fn cluster_policy_name(policy: &ClusterNetworkPolicy) -> String {
    policy.metadata.name.clone().unwrap_or_default()
}

/// Everything the compiler needs to know about the cluster.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterState {
    pub namespaces: BTreeMap<String, Arc<Namespace>>,
    pub pods: BTreeMap<PodRef, Arc<Pod>>,
    pub policies: BTreeMap<NamespacedName, Arc<NetworkPolicy>>,
    pub services: BTreeMap<NamespacedName, Arc<Service>>,
    /// ClusterNetworkPolicies by name (they are cluster-scoped).
    pub cluster_policies: BTreeMap<String, Arc<ClusterNetworkPolicy>>,
}

impl ClusterState {
    /// Builds the state from objects; a later object with the same kind and name replaces an
    /// earlier one. Pods and policies without a namespace go to `default`.
    pub fn from_objects(objects: impl IntoIterator<Item = Object>) -> Self {
        let mut state = Self::default();
        for object in objects {
            state.insert(object);
        }
        state
    }

    /// Inserts or replaces one object; returns whether it replaced one with the same name.
    pub fn insert(&mut self, object: Object) -> bool {
        match object {
            Object::Namespace(ns) => {
                let name = ns.metadata.name.clone().unwrap_or_default();
                self.namespaces.insert(name, ns).is_some()
            }
            Object::Pod(pod) => self.pods.insert(pod_ref(&pod), pod).is_some(),
            Object::NetworkPolicy(policy) => self.policies.insert(policy_ref(&policy), policy).is_some(),
            Object::Service(service) => self.services.insert(service_ref(&service), service).is_some(),
            Object::ClusterNetworkPolicy(policy) => {
                self.cluster_policies.insert(cluster_policy_name(&policy), policy).is_some()
            }
        }
    }

    /// A namespace's labels, with `kubernetes.io/metadata.name` always set. A namespace that
    /// pods or policies refer to but that has no object is treated as existing with only
    /// that label.
    pub fn namespace_labels(&self, namespace: &str) -> BTreeMap<String, String> {
        let mut labels = self.namespaces.get(namespace).and_then(|ns| ns.metadata.labels.clone()).unwrap_or_default();
        labels.insert(NAMESPACE_NAME_LABEL.to_owned(), namespace.to_owned());
        labels
    }
}

/// Reads every `*.yaml`, `*.yml` and `*.json` file of `dir` (not recursive, dotfiles
/// skipped, in name order). Unreadable directories fail; everything wrong inside a file is
/// a [`Problem`] and the rest still loads.
pub fn load_manifest_dir(dir: &Path) -> Result<(ClusterState, Vec<Problem>), AgentError> {
    let read_err = |source| AgentError::Read { path: dir.to_owned(), source };
    let mut files: Vec<PathBuf> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_err)? {
        let path = entry.map_err(read_err)?.path();
        if is_manifest_file(&path) && path.is_file() {
            files.push(path);
        }
    }
    files.sort();

    let mut state = ClusterState::default();
    let mut problems = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).map_err(|source| AgentError::Read { path: file.clone(), source })?;
        let (objects, file_problems) = parse_manifest_str(&file.display().to_string(), is_json(file), &text);
        problems.extend(file_problems);
        for object in objects {
            let described = object.describe();
            if object.is_unnamed() {
                problems.push(unnamed_problem(&object, file));
                continue;
            }
            if state.insert(object) {
                problems.push(Problem::new(
                    described,
                    "",
                    format!("defined again in {}; the later definition wins", file.display()),
                ));
            }
        }
    }
    Ok((state, problems))
}

fn unnamed_problem(object: &Object, file: &Path) -> Problem {
    Problem::new(format!("{} in {}", object.kind(), file.display()), "metadata.name", "missing; object skipped")
}

/// A file the manifest loaders read: `*.yaml`, `*.yml` or `*.json`, not a dotfile.
pub fn is_manifest_file(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else { return false };
    !name.starts_with('.')
        && path.extension().and_then(|e| e.to_str()).is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
}

fn is_json(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "json")
}

/// Strict per-file loader for the agent, which keeps the last good version of a file that
/// breaks: any document that fails to parse fails the whole file, and so does an object
/// without a name (it would be stored under the empty name, where a second nameless object
/// of its kind would silently replace it). Objects of other kinds are skipped silently.
pub fn load_manifest_file(path: &Path) -> Result<Vec<Object>, AgentError> {
    let text = std::fs::read_to_string(path).map_err(|source| AgentError::Read { path: path.to_owned(), source })?;
    let (objects, mut problems) = parse_manifest_str(&path.display().to_string(), is_json(path), &text);
    problems.extend(objects.iter().filter(|o| o.is_unnamed()).map(|o| unnamed_problem(o, path)));
    let broken: Vec<String> =
        problems.iter().filter(|p| !p.message.starts_with(UNSUPPORTED_KIND)).map(ToString::to_string).collect();
    if broken.is_empty() {
        Ok(objects)
    } else {
        Err(AgentError::Manifest { path: path.to_owned(), what: broken.join("; ") })
    }
}

const UNSUPPORTED_KIND: &str = "unsupported kind";

/// Parses the text of one manifest file. `source` names it in problems; `json` selects the
/// JSON parser (a stream of JSON values), otherwise multi-document YAML.
pub fn parse_manifest_str(source: &str, json: bool, text: &str) -> (Vec<Object>, Vec<Problem>) {
    let mut objects = Vec::new();
    let mut problems = Vec::new();
    let mut push = |index: usize, document: Result<Value, String>| {
        let place = format!("{source} document {}", index + 1);
        match document {
            Ok(Value::Null) => {} // an empty document, such as a trailing `---`
            Ok(value) => decode_document(&place, value, None, &mut objects, &mut problems),
            Err(message) => problems.push(Problem::new(place, "", message)),
        }
    };
    if json {
        for (index, document) in serde_json::Deserializer::from_str(text).into_iter::<Value>().enumerate() {
            let failed = document.is_err();
            push(index, document.map_err(|e| format!("invalid JSON: {e}")));
            if failed {
                break; // the stream cannot resynchronise after a syntax error
            }
        }
    } else {
        for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let value = serde_path_to_error::deserialize::<_, Value>(document)
                .map_err(|e| format!("invalid YAML at {}: {}", e.path(), e.inner()));
            let failed = value.is_err();
            push(index, value);
            if failed {
                break;
            }
        }
    }
    (objects, problems)
}

/// Dispatches one document (or `List` item) on apiVersion and kind. `implied_kind` is the
/// item kind of a typed list (`PodList` items may omit apiVersion and kind).
fn decode_document(
    place: &str,
    mut value: Value,
    implied_kind: Option<(&str, &str)>,
    objects: &mut Vec<Object>,
    problems: &mut Vec<Problem>,
) {
    let Value::Object(map) = &mut value else {
        problems.push(Problem::new(place, "", "not an object"));
        return;
    };
    if let Some((api_version, kind)) = implied_kind {
        map.entry("apiVersion").or_insert_with(|| Value::from(api_version));
        map.entry("kind").or_insert_with(|| Value::from(kind));
    }
    let api_version = map.get("apiVersion").and_then(Value::as_str).unwrap_or("").to_owned();
    let kind = map.get("kind").and_then(Value::as_str).unwrap_or("").to_owned();
    let name = map.get("metadata").and_then(|m| m.get("name")).and_then(Value::as_str).map(|n| {
        match map.get("metadata").and_then(|m| m.get("namespace")).and_then(Value::as_str) {
            Some(ns) => format!("{ns}/{n}"),
            None => n.to_owned(),
        }
    });
    let described = match &name {
        Some(name) => format!("{place} ({kind} {name})"),
        None => format!("{place} ({kind})"),
    };

    match (api_version.as_str(), kind.as_str()) {
        ("v1", "Namespace") => decode::<Namespace>(&described, value, problems).map(|n| Object::Namespace(Arc::new(n))),
        ("v1", "Pod") => decode::<Pod>(&described, value, problems).map(|p| Object::Pod(Arc::new(p))),
        ("v1", "Service") => decode::<Service>(&described, value, problems).map(|s| Object::Service(Arc::new(s))),
        // A Service's Endpoints are kube-proxy's input; egress is judged after its translation.
        ("v1", "Endpoints") => None,
        ("networking.k8s.io/v1", "NetworkPolicy") => {
            decode::<NetworkPolicy>(&described, value, problems).map(|p| Object::NetworkPolicy(Arc::new(p)))
        }
        ("policy.networking.k8s.io/v1alpha2", "ClusterNetworkPolicy") => {
            decode::<ClusterNetworkPolicy>(&described, value, problems).map(|p| Object::ClusterNetworkPolicy(Arc::new(p)))
        }
        (_, list) if list.ends_with("List") => {
            let item_kind = list.strip_suffix("List").filter(|k| !k.is_empty()).map(|k| (api_version.as_str(), k));
            match map.remove("items") {
                Some(Value::Array(items)) => {
                    for (index, item) in items.into_iter().enumerate() {
                        decode_document(&format!("{place} items[{index}]"), item, item_kind, objects, problems);
                    }
                }
                Some(Value::Null) | None => {}
                Some(_) => problems.push(Problem::new(described, "items", "not a list")),
            }
            None
        }
        ("", _) | (_, "") => {
            problems.push(Problem::new(described, "", "missing apiVersion or kind"));
            None
        }
        _ => {
            problems.push(Problem::new(described, "", format!("{UNSUPPORTED_KIND} {api_version} {kind}; ignored")));
            None
        }
    }
    .into_iter()
    .for_each(|object| objects.push(object));
}

fn decode<T: DeserializeOwned>(described: &str, value: Value, problems: &mut Vec<Problem>) -> Option<T> {
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(object) => Some(object),
        Err(error) => {
            let path = error.path().to_string();
            let field = if path == "." { String::new() } else { path };
            problems.push(Problem::new(described, field, error.into_inner().to_string()));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_yaml(text: &str) -> (Vec<Object>, Vec<Problem>) {
        parse_manifest_str("test.yaml", false, text)
    }

    #[test]
    fn multi_document_yaml_and_empty_documents() {
        let (objects, problems) = parse_yaml(
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n---\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x}\n---\n",
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(objects.iter().map(Object::describe).collect::<Vec<_>>(), ["Namespace x", "Pod x/a"]);
    }

    #[test]
    fn kubectl_list_and_typed_list() {
        let (objects, problems) = parse_yaml(
            "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Pod\n  metadata: {name: a}\n- apiVersion: networking.k8s.io/v1\n  kind: NetworkPolicy\n  metadata: {name: p, namespace: y}\n  spec: {podSelector: {}}\n---\napiVersion: v1\nkind: PodList\nitems:\n- metadata: {name: b, namespace: z}\n",
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            objects.iter().map(Object::describe).collect::<Vec<_>>(),
            ["Pod default/a", "NetworkPolicy y/p", "Pod z/b"]
        );
    }

    #[test]
    fn json_stream() {
        let (objects, problems) = parse_manifest_str(
            "t.json",
            true,
            r#"{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"x"}} {"apiVersion":"v1","kind":"List","items":[{"apiVersion":"v1","kind":"Pod","metadata":{"name":"a","namespace":"x"}}]}"#,
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(objects.len(), 2);
    }

    #[test]
    fn bad_document_names_file_index_object_and_field() {
        let (objects, problems) = parse_yaml(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: ok}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bad, namespace: x}\nspec:\n  ingress:\n  - ports:\n    - port: 80\n      endPort: high\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n",
        );
        assert_eq!(objects.len(), 1);
        assert_eq!(problems.len(), 2, "{problems:?}");
        let bad = &problems[0];
        assert_eq!(bad.object, "test.yaml document 2 (NetworkPolicy x/bad)");
        assert_eq!(bad.field, "spec.ingress[0].ports[0].endPort");
        assert!(problems[1].message.contains("unsupported kind apps/v1 Deployment"), "{}", problems[1]);
    }

    #[test]
    fn cluster_network_policies_load() {
        let (objects, problems) = parse_yaml(
            "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: guard}\nspec:\n  tier: Admin\n  priority: 5\n  subject: {namespaces: {}}\n  ingress: [{action: Deny, from: [{namespaces: {}}]}]\n---\napiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: bad}\nspec: {tier: Admin, priority: high, subject: {}}\n",
        );
        assert_eq!(objects.iter().map(Object::describe).collect::<Vec<_>>(), ["ClusterNetworkPolicy guard"]);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].field, "spec.priority");
        let state = ClusterState::from_objects(objects);
        assert_eq!(state.cluster_policies["guard"].spec.priority, 5);
    }

    const NAMELESS_CNP: &str = "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {labels: {a: b}}\nspec: {tier: Admin, priority: 1, subject: {namespaces: {}}}\n";
    const NAMED_CNP: &str = "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: guard}\nspec: {tier: Baseline, priority: 1, subject: {namespaces: {}}}\n";

    fn scratch_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("state-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    #[test]
    fn a_nameless_cluster_policy_is_reported_by_metadata_name_and_skipped() {
        let dir = scratch_dir("nameless");
        std::fs::write(dir.join("a.yaml"), format!("{NAMELESS_CNP}---\n{NAMED_CNP}")).expect("write");
        let (state, problems) = load_manifest_dir(&dir).expect("loads");
        assert_eq!(state.cluster_policies.keys().collect::<Vec<_>>(), ["guard"]);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!((problems[0].field.as_str(), problems[0].message.as_str()), ("metadata.name", "missing; object skipped"));
        assert!(problems[0].object.starts_with("ClusterNetworkPolicy in "), "{}", problems[0]);
        // The agent's strict loader fails the whole file (its last good version stays applied).
        let error = load_manifest_file(&dir.join("a.yaml")).expect_err("a nameless object fails the file").to_string();
        assert!(error.contains("metadata.name") && error.contains("ClusterNetworkPolicy"), "{error}");
        std::fs::write(dir.join("a.yaml"), NAMED_CNP).expect("write");
        let objects = load_manifest_file(&dir.join("a.yaml")).expect("a named one loads");
        assert_eq!(objects.iter().map(Object::describe).collect::<Vec<_>>(), ["ClusterNetworkPolicy guard"]);
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn yaml_syntax_error_is_a_problem() {
        let (objects, problems) = parse_yaml("apiVersion: v1\nkind: Namespace\nmetadata: {name: [\n");
        assert!(objects.is_empty());
        assert_eq!(problems.len(), 1);
        assert!(problems[0].object.starts_with("test.yaml document 1"));
    }

    #[test]
    fn namespace_labels_always_carry_the_name() {
        let (objects, _) = parse_yaml("apiVersion: v1\nkind: Namespace\nmetadata: {name: x, labels: {team: a}}\n");
        let state = ClusterState::from_objects(objects);
        assert_eq!(state.namespace_labels("x").get(NAMESPACE_NAME_LABEL).map(String::as_str), Some("x"));
        assert_eq!(state.namespace_labels("x").get("team").map(String::as_str), Some("a"));
        assert_eq!(state.namespace_labels("absent").len(), 1);
    }

    #[test]
    fn directory_loading_and_strict_file_loading() {
        let dir = std::env::temp_dir().join(format!("policy-agent-state-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.yaml"), "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x}\n").unwrap();
        std::fs::write(
            dir.join("b.json"),
            r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"a","namespace":"x"},"spec":{"containers":[]}}"#,
        )
        .unwrap();
        std::fs::write(dir.join("c.yml"), "apiVersion: v1\nkind: Pod\nmetadata: {name: c}\nspec: 7\n").unwrap();
        std::fs::write(dir.join(".hidden.yaml"), "garbage: [").unwrap();
        std::fs::write(dir.join("notes.txt"), "garbage: [").unwrap();
        let (state, problems) = load_manifest_dir(&dir).unwrap();
        assert_eq!(state.pods.len(), 1);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].message.contains("later definition wins"));
        assert_eq!(problems[1].field, "spec");
        assert!(load_manifest_file(&dir.join("a.yaml")).is_ok());
        assert!(matches!(load_manifest_file(&dir.join("c.yml")), Err(AgentError::Manifest { .. })));
        assert!(load_manifest_dir(&dir.join("missing")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
