//! Key and value types shared by the kernel classifier and the node agent.
//!
//! Every type is `#[repr(C)]`, padding-free (enforced by `bytemuck::Pod`'s derive) and has a
//! size assert. Fields that the kernel compares as bytes (LPM tries, ports) are stored in
//! network byte order behind constructors and accessors; plain host-order integers are public.
#![no_std]

pub mod conntrack;
pub mod counters;
pub mod endpoint;
pub mod event;
pub mod identity;
pub mod ipcache;
pub mod policy;
pub mod service;

/// The traffic direction, seen from the pod.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// Traffic entering the pod (host-side veth, TC egress).
    Ingress = 0,
    /// Traffic leaving the pod (host-side veth, TC ingress).
    Egress = 1,
}

impl Direction {
    pub const fn from_u8(value: u8) -> Option<Self> {
        match value {
            0 => Some(Self::Ingress),
            1 => Some(Self::Egress),
            _ => None,
        }
    }
}

/// IP protocol numbers the classifier understands.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
    pub const SCTP: u8 = 132;
}

/// Address family tag used in map keys.
pub mod family {
    pub const IPV4: u8 = 4;
    pub const IPV6: u8 = 6;
}

/// Implements `aya::Pod` for the agent; the kernel side only needs `bytemuck`.
macro_rules! user_pod {
    ($($ty:ty),+ $(,)?) => {
        $(
            #[cfg(feature = "user")]
            // SAFETY: the type is `#[repr(C)]`, `Copy` and padding-free (bytemuck::Pod derive).
            unsafe impl aya::Pod for $ty {}
        )+
    };
}
pub(crate) use user_pod;

#[cfg(test)]
extern crate std;
