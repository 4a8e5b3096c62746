//! Where cluster state comes from: a Kubernetes API server (reflector stores of Pods,
//! Namespaces, NetworkPolicies, Services and ClusterNetworkPolicies, projected on ingest to
//! what the compiler reads: see
//! [`project`]) or a manifest directory. Both hand out full snapshots;
//! the agent recomputes from a snapshot, never from individual delete events.

pub(crate) mod project;

use std::{
    collections::{BTreeMap, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    networking::v1::NetworkPolicy,
};
use kube::{
    Api, Client,
    runtime::{
        WatchStreamExt as _,
        reflector::{self, ObjectRef},
        watcher,
    },
};
use tokio::sync::Notify;

pub use self::project::{Project, project_cluster_policy, project_namespace, project_pod, project_policy};
use crate::{
    AgentError,
    crd::ClusterNetworkPolicy,
    state::{ClusterState, Object, is_manifest_file, load_manifest_file},
};

/// A consistent view of the cluster and when its newest change was made (for the
/// change-to-enforcement latency).
pub struct Snapshot {
    pub state: ClusterState,
    pub changed_at: SystemTime,
    /// Files or objects that could not be read; their last good version is still in `state`.
    pub errors: Vec<String>,
}

pub enum Source {
    Manifests(ManifestSource),
    Kube(KubeSource),
}

impl Source {
    /// Waits for the next change.
    pub async fn changed(&mut self) {
        match self {
            Source::Manifests(m) => loop {
                if m.rescan() {
                    return;
                }
                m.next_event().await;
            },
            Source::Kube(k) => k.notify.notified().await,
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        match self {
            Source::Manifests(m) => m.snapshot(),
            Source::Kube(k) => k.snapshot(),
        }
    }

    /// A number that changes whenever the objects may have changed: the agent compiles a new
    /// snapshot only when it moves.
    pub fn generation(&self) -> u64 {
        match self {
            Source::Manifests(m) => m.generation,
            Source::Kube(k) => k.generation.load(std::sync::atomic::Ordering::SeqCst),
        }
    }
}

/// How often the manifest directory is checked while it cannot be watched (it is gone, or
/// inotify is out of watches): changes still apply well within a second.
const MANIFEST_POLL: Duration = Duration::from_millis(100);

/// The objects of one manifest file as last read successfully.
struct ManifestFile {
    stamp: FileStamp,
    objects: Vec<Object>,
    error: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct FileStamp {
    modified: SystemTime,
    len: u64,
    inode: u64,
}

/// A directory of YAML/JSON manifests (the format of `explain`), watched with inotify. A file
/// that stops parsing keeps contributing its last good objects, so a typo never drops
/// enforcement; a file that is removed takes its objects with it.
pub struct ManifestSource {
    dir: PathBuf,
    files: BTreeMap<PathBuf, ManifestFile>,
    changed_at: SystemTime,
    dir_error: Option<String>,
    generation: u64,
    /// The inotify watch on the directory, while there is one.
    watch: Option<DirWatch>,
    /// Why the directory cannot be watched (logged once per reason).
    watch_error: Option<String>,
    /// Woken by the watch on every event in the directory.
    wake: Arc<Notify>,
}

/// An inotify watch and the directory it watches (device and inode): a directory replaced
/// under the same path needs a new watch.
struct DirWatch {
    _watcher: notify::RecommendedWatcher,
    id: (u64, u64),
}

impl ManifestSource {
    pub fn new(dir: &Path) -> Result<Self, AgentError> {
        if !dir.is_dir() {
            return Err(AgentError::Usage { flag: "--manifests", what: format!("{} is not a directory", dir.display()) });
        }
        let mut source = Self {
            dir: dir.to_owned(),
            files: BTreeMap::new(),
            changed_at: SystemTime::now(),
            dir_error: None,
            generation: 0,
            watch: None,
            watch_error: None,
            wake: Arc::new(Notify::new()),
        };
        source.rescan();
        Ok(source)
    }

    /// Waits for an event in the directory; polls while it cannot be watched. The caller
    /// rescans after, so an event that changed nothing (our own reads, a temporary file)
    /// costs a listing and no more.
    async fn next_event(&self) {
        if self.watch.is_some() && self.dir_error.is_none() {
            self.wake.notified().await;
        } else {
            tokio::time::sleep(MANIFEST_POLL).await;
        }
    }

    /// Watches the directory now at `dir` unless it is watched already. Called before each
    /// listing, so nothing that happens after the listing goes unnoticed.
    fn ensure_watched(&mut self) {
        use std::os::unix::fs::MetadataExt as _;
        let Ok(meta) = std::fs::metadata(&self.dir) else { return };
        let id = (meta.dev(), meta.ino());
        if self.watch.as_ref().is_some_and(|w| w.id == id) {
            return;
        }
        let replaced = self.watch.take().is_some();
        match watch_dir(&self.dir, self.wake.clone()) {
            Ok(watcher) => {
                if replaced || self.watch_error.take().is_some() {
                    tracing::info!(dir = %self.dir.display(), "watching the manifest directory again");
                }
                self.watch = Some(DirWatch { _watcher: watcher, id });
            }
            Err(e) => {
                let error = Some(e.to_string());
                if self.watch_error != error {
                    tracing::warn!(dir = %self.dir.display(), error = %e, "cannot watch the manifest directory; polling it every 100 ms");
                    self.watch_error = error;
                }
            }
        }
    }

    fn list(&self) -> Result<BTreeMap<PathBuf, FileStamp>, std::io::Error> {
        use std::os::unix::fs::MetadataExt as _;
        let mut found = BTreeMap::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            if !is_manifest_file(&entry.path()) {
                continue;
            }
            // A file removed between listing and stat is simply not there.
            let Ok(meta) = std::fs::metadata(entry.path()) else { continue };
            if meta.is_file() {
                let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                found.insert(entry.path(), FileStamp { modified, len: meta.len(), inode: meta.ino() });
            }
        }
        Ok(found)
    }

    /// Re-reads what changed; returns whether the objects (or the errors) changed.
    pub fn rescan(&mut self) -> bool {
        let changed = self.rescan_files();
        if changed {
            self.generation += 1;
        }
        changed
    }

    fn rescan_files(&mut self) -> bool {
        self.ensure_watched();
        let found = match self.list() {
            Ok(found) => {
                if self.dir_error.take().is_some() {
                    self.generation += 1;
                }
                found
            }
            Err(e) => {
                // Keep everything: an unreadable directory is not an empty one.
                let error = Some(format!("{}: {e}", self.dir.display()));
                let changed = self.dir_error != error;
                self.dir_error = error;
                return changed;
            }
        };
        let mut changed = false;
        let before = self.files.len();
        self.files.retain(|path, _| found.contains_key(path));
        if self.files.len() != before {
            changed = true;
            self.changed_at = SystemTime::now();
        }
        for (path, stamp) in found {
            if self.files.get(&path).is_some_and(|f| f.stamp == stamp) {
                continue;
            }
            match load_manifest_file(&path) {
                Ok(objects) => {
                    self.files.insert(path, ManifestFile { stamp, objects, error: None });
                    changed = true;
                    self.changed_at = stamp.modified.max(self.changed_at);
                }
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "manifest not applied; keeping its last good version");
                    let objects = self.files.remove(&path).map(|f| f.objects).unwrap_or_default();
                    self.files.insert(path, ManifestFile { stamp, objects, error: Some(e.to_string()) });
                    changed = true;
                }
            }
        }
        changed
    }

    pub fn snapshot(&self) -> Snapshot {
        let objects = self.files.values().flat_map(|f| f.objects.iter().cloned());
        let mut errors: Vec<String> = self.files.values().filter_map(|f| f.error.clone()).collect();
        errors.extend(self.dir_error.clone());
        Snapshot { state: ClusterState::from_objects(objects), changed_at: self.changed_at, errors }
    }
}

/// An inotify watch on `dir` (not recursive) that wakes `wake` on every event but reads
/// (our own opening of the directory and its files would wake us for nothing). Editors
/// that write a new file and rename it over the old one produce create and rename events;
/// removal, in-place writes and the directory's own deletion or move are events too.
fn watch_dir(dir: &Path, wake: Arc<Notify>) -> notify::Result<notify::RecommendedWatcher> {
    use notify::{
        EventKind, Watcher as _,
        event::{AccessKind, AccessMode},
    };
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
        Ok(event) if matches!(event.kind, EventKind::Access(kind) if kind != AccessKind::Close(AccessMode::Write)) => {}
        Ok(_) => wake.notify_one(),
        // A queue overflow, say: rescanning is always right.
        Err(e) => {
            tracing::warn!(error = %e, "manifest directory watch error; rescanning");
            wake.notify_one();
        }
    })?;
    watcher.watch(dir, notify::RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

/// Reflector stores of the five kinds (Services only for their addresses), holding projections ([`project`]): the generation
/// moves only when a projection changes, so status-only updates (readiness, conditions),
/// annotation changes and resourceVersion bumps cost a comparison, not a recompile. The
/// stores keep their last state while the API server is away, so enforcement goes on; the
/// watchers re-list when it is back, and a re-list that finds nothing new changes nothing.
pub struct KubeSource {
    pods: reflector::Store<Pod>,
    namespaces: reflector::Store<Namespace>,
    policies: reflector::Store<NetworkPolicy>,
    services: reflector::Store<Service>,
    /// Empty while the ClusterNetworkPolicy CRD is not installed (see [`Optional`]).
    cluster_policies: reflector::Store<ClusterNetworkPolicy>,
    notify: Arc<Notify>,
    changed_at: Arc<Mutex<SystemTime>>,
    generation: Arc<std::sync::atomic::AtomicU64>,
}

impl KubeSource {
    /// Connects to `cluster` and starts the watchers. Returns once every store has its first
    /// full list, or, for ClusterNetworkPolicies, once the API server said it serves none.
    pub async fn start(cluster: &ClusterArgs) -> Result<Self, AgentError> {
        let client = client(cluster).await?;
        let notify = Arc::new(Notify::new());
        let changed_at = Arc::new(Mutex::new(SystemTime::now()));
        let generation = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let changes = Changes { notify: notify.clone(), changed_at: changed_at.clone(), generation: generation.clone() };
        let pods = spawn_reflector(Api::<Pod>::all(client.clone()), &changes, None);
        let namespaces = spawn_reflector(Api::<Namespace>::all(client.clone()), &changes, None);
        let policies = spawn_reflector(Api::<NetworkPolicy>::all(client.clone()), &changes, None);
        let services = spawn_reflector(Api::<Service>::all(client.clone()), &changes, None);
        let not_served = Arc::new(Notify::new());
        let cluster_policies = spawn_reflector(Api::<ClusterNetworkPolicy>::all(client), &changes, Some(Optional { not_served: not_served.clone() }));
        let ready = async {
            pods.wait_until_ready().await?;
            namespaces.wait_until_ready().await?;
            policies.wait_until_ready().await?;
            services.wait_until_ready().await?;
            tokio::select! {
                ready = cluster_policies.wait_until_ready() => ready,
                () = not_served.notified() => Ok(()),
            }
        };
        ready.await.map_err(|e| AgentError::Kube { what: "waiting for the first list".into(), source: Box::new(e) })?;
        Ok(Self { pods, namespaces, policies, services, cluster_policies, notify, changed_at, generation })
    }

    pub fn snapshot(&self) -> Snapshot {
        let objects = self
            .namespaces
            .state()
            .into_iter()
            .map(Object::Namespace)
            .chain(self.pods.state().into_iter().map(Object::Pod))
            .chain(self.policies.state().into_iter().map(Object::NetworkPolicy))
            .chain(self.services.state().into_iter().map(Object::Service))
            .chain(self.cluster_policies.state().into_iter().map(Object::ClusterNetworkPolicy));
        let changed_at = *self.changed_at.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        Snapshot { state: ClusterState::from_objects(objects), changed_at, errors: Vec::new() }
    }
}

/// Which API server to talk to, and as whom: the flags every command that reads a live
/// cluster shares (`run`, `explain`, `coverage`, the kubectl plugin).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ClusterArgs {
    /// Kubeconfig file (default: in-cluster configuration, else $KUBECONFIG or ~/.kube/config).
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// Kubeconfig context to use instead of the current one.
    #[arg(long, value_name = "NAME")]
    pub context: Option<String>,
}

/// A client for `cluster`: the kubeconfig file given, else in-cluster or $KUBECONFIG
/// configuration; `--context` picks a context of whichever kubeconfig is read.
pub async fn client(cluster: &ClusterArgs) -> Result<Client, AgentError> {
    let kube_err = |what: String| move |e: Box<dyn std::error::Error + Send + Sync>| AgentError::Kube { what, source: e };
    let options = kube::config::KubeConfigOptions { context: cluster.context.clone(), ..Default::default() };
    let config = match (&cluster.kubeconfig, &cluster.context) {
        (Some(path), _) => {
            let file = kube::config::Kubeconfig::read_from(path).map_err(|e| kube_err(format!("read {}", path.display()))(Box::new(e)))?;
            kube::Config::from_custom_kubeconfig(file, &options).await.map_err(|e| kube_err(format!("load {}", path.display()))(Box::new(e)))?
        }
        (None, Some(context)) => {
            kube::Config::from_kubeconfig(&options).await.map_err(|e| kube_err(format!("load kubeconfig context {context}"))(Box::new(e)))?
        }
        (None, None) => kube::Config::infer().await.map_err(|e| kube_err("find cluster configuration".into())(Box::new(e)))?,
    };
    Client::try_from(config).map_err(|e| kube_err("create client".into())(Box::new(e)))
}

/// Retries a failed watch after 0.2 s, doubling up to 5 s (kube-runtime's default goes to
/// 30 s): after an API server outage the node should converge within seconds, and one
/// re-list per node every few seconds is still gentle on the server.
#[derive(Debug)]
struct WatchBackoff {
    next: Duration,
}

const WATCH_RETRY_MIN: Duration = Duration::from_millis(200);
const WATCH_RETRY_MAX: Duration = Duration::from_secs(5);

impl Default for WatchBackoff {
    fn default() -> Self {
        Self { next: WATCH_RETRY_MIN }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let delay = self.next;
        self.next = (self.next * 2).min(WATCH_RETRY_MAX);
        Some(delay)
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = WATCH_RETRY_MIN;
    }
}

/// How a watcher tells the agent that something changed.
#[derive(Clone)]
struct Changes {
    notify: Arc<Notify>,
    changed_at: Arc<Mutex<SystemTime>>,
    generation: Arc<std::sync::atomic::AtomicU64>,
}

impl Changes {
    fn record(&self) {
        *self.changed_at.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = SystemTime::now();
        self.generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.notify.notify_one();
    }
}

/// Objects per page of a (re-)list. kube-runtime's default of 500 full Pods makes a transient
/// of tens of MiB that the allocator keeps as RSS; 100 cuts it (2,000 realistic pods: 116 to
/// 90 MiB at rest, debug build) for a few more requests per re-list.
const LIST_PAGE_SIZE: u32 = 100;

/// A kind that a cluster may not serve at all: a CRD that is not installed (yet). Its lists
/// fail with 404 until it is; the watcher keeps retrying with [`WatchBackoff`] (at most 5 s
/// apart), so a CRD installed later is picked up within seconds, without a restart.
struct Optional {
    /// Notified on every 404 of a list, so the first sync need not wait for the kind.
    not_served: Arc<Notify>,
}

/// Whether a watch error says the API server does not serve the kind at all.
fn is_not_served(error: &watcher::Error) -> bool {
    matches!(error, watcher::Error::InitialListFailed(kube::Error::Api(status)) if status.code == 404)
}

/// Watches `api`, projects every object on arrival (the full object is dropped there), and
/// applies the events to a store of projections; only an event that changes the store
/// counts as a change. An `optional` kind's 404s are reported to it, not held against the
/// first sync; the store then stays as it is (empty before the first list): a 404 after
/// the kind was served may be an API server that has not loaded its CRDs yet, and dropping
/// its policies then would open what they deny.
fn spawn_reflector<K>(api: Api<K>, changes: &Changes, optional: Option<Optional>) -> reflector::Store<K>
where
    K: Project + kube::Resource<DynamicType = ()> + Clone + PartialEq + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let (store, mut writer) = reflector::store();
    let reader = store.clone();
    let changes = changes.clone();
    let kind = K::kind(&());
    let stream =
        watcher(api, watcher::Config::default().page_size(LIST_PAGE_SIZE)).backoff(WatchBackoff::default()).modify(|object: &mut K| *object = object.project());
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut filter = ChangeFilter::default();
        // Whether the last list was a 404 (logged once, not every retry).
        let mut not_served = false;
        // The stream's own backoff restarts with every `Init` the watcher emits before each
        // list, so lists that keep failing would be retried every 0.2 s: this one only
        // restarts once a list succeeds.
        let mut not_served_delay = WatchBackoff::default();
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => {
                    if matches!(event, watcher::Event::InitDone) && std::mem::take(&mut not_served) {
                        tracing::info!(kind = %kind, "the API server serves the kind now; watching it");
                        not_served_delay = WatchBackoff::default();
                    }
                    // Judged against the store before the event is applied.
                    let changed = filter.changes(&reader, &event);
                    writer.apply_watcher_event(&event);
                    if changed {
                        changes.record();
                    }
                }
                Err(e) if is_not_served(&e) && optional.is_some() => {
                    if !std::mem::replace(&mut not_served, true) {
                        tracing::warn!(kind = %kind, error = %e, "the API server does not serve the kind (is its CRD installed?); keeping what was listed (none before a first list) and retrying");
                    }
                    if let Some(optional) = &optional {
                        optional.not_served.notify_one();
                    }
                    tokio::time::sleep(not_served_delay.next().unwrap_or(WATCH_RETRY_MAX)).await;
                }
                // The backoff retries; the store keeps the last state meanwhile.
                Err(e) => tracing::warn!(kind = %kind, error = %e, "watch failed; keeping the last state and retrying"),
            }
        }
    });
    store
}

/// Tells which watch events change a store of projections: an applied object that differs
/// from the stored one, the delete of a stored object, and a re-list that ends different
/// from what the store held. A re-list is only swapped into the store at its end
/// (`InitDone`), so its objects are compared with the store as it was before.
struct ChangeFilter<K: kube::Resource<DynamicType = ()>> {
    relist: Option<Relist<K>>,
}

/// What a re-list has shown so far: the objects it listed, and whether any differed.
struct Relist<K: kube::Resource<DynamicType = ()>> {
    listed: HashSet<ObjectRef<K>>,
    differs: bool,
}

impl<K: kube::Resource<DynamicType = ()>> Default for ChangeFilter<K> {
    fn default() -> Self {
        Self { relist: None }
    }
}

impl<K> ChangeFilter<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + PartialEq,
{
    /// Whether applying `event` to `store` (not yet applied) changes its contents.
    fn changes(&mut self, store: &reflector::Store<K>, event: &watcher::Event<K>) -> bool {
        let differs = |object: &K| store.get(&ObjectRef::from_obj(object)).is_none_or(|stored| *stored != *object);
        match event {
            watcher::Event::Apply(object) => differs(object),
            watcher::Event::Delete(object) => store.get(&ObjectRef::from_obj(object)).is_some(),
            watcher::Event::Init => {
                self.relist = Some(Relist { listed: HashSet::new(), differs: false });
                false
            }
            watcher::Event::InitApply(object) => {
                let relist = self.relist.get_or_insert_with(|| Relist { listed: HashSet::new(), differs: false });
                relist.differs |= differs(object);
                relist.listed.insert(ObjectRef::from_obj(object));
                false
            }
            // Every listed object equal to a stored one, and as many: nothing was removed.
            watcher::Event::InitDone => self.relist.take().is_none_or(|r| r.differs || r.listed.len() != store.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn namespace(name: &str) -> String {
        format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n")
    }

    fn names(m: &ManifestSource) -> Vec<String> {
        m.snapshot().state.namespaces.into_keys().collect()
    }

    /// Writes as editors do: a temporary file renamed over the old one.
    fn replace(dir: &Path, name: &str, text: &str) {
        let tmp = dir.join(format!(".{name}.swp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    }

    /// Waits for the watch to report a change, as `Source::changed` does; panics after 5 s
    /// (a poll would find it too, but only the watch wakes `next_event` when watched).
    async fn changed(m: &mut ManifestSource) {
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if m.rescan() {
                    return;
                }
                m.next_event().await;
            }
        })
        .await
        .expect("no change seen within 5 s");
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("watch-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn namespace_object(name: &str, labels: &[(&str, &str)], resource_version: &str) -> Namespace {
        let mut ns = Namespace::default();
        ns.metadata.name = Some(name.to_owned());
        ns.metadata.resource_version = Some(resource_version.to_owned());
        ns.metadata.labels = Some(labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect());
        project_namespace(&ns)
    }

    /// Feeds events to a filter and a store as the reflector task does; returns which changed.
    fn feed(
        filter: &mut ChangeFilter<Namespace>,
        store: &reflector::Store<Namespace>,
        writer: &mut reflector::store::Writer<Namespace>,
        events: Vec<watcher::Event<Namespace>>,
    ) -> Vec<bool> {
        events
            .into_iter()
            .map(|event| {
                let changed = filter.changes(store, &event);
                writer.apply_watcher_event(&event);
                changed
            })
            .collect()
    }

    #[test]
    fn only_events_that_change_the_projections_count() {
        use watcher::Event::{Apply, Delete, Init, InitApply, InitDone};
        let (store, mut writer) = reflector::store();
        let mut filter = ChangeFilter::default();
        let (a, b) = (namespace_object("a", &[("team", "x")], "1"), namespace_object("b", &[], "1"));
        let first = feed(&mut filter, &store, &mut writer, vec![Init, InitApply(a.clone()), InitApply(b.clone()), InitDone]);
        assert_eq!(first, [false, false, false, true], "the first list");
        let same = namespace_object("a", &[("team", "x")], "2");
        let relabelled = namespace_object("a", &[("team", "y")], "3");
        let c = namespace_object("c", &[], "1");
        let events = vec![Apply(same.clone()), Apply(relabelled.clone()), Apply(c.clone()), Delete(c.clone()), Delete(c.clone())];
        assert_eq!(feed(&mut filter, &store, &mut writer, events), [false, true, true, true, false], "apply same, relabel, add, delete, delete again");
        // Re-lists: the same objects; one gone; one changed; one more.
        let relist = |objects: Vec<Namespace>| [vec![Init], objects.into_iter().map(InitApply).collect(), vec![InitDone]].concat();
        let done = |f: &mut ChangeFilter<Namespace>, w: &mut _, objects| feed(f, &store, w, relist(objects)).pop();
        assert_eq!(done(&mut filter, &mut writer, vec![b.clone(), relabelled.clone()]), Some(false), "a re-list with nothing new");
        assert_eq!(done(&mut filter, &mut writer, vec![relabelled.clone()]), Some(true), "b is gone");
        assert_eq!(store.len(), 1);
        assert_eq!(done(&mut filter, &mut writer, vec![a.clone()]), Some(true), "a changed back");
        assert_eq!(done(&mut filter, &mut writer, vec![a.clone(), b]), Some(true), "b is back");
        assert_eq!(done(&mut filter, &mut writer, vec![]), Some(true), "everything gone");
        assert_eq!(done(&mut filter, &mut writer, vec![]), Some(false), "still nothing");
    }

    #[test]
    fn only_a_404_list_means_the_kind_is_not_served() {
        let api_error = |code: u16| kube::Error::Api(kube::core::Status::failure("the server could not find the requested resource", "NotFound").with_code(code).boxed());
        assert!(is_not_served(&watcher::Error::InitialListFailed(api_error(404))));
        for error in [
            watcher::Error::InitialListFailed(api_error(403)),
            watcher::Error::InitialListFailed(api_error(503)),
            // A watch that stops finding the kind keeps the last list (see `spawn_reflector`).
            watcher::Error::WatchFailed(api_error(404)),
            watcher::Error::WatchStartFailed(api_error(404)),
        ] {
            assert!(!is_not_served(&error), "{error}");
        }
    }

    #[tokio::test]
    async fn created_renamed_and_removed_files_wake_the_source() {
        let dir = scratch("events");
        let mut m = ManifestSource::new(&dir).unwrap();
        assert!(m.watch.is_some(), "watched: {:?}", m.watch_error);
        replace(&dir, "a.yaml", &namespace("a"));
        changed(&mut m).await;
        assert_eq!(names(&m), ["a"]);
        replace(&dir, "a.yaml", &namespace("b"));
        changed(&mut m).await;
        assert_eq!(names(&m), ["b"], "renamed over the old file");
        std::fs::write(dir.join("c.yaml"), namespace("c")).unwrap();
        changed(&mut m).await;
        assert_eq!(names(&m), ["b", "c"], "written in place");
        std::fs::remove_file(dir.join("a.yaml")).unwrap();
        changed(&mut m).await;
        assert_eq!(names(&m), ["c"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_directory_that_disappears_keeps_everything_and_is_watched_when_back() {
        let dir = scratch("gone");
        let away = dir.with_extension("away");
        let _ = std::fs::remove_dir_all(&away);
        std::fs::write(dir.join("a.yaml"), namespace("a")).unwrap();
        let mut m = ManifestSource::new(&dir).unwrap();
        std::fs::rename(&dir, &away).unwrap();
        changed(&mut m).await;
        assert_eq!(names(&m), ["a"], "an unreadable directory is not an empty one");
        assert!(m.snapshot().errors.iter().any(|e| e.contains("watch-test-gone")), "{:?}", m.snapshot().errors);
        // Back, with other contents: polled meanwhile, then watched again.
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("b.yaml"), namespace("b")).unwrap();
        changed(&mut m).await;
        assert_eq!(names(&m), ["b"]);
        replace(&dir, "b.yaml", &namespace("c"));
        changed(&mut m).await;
        assert_eq!(names(&m), ["c"], "the new directory is watched");
        assert!(m.watch.is_some() && m.dir_error.is_none());
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_dir_all(&away).unwrap();
    }

    #[tokio::test]
    async fn reading_the_directory_does_not_wake_the_source() {
        let dir = scratch("quiet");
        std::fs::write(dir.join("a.yaml"), namespace("a")).unwrap();
        let mut m = ManifestSource::new(&dir).unwrap();
        // Our own listing and reads (open events) must not make a busy loop.
        let _ = std::fs::read_to_string(dir.join("a.yaml")).unwrap();
        assert!(!m.rescan());
        let woken = tokio::time::timeout(Duration::from_millis(300), m.next_event()).await;
        assert!(woken.is_err(), "woken by reads alone");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
