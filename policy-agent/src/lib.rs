//! The node agent. Data flows through the modules in this order:
//! `state` (cluster objects from the API server or a manifest directory) ->
//! `resolve` (selectors, identities) -> `compile` (desired map contents, pure) ->
//! `sync` (diff and write the BPF maps) -> `datapath` (load, pin, attach the classifier).

pub mod agent;
pub mod alloc;
pub mod cni;
pub mod compile;
pub mod conntrack;
pub mod crd;
pub mod coverage;
pub mod datapath;
pub mod error;
pub mod explain;
pub mod flowlog;
pub mod metrics;
pub mod netif;
pub mod publish;
pub mod resolve;
pub mod services;
pub mod state;
pub mod status;
pub mod sync;
pub mod watch;

pub use error::AgentError;
