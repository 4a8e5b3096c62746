//! Identity and policy lookups: the peer address to an identity (ipcache), then the allow
//! entry for (endpoint, identity, direction, protocol, port): exact identity first, then the
//! wildcard identity (as in Cilium's policy.h). Only allow entries exist.

use aya_ebpf::maps::lpm_trie::Key;
use policy_common::{
    Direction, family, identity,
    ipcache::{self, IpcacheKey},
    policy::{self, PolicyKey},
};

use crate::maps::{IPCACHE, POLICY};

#[inline(always)]
pub fn identity_of(addr_family: u8, addr: &[u8; 16]) -> u32 {
    let (data, bits) = if addr_family == family::IPV4 {
        (IpcacheKey::v4([addr[0], addr[1], addr[2], addr[3]]), 32)
    } else {
        (IpcacheKey::v6(*addr), 128)
    };
    let key = Key::new(IpcacheKey::lpm_prefix_len(bits), data);
    match IPCACHE.get(&key) {
        Some(value) => value.identity,
        None => identity::WORLD,
    }
}

/// The cookie of the entry that allows this flow, if any.
#[inline(always)]
pub fn allowed(endpoint: u32, peer: u32, direction: Direction, protocol: u8, port: u16) -> Option<u32> {
    let exact = Key::new(policy::PREFIX_FULL, PolicyKey::new(endpoint, peer, direction, protocol, port));
    if let Some(value) = POLICY.get(&exact) {
        return Some(value.cookie);
    }
    let any = Key::new(policy::PREFIX_FULL, PolicyKey::new(endpoint, identity::ANY, direction, protocol, port));
    POLICY.get(&any).map(|value| value.cookie)
}

const _: () = assert!(ipcache::FAMILY_BITS == 32);
