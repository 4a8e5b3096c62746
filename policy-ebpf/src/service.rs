//! Egress towards Service addresses, judged after kube-proxy's translation (see
//! policy_common::service): `from_pod` marks the packet with its endpoint id and hands it
//! on; the next classifier it meets judges it as that endpoint's egress towards the backend.

use aya_ebpf::{maps::lpm_trie::Key, programs::TcContext};
use policy_common::{
    endpoint::EndpointInfo,
    ipcache::IpcacheKey,
    service::{self, MARK_MASK},
};

use crate::maps::{ENDPOINT_IDS, ENDPOINTS, SERVICE_NETS};

/// Whether `addr` lies in a Service range.
#[inline(always)]
pub fn covers(addr_family: u8, addr: &[u8; 16]) -> bool {
    let (key, bits) = crate::lookup::address_key(addr_family, addr);
    SERVICE_NETS.get(Key::new(IpcacheKey::lpm_prefix_len(bits), key)).is_some()
}

/// Marks the packet as deferred by `endpoint`.
#[inline(always)]
pub fn defer(ctx: &TcContext, endpoint: u32) {
    // SAFETY: the context pointer is valid for the program run.
    let mark = unsafe { (*ctx.skb.skb).mark };
    ctx.set_mark(service::mark(mark, endpoint));
}

/// The endpoint id a packet was deferred by, 0 for none.
#[inline(always)]
pub fn deferred_by(ctx: &TcContext) -> u32 {
    // SAFETY: the context pointer is valid for the program run.
    let mark = unsafe { (*ctx.skb.skb).mark };
    if mark & MARK_MASK == 0 { 0 } else { service::deferred_endpoint(mark) }
}

/// The endpoint behind a deferred packet's id and its interface, if it is still on the node.
#[inline(always)]
pub fn source_endpoint(id: u32) -> Option<(EndpointInfo, u32)> {
    let key = *ENDPOINT_IDS.get(id)?;
    let endpoint = ENDPOINTS.get_ptr(&key)?;
    // SAFETY: a value pointer from a successful lookup; copied once.
    let endpoint = unsafe { *endpoint };
    // The id may have been given to another interface since; its old entry is then gone.
    (endpoint.id == id).then_some((endpoint, key.ifindex))
}
