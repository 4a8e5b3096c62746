//! `policy-agent status`: the local endpoints as the running agent sees them (from its
//! `/status`), or, when no agent answers, what is pinned in bpffs.

use std::{io, net::SocketAddr, path::PathBuf, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::rt::TokioIo;

use crate::{
    AgentError,
    datapath::{DEFAULT_BPFFS, Hook, Maps, PinLayout},
    netif,
};

/// Where the agent serves /status by default (loopback only).
pub const DEFAULT_STATUS_ADDR: &str = "127.0.0.1:9191";

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// Where the agent serves /status (its `--status-addr`, or a loopback `--metrics-addr`).
    #[arg(long, alias = "metrics-addr", default_value = DEFAULT_STATUS_ADDR)]
    pub status_addr: String,
    /// bpffs directory, read when no agent answers.
    #[arg(long, default_value = DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
    /// Print the agent's JSON as it is.
    #[arg(long)]
    pub json: bool,
}

pub fn main(args: &StatusArgs) -> Result<(), AgentError> {
    match fetch(&args.status_addr, "/status") {
        Ok(body) => {
            if args.json {
                println!("{body}");
                return Ok(());
            }
            let status: serde_json::Value = serde_json::from_str(&body)
                .map_err(|e| AgentError::StatusAnswer { addr: args.status_addr.clone(), what: e.to_string() })?;
            print!("{}", status_text(&status));
            Ok(())
        }
        Err(e) => {
            eprintln!("no agent answers on {} ({e}); showing what is pinned under {}", args.status_addr, args.bpffs.display());
            print_pinned(&PinLayout::new(&args.bpffs))
        }
    }
}

/// How long connecting to the agent may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the whole request may take, connecting included.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest answer read (a `/status` of a full node is far smaller).
const MAX_ANSWER: usize = 64 * 1024 * 1024;

/// GETs `path` from the agent at `addr` (an IP address and port) over HTTP/1.1: the body of a
/// 200 answer, an error otherwise. Blocking, on a runtime of its own on the calling thread (so
/// the socket is opened in that thread's network namespace); not for async contexts.
pub fn fetch(addr: &str, path: &str) -> Result<String, std::io::Error> {
    let target: SocketAddr = addr.parse().map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{addr}: {e}")))?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        tokio::time::timeout(FETCH_TIMEOUT, get(target, addr, path))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("no answer from {addr} within {FETCH_TIMEOUT:?}")))?
    })
}

async fn get(target: SocketAddr, addr: &str, path: &str) -> io::Result<String> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(target))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("cannot connect to {addr} within {CONNECT_TIMEOUT:?}")))??;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(io::Error::other)?;
    // Drives the connection; it ends with the runtime, after the answer.
    tokio::spawn(connection);
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, addr)
        .body(Empty::<Bytes>::new())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("GET {path}: {e}")))?;
    let response = sender.send_request(request).await.map_err(io::Error::other)?;
    if response.status() != hyper::StatusCode::OK {
        return Err(io::Error::other(format!("GET {path} on {addr}: {}", response.status())));
    }
    let body = Limited::new(response.into_body(), MAX_ANSWER).collect().await.map_err(io::Error::other)?.to_bytes();
    String::from_utf8(Vec::from(body)).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("GET {path} on {addr}: {e}")))
}

/// The agent's status JSON as a table: what `status` and `kubectl policy status` print.
pub fn status_text(status: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::Null => "-".to_owned(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let _ = writeln!(out, "node {}  ready {}  identities {}  syncs {}", text(&status["node"]), text(&status["ready"]), text(&status["identities"]), text(&status["syncs"]));
    let _ = writeln!(out, "{:<32} {:<16} {:>8} {:>9} {:<8} {:<8} {:>8} {:<9} {:<10}", "POD", "INTERFACE", "ENDPOINT", "IDENTITY", "INGRESS", "EGRESS", "ENTRIES", "ATTACHED", "PROGRAMS");
    for e in status["endpoints"].as_array().into_iter().flatten() {
        let isolation = |key: &str| if e[key].as_bool() == Some(true) { "isolated" } else { "open" };
        let identities: Vec<String> = e["identities"].as_array().into_iter().flatten().map(|i| i.to_string()).collect();
        let programs: Vec<String> = e["programs"].as_array().into_iter().flatten().map(|i| i.to_string()).collect();
        let _ = writeln!(
            out,
            "{:<32} {:<16} {:>8} {:>9} {:<8} {:<8} {:>8} {:<9} {:<10}",
            text(&e["pod"]),
            text(&e["interface"]),
            text(&e["endpoint_id"]),
            if identities.is_empty() { "-".to_owned() } else { identities.join(",") },
            isolation("ingress_isolated"),
            isolation("egress_isolated"),
            text(&e["policy_entries"]),
            if e["attached"].as_bool() == Some(true) { "yes" } else { "no" },
            if programs.is_empty() { "-".to_owned() } else { programs.join(",") },
        );
        let names = |key: &str| e[key].as_array().into_iter().flatten().filter_map(|n| n.as_str()).collect::<Vec<_>>().join(", ");
        let (ingress, egress) = (names("ingress_cluster_policies"), names("egress_cluster_policies"));
        if !ingress.is_empty() || !egress.is_empty() {
            let or_none = |s: String| if s.is_empty() { "-".to_owned() } else { s };
            let _ = writeln!(out, "  cluster policies: ingress {}; egress {}", or_none(ingress), or_none(egress));
        }
        if let Some(error) = e["error"].as_str() {
            let _ = writeln!(out, "  ! {error}");
        }
    }
    let _ = writeln!(out, "maps:");
    if let Some(maps) = status["maps"].as_object() {
        for (name, fill) in maps {
            let entries = fill["entries"].as_u64().unwrap_or(0);
            let capacity = fill["capacity"].as_u64().unwrap_or(1).max(1);
            let _ = writeln!(out, "  {name:<14} {entries:>7} / {capacity:<7} ({:.1}%)", entries as f64 * 100.0 / capacity as f64);
        }
    }
    for problem in status["problems"].as_array().into_iter().flatten() {
        let _ = writeln!(out, "problem: {}", text(problem));
    }
    if let Some(total) = status["endpoints_total"].as_u64() {
        let _ = writeln!(out, "(first {} of {total} endpoints)", status["endpoints"].as_array().map_or(0, Vec::len));
    }
    out
}

fn print_pinned(pins: &PinLayout) -> Result<(), AgentError> {
    let maps = Maps::open_pinned(pins)?;
    let contents = maps.read()?;
    let links = pins.pinned_links();
    println!("{:<16} {:>8} {:>8} {:<8} {:<8} {:>8} {:<9}", "INTERFACE", "IFINDEX", "ENDPOINT", "INGRESS", "EGRESS", "ENTRIES", "ATTACHED");
    for (ifindex, info) in &contents.endpoints {
        let name = netif::ifname(*ifindex).unwrap_or_else(|| "?".into());
        let attached = Hook::BOTH.iter().filter(|h| links.contains(&(name.clone(), **h))).count();
        let flag = |f| if info.has(f) { "isolated" } else { "open" };
        let entries = contents.policy.keys().filter(|(_, k)| k.endpoint() == info.id).count();
        println!(
            "{name:<16} {ifindex:>8} {:>8} {:<8} {:<8} {entries:>8} {:<9}",
            info.id,
            flag(policy_common::endpoint::FLAG_INGRESS_ISOLATED),
            flag(policy_common::endpoint::FLAG_EGRESS_ISOLATED),
            format!("{attached}/2"),
        );
    }
    println!("entries: ipcache {}, policy {}, endpoints {}", contents.ipcache.len(), contents.policy.len(), contents.endpoints.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_shows_cluster_policies_under_their_pod() {
        let status = serde_json::json!({
            "node": "n1",
            "endpoints": [
                {"pod": "x/e", "ingress_isolated": true, "egress_isolated": false, "ingress_cluster_policies": ["guard-e", "baseline"], "egress_cluster_policies": []},
                {"pod": "x/a", "ingress_isolated": false, "egress_isolated": false, "ingress_cluster_policies": [], "egress_cluster_policies": []},
            ],
        });
        let text = status_text(&status);
        assert!(text.contains("\n  cluster policies: ingress guard-e, baseline; egress -\n"), "{text}");
        assert_eq!(text.matches("cluster policies").count(), 1, "{text}");
    }
}
