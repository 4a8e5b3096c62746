//! `policy-agent run`: the node agent. Each pass takes a full snapshot of the cluster,
//! compiles it for this node, finds each local pod's host-side interface, writes the
//! difference into the maps and attaches the classifier where it is missing.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Duration, Instant, SystemTime},
};

use policy_common::{Direction, event::Config};

use crate::{
    AgentError,
    compile::{Check, CheckPoint, Compiled, EndpointPolicy, EndpointSlot, IdentityAllocator, IncrementalCompiler, NodeContext, PodRef, ipcache_prefix, render},
    datapath::{self, DEFAULT_BPFFS, Datapath, Hook, MapSizes, PinLayout},
    flowlog::{self, FlowLogMode},
    metrics::{self, AgentView, Directory, EndpointStatus, MapFill, SharedView},
    netif,
    resolve::IpPrefix,
    state::ClusterState,
    sync::{EndpointRef, SyncReport, Syncer},
    watch::{ClusterArgs, KubeSource, ManifestSource, Snapshot, Source},
};

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Read Namespaces, Pods and NetworkPolicies from this directory (YAML/JSON) and watch it,
    /// instead of a Kubernetes API server.
    #[arg(long, conflicts_with_all = ["kubeconfig", "context"])]
    pub manifests: Option<PathBuf>,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(flatten)]
    pub publish: crate::publish::PublishArgs,
    /// This node's name: pods with this `spec.nodeName` are enforced here.
    #[arg(long, env = "NODE_NAME")]
    pub node: Option<String>,
    /// bpffs directory for pinned maps and links (mounted if it is not on a bpffs).
    #[arg(long, default_value = DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
    /// Address for /healthz, /readyz and /metrics. On a loopback address it also serves
    /// /status and per-pod counters; on any other (the node's) only counters without pod,
    /// address or policy labels.
    #[arg(long, default_value = "127.0.0.1:9090")]
    pub metrics_addr: String,
    /// Loopback address for /status and per-pod /metrics (`policy-agent status` reads it).
    #[arg(long, default_value = crate::status::DEFAULT_STATUS_ADDR)]
    pub status_addr: String,
    /// Which verdicts to write to the flow log.
    #[arg(long, value_enum, default_value_t = FlowLogMode::Denied)]
    pub flow_log: FlowLogMode,
    /// Append the flow log to this file instead of stdout.
    #[arg(long)]
    pub flow_log_file: Option<PathBuf>,
    /// Flow-log events per second and CPU; more are counted, not logged.
    #[arg(long, default_value_t = 1000)]
    pub flow_log_rate: u32,
    /// Count and log what would be dropped, but let it pass.
    #[arg(long)]
    pub audit: bool,
    /// kube-proxy's Service address range (`--service-cluster-ip-range`; repeat for dual
    /// stack). A pod's egress towards it is judged after the translation, as egress towards
    /// the backend the connection reaches.
    #[arg(long, value_name = "CIDR", value_parser = parse_service_cidr)]
    pub service_cidr: Vec<IpPrefix>,
    /// The node's interfaces towards other nodes (repeatable; `auto`: every interface with a
    /// node address on a subnet). Egress towards a Service whose backend is on another node
    /// is judged where it leaves through one of them.
    #[arg(long, value_name = "IFNAME")]
    pub uplink: Vec<String>,
    /// Log every drop from inside the classifier through aya-log. Costs time on the drop
    /// path; for debugging only.
    #[arg(long)]
    pub ebpf_debug: bool,
    /// Capacity of the ipcache's address map (pod and node addresses, cluster-wide).
    #[arg(long, default_value_t = policy_common::ipcache::MAX_ADDRESSES)]
    pub ipcache_size: u32,
    /// Capacity of the policy map (allow entries of all local pods, but `endPort` blocks).
    #[arg(long, default_value_t = policy_common::policy::MAX_ENTRIES)]
    pub policy_map_size: u32,
    /// Capacity of the conntrack map (tracked flows of all local pods).
    #[arg(long, default_value_t = policy_common::conntrack::MAX_ENTRIES)]
    pub conntrack_size: u32,
    /// The most pods this node runs (kubelet's `--max-pods`, 110 by default). Each local pod
    /// may hold `conntrack-size / max-pods` tracked flows, so no pod can take another's room.
    #[arg(long, default_value_t = policy_common::conntrack::DEFAULT_MAX_PODS)]
    pub max_pods: u32,
    /// Full resync period: a safety net (and the retry period of failed writes and attaches);
    /// link, address and route changes (netlink) and manifest or API changes wake the agent
    /// at once.
    #[arg(long, default_value = "5000", value_name = "MS")]
    pub resync_ms: u64,
    /// Unix socket for the CNI plugin `policy-enforcer`, which hands each new pod to the
    /// agent before its containers start (the DaemonSet serves it at
    /// /run/policy-enforcer/cni.sock, the plugin's default). Off when empty, the default, so
    /// an agent run by hand claims no host path.
    #[arg(long, default_value = "", value_name = "PATH")]
    pub cni_socket: String,
    /// Do not serve the CNI plugin (as `--cni-socket ''`): pods are enforced once the watch
    /// sees their IPs.
    #[arg(long)]
    pub no_cni: bool,
    /// How long a CNI ADD waits for a pass to enforce its pod (the watch may not know it yet).
    #[arg(long, default_value = "15000", value_name = "MS")]
    pub cni_timeout_ms: u64,
    /// How often a compile is repeated in full, after its pass, to check the incremental
    /// compiler (a difference is logged, counted in `policy_incremental_mismatches_total`
    /// and recompiled afresh). 0: every compile (the test suites use it).
    #[arg(long, default_value = "60000", value_name = "MS")]
    pub incremental_check_ms: u64,
}

fn parse_service_cidr(text: &str) -> Result<IpPrefix, String> {
    IpPrefix::parse(text)
}

/// The node's name: `--node`, else `NODE_NAME` (clap reads it), else the hostname.
fn node_name(args: &RunArgs) -> Result<String, AgentError> {
    if let Some(node) = &args.node {
        return Ok(node.clone());
    }
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_err(|source| AgentError::Read { path: "/proc/sys/kernel/hostname".into(), source })?;
    Ok(hostname.trim().to_owned())
}

pub async fn run(args: RunArgs) -> Result<(), AgentError> {
    let node = node_name(&args)?;
    let pins = PinLayout::new(&args.bpffs);
    let sizes = MapSizes { addresses: Some(args.ipcache_size), policy: Some(args.policy_map_size), conntrack: Some(args.conntrack_size) };
    let mut datapath = Datapath::load_with_sizes(pins.clone(), sizes)?;
    let mut syncer = Syncer::adopt(datapath.take_maps()?)?;
    let mut flags = args.flow_log.config_flags();
    if args.ebpf_debug {
        datapath.spawn_ebpf_logger()?;
        flags |= policy_common::event::CONFIG_DEBUG_LOG;
    }
    let config = Config { flags, events_per_sec: args.flow_log_rate, ct_budget: crate::conntrack::budget(args.conntrack_size, args.max_pods), _pad: 0 };
    syncer
        .maps_mut()
        .config
        .set(0, config, 0)
        .map_err(|e| AgentError::Ebpf { what: "write config".into(), source: Box::new(e) })?;
    syncer.maps_mut().set_service_nets(&args.service_cidr)?;
    tracing::info!(node = %node, bpffs = %pins.root().display(), adopted_endpoints = syncer.loaded().endpoints.len(), "classifier loaded");

    let view: SharedView = Arc::new(RwLock::new(AgentView::new(&node)));
    let servers = start_servers(&args, &view, &pins).await?;
    let (cni, servers) = crate::cni::CniEndpoint::start(&args.cni_socket, args.no_cni, Duration::from_millis(args.cni_timeout_ms), servers)?;
    metrics::spawn_conntrack_counter(view.clone(), pins.clone());
    if args.flow_log != FlowLogMode::Off {
        let (flow_view, flow_pins, file) = (view.clone(), pins.clone(), args.flow_log_file.clone());
        tokio::spawn(async move {
            if let Err(e) = flowlog::run(flow_pins, flow_view, file).await {
                tracing::error!(error = %e, "flow log stopped");
            }
        });
    }

    // Identity numbers the maps already hold stay with the addresses that have them.
    let mut identities = IdentityAllocator::default();
    identities.adopt(syncer.loaded().ipcache.iter().filter_map(|((len, key), value)| Some((ipcache_prefix(*len, key)?, value.identity))));
    let mut source = match &args.manifests {
        Some(dir) => Source::Manifests(ManifestSource::new(dir)?),
        None => {
            tracing::info!("waiting for the API server's first lists");
            crate::publish::spawn(&args.publish, &args.cluster, &view);
            Source::Kube(KubeSource::start(&args.cluster).await?)
        }
    };
    let agent = Agent {
        node,
        datapath,
        syncer,
        view,
        audit: args.audit,
        attached: BTreeMap::new(),
        last_change: None,
        downed: BTreeMap::new(),
        compilation: None,
        routes: Vec::new(),
        settled: false,
        compiler: IncrementalCompiler::new(identities),
        // The first compile starts from empty caches, so it is the full compile already.
        last_check: (args.incremental_check_ms > 0).then(Instant::now),
        check_every: Duration::from_millis(args.incremental_check_ms),
        pending_check: None,
        uplinks: Uplinks { wanted: args.uplink.clone(), attached: BTreeMap::new() },
        service_ranges: args.service_cidr.clone(),
        service_nets: None,
        cni,
    };
    let resync = Duration::from_millis(args.resync_ms.max(50));
    agent.serve(&mut source, &servers, resync).await
}

impl Agent {
    /// The loop: reconcile on every change of the cluster or of the node's links, addresses
    /// and routes, and on each resync; sweep expired flows, until a signal
    /// (or a server that stopped) ends it.
    async fn serve(mut self, source: &mut Source, servers: &[(String, tokio::task::JoinHandle<()>)], resync: Duration) -> Result<(), AgentError> {
        let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|source| AgentError::Syscall { what: "install the SIGTERM handler".into(), source })?;
        let mut next_sweep = tokio::time::Instant::now() + CONNTRACK_SWEEP;
        // Before the first pass reads the node: a change made after that read wakes us.
        let host_events = netif::HostEvents::start();
        'passes: loop {
            if let Some((addr, _)) = servers.iter().find(|(_, server)| server.is_finished()) {
                return Err(AgentError::ServerStopped { addr: addr.clone() });
            }
            self.reconcile(source);
            self.cni.after_pass(&self.view, &self.attached);
            let resync_at = tokio::time::Instant::now() + resync;
            // The sweep has its own clock: the resync may be long now that events drive passes.
            loop {
                tokio::select! {
                    () = source.changed() => break,
                    () = host_events.changed() => break,
                    () = tokio::time::sleep_until(resync_at) => break,
                    () = tokio::time::sleep_until(next_sweep) => {
                        next_sweep = tokio::time::Instant::now() + CONNTRACK_SWEEP;
                        self.sweep_conntrack();
                    }
                    event = self.cni.next() => {
                        if self.cni.handle(event, &self.view) {
                            self.compilation = None;
                            break;
                        }
                    }
                    _ = tokio::signal::ctrl_c() => break 'passes,
                    _ = terminate.recv() => break 'passes,
                }
            }
        }
        // Everything stays pinned: enforcement goes on until the next agent adopts it.
        tracing::info!("stopping; maps and links stay pinned and enforcing");
        Ok(())
    }
}

impl Agent {
    fn sweep_conntrack(&mut self) {
        match self.syncer.sweep_conntrack() {
            Ok(removed) => tracing::debug!(removed, "conntrack sweep"),
            Err(error) => tracing::warn!(%error, "conntrack sweep"),
        }
    }
}

/// Binds and serves `--metrics-addr` and `--status-addr`; returns each address with its task.
async fn start_servers(args: &RunArgs, view: &SharedView, pins: &PinLayout) -> Result<Vec<(String, tokio::task::JoinHandle<()>)>, AgentError> {
    let mut servers = Vec::new();
    for (addr, flag, full_only) in [(&args.metrics_addr, "--metrics-addr", false), (&args.status_addr, "--status-addr", true)] {
        let (listener, exposure) = metrics::bind(addr, flag, full_only).await?;
        tracing::info!(addr = %addr, exposure = ?exposure, "serving");
        servers.push((addr.clone(), tokio::spawn(metrics::serve(listener, exposure, view.clone(), pins.clone()))));
    }
    Ok(servers)
}

/// How often expired flows are taken out of the conntrack table, freeing their endpoints'
/// budgets (the shortest lifetime, after a FIN or RST, is 10 s).
const CONNTRACK_SWEEP: Duration = Duration::from_secs(5);

struct Agent {
    node: String,
    datapath: Datapath,
    syncer: Syncer,
    view: SharedView,
    audit: bool,
    /// Interfaces this process attached to, with the ifindex at that time.
    attached: BTreeMap<String, u32>,
    /// The change time already enforced (for the latency histogram).
    last_change: Option<SystemTime>,
    /// Links this agent took down because the pod could not be written or attached. The
    /// kernel flushes a link's routes when it goes down, so the pod keeps this placement
    /// (its ifindex) while the link exists (otherwise it would look gone), and the routes
    /// are put back when the link comes up.
    downed: BTreeMap<String, DownedLink>,
    /// The last compilation and what it was made from.
    compilation: Option<Compilation>,
    /// The routes the last pass placed pods with.
    routes: Vec<netif::Route>,
    /// The last pass left every pod placed, written and attached: with unchanged inputs
    /// there is nothing to do.
    settled: bool,
    /// The compiler, with identity numbers and its caches across compiles.
    compiler: IncrementalCompiler,
    /// When the incremental compile was last checked against the full one, and the check
    /// that waits for the end of the pass.
    last_check: Option<Instant>,
    check_every: Duration,
    pending_check: Option<PendingCheck>,
    /// Where deferred egress towards Services leaves the node.
    uplinks: Uplinks,
    /// `--service-cidr`, and what `SERVICE_NETS_V1` holds (those and the Services' addresses).
    service_ranges: Vec<IpPrefix>,
    service_nets: Option<BTreeSet<IpPrefix>>,
    /// The CNI plugin's requests, and the pod addresses they reported.
    cni: crate::cni::CniEndpoint,
}

/// A compile to repeat in full once its pass is done.
struct PendingCheck {
    point: CheckPoint,
    state: ClusterState,
    node: NodeContext,
    at: Instant,
}

/// The node's interfaces towards other nodes, where `to_pod` judges deferred packets that
/// leave the node (it passes every other packet).
struct Uplinks {
    /// Names from `--uplink`; `auto` stands for the host's uplinks.
    wanted: Vec<String>,
    /// Interfaces attached by this process, with their ifindex then.
    attached: BTreeMap<String, u32>,
}

impl Uplinks {
    fn names(&self, host: &HostView) -> BTreeSet<String> {
        let auto = self.wanted.iter().any(|w| w == "auto");
        self.wanted.iter().filter(|w| *w != "auto").cloned().chain(auto.then(|| host.uplinks.iter().cloned()).into_iter().flatten()).collect()
    }
}

/// A compiled snapshot, with what it was compiled from: recompiling happens only when the
/// objects or the node's addresses change, not on every resync.
struct Compilation {
    generation: u64,
    node_ips: Vec<IpAddr>,
    compiled: Compiled,
    changed_at: SystemTime,
    problems: Vec<String>,
    /// Shared with the flow log's directory, and with the next compilation if no pod changed.
    pods_by_ip: Arc<BTreeMap<IpAddr, String>>,
    /// This node's pods per namespace and isolation, for the loopback metrics.
    coverage: Vec<metrics::NamespaceCoverage>,
    /// Where egress is judged after kube-proxy's translation.
    service_nets: BTreeSet<IpPrefix>,
}

impl Compilation {
    /// Adds what only /status, /metrics and the flow log need: done after the maps are
    /// written, so it does not delay enforcement.
    /// `unchanged_pods_by_ip` is the previous pass's directory when no pod changed since.
    fn describe(&mut self, state: &ClusterState, node: &str, unchanged_pods_by_ip: Option<&Arc<BTreeMap<IpAddr, String>>>) {
        self.coverage = crate::coverage::report_compiled(state, [(node, &self.compiled)]).per_namespace();
        self.pods_by_ip = unchanged_pods_by_ip.map_or_else(|| pods_by_ip(state), Arc::clone);
    }
}

/// A duration in milliseconds, for log lines.
fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The names of the live pods' addresses.
fn pods_by_ip(state: &ClusterState) -> Arc<BTreeMap<IpAddr, String>> {
    let live = state.pods.iter().filter(|(_, p)| crate::resolve::is_live_pod(p));
    Arc::new(live.flat_map(|(r, p)| crate::resolve::pod_ips(p, &mut Vec::new()).into_iter().map(move |ip| (ip, r.to_string()))).collect())
}

/// A pod's link that the agent set down to close it, and the routes that went with it.
struct DownedLink {
    pod: PodRef,
    ifindex: u32,
    saved: netif::SavedLink,
}

/// Where a local pod is, or why it cannot be enforced yet.
struct Placement {
    interface: Option<(String, u32)>,
    slot: Option<EndpointSlot>,
    error: Option<String>,
}

/// What a pass reads from the node's network namespace.
struct HostView {
    node_ips: Vec<IpAddr>,
    routes: Vec<netif::Route>,
    /// Interfaces holding a node address on a subnet: uplinks, never a pod's veth.
    uplinks: BTreeSet<String>,
}

impl HostView {
    fn read() -> Result<Self, AgentError> {
        let addresses = netif::interface_addresses()?;
        let routes = netif::routes()?;
        let mut node_ips: Vec<IpAddr> = addresses.iter().map(|a| a.addr).collect();
        node_ips.sort();
        node_ips.dedup();
        // Routed CNIs may put the node's gateway address on each pod veth as a /32 or /128;
        // an address with a shorter prefix marks an interface on a real subnet.
        let host_len = |a: &IpAddr| if a.is_ipv4() { 32 } else { 128 };
        let uplinks = addresses.iter().filter(|a| a.prefix_len < host_len(&a.addr)).map(|a| a.interface.clone()).collect();
        Ok(Self { node_ips, routes, uplinks })
    }
}

impl Agent {
    fn reconcile(&mut self, source: &Source) {
        let started = Instant::now();
        let host = match HostView::read() {
            Ok(host) => host,
            Err(e) => {
                // Without routes every pod would look gone: keep every link and entry.
                tracing::warn!(error = %e, "cannot read the node's addresses or routes; pass skipped, everything kept");
                self.record_idle_pass(true);
                return;
            }
        };
        let generation = source.generation();
        // A compilation that is out of date is dropped after the pass, off the path to enforcement.
        let (current, previous) = match self.compilation.take() {
            Some(c) if c.generation == generation && c.node_ips == host.node_ips => (Some(c), None),
            other => (None, other),
        };
        if current.is_some() && self.settled && host.routes == self.routes && self.interfaces_unchanged() {
            self.compilation = current;
            self.record_idle_pass(false);
            return;
        }
        let (mut compilation, snapshot) = match current {
            Some(compilation) => (compilation, None),
            None => {
                let (compilation, snapshot) = self.compile(source, generation, host.node_ips.clone());
                (compilation, Some(snapshot))
            }
        };
        let compiled_at = Instant::now();
        self.write_service_nets(&compilation.service_nets);
        let compiled = &compilation.compiled;
        let placements = self.place(compiled, &host);
        let uplinks = self.uplinks.names(&host);
        self.routes = host.routes;
        self.detach_unwanted(&placements, &uplinks);
        self.attach_uplinks(&uplinks);
        let slots: BTreeMap<PodRef, EndpointSlot> = placements.iter().filter_map(|(pod, p)| Some((pod.clone(), p.slot?))).collect();
        let (report, flushed) = self.write_maps(compiled, &slots);
        let written_at = Instant::now();
        let mut errors = failures_by_pod(&report, &slots);
        let failed: BTreeSet<PodRef> = errors.keys().cloned().collect();
        let programs = self.attach_placed(compiled, &placements, &failed, &mut errors);
        self.close_or_open_links(compiled, &placements, &failed);

        let elapsed = started.elapsed();
        if report.applied > 0 || !report.failures.is_empty() {
            tracing::info!(
                writes = report.applied,
                failures = report.failures.len(),
                conntrack_flushed = flushed,
                ms = millis(elapsed),
                compile_ms = millis(compiled_at - started),
                write_ms = millis(written_at - compiled_at),
                "maps synced"
            );
        }
        self.settled = errors.is_empty()
            && self.service_nets.as_ref() == Some(&compilation.service_nets)
            && placements.values().all(|p| p.slot.is_some() && p.interface.as_ref().is_some_and(|(n, i)| self.attached.get(n) == Some(i)));
        let outcome = PassOutcome { errors, programs, failures: report.failures.len(), ipcache_failures: ipcache_failures(&report), elapsed };
        if let Some(snapshot) = snapshot {
            let unchanged = previous.as_ref().filter(|_| self.compiler.last_reuse().pods_unchanged()).map(|p| &p.pods_by_ip);
            compilation.describe(&snapshot.state, &self.node, unchanged);
        }
        self.publish(&compilation, &placements, &outcome);
        self.compilation = Some(compilation);
        drop(previous);
        crate::alloc::return_freed_memory();
        if self.run_pending_check() {
            // The caches are gone: one more pass compiles afresh, itself not checked again.
            self.compilation = None;
            let check_every = std::mem::replace(&mut self.check_every, Duration::MAX);
            self.reconcile(source);
            self.check_every = check_every;
        }
    }

    /// A pass that changed nothing (inputs unchanged, or unreadable).
    fn record_idle_pass(&self, host_unreadable: bool) {
        let mut view = metrics::write(&self.view);
        view.last_loop = Some(Instant::now());
        view.passes += 1;
        if host_unreadable {
            view.skipped_passes += 1;
        }
    }

    /// Detaches from interfaces no pod is placed on: a pod that is gone loses its program
    /// before its endpoint entry.
    fn detach_unwanted(&mut self, placements: &BTreeMap<PodRef, Placement>, uplinks: &BTreeSet<String>) {
        let wanted: BTreeSet<&str> = placements.values().filter_map(|p| p.interface.as_ref().map(|(n, _)| n.as_str())).collect();
        for (ifname, hook) in self.datapath.pins().pinned_links() {
            let uplink = hook == Hook::ToPod && uplinks.contains(&ifname) && !wanted.contains(ifname.as_str());
            if !wanted.contains(ifname.as_str()) && !uplink {
                self.uplinks.attached.remove(&ifname);
                match datapath::detach(self.datapath.pins(), &ifname, hook) {
                    Ok(_) => tracing::info!(interface = %ifname, hook = %hook, "detached"),
                    Err(e) => tracing::warn!(interface = %ifname, error = %e, "detach failed"),
                }
                self.attached.remove(&ifname);
            }
        }
    }

    /// Brings `SERVICE_NETS_V1` to `nets` when they changed. On failure the old set stays
    /// (a new Service's egress is then judged as itself) and the next pass retries.
    fn write_service_nets(&mut self, nets: &BTreeSet<IpPrefix>) {
        if self.service_nets.as_ref() == Some(nets) {
            return;
        }
        let list: Vec<IpPrefix> = nets.iter().copied().collect();
        match self.syncer.maps_mut().set_service_nets(&list) {
            Ok(()) => {
                tracing::info!(entries = list.len(), "Service addresses written");
                self.service_nets = Some(nets.clone());
            }
            Err(e) => tracing::error!(error = %e, "cannot write the Service addresses; retrying on the next pass"),
        }
    }

    /// Attaches `to_pod` to the TC egress of each uplink where it is missing (or the link
    /// was re-created), so deferred packets leaving the node are judged.
    fn attach_uplinks(&mut self, uplinks: &BTreeSet<String>) {
        for name in uplinks {
            let Some(ifindex) = netif::ifindex(name) else { continue };
            if self.uplinks.attached.get(name) == Some(&ifindex) {
                continue;
            }
            match self.datapath.attach(name, Hook::ToPod) {
                Ok(attached) => {
                    tracing::info!(interface = %name, program = attached.program_id, "attached to the uplink");
                    self.uplinks.attached.insert(name.clone(), ifindex);
                }
                Err(e) => tracing::error!(interface = %name, error = %e, "cannot attach to the uplink: egress towards Services with backends on other nodes leaves unjudged"),
            }
        }
    }

    /// Renders and writes the maps, then frees the slots nothing refers to any more.
    /// Returns the report and the number of conntrack entries flushed with freed slots.
    fn write_maps(&mut self, compiled: &Compiled, slots: &BTreeMap<PodRef, EndpointSlot>) -> (SyncReport, usize) {
        let wanted_ids: BTreeMap<u32, u32> = slots.values().map(|s| (s.ifindex, s.id)).collect();
        let desired = render(compiled, slots, self.audit);
        let report = self.syncer.apply(&desired);
        let flushed = self.syncer.release_unused(&wanted_ids);
        (report, flushed)
    }

    /// Attaches the classifier where it is missing, after the endpoint entry exists (so the
    /// first packet already sees it), and never to a pod whose write failed.
    fn attach_placed(
        &mut self,
        compiled: &Compiled,
        placements: &BTreeMap<PodRef, Placement>,
        failed: &BTreeSet<PodRef>,
        errors: &mut BTreeMap<PodRef, String>,
    ) -> BTreeMap<PodRef, Vec<u32>> {
        let mut programs = BTreeMap::new();
        for (pod, placement) in placements {
            let (Some((ifname, ifindex)), Some(_)) = (&placement.interface, placement.slot) else { continue };
            if failed.contains(pod) || self.attached.get(ifname) == Some(ifindex) {
                continue;
            }
            match self.attach(ifname) {
                Ok(ids) => {
                    self.attached.insert(ifname.clone(), *ifindex);
                    programs.insert(pod.clone(), ids);
                }
                Err(e) => {
                    tracing::error!(pod = %pod, interface = %ifname, error = %e, "attach failed");
                    // Without a classifier an isolated pod would be open.
                    if is_isolated(compiled, pod) {
                        self.set_link_down(pod, ifname, *ifindex, true);
                    }
                    errors.entry(pod.clone()).or_insert_with(|| e.to_string());
                }
            }
        }
        programs
    }

    /// Takes the link of every isolated pod whose write failed down (the maps may hold an
    /// older, wider state for it), and brings links up again once their pod is attached and
    /// written.
    fn close_or_open_links(&mut self, compiled: &Compiled, placements: &BTreeMap<PodRef, Placement>, failed: &BTreeSet<PodRef>) {
        for (pod, placement) in placements {
            let Some((ifname, ifindex)) = &placement.interface else { continue };
            if failed.contains(pod) {
                if is_isolated(compiled, pod) {
                    self.set_link_down(pod, ifname, *ifindex, true);
                }
            } else if self.attached.get(ifname) == Some(ifindex) {
                self.set_link_down(pod, ifname, *ifindex, false);
            }
        }
    }

    fn set_link_down(&mut self, pod: &PodRef, ifname: &str, ifindex: u32, down: bool) {
        if down == self.downed.contains_key(ifname) {
            return;
        }
        if down {
            // Save before: the kernel deletes the link's routes and neighbours when it goes down.
            let saved = netif::save_link(ifname, ifindex).unwrap_or_else(|e| {
                tracing::error!(pod = %pod, interface = %ifname, error = %e, "cannot save the link's routes and neighbours; they will not be restored");
                netif::SavedLink::default()
            });
            match netif::set_link_up(ifname, false) {
                Ok(()) => {
                    tracing::warn!(pod = %pod, interface = %ifname, "link set down until the pod is written and attached");
                    self.downed.insert(ifname.to_owned(), DownedLink { pod: pod.clone(), ifindex, saved });
                }
                Err(e) => tracing::error!(pod = %pod, interface = %ifname, error = %e, "cannot set the link down"),
            }
            return;
        }
        match netif::set_link_up(ifname, true) {
            Ok(()) => {
                let Some(downed) = self.downed.remove(ifname) else { return };
                match netif::restore_link(ifname, &downed.saved) {
                    Ok(()) => tracing::info!(pod = %pod, interface = %ifname, restored = downed.saved.entries(), "link up again with its routes, pod written and attached"),
                    Err(e) => tracing::error!(pod = %pod, interface = %ifname, error = %e, "link up again, but its routes could not all be restored"),
                }
            }
            Err(e) => tracing::error!(pod = %pod, interface = %ifname, error = %e, "cannot set the link up"),
        }
    }

    /// Compiles a fresh snapshot of the source (without the views [`Compilation::describe`]
    /// adds once the maps are written); returns the snapshot too.
    fn compile(&mut self, source: &Source, generation: u64, node_ips: Vec<IpAddr>) -> (Compilation, Snapshot) {
        let started = Instant::now();
        let snapshot = self.cni.apply(source.snapshot());
        let node = NodeContext { name: self.node.clone(), ips: node_ips.clone() };
        let snapshot_at = Instant::now();
        let compiled = self.compile_incrementally(&snapshot.state, &node);
        let compiled_at = Instant::now();
        let problems = compiled.problems.iter().map(ToString::to_string).chain(snapshot.errors.iter().cloned()).collect();
        let service_nets = crate::services::deferred_nets(&snapshot.state, &self.service_ranges);
        tracing::debug!(snapshot_ms = millis(snapshot_at - started), compile_ms = millis(compiled_at - snapshot_at), "compiled");
        let compilation = Compilation {
            generation,
            node_ips,
            compiled,
            changed_at: snapshot.changed_at,
            problems,
            pods_by_ip: Arc::default(),
            coverage: Vec::new(),
            service_nets,
        };
        (compilation, snapshot)
    }

    /// Compiles incrementally. At most every `--incremental-check-ms` the compile is
    /// also queued for a full one, which runs after the pass has enforced it.
    fn compile_incrementally(&mut self, state: &ClusterState, node: &NodeContext) -> Compiled {
        let now = Instant::now();
        if self.last_check.is_none_or(|at| now.duration_since(at) >= self.check_every) {
            self.last_check = Some(now);
            self.pending_check = Some(PendingCheck { point: self.compiler.checkpoint(), state: state.clone(), node: node.clone(), at: now });
        }
        self.compiler.compile(state, node, now)
    }

    /// Runs the queued full compile and compares; returns whether the incremental one differed.
    fn run_pending_check(&mut self) -> bool {
        let (Some(check), Some(compilation)) = (self.pending_check.take(), &self.compilation) else { return false };
        let outcome = self.compiler.check(check.point, &check.state, &check.node, check.at, &compilation.compiled);
        let mut view = metrics::write(&self.view);
        view.incremental_checks += 1;
        if outcome == Check::Matched {
            return false;
        }
        view.incremental_mismatches += 1;
        tracing::error!("the incremental compile differed from the full one; recompiling afresh");
        true
    }

    /// Whether every interface this agent attached still has the index it had (a veth
    /// re-created under the same name keeps its routes but not its index).
    fn interfaces_unchanged(&self) -> bool {
        self.attached.iter().chain(&self.uplinks.attached).all(|(name, index)| netif::ifindex(name) == Some(*index))
    }

    /// Finds each local pod's interface and endpoint slot; no interface is given to two pods.
    fn place(&mut self, compiled: &Compiled, host: &HostView) -> BTreeMap<PodRef, Placement> {
        let mut placements = BTreeMap::new();
        let mut taken: BTreeMap<u32, &PodRef> = BTreeMap::new();
        for (pod, endpoint) in &compiled.endpoints {
            let found = pod_interface(endpoint, host, &self.attached, &taken).or_else(|e| self.downed_interface(pod, &taken).ok_or(e));
            let placement = match found {
                Ok((name, ifindex)) => {
                    taken.insert(ifindex, pod);
                    match self.syncer.slot(ifindex) {
                        Some(slot) => Placement { interface: Some((name, ifindex)), slot: Some(slot), error: None },
                        None => Placement { interface: Some((name, ifindex)), slot: None, error: Some("endpoint map full".into()) },
                    }
                }
                Err(error) => Placement { interface: None, slot: None, error: Some(error) },
            };
            if let Some(error) = &placement.error {
                tracing::debug!(pod = %pod, error = %error, "pod not enforced yet");
            }
            placements.insert(pod.clone(), placement);
        }
        placements
    }

    /// The link this agent set down for `pod`, if it still exists with the same index.
    fn downed_interface(&self, pod: &PodRef, taken: &BTreeMap<u32, &PodRef>) -> Option<(String, u32)> {
        let (name, downed) = self.downed.iter().find(|(_, d)| d.pod == *pod)?;
        (netif::ifindex(name) == Some(downed.ifindex) && !taken.contains_key(&downed.ifindex)).then(|| (name.clone(), downed.ifindex))
    }

    fn attach(&mut self, ifname: &str) -> Result<Vec<u32>, AgentError> {
        let mut ids = Vec::new();
        for hook in Hook::BOTH {
            let attached = self.datapath.attach(ifname, hook)?;
            tracing::info!(interface = %ifname, hook = %hook, program = attached.program_id, replaced = attached.replaced, "attached");
            ids.push(attached.program_id);
        }
        Ok(ids)
    }

    /// Turns a pass into the view that /status and /metrics serve.
    fn publish(&mut self, compilation: &Compilation, placements: &BTreeMap<PodRef, Placement>, outcome: &PassOutcome) {
        let compiled = &compilation.compiled;
        let mut endpoints = self.endpoint_statuses(compiled, placements, outcome);
        let maps = self.map_fill();
        let directory = directory(compilation, placements);
        let mut view = metrics::write(&self.view);
        // Keep program ids from earlier passes (attach happens once per interface).
        for e in &mut endpoints {
            if e.programs.is_empty()
                && let Some(old) = view.endpoints.iter().find(|o| o.pod == e.pod && o.ifindex == e.ifindex)
            {
                e.programs.clone_from(&old.programs);
            }
        }
        view.endpoints = endpoints;
        view.maps = maps;
        if let Some(conntrack) = view.conntrack {
            view.maps.insert(datapath::map_name::CONNTRACK, conntrack);
        }
        view.identities = compiled.identities.len();
        view.coverage.clone_from(&compilation.coverage);
        view.problems.clone_from(&compilation.problems);
        view.problems.extend(outcome.errors.iter().map(|(pod, e)| format!("Pod {pod}: {e}")));
        view.problems.extend(outcome.ipcache_failures.iter().cloned());
        view.syncs += 1;
        view.passes += 1;
        view.sync_failures += outcome.failures as u64;
        view.sync_duration.observe(outcome.elapsed);
        if self.last_change != Some(compilation.changed_at) {
            if self.last_change.is_some() {
                let latency = SystemTime::now().duration_since(compilation.changed_at).unwrap_or_default();
                view.enforcement_latency.observe(latency);
            }
            self.last_change = Some(compilation.changed_at);
        }
        view.directory = directory;
        view.last_loop = Some(Instant::now());
        view.ready = true;
    }

    /// Each local pod as /status shows it.
    fn endpoint_statuses(&self, compiled: &Compiled, placements: &BTreeMap<PodRef, Placement>, outcome: &PassOutcome) -> Vec<EndpointStatus> {
        let mut entries_by_endpoint: BTreeMap<u32, usize> = BTreeMap::new();
        for (_, key) in self.syncer.loaded().policy.keys() {
            *entries_by_endpoint.entry(key.endpoint()).or_default() += 1;
        }
        let mut endpoints = Vec::new();
        for (pod, endpoint) in &compiled.endpoints {
            let placement = &placements[pod];
            let slot = placement.slot;
            let identities = [endpoint.ipv4.map(IpAddr::V4), endpoint.ipv6.map(IpAddr::V6)]
                .into_iter()
                .flatten()
                .filter_map(|a| compiled.ipcache.get(&crate::compile::IpPrefix::host(a)).copied())
                .collect();
            let attached = placement.interface.as_ref().is_some_and(|(n, i)| self.attached.get(n) == Some(i));
            endpoints.push(EndpointStatus {
                pod: pod.to_string(),
                interface: placement.interface.as_ref().map(|(n, _)| n.clone()),
                ifindex: placement.interface.as_ref().map(|(_, i)| *i),
                endpoint_id: slot.map(|s| s.id),
                ipv4: endpoint.ipv4.map(|a| a.to_string()),
                ipv6: endpoint.ipv6.map(|a| a.to_string()),
                identities,
                ingress_isolated: endpoint.judged(Direction::Ingress),
                egress_isolated: endpoint.judged(Direction::Egress),
                ingress_cluster_policies: endpoint.ingress_cluster_policies.clone(),
                egress_cluster_policies: endpoint.egress_cluster_policies.clone(),
                policy_entries: slot.and_then(|s| entries_by_endpoint.get(&s.id).copied()).unwrap_or(0),
                attached,
                programs: outcome.programs.get(pod).cloned().unwrap_or_default(),
                error: outcome.errors.get(pod).cloned().or_else(|| placement.error.clone()),
            });
        }
        endpoints
    }

    /// How full each map is.
    fn map_fill(&self) -> BTreeMap<&'static str, MapFill> {
        let loaded = self.syncer.loaded();
        let pins = self.datapath.pins();
        let fill = |name: &'static str, entries: usize| (name, MapFill { entries, capacity: datapath::capacity(pins, name).unwrap_or(0) });
        let addresses = loaded.ipcache.keys().filter(|(len, key)| key.is_address(*len)).count();
        let port_blocks = loaded.policy.keys().filter(|(len, _)| policy_common::policy::is_port_block(*len)).count();
        BTreeMap::from([
            fill(datapath::map_name::ADDRESSES, addresses),
            fill(datapath::map_name::PREFIXES, loaded.ipcache.len() - addresses),
            fill(datapath::map_name::POLICY, loaded.policy.len() - port_blocks),
            fill(datapath::map_name::PORT_RANGES, port_blocks),
            fill(datapath::map_name::ENDPOINTS, loaded.endpoints.len()),
        ])
    }
}

/// Names for the flow log: pods by address and endpoint, isolating policies, cookies.
fn directory(compilation: &Compilation, placements: &BTreeMap<PodRef, Placement>) -> Directory {
    let compiled = &compilation.compiled;
    let mut pods_by_endpoint = BTreeMap::new();
    let mut isolated_by = BTreeMap::new();
    for (pod, endpoint) in &compiled.endpoints {
        let Some(slot) = placements.get(pod).and_then(|p| p.slot) else { continue };
        pods_by_endpoint.insert(slot.id, pod.to_string());
        for direction in [Direction::Ingress, Direction::Egress] {
            let policies = endpoint.policies(direction).iter().map(ToString::to_string);
            let cluster = endpoint.cluster_policies(direction).iter().map(|name| format!("ClusterNetworkPolicy/{name}"));
            let names: Vec<String> = policies.chain(cluster).collect();
            if !names.is_empty() {
                isolated_by.insert((slot.id, direction), names.join(", "));
            }
        }
    }
    // The reserved cookies the compiler writes without a rule behind them.
    let reserved = [policy_common::policy::COOKIE_NODE, policy_common::policy::COOKIE_DEFAULT_ALLOW, policy_common::policy::COOKIE_ISOLATED];
    Directory {
        pods_by_ip: Arc::clone(&compilation.pods_by_ip),
        pods_by_endpoint,
        isolated_by,
        cookies: compiled.cookies.keys().chain(&reserved).map(|c| (*c, compiled.describe_cookie(*c))).collect(),
    }
}

/// What a pass did, for the view.
struct PassOutcome {
    errors: BTreeMap<PodRef, String>,
    programs: BTreeMap<PodRef, Vec<u32>>,
    failures: usize,
    ipcache_failures: Vec<String>,
    elapsed: Duration,
}

/// Whether the datapath judges the pod in some direction (a NetworkPolicy isolates it or a
/// ClusterNetworkPolicy applies): then a pod without its classifier would be open.
fn is_isolated(compiled: &Compiled, pod: &PodRef) -> bool {
    compiled.endpoints.get(pod).is_some_and(|e| e.judged(Direction::Ingress) || e.judged(Direction::Egress))
}

/// The interface of a local pod: the host route to its addresses, if that leads to a veth
/// that is no uplink and no other pod's. Else why not, for the pod's status. An interface
/// this agent attached to (same index) was checked then: a failing ioctl now must not
/// detach a pod that is enforced.
fn pod_interface(
    endpoint: &EndpointPolicy,
    host: &HostView,
    attached: &BTreeMap<String, u32>,
    taken: &BTreeMap<u32, &PodRef>,
) -> Result<(String, u32), String> {
    let addrs: Vec<IpAddr> = [endpoint.ipv4.map(IpAddr::V4), endpoint.ipv6.map(IpAddr::V6)].into_iter().flatten().collect();
    let names: BTreeSet<&str> = addrs.iter().filter_map(|a| netif::host_route_interface(&host.routes, *a)).collect();
    let name = match names.iter().collect::<Vec<_>>().as_slice() {
        [] => return Err(format!("no route (/32 or /128) to {addrs:?} in this network namespace; retrying")),
        [name] => **name,
        _ => return Err(format!("the routes to {addrs:?} lead to different interfaces {names:?}; retrying")),
    };
    if host.uplinks.contains(name) {
        return Err(format!("the route to {addrs:?} leads to {name}, which holds a node address: not a pod's veth"));
    }
    let ifindex = netif::ifindex(name).ok_or_else(|| format!("interface {name} of {addrs:?} does not exist; retrying"))?;
    match if attached.get(name) == Some(&ifindex) { Ok(true) } else { netif::is_veth(name) } {
        Ok(true) => {}
        Ok(false) => return Err(format!("the route to {addrs:?} leads to {name}, which is not a veth")),
        Err(e) => return Err(e.to_string()),
    }
    if let Some(other) = taken.get(&ifindex) {
        return Err(format!("the route to {addrs:?} leads to {name}, the interface of pod {other}"));
    }
    Ok((name.to_owned(), ifindex))
}

/// The first failed write of each pod (an endpoint write names the ifindex, a policy write
/// the endpoint id).
fn failures_by_pod(report: &SyncReport, slots: &BTreeMap<PodRef, EndpointSlot>) -> BTreeMap<PodRef, String> {
    let mut errors = BTreeMap::new();
    for failure in &report.failures {
        let pod = slots.iter().find(|(_, s)| match failure.endpoint {
            Some(EndpointRef::Ifindex(i)) => s.ifindex == i,
            Some(EndpointRef::Id(id)) => s.id == id,
            None => false,
        });
        let pod = pod.map(|(p, _)| p);
        tracing::error!(pod = ?pod.map(ToString::to_string), error = %failure.error, "map write failed; an isolated pod fails closed");
        if let Some(pod) = pod {
            errors.entry(pod.clone()).or_insert_with(|| failure.error.to_string());
        }
    }
    errors
}

/// The failed ipcache writes, as problems (they concern no one pod).
fn ipcache_failures(report: &SyncReport) -> Vec<String> {
    report.failures.iter().filter(|f| f.endpoint.is_none()).map(|f| format!("ipcache write failed: {}", f.error)).collect()
}
