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
    compile::{Compiled, EndpointSlot, NodeContext, PodRef, compile, render},
    datapath::{self, DEFAULT_BPFFS, Datapath, Hook, MapSizes, PinLayout},
    flowlog::{self, FlowLogMode},
    metrics::{self, AgentView, Directory, EndpointStatus, MapFill, SharedView},
    netif,
    sync::{EndpointRef, Syncer},
    watch::{KubeSource, ManifestSource, Source},
};

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Read Namespaces, Pods and NetworkPolicies from this directory (YAML/JSON) and watch it,
    /// instead of a Kubernetes API server.
    #[arg(long, conflicts_with = "kubeconfig")]
    pub manifests: Option<PathBuf>,
    /// Kubeconfig of the API server (default: in-cluster config, else $KUBECONFIG).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name: pods with this `spec.nodeName` are enforced here.
    #[arg(long, env = "NODE_NAME")]
    pub node: Option<String>,
    /// bpffs directory for pinned maps and links (mounted if it is not on a bpffs).
    #[arg(long, default_value = DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
    /// Address for /metrics, /healthz, /readyz and /status.
    #[arg(long, default_value = "127.0.0.1:9090")]
    pub metrics_addr: String,
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
    /// Full resync period (interfaces that appeared, retries).
    #[arg(long, default_value = "1000", value_name = "MS")]
    pub resync_ms: u64,
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
    tracing::info!(node = %node, bpffs = %pins.root().display(), adopted_endpoints = syncer.loaded().endpoints.len(), "classifier loaded");

    let view: SharedView = Arc::new(RwLock::new(AgentView::new(&node)));
    let serve_view = view.clone();
    let serve_pins = pins.clone();
    let addr = args.metrics_addr.clone();
    let server = tokio::spawn(async move { metrics::serve(&addr, serve_view, serve_pins).await });
    if args.flow_log != FlowLogMode::Off {
        let (flow_view, flow_pins, file) = (view.clone(), pins.clone(), args.flow_log_file.clone());
        tokio::spawn(async move {
            if let Err(e) = flowlog::run(flow_pins, flow_view, file).await {
                tracing::error!(error = %e, "flow log stopped");
            }
        });
    }

    let mut source = match &args.manifests {
        Some(dir) => Source::Manifests(ManifestSource::new(dir)?),
        None => {
            tracing::info!("waiting for the API server's first lists");
            Source::Kube(KubeSource::start(args.kubeconfig.as_deref()).await?)
        }
    };
    let mut agent = Agent {
        node,
        datapath,
        syncer,
        view,
        audit: args.audit,
        attached: BTreeMap::new(),
        last_change: None,
        downed: BTreeSet::new(),
        compilation: None,
        routes: Vec::new(),
        settled: false,
    };
    let resync = Duration::from_millis(args.resync_ms.max(50));
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|source| AgentError::Read { path: "SIGTERM handler".into(), source })?;
    let mut last_sweep = std::time::Instant::now();
    loop {
        if server.is_finished() {
            return match server.await {
                Ok(Err(e)) => Err(e),
                _ => Err(AgentError::Usage { flag: "--metrics-addr", what: "metrics server stopped".into() }),
            };
        }
        agent.reconcile(&source);
        if last_sweep.elapsed() >= CONNTRACK_SWEEP {
            last_sweep = std::time::Instant::now();
            match agent.syncer.sweep_conntrack() {
                Ok(removed) => tracing::debug!(removed, "conntrack sweep"),
                Err(error) => tracing::warn!(%error, "conntrack sweep"),
            }
        }
        tokio::select! {
            () = source.changed() => {}
            () = tokio::time::sleep(resync) => {}
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
        }
    }
    // Everything stays pinned: enforcement goes on until the next agent adopts it.
    tracing::info!("stopping; maps and links stay pinned and enforcing");
    Ok(())
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
    /// Links this agent took down because their classifier could not be attached.
    downed: BTreeSet<String>,
    /// The last compilation and what it was made from.
    compilation: Option<Compilation>,
    /// The routes the last pass placed pods with.
    routes: Vec<netif::Route>,
    /// The last pass left every pod placed, written and attached: with unchanged inputs
    /// there is nothing to do.
    settled: bool,
}

/// A compiled snapshot, with what it was compiled from: recompiling happens only when the
/// objects or the node's addresses change, not on every resync.
struct Compilation {
    generation: u64,
    node_ips: Vec<IpAddr>,
    compiled: Compiled,
    changed_at: SystemTime,
    problems: Vec<String>,
    pods_by_ip: BTreeMap<IpAddr, String>,
}

/// Where a local pod is, or why it cannot be enforced yet.
struct Placement {
    interface: Option<(String, u32)>,
    slot: Option<EndpointSlot>,
    error: Option<String>,
}

impl Agent {
    fn reconcile(&mut self, source: &Source) {
        let started = Instant::now();
        let node_ips = netif::node_addresses().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read node addresses");
            Vec::new()
        });
        let routes = netif::routes().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read routes");
            Vec::new()
        });
        let generation = source.generation();
        let current = self.compilation.take().filter(|c| c.generation == generation && c.node_ips == node_ips);
        if current.is_some() && self.settled && routes == self.routes && self.interfaces_unchanged() {
            self.compilation = current;
            let mut view = metrics::write(&self.view);
            view.last_loop = Some(Instant::now());
            view.passes += 1;
            return;
        }
        let compilation = current.unwrap_or_else(|| self.compile(source, generation, node_ips));
        let compiled = &compilation.compiled;
        let placements = self.place(compiled, &routes);
        self.routes = routes;

        // Detach first: a pod that is gone loses its program before its endpoint entry.
        let wanted: BTreeSet<&str> = placements.values().filter_map(|p| p.interface.as_ref().map(|(n, _)| n.as_str())).collect();
        for (ifname, hook) in self.datapath.pins().pinned_links() {
            if !wanted.contains(ifname.as_str()) {
                match datapath::detach(self.datapath.pins(), &ifname, hook) {
                    Ok(_) => tracing::info!(interface = %ifname, hook = %hook, "detached"),
                    Err(e) => tracing::warn!(interface = %ifname, error = %e, "detach failed"),
                }
                self.attached.remove(&ifname);
            }
        }

        let slots: BTreeMap<PodRef, EndpointSlot> = placements.iter().filter_map(|(pod, p)| Some((pod.clone(), p.slot?))).collect();
        let wanted_ids: BTreeMap<u32, u32> = slots.values().map(|s| (s.ifindex, s.id)).collect();
        let desired = render(compiled, &slots, self.audit);
        let report = self.syncer.apply(&desired);
        self.syncer.release_unused(&wanted_ids);
        let mut errors: BTreeMap<PodRef, String> = BTreeMap::new();
        for failure in &report.failures {
            let ifindex = match failure.endpoint {
                Some(EndpointRef::Ifindex(i)) => Some(i),
                Some(EndpointRef::Id(id)) => slots.values().find(|s| s.id == id).map(|s| s.ifindex),
                None => None,
            };
            let pod = ifindex.and_then(|i| slots.iter().find(|(_, s)| s.ifindex == i).map(|(p, _)| p.clone()));
            tracing::error!(pod = ?pod.as_ref().map(ToString::to_string), error = %failure.error, "map write failed; the pod fails closed");
            if let Some(pod) = pod {
                errors.entry(pod).or_insert_with(|| failure.error.to_string());
            }
        }

        // Attach after the endpoint entry exists, so the first packet already sees it.
        let mut programs = BTreeMap::new();
        for (pod, placement) in &placements {
            let (Some((ifname, ifindex)), Some(_)) = (&placement.interface, placement.slot) else { continue };
            if self.attached.get(ifname) == Some(ifindex) {
                continue;
            }
            match self.attach(ifname) {
                Ok(ids) => {
                    self.attached.insert(ifname.clone(), *ifindex);
                    programs.insert(pod.clone(), ids);
                    if self.downed.remove(ifname) {
                        let _ = netif::set_link_up(ifname, true);
                        tracing::info!(pod = %pod, interface = %ifname, "link up again, classifier attached");
                    }
                }
                Err(e) => {
                    tracing::error!(pod = %pod, interface = %ifname, error = %e, "attach failed");
                    // Without a classifier an isolated pod would be open: take its link down.
                    let isolated = compiled.endpoints.get(pod).is_some_and(|e| e.ingress_isolated || e.egress_isolated);
                    if isolated && netif::set_link_up(ifname, false).is_ok() {
                        tracing::warn!(pod = %pod, interface = %ifname, "link set down until the classifier is attached");
                        self.downed.insert(ifname.clone());
                    }
                    errors.entry(pod.clone()).or_insert_with(|| e.to_string());
                }
            }
        }

        let elapsed = started.elapsed();
        if report.applied > 0 || !report.failures.is_empty() {
            tracing::info!(writes = report.applied, failures = report.failures.len(), conntrack_flushed = report.conntrack_flushed, ms = elapsed.as_secs_f64() * 1e3, "maps synced");
        }
        self.settled = errors.is_empty()
            && placements.values().all(|p| p.slot.is_some() && p.interface.as_ref().is_some_and(|(n, i)| self.attached.get(n) == Some(i)));
        self.publish(&compilation, &placements, &errors, &programs, report.failures.len(), elapsed);
        self.compilation = Some(compilation);
    }

    /// Compiles a fresh snapshot of the source.
    fn compile(&self, source: &Source, generation: u64, node_ips: Vec<IpAddr>) -> Compilation {
        let snapshot = source.snapshot();
        let compiled = compile(&snapshot.state, &NodeContext { name: self.node.clone(), ips: node_ips.clone() });
        let problems = compiled.problems.iter().map(ToString::to_string).chain(snapshot.errors.iter().cloned()).collect();
        let pods_by_ip = snapshot
            .state
            .pods
            .iter()
            .filter(|(_, p)| !crate::resolve::is_host_network(p) && !crate::resolve::is_terminated(p))
            .flat_map(|(r, p)| crate::resolve::pod_ips(p, &mut Vec::new()).into_iter().map(move |ip| (ip, r.to_string())))
            .collect();
        Compilation { generation, node_ips, compiled, changed_at: snapshot.changed_at, problems, pods_by_ip }
    }

    /// Whether every interface this agent attached still has the index it had (a veth
    /// re-created under the same name keeps its routes but not its index).
    fn interfaces_unchanged(&self) -> bool {
        self.attached.iter().all(|(name, index)| netif::ifindex(name) == Some(*index))
    }

    /// Finds each local pod's interface (the route to its address) and endpoint slot.
    fn place(&mut self, compiled: &Compiled, routes: &[netif::Route]) -> BTreeMap<PodRef, Placement> {
        let mut placements = BTreeMap::new();
        for (pod, endpoint) in &compiled.endpoints {
            let addrs = [endpoint.ipv4.map(IpAddr::V4), endpoint.ipv6.map(IpAddr::V6)];
            let interface = addrs.iter().flatten().find_map(|a| netif::interface_for(routes, *a)).map(str::to_owned);
            let placement = match interface.and_then(|name| Some((netif::ifindex(&name)?, name))) {
                Some((ifindex, name)) => match self.syncer.slot(ifindex) {
                    Some(slot) => Placement { interface: Some((name, ifindex)), slot: Some(slot), error: None },
                    None => Placement { interface: Some((name, ifindex)), slot: None, error: Some("endpoint map full".into()) },
                },
                None => {
                    let what = format!("no route to {:?} in this network namespace; retrying", addrs.iter().flatten().collect::<Vec<_>>());
                    Placement { interface: None, slot: None, error: Some(what) }
                }
            };
            if let Some(error) = &placement.error {
                tracing::debug!(pod = %pod, error = %error, "pod not enforced yet");
            }
            placements.insert(pod.clone(), placement);
        }
        placements
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

    #[allow(clippy::too_many_arguments, reason = "one place that turns a pass into the view")]
    fn publish(
        &mut self,
        compilation: &Compilation,
        placements: &BTreeMap<PodRef, Placement>,
        errors: &BTreeMap<PodRef, String>,
        programs: &BTreeMap<PodRef, Vec<u32>>,
        failures: usize,
        elapsed: Duration,
    ) {
        let compiled = &compilation.compiled;
        let loaded = self.syncer.loaded();
        let mut entries_by_endpoint: BTreeMap<u32, usize> = BTreeMap::new();
        for (_, key) in loaded.policy.keys() {
            *entries_by_endpoint.entry(key.endpoint()).or_default() += 1;
        }
        let mut endpoints = Vec::new();
        let mut pods_by_endpoint = BTreeMap::new();
        let mut isolated_by = BTreeMap::new();
        for (pod, endpoint) in &compiled.endpoints {
            let placement = &placements[pod];
            let slot = placement.slot;
            if let Some(slot) = slot {
                pods_by_endpoint.insert(slot.id, pod.to_string());
                for direction in [Direction::Ingress, Direction::Egress] {
                    let policies = endpoint.policies(direction);
                    if !policies.is_empty() {
                        let names: Vec<String> = policies.iter().map(ToString::to_string).collect();
                        isolated_by.insert((slot.id, direction), names.join(", "));
                    }
                }
            }
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
                ingress_isolated: endpoint.ingress_isolated,
                egress_isolated: endpoint.egress_isolated,
                policy_entries: slot.and_then(|s| entries_by_endpoint.get(&s.id).copied()).unwrap_or(0),
                attached,
                programs: programs.get(pod).cloned().unwrap_or_default(),
                error: errors.get(pod).cloned().or_else(|| placement.error.clone()),
            });
        }
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
        let pins = self.datapath.pins();
        let fill = |name: &'static str, entries: usize| (name, MapFill { entries, capacity: datapath::capacity(pins, name).unwrap_or(0) });
        let addresses = loaded.ipcache.keys().filter(|(len, key)| key.is_address(*len)).count();
        let port_blocks = loaded.policy.keys().filter(|(len, _)| policy_common::policy::is_port_block(*len)).count();
        view.maps = BTreeMap::from([
            fill(datapath::map_name::ADDRESSES, addresses),
            fill(datapath::map_name::PREFIXES, loaded.ipcache.len() - addresses),
            fill(datapath::map_name::POLICY, loaded.policy.len() - port_blocks),
            fill(datapath::map_name::PORT_RANGES, port_blocks),
            fill(datapath::map_name::ENDPOINTS, loaded.endpoints.len()),
        ]);
        view.identities = compiled.identities.len();
        view.problems.clone_from(&compilation.problems);
        view.syncs += 1;
        view.passes += 1;
        view.sync_failures += failures as u64;
        view.sync_duration.observe(elapsed);
        if self.last_change != Some(compilation.changed_at) {
            if self.last_change.is_some() {
                let latency = SystemTime::now().duration_since(compilation.changed_at).unwrap_or_default();
                view.enforcement_latency.observe(latency);
            }
            self.last_change = Some(compilation.changed_at);
        }
        view.directory = Directory {
            pods_by_ip: compilation.pods_by_ip.clone(),
            pods_by_endpoint,
            isolated_by,
            cookies: compiled.cookies.keys().map(|c| (*c, compiled.describe_cookie(*c))).chain([(policy_common::policy::COOKIE_NODE, compiled.describe_cookie(policy_common::policy::COOKIE_NODE))]).collect(),
        };
        view.last_loop = Some(Instant::now());
        view.ready = true;
    }
}

