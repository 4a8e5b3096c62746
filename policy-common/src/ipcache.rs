//! The ipcache: an LPM trie from an IPv4 or IPv6 prefix to a security identity.
//!
//! IPv4 and IPv6 share one trie; the leading family byte keeps them apart, so the LPM prefix
//! length is `FAMILY_BITS` plus the address prefix length.

use bytemuck::{Pod, Zeroable};

use crate::family;

/// Bits of the key that precede the address (family and padding).
pub const FAMILY_BITS: u32 = 32;
pub const MAX_ENTRIES: u32 = 65_536;

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
}

/// The identity an address prefix maps to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct IpcacheValue {
    pub identity: u32,
}
const _: () = assert!(core::mem::size_of::<IpcacheValue>() == 4);

crate::user_pod!(IpcacheKey, IpcacheValue);
