//! The addresses whose traffic kube-proxy translates: egress towards them is deferred by the
//! classifier and judged after the translation (see `policy_common::service`). They are the
//! `--service-cidr` ranges plus every ClusterIP, externalIP and load-balancer ingress IP of
//! the cluster's Services, so a Service outside the configured range (an externalIP, or a
//! range the operator forgot) is not judged as itself either.

use std::{collections::BTreeSet, net::IpAddr};

use k8s_openapi::api::core::v1::Service;

use crate::{resolve::IpPrefix, state::ClusterState};

/// The ranges and addresses to defer, in a stable order. Headless Services ("None") and
/// addresses that do not parse (the API server validates them) are skipped.
pub fn deferred_nets(state: &ClusterState, ranges: &[IpPrefix]) -> BTreeSet<IpPrefix> {
    let addresses = state.services.values().flat_map(|s| addresses(s)).map(IpPrefix::host);
    ranges.iter().copied().chain(addresses).collect()
}

fn addresses(service: &Service) -> Vec<IpAddr> {
    let texts = service
        .spec
        .iter()
        .flat_map(|s| s.cluster_ip.iter().chain(s.cluster_ips.iter().flatten()).chain(s.external_ips.iter().flatten()))
        .chain(service.status.iter().flat_map(|s| s.load_balancer.iter().flat_map(|lb| lb.ingress.iter().flatten().filter_map(|i| i.ip.as_ref()))));
    texts.filter_map(|t| t.parse().ok()).collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::*;
    use crate::state::Object;

    fn service(value: serde_json::Value) -> Object {
        Object::Service(Arc::new(serde_json::from_value(value).expect("service")))
    }

    #[test]
    fn cluster_external_and_load_balancer_addresses_with_the_ranges() {
        let state = ClusterState::from_objects([
            service(json!({"metadata": {"name": "web", "namespace": "a"},
                "spec": {"clusterIP": "198.19.0.10", "clusterIPs": ["198.19.0.10", "2001:2:0:ff::10"], "externalIPs": ["198.18.200.7"]},
                "status": {"loadBalancer": {"ingress": [{"ip": "198.18.201.1"}, {"hostname": "lb.example"}]}}})),
            service(json!({"metadata": {"name": "headless", "namespace": "a"}, "spec": {"clusterIP": "None"}})),
            service(json!({"metadata": {"name": "no-spec", "namespace": "a"}})),
        ]);
        let range = IpPrefix::parse("198.19.0.0/24").expect("range");
        let nets: Vec<String> = deferred_nets(&state, &[range]).iter().map(ToString::to_string).collect();
        assert_eq!(nets, ["198.18.200.7/32", "198.18.201.1/32", "198.19.0.0/24", "198.19.0.10/32", "2001:2:0:ff::10/128"]);
        // What the watch stores (the projection) gives the same addresses.
        let projected = ClusterState::from_objects(
            state.services.values().map(|s| Object::Service(Arc::new(crate::watch::project::project_service(s)))),
        );
        assert_eq!(deferred_nets(&projected, &[range]), deferred_nets(&state, &[range]));
    }
}
