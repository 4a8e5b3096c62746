//! Writing the compiler's output into the kernel: only the difference from what is loaded,
//! in the order `MapUpdates::ordered_ops` gives. What is loaded is read back from the pinned
//! maps at start, so a restarted agent changes nothing that is already right.

use std::collections::BTreeMap;

use aya::maps::MapError;
use policy_common::endpoint;

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
    /// Conntrack entries removed with endpoints that went away.
    pub conntrack_flushed: usize,
}

pub struct Syncer {
    maps: Maps,
    loaded: MapContents,
    /// Endpoint id of each managed interface; ids are reused only after removal.
    ids: BTreeMap<u32, u32>,
}

impl Syncer {
    /// Takes over the maps, reading what an earlier agent left in them.
    pub fn adopt(maps: Maps) -> Result<Self, AgentError> {
        let loaded = maps.read()?;
        let ids = loaded.endpoints.iter().map(|(ifindex, info)| (*ifindex, info.id)).collect();
        Ok(Self { maps, loaded, ids })
    }

    pub fn loaded(&self) -> &MapContents {
        &self.loaded
    }

    pub fn maps(&self) -> &Maps {
        &self.maps
    }

    pub fn maps_mut(&mut self) -> &mut Maps {
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

    /// Forgets slots of interfaces that are neither wanted nor loaded any more.
    pub fn release_unused(&mut self, wanted: &BTreeMap<u32, u32>) {
        let loaded = &self.loaded.endpoints;
        self.ids.retain(|ifindex, _| wanted.contains_key(ifindex) || loaded.contains_key(ifindex));
    }

    /// The endpoint id → ifindex of every loaded endpoint.
    pub fn ifindex_of(&self, id: u32) -> Option<u32> {
        self.ids.iter().find(|(_, v)| **v == id).map(|(k, _)| *k)
    }

    /// Brings the maps to `desired`, writing only the difference.
    pub fn apply(&mut self, desired: &MapContents) -> SyncReport {
        let updates = crate::compile::diff(&self.loaded, desired);
        let mut report = SyncReport::default();
        for op in updates.ordered_ops() {
            match self.write(&op) {
                Ok(()) => {
                    self.loaded.apply(&op);
                    report.applied += 1;
                    if let MapOp::EndpointRemove { ifindex } = op
                        && let Some(id) = self.ids.remove(&ifindex)
                    {
                        report.conntrack_flushed += self.flush_conntrack(id);
                    }
                }
                Err(error) => {
                    let endpoint = match op {
                        MapOp::PolicyUpsert { key, .. } | MapOp::PolicyRemove { key, .. } => Some(EndpointRef::Id(key.endpoint())),
                        MapOp::EndpointUpsert { ifindex, .. } | MapOp::EndpointRemove { ifindex } => Some(EndpointRef::Ifindex(ifindex)),
                        MapOp::IpcacheUpsert { .. } | MapOp::IpcacheRemove { .. } => None,
                    };
                    report.failures.push(SyncFailure { op, endpoint, error });
                }
            }
        }
        report
    }

    fn write(&mut self, op: &MapOp) -> Result<(), AgentError> {
        self.maps.write(op).map(|_| ()).map_err(|(map, error)| map_error(map, op, error))
    }

    /// Removes the conntrack entries of an endpoint id that is going away, so a pod that later
    /// gets the same id (and perhaps the same address) inherits no flows.
    fn flush_conntrack(&mut self, id: u32) -> usize {
        match crate::conntrack::flush_endpoint(&mut self.maps, id) {
            Ok(n) => n as usize,
            Err(error) => {
                tracing::warn!(%error, endpoint = id, "conntrack flush");
                0
            }
        }
    }

    /// Takes expired flows out of the conntrack table (the agent loop calls it periodically).
    pub fn sweep_conntrack(&mut self) -> Result<u64, AgentError> {
        crate::conntrack::sweep_expired(&mut self.maps)
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

