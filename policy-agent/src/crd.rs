//! `ClusterNetworkPolicy` (sigs.k8s.io network-policy-api, `policy.networking.k8s.io/v1alpha2`):
//! the types the agent reads, and from which the CRD manifest under `manifests/install/` is
//! generated (`POLICY_UPDATE_CRD=1 cargo test -p policy-agent --lib crd`).
//!
//! Fields are kept as the API spells them (`action` and `tier` as strings, every list
//! optional), so that an object the CRD's validation would refuse still decodes and the
//! compiler can report it by field and fail closed, as the API asks of implementations.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A cluster-scoped policy in the Admin tier (before NetworkPolicy) or the Baseline tier
/// (after it).
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "policy.networking.k8s.io",
    version = "v1alpha2",
    kind = "ClusterNetworkPolicy",
    plural = "clusternetworkpolicies",
    shortname = "cnp",
    // An API server refuses a CRD in a *.k8s.io group without an approval; this is the
    // approved upstream API (the review the upstream CRD names), not a new one.
    annotation("api-approved.kubernetes.io", "https://github.com/kubernetes-sigs/network-policy-api/pull/347"),
    derive = "PartialEq",
    derive = "Default",
    printcolumn = r#"{"name":"Tier","type":"string","jsonPath":".spec.tier"}"#,
    printcolumn = r#"{"name":"Priority","type":"integer","jsonPath":".spec.priority"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ClusterNetworkPolicySpec {
    /// `Admin` or `Baseline`.
    #[schemars(schema_with = "tier_schema")]
    pub tier: String,
    /// 0-1000; a lower number wins within a tier.
    #[schemars(range(min = 0, max = 1000))]
    pub priority: i32,
    pub subject: Subject,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 25))]
    pub ingress: Option<Vec<IngressRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 25))]
    pub egress: Option<Vec<EgressRule>>,
}

/// The pods a policy applies to: exactly one of the fields.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("minProperties" = 1, "maxProperties" = 1))]
pub struct Subject {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<NamespacedPod>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NamespacedPod {
    pub namespace_selector: LabelSelector,
    pub pod_selector: LabelSelector,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = require_from)]
pub struct IngressRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 100))]
    pub name: Option<String>,
    /// `Accept`, `Deny` or `Pass`.
    #[schemars(schema_with = "action_schema")]
    pub action: String,
    /// Required by the API (see [`require_peers`]), yet decoded when missing so the compiler
    /// can report it.
    #[serde(default)]
    #[schemars(length(min = 1, max = 25))]
    pub from: Vec<IngressPeer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 25))]
    pub protocols: Option<Vec<Protocol>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = require_to)]
pub struct EgressRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 100))]
    pub name: Option<String>,
    #[schemars(schema_with = "action_schema")]
    pub action: String,
    /// Required by the API (see [`require_peers`]), yet decoded when missing so the compiler
    /// can report it.
    #[serde(default)]
    #[schemars(length(min = 1, max = 25))]
    pub to: Vec<EgressPeer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 25))]
    pub protocols: Option<Vec<Protocol>>,
}

/// Exactly one of the fields.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("minProperties" = 1, "maxProperties" = 1))]
pub struct IngressPeer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<NamespacedPod>,
}

/// Exactly one of the fields. `nodes` and `domainNames` are experimental in the API and not
/// enforced here: a rule using them fails closed (see `compile::cluster_policy`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("minProperties" = 1, "maxProperties" = 1))]
pub struct EgressPeer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<NamespacedPod>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<LabelSelector>,
    /// CIDRs; they match pod addresses too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 25))]
    pub networks: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 25))]
    pub domain_names: Option<Vec<String>>,
}

/// Exactly one of the fields.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("minProperties" = 1, "maxProperties" = 1))]
pub struct Protocol {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<ProtocolPort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp: Option<ProtocolPort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sctp: Option<ProtocolPort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_named_port: Option<String>,
}

/// The API requires `destinationPort` (`tcp: {}` is refused); a manifest file without it
/// still decodes, and then means every port of the protocol.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("minProperties" = 1))]
pub struct ProtocolPort {
    /// Missing: every port of the protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_port: Option<Port>,
}

/// Exactly one of the fields.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("minProperties" = 1, "maxProperties" = 1))]
pub struct Port {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub number: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<PortRange>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortRange {
    #[schemars(range(min = 1, max = 65535))]
    pub start: i32,
    #[schemars(range(min = 1, max = 65535))]
    pub end: i32,
}

/// Makes a rule's peer list required in the CRD and drops the empty `default` that
/// `#[serde(default)]` puts in the schema: an API server checks a default against the schema
/// (a 1.20 one refuses a CRD whose default its own `minItems: 1` refuses), and would
/// otherwise fill in `[]` for a missing list.
fn require_peers(schema: &mut schemars::Schema, field: &str) {
    if let Some(property) = schema.get_mut("properties").and_then(|p| p.get_mut(field)).and_then(serde_json::Value::as_object_mut) {
        property.remove("default");
    }
    let required = schema.ensure_object().entry("required").or_insert_with(|| serde_json::Value::Array(Vec::new()));
    if let Some(required) = required.as_array_mut().filter(|r| !r.iter().any(|f| f == field)) {
        required.push(field.into());
    }
}

fn require_from(schema: &mut schemars::Schema) {
    require_peers(schema, "from");
}

fn require_to(schema: &mut schemars::Schema) {
    require_peers(schema, "to");
}

fn tier_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({ "type": "string", "enum": ["Admin", "Baseline"] })
}

fn action_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({ "type": "string", "enum": ["Accept", "Deny", "Pass"] })
}

#[cfg(test)]
mod tests {
    use kube::CustomResourceExt;

    use super::*;

    const CRD_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/install/05-crd-clusternetworkpolicies.yaml");

    fn generated() -> String {
        let crd = serde_yaml::to_string(&ClusterNetworkPolicy::crd()).expect("the CRD serializes");
        format!("# Generated from policy-agent/src/crd.rs: POLICY_UPDATE_CRD=1 cargo test -p policy-agent --lib crd\n{crd}")
    }

    #[test]
    fn the_committed_crd_manifest_is_generated_from_the_types() {
        let want = generated();
        if std::env::var_os("POLICY_UPDATE_CRD").is_some() {
            std::fs::write(CRD_PATH, &want).expect("write the CRD manifest");
        }
        let have = std::fs::read_to_string(CRD_PATH).unwrap_or_default();
        assert!(have == want, "{CRD_PATH} is stale: run POLICY_UPDATE_CRD=1 cargo test -p policy-agent --lib crd");
    }

    #[test]
    fn an_upstream_example_decodes() {
        let yaml = r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: deny-to-monitoring}
spec:
  tier: Admin
  priority: 10
  subject: {namespaces: {}}
  ingress:
  - name: prometheus
    action: Accept
    from: [{pods: {namespaceSelector: {matchLabels: {team: monitoring}}, podSelector: {matchLabels: {app: prometheus}}}}]
    protocols: [{tcp: {destinationPort: {number: 9090}}}, {udp: {destinationPort: {range: {start: 53, end: 54}}}}, {destinationNamedPort: web}]
  egress:
  - action: Deny
    to: [{networks: ["198.18.0.0/16"]}]
"#;
        let policy: ClusterNetworkPolicy = serde_yaml::from_str(yaml).expect("decodes");
        assert_eq!(policy.spec.tier, "Admin");
        let rule = &policy.spec.ingress.as_ref().unwrap()[0];
        assert_eq!(rule.protocols.as_ref().unwrap()[1].udp.as_ref().unwrap().destination_port.as_ref().unwrap().range.as_ref().unwrap().end, 54);
        assert_eq!(policy.spec.egress.unwrap()[0].to[0].networks.as_deref(), Some(&["198.18.0.0/16".to_owned()][..]));
    }
}
