//! Writing the compiler's output into the kernel: only the difference from what is loaded,
//! in the order `MapUpdates::ordered_ops` gives. What is loaded is read back from the pinned
//! maps at start, so a restarted agent changes nothing that is already right.

use std::collections::BTreeMap;

use aya::maps::MapError;
use policy_common::endpoint;
use policy_common::identity;
use policy_common::policy::{PREFIX_ANY_PROTOCOL, PREFIX_PROTOCOL, PolicyKey, PortPrefix};

use crate::{
    AgentError,
    compile::{EndpointSlot, MapContents, MapOp},
    datapath::Maps,
};

/// A write that failed. The endpoint it concerns is named when there is one, so the agent can
/// report the pod; nothing is retried here (the next sync computes the diff again).
#[derive(Debug)]
pub struct SyncFailure {
    pub op: MapOp,
    /// The endpoint id of a policy write, or the ifindex of an endpoint write.
    pub endpoint: Option<EndpointRef>,
    pub error: AgentError,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndpointRef {
    Id(u32),
    Ifindex(u32),
}

#[derive(Debug, Default)]
pub struct SyncReport {
    pub applied: usize,
    pub failures: Vec<SyncFailure>,
}

/// Where the syncer's writes go: the pinned maps, or a fake in the unit tests.
pub trait MapWriter {
    fn write(&mut self, op: &MapOp) -> Result<(), AgentError>;
    /// Removes the conntrack entries of an endpoint id; returns how many.
    fn flush_conntrack(&mut self, id: u32) -> usize;
}

impl MapWriter for Maps {
    fn write(&mut self, op: &MapOp) -> Result<(), AgentError> {
        Maps::write(self, op).map(|_| ()).map_err(|(map, error)| map_error(map, op, error))
    }

    /// Credits the removed flows back to the endpoint's conntrack budget, so a pod that later
    /// gets the id (and perhaps the address) inherits no flows and a full budget.
    fn flush_conntrack(&mut self, id: u32) -> usize {
        match crate::conntrack::flush_endpoint(self, id) {
            Ok(n) => n as usize,
            Err(error) => {
                tracing::warn!(%error, endpoint = id, "conntrack flush");
                0
            }
        }
    }
}

pub struct Syncer<W: MapWriter = Maps> {
    maps: W,
    loaded: MapContents,
    /// Endpoint id of each managed interface; ids are reused only after removal.
    ids: BTreeMap<u32, u32>,
}

impl Syncer<Maps> {
    /// Takes over the maps, reading what an earlier agent left in them.
    pub fn adopt(mut maps: Maps) -> Result<Self, AgentError> {
        let loaded = maps.read()?;
        maps.index_endpoint_ids(&loaded)?;
        Ok(Self::with_loaded(maps, loaded))
    }

    /// Takes expired flows out of the conntrack table (the agent loop calls it periodically).
    pub fn sweep_conntrack(&mut self) -> Result<u64, AgentError> {
        crate::conntrack::sweep_expired(&mut self.maps)
    }
}

impl<W: MapWriter> Syncer<W> {
    /// A syncer over `maps`, which hold `loaded`.
    pub fn with_loaded(maps: W, loaded: MapContents) -> Self {
        let ids = loaded.endpoints.iter().map(|(ifindex, info)| (*ifindex, info.id)).collect();
        Self { maps, loaded, ids }
    }

    pub fn loaded(&self) -> &MapContents {
        &self.loaded
    }

    pub fn maps(&self) -> &W {
        &self.maps
    }

    pub fn maps_mut(&mut self) -> &mut W {
        &mut self.maps
    }

    /// The slot of an interface, allocating the lowest free endpoint id for a new one.
    /// `None` when every id is taken (the endpoint map is full).
    pub fn slot(&mut self, ifindex: u32) -> Option<EndpointSlot> {
        if let Some(&id) = self.ids.get(&ifindex) {
            return Some(EndpointSlot { ifindex, id });
        }
        let used: std::collections::BTreeSet<u32> = self.ids.values().copied().collect();
        let id = (1..endpoint::MAX_ENTRIES).find(|id| !used.contains(id))?;
        self.ids.insert(ifindex, id);
        Some(EndpointSlot { ifindex, id })
    }

    /// Frees the ids of interfaces that are not wanted, whose endpoint entry is gone and no
    /// policy entry of which is left (a removal that failed keeps the id taken, or the next
    /// pod to get it would inherit those entries), flushing their conntrack entries.
    /// Returns the number of conntrack entries removed.
    pub fn release_unused(&mut self, wanted: &BTreeMap<u32, u32>) -> usize {
        let in_use: std::collections::BTreeSet<u32> = self.loaded.policy.keys().map(|(_, key)| key.endpoint()).collect();
        let loaded = &self.loaded.endpoints;
        let released: Vec<(u32, u32)> = self
            .ids
            .iter()
            .filter(|(ifindex, id)| !wanted.contains_key(ifindex) && !loaded.contains_key(ifindex) && !in_use.contains(id))
            .map(|(ifindex, id)| (*ifindex, *id))
            .collect();
        let mut flushed = 0;
        for (ifindex, id) in released {
            self.ids.remove(&ifindex);
            flushed += self.maps.flush_conntrack(id);
        }
        flushed
    }

    /// The endpoint id → ifindex of every loaded endpoint.
    pub fn ifindex_of(&self, id: u32) -> Option<u32> {
        self.ids.iter().find(|(_, v)| **v == id).map(|(k, _)| *k)
    }

    /// Brings the maps to `desired`, writing only the difference. Slots are not freed here
    /// (see [`Syncer::release_unused`]).
    ///
    /// A deny entry that cannot be written must not leave the allows it overrides in force:
    /// allow writes it would have shadowed are held back, and loaded allows it shadows are
    /// removed, so the failure closes (until a later sync writes the deny), never opens.
    pub fn apply(&mut self, desired: &MapContents) -> SyncReport {
        let updates = crate::compile::diff(&self.loaded, desired);
        let mut report = SyncReport::default();
        let mut failed_denies: Vec<(u32, PolicyKey)> = Vec::new();
        for op in updates.ordered_ops() {
            if let MapOp::PolicyUpsert { prefix_len, key, value } = op
                && value.allows()
                && failed_denies.iter().any(|deny| shadowed_by(*deny, (prefix_len, key)))
            {
                report.failures.push(SyncFailure { op, endpoint: Some(EndpointRef::Id(key.endpoint())), error: AgentError::HeldBack });
                continue;
            }
            if let Err(error) = self.write(op, &mut report) {
                if let MapOp::PolicyUpsert { prefix_len, key, value } = op
                    && !value.allows()
                {
                    failed_denies.push((prefix_len, key));
                }
                report.failures.push(SyncFailure { op, endpoint: endpoint_of(&op), error });
            }
        }
        self.remove_shadowed_allows(&failed_denies, &mut report);
        report
    }

    fn write(&mut self, op: MapOp, report: &mut SyncReport) -> Result<(), AgentError> {
        self.maps.write(&op)?;
        self.loaded.apply(&op);
        report.applied += 1;
        Ok(())
    }

    /// Removes the loaded allow entries a deny that failed to be written would have shadowed.
    fn remove_shadowed_allows(&mut self, failed_denies: &[(u32, PolicyKey)], report: &mut SyncReport) {
        let shadowed: Vec<(u32, PolicyKey)> = self
            .loaded
            .policy
            .iter()
            .filter(|(entry, value)| value.allows() && failed_denies.iter().any(|deny| shadowed_by(*deny, **entry)))
            .map(|(entry, _)| *entry)
            .collect();
        for (prefix_len, key) in shadowed {
            let op = MapOp::PolicyRemove { prefix_len, key };
            if let Err(error) = self.write(op, report) {
                report.failures.push(SyncFailure { op, endpoint: endpoint_of(&op), error });
            }
        }
    }
}

fn endpoint_of(op: &MapOp) -> Option<EndpointRef> {
    match *op {
        MapOp::PolicyUpsert { key, .. } | MapOp::PolicyRemove { key, .. } => Some(EndpointRef::Id(key.endpoint())),
        MapOp::EndpointUpsert { ifindex, .. } | MapOp::EndpointRemove { ifindex } => Some(EndpointRef::Ifindex(ifindex)),
        MapOp::IpcacheUpsert { .. } | MapOp::IpcacheRemove { .. } => None,
    }
}

/// A policy entry's protocol and port block: `(None, _)` every protocol, `(Some(p), None)`
/// every port of `p`, else the port's top `bits` bits.
fn entry_spec((prefix_len, key): (u32, PolicyKey)) -> (Option<u8>, Option<PortPrefix>) {
    match prefix_len {
        0..=PREFIX_ANY_PROTOCOL => (None, None),
        PREFIX_PROTOCOL => (Some(key.protocol()), None),
        _ => (Some(key.protocol()), Some(PortPrefix { port: key.port(), bits: (prefix_len - PREFIX_PROTOCOL) as u8 })),
    }
}

fn spec_contains(outer: (Option<u8>, Option<PortPrefix>), inner: (Option<u8>, Option<PortPrefix>)) -> bool {
    match (outer, inner) {
        ((None, _), _) => true,
        ((Some(p), None), (Some(q), _)) => p == q,
        ((Some(p), Some(block)), (Some(q), Some(inner_block))) => p == q && block.contains(&inner_block),
        _ => false,
    }
}

/// Whether the classifier could reach `allow` for a packet that `deny` matches, had the
/// deny not been there: an entry of the same peer less specific than it, or a wildcard-peer
/// entry overlapping it (those are tried after every entry of the peer's own identity).
fn shadowed_by(deny: (u32, PolicyKey), allow: (u32, PolicyKey)) -> bool {
    let (d, a) = (deny.1, allow.1);
    if d.endpoint() != a.endpoint() || d.direction() != a.direction() {
        return false;
    }
    let (deny_spec, allow_spec) = (entry_spec(deny), entry_spec(allow));
    if a.identity() == d.identity() {
        spec_contains(allow_spec, deny_spec)
    } else {
        a.identity() == identity::ANY && (spec_contains(allow_spec, deny_spec) || spec_contains(deny_spec, allow_spec))
    }
}

fn map_error(map: &'static str, op: &MapOp, error: MapError) -> AgentError {
    let full = matches!(&error, MapError::SyscallError(e) if matches!(e.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC | libc::ENOMEM)));
    if full {
        AgentError::MapFull { map, what: format!("{op:?}") }
    } else {
        AgentError::Ebpf { what: format!("write {map}"), source: Box::new(error) }
    }
}


#[cfg(test)]
mod tests {
    use policy_common::Direction;
    use policy_common::endpoint::EndpointInfo;
    use policy_common::policy::{PREFIX_ANY_PROTOCOL, PolicyKey, PolicyValue};

    use super::*;

    /// Fails every write `fails` says, and remembers which ids were flushed.
    struct FakeMaps {
        fails: fn(&MapOp) -> bool,
        flushed: Vec<u32>,
    }

    impl MapWriter for FakeMaps {
        fn write(&mut self, op: &MapOp) -> Result<(), AgentError> {
            if (self.fails)(op) { Err(AgentError::MapFull { map: "test", what: format!("{op:?}") }) } else { Ok(()) }
        }

        fn flush_conntrack(&mut self, id: u32) -> usize {
            self.flushed.push(id);
            0
        }
    }

    fn one_endpoint(ifindex: u32, id: u32) -> MapContents {
        let mut contents = MapContents::default();
        let info = EndpointInfo { id, flags: policy_common::endpoint::FLAG_INGRESS_ISOLATED, ..bytemuck::Zeroable::zeroed() };
        contents.endpoints.insert(ifindex, info);
        let key = PolicyKey::new(id, 300, Direction::Ingress, 0, 0);
        contents.policy.insert((PREFIX_ANY_PROTOCOL, key), PolicyValue::allow(9));
        contents
    }

    #[test]
    fn an_id_whose_policy_removal_failed_is_not_given_to_the_next_pod() {
        let maps = FakeMaps { fails: |op| matches!(op, MapOp::PolicyRemove { .. }), flushed: Vec::new() };
        let mut syncer = Syncer::with_loaded(maps, one_endpoint(10, 1));
        let report = syncer.apply(&MapContents::default());
        assert_eq!(report.failures.len(), 1, "the policy removal failed");
        assert!(syncer.loaded().endpoints.is_empty(), "the endpoint entry is gone");
        syncer.release_unused(&BTreeMap::new());
        assert_eq!(syncer.slot(11).map(|s| s.id), Some(2), "id 1 still has a policy entry: not reused");
        assert!(syncer.maps().flushed.is_empty());

        // Once the entry is gone, the id is free again (and its flows flushed).
        syncer.maps_mut().fails = |_| false;
        let desired = MapContents { endpoints: BTreeMap::from([(11, EndpointInfo { id: 2, ..bytemuck::Zeroable::zeroed() })]), ..MapContents::default() };
        assert!(syncer.apply(&desired).failures.is_empty());
        syncer.release_unused(&BTreeMap::from([(11, 2)]));
        assert_eq!(syncer.maps().flushed, vec![1]);
        assert_eq!(syncer.slot(12).map(|s| s.id), Some(1));
    }

    #[test]
    fn a_deny_that_cannot_be_written_closes_what_it_would_shadow() {
        let maps = FakeMaps { fails: |op| matches!(op, MapOp::PolicyUpsert { value, .. } if !value.allows()), flushed: Vec::new() };
        let mut loaded = one_endpoint(10, 1);
        let any_tcp = PolicyKey::new(1, identity::ANY, Direction::Ingress, 6, 0);
        let other_udp = PolicyKey::new(1, 301, Direction::Ingress, 17, 0);
        loaded.policy.insert((PREFIX_PROTOCOL, any_tcp), PolicyValue::allow(10));
        let mut syncer = Syncer::with_loaded(maps, loaded.clone());
        // Desired: a deny for peer 300 on TCP 80, a new wildcard TCP/80 allow it shadows, and
        // an unrelated allow.
        let mut desired = loaded;
        let deny = PolicyKey::new(1, 300, Direction::Ingress, 6, 80);
        let any_80 = PolicyKey::new(1, identity::ANY, Direction::Ingress, 6, 80);
        desired.policy.insert((policy_common::policy::PREFIX_FULL, deny), PolicyValue::deny(11));
        desired.policy.insert((policy_common::policy::PREFIX_FULL, any_80), PolicyValue::allow(12));
        desired.policy.insert((PREFIX_PROTOCOL, other_udp), PolicyValue::allow(13));
        let report = syncer.apply(&desired);
        let policy = &syncer.loaded().policy;
        assert!(!policy.contains_key(&(policy_common::policy::PREFIX_FULL, any_80)), "held back");
        assert!(!policy.contains_key(&(PREFIX_PROTOCOL, any_tcp)), "removed");
        assert!(!policy.contains_key(&(PREFIX_ANY_PROTOCOL, PolicyKey::new(1, 300, Direction::Ingress, 0, 0))), "removed");
        assert!(policy.contains_key(&(PREFIX_PROTOCOL, other_udp)), "not shadowed: written");
        assert_eq!(report.failures.len(), 2, "{report:?}");
        // Once the deny can be written, everything is.
        syncer.maps_mut().fails = |_| false;
        assert!(syncer.apply(&desired).failures.is_empty());
        assert_eq!(syncer.loaded(), &desired);
    }

    #[test]
    fn a_failed_endpoint_removal_keeps_the_id() {
        let maps = FakeMaps { fails: |op| matches!(op, MapOp::EndpointRemove { .. }), flushed: Vec::new() };
        let mut syncer = Syncer::with_loaded(maps, one_endpoint(10, 1));
        assert_eq!(syncer.apply(&MapContents::default()).failures.len(), 1);
        syncer.release_unused(&BTreeMap::new());
        assert_eq!(syncer.slot(11).map(|s| s.id), Some(2));
    }
}
