//! A simulated node for the privileged tests, the demo and the benchmarks: a per-run name
//! prefix, network namespaces and a bpffs mount that remove themselves (drop guards, also on
//! panic), commands run inside a namespace, and bounded probes. Addresses come from
//! 198.18.0.0/15 and 2001:2::/48 only. Needs root; nothing here runs in the agent itself.

pub mod matrix;
pub mod apiserver;
pub mod packet;
pub mod probe;
pub mod bench;
pub mod synthetic;
pub mod cluster;
pub mod services;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::OnceLock,
};

/// A short prefix unique to this test process: `pt` + its pid in base 36. Leftovers of a
/// killed run carry a dead pid and are swept by the next run.
pub fn run_prefix() -> &'static str {
    static PREFIX: OnceLock<String> = OnceLock::new();
    PREFIX.get_or_init(|| {
        sweep_leftovers();
        format!("pt{}", base36(std::process::id()))
    })
}

fn base36(mut n: u32) -> String {
    let digits = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(digits[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("ascii")
}

fn pid_of_prefix(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("pt")?;
    let id = rest.split('-').next()?;
    u32::from_str_radix(id, 36).ok()
}

/// Removes namespaces and bpffs mounts left by runs whose process is gone.
fn sweep_leftovers() {
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            if let Some(pid) = pid_of_prefix(name)
                && !Path::new(&format!("/proc/{pid}")).exists()
            {
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(TEST_RUN_DIR) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(pid) = pid_of_prefix(&name)
                && !Path::new(&format!("/proc/{pid}")).exists()
            {
                remove_run_dir(&entry.path());
            }
        }
    }
}

const TEST_RUN_DIR: &str = "/run/policy-tests";

fn remove_run_dir(dir: &Path) {
    let bpffs = dir.join("bpffs");
    let _ = Command::new("umount").arg("-l").arg(&bpffs).stderr(std::process::Stdio::null()).status();
    let _ = std::fs::remove_dir_all(dir);
}

/// Runs a command and returns its output; panics with the command line and stderr if it
/// fails (tests panic to keep the backtrace).
pub fn sh(args: &[&str]) -> Output {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("spawn {args:?}: {e}"));
    assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// A network namespace named `<prefix>-<suffix>`, deleted on drop (with its interfaces).
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(suffix: &str) -> Self {
        let name = format!("{}-{suffix}", run_prefix());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        sh(&["ip", "netns", "add", &name]);
        let ns = Self { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> Output {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// Runs `f` on a thread that has entered this namespace (sockets it opens stay there).
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            enter_netns(&path);
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    /// Spawns `f` on a thread inside this namespace and returns its handle.
    pub fn spawn<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            enter_netns(&path);
            f()
        })
    }

    pub fn ifindex(&self, ifname: &str) -> u32 {
        let name = ifname.to_owned();
        self.run(move || {
            let c = std::ffi::CString::new(name.clone()).expect("ifname");
            // SAFETY: a valid NUL-terminated string.
            let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
            assert_ne!(index, 0, "no interface {name}");
            index
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

pub fn enter_netns(path: &str) {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    // SAFETY: a valid namespace fd; setns only affects the calling thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

/// A private bpffs mounted under /run/policy-tests/<prefix>[-suffix]/bpffs, unmounted on
/// drop (which releases every map and link pinned in it).
pub struct Bpffs {
    dir: PathBuf,
    pub path: PathBuf,
}

impl Bpffs {
    pub fn new(suffix: &str) -> Self {
        let dir = PathBuf::from(TEST_RUN_DIR).join(format!("{}-{suffix}", run_prefix()));
        remove_run_dir(&dir);
        let path = dir.join("bpffs");
        std::fs::create_dir_all(&path).expect("create bpffs dir");
        sh(&["mount", "-t", "bpf", "bpf", path.to_str().expect("utf-8 path")]);
        Self { dir, path }
    }

    /// A scratch directory beside the mount (manifests, logs).
    pub fn scratch(&self, name: &str) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::create_dir_all(&p).expect("create scratch dir");
        p
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        remove_run_dir(&self.dir);
    }
}

/// A simulated node: a node namespace and pods, each pod a namespace joined to the node by a
/// veth pair, with /32 and /128 routes on the node side (the layout of routed CNIs).
pub struct Node {
    pub ns: Netns,
    pub pods: Vec<PodNet>,
}

pub struct PodNet {
    pub ns: Netns,
    /// Host-side interface, in the node namespace.
    pub host_if: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    /// Position on the node (gives the pod side a distinct MAC).
    index: usize,
}

/// The node's own addresses, on every host-side veth (pods use them as gateway).
pub const NODE_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const NODE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);

impl Node {
    pub fn new(suffix: &str) -> Self {
        let ns = Netns::new(suffix);
        ns.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        // `default` too: veths created later take their settings from it.
        ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
        ns.exec(&["sysctl", "-qw", "net.ipv6.conf.default.forwarding=1"]);
        Self { ns, pods: Vec::new() }
    }

    /// Adds a pod `short` (a few characters) with the given addresses.
    pub fn add_pod(&mut self, short: &str, ipv4: Ipv4Addr, ipv6: Ipv6Addr) -> &PodNet {
        let ns = Netns::new(&format!("{}-{short}", self.ns.name.rsplit('-').next().unwrap_or("n")));
        let host_if = format!("{}{short}", run_prefix());
        assert!(host_if.len() <= 15, "interface name {host_if} too long");
        let pod = PodNet { ns, host_if, ipv4, ipv6, index: self.pods.len() + 1 };
        self.wire(&pod);
        self.pods.push(pod);
        self.pods.last().expect("just pushed")
    }

    /// Deletes a pod's veth pair and creates it again with the same names and addresses (a
    /// new ifindex), as a CNI does when a pod sandbox is re-created.
    pub fn recreate_link(&self, short: &str) {
        let pod = self.pod(short);
        self.ns.exec(&["ip", "link", "del", &pod.host_if]);
        self.wire(pod);
    }

    /// Creates the veth pair of `pod`, with addresses, routes and neighbour entries.
    fn wire(&self, pod: &PodNet) {
        let PodNet { ns, host_if, ipv4, ipv6, index } = pod;
        let peer_if = format!("{host_if}p");
        // Fixed MACs and permanent neighbour entries: without link-local addresses (every
        // address comes from the test ranges) the kernel cannot send neighbour solicitations.
        let host_mac = "02:aa:00:00:00:01";
        let pod_mac = format!("02:bb:00:00:{:02x}:{:02x}", index / 256, index % 256);
        let node = &self.ns;
        node.exec(&["ip", "link", "add", host_if, "address", host_mac, "type", "veth", "peer", "name", &peer_if, "address", &pod_mac]);
        node.exec(&["ip", "link", "set", &peer_if, "netns", &ns.name]);
        node.exec(&["sysctl", "-qw", &format!("net.ipv6.conf.{host_if}.addr_gen_mode=1")]);
        node.exec(&["ip", "addr", "add", &format!("{NODE_V4}/32"), "dev", host_if]);
        node.exec(&["ip", "-6", "addr", "add", &format!("{NODE_V6}/128"), "dev", host_if, "nodad"]);
        node.exec(&["ip", "link", "set", host_if, "up"]);
        node.exec(&["ip", "route", "add", &format!("{ipv4}/32"), "dev", host_if]);
        node.exec(&["ip", "-6", "route", "add", &format!("{ipv6}/128"), "dev", host_if]);
        for addr in [ipv4.to_string(), ipv6.to_string()] {
            node.exec(&["ip", "neigh", "replace", &addr, "lladdr", &pod_mac, "dev", host_if, "nud", "permanent"]);
        }
        ns.exec(&["ip", "link", "set", &peer_if, "name", "eth0"]);
        ns.exec(&["sysctl", "-qw", "net.ipv6.conf.eth0.addr_gen_mode=1"]);
        ns.exec(&["ip", "addr", "add", &format!("{ipv4}/32"), "dev", "eth0"]);
        ns.exec(&["ip", "-6", "addr", "add", &format!("{ipv6}/128"), "dev", "eth0", "nodad"]);
        ns.exec(&["ip", "link", "set", "eth0", "up"]);
        ns.exec(&["ip", "route", "add", &format!("{NODE_V4}/32"), "dev", "eth0"]);
        ns.exec(&["ip", "route", "add", "default", "via", &NODE_V4.to_string()]);
        ns.exec(&["ip", "-6", "route", "add", &format!("{NODE_V6}/128"), "dev", "eth0"]);
        ns.exec(&["ip", "-6", "route", "add", "default", "via", &NODE_V6.to_string()]);
        for addr in [NODE_V4.to_string(), NODE_V6.to_string()] {
            ns.exec(&["ip", "neigh", "replace", &addr, "lladdr", host_mac, "dev", "eth0", "nud", "permanent"]);
        }
    }

    pub fn pod(&self, short: &str) -> &PodNet {
        let host_if = format!("{}{short}", run_prefix());
        self.pods.iter().find(|p| p.host_if == host_if).unwrap_or_else(|| panic!("no pod {short}"))
    }
}

impl PodNet {
    pub fn addr(&self, v6: bool) -> IpAddr {
        if v6 { IpAddr::V6(self.ipv6) } else { IpAddr::V4(self.ipv4) }
    }
}


/// The agent binary running inside a node namespace, as scripts start it
/// (`ip netns exec NODE policy-agent run ...`). Killed (SIGKILL) on drop.
pub struct AgentRun {
    child: Option<std::process::Child>,
    node_ns: String,
    pub metrics_addr: String,
    pub log: PathBuf,
}

impl AgentRun {
    /// Starts `agent run ARGS... --metrics-addr ADDR` in `node`, logging to `log`, and waits
    /// until it reports ready.
    pub fn start(agent: &Path, node: &Netns, args: &[&std::ffi::OsStr], metrics_addr: &str, log: &Path) -> Self {
        let log_file = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("agent log file");
        let child = Command::new("ip")
            .args(["netns", "exec", &node.name])
            .arg(agent)
            .arg("run")
            .args(args)
            .args(["--metrics-addr", metrics_addr])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("start agent");
        let run = Self { child: Some(child), node_ns: node.name.clone(), metrics_addr: metrics_addr.to_owned(), log: log.to_owned() };
        run.wait_ready(std::time::Duration::from_secs(30));
        run
    }

    /// Waits for `/readyz`; panics with the agent's log after `timeout`.
    pub fn wait_ready(&self, timeout: std::time::Duration) {
        let start = std::time::Instant::now();
        while start.elapsed() < timeout {
            if self.get("/readyz").is_some() {
                return;
            }
            assert!(self.child.is_some(), "agent not running");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("agent not ready in {timeout:?}; log:\n{}", self.log_text());
    }

    /// GETs a path of the agent's HTTP endpoint from inside the node namespace.
    pub fn get(&self, path: &str) -> Option<String> {
        let (ns, addr, path) = (format!("/run/netns/{}", self.node_ns), self.metrics_addr.clone(), path.to_owned());
        std::thread::spawn(move || {
            enter_netns(&ns);
            policy_agent::status::fetch(&addr, &path).ok()
        })
        .join()
        .ok()
        .flatten()
    }

    /// The agent's `/status`; a few tries, then a panic with the agent's log (an empty status
    /// would let a test pass or fail for the wrong reason).
    /// The agent's /status. Every read also checks that no incremental compile has differed
    /// from the full one (the suites run the agent with `--incremental-check-ms 0`).
    pub fn status(&self) -> serde_json::Value {
        for _ in 0..5 {
            if let Some(value) = self.get("/status").and_then(|body| serde_json::from_str::<serde_json::Value>(&body).ok()) {
                assert_eq!(value["incremental_mismatches"].as_u64(), Some(0), "the incremental compile differed; log:\n{}", self.log_text());
                return value;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("no /status from the agent; log:\n{}", self.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL: no cleanup, as a crash or OOM kill would leave things.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // `ip netns exec` execs the agent, so this is the agent's own pid.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for AgentRun {
    fn drop(&mut self) {
        self.kill();
    }
}
