//! The agent's one error type.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Reading a file or directory failed.
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Writing a file (a sysctl) failed.
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A manifest document could not be parsed; names the file and the object.
    #[error("{path}: {what}")]
    Manifest { path: PathBuf, what: String },

    /// Making `path` a bpffs directory failed.
    #[error("bpffs {path}: cannot {what}: {source}")]
    Mount {
        path: PathBuf,
        what: String,
        #[source]
        source: std::io::Error,
    },

    /// A system call about the node's interfaces (getifaddrs, ioctls) failed.
    #[error("{what}: {source}")]
    Syscall {
        what: String,
        #[source]
        source: std::io::Error,
    },

    /// Bad command-line input (names the flag).
    #[error("{flag}: {what}")]
    Usage { flag: &'static str, what: String },

    /// Loading, pinning or attaching the eBPF program, or touching its maps.
    #[error("eBPF {what}: {source}")]
    Ebpf {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// A BPF map is full: the endpoint it was written for fails closed.
    #[error("map {map} is full while writing {what} (raise its size: --policy-map-size, --ipcache-size)")]
    MapFull { map: &'static str, what: String },

    /// An allow entry not written because a deny entry it would be reached under failed to
    /// be written (the endpoint stays closed there until a later sync writes both).
    #[error("allow entry held back: a deny entry it falls under could not be written")]
    HeldBack,

    /// Talking to the Kubernetes API server.
    #[error("kubernetes: {what}: {source}")]
    Kube {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// The metrics or status server ended (it runs for the life of the agent).
    #[error("the server on {addr} stopped")]
    ServerStopped { addr: String },

    /// The agent's /status answer could not be read.
    #[error("bad /status answer from {addr}: {what}")]
    StatusAnswer { addr: String, what: String },

    /// Serving metrics or status.
    #[error("serve {addr}: {source}")]
    Serve {
        addr: String,
        #[source]
        source: std::io::Error,
    },

    /// Reading or subscribing to the node's links, addresses and routes over netlink.
    #[error("netlink {what}: {source}")]
    Netlink {
        what: String,
        #[source]
        source: std::io::Error,
    },

    /// The CNI plugin's failure, with its CNI error code (11: try again later).
    #[error("{what}")]
    Cni { code: u32, what: String },

    /// Installing or removing the CNI plugin: a CNI config or bin directory.
    #[error("{path}: {what}")]
    CniInstall { path: PathBuf, what: String },
}
