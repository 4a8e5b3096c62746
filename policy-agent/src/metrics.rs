//! What the agent shows: a shared view that the sync loop updates, served as Prometheus
//! metrics (`/metrics`), health (`/healthz`, `/readyz`) and a JSON status (`/status`, read by
//! `policy-agent status`). A tiny HTTP/1.1 responder is enough for these four paths.
//!
//! What names pods, addresses or policies (`/status`, per-pod counters) is served only on a
//! loopback address: a listener on any other address (the node's, for Prometheus and the
//! kubelet's probes) serves health and counters without such labels. No request walks a
//! map: the conntrack map is counted by a background thread.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
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
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::{
    AgentError,
    datapath::{PinLayout, map_name},
};

/// A Prometheus histogram with fixed buckets (seconds).
#[derive(Clone, Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

/// From 100 µs to 10 s: map syncs take milliseconds, enforcement latency up to a second.
pub const LATENCY_BUCKETS: &[f64] = &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self { bounds, counts: vec![0; bounds.len()], sum: 0.0, count: 0 }
    }

    pub fn observe(&mut self, value: Duration) {
        let v = value.as_secs_f64();
        for (bound, count) in self.bounds.iter().zip(&mut self.counts) {
            if v <= *bound {
                *count += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}", self.count, self.sum, self.count);
    }
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
    pub ingress_isolated: bool,
    pub egress_isolated: bool,
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
    #[serde(skip)]
    pub sync_duration: Histogram,
    #[serde(skip)]
    pub enforcement_latency: Histogram,
    /// For flow logs and counter labels.
    #[serde(skip)]
    pub directory: Directory,
}

/// Names for what the datapath reports in numbers.
#[derive(Clone, Debug, Default)]
pub struct Directory {
    pub pods_by_ip: BTreeMap<IpAddr, String>,
    pub pods_by_endpoint: BTreeMap<u32, String>,
    pub cookies: BTreeMap<u32, String>,
    /// The policies isolating an endpoint in a direction: what a drop is attributed to.
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
            sync_duration: Histogram::new(LATENCY_BUCKETS),
            enforcement_latency: Histogram::new(LATENCY_BUCKETS),
            directory: Directory::default(),
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

fn escape(label: &str) -> String {
    label.replace('\\', "\\\\").replace('"', "\\\"")
}

/// What a listener may show.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exposure {
    /// Everything: only on loopback.
    Full,
    /// Health and counters without pod, address or policy labels.
    Counters,
}

impl Exposure {
    /// What a listener bound to `addr` may show.
    pub fn of(addr: std::net::SocketAddr) -> Self {
        if addr.ip().is_loopback() { Self::Full } else { Self::Counters }
    }
}

/// Verdict counters by endpoint id (0: no endpoint), direction and reason, as packets.
fn verdict_counts(view: &AgentView, counters: &PerCpuArray<MapData, Counter>) -> Vec<(u32, Direction, Reason, u64)> {
    let mut out = Vec::new();
    for id in view.directory.pods_by_endpoint.keys().copied().chain([0]) {
        for direction in [Direction::Ingress, Direction::Egress] {
            for reason in Reason::ALL {
                let Ok(values) = counters.get(&reason.slot(id, direction), 0) else { continue };
                let packets: u64 = values.iter().map(|c| c.packets).sum();
                if packets > 0 {
                    out.push((id, direction, reason, packets));
                }
            }
        }
    }
    out
}

fn render_verdicts(out: &mut String, view: &AgentView, counters: Option<&PerCpuArray<MapData, Counter>>, exposure: Exposure) {
    let by = if exposure == Exposure::Full { "pod, direction" } else { "direction" };
    let _ = writeln!(out, "# HELP policy_verdicts_total Packets judged by the classifier, by {by} and reason.\n# TYPE policy_verdicts_total counter");
    let Some(counters) = counters else { return };
    let mut totals: BTreeMap<(&str, &str, &str, &str), u64> = BTreeMap::new();
    for (id, direction, reason, packets) in verdict_counts(view, counters) {
        let pod = match exposure {
            Exposure::Full => view.directory.pods_by_endpoint.get(&id).map_or("", String::as_str),
            Exposure::Counters => "",
        };
        let dir = if direction == Direction::Ingress { "ingress" } else { "egress" };
        let verdict = if reason.is_drop() { "drop" } else { "pass" };
        *totals.entry((pod, dir, verdict, reason.name())).or_default() += packets;
    }
    for ((pod, dir, verdict, reason), packets) in totals {
        let pod = if exposure == Exposure::Full { format!("pod=\"{}\",", escape(pod)) } else { String::new() };
        let _ = writeln!(out, "policy_verdicts_total{{{pod}direction=\"{dir}\",verdict=\"{verdict}\",reason=\"{reason}\"}} {packets}");
    }
}

/// The Prometheus text exposition of the view and of the datapath counters.
pub fn render_metrics(view: &AgentView, counters: Option<&PerCpuArray<MapData, Counter>>, exposure: Exposure) -> String {
    let mut out = String::new();
    render_verdicts(&mut out, view, counters, exposure);
    let _ = writeln!(out, "# HELP policy_map_entries Entries in each BPF map.\n# TYPE policy_map_entries gauge");
    for (map, fill) in &view.maps {
        let _ = writeln!(out, "policy_map_entries{{map=\"{map}\"}} {}", fill.entries);
    }
    let _ = writeln!(out, "# HELP policy_map_fill_ratio Entries over capacity of each BPF map.\n# TYPE policy_map_fill_ratio gauge");
    for (map, fill) in &view.maps {
        let _ = writeln!(out, "policy_map_fill_ratio{{map=\"{map}\"}} {}", fill.entries as f64 / f64::from(fill.capacity.max(1)));
    }
    let attached = view.endpoints.iter().filter(|e| e.attached).count();
    let _ = writeln!(
        out,
        "# HELP policy_identities Security identities in use.\n# TYPE policy_identities gauge\npolicy_identities {}\n\
         # HELP policy_endpoints Local pods, by whether the classifier is attached.\n# TYPE policy_endpoints gauge\n\
         policy_endpoints{{state=\"attached\"}} {attached}\npolicy_endpoints{{state=\"pending\"}} {}\n\
         # HELP policy_problems Objects or fields that could not be applied.\n# TYPE policy_problems gauge\npolicy_problems {}\n\
         # HELP policy_syncs_total Map syncs.\n# TYPE policy_syncs_total counter\npolicy_syncs_total {}\n\
         # HELP policy_sync_failures_total Map writes that failed.\n# TYPE policy_sync_failures_total counter\npolicy_sync_failures_total {}",
        view.identities,
        view.endpoints.len() - attached,
        view.problems.len(),
        view.syncs,
        view.sync_failures
    );
    view.sync_duration.render(&mut out, "policy_sync_duration_seconds", "Time to compile and write the maps.");
    view.enforcement_latency.render(
        &mut out,
        "policy_enforcement_latency_seconds",
        "Time from an object's change (file modification or watch event) to its enforcement.",
    );
    out
}

/// The per-packet counters, read on request (array lookups, bounded by the endpoints).
pub struct PinnedReaders {
    counters: Option<PerCpuArray<MapData, Counter>>,
}

impl PinnedReaders {
    pub fn open(pins: &PinLayout) -> Self {
        let counters = MapData::from_pin(pins.map(map_name::COUNTERS))
            .ok()
            .and_then(|data| PerCpuArray::try_from(Map::PerCpuArray(data)).ok());
        Self { counters }
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

/// How long the loop may be silent before `/healthz` fails.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(30);

/// Binds `addr` for [`serve`]; a listener that must show everything (`--status-addr`) must
/// be on loopback.
pub async fn bind(addr: &str, flag: &'static str, full_only: bool) -> Result<(tokio::net::TcpListener, Exposure), AgentError> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| AgentError::Serve { addr: addr.to_owned(), source })?;
    let local = listener.local_addr().map_err(|source| AgentError::Serve { addr: addr.to_owned(), source })?;
    let exposure = Exposure::of(local);
    if full_only && exposure != Exposure::Full {
        return Err(AgentError::Usage { flag, what: format!("{addr} is not a loopback address (it serves pod names, addresses and policies)") });
    }
    Ok((listener, exposure))
}

/// Serves `/healthz`, `/readyz`, `/metrics` and (with [`Exposure::Full`]) `/status` until
/// the process ends.
pub async fn serve(listener: tokio::net::TcpListener, exposure: Exposure, view: SharedView, pins: PinLayout) {
    let readers = Arc::new(std::sync::Mutex::new(PinnedReaders::open(&pins)));
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let (view, readers) = (view.clone(), readers.clone());
        tokio::spawn(async move { answer(stream, exposure, &view, &readers).await });
    }
}

async fn answer(mut stream: tokio::net::TcpStream, exposure: Exposure, view: &SharedView, readers: &std::sync::Mutex<PinnedReaders>) {
    // Read the whole request head (up to the blank line): answering and closing with unread
    // request bytes would make the kernel reset the connection.
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let read_head = async {
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 * 1024 {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        true
    };
    if !matches!(tokio::time::timeout(Duration::from_secs(5), read_head).await, Ok(true)) {
        return;
    }
    let request = String::from_utf8_lossy(&buf);
    let path = request.split_whitespace().nth(1).unwrap_or("/");
    let (status, content_type, body) = respond(path, exposure, view, readers);
    let head = format!("HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
}

fn respond(path: &str, exposure: Exposure, view: &SharedView, readers: &std::sync::Mutex<PinnedReaders>) -> (&'static str, &'static str, String) {
    let readers = readers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let view = read(view);
    match path {
        "/metrics" => ("200 OK", "text/plain; version=0.0.4", render_metrics(&view, readers.counters.as_ref(), exposure)),
        "/healthz" => {
            if view.last_loop.is_some_and(|t| t.elapsed() < HEALTH_TIMEOUT) || view.last_loop.is_none() {
                ("200 OK", "text/plain", "ok\n".into())
            } else {
                ("503 Service Unavailable", "text/plain", "sync loop stalled\n".into())
            }
        }
        "/readyz" => {
            if view.ready {
                ("200 OK", "text/plain", "ready\n".into())
            } else {
                ("503 Service Unavailable", "text/plain", "waiting for the first sync\n".into())
            }
        }
        "/status" if exposure == Exposure::Full => ("200 OK", "application/json", serde_json::to_string_pretty(&*view).unwrap_or_default()),
        _ => ("404 Not Found", "text/plain", "not found\n".into()),
    }
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
