//! Enforced from the first packet: a chained CNI plugin (this binary run as
//! `policy-enforcer`) hands each new pod sandbox to the agent over a unix socket, and the
//! runtime starts the pod's containers only once the agent has placed, written and attached
//! it. The agent records the addresses CNI reported until the pod's status carries them.
//!
//! `plugin`: the CNI side (a short-lived process per ADD/DEL/CHECK). `endpoint`: the
//! agent's socket server and its pending requests. `install`: the DaemonSet's init
//! container copies the binary and patches the node's conflist.

pub mod endpoint;
pub mod install;
pub mod plugin;
#[cfg(test)]
mod tests;

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

pub use endpoint::CniEndpoint;

/// Where the agent listens and the plugin connects, unless configured otherwise.
pub const DEFAULT_SOCKET: &str = "/run/policy-enforcer/cni.sock";
/// The plugin's installed name in the CNI bin directory (and its `type` in the conflist).
pub const PLUGIN_TYPE: &str = "policy-enforcer";
/// The longest request or answer line either side reads.
const MAX_LINE: u64 = 64 * 1024;

/// One request line from the plugin to the agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    /// A new sandbox: answered once the pod is enforced, or with why not.
    Add(AddRequest),
    /// The sandbox is gone: forget what its ADD recorded.
    Del(DelRequest),
    /// Whether the pod is enforced now.
    Check(CheckRequest),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AddRequest {
    pub namespace: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    pub container_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// The pod's addresses, from the primary plugin's result.
    pub ips: Vec<IpAddr>,
    /// Host-side interfaces of that result (those without `sandbox`).
    #[serde(default)]
    pub host_interfaces: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DelRequest {
    pub container_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckRequest {
    pub namespace: String,
    pub name: String,
    pub container_id: String,
}

/// The agent's answer line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Answer {
    pub fn ok() -> Self {
        Self { ok: true, error: None }
    }

    pub fn error(error: impl Into<String>) -> Self {
        Self { ok: false, error: Some(error.into()) }
    }
}
