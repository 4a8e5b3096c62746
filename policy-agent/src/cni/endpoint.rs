//! The agent's side of the CNI plugin: a unix socket server whose connections hand requests
//! to the agent loop (mpsc, each with a oneshot for the answer), and what the loop keeps
//! for them: the addresses CNI reported per pod, used until the pod's status carries them,
//! and the ADDs waiting for a pass to enforce their pod. Nothing here blocks the loop.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::core::v1::{Pod, PodIP};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
    task::JoinHandle,
    time::Instant,
};

use super::{AddRequest, Answer, CheckRequest, DelRequest, MAX_LINE, Request};
use crate::{
    AgentError,
    metrics::{self, AgentView, SharedView},
    state::{ClusterState, PodRef},
    watch::Snapshot,
};

/// A request from the socket, with where its answer goes.
pub struct Incoming {
    pub request: Request,
    pub reply: oneshot::Sender<Answer>,
}

/// What wakes the loop for the CNI endpoint.
pub enum Event {
    Request(Incoming),
    /// A pending ADD's deadline passed.
    Deadline,
}

/// The addresses an ADD reported for a pod, and the sandbox that reported them.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub(super) struct Override {
    pub(super) uid: Option<String>,
    pub(super) container_id: String,
    pub(super) ips: Vec<IpAddr>,
}

/// An ADD waiting for a pass that enforces its pod.
struct Pending {
    pod: PodRef,
    container_id: String,
    ips: Vec<IpAddr>,
    host_interfaces: Vec<String>,
    deadline: Instant,
    reply: oneshot::Sender<Answer>,
    /// Why the last pass did not enforce the pod, for the answer at the deadline.
    last_error: Option<String>,
}

pub struct CniEndpoint {
    requests: Option<mpsc::Receiver<Incoming>>,
    overrides: BTreeMap<PodRef, Override>,
    pending: Vec<Pending>,
    timeout: Duration,
    /// The socket this agent bound, and its inode (removed on exit if still ours).
    socket: Option<(PathBuf, u64)>,
    /// Where the overrides are kept for the next agent: a restart between ADD and the
    /// pod's status update must not detach the pod.
    saved: Option<PathBuf>,
}

/// The overrides' file, beside the socket.
const SAVED_FILE: &str = "cni-pods.json";

/// One override in that file.
#[derive(serde::Serialize, serde::Deserialize)]
struct SavedOverride {
    namespace: String,
    name: String,
    #[serde(flatten)]
    cni: Override,
}

/// The agent's servers, each named by its address: the end of one stops the agent.
type Servers = Vec<(String, JoinHandle<()>)>;

/// Requests queued between the socket's connections and the loop.
const QUEUE: usize = 256;
/// A connection must send its request line within this.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

impl CniEndpoint {
    /// No socket: no requests ever arrive.
    pub fn disabled() -> Self {
        Self { requests: None, overrides: BTreeMap::new(), pending: Vec::new(), timeout: Duration::ZERO, socket: None, saved: None }
    }

    /// Binds `socket` (unless it is empty or `disabled`) and serves it; its task joins
    /// `servers`, whose end stops the agent.
    pub fn start(
        socket: &str,
        disabled: bool,
        timeout: Duration,
        mut servers: Servers,
    ) -> Result<(Self, Servers), AgentError> {
        if socket.is_empty() || disabled {
            tracing::info!("CNI socket disabled: pods are enforced once the watch sees their IPs");
            return Ok((Self::disabled(), servers));
        }
        let path = PathBuf::from(socket);
        let listener = bind(&path)?;
        let inode = std::fs::metadata(&path).map(|m| m.ino()).unwrap_or_default();
        let (sender, requests) = mpsc::channel(QUEUE);
        tracing::info!(socket = %path.display(), "serving the CNI plugin");
        servers.push((path.display().to_string(), tokio::spawn(serve(listener, sender))));
        let saved = path.with_file_name(SAVED_FILE);
        let overrides = load(&saved);
        let endpoint = Self { requests: Some(requests), overrides, pending: Vec::new(), timeout, socket: Some((path, inode)), saved: Some(saved) };
        Ok((endpoint, servers))
    }

    /// The next request, or the next pending deadline; never, if the socket is disabled.
    pub async fn next(&mut self) -> Event {
        let deadline = self.pending.iter().map(|p| p.deadline).min();
        let Some(requests) = self.requests.as_mut() else { return std::future::pending().await };
        let expiry = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            Some(incoming) = requests.recv() => Event::Request(incoming),
            () = expiry => Event::Deadline,
        }
    }

    /// Handles an event at once, and every request queued behind it (pods started together
    /// share one pass); true if the recorded addresses changed, so the snapshot must be
    /// compiled again and a pass run.
    pub fn handle(&mut self, event: Event, view: &SharedView) -> bool {
        let Event::Request(first) = event else { return self.expire(Instant::now()) };
        let mut changed = self.request(first, view);
        while let Some(incoming) = self.requests.as_mut().and_then(|r| r.try_recv().ok()) {
            changed |= self.request(incoming, view);
        }
        changed
    }

    fn request(&mut self, incoming: Incoming, view: &SharedView) -> bool {
        match incoming.request {
            Request::Add(add) => self.add(add, incoming.reply),
            Request::Del(del) => self.del(&del, incoming.reply),
            Request::Check(check) => {
                let _ = incoming.reply.send(check_answer(&metrics::read(view), &check));
                false
            }
        }
    }

    fn add(&mut self, add: AddRequest, reply: oneshot::Sender<Answer>) -> bool {
        let pod = PodRef::new(add.namespace, add.name);
        tracing::info!(pod = %pod, container = %add.container_id, ips = ?add.ips, interfaces = ?add.host_interfaces, "CNI ADD");
        if add.ips.is_empty() {
            let _ = reply.send(Answer::error(format!("no address for pod {pod} in the request")));
            return false;
        }
        // A retried sandbox replaces the earlier attempt.
        for earlier in extract(&mut self.pending, |p| p.pod == pod) {
            let _ = earlier.reply.send(Answer::error(format!("superseded by the ADD of container {}", add.container_id)));
        }
        self.overrides.insert(pod.clone(), Override { uid: add.uid, container_id: add.container_id.clone(), ips: add.ips.clone() });
        self.save();
        let deadline = Instant::now() + self.timeout;
        self.pending.push(Pending { pod, container_id: add.container_id, ips: add.ips, host_interfaces: add.host_interfaces, deadline, reply, last_error: None });
        true
    }

    fn del(&mut self, del: &DelRequest, reply: oneshot::Sender<Answer>) -> bool {
        tracing::info!(container = %del.container_id, pod = ?del.namespace.as_ref().zip(del.name.as_ref()), "CNI DEL");
        for gone in extract(&mut self.pending, |p| p.container_id == del.container_id) {
            let _ = gone.reply.send(Answer::error(format!("the sandbox {} was deleted", del.container_id)));
        }
        let before = self.overrides.len();
        self.overrides.retain(|_, o| o.container_id != del.container_id);
        let _ = reply.send(Answer::ok());
        let changed = self.overrides.len() != before;
        if changed {
            self.save();
        }
        changed
    }

    /// Answers the ADDs whose deadline passed and forgets their addresses.
    fn expire(&mut self, now: Instant) -> bool {
        let mut changed = false;
        for late in extract(&mut self.pending, |p| p.deadline <= now) {
            let why = late.last_error.clone().unwrap_or_else(|| format!("the agent has not seen pod {} in the cluster yet (its watch lags the runtime)", late.pod));
            tracing::warn!(pod = %late.pod, container = %late.container_id, error = %why, "CNI ADD timed out");
            let _ = late.reply.send(Answer::error(format!("not enforced within {:?}: {why}", self.timeout)));
            if self.overrides.get(&late.pod).is_some_and(|o| o.container_id == late.container_id) {
                self.overrides.remove(&late.pod);
                changed = true;
            }
        }
        if changed {
            self.save();
        }
        changed
    }

    /// Gives pods the addresses CNI reported while their status has none (cloning only
    /// those pods), and forgets the addresses of pods that are gone.
    pub fn apply(&mut self, mut snapshot: Snapshot) -> Snapshot {
        let waiting: BTreeSet<&PodRef> = self.pending.iter().map(|p| &p.pod).collect();
        let before = self.overrides.len();
        self.overrides.retain(|pod, _| snapshot.state.pods.contains_key(pod) || waiting.contains(pod));
        if self.overrides.len() != before {
            self.save();
        }
        apply_overrides(&mut snapshot.state, &self.overrides);
        snapshot
    }

    /// Writes the overrides for the next agent; a failure costs only that restart's safety.
    fn save(&self) {
        let Some(path) = &self.saved else { return };
        let saved: Vec<SavedOverride> =
            self.overrides.iter().map(|(pod, cni)| SavedOverride { namespace: pod.namespace.clone(), name: pod.name.clone(), cni: cni.clone() }).collect();
        let written = serde_json::to_vec(&saved)
            .map_err(|e| AgentError::CniInstall { path: path.clone(), what: format!("encode: {e}") })
            .and_then(|bytes| super::install::write_atomic(path, &bytes, 0o600));
        if let Err(error) = written {
            tracing::warn!(%error, "cannot save the CNI-reported pod addresses");
        }
    }

    /// After a pass: answers each pending ADD whose pod the pass enforced, or failed.
    pub fn after_pass(&mut self, view: &SharedView, attached: &BTreeMap<String, u32>) {
        if self.pending.is_empty() {
            return;
        }
        let view = metrics::read(view);
        for mut pending in std::mem::take(&mut self.pending) {
            match verdict(&view, &pending, attached) {
                Verdict::Enforced(interface) => {
                    if !pending.host_interfaces.is_empty() && !pending.host_interfaces.contains(&interface) {
                        // The route decides where the pod's packets pass, so that is where it is enforced.
                        tracing::warn!(pod = %pending.pod, interface = %interface, reported = ?pending.host_interfaces, "pod enforced on its routed interface, which CNI did not report");
                    }
                    tracing::info!(pod = %pending.pod, container = %pending.container_id, interface = %interface, "CNI ADD answered: enforced");
                    let _ = pending.reply.send(Answer::ok());
                }
                Verdict::Failed(error) => {
                    tracing::warn!(pod = %pending.pod, container = %pending.container_id, error = %error, "CNI ADD answered: not enforced");
                    let _ = pending.reply.send(Answer::error(format!("pod {}: {error}", pending.pod)));
                }
                Verdict::Waiting(error) => {
                    pending.last_error = error.or(pending.last_error);
                    self.pending.push(pending);
                }
            }
        }
    }
}

impl Drop for CniEndpoint {
    fn drop(&mut self) {
        // Only our own socket: another agent may have bound the path since.
        if let Some((path, inode)) = &self.socket
            && std::fs::metadata(path).is_ok_and(|m| m.ino() == *inode)
        {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The overrides an earlier agent saved; none if there is no file or it is unreadable
/// (then pods wait for their status, as without CNI).
fn load(path: &Path) -> BTreeMap<PodRef, Override> {
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return BTreeMap::new(),
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "cannot read the saved CNI pod addresses");
            return BTreeMap::new();
        }
    };
    match serde_json::from_slice::<Vec<SavedOverride>>(&text) {
        Ok(saved) => {
            tracing::info!(path = %path.display(), pods = saved.len(), "CNI-reported pod addresses of the previous agent");
            saved.into_iter().map(|s| (PodRef::new(s.namespace, s.name), s.cni)).collect()
        }
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "saved CNI pod addresses unreadable; ignored");
            BTreeMap::new()
        }
    }
}

/// Takes the items matching `which` out of `items`.
fn extract<T>(items: &mut Vec<T>, which: impl Fn(&T) -> bool) -> Vec<T> {
    let (taken, kept) = std::mem::take(items).into_iter().partition(|i| which(i));
    *items = kept;
    taken
}

/// Writes each override into its pod, if the pod is the one CNI reported (same uid, when
/// both are known) and its status has no address yet.
pub(super) fn apply_overrides(state: &mut ClusterState, overrides: &BTreeMap<PodRef, Override>) {
    for (pod_ref, cni) in overrides {
        let Some(pod) = state.pods.get_mut(pod_ref) else { continue };
        if !wants_override(pod, cni) {
            continue;
        }
        let status = Arc::make_mut(pod).status.get_or_insert_with(Default::default);
        status.pod_ips = Some(cni.ips.iter().map(|ip| PodIP { ip: ip.to_string() }).collect());
        status.pod_ip = cni.ips.first().map(ToString::to_string);
    }
}

fn wants_override(pod: &Pod, cni: &Override) -> bool {
    let same_pod = match (&pod.metadata.uid, &cni.uid) {
        (Some(known), Some(reported)) => known == reported,
        _ => true,
    };
    let status = pod.status.as_ref();
    let has_ips = status.is_some_and(|s| s.pod_ips.as_ref().is_some_and(|ips| !ips.is_empty()) || s.pod_ip.as_ref().is_some_and(|ip| !ip.is_empty()));
    same_pod && !has_ips
}

enum Verdict {
    /// Placed, written and attached, on this interface.
    Enforced(String),
    /// Placed, but its write or attach failed.
    Failed(String),
    /// Not placed yet (unknown pod, no route...), with why if known.
    Waiting(Option<String>),
}

fn verdict(view: &AgentView, pending: &Pending, attached: &BTreeMap<String, u32>) -> Verdict {
    let name = pending.pod.to_string();
    let Some(endpoint) = view.endpoints.iter().find(|e| e.pod == name) else { return Verdict::Waiting(None) };
    let addresses: Vec<IpAddr> = [&endpoint.ipv4, &endpoint.ipv6].into_iter().flatten().filter_map(|a| a.parse().ok()).collect();
    if !addresses.iter().any(|a| pending.ips.contains(a)) {
        return Verdict::Waiting(Some(format!("the agent knows pod {name} at {addresses:?}, not at {:?} as CNI reported", pending.ips)));
    }
    match (&endpoint.interface, endpoint.ifindex, &endpoint.error) {
        (Some(interface), Some(ifindex), None) if endpoint.endpoint_id.is_some() && attached.get(interface) == Some(&ifindex) => {
            Verdict::Enforced(interface.clone())
        }
        (Some(_), Some(_), Some(error)) => Verdict::Failed(error.clone()),
        (_, _, error) => Verdict::Waiting(error.clone()),
    }
}

/// CHECK: whether the pod is placed, written and attached now.
fn check_answer(view: &AgentView, check: &CheckRequest) -> Answer {
    let name = format!("{}/{}", check.namespace, check.name);
    match view.endpoints.iter().find(|e| e.pod == name) {
        Some(e) if e.attached && e.error.is_none() => Answer::ok(),
        Some(e) => Answer::error(e.error.clone().unwrap_or_else(|| "not attached yet".into())),
        None => Answer::error(format!("the agent has no endpoint for pod {name}")),
    }
}

/// Creates the socket's directory (0700), replaces a stale socket, binds (0600).
fn bind(path: &Path) -> Result<UnixListener, AgentError> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).ok_or_else(|| AgentError::Usage { flag: "--cni-socket", what: format!("{} has no directory", path.display()) })?;
    let write_err = |path: &Path| {
        let path = path.to_owned();
        move |source| AgentError::Write { path, source }
    };
    std::fs::create_dir_all(dir).map_err(write_err(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(write_err(dir))?;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path).map_err(write_err(path))?,
        Ok(_) => return Err(AgentError::Usage { flag: "--cni-socket", what: format!("{} exists and is not a socket", path.display()) }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(AgentError::Read { path: path.to_owned(), source }),
    }
    let listener = UnixListener::bind(path).map_err(|source| AgentError::Serve { addr: path.display().to_string(), source })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(write_err(path))?;
    Ok(listener)
}

async fn serve(listener: UnixListener, requests: mpsc::Sender<Incoming>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(connection(stream, requests.clone()));
            }
            Err(error) => {
                tracing::warn!(%error, "CNI socket accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One connection: one request line in, one answer line out.
async fn connection(stream: UnixStream, requests: mpsc::Sender<Incoming>) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let answer = match tokio::time::timeout(READ_TIMEOUT, BufReader::new(read.take(MAX_LINE)).read_line(&mut line)).await {
        Ok(Ok(n)) if n > 0 => match serde_json::from_str::<Request>(&line) {
            Ok(request) => dispatch(request, &requests).await,
            Err(e) => Answer::error(format!("bad request: {e}")),
        },
        Ok(Ok(_)) => return,
        Ok(Err(error)) => {
            tracing::debug!(%error, "CNI socket read");
            return;
        }
        Err(_) => Answer::error(format!("no request line within {READ_TIMEOUT:?}")),
    };
    let Ok(mut text) = serde_json::to_string(&answer) else { return };
    text.push('\n');
    let _ = write.write_all(text.as_bytes()).await;
}

async fn dispatch(request: Request, requests: &mpsc::Sender<Incoming>) -> Answer {
    let (reply, answer) = oneshot::channel();
    if requests.send(Incoming { request, reply }).await.is_err() {
        return Answer::error("the agent is stopping");
    }
    answer.await.unwrap_or_else(|_| Answer::error("the agent dropped the request"))
}
