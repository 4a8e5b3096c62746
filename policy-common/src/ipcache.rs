//! The ipcache: IPv4 and IPv6 addresses and prefixes to security identities.
//!
//! Logically one longest-prefix-match table. The kernel keeps it in two maps so that the cost
//! stays flat however many pods there are: whole addresses (/32, /128: pods, the node) in a
//! hash map, looked up first since they are the most specific, and the other prefixes
//! (ipBlock CIDRs and excepts, usually few) in an LPM trie. IPv4 and IPv6 share each map; the
//! leading family word keeps them apart, so an LPM prefix length is `FAMILY_BITS` plus the
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
    /// The family in a whole word (every prefix covers it): the key is then 4-byte aligned,
    /// so the classifier builds it with word stores instead of byte loops. On little-endian
    /// machines its bytes are those of the earlier family byte and three zero bytes.
    family: u32,
    addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<IpcacheKey>() == 20);

impl IpcacheKey {
    pub const fn v4(addr: [u8; 4]) -> Self {
        // The address, then twelve zero bytes, as one value: no byte-wise zeroing.
        let addr = ((u32::from_be_bytes(addr) as u128) << 96).to_be_bytes();
        Self { family: family::IPV4 as u32, addr }
    }

    pub const fn v6(addr: [u8; 16]) -> Self {
        Self { family: family::IPV6 as u32, addr }
    }

    pub const fn family(&self) -> u8 {
        self.family as u8
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
        let bits = if self.family() == crate::family::IPV4 { 32 } else { 128 };
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes the kernel hashes and the trie compares: the family, three zero bytes, the
    /// address, zeros. Pinned maps written by an agent with the earlier byte layout match.
    #[test]
    #[cfg(target_endian = "little")]
    fn ipcache_key_bytes() {
        let v4 = IpcacheKey::v4([198, 18, 0, 7]);
        let mut want = [0u8; 20];
        want[0] = family::IPV4;
        want[4..8].copy_from_slice(&[198, 18, 0, 7]);
        assert_eq!(bytemuck::bytes_of(&v4), &want);
        assert_eq!(v4.addr()[..4], [198, 18, 0, 7]);
        let v6 = IpcacheKey::v6([0x20, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9]);
        assert_eq!(bytemuck::bytes_of(&v6)[..4], [family::IPV6, 0, 0, 0]);
        assert_eq!(v6.family(), family::IPV6);
    }
}
