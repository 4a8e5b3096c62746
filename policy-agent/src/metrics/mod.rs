//! What the agent shows: a shared view that the sync loop updates, served as Prometheus
//! metrics (`/metrics`, rendered by prometheus-client in [`render`]), health (`/healthz`,
//! `/readyz`) and a JSON status (`/status`, read by `policy-agent status`) by a hyper server
//! ([`http`]).
//!
//! What names pods, addresses, policies or namespaces (`/status`, per-pod counters, coverage)
//! is served only on a loopback address: a listener on any other address (the node's, for
//! Prometheus and the kubelet's probes) serves health and counters without such labels. No
//! request walks a map: the conntrack map is counted by a background thread.

mod http;
mod render;

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use policy_common::{
    Direction,
    conntrack::{CtKey, CtValue},
    counters::{Counter, Reason},
};
use serde::Serialize;

pub use self::http::{bind, serve};
use crate::datapath::{PinLayout, map_name};

/// A histogram with fixed buckets, observed in seconds (a prometheus-client histogram: clones
/// share the counts).
#[derive(Clone, Debug)]
pub struct Histogram(prometheus_client::metrics::histogram::Histogram);

/// From 100 µs to 10 s: map syncs take milliseconds, enforcement latency up to a second.
pub const LATENCY_BUCKETS: &[f64] = &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self(prometheus_client::metrics::histogram::Histogram::new(bounds.iter().copied()))
    }

    pub fn observe(&self, value: Duration) {
        self.0.observe(value.as_secs_f64());
    }
}

/// Pods of one namespace on this node, by how policies isolate them in one direction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CoverageCounts {
    /// No policy selects the pod for this direction.
    pub unprotected: u64,
    /// Selected, with at least one allowed peer.
    pub isolated: u64,
    /// Selected, but its policies allow no peer at all.
    pub isolated_nothing_allowed: u64,
}

/// Policy coverage of one namespace's pods on this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceCoverage {
    pub namespace: String,
    pub ingress: CoverageCounts,
    pub egress: CoverageCounts,
    pub default_deny_ingress: bool,
    pub default_deny_egress: bool,
}

/// One local pod as the agent handles it.
#[derive(Clone, Debug, Serialize)]
pub struct EndpointStatus {
    pub pod: String,
    pub interface: Option<String>,
    pub ifindex: Option<u32>,
    pub endpoint_id: Option<u32>,
    pub ipv4: Option<String>,
    pub ipv6: Option<String>,
    /// Identity of the pod's addresses (IPv4 first).
    pub identities: Vec<u32>,
    /// Whether the classifier judges the direction (a NetworkPolicy isolates it or a
    /// ClusterNetworkPolicy applies).
    pub ingress_isolated: bool,
    pub egress_isolated: bool,
    /// The ClusterNetworkPolicies whose subject is the pod, by tier and precedence.
    pub ingress_cluster_policies: Vec<String>,
    pub egress_cluster_policies: Vec<String>,
    /// Policy map entries of this endpoint.
    pub policy_entries: usize,
    pub attached: bool,
    /// Program ids attached (from_pod, to_pod).
    pub programs: Vec<u32>,
    /// Why the pod is not (fully) enforced, if it is not.
    pub error: Option<String>,
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct MapFill {
    pub entries: usize,
    pub capacity: u32,
}

/// Everything the endpoints serve, updated after each sync.
#[derive(Debug, Serialize)]
pub struct AgentView {
    pub node: String,
    pub ready: bool,
    #[serde(skip)]
    pub last_loop: Option<Instant>,
    pub endpoints: Vec<EndpointStatus>,
    pub maps: BTreeMap<&'static str, MapFill>,
    pub identities: usize,
    pub problems: Vec<String>,
    /// Passes of the agent's loop, including those that found nothing to do: a pass that
    /// starts after a change has seen it (tests wait on this).
    pub passes: u64,
    /// Passes that compiled or wrote something.
    pub syncs: u64,
    /// Passes skipped because the node's addresses or routes could not be read.
    pub skipped_passes: u64,
    /// The conntrack map's fill, as the background count last found it.
    #[serde(skip)]
    pub conntrack: Option<MapFill>,
    pub sync_failures: u64,
    /// Incremental compiles checked against a full one, and those that differed.
    pub incremental_checks: u64,
    pub incremental_mismatches: u64,
    #[serde(skip)]
    pub sync_duration: Histogram,
    #[serde(skip)]
    pub enforcement_latency: Histogram,
    /// For flow logs and counter labels.
    #[serde(skip)]
    pub directory: Directory,
    /// Per-namespace policy coverage of this node's pods (loopback metrics only: which
    /// namespaces lack a default deny is reconnaissance data).
    #[serde(skip)]
    pub coverage: Vec<NamespaceCoverage>,
}

/// Names for what the datapath reports in numbers.
#[derive(Clone, Debug, Default)]
pub struct Directory {
    /// Shared with the agent's compilation (it has an entry for every pod address of the cluster).
    pub pods_by_ip: std::sync::Arc<BTreeMap<IpAddr, String>>,
    pub pods_by_endpoint: BTreeMap<u32, String>,
    pub cookies: BTreeMap<u32, String>,
    /// The policies isolating an endpoint in a direction (ClusterNetworkPolicies too): what
    /// a drop no entry decided is attributed to.
    pub isolated_by: BTreeMap<(u32, Direction), String>,
}

impl AgentView {
    pub fn new(node: &str) -> Self {
        Self {
            node: node.to_owned(),
            ready: false,
            last_loop: None,
            endpoints: Vec::new(),
            maps: BTreeMap::new(),
            identities: 0,
            problems: Vec::new(),
            passes: 0,
            syncs: 0,
            skipped_passes: 0,
            conntrack: None,
            sync_failures: 0,
            incremental_checks: 0,
            incremental_mismatches: 0,
            sync_duration: Histogram::new(LATENCY_BUCKETS),
            enforcement_latency: Histogram::new(LATENCY_BUCKETS),
            directory: Directory::default(),
            coverage: Vec::new(),
        }
    }
}

pub type SharedView = Arc<RwLock<AgentView>>;

/// Reads a view, whatever a panicking writer left behind.
pub fn read(view: &SharedView) -> std::sync::RwLockReadGuard<'_, AgentView> {
    view.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub fn write(view: &SharedView) -> std::sync::RwLockWriteGuard<'_, AgentView> {
    view.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What a listener may show.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exposure {
    /// Everything: only on loopback.
    Full,
    /// Health and counters without pod, address, policy or namespace labels.
    Counters,
}

impl Exposure {
    /// What a listener bound to `addr` may show.
    pub fn of(addr: std::net::SocketAddr) -> Self {
        if addr.ip().is_loopback() { Self::Full } else { Self::Counters }
    }
}

/// The per-packet counters, read at each scrape (array lookups, bounded by the endpoints).
pub struct PinnedReaders {
    counters: Option<PerCpuArray<MapData, Counter>>,
}

impl std::fmt::Debug for PinnedReaders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedReaders").field("counters", &self.counters.is_some()).finish()
    }
}

impl PinnedReaders {
    pub fn open(pins: &PinLayout) -> Self {
        let counters = MapData::from_pin(pins.map(map_name::COUNTERS)).ok().and_then(|data| PerCpuArray::try_from(Map::PerCpuArray(data)).ok());
        Self { counters }
    }

    /// Packets by endpoint id (0: no endpoint), direction and reason, for the endpoints
    /// given and endpoint 0; counters at zero are left out.
    fn verdicts(&self, endpoints: impl Iterator<Item = u32>) -> Vec<render::VerdictCount> {
        let Some(counters) = &self.counters else { return Vec::new() };
        let mut out = Vec::new();
        for endpoint in endpoints.chain([0]) {
            for direction in [Direction::Ingress, Direction::Egress] {
                for reason in Reason::ALL {
                    let Ok(values) = counters.get(&reason.slot(endpoint, direction), 0) else { continue };
                    let packets: u64 = values.iter().map(|c| c.packets).sum();
                    if packets > 0 {
                        out.push(render::VerdictCount { endpoint, direction, reason, packets });
                    }
                }
            }
        }
        out
    }
}

/// How often the conntrack map is counted (one syscall per flow: never per request).
const CONNTRACK_COUNT_PERIOD: Duration = Duration::from_secs(10);

/// Counts the conntrack map now and every [`CONNTRACK_COUNT_PERIOD`], on a thread of its
/// own, into the view's map fill.
pub fn spawn_conntrack_counter(view: SharedView, pins: PinLayout) {
    std::thread::spawn(move || {
        let Some((map, capacity)) = MapData::from_pin(pins.map(map_name::CONNTRACK)).ok().and_then(|data| {
            let capacity = data.info().ok()?.max_entries();
            Some((HashMap::<MapData, CtKey, CtValue>::try_from(Map::LruHashMap(data)).ok()?, capacity))
        }) else {
            tracing::warn!("cannot open the conntrack map; its fill is not reported");
            return;
        };
        loop {
            let entries = map.keys().filter(Result::is_ok).count();
            let fill = MapFill { entries, capacity };
            {
                // Never hold the view across the sleep.
                let mut guard = write(&view);
                guard.conntrack = Some(fill);
                guard.maps.insert(map_name::CONNTRACK, fill);
            }
            std::thread::sleep(CONNTRACK_COUNT_PERIOD);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_loopback_listeners_show_everything() {
        let (_l, exposure) = bind("127.0.0.1:0", "--metrics-addr", false).await.unwrap();
        assert_eq!(exposure, Exposure::Full);
        let (_l, exposure) = bind("0.0.0.0:0", "--metrics-addr", false).await.unwrap();
        assert_eq!(exposure, Exposure::Counters);
        assert!(bind("127.0.0.1:0", "--status-addr", true).await.is_ok());
        let refused = bind("0.0.0.0:0", "--status-addr", true).await.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(refused.contains("loopback"), "{refused}");
    }
}
