//! Every map of the classifier, pinned by name (under the agent's bpffs directory) so that a
//! restarted agent adopts them. Names carry a layout version and stay under 16 characters.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use policy_common::{
    conntrack::{self, CtKey, CtReleased, CtUsage, CtValue, FragKey, FragValue},
    counters::{self, Counter},
    endpoint::{self, EndpointInfo, EndpointKey},
    event::{self, Config, RateState},
    ipcache::{self, IpcacheKey, IpcacheValue},
    policy::{self, PolicyKey, PolicyValue},
    service,
};

/// Whole addresses (/32, /128) to identities.
#[map(name = "ADDRESSES_V1")]
pub static ADDRESSES: HashMap<IpcacheKey, IpcacheValue> = HashMap::pinned(ipcache::MAX_ADDRESSES, 0);

/// Other prefixes (ipBlocks) to identities.
#[map(name = "PREFIXES_V1")]
pub static PREFIXES: LpmTrie<IpcacheKey, IpcacheValue> = LpmTrie::pinned(ipcache::MAX_PREFIXES, 0);

#[map(name = "ENDPOINTS_V3")]
pub static ENDPOINTS: HashMap<EndpointKey, EndpointInfo> = HashMap::pinned(endpoint::MAX_ENTRIES, 0);

/// Endpoint id to interface: where a deferred packet's mark leads (see policy_common::service).
#[map(name = "ENDPOINT_IDS_V1")]
pub static ENDPOINT_IDS: Array<EndpointKey> = Array::pinned(endpoint::MAX_ENTRIES, 0);

/// Service address ranges (the value is unused): egress towards them is deferred.
#[map(name = "SERVICE_NETS_V1")]
pub static SERVICE_NETS: LpmTrie<IpcacheKey, u32> = LpmTrie::pinned(service::MAX_NETS, 0);

/// Exact-port, whole-protocol and any-protocol entries (wildcard fields zero).
#[map(name = "POLICY_V3")]
pub static POLICY: HashMap<PolicyKey, PolicyValue> = HashMap::pinned(policy::MAX_ENTRIES, 0);

/// `endPort` blocks.
#[map(name = "PORT_RANGES_V2")]
pub static PORT_RANGES: LpmTrie<PolicyKey, PolicyValue> = LpmTrie::pinned(policy::MAX_RANGE_ENTRIES, 0);

/// A plain hash allocated on demand, with a budget per endpoint (see policy_common::conntrack).
#[map(name = "CONNTRACK_V2")]
pub static CONNTRACK: HashMap<CtKey, CtValue> = HashMap::pinned(conntrack::MAX_ENTRIES, BPF_F_NO_PREALLOC);

#[map(name = "CT_USAGE_V1")]
pub static CT_USAGE: Array<CtUsage> = Array::pinned(conntrack::USAGE_SLOTS, 0);

#[map(name = "CT_RELEASED_V1")]
pub static CT_RELEASED: Array<CtReleased> = Array::pinned(conntrack::USAGE_SLOTS, 0);

#[map(name = "FRAGMENTS_V1")]
pub static FRAGMENTS: LruHashMap<FragKey, FragValue> = LruHashMap::pinned(conntrack::FRAG_MAX_ENTRIES, 0);

#[map(name = "COUNTERS_V1")]
pub static COUNTERS: PerCpuArray<Counter> = PerCpuArray::pinned(counters::MAX_ENTRIES, 0);

#[map(name = "EVENTS_V1")]
pub static EVENTS: RingBuf = RingBuf::pinned(event::RING_BYTES, 0);

#[map(name = "CONFIG_V2")]
pub static CONFIG: Array<Config> = Array::pinned(1, 0);

#[map(name = "EVENT_RATE_V1")]
pub static EVENT_RATE: PerCpuArray<RateState> = PerCpuArray::pinned(1, 0);
