//! Numeric security identities: the result of an IP lookup in the ipcache.

/// Wildcard peer in policy keys ("any peer"). Never assigned to an address.
pub const ANY: u32 = 0;
/// The node itself (its own addresses, hostNetwork pods on this node).
pub const HOST: u32 = 1;
/// An address no prefix in the ipcache covers.
pub const WORLD: u32 = 2;
/// Identities at or above this are derived from cluster state by the agent.
pub const FIRST_DERIVED: u32 = 256;
/// Identities are kept below this, so `FIRST_DERIVED..MAX_DERIVED` is the derived range.
pub const MAX_DERIVED: u32 = 1 << 30;
