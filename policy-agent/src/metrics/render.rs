//! The Prometheus exposition of the view and of the datapath's verdict counters, encoded by
//! prometheus-client from collectors that read both at each scrape (nothing is copied into
//! registered metrics between scrapes, so nothing goes stale).

use std::{
    collections::BTreeMap,
    fmt,
    sync::{Arc, Mutex, PoisonError},
};

use policy_common::{Direction, counters::Reason};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::{Registry, Unit},
};

use super::{AgentView, CoverageCounts, Exposure, Histogram, NamespaceCoverage, PinnedReaders, SharedView, read};

/// One verdict counter of the datapath, summed over CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerdictCount {
    /// The endpoint id (0: traffic of no local endpoint).
    pub endpoint: u32,
    pub direction: Direction,
    pub reason: Reason,
    pub packets: u64,
}

/// Where verdict counters come from: the pinned map (fixed values in unit tests).
pub(super) trait VerdictSource: fmt::Debug + Send + Sync + 'static {
    fn counts(&self, view: &AgentView) -> Vec<VerdictCount>;
}

impl VerdictSource for Mutex<PinnedReaders> {
    fn counts(&self, view: &AgentView) -> Vec<VerdictCount> {
        let readers = self.lock().unwrap_or_else(PoisonError::into_inner);
        readers.verdicts(view.directory.pods_by_endpoint.keys().copied())
    }
}

/// The text formats `/metrics` speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum TextFormat {
    /// Prometheus text 0.0.4: what every scraper and `curl` reads.
    Prometheus,
    /// OpenMetrics 1.0.0 (with `# UNIT` and `# EOF`), for clients that ask for it.
    OpenMetrics,
}

impl TextFormat {
    /// OpenMetrics when the `Accept` header names it (Prometheus's does), else Prometheus text.
    pub(super) fn negotiate(accept: Option<&str>) -> Self {
        if accept.is_some_and(|a| a.contains("application/openmetrics-text")) { Self::OpenMetrics } else { Self::Prometheus }
    }

    pub(super) fn content_type(self) -> &'static str {
        match self {
            Self::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// The registry one listener serves on `/metrics`: its collectors read the view and the
/// counters map at each scrape, and show only what `exposure` allows.
pub(super) fn registry(view: SharedView, source: Arc<dyn VerdictSource>, exposure: Exposure) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(VerdictCollector { view: view.clone(), source, exposure }));
    registry.register_collector(Box::new(ViewCollector { view, exposure }));
    registry
}

pub(super) fn render(registry: &Registry, format: TextFormat) -> Result<String, fmt::Error> {
    let mut out = String::new();
    match format {
        TextFormat::Prometheus => prometheus_client::encoding::prometheus_text::encode(&mut out, registry)?,
        TextFormat::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, registry)?,
    }
    Ok(out)
}

#[derive(Debug)]
struct VerdictCollector {
    view: SharedView,
    source: Arc<dyn VerdictSource>,
    exposure: Exposure,
}

impl Collector for VerdictCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let totals = {
            let view = read(&self.view);
            verdict_totals(&view, &self.source.counts(&view), self.exposure)
        };
        let help = match self.exposure {
            Exposure::Full => "Packets judged by the classifier, by pod, direction, verdict and reason.",
            Exposure::Counters => "Packets judged by the classifier, by direction, verdict and reason.",
        };
        let mut family = encoder.encode_descriptor("policy_verdicts", help, None, MetricType::Counter)?;
        for (labels, packets) in &totals {
            ConstCounter::new(*packets).encode(family.encode_family(labels)?)?;
        }
        Ok(())
    }
}

type Labels = Vec<(&'static str, String)>;

/// Sums the counters by the labels the exposure allows (the pod only with
/// [`Exposure::Full`]): without it, every endpoint's counters of a reason are one series.
fn verdict_totals(view: &AgentView, counts: &[VerdictCount], exposure: Exposure) -> BTreeMap<Labels, u64> {
    let mut totals = BTreeMap::new();
    for count in counts {
        let mut labels = Vec::with_capacity(4);
        if exposure == Exposure::Full {
            labels.push(("pod", view.directory.pods_by_endpoint.get(&count.endpoint).cloned().unwrap_or_default()));
        }
        let direction = if count.direction == Direction::Ingress { "ingress" } else { "egress" };
        labels.push(("direction", direction.to_owned()));
        labels.push(("verdict", if count.reason.is_drop() { "drop" } else { "pass" }.to_owned()));
        labels.push(("reason", count.reason.name().to_owned()));
        *totals.entry(labels).or_default() += count.packets;
    }
    totals
}

#[derive(Debug)]
struct ViewCollector {
    view: SharedView,
    exposure: Exposure,
}

impl Collector for ViewCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let view = read(&self.view);
        encode_maps(&mut encoder, &view)?;
        encode_sync_state(&mut encoder, &view)?;
        encode_histogram(&mut encoder, "policy_sync_duration", "Time to compile and write the maps.", &view.sync_duration)?;
        encode_histogram(
            &mut encoder,
            "policy_enforcement_latency",
            "Time from an object's change (file modification or watch event) to its enforcement.",
            &view.enforcement_latency,
        )?;
        if self.exposure == Exposure::Full {
            encode_coverage(&mut encoder, &view.coverage)?;
        }
        Ok(())
    }
}

fn encode_maps(encoder: &mut DescriptorEncoder, view: &AgentView) -> fmt::Result {
    let entries = view.maps.iter().map(|(map, fill)| ([("map", *map)], fill.entries));
    gauges(encoder, "policy_map_entries", "Entries in each BPF map.", None, entries)?;
    let ratio = Unit::Other("ratio".to_owned());
    let fill = view.maps.iter().map(|(map, fill)| ([("map", *map)], fill.entries as f64 / f64::from(fill.capacity.max(1))));
    gauges(encoder, "policy_map_fill", "Entries over capacity of each BPF map.", Some(&ratio), fill)
}

fn encode_sync_state(encoder: &mut DescriptorEncoder, view: &AgentView) -> fmt::Result {
    gauge(encoder, "policy_identities", "Security identities in use.", view.identities)?;
    let attached = view.endpoints.iter().filter(|e| e.attached).count();
    let endpoints = [([("state", "attached")], attached), ([("state", "pending")], view.endpoints.len() - attached)];
    gauges(encoder, "policy_endpoints", "Local pods, by whether the classifier is attached.", None, endpoints)?;
    gauge(encoder, "policy_problems", "Objects or fields that could not be applied.", view.problems.len())?;
    counter(encoder, "policy_syncs", "Passes of the sync loop that compiled or wrote the maps.", view.syncs)?;
    counter(encoder, "policy_sync_failures", "Map writes that failed.", view.sync_failures)?;
    counter(encoder, "policy_incremental_checks", "Incremental compiles checked against a full compile.", view.incremental_checks)?;
    counter(
        encoder,
        "policy_incremental_mismatches",
        "Incremental compiles that differed from the full compile (the full result was enforced).",
        view.incremental_mismatches,
    )
}

fn encode_histogram(encoder: &mut DescriptorEncoder, name: &str, help: &str, histogram: &Histogram) -> fmt::Result {
    histogram.0.encode(encoder.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?)
}

fn encode_coverage(encoder: &mut DescriptorEncoder, coverage: &[NamespaceCoverage]) -> fmt::Result {
    let mut pods = Vec::new();
    let mut default_deny = Vec::new();
    for ns in coverage {
        let namespace = ns.namespace.as_str();
        for (direction, counts, deny) in [("ingress", &ns.ingress, ns.default_deny_ingress), ("egress", &ns.egress, ns.default_deny_egress)] {
            for (state, count) in coverage_states(counts) {
                pods.push(([("namespace", namespace), ("direction", direction), ("state", state)], count));
            }
            default_deny.push(([("namespace", namespace), ("direction", direction)], u64::from(deny)));
        }
    }
    let help = "This node's pods by namespace, direction and isolation: unprotected (no policy selects the pod), \
                isolated, or isolated_nothing_allowed (its policies allow no peer).";
    gauges(encoder, "policy_coverage_pods", help, None, pods)?;
    let help = "1 if the namespace has a default-deny policy (selecting all its pods) for the direction, else 0.";
    gauges(encoder, "policy_namespace_default_deny", help, None, default_deny)
}

fn coverage_states(counts: &CoverageCounts) -> [(&'static str, u64); 3] {
    [("unprotected", counts.unprotected), ("isolated", counts.isolated), ("isolated_nothing_allowed", counts.isolated_nothing_allowed)]
}

/// A gauge family: one sample per label set.
fn gauges<L: EncodeLabelSet, V: EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    samples: impl IntoIterator<Item = (L, V)>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    for (labels, value) in samples {
        ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn gauge<V: EncodeGaugeValue>(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: V) -> fmt::Result {
    ConstGauge::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    ConstCounter::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Counter)?)
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeSet,
        sync::{Arc, RwLock},
        time::Duration,
    };

    use super::*;
    use crate::metrics::{EndpointStatus, MapFill};

    /// Verdict counters as a test gives them.
    #[derive(Debug)]
    struct Fixed(Vec<VerdictCount>);

    impl VerdictSource for Fixed {
        fn counts(&self, _view: &AgentView) -> Vec<VerdictCount> {
            self.0.clone()
        }
    }

    fn endpoint(pod: &str, ip: &str, attached: bool) -> EndpointStatus {
        EndpointStatus {
            pod: pod.into(),
            interface: Some(format!("veth-{pod}")),
            ifindex: Some(7),
            endpoint_id: Some(1),
            ipv4: Some(ip.into()),
            ipv6: None,
            identities: vec![256],
            ingress_isolated: true,
            egress_isolated: false,
            ingress_cluster_policies: Vec::new(),
            egress_cluster_policies: Vec::new(),
            policy_entries: 2,
            attached,
            programs: vec![11, 12],
            error: None,
        }
    }

    /// A view with a value in every metric, and counters for two pods and no endpoint.
    fn known() -> (SharedView, Arc<dyn VerdictSource>) {
        let mut view = AgentView::new("node-a");
        view.maps.insert("POLICY_V3", MapFill { entries: 2, capacity: 4 });
        view.maps.insert("IPCACHE", MapFill { entries: 3, capacity: 0 });
        view.endpoints = vec![endpoint("e2e/a", "10.0.0.1", true), endpoint("e2e/b", "10.0.0.2", false)];
        view.identities = 3;
        view.problems = vec!["NetworkPolicy e2e/x: bad port".into()];
        view.syncs = 4;
        view.sync_failures = 1;
        view.sync_duration.observe(Duration::from_millis(3));
        view.enforcement_latency.observe(Duration::from_millis(40));
        view.enforcement_latency.observe(Duration::from_secs(20));
        view.directory.pods_by_endpoint = [(1, "e2e/a".to_owned()), (2, "e2e/b".to_owned())].into();
        view.directory.pods_by_ip = std::sync::Arc::new([("10.0.0.1".parse().unwrap(), "e2e/a".to_owned())].into());
        view.directory.isolated_by = [((2, Direction::Ingress), "e2e/deny-b".to_owned())].into();
        view.coverage = vec![NamespaceCoverage {
            namespace: "e2e".into(),
            ingress: CoverageCounts { unprotected: 1, isolated: 2, isolated_nothing_allowed: 3 },
            egress: CoverageCounts { unprotected: 4, isolated: 0, isolated_nothing_allowed: 0 },
            default_deny_ingress: true,
            default_deny_egress: false,
        }];
        let count = |endpoint, direction, reason, packets| VerdictCount { endpoint, direction, reason, packets };
        let counts = vec![
            count(2, Direction::Ingress, Reason::DropPolicy, 7),
            count(1, Direction::Ingress, Reason::DropPolicy, 5),
            count(2, Direction::Ingress, Reason::DropDeny, 3),
            count(1, Direction::Egress, Reason::PassPolicy, 9),
            count(0, Direction::Egress, Reason::PassUnmanaged, 1),
        ];
        (Arc::new(RwLock::new(view)), Arc::new(Fixed(counts)))
    }

    fn scrape(exposure: Exposure, format: TextFormat) -> String {
        let (view, source) = known();
        render(&registry(view, source, exposure), format).unwrap()
    }

    fn sample_names(text: &str) -> BTreeSet<&str> {
        text.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.split(['{', ' ']).next()).collect()
    }

    /// The names the hand-written exposition rendered before prometheus-client (read off its
    /// output), plus the verdict counters it rendered when the counters map was there, plus
    /// the incremental compile's checks.
    const NAMES_BEFORE: &[&str] = &[
        "policy_verdicts_total",
        "policy_map_entries",
        "policy_map_fill_ratio",
        "policy_identities",
        "policy_endpoints",
        "policy_problems",
        "policy_syncs_total",
        "policy_sync_failures_total",
        "policy_incremental_checks_total",
        "policy_incremental_mismatches_total",
        "policy_sync_duration_seconds_bucket",
        "policy_sync_duration_seconds_sum",
        "policy_sync_duration_seconds_count",
        "policy_enforcement_latency_seconds_bucket",
        "policy_enforcement_latency_seconds_sum",
        "policy_enforcement_latency_seconds_count",
    ];
    const COVERAGE_NAMES: &[&str] = &["policy_coverage_pods", "policy_namespace_default_deny"];

    #[test]
    fn metric_names_are_those_rendered_before_plus_coverage_on_loopback() {
        for format in [TextFormat::Prometheus, TextFormat::OpenMetrics] {
            let full = scrape(Exposure::Full, format);
            let expected: BTreeSet<&str> = NAMES_BEFORE.iter().chain(COVERAGE_NAMES).copied().collect();
            assert_eq!(sample_names(&full), expected, "{format:?}:\n{full}");
            let counters = scrape(Exposure::Counters, format);
            assert_eq!(sample_names(&counters), NAMES_BEFORE.iter().copied().collect(), "{format:?}:\n{counters}");
        }
    }

    #[test]
    fn loopback_samples_carry_the_known_values() {
        let text = scrape(Exposure::Full, TextFormat::Prometheus);
        for line in [
            "policy_verdicts_total{pod=\"e2e/b\",direction=\"ingress\",verdict=\"drop\",reason=\"drop_policy\"} 7",
            "policy_verdicts_total{pod=\"e2e/b\",direction=\"ingress\",verdict=\"drop\",reason=\"drop_deny\"} 3",
            "policy_verdicts_total{pod=\"e2e/a\",direction=\"egress\",verdict=\"pass\",reason=\"policy\"} 9",
            "policy_verdicts_total{pod=\"\",direction=\"egress\",verdict=\"pass\",reason=\"unmanaged\"} 1",
            "policy_map_entries{map=\"POLICY_V3\"} 2",
            "policy_map_fill_ratio{map=\"POLICY_V3\"} 0.5",
            "policy_map_fill_ratio{map=\"IPCACHE\"} 3.0",
            "policy_identities 3",
            "policy_endpoints{state=\"attached\"} 1",
            "policy_endpoints{state=\"pending\"} 1",
            "policy_problems 1",
            "policy_syncs_total 4",
            "policy_sync_failures_total 1",
            "policy_sync_duration_seconds_bucket{le=\"0.005\"} 1",
            "policy_sync_duration_seconds_count 1",
            "policy_enforcement_latency_seconds_bucket{le=\"0.025\"} 0",
            "policy_enforcement_latency_seconds_bucket{le=\"0.05\"} 1",
            "policy_enforcement_latency_seconds_bucket{le=\"10\"} 1",
            "policy_enforcement_latency_seconds_bucket{le=\"+Inf\"} 2",
            "policy_enforcement_latency_seconds_count 2",
            "policy_coverage_pods{namespace=\"e2e\",direction=\"ingress\",state=\"unprotected\"} 1",
            "policy_coverage_pods{namespace=\"e2e\",direction=\"ingress\",state=\"isolated\"} 2",
            "policy_coverage_pods{namespace=\"e2e\",direction=\"ingress\",state=\"isolated_nothing_allowed\"} 3",
            "policy_coverage_pods{namespace=\"e2e\",direction=\"egress\",state=\"unprotected\"} 4",
            "policy_namespace_default_deny{namespace=\"e2e\",direction=\"ingress\"} 1",
            "policy_namespace_default_deny{namespace=\"e2e\",direction=\"egress\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line} in:\n{text}");
        }
        assert_eq!(text.lines().filter(|l| l.starts_with("policy_sync_duration_seconds_bucket")).count(), LATENCY_BUCKETS_WITH_INF);
    }

    const LATENCY_BUCKETS_WITH_INF: usize = crate::metrics::LATENCY_BUCKETS.len() + 1;

    #[test]
    fn every_family_has_help_and_a_type() {
        for exposure in [Exposure::Full, Exposure::Counters] {
            let text = scrape(exposure, TextFormat::Prometheus);
            let typed: BTreeSet<&str> = text.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next()).collect();
            let helped: BTreeSet<&str> = text.lines().filter_map(|l| l.strip_prefix("# HELP ")?.split(' ').next()).collect();
            assert_eq!(typed, helped);
            assert!(text.lines().filter(|l| l.starts_with("# HELP ")).all(|l| l.len() > "# HELP policy_x ".len() + 10), "{text}");
            assert!(typed.contains("policy_verdicts_total") && typed.contains("policy_sync_duration_seconds"), "{typed:?}");
        }
    }

    #[test]
    fn the_node_listener_shows_no_pod_address_policy_or_namespace() {
        let text = scrape(Exposure::Counters, TextFormat::Prometheus);
        for secret in ["pod=", "namespace=", "e2e", "10.0.0.", "deny-b", "node-a", "veth"] {
            assert!(!text.contains(secret), "{secret} in:\n{text}");
        }
        // Without the pod label, both pods' drops are one series.
        assert!(text.lines().any(|l| l == "policy_verdicts_total{direction=\"ingress\",verdict=\"drop\",reason=\"drop_policy\"} 12"), "{text}");
    }

    #[test]
    fn openmetrics_has_units_and_an_end() {
        let text = scrape(Exposure::Full, TextFormat::OpenMetrics);
        assert!(text.contains("# UNIT policy_sync_duration_seconds seconds\n"), "{text}");
        assert!(text.contains("# UNIT policy_enforcement_latency_seconds seconds\n"), "{text}");
        assert!(text.contains("# UNIT policy_map_fill_ratio ratio\n"), "{text}");
        assert!(text.contains("# TYPE policy_verdicts counter\n"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert_eq!(TextFormat::negotiate(Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5")), TextFormat::OpenMetrics);
        assert_eq!(TextFormat::negotiate(Some("*/*")), TextFormat::Prometheus);
        assert_eq!(TextFormat::negotiate(None), TextFormat::Prometheus);
    }
}
