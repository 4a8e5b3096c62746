//! Raw map contents as the kernel sees them, the diff between two versions, and a userspace
//! model of the classifier's lookup (used by `explain` and the tests, so both judge traffic
//! from the same bytes the kernel would).

use std::collections::BTreeMap;
use std::net::IpAddr;

use policy_common::Direction;
use policy_common::endpoint::{
    EndpointInfo, FLAG_AUDIT, FLAG_EGRESS_ISOLATED, FLAG_HAS_IPV4, FLAG_HAS_IPV6, FLAG_INGRESS_ISOLATED,
};
use policy_common::identity;
use policy_common::ipcache::{IpcacheKey, IpcacheValue};
use policy_common::policy::{PREFIX_ANY_PROTOCOL, PREFIX_FULL, PREFIX_PROTOCOL, PolicyKey, PolicyValue, lookup};

use super::{Compiled, PodRef, RuleKey};
use crate::resolve::IpPrefix;

/// Where a local pod's classifier is attached and the endpoint id it was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointSlot {
    pub ifindex: u32,
    /// `1..endpoint::MAX_ENTRIES`: used in policy keys and as the counter slot.
    pub id: u32,
}

/// The entries of the three maps the compiler owns. LPM keys carry their prefix length.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapContents {
    pub ipcache: BTreeMap<(u32, IpcacheKey), IpcacheValue>,
    pub endpoints: BTreeMap<u32, EndpointInfo>,
    pub policy: BTreeMap<(u32, PolicyKey), PolicyValue>,
}

fn ipcache_key(prefix: &IpPrefix) -> (u32, IpcacheKey) {
    let key = match prefix.addr() {
        IpAddr::V4(v4) => IpcacheKey::v4(v4.octets()),
        IpAddr::V6(v6) => IpcacheKey::v6(v6.octets()),
    };
    (IpcacheKey::lpm_prefix_len(prefix.prefix_len()), key)
}

/// The prefix of an ipcache entry (the inverse of the key the compiler writes).
pub fn ipcache_prefix(prefix_len: u32, key: &IpcacheKey) -> Option<IpPrefix> {
    let bits = u8::try_from(prefix_len.checked_sub(IpcacheKey::lpm_prefix_len(0))?).ok()?;
    let addr = match key.family() {
        policy_common::family::IPV4 => {
            let a = key.addr();
            IpAddr::from([a[0], a[1], a[2], a[3]])
        }
        policy_common::family::IPV6 => IpAddr::from(*key.addr()),
        _ => return None,
    };
    IpPrefix::new(addr, bits)
}

/// Turns compiled state into map entries. Endpoints without a slot (no interface yet) are
/// left out; `audit` sets [`FLAG_AUDIT`] on every endpoint.
pub fn render(compiled: &Compiled, slots: &BTreeMap<PodRef, EndpointSlot>, audit: bool) -> MapContents {
    let mut contents = MapContents::default();
    for (prefix, identity) in &compiled.ipcache {
        contents.ipcache.insert(ipcache_key(prefix), IpcacheValue { identity: *identity });
    }
    for (pod, endpoint) in &compiled.endpoints {
        let Some(slot) = slots.get(pod) else { continue };
        let mut flags = 0;
        // A direction only ClusterNetworkPolicies select is judged too: its entries decide.
        if endpoint.judged(Direction::Ingress) {
            flags |= FLAG_INGRESS_ISOLATED;
        }
        if endpoint.judged(Direction::Egress) {
            flags |= FLAG_EGRESS_ISOLATED;
        }
        if audit {
            flags |= FLAG_AUDIT;
        }
        if endpoint.ipv4.is_some() {
            flags |= FLAG_HAS_IPV4;
        }
        if endpoint.ipv6.is_some() {
            flags |= FLAG_HAS_IPV6;
        }
        let mut lookups = [0u8; 2];
        let allows = endpoint.rules.iter().map(|(rule, cookie)| (rule, PolicyValue::allow(*cookie)));
        let denies = endpoint.denies.iter().map(|(rule, cookie)| (rule, PolicyValue::deny(*cookie)));
        for (rule, value) in allows.chain(denies) {
            let (len, key) = policy_entry(slot.id, rule);
            contents.policy.insert((len, key), value);
            // Tell the classifier which kinds of lookups can hit for this endpoint.
            lookups[rule.direction as usize] |= lookup::bit(len, rule.peer);
        }
        let info = EndpointInfo {
            id: slot.id,
            flags,
            ipv4: endpoint.ipv4.map(|a| a.octets()).unwrap_or_default(),
            ipv6: endpoint.ipv6.map(|a| a.octets()).unwrap_or_default(),
            lookups,
            _pad: [0; 2],
            revision: 0,
        };
        contents.endpoints.insert(slot.ifindex, info);
    }
    set_revisions(&mut contents);
    contents
}

/// The policy map key of an entry and its prefix length: any protocol 72, whole protocol
/// 80, port blocks 80 + bits.
fn policy_entry(endpoint: u32, rule: &RuleKey) -> (u32, PolicyKey) {
    let (len, protocol, port) = match (rule.protocol, rule.port) {
        (None, _) => (PREFIX_ANY_PROTOCOL, 0, 0),
        (Some(protocol), None) => (PREFIX_PROTOCOL, protocol, 0),
        (Some(protocol), Some(block)) => (block.lpm_prefix_len(), protocol, block.first()),
    };
    (len, PolicyKey::new(endpoint, rule.peer, rule.direction, protocol, port))
}

/// FNV-1a, 32 bits: a stable hash (the same input gives the same revision in every run, so
/// a restarted agent rewrites nothing).
#[derive(Clone, Copy)]
struct Fnv32(u32);

impl Fnv32 {
    const fn new() -> Self {
        Self(0x811c_9dc5)
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u32::from(*byte);
            self.0 = self.0.wrapping_mul(0x0100_0193);
        }
    }
}

/// Sets each endpoint's revision: a hash of its flags, addresses and lookup masks, all its
/// allow entries and a digest of the whole ipcache. Whatever could change one of its
/// verdicts changes it, so the classifier judges its tracked flows again (deny entries and
/// actions included: the value bytes are hashed).
fn set_revisions(contents: &mut MapContents) {
    let mut ipcache = Fnv32::new();
    for ((len, key), value) in &contents.ipcache {
        ipcache.write(&len.to_le_bytes());
        ipcache.write(bytemuck::bytes_of(key));
        ipcache.write(bytemuck::bytes_of(value));
    }
    // One pass over the sorted policy entries, each into the hash of its endpoint id.
    let mut entries: BTreeMap<u32, Fnv32> = BTreeMap::new();
    for ((len, key), value) in &contents.policy {
        let hash = entries.entry(key.endpoint()).or_insert_with(Fnv32::new);
        hash.write(&len.to_le_bytes());
        hash.write(bytemuck::bytes_of(key));
        hash.write(bytemuck::bytes_of(value));
    }
    for info in contents.endpoints.values_mut() {
        let mut hash = Fnv32::new();
        hash.write(&info.flags.to_le_bytes());
        hash.write(&info.ipv4);
        hash.write(&info.ipv6);
        hash.write(&info.lookups);
        hash.write(&entries.get(&info.id).map_or(0, |h| h.0).to_le_bytes());
        hash.write(&ipcache.0.to_le_bytes());
        info.revision = hash.0;
    }
}

/// Per-map changes that turn the loaded contents into the desired ones.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapUpdates {
    /// Endpoints as loaded, with the lookup mask widened to the union of old and new: written
    /// first, so that while entries change the classifier sees both versions' kinds.
    pub mask_widenings: Vec<(u32, EndpointInfo)>,
    pub policy_upserts: Vec<((u32, PolicyKey), PolicyValue)>,
    pub ipcache_upserts: Vec<((u32, IpcacheKey), IpcacheValue)>,
    pub endpoint_upserts: Vec<(u32, EndpointInfo)>,
    pub endpoint_removals: Vec<u32>,
    pub ipcache_removals: Vec<(u32, IpcacheKey)>,
    pub policy_removals: Vec<(u32, PolicyKey)>,
    /// The desired endpoints whose mask loses kinds: written last, once those entries are gone.
    pub mask_narrowings: Vec<(u32, EndpointInfo)>,
}

/// One map write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapOp {
    PolicyUpsert { prefix_len: u32, key: PolicyKey, value: PolicyValue },
    IpcacheUpsert { prefix_len: u32, key: IpcacheKey, value: IpcacheValue },
    EndpointUpsert { ifindex: u32, info: EndpointInfo },
    EndpointRemove { ifindex: u32 },
    IpcacheRemove { prefix_len: u32, key: IpcacheKey },
    PolicyRemove { prefix_len: u32, key: PolicyKey },
}

impl MapUpdates {
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn len(&self) -> usize {
        self.mask_widenings.len()
            + self.policy_upserts.len()
            + self.ipcache_upserts.len()
            + self.endpoint_upserts.len()
            + self.endpoint_removals.len()
            + self.ipcache_removals.len()
            + self.policy_removals.len()
            + self.mask_narrowings.len()
    }

    /// The writes in a safe order: new allow entries exist before any address or endpoint
    /// starts to need them, and old ones go only after nothing needs them any more. So
    /// traffic both versions allow stays allowed throughout, and traffic with an unchanged
    /// peer identity and endpoint is never opened by a transient state. (The maps cannot be
    /// swapped atomically: a peer whose identity changes is judged by the union of old and
    /// new entries for its new identity until the policy removals run.)
    ///
    /// The first entry found decides, allow or deny, so the order within the policy writes
    /// matters too: while they run the endpoint's mask is the union of both versions' kinds,
    /// upserts go in the classifier's lookup order (the peer's identity, then ANY; longest
    /// prefix first) and removals in reverse. Then the first entry any flow meets is either
    /// its first entry under the old maps or its first under the new ones, so a flow both
    /// versions deny is never let through by a half-written change (nor one both allow cut).
    pub fn ordered_ops(&self) -> Vec<MapOp> {
        let mut ops = Vec::with_capacity(self.len());
        ops.extend(self.mask_widenings.iter().map(|&(ifindex, info)| MapOp::EndpointUpsert { ifindex, info }));
        let mut policy_upserts = self.policy_upserts.clone();
        policy_upserts.sort_by_key(|((prefix_len, key), _)| (key.identity() == identity::ANY, std::cmp::Reverse(*prefix_len)));
        ops.extend(policy_upserts.into_iter().map(|((prefix_len, key), value)| MapOp::PolicyUpsert {
            prefix_len,
            key,
            value,
        }));
        // Longest prefix first, so an except is in place before the cidr that holds it.
        let mut ipcache_upserts = self.ipcache_upserts.clone();
        ipcache_upserts.sort_by_key(|((prefix_len, _), _)| std::cmp::Reverse(*prefix_len));
        ops.extend(ipcache_upserts.into_iter().map(|((prefix_len, key), value)| MapOp::IpcacheUpsert {
            prefix_len,
            key,
            value,
        }));
        ops.extend(self.endpoint_upserts.iter().map(|&(ifindex, info)| MapOp::EndpointUpsert { ifindex, info }));
        ops.extend(self.endpoint_removals.iter().map(|&ifindex| MapOp::EndpointRemove { ifindex }));
        // Shortest first: a cidr goes before its excepts, never the other way round.
        let mut ipcache_removals = self.ipcache_removals.clone();
        ipcache_removals.sort_by_key(|(prefix_len, _)| *prefix_len);
        ops.extend(ipcache_removals.into_iter().map(|(prefix_len, key)| MapOp::IpcacheRemove { prefix_len, key }));
        let mut policy_removals = self.policy_removals.clone();
        policy_removals.sort_by_key(|(prefix_len, key)| (key.identity() != identity::ANY, *prefix_len));
        ops.extend(policy_removals.into_iter().map(|(prefix_len, key)| MapOp::PolicyRemove { prefix_len, key }));
        ops.extend(self.mask_narrowings.iter().map(|&(ifindex, info)| MapOp::EndpointUpsert { ifindex, info }));
        ops
    }
}

impl MapContents {
    /// Applies one write (what the sync code does to the kernel maps).
    pub fn apply(&mut self, op: &MapOp) {
        match *op {
            MapOp::PolicyUpsert { prefix_len, key, value } => {
                self.policy.insert((prefix_len, key), value);
            }
            MapOp::IpcacheUpsert { prefix_len, key, value } => {
                self.ipcache.insert((prefix_len, key), value);
            }
            MapOp::EndpointUpsert { ifindex, info } => {
                self.endpoints.insert(ifindex, info);
            }
            MapOp::EndpointRemove { ifindex } => {
                self.endpoints.remove(&ifindex);
            }
            MapOp::IpcacheRemove { prefix_len, key } => {
                self.ipcache.remove(&(prefix_len, key));
            }
            MapOp::PolicyRemove { prefix_len, key } => {
                self.policy.remove(&(prefix_len, key));
            }
        }
    }
}

fn diff_map<K: Ord + Copy, V: PartialEq + Copy>(
    loaded: &BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
) -> (Vec<(K, V)>, Vec<K>) {
    let upserts = desired.iter().filter(|(k, v)| loaded.get(k) != Some(v)).map(|(k, v)| (*k, *v)).collect();
    let removals = loaded.keys().filter(|k| !desired.contains_key(k)).copied().collect();
    (upserts, removals)
}

/// The minimal set of writes from `loaded` to `desired`.
pub fn diff(loaded: &MapContents, desired: &MapContents) -> MapUpdates {
    let (policy_upserts, policy_removals) = diff_map(&loaded.policy, &desired.policy);
    let (ipcache_upserts, ipcache_removals) = diff_map(&loaded.ipcache, &desired.ipcache);
    let (mut endpoint_upserts, endpoint_removals) = diff_map(&loaded.endpoints, &desired.endpoints);
    let (mut mask_widenings, mut mask_narrowings) = (Vec::new(), Vec::new());
    for (ifindex, info) in &mut endpoint_upserts {
        let Some(old) = loaded.endpoints.get(ifindex) else { continue };
        let union = [old.lookups[0] | info.lookups[0], old.lookups[1] | info.lookups[1]];
        if union != old.lookups {
            mask_widenings.push((*ifindex, EndpointInfo { lookups: union, ..*old }));
        }
        if union != info.lookups {
            mask_narrowings.push((*ifindex, *info));
            info.lookups = union;
        }
    }
    MapUpdates {
        mask_widenings,
        policy_upserts,
        ipcache_upserts,
        endpoint_upserts,
        endpoint_removals,
        ipcache_removals,
        policy_removals,
        mask_narrowings,
    }
}

/// The ipcache's answer for an address: the identity of its longest matching prefix, or
/// WORLD when no prefix covers it.
pub fn ipcache_lookup(contents: &MapContents, addr: IpAddr) -> u32 {
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (0..=max)
        .rev()
        .find_map(|len| {
            let prefix = IpPrefix::new(addr, len)?;
            contents.ipcache.get(&ipcache_key(&prefix)).map(|v| v.identity)
        })
        .unwrap_or(identity::WORLD)
}

/// LPM lookup in the policy map for one identity: the longest entry whose prefix matches,
/// among the kinds the endpoint's lookup mask lists (the classifier skips the others, so the
/// model does too: a wrong mask shows up as a wrong verdict here).
fn policy_lpm(
    contents: &MapContents,
    endpoint: &EndpointInfo,
    peer: u32,
    direction: Direction,
    protocol: u8,
    port: u16,
) -> Option<PolicyValue> {
    let listed = |len: u32| endpoint.lookups[direction as usize] & lookup::bit(len, peer) != 0;
    for len in (PREFIX_PROTOCOL..=PREFIX_FULL).rev().filter(|len| listed(*len)) {
        let bits = len - PREFIX_PROTOCOL;
        let mask = if bits == 0 { 0 } else { u16::MAX << (16 - bits) };
        let key = PolicyKey::new(endpoint.id, peer, direction, protocol, port & mask);
        if let Some(value) = contents.policy.get(&(len, key)) {
            return Some(*value);
        }
    }
    if !listed(PREFIX_ANY_PROTOCOL) {
        return None;
    }
    let key = PolicyKey::new(endpoint.id, peer, direction, 0, 0);
    contents.policy.get(&(PREFIX_ANY_PROTOCOL, key)).copied()
}

/// What the first entry found says about a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hit {
    pub cookie: u32,
    /// The classifier reads every action but allow as deny (it fails closed).
    pub allows: bool,
    pub peer_identity: u32,
}

/// The classifier's policy decision for a new flow at the endpoint on `ifindex`: ipcache
/// lookup of the peer, then the policy map with the peer's identity, then with ANY; the
/// first entry found decides, allow or deny. `None` on a miss or for an unknown interface.
/// Isolation is not consulted (see [`verdict`]).
pub fn decision(
    contents: &MapContents,
    ifindex: u32,
    direction: Direction,
    peer: IpAddr,
    protocol: u8,
    port: u16,
) -> Option<Hit> {
    let endpoint = contents.endpoints.get(&ifindex)?;
    let peer_identity = ipcache_lookup(contents, peer);
    policy_lpm(contents, endpoint, peer_identity, direction, protocol, port)
        .or_else(|| policy_lpm(contents, endpoint, identity::ANY, direction, protocol, port))
        .map(|value| Hit { cookie: value.cookie, allows: value.allows(), peer_identity })
}

/// The allowing cookie and the peer identity when the [`decision`] is an allow entry;
/// `None` on a miss, a deny entry or an unknown interface.
pub fn lookup(
    contents: &MapContents,
    ifindex: u32,
    direction: Direction,
    peer: IpAddr,
    protocol: u8,
    port: u16,
) -> Option<(u32, u32)> {
    decision(contents, ifindex, direction, peer, protocol, port).filter(|hit| hit.allows).map(|hit| (hit.cookie, hit.peer_identity))
}

/// Whether the classifier judges the endpoint on `ifindex` in `direction` (its isolated
/// flag: a NetworkPolicy isolates it or a ClusterNetworkPolicy applies; `None`: no such
/// endpoint).
pub fn isolated(contents: &MapContents, ifindex: u32, direction: Direction) -> Option<bool> {
    let endpoint = contents.endpoints.get(&ifindex)?;
    let flag = match direction {
        Direction::Ingress => FLAG_INGRESS_ISOLATED,
        Direction::Egress => FLAG_EGRESS_ISOLATED,
    };
    Some(endpoint.has(flag))
}

/// What the classifier does with the first packet of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// No endpoint on this interface: the classifier lets traffic through untouched.
    Unmanaged,
    NotIsolated {
        peer_identity: u32,
    },
    Allowed {
        cookie: u32,
        peer_identity: u32,
    },
    /// No entry matched (`drop_policy`).
    Denied {
        peer_identity: u32,
    },
    /// A deny entry matched first (`drop_deny`); its cookie names the rule.
    DeniedByEntry {
        cookie: u32,
        peer_identity: u32,
    },
}

impl Verdict {
    pub const fn allows(self) -> bool {
        !matches!(self, Verdict::Denied { .. } | Verdict::DeniedByEntry { .. })
    }
}

/// The full decision: isolation flag, then [`lookup`].
pub fn verdict(
    contents: &MapContents,
    ifindex: u32,
    direction: Direction,
    peer: IpAddr,
    protocol: u8,
    port: u16,
) -> Verdict {
    let peer_identity = ipcache_lookup(contents, peer);
    match isolated(contents, ifindex, direction) {
        None => Verdict::Unmanaged,
        Some(false) => Verdict::NotIsolated { peer_identity },
        Some(true) => match decision(contents, ifindex, direction, peer, protocol, port) {
            Some(Hit { cookie, allows: true, peer_identity }) => Verdict::Allowed { cookie, peer_identity },
            Some(Hit { cookie, allows: false, peer_identity }) => Verdict::DeniedByEntry { cookie, peer_identity },
            None => Verdict::Denied { peer_identity },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipcache(entries: &[(&str, u32)]) -> MapContents {
        let mut contents = MapContents::default();
        for (prefix, identity) in entries {
            let prefix = IpPrefix::parse(prefix).unwrap();
            contents.ipcache.insert(ipcache_key(&prefix), IpcacheValue { identity: *identity });
        }
        contents
    }

    /// Replays the ordered writes one at a time; `check` sees every intermediate state.
    fn replay(from: &MapContents, to: &MapContents, mut check: impl FnMut(&MapContents)) {
        let mut state = from.clone();
        for op in diff(from, to).ordered_ops() {
            state.apply(&op);
            check(&state);
        }
        assert_eq!(&state, to);
    }

    #[test]
    fn ipcache_writes_go_longest_prefix_first() {
        // An except (/24, identity 301) inside a cidr (/16, identity 300): the except's
        // addresses must never be judged as the cidr's.
        let (empty, both) = (ipcache(&[]), ipcache(&[("198.18.0.0/16", 300), ("198.18.5.0/24", 301), ("198.18.5.7/32", 302)]));
        let except_addr: IpAddr = "198.18.5.1".parse().unwrap();
        let host_addr: IpAddr = "198.18.5.7".parse().unwrap();
        replay(&empty, &both, |state| {
            assert_ne!(ipcache_lookup(state, except_addr), 300, "the cidr landed before its except");
            assert!(![300, 301].contains(&ipcache_lookup(state, host_addr)), "a covering prefix landed before the address");
        });
        replay(&both, &empty, |state| {
            assert_ne!(ipcache_lookup(state, except_addr), 300, "the except went before its cidr");
            assert!(![300, 301].contains(&ipcache_lookup(state, host_addr)));
        });
    }
}

#[cfg(test)]
mod revision_tests {
    use std::collections::BTreeMap;
    use std::net::Ipv4Addr;

    use policy_common::Direction;

    use super::*;
    use crate::compile::{EndpointPolicy, RuleKey};

    fn compiled(isolated: bool, peer: u32, world_prefix: &str) -> Compiled {
        let mut endpoint = EndpointPolicy { ipv4: Some(Ipv4Addr::new(198, 18, 0, 10)), ingress_isolated: isolated, ..EndpointPolicy::default() };
        endpoint.rules.insert(RuleKey { direction: Direction::Ingress, peer, protocol: Some(6), port: None }, 1000);
        let mut other = EndpointPolicy { ipv4: Some(Ipv4Addr::new(198, 18, 0, 11)), ..EndpointPolicy::default() };
        other.rules.insert(RuleKey { direction: Direction::Ingress, peer: 400, protocol: None, port: None }, 1001);
        let mut compiled = Compiled::default();
        compiled.endpoints.insert(PodRef::new("ns", "a"), endpoint);
        compiled.endpoints.insert(PodRef::new("ns", "b"), other);
        compiled.ipcache.insert(IpPrefix::parse("198.18.0.10/32").unwrap(), 300);
        compiled.ipcache.insert(IpPrefix::parse(world_prefix).unwrap(), 301);
        compiled
    }

    fn revision(compiled: &Compiled, audit: bool) -> u32 {
        let slots = BTreeMap::from([
            (PodRef::new("ns", "a"), EndpointSlot { ifindex: 10, id: 1 }),
            (PodRef::new("ns", "b"), EndpointSlot { ifindex: 11, id: 2 }),
        ]);
        render(compiled, &slots, audit).endpoints[&10].revision
    }

    #[test]
    fn the_revision_is_stable_and_follows_every_input() {
        let base = revision(&compiled(true, 300, "198.18.64.0/18"), false);
        assert_eq!(base, revision(&compiled(true, 300, "198.18.64.0/18"), false), "same input, same revision");
        assert_ne!(base, revision(&compiled(false, 300, "198.18.64.0/18"), false), "flags");
        assert_ne!(base, revision(&compiled(true, 300, "198.18.64.0/18"), true), "audit mode");
        assert_ne!(base, revision(&compiled(true, 301, "198.18.64.0/18"), false), "an allow entry");
        assert_ne!(base, revision(&compiled(true, 300, "198.18.128.0/18"), false), "any ipcache entry");
        let mut other_changed = compiled(true, 300, "198.18.64.0/18");
        other_changed.endpoints.get_mut(&PodRef::new("ns", "b")).unwrap().rules.clear();
        assert_eq!(base, revision(&other_changed, false), "another endpoint's entries are not this one's");
        let mut denied = compiled(true, 300, "198.18.64.0/18");
        let key = *denied.endpoints[&PodRef::new("ns", "a")].rules.keys().next().unwrap();
        let a = denied.endpoints.get_mut(&PodRef::new("ns", "a")).unwrap();
        a.rules.clear();
        a.denies.insert(key, 1000);
        assert_ne!(base, revision(&denied, false), "the same key denied");
    }

    #[test]
    fn deny_entries_render_and_decide_first() {
        use policy_common::policy::{ACTION_DENY, PortPrefix};
        let slots = BTreeMap::from([(PodRef::new("ns", "a"), EndpointSlot { ifindex: 10, id: 1 })]);
        let mut compiled = Compiled::default();
        // Only a ClusterNetworkPolicy applies (no NetworkPolicy isolates): still judged.
        let mut endpoint = EndpointPolicy { ipv4: Some(Ipv4Addr::new(198, 18, 0, 10)), ..EndpointPolicy::default() };
        endpoint.ingress_cluster_policies = vec!["deny-db".into()];
        endpoint.rules.insert(RuleKey { direction: Direction::Ingress, peer: identity::ANY, protocol: None, port: None }, 2);
        let port = Some(PortPrefix { port: 5432, bits: 16 });
        endpoint.denies.insert(RuleKey { direction: Direction::Ingress, peer: 300, protocol: Some(6), port }, 40);
        compiled.endpoints.insert(PodRef::new("ns", "a"), endpoint);
        compiled.ipcache.insert(IpPrefix::parse("198.18.0.20/32").unwrap(), 300);
        let contents = render(&compiled, &slots, false);
        let info = contents.endpoints[&10];
        assert!(info.has(FLAG_INGRESS_ISOLATED) && !info.has(FLAG_EGRESS_ISOLATED), "judged where a cluster policy applies");
        assert_ne!(info.lookups[0] & lookup::EXACT, 0, "the deny's kind is in the mask");
        let value = contents.policy[&(PREFIX_FULL, PolicyKey::new(1, 300, Direction::Ingress, 6, 5432))];
        assert_eq!((value.cookie, value.action), (40, ACTION_DENY));
        let peer: IpAddr = "198.18.0.20".parse().unwrap();
        let other: IpAddr = "198.18.0.21".parse().unwrap();
        assert_eq!(verdict(&contents, 10, Direction::Ingress, peer, 6, 5432), Verdict::DeniedByEntry { cookie: 40, peer_identity: 300 });
        assert!(!verdict(&contents, 10, Direction::Ingress, peer, 6, 5432).allows());
        assert_eq!(lookup(&contents, 10, Direction::Ingress, peer, 6, 5432), None, "lookup returns allows only");
        assert_eq!(verdict(&contents, 10, Direction::Ingress, peer, 6, 5433), Verdict::Allowed { cookie: 2, peer_identity: 300 });
        assert_eq!(verdict(&contents, 10, Direction::Ingress, other, 6, 5432), Verdict::Allowed { cookie: 2, peer_identity: identity::WORLD });
        assert_eq!(verdict(&contents, 10, Direction::Egress, peer, 6, 5432), Verdict::NotIsolated { peer_identity: 300 });
    }
}

#[cfg(test)]
mod order_tests {
    use proptest::prelude::*;

    use super::*;

    const PEER: u32 = 300;
    const IFINDEX: u32 = 10;

    /// The entry shapes of one endpoint and direction: exact 80, the block 80-81, whole TCP,
    /// any protocol; for the peer's identity and for ANY.
    fn shapes() -> Vec<(u32, PolicyKey)> {
        let mut shapes = Vec::new();
        for peer in [PEER, identity::ANY] {
            shapes.push((PREFIX_FULL, PolicyKey::new(1, peer, Direction::Ingress, 6, 80)));
            shapes.push((PREFIX_FULL - 1, PolicyKey::new(1, peer, Direction::Ingress, 6, 80)));
            shapes.push((PREFIX_PROTOCOL, PolicyKey::new(1, peer, Direction::Ingress, 6, 0)));
            shapes.push((PREFIX_ANY_PROTOCOL, PolicyKey::new(1, peer, Direction::Ingress, 0, 0)));
        }
        shapes
    }

    /// Per shape: 0 absent, 1 allow, 2 deny.
    fn contents(choice: &[u8]) -> MapContents {
        let mut contents = MapContents::default();
        contents.ipcache.insert(ipcache_key(&IpPrefix::parse("198.18.0.20/32").unwrap()), IpcacheValue { identity: PEER });
        let mut lookups = [0u8; 2];
        for ((len, key), c) in shapes().into_iter().zip(choice) {
            let value = match c {
                1 => PolicyValue::allow(16),
                2 => PolicyValue::deny(17),
                _ => continue,
            };
            contents.policy.insert((len, key), value);
            lookups[0] |= lookup::bit(len, key.identity());
        }
        let info = EndpointInfo { id: 1, flags: FLAG_INGRESS_ISOLATED, ipv4: [0; 4], ipv6: [0; 16], lookups, _pad: [0; 2], revision: 0 };
        contents.endpoints.insert(IFINDEX, info);
        set_revisions(&mut contents);
        contents
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Every single write keeps the verdict of every flow both versions agree on.
        #[test]
        fn every_write_keeps_agreed_verdicts_with_deny_entries(
            old in prop::collection::vec(0..3u8, 8),
            new in prop::collection::vec(0..3u8, 8),
        ) {
            let (old, new) = (contents(&old), contents(&new));
            let peers: [IpAddr; 2] = ["198.18.0.20".parse().unwrap(), "198.18.0.21".parse().unwrap()];
            let mut now = old.clone();
            for op in diff(&old, &new).ordered_ops() {
                now.apply(&op);
                for peer in peers {
                    for (protocol, port) in [(6, 80), (6, 81), (6, 82), (17, 80)] {
                        let judge = |maps: &MapContents| verdict(maps, IFINDEX, Direction::Ingress, peer, protocol, port).allows();
                        if judge(&old) == judge(&new) {
                            prop_assert_eq!(judge(&now), judge(&old), "{:?}: peer {} {}/{}", op, peer, protocol, port);
                        }
                    }
                }
            }
            prop_assert_eq!(now, new);
        }
    }
}
