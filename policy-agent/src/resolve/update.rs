//! Pod changes that move only addresses: a pod added, removed or relabelled into a label
//! group that keeps and already has its identities. Then the identity table changes only in
//! the pods' ipcache entries and addresses; everything selectors and peers see stays.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use super::{
    GroupData, IdentityAllocator, IdentityInputs, IdentityKey, IdentityTable, IpPrefix, blocks_matching, canonical_bytes,
    group_of, is_live_pod, node_addresses, pod_ips, resolve_named_ports,
};
use crate::state::{ClusterState, PodRef};

/// More changed pods than this are resolved in full (a re-list, say).
const MAX_CHANGED_PODS: usize = 64;

/// Updates `table` (resolved for `old`, without problems) to `new`, whose pods alone
/// changed (`changed`, from [`changed_pods`]), if no identity appears, disappears or changes
/// beyond its addresses: every changed address keeps to one pod, away from the node's
/// addresses and from the ipBlocks' host prefixes; every key a changed pod gets already has
/// a number; every key it leaves keeps an address. Returns false, with `table` untouched,
/// when that does not hold.
pub fn update_pod_addresses(
    table: &mut IdentityTable,
    (old, new): (&ClusterState, &ClusterState),
    changed: &BTreeSet<&PodRef>,
    node: (&str, &[IpAddr]),
    inputs: &IdentityInputs<'_>,
    allocator: &IdentityAllocator,
) -> bool {
    if changed.len() > MAX_CHANGED_PODS {
        return false;
    }
    let mut problems = Vec::new();
    let node_now = node_addresses(new, node.0, node.1, &mut problems);
    if !problems.is_empty() || !node_addresses_kept((old, new), &node_now, node, changed) {
        return false;
    }
    let Some(removed) = removed_addresses(table, old, changed) else { return false };
    let Some(added) = added_addresses(table, new, changed, inputs, allocator) else { return false };
    let excluded: BTreeSet<IpAddr> = node_now.into_iter().chain(host_prefixes(inputs)).collect();
    if removed.keys().chain(added.keys()).any(|ip| excluded.contains(ip)) || !keeps_every_key(table, &removed, &added) {
        return false;
    }
    for ip in removed.keys() {
        table.ipcache.remove(&IpPrefix::host(*ip));
        table.pod_addresses.remove(ip);
    }
    for (ip, (pod, number)) in added {
        table.ipcache.insert(IpPrefix::host(ip), number);
        table.pod_addresses.insert(ip, (pod.clone(), number));
    }
    true
}

/// Pods added, removed or replaced between the two states, in one walk of both (in name order).
pub fn changed_pods<'s>(old: &'s ClusterState, new: &'s ClusterState) -> BTreeSet<&'s PodRef> {
    let mut changed = BTreeSet::new();
    let (mut a, mut b) = (old.pods.iter().peekable(), new.pods.iter().peekable());
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => return changed,
            (Some((ka, va)), Some((kb, vb))) if ka == kb => {
                if !Arc::ptr_eq(va, vb) {
                    changed.insert(*ka);
                }
                a.next();
                b.next();
            }
            (Some((ka, _)), Some((kb, _))) if ka < kb => changed.extend(a.next().map(|(k, _)| k)),
            (Some(_), Some(_)) | (None, Some(_)) => changed.extend(b.next().map(|(k, _)| k)),
            (Some(_), None) => changed.extend(a.next().map(|(k, _)| k)),
        }
    }
}

/// Whether the node had `node_now` as its addresses before (they only move when a pod of
/// this node changes; problems of the old state were cached, and there were none).
fn node_addresses_kept(
    (old, new): (&ClusterState, &ClusterState),
    node_now: &BTreeSet<IpAddr>,
    (name, ips): (&str, &[IpAddr]),
    changed: &BTreeSet<&PodRef>,
) -> bool {
    let on_node = |state: &ClusterState| changed.iter().any(|pod| state.pods.get(*pod).is_some_and(|p| super::node_name_is(p, name)));
    (!on_node(old) && !on_node(new)) || node_addresses(old, name, ips, &mut Vec::new()) == *node_now
}

/// The addresses the changed pods had, with their identities; `None` if one was not theirs.
fn removed_addresses(table: &IdentityTable, old: &ClusterState, changed: &BTreeSet<&PodRef>) -> Option<BTreeMap<IpAddr, u32>> {
    let mut removed = BTreeMap::new();
    for pod_ref in changed {
        let Some(pod) = old.pods.get(*pod_ref).filter(|p| is_live_pod(p)) else { continue };
        for ip in pod_ips(pod, &mut Vec::new()) {
            let (owner, number) = table.pod_addresses.get(&ip)?;
            if owner != *pod_ref {
                return None;
            }
            removed.insert(ip, *number);
        }
    }
    Some(removed)
}

/// The addresses the changed pods have now, with the identity each gets; `None` if an
/// address is another pod's, a pod's address has a problem, or a key has no number.
fn added_addresses<'s>(
    table: &IdentityTable,
    new: &'s ClusterState,
    changed: &BTreeSet<&PodRef>,
    inputs: &IdentityInputs<'_>,
    allocator: &IdentityAllocator,
) -> Option<BTreeMap<IpAddr, (&'s PodRef, u32)>> {
    let mut added = BTreeMap::new();
    for pod_ref in changed {
        let Some(pod) = new.pods.get(*pod_ref).filter(|p| is_live_pod(p)) else { continue };
        let mut problems = Vec::new();
        let ips = pod_ips(pod, &mut problems);
        if !problems.is_empty() {
            return None;
        }
        let (namespace, pod_labels) = group_of(pod_ref, pod);
        let groups = [GroupData { namespace, pod_labels, namespace_labels: new.namespace_labels(namespace) }];
        let named_ports = resolve_named_ports(pod, inputs.egress_named_ports);
        for ip in ips {
            let taken = table.pod_addresses.get(&ip).is_some_and(|(owner, _)| !changed.contains(owner));
            let key = IdentityKey::Pod { group: 0, blocks: blocks_matching(inputs.blocks, ip), named_ports: named_ports.clone() };
            let number = allocator.number(&canonical_bytes(&key, inputs.blocks, &groups))?;
            let (pod_ref, _) = new.pods.get_key_value(*pod_ref)?;
            if taken || added.insert(ip, (pod_ref, number)).is_some() {
                return None;
            }
        }
    }
    Some(added)
}

/// The addresses the ipBlocks name as host prefixes: whether a pod claims them decides
/// their entries, so a pod there is resolved in full.
fn host_prefixes<'a>(inputs: &'a IdentityInputs<'a>) -> impl Iterator<Item = IpAddr> + 'a {
    inputs
        .blocks
        .iter()
        .flat_map(|b| std::iter::once(&b.cidr).chain(&b.except))
        .filter(|p| **p == IpPrefix::host(p.addr()))
        .map(IpPrefix::addr)
}

/// Whether every identity that loses addresses keeps at least one.
fn keeps_every_key(table: &IdentityTable, removed: &BTreeMap<IpAddr, u32>, added: &BTreeMap<IpAddr, (&PodRef, u32)>) -> bool {
    let mut losses: BTreeMap<u32, isize> = BTreeMap::new();
    for number in removed.values() {
        *losses.entry(*number).or_default() += 1;
    }
    for (_, number) in added.values() {
        *losses.entry(*number).or_default() -= 1;
    }
    losses.retain(|_, loss| *loss > 0);
    if losses.is_empty() {
        return true;
    }
    let mut members: BTreeMap<u32, isize> = BTreeMap::new();
    for (_, number) in table.pod_addresses.values().filter(|(_, n)| losses.contains_key(n)) {
        *members.entry(*number).or_default() += 1;
    }
    losses.iter().all(|(number, loss)| members.get(number).copied().unwrap_or(0) > *loss)
}
