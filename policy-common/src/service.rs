//! Service addresses. kube-proxy rewrites a connection to a Service address (a ClusterIP)
//! into one to a backend pod after the packet has left the client's veth, where `from_pod`
//! runs. So a pod's egress towards a Service address is not judged there: the packet is
//! marked with the client's endpoint id and judged, as egress of that endpoint towards the
//! backend it now goes to, by the next classifier it meets after the rewrite (`to_pod` on the
//! backend's veth, or on the node's uplink for a backend on another node).

/// Capacity of the Service range trie (kube-proxy's `--service-cluster-ip-range`, one or two).
pub const MAX_NETS: u32 = 64;

/// The bits of `skb->mark` that carry a deferred packet's endpoint id (ids are below
/// [`crate::endpoint::MAX_ENTRIES`], 12 bits). kube-proxy uses bits 14 and 15; a pod cannot set
/// the mark of what reaches the node (veth clears it when a packet changes namespace).
pub const MARK_SHIFT: u32 = 16;
pub const MARK_MASK: u32 = 0x0fff << MARK_SHIFT;
const _: () = assert!(crate::endpoint::MAX_ENTRIES <= 0x1000);

/// The mark a deferred packet of `endpoint` carries, over the other bits of `mark`.
pub const fn mark(mark: u32, endpoint: u32) -> u32 {
    (mark & !MARK_MASK) | ((endpoint << MARK_SHIFT) & MARK_MASK)
}

/// The endpoint id a mark defers to, 0 for none.
pub const fn deferred_endpoint(mark: u32) -> u32 {
    (mark & MARK_MASK) >> MARK_SHIFT
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mark_round_trips_and_keeps_other_bits() {
        let kube_proxy_masq = 0x4000;
        let marked = mark(kube_proxy_masq, 4095);
        assert_eq!(deferred_endpoint(marked), 4095);
        assert_eq!(marked & !MARK_MASK, kube_proxy_masq);
        assert_eq!(deferred_endpoint(mark(marked, 0)), 0);
        assert_eq!(deferred_endpoint(0xffff), 0);
    }
}
