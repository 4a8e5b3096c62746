//! Loading the classifier, pinning its maps and links under one bpffs directory, and
//! attaching it to interfaces. Everything lives under the pin root so that a restarted agent
//! adopts what is there and `cleanup` can remove all of it.

use std::{
    fmt,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
    },
};
use policy_common::{
    Direction,
    conntrack::{CtKey, CtReleased, CtUsage, CtValue},
    counters::Counter,
    endpoint::{EndpointInfo, EndpointKey},
    event::Config,
    ipcache::{IpcacheKey, IpcacheValue},
    policy::{PolicyKey, PolicyValue, is_port_block},
};

use crate::{
    AgentError,
    compile::{MapContents, MapOp},
};

/// Where the agent pins everything unless told otherwise.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/policy";

/// The classifier object, built by build.rs with aya-build.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/policy-ebpf"));

/// Map names, as declared in policy-ebpf/src/maps.rs (the kernel keeps 15 characters).
pub mod map_name {
    pub const ADDRESSES: &str = "ADDRESSES_V1";
    pub const PREFIXES: &str = "PREFIXES_V1";
    pub const ENDPOINTS: &str = "ENDPOINTS_V3";
    pub const POLICY: &str = "POLICY_V3";
    pub const PORT_RANGES: &str = "PORT_RANGES_V2";
    pub const CONNTRACK: &str = "CONNTRACK_V2";
    pub const FRAGMENTS: &str = "FRAGMENTS_V1";
    pub const COUNTERS: &str = "COUNTERS_V1";
    pub const EVENTS: &str = "EVENTS_V1";
    pub const CONFIG: &str = "CONFIG_V2";
    pub const EVENT_RATE: &str = "EVENT_RATE_V1";
    pub const CT_USAGE: &str = "CT_USAGE_V1";
    pub const CT_RELEASED: &str = "CT_RELEASED_V1";
    pub const ENDPOINT_IDS: &str = "ENDPOINT_IDS_V1";
    pub const SERVICE_NETS: &str = "SERVICE_NETS_V1";
    pub const ALL: [&str; 15] = [
        ADDRESSES, PREFIXES, ENDPOINTS, POLICY, PORT_RANGES, CONNTRACK, FRAGMENTS, COUNTERS, EVENTS, CONFIG, EVENT_RATE, CT_USAGE,
        CT_RELEASED, ENDPOINT_IDS, SERVICE_NETS,
    ];
}

/// The two attachment points on a pod's host-side veth.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hook {
    /// TC ingress of the host-side veth: traffic leaving the pod (its egress).
    FromPod,
    /// TC egress of the host-side veth: traffic entering the pod (its ingress).
    ToPod,
}

impl Hook {
    pub const BOTH: [Hook; 2] = [Hook::FromPod, Hook::ToPod];

    pub const fn program(self) -> &'static str {
        match self {
            Hook::FromPod => "from_pod",
            Hook::ToPod => "to_pod",
        }
    }

    const fn attach_type(self) -> TcAttachType {
        match self {
            Hook::FromPod => TcAttachType::Ingress,
            Hook::ToPod => TcAttachType::Egress,
        }
    }

    pub const fn pod_direction(self) -> Direction {
        match self {
            Hook::FromPod => Direction::Egress,
            Hook::ToPod => Direction::Ingress,
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        [Hook::FromPod, Hook::ToPod].into_iter().find(|h| h.program() == name)
    }
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.program())
    }
}

/// Every path under the pin root, in one place.
#[derive(Clone, Debug)]
pub struct PinLayout {
    root: PathBuf,
}

impl PinLayout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    /// Links are named after the interface and hook: `links/<ifname>@<hook>`.
    pub fn link(&self, ifname: &str, hook: Hook) -> PathBuf {
        self.links_dir().join(format!("{ifname}@{hook}"))
    }

    /// The (interface, hook) pairs that have a pinned link.
    pub fn pinned_links(&self) -> Vec<(String, Hook)> {
        let Ok(entries) = std::fs::read_dir(self.links_dir()) else { return Vec::new() };
        let mut links: Vec<_> = entries
            .filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                let (ifname, hook) = name.rsplit_once('@')?;
                Some((ifname.to_owned(), Hook::parse(hook)?))
            })
            .collect();
        links.sort();
        links
    }
}

fn ebpf_error(what: impl Into<String>, source: impl std::error::Error + Send + Sync + 'static) -> AgentError {
    AgentError::Ebpf { what: what.into(), source: Box::new(source) }
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Makes sure `root` is a directory on a bpffs, mounting one there if it is not (for example
/// under `ip netns exec`, which remounts /sys).
pub fn ensure_bpffs(root: &Path) -> Result<(), AgentError> {
    let mount_err = |what: &str, source| AgentError::Mount { path: root.to_owned(), what: what.to_owned(), source };
    std::fs::create_dir_all(root).map_err(|source| mount_err("create the directory", source))?;
    if is_bpffs(root)? {
        return Ok(());
    }
    let status = std::process::Command::new("mount")
        .args(["-t", "bpf", "bpf"])
        .arg(root)
        .status()
        .map_err(|source| mount_err("run mount", source))?;
    if !status.success() || !is_bpffs(root)? {
        return Err(mount_err("mount a bpffs (it is not on one)", std::io::Error::other(format!("mount exited with {status}"))));
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> Result<bool, AgentError> {
    use std::os::unix::ffi::OsStrExt as _;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| AgentError::Usage { flag: "--bpffs", what: e.to_string() })?;
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: a valid NUL-terminated path and a buffer of the right type.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(AgentError::Syscall { what: format!("statfs {}", path.display()), source: std::io::Error::last_os_error() });
    }
    // SAFETY: statfs succeeded and filled the struct.
    #[allow(clippy::unnecessary_cast, reason = "f_type's width differs between libcs")]
    Ok(unsafe { stat.assume_init() }.f_type as i64 == BPF_FS_MAGIC)
}

/// Map capacities chosen at load time (the object's defaults otherwise). A map that is
/// already pinned keeps the size it was created with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapSizes {
    /// Pod and node addresses (the ipcache's hash map).
    pub addresses: Option<u32>,
    /// Exact, protocol and any-protocol allow entries (the policy hash map).
    pub policy: Option<u32>,
    pub conntrack: Option<u32>,
}

/// The loaded classifier: both programs, their maps (pinned, shared with every earlier
/// instance) and the links this process attached.
pub struct Datapath {
    ebpf: Ebpf,
    pins: PinLayout,
}

/// What one attachment did.
#[derive(Debug)]
pub struct Attached {
    pub hook: Hook,
    pub program_id: u32,
    pub link: PathBuf,
    /// An existing pinned link had its program replaced atomically (agent restart).
    pub replaced: bool,
}

impl Datapath {
    /// Loads the programs; maps already pinned under `pins` are reused, the rest created
    /// and pinned.
    pub fn load(pins: PinLayout) -> Result<Self, AgentError> {
        Self::load_with_sizes(pins, MapSizes::default())
    }

    /// Like [`Datapath::load`], with map capacities other than the defaults.
    pub fn load_with_sizes(pins: PinLayout, sizes: MapSizes) -> Result<Self, AgentError> {
        if EBPF_OBJECT.is_empty() {
            return Err(AgentError::Usage {
                flag: "AYA_BUILD_SKIP",
                what: "this binary was built without the eBPF object; rebuild without AYA_BUILD_SKIP".into(),
            });
        }
        ensure_bpffs(pins.root())?;
        check_pinned_layouts(&pins)?;
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(pins.root());
        for (name, size) in [(map_name::ADDRESSES, sizes.addresses), (map_name::POLICY, sizes.policy), (map_name::CONNTRACK, sizes.conntrack)] {
            if let Some(size) = size {
                loader.map_max_entries(name, size);
            }
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|e| ebpf_error("load object", e))?;
        for hook in Hook::BOTH {
            program_mut(&mut ebpf, hook)?.load().map_err(|e| ebpf_error(format!("load program {hook}"), e))?;
        }
        Ok(Self { ebpf, pins })
    }

    pub fn pins(&self) -> &PinLayout {
        &self.pins
    }

    /// The loaded program of `hook` (for BPF_PROG_TEST_RUN).
    pub fn program(&self, hook: Hook) -> Result<&SchedClassifier, AgentError> {
        self.ebpf
            .program(hook.program())
            .and_then(|p| p.try_into().ok())
            .ok_or_else(|| AgentError::Usage { flag: "program", what: format!("{hook} missing from object") })
    }

    pub fn program_id(&self, hook: Hook) -> Result<u32, AgentError> {
        let program = self.program(hook)?;
        Ok(program.info().map_err(|e| ebpf_error(format!("info of {hook}"), e))?.id())
    }

    /// Attaches `hook` on `ifname` through TCX and pins the link. If a link is already pinned
    /// there (an earlier agent), its program is replaced atomically: no packet goes unjudged.
    pub fn attach(&mut self, ifname: &str, hook: Hook) -> Result<Attached, AgentError> {
        let path = self.pins.link(ifname, hook);
        let program_id = self.program_id(hook)?;
        let program = program_mut(&mut self.ebpf, hook)?;
        if path.exists()
            && let Ok(link) = adopt_link(&path)
        {
            match program.attach_to_link(link) {
                Ok(id) => {
                    // The pin keeps the link alive; this process lets go of its handle.
                    let link = program.take_link(id).map_err(|e| ebpf_error("take link", e))?;
                    drop_without_detach(link);
                    return Ok(Attached { hook, program_id, link: path, replaced: true });
                }
                // A link whose interface was deleted (and perhaps re-created under the same
                // name) cannot be updated: attach anew below.
                Err(e) => tracing::info!(interface = ifname, hook = %hook, error = %e, "pinned link is stale; attaching anew"),
            }
        }
        std::fs::create_dir_all(self.pins.links_dir())
            .map_err(|source| AgentError::Read { path: self.pins.links_dir(), source })?;
        // Attach the new link before the old pin goes, so a live interface is never unjudged.
        // First in the TCX chain: a program that ends the chain (a CNI's redirect) cannot skip
        // our verdict; our passes hand on to it (TCX_NEXT).
        let id = program
            .attach_with_options(ifname, hook.attach_type(), TcAttachOptions::TcxOrder(LinkOrder::first()))
            .map_err(|e| ebpf_error(format!("attach {hook} to {ifname}"), e))?;
        let link = program.take_link(id).map_err(|e| ebpf_error("take link", e))?;
        let fd_link: FdLink = link.try_into().map_err(|e| ebpf_error("TCX link", e))?;
        if path.exists() {
            std::fs::remove_file(&path).map_err(|source| AgentError::Read { path: path.clone(), source })?;
        }
        let pinned = fd_link.pin(&path).map_err(|e| ebpf_error(format!("pin link {}", path.display()), e))?;
        drop(pinned);
        Ok(Attached { hook, program_id, link: path, replaced: false })
    }

    /// Starts forwarding the classifier's aya-log records (drop logs with `--ebpf-debug`) to
    /// the `log` facade, which the agent's tracing subscriber prints.
    pub fn spawn_ebpf_logger(&mut self) -> Result<(), AgentError> {
        let logger = aya_log::EbpfLogger::init(&mut self.ebpf).map_err(|e| ebpf_error("aya-log", e))?;
        // SAFETY: the logger owns its ring buffer fd and keeps it open, unchanged, for as long
        // as the AsyncFd owns the logger.
        let mut logger = unsafe { tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }
            .map_err(|e| ebpf_error("aya-log fd", std::io::Error::from(e)))?;
        tokio::spawn(async move {
            loop {
                let Ok(mut guard) = logger.readable_mut().await else { return };
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        });
        Ok(())
    }

    /// Takes the maps out of the loaded object, for the sync layer.
    pub fn take_maps(&mut self) -> Result<Maps, AgentError> {
        let mut take = |name: &str| {
            self.ebpf
                .take_map(name)
                .ok_or_else(|| AgentError::Usage { flag: "map", what: format!("{name} missing from object") })
        };
        Maps::from_maps(&mut take)
    }
}

/// Removes the pinned link of `hook` on `ifname`, which detaches it. Returns whether there was
/// one.
pub fn detach(pins: &PinLayout, ifname: &str, hook: Hook) -> Result<bool, AgentError> {
    let path = pins.link(ifname, hook);
    if !path.exists() {
        return Ok(false);
    }
    match PinnedLink::from_pin(&path) {
        Ok(link) => {
            let link = link.unpin().map_err(|source| AgentError::Read { path: path.clone(), source })?;
            drop(link);
        }
        Err(_) => std::fs::remove_file(&path).map_err(|source| AgentError::Read { path: path.clone(), source })?,
    }
    Ok(true)
}

fn adopt_link(path: &Path) -> Result<SchedClassifierLink, AgentError> {
    let pinned = PinnedLink::from_pin(path).map_err(|e| ebpf_error(format!("open {}", path.display()), e))?;
    let fd_link: FdLink = pinned.into();
    SchedClassifierLink::try_from(fd_link).map_err(|e| ebpf_error("not a TC link", e))
}

/// Drops a link handle whose pin keeps the attachment alive. For a TCX link, closing our fd
/// does not detach while the pin holds a reference.
fn drop_without_detach(link: SchedClassifierLink) {
    drop(link);
}

fn program_mut(ebpf: &mut Ebpf, hook: Hook) -> Result<&mut SchedClassifier, AgentError> {
    ebpf.program_mut(hook.program())
        .and_then(|p| p.try_into().ok())
        .ok_or_else(|| AgentError::Usage { flag: "program", what: format!("{hook} missing from object") })
}

/// A map pinned by an older agent with another key or value size would be reused blindly by
/// the loader; refuse instead (names carry a version suffix, so this means a corrupt pin).
fn check_pinned_layouts(pins: &PinLayout) -> Result<(), AgentError> {
    let expected: [(&str, usize, usize); 9] = [
        (map_name::ADDRESSES, size_of::<IpcacheKey>(), size_of::<IpcacheValue>()),
        (map_name::PREFIXES, 4 + size_of::<IpcacheKey>(), size_of::<IpcacheValue>()),
        (map_name::ENDPOINTS, size_of::<EndpointKey>(), size_of::<EndpointInfo>()),
        (map_name::POLICY, size_of::<PolicyKey>(), size_of::<PolicyValue>()),
        (map_name::PORT_RANGES, 4 + size_of::<PolicyKey>(), size_of::<PolicyValue>()),
        (map_name::CONNTRACK, size_of::<CtKey>(), size_of::<CtValue>()),
        (map_name::COUNTERS, 4, size_of::<Counter>()),
        (map_name::ENDPOINT_IDS, 4, size_of::<EndpointKey>()),
        (map_name::SERVICE_NETS, 4 + size_of::<IpcacheKey>(), 4),
    ];
    for (name, key_size, value_size) in expected {
        let path = pins.map(name);
        if !path.exists() {
            continue;
        }
        let data = MapData::from_pin(&path).map_err(|e| ebpf_error(format!("open {}", path.display()), e))?;
        let info = data.info().map_err(|e| ebpf_error(format!("info of {name}"), e))?;
        if info.key_size() as usize != key_size || info.value_size() as usize != value_size {
            return Err(AgentError::Usage {
                flag: "--bpffs",
                what: format!(
                    "pinned map {} has key/value size {}/{}, expected {key_size}/{value_size}; run `policy-agent cleanup`",
                    path.display(),
                    info.key_size(),
                    info.value_size()
                ),
            });
        }
    }
    Ok(())
}

/// Typed handles on every map the agent reads or writes.
pub struct Maps {
    pub addresses: HashMap<MapData, IpcacheKey, IpcacheValue>,
    pub prefixes: LpmTrie<MapData, IpcacheKey, IpcacheValue>,
    pub endpoints: HashMap<MapData, EndpointKey, EndpointInfo>,
    /// Endpoint id -> interface, written with each endpoint entry.
    pub endpoint_ids: Array<MapData, EndpointKey>,
    pub service_nets: LpmTrie<MapData, IpcacheKey, u32>,
    pub policy: HashMap<MapData, PolicyKey, PolicyValue>,
    pub port_ranges: LpmTrie<MapData, PolicyKey, PolicyValue>,
    pub conntrack: HashMap<MapData, CtKey, CtValue>,
    pub ct_usage: Array<MapData, CtUsage>,
    pub ct_released: Array<MapData, CtReleased>,
    pub counters: PerCpuArray<MapData, Counter>,
    pub config: Array<MapData, Config>,
    pub events: RingBuf<MapData>,
}

impl Maps {
    /// Opens the maps an agent pinned, without loading anything (status, tests).
    pub fn open_pinned(pins: &PinLayout) -> Result<Self, AgentError> {
        let mut open = |name: &str| -> Result<Map, AgentError> {
            let path = pins.map(name);
            let data = MapData::from_pin(&path).map_err(|e| ebpf_error(format!("open {}", path.display()), e))?;
            Map::from_map_data(data).map_err(|e| ebpf_error(format!("map type of {name}"), e))
        };
        Self::from_maps(&mut open)
    }

    fn from_maps(take: &mut impl FnMut(&str) -> Result<Map, AgentError>) -> Result<Self, AgentError> {
        fn typed<T: TryFrom<Map, Error = aya::maps::MapError>>(map: Map, name: &str) -> Result<T, AgentError> {
            T::try_from(map).map_err(|e| ebpf_error(format!("map {name}"), e))
        }
        Ok(Self {
            addresses: typed(take(map_name::ADDRESSES)?, map_name::ADDRESSES)?,
            prefixes: typed(take(map_name::PREFIXES)?, map_name::PREFIXES)?,
            endpoints: typed(take(map_name::ENDPOINTS)?, map_name::ENDPOINTS)?,
            endpoint_ids: typed(take(map_name::ENDPOINT_IDS)?, map_name::ENDPOINT_IDS)?,
            service_nets: typed(take(map_name::SERVICE_NETS)?, map_name::SERVICE_NETS)?,
            policy: typed(take(map_name::POLICY)?, map_name::POLICY)?,
            port_ranges: typed(take(map_name::PORT_RANGES)?, map_name::PORT_RANGES)?,
            conntrack: typed(take(map_name::CONNTRACK)?, map_name::CONNTRACK)?,
            ct_usage: typed(take(map_name::CT_USAGE)?, map_name::CT_USAGE)?,
            ct_released: typed(take(map_name::CT_RELEASED)?, map_name::CT_RELEASED)?,
            counters: typed(take(map_name::COUNTERS)?, map_name::COUNTERS)?,
            config: typed(take(map_name::CONFIG)?, map_name::CONFIG)?,
            events: typed(take(map_name::EVENTS)?, map_name::EVENTS)?,
        })
    }

    /// Applies one write of the compiler's logical maps to the kernel's: whole addresses to
    /// the address hash, other prefixes to the prefix trie, port blocks to the range trie,
    /// other allow entries to the policy hash. Returns the map written. Removing what is not
    /// there is not an error.
    pub fn write(&mut self, op: &MapOp) -> Result<&'static str, (&'static str, MapError)> {
        let (map, result) = match *op {
            MapOp::IpcacheUpsert { prefix_len, key, value } if key.is_address(prefix_len) => {
                (map_name::ADDRESSES, self.addresses.insert(key, value, 0))
            }
            MapOp::IpcacheUpsert { prefix_len, key, value } => (map_name::PREFIXES, self.prefixes.insert(&Key::new(prefix_len, key), value, 0)),
            MapOp::IpcacheRemove { prefix_len, key } if key.is_address(prefix_len) => {
                (map_name::ADDRESSES, ignore_missing(self.addresses.remove(&key)))
            }
            MapOp::IpcacheRemove { prefix_len, key } => (map_name::PREFIXES, ignore_missing(self.prefixes.remove(&Key::new(prefix_len, key)))),
            MapOp::PolicyUpsert { prefix_len, key, value } if is_port_block(prefix_len) => {
                (map_name::PORT_RANGES, self.port_ranges.insert(&Key::new(prefix_len, key), value, 0))
            }
            MapOp::PolicyUpsert { key, value, .. } => (map_name::POLICY, self.policy.insert(key, value, 0)),
            MapOp::PolicyRemove { prefix_len, key } if is_port_block(prefix_len) => {
                (map_name::PORT_RANGES, ignore_missing(self.port_ranges.remove(&Key::new(prefix_len, key))))
            }
            MapOp::PolicyRemove { key, .. } => (map_name::POLICY, ignore_missing(self.policy.remove(&key))),
            MapOp::EndpointUpsert { ifindex, info } => match self.endpoint_ids.set(info.id, EndpointKey { ifindex }, 0) {
                // The id's interface first: a deferred packet of this endpoint finds it.
                Ok(()) => (map_name::ENDPOINTS, self.endpoints.insert(EndpointKey { ifindex }, info, 0)),
                Err(e) => (map_name::ENDPOINT_IDS, Err(e)),
            },
            MapOp::EndpointRemove { ifindex } => (map_name::ENDPOINTS, ignore_missing(self.endpoints.remove(&EndpointKey { ifindex }))),
        };
        result.map(|()| map).map_err(|e| (map, e))
    }

    /// Reads the compiler-owned maps back into their logical form.
    pub fn read(&self) -> Result<MapContents, AgentError> {
        let err = |map: &'static str| move |e: MapError| ebpf_error(format!("read {map}"), e);
        let mut contents = MapContents::default();
        for entry in self.addresses.iter() {
            let (key, value) = entry.map_err(err(map_name::ADDRESSES))?;
            let bits = if key.family() == policy_common::family::IPV4 { 32 } else { 128 };
            contents.ipcache.insert((IpcacheKey::lpm_prefix_len(bits), key), value);
        }
        for entry in self.prefixes.iter() {
            let (key, value) = entry.map_err(err(map_name::PREFIXES))?;
            contents.ipcache.insert((key.prefix_len(), key.data()), value);
        }
        for entry in self.endpoints.iter() {
            let (key, value) = entry.map_err(err(map_name::ENDPOINTS))?;
            contents.endpoints.insert(key.ifindex, value);
        }
        for entry in self.policy.iter() {
            let (key, value) = entry.map_err(err(map_name::POLICY))?;
            contents.policy.insert((key.hash_prefix_len(), key), value);
        }
        for entry in self.port_ranges.iter() {
            let (key, value) = entry.map_err(err(map_name::PORT_RANGES))?;
            contents.policy.insert((key.prefix_len(), key.data()), value);
        }
        Ok(contents)
    }
}

impl Maps {
    /// Points each loaded endpoint's id at its interface (maps pinned by an agent that
    /// predates the id map have none).
    pub fn index_endpoint_ids(&mut self, loaded: &MapContents) -> Result<(), AgentError> {
        for (&ifindex, info) in &loaded.endpoints {
            self.endpoint_ids.set(info.id, EndpointKey { ifindex }, 0).map_err(|e| ebpf_error(format!("write {}", map_name::ENDPOINT_IDS), e))?;
        }
        Ok(())
    }

    /// Makes the Service ranges exactly `nets`: egress towards them is judged after the
    /// translation (see `policy_common::service`).
    pub fn set_service_nets(&mut self, nets: &[crate::resolve::IpPrefix]) -> Result<(), AgentError> {
        let err = |e: MapError| ebpf_error(format!("write {}", map_name::SERVICE_NETS), e);
        let wanted: Vec<Key<IpcacheKey>> = nets.iter().map(service_key).collect();
        let present: Vec<Key<IpcacheKey>> = self.service_nets.keys().collect::<Result<_, _>>().map_err(err)?;
        for key in &wanted {
            self.service_nets.insert(key, 0, 0).map_err(err)?;
        }
        for key in present.iter().filter(|k| !wanted.iter().any(|w| w.prefix_len() == k.prefix_len() && w.data() == k.data())) {
            ignore_missing(self.service_nets.remove(key)).map_err(err)?;
        }
        Ok(())
    }
}

fn service_key(net: &crate::resolve::IpPrefix) -> Key<IpcacheKey> {
    let key = match net.addr() {
        std::net::IpAddr::V4(a) => IpcacheKey::v4(a.octets()),
        std::net::IpAddr::V6(a) => IpcacheKey::v6(a.octets()),
    };
    Key::new(IpcacheKey::lpm_prefix_len(net.prefix_len()), key)
}

fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

/// The capacity of a pinned map (its size is fixed when it is first created).
pub fn capacity(pins: &PinLayout, name: &str) -> Option<u32> {
    aya::maps::MapInfo::from_pin(pins.map(name)).ok().map(|info| info.max_entries())
}

/// Removes every link and map pinned under `pins` and the directory itself if it is empty.
pub fn cleanup(pins: &PinLayout) -> Result<Vec<PathBuf>, AgentError> {
    let mut removed = Vec::new();
    for (ifname, hook) in pins.pinned_links() {
        if detach(pins, &ifname, hook)? {
            removed.push(pins.link(&ifname, hook));
        }
    }
    let _ = std::fs::remove_dir(pins.links_dir());
    for name in map_name::ALL {
        let path = pins.map(name);
        if path.exists() {
            std::fs::remove_file(&path).map_err(|source| AgentError::Read { path: path.clone(), source })?;
            removed.push(path);
        }
    }
    Ok(removed)
}
