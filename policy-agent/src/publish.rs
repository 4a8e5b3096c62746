//! The agent's status, published for `kubectl policy status NODE`: in Kubernetes mode the
//! agent writes what it serves on /status into the ConfigMap `policy-agent-status-<node>` of
//! its own namespace. Reading it needs only `get configmaps` in that namespace, where the
//! API server's node proxy would need `nodes/proxy` (which reaches the kubelet's API too).
//!
//! The publisher runs beside the enforcement loop and never waits for it or fails it: it
//! reads the shared view, writes only when the content changed (at most every
//! [`MIN_INTERVAL`], plus a heartbeat), and on errors logs and retries with backoff.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};

use crate::metrics::{self, SharedView};
use crate::watch::{ClusterArgs, client};

/// The ConfigMap of node `<node>` is `policy-agent-status-<node>`.
pub const CONFIGMAP_PREFIX: &str = "policy-agent-status-";
/// The install manifests' namespace.
pub const DEFAULT_NAMESPACE: &str = "policy-enforcer";
/// ConfigMap keys: the /status JSON, and when it was written (RFC 3339).
pub const STATUS_KEY: &str = "status.json";
pub const PUBLISHED_KEY: &str = "published";
/// Field manager of the server-side apply.
const MANAGER: &str = "policy-agent";

/// How often the view is looked at (a write follows a change within this, past MIN_INTERVAL).
const CHECK: Duration = Duration::from_secs(1);
/// At most one write per node in this time, however often the status changes.
pub const MIN_INTERVAL: Duration = Duration::from_secs(10);
/// Rewritten unchanged after this, so that an old `published` means a stopped agent.
pub const HEARTBEAT: Duration = Duration::from_secs(300);
/// Until the first pass is done, publish only after this (a not-ready status is news too).
const NOT_READY_GRACE: Duration = Duration::from_secs(30);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// Bounds that keep the ConfigMap far below the API server's 1 MiB object limit.
const MAX_ENDPOINTS: usize = 200;
const MAX_PROBLEMS: usize = 50;
const MAX_PROBLEM_CHARS: usize = 500;
const MAX_BYTES: usize = 256 * 1024;

#[derive(clap::Args, Debug, Clone)]
pub struct PublishArgs {
    /// Namespace of the status ConfigMap `policy-agent-status-<node>` (Kubernetes mode; the
    /// agent's own namespace, from the downward API's POD_NAMESPACE).
    #[arg(long, env = "POD_NAMESPACE", default_value = DEFAULT_NAMESPACE, value_name = "NAMESPACE")]
    pub status_namespace: String,
    /// Do not publish the status ConfigMap.
    #[arg(long)]
    pub no_status_configmap: bool,
}

pub fn configmap_name(node: &str) -> String {
    format!("{CONFIGMAP_PREFIX}{node}")
}

/// Starts the publisher for Kubernetes mode (it makes its own client from `cluster`).
pub fn spawn(args: &PublishArgs, cluster: &ClusterArgs, view: &SharedView) {
    if args.no_status_configmap {
        return;
    }
    let (namespace, cluster, view) = (args.status_namespace.clone(), cluster.clone(), view.clone());
    tokio::spawn(async move { run(namespace, cluster, view).await });
}

/// The status as published: the /status JSON without the pass counter (which moves every
/// resync, and would make every look a change), bounded in size.
pub fn render(status: &Value) -> String {
    let mut status = status.clone();
    if let Some(object) = status.as_object_mut() {
        object.remove("passes");
    }
    truncate_list(&mut status, "endpoints", MAX_ENDPOINTS);
    truncate_list(&mut status, "problems", MAX_PROBLEMS);
    if let Some(problems) = status["problems"].as_array_mut() {
        for problem in problems {
            if let Some(text) = problem.as_str().filter(|t| t.chars().count() > MAX_PROBLEM_CHARS) {
                *problem = Value::from(format!("{}...", text.chars().take(MAX_PROBLEM_CHARS).collect::<String>()));
            }
        }
    }
    let text = status.to_string();
    if text.len() <= MAX_BYTES {
        return text;
    }
    truncate_list(&mut status, "endpoints", 0);
    truncate_list(&mut status, "problems", 0);
    status.to_string()
}

/// Keeps the first `max` items of `status[key]`, noting the full count in `<key>_total`.
fn truncate_list(status: &mut Value, key: &str, max: usize) {
    let total_key = format!("{key}_total");
    let known_total = status.get(&total_key).and_then(Value::as_u64);
    let Some(list) = status.get_mut(key).and_then(Value::as_array_mut) else { return };
    if list.len() > max {
        let total = known_total.unwrap_or(list.len() as u64);
        list.truncate(max);
        status[total_key] = Value::from(total);
    }
}

/// When to write: the first time once ready (or after a grace), on a change at most every
/// MIN_INTERVAL, and unchanged after HEARTBEAT.
#[derive(Debug, Default)]
struct Schedule {
    last: Option<(String, Instant)>,
    retry_at: Option<Instant>,
    backoff: Option<Duration>,
}

impl Schedule {
    fn due(&self, content: &str, ready: bool, started: Instant, now: Instant) -> bool {
        if self.retry_at.is_some_and(|at| now < at) {
            return false;
        }
        match &self.last {
            None => ready || now.duration_since(started) >= NOT_READY_GRACE,
            Some((last, at)) => {
                let age = now.duration_since(*at);
                (last != content && age >= MIN_INTERVAL) || age >= HEARTBEAT
            }
        }
    }

    fn written(&mut self, content: String, now: Instant) {
        self.last = Some((content, now));
        self.retry_at = None;
        self.backoff = None;
    }

    fn failed(&mut self, now: Instant) -> Duration {
        let delay = self.backoff.map_or(RETRY_MIN, |d| (d * 2).min(RETRY_MAX));
        self.backoff = Some(delay);
        self.retry_at = Some(now + delay);
        delay
    }
}

async fn run(namespace: String, cluster: ClusterArgs, view: SharedView) {
    let started = Instant::now();
    let mut schedule = Schedule::default();
    let mut api: Option<Api<ConfigMap>> = None;
    loop {
        tokio::time::sleep(CHECK).await;
        let (node, ready, content) = {
            let view = metrics::read(&view);
            let status = serde_json::to_value(&*view).unwrap_or(Value::Null);
            (view.node.clone(), view.ready, render(&status))
        };
        let now = Instant::now();
        if !schedule.due(&content, ready, started, now) {
            continue;
        }
        let result = match &api {
            Some(api) => write(api, &namespace, &node, &content).await,
            None => match tokio::time::timeout(REQUEST_TIMEOUT, client(&cluster)).await {
                Ok(Ok(client)) => {
                    let made = Api::namespaced(client, &namespace);
                    let result = write(&made, &namespace, &node, &content).await;
                    api = Some(made);
                    result
                }
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("timed out creating the client".to_owned()),
            },
        };
        match result {
            Ok(()) => schedule.written(content, now),
            Err(error) => {
                let retry = schedule.failed(now);
                tracing::warn!(configmap = %configmap_name(&node), namespace = %namespace, %error, retry_s = retry.as_secs(), "cannot publish the status; enforcement goes on, retrying");
            }
        }
    }
}

/// One server-side apply of the node's ConfigMap (creates it the first time).
async fn write(api: &Api<ConfigMap>, namespace: &str, node: &str, content: &str) -> Result<(), String> {
    let name = configmap_name(node);
    let configmap = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/name": "policy-agent", "app.kubernetes.io/component": "status"},
        },
        "data": {"node": node, PUBLISHED_KEY: Timestamp::now().to_string(), STATUS_KEY: content},
    });
    let params = PatchParams::apply(MANAGER).force();
    match tokio::time::timeout(REQUEST_TIMEOUT, api.patch(&name, &params, &Patch::Apply(&configmap))).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer in {REQUEST_TIMEOUT:?}")),
    }
}

/// A node's published status, as read back.
#[derive(Clone, Debug)]
pub struct Published {
    pub status: Value,
    pub published: Option<Timestamp>,
}

impl Published {
    /// How long ago it was written (`None` if the time is missing or in the future).
    pub fn age(&self, now: Timestamp) -> Option<Duration> {
        let published = self.published?;
        Duration::try_from(now.duration_since(published)).ok()
    }
}

/// Reads node `node`'s ConfigMap from `namespace`.
pub async fn read(client: &kube::Client, namespace: &str, node: &str) -> Result<Published, String> {
    let name = configmap_name(node);
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let configmap = api
        .get_opt(&name)
        .await
        .map_err(|e| format!("get ConfigMap {namespace}/{name}: {e}"))?
        .ok_or_else(|| format!("no ConfigMap {namespace}/{name}: no agent in Kubernetes mode has published for node {node} (wrong node name, or namespace: -n)"))?;
    parse(&configmap).map_err(|e| format!("ConfigMap {namespace}/{name}: {e}"))
}

/// The status of a ConfigMap the publisher wrote.
pub fn parse(configmap: &ConfigMap) -> Result<Published, String> {
    let data = configmap.data.as_ref().ok_or("no data")?;
    let text = data.get(STATUS_KEY).ok_or_else(|| format!("data.{STATUS_KEY}: missing"))?;
    let status: Value = serde_json::from_str(text).map_err(|e| format!("data.{STATUS_KEY}: {e}"))?;
    let published = data.get(PUBLISHED_KEY).and_then(|t| t.parse::<Timestamp>().ok());
    Ok(Published { status, published })
}

// ---------------------------------------------------------------------------------------
// `kubectl policy status NODE`: the reader.

#[derive(clap::Args, Debug, Clone)]
pub struct NodeStatusArgs {
    /// The node whose agent to show (its `spec.nodeName`).
    pub node: String,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// The agent's namespace, where it publishes its status ConfigMap.
    #[arg(short = 'n', long, default_value = DEFAULT_NAMESPACE, value_name = "NAMESPACE")]
    pub namespace: String,
    /// Print `{"node", "published", "age_seconds", "status"}` instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs `status NODE`: exit 0 when a status was shown, 2 otherwise.
pub fn node_status_main(args: &NodeStatusArgs) -> std::process::ExitCode {
    let read = async {
        let client = client(&args.cluster).await.map_err(|e| e.to_string())?;
        read(&client, &args.namespace, &args.node).await
    };
    let result = crate::explain::runtime().and_then(|rt| rt.block_on(read));
    match result {
        Ok(published) => {
            let age = published.age(Timestamp::now());
            if args.json {
                let value = json!({
                    "node": args.node,
                    "published": published.published.map(|t| t.to_string()),
                    "age_seconds": age.map(|a| a.as_secs()),
                    "status": published.status,
                });
                println!("{value:#}");
            } else {
                print!("{}", describe_published(&args.node, &published, age));
            }
            std::process::ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("error: {message}");
            std::process::ExitCode::from(2)
        }
    }
}

/// How old the status is, then the status. The agent rewrites it on a change (at most every
/// MIN_INTERVAL) and at least every HEARTBEAT: older than that, the agent is not running.
fn describe_published(node: &str, published: &Published, age: Option<Duration>) -> String {
    let when = match (published.published, age) {
        (Some(at), Some(age)) => {
            let stale = if age > HEARTBEAT + MIN_INTERVAL * 3 { "; STALE: the agent has not written it since, is it running?" } else { "" };
            format!("published {}s ago ({at}){stale}", age.as_secs())
        }
        (Some(at), None) => format!("published at {at} (in the future: check the clocks)"),
        (None, _) => "publication time unknown".to_owned(),
    };
    format!("status of node {node}'s agent, {when}\n{}", crate::status::status_text(&published.status))
}

/// The /status JSON in words: a summary, one line per endpoint, the map fill, problems.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_drops_the_pass_counter_and_bounds_the_lists() {
        let endpoints: Vec<Value> = (0..MAX_ENDPOINTS + 5).map(|i| json!({"pod": format!("x/p{i}")})).collect();
        let status = json!({"node": "n1", "passes": 7, "endpoints": endpoints, "problems": ["p".repeat(2000)]});
        let rendered: Value = serde_json::from_str(&render(&status)).unwrap();
        assert!(rendered.get("passes").is_none());
        assert_eq!(rendered["endpoints"].as_array().unwrap().len(), MAX_ENDPOINTS);
        assert_eq!(rendered["endpoints_total"], MAX_ENDPOINTS + 5);
        assert_eq!(rendered["problems"][0].as_str().unwrap().len(), MAX_PROBLEM_CHARS + 3);
        let mut other = status.clone();
        other["passes"] = json!(8);
        assert_eq!(render(&status), render(&other), "a new pass alone is no change");
    }

    #[test]
    fn render_stays_under_its_byte_bound() {
        let endpoints: Vec<Value> = (0..MAX_ENDPOINTS).map(|_| json!({"error": "e".repeat(5000)})).collect();
        let text = render(&json!({"node": "n1", "endpoints": endpoints}));
        assert!(text.len() < MAX_BYTES, "{}", text.len());
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["endpoints_total"], MAX_ENDPOINTS);
    }

    #[test]
    fn schedule_writes_changes_at_most_every_interval_and_backs_off() {
        let start = Instant::now();
        let mut s = Schedule::default();
        assert!(!s.due("a", false, start, start), "not before the first pass");
        assert!(s.due("a", false, start, start + NOT_READY_GRACE), "unless it takes long");
        assert!(s.due("a", true, start, start));
        s.written("a".into(), start);
        assert!(!s.due("a", true, start, start + MIN_INTERVAL), "unchanged");
        assert!(!s.due("b", true, start, start + Duration::from_secs(1)), "changed, but too soon");
        assert!(s.due("b", true, start, start + MIN_INTERVAL));
        assert!(s.due("a", true, start, start + HEARTBEAT), "heartbeat");
        let t = start + MIN_INTERVAL;
        assert_eq!(s.failed(t), RETRY_MIN);
        assert!(!s.due("b", true, start, t));
        assert_eq!(s.failed(t), RETRY_MIN * 2);
        assert!(s.due("b", true, start, t + RETRY_MIN * 2));
    }

    #[test]
    fn parse_reads_status_and_time() {
        let configmap: ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": "policy-agent-status-n1"},
            "data": {STATUS_KEY: "{\"node\":\"n1\"}", PUBLISHED_KEY: "2024-01-01T00:00:00Z"},
        }))
        .unwrap();
        let published = parse(&configmap).unwrap();
        assert_eq!(published.status["node"], "n1");
        let later: Timestamp = "2024-01-01T00:01:00Z".parse().unwrap();
        assert_eq!(published.age(later), Some(Duration::from_secs(60)));
        assert!(parse(&ConfigMap::default()).is_err());
    }
}
