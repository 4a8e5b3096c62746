//! Verdict events, sent on a ring buffer for the flow log, and the classifier's settings.

use bytemuck::{Pod, Zeroable};

/// Ring buffer size in bytes (a power of two, a multiple of the page size).
pub const RING_BYTES: u32 = 1 << 20;

/// A decision about the first packet of a flow (or a drop).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct VerdictEvent {
    pub timestamp_ns: u64,
    pub endpoint: u32,
    pub ifindex: u32,
    /// Cookie of the allowing rule, 0 for drops.
    pub cookie: u32,
    /// Identity of the peer address (0 if the packet never reached the lookup).
    pub peer_identity: u32,
    /// A [`Reason`](crate::counters::Reason) value.
    pub reason: u8,
    pub direction: u8,
    pub protocol: u8,
    pub family: u8,
    src_port: [u8; 2],
    dst_port: [u8; 2],
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<VerdictEvent>() == 64);

impl VerdictEvent {
    pub fn set_ports(&mut self, src: u16, dst: u16) {
        self.src_port = src.to_be_bytes();
        self.dst_port = dst.to_be_bytes();
    }

    pub const fn src_port(&self) -> u16 {
        u16::from_be_bytes(self.src_port)
    }

    pub const fn dst_port(&self) -> u16 {
        u16::from_be_bytes(self.dst_port)
    }
}

/// Send events for drops.
pub const CONFIG_EVENTS_DENIED: u32 = 1 << 0;
/// Send events for newly allowed flows too.
pub const CONFIG_EVENTS_ALLOWED: u32 = 1 << 1;

/// Log every drop through aya-log (debugging only: it costs on the drop path).
pub const CONFIG_DEBUG_LOG: u32 = 1 << 2;

/// Written by the agent into slot 0 of the config array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct Config {
    pub flags: u32,
    /// Events per second per CPU; beyond it events are counted but not sent.
    pub events_per_sec: u32,
    /// Tracked flows one endpoint may hold (see [`crate::conntrack::CtUsage`]); 0 means
    /// [`crate::conntrack::DEFAULT_BUDGET`].
    pub ct_budget: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<Config>() == 16);

/// Per-CPU rate limiter state: a one-second window.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct RateState {
    pub window_start_ns: u64,
    pub sent: u32,
    pub suppressed: u32,
}
const _: () = assert!(core::mem::size_of::<RateState>() == 16);

crate::user_pod!(VerdictEvent, Config, RateState);
