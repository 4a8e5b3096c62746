//! The ipcache: IPv4 and IPv6 addresses and prefixes to security identities.
//!
//! Logically one longest-prefix-match table. The kernel keeps it in two maps so that the cost
//! stays flat however many pods there are: whole addresses (/32, /128: pods, the node) in a
//! hash map, looked up first since they are the most specific, and the other prefixes
//! (ipBlock CIDRs and excepts, usually few) in an LPM trie. IPv4 and IPv6 share each map; the
//! leading family byte keeps them apart, so an LPM prefix length is `FAMILY_BITS` plus the
//! address prefix length.

use bytemuck::{Pod, Zeroable};

use crate::family;

/// Bits of the key that precede the address (family and padding).
pub const FAMILY_BITS: u32 = 32;
/// Capacity of the address hash map (pod and node addresses, cluster-wide).
pub const MAX_ADDRESSES: u32 = 65_536;
/// Capacity of the prefix trie (ipBlock prefixes).
pub const MAX_PREFIXES: u32 = 16_384;

/// Data part of the ipcache LPM key (the prefix length lives in aya's `Key` wrapper).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Pod, Zeroable)]
pub struct IpcacheKey {
    family: u8,
    _pad: [u8; 3],
    addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<IpcacheKey>() == 20);

impl IpcacheKey {
    pub const fn v4(addr: [u8; 4]) -> Self {
        let mut a = [0u8; 16];
        a[0] = addr[0];
        a[1] = addr[1];
        a[2] = addr[2];
        a[3] = addr[3];
        Self { family: family::IPV4, _pad: [0; 3], addr: a }
    }

    pub const fn v6(addr: [u8; 16]) -> Self {
        Self { family: family::IPV6, _pad: [0; 3], addr }
    }

    pub const fn family(&self) -> u8 {
        self.family
    }

    /// The address bytes; for IPv4 only the first four are meaningful.
    pub const fn addr(&self) -> &[u8; 16] {
        &self.addr
    }

    /// LPM prefix length for an address prefix of `bits`.
    pub const fn lpm_prefix_len(bits: u8) -> u32 {
        FAMILY_BITS + bits as u32
    }

    /// Whether an entry of this prefix length is a whole address (it goes to the hash map).
    pub const fn is_address(&self, lpm_prefix_len: u32) -> bool {
        let bits = if self.family == crate::family::IPV4 { 32 } else { 128 };
        lpm_prefix_len == FAMILY_BITS + bits
    }
}

/// The identity an address prefix maps to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct IpcacheValue {
    pub identity: u32,
}
const _: () = assert!(core::mem::size_of::<IpcacheValue>() == 4);

crate::user_pod!(IpcacheKey, IpcacheValue);
