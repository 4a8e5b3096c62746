//! The chained CNI plugin: this binary run as `policy-enforcer` by the container runtime,
//! after the primary plugin (ptp, bridge...). ADD passes the pod to the agent and returns the
//! primary plugin's result unchanged only once the agent enforces the pod; otherwise it fails
//! and the runtime retries the sandbox, so a pod never runs unenforced.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use serde_json::Value;

use super::{AddRequest, Answer, CheckRequest, DEFAULT_SOCKET, DelRequest, MAX_LINE, Request};
use crate::AgentError;

/// CNI spec versions whose results this plugin reads (0.3.x results have the 0.4.0 shape).
pub const SUPPORTED_VERSIONS: [&str; 4] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"];
/// How long ADD and CHECK wait for the agent, unless `timeoutSeconds` says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(20);
/// DEL is best effort: the sandbox goes whether the agent hears of it or not.
const DEL_TIMEOUT: Duration = Duration::from_secs(2);

/// CNI error codes (spec, "Error codes").
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENV: u32 = 4;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
}

fn failure(code: u32, what: impl Into<String>) -> AgentError {
    AgentError::Cni { code, what: what.into() }
}

/// The network configuration on stdin, as far as this plugin reads it.
#[derive(Debug)]
pub struct NetConf {
    pub cni_version: String,
    pub socket: PathBuf,
    pub timeout: Duration,
    pub prev_result: Option<Value>,
}

impl NetConf {
    pub fn parse(text: &str) -> Result<Self, AgentError> {
        let value: Value = serde_json::from_str(text).map_err(|e| failure(code::DECODE, format!("network configuration on stdin: {e}")))?;
        let Value::Object(conf) = value else { return Err(failure(code::DECODE, "network configuration on stdin: not a JSON object")) };
        let cni_version = match conf.get("cniVersion") {
            Some(Value::String(v)) => v.clone(),
            Some(_) => return Err(failure(code::INVALID_CONFIG, "cniVersion: not a string")),
            None => return Err(failure(code::INVALID_CONFIG, "cniVersion: missing")),
        };
        let socket = match conf.get("socket") {
            None | Some(Value::Null) => PathBuf::from(DEFAULT_SOCKET),
            Some(Value::String(s)) if !s.is_empty() => PathBuf::from(s),
            Some(other) => return Err(failure(code::INVALID_CONFIG, format!("socket: {other} is not a socket path"))),
        };
        let timeout = match conf.get("timeoutSeconds") {
            None | Some(Value::Null) => DEFAULT_TIMEOUT,
            Some(Value::Number(n)) if n.as_f64().is_some_and(|s| s > 0.0 && s <= 3600.0) => Duration::from_secs_f64(n.as_f64().unwrap_or(20.0)),
            Some(other) => return Err(failure(code::INVALID_CONFIG, format!("timeoutSeconds: {other} is not a number of seconds in (0, 3600]"))),
        };
        let prev_result = match conf.get("prevResult") {
            None | Some(Value::Null) => None,
            Some(v @ Value::Object(_)) => Some(v.clone()),
            Some(_) => return Err(failure(code::INVALID_CONFIG, "prevResult: not a JSON object")),
        };
        Ok(Self { cni_version, socket, timeout, prev_result })
    }

    fn check_version(&self) -> Result<(), AgentError> {
        if SUPPORTED_VERSIONS.contains(&self.cni_version.as_str()) {
            return Ok(());
        }
        Err(failure(code::INCOMPATIBLE_VERSION, format!("cniVersion: {} is not supported (supported: {})", self.cni_version, SUPPORTED_VERSIONS.join(", "))))
    }
}

/// What the primary plugin's result says about the pod.
#[derive(Debug, Default, PartialEq)]
pub struct PodNetwork {
    pub ips: Vec<IpAddr>,
    /// Interfaces without `sandbox`: the host side (a veth, or a bridge and a veth).
    pub host_interfaces: Vec<String>,
}

/// Reads `prevResult` in its 0.3/0.4 (`ips[].version`) and 1.0 shapes. An address whose
/// `interface` is a host-side interface is the host's, not the pod's.
pub fn parse_prev_result(result: &Value) -> Result<PodNetwork, AgentError> {
    let bad = |field: String, what: &str| failure(code::INVALID_CONFIG, format!("prevResult.{field}: {what}"));
    let mut in_sandbox = Vec::new();
    let mut network = PodNetwork::default();
    for (i, interface) in array(result, "interfaces")?.iter().enumerate() {
        let name = interface.get("name").and_then(Value::as_str).ok_or_else(|| bad(format!("interfaces[{i}].name"), "missing or not a string"))?;
        let sandbox = match interface.get("sandbox") {
            None | Some(Value::Null) => false,
            Some(Value::String(s)) => !s.is_empty(),
            Some(_) => return Err(bad(format!("interfaces[{i}].sandbox"), "not a string")),
        };
        in_sandbox.push(sandbox);
        if !sandbox {
            network.host_interfaces.push(name.to_owned());
        }
    }
    for (i, ip) in array(result, "ips")?.iter().enumerate() {
        let text = ip.get("address").and_then(Value::as_str).ok_or_else(|| bad(format!("ips[{i}].address"), "missing or not a string"))?;
        let addr: IpAddr = text.split_once('/').map_or(text, |(a, _)| a).parse().map_err(|_| bad(format!("ips[{i}].address"), &format!("{text:?} is not an address/prefix")))?;
        match ip.get("interface") {
            None | Some(Value::Null) => {}
            Some(index) => {
                let index = index.as_u64().ok_or_else(|| bad(format!("ips[{i}].interface"), "not an index"))?;
                let sandbox = usize::try_from(index).ok().and_then(|n| in_sandbox.get(n)).ok_or_else(|| {
                    bad(format!("ips[{i}].interface"), &format!("index {index} is out of range ({} interfaces)", in_sandbox.len()))
                })?;
                if !sandbox {
                    continue;
                }
            }
        }
        if !network.ips.contains(&addr) {
            network.ips.push(addr);
        }
    }
    Ok(network)
}

fn array<'v>(result: &'v Value, field: &str) -> Result<&'v [Value], AgentError> {
    match result.get(field) {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(items)) => Ok(items),
        Some(_) => Err(failure(code::INVALID_CONFIG, format!("prevResult.{field}: not a list"))),
    }
}

/// `CNI_ARGS`: `KEY=VALUE` pairs separated by `;`.
pub fn parse_cni_args(text: &str) -> Result<BTreeMap<String, String>, AgentError> {
    let mut args = BTreeMap::new();
    for pair in text.split(';').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').ok_or_else(|| failure(code::INVALID_ENV, format!("CNI_ARGS: {pair:?} is not KEY=VALUE")))?;
        args.insert(key.to_owned(), value.to_owned());
    }
    Ok(args)
}

/// The invocation's environment (CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS, CNI_ARGS).
pub struct Invocation {
    pub command: String,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub args: BTreeMap<String, String>,
}

impl Invocation {
    pub fn from_env(env: impl Fn(&str) -> Option<String>) -> Result<Self, AgentError> {
        let command = env("CNI_COMMAND").ok_or_else(|| failure(code::INVALID_ENV, "CNI_COMMAND: missing"))?;
        let args = parse_cni_args(&env("CNI_ARGS").unwrap_or_default())?;
        Ok(Self { command, container_id: env("CNI_CONTAINERID").filter(|c| !c.is_empty()), netns: env("CNI_NETNS").filter(|n| !n.is_empty()), args })
    }

    fn container_id(&self) -> Result<String, AgentError> {
        self.container_id.clone().ok_or_else(|| failure(code::INVALID_ENV, "CNI_CONTAINERID: missing"))
    }

    fn pod_arg(&self, key: &str) -> Result<String, AgentError> {
        self.args.get(key).filter(|v| !v.is_empty()).cloned().ok_or_else(|| failure(code::INVALID_ENV, format!("CNI_ARGS: {key} missing (policy-enforcer runs for Kubernetes pods only)")))
    }
}

/// Runs one invocation; `Ok(Some(text))` is printed on stdout.
pub fn run(invocation: &Invocation, stdin: &str) -> Result<Option<String>, AgentError> {
    if invocation.command == "VERSION" {
        return Ok(Some(version_text()));
    }
    let conf = NetConf::parse(stdin)?;
    conf.check_version()?;
    match invocation.command.as_str() {
        "ADD" => add(invocation, &conf).map(Some),
        "DEL" => {
            del(invocation, &conf);
            Ok(None)
        }
        "CHECK" => check(invocation, &conf).map(|()| None),
        other => Err(failure(code::INVALID_ENV, format!("CNI_COMMAND: {other:?} is not ADD, DEL, CHECK or VERSION"))),
    }
}

fn version_text() -> String {
    serde_json::json!({ "cniVersion": "1.0.0", "supportedVersions": SUPPORTED_VERSIONS }).to_string()
}

fn add(invocation: &Invocation, conf: &NetConf) -> Result<String, AgentError> {
    let prev = conf.prev_result.as_ref().ok_or_else(|| failure(code::INVALID_CONFIG, "prevResult: missing (policy-enforcer is chained: list it after the primary plugin in the conflist)"))?;
    let network = parse_prev_result(prev)?;
    let (namespace, name) = (invocation.pod_arg("K8S_POD_NAMESPACE")?, invocation.pod_arg("K8S_POD_NAME")?);
    let pod = format!("{namespace}/{name}");
    if network.ips.is_empty() {
        return Err(failure(code::INVALID_CONFIG, format!("prevResult.ips: no address of pod {pod} in the primary plugin's result")));
    }
    let request = Request::Add(AddRequest {
        namespace,
        name,
        uid: invocation.args.get("K8S_POD_UID").filter(|u| !u.is_empty()).cloned(),
        container_id: invocation.container_id()?,
        netns: invocation.netns.clone(),
        ips: network.ips,
        host_interfaces: network.host_interfaces,
    });
    let answer = exchange(&conf.socket, &request, conf.timeout, &pod)?;
    if !answer.ok {
        let why = answer.error.unwrap_or_else(|| "no reason given".into());
        return Err(failure(code::TRY_AGAIN_LATER, format!("the policy agent cannot enforce pod {pod} yet: {why}")));
    }
    // A chained plugin passes the result on; it must say its version.
    let mut result = prev.clone();
    if let Value::Object(fields) = &mut result {
        fields.entry("cniVersion").or_insert_with(|| Value::String(conf.cni_version.clone()));
    }
    Ok(result.to_string())
}

fn del(invocation: &Invocation, conf: &NetConf) {
    let Some(container_id) = invocation.container_id.clone() else { return };
    let request = Request::Del(DelRequest {
        container_id: container_id.clone(),
        namespace: invocation.args.get("K8S_POD_NAMESPACE").cloned(),
        name: invocation.args.get("K8S_POD_NAME").cloned(),
    });
    if let Err(e) = exchange(&conf.socket, &request, DEL_TIMEOUT.min(conf.timeout), &container_id) {
        // Never fails: a sandbox must always be removable, agent or not.
        eprintln!("policy-enforcer: DEL of {container_id}: {e} (ignored)");
    }
}

fn check(invocation: &Invocation, conf: &NetConf) -> Result<(), AgentError> {
    let (namespace, name) = (invocation.pod_arg("K8S_POD_NAMESPACE")?, invocation.pod_arg("K8S_POD_NAME")?);
    let pod = format!("{namespace}/{name}");
    let request = Request::Check(CheckRequest { namespace, name, container_id: invocation.container_id()? });
    let answer = exchange(&conf.socket, &request, conf.timeout, &pod)?;
    if answer.ok {
        return Ok(());
    }
    Err(failure(code::TRY_AGAIN_LATER, format!("pod {pod} is not enforced: {}", answer.error.unwrap_or_default())))
}

/// Sends one request line and reads one answer line within `timeout`.
fn exchange(socket: &Path, request: &Request, timeout: Duration, subject: &str) -> Result<Answer, AgentError> {
    let unreachable = |e: std::io::Error| {
        failure(code::TRY_AGAIN_LATER, format!("the policy agent is unreachable on {} ({e}); pod {subject} starts once the agent runs", socket.display()))
    };
    let deadline = Instant::now() + timeout;
    let mut stream = UnixStream::connect(socket).map_err(unreachable)?;
    stream.set_write_timeout(Some(timeout)).map_err(unreachable)?;
    let mut line = serde_json::to_string(request).map_err(|e| failure(code::DECODE, format!("encode the request: {e}")))?;
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(unreachable)?;
    let remaining = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    stream.set_read_timeout(Some(remaining)).map_err(unreachable)?;
    let mut answer = String::new();
    match BufReader::new(stream.take(MAX_LINE)).read_line(&mut answer) {
        Ok(0) => return Err(failure(code::TRY_AGAIN_LATER, format!("the policy agent closed the connection without answering for pod {subject}"))),
        Ok(_) => {}
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
            return Err(failure(code::TRY_AGAIN_LATER, format!("no answer from the policy agent within {timeout:?} for pod {subject}")));
        }
        Err(e) => return Err(unreachable(e)),
    }
    serde_json::from_str(&answer).map_err(|e| failure(code::TRY_AGAIN_LATER, format!("bad answer from the policy agent for pod {subject}: {e}")))
}

/// The CNI error object for stdout.
pub fn error_text(cni_version: &str, error: &AgentError) -> String {
    let (code, msg) = match error {
        AgentError::Cni { code, what } => (*code, what.clone()),
        other => (999, other.to_string()),
    };
    serde_json::json!({ "cniVersion": cni_version, "code": code, "msg": msg }).to_string()
}

/// The plugin's entry point: environment and stdin in, result or error on stdout.
pub fn main() -> ExitCode {
    let mut stdin = String::new();
    let read = std::io::stdin().take(16 * MAX_LINE).read_to_string(&mut stdin);
    let outcome = match read {
        Ok(_) => Invocation::from_env(|key| std::env::var(key).ok()).and_then(|invocation| run(&invocation, &stdin)),
        Err(e) => Err(failure(code::DECODE, format!("stdin: {e}"))),
    };
    match outcome {
        Ok(Some(text)) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(error) => {
            let version = NetConf::parse(&stdin).map_or_else(|_| "1.0.0".to_owned(), |c| c.cni_version);
            println!("{}", error_text(&version, &error));
            eprintln!("policy-enforcer: {error}");
            ExitCode::FAILURE
        }
    }
}
